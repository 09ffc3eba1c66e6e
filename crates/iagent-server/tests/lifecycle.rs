//! Shutdown and restart: work in flight is answered before connections close with 1012, a hung
//! message cannot hold shutdown forever, and dedup records, outbox entries and unanswered
//! messages survive a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestGateway, assert_response, private};
use iagent_server::Config;
use iagent_store::{Claim, SqliteStore, Store};

#[tokio::test]
async fn shutdown_answers_work_in_flight_then_closes_with_1012() {
    let mut gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    gateway.store.hold("inflight");
    client
        .send(&private("inflight", "alice", "finish me"))
        .await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;

    gateway.begin_shutdown();
    gateway.store.release("inflight");

    let response = client.recv().await;
    assert_response(&response, "inflight", 0);
    assert_eq!(response["content"], "finish me");
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    gateway.stop().await;
}

#[tokio::test]
async fn a_message_stuck_past_the_grace_period_does_not_hold_shutdown() {
    let mut config = Config::default();
    config.timeouts.shutdown_grace_ms = 100;
    let gateway = TestGateway::with_config(config).await;
    let mut client = gateway.connect().await;
    gateway.store.hold("stuck");
    client
        .send(&private("stuck", "alice", "never released"))
        .await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    let stopping = tokio::spawn(gateway.stop());
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_resent_msg_id_after_a_restart_gets_the_stored_response() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    let original = client
        .ask(&private("durable", "alice", "remember me"))
        .await;
    assert_response(&original, "durable", 0);
    let (dir, token) = (gateway.dir.clone(), gateway.token.clone());
    gateway.stop().await;

    let gateway = TestGateway::restart_on(dir, token, Config::default()).await;
    let mut client = gateway.connect().await;
    let again = client
        .ask(&private("durable", "alice", "remember me"))
        .await;
    assert_eq!(again, original);
    assert_eq!(
        gateway.store.completions("durable"),
        0,
        "not processed again"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_outbox_filled_before_a_restart_is_delivered_after_it() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    gateway.store.hold("parked");
    client
        .send(&private("parked", "alice", "wait for me"))
        .await;
    gateway
        .wait_for_metric("iagent_in_flight{app=\"app1\"}", 1)
        .await;
    client.close().await;
    gateway
        .wait_for_metric("iagent_connections{app=\"app1\"}", 0)
        .await;
    gateway.store.release("parked");
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 1)
        .await;
    let (dir, token) = (gateway.dir.clone(), gateway.token.clone());
    gateway.stop().await;

    let gateway = TestGateway::restart_on(dir, token, Config::default()).await;
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 1)
        .await;
    let mut client = gateway.connect().await;
    let response = client.recv().await;
    assert_response(&response, "parked", 0);
    assert_eq!(response["content"], "wait for me");
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 0)
        .await;
    gateway.stop().await;
}

#[tokio::test]
async fn a_message_claimed_by_a_process_that_died_is_answered_with_50_after_restart() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let token = {
        // What a killed process leaves behind: a claimed message with no response.
        let store = SqliteStore::open(dir.path(), Default::default()).unwrap();
        let (_, token) = store.create_app("app1", 0).await.unwrap();
        let inbound = private("orphan", "alice", "lost in the crash").to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let now = i64::try_from(now.as_millis()).unwrap();
        assert_eq!(
            store
                .claim("app1", "orphan", inbound.into(), now)
                .await
                .unwrap(),
            Claim::New
        );
        token.expose().to_owned()
    };
    let gateway = TestGateway::restart_on(dir, token, Config::default()).await;
    let mut client = gateway.connect().await;
    let response = client.recv().await;
    assert_response(&response, "orphan", 50);
    assert_eq!(response["receiver_id"], "alice");
    assert!(
        response["content"].as_str().unwrap().contains("restarted"),
        "{response}"
    );
    // A resend gets the same one response, not a second processing.
    let again = client
        .ask(&private("orphan", "alice", "lost in the crash"))
        .await;
    assert_eq!(again, response);
    assert_eq!(
        gateway.store.completions("orphan"),
        1,
        "completed once, by the recovery"
    );
    gateway.stop().await;
}
