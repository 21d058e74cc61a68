//! Shared by `tests/hostile_torrents.rs` and `tests/cli_roundtrip.rs`: a tiny bencode writer,
//! a child-process runner with a hang guard, and a few file-system helpers.
//!
//! Lives in a directory (`common_cli/mod.rs`) so cargo does not build it as a test crate of
//! its own.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_bitfetch");
/// No child may run longer than this; a hung child is killed and the test fails.
pub const HANG_GUARD: Duration = Duration::from_secs(30);
/// A tracker URL nothing listens on (port 1 is refused at once on loopback).
pub const DEAD_TRACKER: &str = "http://127.0.0.1:1/announce";

// ---------------------------------------------------------------------------------------------
// Bencode writer
// ---------------------------------------------------------------------------------------------

/// A bencode value to write. Dictionaries keep the order they were given in; use [`dict`] for
/// the canonical sorted order and [`dict_unsorted`] to keep a deliberate wrong order.
#[derive(Debug, Clone)]
pub enum B {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<B>),
    Dict(Vec<(Vec<u8>, B)>),
    /// Written verbatim: for malformed or non-canonical tokens.
    Raw(Vec<u8>),
}

impl B {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            B::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'e');
            }
            B::Bytes(b) => put_bytes(out, b),
            B::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            B::Dict(pairs) => {
                out.push(b'd');
                for (k, v) in pairs {
                    put_bytes(out, k);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
            B::Raw(r) => out.extend_from_slice(r),
        }
    }
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(b);
}

pub fn int(i: i64) -> B {
    B::Int(i)
}

pub fn bytes(b: impl AsRef<[u8]>) -> B {
    B::Bytes(b.as_ref().to_vec())
}

pub fn raw(b: impl AsRef<[u8]>) -> B {
    B::Raw(b.as_ref().to_vec())
}

pub fn list(items: impl IntoIterator<Item = B>) -> B {
    B::List(items.into_iter().collect())
}

/// A dictionary with its keys in canonical (raw byte) order.
pub fn dict<K: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, B)>) -> B {
    let sorted: BTreeMap<Vec<u8>, B> = pairs
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_vec(), v))
        .collect();
    B::Dict(sorted.into_iter().collect())
}

/// A dictionary with its keys in exactly the order given.
pub fn dict_unsorted<K: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, B)>) -> B {
    B::Dict(
        pairs
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_vec(), v))
            .collect(),
    )
}

/// A list of path elements.
pub fn path_list(elements: &[&str]) -> B {
    list(elements.iter().map(bytes))
}

// ---------------------------------------------------------------------------------------------
// Running children
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Run {
    pub desc: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// What to print when an assertion about this run fails.
    pub fn dump(&self) -> String {
        format!(
            "{}\n  status: {:?}\n  stdout: {}\n  stderr: {}",
            self.desc,
            self.status,
            clip(&self.stdout),
            clip(&self.stderr)
        )
    }

    /// Ended by exit(), not by a signal, and did not panic.
    pub fn crash_problem(&self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = self.status.signal() {
            return Some(format!("killed by signal {sig}"));
        }
        if self.stderr.contains("panicked") {
            return Some("panicked".into());
        }
        match self.code() {
            Some(c @ (101 | 134 | 135 | 139)) => Some(format!("crash-like exit code {c}")),
            _ => None,
        }
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

fn clip(s: &str) -> String {
    const MAX: usize = 4000;
    if s.len() <= MAX {
        return format!("{s:?}");
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &s[..end], s.len())
}

/// Runs `cmd` to completion with stdin closed, killing it (and failing) after `guard`.
pub fn run_guarded(cmd: Command, desc: String, guard: Duration) -> Run {
    match run_with_deadline(cmd, desc, guard) {
        Ok(run) => run,
        Err(killed) => panic!(
            "{}: hang guard: still running after {guard:?}, killed. stderr: {}",
            killed.desc,
            clip(&killed.stderr)
        ),
    }
}

/// Runs `cmd` with stdin closed; after `guard` the child is killed and returned as `Err`.
pub fn run_with_deadline(mut cmd: Command, desc: String, guard: Duration) -> Result<Run, Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{desc}: cannot spawn: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let to_run = |desc: String, out: std::process::Output| Run {
        desc,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    match rx.recv_timeout(guard) {
        Ok(Ok(out)) => Ok(to_run(desc, out)),
        Ok(Err(e)) => panic!("{desc}: waiting for the child failed: {e}"),
        Err(_) => {
            // The child is not reaped until the waiter thread returns, so the pid is still ours.
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(out)) => Err(to_run(desc, out)),
                _ => panic!("{desc}: hang guard: killed after {guard:?}, and it did not go away"),
            }
        }
    }
}

/// Runs bitfetch with `args` in `cwd`.
pub fn bitfetch<I, S>(cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let desc = format!(
        "bitfetch {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(BIN);
    cmd.args(&args).current_dir(cwd);
    run_guarded(cmd, desc, HANG_GUARD)
}

/// Runs an external tool with `args` in `cwd`.
pub fn tool<I, S>(name: &str, cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let exe = require_tool(name);
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let desc = format!(
        "{name} {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new(exe);
    cmd.args(&args).current_dir(cwd);
    run_guarded(cmd, desc, HANG_GUARD)
}

/// Finds `name` on PATH or fails the test with a clear message.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return candidate;
            }
        }
    }
    panic!(
        "required tool `{name}` is not installed (not found on PATH); \
         install it (e.g. apt-get install mktorrent transmission-cli aria2) to run this test"
    );
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

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

pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Every entry under `root` (files, dirs, symlinks), as paths relative to `root`, sorted.
/// Does not follow symlinks.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_path_buf());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

/// True when `text` contains `n` as a whole number (not part of a longer digit run).
pub fn mentions_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|tok| tok == n.to_string())
}
