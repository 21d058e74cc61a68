//! Shared helpers for the integration tests that run bitfetch against real clients: process
//! guards with captured output, an opentracker instance, aria2 and Transmission drivers, payload
//! and torrent creation with independent tools.
//!
//! Everything stays on loopback (127.0.0.x). Every process started here is owned by a
//! [`ChildGuard`] that kills it by PID and reaps it on drop. Every wait is a poll with a
//! deadline; the deadlines are hang guards, not performance expectations.
//!
//! Lives in a directory (`support/mod.rs`) so cargo does not build it as a test crate itself.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Hang guard for one transfer or one start-up. Generous: tests must not depend on speed.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Transmission decides on a 10 s pulse and seeds slowly on loopback: give it more.
pub const TRANSMISSION_DEADLINE: Duration = Duration::from_secs(180);
/// Pause between two checks of a polled condition.
const POLL: Duration = Duration::from_millis(25);
/// How much of each captured stream or log a diagnostic report shows (the end of it).
const DIAG_TAIL: usize = 12 * 1024;

// =============================================================================================
// Paths, tools, ports, addresses
// =============================================================================================

/// The bitfetch binary built by cargo for this test run.
pub fn bitfetch() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bitfetch"))
}

/// Finds `name` on PATH (and in the sbin directories, which a non-root PATH may lack) or
/// panics: a test never silently skips because a reference tool is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(extra));
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if let Ok(meta) = fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return candidate;
        }
    }
    panic!("{name} not found: run scripts/test which installs it");
}

/// A TCP port that was free on 127.0.0.1 a moment ago (bind port 0, read it, drop it).
/// Only for reference clients that need a port number up front.
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// Like [`free_port`], on a given loopback address.
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0 to find a free port: {e}"));
    listener.local_addr().expect("local_addr").port()
}

static NEXT_LOOPBACK: AtomicU8 = AtomicU8::new(2);

/// A loopback address no other client of this test process uses (127.0.0.2, .3, …).
/// Transmission keeps one connection per IP address, so every client gets its own.
/// 127.0.0.1 is left to the tracker and to probes.
pub fn next_loopback() -> Ipv4Addr {
    let n = NEXT_LOOPBACK.fetch_add(1, Ordering::Relaxed);
    assert!(
        (2..=254).contains(&n),
        "ran out of 127.0.0.x addresses in one test process"
    );
    Ipv4Addr::new(127, 0, 0, n)
}

/// A fresh scratch directory, removed on drop. World-readable (0755) so that a reference
/// client that drops privileges (opentracker as `nobody`) can read files in it.
pub fn scratch_dir() -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bitfetch-it-")
        .tempdir()
        .expect("create a temporary directory");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod 755 the temporary directory");
    dir
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

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

// =============================================================================================
// Payloads and file comparison
// =============================================================================================

/// Writes `size` deterministic pseudo-random bytes (xorshift64*, seeded by `seed`) to `path`,
/// creating parent directories.
pub fn write_payload(path: &Path, size: u64, seed: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = BufWriter::with_capacity(1 << 20, file);
    // Never zero, or xorshift would be stuck at zero.
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut chunk = vec![0u8; 1 << 16];
    let mut left = size;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    out.flush()
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Byte-for-byte comparison. `Err` says where the files first differ.
pub fn files_equal(expected: &Path, actual: &Path) -> Result<(), String> {
    let read = |p: &Path| fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let a = read(expected)?;
    let b = read(actual)?;
    if let Some(offset) = a.iter().zip(&b).position(|(x, y)| x != y) {
        return Err(format!(
            "{} and {} differ first at byte offset {offset} (piece of 32 KiB: {}): \
             expected 0x{:02x}, found 0x{:02x}",
            expected.display(),
            actual.display(),
            offset / (32 * 1024),
            a[offset],
            b[offset]
        ));
    }
    if a.len() != b.len() {
        return Err(format!(
            "{} is {} bytes but {} is {} bytes (identical up to the shorter length)",
            expected.display(),
            a.len(),
            actual.display(),
            b.len()
        ));
    }
    Ok(())
}

// =============================================================================================
// Process guard
// =============================================================================================

type Buffer = Arc<Mutex<Vec<u8>>>;

fn lock(buffer: &Buffer) -> MutexGuard<'_, Vec<u8>> {
    // A reader thread cannot panic while holding the lock, but be tolerant anyway.
    buffer.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn_reader(mut source: impl Read + Send + 'static, sink: Buffer) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match source.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => lock(&sink).extend_from_slice(&chunk[..n]),
            }
        }
    })
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

/// The last `DIAG_TAIL` bytes of `bytes`, as text.
fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(DIAG_TAIL);
    let mut text = String::new();
    if start > 0 {
        let _ = writeln!(text, "[… {start} earlier bytes omitted …]");
    }
    text.push_str(&String::from_utf8_lossy(&bytes[start..]));
    text
}

fn file_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => tail(&bytes),
        Err(e) => format!("[cannot read {}: {e}]", path.display()),
    }
}

/// A child process that is killed by PID and reaped when dropped. Its stdout and stderr are
/// drained by background threads into shared buffers (so it never blocks on a full pipe).
pub struct ChildGuard {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    stdout: Buffer,
    stderr: Buffer,
    readers: Vec<JoinHandle<()>>,
    /// Signal sent first on stop; SIGKILL follows if the process outlives `stop_grace`.
    stop_signal: i32,
    stop_grace: Duration,
    /// Log files written by the process, shown in diagnostics.
    logs: Vec<PathBuf>,
    /// A directory that must outlive the process (its config or logs).
    scratch: Option<TempDir>,
}

impl ChildGuard {
    /// Spawns `command` with stdin from /dev/null and stdout/stderr captured.
    pub fn spawn(name: &str, command: &mut Command) -> ChildGuard {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let stdout = Buffer::default();
        let stderr = Buffer::default();
        let readers = vec![
            spawn_reader(child.stdout.take().expect("piped stdout"), stdout.clone()),
            spawn_reader(child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        ChildGuard {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            status: Mutex::new(None),
            stdout,
            stderr,
            readers,
            stop_signal: libc::SIGKILL,
            stop_grace: Duration::ZERO,
            logs: Vec::new(),
            scratch: None,
        }
    }

    /// On drop (or [`ChildGuard::stop`]) send `signal` first and allow `grace` before SIGKILL.
    pub fn with_stop_signal(mut self, signal: i32, grace: Duration) -> Self {
        self.stop_signal = signal;
        self.stop_grace = grace;
        self
    }

    /// Shows the end of `path` in this guard's diagnostics.
    pub fn with_log(mut self, path: PathBuf) -> Self {
        self.logs.push(path);
        self
    }

    /// Keeps `dir` alive until the process has been stopped.
    pub fn with_scratch(mut self, dir: TempDir) -> Self {
        self.scratch = Some(dir);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn scratch_path(&self) -> Option<&Path> {
        self.scratch.as_ref().map(|d| d.path())
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stdout)).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stderr)).into_owned()
    }

    /// The exit status if the process has exited (reaping it), without blocking.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Ok(Some(s)) = child.try_wait() {
                *status = Some(s);
            }
        }
        *status
    }

    pub fn is_running(&self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends `signal` to the process by PID, unless it has already been reaped (its PID
    /// could belong to someone else by then).
    pub fn signal(&self, signal: i32) {
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            // Not reaped yet: the PID is still ours, even if the process is a zombie.
            if let Ok(None) = child.try_wait() {
                // SAFETY: kill(2) with a PID we own and a valid signal number.
                unsafe {
                    libc::kill(self.pid as libc::pid_t, signal);
                }
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let status = poll_until(timeout, || self.exit_status());
        if status.is_some() {
            self.wait_readers(Duration::from_secs(2));
        }
        status
    }

    /// Waits for the process to exit; panics with diagnostics (and `context`) on timeout.
    pub fn wait_with_deadline(
        &self,
        timeout: Duration,
        context: &dyn Fn() -> String,
    ) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => panic!(
                "{} (pid {}) did not exit within {timeout:?}\n{}\n{}",
                self.name,
                self.pid,
                self.diagnostics(),
                context()
            ),
        }
    }

    /// Gives the reader threads a moment to drain what the process wrote before it exited.
    /// Bounded: a grandchild holding the pipe open must not hang the test.
    fn wait_readers(&self, timeout: Duration) {
        poll_until(timeout, || {
            self.readers.iter().all(|r| r.is_finished()).then_some(())
        });
    }

    /// Stops the process: the stop signal, up to the grace period, then SIGKILL; reaps it.
    pub fn stop(&self) -> Option<ExitStatus> {
        if let Some(status) = self.exit_status() {
            return Some(status);
        }
        if self.stop_signal != libc::SIGKILL {
            self.signal(self.stop_signal);
            if let Some(status) = self.wait_timeout(self.stop_grace) {
                return Some(status);
            }
        }
        self.signal(libc::SIGKILL);
        let status = {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            child.wait().ok()
        };
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
        self.wait_readers(Duration::from_secs(2));
        status
    }
}

fn describe_status(status: Option<ExitStatus>) -> String {
    match status {
        None => "still running".to_owned(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => format!("{s}"),
        },
    }
}

impl Diagnose for ChildGuard {
    fn diagnostics(&self) -> String {
        let status = self.exit_status();
        if status.is_some() {
            self.wait_readers(Duration::from_millis(500));
        }
        let mut out = format!(
            "===== {} (pid {}): {} =====\n",
            self.name,
            self.pid,
            describe_status(status)
        );
        let stderr = lock(&self.stderr).clone();
        let stdout = lock(&self.stdout).clone();
        let _ = writeln!(out, "----- {} stderr -----\n{}", self.name, tail(&stderr));
        if !stdout.is_empty() {
            let _ = writeln!(out, "----- {} stdout -----\n{}", self.name, tail(&stdout));
        }
        for log in &self.logs {
            let _ = writeln!(
                out,
                "----- {} log {} -----\n{}",
                self.name,
                log.display(),
                file_tail(log)
            );
        }
        out
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until the child's stderr contains `needle` and returns the (first) line holding it.
/// Fails fast, with diagnostics, if the child exits first or `timeout` passes.
pub fn wait_for_stderr(guard: &ChildGuard, needle: &str, timeout: Duration) -> String {
    // Only complete lines count: a line still being written could hold half an address.
    let find = || {
        let text = guard.stderr_text();
        text.split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .find(|line| line.contains(needle))
            .map(|line| line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = find() {
            return line;
        }
        if guard.exit_status().is_some() {
            guard.wait_readers(Duration::from_secs(2));
            if let Some(line) = find() {
                return line;
            }
            panic!(
                "{} exited before printing {needle:?}\n{}",
                guard.name(),
                guard.diagnostics()
            );
        }
        if Instant::now() >= deadline {
            panic!(
                "{} did not print {needle:?} within {timeout:?}\n{}",
                guard.name(),
                guard.diagnostics()
            );
        }
        thread::sleep(POLL);
    }
}

/// Runs a short command to completion (killed after `timeout`) and returns the finished guard.
pub fn run_bounded(name: &str, command: &mut Command, timeout: Duration) -> ChildGuard {
    let guard = ChildGuard::spawn(name, command);
    guard.wait_with_deadline(timeout, &String::new);
    guard
}

/// Like [`run_bounded`] but panics unless the command succeeded; returns its stdout.
pub fn run_ok(name: &str, command: &mut Command) -> String {
    let guard = run_bounded(name, command, Duration::from_secs(60));
    let status = guard.exit_status().expect("exited");
    assert!(
        status.success(),
        "{name} failed ({command:?})\n{}",
        guard.diagnostics()
    );
    guard.stdout_text()
}

// =============================================================================================
// bitfetch
// =============================================================================================

/// Starts bitfetch with `args`. On drop it gets SIGTERM, then SIGKILL after 10 s.
pub fn spawn_bitfetch<I, S>(args: I) -> ChildGuard
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(bitfetch());
    command.args(args).env("RUST_BACKTRACE", "1");
    ChildGuard::spawn("bitfetch", &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(10))
}

/// Waits for `bitfetch: listening on IP:PORT` and returns the address.
pub fn wait_for_listening(guard: &ChildGuard) -> SocketAddr {
    const PREFIX: &str = "bitfetch: listening on ";
    let line = wait_for_stderr(guard, PREFIX, DEADLINE);
    let rest = &line[line.find(PREFIX).expect("needle in line") + PREFIX.len()..];
    rest.trim().parse().unwrap_or_else(|e| {
        panic!(
            "cannot parse the address in {line:?}: {e}\n{}",
            guard.diagnostics()
        )
    })
}

/// Panics (with diagnostics) if a finished bitfetch panicked or died of a signal, or did not
/// exit with `expected`.
pub fn assert_exit_code(guard: &ChildGuard, expected: i32, parts: &[&dyn Diagnose]) {
    let status = guard.exit_status();
    let stderr = guard.stderr_text();
    let bad = |why: &str| -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![guard];
        all.extend_from_slice(parts);
        panic!("{}", report(why, &all))
    };
    if stderr.contains("panicked at") {
        bad("bitfetch panicked");
    }
    match status {
        None => bad("bitfetch is still running"),
        Some(s) if s.code() == Some(expected) => {}
        Some(s) => bad(&format!(
            "bitfetch {} (expected exit code {expected})",
            describe_status(Some(s))
        )),
    }
}

// =============================================================================================
// Torrents, made by independent tools
// =============================================================================================

/// `mktorrent -a ANNOUNCE -l 15 -o OUT SRC`: 32 KiB pieces.
pub fn make_torrent(source: &Path, announce: &str, out: &Path) -> PathBuf {
    make_torrent_with_piece_log2(source, announce, 15, out)
}

/// `mktorrent` with pieces of 2^`piece_log2` bytes.
pub fn make_torrent_with_piece_log2(
    source: &Path,
    announce: &str,
    piece_log2: u32,
    out: &Path,
) -> PathBuf {
    let mktorrent = require_tool("mktorrent");
    run_ok(
        "mktorrent",
        Command::new(mktorrent)
            .arg("-a")
            .arg(announce)
            .arg("-l")
            .arg(piece_log2.to_string())
            .arg("-o")
            .arg(out)
            .arg(source),
    );
    out.to_path_buf()
}

/// The info hash (40 lowercase hex digits) as computed by `transmission-show`, so the harness
/// does not depend on bitfetch being right.
pub fn info_hash_hex(torrent: &Path) -> String {
    let show = require_tool("transmission-show");
    let stdout = run_ok("transmission-show", Command::new(show).arg(torrent));
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("Hash:"))
        .map(|hash| hash.trim().to_ascii_lowercase())
        .filter(|hash| hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no info hash in transmission-show output:\n{stdout}"))
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd-length hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn url_encode(bytes: &[u8]) -> String {
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

// =============================================================================================
// Minimal HTTP client for probing the tracker
// =============================================================================================

/// `GET path` from `addr` over HTTP/1.0; returns the status code and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&response)))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, response[split + 4..].to_vec()))
}

/// The integer after `key` (a bencoded key such as `8:complete`) in a bencoded body.
fn bencode_int_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = body.get(at..)?.strip_prefix(b"i")?;
    let end = rest.iter().position(|&b| b == b'e')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

// =============================================================================================
// opentracker
// =============================================================================================

/// An opentracker on 127.0.0.1 (HTTP and UDP on one port) with a whitelist.
pub struct Opentracker {
    guard: ChildGuard,
    port: u16,
    whitelist: PathBuf,
}

impl Opentracker {
    /// Starts a tracker and waits until it answers HTTP.
    pub fn start() -> Opentracker {
        let binary = require_tool("opentracker");
        let mut last_failure = String::new();
        // A port found free can be taken by someone else before opentracker binds it: retry.
        for _attempt in 0..3 {
            let dir = scratch_dir();
            let whitelist = dir.path().join("whitelist");
            // Not empty: opentracker warns "Can't open accesslist file" about an empty one,
            // which would be a red herring in failure reports.
            fs::write(&whitelist, format!("{}\n", "0".repeat(40))).expect("create the whitelist");
            fs::set_permissions(&whitelist, fs::Permissions::from_mode(0o644))
                .expect("chmod the whitelist");
            let port = free_port();
            let mut command = Command::new(&binary);
            command
                .args([
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-P",
                    &port.to_string(),
                ])
                .arg("-w")
                .arg(&whitelist);
            if is_root() {
                // opentracker refuses to keep root privileges: it wants a user to drop to.
                command.args(["-u", &unprivileged_user()]);
            }
            let guard = ChildGuard::spawn("opentracker", &mut command).with_scratch(dir);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let ready = poll_until(DEADLINE, || {
                if guard.exit_status().is_some() {
                    return Some(false);
                }
                match http_get(addr, "/scrape") {
                    Ok((200, _)) => Some(true),
                    _ => None,
                }
            });
            match ready {
                Some(true) => {
                    return Opentracker {
                        guard,
                        port,
                        whitelist,
                    };
                }
                Some(false) => last_failure = guard.diagnostics(),
                None => panic!(
                    "opentracker did not answer on {addr} within {DEADLINE:?}\n{}",
                    guard.diagnostics()
                ),
            }
        }
        panic!("opentracker failed to start three times; last attempt:\n{last_failure}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn announce_url(&self) -> String {
        format!("http://127.0.0.1:{}/announce", self.port)
    }

    pub fn udp_url(&self) -> String {
        format!("udp://127.0.0.1:{}/announce", self.port)
    }

    /// Whitelists `info_hash_hex`, makes opentracker reload the list (SIGHUP) and waits until
    /// it accepts announces for that hash.
    pub fn allow(&self, info_hash_hex: &str) {
        let hash = info_hash_hex.to_ascii_lowercase();
        assert!(
            hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "not an info hash: {info_hash_hex:?}"
        );
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.whitelist)
            .expect("open the whitelist");
        writeln!(file, "{hash}").expect("append to the whitelist");
        drop(file);
        self.guard.signal(libc::SIGHUP);

        // The reload is asynchronous. Probe with a real announce (a `stopped` one is answered
        // even for unlisted hashes, so it proves nothing), then withdraw the probe peer so no
        // client is handed the bogus address 127.0.0.1:1.
        let probe = |event: &str| {
            let path = format!(
                "/announce?info_hash={}&peer_id=-HARNESS-probe000000&port=1&uploaded=0\
                 &downloaded=0&left=1&compact=1{event}",
                url_encode(&hex_to_bytes(&hash))
            );
            http_get(self.addr(), &path)
        };
        let mut last = String::new();
        let accepted = poll_until(Duration::from_secs(30), || match probe("") {
            Ok((200, body)) if !body.windows(14).any(|w| w == b"not authorized") => Some(()),
            Ok((code, body)) => {
                last = format!("HTTP {code}: {}", String::from_utf8_lossy(&body));
                None
            }
            Err(e) => {
                last = e;
                None
            }
        });
        let _ = probe("&event=stopped");
        if accepted.is_none() {
            panic!(
                "opentracker still refuses {hash} after SIGHUP (last reply: {last}); \
                 is {} readable by the user it runs as?\n{}",
                self.whitelist.display(),
                self.guard.diagnostics()
            );
        }
    }

    /// (seeders, leechers) the tracker knows for `info_hash_hex`, from a scrape.
    pub fn scrape(&self, info_hash_hex: &str) -> Option<(u64, u64)> {
        let path = format!(
            "/scrape?info_hash={}",
            url_encode(&hex_to_bytes(info_hash_hex))
        );
        let (code, body) = http_get(self.addr(), &path).ok()?;
        if code != 200 {
            return None;
        }
        let complete = bencode_int_after(&body, b"8:complete")?;
        let incomplete = bencode_int_after(&body, b"10:incomplete")?;
        Some((complete, incomplete))
    }

    /// Waits until the tracker knows at least `seeders` seeders and `peers` peers in all.
    pub fn wait_for_swarm(
        &self,
        info_hash_hex: &str,
        seeders: u64,
        peers: u64,
        timeout: Duration,
        parts: &[&dyn Diagnose],
    ) {
        let seen = poll_until(timeout, || {
            self.scrape(info_hash_hex)
                .filter(|&(c, i)| c >= seeders && c + i >= peers)
        });
        if seen.is_none() {
            let mut all: Vec<&dyn Diagnose> = vec![self];
            all.extend_from_slice(parts);
            panic!(
                "{}",
                report(
                    &format!(
                        "the tracker never saw {seeders} seeder(s) and {peers} peer(s) for \
                         {info_hash_hex} within {timeout:?} (last scrape: {:?})",
                        self.scrape(info_hash_hex)
                    ),
                    &all
                )
            );
        }
    }
}

impl Diagnose for Opentracker {
    fn diagnostics(&self) -> String {
        let whitelist = fs::read_to_string(&self.whitelist).unwrap_or_default();
        format!(
            "{}----- opentracker whitelist -----\n{whitelist}",
            self.guard.diagnostics()
        )
    }
}

/// A user opentracker can drop privileges to; its files must be world-readable.
fn unprivileged_user() -> String {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for candidate in ["nobody", "daemon"] {
        if passwd
            .lines()
            .any(|line| line.split(':').next() == Some(candidate))
        {
            return candidate.to_owned();
        }
    }
    panic!("running as root but neither `nobody` nor `daemon` exists for opentracker -u");
}

// =============================================================================================
// aria2
// =============================================================================================

/// Flags common to every aria2c run: loopback only, no DHT/LPD/PEX, no user config, a log.
fn aria2_command(torrent: &Path, dir: &Path, bind_ip: Ipv4Addr, port: u16, log: &Path) -> Command {
    let mut command = Command::new(require_tool("aria2c"));
    command
        .arg("--no-conf=true")
        .arg(format!("--dir={}", dir.display()))
        .arg(format!("--interface={bind_ip}"))
        .arg(format!("--listen-port={port}"))
        .args([
            "--disable-ipv6=true",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=false",
            "--bt-tracker-interval=2",
            "--seed-ratio=0.0",
            "--summary-interval=0",
            "--show-console-readout=false",
            "--console-log-level=warn",
            "--log-level=info",
        ])
        .arg(format!("--log={}", log.display()))
        .arg(torrent);
    command
}

/// aria2c seeding the data of `torrent` found in `data_parent_dir` (which holds NAME), bound
/// to `bind_ip`, listening on `port`. Runs until dropped.
pub fn aria2_seed(
    torrent: &Path,
    data_parent_dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
) -> ChildGuard {
    let scratch = scratch_dir();
    let log = scratch.path().join("aria2-seed.log");
    let mut command = aria2_command(torrent, data_parent_dir, bind_ip, port, &log);
    command.args(["--bt-seed-unverified=true", "--check-integrity=false"]);
    ChildGuard::spawn(&format!("aria2c seeder {bind_ip}:{port}"), &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
        .with_log(log)
        .with_scratch(scratch)
}

/// aria2c downloading `torrent` into `out_dir`, bound to `bind_ip`, listening on `port`.
/// With `--seed-time=0` it exits once complete: wait for exit code 0 with
/// [`ChildGuard::wait_with_deadline`].
pub fn aria2_download(torrent: &Path, out_dir: &Path, bind_ip: Ipv4Addr, port: u16) -> ChildGuard {
    let scratch = scratch_dir();
    let log = scratch.path().join("aria2-download.log");
    let mut command = aria2_command(torrent, out_dir, bind_ip, port, &log);
    command.args(["--seed-time=0", "--file-allocation=falloc"]);
    ChildGuard::spawn(&format!("aria2c downloader {bind_ip}:{port}"), &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
        .with_log(log)
        .with_scratch(scratch)
}

// =============================================================================================
// Transmission
// =============================================================================================

/// A `transmission-daemon -f -g CONFIG` on its own loopback address, driven with
/// `transmission-remote` over RPC on 127.0.0.1.
pub struct Transmission {
    guard: ChildGuard,
    bind_ip: Ipv4Addr,
    peer_port: u16,
    rpc_port: u16,
}

/// What `transmission-remote -i` says about the (single) torrent.
#[derive(Debug, Clone)]
pub struct TransmissionStatus {
    pub percent_done: f64,
    pub state: String,
}

impl Transmission {
    /// Starts the daemon bound to `bind_ip`, downloading into `download_dir`, and waits until
    /// its RPC answers.
    pub fn start(bind_ip: Ipv4Addr, download_dir: &Path) -> Transmission {
        let daemon = require_tool("transmission-daemon");
        require_tool("transmission-remote");
        let config = scratch_dir();
        let log = config.path().join("transmission.log");
        let peer_port = free_port_on(bind_ip);
        let rpc_port = free_port();
        let settings = format!(
            r#"{{
    "alt-speed-enabled": false,
    "bind-address-ipv4": "{bind_ip}",
    "bind-address-ipv6": "::1",
    "blocklist-enabled": false,
    "dht-enabled": false,
    "download-dir": "{download_dir}",
    "download-queue-enabled": false,
    "encryption": 0,
    "idle-seeding-limit-enabled": false,
    "incomplete-dir-enabled": false,
    "lpd-enabled": false,
    "message-level": 2,
    "peer-port": {peer_port},
    "peer-port-random-on-start": false,
    "pex-enabled": false,
    "port-forwarding-enabled": false,
    "queue-stalled-enabled": false,
    "ratio-limit-enabled": false,
    "rename-partial-files": true,
    "rpc-authentication-required": false,
    "rpc-bind-address": "127.0.0.1",
    "rpc-enabled": true,
    "rpc-host-whitelist-enabled": false,
    "rpc-port": {rpc_port},
    "rpc-whitelist-enabled": false,
    "scrape-paused-torrents-enabled": false,
    "seed-queue-enabled": false,
    "speed-limit-down-enabled": false,
    "speed-limit-up-enabled": false,
    "start-added-torrents": true,
    "utp-enabled": false,
    "watch-dir-enabled": false
}}
"#,
            download_dir = json_escape(&download_dir.display().to_string()),
        );
        fs::write(config.path().join("settings.json"), settings).expect("write settings.json");
        let mut command = Command::new(daemon);
        command
            .arg("-f")
            .arg("-g")
            .arg(config.path())
            .arg("--logfile")
            .arg(&log);
        // SIGTERM lets it send its `stopped` announces; SIGKILL if it takes too long.
        let guard = ChildGuard::spawn(
            &format!("transmission-daemon {bind_ip}:{peer_port}"),
            &mut command,
        )
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(15))
        .with_log(log)
        .with_scratch(config);
        let transmission = Transmission {
            guard,
            bind_ip,
            peer_port,
            rpc_port,
        };
        let up = poll_until(DEADLINE, || {
            if transmission.guard.exit_status().is_some() {
                return Some(false);
            }
            transmission.remote(&["-l"]).ok().map(|_| true)
        });
        if up != Some(true) {
            panic!(
                "transmission-daemon RPC on 127.0.0.1:{rpc_port} never answered\n{}",
                transmission.guard.diagnostics()
            );
        }
        transmission
    }

    pub fn peer_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.bind_ip, self.peer_port)
    }

    pub fn guard(&self) -> &ChildGuard {
        &self.guard
    }

    /// Runs `transmission-remote 127.0.0.1:RPC ARGS…`; `Err` holds its output on failure.
    pub fn remote(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(require_tool("transmission-remote"));
        command
            .arg(format!("127.0.0.1:{}", self.rpc_port))
            .args(args);
        let guard = ChildGuard::spawn("transmission-remote", &mut command);
        let Some(status) = guard.wait_timeout(Duration::from_secs(30)) else {
            return Err(format!("transmission-remote {args:?} timed out"));
        };
        let stdout = guard.stdout_text();
        if status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "transmission-remote {args:?}: {}\n{stdout}{}",
                describe_status(Some(status)),
                guard.stderr_text()
            ))
        }
    }

    /// Adds `torrent`, with its data in (or to be downloaded to) `dir`.
    pub fn add(&self, torrent: &Path, dir: &Path) {
        let torrent = torrent.to_str().expect("UTF-8 torrent path");
        let dir = dir.to_str().expect("UTF-8 directory path");
        if let Err(e) = self.remote(&["-a", torrent, "-w", dir]) {
            panic!("adding {torrent} failed: {e}\n{}", self.diagnostics());
        }
    }

    /// Percent done and state of the torrent, if the daemon reports them.
    pub fn status(&self) -> Option<TransmissionStatus> {
        let info = self.remote(&["-t", "all", "-i"]).ok()?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let percent_done = field("Percent Done:")?.trim_end_matches('%').parse().ok()?;
        let state = field("State:")?;
        Some(TransmissionStatus {
            percent_done,
            state,
        })
    }

    /// Waits until the torrent is 100 % verified and seeding (after adding existing data).
    pub fn wait_seeding(&self, timeout: Duration, parts: &[&dyn Diagnose]) {
        let ready = poll_until(timeout, || {
            self.status().filter(|s| {
                s.percent_done >= 100.0
                    && !s.state.starts_with("Verif")
                    && !s.state.starts_with("Queued")
                    && !s.state.starts_with("Stopped")
            })
        });
        if ready.is_none() {
            self.fail(
                "Transmission never reported 100 % verified and seeding",
                parts,
            );
        }
    }

    /// Waits until the torrent is 100 % done and `final_path` exists under its final name
    /// (Transmission flushes and closes a file before renaming it from NAME.part).
    pub fn wait_complete(&self, final_path: &Path, timeout: Duration, parts: &[&dyn Diagnose]) {
        let done = poll_until(timeout, || {
            if self.guard.exit_status().is_some() {
                return Some(false);
            }
            let status = self.status()?;
            (status.percent_done >= 100.0 && final_path.is_file()).then_some(true)
        });
        if done != Some(true) {
            self.fail(
                &format!(
                    "Transmission did not complete {} within {timeout:?}",
                    final_path.display()
                ),
                parts,
            );
        }
    }

    fn fail(&self, why: &str, parts: &[&dyn Diagnose]) -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![self];
        all.extend_from_slice(parts);
        panic!("{}", report(why, &all))
    }
}

impl Diagnose for Transmission {
    fn diagnostics(&self) -> String {
        let mut out = self.guard.diagnostics();
        if self.guard.is_running() {
            for (what, args) in [
                ("torrent", ["-t", "all", "-i"]),
                ("peers", ["-t", "all", "-pi"]),
            ] {
                let text = self.remote(&args).unwrap_or_else(|e| e);
                let _ = writeln!(out, "----- transmission-remote {what} -----\n{text}");
            }
        }
        out
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}
