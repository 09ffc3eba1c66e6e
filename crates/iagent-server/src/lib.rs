//! The iagent gateway as a library: an app's backend connects a pool of WebSockets to
//! `/ws/v1/chat`, and every message it sends gets exactly one response, from the right agent,
//! on the right connection.
//!
//! # Layout
//!
//! - [`run`] (in `gateway`): start, serve, shut down; the shared state and its lifecycle.
//! - `listener`: the accept loop; TLS, header timeouts and size limits.
//! - `tls`: loading the optional certificate.
//! - `http`: the routes; origin check and connection limit before any upgrade.
//! - `auth`: the token check every route shares, with its throttle.
//! - `files`: upload and download of an app's media files.
//! - `push`: messages an agent starts (`POST /api/v1/messages`).
//! - `throttle`: per-address slow-down of failed token checks.
//! - `session`: one connection: reader (validation, back-pressure, liveness) and writer.
//! - `apps`: per-app state: the pool, agents, messages in flight, conversation queues.
//! - `conversation`: per-conversation ordering, and processing one message.
//! - `delivery`: routing a response: origin connection, another connection, the outbox.
//! - `rate`: the per-app message rate limit.
//! - `metrics`, `ids`: `/metrics`, and the ids and clock of gateway-written messages.
//! - [`config`]: every limit and timeout, with its default.
//!
//! Tests and embedders start the gateway in-process on a listener bound to port 0:
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let store = Arc::new(iagent_store::SqliteStore::open("./data".as_ref(), Default::default())?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! iagent_server::run(listener, iagent_server::Config::default(), store, async {
//!     tokio::signal::ctrl_c().await.ok();
//! })
//! .await?;
//! # Ok(()) }
//! ```

mod apps;
mod auth;
pub mod config;
mod conversation;
mod delivery;
mod files;
mod gateway;
mod http;
mod ids;
mod listener;
mod metrics;
mod push;
mod rate;
mod session;
mod throttle;
mod tls;

pub use config::Config;
pub use gateway::{Server, run};
pub use iagent_agent::Kinds;

/// Why the gateway could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    /// The store failed while starting.
    #[error(transparent)]
    Store(#[from] iagent_store::StoreError),
    /// The listener failed.
    #[error("listener failed: {0}")]
    Io(std::io::Error),
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The operating system gave no randomness for message ids.
    #[error("no randomness for message ids: {0}")]
    Randomness(String),
}
