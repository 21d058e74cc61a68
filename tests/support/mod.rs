//! The support code of every end-to-end suite in `tests/`, one tree for all of them:
//!
//! - this file: deadlines and polling, failure reports, small byte and text helpers, parallel
//!   cases;
//! - [`net`]: loopback addresses and ports, and a listener that only counts who connects;
//! - [`files`]: payloads, file comparison, directory walks and the hostile-torrent sandbox;
//! - [`bencode`]: an independent bencode writer and reader;
//! - [`torrent`]: torrents made by independent tools (mktorrent, transmission-show) or in
//!   memory, and their piece geometry read back by the tests themselves;
//! - [`wire`]: an independent peer wire codec (handshake, frames, a hand-driven connection,
//!   BEP 10 extension handshakes and BEP 9 `ut_metadata` messages);
//! - [`fake_peer`]: one fake seeder with a [`fake_peer::Misbehaviour`] (and, serving metadata
//!   over BEP 9, a [`fake_peer::MetaMisbehaviour`]), a fake leecher and a counting relay;
//! - [`magnet`]: magnet links written by the tests, hostile ones included;
//! - [`fake_tracker`]: one scripted HTTP tracker (plus a recording swarm tracker built on it),
//!   a scripted UDP tracker, and reply encoders;
//! - [`cli`]: running bitfetch and other commands, child guards killed by PID, `--json` events,
//!   memory watching;
//! - [`clients`]: the reference clients (opentracker, aria2c, Transmission, libtorrent through
//!   `libtorrent_client.py`, nginx as a TLS proxy with a test CA) and `ss` snapshots;
//! - [`nginx`]: nginx run in the foreground, as a static file server (the honest web seed)
//!   or a TLS proxy;
//! - [`web_seed`]: a misbehaving HTTP file server for the web seed tests, one scripted
//!   [`web_seed::Behaviour`] per request, every request recorded;
//! - [`libtorrent_dht`]: a DHT of libtorrent sessions on loopback (`libtorrent_dht.py`), one
//!   node optionally seeding and one downloading through the DHT alone;
//! - [`krpc`]: a raw KRPC (BEP 5) client over UDP for hostile DHT tests;
//! - [`v2`]: BitTorrent v2 (BEP 52) merkle trees, v2-only and hybrid torrents built in memory
//!   (BEP 47 pad files included), and payloads made into torrents by libtorrent.
//!
//! Nothing here trusts bitfetch's own code. Everything stays on loopback. Every process started
//! here is owned by a [`cli::ChildGuard`] that kills it by PID; every wait is a poll with a
//! deadline (a hang guard, not a performance expectation); every server thread stops and is
//! joined when its owner is dropped.
//!
//! Lives in a directory (`support/mod.rs`) so cargo does not build it as a test crate itself.
//! Each suite uses part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod bencode;
pub mod cli;
pub mod clients;
pub mod fake_peer;
pub mod fake_tracker;
pub mod files;
pub mod krpc;
pub mod libtorrent_dht;
pub mod magnet;
pub mod net;
pub mod nginx;
pub mod torrent;
pub mod v2;
pub mod web_seed;
pub mod wire;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Hang guard for one transfer or one start-up. Generous: tests must not depend on speed.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Transmission decides on a 10 s pulse and seeds slowly on loopback: give it more.
pub const TRANSMISSION_DEADLINE: Duration = Duration::from_secs(180);
/// Hang guard for a short command (`info`, `create`, a refused `download`).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// No one-shot child may run longer than this; a hung child is killed and the test fails.
pub const HANG_GUARD: Duration = Duration::from_secs(30);
/// Pause between two checks of a polled condition.
pub const POLL: Duration = Duration::from_millis(25);

// =============================================================================================
// Polling and failure reports
// =============================================================================================

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Things that can describe their state for a failure message.
pub trait Diagnose {
    fn diagnostics(&self) -> String;
}

/// Joins the diagnostics of several parties under a headline, for a panic message.
pub fn report(headline: &str, parts: &[&dyn Diagnose]) -> String {
    let mut out = format!("{headline}\n");
    for part in parts {
        out.push('\n');
        out.push_str(&part.diagnostics());
    }
    out
}

/// Panics with everyone's diagnostics.
pub fn fail(why: &str, parts: &[&dyn Diagnose]) -> ! {
    panic!("{}", report(why, parts))
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

/// A plain string as a [`Diagnose`] part.
pub struct Text(pub String);

impl Diagnose for Text {
    fn diagnostics(&self) -> String {
        self.0.clone()
    }
}

/// Locks a mutex, tolerating a poisoned one (a panicking test thread must not hide the
/// diagnostics of the others).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A thread that runs until its stop flag is set: set and joined when dropped.
pub struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `body` with the stop flag it must watch.
    pub fn spawn(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        Worker::watching(stop, thread::spawn(move || body(&flag)))
    }

    /// A thread already running that watches `stop`.
    pub fn watching(stop: Arc<AtomicBool>, thread: JoinHandle<()>) -> Worker {
        Worker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// =============================================================================================
// Bytes and text
// =============================================================================================

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn hex_to_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn info_hash_bytes(hex: &str) -> [u8; 20] {
    hex_to_bytes(hex).try_into().expect("20-byte info hash")
}

/// Percent-encodes everything but the unreserved characters.
pub fn url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space) into raw bytes. Malformed escapes stay literal.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Bytes shown for people: printable ASCII and newlines as is, the rest as `\xNN`.
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

/// True when `text` contains `n` as a whole number (not part of a longer digit run).
pub fn mentions_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok == n.to_string())
}

/// A stable seed for pseudo-random content, from a case's label (FNV-1a).
pub fn seed_of(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn s(x: impl ToString) -> String {
    x.to_string()
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

pub fn path_arg(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_owned()
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
// A seeded RNG (splitmix64) for reproducible choices (kill points)
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
