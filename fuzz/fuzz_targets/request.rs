#![no_main]
//! Client bytes: the request-head parser never panics and reaches the same verdict however
//! the bytes arrive (within the head limit; beyond it, a refusal either way); the framing and keep-alive rules never panic; and a response head the
//! proxy writes from any header set it accepted reads back, field for field, through the
//! proxy's own strict response parser.

use bytes::BytesMut;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use responses_api_proxy::h1::{self, ResponseFraming};

const LIMIT: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let whole = h1::parse_request_head(&mut BytesMut::from(rest), LIMIT);
    let step = usize::from(seed % 17) + 1;
    let mut buf = BytesMut::new();
    let mut split = Ok(None);
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        split = h1::parse_request_head(&mut buf, LIMIT);
        if !matches!(split, Ok(None)) {
            break;
        }
    }
    match (&whole, &split) {
        // Past the limit, which refusal is seen first depends on how far the parser got.
        (Err(_), Err(_)) if rest.len() > LIMIT => {}
        _ => assert_eq!(format!("{whole:?}"), format!("{split:?}")),
    }
    let Ok(Some(head)) = whole else { return };
    let _ = h1::request_framing(&head.headers, head.version);
    let _ = h1::request_keeps_alive(&head);
    let _ = h1::expects_continue(&head);
    let mut out = Vec::new();
    h1::encode_response_head(&mut out, StatusCode::OK, &head.headers, ResponseFraming::Length(0), false);
    let back = h1::parse_response_head(&mut BytesMut::from(&out[..]))
        .expect("what the proxy writes parses")
        .expect("complete");
    let kept = head
        .headers
        .iter()
        .filter(|(n, _)| !["content-length", "transfer-encoding", "connection"].contains(&n.as_str()))
        .count();
    assert_eq!(back.headers.len(), kept + 1, "every field, plus content-length");
});
