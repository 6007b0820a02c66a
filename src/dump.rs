//! `--dump-dir`: each forwarded exchange written as `NNNNNN-<unix_ms>-request.json` and
//! `NNNNNN-<unix_ms>-response.json` (the codex proxy's format: method, url, headers as
//! `[{"name","value"}]`, body as JSON when it parses, else a string).
//!
//! The directory is created 0700 (a symbolic link is refused) and held open from start-up:
//! files are created in it by descriptor, 0600 (`openat` with `O_EXCL|O_NOFOLLOW`), so
//! renaming the path or swapping it for a link later moves nothing. Credential headers
//! are written as `[REDACTED]`. Body copies are bounded; a cut body is marked. A dump that
//! fails is logged once and never affects the proxied exchange.

use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

use crate::config::LogLevel;
use crate::log::Logger;

/// What stands in for a credential header's value.
pub const REDACTED: &str = "[REDACTED]";

/// Whether a header's value may be a credential and must never be written to a dump: the
/// named ones, and (erring on the side of redaction) any name containing `cookie`, `auth`,
/// `token`, `secret` or ending in `key`.
pub fn is_redacted_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "authorization" | "x-proxy-token" | "proxy-authorization" | "api-key"
    ) || ["cookie", "auth", "token", "secret"]
        .iter()
        .any(|w| name.contains(w))
        || name.ends_with("key")
}

/// Headers as the dump records them, credentials redacted.
pub fn dump_headers(headers: &HeaderMap) -> Vec<Value> {
    headers
        .iter()
        .map(|(name, value)| {
            let v = if is_redacted_header(name.as_str()) {
                REDACTED.to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            json!({ "name": name.as_str(), "value": v })
        })
        .collect()
}

/// What a dump body copy takes from the memory budget when it first needs room (less if
/// `--dump-max-body` is smaller); later growth doubles, as a `Vec` would.
const FIRST_ROOM: usize = 8 << 10;

/// About what one header, the method or the URL costs in a queued dump beyond its bytes
/// (a JSON object with two strings).
const PER_FIELD: usize = 160;

/// About what a queued dump costs before any header or body.
const PER_DUMP: usize = 512;

/// How long the end of the process waits for queued dump files to be written.
pub const WRITE_ON_EXIT: Duration = Duration::from_secs(5);

/// Which limit cut a body copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    MaxBody,
    Memory,
}

/// The memory that dumps in progress and dumps waiting to be written may hold together
/// (`--dump-max-memory`): body copies and, approximately, their heads.
#[derive(Debug)]
struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// Reserves up to `want` bytes; returns how many it reserved.
    fn take_up_to(&self, want: usize) -> usize {
        let mut got = 0;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                got = want.min(self.limit.saturating_sub(used));
                Some(used + got)
            });
        got
    }

    /// Reserves exactly `want` bytes, or nothing.
    fn take_all(&self, want: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used.saturating_add(want) <= self.limit).then_some(used + want)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes reserved from the budget, given back when dropped (when the dump that holds them
/// has been written, or abandoned).
#[derive(Debug)]
struct Held {
    shared: Arc<Shared>,
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared.budget.give_back(self.bytes);
    }
}

/// The room a body copy asks for next: enough for `keep` bytes, at least double what it
/// has (amortised growth) and `FIRST_ROOM`, never more than `max`.
fn room_wanted(has: usize, keep: usize, max: usize) -> usize {
    keep.max(has.saturating_mul(2)).max(FIRST_ROOM).min(max)
}

/// A bounded copy of a body: at most `max` bytes, and only as much as the memory budget
/// grants. Once cut, it keeps nothing more (a copy with a hole in it would mislead).
#[derive(Debug)]
pub struct BodyCopy {
    bytes: Vec<u8>,
    total: u64,
    max: usize,
    cut: Option<Cut>,
    held: Option<Held>,
}

impl BodyCopy {
    /// A copy that keeps at most `max` bytes, with no memory budget (tests).
    #[cfg(test)]
    fn new(max: usize) -> Self {
        Self::within(max, None)
    }

    fn within(max: usize, held: Option<Held>) -> Self {
        Self {
            bytes: Vec::new(),
            total: 0,
            max,
            cut: None,
            held,
        }
    }

    /// Appends a chunk, as far as the bounds allow.
    pub fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        if self.cut.is_some() || chunk.is_empty() {
            return;
        }
        let len = self.bytes.len();
        let mut keep = len.saturating_add(chunk.len());
        if keep > self.max {
            keep = self.max;
            self.cut = Some(Cut::MaxBody);
        }
        if let Some(held) = &mut self.held
            && keep > held.bytes
        {
            // Room to grow into when the budget has it to spare; else just what is needed.
            let budget = &held.shared.budget;
            let want = room_wanted(held.bytes, keep, self.max);
            held.bytes += if budget.take_all(want - held.bytes) {
                want - held.bytes
            } else {
                budget.take_up_to(keep - held.bytes)
            };
            if held.bytes < keep {
                keep = held.bytes;
                self.cut = Some(Cut::Memory);
                held.shared.under_pressure();
            }
            // Exactly the room accounted for, so the budget counts what is allocated.
            if self.bytes.capacity() < held.bytes {
                self.bytes.reserve_exact(held.bytes - len);
            }
        }
        self.bytes.extend_from_slice(&chunk[..keep - len]);
    }

    /// Adds `body` (and, when cut, `body_truncated`, `body_bytes` and which limit cut it,
    /// `body_truncated_by`) to `obj`. Returns the budget's share, to be given back once the
    /// file is written.
    fn into_fields(self, obj: &mut serde_json::Map<String, Value>) -> Option<Held> {
        let kept = self.bytes.len() as u64;
        let truncated = self.total > kept;
        let body = if truncated {
            text(self.bytes)
        } else {
            match serde_json::from_slice(&self.bytes) {
                Ok(v) => v,
                Err(_) => text(self.bytes),
            }
        };
        obj.insert("body".into(), body);
        if truncated {
            obj.insert("body_truncated".into(), Value::Bool(true));
            obj.insert("body_bytes".into(), Value::from(self.total));
            let by = match self.cut {
                Some(Cut::Memory) => "--dump-max-memory",
                _ => "--dump-max-body",
            };
            obj.insert("body_truncated_by".into(), Value::from(by));
        }
        self.held
    }
}

/// Bytes as a JSON string, without a copy when they are UTF-8.
fn text(bytes: Vec<u8>) -> Value {
    Value::String(
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

/// One file to write.
#[derive(Debug)]
struct Job {
    name: String,
    /// Everything but the body.
    fields: serde_json::Map<String, Value>,
    body: BodyCopy,
    /// Added after the body (a response stream's error).
    stream_error: Option<&'static str>,
    /// The head's share of the budget (the body holds its own).
    head: Held,
}

impl Job {
    /// The file's contents, and the budget's shares it still holds.
    fn into_value(self) -> (Value, [Option<Held>; 2]) {
        let mut obj = self.fields;
        let body = self.body.into_fields(&mut obj);
        if let Some(why) = self.stream_error {
            obj.insert("stream_error".into(), Value::from(why));
        }
        (Value::Object(obj), [body, Some(self.head)])
    }
}

/// The queue between the serving threads and the dump writer.
#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// The writer is writing a job it has taken.
    busy: bool,
    /// No more jobs: the writer stops once the queue is empty.
    closed: bool,
    /// The writer thread has ended.
    gone: bool,
}

/// What the dumper, its dumps in progress and its writer share.
#[derive(Debug)]
struct Shared {
    /// The dump directory, opened once at start-up.
    dir: fs::File,
    budget: Budget,
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or the queue closes.
    more: Condvar,
    /// Signalled when the writer goes idle or ends.
    idle: Condvar,
    failed: AtomicBool,
    /// An episode of memory pressure is under way (it was reported).
    pressed: AtomicBool,
    skipped: AtomicU64,
    logger: Logger,
    /// Tests hold it to stand for a slow disk: the writer takes it before each job.
    #[cfg(test)]
    stall: Mutex<()>,
    /// Episodes of memory pressure reported (tests).
    #[cfg(test)]
    reported: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent: use it as it is.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that the budget refused room: reported once per episode.
    fn under_pressure(&self) {
        if !self.pressed.swap(true, Ordering::AcqRel) {
            #[cfg(test)]
            self.reported.fetch_add(1, Ordering::Relaxed);
            self.logger.event(
                LogLevel::Warn,
                "dumps are using all of --dump-max-memory; bodies are cut and exchanges may go \
                 undumped until queued files are written (raise --dump-max-memory, or the disk \
                 is slow)",
                &[("max_memory", &self.budget.limit.to_string())],
            );
        }
    }

    /// Reserves a head's share, or notes the exchange as not dumped.
    fn hold_head(self: &Arc<Self>, bytes: usize) -> Option<Held> {
        if self.budget.take_all(bytes) {
            Some(Held {
                shared: Arc::clone(self),
                bytes,
            })
        } else {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            self.under_pressure();
            None
        }
    }

    fn body(self: &Arc<Self>, max: usize) -> BodyCopy {
        BodyCopy::within(
            max,
            Some(Held {
                shared: Arc::clone(self),
                bytes: 0,
            }),
        )
    }

    /// Queues a job for the writer (dropped, its memory given back, once the dumper has
    /// closed).
    fn queue(&self, job: Job) {
        let mut q = self.lock();
        if q.closed {
            drop(q);
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.more.notify_one();
    }

    fn write(&self, job: Job) {
        let name = job.name.clone();
        // The memory stays counted until the file is written.
        let (value, _held) = job.into_value();
        if let Err(e) = write_file(self.dir.as_fd(), &name, &value)
            && !self.failed.swap(true, Ordering::Relaxed)
        {
            let reason = e.to_string();
            self.logger.event(
                LogLevel::Warn,
                "writing a dump file failed; proxying continues (reported once)",
                &[("file", &name), ("reason", &reason)],
            );
        }
    }
}

/// The dump writer thread: writes queued jobs in order until the queue closes and empties.
fn write_jobs(shared: &Shared) {
    let mut q = shared.lock();
    loop {
        if let Some(job) = q.jobs.pop_front() {
            q.busy = true;
            drop(q);
            #[cfg(test)]
            let _disk = shared.stall.lock().unwrap_or_else(|e| e.into_inner());
            // Written, then dropped (its memory given back) before the next is taken.
            shared.write(job);
            if shared.budget.used.load(Ordering::Acquire) <= shared.budget.limit / 2 {
                shared.pressed.store(false, Ordering::Release);
            }
            q = shared.lock();
            q.busy = false;
            continue;
        }
        shared.idle.notify_all();
        if q.closed {
            break;
        }
        q = shared.more.wait(q).unwrap_or_else(|e| e.into_inner());
    }
    q.gone = true;
    drop(q);
    shared.idle.notify_all();
}

/// Writes dump files into one directory, from a thread of its own, at most
/// `--dump-max-memory` held in dumps at a time.
#[derive(Debug)]
pub struct Dumper {
    shared: Arc<Shared>,
    next: AtomicU64,
    max_body: usize,
}

/// The dump directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("cannot use --dump-dir {path}: {source}")]
pub struct DumpDirError {
    path: PathBuf,
    source: io::Error,
}

impl Dumper {
    /// Creates `dir` (0700) if needed, opens it (refusing a symbolic link) and starts the
    /// writer thread. Warns when an existing directory is open to others or owned by
    /// another user.
    pub fn new(
        dir: &Path,
        max_body: usize,
        max_memory: usize,
        logger: Logger,
    ) -> Result<Self, DumpDirError> {
        let err = |source| DumpDirError {
            path: dir.to_path_buf(),
            source,
        };
        let symlink = || {
            err(io::Error::other(
                "it is a symbolic link; give the directory's own path (a link is not followed \
                 there, so that nobody who can change it redirects the dumps)",
            ))
        };
        let not_dir = || err(io::Error::other("it exists and is not a directory"));
        // `dumps/` and `dumps/.` name what a link `dumps` points to: the checks below look
        // at the last name itself.
        let dir: PathBuf = dir.components().collect();
        if !matches!(
            dir.components().next_back(),
            Some(Component::Normal(_) | Component::CurDir)
        ) {
            return Err(err(io::Error::other(
                "give the directory by its own name (not `/` and not ending in `..`)",
            )));
        }
        let is_link = |d: &Path| fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_symlink());
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => return Err(symlink()),
            Ok(m) if !m.is_dir() => return Err(not_dir()),
            _ => {}
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(err)?;
        // Held open from here on: a later swap of the path cannot move the files.
        let handle = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&dir)
            .map_err(|e| match open_failure(e.raw_os_error(), || is_link(&dir)) {
                OpenFailure::Link => symlink(),
                OpenFailure::NotDir => not_dir(),
                OpenFailure::Other => err(e),
            })?;
        let meta = handle.metadata().map_err(err)?;
        if meta.uid() != crate::sys::effective_uid() {
            logger.event(
                LogLevel::Warn,
                "dump directory is owned by another user, who can delete or rename dump files \
                 (not read them: they are 0600); consider a directory of your own",
                &[("owner_uid", &meta.uid().to_string())],
            );
        }
        if meta.mode() & 0o077 != 0 {
            logger.event(
                LogLevel::Warn,
                "dump directory is accessible to other users; dump files are 0600 but consider chmod 700",
                &[],
            );
        }
        let shared = Arc::new(Shared {
            dir: handle,
            budget: Budget {
                limit: max_memory,
                used: AtomicUsize::new(0),
            },
            queue: Mutex::new(Queue::default()),
            more: Condvar::new(),
            idle: Condvar::new(),
            failed: AtomicBool::new(false),
            pressed: AtomicBool::new(false),
            skipped: AtomicU64::new(0),
            logger,
            #[cfg(test)]
            stall: Mutex::new(()),
            #[cfg(test)]
            reported: AtomicUsize::new(0),
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("dump-writer".into())
            .spawn(move || write_jobs(&writer))
            .map_err(err)?;
        Ok(Self {
            shared,
            next: AtomicU64::new(1),
            max_body,
        })
    }

    /// Starts dumping one exchange: the request half (fill its body; written when finished
    /// or dropped) and the slot for the response half. `None` (counted) when the memory
    /// budget has no room even for the request's head.
    pub fn begin(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
    ) -> Option<(RequestDump, ResponseSlot)> {
        let head = self
            .shared
            .hold_head(head_cost(headers) + url.len() + method.as_str().len())?;
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let prefix = format!("{seq:06}-{ms}");
        let slot = ResponseSlot {
            shared: Arc::clone(&self.shared),
            max_body: self.max_body,
            name: format!("{prefix}-response.json"),
        };
        let mut fields = serde_json::Map::new();
        fields.insert("method".into(), Value::from(method.as_str()));
        fields.insert("url".into(), Value::from(url));
        fields.insert("headers".into(), Value::from(dump_headers(headers)));
        let req = RequestDump(Half::new(
            Arc::clone(&self.shared),
            format!("{prefix}-request.json"),
            fields,
            head,
            self.max_body,
        ));
        Some((req, slot))
    }

    /// Exchanges not dumped (or dumps dropped) because the memory budget was full or the
    /// dumper had closed.
    pub fn skipped(&self) -> u64 {
        self.shared.skipped.load(Ordering::Relaxed)
    }

    /// Whether an episode of memory pressure is under way (it has been reported).
    #[cfg(test)]
    fn pressed(&self) -> bool {
        self.shared.pressed.load(Ordering::Acquire)
    }

    /// The memory dumps hold now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.shared.budget.used.load(Ordering::Acquire)
    }

    /// Waits up to `limit` until every queued dump has been written; whether it was.
    pub fn wait_written(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut q = self.shared.lock();
        while !(q.gone || (q.jobs.is_empty() && !q.busy)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            q = self
                .shared
                .idle
                .wait_timeout(q, left)
                .map_or_else(|e| e.into_inner().0, |(q, _)| q);
        }
        true
    }

    /// Takes no more dumps and waits up to `limit` for the queued ones to be written;
    /// whether they were.
    pub fn close(&self, limit: Duration) -> bool {
        self.shared.lock().closed = true;
        self.shared.more.notify_all();
        self.wait_written(limit)
    }
}

impl Drop for Dumper {
    fn drop(&mut self) {
        // The writer finishes what is queued, then ends.
        self.shared.lock().closed = true;
        self.shared.more.notify_all();
    }
}

/// Why opening the dump directory failed, as the refusal names it.
#[derive(Debug, PartialEq, Eq)]
enum OpenFailure {
    Link,
    NotDir,
    Other,
}

/// Names an `open(O_DIRECTORY|O_NOFOLLOW)` failure: on a symbolic link (one put there after
/// the check) Linux says `ENOTDIR`, not `ELOOP`, so the path is looked at again.
fn open_failure(errno: Option<i32>, is_link: impl Fn() -> bool) -> OpenFailure {
    match errno {
        Some(libc::ELOOP | libc::ENOTDIR) if is_link() => OpenFailure::Link,
        Some(libc::ENOTDIR) => OpenFailure::NotDir,
        _ => OpenFailure::Other,
    }
}

/// About what a head's headers cost in a queued dump.
fn head_cost(headers: &HeaderMap) -> usize {
    headers.iter().fold(PER_DUMP, |n, (name, value)| {
        n + name.as_str().len() + value.len() + PER_FIELD
    })
}

/// Writes `value` as the new file `name` (0600) in the directory `dir`: first under a
/// hidden name (`.NAME.partial`), then renamed, so that a file under its own name is always
/// complete (a reader of the directory never sees one half-written).
fn write_file(dir: BorrowedFd<'_>, name: &str, value: &Value) -> io::Result<()> {
    let partial = format!(".{name}.partial");
    let f = crate::sys::create_in(dir, &partial, 0o600)?;
    let mut out = io::BufWriter::with_capacity(64 << 10, f);
    let written = serde_json::to_writer_pretty(&mut out, value)
        .map_err(io::Error::other)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    drop(out);
    let published = written.and_then(|()| crate::sys::publish_in(dir, &partial, name));
    if published.is_err() {
        // No half-written file left behind (a full disk, the file-size limit), nor one that
        // could not take its name.
        let _ = crate::sys::remove_in(dir, &partial);
    }
    published
}

/// One file's worth of an exchange: its head, and the body as it is copied.
#[derive(Debug)]
struct Half {
    shared: Arc<Shared>,
    parts: Option<(String, serde_json::Map<String, Value>, Held)>,
    body: Option<BodyCopy>,
}

impl Half {
    fn new(
        shared: Arc<Shared>,
        name: String,
        fields: serde_json::Map<String, Value>,
        head: Held,
        max_body: usize,
    ) -> Self {
        Self {
            body: Some(shared.body(max_body)),
            shared,
            parts: Some((name, fields, head)),
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.body {
            b.push(chunk);
        }
    }

    /// Queues the file (once).
    fn finish(&mut self, stream_error: Option<&'static str>) {
        let (Some((name, fields, head)), Some(body)) = (self.parts.take(), self.body.take()) else {
            return;
        };
        self.shared.queue(Job {
            name,
            fields,
            body,
            stream_error,
            head,
        });
    }
}

/// The request half of one exchange's dump; written when finished or dropped.
#[derive(Debug)]
pub struct RequestDump(Half);

impl RequestDump {
    /// Copies a chunk of the request body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.0.push(chunk);
    }

    /// Queues the request file now (also done on drop).
    pub fn finish(&mut self) {
        self.0.finish(None);
    }
}

impl Drop for RequestDump {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Where the response half of one exchange's dump will go.
#[derive(Debug)]
pub struct ResponseSlot {
    shared: Arc<Shared>,
    max_body: usize,
    name: String,
}

impl ResponseSlot {
    /// Starts the response half once the status and headers are known; `None` (counted)
    /// when the memory budget has no room for its head.
    pub fn open(self, status: StatusCode, headers: &HeaderMap) -> Option<ResponseDump> {
        let head = self.shared.hold_head(head_cost(headers))?;
        let mut fields = serde_json::Map::new();
        fields.insert("status".into(), Value::from(status.as_u16()));
        fields.insert("headers".into(), Value::from(dump_headers(headers)));
        Some(ResponseDump(Half::new(
            self.shared,
            self.name,
            fields,
            head,
            self.max_body,
        )))
    }
}

/// The response half of one exchange's dump; written when finished or dropped.
#[derive(Debug)]
pub struct ResponseDump(Half);

impl ResponseDump {
    /// Copies a chunk of the response body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.0.push(chunk);
    }

    /// Copies a whole fixed body and queues the file.
    pub fn finish_with(mut self, body: &Bytes) {
        self.push(body);
        self.finish(None);
    }

    /// Queues the response file now (also done on drop); `broken` says why a stream did
    /// not end cleanly.
    pub fn finish(&mut self, broken: Option<&'static str>) {
        self.0.finish(broken);
    }
}

impl Drop for ResponseDump {
    fn drop(&mut self) {
        self.finish(Some("the response was not completed"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;
    use http::HeaderValue;

    #[test]
    fn redaction_rules() {
        for name in [
            "Authorization",
            "x-proxy-token",
            "Proxy-Authorization",
            "API-Key",
            "Cookie",
            "set-cookie",
            "x-my-cookie-thing",
        ] {
            assert!(is_redacted_header(name), "{name}");
        }
        for name in [
            "content-type",
            "x-request-id",
            "openai-organization",
            "session_id",
            "openai-beta",
        ] {
            assert!(!is_redacted_header(name), "{name}");
        }
    }

    #[test]
    fn body_copies_are_bounded_and_marked() {
        let mut c = BodyCopy::new(4);
        c.push(b"{\"a\"");
        c.push(b":1}");
        let mut obj = serde_json::Map::new();
        c.into_fields(&mut obj);
        assert_eq!(obj["body"], "{\"a\"");
        assert_eq!(obj["body_truncated"], true);
        assert_eq!(obj["body_bytes"], 7);
        let mut c = BodyCopy::new(100);
        c.push(b"{\"a\":1}");
        let mut obj = serde_json::Map::new();
        c.into_fields(&mut obj);
        assert_eq!(obj["body"], json!({"a": 1}));
        assert!(!obj.contains_key("body_truncated"));
    }

    #[test]
    fn writes_redacted_files_with_private_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ddir = dir.path().join("dumps");
        let dumper = Arc::new(quiet_dumper(&ddir).expect("dumper"));
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let (mut req, slot) = dumper
            .begin(&Method::POST, "/v1/responses", &h)
            .expect("room");
        req.push(b"{\"model\":\"m\"}");
        let mut resp = slot.open(StatusCode::OK, &h).expect("room");
        req.finish();
        resp.push(b"data: x\n\n");
        resp.finish(None);
        drop(resp);
        drop(req);
        assert!(dumper.wait_written(Duration::from_secs(5)));
        assert_eq!(dumper.held(), 0);
        assert_eq!(fs::metadata(&ddir).expect("dir").mode() & 0o777, 0o700);
        let mut names: Vec<_> = fs::read_dir(&ddir)
            .expect("ls")
            .map(|e| e.expect("e").path())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2);
        let req_file = fs::read_to_string(&names[0]).expect("read");
        assert!(names[0].to_string_lossy().ends_with("-request.json"));
        assert!(
            names[0]
                .file_name()
                .expect("n")
                .to_string_lossy()
                .starts_with("000001-")
        );
        let v: Value = serde_json::from_str(&req_file).expect("json");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["url"], "/v1/responses");
        assert_eq!(v["body"], json!({"model": "m"}));
        assert_eq!(
            v["headers"][0],
            json!({"name": "authorization", "value": "[REDACTED]"})
        );
        assert!(!req_file.contains("Bearer tok"));
        let v: Value =
            serde_json::from_str(&fs::read_to_string(&names[1]).expect("read")).expect("json");
        assert_eq!(v["status"], 200);
        assert_eq!(v["body"], "data: x\n\n");
        for n in &names {
            assert_eq!(fs::metadata(n).expect("meta").mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn an_open_failure_on_a_link_is_named_as_a_link() {
        // What the kernel says for O_DIRECTORY|O_NOFOLLOW on a link to a directory.
        let tmp = tempfile::tempdir().expect("tempdir");
        let link = tmp.path().join("l");
        std::os::unix::fs::symlink(tmp.path(), &link).expect("symlink");
        let e = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&link)
            .expect_err("a link");
        let is_link = || fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        assert_eq!(open_failure(e.raw_os_error(), is_link), OpenFailure::Link);
        for (errno, link, want) in [
            (Some(libc::ELOOP), true, OpenFailure::Link),
            (Some(libc::ENOTDIR), false, OpenFailure::NotDir),
            (Some(libc::ELOOP), false, OpenFailure::Other),
            (Some(libc::EACCES), true, OpenFailure::Other),
            (None, true, OpenFailure::Other),
        ] {
            assert_eq!(open_failure(errno, || link), want, "{errno:?} {link}");
        }
    }

    fn quiet_dumper(dir: &Path) -> Result<Dumper, DumpDirError> {
        dumper_of(dir, 1024, 1 << 20)
    }

    /// A dumper whose warnings go nowhere, with these limits.
    fn dumper_of(dir: &Path, max_body: usize, max_memory: usize) -> Result<Dumper, DumpDirError> {
        Dumper::new(
            dir,
            max_body,
            max_memory,
            Logger::new(LogFormat::Text, LogLevel::Error),
        )
    }

    fn dump_one(dumper: &Dumper) {
        let (mut req, slot) = dumper
            .begin(&Method::POST, "/v1/responses", &HeaderMap::new())
            .expect("room");
        req.push(b"{}");
        req.finish();
        drop(slot);
        drop(req);
        assert!(dumper.wait_written(Duration::from_secs(5)));
    }

    #[test]
    fn the_directory_is_held_from_start_up_and_a_link_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let decoy = tmp.path().join("decoy");
        fs::create_dir(&decoy).expect("mkdir");
        let ddir = tmp.path().join("dumps");
        let dumper = quiet_dumper(&ddir).expect("dumper");
        // Someone who can write the parent swaps the path for a link to their own choice.
        let moved = tmp.path().join("moved");
        fs::rename(&ddir, &moved).expect("rename");
        std::os::unix::fs::symlink(&decoy, &ddir).expect("symlink");
        dump_one(&dumper);
        assert_eq!(
            fs::read_dir(&decoy).expect("ls").count(),
            0,
            "nothing follows the link"
        );
        assert_eq!(
            read_dump(&moved, "-request.json").len(),
            1,
            "written where it was opened"
        );

        // At start-up a link is refused, whether or not it points at a directory, and
        // however the path is spelt.
        let dangling = tmp.path().join("dangling");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).expect("symlink");
        let spellings = [
            ddir.clone(),
            PathBuf::from(format!("{}/", ddir.display())),
            ddir.join("."),
            PathBuf::from(format!("{}//.//", ddir.display())),
            dangling,
        ];
        for link in &spellings {
            let e = quiet_dumper(link).expect_err("a link").to_string();
            assert!(e.contains("symbolic link"), "{e}");
        }
        for odd in [ddir.join(".."), PathBuf::from("/")] {
            let e = quiet_dumper(&odd).expect_err("no name").to_string();
            assert!(e.contains("own name"), "{e}");
        }
        assert!(!tmp.path().join("nowhere").exists());
        let file = tmp.path().join("file");
        fs::write(&file, b"x").expect("write");
        let e = quiet_dumper(&file).expect_err("a file").to_string();
        assert!(e.contains("not a directory"), "{e}");
    }

    fn read_dump(dir: &Path, suffix: &str) -> Vec<Value> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("e").path())
            .filter(|p| p.to_string_lossy().ends_with(suffix))
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| serde_json::from_str(&fs::read_to_string(n).expect("read")).expect("json"))
            .collect()
    }

    #[test]
    fn room_grows_by_doubling_within_the_body_bound() {
        // (has, keep, max) -> room
        for (has, keep, max, room) in [
            (0, 10, 1 << 20, FIRST_ROOM),
            (0, 10, 100, 100),
            (0, 20_000, 1 << 20, 20_000),
            (8192, 8193, 1 << 20, 16_384),
            (8192, 40_000, 1 << 20, 40_000),
            (600_000, 600_001, 1 << 20, 1 << 20),
            (
                usize::MAX / 2 + 1,
                usize::MAX / 2 + 2,
                usize::MAX,
                usize::MAX,
            ),
        ] {
            assert_eq!(room_wanted(has, keep, max), room, "{has} {keep} {max}");
        }
    }

    /// A copy's share of the budget is exactly the room it has allocated, however often it
    /// grows, and all of it is given back with the copy: what `--dump-max-memory` bounds is
    /// what the dumps hold.
    #[test]
    fn a_copy_holds_exactly_the_room_it_allocated_and_gives_it_all_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = dumper_of(dir.path(), 1 << 20, 4 << 20).expect("dumper");
        let mut copy = dumper.shared.body(1 << 20);
        let mut len = 0;
        let room = |c: &BodyCopy| c.held.as_ref().map_or(0, |h| h.bytes);
        for n in [100, 8 << 10, 1, 20_000, 50_000, 3] {
            copy.push(&vec![b'a'; n]);
            len += n;
            assert_eq!(copy.bytes.len(), len);
            assert_eq!(
                dumper.held(),
                room(&copy),
                "the budget counts the copy's room"
            );
            assert_eq!(
                copy.bytes.capacity(),
                room(&copy),
                "which is what it allocated"
            );
        }
        // Filling the room exactly does not grow it.
        let before = room(&copy);
        copy.push(&vec![b'a'; before - len]);
        assert_eq!((copy.bytes.len(), room(&copy)), (before, before));
        assert_eq!(dumper.held(), before);
        assert!(copy.cut.is_none());
        drop(copy);
        assert_eq!(dumper.held(), 0, "all given back");
    }

    /// A response dump that is dropped before it was finished is still written, and says
    /// that the response was not completed; a fixed body is written whole.
    #[test]
    fn an_unfinished_response_dump_is_written_and_marked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = quiet_dumper(dir.path()).expect("dumper");
        let h = HeaderMap::new();
        for (url, fixed) in [("/a", false), ("/b", true)] {
            let (req, slot) = dumper.begin(&Method::POST, url, &h).expect("room");
            drop(req);
            let mut resp = slot.open(StatusCode::BAD_GATEWAY, &h).expect("room");
            if fixed {
                resp.finish_with(&Bytes::from_static(b"{\"error\":1}"));
            } else {
                resp.push(b"{\"part");
                drop(resp);
            }
        }
        assert!(dumper.wait_written(Duration::from_secs(5)));
        let resps = read_dump(dir.path(), "-response.json");
        assert_eq!(resps.len(), 2);
        assert_eq!(resps[0]["status"], 502);
        assert_eq!(resps[0]["body"], "{\"part");
        assert_eq!(resps[0]["stream_error"], "the response was not completed");
        assert_eq!(resps[1]["body"], serde_json::json!({"error": 1}));
        assert!(resps[1].get("stream_error").is_none());
    }

    /// A dumper dropped without being closed (there is no such path in the proxy, which
    /// closes it at exit) still has what is queued written, and its writer thread ends.
    #[test]
    fn a_dropped_dumper_writes_what_is_queued_and_its_writer_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = quiet_dumper(dir.path()).expect("dumper");
        let (mut a, _) = dumper
            .begin(&Method::POST, "/a", &HeaderMap::new())
            .expect("room");
        a.push(b"{}");
        a.finish();
        let shared = Arc::clone(&dumper.shared);
        drop(dumper);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut q = shared.lock();
        while !q.gone {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the writer did not end");
            q = shared.idle.wait_timeout(q, left).expect("lock").0;
        }
        drop(q);
        assert_eq!(read_dump(dir.path(), "-request.json").len(), 1);
    }

    /// An exchange's head (its fields, URL and method) is counted when it begins; an
    /// episode of pressure lasts until the dumps hold half the budget or less, not merely
    /// until one of them is written.
    #[test]
    fn heads_are_counted_and_pressure_lasts_until_half_the_budget_is_free() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = dumper_of(dir.path(), 1 << 20, 64 << 10).expect("dumper");
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().expect("value"));
        let (mut b, _) = dumper.begin(&Method::POST, "/b", &h).expect("room");
        let head = PER_DUMP + "content-type".len() + "application/json".len() + PER_FIELD;
        assert_eq!(dumper.held(), head + "/b".len() + "POST".len());
        b.push(&vec![b'b'; 40 << 10]);
        let (mut a, _) = dumper.begin(&Method::GET, "/a", &h).expect("room");
        a.push(&vec![b'a'; 32 << 10]);
        assert!(dumper.pressed());
        a.finish();
        assert!(dumper.wait_written(Duration::from_secs(5)));
        // `b` still holds more than half of the budget: the episode goes on.
        assert!(dumper.held() > 32 << 10);
        assert!(dumper.pressed());
        b.finish();
        assert!(dumper.wait_written(Duration::from_secs(5)));
        assert!(!dumper.pressed());
        assert_eq!(dumper.held(), 0);
        assert_eq!(dumper.shared.reported.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn dumps_together_hold_at_most_the_memory_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = 64 << 10;
        let dumper = dumper_of(dir.path(), 1 << 20, budget).expect("dumper");
        let h = HeaderMap::new();
        let chunk = vec![b'a'; 16 << 10];
        let (mut a, _) = dumper.begin(&Method::POST, "/a", &h).expect("room");
        let (mut b, _) = dumper.begin(&Method::POST, "/b", &h).expect("room");
        for _ in 0..3 {
            a.push(&chunk);
        }
        assert!(dumper.held() <= budget);
        for _ in 0..3 {
            b.push(&chunk);
            assert!(dumper.held() <= budget, "{}", dumper.held());
        }
        // `b` was cut, and that was reported (once); whatever room frees up later, it keeps
        // nothing more (no holes).
        assert!(dumper.pressed());
        assert_eq!(dumper.shared.reported.load(Ordering::Relaxed), 1);
        a.finish();
        assert!(dumper.wait_written(Duration::from_secs(5)));
        // Drained to half or less: the next shortage is a new episode, reported again.
        assert!(!dumper.pressed());
        b.push(b"more");
        b.finish();
        assert!(dumper.wait_written(Duration::from_secs(5)));
        assert_eq!(dumper.held(), 0, "all memory given back once written");
        let reqs = read_dump(dir.path(), "-request.json");
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0]["body"].as_str().map(str::len), Some(48 << 10));
        assert!(reqs[0].get("body_truncated").is_none());
        let kept = reqs[1]["body"].as_str().unwrap_or_default();
        assert!(!kept.is_empty() && kept.len() < 16 << 10, "{}", kept.len());
        assert!(
            kept.bytes().all(|c| c == b'a'),
            "nothing kept after the cut"
        );
        assert_eq!(reqs[1]["body_truncated"], true);
        assert_eq!(reqs[1]["body_bytes"], (48 << 10) + 4);
        assert_eq!(reqs[1]["body_truncated_by"], "--dump-max-memory");
        // With the memory back, a new exchange is copied whole again.
        let (mut c, _) = dumper.begin(&Method::POST, "/c", &h).expect("room");
        c.push(&chunk);
        c.finish();
        assert!(dumper.wait_written(Duration::from_secs(5)));
        let reqs = read_dump(dir.path(), "-request.json");
        assert_eq!(reqs[2]["body"].as_str().map(str::len), Some(16 << 10));
        // The next shortage is a new episode, reported again (once).
        let (mut d, _) = dumper.begin(&Method::POST, "/d", &h).expect("room");
        for _ in 0..6 {
            d.push(&chunk);
        }
        assert!(dumper.pressed());
        assert_eq!(dumper.shared.reported.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn an_exchange_with_no_room_for_its_head_is_not_dumped_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = dumper_of(dir.path(), 1 << 20, 64 << 10).expect("dumper");
        let h = HeaderMap::new();
        let (mut a, slot) = dumper.begin(&Method::POST, "/a", &h).expect("room");
        a.push(&vec![b'a'; 64 << 10]);
        assert!(dumper.begin(&Method::POST, "/b", &h).is_none());
        assert!(slot.open(StatusCode::OK, &h).is_none());
        assert_eq!(dumper.skipped(), 2);
        drop(a);
        assert!(dumper.wait_written(Duration::from_secs(5)));
        assert_eq!(dumper.held(), 0);
        assert!(dumper.begin(&Method::POST, "/c", &h).is_some());
        // Once closed, dumps are no longer taken, and their memory is given back.
        assert!(dumper.close(Duration::from_secs(5)));
        let (mut d, _) = dumper.begin(&Method::POST, "/d", &h).expect("room");
        d.push(b"x");
        d.finish();
        assert_eq!(dumper.held(), 0);
        assert_eq!(dumper.skipped(), 3);
        assert_eq!(read_dump(dir.path(), "-request.json").len(), 2);
    }

    #[test]
    fn closing_with_a_slow_disk_says_not_all_was_written_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dumper = dumper_of(dir.path(), 1 << 20, 1 << 20).expect("dumper");
        let h = HeaderMap::new();
        let disk = dumper.shared.stall.lock().expect("stall");
        let (mut a, _) = dumper.begin(&Method::POST, "/a", &h).expect("room");
        a.push(b"{}");
        a.finish();
        // The writer cannot write: closing waits its limit and says so.
        assert!(!dumper.close(Duration::from_millis(100)));
        assert!(read_dump(dir.path(), "-request.json").is_empty());
        // One begun after closing is not written.
        let (mut b, _) = dumper.begin(&Method::POST, "/b", &h).expect("begun");
        b.push(b"{}");
        b.finish();
        assert_eq!(dumper.skipped(), 1);
        // The disk catches up: what was queued is still written.
        drop(disk);
        assert!(dumper.wait_written(Duration::from_secs(10)));
        let reqs = read_dump(dir.path(), "-request.json");
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0]["url"], "/a");
    }

    #[test]
    fn a_dump_file_appears_under_its_name_only_complete_and_never_replaces_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = fs::File::open(dir.path()).expect("open");
        let value = serde_json::json!({"a": "b"});
        write_file(held.as_fd(), "x.json", &value).expect("written");
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(d)
                .expect("ls")
                .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(dir.path()), ["x.json"], "the hidden name is gone");
        let text = fs::read_to_string(dir.path().join("x.json")).expect("read");
        assert_eq!(serde_json::from_str::<Value>(&text).expect("json"), value);
        // A file already under the name is kept, and the new one's hidden copy removed.
        let e = write_file(held.as_fd(), "x.json", &serde_json::json!({})).expect_err("taken");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(names(dir.path()), ["x.json"]);
        assert_eq!(
            fs::read_to_string(dir.path().join("x.json")).expect("read"),
            text
        );
    }

    #[test]
    fn a_cut_body_that_is_not_utf8_is_written_lossily() {
        let mut c = BodyCopy::new(3);
        c.push("éé".as_bytes());
        let mut obj = serde_json::Map::new();
        c.into_fields(&mut obj);
        assert_eq!(obj["body"], "é\u{fffd}");
        assert_eq!(obj["body_truncated_by"], "--dump-max-body");
    }
}
