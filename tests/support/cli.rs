//! Running bitfetch and other commands: [`ChildGuard`] (a child killed by PID and reaped on
//! drop, its output captured), [`Run`] (a finished one-shot command), `--json` events, crash
//! checks, and a memory watch over `/proc/PID/status`.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::clients::require_tool;
use super::{COMMAND_DEADLINE, DEADLINE, Diagnose, POLL, poll_until, report, show_bytes};

/// How much of each captured stream or log a diagnostic report shows (the end of it).
const DIAG_TAIL: usize = 12 * 1024;

/// The bitfetch binary built by cargo for this test run, or the one `$BITFETCH_UNDER_TEST`
/// names (to show that a test fails against an older build).
pub fn bitfetch() -> PathBuf {
    std::env::var_os("BITFETCH_UNDER_TEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bitfetch")))
}

/// A `Command` for bitfetch with `args`, without `SSL_CERT_FILE` from the environment (so the
/// HTTPS tests are hermetic), with backtraces on, and with a fresh, empty `XDG_CACHE_HOME` of
/// its own (where the DHT saves its node id and routing table), so that no run loads the table
/// another test saved; a test that wants a given cache sets `XDG_CACHE_HOME` again after.
pub fn bitfetch_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(bitfetch());
    command
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("XDG_CACHE_HOME", fresh_cache_home())
        .env_remove("SSL_CERT_FILE");
    command
}

/// The directory under which [`fresh_cache_home`] makes one cache per command; removed when
/// this test process exits.
static CACHE_ROOT: OnceLock<PathBuf> = OnceLock::new();
static NEXT_CACHE: AtomicU64 = AtomicU64::new(0);

extern "C" fn remove_cache_root() {
    if let Some(root) = CACHE_ROOT.get() {
        let _ = fs::remove_dir_all(root);
    }
}

/// A new empty directory for one bitfetch's `XDG_CACHE_HOME`.
pub fn fresh_cache_home() -> PathBuf {
    let root = CACHE_ROOT.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("bitfetch-it-cache-")
            .tempdir()
            .expect("create the root of the test caches")
            .keep();
        // SAFETY: registers a plain `extern "C" fn` with no arguments, run once at exit.
        unsafe {
            libc::atexit(remove_cache_root);
        }
        root
    });
    let dir = root.join(NEXT_CACHE.fetch_add(1, Ordering::Relaxed).to_string());
    fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
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
    /// Exit status, and when this guard first saw it.
    status: Mutex<Option<(ExitStatus, Instant)>>,
    started: Instant,
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
        ChildGuard::spawn_with(name, command, None, false).0
    }

    /// Spawns `command`. `stdin`: bytes written (then closed) by a helper thread, or
    /// /dev/null. `keep_stdout`: hand the read end of stdout to the caller instead of
    /// capturing it.
    pub fn spawn_with(
        name: &str,
        command: &mut Command,
        stdin: Option<Vec<u8>>,
        keep_stdout: bool,
    ) -> (ChildGuard, Option<ChildStdout>) {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Dropping the pipe at the end is the EOF the child reads up to.
            thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let stdout = Buffer::default();
        let stderr = Buffer::default();
        let mut readers = vec![spawn_reader(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
        )];
        let out_pipe = child.stdout.take().expect("piped stdout");
        let handed = if keep_stdout {
            Some(out_pipe)
        } else {
            readers.push(spawn_reader(out_pipe, stdout.clone()));
            None
        };
        let guard = ChildGuard {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(child),
            status: Mutex::new(None),
            started: Instant::now(),
            stdout,
            stderr,
            readers,
            stop_signal: libc::SIGKILL,
            stop_grace: Duration::ZERO,
            logs: Vec::new(),
            scratch: None,
        };
        (guard, handed)
    }

    /// Spawns `command` named after its command line.
    pub fn start(
        command: &mut Command,
        stdin: Option<Vec<u8>>,
        keep_stdout: bool,
    ) -> (ChildGuard, Option<ChildStdout>) {
        let name = format!(
            "{} {}",
            command.get_program().to_string_lossy(),
            command
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
        ChildGuard::spawn_with(&name, command, stdin, keep_stdout)
    }

    /// `bitfetch ARGS`, stdin from /dev/null, output captured, SIGKILL on drop.
    pub fn bitfetch<I, S>(args: I) -> ChildGuard
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        ChildGuard::start(&mut bitfetch_command(args), None, false).0
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

    pub fn stdout(&self) -> Vec<u8> {
        lock(&self.stdout).clone()
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
                *status = Some((s, Instant::now()));
            }
        }
        status.map(|(s, _)| s)
    }

    /// When the exit was first seen (at most one poll interval late).
    pub fn exited_at(&self) -> Option<Instant> {
        self.exit_status()?;
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|(_, at)| at)
    }

    /// How long after its start the process was seen to exit.
    pub fn elapsed_at_exit(&self) -> Option<Duration> {
        self.exited_at().map(|at| at - self.started)
    }

    /// The first `bitfetch: error:` line on stderr.
    pub fn error_line(&self) -> Option<String> {
        self.stderr_text()
            .lines()
            .find(|l| l.starts_with("bitfetch: error:"))
            .map(str::to_owned)
    }

    /// Panics with this process's and `parts`' diagnostics.
    pub fn fail(&self, why: &str, parts: &[&dyn Diagnose]) -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![self];
        all.extend_from_slice(parts);
        panic!("{}", report(why, &all))
    }

    /// Waits for the exit; panics with diagnostics (and `parts`') after `timeout`.
    pub fn wait(&self, timeout: Duration, parts: &[&dyn Diagnose]) -> ExitStatus {
        match self.wait_timeout(timeout) {
            Some(status) => status,
            None => self.fail(&format!("still running after {timeout:?}"), parts),
        }
    }

    /// Waits for the exit (within [`DEADLINE`]) and panics with everyone's diagnostics unless
    /// the child exited with `code` (no signal, no panic).
    pub fn expect_code(&self, code: i32, parts: &[&dyn Diagnose]) {
        self.wait(DEADLINE, parts);
        assert_exit_code(self, code, parts);
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
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) =
            status.map(|s| (s, Instant::now()));
        self.wait_readers(Duration::from_secs(2));
        status
    }
}

pub fn describe_status(status: Option<ExitStatus>) -> String {
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

/// Starts bitfetch with `args` under `name` (see [`bitfetch_command`]). On drop it gets
/// SIGTERM, then SIGKILL after 10 s.
pub fn spawn_bitfetch<I, S>(name: &str, args: I) -> ChildGuard
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    spawn_bitfetch_env(name, args, &[])
}

/// [`spawn_bitfetch`] with extra environment variables.
pub fn spawn_bitfetch_env<I, S>(name: &str, args: I, env: &[(&str, &Path)]) -> ChildGuard
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = bitfetch_command(args);
    for (k, v) in env {
        command.env(k, v);
    }
    ChildGuard::spawn(name, &mut command).with_stop_signal(libc::SIGTERM, Duration::from_secs(10))
}

/// `download TORRENT -o OUT --bind IP --port 0 [--peer P]…`: the arguments of a loopback
/// download.
pub fn download_args(
    torrent: &Path,
    out: &Path,
    ip: std::net::Ipv4Addr,
    peers: &[SocketAddr],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "download".into(),
        super::path_arg(torrent),
        "-o".into(),
        super::path_arg(out),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
    ];
    for peer in peers {
        args.push("--peer".into());
        args.push(peer.to_string());
    }
    args
}

/// `bitfetch seed TORRENT DATA --bind IP --port 0 EXTRA…` under `name`, waiting until it
/// listens.
pub fn start_seeder(
    name: &str,
    torrent: &Path,
    data: &Path,
    ip: std::net::Ipv4Addr,
    extra: &[&str],
) -> (ChildGuard, SocketAddr) {
    let mut args: Vec<String> = vec![
        "seed".into(),
        super::path_arg(torrent),
        super::path_arg(data),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let guard = spawn_bitfetch(name, &args);
    let addr = wait_for_listening(&guard);
    (guard, addr)
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
    if stderr.contains("panicked") {
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
// One-shot commands
// =============================================================================================

/// A finished one-shot command: its status and output (as text and as raw bytes, to look for
/// control characters and invalid UTF-8 in what bitfetch prints).
#[derive(Debug)]
pub struct Run {
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub raw_stdout: Vec<u8>,
    pub raw_stderr: Vec<u8>,
    /// Killed by the hang guard.
    pub timed_out: bool,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.clone()
    }

    /// What to print when an assertion about this run fails.
    pub fn dump(&self) -> String {
        let show = |b: &[u8]| {
            let text = show_bytes(b);
            if text.len() > 6000 {
                let mut end = 6000;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                format!("{}… ({} bytes)", &text[..end], b.len())
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
            show(&self.raw_stdout),
            show(&self.raw_stderr)
        )
    }

    /// A crash-like end: a signal, a panic message, or an abort-like exit code.
    pub fn crash_problem(&self) -> Option<String> {
        crash_problem(Some(self.status), &self.stderr)
    }

    pub fn assert_no_crash(&self) {
        if let Some(p) = self.crash_problem() {
            panic!("{p}: {}", self.dump());
        }
    }

    /// Asserts a clean exit with `code`.
    pub fn assert_code(&self, code: i32) {
        self.assert_no_crash();
        assert_eq!(self.code(), Some(code), "wrong exit code: {}", self.dump());
    }

    pub fn assert_success(&self) {
        self.assert_code(0);
    }

    /// The first stderr line starting `bitfetch: error:`.
    pub fn error_line(&self) -> Option<&str> {
        self.stderr
            .lines()
            .find(|l| l.starts_with("bitfetch: error:"))
    }

    /// stdout and stderr together, for loose searches.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A crash-like end: a signal, a panic message, or an abort-like exit code.
pub fn crash_problem(status: Option<ExitStatus>, stderr: &str) -> Option<String> {
    if stderr.contains("panicked") {
        return Some("bitfetch panicked".into());
    }
    let status = status?;
    if let Some(sig) = status.signal() {
        return Some(format!("killed by signal {sig}"));
    }
    match status.code() {
        Some(c @ (101 | 134 | 135 | 139)) => Some(format!("crash-like exit code {c}")),
        _ => None,
    }
}

/// Runs `cmd` with stdin closed; after `deadline` the child is killed by PID and returned as
/// `Err`.
pub fn run_with_deadline(
    mut cmd: Command,
    desc: String,
    deadline: Duration,
) -> Result<Run, Box<Run>> {
    let guard = ChildGuard::spawn(&desc, &mut cmd);
    let finished = guard.wait_timeout(deadline);
    let status = finished.or_else(|| guard.stop()).unwrap_or_else(|| {
        panic!("{desc}: hang guard: killed after {deadline:?}, and it did not go away")
    });
    let (raw_stdout, raw_stderr) = (guard.stdout(), lock(&guard.stderr).clone());
    let run = Run {
        desc,
        status,
        stdout: String::from_utf8_lossy(&raw_stdout).into_owned(),
        stderr: String::from_utf8_lossy(&raw_stderr).into_owned(),
        raw_stdout,
        raw_stderr,
        timed_out: finished.is_none(),
    };
    if run.timed_out {
        Err(Box::new(run))
    } else {
        Ok(run)
    }
}

/// Runs `cmd` to completion with stdin closed, killing it (and failing) after `deadline`.
pub fn run_guarded(cmd: Command, desc: String, deadline: Duration) -> Run {
    run_with_deadline(cmd, desc, deadline).unwrap_or_else(|killed| {
        panic!(
            "{}: hang guard: still running after {deadline:?}, killed. {}",
            killed.desc,
            killed.dump()
        )
    })
}

/// Runs `command ARGS` in `cwd`, failing after [`super::HANG_GUARD`].
fn run_command_in<I, S>(name: &str, mut command: Command, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut desc = name.to_owned();
    for a in args {
        desc.push(' ');
        desc.push_str(&a.as_ref().to_string_lossy());
        command.arg(a);
    }
    command.current_dir(cwd);
    run_guarded(command, desc, super::HANG_GUARD)
}

/// Runs bitfetch with `args` in `cwd`, failing after [`super::HANG_GUARD`].
pub fn run_in<I, S>(cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_command_in(
        "bitfetch",
        bitfetch_command::<[&str; 0], &str>([]),
        cwd,
        args,
    )
}

/// Runs bitfetch with `args`; a run that outlives `deadline` is killed and marked
/// `timed_out` (not a panic: the caller decides).
pub fn run_bitfetch<I, S>(desc: &str, args: I, deadline: Duration) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_deadline(bitfetch_command(args), desc.to_owned(), deadline).unwrap_or_else(|r| *r)
}

/// Runs an external tool with `args` in `cwd`, failing after [`super::HANG_GUARD`].
pub fn tool<I, S>(name: &str, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_command_in(name, Command::new(require_tool(name)), cwd, args)
}

/// `bitfetch verify TORRENT DATA`, run to completion.
pub fn verify(torrent: &Path, data: &Path) -> ChildGuard {
    let mut command = bitfetch_command(["verify"]);
    command.arg(torrent).arg(data);
    run_bounded("bitfetch verify", &mut command, COMMAND_DEADLINE)
}

// =============================================================================================
// --json events
// =============================================================================================

/// The complete lines a `--json` bitfetch has printed on stdout so far, parsed. A line that
/// is not JSON breaks the `--json` contract and fails the test.
pub fn events(guard: &ChildGuard) -> Vec<Value> {
    let text = guard.stdout_text();
    // Only lines already terminated: the last one may still be arriving.
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n') && !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line.trim()).unwrap_or_else(|e| {
                guard.fail(
                    &format!("--json printed a stdout line that is not JSON ({e}): {line:?}"),
                    &[],
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
        .unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {event}"))
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
    found.unwrap_or_else(|| guard.fail("never reported a `listening` event", &[]))
}

// =============================================================================================
// What bitfetch prints
// =============================================================================================

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

/// Peak resident memory allowed to a bitfetch process under attack.
pub const MEMORY_LIMIT_KIB: u64 = 100 * 1024;

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
