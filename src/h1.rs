//! Pure HTTP/1.1 for the plain-`http` upstream: the request head the proxy writes, the
//! response head it reads, how the response body is framed, and an incremental chunked
//! decoder. No IO: bytes in, decisions and bytes out. `upstream_h1.rs` does the reading and
//! writing.
//!
//! Strict on purpose: anything the upstream sends that two HTTP implementations could
//! read differently (`Transfer-Encoding` with `Content-Length`, a coding other than
//! `chunked`, differing lengths, obsolete line folding, a head over the limit) is an error,
//! which the proxy answers with 502.

use bytes::{Buf, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

/// Largest response head accepted from the upstream.
pub const MAX_RESPONSE_HEAD: usize = 256 << 10;
/// Most response header fields accepted from the upstream.
pub const MAX_RESPONSE_HEADERS: usize = 128;
/// Longest chunk-size line (size, extensions) and longest trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 << 10;

/// What is wrong with the upstream's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum H1Error {
    /// The response head is not valid HTTP/1.x.
    #[error("the upstream sent a malformed response head")]
    MalformedHead,
    /// The response head is over [`MAX_RESPONSE_HEAD`] or [`MAX_RESPONSE_HEADERS`].
    #[error("the upstream's response head is too large")]
    HeadTooLarge,
    /// `101 Switching Protocols`, which the proxy never asks for, or more interim (1xx)
    /// responses than any server sends.
    #[error("the upstream switched protocols or sent too many interim responses")]
    UnexpectedUpgrade,
    /// The body framing headers are ambiguous or unsupported.
    #[error("the upstream's response framing is ambiguous or unsupported")]
    BadFraming,
    /// The chunked body is malformed.
    #[error("the upstream sent a malformed chunked body")]
    BadChunk,
}

/// Writes the request head: request line, `host`, the headers as given except any framing
/// headers, then the framing the proxy chose for the body it will send.
///
/// `room` is extra capacity to reserve (for a first body chunk sent with the head).
pub fn encode_request_head(
    path_and_query: &str,
    authority: &str,
    headers: &HeaderMap,
    body_length: Option<u64>,
    room: usize,
) -> Vec<u8> {
    let size = 64
        + room
        + path_and_query.len()
        + authority.len()
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body_length {
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
        }
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n"),
    }
    out
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The header fields, validated.
    pub headers: HeaderMap,
}

/// Parses a response head at the start of `buf`: `Ok(None)` while incomplete; once
/// complete, the head's bytes are split off `buf` and the header values share them (no copy
/// per value).
pub fn parse_response_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, H1Error> {
    // Offsets of each name and value in `buf`, taken while httparse borrows it. (The field
    // array is left uninitialised: httparse writes what it returns.)
    let (len, code, minor, spans) = {
        let mut fields: [std::mem::MaybeUninit<httparse::Header<'_>>; MAX_RESPONSE_HEADERS] =
            [const { std::mem::MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut fields,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                return Err(H1Error::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(H1Error::HeadTooLarge),
            Err(_) => return Err(H1Error::MalformedHead),
        };
        let base = buf.as_ptr() as usize;
        let spans: Vec<(usize, usize, usize, usize)> = resp
            .headers
            .iter()
            .map(|f| {
                let name = f.name.as_ptr() as usize - base;
                let value = f.value.as_ptr() as usize - base;
                (name, name + f.name.len(), value, value + f.value.len())
            })
            .collect();
        (len, resp.code, resp.version, spans)
    };
    if len > MAX_RESPONSE_HEAD {
        return Err(H1Error::HeadTooLarge);
    }
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(H1Error::MalformedHead)?;
    let version = match minor {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(H1Error::MalformedHead),
    };
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(n0, n1, v0, v1) in &spans {
        let name = HeaderName::from_bytes(&head[n0..n1]).map_err(|_| H1Error::MalformedHead)?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| H1Error::MalformedHead)?;
        headers.append(name, value);
    }
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3, for a response to a POST).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// The framing of a final (non-1xx) response, refusing ambiguous shapes.
pub fn response_framing(head: &ResponseHead) -> Result<Framing, H1Error> {
    if head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    let mut te = head.headers.get_all(TRANSFER_ENCODING).iter();
    let has_length = head.headers.contains_key(CONTENT_LENGTH);
    match (te.next(), te.next()) {
        (None, _) => {}
        (Some(v), None)
            if !has_length
                && head.version == Version::HTTP_11
                && v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") =>
        {
            return Ok(Framing::Chunked);
        }
        _ => return Err(H1Error::BadFraming),
    }
    let mut length = None;
    for v in head.headers.get_all(CONTENT_LENGTH) {
        // Digits only (no sign, no spaces inside); every copy must agree.
        let digits = v.as_bytes().trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(H1Error::BadFraming);
        }
        let n = std::str::from_utf8(digits)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(H1Error::BadFraming)?;
        if length.is_some_and(|l| l != n) {
            return Err(H1Error::BadFraming);
        }
        length = Some(n);
    }
    Ok(match length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

/// Whether the connection may carry another request once this response is complete.
pub fn keeps_alive(head: &ResponseHead, framing: Framing) -> bool {
    let close = head
        .headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
    head.version == Version::HTTP_11 && !close && framing != Framing::UntilClose
}

/// Incremental decoder of a chunked body. Lines must end in CRLF; a bare LF or a CR
/// inside a line is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunked {
    /// Reading a chunk-size line.
    Size {
        /// The size parsed so far.
        size: u64,
        /// Hex digits seen.
        digits: u8,
        /// Bytes of the line seen (digits and extensions).
        len: usize,
        /// Past the digits (in extensions or whitespace).
        ext: bool,
        /// The CR that ends the line has been seen.
        cr: bool,
    },
    /// Reading chunk data; this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data (`true` once the CR is seen).
    DataEnd(bool),
    /// Reading the trailer section (ignored): bytes seen, and where on a line.
    Trailers {
        /// Bytes of trailer section seen.
        total: usize,
        /// Position on the current line.
        at: LinePos,
    },
    /// The body is complete.
    Done,
}

/// Where the trailer reader is on a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinePos {
    /// At the start of a line.
    Start,
    /// After a CR at the start of a line (the end of the section, if LF follows).
    StartCr,
    /// Inside a line.
    Inside,
    /// After a CR inside a line.
    InsideCr,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked::Size {
            size: 0,
            digits: 0,
            len: 0,
            ext: false,
            cr: false,
        }
    }
}

impl Chunked {
    /// Consumes framing bytes from the front of `buf` and returns how many data bytes
    /// follow at its front (the caller takes them with `split_to`). Returns `Ok(0)` when it
    /// needs more input or the body is done ([`Chunked::Done`]).
    pub fn next_data(&mut self, buf: &mut BytesMut) -> Result<usize, H1Error> {
        loop {
            if let Chunked::Data(left) = self
                && *left > 0
            {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                return Ok(n);
            }
            let Some(&b) = buf.first() else {
                return Ok(0);
            };
            match self {
                Chunked::Done => return Ok(0),
                Chunked::Data(_) => {
                    *self = Chunked::DataEnd(false);
                    continue;
                }
                Chunked::DataEnd(cr) => match (b, *cr) {
                    (b'\r', false) => *self = Chunked::DataEnd(true),
                    (b'\n', true) => *self = Chunked::default(),
                    _ => return Err(H1Error::BadChunk),
                },
                Chunked::Size {
                    size,
                    digits,
                    len,
                    ext,
                    cr,
                } => {
                    *len += 1;
                    if *len > MAX_CHUNK_LINE {
                        return Err(H1Error::BadChunk);
                    }
                    if *cr {
                        if b != b'\n' {
                            return Err(H1Error::BadChunk);
                        }
                        *self = if *size == 0 {
                            Chunked::Trailers {
                                total: 0,
                                at: LinePos::Start,
                            }
                        } else {
                            Chunked::Data(*size)
                        };
                    } else if !*ext && b.is_ascii_hexdigit() {
                        if *digits >= 15 {
                            return Err(H1Error::BadChunk);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        *size = (*size << 4) | u64::from(d);
                        *digits += 1;
                    } else if *digits == 0
                        || b == b'\n'
                        || (b < 0x20 && b != b'\t' && b != b'\r')
                        || b == 0x7f
                    {
                        return Err(H1Error::BadChunk);
                    } else if b == b'\r' {
                        *cr = true;
                    } else {
                        // Extensions and whitespace after the size are ignored.
                        *ext = true;
                    }
                }
                Chunked::Trailers { total, at } => {
                    *total += 1;
                    if *total > MAX_TRAILERS {
                        return Err(H1Error::BadChunk);
                    }
                    *at = match (*at, b) {
                        (LinePos::Start, b'\r') => LinePos::StartCr,
                        (LinePos::StartCr, b'\n') => {
                            *self = Chunked::Done;
                            buf.advance(1);
                            return Ok(0);
                        }
                        (LinePos::InsideCr, b'\n') => LinePos::Start,
                        // A CR must be followed by LF; a bare LF ends nothing.
                        (LinePos::StartCr | LinePos::InsideCr, _) | (_, b'\n') => {
                            return Err(H1Error::BadChunk);
                        }
                        (_, b'\r') => LinePos::InsideCr,
                        _ => LinePos::Inside,
                    };
                }
            }
            buf.advance(1);
        }
    }

    /// Whether the terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        *self == Chunked::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<ResponseHead>, H1Error> {
        parse_response_head(&mut BytesMut::from(raw))
    }

    fn head(raw: &str) -> ResponseHead {
        parse(raw.as_bytes()).expect("valid").expect("complete")
    }

    #[test]
    fn request_head_has_host_our_framing_and_no_client_framing() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk-test"));
        let out = encode_request_head("/v1/responses?x=1", "127.0.0.1:9", &h, Some(2), 0);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "POST /v1/responses?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\ncontent-type: \
             application/json\r\nauthorization: Bearer sk-test\r\ncontent-length: 2\r\n\r\n"
        );
        let out = encode_request_head("/", "h", &HeaderMap::new(), None, 0);
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn response_heads() {
        let raw =
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-a: 1\r\nx-a: 2\r\n\r\nDATA";
        let mut buf = BytesMut::from(raw.as_bytes());
        let h = parse_response_head(&mut buf)
            .expect("valid")
            .expect("complete");
        assert_eq!(&buf[..], b"DATA");
        assert_eq!(h.status, 200);
        assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
        assert!(parse(b"HTTP/1.1 200 OK\r\nx: y\r\n").expect("ok").is_none());
        for bad in [
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n folded\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad name: 1\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad.as_bytes()).err(),
                Some(H1Error::MalformedHead),
                "{bad:?}"
            );
        }
        let many: String = (0..MAX_RESPONSE_HEADERS + 1)
            .map(|i| format!("x-{i}: 1\r\n"))
            .collect();
        let raw = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert_eq!(parse(raw.as_bytes()).err(), Some(H1Error::HeadTooLarge));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_RESPONSE_HEAD));
        assert_eq!(parse(huge.as_bytes()).err(), Some(H1Error::HeadTooLarge));
    }

    #[test]
    fn framing_table() {
        use Framing::*;
        let f = |raw: &str| response_framing(&head(raw));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok(Length(5))
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), Ok(Empty));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(Length(5))
        );
        assert_eq!(f("HTTP/1.1 204 No Content\r\n\r\n"), Ok(Empty));
        assert_eq!(
            f("HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"),
            Ok(Empty)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"),
            Ok(Chunked)
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n"), Ok(UntilClose));
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(f(bad), Err(H1Error::BadFraming), "{bad:?}");
        }
    }

    #[test]
    fn keep_alive_rules() {
        let k = |raw: &str| {
            let h = head(raw);
            let framing = response_framing(&h).expect("framing");
            keeps_alive(&h, framing)
        };
        assert!(k("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"));
        assert!(!k(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 1\r\n\r\n"
        ));
        assert!(!k("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"));
        assert!(!k("HTTP/1.1 200 OK\r\n\r\n"));
    }

    /// Decodes `input` fed in pieces of `step` bytes: (data, done).
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, bool), H1Error> {
        let mut c = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                let n = c.next_data(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf.split_to(n));
            }
        }
        Ok((out, c.is_done()))
    }

    #[test]
    fn chunked_bodies() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\nA \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n";
        for step in [1, 2, 3, 7, 100] {
            assert_eq!(
                decode(body, step),
                Ok((b"hello world0123456789".to_vec(), true)),
                "step {step}"
            );
        }
        assert_eq!(decode(b"0\r\n\r\n", 1), Ok((vec![], true)));
        assert_eq!(decode(b"5\r\nhel", 2), Ok((b"hel".to_vec(), false)));
        for bad in [
            &b"x\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n",
            b"10000000000000000\r\n",
            b"\r\n",
            b";ext\r\n",
            b"0\r\n\rX",
            b"5\r\r\nhello",
        ] {
            assert_eq!(decode(bad, 1).err(), Some(H1Error::BadChunk), "{bad:?}");
        }
        let long_ext = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode(long_ext.as_bytes(), 64).err(),
            Some(H1Error::BadChunk)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        #[test]
        fn chunked_round_trip(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8),
            step in 1usize..64,
        ) {
            let mut wire = Vec::new();
            let mut want = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
                want.extend_from_slice(c);
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            proptest::prop_assert_eq!(decode(&wire, step), Ok((want, true)));
        }

        #[test]
        fn chunked_never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..200), step in 1usize..16) {
            let _ = decode(&input, step);
        }
    }
}
