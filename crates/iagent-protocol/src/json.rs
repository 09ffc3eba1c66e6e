//! JSON text written by hand for the one shape every message has.
//!
//! Each message is serialized at least once on its way through the gateway (its response
//! frame), and serde_json's general path was 13% of the gateway's instructions per
//! message: it escapes every field name as it escapes a value, byte by byte. Here the names are
//! literals, and a string is copied whole up to the first byte that needs an escape, found
//! eight bytes at a time ([`plain_len`], which the one-pass reader of frames uses too). The
//! output is byte for byte what serde_json writes for the same message, which the tests check
//! against it.

/// The fields of a message's text, in the order it has them; each is packed as its number
/// ([`crate::packed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Name {
    ChatType = 1,
    MsgId,
    RefMsgId,
    Timestamp,
    GroupId,
    SenderType,
    SenderId,
    ReceiverId,
    RespCode,
    ContentType,
    Content,
}

impl Name {
    /// Every name, in the order of the text.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 11] = [
        Self::ChatType,
        Self::MsgId,
        Self::RefMsgId,
        Self::Timestamp,
        Self::GroupId,
        Self::SenderType,
        Self::SenderId,
        Self::ReceiverId,
        Self::RespCode,
        Self::ContentType,
        Self::Content,
    ];

    /// The text before the value: the name quoted and punctuated (`",\"msg_id\":"`, or
    /// `"{\"chat_type\":"` for the first). A literal copied whole: quoting the name at run
    /// time cost the serialization 40% more instructions.
    #[inline]
    pub(crate) const fn key(self) -> &'static str {
        match self {
            Self::ChatType => "{\"chat_type\":",
            Self::MsgId => ",\"msg_id\":",
            Self::RefMsgId => ",\"ref_msg_id\":",
            Self::Timestamp => ",\"timestamp\":",
            Self::GroupId => ",\"group_id\":",
            Self::SenderType => ",\"sender_type\":",
            Self::SenderId => ",\"sender_id\":",
            Self::ReceiverId => ",\"receiver_id\":",
            Self::RespCode => ",\"resp_code\":",
            Self::ContentType => ",\"content_type\":",
            Self::Content => ",\"content\":",
        }
    }
}

/// Where a message's fields are written, one at a time in the order of its text: as JSON
/// ([`Object`]) or packed ([`crate::packed`]), by the one [`crate::Message::write`].
pub(crate) trait Fields {
    /// A number field: its name, then its digits.
    fn number(&mut self, name: Name, value: impl itoa::Integer);

    /// A string field: its name, then the value, quoted and escaped as JSON has it.
    fn string(&mut self, name: Name, value: &str);

    /// A string field, left out when it has no value (as serde's `skip_serializing_if`).
    #[inline]
    fn optional_string(&mut self, name: Name, value: Option<&str>) {
        if let Some(value) = value {
            self.string(name, value);
        }
    }
}

/// The bytes of a message's JSON text besides its strings' own: the field names, punctuation,
/// numbers, and a little room for escapes.
const JSON_OVERHEAD: usize = 192;

/// Room for a message's text: enough that writing it allocates once.
pub(crate) fn text_capacity(message: &crate::Message) -> usize {
    let optional = |field: &Option<String>| field.as_ref().map_or(0, |value| value.len() + 16);
    JSON_OVERHEAD
        + message.msg_id.len()
        + optional(&message.ref_msg_id)
        + optional(&message.group_id)
        + message.sender_id.len()
        + optional(&message.receiver_id)
        + message.content.len()
}

/// JSON text written a field at a time. The field methods are inlined: as calls they cost the
/// serialization a quarter more.
pub(crate) struct Object {
    text: String,
}

impl Object {
    /// Room for `capacity` bytes of text.
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            text: String::with_capacity(capacity),
        }
    }

    /// The text, with the object closed.
    pub(crate) fn finish(mut self) -> String {
        self.text.push('}');
        self.text
    }
}

impl Fields for Object {
    #[inline]
    fn number(&mut self, name: Name, value: impl itoa::Integer) {
        self.text.push_str(name.key());
        self.text.push_str(itoa::Buffer::new().format(value));
    }

    #[inline]
    fn string(&mut self, name: Name, value: &str) {
        self.text.push_str(name.key());
        self.text.push('"');
        push_string_body(&mut self.text, value);
    }
}

/// Appends what follows the opening quote of `value` as a JSON string: its text escaped as
/// serde_json escapes it (`"` and `\` by a backslash, the control characters with a short
/// escape by it (`\b \t \n \f \r`), the other control characters as `\u00XX`, everything else,
/// non-ASCII included, as it is), and the closing quote.
///
/// Inlined, with the escapes out of line: a message's text and its packed form write ten
/// strings or so, nearly all with nothing to escape, and as a call each cost its saved
/// registers and a second reservation.
#[inline]
pub(crate) fn push_string_body(out: &mut String, value: &str) {
    let plain = plain_len(value.as_bytes());
    out.reserve(value.len() + 1);
    if plain == value.len() {
        out.push_str(value);
    } else {
        push_escaped(out, value, plain);
    }
    out.push('"');
}

/// Appends `value` escaped, its first `plain` bytes being plain.
#[cold]
fn push_escaped(out: &mut String, value: &str, plain: usize) {
    let bytes = value.as_bytes();
    // `copied` is where the bytes not yet appended start; every index it takes is that of an
    // ASCII byte or the end, so every slice below falls on character boundaries.
    let (mut copied, mut at) = (0, plain);
    while let Some(&byte) = bytes.get(at) {
        out.push_str(&value[copied..at]);
        push_escape(out, byte);
        at += 1;
        copied = at;
        at += plain_len(&bytes[at..]);
    }
    out.push_str(&value[copied..]);
}

/// How many of the first bytes of `bytes` a JSON string holds as they are: those before the
/// first quote, backslash or control character (all of them if there is none). Looked for
/// eight bytes at a time, since nearly all of the gateway's JSON text is such runs, in the
/// frames it reads and in those it writes.
pub(crate) fn plain_len(bytes: &[u8]) -> usize {
    // Little-endian: the lowest byte of a word is the first, and the lowest flag is exact.
    let first_flagged = |found: u64| found.trailing_zeros() as usize / 8;
    let mut at = 0;
    while let Some(chunk) = bytes[at..].first_chunk::<8>() {
        let found = needing_escape(u64::from_le_bytes(*chunk));
        if found != 0 {
            return at + first_flagged(found);
        }
        at += 8;
    }
    if at == bytes.len() {
        return at;
    }
    // The last bytes, in the word that ends the text where it has one: the bytes it shares
    // with the words before are plain, so its lowest flag, if any, is among the last. A byte
    // at a time, they were a fifth of the instructions of writing a message's strings.
    match bytes.last_chunk::<8>() {
        Some(last) => match needing_escape(u64::from_le_bytes(*last)) {
            0 => bytes.len(),
            found => bytes.len() - 8 + first_flagged(found),
        },
        None => bytes
            .iter()
            .take_while(|&&byte| !needs_escape(byte))
            .count(),
    }
}

/// The high bit of each byte of `word` that [`needs_escape`]; above the lowest such byte,
/// others may be flagged wrongly (a borrow carries into them), so only the lowest flag may be
/// relied on.
fn needing_escape(word: u64) -> u64 {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = ONES << 7;
    // Flags the bytes of `word` below `n` (for `n` up to 0x80).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    below(word ^ (ONES * u64::from(b'"')), 1)
        | below(word ^ (ONES * u64::from(b'\\')), 1)
        | below(word, 0x20)
}

const fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

fn push_escape(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let short = match byte {
        b'"' => "\\\"",
        b'\\' => "\\\\",
        0x08 => "\\b",
        0x0c => "\\f",
        b'\n' => "\\n",
        b'\r' => "\\r",
        b'\t' => "\\t",
        _ => {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
            return;
        }
    };
    out.push_str(short);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{needs_escape, plain_len, push_string_body};

    /// `value` as a JSON string, quotes and all.
    fn written(value: &str) -> String {
        let mut out = String::from('"');
        push_string_body(&mut out, value);
        out
    }

    #[test]
    fn every_ascii_character_is_escaped_as_serde_json_escapes_it() {
        for byte in 0..=0x7f_u8 {
            let value = char::from(byte).to_string();
            let expected = serde_json::to_string(&value).expect("a string serializes");
            assert_eq!(written(&value), expected, "byte {byte:#04x}");
        }
    }

    #[test]
    fn escapes_inside_and_after_a_clean_chunk_are_found() {
        // A clean run longer than a chunk, then escapes at the chunk's edge and just past it,
        // and a multi-byte character across the edge.
        for value in [
            "0123456789abcdef\"",
            "0123456789abcde\"f",
            "0123456789abcdef0123456789abcdef\n",
            "0123456789abcdeé\\tail",
            "\u{1}0123456789abcdef\u{1f}",
            "",
        ] {
            let expected = serde_json::to_string(value).expect("a string serializes");
            assert_eq!(written(value), expected, "{value:?}");
        }
    }

    /// The run found eight bytes at a time ends at the first byte that needs an escape,
    /// wherever it is and whatever follows.
    #[test]
    fn a_plain_run_ends_at_the_first_byte_that_needs_an_escape() {
        let naive = |bytes: &[u8]| {
            bytes
                .iter()
                .take_while(|&&byte| !needs_escape(byte))
                .count()
        };
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0, 0x1f, b'\n'] {
                    for filler in [b'a', 0x21, 0x7f, 0xc3, b'!', b'#', b'[', b']'] {
                        let mut bytes = vec![filler; len];
                        if at < len {
                            bytes[at] = special;
                            // What follows the first must not move it.
                            for later in bytes.iter_mut().skip(at + 1).step_by(3) {
                                *later = b'"';
                            }
                        }
                        assert_eq!(plain_len(&bytes), naive(&bytes), "{bytes:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_string_is_written_as_serde_json_writes_it(value in any::<String>()) {
            let expected = serde_json::to_string(&value).expect("a string serializes");
            prop_assert_eq!(written(&value), expected);
        }

        #[test]
        fn strings_dense_in_escapes_are_written_as_serde_json_writes_them(
            value in "[a-z\"\\\\\u{0}-\u{1f}é😀]{0,64}"
        ) {
            let expected = serde_json::to_string(&value).expect("a string serializes");
            prop_assert_eq!(written(&value), expected);
        }
    }
}
