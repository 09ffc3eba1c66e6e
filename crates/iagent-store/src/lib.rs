//! Durable state of the iagent gateway: apps and their token hashes, agents, the dedup record of
//! every `msg_id`, conversation history and the outbox.
//!
//! # Layout
//!
//! - [`Store`]: the seam the server talks to. SQLite ([`SqliteStore`]) is the embedded default;
//!   a PostgreSQL implementation for many gateway nodes is an added type, not a rewrite.
//! - [`token`]: app tokens: random, 256 bits, stored only as SHA-256 hashes.
//! - [`sqlite`]: the SQLite implementation, one writer thread batching jobs into transactions.
//!
//! Every method resolves only once its writes are committed, so a caller that has seen `Ok`
//! can rely on the data surviving a crash of the process.

pub mod sqlite;
pub mod token;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use iagent_protocol::Message;

pub use sqlite::{
    DEFAULT_CACHE_MIB, DEFAULT_DEDUP_FILTER_MIB, DEFAULT_DEDUP_MERGE_ROWS, DEFAULT_ENTRY_LOG_KIB,
    DEFAULT_HISTORY_MERGE_ROWS, DEFAULT_MMAP_MIB, DEFAULT_PURGE_SLICE_ROWS, DEFAULT_QUEUE_CAPACITY,
    Durability, ENTRY_LOG_FILES, HISTORY_MERGE_SLICE_ROWS, LOCK_FILE, Options, SqliteStore,
    StoredEntry,
};
pub use token::Token;

/// A boxed future: what [`Store`] methods return, so that the trait stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The result of a store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The transaction a write was batched into failed as a whole; nothing of it was kept.
    #[error("database transaction failed: {0}")]
    Batch(String),
    /// The operating system gave no random bytes for a token.
    #[error("no randomness for a token: {0}")]
    Randomness(String),
    /// The store's writer has stopped, so nothing can be read or written any more.
    #[error("the store is closed")]
    Closed,
    /// No app has this name.
    #[error("no app named \"{0}\"")]
    UnknownApp(String),
    /// The app has no agent with this id.
    #[error("app \"{app}\" has no agent \"{agent}\"")]
    UnknownAgent {
        /// The app.
        app: String,
        /// The agent id asked for.
        agent: String,
    },
    /// The agent is the app's default and cannot be removed.
    #[error(
        "agent \"{agent}\" is the default agent of app \"{app}\"; make another agent the default first"
    )]
    DefaultAgent {
        /// The app.
        app: String,
        /// The agent.
        agent: String,
    },
    /// An agent id must be 1 to 128 of `A-Z a-z 0-9 - _ .`.
    #[error("invalid agent id \"{0}\": use 1 to 128 of A-Z, a-z, 0-9, '-', '_' and '.'")]
    InvalidAgentId(String),
    /// An app with this name exists already.
    #[error("an app named \"{0}\" exists already")]
    AppExists(String),
    /// An app name must be 1 to 64 of `a-z`, `0-9`, `-` and `_`.
    #[error("invalid app name \"{0}\": use 1 to 64 of a-z, 0-9, '-' and '_'")]
    InvalidAppName(String),
    /// A file could not be written or read.
    #[error("file storage failed: {0}")]
    Files(#[from] std::io::Error),
    /// Another store, most likely another gateway's, serves from the data directory: each
    /// directory serves one gateway at a time (see [`sqlite::LOCK_FILE`]).
    #[error(
        "another gateway is serving from the data directory {0} (it holds its {lock}); stop it, or give this one a directory of its own",
        lock = sqlite::LOCK_FILE
    )]
    InUse(std::path::PathBuf),
    /// The store was opened shared ([`SqliteStore::open_shared`]), for administration: only
    /// the store that serves from the data directory records messages and reads history.
    #[error(
        "the store was opened for administration only; messages and history go through the gateway that serves from its data directory"
    )]
    Shared,
    /// The data directory could not be created or opened.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An app: a customer of the gateway, owner of agents and tokens. Its name is its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// The app's unique name; also its id in metrics and logs.
    pub name: String,
    /// When it was created, in ms since the Unix epoch.
    pub created_ms: i64,
    /// The agent that answers when a message names none.
    pub default_agent: String,
    /// How many of its tokens are live (not revoked).
    pub live_tokens: u32,
    /// Bumped by every change to the app's agents or default agent, so that a running gateway
    /// notices changes made by another process (the CLI) and rebuilds the app's agents.
    pub agents_version: u64,
}

/// An agent of an app, as stored: its id, kind and kind-specific configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent's id, unique within its app; addressed like a user.
    pub id: String,
    /// The kind (`echo`, ...).
    pub kind: String,
    /// The kind's configuration, as JSON text.
    pub config: String,
}

/// The id of the built-in echo agent every new app gets as its default.
pub const ECHO_AGENT_ID: &str = "echo";

/// What the dedup record says of an incoming `msg_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// First time seen: the caller now owns its processing.
    New,
    /// Seen before and answered: the stored response, as JSON text.
    Answered(String),
    /// Seen before and not yet answered.
    Pending,
}

/// One entry of a conversation's history: a message and, when it got one, the reply to it.
///
/// A message and its reply are one entry, stored as one row: an exchange costs the store one
/// insert instead of two, and the two can never be separated by a purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The conversation's key (see the server's conversation module): shared, not copied,
    /// with the server's own handle on the conversation.
    pub conversation: Arc<str>,
    /// When the gateway stored the entry, by its own clock, in ms since the Unix epoch: the
    /// entry's age for retention. Entries are purged in the order they were appended, so
    /// this is expected to grow with them.
    pub at_ms: i64,
    /// The message.
    pub message: MessageText,
    /// The reply to it, when there was one.
    pub reply: Option<MessageText>,
}

/// A message as the store is given it: its JSON text, or the message itself, which is stored
/// packed from its fields (see [`iagent_protocol::packed`]) without its text being written
/// first. A text reads back as it was given, a message as the text [`Message::to_json`] gives.
///
/// Shared, not copied, with whoever holds the message after it is stored: the gateway keeps a
/// message it processes in flight until its response is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageText {
    /// JSON text, stored as it is or packed ([`iagent_protocol::packed::pack`]).
    Json(String),
    /// A message, stored packed.
    Message(Arc<Message>),
}

impl From<String> for MessageText {
    fn from(text: String) -> Self {
        Self::Json(text)
    }
}

impl From<&str> for MessageText {
    fn from(text: &str) -> Self {
        Self::Json(text.to_owned())
    }
}

impl From<Arc<Message>> for MessageText {
    fn from(message: Arc<Message>) -> Self {
        Self::Message(message)
    }
}

impl From<Message> for MessageText {
    fn from(message: Message) -> Self {
        Self::Message(Arc::new(message))
    }
}

/// The terminal response of a message, with the history it adds; stored in one transaction.
///
/// Made by [`Completion::replied`] when the response is the reply that the message's history
/// entry holds (a 0), so that the text is carried and stored once and the store need not
/// compare two copies to learn it; by [`Completion::new`] otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    app: Arc<str>,
    /// Shared with the store's record of the key, when the record is the entry.
    msg_id: Arc<str>,
    body: Body,
}

/// A [`Completion`]'s response and history.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    /// A response apart from the entries it adds.
    Apart {
        response: MessageText,
        history: Vec<HistoryEntry>,
    },
    /// A reply, which its one entry holds as the entry's reply: held here, not in a list of
    /// one, which cost every echo an allocation.
    Replied(HistoryEntry),
}

impl Completion {
    /// A message's `response`, stored as its record (what a resent `msg_id` gets again), and
    /// the entries it adds to conversations' histories, none or many: for a response that is
    /// not a reply, such as a 10 or a 50.
    pub fn new(
        app: impl Into<Arc<str>>,
        msg_id: impl Into<Arc<str>>,
        response: impl Into<MessageText>,
        history: Vec<HistoryEntry>,
    ) -> Self {
        Self {
            app: app.into(),
            msg_id: msg_id.into(),
            body: Body::Apart {
                response: response.into(),
                history,
            },
        }
    }

    /// A message answered with `reply`, which is its response too: `entry` holds the message,
    /// and takes `reply` as its reply (whatever it held), where the response is stored, once;
    /// the entry is then the message's record.
    pub fn replied(
        app: impl Into<Arc<str>>,
        msg_id: impl Into<Arc<str>>,
        entry: HistoryEntry,
        reply: impl Into<MessageText>,
    ) -> Self {
        Self {
            app: app.into(),
            msg_id: msg_id.into(),
            body: Body::Replied(HistoryEntry {
                reply: Some(reply.into()),
                ..entry
            }),
        }
    }

    /// The app.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The answered message's `msg_id`.
    pub fn msg_id(&self) -> &str {
        &self.msg_id
    }

    /// The same, shared.
    pub(crate) fn shared_msg_id(&self) -> &Arc<str> {
        &self.msg_id
    }

    /// The response.
    pub fn response(&self) -> &MessageText {
        match &self.body {
            Body::Apart { response, .. } => response,
            Body::Replied(entry) => entry
                .reply
                .as_ref()
                .expect("`replied` gives its entry the reply"),
        }
    }

    /// The entries to append to the conversations' histories.
    pub fn history(&self) -> &[HistoryEntry] {
        match &self.body {
            Body::Apart { history, .. } => history,
            Body::Replied(entry) => std::slice::from_ref(entry),
        }
    }

    /// The history entry whose reply is the response, if the response is one.
    pub fn reply_entry(&self) -> Option<&HistoryEntry> {
        match &self.body {
            Body::Replied(entry) => Some(entry),
            Body::Apart { .. } => None,
        }
    }
}

/// A message that was claimed but never answered: the process stopped while it was in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unanswered {
    /// The app.
    pub app: String,
    /// The inbound message, as JSON text.
    pub inbound: String,
}

/// A message whose agent will push its reply later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredMessage {
    /// The app.
    pub app: String,
    /// The inbound message, as JSON text.
    pub inbound: String,
    /// The agent that deferred its reply; only it may push it.
    pub agent: String,
    /// When it is answered with 50 if no reply was pushed, in ms since the Unix epoch.
    pub until_ms: i64,
}

/// A response waiting in an app's outbox for a connection to carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The entry's id; entries are delivered in id order. Ids are never reused, so an id names
    /// one entry for good (the server tracks entries in transit by id).
    pub id: i64,
    /// The message, as JSON text.
    pub message: String,
}

/// A stored file, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// The file's id: `f` and 32 hex digits, random, so ids cannot be guessed or made up.
    pub id: String,
    /// Its MIME type, as given on upload.
    pub content_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was stored, in ms since the Unix epoch.
    pub created_ms: i64,
}

/// A file's metadata and bytes.
pub type StoredFile = (FileMeta, Vec<u8>);

/// Whether `id` has the shape of a file id. Anything else cannot name a file, and is never
/// turned into a path.
pub fn is_file_id(id: &str) -> bool {
    id.len() == 33
        && id.starts_with('f')
        && id[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What a purge of expired records removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged {
    /// Dedup records past the dedup window.
    pub dedup: u64,
    /// Files past their retention.
    pub files: u64,
    /// History entries past their retention.
    pub history: u64,
    /// Outbox entries that expired undelivered, per app: never dropped silently.
    pub outbox_expired: Vec<(String, u64)>,
}

/// The cut-off times of a purge, in ms since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeBefore {
    /// Dedup records received before this are forgotten.
    pub dedup: i64,
    /// History entries before this are removed.
    pub history: i64,
    /// Outbox entries whose expiry is before this are removed (and reported).
    pub outbox: i64,
    /// Files stored before this are removed.
    pub files: i64,
}

/// The gateway's durable state.
pub trait Store: Send + Sync + 'static {
    /// Creates an app with the echo agent as its default, and its first token.
    fn create_app(&self, name: &str, now_ms: i64) -> BoxFuture<'_, Result<(App, Token)>>;
    /// All apps, by name.
    fn list_apps(&self) -> BoxFuture<'_, Result<Vec<App>>>;
    /// Revokes every token of the app and issues a new one.
    fn rotate_token(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<Token>>;
    /// Revokes every token of the app; returns how many were live.
    fn revoke_tokens(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<u64>>;
    /// The app a live token belongs to.
    fn app_for_token(&self, token: &str) -> BoxFuture<'_, Result<Option<App>>>;
    /// The agents of an app.
    fn agents(&self, app: &str) -> BoxFuture<'_, Result<Vec<AgentRecord>>>;
    /// Adds an agent to an app, or replaces the one with the same id.
    fn put_agent(&self, app: &str, agent: AgentRecord) -> BoxFuture<'_, Result<()>>;
    /// Makes one of the app's agents its default.
    fn set_default_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>>;
    /// Removes an agent of the app. The default agent cannot be removed: make another one the
    /// default first.
    fn remove_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>>;

    /// Records `msg_id` as received (with the inbound message, for recovery), unless it was
    /// received before: then says what became of it.
    fn claim(
        &self,
        app: &str,
        msg_id: &str,
        inbound: MessageText,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<Claim>>;
    /// Stores a message's terminal response and its history.
    fn complete(&self, completion: Completion) -> BoxFuture<'_, Result<()>>;
    /// Claims and completes a message in one write, for a message answered before it was
    /// claimed (its agent can be asked again harmlessly, so no claim had to come first).
    /// Returns [`Claim::New`] when written; when `msg_id` was received before, writes nothing
    /// and says what became of it, like [`Store::claim`].
    fn record(&self, completion: Completion, received_ms: i64) -> BoxFuture<'_, Result<Claim>>;
    /// The last `limit` messages of a conversation's history, as JSON text, oldest first.
    fn history(
        &self,
        app: &str,
        conversation: &str,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>>>;
    /// Appends messages to conversations' history (messages an agent sent on its own).
    fn append_history(&self, app: &str, entries: Vec<HistoryEntry>) -> BoxFuture<'_, Result<()>>;
    /// Messages claimed and never answered, and not deferred (left by a process that died).
    fn unanswered(&self) -> BoxFuture<'_, Result<Vec<Unanswered>>>;
    /// Marks a claimed message as waiting until `until_ms` for `agent` to push its reply.
    fn defer(
        &self,
        app: &str,
        msg_id: &str,
        agent: &str,
        until_ms: i64,
    ) -> BoxFuture<'_, Result<()>>;
    /// Messages waiting for a pushed reply, with their deadlines.
    fn deferred(&self) -> BoxFuture<'_, Result<Vec<DeferredMessage>>>;

    /// Appends a message to the app's outbox; returns its entry id.
    fn outbox_push(
        &self,
        app: &str,
        message: String,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'_, Result<i64>>;
    /// Up to `limit` entries of the app's outbox with ids above `after`, oldest first.
    fn outbox_peek(
        &self,
        app: &str,
        after: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<OutboxEntry>>>;
    /// Removes delivered entries.
    fn outbox_remove(&self, app: &str, ids: Vec<i64>) -> BoxFuture<'_, Result<()>>;
    /// How many entries each app's outbox holds.
    fn outbox_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>>;

    /// Stores a file of the app; returns its metadata with its new id.
    fn put_file(
        &self,
        app: &str,
        content_type: &str,
        bytes: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<FileMeta>>;
    /// A file of the app, with its bytes; `None` if the app has no such file.
    fn get_file(&self, app: &str, id: &str) -> BoxFuture<'_, Result<Option<StoredFile>>>;
    /// The first of `ids` that names no file of the app, if any. Stops there, so a message
    /// listing thousands of made-up ids costs one lookup.
    fn first_missing_file(
        &self,
        app: &str,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Option<String>>>;

    /// Removes what has outlived its retention.
    fn purge(&self, before: PurgeBefore) -> BoxFuture<'_, Result<Purged>>;
}

/// Checks an agent id: 1 to 128 of `A-Z a-z 0-9 - _ .`. Agents are addressed like users, by
/// `receiver_id` (at most 128 bytes) and by `@id` mentions, which end at any other character.
pub fn check_agent_id(id: &str) -> Result<()> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidAgentId(id.to_owned()))
    }
}

/// Checks an app name: 1 to 64 of `a-z`, `0-9`, `-`, `_`. Names appear in metrics labels and
/// logs, so they are kept to characters that need no escaping anywhere.
pub fn check_app_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidAppName(name.to_owned()))
    }
}
