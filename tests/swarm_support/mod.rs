//! Helpers for `tests/swarm.rs`: a recording HTTP tracker, fake BitTorrent peers speaking the
//! wire protocol by hand, per-test loopback addresses, `ss` snapshots, and small utilities.
//!
//! Everything here is written for these tests; the process guards, payloads and torrent making
//! come from `tests/support` (used, not changed). Every thread started here stops when its
//! owner is dropped; every socket has a timeout, so nothing can hang a test for ever.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::{ChildGuard, Diagnose, poll_until};

pub const BLOCK: u32 = 16 * 1024;
/// Read timeout of fake-peer sockets: the granularity at which their threads notice a stop.
const SOCKET_TICK: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// =============================================================================================
// Addresses
// =============================================================================================

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback address of its own for one client: 127.A.B.C with A derived from this process's
/// id, so two test processes (this file run twice, or another suite handing out 127.0.0.x)
/// never share an address, and `ss` filters by address see only this test's connections.
pub fn own_ip() -> Ipv4Addr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    assert!(n < 200 * 250, "ran out of loopback addresses");
    let a = 20 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, a, (n / 200) as u8, 20 + (n % 200) as u8)
}

pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

// =============================================================================================
// Bytes
// =============================================================================================

pub fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn info_hash_bytes(hex: &str) -> [u8; 20] {
    hex_to_bytes(hex).try_into().expect("20-byte info hash")
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
        } else if b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// A short printable form of binary bytes (peer ids).
pub fn show(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                (b as char).to_string()
            } else {
                format!("\\x{b:02x}")
            }
        })
        .collect()
}

// =============================================================================================
// Recording HTTP tracker
// =============================================================================================

/// One announce the tracker received.
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

/// Whom the tracker tells about whom.
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

struct TrackerShared {
    policy: PeerPolicy,
    announces: Mutex<Vec<Announce>>,
    /// Live peers by peer id, in order of first announce.
    swarm: Mutex<Vec<(Vec<u8>, SocketAddrV4)>>,
    told: Mutex<Vec<Vec<u8>>>,
    stop: AtomicBool,
}

/// A tiny HTTP tracker on 127.0.0.1 that records every announce (so tests can read the
/// `uploaded`/`downloaded` each client reports) and hands out compact peer lists per policy.
pub struct Tracker {
    addr: SocketAddr,
    shared: Arc<TrackerShared>,
    thread: Option<JoinHandle<()>>,
}

impl Tracker {
    pub fn start(policy: PeerPolicy) -> Tracker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the tracker");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("tracker address");
        let shared = Arc::new(TrackerShared {
            policy,
            announces: Mutex::new(Vec::new()),
            swarm: Mutex::new(Vec::new()),
            told: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                while !shared.stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, from)) => {
                            let shared = Arc::clone(&shared);
                            // One thread per request: a client that never finishes its request
                            // cannot hold up the others.
                            thread::spawn(move || serve_announce(stream, from, &shared));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Tracker {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }

    pub fn announces(&self) -> Vec<Announce> {
        lock(&self.shared.announces).clone()
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

impl Drop for Tracker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for Tracker {
    fn diagnostics(&self) -> String {
        let mut out = format!("===== tracker {} =====\n", self.addr);
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
                show(&a.peer_id),
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

fn serve_announce(mut stream: TcpStream, from: SocketAddr, shared: &TrackerShared) {
    let _ = stream.set_nonblocking(false);
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
    let target = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: HashMap<String, Vec<u8>> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect();
    let num = |k: &str| -> u64 {
        params
            .get(k)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let body = if !path.ends_with("/announce") {
        b"d14:failure reason9:not founde".to_vec()
    } else {
        let mut a = Announce {
            at: Instant::now(),
            from,
            peer_id: params.get("peer_id").cloned().unwrap_or_default(),
            port: num("port") as u16,
            event: params
                .get("event")
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .unwrap_or_default(),
            uploaded: num("uploaded"),
            downloaded: num("downloaded"),
            left: num("left"),
            given: Vec::new(),
        };
        a.given = peers_for(&a, shared);
        let mut compact = Vec::new();
        for p in &a.given {
            compact.extend_from_slice(&p.ip().octets());
            compact.extend_from_slice(&p.port().to_be_bytes());
        }
        lock(&shared.announces).push(a);
        let mut body = b"d8:intervali1800e12:min intervali1e5:peers".to_vec();
        body.extend_from_slice(format!("{}:", compact.len()).as_bytes());
        body.extend_from_slice(&compact);
        body.push(b'e');
        body
    };
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(&body);
    let _ = stream.write_all(&response);
    let _ = stream.shutdown(Shutdown::Write);
}

fn peers_for(a: &Announce, shared: &TrackerShared) -> Vec<SocketAddrV4> {
    let mut swarm = lock(&shared.swarm);
    swarm.retain(|(id, _)| *id != a.peer_id);
    let others: Vec<SocketAddrV4> = swarm.iter().map(|(_, addr)| *addr).collect();
    if a.event != "stopped" {
        swarm.push((a.peer_id.clone(), a.peer_addr()));
    }
    let count = swarm.len();
    drop(swarm);
    if a.event == "stopped" {
        return Vec::new();
    }
    match shared.policy {
        PeerPolicy::Everyone => others,
        PeerPolicy::Nobody => Vec::new(),
        PeerPolicy::OnceWhen(n) => {
            let mut told = lock(&shared.told);
            if count >= n && !told.contains(&a.peer_id) {
                told.push(a.peer_id.clone());
                others
            } else {
                Vec::new()
            }
        }
    }
}

// =============================================================================================
// Torrent geometry (as the fake peers need it)
// =============================================================================================

#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub total: u64,
    pub piece_len: u32,
}

impl Geometry {
    pub fn pieces(&self) -> u32 {
        self.total.div_ceil(u64::from(self.piece_len)) as u32
    }

    pub fn piece_size(&self, piece: u32) -> u32 {
        let start = u64::from(piece) * u64::from(self.piece_len);
        (self.total - start).min(u64::from(self.piece_len)) as u32
    }

    /// Every block of the torrent, in order: (piece, begin, length).
    pub fn blocks(&self) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        for piece in 0..self.pieces() {
            let size = self.piece_size(piece);
            let mut begin = 0;
            while begin < size {
                let len = BLOCK.min(size - begin);
                out.push((piece, begin, len));
                begin += len;
            }
        }
        out
    }

    pub fn offset(&self, piece: u32, begin: u32) -> usize {
        (u64::from(piece) * u64::from(self.piece_len) + u64::from(begin)) as usize
    }
}

// =============================================================================================
// Wire protocol, by hand
// =============================================================================================

pub mod id {
    pub const CHOKE: u8 = 0;
    pub const UNCHOKE: u8 = 1;
    pub const INTERESTED: u8 = 2;
    pub const NOT_INTERESTED: u8 = 3;
    pub const HAVE: u8 = 4;
    pub const BITFIELD: u8 = 5;
    pub const REQUEST: u8 = 6;
    pub const PIECE: u8 = 7;
    pub const CANCEL: u8 = 8;
    pub const HAVE_ALL: u8 = 14;
    pub const HAVE_NONE: u8 = 15;
    pub const REJECT: u8 = 16;
    pub const ALLOWED_FAST: u8 = 17;
    pub const EXTENDED: u8 = 20;
}

/// Reserved bytes: the Fast bit is byte 7, 0x04; the extension protocol bit byte 5, 0x10.
pub fn reserved(fast: bool) -> [u8; 8] {
    let mut r = [0u8; 8];
    if fast {
        r[7] |= 0x04;
    }
    r
}

pub fn has_fast_bit(reserved: &[u8; 8]) -> bool {
    reserved[7] & 0x04 != 0
}

pub fn handshake(reserved: [u8; 8], info_hash: &[u8; 20], peer_id: &[u8; 20]) -> Vec<u8> {
    let mut h = Vec::with_capacity(68);
    h.push(19);
    h.extend_from_slice(b"BitTorrent protocol");
    h.extend_from_slice(&reserved);
    h.extend_from_slice(info_hash);
    h.extend_from_slice(peer_id);
    h
}

/// The other side's handshake: (reserved, info hash, peer id).
pub fn read_handshake(stream: &mut TcpStream) -> io::Result<([u8; 8], [u8; 20], [u8; 20])> {
    let mut buf = [0u8; 68];
    read_full(
        stream,
        &mut buf,
        None,
        Some(Instant::now() + Duration::from_secs(30)),
    )?;
    if buf[0] != 19 || &buf[1..20] != b"BitTorrent protocol" {
        return Err(io::Error::new(ErrorKind::InvalidData, "not a handshake"));
    }
    Ok((
        buf[20..28].try_into().unwrap(),
        buf[28..48].try_into().unwrap(),
        buf[48..68].try_into().unwrap(),
    ))
}

/// `read_exact` that tolerates read timeouts (the socket ticks so threads can notice `stop`),
/// giving up when `stop` is set (`Interrupted`) or `deadline` passes (`TimedOut`).
fn read_full(
    stream: &mut TcpStream,
    buf: &mut [u8],
    stop: Option<&AtomicBool>,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.is_some_and(|s| s.load(Ordering::SeqCst)) {
                    return Err(io::Error::new(ErrorKind::Interrupted, "stopped"));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One message: `None` for a keep-alive, else (id, payload). Stops when `stop` is set.
pub fn read_msg(
    stream: &mut TcpStream,
    stop: Option<&AtomicBool>,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    read_msg_with(stream, stop, None)
}

/// One message, waiting at most until `deadline` (the socket must have a read timeout).
pub fn read_msg_until(
    stream: &mut TcpStream,
    deadline: Instant,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    read_msg_with(stream, None, Some(deadline))
}

fn read_msg_with(
    stream: &mut TcpStream,
    stop: Option<&AtomicBool>,
    deadline: Option<Instant>,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    read_full(stream, &mut len, stop, deadline)?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > (1 << 20) + 64 {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len];
    read_full(stream, &mut buf, stop, deadline)?;
    let id = buf.remove(0);
    Ok(Some((id, buf)))
}

pub fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    out.push(id);
    out.extend_from_slice(payload);
    out
}

pub fn triple(a: u32, b: u32, c: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    for v in [a, b, c] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    p
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn parse_triple(p: &[u8]) -> Option<(u32, u32, u32)> {
    (p.len() == 12).then(|| (be32(p, 0), be32(p, 4), be32(p, 8)))
}

/// A bitfield with every piece set (spare bits clear).
pub fn full_bitfield(pieces: u32) -> Vec<u8> {
    let mut bits = vec![0u8; pieces.div_ceil(8) as usize];
    for i in 0..pieces as usize {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    bits
}

static NEXT_PEER: AtomicU32 = AtomicU32::new(0);

/// A peer id unique within this test process: `-TAG-` then the process id and a counter.
pub fn peer_id(tag: &str) -> [u8; 20] {
    let n = NEXT_PEER.fetch_add(1, Ordering::Relaxed);
    let mut id = *b"-FAKE-0000000000000-";
    for (i, b) in tag.bytes().take(4).enumerate() {
        id[1 + i] = b;
    }
    let digits = format!("{:08}{:05}", std::process::id() % 100_000_000, n % 100_000);
    id[6..19].copy_from_slice(digits.as_bytes());
    id
}

/// Connects to `to` from `from_ip` (so the peer sees the fake's own loopback address).
pub fn connect_from(from_ip: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SockAddr::from(SocketAddr::from((from_ip, 0))))?;
    socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(10))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(SOCKET_TICK))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

// =============================================================================================
// Fake seeder
// =============================================================================================

#[derive(Debug, Clone, Copy)]
pub struct FakeSeederConfig {
    /// Set the Fast bit in the handshake.
    pub fast: bool,
    /// Announce pieces with `have all` (id 14) instead of a bitfield.
    pub have_all: bool,
    /// Flip one byte (the first) of every block sent, so any piece it contributes to is bad.
    pub corrupt: bool,
}

/// What a fake peer saw, for assertions and failure reports.
#[derive(Default)]
pub struct FakeStats {
    pub accepts: AtomicUsize,
    pub handshakes: AtomicUsize,
    pub closed: AtomicUsize,
    pub requests: AtomicUsize,
    pub blocks_sent: AtomicUsize,
    pub bytes_sent: AtomicU64,
    /// Ids of the first message the other side sent on each connection.
    pub first_msgs: Mutex<Vec<u8>>,
    /// Reserved bytes of the other side's handshake on each connection.
    pub their_reserved: Mutex<Vec<[u8; 8]>>,
    pub log: Mutex<Vec<String>>,
}

impl FakeStats {
    pub fn note(&self, started: Instant, msg: String) {
        let mut log = lock(&self.log);
        if log.len() < 400 {
            log.push(format!("{:>8.3?} {msg}", started.elapsed()));
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "accepts {}, handshakes {}, closed {}, requests {}, blocks sent {} ({} bytes), \
             first messages {:?}, their reserved {:?}",
            self.accepts.load(Ordering::SeqCst),
            self.handshakes.load(Ordering::SeqCst),
            self.closed.load(Ordering::SeqCst),
            self.requests.load(Ordering::SeqCst),
            self.blocks_sent.load(Ordering::SeqCst),
            self.bytes_sent.load(Ordering::SeqCst),
            lock(&self.first_msgs),
            lock(&self.their_reserved),
        )
    }
}

/// A seeder written by hand: listens on its own loopback address, answers each handshake,
/// says it has everything (bitfield or have-all), unchokes at once and answers every request
/// with the block from `data` (optionally corrupted).
pub struct FakeSeeder {
    pub addr: SocketAddr,
    pub stats: Arc<FakeStats>,
    pub peer_id: [u8; 20],
    name: String,
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept_thread: Option<JoinHandle<()>>,
}

struct SeedCtx {
    cfg: FakeSeederConfig,
    info_hash: [u8; 20],
    peer_id: [u8; 20],
    data: Arc<Vec<u8>>,
    geo: Geometry,
    stats: Arc<FakeStats>,
    stop: Arc<AtomicBool>,
    started: Instant,
}

impl FakeSeeder {
    pub fn start(
        name: &str,
        ip: Ipv4Addr,
        info_hash: [u8; 20],
        data: Arc<Vec<u8>>,
        geo: Geometry,
        cfg: FakeSeederConfig,
    ) -> FakeSeeder {
        let listener = TcpListener::bind((ip, 0)).expect("bind the fake seeder");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("fake seeder address");
        let stats = Arc::new(FakeStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let started = Instant::now();
        let peer_id = peer_id("FSD");
        let ctx = Arc::new(SeedCtx {
            cfg,
            info_hash,
            peer_id,
            data,
            geo,
            stats: Arc::clone(&stats),
            stop: Arc::clone(&stop),
            started,
        });
        let accept_thread = {
            let threads = Arc::clone(&threads);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, from)) => {
                            ctx.stats.accepts.fetch_add(1, Ordering::SeqCst);
                            ctx.stats.note(ctx.started, format!("accepted {from}"));
                            let ctx = Arc::clone(&ctx);
                            let t = thread::spawn(move || {
                                let result = seed_connection(stream, &ctx);
                                ctx.stats.closed.fetch_add(1, Ordering::SeqCst);
                                ctx.stats
                                    .note(ctx.started, format!("{from} ended: {result:?}"));
                            });
                            lock(&threads).push(t);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        FakeSeeder {
            addr,
            stats,
            peer_id,
            name: name.to_owned(),
            started,
            stop,
            threads,
            accept_thread: Some(accept_thread),
        }
    }

    /// Dials `to` from this fake's address and behaves as on an accepted connection.
    pub fn dial(
        &self,
        to: SocketAddr,
        data: Arc<Vec<u8>>,
        info_hash: [u8; 20],
        geo: Geometry,
        cfg: FakeSeederConfig,
    ) {
        let ctx = Arc::new(SeedCtx {
            cfg,
            info_hash,
            peer_id: self.peer_id,
            data,
            geo,
            stats: Arc::clone(&self.stats),
            stop: Arc::clone(&self.stop),
            started: self.started,
        });
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(_) => unreachable!(),
        };
        let t = thread::spawn(move || {
            let result = connect_from(ip, to).and_then(|mut s| {
                s.write_all(&handshake(
                    reserved(ctx.cfg.fast),
                    &ctx.info_hash,
                    &ctx.peer_id,
                ))?;
                seed_session(s, &ctx, true)
            });
            ctx.stats
                .note(ctx.started, format!("outbound to {to} ended: {result:?}"));
        });
        lock(&self.threads).push(t);
    }
}

impl Drop for FakeSeeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
    }
}

impl Diagnose for FakeSeeder {
    fn diagnostics(&self) -> String {
        format!(
            "===== {} on {} =====\n{}\n{}\n",
            self.name,
            self.addr,
            self.stats.summary(),
            lock(&self.stats.log).join("\n")
        )
    }
}

fn seed_connection(mut stream: TcpStream, ctx: &SeedCtx) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SOCKET_TICK))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    stream.set_nodelay(true)?;
    let (their_reserved, hash, _) = read_handshake(&mut stream)?;
    if hash != ctx.info_hash {
        return Err(io::Error::new(ErrorKind::InvalidData, "wrong info hash"));
    }
    lock(&ctx.stats.their_reserved).push(their_reserved);
    stream.write_all(&handshake(
        reserved(ctx.cfg.fast),
        &ctx.info_hash,
        &ctx.peer_id,
    ))?;
    seed_session(stream, ctx, false)
}

fn seed_session(
    mut stream: TcpStream,
    ctx: &SeedCtx,
    read_their_handshake: bool,
) -> io::Result<()> {
    if read_their_handshake {
        let (their_reserved, _, _) = read_handshake(&mut stream)?;
        lock(&ctx.stats.their_reserved).push(their_reserved);
    }
    ctx.stats.handshakes.fetch_add(1, Ordering::SeqCst);
    let mut intro = if ctx.cfg.have_all {
        frame(id::HAVE_ALL, &[])
    } else {
        frame(id::BITFIELD, &full_bitfield(ctx.geo.pieces()))
    };
    intro.extend_from_slice(&frame(id::UNCHOKE, &[]));
    stream.write_all(&intro)?;
    let mut first = true;
    loop {
        let Some((mid, payload)) = read_msg(&mut stream, Some(&ctx.stop))? else {
            continue;
        };
        if first {
            lock(&ctx.stats.first_msgs).push(mid);
            first = false;
        }
        if mid != id::REQUEST {
            continue;
        }
        ctx.stats.requests.fetch_add(1, Ordering::SeqCst);
        let Some((piece, begin, len)) = parse_triple(&payload) else {
            return Err(io::Error::new(ErrorKind::InvalidData, "bad request"));
        };
        let start = ctx.geo.offset(piece, begin);
        let Some(block) = ctx.data.get(start..start + len as usize) else {
            return Err(io::Error::new(
                ErrorKind::InvalidData,
                "request out of range",
            ));
        };
        let mut msg = Vec::with_capacity(13 + block.len());
        msg.extend_from_slice(&(9 + len).to_be_bytes());
        msg.push(id::PIECE);
        msg.extend_from_slice(&piece.to_be_bytes());
        msg.extend_from_slice(&begin.to_be_bytes());
        let at = msg.len();
        msg.extend_from_slice(block);
        if ctx.cfg.corrupt {
            msg[at] ^= 0xff;
        }
        stream.write_all(&msg)?;
        ctx.stats.blocks_sent.fetch_add(1, Ordering::SeqCst);
        ctx.stats
            .bytes_sent
            .fetch_add(u64::from(len), Ordering::SeqCst);
    }
}

// =============================================================================================
// Fake leecher (a downloader that counts what it receives)
// =============================================================================================

#[derive(Default)]
pub struct LeechStats {
    /// Payload bytes of `piece` messages received.
    pub bytes: AtomicU64,
    pub blocks: AtomicUsize,
    pub bad_blocks: AtomicUsize,
    pub rejects: AtomicUsize,
    pub chokes: AtomicUsize,
    pub unchokes: AtomicUsize,
    pub done: AtomicBool,
    pub ended: Mutex<Option<String>>,
}

/// A hand-written downloader: dials `to` from `ip` with the Fast bit, says interested, and
/// keeps `depth` requests outstanding over all blocks in order (once each), counting every
/// byte of block data it receives. Rejected requests are asked again.
pub struct FakeLeecher {
    pub stats: Arc<LeechStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl FakeLeecher {
    pub fn start(
        name: &str,
        ip: Ipv4Addr,
        to: SocketAddr,
        info_hash: [u8; 20],
        data: Arc<Vec<u8>>,
        geo: Geometry,
        depth: usize,
    ) -> FakeLeecher {
        let stats = Arc::new(LeechStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stats, stop) = (Arc::clone(&stats), Arc::clone(&stop));
            thread::spawn(move || {
                let result = leech(ip, to, info_hash, &data, geo, depth, &stats, &stop);
                *lock(&stats.ended) = Some(format!("{result:?}"));
            })
        };
        FakeLeecher {
            stats,
            stop,
            thread: Some(thread),
            name: name.to_owned(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::SeqCst)
    }

    pub fn ended(&self) -> Option<String> {
        lock(&self.stats.ended).clone()
    }
}

impl Drop for FakeLeecher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for FakeLeecher {
    fn diagnostics(&self) -> String {
        let s = &self.stats;
        format!(
            "===== {} =====\nbytes {}, blocks {}, bad blocks {}, rejects {}, chokes {}, \
             unchokes {}, done {}, ended {:?}\n",
            self.name,
            s.bytes.load(Ordering::SeqCst),
            s.blocks.load(Ordering::SeqCst),
            s.bad_blocks.load(Ordering::SeqCst),
            s.rejects.load(Ordering::SeqCst),
            s.chokes.load(Ordering::SeqCst),
            s.unchokes.load(Ordering::SeqCst),
            s.done.load(Ordering::SeqCst),
            lock(&s.ended),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn leech(
    ip: Ipv4Addr,
    to: SocketAddr,
    info_hash: [u8; 20],
    data: &[u8],
    geo: Geometry,
    depth: usize,
    stats: &LeechStats,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut stream = connect_from(ip, to)?;
    stream.write_all(&handshake(reserved(true), &info_hash, &peer_id("FLC")))?;
    let (theirs, _, _) = read_handshake(&mut stream)?;
    let fast = has_fast_bit(&theirs);
    stream.write_all(&frame(id::INTERESTED, &[]))?;
    let mut todo: std::collections::VecDeque<(u32, u32, u32)> = geo.blocks().into();
    let mut outstanding: Vec<(u32, u32, u32)> = Vec::new();
    let mut unchoked = false;
    loop {
        if unchoked {
            let mut batch = Vec::new();
            while outstanding.len() < depth {
                let Some(b) = todo.pop_front() else { break };
                batch.extend_from_slice(&frame(id::REQUEST, &triple(b.0, b.1, b.2)));
                outstanding.push(b);
            }
            if !batch.is_empty() {
                stream.write_all(&batch)?;
            }
        }
        if todo.is_empty() && outstanding.is_empty() {
            stats.done.store(true, Ordering::SeqCst);
            // Stay connected (the seeder decides when it is done), until told to stop.
            while !stop.load(Ordering::SeqCst) {
                match read_msg(&mut stream, Some(stop)) {
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        let Some((mid, payload)) = read_msg(&mut stream, Some(stop))? else {
            continue;
        };
        match mid {
            id::UNCHOKE => {
                unchoked = true;
                stats.unchokes.fetch_add(1, Ordering::SeqCst);
            }
            id::CHOKE => {
                unchoked = false;
                stats.chokes.fetch_add(1, Ordering::SeqCst);
                if !fast {
                    // BEP 3: a choke drops every pending request.
                    for b in outstanding.drain(..).rev() {
                        todo.push_front(b);
                    }
                }
            }
            id::REJECT => {
                stats.rejects.fetch_add(1, Ordering::SeqCst);
                if let Some(t) = parse_triple(&payload)
                    && let Some(i) = outstanding.iter().position(|b| *b == t)
                {
                    todo.push_front(outstanding.remove(i));
                }
            }
            id::PIECE if payload.len() >= 8 => {
                let (piece, begin) = (be32(&payload, 0), be32(&payload, 4));
                let block = &payload[8..];
                let t = (piece, begin, block.len() as u32);
                stats.bytes.fetch_add(block.len() as u64, Ordering::SeqCst);
                stats.blocks.fetch_add(1, Ordering::SeqCst);
                let start = geo.offset(piece, begin);
                if data.get(start..start + block.len()) != Some(block) {
                    stats.bad_blocks.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(i) = outstanding.iter().position(|b| *b == t) {
                    outstanding.remove(i);
                }
            }
            _ => {}
        }
    }
}

// =============================================================================================
// Processes
// =============================================================================================

/// Starts bitfetch with `args` under `name`. On drop: SIGTERM, then SIGKILL after 10 s.
pub fn bitfetch(name: &str, args: &[String]) -> ChildGuard {
    let mut command = Command::new(crate::support::bitfetch());
    command.args(args).env("RUST_BACKTRACE", "1");
    ChildGuard::spawn(name, &mut command).with_stop_signal(libc::SIGTERM, Duration::from_secs(10))
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

// =============================================================================================
// TCP connections as `ss` sees them
// =============================================================================================

/// One TCP socket from `ss -Htain`: state, addresses and the kernel's byte counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub state: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Bytes this end sent that the other end acknowledged.
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// Every IPv4 TCP socket on the machine (this network namespace), as `ss` reports them.
pub fn tcp_sockets() -> Vec<Socket> {
    let output = Command::new("ss")
        .args(["-H", "-t", "-a", "-i", "-n", "-4"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ss (iproute2): {e}"));
    assert!(
        output.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sockets: Vec<Socket> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            // The info line of the socket above it.
            if let Some(last) = sockets.last_mut() {
                for word in line.split_whitespace() {
                    if let Some(v) = word.strip_prefix("bytes_acked:") {
                        last.bytes_acked = v.parse().unwrap_or(0);
                    } else if let Some(v) = word.strip_prefix("bytes_received:") {
                        last.bytes_received = v.parse().unwrap_or(0);
                    }
                }
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        let (Ok(local), Ok(peer)) = (cols[3].parse(), cols[4].parse()) else {
            continue;
        };
        sockets.push(Socket {
            state: cols[0].to_owned(),
            local,
            peer,
            bytes_acked: 0,
            bytes_received: 0,
        });
    }
    sockets
}

/// Sockets of connections between `a` and `b` (either end, any state but LISTEN).
pub fn sockets_between(a: Ipv4Addr, b: Ipv4Addr) -> Vec<Socket> {
    tcp_sockets()
        .into_iter()
        .filter(|s| {
            s.state != "LISTEN"
                && ((s.local.ip() == IpAddr::V4(a) && s.peer.ip() == IpAddr::V4(b))
                    || (s.local.ip() == IpAddr::V4(b) && s.peer.ip() == IpAddr::V4(a)))
        })
        .collect()
}

/// A connection named by its two ends, the same from either side.
pub fn connection_key(s: &Socket) -> (SocketAddr, SocketAddr) {
    if s.local < s.peer {
        (s.local, s.peer)
    } else {
        (s.peer, s.local)
    }
}

// =============================================================================================
// aria2 with an upload limit
// =============================================================================================

/// aria2c seeding `torrent` from `data_parent_dir` on `ip:port`, uploading at most
/// `upload_limit` (aria2 syntax, e.g. "512K") in all. Loopback only, no DHT/LPD/PEX.
pub fn aria2_seed_limited(
    torrent: &Path,
    data_parent_dir: &Path,
    ip: Ipv4Addr,
    port: u16,
    upload_limit: &str,
) -> ChildGuard {
    let scratch = crate::support::scratch_dir();
    let log = scratch.path().join("aria2-seed.log");
    let mut command = Command::new(crate::support::require_tool("aria2c"));
    command
        .arg("--no-conf=true")
        .arg(format!("--dir={}", data_parent_dir.display()))
        .arg(format!("--interface={ip}"))
        .arg(format!("--listen-port={port}"))
        .arg(format!("--max-overall-upload-limit={upload_limit}"))
        .args([
            "--disable-ipv6=true",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=false",
            "--bt-tracker-interval=2",
            "--seed-ratio=0.0",
            "--bt-seed-unverified=true",
            "--check-integrity=false",
            "--summary-interval=0",
            "--show-console-readout=false",
            "--console-log-level=warn",
            "--log-level=info",
        ])
        .arg(format!("--log={}", log.display()))
        .arg(torrent);
    ChildGuard::spawn(&format!("aria2c seeder {ip}:{port}"), &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
        .with_log(log)
        .with_scratch(scratch)
}
