//! Scanning another process's memory for a byte string, through `/proc/PID/maps` and
//! `/proc/PID/mem` (needs root or CAP_SYS_PTRACE for a non-dumpable process). Each hit says
//! where it sits (mapping, address, offset, the mapping's flags) so a stray copy can be
//! tracked down.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

/// One mapping from `/proc/PID/maps` (and its `VmFlags` from smaps).
#[derive(Debug, Clone)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub name: String,
    pub vm_flags: Vec<String>,
}

/// Where a needle was found.
#[derive(Debug, Clone)]
pub struct Hit {
    pub needle: usize,
    pub addr: u64,
    pub mapping: Mapping,
}

impl std::fmt::Display for Hit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.mapping;
        let kind = if m.name.is_empty() {
            "[anonymous]"
        } else {
            m.name.as_str()
        };
        write!(
            f,
            "needle {} at {:#x} in {} {:#x}-{:#x} {} (+{:#x}) flags [{}]",
            self.needle,
            self.addr,
            kind,
            m.start,
            m.end,
            m.perms,
            self.addr - m.start,
            m.vm_flags.join(" ")
        )
    }
}

/// The mappings of `pid`, with smaps flags.
pub fn mappings(pid: u32) -> Vec<Mapping> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            out.push(Mapping {
                start,
                end,
                perms: fields.get(1).unwrap_or(&"").to_string(),
                name: fields.get(5..).map(|n| n.join(" ")).unwrap_or_default(),
                vm_flags: Vec::new(),
            });
        } else if let Some(flags) = line.strip_prefix("VmFlags:")
            && let Some(m) = out.last_mut()
        {
            m.vm_flags = flags.split_whitespace().map(str::to_string).collect();
        }
    }
    out
}

/// Every occurrence of every needle in the readable memory of `pid`.
pub fn scan(pid: u32, needles: &[&[u8]]) -> Vec<Hit> {
    let mut mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem (run as root)");
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut hits = Vec::new();
    for m in mappings(pid) {
        if !m.perms.starts_with('r')
            || m.name == "[vvar]"
            || m.name == "[vsyscall]"
            || m.name == "[vvar_vclock]"
        {
            continue;
        }
        const CHUNK: u64 = 1 << 20;
        let mut pos = m.start;
        let mut carry: Vec<u8> = Vec::new();
        while pos < m.end {
            let len = CHUNK.min(m.end - pos) as usize;
            let mut buf = vec![0u8; len];
            if mem.seek(SeekFrom::Start(pos)).is_err() || mem.read_exact(&mut buf).is_err() {
                carry.clear();
                pos += len as u64;
                continue;
            }
            let base = pos - carry.len() as u64;
            let mut window = std::mem::take(&mut carry);
            window.extend_from_slice(&buf);
            for (i, needle) in needles.iter().enumerate() {
                let mut from = 0;
                while let Some(off) = find(&window[from..], needle) {
                    let at = from + off;
                    hits.push(Hit {
                        needle: i,
                        addr: base + at as u64,
                        mapping: m.clone(),
                    });
                    from = at + 1;
                }
            }
            let keep = (longest - 1).min(window.len());
            carry = window[window.len() - keep..].to_vec();
            pos += len as u64;
        }
    }
    // A needle found across the carry boundary twice is the same hit.
    hits.sort_by_key(|h| (h.addr, h.needle));
    hits.dedup_by_key(|h| (h.addr, h.needle));
    hits
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `VmLck` of `pid` in kB.
pub fn vm_locked_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How HTTP/2 puts `Bearer <key>` on the wire inside the proxy: HPACK, sensitive (never
/// indexed) and Huffman-coded. A memory scan must look for this form too, or it would miss
/// the copy an h2 write buffer holds. Obtained by letting the h2 crate encode it.
pub async fn hpack_huffman_of(value: &str) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
    let (send, conn) = h2::client::handshake(client_io)
        .await
        .expect("h2 handshake");
    let conn_task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.expect("ready");
    let mut v = http::HeaderValue::from_str(value).expect("value");
    v.set_sensitive(true);
    let req = http::Request::post("https://127.0.0.1/v1/responses")
        .header("authorization", v)
        .body(())
        .expect("req");
    let _ = send.send_request(req, true).expect("send");
    let mut wire = Vec::new();
    let mut buf = [0u8; 4096];
    // Never-indexed literal, name = static index 23 (authorization): 0x1f 0x08, then the
    // length with the Huffman bit.
    let found = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let n = server_io.read(&mut buf).await.expect("read");
            assert!(n > 0, "h2 client closed");
            wire.extend_from_slice(&buf[..n]);
            if let Some(p) = wire.windows(2).position(|w| w == [0x1f, 0x08])
                && let Some(&len_byte) = wire.get(p + 2)
            {
                assert!(len_byte & 0x80 != 0, "value not Huffman-coded");
                let len = (len_byte & 0x7f) as usize;
                assert!(len < 127, "test keys are short");
                if wire.len() >= p + 3 + len {
                    return wire[p + 3..p + 3 + len].to_vec();
                }
            }
        }
    })
    .await
    .expect("HEADERS frame in time");
    conn_task.abort();
    found
}
