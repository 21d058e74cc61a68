//! bitfetch in shells and CI, end to end: the three ways to name a torrent (path, `-`, URL),
//! what stdout carries (paths, `--json` events, streamed content), file selection, the
//! timeouts, and the exit codes a script relies on.
//!
//! Everything runs on loopback, each client on its own 127.0.0.x address, against `bitfetch
//! seed`, a one-request HTTP server, or a scripted fake seeder (tests/shell_support). Waits are
//! polls with generous deadlines; nothing depends on speed.
//!
//! Exit codes produced here: 0, 2, 3, 4, 5, 7, 8, 130. (1 is `verify`'s, in cli_roundtrip.rs;
//! 6 is in trackers.rs.)

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cli::{ChildGuard, bitfetch, bitfetch_command, run_ok};
use support::fake_peer::{FakeEvent, FakeSeeder, Misbehaviour, SeedSpec};
use support::fake_tracker::{HttpAction, HttpTracker};
use support::files::walk;
use support::net::{free_port as closed_port, next_loopback};
use support::torrent::{PIECE_LEN, Payload as Content, info_hash_hex};
use support::{DEADLINE, Diagnose, poll_until};

/// bitfetch's cap on a .torrent (`bencode::Limits::METAINFO.max_size`, used by `cli.rs` for
/// files, stdin and URLs alike).
const TORRENT_CAP: u64 = 64 << 20;

/// `bitfetch seed` for `content` on `ip`, any port; returns the guard and its address once
/// it listens.
fn start_seeder(content: &Content, ip: Ipv4Addr, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    support::cli::start_seeder(
        "bitfetch seed",
        &content.torrent,
        &content.source_dir(),
        ip,
        extra,
    )
}

/// Loopback network options of a download: `--bind IP --port 0 --peer P...`.
fn net_args(ip: Ipv4Addr, peers: &[SocketAddr]) -> Vec<String> {
    let mut args: Vec<String> = vec!["--bind".into(), ip.to_string(), "--port".into(), "0".into()];
    for p in peers {
        args.push("--peer".into());
        args.push(p.to_string());
    }
    args
}

/// Arguments of a loopback download: `download TORRENT` and [`net_args`].
fn download_args(torrent: &str, ip: Ipv4Addr, peers: &[SocketAddr]) -> Vec<String> {
    let mut args: Vec<String> = vec!["download".into(), torrent.into()];
    args.extend(net_args(ip, peers));
    args
}

/// What a one-request HTTP server saw and did.
struct HttpLog {
    request_line: Option<String>,
    /// Bytes the kernel accepted before the client went away (head included).
    body_sent: u64,
}

/// An HTTP server that answers with `action`.
fn serve(action: HttpAction) -> HttpTracker {
    let server = HttpTracker::start("torrent URL");
    server.set_script(move |_, _| action.clone());
    server
}

/// Waits (a bounded time) for the server's request, and for the end of a streamed reply.
fn finish(server: HttpTracker, streamed: bool) -> HttpLog {
    let requests = server
        .wait_for(DEADLINE, |r| !r.is_empty())
        .unwrap_or_default();
    let streams = if streamed {
        poll_until(DEADLINE, || {
            Some(server.streams()).filter(|s| !s.is_empty())
        })
        .unwrap_or_default()
    } else {
        Vec::new()
    };
    HttpLog {
        request_line: requests.first().map(|r| r.request_line()),
        body_sent: streams.iter().map(|s| s.written).sum(),
    }
}

/// A multi-file tree whose files do not line up with 32 KiB pieces, so every unselected file
/// shares a piece with a selected neighbour.
const TREE: &[(&str, usize)] = &[
    ("a.bin", 40_000),
    ("b.iso", 70_001),
    ("docs/c.txt", 5_000),
    ("docs/d.iso", 33_333),
    ("e.bin", 20_000),
];

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// stdout must be exactly `expected` paths, one per line, each line ended, nothing else
/// (order aside: the README does not promise one).
fn assert_stdout_paths(run: &ChildGuard, expected: &[PathBuf], parts: &[&dyn Diagnose]) {
    let text = run.stdout_text();
    let mut got: Vec<&str> = text.lines().collect();
    got.sort_unstable();
    let mut want: Vec<String> = expected.iter().map(|p| s(p)).collect();
    want.sort_unstable();
    if got != want || !text.ends_with('\n') {
        run.fail(
            &format!("stdout should be exactly these paths, one per line: {want:#?}"),
            parts,
        );
    }
}

fn assert_same_bytes(what: &str, expected: &[u8], actual: &[u8], run: &ChildGuard) {
    if expected == actual {
        return;
    }
    let at = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    run.fail(
        &format!(
            "{what}: {} bytes expected, {} got, first difference at byte {at} (piece {})",
            expected.len(),
            actual.len(),
            at as u64 / u64::from(PIECE_LEN)
        ),
        &[],
    );
}

fn assert_file(path: &Path, expected: &[u8], run: &ChildGuard) {
    let actual = std::fs::read(path)
        .unwrap_or_else(|e| run.fail(&format!("cannot read {}: {e}", path.display()), &[]));
    assert_same_bytes(&s(path), expected, &actual, run);
}

/// Parses every stdout line as JSON; any other line fails the test.
fn json_lines(run: &ChildGuard) -> Vec<Value> {
    run.stdout_text()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| {
                run.fail(&format!("stdout line is not JSON ({e}): {line:?}"), &[])
            })
        })
        .collect()
}

fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or("")
}

fn u64_field(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("`{field}` is not a non-negative integer in {v}"))
}

/// `download --list`: (index, size, path) per line.
fn list(content: &Content) -> Vec<(usize, u64, String)> {
    let run = ChildGuard::bitfetch(["download", &s(&content.torrent), "--list"]);
    run.expect_code(0, &[]);
    run.stdout_text()
        .lines()
        .map(|line| {
            let mut parts = line.split_whitespace();
            let parsed = (|| {
                let index = parts.next()?.parse().ok()?;
                let size = parts.next()?.parse().ok()?;
                let path = parts.next()?.to_owned();
                parts.next().is_none().then_some((index, size, path))
            })();
            parsed.unwrap_or_else(|| run.fail(&format!("bad --list line {line:?}"), &[]))
        })
        .collect()
}

/// The `--list` index of the file at `rel`.
fn index_of(listing: &[(usize, u64, String)], rel: &str) -> usize {
    listing
        .iter()
        .find(|(_, _, p)| p == rel)
        .map(|(i, _, _)| *i)
        .unwrap_or_else(|| panic!("{rel} not in --list output {listing:?}"))
}

/// Every entry under `dir`, relative, sorted (directories too).
fn tree_of(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
}

/// The temporary directory `-O -` without `-o` keeps its data in (see session::download).
/// The temporary directory of a `-O -` run without `-o`: `bitfetch-PID-HASH16-RANDOM` (the
/// random part makes it unguessable); `None` while there is none.
fn stream_temp_dir(pid: u32, info_hash: &str) -> Option<PathBuf> {
    let prefix = format!("bitfetch-{pid}-{}-", &info_hash[..16]);
    std::fs::read_dir(std::env::temp_dir())
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
}

// =============================================================================================
// Inputs: a path, stdin, a URL
// =============================================================================================

/// Downloads `content` from `seeder`, naming the torrent with `source` (bytes on stdin when
/// given) and `-q`; checks the bytes, that stdout is just the path, and that stderr is empty.
fn download_from(
    content: &Content,
    seeder: &dyn Diagnose,
    peer: SocketAddr,
    label: &str,
    source: &[&str],
    stdin: Option<Vec<u8>>,
) {
    let out = content.scratch(&format!("out-{label}"));
    // The torrent goes last, so that `-- -` can name stdin.
    let mut args: Vec<String> = vec!["download".into()];
    args.extend(net_args(next_loopback(), &[peer]));
    args.extend(["-o".into(), s(&out), "-q".into()]);
    args.extend(source.iter().map(|a| (*a).to_owned()));
    let (run, _) = ChildGuard::start(&mut bitfetch_command(&args), stdin, false);
    run.expect_code(0, &[seeder]);
    let file = content.downloaded(&out, "");
    assert_stdout_paths(&run, std::slice::from_ref(&file), &[seeder]);
    assert_file(&file, content.bytes(), &run);
    if !run.stderr_text().is_empty() {
        run.fail(
            &format!("{label}: with -q, a successful run must leave stderr empty"),
            &[seeder],
        );
    }
}

#[test]
fn torrent_from_a_path_downloads() {
    let content = Content::single("path.bin", 1_000_000 + 321, 1);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    download_from(
        &content,
        &seeder,
        addr,
        "path",
        &[&s(&content.torrent)],
        None,
    );
}

#[test]
fn torrent_from_a_url_downloads() {
    let content = Content::single("url.bin", 1_000_000 + 321, 2);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let torrent = std::fs::read(&content.torrent).expect("read the torrent");
    let server = serve(HttpAction::ok(torrent));
    let url = server.url("/x.torrent");
    download_from(&content, &seeder, addr, "url", &[&url], None);
    let log = finish(server, false);
    assert!(
        log.request_line
            .as_deref()
            .is_some_and(|l| l.starts_with("GET /x.torrent ")),
        "the URL download asked for {:?}",
        log.request_line
    );
}

/// A magnet link works wherever a torrent does: on the command line, on standard input, and
/// behind a URL that redirects to it (as "download" buttons do).
#[test]
fn a_magnet_link_on_stdin_and_behind_a_redirect_downloads() {
    let content = Content::single("magnet-in.bin", 700_000 + 11, 4);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let mut link = bitfetch_command(["magnet", &s(&content.torrent)]);
    let link = run_ok("bitfetch magnet", &mut link);
    let link = link.trim().to_owned();
    assert!(link.starts_with("magnet:?xt=urn:btih:"), "{link}");
    download_from(&content, &seeder, addr, "magnet-arg", &[&link], None);
    download_from(
        &content,
        &seeder,
        addr,
        "magnet-stdin",
        &["--", "-"],
        Some(format!("{link}\n").into_bytes()),
    );
    let server = serve(HttpAction::redirect(link));
    let url = server.url("/get?id=1");
    download_from(&content, &seeder, addr, "magnet-redirect", &[&url], None);
    let log = finish(server, false);
    assert!(
        log.request_line
            .as_deref()
            .is_some_and(|l| l.starts_with("GET /get?id=1 ")),
        "the URL download asked for {:?}",
        log.request_line
    );
}

/// The README: "`download` takes a .torrent path, `-` for a .torrent on standard input, ...".
#[test]
fn torrent_on_stdin_as_dash_downloads_and_bad_input_is_exit_3() {
    let content = Content::single("stdin.bin", 1_000_000 + 321, 3);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let torrent = std::fs::read(&content.torrent).expect("read the torrent");
    // After `--` (last), a lone `-` can only be the positional.
    download_from(
        &content,
        &seeder,
        addr,
        "stdin-after-dashes",
        &["--", "-"],
        Some(torrent.clone()),
    );
    for (label, stdin) in [
        ("garbage", b"this is not bencode".to_vec()),
        ("empty", Vec::new()),
    ] {
        let out = content.scratch(&format!("out-{label}"));
        let mut args: Vec<String> = vec!["download".into()];
        args.extend(net_args(next_loopback(), &[addr]));
        args.extend(["-o".into(), s(&out), "--".into(), "-".into()]);
        let (run, _) = ChildGuard::start(&mut bitfetch_command(&args), Some(stdin), false);
        run.expect_code(3, &[&seeder]);
        if run.error_line().is_none() {
            run.fail(
                &format!("{label} on stdin: no `bitfetch: error:` line"),
                &[],
            );
        }
        assert!(
            !out.exists(),
            "{label} on stdin: the output directory was created"
        );
    }

    // As documented, and as other tools take it: `bitfetch download -o DIR -`.
    download_from(&content, &seeder, addr, "stdin", &["-"], Some(torrent));
}

#[test]
fn missing_torrent_file_and_closed_port_url_are_io_errors() {
    let content = Content::single("src.bin", 50_000, 4);
    let ip = next_loopback();
    let closed = format!("http://127.0.0.1:{}/x.torrent", closed_port());
    let missing = s(&content.scratch("no-such.torrent"));
    for (label, source) in [("missing file", missing), ("closed port", closed)] {
        let out = content.scratch(&format!("out-{}", label.replace(' ', "-")));
        let mut args = download_args(&source, ip, &[]);
        args.extend(["-o".into(), s(&out)]);
        let run = ChildGuard::bitfetch(&args);
        run.expect_code(4, &[]);
        let line = run
            .error_line()
            .unwrap_or_else(|| run.fail(&format!("{label}: no `bitfetch: error:` line"), &[]));
        assert!(
            line.contains(&source),
            "{label}: the error should name {source:?}: {line:?}"
        );
        assert!(!out.exists(), "{label}: the output directory was created");
    }
}

#[test]
fn url_errors_404_and_oversize_bodies_use_their_exit_codes() {
    let content = Content::single("url.bin", 50_000, 3);
    let ip = next_loopback();

    // 404, with --json: the error is also the last JSON line, with the exit code.
    let server = serve(HttpAction::status(404, b"not here\r\n"));
    let url = server.url("/gone.torrent");
    let out = content.scratch("out-404");
    let mut args = download_args(&url, ip, &[]);
    args.extend(["-o".into(), s(&out), "--json".into()]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(4, &[]);
    let line = run.error_line().unwrap_or_default();
    assert!(
        line.contains("404") && line.contains(&url),
        "a 404 should be reported with the URL and the status: {line:?}"
    );
    let events = json_lines(&run);
    let last = events
        .last()
        .unwrap_or_else(|| run.fail("no JSON at all", &[]));
    assert_eq!(event(last), "error", "{last}");
    assert_eq!(u64_field(last, "code"), 4, "{last}");
    assert!(last["message"].as_str().is_some_and(|m| m.contains("404")));
    assert!(!out.exists(), "404: the output directory was created");
    drop(server);

    // One byte over the cap with a Content-Length, and a body that never ends.
    for (label, reply) in [
        ("sized", HttpAction::bulk(TORRENT_CAP + 1, true)),
        ("endless", HttpAction::bulk(1 << 30, false)),
    ] {
        let server = serve(reply);
        let out = content.scratch(&format!("out-{label}"));
        let mut args = download_args(&server.url("/big.torrent"), ip, &[]);
        args.extend(["-o".into(), s(&out)]);
        let run = ChildGuard::bitfetch(&args);
        run.expect_code(3, &[]);
        let line = run.error_line().unwrap_or_default();
        assert!(
            line.contains(&TORRENT_CAP.to_string()) || line.contains("limit"),
            "{label}: an oversize torrent should be reported against the cap: {line:?}"
        );
        let log = finish(server, true);
        // Kernel buffers hold a few MiB more than bitfetch read; not the whole GiB.
        assert!(
            log.body_sent <= TORRENT_CAP + (32 << 20),
            "{label}: bitfetch kept reading past its cap ({} bytes sent)",
            log.body_sent
        );
        assert!(!out.exists(), "{label}: the output directory was created");
    }
}

// =============================================================================================
// stdout: paths, quiet, JSON
// =============================================================================================

#[test]
fn stdout_lists_exactly_the_downloaded_paths_and_quiet_keeps_stderr_empty() {
    let content = Content::multi("paths", TREE, 10);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let all: Vec<PathBuf> = TREE
        .iter()
        .map(|(rel, _)| content.downloaded(&content.scratch("out-plain"), rel))
        .collect();

    let out = content.scratch("out-plain");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-o".into(), s(&out)]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&seeder]);
    assert_stdout_paths(&run, &all, &[&seeder]);
    // Not quiet and not a terminal: the talk is on stderr, never on stdout.
    let stderr = run.stderr_text();
    assert!(
        stderr.contains("bitfetch: listening on") && stderr.contains("downloaded"),
        "without -q, stderr should say where it listens and sum up: {stderr:?}"
    );
    for (rel, _) in TREE {
        assert_file(&content.downloaded(&out, rel), content.file(rel), &run);
    }

    let out = content.scratch("out-quiet");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-o".into(), s(&out), "-q".into()]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&seeder]);
    let all: Vec<PathBuf> = TREE
        .iter()
        .map(|(rel, _)| content.downloaded(&out, rel))
        .collect();
    assert_stdout_paths(&run, &all, &[&seeder]);
    if !run.stderr_text().is_empty() {
        run.fail("with -q, a successful run must leave stderr empty", &[]);
    }
}

#[test]
fn json_events_come_in_the_documented_order() {
    const BIG: &[(&str, usize)] = &[
        ("one.bin", 900_000),
        ("two/two.bin", 1_300_001),
        ("three.txt", 77_777),
    ];
    let content = Content::multi("events", BIG, 20);
    // The upload cap only bounds speed from above: the run lasts several seconds, so at least
    // one once-a-second `progress` event must appear.
    let (seeder, addr) = start_seeder(&content, next_loopback(), &["--max-upload-rate", "512K"]);
    let out = content.scratch("out");
    let ip = next_loopback();
    let mut args = download_args(&s(&content.torrent), ip, &[addr]);
    args.extend(["-o".into(), s(&out), "--json".into()]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&seeder]);
    let events = json_lines(&run);
    let fail = |why: &str| -> ! { run.fail(why, &[&seeder]) };
    let known = [
        "start",
        "listening",
        "progress",
        "tracker_error",
        "dht",
        "dht_notice",
        "web_seed_error",
        "peers",
        "peer_banned",
        "hash_failed",
        "disk_changed",
        "notice",
        "file_completed",
        "finished",
        "error",
    ];
    if let Some(e) = events.iter().find(|e| !known.contains(&event(e))) {
        fail(&format!("undocumented event {e}"));
    }
    let count = |name: &str| events.iter().filter(|e| event(e) == name).count();

    // start: first, once, describing the torrent.
    let start = &events[0];
    if event(start) != "start" || count("start") != 1 {
        fail("`start` must be the first event and come once");
    }
    assert_eq!(start["name"], Value::from("events"), "{start}");
    assert_eq!(
        start["info_hash"],
        Value::from(info_hash_hex(&content.torrent)),
        "{start}"
    );
    assert_eq!(u64_field(start, "size"), content.size, "{start}");
    assert_eq!(
        u64_field(start, "pieces"),
        content.pieces_count(),
        "{start}"
    );
    assert_eq!(u64_field(start, "files"), BIG.len() as u64, "{start}");

    // listening: once, on the --bind address.
    let listening: Vec<&Value> = events.iter().filter(|e| event(e) == "listening").collect();
    if listening.len() != 1 {
        fail("`listening` must come exactly once");
    }
    let bound: SocketAddr = listening[0]["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| fail("`listening` has no parsable address"));
    assert_eq!(bound.ip(), IpAddr::V4(ip), "{}", listening[0]);

    // finished: once, with the totals (and last: checked at the very end).
    if count("finished") != 1 || count("error") != 0 {
        fail("a successful run has exactly one `finished` and no `error`");
    }
    let at = events
        .iter()
        .position(|e| event(e) == "finished")
        .expect("counted");
    let finished = &events[at];
    assert_eq!(
        u64_field(finished, "downloaded"),
        content.size,
        "{finished}"
    );
    assert!(finished["uploaded"].is_u64(), "{finished}");
    assert!(
        finished["elapsed"].as_f64().is_some_and(|t| t > 0.0),
        "{finished}"
    );

    // progress: at least one, against the right total, never going backwards.
    let progress: Vec<&Value> = events.iter().filter(|e| event(e) == "progress").collect();
    if progress.is_empty() {
        fail("no `progress` event in a run of several seconds");
    }
    let mut last = 0;
    for p in &progress {
        let done = u64_field(p, "downloaded");
        assert_eq!(u64_field(p, "total"), content.size, "{p}");
        assert!(done >= last && done <= content.size, "{p} after {last}");
        for field in ["rate", "peers", "seeders"] {
            u64_field(p, field);
        }
        last = done;
    }

    // file_completed: each file once, with its full path and size.
    let completed: BTreeMap<String, u64> = events
        .iter()
        .filter(|e| event(e) == "file_completed")
        .map(|e| {
            (
                e["path"].as_str().unwrap_or_default().to_owned(),
                u64_field(e, "size"),
            )
        })
        .collect();
    let want: BTreeMap<String, u64> = BIG
        .iter()
        .map(|(rel, n)| (s(&content.downloaded(&out, rel)), *n as u64))
        .collect();
    assert_eq!(completed, want, "file_completed events");
    assert_eq!(count("file_completed"), BIG.len(), "a file completed twice");
    for (rel, _) in BIG {
        assert_file(&content.downloaded(&out, rel), content.file(rel), &run);
    }

    // `finished` ends the stream, as `error` does a failed run: a reader may stop at it.
    if at + 1 != events.len() {
        fail(&format!(
            "`finished` must be the last line; after it came {:?}",
            &events[at + 1..]
        ));
    }
}

// =============================================================================================
// Streaming: -O -
// =============================================================================================

#[test]
fn stream_to_stdout_is_the_file_and_leaves_no_temporary_directory() {
    let content = Content::single("stream.bin", 2 * 1024 * 1024 + 4_321, 30);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let cwd = content.scratch("cwd");
    std::fs::create_dir(&cwd).expect("mkdir cwd");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-O".into(), "-".into()]);
    let mut command = bitfetch_command(&args);
    command.current_dir(&cwd);
    let (run, _) = ChildGuard::start(&mut command, None, false);
    run.expect_code(0, &[&seeder]);
    assert_same_bytes("streamed stdout", content.bytes(), &run.stdout(), &run);
    let temp = stream_temp_dir(run.pid(), &info_hash_hex(&content.torrent));
    assert!(temp.is_none(), "{temp:?} was left behind");
    assert!(
        tree_of(&cwd).is_empty(),
        "streaming without -o wrote into the working directory: {:?}",
        tree_of(&cwd)
    );
}

#[test]
fn stream_from_two_seeders_is_in_order() {
    let content = Content::single("two.bin", 4 * 1024 * 1024 + 777, 31);
    let (one, a) = start_seeder(&content, next_loopback(), &[]);
    let (two, b) = start_seeder(&content, next_loopback(), &[]);
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[a, b]);
    args.push("--stdout".into());
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&one, &two]);
    assert_same_bytes("streamed stdout", content.bytes(), &run.stdout(), &run);
}

#[test]
fn stream_reorders_pieces_a_seeder_sends_backwards() {
    let content = Content::single("reverse.bin", 1024 * 1024 + 4_321, 32);
    let data = content.bytes();
    let fake = SeedSpec::new(data.to_vec(), u64::from(PIECE_LEN))
        .misbehave(Misbehaviour::Reverse)
        .start(next_loopback());
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[fake.addr()]);
    args.extend(["-O".into(), "-".into()]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&fake]);
    assert_same_bytes("streamed stdout", data, &run.stdout(), &run);
    let order = fake.finish().piece_order();
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "the fake seeder never sent a later piece before an earlier one, so this test proved \
         nothing: {order:?}"
    );
}

#[test]
fn stream_reader_closing_early_ends_bitfetch_with_exit_0() {
    let content = Content::single("head.bin", 4 * 1024 * 1024 + 99, 33);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-O".into(), "-".into()]);
    let (run, pipe) = ChildGuard::start(&mut bitfetch_command(&args), None, true);
    let mut pipe = pipe.expect("stdout handed over");

    // `head -c 1000`: read 1000 bytes, then close the read end. The read runs in a thread so
    // a bitfetch that never writes cannot hang the test (killing it ends the read).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut first = vec![0u8; 1000];
        let got = pipe.read_exact(&mut first).map(|()| first);
        let _ = tx.send(got);
        // The pipe is dropped here: the reader has gone.
    });
    let first = match rx.recv_timeout(DEADLINE) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => run.fail(&format!("reading the first 1000 bytes: {e}"), &[&seeder]),
        Err(_) => run.fail("no 1000 bytes on stdout in time", &[&seeder]),
    };
    assert_same_bytes("first 1000 bytes", &content.bytes()[..1000], &first, &run);
    let hash = info_hash_hex(&content.torrent);
    let temp = stream_temp_dir(run.pid(), &hash);
    assert!(
        temp.as_ref().is_some_and(|t| t.is_dir()) || run.exit_status().is_some(),
        "while streaming, the data should be in $TMPDIR/bitfetch-{}-{}-*",
        run.pid(),
        &hash[..16]
    );

    run.wait(Duration::from_secs(30), &[&seeder]);
    run.expect_code(0, &[&seeder]);
    if let Some(line) = run.error_line() {
        run.fail(&format!("a closed pipe is not an error: {line}"), &[]);
    }
    let left = stream_temp_dir(run.pid(), &hash);
    assert!(left.is_none(), "{left:?} was left behind");
}

#[test]
fn stream_one_file_of_a_multi_file_torrent() {
    let content = Content::multi("pick", TREE, 34);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let listing = list(&content);
    // A middle file: its first and last pieces are shared with its neighbours.
    let rel = "docs/d.iso";
    let n = index_of(&listing, rel);
    let out = content.scratch("out");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend([
        "--file".into(),
        n.to_string(),
        "-O".into(),
        "-".into(),
        "-o".into(),
        s(&out),
    ]);
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&seeder]);
    assert_same_bytes(rel, content.file(rel), &run.stdout(), &run);
    // With -o the streamed file stays, and nothing else does (no neighbour, no spill file).
    assert_eq!(tree_of(&out), content.expected_tree(&[rel]), "files in -o");
    assert_file(&content.downloaded(&out, rel), content.file(rel), &run);
}

// =============================================================================================
// Selection: --list, --select, --only
// =============================================================================================

#[test]
fn list_prints_index_size_and_path_of_every_file() {
    let content = Content::multi("listed", TREE, 40);
    let listing = list(&content);
    let indices: Vec<usize> = listing.iter().map(|(i, _, _)| *i).collect();
    assert_eq!(indices, (1..=TREE.len()).collect::<Vec<_>>(), "{listing:?}");
    let got: BTreeMap<String, u64> = listing.iter().map(|(_, n, p)| (p.clone(), *n)).collect();
    let want: BTreeMap<String, u64> = TREE.iter().map(|(p, n)| ((*p).into(), *n as u64)).collect();
    assert_eq!(got, want, "--list");

    let single = Content::single("alone.iso", 12_345, 41);
    assert_eq!(list(&single), vec![(1, 12_345, "alone.iso".to_owned())]);

    // --list only lists: no output directory, no peers needed, nothing written.
    let out = content.scratch("out");
    let run = ChildGuard::bitfetch([
        "download",
        &s(&content.torrent),
        "--list",
        "-o",
        &s(&out),
        "--port",
        "0",
        "--bind",
        &next_loopback().to_string(),
    ]);
    run.expect_code(0, &[]);
    assert!(!out.exists(), "--list created {}", out.display());
}

/// Downloads `content` with `selection` args and checks the output directory holds exactly
/// `chosen`, byte for byte, and that stdout names exactly them.
fn download_selected(content: &Content, label: &str, selection: &[String], chosen: &[&str]) {
    let (seeder, addr) = start_seeder(content, next_loopback(), &[]);
    let out = content.scratch(label);
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-o".into(), s(&out), "-q".into()]);
    args.extend(selection.iter().cloned());
    let run = ChildGuard::bitfetch(&args);
    run.expect_code(0, &[&seeder]);
    let tree = tree_of(&out);
    if tree != content.expected_tree(chosen) {
        run.fail(
            &format!(
                "{label}: the output directory should hold exactly {chosen:?}, found {tree:#?}"
            ),
            &[&seeder],
        );
    }
    for rel in chosen {
        assert_file(&content.downloaded(&out, rel), content.file(rel), &run);
    }
    let paths: Vec<PathBuf> = chosen
        .iter()
        .map(|rel| content.downloaded(&out, rel))
        .collect();
    assert_stdout_paths(&run, &paths, &[&seeder]);
}

#[test]
fn select_by_index_fetches_only_those_files() {
    let content = Content::multi("sel", TREE, 42);
    let listing = list(&content);
    let by_index = |i: usize| {
        listing
            .iter()
            .find(|(n, _, _)| *n == i)
            .map(|(_, _, p)| p.as_str())
            .expect("listed")
    };
    let chosen = [by_index(1), by_index(3)];
    download_selected(
        &content,
        "out-1-3",
        &["--select".into(), "1,3".into()],
        &chosen,
    );
}

#[test]
fn only_glob_fetches_only_matching_files() {
    let content = Content::multi("glob", TREE, 43);
    // `*` crosses `/` (docs/d.iso); `?` is one character; --only repeats.
    download_selected(
        &content,
        "out-glob",
        &[
            "--only".into(),
            "*.iso".into(),
            "--only".into(),
            "docs/?.txt".into(),
        ],
        &["b.iso", "docs/c.txt", "docs/d.iso"],
    );
}

#[test]
fn misused_shell_options_are_exit_2_before_anything_is_written() {
    let content = Content::multi("misuse", TREE, 44);
    let ip = next_loopback();
    let cases: &[&[&str]] = &[
        &["-O", "out.bin"],
        &["--file", "1"],
        &["--json", "-O", "-", "--file", "1"],
        &["-O", "-"],
        &["--file", "9", "-O", "-"],
        &["--select", "9"],
        &["--select", "3-1"],
        &["--only", "nothing-matches-*"],
        &["--timeout", "soon"],
        &["--stall-timeout", "-1s"],
    ];
    for extra in cases {
        let out = content.scratch("out");
        let mut args = download_args(&s(&content.torrent), ip, &[]);
        args.extend(["-o".into(), s(&out)]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let run = ChildGuard::bitfetch(&args);
        run.expect_code(2, &[]);
        if run.error_line().is_none() {
            run.fail(&format!("{extra:?}: no `bitfetch: error:` line"), &[]);
        }
        assert!(!out.exists(), "{extra:?}: the output directory was created");
        if extra.contains(&"--json") {
            // JSON mode reports even a usage error as its one and last event.
            let events = json_lines(&run);
            assert!(
                events.len() == 1
                    && event(&events[0]) == "error"
                    && u64_field(&events[0], "code") == 2,
                "{extra:?}: stdout should be one `error` event with code 2: {events:?}"
            );
        } else if !run.stdout().is_empty() {
            run.fail(&format!("{extra:?}: nothing belongs on stdout"), &[]);
        }
    }
}

// =============================================================================================
// Timeouts and interruption, against a fake seeder that never sends a block
// =============================================================================================

/// A stalling fake seeder and a download from it with `extra` options, once the download has
/// asked the fake for a block.
fn stalled_download(name: &str, extra: &[&str]) -> (Content, FakeSeeder, ChildGuard) {
    let content = Content::single(name, 200_000, 50);
    let fake = SeedSpec::new(content.bytes().to_vec(), u64::from(PIECE_LEN))
        .misbehave(Misbehaviour::Stall)
        .start(next_loopback());
    let out = content.scratch("out");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[fake.addr()]);
    args.extend(["-o".into(), s(&out)]);
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let run = ChildGuard::bitfetch(&args);
    if !fake.wait_for_request(DEADLINE) {
        run.fail(
            "bitfetch never requested a block from the fake seeder",
            &[&fake],
        );
    }
    (content, fake, run)
}

#[test]
fn stall_timeout_exits_8_with_a_json_error_event() {
    let (_content, fake, run) = stalled_download(
        "stall.bin",
        &["--stall-timeout", "2s", "--timeout", "1h", "--json"],
    );
    run.expect_code(8, &[&fake]);
    let elapsed = run.elapsed_at_exit().expect("exited");
    assert!(
        elapsed >= Duration::from_secs(2),
        "gave up after {elapsed:?}, before the 2 s stall timeout"
    );
    let events = json_lines(&run);
    assert_eq!(events.first().map(event), Some("start"));
    let last = events.last().expect("not empty");
    assert_eq!(
        event(last),
        "error",
        "the error must be the last line: {last}"
    );
    assert_eq!(u64_field(last, "code"), 8, "{last}");
    assert!(events.iter().all(|e| event(e) != "finished"));
}

#[test]
fn timeout_exits_7() {
    let (_content, fake, run) =
        stalled_download("timeout.bin", &["--timeout", "2s", "--stall-timeout", "1h"]);
    run.expect_code(7, &[&fake]);
    let elapsed = run.elapsed_at_exit().expect("exited");
    assert!(
        elapsed >= Duration::from_secs(2),
        "gave up after {elapsed:?}, before the 2 s timeout"
    );
    assert!(
        run.error_line().is_some_and(|l| l.contains("timed out")),
        "{}",
        run.stderr_text()
    );
}

#[test]
fn stall_clock_restarts_when_a_piece_verifies() {
    const STALL: Duration = Duration::from_secs(4);
    const GAP: Duration = Duration::from_secs(1);
    let content = Content::single("paced.bin", 8 * PIECE_LEN as usize + 5, 51);
    // Only pieces 2 and 5: the first served at once, the second GAP later, then silence.
    let mut has = vec![false; content.pieces_count() as usize];
    has[2] = true;
    has[5] = true;
    let fake = SeedSpec::new(content.bytes().to_vec(), u64::from(PIECE_LEN))
        .has(has)
        .misbehave(Misbehaviour::Paced(GAP))
        .start(next_loopback());
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[fake.addr()]);
    args.extend([
        "-o".into(),
        s(&content.scratch("out")),
        "--stall-timeout".into(),
        format!("{}s", STALL.as_secs()),
    ]);
    let run = ChildGuard::bitfetch(&args);
    let mut served = Vec::new();
    while served.len() < 2 {
        let next = fake.wait_for(DEADLINE, |e| match e {
            FakeEvent::Served { piece, at } => Some((*piece, *at)),
            _ => None,
        });
        match next {
            Some(x) => served.push(x),
            None => run.fail(&format!("the fake seeder served only {served:?}"), &[&fake]),
        }
    }
    run.expect_code(8, &[&fake]);
    let last_served = served[1].1;
    let exited = run.exited_at().expect("exited");
    // Piece 5 cannot have verified before its bytes were sent, so a stall clock that restarts
    // on each verified piece cannot fire before last_served + STALL. A clock running from the
    // start (or from the first piece) would have fired at least GAP earlier.
    assert!(
        exited >= last_served + STALL,
        "stalled {:?} after the last piece was sent; the stall timeout is {STALL:?}",
        exited - last_served
    );
}

#[test]
fn sigint_and_sigterm_before_completion_exit_130_within_2s() {
    for (name, signal) in [("SIGINT", libc::SIGINT), ("SIGTERM", libc::SIGTERM)] {
        let (_content, fake, run) = stalled_download(&format!("{name}.bin"), &[]);
        let sent = Instant::now();
        run.signal(signal);
        run.expect_code(130, &[&fake]);
        let took = run.exited_at().expect("exited") - sent;
        assert!(
            took <= Duration::from_secs(2),
            "{name}: exited {took:?} after the signal; the README promises at most 2 s"
        );
    }
}

// =============================================================================================
// I/O error and disk full
// =============================================================================================

#[test]
fn output_path_that_is_a_file_is_an_io_error() {
    let content = Content::single("io.bin", 100_000, 60);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let blocker = content.scratch("not-a-dir");
    std::fs::write(&blocker, b"keep me").expect("write the blocker");
    for out in [blocker.clone(), blocker.join("sub")] {
        let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
        args.extend(["-o".into(), s(&out)]);
        let run = ChildGuard::bitfetch(&args);
        run.expect_code(4, &[&seeder]);
        assert!(
            run.error_line().is_some_and(|l| l.contains(&s(&blocker))),
            "the error should name {}: {}",
            blocker.display(),
            run.stderr_text()
        );
    }
    assert_eq!(std::fs::read(&blocker).expect("read"), b"keep me");
}

/// Runs `bitfetch ARGS` in a private mount namespace (`unshare -rm`) where `dir` is a fresh
/// tmpfs mounted with `options`. Permissions do not bite root, so a read-only or tiny
/// filesystem is the genuine way to make writing fail.
fn bitfetch_on_tmpfs(dir: &Path, options: &str, args: &[String]) -> ChildGuard {
    std::fs::create_dir_all(dir).expect("mkdir the mount point");
    let mut command = Command::new("unshare");
    command
        .args(["-rm", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o "$1" tmpfs "$2" || exit 97; shift 2; exec "$@""#)
        .arg("sh")
        .arg(options)
        .arg(dir)
        .arg(bitfetch())
        .args(args)
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home());
    let (run, _) = ChildGuard::start(&mut command, None, false);
    let status = run.wait(DEADLINE, &[]);
    let stderr = run.stderr_text();
    if status.code() == Some(97) || stderr.starts_with("unshare:") {
        run.fail(
            "cannot mount a private tmpfs here (`unshare -rm` + `mount -t tmpfs` not \
             permitted); this test needs user and mount namespaces",
            &[],
        );
    }
    run
}

/// Downloads a fresh payload (name, size, seed) from a bitfetch seeder into OUT, a private
/// tmpfs mounted with `options`, expecting exit `code`: (the payload, the run, OUT).
fn download_onto_tmpfs(
    (name, size, seed): (&str, usize, u64),
    options: &str,
    code: i32,
) -> (Content, ChildGuard, PathBuf) {
    let content = Content::single(name, size, seed);
    let (seeder, addr) = start_seeder(&content, next_loopback(), &[]);
    let out = content.scratch("out");
    let mut args = download_args(&s(&content.torrent), next_loopback(), &[addr]);
    args.extend(["-o".into(), s(&out)]);
    let run = bitfetch_on_tmpfs(&out, options, &args);
    run.expect_code(code, &[&seeder]);
    (content, run, out)
}

#[test]
fn read_only_output_filesystem_is_an_io_error() {
    let (_content, run, out) = download_onto_tmpfs(("ro.bin", 100_000, 61), "ro,size=1m", 4);
    assert!(
        run.error_line().is_some_and(|l| l.contains(&s(&out))),
        "the error should name the file it could not create: {}",
        run.stderr_text()
    );
}

#[test]
fn full_disk_is_exit_5() {
    // 2 MiB into a 1 MiB filesystem.
    let (_content, run, out) =
        download_onto_tmpfs(("full.bin", 2 * 1024 * 1024 + 1, 62), "size=1m", 5);
    assert!(
        run.error_line()
            .is_some_and(|l| l.contains("no space left") && l.contains("full.bin")),
        "the error should say the disk is full and for which file: {}",
        run.stderr_text()
    );
    // The tmpfs lived in the private namespace only: nothing reached the real directory.
    assert!(tree_of(&out).is_empty(), "{:?}", tree_of(&out));
}
