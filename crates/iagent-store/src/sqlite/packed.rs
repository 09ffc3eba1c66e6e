//! Message texts packed for storage.
//!
//! Each echo stores a history entry with two JSON texts, the message and its reply, and a row's
//! bytes are what the store pays for most: each byte is written into the WAL, copied back into
//! the database by the checkpointer, and grows the file. Half of those texts are field names,
//! and a record's `msg_id` is in them twice more (as the message's `msg_id` and the reply's
//! `ref_msg_id`) besides its own column. Packed, each field name the gateway writes is one byte,
//! and the record's `msg_id` after a `msg_id` or `ref_msg_id` name is one more: an echo's entry
//! of the benchmark takes less than half the bytes it did.
//!
//! Packing substitutes byte strings with bytes that JSON text never holds unescaped (control
//! characters: JSON escapes them inside strings and allows only whitespace outside them), so it
//! is lossless for any text, whatever its shape; a text that has a control character in it, or
//! none of the names, is stored as it is. A packed text is stored as a BLOB and any other as
//! TEXT, so one column holds both, and rows written before packing read back unchanged.

use rusqlite::Row;
use rusqlite::types::{ToSql, ToSqlOutput, Type, Value, ValueRef};

/// The field names packed, each as `Message::to_json` writes it (with the opening quote of a
/// string value), in the order it writes them. Name `i` is packed as byte `i + 1`.
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

/// The codes of the names whose value may be the record's `msg_id`.
const NAME_MSG_ID: u8 = 2;
const NAME_REF_MSG_ID: u8 = 3;

/// The code of the record's `msg_id` and the quote that closes it.
const RECORD_MSG_ID: u8 = NAMES.len() as u8 + 1;

/// A message's JSON text, bound as a statement's parameter in its stored form: packed into a
/// BLOB, or as TEXT when it cannot be packed. `msg_id` is that of the record the row is (its
/// own `msg_id` column), if any; it must be given again to read the text back.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pack<'a> {
    pub(super) text: &'a str,
    pub(super) msg_id: Option<&'a str>,
}

impl<'a> Pack<'a> {
    /// The stored form, packed into `buffer` (whatever it held before is dropped) when the
    /// text can be packed: texts packed one after the other into the same buffer cost no
    /// allocation each, as [`ToSql`] does.
    pub(super) fn stored<'b>(&self, buffer: &'b mut Vec<u8>) -> Stored<'b>
    where
        'a: 'b,
    {
        if pack(self.text, self.msg_id, buffer) {
            Stored::Packed(buffer)
        } else {
            Stored::Text(self.text)
        }
    }
}

/// A text in its stored form: packed, or as it was. Read back with the `msg_id` it was packed
/// with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stored<'a> {
    Text(&'a str),
    Packed(&'a [u8]),
}

impl Stored<'_> {
    /// The bytes it takes stored.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::Text(text) => text.len(),
            Self::Packed(packed) => packed.len(),
        }
    }

    /// The text, unpacked with `msg_id`.
    pub(super) fn text(self, msg_id: Option<&str>) -> Result<String, Unpack> {
        match self {
            Self::Text(text) => Ok(text.to_owned()),
            Self::Packed(packed) => unpack(packed, msg_id),
        }
    }
}

/// As a column holds it: a packed text is a BLOB, any other a TEXT.
impl ToSql for Stored<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Self::Text(text) => ValueRef::Text(text.as_bytes()),
            Self::Packed(packed) => ValueRef::Blob(packed),
        }))
    }
}

impl ToSql for Pack<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let mut packed = Vec::new();
        Ok(if pack(self.text, self.msg_id, &mut packed) {
            ToSqlOutput::Owned(Value::Blob(packed))
        } else {
            ToSqlOutput::Borrowed(ValueRef::Text(self.text.as_bytes()))
        })
    }
}

/// Reads column `index` of `row` back as the text [`Pack`] stored there with `msg_id`: a BLOB
/// is unpacked where SQLite holds it, a TEXT is the text.
pub(super) fn text(row: &Row<'_>, index: usize, msg_id: Option<&str>) -> rusqlite::Result<String> {
    optional_text(row, index, msg_id)?
        .ok_or_else(|| rusqlite::Error::InvalidColumnType(index, "text".into(), Type::Null))
}

/// Column `index` of `row` in its stored form, without reading it back: `None` for NULL.
pub(super) fn stored<'a>(row: &'a Row<'_>, index: usize) -> rusqlite::Result<Option<Stored<'a>>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => None,
        ValueRef::Blob(packed) => Some(Stored::Packed(packed)),
        value => Some(Stored::Text(value.as_str()?)),
    })
}

/// Like [`text`], for a column that may be NULL.
pub(super) fn optional_text(
    row: &Row<'_>,
    index: usize,
    msg_id: Option<&str>,
) -> rusqlite::Result<Option<String>> {
    stored(row, index)?
        .map(|stored| {
            stored.text(msg_id).map_err(|err| {
                rusqlite::Error::FromSqlConversionFailure(index, Type::Blob, Box::new(err))
            })
        })
        .transpose()
}

/// Why a packed text could not be read back: the row was not written by [`Pack`] with the
/// `msg_id` it was read with.
#[derive(Debug, thiserror::Error)]
pub(super) enum Unpack {
    #[error("packed text holds an unknown code {0}")]
    UnknownCode(u8),
    #[error("packed text names its record's msg_id, and the record has none")]
    NoMsgId,
    #[error("packed text is not UTF-8")]
    NotUtf8,
}

/// Packs `text` into `packed`; says whether it could, and it cannot if the text holds a
/// control character or nothing to pack (it is then stored as it is).
///
/// The names are found where a text written by `Message::to_json` has them: after a `{` or a
/// `,`, each the first of the names still to come that is there (they are written in the
/// order of [`NAMES`]), and once the last is found the rest is copied as it is.
fn pack(text: &str, msg_id: Option<&str>, packed: &mut Vec<u8>) -> bool {
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
    let mut copied = 0;
    let mut at = 0;
    let mut next_name = 0;
    while next_name < NAMES.len() {
        let Some(found) = name_start(&bytes[at..]) else {
            break;
        };
        let start = at + found;
        let Some(index) = (next_name..NAMES.len()).find(|&index| names_at(&bytes[start..], index))
        else {
            at = start + 1;
            continue;
        };
        next_name = index + 1;
        let code = index as u8 + 1;
        packed.extend_from_slice(&bytes[copied..start]);
        packed.push(code);
        at = start + NAMES[index].len();
        if let Some(msg_id) = msg_id
            && (code == NAME_MSG_ID || code == NAME_REF_MSG_ID)
            && bytes[at..].starts_with(msg_id.as_bytes())
            && bytes.get(at + msg_id.len()) == Some(&b'"')
        {
            packed.push(RECORD_MSG_ID);
            at += msg_id.len() + 1;
        }
        copied = at;
    }
    // Nothing packed: the text is stored as it is, and reads as text in the database too.
    if copied == 0 {
        return false;
    }
    packed.extend_from_slice(&bytes[copied..]);
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

/// Each name as two words, its first eight bytes and its last eight (every name is 9 to 16
/// bytes long, so the two cover it): a name is told from the bytes at a position by two
/// comparisons of words, where a comparison of bytes was a call to `memcmp` at each.
const NAME_WORDS: [(u64, u64); NAMES.len()] = {
    let mut words = [(0, 0); NAMES.len()];
    let mut index = 0;
    while index < NAMES.len() {
        let name = NAMES[index];
        assert!(name.len() > 8 && name.len() <= 16);
        let (first, last) = (first_word(name, 0), first_word(name, name.len() - 8));
        words[index] = (first, last);
        index += 1;
    }
    words
};

/// The eight bytes of `bytes` from `at`, as a word.
const fn first_word(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        bytes[at],
        bytes[at + 1],
        bytes[at + 2],
        bytes[at + 3],
        bytes[at + 4],
        bytes[at + 5],
        bytes[at + 6],
        bytes[at + 7],
    ])
}

/// Whether `bytes` begins with name `index`.
fn names_at(bytes: &[u8], index: usize) -> bool {
    let len = NAMES[index].len();
    let (Some(first), Some(last)) = (
        bytes.first_chunk::<8>(),
        bytes
            .get(len - 8..len)
            .and_then(|end| end.first_chunk::<8>()),
    ) else {
        return false;
    };
    (u64::from_le_bytes(*first), u64::from_le_bytes(*last)) == NAME_WORDS[index]
}

/// The text `packed` was packed from, with `msg_id` as it was packed with.
fn unpack(packed: &[u8], msg_id: Option<&str>) -> Result<String, Unpack> {
    let mut text = Vec::with_capacity(packed.len() * 2);
    let mut rest = packed;
    while let Some(at) = rest.iter().position(|&byte| byte < 0x20) {
        text.extend_from_slice(&rest[..at]);
        match rest[at] {
            RECORD_MSG_ID => {
                text.extend_from_slice(msg_id.ok_or(Unpack::NoMsgId)?.as_bytes());
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
    use super::*;

    /// The benchmark's message and the echo's reply to it, as the gateway writes them.
    const MESSAGE: &str = r#"{"chat_type":1,"msg_id":"b18ed80e06f78bca2-6-137522","timestamp":1796233539832,"sender_type":1,"sender_id":"u182","resp_code":0,"content_type":1,"content":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    const REPLY: &str = r#"{"chat_type":1,"msg_id":"g817e8b183d71232c-1111317","ref_msg_id":"b18ed80e06f78bca2-6-137522","timestamp":1796233539840,"sender_type":2,"sender_id":"echo","receiver_id":"u182","resp_code":0,"content_type":1,"content":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    const RECORD: &str = "b18ed80e06f78bca2-6-137522";

    /// `text` packed, or `None` if it is stored as it is.
    fn packed(text: &str, msg_id: Option<&str>) -> Option<Vec<u8>> {
        let mut packed = b"left from the text before".to_vec();
        pack(text, msg_id, &mut packed).then_some(packed)
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
        for (index, name) in NAMES.iter().enumerate() {
            let followed = [*name, b"1,\"x\":2}"].concat();
            assert!(names_at(&followed, index), "{index}");
            assert!(names_at(name, index), "{index}");
            for cut in 0..name.len() {
                assert!(!names_at(&name[..cut], index), "{index} cut at {cut}");
                let mut changed = followed.clone();
                changed[cut] ^= 0x20;
                assert!(!names_at(&changed, index), "{index} changed at {cut}");
            }
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
}
