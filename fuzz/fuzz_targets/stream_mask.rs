#![no_main]
//! Masking a stream split anywhere gives the same bytes as masking it whole, keeps its
//! length, and never lets the key through.

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use responses_api_proxy::mask::{self, StreamMask};

const KEY: &[u8] = b"sk-aab";

fuzz_target!(|data: &[u8]| {
    let Some((&cut_seed, rest)) = data.split_first() else { return };
    let mut m = StreamMask::new(KEY);
    let mut out = Vec::new();
    let step = usize::from(cut_seed % 7) + 1;
    for chunk in rest.chunks(step) {
        out.extend_from_slice(&m.push(Bytes::copy_from_slice(chunk)));
    }
    if let Some(b) = m.finish() {
        out.extend_from_slice(&b);
    }
    assert_eq!(out.len(), rest.len());
    assert!(!mask::contains(&out, KEY));
    let mut whole = StreamMask::new(KEY);
    let mut one = whole.push(Bytes::copy_from_slice(rest)).to_vec();
    if let Some(b) = whole.finish() {
        one.extend_from_slice(&b);
    }
    assert_eq!(out, one);
});
