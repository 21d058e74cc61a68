//! Helpers for `tests/trackers.rs`: scripted HTTP and UDP trackers that record what bitfetch
//! asks, a tiny bencode writer, a test CA made with `openssl`, nginx as a TLS-terminating
//! proxy, and torrents with announce-list tiers made by `mktorrent`.
//!
//! Everything binds loopback addresses. Server threads poll a stop flag and end when their
//! owner is dropped; every process is owned by a `ChildGuard` (killed by PID on drop).
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::{
    ChildGuard, DEADLINE, Diagnose, bitfetch, free_port, poll_until, require_tool, run_ok,
    scratch_dir,
};

/// How long a server thread sleeps between two looks at a non-blocking socket.
const SERVER_POLL: Duration = Duration::from_millis(5);
/// At most this many requests are recorded (and answered) per scripted tracker.
const MAX_REQUESTS: usize = 10_000;
/// At most this many connections are held open by `Hang`.
const MAX_HELD: usize = 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// =============================================================================================
// Bencode (writer only)
// =============================================================================================

/// A bencode value to write. Dictionary keys are sorted on encoding.
#[derive(Debug, Clone)]
pub enum B {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<B>),
    Dict(Vec<(Vec<u8>, B)>),
}

impl B {
    pub fn str(s: impl AsRef<[u8]>) -> B {
        B::Bytes(s.as_ref().to_vec())
    }

    pub fn dict(entries: Vec<(&str, B)>) -> B {
        B::Dict(
            entries
                .into_iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v))
                .collect(),
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            B::Int(i) => out.extend(format!("i{i}e").as_bytes()),
            B::Bytes(b) => {
                out.extend(format!("{}:", b.len()).as_bytes());
                out.extend(b);
            }
            B::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            B::Dict(entries) => {
                let mut sorted: Vec<&(Vec<u8>, B)> = entries.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                out.push(b'd');
                for (k, v) in sorted {
                    B::Bytes(k.clone()).encode_into(out);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }
}

/// Compact IPv4 peers (BEP 23): 6 bytes each.
pub fn compact4(peers: &[SocketAddrV4]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in peers {
        out.extend(p.ip().octets());
        out.extend(p.port().to_be_bytes());
    }
    out
}

/// Compact IPv6 peers (BEP 7): 18 bytes each.
pub fn compact6(peers: &[SocketAddrV6]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in peers {
        out.extend(p.ip().octets());
        out.extend(p.port().to_be_bytes());
    }
    out
}

/// A normal announce reply with compact IPv4 peers.
pub fn announce_reply(interval: i64, peers: &[SocketAddrV4]) -> Vec<u8> {
    B::dict(vec![
        ("interval", B::Int(interval)),
        ("complete", B::Int(1)),
        ("incomplete", B::Int(0)),
        ("peers", B::Bytes(compact4(peers))),
    ])
    .encode()
}

pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

// =============================================================================================
// Hex and percent-decoding
// =============================================================================================

pub fn hex_to_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Decodes `%XX` escapes (and `+` as a space) into raw bytes. Malformed escapes stay literal.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Bytes shown for people: printable ASCII as is, the rest as `\xNN`.
pub fn show_bytes(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, &c| {
        if (0x20..0x7f).contains(&c) {
            s.push(c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
        s
    })
}

// =============================================================================================
// Scripted HTTP tracker
// =============================================================================================

/// One request the scripted HTTP tracker read.
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

/// What the scripted tracker does with a request.
#[derive(Debug, Clone)]
pub enum HttpAction {
    /// Answer with this status, extra headers and body.
    Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Keep the connection open and never answer (until the tracker is dropped).
    Hang,
}

impl HttpAction {
    pub fn ok(body: Vec<u8>) -> HttpAction {
        HttpAction::Reply {
            status: 200,
            headers: Vec::new(),
            body,
        }
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
}

/// Decides the answer to one request; the second argument is the request's index among all
/// requests this tracker has read (0 for the first).
pub type HttpScript = Box<dyn Fn(&HttpRequest, usize) -> HttpAction + Send>;

struct HttpShared {
    requests: Mutex<Vec<HttpRequest>>,
    script: Mutex<HttpScript>,
    stop: AtomicBool,
}

/// A one-request-per-connection HTTP tracker on 127.0.0.1:0, run by a script.
pub struct HttpTracker {
    name: String,
    addr: SocketAddr,
    shared: Arc<HttpShared>,
    thread: Option<JoinHandle<()>>,
}

impl HttpTracker {
    /// Starts a tracker that answers every request with an empty peer list (interval 1800)
    /// until [`HttpTracker::set_script`] says otherwise.
    pub fn start(name: &str) -> HttpTracker {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("scripted tracker {name}: cannot bind 127.0.0.1:0: {e}"));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local_addr");
        let default: HttpScript = Box::new(|_, _| HttpAction::ok(announce_reply(1800, &[])));
        let shared = Arc::new(HttpShared {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(default),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("http-tracker-{name}"))
                .spawn(move || serve_http(listener, &shared))
                .expect("spawn the scripted tracker thread")
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
}

impl Drop for HttpTracker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for HttpTracker {
    fn diagnostics(&self) -> String {
        let requests = self.requests();
        let mut out = format!(
            "===== scripted HTTP tracker {} on {}: {} request(s) =====\n",
            self.name,
            self.addr,
            requests.len()
        );
        for r in requests.iter().rev().take(60).rev() {
            let _ = writeln!(out, "  {}", r.describe());
        }
        out
    }
}

fn serve_http(listener: TcpListener, shared: &HttpShared) {
    let mut held: Vec<TcpStream> = Vec::new();
    let mut served = 0usize;
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                if served >= MAX_REQUESTS {
                    continue; // dropped unanswered: the test has gone wild
                }
                served += 1;
                if let Some(stream) = handle_http(stream, from, shared)
                    && held.len() < MAX_HELD
                {
                    held.push(stream);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(SERVER_POLL),
            Err(_) => thread::sleep(SERVER_POLL),
        }
    }
}

/// Reads one request and answers it per the script; returns the stream if it is to be held.
fn handle_http(mut stream: TcpStream, from: SocketAddr, shared: &HttpShared) -> Option<TcpStream> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > 64 * 1024 {
            break false;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break false,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    };
    if !complete {
        return None;
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
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
    };
    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(request.clone());
        requests.len() - 1
    };
    let action = (lock(&shared.script))(&request, index);
    match action {
        HttpAction::Hang => Some(stream),
        HttpAction::Reply {
            status,
            headers,
            body,
        } => {
            let reason = match status {
                200 => "OK",
                302 => "Found",
                404 => "Not Found",
                500 => "Internal Server Error",
                _ => "Whatever",
            };
            let mut response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                let _ = write!(response, "{k}: {v}\r\n");
            }
            response.push_str("\r\n");
            let mut bytes = response.into_bytes();
            bytes.extend_from_slice(&body);
            let _ = stream.write_all(&bytes);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Write);
            None
        }
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

// =============================================================================================
// A listener that only counts connection attempts (a peer address bitfetch must not dial)
// =============================================================================================

pub struct Trap {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trap {
    pub fn start(ip: Ipv4Addr) -> Trap {
        let listener = TcpListener::bind((ip, 0)).expect("bind the trap");
        listener.set_nonblocking(true).expect("non-blocking trap");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (hits, stop) = (Arc::clone(&hits), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((_, from)) => lock(&hits).push(from),
                        Err(_) => thread::sleep(SERVER_POLL),
                    }
                }
            })
        };
        Trap {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hits(&self) -> Vec<SocketAddr> {
        lock(&self.hits).clone()
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// =============================================================================================
// Torrents with tiers, bitfetch processes
// =============================================================================================

/// A payload file and a torrent for it (made by mktorrent, 32 KiB pieces).
pub struct Fixture {
    pub dir: TempDir,
    /// The payload file (single-file torrent; `seed` takes this path).
    pub data: PathBuf,
    pub torrent: PathBuf,
    pub name: String,
    pub size: u64,
    pub hash_hex: String,
    pub hash: Vec<u8>,
}

impl Fixture {
    /// `tiers[i]` is tier i+1 of the announce-list.
    pub fn new(name: &str, size: u64, seed: u64, tiers: &[Vec<String>]) -> Fixture {
        assert!(
            !tiers.is_empty() && tiers.iter().all(|t| !t.is_empty()),
            "mktorrent needs at least one tracker"
        );
        let dir = scratch_dir();
        let data = dir.path().join("src").join(name);
        crate::support::write_payload(&data, size, seed);
        let torrent = dir.path().join(format!("{name}.torrent"));
        let mut command = Command::new(require_tool("mktorrent"));
        for tier in tiers {
            command.arg("-a").arg(tier.join(","));
        }
        command.args(["-l", "15", "-o"]).arg(&torrent).arg(&data);
        run_ok("mktorrent", &mut command);
        let hash_hex = crate::support::info_hash_hex(&torrent);
        let hash = hex_to_bytes(&hash_hex);
        Fixture {
            dir,
            data,
            torrent,
            name: name.to_owned(),
            size,
            hash_hex,
            hash,
        }
    }

    pub fn out_dir(&self, label: &str) -> PathBuf {
        let d = self.dir.path().join(format!("out-{label}"));
        fs::create_dir_all(&d).expect("create the output directory");
        d
    }

    pub fn downloaded(&self, out_dir: &Path) -> PathBuf {
        out_dir.join(&self.name)
    }
}

/// Starts bitfetch with `args`, without `SSL_CERT_FILE` from the environment (so the HTTPS
/// tests are hermetic) plus `env`. On drop it gets SIGTERM, then SIGKILL after 10 s.
pub fn spawn_bitfetch_env(name: &str, args: &[String], env: &[(&str, &Path)]) -> ChildGuard {
    let mut command = Command::new(bitfetch());
    command
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("SSL_CERT_FILE");
    for (k, v) in env {
        command.env(k, v);
    }
    ChildGuard::spawn(name, &mut command).with_stop_signal(libc::SIGTERM, Duration::from_secs(10))
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

// =============================================================================================
// TLS: a test CA with openssl, nginx as a TLS-terminating proxy
// =============================================================================================

/// A CA and a server certificate for IP 127.0.0.1 signed by it.
pub struct TestCa {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub server_pem: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn make() -> TestCa {
        let openssl = require_tool("openssl");
        let dir = scratch_dir();
        let p = |n: &str| dir.path().join(n);
        let run = |what: &str, args: &[&str]| {
            let mut command = Command::new(&openssl);
            command.args(args).current_dir(dir.path());
            run_ok(&format!("openssl {what}"), &mut command);
        };
        run(
            "req (CA)",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=bitfetch test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        run(
            "req (server)",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        run(
            "x509 (sign)",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        TestCa {
            ca_pem: p("ca.pem"),
            server_pem: p("server.pem"),
            server_key: p("server.key"),
            dir,
        }
    }
}

/// nginx in the foreground, one process (`master_process off`), terminating TLS on
/// 127.0.0.1:PORT and proxying to `upstream`.
pub struct Nginx {
    guard: ChildGuard,
    port: u16,
}

impl Nginx {
    pub fn start(ca: &TestCa, upstream: SocketAddr) -> Nginx {
        let nginx = require_tool("nginx");
        let mut last = String::new();
        // A port found free can be taken before nginx binds it: retry.
        for _ in 0..3 {
            let dir = scratch_dir();
            let d = dir.path().display().to_string();
            fs::create_dir_all(dir.path().join("tmp")).expect("nginx temp dir");
            let port = free_port();
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n\
                 access_log {d}/access.log;\n\
                 client_body_temp_path {d}/tmp/body;\nproxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fastcgi;\nuwsgi_temp_path {d}/tmp/uwsgi;\n\
                 scgi_temp_path {d}/tmp/scgi;\n\
                 server {{\n listen 127.0.0.1:{port} ssl;\n\
                 ssl_certificate {cert};\n ssl_certificate_key {key};\n\
                 location / {{ proxy_pass http://{upstream}; }}\n}}\n}}\n",
                cert = ca.server_pem.display(),
                key = ca.server_key.display(),
            );
            let conf_path = dir.path().join("nginx.conf");
            fs::write(&conf_path, conf).expect("write nginx.conf");
            let log = dir.path().join("error.log");
            let mut command = Command::new(&nginx);
            command
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(&log)
                .arg("-c")
                .arg(&conf_path);
            let guard = ChildGuard::spawn(&format!("nginx 127.0.0.1:{port}"), &mut command)
                .with_log(log)
                .with_scratch(dir);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let up = poll_until(DEADLINE, || {
                if guard.exit_status().is_some() {
                    return Some(false);
                }
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .ok()
                    .map(|_| true)
            });
            match up {
                Some(true) => return Nginx { guard, port },
                Some(false) => last = guard.diagnostics(),
                None => panic!(
                    "nginx did not listen on {addr} within {DEADLINE:?}\n{}",
                    guard.diagnostics()
                ),
            }
        }
        panic!("nginx failed to start three times; last attempt:\n{last}");
    }

    pub fn announce_url(&self) -> String {
        format!("https://127.0.0.1:{}/announce", self.port)
    }
}

impl Diagnose for Nginx {
    fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }
}

/// The loopback address of `ip` as an `IpAddr`, for `--bind`.
pub fn ip4(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(ip)
}
