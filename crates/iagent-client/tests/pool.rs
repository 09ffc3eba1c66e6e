//! The client against the real gateway, in-process: many requests over a pool, connections
//! dropped under load, a gateway restart on the same port, backoff, back-pressure, pushed
//! messages, timeouts and shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../iagent-server/tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{GatedStore, TestGateway};
use iagent_client::{Client, Config, ConnectError, Message, SendError};
use iagent_protocol::{ChatType, ContentType, RespCode, SenderType};
use tokio::task::JoinSet;

/// How long a test waits for anything before failing.
const WAIT: Duration = Duration::from_secs(20);

fn message(msg_id: &str, user: &str) -> Message {
    Message {
        chat_type: ChatType::Private,
        msg_id: msg_id.into(),
        ref_msg_id: None,
        timestamp: 1_700_000_000_000,
        group_id: None,
        sender_type: SenderType::User,
        sender_id: user.into(),
        receiver_id: None,
        resp_code: RespCode::Ok,
        content_type: ContentType::Text,
        content: format!("hello from {msg_id}"),
    }
}

fn config(gateway: &TestGateway) -> Config {
    let mut config = Config::new(format!("ws://{}", gateway.addr), gateway.token.clone());
    config.backoff_min = Duration::from_millis(20);
    config.backoff_max = Duration::from_millis(200);
    config.request_timeout = WAIT;
    config
}

/// Sends `count` messages from `users` users concurrently; returns the ids.
fn send_all(
    client: &Client,
    prefix: &str,
    count: usize,
    users: usize,
) -> JoinSet<(String, Result<Message, SendError>)> {
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let client = client.clone();
        let id = format!("{prefix}-{i}");
        let user = format!("user-{}", i % users);
        tasks.spawn(async move {
            let result = client.send(message(&id, &user)).await;
            (id, result)
        });
    }
    tasks
}

/// Awaits every send; checks each resolved once with its own echoed response.
async fn expect_answered(
    mut tasks: JoinSet<(String, Result<Message, SendError>)>,
    count: usize,
) -> Vec<String> {
    let mut seen = HashSet::new();
    while let Some(joined) = tokio::time::timeout(WAIT, tasks.join_next())
        .await
        .expect("every send resolved in time")
    {
        let (id, result) = joined.expect("send task did not panic");
        let response = result.unwrap_or_else(|err| panic!("{id}: {err}"));
        assert_eq!(response.ref_msg_id.as_deref(), Some(id.as_str()));
        assert_eq!(response.resp_code, RespCode::Ok, "{response:?}");
        assert_eq!(response.content, format!("hello from {id}"));
        assert!(seen.insert(id), "a send resolved twice");
    }
    assert_eq!(seen.len(), count);
    seen.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_users_many_messages_each_get_their_own_response() {
    let gateway = TestGateway::start().await;
    let (client, mut pushed) = Client::connect(config(&gateway)).await.expect("connects");
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 4)
        .await;

    let ids = expect_answered(send_all(&client, "load", 2_000, 200), 2_000).await;
    for id in &ids {
        assert_eq!(gateway.store.completions(id), 1, "{id} processed once");
    }
    assert_eq!(client.in_flight(), 0);
    assert!(pushed.try_recv_for_test().is_none(), "no stray message");
    client.shutdown().await;
    gateway.stop().await;
}

/// `Pushed` has no `try_recv`; a short wait shows the queue is empty.
trait TryRecv {
    fn try_recv_for_test(&mut self) -> Option<Message>;
}

impl TryRecv for iagent_client::Pushed {
    fn try_recv_for_test(&mut self) -> Option<Message> {
        use futures_util::FutureExt;
        self.recv().now_or_never().flatten()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_dropped_under_load_lose_nothing_and_process_once() {
    let gateway = TestGateway::start().await;
    let (client, mut pushed) = Client::connect(config(&gateway)).await.expect("connects");
    let held: Vec<String> = (0..1_000)
        .step_by(50)
        .map(|i| format!("drop-{i}"))
        .collect();
    for id in &held {
        gateway.store.hold(id);
    }

    let tasks = send_all(&client, "drop", 1_000, 100);
    for round in 0..24 {
        client.drop_connection(round % 4);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    for id in &held {
        gateway.store.release(id);
    }
    let ids = expect_answered(tasks, 1_000).await;
    for id in &ids {
        assert_eq!(gateway.store.completions(id), 1, "{id} processed once");
    }
    // Duplicates of answered responses (resends, rerouted copies) are dropped, not pushed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        pushed.try_recv_for_test().is_none(),
        "no duplicate surfaced"
    );
    client.shutdown().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reconnects_after_a_restart_on_the_same_port() {
    let gateway = TestGateway::start().await;
    let (client, _pushed) = Client::connect(config(&gateway)).await.expect("connects");
    let response = client
        .send(message("before", "alice"))
        .await
        .expect("answered");
    assert_eq!(response.resp_code, RespCode::Ok);

    let (addr, dir) = (gateway.addr, gateway.dir.clone());
    gateway.stop().await;

    // The second gateway, on the same address and data directory.
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("same port");
    let store = Arc::new(GatedStore::open(dir.path()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(iagent_server::Server::new(store).run(listener, async move {
        stopped.await.ok();
    }));

    let response = client
        .send(message("after", "alice"))
        .await
        .expect("answered");
    assert_eq!(response.ref_msg_id.as_deref(), Some("after"));
    assert_eq!(response.resp_code, RespCode::Ok);

    client.shutdown().await;
    stop.send(()).expect("server running");
    server.await.expect("no panic").expect("clean stop");
}

#[tokio::test]
async fn a_refusing_gateway_is_retried_no_faster_than_backoff_min() {
    // A fake gateway: the first connection is upgraded and then dropped; every later one is
    // dropped before the handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let (upgraded_tx, upgraded) = tokio::sync::oneshot::channel();
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.expect("accept");
        let ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("upgrade");
        upgraded_tx.send(ws).ok();
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            accepted_tx
                .send(tokio::time::Instant::now())
                .expect("test listening");
            drop(stream);
        }
    });

    let mut config = Config::new(format!("ws://{addr}"), "token");
    config.connections = 1;
    config.backoff_min = Duration::from_secs(1);
    config.backoff_max = Duration::from_secs(8);
    config.connect_timeout = Duration::from_secs(3_600);
    let (client, _pushed) = Client::connect(config).await.expect("connects");
    let ws = upgraded.await.expect("upgraded");

    tokio::time::pause();
    let start = tokio::time::Instant::now();
    drop(ws);
    for k in 1..=6u32 {
        let at = accepted.recv().await.expect("another attempt");
        let since = at - start;
        assert!(
            since >= Duration::from_secs(1) * k,
            "attempt {k} came {since:?} after the drop"
        );
    }
    client.shutdown().await;
    fake.abort();
}

#[tokio::test]
async fn a_refused_token_fails_the_initial_connect() {
    let gateway = TestGateway::start().await;
    let mut config = config(&gateway);
    config.token = "not-a-token".into();
    let error = Client::connect(config).await.expect_err("refused");
    assert!(matches!(error, ConnectError::Unauthorized), "{error}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_hands_the_message_back() {
    let gateway = TestGateway::start().await;
    let mut config = config(&gateway);
    config.max_in_flight = 2;
    let (client, _pushed) = Client::connect(config).await.expect("connects");
    gateway.store.hold("full-0");
    gateway.store.hold("full-1");
    let tasks = send_all(&client, "full", 2, 2);
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.in_flight() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "sends started");
        tokio::task::yield_now().await;
    }
    let third = message("full-3", "carol");
    match client.send(third.clone()).await {
        Err(SendError::Full(back)) => assert_eq!(back, third),
        other => panic!("expected Full, got {other:?}"),
    }
    gateway.store.release("full-0");
    gateway.store.release("full-1");
    expect_answered(tasks, 2).await;
    let response = client.send(third).await.expect("room again");
    assert_eq!(response.ref_msg_id.as_deref(), Some("full-3"));
    client.shutdown().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_messages_arrive_on_pushed() {
    let gateway = TestGateway::start().await;
    let (client, mut pushed) = Client::connect(config(&gateway)).await.expect("connects");
    let path = format!("/api/v1/messages?app_token={}", gateway.token);
    let body = br#"{"sender_id":"echo","receiver_id":"alice","content_type":1,"content":"hi"}"#;
    let (status, _, answer) = gateway
        .http("POST", &path, &[("Content-Type", "application/json")], body)
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));

    let message = tokio::time::timeout(WAIT, pushed.recv())
        .await
        .expect("pushed in time")
        .expect("client running");
    assert_eq!(message.content, "hi");
    assert_eq!(message.sender_id, "echo");
    assert_eq!(message.receiver_id.as_deref(), Some("alice"));
    assert_eq!(message.ref_msg_id, None);
    client.shutdown().await;
    assert!(pushed.recv().await.is_none(), "Pushed ends after shutdown");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_request_gets_its_late_response_on_pushed() {
    let gateway = TestGateway::start().await;
    let mut config = config(&gateway);
    config.request_timeout = Duration::from_millis(200);
    let (client, mut pushed) = Client::connect(config).await.expect("connects");
    gateway.store.hold("slow");
    let error = client
        .send(message("slow", "alice"))
        .await
        .expect_err("times out");
    assert!(matches!(error, SendError::Timeout), "{error}");
    assert_eq!(client.in_flight(), 0);
    gateway.store.release("slow");
    let late = tokio::time::timeout(WAIT, pushed.recv())
        .await
        .expect("late response in time")
        .expect("client running");
    assert_eq!(late.ref_msg_id.as_deref(), Some("slow"));
    client.shutdown().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_waiting_and_later_sends_with_closed() {
    let gateway = TestGateway::start().await;
    let (client, _pushed) = Client::connect(config(&gateway)).await.expect("connects");
    gateway.store.hold("waiting");
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move { client.send(message("waiting", "alice")).await })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.in_flight() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "send started");
        tokio::task::yield_now().await;
    }
    client.shutdown().await;
    let result = waiting.await.expect("no panic");
    assert!(matches!(result, Err(SendError::Closed)), "{result:?}");
    let later = client.send(message("later", "alice")).await;
    assert!(matches!(later, Err(SendError::Closed)), "{later:?}");
    gateway.store.release("waiting");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msg_id_already_in_flight_is_handed_back() {
    let gateway = TestGateway::start().await;
    let (client, _pushed) = Client::connect(config(&gateway)).await.expect("connects");
    gateway.store.hold("twice");
    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.send(message("twice", "alice")).await })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while client.in_flight() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "send started");
        tokio::task::yield_now().await;
    }
    let again = client.send(message("twice", "alice")).await;
    assert!(
        matches!(again, Err(SendError::Duplicate(ref m)) if m.msg_id == "twice"),
        "{again:?}"
    );
    gateway.store.release("twice");
    let response = first.await.expect("no panic").expect("answered");
    assert_eq!(response.ref_msg_id.as_deref(), Some("twice"));
    client.shutdown().await;
    gateway.stop().await;
}
