#![no_main]
//! The gate never panics, never allows a request without the exact token, and never allows
//! one that carries `Origin`.

use libfuzzer_sys::fuzz_target;
use responses_api_proxy::fields::Fields;
use responses_api_proxy::gate::{self, GatePolicy};
use responses_api_proxy::token::ProxyToken;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((method, uri, headers)) = common::head(data) else { return };
    let token = ProxyToken::from_random(&[9u8; 32]);
    let policy = GatePolicy { port: 8080, token: &token, http_shutdown: true };
    if gate::check(&method, &uri, &Fields::from_header_map(&headers), &policy).is_ok() {
        assert!(!headers.contains_key("origin"));
        let presented = headers
            .get("x-proxy-token")
            .map(|v| v.as_bytes().to_vec())
            .or_else(|| headers.get("authorization").map(|v| v.as_bytes()[7..].trim_ascii_start().to_vec()));
        assert_eq!(presented.as_deref(), Some(token.as_str().as_bytes()));
    }
});
