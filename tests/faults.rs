//! End-to-end fault injection (the reliability issue), all on loopback, each client on its own
//! 127.0.0.x address:
//!
//! 1. a seeder SIGKILLed while the rate-limited downloader is mid-way: it finishes from the other;
//! 2. the only seeder corrupts every piece (what `tests/swarm.rs` does not already check): the
//!    JSON events show 0 verified bytes, hash failures and the ban, told once; `--stall-timeout`
//!    ends the run with 8; a resume from an honest seeder refetches every byte;
//! 3. tracker faults not already covered by `tests/trackers.rs`: a refused connection and a
//!    `failure reason` in tier 1 fall through to tier 2 at once; failing trackers are retried
//!    with exponential back-off, not at `--announce-interval`; Ctrl-C ends a run within 2 s
//!    with exit 130 while an HTTP or UDP announce hangs;
//! 4. `kill -9` at pseudo-random moments, 20+ times, restarting on the same directory: the
//!    resume keeps every verified piece, refetches none, and every piece on disk that bitfetch
//!    counted passes SHA-1 (checked by the test itself);
//! 5. a full disk (tmpfs in a private mount namespace): a clear error and exit 5, never SIGBUS;
//!    on a bigger tmpfs the same partial file resumes and completes;
//! 6. a seeder's file overwritten and then truncated under it: the seeder survives, the
//!    downloader never takes a bad piece and completes from a second seeder; and a seeder that
//!    rejects every request (as one whose data changed does) is not asked again in a loop.
//!
//! Every wait is a poll with a deadline (a hang guard). Rate limits only stretch transfers so
//! the test has a window to act in; no assertion depends on speed beyond the bounds the issue
//! sets (Ctrl-C within 2 s, a refused tracker not waited on like a silent one).

mod support;

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use support::bencode::B;
use support::cli::{
    ChildGuard, assert_exit_code, bitfetch, download_args, events, field, json_listening, kind,
    of_kind, progress, spawn_bitfetch_env, start_seeder, verify, wait_event,
};
use support::clients::require_tool;
use support::fake_peer::{Misbehaviour, SeedSpec};
use support::fake_tracker::{HttpAction, HttpRequest, HttpTracker, announce_reply};
use support::files::{files_equal, scratch_dir};
use support::net::{closed_port_url, next_loopback, v4};
use support::torrent::Payload;
use support::{DEADLINE, Diagnose, Rng, fail, path_arg, poll_until, report, wait_until};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Held by the test that measures a time bound (Ctrl-C within 2 s) and by the tests that keep
/// the CPU busy (the test's own hashing while killing; a peer in a request/reject loop), so the
/// measurement is of bitfetch and not of a sibling test sharing the two cores.
static CPU: Mutex<()> = Mutex::new(());

fn cpu_lock() -> MutexGuard<'static, ()> {
    CPU.lock().unwrap_or_else(|e| e.into_inner())
}

/// `bitfetch download TORRENT -o OUT --port 0 --bind IP --json [--peer P]… EXTRA…`.
fn start_download(
    name: &str,
    torrent: &Path,
    out: &Path,
    ip: Ipv4Addr,
    peers: &[SocketAddr],
    extra: &[&str],
) -> ChildGuard {
    let mut args = download_args(torrent, out, ip, peers);
    args.push("--json".into());
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_bitfetch_env(name, &args, &[])
}

/// A download of `fx` from two seeders, slowed to 512 KiB/s so the test has time to act while
/// it runs: (its output directory, it).
fn download_from_two(
    fx: &Payload,
    a: SocketAddr,
    b: SocketAddr,
) -> (std::path::PathBuf, ChildGuard) {
    let out = fx.dir_for("out");
    let d = start_download(
        "downloader",
        &fx.torrent,
        &out,
        next_loopback(),
        &[a, b],
        &["--max-download-rate", "512K"],
    );
    (out, d)
}

/// Checks that `verify` calls the data complete and correct.
fn assert_verifies(torrent: &Path, data: &Path, parts: &[&dyn Diagnose]) {
    let check = verify(torrent, data);
    let mut all: Vec<&dyn Diagnose> = vec![&check];
    all.extend_from_slice(parts);
    assert_exit_code(&check, 0, &all);
}

/// Waits for a downloader to exit 0 and checks its output byte for byte and with `verify`.
fn assert_completes(fx: &Payload, guard: &ChildGuard, out: &Path, parts: &[&dyn Diagnose]) {
    let mut all: Vec<&dyn Diagnose> = vec![guard];
    all.extend_from_slice(parts);
    let context = || report("other parties:", parts);
    guard.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(guard, 0, parts);
    if let Err(e) = files_equal(&fx.data, &out.join(&fx.name)) {
        fail(&format!("the download is wrong: {e}"), &all);
    }
    assert_verifies(&fx.torrent, &out.join(&fx.name), &all);
}

/// Progress (verified bytes) never goes down and never exceeds the size.
fn assert_progress_sane(guard: &ChildGuard, total: u64, parts: &[&dyn Diagnose]) {
    let seen = progress(&events(guard));
    if seen.windows(2).any(|w| w[1] < w[0]) || seen.iter().any(|&d| d > total) {
        let mut all: Vec<&dyn Diagnose> = vec![guard];
        all.extend_from_slice(parts);
        fail(
            &format!("verified bytes went down or past {total}: {seen:?}"),
            &all,
        );
    }
}

/// A scripted tracker (`tracker_name`) and a payload of one file announcing to it.
fn tracked_payload(
    tracker_name: &str,
    name: &str,
    size: u64,
    seed: u64,
    piece_log2: u32,
) -> (HttpTracker, Payload) {
    let tracker = HttpTracker::start(tracker_name);
    let fx = Payload::new(name, size, seed, piece_log2, &tracker.announce_url());
    (tracker, fx)
}

// =============================================================================================
// 1. A seeder killed mid-piece
// =============================================================================================

#[test]
fn seeder_killed_mid_piece_download_completes_from_the_other() {
    // 256 KiB pieces (16 blocks each): with two seeders sharing the requests, the killed one
    // leaves pieces half received.
    let (_tracker, fx) = tracked_payload("kill-seeder", "two-seeders.bin", 4 * MIB + 4321, 101, 18);
    let (a, a_addr) = start_seeder("seeder A", &fx.torrent, &fx.data, next_loopback(), &[]);
    let (b, b_addr) = start_seeder("seeder B", &fx.torrent, &fx.data, next_loopback(), &[]);
    let (out, d) = download_from_two(&fx, a_addr, b_addr);
    let total = fx.size;
    // Both seeders connected and some pieces verified, far from done.
    let at_kill = wait_event(&d, DEADLINE, |ev| {
        of_kind(ev, "progress")
            .map(|p| (field(p, "downloaded"), field(p, "peers")))
            .find(|&(done, peers)| peers == 2 && done > 0 && done < total / 2)
    });
    let Some((done_at_kill, _)) = at_kill else {
        fail(
            "no progress event with 2 peers and partial data (0 < verified < half)",
            &[&d, &a, &b],
        );
    };
    a.signal(libc::SIGKILL);
    let status = a.wait_timeout(Duration::from_secs(30));
    if status.and_then(|s| s.signal()) != Some(libc::SIGKILL) {
        fail("seeder A did not die of SIGKILL", &[&a]);
    }
    assert_completes(&fx, &d, &out, &[&a, &b]);
    let ev = events(&d);
    assert_progress_sane(&d, total, &[&a, &b]);
    // The download went on with the survivor alone.
    let alone = of_kind(&ev, "progress")
        .filter(|p| field(p, "peers") == 1 && field(p, "downloaded") < total)
        .count();
    if alone == 0 {
        fail(
            "no progress event with one peer left and the download unfinished",
            &[&d, &a, &b],
        );
    }
    let finished = of_kind(&ev, "finished").next().cloned();
    let hash_failed = of_kind(&ev, "hash_failed").count();
    if finished.is_none() || hash_failed > 0 || of_kind(&ev, "error").next().is_some() {
        fail(
            &format!(
                "expected a `finished` event and no `hash_failed`/`error` ({hash_failed} hash \
                 failures); blocks of half-received pieces from the dead seeder must combine \
                 cleanly with the survivor's"
            ),
            &[&d, &a, &b],
        );
    }
    eprintln!(
        "killed seeder A at {done_at_kill} of {total} verified bytes; {alone} progress events \
         with the survivor alone"
    );
}

// =============================================================================================
// 2. The only seeder corrupts every piece
// =============================================================================================

#[test]
fn only_seeder_corrupting_every_piece_is_banned_nothing_counts_and_the_run_stalls() {
    let (tracker, fx) = tracked_payload("corrupt", "corrupt.bin", MIB + 3333, 201, 15);
    let fake = SeedSpec::new(fx.bytes().to_vec(), fx.pieces.piece_len)
        .misbehave(Misbehaviour::FlipFirstByte)
        .start(next_loopback());
    let out = fx.dir_for("out");
    let ip = next_loopback();
    let d = start_download(
        "downloader (corrupt seeder only)",
        &fx.torrent,
        &out,
        ip,
        &[fake.addr()],
        &["--stall-timeout", "4s", "--timeout", "90s"],
    );
    let parts: [&dyn Diagnose; 3] = [&d, &fake, &tracker];
    let context = || report("other parties:", &[&fake, &tracker]);
    d.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(&d, 8, &[&fake, &tracker]);

    let ev = events(&d);
    let verified = progress(&ev);
    let hash_failed = of_kind(&ev, "hash_failed").count();
    let banned: Vec<&str> = of_kind(&ev, "peer_banned")
        .filter_map(|e| e["message"].as_str())
        .collect();
    let error = of_kind(&ev, "error").last().cloned();
    if verified.is_empty() || verified.iter().any(|&v| v != 0) {
        fail(
            &format!("every progress event must show 0 verified bytes: {verified:?}"),
            &parts,
        );
    }
    if of_kind(&ev, "file_completed").next().is_some() || of_kind(&ev, "finished").next().is_some()
    {
        fail("a corrupt download was reported complete", &parts);
    }
    if hash_failed == 0 || fake.report().flipped == 0 {
        fail(
            "expected `hash_failed` events for the corrupt pieces",
            &parts,
        );
    }
    let fake_addr = fake.addr().to_string();
    if !banned.iter().all(|m| m.contains(&fake_addr)) || banned.is_empty() {
        fail(
            &format!("expected `peer_banned` naming {fake_addr}: {banned:?}"),
            &parts,
        );
    }
    let ban_reports = banned.len();
    if error.as_ref().map(|e| field(e, "code")) != Some(8)
        || kind(ev.last().expect("events")) != "error"
    {
        fail("the last event must be `error` with code 8", &parts);
    }
    // (tests/swarm.rs already checks that the peer is not dialled again and that `verify`
    // finds 0 good pieces in what was written.)

    // Nothing was kept as had: a resume from an honest seeder on the same directory starts
    // from 0 verified bytes, refetches every byte and ends correct.
    let (honest, honest_addr) =
        start_seeder("honest seeder", &fx.torrent, &fx.data, next_loopback(), &[]);
    let resume = start_download(
        "resume (honest seeder)",
        &fx.torrent,
        &out,
        ip,
        &[honest_addr],
        &[],
    );
    assert_completes(&fx, &resume, &out, &[&honest]);
    let ev = events(&resume);
    let fetched = of_kind(&ev, "finished")
        .next()
        .map(|e| field(e, "transferred"));
    let first = progress(&ev).first().copied();
    if fetched.is_none_or(|f| f < fx.size) || first.is_some_and(|f| f > fetched.unwrap_or(0)) {
        fail(
            &format!(
                "the resume fetched {fetched:?} bytes (first progress {first:?}): it kept \
                 something of the corrupt run (expected >= {})",
                fx.size
            ),
            &[&resume, &honest],
        );
    }
    // Checked last, so that everything above is known to hold either way: a ban is told once.
    // (Pieces of the peer already queued for hashing when it was banned must not ban it again.)
    if ban_reports != 1 {
        let report = report(
            &format!(
                "the one corrupt peer was reported banned {ban_reports} times (expected once: \
                 it is banned for the rest of the run); each of its pieces already queued for \
                 hashing re-ran the ban"
            ),
            &[&fake],
        );
        panic!("{report}\npeer_banned events: {banned:#?}");
    }
}

// =============================================================================================
// 3. Tracker faults (what tests/trackers.rs does not already assert)
// =============================================================================================

/// Payload size for the tracker tests: a few 32 KiB pieces.
const SMALL: u64 = 8 * 32 * 1024 + 99;

fn failure_tracker(name: &str, reason: &'static str) -> HttpTracker {
    let t = HttpTracker::start(name);
    t.set_script(move |_, _| {
        HttpAction::ok(B::dict(vec![("failure reason", B::str(reason))]).encode())
    });
    t
}

fn from_port(requests: &[HttpRequest], port: u16) -> Vec<HttpRequest> {
    requests
        .iter()
        .filter(|r| r.port() == Some(port))
        .cloned()
        .collect()
}

#[test]
fn refused_and_failure_reason_move_the_tier_on_at_once_and_tier_two_runs_beside_it() {
    let refused = closed_port_url();
    let failing = failure_tracker("failure-reason", "not registered here (test)");
    let good = HttpTracker::start("tier2");
    let fx = Payload::tiers(
        "fallthrough.bin",
        SMALL,
        301,
        &[
            vec![refused.clone(), failing.announce_url()],
            vec![good.announce_url()],
        ],
    );
    let (seeder, seeder_addr) = start_seeder("seeder", &fx.torrent, &fx.data, next_loopback(), &[]);
    let peer = v4(seeder_addr);
    good.set_script(move |_, _| HttpAction::ok(announce_reply(1800, &[peer])));
    let out = fx.dir_for("fallthrough");
    let started = Instant::now();
    // No --peer: the seeder can only come from tier 2.
    let d = start_download("leecher", &fx.torrent, &out, next_loopback(), &[], &[]);
    let port = json_listening(&d).port();
    let parts: [&dyn Diagnose; 4] = [&d, &failing, &good, &seeder];
    let context = || report("other parties:", &parts[1..]);
    d.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(&d, 0, &parts[1..]);
    if let Err(e) = files_equal(&fx.data, &fx.downloaded(&out, "")) {
        fail(&format!("the download is wrong: {e}"), &parts);
    }
    let asked_failing = from_port(&failing.requests(), port);
    let asked_good = from_port(&good.requests(), port);
    let (Some(f), Some(g)) = (asked_failing.first(), asked_good.first()) else {
        fail(
            "expected the leecher at the tier-1 tracker with a failure reason and at tier 2",
            &parts,
        );
    };
    let reached_tier2 = g.at.saturating_duration_since(started);
    let reached_failing = f.at.saturating_duration_since(started);
    if f.event() != "started" || g.event() != "started" {
        fail("both tiers must be asked `started`", &parts);
    }
    // Tiers run side by side, and within tier 1 a refused connection hands over at once (no
    // 2 s race delay, no 15 s request timeout): both are reached well before either.
    if reached_tier2 >= Duration::from_secs(12) || reached_failing >= Duration::from_secs(12) {
        fail(
            &format!(
                "tier 2 was reached {reached_tier2:?} and the failure-reason tracker of tier 1 \
                 {reached_failing:?} after start: a refused connection or a tier was waited on"
            ),
            &parts,
        );
    }
    eprintln!(
        "tier 2 reached {reached_tier2:?}, the second tracker of tier 1 {reached_failing:?} \
         after start ({refused} refused)"
    );
}

#[test]
fn failing_trackers_back_off_exponentially_instead_of_following_announce_interval() {
    let refused = closed_port_url();
    let status500 = HttpTracker::start("500");
    status500.set_script(|_, _| HttpAction::status(500, b"down for maintenance"));
    let failing = failure_tracker("failure", "torrent unknown (test)");
    let fx = Payload::tiers(
        "backoff.bin",
        SMALL,
        302,
        &[
            vec![refused.clone()],
            vec![status500.announce_url()],
            vec![failing.announce_url()],
        ],
    );
    // A seeder never ends for want of trackers; --announce-interval 1 would re-announce every
    // second if failures did not back off.
    let mut args: Vec<String> = ["seed", &path_arg(&fx.torrent), &path_arg(&fx.data)]
        .map(String::from)
        .to_vec();
    args.extend(
        [
            "--port",
            "0",
            "--json",
            "--announce-interval",
            "1",
            "--bind",
        ]
        .map(String::from),
    );
    args.push(next_loopback().to_string());
    let seeder = spawn_bitfetch_env("seeder (all trackers failing)", &args, &[]);
    let port = json_listening(&seeder).port();
    let parts: [&dyn Diagnose; 3] = [&seeder, &status500, &failing];
    let rounds = status500.wait_for(Duration::from_secs(150), |all| {
        from_port(all, port).len() >= 3
    });
    if rounds.is_none() {
        fail("the failing trackers were not retried 3 times", &parts);
    }
    let times: Vec<Instant> = from_port(&status500.requests(), port)
        .iter()
        .map(|r| r.at)
        .collect();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let (g1, g2) = (gaps[0], gaps[1]);
    if g1 < Duration::from_secs(3) || g2 < g1 + g1 / 2 || g2 > Duration::from_secs(120) {
        fail(
            &format!(
                "retries of a failing tracker should back off exponentially (about 5 s, then \
                 10 s), not follow --announce-interval 1, and keep going; gaps were {gaps:?}"
            ),
            &parts,
        );
    }
    // Every tier is retried on its own schedule: the last tier is asked as often as the
    // middle one.
    let last_tier = from_port(&failing.requests(), port).len();
    if last_tier.abs_diff(times.len()) > 1 {
        fail(
            &format!(
                "tier 3 was asked {last_tier} times while tier 2 was asked {}",
                times.len()
            ),
            &parts,
        );
    }
    // Each failure is reported, with the tracker named.
    let ev = events(&seeder);
    let messages: Vec<&str> = of_kind(&ev, "tracker_error")
        .filter_map(|e| e["message"].as_str())
        .collect();
    let expect = [
        (refused.clone(), None),
        (status500.announce_url(), Some("500")),
        (failing.announce_url(), Some("torrent unknown (test)")),
    ];
    for (url, detail) in expect {
        let found = messages
            .iter()
            .any(|m| m.contains(&url) && detail.is_none_or(|d| m.contains(d)));
        if !found {
            fail(
                &format!("no tracker_error for {url} (with {detail:?}); got {messages:?}"),
                &parts,
            );
        }
    }
    eprintln!("back-off gaps: {gaps:?}; errors: {messages:?}");
}

/// SIGINT to a running download; it must end with 130 within 2 s of the signal.
fn interrupt_within_2s(guard: &ChildGuard, what: &str, parts: &[&dyn Diagnose]) -> Duration {
    if !guard.is_running() {
        fail(&format!("{what}: exited before the signal"), &[guard]);
    }
    let sent = Instant::now();
    guard.signal(libc::SIGINT);
    // A fine-grained poll (not the harness's 25 ms) so the measurement is of bitfetch.
    let took = loop {
        if guard.exit_status().is_some() {
            break sent.elapsed();
        }
        if sent.elapsed() > Duration::from_secs(30) {
            fail(
                &format!("{what}: still running 30 s after SIGINT"),
                &[guard],
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut all: Vec<&dyn Diagnose> = vec![guard];
    all.extend_from_slice(parts);
    guard.wait_timeout(Duration::from_secs(2));
    assert_exit_code(guard, 130, parts);
    if took > Duration::from_secs(2) {
        fail(
            &format!("{what}: exited {took:?} after SIGINT (at most 2 s)"),
            &all,
        );
    }
    took
}

#[test]
fn ctrl_c_exits_130_within_2s_while_an_announce_hangs() {
    let _cpu = cpu_lock();
    // (a) The `started` announce never gets an answer.
    let silent = HttpTracker::start("silent");
    silent.set_script(|_, _| HttpAction::Hang);
    let fx = Payload::tiers("hang-a.bin", SMALL, 311, &[vec![silent.announce_url()]]);
    let d = start_download(
        "leecher (started hangs)",
        &fx.torrent,
        &fx.dir_for("a"),
        next_loopback(),
        &[],
        &[],
    );
    let port = json_listening(&d).port();
    wait_until(
        DEADLINE,
        "the silent tracker never got the `started` announce",
        &[&d, &silent],
        || !from_port(&silent.requests(), port).is_empty(),
    );
    let took_a = interrupt_within_2s(&d, "started hangs", &[&silent]);

    // (b) `started` answered, then a periodic announce hangs (and `stopped` would follow).
    let flaky = HttpTracker::start("answers once");
    flaky.set_script(|_, i| {
        if i == 0 {
            HttpAction::ok(announce_reply(1800, &[]))
        } else {
            HttpAction::Hang
        }
    });
    let fx = Payload::tiers("hang-b.bin", SMALL, 312, &[vec![flaky.announce_url()]]);
    let d = start_download(
        "leecher (periodic announce hangs)",
        &fx.torrent,
        &fx.dir_for("b"),
        next_loopback(),
        &[],
        &["--announce-interval", "1"],
    );
    let port = json_listening(&d).port();
    wait_until(
        DEADLINE,
        "no second (hanging) announce after an answered `started`",
        &[&d, &flaky],
        || from_port(&flaky.requests(), port).len() >= 2,
    );
    let took_b = interrupt_within_2s(&d, "periodic announce hangs", &[&flaky]);

    // (c) A UDP tracker that reads and never answers.
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a silent UDP tracker");
    udp.set_read_timeout(Some(Duration::from_millis(25)))
        .expect("read timeout");
    let url = format!("udp://{}/announce", udp.local_addr().expect("local_addr"));
    let fx = Payload::tiers("hang-c.bin", SMALL, 313, &[vec![url]]);
    let d = start_download(
        "leecher (silent UDP tracker)",
        &fx.torrent,
        &fx.dir_for("c"),
        next_loopback(),
        &[],
        &[],
    );
    let mut packet = [0u8; 2048];
    wait_until(
        DEADLINE,
        "the silent UDP tracker got no packet",
        &[&d],
        || udp.recv_from(&mut packet).is_ok(),
    );
    let took_c = interrupt_within_2s(&d, "UDP tracker silent", &[]);
    eprintln!(
        "SIGINT to exit: {took_a:?} (started hangs), {took_b:?} (periodic hangs), {took_c:?} (UDP)"
    );
}

// =============================================================================================
// 4. kill -9 at random moments, then resume on the same directory
// =============================================================================================

/// When a run is killed.
#[derive(Debug, Clone, Copy)]
enum KillPoint {
    /// At once: during start-up, the resume check or file creation.
    AtSpawn,
    /// As soon as it reports its listening socket (tracker and peer just starting).
    AtListening,
    /// Once the file on disk holds this many good pieces (mid-transfer, often mid-piece).
    GoodPieces(usize),
    /// Right after the n-th progress event: what it just called verified must survive.
    AfterProgress(usize),
}

/// What one run showed.
struct RunReport {
    /// Good bytes on disk (the test's own SHA-1) when the run started.
    on_disk: u64,
    /// Most verified bytes the run reported (progress events and tracker `left`).
    verified: u64,
    completed: bool,
}

#[test]
fn kill_9_at_random_moments_resume_keeps_verified_pieces_and_refetches_none() {
    const KILLS: usize = 22;
    /// Received but not yet verified at any instant: the piece in progress and one being
    /// hashed, plus a spare. A refetched verified piece would show as more.
    const SLACK_PIECES: u64 = 3;
    let _cpu = cpu_lock();
    let (tracker, fx) = tracked_payload("kill9", "kill9.bin", 4 * MIB + 1234, 401, 15);
    let map = fx.pieces.clone();
    let total = fx.size;
    let slack = SLACK_PIECES * map.piece_len;
    let (seeder, seeder_addr) = start_seeder("seeder", &fx.torrent, &fx.data, next_loopback(), &[]);
    let ip = next_loopback();
    let out = fx.dir_for("out");
    let file = out.join(&fx.name);
    let mut rng = Rng::new(0x6b69_6c6c_2d39);
    let mut kills = 0usize;
    let mut verified_seen = 0u64;
    let mut last_good = vec![false; map.count()];
    let mut log = String::new();
    let started = Instant::now();
    for run in 1.. {
        // The test's own view of the disk before the restart: no piece that was good went
        // bad, and every byte bitfetch ever called verified is there and passes SHA-1.
        let good = map.good(&file);
        let on_disk = map.bytes(&good);
        if let Some(lost) = (0..map.count()).find(|&p| last_good[p] && !good[p]) {
            fail(
                &format!("piece {lost} was good on disk and is not any more\n{log}"),
                &[&seeder],
            );
        }
        if on_disk < verified_seen {
            fail(
                &format!(
                    "bitfetch reported {verified_seen} bytes verified, but only {on_disk} bytes \
                     of good pieces are on disk\n{log}"
                ),
                &[&seeder],
            );
        }
        last_good = good;

        let kill = kills < KILLS;
        let point = kill.then(|| {
            let roll = rng.range(0, 9);
            let good_now = last_good.iter().filter(|g| **g).count();
            // Leave enough pieces for the kills still to come.
            let left = map.count() - good_now;
            let per_kill = (left / (KILLS - kills + 1)).clamp(1, 6) as u64;
            match roll {
                0 => KillPoint::AtSpawn,
                1 => KillPoint::AtListening,
                // A progress event comes each second, about 4 pieces at 128K/s.
                2..=4 if per_kill >= 4 => KillPoint::AfterProgress(rng.range(1, 2) as usize),
                _ => KillPoint::GoodPieces(good_now + rng.range(1, per_kill) as usize),
            }
        });
        let run_started = Instant::now();
        let d = start_download(
            &format!("downloader run {run}"),
            &fx.torrent,
            &out,
            ip,
            &[seeder_addr],
            &["--max-download-rate", "128K", "--announce-interval", "1"],
        );
        let report = match point {
            None => {
                assert_completes(&fx, &d, &out, &[&seeder, &tracker]);
                observe_run(&d, &tracker, run_started, on_disk, total, slack, &log)
            }
            Some(point) => {
                let mut good_live = last_good.clone();
                let exited_first = match point {
                    KillPoint::AtSpawn => false,
                    KillPoint::AtListening => wait_event(&d, DEADLINE, |ev| {
                        of_kind(ev, "listening").next().map(|_| ())
                    })
                    .is_none(),
                    KillPoint::AfterProgress(n) => {
                        wait_event(&d, DEADLINE, |ev| (progress(ev).len() >= n).then_some(()))
                            .is_none()
                    }
                    KillPoint::GoodPieces(n) => {
                        let reached = poll_until(DEADLINE, || {
                            if d.exit_status().is_some() {
                                return Some(false);
                            }
                            map.recheck(&file, &mut good_live);
                            (good_live.iter().filter(|g| **g).count() >= n).then_some(true)
                        });
                        match reached {
                            Some(reached) => !reached,
                            None => fail(
                                &format!("run {run}: the file never held {n} good pieces\n{log}"),
                                &[&d, &seeder],
                            ),
                        }
                    }
                };
                d.signal(libc::SIGKILL);
                let status = d.wait_timeout(Duration::from_secs(30));
                match status.map(|s| (s.code(), s.signal())) {
                    Some((_, Some(libc::SIGKILL))) => kills += 1,
                    // It finished between our last look and the signal: fine, and final.
                    Some((Some(0), _)) => assert_completes(&fx, &d, &out, &[&seeder]),
                    _ => fail(
                        &format!(
                            "run {run} ({point:?}, exited first: {exited_first}) ended neither \
                             by SIGKILL nor with 0\n{log}"
                        ),
                        &[&d, &seeder],
                    ),
                }
                let r = observe_run(&d, &tracker, run_started, on_disk, total, slack, &log);
                let _ = writeln!(
                    log,
                    "run {run}: {point:?}, {} on disk at start, {} verified seen, {:?}",
                    r.on_disk,
                    r.verified,
                    status.map(|s| s.into_raw())
                );
                r
            }
        };
        verified_seen = verified_seen.max(report.verified);
        if report.completed {
            let _ = writeln!(
                log,
                "run {run}: completed, {} on disk at start",
                report.on_disk
            );
            break;
        }
    }
    eprintln!("{log}{kills} kills, {:?} in all", started.elapsed());
    if kills < 20 {
        fail(
            &format!("only {kills} kills before the download completed\n{log}"),
            &[&seeder],
        );
    }
    assert_verifies(&fx.torrent, &file, &[&seeder]);
}

/// Checks one (finished or killed) run against what was on disk when it started, through its
/// JSON events and its announces (`left` and `downloaded`, every second): the resume counted
/// the good pieces on disk and nothing else, verified bytes never went down, and bytes
/// received track bytes verified (nothing refetched).
fn observe_run(
    d: &ChildGuard,
    tracker: &HttpTracker,
    run_started: Instant,
    on_disk: u64,
    total: u64,
    slack: u64,
    log: &str,
) -> RunReport {
    let ev = events(d);
    let bad = |why: String| -> ! { fail(&format!("{why}\nruns so far:\n{log}"), &[d, tracker]) };
    let seen = progress(&ev);
    if seen.windows(2).any(|w| w[1] < w[0]) || seen.iter().any(|&v| v > total) {
        bad(format!(
            "verified bytes went down or past {total}: {seen:?}"
        ));
    }
    if let Some(&first) = seen.first()
        && first < on_disk
    {
        bad(format!(
            "the first progress after the restart says {first} verified bytes, but {on_disk} \
             bytes of good pieces were on disk: the resume lost verified pieces"
        ));
    }
    let port = of_kind(&ev, "listening")
        .next()
        .and_then(|e| e["address"].as_str()?.parse::<SocketAddr>().ok())
        .map(|a| a.port());
    let announces: Vec<HttpRequest> = port.map_or_else(Vec::new, |port| {
        from_port(&tracker.requests(), port)
            .into_iter()
            .filter(|r| r.at >= run_started)
            .collect()
    });
    let mut verified = seen.iter().copied().max().unwrap_or(0);
    if announces.first().is_some_and(|a| a.event() != "started") {
        bad(format!(
            "the first announce after the restart is not `started`: {}",
            announces[0].describe()
        ));
    }
    for a in &announces {
        let (Some(left), Some(received)) = (a.num("left"), a.num("downloaded")) else {
            bad(format!(
                "announce without left/downloaded: {}",
                a.describe()
            ));
        };
        let had = total.saturating_sub(left);
        // The resume counted every good piece on disk, and nothing it had not received since
        // or found good: on_disk <= had <= on_disk + received.
        if had < on_disk || had > on_disk + received {
            bad(format!(
                "{had} bytes had with {on_disk} good on disk at the restart and {received} \
                 received since: the resume lost verified pieces or counted bad ones; {}",
                a.describe()
            ));
        }
        // Bytes received track bytes newly verified: nothing verified is fetched again.
        let gained = had - on_disk;
        if received > gained + slack {
            bad(format!(
                "{received} bytes received for {gained} bytes newly verified (slack {slack}): \
                 verified pieces were fetched again; {}",
                a.describe()
            ));
        }
        verified = verified.max(had);
    }
    let finished = of_kind(&ev, "finished").next();
    if let Some(f) = finished {
        let received = field(f, "transferred");
        if received > total - on_disk + slack {
            bad(format!(
                "the run that completed received {received} bytes, but only {} were missing \
                 (slack {slack})",
                total - on_disk
            ));
        }
    }
    RunReport {
        on_disk,
        verified,
        completed: finished.is_some(),
    }
}

// =============================================================================================
// 5. Disk full, in a private mount namespace
// =============================================================================================

/// Runs inside `unshare -rm`: a 1 MiB tmpfs that already holds the first part of the file
/// (a previous, interrupted download), a download that needs more room than that, then the
/// same partial file on an 8 MiB tmpfs and a second download. Results go to files in $WORK
/// (outside the tmpfs mounts) and `KEY=VALUE` lines on stdout.
const DISK_FULL_SCRIPT: &str = r#"
set -u
BITFETCH=$1 WORK=$2 TORRENT=$3 NAME=$4 SOURCE=$5 PARTIAL=$6 PEER=$7 BIND=$8
mkdir -p "$WORK/small" "$WORK/big"
mount -t tmpfs -o size=1m none "$WORK/small" || { echo "MOUNT_SMALL=failed"; exit 90; }
mkdir "$WORK/small/out"
head -c "$PARTIAL" "$SOURCE" > "$WORK/small/out/$NAME"
"$BITFETCH" download "$TORRENT" -o "$WORK/small/out" --port 0 --bind "$BIND" --peer "$PEER" \
    --json --timeout 60s >"$WORK/full.out" 2>"$WORK/full.err" </dev/null
echo "FULL_EXIT=$?"
cp "$WORK/small/out/$NAME" "$WORK/after-full" || echo "COPY_AFTER_FULL=failed"
mount -t tmpfs -o size=8m none "$WORK/big" || { echo "MOUNT_BIG=failed"; exit 91; }
cp -a "$WORK/small/out" "$WORK/big/out"
"$BITFETCH" download "$TORRENT" -o "$WORK/big/out" --port 0 --bind "$BIND" --peer "$PEER" \
    --json --timeout 60s >"$WORK/resume.out" 2>"$WORK/resume.err" </dev/null
echo "RESUME_EXIT=$?"
cp "$WORK/big/out/$NAME" "$WORK/result" || echo "COPY_RESULT=failed"
echo "DONE=1"
"#;

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn disk_full_is_a_clear_error_with_exit_5_and_a_bigger_disk_resumes() {
    let unshare = require_tool("unshare");
    let (_tracker, fx) = tracked_payload("disk-full", "big.bin", 2 * MIB + 777, 501, 15);
    let (seeder, seeder_addr) = start_seeder("seeder", &fx.torrent, &fx.data, next_loopback(), &[]);
    let work = scratch_dir();
    // 16 good pieces already there, then room for less than the rest.
    let partial = 16 * fx.pieces.piece_len;
    let mut command = Command::new(unshare);
    command
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
        .args(["-rm", "sh", "-c", DISK_FULL_SCRIPT, "sh"])
        .arg(bitfetch())
        .arg(work.path())
        .arg(&fx.torrent)
        .arg(&fx.name)
        .arg(&fx.data)
        .arg(partial.to_string())
        .arg(seeder_addr.to_string())
        .arg(next_loopback().to_string());
    let ns = ChildGuard::spawn("unshare -rm sh (disk full)", &mut command);
    ns.wait_with_deadline(DEADLINE * 2, &String::new);
    let stdout = ns.stdout_text();
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    let w = |name: &str| work.path().join(name);
    let full_err = fs::read_to_string(w("full.err")).unwrap_or_default();
    let resume_err = fs::read_to_string(w("resume.err")).unwrap_or_default();
    let details = format!(
        "----- namespace script stdout -----\n{stdout}\n----- its stderr -----\n{}\n\
         ----- full.err -----\n{full_err}\n----- resume.err -----\n{resume_err}\n\
         ----- full.out -----\n{}\n----- resume.out -----\n{}",
        ns.stderr_text(),
        fs::read_to_string(w("full.out")).unwrap_or_default(),
        fs::read_to_string(w("resume.out")).unwrap_or_default(),
    );
    if value("MOUNT_SMALL").is_some() || ns.exit_status().and_then(|s| s.code()) == Some(90) {
        panic!("`unshare -rm` + `mount -t tmpfs` is not allowed here:\n{details}");
    }
    if value("DONE").is_none() {
        panic!("the namespace script did not finish:\n{details}");
    }

    // The full disk: exit 5, a clear message, no SIGBUS (135), no panic, the partial data kept.
    let full_exit = value("FULL_EXIT").unwrap_or_default();
    if full_exit != "5"
        || !full_err.to_ascii_lowercase().contains("no space")
        || full_err.contains("SIGBUS")
        || full_err.contains("panicked")
    {
        panic!(
            "on a full disk: expected exit 5 and a `no space` error on stderr, got exit \
             {full_exit} (135 would be SIGBUS)\n{details}"
        );
    }
    let full_events = json_lines(&w("full.out"));
    if full_events.last().map(|e| (kind(e), e["code"].as_u64())) != Some(("error", Some(5))) {
        panic!("the last JSON event on a full disk must be `error` with code 5\n{details}");
    }
    let after_full = fs::read(w("after-full")).unwrap_or_default();
    let source = fs::read(&fx.data).expect("read the payload");
    if after_full.len() < partial as usize
        || after_full[..partial as usize] != source[..partial as usize]
    {
        panic!(
            "the failed run damaged the partial file it found ({} bytes now)\n{details}",
            after_full.len()
        );
    }

    // The bigger disk: the same partial file resumes, the 16 good pieces are not fetched again.
    if value("RESUME_EXIT").as_deref() != Some("0") {
        panic!("the resume on a bigger tmpfs did not exit 0\n{details}");
    }
    if let Err(e) = files_equal(&fx.data, &w("result")) {
        panic!("the resumed download is wrong: {e}\n{details}");
    }
    let resume_events = json_lines(&w("resume.out"));
    let first = progress(&resume_events).first().copied();
    let received = of_kind(&resume_events, "finished")
        .next()
        .map(|e| field(e, "transferred"));
    let slack = 3 * fx.pieces.piece_len;
    if first.is_some_and(|f| f < partial) || received.is_none_or(|r| r > fx.size - partial + slack)
    {
        panic!(
            "the resume should keep the {partial} good bytes: first progress {first:?}, \
             received {received:?} of {}\n{details}",
            fx.size
        );
    }
    drop(seeder);
    eprintln!("disk full: {}", full_err.trim());
}

// =============================================================================================
// 6. A seeded file overwritten, then truncated, while it is being served
// =============================================================================================

#[test]
fn seeded_file_changed_under_the_seeder_never_yields_a_bad_piece() {
    let (_tracker, fx) = tracked_payload("changed", "changed.bin", 2 * MIB + 555, 601, 15);
    let damaged = fx.copy_data("damaged");
    // A is throttled so it still has most of its queue to serve when its file changes; B is
    // an honest, untouched seeder.
    let (a, a_addr) = start_seeder(
        "seeder A (file changed)",
        &fx.torrent,
        &damaged,
        next_loopback(),
        &["--max-upload-rate", "128K"],
    );
    let (b, b_addr) = start_seeder(
        "seeder B",
        &fx.torrent,
        &fx.data,
        next_loopback(),
        &["--max-upload-rate", "128K"],
    );
    let (out, d) = download_from_two(&fx, a_addr, b_addr);
    let total = fx.size;
    let partial = wait_event(&d, DEADLINE, |ev| {
        progress(ev).into_iter().find(|&v| v > 0 && v < total / 2)
    });
    if partial.is_none() {
        fail(
            "no progress with partial data before changing A's file",
            &[&d, &a, &b],
        );
    }
    // Overwrite the middle half with other bytes (in place, same length).
    let f = OpenOptions::new()
        .write(true)
        .read(true)
        .open(&damaged)
        .expect("open A's file");
    let (from, to) = (total / 4, total * 3 / 4);
    let mut region = vec![0u8; (to - from) as usize];
    f.read_exact_at(&mut region, from).expect("read the region");
    for byte in &mut region {
        *byte ^= 0x5a;
    }
    f.write_all_at(&region, from).expect("overwrite the region");
    f.sync_all().expect("sync");
    // A notices when it is next asked for a changed piece.
    wait_for_disk_changed(&a, &d, &b);
    // Then cut the file to three eighths of its length.
    f.set_len(total * 3 / 8).expect("truncate A's file");
    drop(f);

    assert_completes(&fx, &d, &out, &[&a, &b]);
    assert_progress_sane(&d, total, &[&a, &b]);
    let ev = events(&d);
    let hash_failed = of_kind(&ev, "hash_failed").count();
    eprintln!(
        "download complete; {hash_failed} hash failures at the downloader; A's notices: {:?}",
        a.stderr_text()
            .lines()
            .filter(|l| l.contains("no longer matches"))
            .count()
    );
    // A survived both changes: still seeding, and it stops cleanly when asked.
    if !a.is_running() {
        fail("seeder A ended after its file changed", &[&a]);
    }
    a.signal(libc::SIGINT);
    let context = String::new;
    a.wait_with_deadline(Duration::from_secs(30), &context);
    let status = a.exit_status().expect("exited");
    if status.signal().is_some() || a.stderr_text().contains("panicked") {
        fail("seeder A died of a signal or panicked", &[&a]);
    }
}

/// Waits for seeder A's `disk_changed` notice (human mode: a stderr line).
fn wait_for_disk_changed(a: &ChildGuard, d: &ChildGuard, b: &ChildGuard) {
    let seen = poll_until(DEADLINE, || {
        if a.stderr_text()
            .contains("no longer matches its hash on disk")
        {
            return Some(true);
        }
        (!d.is_running() || !a.is_running()).then_some(false)
    });
    if seen != Some(true) {
        fail(
            "seeder A never reported a piece that no longer matches on disk",
            &[a, d, b],
        );
    }
}

/// What a downloader meets when a seeder's data changed under it: a peer that claims every
/// piece and rejects every request (BEP 6). The downloader must not turn that into a
/// request/reject loop: over the stall window each block is asked of this peer a bounded number
/// of times, whatever the machine's speed.
#[test]
fn a_seeder_rejecting_every_request_is_not_asked_again_in_a_loop() {
    /// Requests for one block from one peer within the 3 s stall window that still count as
    /// retrying, not looping.
    const MAX_ASKS_PER_BLOCK: u64 = 3;
    let _cpu = cpu_lock();
    let (_tracker, fx) = tracked_payload("rejecting", "rejected.bin", MIB, 602, 15);
    let fake = SeedSpec::new(fx.bytes().to_vec(), fx.pieces.piece_len)
        .misbehave(Misbehaviour::RejectAll)
        .start(next_loopback());
    let d = start_download(
        "downloader (rejecting seeder only)",
        &fx.torrent,
        &fx.dir_for("out"),
        next_loopback(),
        &[fake.addr()],
        &["--stall-timeout", "3s", "--timeout", "90s"],
    );
    let context = || report("other parties:", &[&fake]);
    d.wait_with_deadline(DEADLINE, &context);
    assert_exit_code(&d, 8, &[&fake]);
    let seen = fake.report();
    let (asks, blocks, most) = (
        seen.requests.len(),
        seen.distinct_blocks(),
        seen.max_requests_per_block() as u64,
    );
    eprintln!("rejecting seeder: {asks} requests for {blocks} blocks, at most {most} for one");
    if blocks == 0 || most > MAX_ASKS_PER_BLOCK {
        fail(
            &format!(
                "a block the peer rejected was requested from it again {most} times in 3 s \
                 ({asks} requests for {blocks} blocks): a request/reject loop (at most \
                 {MAX_ASKS_PER_BLOCK} expected)"
            ),
            &[&d, &fake],
        );
    }
}
