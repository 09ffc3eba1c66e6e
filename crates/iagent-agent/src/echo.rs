//! The `echo` kind: replies with the message's own `content_type` and `content`. Every new app
//! gets one, id `echo`, so that a fresh gateway answers before anything is configured.

use serde::Deserialize;

use crate::{Agent, Reply, ReplyStrategy, Replying, Turn};

/// The kind's name in configuration.
pub const KIND: &str = "echo";

/// The echo agent.
#[derive(Debug, Clone)]
pub struct Echo {
    id: String,
    strategy: ReplyStrategy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    strategy: ReplyStrategy,
}

impl Echo {
    /// An echo agent with the default reply strategy.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            strategy: ReplyStrategy::default(),
        }
    }

    /// An echo agent from its JSON configuration (`{}`, or `{"strategy": {...}}`).
    pub fn from_config(id: &str, config: &str) -> Result<Self, String> {
        let config: Config = crate::parse_config(config)?;
        Ok(Self {
            id: id.to_owned(),
            strategy: config.strategy,
        })
    }
}

impl Agent for Echo {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    fn reply<'a>(&'a self, turn: Turn<'a>) -> Replying<'a> {
        Replying::Now(Ok(Reply::Content {
            content_type: turn.message.content_type,
            content: turn.message.content.clone(),
        }))
    }
    /// The reply is computed from the message alone.
    fn repeatable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use iagent_protocol::{ChatType, ContentType, Message, RespCode, SenderType};

    use super::*;

    #[tokio::test]
    async fn echoes_content_and_type() {
        let message = Message {
            chat_type: ChatType::Private,
            msg_id: "m".into(),
            ref_msg_id: None,
            timestamp: 0,
            group_id: None,
            sender_type: SenderType::User,
            sender_id: "u".into(),
            receiver_id: None,
            resp_code: RespCode::Ok,
            content_type: ContentType::Image,
            content: r#"{"file_ids":["f1"]}"#.into(),
        };
        let reply = Echo::new("echo")
            .reply(Turn {
                message: &message,
                history: &[],
                files: &crate::NoFiles,
            })
            .await;
        assert_eq!(
            reply,
            Ok(Reply::Content {
                content_type: ContentType::Image,
                content: message.content.clone()
            })
        );
    }

    #[test]
    fn config_rejects_unknown_keys() {
        assert!(Echo::from_config("e", "{}").is_ok());
        assert!(Echo::from_config("e", r#"{"strategy":{"group":"always"}}"#).is_ok());
        assert!(Echo::from_config("e", r#"{"colour":"blue"}"#).is_err());
    }
}
