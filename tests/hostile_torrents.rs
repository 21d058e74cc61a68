//! Hostile and broken .torrent files, built in memory and fed to the real binary.
//!
//! Every case runs through `bitfetch info` and `bitfetch download` (with an output directory
//! that sits beside a sentinel file). Both must refuse the torrent with exit code 3 and a
//! `bitfetch: error:` line that says what is wrong, must not panic or die by a signal, and the
//! download must not create anything anywhere.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use sha1::{Digest, Sha1};
use support::bencode::*;
use support::cli::*;
use support::files::*;
use support::torrent::DEAD_TRACKER;
use support::*;

const NAME: &str = "file.bin";
const PIECE_LEN: i64 = 16384;
const LEN: i64 = 40000;
/// A refused torrent ends `download` at once; a client that wrongly accepts one waits for
/// peers that never come, and is killed after this long (the hang guard) so that what it
/// left on disk can still be checked.
const DOWNLOAD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Building torrents
// ---------------------------------------------------------------------------------------------

fn piece_hashes(count: usize) -> B {
    bytes(pseudo_random(count * 20, 7))
}

/// The info dict of the valid single-file base torrent, as an editable map.
fn base_info() -> BTreeMap<String, B> {
    let mut m = BTreeMap::new();
    m.insert("length".to_string(), int(LEN));
    m.insert("name".to_string(), bytes(NAME));
    m.insert("piece length".to_string(), int(PIECE_LEN));
    m.insert("pieces".to_string(), piece_hashes(3));
    m
}

fn torrent_with_info(info: B) -> Vec<u8> {
    dict([("announce", bytes(DEAD_TRACKER)), ("info", info)]).encode()
}

/// The valid base torrent with `edit` applied to its info dict.
fn single(edit: impl FnOnce(&mut BTreeMap<String, B>)) -> Vec<u8> {
    let mut info = base_info();
    edit(&mut info);
    torrent_with_info(dict(info))
}

fn base_torrent() -> Vec<u8> {
    single(|_| {})
}

/// The base torrent with `key` of its info dict set to `value`.
fn with(key: &str, value: B) -> Vec<u8> {
    single(|m| {
        m.insert(key.into(), value);
    })
}

/// The base torrent without `key` in its info dict.
fn without(key: &str) -> Vec<u8> {
    single(|m| {
        m.remove(key);
    })
}

fn file(len: i64, path: &[&str]) -> B {
    dict([("length", int(len)), ("path", path_list(path))])
}

/// A multi-file torrent named `name` carrying `piece_count` hashes.
fn multi_named(name: &str, files: Vec<B>, piece_count: usize) -> Vec<u8> {
    torrent_with_info(dict([
        ("files", B::List(files)),
        ("name", bytes(name)),
        ("piece length", int(PIECE_LEN)),
        ("pieces", piece_hashes(piece_count)),
    ]))
}

/// A multi-file torrent named "dir" whose piece count matches `total` bytes.
fn multi(files: Vec<B>, total: u64) -> Vec<u8> {
    let count = total.div_ceil(PIECE_LEN as u64) as usize;
    multi_named("dir", files, count)
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

/// Layout, all in one temp dir:
///   ROOT/torrent/t.torrent   the case
///   ROOT/cwd/                the child's working directory (must stay empty)
///   ROOT/sandbox/out/        the download directory
///   ROOT/sandbox/sentinel    must stay as it is
struct Harness {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    torrent: PathBuf,
    cwd: PathBuf,
    sandbox: PathBuf,
    out: PathBuf,
    sentinel: PathBuf,
}

impl Harness {
    fn new() -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let h = Harness {
            torrent: root.join("torrent").join("t.torrent"),
            cwd: root.join("cwd"),
            sandbox: root.join("sandbox"),
            out: root.join("sandbox").join("out"),
            sentinel: root.join("sandbox").join("sentinel"),
            root,
            _tmp: tmp,
        };
        std::fs::create_dir_all(h.torrent.parent().unwrap()).unwrap();
        std::fs::create_dir_all(&h.cwd).unwrap();
        std::fs::create_dir_all(&h.out).unwrap();
        std::fs::write(&h.sentinel, SENTINEL).unwrap();
        h
    }

    fn set_torrent(&self, bytes: &[u8]) {
        std::fs::write(&self.torrent, bytes).unwrap();
    }

    fn info(&self) -> Run {
        run_in(
            &self.cwd,
            [OsString::from("info"), self.torrent.clone().into()],
        )
    }

    fn info_json(&self) -> Run {
        run_in(
            &self.cwd,
            [
                OsString::from("info"),
                self.torrent.clone().into(),
                "--json".into(),
            ],
        )
    }

    fn download_args(&self) -> [OsString; 8] {
        [
            OsString::from("download"),
            self.torrent.clone().into(),
            "-o".into(),
            self.out.clone().into(),
            "--peer".into(),
            "127.0.0.1:9".into(),
            "--port".into(),
            "0".into(),
        ]
    }

    fn download_cmd(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(bitfetch());
        cmd.args(self.download_args())
            .current_dir(&self.cwd)
            .env("XDG_CACHE_HOME", support::cli::fresh_cache_home());
        cmd
    }

    /// Nothing was created, removed or changed outside OUT. `out_allowed_root` names the only
    /// top-level entry allowed inside OUT (None: OUT must stay empty).
    fn containment_problems(&self, torrent: &[u8], out_allowed_root: Option<&str>) -> Vec<String> {
        let mut p = Vec::new();
        let names = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let root = names(&self.root);
        if root != ["cwd", "sandbox", "torrent"] {
            p.push(format!("temp root now holds {root:?}"));
        }
        let sandbox = names(&self.sandbox);
        if sandbox != ["out", "sentinel"] {
            p.push(format!(
                "the directory holding OUT and the sentinel now holds {sandbox:?}"
            ));
        }
        match std::fs::symlink_metadata(&self.sentinel) {
            Ok(m) if m.file_type().is_file() => {
                if std::fs::read(&self.sentinel).ok().as_deref() != Some(SENTINEL) {
                    p.push("the sentinel file beside OUT was modified".into());
                }
            }
            Ok(_) => p.push("the sentinel is no longer a regular file".into()),
            Err(e) => p.push(format!("the sentinel is gone: {e}")),
        }
        if !self.out.is_dir() {
            p.push("OUT is no longer a directory".into());
        }
        let cwd = walk(&self.cwd);
        if !cwd.is_empty() {
            p.push(format!("files appeared in the working directory: {cwd:?}"));
        }
        if names(self.torrent.parent().unwrap()) != ["t.torrent"]
            || std::fs::read(&self.torrent).ok().as_deref() != Some(torrent)
        {
            p.push("the torrent's directory or the torrent file changed".into());
        }
        let inside = walk(&self.out);
        match out_allowed_root {
            None if !inside.is_empty() => {
                p.push(format!("a refused torrent left files in OUT: {inside:?}"))
            }
            None => {}
            Some(name) => {
                for e in &inside {
                    let first = e.components().next().map(|c| c.as_os_str().to_os_string());
                    if first.as_deref() != Some(std::ffi::OsStr::new(name)) {
                        p.push(format!("{} is in OUT but outside OUT/{name}", e.display()));
                    }
                }
            }
        }
        p
    }
}

/// Problems with a run that should have refused the torrent.
fn rejection_problems(run: &Run, h: &Harness, keywords: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(c) = run.crash_problem() {
        p.push(c);
    }
    if run.code() != Some(3) {
        p.push(format!("exit code {:?}, want 3 (bad torrent)", run.code()));
    }
    match run.error_line() {
        None => p.push("no stderr line starting `bitfetch: error:`".into()),
        Some(line) => {
            // The line may echo the torrent's path; keywords must match the rest.
            let text = line
                .replace(h.torrent.to_str().unwrap(), "<TORRENT>")
                .replace(h.root.to_str().unwrap(), "<TMP>")
                .to_lowercase();
            if !keywords.iter().any(|k| text.contains(&k.to_lowercase())) {
                p.push(format!("error line {line:?} mentions none of {keywords:?}"));
            }
        }
    }
    p
}

thread_local! {
    /// Failures of the cases run so far by this test; `None` outside a [`Cases`] scope.
    static FAILURES: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

/// Collects the failures of every case a test runs, so one broken case does not hide the
/// others, and fails the test with all of them when dropped.
struct Cases;

impl Cases {
    fn begin() -> Cases {
        FAILURES.with(|f| *f.borrow_mut() = Some(Vec::new()));
        Cases
    }
}

impl Drop for Cases {
    fn drop(&mut self) {
        let failures = FAILURES.with(|f| f.borrow_mut().take()).unwrap_or_default();
        if !failures.is_empty() && !std::thread::panicking() {
            panic!(
                "{} case(s) failed:\n\n{}",
                failures.len(),
                failures.join("\n\n----\n\n")
            );
        }
    }
}

fn fail_if_any(case: &str, problems: Vec<String>) {
    if problems.is_empty() {
        return;
    }
    let msg = format!("case `{case}`:\n{}", problems.join("\n\n"));
    let pending = FAILURES.with(|f| match f.borrow_mut().as_mut() {
        Some(list) => {
            list.push(msg);
            None
        }
        None => Some(msg),
    });
    if let Some(msg) = pending {
        panic!("{msg}");
    }
}

fn describe(what: &str, run: &Run, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|p| format!("[{what}] {p}\n  {}", run.dump()))
        .collect()
}

/// `info` and `download` must both refuse the torrent (exit 3, an error line with one of
/// `keywords`), without crashing, and the download must leave no trace.
fn reject(case: &str, torrent: &[u8], keywords: &[&str]) {
    reject_built(case, keywords, |_| torrent.to_vec());
}

/// As [`reject`], for a torrent that needs to know the sandbox's path.
fn reject_built(case: &str, keywords: &[&str], build: impl Fn(&Harness) -> Vec<u8>) {
    let h = Harness::new();
    let torrent = build(&h);
    h.set_torrent(&torrent);
    let mut problems = Vec::new();

    let info = h.info();
    problems.extend(describe(
        "info",
        &info,
        rejection_problems(&info, &h, keywords),
    ));

    let dl = match run_with_deadline(
        h.download_cmd(),
        "bitfetch download".into(),
        DOWNLOAD_DEADLINE,
    ) {
        Ok(run) => {
            problems.extend(describe(
                "download",
                &run,
                rejection_problems(&run, &h, keywords),
            ));
            run
        }
        Err(killed) => {
            problems.push(format!(
                "[download] did not refuse the torrent: still running after {DOWNLOAD_DEADLINE:?}, killed\n  {}",
                killed.dump()
            ));
            *killed
        }
    };
    problems.extend(
        h.containment_problems(&torrent, None)
            .into_iter()
            .map(|p| format!("[download] {p}\n  {}", dl.dump())),
    );
    fail_if_any(case, problems);
}

/// `info` alone must refuse the torrent. For paths that must never reach a download on a test
/// machine (such as `/etc/passwd`); a sandboxed variant covers `download`.
fn reject_info_only(case: &str, torrent: &[u8], keywords: &[&str]) {
    let h = Harness::new();
    h.set_torrent(torrent);
    let info = h.info();
    let mut problems = describe("info", &info, rejection_problems(&info, &h, keywords));
    problems.extend(h.containment_problems(torrent, None));
    fail_if_any(case, problems);
}

/// For path elements that carry separators (`a/../../b`, `..\..\evil`): refusing them (exit 3)
/// is right, and so is neutralising them, provided nothing lands outside OUT/NAME.
fn reject_or_neutralise(case: &str, torrent: &[u8], keywords: &[&str]) {
    let h = Harness::new();
    h.set_torrent(torrent);
    let mut problems = Vec::new();
    let info = h.info_json();
    if let Some(c) = info.crash_problem() {
        problems.push(format!("[info] {c}\n  {}", info.dump()));
    }
    let accepted_name = if info.code() == Some(0) {
        // Neutralised: every listed path must be a plain relative path.
        match serde_json::from_str::<serde_json::Value>(info.stdout.trim()) {
            Ok(v) => {
                for f in v["files"].as_array().into_iter().flatten() {
                    let path = f["path"].as_str().unwrap_or("");
                    let bad = path.starts_with('/')
                        || path
                            .split(['/', '\\'])
                            .any(|c| c == ".." || c == "." || c.is_empty());
                    if bad {
                        problems.push(format!("[info] accepted an unsafe path {path:?}"));
                    }
                }
                v["name"].as_str().map(str::to_string)
            }
            Err(e) => {
                problems.push(format!(
                    "[info] --json output is not JSON: {e}\n  {}",
                    info.dump()
                ));
                None
            }
        }
    } else {
        problems.extend(describe(
            "info",
            &info,
            rejection_problems(&info, &h, keywords),
        ));
        None
    };

    // An accepted torrent has no peer to come from; the client may wait for one, so a run cut
    // short by the deadline is fine here. What matters is what it left on disk.
    let (dl, cut_short) = match run_with_deadline(
        h.download_cmd(),
        "bitfetch download".into(),
        DOWNLOAD_DEADLINE,
    ) {
        Ok(run) => (run, false),
        Err(killed) if accepted_name.is_some() => (*killed, true),
        Err(killed) => {
            problems.push(format!(
                "[download] did not refuse the torrent: still running after {DOWNLOAD_DEADLINE:?}, killed\n  {}",
                killed.dump()
            ));
            (*killed, true)
        }
    };
    match &accepted_name {
        None => {
            problems.extend(describe(
                "download",
                &dl,
                rejection_problems(&dl, &h, keywords),
            ));
            problems.extend(
                h.containment_problems(torrent, None)
                    .into_iter()
                    .map(|p| format!("[download] {p}\n  {}", dl.dump())),
            );
        }
        Some(name) => {
            if let Some(c) = dl.crash_problem().filter(|_| !cut_short) {
                problems.push(format!("[download] {c}\n  {}", dl.dump()));
            }
            if dl.stderr.contains("panicked") {
                problems.push(format!("[download] panicked\n  {}", dl.dump()));
            }
            if dl.code() == Some(0) {
                problems.push(format!(
                    "[download] exit 0 without any peer to download from\n  {}",
                    dl.dump()
                ));
            }
            problems.extend(
                h.containment_problems(torrent, Some(name))
                    .into_iter()
                    .map(|p| format!("[download] {p}\n  {}", dl.dump())),
            );
        }
    }
    fail_if_any(case, problems);
}

// Keyword sets: loose, but each says what kind of problem was found.
const KW_BENCODE: &[&str] = &[
    "bencode",
    "not a valid torrent",
    "malformed",
    "invalid",
    "parse",
];
const KW_TRUNCATED: &[&str] = &[
    "end of",
    "past the end",
    "truncat",
    "eof",
    "incomplete",
    "too short",
];
const KW_PIECE_LEN: &[&str] = &["piece length", "piece_length", "piece-length", "piece size"];
const KW_PIECES: &[&str] = &["pieces", "piece hash", "hashes", "piece count"];
const KW_SIZE: &[&str] = &[
    "overflow",
    "too large",
    "too big",
    "size",
    "length",
    "total",
    "exceed",
    "pieces",
];
const KW_TRAVERSAL: &[&str] = &[
    "travers", "climb", "..", "outside", "escape", "unsafe", "parent",
];
const KW_ABSOLUTE: &[&str] = &["absolute", "unsafe", "drive", "root"];

// ---------------------------------------------------------------------------------------------
// Positive controls
// ---------------------------------------------------------------------------------------------

#[test]
fn control_valid_single_file_torrent_is_accepted() {
    let t = base_torrent();
    let m = bitfetch::Metainfo::from_bytes(&t).expect("the base torrent is valid");
    let h = Harness::new();
    h.set_torrent(&t);
    h.info().assert_success();
    let want = hex(&m.info_hash);
    let json = h.info_json();
    json.assert_success();
    assert!(json.stdout.contains(&want), "{}", json.dump());
}

#[test]
fn control_valid_multi_file_torrent_is_accepted() {
    let t = multi(
        vec![
            file(1000, &["a"]),
            file(0, &["sub", "b"]),
            file(30000, &["sub", "c"]),
        ],
        31000,
    );
    let h = Harness::new();
    h.set_torrent(&t);
    h.info().assert_success();
}

// ---------------------------------------------------------------------------------------------
// Not a torrent at all
// ---------------------------------------------------------------------------------------------

#[test]
fn not_bencode() {
    let _cases = Cases::begin();
    reject(
        "not bencode",
        b"This is not a torrent, just some text.\n",
        KW_BENCODE,
    );
}

#[test]
fn empty_file() {
    let _cases = Cases::begin();
    reject(
        "empty file",
        b"",
        &["empty", "bencode", "end of", "eof", "truncat"],
    );
}

#[test]
fn truncated_file() {
    let _cases = Cases::begin();
    let t = base_torrent();
    reject("truncated file", &t[..t.len() / 2], KW_TRUNCATED);
    reject("truncated by one byte", &t[..t.len() - 1], KW_TRUNCATED);
}

#[test]
fn trailing_garbage() {
    let _cases = Cases::begin();
    let mut t = base_torrent();
    t.extend_from_slice(b"garbage");
    reject(
        "trailing garbage",
        &t,
        &["trailing", "garbage", "extra", "after"],
    );
}

#[test]
fn top_level_not_a_dict() {
    let _cases = Cases::begin();
    let kw = &["dictionary", "dict", "top level", "top-level"];
    let info = dict(base_info()).encode();
    let mut as_list = b"l".to_vec();
    as_list.extend_from_slice(&info);
    as_list.push(b'e');
    reject("top level is a list", &as_list, kw);
    reject("top level is an integer", b"i42e", kw);
    reject("top level is a string", b"4:info", kw);
}

#[test]
fn no_info() {
    let _cases = Cases::begin();
    let t = dict([("announce", bytes(DEAD_TRACKER))]).encode();
    reject("no info", &t, &["info"]);
}

#[test]
fn info_not_a_dict() {
    let _cases = Cases::begin();
    reject("info is an integer", &torrent_with_info(int(1)), &["info"]);
    reject(
        "info is a list",
        &torrent_with_info(list([bytes("name")])),
        &["info"],
    );
    reject(
        "info is a string",
        &torrent_with_info(bytes("d4:name1:ae")),
        &["info"],
    );
}

// ---------------------------------------------------------------------------------------------
// Resource bombs at the bencode level
// ---------------------------------------------------------------------------------------------

const BOMB_DEPTH: usize = 100_000;

fn nested_lists(closed: bool) -> Vec<u8> {
    let mut v = vec![b'l'; BOMB_DEPTH];
    if closed {
        v.extend(std::iter::repeat_n(b'e', BOMB_DEPTH));
    }
    v
}

fn nested_dicts() -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..BOMB_DEPTH {
        v.extend_from_slice(b"d1:a");
    }
    v.extend_from_slice(b"i0e");
    v.extend(std::iter::repeat_n(b'e', BOMB_DEPTH));
    v
}

/// The base torrent with a closed depth bomb under an unknown key of the info dict.
fn bomb_in_info() -> Vec<u8> {
    single(|m| {
        m.insert("x-bomb".into(), raw(nested_lists(true)));
    })
}

fn bomb_at_top() -> Vec<u8> {
    dict([
        ("announce", bytes(DEAD_TRACKER)),
        ("info", dict(base_info())),
        ("x-bomb", raw(nested_lists(true))),
    ])
    .encode()
}

const KW_DEPTH: &[&str] = &["nest", "deep", "depth"];

#[test]
fn depth_bomb_unterminated_lists() {
    let _cases = Cases::begin();
    reject("100 000 nested `l`", &nested_lists(false), KW_DEPTH);
}

#[test]
fn depth_bomb_terminated_lists() {
    let _cases = Cases::begin();
    reject(
        "100 000 nested lists, closed",
        &nested_lists(true),
        KW_DEPTH,
    );
}

#[test]
fn depth_bomb_nested_dicts() {
    let _cases = Cases::begin();
    reject("100 000 nested dicts", &nested_dicts(), KW_DEPTH);
}

#[test]
fn depth_bomb_inside_torrent() {
    let _cases = Cases::begin();
    reject("depth bomb inside info", &bomb_in_info(), KW_DEPTH);
    reject("depth bomb beside info", &bomb_at_top(), KW_DEPTH);
}

/// Runs in a child process (see the next test), so a stack overflow cannot take the whole
/// test binary down.
#[test]
#[ignore = "run by depth_bomb_library_has_no_stack_overflow in a child process"]
fn depth_bomb_library_child() {
    let docs = [
        ("unterminated lists", nested_lists(false)),
        ("terminated lists", nested_lists(true)),
        ("nested dicts", nested_dicts()),
        ("bomb inside info", bomb_in_info()),
        ("bomb beside info", bomb_at_top()),
    ];
    for (what, doc) in docs {
        let handle = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || bitfetch::Metainfo::from_bytes(&doc).is_err())
            .unwrap();
        let is_err = handle.join().expect("parser thread panicked");
        assert!(is_err, "{what}: Metainfo::from_bytes accepted a depth bomb");
    }
}

#[test]
fn depth_bomb_library_has_no_stack_overflow() {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "depth_bomb_library_child",
        "--ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]);
    let run = run_guarded(cmd, "depth-bomb child".into(), HANG_GUARD);
    use std::os::unix::process::ExitStatusExt;
    assert!(
        run.status.success(),
        "Metainfo::from_bytes on a 100 000-deep document in a 2 MiB-stack thread failed \
         (signal {:?}: a stack overflow aborts the process): {}",
        run.status.signal(),
        run.dump()
    );
    assert!(
        run.stdout.contains("1 passed"),
        "the child ran no test: {}",
        run.dump()
    );
}

#[test]
fn huge_declared_string_length() {
    let _cases = Cases::begin();
    // A top-level key's value claims 99 999 999 999 bytes; three are there.
    let mut t = b"d8:announce".to_vec();
    put_bytes(&mut t, DEAD_TRACKER.as_bytes());
    t.extend_from_slice(b"7:comment99999999999:abc");
    let kw: &[&str] = &[
        "string",
        "length",
        "end of",
        "past the end",
        "truncat",
        "exceed",
        "too large",
        "too long",
    ];
    reject("string declaring 99999999999 bytes", &t, kw);
    reject(
        "bare string declaring 99999999999 bytes",
        b"99999999999:abc",
        kw,
    );
    reject(
        "string length overflowing 64 bits",
        b"d99999999999999999999999999999:abce",
        &[kw, &["overflow"][..]].concat(),
    );
}

#[test]
fn integer_with_200_digits() {
    let _cases = Cases::begin();
    let digits = "9".repeat(200);
    let t = single(|m| {
        m.insert("length".into(), raw(format!("i{digits}e")));
    });
    reject(
        "200-digit length",
        &t,
        &[
            "integer",
            "number",
            "digit",
            "length",
            "malformed",
            "overflow",
            "too large",
            "range",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Piece geometry
// ---------------------------------------------------------------------------------------------

#[test]
fn piece_length_missing() {
    let _cases = Cases::begin();
    reject(
        "piece length missing",
        &without("piece length"),
        KW_PIECE_LEN,
    );
}

#[test]
fn piece_length_zero() {
    let _cases = Cases::begin();
    reject(
        "piece length 0",
        &with("piece length", int(0)),
        KW_PIECE_LEN,
    );
}

#[test]
fn piece_length_negative() {
    let _cases = Cases::begin();
    reject(
        "piece length -16384",
        &with("piece length", int(-16384)),
        KW_PIECE_LEN,
    );
}

#[test]
fn piece_length_absurd() {
    let _cases = Cases::begin();
    // 2^40: one piece would be a terabyte. The hashes still match the length.
    for (label, len) in [
        ("piece length 2^40", 1 << 40),
        ("piece length i64::MAX", i64::MAX),
    ] {
        let torrent = single(|m| {
            m.insert("piece length".into(), int(len));
            m.insert("pieces".into(), piece_hashes(1));
        });
        reject(label, &torrent, KW_PIECE_LEN);
    }
}

#[test]
fn piece_length_not_an_integer() {
    let _cases = Cases::begin();
    reject(
        "piece length is a string",
        &with("piece length", bytes("16384")),
        KW_PIECE_LEN,
    );
    reject(
        "piece length is a list",
        &with("piece length", list([int(16384)])),
        KW_PIECE_LEN,
    );
}

#[test]
fn pieces_not_a_multiple_of_20() {
    let _cases = Cases::begin();
    reject(
        "pieces is 59 bytes",
        &with("pieces", bytes(pseudo_random(59, 1))),
        KW_PIECES,
    );
    reject(
        "pieces is 61 bytes",
        &with("pieces", bytes(pseudo_random(61, 1))),
        KW_PIECES,
    );
}

#[test]
fn pieces_missing_or_not_a_string() {
    let _cases = Cases::begin();
    reject("pieces missing", &without("pieces"), KW_PIECES);
    reject("pieces is an integer", &with("pieces", int(60)), KW_PIECES);
}

#[test]
fn pieces_too_few_for_length() {
    let _cases = Cases::begin();
    reject(
        "2 hashes for 3 pieces",
        &with("pieces", piece_hashes(2)),
        KW_PIECES,
    );
    reject("no hashes at all", &with("pieces", bytes("")), KW_PIECES);
}

#[test]
fn pieces_too_many_for_length() {
    let _cases = Cases::begin();
    reject(
        "4 hashes for 3 pieces",
        &with("pieces", piece_hashes(4)),
        KW_PIECES,
    );
}

// ---------------------------------------------------------------------------------------------
// Lengths
// ---------------------------------------------------------------------------------------------

#[test]
fn length_negative() {
    let _cases = Cases::begin();
    let kw = &["negative", "length"];
    reject("single-file length -1", &with("length", int(-1)), kw);
    reject(
        "multi-file length -40000",
        &multi(vec![file(80000, &["a"]), file(-40000, &["b"])], 40000),
        kw,
    );
}

#[test]
fn length_not_an_integer() {
    let _cases = Cases::begin();
    reject(
        "length is a string",
        &with("length", bytes("40000")),
        &["length"],
    );
}

#[test]
fn lengths_overflow_when_summed() {
    let _cases = Cases::begin();
    let big = 1i64 << 62;
    reject(
        "two files of 2^62 bytes (sum overflows i64)",
        &multi_named("dir", vec![file(big, &["a"]), file(big, &["b"])], 3),
        KW_SIZE,
    );
    reject(
        "four files of 2^62 bytes (sum overflows u64)",
        &multi_named(
            "dir",
            vec![
                file(big, &["a"]),
                file(big, &["b"]),
                file(big, &["c"]),
                file(big, &["d"]),
            ],
            3,
        ),
        KW_SIZE,
    );
    reject(
        "three files of i64::MAX bytes",
        &multi_named(
            "dir",
            vec![
                file(i64::MAX, &["a"]),
                file(i64::MAX, &["b"]),
                file(i64::MAX, &["c"]),
            ],
            3,
        ),
        KW_SIZE,
    );
}

#[test]
fn length_absurd() {
    let _cases = Cases::begin();
    reject(
        "single file of 2^60 bytes",
        &with("length", int(1 << 60)),
        KW_SIZE,
    );
    reject(
        "single file of i64::MAX bytes",
        &with("length", int(i64::MAX)),
        KW_SIZE,
    );
}

#[test]
fn both_length_and_files() {
    let _cases = Cases::begin();
    let t = single(|m| {
        m.insert("files".into(), list([file(LEN, &["a"])]));
    });
    reject("both length and files", &t, &["both", "files", "length"]);
}

#[test]
fn neither_length_nor_files() {
    let _cases = Cases::begin();
    let t = single(|m| {
        m.remove("length");
    });
    reject("neither length nor files", &t, &["length", "files"]);
}

// ---------------------------------------------------------------------------------------------
// File lists and names
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_files_list() {
    let _cases = Cases::begin();
    reject(
        "files is an empty list",
        &multi_named("dir", vec![], 0),
        &["files", "empty", "no file"],
    );
}

#[test]
fn files_not_a_list_of_dicts() {
    let _cases = Cases::begin();
    reject(
        "files is a string",
        &torrent_with_info(dict([
            ("files", bytes("a")),
            ("name", bytes("dir")),
            ("piece length", int(PIECE_LEN)),
            ("pieces", piece_hashes(1)),
        ])),
        &["files"],
    );
    reject(
        "an entry of files is an integer",
        &multi_named("dir", vec![file(10, &["a"]), int(5)], 1),
        &["files", "file", "entry"],
    );
    reject(
        "a file without length",
        &multi_named("dir", vec![dict([("path", path_list(&["a"]))])], 1),
        &["length"],
    );
    reject(
        "a file without path",
        &multi_named("dir", vec![dict([("length", int(10))])], 1),
        &["path"],
    );
    reject(
        "a path element that is an integer",
        &multi_named(
            "dir",
            vec![dict([("length", int(10)), ("path", list([int(1)]))])],
            1,
        ),
        &["path"],
    );
}

#[test]
fn empty_path_list() {
    let _cases = Cases::begin();
    reject(
        "a file with path []",
        &multi(vec![file(10, &["a"]), file(10, &[])], 20),
        &["path", "empty"],
    );
}

#[test]
fn empty_path_element() {
    let _cases = Cases::begin();
    reject(
        "a path element that is empty",
        &multi(vec![file(10, &["a", "", "b"])], 10),
        &["path", "empty", "element"],
    );
    reject(
        "a path that is one empty element",
        &multi(vec![file(10, &[""])], 10),
        &["path", "empty", "element"],
    );
}

#[test]
fn empty_name() {
    let _cases = Cases::begin();
    reject(
        "empty name (single file)",
        &with("name", bytes("")),
        &["name"],
    );
    reject(
        "empty name (multi-file)",
        &multi_named("", vec![file(10, &["a"])], 1),
        &["name"],
    );
}

#[test]
fn name_missing() {
    let _cases = Cases::begin();
    reject("no name", &without("name"), &["name"]);
}

// ---------------------------------------------------------------------------------------------
// Path traversal
// ---------------------------------------------------------------------------------------------

#[test]
fn traversal_dotdot_element() {
    let _cases = Cases::begin();
    // dir/../evil would land in OUT itself, outside OUT/dir.
    reject(
        "path [.., evil]",
        &multi(vec![file(10, &["..", "evil"])], 10),
        KW_TRAVERSAL,
    );
    // dir/../../evil would land beside the sentinel.
    reject(
        "path [.., .., evil]",
        &multi(vec![file(10, &["..", "..", "evil"])], 10),
        KW_TRAVERSAL,
    );
    reject(
        "path [sub, .., .., .., evil]",
        &multi(vec![file(10, &["sub", "..", "..", "..", "evil"])], 10),
        KW_TRAVERSAL,
    );
    reject(
        "path element `.`",
        &multi(vec![file(10, &[".", "evil"])], 10),
        &[KW_TRAVERSAL, &["\".\"", "`.`", "'.'", "dot"][..]].concat(),
    );
}

#[test]
fn traversal_name_dotdot() {
    let _cases = Cases::begin();
    let kw = &[KW_TRAVERSAL, &["name"][..]].concat();
    reject("name .. (single file)", &with("name", bytes("..")), kw);
    // OUT/../evil is beside the sentinel.
    reject(
        "name .. (multi-file)",
        &multi_named("..", vec![file(10, &["evil"])], 1),
        kw,
    );
    reject(
        "name . (multi-file)",
        &multi_named(".", vec![file(10, &["evil"])], 1),
        &[kw.as_slice(), &["\".\"", "`.`", "'.'", "dot"][..]].concat(),
    );
}

#[test]
fn traversal_absolute_element() {
    let _cases = Cases::begin();
    let kw = KW_ABSOLUTE;
    // Never handed to `download`: a broken client would write to the real /etc/passwd.
    reject_info_only(
        "path element /etc/passwd",
        &multi(vec![file(10, &["/etc/passwd"])], 10),
        kw,
    );
    reject_info_only(
        "name /etc/passwd (single file)",
        &with("name", bytes("/etc/passwd")),
        &[kw, &["name"][..]].concat(),
    );
    // The same attack aimed inside the sandbox, so `download` can be run and checked.
    reject_built("absolute path element into the sandbox", kw, |h| {
        let target = h.sandbox.join("evil");
        multi(vec![file(10, &[target.to_str().unwrap()])], 10)
    });
    reject_built(
        "absolute name into the sandbox",
        &[kw, &["name"][..]].concat(),
        |h| {
            let target = h.sandbox.join("evil");
            single(|m| {
                m.insert("name".into(), bytes(target.to_str().unwrap()));
            })
        },
    );
    reject_built("absolute path split into elements", kw, |h| {
        // ["/", "tmp", ..., "sandbox", "evil"]: the first element alone is the root.
        let mut elements: Vec<String> = vec!["/".into()];
        elements.extend(
            h.sandbox
                .components()
                .skip(1)
                .map(|c| c.as_os_str().to_string_lossy().into_owned()),
        );
        elements.push("evil".into());
        let refs: Vec<&str> = elements.iter().map(String::as_str).collect();
        multi(vec![file(10, &refs)], 10)
    });
}

#[test]
fn traversal_windows_drive_element() {
    let _cases = Cases::begin();
    reject(
        r"path element C:\evil",
        &multi(vec![file(10, &[r"C:\evil"])], 10),
        KW_ABSOLUTE,
    );
    reject(
        r"path element C:evil",
        &multi(vec![file(10, &["C:evil"])], 10),
        KW_ABSOLUTE,
    );
    reject(
        r"name C:\evil",
        &with("name", bytes(r"C:\evil")),
        &[KW_ABSOLUTE, &["name"][..]].concat(),
    );
}

#[test]
fn traversal_inside_one_element() {
    let _cases = Cases::begin();
    // dir/a/../../b would be OUT/b.
    reject_or_neutralise(
        "path element a/../../b",
        &multi(vec![file(10, &["a/../../b"])], 10),
        KW_TRAVERSAL,
    );
    reject_or_neutralise(
        "path element ../../evil",
        &multi(vec![file(10, &["../../evil"])], 10),
        KW_TRAVERSAL,
    );
    reject_or_neutralise(
        "name ../evil",
        &multi_named("../evil", vec![file(10, &["x"])], 1),
        KW_TRAVERSAL,
    );
}

#[test]
fn traversal_backslash() {
    let _cases = Cases::begin();
    reject_or_neutralise(
        r"path element ..\..\evil",
        &multi(vec![file(10, &[r"..\..\evil"])], 10),
        KW_TRAVERSAL,
    );
    reject_or_neutralise(
        r"path element \evil",
        &multi(vec![file(10, &[r"\evil"])], 10),
        &[KW_TRAVERSAL, KW_ABSOLUTE].concat(),
    );
}

// ---------------------------------------------------------------------------------------------
// Clashing paths
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_paths() {
    let _cases = Cases::begin();
    let kw = &["duplicate", "twice", "same path", "more than once"];
    reject(
        "two files at a/b",
        &multi(
            vec![
                file(10, &["a", "b"]),
                file(20, &["c"]),
                file(10, &["a", "b"]),
            ],
            40,
        ),
        kw,
    );
    reject(
        "two files at x",
        &multi(vec![file(10, &["x"]), file(10, &["x"])], 20),
        kw,
    );
}

#[test]
fn file_versus_directory() {
    let _cases = Cases::begin();
    let kw = &[
        "both a file and a directory",
        "directory",
        "clash",
        "conflict",
        "collide",
    ];
    reject(
        "file a, then file a/b",
        &multi(vec![file(10, &["a"]), file(10, &["a", "b"])], 20),
        kw,
    );
    reject(
        "file a/b, then file a",
        &multi(vec![file(10, &["a", "b"]), file(10, &["a"])], 20),
        kw,
    );
    reject(
        "file a/b/c, then file a",
        &multi(vec![file(10, &["a", "b", "c"]), file(10, &["a"])], 20),
        kw,
    );
}

// ---------------------------------------------------------------------------------------------
// Size limits
// ---------------------------------------------------------------------------------------------

#[test]
fn over_deep_path() {
    let _cases = Cases::begin();
    let elements: Vec<String> = (0..300).map(|i| format!("d{i}")).collect();
    let refs: Vec<&str> = elements.iter().map(String::as_str).collect();
    reject(
        "a path 300 elements deep",
        &multi(vec![file(10, &refs)], 10),
        &["deep", "depth", "path", "long", "elements"],
    );
}

#[test]
fn too_many_files() {
    let _cases = Cases::begin();
    // 100 001 one-byte files. Written straight to bytes: it is 3 MB of bencode.
    const COUNT: usize = 100_001;
    let mut files = b"l".to_vec();
    for i in 0..COUNT {
        files.extend_from_slice(b"d6:lengthi1e4:pathl");
        put_bytes(&mut files, format!("f{i}").as_bytes());
        files.extend_from_slice(b"ee");
    }
    files.push(b'e');
    let t = torrent_with_info(dict([
        ("files", raw(files)),
        ("name", bytes("dir")),
        ("piece length", int(PIECE_LEN)),
        (
            "pieces",
            piece_hashes((COUNT as u64).div_ceil(PIECE_LEN as u64) as usize),
        ),
    ]));
    reject("100 001 files", &t, &["files"]);
}

// ---------------------------------------------------------------------------------------------
// The info hash
// ---------------------------------------------------------------------------------------------

#[test]
fn info_hash_is_sha1_of_the_raw_info_bytes() {
    // Keys out of order, an unknown key, a non-canonical integer: re-encoding this would change
    // the bytes, and so the hash.
    let info = dict_unsorted([
        ("name", bytes(NAME)),
        ("piece length", int(PIECE_LEN)),
        ("x-unknown", raw("i007e")),
        ("length", int(LEN)),
        ("pieces", piece_hashes(3)),
        ("a-late-key", list([bytes("x"), int(-3)])),
    ])
    .encode();
    let torrent = dict_unsorted([("info", raw(&info)), ("announce", bytes(DEAD_TRACKER))]).encode();
    let want: [u8; 20] = Sha1::digest(&info).into();

    let m = bitfetch::Metainfo::from_bytes(&torrent)
        .expect("an unsorted info dict with an unknown key is still a torrent");
    assert_eq!(
        hex(&m.info_hash),
        hex(&want),
        "info hash not over the raw info bytes"
    );

    let h = Harness::new();
    h.set_torrent(&torrent);
    let run = h.info_json();
    run.assert_success();
    let v: serde_json::Value =
        serde_json::from_str(run.stdout.trim()).expect("info --json is JSON");
    assert_eq!(
        v["info_hash"],
        serde_json::json!(hex(&want)),
        "{}",
        run.dump()
    );
}

#[test]
fn info_hash_with_canonical_info() {
    let info = dict(base_info()).encode();
    let want: [u8; 20] = Sha1::digest(&info).into();
    let m = bitfetch::Metainfo::from_bytes(&base_torrent()).unwrap();
    assert_eq!(m.info_hash, want);
}
