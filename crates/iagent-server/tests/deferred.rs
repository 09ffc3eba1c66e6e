//! Replies an agent defers (a webhook answering 202): the message waits, holding no in-flight
//! place; the agent's push with `ref_msg_id` becomes its one response, routed where the message
//! came from (or was last resent); no push by the deadline means 50; a restart keeps it waiting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{TestGateway, assert_response, private};
use iagent_agent::{Agent, Reply, ReplyStrategy, Replying, Turn};
use iagent_server::{Config, Kinds};
use iagent_store::AgentRecord;
use serde_json::{Value, json};

/// An agent that always answers later.
struct Later {
    id: String,
    strategy: ReplyStrategy,
}

impl Agent for Later {
    fn id(&self) -> &str {
        &self.id
    }

    fn strategy(&self) -> &ReplyStrategy {
        &self.strategy
    }

    fn reply<'a>(&'a self, _turn: Turn<'a>) -> Replying<'a> {
        Replying::Now(Ok(Reply::Deferred))
    }
}

fn kinds() -> Kinds {
    Kinds::builtin().with("later", |id, _| {
        Ok(Arc::new(Later {
            id: id.to_owned(),
            strategy: ReplyStrategy::default(),
        }) as Arc<dyn Agent>)
    })
}

async fn gateway(config: Config) -> TestGateway {
    let later = AgentRecord {
        id: "slowpoke".into(),
        kind: "later".into(),
        config: "{}".into(),
    };
    TestGateway::with_agents(config, kinds(), vec![later]).await
}

fn to_slowpoke(msg_id: &str) -> Value {
    let mut message = private(msg_id, "alice", "get back to me");
    message["receiver_id"] = json!("slowpoke");
    message
}

async fn push(gateway: &TestGateway, body: Value) -> (u16, Value) {
    let path = format!("/api/v1/messages?app_token={}", gateway.token);
    let (status, _, answer) = gateway
        .http("POST", &path, &[], body.to_string().as_bytes())
        .await;
    (
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    )
}

fn reply_to(msg_id: &str, sender: &str, text: &str) -> Value {
    json!({ "sender_id": sender, "ref_msg_id": msg_id, "content_type": 1, "content": text })
}

#[tokio::test]
async fn a_pushed_reply_becomes_the_deferred_messages_one_response() {
    let mut config = Config::default();
    config.limits.max_in_flight_per_connection = 1;
    let gateway = gateway(config).await;
    let mut client = gateway.connect().await;
    client.send(&to_slowpoke("d1")).await;
    gateway
        .wait_for_metric("iagent_deferred{app=\"app1\"}", 1)
        .await;
    // Waiting holds no in-flight place: with a limit of one, the connection is still served.
    assert_response(
        &client.ask(&private("e1", "bob", "meanwhile")).await,
        "e1",
        0,
    );

    // Only the agent that deferred may answer.
    let (status, answer) = push(&gateway, reply_to("d1", "echo", "not yours")).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = push(&gateway, reply_to("d1", "slowpoke", "here you go")).await;
    assert_eq!(status, 200, "{answer}");
    let response = client.recv().await;
    assert_response(&response, "d1", 0);
    assert_eq!(response["msg_id"], answer["msg_id"]);
    assert_eq!(response["sender_id"], "slowpoke");
    assert_eq!(response["receiver_id"], "alice");
    assert_eq!(response["content"], "here you go");

    // Answered once: a second push has nothing to answer, a resend gets the same response.
    assert_eq!(
        push(&gateway, reply_to("d1", "slowpoke", "again")).await.0,
        404
    );
    assert_eq!(client.ask(&to_slowpoke("d1")).await, response);
    assert_eq!(gateway.store.completions("d1"), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn without_a_push_by_the_deadline_the_message_is_answered_with_50() {
    let mut config = Config::default();
    config.timeouts.deferred_reply_ms = 100;
    let gateway = gateway(config).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to_slowpoke("d2")).await;
    assert_response(&response, "d2", 50);
    assert_eq!(
        response["content"],
        "agent slowpoke deferred its reply and did not push it within 100 ms"
    );
    assert_eq!(
        push(&gateway, reply_to("d2", "slowpoke", "too late"))
            .await
            .0,
        404
    );
    assert_eq!(client.ask(&to_slowpoke("d2")).await, response);
    gateway.stop().await;
}

#[tokio::test]
async fn the_reply_follows_a_resend_to_its_new_connection() {
    let gateway = gateway(Config::default()).await;
    let mut first = gateway.connect().await;
    first.send(&to_slowpoke("d3")).await;
    gateway
        .wait_for_metric("iagent_deferred{app=\"app1\"}", 1)
        .await;
    let mut second = gateway.connect().await;
    second.send(&to_slowpoke("d3")).await;
    gateway
        .wait_for_metric("iagent_duplicates_total{app=\"app1\"}", 1)
        .await;
    assert_eq!(
        push(&gateway, reply_to("d3", "slowpoke", "found you"))
            .await
            .0,
        200
    );
    let answered = second.recv().await;
    assert_response(&answered, "d3", 0);
    // The first connection, still open, gets a copy of that one response, and nothing more.
    assert_eq!(first.recv().await, answered);
    assert_response(&first.ask(&private("e3", "bob", "x")).await, "e3", 0);
    gateway.stop().await;
}

#[tokio::test]
async fn a_deferred_message_keeps_waiting_across_a_restart() {
    let gateway = gateway(Config::default()).await;
    let mut client = gateway.connect().await;
    client.send(&to_slowpoke("d4")).await;
    gateway
        .wait_for_metric("iagent_deferred{app=\"app1\"}", 1)
        .await;
    let (dir, token) = (gateway.dir.clone(), gateway.token.clone());
    gateway.stop().await;

    let gateway = TestGateway::restart_on(dir, token, Config::default()).await;
    // Not mistaken for a message a crash interrupted: no 50 waits in the outbox.
    assert_eq!(gateway.metric("iagent_outbox_depth{app=\"app1\"}").await, 0);
    let mut client = gateway.connect().await;
    assert_eq!(
        push(&gateway, reply_to("d4", "slowpoke", "after the restart"))
            .await
            .0,
        200
    );
    let response = client.recv().await;
    assert_response(&response, "d4", 0);
    assert_eq!(response["content"], "after the restart");
    gateway.stop().await;
}

#[tokio::test]
async fn an_app_at_its_limit_of_waiting_messages_gets_50_instead() {
    let mut config = Config::default();
    config.limits.max_deferred_per_app = 1;
    let gateway = gateway(config).await;
    let mut client = gateway.connect().await;
    client.send(&to_slowpoke("w1")).await;
    gateway
        .wait_for_metric("iagent_deferred{app=\"app1\"}", 1)
        .await;
    let response = client.ask(&to_slowpoke("w2")).await;
    assert_response(&response, "w2", 50);
    assert!(
        response["content"]
            .as_str()
            .unwrap()
            .contains("waiting for pushed replies, its limit")
    );
    gateway.stop().await;
}
