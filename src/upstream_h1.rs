//! The lean upstream path: HTTP/1.1, over plain TCP (a loopback upstream) or TLS, through a
//! small per-worker pool of keep-alive connections, written directly on the worker's event
//! loop.
//!
//! Why not the general client: the proxy's own cost is the whole cost on loopback, and
//! about half of it over TLS, and the general pooled client spends more per request on its
//! pool (keyed maps, locks, a separate connection task and channels between the tasks) and
//! on HTTP/2 framing and header compression than on the exchange itself. Here a request is
//! one buffer written to a connection the handler owns, and the response is parsed in
//! place and streamed from that connection by the response body itself. HTTP/2 to an https
//! upstream (`--upstream-http2`) keeps using the general client.
//!
//! Custody: the request head, the only buffer of ours holding the key, is freed (and so
//! wiped by the zeroing allocator) as soon as it is written; an idle plain connection holds
//! no buffer at all. rustls encrypts the head into records it frees once they are sent;
//! what a TLS connection keeps while idle (its receive buffer, which may hold the last
//! response) goes when it is closed after `--upstream-pool-idle-timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::body::{BoxError, UpstreamRequestBody};
use crate::fields::Fields;
use crate::h1::{self, Chunked, Framing, H1Error};
use crate::headers;

/// Most idle connections kept per worker.
pub(crate) const MAX_IDLE: usize = 256;
/// How much to read at a time: small at first (most answers, SSE events included, are a
/// few KiB, and every buffer is wiped when freed), doubling after each read that filled what
/// was offered, up to 64 KiB.
/// (The client side of `conn.rs` reads the same way.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadSize(pub(crate) usize);

impl ReadSize {
    pub(crate) const FIRST: usize = 2 << 10;
    const MAX: usize = 64 << 10;

    /// Makes room in `buf` for the next read; returns how much was offered.
    pub(crate) fn prepare(self, buf: &mut BytesMut) -> usize {
        buf.reserve(self.0);
        buf.capacity() - buf.len()
    }

    /// Notes how much a read returned of what was offered.
    pub(crate) fn record(&mut self, offered: usize, got: usize) {
        if got >= offered && self.0 < Self::MAX {
            self.0 *= 2;
        }
    }
}

/// Why a plain-upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Failure {
    /// The TCP connect did not finish within `--upstream-connect-timeout`.
    #[error("timed out connecting to the upstream")]
    ConnectTimeout,
    /// The TCP connect failed.
    #[error("cannot connect to the upstream: {0}")]
    Connect(io::Error),
    /// The TLS handshake failed (an untrusted certificate, a name mismatch, no common
    /// protocol version or cipher).
    #[error("TLS handshake with the upstream failed: {0}")]
    Tls(io::Error),
    /// Reading or writing the connection failed.
    #[error("upstream connection failed: {0}")]
    Io(io::Error),
    /// The upstream closed the connection before a complete response head.
    #[error("the upstream closed the connection before responding")]
    Closed,
    /// The upstream closed the connection before the end its framing declared (a
    /// `Content-Length` not reached, a chunked body without its last chunk).
    #[error("the upstream closed the connection before the end of the response body")]
    ClosedMidBody,
    /// The upstream's bytes are not acceptable HTTP/1.1.
    #[error(transparent)]
    Protocol(#[from] H1Error),
    /// The client's request body failed (too large, stalled, cut off).
    #[error("the request body failed: {0}")]
    Body(BoxError),
}

/// One connection to the upstream.
pub(crate) enum Wire {
    /// Plain TCP (a loopback upstream).
    Plain(TcpStream),
    /// TLS over TCP (boxed: the TLS state is large, and connections move in and out of
    /// the pool).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Wire {
    /// Whether an idle pooled connection can carry the next request: nothing arrived on it
    /// since its last response, not even its end. A TLS connection may receive records
    /// that carry no data (a session ticket); those are taken in and it stays usable.
    fn still_idle(&mut self) -> bool {
        match self {
            Wire::Plain(s) => {
                // No readiness since the last (short) read: nothing arrived, not even a FIN,
                // and `try_read` says so without a system call (and, unlike a poll, without
                // registering a waker). Otherwise it reads: the end, or bytes nobody asked
                // for, and the connection is not reusable; `EAGAIN` (a stale readiness), and
                // it is.
                let mut probe = [0u8; 1];
                matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Wire::Tls(t) => {
                let mut cx = Context::from_waker(Waker::noop());
                let (tcp, tls) = t.get_ref();
                // Nothing new on the socket and nothing waiting inside rustls.
                if tcp.poll_read_ready(&mut cx).is_pending() && tls.wants_read() {
                    return true;
                }
                let mut probe = [0u8; 1];
                let mut probe = ReadBuf::new(&mut probe);
                Pin::new(&mut **t)
                    .poll_read(&mut cx, &mut probe)
                    .is_pending()
            }
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Wire::Tls(t) => Pin::new(&mut **t).poll_read(cx, buf),
        }
    }
}

/// The TLS side of a lean pool: the connector (its configuration offers only `http/1.1`)
/// and the name the certificate must carry.
#[derive(Clone)]
pub struct H1Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl H1Tls {
    /// TLS to `name` with `config` (shared by every worker, and so is its session cache).
    pub fn new(config: Arc<rustls::ClientConfig>, name: ServerName<'static>) -> Self {
        Self {
            connector: TlsConnector::from(config),
            name,
        }
    }
}

struct Idle {
    stream: Wire,
    since: Instant,
}

/// One worker's connections to the upstream.
pub struct H1Pool {
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
    tls: Option<H1Tls>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    reaper: AtomicBool,
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl H1Pool {
    /// A pool for `uri` (validated by `config`: https, or http to a loopback host), over
    /// TLS when `tls` is given.
    pub fn new(
        uri: &http::Uri,
        tls: Option<H1Tls>,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        let authority = uri.authority().map_or("", |a| a.as_str()).to_string();
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Self {
            host,
            port: uri
                .port_u16()
                .unwrap_or(if tls.is_some() { 443 } else { 80 }),
            authority,
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            tls,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            reaper: AtomicBool::new(false),
        }
    }

    /// The TLS side, for an https upstream.
    pub fn tls(&self) -> Option<&H1Tls> {
        self.tls.as_ref()
    }

    /// A live idle connection, most recently used first; stale or closed ones are dropped.
    fn checkout(&self) -> Option<Wire> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(mut c) = idle.pop() {
            if c.since.elapsed() < self.idle_timeout && c.stream.still_idle() {
                return Some(c.stream);
            }
        }
        None
    }

    fn checkin(self: &Arc<Self>, stream: Wire) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            stream,
            since: Instant::now(),
        });
        drop(idle);
        if !self.reaper.swap(true, Ordering::AcqRel)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(reap(Arc::downgrade(self)));
        }
    }

    /// A new connection, TLS handshake included, within `--upstream-connect-timeout`.
    async fn connect(&self) -> Result<Wire, H1Failure> {
        let connect = async {
            let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
                .await
                .map_err(H1Failure::Connect)?;
            let addrs = allowed_addresses(addrs, self.tls.is_some());
            if addrs.is_empty() {
                return Err(H1Failure::Connect(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "the upstream host resolved to no loopback address, and plain http goes \
                     only to loopback (fix the resolver's entry for it, or use https)",
                )));
            }
            let stream = connect_first(addrs).await.map_err(|e| {
                if e.kind() == io::ErrorKind::TimedOut {
                    H1Failure::ConnectTimeout
                } else {
                    H1Failure::Connect(e)
                }
            })?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(Wire::Plain(stream)),
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.name.clone(), stream)
                        .await
                        .map_err(H1Failure::Tls)?;
                    Ok(Wire::Tls(Box::new(stream)))
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| H1Failure::ConnectTimeout)?
    }

    /// Sends one request and returns the response's status and fields, and its body
    /// streaming from the connection. `fields` are the client's (rewritten here, see [`headers`]);
    /// `authorization` is the operator's key.
    pub async fn send(
        self: &Arc<Self>,
        fields: Fields,
        authorization: HeaderValue,
        mut body: UpstreamRequestBody,
    ) -> Result<(StatusCode, Fields, H1Body), H1Failure> {
        let length = body.size_hint().exact();
        let chunked = length.is_none();
        // Encoded (and the client's header values let go) before any wait; room for a
        // chunk-size line.
        let mut head = h1::encode_request_head(
            &self.path_and_query,
            &self.authority,
            headers::upstream_fields(&fields),
            authorization.as_bytes(),
            length,
            24,
        );
        drop((fields, authorization));
        // The head waits for the first body frame and goes out with it in one (vectored)
        // write: the upstream can do nothing with a head alone; the body's own stall timer
        // and the caller's idle timer bound the wait. The frame is not copied.
        let first = match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => Some(frame.into_data().unwrap_or_default()),
            Some(Err(e)) => return Err(H1Failure::Body(e)),
            None => None,
        };
        let (first, body_done) = match first {
            Some(d) if !d.is_empty() => {
                let (d, ended) = gather(&mut body, d).await?;
                (Some(d), ended)
            }
            Some(d) => (Some(d), false),
            None => (None, true),
        };
        let (data, tail): (Bytes, &'static [u8]) = match first {
            // An empty frame is no chunk (a zero-size chunk would end the body).
            Some(d) if d.is_empty() => (Bytes::new(), b""),
            Some(d) if chunked => {
                h1::push_chunk_size(&mut head, d.len());
                (d, if body_done { b"\r\n0\r\n\r\n" } else { b"\r\n" })
            }
            Some(d) => (d, b""),
            None if chunked => {
                head.extend_from_slice(b"0\r\n\r\n");
                (Bytes::new(), b"")
            }
            None => (Bytes::new(), b""),
        };
        let mut stream = match self.checkout() {
            Some(s) => s,
            None => self.connect().await?,
        };
        let mut buf = BytesMut::with_capacity(ReadSize::FIRST);
        let mut size = ReadSize(ReadSize::FIRST);
        let request = Outgoing {
            head,
            data,
            tail,
            rest: (!body_done).then_some(&mut body),
            chunked,
        };
        let (head_in, sent) = match &mut stream {
            Wire::Plain(s) => {
                let (rd, wr) = s.split();
                exchange(rd, wr, request, &mut buf, &mut size).await?
            }
            Wire::Tls(t) => {
                let (rd, wr) = tokio::io::split(&mut **t);
                exchange(rd, wr, request, &mut buf, &mut size).await?
            }
        };
        let framing = h1::response_framing(&head_in)?;
        // A response that came before the whole request was sent ends the connection.
        let reusable = sent && h1::keeps_alive(&head_in, framing);
        let state = match framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunked::default()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut body = H1Body {
            stream: Some(stream),
            buf,
            size,
            state,
            reusable,
            pool: Arc::clone(self),
        };
        if body.state == BodyState::Done {
            body.finish();
        }
        Ok((head_in.status, head_in.fields, body))
    }
}

/// The resolved addresses a connection may go to. Without TLS (nothing protects the key on
/// the wire) only loopback ones, whatever the name resolved to: `localhost` is looked up like
/// any name, and a resolver with no hosts entry for it may ask DNS, even try it under the
/// search domains first.
fn allowed_addresses(
    addrs: impl Iterator<Item = std::net::SocketAddr>,
    tls: bool,
) -> Vec<std::net::SocketAddr> {
    addrs
        .filter(|a| tls || a.ip().to_canonical().is_loopback())
        .collect()
}

/// How long a connection attempt runs alone before the next address is tried alongside it
/// (RFC 8305's "connection attempt delay").
const NEXT_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order to try a host's addresses in: the resolver's, but alternating between IPv6 and
/// IPv4 (starting with the family it put first), so that one broken family costs one
/// attempt delay, not every address of that family.
fn attempt_order(addrs: Vec<std::net::SocketAddr>) -> Vec<std::net::SocketAddr> {
    let first_v6 = addrs.first().is_some_and(std::net::SocketAddr::is_ipv6);
    let (mut first, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    let mut order = Vec::with_capacity(first.len() + other.len());
    loop {
        match (first.pop_front(), other.pop_front()) {
            (None, None) => return order,
            (a, b) => order.extend(a.into_iter().chain(b)),
        }
    }
}

/// A TCP connection to the first of `addrs` that accepts, in [`attempt_order`]: each
/// attempt gets [`NEXT_ATTEMPT_DELAY`] alone, then the next starts beside it (at once when
/// one fails), and the first to connect wins ("happy eyeballs"), so an address whose
/// packets vanish (a broken IPv6 route) does not hold the connect until its timeout. The
/// caller bounds the whole with `--upstream-connect-timeout`.
async fn connect_first(addrs: Vec<std::net::SocketAddr>) -> io::Result<TcpStream> {
    type Attempt = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;
    let mut queue = attempt_order(addrs).into_iter();
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut last_error = None;
    loop {
        if attempts.is_empty() {
            let Some(addr) = queue.next() else {
                return Err(last_error.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        "the upstream host name resolved to no address",
                    )
                }));
            };
            attempts.push(Box::pin(TcpStream::connect(addr)));
        }
        let more = queue.len() > 0;
        let finished = std::future::poll_fn(|cx| {
            for i in 0..attempts.len() {
                if let Poll::Ready(r) = attempts[i].as_mut().poll(cx) {
                    drop(attempts.swap_remove(i));
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        });
        let result = tokio::select! {
            r = finished => Some(r),
            () = tokio::time::sleep(NEXT_ATTEMPT_DELAY), if more => None,
        };
        match result {
            Some(Ok(stream)) => return Ok(stream),
            // A failed attempt: the next one starts now (below, or at the top when none
            // is left running).
            Some(Err(e)) => last_error = Some(e),
            None => {}
        }
        if !attempts.is_empty()
            && let Some(addr) = queue.next()
        {
            attempts.push(Box::pin(TcpStream::connect(addr)));
        }
    }
}

/// A request on its way out: the head and the first body frame (written together), and the
/// rest of the body when there is more.
struct Outgoing<'a> {
    head: Vec<u8>,
    data: Bytes,
    tail: &'static [u8],
    rest: Option<&'a mut UpstreamRequestBody>,
    chunked: bool,
}

/// Writes `request` and reads the response head, at once: an upstream may answer (and
/// close) before it has read the whole body. Returns the head and whether the whole request
/// went out.
async fn exchange<R, W>(
    mut rd: R,
    mut wr: W,
    request: Outgoing<'_>,
    buf: &mut BytesMut,
    size: &mut ReadSize,
) -> Result<(h1::ResponseHead, bool), H1Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Outgoing {
        mut head,
        mut data,
        tail,
        rest,
        chunked,
    } = request;
    // Both pinned where they are made (moving them into place would copy them).
    let mut writer = std::pin::pin!(async {
        write_parts(&mut wr, &[&head, &data, tail])
            .await
            .map_err(H1Failure::Io)?;
        drop(std::mem::take(&mut head));
        drop(std::mem::take(&mut data));
        if let Some(body) = rest {
            write_body(&mut wr, body, chunked).await?;
        }
        // TLS may hold the last records back; TCP has nothing to flush.
        wr.flush().await.map_err(H1Failure::Io)
    });
    let mut reader = std::pin::pin!(read_head(&mut rd, buf, size));
    let mut sent = false;
    let mut write_error = None;
    // The writer first: a request usually goes out whole in its first poll, and the reader
    // then waits once for the answer instead of being polled before and after the write.
    // Whenever the writer waits (a body still coming, an upstream not reading) or is done,
    // the reader is polled in the same round, so an early answer is still taken at once.
    let head_in = loop {
        tokio::select! {
            biased;
            w = &mut writer, if !sent && write_error.is_none() => match w {
                Ok(()) => sent = true,
                Err(e @ H1Failure::Body(_)) => return Err(e),
                // The upstream may have answered and closed: read what it sent.
                Err(e) => write_error = Some(e),
            },
            r = &mut reader => break r,
        }
    };
    match (head_in, write_error) {
        (Err(_), Some(w)) => Err(w),
        (r, _) => Ok((r?, sent)),
    }
}

/// Closes idle connections once they have been idle for the pool's idle timeout; runs while
/// there are idle connections.
async fn reap(pool: Weak<H1Pool>) {
    loop {
        let Some(p) = pool.upgrade() else { return };
        let wait = p.idle_timeout;
        drop(p);
        tokio::time::sleep(wait / 2).await;
        let Some(p) = pool.upgrade() else { return };
        let Ok(mut idle) = p.idle.lock() else { return };
        idle.retain(|c| c.since.elapsed() < p.idle_timeout);
        if idle.is_empty() {
            p.reaper.store(false, Ordering::Release);
            return;
        }
    }
}

/// Writes all of `parts`, in order, with as few (vectored) writes as the socket allows.
async fn write_parts(wr: &mut (impl AsyncWrite + Unpin), parts: &[&[u8]; 3]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut done = 0;
    while done < total {
        let mut skip = done;
        let mut slices = [io::IoSlice::new(&[]); 3];
        let mut used = 0;
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices[used] = io::IoSlice::new(&p[skip..]);
            used += 1;
            skip = 0;
        }
        match wr.write_vectored(&slices[..used]).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => done += n,
        }
    }
    Ok(())
}

async fn write_body(
    wr: &mut (impl AsyncWrite + Unpin),
    body: &mut UpstreamRequestBody,
    chunked: bool,
) -> Result<(), H1Failure> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // request trailers are not forwarded
                };
                if data.is_empty() {
                    continue;
                }
                let (data, ended) = gather(body, data).await?;
                let mut size = Vec::new();
                let tail: &[u8] = match (chunked, ended) {
                    (true, true) => b"\r\n0\r\n\r\n",
                    (true, false) => b"\r\n",
                    (false, _) => b"",
                };
                if chunked {
                    h1::push_chunk_size(&mut size, data.len());
                }
                write_parts(wr, &[&size, &data, tail])
                    .await
                    .map_err(H1Failure::Io)?;
                if ended {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(H1Failure::Body(e)),
            None => {
                if chunked {
                    wr.write_all(b"0\r\n\r\n").await.map_err(H1Failure::Io)?;
                }
                return Ok(());
            }
        }
    }
}

/// `first` and the body frames ready now after it, as one piece (see
/// [`UpstreamRequestBody::gather_ready`]), and whether the body ended among them.
async fn gather(body: &mut UpstreamRequestBody, first: Bytes) -> Result<(Bytes, bool), H1Failure> {
    let mut first = Some(first);
    std::future::poll_fn(|cx| {
        let first = first.take().unwrap_or_default();
        Poll::Ready(Pin::new(&mut *body).gather_ready(cx, first))
    })
    .await
    .map_err(H1Failure::Body)
}

/// Most interim (1xx) heads skipped before a final one.
const MAX_INTERIM: usize = 16;

/// Reads until a final response head is complete; interim (1xx) heads are skipped.
async fn read_head(
    rd: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    size: &mut ReadSize,
) -> Result<h1::ResponseHead, H1Failure> {
    let mut interim = 0;
    loop {
        // (Nothing to parse before the first read.)
        if !buf.is_empty()
            && let Some(head) = h1::parse_response_head(buf)?
        {
            if head.status.is_informational() {
                interim += 1;
                if head.status == http::StatusCode::SWITCHING_PROTOCOLS || interim > MAX_INTERIM {
                    return Err(H1Error::UnexpectedUpgrade.into());
                }
                continue;
            }
            return Ok(head);
        }
        let offered = size.prepare(buf);
        let got = rd.read_buf(buf).await.map_err(H1Failure::Io)?;
        size.record(offered, got);
        if got == 0 {
            return Err(if buf.is_empty() {
                H1Failure::Closed
            } else {
                H1Failure::Protocol(H1Error::MalformedHead)
            });
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// A response body read straight from the upstream connection; the connection goes back
/// to its pool the moment the body is complete (and is closed if the body is dropped
/// before that, which is how a client's disconnect cancels the upstream request).
pub struct H1Body {
    stream: Option<Wire>,
    buf: BytesMut,
    size: ReadSize,
    state: BodyState,
    reusable: bool,
    pool: Arc<H1Pool>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(stream) = self.stream.take()
            && self.reusable
            && self.buf.is_empty()
        {
            self.pool.checkin(stream);
        }
        self.buf = BytesMut::new();
    }

    /// Reads more from the upstream into `buf`: the number of bytes read (0 at its end).
    /// (Through tokio's `poll_read`, which takes a short read as proof that the socket is
    /// drained: the next poll waits for readiness instead of spending a read on `EAGAIN`,
    /// and the pool's liveness check at checkout needs no read either.)
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        let offered = self.size.prepare(&mut self.buf);
        let got = ready!(std::pin::pin!(stream.read_buf(&mut self.buf)).poll(cx))?;
        self.size.record(offered, got);
        Poll::Ready(Ok(got))
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = BodyState::Done;
        self.stream = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let available = match &mut this.state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(this.buf.len());
                    *left -= n as u64;
                    n
                }
                BodyState::Chunked(dec) => match dec.next_data(&mut this.buf) {
                    Ok(n) => n,
                    Err(e) => return this.fail(e),
                },
                BodyState::UntilClose => this.buf.len(),
            };
            if available > 0 {
                let data = this.buf.split_to(available).freeze();
                if this.state == BodyState::Length(0) {
                    // Complete: hand the connection back now (hyper may not poll again
                    // once it has sent Content-Length bytes).
                    this.finish();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if matches!(&this.state, BodyState::Chunked(dec) if dec.is_done()) {
                this.finish();
                return Poll::Ready(None);
            }
            match ready!(this.poll_fill(cx)) {
                Ok(0) if this.state == BodyState::UntilClose => {
                    this.state = BodyState::Done;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Failure::ClosedMidBody),
                Ok(_) => {}
                Err(e) => return this.fail(H1Failure::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Done => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_written_in_pieces_arrive_whole_and_in_order() {
        // Far more than the socket buffers hold, so writes come back short and resume
        // mid-part, and across part boundaries.
        let parts: Vec<Vec<u8>> = [3usize << 20, 1, 5 << 20]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (j * 7 + i * 13) as u8).collect())
            .collect();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        });
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let (_, mut wr) = s.split();
        tokio::time::timeout(
            Duration::from_secs(20),
            write_parts(&mut wr, &[&parts[0], &parts[1], &parts[2]]),
        )
        .await
        .expect("in time")
        .expect("written");
        drop(s);
        let got = reader.await.expect("reader");
        assert_eq!(got, parts.concat());
    }

    #[test]
    fn addresses_alternate_between_families_from_the_first_one() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
        let (v6a, v6b, v4a, v4b) = (
            a("[::1]:1"),
            a("[::2]:1"),
            a("127.0.0.1:1"),
            a("10.0.0.1:1"),
        );
        assert_eq!(
            attempt_order(vec![v6a, v6b, v4a, v4b]),
            [v6a, v4a, v6b, v4b]
        );
        assert_eq!(
            attempt_order(vec![v4a, v6a, v6b, v4b]),
            [v4a, v6a, v4b, v6b]
        );
        assert_eq!(attempt_order(vec![v4a, v4b]), [v4a, v4b]);
        assert_eq!(
            attempt_order(vec![v6a, v6b, v6b, v4a]),
            [v6a, v4a, v6b, v6b]
        );
        assert!(attempt_order(Vec::new()).is_empty());
    }

    /// A loopback address whose connects hang: a listener whose accept queue is full (the
    /// kernel drops further SYNs). Returns it with the connections that fill it.
    async fn address_that_hangs() -> (
        std::net::SocketAddr,
        Vec<TcpStream>,
        tokio::net::TcpListener,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut filled = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => filled.push(s),
                Ok(Err(e)) => panic!("connect: {e}"),
                Err(_) => return (addr, filled, listener),
            }
        }
        panic!("the accept queue never filled");
    }

    #[tokio::test]
    async fn an_address_that_hangs_does_not_hold_up_the_next() {
        let (hangs, _filled, _full) = address_that_hangs().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let good_addr = good.local_addr().expect("addr");
        let stream = tokio::time::timeout(
            Duration::from_secs(3),
            connect_first(vec![hangs, good_addr]),
        )
        .await
        .expect("the second address is tried while the first hangs")
        .expect("connected");
        assert_eq!(stream.peer_addr().expect("peer"), good_addr);
        // A refused address is passed over at once, and all failing gives the last error.
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let stream = connect_first(vec![refused, good_addr])
            .await
            .expect("connected");
        assert_eq!(stream.peer_addr().expect("peer"), good_addr);
        let err = connect_first(vec![refused]).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert_eq!(
            connect_first(Vec::new()).await.expect_err("none").kind(),
            io::ErrorKind::NotFound
        );
    }

    /// A writer that, like TLS, may hold what it accepted until it is flushed.
    struct HoldsUntilFlushed {
        held: Vec<u8>,
        out: tokio::sync::watch::Sender<Vec<u8>>,
    }

    impl AsyncWrite for HoldsUntilFlushed {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.held.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            let held = std::mem::take(&mut self.held);
            self.out.send_modify(|out| out.extend_from_slice(&held));
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.poll_flush(cx)
        }
    }

    #[tokio::test]
    async fn a_request_is_flushed_before_the_answer_is_awaited() {
        let head = b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n";
        let (out, mut sent) = tokio::sync::watch::channel(Vec::new());
        let writer = HoldsUntilFlushed {
            held: Vec::new(),
            out,
        };
        let (reader, mut upstream) = tokio::io::duplex(1024);
        let request = Outgoing {
            head: head.to_vec(),
            data: Bytes::from_static(b"{}"),
            tail: b"",
            rest: None,
            chunked: false,
        };
        let (mut buf, mut size) = (BytesMut::new(), ReadSize(ReadSize::FIRST));
        let answer = async {
            // The upstream answers only once the whole request has reached it.
            tokio::time::timeout(
                Duration::from_secs(2),
                sent.wait_for(|b| b.len() == head.len() + 2),
            )
            .await
            .expect("the request was not flushed")
            .expect("sender alive");
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .expect("answer");
        };
        let (got, ()) = tokio::join!(
            exchange(reader, writer, request, &mut buf, &mut size),
            answer
        );
        let (head_in, sent_all) = got.expect("exchange");
        assert_eq!(head_in.status, StatusCode::OK);
        assert!(sent_all);
    }

    #[test]
    fn reads_start_small_and_grow_only_when_filled() {
        let mut size = ReadSize(ReadSize::FIRST);
        let mut buf = BytesMut::new();
        let offered = size.prepare(&mut buf);
        assert!(offered >= ReadSize::FIRST);
        size.record(offered, offered / 2);
        assert_eq!(size.0, ReadSize::FIRST, "a short read does not grow it");
        for _ in 0..10 {
            size.record(1, 1);
        }
        assert_eq!(
            size.0,
            ReadSize::MAX,
            "filled reads double it, up to the cap"
        );
    }

    #[test]
    fn plain_http_goes_only_to_loopback_addresses() {
        let addrs: Vec<std::net::SocketAddr> = [
            "127.0.0.1:80",
            "10.0.0.1:80",
            "[::1]:80",
            "[2001:db8::1]:80",
            "[::ffff:127.0.0.2]:80",
            "[::ffff:192.0.2.1]:80",
            "127.9.9.9:80",
        ]
        .iter()
        .map(|a| a.parse().expect("addr"))
        .collect();
        let plain: Vec<String> = allowed_addresses(addrs.iter().copied(), false)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            plain,
            [
                "127.0.0.1:80",
                "[::1]:80",
                "[::ffff:127.0.0.2]:80",
                "127.9.9.9:80"
            ]
        );
        assert_eq!(allowed_addresses(addrs.iter().copied(), true), addrs);
    }

    /// A plain-http upstream whose name resolves elsewhere is not connected to at all (a
    /// documentation-range address stands in for a host that a resolver put behind
    /// `localhost`: it is never contacted).
    #[tokio::test]
    async fn a_plain_upstream_that_is_not_loopback_is_never_contacted() {
        let uri: http::Uri = "http://192.0.2.1:9/v1/responses".parse().expect("uri");
        let pool = H1Pool::new(&uri, None, Duration::from_secs(5), Duration::from_secs(5));
        let started = Instant::now();
        let Err(H1Failure::Connect(e)) = pool.connect().await else {
            panic!("connected");
        };
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
        assert!(e.to_string().contains("no loopback address"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "no connect was tried"
        );
    }
}
