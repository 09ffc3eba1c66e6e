//! The `webhook` kind through the running gateway, against a stand-in webhook on 127.0.0.1:
//! signed calls, replies, declines, deferred replies completed by a push, and every failure
//! answered with one 50 that says why (timeouts, 4xx and 5xx, malformed bodies, no connection),
//! with retries only where the webhook cannot have acted on the call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../iagent-agent/src/stand_in.rs"]
mod stand_in;

use std::time::{Duration, Instant};

use common::{TestGateway, assert_response, private};
use hmac::{Hmac, Mac};
use iagent_server::{Config, Kinds};
use iagent_store::AgentRecord;
use serde_json::{Value, json};
use sha2::Sha256;
use stand_in::{Answer, Recorded, StandIn, refusing_url};

const SECRET: &str = "whsec-test";

/// Whether a request carries `X-Iagent-Signature` valid for `secret`, checked the way a
/// webhook would: HMAC-SHA256 over `timestamp + "." + body`, compared in constant time.
fn signed_with(request: &Recorded, secret: &str) -> bool {
    let (Some(timestamp), Some(signature)) = (
        request.header("X-Iagent-Timestamp"),
        request.header("X-Iagent-Signature"),
    ) else {
        return false;
    };
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&request.body);
    bytes.is_some_and(|bytes| mac.verify_slice(&bytes).is_ok())
}

/// A webhook that refuses unsigned calls, then answers by the message's text.
fn webhook(request: &Recorded, n: usize) -> Answer {
    if !signed_with(request, SECRET) {
        return Answer::text(401, "invalid signature");
    }
    let body = request.json();
    let text = body["message"]["content"].as_str().unwrap_or_default();
    match text {
        "decline" => Answer::json(200, json!({"reply": false, "reason": "outside_hours"})),
        "nothing" => Answer::text(204, ""),
        "later" => Answer::text(202, ""),
        "hang" => Answer::Hang,
        "flaky" if n == 0 => Answer::text(503, "try again"),
        "bad request" => Answer::text(400, "{\"error\": \"unknown\nuser\"}"),
        "garbled" => Answer::text(200, "{\"content_type\": 1, \"content\""),
        _ => Answer::json(
            200,
            json!({"content_type": 1, "content": format!(
                "{} said {text:?} after {} messages",
                body["message"]["sender_id"].as_str().unwrap_or_default(),
                body["history"].as_array().map_or(0, Vec::len)
            )}),
        ),
    }
}

fn hook_record(id: &str, config: Value) -> AgentRecord {
    AgentRecord {
        id: id.into(),
        kind: "webhook".into(),
        config: config.to_string(),
    }
}

async fn gateway_with(agents: Vec<AgentRecord>) -> TestGateway {
    TestGateway::with_agents(Config::default(), Kinds::builtin(), agents).await
}

fn to(agent: &str, msg_id: &str, text: &str) -> Value {
    let mut message = private(msg_id, "alice", text);
    message["receiver_id"] = json!(agent);
    message
}

#[tokio::test]
async fn a_webhook_replies_declines_and_sees_the_conversation_in_signed_calls() {
    let stand_in = StandIn::start(webhook).await;
    let gateway = gateway_with(vec![
        hook_record("hook", json!({ "url": stand_in.url, "secret": SECRET })),
        hook_record(
            "forger",
            json!({ "url": stand_in.url, "secret": "guessed" }),
        ),
    ])
    .await;
    let mut client = gateway.connect().await;

    let response = client.ask(&to("hook", "w1", "hello")).await;
    assert_response(&response, "w1", 0);
    assert_eq!(response["content"], "alice said \"hello\" after 0 messages");
    assert_eq!(response["sender_id"], "hook");
    // The second call carries the first message and its reply as history.
    let response = client.ask(&to("hook", "w2", "again")).await;
    assert_eq!(response["content"], "alice said \"again\" after 2 messages");
    let call = stand_in.requests()[1].json();
    assert_eq!(call["agent_id"], "hook");
    assert_eq!(call["message"]["msg_id"], "w2");
    assert_eq!(call["history"][0]["msg_id"], "w1");
    assert_eq!(call["history"][1]["ref_msg_id"], "w1");
    assert_eq!(stand_in.requests()[1].header("X-Iagent-Msg-Id"), Some("w2"));

    let response = client.ask(&to("hook", "w3", "decline")).await;
    assert_response(&response, "w3", 10);
    assert_eq!(response["content"], "outside_hours");
    let response = client.ask(&to("hook", "w4", "nothing")).await;
    assert_response(&response, "w4", 10);
    assert_eq!(response["content"], "webhook_declined");

    // A call signed with another secret is refused by the webhook: a 50 with its answer.
    let response = client.ask(&to("forger", "w5", "hello")).await;
    assert_response(&response, "w5", 50);
    assert_eq!(
        response["content"],
        "agent forger failed: webhook answered HTTP 401: invalid signature"
    );
    assert!(
        stand_in
            .requests()
            .iter()
            .take(4)
            .all(|r| signed_with(r, SECRET))
    );
    assert!(!signed_with(&stand_in.requests()[4], SECRET));
    gateway.stop().await;
}

#[tokio::test]
async fn a_202_waits_for_the_pushed_reply_which_becomes_the_one_response() {
    let stand_in = StandIn::start(webhook).await;
    let gateway = gateway_with(vec![hook_record(
        "hook",
        json!({ "url": stand_in.url, "secret": SECRET }),
    )])
    .await;
    let mut client = gateway.connect().await;
    client.send(&to("hook", "d1", "later")).await;
    gateway
        .wait_for_metric("iagent_deferred{app=\"app1\"}", 1)
        .await;

    let path = format!("/api/v1/messages?app_token={}", gateway.token);
    let push = json!({ "sender_id": "hook", "ref_msg_id": "d1", "content_type": 1, "content": "done, thanks for waiting" });
    let (status, _, _) = gateway
        .http("POST", &path, &[], push.to_string().as_bytes())
        .await;
    assert_eq!(status, 200);
    let response = client.recv().await;
    assert_response(&response, "d1", 0);
    assert_eq!(response["content"], "done, thanks for waiting");
    // A resend gets the same response; the webhook is not called again.
    assert_eq!(client.ask(&to("hook", "d1", "later")).await, response);
    assert_eq!(stand_in.calls(), 1);
    assert_eq!(gateway.store.completions("d1"), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn a_webhook_that_does_not_answer_in_time_gets_50_at_its_timeout() {
    let stand_in = StandIn::start(webhook).await;
    let gateway = gateway_with(vec![hook_record(
        "hook",
        json!({ "url": stand_in.url, "secret": SECRET, "timeout_ms": 300 }),
    )])
    .await;
    let mut client = gateway.connect().await;
    let started = Instant::now();
    let response = client.ask(&to("hook", "t1", "hang")).await;
    let took = started.elapsed();
    assert_response(&response, "t1", 50);
    assert_eq!(
        response["content"],
        "agent hook did not answer within 300 ms"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // It may have acted on the call: not called again.
    assert_eq!(stand_in.calls(), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn server_errors_are_retried_but_client_errors_and_malformed_bodies_are_not() {
    let stand_in = StandIn::start(webhook).await;
    let gateway = gateway_with(vec![hook_record(
        "hook",
        json!({ "url": stand_in.url, "secret": SECRET, "retry_backoff_ms": 10 }),
    )])
    .await;
    let mut client = gateway.connect().await;

    let response = client.ask(&to("hook", "r1", "flaky")).await;
    assert_response(&response, "r1", 0);
    assert_eq!(stand_in.calls(), 2, "503, then the answer");
    let calls = stand_in.requests();
    assert_eq!(calls[0].body, calls[1].body);
    assert_eq!(calls[1].header("X-Iagent-Msg-Id"), Some("r1"));
    assert_eq!(gateway.store.completions("r1"), 1);

    let response = client.ask(&to("hook", "r2", "bad request")).await;
    assert_response(&response, "r2", 50);
    assert_eq!(
        response["content"],
        "agent hook failed: webhook answered HTTP 400: {\"error\": \"unknown user\"}"
    );
    assert_eq!(stand_in.calls(), 3, "a 4xx is not retried");

    let response = client.ask(&to("hook", "r3", "garbled")).await;
    assert_response(&response, "r3", 50);
    let cause = response["content"].as_str().unwrap();
    assert!(
        cause.starts_with(
            "agent hook failed: webhook answered 200 with a malformed response body ("
        ),
        "{cause}"
    );
    assert!(
        cause.ends_with("): {\"content_type\": 1, \"content\""),
        "{cause}"
    );
    assert_eq!(stand_in.calls(), 4, "a 2xx is not retried");
    gateway.stop().await;
}

#[tokio::test]
async fn a_webhook_that_cannot_be_reached_is_retried_then_answered_with_50() {
    let url = refusing_url().await;
    let gateway = gateway_with(vec![hook_record(
        "hook",
        json!({ "url": url, "secret": SECRET, "max_retries": 2, "retry_backoff_ms": 10 }),
    )])
    .await;
    let mut client = gateway.connect().await;
    let response = client.ask(&to("hook", "c1", "hello")).await;
    assert_response(&response, "c1", 50);
    let cause = response["content"].as_str().unwrap();
    assert!(
        cause.starts_with("agent hook failed: webhook call failed: cannot connect: "),
        "{cause}"
    );
    assert!(cause.ends_with("(after 3 attempts)"), "{cause}");
    gateway.stop().await;
}
