//! Helpers for `tests/faults.rs`: reading `--json` events, torrents whose piece hashes the test
//! checks itself with SHA-1 (so "every piece it has is good" does not rest on bitfetch's word),
//! a seeded RNG for kill points, and a misbehaving fake seeder (flips a byte in every piece it
//! sends, or rejects every request) that counts what it is asked.
//!
//! Server threads end when their owner is dropped (sockets shut down, threads joined); every
//! process is owned by a `ChildGuard` that kills it by PID.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::Value;
use sha1::{Digest, Sha1};
use tempfile::TempDir;

use crate::support::{
    ChildGuard, DEADLINE, Diagnose, make_torrent_with_piece_log2, poll_until, report, run_bounded,
    scratch_dir, write_payload,
};
use crate::tracker_support::spawn_bitfetch_env;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn path_arg(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

// =============================================================================================
// --json events
// =============================================================================================

/// The complete lines a `--json` bitfetch has printed on stdout so far, parsed. A line that
/// is not JSON breaks the `--json` contract and fails the test.
pub fn events(guard: &ChildGuard) -> Vec<Value> {
    let text = guard.stdout_text();
    // Only lines already terminated: the last one may still be arriving.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{} printed a stdout line that is not JSON ({e}): {line:?}\n{}",
                    guard.name(),
                    guard.diagnostics()
                )
            })
        })
        .collect()
}

/// The `event` field of one event.
pub fn kind(event: &Value) -> &str {
    event["event"].as_str().unwrap_or_default()
}

/// The events of one kind, in order.
pub fn of_kind<'a>(events: &'a [Value], wanted: &'a str) -> impl Iterator<Item = &'a Value> {
    events.iter().filter(move |e| kind(e) == wanted)
}

/// An unsigned integer field, or a panic naming the event.
pub fn field(event: &Value, key: &str) -> u64 {
    event[key]
        .as_u64()
        .unwrap_or_else(|| panic!("event {event} has no unsigned integer {key:?}"))
}

/// `downloaded` of every `progress` event (verified bytes), in order.
pub fn progress(events: &[Value]) -> Vec<u64> {
    of_kind(events, "progress")
        .map(|e| field(e, "downloaded"))
        .collect()
}

/// Polls the events until `pick` finds what it wants. `None` when the process exits first
/// (after a last look at everything it printed) or `timeout` passes.
pub fn wait_event<T>(
    guard: &ChildGuard,
    timeout: Duration,
    mut pick: impl FnMut(&[Value]) -> Option<T>,
) -> Option<T> {
    let mut exited = false;
    poll_until(timeout, || {
        if exited {
            return Some(None);
        }
        if guard.exit_status().is_some() {
            // Let the reader threads drain what it wrote before it exited.
            guard.wait_timeout(Duration::from_secs(2));
            exited = true;
        }
        pick(&events(guard)).map(Some)
    })
    .flatten()
}

/// The address from the `listening` event of a `--json` bitfetch.
pub fn json_listening(guard: &ChildGuard) -> SocketAddr {
    let found = wait_event(guard, DEADLINE, |ev| {
        of_kind(ev, "listening")
            .next()
            .and_then(|e| e["address"].as_str()?.parse().ok())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{} never reported a `listening` event\n{}",
            guard.name(),
            guard.diagnostics()
        )
    })
}

// =============================================================================================
// Torrents and pieces, checked by the test itself
// =============================================================================================

/// A decoded bencode value (reader only; the torrents come from mktorrent).
#[derive(Debug)]
enum Bencode {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Bencode>),
    Dict(Vec<(Vec<u8>, Bencode)>),
}

impl Bencode {
    fn get(&self, key: &str) -> Option<&Bencode> {
        match self {
            Bencode::Dict(entries) => entries
                .iter()
                .find(|(k, _)| k == key.as_bytes())
                .map(|(_, v)| v),
            _ => None,
        }
    }

    fn int(&self) -> Option<i64> {
        match self {
            Bencode::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn bytes(&self) -> Option<&[u8]> {
        match self {
            Bencode::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

fn decode(buf: &[u8], at: &mut usize) -> Option<Bencode> {
    let until = |at: usize, stop: u8| -> Option<usize> {
        buf.get(at..)?
            .iter()
            .position(|&b| b == stop)
            .map(|p| at + p)
    };
    match *buf.get(*at)? {
        b'i' => {
            let end = until(*at + 1, b'e')?;
            let n = std::str::from_utf8(&buf[*at + 1..end]).ok()?.parse().ok()?;
            *at = end + 1;
            Some(Bencode::Int(n))
        }
        b'l' => {
            *at += 1;
            let mut items = Vec::new();
            while *buf.get(*at)? != b'e' {
                items.push(decode(buf, at)?);
            }
            *at += 1;
            Some(Bencode::List(items))
        }
        b'd' => {
            *at += 1;
            let mut entries = Vec::new();
            while *buf.get(*at)? != b'e' {
                let Bencode::Bytes(key) = decode(buf, at)? else {
                    return None;
                };
                entries.push((key, decode(buf, at)?));
            }
            *at += 1;
            Some(Bencode::Dict(entries))
        }
        b'0'..=b'9' => {
            let colon = until(*at, b':')?;
            let len: usize = std::str::from_utf8(&buf[*at..colon]).ok()?.parse().ok()?;
            let bytes = buf.get(colon + 1..colon + 1 + len)?.to_vec();
            *at = colon + 1 + len;
            Some(Bencode::Bytes(bytes))
        }
        _ => None,
    }
}

/// Piece geometry and hashes of a single-file torrent, read from the .torrent file.
#[derive(Debug, Clone)]
pub struct PieceMap {
    pub piece_len: u64,
    pub total: u64,
    pub hashes: Vec<[u8; 20]>,
}

impl PieceMap {
    pub fn from_torrent(torrent: &Path) -> PieceMap {
        let raw = fs::read(torrent).unwrap_or_else(|e| panic!("read {}: {e}", torrent.display()));
        let parsed =
            decode(&raw, &mut 0).unwrap_or_else(|| panic!("{} is not bencoded", torrent.display()));
        let info = parsed.get("info").expect("an info dictionary");
        let piece_len = info
            .get("piece length")
            .and_then(Bencode::int)
            .expect("piece length") as u64;
        let total = info
            .get("length")
            .and_then(Bencode::int)
            .expect("a single-file torrent") as u64;
        let pieces = info.get("pieces").and_then(Bencode::bytes).expect("pieces");
        assert!(
            pieces.len().is_multiple_of(20),
            "pieces is not 20-byte hashes"
        );
        let hashes: Vec<[u8; 20]> = pieces
            .chunks_exact(20)
            .map(|c| c.try_into().expect("20 bytes"))
            .collect();
        assert_eq!(hashes.len() as u64, total.div_ceil(piece_len));
        PieceMap {
            piece_len,
            total,
            hashes,
        }
    }

    pub fn count(&self) -> usize {
        self.hashes.len()
    }

    pub fn len_of(&self, piece: usize) -> u64 {
        let start = piece as u64 * self.piece_len;
        self.piece_len.min(self.total - start)
    }

    /// Re-checks, by SHA-1, the pieces of `file` not yet known good. A piece that cannot be
    /// read whole (the file is missing or short) is not good.
    pub fn recheck(&self, file: &Path, good: &mut [bool]) {
        let Ok(f) = File::open(file) else {
            return;
        };
        let mut buf = vec![0u8; self.piece_len as usize];
        for (piece, ok) in good.iter_mut().enumerate() {
            if *ok {
                continue;
            }
            let len = self.len_of(piece) as usize;
            let at = piece as u64 * self.piece_len;
            if f.read_exact_at(&mut buf[..len], at).is_ok() {
                *ok = <[u8; 20]>::from(Sha1::digest(&buf[..len])) == self.hashes[piece];
            }
        }
    }

    /// Which pieces of `file` pass SHA-1 now.
    pub fn good(&self, file: &Path) -> Vec<bool> {
        let mut good = vec![false; self.count()];
        self.recheck(file, &mut good);
        good
    }

    /// Bytes in the pieces marked good.
    pub fn bytes(&self, good: &[bool]) -> u64 {
        good.iter()
            .enumerate()
            .filter(|(_, ok)| **ok)
            .map(|(piece, _)| self.len_of(piece))
            .sum()
    }
}

/// A pseudo-random payload, a single-file torrent for it (mktorrent, pieces of 2^`piece_log2`
/// bytes) and its piece map.
pub struct Payload {
    pub dir: TempDir,
    pub data: PathBuf,
    pub torrent: PathBuf,
    pub name: String,
    pub size: u64,
    pub pieces: PieceMap,
}

impl Payload {
    pub fn new(name: &str, size: u64, seed: u64, piece_log2: u32, announce: &str) -> Payload {
        let dir = scratch_dir();
        let data = dir.path().join("src").join(name);
        write_payload(&data, size, seed);
        let torrent = dir.path().join(format!("{name}.torrent"));
        make_torrent_with_piece_log2(&data, announce, piece_log2, &torrent);
        let pieces = PieceMap::from_torrent(&torrent);
        assert_eq!(pieces.total, size, "the torrent's length");
        Payload {
            dir,
            data,
            torrent,
            name: name.to_owned(),
            size,
            pieces,
        }
    }

    /// A fresh directory under the payload's scratch directory.
    pub fn dir_for(&self, label: &str) -> PathBuf {
        let d = self.dir.path().join(label);
        fs::create_dir_all(&d).expect("create a directory");
        d
    }

    /// A copy of the payload in its own directory (for a seeder whose file the test damages).
    pub fn copy_data(&self, label: &str) -> PathBuf {
        let copy = self.dir_for(label).join(&self.name);
        fs::copy(&self.data, &copy).expect("copy the payload");
        copy
    }
}

// =============================================================================================
// bitfetch commands
// =============================================================================================

/// `bitfetch seed TORRENT DATA --port 0 --bind IP EXTRA…`, waiting until it listens.
pub fn start_seeder(
    name: &str,
    torrent: &Path,
    data: &Path,
    ip: Ipv4Addr,
    extra: &[&str],
) -> (ChildGuard, SocketAddr) {
    let mut args = vec!["seed".to_owned(), path_arg(torrent), path_arg(data)];
    args.extend(["--port", "0", "--bind"].map(String::from));
    args.push(ip.to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let guard = spawn_bitfetch_env(name, &args, &[]);
    let addr = crate::support::wait_for_listening(&guard);
    (guard, addr)
}

/// `bitfetch download TORRENT -o OUT --port 0 --bind IP --json [--peer P]… EXTRA…`.
pub fn start_download(
    name: &str,
    torrent: &Path,
    out: &Path,
    ip: Ipv4Addr,
    peers: &[SocketAddr],
    extra: &[&str],
) -> ChildGuard {
    let mut args = vec![
        "download".to_owned(),
        path_arg(torrent),
        "-o".to_owned(),
        path_arg(out),
    ];
    args.extend(["--port", "0", "--json", "--bind"].map(String::from));
    args.push(ip.to_string());
    for p in peers {
        args.push("--peer".to_owned());
        args.push(p.to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_bitfetch_env(name, &args, &[])
}

/// `bitfetch verify TORRENT DATA`, run to completion.
pub fn verify(torrent: &Path, data: &Path) -> ChildGuard {
    let mut command = Command::new(crate::support::bitfetch());
    command.arg("verify").arg(torrent).arg(data);
    run_bounded("bitfetch verify", &mut command, Duration::from_secs(60))
}

/// Panics with everyone's diagnostics.
pub fn fail(why: &str, parts: &[&dyn Diagnose]) -> ! {
    panic!("{}", report(why, parts))
}

/// A tracker URL on a port nothing listens on (bound a moment ago, then closed).
pub fn closed_port_url() -> String {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a probe port");
    let addr = listener.local_addr().expect("local_addr");
    drop(listener);
    format!("http://{addr}/announce")
}

// =============================================================================================
// A seeded RNG (splitmix64) for reproducible kill points
// =============================================================================================

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

// =============================================================================================
// A misbehaving fake seeder
// =============================================================================================

const PROTOCOL: &[u8] = b"BitTorrent protocol";
/// Largest block the fake serves (bitfetch asks for 16 KiB).
const MAX_BLOCK: u32 = 128 * 1024;
const ID_UNCHOKE: u8 = 1;
const ID_BITFIELD: u8 = 5;
const ID_REQUEST: u8 = 6;
const ID_PIECE: u8 = 7;
const ID_HAVE_ALL: u8 = 14;
const ID_REJECT: u8 = 16;

/// How the fake seeder misbehaves. Either way it claims every piece and unchokes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// A plain BEP 3 peer (no extension bits) that answers every request with the real bytes,
    /// except that the block at offset 0 of each piece has its first byte inverted: every piece
    /// it sends fails its hash.
    FlipFirstByte,
    /// A BEP 6 peer that answers every request with a reject, as a seeder does whose data
    /// changed on disk under it.
    RejectAll,
}

#[derive(Default)]
struct FakeShared {
    stop: AtomicBool,
    connections: AtomicU64,
    /// Blocks sent, and how many of them had a byte flipped.
    blocks: AtomicU64,
    flipped: AtomicU64,
    /// Requests received, by (piece, offset).
    requests: Mutex<HashMap<(u32, u32), u64>>,
    /// Clones of the open connections, shut down on drop to end their threads.
    streams: Mutex<Vec<TcpStream>>,
    /// How each connection ended.
    ends: Mutex<Vec<String>>,
}

/// A fake seeder on its own loopback address; see [`Misbehaviour`].
pub struct FakeSeeder {
    addr: SocketAddr,
    how: Misbehaviour,
    shared: Arc<FakeShared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeSeeder {
    pub fn start(ip: Ipv4Addr, data: &Path, pieces: &PieceMap, how: Misbehaviour) -> FakeSeeder {
        let listener = TcpListener::bind((ip, 0)).expect("bind the fake seeder");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(FakeShared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            let data = data.to_path_buf();
            let pieces = pieces.clone();
            thread::Builder::new()
                .name("fake-seeder".into())
                .spawn(move || accept_loop(&listener, &data, &pieces, how, &shared))
                .expect("spawn the fake seeder")
        };
        FakeSeeder {
            addr,
            how,
            shared,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    pub fn blocks(&self) -> u64 {
        self.shared.blocks.load(Ordering::SeqCst)
    }

    pub fn flipped(&self) -> u64 {
        self.shared.flipped.load(Ordering::SeqCst)
    }

    /// All requests received.
    pub fn requests(&self) -> u64 {
        lock(&self.shared.requests).values().sum()
    }

    /// Distinct blocks requested.
    pub fn distinct_blocks(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// The most times one block was requested.
    pub fn max_requests_per_block(&self) -> u64 {
        lock(&self.shared.requests)
            .values()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

impl Drop for FakeSeeder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in lock(&self.shared.streams).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for FakeSeeder {
    fn diagnostics(&self) -> String {
        format!(
            "===== fake seeder ({:?}) on {}: {} connection(s), {} request(s) for {} block(s) \
             (at most {} for one), {} block(s) sent, {} flipped; ends: {:?} =====\n",
            self.how,
            self.addr,
            self.connections(),
            self.requests(),
            self.distinct_blocks(),
            self.max_requests_per_block(),
            self.blocks(),
            self.flipped(),
            lock(&self.shared.ends)
        )
    }
}

fn accept_loop(
    listener: &TcpListener,
    data: &Path,
    pieces: &PieceMap,
    how: Misbehaviour,
    shared: &Arc<FakeShared>,
) {
    let mut handlers = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, from)) => {
                shared.connections.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    lock(&shared.streams).push(clone);
                }
                let (shared, data, pieces) =
                    (Arc::clone(shared), data.to_path_buf(), pieces.clone());
                handlers.push(thread::spawn(move || {
                    let end = match serve_fake(stream, &data, &pieces, how, &shared) {
                        Ok(()) => "closed by the peer".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    lock(&shared.ends).push(format!("{from}: {end}"));
                }));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn frame(out: &mut Vec<u8>, id: u8, payload: &[u8]) {
    out.extend((payload.len() as u32 + 1).to_be_bytes());
    out.push(id);
    out.extend_from_slice(payload);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Handshake (echoing the info hash asked for), the claim to have everything, an unchoke.
fn fake_hello(theirs: &[u8; 68], pieces: &PieceMap, how: Misbehaviour) -> Vec<u8> {
    let mut hello = vec![PROTOCOL.len() as u8];
    hello.extend_from_slice(PROTOCOL);
    let mut reserved = [0u8; 8];
    if how == Misbehaviour::RejectAll {
        reserved[7] |= 0x04; // BEP 6 Fast extension
    }
    hello.extend(reserved);
    hello.extend_from_slice(&theirs[28..48]);
    hello.extend_from_slice(b"-FK0001-misbehaving0");
    let fast = theirs[20 + 7] & 0x04 != 0;
    if how == Misbehaviour::RejectAll && fast {
        frame(&mut hello, ID_HAVE_ALL, &[]);
    } else {
        let mut bits = vec![0u8; pieces.count().div_ceil(8)];
        for i in 0..pieces.count() {
            bits[i / 8] |= 0x80 >> (i % 8);
        }
        frame(&mut hello, ID_BITFIELD, &bits);
    }
    frame(&mut hello, ID_UNCHOKE, &[]);
    hello
}

fn serve_fake(
    mut stream: TcpStream,
    data: &Path,
    pieces: &PieceMap,
    how: Misbehaviour,
    shared: &FakeShared,
) -> io::Result<()> {
    let file = File::open(data)?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut theirs = [0u8; 68];
    stream.read_exact(&mut theirs)?;
    if theirs[0] as usize != PROTOCOL.len() || &theirs[1..20] != PROTOCOL {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            "not a BitTorrent handshake",
        ));
    }
    stream.write_all(&fake_hello(&theirs, pieces, how))?;
    let mut msg = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            continue;
        }
        if len > 1 << 20 {
            return Err(io::Error::new(ErrorKind::InvalidData, "frame too long"));
        }
        msg.resize(len, 0);
        stream.read_exact(&mut msg)?;
        if msg[0] != ID_REQUEST || len != 13 {
            continue; // interested, have, cancel…: a fake only answers requests
        }
        let (index, begin, size) = (be32(&msg[1..]), be32(&msg[5..]), be32(&msg[9..]));
        let offset = u64::from(index) * pieces.piece_len + u64::from(begin);
        if index as usize >= pieces.count()
            || size == 0
            || size > MAX_BLOCK
            || offset + u64::from(size) > pieces.total
        {
            return Err(io::Error::new(ErrorKind::InvalidData, "bad request"));
        }
        *lock(&shared.requests).entry((index, begin)).or_default() += 1;
        let mut out = Vec::new();
        match how {
            Misbehaviour::RejectAll => frame(&mut out, ID_REJECT, &msg[1..13]),
            Misbehaviour::FlipFirstByte => {
                let mut block = vec![0u8; size as usize];
                file.read_exact_at(&mut block, offset)?;
                if begin == 0 {
                    block[0] = !block[0];
                    shared.flipped.fetch_add(1, Ordering::SeqCst);
                }
                let mut payload = Vec::with_capacity(8 + block.len());
                payload.extend(index.to_be_bytes());
                payload.extend(begin.to_be_bytes());
                payload.extend_from_slice(&block);
                frame(&mut out, ID_PIECE, &payload);
                shared.blocks.fetch_add(1, Ordering::SeqCst);
            }
        }
        stream.write_all(&out)?;
    }
}

/// Waits until `check` holds; on timeout fails with `why` and the parties' diagnostics.
pub fn wait_until(
    timeout: Duration,
    why: &str,
    parts: &[&dyn Diagnose],
    mut check: impl FnMut() -> bool,
) {
    if poll_until(timeout, || check().then_some(())).is_none() {
        fail(&format!("{why} (waited {timeout:?})"), parts);
    }
}
