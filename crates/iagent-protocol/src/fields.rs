//! A frame's known fields, each as its raw JSON token, and the one pass that reads them from
//! the frames backends send nearly always.
//!
//! Every frame is read before anything else is done with it, and reading it through
//! `serde_json` (a derived struct of raw values) was the largest part of parsing: each value is
//! scanned by the parser, then taken as a raw value, and each field name is matched by the
//! derived visitor. [`scan`] reads the common shape in one pass instead: an object whose names
//! and string values have no escapes, and whose values are strings, whole numbers, `true`,
//! `false` or `null`. Anything else, every malformed frame included, makes it give up, and the
//! frame is read by `serde_json` as before, which also words the error. So [`scan`] never has
//! to be right about an error, only about what it accepts: for those frames it must give the
//! fields `serde_json` gives, which its tests check against it on generated frames.

use crate::json;
use crate::words::Literal;

/// The known fields of a frame, each as its raw JSON token (the quotes of a string included, a
/// `null` kept as `null`, not folded into "absent").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawFrame<'a> {
    pub(crate) chat_type: Option<&'a str>,
    pub(crate) msg_id: Option<&'a str>,
    pub(crate) ref_msg_id: Option<&'a str>,
    pub(crate) timestamp: Option<&'a str>,
    pub(crate) group_id: Option<&'a str>,
    pub(crate) sender_type: Option<&'a str>,
    pub(crate) sender_id: Option<&'a str>,
    pub(crate) receiver_id: Option<&'a str>,
    pub(crate) resp_code: Option<&'a str>,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) content: Option<&'a str>,
    /// Whether a string token may hold escapes: not in a frame [`scan`] read, which takes a
    /// string only without any, so that its text is what lies between its quotes.
    pub(crate) escapes: bool,
}

impl<'a> RawFrame<'a> {
    /// The place of the field `name`, if it is a known one.
    fn slot(&mut self, name: &str) -> Option<&mut Option<&'a str>> {
        KEYS.iter()
            .position(|key| key.len() == name.len() + 3 && &key[1..=name.len()] == name.as_bytes())
            .map(|index| self.slot_at(index))
    }

    /// The place of the field of [`KEYS`]`[index]`.
    fn slot_at(&mut self, index: usize) -> &mut Option<&'a str> {
        match index {
            0 => &mut self.chat_type,
            1 => &mut self.msg_id,
            2 => &mut self.ref_msg_id,
            3 => &mut self.timestamp,
            4 => &mut self.group_id,
            5 => &mut self.sender_type,
            6 => &mut self.sender_id,
            7 => &mut self.receiver_id,
            8 => &mut self.resp_code,
            9 => &mut self.content_type,
            _ => &mut self.content,
        }
    }
}

/// The known fields' names, quoted and followed by their colon, in the order of the API page,
/// in which `Message::to_json` writes them and backends nearly always do: at each member,
/// [`scan`] first tries the names still to come in that order, each told by two words (every
/// key is 9 to 16 bytes long), before it reads the name as a string and looks it up. Read
/// and looked up every time, they cost the scan of the benchmark's frame 2 255 instructions
/// against 1 730 (callgrind).
const KEYS: [&[u8]; 11] = [
    b"\"chat_type\":",
    b"\"msg_id\":",
    b"\"ref_msg_id\":",
    b"\"timestamp\":",
    b"\"group_id\":",
    b"\"sender_type\":",
    b"\"sender_id\":",
    b"\"receiver_id\":",
    b"\"resp_code\":",
    b"\"content_type\":",
    b"\"content\":",
];

/// Each key, told at a position by two words.
const KEY_WORDS: [Literal; KEYS.len()] = Literal::all(KEYS);

/// The fields of `frame` if it has the common shape (see the module's documentation), or
/// `None`, for `serde_json` to read it. A known field given twice is `None` too: `serde_json`
/// names it in its error.
pub(crate) fn scan(frame: &str) -> Option<RawFrame<'_>> {
    let bytes = frame.as_bytes();
    let mut fields = RawFrame::default();
    let mut at = whitespace(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = whitespace(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        at += 1;
    } else {
        // The first of the keys that may come next in the page's order.
        let mut next_key = 0;
        loop {
            let slot = if let Some(index) =
                (next_key..KEYS.len()).find(|&index| KEY_WORDS[index].starts(&bytes[at..]))
            {
                next_key = index + 1;
                at += KEY_WORDS[index].len();
                Some(fields.slot_at(index))
            } else {
                let name_end = string(bytes, at)?;
                // Between the quotes, which are ASCII: the slice is on character boundaries.
                let name = &frame[at + 1..name_end - 1];
                at = whitespace(bytes, name_end);
                if bytes.get(at) != Some(&b':') {
                    return None;
                }
                at += 1;
                fields.slot(name)
            };
            at = whitespace(bytes, at);
            let value_end = value(bytes, at)?;
            if let Some(slot) = slot
                && slot.replace(&frame[at..value_end]).is_some()
            {
                return None;
            }
            at = whitespace(bytes, value_end);
            match bytes.get(at) {
                Some(b',') => at = whitespace(bytes, at + 1),
                Some(b'}') => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (whitespace(bytes, at) == bytes.len()).then_some(fields)
}

/// Where the JSON whitespace from `at` ends.
fn whitespace(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// Where the string token at `at` ends (after its closing quote), if there is one without
/// escapes or control characters.
fn string(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let end = at + 1 + json::plain_len(&bytes[at + 1..]);
    (bytes.get(end) == Some(&b'"')).then_some(end + 1)
}

/// Where the value token at `at` ends, if it is one of the common shape. A token is only
/// taken as far as it goes: what follows it (`1.5`, `01`, `nullx`) is left for the caller,
/// which accepts only whitespace, a comma or the closing brace there.
fn value(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => string(bytes, at),
        b'-' | b'0'..=b'9' => integer(bytes, at),
        b'n' => literal(bytes, at, b"null"),
        b't' => literal(bytes, at, b"true"),
        b'f' => literal(bytes, at, b"false"),
        _ => None,
    }
}

/// Where the whole number at `at` ends: JSON's `-? (0 | [1-9][0-9]*)`.
fn integer(bytes: &[u8], mut at: usize) -> Option<usize> {
    if bytes.get(at) == Some(&b'-') {
        at += 1;
    }
    match bytes.get(at)? {
        b'0' => Some(at + 1),
        b'1'..=b'9' => Some(
            at + 1
                + bytes[at + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count(),
        ),
        _ => None,
    }
}

fn literal(bytes: &[u8], at: usize, word: &[u8]) -> Option<usize> {
    bytes[at..].starts_with(word).then_some(at + word.len())
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;
    use crate::validate::{one_pass_agrees, read_by_serde};

    /// What [`scan`] accepts, `serde_json` reads as the same fields.
    fn assert_agrees(frame: &str) {
        assert!(one_pass_agrees(frame), "{frame:?}");
    }

    /// A message as backends and `Message::to_json` write it is read in the one pass.
    #[test]
    fn the_common_frame_is_read_in_one_pass() {
        let frame = r#"{"chat_type":1,"msg_id":"m-1","timestamp":1796233539832,"sender_type":1,"sender_id":"u182","resp_code":0,"content_type":1,"content":"héllo"}"#;
        let fields = scan(frame).expect("the common shape");
        assert_eq!(fields.msg_id, Some("\"m-1\""));
        assert_eq!(fields.timestamp, Some("1796233539832"));
        assert_eq!(fields.content, Some("\"héllo\""));
        assert_eq!(fields.group_id, None);
        assert_agrees(frame);
        let spaced = " {\n\t\"msg_id\" : null , \"extra\": [1], \"resp_code\":-0 }\r\n";
        assert_eq!(scan(spaced), None, "an array value is left to serde_json");
        let spaced = " {\n\t\"msg_id\" : null , \"extra\": true, \"resp_code\":-0 }\r\n";
        let fields = scan(spaced).expect("whitespace, null, unknown fields");
        assert_eq!(fields.msg_id, Some("null"));
        assert_eq!(fields.resp_code, Some("-0"));
        assert_agrees(spaced);
    }

    #[test]
    fn a_key_is_told_by_every_one_of_its_bytes() {
        for (key, words) in KEYS.iter().zip(&KEY_WORDS) {
            crate::words::assert_told_by_every_byte(words, key);
        }
    }

    /// Frames [`scan`] must leave to `serde_json`: malformed ones, escapes, fractions,
    /// nesting, a known field twice.
    #[test]
    fn anything_else_is_left_to_serde_json() {
        for frame in [
            "",
            "[]",
            "{",
            "{}}",
            "{} x",
            r#"{"msg_id":"a\"b"}"#,
            r#"{"ms\u0067_id":"a"}"#,
            "{\"msg_id\":\"a\u{1}\"}",
            r#"{"timestamp":1.5}"#,
            r#"{"timestamp":1e3}"#,
            r#"{"timestamp":01}"#,
            r#"{"timestamp":-}"#,
            r#"{"timestamp":nul}"#,
            r#"{"timestamp":nullx}"#,
            r#"{"content":{"a":1}}"#,
            r#"{"msg_id":"a","msg_id":"b"}"#,
            r#"{"msg_id":"a",}"#,
            r#"{"msg_id" "a"}"#,
            r#"{"msg_id":"a" "b":1}"#,
        ] {
            assert_eq!(scan(frame), None, "{frame:?}");
        }
        // Unknown fields may repeat, as serde_json lets them.
        assert_agrees(r#"{"x":1,"x":"y","msg_id":"a"}"#);
        assert!(scan(r#"{"x":1,"x":"y","msg_id":"a"}"#).is_some());
    }

    /// Pieces of frames, right and wrong, put into frames of the common shape: each character
    /// that matters to JSON's grammar, and tokens that are nearly right.
    fn piece() -> impl Strategy<Value = String> {
        let characters: Vec<String> = "{}[],: \n\t\"\\\u{1}é0-"
            .chars()
            .map(String::from)
            .collect();
        let tokens = [
            "\\\"", "\\u0041", "\"x\"", "01", "1.5", "1e3", "nul", "tru", "nullx",
        ];
        select(
            characters
                .into_iter()
                .chain(tokens.map(String::from))
                .collect::<Vec<_>>(),
        )
    }

    /// A frame of the common shape, as a list of members (name, value) and its spacing.
    fn member() -> impl Strategy<Value = String> {
        // Known names of each kind of value, an unknown one and the empty one: a known one
        // given twice is what the reader must decline.
        let name = select(&["msg_id", "timestamp", "content", "group_id", "x", ""][..]);
        let value = select(
            &[
                "1",
                "-0",
                "0",
                "1796233539832",
                "-12",
                "\"m-1\"",
                "\"\"",
                "\"héllo, {world}\"",
                "null",
                "true",
                "false",
                "\"a:b\"",
            ][..],
        );
        let space = select(&["", " ", "\n\t", "\r "][..]);
        (name, value, space).prop_map(|(name, value, space)| {
            format!("{space}\"{name}\"{space}:{space}{value}{space}")
        })
    }

    /// Members in the order of the API page, as backends write them: each known name or not
    /// (so that the keys still to come are tried past the missing ones), now and then an
    /// unknown one or a known one again, and spacing anywhere.
    fn members_in_order() -> impl Strategy<Value = Vec<String>> {
        // The names between each key's quotes.
        let names = KEYS.map(|key| std::str::from_utf8(&key[1..key.len() - 2]).expect("ASCII"));
        let extra = select(&["", "x", "msg_id", "content", "chat_typ", "content_type"][..]);
        let value = select(&["1", "1796233539832", "\"m-1\"", "\"\"", "null", "\"é,{\""][..]);
        let space = select(&["", "", "", " ", "\n"][..]);
        (
            vec(any::<bool>(), names.len()),
            proptest::option::of((0..names.len(), extra)),
            vec((value, space), names.len() + 1),
        )
            .prop_map(move |(present, extra, values)| {
                let mut chosen: Vec<&str> = names
                    .iter()
                    .zip(present)
                    .filter_map(|(name, present)| present.then_some(*name))
                    .collect();
                if let Some((at, name)) = extra {
                    chosen.insert(at.min(chosen.len()), name);
                }
                chosen
                    .into_iter()
                    .zip(values)
                    .map(|(name, (value, space))| format!("{space}\"{name}\"{space}:{value}"))
                    .collect()
            })
    }

    proptest! {
        /// Frames in the page's order, read first by the keys expected next.
        #[test]
        fn frames_in_the_page_s_order_are_read_as_serde_json_reads_them(
            members in members_in_order()
        ) {
            let frame = format!("{{{}}}", members.join(","));
            assert_agrees(&frame);
            let repeats = read_by_serde(&frame).is_err();
            prop_assert_eq!(scan(&frame).is_some(), !repeats, "{:?}", frame);
        }

        /// Frames of the common shape: [`scan`] reads each unless a known field repeats, and
        /// reads what `serde_json` reads.
        #[test]
        fn common_frames_are_read_as_serde_json_reads_them(members in vec(member(), 0..14)) {
            let frame = format!("{{{}}}", members.join(","));
            assert_agrees(&frame);
            let by_serde = read_by_serde(&frame);
            let repeats = by_serde.is_err();
            prop_assert_eq!(scan(&frame).is_some(), !repeats, "{:?}", frame);
        }

        /// A common frame with one piece put in at any place.
        #[test]
        fn a_common_frame_with_a_piece_in_it_is_never_read_otherwise(
            members in vec(member(), 1..8),
            piece in piece(),
            at in any::<prop::sample::Index>(),
        ) {
            let mut frame = format!("{{{}}}", members.join(","));
            let mut place = at.index(frame.len() + 1);
            while !frame.is_char_boundary(place) {
                place -= 1;
            }
            frame.insert_str(place, &piece);
            assert_agrees(&frame);
        }
    }
}
