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
        let Some(key) = packed(name) else {
            return Self::other_or_forwarded(name);
        };
        // Each name is compared as three words (its bytes lowercased, and its length).
        const TE: Packed = known(b"te");
        const HOST: Packed = known(b"host");
        const COOKIE: Packed = known(b"cookie");
        const EXPECT: Packed = known(b"expect");
        const ORIGIN: Packed = known(b"origin");
        const TRAILER: Packed = known(b"trailer");
        const UPGRADE: Packed = known(b"upgrade");
        const FORWARDED: Packed = known(b"forwarded");
        const CONNECTION: Packed = known(b"connection");
        const KEEP_ALIVE: Packed = known(b"keep-alive");
        const CONTENT_TYPE: Packed = known(b"content-type");
        const AUTHORIZATION: Packed = known(b"authorization");
        const X_PROXY_TOKEN: Packed = known(b"x-proxy-token");
        const CONTENT_LENGTH: Packed = known(b"content-length");
        const SEC_FETCH_SITE: Packed = known(b"sec-fetch-site");
        const PROXY_CONNECTION: Packed = known(b"proxy-connection");
        const TRANSFER_ENCODING: Packed = known(b"transfer-encoding");
        const PROXY_AUTHENTICATE: Packed = known(b"proxy-authenticate");
        const PROXY_AUTHORIZATION: Packed = known(b"proxy-authorization");
        match key {
            TE => Self::Te,
            HOST => Self::Host,
            COOKIE => Self::Cookie,
            EXPECT => Self::Expect,
            ORIGIN => Self::Origin,
            TRAILER => Self::Trailer,
            UPGRADE => Self::Upgrade,
            FORWARDED => Self::Forwarded,
            CONNECTION => Self::Connection,
            KEEP_ALIVE => Self::KeepAlive,
            CONTENT_TYPE => Self::ContentType,
            AUTHORIZATION => Self::Authorization,
            X_PROXY_TOKEN => Self::ProxyToken,
            CONTENT_LENGTH => Self::ContentLength,
            SEC_FETCH_SITE => Self::SecFetchSite,
            PROXY_CONNECTION => Self::ProxyConnection,
            TRANSFER_ENCODING => Self::TransferEncoding,
            PROXY_AUTHENTICATE => Self::ProxyAuthenticate,
            PROXY_AUTHORIZATION => Self::ProxyAuthorization,
            _ => Self::other_or_forwarded(name),
        }
    }

    fn other_or_forwarded(name: &[u8]) -> Self {
        match name.get(..12) {
            Some(p) if p.eq_ignore_ascii_case(b"x-forwarded-") => Self::XForwarded,
            _ => Self::Other,
        }
    }

    /// This name's bit in [`Fields`]' set of the names present.
    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A name of at most [`PACKED_MAX`] bytes as three little-endian words: its bytes with ASCII
/// letters lowercased, zero-padded, and its length in the last byte (which no name byte
/// reaches, so names that differ only in trailing zero bytes differ here too).
type Packed = [u64; 3];

/// The longest name [`packed`] takes (the longest name in [`Name`] is 19 bytes).
const PACKED_MAX: usize = 19;

/// `name` packed, or `None` when it is too long to be one of [`Name`]'s.
fn packed(name: &[u8]) -> Option<Packed> {
    if name.len() > PACKED_MAX {
        return None;
    }
    let mut bytes = [0u8; 24];
    bytes.get_mut(..name.len())?.copy_from_slice(name);
    bytes[23] = name.len() as u8;
    Some(words(bytes))
}

/// A lowercase name packed at compile time.
const fn known(name: &[u8]) -> Packed {
    assert!(name.len() <= PACKED_MAX);
    let mut bytes = [0u8; 24];
    let mut i = 0;
    while i < name.len() {
        bytes[i] = name[i];
        i += 1;
    }
    bytes[23] = name.len() as u8;
    words(bytes)
}

const fn words(bytes: [u8; 24]) -> Packed {
    let mut w = [0u64; 3];
    let mut k = 0;
    while k < 3 {
        let mut word = [0u8; 8];
        let mut i = 0;
        while i < 8 {
            word[i] = bytes[k * 8 + i];
            i += 1;
        }
        w[k] = lowercase(u64::from_le_bytes(word));
        k += 1;
    }
    w
}

/// The eight bytes of `w` with `A`..=`Z` turned into `a`..=`z`, every other byte as it is
/// (the same as `u8::to_ascii_lowercase` on each byte, eight at a time).
const fn lowercase(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let low7 = w & !HIGH;
    // Per byte, the high bit says: at least `A`; above `Z`; below 0x80. (No byte's sum
    // carries into the next: 0x7f + 0x3f < 0x100.)
    let from_a = low7 + ONES * (0x80 - b'A' as u64);
    let past_z = low7 + ONES * (0x80 - b'Z' as u64 - 1);
    let upper = from_a & !past_z & !w & HIGH;
    w | (upper >> 2)
}

// Every name has a bit of a `u32` in [`Fields`]' set of names present.
const _: () = assert!((Name::Other as u32) < 32);

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
    /// The names of `list` (one bit per [`Name`]), so that looking up an absent name, what
    /// most of the gate's lookups are, does not scan the list.
    present: u32,
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
        Some(Self::new(head, located.0))
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
        Some(Self::new(head, list))
    }

    fn new(head: Bytes, list: Vec<Field>) -> Self {
        let present = names_in(&list);
        Self {
            head,
            list,
            present,
        }
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
        self.present = names_in(&self.list);
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
        let list = if self.present & name.bit() == 0 {
            &[][..]
        } else {
            &self.list[..]
        };
        list.iter()
            .filter(move |f| f.kind == name)
            .map(|f| self.bytes(f.value))
    }

    /// Whether a field named `name` is present.
    pub fn contains(&self, name: Name) -> bool {
        self.present & name.bit() != 0
    }

    /// Whether a field with any of these names is present.
    pub fn contains_any(&self, names: &[Name]) -> bool {
        self.present & names.iter().fold(0, |set, n| set | n.bit()) != 0
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

/// The set of names in `list`, one bit per [`Name`].
fn names_in(list: &[Field]) -> u32 {
    list.iter().fold(0, |set, f| set | f.kind.bit())
}

/// Whether every byte is visible ASCII, space or tab (what `HeaderValue::to_str` accepts
/// as text).
pub fn is_visible_ascii(s: &[u8]) -> bool {
    s.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn fields_are_attached_only_where_every_span_lies_in_the_head() {
        let head = Bytes::from_static(b"ab: cd\r\n");
        let one = |name, value| {
            Located(vec![Field {
                name,
                value,
                kind: Name::Other,
            }])
        };
        let fields = Fields::attach(head.clone(), one((0, 2), (4, 6))).expect("inside");
        assert_eq!(
            fields.iter().next().map(|(_, n, v)| (n, v)),
            Some((&b"ab"[..], &b"cd"[..]))
        );
        for (name, value) in [
            ((2, 0), (4, 6)),
            ((0, 2), (6, 4)),
            ((0, 9), (4, 6)),
            ((0, 2), (4, 9)),
        ] {
            assert!(
                Fields::attach(head.clone(), one(name, value)).is_none(),
                "{name:?} {value:?}"
            );
        }
    }

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
            ("X-Forwarded-A-Name-Longer-Than-Any-Known", Name::XForwarded),
            ("proxy-authorizations", Name::Other),
            ("PROXY-AUTHORIZATION", Name::ProxyAuthorization),
            ("a-name-of-twenty-one", Name::Other),
            ("te\0", Name::Other),
            ("host\0\0", Name::Other),
            ("TE\r", Name::Other),
            ("hOsT", Name::Host),
        ];
        for (name, want) in cases {
            assert_eq!(Name::of(name.as_bytes()), *want, "{name}");
        }
    }

    #[test]
    fn words_are_lowercased_as_bytes_are() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut word = [b'X', b'y', b'-', b'Z', 0xC0, b'@', b'[', b'a'];
                word[at] = b;
                let mut want = word;
                want.make_ascii_lowercase();
                let got = lowercase(u64::from_le_bytes(word)).to_le_bytes();
                assert_eq!(got, want, "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn lookups_follow_retain() {
        let mut f = fields(&[("Host", "a"), ("Cookie", "c"), ("x-other", "z")]);
        assert!(f.contains(Name::Cookie) && f.contains(Name::Host));
        assert!(!f.contains(Name::Origin));
        f.retain(|kind, _| kind != Name::Cookie);
        assert!(!f.contains(Name::Cookie));
        assert_eq!(f.occurs(Name::Cookie), Occurs::Never);
        assert_eq!(f.occurs(Name::Host), Occurs::Once(b"a"));
        assert!(f.contains(Name::Other));
        f.retain(|_, _| false);
        assert!(!f.contains(Name::Host) && !f.contains(Name::Other));
        assert_eq!(f.values(Name::Host).count(), 0);
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
