//! Pure header rewriting, both ways.
//!
//! Upstream gets what the client sent minus credentials meant for the proxy, cookies,
//! forwarding metadata and the hop-by-hop set, plus the operator's key. The client gets the
//! upstream's headers minus the hop-by-hop set. Values are moved, never re-encoded.
//!
//! No IO: fields in, fields out.

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};

use crate::fields::{Fields, Name};

/// Hop-by-hop fields (RFC 9110 §7.6.1 and the legacy ones), removed in both directions.
const HOP_BY_HOP: [Name; 7] = [
    Name::Connection,
    Name::KeepAlive,
    Name::Te,
    Name::Trailer,
    Name::TransferEncoding,
    Name::Upgrade,
    Name::ProxyConnection,
];

fn is_hop_by_hop(name: Name) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Whether a request field never reaches the upstream, whatever `Connection` says: the
/// hop-by-hop set, credentials meant for the proxy, the client's `Host` (the upstream's is
/// written instead), cookies, forwarding metadata and `Expect` (the proxy answers that
/// itself).
fn is_stripped_request_field(name: Name) -> bool {
    is_hop_by_hop(name)
        || matches!(
            name,
            Name::Authorization
                | Name::Host
                | Name::ProxyToken
                | Name::ProxyAuthorization
                | Name::Cookie
                | Name::Forwarded
                | Name::Expect
                | Name::XForwarded
        )
}

/// The names `Connection` lists (none, without allocating, when it is absent).
fn listed_in_connection(fields: &Fields) -> Vec<&[u8]> {
    fields
        .values(Name::Connection)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a request field goes to the upstream.
fn goes_upstream(kind: Name, name: &[u8], listed: &[&[u8]]) -> bool {
    !is_stripped_request_field(kind) && !listed.iter().any(|t| t.eq_ignore_ascii_case(name))
}

/// The client's fields that go to the upstream, in the order sent: `(what, name as sent,
/// value)`. The caller adds the operator's key (as [`to_upstream`] does).
pub fn upstream_fields(fields: &Fields) -> impl Iterator<Item = (Name, &[u8], &[u8])> + Clone {
    let listed = listed_in_connection(fields);
    fields
        .iter()
        .filter(move |&(kind, name, _)| goes_upstream(kind, name, &listed))
}

/// The headers to send upstream as a header map (for the HTTPS client): the same fields as
/// [`upstream_fields`], with `authorization` set to the operator's key (`Host` is set by
/// the HTTP client from the upstream URL).
pub fn to_upstream(fields: &Fields, authorization: HeaderValue) -> HeaderMap {
    let listed = listed_in_connection(fields);
    let mut headers = fields.header_map_of(|kind, name| goes_upstream(kind, name, &listed));
    headers.insert(AUTHORIZATION, authorization);
    headers
}

/// The fields to send to the client: the upstream's minus the hop-by-hop set, what its
/// `Connection` lists, and `Proxy-Authenticate` (addressed to the proxy, not the client).
pub fn to_client(mut fields: Fields) -> Fields {
    // Nothing to remove (the usual answer): the fields as they are. (Names a `Connection`
    // lists are removed only when there is a `Connection`, which is one of the set.)
    if !fields.contains_any(&HOP_BY_HOP) && !fields.contains(Name::ProxyAuthenticate) {
        return fields;
    }
    // Owned, so the fields can be trimmed while they are in hand (allocates only when the
    // upstream sent a `Connection` listing names).
    let listed: Vec<Vec<u8>> = listed_in_connection(&fields)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    fields.retain(|kind, name| {
        !is_hop_by_hop(kind)
            && kind != Name::ProxyAuthenticate
            && !listed.iter().any(|t| t.eq_ignore_ascii_case(name))
    });
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::tests::map;

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
        let out = to_upstream(&Fields::from_header_map(&client), key.clone());
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
        let out = to_client(Fields::from_header_map(&upstream)).to_header_map();
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

    #[test]
    fn each_removed_response_field_is_removed_alone() {
        for name in [
            "Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Connection",
            "Proxy-Authenticate",
        ] {
            let upstream = map(&[("Content-Type", "text/plain"), (name, "x")]);
            let out = to_client(Fields::from_header_map(&upstream)).to_header_map();
            assert_eq!(names(&out), ["content-type"], "{name}");
        }
        // Nothing to remove: the same fields, not a copy.
        let clean = Fields::from_header_map(&map(&[("Content-Type", "text/plain")]));
        let before = clean.head().as_ptr();
        assert_eq!(to_client(clean).head().as_ptr(), before);
    }
}
