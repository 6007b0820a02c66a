//! Pure header rewriting, both ways.
//!
//! Upstream gets what the client sent minus credentials meant for the proxy, cookies,
//! forwarding metadata and the hop-by-hop set, plus the operator's key. The client gets the
//! upstream's headers minus the hop-by-hop set. Values are moved, never re-encoded.
//!
//! No IO: takes a `HeaderMap`, returns a `HeaderMap`.

use http::header::{
    AUTHORIZATION, CONNECTION, COOKIE, EXPECT, FORWARDED, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::gate::PROXY_TOKEN_HEADER;

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the legacy ones), removed in both directions.
const HOP_BY_HOP: [HeaderName; 7] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    HeaderName::from_static("proxy-connection"),
];

/// The header names listed in `Connection` (none, without allocating, when it is absent).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

/// Removes every header `doomed` picks, finding them in one pass over the names (most
/// heads have few or none to remove, and each removal costs a lookup).
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    let picked: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in &picked {
        headers.remove(name);
    }
}

/// Whether a request header must not reach the upstream (besides the hop-by-hop set).
fn is_stripped_request_header(name: &HeaderName) -> bool {
    *name == AUTHORIZATION
        || *name == HOST
        || *name == PROXY_TOKEN_HEADER
        || *name == PROXY_AUTHORIZATION
        || *name == COOKIE
        || *name == FORWARDED
        || *name == EXPECT
        || name.as_str().starts_with("x-forwarded-")
}

/// The headers to send upstream: the client's, rewritten, with `authorization` set to the
/// operator's key (`Host` is set by the HTTP client from the upstream URL).
pub fn to_upstream(mut headers: HeaderMap, authorization: HeaderValue) -> HeaderMap {
    let listed = connection_listed(&headers);
    remove_where(&mut headers, |n| {
        HOP_BY_HOP.contains(n) || is_stripped_request_header(n) || listed.contains(n)
    });
    headers.insert(AUTHORIZATION, authorization);
    headers
}

/// The headers to send to the client: the upstream's minus the hop-by-hop set (and
/// `Proxy-Authenticate`, which is addressed to us, not to the client).
pub fn to_client(mut headers: HeaderMap) -> HeaderMap {
    let listed = connection_listed(&headers);
    remove_where(&mut headers, |n| {
        HOP_BY_HOP.contains(n) || *n == PROXY_AUTHENTICATE || listed.contains(n)
    });
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.as_str().to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn request_headers_are_rewritten() {
        let key = HeaderValue::from_static("Bearer sk-test-key");
        let client = map(&[
            ("Authorization", "Bearer proxy-token"),
            ("Authorization", "Bearer second"),
            ("Host", "127.0.0.1:1234"),
            ("X-Proxy-Token", "proxy-token"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Cookie", "a=b"),
            ("Connection", "keep-alive, X-Custom-Hop"),
            ("X-Custom-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "x"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("Expect", "100-continue"),
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
            ("Accept", "text/event-stream"),
            ("OpenAI-Beta", "responses=v1"),
            ("X-Stainless-Lang", "python"),
            ("Accept-Encoding", "gzip"),
            ("Session_id", "abc"),
        ]);
        let out = to_upstream(client, key.clone());
        assert_eq!(
            names(&out),
            [
                "accept",
                "accept-encoding",
                "authorization",
                "content-length",
                "content-type",
                "openai-beta",
                "session_id",
                "x-stainless-lang"
            ]
        );
        let auth: Vec<_> = out.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, [&key]);
        assert_eq!(out["content-length"], "12");
    }

    #[test]
    fn response_headers_are_rewritten() {
        let upstream = map(&[
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Content-Type", "text/event-stream"),
            ("Content-Encoding", "gzip"),
            ("Content-Length", "5"),
            ("x-request-id", "req_123"),
            ("Set-Cookie", "__cf_bm=1"),
            ("Set-Cookie", "_cfuvid=2"),
        ]);
        let out = to_client(upstream);
        assert_eq!(
            names(&out),
            [
                "content-encoding",
                "content-length",
                "content-type",
                "set-cookie",
                "x-request-id"
            ]
        );
        assert_eq!(out.get_all("set-cookie").iter().count(), 2);
    }
}
