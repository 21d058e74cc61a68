//! Helpers for `tests/shell.rs`: torrents made by mktorrent from in-memory payloads, a process
//! guard that keeps stdout as raw bytes (and can feed stdin or hand stdout to the test), a
//! one-request HTTP server, and a scripted fake seeder that speaks just enough BitTorrent.
//!
//! Everything binds loopback. Every process is killed by PID and reaped on drop; every thread
//! started here is told to stop and joined on drop. Waits are polls with deadlines (hang
//! guards), never sleeps standing in for synchronisation.
//!
//! Lives in a directory so cargo does not build it as a test crate of its own.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::common_cli::{pseudo_random, write_file};
use crate::support::{self, Diagnose};

/// A tracker nothing listens on: torrents need an announce URL, and this one is refused at
/// once, so only `--peer` addresses matter.
pub const DEAD_TRACKER: &str = "http://127.0.0.1:1/announce";
/// mktorrent's `-l` (its minimum): 32 KiB pieces of two blocks, so a few MiB make over a
/// hundred pieces.
pub const PIECE_LOG2: u32 = 15;
pub const PIECE_LEN: u64 = 1 << PIECE_LOG2;
/// bitfetch's cap on a .torrent (`bencode::Limits::METAINFO.max_size`, used by `cli.rs` for
/// files, stdin and URLs alike).
pub const TORRENT_CAP: u64 = 64 << 20;

// =============================================================================================
// Content: payload files and their torrent
// =============================================================================================

/// Payload files under `DIR/source/NAME` and `DIR/NAME.torrent` made from them by mktorrent.
pub struct Content {
    dir: TempDir,
    pub name: String,
    pub torrent: PathBuf,
    /// (path inside the torrent, bytes); for a single-file torrent one entry named NAME.
    pub files: Vec<(String, Vec<u8>)>,
    pub multi: bool,
}

impl Content {
    /// One file of `size` pseudo-random bytes.
    pub fn single(name: &str, size: usize, seed: u64) -> Content {
        let dir = support::scratch_dir();
        let data = pseudo_random(size, seed);
        let path = dir.path().join("source").join(name);
        write_file(&path, &data);
        Content::finish(dir, name, path, vec![(name.to_owned(), data)], false)
    }

    /// A directory NAME holding `tree` (relative path, size).
    pub fn multi(name: &str, tree: &[(&str, usize)], seed: u64) -> Content {
        let dir = support::scratch_dir();
        let root = dir.path().join("source").join(name);
        let files = tree
            .iter()
            .enumerate()
            .map(|(i, (rel, size))| {
                let data = pseudo_random(*size, seed + i as u64);
                write_file(&root.join(rel), &data);
                ((*rel).to_owned(), data)
            })
            .collect();
        Content::finish(dir, name, root, files, true)
    }

    fn finish(
        dir: TempDir,
        name: &str,
        source: PathBuf,
        files: Vec<(String, Vec<u8>)>,
        multi: bool,
    ) -> Content {
        let torrent = dir.path().join(format!("{name}.torrent"));
        support::make_torrent_with_piece_log2(&source, DEAD_TRACKER, PIECE_LOG2, &torrent);
        Content {
            dir,
            name: name.to_owned(),
            torrent,
            files,
            multi,
        }
    }

    /// The directory holding NAME, as `bitfetch seed` takes it.
    pub fn source_dir(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    /// A path in this content's scratch directory (not created).
    pub fn scratch(&self, label: &str) -> PathBuf {
        self.dir.path().join(label)
    }

    pub fn total(&self) -> u64 {
        self.files.iter().map(|(_, d)| d.len() as u64).sum()
    }

    pub fn pieces(&self) -> u64 {
        self.total().div_ceil(PIECE_LEN)
    }

    /// The bytes of a single-file torrent.
    pub fn bytes(&self) -> &[u8] {
        assert!(!self.multi, "bytes() is for single-file content");
        &self.files[0].1
    }

    /// The bytes of the file at `rel` inside the torrent.
    pub fn file(&self, rel: &str) -> &[u8] {
        self.files
            .iter()
            .find(|(p, _)| p == rel)
            .map(|(_, d)| d.as_slice())
            .unwrap_or_else(|| panic!("no file {rel} in the content"))
    }

    /// Where `download -o OUT` puts the file at `rel`: OUT/NAME, or OUT/NAME/REL.
    pub fn downloaded(&self, out: &Path, rel: &str) -> PathBuf {
        if self.multi {
            out.join(&self.name).join(rel)
        } else {
            out.join(&self.name)
        }
    }

    /// What `walk(OUT)` must list after fetching exactly `rels`: their paths and every
    /// directory above them, relative to OUT, sorted.
    pub fn expected_tree(&self, rels: &[&str]) -> Vec<PathBuf> {
        let mut set = BTreeSet::new();
        for rel in rels {
            let full = self.downloaded(Path::new(""), rel);
            let mut at = full.as_path();
            loop {
                set.insert(at.to_path_buf());
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
        }
        set.into_iter().collect()
    }
}

/// `bitfetch seed` for `content` on `ip`, any port; returns the guard and its address once
/// it listens.
pub fn start_seeder(
    content: &Content,
    ip: Ipv4Addr,
    extra: &[&str],
) -> (support::ChildGuard, SocketAddr) {
    let mut args: Vec<String> = vec![
        "seed".into(),
        content.torrent.display().to_string(),
        content.source_dir().display().to_string(),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let guard = support::spawn_bitfetch(&args);
    let addr = support::wait_for_listening(&guard);
    (guard, addr)
}

// =============================================================================================
// Process guard with raw output
// =============================================================================================

type Buffer = Arc<Mutex<Vec<u8>>>;

fn lock(b: &Buffer) -> MutexGuard<'_, Vec<u8>> {
    b.lock().unwrap_or_else(|e| e.into_inner())
}

fn drain(mut from: impl Read + Send + 'static, into: Buffer) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => lock(&into).extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// A child process whose stdout is kept as bytes (or handed to the test), killed by PID with
/// SIGKILL and reaped on drop unless it has exited.
pub struct Proc {
    desc: String,
    pid: u32,
    child: Mutex<Child>,
    /// Exit status, and when this guard first saw it.
    exit: Mutex<Option<(ExitStatus, Instant)>>,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Proc {
    /// Spawns `command`. `stdin`: bytes written (then closed) by a helper thread, or /dev/null.
    /// `keep_stdout`: hand the read end to the caller instead of draining it.
    pub fn spawn(
        desc: &str,
        command: &mut Command,
        stdin: Option<Vec<u8>>,
        keep_stdout: bool,
    ) -> (Proc, Option<ChildStdout>) {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_BACKTRACE", "1");
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Dropping the pipe at the end is the EOF bitfetch reads up to.
            thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let stdout = Buffer::default();
        let stderr = Buffer::default();
        let mut readers = vec![drain(child.stderr.take().expect("piped"), stderr.clone())];
        let out_pipe = child.stdout.take().expect("piped");
        let handed = if keep_stdout {
            Some(out_pipe)
        } else {
            readers.push(drain(out_pipe, stdout.clone()));
            None
        };
        let proc = Proc {
            desc: desc.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            exit: Mutex::new(None),
            stdout,
            stderr,
            readers,
            started: Instant::now(),
        };
        (proc, handed)
    }

    /// Spawns `command` (usually from [`bitfetch_command`]) with a description made from it.
    pub fn start(
        command: &mut Command,
        stdin: Option<Vec<u8>>,
        keep_stdout: bool,
    ) -> (Proc, Option<ChildStdout>) {
        let desc = format!(
            "{} {}",
            command.get_program().to_string_lossy(),
            command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        Proc::spawn(&desc, command, stdin, keep_stdout)
    }

    /// `bitfetch ARGS`, stdin from /dev/null, stdout drained into a buffer.
    pub fn bitfetch<I, S>(args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Proc::start(&mut bitfetch_command(args), None, false).0
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, reaping the child, without blocking.
    pub fn status(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(Some(s)) = child.try_wait() {
                *exit = Some((s, Instant::now()));
            }
        }
        exit.map(|(s, _)| s)
    }

    /// When the exit was first seen (at most one poll interval late).
    pub fn exited_at(&self) -> Option<Instant> {
        self.status()?;
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(_, at)| at)
    }

    /// Sends `signal` by PID while the child is not yet reaped (its PID is still ours).
    pub fn signal(&self, signal: i32) {
        let exit = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if exit.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(None) = child.try_wait() {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(self.pid as libc::pid_t, signal);
                }
            }
        }
    }

    /// Waits for the exit; panics with diagnostics (and `parts`') after `timeout`.
    pub fn wait(&self, timeout: Duration, parts: &[&dyn Diagnose]) -> ExitStatus {
        match support::poll_until(timeout, || self.status()) {
            Some(status) => {
                // The pipes reach EOF when the process is gone; bounded in case a
                // grandchild kept one open.
                support::poll_until(Duration::from_secs(5), || {
                    self.readers.iter().all(|r| r.is_finished()).then_some(())
                });
                status
            }
            None => {
                let mut all: Vec<&dyn Diagnose> = vec![self];
                all.extend_from_slice(parts);
                panic!(
                    "{}",
                    support::report(&format!("still running after {timeout:?}"), &all)
                )
            }
        }
    }

    pub fn stdout(&self) -> Vec<u8> {
        lock(&self.stdout).clone()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stdout)).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// The first `bitfetch: error:` line on stderr.
    pub fn error_line(&self) -> Option<String> {
        self.stderr_text()
            .lines()
            .find(|l| l.starts_with("bitfetch: error:"))
            .map(str::to_owned)
    }

    /// Panics with everyone's diagnostics unless the child exited with `code` (no signal, no
    /// panic). Waits for it first.
    pub fn expect_code(&self, code: i32, parts: &[&dyn Diagnose]) {
        let status = self.wait(support::DEADLINE, parts);
        let problem = if self.stderr_text().contains("panicked") {
            Some("bitfetch panicked".to_owned())
        } else if status.code() != Some(code) {
            Some(format!("{status} (expected exit code {code})"))
        } else {
            None
        };
        if let Some(why) = problem {
            self.fail(&why, parts);
        }
    }

    /// Panics with this process's and `parts`' diagnostics.
    pub fn fail(&self, why: &str, parts: &[&dyn Diagnose]) -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![self];
        all.extend_from_slice(parts);
        panic!("{}", support::report(why, &all))
    }

    pub fn elapsed_at_exit(&self) -> Option<Duration> {
        self.exited_at().map(|at| at - self.started)
    }
}

impl Diagnose for Proc {
    fn diagnostics(&self) -> String {
        let status = match self.status() {
            None => "still running".to_owned(),
            Some(s) => s.to_string(),
        };
        let clip = |b: &[u8]| {
            let start = b.len().saturating_sub(8 * 1024);
            String::from_utf8_lossy(&b[start..]).into_owned()
        };
        // One lock at a time: a second lock of the same buffer in one expression deadlocks.
        let stderr = clip(&lock(&self.stderr));
        let stdout = lock(&self.stdout).clone();
        format!(
            "===== {} (pid {}): {status} =====\n----- stderr -----\n{stderr}\n----- stdout ({} bytes, tail) -----\n{}\n",
            self.desc,
            self.pid,
            stdout.len(),
            clip(&stdout),
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status().is_none() {
            self.signal(libc::SIGKILL);
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            let _ = child.wait();
        }
    }
}

/// A `Command` for bitfetch with `args`.
pub fn bitfetch_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(support::bitfetch());
    command.args(args);
    command
}

/// Loopback network options of a download: `--bind IP --port 0 --peer P...`.
pub fn net_args(ip: Ipv4Addr, peers: &[SocketAddr]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--bind".into(), ip.to_string(), "--port".into(), "0".into()];
    for p in peers {
        args.push("--peer".into());
        args.push(p.to_string());
    }
    args
}

/// Arguments of a loopback download: `download TORRENT` and [`net_args`].
pub fn download_args(torrent: &str, ip: Ipv4Addr, peers: &[SocketAddr]) -> Vec<String> {
    let mut args: Vec<String> = vec!["download".into(), torrent.into()];
    args.extend(net_args(ip, peers));
    args
}

// =============================================================================================
// A one-request HTTP server
// =============================================================================================

/// What the server answers to its one request.
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// This status, with a short text body.
    Status(u16),
    /// 200 with a `Content-Length` of `len` and that many bytes (until the client goes).
    Sized(u64),
    /// 200 without a length: bytes until the client goes away (1 GiB at most).
    Endless,
}

/// What the server saw and did.
#[derive(Debug, Default)]
pub struct HttpLog {
    pub request_line: Option<String>,
    /// Body bytes the kernel accepted before the client went away.
    pub body_sent: u64,
}

/// Serves one request on 127.0.0.1, any port, from a thread; joined on drop.
pub struct HttpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<HttpLog>>,
}

impl HttpServer {
    pub fn start(reply: Reply) -> HttpServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || serve_one(&listener, &reply, &flag));
        HttpServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits for the server thread to finish its request and returns what it saw.
    pub fn finish(mut self) -> HttpLog {
        let thread = self.thread.take().expect("not finished twice");
        if support::poll_until(support::DEADLINE, || thread.is_finished().then_some(())).is_none() {
            self.stop.store(true, Ordering::Relaxed);
        }
        thread.join().expect("the HTTP server thread panicked")
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts one connection (polling, so a stop request or the deadline ends the wait).
fn accept_one(listener: &TcpListener, stop: &AtomicBool) -> Option<TcpStream> {
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let stream = support::poll_until(support::DEADLINE, || {
        if stop.load(Ordering::Relaxed) {
            return Some(None);
        }
        listener.accept().ok().map(|(s, _)| Some(s))
    })
    .flatten()?;
    stream.set_nonblocking(false).expect("blocking stream");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("write timeout");
    Some(stream)
}

fn serve_one(listener: &TcpListener, reply: &Reply, stop: &AtomicBool) -> HttpLog {
    let mut log = HttpLog::default();
    let Some(mut stream) = accept_one(listener, stop) else {
        return log;
    };
    // The request head, up to the blank line (bounded).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    log.request_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .map(str::to_owned);
    let (status, length, body): (u16, Option<u64>, Option<&[u8]>) = match reply {
        Reply::Body(b) => (200, Some(b.len() as u64), Some(b)),
        Reply::Status(code) => (*code, Some(10), Some(b"not here\r\n")),
        Reply::Sized(n) => (200, Some(*n), None),
        Reply::Endless => (200, None, None),
    };
    let mut header = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
    if let Some(n) = length {
        header += &format!("Content-Length: {n}\r\n");
    }
    header += "\r\n";
    if stream.write_all(header.as_bytes()).is_err() {
        return log;
    }
    if let Some(b) = body {
        if stream.write_all(b).is_ok() {
            log.body_sent = b.len() as u64;
        }
        return log;
    }
    let limit = length.unwrap_or(1 << 30);
    let chunk = vec![b'x'; 64 * 1024];
    while log.body_sent < limit && !stop.load(Ordering::Relaxed) {
        let n = chunk.len().min((limit - log.body_sent) as usize);
        match stream.write(&chunk[..n]) {
            Ok(0) | Err(_) => break,
            Ok(k) => log.body_sent += k as u64,
        }
    }
    log
}

// =============================================================================================
// A scripted fake seeder
// =============================================================================================

/// How the fake seeder answers requests.
#[derive(Debug, Clone, Copy)]
pub enum Policy {
    /// Handshake, bitfield, unchoke, then never a block.
    Stall,
    /// Collects requests and, whenever bitfetch pauses, answers the batch last-first.
    Reverse,
    /// Answers the lowest requested piece, then waits `gap` before the next one.
    Paced(Duration),
}

/// Something the fake seeder did, reported as it happens.
#[derive(Debug, Clone, Copy)]
pub enum FakeEvent {
    Connected,
    Request {
        piece: u32,
    },
    /// The last requested block of `piece` went out; its write began at `at`.
    Served {
        piece: u32,
        at: Instant,
    },
}

/// What the fake seeder saw and did over the connection.
#[derive(Debug, Default)]
pub struct FakeLog {
    /// (piece, begin, length) of every request, in arrival order.
    pub requests: Vec<(u32, u32, u32)>,
    /// (piece, begin) of every block sent, in order.
    pub served: Vec<(u32, u32)>,
    /// Why the connection ended early, if it did on our side.
    pub trouble: Option<String>,
}

impl FakeLog {
    /// Pieces in the order their first block went out.
    pub fn piece_order(&self) -> Vec<u32> {
        let mut seen = BTreeSet::new();
        self.served
            .iter()
            .filter(|(p, _)| seen.insert(*p))
            .map(|(p, _)| *p)
            .collect()
    }
}

/// A peer that accepts one connection from bitfetch and seeds `data` according to a
/// [`Policy`], advertising only the pieces in `has`.
pub struct FakeSeeder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    events: mpsc::Receiver<FakeEvent>,
    thread: Option<JoinHandle<FakeLog>>,
}

struct Script {
    data: Arc<Vec<u8>>,
    piece_len: u64,
    has: Vec<bool>,
    policy: Policy,
}

impl FakeSeeder {
    pub fn start(ip: Ipv4Addr, data: &[u8], has: Vec<bool>, policy: Policy) -> FakeSeeder {
        let listener = TcpListener::bind((ip, 0)).expect("bind the fake seeder");
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let script = Script {
            data: Arc::new(data.to_vec()),
            piece_len: PIECE_LEN,
            has,
            policy,
        };
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut log = FakeLog::default();
            if let Some(stream) = accept_one(&listener, &flag)
                && let Err(e) = seed_one(stream, &script, &flag, &tx, &mut log)
            {
                log.trouble = Some(e.to_string());
            }
            log
        });
        FakeSeeder {
            addr,
            stop,
            events,
            thread: Some(thread),
        }
    }

    /// All pieces of `data`.
    pub fn all_pieces(data: &[u8]) -> Vec<bool> {
        vec![true; (data.len() as u64).div_ceil(PIECE_LEN) as usize]
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the first event `pick` accepts; `None` after `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&FakeEvent) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    if let Some(v) = pick(&e) {
                        return Some(v);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until bitfetch has sent a first request (it is connected, interested, unchoked).
    pub fn wait_for_request(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| {
            matches!(e, FakeEvent::Request { .. }).then_some(())
        })
        .is_some()
    }

    /// Waits for the connection to end (bitfetch exited) and returns the log.
    pub fn finish(mut self) -> FakeLog {
        let thread = self.thread.take().expect("not finished twice");
        if support::poll_until(support::DEADLINE, || thread.is_finished().then_some(())).is_none() {
            self.stop.store(true, Ordering::Relaxed);
        }
        thread.join().expect("the fake seeder thread panicked")
    }
}

impl Drop for FakeSeeder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for FakeSeeder {
    fn diagnostics(&self) -> String {
        format!("===== fake seeder on {} =====\n", self.addr)
    }
}

const HANDSHAKE_LEN: usize = 68;
const ID_UNCHOKE: u8 = 1;
const ID_BITFIELD: u8 = 5;
const ID_REQUEST: u8 = 6;
const ID_PIECE: u8 = 7;
const ID_CANCEL: u8 = 8;

fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    out.push(id);
    out.extend_from_slice(payload);
    out
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Frames from bitfetch, as (id, payload), until the socket closes. Keep-alives are skipped.
fn read_frames(stream: TcpStream, out: &mpsc::Sender<(u8, Vec<u8>)>) {
    let mut r = BufReader::new(stream);
    loop {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            continue;
        }
        if len > 1 << 20 {
            return;
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let payload = body.split_off(1);
        if out.send((body[0], payload)).is_err() {
            return;
        }
    }
}

fn seed_one(
    mut stream: TcpStream,
    script: &Script,
    stop: &AtomicBool,
    events: &mpsc::Sender<FakeEvent>,
    log: &mut FakeLog,
) -> std::io::Result<()> {
    // bitfetch dials, so it speaks first; echo its info hash back.
    let mut theirs = [0u8; HANDSHAKE_LEN];
    stream.read_exact(&mut theirs)?;
    let mut ours = Vec::with_capacity(HANDSHAKE_LEN);
    ours.push(19);
    ours.extend_from_slice(b"BitTorrent protocol");
    ours.extend_from_slice(&[0u8; 8]); // no extensions: plain BEP 3
    ours.extend_from_slice(&theirs[28..48]);
    ours.extend_from_slice(b"-FK0001-shelltest000");
    let mut bits = vec![0u8; script.has.len().div_ceil(8)];
    for (i, _) in script.has.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    ours.extend_from_slice(&frame(ID_BITFIELD, &bits));
    ours.extend_from_slice(&frame(ID_UNCHOKE, &[]));
    stream.write_all(&ours)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let _ = events.send(FakeEvent::Connected);

    let (tx, frames) = mpsc::channel();
    let reader = {
        let half = stream.try_clone()?;
        thread::spawn(move || read_frames(half, &tx))
    };
    let result = answer(&mut stream, script, stop, events, log, &frames);
    let _ = stream.shutdown(Shutdown::Both);
    let _ = reader.join();
    result
}

/// The request loop: collect requests, answer them as the policy says.
fn answer(
    stream: &mut TcpStream,
    script: &Script,
    stop: &AtomicBool,
    events: &mpsc::Sender<FakeEvent>,
    log: &mut FakeLog,
    frames: &mpsc::Receiver<(u8, Vec<u8>)>,
) -> std::io::Result<()> {
    let mut pending: Vec<(u32, u32, u32)> = Vec::new();
    let mut next_release = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let idle = match frames.recv_timeout(Duration::from_millis(20)) {
            Ok((ID_REQUEST, p)) if p.len() == 12 => {
                let r = (be32(&p, 0), be32(&p, 4), be32(&p, 8));
                log.requests.push(r);
                pending.push(r);
                let _ = events.send(FakeEvent::Request { piece: r.0 });
                false
            }
            Ok((ID_CANCEL, p)) if p.len() == 12 => {
                let r = (be32(&p, 0), be32(&p, 4), be32(&p, 8));
                pending.retain(|q| *q != r);
                false
            }
            Ok(_) => false,
            Err(mpsc::RecvTimeoutError::Timeout) => true,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let batch: Vec<(u32, u32, u32)> = match script.policy {
            Policy::Stall => Vec::new(),
            Policy::Reverse if idle => pending.drain(..).rev().collect(),
            Policy::Reverse => Vec::new(),
            Policy::Paced(gap) => match pending.iter().map(|r| r.0).min() {
                Some(piece) if Instant::now() >= next_release => {
                    next_release = Instant::now() + gap;
                    let (now, later): (Vec<_>, Vec<_>) =
                        pending.drain(..).partition(|r| r.0 == piece);
                    pending = later;
                    now
                }
                _ => Vec::new(),
            },
        };
        send_blocks(stream, script, events, log, &batch)?;
    }
    Ok(())
}

fn send_blocks(
    stream: &mut TcpStream,
    script: &Script,
    events: &mpsc::Sender<FakeEvent>,
    log: &mut FakeLog,
    batch: &[(u32, u32, u32)],
) -> std::io::Result<()> {
    for (i, &(piece, begin, len)) in batch.iter().enumerate() {
        let start = u64::from(piece) * script.piece_len + u64::from(begin);
        let end = start + u64::from(len);
        if !script.has.get(piece as usize).copied().unwrap_or(false)
            || end > script.data.len() as u64
        {
            continue;
        }
        let mut payload = Vec::with_capacity(8 + len as usize);
        payload.extend_from_slice(&piece.to_be_bytes());
        payload.extend_from_slice(&begin.to_be_bytes());
        payload.extend_from_slice(&script.data[start as usize..end as usize]);
        // Taken before the write: bitfetch cannot have the block, let alone verify its
        // piece, before this instant.
        let before = Instant::now();
        stream.write_all(&frame(ID_PIECE, &payload))?;
        log.served.push((piece, begin));
        let last_of_piece = batch[i + 1..].iter().all(|r| r.0 != piece);
        if last_of_piece {
            let _ = events.send(FakeEvent::Served { piece, at: before });
        }
    }
    Ok(())
}
