//! The reply strategy: whether an agent answers a message at all.
//!
//! Every "no" is a `resp_code` 10 whose content is a machine-readable reason code, so a backend
//! can tell "the agent chose silence" from "the message was lost".

use std::fmt;

use iagent_protocol::{ChatType, ContentType, Message, SenderType};
use serde::Deserialize;

/// When an agent answers private messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivatePolicy {
    /// Every private message (the default).
    #[default]
    Always,
    /// Never.
    Never,
}

/// When an agent answers group messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPolicy {
    /// When addressed: `receiver_id` is the agent, or the text mentions `@` and its id (the
    /// default, so that agents do not talk over every group conversation).
    #[default]
    Mention,
    /// Every group message.
    Always,
    /// Never.
    Never,
}

/// The per-agent rules of `agents.md` ("Reply strategy").
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplyStrategy {
    /// Private chats.
    pub private: PrivatePolicy,
    /// Group chats.
    pub group: GroupPolicy,
    /// Whether messages written by agents (`sender_type` 2) are answered. Off by default, so
    /// that agents never loop on each other.
    pub answer_agents: bool,
    /// After the agent speaks in a conversation, it stays silent there for this many
    /// milliseconds: messages in between get 10 with `cooldown`. 0 (the default) is no cooldown.
    /// Judged from the conversation's stored history, its last [`crate::MAX_HISTORY`] messages.
    pub cooldown_ms: u64,
}

/// Why an agent does not reply: the `content` of the 10 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReply {
    /// A group message that does not address the agent.
    NotAddressed,
    /// A message written by an agent.
    SenderIsAgent,
    /// The agent never answers private messages.
    PrivateDisabled,
    /// The agent never answers group messages.
    GroupDisabled,
    /// The agent spoke in this conversation less than its cooldown ago.
    Cooldown,
}

impl NoReply {
    /// The reason code as sent.
    pub const fn code(self) -> &'static str {
        match self {
            Self::NotAddressed => "not_addressed",
            Self::SenderIsAgent => "sender_is_agent",
            Self::PrivateDisabled => "private_disabled",
            Self::GroupDisabled => "group_disabled",
            Self::Cooldown => "cooldown",
        }
    }
}

impl fmt::Display for NoReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl ReplyStrategy {
    /// Whether agent `agent_id` replies to `message`.
    pub fn decide(&self, message: &Message, agent_id: &str) -> Result<(), NoReply> {
        if message.sender_type == SenderType::Agent && !self.answer_agents {
            return Err(NoReply::SenderIsAgent);
        }
        match message.chat_type {
            ChatType::Private => match self.private {
                PrivatePolicy::Always => Ok(()),
                PrivatePolicy::Never => Err(NoReply::PrivateDisabled),
            },
            ChatType::Group => match self.group {
                GroupPolicy::Always => Ok(()),
                GroupPolicy::Never => Err(NoReply::GroupDisabled),
                GroupPolicy::Mention if addresses(message, agent_id) => Ok(()),
                GroupPolicy::Mention => Err(NoReply::NotAddressed),
            },
        }
    }

    /// Whether agent `agent_id`, at `now_ms`, is still silent after speaking in a conversation
    /// whose earlier messages are `history`.
    pub fn cooling_down(&self, history: &[Message], agent_id: &str, now_ms: i64) -> bool {
        if self.cooldown_ms == 0 {
            return false;
        }
        let since = now_ms.saturating_sub(i64::try_from(self.cooldown_ms).unwrap_or(i64::MAX));
        history.iter().any(|earlier| {
            earlier.sender_type == SenderType::Agent
                && earlier.sender_id == agent_id
                && earlier.timestamp > since
        })
    }
}

/// Whether a message addresses the agent: by `receiver_id`, or by `@id` in its text, the mention
/// ending where the id does (`@bot` does not address `bo`).
pub fn addresses(message: &Message, agent_id: &str) -> bool {
    if message.receiver_id.as_deref() == Some(agent_id) {
        return true;
    }
    if message.content_type != ContentType::Text {
        return false;
    }
    let mention = format!("@{agent_id}");
    message.content.match_indices(&mention).any(|(at, _)| {
        message.content[at + mention.len()..]
            .chars()
            .next()
            .is_none_or(|next| !(next.is_alphanumeric() || next == '_' || next == '-'))
    })
}

#[cfg(test)]
mod tests {
    use iagent_protocol::RespCode;

    use super::*;

    fn message(
        chat_type: ChatType,
        sender_type: SenderType,
        receiver: Option<&str>,
        text: &str,
    ) -> Message {
        Message {
            chat_type,
            msg_id: "m1".into(),
            ref_msg_id: None,
            timestamp: 1,
            group_id: (chat_type == ChatType::Group).then(|| "g1".into()),
            sender_type,
            sender_id: "u1".into(),
            receiver_id: receiver.map(Into::into),
            resp_code: RespCode::Ok,
            content_type: ContentType::Text,
            content: text.into(),
        }
    }

    #[test]
    fn private_messages_are_answered_by_default() {
        let strategy = ReplyStrategy::default();
        let msg = message(ChatType::Private, SenderType::User, None, "hi");
        assert_eq!(strategy.decide(&msg, "bot"), Ok(()));
        let never = ReplyStrategy {
            private: PrivatePolicy::Never,
            ..Default::default()
        };
        assert_eq!(never.decide(&msg, "bot"), Err(NoReply::PrivateDisabled));
    }

    #[test]
    fn group_messages_need_a_mention_by_default() {
        let strategy = ReplyStrategy::default();
        let plain = message(ChatType::Group, SenderType::User, None, "hello all");
        assert_eq!(strategy.decide(&plain, "bot"), Err(NoReply::NotAddressed));
        let to_bot = message(ChatType::Group, SenderType::User, Some("bot"), "hello");
        assert_eq!(strategy.decide(&to_bot, "bot"), Ok(()));
        let mention = message(ChatType::Group, SenderType::User, None, "hey @bot, help");
        assert_eq!(strategy.decide(&mention, "bot"), Ok(()));
        let other = message(ChatType::Group, SenderType::User, None, "hey @bots");
        assert_eq!(strategy.decide(&other, "bot"), Err(NoReply::NotAddressed));
        let always = ReplyStrategy {
            group: GroupPolicy::Always,
            ..Default::default()
        };
        assert_eq!(always.decide(&plain, "bot"), Ok(()));
    }

    #[test]
    fn agent_messages_are_not_answered_by_default() {
        let msg = message(ChatType::Private, SenderType::Agent, None, "hi");
        assert_eq!(
            ReplyStrategy::default().decide(&msg, "bot"),
            Err(NoReply::SenderIsAgent)
        );
        let open = ReplyStrategy {
            answer_agents: true,
            ..Default::default()
        };
        assert_eq!(open.decide(&msg, "bot"), Ok(()));
    }

    #[test]
    fn a_cooldown_holds_only_after_the_agent_spoke_and_only_for_its_length() {
        let strategy = ReplyStrategy {
            cooldown_ms: 1_000,
            ..ReplyStrategy::default()
        };
        let said = |sender_type, sender: &str, at| Message {
            sender_type,
            sender_id: sender.into(),
            timestamp: at,
            ..message(ChatType::Group, SenderType::User, None, "x")
        };
        let history = [
            said(SenderType::User, "bot", 9_900),
            said(SenderType::Agent, "other", 9_900),
            said(SenderType::Agent, "bot", 9_000),
        ];
        // Only the agent's own words count: a user named like it and another agent do not.
        assert!(!strategy.cooling_down(&history[..2], "bot", 10_000));
        assert!(strategy.cooling_down(&history, "bot", 9_999));
        assert!(!strategy.cooling_down(&history, "bot", 10_000));
        assert!(!ReplyStrategy::default().cooling_down(&history, "bot", 9_001));
        assert_eq!(NoReply::Cooldown.code(), "cooldown");
    }
}
