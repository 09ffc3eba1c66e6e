//! The `openai` kind through the running gateway, against a stand-in chat-completions endpoint
//! on 127.0.0.1: the conversation reaches the model as context (group speakers labelled), the
//! API key comes from the environment, rate limits are retried, and provider errors and
//! timeouts are answered with one 50 that says why.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../iagent-agent/src/stand_in.rs"]
mod stand_in;

use common::{TestGateway, assert_response, group, private};
use iagent_agent::Environment;
use iagent_server::{Config, Kinds};
use iagent_store::AgentRecord;
use serde_json::{Value, json};
use stand_in::{Answer, Recorded, StandIn};

/// A model that answers with what it was given: the model's name, how many messages of
/// context, and the last one's text.
fn model(request: &Recorded, _n: usize) -> Answer {
    let body = request.json();
    let messages = body["messages"].as_array().unwrap();
    let last = messages.last().unwrap()["content"]
        .as_str()
        .unwrap_or("(parts)");
    let text = format!(
        "{} read {} messages, the last: {last}",
        body["model"].as_str().unwrap(),
        messages.len()
    );
    Answer::json(
        200,
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}),
    )
}

fn openai(id: &str, config: Value) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        kind: "openai".into(),
        config: config.to_string(),
    }
}

/// The built-in kinds, with an environment that has the test's API key.
fn kinds() -> Kinds {
    Kinds::builtin_with(Environment::from_fn(|name| {
        (name == "TEST_MODEL_KEY").then(|| "sk-from-env".into())
    }))
}

async fn gateway_with(agents: Vec<AgentRecord>) -> TestGateway {
    TestGateway::with_agents(Config::default(), kinds(), agents).await
}

fn to(agent: &str, msg_id: &str, text: &str) -> Value {
    let mut message = private(msg_id, "alice", text);
    message["receiver_id"] = json!(agent);
    message
}

#[tokio::test]
async fn the_model_answers_with_the_conversation_as_context_and_the_key_from_the_environment() {
    let stand_in = StandIn::start(model).await;
    let gateway = gateway_with(vec![openai(
        "bot",
        json!({
            "base_url": stand_in.url, "model": "tiny", "api_key_env": "TEST_MODEL_KEY",
            "system_prompt": "You help.", "temperature": 0.5, "max_tokens": 50
        }),
    )])
    .await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("bot", "o1", "hello")).await;
    assert_response(&response, "o1", 0);
    assert_eq!(response["content"], "tiny read 2 messages, the last: hello");
    assert_eq!(response["sender_id"], "bot");

    let response = client.ask(&to("bot", "o2", "and now?")).await;
    assert_eq!(
        response["content"],
        "tiny read 4 messages, the last: and now?"
    );
    let request = &stand_in.requests()[1];
    assert_eq!(request.header("authorization"), Some("Bearer sk-from-env"));
    let body = request.json();
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "You help."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "tiny read 2 messages, the last: hello"},
            {"role": "user", "content": "and now?"}
        ])
    );
    assert_eq!(
        (body["temperature"].clone(), body["max_tokens"].clone()),
        (json!(0.5), json!(50))
    );
    gateway.stop().await;
}

#[tokio::test]
async fn in_a_group_only_the_addressed_agent_answers_and_sees_who_said_what() {
    let stand_in = StandIn::start(model).await;
    let gateway = gateway_with(vec![
        openai(
            "alpha",
            json!({ "base_url": stand_in.url, "model": "alpha-model" }),
        ),
        openai(
            "beta",
            json!({ "base_url": stand_in.url, "model": "beta-model" }),
        ),
    ])
    .await;
    let mut client = gateway.connect().await;

    // Addressing nobody: the app's default agent (echo) declines, as its strategy says;
    // neither model is called.
    let response = client
        .ask(&group("g1", "alice", "room", "morning all"))
        .await;
    assert_response(&response, "g1", 10);
    assert_eq!(
        (&response["sender_id"], &response["content"]),
        (&json!("echo"), &json!("not_addressed"))
    );
    assert_eq!(stand_in.calls(), 0);

    let response = client
        .ask(&group("g2", "bob", "room", "@beta what is on today?"))
        .await;
    assert_response(&response, "g2", 0);
    assert_eq!(response["sender_id"], "beta");
    assert_eq!(stand_in.calls(), 1);
    let body = stand_in.requests()[0].json();
    assert_eq!(body["model"], "beta-model");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "[alice] morning all"},
            {"role": "user", "content": "[bob] @beta what is on today?"}
        ])
    );

    let mut to_alpha = group("g3", "carol", "room", "and you?");
    to_alpha["receiver_id"] = json!("alpha");
    let response = client.ask(&to_alpha).await;
    assert_response(&response, "g3", 0);
    assert_eq!(response["sender_id"], "alpha");
    assert_eq!(stand_in.calls(), 2);
    let body = stand_in.requests()[1].json();
    assert_eq!(body["model"], "alpha-model");
    // Beta's reply is another speaker's words to alpha.
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "[alice] morning all"},
            {"role": "user", "content": "[bob] @beta what is on today?"},
            {"role": "user", "content": "[beta] beta-model read 2 messages, the last: [bob] @beta what is on today?"},
            {"role": "user", "content": "[carol] and you?"}
        ])
    );
    gateway.stop().await;
}

#[tokio::test]
async fn rate_limits_are_retried_and_provider_errors_and_timeouts_are_answered_with_50() {
    let stand_in = StandIn::start(|request, n| {
        let body = request.json();
        match body["messages"][0]["content"].as_str().unwrap() {
            "busy" if n == 0 => Answer::Respond {
                status: 429,
                headers: vec![("Retry-After".into(), "0".into())],
                body: json!({"error": {"message": "Rate limit reached"}}).to_string(),
            },
            "bad key" => Answer::json(
                401,
                json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
            ),
            "slow" => Answer::Hang,
            _ => model(request, n),
        }
    })
    .await;
    let gateway = gateway_with(vec![openai(
        "bot",
        json!({ "base_url": stand_in.url, "model": "m", "timeout_ms": 400, "history": 0 }),
    )])
    .await;
    let mut client = gateway.connect().await;

    let response = client.ask(&to("bot", "r1", "busy")).await;
    assert_response(&response, "r1", 0);
    assert_eq!(stand_in.calls(), 2);
    assert_eq!(gateway.store.completions("r1"), 1);

    let response = client.ask(&to("bot", "r2", "bad key")).await;
    assert_response(&response, "r2", 50);
    assert_eq!(
        response["content"],
        "agent bot failed: the model's provider answered HTTP 401: Incorrect API key provided"
    );
    assert_eq!(stand_in.calls(), 3, "a 401 is not retried");

    let response = client.ask(&to("bot", "r3", "slow")).await;
    assert_response(&response, "r3", 50);
    assert_eq!(
        response["content"],
        "agent bot did not answer within 400 ms"
    );
    gateway.stop().await;
}

#[tokio::test]
async fn with_vision_an_uploaded_image_reaches_the_model_as_a_data_url() {
    let stand_in = StandIn::start(model).await;
    let gateway = gateway_with(vec![openai(
        "eyes",
        json!({ "base_url": stand_in.url, "model": "vision-model", "vision": true }),
    )])
    .await;
    let bytes = b"\x89PNG\r\n\x1a\n-a-tiny-picture";
    let path = format!("/api/v1/files?app_token={}", gateway.token);
    let (status, _, answer) = gateway
        .http("POST", &path, &[("Content-Type", "image/png")], bytes)
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).unwrap();
    let file_id = answer["file_id"].as_str().unwrap();

    let mut client = gateway.connect().await;
    let mut message = to("eyes", "v1", "");
    message["content_type"] = json!(2);
    message["content"] = json!(json!({ "file_ids": [file_id] }).to_string());
    let response = client.ask(&message).await;
    assert_response(&response, "v1", 0);
    assert_eq!(
        response["content"],
        "vision-model read 1 messages, the last: (parts)"
    );
    let body = stand_in.requests()[0].json();
    assert_eq!(
        body["messages"][0],
        json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgotYS10aW55LXBpY3R1cmU="}}
        ]})
    );
    gateway.stop().await;
}
