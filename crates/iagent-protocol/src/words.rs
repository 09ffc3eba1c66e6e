//! Byte strings of 9 to 16 bytes told at a position by two comparisons of words: the field
//! names of a message's text, which the reader of frames and the packer look for at each
//! member. A comparison of bytes was a call to `memcmp` at each, for a dozen bytes.

/// A byte string as two words, its first eight bytes and its last eight, which cover it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Literal {
    len: usize,
    first: u64,
    last: u64,
}

impl Literal {
    /// `bytes`, which must be 9 to 16 bytes long (checked when the constant is built).
    pub(crate) const fn new(bytes: &[u8]) -> Self {
        assert!(bytes.len() > 8 && bytes.len() <= 16);
        Self {
            len: bytes.len(),
            first: word_at(bytes, 0),
            last: word_at(bytes, bytes.len() - 8),
        }
    }

    /// `literals` as [`Literal`]s, for a table of them.
    pub(crate) const fn all<const N: usize>(literals: [&[u8]; N]) -> [Self; N] {
        let mut all = [Self {
            len: 0,
            first: 0,
            last: 0,
        }; N];
        let mut index = 0;
        while index < N {
            all[index] = Self::new(literals[index]);
            index += 1;
        }
        all
    }

    /// Its length in bytes.
    pub(crate) const fn len(&self) -> usize {
        self.len
    }

    /// Whether `bytes` begins with it.
    #[inline]
    pub(crate) fn starts(&self, bytes: &[u8]) -> bool {
        let (Some(first), Some(last)) = (
            bytes.first_chunk::<8>(),
            bytes
                .get(self.len - 8..self.len)
                .and_then(|end| end.first_chunk::<8>()),
        ) else {
            return false;
        };
        (u64::from_le_bytes(*first), u64::from_le_bytes(*last)) == (self.first, self.last)
    }
}

/// The eight bytes of `bytes` from `at`, as a word.
const fn word_at(bytes: &[u8], at: usize) -> u64 {
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

/// Checks that `literal` tells `text`, the bytes it was made of, by every one of them: it is
/// found at the start of the text and of the text followed by more, and not once the text is
/// cut short or any of its bytes is changed.
#[cfg(test)]
pub(crate) fn assert_told_by_every_byte(literal: &Literal, text: &[u8]) {
    let followed = [text, b"1,\"x\":2}"].concat();
    assert!(literal.starts(&followed), "{text:?}");
    assert!(literal.starts(text), "{text:?}");
    for cut in 0..text.len() {
        assert!(!literal.starts(&text[..cut]), "{text:?} cut at {cut}");
        let mut changed = followed.clone();
        changed[cut] ^= 0x20;
        assert!(!literal.starts(&changed), "{text:?} changed at {cut}");
    }
}

#[cfg(test)]
mod tests {
    use super::{Literal, assert_told_by_every_byte};

    #[test]
    fn a_literal_is_told_by_every_one_of_its_bytes() {
        for text in [&b"123456789"[..], b"0123456789abcdef", b"{\"x\":\"0123"] {
            assert_told_by_every_byte(&Literal::new(text), text);
        }
    }
}
