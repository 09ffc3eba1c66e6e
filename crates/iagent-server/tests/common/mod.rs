//! The harness every integration test uses: a gateway started in-process on `127.0.0.1:0` over a
//! fresh SQLite directory, real WebSocket clients, and a store wrapper that can hold a message's
//! processing at a gate and counts how often each message was completed (one completion per
//! agent call), so tests can make "the response is not ready yet" happen deterministically.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use iagent_server::{Config, Kinds, Server, ServerError};
use iagent_store::{
    AgentRecord, App, BoxFuture, Claim, Completion, DeferredMessage, FileMeta, HistoryEntry,
    MessageText, OutboxEntry, PurgeBefore, Purged, Result, SqliteStore, Store, StoredFile, Token,
    Unanswered,
};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for any one frame before failing.
pub const FRAME_WAIT: Duration = Duration::from_secs(10);

/// A store that delegates to SQLite, can hold chosen messages before they are claimed (or, for
/// a repeatable agent, recorded with their answer), and counts completions per `msg_id`.
pub struct GatedStore {
    inner: SqliteStore,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    completions: Mutex<HashMap<String, usize>>,
}

impl GatedStore {
    pub fn open(dir: &std::path::Path) -> Self {
        Self {
            inner: SqliteStore::open(dir, Default::default()).expect("store opens"),
            gates: Mutex::default(),
            completions: Mutex::default(),
        }
    }

    /// Holds the processing of `msg_id` until [`GatedStore::release`].
    pub fn hold(&self, msg_id: &str) {
        self.gates
            .lock()
            .unwrap()
            .insert(msg_id.into(), Arc::new(Semaphore::new(0)));
    }

    /// Lets a held message go on.
    pub fn release(&self, msg_id: &str) {
        if let Some(gate) = self.gates.lock().unwrap().get(msg_id) {
            gate.add_permits(1_000);
        }
    }

    /// How many times `msg_id` was completed, i.e. processed by an agent.
    pub fn completions(&self, msg_id: &str) -> usize {
        self.completions
            .lock()
            .unwrap()
            .get(msg_id)
            .copied()
            .unwrap_or(0)
    }
}

impl Store for GatedStore {
    fn create_app(&self, name: &str, now_ms: i64) -> BoxFuture<'_, Result<(App, Token)>> {
        self.inner.create_app(name, now_ms)
    }
    fn list_apps(&self) -> BoxFuture<'_, Result<Vec<App>>> {
        self.inner.list_apps()
    }
    fn rotate_token(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<Token>> {
        self.inner.rotate_token(app, now_ms)
    }
    fn revoke_tokens(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<u64>> {
        self.inner.revoke_tokens(app, now_ms)
    }
    fn app_for_token(&self, token: &str) -> BoxFuture<'_, Result<Option<App>>> {
        self.inner.app_for_token(token)
    }
    fn agents(&self, app: &str) -> BoxFuture<'_, Result<Vec<AgentRecord>>> {
        self.inner.agents(app)
    }
    fn put_agent(&self, app: &str, agent: AgentRecord) -> BoxFuture<'_, Result<()>> {
        self.inner.put_agent(app, agent)
    }
    fn set_default_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.set_default_agent(app, agent_id)
    }
    fn remove_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>> {
        self.inner.remove_agent(app, agent_id)
    }
    fn claim(
        &self,
        app: &str,
        msg_id: &str,
        inbound: MessageText,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<Claim>> {
        let gate = self.gates.lock().unwrap().get(msg_id).cloned();
        let (app, msg_id) = (app.to_owned(), msg_id.to_owned());
        Box::pin(async move {
            if let Some(gate) = gate {
                let _pass = gate.acquire().await.expect("gate open");
            }
            self.inner.claim(&app, &msg_id, inbound, now_ms).await
        })
    }
    fn record(&self, completion: Completion, received_ms: i64) -> BoxFuture<'_, Result<Claim>> {
        let gate = self.gates.lock().unwrap().get(completion.msg_id()).cloned();
        Box::pin(async move {
            if let Some(gate) = gate {
                let _pass = gate.acquire().await.expect("gate open");
            }
            let msg_id = completion.msg_id().to_owned();
            let claim = self.inner.record(completion, received_ms).await?;
            if claim == Claim::New {
                *self.completions.lock().unwrap().entry(msg_id).or_default() += 1;
            }
            Ok(claim)
        })
    }
    fn complete(&self, completion: Completion) -> BoxFuture<'_, Result<()>> {
        *self
            .completions
            .lock()
            .unwrap()
            .entry(completion.msg_id().to_owned())
            .or_default() += 1;
        self.inner.complete(completion)
    }
    fn history(
        &self,
        app: &str,
        conversation: &str,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>>> {
        self.inner.history(app, conversation, limit)
    }
    fn append_history(&self, app: &str, entries: Vec<HistoryEntry>) -> BoxFuture<'_, Result<()>> {
        self.inner.append_history(app, entries)
    }
    fn unanswered(&self) -> BoxFuture<'_, Result<Vec<Unanswered>>> {
        self.inner.unanswered()
    }
    fn defer(
        &self,
        app: &str,
        msg_id: &str,
        agent: &str,
        until_ms: i64,
    ) -> BoxFuture<'_, Result<()>> {
        self.inner.defer(app, msg_id, agent, until_ms)
    }
    fn deferred(&self) -> BoxFuture<'_, Result<Vec<DeferredMessage>>> {
        self.inner.deferred()
    }
    fn outbox_push(
        &self,
        app: &str,
        message: String,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'_, Result<i64>> {
        self.inner.outbox_push(app, message, now_ms, expires_ms)
    }
    fn outbox_peek(
        &self,
        app: &str,
        after: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<OutboxEntry>>> {
        self.inner.outbox_peek(app, after, limit)
    }
    fn outbox_remove(&self, app: &str, ids: Vec<i64>) -> BoxFuture<'_, Result<()>> {
        self.inner.outbox_remove(app, ids)
    }
    fn outbox_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>> {
        self.inner.outbox_depths()
    }
    fn put_file(
        &self,
        app: &str,
        content_type: &str,
        bytes: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<FileMeta>> {
        self.inner.put_file(app, content_type, bytes, now_ms)
    }
    fn get_file(&self, app: &str, id: &str) -> BoxFuture<'_, Result<Option<StoredFile>>> {
        self.inner.get_file(app, id)
    }
    fn first_missing_file(
        &self,
        app: &str,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Option<String>>> {
        self.inner.first_missing_file(app, ids)
    }
    fn purge(&self, before: PurgeBefore) -> BoxFuture<'_, Result<Purged>> {
        self.inner.purge(before)
    }
}

/// A gateway running in-process.
pub struct TestGateway {
    pub addr: std::net::SocketAddr,
    /// The token of app `app1`.
    pub token: String,
    pub store: Arc<GatedStore>,
    pub dir: Arc<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::result::Result<(), ServerError>>>,
}

impl TestGateway {
    /// A gateway with one app, `app1`, on the default configuration.
    pub async fn start() -> Self {
        Self::with_config(Config::default()).await
    }

    /// A gateway with one app, `app1`.
    pub async fn with_config(config: Config) -> Self {
        Self::with_agents(config, Kinds::builtin(), Vec::new()).await
    }

    /// A gateway with one app, `app1`, that also has `agents` (of the built-in kinds or of
    /// `kinds`).
    pub async fn with_agents(config: Config, kinds: Kinds, agents: Vec<AgentRecord>) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let store = Arc::new(GatedStore::open(dir.path()));
        let (_, token) = store.create_app("app1", 0).await.expect("app created");
        for agent in agents {
            store.put_agent("app1", agent).await.expect("agent added");
        }
        Self::launch(dir, store, token.expose().to_owned(), config, kinds).await
    }

    /// A gateway over an existing data directory (a restart).
    pub async fn restart_on(dir: Arc<tempfile::TempDir>, token: String, config: Config) -> Self {
        let store = Arc::new(GatedStore::open(dir.path()));
        Self::launch(dir, store, token, config, Kinds::builtin()).await
    }

    async fn launch(
        dir: Arc<tempfile::TempDir>,
        store: Arc<GatedStore>,
        token: String,
        config: Config,
        kinds: Kinds,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            stopped.await.ok();
        };
        let server = Server::new(store.clone()).config(config).agent_kinds(kinds);
        let task = tokio::spawn(server.run(listener, shutdown));
        Self {
            addr,
            token,
            store,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Creates another app; returns its token.
    pub async fn create_app(&self, name: &str) -> String {
        let (_, token) = self.store.create_app(name, 0).await.expect("app created");
        token.expose().to_owned()
    }

    pub fn url(&self, token: &str) -> String {
        format!("ws://{}/ws/v1/chat?app_token={token}", self.addr)
    }

    /// A connection of app `app1`'s pool.
    pub async fn connect(&self) -> Client {
        self.connect_with(&self.token).await
    }

    pub async fn connect_with(&self, token: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.url(token))
            .await
            .expect("upgrade accepted");
        Client { ws }
    }

    /// Tries to connect; returns the HTTP status and body of a refusal.
    pub async fn refused(&self, token: &str) -> (u16, String, Option<String>) {
        match tokio_tungstenite::connect_async(self.url(token)).await {
            Ok(_) => panic!("the upgrade was accepted"),
            Err(WsError::Http(response)) => {
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned();
                let retry = response
                    .headers()
                    .get("retry-after")
                    .map(|value| value.to_str().unwrap().to_owned());
                (response.status().as_u16(), body, retry)
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }

    /// GET a path; returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response[9..12].parse().expect("status");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Sends one HTTP request; returns status, the response head, and the body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes()).await.expect("write");
        // The gateway may answer (413) before reading the whole body.
        stream.write_all(body).await.ok();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok();
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        let status = head[9..12].parse().expect("status");
        (status, head, response[split + 4..].to_vec())
    }

    /// The value of one metric series, e.g. `iagent_responses_total{app="app1",resp_code="0"}`.
    pub async fn metric(&self, series: &str) -> u64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map(|value| value.trim().parse().expect("a number"))
            .unwrap_or_else(|| panic!("no series {series} in\n{body}"))
    }

    /// Waits until a metric series has `value`; fails the test after [`FRAME_WAIT`].
    pub async fn wait_for_metric(&self, series: &str, value: u64) {
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let now = self.metric(series).await;
            if now == value {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed at {now}, expected {value}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
    }

    /// Shuts down gracefully and waits until the gateway has stopped.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("shutdown finished in time")
            .expect("task did not panic")
            .expect("gateway ended cleanly");
    }
}

/// One WebSocket connection, as a backend holds it.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn send(&mut self, message: &Value) {
        self.send_text(&message.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text))
            .await
            .expect("frame sent");
    }

    /// The next message frame (pings are skipped), as JSON.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("a frame arrived in time")
                .expect("connection open")
                .expect("frame readable");
            match frame {
                WsMessage::Text(text) => {
                    return serde_json::from_str(&text).expect("response is JSON");
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Waits for the gateway to close the connection; returns its close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            let frame = tokio::time::timeout(FRAME_WAIT, self.ws.next())
                .await
                .expect("closed in time");
            match frame {
                Some(Ok(WsMessage::Close(frame))) => return frame,
                Some(Ok(WsMessage::Text(text))) => {
                    panic!("unexpected message before close: {text}")
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Closes the connection with a close handshake.
    pub async fn close(&mut self) {
        self.ws.close(None).await.expect("closed cleanly");
    }

    /// Sends `message` and returns its response.
    pub async fn ask(&mut self, message: &Value) -> Value {
        self.send(message).await;
        self.recv().await
    }
}

/// A valid private text message from `user`.
pub fn private(msg_id: &str, user: &str, text: &str) -> Value {
    json!({
        "chat_type": 1, "msg_id": msg_id, "timestamp": 1_700_000_000_000_i64, "sender_type": 1,
        "sender_id": user, "resp_code": 0, "content_type": 1, "content": text,
    })
}

/// A valid group text message from `user` in `group`.
pub fn group(msg_id: &str, user: &str, group: &str, text: &str) -> Value {
    let mut message = private(msg_id, user, text);
    message["chat_type"] = json!(2);
    message["group_id"] = json!(group);
    message
}

/// Asserts `response` is the response to `msg_id` with `code`.
#[track_caller]
pub fn assert_response(response: &Value, msg_id: &str, code: u64) {
    assert_eq!(
        response["ref_msg_id"], msg_id,
        "response to the wrong message: {response}"
    );
    assert_eq!(response["resp_code"], code, "wrong code: {response}");
}
