//! Lines on stderr: one access line per request and a few operational events, as text or
//! JSON. Every field is a value the proxy chose (fixed strings, numbers, a sanitised
//! upstream request id); no header value, body, query string, key or token is ever logged.

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::config::{LogFormat, LogLevel};
use crate::h1;

/// Writes log lines to stderr.
#[derive(Debug, Clone, Copy)]
pub struct Logger {
    format: LogFormat,
    level: LogLevel,
}

/// One finished (or refused) request.
#[derive(Debug, Clone, Default)]
pub struct AccessRecord {
    /// Request method, as received (hyper has validated it as a token).
    pub method: http::Method,
    /// The route, or `<other>` for a path the proxy does not serve (never echoed raw).
    pub path: &'static str,
    /// Status sent to the client.
    pub status: u16,
    /// Request body bytes received from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// From request head to end of response.
    pub duration: Duration,
    /// From request head to the upstream's response head, when there was one.
    pub ttfb: Option<Duration>,
    /// The upstream's `x-request-id`, if it looked like an id.
    pub upstream_request_id: Option<String>,
    /// How the exchange ended: `ok`, a refusal code, or an error class.
    pub outcome: &'static str,
}

/// Keeps an upstream request id only if it is a short run of `[A-Za-z0-9._:-]`.
pub fn sanitize_request_id(raw: &[u8]) -> Option<String> {
    let ok = !raw.is_empty()
        && raw.len() <= 128
        && raw
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    ok.then(|| String::from_utf8_lossy(raw).into_owned())
}

/// The UTC calendar date and time of day for seconds since the Unix epoch: year, month,
/// day, and seconds into the day.
fn civil_utc(secs: u64) -> (i64, i64, i64, u64) {
    let days = (secs / 86_400) as i64;
    // Civil-from-days (proleptic Gregorian), after H. Hinnant's published algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, secs % 86_400)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a time since the Unix epoch.
pub fn rfc3339_utc(since_epoch: Duration) -> String {
    let mut out = Vec::with_capacity(24);
    push_rfc3339_utc(&mut out, since_epoch);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends [`rfc3339_utc`]'s text, without formatting machinery or allocation.
fn push_rfc3339_utc(out: &mut Vec<u8>, since_epoch: Duration) {
    let (year, month, day, rem) = civil_utc(since_epoch.as_secs());
    // Years before 0 or after 9999 are not this program's; they are clamped, not garbled.
    let year = year.clamp(0, 9999) as u64;
    let digits = |out: &mut Vec<u8>, n: u64, width: u32| {
        for i in (0..width).rev() {
            out.push(b'0' + (n / 10u64.pow(i) % 10) as u8);
        }
    };
    digits(out, year, 4);
    out.push(b'-');
    digits(out, month as u64, 2);
    out.push(b'-');
    digits(out, day as u64, 2);
    out.push(b'T');
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, rem % 3600 / 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'.');
    digits(out, u64::from(since_epoch.subsec_millis()), 3);
    out.push(b'Z');
}

/// The HTTP `Date` format (IMF-fixdate, RFC 9110 §5.6.7), e.g.
/// `Sun, 06 Nov 1994 08:49:37 GMT`, for a time since the Unix epoch.
pub fn http_date(since_epoch: Duration) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = since_epoch.as_secs();
    let (year, month, day, rem) = civil_utc(secs);
    format!(
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        DAYS[(secs / 86_400 % 7) as usize],
        MONTHS[(month - 1).clamp(0, 11) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
}

/// The current time in the HTTP `Date` format.
pub fn http_date_now() -> String {
    http_date(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn now() -> String {
    rfc3339_utc(since_epoch())
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
    }
}

/// Milliseconds as a JSON number (the general formatter's way; the oracle of [`push_ms`]).
#[cfg(test)]
fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl Logger {
    /// A logger writing `format` lines at `level` and more severe.
    pub fn new(format: LogFormat, level: LogLevel) -> Self {
        Self { format, level }
    }

    /// Whether lines at `level` are written.
    pub fn enabled(&self, level: LogLevel) -> bool {
        level <= self.level
    }

    /// Whether access lines are written (so whether an exchange needs timing at all).
    pub fn writes_access(&self) -> bool {
        self.enabled(LogLevel::Info)
    }

    /// Writes the access line for one request.
    pub fn access(&self, r: &AccessRecord) {
        if !self.writes_access() {
            return;
        }
        let line = match self.format {
            // Written directly: through `format_line` the line took about 16,000
            // instructions, as much as the rest of the request (callgrind).
            LogFormat::Text => access_text(since_epoch(), r),
            LogFormat::Json => access_json(since_epoch(), r),
        };
        sink(self.format).push(&line);
    }

    /// Writes an operational event: `msg` is a fixed text, `fields` values chosen by the
    /// proxy (never a header value, body, key or token).
    pub fn event(&self, level: LogLevel, msg: &str, fields: &[(&str, &str)]) {
        if !self.enabled(level) {
            return;
        }
        let fields = fields.iter().map(|(k, v)| (*k, Value::from(*v))).collect();
        self.write(level, msg, fields);
    }
}

/// The access line's fields, in order, for the general formatter (the oracle of
/// [`access_text`] and [`access_json`]).
#[cfg(test)]
fn access_fields(r: &AccessRecord) -> Vec<(&'static str, Value)> {
    let mut fields: Vec<(&str, Value)> = vec![
        ("method", Value::from(r.method.as_str())),
        ("path", Value::from(r.path)),
        ("status", Value::from(r.status)),
        ("bytes_in", Value::from(r.bytes_in)),
        ("bytes_out", Value::from(r.bytes_out)),
        ("duration_ms", Value::from(ms(r.duration))),
    ];
    if let Some(t) = r.ttfb {
        fields.push(("ttfb_ms", Value::from(ms(t))));
    }
    if let Some(id) = &r.upstream_request_id {
        fields.push(("upstream_request_id", Value::from(id.as_str())));
    }
    fields.push(("outcome", Value::from(r.outcome)));
    fields
}

/// The text access line, the same bytes as [`format_line`] makes of [`access_fields`]
/// (a test holds them to it), written straight into one buffer.
fn access_text(since_epoch: Duration, r: &AccessRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(224);
    push_rfc3339_utc(&mut out, since_epoch);
    out.extend_from_slice(b" info access method=");
    push_text(&mut out, r.method.as_str());
    out.extend_from_slice(b" path=");
    push_text(&mut out, r.path);
    out.extend_from_slice(b" status=");
    h1::push_decimal(&mut out, u64::from(r.status));
    out.extend_from_slice(b" bytes_in=");
    h1::push_decimal(&mut out, r.bytes_in);
    out.extend_from_slice(b" bytes_out=");
    h1::push_decimal(&mut out, r.bytes_out);
    out.extend_from_slice(b" duration_ms=");
    push_ms(&mut out, r.duration);
    if let Some(t) = r.ttfb {
        out.extend_from_slice(b" ttfb_ms=");
        push_ms(&mut out, t);
    }
    if let Some(id) = &r.upstream_request_id {
        out.extend_from_slice(b" upstream_request_id=");
        push_text(&mut out, id);
    }
    out.extend_from_slice(b" outcome=");
    push_text(&mut out, r.outcome);
    out.push(b'\n');
    out
}

/// The JSON access line, the same bytes as [`format_line`] makes of [`access_fields`]
/// (a test holds them to it): its keys in the same (sorted) order.
fn access_json(since_epoch: Duration, r: &AccessRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(288);
    out.extend_from_slice(b"{\"bytes_in\":");
    h1::push_decimal(&mut out, r.bytes_in);
    out.extend_from_slice(b",\"bytes_out\":");
    h1::push_decimal(&mut out, r.bytes_out);
    out.extend_from_slice(b",\"duration_ms\":");
    push_ms(&mut out, r.duration);
    out.extend_from_slice(b",\"level\":\"info\",\"method\":");
    push_json_str(&mut out, r.method.as_str());
    out.extend_from_slice(b",\"msg\":\"access\",\"outcome\":");
    push_json_str(&mut out, r.outcome);
    out.extend_from_slice(b",\"path\":");
    push_json_str(&mut out, r.path);
    out.extend_from_slice(b",\"status\":");
    h1::push_decimal(&mut out, u64::from(r.status));
    out.extend_from_slice(b",\"time\":\"");
    push_rfc3339_utc(&mut out, since_epoch);
    out.push(b'"');
    if let Some(t) = r.ttfb {
        out.extend_from_slice(b",\"ttfb_ms\":");
        push_ms(&mut out, t);
    }
    if let Some(id) = &r.upstream_request_id {
        out.extend_from_slice(b",\"upstream_request_id\":");
        push_json_str(&mut out, id);
    }
    out.extend_from_slice(b"}\n");
    out
}

/// A JSON string: quoted as is when it holds nothing to escape, otherwise by serde_json.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(Value::from(text).to_string().as_bytes());
    }
}

/// A text value as [`format_line`] writes it: bare, or quoted as JSON.
fn push_text(out: &mut Vec<u8>, text: &str) {
    if is_bare(text) {
        out.extend_from_slice(text.as_bytes());
    } else {
        out.extend_from_slice(Value::from(text).to_string().as_bytes());
    }
}

/// Milliseconds as [`ms`] makes them and JSON writes them: whole microseconds, so at
/// most three decimals, trailing zeros dropped but one kept (`2.0`, `2.3`, `2.345`).
/// (Up to 2^53 microseconds, 285 years, the same bytes; a test holds it to that.)
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    h1::push_decimal(out, micros / 1000);
    out.push(b'.');
    let frac = micros % 1000;
    let digits = [frac / 100, frac / 10 % 10, frac % 10];
    let keep = if digits[2] != 0 {
        3
    } else if digits[1] != 0 {
        2
    } else {
        1
    };
    out.extend(digits[..keep].iter().map(|&d| b'0' + d as u8));
}

impl Logger {
    fn write(&self, level: LogLevel, msg: &str, fields: Vec<(&str, Value)>) {
        let line = format_line(self.format, &now(), level, msg, fields);
        sink(self.format).push(line.as_bytes());
    }
}

/// One line, as written: `time level msg k=v…` or a JSON object, with its newline.
fn format_line(
    format: LogFormat,
    time: &str,
    level: LogLevel,
    msg: &str,
    fields: Vec<(&str, Value)>,
) -> String {
    match format {
        LogFormat::Json => {
            let mut m = Map::new();
            m.insert("time".into(), Value::from(time));
            m.insert("level".into(), Value::from(level_name(level)));
            m.insert("msg".into(), Value::from(msg));
            for (k, v) in fields {
                m.insert(k.to_string(), v);
            }
            let mut s = Value::Object(m).to_string();
            s.push('\n');
            s
        }
        LogFormat::Text => {
            let mut s = format!("{time} {} {msg}", level_name(level));
            for (k, v) in fields {
                match v {
                    Value::String(text) if is_bare(&text) => s.push_str(&format!(" {k}={text}")),
                    Value::String(text) => s.push_str(&format!(" {k}={}", Value::from(text))),
                    other => s.push_str(&format!(" {k}={other}")),
                }
            }
            s.push('\n');
            s
        }
    }
}

// ------------------------------------------------------------------------------------
// The way to stderr: lines are queued and written by a thread of their own
// ------------------------------------------------------------------------------------

/// Most bytes of lines waiting for stderr; past it, lines are dropped (and counted).
const QUEUE_MAX: usize = 1 << 20;

/// Lines waiting for stderr. The proxy's threads only append to it; a writer thread of
/// its own takes them in batches and does the (blocking) writes, so a stderr that takes
/// lines slowly or not at all (a pipe nobody reads) never stalls proxying. What does not
/// fit in [`QUEUE_MAX`] is dropped and counted, and the count is written once stderr takes
/// lines again.
#[derive(Debug, Default)]
struct Queue {
    lines: Vec<u8>,
    dropped: u64,
    /// The writer holds a batch, or has been woken to take one: no need to wake it.
    writing: bool,
}

impl Queue {
    /// Appends `line` (or counts it as dropped when the queue is full); returns whether
    /// the writer must be woken.
    fn push(&mut self, line: &[u8]) -> bool {
        if self.lines.len().saturating_add(line.len()) > QUEUE_MAX {
            self.dropped = self.dropped.saturating_add(1);
        } else {
            self.lines.extend_from_slice(line);
        }
        // One wake-up is enough until the writer finds the queue empty again.
        !std::mem::replace(&mut self.writing, true)
    }

    /// Whether there is anything to write.
    fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.dropped == 0
    }

    /// Takes what waits, for the writer (which is then busy until it asks again): the
    /// lines, swapped into `into` (emptied first), and how many were dropped.
    fn take(&mut self, into: &mut Vec<u8>) -> u64 {
        into.clear();
        std::mem::swap(&mut self.lines, into);
        self.writing = true;
        std::mem::take(&mut self.dropped)
    }

    /// The writer has written its batch and found nothing more: it waits to be woken.
    fn idle(&mut self) {
        self.writing = false;
    }

    /// Whether everything taken so far has been written and nothing waits.
    fn is_drained(&self) -> bool {
        !self.writing && self.is_empty()
    }
}

struct Sink {
    format: LogFormat,
    /// Whether the writer thread runs; if it could not be started, lines are written
    /// where they are logged, as before it existed.
    threaded: bool,
    queue: Mutex<Queue>,
    /// The writer waits here for lines.
    more: Condvar,
    /// [`flush`] waits here for the writer to catch up.
    written: Condvar,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// The process's sink, started (with its writer thread) by the first line.
fn sink(format: LogFormat) -> &'static Sink {
    SINK.get_or_init(|| {
        // The thread waits for the sink to be in place, then writes for the process's life.
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(|| write_lines(SINK.wait()));
        Sink {
            format,
            threaded: spawned.is_ok(),
            queue: Mutex::new(Queue::default()),
            more: Condvar::new(),
            written: Condvar::new(),
        }
    })
}

impl Sink {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, line: &[u8]) {
        if !self.threaded {
            let _ = std::io::stderr().lock().write_all(line);
            return;
        }
        let wake = self.lock().push(line);
        if wake {
            self.more.notify_one();
        }
    }
}

/// The least time between two of the writer's batches: a line after a quiet spell is
/// written at once, but under load the writer wakes and writes about a hundred times a
/// second, whatever the rate of requests (waking it for each line cost more CPU than the
/// lines' own writes), and an idle proxy's writer sleeps.
const GATHER: Duration = Duration::from_millis(10);

/// The writer thread: writes what is queued, batch by batch, for the life of the process.
fn write_lines(sink: &Sink) {
    let mut batch = Vec::new();
    let mut last: Option<std::time::Instant> = None;
    loop {
        {
            let mut q = sink.lock();
            while q.is_empty() {
                q.idle();
                sink.written.notify_all();
                q = sink.more.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        }
        if let Some(wait) = last.and_then(|t| GATHER.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        last = Some(std::time::Instant::now());
        let dropped = sink.lock().take(&mut batch);
        let mut err = std::io::stderr().lock();
        // A closed stderr is not a reason to disturb proxying.
        let _ = err.write_all(&batch);
        if dropped > 0 {
            let line = format_line(
                sink.format,
                &now(),
                LogLevel::Warn,
                "log lines dropped: stderr was not taking them",
                vec![("dropped", Value::from(dropped))],
            );
            let _ = err.write_all(line.as_bytes());
        }
        drop(err);
        // A large batch's buffer is not kept.
        if batch.capacity() > 64 << 10 {
            batch = Vec::new();
        }
    }
}

/// Starts the writer thread (the first line would otherwise), so that the proxy's threads
/// are all there before it announces itself.
pub fn start(format: LogFormat) {
    sink(format);
}

/// Writes one line, made of `parts`, straight to stderr (not through the queue): for the few
/// lines written before logging starts or in its place. Unlike `eprintln!`, which panics
/// when the write fails, a stderr that takes nothing (a pipe whose reader is gone, a full
/// disk) is the caller's to judge; for a warning it is no reason to stop.
pub fn stderr_line(parts: &[&str]) -> std::io::Result<()> {
    let mut err = std::io::stderr().lock();
    for part in parts {
        err.write_all(part.as_bytes())?;
    }
    err.write_all(b"\n")
}

/// Waits until every line logged so far is written, at most `limit` (a stderr nobody
/// reads must not hold up the exit); before the process exits or writes to stderr itself.
pub fn flush(limit: Duration) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let deadline = std::time::Instant::now() + limit;
    let mut q = sink.lock();
    while !q.is_drained() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        q = match sink.written.wait_timeout(q, left) {
            Ok((q, _)) => q,
            Err(p) => p.into_inner().0,
        };
    }
}

/// Whether a text value can be written without quotes.
fn is_bare(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_wakes_an_idle_writer_only_and_drops_what_does_not_fit() {
        let mut q = Queue::default();
        assert!(q.is_drained());
        // An idle writer is woken by the first line; a busy one is not.
        assert!(q.push(b"one\n"));
        assert!(!q.push(b"one more\n"), "woken already");
        let mut batch = Vec::new();
        assert_eq!(q.take(&mut batch), 0);
        assert_eq!(batch, b"one\none more\n");
        assert!(!q.is_drained(), "the batch is not written yet");
        assert!(!q.push(b"two\n"), "the writer is busy: no wake-up");
        assert!(!q.push(b"three\n"));
        assert_eq!(q.take(&mut batch), 0);
        assert_eq!(
            batch, b"two\nthree\n",
            "in order, the last batch's buffer reused"
        );
        assert!(q.is_empty());
        q.idle();
        assert!(q.is_drained());
        assert!(q.push(b"four\n"), "idle again: woken");

        // Full: lines are counted, not kept, until the writer takes the queue.
        let mut q = Queue::default();
        let line = [b'x'; 1000];
        let fit = QUEUE_MAX / line.len();
        for _ in 0..fit + 5 {
            q.push(&line);
        }
        assert_eq!(q.lines.len(), fit * line.len());
        assert_eq!(q.take(&mut batch), 5);
        assert_eq!(batch.len(), fit * line.len());
        assert_eq!(q.dropped, 0, "the count is taken with the batch");
        q.push(b"after\n");
        assert_eq!(q.take(&mut batch), 0);
        assert_eq!(batch, b"after\n");
    }

    #[test]
    fn the_text_access_line_is_what_the_general_formatter_writes() {
        let base = AccessRecord {
            method: http::Method::POST,
            path: "/v1/responses",
            status: 200,
            bytes_in: 58,
            bytes_out: 9120,
            duration: Duration::from_micros(1_841_234),
            ttfb: Some(Duration::from_micros(402_700)),
            upstream_request_id: Some("req_abc".into()),
            outcome: "ok",
        };
        let odd_method = http::Method::from_bytes(b"M-SEARCH").expect("method");
        let records = [
            base.clone(),
            AccessRecord {
                ttfb: None,
                upstream_request_id: None,
                ..base.clone()
            },
            AccessRecord {
                method: odd_method,
                path: "<other>",
                status: 404,
                bytes_in: 0,
                bytes_out: u64::MAX,
                duration: Duration::ZERO,
                ttfb: Some(Duration::from_nanos(999)),
                upstream_request_id: Some("needs \"quoting\" = yes\\ \u{1}é".into()),
                outcome: "client_closed",
            },
            AccessRecord {
                duration: Duration::from_secs(86_400 * 365 * 200),
                ..base.clone()
            },
            AccessRecord {
                upstream_request_id: Some("back\\slash".into()),
                ..base.clone()
            },
        ];
        for (i, r) in records.iter().enumerate() {
            for t in [0, 951_782_400_123, 1_795_000_000_999, 4_102_444_800_000] {
                let t = Duration::from_millis(t);
                let general = |format| {
                    format_line(
                        format,
                        &rfc3339_utc(t),
                        LogLevel::Info,
                        "access",
                        access_fields(r),
                    )
                };
                assert_eq!(
                    String::from_utf8_lossy(&access_text(t, r)),
                    general(LogFormat::Text),
                    "record {i}"
                );
                assert_eq!(
                    String::from_utf8_lossy(&access_json(t, r)),
                    general(LogFormat::Json),
                    "record {i}"
                );
            }
        }
    }

    #[test]
    fn milliseconds_are_written_as_json_writes_them() {
        let check = |micros: u64| {
            let d = Duration::from_micros(micros);
            let mut out = Vec::new();
            push_ms(&mut out, d);
            assert_eq!(
                String::from_utf8_lossy(&out),
                Value::from(ms(d)).to_string(),
                "{micros} µs"
            );
        };
        (0..=200_000).for_each(check);
        // Spread over the rest of the range up to 2^53 µs.
        let mut m: u64 = 200_001;
        while m < 1 << 53 {
            check(m);
            check(m - m % 1000);
            m = m + m / 7 + 13;
        }
    }

    #[test]
    fn utc_times_match_the_formatting_macro() {
        let by_macro = |d: Duration| {
            let (year, month, day, rem) = civil_utc(d.as_secs());
            format!(
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60,
                d.subsec_millis()
            )
        };
        // Every 61 minutes and 7 ms from 1970 to past 2100.
        let mut ms: u64 = 0;
        while ms < 4_200_000_000_000 {
            let d = Duration::from_millis(ms);
            assert_eq!(rfc3339_utc(d), by_macro(d));
            ms += 61 * 60_000 + 7;
        }
    }

    /// The calendar against the plainest reference there is: counting days one at a time,
    /// month lengths and the leap-year rule written out, from 1970 to 2400 (past the
    /// century years 2100, 2200 and 2300, which are not leap years, and 2400, which is).
    #[test]
    fn every_day_from_1970_to_2400_has_its_calendar_date() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = |y: i64, m: i64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1970, 1, 1);
        let mut days: u64 = 0;
        while y <= 2400 {
            // A second before midnight, and midnight itself.
            assert_eq!(civil_utc(days * 86_400), (y, m, d, 0), "day {days}");
            assert_eq!(
                civil_utc(days * 86_400 + 86_399),
                (y, m, d, 86_399),
                "day {days}"
            );
            days += 1;
            d += 1;
            if d > month_days(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339_utc(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_utc(Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339_utc(Duration::from_secs(1_795_000_000)),
            "2026-11-18T11:06:40.000Z"
        );
    }

    #[test]
    fn formats_http_dates() {
        assert_eq!(
            http_date(Duration::from_secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(http_date(Duration::ZERO), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            http_date(Duration::from_millis(951_782_400_999)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }

    #[test]
    fn request_ids_are_sanitised() {
        assert_eq!(
            sanitize_request_id(b"req_abc-123"),
            Some("req_abc-123".into())
        );
        assert_eq!(sanitize_request_id(b"a b"), None);
        assert_eq!(sanitize_request_id(b"a\"b"), None);
        assert_eq!(sanitize_request_id(b""), None);
        assert_eq!(sanitize_request_id(&[b'a'; 129]), None);
    }

    #[test]
    fn text_values_are_bare_only_when_nothing_could_be_misread() {
        let fields = |pairs: &[(&'static str, &str)]| {
            pairs.iter().map(|&(k, v)| (k, Value::from(v))).collect()
        };
        let line = format_line(
            LogFormat::Text,
            "T",
            LogLevel::Warn,
            "m",
            fields(&[
                ("plain", "a-b_c:1/2"),
                ("space", "a b"),
                ("empty", ""),
                ("quote", "a\"b"),
                ("equals", "a=b"),
                ("control", "a\u{1}"),
                ("other", "é"),
            ]),
        );
        assert_eq!(
            line,
            "T warn m plain=a-b_c:1/2 space=\"a b\" empty=\"\" quote=\"a\\\"b\" \
             equals=\"a=b\" control=\"a\\u0001\" other=\"é\"\n"
        );
        assert!(is_bare("sk_abc.DEF~1") && !is_bare("") && !is_bare("a\tb"));
    }

    #[test]
    fn levels_filter() {
        let l = Logger::new(LogFormat::Text, LogLevel::Warn);
        assert!(l.enabled(LogLevel::Error));
        assert!(l.enabled(LogLevel::Warn));
        assert!(!l.enabled(LogLevel::Info));
    }
}
