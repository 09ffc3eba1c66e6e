//! The iagent chat protocol: the message of the original API page, its result codes, and the
//! validation rules of `docs/protocol.md`, each failure with a reason that names the field.
//!
//! # Layout
//!
//! - [`message`]: the [`Message`] type and its numeric enums, as they travel on the wire.
//! - [`validate`]: [`parse_inbound`] turns one text frame into a valid [`Message`] or a
//!   [`Rejection`] that says exactly what is wrong (answered with `resp_code` 40).
//! - [`response`]: how the gateway's own messages (responses and rejections) are shaped.
//! - [`packed`]: a message's text in the compact form a store keeps it in.
//!
//! This crate knows nothing of sockets or runtimes, so the server, the client SDK and the fuzz
//! targets share one definition of the protocol.

mod fields;
mod json;
pub mod message;
pub mod packed;
pub mod response;
pub mod validate;
mod words;

pub use message::{ChatType, ContentType, FileIds, Message, RespCode, SenderType};
pub use response::{GATEWAY_SENDER_ID, ResponseMeta};
pub use validate::{Limits, MAX_ID_BYTES, Rejection, Violation, parse_inbound};
