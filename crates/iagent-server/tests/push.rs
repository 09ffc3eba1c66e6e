//! Messages an agent starts (`POST /api/v1/messages`): delivered over the app's pool with the
//! shape `docs/protocol.md` gives them (resp_code 0, no ref_msg_id), into the outbox when no
//! connection is open, validated like any message, and refused with a reason otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::TestGateway;
use serde_json::{Value, json};

async fn push(gateway: &TestGateway, token: &str, body: &Value) -> (u16, Value) {
    let path = format!("/api/v1/messages?app_token={token}");
    let (status, _, answer) = gateway
        .http(
            "POST",
            &path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .await;
    (
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_pushed_message_reaches_the_pool_as_a_message_nobody_asked_for() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    let body = json!({ "sender_id": "echo", "receiver_id": "alice", "content_type": 1, "content": "good morning" });
    let (status, answer) = push(&gateway, &gateway.token, &body).await;
    assert_eq!(status, 200, "{answer}");
    let message = client.recv().await;
    assert_eq!(message["msg_id"], answer["msg_id"]);
    assert_eq!(message["resp_code"], 0);
    assert!(message.get("ref_msg_id").is_none(), "{message}");
    assert_eq!(message["sender_type"], 2);
    assert_eq!(message["sender_id"], "echo");
    assert_eq!(message["receiver_id"], "alice");
    assert_eq!(message["chat_type"], 1);
    assert_eq!(message["content"], "good morning");

    let group = json!({ "sender_id": "echo", "group_id": "room", "content_type": 1, "content": "hello room" });
    let (status, _) = push(&gateway, &gateway.token, &group).await;
    assert_eq!(status, 200);
    let message = client.recv().await;
    assert_eq!(
        (message["chat_type"].clone(), message["group_id"].clone()),
        (json!(2), json!("room"))
    );
    assert_eq!(gateway.metric("iagent_pushed_total{app=\"app1\"}").await, 2);
    gateway.stop().await;
}

#[tokio::test]
async fn with_no_connection_open_a_push_waits_in_the_outbox() {
    let gateway = TestGateway::start().await;
    let body = json!({ "sender_id": "echo", "receiver_id": "alice", "content_type": 1, "content": "while you were away" });
    let (status, answer) = push(&gateway, &gateway.token, &body).await;
    assert_eq!(status, 200);
    gateway
        .wait_for_metric("iagent_outbox_depth{app=\"app1\"}", 1)
        .await;
    let mut client = gateway.connect().await;
    let message = client.recv().await;
    assert_eq!(message["msg_id"], answer["msg_id"]);
    assert_eq!(message["content"], "while you were away");
    gateway.stop().await;
}

#[tokio::test]
async fn pushes_are_validated_and_refused_with_a_reason() {
    let gateway = TestGateway::start().await;
    let other = gateway.create_app("app2").await;
    let base =
        json!({ "sender_id": "echo", "receiver_id": "alice", "content_type": 1, "content": "x" });
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let cases = [
        (
            with("sender_id", json!("nobody")),
            400,
            "sender_id \"nobody\" is not an agent of this app",
        ),
        (with("content", json!("")), 400, "content must not be empty"),
        (with("content_type", json!(2)), 400, "file_ids"),
        (with("content_type", json!(9)), 400, "invalid message"),
        (with("sender_type", json!(1)), 400, "sender_type must be 2"),
        (
            with("receiver_id", json!(null)),
            400,
            "needs the user as receiver_id",
        ),
        (with("chat_type", json!(2)), 400, "group_id"),
        (with("msg_id", json!("mine")), 400, "unknown field `msg_id`"),
        (
            with("ref_msg_id", json!("m1")),
            404,
            "no message awaiting a pushed reply",
        ),
    ];
    for (body, status, reason) in cases {
        let (got, answer) = push(&gateway, &gateway.token, &body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(reason),
            "{body}: {answer}"
        );
    }
    // A file of another app is not this app's.
    let (_, _, uploaded) = gateway
        .http(
            "POST",
            &format!("/api/v1/files?app_token={other}"),
            &[("Content-Type", "image/png")],
            b"png",
        )
        .await;
    let foreign: Value = serde_json::from_slice(&uploaded).unwrap();
    let content = json!({ "file_ids": [foreign["file_id"]] }).to_string();
    let mut media = with("content_type", json!(2));
    media["content"] = json!(content);
    let (got, answer) = push(&gateway, &gateway.token, &media).await;
    assert_eq!(got, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("is not a file of this app")
    );

    assert_eq!(push(&gateway, "iat_wrong", &base).await.0, 401);
    let (got, _, _) = gateway.http("POST", "/api/v1/messages", &[], b"{}").await;
    assert_eq!(got, 401);
    assert_eq!(gateway.metric("iagent_pushed_total{app=\"app1\"}").await, 0);
    gateway.stop().await;
}
