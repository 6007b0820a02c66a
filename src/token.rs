//! The per-launch proxy token that local clients must present: 32 bytes from the operating
//! system's CSPRNG, encoded base64url without padding (43 characters), compared in constant
//! time. A new token on every launch; never logged except the one labelled stderr line that
//! stands in for the server-info file.

use std::fmt;

use subtle::ConstantTimeEq;

/// Length of the encoded token.
pub const TOKEN_LEN: usize = 43;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The client token of this launch.
pub struct ProxyToken([u8; TOKEN_LEN]);

/// The operating system's random source failed.
#[derive(Debug, thiserror::Error)]
#[error("could not get random bytes from the operating system for the proxy token: {0}")]
pub struct TokenError(getrandom::Error);

impl ProxyToken {
    /// A fresh token from the OS CSPRNG.
    pub fn generate() -> Result<Self, TokenError> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(TokenError)?;
        let token = Self::from_random(&raw);
        zeroize::Zeroize::zeroize(&mut raw);
        Ok(token)
    }

    /// Encodes 32 random bytes as base64url without padding.
    pub fn from_random(raw: &[u8; 32]) -> Self {
        let mut out = [0u8; TOKEN_LEN];
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut o = 0;
        for &b in raw {
            bits = (bits << 8) | u32::from(b);
            nbits += 8;
            while nbits >= 6 {
                nbits -= 6;
                out[o] = ALPHABET[((bits >> nbits) & 63) as usize];
                o += 1;
            }
        }
        // 256 bits = 42 whole sextets and 4 bits left over, padded with zero bits.
        out[o] = ALPHABET[((bits << (6 - nbits)) & 63) as usize];
        Self(out)
    }

    /// The token text, for the server-info file and the labelled stderr line.
    pub fn as_str(&self) -> &str {
        // The alphabet is ASCII, so this cannot fail; an empty string would match nothing.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    /// Whether `candidate` is exactly this token, in time independent of where they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        // The length is public (always 43); only the contents are compared in constant time:
        // the differences of all 8-byte words are gathered without a branch on the data, and
        // only their union is tested (one constant-time comparison rather than one per byte).
        if candidate.len() != TOKEN_LEN {
            return false;
        }
        let mut diff = 0u64;
        for (ours, theirs) in self.0.chunks(8).zip(candidate.chunks(8)) {
            diff |= word(ours) ^ word(theirs);
        }
        bool::from(diff.ct_eq(&0))
    }
}

/// Up to 8 bytes as a word, zero-padded.
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = bytes.len().min(8);
    w[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(w)
}

impl fmt::Debug for ProxyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyToken([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_matches_base64url_without_padding() {
        assert_eq!(
            ProxyToken::from_random(&[0u8; 32]).as_str(),
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        );
        assert_eq!(
            ProxyToken::from_random(&[0xff; 32]).as_str(),
            "__________________________________________8"
        );
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8;
        }
        // `python3 -c 'import base64;print(base64.urlsafe_b64encode(bytes(range(32))))'`
        assert_eq!(
            ProxyToken::from_random(&raw).as_str(),
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"
        );
    }

    #[test]
    fn generated_tokens_differ_and_match_only_themselves() {
        let a = ProxyToken::generate().expect("random");
        let b = ProxyToken::generate().expect("random");
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.as_str().len(), TOKEN_LEN);
        assert!(a.matches(a.as_str().as_bytes()));
        assert!(!a.matches(b.as_str().as_bytes()));
        assert!(!a.matches(&a.as_str().as_bytes()[..42]));
        assert!(!a.matches(b""));
        let mut longer = a.as_str().as_bytes().to_vec();
        longer.push(b'A');
        assert!(!a.matches(&longer));
        assert_eq!(format!("{a:?}"), "ProxyToken([REDACTED])");
    }

    #[test]
    fn a_difference_in_any_one_byte_is_refused() {
        let a = ProxyToken::from_random(&[7u8; 32]);
        for at in 0..TOKEN_LEN {
            for flip in [0x01u8, 0x20, 0x80] {
                let mut other = a.as_str().as_bytes().to_vec();
                other[at] ^= flip;
                assert!(!a.matches(&other), "byte {at} ^ {flip:#x} matched");
            }
        }
        assert!(a.matches(a.as_str().as_bytes()));
    }
}
