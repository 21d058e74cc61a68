//! Helpers for `tests/hostile.rs`: torrents bencoded in memory, a sandbox with a sentinel file
//! beside the output directory, hand-written peers that speak the wire protocol byte by byte,
//! a scripted HTTP tracker that can stream endless replies, a memory watch over
//! `/proc/PID/status`, and a runner that executes independent cases in parallel threads.
//!
//! Nothing here trusts bitfetch's own code: the bencoder, the wire codec, gzip and the hashes
//! are written for the tests. Every party binds its own loopback address (127.66.x.y); every
//! wait is a poll with a deadline; every process is owned by a guard that kills it by PID.
//!
//! Lives in a directory (`hostile_support/mod.rs`) so cargo does not build it as a test crate.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};
use tempfile::TempDir;

use crate::support::{ChildGuard, poll_until};

/// Peak resident memory allowed to a bitfetch process under attack.
pub const MEMORY_LIMIT_KIB: u64 = 100 * 1024;
/// How long bitfetch may take to close a connection the protocol says it must drop.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(30);
/// Hang guard for a short command (`info`, a refused `download`).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// =============================================================================================
// Addresses
// =============================================================================================

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other party of this test process uses: 127.66.0.1, 127.66.0.2, …
/// (a range of its own, so it never meets the 127.0.0.x addresses of the other test files).
pub fn fresh_ip() -> Ipv4Addr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    assert!(n < 250 * 250, "ran out of 127.66.x.y addresses");
    Ipv4Addr::new(127, 66, (n / 250) as u8, (n % 250 + 1) as u8)
}

pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

// =============================================================================================
// Bencode (writer only)
// =============================================================================================

/// A bencode value. Dictionaries are kept sorted by raw key, as the format requires.
#[derive(Debug, Clone)]
pub enum Ben {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Ben>),
    Dict(BTreeMap<Vec<u8>, Ben>),
}

impl Ben {
    pub fn bytes(b: impl AsRef<[u8]>) -> Ben {
        Ben::Bytes(b.as_ref().to_vec())
    }

    pub fn dict(pairs: Vec<(&str, Ben)>) -> Ben {
        Ben::Dict(
            pairs
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
            Ben::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Ben::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Ben::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            Ben::Dict(map) => {
                out.push(b'd');
                for (k, v) in map {
                    Ben::Bytes(k.clone()).encode_into(out);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
        }
    }
}

// =============================================================================================
// Content and torrents
// =============================================================================================

pub const BLOCK: u32 = 16 * 1024;
pub const PIECE_LEN: u32 = 32 * 1024;

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The bytes of a torrent (all files concatenated) and their piece geometry.
#[derive(Debug)]
pub struct Content {
    pub data: Vec<u8>,
    pub piece_len: u32,
}

impl Content {
    pub fn new(size: usize, seed: u64) -> Content {
        Content {
            data: pseudo_random(size, seed),
            piece_len: PIECE_LEN,
        }
    }

    pub fn piece_count(&self) -> u32 {
        self.data.len().div_ceil(self.piece_len as usize) as u32
    }

    pub fn piece_size(&self, piece: u32) -> u32 {
        let start = piece as usize * self.piece_len as usize;
        (self.data.len() - start).min(self.piece_len as usize) as u32
    }

    /// The SHA-1 of every piece, concatenated (the `pieces` field).
    pub fn piece_hashes(&self) -> Vec<u8> {
        self.data
            .chunks(self.piece_len as usize)
            .flat_map(|piece| <[u8; 20]>::from(Sha1::digest(piece)))
            .collect()
    }

    /// `len` bytes at `offset` of `piece`, if that range lies inside the piece.
    pub fn block(&self, piece: u32, offset: u32, len: u32) -> Option<&[u8]> {
        if piece >= self.piece_count()
            || u64::from(offset) + u64::from(len) > u64::from(self.piece_size(piece))
        {
            return None;
        }
        let start = piece as usize * self.piece_len as usize + offset as usize;
        Some(&self.data[start..start + len as usize])
    }

    /// Every (piece, offset, len) block of the torrent, in order.
    pub fn blocks(&self) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        for piece in 0..self.piece_count() {
            let size = self.piece_size(piece);
            let mut offset = 0;
            while offset < size {
                let len = BLOCK.min(size - offset);
                out.push((piece, offset, len));
                offset += len;
            }
        }
        out
    }
}

/// The info dict of a single-file torrent.
pub fn single_info(name: &[u8], content: &Content) -> Ben {
    Ben::dict(vec![
        ("length", Ben::Int(content.data.len() as i64)),
        ("name", Ben::bytes(name)),
        ("piece length", Ben::Int(i64::from(content.piece_len))),
        ("pieces", Ben::Bytes(content.piece_hashes())),
    ])
}

/// The info dict of a multi-file torrent; each file is (path elements, length), and the
/// lengths must add up to the content's size.
pub fn multi_info(name: &[u8], files: &[(Vec<Vec<u8>>, u64)], content: &Content) -> Ben {
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert_eq!(total, content.data.len() as u64, "file lengths vs content");
    let files = files
        .iter()
        .map(|(path, len)| {
            Ben::dict(vec![
                ("length", Ben::Int(*len as i64)),
                ("path", Ben::List(path.iter().map(Ben::bytes).collect())),
            ])
        })
        .collect();
    Ben::dict(vec![
        ("files", Ben::List(files)),
        ("name", Ben::bytes(name)),
        ("piece length", Ben::Int(i64::from(content.piece_len))),
        ("pieces", Ben::Bytes(content.piece_hashes())),
    ])
}

/// A .torrent around `info`, with the given announce-list tiers (none: a trackerless torrent
/// whose peers come from `--peer`). Returns the bytes and the info hash.
pub fn torrent_bytes(info: &Ben, tiers: &[Vec<String>]) -> (Vec<u8>, [u8; 20]) {
    let info_bytes = info.encode();
    let info_hash: [u8; 20] = Sha1::digest(&info_bytes).into();
    let mut top = BTreeMap::new();
    top.insert(b"info".to_vec(), info.clone());
    if let Some(first) = tiers.first().and_then(|t| t.first()) {
        top.insert(b"announce".to_vec(), Ben::bytes(first));
        top.insert(
            b"announce-list".to_vec(),
            Ben::List(
                tiers
                    .iter()
                    .map(|t| Ben::List(t.iter().map(Ben::bytes).collect()))
                    .collect(),
            ),
        );
    }
    (Ben::Dict(top).encode(), info_hash)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

// =============================================================================================
// Sandbox
// =============================================================================================

pub const SENTINEL: &[u8] = b"sentinel: must not change\n";

/// One case's files:
///   ROOT/t.torrent            the torrent
///   ROOT/data/                the seeder's data
///   ROOT/box/out/             the download directory
///   ROOT/box/sentinel         beside it: must never change
///   ROOT/box/outside/         beside it: targets for planted symlinks, must never change
pub struct Sandbox {
    _tmp: TempDir,
    pub root: PathBuf,
    pub torrent: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub sentinel: PathBuf,
    pub outside: PathBuf,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let tmp = tempfile::Builder::new()
            .prefix("bitfetch-hostile-")
            .tempdir()
            .expect("create a temporary directory");
        let root = tmp.path().canonicalize().expect("canonical temp dir");
        let b = root.join("box");
        let sandbox = Sandbox {
            torrent: root.join("t.torrent"),
            data: root.join("data"),
            out: b.join("out"),
            sentinel: b.join("sentinel"),
            outside: b.join("outside"),
            root,
            _tmp: tmp,
        };
        for dir in [&sandbox.data, &sandbox.out, &sandbox.outside] {
            fs::create_dir_all(dir).expect("create a sandbox directory");
        }
        fs::write(&sandbox.sentinel, SENTINEL).expect("write the sentinel");
        sandbox
    }

    pub fn write_torrent(&self, bytes: &[u8]) {
        fs::write(&self.torrent, bytes).expect("write the torrent");
    }

    /// The sentinel beside OUT is still a regular file with its bytes, and nothing new
    /// appeared beside OUT.
    pub fn sentinel_problem(&self) -> Option<String> {
        match fs::symlink_metadata(&self.sentinel) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => return Some("the sentinel beside OUT is no longer a regular file".into()),
            Err(e) => return Some(format!("the sentinel beside OUT is gone: {e}")),
        }
        if fs::read(&self.sentinel).ok().as_deref() != Some(SENTINEL) {
            return Some("the sentinel beside OUT was modified".into());
        }
        let mut beside: Vec<String> = fs::read_dir(self.out.parent().expect("OUT has a parent"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        beside.sort();
        if beside != ["out", "outside", "sentinel"] {
            return Some(format!("the directory holding OUT now holds {beside:?}"));
        }
        None
    }

    pub fn assert_sentinel(&self, context: &dyn Fn() -> String) {
        if let Some(problem) = self.sentinel_problem() {
            panic!("{problem}\n{}", context());
        }
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

/// Every entry under `root` (not following symlinks), relative, sorted.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).expect("under root").to_path_buf());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A snapshot of a directory tree (not following symlinks): path → file bytes or link target.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walk(root)
        .into_iter()
        .map(|rel| {
            let full = root.join(&rel);
            let meta = fs::symlink_metadata(&full).expect("stat a walked entry");
            let what = if meta.file_type().is_symlink() {
                let target = fs::read_link(&full).expect("read a link");
                format!("link -> {}", target.display()).into_bytes()
            } else if meta.is_dir() {
                b"<dir>".to_vec()
            } else {
                fs::read(&full).unwrap_or_default()
            };
            (rel, what)
        })
        .collect()
}

// =============================================================================================
// Processes
// =============================================================================================

/// Starts bitfetch with `args`; on drop it gets SIGTERM, then SIGKILL after 10 s.
pub fn start_bitfetch(label: &str, args: &[String]) -> ChildGuard {
    let mut command = Command::new(crate::support::bitfetch());
    command.args(args).env("RUST_BACKTRACE", "1");
    ChildGuard::spawn(label, &mut command).with_stop_signal(libc::SIGTERM, Duration::from_secs(10))
}

pub fn s(x: impl ToString) -> String {
    x.to_string()
}

pub fn path_arg(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
}

/// A crash-like end: a signal, a panic message, or an abort-like exit code.
pub fn crash_problem(status: Option<ExitStatus>, stderr: &str) -> Option<String> {
    if stderr.contains("panicked") {
        return Some("bitfetch panicked".into());
    }
    let status = status?;
    if let Some(sig) = status.signal() {
        return Some(format!("bitfetch was killed by signal {sig}"));
    }
    match status.code() {
        Some(c @ (101 | 134 | 139)) => Some(format!("bitfetch exited with crash-like code {c}")),
        _ => None,
    }
}

/// A one-shot child whose stdout and stderr are kept as raw bytes (to look for control
/// characters and invalid UTF-8 in what bitfetch prints). Killed by PID if it outlives its
/// deadline or is dropped.
pub struct RawRun {
    pub desc: String,
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
}

impl RawRun {
    pub fn run(desc: &str, args: &[String], deadline: Duration) -> RawRun {
        let mut child: Child = Command::new(crate::support::bitfetch())
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let drain = |mut r: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut all = Vec::new();
                let _ = r.read_to_end(&mut all);
                all
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
        let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
        let pid = child.id();
        let mut status = poll_until(deadline, || child.try_wait().ok().flatten());
        let timed_out = status.is_none();
        if timed_out {
            // Not reaped yet, so the PID is still this child's.
            // SAFETY: kill(2) on a PID we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            status = child.wait().ok();
        }
        RawRun {
            desc: desc.to_owned(),
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
            timed_out,
        }
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn crash_problem(&self) -> Option<String> {
        crash_problem(self.status, &self.stderr_text())
    }

    /// The first `bitfetch: error:` line.
    pub fn error_line(&self) -> Option<String> {
        self.stderr_text()
            .lines()
            .find(|l| l.starts_with("bitfetch: error:"))
            .map(str::to_owned)
    }

    pub fn dump(&self) -> String {
        let show = |b: &[u8]| {
            let text = show_bytes(b);
            if text.len() > 6000 {
                format!("{}… ({} bytes)", &text[..6000], b.len())
            } else {
                text
            }
        };
        format!(
            "{}\n  status: {:?}{}\n  stdout: {}\n  stderr: {}",
            self.desc,
            self.status,
            if self.timed_out {
                " (killed by the hang guard)"
            } else {
                ""
            },
            show(&self.stdout),
            show(&self.stderr)
        )
    }
}

/// Bytes shown for people: printable ASCII and newlines as is, the rest escaped.
pub fn show_bytes(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if (0x20..0x7f).contains(&c) || c == b'\n' {
            s.push(c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
    }
    s
}

/// What must never reach a terminal from bitfetch's output: invalid UTF-8, C0 controls other
/// than newline and tab, DEL, C1 controls, and bidirectional overrides/isolates/marks.
pub fn unsafe_output(label: &str, bytes: &[u8]) -> Vec<String> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return vec![format!("{label} is not valid UTF-8: {e}")],
    };
    let mut found = Vec::new();
    for c in text.chars() {
        let bad = (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}');
        if bad {
            let desc = format!("U+{:04X}", c as u32);
            if !found.contains(&desc) {
                found.push(desc);
            }
        }
    }
    if found.is_empty() {
        Vec::new()
    } else {
        vec![format!("{label} carries raw {}", found.join(", "))]
    }
}

// =============================================================================================
// Memory
// =============================================================================================

/// A `kB` field of `/proc/PID/status`, if that process is still a bitfetch.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?;
    if name.trim() != "bitfetch" {
        return None;
    }
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Samples a process's peak resident size (`VmHWM`, the kernel's own high-water mark, so a
/// spike between two samples is not missed) every few milliseconds until dropped.
pub struct MemWatch {
    pid: u32,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MemWatch {
    pub fn start(guard: &ChildGuard) -> MemWatch {
        let pid = guard.pid();
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (Arc::clone(&peak), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(kib) = proc_status_kib(pid, "VmHWM") {
                        peak.fetch_max(kib, Ordering::SeqCst);
                    }
                    thread::sleep(Duration::from_millis(10));
                }
            })
        };
        MemWatch {
            pid,
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest `VmHWM` seen so far (reading it once more now).
    pub fn peak_kib(&self) -> u64 {
        if let Some(kib) = proc_status_kib(self.pid, "VmHWM") {
            self.peak.fetch_max(kib, Ordering::SeqCst);
        }
        self.peak.load(Ordering::SeqCst)
    }

    /// Panics unless the peak stayed under [`MEMORY_LIMIT_KIB`] (and was measured at all).
    pub fn assert_bounded(&self, what: &str, context: &dyn Fn() -> String) {
        let peak = self.peak_kib();
        assert!(
            peak > 0,
            "{what}: the memory of pid {} was never measured\n{}",
            self.pid,
            context()
        );
        eprintln!("memory: {what}: peak resident {peak} KiB");
        assert!(
            peak < MEMORY_LIMIT_KIB,
            "{what}: bitfetch's peak resident memory reached {peak} KiB (limit {MEMORY_LIMIT_KIB} KiB)\n{}",
            context()
        );
    }
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// =============================================================================================
// The peer wire protocol, by hand
// =============================================================================================

pub const HANDSHAKE_LEN: usize = 68;
pub const NO_EXTENSIONS: [u8; 8] = [0; 8];
/// BEP 6 Fast extension: reserved byte 7, bit 0x04.
pub const FAST: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 0x04];

pub const ID_CHOKE: u8 = 0;
pub const ID_UNCHOKE: u8 = 1;
pub const ID_INTERESTED: u8 = 2;
pub const ID_HAVE: u8 = 4;
pub const ID_BITFIELD: u8 = 5;
pub const ID_REQUEST: u8 = 6;
pub const ID_PIECE: u8 = 7;
pub const ID_HAVE_ALL: u8 = 14;
pub const ID_REJECT: u8 = 16;
pub const ID_EXTENDED: u8 = 20;

static NEXT_PEER_ID: AtomicU32 = AtomicU32::new(0);

/// A peer id of our own, different for every fake peer.
pub fn fake_peer_id() -> [u8; 20] {
    let n = NEXT_PEER_ID.fetch_add(1, Ordering::Relaxed);
    let mut id = *b"-HX0001-000000000000";
    id[8..].copy_from_slice(format!("{n:012}").as_bytes());
    id
}

pub fn handshake(info_hash: &[u8; 20], peer_id: &[u8; 20], reserved: [u8; 8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HANDSHAKE_LEN);
    h.push(19);
    h.extend_from_slice(b"BitTorrent protocol");
    h.extend_from_slice(&reserved);
    h.extend_from_slice(info_hash);
    h.extend_from_slice(peer_id);
    h
}

/// A frame: 4-byte big-endian length, id, payload.
pub fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(id);
    f.extend_from_slice(payload);
    f
}

fn be(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

pub fn msg_have(piece: u32) -> Vec<u8> {
    frame(ID_HAVE, &be(&[piece]))
}

pub fn msg_request(piece: u32, offset: u32, len: u32) -> Vec<u8> {
    frame(ID_REQUEST, &be(&[piece, offset, len]))
}

pub fn msg_reject(piece: u32, offset: u32, len: u32) -> Vec<u8> {
    frame(ID_REJECT, &be(&[piece, offset, len]))
}

pub fn msg_piece(piece: u32, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut payload = be(&[piece, offset]);
    payload.extend_from_slice(data);
    frame(ID_PIECE, &payload)
}

/// A bitfield with the first `pieces` bits set and the spare bits clear.
pub fn full_bitfield(pieces: u32) -> Vec<u8> {
    let mut bits = vec![0xffu8; pieces.div_ceil(8) as usize];
    let spare = bits.len() as u32 * 8 - pieces;
    if spare > 0 {
        *bits.last_mut().expect("at least one byte") = 0xffu8 << spare;
    }
    bits
}

/// One frame bitfetch sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(Vec<u8>),
    Request { piece: u32, offset: u32, len: u32 },
    Piece { piece: u32, offset: u32, len: usize },
    Other { id: u8, len: usize },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn decode(payload: &[u8]) -> Msg {
    let Some((&id, rest)) = payload.split_first() else {
        return Msg::KeepAlive;
    };
    match (id, rest.len()) {
        (0, 0) => Msg::Choke,
        (1, 0) => Msg::Unchoke,
        (2, 0) => Msg::Interested,
        (3, 0) => Msg::NotInterested,
        (4, 4) => Msg::Have(u32_at(rest, 0)),
        (5, _) => Msg::Bitfield(rest.to_vec()),
        (6, 12) => Msg::Request {
            piece: u32_at(rest, 0),
            offset: u32_at(rest, 4),
            len: u32_at(rest, 8),
        },
        (7, n) if n >= 8 => Msg::Piece {
            piece: u32_at(rest, 0),
            offset: u32_at(rest, 4),
            len: n - 8,
        },
        (id, len) => Msg::Other { id, len },
    }
}

/// How a connection ended from our side's point of view.
pub type Closed = String;

/// A hand-driven peer connection.
pub struct Wire {
    pub stream: TcpStream,
    rbuf: Vec<u8>,
    pub remote: SocketAddr,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        let remote = stream.peer_addr().expect("peer_addr");
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        Wire {
            stream,
            rbuf: Vec::new(),
            remote,
        }
    }

    /// Dials `to` from `from` (a loopback address of our own).
    pub fn dial(from: Ipv4Addr, to: SocketAddr) -> io::Result<Wire> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(from), 0)))?;
        socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(10))?;
        Ok(Wire::new(socket.into()))
    }

    /// Writes `bytes`; a failure means bitfetch already closed the connection.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Closed> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write failed: {e}"))
    }

    /// Reads more bytes until `deadline`: `Ok(false)` when none came, `Err` when closed.
    fn fill(&mut self, deadline: Instant) -> Result<bool, Closed> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let _ = self.stream.set_read_timeout(Some(
            left.clamp(Duration::from_millis(1), Duration::from_millis(200)),
        ));
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("end of stream".into()),
            Ok(n) => {
                self.rbuf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(format!("connection error: {e}")),
        }
    }

    /// Reads the other side's 68-byte handshake.
    pub fn read_handshake(&mut self, within: Duration) -> Result<Vec<u8>, Closed> {
        let deadline = Instant::now() + within;
        while self.rbuf.len() < HANDSHAKE_LEN {
            if Instant::now() >= deadline {
                return Err(format!("no handshake within {within:?}"));
            }
            self.fill(deadline)?;
        }
        let rest = self.rbuf.split_off(HANDSHAKE_LEN);
        Ok(std::mem::replace(&mut self.rbuf, rest))
    }

    /// The next frame, `Ok(None)` if none came before `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Result<Option<Msg>, Closed> {
        loop {
            if self.rbuf.len() >= 4 {
                let len = u32_at(&self.rbuf, 0) as usize;
                if len > 2 << 20 {
                    return Err(format!("bitfetch sent a frame of {len} bytes"));
                }
                if self.rbuf.len() >= 4 + len {
                    let payload: Vec<u8> = self.rbuf.drain(..4 + len).skip(4).collect();
                    return Ok(Some(decode(&payload)));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.fill(deadline)?;
        }
    }

    /// Reads until a frame matching `want` arrives (`Ok(None)` at the deadline).
    pub fn wait_for(
        &mut self,
        within: Duration,
        want: impl Fn(&Msg) -> bool,
    ) -> Result<Option<Msg>, Closed> {
        let deadline = Instant::now() + within;
        while let Some(m) = self.next(deadline)? {
            if want(&m) {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Reads and discards until bitfetch closes the connection; `Ok` says how long that took,
    /// `Err` that it was still open after `within`.
    pub fn expect_closed(&mut self, within: Duration) -> Result<String, String> {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            match self.fill(deadline) {
                Err(how) => {
                    return Ok(format!(
                        "closed by bitfetch ({how}) after {:?}",
                        start.elapsed()
                    ));
                }
                Ok(_) => {
                    self.rbuf.clear();
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "bitfetch kept the connection open for {within:?} after the violation"
                        ));
                    }
                }
            }
        }
    }
}

/// Accepts one connection on `listener` within `within`.
pub fn accept_within(listener: &TcpListener, within: Duration) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let got = poll_until(within, || match listener.accept() {
        Ok((stream, _)) => Some(Ok(stream)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => Some(Err(format!("accept failed: {e}"))),
    });
    let stream = got.unwrap_or_else(|| Err(format!("nobody connected within {within:?}")))?;
    stream.set_nonblocking(false).expect("blocking stream");
    Ok(stream)
}

/// Answers bitfetch's requests with the right bytes, as a well-behaved seeder would, until
/// bitfetch closes the connection or `within` passes. Returns the number of blocks served.
pub fn serve_requests(wire: &mut Wire, content: &Content, within: Duration) -> Result<u32, String> {
    let deadline = Instant::now() + within;
    let mut served = 0;
    loop {
        match wire.next(deadline) {
            Ok(Some(Msg::Request { piece, offset, len })) => {
                let Some(data) = content.block(piece, offset, len) else {
                    return Err(format!(
                        "bitfetch requested a block outside the torrent: {piece}/{offset}/{len}"
                    ));
                };
                if wire.send(&msg_piece(piece, offset, data)).is_err() {
                    return Ok(served);
                }
                served += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("still connected after {within:?}")),
            Err(_) => return Ok(served),
        }
    }
}

// =============================================================================================
// A scripted HTTP tracker that can stream
// =============================================================================================

/// One request head the tracker read.
#[derive(Debug, Clone)]
pub struct HttpReq {
    pub at: Instant,
    pub target: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl HttpReq {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A query parameter's raw text (not percent-decoded).
    pub fn param(&self, key: &str) -> Option<&str> {
        let (_, query) = self.target.split_once('?')?;
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// What the tracker does with a request.
pub enum HttpReply {
    /// These exact bytes (status line, headers, body), then close.
    Raw(Vec<u8>),
    /// `prefix`, then `unit` repeated `units` times (or until the client stops reading), then
    /// close. The head is part of `prefix` (or, for an endless head, of `unit`).
    Stream {
        prefix: Vec<u8>,
        unit: Vec<u8>,
        units: u64,
    },
}

/// How one streamed reply went.
#[derive(Debug, Clone)]
pub struct StreamLog {
    pub planned: u64,
    pub written: u64,
    pub end: String,
}

type Script = Box<dyn Fn(&HttpReq, usize) -> HttpReply + Send>;

struct HttpShared {
    requests: Mutex<Vec<HttpReq>>,
    streams: Mutex<Vec<StreamLog>>,
    script: Mutex<Script>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    stop: AtomicBool,
}

/// An HTTP/1.1 tracker on its own loopback address; one thread per connection.
pub struct HttpTracker {
    pub addr: SocketAddr,
    shared: Arc<HttpShared>,
    thread: Option<JoinHandle<()>>,
}

impl HttpTracker {
    /// Starts a tracker that answers 404 until [`HttpTracker::set_script`].
    pub fn start() -> HttpTracker {
        let listener = TcpListener::bind((fresh_ip(), 0)).expect("bind the scripted tracker");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(HttpShared {
            requests: Mutex::new(Vec::new()),
            streams: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(|_, _| {
                HttpReply::Raw(http_response(404, &[], b"no script"))
            })),
            workers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                while !shared.stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let worker = {
                                let shared = Arc::clone(&shared);
                                thread::spawn(move || serve_one(stream, &shared))
                            };
                            lock(&shared.workers).push(worker);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        HttpTracker {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn set_script(&self, script: impl Fn(&HttpReq, usize) -> HttpReply + Send + 'static) {
        *lock(&self.shared.script) = Box::new(script);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<HttpReq> {
        lock(&self.shared.requests).clone()
    }

    pub fn streams(&self) -> Vec<StreamLog> {
        lock(&self.shared.streams).clone()
    }

    pub fn describe(&self) -> String {
        let mut out = format!("===== scripted tracker {} =====\n", self.addr);
        for r in self.requests().iter().take(40) {
            let _ = writeln!(
                out,
                "  {:?} ago: GET {}",
                r.at.elapsed(),
                show_bytes(r.target.as_bytes())
            );
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

fn serve_one(mut stream: TcpStream, shared: &HttpShared) {
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
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_default()
        .to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let request = HttpReq {
        at: Instant::now(),
        target,
        headers,
    };
    let index = {
        let mut requests = lock(&shared.requests);
        requests.push(request.clone());
        requests.len() - 1
    };
    let reply = (lock(&shared.script))(&request, index);
    match reply {
        HttpReply::Raw(bytes) => {
            let _ = stream.write_all(&bytes);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Let the client read at its pace before the socket goes away.
            let _ = stream.read(&mut chunk);
        }
        HttpReply::Stream {
            prefix,
            unit,
            units,
        } => {
            let planned = prefix.len() as u64 + unit.len() as u64 * units;
            let mut written = 0u64;
            let mut end = "complete".to_owned();
            let mut result = stream.write_all(&prefix);
            if result.is_ok() {
                written += prefix.len() as u64;
                for _ in 0..units {
                    if shared.stop.load(Ordering::SeqCst) {
                        end = "tracker stopped".into();
                        break;
                    }
                    result = stream.write_all(&unit);
                    if result.is_err() {
                        break;
                    }
                    written += unit.len() as u64;
                }
            }
            if let Err(e) = result {
                end = format!("the client stopped reading: {e}");
            }
            lock(&shared.streams).push(StreamLog {
                planned,
                written,
                end,
            });
        }
    }
}

/// A whole HTTP/1.1 response with `Content-Length` and `Connection: close`.
pub fn http_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n",
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

/// Compact IPv4 peers: 6 bytes each.
pub fn compact(peers: &[SocketAddrV4]) -> Vec<u8> {
    peers
        .iter()
        .flat_map(|p| {
            let mut e = p.ip().octets().to_vec();
            e.extend_from_slice(&p.port().to_be_bytes());
            e
        })
        .collect()
}

pub fn announce_body(interval: i64, peers: &[u8]) -> Vec<u8> {
    Ben::dict(vec![
        ("interval", Ben::Int(interval)),
        ("peers", Ben::Bytes(peers.to_vec())),
    ])
    .encode()
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
// A listener that only counts connection attempts
// =============================================================================================

/// A peer address bitfetch must never dial: counts who connects.
pub struct Trap {
    pub addr: SocketAddr,
    hits: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trap {
    pub fn start() -> Trap {
        let listener = TcpListener::bind((fresh_ip(), 0)).expect("bind the trap");
        listener.set_nonblocking(true).expect("non-blocking trap");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (hits, stop) = (Arc::clone(&hits), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok(_) => {
                            hits.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
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

    pub fn hits(&self) -> u32 {
        self.hits.load(Ordering::SeqCst)
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
// Running independent cases in parallel
// =============================================================================================

pub type Case<'a> = (String, Box<dyn FnOnce() + Send + 'a>);

pub fn case<'a>(name: impl Into<String>, body: impl FnOnce() + Send + 'a) -> Case<'a> {
    (name.into(), Box::new(body))
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "(a panic without a message)".to_owned()
    }
}

/// Runs every case on its own thread at once (most of their time is spent waiting on
/// sockets and processes) and fails with the messages of all the cases that failed.
pub fn run_parallel(cases: Vec<Case<'_>>) {
    let total = cases.len();
    let failures: Vec<String> = thread::scope(|scope| {
        let running: Vec<_> = cases
            .into_iter()
            .map(|(name, body)| {
                let handle = thread::Builder::new()
                    .name(name.clone())
                    .spawn_scoped(scope, body)
                    .expect("spawn a case thread");
                (name, handle)
            })
            .collect();
        running
            .into_iter()
            .filter_map(|(name, handle)| {
                handle
                    .join()
                    .err()
                    .map(|e| format!("case `{name}`: {}", panic_text(&*e)))
            })
            .collect()
    });
    if !failures.is_empty() {
        panic!(
            "{} of {total} case(s) failed:\n\n{}",
            failures.len(),
            failures.join("\n\n--------\n\n")
        );
    }
}

// =============================================================================================
// A well-behaved fake seeder (for torrents whose on-disk names bitfetch chooses)
// =============================================================================================

/// Reads and discards frames until `deadline`; `Err` if the connection closed first.
pub fn idle_until(wire: &mut Wire, deadline: Instant) -> Result<(), Closed> {
    while Instant::now() < deadline {
        wire.next(deadline)?;
    }
    Ok(())
}

/// A peer on its own loopback address that has every piece of `content`, unchokes whoever
/// connects and answers every request with the right bytes, one connection after another,
/// until dropped.
pub struct FakeSeeder {
    pub addr: SocketAddr,
    served: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeSeeder {
    pub fn start(content: Arc<Content>, info_hash: [u8; 20]) -> FakeSeeder {
        let listener = TcpListener::bind((fresh_ip(), 0)).expect("bind the fake seeder");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("local_addr");
        let served = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (served, stop) = (Arc::clone(&served), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((stream, _)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = stream.set_nonblocking(false);
                    let mut wire = Wire::new(stream);
                    let greeted = wire
                        .read_handshake(Duration::from_secs(30))
                        .and_then(|theirs| {
                            if theirs[28..48] != info_hash {
                                return Err("wrong info hash".to_owned());
                            }
                            wire.send(&handshake(&info_hash, &fake_peer_id(), NO_EXTENSIONS))?;
                            wire.send(&frame(ID_BITFIELD, &full_bitfield(content.piece_count())))?;
                            wire.send(&frame(ID_UNCHOKE, &[]))
                        });
                    if greeted.is_err() {
                        continue;
                    }
                    while !stop.load(Ordering::SeqCst) {
                        match wire.next(Instant::now() + Duration::from_millis(200)) {
                            Ok(Some(Msg::Request { piece, offset, len })) => {
                                let Some(data) = content.block(piece, offset, len) else {
                                    break;
                                };
                                if wire.send(&msg_piece(piece, offset, data)).is_err() {
                                    break;
                                }
                                served.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            })
        };
        FakeSeeder {
            addr,
            served,
            stop,
            thread: Some(thread),
        }
    }

    pub fn served(&self) -> u32 {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for FakeSeeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stable seed for pseudo-random content, from a case's label (FNV-1a).
pub fn seed_of(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
