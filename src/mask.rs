//! Pure: overwriting the key with a same-length marker wherever an upstream reflects it, in
//! response headers and in the streamed body, including a key split across chunks.
//!
//! The body masker never batches: a chunk is passed on at once and untouched (zero-copy)
//! unless it contains the key or ends with a proper prefix of it. Only those trailing bytes
//! (fewer than the key's length) are held until the next chunk shows whether the key
//! continues; at the end of the stream they are released as they are.

use bytes::{Bytes, BytesMut};

use crate::fields::Fields;

/// The byte a reflected key is overwritten with.
pub const MARK: u8 = b'*';

/// Start of every occurrence of `key` in `hay`, non-overlapping, left to right.
fn occurrences(hay: &[u8], key: &[u8]) -> Vec<usize> {
    occurrences_at(hay, key, anchor(key))
}

/// The position in `key` of the byte [`occurrences_at`] looks for first: the `k` of the
/// `sk-` every OpenAI key starts with, else the key's first byte. Text is full of `s` and
/// has few `k`s, so far fewer places stop the search. Only a published byte may be the
/// anchor: how long the scan takes depends on how often the anchor occurs in the response,
/// which a client can steer (by asking the model to repeat a character), so an anchor
/// taken from the key's secret part would tell a timing client which byte it is.
fn anchor(key: &[u8]) -> usize {
    usize::from(key.starts_with(b"sk-"))
}

/// The key, with the position its search starts from worked out once (the proxy builds
/// one at start-up, not one per response).
#[derive(Clone, Copy)]
pub struct Needle {
    key: &'static [u8],
    at: usize,
}

impl Needle {
    /// `key` (must not be empty) and its [`anchor`].
    pub fn new(key: &'static [u8]) -> Self {
        Self {
            key,
            at: anchor(key),
        }
    }

    fn occurrences(&self, hay: &[u8]) -> Vec<usize> {
        occurrences_at(hay, self.key, self.at)
    }
}

impl std::fmt::Debug for Needle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Needle([REDACTED])")
    }
}

/// [`occurrences`], looking first for `key[at]` (any position gives the same result).
fn occurrences_at(hay: &[u8], key: &[u8], at: usize) -> Vec<usize> {
    let mut found = Vec::new();
    let Some(&byte) = key.get(at) else {
        return found;
    };
    let Some(last_start) = hay.len().checked_sub(key.len()) else {
        return found;
    };
    // `i` is the first start still possible; the anchor byte of a key starting at `s` is
    // at `s + at`.
    let mut i = 0;
    while i <= last_start {
        let Some(off) = memchr::memchr(byte, &hay[i + at..=last_start + at]) else {
            break;
        };
        let start = i + off;
        if &hay[start..start + key.len()] == key {
            found.push(start);
            i = start + key.len();
        } else {
            i = start + 1;
        }
    }
    found
}

/// Length of the longest suffix of `hay` that is a proper prefix of `key`.
fn held_suffix(hay: &[u8], key: &[u8]) -> usize {
    let Some(&first) = key.first() else {
        return 0;
    };
    let tail_start = hay.len() - key.len().saturating_sub(1).min(hay.len());
    for off in memchr::memchr_iter(first, &hay[tail_start..]) {
        let p = tail_start + off;
        if hay[p..] == key[..hay.len() - p] {
            return hay.len() - p;
        }
    }
    0
}

fn overwrite(buf: &mut [u8], at: &[usize], len: usize) {
    for &i in at {
        buf[i..i + len].fill(MARK);
    }
}

/// Whether `hay` contains `key`.
pub fn contains(hay: &[u8], key: &[u8]) -> bool {
    !occurrences(hay, key).is_empty()
}

/// Masks the key in every field, name and value: the fields come back as they were when
/// none contains it (the usual case, no copy), else rebuilt with the key's bytes
/// overwritten. (A name holding the key is only a hostile or broken upstream's doing; `*`
/// is a valid name character, so the masked name is still a name.)
pub fn mask_fields(fields: Fields, needle: Needle) -> Fields {
    let key = needle.key;
    // Every name and value is a part of the head's bytes, so a head without the key has no
    // field holding it: one search of the head instead of two per field. (A key elsewhere
    // in the head, in the status line or in a field already dropped, only sends the
    // fields to the search one by one.)
    if needle.occurrences(fields.head()).is_empty() {
        return fields;
    }
    let holds = |part: &[u8]| !needle.occurrences(part).is_empty();
    if !fields.iter().any(|(_, n, v)| holds(v) || holds(n)) {
        return fields;
    }
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = fields
        .iter()
        .map(|(_, n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    drop(fields);
    for (name, value) in &mut pairs {
        for part in [name, value] {
            let at = needle.occurrences(part);
            overwrite(part, &at, key.len());
        }
    }
    let masked = Fields::from_pairs(pairs.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
    for (name, value) in &mut pairs {
        zeroize::Zeroize::zeroize(name);
        zeroize::Zeroize::zeroize(value);
    }
    masked
}

/// Masks the key in a stream of body chunks.
pub struct StreamMask {
    needle: Needle,
    /// Trailing bytes of the stream so far that could be the start of the key.
    held: BytesMut,
}

impl std::fmt::Debug for StreamMask {
    // The held bytes are a prefix of the key: only their count is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamMask")
            .field("needle", &self.needle)
            .field("held", &self.held.len())
            .finish()
    }
}

impl StreamMask {
    /// A masker for `key` (must not be empty).
    pub fn new(key: &'static [u8]) -> Self {
        Self::of(Needle::new(key))
    }

    /// A masker for the needle's key.
    pub fn of(needle: Needle) -> Self {
        Self {
            needle,
            held: BytesMut::new(),
        }
    }

    /// Takes the next chunk; returns what can be sent now (possibly empty).
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let key = self.needle.key;
        if self.held.is_empty() {
            let at = self.needle.occurrences(&chunk);
            if at.is_empty() && held_suffix(&chunk, key) == 0 {
                return chunk;
            }
            let mut buf = BytesMut::from(&chunk[..]);
            overwrite(&mut buf, &at, key.len());
            let hold = held_suffix(&buf, key);
            self.held = buf.split_off(buf.len() - hold);
            return buf.freeze();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(&chunk);
        let at = self.needle.occurrences(&buf);
        overwrite(&mut buf, &at, key.len());
        let hold = held_suffix(&buf, key);
        self.held = buf.split_off(buf.len() - hold);
        buf.freeze()
    }

    /// At the end of the stream: the held bytes (not a whole key, so sent as they are).
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.held.is_empty()).then(|| std::mem::take(&mut self.held).freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    const KEY: &[u8] = b"sk-test-abcdef";

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, Vec<usize>) {
        let mut m = StreamMask::new(KEY);
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for c in chunks {
            let b = m.push(Bytes::copy_from_slice(c));
            sizes.push(b.len());
            out.extend_from_slice(&b);
        }
        if let Some(b) = m.finish() {
            out.extend_from_slice(&b);
        }
        (out, sizes)
    }

    #[test]
    fn masks_whole_and_split_keys_and_keeps_lengths() {
        let star = "*".repeat(KEY.len());
        let cases: &[(&[&[u8]], String)] = &[
            (&[b"data: hello\n\n"], "data: hello\n\n".into()),
            (&[b"key=sk-test-abcdef!"], format!("key={star}!")),
            (&[b"sk-test-abcdefsk-test-abcdef"], format!("{star}{star}")),
            (&[b"x sk-test-", b"abcdef y"], format!("x {star} y")),
            (&[b"s", b"k", b"-test-abc", b"def"], star.clone()),
            (&[b"sk-test-abc", b"XYZ"], "sk-test-abcXYZ".into()),
            (&[b"ends with sk-te"], "ends with sk-te".into()),
            (&[b"sk-sk-test-abcdef"], format!("sk-{star}")),
            (&[b"sssk-test-abcdef"], format!("ss{star}")),
            (&[b""], String::new()),
        ];
        for (chunks, want) in cases {
            let (out, _) = run(chunks);
            assert_eq!(String::from_utf8_lossy(&out), *want, "{chunks:?}");
        }
    }

    /// Every non-overlapping occurrence, left to right, found by trying every start.
    fn naive_occurrences(hay: &[u8], key: &[u8]) -> Vec<usize> {
        let mut found = Vec::new();
        let mut i = 0;
        while !key.is_empty() && i + key.len() <= hay.len() {
            if &hay[i..i + key.len()] == key {
                found.push(i);
                i += key.len();
            } else {
                i += 1;
            }
        }
        found
    }

    fn naive_held_suffix(hay: &[u8], key: &[u8]) -> usize {
        (1..key.len().min(hay.len() + 1))
            .rev()
            .find(|&n| hay[hay.len() - n..] == key[..n])
            .unwrap_or(0)
    }

    #[test]
    fn scan_edge_cases() {
        // Key at the very end, overlapping candidates, a key longer than the hay.
        assert_eq!(occurrences(b"--s", b"-s"), [1]);
        assert_eq!(occurrences(b"sksk-sk-", b"sk-"), [2, 5]);
        assert_eq!(occurrences(b"sk", b"sk-"), Vec::<usize>::new());
        assert_eq!(held_suffix(b"--s", b"-s"), 0);
        assert_eq!(held_suffix(b"xx-", b"-s"), 1);
        assert_eq!(held_suffix(b"sk-te", b"sk-test"), 5);
        assert_eq!(held_suffix(b"", b"sk-"), 0);
        assert_eq!(held_suffix(b"abc", b""), 0);
    }

    #[test]
    fn contains_says_whether_the_key_is_anywhere() {
        assert!(contains(b"sk-test-abcdef", KEY));
        assert!(contains(b"error: sk-test-abcdef.", KEY));
        assert!(!contains(b"error: sk-test-abcde", KEY));
        assert!(!contains(b"", KEY));
        assert!(!contains(b"sk-test-abcdeF", KEY));
    }

    #[test]
    fn the_anchor_is_a_published_byte() {
        assert_eq!(anchor(b"sk-proj-abC1"), 1);
        assert_eq!(anchor(b"sk-"), 1);
        assert_eq!(anchor(b"xk-abc"), 0);
        assert_eq!(anchor(b"sk"), 0);
        assert_eq!(anchor(b""), 0);
    }

    #[test]
    fn debug_output_shows_no_key_bytes() {
        let mut m = StreamMask::new(KEY);
        let _ = m.push(Bytes::from_static(b"tail sk-test-ab"));
        let shown = format!("{m:?} {:?}", Needle::new(KEY));
        assert!(!shown.contains("sk-") && !shown.contains("115"), "{shown}");
        assert!(shown.contains("held: 10"), "{shown}");
        assert!(shown.contains("Needle([REDACTED])"), "{shown}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn any_anchor_finds_what_trying_every_start_finds(
            hay in proptest::collection::vec(proptest::sample::select(b"sk-A1x".to_vec()), 0..40),
            key in proptest::collection::vec(proptest::sample::select(b"sk-A1x".to_vec()), 0..6),
        ) {
            let want = naive_occurrences(&hay, &key);
            proptest::prop_assert_eq!(occurrences(&hay, &key), want.clone());
            for at in 0..key.len() {
                proptest::prop_assert_eq!(occurrences_at(&hay, &key, at), want.clone());
            }
            proptest::prop_assert_eq!(held_suffix(&hay, &key), naive_held_suffix(&hay, &key));
        }
    }

    #[test]
    fn passes_chunks_through_without_holding_unless_needed() {
        let (_, sizes) = run(&[b"event: a\n\n", b"event: b\n\n"]);
        assert_eq!(sizes, [10, 10]);
        // Only the possible key prefix is held back.
        let (_, sizes) = run(&[b"abc sk-t", b"ail"]);
        assert_eq!(sizes, [4, 7]);
    }

    #[test]
    fn untouched_chunks_are_not_copied() {
        let mut m = StreamMask::new(KEY);
        let chunk = Bytes::from_static(b"no key here\n\n");
        let out = m.push(chunk.clone());
        assert_eq!(out.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn parsed_heads_are_masked_field_by_field_whatever_else_holds_the_key() {
        let stars = "*".repeat(KEY.len());
        let parse = |raw: String| {
            let mut buf = BytesMut::from(raw.as_bytes());
            crate::h1::parse_response_head(&mut buf)
                .expect("valid")
                .expect("complete")
                .fields
        };
        let k = std::str::from_utf8(KEY).expect("ascii");
        // In the reason phrase (never forwarded) and in a field dropped before masking:
        // the fields are left as they are.
        let mut fields = parse(format!(
            "HTTP/1.1 200 {k}\r\nx-drop: {k}\r\ncontent-type: text/plain\r\n\r\n"
        ));
        fields.retain(|_, n| n != b"x-drop");
        let before = fields.head().as_ptr();
        let masked = mask_fields(fields, Needle::new(KEY));
        assert_eq!(masked.head().as_ptr(), before, "no copy");
        assert_eq!(masked.len(), 1);
        // In the last field's value and in a name, behind clean fields: masked.
        let masked = mask_fields(
            parse(format!(
                "HTTP/1.1 200 OK\r\na: 1\r\nx-{k}: 2\r\nb: x{k}\r\n\r\n"
            )),
            Needle::new(KEY),
        );
        let got: Vec<_> = masked
            .iter()
            .map(|(_, n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                (b"a".to_vec(), b"1".to_vec()),
                (format!("x-{stars}").into_bytes(), b"2".to_vec()),
                (b"b".to_vec(), format!("x{stars}").into_bytes()),
            ]
        );
    }

    #[test]
    fn masks_field_values_and_leaves_clean_fields_alone() {
        let mut h = HeaderMap::new();
        h.append("X-Echo", HeaderValue::from_static("Bearer sk-test-abcdef"));
        h.append("x-other", HeaderValue::from_static("fine"));
        h.append(
            "x-echo",
            HeaderValue::from_static("sk-test-abcdefsk-test-abcdef!"),
        );
        let fields = Fields::from_header_map(&h);
        let masked = mask_fields(fields, Needle::new(KEY));
        let stars = "*".repeat(KEY.len());
        let got: Vec<_> = masked
            .iter()
            .map(|(_, n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("x-echo".to_string(), format!("Bearer {stars}")),
                ("x-echo".to_string(), format!("{stars}{stars}!")),
                ("x-other".to_string(), "fine".to_string()),
            ]
        );
        // A name holding the key is masked too.
        let mut h = HeaderMap::new();
        h.append(
            http::HeaderName::from_bytes(b"x-sk-test-abcdef").expect("name"),
            HeaderValue::from_static("1"),
        );
        let masked = mask_fields(Fields::from_header_map(&h), Needle::new(KEY));
        let names: Vec<_> = masked.iter().map(|(_, n, _)| n.to_vec()).collect();
        assert_eq!(names, [format!("x-{stars}").into_bytes()]);
        let clean = Fields::from_header_map(&HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        )]));
        let before = clean.head().as_ptr();
        assert_eq!(
            mask_fields(clean, Needle::new(KEY)).head().as_ptr(),
            before,
            "no copy"
        );
    }
}
