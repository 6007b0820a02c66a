//! A head's header fields as the peer sent them (the client's request, the upstream's
//! response): the head's bytes and where each field lies in them, each name recognised
//! once, when the head is parsed.
//!
//! The gate, the connection's framing and the rewriting towards the upstream all look
//! fields up by a handful of names. A general header map hashes every name on the way in
//! and again on every lookup, and allocates per field; here a lookup is a scan over a few
//! entries comparing one byte, and no field is copied or allocated.
//!
//! Pure: bytes in, lookups out.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

/// The header names the proxy acts on; every other name is [`Name::Other`]. Matching is
/// case-insensitive, as HTTP names are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    /// `authorization`
    Authorization,
    /// `connection`
    Connection,
    /// `content-length`
    ContentLength,
    /// `content-type`
    ContentType,
    /// `cookie`
    Cookie,
    /// `expect`
    Expect,
    /// `forwarded`
    Forwarded,
    /// `host`
    Host,
    /// `keep-alive`
    KeepAlive,
    /// `origin`
    Origin,
    /// `proxy-authenticate` (a response field)
    ProxyAuthenticate,
    /// `proxy-authorization`
    ProxyAuthorization,
    /// `proxy-connection`
    ProxyConnection,
    /// `sec-fetch-site`
    SecFetchSite,
    /// `te`
    Te,
    /// `trailer`
    Trailer,
    /// `transfer-encoding`
    TransferEncoding,
    /// `upgrade`
    Upgrade,
    /// `x-proxy-token`
    ProxyToken,
    /// Any name starting `x-forwarded-`.
    XForwarded,
    /// Any other name.
    Other,
}

impl Name {
    /// Recognises a field name (any case).
    pub fn of(name: &[u8]) -> Self {
        let is = |lower: &[u8]| name.eq_ignore_ascii_case(lower);
        match name.len() {
            2 if is(b"te") => Self::Te,
            4 if is(b"host") => Self::Host,
            6 if is(b"cookie") => Self::Cookie,
            6 if is(b"expect") => Self::Expect,
            6 if is(b"origin") => Self::Origin,
            7 if is(b"trailer") => Self::Trailer,
            7 if is(b"upgrade") => Self::Upgrade,
            9 if is(b"forwarded") => Self::Forwarded,
            10 if is(b"connection") => Self::Connection,
            10 if is(b"keep-alive") => Self::KeepAlive,
            12 if is(b"content-type") => Self::ContentType,
            13 if is(b"authorization") => Self::Authorization,
            13 if is(b"x-proxy-token") => Self::ProxyToken,
            14 if is(b"content-length") => Self::ContentLength,
            14 if is(b"sec-fetch-site") => Self::SecFetchSite,
            16 if is(b"proxy-connection") => Self::ProxyConnection,
            17 if is(b"transfer-encoding") => Self::TransferEncoding,
            18 if is(b"proxy-authenticate") => Self::ProxyAuthenticate,
            19 if is(b"proxy-authorization") => Self::ProxyAuthorization,
            n if n >= 12 && name[..12].eq_ignore_ascii_case(b"x-forwarded-") => Self::XForwarded,
            _ => Self::Other,
        }
    }
}

/// How many times a field occurs, and its value when exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occurs<'a> {
    /// Absent.
    Never,
    /// Exactly once, with this value.
    Once(&'a [u8]),
    /// More than once.
    Repeated,
}

/// Fields located in a buffer, not yet joined to its bytes.
pub(crate) struct Located(Vec<Field>);

#[derive(Debug, Clone, Copy)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
    kind: Name,
}

/// The header fields of one head (a request's or a response's), in the order sent. Names and values are valid
/// HTTP field names and values (the parser checked them; [`Fields::to_header_map`] keeps
/// every one of them, which the `request` fuzz target asserts).
#[derive(Clone, Default)]
pub struct Fields {
    head: Bytes,
    list: Vec<Field>,
}

impl std::fmt::Debug for Fields {
    // Values can carry credentials: only names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(_, n, _)| String::from_utf8_lossy(n)))
            .finish()
    }
}

impl Fields {
    /// Where the fields httparse found lie in `base` (the buffer it parsed), each name
    /// recognised; [`Fields::attach`] then joins them to the head's bytes. (Heads are at
    /// most 16 MiB, the bound of `--max-header-size`, so offsets fit 32 bits; `attach`
    /// checks them all the same.)
    pub(crate) fn locate(base: &[u8], parsed: &[httparse::Header<'_>]) -> Located {
        let start = base.as_ptr() as usize;
        let at = |s: &[u8]| {
            let from = (s.as_ptr() as usize).wrapping_sub(start);
            (from as u32, from.wrapping_add(s.len()) as u32)
        };
        Located(
            parsed
                .iter()
                .map(|h| Field {
                    name: at(h.name.as_bytes()),
                    value: at(h.value),
                    kind: Name::of(h.name.as_bytes()),
                })
                .collect(),
        )
    }

    /// The located fields over `head`, the parsed bytes split off the buffer; `None` if a
    /// field lies outside it (a caller's bug, not a peer's doing).
    pub(crate) fn attach(head: Bytes, located: Located) -> Option<Self> {
        let inside = |(s, e): (u32, u32)| s <= e && e as usize <= head.len();
        if !located.0.iter().all(|f| inside(f.name) && inside(f.value)) {
            return None;
        }
        Some(Self {
            head,
            list: located.0,
        })
    }

    /// Fields at the given `(name start, name end, value start, value end)` offsets of
    /// `head`; `None` if an offset is out of range.
    fn from_spans(head: Bytes, spans: &[(usize, usize, usize, usize)]) -> Option<Self> {
        let mut list = Vec::with_capacity(spans.len());
        for &(n0, n1, v0, v1) in spans {
            let name = head.get(n0..n1)?;
            head.get(v0..v1)?;
            let at = |x: usize| u32::try_from(x).ok();
            list.push(Field {
                name: (at(n0)?, at(n1)?),
                value: (at(v0)?, at(v1)?),
                kind: Name::of(name),
            });
        }
        Some(Self { head, list })
    }

    /// Fields holding what `headers` holds (for tests, fuzzing, and the HTTPS client's
    /// answers, which come as a header map).
    pub fn from_header_map(headers: &HeaderMap) -> Self {
        Self::from_pairs(
            headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        )
    }

    /// Fields holding these names and values, in order, in a head of their own. The
    /// caller passes valid names and values (constants, or values taken from fields).
    pub(crate) fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut head = Vec::new();
        let mut spans = Vec::new();
        for (name, value) in pairs {
            let n0 = head.len();
            head.extend_from_slice(name);
            let n1 = head.len();
            head.extend_from_slice(b": ");
            let v0 = head.len();
            head.extend_from_slice(value);
            spans.push((n0, n1, v0, head.len()));
            head.extend_from_slice(b"\r\n");
        }
        Self::from_spans(Bytes::from(head), &spans).unwrap_or_default()
    }

    /// Keeps only the fields `keep` picks (by what they are and their name as sent); the
    /// bytes stay where they are, the others are just no longer fields.
    pub fn retain(&mut self, mut keep: impl FnMut(Name, &[u8]) -> bool) {
        let head = &self.head;
        self.list
            .retain(|f| keep(f.kind, &head[f.name.0 as usize..f.name.1 as usize]));
    }

    /// The first value of the field named `name` (any case), if any.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter()
            .find(|(_, n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, _, v)| v)
    }

    /// The same fields as a header map (names lowercased; values shared, not copied).
    /// A field `http` would not accept is left out; the parser admits none.
    pub fn to_header_map(&self) -> HeaderMap {
        self.header_map_of(|_, _| true)
    }

    /// The fields `keep` picks, as a header map.
    pub(crate) fn header_map_of(&self, keep: impl Fn(Name, &[u8]) -> bool) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.list.len());
        for f in &self.list {
            let name = self.bytes(f.name);
            if !keep(f.kind, name) {
                continue;
            }
            let value = self.head.slice(f.value.0 as usize..f.value.1 as usize);
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name),
                HeaderValue::from_maybe_shared(value),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// The head's bytes.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    /// Where each field's line starts (its name) and where its value ends, in the head.
    pub(crate) fn lines(&self) -> impl Iterator<Item = (usize, usize)> {
        self.list
            .iter()
            .map(|f| (f.name.0 as usize, f.value.1 as usize))
    }

    fn bytes(&self, (start, end): (u32, u32)) -> &[u8] {
        &self.head[start as usize..end as usize]
    }

    /// Every field: what it is, its name as sent, its value.
    pub fn iter(&self) -> impl Iterator<Item = (Name, &[u8], &[u8])> + Clone {
        self.list
            .iter()
            .map(|f| (f.kind, self.bytes(f.name), self.bytes(f.value)))
    }

    /// The values of every field named `name`, in order.
    pub fn values(&self, name: Name) -> impl Iterator<Item = &[u8]> {
        self.list
            .iter()
            .filter(move |f| f.kind == name)
            .map(|f| self.bytes(f.value))
    }

    /// Whether a field named `name` is present.
    pub fn contains(&self, name: Name) -> bool {
        self.list.iter().any(|f| f.kind == name)
    }

    /// Whether `name` is absent, present once (and its value), or repeated.
    pub fn occurs(&self, name: Name) -> Occurs<'_> {
        let mut values = self.values(name);
        match (values.next(), values.next()) {
            (None, _) => Occurs::Never,
            (Some(v), None) => Occurs::Once(v),
            _ => Occurs::Repeated,
        }
    }

    /// Whether a comma-separated field lists `token` (case-insensitive) in any of its
    /// values.
    pub fn lists(&self, name: Name, token: &[u8]) -> bool {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Whether every byte is visible ASCII, space or tab (what `HeaderValue::to_str` accepts
/// as text).
pub fn is_visible_ascii(s: &[u8]) -> bool {
    s.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header map of these (valid) names and values, in order; for the unit tests here
    /// and in `headers`.
    pub(crate) fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        Fields::from_header_map(&map(pairs))
    }

    #[test]
    fn names_are_recognised_in_any_case_and_only_exactly() {
        let cases: &[(&str, Name)] = &[
            ("TE", Name::Te),
            ("Host", Name::Host),
            ("COOKIE", Name::Cookie),
            ("Expect", Name::Expect),
            ("origin", Name::Origin),
            ("Trailer", Name::Trailer),
            ("Upgrade", Name::Upgrade),
            ("Forwarded", Name::Forwarded),
            ("Connection", Name::Connection),
            ("Keep-Alive", Name::KeepAlive),
            ("Content-Type", Name::ContentType),
            ("Authorization", Name::Authorization),
            ("X-Proxy-Token", Name::ProxyToken),
            ("Content-Length", Name::ContentLength),
            ("Sec-Fetch-Site", Name::SecFetchSite),
            ("Proxy-Connection", Name::ProxyConnection),
            ("Transfer-Encoding", Name::TransferEncoding),
            ("Proxy-Authorization", Name::ProxyAuthorization),
            ("Proxy-Authenticate", Name::ProxyAuthenticate),
            ("X-Forwarded-For", Name::XForwarded),
            ("x-forwarded-", Name::XForwarded),
            ("x-forwarded", Name::Other),
            ("hosts", Name::Other),
            ("ho", Name::Other),
            ("content-lengths", Name::Other),
            ("sec-fetch-mode", Name::Other),
            ("x-proxy-tokens", Name::Other),
            ("", Name::Other),
            ("Xe", Name::Other),
            ("content-typf", Name::Other),
            ("dontent-type", Name::Other),
            ("y-forwarded-for", Name::Other),
            ("X-FORWARDED-HOST", Name::XForwarded),
        ];
        for (name, want) in cases {
            assert_eq!(Name::of(name.as_bytes()), *want, "{name}");
        }
    }

    #[test]
    fn lookups_see_every_value_in_order() {
        let f = fields(&[
            ("Host", "a"),
            ("Content-Length", "1"),
            ("x-other", "z"),
            ("content-length", "2"),
            ("Connection", "keep-alive, Close"),
        ]);
        assert_eq!(f.len(), 5);
        assert_eq!(f.occurs(Name::Host), Occurs::Once(b"a"));
        assert_eq!(f.occurs(Name::ContentLength), Occurs::Repeated);
        assert_eq!(f.occurs(Name::Origin), Occurs::Never);
        assert_eq!(
            f.values(Name::ContentLength).collect::<Vec<_>>(),
            vec![&b"1"[..], b"2"]
        );
        assert!(f.contains(Name::Other) && !f.contains(Name::Upgrade));
        assert!(f.lists(Name::Connection, b"close"));
        assert!(f.lists(Name::Connection, b"KEEP-ALIVE"));
        assert!(!f.lists(Name::Connection, b"upgrade"));
        assert!(!f.lists(Name::Expect, b"100-continue"));
    }

    #[test]
    fn a_header_map_round_trips() {
        let f = fields(&[("Host", "a"), ("X-Thing", "1"), ("x-thing", "2 ")]);
        let map = f.to_header_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map.get("host").map(|v| v.as_bytes()), Some(&b"a"[..]));
        let things: Vec<_> = map.get_all("x-thing").iter().collect();
        assert_eq!(things, vec!["1", "2 "]);
        assert!(Fields::default().to_header_map().is_empty());
    }

    #[test]
    fn retain_and_get() {
        let mut f = fields(&[("A", "1"), ("b", "2"), ("X-Request-Id", "r"), ("a", "3")]);
        assert_eq!(f.get(b"x-request-id"), Some(&b"r"[..]));
        assert_eq!(f.get(b"A"), Some(&b"1"[..]));
        assert_eq!(f.get(b"c"), None);
        f.retain(|_, n| !n.eq_ignore_ascii_case(b"a"));
        let left: Vec<_> = f.iter().map(|(_, n, v)| (n, v)).collect();
        assert_eq!(left, [(&b"b"[..], &b"2"[..]), (b"x-request-id", b"r")]);
        let made = Fields::from_pairs([(&b"Content-Type"[..], &b"text/plain"[..])].into_iter());
        assert_eq!(made.occurs(Name::ContentType), Occurs::Once(b"text/plain"));
    }

    #[test]
    fn debug_shows_names_not_values() {
        let f = fields(&[("authorization", "Bearer sk-test-secret")]);
        let shown = format!("{f:?}");
        assert!(shown.contains("authorization") && !shown.contains("sk-test"));
    }

    #[test]
    fn visible_ascii_is_what_header_values_call_text() {
        for (s, text) in [
            (&b"a b\tc~"[..], true),
            (b"caf\xc3\xa9", false),
            (b"\x7f", false),
            (b"\x1f", false),
            (b"", true),
        ] {
            assert_eq!(is_visible_ascii(s), text, "{s:?}");
            if let Ok(v) = HeaderValue::from_bytes(s) {
                assert_eq!(v.to_str().is_ok(), text, "{s:?}");
            }
        }
    }
}
