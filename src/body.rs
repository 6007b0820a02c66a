//! The two streaming bodies of an exchange.
//!
//! [`UpstreamRequestBody`] carries the client's request body upstream chunk by chunk (the
//! upstream client pulls it, so backpressure is end to end), enforcing the size limit and the client's idle
//! limit, and noting activity so the upstream idle clock does not run while a large body is
//! still being sent. [`ResponseStream`] carries the upstream's response to the client frame
//! by frame (nothing is batched), enforces the upstream idle limit, and writes the access
//! line and the response dump once, when the stream ends, breaks or the client goes away.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::conn::ClientBody;
use crate::dump::{RequestDump, ResponseDump};
use crate::log::{AccessRecord, Logger};
use crate::mask::StreamMask;
use crate::upstream::UpstreamBody;

/// Errors a body ends with (the connection or the upstream client then aborts the
/// affected request).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why the request body stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BodyFault {
    /// Nothing went wrong.
    None = 0,
    /// More bytes than `--max-request-body`.
    TooLarge = 1,
    /// The client stopped sending for longer than `--body-read-timeout`.
    Stalled = 2,
    /// The client's body was malformed or the client went away.
    ClientError = 3,
}

/// State shared by the two bodies and the handler of one exchange.
#[derive(Debug)]
pub struct ExchangeState {
    start: Instant,
    /// Request body bytes received.
    bytes_in: AtomicU64,
    /// Nanoseconds after `start` of the last request-body progress.
    last_activity: AtomicU64,
    fault: AtomicU8,
}

impl ExchangeState {
    /// State for an exchange that started at `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            bytes_in: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            fault: AtomicU8::new(BodyFault::None as u8),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_activity.store(nanos, Ordering::Relaxed);
    }

    /// When the request last made progress.
    pub fn last_activity(&self) -> Instant {
        self.start + Duration::from_nanos(self.last_activity.load(Ordering::Relaxed))
    }

    /// Request body bytes received so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    /// Why the request body stopped early, if it did.
    pub fn fault(&self) -> BodyFault {
        match self.fault.load(Ordering::Relaxed) {
            1 => BodyFault::TooLarge,
            2 => BodyFault::Stalled,
            3 => BodyFault::ClientError,
            _ => BodyFault::None,
        }
    }

    fn set_fault(&self, f: BodyFault) {
        self.fault.store(f as u8, Ordering::Relaxed);
    }
}

/// A fixed error, as a body error.
#[derive(Debug)]
struct Fault(&'static str);

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl StdError for Fault {}

/// The idle timer, started from now if it is not running from the last progress already
/// (created the first time it is needed).
fn arm<'a>(
    sleep: &'a mut Option<Pin<Box<Sleep>>>,
    armed: &mut bool,
    idle: Duration,
) -> Pin<&'a mut Sleep> {
    if !*armed {
        *armed = true;
        let deadline = tokio::time::Instant::now() + idle;
        match sleep.as_mut() {
            Some(s) => s.as_mut().reset(deadline),
            None => *sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
    // Set just above whenever it was not already.
    sleep
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)))
        .as_mut()
}

/// The client's request body on its way upstream.
pub struct UpstreamRequestBody {
    inner: ClientBody,
    limit: u64,
    idle: Duration,
    /// Created on the first `Pending` (most small bodies never need it).
    sleep: Option<Pin<Box<Sleep>>>,
    state: Arc<ExchangeState>,
    dump: Option<RequestDump>,
    done: bool,
    /// Whether `sleep` runs from the last progress (armed lazily on the first `Pending`).
    armed: bool,
    /// The client has been waited for since the last progress was noted.
    waited: bool,
}

impl UpstreamRequestBody {
    /// Wraps `inner` with a size limit and a client idle limit.
    pub fn new(
        inner: ClientBody,
        limit: u64,
        idle: Duration,
        state: Arc<ExchangeState>,
        dump: Option<RequestDump>,
    ) -> Self {
        Self {
            inner,
            limit,
            idle,
            sleep: None,
            state,
            dump,
            done: false,
            armed: false,
            waited: false,
        }
    }

    fn fail(
        &mut self,
        fault: BodyFault,
        why: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state.set_fault(fault);
        self.done = true;
        Poll::Ready(Some(Err(Box::new(Fault(why)))))
    }
}

/// A body frame smaller than this is sent together with the frames already waiting after
/// it, up to about `GATHER_UP_TO` bytes; larger ones go out as they are (no copy).
const GATHER_BELOW: usize = 16 << 10;

/// Where gathering stops (it may pass this by one frame, at most a read of 64 KiB).
const GATHER_UP_TO: usize = 64 << 10;

impl UpstreamRequestBody {
    /// `first` and, when it is small, the data frames that are ready now after it, as one
    /// piece; and whether the body ended among them (then it must not be polled again). A
    /// client that sends its body in tiny chunks (each one decoded as a frame) would
    /// otherwise cost a write per chunk (a system call, and a chunk for an HTTP/1.1
    /// upstream to parse: 4.6 s of the proxy's time for 6 MB sent as a million one-byte
    /// chunks) or, over HTTP/2, a DATA frame per chunk, which upstreams take for a flood
    /// and answer by closing the connection, every other request on it included. Only
    /// frames already there are taken: nothing waits for more.
    pub fn gather_ready(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        first: Bytes,
    ) -> Result<(Bytes, bool), BoxError> {
        if first.len() >= GATHER_BELOW {
            return Ok((first, false));
        }
        let mut joined: Option<bytes::BytesMut> = None;
        let len = |j: &Option<bytes::BytesMut>| j.as_ref().map_or(first.len(), |j| j.len());
        while len(&joined) < GATHER_UP_TO {
            match self.as_mut().poll_frame(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => return Ok((joined.map_or(first, |j| j.freeze()), true)),
                Poll::Ready(Some(Err(e))) => return Err(e),
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // request trailers are not forwarded
                    };
                    joined
                        .get_or_insert_with(|| {
                            // Room for what is in hand, not the whole 64 KiB: a body in
                            // two small chunks must not cost (and, freed, wipe) 64 KiB.
                            let room = (first.len() + data.len()).clamp(4 << 10, GATHER_UP_TO);
                            let mut j = bytes::BytesMut::with_capacity(room);
                            j.extend_from_slice(&first);
                            j
                        })
                        .extend_from_slice(&data);
                }
            }
        }
        Ok((joined.map_or(first, |j| j.freeze()), false))
    }
}

/// The request body for the general (HTTP/2) client: small frames gathered with those ready
/// after them ([`UpstreamRequestBody::gather_ready`]), so a body sent in tiny chunks goes
/// upstream in few DATA frames.
pub struct GatheredBody {
    inner: UpstreamRequestBody,
    /// The inner body ended while gathering (it must not be polled again).
    ended: bool,
}

impl GatheredBody {
    /// Wraps `inner`.
    pub fn new(inner: UpstreamRequestBody) -> Self {
        Self {
            inner,
            ended: false,
        }
    }
}

impl Body for GatheredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => {
                    match Pin::new(&mut this.inner).gather_ready(cx, data) {
                        Ok((data, ended)) => {
                            this.ended = ended;
                            Poll::Ready(Some(Ok(Frame::data(data))))
                        }
                        Err(e) => Poll::Ready(Some(Err(e))),
                    }
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => {
                this.ended = other.is_none();
                Poll::Ready(other)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for UpstreamRequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = this
                        .state
                        .bytes_in
                        .fetch_add(data.len() as u64, Ordering::Relaxed)
                        + data.len() as u64;
                    if total > this.limit {
                        return this
                            .fail(BodyFault::TooLarge, "request body over --max-request-body");
                    }
                    if let Some(d) = &mut this.dump {
                        d.push(data);
                    }
                }
                this.state.touch();
                this.armed = false;
                this.waited = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                this.fail(BodyFault::ClientError, "the client's request body failed")
            }
            Poll::Ready(None) => {
                this.done = true;
                // The end, read in the same go as the last frame (the usual case, and
                // always for a body of known length), is no later progress than that
                // frame's, whose time is noted already.
                if this.waited {
                    this.state.touch();
                }
                if let Some(mut d) = this.dump.take() {
                    d.finish();
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.waited = true;
                let sleep = arm(&mut this.sleep, &mut this.armed, this.idle);
                ready!(sleep.poll(cx));
                this.fail(
                    BodyFault::Stalled,
                    "the client stopped sending its request body",
                )
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How a streamed response ended, for the access line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    Open,
    Complete,
    UpstreamBroke,
    UpstreamIdle,
}

/// The upstream's response body on its way to the client.
pub struct ResponseStream {
    /// The upstream body (taken on drop to drain a finished h2 stream).
    inner: Option<UpstreamBody>,
    idle: Duration,
    /// Created on the first `Pending`.
    sleep: Option<Pin<Box<Sleep>>>,
    end: StreamEnd,
    start: Instant,
    record: AccessRecord,
    logger: Logger,
    dump: Option<ResponseDump>,
    /// Whether `sleep` runs from the last frame (armed lazily on the first `Pending`).
    armed: bool,
    /// Overwrites a reflected key.
    mask: StreamMask,
}

impl ResponseStream {
    /// Wraps `inner`; `record` is completed and logged when the stream is dropped.
    pub fn new(
        inner: UpstreamBody,
        mask: StreamMask,
        idle: Duration,
        start: Instant,
        record: AccessRecord,
        logger: Logger,
        dump: Option<ResponseDump>,
    ) -> Self {
        Self {
            inner: Some(inner),
            idle,
            sleep: None,
            end: StreamEnd::Open,
            start,
            record,
            logger,
            dump,
            armed: false,
            mask,
        }
    }

    fn emit(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.record.bytes_out += data.len() as u64;
        if let Some(d) = &mut self.dump {
            d.push(&data);
        }
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        let (outcome, broken) = match self.end {
            StreamEnd::Complete => ("ok", None),
            // The connection stops reading once it has sent the declared length.
            StreamEnd::Open if self.inner.as_ref().is_none_or(delivered) => ("ok", None),
            StreamEnd::Open => ("client_closed", Some("the client went away before the end")),
            StreamEnd::UpstreamBroke => {
                ("upstream_broke", Some("the upstream broke off the stream"))
            }
            StreamEnd::UpstreamIdle => (
                "upstream_idle_timeout",
                Some("the upstream sent nothing for --upstream-idle-timeout"),
            ),
        };
        if let Some(mut d) = self.dump.take() {
            d.finish(broken);
        }
        // Every byte the upstream declared has been sent, but the connection stopped
        // reading before the upstream's end of stream arrived. Read that end in the
        // background instead of dropping the body: on HTTP/2 a drop cancels the stream
        // (RST_STREAM), and h2 closes a connection that has cancelled too many; on HTTP/1
        // the connection returns to the pool. A body that still has bytes to come (client
        // gone) is dropped, which cancels the upstream request at once.
        if let Some(UpstreamBody::Pooled(inner)) = self.inner.take()
            && self.end == StreamEnd::Open
            && !inner.is_end_stream()
            && inner.size_hint().exact() == Some(0)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(drain(inner));
        }
        if self.logger.writes_access() {
            self.record.outcome = outcome;
            self.record.duration = self.start.elapsed();
            self.logger.access(&self.record);
        }
    }
}

/// Whether every byte of `body` has been read: it is at its end, or (an HTTP/2 stream whose
/// end comes after its last bytes) all the bytes its length declared have come.
fn delivered(body: &UpstreamBody) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}

impl Body for ResponseStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.end != StreamEnd::Open {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.armed = false;
                    // Trailers (HTTP/2's; the HTTP/1.1 client drops them) go no further:
                    // the Responses API sends none, and a client could not be sent them.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let data = this.mask.push(data);
                    if data.is_empty() {
                        // Everything was held back as a possible key prefix.
                        continue;
                    }
                    return this.emit(data);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end = StreamEnd::UpstreamBroke;
                    // Why, for the operator (the access line only says that it broke): our
                    // parser's fixed texts, TLS and system error texts, never upstream bytes.
                    let reason = crate::upstream::describe(&*e);
                    this.logger.event(
                        crate::config::LogLevel::Warn,
                        "the upstream broke off a response stream",
                        &[("reason", &reason)],
                    );
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    if let Some(rest) = this.mask.finish() {
                        // Released now; the next poll sees the end again.
                        return this.emit(rest);
                    }
                    this.end = StreamEnd::Complete;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let sleep = arm(&mut this.sleep, &mut this.armed, this.idle);
                    ready!(sleep.poll(cx));
                    this.end = StreamEnd::UpstreamIdle;
                    return Poll::Ready(Some(Err(Box::new(Fault(
                        "the upstream sent nothing for too long",
                    )))));
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// Reads a body whose data is all delivered until its end arrives (bounded by one second
/// and a handful of frames), so the upstream stream ends cleanly.
async fn drain(mut body: Incoming) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        for _ in 0..8 {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(_)) => {}
                _ => return,
            }
        }
    })
    .await;
}

/// The body of every response the proxy sends to a client.
pub enum ProxyBody {
    /// A small body the proxy made itself (an error, the shutdown answer).
    Fixed(Option<Bytes>),
    /// The upstream's response, streamed.
    Stream(Box<ResponseStream>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) => s.size_hint(),
        }
    }
}
