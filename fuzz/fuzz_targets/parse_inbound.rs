//! Fuzzes `parse_inbound`, the parser of every text frame a backend sends, with the default
//! limits and with a tiny text limit, and checks what must hold of its answer:
//!
//! - it never panics;
//! - its one-pass reader of a frame's fields reads what serde_json reads, or leaves the frame
//!   to it;
//! - an accepted message obeys the rules, and its `to_json()` is accepted again as an equal
//!   message (what the gateway stores or forwards reads back the same);
//! - a rejection's 40 response serializes, reads back as the same message, and refers only to
//!   ids that are themselves valid.
//!
//! Non-UTF-8 input is skipped: the WebSocket layer closes such a frame with 1007 before it
//! reaches the parser.

#![no_main]

use iagent_protocol::validate::{one_pass_agrees, parse_file_ids};
use iagent_protocol::{
    ChatType, ContentType, Limits, MAX_ID_BYTES, Message, RespCode, ResponseMeta, parse_inbound,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        one_pass_agrees(frame),
        "the one-pass reader and serde_json disagree on {frame:?}"
    );
    let default = check(frame, &Limits::default());
    let tiny = check(frame, &Limits { max_text_bytes: 8 });
    // A smaller limit can only turn an accepted message into a rejected one, never change it.
    if let Some(message) = tiny {
        assert_eq!(
            default.as_ref(),
            Some(&message),
            "tiny limit accepts what default does not"
        );
    }
});

/// Parses `frame` with `limits`, asserts the properties of the outcome, and returns the
/// accepted message, if any.
fn check(frame: &str, limits: &Limits) -> Option<Message> {
    match parse_inbound(frame, limits) {
        Ok(message) => {
            check_valid(&message, limits);
            let json = message.to_json();
            match parse_inbound(&json, limits) {
                Ok(again) => assert_eq!(again, message, "to_json() re-parses differently: {json}"),
                Err(rejection) => panic!(
                    "to_json() of an accepted message is rejected ({}): {json}",
                    rejection.violation
                ),
            }
            Some(message)
        }
        Err(rejection) => {
            for (field, id) in [
                ("msg_id", &rejection.msg_id),
                ("sender_id", &rejection.sender_id),
                ("group_id", &rejection.group_id),
            ] {
                if let Some(id) = id {
                    assert_valid_id(field, id);
                }
            }
            let meta = ResponseMeta {
                msg_id: "fuzz-response-id".to_owned(),
                timestamp: 1_700_000_000_000,
            };
            let response = rejection.response(meta, None);
            assert_eq!(response.resp_code, RespCode::Illegal);
            assert_eq!(response.ref_msg_id, rejection.msg_id);
            assert!(!response.content.is_empty(), "rejection without a reason");
            let json = response.to_json();
            let back: Message = serde_json::from_str(&json)
                .unwrap_or_else(|err| panic!("40 response does not read back ({err}): {json}"));
            assert_eq!(back, response, "40 response reads back differently: {json}");
            None
        }
    }
}

/// The rules of `docs/protocol.md` that an accepted message must satisfy.
fn check_valid(message: &Message, limits: &Limits) {
    assert_valid_id("msg_id", &message.msg_id);
    assert_valid_id("sender_id", &message.sender_id);
    assert_eq!(message.resp_code, RespCode::Ok);
    assert!(message.timestamp >= 0, "negative timestamp accepted");
    for (field, id) in [
        ("group_id", &message.group_id),
        ("receiver_id", &message.receiver_id),
    ] {
        if let Some(id) = id {
            assert!(
                id.len() <= MAX_ID_BYTES,
                "{field} of {} bytes accepted",
                id.len()
            );
        }
    }
    if message.chat_type == ChatType::Group {
        assert!(
            message.group_id.as_deref().is_some_and(|g| !g.is_empty()),
            "group message without group_id accepted"
        );
    }
    if message.content_type != ContentType::Text {
        assert!(
            parse_file_ids(&message.content).is_ok(),
            "media content without valid file_ids accepted"
        );
    }
    if message.content_type == ContentType::Text {
        assert!(!message.content.is_empty(), "empty text accepted");
        assert!(
            message.content.len() <= limits.max_text_bytes,
            "text of {} bytes accepted with a limit of {}",
            message.content.len(),
            limits.max_text_bytes
        );
    }
}

fn assert_valid_id(field: &str, id: &str) {
    assert!(!id.is_empty(), "empty {field} accepted or carried");
    assert!(
        id.len() <= MAX_ID_BYTES,
        "{field} of {} bytes accepted or carried",
        id.len()
    );
}
