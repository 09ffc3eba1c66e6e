//! Validation over a real connection: every illegal frame of `protocol.md`'s Validation list
//! gets exactly one `resp_code` 40 response whose `content` names the field or rule, with the
//! response fields `protocol.md` "Responses" fixes (referring to the frame as far as it could be
//! read); the connection stays open and answers the next valid message with 0; the app's text
//! limit is configurable and counted in bytes; and an illegal frame is never recorded, so its
//! `msg_id` can be used again by a valid message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Client, TestGateway, assert_response, private};
use futures_util::SinkExt;
use iagent_server::Config;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The fields the original page marks "Optional: no".
const REQUIRED: [&str; 8] = [
    "chat_type",
    "msg_id",
    "timestamp",
    "sender_type",
    "sender_id",
    "resp_code",
    "content_type",
    "content",
];

/// The default agent of every app the harness creates.
const DEFAULT_AGENT: &str = "echo";

/// What goes on the wire.
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// One illegal frame and the 40 response it must get.
struct Case {
    name: String,
    frame: Frame,
    /// Text the response's `content` must contain: the field or rule it names.
    names: Vec<String>,
    /// The `ref_msg_id` the response must carry: the frame's `msg_id` when it was readable.
    ref_msg_id: Option<String>,
    /// The `receiver_id` the response must carry: the frame's `sender_id` when it was readable.
    receiver_id: Option<String>,
    /// The `chat_type` of the response: the frame's when readable, else 1.
    chat_type: u64,
    /// The `group_id` of the response: the frame's when a readable, non-empty string.
    group_id: Option<String>,
}

impl Case {
    /// A frame that could not be read at all: the gateway answers in its own name.
    fn unreadable(name: &str, frame: Frame, names: &[&str]) -> Self {
        Self {
            name: name.into(),
            frame,
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            ref_msg_id: None,
            receiver_id: None,
            chat_type: 1,
            group_id: None,
        }
    }

    /// A JSON object made from a valid private message from `alice` (msg_id = the case's name)
    /// changed by `edit`, whose msg_id and sender_id stay readable unless `edit` breaks them.
    fn object(name: &str, names: &[&str], edit: impl FnOnce(&mut Value)) -> Self {
        let mut message = private(name, "alice", "hello");
        edit(&mut message);
        let readable = |field: &str| {
            message
                .get(field)
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty() && id.len() <= 128)
                .map(str::to_owned)
        };
        let chat_type = match message.get("chat_type").and_then(Value::as_u64) {
            Some(2) => 2,
            _ => 1,
        };
        Self {
            name: name.into(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
            ref_msg_id: readable("msg_id"),
            receiver_id: readable("sender_id"),
            chat_type,
            group_id: readable("group_id"),
            frame: Frame::Text(message.to_string()),
        }
    }
}

/// Every illegal frame of `protocol.md`'s Validation list, with default limits.
fn cases() -> Vec<Case> {
    let mut cases = vec![
        Case::unreadable(
            "not JSON",
            Frame::Text("hello, gateway".into()),
            &["not valid JSON"],
        ),
        Case::unreadable(
            "truncated JSON object",
            Frame::Text(r#"{"chat_type": 1, "msg_id": "trunc""#.into()),
            &["not valid JSON"],
        ),
        Case::unreadable(
            "JSON array",
            Frame::Text("[1, 2, 3]".into()),
            &["JSON object"],
        ),
        Case::unreadable(
            "JSON array holding a valid message",
            Frame::Text(json!([private("in-array", "alice", "hello")]).to_string()),
            &["JSON object"],
        ),
        Case::unreadable(
            "JSON string",
            Frame::Text(r#""a message""#.into()),
            &["JSON object"],
        ),
        Case::unreadable("JSON number", Frame::Text("42".into()), &["JSON object"]),
        Case::unreadable(
            "binary frame",
            Frame::Binary(private("binary", "alice", "hello").to_string().into_bytes()),
            &["binary"],
        ),
        // A frame serde cannot read as one object: it is answered in the gateway's name.
        Case::unreadable(
            "duplicate msg_id key",
            Frame::Text(
                r#"{"chat_type":1,"msg_id":"dup-a","msg_id":"dup-b","timestamp":1,"sender_type":1,"sender_id":"alice","resp_code":0,"content_type":1,"content":"hi"}"#
                    .into(),
            ),
            &["duplicate", "msg_id"],
        ),
        Case::unreadable(
            "duplicate content key",
            Frame::Text(
                r#"{"chat_type":1,"msg_id":"dup-c","timestamp":1,"sender_type":1,"sender_id":"alice","resp_code":0,"content_type":1,"content":"hi","content":"again"}"#
                    .into(),
            ),
            &["duplicate", "content"],
        ),
    ];

    for field in REQUIRED {
        let missing = format!("missing field \"{field}\"");
        cases.push(Case::object(
            &format!("missing-{field}"),
            &[&missing],
            |m| {
                m.as_object_mut().unwrap().remove(field);
            },
        ));
        let null = format!("field \"{field}\" must not be null");
        cases.push(Case::object(&format!("null-{field}"), &[&null], |m| {
            m[field] = Value::Null;
        }));
    }

    cases.extend([
        Case::object(
            "chat_type-as-string",
            &["chat_type must be a number, got a string"],
            |m| m["chat_type"] = json!("1"),
        ),
        Case::object(
            "timestamp-as-string",
            &["timestamp must be a number, got a string"],
            |m| m["timestamp"] = json!("1700000000000"),
        ),
        Case::object(
            "content_type-as-string",
            &["content_type must be a number, got a string"],
            |m| m["content_type"] = json!("1"),
        ),
        Case::object("msg_id-as-number", &["msg_id must be a string"], |m| {
            m["msg_id"] = json!(7)
        }),
        Case::object("content-as-object", &["content must be a string"], |m| {
            m["content"] = json!({"text": "hi"})
        }),
        Case::object("chat_type-3", &["chat_type must be 1 or 2, got 3"], |m| {
            m["chat_type"] = json!(3)
        }),
        Case::object(
            "sender_type-0",
            &["sender_type must be 1 or 2, got 0"],
            |m| m["sender_type"] = json!(0),
        ),
        Case::object(
            "content_type-5",
            &["content_type must be 1, 2, 3 or 4, got 5"],
            |m| m["content_type"] = json!(5),
        ),
        Case::object("resp_code-10", &["resp_code", "got 10"], |m| {
            m["resp_code"] = json!(10)
        }),
        Case::object("resp_code-40", &["resp_code", "got 40"], |m| {
            m["resp_code"] = json!(40)
        }),
        Case::object("empty-msg_id", &["msg_id must not be empty"], |m| {
            m["msg_id"] = json!("")
        }),
        Case::object("long-msg_id", &["msg_id is 129 bytes", "128"], |m| {
            m["msg_id"] = json!("m".repeat(129))
        }),
        Case::object("empty-sender_id", &["sender_id must not be empty"], |m| {
            m["sender_id"] = json!("")
        }),
        Case::object("long-sender_id", &["sender_id is 129 bytes", "128"], |m| {
            m["sender_id"] = json!("s".repeat(129))
        }),
        Case::object("negative-timestamp", &["timestamp", "got -1"], |m| {
            m["timestamp"] = json!(-1)
        }),
        Case::object("group-without-group_id", &["group_id"], |m| {
            m["chat_type"] = json!(2)
        }),
        Case::object("group-with-empty-group_id", &["group_id"], |m| {
            m["chat_type"] = json!(2);
            m["group_id"] = json!("");
        }),
        Case::object("group-with-null-group_id", &["group_id"], |m| {
            m["chat_type"] = json!(2);
            m["group_id"] = Value::Null;
        }),
        Case::object("empty-text", &["content must not be empty"], |m| {
            m["content"] = json!("")
        }),
        Case::object(
            "text-over-limit",
            &["content is 16385 bytes", "16384"],
            |m| m["content"] = json!("t".repeat(16_385)),
        ),
        Case::object(
            "unknown-receiver",
            &["receiver_id \"nobody\" is not an agent of this app"],
            |m| m["receiver_id"] = json!("nobody"),
        ),
    ]);

    for content_type in [2, 3, 4] {
        for (what, content, rule) in [
            ("not-json", "001", "not a JSON object"),
            ("array", r#"[["001"]]"#, "not a JSON object"),
            ("no-file_ids", r#"{"ids":["001"]}"#, "file_ids"),
            ("empty-list", r#"{"file_ids":[]}"#, "the list is empty"),
            ("empty-id", r#"{"file_ids":["001",""]}"#, "an id is empty"),
        ] {
            cases.push(Case::object(
                &format!("media-{content_type}-{what}"),
                &["file_ids", rule],
                |m| {
                    m["content_type"] = json!(content_type);
                    m["content"] = json!(content);
                },
            ));
        }
    }
    cases
}

/// Asserts `response` is the 40 that `case` must get.
#[track_caller]
fn assert_rejection(response: &Value, case: &Case) {
    let name = &case.name;
    assert_eq!(response["resp_code"], 40, "{name}: {response}");
    let content = response["content"].as_str().expect("content is text");
    for needle in &case.names {
        assert!(
            content.contains(needle.as_str()),
            "{name}: content should name {needle:?}: {response}"
        );
    }
    assert_eq!(response["content_type"], 1, "{name}: {response}");
    assert_eq!(response["sender_type"], 2, "{name}: {response}");
    assert_eq!(response["chat_type"], case.chat_type, "{name}: {response}");
    assert_eq!(
        response.get("ref_msg_id").and_then(Value::as_str),
        case.ref_msg_id.as_deref(),
        "{name}: ref_msg_id: {response}"
    );
    assert_eq!(
        response.get("receiver_id").and_then(Value::as_str),
        case.receiver_id.as_deref(),
        "{name}: receiver_id: {response}"
    );
    assert_eq!(
        response.get("group_id").and_then(Value::as_str),
        case.group_id.as_deref(),
        "{name}: group_id: {response}"
    );
    // A frame with a readable msg_id is answered by the agent it would have gone to; one
    // without, by the gateway itself.
    let signer = if case.ref_msg_id.is_some() {
        DEFAULT_AGENT
    } else {
        "iagent"
    };
    assert_eq!(response["sender_id"], signer, "{name}: {response}");
    let msg_id = response["msg_id"].as_str().expect("msg_id is text");
    assert!(!msg_id.is_empty(), "{name}: {response}");
    assert_ne!(
        Some(msg_id),
        case.ref_msg_id.as_deref(),
        "{name}: the response needs its own msg_id"
    );
    assert!(
        response["timestamp"].as_i64().unwrap() > 1_700_000_000_000,
        "{name}: the gateway's clock: {response}"
    );
}

/// Sends a valid message and asserts it is answered with 0: the connection is still open and
/// nothing else (a second response to the illegal frame) is waiting ahead of it.
async fn assert_still_serving(client: &mut Client, msg_id: &str, after: &str) {
    let response = client.ask(&private(msg_id, "bob", msg_id)).await;
    assert_eq!(
        response["ref_msg_id"], msg_id,
        "after {after}: expected the answer to the valid message: {response}"
    );
    assert_eq!(response["resp_code"], 0, "after {after}: {response}");
    assert_eq!(response["content"], msg_id, "after {after}: {response}");
}

#[tokio::test]
async fn every_illegal_frame_gets_one_40_naming_its_rule_and_the_connection_stays_open() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        match &case.frame {
            Frame::Text(text) => client.send_text(text).await,
            Frame::Binary(bytes) => client
                .ws
                .send(WsMessage::binary(bytes.clone()))
                .await
                .expect("frame sent"),
        }
        let response = client.recv().await;
        assert_rejection(&response, case);
        assert_still_serving(&mut client, &format!("valid-{i}"), &case.name).await;
    }

    let illegal = cases.len() as u64;
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"40\"}")
            .await,
        illegal,
        "one 40 per illegal frame"
    );
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"0\"}")
            .await,
        illegal
    );
    assert_eq!(
        gateway.metric("iagent_connections{app=\"app1\"}").await,
        1,
        "no illegal frame closed the connection"
    );
    // Illegal frames never reach an agent.
    for case in &cases {
        if let Some(msg_id) = &case.ref_msg_id {
            assert_eq!(gateway.store.completions(msg_id), 0, "{}", case.name);
        }
    }
    gateway.stop().await;
}

#[tokio::test]
async fn the_limits_of_a_valid_message_are_inclusive() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;

    // 128-byte ids and a text of exactly the default limit are legal.
    let long_id = "i".repeat(128);
    let mut message = private(&long_id, &"u".repeat(128), &"t".repeat(16_384));
    message["timestamp"] = json!(0);
    let response = client.ask(&message).await;
    assert_response(&response, &long_id, 0);
    assert_eq!(response["receiver_id"], "u".repeat(128));
    assert_eq!(response["content"].as_str().unwrap().len(), 16_384);

    // In a group, a receiver_id that names no agent is legal: it may be any member.
    let mut group = common::group("g-ok", "alice", "room", "hello");
    group["receiver_id"] = json!("nobody");
    assert_response(&client.ask(&group).await, "g-ok", 10);

    // Unknown extra fields are ignored.
    let mut extra = private("extra", "alice", "with extras");
    extra["future_field"] = json!({"anything": [1, 2]});
    assert_response(&client.ask(&extra).await, "extra", 0);
    gateway.stop().await;
}

#[tokio::test]
async fn the_text_limit_is_the_apps_configured_limit_counted_in_bytes() {
    let mut config = Config::default();
    config.limits.max_text_bytes = 10;
    let gateway = TestGateway::with_config(config).await;
    let mut client = gateway.connect().await;

    assert_response(
        &client.ask(&private("ten", "alice", "0123456789")).await,
        "ten",
        0,
    );
    let response = client.ask(&private("eleven", "alice", "0123456789X")).await;
    assert_response(&response, "eleven", 40);
    let content = response["content"].as_str().unwrap();
    assert!(
        content.contains("content is 11 bytes") && content.contains("limit of 10 bytes"),
        "{response}"
    );
    assert_eq!(response["receiver_id"], "alice");

    // Bytes, not characters: five two-byte characters fit, six do not.
    assert_response(
        &client.ask(&private("five-e", "alice", "ééééé")).await,
        "five-e",
        0,
    );
    let response = client.ask(&private("six-e", "alice", "éééééé")).await;
    assert_response(&response, "six-e", 40);
    assert!(
        response["content"]
            .as_str()
            .unwrap()
            .contains("content is 12 bytes"),
        "{response}"
    );

    // The connection is still open.
    assert_response(
        &client.ask(&private("after", "bob", "ok")).await,
        "after",
        0,
    );
    assert_eq!(
        gateway
            .metric("iagent_responses_total{app=\"app1\",resp_code=\"40\"}")
            .await,
        2
    );
    gateway.stop().await;
}

#[tokio::test]
async fn an_illegal_frame_is_not_recorded_so_its_msg_id_stays_free() {
    let gateway = TestGateway::start().await;
    let mut client = gateway.connect().await;

    let mut illegal = private("x", "alice", "first try");
    illegal["content_type"] = json!(9);
    let response = client.ask(&illegal).await;
    assert_response(&response, "x", 40);
    assert!(
        response["content"]
            .as_str()
            .unwrap()
            .contains("content_type"),
        "{response}"
    );

    // The same msg_id, now valid: processed as new, not answered as a duplicate of the 40.
    let response = client.ask(&private("x", "alice", "second try")).await;
    assert_response(&response, "x", 0);
    assert_eq!(response["content"], "second try");
    assert_eq!(gateway.store.completions("x"), 1);
    assert_eq!(
        gateway
            .metric("iagent_duplicates_total{app=\"app1\"}")
            .await,
        0
    );

    // Resent once more: now it is a duplicate, and gets the stored 0 again.
    let again = client.ask(&private("x", "alice", "second try")).await;
    assert_eq!(again, response);
    assert_eq!(gateway.store.completions("x"), 1);

    // An unknown receiver is an illegal message too: not recorded either.
    let mut to_nobody = private("y", "alice", "to nobody");
    to_nobody["receiver_id"] = json!("nobody");
    assert_response(&client.ask(&to_nobody).await, "y", 40);
    let response = client.ask(&private("y", "alice", "to echo")).await;
    assert_response(&response, "y", 0);
    assert_eq!(response["content"], "to echo");
    gateway.stop().await;
}
