//! The backend-side SDK of the iagent gateway: a pool of WebSocket connections behind one
//! cloneable handle. [`Client::send`] sends a [`Message`] and resolves with its response,
//! whichever connection carries it; messages nobody asked for arrive on [`Pushed`].
//!
//! # Layout
//!
//! - [`Client`] (`client.rs`): the handle. `send` registers the request in a map shared by the
//!   whole pool (keyed by `msg_id`), hands its id to the driver over a bounded channel, and
//!   waits for the response. At most [`Config::max_in_flight`] requests wait at once; past it
//!   `send` hands the message back ([`SendError::Full`]).
//! - The driver (`client.rs`, `drive`): writes each request to an open connection,
//!   round-robin; when a connection closes, resends every request written to it and still
//!   unanswered on another open connection (or on the next one to open), with the same
//!   `msg_id`: the gateway deduplicates, so the caller sees one response.
//! - Connections (`connection.rs`): one task per pool slot. Connect with a timeout, ping every
//!   [`Config::ping_interval`] and drop the connection after 3 silent intervals, reconnect
//!   with [`backoff`] (exponential, full jitter). Each task matches received frames to waiting
//!   requests by `ref_msg_id`, across the pool, since the gateway may route a response to any
//!   connection; a second response for an answered `msg_id` is dropped; anything else goes to
//!   [`Pushed`].
//! - [`backoff`] (`backoff.rs`): the reconnect delay as a pure function, and its PRNG.
//!
//! # Example
//!
//! ```no_run
//! use iagent_client::{Client, Config, Message};
//! use iagent_protocol::{ChatType, ContentType, RespCode, SenderType};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (client, mut pushed) = Client::connect(Config::new("ws://127.0.0.1:8080", "TOKEN")).await?;
//! tokio::spawn(async move {
//!     while let Some(message) = pushed.recv().await {
//!         println!("pushed: {}", message.content);
//!     }
//! });
//! let response = client
//!     .send(Message {
//!         chat_type: ChatType::Private,
//!         msg_id: "m-1".into(),
//!         ref_msg_id: None,
//!         timestamp: 1_700_000_000_000,
//!         group_id: None,
//!         sender_type: SenderType::User,
//!         sender_id: "alice".into(),
//!         receiver_id: None,
//!         resp_code: RespCode::Ok,
//!         content_type: ContentType::Text,
//!         content: "hello".into(),
//!     })
//!     .await?;
//! println!("{}: {}", response.sender_id, response.content);
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The reconnect delay can be checked without a gateway:
//!
//! ```
//! use std::time::Duration;
//! let delay = iagent_client::backoff(2, Duration::from_millis(100), Duration::from_secs(10), 0.5);
//! assert_eq!(delay, Duration::from_millis(250));
//! ```

mod backoff;
mod client;
mod connection;

pub use backoff::backoff;
pub use client::{Client, Config, ConnectError, PUSHED_CAPACITY, Pushed, SendError};
pub use iagent_protocol::Message;
