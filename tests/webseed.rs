//! Web seeds (BEP 19), end to end: bitfetch downloading over HTTP from nginx (an honest static
//! file server) and from a scripted misbehaving server (`support::web_seed`), with torrents
//! made by mktorrent (`-w`), by libtorrent (`add_url_seed`) and by the tests' own encoder.
//!
//! - downloads from a web seed alone (no tracker, no peer, no DHT), single- and multi-file,
//!   every URL form (file URL, directory URL with and without `/`, names that need
//!   percent-encoding), `url-list` as a string and as a list, `--web-seed`, HTTPS with
//!   `--ca-file`;
//! - a web seed and a slow peer together: both contribute;
//! - every fault of the misbehaving server beside an honest source: the download completes,
//!   byte-correct, exit 0 and no panic, with one `web_seed_error` naming the bad seed, and the
//!   bad seed stops being asked;
//! - `--no-web-seeds`.
//!
//! Everything listens on loopback addresses, ports chosen by the kernel.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use support::bencode::B;
use support::cli::{
    ChildGuard, assert_exit_code, events, field, of_kind, run_ok, spawn_bitfetch, start_seeder,
    tool,
};
use support::clients::{TestCa, require_tool};
use support::files::{pseudo_random, scratch_dir, write_file};
use support::magnet::Link;
use support::nginx::{StaticOptions, StaticServer};
use support::torrent::{PieceMap, info_bytes};
use support::web_seed::{Behaviour, WebSeedServer};
use support::{Diagnose, url_encode};

/// A download must finish well within this (files are a few MiB on loopback).
const RUN_DEADLINE: Duration = Duration::from_secs(60);
/// bitfetch's own `--timeout`: it gives up (exit 7) before the test's hang guard fires.
const BITFETCH_TIMEOUT: &str = "45s";
/// Exit code of a download with no peer to be had.
const EXIT_NO_PEERS: i32 = 6;
/// Exit code of `--timeout`.
const EXIT_TIMEOUT: i32 = 7;

// =============================================================================================
// Content on disk, served from a directory, and torrents of it
// =============================================================================================

/// Files under `DIR/www/pub/NAME` (one file, or a directory NAME holding a tree), which the
/// web seeds serve at `/pub/NAME[/REL]`.
struct Content {
    dir: TempDir,
    name: String,
    multi: bool,
    /// (path inside the torrent, bytes); for a single-file torrent one entry named NAME.
    files: Vec<(String, Vec<u8>)>,
}

impl Content {
    fn single(name: &str, size: usize, seed: u64) -> Content {
        let content = Content {
            dir: scratch_dir(),
            name: name.to_owned(),
            multi: false,
            files: vec![(name.to_owned(), pseudo_random(size, seed))],
        };
        write_file(&content.data_path(), &content.files[0].1);
        content
    }

    fn multi(name: &str, tree: &[(&str, usize)], seed: u64) -> Content {
        let content = Content {
            dir: scratch_dir(),
            name: name.to_owned(),
            multi: true,
            files: tree
                .iter()
                .enumerate()
                .map(|(i, (rel, size))| ((*rel).to_owned(), pseudo_random(*size, seed + i as u64)))
                .collect(),
        };
        for (rel, data) in &content.files {
            write_file(&content.data_path().join(rel), data);
        }
        content
    }

    /// What nginx serves: DIR/www.
    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    /// DIR/www/pub/NAME: the file, or the top directory.
    fn data_path(&self) -> PathBuf {
        self.www().join("pub").join(&self.name)
    }

    fn size(&self) -> u64 {
        self.files.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// `/pub/NAME` or `/pub/NAME/REL`, percent-decoded (what a server registers).
    fn plain_path(&self, rel: &str) -> String {
        if self.multi {
            format!("/pub/{}/{rel}", self.name)
        } else {
            format!("/pub/{}", self.name)
        }
    }

    /// The same path, every component percent-encoded (what goes into a URL).
    fn url_path(&self, rel: &str) -> String {
        self.plain_path(rel)
            .split('/')
            .map(|c| url_encode(c.as_bytes()))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Registers every file on the scripted server, each with `script`.
    fn serve_on(&self, server: &WebSeedServer, script: &[Behaviour]) {
        for (rel, data) in &self.files {
            server.serve(&self.plain_path(rel), data, script);
        }
    }

    /// `mktorrent -l 15 [-w URL,…] -o OUT DATA`: no tracker at all, 32 KiB pieces.
    fn mktorrent(&self, web_seeds: &[String], label: &str) -> PathBuf {
        let out = self.dir.path().join(format!("{label}.torrent"));
        let mut command = Command::new(require_tool("mktorrent"));
        command.args(["-l", "15"]);
        if !web_seeds.is_empty() {
            command.arg("-w").arg(web_seeds.join(","));
        }
        command.arg("-o").arg(&out).arg(self.data_path());
        run_ok("mktorrent", &mut command);
        out
    }

    /// A trackerless torrent of this content whose `url-list` is `url_list` (a string, a
    /// list, or absent), written by the tests' own encoder around mktorrent's info
    /// dictionary.
    fn torrent_with(&self, url_list: Option<B>, label: &str) -> PathBuf {
        let plain = self.mktorrent(&[], &format!("{label}-plain"));
        let info = info_bytes(&plain);
        let mut bytes = b"d4:info".to_vec();
        bytes.extend_from_slice(&info);
        if let Some(list) = url_list {
            bytes.extend_from_slice(b"8:url-list");
            list.encode_into(&mut bytes);
        }
        bytes.push(b'e');
        let out = self.dir.path().join(format!("{label}.torrent"));
        fs::write(&out, bytes).expect("write the torrent");
        out
    }

    /// A fresh, empty download directory.
    fn out(&self, label: &str) -> PathBuf {
        let d = self.dir.path().join("out").join(label);
        fs::create_dir_all(&d).expect("create the download directory");
        d
    }

    /// Where `download -o OUT` puts the file at `rel`.
    fn downloaded(&self, out: &Path, rel: &str) -> PathBuf {
        if self.multi {
            out.join(&self.name).join(rel)
        } else {
            out.join(&self.name)
        }
    }

    /// Every file downloaded into `out`, byte for byte, or a failure with everyone's
    /// diagnostics.
    fn assert_downloaded(&self, out: &Path, parts: &[&dyn Diagnose]) {
        for (rel, data) in &self.files {
            let path = self.downloaded(out, rel);
            let problem =
                match fs::read(&path) {
                    Err(e) => Some(format!("cannot read {}: {e}", path.display())),
                    Ok(got) if got.len() != data.len() => Some(format!(
                        "{} is {} bytes, expected {}",
                        path.display(),
                        got.len(),
                        data.len()
                    )),
                    Ok(got) => got.iter().zip(data).position(|(a, b)| a != b).map(|at| {
                        format!("{} differs from the original at byte {at}", path.display())
                    }),
                };
            if let Some(problem) = problem {
                support::fail(&problem, parts);
            }
        }
    }
}

// =============================================================================================
// Running bitfetch
// =============================================================================================

/// `bitfetch download SOURCE -o OUT --json --bind 127.0.0.1 --port 0 --no-dht --timeout …
/// EXTRA…`: no tracker is involved unless the torrent has one, no peer unless EXTRA has one.
fn download(source: &str, out: &Path, extra: &[String]) -> ChildGuard {
    download_within(source, out, BITFETCH_TIMEOUT, extra)
}

/// [`download`] with another `--timeout`.
fn download_within(source: &str, out: &Path, timeout: &str, extra: &[String]) -> ChildGuard {
    let mut args: Vec<String> = vec![
        "download".into(),
        source.into(),
        "-o".into(),
        support::path_arg(out),
        "--json".into(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--port".into(),
        "0".into(),
        "--no-dht".into(),
        "--timeout".into(),
        timeout.into(),
    ];
    args.extend(extra.iter().cloned());
    spawn_bitfetch("bitfetch download", &args)
}

fn path_str(p: &Path) -> String {
    support::path_arg(p)
}

/// Waits for the download to end with exit 0 (no panic, no signal) and a `finished` event;
/// returns its events.
fn expect_success(guard: &ChildGuard, parts: &[&dyn Diagnose]) -> Vec<Value> {
    guard.wait(RUN_DEADLINE, parts);
    assert_exit_code(guard, 0, parts);
    let evs = events(guard);
    if of_kind(&evs, "finished").next().is_none() {
        guard.fail("exit 0 but no `finished` event", parts);
    }
    evs
}

/// The `finished` event.
fn finished(events: &[Value]) -> &Value {
    of_kind(events, "finished")
        .next()
        .expect("a `finished` event")
}

/// `web_seed_bytes` of the `finished` event.
fn finished_web_seed_bytes(events: &[Value]) -> u64 {
    field(finished(events), "web_seed_bytes")
}

/// The `web_seed_error` events whose `url` is `url` or lies under it.
fn web_seed_errors<'a>(events: &'a [Value], url: &str) -> Vec<&'a Value> {
    of_kind(events, "web_seed_error")
        .filter(|e| e["url"].as_str().is_some_and(|u| u.starts_with(url)))
        .collect()
}

/// Every `web_seed_error` event, for failure messages.
fn all_web_seed_errors(events: &[Value]) -> String {
    of_kind(events, "web_seed_error")
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

// =============================================================================================
// The support servers on their own (checked with curl, before bitfetch is involved)
// =============================================================================================

/// `curl -s -o BODY -D HEADERS [ARGS…] URL`: (status line and headers, body).
fn curl(dir: &Path, url: &str, args: &[&str]) -> (String, Vec<u8>) {
    let body = dir.join("curl-body");
    let headers = dir.join("curl-headers");
    let _ = fs::remove_file(&body);
    let mut all: Vec<String> = vec![
        "-s".into(),
        "--max-time".into(),
        "10".into(),
        "-o".into(),
        path_str(&body),
        "-D".into(),
        path_str(&headers),
    ];
    all.extend(args.iter().map(|s| (*s).to_owned()));
    all.push(url.to_owned());
    let run = tool("curl", dir, &all);
    run.assert_no_crash();
    (
        fs::read_to_string(&headers).unwrap_or_default(),
        fs::read(&body).unwrap_or_default(),
    )
}

fn status_of(headers: &str) -> u16 {
    headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn support_servers_answer_curl_as_scripted() {
    let content = Content::multi(
        "tree name",
        &[("a b.bin", 100_000), ("x/#y%.bin", 70_000)],
        11,
    );
    let scratch = scratch_dir();
    let dir = scratch.path();
    let data = &content.files[0].1;

    // nginx: the whole file, a range (206 and the right bytes), a percent-encoded name.
    let nginx = StaticServer::start(&content.www());
    let url = nginx.url(&content.url_path("a b.bin"));
    let (h, body) = curl(dir, &url, &[]);
    assert_eq!(status_of(&h), 200, "nginx: {h}\n{}", nginx.diagnostics());
    assert_eq!(&body, data, "nginx served other bytes");
    let (h, body) = curl(dir, &url, &["-r", "1000-40999"]);
    assert_eq!(status_of(&h), 206, "nginx range: {h}");
    assert!(h.contains("Content-Range: bytes 1000-40999/100000"), "{h}");
    assert_eq!(body, data[1000..41000]);
    let (h, body) = curl(
        dir,
        &nginx.url(&content.url_path("x/#y%.bin")),
        &["-r", "0-9"],
    );
    assert_eq!(status_of(&h), 206, "nginx, an encoded name: {h}");
    assert_eq!(body, content.files[1].1[..10]);
    assert!(nginx.requests() >= 3, "{}", nginx.diagnostics());

    // The scripted server: each behaviour as it says.
    let server = WebSeedServer::start("selftest");
    let cases: Vec<(Behaviour, u16)> = vec![
        (Behaviour::Honest, 206),
        (Behaviour::IgnoreRange, 200),
        (Behaviour::WrongContentRange, 206),
        (Behaviour::ShortBody, 206),
        (Behaviour::NotFound, 404),
        (
            Behaviour::RetryAfter {
                status: 503,
                secs: 7,
            },
            503,
        ),
        (
            Behaviour::RetryAfter {
                status: 429,
                secs: 3,
            },
            429,
        ),
        (Behaviour::Gzip, 206),
        (Behaviour::HugeHeaders, 206),
        (Behaviour::RedirectLoop, 302),
        (Behaviour::WrongBytes, 206),
    ];
    for (i, (behaviour, want)) in cases.iter().enumerate() {
        let path = format!("/f {i}.bin");
        server.serve(&path, data, &[*behaviour]);
        let url = server.url(&format!("/f%20{i}.bin"));
        let (h, body) = curl(dir, &url, &["-r", "16384-49151"]);
        let context = || format!("{behaviour:?}: {h}\n{}", server.diagnostics());
        assert_eq!(status_of(&h), *want, "{}", context());
        match behaviour {
            Behaviour::Honest => {
                assert!(h.contains("Content-Range: bytes 16384-49151/100000"));
                assert_eq!(body, data[16384..49152], "{}", context());
            }
            Behaviour::IgnoreRange => assert_eq!(&body, data, "{}", context()),
            Behaviour::WrongContentRange => {
                assert!(h.contains("Content-Range: bytes 32768-65535/100000"));
                assert_eq!(body, data[32768..65536], "{}", context());
            }
            Behaviour::ShortBody => assert_eq!(body, data[16384..16384 + 16384]),
            Behaviour::RetryAfter { secs, .. } => {
                assert!(h.contains(&format!("Retry-After: {secs}")), "{}", context())
            }
            Behaviour::Gzip => {
                assert!(h.contains("Content-Encoding: gzip"), "{}", context());
                assert_eq!(&body[..2], &[0x1f, 0x8b], "{}", context());
            }
            Behaviour::HugeHeaders => assert!(h.len() >= 64 * 1024, "{}", context()),
            Behaviour::RedirectLoop => assert!(h.contains("Location: http://"), "{}", context()),
            Behaviour::WrongBytes => {
                let flipped: Vec<u8> = data[16384..49152].iter().map(|b| !b).collect();
                assert_eq!(body, flipped, "{}", context());
            }
            _ => {}
        }
        assert_eq!(
            server.count(*behaviour),
            1 + usize::from(i == 6),
            "{}",
            context()
        );
    }
    // Redirects followed by curl loop until its limit: every hop is counted.
    server.serve("/loop", data, &[Behaviour::RedirectLoop]);
    let (h, _) = curl(dir, &server.url("/loop"), &["-L", "--max-redirs", "5"]);
    assert_eq!(status_of(&h), 302, "{h}");
    assert_eq!(server.count_path("/loop"), 6, "{}", server.diagnostics());
    // A script: first a 503, then honest; an unknown path is a 404.
    server.serve(
        "/later",
        data,
        &[
            Behaviour::RetryAfter {
                status: 503,
                secs: 1,
            },
            Behaviour::Honest,
        ],
    );
    assert_eq!(status_of(&curl(dir, &server.url("/later"), &[]).0), 503);
    let (h, body) = curl(dir, &server.url("/later"), &[]);
    assert_eq!((status_of(&h), &body), (200, data), "{h}");
    assert_eq!(status_of(&curl(dir, &server.url("/nothing"), &[]).0), 404);
    // The slow ones: a drip (curl gives up after 2 s) and an endless body (until the cap or
    // curl's 2 s).
    for behaviour in [Behaviour::Drip, Behaviour::EndlessBody] {
        let path = format!("/{}", behaviour.name());
        server.serve(&path, data, &[behaviour]);
        let started = Instant::now();
        let (h, body) = curl(dir, &server.url(&path), &["-r", "0-99", "--max-time", "2"]);
        match behaviour {
            Behaviour::Drip => {
                assert!(
                    started.elapsed() >= Duration::from_millis(1900),
                    "drip ended early"
                );
                assert_eq!(status_of(&h), 206, "{h}");
                assert!(body.len() <= 3, "drip sent {} bytes in 2 s", body.len());
            }
            _ => {
                assert_eq!(status_of(&h), 200, "{h}");
                assert!(
                    body.len() > 100_000,
                    "endless sent only {} bytes",
                    body.len()
                );
            }
        }
    }
}

// =============================================================================================
// From a web seed alone: no tracker, no peer, no DHT
// =============================================================================================

/// Fails unless `web_seed_bytes` of the `finished` event is at most what the web seeds
/// really sent (`sent`: body bytes from their own logs).
fn assert_web_seed_bytes_at_most(events: &[Value], sent: u64, parts: &[&dyn Diagnose]) {
    let fin = finished(events);
    let ws = field(fin, "web_seed_bytes");
    if ws > sent {
        support::fail(
            &format!(
                "finished says web_seed_bytes {ws}, but the web seeds sent only {sent} body                  bytes in all: {fin}"
            ),
            parts,
        );
    }
}

/// Asserts that the whole download came from web seeds, and no more was counted than nginx
/// sent.
fn assert_all_from_nginx(
    content: &Content,
    nginx: &StaticServer,
    events: &[Value],
    parts: &[&dyn Diagnose],
) {
    assert_all_from_web_seeds(content, events, parts);
    assert_web_seed_bytes_at_most(events, nginx.body_bytes_sent(), parts);
}

/// Asserts that the whole download came from web seeds.
fn assert_all_from_web_seeds(content: &Content, events: &[Value], parts: &[&dyn Diagnose]) {
    let fin = finished(events);
    let (ws, transferred) = (field(fin, "web_seed_bytes"), field(fin, "transferred"));
    if ws < content.size() || transferred < ws {
        support::fail(
            &format!(
                "finished says web_seed_bytes {ws}, transferred {transferred}; expected \
                 web_seed_bytes ≥ the size ({}) and ≤ transferred: {fin}",
                content.size()
            ),
            parts,
        );
    }
}

#[test]
fn single_file_mktorrent_file_url_from_nginx_alone() {
    let content = Content::single("data.bin", 3 * 1024 * 1024 + 12_345, 1);
    let nginx = StaticServer::start(&content.www());
    let url = nginx.url(&content.url_path(""));
    // mktorrent writes one web seed as a string.
    let torrent = content.mktorrent(std::slice::from_ref(&url), "file-url");
    let raw = fs::read(&torrent).expect("read the torrent");
    let needle = format!("8:url-list{}:{url}", url.len());
    assert!(
        raw.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "mktorrent did not write url-list as a string"
    );
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);
    let ranged = nginx
        .access_lines()
        .iter()
        .filter(|l| l.contains("/pub/data.bin") && l.contains("\" 206 "))
        .count();
    assert!(
        ranged > 0,
        "nginx answered no range request\n{}",
        nginx.diagnostics()
    );
    assert!(
        of_kind(&evs, "web_seed_error").next().is_none(),
        "an honest nginx gave web seed errors:\n{}",
        all_web_seed_errors(&evs)
    );
}

#[test]
fn multi_file_mktorrent_directory_url_without_slash_from_nginx_alone() {
    let content = Content::multi(
        "tree",
        &[
            ("one.bin", 700_001),
            ("sub/two.bin", 1_048_576),
            ("sub/deeper/three.bin", 33_333),
            ("empty.bin", 0),
            ("four.bin", 500_000),
        ],
        2,
    );
    let nginx = StaticServer::start(&content.www());
    // The directory holding NAME, without a trailing slash: NAME/PATH is appended after one.
    let url = nginx.url("pub");
    let torrent = content.mktorrent(std::slice::from_ref(&url), "dir-url");
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);
    let lines = nginx.access_lines();
    for rel in ["one.bin", "sub/two.bin", "sub/deeper/three.bin", "four.bin"] {
        let wanted = format!("GET /pub/tree/{rel} ");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&wanted) && !l.contains("\" 404 ")),
            "nginx was never asked for {wanted:?}\n{}",
            nginx.diagnostics()
        );
    }
}

#[test]
fn single_file_directory_url_with_slash_from_the_command_line() {
    let content = Content::single("payload one.bin", 1024 * 1024 + 7, 3);
    let nginx = StaticServer::start(&content.www());
    // No url-list in the torrent: the seed comes from --web-seed, a directory URL ending in
    // `/` to which the torrent's name is appended (percent-encoded).
    let torrent = content.torrent_with(None, "no-url-list");
    let out = content.out("dl");
    let dl = download(
        &path_str(&torrent),
        &out,
        &["--web-seed".into(), nginx.url("pub/")],
    );
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);
    assert!(
        nginx
            .access_lines()
            .iter()
            .any(|l| l.contains("GET /pub/payload%20one.bin ")),
        "the name was not appended percent-encoded\n{}",
        nginx.diagnostics()
    );
}

#[test]
fn names_that_need_percent_encoding_url_list_as_a_list() {
    let content = Content::multi(
        "web seed #1 100% é",
        &[
            ("a b.bin", 100_000),
            ("hash #2/c%41d.bin", 65_536),
            ("日本/ü+plus.bin", 80_000),
            ("q?x=1&y.bin", 50_001),
        ],
        4,
    );
    let nginx = StaticServer::start(&content.www());
    // url-list as a list of one directory URL ending in `/`.
    let torrent = content.torrent_with(Some(B::List(vec![B::str(nginx.url("pub/"))])), "list");
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);
    let lines = nginx.access_lines();
    let not_found: Vec<&String> = lines.iter().filter(|l| l.contains("\" 404 ")).collect();
    assert!(
        not_found.is_empty(),
        "requests nginx could not map to a file (bad percent-encoding): {not_found:#?}"
    );
}

#[test]
fn https_web_seed_needs_the_ca_file() {
    let content = Content::single("secure.bin", 1024 * 1024, 5);
    let ca = TestCa::make();
    let nginx = StaticServer::start_with(
        &content.www(),
        StaticOptions {
            tls: Some(&ca),
            ..StaticOptions::default()
        },
    );
    let url = nginx.url(&content.url_path(""));
    assert!(url.starts_with("https://"));
    let torrent = content.mktorrent(std::slice::from_ref(&url), "https");

    let out = content.out("with-ca");
    let dl = download(
        &path_str(&torrent),
        &out,
        &["--ca-file".into(), path_str(&ca.ca_pem)],
    );
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);

    // Without the CA the certificate is not trusted: a web seed error, never a download.
    let out = content.out("without-ca");
    let dl = download_within(&path_str(&torrent), &out, "6s", &[]);
    dl.wait(RUN_DEADLINE, &[&nginx]);
    let code = dl.exit_status().and_then(|s| s.code());
    if !matches!(code, Some(EXIT_NO_PEERS | EXIT_TIMEOUT)) {
        assert_exit_code(&dl, EXIT_TIMEOUT, &[&nginx]);
    }
    let evs = events(&dl);
    let errors = web_seed_errors(&evs, &url);
    if errors.is_empty() {
        dl.fail("an untrusted certificate gave no web_seed_error", &[&nginx]);
    }
}

// =============================================================================================
// Torrents made by libtorrent
// =============================================================================================

/// A torrent of `content` made by libtorrent's `create_torrent` (32 KiB pieces) with one web
/// seed; `v1_only` or libtorrent 2's default (hybrid v1+v2 with BEP 47 pad files).
fn libtorrent_torrent(content: &Content, url: &str, v1_only: bool, label: &str) -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    assert!(
        python.is_file(),
        "/usr/bin/python3 (Debian's, with python3-libtorrent) is missing: run scripts/test"
    );
    let out = content.dir.path().join(format!("{label}.torrent"));
    let script = r#"
import os, sys
import libtorrent as lt
src, out, url, mode = sys.argv[1:5]
fs = lt.file_storage()
lt.add_files(fs, src)
flags = lt.create_torrent.v1_only if mode == "v1" else 0
ct = lt.create_torrent(fs, 32768, flags=flags)
ct.add_url_seed(url)
lt.set_piece_hashes(ct, os.path.dirname(src))
with open(out, "wb") as f:
    f.write(lt.bencode(ct.generate()))
"#;
    let mut command = Command::new(python);
    command
        .arg("-c")
        .arg(script)
        .arg(content.data_path())
        .arg(&out)
        .arg(url)
        .arg(if v1_only { "v1" } else { "default" });
    run_ok("python3 libtorrent create_torrent", &mut command);
    out
}

/// How many BEP 47 pad files (attr `p`) the torrent lists.
fn pad_files(torrent: &Path) -> usize {
    let raw = fs::read(torrent).expect("read the torrent");
    let top = support::bencode::Value::decode(&raw).expect("bencoded");
    top.get("info")
        .and_then(|i| i.get("files"))
        .and_then(|f| f.list())
        .map(|files| {
            files
                .iter()
                .filter(|f| {
                    f.get("attr")
                        .and_then(|a| a.bytes())
                        .is_some_and(|a| a.contains(&b'p'))
                })
                .count()
        })
        .unwrap_or(0)
}

fn libtorrent_tree(seed: u64) -> Content {
    Content::multi(
        "lt tree",
        &[
            ("first.bin", 300_000),
            ("second.bin", 1_000_001),
            ("dir/third.bin", 77_777),
        ],
        seed,
    )
}

#[test]
fn libtorrent_v1_torrent_without_pad_files_from_nginx_alone() {
    let content = libtorrent_tree(6);
    let nginx = StaticServer::start(&content.www());
    let torrent = libtorrent_torrent(&content, &nginx.url("pub/"), true, "lt-v1");
    assert_eq!(pad_files(&torrent), 0, "a v1-only torrent with pad files");
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    let evs = expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    assert_all_from_nginx(&content, &nginx, &evs, &[&dl, &nginx]);
}

/// libtorrent 2's default torrent: hybrid v1+v2, pad files after every file (the web seed has
/// no pad files: their zeros are the client's to make up). Expected to pass once pad files
/// are supported.
#[test]
fn libtorrent_default_torrent_with_pad_files_from_nginx_alone() {
    let content = libtorrent_tree(7);
    let nginx = StaticServer::start(&content.www());
    let torrent = libtorrent_torrent(&content, &nginx.url("pub/"), false, "lt-hybrid");
    assert!(pad_files(&torrent) > 0, "libtorrent made no pad files");
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    expect_success(&dl, &[&nginx]);
    content.assert_downloaded(&out, &[&dl, &nginx]);
    let lines = nginx.access_lines();
    assert!(
        !lines.iter().any(|l| l.contains("/.pad/")),
        "bitfetch asked the web seed for pad files\n{}",
        nginx.diagnostics()
    );
}

// =============================================================================================
// A web seed and a peer together; a magnet's ws=
// =============================================================================================

#[test]
fn web_seed_and_slow_peer_both_contribute() {
    let content = Content::single("both.bin", 4 * 1024 * 1024, 8);
    let nginx = StaticServer::start_with(
        &content.www(),
        StaticOptions {
            limit_rate: Some("64k"),
            ..StaticOptions::default()
        },
    );
    let url = nginx.url(&content.url_path(""));
    let torrent = content.mktorrent(std::slice::from_ref(&url), "both");
    let (seeder, seeder_addr) = start_seeder(
        "bitfetch seeder",
        &torrent,
        &content.data_path(),
        support::net::next_loopback(),
        &["--max-upload-rate", "256K", "--no-dht"],
    );
    let out = content.out("dl");
    let dl = download(
        &path_str(&torrent),
        &out,
        &["--peer".into(), seeder_addr.to_string()],
    );
    let evs = expect_success(&dl, &[&nginx, &seeder]);
    content.assert_downloaded(&out, &[&dl, &nginx, &seeder]);
    assert_web_seed_bytes_at_most(&evs, nginx.body_bytes_sent(), &[&dl, &nginx]);
    let fin = finished(&evs);
    let (ws, transferred) = (field(fin, "web_seed_bytes"), field(fin, "transferred"));
    if ws == 0 || transferred <= ws {
        dl.fail(
            &format!(
                "both sources should have contributed: web_seed_bytes {ws}, transferred \
                 {transferred} ({fin})"
            ),
            &[&nginx, &seeder],
        );
    }
    // While it ran, progress said a web seed was in use.
    let in_use = of_kind(&evs, "progress")
        .any(|p| p["web_seeds"].as_u64().is_some_and(|n| n >= 1) && p["web_seed_bytes"].is_u64());
    if !in_use {
        dl.fail(
            "no progress event said `web_seeds` ≥ 1 (with `web_seed_bytes`)",
            &[&nginx],
        );
    }
}

#[test]
fn magnet_web_seed_from_ws() {
    let content = Content::single("magnet.bin", 2 * 1024 * 1024, 9);
    let nginx = StaticServer::start(&content.www());
    let torrent = content.torrent_with(None, "magnet");
    let pieces = PieceMap::read(&torrent);
    // The metadata comes from a peer (BEP 9), throttled so the data comes from the web seed.
    let (seeder, seeder_addr) = start_seeder(
        "bitfetch seeder",
        &torrent,
        &content.data_path(),
        support::net::next_loopback(),
        &["--max-upload-rate", "64K", "--no-dht"],
    );
    let url = nginx.url(&content.url_path(""));
    let link = Link::new(&pieces.info_hash)
        .name(&content.name)
        .peer(seeder_addr)
        .param("ws", &url);
    let out = content.out("dl");
    let dl = download(&link.uri(), &out, &[]);
    let evs = expect_success(&dl, &[&nginx, &seeder]);
    content.assert_downloaded(&out, &[&dl, &nginx, &seeder]);
    let ws = finished_web_seed_bytes(&evs);
    if ws == 0 {
        dl.fail("the magnet's ws= web seed gave nothing", &[&nginx, &seeder]);
    }
}

// =============================================================================================
// --no-web-seeds
// =============================================================================================

#[test]
fn no_web_seeds_ignores_the_url_list() {
    let content = Content::single("ignored.bin", 256 * 1024, 10);
    let nginx = StaticServer::start(&content.www());
    let torrent = content.mktorrent(&[nginx.url(&content.url_path(""))], "ignored");
    let out = content.out("dl");
    let dl = download_within(
        &path_str(&torrent),
        &out,
        "5s",
        &[
            "--no-web-seeds".into(),
            "--web-seed".into(),
            nginx.url("pub/"),
        ],
    );
    dl.wait(RUN_DEADLINE, &[&nginx]);
    let code = dl.exit_status().and_then(|s| s.code());
    if !matches!(code, Some(EXIT_NO_PEERS | EXIT_TIMEOUT)) {
        assert_exit_code(&dl, EXIT_NO_PEERS, &[&nginx]);
    }
    assert_exit_code(&dl, code.unwrap_or(-1), &[&nginx]);
    assert_eq!(
        nginx.requests(),
        0,
        "--no-web-seeds, yet nginx was asked\n{}",
        nginx.diagnostics()
    );
    assert!(
        !content.downloaded(&out, "").is_file()
            || fs::read(content.downloaded(&out, "")).ok().as_deref() != Some(&content.files[0].1),
        "the data arrived anyway"
    );
}

// =============================================================================================
// Faults, each beside an honest source
// =============================================================================================

/// What a fault case expects of the misbehaving seed.
struct Expect {
    /// At most this many requests reached the bad seed (it was dropped or backed off).
    max_requests: usize,
    /// A `web_seed_error` naming the bad seed must appear.
    notice: bool,
}

/// A download whose url-list names the misbehaving server first and a slow, honest nginx
/// second (so the bad seed gets asked, more than once if it is not dropped).
struct FaultRun {
    content: Content,
    bad: WebSeedServer,
    nginx: StaticServer,
    bad_url: String,
    dl: ChildGuard,
    started: Instant,
}

fn fault_run(content: Content, script: &[Behaviour], label: &str) -> FaultRun {
    fault_run_with(content, script, &[], label)
}

/// [`fault_run`] where the paths in `overrides` (percent-decoded) get their own behaviour.
fn fault_run_with(
    content: Content,
    script: &[Behaviour],
    overrides: &[(String, Behaviour)],
    label: &str,
) -> FaultRun {
    let bad = WebSeedServer::start(label);
    content.serve_on(&bad, script);
    for (path, behaviour) in overrides {
        let rel = path.rsplit('/').next().unwrap_or_default();
        let data = content
            .files
            .iter()
            .find(|(r, _)| content.plain_path(r) == *path)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("no file at {path} ({rel})"));
        bad.serve(path, &data, &[*behaviour]);
    }
    let nginx = StaticServer::start_with(
        &content.www(),
        StaticOptions {
            limit_rate: Some("256k"),
            ..StaticOptions::default()
        },
    );
    let (bad_url, good_url) = if content.multi {
        (bad.url("/pub/"), nginx.url("pub/"))
    } else {
        (
            bad.url(&content.url_path("")),
            nginx.url(&content.url_path("")),
        )
    };
    let torrent = content.torrent_with(
        Some(B::List(vec![B::str(&bad_url), B::str(good_url)])),
        label,
    );
    let out = content.out(label);
    let started = Instant::now();
    let dl = download(&path_str(&torrent), &out, &[]);
    FaultRun {
        content,
        bad,
        nginx,
        bad_url,
        dl,
        started,
    }
}

impl FaultRun {
    fn out(&self, label: &str) -> PathBuf {
        self.content.dir.path().join("out").join(label)
    }

    /// Completes byte-correct with exit 0 and no panic; the notice and the request bound as
    /// `expect` says. Returns the events.
    fn check(&self, label: &str, expect: Expect) -> Vec<Value> {
        let parts: [&dyn Diagnose; 2] = [&self.bad, &self.nginx];
        let evs = expect_success(&self.dl, &parts);
        self.content
            .assert_downloaded(&self.out(label), &[&self.dl, &self.bad, &self.nginx]);
        let errors = web_seed_errors(&evs, &self.bad_url);
        if expect.notice && errors.is_empty() {
            self.dl.fail(
                &format!(
                    "no web_seed_error naming {} (all web_seed_error events:\n{})",
                    self.bad_url,
                    all_web_seed_errors(&evs)
                ),
                &parts,
            );
        }
        for e in &errors {
            let message = e["message"].as_str().unwrap_or_default();
            if message.trim().is_empty() {
                self.dl
                    .fail(&format!("a web_seed_error without a message: {e}"), &parts);
            }
        }
        // Once per fault kind per seed, not once per retry.
        if errors.len() > 3 {
            self.dl.fail(
                &format!(
                    "{} web_seed_error events for one bad seed (one per fault kind expected):\n{}",
                    errors.len(),
                    all_web_seed_errors(&evs)
                ),
                &parts,
            );
        }
        let asked = self.bad.served().len();
        if asked > expect.max_requests {
            self.dl.fail(
                &format!(
                    "the bad seed was asked {asked} times (at most {} expected: it should \
                     have been dropped or backed off)",
                    expect.max_requests
                ),
                &parts,
            );
        }
        if asked == 0 {
            self.dl.fail(
                "the bad seed was never asked: the case tested nothing",
                &parts,
            );
        }
        evs
    }

    /// `web_seed_bytes` is no more than both seeds sent (checked last, so a miscount does
    /// not hide the other findings).
    fn assert_counted(&self) {
        assert_web_seed_bytes_at_most(
            &events(&self.dl),
            self.bad.body_bytes() + self.nginx.body_bytes_sent(),
            &[&self.dl, &self.bad, &self.nginx],
        );
    }
}

fn fault_content(label: &str) -> Content {
    Content::single(
        &format!("{label}.bin"),
        3 * 1024 * 1024,
        support::seed_of(label),
    )
}

/// One fault on every request, beside an honest nginx.
fn fault_case(behaviour: Behaviour, max_requests: usize) -> FaultRun {
    let label = behaviour.name();
    let run = fault_run(fault_content(label), &[behaviour], label);
    run.check(
        label,
        Expect {
            max_requests,
            notice: true,
        },
    );
    run
}

#[test]
fn fault_wrong_bytes_fail_the_hash_and_the_seed_is_dropped() {
    let run = fault_case(Behaviour::WrongBytes, 12);
    let hash_failed = of_kind(&events(&run.dl), "hash_failed").count();
    eprintln!(
        "wrong bytes: {hash_failed} hash_failed events, {} requests",
        run.bad.served().len()
    );
}

#[test]
fn fault_wrong_content_range() {
    fault_case(Behaviour::WrongContentRange, 12).assert_counted();
}

#[test]
fn fault_short_body() {
    fault_case(Behaviour::ShortBody, 12).assert_counted();
}

#[test]
fn fault_endless_body() {
    let run = fault_case(Behaviour::EndlessBody, 12);
    let streamed = run.bad.body_bytes();
    assert!(
        streamed <= 64 << 20,
        "bitfetch read {streamed} bytes of endless bodies\n{}",
        run.bad.diagnostics()
    );
    run.assert_counted();
}

#[test]
fn fault_gzip_content_encoding_is_refused() {
    fault_case(Behaviour::Gzip, 12).assert_counted();
}

#[test]
fn fault_oversize_headers() {
    fault_case(Behaviour::HugeHeaders, 12).assert_counted();
}

#[test]
fn fault_redirect_loop() {
    fault_case(Behaviour::RedirectLoop, 60).assert_counted();
}

#[test]
fn fault_429_retry_after_is_honoured() {
    let run = fault_case(
        Behaviour::RetryAfter {
            status: 429,
            secs: 2,
        },
        12,
    );
    assert_backed_off(&run, Duration::from_secs(2));
    run.assert_counted();
}

#[test]
fn fault_503_retry_after_then_honest() {
    let label = "503-then-honest";
    let run = fault_run(
        fault_content(label),
        &[
            Behaviour::RetryAfter {
                status: 503,
                secs: 1,
            },
            Behaviour::Honest,
        ],
        label,
    );
    run.check(
        label,
        Expect {
            max_requests: 200,
            notice: true,
        },
    );
    assert_backed_off(&run, Duration::from_secs(1));
    run.assert_counted();
}

/// No request reached the bad seed within `retry_after` of a refusal (allowing those already
/// under way when the refusal was sent: 100 ms).
fn assert_backed_off(run: &FaultRun, retry_after: Duration) {
    let served = run.bad.served();
    let refusals: Vec<Instant> = served
        .iter()
        .filter(|s| matches!(s.behaviour, Behaviour::RetryAfter { .. }))
        .map(|s| s.at)
        .collect();
    let margin = Duration::from_millis(100);
    let slack = retry_after.mul_f64(0.9);
    for refused in &refusals {
        let early: Vec<&support::web_seed::Served> = served
            .iter()
            .filter(|s| s.at > *refused + margin && s.at < *refused + slack)
            .collect();
        if !early.is_empty() {
            run.dl.fail(
                &format!(
                    "asked again {:?} after a Retry-After of {retry_after:?}",
                    early[0].at - *refused
                ),
                &[&run.bad, &run.nginx],
            );
        }
    }
}

#[test]
fn fault_drip_one_byte_a_second() {
    let label = "drip";
    let run = fault_run(fault_content(label), &[Behaviour::Drip], label);
    // The honest nginx alone takes a few seconds; a download waiting on the drip would take
    // days.
    let evs = run.check(
        label,
        Expect {
            max_requests: 12,
            notice: false,
        },
    );
    let took = run.started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the drip held the download up for {took:?}"
    );
    eprintln!(
        "drip: finished in {took:?}; web_seed_error for it: {}",
        all_web_seed_errors(&evs)
    );
    run.assert_counted();
}

#[test]
fn fault_404_for_one_file_skips_only_that_file() {
    let label = "404-one-file";
    let content = Content::multi(
        label,
        &[
            ("a.bin", 1024 * 1024),
            ("missing.bin", 1024 * 1024 + 5),
            ("c.bin", 1024 * 1024 + 77),
        ],
        support::seed_of(label),
    );
    let missing = content.plain_path("missing.bin");
    let run = fault_run_with(
        content,
        &[Behaviour::Honest],
        &[(missing.clone(), Behaviour::NotFound)],
        label,
    );
    run.check(
        label,
        Expect {
            max_requests: 400,
            notice: true,
        },
    );
    let asked_missing = run.bad.count_path(&missing);
    assert!(
        asked_missing <= 4,
        "the 404 file was asked {asked_missing} times of that seed\n{}",
        run.bad.diagnostics()
    );
    let others: usize = ["a.bin", "c.bin"]
        .iter()
        .map(|rel| {
            run.bad
                .served()
                .iter()
                .filter(|s| s.path == run.content.plain_path(rel) && s.body_bytes > 0)
                .count()
        })
        .sum();
    if others == 0 {
        support::fail(
            "after the 404, the seed was not used for the other files",
            &[&run.dl, &run.bad, &run.nginx],
        );
    }
    run.assert_counted();
}

#[test]
fn ignore_range_200_alone_is_streamed() {
    // The server answers every Range with 200 and the whole (small) file: the wanted span is
    // taken from the stream. It is the only source.
    let content = Content::single("whole.bin", 1024 * 1024 + 3, 12);
    let server = WebSeedServer::start("ignore-range");
    content.serve_on(&server, &[Behaviour::IgnoreRange]);
    let url = server.url(&content.url_path(""));
    let torrent = content.mktorrent(std::slice::from_ref(&url), "ignore-range");
    let out = content.out("dl");
    let dl = download(&path_str(&torrent), &out, &[]);
    let evs = expect_success(&dl, &[&server]);
    content.assert_downloaded(&out, &[&dl, &server]);
    assert_all_from_web_seeds(&content, &evs, &[&dl, &server]);
    assert_web_seed_bytes_at_most(&evs, server.body_bytes(), &[&dl, &server]);
    eprintln!(
        "ignore-range: {} requests; web_seed_error: {}",
        server.served().len(),
        all_web_seed_errors(&evs)
    );
}

#[test]
fn fault_ignore_range_beside_honest_source() {
    fault_case(Behaviour::IgnoreRange, 400).assert_counted();
}

#[test]
fn web_seed_option_takes_only_http_and_https() {
    let content = Content::single("cli.bin", 1000, 13);
    let torrent = content.torrent_with(None, "cli");
    let out = content.out("dl");
    let run = support::cli::run_bitfetch(
        "bitfetch download --web-seed ftp://…",
        [
            "download".to_owned(),
            path_str(&torrent),
            "-o".to_owned(),
            path_str(&out),
            "--web-seed".to_owned(),
            "ftp://127.0.0.1/cli.bin".to_owned(),
        ],
        support::COMMAND_DEADLINE,
    );
    run.assert_code(2);
    assert!(
        run.error_line()
            .is_some_and(|l| l.contains("ftp://127.0.0.1/cli.bin")),
        "the error does not name the URL: {}",
        run.dump()
    );
}
