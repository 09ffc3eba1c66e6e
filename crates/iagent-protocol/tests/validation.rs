//! Proves each validation rule of `docs/protocol.md` ("Validation (resp_code 40)") one by one:
//! `parse_inbound` rejects the frame with the exact [`Violation`] (and, where it matters, the exact
//! reason text), the [`Rejection`] keeps what could be read of the frame so its 40 response still
//! refers to the message, and responses are shaped as the "Responses" section says.
#![allow(clippy::unwrap_used)]

use iagent_protocol::{
    ChatType, ContentType, GATEWAY_SENDER_ID, Limits, MAX_ID_BYTES, Message, Rejection, RespCode,
    ResponseMeta, SenderType, Violation, parse_inbound,
};
use serde_json::{Map, Value, json};

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

/// The numeric fields (all required).
const NUMBERS: [&str; 5] = [
    "chat_type",
    "timestamp",
    "sender_type",
    "resp_code",
    "content_type",
];

/// The string fields, required and optional.
const STRINGS: [&str; 6] = [
    "msg_id",
    "sender_id",
    "content",
    "ref_msg_id",
    "group_id",
    "receiver_id",
];

/// A valid private text message, as a JSON object.
fn base() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "chat_type": 1,
        "msg_id": "m-1",
        "timestamp": 1_700_000_000_000_i64,
        "sender_type": 1,
        "sender_id": "user-7",
        "resp_code": 0,
        "content_type": 1,
        "content": "hello",
    }) else {
        unreachable!("a json! object literal is an object")
    };
    map
}

/// The message `base()` parses to.
fn base_message() -> Message {
    Message {
        chat_type: ChatType::Private,
        msg_id: "m-1".into(),
        ref_msg_id: None,
        timestamp: 1_700_000_000_000,
        group_id: None,
        sender_type: SenderType::User,
        sender_id: "user-7".into(),
        receiver_id: None,
        resp_code: RespCode::Ok,
        content_type: ContentType::Text,
        content: "hello".into(),
    }
}

/// `base()` with `edit` applied, as frame text.
fn frame(edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut map = base();
    edit(&mut map);
    Value::Object(map).to_string()
}

/// `base()` with `field` set to `value`, as frame text.
fn with(field: &str, value: Value) -> String {
    frame(|m| {
        m.insert(field.into(), value);
    })
}

#[track_caller]
fn rejected(frame: &str) -> Rejection {
    match parse_inbound(frame, &Limits::default()) {
        Ok(message) => panic!("frame {frame:?} was accepted as {message:?}"),
        Err(rejection) => rejection,
    }
}

#[track_caller]
fn violation(frame: &str) -> Violation {
    rejected(frame).violation
}

#[track_caller]
fn accepted(frame: &str) -> Message {
    match parse_inbound(frame, &Limits::default()) {
        Ok(message) => message,
        Err(rejection) => panic!("frame {frame:?} was rejected: {}", rejection.violation),
    }
}

fn meta() -> ResponseMeta {
    ResponseMeta {
        msg_id: "gw-1".into(),
        timestamp: 42,
    }
}

#[test]
fn the_base_frame_is_valid() {
    assert_eq!(accepted(&frame(|_| {})), base_message());
}

#[test]
fn not_json_is_rejected() {
    for text in [
        "",
        "   ",
        "hello",
        "{",
        "{\"chat_type\":}",
        "{'msg_id':'a'}",
        "[1,",
        "{} x",
    ] {
        let v = violation(text);
        assert!(matches!(v, Violation::NotJson(_)), "{text:?} gave {v:?}");
        assert!(
            v.to_string().starts_with("frame is not valid JSON: "),
            "{v}"
        );
    }
}

#[test]
fn json_that_is_not_an_object_is_rejected() {
    for text in [
        "[]",
        " [ ] ",
        "[{}]",
        "\"a string\"",
        "42",
        "-1.5",
        "true",
        "null",
    ] {
        assert_eq!(violation(text), Violation::NotObject, "{text:?}");
    }
    assert_eq!(
        Violation::NotObject.to_string(),
        "frame must be a JSON object"
    );
}

/// Regression: serde's derived struct deserializer also reads a JSON array as the struct's
/// fields in declaration order, so this array used to be accepted as a valid message.
#[test]
fn an_array_holding_the_fields_in_order_is_not_a_message() {
    let fields = r#"[1,"m",null,0,null,1,"s",null,0,1,"hi"]"#;
    let rejection = rejected(fields);
    assert_eq!(rejection, Rejection::unreadable(Violation::NotObject));
    // With one element too many it is still "not an object", not "not JSON".
    assert_eq!(
        violation(r#"[1,"m",null,0,null,1,"s",null,0,1,"hi",5]"#),
        Violation::NotObject
    );
}

#[test]
fn each_required_field_missing_is_rejected() {
    for field in REQUIRED {
        let text = frame(|m| {
            m.remove(field);
        });
        assert_eq!(violation(&text), Violation::Missing(field), "{field}");
    }
    let text = frame(|m| {
        m.remove("msg_id");
    });
    assert_eq!(violation(&text).to_string(), r#"missing field "msg_id""#);
}

#[test]
fn each_required_field_null_is_rejected() {
    for field in REQUIRED {
        assert_eq!(
            violation(&with(field, Value::Null)),
            Violation::Null(field),
            "{field}"
        );
    }
    assert_eq!(
        violation(&with("resp_code", Value::Null)).to_string(),
        r#"field "resp_code" must not be null"#
    );
}

#[test]
fn a_number_field_given_as_a_string_is_rejected() {
    for field in NUMBERS {
        assert_eq!(
            violation(&with(field, json!("1"))),
            Violation::WrongType {
                field,
                expected: "a number",
                got: "a string"
            },
            "{field}"
        );
    }
    assert_eq!(
        violation(&with("chat_type", json!("1"))).to_string(),
        "chat_type must be a number, got a string"
    );
}

#[test]
fn a_string_field_given_as_a_number_is_rejected() {
    for field in STRINGS {
        assert_eq!(
            violation(&with(field, json!(7))),
            Violation::WrongType {
                field,
                expected: "a string",
                got: "a number"
            },
            "{field}"
        );
    }
}

#[test]
fn booleans_arrays_and_objects_are_the_wrong_type_everywhere() {
    let wrong = [
        (json!(true), "a boolean"),
        (json!(false), "a boolean"),
        (json!([1]), "an array"),
        (json!({"a": 1}), "an object"),
    ];
    for (value, got) in wrong {
        for field in NUMBERS {
            assert_eq!(
                violation(&with(field, value.clone())),
                Violation::WrongType {
                    field,
                    expected: "a number",
                    got
                },
                "{field} = {value}"
            );
        }
        for field in STRINGS {
            assert_eq!(
                violation(&with(field, value.clone())),
                Violation::WrongType {
                    field,
                    expected: "a string",
                    got
                },
                "{field} = {value}"
            );
        }
    }
}

#[test]
fn chat_type_must_be_1_or_2() {
    let v = violation(&with("chat_type", json!(3)));
    assert_eq!(
        v,
        Violation::NotAllowed {
            field: "chat_type",
            allowed: "1 or 2",
            got: "3".into()
        }
    );
    assert_eq!(v.to_string(), "chat_type must be 1 or 2, got 3");
    for (value, got) in [(json!(0), "0"), (json!(-1), "-1"), (json!(1.0), "1.0")] {
        assert_eq!(
            violation(&with("chat_type", value)),
            Violation::NotAllowed {
                field: "chat_type",
                allowed: "1 or 2",
                got: got.into()
            }
        );
    }
    // A number that is 1 written as a fraction or exponent is not the integer 1.
    let text = frame(|_| {}).replace(r#""chat_type":1"#, r#""chat_type":1e0"#);
    assert!(matches!(
        violation(&text),
        Violation::NotAllowed {
            field: "chat_type",
            ..
        }
    ));
}

#[test]
fn sender_type_must_be_1_or_2() {
    for (value, got) in [(0, "0"), (3, "3"), (-2, "-2"), (256, "256")] {
        assert_eq!(
            violation(&with("sender_type", json!(value))),
            Violation::NotAllowed {
                field: "sender_type",
                allowed: "1 or 2",
                got: got.into()
            }
        );
    }
    let mut agent = base_message();
    agent.sender_type = SenderType::Agent;
    assert_eq!(accepted(&with("sender_type", json!(2))), agent);
}

#[test]
fn content_type_must_be_1_to_4() {
    let v = violation(&with("content_type", json!(5)));
    assert_eq!(
        v,
        Violation::NotAllowed {
            field: "content_type",
            allowed: "1, 2, 3 or 4",
            got: "5".into()
        }
    );
    assert_eq!(v.to_string(), "content_type must be 1, 2, 3 or 4, got 5");
    assert!(matches!(
        violation(&with("content_type", json!(0))),
        Violation::NotAllowed {
            field: "content_type",
            ..
        }
    ));
}

#[test]
fn inbound_resp_code_must_be_0() {
    for code in [10, 40, 50, 1, -1] {
        assert_eq!(
            violation(&with("resp_code", json!(code))),
            Violation::NotAllowed {
                field: "resp_code",
                allowed: "0",
                got: code.to_string()
            },
            "{code}"
        );
    }
    assert_eq!(
        violation(&with("resp_code", json!(10))).to_string(),
        "resp_code must be 0, got 10"
    );
}

#[test]
fn msg_id_and_sender_id_must_be_non_empty_and_at_most_128_bytes() {
    for field in ["msg_id", "sender_id"] {
        assert_eq!(violation(&with(field, json!(""))), Violation::Empty(field));
        let long = "a".repeat(MAX_ID_BYTES + 1);
        assert_eq!(
            violation(&with(field, json!(long))),
            Violation::TooLong {
                field,
                max: MAX_ID_BYTES,
                len: MAX_ID_BYTES + 1
            }
        );
        // The limit is in bytes, not characters: 43 three-byte characters are 129 bytes.
        let wide = "€".repeat(43);
        assert_eq!(
            violation(&with(field, json!(wide))),
            Violation::TooLong {
                field,
                max: MAX_ID_BYTES,
                len: 129
            }
        );
        let exact = "b".repeat(MAX_ID_BYTES);
        let message = accepted(&with(field, json!(exact)));
        let got = if field == "msg_id" {
            &message.msg_id
        } else {
            &message.sender_id
        };
        assert_eq!(got, &exact);
        let exact_wide = "é".repeat(MAX_ID_BYTES / 2);
        accepted(&with(field, json!(exact_wide)));
    }
    assert_eq!(
        violation(&with("msg_id", json!(""))).to_string(),
        "msg_id must not be empty"
    );
    assert_eq!(MAX_ID_BYTES, 128);
}

#[test]
fn group_id_and_receiver_id_must_be_at_most_128_bytes() {
    for field in ["group_id", "receiver_id"] {
        assert_eq!(
            violation(&with(field, json!("g".repeat(MAX_ID_BYTES + 1)))),
            Violation::TooLong {
                field,
                max: MAX_ID_BYTES,
                len: MAX_ID_BYTES + 1
            },
            "{field}"
        );
        let exact = "g".repeat(MAX_ID_BYTES);
        let message = accepted(&with(field, json!(exact)));
        let got = if field == "group_id" {
            message.group_id
        } else {
            message.receiver_id
        };
        assert_eq!(got, Some(exact));
    }
    assert_eq!(
        violation(&with("receiver_id", json!("r".repeat(200)))).to_string(),
        "receiver_id is 200 bytes, longer than the limit of 128 bytes"
    );
}

#[test]
fn timestamp_must_be_a_non_negative_whole_number() {
    for (value, got) in [
        (json!(-1), "-1"),
        (json!(i64::MIN), "-9223372036854775808"),
        (json!(1.5), "1.5"),
        (json!(1_700_000_000_000.0_f64), "1700000000000.0"),
        (json!(u64::MAX), "18446744073709551615"),
    ] {
        assert_eq!(
            violation(&with("timestamp", value)),
            Violation::BadTimestamp(got.into()),
            "{got}"
        );
    }
    assert_eq!(
        violation(&with("timestamp", json!(-1))).to_string(),
        "timestamp must be a non-negative whole number of milliseconds, got -1"
    );
    assert_eq!(accepted(&with("timestamp", json!(0))).timestamp, 0);
    assert_eq!(
        accepted(&with("timestamp", json!(i64::MAX))).timestamp,
        i64::MAX
    );
}

#[test]
fn group_chat_requires_a_non_empty_group_id() {
    let no_group = with("chat_type", json!(2));
    assert_eq!(violation(&no_group), Violation::GroupWithoutGroupId);
    assert_eq!(
        Violation::GroupWithoutGroupId.to_string(),
        "chat_type 2 (group) requires a non-empty group_id"
    );
    let empty = frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!(""));
    });
    assert_eq!(violation(&empty), Violation::GroupWithoutGroupId);
    let null = frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), Value::Null);
    });
    assert_eq!(violation(&null), Violation::GroupWithoutGroupId);

    let good = frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!("g-1"));
    });
    let message = accepted(&good);
    assert_eq!(message.chat_type, ChatType::Group);
    assert_eq!(message.group_id.as_deref(), Some("g-1"));
}

#[test]
fn text_content_must_be_non_empty() {
    assert_eq!(
        violation(&with("content", json!(""))),
        Violation::Empty("content")
    );
}

#[test]
fn text_content_is_limited_to_16_kib_by_default() {
    let max = Limits::DEFAULT_MAX_TEXT_BYTES;
    assert_eq!(max, 16 * 1024);
    assert_eq!(Limits::default().max_text_bytes, max);

    let exact = "x".repeat(max);
    assert_eq!(accepted(&with("content", json!(exact))).content, exact);
    assert_eq!(
        violation(&with("content", json!("x".repeat(max + 1)))),
        Violation::TooLong {
            field: "content",
            max,
            len: max + 1
        }
    );
    // The limit applies to the decoded text, not to its escaped JSON form: 16 KiB of newlines
    // are 32 KiB of `\n` on the wire, and still within the limit.
    let newlines = "\n".repeat(max);
    let text = with("content", json!(newlines));
    assert!(text.len() > 2 * max);
    assert_eq!(accepted(&text).content, newlines);
}

#[test]
fn text_content_limit_follows_custom_limits() {
    let limits = Limits { max_text_bytes: 10 };
    let ten = with("content", json!("0123456789"));
    assert_eq!(parse_inbound(&ten, &limits).unwrap().content, "0123456789");
    let eleven = with("content", json!("0123456789a"));
    assert_eq!(
        parse_inbound(&eleven, &limits).unwrap_err().violation,
        Violation::TooLong {
            field: "content",
            max: 10,
            len: 11
        }
    );
    // Bytes, not characters: four two-byte characters are 8 bytes, six are 12.
    assert!(parse_inbound(&with("content", json!("éééé")), &limits).is_ok());
    assert_eq!(
        parse_inbound(&with("content", json!("éééééé")), &limits)
            .unwrap_err()
            .violation,
        Violation::TooLong {
            field: "content",
            max: 10,
            len: 12
        }
    );
    // The same eleven bytes are fine under the default limit.
    assert!(parse_inbound(&eleven, &Limits::default()).is_ok());
    assert_eq!(
        parse_inbound(&eleven, &limits)
            .unwrap_err()
            .violation
            .to_string(),
        "content is 11 bytes, longer than the limit of 10 bytes"
    );
}

#[test]
fn media_content_must_be_file_ids_json() {
    for content_type in [2, 3, 4] {
        let media = |content: &str| {
            frame(|m| {
                m.insert("content_type".into(), json!(content_type));
                m.insert("content".into(), json!(content));
            })
        };
        for bad in [
            "not json",
            "",
            r#"{"file_ids":[]}"#,
            r#"{"file_ids":[""]}"#,
            r#"{"file_ids":["a",""]}"#,
            r#"{"file_ids":"x"}"#,
            r#"{"file_ids":[1]}"#,
            r#"{"file_ids":null}"#,
            r#"{"ids":["a"]}"#,
            r#"{}"#,
            r#"["a"]"#,
            // An array holding the list: a derived deserializer would read it as the struct.
            r#"[["a"]]"#,
        ] {
            let v = violation(&media(bad));
            assert!(
                matches!(v, Violation::BadFileIds(_)),
                "{content_type} {bad:?}: {v:?}"
            );
        }
        assert_eq!(
            violation(&media(r#"{"file_ids":[]}"#)),
            Violation::BadFileIds("the list is empty".into())
        );
        assert_eq!(
            violation(&media(r#"{"file_ids":[""]}"#)),
            Violation::BadFileIds("an id is empty".into())
        );

        let good = r#"{"file_ids":["001","002"]}"#;
        let message = accepted(&media(good));
        assert_eq!(message.content, good);
        assert_eq!(message.content_type.code(), content_type);
        // Whitespace and extra keys inside the content are JSON like any other.
        accepted(&media(r#" { "file_ids" : [ "001" ], "note": "x" } "#));
    }
    let v = Violation::BadFileIds("the list is empty".into());
    assert!(v.to_string().contains(r#"{"file_ids": ["..."]}"#), "{v}");
    assert!(v.to_string().ends_with(": the list is empty"), "{v}");
}

#[test]
fn media_content_must_be_a_string_not_an_inline_object() {
    let text = frame(|m| {
        m.insert("content_type".into(), json!(2));
        m.insert("content".into(), json!({"file_ids": ["001"]}));
    });
    assert_eq!(
        violation(&text),
        Violation::WrongType {
            field: "content",
            expected: "a string",
            got: "an object"
        }
    );
}

#[test]
fn text_content_is_not_checked_as_file_ids() {
    assert_eq!(
        accepted(&with("content", json!("not json"))).content,
        "not json"
    );
}

#[test]
fn duplicate_fields_are_rejected() {
    let text = r#"{"msg_id":"a","msg_id":"b","chat_type":1,"timestamp":1,"sender_type":1,"sender_id":"u","resp_code":0,"content_type":1,"content":"hi"}"#;
    let rejection = rejected(text);
    assert_eq!(
        rejection.violation,
        Violation::DuplicateField("msg_id".into())
    );
    assert_eq!(
        rejection.violation.to_string(),
        r#"duplicate field "msg_id""#
    );
    // Nothing of a frame with a duplicate field is trusted.
    assert_eq!(
        rejection,
        Rejection::unreadable(Violation::DuplicateField("msg_id".into()))
    );

    let base = frame(|_| {});
    for field in REQUIRED {
        let doubled = format!("{{\"{field}\":null,{}", &base[1..]);
        assert_eq!(
            violation(&doubled),
            Violation::DuplicateField(field.into()),
            "{field}"
        );
    }
    let doubled = format!(
        "{},\"ref_msg_id\":\"y\"}}",
        base.replace('}', ",\"ref_msg_id\":\"x\"")
    );
    assert_eq!(
        violation(&doubled),
        Violation::DuplicateField("ref_msg_id".into())
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let text = frame(|m| {
        m.insert(
            "future_field".into(),
            json!({"nested": [1, {"deep": null}]}),
        );
        m.insert("x".into(), Value::Null);
        m.insert("chat".into(), json!("type"));
    });
    assert_eq!(accepted(&text), base_message());
    // Even a repeated unknown field: it is ignored, not read.
    let base = frame(|_| {});
    let text = format!("{{\"x\":1,\"x\":[],{}", &base[1..]);
    assert_eq!(accepted(&text), base_message());
}

#[test]
fn optional_fields_given_as_null_are_absent() {
    let text = frame(|m| {
        m.insert("ref_msg_id".into(), Value::Null);
        m.insert("group_id".into(), Value::Null);
        m.insert("receiver_id".into(), Value::Null);
    });
    assert_eq!(accepted(&text), base_message());
}

#[test]
fn optional_fields_are_read_when_present() {
    let text = frame(|m| {
        m.insert("ref_msg_id".into(), json!("m-0"));
        m.insert("group_id".into(), json!("g"));
        m.insert("receiver_id".into(), json!("agent-1"));
    });
    let message = accepted(&text);
    assert_eq!(message.ref_msg_id.as_deref(), Some("m-0"));
    assert_eq!(message.group_id.as_deref(), Some("g"));
    assert_eq!(message.receiver_id.as_deref(), Some("agent-1"));
}

#[test]
fn field_names_and_values_are_read_as_json_strings() {
    // Escapes in names and values and whitespace around the frame are plain JSON.
    let text = frame(|_| {})
        .replace(r#""msg_id":"m-1""#, r#""msg\u005fid" : "m\u002d1""#)
        .replace(r#""content":"hello""#, r#""content":"h\u00e9llo\n""#);
    let message = accepted(&format!(" \r\n\t{text}\n "));
    assert_eq!(message.msg_id, "m-1");
    assert_eq!(message.content, "héllo\n");
}

#[test]
fn rejection_keeps_the_readable_context() {
    // msg_id, sender_id, chat_type and group_id are valid; content_type is not.
    let text = frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!("g-9"));
        m.insert("content_type".into(), json!(5));
    });
    let rejection = rejected(&text);
    assert!(matches!(
        rejection.violation,
        Violation::NotAllowed {
            field: "content_type",
            ..
        }
    ));
    assert_eq!(rejection.msg_id.as_deref(), Some("m-1"));
    assert_eq!(rejection.sender_id.as_deref(), Some("user-7"));
    assert_eq!(rejection.chat_type, Some(ChatType::Group));
    assert_eq!(rejection.group_id.as_deref(), Some("g-9"));

    let response = rejection.response(meta(), None);
    assert_eq!(
        response,
        Message {
            chat_type: ChatType::Group,
            msg_id: "gw-1".into(),
            ref_msg_id: Some("m-1".into()),
            timestamp: 42,
            group_id: Some("g-9".into()),
            sender_type: SenderType::Agent,
            sender_id: GATEWAY_SENDER_ID.into(),
            receiver_id: Some("user-7".into()),
            resp_code: RespCode::Illegal,
            content_type: ContentType::Text,
            content: "content_type must be 1, 2, 3 or 4, got 5".into(),
        }
    );
    assert_eq!(GATEWAY_SENDER_ID, "iagent");
    assert_eq!(rejection.response(meta(), Some("bot")).sender_id, "bot");

    // On the wire the codes are numbers.
    let wire: Value = serde_json::from_str(&response.to_json()).unwrap();
    assert_eq!(wire["resp_code"], json!(40));
    assert_eq!(wire["ref_msg_id"], json!("m-1"));
    assert_eq!(wire["receiver_id"], json!("user-7"));
    assert_eq!(wire["sender_id"], json!("iagent"));
}

#[test]
fn rejection_context_is_kept_whichever_field_is_wrong() {
    let breakages: [(&str, Value); 6] = [
        ("timestamp", json!(-5)),
        ("sender_type", json!("1")),
        ("resp_code", json!(10)),
        ("content", Value::Null),
        ("receiver_id", json!(["a"])),
        ("ref_msg_id", json!(1)),
    ];
    for (field, value) in breakages {
        let rejection = rejected(&with(field, value));
        assert_eq!(rejection.msg_id.as_deref(), Some("m-1"), "{field}");
        assert_eq!(rejection.sender_id.as_deref(), Some("user-7"), "{field}");
        assert_eq!(rejection.chat_type, Some(ChatType::Private), "{field}");
        assert_eq!(rejection.group_id, None, "{field}");
        let response = rejection.response(meta(), None);
        assert_eq!(response.ref_msg_id.as_deref(), Some("m-1"), "{field}");
        assert_eq!(response.receiver_id.as_deref(), Some("user-7"), "{field}");
    }
}

#[test]
fn rejection_drops_the_fields_that_are_themselves_invalid() {
    // msg_id wrong: no ref_msg_id, but the sender is still reached.
    let rejection = rejected(&with("msg_id", json!("")));
    assert_eq!(rejection.violation, Violation::Empty("msg_id"));
    assert_eq!(rejection.msg_id, None);
    assert_eq!(rejection.sender_id.as_deref(), Some("user-7"));
    let response = rejection.response(meta(), None);
    assert_eq!(response.ref_msg_id, None);
    assert_eq!(response.receiver_id.as_deref(), Some("user-7"));

    // sender_id too long: the message is still referred to, nobody is named as receiver.
    let rejection = rejected(&with("sender_id", json!("s".repeat(129))));
    assert_eq!(rejection.msg_id.as_deref(), Some("m-1"));
    assert_eq!(rejection.sender_id, None);
    assert_eq!(rejection.response(meta(), None).receiver_id, None);

    // chat_type wrong: the response falls back to a private chat.
    let rejection = rejected(&with("chat_type", json!(3)));
    assert_eq!(rejection.chat_type, None);
    assert_eq!(rejection.msg_id.as_deref(), Some("m-1"));
    assert_eq!(
        rejection.response(meta(), None).chat_type,
        ChatType::Private
    );

    // group_id over the limit is not a valid group_id: it is not echoed back.
    let rejection = rejected(&frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!("g".repeat(129)));
    }));
    assert!(matches!(
        rejection.violation,
        Violation::TooLong {
            field: "group_id",
            ..
        }
    ));
    assert_eq!(rejection.msg_id.as_deref(), Some("m-1"));
    assert_eq!(rejection.chat_type, Some(ChatType::Group));
    assert_eq!(rejection.group_id, None);

    // An empty group_id is no group_id.
    let rejection = rejected(&frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!(""));
    }));
    assert_eq!(rejection.group_id, None);
}

#[test]
fn unreadable_frame_gets_a_gateway_signed_rejection() {
    for text in ["not json", "[1,2]", r#""msg""#] {
        let rejection = rejected(text);
        assert_eq!(rejection.msg_id, None, "{text:?}");
        assert_eq!(rejection.sender_id, None, "{text:?}");
        assert_eq!(rejection.chat_type, None, "{text:?}");
        assert_eq!(rejection.group_id, None, "{text:?}");
        let response = rejection.response(meta(), None);
        assert_eq!(response.ref_msg_id, None);
        assert_eq!(response.chat_type, ChatType::Private);
        assert_eq!(response.sender_id, "iagent");
        assert_eq!(response.sender_type, SenderType::Agent);
        assert_eq!(response.receiver_id, None);
        assert_eq!(response.group_id, None);
        assert_eq!(response.content_type, ContentType::Text);
        assert_eq!(response.resp_code, RespCode::Illegal);
        assert_eq!(response.msg_id, "gw-1");
        assert_eq!(response.timestamp, 42);
        assert_eq!(response.content, rejection.violation.to_string());
        // Absent fields are left out of the JSON, not written as null.
        let wire: Value = serde_json::from_str(&response.to_json()).unwrap();
        assert!(
            wire.get("ref_msg_id").is_none() && wire.get("receiver_id").is_none(),
            "{wire}"
        );
    }
    let binary = Rejection::unreadable(Violation::BinaryFrame).response(meta(), None);
    assert_eq!(binary.sender_id, "iagent");
    assert_eq!(binary.ref_msg_id, None);
    assert!(
        binary.content.starts_with("binary frames are not accepted"),
        "{}",
        binary.content
    );
}

#[test]
fn unknown_agent_rejection_refers_to_the_message() {
    let message = accepted(&frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!("g"));
        m.insert("receiver_id".into(), json!("nobody"));
    }));
    let rejection = Rejection::of_message(&message, Violation::UnknownAgent("nobody".into()));
    let response = rejection.response(meta(), None);
    assert_eq!(response.ref_msg_id.as_deref(), Some("m-1"));
    assert_eq!(response.receiver_id.as_deref(), Some("user-7"));
    assert_eq!(response.chat_type, ChatType::Group);
    assert_eq!(response.group_id.as_deref(), Some("g"));
    assert_eq!(response.resp_code, RespCode::Illegal);
    assert_eq!(
        response.content,
        r#"receiver_id "nobody" is not an agent of this app"#
    );
}

#[test]
fn response_follows_the_responses_section() {
    let inbound = accepted(&frame(|m| {
        m.insert("chat_type".into(), json!(2));
        m.insert("group_id".into(), json!("g-3"));
        m.insert("receiver_id".into(), json!("agent-a"));
        m.insert("ref_msg_id".into(), json!("older"));
    }));
    let reply = inbound.response(
        meta(),
        "agent-a",
        RespCode::Ok,
        ContentType::Image,
        r#"{"file_ids":["f"]}"#.into(),
    );
    assert_eq!(
        reply,
        Message {
            chat_type: ChatType::Group,
            msg_id: "gw-1".into(),
            ref_msg_id: Some("m-1".into()),
            timestamp: 42,
            group_id: Some("g-3".into()),
            sender_type: SenderType::Agent,
            sender_id: "agent-a".into(),
            receiver_id: Some("user-7".into()),
            resp_code: RespCode::Ok,
            content_type: ContentType::Image,
            content: r#"{"file_ids":["f"]}"#.into(),
        }
    );

    // A private chat has no group_id to copy; the sender is answered whatever sender_type it had.
    let mut private = base_message();
    private.sender_type = SenderType::Agent;
    let no_reply = private.text_response(meta(), "agent-b", RespCode::NoReply, "sender_is_agent");
    assert_eq!(no_reply.chat_type, ChatType::Private);
    assert_eq!(no_reply.group_id, None);
    assert_eq!(no_reply.sender_type, SenderType::Agent);
    assert_eq!(no_reply.sender_id, "agent-b");
    assert_eq!(no_reply.receiver_id.as_deref(), Some("user-7"));
    assert_eq!(no_reply.ref_msg_id.as_deref(), Some("m-1"));
    assert_eq!(no_reply.resp_code, RespCode::NoReply);
    assert_eq!(no_reply.content_type, ContentType::Text);
    assert_eq!(no_reply.content, "sender_is_agent");

    let failed = private.text_response(meta(), "agent-b", RespCode::Failed, "agent timeout");
    let wire: Value = serde_json::from_str(&failed.to_json()).unwrap();
    assert_eq!(
        wire,
        json!({
            "chat_type": 1,
            "msg_id": "gw-1",
            "ref_msg_id": "m-1",
            "timestamp": 42,
            "sender_type": 2,
            "sender_id": "agent-b",
            "receiver_id": "user-7",
            "resp_code": 50,
            "content_type": 1,
            "content": "agent timeout",
        })
    );
}
