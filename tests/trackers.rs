//! End-to-end tests of bitfetch's tracker support (issue 4), all on loopback:
//!
//! - opentracker (Debian package) over HTTP and UDP: announce, scrape, and downloads whose
//!   only peer source is the tracker;
//! - HTTPS: opentracker behind nginx terminating TLS with a certificate from a CA the test
//!   makes with openssl; `--ca-file`, `SSL_CERT_FILE`, and the certificate error without them;
//! - scripted HTTP and UDP trackers (in this file's helpers) for what opentracker will not do:
//!   failure reasons, warnings, dictionary peers, `peers6`, redirects, a 500, a timeout,
//!   announce-list tiers and promotion, re-announces, events and transfer counters, tracker
//!   ids, UDP error replies and connection-id reuse, scrape replies.
//!
//! Every process is owned by a guard that kills it by PID; every wait is a poll with a
//! deadline (a hang guard, not a speed expectation).

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::bencode::B;
use support::cli::{
    ChildGuard, assert_exit_code, spawn_bitfetch_env, wait_for_listening, wait_for_stderr,
};
use support::clients::{Nginx, Opentracker, TestCa};
use support::fake_tracker::{
    DeadTrackers, HttpAction, HttpRequest, HttpTracker, UdpAction, UdpTracker, announce_reply,
    compact4, compact6,
};
use support::files::files_equal;
use support::net::{Trap, ip4, next_loopback, v4};
use support::torrent::Payload as Fixture;
use support::{
    DEADLINE, Diagnose, fail, hex as to_hex, path_arg, poll_until, report, show_bytes, strings,
};

/// Payload size: several 32 KiB pieces and a short last one.
const SIZE: u64 = 20 * 32 * 1024 + 1234;
/// How long a short command (`scrape`) may take before it counts as hung.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// How long to wait for announces that a 1 s `--announce-interval` should produce quickly.
const ANNOUNCE_DEADLINE: Duration = Duration::from_secs(30);

// =============================================================================================
// bitfetch processes
// =============================================================================================

/// `bitfetch seed` of the fixture's data on `bind`, port 0; returns once it listens (its data
/// verified).
fn start_seeder(fx: &Fixture, bind: IpAddr, extra: &[String]) -> (ChildGuard, SocketAddr) {
    let mut args = strings(&["seed"]);
    args.push(path_arg(&fx.torrent));
    args.push(path_arg(&fx.data));
    args.extend(strings(&["--port", "0", "--bind"]));
    args.push(bind.to_string());
    args.extend_from_slice(extra);
    let guard = spawn_bitfetch_env(&format!("bitfetch seeder {bind}"), &args, &[]);
    let addr = wait_for_listening(&guard);
    (guard, addr)
}

/// A started `bitfetch download` of the fixture into a fresh directory.
struct Leecher {
    guard: ChildGuard,
    out: PathBuf,
    listen: SocketAddr,
}

impl Diagnose for Leecher {
    fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }
}

/// `bitfetch download` on `bind` (or every address when `None`), port 0, plus `extra`.
fn start_leecher(fx: &Fixture, label: &str, bind: Option<IpAddr>, extra: &[String]) -> Leecher {
    start_leecher_env(fx, label, bind, extra, &[])
}

fn start_leecher_env(
    fx: &Fixture,
    label: &str,
    bind: Option<IpAddr>,
    extra: &[String],
    env: &[(&str, &Path)],
) -> Leecher {
    let out = fx.dir_for(&format!("out-{label}"));
    let mut args = strings(&["download"]);
    args.push(path_arg(&fx.torrent));
    args.push("-o".into());
    args.push(path_arg(&out));
    args.extend(strings(&["--port", "0"]));
    if let Some(ip) = bind {
        args.push("--bind".into());
        args.push(ip.to_string());
    }
    args.extend_from_slice(extra);
    let guard = spawn_bitfetch_env(&format!("bitfetch leecher {label}"), &args, env);
    let listen = if extra.iter().any(|a| a == "--json") {
        support::cli::json_listening(&guard)
    } else {
        wait_for_listening(&guard)
    };
    Leecher { guard, out, listen }
}

/// Waits for the leecher to exit 0 and checks the downloaded bytes.
fn finish_leecher(fx: &Fixture, leecher: &Leecher, parts: &[&dyn Diagnose]) {
    let context = || report("other parties:", parts);
    leecher.guard.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(&leecher.guard, 0, parts);
    if let Err(e) = files_equal(&fx.data, &fx.downloaded(&leecher.out, "")) {
        let mut all: Vec<&dyn Diagnose> = vec![leecher];
        all.extend_from_slice(parts);
        fail(&format!("the download is wrong: {e}"), &all);
    }
}

/// SIGINT to a seeding bitfetch; it must exit 0.
fn interrupt(guard: &ChildGuard, parts: &[&dyn Diagnose]) {
    guard.signal(libc::SIGINT);
    let context = || report("other parties:", parts);
    guard.wait_with_deadline(Duration::from_secs(30), &context);
    assert_exit_code(guard, 0, parts);
}

/// For a `download --seed` leecher: waits until `completed(listen port)` says the tracker
/// saw its `completed` announce, checks the data, and returns (the leecher keeps seeding).
/// Used where a message must be read while bitfetch runs: a one-shot download on loopback
/// can finish before the tracker's reply is handled, and notices that arrive after the
/// download ended are not printed.
fn wait_seeding_complete(
    fx: &Fixture,
    leecher: &Leecher,
    completed: impl Fn(u16) -> bool,
    parts: &[&dyn Diagnose],
) {
    let mut all: Vec<&dyn Diagnose> = vec![leecher];
    all.extend_from_slice(parts);
    let done = poll_until(DEADLINE, || {
        if !leecher.guard.is_running() {
            return Some(false);
        }
        completed(leecher.listen.port()).then_some(true)
    });
    if done != Some(true) {
        fail(
            "the leecher did not announce `completed` (or exited) while seeding",
            &all,
        );
    }
    if let Err(e) = files_equal(&fx.data, &fx.downloaded(&leecher.out, "")) {
        fail(&format!("the download is wrong: {e}"), &all);
    }
}

/// A `--seed` leecher dialling `seeder` directly; waits until it has announced `completed`
/// (as `completed` tells from its listening port) and checks what it downloaded.
fn seeding_leecher(
    fx: &Fixture,
    label: &str,
    seeder: SocketAddr,
    completed: impl Fn(u16) -> bool,
    parts: &[&dyn Diagnose],
) -> Leecher {
    let extra = ["--seed".into(), "--peer".into(), seeder.to_string()];
    let leecher = start_leecher(fx, label, Some(ip4(next_loopback())), &extra);
    wait_seeding_complete(fx, &leecher, completed, parts);
    leecher
}

/// Whether `tracker` has heard from the client listening on `port` that it completed: a
/// `completed` announce, or (to a tracker that never answered it, so never heard `started`
/// either) an announce with nothing left.
fn http_completed(tracker: &HttpTracker, port: u16) -> bool {
    tracker
        .requests()
        .iter()
        .any(|r| r.port() == Some(port) && (r.event() == "completed" || r.num("left") == Some(0)))
}

/// Runs `bitfetch scrape TORRENT ARGS…` to completion.
fn scrape(fx: &Fixture, extra: &[String], env: &[(&str, &Path)]) -> ChildGuard {
    let mut args = strings(&["scrape"]);
    args.push(path_arg(&fx.torrent));
    args.extend_from_slice(extra);
    let guard = spawn_bitfetch_env("bitfetch scrape", &args, env);
    guard.wait_with_deadline(COMMAND_DEADLINE, &String::new);
    guard
}

fn parse_json(guard: &ChildGuard, parts: &[&dyn Diagnose]) -> serde_json::Value {
    let stdout = guard.stdout_text();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        let mut all: Vec<&dyn Diagnose> = vec![guard];
        all.extend_from_slice(parts);
        fail(&format!("scrape --json printed no JSON object ({e})"), &all)
    })
}

/// The requests a client listening on `listen` made (its `port` parameter, and its source
/// address when it is bound to one IPv4 address).
fn from_client(requests: &[HttpRequest], listen: SocketAddr) -> Vec<HttpRequest> {
    requests
        .iter()
        .filter(|r| r.port() == Some(listen.port()))
        .filter(|r| match listen.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => r.from.ip() == IpAddr::V4(ip),
            _ => true,
        })
        .cloned()
        .collect()
}

fn events(requests: &[HttpRequest]) -> Vec<String> {
    requests.iter().map(HttpRequest::event).collect()
}

/// The keys every announce must carry (issue 4), checked on each of `requests`.
fn check_announce_keys(
    fx: &Fixture,
    requests: &[HttpRequest],
    listen: SocketAddr,
    parts: &[&dyn Diagnose],
) {
    assert!(!requests.is_empty(), "no announces to check");
    let first_peer_id = requests[0].param("peer_id").map(<[u8]>::to_vec);
    let first_key = requests[0].text("key");
    for r in requests {
        let bad = |why: String| -> ! { fail(&format!("{why} in {}", r.describe()), parts) };
        if r.path != "/announce" || r.method != "GET" {
            bad(format!(
                "expected GET /announce, got {} {}",
                r.method, r.path
            ));
        }
        if r.param("info_hash") != Some(fx.hash.as_slice()) {
            bad(format!(
                "info_hash is {:?}, expected the raw bytes of {}",
                r.param("info_hash").map(to_hex),
                fx.hash_hex
            ));
        }
        let peer_id = r.param("peer_id").unwrap_or_default();
        if peer_id.len() != 20 || !peer_id.starts_with(b"-BF0100-") {
            bad(format!(
                "peer_id {:?} is not 20 bytes starting with -BF0100-",
                show_bytes(peer_id)
            ));
        }
        if r.param("peer_id").map(<[u8]>::to_vec) != first_peer_id {
            bad("the peer_id changed between announces".into());
        }
        if r.port() != Some(listen.port()) {
            bad(format!("port is not the listening port {}", listen.port()));
        }
        if r.text("compact").as_deref() != Some("1") {
            bad("compact=1 missing".into());
        }
        if r.text("key").is_none() || r.text("key") != first_key {
            bad("key missing or changed between announces".into());
        }
        if r.num("numwant").is_none() {
            bad("numwant missing".into());
        }
        for key in ["uploaded", "downloaded", "left"] {
            if r.num(key).is_none() {
                bad(format!("{key} missing or not a number"));
            }
        }
        for key in ["info_hash", "peer_id", "port", "event"] {
            if r.param_count(key) > 1 {
                bad(format!("{key} appears more than once"));
            }
        }
    }
}

// =============================================================================================
// opentracker: HTTP and UDP
// =============================================================================================

/// Seeder first, then a leecher that learns the seeder from opentracker alone (no --peer);
/// then `bitfetch scrape` over the same protocol.
fn opentracker_swarm(label: &str, url_of: fn(&Opentracker) -> String, seed: u64) {
    let tracker = Opentracker::start();
    let url = url_of(&tracker);
    let fx = Fixture::tiers(&format!("ot-{label}.bin"), SIZE, seed, &[vec![url.clone()]]);
    tracker.allow(&fx.hash_hex);

    let (seeder, _) = start_seeder(&fx, ip4(next_loopback()), &[]);
    // The seeder's announce reached opentracker (checked with the harness's own HTTP scrape).
    tracker.wait_for_swarm(&fx.hash_hex, 1, 1, DEADLINE, &[&seeder]);

    let leecher = start_leecher(&fx, label, Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);

    // The leecher's `completed` and `stopped` reach opentracker: one seeder left, one
    // completed download.
    let settled = poll_until(Duration::from_secs(15), || {
        tracker.scrape(&fx.hash_hex).filter(|&s| s == (1, 0))
    });
    if settled.is_none() {
        fail(
            &format!(
                "opentracker should know 1 seeder and 0 leechers after the leecher exited; \
                 scrape says {:?}",
                tracker.scrape(&fx.hash_hex)
            ),
            &[&tracker, &seeder, &leecher],
        );
    }

    let text = scrape(&fx, &[], &[]);
    assert_exit_code(&text, 0, &[&tracker]);
    let expected = format!("{url}: 1 seeders, 0 leechers, 1 completed");
    if text.stdout_text().trim() != expected {
        fail(
            &format!("scrape over {label}: expected {expected:?}"),
            &[&text, &tracker],
        );
    }
    let json = scrape(&fx, &strings(&["--json"]), &[]);
    assert_exit_code(&json, 0, &[&tracker]);
    let value = parse_json(&json, &[&tracker]);
    let want = serde_json::json!({"trackers": [
        {"url": url, "seeders": 1, "leechers": 0, "completed": 1}
    ]});
    if value != want {
        fail(
            &format!("scrape --json over {label}: expected {want}, got {value}"),
            &[&json, &tracker],
        );
    }
}

#[test]
fn opentracker_http_announce_download_and_scrape() {
    opentracker_swarm("http", Opentracker::announce_url, 11);
}

#[test]
fn opentracker_udp_announce_download_and_scrape() {
    opentracker_swarm("udp", Opentracker::udp_url, 12);
}

// =============================================================================================
// HTTPS: opentracker behind nginx
// =============================================================================================

#[test]
fn https_tracker_needs_the_test_ca() {
    let tracker = Opentracker::start();
    let ca = TestCa::make();
    let nginx = Nginx::start(&ca, tracker.addr());
    let url = nginx.announce_url();
    let fx = Fixture::tiers("https.bin", SIZE, 21, &[vec![url.clone()]]);
    tracker.allow(&fx.hash_hex);
    let ca_args = vec!["--ca-file".to_owned(), path_arg(&ca.ca_pem)];

    // Without the CA: a certificate error, exit 6.
    let bad_scrape = scrape(&fx, &[], &[]);
    assert_exit_code(&bad_scrape, 6, &[&nginx]);
    let line = bad_scrape.stdout_text();
    let line = line.trim();
    let lower = line.to_ascii_lowercase();
    if !line.starts_with(&format!("{url}: "))
        || !["certificate", "unknownissuer", "unknown issuer"]
            .iter()
            .any(|k| lower.contains(k))
    {
        fail(
            "scrape without --ca-file should print `URL: <certificate error>`",
            &[&bad_scrape, &nginx],
        );
    }
    if !bad_scrape.stderr_text().contains("bitfetch: error: ") {
        fail(
            "scrape without an answering tracker should print an error line",
            &[&bad_scrape],
        );
    }

    // opentracker behind the proxy records nginx's address (127.0.0.1) for every peer, so the
    // seeder listens there to be reachable at the address the tracker hands out.
    let (seeder, _) = start_seeder(&fx, ip4(Ipv4Addr::LOCALHOST), &ca_args);
    tracker.wait_for_swarm(&fx.hash_hex, 1, 1, DEADLINE, &[&seeder, &nginx]);

    // A leecher without the CA: a clear certificate error on stderr, and no peers from the
    // tracker (its announce never reached opentracker).
    let blind = start_leecher(&fx, "no-ca", Some(ip4(next_loopback())), &[]);
    let prefix = format!("bitfetch: tracker {url}: ");
    let line = wait_for_stderr(&blind.guard, &prefix, DEADLINE);
    eprintln!("the certificate error line: {line}");
    let lower = line.to_ascii_lowercase();
    if !["certificate", "unknownissuer", "unknown issuer"]
        .iter()
        .any(|k| lower.contains(k))
    {
        fail(
            &format!("the HTTPS error line does not mention the certificate: {line:?}"),
            &[&blind, &nginx],
        );
    }
    // With its only tracker unreachable and no peer known, a one-shot download has nothing to
    // wait for: it ends with exit 6 ("tracker error or no reachable peers").
    if blind.guard.wait_timeout(DEADLINE).is_none() {
        fail(
            "the leecher without a CA should give up (exit 6), not hang",
            &[&blind, &tracker, &seeder, &nginx],
        );
    }
    assert_exit_code(&blind.guard, 6, &[&blind, &nginx]);
    if tracker.scrape(&fx.hash_hex) != Some((1, 0)) {
        fail(
            &format!(
                "after a failed TLS handshake the leecher must not have reached the tracker \
                 (scrape: {:?})",
                tracker.scrape(&fx.hash_hex)
            ),
            &[&blind, &tracker, &seeder, &nginx],
        );
    }
    if files_equal(&fx.data, &fx.downloaded(&blind.out, "")).is_ok() {
        fail(
            "the leecher without a CA got the data: from where?",
            &[&blind, &seeder],
        );
    }
    drop(blind);

    // With --ca-file: the download works through the tracker alone.
    let leecher = start_leecher(&fx, "ca", Some(ip4(next_loopback())), &ca_args);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder, &nginx]);
    if leecher
        .guard
        .stderr_text()
        .contains(&format!("tracker {url}"))
    {
        fail(
            "a tracker error with --ca-file",
            &[&leecher, &tracker, &nginx],
        );
    }

    // Scrape with --ca-file, and with SSL_CERT_FILE.
    let good = scrape(&fx, &ca_args, &[]);
    assert_exit_code(&good, 0, &[&nginx, &tracker]);
    if !good.stdout_text().starts_with(&format!("{url}: 1 seeders")) {
        fail("scrape with --ca-file", &[&good, &nginx, &tracker]);
    }
    let env = scrape(&fx, &[], &[("SSL_CERT_FILE", &ca.ca_pem)]);
    assert_exit_code(&env, 0, &[&nginx, &tracker]);
    if !env.stdout_text().starts_with(&format!("{url}: 1 seeders")) {
        fail("scrape with SSL_CERT_FILE", &[&env, &nginx, &tracker]);
    }
}

// =============================================================================================
// Scripted HTTP tracker: reply shapes
// =============================================================================================

/// A scripted tracker, a torrent announcing to it, and a bitfetch seeder on its own address.
/// Until the test sets a script, every announce gets an empty peer list.
fn scripted_swarm(name: &str, seed: u64) -> (HttpTracker, Fixture, ChildGuard, SocketAddr) {
    let tracker = HttpTracker::start(name);
    let fx = Fixture::tiers(
        &format!("{name}.bin"),
        SIZE,
        seed,
        &[vec![tracker.announce_url()]],
    );
    let (seeder, addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    (tracker, fx, seeder, addr)
}

#[test]
fn failure_reason_is_shown_no_peers_taken_and_peer_still_works() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("failure", 31);
    // The failure reply also lists a peer: bitfetch must not take it.
    let trap = Trap::start_on(Ipv4Addr::LOCALHOST);
    let trap_addr = v4(trap.addr());
    tracker.set_script(move |_, _| {
        HttpAction::ok(
            B::dict(vec![
                (
                    "failure reason",
                    B::str("torrent not registered\x1b[31m here"),
                ),
                ("interval", B::Int(1800)),
                ("peers", B::Bytes(compact4(&[trap_addr]))),
            ])
            .encode(),
        )
    });
    let leecher = seeding_leecher(
        &fx,
        "failure",
        seeder_addr,
        |port| http_completed(&tracker, port),
        &[&tracker, &seeder],
    );
    let prefix = format!(
        "bitfetch: tracker {}: tracker says: torrent not registered",
        tracker.announce_url()
    );
    let line = wait_for_stderr(&leecher.guard, &prefix, Duration::from_secs(10));
    eprintln!("tracker notice: {line}");
    if !line.starts_with(&prefix) {
        fail(&format!("{line:?} does not start {prefix:?}"), &[&leecher]);
    }
    interrupt(&leecher.guard, &[&tracker, &seeder]);
    let stderr = leecher.guard.stderr_text();
    if stderr.contains('\x1b') {
        fail(
            "the tracker's escape sequence reached the terminal unescaped",
            &[&leecher],
        );
    }
    if from_client(&tracker.requests(), leecher.listen).is_empty() {
        fail("the leecher never announced", &[&leecher, &tracker]);
    }
    if !trap.hits().is_empty() {
        fail(
            &format!(
                "bitfetch dialled the peer of a failure reply ({:?})",
                trap.hits()
            ),
            &[&leecher, &tracker],
        );
    }
}

#[test]
fn warning_message_is_shown_and_peers_used() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("warning", 32);
    let peer = v4(seeder_addr);
    tracker.set_script(move |_, _| {
        HttpAction::ok(
            B::dict(vec![
                ("warning message", B::str("be nice (test warning)")),
                ("interval", B::Int(1800)),
                ("peers", B::Bytes(compact4(&[peer]))),
            ])
            .encode(),
        )
    });
    let leecher = start_leecher(&fx, "warning", Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let expected = format!(
        "bitfetch: tracker {}: warning: be nice (test warning)",
        tracker.announce_url()
    );
    if !leecher.guard.stderr_text().lines().any(|l| l == expected) {
        fail(&format!("no `{expected}` line"), &[&leecher, &tracker]);
    }
}

#[test]
fn dictionary_peers_are_dialled() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("dictpeers", 33);
    let ip = seeder_addr.ip().to_string();
    let port = i64::from(seeder_addr.port());
    tracker.set_script(move |_, _| {
        HttpAction::ok(
            B::dict(vec![
                ("interval", B::Int(1800)),
                (
                    "peers",
                    B::List(vec![B::dict(vec![
                        ("peer id", B::str("-XX0000-dictpeer0000")),
                        ("ip", B::str(&ip)),
                        ("port", B::Int(port)),
                    ])]),
                ),
            ])
            .encode(),
        )
    });
    let leecher = start_leecher(&fx, "dictpeers", Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
}

#[test]
fn peers6_on_ipv6_loopback() {
    let tracker = HttpTracker::start("peers6");
    let fx = Fixture::tiers("peers6.bin", SIZE, 34, &[vec![tracker.announce_url()]]);
    let (seeder, seeder_addr) = start_seeder(&fx, IpAddr::V6(Ipv6Addr::LOCALHOST), &[]);
    let six = SocketAddrV6::new(Ipv6Addr::LOCALHOST, seeder_addr.port(), 0, 0);
    tracker.set_script(move |_, _| {
        HttpAction::ok(
            B::dict(vec![
                ("interval", B::Int(1800)),
                ("peers", B::str(b"")),
                ("peers6", B::Bytes(compact6(&[six]))),
            ])
            .encode(),
        )
    });
    // No --bind: the leecher may dial IPv6; its only peer source is the `peers6` entry.
    let leecher = start_leecher(&fx, "peers6", None, &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
}

#[test]
fn redirect_to_the_real_announce_path_is_followed() {
    let tracker = HttpTracker::start("redirect");
    let fx = Fixture::tiers(
        "redirect.bin",
        SIZE,
        35,
        &[vec![tracker.url("/announce-old")]],
    );
    let (seeder, seeder_addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    let base = tracker.url("");
    let peer = v4(seeder_addr);
    tracker.set_script(move |r, _| {
        if r.path == "/announce-old" {
            let query = r.target.split_once('?').map_or("", |(_, q)| q);
            HttpAction::redirect(format!("{base}/announce?{query}"))
        } else if r.path == "/announce" {
            HttpAction::ok(announce_reply(1800, &[peer]))
        } else {
            HttpAction::status(404, b"no such path")
        }
    });
    let leecher = start_leecher(&fx, "redirect", Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let requests = from_client(&tracker.requests(), leecher.listen);
    let old = requests.iter().any(|r| r.path == "/announce-old");
    let new = requests
        .iter()
        .any(|r| r.path == "/announce" && r.param("info_hash") == Some(fx.hash.as_slice()));
    if !(old && new) {
        fail(
            "expected the leecher at /announce-old and then, redirected, at /announce",
            &[&tracker, &leecher],
        );
    }
}

#[test]
fn http_500_is_reported_and_peer_still_works() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("status500", 36);
    tracker.set_script(|_, _| HttpAction::status(500, b"internal trouble"));
    let leecher = seeding_leecher(
        &fx,
        "status500",
        seeder_addr,
        |port| http_completed(&tracker, port),
        &[&tracker, &seeder],
    );
    let prefix = format!("bitfetch: tracker {}: ", tracker.announce_url());
    let line = wait_for_stderr(&leecher.guard, &prefix, Duration::from_secs(10));
    eprintln!("tracker notice: {line}");
    if !line.starts_with(&prefix) || !line.contains("500") {
        fail(
            &format!("{line:?} should start {prefix:?} and mention the status 500"),
            &[&leecher, &tracker],
        );
    }
    interrupt(&leecher.guard, &[&tracker, &seeder]);
}

#[test]
fn scrape_replies_and_a_url_without_scrape() {
    let tracker = HttpTracker::start("scrape");
    let with = tracker.announce_url();
    let without = tracker.url("/tracker");
    let fx = Fixture::tiers(
        "scrape.bin",
        SIZE,
        37,
        &[vec![with.clone()], vec![without.clone()]],
    );
    let hash = fx.hash.clone();
    tracker.set_script(move |r, _| {
        if r.path == "/scrape" {
            HttpAction::ok(
                B::Dict(vec![(
                    b"files".to_vec(),
                    B::Dict(vec![(
                        hash.clone(),
                        B::dict(vec![
                            ("complete", B::Int(3)),
                            ("incomplete", B::Int(2)),
                            ("downloaded", B::Int(7)),
                        ]),
                    )]),
                )])
                .encode(),
            )
        } else {
            HttpAction::status(404, b"not here")
        }
    });
    let text = scrape(&fx, &[], &[]);
    assert_exit_code(&text, 0, &[&tracker]);
    let stdout = text.stdout_text();
    let lines: Vec<&str> = stdout.lines().collect();
    let first = format!("{with}: 3 seeders, 2 leechers, 7 completed");
    if lines.len() != 2
        || lines[0] != first
        || !lines[1].starts_with(&format!("{without}: "))
        || !lines[1].contains("offers no scrape")
    {
        fail(
            &format!("expected {first:?} and `{without}: ...offers no scrape`"),
            &[&text, &tracker],
        );
    }
    let scrapes: Vec<HttpRequest> = tracker
        .requests()
        .into_iter()
        .filter(|r| r.path == "/scrape")
        .collect();
    if scrapes.len() != 1 || scrapes[0].param("info_hash") != Some(fx.hash.as_slice()) {
        fail(
            "expected one GET /scrape?info_hash=<raw hash>",
            &[&tracker, &text],
        );
    }
    let json = scrape(&fx, &strings(&["--json"]), &[]);
    assert_exit_code(&json, 0, &[&tracker]);
    let value = parse_json(&json, &[&tracker]);
    let entries = value["trackers"].as_array().cloned().unwrap_or_default();
    let ok = entries.len() == 2
        && entries[0]
            == serde_json::json!({"url": with, "seeders": 3, "leechers": 2, "completed": 7})
        && entries[1]["url"] == serde_json::json!(without)
        && entries[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("offers no scrape"));
    if !ok {
        fail(&format!("scrape --json gave {value}"), &[&json]);
    }

    // Only a tracker without scrape: nobody answered, exit 6.
    let lone = Fixture::tiers("scrape-none.bin", SIZE, 38, &[vec![without.clone()]]);
    let none = scrape(&lone, &[], &[]);
    assert_exit_code(&none, 6, &[&tracker]);
    if !none.stdout_text().contains("offers no scrape")
        || !none.stderr_text().contains("bitfetch: error: ")
    {
        fail("a torrent whose only tracker offers no scrape", &[&none]);
    }
}

// =============================================================================================
// Timeouts and tiers
// =============================================================================================

/// The live tier-2 tracker, the seeder it hands out, and the leecher that completed.
struct SecondTier {
    good: HttpTracker,
    seeder: ChildGuard,
    leecher: Leecher,
    _fx: Fixture,
}

/// A torrent (`name`, `seed`) whose tier 1 is `first` and tier 2 a live tracker (`good_name`)
/// handing out one bitfetch seeder: a leecher (`label`) must complete through it.
fn download_via_second_tier(
    first: &HttpTracker,
    good_name: &str,
    (name, seed): (&str, u64),
    label: &str,
) -> SecondTier {
    let good = HttpTracker::start(good_name);
    let fx = Fixture::tiers(
        name,
        SIZE,
        seed,
        &[vec![first.announce_url()], vec![good.announce_url()]],
    );
    let (seeder, seeder_addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    let peer = v4(seeder_addr);
    good.set_script(move |_, _| HttpAction::ok(announce_reply(1800, &[peer])));
    let leecher = start_leecher(&fx, label, Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[first, &good, &seeder]);
    SecondTier {
        good,
        seeder,
        leecher,
        _fx: fx,
    }
}

#[test]
fn a_tracker_that_never_answers_does_not_delay_the_next_tier() {
    let hang = HttpTracker::start("hang");
    hang.set_script(|_, _| HttpAction::Hang);
    let SecondTier { good, leecher, .. } =
        download_via_second_tier(&hang, "good", ("timeout.bin", 41), "timeout");
    let hung = from_client(&hang.requests(), leecher.listen);
    let answered = from_client(&good.requests(), leecher.listen);
    let (Some(h), Some(g)) = (hung.first(), answered.first()) else {
        fail(
            "expected the leecher at the silent tracker and at the next tier",
            &[&hang, &good, &leecher],
        );
    };
    // Tiers announce at once: the second tier must not wait for the first one's request
    // timeout (15 s), as it did when tiers were tried one after the other.
    let apart = g.at.max(h.at) - g.at.min(h.at);
    eprintln!("`started` reached the two tiers {apart:?} apart");
    if h.event() != "started" || g.event() != "started" || apart >= Duration::from_secs(10) {
        fail(
            &format!(
                "expected `started` at both tiers at once; they were {apart:?} apart \
                 (the silent tracker saw {:?}, the live one {:?})",
                h.event(),
                g.event()
            ),
            &[&hang, &good, &leecher],
        );
    }
}

/// A tracker that answers 500 to everything.
fn dead_tracker(name: &str) -> HttpTracker {
    let t = HttpTracker::start(name);
    t.set_script(|_, _| HttpAction::status(500, b"dead"));
    t
}

#[test]
fn dead_trackers_in_the_same_tier_fall_through_and_the_live_one_is_promoted() {
    let dead: Vec<HttpTracker> = (0..3).map(|i| dead_tracker(&format!("dead{i}"))).collect();
    let good = HttpTracker::start("alive");
    let mut tier: Vec<String> = dead.iter().map(HttpTracker::announce_url).collect();
    tier.push(good.announce_url());
    let fx = Fixture::tiers("sametier.bin", SIZE, 42, &[tier]);
    let (seeder, seeder_addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    let peer = v4(seeder_addr);
    good.set_script(move |_, _| HttpAction::ok(announce_reply(1800, &[peer])));

    let leecher = start_leecher(
        &fx,
        "sametier",
        Some(ip4(next_loopback())),
        &strings(&["--seed", "--announce-interval", "1"]),
    );
    let mut parts: Vec<&dyn Diagnose> = vec![&leecher, &good, &seeder];
    parts.extend(dead.iter().map(|d| d as &dyn Diagnose));
    let listen = leecher.listen;
    // The peers come from the live tracker (the dead ones give none): the download completes
    // and `completed` is announced, then several periodic announces follow.
    let enough = good.wait_for(DEADLINE, |all| {
        let mine = from_client(all, listen);
        mine.iter().any(|r| r.event() == "completed") && mine.len() >= 5
    });
    if enough.is_none() {
        fail(
            "the live tracker did not see `completed` and 5 announces from the leecher",
            &parts,
        );
    }
    if let Err(e) = files_equal(&fx.data, &fx.downloaded(&leecher.out, "")) {
        fail(&format!("the download is wrong: {e}"), &parts);
    }
    for d in &dead {
        let hits = from_client(&d.requests(), listen).len();
        if hits > 1 {
            fail(
                &format!(
                    "a dead tracker in the tier saw {hits} announces: the tracker that \
                     answered was not moved to the front of its tier"
                ),
                &parts,
            );
        }
    }
    interrupt(&leecher.guard, &parts);
    let stopped = good.wait_for(Duration::from_secs(10), |all| {
        from_client(all, listen)
            .iter()
            .any(|r| r.event() == "stopped")
    });
    if stopped.is_none() {
        fail("no `stopped` at the live tracker after SIGINT", &parts);
    }
}

#[test]
fn dead_first_tier_falls_through_to_the_second() {
    let dead = dead_tracker("dead-tier1");
    let SecondTier {
        good,
        seeder,
        leecher,
        ..
    } = download_via_second_tier(&dead, "alive-tier2", ("tiers.bin", 43), "tiers");
    let parts: [&dyn Diagnose; 4] = [&leecher, &dead, &good, &seeder];
    let listen = leecher.listen;
    let first_dead = from_client(&dead.requests(), listen);
    if first_dead.first().map(HttpRequest::event).as_deref() != Some("started") {
        fail("tier 1 was not asked (with `started`)", &parts);
    }
    // `completed` and `stopped` are sent while exiting: wait for them to be recorded.
    let seen = good.wait_for(Duration::from_secs(10), |all| {
        let ev = events(&from_client(all, listen));
        ev.first().map(String::as_str) == Some("started")
            && ev.iter().any(|e| e == "completed")
            && ev.iter().any(|e| e == "stopped")
    });
    if seen.is_none() {
        fail(
            &format!(
                "the tier-2 tracker that answered should see started, completed and stopped \
                 from the leecher; it saw {:?} (the dead tier-1 tracker saw {:?})",
                events(&from_client(&good.requests(), listen)),
                events(&from_client(&dead.requests(), listen)),
            ),
            &parts,
        );
    }
}

// =============================================================================================
// Re-announces, events and transfer counters
// =============================================================================================

#[test]
fn announces_carry_events_counters_keys_and_tracker_id() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("events", 51);
    let seeder_port = seeder_addr.port();
    let peer = v4(seeder_addr);
    let leecher_announces = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&leecher_announces);
    // The leecher's first announce gets no peers (so a periodic announce happens while it is
    // still empty), later ones get the seeder. The first reply sets a tracker id.
    tracker.set_script(move |r, _| {
        if r.port() == Some(seeder_port) {
            return HttpAction::ok(announce_reply(1800, &[]));
        }
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let mut reply = vec![("interval", B::Int(1800))];
        if n == 0 {
            reply.push(("tracker id", B::str("tid 7")));
            reply.push(("peers", B::str(b"")));
        } else {
            reply.push(("peers", B::Bytes(compact4(&[peer]))));
        }
        HttpAction::ok(B::dict(reply).encode())
    });
    let leecher = start_leecher(
        &fx,
        "events",
        Some(ip4(next_loopback())),
        &strings(&["--announce-interval", "1"]),
    );
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let parts: [&dyn Diagnose; 3] = [&leecher, &tracker, &seeder];
    let listen = leecher.listen;
    let Some(all) = tracker.wait_for(Duration::from_secs(10), |all| {
        from_client(all, listen)
            .iter()
            .any(|r| r.event() == "stopped")
    }) else {
        fail("no `stopped` announce after the download exited", &parts);
    };
    let mine = from_client(&all, listen);
    check_announce_keys(&fx, &mine, listen, &parts);

    let ev = events(&mine);
    let bad = |why: &str| -> ! { fail(&format!("{why}; events {ev:?}"), &parts) };
    let first = &mine[0];
    if first.event() != "started"
        || first.num("left") != Some(fx.size)
        || first.num("downloaded") != Some(0)
        || first.num("uploaded") != Some(0)
    {
        bad("the first announce must be `started` with left = size, downloaded = uploaded = 0");
    }
    if first.param("trackerid").is_some() {
        bad("the first announce has a trackerid nobody gave");
    }
    if mine.len() < 4 || mine[1].event() != "" || mine[1].num("left") != Some(fx.size) {
        bad("the second announce must be a periodic one (no event) while nothing is downloaded");
    }
    for r in &mine[1..] {
        if r.param("trackerid") != Some(b"tid 7".as_slice()) {
            bad(&format!("the tracker id is not echoed in {}", r.describe()));
        }
    }
    let completed: Vec<&HttpRequest> = mine.iter().filter(|r| r.event() == "completed").collect();
    if completed.len() != 1 {
        bad("`completed` must be sent exactly once");
    }
    let c = completed[0];
    if c.num("left") != Some(0) || c.num("downloaded").is_none_or(|d| d < fx.size) {
        bad(&format!(
            "`completed` must carry left=0 and downloaded >= {}: {}",
            fx.size,
            c.describe()
        ));
    }
    let last = mine.last().expect("non-empty");
    if last.event() != "stopped" {
        bad("`stopped` must be the last announce");
    }
    if last.num("left") != Some(0) || last.num("downloaded").is_none_or(|d| d < fx.size) {
        bad(&format!(
            "`stopped` must carry left=0 and downloaded >= {}: {}",
            fx.size,
            last.describe()
        ));
    }
    let completed_at = ev.iter().position(|e| e == "completed").expect("one");
    if ev[..completed_at].iter().skip(1).any(|e| !e.is_empty())
        || ev[completed_at + 1..ev.len() - 1]
            .iter()
            .any(|e| !e.is_empty())
    {
        bad("expected started, periodic…, completed, periodic…, stopped");
    }
}

#[test]
fn seeder_reports_uploaded_bytes_and_stopped_on_sigint() {
    let (tracker, fx, seeder, seeder_addr) = {
        let tracker = HttpTracker::start("uploaded");
        let fx = Fixture::tiers("uploaded.bin", SIZE, 52, &[vec![tracker.announce_url()]]);
        let (seeder, addr) = start_seeder(
            &fx,
            ip4(next_loopback()),
            &strings(&["--announce-interval", "1"]),
        );
        (tracker, fx, seeder, addr)
    };
    let leecher = start_leecher(
        &fx,
        "uploaded",
        Some(ip4(next_loopback())),
        &["--peer".into(), seeder_addr.to_string()],
    );
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let parts: [&dyn Diagnose; 3] = [&seeder, &tracker, &leecher];
    let size = fx.size;
    let reported = tracker.wait_for(ANNOUNCE_DEADLINE, |all| {
        from_client(all, seeder_addr)
            .iter()
            .any(|r| r.num("uploaded").is_some_and(|u| u >= size))
    });
    if reported.is_none() {
        fail(
            &format!("no periodic seeder announce with uploaded >= {size}"),
            &parts,
        );
    }
    interrupt(&seeder, &[&tracker, &leecher]);
    let Some(all) = tracker.wait_for(Duration::from_secs(10), |all| {
        from_client(all, seeder_addr)
            .iter()
            .any(|r| r.event() == "stopped")
    }) else {
        fail("no `stopped` from the seeder after SIGINT", &parts);
    };
    let mine = from_client(&all, seeder_addr);
    check_announce_keys(&fx, &mine, seeder_addr, &parts);
    let first = &mine[0];
    if first.event() != "started"
        || first.num("left") != Some(0)
        || first.num("uploaded") != Some(0)
    {
        fail(
            &format!(
                "the seeder's first announce must be started, left=0, uploaded=0: {}",
                first.describe()
            ),
            &parts,
        );
    }
    if mine.iter().any(|r| r.event() == "completed") {
        fail(
            "a seeder that was complete at start must not announce `completed`",
            &parts,
        );
    }
    let stopped = mine.iter().find(|r| r.event() == "stopped").expect("seen");
    if stopped.num("uploaded").is_none_or(|u| u < size) || stopped.num("left") != Some(0) {
        fail(
            &format!(
                "the seeder's `stopped` must carry uploaded >= {size} and left=0: {}",
                stopped.describe()
            ),
            &parts,
        );
    }
}

// =============================================================================================
// Scripted UDP tracker
// =============================================================================================

#[test]
fn udp_error_reply_is_shown_and_peer_still_works() {
    let tracker = UdpTracker::start("udp-error");
    tracker.set_script(|_, _| UdpAction::Error("udp tracker refuses (test)".into()));
    let url = tracker.announce_url();
    let fx = Fixture::tiers("udp-error.bin", SIZE, 61, &[vec![url.clone()]]);
    let (seeder, seeder_addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    let leecher = seeding_leecher(
        &fx,
        "udp-error",
        seeder_addr,
        // `completed`, or (to a tracker that never answered `started`) nothing left.
        |port| {
            tracker
                .announces_from_port(port)
                .iter()
                .any(|a| a.event == 1 || a.left == 0)
        },
        &[&tracker, &seeder],
    );
    let expected = format!("bitfetch: tracker {url}: tracker says: udp tracker refuses (test)");
    let line = wait_for_stderr(&leecher.guard, &expected, Duration::from_secs(10));
    if line != expected {
        fail(
            &format!("{line:?} is not {expected:?}"),
            &[&leecher, &tracker],
        );
    }
    interrupt(&leecher.guard, &[&tracker, &seeder]);
    let mine = tracker.announces_from_port(leecher.listen.port());
    if mine.is_empty() || mine[0].info_hash.as_slice() != fx.hash.as_slice() {
        fail(
            "the UDP tracker never saw the leecher's announce for this torrent",
            &[&leecher, &tracker],
        );
    }
}

#[test]
fn udp_connection_id_is_reused_within_a_minute() {
    let tracker = UdpTracker::start("udp-reuse");
    let fx = Fixture::tiers("udp-reuse.bin", SIZE, 62, &[vec![tracker.announce_url()]]);
    let (seeder, seeder_addr) = start_seeder(
        &fx,
        ip4(next_loopback()),
        &strings(&["--announce-interval", "1"]),
    );
    let port = seeder_addr.port();
    let enough = poll_until(ANNOUNCE_DEADLINE, || {
        (tracker.announces_from_port(port).len() >= 3).then_some(())
    });
    if enough.is_none() {
        fail(
            "the seeder did not announce 3 times over UDP with --announce-interval 1",
            &[&seeder, &tracker],
        );
    }
    let announces = tracker.announces_from_port(port);
    let issued = tracker.issued_ids();
    if tracker.connects() != 1 || announces.iter().any(|a| a.connection_id != issued[0]) {
        fail(
            "announces within a minute must reuse one connection id (one connect)",
            &[&seeder, &tracker],
        );
    }
    let first = &announces[0];
    let keys_ok = announces.iter().all(|a| {
        a.info_hash.as_slice() == fx.hash.as_slice()
            && a.peer_id.starts_with(b"-BF0100-")
            && a.peer_id == first.peer_id
            && a.key == first.key
            && a.left == 0
            && a.from.ip() == seeder_addr.ip()
    });
    if first.event != 2
        || first.uploaded != 0
        || !keys_ok
        || announces[1..].iter().any(|a| a.event != 0)
    {
        fail(
            "UDP announces: started (2) first, then periodic (0); hash, peer id, key, port, \
             left=0, source address as bound",
            &[&seeder, &tracker],
        );
    }
    interrupt(&seeder, &[&tracker]);
    let stopped = poll_until(Duration::from_secs(10), || {
        tracker
            .announces_from_port(port)
            .iter()
            .any(|a| a.event == 3)
            .then_some(())
    });
    if stopped.is_none() {
        fail("no UDP `stopped` (3) after SIGINT", &[&seeder, &tracker]);
    }
}

// =============================================================================================
// Dead trackers never delay a download (issue 23): every tier at once, a race within a tier
// =============================================================================================

/// The layouts of a torrent's tracker list: twenty dead trackers and one that works.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// All in one tier (the working one anywhere in it: tiers are shuffled).
    OneTier,
    /// Each dead tracker a tier of its own, before the working tier.
    TiersBefore,
    /// Tiers of five dead trackers; the working one in the third, with five dead beside it.
    Mixed,
}

fn tiers_of(layout: Layout, dead: &[String], working: String) -> Vec<Vec<String>> {
    match layout {
        Layout::OneTier => {
            let mut tier = dead.to_vec();
            tier.push(working);
            vec![tier]
        }
        Layout::TiersBefore => {
            let mut tiers: Vec<Vec<String>> = dead.iter().map(|u| vec![u.clone()]).collect();
            tiers.push(vec![working]);
            tiers
        }
        Layout::Mixed => {
            let mut tiers: Vec<Vec<String>> = dead.chunks(5).map(<[String]>::to_vec).collect();
            tiers[2].push(working);
            tiers
        }
    }
}

/// Time from the leecher's start to its first peer (or to the end, for a download so quick
/// that no progress event came first).
fn time_to_first_peer(leecher: &Leecher, parts: &[&dyn Diagnose]) -> Duration {
    let start = std::time::Instant::now();
    let seen = poll_until(DEADLINE, || {
        let events = support::cli::events(&leecher.guard);
        events
            .iter()
            .any(|e| {
                let kind = support::cli::kind(e);
                kind == "finished" || (kind == "progress" && e["peers"].as_u64() > Some(0))
            })
            .then(|| start.elapsed())
    });
    seen.unwrap_or_else(|| {
        let mut all: Vec<&dyn Diagnose> = vec![leecher];
        all.extend_from_slice(parts);
        fail(
            "no peer within the hang guard: dead trackers delayed the working one",
            &all,
        )
    })
}

/// Twenty dead trackers and an opentracker (over `proto`) in `layout`: a seeder registers, a
/// leecher gets its first peer within a few seconds (reported; the assertion is the hang
/// guard) and completes byte-correct.
fn dead_trackers_do_not_delay(layout: Layout, label: &str, udp: bool, seed: u64) {
    support::net::require_private_network("resolves tracker names under .invalid");
    let tracker = Opentracker::start();
    let working = if udp {
        tracker.udp_url()
    } else {
        tracker.announce_url()
    };
    let dead = DeadTrackers::start(20);
    let tiers = tiers_of(layout, &dead.urls, working);
    let fx = Fixture::tiers(&format!("{label}.bin"), SIZE, seed, &tiers);
    tracker.allow(&fx.hash_hex);
    let (seeder, _) = start_seeder(&fx, ip4(next_loopback()), &[]);
    tracker.wait_for_swarm(&fx.hash_hex, 1, 1, DEADLINE, &[&seeder]);

    let leecher = start_leecher(
        &fx,
        label,
        Some(ip4(next_loopback())),
        &strings(&["--json"]),
    );
    let first = time_to_first_peer(&leecher, &[&tracker, &seeder]);
    eprintln!("{layout:?}: first peer after {first:?} (20 dead trackers listed)");
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let errors = support::cli::events(&leecher.guard)
        .into_iter()
        .filter(|e| support::cli::kind(e) == "tracker_error")
        .collect::<Vec<_>>();
    // One notice per failing tracker at most, each naming its URL.
    let mut urls: Vec<&str> = errors.iter().filter_map(|e| e["url"].as_str()).collect();
    let named = urls.len();
    urls.sort_unstable();
    urls.dedup();
    if named != errors.len() || urls.len() != named {
        fail(
            &format!("tracker_error events must name their URL, once per tracker: {errors:?}"),
            &[&leecher],
        );
    }
}

#[test]
fn twenty_dead_trackers_in_the_same_tier_do_not_delay_the_working_one() {
    dead_trackers_do_not_delay(Layout::OneTier, "dead-one-tier", false, 61);
}

#[test]
fn twenty_dead_tiers_before_the_working_one_do_not_delay_it() {
    dead_trackers_do_not_delay(Layout::TiersBefore, "dead-tiers", true, 62);
}

#[test]
fn dead_trackers_in_mixed_tiers_do_not_delay_the_working_one() {
    dead_trackers_do_not_delay(Layout::Mixed, "dead-mixed", false, 63);
}

/// At exit, `stopped` reaches the tracker that answered; twenty dead ones add nothing to the
/// time Ctrl-C takes.
#[test]
fn stopped_reaches_the_working_tracker_and_dead_ones_do_not_slow_the_exit() {
    support::net::require_private_network("resolves tracker names under .invalid");
    let dead = DeadTrackers::start(20);
    let good = HttpTracker::start("stop-good");
    let tiers = tiers_of(Layout::Mixed, &dead.urls, good.announce_url());
    let fx = Fixture::tiers("dead-stop.bin", SIZE, 64, &tiers);
    let (seeder, seeder_addr) = start_seeder(&fx, ip4(next_loopback()), &[]);
    let peer = v4(seeder_addr);
    good.set_script(move |_, _| HttpAction::ok(announce_reply(1800, &[peer])));
    let leecher = start_leecher(
        &fx,
        "dead-stop",
        Some(ip4(next_loopback())),
        &strings(&["--seed"]),
    );
    let listen = leecher.listen;
    wait_seeding_complete(
        &fx,
        &leecher,
        |port| http_completed(&good, port),
        &[&good, &seeder],
    );
    let asked = std::time::Instant::now();
    leecher.guard.signal(libc::SIGINT);
    leecher
        .guard
        .wait_with_deadline(Duration::from_secs(30), &|| good.describe());
    let took = leecher
        .guard
        .exited_at()
        .map_or(Duration::MAX, |at| at.saturating_duration_since(asked));
    eprintln!("Ctrl-C to exit with 20 dead trackers listed: {took:?}");
    assert_exit_code(&leecher.guard, 0, &[&good]);
    if !from_client(&good.requests(), listen)
        .iter()
        .any(|r| r.event() == "stopped")
    {
        fail("no `stopped` at the working tracker", &[&leecher, &good]);
    }
    // The whole shutdown has a 2 s budget for `stopped`; a dead tracker waited for would
    // add its full request timeout (15 s) or more.
    if took > Duration::from_secs(5) {
        fail(
            &format!("Ctrl-C took {took:?} with dead trackers listed"),
            &[&leecher, &good],
        );
    }
}

/// A hundred trackers, all dead: requests in flight are capped, so bitfetch's thread count
/// stays bounded while every one of them is tried.
#[test]
fn a_hundred_trackers_keep_the_thread_count_bounded() {
    support::net::require_private_network("resolves tracker names under .invalid");
    let dead = DeadTrackers::start(100);
    let tiers: Vec<Vec<String>> = dead.urls.iter().map(|u| vec![u.clone()]).collect();
    let fx = Fixture::tiers("hundred.bin", SIZE, 65, &tiers);
    let leecher = start_leecher(&fx, "hundred", Some(ip4(next_loopback())), &[]);
    let pid = leecher.guard.pid();
    let threads = || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<usize>().ok())
    };
    let mut most = 0;
    // Until every hanging HTTP tracker (a quarter of them, each holding its request 15 s)
    // has been asked: the queue behind the cap drained while we watched.
    let all_asked = poll_until(DEADLINE, || {
        most = most.max(threads().unwrap_or(0));
        dead.hanging_requests().iter().all(|&n| n > 0).then_some(())
    });
    eprintln!("most threads seen with 100 trackers: {most}");
    if all_asked.is_none() {
        fail(
            &format!(
                "not every tracker was asked within the guard (hanging trackers' requests: \
                 {:?})",
                dead.hanging_requests()
            ),
            &[&leecher],
        );
    }
    // 16 requests in flight plus the session's own threads (main, session, listener,
    // tracker, hashers); a thread per tracker would be over a hundred.
    if most > 48 {
        fail(
            &format!("{most} threads with 100 trackers listed"),
            &[&leecher],
        );
    }
    leecher.guard.stop();
}

/// A tracker that fails the first announce (a blip: a restart, an overloaded front end) and
/// then answers: the download retries after a short back-off and completes, instead of giving
/// up at the first failure with exit 6.
#[test]
fn a_tracker_failing_once_is_retried_and_the_download_completes() {
    let (tracker, fx, seeder, seeder_addr) = scripted_swarm("blip", 66);
    let peer = v4(seeder_addr);
    // Each client's first announce fails.
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    tracker.set_script(move |request, _| {
        if seen.lock().expect("not poisoned").insert(request.port()) {
            HttpAction::status(503, b"restarting")
        } else {
            HttpAction::ok(announce_reply(1800, &[peer]))
        }
    });
    let leecher = start_leecher(&fx, "blip", Some(ip4(next_loopback())), &[]);
    finish_leecher(&fx, &leecher, &[&tracker, &seeder]);
    let asked = from_client(&tracker.requests(), leecher.listen);
    if asked.len() < 2 || asked[0].event() != "started" || asked[1].event() != "started" {
        fail(
            &format!(
                "expected `started` refused, then `started` again; the tracker saw {:?}",
                events(&asked)
            ),
            &[&leecher, &tracker],
        );
    }
    let stderr = leecher.guard.stderr_text();
    if !stderr.contains(&format!(
        "tracker {}: HTTP status 503",
        tracker.announce_url()
    )) {
        fail("the failed announce was not reported", &[&leecher]);
    }
}
