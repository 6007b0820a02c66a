#![no_main]
//! Upstream bytes: the response-head parser and framing rules never panic, every field it
//! accepts is one `http` accepts too (the HTTPS path and the dump take header maps), and the chunked
//! decoder gives the same data and verdict however its input is split.

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use responses_api_proxy::h1::{self, Chunked};

fn decode(input: &[u8], step: usize) -> (Vec<u8>, Result<bool, h1::H1Error>) {
    let mut c = Chunked::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match c.next_data(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf.split_to(n)),
                Err(e) => return (out, Err(e)),
            }
        }
    }
    (out, Ok(c.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let mut buf = BytesMut::from(rest);
    if let Ok(Some(head)) = h1::parse_response_head(&mut buf) {
        assert!(buf.len() < rest.len());
        assert_eq!(head.fields.to_header_map().len(), head.fields.len(), "http accepts every field");
        if let Ok(framing) = h1::response_framing(&head) {
            let _ = h1::keeps_alive(&head, framing);
        }
    }
    let whole = decode(rest, rest.len().max(1));
    let split = decode(rest, usize::from(seed % 7) + 1);
    match (&whole.1, &split.1) {
        // Data before an error depends on where the error is noticed; verdicts must agree.
        (Err(_), Err(_)) => {}
        _ => assert_eq!(whole, split),
    }
});
