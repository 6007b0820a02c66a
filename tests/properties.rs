//! Property tests over the pure parts: no input makes them panic, nothing is forwarded
//! without the exact token or with an Origin, rewriting never lets a credential or a
//! hop-by-hop header through, and key parsing accepts exactly the token68 alphabet.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use responses_api_proxy::fields::Fields;
use responses_api_proxy::gate::{self, GatePolicy, Route};
use responses_api_proxy::headers;
use responses_api_proxy::secret::{self, KeyError, MAX_KEY_LEN};
use responses_api_proxy::token::ProxyToken;

const PORT: u16 = 31337;

fn header_names() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("origin".to_string()),
        Just("Origin".to_string()),
        Just("host".to_string()),
        Just("content-type".to_string()),
        Just("content-length".to_string()),
        Just("transfer-encoding".to_string()),
        Just("authorization".to_string()),
        Just("x-proxy-token".to_string()),
        Just("connection".to_string()),
        Just("upgrade".to_string()),
        Just("sec-fetch-site".to_string()),
        Just("cookie".to_string()),
        "[a-z][a-z0-9-]{0,12}",
    ]
}

fn header_values(token: String) -> impl Strategy<Value = String> {
    prop_oneof![
        Just(token.clone()),
        Just(format!("Bearer {token}")),
        Just(format!("bearer  {token}")),
        Just(format!("Basic {token}")),
        Just(format!("127.0.0.1:{PORT}")),
        Just(format!("localhost:{PORT}")),
        Just("application/json".to_string()),
        Just("text/plain".to_string()),
        Just("0".to_string()),
        Just("2".to_string()),
        Just("chunked".to_string()),
        "[ -~]{0,60}",
    ]
}

fn methods() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::POST),
        Just(Method::GET),
        Just(Method::OPTIONS),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::HEAD),
    ]
}

fn targets() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/v1/responses".to_string()),
        Just("/shutdown".to_string()),
        Just("/v1/responses?x=1".to_string()),
        Just("http://127.0.0.1/v1/responses".to_string()),
        "/[a-zA-Z0-9/._~-]{0,30}",
    ]
}

fn token() -> ProxyToken {
    ProxyToken::from_random(&[42u8; 32])
}

fn build(pairs: &[(String, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(n, v);
        }
    }
    h
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048)
    ))]

    #[test]
    fn gate_never_allows_without_the_exact_token_or_with_origin(
        method in methods(),
        target in targets(),
        pairs in proptest::collection::vec((header_names(), header_values(token().as_str().to_string())), 0..10),
        shutdown in any::<bool>(),
    ) {
        let tok = token();
        let headers = build(&pairs);
        let Ok(uri) = target.parse::<Uri>() else { return Ok(()) };
        let policy = GatePolicy { port: PORT, token: &tok, http_shutdown: shutdown };
        let verdict = gate::check(&method, &uri, &Fields::from_header_map(&headers), &policy);
        if verdict.is_ok() {
            prop_assert!(!headers.contains_key("origin"));
            prop_assert!(!headers.contains_key("sec-fetch-site"));
            let xpt: Vec<_> = headers.get_all("x-proxy-token").iter().collect();
            let presented_ok = match xpt.as_slice() {
                [v] => v.as_bytes() == tok.as_str().as_bytes(),
                [] => headers.get_all("authorization").iter().count() == 1
                    && headers.get("authorization").is_some_and(|v| {
                        let v = v.as_bytes();
                        v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")
                            && v[7..].trim_ascii_start() == tok.as_str().as_bytes()
                    }),
                _ => false,
            };
            prop_assert!(presented_ok, "allowed without the exact token: {:?}", headers);
            let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
            let suffix = format!(":{}", PORT);
            prop_assert!(host.ends_with(&suffix));
        }
        if verdict == Ok(Route::Shutdown) {
            prop_assert!(shutdown);
        }
    }

    #[test]
    fn rewriting_never_forwards_credentials_or_hop_by_hop(
        pairs in proptest::collection::vec((header_names(), header_values("t".into())), 0..16),
        listed in "[a-z-]{1,10}",
    ) {
        let mut h = build(&pairs);
        h.append("connection", HeaderValue::from_str(&listed).unwrap_or(HeaderValue::from_static("x")));
        h.append(HeaderName::from_bytes(listed.as_bytes()).unwrap_or(HeaderName::from_static("x")), HeaderValue::from_static("1"));
        let key = HeaderValue::from_static("Bearer sk-test-prop");
        let out = headers::to_upstream(&Fields::from_header_map(&h), key.clone());
        prop_assert_eq!(out.get_all("authorization").iter().collect::<Vec<_>>(), vec![&key]);
        for name in ["x-proxy-token", "cookie", "host", "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection", "proxy-authorization", "forwarded"] {
            prop_assert!(!out.contains_key(name), "{} forwarded", name);
        }
        if listed != "authorization" {
            prop_assert!(!out.contains_key(listed.as_str()), "Connection-listed {} forwarded", listed);
        }
        let back = headers::to_client(Fields::from_header_map(&h)).to_header_map();
        for name in ["connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer", "proxy-connection"] {
            prop_assert!(!back.contains_key(name));
        }
    }

    #[test]
    fn key_parsing_accepts_exactly_token68(bytes in proptest::collection::vec(any::<u8>(), 0..200), chunk in 1usize..50) {
        let mut buf = vec![0u8; MAX_KEY_LEN + 2];
        let mut input = bytes.clone();
        input.push(b'\n');
        let mut pos = 0;
        let r = secret::read_line_with(&mut buf, |out| {
            let n = chunk.min(out.len()).min(input.len() - pos);
            out[..n].copy_from_slice(&input[pos..pos + n]);
            pos += n;
            Ok(n)
        });
        let line_end = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
        let mut line = &bytes[..line_end];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let body_len = line.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
        let valid = body_len > 0
            && line[..body_len].iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        match r {
            Ok(n) => {
                prop_assert!(valid);
                prop_assert_eq!(&buf[..n], line);
                prop_assert!(buf[n..].iter().all(|&b| b == 0));
            }
            Err(KeyError::Empty) => prop_assert!(line.is_empty()),
            Err(_) => {
                prop_assert!(!valid);
                prop_assert!(buf.iter().all(|&b| b == 0));
            }
        }
    }
}
