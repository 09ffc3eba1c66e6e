#!/usr/bin/env node
// The second reference of docs/performance.md: "what a user would otherwise build", a small
// relay in Node.js with the `ws` package that speaks the gateway's chat protocol with the
// built-in echo agent behind it. bench/run drives it exactly as it drives the gateway (same
// frames, same token in the query string, responses matched by `ref_msg_id`), so the gateway's
// figures can be stated as "N times the Node relay".
//
// What it does, as the gateway does (docs/protocol.md, crates/iagent-protocol/src/validate.rs):
// upgrades only `/ws/v1/chat` with the right `app_token` (or `Authorization: Bearer`), 401
// with a JSON body otherwise; parses each text frame as JSON and checks the required fields,
// their types, the enumerations, id and text lengths, group ids and media `file_ids`, in the
// gateway's order and with its wording; answers a valid message like the echo agent (resp_code
// 0 with the message's own content, or 10 for a group message not addressed to `@echo` and for
// a message written by an agent) and an invalid one with 40 and the reason, in the gateway's
// response shape. Frames over 64 KiB close the connection with 1009, invalid UTF-8 with 1007.
//
// What it does not do: it stores nothing. No dedup of resent `msg_id`s, no history, no
// outbox for a connection that went away, no pings, no ordering per conversation beyond the
// connection's own; a crash loses everything in flight. It has no file store, so like a
// gateway app with no uploaded files it rejects every media message's file ids. It is a
// yardstick, not a product. Where JSON.parse cannot tell what the gateway's parser can, it
// is laxer: a duplicate field keeps the last value, and `1.0` passes as the number 1.
//
// Usage: node relay.js [ADDRESS] [TOKEN]   (ADDRESS default 127.0.0.1:0; TOKEN, or the
// environment's RELAY_TOKEN, is the one app token it accepts). Prints
// `listening on ws://HOST:PORT` once it accepts connections, with the real port.
'use strict';

const crypto = require('node:crypto');
const http = require('node:http');
const { WebSocketServer } = require('ws');

const PATH = '/ws/v1/chat';
const AGENT_ID = 'echo'; // the app's one agent, and its default
const GATEWAY_ID = 'iagent'; // signs the rejection of a frame with no readable msg_id
const MAX_ID_BYTES = 128;
const MAX_TEXT_BYTES = 16 * 1024;
const MAX_FRAME_BYTES = 64 * 1024;

/** One broken rule; its message is the `content` of the 40 response. */
class Violation extends Error {}

const typeName = (value) => {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return { string: 'a string', number: 'a number', boolean: 'a boolean' }[typeof value] ?? 'an object';
};
const bytes = (text) => Buffer.byteLength(text, 'utf8');
const wrongType = (field, expected, value) =>
  new Violation(`${field} must be ${expected}, got ${typeName(value)}`);
const tooLong = (field, length, max) =>
  new Violation(`${field} is ${length} bytes, longer than the limit of ${max} bytes`);

function required(frame, field) {
  const value = frame[field];
  if (value === undefined) throw new Violation(`missing field "${field}"`);
  if (value === null) throw new Violation(`field "${field}" must not be null`);
  return value;
}

function string(frame, field) {
  const value = required(frame, field);
  if (typeof value !== 'string') throw wrongType(field, 'a string', value);
  return value;
}

/** An optional string: absent and null both mean "not given". */
function optionalString(frame, field) {
  const value = frame[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== 'string') throw wrongType(field, 'a string', value);
  return value;
}

function id(frame, field) {
  const value = string(frame, field);
  if (value === '') throw new Violation(`${field} must not be empty`);
  if (bytes(value) > MAX_ID_BYTES) throw tooLong(field, bytes(value), MAX_ID_BYTES);
  return value;
}

function code(frame, field, allowed, codes) {
  const value = required(frame, field);
  if (typeof value !== 'number') throw wrongType(field, 'a number', value);
  if (!codes.includes(value)) throw new Violation(`${field} must be ${allowed}, got ${value}`);
  return value;
}

function timestamp(frame) {
  const value = required(frame, 'timestamp');
  if (typeof value !== 'number') throw wrongType('timestamp', 'a number', value);
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Violation(`timestamp must be a non-negative whole number of milliseconds, got ${value}`);
  }
  return value;
}

/** The file ids of a media message's content, `{"file_ids": ["...", ...]}`. */
function fileIds(content) {
  const bad = (why) =>
    new Violation(
      'content of an image, voice or video message must be a JSON string of the form ' +
        `{"file_ids": ["..."]} with at least one non-empty id: ${why}`,
    );
  if (!/^[ \t\n\r]*\{/.test(content)) throw bad('not a JSON object');
  let ids;
  try {
    ids = JSON.parse(content).file_ids;
  } catch (err) {
    throw bad(err.message);
  }
  if (!Array.isArray(ids) || !ids.every((each) => typeof each === 'string')) {
    throw bad('file_ids must be an array of strings');
  }
  if (ids.length === 0) throw bad('the list is empty');
  if (ids.includes('')) throw bad('an id is empty');
  return ids;
}

/** The message a parsed frame holds, or the first rule it breaks, in the gateway's order. */
function validate(frame) {
  const message = {
    chat_type: code(frame, 'chat_type', '1 or 2', [1, 2]),
    msg_id: id(frame, 'msg_id'),
    ref_msg_id: optionalString(frame, 'ref_msg_id'),
    timestamp: timestamp(frame),
    group_id: optionalString(frame, 'group_id'),
    sender_type: code(frame, 'sender_type', '1 or 2', [1, 2]),
    sender_id: id(frame, 'sender_id'),
    receiver_id: optionalString(frame, 'receiver_id'),
    resp_code: code(frame, 'resp_code', '0', [0]),
    content_type: code(frame, 'content_type', '1, 2, 3 or 4', [1, 2, 3, 4]),
    content: string(frame, 'content'),
  };
  for (const field of ['group_id', 'receiver_id']) {
    const value = message[field];
    if (value !== undefined && bytes(value) > MAX_ID_BYTES) throw tooLong(field, bytes(value), MAX_ID_BYTES);
  }
  if (message.chat_type === 2 && !message.group_id) {
    throw new Violation('chat_type 2 (group) requires a non-empty group_id');
  }
  if (message.content_type === 1) {
    if (message.content === '') throw new Violation('content must not be empty');
    const length = bytes(message.content);
    if (length > MAX_TEXT_BYTES) throw tooLong('content', length, MAX_TEXT_BYTES);
  }
  const files = message.content_type === 1 ? [] : fileIds(message.content);
  // What the gateway checks against the app's agents and files: this app has one agent and
  // no files.
  if (message.chat_type === 1 && message.receiver_id !== undefined && message.receiver_id !== AGENT_ID) {
    throw new Violation(`receiver_id "${message.receiver_id}" is not an agent of this app`);
  }
  if (files.length > 0) throw new Violation(`file_id "${files[0]}" is not a file of this app`);
  return message;
}

/** The echo agent's reply strategy by default: the reason code of a 10, or null to reply. */
function noReply(message) {
  if (message.sender_type === 2) return 'sender_is_agent';
  if (message.chat_type === 2 && !addressed(message)) return 'not_addressed';
  return null;
}

function addressed(message) {
  if (message.receiver_id === AGENT_ID) return true;
  return message.content_type === 1 && /@echo(?![\p{L}\p{N}_-])/u.test(message.content);
}

const idPrefix = `r${crypto.randomBytes(8).toString('hex')}-`;
let responses = 0;

/** A response frame, with the gateway's fields in the gateway's order. */
function response(fields) {
  return JSON.stringify({
    chat_type: fields.chat_type,
    msg_id: idPrefix + responses++,
    ref_msg_id: fields.ref_msg_id,
    timestamp: Date.now(),
    group_id: fields.group_id,
    sender_type: 2,
    sender_id: fields.sender_id,
    receiver_id: fields.receiver_id,
    resp_code: fields.resp_code,
    content_type: fields.content_type,
    content: fields.content,
  });
}

const validId = (value) => typeof value === 'string' && value !== '' && bytes(value) <= MAX_ID_BYTES;

/** The 40 response to a frame, referring to it as far as its fields are themselves valid. */
function rejection(frame, reason) {
  const msgId = validId(frame?.msg_id) ? frame.msg_id : undefined;
  return response({
    chat_type: frame?.chat_type === 2 ? 2 : 1,
    ref_msg_id: msgId,
    group_id: validId(frame?.group_id) ? frame.group_id : undefined,
    sender_id: msgId === undefined ? GATEWAY_ID : AGENT_ID,
    receiver_id: validId(frame?.sender_id) ? frame.sender_id : undefined,
    resp_code: 40,
    content_type: 1,
    content: reason,
  });
}

/** The one response to one frame. */
function answer(data, isBinary) {
  if (isBinary) return rejection(null, 'binary frames are not accepted: send a JSON text frame');
  let frame;
  try {
    frame = JSON.parse(data.toString('utf8'));
  } catch (err) {
    return rejection(null, `frame is not valid JSON: ${err.message}`);
  }
  if (typeName(frame) !== 'an object') return rejection(null, 'frame must be a JSON object');
  let message;
  try {
    message = validate(frame);
  } catch (err) {
    if (!(err instanceof Violation)) throw err;
    return rejection(frame, err.message);
  }
  const reason = noReply(message);
  return response({
    ...message,
    ref_msg_id: message.msg_id,
    sender_id: AGENT_ID,
    receiver_id: message.sender_id,
    resp_code: reason === null ? 0 : 10,
    content_type: reason === null ? message.content_type : 1,
    content: reason ?? message.content,
  });
}

/** The app token a request carries: `?app_token=`, else `Authorization: Bearer`. */
function tokenOf(request, url) {
  const token = url.searchParams.get('app_token') ?? request.headers.authorization ?? '';
  return token.startsWith('Bearer ') ? token.slice('Bearer '.length) : token;
}

function sameToken(given, expected) {
  const [a, b] = [Buffer.from(given), Buffer.from(expected)];
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function refuse(socket, status, error) {
  const body = JSON.stringify({ error });
  socket.end(
    `HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\ncontent-type: application/json\r\n` +
      `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`,
  );
}

function main() {
  const [address = '127.0.0.1:0', token = process.env.RELAY_TOKEN] = process.argv.slice(2);
  if (!token) {
    console.error('usage: node relay.js [ADDRESS] TOKEN   (or set RELAY_TOKEN)');
    process.exit(2);
  }
  const colon = address.lastIndexOf(':');
  const host = address.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  const port = Number(address.slice(colon + 1));

  const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_FRAME_BYTES });
  wss.on('connection', (ws) => {
    ws.on('message', (data, isBinary) => ws.send(answer(data, isBinary)));
    // ws closes the connection itself (1009 too big, 1007 bad UTF-8); nothing else to do.
    ws.on('error', () => {});
  });

  // As the gateway does: a small frame must not wait for the previous one's ACK.
  const server = http.createServer({ noDelay: true }, (request, res) => {
    res.writeHead(426, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `upgrade to a WebSocket on ${PATH}` }));
  });
  server.on('upgrade', (request, socket, head) => {
    socket.on('error', () => {});
    const url = new URL(request.url, 'http://relay');
    if (url.pathname !== PATH) return refuse(socket, 404, 'not found');
    const given = tokenOf(request, url);
    if (!given) return refuse(socket, 401, 'missing app_token');
    if (!sameToken(given, token)) return refuse(socket, 401, 'unknown or revoked app_token');
    wss.handleUpgrade(request, socket, head, (ws) => wss.emit('connection', ws, request));
  });
  server.listen(port, host, () => {
    const { address: bound, port: real } = server.address();
    console.log(`listening on ws://${bound.includes(':') ? `[${bound}]` : bound}:${real}`);
  });
}

main();
