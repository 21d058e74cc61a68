//! Payloads, file comparison, directory walks, scratch directories, and the sandbox of the
//! hostile-input tests.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

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

/// Writes `data` to `path`, creating parent directories.
pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
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

/// Every regular file under `root` (not following symlinks), relative to it, sorted.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_iter()
        .filter(|rel| fs::symlink_metadata(root.join(rel)).is_ok_and(|m| !m.is_dir()))
        .collect()
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
