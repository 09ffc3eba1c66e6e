//! Hostile frames, while other connections of the same app carry normal traffic: deep nesting,
//! huge strings and arrays, truncated JSON, wrong and missing types, duplicate keys, binary
//! frames. Each is answered with 40 as `docs/protocol.md` says, nothing panics, the hostile
//! connection itself stays usable, and the others never notice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestGateway, assert_response, private};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Hostile frames, each under the 64 KiB frame limit (over it is a 1009 close, tested in
/// `limits.rs`), named for the failure messages.
fn hostile_frames() -> Vec<(&'static str, WsMessage)> {
    let valid = private("h", "mallory", "x");
    let deep_array = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let deep_object = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let mut deep_unknown = valid.clone();
    deep_unknown["junk"] = json!(0);
    let deep_unknown = deep_unknown.to_string().replace(
        "\"junk\":0",
        &format!("\"junk\":{}0{}", "[".repeat(5_000), "]".repeat(5_000)),
    );
    let mut huge_text = valid.clone();
    huge_text["content"] = json!("a".repeat(60_000));
    let mut huge_id = valid.clone();
    huge_id["msg_id"] = json!("i".repeat(50_000));
    let mut huge_array = valid.clone();
    huge_array["content"] = json!(vec![1; 20_000]);
    let mut many_file_ids = valid.clone();
    many_file_ids["content_type"] = json!(2);
    many_file_ids["content"] = json!(json!({ "file_ids": vec![""; 10_000] }).to_string());
    let mut number_as_string = valid.clone();
    number_as_string["timestamp"] = json!("1700000000000");
    let mut null_sender = valid.clone();
    null_sender["sender_id"] = json!(null);
    let text = valid.to_string();
    vec![
        ("deeply nested array", WsMessage::text(deep_array)),
        ("deeply nested object", WsMessage::text(deep_object)),
        (
            "deep nesting in an unknown field, message otherwise valid",
            WsMessage::text(deep_unknown),
        ),
        (
            "text over the limit",
            WsMessage::text(huge_text.to_string()),
        ),
        ("50 KB msg_id", WsMessage::text(huge_id.to_string())),
        (
            "content as a 20 000 element array",
            WsMessage::text(huge_array.to_string()),
        ),
        (
            "10 000 empty file ids",
            WsMessage::text(many_file_ids.to_string()),
        ),
        ("truncated JSON", WsMessage::text(&text[..text.len() / 2])),
        (
            "number as string",
            WsMessage::text(number_as_string.to_string()),
        ),
        ("null sender", WsMessage::text(null_sender.to_string())),
        (
            "duplicate keys",
            WsMessage::text(format!("{{\"msg_id\":\"a\",{}", &text[1..])),
        ),
        (
            "a BOM, a NUL and a non-character",
            WsMessage::text("\u{feff}\u{0}\u{ffff}"),
        ),
        ("binary frame", WsMessage::binary(text.into_bytes())),
        ("empty frame", WsMessage::text("")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_40s_and_nobody_else_notices() {
    let gateway = TestGateway::start().await;
    let mut bystanders = Vec::new();
    for connection in 0..2 {
        let mut client = gateway.connect().await;
        bystanders.push(tokio::spawn(async move {
            for i in 0..200 {
                let id = format!("b{connection}-{i}");
                let response = client
                    .ask(&private(&id, &format!("user{}", i % 7), "calm"))
                    .await;
                assert_response(&response, &id, 0);
            }
        }));
    }

    let mut hostile = gateway.connect().await;
    let frames = hostile_frames();
    let count = frames.len();
    for (name, frame) in frames {
        use futures_util::SinkExt;
        hostile
            .ws
            .send(frame)
            .await
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        let response = hostile.recv().await;
        if name.starts_with("deep nesting in an unknown field") {
            // Unknown fields are ignored however deep: this one is a valid message.
            assert_response(&response, "h", 0);
            continue;
        }
        assert_eq!(response["resp_code"], 40, "{name}: {response}");
        let reason = response["content"].as_str().unwrap();
        assert!(
            !reason.is_empty() && reason.len() < 600,
            "{name}: a short reason, got {} bytes",
            reason.len()
        );
    }
    // The hostile connection itself still works.
    assert_response(
        &hostile.ask(&private("after", "mallory", "ok")).await,
        "after",
        0,
    );
    for bystander in bystanders {
        bystander.await.expect("bystander traffic unaffected");
    }
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"40\"}")
            .await,
        count as u64 - 1
    );
    gateway.stop().await;
}
