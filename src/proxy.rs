//! One request: gate → forward → stream back. Refusals and upstream failures become small
//! OpenAI-shaped JSON errors that echo nothing the caller sent.
//!
//! Knows nothing about sockets or connections: `server.rs` hands it a request and sends
//! back whatever it returns.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::sync::watch;

use crate::body::{BodyFault, ExchangeState, ProxyBody, ResponseStream, UpstreamRequestBody};
use crate::config::{Config, LogLevel};
use crate::conn::{ClientBody, WaitTimer};
use crate::dump::{Dumper, ResponseSlot};
use crate::fields::Fields;
use crate::gate::{self, GatePolicy, Route};
use crate::h1::RequestHead;
use crate::headers;
use crate::log::{AccessRecord, Logger, sanitize_request_id};
use crate::mask::{self, StreamMask};
use crate::secret::ApiKey;
use crate::token::ProxyToken;
use crate::upstream::{self, Upstream, UpstreamFailure, UpstreamResponse};

/// Why the proxy is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An authorised `GET /shutdown`.
    HttpShutdown,
}

/// Everything one request needs, shared by all connections.
pub struct Proxy {
    port: u16,
    token: ProxyToken,
    http_shutdown: bool,
    key: ApiKey,
    /// The key as the reflected-key scan looks for it.
    needle: mask::Needle,
    max_request_body: u64,
    body_read_timeout: Duration,
    upstream_idle_timeout: Duration,
    dumper: Option<Arc<Dumper>>,
    logger: Logger,
    stop: watch::Sender<Option<StopReason>>,
}

/// A small error body the proxy makes itself.
pub fn error_body(message: &str, error_type: &str, code: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": error_type, "code": code, "param": null }
    });
    Bytes::from(v.to_string())
}

/// What the proxy answers a request with: status, header fields (framing is the
/// connection's business), body, and whether the connection must end after it.
pub struct Reply {
    /// The status.
    pub status: StatusCode,
    /// The header fields, as they go to the client.
    pub fields: Fields,
    /// The body.
    pub body: ProxyBody,
    /// Close the connection after this answer (the rest of its bytes cannot be trusted).
    pub close: bool,
}

/// A response the proxy makes itself: a small JSON body, not to be cached, dated.
pub fn json_response(status: StatusCode, body: Bytes) -> Reply {
    let date = crate::log::http_date_now();
    let fields = Fields::from_pairs(
        [
            (&b"content-type"[..], &b"application/json"[..]),
            (b"cache-control", b"no-store"),
            (b"date", date.as_bytes()),
        ]
        .into_iter(),
    );
    Reply {
        status,
        fields,
        body: ProxyBody::Fixed(Some(body)),
        close: false,
    }
}

/// The access-log label for a path: only routes the proxy serves are named.
fn path_label(path: &str) -> &'static str {
    match path {
        gate::RESPONSES_PATH => gate::RESPONSES_PATH,
        gate::SHUTDOWN_PATH => gate::SHUTDOWN_PATH,
        _ => "<other>",
    }
}

impl Proxy {
    /// Assembles the proxy for a listener bound to `port`.
    pub fn new(
        config: &Config,
        port: u16,
        token: ProxyToken,
        key: ApiKey,
        dumper: Option<Arc<Dumper>>,
        stop: watch::Sender<Option<StopReason>>,
    ) -> Self {
        Self {
            port,
            token,
            http_shutdown: config.http_shutdown,
            needle: mask::Needle::new(key.expose_bytes()),
            key,
            max_request_body: config.max_request_body,
            body_read_timeout: config.body_read_timeout,
            upstream_idle_timeout: config.upstream_idle_timeout,
            dumper,
            logger: Logger::new(config.log_format, config.log_level),
            stop,
        }
    }

    /// The per-launch client token.
    pub fn token(&self) -> &ProxyToken {
        &self.token
    }

    /// The logger.
    pub fn logger(&self) -> Logger {
        self.logger
    }

    /// Handles one request, forwarding through `upstream` (the calling worker's pool).
    /// Never fails: every problem is a response.
    /// `ambiguous` says the head's raw bytes had a framing shape two parsers could read
    /// differently.
    pub async fn handle(
        &self,
        upstream: &Upstream,
        head: RequestHead,
        body: ClientBody,
        ambiguous: bool,
        timer: &mut WaitTimer,
    ) -> Reply {
        let start = Instant::now();
        let mut record = AccessRecord {
            method: head.method.clone(),
            path: path_label(head.uri().path()),
            ..AccessRecord::default()
        };
        let policy = GatePolicy {
            port: self.port,
            token: &self.token,
            http_shutdown: self.http_shutdown,
        };
        match gate::check_head(&head.method, head.uri(), &head.fields, ambiguous, &policy) {
            Err(refusal) => {
                let body = error_body(refusal.message(), refusal.error_type(), refusal.code());
                let mut reply =
                    self.finish_fixed(&mut record, start, refusal.status(), refusal.code(), body);
                // The rest of the byte stream cannot be trusted: close after answering.
                reply.close = refusal == gate::Refusal::AmbiguousFraming;
                reply
            }
            Ok(Route::Shutdown) => {
                let _ = self.stop.send(Some(StopReason::HttpShutdown));
                let body = Bytes::from_static(b"{\"status\":\"shutting down\"}");
                self.finish_fixed(&mut record, start, StatusCode::OK, "shutdown", body)
            }
            Ok(Route::Responses) => {
                // Logs the exchange if the client goes away (this future is dropped) before
                // there is a response to log it with (when access lines are written).
                let mut pending = PendingRecord {
                    record: self.logger.writes_access().then(|| record.clone()),
                    start,
                    logger: self.logger,
                };
                // Pinned where it is made (awaited by value, it is copied once more).
                let reply =
                    std::pin::pin!(self.forward(upstream, head, body, start, record, timer)).await;
                pending.record = None;
                reply
            }
        }
    }

    /// Logs a request the connection refused before it had a head to hand over (malformed,
    /// too large, too slow): no method or path is known.
    pub fn log_refused_head(&self, status: StatusCode, outcome: &'static str) {
        let record = AccessRecord {
            method: Method::from_bytes(b"-").unwrap_or_default(),
            path: "-",
            status: status.as_u16(),
            outcome,
            ..AccessRecord::default()
        };
        self.logger.access(&record);
    }

    fn finish_fixed(
        &self,
        record: &mut AccessRecord,
        start: Instant,
        status: StatusCode,
        outcome: &'static str,
        body: Bytes,
    ) -> Reply {
        record.status = status.as_u16();
        record.bytes_out = body.len() as u64;
        record.outcome = outcome;
        if self.logger.writes_access() {
            record.duration = start.elapsed();
            self.logger.access(record);
        }
        json_response(status, body)
    }

    async fn forward(
        &self,
        upstream: &Upstream,
        head: RequestHead,
        body: ClientBody,
        start: Instant,
        mut record: AccessRecord,
        timer: &mut WaitTimer,
    ) -> Reply {
        // The declared length, as the connection framed the body (already parsed once).
        if http_body::Body::size_hint(&body)
            .exact()
            .is_some_and(|n| n > self.max_request_body)
        {
            return self.finish_error(&mut record, start, None, ProxyError::TooLarge);
        }
        let state = Arc::new(ExchangeState::new(start));
        let (request_dump, slot) = self
            .dumper
            .as_ref()
            .and_then(|d| {
                let headers = head.fields.to_header_map();
                d.begin(&head.method, &head.uri().to_string(), &headers)
            })
            .unzip();
        let body = UpstreamRequestBody::new(
            body,
            self.max_request_body,
            self.body_read_timeout,
            Arc::clone(&state),
            request_dump,
        );
        // Pinned here and lent to `await_head`: moving the request's (large) future into
        // it would store the future twice and copy it for every request. Dropped at the end
        // of the block, as soon as the wait ends (an unfinished upstream request is
        // cancelled before the error is answered).
        let result = {
            let up = std::pin::pin!(upstream.request(head.fields, self.key.header_value(), body));
            self.await_head(up, &state, timer).await
        };
        record.bytes_in = state.bytes_in();
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => return self.finish_error(&mut record, start, slot, e),
        };
        let UpstreamResponse {
            status,
            fields,
            body: rbody,
        } = resp;
        // Clock reads only for a line that is written.
        record.ttfb = self.logger.writes_access().then(|| start.elapsed());
        record.status = status.as_u16();
        let fields = mask::mask_fields(headers::to_client(fields), self.needle);
        // Read after masking, so a reflected key can never reach the log through it.
        record.upstream_request_id = fields.get(b"x-request-id").and_then(sanitize_request_id);
        let dump = slot.and_then(|s| s.open(status, &fields.to_header_map()));
        let stream = ResponseStream::new(
            rbody,
            StreamMask::of(self.needle),
            self.upstream_idle_timeout,
            start,
            record,
            self.logger,
            dump,
        );
        Reply {
            status,
            fields,
            body: ProxyBody::Stream(Box::new(stream)),
            close: false,
        }
    }

    /// Sends `up` and waits for the response head. The idle clock restarts whenever the
    /// client's request body makes progress, so a slow large upload is not cut. (The wait
    /// uses the connection's timer.)
    async fn await_head(
        &self,
        mut fut: Pin<&mut impl Future<Output = Result<UpstreamResponse, upstream::UpstreamError>>>,
        state: &ExchangeState,
        timer: &mut WaitTimer,
    ) -> Result<UpstreamResponse, ProxyError> {
        loop {
            let deadline = state.last_activity() + self.upstream_idle_timeout;
            tokio::select! {
                biased;
                result = fut.as_mut() => {
                    return result.map_err(|e| {
                        // A failing request body is the client's doing, not the upstream's.
                        match state.fault() {
                            BodyFault::TooLarge => ProxyError::TooLarge,
                            BodyFault::Stalled => ProxyError::ClientStalled,
                            BodyFault::ClientError => ProxyError::ClientBody,
                            BodyFault::None => {
                                let reason = upstream::describe(&e);
                                self.logger.event(LogLevel::Warn, "upstream request failed", &[("reason", &reason)]);
                                match upstream::classify(&e) {
                                    UpstreamFailure::ConnectTimeout => ProxyError::ConnectTimeout,
                                    UpstreamFailure::Unavailable => ProxyError::BadGateway,
                                }
                            }
                        }
                    });
                }
                () = timer.until(deadline.into()) => {
                    if state.last_activity() + self.upstream_idle_timeout <= Instant::now() {
                        self.logger.event(LogLevel::Warn, "upstream sent no response within --upstream-idle-timeout", &[]);
                        return Err(ProxyError::IdleTimeout);
                    }
                }
            }
        }
    }

    fn finish_error(
        &self,
        record: &mut AccessRecord,
        start: Instant,
        slot: Option<ResponseSlot>,
        e: ProxyError,
    ) -> Reply {
        let (status, error_type, code, message) = e.parts();
        let body = error_body(message, error_type, code);
        if let Some(dump) = slot.and_then(|s| s.open(status, &http::HeaderMap::new())) {
            dump.finish_with(&body);
        }
        self.finish_fixed(record, start, status, code, body)
    }
}

/// Logs the access line of an exchange whose handler was dropped before it produced a
/// response (the client went away while the upstream was still thinking).
struct PendingRecord {
    record: Option<AccessRecord>,
    start: Instant,
    logger: Logger,
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take()
            && self.logger.writes_access()
        {
            r.duration = self.start.elapsed();
            r.outcome = "client_closed";
            self.logger.access(&r);
        }
    }
}

/// A failure of a forwarded request that the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// The request body is over the limit.
    TooLarge,
    /// The client stopped sending its body.
    ClientStalled,
    /// The client's body was malformed or cut.
    ClientBody,
    /// The upstream could not be reached in time.
    ConnectTimeout,
    /// The upstream sent nothing in time.
    IdleTimeout,
    /// The upstream refused, failed TLS, or answered malformed HTTP.
    BadGateway,
}

impl ProxyError {
    /// Status, `error.type`, `error.code`, `error.message`.
    pub fn parts(self) -> (StatusCode, &'static str, &'static str, &'static str) {
        match self {
            Self::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                "the request body is larger than the proxy's --max-request-body limit",
            ),
            Self::ClientStalled => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_body_timeout",
                "the client stopped sending the request body for longer than --body-read-timeout",
            ),
            Self::ClientBody => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request_body_error",
                "the request body was malformed or cut off",
            ),
            Self::ConnectTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_connect_timeout",
                "the proxy could not connect to the upstream within --upstream-connect-timeout",
            ),
            Self::IdleTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
                "the upstream sent no response within --upstream-idle-timeout",
            ),
            Self::BadGateway => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream_unavailable",
                "the proxy could not reach the upstream or got an invalid answer from it; the \
                 proxy's log says why",
            ),
        }
    }
}
