//! Agents: the AIs that answer chat messages, and the reply strategy that decides whether they
//! answer at all.
//!
//! # Layout
//!
//! - [`Agent`]: the trait every kind implements; a new kind is one file implementing it plus a
//!   line in [`Kinds::builtin`] (or, outside this crate, a [`Kinds::with`]).
//! - [`strategy`]: [`ReplyStrategy`], the per-agent rules that turn a message into a reply or a
//!   `resp_code` 10 with a reason code.
//! - [`echo`]: the built-in `echo` kind every new app starts with.
//! - [`rules`]: the built-in `rules` kind: keyword and regular-expression rules with reply
//!   templates.
//! - [`openai`]: the built-in `openai` kind: a model behind any OpenAI-compatible
//!   chat-completions endpoint, given the conversation so far.
//! - [`webhook`]: the built-in `webhook` kind: the app's own HTTP service decides the reply,
//!   called with a signed JSON POST.
//! - `http`: the outbound HTTP(S) client the kinds that call a service share: one keep-alive
//!   pool, a deadline per call, bounded bodies, retries only where they are safe.
//! - [`Files`] and [`Environment`]: what an agent may read besides the message: the app's files,
//!   and the secrets its configuration names by environment variable.

pub mod echo;
mod http;
pub mod openai;
pub mod rules;
#[cfg(test)]
mod stand_in;
pub mod strategy;
pub mod webhook;

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;

use iagent_protocol::{ContentType, Message};

pub use strategy::{NoReply, ReplyStrategy};

/// A boxed future, so that [`Agent`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An agent's answer to one message: made at once, or still being made.
///
/// Most answers are made from the message alone (the built-in `echo` and `rules` kinds), and
/// a future for each, boxed to keep [`Agent`] object safe, was an allocation a message on the
/// gateway's busiest path; an answer made at once is handed over as it is. Awaiting a
/// `Replying` ([`IntoFuture`]) gives the answer either way, for callers that need no more.
pub enum Replying<'a> {
    /// The answer, made at once: nothing to wait for, so no deadline either.
    Now(Result<Reply, AgentError>),
    /// The answer to come (a call to a service): the gateway waits for it under the agent's
    /// deadline.
    Later(BoxFuture<'a, Result<Reply, AgentError>>),
}

impl<'a> IntoFuture for Replying<'a> {
    type Output = Result<Reply, AgentError>;
    type IntoFuture = BoxFuture<'a, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        match self {
            Self::Now(answer) => Box::pin(std::future::ready(answer)),
            Self::Later(answer) => answer,
        }
    }
}

impl fmt::Debug for Replying<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Now(answer) => f.debug_tuple("Now").field(answer).finish(),
            Self::Later(_) => f.write_str("Later(..)"),
        }
    }
}

/// What an agent is asked: the message and the conversation so far.
#[derive(Clone, Copy)]
pub struct Turn<'a> {
    /// The message to answer.
    pub message: &'a Message,
    /// Earlier messages of the conversation, oldest first (both directions).
    pub history: &'a [Message],
    /// The files of the message's app, for agents that look at what a media message holds
    /// rather than only at its file ids.
    pub files: &'a dyn Files,
}

impl fmt::Debug for Turn<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Turn")
            .field("message", self.message)
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

/// A stored file, as an agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Its MIME type, as given on upload.
    pub content_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The files an agent may read: those of the app whose message it answers. Object safe, so the
/// gateway hands agents its store without the agent crate depending on it.
pub trait Files: Send + Sync {
    /// The file with id `file_id`; `Ok(None)` when the app has no such file (any more: files
    /// expire), `Err` with the cause when it cannot be read.
    fn read<'a>(&'a self, file_id: &'a str) -> BoxFuture<'a, Result<Option<File>, String>>;
}

/// No files at all: for turns whose messages hold none, such as in tests of text-only agents.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFiles;

impl Files for NoFiles {
    fn read<'a>(&'a self, _file_id: &'a str) -> BoxFuture<'a, Result<Option<File>, String>> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// Where agents look up the secrets their configuration names by environment variable
/// (`secret_env`, `api_key_env`), so that secrets stay out of the stored configuration.
///
/// [`Environment::process`] is the process's environment, what the gateway uses. Tests and
/// embedders pass their own lookup with [`Environment::from_fn`] (to [`Kinds::builtin_with`]):
/// setting a process's environment at run time is unsafe in a multi-threaded program.
/// Variables are read on each call, not when the agent is built, because agents are also built
/// to check a configuration where the variable need not be set (`iagent agent add`).
#[derive(Clone)]
pub struct Environment(Arc<Lookup>);

/// A lookup of environment variables by name.
type Lookup = dyn Fn(&str) -> Option<String> + Send + Sync;

impl Environment {
    /// The process's environment variables.
    pub fn process() -> Self {
        Self::from_fn(|name| std::env::var(name).ok())
    }

    /// A lookup of one's own: `lookup(name)` is the value of variable `name`, if set.
    pub fn from_fn(lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(lookup))
    }

    /// The value of variable `name`, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }
}

impl fmt::Debug for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Environment")
    }
}

/// What an agent answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A reply: becomes `resp_code` 0.
    Content {
        /// What `content` holds.
        content_type: ContentType,
        /// The reply text, or file ids for media.
        content: String,
    },
    /// The agent decided not to reply: becomes `resp_code` 10 with this reason code.
    Declined(String),
    /// The reply comes later: the agent's side pushes it (`POST /api/v1/messages` with
    /// `ref_msg_id`), and that push becomes the message's one response. A message whose reply is
    /// not pushed by its deadline is answered with 50.
    Deferred,
}

/// Why an agent could not answer: becomes `resp_code` 50 with this text as the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The agent did not answer within its deadline.
    #[error("agent {agent} did not answer within {}", humanize(*deadline))]
    Timeout {
        /// The agent.
        agent: String,
        /// The deadline.
        deadline: std::time::Duration,
    },
    /// The agent failed; the text is the cause as the agent (or its provider) gave it.
    #[error("agent {agent} failed: {cause}")]
    Failed {
        /// The agent.
        agent: String,
        /// The cause.
        cause: String,
    },
}

/// A deadline in the words of a 50 response: `10 s`, `250 ms`.
fn humanize(deadline: std::time::Duration) -> String {
    if deadline.subsec_millis() == 0 {
        format!("{} s", deadline.as_secs())
    } else {
        format!("{} ms", deadline.as_millis())
    }
}

/// An agent of an app.
pub trait Agent: Send + Sync + 'static {
    /// The agent's id, unique within its app.
    fn id(&self) -> &str;
    /// When it replies.
    fn strategy(&self) -> &ReplyStrategy;
    /// Answers one message. Called only when the strategy said yes.
    fn reply<'a>(&'a self, turn: Turn<'a>) -> Replying<'a>;
    /// How many earlier messages of the conversation the agent wants in [`Turn::history`]. The
    /// gateway reads them from the store only for agents that want some (at most
    /// [`MAX_HISTORY`]), so agents that answer from the message alone cost no read.
    fn history_len(&self) -> usize {
        0
    }
    /// Whether asking the agent again about the same message is harmless: it has no effect
    /// outside its reply (no call to a service that acts on it). The gateway then asks first
    /// and records the message together with its answer in one write, instead of claiming it
    /// in a write of its own before asking. A process that dies in between leaves no trace,
    /// as if it had died before the message arrived, and a resend asks the agent again.
    /// Agents that call out keep the default, `false`: their messages are claimed first, so a
    /// crash leaves a record that the restart answers with 50 instead of asking them twice.
    fn repeatable(&self) -> bool {
        false
    }
}

/// The most earlier messages an agent can be given: bounds the read and the memory of one turn.
pub const MAX_HISTORY: usize = 200;

/// Why an agent could not be built from its stored configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// No such kind.
    #[error("agent {id}: unknown kind \"{kind}\"")]
    UnknownKind {
        /// The agent.
        id: String,
        /// The kind asked for.
        kind: String,
    },
    /// The configuration does not fit the kind.
    #[error("agent {id}: invalid configuration: {reason}")]
    InvalidConfig {
        /// The agent.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads an agent kind's JSON configuration, which must be an object.
///
/// serde would also read a JSON array as a struct (its fields in order), so a configuration is
/// first required to be an object; every kind parses its configuration through here.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: &str) -> Result<T, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(config)
        .map_err(|err| format!("configuration must be a JSON object: {err}"))?;
    T::deserialize(serde_json::Value::Object(object)).map_err(|err| err.to_string())
}

/// Makes an agent of one kind from its id and JSON configuration; `Err` says what is wrong
/// with the configuration.
pub type Builder = dyn Fn(&str, &str) -> Result<Arc<dyn Agent>, String> + Send + Sync;

/// The agent kinds a gateway knows, by name. [`Kinds::builtin`] has the kinds this crate
/// ships; embedders and tests add their own with [`Kinds::with`].
#[derive(Clone)]
pub struct Kinds {
    builders: HashMap<String, Arc<Builder>>,
}

impl fmt::Debug for Kinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.builders.keys().collect();
        names.sort();
        f.debug_struct("Kinds").field("kinds", &names).finish()
    }
}

impl Default for Kinds {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Kinds {
    /// The kinds built into iagent, reading secrets from the process's environment.
    pub fn builtin() -> Self {
        Self::builtin_with(Environment::process())
    }

    /// The kinds built into iagent, reading the secrets their configurations name from `env`.
    pub fn builtin_with(env: Environment) -> Self {
        let kinds = Self {
            builders: HashMap::new(),
        };
        let webhook_env = env.clone();
        let openai_env = env;
        kinds
            .with(echo::KIND, |id, config| {
                Ok(Arc::new(echo::Echo::from_config(id, config)?) as Arc<dyn Agent>)
            })
            .with(rules::KIND, |id, config| {
                Ok(Arc::new(rules::Rules::from_config(id, config)?) as Arc<dyn Agent>)
            })
            .with(webhook::KIND, move |id, config| {
                let agent = webhook::Webhook::from_config(id, config, webhook_env.clone())?;
                Ok(Arc::new(agent) as Arc<dyn Agent>)
            })
            .with(openai::KIND, move |id, config| {
                let agent = openai::OpenAi::from_config(id, config, openai_env.clone())?;
                Ok(Arc::new(agent) as Arc<dyn Agent>)
            })
    }

    /// Adds (or replaces) a kind.
    pub fn with(
        mut self,
        kind: impl Into<String>,
        builder: impl Fn(&str, &str) -> Result<Arc<dyn Agent>, String> + Send + Sync + 'static,
    ) -> Self {
        self.builders.insert(kind.into(), Arc::new(builder));
        self
    }

    /// Builds agent `id` of `kind` from its JSON configuration.
    pub fn build(&self, id: &str, kind: &str, config: &str) -> Result<Arc<dyn Agent>, BuildError> {
        let builder = self
            .builders
            .get(kind)
            .ok_or_else(|| BuildError::UnknownKind {
                id: id.to_owned(),
                kind: kind.to_owned(),
            })?;
        builder(id, config).map_err(|reason| BuildError::InvalidConfig {
            id: id.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_kinds_build_and_unknown_kinds_are_named() {
        let kinds = Kinds::builtin();
        assert_eq!(
            kinds.build("e", "echo", "{}").map(|a| a.id().to_owned()),
            Ok("e".into())
        );
        assert!(matches!(
            kinds.build("e", "echo", "[]"),
            Err(BuildError::InvalidConfig { .. })
        ));
        assert_eq!(
            kinds.build("x", "telepathy", "{}").err(),
            Some(BuildError::UnknownKind {
                id: "x".into(),
                kind: "telepathy".into()
            })
        );
    }

    #[test]
    fn added_kinds_are_built_by_their_builder() {
        let kinds = Kinds::builtin().with("loud", |id, _| {
            Ok(Arc::new(echo::Echo::new(id.to_uppercase())))
        });
        assert_eq!(
            kinds
                .build("shout", "loud", "{}")
                .map(|a| a.id().to_owned()),
            Ok("SHOUT".into())
        );
    }
}
