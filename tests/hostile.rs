//! The hostile-input suite of the reliability issue: what strangers can send bitfetch — peers,
//! trackers, and the metainfo cases `hostile_torrents.rs` does not already cover — each fed to
//! the real binary on loopback.
//!
//! Every case checks: a clear error (or, for a peer, that the hostile connection is dropped
//! and the download still completes from a good bitfetch seeder), no panic, no death by
//! signal, a bounded time (every wait has a deadline; they are hang guards, not speed
//! expectations), bounded memory where an attacker could make it grow (the bitfetch process's
//! own `VmHWM` from `/proc` stays under 100 MB), and an untouched sentinel file beside the
//! output directory.
//!
//! Independent cases of one kind run at once on threads of one test (`run_parallel`): they
//! spend their time waiting on sockets and processes, so the suite takes about as long as its
//! slowest case (watching a tracker's clamped re-announce interval), not the sum of them.
//!
//! Sections: metainfo → trackers → peers against a downloader → peers against a seeder.

mod support;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use support::bencode::B;
use support::cli::*;
use support::fake_peer::{SeedSpec, serve_requests};
use support::fake_tracker::*;
use support::files::*;
use support::net::*;
use support::torrent::*;
use support::wire::*;
use support::*;

/// How long bitfetch may take to close a connection the protocol says it must drop.
const CLOSE_DEADLINE: Duration = Duration::from_secs(30);

/// The single file of the peer and tracker cases.
const NAME: &str = "payload.bin";
/// 64 pieces of 32 KiB and a short 65th one of 1234 bytes.
const PEER_SIZE: usize = 2 * 1024 * 1024 + 1234;
const PEER_PIECES: u32 = PEER_SIZE.div_ceil(PIECE_LEN as usize) as u32;

// =============================================================================================
// A torrent, its data, a sandbox, and bitfetch processes around them
// =============================================================================================

struct Swarm {
    sb: Sandbox,
    content: Arc<Content>,
    info_hash: [u8; 20],
    /// The same info dict without trackers: seeders that must not announce use this one.
    quiet_torrent: PathBuf,
}

impl Swarm {
    fn new(size: usize, label: &str, tiers: &[Vec<String>]) -> Swarm {
        let sb = Sandbox::new();
        let content = Arc::new(Content::new(size, seed_of(label)));
        let info = single_info(NAME.as_bytes(), &content);
        let (bytes, info_hash) = torrent_bytes(&info, tiers);
        sb.write_torrent(&bytes);
        let quiet_torrent = sb.root.join("quiet.torrent");
        fs::write(&quiet_torrent, torrent_bytes(&info, &[]).0).expect("write quiet.torrent");
        fs::write(sb.data.join(NAME), &content.data).expect("write the seeder's data");
        Swarm {
            sb,
            content,
            info_hash,
            quiet_torrent,
        }
    }

    /// `bitfetch seed` of the data on its own address; returns once it listens.
    fn seeder(&self, tracked: bool, extra: &[String]) -> (ChildGuard, SocketAddr) {
        let ip = next_loopback();
        let torrent = if tracked {
            &self.sb.torrent
        } else {
            &self.quiet_torrent
        };
        let mut args = vec![
            s("seed"),
            path_arg(torrent),
            path_arg(&self.sb.data.join(NAME)),
            s("--port"),
            s("0"),
            s("--bind"),
            s(ip),
        ];
        args.extend_from_slice(extra);
        let guard = spawn_bitfetch(&format!("bitfetch seeder {ip}"), &args);
        let addr = wait_for_listening(&guard);
        (guard, addr)
    }

    /// `bitfetch download` into the sandbox's OUT, on its own address.
    fn downloader(&self, extra: &[String]) -> ChildGuard {
        let ip = next_loopback();
        let mut args = vec![
            s("download"),
            path_arg(&self.sb.torrent),
            s("-o"),
            path_arg(&self.sb.out),
            s("--port"),
            s("0"),
            s("--bind"),
            s(ip),
        ];
        args.extend_from_slice(extra);
        spawn_bitfetch(&format!("bitfetch downloader {ip}"), &args)
    }

    /// The downloader must exit 0 with the right bytes, without panicking, the sentinel intact.
    fn finish(&self, d: &ChildGuard, parts: &[&dyn Diagnose]) {
        let context = || report("other parties:", parts);
        d.wait_with_deadline(DEADLINE, &context);
        assert_exit_code(d, 0, parts);
        let got = fs::read(self.sb.out.join(NAME)).unwrap_or_default();
        if got != self.content.data {
            let mut all: Vec<&dyn Diagnose> = vec![d];
            all.extend_from_slice(parts);
            fail(
                &format!(
                    "the downloaded file differs from the original ({} bytes, want {})",
                    got.len(),
                    self.content.data.len()
                ),
                &all,
            );
        }
        self.sb.assert_sentinel(&|| d.diagnostics());
    }
}

// =============================================================================================
// Metainfo: names and paths from strangers
// =============================================================================================

/// A torrent to try, the bytes of its content, and the content of each of its files.
struct MetaCase {
    info: B,
    content: Arc<Content>,
    files: Vec<Vec<u8>>,
}

fn single_case(name: &[u8]) -> MetaCase {
    let content = Arc::new(Content::new(50_001, seed_of("single")));
    MetaCase {
        info: single_info(name, &content),
        files: vec![content.data.clone()],
        content,
    }
}

fn multi_case(name: &[u8], paths: &[&[&[u8]]]) -> MetaCase {
    let lens: Vec<u64> = (0..paths.len() as u64)
        .map(|i| 20_000 + i * 7_777)
        .collect();
    let total: u64 = lens.iter().sum();
    let content = Arc::new(Content::new(total as usize, seed_of("multi")));
    let files: Vec<(Vec<Vec<u8>>, u64)> = paths
        .iter()
        .zip(&lens)
        .map(|(p, len)| (p.iter().map(|e| e.to_vec()).collect(), *len))
        .collect();
    let mut at = 0usize;
    let bytes = lens
        .iter()
        .map(|&len| {
            let chunk = content.data[at..at + len as usize].to_vec();
            at += len as usize;
            chunk
        })
        .collect();
    MetaCase {
        info: multi_info(name, &files, &content),
        content,
        files: bytes,
    }
}

fn info_args(sb: &Sandbox, json: bool) -> Vec<String> {
    let mut args = vec![s("info"), path_arg(&sb.torrent)];
    if json {
        args.push(s("--json"));
    }
    args
}

/// `download` into OUT from `peer`, on a fresh address.
fn download_args(sb: &Sandbox, peer: SocketAddr, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        s("download"),
        path_arg(&sb.torrent),
        s("-o"),
        path_arg(&sb.out),
        s("--port"),
        s("0"),
        s("--bind"),
        s(next_loopback()),
        s("--peer"),
        s(peer),
    ];
    args.extend(extra.iter().map(s));
    args
}

/// Crash, hang and terminal-safety problems of one run.
fn run_problems(run: &Run) -> Vec<String> {
    let mut p = Vec::new();
    if run.timed_out {
        p.push("hung: killed by the hang guard".to_owned());
    }
    p.extend(run.crash_problem());
    p.extend(unsafe_output("stdout", &run.raw_stdout));
    p.extend(unsafe_output("stderr", &run.raw_stderr));
    p
}

/// File names bitfetch created that a terminal or a script should not meet.
fn unsafe_names(root: &Path) -> Vec<String> {
    walk(root)
        .iter()
        .filter_map(|rel| {
            let name = rel.file_name()?;
            match name.to_str() {
                None => Some(format!("created a file name that is not UTF-8: {rel:?}")),
                Some(n) if n.chars().any(char::is_control) => Some(format!(
                    "created a file name with control characters: {n:?}"
                )),
                Some(_) => None,
            }
        })
        .collect()
}

/// The contents of every regular file under `root`, sorted.
fn file_contents(root: &Path) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = walk(root)
        .iter()
        .map(|rel| root.join(rel))
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .map(|p| fs::read(p).unwrap_or_default())
        .collect();
    all.sort();
    all
}

/// A name or path bitfetch may either refuse (exit 3, a clear error, nothing written) or
/// accept; accepted, `info` must print it escaped, and a download from a peer that has the
/// data must complete into safely named files inside OUT while printing nothing raw.
fn name_is_refused_or_shown_safely(label: &str, case: MetaCase) {
    let sb = Sandbox::new();
    let (bytes, info_hash) = torrent_bytes(&case.info, &[]);
    sb.write_torrent(&bytes);
    let info = run_bitfetch("bitfetch info", info_args(&sb, false), COMMAND_DEADLINE);
    let json = run_bitfetch(
        "bitfetch info --json",
        info_args(&sb, true),
        COMMAND_DEADLINE,
    );
    let list = run_bitfetch(
        "bitfetch download --list",
        &[s("download"), path_arg(&sb.torrent), s("--list")],
        COMMAND_DEADLINE,
    );
    let peer = SeedSpec::content(&case.content, info_hash).start(next_loopback());
    let dl = run_bitfetch(
        "bitfetch download",
        download_args(&sb, peer.addr, &[]),
        DEADLINE,
    );
    let mut problems: Vec<String> = Vec::new();
    for run in [&info, &json, &list, &dl] {
        problems.extend(
            run_problems(run)
                .into_iter()
                .map(|p| format!("[{}] {p}", run.desc)),
        );
    }
    match info.code() {
        Some(0) => {
            if let Err(e) = serde_json::from_slice::<serde_json::Value>(&json.raw_stdout) {
                problems.push(format!("[info --json] not JSON: {e}"));
            }
            if dl.code() != Some(0) {
                problems.push(format!(
                    "[download] exit {:?}: an accepted torrent must download",
                    dl.code()
                ));
            }
            problems.extend(unsafe_names(&sb.out));
            let mut want = case.files.clone();
            want.sort();
            if file_contents(&sb.out) != want {
                problems.push(format!(
                    "[download] OUT does not hold the torrent's files: {:?}",
                    walk(&sb.out)
                ));
            }
        }
        Some(3) => {
            for run in [&info, &json, &list, &dl] {
                if run.code() != Some(3) || run.error_line().is_none() {
                    problems.push(format!(
                        "[{}] refused by `info` but here exit {:?} without a `bitfetch: error:` line",
                        run.desc,
                        run.code()
                    ));
                }
            }
            if !walk(&sb.out).is_empty() {
                problems.push(format!("a refused torrent left {:?} in OUT", walk(&sb.out)));
            }
        }
        other => problems.push(format!(
            "[info] exit {other:?}: want 0 (shown safely) or 3 (refused)"
        )),
    }
    problems.extend(sb.sentinel_problem());
    if !problems.is_empty() {
        panic!(
            "{label}:\n  {}\n\n{}\n\n{}\n\n{}\n\n{}",
            problems.join("\n  "),
            info.dump(),
            json.dump(),
            list.dump(),
            dl.dump()
        );
    }
}

#[test]
fn names_with_control_characters_invalid_utf8_and_bidi_overrides_are_never_printed_raw() {
    run_parallel(vec![
        case("terminal escapes in the name", || {
            name_is_refused_or_shown_safely(
                "terminal escapes in the name",
                single_case(b"evil\x1b]0;pwned\x07\x1b[2J\r\n\x08.bin"),
            )
        }),
        case("control characters in path elements", || {
            name_is_refused_or_shown_safely(
                "control characters in path elements",
                multi_case(
                    b"dir\x1b[31m",
                    &[
                        &[b"sub\x7f\x08", b"f\x00\x1b[1m.txt"],
                        &[b"tab\there\xc2\x9b6n"],
                    ],
                ),
            )
        }),
        case("a name that is not UTF-8", || {
            name_is_refused_or_shown_safely(
                "a name that is not UTF-8",
                single_case(b"caf\xe9-\xff\xfe-\xc3\x28.bin"),
            )
        }),
        case("path elements that are not UTF-8", || {
            name_is_refused_or_shown_safely(
                "path elements that are not UTF-8",
                multi_case(
                    b"d\xfc",
                    &[&[b"\xed\xa0\x80", b"x"], &[b"\xf8\x88\x80\x80\x80"]],
                ),
            )
        }),
        case("U+202E in the name", || {
            name_is_refused_or_shown_safely(
                "U+202E in the name",
                single_case("invoice\u{202e}fdp.exe".as_bytes()),
            )
        }),
        case("bidi overrides and isolates in path elements", || {
            name_is_refused_or_shown_safely(
                "bidi overrides and isolates in path elements",
                multi_case(
                    "docs".as_bytes(),
                    &[
                        &["report\u{202e}txt.exe".as_bytes()],
                        &["\u{2066}isolated\u{2069}\u{200f}".as_bytes()],
                    ],
                ),
            )
        }),
        case(
            "U+202E in a name that fails to download",
            bidi_name_in_an_error,
        ),
    ]);
}

/// The download is refused by a symlink planted at the file's place: the error names the
/// path, and that name must be escaped too.
fn bidi_name_in_an_error() {
    let name = "x\u{202e}gpj.exe";
    let case = single_case(name.as_bytes());
    let sb = Sandbox::new();
    let (bytes, info_hash) = torrent_bytes(&case.info, &[]);
    sb.write_torrent(&bytes);
    let victim = sb.outside.join("victim");
    fs::write(&victim, VICTIM).expect("write the victim");
    std::os::unix::fs::symlink(&victim, sb.out.join(name)).expect("plant the symlink");
    let peer = SeedSpec::content(&case.content, info_hash).start(next_loopback());
    let dl = run_bitfetch(
        "bitfetch download",
        download_args(&sb, peer.addr, &[]),
        DEADLINE,
    );
    let mut problems = run_problems(&dl);
    if fs::read(&victim).ok().as_deref() != Some(VICTIM) {
        problems.push("the symlink's target outside OUT was written".into());
    }
    if dl.code() != Some(0) && dl.error_line().is_none() {
        problems.push("failed without a `bitfetch: error:` line".into());
    }
    assert_no_problems(problems, &sb, &dl);
}

/// Fails with every problem (the sentinel's too) and what the run printed.
fn assert_no_problems(mut problems: Vec<String>, sb: &Sandbox, dl: &Run) {
    problems.extend(sb.sentinel_problem());
    assert!(
        problems.is_empty(),
        "{}\n\n{}",
        problems.join("\n"),
        dl.dump()
    );
}

/// `info` and `download` must both refuse the torrent: exit 3, a `bitfetch: error:` line that
/// mentions one of `keywords`, nothing written, nothing raw printed.
fn refused(label: &str, torrent: &[u8], keywords: &[&str]) {
    let sb = Sandbox::new();
    sb.write_torrent(torrent);
    let dead_peer = SocketAddr::from((next_loopback(), 9));
    let runs = [
        run_bitfetch("bitfetch info", info_args(&sb, false), COMMAND_DEADLINE),
        run_bitfetch(
            "bitfetch download",
            download_args(&sb, dead_peer, &[]),
            COMMAND_DEADLINE,
        ),
    ];
    let mut problems = Vec::new();
    for run in &runs {
        let mut p = run_problems(run);
        if run.code() != Some(3) {
            p.push(format!("exit {:?}, want 3 (bad torrent)", run.code()));
        }
        match run.error_line() {
            None => p.push("no `bitfetch: error:` line".into()),
            Some(line) => {
                let text = line.replace(&path_arg(&sb.torrent), "<T>").to_lowercase();
                if !keywords.iter().any(|k| text.contains(k)) {
                    p.push(format!("the error {line:?} mentions none of {keywords:?}"));
                }
            }
        }
        problems.extend(p.into_iter().map(|p| format!("[{}] {p}", run.desc)));
    }
    if !walk(&sb.out).is_empty() {
        problems.push(format!("a refused torrent left {:?} in OUT", walk(&sb.out)));
    }
    problems.extend(sb.sentinel_problem());
    if !problems.is_empty() {
        panic!(
            "{label}:\n  {}\n\n{}\n\n{}",
            problems.join("\n  "),
            runs[0].dump(),
            runs[1].dump()
        );
    }
}

fn multi_torrent(name: &[u8], paths: &[Vec<Vec<u8>>]) -> Vec<u8> {
    let lens: Vec<u64> = (0..paths.len() as u64).map(|i| 1000 + i).collect();
    let content = Content::new(lens.iter().sum::<u64>() as usize, 3);
    let files: Vec<(Vec<Vec<u8>>, u64)> = paths.iter().cloned().zip(lens).collect();
    torrent_bytes(&multi_info(name, &files, &content), &[]).0
}

fn elements(parts: &[&str]) -> Vec<Vec<u8>> {
    parts.iter().map(|p| p.as_bytes().to_vec()).collect()
}

const KW_LONG: &[&str] = &["long", "255", "length", "too big", "too large"];
const KW_DEEP: &[&str] = &["deep", "depth", "elements", "long"];
const KW_CLASH: &[&str] = &["duplicate", "clash", "same", "case", "conflict", "twice"];

/// A multi-file torrent whose one path has 200 elements, element `i` made by `element(i)`:
/// refused as too deep.
fn deep_path_refused(label: &str, element: impl Fn(usize) -> String) {
    let deep: Vec<String> = (0..200).map(element).collect();
    let deep: Vec<&str> = deep.iter().map(String::as_str).collect();
    refused(label, &multi_torrent(b"dir", &[elements(&deep)]), KW_DEEP)
}

#[test]
fn overlong_and_overdeep_paths_are_refused() {
    let long = "a".repeat(300);
    run_parallel(vec![
        case("a 300-byte path element", || {
            refused(
                "a 300-byte path element",
                &multi_torrent(b"dir", &[elements(&["ok", &"a".repeat(300)])]),
                KW_LONG,
            )
        }),
        case("a 300-byte name", move || {
            let content = Content::new(1000, 1);
            let torrent = torrent_bytes(&single_info(long.as_bytes(), &content), &[]).0;
            refused("a 300-byte name", &torrent, KW_LONG)
        }),
        case("a 100-character, 300-byte path element", || {
            // Bytes, not characters, are what NAME_MAX counts.
            refused(
                "a 100-character, 300-byte path element",
                &multi_torrent(b"dir", &[elements(&[&"\u{20ac}".repeat(100)])]),
                KW_LONG,
            )
        }),
        case("a path 200 elements deep", || {
            deep_path_refused("a path 200 elements deep", |i| format!("d{i}"))
        }),
        case("a path 200 elements deep and 6 KB long", || {
            deep_path_refused("a path 200 elements deep and 6 KB long", |i| {
                format!("{i:0>30}")
            })
        }),
        case(
            "a path within the depth limit but 12 KB long",
            path_over_path_max,
        ),
    ]);
}

/// 60 elements of 200 bytes: each element and the depth are acceptable, the whole is three
/// times PATH_MAX. Refusing it up front and failing at the first directory are both clear
/// errors; what matters is no panic and nothing outside OUT.
fn path_over_path_max() {
    let deep: Vec<String> = (0..60).map(|i| format!("{i:0>200}")).collect();
    let deep: Vec<&str> = deep.iter().map(String::as_str).collect();
    let sb = Sandbox::new();
    sb.write_torrent(&multi_torrent(b"dir", &[elements(&deep)]));
    let dead_peer = SocketAddr::from((next_loopback(), 9));
    let dl = run_bitfetch(
        "bitfetch download",
        download_args(&sb, dead_peer, &["--timeout", "20s"]),
        COMMAND_DEADLINE,
    );
    let mut problems = run_problems(&dl);
    if !matches!(dl.code(), Some(3 | 4)) || dl.error_line().is_none() {
        problems.push(format!(
            "exit {:?}: want 3 (refused) or 4 (cannot create it) with a `bitfetch: error:` line",
            dl.code()
        ));
    }
    if let Some(stray) = walk(&sb.out).iter().find(|p| !p.starts_with("dir")) {
        problems.push(format!("{stray:?} is in OUT but outside OUT/dir"));
    }
    assert_no_problems(problems, &sb, &dl);
}

#[test]
fn paths_that_differ_only_in_case_are_refused() {
    // On a case-insensitive file system (or once copied to one) each pair is one file, and
    // the second would overwrite the first.
    run_parallel(vec![
        case("a/File.txt and a/file.txt", || {
            refused(
                "a/File.txt and a/file.txt",
                &multi_torrent(
                    b"dir",
                    &[elements(&["a", "File.txt"]), elements(&["a", "file.txt"])],
                ),
                KW_CLASH,
            )
        }),
        case("Dir/f and dir/f", || {
            refused(
                "Dir/f and dir/f",
                &multi_torrent(b"top", &[elements(&["Dir", "f"]), elements(&["dir", "f"])]),
                KW_CLASH,
            )
        }),
        case("a/\u{c4}.txt and a/\u{e4}.txt", || {
            refused(
                "a/\u{c4}.txt and a/\u{e4}.txt",
                &multi_torrent(
                    b"dir",
                    &[
                        elements(&["a", "\u{c4}.txt"]),
                        elements(&["a", "\u{e4}.txt"]),
                    ],
                ),
                KW_CLASH,
            )
        }),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Symlinks planted in the output directory
// ---------------------------------------------------------------------------------------------

const VICTIM: &[u8] = b"victim outside OUT: must not change\n";

/// A link planted in OUT before the download: the download may refuse (a clear error) or
/// route around it, but must never write through it; everything outside OUT stays as it was.
fn link_is_not_followed(
    label: &str,
    case: MetaCase,
    extra: &[&str],
    plant: impl FnOnce(&Sandbox, &[u8; 20]),
) {
    let sb = Sandbox::new();
    let (bytes, info_hash) = torrent_bytes(&case.info, &[]);
    sb.write_torrent(&bytes);
    fs::write(sb.outside.join("victim"), VICTIM).expect("write the victim");
    fs::create_dir(sb.outside.join("dir")).expect("mkdir outside/dir");
    plant(&sb, &info_hash);
    let before = snapshot(&sb.outside);
    let peer = SeedSpec::content(&case.content, info_hash).start(next_loopback());
    let dl = run_bitfetch(
        "bitfetch download",
        download_args(&sb, peer.addr, extra),
        DEADLINE,
    );
    drop(peer);
    let mut problems = run_problems(&dl);
    let after = snapshot(&sb.outside);
    if after != before {
        let changed: Vec<_> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(before.keys().filter(|k| !after.contains_key(*k)))
            .collect();
        problems.push(format!(
            "wrote through the link: outside OUT changed: {changed:?}"
        ));
    }
    problems.extend(sb.sentinel_problem());
    match dl.code() {
        Some(0) => {
            // Routed around the link: then the data must be in OUT, in regular files.
            let got = file_contents(&sb.out);
            if got.is_empty() || got.iter().any(|f| !case.files.contains(f)) {
                problems.push(format!(
                    "exit 0, but OUT does not hold the torrent's files: {:?}",
                    walk(&sb.out)
                ));
            }
        }
        _ => match dl.error_line() {
            None => problems.push("failed without a `bitfetch: error:` line".into()),
            Some(line) if !line.to_lowercase().contains("link") => problems.push(format!(
                "the error {line:?} does not say a link is in the way"
            )),
            Some(_) => {}
        },
    }
    if !problems.is_empty() {
        panic!("{label}:\n  {}\n\n{}", problems.join("\n  "), dl.dump());
    }
}

fn link(target: &Path, at: &Path) {
    std::os::unix::fs::symlink(target, at)
        .unwrap_or_else(|e| panic!("symlink {} -> {}: {e}", at.display(), target.display()));
}

/// Where a link is planted, in which torrent (`true`: the tree, else one file), with which extra
/// arguments.
type Planted = (
    &'static str,
    bool,
    &'static [&'static str],
    fn(&Sandbox, &[u8; 20]),
);

#[test]
fn symlinks_planted_in_the_output_directory_are_not_followed() {
    let plants: Vec<Planted> = vec![
        (
            "the file is a link to a file outside",
            false,
            &[],
            |sb, _| link(&sb.outside.join("victim"), &sb.out.join("file.bin")),
        ),
        (
            "the file is a dangling link to outside",
            false,
            &[],
            |sb, _| {
                link(
                    &sb.outside.join("created-through-the-link"),
                    &sb.out.join("file.bin"),
                )
            },
        ),
        (
            "the file is a relative link to the sentinel",
            false,
            &[],
            |sb, _| link(Path::new("../sentinel"), &sb.out.join("file.bin")),
        ),
        (
            "the torrent's directory is a link outside",
            true,
            &[],
            |sb, _| link(&sb.outside.join("dir"), &sb.out.join("dir")),
        ),
        ("a subdirectory is a link outside", true, &[], |sb, _| {
            fs::create_dir(sb.out.join("dir")).expect("mkdir OUT/dir");
            link(&sb.outside.join("dir"), &sb.out.join("dir").join("sub"))
        }),
        // File 1 alone shares its last piece with file 2: that boundary goes to the hidden
        // parts file.
        (
            "the parts file of a selection is a link outside",
            true,
            &["--select", "1"],
            |sb, hash| {
                let parts = format!(".bitfetch-{}.parts", &hex(hash)[..16]);
                link(&sb.outside.join("victim"), &sb.out.join(parts))
            },
        ),
    ];
    run_parallel(
        plants
            .into_iter()
            .map(|(label, tree, extra, plant)| {
                case(label, move || {
                    let torrent = if tree {
                        multi_case(b"dir", &[&[b"sub", b"f"], &[b"g"]])
                    } else {
                        single_case(b"file.bin")
                    };
                    link_is_not_followed(label, torrent, extra, plant)
                })
            })
            .collect(),
    );
}

// =============================================================================================
// Trackers
// =============================================================================================

/// A downloader whose only tracker replies with `reply` to every announce.
fn tracked(
    label: &str,
    reply: impl Fn(&HttpRequest) -> HttpAction + Send + 'static,
) -> (HttpTracker, Swarm) {
    let tracker = HttpTracker::start("hostile");
    tracker.set_script(move |req, _| reply(req));
    let swarm = Swarm::new(64 * 1024, label, &[vec![tracker.url("/announce")]]);
    (tracker, swarm)
}

/// The tracker's notice on bitfetch's stderr: it must name the tracker and say something.
fn tracker_notice(d: &ChildGuard, tracker: &HttpTracker) -> String {
    let needle = tracker.addr.to_string();
    let line = wait_for_stderr(d, &needle, DEADLINE);
    let reason = line.split(&needle).nth(1).unwrap_or_default();
    let reason = reason
        .trim_start_matches(|c: char| c != ':')
        .trim_start_matches(':');
    assert!(
        reason.trim().len() > 3,
        "the tracker error {line:?} does not say what went wrong\n{}",
        d.diagnostics()
    );
    line
}

/// A body (or head) that never ends in practice: bitfetch must stop reading, say why, and
/// keep its memory. A peer that never answers keeps the download waiting meanwhile.
fn endless_reply(label: &str, prefix: Vec<u8>, unit: Vec<u8>, units: u64) {
    let (tracker, swarm) = tracked(label, move |_| HttpAction::Stream {
        prefix: prefix.clone(),
        unit: unit.clone(),
        units,
    });
    let holder = TcpListener::bind((next_loopback(), 0)).expect("bind the holder");
    let d = swarm.downloader(&[s("--peer"), s(holder.local_addr().expect("local_addr"))]);
    let mem = MemWatch::start(&d);
    let context = || format!("{}\n{}", d.diagnostics(), tracker.describe());
    let line = tracker_notice(&d, &tracker);
    let Some(streams) = poll_until(DEADLINE, || {
        let st = tracker.streams();
        (!st.is_empty()).then_some(st)
    }) else {
        panic!(
            "{label}: the reply never ended (bitfetch still reading?)\n{}",
            context()
        );
    };
    assert!(
        streams[0].written < streams[0].planned,
        "{label}: bitfetch read the whole {}-byte reply\n{}",
        streams[0].planned,
        context()
    );
    mem.assert_bounded(label, &context);
    assert!(
        d.is_running(),
        "{label}: a tracker error ended the download\n{}",
        context()
    );
    d.stop();
    assert_exit_code(&d, 130, &[&Text(tracker.describe())]);
    swarm.sb.assert_sentinel(&context);
    eprintln!("{label}: {line}");
}

const FIFTY_MB: u64 = 50 * 1024 * 1024;

#[test]
fn endless_tracker_replies_are_cut_off_with_bounded_memory() {
    let unit = || vec![b'7'; 64 * 1024];
    let units = FIFTY_MB / (64 * 1024);
    run_parallel(vec![
        case("50 MB body with a Content-Length", move || {
            let body_head = format!("d5:peers{FIFTY_MB}:");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body_head}",
                body_head.len() as u64 + FIFTY_MB
            );
            endless_reply(
                "50 MB body with a Content-Length",
                head.into_bytes(),
                unit(),
                units,
            )
        }),
        case("50 MB body until the connection closes", move || {
            let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nd5:peers999999999:";
            endless_reply("50 MB body until close", head.into(), unit(), units)
        }),
        case("50 MB chunked body", move || {
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend_from_slice(&unit());
            chunk.extend_from_slice(b"\r\n");
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            endless_reply("50 MB chunked body", head.into(), chunk, units)
        }),
        case("a chunk size of 2^80", move || {
            let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                        100000000000000000000\r\nd5:peers";
            endless_reply("a chunk size of 2^80", head.into(), unit(), units)
        }),
        case("50 MB of header lines", || {
            let line = format!("X-Filler: {}\r\n", "f".repeat(1000)).into_bytes();
            let count = FIFTY_MB / line.len() as u64;
            endless_reply(
                "50 MB of header lines",
                b"HTTP/1.1 200 OK\r\n".to_vec(),
                line,
                count,
            )
        }),
        case("one 50 MB header line", move || {
            endless_reply(
                "one 50 MB header line",
                b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec(),
                unit(),
                units,
            )
        }),
        case("50 MB body and no other peer: exit 6", || {
            let body_head = format!("d5:peers{FIFTY_MB}:");
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body_head}",
                body_head.len() as u64 + FIFTY_MB
            )
            .into_bytes();
            let (tracker, swarm) = tracked("exit 6", move |_| HttpAction::Stream {
                prefix: head.clone(),
                unit: vec![b'7'; 64 * 1024],
                units: FIFTY_MB / (64 * 1024),
            });
            let d = swarm.downloader(&[]);
            let mem = MemWatch::start(&d);
            d.wait_with_deadline(DEADLINE, &|| tracker.describe());
            assert_exit_code(&d, 6, &[&Text(tracker.describe())]);
            assert!(
                d.stderr_text()
                    .lines()
                    .any(|l| l.starts_with("bitfetch: error:")),
                "no error line\n{}",
                d.diagnostics()
            );
            mem.assert_bounded("50 MB body, no peer", &|| d.diagnostics());
            swarm.sb.assert_sentinel(&|| d.diagnostics());
        }),
    ]);
}

/// bitfetch does not ask for compression (no gzip feature in its HTTP client), so a reply
/// that comes compressed anyway must not be inflated: it is a bad reply, and the peer inside
/// it is never dialled.
fn compressed_reply_is_not_inflated(
    label: &str,
    encoding: &'static str,
    encoded: fn(&[u8]) -> Vec<u8>,
) {
    let trap = Trap::start();
    let body = encoded(&announce_body(60, &compact4(&[v4(trap.addr)])));
    let (tracker, swarm) = tracked(label, move |_| {
        HttpAction::Raw(http_response(200, &[("Content-Encoding", encoding)], &body))
    });
    let d = swarm.downloader(&[]);
    let context = || format!("{}\n{}", d.diagnostics(), tracker.describe());
    d.wait_with_deadline(DEADLINE, &context);
    let announce = tracker
        .requests()
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{label}: no announce\n{}", context()));
    if let Some(accepted) = announce.header("accept-encoding") {
        let accepted = accepted.to_ascii_lowercase();
        assert!(
            !["gzip", "deflate", "br", "zstd", "*"]
                .iter()
                .any(|e| accepted.contains(e)),
            "{label}: bitfetch now asks for compressed replies ({accepted:?}): this case must \
             become a decompression-bomb case (a small reply inflating to gigabytes)\n{}",
            context()
        );
    }
    assert_exit_code(&d, 6, &[&Text(tracker.describe())]);
    tracker_notice(&d, &tracker);
    assert_eq!(
        trap.hits().len(),
        0,
        "{label}: bitfetch dialled the peer inside a compressed reply it never asked for\n{}",
        context()
    );
    swarm.sb.assert_sentinel(&context);
}

#[test]
fn compressed_tracker_replies_are_not_inflated() {
    run_parallel(vec![
        case("gzip", || {
            compressed_reply_is_not_inflated("gzip", "gzip", gzip)
        }),
        case("deflate", || {
            compressed_reply_is_not_inflated("deflate", "deflate", zlib)
        }),
    ]);
}

/// A redirect bitfetch must not follow (another scheme) or cannot finish (a loop): an error,
/// a bounded number of requests, no hang, and nothing read from the local file system.
fn redirect_is_an_error(label: &str, location: impl Fn(&HttpRequest) -> String + Send + 'static) {
    let (tracker, swarm) = tracked(label, move |req| {
        let to = location(req);
        HttpAction::Raw(http_response(302, &[("Location", &to)], b""))
    });
    let d = swarm.downloader(&[]);
    let context = || format!("{}\n{}", d.diagnostics(), tracker.describe());
    d.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(&d, 6, &[&Text(tracker.describe())]);
    let line = tracker_notice(&d, &tracker);
    // Up to 4 announces (the first and the retries before giving up), each following at
    // most a few redirects: bounded, and reported once, not on every retry.
    let requests = tracker.requests().len();
    assert!(
        (1..=4 * 11).contains(&requests),
        "{label}: {requests} requests for 4 announces\n{}",
        context()
    );
    let needle = tracker.addr.to_string();
    let notices = d
        .stderr_text()
        .lines()
        .filter(|l| l.starts_with("bitfetch: tracker ") && l.contains(&needle))
        .count();
    assert_eq!(
        notices,
        1,
        "{label}: the failing tracker must be reported once\n{}",
        context()
    );
    assert!(
        !d.stderr_text().contains("root:") && !d.stdout_text().contains("root:"),
        "{label}: bitfetch printed what looks like /etc/passwd\n{}",
        context()
    );
    swarm.sb.assert_sentinel(&context);
    eprintln!("{label}: {line}");
}

#[test]
fn tracker_redirects_to_other_schemes_and_in_loops_are_errors() {
    run_parallel(vec![
        case("to file:///etc/passwd", || {
            redirect_is_an_error("to file:///etc/passwd", |_| "file:///etc/passwd".into())
        }),
        case("to ftp://", || {
            redirect_is_an_error("to ftp://", |_| "ftp://127.0.0.1:21/announce".into())
        }),
        case("to itself", || {
            redirect_is_an_error("to itself", |req| {
                let host = req.header("host").unwrap_or_default().to_owned();
                format!("http://{host}{}", req.target)
            })
        }),
        case("between two paths", || {
            redirect_is_an_error("between two paths", |req| {
                let host = req.header("host").unwrap_or_default().to_owned();
                let other = if req.path == "/announce" {
                    "/b"
                } else {
                    "/announce"
                };
                format!("http://{host}{other}?again")
            })
        }),
    ]);
}

/// A loopback address nothing listens on, a different one for each `i` (127.128.0.0 + i, port
/// 1): dialling it is refused at once and never leaves the machine.
fn nobody(i: u32) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(0x7f80_0000 + i), 1)
}

#[test]
fn floods_of_tracker_peers_are_capped_and_the_download_still_works() {
    run_parallel(vec![
        case("300 000 peers, the seeder among them", || {
            let tracker = HttpTracker::start("hostile");
            let swarm = Swarm::new(PEER_SIZE, "300k", &[vec![tracker.url("/announce")]]);
            let (seeder, s_addr) = swarm.seeder(false, &[]);
            let mut peers = vec![v4(s_addr)];
            peers.extend((0..299_999).map(nobody));
            let body = Arc::new(announce_body(1800, &compact4(&peers)));
            tracker.set_script(move |_, _| HttpAction::Raw(http_response(200, &[], &body)));
            let d = swarm.downloader(&[]);
            let mem = MemWatch::start(&d);
            swarm.finish(&d, &[&seeder, &Text(tracker.describe())]);
            mem.assert_bounded("300 000 peers", &|| d.diagnostics());
        }),
        case("500 000 peers, the seeder known otherwise", || {
            let tracker = HttpTracker::start("hostile");
            let swarm = Swarm::new(PEER_SIZE, "500k", &[vec![tracker.url("/announce")]]);
            let (seeder, s_addr) = swarm.seeder(false, &[]);
            let peers: Vec<SocketAddrV4> = (0..500_000).map(nobody).collect();
            let body = Arc::new(announce_body(1800, &compact4(&peers)));
            tracker.set_script(move |_, _| HttpAction::Raw(http_response(200, &[], &body)));
            let d = swarm.downloader(&[s("--peer"), s(s_addr)]);
            let mem = MemWatch::start(&d);
            swarm.finish(&d, &[&seeder, &Text(tracker.describe())]);
            mem.assert_bounded("500 000 peers", &|| d.diagnostics());
            assert!(
                !tracker.requests().is_empty(),
                "the tracker was never asked\n{}",
                d.diagnostics()
            );
        }),
    ]);
}

/// How soon after its first announce a seeder announces again when the tracker asks for
/// `interval` (and `min interval`): no storm for 0 or less, no overflow or stuck thread for
/// huge values.
fn interval_is_clamped(label: &str, interval: i64, min_interval: Option<i64>) {
    let tracker = HttpTracker::start("hostile");
    let mut reply = vec![("interval", B::Int(interval)), ("peers", B::bytes(b""))];
    if let Some(m) = min_interval {
        reply.push(("min interval", B::Int(m)));
    }
    let body = B::dict(reply).encode();
    tracker.set_script(move |_, _| HttpAction::Raw(http_response(200, &[], &body)));
    let swarm = Swarm::new(64 * 1024, label, &[vec![tracker.url("/announce")]]);
    let (seeder, _) = swarm.seeder(true, &[]);
    let context = || format!("{}\n{}", seeder.diagnostics(), tracker.describe());
    let announces = || {
        tracker
            .requests()
            .into_iter()
            .filter(|r| r.path == "/announce")
            .collect::<Vec<_>>()
    };
    let Some(first) = poll_until(DEADLINE, || announces().into_iter().next()) else {
        panic!("{label}: the seeder never announced\n{}", context());
    };
    // Ten seconds of watching: a client that took 0 literally would announce continuously.
    let window = Duration::from_secs(10);
    if poll_until(window, || (announces().len() > 3).then_some(())).is_some() {
        panic!(
            "{label}: an announce storm: more than 3 announces within {window:?}\n{}",
            context()
        );
    }
    if interval <= 0 {
        // Clamped, not "never": the next announce comes, and not before the window closed.
        let Some(second) = poll_until(Duration::from_secs(150), || announces().into_iter().nth(1))
        else {
            panic!("{label}: no re-announce within 150 s\n{}", context());
        };
        let gap = second.at.duration_since(first.at);
        assert!(
            gap >= window,
            "{label}: re-announced after only {gap:?}\n{}",
            context()
        );
    } else {
        assert_eq!(
            announces().len(),
            1,
            "{label}: re-announced early\n{}",
            context()
        );
    }
    // The tracker thread is alive and responsive: SIGTERM brings a `stopped` announce and a
    // clean exit, not a wait of 2^31 seconds.
    let status = seeder.stop();
    assert_exit_code(&seeder, 0, &[&Text(tracker.describe())]);
    assert!(
        status.is_some(),
        "{label}: the seeder did not stop\n{}",
        context()
    );
    assert!(
        announces().iter().any(|r| r.event() == "stopped"),
        "{label}: no `stopped` announce at exit\n{}",
        context()
    );
}

#[test]
fn tracker_intervals_of_zero_and_two_to_the_31_are_clamped() {
    run_parallel(vec![
        case("interval 0", || interval_is_clamped("interval 0", 0, None)),
        case("interval -1, min interval 0", || {
            interval_is_clamped("interval -1", -1, Some(0))
        }),
        case("interval 2^31, min interval 2^31", || {
            interval_is_clamped("interval 2^31", 1 << 31, Some(1 << 31))
        }),
        case("interval i64::MAX", || {
            interval_is_clamped("interval i64::MAX", i64::MAX, None)
        }),
    ]);
}

// =============================================================================================
// Peers against a downloader
// =============================================================================================

/// What a hostile peer's script knows.
struct Hostile<'a> {
    content: &'a Content,
    info_hash: [u8; 20],
    peer_id: [u8; 20],
    reserved: [u8; 8],
    /// The hostile peer's own address (to come back from).
    ip: Ipv4Addr,
    /// The downloader's listening address.
    target: SocketAddr,
    /// Lets the good seeder in: call once the attack has been delivered.
    ready: &'a dyn Fn(),
}

type Script<'a> = Box<dyn FnOnce(&mut Wire, &Hostile) -> Result<String, String> + Send + 'a>;

/// A downloader whose only useful peer at first is the hostile one (it dials it); once the
/// script calls `ready`, a good bitfetch seeder dials the downloader, which must then complete
/// with the right bytes and bounded memory. The script's `Err` fails the case. Returns the
/// downloader's stderr.
fn against_downloader(label: &str, reserved: [u8; 8], script: Script<'_>) -> String {
    let swarm = Swarm::new(PEER_SIZE, label, &[]);
    let ip = next_loopback();
    let listener = TcpListener::bind((ip, 0)).expect("bind the hostile peer");
    let hostile_addr = listener.local_addr().expect("local_addr");
    // A second peer that never answers: without it, a downloader whose only peer is dropped
    // before its (empty) tracker list is reported may rightly give up with exit 6.
    let holder = TcpListener::bind((next_loopback(), 0)).expect("bind the holder");
    let holder_addr = holder.local_addr().expect("local_addr");
    let d = swarm.downloader(&[s("--peer"), s(hostile_addr), s("--peer"), s(holder_addr)]);
    let mem = MemWatch::start(&d);
    let target = wait_for_listening(&d);
    let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
    thread::scope(|scope| {
        let (swarm, listener) = (&swarm, &listener);
        let hostile = scope.spawn(move || -> Result<String, String> {
            let ready = move || {
                let _ = ready_tx.try_send(());
            };
            let mut wire = Wire::new(accept_within(listener, DEADLINE)?);
            let theirs = wire.read_handshake(Duration::from_secs(30))?;
            if theirs[28..48] != swarm.info_hash {
                return Err("bitfetch's handshake carries another info hash".into());
            }
            let peer_id = peer_id("HX");
            wire.send(&handshake(&swarm.info_hash, &peer_id, reserved))?;
            let ctx = Hostile {
                content: &swarm.content,
                info_hash: swarm.info_hash,
                peer_id,
                reserved,
                ip,
                target,
                ready: &ready,
            };
            script(&mut wire, &ctx)
        });
        if ready_rx.recv_timeout(DEADLINE).is_err() {
            d.stop();
            let why = match hostile.join() {
                Ok(Err(e)) => e,
                Ok(Ok(m)) => format!("the script ended without letting the seeder in: {m}"),
                Err(p) => std::panic::resume_unwind(p),
            };
            fail(&format!("{label}: {why}"), &[&d]);
        }
        let (seeder, _) = swarm.seeder(false, &[s("--peer"), s(target)]);
        swarm.finish(&d, &[&seeder]);
        mem.assert_bounded(label, &|| d.diagnostics());
        match hostile.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => fail(&format!("{label}: {e}"), &[&d, &seeder]),
            Err(p) => std::panic::resume_unwind(p),
        }
    });
    d.stderr_text()
}

/// Sends `attack`; bitfetch must close the connection by itself (no seeder has joined yet, so
/// it is not finishing); then the seeder is let in.
fn closes_after(attack: Vec<u8>) -> Script<'static> {
    Box::new(move |wire, ctx| {
        let _ = wire.send(&attack);
        let outcome = wire.expect_closed(CLOSE_DEADLINE);
        (ctx.ready)();
        outcome
    })
}

fn frame_len(len: u32, id: u8, junk: usize) -> Vec<u8> {
    let mut f = len.to_be_bytes().to_vec();
    f.push(id);
    f.extend(std::iter::repeat_n(0x5a, junk));
    f
}

/// Frames that break the rules, each from a peer a downloader dialled: the downloader must
/// drop that peer, and still complete from a good seeder.
#[test]
fn peers_breaking_frame_rules_are_dropped_by_a_downloader() {
    let block = vec![0x42u8; BLOCK as usize];
    let last = PEER_PIECES - 1;
    let bitfield_bytes = PEER_PIECES.div_ceil(8) as usize;
    let attacks: Vec<(&str, [u8; 8], Vec<u8>)> = vec![
        ("length prefix 0xFFFFFFFF", NO_EXTENSIONS, vec![0xff; 4]),
        (
            "length prefix 2^31 on a piece",
            NO_EXTENSIONS,
            frame_len(1 << 31, id::PIECE, 1024),
        ),
        (
            "length prefix 256 MiB, unknown id",
            NO_EXTENSIONS,
            frame_len(1 << 28, 99, 1024),
        ),
        (
            "piece frame one byte over a block",
            NO_EXTENSIONS,
            frame_len(9 + BLOCK + 1, id::PIECE, 2048),
        ),
        (
            "piece with an index past the last piece",
            NO_EXTENSIONS,
            msg_piece(PEER_PIECES, 0, &block),
        ),
        (
            "piece with index 0xFFFFFFFF",
            NO_EXTENSIONS,
            msg_piece(u32::MAX, 0, &block),
        ),
        (
            "piece with a misaligned offset",
            NO_EXTENSIONS,
            msg_piece(0, 1, &block),
        ),
        (
            "piece with an offset past its piece",
            NO_EXTENSIONS,
            msg_piece(0, PIECE_LEN, &block),
        ),
        (
            "piece with an offset near 2^32",
            NO_EXTENSIONS,
            msg_piece(0, u32::MAX - 100, &block),
        ),
        (
            "piece longer than the short last piece",
            NO_EXTENSIONS,
            msg_piece(last, 0, &block),
        ),
        (
            "piece of a length never requested",
            NO_EXTENSIONS,
            msg_piece(0, 0, &block[..100]),
        ),
        (
            "have past the last piece",
            NO_EXTENSIONS,
            msg_have(PEER_PIECES),
        ),
        ("have 0xFFFFFFFF", NO_EXTENSIONS, msg_have(u32::MAX)),
        (
            "request past the last piece",
            NO_EXTENSIONS,
            msg_request(PEER_PIECES, 0, BLOCK),
        ),
        (
            "request over 16 KiB",
            NO_EXTENSIONS,
            msg_request(0, 0, BLOCK + 1),
        ),
        ("request of zero bytes", NO_EXTENSIONS, msg_request(0, 0, 0)),
        (
            "request running past its piece",
            NO_EXTENSIONS,
            msg_request(0, PIECE_LEN - 100, BLOCK),
        ),
        (
            "request whose end overflows 32 bits",
            NO_EXTENSIONS,
            msg_request(0, u32::MAX - 10, BLOCK),
        ),
        (
            "bitfield one byte too long",
            NO_EXTENSIONS,
            frame(id::BITFIELD, &vec![0xff; bitfield_bytes + 1]),
        ),
        (
            "bitfield one byte short",
            NO_EXTENSIONS,
            frame(id::BITFIELD, &vec![0xff; bitfield_bytes - 1]),
        ),
        (
            "bitfield with spare bits set",
            NO_EXTENSIONS,
            frame(id::BITFIELD, &vec![0xff; bitfield_bytes]),
        ),
        (
            "Fast have-all without negotiating it",
            NO_EXTENSIONS,
            frame(id::HAVE_ALL, &[]),
        ),
        (
            "Fast reject past the last piece",
            FAST,
            msg_reject(PEER_PIECES, 0, BLOCK),
        ),
        (
            "extension message of 16 MiB",
            NO_EXTENSIONS,
            frame_len(16 << 20, id::EXTENDED, 1024),
        ),
    ];
    run_parallel(
        attacks
            .into_iter()
            .map(|(label, reserved, attack)| {
                case(label, move || {
                    against_downloader(label, reserved, closes_after(attack));
                })
            })
            .collect(),
    );
}

#[test]
fn peers_that_stall_drip_repeat_or_push_unasked_blocks_do_not_stop_a_download() {
    run_parallel(vec![
        case("a 1 byte/s drip peer", || {
            against_downloader("drip", NO_EXTENSIONS, Box::new(drip));
        }),
        case("a peer that unchokes and then says nothing", || {
            against_downloader("silent", NO_EXTENSIONS, Box::new(silent_after_unchoke));
        }),
        case("a bitfield sent three times", || {
            against_downloader(
                "bitfield thrice",
                NO_EXTENSIONS,
                Box::new(repeated_bitfield),
            );
        }),
        case("blocks nobody asked for", || {
            let stderr = against_downloader("unasked", NO_EXTENSIONS, Box::new(unasked_blocks));
            assert!(
                stderr.contains("banned peer"),
                "a peer pushing unasked blocks was dropped but not banned:\n{stderr}"
            );
        }),
        case(
            "unasked garbage blocks for pieces in flight",
            poisoned_blocks,
        ),
    ]);
}

/// Claims every piece, unchokes, and waits for bitfetch's first request.
fn offer_everything(wire: &mut Wire, ctx: &Hostile) -> Result<Option<Msg>, String> {
    wire.send(&frame(
        id::BITFIELD,
        &full_bitfield(ctx.content.piece_count()),
    ))?;
    wire.send(&frame(id::UNCHOKE, &[]))?;
    wire.wait_for(DEADLINE, |m| matches!(m, Msg::Request { .. }))
}

/// Has everything, unchokes, and answers the first request at one byte per second.
fn drip(wire: &mut Wire, ctx: &Hostile) -> Result<String, String> {
    let Some(Msg::Request { piece, offset, len }) = offer_everything(wire, ctx)? else {
        return Err("bitfetch never asked the drip peer for anything".into());
    };
    (ctx.ready)();
    let data = ctx
        .content
        .block(piece, offset, len)
        .ok_or("a request outside the torrent")?;
    let started = Instant::now();
    for (sent, byte) in msg_piece(piece, offset, data).into_iter().enumerate() {
        if wire.send(&[byte]).is_err()
            || wire
                .idle_until(Instant::now() + Duration::from_secs(1))
                .is_err()
        {
            return Ok(format!("dripped {sent} bytes before bitfetch hung up"));
        }
        if started.elapsed() > DEADLINE {
            return Err(format!("still connected after dripping for {DEADLINE:?}"));
        }
    }
    Err("bitfetch waited for a whole block dripped at one byte per second".into())
}

/// Has everything, unchokes, takes requests and never answers them.
fn silent_after_unchoke(wire: &mut Wire, ctx: &Hostile) -> Result<String, String> {
    if offer_everything(wire, ctx)?.is_none() {
        return Err("bitfetch never asked the silent peer for anything".into());
    }
    (ctx.ready)();
    match wire.idle_until(Instant::now() + DEADLINE) {
        Err(_) => Ok("bitfetch finished elsewhere and hung up".into()),
        Ok(()) => Err(format!("still connected after {DEADLINE:?}")),
    }
}

/// A full bitfield, a have, the full bitfield again, then one with only the first half:
/// BEP 3 allows one bitfield, first. Dropping the peer and merging are both fine; what is not
/// is a broken piece picker. The peer then serves honestly.
fn repeated_bitfield(wire: &mut Wire, ctx: &Hostile) -> Result<String, String> {
    let n = ctx.content.piece_count();
    let full = full_bitfield(n);
    let mut half = vec![0u8; full.len()];
    half[..full.len() / 2].fill(0xff);
    for msg in [
        frame(id::BITFIELD, &full),
        msg_have(3),
        frame(id::BITFIELD, &full),
        frame(id::BITFIELD, &half),
        frame(id::UNCHOKE, &[]),
    ] {
        if wire.send(&msg).is_err() {
            (ctx.ready)();
            return Ok("bitfetch hung up on the repeated bitfield".into());
        }
    }
    let first = wire.wait_for(DEADLINE, |m| matches!(m, Msg::Request { .. }));
    (ctx.ready)();
    match first {
        Err(_) => Ok("bitfetch hung up on the repeated bitfield".into()),
        Ok(None) => Err("bitfetch neither asked for a block nor hung up".into()),
        Ok(Some(Msg::Request { piece, offset, len })) => {
            let data = ctx
                .content
                .block(piece, offset, len)
                .ok_or("a request outside the torrent")?;
            let _ = wire.send(&msg_piece(piece, offset, data));
            let served = serve_requests(wire, ctx.content, DEADLINE)?;
            Ok(format!(
                "served {} blocks after the repeated bitfields",
                served + 1
            ))
        }
        Ok(Some(other)) => Err(format!("unexpected {other:?}")),
    }
}

/// Has nothing (so it is asked for nothing) and pushes 40 well-formed blocks of garbage:
/// bitfetch must drop and ban it, and turn away the same peer coming back.
fn unasked_blocks(wire: &mut Wire, ctx: &Hostile) -> Result<String, String> {
    let garbage = vec![0xa5u8; BLOCK as usize];
    for piece in 0..40 {
        if wire.send(&msg_piece(piece, 0, &garbage)).is_err() {
            break;
        }
    }
    let first = wire.expect_closed(CLOSE_DEADLINE);
    let again = Wire::dial(ctx.ip, ctx.target)
        .map_err(|e| format!("cannot dial back: {e}"))
        .and_then(|mut w| {
            let _ = w.send(&handshake(&ctx.info_hash, &ctx.peer_id, ctx.reserved));
            let _ = w.send(&frame(
                id::BITFIELD,
                &full_bitfield(ctx.content.piece_count()),
            ));
            w.expect_closed(CLOSE_DEADLINE)
                .map_err(|e| format!("the banned peer came back and was kept: {e}"))
        });
    (ctx.ready)();
    Ok(format!("{}; back again: {}", first?, again?))
}

/// A seeder slowed to 128 KiB/s holds requests for every block of a 1 MiB torrent (32 pieces
/// of 2 blocks); as soon as the first piece verifies, a second peer that was never asked for
/// anything pushes garbage for the second block of every piece. Taking those blocks fails
/// piece after piece and pins each failure on the honest seeder too (it sent the other
/// block); the download must instead finish from the seeder, which must not be banned.
fn poisoned_blocks() {
    let label = "poisoned blocks";
    let swarm = Swarm::new(1024 * 1024, label, &[]);
    let ip = next_loopback();
    let listener = TcpListener::bind((ip, 0)).expect("bind the poisoner");
    let d = swarm.downloader(&[s("--peer"), s(listener.local_addr().expect("local_addr"))]);
    let target = wait_for_listening(&d);
    thread::scope(|scope| {
        let (swarm, listener) = (&swarm, &listener);
        let poisoner = scope.spawn(move || -> Result<String, String> {
            let mut wire = Wire::new(accept_within(listener, DEADLINE)?);
            wire.read_handshake(Duration::from_secs(30))?;
            wire.send(&handshake(&swarm.info_hash, &peer_id("HX"), NO_EXTENSIONS))?;
            if wire
                .wait_for(DEADLINE, |m| matches!(m, Msg::Have(_)))?
                .is_none()
            {
                return Err("the downloader never announced a verified piece".into());
            }
            // The second block of every piece: the seeder supplies the first, so each
            // failed piece has two senders and neither sent all of it.
            let garbage = vec![0x66u8; BLOCK as usize];
            let mut pushed = 0;
            for piece in 0..swarm.content.piece_count() {
                if wire.send(&msg_piece(piece, BLOCK, &garbage)).is_err() {
                    break;
                }
                pushed += 1;
            }
            wire.expect_closed(DEADLINE)
                .map(|how| format!("pushed {pushed} garbage blocks; {how}"))
        });
        let seeder_ip = next_loopback();
        let seeder_args = [
            s("seed"),
            path_arg(&swarm.quiet_torrent),
            path_arg(&swarm.sb.data.join(NAME)),
            s("--port"),
            s("0"),
            s("--bind"),
            s(seeder_ip),
            s("--peer"),
            s(target),
            s("--max-upload-rate"),
            s("128K"),
        ];
        let seeder = spawn_bitfetch(&format!("slow bitfetch seeder {seeder_ip}"), &seeder_args);
        let framed = format!("banned peer {seeder_ip}:");
        let ended = poll_until(DEADLINE, || {
            if d.stderr_text().contains(&framed) {
                return Some(false);
            }
            d.exit_status().map(|_| true)
        });
        if ended != Some(true) {
            d.stop();
            seeder.stop();
            fail(
                &format!(
                    "{label}: {}",
                    if ended == Some(false) {
                        "the honest seeder was banned for pieces another peer's unasked blocks \
                         corrupted; the download cannot finish"
                    } else {
                        "the download did not finish"
                    }
                ),
                &[&d, &seeder],
            );
        }
        swarm.finish(&d, &[&seeder]);
        match poisoner.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => fail(&format!("{label}: {e}"), &[&d, &seeder]),
            Err(p) => std::panic::resume_unwind(p),
        }
    });
}

/// Plays an honest seed for the downloader that dials `listener`: every request answered,
/// until bitfetch hangs up. Returns the blocks served and the haves it was sent.
fn fake_seed(swarm: &Swarm, listener: &TcpListener) -> Result<(u32, u32), String> {
    let mut wire = Wire::new(accept_within(listener, DEADLINE)?);
    wire.read_handshake(Duration::from_secs(30))?;
    wire.send(&handshake(&swarm.info_hash, &peer_id("HX"), NO_EXTENSIONS))?;
    wire.send(&frame(
        id::BITFIELD,
        &full_bitfield(swarm.content.piece_count()),
    ))?;
    wire.send(&frame(id::UNCHOKE, &[]))?;
    let (mut served, mut haves) = (0, 0);
    let deadline = Instant::now() + DEADLINE;
    while let Ok(next) = wire.next(deadline) {
        match next {
            Some(Msg::Request { piece, offset, len }) => {
                let data = swarm
                    .content
                    .block(piece, offset, len)
                    .ok_or("a request outside the torrent")?;
                if wire.send(&msg_piece(piece, offset, data)).is_err() {
                    break;
                }
                served += 1;
            }
            Some(Msg::Have(_)) => haves += 1,
            Some(_) => {}
            None => return Err(format!("bitfetch still connected after {DEADLINE:?}")),
        }
    }
    Ok((served, haves))
}

/// A seed has every piece: a `have` would only cost both ends a wakeup per piece, so it is
/// sent none (peers that lack pieces do get them: `poisoned_blocks` waits for one).
#[test]
fn a_seed_is_sent_no_haves() {
    let label = "no haves to a seed";
    let swarm = Swarm::new(PEER_SIZE, label, &[]);
    let listener = TcpListener::bind((next_loopback(), 0)).expect("bind the fake seed");
    let d = swarm.downloader(&[s("--peer"), s(listener.local_addr().expect("local_addr"))]);
    let (served, haves) = match fake_seed(&swarm, &listener) {
        Ok(counts) => counts,
        Err(e) => fail(&format!("{label}: {e}"), &[&d]),
    };
    swarm.finish(&d, &[]);
    let blocks = swarm.content.blocks().len() as u32;
    assert!(
        served >= blocks,
        "{label}: the fake seed served {served} of {blocks} blocks"
    );
    assert_eq!(haves, 0, "{label}: the seed was sent {haves} haves");
}

// =============================================================================================
// Peers against a seeder
// =============================================================================================

/// Dials the seeder, shakes hands, optionally asks to be unchoked, sends `attack`, and
/// requires the seeder to close the connection.
fn attack_seeder(
    seeder: SocketAddr,
    info_hash: &[u8; 20],
    reserved: [u8; 8],
    unchoked_first: bool,
    attack: &[u8],
) -> Result<String, String> {
    let mut wire = Wire::dial(next_loopback(), seeder).map_err(|e| format!("cannot dial: {e}"))?;
    wire.send(&handshake(info_hash, &peer_id("HX"), reserved))?;
    wire.read_handshake(Duration::from_secs(30))?;
    if unchoked_first {
        wire.send(&frame(id::INTERESTED, &[]))?;
        if wire
            .wait_for(Duration::from_secs(30), |m| *m == Msg::Unchoke)?
            .is_none()
        {
            return Err("the seeder never unchoked an interested peer".into());
        }
    }
    let _ = wire.send(attack);
    wire.expect_closed(CLOSE_DEADLINE)
}

/// The control for [`attack_seeder`]: the same steps with a valid request get the right
/// block, and the connection stays open (so "closed" above means "dropped for the attack").
fn honest_leecher(
    seeder: SocketAddr,
    content: &Content,
    info_hash: &[u8; 20],
) -> Result<String, String> {
    let mut wire = Wire::dial(next_loopback(), seeder).map_err(|e| format!("cannot dial: {e}"))?;
    wire.send(&handshake(info_hash, &peer_id("HX"), NO_EXTENSIONS))?;
    wire.read_handshake(Duration::from_secs(30))?;
    wire.send(&frame(id::INTERESTED, &[]))?;
    if wire
        .wait_for(Duration::from_secs(30), |m| *m == Msg::Unchoke)?
        .is_none()
    {
        return Err("the seeder never unchoked an interested peer".into());
    }
    let last = content.piece_count() - 1;
    let len = content.piece_size(last);
    wire.send(&msg_request(last, 0, len))?;
    let got = wire.wait_for(DEADLINE, |m| matches!(m, Msg::Piece { .. }))?;
    if got
        != Some(Msg::Piece {
            piece: last,
            offset: 0,
            len: len as usize,
        })
    {
        return Err(format!("asked for piece {last} (0, {len}), got {got:?}"));
    }
    match wire.idle_until(Instant::now() + Duration::from_secs(3)) {
        Ok(()) => Ok("served and kept".into()),
        Err(e) => Err(format!("an honest leecher was dropped: {e}")),
    }
}

#[test]
fn peers_breaking_the_rules_are_dropped_by_a_seeder_that_keeps_serving() {
    let swarm = Swarm::new(PEER_SIZE, "seeder under attack", &[]);
    let (seeder, s_addr) = swarm.seeder(false, &[s("--upload-slots"), s("64")]);
    let mem = MemWatch::start(&seeder);
    let block = vec![0x42u8; BLOCK as usize];
    let last = PEER_PIECES - 1;
    let bitfield_bytes = PEER_PIECES.div_ceil(8) as usize;
    let flood: Vec<u8> = (0..3000)
        .flat_map(|i| msg_request(i % 64, 0, BLOCK))
        .collect();
    let attacks: Vec<(&str, [u8; 8], bool, Vec<u8>)> = vec![
        (
            "length prefix 0xFFFFFFFF",
            NO_EXTENSIONS,
            false,
            vec![0xff; 4],
        ),
        (
            "length prefix 2^31 on a piece",
            NO_EXTENSIONS,
            false,
            frame_len(1 << 31, id::PIECE, 1024),
        ),
        (
            "request past the last piece",
            NO_EXTENSIONS,
            true,
            msg_request(PEER_PIECES, 0, BLOCK),
        ),
        (
            "request of piece 0xFFFFFFFF",
            NO_EXTENSIONS,
            true,
            msg_request(u32::MAX, 0, BLOCK),
        ),
        (
            "request at an offset past its piece",
            NO_EXTENSIONS,
            true,
            msg_request(0, PIECE_LEN, BLOCK),
        ),
        (
            "request over 16 KiB",
            NO_EXTENSIONS,
            true,
            msg_request(0, 0, BLOCK + 1),
        ),
        (
            "request of zero bytes",
            NO_EXTENSIONS,
            true,
            msg_request(0, 0, 0),
        ),
        (
            "request of 0xFFFFFFFF bytes",
            NO_EXTENSIONS,
            true,
            msg_request(0, 0, u32::MAX),
        ),
        (
            "request past the short last piece",
            NO_EXTENSIONS,
            true,
            msg_request(last, 0, BLOCK),
        ),
        (
            "request whose end overflows 32 bits",
            NO_EXTENSIONS,
            true,
            msg_request(0, u32::MAX - 10, BLOCK),
        ),
        (
            "have past the last piece",
            NO_EXTENSIONS,
            false,
            msg_have(PEER_PIECES),
        ),
        (
            "bitfield one byte too long",
            NO_EXTENSIONS,
            false,
            frame(id::BITFIELD, &vec![0xff; bitfield_bytes + 1]),
        ),
        (
            "bitfield with spare bits set",
            NO_EXTENSIONS,
            false,
            frame(id::BITFIELD, &vec![0xff; bitfield_bytes]),
        ),
        (
            "piece with an index past the last piece",
            NO_EXTENSIONS,
            false,
            msg_piece(PEER_PIECES, 0, &block),
        ),
        ("3000 requests while choked", NO_EXTENSIONS, false, flood),
        (
            "Fast have-all without negotiating it",
            NO_EXTENSIONS,
            false,
            frame(id::HAVE_ALL, &[]),
        ),
        (
            "Fast reject of piece 0xFFFFFFFF",
            FAST,
            false,
            msg_reject(u32::MAX, 0, BLOCK),
        ),
        (
            "extension message of 16 MiB",
            NO_EXTENSIONS,
            false,
            frame_len(16 << 20, id::EXTENDED, 1024),
        ),
    ];
    let info_hash = swarm.info_hash;
    let outcomes: Vec<(&str, Result<String, String>)> = thread::scope(|scope| {
        let running: Vec<_> = attacks
            .iter()
            .map(|(label, reserved, unchoke, attack)| {
                (
                    *label,
                    scope.spawn(move || {
                        attack_seeder(s_addr, &info_hash, *reserved, *unchoke, attack)
                    }),
                )
            })
            .collect();
        running
            .into_iter()
            .map(|(label, h)| {
                (
                    label,
                    h.join().unwrap_or_else(|_| Err("the case panicked".into())),
                )
            })
            .chain(std::iter::once((
                "control: an honest leecher",
                honest_leecher(s_addr, &swarm.content, &info_hash),
            )))
            .collect()
    });
    // Whatever happened to those connections, the seeder still serves a real downloader.
    let d = swarm.downloader(&[s("--peer"), s(s_addr)]);
    swarm.finish(&d, &[&seeder]);
    let failures: Vec<String> = outcomes
        .iter()
        .filter_map(|(label, r)| r.as_ref().err().map(|e| format!("{label}: {e}")))
        .collect();
    if !failures.is_empty() {
        fail(
            &format!(
                "the seeder kept {} hostile connection(s):\n  {}",
                failures.len(),
                failures.join("\n  ")
            ),
            &[&seeder],
        );
    }
    mem.assert_bounded("seeder under attack", &|| seeder.diagnostics());
    assert!(
        seeder.is_running(),
        "the seeder died\n{}",
        seeder.diagnostics()
    );
    seeder.stop();
    assert_exit_code(&seeder, 0, &[]);
}

// ---------------------------------------------------------------------------------------------
// Fifty at once
// ---------------------------------------------------------------------------------------------

/// 50 peers connect to `target` at once. Half send a length prefix far over any frame cap
/// (each must be dropped); the other half declare a frame of exactly 1 MiB with an unknown id,
/// send half of it and stall — legal so far, and each costs bitfetch at most a frame buffer.
/// Returns the stalled connections (to hold during the real transfer) and the failures.
fn fifty_at_once(target: SocketAddr, info_hash: [u8; 20]) -> (Vec<Wire>, Vec<String>) {
    const OVERSIZE: [u32; 5] = [u32::MAX, 1 << 31, (1 << 31) - 1, 1 << 28, 1 << 24];
    let barrier = Barrier::new(50);
    thread::scope(|scope| {
        let running: Vec<_> = (0..50usize)
            .map(|i| {
                let barrier = &barrier;
                scope.spawn(move || -> Result<Option<Wire>, String> {
                    let dialled = Wire::dial(next_loopback(), target).map_err(|e| e.to_string());
                    barrier.wait();
                    let mut wire = dialled?;
                    wire.send(&handshake(&info_hash, &peer_id("HX"), NO_EXTENSIONS))?;
                    if i % 2 == 0 {
                        let mut attack = OVERSIZE[i / 2 % OVERSIZE.len()].to_be_bytes().to_vec();
                        attack.push(if i % 4 == 0 { id::PIECE } else { 99 });
                        attack.extend(std::iter::repeat_n(0x33, 64 * 1024));
                        let _ = wire.send(&attack);
                        wire.expect_closed(CLOSE_DEADLINE)
                            .map(|_| None)
                            .map_err(|e| format!("peer {i} (oversize prefix): {e}"))
                    } else {
                        let _ = wire.send(&frame_len(1 << 20, 99, 512 * 1024));
                        Ok(Some(wire))
                    }
                })
            })
            .collect();
        let mut held = Vec::new();
        let mut failures = Vec::new();
        for h in running {
            match h.join() {
                Ok(Ok(Some(w))) => held.push(w),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => failures.push(e),
                Err(_) => failures.push("an attacker thread panicked".into()),
            }
        }
        (held, failures)
    })
}

/// The party attacked by [`fifty_at_once`] kept its memory bounded and every check passed.
fn fifty_survived(
    label: &str,
    held: usize,
    failures: &[String],
    mem: &MemWatch,
    party: &ChildGuard,
) {
    eprintln!("{label}: {held} stalled 1 MiB frames held open");
    mem.assert_bounded(label, &|| party.diagnostics());
    assert!(
        failures.is_empty(),
        "{label}:\n  {}\n{}",
        failures.join("\n  "),
        party.diagnostics()
    );
}

#[test]
fn fifty_peers_with_oversize_frames_at_once() {
    run_parallel(vec![
        case("against a seeder", || {
            let swarm = Swarm::new(PEER_SIZE, "fifty vs seeder", &[]);
            let (seeder, s_addr) = swarm.seeder(false, &[]);
            let mem = MemWatch::start(&seeder);
            let (held, failures) = fifty_at_once(s_addr, swarm.info_hash);
            // While 25 stalled frames are held open, a real downloader is served.
            let d = swarm.downloader(&[s("--peer"), s(s_addr)]);
            swarm.finish(&d, &[&seeder]);
            fifty_survived("fifty vs seeder", held.len(), &failures, &mem, &seeder);
            assert!(
                seeder.is_running(),
                "the seeder died\n{}",
                seeder.diagnostics()
            );
            drop(held);
            seeder.stop();
            assert_exit_code(&seeder, 0, &[]);
        }),
        case("against a downloader", || {
            let swarm = Swarm::new(PEER_SIZE, "fifty vs downloader", &[]);
            // A peer that never answers keeps the downloader waiting until the seeder comes.
            let holder = TcpListener::bind((next_loopback(), 0)).expect("bind the holder");
            let d = swarm.downloader(&[s("--peer"), s(holder.local_addr().expect("local_addr"))]);
            let mem = MemWatch::start(&d);
            let target = wait_for_listening(&d);
            let (held, failures) = fifty_at_once(target, swarm.info_hash);
            let (seeder, _) = swarm.seeder(false, &[s("--peer"), s(target)]);
            swarm.finish(&d, &[&seeder]);
            fifty_survived("fifty vs downloader", held.len(), &failures, &mem, &d);
            drop(held);
        }),
    ]);
}
