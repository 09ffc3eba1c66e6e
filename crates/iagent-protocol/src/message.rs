//! The message of the original API page and its numeric enums.
//!
//! The enums serialize as the plain numbers of the page (`chat_type: 1`), never as names, so the
//! JSON this crate writes is exactly what a backend written against the page expects.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::json::{self, Fields, Name};

/// One chat message: an inbound message from a backend, or a message the gateway sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Private (1) or group (2) chat.
    pub chat_type: ChatType,
    /// Unique id of this message within its app.
    pub msg_id: String,
    /// On a response: the `msg_id` of the message it answers. Absent on messages nobody asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_msg_id: Option<String>,
    /// When the message was sent, in milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The group of a group chat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Whether a user (1) or an agent (2) wrote this message.
    pub sender_type: SenderType,
    /// Who wrote the message: a user id, or an agent id.
    pub sender_id: String,
    /// Who the message is for: an agent id on inbound private messages, the user on responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver_id: Option<String>,
    /// The result code; always 0 on inbound messages.
    pub resp_code: RespCode,
    /// What `content` holds.
    pub content_type: ContentType,
    /// Text, or for media a JSON string of the form `{"file_ids": [...]}`.
    pub content: String,
}

impl Message {
    /// Serializes the message as the JSON text of one WebSocket frame: exactly the text its
    /// `Serialize` gives, written by hand (see [`crate::json`]), since every message the
    /// gateway handles is serialized at least once.
    pub fn to_json(&self) -> String {
        let mut json = json::Object::with_capacity(json::text_capacity(self));
        self.write(&mut json);
        json.finish()
    }

    /// Writes the fields, in the order of the text, all but the closing brace.
    #[inline]
    pub(crate) fn write(&self, out: &mut impl Fields) {
        out.number(Name::ChatType, self.chat_type.code());
        out.string(Name::MsgId, &self.msg_id);
        out.optional_string(Name::RefMsgId, self.ref_msg_id.as_deref());
        out.number(Name::Timestamp, self.timestamp);
        out.optional_string(Name::GroupId, self.group_id.as_deref());
        out.number(Name::SenderType, self.sender_type.code());
        out.string(Name::SenderId, &self.sender_id);
        out.optional_string(Name::ReceiverId, self.receiver_id.as_deref());
        out.number(Name::RespCode, self.resp_code.code());
        out.number(Name::ContentType, self.content_type.code());
        out.string(Name::Content, &self.content);
    }
}

/// The media file ids a non-text message refers to: the decoded form of its `content`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIds {
    /// At least one id, none of them empty.
    pub file_ids: Vec<String>,
}

macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $field:literal, $allowed:literal {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// The wire name of the field this enum is the value of.
            pub const FIELD: &'static str = $field;
            /// The allowed values, as the validation reason spells them.
            pub const ALLOWED: &'static str = $allowed;

            /// The number this value has on the wire.
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// The value with this wire number, if there is one.
            pub const fn from_code(code: i64) -> Option<Self> {
                match code {
                    $($value => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_u8(self.code())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct CodeVisitor;

                impl Visitor<'_> for CodeVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} as one of {}", $field, $allowed)
                    }

                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$name, E> {
                        i64::try_from(v)
                            .ok()
                            .and_then($name::from_code)
                            .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(v), &self))
                    }

                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$name, E> {
                        $name::from_code(v)
                            .ok_or_else(|| E::invalid_value(Unexpected::Signed(v), &self))
                    }
                }

                deserializer.deserialize_u64(CodeVisitor)
            }
        }
    };
}

wire_enum! {
    /// Private or group chat.
    ChatType, "chat_type", "1 or 2" {
        /// A user talking with one agent.
        Private = 1,
        /// A group of users and agents.
        Group = 2,
    }
}

wire_enum! {
    /// Who wrote a message.
    SenderType, "sender_type", "1 or 2" {
        /// An end user of the app.
        User = 1,
        /// An agent.
        Agent = 2,
    }
}

wire_enum! {
    /// What a message's `content` holds.
    ContentType, "content_type", "1, 2, 3 or 4" {
        /// Plain text.
        Text = 1,
        /// Images, by file id.
        Image = 2,
        /// Voice recordings, by file id.
        Voice = 3,
        /// Videos, by file id.
        Video = 4,
    }
}

wire_enum! {
    /// The outcome a response reports. Inbound messages always carry [`RespCode::Ok`].
    RespCode, "resp_code", "0" {
        /// The agent replied; `content` is the reply.
        Ok = 0,
        /// Received, but the reply strategy decided not to reply; `content` is the reason code.
        NoReply = 10,
        /// The inbound message is illegal; `content` says what is wrong.
        Illegal = 40,
        /// Processing failed; `content` is the cause.
        Failed = 50,
    }
}
