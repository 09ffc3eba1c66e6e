//! Properties of `parse_inbound` over generated inputs: it never panics on any text (arbitrary
//! unicode, JSON-ish fragments, arbitrary JSON, 10 000-deep nesting); on JSON objects built field
//! by field from valid and invalid values it accepts exactly what an independent oracle, written
//! here from the rules of `docs/protocol.md`, accepts, blames a rule that is really broken, and
//! keeps in the rejection exactly the context fields that are valid; and every valid message
//! survives `to_json` + `parse_inbound`, and serde, unchanged; and `to_json` writes any message,
//! valid or not, exactly as serde_json does.
#![allow(clippy::unwrap_used)]

use iagent_protocol::validate::one_pass_agrees;
use iagent_protocol::{
    ChatType, ContentType, Limits, MAX_ID_BYTES, Message, Rejection, RespCode, SenderType,
    Violation, parse_inbound,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value, json};

// ----------------------------------------------------------------------------------------------
// The oracle: the rules of docs/protocol.md, read off a `serde_json::Value`.
// ----------------------------------------------------------------------------------------------

/// Decides a generated JSON object by the rules, independently of the crate's parser.
struct Oracle<'a> {
    obj: &'a Map<String, Value>,
    limits: Limits,
}

impl Oracle<'_> {
    /// A required integer; `None` when absent, null, not a JSON integer, or outside i64.
    fn int(&self, field: &str) -> Option<i64> {
        self.obj.get(field)?.as_i64()
    }

    /// A required id: a string of 1..=128 bytes.
    fn id(&self, field: &str) -> Option<String> {
        let id = self.obj.get(field)?.as_str()?;
        (!id.is_empty() && id.len() <= MAX_ID_BYTES).then(|| id.to_owned())
    }

    /// An optional string, absent and null alike; `None` when of another type or over `max`.
    fn optional(&self, field: &str, max: Option<usize>) -> Option<Option<String>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Some(None),
            Some(Value::String(s)) if max.is_none_or(|max| s.len() <= max) => Some(Some(s.clone())),
            Some(_) => None,
        }
    }

    fn chat_type(&self) -> Option<ChatType> {
        match self.int("chat_type")? {
            1 => Some(ChatType::Private),
            2 => Some(ChatType::Group),
            _ => None,
        }
    }

    fn sender_type(&self) -> Option<SenderType> {
        match self.int("sender_type")? {
            1 => Some(SenderType::User),
            2 => Some(SenderType::Agent),
            _ => None,
        }
    }

    fn content_type(&self) -> Option<ContentType> {
        match self.int("content_type")? {
            1 => Some(ContentType::Text),
            2 => Some(ContentType::Image),
            3 => Some(ContentType::Voice),
            4 => Some(ContentType::Video),
            _ => None,
        }
    }

    fn resp_code_ok(&self) -> bool {
        self.int("resp_code") == Some(0)
    }

    fn timestamp(&self) -> Option<i64> {
        self.int("timestamp").filter(|ms| *ms >= 0)
    }

    fn content(&self) -> Option<String> {
        self.obj.get("content")?.as_str().map(str::to_owned)
    }

    fn group_id(&self) -> Option<Option<String>> {
        self.optional("group_id", Some(MAX_ID_BYTES))
    }

    /// The group_id a rejection may carry: a valid, non-empty one.
    fn context_group_id(&self) -> Option<String> {
        self.group_id().flatten().filter(|g| !g.is_empty())
    }

    /// Whether `field`, on its own, holds a valid value.
    fn field_ok(&self, field: &str) -> bool {
        match field {
            "chat_type" => self.chat_type().is_some(),
            "msg_id" | "sender_id" => self.id(field).is_some(),
            "ref_msg_id" => self.optional(field, None).is_some(),
            "group_id" | "receiver_id" => self.optional(field, Some(MAX_ID_BYTES)).is_some(),
            "timestamp" => self.timestamp().is_some(),
            "sender_type" => self.sender_type().is_some(),
            "resp_code" => self.resp_code_ok(),
            "content_type" => self.content_type().is_some(),
            "content" => self.content().is_some(),
            _ => false,
        }
    }

    fn group_rule_ok(&self) -> bool {
        self.chat_type() != Some(ChatType::Group) || self.context_group_id().is_some()
    }

    /// Whether the content rule of its content type holds (given both are well typed).
    fn content_rule_ok(&self) -> bool {
        match (self.content_type(), self.content()) {
            (Some(ContentType::Text), Some(text)) => {
                !text.is_empty() && text.len() <= self.limits.max_text_bytes
            }
            (Some(_), Some(media)) => file_ids_ok(&media),
            _ => true,
        }
    }

    /// The message, when every rule holds.
    fn message(&self) -> Option<Message> {
        let message = Message {
            chat_type: self.chat_type()?,
            msg_id: self.id("msg_id")?,
            ref_msg_id: self.optional("ref_msg_id", None)?,
            timestamp: self.timestamp()?,
            group_id: self.group_id()?,
            sender_type: self.sender_type()?,
            sender_id: self.id("sender_id")?,
            receiver_id: self.optional("receiver_id", Some(MAX_ID_BYTES))?,
            resp_code: if self.resp_code_ok() {
                RespCode::Ok
            } else {
                return None;
            },
            content_type: self.content_type()?,
            content: self.content()?,
        };
        (self.group_rule_ok() && self.content_rule_ok()).then_some(message)
    }

    /// Whether the rule `violation` reports is in fact broken by the object.
    fn is_broken(&self, violation: &Violation) -> bool {
        match violation {
            Violation::Empty("content")
            | Violation::TooLong {
                field: "content", ..
            } => self.content_type() == Some(ContentType::Text) && !self.content_rule_ok(),
            Violation::BadFileIds(_) => {
                !matches!(self.content_type(), None | Some(ContentType::Text))
                    && !self.content_rule_ok()
            }
            Violation::GroupWithoutGroupId => !self.group_rule_ok(),
            Violation::Missing(field) => !self.obj.contains_key(*field),
            Violation::Null(field) => self.obj.get(*field) == Some(&Value::Null),
            Violation::WrongType { field, .. }
            | Violation::NotAllowed { field, .. }
            | Violation::TooLong { field, .. } => !self.field_ok(field),
            Violation::Empty(field) => self.obj.get(*field) == Some(&json!("")),
            Violation::BadTimestamp(_) => !self.field_ok("timestamp"),
            Violation::NotJson(_)
            | Violation::NotObject
            | Violation::BinaryFrame
            | Violation::DuplicateField(_)
            | Violation::UnknownAgent(_)
            | Violation::UnknownFile(_) => false,
        }
    }
}

/// The media content rule: a JSON object whose `file_ids` is a non-empty list of non-empty
/// strings.
fn file_ids_ok(content: &str) -> bool {
    let Ok(Value::Object(object)) = serde_json::from_str::<Value>(content) else {
        return false;
    };
    match object.get("file_ids") {
        Some(Value::Array(ids)) => {
            !ids.is_empty()
                && ids
                    .iter()
                    .all(|id| matches!(id, Value::String(s) if !s.is_empty()))
        }
        _ => false,
    }
}

/// Checks one parse of the JSON object `obj` (sent as `text`) against the oracle.
fn check_against_oracle(
    obj: &Map<String, Value>,
    text: &str,
    limits: Limits,
) -> Result<(), TestCaseError> {
    let oracle = Oracle { obj, limits };
    let got = parse_inbound(text, &limits);
    match (&got, oracle.message()) {
        (Ok(message), Some(expected)) => prop_assert_eq!(message, &expected),
        (Err(rejection), None) => {
            prop_assert!(
                oracle.is_broken(&rejection.violation),
                "blamed a rule that holds: {:?}",
                rejection.violation
            );
            prop_assert_eq!(&rejection.msg_id, &oracle.id("msg_id"));
            prop_assert_eq!(&rejection.sender_id, &oracle.id("sender_id"));
            prop_assert_eq!(rejection.chat_type, oracle.chat_type());
            prop_assert_eq!(&rejection.group_id, &oracle.context_group_id());
        }
        (Ok(message), None) => {
            prop_assert!(false, "accepted a message the rules reject: {:?}", message)
        }
        (Err(rejection), Some(_)) => {
            prop_assert!(false, "rejected a valid message: {}", rejection.violation)
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Strategies.
// ----------------------------------------------------------------------------------------------

/// JSON values of the wrong type for a number field.
fn not_a_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[0-9]{1,3}".prop_map(Value::String),
        any::<bool>().prop_map(Value::Bool),
        Just(json!([])),
        Just(json!([1])),
        Just(json!({})),
        Just(json!({"a": 1})),
    ]
}

/// JSON values of the wrong type for a string field.
fn not_a_string() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::Bool),
        Just(json!(["a"])),
        Just(json!({"a": "b"})),
    ]
}

/// A required numeric field: valid values most of the time, else absent, null, the wrong type,
/// an integer out of range, or a fraction.
fn number_field(valid: Vec<i64>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        12 => select(valid).prop_map(|n| Some(json!(n))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => not_a_number().prop_map(Some),
        1 => any::<i64>().prop_map(|n| Some(json!(n))),
        1 => select(vec![-1_i64, 0, 3, 5, 10, 40, 50]).prop_map(|n| Some(json!(n))),
        1 => select(vec![1.0_f64, 2.0, 0.5, -1.5, 1e20]).prop_map(|x| Some(json!(x))),
        1 => Just(Some(json!(u64::MAX))),
    ]
    .boxed()
}

/// An id string of 1..=128 bytes.
fn valid_id() -> BoxedStrategy<String> {
    prop_oneof![
        "[A-Za-z0-9_.:-]{1,40}",
        vec(any::<char>(), 1..=32).prop_map(String::from_iter),
        Just("i".repeat(MAX_ID_BYTES)),
        Just("é".repeat(MAX_ID_BYTES / 2)),
    ]
    .boxed()
}

/// A string that is not a valid id: empty or too long.
fn bad_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("i".repeat(MAX_ID_BYTES + 1)),
        Just("€".repeat(43)),
        "[a-z]{129,200}",
    ]
}

/// A required id field.
fn id_field() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        12 => valid_id().prop_map(|s| Some(json!(s))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => not_a_string().prop_map(Some),
        2 => bad_id().prop_map(|s| Some(json!(s))),
    ]
    .boxed()
}

/// An optional string field; absent most of the time.
fn optional_field() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        8 => Just(None),
        2 => Just(Some(Value::Null)),
        6 => valid_id().prop_map(|s| Some(json!(s))),
        1 => Just(Some(json!(""))),
        1 => bad_id().prop_map(|s| Some(json!(s))),
        1 => not_a_string().prop_map(Some),
    ]
    .boxed()
}

fn timestamp_field() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        12 => (0..=i64::MAX).prop_map(|ms| Some(json!(ms))),
        2 => select(vec![0, i64::MAX, 1_700_000_000_000]).prop_map(|ms| Some(json!(ms))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => not_a_number().prop_map(Some),
        2 => (i64::MIN..0).prop_map(|ms| Some(json!(ms))),
        1 => select(vec![1.5_f64, 0.0, -0.0, 1.7e12]).prop_map(|x| Some(json!(x))),
        1 => Just(Some(json!(u64::MAX))),
    ]
    .boxed()
}

/// A media `content` string, valid or not.
fn media_content() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec("[a-z0-9-]{1,8}", 1..4).prop_map(|ids| json!({ "file_ids": ids }).to_string()),
        1 => vec("[a-z0-9]{1,4}", 1..3)
            .prop_map(|ids| json!({ "file_ids": ids, "extra": [1] }).to_string()),
        1 => select(vec![
            r#"{"file_ids":[]}"#,
            r#"{"file_ids":[""]}"#,
            r#"{"file_ids":["a",""]}"#,
            r#"{"file_ids":"x"}"#,
            r#"{"file_ids":[1]}"#,
            r#"{"file_ids":null}"#,
            r#"{"ids":["a"]}"#,
            r#"[["a"]]"#,
            r#"["a"]"#,
            "not json",
            "",
        ])
        .prop_map(str::to_owned),
    ]
}

fn content_field() -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        8 => "[a-zé€ \n\"]{0,12}".prop_map(|s| Some(json!(s))),
        6 => media_content().prop_map(|s| Some(json!(s))),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => not_a_string().prop_map(Some),
    ]
    .boxed()
}

/// Any JSON value, nested a few levels.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map("[a-z_]{0,10}", inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// The known fields, in wire order.
const FIELDS: [&str; 11] = [
    "chat_type",
    "msg_id",
    "ref_msg_id",
    "timestamp",
    "group_id",
    "sender_type",
    "sender_id",
    "receiver_id",
    "resp_code",
    "content_type",
    "content",
];

/// A JSON object built field by field: a valid message of which each field is, with some
/// probability, replaced by a value of that field's mixed strategy (absent, null, valid, wrong
/// type, out of range), with maybe an unknown extra field. About a third of the objects stay
/// valid, so both outcomes are exercised.
fn mixed_object() -> impl Strategy<Value = Map<String, Value>> {
    const P: f64 = 0.12;
    let overrides = (
        option::weighted(P, number_field(vec![1, 2])),
        option::weighted(P, id_field()),
        option::weighted(P, optional_field()),
        option::weighted(P, timestamp_field()),
        option::weighted(P, optional_field()),
        option::weighted(P, number_field(vec![1, 2])),
        option::weighted(P, id_field()),
        option::weighted(P, optional_field()),
        option::weighted(P, number_field(vec![0])),
        option::weighted(P, number_field(vec![1, 2, 3, 4])),
        option::weighted(P, content_field()),
    );
    (
        valid_message(Just(RespCode::Ok)),
        overrides,
        option::of(arb_json()),
    )
        .prop_map(
            |(message, (ct, mid, rmid, ts, gid, st, sid, rid, rc, cty, content), extra)| {
                let Ok(Value::Object(mut obj)) = serde_json::to_value(&message) else {
                    unreachable!("a Message serializes as an object")
                };
                let overrides = [ct, mid, rmid, ts, gid, st, sid, rid, rc, cty, content];
                for (name, value) in FIELDS.into_iter().zip(overrides) {
                    match value {
                        None => {}
                        Some(None) => {
                            obj.remove(name);
                        }
                        Some(Some(value)) => {
                            obj.insert(name.to_owned(), value);
                        }
                    }
                }
                if let Some(extra) = extra {
                    obj.insert("an_unknown_field".to_owned(), extra);
                }
                obj
            },
        )
}

fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        4 => Just(Limits::default()),
        1 => (1_usize..=16).prop_map(|max_text_bytes| Limits { max_text_bytes }),
    ]
}

/// Text of JSON-ish fragments: brackets, quotes, escapes, field names, numbers and literals.
fn json_ish() -> impl Strategy<Value = String> {
    let fragment = select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\n",
        "\"",
        "\\",
        "\\u",
        "\\ud800",
        "\\u0000",
        "null",
        "true",
        "false",
        "0",
        "1",
        "2",
        "-1",
        "-0",
        "1.5",
        "1e999",
        "18446744073709551616",
        "\"\"",
        "\"a\"",
        "\"chat_type\"",
        "\"msg_id\"",
        "\"ref_msg_id\"",
        "\"timestamp\"",
        "\"group_id\"",
        "\"sender_type\"",
        "\"sender_id\"",
        "\"receiver_id\"",
        "\"resp_code\"",
        "\"content_type\"",
        "\"content\"",
        "\"file_ids\"",
        r#""{\"file_ids\":[\"a\"]}""#,
        "\u{0}",
        "é",
        "\u{feff}",
    ]);
    (any::<bool>(), vec(fragment, 0..96)).prop_map(|(open, fragments)| {
        let body = fragments.concat();
        if open { format!("{{{body}") } else { body }
    })
}

fn any_chat_type() -> impl Strategy<Value = ChatType> {
    select(vec![ChatType::Private, ChatType::Group])
}

fn any_sender_type() -> impl Strategy<Value = SenderType> {
    select(vec![SenderType::User, SenderType::Agent])
}

fn any_resp_code() -> impl Strategy<Value = RespCode> {
    select(vec![
        RespCode::Ok,
        RespCode::NoReply,
        RespCode::Illegal,
        RespCode::Failed,
    ])
}

/// A valid `(content_type, content)` pair under the default limits.
fn valid_content() -> BoxedStrategy<(ContentType, String)> {
    let max = Limits::DEFAULT_MAX_TEXT_BYTES;
    prop_oneof![
        6 => vec(any::<char>(), 1..64).prop_map(|c| (ContentType::Text, String::from_iter(c))),
        1 => Just((ContentType::Text, "é".repeat(max / 2))),
        1 => Just((ContentType::Text, "x".repeat(max))),
        4 => (
            select(vec![ContentType::Image, ContentType::Voice, ContentType::Video]),
            vec(valid_id(), 1..5),
        )
            .prop_map(|(ty, ids)| (ty, json!({ "file_ids": ids }).to_string())),
    ]
    .boxed()
}

/// A message that satisfies every rule, with the given `resp_code`.
fn valid_message(resp_code: impl Strategy<Value = RespCode> + 'static) -> BoxedStrategy<Message> {
    (
        any_chat_type(),
        valid_id(),
        option::of(any::<String>()),
        0..=i64::MAX,
        valid_id(),
        option::of(prop_oneof![Just(String::new()), valid_id()]),
        any_sender_type(),
        valid_id(),
        option::of(valid_id()),
        resp_code,
        valid_content(),
    )
        .prop_map(
            |(
                chat_type,
                msg_id,
                ref_msg_id,
                timestamp,
                group,
                private_group,
                sender_type,
                sender_id,
                receiver_id,
                resp_code,
                (content_type, content),
            )| {
                let group_id = match chat_type {
                    ChatType::Group => Some(group),
                    ChatType::Private => private_group,
                };
                Message {
                    chat_type,
                    msg_id,
                    ref_msg_id,
                    timestamp,
                    group_id,
                    sender_type,
                    sender_id,
                    receiver_id,
                    resp_code,
                    content_type,
                    content,
                }
            },
        )
        .boxed()
}

/// Any message at all, valid or not: a response carries whatever its agent wrote, so every
/// string field takes any text (escapes included) and the timestamp any value.
fn any_message() -> impl Strategy<Value = Message> {
    let text = || prop_oneof![any::<String>(), "(\\PC|[\"\\\\\u{0}-\u{1f}]){0,200}"];
    (
        valid_message(any_resp_code()),
        (text(), text(), text()),
        (option::of(text()), option::of(text()), option::of(text())),
        any::<i64>(),
    )
        .prop_map(
            |(
                mut message,
                (msg_id, sender_id, content),
                (ref_msg_id, group_id, receiver_id),
                at,
            )| {
                message.msg_id = msg_id;
                message.sender_id = sender_id;
                message.content = content;
                message.ref_msg_id = ref_msg_id;
                message.group_id = group_id;
                message.receiver_id = receiver_id;
                message.timestamp = at;
                message
            },
        )
}

/// What must hold of any outcome of any input: an accepted message is accepted again, the same,
/// from its own JSON; a rejection turns into a well-formed 40 response.
fn check_outcome(got: &Result<Message, Rejection>) -> Result<(), TestCaseError> {
    match got {
        Ok(message) => {
            prop_assert_eq!(message.resp_code, RespCode::Ok);
            let again = parse_inbound(&message.to_json(), &Limits::default());
            prop_assert_eq!(again.as_ref(), Ok(message));
        }
        Err(rejection) => {
            let meta = iagent_protocol::ResponseMeta {
                msg_id: "gw".into(),
                timestamp: 1,
            };
            let response = rejection.response(meta, None);
            prop_assert_eq!(response.resp_code, RespCode::Illegal);
            prop_assert_eq!(&response.ref_msg_id, &rejection.msg_id);
            prop_assert_eq!(response.content, rejection.violation.to_string());
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Properties.
// ----------------------------------------------------------------------------------------------

proptest! {
    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        let got = parse_inbound(&text, &Limits::default());
        check_outcome(&got)?;
    }

    #[test]
    fn printable_unicode_never_panics(text in "\\PC{0,64}") {
        let got = parse_inbound(&text, &Limits::default());
        check_outcome(&got)?;
    }

    #[test]
    fn json_ish_fragments_never_panic(text in json_ish()) {
        let got = parse_inbound(&text, &Limits::default());
        check_outcome(&got)?;
        prop_assert!(one_pass_agrees(&text), "{:?}", text);
    }

    #[test]
    fn any_json_that_is_not_an_object_is_not_an_object(value in arb_json(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            value.to_string()
        };
        let got = parse_inbound(&text, &Limits::default());
        check_outcome(&got)?;
        match &value {
            Value::Object(obj) => check_against_oracle(obj, &text, Limits::default())?,
            _ => prop_assert_eq!(got, Err(Rejection::unreadable(Violation::NotObject))),
        }
    }

    #[test]
    fn mixed_fields_are_accepted_exactly_when_every_rule_holds(
        obj in mixed_object(),
        limits in limits(),
        pretty in any::<bool>(),
    ) {
        let value = Value::Object(obj.clone());
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            value.to_string()
        };
        check_against_oracle(&obj, &text, limits)?;
        prop_assert!(one_pass_agrees(&text), "{:?}", text);
    }

    #[test]
    fn valid_messages_round_trip_through_the_wire(message in valid_message(Just(RespCode::Ok))) {
        let text = message.to_json();
        prop_assert_eq!(parse_inbound(&text, &Limits::default()), Ok(message.clone()));
        // The oracle agrees that the generated message is valid.
        let Value::Object(obj) = serde_json::from_str::<Value>(&text).unwrap() else {
            unreachable!("a Message serializes as an object")
        };
        prop_assert_eq!(Oracle { obj: &obj, limits: Limits::default() }.message(), Some(message));
    }

    #[test]
    fn to_json_writes_what_serde_writes(message in any_message()) {
        prop_assert_eq!(message.to_json(), serde_json::to_string(&message).unwrap());
    }

    #[test]
    fn messages_round_trip_through_serde(message in valid_message(any_resp_code())) {
        let text = serde_json::to_string(&message).unwrap();
        prop_assert_eq!(&text, &message.to_json());
        prop_assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), message.clone());
        // The enums travel as their numbers.
        let wire: Value = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&wire["chat_type"], &json!(message.chat_type.code()));
        prop_assert_eq!(&wire["sender_type"], &json!(message.sender_type.code()));
        prop_assert_eq!(&wire["resp_code"], &json!(message.resp_code.code()));
        prop_assert_eq!(&wire["content_type"], &json!(message.content_type.code()));
    }
}

// ----------------------------------------------------------------------------------------------
// Deep nesting.
// ----------------------------------------------------------------------------------------------

const DEPTH: usize = 10_000;

fn nested(open: &str, close: &str) -> String {
    format!("{}1{}", open.repeat(DEPTH), close.repeat(DEPTH))
}

/// A valid message (as the fields of an object, without braces).
const VALID_FIELDS: &str = r#""chat_type":1,"msg_id":"m","timestamp":0,"sender_type":1,"sender_id":"s","resp_code":0,"content_type":1,"content":"hi""#;

#[test]
fn deep_nesting_in_an_unknown_field_does_not_overflow() {
    let deep = nested("[", "]");
    // Alone, the frame is rejected (it lacks every required field), without a stack overflow.
    let alone = format!(r#"{{"a":{deep}}}"#);
    let got = parse_inbound(&alone, &Limits::default());
    assert_eq!(
        got,
        Err(Rejection::unreadable(Violation::Missing("chat_type")))
    );

    // serde_json skips an unknown value without recursing (its recursion limit of 128 applies
    // only to values it builds), so next to a valid message the deep field is ignored like any
    // other unknown field.
    let with_message = format!(r#"{{"a":{deep},{VALID_FIELDS}}}"#);
    let message = parse_inbound(&with_message, &Limits::default()).unwrap();
    assert_eq!(message.msg_id, "m");

    let objects = format!(r#"{{{VALID_FIELDS},"a":{}}}"#, nested(r#"{"a":"#, "}"));
    assert!(parse_inbound(&objects, &Limits::default()).is_ok());
}

#[test]
fn deep_nesting_elsewhere_is_rejected_without_overflow() {
    let deep = nested("[", "]");
    // In a known field: the wrong type.
    let in_content = format!(
        r#"{{{},"content":{deep}}}"#,
        VALID_FIELDS.replace(r#","content":"hi""#, "")
    );
    assert_eq!(
        parse_inbound(&in_content, &Limits::default())
            .unwrap_err()
            .violation,
        Violation::WrongType {
            field: "content",
            expected: "a string",
            got: "an array"
        }
    );
    // As the whole frame: JSON, but not an object.
    assert_eq!(
        parse_inbound(&deep, &Limits::default()),
        Err(Rejection::unreadable(Violation::NotObject))
    );
    // Unclosed: not JSON.
    let unclosed = format!(r#"{{"a":{}"#, "[".repeat(DEPTH));
    assert!(matches!(
        parse_inbound(&unclosed, &Limits::default())
            .unwrap_err()
            .violation,
        Violation::NotJson(_)
    ));
    // Inside the file_ids of a media message's content.
    let ids = serde_json::to_string(&format!(r#"{{"file_ids":{deep}}}"#)).unwrap();
    let media = format!(
        r#"{{{},"content":{ids}}}"#,
        VALID_FIELDS.replace(r#""content_type":1,"content":"hi""#, r#""content_type":2"#)
    );
    assert!(matches!(
        parse_inbound(&media, &Limits::default())
            .unwrap_err()
            .violation,
        Violation::BadFileIds(_)
    ));
}
