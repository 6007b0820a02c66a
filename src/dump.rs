//! `--dump-dir`: each forwarded exchange written as `NNNNNN-<unix_ms>-request.json` and
//! `NNNNNN-<unix_ms>-response.json` (the codex proxy's format: method, url, headers as
//! `[{"name","value"}]`, body as JSON when it parses, else a string).
//!
//! The directory is created 0700 and files 0600 (`O_EXCL|O_NOFOLLOW`). Credential headers
//! are written as `[REDACTED]`. Body copies are bounded; a cut body is marked. A dump that
//! fails is logged once and never affects the proxied exchange.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// A bounded copy of a body.
#[derive(Debug, Default)]
pub struct BodyCopy {
    bytes: Vec<u8>,
    total: u64,
    max: usize,
}

impl BodyCopy {
    /// A copy that keeps at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            bytes: Vec::new(),
            total: 0,
            max,
        }
    }

    /// Appends a chunk (up to the bound).
    pub fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.max.saturating_sub(self.bytes.len());
        self.bytes
            .extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Adds `body` (and, when cut, `body_truncated` and `body_bytes`) to `obj`.
    fn into_fields(self, obj: &mut serde_json::Map<String, Value>) {
        let truncated = self.total > self.bytes.len() as u64;
        let body = if truncated {
            Value::String(String::from_utf8_lossy(&self.bytes).into_owned())
        } else {
            serde_json::from_slice(&self.bytes).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&self.bytes).into_owned())
            })
        };
        obj.insert("body".into(), body);
        if truncated {
            obj.insert("body_truncated".into(), Value::Bool(true));
            obj.insert("body_bytes".into(), Value::from(self.total));
        }
    }
}

/// Writes dump files into one directory.
#[derive(Debug)]
pub struct Dumper {
    dir: PathBuf,
    next: AtomicU64,
    max_body: usize,
    failed: AtomicBool,
    logger: Logger,
}

/// The dump directory could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("cannot use --dump-dir {path}: {source}")]
pub struct DumpDirError {
    path: PathBuf,
    source: io::Error,
}

impl Dumper {
    /// Creates `dir` (0700) if needed. Warns when an existing directory is open to others.
    pub fn new(dir: &Path, max_body: usize, logger: Logger) -> Result<Self, DumpDirError> {
        let err = |source| DumpDirError {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
        let meta = fs::metadata(dir).map_err(err)?;
        if !meta.is_dir() {
            return Err(err(io::Error::other("not a directory")));
        }
        if meta.mode() & 0o077 != 0 {
            logger.event(
                LogLevel::Warn,
                "dump directory is accessible to other users; dump files are 0600 but consider chmod 700",
                &[],
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            next: AtomicU64::new(1),
            max_body,
            failed: AtomicBool::new(false),
            logger,
        })
    }

    /// Starts dumping one exchange: the request half (fill its body; written when finished
    /// or dropped) and the slot for the response half.
    pub fn begin(
        self: &Arc<Self>,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
    ) -> (RequestDump, ResponseSlot) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let prefix = format!("{seq:06}-{ms}");
        let slot = ResponseSlot {
            dumper: Arc::clone(self),
            name: format!("{prefix}-response.json"),
        };
        let req = RequestDump {
            dumper: Arc::clone(self),
            name: format!("{prefix}-request.json"),
            method: method.as_str().to_string(),
            url: url.to_string(),
            headers: dump_headers(headers),
            body: Some(BodyCopy::new(self.max_body)),
        };
        (req, slot)
    }

    fn write(self: &Arc<Self>, name: String, value: Value) {
        let this = Arc::clone(self);
        let job = move || {
            let path = this.dir.join(&name);
            if let Err(e) = write_file(&path, &value)
                && !this.failed.swap(true, Ordering::Relaxed)
            {
                let reason = e.to_string();
                this.logger.event(
                    LogLevel::Warn,
                    "writing a dump file failed; proxying continues (reported once)",
                    &[("file", &name), ("reason", &reason)],
                );
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(job)),
            Err(_) => job(),
        }
    }
}

fn write_file(path: &Path, value: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(&bytes)
}

/// The request half of one exchange's dump; written when finished or dropped.
#[derive(Debug)]
pub struct RequestDump {
    dumper: Arc<Dumper>,
    name: String,
    method: String,
    url: String,
    headers: Vec<Value>,
    body: Option<BodyCopy>,
}

impl RequestDump {
    /// Copies a chunk of the request body.
    pub fn push(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.body {
            b.push(chunk);
        }
    }

    /// Writes the request file now (also done on drop).
    pub fn finish(&mut self) {
        let Some(body) = self.body.take() else { return };
        let mut obj = serde_json::Map::new();
        obj.insert(
            "method".into(),
            Value::from(std::mem::take(&mut self.method)),
        );
        obj.insert("url".into(), Value::from(std::mem::take(&mut self.url)));
        obj.insert(
            "headers".into(),
            Value::from(std::mem::take(&mut self.headers)),
        );
        body.into_fields(&mut obj);
        self.dumper
            .write(std::mem::take(&mut self.name), Value::Object(obj));
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
    dumper: Arc<Dumper>,
    name: String,
}

impl ResponseSlot {
    /// Starts the response half once the status and headers are known.
    pub fn open(self, status: StatusCode, headers: &HeaderMap) -> ResponseDump {
        ResponseDump {
            body: Some(BodyCopy::new(self.dumper.max_body)),
            dumper: self.dumper,
            name: self.name,
            status: status.as_u16(),
            headers: dump_headers(headers),
        }
    }
}

/// The response half of one exchange's dump; written when finished or dropped.
#[derive(Debug)]
pub struct ResponseDump {
    dumper: Arc<Dumper>,
    name: String,
    status: u16,
    headers: Vec<Value>,
    body: Option<BodyCopy>,
}

impl ResponseDump {
    /// Copies a chunk of the response body.
    pub fn push(&mut self, chunk: &[u8]) {
        if let Some(b) = &mut self.body {
            b.push(chunk);
        }
    }

    /// Copies a whole fixed body and writes the file.
    pub fn finish_with(mut self, body: &Bytes) {
        self.push(body);
        self.finish(None);
    }

    /// Writes the response file now (also done on drop); `broken` says why a stream did
    /// not end cleanly.
    pub fn finish(&mut self, broken: Option<&str>) {
        let Some(body) = self.body.take() else { return };
        let mut obj = serde_json::Map::new();
        obj.insert("status".into(), Value::from(self.status));
        obj.insert(
            "headers".into(),
            Value::from(std::mem::take(&mut self.headers)),
        );
        body.into_fields(&mut obj);
        if let Some(why) = broken {
            obj.insert("stream_error".into(), Value::from(why));
        }
        self.dumper
            .write(std::mem::take(&mut self.name), Value::Object(obj));
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
        let dumper = Arc::new(
            Dumper::new(&ddir, 1024, Logger::new(LogFormat::Text, LogLevel::Error))
                .expect("dumper"),
        );
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        let (mut req, slot) = dumper.begin(&Method::POST, "/v1/responses", &h);
        req.push(b"{\"model\":\"m\"}");
        let mut resp = slot.open(StatusCode::OK, &h);
        req.finish();
        resp.push(b"data: x\n\n");
        resp.finish(None);
        drop(resp);
        drop(req);
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
}
