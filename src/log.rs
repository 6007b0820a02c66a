//! Lines on stderr: one access line per request and a few operational events, as text or
//! JSON. Every field is a value the proxy chose (fixed strings, numbers, a sanitised
//! upstream request id); no header value, body, query string, key or token is ever logged.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::config::{LogFormat, LogLevel};

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
    let (year, month, day, rem) = civil_utc(since_epoch.as_secs());
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
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

fn now() -> String {
    rfc3339_utc(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
    }
}

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
        self.write(LogLevel::Info, "access", fields);
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

    fn write(&self, level: LogLevel, msg: &str, fields: Vec<(&str, Value)>) {
        let line = match self.format {
            LogFormat::Json => {
                let mut m = Map::new();
                m.insert("time".into(), Value::from(now()));
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
                let mut s = format!("{} {} {}", now(), level_name(level), msg);
                for (k, v) in fields {
                    match v {
                        Value::String(text) if is_bare(&text) => {
                            s.push_str(&format!(" {k}={text}"))
                        }
                        Value::String(text) => s.push_str(&format!(" {k}={}", Value::from(text))),
                        other => s.push_str(&format!(" {k}={other}")),
                    }
                }
                s.push('\n');
                s
            }
        };
        // One write per line so concurrent lines do not interleave; a closed stderr is not
        // a reason to disturb proxying.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
    fn levels_filter() {
        let l = Logger::new(LogFormat::Text, LogLevel::Warn);
        assert!(l.enabled(LogLevel::Error));
        assert!(l.enabled(LogLevel::Warn));
        assert!(!l.enabled(LogLevel::Info));
    }
}
