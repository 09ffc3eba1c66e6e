#!/usr/bin/env python3
"""Splits each message's latency into the generator's part and the server's, by the wire.

Usage: bench/capture.py CAPTURE PORT LATENCY_LOG [TIMEHIST OFFSET THREAD]

CAPTURE is a pcap file of the loopback traffic to and from the server's PORT, taken with
nanosecond timestamps (tcpdump --time-stamp-precision=nano); LATENCY_LOG is what
`iagent bench --latency-log` wrote in the same run: each measured message's msg_id, the time
its latency is measured from and the time its response was read, in ns since the Unix epoch.
Both are on the wall clock, so a message's times join up:

  scheduled -> request on the wire       the generator's lateness in sending it
  request on the wire -> response on it  the server: the socket, its code, its write
  response on the wire -> read           the generator's lateness in reading it

With TIMEHIST (`perf sched timehist --state` of scheduler events recorded on the server's core
with `perf record -k mono` during the capture), OFFSET (the wall clock minus the monotonic
clock, in seconds) and THREAD (the name of the server's thread that reads the sockets), it
also says what that thread was doing while the messages slower than 0.5 ms on the server were
there (running, waiting for the core, asleep), and what ran on the core meanwhile.

On loopback a packet is stamped as its sender writes it, and it is in the receiver's socket
from then on. Requests are matched by their msg_id, responses by their ref_msg_id (the
gateway's) or their msg_id (an echo's). Only messages whose request and response are both in
the capture, and in the log, are counted.
"""

import re
import struct
import sys
from collections import defaultdict

MSG_ID = re.compile(rb'"msg_id":"([^"]+)"')
REF_MSG_ID = re.compile(rb'"ref_msg_id":"([^"]+)"')


def packets(path):
    """(timestamp in s, source port, destination port, TCP payload) of each packet."""
    data = open(path, "rb").read()
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in (0xA1B23C4D, 0xA1B2C3D4):
        sys.exit(f"{path}: not a little-endian pcap file")
    scale = 1e9 if magic == 0xA1B23C4D else 1e6
    link = struct.unpack("<I", data[20:24])[0]
    # Bytes before the IP header: Ethernet, Linux cooked v1 and v2, BSD loopback.
    skip = {1: 14, 113: 16, 276: 20, 0: 4}.get(link)
    if skip is None:
        sys.exit(f"{path}: link type {link} not understood")
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, length, _ = struct.unpack("<IIII", data[offset : offset + 16])
        packet = data[offset + 16 : offset + 16 + length]
        offset += 16 + length
        ip = packet[skip:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        source, destination = struct.unpack(">HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            yield seconds + fraction / scale, source, destination, payload


def frames(buffer):
    """Takes the whole WebSocket frames at the start of `buffer` (a bytearray): their
    unmasked payloads, text frames only."""
    while len(buffer) >= 2:
        first, second = buffer[0], buffer[1]
        length, header = second & 0x7F, 2
        if length == 126:
            if len(buffer) < 4:
                return
            length, header = struct.unpack(">H", buffer[2:4])[0], 4
        elif length == 127:
            if len(buffer) < 10:
                return
            length, header = struct.unpack(">Q", buffer[2:10])[0], 10
        mask = b""
        if second & 0x80:
            mask = bytes(buffer[header : header + 4])
            header += 4
        if len(buffer) < header + length:
            return
        payload = bytes(buffer[header : header + length])
        del buffer[: header + length]
        if first & 0x0F != 1:
            continue
        if mask:
            payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        yield payload


def wire_times(path, port):
    """When each msg_id's request, and its response, went over the wire."""
    requests, responses = {}, {}
    streams = defaultdict(bytearray)
    for at, source, destination, payload in packets(path):
        key = (source, destination)
        # The capture starts inside a run: a direction is read from its first packet that
        # begins a text frame (0x81: final, text), which on loopback is every write's.
        if key not in streams and payload[0] != 0x81:
            continue
        streams[key] += payload
        to_server = destination == port
        for text in frames(streams[key]):
            found = (MSG_ID if to_server else REF_MSG_ID).search(text)
            if not to_server and found is None:
                found = MSG_ID.search(text)
            if found:
                (requests if to_server else responses).setdefault(found.group(1).decode(), at)
    return requests, responses


def thread_states(timehist, offset, thread, slow):
    """What `thread` and its core did during the `slow` messages' time on the server, given as
    (request on the wire, response on the wire) in wall-clock seconds."""
    runs, states = [], []
    for line in open(timehist):
        fields = line.split()
        try:
            at, task = float(fields[0].rstrip(":")), fields[2]
            wait, delay, run = (float(field) / 1e3 for field in fields[3:6])
        except (IndexError, ValueError):
            continue
        at += offset
        name = task.split("[")[0]
        runs.append((at - run, at, "idle" if name == "<idle>" else name))
        if name == thread:
            states.append((at - run - delay - wait, at - run - delay, "asleep"))
            states.append((at - run - delay, at - run, "waiting for the core"))
            states.append((at - run, at, "running"))
    if not states:
        sys.exit(f"{timehist}: no thread named {thread}")
    first, last = runs[0][0], runs[-1][1]
    slow = [(sent, answered) for sent, answered in slow if first <= sent and answered <= last]
    total = sum(answered - sent for sent, answered in slow)
    if not total:
        return

    def shares(intervals):
        spent = defaultdict(float)
        for sent, answered in slow:
            for start, end, what in intervals:
                spent[what] += max(0.0, min(answered, end) - max(sent, start))
        return sorted(spent.items(), key=lambda item: -item[1])

    print(f"While the {len(slow)} messages slower than 0.5 ms on the server were there:")
    print(f"  {thread}: " + ", ".join(f"{what} {100 * t / total:.0f}%" for what, t in shares(states)))
    ran = [(what, t) for what, t in shares(runs)[:8] if t / total >= 0.005]
    print("  on its core: " + ", ".join(f"{what} {100 * t / total:.0f}%" for what, t in ran))


def main():
    if len(sys.argv) not in (4, 7):
        sys.exit(__doc__)
    capture, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    requests, responses = wire_times(capture, port)
    parts = []
    for line in open(log):
        msg_id, scheduled, read = line.split()
        if msg_id in requests and msg_id in responses:
            sent, answered = requests[msg_id], responses[msg_id]
            scheduled, read = int(scheduled) / 1e9, int(read) / 1e9
            parts.append((sent - scheduled, answered - sent, read - answered, read - scheduled))
    if not parts:
        sys.exit("no message is both in the capture and in the log")
    names = [
        "generator: scheduled -> on the wire",
        "server: request -> response on the wire",
        "generator: on the wire -> read",
        "in all (the latency bench reports)",
    ]
    print(f"{len(parts)} messages; µs")
    print("| part | p50 | p90 | p99 | p99.9 | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    for i, name in enumerate(names):
        values = sorted(part[i] * 1e6 for part in parts)
        at = lambda q: values[min(len(values) - 1, int(len(values) * q))]
        print(f"| {name} | {at(0.5):.0f} | {at(0.9):.0f} | {at(0.99):.0f} | {at(0.999):.0f} | {values[-1]:.0f} |")
    parts.sort(key=lambda part: part[3])
    slowest = parts[int(len(parts) * 0.99) :]
    mean = [sum(part[i] for part in slowest) / len(slowest) * 1e6 for i in range(4)]
    print(
        f"The slowest 1% ({len(slowest)} messages), on average: {mean[0]:.0f} µs to the wire, "
        f"{mean[1]:.0f} in the server, {mean[2]:.0f} to the read, {mean[3]:.0f} in all."
    )
    if len(sys.argv) == 7:
        timehist, offset, thread = sys.argv[4], float(sys.argv[5]), sys.argv[6]
        slow = [
            (sent, answered)
            for sent, answered in ((requests[m], responses[m]) for m in responses if m in requests)
            if answered - sent > 0.0005
        ]
        thread_states(timehist, offset, thread, slow)


if __name__ == "__main__":
    main()
