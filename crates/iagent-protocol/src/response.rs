//! The shape of the messages the gateway writes: responses to inbound messages, rejections of
//! frames, and messages sent on the gateway's own initiative (`docs/protocol.md`, "Responses").

use crate::message::{ChatType, ContentType, Message, RespCode, SenderType};
use crate::validate::Rejection;

/// The `sender_id` of a rejection whose frame named no readable sender.
pub const GATEWAY_SENDER_ID: &str = "iagent";

/// What the gateway stamps on every message it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseMeta {
    /// A new, gateway-made unique id.
    pub msg_id: String,
    /// The gateway's clock, in ms since the Unix epoch.
    pub timestamp: i64,
}

impl Message {
    /// The response to `self`, written by `agent_id`, with the given code and content.
    pub fn response(
        &self,
        meta: ResponseMeta,
        agent_id: &str,
        resp_code: RespCode,
        content_type: ContentType,
        content: String,
    ) -> Message {
        Message {
            chat_type: self.chat_type,
            msg_id: meta.msg_id,
            ref_msg_id: Some(self.msg_id.clone()),
            timestamp: meta.timestamp,
            group_id: self.group_id.clone(),
            sender_type: SenderType::Agent,
            sender_id: agent_id.to_owned(),
            receiver_id: Some(self.sender_id.clone()),
            resp_code,
            content_type,
            content,
        }
    }

    /// A text response to `self` (codes 10 and 50, and text replies).
    pub fn text_response(
        &self,
        meta: ResponseMeta,
        agent_id: &str,
        resp_code: RespCode,
        content: impl Into<String>,
    ) -> Message {
        self.response(meta, agent_id, resp_code, ContentType::Text, content.into())
    }
}

impl Rejection {
    /// The 40 response to the rejected frame, referring to it as far as it could be read.
    ///
    /// `agent_id` is the agent the message would have gone to, when known; otherwise the
    /// gateway itself (`"iagent"`) signs the rejection.
    pub fn response(&self, meta: ResponseMeta, agent_id: Option<&str>) -> Message {
        Message {
            chat_type: self.chat_type.unwrap_or(ChatType::Private),
            msg_id: meta.msg_id,
            ref_msg_id: self.msg_id.clone(),
            timestamp: meta.timestamp,
            group_id: self.group_id.clone(),
            sender_type: SenderType::Agent,
            sender_id: agent_id.unwrap_or(GATEWAY_SENDER_ID).to_owned(),
            receiver_id: self.sender_id.clone(),
            resp_code: RespCode::Illegal,
            content_type: ContentType::Text,
            content: self.violation.to_string(),
        }
    }
}
