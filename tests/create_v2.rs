//! `create --v2` and `create --hybrid` (BEP 52, with BEP 47 pad files) against libtorrent 2.0,
//! the reference: libtorrent must load what bitfetch makes with the info hashes bitfetch
//! reports, and libtorrent's own torrent of the same files with the same piece length must
//! hold the same `file tree`, `piece layers`, `pieces` and `files` (pads included), byte for
//! byte.

mod support;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha1::{Digest as _, Sha1};
use sha2::Sha256;
use support::bencode::Value as B;
use support::cli::*;
use support::clients::{SYSTEM_PYTHON, require_libtorrent};
use support::files::*;
use support::*;

const LIBTORRENT_CREATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/libtorrent_create.py"
);

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `libtorrent_create.py ARGS` and returns its one JSON line.
fn libtorrent(args: &[OsString]) -> serde_json::Value {
    require_libtorrent();
    let mut command = Command::new(SYSTEM_PYTHON);
    command
        .arg("-u")
        .arg(LIBTORRENT_CREATE)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let run = run_guarded(
        command,
        format!("libtorrent_create.py {args:?}"),
        HANG_GUARD,
    );
    run.assert_success();
    serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("libtorrent_create.py printed no JSON ({e}): {}", run.dump()))
}

/// What libtorrent reads from `torrent` (see `read` in libtorrent_create.py).
fn libtorrent_read(torrent: &Path) -> serde_json::Value {
    libtorrent(&[os("read"), os("--torrent"), torrent.into()])
}

/// libtorrent's torrent of `content` (`mode`: v1, v2 or hybrid) written to `out`.
fn libtorrent_make(content: &Path, piece_len: u32, mode: &str, out: &Path) {
    libtorrent(&[
        os("make"),
        os("--dir"),
        content.into(),
        os("--piece-length"),
        os(piece_len.to_string()),
        os("--mode"),
        os(mode),
        os("--out"),
        out.into(),
    ]);
}

/// `bitfetch create CONTENT --piece-length N FLAG -o OUT`, asserted to succeed; its stderr.
fn bitfetch_create(cwd: &Path, content: &Path, piece_len: u32, flag: &str, out: &Path) -> Run {
    let run = run_in(
        cwd,
        [
            os("create"),
            content.into(),
            os("--piece-length"),
            os(piece_len.to_string()),
            os(flag),
            os("-o"),
            out.into(),
        ],
    );
    run.assert_success();
    run
}

/// A torrent file, decoded by the tests' own bencode reader.
struct Torrent {
    bytes: Vec<u8>,
    top: B,
}

impl Torrent {
    fn load(path: &Path) -> Torrent {
        let bytes = std::fs::read(path).unwrap();
        let top = B::decode(&bytes).unwrap_or_else(|| panic!("{} is not bencode", path.display()));
        Torrent { bytes, top }
    }

    fn info_raw(&self) -> &[u8] {
        let (_, span) = self.top.entry("info").expect("an info dictionary");
        &self.bytes[span]
    }

    fn info(&self) -> &B {
        self.top.get("info").expect("an info dictionary")
    }

    /// The raw bytes of `key` in the info dictionary (or at the top with `top`). The reader
    /// keeps every value's range in the whole buffer, nested ones included.
    fn raw(&self, key: &str, top: bool) -> Option<&[u8]> {
        let dict = if top { &self.top } else { self.info() };
        let (_, span) = dict.entry(key)?;
        Some(&self.bytes[span])
    }
}

/// Files whose sizes cover the cases: empty (in the middle, and last with `empty_last`; else
/// the last file is a short one), smaller than a 16 KiB block, exactly one piece, one byte over
/// a piece, several pieces with a short last one, in nested directories, and names whose
/// bytewise order differs from a plain string sort of their paths (`a/x` sorts before `a-x`
/// and `a.b` in a file tree, `B` before `a`).
fn odd_directory(root: &Path, piece_len: u64, empty_last: bool) -> PathBuf {
    let dir = root.join("content");
    let files: [(&str, u64); 10] = [
        ("B", 1),
        ("a/x", 100),
        ("a-x", 0),
        ("a.b", piece_len),
        ("big", 3 * piece_len + 12_345),
        ("mid", piece_len + 1),
        ("sub/deep/er", 5 * 16_384 + 7),
        ("sub/empty", 0),
        ("sub/leaf", 16_384),
        ("zz_last", if empty_last { 0 } else { 1000 }),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        write_payload(&dir.join(name), *len, 100 + i as u64);
    }
    dir
}

/// Checks bitfetch's torrent (made with `flag`) of `content` against libtorrent's reading of it
/// and against libtorrent's own torrent of the same content.
fn check_against_libtorrent(content: &Path, piece_len: u32, mode: &str) {
    let scratch = scratch_dir();
    let ours_path = scratch.path().join("ours.torrent");
    let theirs_path = scratch.path().join("theirs.torrent");
    let run = bitfetch_create(
        scratch.path(),
        content,
        piece_len,
        &format!("--{mode}"),
        &ours_path,
    );
    libtorrent_make(content, piece_len, mode, &theirs_path);
    let ours = Torrent::load(&ours_path);
    let theirs = Torrent::load(&theirs_path);
    let context = || format!("{mode}, {piece_len}-byte pieces, {}", run.dump());

    // libtorrent loads ours, with the info hashes of our info dictionary's bytes, which
    // bitfetch reported.
    let read = libtorrent_read(&ours_path);
    let v2 = hex(&Sha256::digest(ours.info_raw()));
    assert_eq!(read["v2"].as_str(), Some(v2.as_str()), "{}", context());
    assert!(run.stderr.contains(&v2), "{}", context());
    if mode == "hybrid" {
        let v1 = hex(&Sha1::digest(ours.info_raw()));
        assert_eq!(read["v1"].as_str(), Some(v1.as_str()), "{}", context());
        assert!(run.stderr.contains(&v1), "{}", context());
    } else {
        assert!(
            read["v1"].is_null(),
            "a v2-only torrent has no v1 hash: {}",
            context()
        );
    }
    assert_eq!(read["piece_length"], piece_len, "{}", context());

    // Made the same way, part for part.
    for (key, top) in [
        ("file tree", false),
        ("meta version", false),
        ("name", false),
        ("piece length", false),
        ("pieces", false),
        ("files", false),
        ("length", false),
        ("piece layers", true),
    ] {
        assert!(
            ours.raw(key, top) == theirs.raw(key, top),
            "`{key}` differs from libtorrent's ({})\nours:   {:?}\ntheirs: {:?}",
            context(),
            ours.raw(key, top).map(show_bytes),
            theirs.raw(key, top).map(show_bytes),
        );
    }
    if mode == "v2" {
        assert!(ours.info().get("pieces").is_none(), "{}", context());
        assert!(ours.info().get("files").is_none(), "{}", context());
    }
    // Nothing else in the info dictionary: then the info hashes are libtorrent's too.
    assert_eq!(
        hex(&Sha256::digest(ours.info_raw())),
        hex(&Sha256::digest(theirs.info_raw())),
        "{}",
        context()
    );
}

#[test]
fn v2_multi_file_torrents_match_libtorrent() {
    for (piece_len, empty_last) in [(16 * 1024, true), (64 * 1024, false)] {
        let root = scratch_dir();
        let content = odd_directory(root.path(), u64::from(piece_len), empty_last);
        check_against_libtorrent(&content, piece_len, "v2");
    }
}

#[test]
fn hybrid_multi_file_torrents_match_libtorrent() {
    for piece_len in [16 * 1024, 64 * 1024] {
        for empty_last in [true, false] {
            let root = scratch_dir();
            let content = odd_directory(root.path(), u64::from(piece_len), empty_last);
            check_against_libtorrent(&content, piece_len, "hybrid");
        }
    }
}

#[test]
fn single_file_v2_and_hybrid_torrents_match_libtorrent() {
    let root = scratch_dir();
    for (len, piece_len) in [(100u64, 16 * 1024), (5 * 16_384 + 3, 32 * 1024)] {
        let file = root.path().join(format!("single-{len}.bin"));
        write_payload(&file, len, len);
        for mode in ["v2", "hybrid"] {
            check_against_libtorrent(&file, piece_len, mode);
        }
    }
}

/// libtorrent reads the pads of bitfetch's hybrid torrent as pad files: one after every
/// non-empty file that does not end on a piece boundary, the last one included (as libtorrent
/// makes them), none after an empty one.
#[test]
fn hybrid_pads_every_unaligned_file_to_a_piece_boundary() {
    let root = scratch_dir();
    let piece_len = 16 * 1024u32;
    let content = odd_directory(root.path(), u64::from(piece_len), false);
    let torrent = root.path().join("x.torrent");
    bitfetch_create(root.path(), &content, piece_len, "--hybrid", &torrent);
    let read = libtorrent_read(&torrent);
    let files = read["files"].as_array().unwrap();
    let listed: Vec<(String, u64, bool)> = files
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["size"].as_u64().unwrap(),
                f["pad"].as_bool().unwrap(),
            )
        })
        .collect();
    let p = u64::from(piece_len);
    let pad = |n: u64| (format!("content/.pad/{n}"), n, true);
    let file = |name: &str, n: u64| (format!("content/{name}"), n, false);
    let want = vec![
        file("B", 1),
        pad(p - 1),
        file("a/x", 100),
        pad(p - 100),
        file("a-x", 0),
        file("a.b", p),
        file("big", 3 * p + 12_345),
        pad(p - 12_345),
        file("mid", p + 1),
        pad(p - 1),
        file("sub/deep/er", 5 * 16_384 + 7),
        pad(p - 7),
        file("sub/empty", 0),
        file("sub/leaf", 16_384),
        file("zz_last", 1000),
        pad(p - 1000),
    ];
    assert_eq!(listed, want);
    let total: u64 = want.iter().map(|(_, n, _)| n).sum();
    assert_eq!(read["total_size"], total);
    assert_eq!(read["num_pieces"], total.div_ceil(p));
}

#[test]
fn v2_and_hybrid_exclude_each_other() {
    let root = scratch_dir();
    let file = root.path().join("f");
    write_payload(&file, 1000, 1);
    let out = root.path().join("f.torrent");
    let run = run_in(
        root.path(),
        [
            os("create"),
            file.clone().into(),
            os("--v2"),
            os("--hybrid"),
            os("-o"),
            out.clone().into(),
        ],
    );
    run.assert_code(2);
    assert!(
        run.stderr.contains("--v2 and --hybrid"),
        "the error names both options: {}",
        run.dump()
    );
    assert!(!out.exists(), "no torrent after a usage error");
}

#[test]
fn v2_of_nothing_but_empty_files_is_refused() {
    let root = scratch_dir();
    let dir = root.path().join("empties");
    write_payload(&dir.join("a"), 0, 1);
    write_payload(&dir.join("b"), 0, 2);
    let run = run_in(root.path(), [os("create"), dir.into(), os("--v2")]);
    run.assert_code(2);
    assert!(run.stderr.contains("no data"), "{}", run.dump());
}
