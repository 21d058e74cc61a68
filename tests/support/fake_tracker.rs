//! Fake trackers: one scripted HTTP server (trackers, and `.torrent` URLs) that records every
//! request and can answer, redirect, stream endlessly or hang; a recording swarm tracker built
//! on it; a scripted UDP tracker (BEP 15); and the reply encoders they share.
//!
//! Server threads poll a stop flag and end when their owner is dropped.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::bencode::B;
use super::net::{accept_loop, next_loopback};
use super::{Diagnose, lock, percent_decode, poll_until, show_bytes};

/// At most this many requests are recorded (and answered) per scripted tracker.
const MAX_REQUESTS: usize = 10_000;

// =============================================================================================
// Reply encoders
// =============================================================================================

/// Compact IPv4 peers (BEP 23): 6 bytes each.
pub fn compact4(peers: &[SocketAddrV4]) -> Vec<u8> {
    compact(peers.iter().map(|p| (p.ip().octets().to_vec(), p.port())))
}

/// Compact IPv6 peers (BEP 7): 18 bytes each.
pub fn compact6(peers: &[SocketAddrV6]) -> Vec<u8> {
    compact(peers.iter().map(|p| (p.ip().octets().to_vec(), p.port())))
}

fn compact(peers: impl Iterator<Item = (Vec<u8>, u16)>) -> Vec<u8> {
    peers
        .flat_map(|(ip, port)| ip.into_iter().chain(port.to_be_bytes()))
        .collect()
}

/// A normal announce reply with compact IPv4 peers.
pub fn announce_reply(interval: i64, peers: &[SocketAddrV4]) -> Vec<u8> {
    B::dict([
        ("interval", B::Int(interval)),
        ("complete", B::Int(1)),
        ("incomplete", B::Int(0)),
        ("peers", B::Bytes(compact4(peers))),
    ])
    .encode()
}

/// A minimal announce reply: an interval and compact peers, nothing else.
pub fn announce_body(interval: i64, peers: &[u8]) -> Vec<u8> {
    B::dict([
        ("interval", B::Int(interval)),
        ("peers", B::Bytes(peers.to_vec())),
    ])
    .encode()
}

/// A whole HTTP/1.1 response with `Content-Length` and `Connection: close`.
pub fn http_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        302 => "Found",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Whatever",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

// =============================================================================================
// gzip and zlib (stored blocks: valid streams, no compressor needed)
// =============================================================================================

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *slot = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// DEFLATE (RFC 1951) made of stored blocks.
fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[][..]]
    } else {
        data.chunks(0xffff).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        out.push(u8::from(i == last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// A gzip member (RFC 1952) holding `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    out.extend_from_slice(&deflate_stored(data));
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

/// A zlib stream (RFC 1950) holding `data`: what `Content-Encoding: deflate` means.
pub fn zlib(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    out.extend_from_slice(&deflate_stored(data));
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

// =============================================================================================
// Scripted HTTP server
// =============================================================================================

/// One request the scripted server read.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// When the request head had been read.
    pub at: Instant,
    /// The TCP source address.
    pub from: SocketAddr,
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    pub path: String,
    /// Query parameters in order, values percent-decoded to raw bytes.
    pub query: Vec<(String, Vec<u8>)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl HttpRequest {
    pub fn param(&self, key: &str) -> Option<&[u8]> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    pub fn param_count(&self, key: &str) -> usize {
        self.query.iter().filter(|(k, _)| k == key).count()
    }

    pub fn text(&self, key: &str) -> Option<String> {
        self.param(key)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn num(&self, key: &str) -> Option<u64> {
        self.text(key)?.parse().ok()
    }

    pub fn port(&self) -> Option<u16> {
        self.text("port")?.parse().ok()
    }

    /// The `event` parameter, or `""` for a periodic announce without one.
    pub fn event(&self) -> String {
        self.text("event").unwrap_or_default()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The request line as sent.
    pub fn request_line(&self) -> String {
        format!("{} {} HTTP/1.1", self.method, self.target)
    }

    pub fn describe(&self) -> String {
        format!(
            "{:?} ago, from {}: {} {}",
            self.at.elapsed(),
            self.from,
            self.method,
            show_bytes(self.target.as_bytes())
        )
    }
}

/// What the scripted server does with a request.
#[derive(Debug, Clone)]
pub enum HttpAction {
    /// Answer with this status, extra headers and body.
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// These exact bytes (status line, headers, body), then close.
    Raw(Vec<u8>),
    /// `prefix`, then `unit` repeated `units` times (or until the client stops reading), then
    /// close. The head is part of `prefix` (or, for an endless head, of `unit`).
    Stream {
        prefix: Vec<u8>,
        unit: Vec<u8>,
        units: u64,
    },
    /// Keep the connection open and never answer (until the server is dropped).
    Hang,
}

impl HttpAction {
    pub fn ok(body: Vec<u8>) -> HttpAction {
        HttpAction::status(200, &body)
    }

    pub fn status(status: u16, body: &[u8]) -> HttpAction {
        HttpAction::Reply {
            status,
            headers: Vec::new(),
            body: body.to_vec(),
        }
    }

    pub fn redirect(location: String) -> HttpAction {
        HttpAction::Reply {
            status: 302,
            headers: vec![("Location".into(), location)],
            body: Vec::new(),
        }
    }

    /// 200 and a body of `len` bytes, with a `Content-Length` if `sized` (else the body ends
    /// when the connection does).
    pub fn bulk(len: u64, sized: bool) -> HttpAction {
        const UNIT: u64 = 64 * 1024;
        let mut prefix = b"HTTP/1.1 200 OK\r\nConnection: close\r\n".to_vec();
        if sized {
            prefix.extend(format!("Content-Length: {len}\r\n").bytes());
        }
        prefix.extend(b"\r\n");
        prefix.extend(std::iter::repeat_n(b'x', (len % UNIT) as usize));
        HttpAction::Stream {
            prefix,
            unit: vec![b'x'; UNIT as usize],
            units: len / UNIT,
        }
    }
}

/// How one streamed reply went.
#[derive(Debug, Clone)]
pub struct StreamLog {
    pub planned: u64,
    pub written: u64,
    pub end: String,
}

/// Decides the answer to one request; the second argument is the request's index among all
/// requests this server has read (0 for the first).
pub type HttpScript = Box<dyn Fn(&HttpRequest, usize) -> HttpAction + Send>;

struct HttpShared {
    requests: Mutex<Vec<HttpRequest>>,
    streams: Mutex<Vec<StreamLog>>,
    script: Mutex<HttpScript>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<AtomicBool>,
}

/// An HTTP/1.1 server on a loopback address of its own, one request per connection, one
/// thread per connection, run by a script.
pub struct HttpTracker {
    name: String,
    pub addr: SocketAddr,
    shared: Arc<HttpShared>,
    thread: Option<JoinHandle<()>>,
}

impl HttpTracker {
    /// Starts a tracker that answers every request with an empty peer list (interval 1800)
    /// until [`HttpTracker::set_script`] says otherwise.
    pub fn start(name: &str) -> HttpTracker {
        HttpTracker::start_on(name, next_loopback())
    }

    pub fn start_on(name: &str, ip: Ipv4Addr) -> HttpTracker {
        let listener = TcpListener::bind((ip, 0))
            .unwrap_or_else(|e| panic!("scripted tracker {name}: cannot bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let default: HttpScript = Box::new(|_, _| HttpAction::ok(announce_reply(1800, &[])));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(HttpShared {
            requests: Mutex::default(),
            streams: Mutex::default(),
            script: Mutex::new(default),
            workers: Mutex::default(),
            stop: Arc::clone(&stop),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            let mut served = 0usize;
            accept_loop(
                listener,
                &format!("http-{name}"),
                stop,
                move |stream, from| {
                    if served >= MAX_REQUESTS {
                        return; // dropped unanswered: the test has gone wild
                    }
                    served += 1;
                    let worker = {
                        let shared = Arc::clone(&shared);
                        thread::spawn(move || serve_http(stream, from, &shared))
                    };
                    lock(&shared.workers).push(worker);
                },
            )
        };
        HttpTracker {
            name: name.to_owned(),
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn set_script(&self, script: impl Fn(&HttpRequest, usize) -> HttpAction + Send + 'static) {
        *lock(&self.shared.script) = Box::new(script);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn announce_url(&self) -> String {
        self.url("/announce")
    }

    pub fn requests(&self) -> Vec<HttpRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn streams(&self) -> Vec<StreamLog> {
        lock(&self.shared.streams).clone()
    }

    /// The requests whose `port` parameter is `port` (one client's announces).
    pub fn requests_from_port(&self, port: u16) -> Vec<HttpRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.port() == Some(port))
            .collect()
    }

    /// Polls until `check` holds for the recorded requests; `None` on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        check: impl Fn(&[HttpRequest]) -> bool,
    ) -> Option<Vec<HttpRequest>> {
        poll_until(timeout, || {
            let requests = self.requests();
            check(&requests).then_some(requests)
        })
    }

    /// A text form of [`Diagnose::diagnostics`].
    pub fn describe(&self) -> String {
        self.diagnostics()
    }
}

impl Drop for HttpTracker {
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

impl Diagnose for HttpTracker {
    fn diagnostics(&self) -> String {
        let requests = self.requests();
        let mut out = format!(
            "===== scripted HTTP server {} on {}: {} request(s) =====\n",
            self.name,
            self.addr,
            requests.len()
        );
        for r in requests.iter().rev().take(60).rev() {
            let _ = writeln!(out, "  {}", r.describe());
        }
        for st in self.streams() {
            let _ = writeln!(
                out,
                "  streamed {} of {} bytes: {}",
                st.written, st.planned, st.end
            );
        }
        out
    }
}

/// Reads one request head and answers it per the script.
fn serve_http(mut stream: TcpStream, from: SocketAddr, shared: &HttpShared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
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
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (
                String::from_utf8_lossy(&percent_decode(k)).into_owned(),
                percent_decode(v),
            )
        })
        .collect();
    let request = HttpRequest {
        at: Instant::now(),
        from,
        method,
        path: path.to_owned(),
        target: target.clone(),
        query,
        headers,
    };
    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(request.clone());
        requests.len() - 1
    };
    let action = (lock(&shared.script))(&request, index);
    let bytes = match action {
        HttpAction::Reply {
            status,
            headers,
            body,
        } => {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http_response(status, &headers, &body)
        }
        HttpAction::Raw(bytes) => bytes,
        HttpAction::Stream {
            prefix,
            unit,
            units,
        } => {
            let log = stream_reply(&mut stream, &prefix, &unit, units, &shared.stop);
            lock(&shared.streams).push(log);
            return;
        }
        HttpAction::Hang => {
            // Held open until the server stops or the client goes away.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
            while !shared.stop.load(Ordering::SeqCst) {
                if let Ok(0) = stream.read(&mut chunk) {
                    break;
                }
            }
            return;
        }
    };
    let _ = stream.write_all(&bytes);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    // Let the client read at its pace before the socket goes away.
    let _ = stream.read(&mut chunk);
}

fn stream_reply(
    stream: &mut TcpStream,
    prefix: &[u8],
    unit: &[u8],
    units: u64,
    stop: &AtomicBool,
) -> StreamLog {
    let planned = prefix.len() as u64 + unit.len() as u64 * units;
    let mut written = 0u64;
    let mut end = "complete".to_owned();
    let mut result = stream.write_all(prefix);
    if result.is_ok() {
        written += prefix.len() as u64;
        for _ in 0..units {
            if stop.load(Ordering::SeqCst) {
                end = "server stopped".into();
                break;
            }
            result = stream.write_all(unit);
            if result.is_err() {
                break;
            }
            written += unit.len() as u64;
        }
    }
    if let Err(e) = result {
        end = format!("the client stopped reading: {e}");
    }
    let _ = stream.shutdown(Shutdown::Write);
    StreamLog {
        planned,
        written,
        end,
    }
}

// =============================================================================================
// A recording swarm tracker
// =============================================================================================

/// One announce the swarm tracker received.
#[derive(Debug, Clone)]
pub struct Announce {
    pub at: Instant,
    pub from: SocketAddr,
    pub peer_id: Vec<u8>,
    pub port: u16,
    pub event: String,
    pub uploaded: u64,
    pub downloaded: u64,
    pub left: u64,
    /// The peers this announce was answered with.
    pub given: Vec<SocketAddrV4>,
}

impl Announce {
    /// The address peers would dial: the TCP source address with the announced port.
    pub fn peer_addr(&self) -> SocketAddrV4 {
        let ip = match self.from.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        SocketAddrV4::new(ip, self.port)
    }
}

/// Whom the swarm tracker tells about whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPolicy {
    /// Every announce gets every other live peer (a normal tracker).
    Everyone,
    /// Every announce gets an empty list (peers come from `--peer` only).
    Nobody,
    /// Empty lists until `n` distinct peers have announced; then each peer is told about the
    /// others exactly once (its first announce after that), and gets empty lists afterwards.
    OnceWhen(usize),
}

#[derive(Default)]
struct SwarmState {
    announces: Vec<Announce>,
    /// Live peers by peer id, in order of first announce.
    swarm: Vec<(Vec<u8>, SocketAddrV4)>,
    told: Vec<Vec<u8>>,
}

/// A [`HttpTracker`] that records every announce (so tests can read the `uploaded` and
/// `downloaded` each client reports) and hands out compact peer lists per a [`PeerPolicy`].
pub struct SwarmTracker {
    http: HttpTracker,
    state: Arc<Mutex<SwarmState>>,
}

impl SwarmTracker {
    pub fn start(policy: PeerPolicy) -> SwarmTracker {
        let http = HttpTracker::start("swarm");
        let state: Arc<Mutex<SwarmState>> = Arc::default();
        let recorded = Arc::clone(&state);
        http.set_script(move |r, _| {
            if !r.path.ends_with("/announce") {
                return HttpAction::ok(b"d14:failure reason9:not founde".to_vec());
            }
            let num = |k: &str| r.num(k).unwrap_or(0);
            let mut a = Announce {
                at: r.at,
                from: r.from,
                peer_id: r.param("peer_id").unwrap_or_default().to_vec(),
                port: num("port") as u16,
                event: r.event(),
                uploaded: num("uploaded"),
                downloaded: num("downloaded"),
                left: num("left"),
                given: Vec::new(),
            };
            let mut state = lock(&recorded);
            a.given = peers_for(&a, policy, &mut state);
            let body = B::dict([
                ("interval", B::Int(1800)),
                ("min interval", B::Int(1)),
                ("peers", B::Bytes(compact4(&a.given))),
            ]);
            state.announces.push(a);
            HttpAction::ok(body.encode())
        });
        SwarmTracker { http, state }
    }

    pub fn announce_url(&self) -> String {
        self.http.announce_url()
    }

    pub fn announces(&self) -> Vec<Announce> {
        lock(&self.state).announces.clone()
    }

    /// Announces made by the client listening on `port`.
    pub fn announces_from(&self, port: u16) -> Vec<Announce> {
        self.announces()
            .into_iter()
            .filter(|a| a.port == port)
            .collect()
    }

    /// The first announce from `port` with `event`, waiting up to `timeout` for it.
    pub fn wait_event(&self, port: u16, event: &str, timeout: Duration) -> Option<Announce> {
        poll_until(timeout, || {
            self.announces_from(port)
                .into_iter()
                .find(|a| a.event == event)
        })
    }
}

fn peers_for(a: &Announce, policy: PeerPolicy, state: &mut SwarmState) -> Vec<SocketAddrV4> {
    state.swarm.retain(|(id, _)| *id != a.peer_id);
    let others: Vec<SocketAddrV4> = state.swarm.iter().map(|(_, addr)| *addr).collect();
    if a.event == "stopped" {
        return Vec::new();
    }
    state.swarm.push((a.peer_id.clone(), a.peer_addr()));
    match policy {
        PeerPolicy::Everyone => others,
        PeerPolicy::Nobody => Vec::new(),
        PeerPolicy::OnceWhen(n) => {
            if state.swarm.len() >= n && !state.told.contains(&a.peer_id) {
                state.told.push(a.peer_id.clone());
                others
            } else {
                Vec::new()
            }
        }
    }
}

impl Diagnose for SwarmTracker {
    fn diagnostics(&self) -> String {
        let mut out = format!("===== swarm tracker {} =====\n", self.http.addr);
        let announces = self.announces();
        let start = announces.len().saturating_sub(80);
        if start > 0 {
            let _ = writeln!(out, "[… {start} earlier announces omitted …]");
        }
        for a in &announces[start..] {
            let _ = writeln!(
                out,
                "{:>8.3?} ago from {} port {} id {} event {:?} up {} down {} left {} given {:?}",
                a.at.elapsed(),
                a.from,
                a.port,
                show_bytes(&a.peer_id),
                a.event,
                a.uploaded,
                a.downloaded,
                a.left,
                a.given
            );
        }
        out
    }
}

// =============================================================================================
// Scripted UDP tracker (BEP 15)
// =============================================================================================

const UDP_PROTOCOL_ID: u64 = 0x417_2710_1980;

/// One announce the scripted UDP tracker received.
#[derive(Debug, Clone)]
pub struct UdpAnnounce {
    pub at: Instant,
    pub from: SocketAddr,
    pub connection_id: u64,
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
    pub downloaded: u64,
    pub left: u64,
    pub uploaded: u64,
    /// 0 none, 1 completed, 2 started, 3 stopped.
    pub event: u32,
    pub key: u32,
    pub numwant: i32,
    pub port: u16,
}

/// What the scripted UDP tracker does with an announce.
#[derive(Debug, Clone)]
pub enum UdpAction {
    Peers {
        interval: u32,
        peers: Vec<SocketAddrV4>,
    },
    /// An error reply (action 3) with this message.
    Error(String),
}

#[derive(Default)]
struct UdpLog {
    /// Source address and time of each connect request.
    connects: Vec<(SocketAddr, Instant)>,
    /// Connection ids handed out.
    issued: Vec<u64>,
    announces: Vec<UdpAnnounce>,
    /// Packets that were not a valid connect or announce.
    other: Vec<String>,
}

type UdpScript = Box<dyn Fn(&UdpAnnounce, usize) -> UdpAction + Send>;

struct UdpShared {
    log: Mutex<UdpLog>,
    script: Mutex<UdpScript>,
    stop: AtomicBool,
}

/// A BEP 15 tracker on 127.0.0.1:0 run by a script.
pub struct UdpTracker {
    name: String,
    addr: SocketAddr,
    shared: Arc<UdpShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpTracker {
    pub fn start(name: &str) -> UdpTracker {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("scripted UDP tracker {name}: cannot bind: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local_addr");
        let default: UdpScript = Box::new(|_, _| UdpAction::Peers {
            interval: 1800,
            peers: Vec::new(),
        });
        let shared = Arc::new(UdpShared {
            log: Mutex::new(UdpLog::default()),
            script: Mutex::new(default),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("udp-tracker-{name}"))
                .spawn(move || serve_udp(&socket, &shared))
                .expect("spawn the scripted UDP tracker thread")
        };
        UdpTracker {
            name: name.to_owned(),
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn set_script(&self, script: impl Fn(&UdpAnnounce, usize) -> UdpAction + Send + 'static) {
        *lock(&self.shared.script) = Box::new(script);
    }

    pub fn announce_url(&self) -> String {
        format!("udp://{}/announce", self.addr)
    }

    pub fn connects(&self) -> usize {
        lock(&self.shared.log).connects.len()
    }

    pub fn issued_ids(&self) -> Vec<u64> {
        lock(&self.shared.log).issued.clone()
    }

    pub fn announces(&self) -> Vec<UdpAnnounce> {
        lock(&self.shared.log).announces.clone()
    }

    pub fn announces_from_port(&self, port: u16) -> Vec<UdpAnnounce> {
        self.announces()
            .into_iter()
            .filter(|a| a.port == port)
            .collect()
    }
}

impl Drop for UdpTracker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for UdpTracker {
    fn diagnostics(&self) -> String {
        let log = lock(&self.shared.log);
        let mut out = format!(
            "===== scripted UDP tracker {} on {}: {} connect(s), {} announce(s) =====\n",
            self.name,
            self.addr,
            log.connects.len(),
            log.announces.len()
        );
        for (from, at) in &log.connects {
            let _ = writeln!(out, "  connect from {from}, {:?} ago", at.elapsed());
        }
        let _ = writeln!(out, "  issued ids: {:x?}", log.issued);
        for a in &log.announces {
            let _ = writeln!(
                out,
                "  announce {:?} ago from {} conn {:x} event {} port {} left {} downloaded {} \
                 uploaded {} peer_id {}",
                a.at.elapsed(),
                a.from,
                a.connection_id,
                a.event,
                a.port,
                a.left,
                a.downloaded,
                a.uploaded,
                show_bytes(&a.peer_id)
            );
        }
        for o in &log.other {
            let _ = writeln!(out, "  other: {o}");
        }
        out
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn serve_udp(socket: &UdpSocket, shared: &UdpShared) {
    let mut buf = [0u8; 2048];
    let mut handled = 0usize;
    while !shared.stop.load(Ordering::SeqCst) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue, // timeout: look at the stop flag again
        };
        if handled >= MAX_REQUESTS {
            continue;
        }
        handled += 1;
        let packet = &buf[..len];
        if len == 16 && be_u64(packet, 0) == UDP_PROTOCOL_ID && be_u32(packet, 8) == 0 {
            let tid = be_u32(packet, 12);
            let id = {
                let mut log = lock(&shared.log);
                log.connects.push((from, Instant::now()));
                let id = 0x0bad_cafe_0000_0000 | (log.issued.len() as u64 + 1);
                log.issued.push(id);
                id
            };
            let mut reply = Vec::with_capacity(16);
            reply.extend(0u32.to_be_bytes());
            reply.extend(tid.to_be_bytes());
            reply.extend(id.to_be_bytes());
            let _ = socket.send_to(&reply, from);
        } else if len >= 98 && be_u32(packet, 8) == 1 {
            let tid = be_u32(packet, 12);
            let announce = UdpAnnounce {
                at: Instant::now(),
                from,
                connection_id: be_u64(packet, 0),
                info_hash: packet[16..36].try_into().expect("20 bytes"),
                peer_id: packet[36..56].try_into().expect("20 bytes"),
                downloaded: be_u64(packet, 56),
                left: be_u64(packet, 64),
                uploaded: be_u64(packet, 72),
                event: be_u32(packet, 80),
                key: be_u32(packet, 88),
                numwant: be_u32(packet, 92) as i32,
                port: u16::from_be_bytes([packet[96], packet[97]]),
            };
            let index = {
                let mut log = lock(&shared.log);
                log.announces.push(announce.clone());
                log.announces.len() - 1
            };
            let action = (lock(&shared.script))(&announce, index);
            let mut reply = Vec::new();
            match action {
                UdpAction::Peers { interval, peers } => {
                    reply.extend(1u32.to_be_bytes());
                    reply.extend(tid.to_be_bytes());
                    reply.extend(interval.to_be_bytes());
                    reply.extend(0u32.to_be_bytes()); // leechers
                    reply.extend(1u32.to_be_bytes()); // seeders
                    reply.extend(compact4(&peers));
                }
                UdpAction::Error(message) => {
                    reply.extend(3u32.to_be_bytes());
                    reply.extend(tid.to_be_bytes());
                    reply.extend(message.as_bytes());
                }
            }
            let _ = socket.send_to(&reply, from);
        } else {
            lock(&shared.log)
                .other
                .push(format!("{len} bytes from {from}: {}", show_bytes(packet)));
        }
    }
}

/// Trackers that never help, of each kind a real torrent's list holds, in turn: UDP that
/// never replies, TCP that accepts and never answers, TCP refused, names under `.invalid`
/// (HTTP and UDP). Callers that use the names must be in a private network namespace
/// (`net::require_private_network`). The sockets live as long as this value.
pub struct DeadTrackers {
    pub urls: Vec<String>,
    silent_udp: Vec<UdpSocket>,
    hanging: Vec<HttpTracker>,
}

impl DeadTrackers {
    pub fn start(count: usize) -> DeadTrackers {
        let mut dead = DeadTrackers {
            urls: Vec::new(),
            silent_udp: Vec::new(),
            hanging: Vec::new(),
        };
        for i in 0..count {
            let url = match i % 4 {
                0 => {
                    let socket =
                        UdpSocket::bind((next_loopback(), 0)).expect("bind a silent UDP tracker");
                    let addr = socket.local_addr().expect("local_addr");
                    dead.silent_udp.push(socket);
                    format!("udp://{addr}/announce")
                }
                1 => {
                    let t = HttpTracker::start(&format!("hang{i}"));
                    t.set_script(|_, _| HttpAction::Hang);
                    let url = t.announce_url();
                    dead.hanging.push(t);
                    url
                }
                2 => {
                    let closed = TcpListener::bind((next_loopback(), 0)).expect("bind");
                    let addr = closed.local_addr().expect("local_addr");
                    drop(closed);
                    format!("http://{addr}/announce")
                }
                _ if i % 8 == 3 => format!("http://dead-{i}.invalid:6969/announce"),
                _ => format!("udp://dead-{i}.invalid:6969/announce"),
            };
            dead.urls.push(url);
        }
        dead
    }

    /// Announces the hanging HTTP trackers have had so far, each.
    pub fn hanging_requests(&self) -> Vec<usize> {
        self.hanging.iter().map(|t| t.requests().len()).collect()
    }
}
