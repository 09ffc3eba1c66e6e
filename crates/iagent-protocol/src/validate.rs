//! Validation of inbound frames, rule by rule as `docs/protocol.md` lists them.
//!
//! A frame is first read as a JSON object whose known fields are kept as raw JSON text; each
//! field is then checked on its own. Reading fields raw, rather than deserializing straight into
//! [`Message`], is what lets every failure name its field and say what it got
//! (`timestamp must be a number, got a string`), and lets a rejection still carry the `msg_id`
//! it refers to when only another field is wrong.

use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::fields::{RawFrame, scan};
use crate::message::{ChatType, ContentType, FileIds, Message, RespCode, SenderType};

/// The longest `msg_id`, `sender_id`, `group_id` or `receiver_id`, in bytes.
///
/// Ids are keys of the gateway's dedup records and conversation queues; 128 bytes holds any
/// UUID, ULID or snowflake with room to spare.
pub const MAX_ID_BYTES: usize = 128;

/// The per-app limits validation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest text content (`content_type` 1), in bytes.
    pub max_text_bytes: usize,
}

impl Limits {
    /// The default text limit: 16 KiB.
    pub const DEFAULT_MAX_TEXT_BYTES: usize = 16 * 1024;
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_bytes: Self::DEFAULT_MAX_TEXT_BYTES,
        }
    }
}

/// One broken rule. Its `Display` text is the `content` of the 40 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The frame is not JSON at all; the parser's message says where.
    NotJson(String),
    /// The frame is JSON, but not an object.
    NotObject,
    /// The frame is a binary WebSocket frame.
    BinaryFrame,
    /// The object has the same field twice.
    DuplicateField(String),
    /// A required field is absent.
    Missing(&'static str),
    /// A required field is `null`.
    Null(&'static str),
    /// A field has the wrong JSON type.
    WrongType {
        /// The field.
        field: &'static str,
        /// The type it must have.
        expected: &'static str,
        /// The type it has.
        got: &'static str,
    },
    /// A numeric field holds a number outside its allowed values.
    NotAllowed {
        /// The field.
        field: &'static str,
        /// The allowed values, in words.
        allowed: &'static str,
        /// The value as it was written.
        got: String,
    },
    /// A string field is empty.
    Empty(&'static str),
    /// A string field is longer than its limit.
    TooLong {
        /// The field.
        field: &'static str,
        /// Its limit in bytes.
        max: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// `timestamp` is negative or not a whole number of milliseconds.
    BadTimestamp(String),
    /// A group message without a `group_id`.
    GroupWithoutGroupId,
    /// The media `content` is not `{"file_ids": [...]}` with at least one non-empty id.
    BadFileIds(String),
    /// A private message's `receiver_id` names no agent of the app.
    UnknownAgent(String),
    /// A media message names a file the app does not have.
    UnknownFile(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(err) => write!(f, "frame is not valid JSON: {err}"),
            Self::NotObject => f.write_str("frame must be a JSON object"),
            Self::BinaryFrame => {
                f.write_str("binary frames are not accepted: send a JSON text frame")
            }
            Self::DuplicateField(field) => write!(f, "duplicate field \"{field}\""),
            Self::Missing(field) => write!(f, "missing field \"{field}\""),
            Self::Null(field) => write!(f, "field \"{field}\" must not be null"),
            Self::WrongType {
                field,
                expected,
                got,
            } => {
                write!(f, "{field} must be {expected}, got {got}")
            }
            Self::NotAllowed {
                field,
                allowed,
                got,
            } => {
                write!(f, "{field} must be {allowed}, got {got}")
            }
            Self::Empty(field) => write!(f, "{field} must not be empty"),
            Self::TooLong { field, max, len } => {
                write!(
                    f,
                    "{field} is {len} bytes, longer than the limit of {max} bytes"
                )
            }
            Self::BadTimestamp(got) => {
                write!(
                    f,
                    "timestamp must be a non-negative whole number of milliseconds, got {got}"
                )
            }
            Self::GroupWithoutGroupId => {
                f.write_str("chat_type 2 (group) requires a non-empty group_id")
            }
            Self::BadFileIds(why) => write!(
                f,
                "content of an image, voice or video message must be a JSON string of the form \
                 {{\"file_ids\": [\"...\"]}} with at least one non-empty id: {why}"
            ),
            Self::UnknownAgent(id) => {
                write!(f, "receiver_id \"{id}\" is not an agent of this app")
            }
            Self::UnknownFile(id) => {
                write!(f, "file_id \"{id}\" is not a file of this app")
            }
        }
    }
}

impl std::error::Error for Violation {}

/// Why a frame was rejected, and what of it could be read, so that the 40 response can still
/// refer to the message (`ref_msg_id`) and reach its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The first rule the frame broke.
    pub violation: Violation,
    /// The frame's `msg_id`, when that field itself was valid.
    pub msg_id: Option<String>,
    /// The frame's `chat_type`, when valid.
    pub chat_type: Option<ChatType>,
    /// The frame's `group_id`, when a valid string.
    pub group_id: Option<String>,
    /// The frame's `sender_id`, when valid.
    pub sender_id: Option<String>,
}

impl Rejection {
    /// A rejection of a frame of which nothing could be read.
    pub fn unreadable(violation: Violation) -> Self {
        Self {
            violation,
            msg_id: None,
            chat_type: None,
            group_id: None,
            sender_id: None,
        }
    }

    /// A rejection of a message that was itself well formed (a rule that needs the app's
    /// context, such as an unknown agent).
    pub fn of_message(message: &Message, violation: Violation) -> Self {
        Self {
            violation,
            msg_id: Some(message.msg_id.clone()),
            chat_type: Some(message.chat_type),
            group_id: message.group_id.clone(),
            sender_id: Some(message.sender_id.clone()),
        }
    }
}

/// The known fields of a frame as `serde_json` reads them, for the frames [`scan`] leaves to
/// it: raw values (a `null` is kept, not folded into "absent"); unknown fields are skipped,
/// duplicate known fields are an error.
#[derive(Deserialize)]
struct SerdeFrame<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    chat_type: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    msg_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    ref_msg_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    timestamp: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    group_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    sender_type: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    sender_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    receiver_id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    resp_code: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    content_type: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    content: Option<&'a RawValue>,
}

impl<'a> From<SerdeFrame<'a>> for RawFrame<'a> {
    fn from(frame: SerdeFrame<'a>) -> Self {
        let token = |raw: Option<&'a RawValue>| raw.map(RawValue::get);
        Self {
            chat_type: token(frame.chat_type),
            msg_id: token(frame.msg_id),
            ref_msg_id: token(frame.ref_msg_id),
            timestamp: token(frame.timestamp),
            group_id: token(frame.group_id),
            sender_type: token(frame.sender_type),
            sender_id: token(frame.sender_id),
            receiver_id: token(frame.receiver_id),
            resp_code: token(frame.resp_code),
            content_type: token(frame.content_type),
            content: token(frame.content),
            escapes: true,
        }
    }
}

/// Keeps a present field, `null` included, as raw text.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Parses and validates one inbound text frame.
///
/// Rules are checked in the order of `docs/protocol.md`; the first broken one is reported.
/// A frame with escapes in a field name is not a valid object for this purpose only if serde
/// cannot read it; otherwise the same rules apply to every input, and no input panics.
#[expect(
    clippy::result_large_err,
    reason = "a rejection is made at most once per frame and carries the context its 40 response needs"
)]
pub fn parse_inbound(frame: &str, limits: &Limits) -> Result<Message, Rejection> {
    let raw = read_object(frame)?;
    read_message(&raw)
        .and_then(|message| check_message(&message, limits).map(|()| message))
        .map_err(|violation| rejection(&raw, violation))
}

/// The message a frame's fields make, or the first rule they break.
fn read_message(raw: &RawFrame<'_>) -> Result<Message, Violation> {
    let escapes = raw.escapes;
    Ok(Message {
        chat_type: chat_type_field(raw.chat_type)?,
        msg_id: id_field(raw.msg_id, "msg_id", escapes)?,
        ref_msg_id: optional_string(raw.ref_msg_id, "ref_msg_id", escapes)?,
        timestamp: timestamp_field(raw.timestamp)?,
        group_id: optional_string(raw.group_id, "group_id", escapes)?,
        sender_type: enum_field(
            raw.sender_type,
            SenderType::FIELD,
            SenderType::ALLOWED,
            SenderType::from_code,
        )?,
        sender_id: id_field(raw.sender_id, "sender_id", escapes)?,
        receiver_id: optional_string(raw.receiver_id, "receiver_id", escapes)?,
        resp_code: enum_field(raw.resp_code, RespCode::FIELD, RespCode::ALLOWED, |code| {
            (code == 0).then_some(RespCode::Ok)
        })?,
        content_type: enum_field(
            raw.content_type,
            ContentType::FIELD,
            ContentType::ALLOWED,
            ContentType::from_code,
        )?,
        content: string_field(raw.content, "content", escapes)?,
    })
}

/// The `chat_type` field: read for the message, and again for a rejection's context.
fn chat_type_field(raw: Option<&str>) -> Result<ChatType, Violation> {
    enum_field(raw, ChatType::FIELD, ChatType::ALLOWED, ChatType::from_code)
}

/// The rejection of a frame for `violation`, with what its 40 response needs to refer to the
/// message and reach its sender: each of those fields that is itself valid, whichever other
/// field broke a rule. They are read again only for a frame that is rejected, so that a valid
/// one costs no copies of its ids.
fn rejection(raw: &RawFrame<'_>, violation: Violation) -> Rejection {
    Rejection {
        violation,
        msg_id: id_field(raw.msg_id, "msg_id", raw.escapes).ok(),
        chat_type: chat_type_field(raw.chat_type).ok(),
        group_id: optional_string(raw.group_id, "group_id", raw.escapes)
            .ok()
            .flatten()
            .filter(|g| !g.is_empty() && g.len() <= MAX_ID_BYTES),
        sender_id: id_field(raw.sender_id, "sender_id", raw.escapes).ok(),
    }
}

/// The rules that relate fields to each other or to limits, on a message whose fields each have
/// the right type.
fn check_message(message: &Message, limits: &Limits) -> Result<(), Violation> {
    if let Some(group_id) = &message.group_id {
        check_id_length(group_id, "group_id")?;
    }
    if let Some(receiver_id) = &message.receiver_id {
        check_id_length(receiver_id, "receiver_id")?;
    }
    if message.chat_type == ChatType::Group && message.group_id.as_deref().is_none_or(str::is_empty)
    {
        return Err(Violation::GroupWithoutGroupId);
    }
    match message.content_type {
        ContentType::Text if message.content.is_empty() => Err(Violation::Empty("content")),
        ContentType::Text if message.content.len() > limits.max_text_bytes => {
            Err(Violation::TooLong {
                field: "content",
                max: limits.max_text_bytes,
                len: message.content.len(),
            })
        }
        ContentType::Text => Ok(()),
        ContentType::Image | ContentType::Voice | ContentType::Video => {
            parse_file_ids(&message.content).map(drop)
        }
    }
}

/// Decodes the `content` of a media message.
pub fn parse_file_ids(content: &str) -> Result<FileIds, Violation> {
    // A derived struct deserializer also accepts a JSON array (`[["001"]]`); only the object
    // form is the documented one.
    if !starts_object(content) {
        return Err(Violation::BadFileIds("not a JSON object".into()));
    }
    let ids: FileIds =
        serde_json::from_str(content).map_err(|err| Violation::BadFileIds(err.to_string()))?;
    if ids.file_ids.is_empty() {
        return Err(Violation::BadFileIds("the list is empty".into()));
    }
    if ids.file_ids.iter().any(String::is_empty) {
        return Err(Violation::BadFileIds("an id is empty".into()));
    }
    Ok(ids)
}

/// Whether `text` begins, after JSON whitespace, with `{`.
fn starts_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

/// Whether the one-pass reader of a frame's fields ([`scan`]) agrees with serde_json on
/// `frame`: it declines the frame, or serde_json reads the same fields from it. For the
/// protocol's tests and fuzz target, which check it on every frame they make.
#[doc(hidden)]
pub fn one_pass_agrees(frame: &str) -> bool {
    scan(frame).is_none_or(|fields| {
        read_by_serde(frame).is_ok_and(|by_serde| {
            RawFrame {
                escapes: false,
                ..by_serde
            } == fields
        })
    })
}

/// The frame's fields: by [`scan`] when it has the common shape, else by `serde_json`, which
/// also says what is wrong with a frame that is not a JSON object.
#[expect(clippy::result_large_err, reason = "see parse_inbound")]
fn read_object(frame: &str) -> Result<RawFrame<'_>, Rejection> {
    match scan(frame) {
        Some(fields) => Ok(fields),
        None => read_by_serde(frame),
    }
}

/// The frame's fields as `serde_json` reads them, or what is wrong with the frame.
#[expect(clippy::result_large_err, reason = "see parse_inbound")]
pub(crate) fn read_by_serde(frame: &str) -> Result<RawFrame<'_>, Rejection> {
    // A derived struct deserializer also accepts a JSON array, reading its elements as the
    // fields in declaration order: anything that does not start as an object is rejected here,
    // as "not JSON" or as "not an object" depending on whether it is valid JSON at all.
    if !starts_object(frame) {
        let violation = match serde_json::from_str::<serde::de::IgnoredAny>(frame) {
            Ok(_) => Violation::NotObject,
            Err(err) => Violation::NotJson(err.to_string()),
        };
        return Err(Rejection::unreadable(violation));
    }
    match serde_json::from_str::<SerdeFrame<'_>>(frame) {
        Ok(fields) => Ok(fields.into()),
        Err(err) => {
            let violation = match err.classify() {
                serde_json::error::Category::Data => data_error(&err),
                _ => Violation::NotJson(err.to_string()),
            };
            Err(Rejection::unreadable(violation))
        }
    }
}

/// Names the duplicate field of an object: the only "data" error reading a [`SerdeFrame`] from
/// an object can give.
fn data_error(err: &serde_json::Error) -> Violation {
    let text = err.to_string();
    match text
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.split('`').next())
    {
        Some(field) => Violation::DuplicateField(field.to_owned()),
        None => Violation::NotJson(text),
    }
}

/// The JSON type of a raw value, in the words of a validation reason.
fn json_type(raw: &str) -> &'static str {
    match raw.as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

fn required<'a>(raw: Option<&'a str>, field: &'static str) -> Result<&'a str, Violation> {
    match raw {
        None => Err(Violation::Missing(field)),
        Some("null") => Err(Violation::Null(field)),
        Some(raw) => Ok(raw),
    }
}

/// The string a raw value holds. `escapes` says whether its token may hold escapes (see
/// [`RawFrame::escapes`]): a frame read in one pass has none, and its tokens are not searched
/// for a backslash again.
fn string_value(raw: &str, field: &'static str, escapes: bool) -> Result<String, Violation> {
    match json_type(raw) {
        // A raw value is a JSON token the parser has already read in full, so one without a
        // backslash is its quotes around the string as it is: decoding it again would only
        // copy it, at twice the cost. That is nearly every id and text.
        "a string" if !escapes || !raw.contains('\\') => Ok(unquoted(raw).to_owned()),
        "a string" => {
            serde_json::from_str(raw).map_err(|err| Violation::NotJson(format!("{field}: {err}")))
        }
        got => Err(Violation::WrongType {
            field,
            expected: "a string",
            got,
        }),
    }
}

/// The text between a JSON string token's quotes.
fn unquoted(token: &str) -> &str {
    token
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or(token)
}

fn string_field(
    raw: Option<&str>,
    field: &'static str,
    escapes: bool,
) -> Result<String, Violation> {
    string_value(required(raw, field)?, field, escapes)
}

/// An optional string: absent and `null` both mean "not given".
fn optional_string(
    raw: Option<&str>,
    field: &'static str,
    escapes: bool,
) -> Result<Option<String>, Violation> {
    match raw {
        None => Ok(None),
        Some("null") => Ok(None),
        Some(raw) => string_value(raw, field, escapes).map(Some),
    }
}

fn check_id_length(id: &str, field: &'static str) -> Result<(), Violation> {
    if id.len() > MAX_ID_BYTES {
        return Err(Violation::TooLong {
            field,
            max: MAX_ID_BYTES,
            len: id.len(),
        });
    }
    Ok(())
}

/// A required, non-empty id of at most [`MAX_ID_BYTES`].
fn id_field(raw: Option<&str>, field: &'static str, escapes: bool) -> Result<String, Violation> {
    let id = string_field(raw, field, escapes)?;
    if id.is_empty() {
        return Err(Violation::Empty(field));
    }
    check_id_length(&id, field)?;
    Ok(id)
}

fn integer(raw: &str, field: &'static str) -> Result<Result<i64, String>, Violation> {
    match json_type(raw) {
        "a number" => Ok(raw.parse::<i64>().map_err(|_| raw.to_owned())),
        got => Err(Violation::WrongType {
            field,
            expected: "a number",
            got,
        }),
    }
}

fn enum_field<T>(
    raw: Option<&str>,
    field: &'static str,
    allowed: &'static str,
    from_code: impl Fn(i64) -> Option<T>,
) -> Result<T, Violation> {
    let raw = required(raw, field)?;
    integer(raw, field)?
        .ok()
        .and_then(from_code)
        .ok_or_else(|| Violation::NotAllowed {
            field,
            allowed,
            got: raw.to_owned(),
        })
}

fn timestamp_field(raw: Option<&str>) -> Result<i64, Violation> {
    let raw = required(raw, "timestamp")?;
    match integer(raw, "timestamp")? {
        Ok(ms) if ms >= 0 => Ok(ms),
        _ => Err(Violation::BadTimestamp(raw.to_owned())),
    }
}
