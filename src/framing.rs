//! Pure: a byte-level check of each request head as it is read off the socket, for the
//! framing shapes the HTTP parser normalises silently but that request smuggling is made of:
//! a bare LF line ending, and `Content-Length` together with `Transfer-Encoding` (hyper keeps
//! only the latter). Such a request is refused (400) instead of being reframed and passed on.
//!
//! The sniffer sees the bytes of a head only; body bytes (and heads pipelined behind an
//! unfinished request, which the parser still frames safely) are skipped.

/// Watches request heads in a byte stream.
#[derive(Debug, Clone)]
pub struct HeadSniffer {
    in_head: bool,
    /// Lines completed in this head (0 while on the request line).
    lines: usize,
    /// Bytes on the current line so far.
    line_len: usize,
    prev: u8,
    /// The current header name, lowercased, while it is being read.
    name: [u8; 24],
    name_len: usize,
    in_name: bool,
    saw_length: bool,
    saw_transfer_encoding: bool,
    bare_lf: bool,
}

impl Default for HeadSniffer {
    fn default() -> Self {
        Self {
            in_head: true,
            lines: 0,
            line_len: 0,
            prev: 0,
            name: [0; 24],
            name_len: 0,
            in_name: true,
            saw_length: false,
            saw_transfer_encoding: false,
            bare_lf: false,
        }
    }
}

/// What the sniffer concluded about a finished head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing suspicious.
    Clean,
    /// Bare LF or CL with TE.
    Ambiguous,
}

impl HeadSniffer {
    /// Starts watching for the next head (call when a response has ended).
    pub fn rearm(&mut self) {
        *self = Self::default();
    }

    /// Feeds bytes read from the client. Returns a verdict when a head ends in them.
    ///
    /// Only header names are looked at byte by byte; the rest of each line (the request
    /// line, header values) is skipped to its line feed with a vectorised search.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Verdict> {
        if !self.in_head {
            return None;
        }
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            if self.lines > 0 && self.in_name {
                rest = tail;
                if b == b'\n' {
                    if let Some(v) = self.end_line() {
                        return Some(v);
                    }
                } else {
                    self.name_byte(b);
                    self.line_len += 1;
                    self.prev = b;
                }
                continue;
            }
            let Some(at) = memchr::memchr(b'\n', rest) else {
                self.line_len += rest.len();
                self.prev = rest.last().copied().unwrap_or(self.prev);
                return None;
            };
            if let Some(&before) = rest[..at].last() {
                self.line_len += at;
                self.prev = before;
            }
            rest = &rest[at + 1..];
            if let Some(v) = self.end_line() {
                return Some(v);
            }
        }
        None
    }

    /// A line feed: ends the line, or the head when the line was empty.
    fn end_line(&mut self) -> Option<Verdict> {
        if self.prev != b'\r' {
            self.bare_lf = true;
        }
        let content = if self.prev == b'\r' {
            self.line_len.saturating_sub(1)
        } else {
            self.line_len
        };
        if content == 0 && self.lines > 0 {
            self.in_head = false;
            let ambiguous = self.bare_lf || (self.saw_length && self.saw_transfer_encoding);
            return Some(if ambiguous {
                Verdict::Ambiguous
            } else {
                Verdict::Clean
            });
        }
        if content > 0 {
            self.lines += 1;
        }
        self.line_len = 0;
        self.name_len = 0;
        self.in_name = true;
        self.prev = b'\n';
        None
    }

    /// One byte of a header name (up to the colon).
    fn name_byte(&mut self, b: u8) {
        if b == b':' {
            self.in_name = false;
            let name = &self.name[..self.name_len];
            if name == b"content-length" {
                self.saw_length = true;
            } else if name == b"transfer-encoding" {
                self.saw_transfer_encoding = true;
            }
        } else if let Some(slot) = self.name.get_mut(self.name_len) {
            *slot = b.to_ascii_lowercase();
            self.name_len += 1;
        } else {
            self.in_name = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(chunks: &[&[u8]]) -> Option<Verdict> {
        let mut s = HeadSniffer::default();
        chunks.iter().find_map(|c| s.feed(c))
    }

    #[test]
    fn verdicts() {
        use Verdict::*;
        let clean = b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(verdict(&[clean]), Some(Clean));
        assert_eq!(
            verdict(&[b"POST / HTTP/1.1\r\nHo", b"st: x\r\n", b"\r", b"\n"]),
            Some(Clean)
        );
        assert_eq!(
            verdict(&[b"\r\nPOST / HTTP/1.1\r\nHost: x\r\n\r\n"]),
            Some(Clean)
        );
        assert_eq!(
            verdict(&[b"POST / HTTP/1.1\nHost: x\r\n\r\n"]),
            Some(Ambiguous)
        );
        assert_eq!(
            verdict(&[b"POST / HTTP/1.1\r\nHost: x\n\n"]),
            Some(Ambiguous)
        );
        assert_eq!(
            verdict(&[
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            ]),
            Some(Ambiguous)
        );
        assert_eq!(
            verdict(&[
                b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length: 5\r\n\r\n"
            ]),
            Some(Ambiguous)
        );
        assert_eq!(
            verdict(&[
                b"POST / HTTP/1.1\r\nX-Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            ]),
            Some(Clean)
        );
        assert_eq!(verdict(&[b"POST / HTTP/1.1\r\nHost: x\r\n"]), None);
    }

    #[test]
    fn body_bytes_are_not_sniffed_until_rearmed() {
        let mut s = HeadSniffer::default();
        assert_eq!(
            s.feed(b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab\nc"),
            Some(Verdict::Clean)
        );
        assert_eq!(s.feed(b"\n\n\n"), None);
        s.rearm();
        assert_eq!(
            s.feed(b"POST / HTTP/1.1\nA: b\n\n"),
            Some(Verdict::Ambiguous)
        );
    }

    /// The byte-at-a-time sniffer this module started as: the property below checks the
    /// faster one against it.
    fn reference(chunks: &[Vec<u8>]) -> Vec<Option<Verdict>> {
        let (mut in_head, mut lines, mut line_len, mut prev) = (true, 0usize, 0usize, 0u8);
        let (mut name, mut name_len, mut in_name) = ([0u8; 24], 0usize, true);
        let (mut cl, mut te, mut bare) = (false, false, false);
        let mut out = Vec::new();
        for c in chunks {
            let mut got = None;
            for &b in c {
                if !in_head || got.is_some() {
                    break;
                }
                if b == b'\n' {
                    bare |= prev != b'\r';
                    let content = if prev == b'\r' {
                        line_len.saturating_sub(1)
                    } else {
                        line_len
                    };
                    if content == 0 && lines > 0 {
                        in_head = false;
                        got = Some(if bare || (cl && te) {
                            Verdict::Ambiguous
                        } else {
                            Verdict::Clean
                        });
                        continue;
                    }
                    lines += usize::from(content > 0);
                    (line_len, name_len, in_name, prev) = (0, 0, true, b);
                    continue;
                }
                if lines > 0 && in_name {
                    if b == b':' {
                        in_name = false;
                        cl |= &name[..name_len] == b"content-length";
                        te |= &name[..name_len] == b"transfer-encoding";
                    } else if name_len < name.len() {
                        name[name_len] = b.to_ascii_lowercase();
                        name_len += 1;
                    } else {
                        in_name = false;
                    }
                }
                line_len += 1;
                prev = b;
            }
            out.push(got);
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn same_verdicts_as_the_reference(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\r\n", "\n", "\r", ":", " ", "a", "POST / HTTP/1.1", "Content-Length",
                    "transfer-Encoding", "x-content-length-and-more-than-24", "5", "chunked",
                ]),
                0..40,
            ),
            cuts in proptest::collection::vec(0usize..64, 0..6),
        ) {
            let bytes: Vec<u8> = pieces.concat().into_bytes();
            let mut chunks = Vec::new();
            let mut at = 0;
            for c in cuts {
                let end = (at + c).min(bytes.len());
                chunks.push(bytes[at..end].to_vec());
                at = end;
            }
            chunks.push(bytes[at..].to_vec());
            let mut s = HeadSniffer::default();
            let fast: Vec<_> = chunks.iter().map(|c| s.feed(c)).collect();
            proptest::prop_assert_eq!(fast, reference(&chunks));
        }
    }
}
