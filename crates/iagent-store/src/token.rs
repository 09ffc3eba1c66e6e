//! App tokens: 256 random bits, shown once, stored only as a SHA-256 hash.
//!
//! A token is looked up by the hash of what the client presented. Because the attacker controls
//! only the preimage, the index search over hashes reveals nothing about any stored token's
//! bytes, so no separate constant-time comparison is needed. A slow password hash would add
//! nothing either: the token has 256 bits of entropy, far beyond any guessing.

use std::fmt;

use sha2::{Digest, Sha256};

/// Every token starts with this, so that a leaked one is recognizable in secret scanners.
pub const TOKEN_PREFIX: &str = "iat_";

/// A freshly issued app token. Its `Debug` form hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A new random token.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(Self(format!("{TOKEN_PREFIX}{}", hex(&bytes))))
    }

    /// The secret, to show its owner once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The SHA-256 of a presented token: the only form in which tokens are stored.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_distinct_prefixed_and_256_bits() {
        let a = Token::generate().expect("random bytes");
        let b = Token::generate().expect("random bytes");
        assert_ne!(a, b);
        assert!(a.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(a.expose().len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(format!("{a:?}"), "Token(<redacted>)");
    }

    #[test]
    fn hash_is_sha256() {
        assert_eq!(
            hex(&hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
