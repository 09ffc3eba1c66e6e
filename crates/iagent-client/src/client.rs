//! The handle ([`Client`]), the state it shares with the connections, and the driver that
//! assigns requests to connections.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use iagent_protocol::Message;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::connection::{self, FirstAttempt, stopped};

/// How many pushed messages wait in [`Pushed`] before the connections stop reading: enough to
/// absorb a burst of outbox deliveries, small enough that an application that never reads
/// [`Pushed`] is noticed (its responses stall) rather than growing memory without bound.
pub const PUSHED_CAPACITY: usize = 1024;

/// How many answered `msg_id`s are remembered so that a second response to one (the gateway
/// delivers at least once) is dropped instead of surfacing on [`Pushed`]. Duplicates arrive
/// within seconds of the first copy; this covers far more than one pool's traffic of that span.
const RESOLVED_MEMORY: usize = 65_536;

/// How a [`Client`] connects and behaves. Build it with [`Config::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway's base URL, `ws://host:port` (or `wss://`); `/ws/v1/chat` is appended.
    pub url: String,
    /// The app token, sent as `Authorization: Bearer ...`.
    pub token: String,
    /// How many pooled connections to keep open.
    pub connections: usize,
    /// How long [`Client::send`] waits for the response, resends included.
    pub request_timeout: Duration,
    /// The limit on TCP connect plus WebSocket handshake of one connection attempt.
    pub connect_timeout: Duration,
    /// How often each connection pings; one that hears nothing for 3 intervals is dropped.
    pub ping_interval: Duration,
    /// The smallest reconnect delay.
    pub backoff_min: Duration,
    /// The largest reconnect delay (also the delay after a refused token).
    pub backoff_max: Duration,
    /// How many requests may wait for their response at once; past it [`SendError::Full`].
    pub max_in_flight: usize,
    /// Open direct connections (`pool=false`): they get only the responses to their own
    /// messages, never responses rerouted from the app's other connections or its outbox. For
    /// tools that sit beside the app's real backend (`iagent send`, `iagent chat`), so that
    /// they never take its traffic. Off by default: a backend's pool wants that traffic.
    pub direct: bool,
}

impl Config {
    /// The defaults: 4 connections, 30 s request timeout, 10 s connect timeout, 20 s pings (the
    /// gateway's own interval), backoff from 100 ms to 10 s, 10 000 requests in flight (the
    /// gateway's default per-app limit, past which it answers 50 anyway).
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: token.into(),
            connections: 4,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            max_in_flight: 10_000,
            direct: false,
        }
    }

    /// The chat endpoint's URL.
    pub(crate) fn endpoint(&self) -> String {
        let base = self.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/ws/v1/chat") {
            base.to_owned()
        } else {
            format!("{base}/ws/v1/chat")
        };
        if self.direct {
            format!("{endpoint}?pool=false")
        } else {
            endpoint
        }
    }
}

/// Why [`Client::connect`] failed. No connection task is left running.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The gateway refused the token (HTTP 401): retrying cannot help until it changes.
    #[error("the gateway refused the token (401)")]
    Unauthorized,
    /// No connection of the pool could be opened; the reason is the last attempt's.
    #[error("no connection to the gateway could be opened: {0}")]
    Unreachable(String),
    /// The configuration cannot work (no connections, no in-flight places).
    #[error("invalid configuration: {0}")]
    InvalidConfig(&'static str),
}

/// Why [`Client::send`] did not produce a response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No response within [`Config::request_timeout`]. The message may still be processed; a
    /// late response arrives on [`Pushed`].
    #[error("no response within the request timeout")]
    Timeout,
    /// The client was shut down (before or while waiting).
    #[error("the client is shut down")]
    Closed,
    /// [`Config::max_in_flight`] requests are waiting already; the message is handed back.
    #[error("too many requests in flight")]
    Full(Message),
    /// A request with this `msg_id` is already waiting for its response; the message is
    /// handed back.
    #[error("a request with this msg_id is already in flight")]
    Duplicate(Message),
}

/// The messages the gateway sends that answer no waiting request: messages agents start
/// (`POST /api/v1/messages`), and responses whose request is no longer waiting (it timed out,
/// or an earlier process sent it and the response waited in the outbox).
///
/// A bounded queue ([`PUSHED_CAPACITY`]): read it, or the connections stop reading when it is
/// full. Dropping it discards pushed messages. It ends after the client shut down.
#[derive(Debug)]
pub struct Pushed {
    rx: mpsc::Receiver<Message>,
}

impl Pushed {
    /// The next pushed message; `None` once the client shut down.
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for Pushed {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.rx.poll_recv(cx)
    }
}

/// One request waiting for its response.
struct Entry {
    /// Tells this entry apart from a later request reusing the `msg_id`.
    seq: u64,
    /// The frame, kept to resend it with the same `msg_id`.
    text: Utf8Bytes,
    /// Where the response goes.
    reply: oneshot::Sender<Message>,
    /// The connection it was last written to; `None` while waiting for one to open.
    conn: Option<usize>,
}

/// The requests waiting for responses, shared by the handles, the driver and the connections.
#[derive(Default)]
pub(crate) struct Pending {
    map: HashMap<String, Entry>,
    /// `msg_id`s answered lately, oldest first, so duplicates are dropped.
    resolved: HashSet<String>,
    resolved_order: VecDeque<String>,
    next_seq: u64,
    /// Set at shutdown: no new requests.
    closed: bool,
}

impl Pending {
    fn remember(&mut self, msg_id: String) {
        if self.resolved.insert(msg_id.clone()) {
            self.resolved_order.push_back(msg_id);
            if self.resolved_order.len() > RESOLVED_MEMORY
                && let Some(old) = self.resolved_order.pop_front()
            {
                self.resolved.remove(&old);
            }
        }
    }
}

/// State shared by the handles, the driver and the connection tasks.
pub(crate) struct Shared {
    pending: Mutex<Pending>,
    /// Taken at shutdown, so that [`Pushed`] ends once the connection tasks (which hold clones
    /// while delivering) are gone.
    pushed: Mutex<Option<mpsc::Sender<Message>>>,
    /// `true` once shutdown began.
    pub(crate) shutdown: watch::Sender<bool>,
    /// One per connection slot: the test hook [`Client::drop_connection`].
    pub(crate) kills: Vec<Notify>,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves the maps consistent (every update is a single
        // insert or remove), so a poisoned lock is still usable.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands a frame received on connection `conn` to its waiting request, or to [`Pushed`].
    pub(crate) async fn deliver(&self, conn: usize, text: &str) {
        let message: Message = match serde_json::from_str(text) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(conn, error = %err, "dropped a frame that is not a message");
                return;
            }
        };
        let Some(message) = self.resolve(conn, message) else {
            return;
        };
        let pushed = self
            .pushed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(pushed) = pushed else {
            tracing::debug!(conn, "dropped a pushed message: the client is shut down");
            return;
        };
        if pushed.send(message).await.is_err() {
            tracing::debug!(conn, "dropped a pushed message: nobody reads Pushed");
        }
    }

    /// Completes the request `message` answers; returns the message if it answers none.
    fn resolve(&self, conn: usize, message: Message) -> Option<Message> {
        let Some(id) = &message.ref_msg_id else {
            return Some(message);
        };
        let mut pending = self.pending();
        if let Some(entry) = pending.map.remove(id) {
            pending.remember(id.clone());
            // An error means the caller gave up in the instant before: a late response.
            entry.reply.send(message).err()
        } else if pending.resolved.contains(id) {
            tracing::debug!(conn, ref_msg_id = %id, "dropped a second response");
            None
        } else {
            Some(message)
        }
    }

    /// Marks the requests written to connection `conn` as unsent (it closed).
    fn unassign(&self, conn: usize) {
        for entry in self.pending().map.values_mut() {
            if entry.conn == Some(conn) {
                entry.conn = None;
            }
        }
    }

    /// Writes every unsent request (or only `only`) to the open connections, round-robin.
    fn assign(
        &self,
        open: &mut [Option<mpsc::UnboundedSender<Utf8Bytes>>],
        next: &mut usize,
        only: Option<&str>,
    ) {
        let mut pending = self.pending();
        let mut place = |entry: &mut Entry| {
            if entry.conn.is_some() {
                return;
            }
            let n = open.len();
            for k in 0..n {
                let i = (*next + k) % n;
                if let Some(tx) = &open[i] {
                    if tx.send(entry.text.clone()).is_ok() {
                        entry.conn = Some(i);
                        *next = i + 1;
                        return;
                    }
                    // The connection task ended; its `Closed` event follows.
                    open[i] = None;
                }
            }
        };
        match only {
            Some(id) => {
                if let Some(entry) = pending.map.get_mut(id) {
                    place(entry);
                }
            }
            None => pending.map.values_mut().for_each(place),
        }
    }

    /// Fails every waiting request with [`SendError::Closed`] and refuses new ones.
    fn close(&self) {
        let mut pending = self.pending();
        pending.closed = true;
        // Dropping the reply senders wakes the callers with `Closed`.
        pending.map.clear();
        drop(pending);
        self.pushed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }
}

/// What a connection task tells the driver.
pub(crate) enum Event {
    /// Connection `usize` is open; frames for it go into the sender.
    Opened(usize, mpsc::UnboundedSender<Utf8Bytes>),
    /// Connection `usize` closed; what was written to it and not answered must be resent.
    Closed(usize),
}

/// The handle: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// `msg_id`s of new requests, to the driver. As large as `max_in_flight`, which the
    /// permits below bound, so sending never waits.
    requests: mpsc::Sender<String>,
    permits: Arc<Semaphore>,
    request_timeout: Duration,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Removes a request from [`Pending`] when its `send` ends in any way (response, timeout, or
/// the caller dropping the future).
struct Waiting<'a> {
    shared: &'a Shared,
    msg_id: String,
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pending = self.shared.pending();
        if pending
            .map
            .get(&self.msg_id)
            .is_some_and(|e| e.seq == self.seq)
        {
            pending.map.remove(&self.msg_id);
        }
    }
}

impl Client {
    /// Opens the pool (all connections at once) and starts its driver.
    ///
    /// Succeeds when at least one connection opened; the others keep retrying in the
    /// background. Fails with [`ConnectError::Unauthorized`] when the token is refused.
    pub async fn connect(config: Config) -> Result<(Client, Pushed), ConnectError> {
        if config.connections == 0 {
            return Err(ConnectError::InvalidConfig(
                "connections must be at least 1",
            ));
        }
        if config.max_in_flight == 0 {
            return Err(ConnectError::InvalidConfig(
                "max_in_flight must be at least 1",
            ));
        }
        if config.ping_interval.is_zero() {
            return Err(ConnectError::InvalidConfig(
                "ping_interval must not be zero",
            ));
        }
        let n = config.connections;
        let (pushed_tx, pushed_rx) = mpsc::channel(PUSHED_CAPACITY);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            pushed: Mutex::new(Some(pushed_tx)),
            shutdown,
            kills: (0..n).map(|_| Notify::new()).collect(),
        });
        let (requests_tx, requests_rx) = mpsc::channel(config.max_in_flight);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let config = Arc::new(config);

        let mut tasks = Vec::with_capacity(n + 1);
        let mut firsts = Vec::with_capacity(n);
        for index in 0..n {
            let (first_tx, first_rx) = oneshot::channel();
            firsts.push(first_rx);
            tasks.push(tokio::spawn(connection::run(
                index,
                config.clone(),
                shared.clone(),
                events_tx.clone(),
                first_tx,
            )));
        }
        drop(events_tx);
        tasks.push(tokio::spawn(drive(
            shared.clone(),
            n,
            requests_rx,
            events_rx,
        )));

        let client = Client {
            inner: Arc::new(Inner {
                shared,
                requests: requests_tx,
                permits: Arc::new(Semaphore::new(config.max_in_flight)),
                request_timeout: config.request_timeout,
                tasks: Mutex::new(tasks),
            }),
        };

        let mut opened = false;
        let mut unauthorized = false;
        let mut last_error = String::from("no attempt finished");
        for first in firsts {
            match first.await {
                Ok(FirstAttempt::Opened) => opened = true,
                Ok(FirstAttempt::Unauthorized) => unauthorized = true,
                Ok(FirstAttempt::Failed(reason)) => last_error = reason,
                Err(_) => last_error = "the connection task ended".into(),
            }
        }
        if opened {
            return Ok((client, Pushed { rx: pushed_rx }));
        }
        client.shutdown().await;
        Err(if unauthorized {
            ConnectError::Unauthorized
        } else {
            ConnectError::Unreachable(last_error)
        })
    }

    /// Sends `message` and waits for its response (the message whose `ref_msg_id` is its
    /// `msg_id`), resending it with the same `msg_id` when its connection drops.
    pub async fn send(&self, message: Message) -> Result<Message, SendError> {
        let inner = &*self.inner;
        let Ok(_permit) = inner.permits.clone().try_acquire_owned() else {
            if inner.shared.pending().closed {
                return Err(SendError::Closed);
            }
            return Err(SendError::Full(message));
        };
        let (reply, response) = oneshot::channel();
        let waiting = {
            let mut pending = inner.shared.pending();
            if pending.closed {
                return Err(SendError::Closed);
            }
            if pending.map.contains_key(&message.msg_id) {
                return Err(SendError::Duplicate(message));
            }
            pending.next_seq += 1;
            let seq = pending.next_seq;
            // A second request may reuse an answered id: its response is not a duplicate.
            pending.resolved.remove(&message.msg_id);
            pending.map.insert(
                message.msg_id.clone(),
                Entry {
                    seq,
                    text: Utf8Bytes::from(message.to_json()),
                    reply,
                    conn: None,
                },
            );
            Waiting {
                shared: &inner.shared,
                msg_id: message.msg_id,
                seq,
            }
        };
        if inner.requests.send(waiting.msg_id.clone()).await.is_err() {
            return Err(SendError::Closed);
        }
        match tokio::time::timeout(inner.request_timeout, response).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => Err(SendError::Timeout),
        }
    }

    /// How many requests are waiting for their response: registered, so that a send of the
    /// same `msg_id` from now on is handed back as [`SendError::Duplicate`]. (Counted from the
    /// registry, not from the in-flight places, which a send takes before it registers.)
    pub fn in_flight(&self) -> usize {
        self.inner.shared.pending().map.len()
    }

    /// Closes every connection with a normal close (1000) and waits for the tasks to end.
    /// Waiting and later sends fail with [`SendError::Closed`]; [`Pushed`] ends.
    pub async fn shutdown(&self) {
        self.inner.shared.shutdown.send_replace(true);
        self.inner.shared.close();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for task in tasks {
            if let Err(err) = task.await {
                tracing::error!(error = %err, "a client task panicked");
            }
        }
        // Requests that raced with the shutdown.
        self.inner.shared.close();
    }

    /// Test hook: drops connection `index` abruptly (no close frame), as a network failure
    /// would; it reconnects like after any drop. If that connection is not open at the moment,
    /// the next one opened in its place is dropped. Out-of-range indexes are ignored.
    #[doc(hidden)]
    pub fn drop_connection(&self, index: usize) {
        if let Some(kill) = self.inner.shared.kills.get(index) {
            kill.notify_one();
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// The driver: writes new requests to an open connection, round-robin, and resends the
/// requests of a connection that closed. Ends at shutdown or when every handle is dropped.
async fn drive(
    shared: Arc<Shared>,
    connections: usize,
    mut requests: mpsc::Receiver<String>,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let mut open: Vec<Option<mpsc::UnboundedSender<Utf8Bytes>>> = vec![None; connections];
    let mut next = 0;
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(msg_id) => shared.assign(&mut open, &mut next, Some(&msg_id)),
                None => {
                    // Every handle is gone: nobody can send or wait any more.
                    shared.shutdown.send_replace(true);
                    shared.close();
                    break;
                }
            },
            event = events.recv() => match event {
                Some(Event::Opened(index, tx)) => {
                    open[index] = Some(tx);
                    shared.assign(&mut open, &mut next, None);
                }
                Some(Event::Closed(index)) => {
                    open[index] = None;
                    shared.unassign(index);
                    shared.assign(&mut open, &mut next, None);
                }
                None => break,
            },
            () = stopped(&mut shutdown) => break,
        }
    }
}
