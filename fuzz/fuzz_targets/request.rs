#![no_main]
//! Client bytes: the request-head parser never panics and reaches the same verdict however
//! the bytes arrive (within the head limit; beyond it, a refusal either way); the framing
//! and keep-alive rules never panic; every field it accepts is one `http` accepts too; the
//! request head the proxy writes upstream from any accepted head reads back through the
//! strict parser with exactly the fields rewriting lets through, plus host, the key and
//! the length; and a response head the proxy writes from any such fields, rewritten for
//! the client, reads back field for field through its own strict response parser.

use bytes::BytesMut;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use responses_api_proxy::fields::{Name, Occurs};
use responses_api_proxy::h1::{self, RequestHead, RequestHeadError, ResponseFraming};
use responses_api_proxy::headers;

/// Everything a parse produced, values included.
fn shape(r: &Result<Option<RequestHead>, RequestHeadError>) -> String {
    match r {
        Ok(Some(h)) => format!(
            "{} {} {:?} {} {:?}",
            h.method,
            h.uri(),
            h.version,
            h.bare_lf,
            h.fields.iter().collect::<Vec<_>>()
        ),
        other => format!("{:?}", other.as_ref().map(|_| ())),
    }
}

const LIMIT: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else { return };
    let mut left = BytesMut::from(rest);
    let whole = h1::parse_request_head(&mut left, LIMIT);
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
        _ => assert_eq!(shape(&whole), shape(&split)),
    }
    let Ok(Some(head)) = whole else { return };
    // The bare-LF flag (found without a scan when the layout allows) is what a full scan finds.
    let len = rest.len() - left.len();
    assert_eq!(head.bare_lf, h1::has_bare_lf(&rest[..len]), "bare LF flag");
    let _ = h1::request_framing(&head.fields, head.version);
    let _ = h1::request_keeps_alive(&head);
    let _ = h1::expects_continue(&head);
    let map = head.fields.to_header_map();
    assert_eq!(map.len(), head.fields.len(), "http accepts every field the parser does");

    // Upstream: what the proxy writes reads back with exactly the fields let through.
    let through: Vec<_> = headers::upstream_fields(&head.fields)
        .filter(|(k, _, _)| *k != Name::ContentLength && *k != Name::TransferEncoding)
        .collect();
    let up = h1::encode_request_head(
        "/v1/responses",
        "127.0.0.1:1",
        headers::upstream_fields(&head.fields),
        b"Bearer sk-test-fuzz",
        Some(7),
        0,
    );
    let sent = h1::parse_request_head(&mut BytesMut::from(&up[..]), usize::MAX)
        .expect("what the proxy sends upstream parses")
        .expect("complete");
    assert_eq!(sent.fields.len(), through.len() + 3, "host, the key, the length");
    assert_eq!(sent.fields.occurs(Name::Host), Occurs::Once(b"127.0.0.1:1"));
    assert_eq!(sent.fields.occurs(Name::Authorization), Occurs::Once(b"Bearer sk-test-fuzz"));
    assert_eq!(sent.fields.occurs(Name::ContentLength), Occurs::Once(b"7"));
    for name in [Name::ProxyToken, Name::Cookie, Name::Connection, Name::TransferEncoding, Name::Upgrade, Name::Expect, Name::XForwarded] {
        assert!(!sent.fields.contains(name));
    }
    let https = headers::to_upstream(&head.fields, http::HeaderValue::from_static("Bearer k"));
    assert_eq!(
        https.len(),
        headers::upstream_fields(&head.fields).count() + 1,
        "the HTTPS path forwards the same fields, plus the key"
    );
    assert_eq!(https.get_all("authorization").iter().count(), 1);

    // Downstream: these fields as an upstream's answer, rewritten for the client, are
    // written and read back field for field (names lowercased), plus the proxy's length;
    // nothing hop-by-hop survives.
    let down = headers::to_client(head.fields.clone());
    for name in [Name::Connection, Name::KeepAlive, Name::Te, Name::Trailer, Name::TransferEncoding, Name::Upgrade, Name::ProxyConnection, Name::ProxyAuthenticate] {
        assert!(!down.contains(name));
    }
    let mut out = Vec::new();
    h1::encode_response_head(&mut out, StatusCode::OK, &down, ResponseFraming::Length(0), false);
    let back = h1::parse_response_head(&mut BytesMut::from(&out[..]))
        .expect("what the proxy writes parses")
        .expect("complete");
    let want: Vec<(Vec<u8>, Vec<u8>)> = down
        .iter()
        .filter(|(k, _, _)| *k != Name::ContentLength)
        .map(|(_, n, v)| (n.to_ascii_lowercase(), v.to_vec()))
        .chain(std::iter::once((b"content-length".to_vec(), b"0".to_vec())))
        .collect();
    let got: Vec<(Vec<u8>, Vec<u8>)> = back.fields.iter().map(|(_, n, v)| (n.to_vec(), v.to_vec())).collect();
    assert_eq!(got, want, "every field, plus content-length");
});
