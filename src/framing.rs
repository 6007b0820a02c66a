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
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Verdict> {
        if !self.in_head {
            return None;
        }
        for &b in bytes {
            if b == b'\n' {
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
                self.prev = b;
                continue;
            }
            if self.lines > 0 && self.in_name {
                if b == b':' {
                    self.in_name = false;
                    let name = &self.name[..self.name_len];
                    if name == b"content-length" {
                        self.saw_length = true;
                    } else if name == b"transfer-encoding" {
                        self.saw_transfer_encoding = true;
                    }
                } else if self.name_len < self.name.len() {
                    self.name[self.name_len] = b.to_ascii_lowercase();
                    self.name_len += 1;
                } else {
                    self.in_name = false;
                }
            }
            self.line_len += 1;
            self.prev = b;
        }
        None
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
}
