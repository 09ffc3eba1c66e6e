//! The `rules` agent kind over a real WebSocket: the first matching rule's reply, the fallback,
//! a 10 `no_rule_matched` without one, and the reply strategy in groups (mentions only by
//! default, every text with `"group": "always"`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestGateway, assert_response, group, private};
use iagent_server::{Config, Kinds};
use iagent_store::{AgentRecord, Store};
use serde_json::{Value, json};

/// The example configuration of `docs/agents.md`, with `strategy` left to the caller.
fn config(strategy: Option<Value>, fallback: bool) -> String {
    let mut config = json!({
        "rules": [
            { "keywords": ["price", "cost"], "reply": "Our prices are on example.com/prices" },
            { "regex": "(?i)^(hi|hello)\\b", "reply": "Hello {sender_id}!" },
            { "regex": "order (?P<number>[0-9]+)", "reply": "Looking up order {number} for you." }
        ],
    });
    if fallback {
        config["fallback"] = json!("Sorry, I did not understand.");
    }
    if let Some(strategy) = strategy {
        config["strategy"] = strategy;
    }
    config.to_string()
}

fn agent(id: &str, config: String) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        kind: "rules".into(),
        config,
    }
}

/// `helper` (default strategy, with fallback), `strict` (no fallback), `chatty` (answers every
/// group text) and `broken` (a configuration error, so it is left out).
fn agents() -> Vec<AgentRecord> {
    vec![
        agent("helper", config(None, true)),
        agent("strict", config(None, false)),
        agent("chatty", config(Some(json!({ "group": "always" })), true)),
        agent("broken", json!({ "rules": [{ "reply": "x" }] }).to_string()),
    ]
}

/// A gateway whose app `app1` has [`agents`] and, when given, `default` as its default agent
/// (the one that gets group messages that name no agent).
async fn gateway(default: Option<&str>) -> TestGateway {
    let gateway = TestGateway::with_agents(Config::default(), Kinds::builtin(), agents()).await;
    let Some(default) = default else {
        return gateway;
    };
    // The default agent is read when the gateway loads the app: set it, then restart.
    gateway
        .store
        .set_default_agent("app1", default)
        .await
        .expect("default set");
    let (dir, token) = (gateway.dir.clone(), gateway.token.clone());
    gateway.stop().await;
    TestGateway::restart_on(dir, token, Config::default()).await
}

fn to(agent: &str, msg_id: &str, text: &str) -> Value {
    let mut message = private(msg_id, "alice", text);
    message["receiver_id"] = json!(agent);
    message
}

#[track_caller]
fn assert_reply(response: &Value, msg_id: &str, agent: &str, text: &str) {
    assert_response(response, msg_id, 0);
    assert_eq!(response["sender_id"], agent, "{response}");
    assert_eq!(response["content_type"], 1, "{response}");
    assert_eq!(response["content"], text, "{response}");
}

#[track_caller]
fn assert_no_reply(response: &Value, msg_id: &str, agent: &str, reason: &str) {
    assert_response(response, msg_id, 10);
    assert_eq!(response["sender_id"], agent, "{response}");
    assert_eq!(response["content"], reason, "{response}");
}

#[tokio::test]
async fn private_messages_get_the_matching_rules_reply_or_the_fallback() {
    let gateway = gateway(None).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("helper", "p1", "What's the PRICE?")).await;
    assert_reply(
        &response,
        "p1",
        "helper",
        "Our prices are on example.com/prices",
    );
    let response = client.ask(&to("helper", "p2", "hello there")).await;
    assert_reply(&response, "p2", "helper", "Hello alice!");
    let response = client
        .ask(&to("helper", "p3", "where is order 1234?"))
        .await;
    assert_reply(&response, "p3", "helper", "Looking up order 1234 for you.");
    // `priceless` is not the keyword `price`: nothing matches, the fallback answers.
    let response = client.ask(&to("helper", "p4", "priceless")).await;
    assert_reply(&response, "p4", "helper", "Sorry, I did not understand.");
    // Media never matches a rule, whatever its file id.
    let path = format!("/api/v1/files?app_token={}", gateway.token);
    let (status, _, body) = gateway
        .http("POST", &path, &[("Content-Type", "image/png")], b"price")
        .await;
    assert_eq!(status, 200);
    let file_id = serde_json::from_slice::<Value>(&body).unwrap()["file_id"].clone();
    let mut image = to("helper", "p5", "");
    image["content_type"] = json!(2);
    image["content"] = json!(json!({ "file_ids": [file_id] }).to_string());
    let response = client.ask(&image).await;
    assert_response(&response, "p5", 0);
    assert_eq!(response["content"], "Sorry, I did not understand.");
    gateway.stop().await;
}

#[tokio::test]
async fn without_a_fallback_an_unmatched_message_is_answered_with_10_no_rule_matched() {
    let gateway = gateway(None).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("strict", "s1", "nothing to see")).await;
    assert_no_reply(&response, "s1", "strict", "no_rule_matched");
    let response = client.ask(&to("strict", "s2", "hi")).await;
    assert_reply(&response, "s2", "strict", "Hello alice!");
    gateway.stop().await;
}

#[tokio::test]
async fn an_agent_with_a_broken_configuration_is_left_out() {
    let gateway = gateway(None).await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("broken", "b1", "hi")).await;
    assert_response(&response, "b1", 40);
    assert_eq!(
        response["content"],
        "receiver_id \"broken\" is not an agent of this app"
    );
    let response = client.ask(&to("helper", "b2", "hi")).await;
    assert_reply(&response, "b2", "helper", "Hello alice!");
    gateway.stop().await;
}

#[tokio::test]
async fn in_groups_only_mentions_are_answered_by_default() {
    let gateway = gateway(Some("helper")).await;
    let mut client = gateway.connect().await;
    let response = client
        .ask(&group("g1", "bob", "room", "order 7 please"))
        .await;
    assert_no_reply(&response, "g1", "helper", "not_addressed");
    let response = client
        .ask(&group("g2", "bob", "room", "@helper order 7 please"))
        .await;
    assert_reply(&response, "g2", "helper", "Looking up order 7 for you.");
    let response = client.ask(&group("g3", "bob", "room", "@helper ?")).await;
    assert_reply(&response, "g3", "helper", "Sorry, I did not understand.");
    // `@helpers` is not a mention of `helper`.
    let response = client
        .ask(&group("g4", "bob", "room", "@helpers price"))
        .await;
    assert_no_reply(&response, "g4", "helper", "not_addressed");
    // Naming the agent in `receiver_id` addresses it too.
    let mut named = group("g5", "bob", "room", "price");
    named["receiver_id"] = json!("helper");
    let response = client.ask(&named).await;
    assert_reply(
        &response,
        "g5",
        "helper",
        "Our prices are on example.com/prices",
    );
    gateway.stop().await;
}

#[tokio::test]
async fn in_groups_an_agent_with_group_always_answers_every_text() {
    let gateway = gateway(Some("chatty")).await;
    let mut client = gateway.connect().await;
    let response = client
        .ask(&group("a1", "bob", "room", "order 7 please"))
        .await;
    assert_reply(&response, "a1", "chatty", "Looking up order 7 for you.");
    let response = client
        .ask(&group("a2", "bob", "room", "just chatting"))
        .await;
    assert_reply(&response, "a2", "chatty", "Sorry, I did not understand.");
    gateway.stop().await;
}

#[tokio::test]
async fn in_groups_the_mentioned_agent_answers_not_the_default() {
    // `echo` stays the default; mentions pick the agent.
    let gateway = gateway(None).await;
    let mut client = gateway.connect().await;
    let response = client
        .ask(&group("m1", "bob", "room", "hey @helper, order 7?"))
        .await;
    assert_reply(&response, "m1", "helper", "Looking up order 7 for you.");
    // The first mention wins: `strict` has no fallback, so it declines.
    let response = client
        .ask(&group("m2", "bob", "room", "@strict or @helper: weather?"))
        .await;
    assert_no_reply(&response, "m2", "strict", "no_rule_matched");
    // A sentence may end right after the mention.
    let response = client
        .ask(&group("m3", "bob", "room", "what is the price, @helper."))
        .await;
    assert_reply(
        &response,
        "m3",
        "helper",
        "Our prices are on example.com/prices",
    );
    // Mentioning nobody the app has leaves the default, which was not addressed.
    let response = client
        .ask(&group("m4", "bob", "room", "@nobody hello"))
        .await;
    assert_no_reply(&response, "m4", "echo", "not_addressed");
    gateway.stop().await;
}
