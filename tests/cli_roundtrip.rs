//! `create`, `verify` and `info --json` end to end, and interoperability with the torrents
//! other tools make (mktorrent, transmission-create) and read (transmission-show, aria2c).

mod support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::cli::*;
use support::clients::require_tool;
use support::files::*;
use support::torrent::DEAD_TRACKER;
use support::*;

const TRACKER2: &str = "http://127.0.0.1:2/announce";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// `bitfetch create PATH -a DEAD_TRACKER [extra...] -o OUT`, asserted to succeed.
fn create(cwd: &Path, path: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec![os("create"), path.into(), os("-a"), os(DEAD_TRACKER)];
    args.extend(extra.iter().map(|s| os(*s)));
    args.extend([os("-o"), out.into()]);
    let run = run_in(cwd, args);
    run.assert_success();
    assert!(
        out.is_file(),
        "create wrote no {}: {}",
        out.display(),
        run.dump()
    );
    run
}

fn info_json(cwd: &Path, torrent: &Path) -> Value {
    let run = run_in(cwd, [os("info"), torrent.into(), os("--json")]);
    run.assert_success();
    let text = run.stdout.trim();
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("info --json is not JSON ({e}): {}", run.dump()))
}

fn verify(cwd: &Path, torrent: &Path, data: Option<&Path>) -> Run {
    let mut args = vec![os("verify"), torrent.into()];
    if let Some(d) = data {
        args.push(d.into());
    }
    run_in(cwd, args)
}

/// `verify` exits 1 and names `bad_piece` (0-based).
fn assert_verify_names_bad_piece(run: &Run, bad_piece: u64) {
    run.assert_code(1);
    assert!(
        mentions_number(&run.all_output(), bad_piece),
        "verify should name bad piece {bad_piece}: {}",
        run.dump()
    );
}

fn flip_byte(path: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&b).unwrap();
}

fn set_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn as_u64(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a non-negative integer in {v}"))
}

/// The "Hash:" transmission-show prints for a torrent.
fn transmission_hash(cwd: &Path, torrent: &Path) -> String {
    let run = tool("transmission-show", cwd, [torrent]);
    run.assert_success();
    run.stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Hash: "))
        .unwrap_or_else(|| panic!("no `Hash:` line from transmission-show: {}", run.dump()))
        .trim()
        .to_lowercase()
}

/// A test tree: `(relative path, size)`, including zero-length files and nested dirs.
const TREE: &[(&str, usize)] = &[
    ("a.bin", 50_000),
    ("empty.dat", 0),
    ("sub/b.bin", 16_384),
    ("sub/deeper/c.txt", 123),
    ("sub/deeper/zero", 0),
    ("sub/deeper/z.bin", 70_001),
    ("sub/x/y/w.bin", 9_999),
];

fn tree_total() -> u64 {
    TREE.iter().map(|(_, n)| *n as u64).sum()
}

/// Writes TREE under `dir` and returns the contents by relative path.
fn write_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (i, (rel, size)) in TREE.iter().enumerate() {
        let data = pseudo_random(*size, 100 + i as u64);
        write_file(&dir.join(rel), &data);
        out.insert(rel.to_string(), data);
    }
    out
}

/// The files of an `info --json` object as (path relative to the torrent root, size), in
/// torrent order. The contract's example path ("dir/file") could mean with or without the
/// torrent's name in front; either is accepted, but every entry must use the same form.
fn json_files(v: &Value, name: &str) -> Vec<(String, u64)> {
    let files = v["files"]
        .as_array()
        .unwrap_or_else(|| panic!("`files` is not an array: {v}"));
    let raw: Vec<(String, u64)> = files
        .iter()
        .map(|f| {
            (
                f["path"]
                    .as_str()
                    .expect("file path is a string")
                    .to_string(),
                f["size"].as_u64().expect("file size is an integer"),
            )
        })
        .collect();
    let prefix = format!("{name}/");
    let prefixed = raw.iter().filter(|(p, _)| p.starts_with(&prefix)).count();
    assert!(
        prefixed == 0 || prefixed == raw.len(),
        "paths in `files` mix NAME/-prefixed and bare forms: {raw:?}"
    );
    raw.into_iter()
        .map(|(p, n)| {
            (
                if prefixed > 0 {
                    p[prefix.len()..].to_string()
                } else {
                    p
                },
                n,
            )
        })
        .collect()
}

struct Tmp {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

/// A fresh directory holding `data/NAME`: `size` pseudo-random bytes from `seed`.
fn tmp_with_data_file(name: &str, size: usize, seed: u64) -> (Tmp, PathBuf) {
    let t = tmp();
    let file = t.path.join("data").join(name);
    write_file(&file, &pseudo_random(size, seed));
    (t, file)
}

/// `t` with the test tree written to `t/tree` (returned).
fn tmp_with_tree(t: Tmp) -> (Tmp, PathBuf) {
    let root = t.path.join("tree");
    write_tree(&root);
    (t, root)
}

fn tmp() -> Tmp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    Tmp { _dir: dir, path }
}

// ---------------------------------------------------------------------------------------------
// Single-file round trips
// ---------------------------------------------------------------------------------------------

/// create → info → verify (three ways) → corrupt → restore → truncate.
fn single_roundtrip(size: usize, piece_len: u64, corrupt_pieces: &[u64]) {
    let t = tmp();
    let name = format!("payload-{size}.bin");
    let data_dir = t.path.join("data");
    let file = data_dir.join(&name);
    let content = pseudo_random(size, size as u64);
    write_file(&file, &content);
    let torrent = t.path.join("t.torrent");
    create(
        &t.path,
        &file,
        &torrent,
        &["--piece-length", &piece_len.to_string()],
    );

    let v = info_json(&t.path, &torrent);
    let pieces = (size as u64).div_ceil(piece_len);
    assert_eq!(v["name"], Value::from(name.as_str()), "{v}");
    assert_eq!(as_u64(&v, "total_size"), size as u64, "{v}");
    assert_eq!(as_u64(&v, "piece_length"), piece_len, "{v}");
    assert_eq!(as_u64(&v, "pieces"), pieces, "{v}");
    assert_eq!(
        v["files"],
        serde_json::json!([{"path": name, "size": size}]),
        "single-file `files` is one entry named NAME"
    );
    assert_eq!(v["private"], Value::Bool(false), "{v}");
    assert_eq!(v["trackers"], serde_json::json!([[DEAD_TRACKER]]), "{v}");

    // DATA_PATH: the directory holding NAME, the file itself, and the default `.`.
    verify(&t.path, &torrent, Some(&data_dir)).assert_success();
    verify(&t.path, &torrent, Some(&file)).assert_success();
    verify(&data_dir, &torrent, None).assert_success();

    for &p in corrupt_pieces {
        // The last byte of the piece: for the final piece, the last byte of the file.
        let offset = ((p + 1) * piece_len).min(size as u64) - 1;
        flip_byte(&file, offset);
        assert_verify_names_bad_piece(&verify(&t.path, &torrent, Some(&data_dir)), p);
        assert_verify_names_bad_piece(&verify(&t.path, &torrent, Some(&file)), p);
        flip_byte(&file, offset);
        verify(&t.path, &torrent, Some(&file)).assert_success();
    }

    // One byte short.
    set_len(&file, size as u64 - 1);
    verify(&t.path, &torrent, Some(&data_dir)).assert_code(1);
    verify(&t.path, &torrent, Some(&file)).assert_code(1);
    // Restored, then cut to nothing.
    std::fs::write(&file, &content).unwrap();
    verify(&t.path, &torrent, Some(&file)).assert_success();
    set_len(&file, 0);
    verify(&t.path, &torrent, Some(&file)).assert_code(1);
}

#[test]
fn roundtrip_single_one_byte() {
    single_roundtrip(1, 16384, &[0]);
}

#[test]
fn roundtrip_single_exactly_one_piece() {
    single_roundtrip(16384, 16384, &[0]);
}

#[test]
fn roundtrip_single_one_piece_plus_one_byte() {
    single_roundtrip(16385, 16384, &[1, 0]);
}

#[test]
fn roundtrip_single_several_mib_last_piece_one_byte() {
    // 3 MiB + 1 in 64 KiB pieces: 49 pieces, the last one byte long.
    single_roundtrip(3 * 1024 * 1024 + 1, 65536, &[37, 48, 0]);
}

#[test]
fn verify_missing_single_file_is_incomplete() {
    let (t, file) = tmp_with_data_file("f.bin", 40000, 1);
    let torrent = t.path.join("t.torrent");
    create(&t.path, &file, &torrent, &["--piece-length", "16384"]);
    std::fs::remove_file(&file).unwrap();
    verify(&t.path, &torrent, Some(&t.path.join("data"))).assert_code(1);
}

// ---------------------------------------------------------------------------------------------
// Multi-file round trip
// ---------------------------------------------------------------------------------------------

#[test]
fn roundtrip_directory_with_nested_dirs_and_empty_files() {
    let t = tmp();
    let data = t.path.join("data");
    let root = data.join("tree");
    let contents = write_tree(&root);
    let torrent = t.path.join("tree.torrent");
    create(&t.path, &root, &torrent, &["--piece-length", "16384"]);

    let v = info_json(&t.path, &torrent);
    assert_eq!(v["name"], Value::from("tree"), "{v}");
    assert_eq!(as_u64(&v, "total_size"), tree_total(), "{v}");
    assert_eq!(as_u64(&v, "pieces"), tree_total().div_ceil(16384), "{v}");
    let files = json_files(&v, "tree");
    let listed: BTreeMap<String, u64> = files.iter().cloned().collect();
    let want: BTreeMap<String, u64> = TREE
        .iter()
        .map(|(p, n)| (p.to_string(), *n as u64))
        .collect();
    assert_eq!(listed, want, "files listed by info --json");
    assert_eq!(files.len(), TREE.len(), "a file is listed twice: {files:?}");

    verify(&t.path, &torrent, Some(&data)).assert_success();
    verify(&data, &torrent, None).assert_success();

    // Corrupt one byte in the middle of sub/deeper/z.bin; find its piece from the torrent order.
    let start_of = |rel: &str| -> u64 {
        files
            .iter()
            .take_while(|(p, _)| p != rel)
            .map(|(_, n)| n)
            .sum()
    };
    for (rel, within) in [("sub/deeper/z.bin", 40_000u64), ("sub/deeper/c.txt", 100)] {
        let path = root.join(rel);
        flip_byte(&path, within);
        let piece = (start_of(rel) + within) / 16384;
        assert_verify_names_bad_piece(&verify(&t.path, &torrent, Some(&data)), piece);
        flip_byte(&path, within);
        verify(&t.path, &torrent, Some(&data)).assert_success();
    }

    // Truncate a file.
    let z = root.join("sub/deeper/z.bin");
    set_len(&z, 70_000);
    verify(&t.path, &torrent, Some(&data)).assert_code(1);
    std::fs::write(&z, &contents["sub/deeper/z.bin"]).unwrap();
    verify(&t.path, &torrent, Some(&data)).assert_success();

    // Remove a file.
    std::fs::remove_file(root.join("sub/b.bin")).unwrap();
    verify(&t.path, &torrent, Some(&data)).assert_code(1);
}

// ---------------------------------------------------------------------------------------------
// `info --json` fields
// ---------------------------------------------------------------------------------------------

#[test]
fn info_json_fields_for_a_multi_file_torrent() {
    let (t, root) = tmp_with_tree(tmp());

    let private = t.path.join("private.torrent");
    let mut args = vec![
        os("create"),
        root.clone().into(),
        os("-a"),
        os(DEAD_TRACKER),
        os("-a"),
        os(TRACKER2),
        os("--piece-length"),
        os("32768"),
        os("--private"),
        os("--comment"),
        os("hello \"world\""),
        os("-o"),
        private.clone().into(),
    ];
    run_in(&t.path, &args).assert_success();
    let v = info_json(&t.path, &private);
    assert_eq!(v["name"], Value::from("tree"), "{v}");
    let hash = v["info_hash"].as_str().expect("info_hash is a string");
    assert!(
        hash.len() == 40
            && hash
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "info_hash is not 40 lowercase hex digits: {hash:?}"
    );
    assert_eq!(as_u64(&v, "total_size"), tree_total(), "{v}");
    assert_eq!(as_u64(&v, "piece_length"), 32768, "{v}");
    assert_eq!(as_u64(&v, "pieces"), tree_total().div_ceil(32768), "{v}");
    assert_eq!(v["private"], Value::Bool(true), "{v}");
    assert_eq!(
        v["trackers"],
        serde_json::json!([[DEAD_TRACKER], [TRACKER2]]),
        "each -a is its own tier"
    );
    assert_eq!(v["comment"], Value::from("hello \"world\""), "{v}");
    assert!(
        v["created_by"].is_string() || v["created_by"].is_null(),
        "created_by: {v}"
    );
    assert!(
        v["creation_date"].is_i64() || v["creation_date"].is_null(),
        "creation_date: {v}"
    );
    let listed: BTreeMap<String, u64> = json_files(&v, "tree").into_iter().collect();
    let want: BTreeMap<String, u64> = TREE
        .iter()
        .map(|(p, n)| (p.to_string(), *n as u64))
        .collect();
    assert_eq!(listed, want);
    for key in [
        "name",
        "info_hash",
        "total_size",
        "piece_length",
        "pieces",
        "private",
        "files",
        "trackers",
        "comment",
        "created_by",
        "creation_date",
    ] {
        assert!(v.get(key).is_some(), "info --json lacks `{key}`: {v}");
    }
    // Agrees with an independent reader.
    assert_eq!(hash, transmission_hash(&t.path, &private));

    // Without --private and --comment: a public torrent with a null comment, and (the private
    // flag being inside the info dict) a different info hash.
    let public = t.path.join("public.torrent");
    args.retain(|a| a != "--private");
    let c = args.iter().position(|a| a == "--comment").unwrap();
    args.drain(c..c + 2);
    let o = args.iter().position(|a| a == "-o").unwrap();
    args[o + 1] = public.clone().into();
    run_in(&t.path, &args).assert_success();
    let p = info_json(&t.path, &public);
    assert_eq!(p["private"], Value::Bool(false), "{p}");
    assert_eq!(p["comment"], Value::Null, "{p}");
    assert_ne!(
        p["info_hash"], v["info_hash"],
        "the private flag must change the info hash"
    );
}

#[test]
fn create_writes_name_torrent_in_cwd_by_default() {
    let (t, file) = tmp_with_data_file("thing.iso", 20000, 3);
    let cwd = t.path.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let run = run_in(
        &cwd,
        [
            os("create"),
            file.clone().into(),
            os("-a"),
            os(DEAD_TRACKER),
        ],
    );
    run.assert_success();
    let out = cwd.join("thing.iso.torrent");
    assert!(out.is_file(), "no NAME.torrent in cwd: {}", run.dump());
    verify(&t.path, &out, Some(&file)).assert_success();
}

// ---------------------------------------------------------------------------------------------
// Piece-length validation
// ---------------------------------------------------------------------------------------------

#[test]
fn create_rejects_bad_piece_lengths() {
    let t = tmp();
    let file = t.path.join("f.bin");
    write_file(&file, &pseudo_random(100_000, 9));
    for bad in ["0", "1000", "8192", "16383", "16385", "24576", "65535"] {
        let out = t.path.join(format!("out-{bad}.torrent"));
        let run = run_in(
            &t.path,
            [
                os("create"),
                file.clone().into(),
                os("-a"),
                os(DEAD_TRACKER),
                os("--piece-length"),
                os(bad),
                os("-o"),
                out.clone().into(),
            ],
        );
        run.assert_code(2);
        let line = run
            .error_line()
            .unwrap_or_else(|| panic!("no `bitfetch: error:` line: {}", run.dump()));
        let lower = line.to_lowercase();
        assert!(
            lower.contains("piece")
                && (lower.contains("power of two")
                    || lower.contains("16384")
                    || lower.contains("16 kib")
                    || lower.contains("16kib")),
            "--piece-length {bad}: error should say a piece length must be a power of two \
             of at least 16 KiB: {line:?}"
        );
        assert!(
            !out.exists(),
            "--piece-length {bad}: a torrent was written anyway"
        );
    }
    // The boundary itself is fine.
    create(
        &t.path,
        &file,
        &t.path.join("ok.torrent"),
        &["--piece-length", "16384"],
    );
}

// ---------------------------------------------------------------------------------------------
// Interoperability: torrents made by other tools
// ---------------------------------------------------------------------------------------------

/// Checks a foreign torrent: same info hash as transmission-show, sizes right, verify passes,
/// and verify notices corruption.
fn check_foreign_torrent(cwd: &Path, torrent: &Path, data_path: &Path, corrupt: &Path, total: u64) {
    let want = transmission_hash(cwd, torrent);
    let v = info_json(cwd, torrent);
    assert_eq!(
        v["info_hash"],
        Value::from(want.as_str()),
        "bitfetch and transmission-show disagree on the info hash of {}",
        torrent.display()
    );
    assert_eq!(as_u64(&v, "total_size"), total, "{v}");
    assert_eq!(v["trackers"], serde_json::json!([[DEAD_TRACKER]]), "{v}");
    verify(cwd, torrent, Some(data_path)).assert_success();
    flip_byte(corrupt, 5);
    verify(cwd, torrent, Some(data_path)).assert_code(1);
    flip_byte(corrupt, 5);
    verify(cwd, torrent, Some(data_path)).assert_success();
}

/// What a foreign maker is given: one file (name, size, seed) or the tree.
enum Source {
    File(&'static str, usize, u64),
    Tree,
}

/// A fresh directory holding `source`, in which `maker` (the first of `tools`, all required)
/// has made `torrent` with `args`: (the directory, the torrent's path).
fn made_by(tools: &[&str], source: Source, args: &[&str], torrent: &str) -> (Tmp, PathBuf) {
    for name in tools {
        require_tool(name);
    }
    let t = tmp();
    match source {
        Source::File(name, size, seed) => {
            write_file(&t.path.join(name), &pseudo_random(size, seed))
        }
        Source::Tree => {
            write_tree(&t.path.join("tree"));
        }
    }
    tool(tools[0], &t.path, args).assert_success();
    let torrent = t.path.join(torrent);
    (t, torrent)
}

/// A single-file torrent made by a foreign tool: checked with the directory and with the
/// file itself as the data path.
fn foreign_single_file(
    tools: &[&str],
    (name, size, seed): (&'static str, usize, u64),
    args: &[&str],
    torrent: &str,
) {
    let (t, torrent) = made_by(tools, Source::File(name, size, seed), args, torrent);
    let file = t.path.join(name);
    check_foreign_torrent(&t.path, &torrent, &t.path, &file, size as u64);
    check_foreign_torrent(&t.path, &torrent, &file, &file, size as u64);
}

#[test]
fn interop_mktorrent_single_file() {
    foreign_single_file(
        &["mktorrent"],
        ("m.bin", 200_001, 11),
        &["-a", DEAD_TRACKER, "-l", "15", "-o", "m.torrent", "m.bin"],
        "m.torrent",
    );
}

#[test]
fn interop_mktorrent_directory() {
    let (t, torrent) = made_by(
        &["mktorrent"],
        Source::Tree,
        &["-a", DEAD_TRACKER, "-l", "15", "-o", "m.torrent", "tree"],
        "m.torrent",
    );
    check_foreign_torrent(
        &t.path,
        &torrent,
        &t.path,
        &t.path.join("tree/sub/deeper/z.bin"),
        tree_total(),
    );
    let v = info_json(&t.path, &torrent);
    let listed: BTreeMap<String, u64> = json_files(&v, "tree").into_iter().collect();
    let want: BTreeMap<String, u64> = TREE
        .iter()
        .map(|(p, n)| (p.to_string(), *n as u64))
        .collect();
    assert_eq!(
        listed, want,
        "mktorrent keeps empty files; so must the listing"
    );
}

const TRANSMISSION_CREATE: &[&str] = &["transmission-create", "transmission-show"];

#[test]
fn interop_transmission_create_single_file() {
    foreign_single_file(
        TRANSMISSION_CREATE,
        ("t.bin", 100_000, 12),
        &["-o", "t.torrent", "-t", DEAD_TRACKER, "-s", "32", "t.bin"],
        "t.torrent",
    );
}

#[test]
fn interop_transmission_create_directory() {
    let (t, torrent) = made_by(
        TRANSMISSION_CREATE,
        Source::Tree,
        &["-o", "t.torrent", "-t", DEAD_TRACKER, "-s", "16", "tree"],
        "t.torrent",
    );
    // transmission-create leaves zero-length files out; the total is the same.
    check_foreign_torrent(
        &t.path,
        &torrent,
        &t.path,
        &t.path.join("tree/a.bin"),
        tree_total(),
    );
}

// ---------------------------------------------------------------------------------------------
// Interoperability: torrents bitfetch makes, read by other tools
// ---------------------------------------------------------------------------------------------

/// A fresh directory, once the tools of [`check_others_accept`] are known to be there.
fn tmp_for_others() -> Tmp {
    require_tool("transmission-show");
    require_tool("aria2c");
    tmp()
}

fn check_others_accept(cwd: &Path, torrent: &Path, expect_paths: &[String], private: bool) {
    let ours = info_json(cwd, torrent)["info_hash"]
        .as_str()
        .unwrap()
        .to_string();

    let show = tool("transmission-show", cwd, [torrent]);
    show.assert_success();
    assert_eq!(
        transmission_hash(cwd, torrent),
        ours,
        "transmission-show's hash"
    );
    for p in expect_paths {
        assert!(
            show.stdout.contains(p.as_str()),
            "transmission-show does not list {p}: {}",
            show.dump()
        );
    }
    if private {
        assert!(show.stdout.contains("Private torrent"), "{}", show.dump());
    }

    // aria2c -S exits 0 even on garbage, so also look for the hash it computed.
    let aria = tool("aria2c", cwd, [OsString::from("-S"), torrent.into()]);
    aria.assert_success();
    let aria_hash = aria
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Info Hash: "))
        .unwrap_or_else(|| panic!("aria2c printed no info hash: {}", aria.dump()))
        .trim()
        .to_lowercase();
    assert_eq!(aria_hash, ours, "aria2c's hash");
    for p in expect_paths {
        assert!(
            aria.stdout.contains(p.as_str()),
            "aria2c does not list {p}: {}",
            aria.dump()
        );
    }
}

#[test]
fn others_accept_bitfetch_single_file_torrent() {
    let t = tmp_for_others();
    let file = t.path.join("single.bin");
    write_file(&file, &pseudo_random(1_000_001, 21));
    let torrent = t.path.join("s.torrent");
    create(&t.path, &file, &torrent, &[]);
    check_others_accept(&t.path, &torrent, &["single.bin".to_string()], false);
}

#[test]
fn others_accept_bitfetch_directory_torrent() {
    let (t, root) = tmp_with_tree(tmp_for_others());
    let torrent = t.path.join("d.torrent");
    create(
        &t.path,
        &root,
        &torrent,
        &[
            "--piece-length",
            "16384",
            "--private",
            "--comment",
            "made by a test",
        ],
    );
    let paths: Vec<String> = TREE
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, _)| format!("tree/{p}"))
        .collect();
    check_others_accept(&t.path, &torrent, &paths, true);
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Runs bitfetch with `args` to completion and returns (exit code, peak RSS in KiB) as the
/// kernel accounts it for the child (file-backed mapped pages included).
fn run_measuring_rss(cwd: &Path, args: &[&OsString]) -> (i32, i64) {
    let mut child = std::process::Command::new(bitfetch())
        .args(args)
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn bitfetch");
    let pid = child.id() as libc::pid_t;
    // Hang guard: a watchdog kills the child by PID if it outlives the deadline.
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            // SAFETY: kill with signal 0 only probes whether the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
            std::thread::park_timeout(std::time::Duration::from_millis(100));
        }
        // SAFETY: plain kill(2) of our own child's PID.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten by wait4.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers; it reaps the child, so the
    // `Child` handle is not waited on again (dropping it does not wait).
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    watchdog.join().unwrap();
    let _ = child.try_wait();
    assert!(
        libc::WIFEXITED(status),
        "bitfetch died of a signal: {status:#x}"
    );
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

/// Verifying hashes every piece straight from the map; those pages must not stay in our
/// process, or a seeder of a large torrent would hold the whole file resident.
#[test]
fn verify_of_128_mib_keeps_resident_memory_small() {
    let t = tmp();
    let data = t.path.join("big.bin");
    let mut f = std::fs::File::create(&data).unwrap();
    for i in 0..128u64 {
        std::io::Write::write_all(&mut f, &pseudo_random(1 << 20, i)).unwrap();
    }
    drop(f);
    let torrent = t.path.join("big.torrent");
    create(&t.path, &data, &torrent, &["--piece-length", "262144"]);
    let (code, peak_kib) = run_measuring_rss(
        &t.path,
        &[&os("verify"), &torrent.clone().into(), &data.clone().into()],
    );
    assert_eq!(code, 0, "verify of intact data");
    assert!(
        peak_kib < 48 * 1024,
        "verify of 128 MiB peaked at {peak_kib} KiB resident; verified pages are kept mapped"
    );
}
