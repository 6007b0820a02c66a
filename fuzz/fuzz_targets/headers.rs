#![no_main]
//! Rewriting never lets a credential or hop-by-hop header through, and never panics.

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use responses_api_proxy::fields::Fields;
use responses_api_proxy::headers;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((_, _, h)) = common::head(data) else { return };
    let key = HeaderValue::from_static("Bearer sk-test-fuzz");
    let listed: Vec<String> = h
        .get_all("connection")
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b',').map(|n| String::from_utf8_lossy(n.trim_ascii()).to_ascii_lowercase()).collect::<Vec<_>>())
        .collect();
    let up = headers::to_upstream(&Fields::from_header_map(&h), key.clone());
    assert_eq!(up.get_all("authorization").iter().collect::<Vec<_>>(), vec![&key]);
    for name in ["x-proxy-token", "cookie", "host", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection", "proxy-authorization", "forwarded"] {
        assert!(!up.contains_key(name));
    }
    for name in &listed {
        if name != "authorization" && !name.is_empty() {
            assert!(!up.contains_key(name.as_str()), "{name}");
        }
    }
    let down = headers::to_client(Fields::from_header_map(&h)).to_header_map();
    for name in ["connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "proxy-connection"] {
        assert!(!down.contains_key(name));
    }
});
