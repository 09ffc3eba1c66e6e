//! A message's JSON text packed for storage.
//!
//! A store that keeps messages pays for each byte it keeps: written into a log, copied into a
//! database, growing a file. Half of a message's text is field names, and a stored record's
//! `msg_id` is in its texts twice more (as the message's `msg_id` and its reply's
//! `ref_msg_id`) besides its own key. Packed, each field name is one byte, and the record's
//! `msg_id` after a `msg_id` or `ref_msg_id` name is one more: an echo's message and reply take
//! less than half the bytes of their texts.
//!
//! Packing substitutes byte strings with bytes that JSON text never holds unescaped (control
//! characters: JSON escapes them inside strings and allows only whitespace outside them), so it
//! is lossless for any text, whatever its shape; [`pack`] declines a text that has a control
//! character in it, or none of the names. A packed text is ASCII where the text was, so it is
//! UTF-8 too.
//!
//! The format is defined here, beside [`Message::to_json`], because a message is packed from
//! its fields ([`Message::pack_into`]) as well as from a text: a message the gateway holds is
//! stored without its JSON text being written first, and [`unpack`] must give that text back.

use crate::json::{self, Fields, Name};
use crate::message::Message;
use crate::words::Literal;

/// What each code stands for: a field's name as [`Message::to_json`] writes it, with the
/// opening quote of a string value. [`Name`] `n` is packed as byte `n`, and stands for
/// `NAMES[n - 1]`.
const NAMES: [&[u8]; 11] = [
    b"{\"chat_type\":",
    b",\"msg_id\":\"",
    b",\"ref_msg_id\":\"",
    b",\"timestamp\":",
    b",\"group_id\":\"",
    b",\"sender_type\":",
    b",\"sender_id\":\"",
    b",\"receiver_id\":\"",
    b",\"resp_code\":",
    b",\"content_type\":",
    b",\"content\":\"",
];

/// The code of the record's `msg_id` and the quote that closes it.
const RECORD_MSG_ID: u8 = NAMES.len() as u8 + 1;

/// Why a packed text could not be read back: it was not packed here with the record it was
/// read with.
#[derive(Debug, thiserror::Error)]
pub enum Unpack {
    /// A byte that is no code of the format.
    #[error("packed text holds an unknown code {0}")]
    UnknownCode(u8),
    /// A record's `msg_id` was packed, and none was given to read it with.
    #[error("packed text names its record's msg_id, and the record has none")]
    NoMsgId,
    /// Not a text at all.
    #[error("packed text is not UTF-8")]
    NotUtf8,
}

impl Message {
    /// Packs the message's text into `packed` (whatever it held before is dropped), written
    /// from the fields: [`unpack`] with the same `record` gives back [`Message::to_json`]'s
    /// text, and the bytes are those [`pack`] makes of that text, so that a store need not
    /// write the text only to pack it.
    pub fn pack_into(&self, record: Option<&str>, packed: &mut String) {
        packed.clear();
        packed.reserve(json::text_capacity(self));
        self.write(&mut Packer { packed, record });
        packed.push('}');
    }
}

/// Writes a message's fields in packed form.
struct Packer<'a> {
    packed: &'a mut String,
    /// The `msg_id` whose value is packed as [`RECORD_MSG_ID`].
    record: Option<&'a str>,
}

impl Fields for Packer<'_> {
    #[inline]
    fn number(&mut self, name: Name, value: impl itoa::Integer) {
        self.packed.push(char::from(name as u8));
        self.packed.push_str(itoa::Buffer::new().format(value));
    }

    #[inline]
    fn string(&mut self, name: Name, value: &str) {
        self.packed.push(char::from(name as u8));
        // Only a value written as it is: [`pack`] compares the record with the text's bytes.
        if matches!(name, Name::MsgId | Name::RefMsgId)
            && self.record == Some(value)
            && json::plain_len(value.as_bytes()) == value.len()
        {
            self.packed.push(char::from(RECORD_MSG_ID));
        } else {
            json::push_string_body(self.packed, value);
        }
    }
}

/// Packs `text` into `packed` (whatever it held before is dropped); says whether it could, and
/// it cannot if the text holds a control character or nothing to pack (it is then stored as
/// it is).
///
/// The names are found where a text written by [`Message::to_json`] has them: after a `{` or
/// a `,`, each the first of the names still to come that is there (they are written in the
/// order of [`NAMES`]), and once the last is found the rest is copied as it is.
pub fn pack(text: &str, record: Option<&str>, packed: &mut String) -> bool {
    let bytes = text.as_bytes();
    packed.clear();
    // Folded rather than searched, so that the check runs over whole vectors of bytes.
    if bytes
        .iter()
        .fold(false, |control, &byte| control | (byte < 0x20))
    {
        return false;
    }
    packed.reserve(bytes.len());
    // Every index `copied` and `at` take is that of an ASCII byte or the end, so every slice
    // below falls on character boundaries.
    let mut copied = 0;
    let mut at = 0;
    let mut next_name = 0;
    while next_name < NAMES.len() {
        let Some(found) = name_start(&bytes[at..]) else {
            break;
        };
        let start = at + found;
        let Some(index) =
            (next_name..NAMES.len()).find(|&index| NAME_WORDS[index].starts(&bytes[start..]))
        else {
            at = start + 1;
            continue;
        };
        next_name = index + 1;
        let code = index as u8 + 1;
        packed.push_str(&text[copied..start]);
        packed.push(char::from(code));
        at = start + NAMES[index].len();
        if let Some(record) = record
            && (code == Name::MsgId as u8 || code == Name::RefMsgId as u8)
            && bytes[at..].starts_with(record.as_bytes())
            && bytes.get(at + record.len()) == Some(&b'"')
        {
            packed.push(char::from(RECORD_MSG_ID));
            at += record.len() + 1;
        }
        copied = at;
    }
    // Nothing packed: the text is stored as it is, and reads as text in the database too.
    if copied == 0 {
        return false;
    }
    packed.push_str(&text[copied..]);
    true
}

/// Where the next name may begin: the first `{` or `,`, looked for eight bytes at a time, in a
/// word. The values between names are a few bytes long (only the content, written last, is
/// long), too short for a vector search's setup, which `memchr` paid at each of them, and a
/// byte at a time they took more instructions: the benchmark's message and reply packed in
/// 2 710 instead of 2 950 (callgrind).
fn name_start(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const BRACES: u64 = u64::from_le_bytes([b'{'; 8]);
    const COMMAS: u64 = u64::from_le_bytes([b','; 8]);
    // The high bit of each byte that is zero, and maybe of bytes above one that is: the
    // lowest set bit is always the first zero byte's.
    let zeros = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut at = 0;
    while let Some(chunk) = bytes[at..].first_chunk::<8>() {
        let word = u64::from_le_bytes(*chunk);
        let found = zeros(word ^ BRACES) | zeros(word ^ COMMAS);
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(|&byte| byte == b'{' || byte == b',')
        .map(|found| at + found)
}

/// Each name, told at a position by two words.
const NAME_WORDS: [Literal; NAMES.len()] = Literal::all(NAMES);

/// The text `packed` was packed from, read with the `record` it was packed with.
pub fn unpack(packed: &[u8], record: Option<&str>) -> Result<String, Unpack> {
    let mut text = Vec::with_capacity(packed.len() * 2);
    let mut rest = packed;
    while let Some(at) = rest.iter().position(|&byte| byte < 0x20) {
        text.extend_from_slice(&rest[..at]);
        match rest[at] {
            RECORD_MSG_ID => {
                text.extend_from_slice(record.ok_or(Unpack::NoMsgId)?.as_bytes());
                text.push(b'"');
            }
            code @ 1..RECORD_MSG_ID => text.extend_from_slice(NAMES[usize::from(code) - 1]),
            code => return Err(Unpack::UnknownCode(code)),
        }
        rest = &rest[at + 1..];
    }
    text.extend_from_slice(rest);
    String::from_utf8(text).map_err(|_| Unpack::NotUtf8)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{ChatType, ContentType, RespCode, SenderType};

    /// The benchmark's message and the echo's reply to it, as the gateway writes them.
    const MESSAGE: &str = r#"{"chat_type":1,"msg_id":"b18ed80e06f78bca2-6-137522","timestamp":1796233539832,"sender_type":1,"sender_id":"u182","resp_code":0,"content_type":1,"content":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    const REPLY: &str = r#"{"chat_type":1,"msg_id":"g817e8b183d71232c-1111317","ref_msg_id":"b18ed80e06f78bca2-6-137522","timestamp":1796233539840,"sender_type":2,"sender_id":"echo","receiver_id":"u182","resp_code":0,"content_type":1,"content":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    const RECORD: &str = "b18ed80e06f78bca2-6-137522";

    /// `text` packed, or `None` if it is stored as it is.
    fn packed(text: &str, msg_id: Option<&str>) -> Option<Vec<u8>> {
        let mut packed = String::from("left from the text before");
        pack(text, msg_id, &mut packed).then(|| packed.into_bytes())
    }

    /// The bytes `text` takes stored, once it is checked to read back as it was.
    fn round_trip(text: &str, msg_id: Option<&str>) -> usize {
        let Some(packed) = packed(text, msg_id) else {
            return text.len();
        };
        assert_eq!(
            unpack(&packed, msg_id).expect("packed here"),
            text,
            "packed as {packed:?}"
        );
        assert!(packed.len() < text.len(), "{text:?} packed as {packed:?}");
        packed.len()
    }

    #[test]
    fn an_echo_entry_packs_to_less_than_half_its_text() {
        let packed = round_trip(MESSAGE, Some(RECORD)) + round_trip(REPLY, Some(RECORD));
        assert!(
            packed * 2 < MESSAGE.len() + REPLY.len(),
            "{packed} bytes packed of {}",
            MESSAGE.len() + REPLY.len()
        );
    }

    #[test]
    fn the_record_msg_id_is_packed_only_where_it_is_a_whole_value() {
        let without = round_trip(REPLY, None);
        assert_eq!(round_trip(REPLY, Some(RECORD)), without - RECORD.len());
        // A prefix of the value, or a value the record's id is a prefix of, stays as it is.
        assert_eq!(
            round_trip(REPLY, Some("b18ed80e06f78bca2-6-13752")),
            without
        );
        assert_eq!(
            round_trip(REPLY, Some("b18ed80e06f78bca2-6-1375222")),
            without
        );
        // The same id as another field's value is not taken for it.
        let text = r#"{"chat_type":1,"msg_id":"m","timestamp":1,"sender_type":1,"sender_id":"m","resp_code":0,"content_type":1,"content":"m"}"#;
        let packed = packed(text, Some("m")).expect("names to pack");
        assert_eq!(
            packed.iter().filter(|&&byte| byte == RECORD_MSG_ID).count(),
            1
        );
        assert_eq!(unpack(&packed, Some("m")).expect("packed here"), text);
    }

    #[test]
    fn every_name_is_packed_whatever_the_values_before_it_hold() {
        let texts = [
            r#"{"chat_type":1,"msg_id":"a\\","timestamp":-1,"sender_type":1,"sender_id":"\"","resp_code":0,"content_type":1,"content":"\\\""}"#,
            r#"{"chat_type":1,"msg_id":"a\",\"timestamp\":2","timestamp":1.5e3,"sender_type":1,"sender_id":"{\"chat_type\":1}","resp_code":0,"content_type":1,"content":","}"#,
            r#"{"chat_type":1,"msg_id":"m","timestamp":1 ,"sender_type":1,"sender_id":"u","resp_code":0,"content_type":1,"content":""}"#,
        ];
        for text in texts {
            let packed = packed(text, None).expect("names to pack");
            assert_eq!(unpack(&packed, None).expect("packed here"), text);
            let names = packed.iter().filter(|&&byte| byte < RECORD_MSG_ID).count();
            assert_eq!(names, 8, "{text} packed as {packed:?}");
        }
    }

    #[test]
    fn a_name_is_told_by_every_one_of_its_bytes() {
        for (name, words) in NAMES.iter().zip(&NAME_WORDS) {
            crate::words::assert_told_by_every_byte(words, name);
        }
    }

    #[test]
    fn names_after_long_values_are_packed() {
        // Values of every length around the words `name_start` reads, with a `,` or `{` in
        // some of them, and the record's id among them.
        for length in [0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 200] {
            for filler in ["x", ",", "{"] {
                let long = filler.repeat(length);
                let text = format!(
                    r#"{{"chat_type":1,"msg_id":"{long}","timestamp":1,"sender_type":1,"sender_id":"{long}","resp_code":0,"content_type":1,"content":"{long}"}}"#
                );
                for msg_id in [None, Some(long.as_str())] {
                    round_trip(&text, msg_id);
                    let packed = packed(&text, msg_id).expect("names to pack");
                    let names = packed.iter().filter(|&&byte| byte < RECORD_MSG_ID).count();
                    assert_eq!(names, 8, "{text} packed as {packed:?}");
                }
            }
        }
    }

    #[test]
    fn a_name_start_is_found_wherever_it_is_in_a_word() {
        let first = |bytes: &[u8]| bytes.iter().position(|&byte| byte == b'{' || byte == b',');
        // Fillers next to `,` and `{` in value, and bytes with the high bit set: a word's
        // search must neither miss the first nor take one of them for it.
        for filler in [b'x', b'+', b'-', b'z', b'|', 0x00, 0xac, 0xfb] {
            for len in 0..40 {
                for at in 0..=len {
                    for (found, then) in [(b',', b'{'), (b'{', b',')] {
                        let mut bytes = vec![filler; len];
                        if let Some(byte) = bytes.get_mut(at) {
                            *byte = found;
                        }
                        if let Some(byte) = bytes.get_mut(at + 3) {
                            *byte = then;
                        }
                        assert_eq!(name_start(&bytes), first(&bytes), "{bytes:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn any_text_reads_back_as_it_was() {
        let texts = [
            "",
            "{}",
            "not json at all",
            r#"{"content":"a","chat_type":1}"#,
            r#"{"chat_type":1,"chat_type":2,"msg_id":"x"}"#,
            r#"{"chat_type":1,"content":"{\"chat_type\":1,\"msg_id\":\"m\"}, {\"msg_id\":\"m\"}"}"#,
            r#"[{"chat_type":1},{"chat_type":2,"msg_id":"m"}]"#,
            r#"{"chat_type":1,"msg_id":"m","content":"ünïcødé ✓ 𝄞,{"}"#,
            r#"{"chat_type":1,"msg_id":"m"#,
            ",\"msg_id\":\"m\",\"msg_id\":\"m\"",
        ];
        for text in texts {
            for msg_id in [None, Some("m"), Some(""), Some("x")] {
                round_trip(text, msg_id);
            }
        }
    }

    #[test]
    fn a_text_with_a_control_character_or_nothing_to_pack_is_stored_as_it_is() {
        let texts = [
            "{\n\"chat_type\":1}",
            "{\"chat_type\":1}\r\n",
            "\u{1}\u{c}",
            "",
            "response to m1",
            r#"{"chat_type" :1,"msg_id" : "m"}"#,
        ];
        for text in texts {
            assert_eq!(packed(text, Some("m")), None, "{text:?}");
        }
    }

    #[test]
    fn a_packed_text_read_with_the_wrong_record_is_an_error() {
        let packed = packed(MESSAGE, Some(RECORD)).expect("names to pack");
        assert!(matches!(unpack(&packed, None), Err(Unpack::NoMsgId)));
        assert!(matches!(
            unpack(&[b'a', 31], None),
            Err(Unpack::UnknownCode(31))
        ));
        assert!(matches!(unpack(&[1, 0xff], None), Err(Unpack::NotUtf8)));
    }

    #[test]
    fn each_code_stands_for_its_name_as_json_writes_it() {
        for name in Name::ALL {
            let stands_for = NAMES[usize::from(name as u8) - 1];
            let key = name.key().as_bytes();
            assert!(
                stands_for == key || stands_for == [key, b"\""].concat(),
                "{name:?}"
            );
        }
    }

    /// The benchmark's message and reply, as messages.
    fn echo() -> (Message, Message) {
        let message: Message = serde_json::from_str(MESSAGE).expect("a message");
        let reply: Message = serde_json::from_str(REPLY).expect("a message");
        (message, reply)
    }

    /// `message` packed from its fields with `record`, once it is checked to read back as its
    /// text.
    fn packed_from_fields(message: &Message, record: Option<&str>) -> Vec<u8> {
        let mut packed = String::from("left from the message before");
        message.pack_into(record, &mut packed);
        assert_eq!(
            unpack(packed.as_bytes(), record).expect("packed here"),
            message.to_json()
        );
        packed.into_bytes()
    }

    #[test]
    fn a_message_packs_from_its_fields_as_its_text_packs() {
        let (message, reply) = echo();
        for record in [None, Some(RECORD), Some("another")] {
            for message in [&message, &reply] {
                assert_eq!(
                    Some(packed_from_fields(message, record)),
                    packed(&message.to_json(), record),
                    "{record:?}"
                );
            }
        }
        let packed = packed_from_fields(&reply, Some(RECORD));
        assert_eq!(packed.iter().filter(|&&b| b == RECORD_MSG_ID).count(), 1);
    }

    /// A `msg_id` that needs an escape in the text is written out, even when it is the
    /// record's: the record's code stands for the id as it is, not as JSON escapes it.
    #[test]
    fn a_record_id_with_an_escape_is_written_out() {
        let (mut message, _) = echo();
        message.msg_id = "quoted \"id\"".into();
        let packed = packed_from_fields(&message, Some(&message.msg_id));
        assert!(!packed.contains(&RECORD_MSG_ID));
    }

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9-]{0,12}",
            any::<String>(),
            "[a-z\"\\\\\u{0}-\u{1f},{é]{0,16}"
        ]
    }

    prop_compose! {
        fn message()(
            chat_type in prop_oneof![Just(ChatType::Private), Just(ChatType::Group)],
            msg_id in text(),
            ref_msg_id in proptest::option::of(text()),
            timestamp in any::<i64>(),
            group_id in proptest::option::of(text()),
            sender_type in prop_oneof![Just(SenderType::User), Just(SenderType::Agent)],
            sender_id in text(),
            receiver_id in proptest::option::of(text()),
            resp_code in prop_oneof![Just(RespCode::Ok), Just(RespCode::NoReply), Just(RespCode::Failed)],
            content_type in prop_oneof![Just(ContentType::Text), Just(ContentType::Image)],
            content in text(),
        ) -> Message {
            Message {
                chat_type, msg_id, ref_msg_id, timestamp, group_id, sender_type, sender_id,
                receiver_id, resp_code, content_type, content,
            }
        }
    }

    proptest! {
        /// Whatever the fields hold, and whichever of them is the record's id: the packed
        /// form reads back as the text, and is the text's own packed form.
        #[test]
        fn any_message_packs_from_its_fields_as_its_text_packs(
            message in message(),
            record in prop_oneof![
                Just(None),
                text().prop_map(Some),
                Just(Some(String::new())),
            ],
        ) {
            let records = [
                record,
                Some(message.msg_id.clone()),
                message.ref_msg_id.clone(),
            ];
            for record in &records {
                let record = record.as_deref();
                let from_fields = packed_from_fields(&message, record);
                let plain = |id: &str| json::plain_len(id.as_bytes()) == id.len();
                if record.is_none_or(plain) {
                    prop_assert_eq!(Some(from_fields), packed(&message.to_json(), record));
                }
            }
        }
    }
}
