//! A misbehaving HTTP file server for the web seed (BEP 19) tests: it serves files at given
//! paths, each answered per a script of [`Behaviour`]s (the first request gets the first
//! behaviour, and so on; the last one repeats). One behaviour is honest (206 with a correct
//! `Content-Range`, persistent connections); the others are the faults a web seed client must
//! survive. Every request is recorded with the behaviour it got, so tests can assert that a
//! bad seed was dropped or backed off.
//!
//! std only: a non-blocking accept loop and one thread per connection, at most
//! [`MAX_CONNECTIONS`] of them; every thread polls the stop flag and is joined on drop. Slow
//! and endless replies stop when the server stops or the client goes away, and are capped.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::fake_tracker::gzip;
use super::net::{accept_loop, next_loopback};
use super::{Diagnose, lock, poll_until, show_bytes};

/// Connections served at most (the rest are closed unanswered: the client has gone wild).
pub const MAX_CONNECTIONS: usize = 2_000;
/// A request head larger than this is refused (the connection closed).
const MAX_HEAD: usize = 16 * 1024;
/// An endless body stops after this many bytes even if the client keeps reading.
pub const ENDLESS_CAP: u64 = 256 << 20;
/// How many header bytes [`Behaviour::HugeHeaders`] sends.
pub const HUGE_HEADERS: usize = 64 * 1024;

/// How one request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// 206 with the requested span and a correct `Content-Range` (200 and the whole file
    /// without a `Range`); the connection is kept open for the next request.
    Honest,
    /// 200 and the whole file whatever the `Range` asked.
    IgnoreRange,
    /// 206 whose `Content-Range` (and body) is a span one block away from the one asked.
    WrongContentRange,
    /// 206 with the right headers, half the body, then the connection closes.
    ShortBody,
    /// 200 without a length, then bytes until the client goes away (capped at
    /// [`ENDLESS_CAP`]).
    EndlessBody,
    /// 206 with the right headers, then the body at one byte a second.
    Drip,
    /// 404.
    NotFound,
    /// This status (429 or 503) with `Retry-After: SECS`.
    RetryAfter { status: u16, secs: u32 },
    /// 206 with `Content-Encoding: gzip` and the span gzipped.
    Gzip,
    /// 206 whose head holds [`HUGE_HEADERS`] bytes of filler headers.
    HugeHeaders,
    /// 302 to the same path with a new query, forever.
    RedirectLoop,
    /// 206 with the right headers and length, every byte of the body inverted (the pieces
    /// fail their hash).
    WrongBytes,
}

impl Behaviour {
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::Honest => "honest",
            Behaviour::IgnoreRange => "ignore-range",
            Behaviour::WrongContentRange => "wrong-content-range",
            Behaviour::ShortBody => "short-body",
            Behaviour::EndlessBody => "endless-body",
            Behaviour::Drip => "drip",
            Behaviour::NotFound => "not-found",
            Behaviour::RetryAfter { .. } => "retry-after",
            Behaviour::Gzip => "gzip",
            Behaviour::HugeHeaders => "huge-headers",
            Behaviour::RedirectLoop => "redirect-loop",
            Behaviour::WrongBytes => "wrong-bytes",
        }
    }
}

/// One request the server answered.
#[derive(Debug, Clone)]
pub struct Served {
    /// When the request head had been read.
    pub at: Instant,
    pub from: SocketAddr,
    pub method: String,
    /// The request target as sent (percent-encoded).
    pub target: String,
    /// The path, percent-decoded (the key files are registered under).
    pub path: String,
    /// The `Range` header as sent.
    pub range_header: Option<String>,
    /// What the request got.
    pub behaviour: Behaviour,
    pub status: u16,
    /// Body bytes written (so far, for a reply still being written).
    pub body_bytes: u64,
    /// Other headers of interest (lower-cased names): `accept-encoding`, `user-agent`.
    pub headers: Vec<(String, String)>,
}

impl Served {
    pub fn describe(&self) -> String {
        format!(
            "{:?} ago from {}: {} {} range={:?} -> {} {} ({} body bytes)",
            self.at.elapsed(),
            self.from,
            self.method,
            show_bytes(self.target.as_bytes()),
            self.range_header,
            self.status,
            self.behaviour.name(),
            self.body_bytes
        )
    }
}

struct File {
    data: Arc<Vec<u8>>,
    script: Vec<Behaviour>,
    asked: usize,
}

struct Shared {
    addr: SocketAddr,
    files: Mutex<HashMap<String, File>>,
    served: Mutex<Vec<Served>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

/// The scripted file server; stops (and joins every thread) when dropped.
pub struct WebSeedServer {
    name: String,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WebSeedServer {
    /// Serves nothing yet (every path 404) on a loopback address of its own.
    pub fn start(name: &str) -> WebSeedServer {
        WebSeedServer::start_on(name, next_loopback())
    }

    pub fn start_on(name: &str, ip: Ipv4Addr) -> WebSeedServer {
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("web seed server {name}: cannot bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            addr,
            files: Mutex::default(),
            served: Mutex::default(),
            workers: Mutex::default(),
            stop: Arc::clone(&stop),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let mut connections = 0usize;
            accept_loop(
                listener,
                &format!("webseed-{name}"),
                stop,
                move |stream, from| {
                    if connections >= MAX_CONNECTIONS {
                        return;
                    }
                    connections += 1;
                    let worker = {
                        let shared = Arc::clone(&shared);
                        thread::spawn(move || serve_connection(stream, from, &shared))
                    };
                    lock(&shared.workers).push(worker);
                },
            )
        };
        WebSeedServer {
            name: name.to_owned(),
            shared,
            thread: Some(thread),
        }
    }

    /// Serves `data` at `path` (percent-decoded, starting with `/`), answered per `script`.
    pub fn serve(&self, path: &str, data: &[u8], script: &[Behaviour]) {
        assert!(path.starts_with('/'), "a path starts with /: {path:?}");
        assert!(!script.is_empty(), "a script needs a behaviour");
        lock(&self.shared.files).insert(
            path.to_owned(),
            File {
                data: Arc::new(data.to_vec()),
                script: script.to_vec(),
                asked: 0,
            },
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://IP:PORT` followed by `path` (written as given: encode it first if needed).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.shared.addr)
    }

    /// Every request answered so far, in order.
    pub fn served(&self) -> Vec<Served> {
        lock(&self.shared.served).clone()
    }

    /// How many requests got `behaviour` (compared by kind: any `RetryAfter`).
    pub fn count(&self, behaviour: Behaviour) -> usize {
        self.served()
            .iter()
            .filter(|s| s.behaviour.name() == behaviour.name())
            .count()
    }

    /// How many requests were for `path` (percent-decoded).
    pub fn count_path(&self, path: &str) -> usize {
        self.served().iter().filter(|s| s.path == path).count()
    }

    /// Body bytes written in all.
    pub fn body_bytes(&self) -> u64 {
        self.served().iter().map(|s| s.body_bytes).sum()
    }

    /// Waits until `check` holds for the requests so far; `None` on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        check: impl Fn(&[Served]) -> bool,
    ) -> Option<Vec<Served>> {
        poll_until(timeout, || {
            let served = self.served();
            check(&served).then_some(served)
        })
    }
}

impl Drop for WebSeedServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Diagnose for WebSeedServer {
    fn diagnostics(&self) -> String {
        let served = self.served();
        let mut out = format!(
            "===== web seed server {} on {}: {} request(s) =====\n",
            self.name,
            self.shared.addr,
            served.len()
        );
        if served.len() > 80 {
            let _ = writeln!(out, "  [… {} earlier requests …]", served.len() - 80);
        }
        for s in served.iter().skip(served.len().saturating_sub(80)) {
            let _ = writeln!(out, "  {}", s.describe());
        }
        out
    }
}

// =============================================================================================
// Serving
// =============================================================================================

/// A request head, parsed.
struct Request {
    method: String,
    target: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-decodes a URL path (`+` stays a `+`); malformed escapes stay literal.
pub fn decode_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one request head: `Ok(None)` when the client closed or the server stops first.
fn read_head(stream: &mut TcpStream, stop: &AtomicBool) -> Result<Option<Request>, ()> {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let started = Instant::now();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: the next request on a kept-alive connection must stay unread.
    while !head.ends_with(b"\r\n\r\n") {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
            return Ok(None);
        }
        if head.len() > MAX_HEAD {
            return Err(());
        }
        match stream.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) => head.push(byte[0]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ok(None),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let raw_path = target.split_once('?').map_or(target.as_str(), |(p, _)| p);
    Ok(Some(Request {
        method,
        path: decode_path(raw_path),
        target,
        headers,
    }))
}

/// `bytes=A-B` or `bytes=A-` within a file of `len` bytes: the inclusive span.
fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end: u64 = if b.trim().is_empty() {
        len.checked_sub(1)?
    } else {
        b.trim().parse::<u64>().ok()?.min(len.checked_sub(1)?)
    };
    (start <= end).then_some((start, end))
}

fn serve_connection(mut stream: TcpStream, from: SocketAddr, shared: &Shared) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    loop {
        let request = match read_head(&mut stream, &shared.stop) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(()) => {
                let _ = stream.write_all(
                    b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                return;
            }
        };
        let keep_alive = answer(&mut stream, from, &request, shared);
        if !keep_alive
            || request
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            let _ = stream.shutdown(Shutdown::Write);
            // Let the client read at its pace before the socket goes away.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut sink = [0u8; 1024];
            let _ = stream.read(&mut sink);
            return;
        }
    }
}

/// Records a request; returns its index, to update its body count.
fn record(shared: &Shared, served: Served) -> usize {
    let mut all = lock(&shared.served);
    all.push(served);
    all.len() - 1
}

fn add_body(shared: &Shared, index: usize, n: u64) {
    if let Some(s) = lock(&shared.served).get_mut(index) {
        s.body_bytes += n;
    }
}

/// Answers one request; returns whether the connection may carry another.
fn answer(stream: &mut TcpStream, from: SocketAddr, request: &Request, shared: &Shared) -> bool {
    let picked = {
        let mut files = lock(&shared.files);
        files.get_mut(&request.path).map(|f| {
            let b = f.script[f.asked.min(f.script.len() - 1)];
            f.asked += 1;
            (Arc::clone(&f.data), b)
        })
    };
    let (data, behaviour) = picked.unwrap_or((Arc::new(Vec::new()), Behaviour::NotFound));
    let len = data.len() as u64;
    let range_header = request.header("range").map(str::to_owned);
    let span = range_header.as_deref().and_then(|h| parse_range(h, len));
    let head_only = request.method.eq_ignore_ascii_case("HEAD");
    let interesting = ["accept-encoding", "user-agent", "connection"];
    let mut served = Served {
        at: Instant::now(),
        from,
        method: request.method.clone(),
        target: request.target.clone(),
        path: request.path.clone(),
        range_header: range_header.clone(),
        behaviour,
        status: 0,
        body_bytes: 0,
        headers: request
            .headers
            .iter()
            .filter(|(k, _)| interesting.contains(&k.as_str()))
            .cloned()
            .collect(),
    };
    let (start, end) = span.unwrap_or((0, len.saturating_sub(1)));
    let wanted = if len == 0 {
        &[][..]
    } else {
        &data[start as usize..=end as usize]
    };
    let content_range = format!("bytes {start}-{end}/{len}");
    let partial = span.is_some();
    let ok_status = if partial { 206 } else { 200 };

    // (status, extra headers, body, keep-alive)
    let simple = |status: u16, headers: Vec<String>, body: Vec<u8>, keep: bool| {
        (status, headers, body, keep)
    };
    let (status, headers, body, keep) = match behaviour {
        Behaviour::Honest => {
            let mut h = vec![];
            if partial {
                h.push(format!("Content-Range: {content_range}"));
            }
            simple(ok_status, h, wanted.to_vec(), true)
        }
        Behaviour::IgnoreRange => simple(200, vec![], data.to_vec(), false),
        Behaviour::WrongContentRange => {
            let shift = 16 * 1024u64;
            let (s, e) = if end + shift < len {
                (start + shift, end + shift)
            } else {
                (start.saturating_sub(shift), end.saturating_sub(shift))
            };
            let body = if len == 0 {
                Vec::new()
            } else {
                data[s as usize..=e as usize].to_vec()
            };
            simple(
                206,
                vec![format!("Content-Range: bytes {s}-{e}/{len}")],
                body,
                false,
            )
        }
        Behaviour::NotFound => simple(404, vec![], b"not found\n".to_vec(), false),
        Behaviour::RetryAfter { status, secs } => simple(
            status,
            vec![format!("Retry-After: {secs}")],
            b"busy\n".to_vec(),
            false,
        ),
        Behaviour::Gzip => simple(
            ok_status,
            vec![
                format!("Content-Range: {content_range}"),
                "Content-Encoding: gzip".to_owned(),
            ],
            gzip(wanted),
            false,
        ),
        Behaviour::HugeHeaders => {
            let mut h = Vec::new();
            let mut size = 0;
            let mut i = 0;
            while size < HUGE_HEADERS {
                let line = format!("X-Filler-{i}: {}", "f".repeat(100));
                size += line.len() + 2;
                h.push(line);
                i += 1;
            }
            h.push(format!("Content-Range: {content_range}"));
            simple(ok_status, h, wanted.to_vec(), false)
        }
        Behaviour::RedirectLoop => {
            let n = lock(&shared.served).len();
            let path = request
                .target
                .split_once('?')
                .map_or(request.target.as_str(), |(p, _)| p);
            simple(
                302,
                vec![format!("Location: http://{}{path}?loop={n}", shared.addr)],
                Vec::new(),
                false,
            )
        }
        Behaviour::WrongBytes => simple(
            ok_status,
            vec![format!("Content-Range: {content_range}")],
            wanted.iter().map(|b| !b).collect(),
            false,
        ),
        Behaviour::ShortBody | Behaviour::EndlessBody | Behaviour::Drip => {
            served.status = if behaviour == Behaviour::EndlessBody {
                200
            } else {
                ok_status
            };
            let index = record(shared, served);
            stream_fault(
                stream,
                behaviour,
                ok_status,
                &content_range,
                wanted,
                head_only,
                shared,
                index,
            );
            return false;
        }
    };
    served.status = status;
    let index = record(shared, served);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
        reason(status),
        body.len()
    );
    for h in &headers {
        let _ = write!(head, "{h}\r\n");
    }
    head.push_str(if keep {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    if stream.write_all(head.as_bytes()).is_err() {
        return false;
    }
    if !head_only {
        for chunk in body.chunks(64 * 1024) {
            if shared.stop.load(Ordering::SeqCst) || stream.write_all(chunk).is_err() {
                return false;
            }
            add_body(shared, index, chunk.len() as u64);
        }
    }
    let _ = stream.flush();
    keep
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        404 => "Not Found",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

/// The replies written over time: a short body, an endless one, a drip.
#[allow(clippy::too_many_arguments)]
fn stream_fault(
    stream: &mut TcpStream,
    behaviour: Behaviour,
    ok_status: u16,
    content_range: &str,
    wanted: &[u8],
    head_only: bool,
    shared: &Shared,
    index: usize,
) {
    let stop = || shared.stop.load(Ordering::SeqCst);
    let head = match behaviour {
        Behaviour::EndlessBody => {
            "HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n".to_owned()
        }
        _ => format!(
            "HTTP/1.1 {ok_status} {}\r\nContent-Length: {}\r\nContent-Range: {content_range}\r\n\
             Accept-Ranges: bytes\r\nConnection: close\r\n\r\n",
            reason(ok_status),
            wanted.len()
        ),
    };
    if stream.write_all(head.as_bytes()).is_err() || head_only {
        return;
    }
    match behaviour {
        Behaviour::ShortBody => {
            let half = &wanted[..wanted.len() / 2];
            if stream.write_all(half).is_ok() {
                add_body(shared, index, half.len() as u64);
            }
        }
        Behaviour::EndlessBody => {
            let unit = vec![b'x'; 64 * 1024];
            let mut sent = 0u64;
            while sent < ENDLESS_CAP && !stop() {
                if stream.write_all(&unit).is_err() {
                    break;
                }
                sent += unit.len() as u64;
                add_body(shared, index, unit.len() as u64);
            }
        }
        Behaviour::Drip => {
            for &b in wanted {
                if stream.write_all(&[b]).is_err() {
                    return;
                }
                add_body(shared, index, 1);
                // One byte a second, watching the stop flag (and the client) meanwhile.
                let until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < until {
                    if stop() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        _ => unreachable!("not a streamed fault: {behaviour:?}"),
    }
    let _ = stream.flush();
}
