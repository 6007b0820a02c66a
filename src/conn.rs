//! One client connection, HTTP/1.1 from the bytes up: read a request head, hand the request
//! to [`Proxy::handle`], write its response, and go on while the connection may be kept
//! alive. What the bytes mean (head parsing, body framing, the response head) is decided in
//! `h1.rs`, which is pure; this module reads, writes and keeps time.
//!
//! Requests on a connection are served one after another; bytes pipelined behind a request
//! wait in the read buffer (bounded). A request whose body was not read to its end (a
//! refusal, an early upstream answer) ends the connection after its response. A head that
//! cannot be served gets a fixed JSON error (400, 408, 431) and the connection closes.

use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::body::{BoxError, ProxyBody};
use crate::h1::{self, Chunked, RequestFraming, RequestHead, RequestHeadError, ResponseFraming};
use crate::proxy::{Proxy, Reply, error_body, json_response};
use crate::server::ServerLimits;
use crate::sys;
use crate::upstream::Upstream;
use crate::upstream_h1::ReadSize;

/// What every connection a worker serves shares.
pub struct ConnContext {
    /// The request handler.
    pub proxy: Arc<Proxy>,
    /// The worker's upstream client.
    pub upstream: Upstream,
    /// Head size and timing limits.
    pub limits: ServerLimits,
}

/// Bytes read ahead of the request being served (pipelined requests) beyond the head limit.
const READ_AHEAD: usize = 64 << 10;
/// After the proxy has said its last word on a connection: how long, and how many bytes,
/// it keeps reading (and discarding) what the client still sends, so that closing does not
/// reset the connection before the client has read the answer.
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;
/// Response body chunks up to this size are copied next to the head or the chunk framing
/// and go out in one write; larger ones are written from where they are.
const COPY_LIMIT: usize = 16 << 10;
/// The response writer's buffer (head, chunk framing, small body chunks): its first size,
/// and the most it keeps between responses (one grown past it, for a stream or a large
/// head, is freed, so an idle kept-alive connection holds at most this much more).
const OUT_SIZE: usize = 2 << 10;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The one timer of a connection, reused by each wait that needs one in turn (the next
/// request head, then the upstream's answer), so no wait creates, registers and removes a
/// timer of its own. A wait gives its deadline; the timer is moved only when it would fire
/// after it. It may therefore fire early (deadlines vary from one wait to the next), and
/// [`WaitTimer::poll_until`] then checks the clock and moves it on: it is ready only once
/// the deadline has passed.
#[derive(Default)]
pub struct WaitTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the timer holds, when it is known to hold one: it was polled with it and
    /// has since neither fired nor been moved. Polling it again with the same waker would
    /// only register that waker again, so it is not polled until it fires.
    holds: Option<Waker>,
}

impl WaitTimer {
    /// `Ready` once `at` has passed; otherwise the task is woken at `at` or before.
    pub fn poll_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let sleep = match &mut self.sleep {
            Some(s) => {
                if s.deadline() > at {
                    s.as_mut().reset(at);
                    self.holds = None;
                }
                s
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        // (A timer that has fired is no longer registered, so it is polled below.)
        if let Some(w) = &self.holds
            && w.will_wake(cx.waker())
            && !sleep.is_elapsed()
        {
            return Poll::Pending;
        }
        self.holds = None;
        if poll_registering(sleep.as_mut(), cx, &mut self.holds).is_pending() {
            return Poll::Pending;
        }
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        // Fired for an earlier deadline: moved to this one, which is still ahead, so the
        // poll below registers the task and waits.
        sleep.as_mut().reset(at);
        poll_registering(sleep.as_mut(), cx, &mut self.holds)
    }

    /// Waits until `at` has passed.
    pub async fn until(&mut self, at: Instant) {
        std::future::poll_fn(|cx| self.poll_until(at, cx)).await;
    }
}

/// Polls `wait` (a timer or a watch); when it is pending, notes in `holds` the waker it now
/// holds. Only when the task had budget left: a poll refused for want of budget (tokio's
/// cooperative scheduling) registers nothing, and the wait must then be polled again.
fn poll_registering<F: Future>(
    wait: Pin<&mut F>,
    cx: &mut Context<'_>,
    holds: &mut Option<Waker>,
) -> Poll<F::Output> {
    let budget = tokio::task::coop::has_budget_remaining();
    let polled = wait.poll(cx);
    if polled.is_pending() && budget {
        *holds = Some(cx.waker().clone());
    }
    polled
}

/// A connection's wait for the start of draining, made once and polled by each head wait.
/// Like [`WaitTimer`], it is not polled again while it holds the task's waker: only once
/// the watch has changed (or from another task).
struct DrainWait<'a, F> {
    wait: Pin<&'a mut F>,
    holds: Option<Waker>,
}

impl<F: Future<Output = ()>> DrainWait<'_, F> {
    /// `Ready` once draining has started; `drain` is the watch `wait` waits on.
    fn poll_wait(&mut self, drain: &watch::Receiver<bool>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(w) = &self.holds
            && w.will_wake(cx.waker())
            && matches!(drain.has_changed(), Ok(false))
        {
            return Poll::Pending;
        }
        self.holds = None;
        poll_registering(self.wait.as_mut(), cx, &mut self.holds)
    }
}

/// Where the connection is in the current request's body.
#[derive(Debug, PartialEq, Eq)]
enum BodyRead {
    /// Read to its end, or there was none: the next bytes are the next request head.
    Done,
    /// This many bytes left.
    Length(u64),
    /// A chunked body, part read.
    Chunked(Chunked),
    /// Malformed, cut off, or abandoned part-way: where the next head starts is unknown, so
    /// the connection ends after the current response.
    Failed,
}

/// The read side, shared by the connection and the request body it hands out.
struct ReadState {
    read: OwnedReadHalf,
    buf: BytesMut,
    size: ReadSize,
    body: BodyRead,
    /// `100 Continue` is owed before the first read for the body.
    send_continue: bool,
    /// Counts requests on the connection; a body belongs to one of them.
    generation: u64,
    /// The current request's body object still exists (someone may still read it).
    body_alive: bool,
    /// The connection's watch for the client going away, parked while a body is being read.
    watcher: Option<Waker>,
}

impl ReadState {
    /// The next request's body is `body`: returns the generation its body object belongs to.
    /// A body object of an earlier request (an HTTP/2 client may keep one after the answer)
    /// then neither reads this one's bytes nor speaks for it when dropped.
    fn begin(&mut self, body: BodyRead) -> u64 {
        self.body = body;
        self.generation += 1;
        self.body_alive = true;
        self.generation
    }
}

struct Shared {
    write: OwnedWriteHalf,
    /// Longest a write waits for the client to make room (`--body-read-timeout`).
    write_stall: Duration,
    state: Mutex<ReadState>,
}

impl Shared {
    /// A new connection's, nothing read yet.
    fn new(stream: TcpStream, write_stall: Duration) -> Self {
        let (read, write) = stream.into_split();
        Self {
            write,
            write_stall,
            state: Mutex::new(ReadState {
                read,
                buf: BytesMut::new(),
                size: ReadSize(ReadSize::FIRST),
                body: BodyRead::Done,
                send_continue: false,
                generation: 0,
                body_alive: false,
                watcher: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReadState> {
        // Nothing panics while holding the lock; if something did, the state is still
        // only bytes and counters.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One read into the buffer: `Ok(0)` is the end of the stream. (A read that comes back
    /// short tells tokio the socket is drained, so no read is spent on `EAGAIN` later.)
    fn poll_fill(st: &mut ReadState, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let offered = st.size.prepare(&mut st.buf);
        let ReadState { read, buf, .. } = st;
        let n = ready!(std::pin::pin!(read.read_buf(buf)).poll(cx))?;
        st.size.record(offered, n);
        Poll::Ready(Ok(n))
    }

    async fn fill(&self) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut st = self.lock();
            Self::poll_fill(&mut st, cx)
        })
        .await
    }

    /// Writes all of `parts`, in order, in as few system calls as the socket allows.
    async fn write_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut skip = 0usize;
        let total: usize = parts.iter().map(|p| p.len()).sum();
        while skip < total {
            // At most three parts at a time (head, data, framing); the rest on the next round.
            let mut slices = [io::IoSlice::new(&[]); 3];
            let mut used = 0;
            let mut offset = skip;
            for p in parts {
                if offset >= p.len() {
                    offset -= p.len();
                    continue;
                }
                if let Some(slot) = slices.get_mut(used) {
                    *slot = io::IoSlice::new(&p[offset..]);
                    used += 1;
                }
                offset = 0;
            }
            match self.write.try_write_vectored(&slices[..used]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => skip += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A client that reads nothing for this long is gone in all but name: the
                    // connection closes and the upstream request is cancelled. (Socket
                    // buffers hold megabytes, so a client reading at any pace never waits
                    // here that long.)
                    tokio::time::timeout(self.write_stall, self.write.writable())
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Resolves when the client has closed the connection (or it failed), reading ahead into
/// the buffer meanwhile. Waits while a request body is being read (the body reads then),
/// and stops reading once the buffer holds more than a head and a read-ahead.
async fn client_gone(shared: &Shared, limit: usize) {
    std::future::poll_fn(|cx| {
        let mut st = shared.lock();
        loop {
            if st.body_alive && matches!(st.body, BodyRead::Length(_) | BodyRead::Chunked(_)) {
                st.watcher = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if st.buf.len() >= limit {
                return Poll::Pending;
            }
            match Shared::poll_fill(&mut st, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                Poll::Ready(Ok(_)) => {}
            }
        }
    })
    .await;
}

/// A request body, read from the connection as the upstream side asks for it.
pub struct ClientBody {
    shared: Arc<Shared>,
    generation: u64,
    /// Bytes left, when the length is known.
    remaining: Option<u64>,
    ended: bool,
}

/// A fixed error, as a body error.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body was malformed or cut off")]
struct BadBody;

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let shared = Arc::clone(&this.shared);
        let mut guard = shared.lock();
        let st = &mut *guard;
        if st.generation != this.generation {
            // The connection has moved on without this body, which had not ended (a body
            // that has is `ended` from its last bytes on): it was abandoned.
            this.ended = true;
            return Poll::Ready(Some(Err(Box::new(BadBody))));
        }
        loop {
            let step = match &mut st.body {
                BodyRead::Done => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                BodyRead::Failed => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(BadBody))));
                }
                BodyRead::Length(left) => {
                    let n = (*left).min(st.buf.len() as u64);
                    *left -= n;
                    Some((n as usize, *left == 0))
                }
                // `Ok(0)` short of the end means the buffer is used up.
                BodyRead::Chunked(decoder) => decoder
                    .next_data(&mut st.buf)
                    .ok()
                    .map(|n| (n, decoder.is_done())),
            };
            let Some((take, finished)) = step else {
                st.body = BodyRead::Failed;
                wake_watcher(st);
                continue;
            };
            if finished {
                st.body = BodyRead::Done;
                wake_watcher(st);
            }
            if take > 0 {
                st.send_continue = false;
                if let Some(r) = &mut this.remaining {
                    *r = r.saturating_sub(take as u64);
                }
                let data = st.buf.split_to(take).freeze();
                // The last bytes: the body has ended, whatever the connection does next.
                this.ended = finished;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if finished {
                continue;
            }
            if st.send_continue {
                st.send_continue = false;
                if !matches!(shared.write.try_write(CONTINUE), Ok(n) if n == CONTINUE.len()) {
                    st.body = BodyRead::Failed;
                    continue;
                }
            }
            match Shared::poll_fill(st, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0) | Err(_)) => {
                    st.body = BodyRead::Failed;
                    wake_watcher(st);
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.generation == self.generation {
            // Nobody reads the rest now: the connection may (to discard it, or to notice
            // the client going away).
            st.body_alive = false;
            wake_watcher(&mut st);
        }
    }
}

fn wake_watcher(st: &mut ReadState) {
    if let Some(w) = st.watcher.take() {
        w.wake();
    }
}

/// Discards a body that is already wholly in the buffer (a refused request's, typically),
/// so the connection can carry the next request.
fn discard_buffered_body(st: &mut ReadState) {
    match &mut st.body {
        BodyRead::Length(n) if *n <= st.buf.len() as u64 => {
            st.buf.advance(*n as usize);
            st.body = BodyRead::Done;
        }
        BodyRead::Chunked(decoder) => {
            let mut decoder = decoder.clone();
            let mut scratch = st.buf.clone();
            loop {
                match decoder.next_data(&mut scratch) {
                    Ok(0) if decoder.is_done() => {
                        st.buf = scratch;
                        st.body = BodyRead::Done;
                        return;
                    }
                    Ok(0) | Err(_) => return,
                    Ok(n) => scratch.advance(n),
                }
            }
        }
        _ => {}
    }
}

/// Why reading a head ended without one.
enum HeadEnd {
    /// Close without a word: the client closed or went idle before sending anything, or
    /// the proxy is shutting down.
    Quiet,
    /// Answer with an error, then close.
    Refuse(StatusCode, &'static str, &'static str),
}

const HEAD_TOO_LARGE: HeadEnd = HeadEnd::Refuse(
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    "request_header_fields_too_large",
    "the request head (request line and headers) is larger than the proxy's --max-header-size, \
     or has more than 128 header fields",
);
const MALFORMED: HeadEnd = HeadEnd::Refuse(
    StatusCode::BAD_REQUEST,
    "malformed_request",
    "the request is not valid HTTP/1.1: the request line or a header line is malformed \
     (obsolete line folding, a space before a colon and invalid characters are refused)",
);

/// Serves one connection until it closes.
pub async fn serve(stream: TcpStream, ctx: Arc<ConnContext>, drain: watch::Receiver<bool>) {
    let shared = Arc::new(Shared::new(stream, ctx.limits.client_write_stall));
    let read_ahead = ctx.limits.max_header_size.saturating_add(READ_AHEAD);
    let mut timer = WaitTimer::default();
    // Kept from one response to the next (one allocation and wipe less per request). It
    // holds only what the client is sent: heads and body bytes as written, after masking.
    let mut out = Vec::new();
    // One wait for the start of draining, kept for the connection's life and polled by
    // each head wait (one made and dropped per request took the channel's lock twice).
    // Once it is over the connection ends, so it is never polled again.
    let mut draining = DrainWait {
        wait: {
            let mut drain = drain.clone();
            std::pin::pin!(async move {
                let _ = drain.changed().await;
            })
        },
        holds: None,
    };
    loop {
        let head = match read_head(&shared, &ctx.limits, &drain, &mut draining, &mut timer).await {
            Ok(head) => head,
            Err(HeadEnd::Quiet) => return,
            Err(HeadEnd::Refuse(status, code, message)) => {
                ctx.proxy.log_refused_head(status, code);
                let body = error_body(message, "invalid_request_error", code);
                let resp = json_response(status, body);
                let framing = ResponseFraming::Length(0);
                let _ = write_response(&shared, &mut out, resp, framing, true, 0).await;
                linger(&shared).await;
                return;
            }
        };
        let framing = h1::request_framing(&head.fields, head.version);
        let ambiguous = head.bare_lf || framing == RequestFraming::Invalid;
        let mut keep_alive = h1::request_keeps_alive(&head) && !ambiguous;
        let http11 = head.version == Version::HTTP_11;
        let is_head = head.method == Method::HEAD;
        let body = {
            let mut st = shared.lock();
            let (body, remaining) = match framing {
                RequestFraming::Empty => (BodyRead::Done, Some(0)),
                RequestFraming::Invalid => (BodyRead::Failed, Some(0)),
                RequestFraming::Length(n) => (BodyRead::Length(n), Some(n)),
                RequestFraming::Chunked => (BodyRead::Chunked(Chunked::default()), None),
            };
            st.send_continue = remaining != Some(0) && h1::expects_continue(&head);
            let generation = st.begin(body);
            ClientBody {
                shared: Arc::clone(&shared),
                generation,
                remaining,
                ended: remaining == Some(0),
            }
        };
        // Pinned where it is made: handing the (large) future to `select!` by value would
        // copy it once more per request.
        let handled = ctx
            .proxy
            .handle(&ctx.upstream, head, body, ambiguous, &mut timer);
        let handling = std::pin::pin!(handled);
        let resp = tokio::select! {
            biased;
            resp = handling => resp,
            () = client_gone(&shared, read_ahead) => return,
        };
        {
            let mut st = shared.lock();
            // From here on the connection writes the response: a `100 Continue` owed to a
            // body nobody asked for yet must never land inside it.
            st.send_continue = false;
            if !st.body_alive {
                discard_buffered_body(&mut st);
            }
            // A body still being read elsewhere (an HTTPS upstream streaming it while it
            // answers) is left alone, and the connection ends after this response.
            keep_alive &= st.body == BodyRead::Done;
        }
        keep_alive &= !*drain.borrow() && !resp.close;
        let exact = resp.body.size_hint().exact();
        let framing = if is_head
            || resp.status.is_informational()
            || resp.status == StatusCode::NO_CONTENT
            || resp.status == StatusCode::NOT_MODIFIED
        {
            ResponseFraming::NoBody(exact.filter(|_| is_head))
        } else if let Some(n) = exact {
            ResponseFraming::Length(n)
        } else if http11 {
            ResponseFraming::Chunked
        } else {
            keep_alive = false;
            ResponseFraming::UntilClose
        };
        let complete =
            write_response(&shared, &mut out, resp, framing, !keep_alive, read_ahead).await;
        keep_or_free(&mut out);
        match complete {
            Ok(true) if keep_alive && shared.lock().body == BodyRead::Done => {}
            Ok(true) => {
                linger(&shared).await;
                return;
            }
            // The stream broke or the client went away: close at once, so the client sees
            // an incomplete response, not a complete one.
            Ok(false) | Err(_) => return,
        }
    }
}

/// Reads until a whole request head is buffered, within `--header-read-timeout` (which is
/// also how long an idle keep-alive connection is kept).
async fn read_head(
    shared: &Shared,
    limits: &ServerLimits,
    drain: &watch::Receiver<bool>,
    draining: &mut DrainWait<'_, impl Future<Output = ()>>,
    timer: &mut WaitTimer,
) -> Result<RequestHead, HeadEnd> {
    // Where the last parse attempt stopped: a head can only be complete once a line feed
    // arrives after it, so a head trickling in is not parsed again for every byte.
    let mut scanned = 0;
    let mut deadline = None;
    {
        // Between requests: a buffer grown for a large body goes back to its first size, so
        // an idle connection holds a few KiB at most.
        let mut st = shared.lock();
        if st.buf.is_empty() && st.size.0 > ReadSize::FIRST {
            st.buf = BytesMut::new();
            st.size = ReadSize(ReadSize::FIRST);
        }
    }
    loop {
        let started = {
            let mut st = shared.lock();
            if memchr::memchr(b'\n', &st.buf[scanned.min(st.buf.len())..]).is_some() {
                match h1::parse_request_head(&mut st.buf, limits.max_header_size) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(RequestHeadError::TooLarge) => {
                        return Err(HEAD_TOO_LARGE);
                    }
                    Err(RequestHeadError::Malformed) => {
                        return Err(MALFORMED);
                    }
                }
            } else if st.buf.len() > limits.max_header_size {
                return Err(HEAD_TOO_LARGE);
            }
            scanned = st.buf.len();
            !st.buf.is_empty()
        };
        if !started && *drain.borrow() {
            return Err(HeadEnd::Quiet);
        }
        let at = *deadline.get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
        let read = tokio::select! {
            biased;
            read = shared.fill() => read,
            () = timer.until(at) => {
                return Err(if started {
                    HeadEnd::Refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request head was not received within --header-read-timeout",
                    )
                } else {
                    HeadEnd::Quiet
                });
            }
            () = std::future::poll_fn(|cx| draining.poll_wait(drain, cx)), if !started => {
                return Err(HeadEnd::Quiet);
            }
        };
        match read {
            Ok(0) | Err(_) => return Err(HeadEnd::Quiet),
            Ok(_) => {}
        }
    }
}

/// Writes a response. `Ok(true)` when it went out whole; `Ok(false)` when its body broke
/// off or the client went away, and the connection must close at once.
async fn write_response(
    shared: &Shared,
    out: &mut Vec<u8>,
    resp: Reply,
    framing: ResponseFraming,
    close: bool,
    read_ahead: usize,
) -> io::Result<bool> {
    let Reply {
        status,
        fields,
        mut body,
        ..
    } = resp;
    // A fixed body's length is known even where `framing` was chosen before it (errors).
    let framing = match (framing, &body) {
        (ResponseFraming::Length(0), ProxyBody::Fixed(Some(b))) => {
            ResponseFraming::Length(b.len() as u64)
        }
        (f, _) => f,
    };
    make_ready(out);
    h1::encode_response_head(out, status, &fields, framing, close);
    drop(fields);
    let (limit, chunked) = match framing {
        ResponseFraming::NoBody(_) => {
            shared.write_all(&[&out[..]]).await?;
            return Ok(true);
        }
        ResponseFraming::Length(n) => (Some(n), false),
        ResponseFraming::Chunked => (None, true),
        ResponseFraming::UntilClose => (None, false),
    };
    let mut sent = 0u64;
    loop {
        if limit == Some(sent) {
            // Everything declared has been sent; the body is dropped (its end, if still to
            // come, is read by the body itself).
            shared.write_all(&[&out[..]]).await?;
            return Ok(true);
        }
        let frame = if out.is_empty() {
            tokio::select! {
                biased;
                f = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
                () = client_gone(shared, read_ahead) => return Ok(false),
            }
        } else {
            // Gather what is ready now into one write; write once nothing more is.
            let polled = std::future::poll_fn(|cx| {
                Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Ready(f) => Some(f),
                    Poll::Pending => None,
                })
            })
            .await;
            match polled {
                Some(f) => f,
                None => {
                    shared.write_all(&[&out[..]]).await?;
                    out.clear();
                    continue;
                }
            }
        };
        match frame {
            Some(Ok(frame)) => {
                // Trailers are not passed on (the Responses API sends none).
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if let Some(n) = limit {
                    let room = usize::try_from(n - sent).unwrap_or(usize::MAX);
                    if data.len() > room {
                        // More than the declared length: send what was declared, then close.
                        data.truncate(room);
                        shared.write_all(&[&out[..], &data]).await?;
                        return Ok(false);
                    }
                }
                sent += data.len() as u64;
                if chunked {
                    h1::push_chunk_size(out, data.len());
                }
                let tail: &[u8] = if chunked { b"\r\n" } else { b"" };
                if data.len() <= COPY_LIMIT {
                    out.extend_from_slice(&data);
                    out.extend_from_slice(tail);
                } else {
                    shared.write_all(&[&out[..], &data, tail]).await?;
                    out.clear();
                }
            }
            Some(Err(_)) => {
                // The upstream broke off: pass on what came, then close without the end.
                if !out.is_empty() {
                    let _ = shared.write_all(&[&out[..]]).await;
                }
                return Ok(false);
            }
            None => {
                if limit.is_some_and(|n| sent < n) {
                    let _ = shared.write_all(&[&out[..]]).await;
                    return Ok(false);
                }
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                shared.write_all(&[&out[..]]).await?;
                return Ok(true);
            }
        }
    }
}

/// The response writer's buffer, emptied, with room for a head and a small body.
fn make_ready(out: &mut Vec<u8>) {
    out.clear();
    out.reserve(OUT_SIZE);
}

/// After a response: the writer's buffer is kept for the next one, unless a stream or a
/// large head grew it past its first size (an idle connection then holds none).
fn keep_or_free(out: &mut Vec<u8>) {
    if out.capacity() > OUT_SIZE {
        *out = Vec::new();
    }
}

/// Ends the connection: the proxy stops sending, then reads and discards what the client
/// still sends (bounded in time and bytes) so that closing does not reset the connection
/// before the client has read the answer.
async fn linger(shared: &Shared) {
    if sys::shutdown_write(shared.write.as_ref().as_fd()).is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            let read = std::future::poll_fn(|cx| {
                let mut st = shared.lock();
                st.buf.clear();
                Shared::poll_fill(&mut st, cx)
            })
            .await;
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    }

    /// Polls once: whether the timer is ready now.
    fn ready_now(timer: &mut WaitTimer, at: Instant) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        timer.poll_until(at, &mut cx).is_ready()
    }

    /// Spends the task's budget (tokio's cooperative scheduling): a timer or watch polled
    /// after this in the same poll is refused and registers nothing.
    fn spend_budget(cx: &mut Context<'_>) {
        let mut spent = 0;
        while let Poll::Ready(r) = tokio::task::coop::poll_proceed(cx) {
            r.made_progress();
            spent += 1;
            assert!(spent < 10_000, "the budget never ran out");
        }
    }

    #[test]
    fn the_response_buffer_is_kept_at_its_first_size_and_freed_when_grown() {
        let mut out = Vec::new();
        make_ready(&mut out);
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
        keep_or_free(&mut out);
        assert_eq!(out.capacity(), OUT_SIZE, "a first-size buffer is kept");
        make_ready(&mut out);
        assert!(
            out.is_empty() && out.capacity() == OUT_SIZE,
            "reused, emptied"
        );
        out.extend_from_slice(&[b'x'; OUT_SIZE + 1]);
        keep_or_free(&mut out);
        assert_eq!(out.capacity(), 0, "a grown buffer is freed");
    }

    #[test]
    fn a_timer_left_at_an_earlier_deadline_is_never_ready_before_the_later_one() {
        runtime().block_on(async {
            let t0 = Instant::now();
            let mut timer = WaitTimer::default();
            // Armed for a first wait; it fires at its deadline.
            tokio::time::timeout(
                Duration::from_secs(10),
                timer.until(t0 + Duration::from_millis(40)),
            )
            .await
            .expect("never fired");
            assert!(t0.elapsed() >= Duration::from_millis(40));
            // The next wait has a later deadline: the timer (already fired) must be moved
            // on, not taken as the end of this wait.
            let later = Instant::now() + Duration::from_millis(150);
            assert!(!ready_now(&mut timer, later), "ready 150 ms early");
            tokio::time::timeout(Duration::from_secs(10), timer.until(later))
                .await
                .expect("never fired after being moved on");
            assert!(Instant::now() >= later, "ready before its deadline");
        });
    }

    #[test]
    fn a_timer_first_polled_when_the_task_is_out_of_budget_still_fires() {
        runtime().block_on(async {
            let mut timer = WaitTimer::default();
            let at = Instant::now() + Duration::from_millis(30);
            std::future::poll_fn(|cx| {
                // Spend the task's budget (tokio's cooperative scheduling), then poll the
                // timer in the same poll: tokio refuses that poll, registering nothing.
                spend_budget(cx);
                assert!(timer.poll_until(at, cx).is_pending());
                Poll::Ready(())
            })
            .await;
            tokio::time::timeout(Duration::from_secs(3), timer.until(at))
                .await
                .expect("the timer was taken as registered and never fired");
            assert!(Instant::now() >= at);
        });
    }

    #[test]
    fn a_drain_wait_first_polled_when_the_task_is_out_of_budget_still_ends() {
        runtime().block_on(async {
            let (tx, rx) = watch::channel(false);
            let mut inner = rx.clone();
            let mut draining = DrainWait {
                wait: std::pin::pin!(async move {
                    let _ = inner.changed().await;
                }),
                holds: None,
            };
            std::future::poll_fn(|cx| {
                spend_budget(cx);
                assert!(draining.poll_wait(&rx, cx).is_pending());
                Poll::Ready(())
            })
            .await;
            // The change, from another thread, must wake this task: the wait must have
            // registered it after all.
            let changer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                tx.send_replace(true);
            });
            let t0 = Instant::now();
            let polled = std::future::poll_fn(|cx| draining.poll_wait(&rx, cx));
            let ended = tokio::time::timeout(Duration::from_secs(3), polled).await;
            changer.join().expect("changer");
            // (Checked by the clock: the timeout polls the wait once more when it expires.)
            assert!(
                ended.is_ok() && t0.elapsed() < Duration::from_secs(2),
                "the wait was taken as registered and not woken by the change"
            );
        });
    }

    #[test]
    fn a_timer_armed_for_a_later_deadline_is_moved_to_an_earlier_one() {
        runtime().block_on(async {
            let t0 = Instant::now();
            let mut timer = WaitTimer::default();
            assert!(!ready_now(&mut timer, t0 + Duration::from_secs(30)));
            let soon = t0 + Duration::from_millis(30);
            tokio::time::timeout(Duration::from_secs(10), timer.until(soon))
                .await
                .expect("the timer was not moved to the earlier deadline");
            assert!(Instant::now() >= soon);
            // A deadline already past is ready at once.
            assert!(ready_now(&mut timer, t0));
        });
    }

    /// The next frame of `body`.
    async fn frame(body: &mut ClientBody) -> Option<Result<Frame<Bytes>, BoxError>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[test]
    fn a_body_of_an_earlier_request_neither_reads_nor_speaks_for_the_next_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let mut client = TcpStream::connect(listener.local_addr().expect("address"))
                .await
                .expect("connect");
            let (server, _) = listener.accept().await.expect("accept");
            let shared = Arc::new(Shared::new(server, Duration::from_secs(5)));
            let body_of = |generation, n| ClientBody {
                shared: Arc::clone(&shared),
                generation,
                remaining: Some(n),
                ended: false,
            };
            // A first request's body, never read; the connection moves on to a second
            // request, whose body is on the wire.
            let first = shared.lock().begin(BodyRead::Length(3));
            let mut early = body_of(first, 3);
            let second = shared.lock().begin(BodyRead::Length(5));
            assert_ne!(first, second);
            tokio::io::AsyncWriteExt::write_all(&mut client, b"abcde")
                .await
                .expect("write");
            let got = tokio::time::timeout(Duration::from_secs(5), frame(&mut early))
                .await
                .expect("answered at once");
            assert!(
                matches!(got, Some(Err(_))),
                "the earlier body must fail, not read the next request's bytes: {:?}",
                got.map(|r| r.map(|f| f.into_data().ok()))
            );
            // Dropped late, it must not mark the current body as abandoned.
            drop(early);
            assert!(shared.lock().body_alive, "the current body is still wanted");
            let mut current = body_of(second, 5);
            let mut read: Vec<u8> = Vec::new();
            while read.len() < 5 {
                let got = tokio::time::timeout(Duration::from_secs(5), frame(&mut current))
                    .await
                    .expect("bytes in time");
                let Some(Ok(f)) = got else {
                    panic!("the current body failed after {read:?}")
                };
                read.extend_from_slice(&f.into_data().expect("data"));
            }
            assert_eq!(read, b"abcde");
        });
    }
}
