//! The operator's API key: read once from fd 0 with `read(2)` straight into one locked,
//! page-aligned region that is excluded from core dumps, validated, and turned into the
//! `Authorization` header value without a copy.
//!
//! The key type has no `Display`, `Clone` or `Serialize`; its `Debug` prints `[REDACTED]`,
//! and no error type here can carry a byte of the key.

use std::fmt;
use std::io;

use bytes::Bytes;
use http::HeaderValue;

use crate::sys;

/// Longest key accepted, in bytes. Long enough for Azure Entra access tokens (JWTs).
pub const MAX_KEY_LEN: usize = 8192;

/// What precedes the key in the header value; stored in front of the key in the same region
/// so the whole `Bearer <key>` value is one contiguous, static slice.
const BEARER: &[u8] = b"Bearer ";

/// How to give the proxy its key, appended to key errors.
const HOW_TO_PIPE: &str = "pipe the key in on standard input, e.g. \
`printenv OPENAI_API_KEY | env -u OPENAI_API_KEY responses-api-proxy ...`";

/// Why the key could not be read. Never carries a byte of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Standard input ended (or held only a line break) before any key byte.
    #[error("no API key on standard input: {HOW_TO_PIPE}")]
    Empty,
    /// More than [`MAX_KEY_LEN`] bytes before the end of the line.
    #[error("the API key is longer than {MAX_KEY_LEN} bytes; pass only the key, on one line")]
    TooLong,
    /// A byte outside the token68 alphabet, at this 1-based position.
    #[error(
        "byte {position} of the API key is not allowed: a key is letters, digits and \
         - . _ ~ + / with optional trailing '=' (check for stray spaces, quotes or a \
         `KEY=` prefix)"
    )]
    InvalidByte {
        /// 1-based position of the first offending byte.
        position: usize,
    },
    /// read(2) on fd 0 failed.
    #[error("could not read the API key from standard input ({0}); {HOW_TO_PIPE}")]
    Read(io::ErrorKind),
    /// The memory region for the key could not be mapped.
    #[error("could not allocate memory for the API key ({0})")]
    Alloc(io::ErrorKind),
}

/// Checks that `key` is a valid RFC 7235 token68: one or more of `A-Z a-z 0-9 - . _ ~ + /`,
/// then any number of `=`.
pub fn validate_key(key: &[u8]) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    let mut padding = false;
    for (i, &b) in key.iter().enumerate() {
        let ok = if b == b'=' {
            padding = true;
            i > 0
        } else {
            !padding && (b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
        };
        if !ok {
            return Err(KeyError::InvalidByte { position: i + 1 });
        }
    }
    Ok(())
}

/// Reads one line into `buf` with `read`, retrying interrupted reads and accepting short
/// ones, stopping at the first `\n` or at end of input. Returns the line's length without
/// the `\n` and without one trailing `\r`. Everything in `buf` after the line (the line
/// break and any bytes read past it) is zeroed; on error all of `buf` is.
pub fn read_line_with(
    buf: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
) -> Result<usize, KeyError> {
    let result = read_line_inner(buf, &mut read);
    let keep = *result.as_ref().unwrap_or(&0);
    zeroize::Zeroize::zeroize(&mut buf[keep..]);
    result
}

fn read_line_inner(
    buf: &mut [u8],
    read: &mut impl FnMut(&mut [u8]) -> io::Result<usize>,
) -> Result<usize, KeyError> {
    let mut filled = 0;
    let mut line_end = None;
    while line_end.is_none() {
        if filled == buf.len() {
            return Err(KeyError::TooLong);
        }
        match read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => {
                let start = filled;
                filled += n.min(buf.len() - start);
                line_end = buf[start..filled]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map(|i| start + i);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(KeyError::Read(e.kind())),
        }
    }
    let mut len = line_end.unwrap_or(filled);
    if len > 0 && buf[len - 1] == b'\r' {
        len -= 1;
    }
    validate_key(&buf[..len])?;
    Ok(len)
}

/// The operator's API key, held in one locked page for the life of the process.
pub struct ApiKey {
    /// `Bearer <key>`, inside the locked region.
    bearer: &'static [u8],
    /// The header value built over `bearer` without copying, marked sensitive.
    header: HeaderValue,
    /// Why `mlock` failed, if it did (the key then may reach swap).
    lock_error: Option<io::Error>,
}

impl ApiKey {
    /// Reads the key from fd 0 (see [`read_line_with`]) into a fresh locked region. When fd
    /// 0 is a terminal, echo is turned off while reading.
    pub fn read_from_stdin() -> Result<Self, KeyError> {
        let region = sys::map_private_pages(BEARER.len() + MAX_KEY_LEN + 2)
            .map_err(|e| KeyError::Alloc(e.kind()))?;
        // Lock and mark before a single key byte lands in the region.
        let lock_error = sys::mlock(region).err();
        // MADV_DONTDUMP failing leaves the region dumpable only if core dumps were possible,
        // which hardening already made impossible; it is not worth refusing to start over.
        let _ = sys::madvise_dontdump(region);
        region[..BEARER.len()].copy_from_slice(BEARER);
        let echo_guard = if sys::is_terminal(0) {
            let _ = crate::log::stderr_line(&[
                "responses-api-proxy: type or paste the API key, then press Enter (input is not echoed)",
            ]);
            sys::EchoOff::new(0).ok()
        } else {
            None
        };
        let line_area = &mut region[BEARER.len()..BEARER.len() + MAX_KEY_LEN + 2];
        let result = read_line_with(line_area, |buf| sys::read_fd(0, buf));
        drop(echo_guard);
        let len = result?;
        let region: &'static [u8] = region;
        Self::from_static_bearer(&region[..BEARER.len() + len], lock_error)
    }

    fn from_static_bearer(
        bearer: &'static [u8],
        lock_error: Option<io::Error>,
    ) -> Result<Self, KeyError> {
        let mut header = HeaderValue::from_maybe_shared(Bytes::from_static(bearer))
            .map_err(|_| KeyError::InvalidByte { position: 1 })?;
        header.set_sensitive(true);
        Ok(Self {
            bearer,
            header,
            lock_error,
        })
    }

    /// A key over static test bytes (`bearer` must start with `Bearer `).
    #[doc(hidden)]
    pub fn for_tests(bearer: &'static str) -> Self {
        Self::from_static_bearer(bearer.as_bytes(), None).expect("test key is valid")
    }

    /// `Authorization: Bearer <key>`, sensitive. Cloning it copies no key bytes.
    pub fn header_value(&self) -> HeaderValue {
        self.header.clone()
    }

    /// The key's bytes (without `Bearer `), for masking reflections and scrubbing the
    /// environment. Never log, format or copy these.
    pub fn expose_bytes(&self) -> &'static [u8] {
        &self.bearer[BEARER.len()..]
    }

    /// Why locking the key in memory failed, if it did.
    pub fn lock_error(&self) -> Option<&io::Error> {
        self.lock_error.as_ref()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out `data` in the given chunk sizes, with an EINTR before each.
    fn scripted(data: &[u8], chunks: &[usize]) -> impl FnMut(&mut [u8]) -> io::Result<usize> {
        let data = data.to_vec();
        let chunks = chunks.to_vec();
        let mut pos = 0;
        let mut call = 0;
        move |buf: &mut [u8]| {
            call += 1;
            if call % 2 == 1 {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            let want = chunks.get(call / 2 - 1).copied().unwrap_or(usize::MAX);
            let n = want.min(buf.len()).min(data.len() - pos);
            buf[..n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
            Ok(n)
        }
    }

    fn read(data: &[u8], chunks: &[usize]) -> (Result<usize, KeyError>, Vec<u8>) {
        let mut buf = vec![0u8; MAX_KEY_LEN + 2];
        let r = read_line_with(&mut buf, scripted(data, chunks));
        (r, buf)
    }

    #[test]
    fn reads_key_lines_in_every_shape() {
        type Case<'a> = (&'a [u8], &'a [usize], Result<usize, KeyError>);
        let cases: &[Case<'_>] = &[
            (b"sk-test-abc\n", &[], Ok(11)),
            (b"sk-test-abc", &[], Ok(11)),
            (b"sk-test-abc\r\n", &[], Ok(11)),
            (b"sk-test-abc\ntrailing junk", &[], Ok(11)),
            (
                b"sk-test-abc\n",
                &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                Ok(11),
            ),
            (b"sk-test-abc\r\n", &[12, 1], Ok(11)),
            (b"eyJhbGc.eyJzdWI.c2ln==\n", &[3], Ok(22)),
            (b"", &[], Err(KeyError::Empty)),
            (b"\n", &[], Err(KeyError::Empty)),
            (b"\r\n", &[], Err(KeyError::Empty)),
            (
                b" sk-test\n",
                &[],
                Err(KeyError::InvalidByte { position: 1 }),
            ),
            (
                b"sk-test \n",
                &[],
                Err(KeyError::InvalidByte { position: 8 }),
            ),
            (
                b"sk\"test\n",
                &[],
                Err(KeyError::InvalidByte { position: 3 }),
            ),
            (
                b"sk-te\rst\n",
                &[],
                Err(KeyError::InvalidByte { position: 6 }),
            ),
            (
                b"KEY=sk-test\n",
                &[],
                Err(KeyError::InvalidByte { position: 5 }),
            ),
            (b"=abc\n", &[], Err(KeyError::InvalidByte { position: 1 })),
            (b"ab=c\n", &[], Err(KeyError::InvalidByte { position: 4 })),
            (
                b"sk\x00test\n",
                &[],
                Err(KeyError::InvalidByte { position: 3 }),
            ),
            (
                b"sk\xfftest\n",
                &[],
                Err(KeyError::InvalidByte { position: 3 }),
            ),
        ];
        for (input, chunks, want) in cases {
            let (got, buf) = read(input, chunks);
            assert_eq!(&got, want, "input {:?}", String::from_utf8_lossy(input));
            let keep = *got.as_ref().unwrap_or(&0);
            assert!(buf[keep..].iter().all(|&b| b == 0), "tail not zeroed");
        }
    }

    #[test]
    fn length_limits_are_exact() {
        let mut key = vec![b'k'; MAX_KEY_LEN];
        key.extend_from_slice(b"\r\n");
        assert_eq!(read(&key, &[]).0, Ok(MAX_KEY_LEN));
        assert_eq!(read(&key, &[4096, 4096, 1, 1]).0, Ok(MAX_KEY_LEN));
        let long = vec![b'k'; MAX_KEY_LEN + 1];
        assert_eq!(read(&long, &[]).0, Err(KeyError::TooLong));
        let longer = vec![b'k'; MAX_KEY_LEN + 100];
        let (r, buf) = read(&longer, &[]);
        assert_eq!(r, Err(KeyError::TooLong));
        assert!(buf.iter().all(|&b| b == 0), "a refused key is wiped");
    }

    /// A read that claims more bytes than it was offered (read(2) never does; the count is
    /// clamped all the same) is taken as filling what it was offered, not trusted.
    #[test]
    fn a_read_claiming_more_than_it_was_offered_is_clamped() {
        let mut buf = [0u8; 16];
        let mut calls = 0;
        let r = read_line_with(&mut buf, |b| {
            calls += 1;
            if calls == 1 {
                b[..4].fill(b'k');
                return Ok(4);
            }
            b[..3].copy_from_slice(b"kk\n");
            Ok(b.len() + 3)
        });
        assert_eq!(r, Ok(6));
        assert_eq!(&buf[..6], b"kkkkkk");
        assert!(buf[6..].iter().all(|&b| b == 0), "the rest is wiped");
    }

    #[test]
    fn read_errors_are_reported_without_data() {
        let mut buf = [0u8; 16];
        let r = read_line_with(&mut buf, |_| {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        });
        assert_eq!(r, Err(KeyError::Read(io::ErrorKind::BrokenPipe)));
    }

    #[test]
    fn errors_never_contain_key_bytes() {
        let (r, _) = read(b"sk-secret-value with space\n", &[]);
        let msg = r.expect_err("invalid").to_string();
        assert!(!msg.contains("secret"), "{msg}");
        assert!(msg.contains("byte 16"), "{msg}");
    }

    /// Compiles only while `ApiKey` implements none of `Clone`, `Display`, `Serialize`:
    /// with one of them, the `_` below would have two candidate impls and be ambiguous.
    #[test]
    fn key_type_cannot_be_cloned_displayed_or_serialized() {
        trait AmbiguousIfImpl<A> {
            fn check() {}
        }
        impl<T: ?Sized> AmbiguousIfImpl<()> for T {}
        struct ViaClone;
        struct ViaDisplay;
        struct ViaSerialize;
        impl<T: Clone> AmbiguousIfImpl<ViaClone> for T {}
        impl<T: ?Sized + fmt::Display> AmbiguousIfImpl<ViaDisplay> for T {}
        impl<T: ?Sized + serde::Serialize> AmbiguousIfImpl<ViaSerialize> for T {}
        <ApiKey as AmbiguousIfImpl<_>>::check();
        <crate::token::ProxyToken as AmbiguousIfImpl<_>>::check();
    }

    #[test]
    fn header_is_sensitive_and_debug_is_redacted() {
        let key = ApiKey::for_tests("Bearer sk-test-123");
        assert!(key.header_value().is_sensitive());
        assert_eq!(key.header_value().as_bytes(), b"Bearer sk-test-123");
        assert_eq!(key.expose_bytes(), b"sk-test-123");
        assert_eq!(format!("{key:?}"), "ApiKey([REDACTED])");
    }
}
