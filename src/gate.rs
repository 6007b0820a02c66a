//! The gate: a pure decision over a request head, allow or refuse, taken before a single
//! byte goes upstream. The order is deliberate (see DESIGN.md): browser requests, then the
//! `Host` (DNS rebinding), then the body's media type (forces a browser preflight), then the
//! proxy token, and only then the method and path, so a caller without the token learns
//! nothing about what exists.
//!
//! No IO, no tokio: it takes the parsed head and returns a value.

use http::{Method, StatusCode, Uri};

use crate::fields::{Fields, Name, Occurs, is_visible_ascii};
use crate::token::ProxyToken;

/// The path that is forwarded.
pub const RESPONSES_PATH: &str = "/v1/responses";

/// The path that stops the proxy when `--http-shutdown` is on.
pub const SHUTDOWN_PATH: &str = "/shutdown";

/// What the gate needs to know about this launch.
#[derive(Debug, Clone, Copy)]
pub struct GatePolicy<'a> {
    /// The port the listener is bound to, the only one accepted in `Host`.
    pub port: u16,
    /// The token clients must present.
    pub token: &'a ProxyToken,
    /// Whether `GET /shutdown` is served.
    pub http_shutdown: bool,
}

/// What an allowed request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/responses`: forward upstream.
    Responses,
    /// `GET /shutdown`: stop the proxy.
    Shutdown,
}

/// Why a request was refused, in gate order. Each maps to a fixed status and message that
/// echo nothing the caller sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Before the gate: a head whose body framing is ambiguous (`Content-Length` with
    /// `Transfer-Encoding`, a `Transfer-Encoding` other than `chunked`, repeated lengths),
    /// the shapes request smuggling is made of.
    AmbiguousFraming,
    /// Step 1: the request came from a web browser (`Origin` or `Sec-Fetch-Site`).
    BrowserRequest,
    /// Step 2: `Host` missing, repeated, or not a loopback name with our port.
    BadHost,
    /// Step 3: a body that is not declared `application/json`.
    UnsupportedMediaType,
    /// Step 4: no token presented.
    MissingToken,
    /// Step 4: a token presented in a shape we do not accept (e.g. `Basic`, empty bearer,
    /// the header repeated).
    MalformedToken,
    /// Step 4: a well-formed token that is not this launch's.
    WrongToken,
    /// Step 5: not `POST /v1/responses` (or `GET /shutdown` when enabled).
    NotAllowed,
}

impl Refusal {
    /// The HTTP status of this refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Self::AmbiguousFraming => StatusCode::BAD_REQUEST,
            Self::BrowserRequest | Self::BadHost | Self::NotAllowed => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MissingToken | Self::MalformedToken | Self::WrongToken => {
                StatusCode::UNAUTHORIZED
            }
        }
    }

    /// The machine-readable `error.code`.
    pub fn code(self) -> &'static str {
        match self {
            Self::AmbiguousFraming => "ambiguous_request_framing",
            Self::BrowserRequest => "browser_request_refused",
            Self::BadHost => "invalid_host",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::MissingToken => "missing_proxy_token",
            Self::MalformedToken => "malformed_proxy_token",
            Self::WrongToken => "invalid_proxy_token",
            Self::NotAllowed => "route_not_allowed",
        }
    }

    /// The OpenAI-style `error.type`.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::MissingToken | Self::MalformedToken | Self::WrongToken => "authentication_error",
            Self::BrowserRequest | Self::BadHost | Self::NotAllowed => "permission_error",
            Self::UnsupportedMediaType | Self::AmbiguousFraming => "invalid_request_error",
        }
    }

    /// The human-readable `error.message`: what is wrong and how to fix it.
    pub fn message(self) -> &'static str {
        match self {
            Self::AmbiguousFraming => {
                "the request's body framing is ambiguous: send either one Content-Length or \
                 Transfer-Encoding: chunked, not both"
            }
            Self::BrowserRequest => {
                "requests from web browsers are refused: this proxy serves only local \
                 command-line clients and SDKs, which send no Origin or Sec-Fetch-Site header"
            }
            Self::BadHost => {
                "the Host header must be 127.0.0.1:<port>, localhost:<port> or [::1]:<port> \
                 with the proxy's port; point the client at http://127.0.0.1:<port>/v1"
            }
            Self::UnsupportedMediaType => {
                "a request body must be sent with `Content-Type: application/json`"
            }
            Self::MissingToken => const_concat_missing(),
            Self::MalformedToken => const_concat_malformed(),
            Self::WrongToken => const_concat_wrong(),
            Self::NotAllowed => {
                "this proxy serves only `POST /v1/responses` without a query string; point the \
                 client's base URL at http://127.0.0.1:<port>/v1"
            }
        }
    }
}

// The three 401 messages each tell the caller where the token is, in their own words.
const fn const_concat_missing() -> &'static str {
    "missing proxy token: send the proxy token as `X-Proxy-Token: <token>` or \
     `Authorization: Bearer <token>` (with the OpenAI SDKs: api_key=<token>); the token is the \
     `auth_token` field of the proxy's --server-info file, or the line labelled `proxy token:` \
     on its stderr when it runs without --server-info"
}
const fn const_concat_malformed() -> &'static str {
    "malformed proxy token: use `Authorization: Bearer <token>` (not Basic, not empty, sent \
     once) or `X-Proxy-Token: <token>` (sent once); the token is the `auth_token` field of the \
     proxy's --server-info file, or the line labelled `proxy token:` on its stderr when it \
     runs without --server-info"
}
const fn const_concat_wrong() -> &'static str {
    "invalid proxy token: the token changes on every launch of the proxy; read the current \
     one from the `auth_token` field of its --server-info file, or the line labelled \
     `proxy token:` on its stderr when it runs without --server-info"
}

/// Decides one request head. Every step refuses before the next is looked at.
pub fn check(
    method: &Method,
    uri: &Uri,
    fields: &Fields,
    policy: &GatePolicy<'_>,
) -> Result<Route, Refusal> {
    check_head(method, uri, fields, false, policy)
}

/// [`check`], told whether the raw head had an ambiguous framing shape.
pub fn check_head(
    method: &Method,
    uri: &Uri,
    fields: &Fields,
    raw_ambiguous: bool,
    policy: &GatePolicy<'_>,
) -> Result<Route, Refusal> {
    // 0. Framing that two HTTP parsers could read differently is never passed on.
    if raw_ambiguous || !framing_is_unambiguous(fields) {
        return Err(Refusal::AmbiguousFraming);
    }
    // 1. Browsers: any Origin (any value, even "null"), or any Fetch Metadata.
    if fields.contains(Name::Origin) || fields.contains(Name::SecFetchSite) {
        return Err(Refusal::BrowserRequest);
    }
    // 2. Host: exactly one, naming loopback and our port (DNS rebinding defence).
    if !host_is_ours(fields, policy.port) {
        return Err(Refusal::BadHost);
    }
    // 3. A body must be declared JSON (browsers cannot send that cross-origin without a
    //    preflight, which step 1 and the absence of CORS headers make fail).
    if has_body(fields) && !is_json(fields) {
        return Err(Refusal::UnsupportedMediaType);
    }
    // 4. The token.
    check_token(fields, policy.token)?;
    // 5. Method and path.
    route(method, uri, fields, policy.http_shutdown).ok_or(Refusal::NotAllowed)
}

/// At most one `Content-Length`, or exactly `Transfer-Encoding: chunked` alone, or neither.
pub fn framing_is_unambiguous(fields: &Fields) -> bool {
    match (
        fields.occurs(Name::TransferEncoding),
        fields.occurs(Name::ContentLength),
    ) {
        (Occurs::Never, Occurs::Repeated) => false,
        (Occurs::Never, _) => true,
        (Occurs::Once(te), Occurs::Never) => te.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

fn host_is_ours(fields: &Fields, port: u16) -> bool {
    let Occurs::Once(host) = fields.occurs(Name::Host) else {
        return false;
    };
    let Some(colon) = host.iter().rposition(|&b| b == b':') else {
        return false;
    };
    let (name, host_port) = (&host[..colon], &host[colon + 1..]);
    // Plain digits without a leading zero (no sign, no padding), naming our port.
    let port_ok = !host_port.is_empty()
        && host_port[0] != b'0'
        && host_port.len() <= 5
        && host_port.iter().all(u8::is_ascii_digit)
        && host_port
            .iter()
            .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'))
            == u32::from(port);
    port_ok && (name == b"127.0.0.1" || name == b"[::1]" || name.eq_ignore_ascii_case(b"localhost"))
}

/// Whether the head announces a body: a `Transfer-Encoding`, or a `Content-Length` other
/// than a single `0`.
fn has_body(fields: &Fields) -> bool {
    if fields.contains(Name::TransferEncoding) {
        return true;
    }
    match fields.occurs(Name::ContentLength) {
        Occurs::Never => false,
        Occurs::Once(v) => v != b"0",
        Occurs::Repeated => true,
    }
}

/// Exactly one `Content-Type` whose media type is `application/json`, any case, with or
/// without parameters.
fn is_json(fields: &Fields) -> bool {
    let Occurs::Once(ct) = fields.occurs(Name::ContentType) else {
        return false;
    };
    // What nearly every client sends, decided without splitting or scanning.
    if ct.eq_ignore_ascii_case(b"application/json") {
        return true;
    }
    // The media type, then text only (no obs-text bytes anywhere, parameters included).
    let media_type = ct.split(|&b| b == b';').next().unwrap_or_default();
    media_type
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/json")
        && is_visible_ascii(ct)
}

fn check_token(fields: &Fields, token: &ProxyToken) -> Result<(), Refusal> {
    let presented = match fields.occurs(Name::ProxyToken) {
        Occurs::Once(v) => v,
        Occurs::Repeated => return Err(Refusal::MalformedToken),
        Occurs::Never => match fields.occurs(Name::Authorization) {
            Occurs::Never => return Err(Refusal::MissingToken),
            Occurs::Repeated => return Err(Refusal::MalformedToken),
            Occurs::Once(v) => bearer_credentials(v).ok_or(Refusal::MalformedToken)?,
        },
    };
    if presented.is_empty() {
        return Err(Refusal::MalformedToken);
    }
    if token.matches(presented) {
        Ok(())
    } else {
        Err(Refusal::WrongToken)
    }
}

/// The credentials of `Bearer <credentials>` (scheme case-insensitive, one or more spaces),
/// or `None` for any other scheme or an empty credential.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(&rest[start..])
}

fn route(method: &Method, uri: &Uri, fields: &Fields, http_shutdown: bool) -> Option<Route> {
    // Absolute-form targets (proxy requests), queries and upgrades are never served.
    if uri.scheme().is_some() || uri.authority().is_some() || uri.query().is_some() {
        return None;
    }
    if fields.contains(Name::Upgrade) {
        return None;
    }
    match (method, uri.path()) {
        (&Method::POST, RESPONSES_PATH) => Some(Route::Responses),
        (&Method::GET, SHUTDOWN_PATH) if http_shutdown => Some(Route::Shutdown),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderName, HeaderValue};

    const PORT: u16 = 4242;

    fn token() -> ProxyToken {
        ProxyToken::from_random(&[7u8; 32])
    }

    struct Case {
        method: &'static str,
        target: &'static str,
        headers: Vec<(&'static str, String)>,
        shutdown: bool,
        want: Result<Route, Refusal>,
    }

    fn ok_headers(tok: &str) -> Vec<(&'static str, String)> {
        vec![
            ("host", format!("127.0.0.1:{PORT}")),
            ("content-type", "application/json".into()),
            ("content-length", "2".into()),
            ("x-proxy-token", tok.to_string()),
        ]
    }

    fn with(
        mut h: Vec<(&'static str, String)>,
        name: &'static str,
        v: &str,
    ) -> Vec<(&'static str, String)> {
        h.push((name, v.to_string()));
        h
    }

    fn without(h: Vec<(&'static str, String)>, name: &str) -> Vec<(&'static str, String)> {
        h.into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case(name))
            .collect()
    }

    fn replace(
        h: Vec<(&'static str, String)>,
        name: &'static str,
        v: &str,
    ) -> Vec<(&'static str, String)> {
        with(without(h, name), name, v)
    }

    fn run(case: &Case, tok: &ProxyToken) -> Result<Route, Refusal> {
        let mut headers = HeaderMap::new();
        for (n, v) in &case.headers {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let policy = GatePolicy {
            port: PORT,
            token: tok,
            http_shutdown: case.shutdown,
        };
        check(
            &case.method.parse().expect("method"),
            &case.target.parse().expect("uri"),
            &Fields::from_header_map(&headers),
            &policy,
        )
    }

    #[test]
    fn gate_table() {
        use Refusal::*;
        let tok = token();
        let t = tok.as_str();
        let good = || ok_headers(t);
        let bearer = format!("Bearer {t}");
        let shutdown_headers = || {
            vec![
                ("host", format!("localhost:{PORT}")),
                ("x-proxy-token", t.to_string()),
            ]
        };
        let cases = vec![
            // Allowed.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: good(),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(without(good(), "x-proxy-token"), "authorization", &bearer),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(
                    without(good(), "x-proxy-token"),
                    "Authorization",
                    &format!("bEaReR   {t}"),
                ),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "authorization", "Bearer sk-dummy"),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "APPLICATION/Json"),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "Application/JSON; charset=utf-8"),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", &format!("LocalHost:{PORT}")),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", &format!("[::1]:{PORT}")),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: without(without(good(), "content-type"), "content-length"),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(without(good(), "content-type"), "content-length", "0"),
                shutdown: false,
                want: Ok(Route::Responses),
            },
            Case {
                method: "GET",
                target: "/shutdown",
                headers: shutdown_headers(),
                shutdown: true,
                want: Ok(Route::Shutdown),
            },
            // 0. Ambiguous framing, before anything else.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "transfer-encoding", "chunked"),
                shutdown: false,
                want: Err(AmbiguousFraming),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "content-length", "2"),
                shutdown: false,
                want: Err(AmbiguousFraming),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(
                    without(good(), "content-length"),
                    "transfer-encoding",
                    "gzip, chunked",
                ),
                shutdown: false,
                want: Err(AmbiguousFraming),
            },
            Case {
                method: "GET",
                target: "/x",
                headers: vec![
                    ("transfer-encoding", "chunked".into()),
                    ("content-length", "1".into()),
                    ("origin", "x".into()),
                ],
                shutdown: false,
                want: Err(AmbiguousFraming),
            },
            // 1. Browser requests, even with a valid token and everything else right.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "origin", "http://127.0.0.1:4242"),
                shutdown: false,
                want: Err(BrowserRequest),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "ORIGIN", "null"),
                shutdown: false,
                want: Err(BrowserRequest),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "Origin", "https://evil.example"),
                shutdown: false,
                want: Err(BrowserRequest),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "sec-fetch-site", "cross-site"),
                shutdown: false,
                want: Err(BrowserRequest),
            },
            Case {
                method: "GET",
                target: "/shutdown",
                headers: with(shutdown_headers(), "origin", "http://x"),
                shutdown: true,
                want: Err(BrowserRequest),
            },
            Case {
                method: "OPTIONS",
                target: "/v1/responses",
                headers: vec![("origin", "http://x".into()), ("host", "evil:1".into())],
                shutdown: false,
                want: Err(BrowserRequest),
            },
            // 2. Host, even with a valid token.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: without(good(), "host"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "evil.example:4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:4243"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:04242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:+4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:4242x"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:4242 "),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:42420"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:4294971538"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:69778"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", ":4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.1:4242:4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "127.0.0.2:4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "host", "localhost.:4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "host", "127.0.0.1:4242"),
                shutdown: false,
                want: Err(BadHost),
            },
            Case {
                method: "GET",
                target: "/anything",
                headers: vec![("host", "attacker.example:4242".into())],
                shutdown: false,
                want: Err(BadHost),
            },
            // 3. Media type, before the token is looked at.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "text/plain"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "application/x-www-form-urlencoded"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "multipart/form-data; boundary=x"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "content-type", "application/jsonp"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: without(good(), "content-type"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "content-type", "application/json"),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(
                    without(without(good(), "content-type"), "content-length"),
                    "transfer-encoding",
                    "chunked",
                ),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: without(
                    replace(good(), "content-type", "text/plain"),
                    "x-proxy-token",
                ),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            Case {
                method: "POST",
                target: "/nope",
                headers: without(
                    replace(good(), "content-type", "text/plain"),
                    "x-proxy-token",
                ),
                shutdown: false,
                want: Err(UnsupportedMediaType),
            },
            // 4. Token.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: without(good(), "x-proxy-token"),
                shutdown: false,
                want: Err(MissingToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "x-proxy-token", "wrong"),
                shutdown: false,
                want: Err(WrongToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(good(), "x-proxy-token", ""),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "x-proxy-token", t),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(
                    without(good(), "x-proxy-token"),
                    "authorization",
                    &format!("Basic {t}"),
                ),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(without(good(), "x-proxy-token"), "authorization", "Bearer "),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(without(good(), "x-proxy-token"), "authorization", "Bearer"),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(without(good(), "x-proxy-token"), "authorization", t),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(
                    without(good(), "x-proxy-token"),
                    "authorization",
                    &format!("Bearer{t}"),
                ),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(
                    with(without(good(), "x-proxy-token"), "authorization", &bearer),
                    "authorization",
                    &bearer,
                ),
                shutdown: false,
                want: Err(MalformedToken),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: replace(
                    without(good(), "x-proxy-token"),
                    "authorization",
                    &format!("Bearer {t}x"),
                ),
                shutdown: false,
                want: Err(WrongToken),
            },
            // X-Proxy-Token decides when both are present.
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(
                    replace(good(), "x-proxy-token", "wrong"),
                    "authorization",
                    &bearer,
                ),
                shutdown: false,
                want: Err(WrongToken),
            },
            Case {
                method: "GET",
                target: "/shutdown",
                headers: without(shutdown_headers(), "x-proxy-token"),
                shutdown: true,
                want: Err(MissingToken),
            },
            Case {
                method: "GET",
                target: "/secret-path",
                headers: vec![("host", format!("127.0.0.1:{PORT}"))],
                shutdown: false,
                want: Err(MissingToken),
            },
            Case {
                method: "OPTIONS",
                target: "/v1/responses",
                headers: vec![("host", format!("127.0.0.1:{PORT}"))],
                shutdown: false,
                want: Err(MissingToken),
            },
            // 5. Method and path, only after the token.
            Case {
                method: "GET",
                target: "/v1/responses",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "OPTIONS",
                target: "/v1/responses",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/v1/responses?x=1",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/v1/responses?",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/v1/responses/",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/v1/chat/completions",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/V1/RESPONSES",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "http://127.0.0.1:4242/v1/responses",
                headers: good(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/v1/responses",
                headers: with(good(), "upgrade", "websocket"),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "GET",
                target: "/shutdown",
                headers: shutdown_headers(),
                shutdown: false,
                want: Err(NotAllowed),
            },
            Case {
                method: "POST",
                target: "/shutdown",
                headers: good(),
                shutdown: true,
                want: Err(NotAllowed),
            },
            Case {
                method: "GET",
                target: "/shutdown?now",
                headers: shutdown_headers(),
                shutdown: true,
                want: Err(NotAllowed),
            },
        ];
        for (i, case) in cases.iter().enumerate() {
            assert_eq!(
                run(case, &tok),
                case.want,
                "case {i}: {} {} {:?}",
                case.method,
                case.target,
                case.headers
            );
        }
    }

    #[test]
    fn refusals_answer_as_the_readme_table_says() {
        use Refusal::*;
        // (refusal, status, error.code, error.type, words the message must contain: what
        // to do about it). The codes and statuses are the README's gate table.
        let table: [(Refusal, u16, &str, &str, &[&str]); 8] = [
            (
                AmbiguousFraming,
                400,
                "ambiguous_request_framing",
                "invalid_request_error",
                &["Content-Length", "Transfer-Encoding: chunked"],
            ),
            (
                BrowserRequest,
                403,
                "browser_request_refused",
                "permission_error",
                &["Origin", "Sec-Fetch-Site"],
            ),
            (
                BadHost,
                403,
                "invalid_host",
                "permission_error",
                &["127.0.0.1:<port>", "http://127.0.0.1:<port>/v1"],
            ),
            (
                UnsupportedMediaType,
                415,
                "unsupported_media_type",
                "invalid_request_error",
                &["Content-Type: application/json"],
            ),
            (
                MissingToken,
                401,
                "missing_proxy_token",
                "authentication_error",
                &[
                    "X-Proxy-Token: <token>",
                    "Authorization: Bearer <token>",
                    "--server-info",
                    "proxy token:",
                ],
            ),
            (
                MalformedToken,
                401,
                "malformed_proxy_token",
                "authentication_error",
                &[
                    "X-Proxy-Token: <token>",
                    "Authorization: Bearer <token>",
                    "--server-info",
                    "proxy token:",
                ],
            ),
            (
                WrongToken,
                401,
                "invalid_proxy_token",
                "authentication_error",
                &[
                    "every launch",
                    "auth_token",
                    "--server-info",
                    "proxy token:",
                ],
            ),
            (
                NotAllowed,
                403,
                "route_not_allowed",
                "permission_error",
                &["POST /v1/responses", "http://127.0.0.1:<port>/v1"],
            ),
        ];
        let mut codes = std::collections::HashSet::new();
        let mut messages = std::collections::HashSet::new();
        for (r, status, code, error_type, words) in table {
            assert_eq!(r.status().as_u16(), status, "{r:?}");
            assert_eq!(r.code(), code, "{r:?}");
            assert_eq!(r.error_type(), error_type, "{r:?}");
            for w in words {
                assert!(
                    r.message().contains(w),
                    "{r:?}: {w:?} not in {:?}",
                    r.message()
                );
            }
            assert!(
                codes.insert(code) && messages.insert(r.message()),
                "{r:?} repeats another"
            );
        }
    }
}
