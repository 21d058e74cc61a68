//! End-to-end swarm behaviour (issue 5): leechers trading among themselves, bans of a
//! corrupting peer, the Fast extension on both sides, duplicate-connection resolution, seeding
//! limits, rate limits, and a mixed swarm with Transmission and aria2.
//!
//! Everything runs on loopback, each client on its own 127.x.y.z address (see
//! `swarm_support::own_ip`), with ports chosen by the kernel (`--port 0` and the
//! `bitfetch: listening on IP:PORT` line). Every process is owned by a guard that kills it by
//! PID; every wait is a poll with a generous deadline (a hang guard, not a speed expectation).
//! Only the two rate-limit tests and the `--seed-time` test look at the clock, and only to
//! measure what they are about.
//!
//! Observables: a recording HTTP tracker (`swarm_support::Tracker`) shows the `uploaded` /
//! `downloaded` / `left` each bitfetch reports; hand-written fake peers see the wire; `ss`
//! shows the TCP connections the kernel holds.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cli::{
    ChildGuard, assert_exit_code, spawn_bitfetch, wait_for_listening, wait_for_stderr,
};
use support::clients::{
    Opentracker, Transmission, aria2_seed_limited, connection_key, require_tool, sockets_between,
};
use support::fake_peer::{FakeLeecher, FakeSeeder, Misbehaviour, SeedSpec};
use support::fake_tracker::{Announce, PeerPolicy, SwarmTracker as Tracker};
use support::files::{files_equal, scratch_dir, write_payload};
use support::net::{free_port_on, next_loopback as own_ip};
use support::torrent::{BLOCK, Payload, Tracked, info_hash_hex, make_torrent_with_piece_log2};
use support::wire::{
    Wire, be32, frame, full_bitfield, handshake, has_fast_bit, id, parse_triple, peer_id, reserved,
    triple,
};
use support::{
    DEADLINE, Diagnose, TRANSMISSION_DEADLINE, fail, path_arg, poll_until, report,
    show_bytes as show, strings,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

// =============================================================================================
// Fixture
// =============================================================================================

/// One payload, its torrent (made by mktorrent) and a recording tracker it announces to.
type Fixture = Tracked<Tracker>;

fn fixture(name: &str, size: u64, piece_log2: u32, seed: u64, policy: PeerPolicy) -> Fixture {
    let tracker = Tracker::start(policy);
    let payload = Payload::new(name, size, seed, piece_log2, &tracker.announce_url());
    Tracked { payload, tracker }
}

impl Tracked<Tracker> {
    /// The payload's bytes, shared.
    fn data(&self) -> Arc<Vec<u8>> {
        Arc::new(self.bytes().to_vec())
    }

    /// A fake seeder of this payload on its own address.
    fn fake(&self, name: &str, how: Misbehaviour, fast: bool, have_all: bool) -> FakeSeeder {
        SeedSpec::new(self.data(), self.pieces.piece_len)
            .name(name)
            .info_hash(self.info_hash)
            .fast(fast)
            .have_all(have_all)
            .misbehave(how)
            .start(own_ip())
    }

    /// A fake seeder (`fast`, `have_all`, misbehaving as `how`) and a downloader (`dl_name`,
    /// plus `extra`) that knows only it: (the fake, OUT, the downloader).
    fn download_from_fake(
        &self,
        fake_name: &str,
        how: Misbehaviour,
        fast_have_all: (bool, bool),
        dl_name: &str,
        extra: &[&str],
    ) -> (FakeSeeder, PathBuf, ChildGuard) {
        let fake = self.fake(fake_name, how, fast_have_all.0, fast_have_all.1);
        let out = self.out_dir("out");
        let mut args = extra.to_vec();
        let addr = fake.addr.to_string();
        args.extend(["--peer", &addr]);
        let dl = self.download(dl_name, &out, own_ip(), &args);
        (fake, out, dl)
    }

    /// `bitfetch seed` of the original data on `ip`, any port, plus `extra`.
    fn seed(&self, name: &str, ip: Ipv4Addr, extra: &[&str]) -> ChildGuard {
        let mut args = strings(&["seed"]);
        args.push(path_arg(&self.torrent));
        args.push(path_arg(&self.source_dir()));
        args.extend(strings(&["--bind", &ip.to_string(), "--port", "0"]));
        args.extend(strings(extra));
        spawn_bitfetch(name, &args)
    }

    /// `bitfetch download` into `out` on `ip`, any port, plus `extra`.
    fn download(&self, name: &str, out: &Path, ip: Ipv4Addr, extra: &[&str]) -> ChildGuard {
        let mut args = strings(&["download"]);
        args.push(path_arg(&self.torrent));
        args.extend(strings(&["-o", &path_arg(out)]));
        args.extend(strings(&["--bind", &ip.to_string(), "--port", "0"]));
        args.extend(strings(extra));
        spawn_bitfetch(name, &args)
    }

    /// Runs `bitfetch verify` on `data_path`: (exit code, stdout).
    fn verify(&self, data_path: &Path) -> (Option<i32>, String) {
        let guard = support::cli::verify(&self.torrent, data_path);
        let code = guard.exit_status().and_then(|s| s.code());
        assert!(
            !guard.stderr_text().contains("panicked at"),
            "{}",
            report("bitfetch verify panicked", &[&guard])
        );
        (code, guard.stdout_text())
    }
}

/// Waits for a bitfetch to exit by itself and checks its exit code.
fn expect_exit(guard: &ChildGuard, code: i32, timeout: Duration, parts: &[&dyn Diagnose]) {
    let mut all: Vec<&dyn Diagnose> = vec![guard];
    all.extend_from_slice(parts);
    if guard.wait_timeout(timeout).is_none() {
        fail(
            &format!("{} did not exit within {timeout:?}", guard.name()),
            &all,
        );
    }
    assert_exit_code(guard, code, parts);
}

/// SIGTERM, then the exit code the contract promises.
fn terminate(guard: &ChildGuard, code: i32, parts: &[&dyn Diagnose]) {
    guard.signal(libc::SIGTERM);
    expect_exit(guard, code, Duration::from_secs(30), parts);
}

// =============================================================================================
// 1. Leechers trade among themselves
// =============================================================================================

/// A rate-limited bitfetch seeder and four bitfetch leechers, introduced by the tracker. All
/// complete byte-identical, and the seeder's own `stopped` announce shows it uploaded at most
/// three copies' worth: the four copies the leechers hold must then include at least one whole
/// copy that leechers uploaded to each other. (Without trading the seeder would report four
/// copies or more.)
#[test]
fn leechers_trade_among_themselves() {
    const LEECHERS: usize = 4;
    let fx = fixture("trade.bin", 2 * MIB + 12_345, 15, 1, PeerPolicy::Everyone);
    let size = fx.size;
    let seed_ip = own_ip();
    let seeder = fx.seed(
        "seeder (256K/s)",
        seed_ip,
        &["--max-upload-rate", "256K", "--announce-interval", "1"],
    );
    let seed_port = wait_for_listening(&seeder).port();

    let leechers: Vec<(ChildGuard, PathBuf, u16)> = (0..LEECHERS)
        .map(|i| {
            let out = fx.out_dir(&format!("leecher{i}"));
            let guard = fx.download(
                &format!("leecher {i}"),
                &out,
                own_ip(),
                &["--announce-interval", "1"],
            );
            let port = wait_for_listening(&guard).port();
            (guard, out, port)
        })
        .collect();

    let mut everyone: Vec<&dyn Diagnose> = vec![&seeder, &fx.tracker];
    everyone.extend(leechers.iter().map(|(g, _, _)| g as &dyn Diagnose));
    for (guard, out, _) in &leechers {
        expect_exit(guard, 0, DEADLINE, &everyone);
        fx.assert_same(&out.join(&fx.name), &everyone);
    }
    terminate(&seeder, 0, &everyone);

    let stopped = |port: u16, who: &str| -> Announce {
        fx.tracker
            .wait_event(port, "stopped", Duration::from_secs(10))
            .unwrap_or_else(|| fail(&format!("{who} sent no `stopped` announce"), &everyone))
    };
    let seeder_up = stopped(seed_port, "the seeder").uploaded;
    let leecher_up: Vec<u64> = leechers
        .iter()
        .map(|(_, _, port)| stopped(*port, "a leecher").uploaded)
        .collect();
    let received = LEECHERS as u64 * size;
    let from_leechers = received.saturating_sub(seeder_up);
    let numbers = format!(
        "payload {size} bytes x {LEECHERS} leechers = {received} bytes received; the seeder \
         reported uploaded={seeder_up}; the leechers reported uploaded={leecher_up:?}"
    );
    if from_leechers < size {
        fail(
            &format!(
                "leechers did not trade: at most {from_leechers} bytes can have come from \
                 other leechers, less than one copy ({numbers})"
            ),
            &everyone,
        );
    }
    if leecher_up.iter().sum::<u64>() == 0 {
        fail(
            &format!("no leecher reports having uploaded anything ({numbers})"),
            &everyone,
        );
    }
    eprintln!("leechers_trade_among_themselves: {numbers}");
}

// =============================================================================================
// 2. A corrupting peer
// =============================================================================================

/// A fake seeder that flips a byte in every block it sends, next to a good (slow) bitfetch
/// seeder: the downloader bans the fake, completes byte-identical from the good one, and never
/// talks to the fake again — no new connection to it, no request to it, and when the fake
/// dials in with the same peer id it is sent no request either.
#[test]
fn corrupting_peer_is_banned_and_the_download_completes() {
    let fx = fixture("corrupt.bin", MIB + 5_000, 15, 2, PeerPolicy::Nobody);
    let fake = fx.fake(
        "corrupting fake seeder",
        Misbehaviour::CorruptEveryBlock,
        false,
        false,
    );
    // Slow, so the download outlasts the ban by a good margin: time for any wrong redial.
    let good = fx.seed(
        "good seeder (128K/s)",
        own_ip(),
        &["--max-upload-rate", "128K"],
    );
    let good_addr = wait_for_listening(&good);
    let out = fx.out_dir("out");
    let dl = fx.download(
        "downloader",
        &out,
        own_ip(),
        &[
            "--peer",
            &fake.addr.to_string(),
            "--peer",
            &good_addr.to_string(),
        ],
    );
    let dl_addr = wait_for_listening(&dl);
    let parts: [&dyn Diagnose; 4] = [&dl, &fake, &good, &fx.tracker];

    let ban = wait_for_stderr(&dl, &format!("banned peer {}", fake.addr), DEADLINE);
    // The banned connection goes away...
    let closed = poll_until(Duration::from_secs(30), || {
        let r = fake.report();
        (r.closed == r.accepts).then_some(())
    });
    if closed.is_none() {
        fail("the banned peer's connection was not closed", &parts);
    }
    let accepts_at_ban = fake.report().accepts;
    let requests_at_ban = fake.report().requests.len();
    // ...and when the fake comes back on its own, it is turned away without a request.
    fake.dial(dl_addr);

    expect_exit(&dl, 0, DEADLINE, &parts);
    fx.assert_same(&out.join(&fx.name), &parts);
    let redial_done = poll_until(Duration::from_secs(60), || {
        fake.report()
            .endings
            .iter()
            .any(|l| l.contains("outbound to"))
            .then_some(())
    });
    if redial_done.is_none() {
        fail("the fake's own connection attempt never ended", &parts);
    }
    let stderr = dl.stderr_text();
    assert!(
        stderr.contains("failed its hash check"),
        "{}",
        report("no piece failure was reported before the ban", &parts)
    );
    assert_eq!(
        accepts_at_ban,
        1,
        "{}",
        report(
            "the downloader dialled the fake more than once before banning it",
            &parts
        )
    );
    assert_eq!(
        fake.report().accepts,
        accepts_at_ban,
        "{}",
        report(
            &format!("the downloader dialled the banned peer again after: {ban}"),
            &parts
        )
    );
    assert_eq!(
        fake.report().requests.len(),
        requests_at_ban,
        "{}",
        report("the banned peer was sent requests after the ban", &parts)
    );
}

/// The corrupting fake seeder alone: no piece ever passes, the fake is banned, SIGTERM gives
/// 130 (incomplete), and `bitfetch verify` finds every piece bad in what was written.
#[test]
fn corrupting_peer_alone_never_completes_a_piece() {
    let fx = fixture(
        "corrupt-alone.bin",
        512 * KIB + 100,
        15,
        3,
        PeerPolicy::Nobody,
    );
    let (fake, out, dl) = fx.download_from_fake(
        "corrupting fake seeder",
        Misbehaviour::CorruptEveryBlock,
        (false, false),
        "downloader",
        &[],
    );
    let parts: [&dyn Diagnose; 3] = [&dl, &fake, &fx.tracker];
    wait_for_stderr(&dl, &format!("banned peer {}", fake.addr), DEADLINE);
    assert!(
        fake.report().blocks_sent() > 0,
        "{}",
        report("the fake was banned without having sent a block", &parts)
    );
    terminate(&dl, 130, &parts);
    let stderr = dl.stderr_text();
    assert!(
        stderr.contains("failed its hash check") && !stderr.contains("bitfetch: downloaded"),
        "{}",
        report("expected hash failures and no completion", &parts)
    );
    // Nothing verified: the run takes back the file it made, which held only zeros and
    // unverified bytes from the corrupting peer.
    let (code, stdout) = fx.verify(&out.join(&fx.name));
    assert!(
        code == Some(1) && stdout.is_empty() && !out.join(&fx.name).exists(),
        "{}",
        report(
            &format!(
                "bitfetch verify: exit {code:?}, stdout {stdout:?}; expected exit 1 and no data left"
            ),
            &parts
        )
    );
}

// =============================================================================================
// 3. The Fast extension
// =============================================================================================

/// A fake seeder with the Fast bit that sends `have all` instead of a bitfield: bitfetch
/// downloads from it, and (having nothing) introduces itself with `have none`.
#[test]
fn have_all_seeder_is_downloaded_from() {
    let fx = fixture("haveall.bin", MIB + 333, 15, 4, PeerPolicy::Nobody);
    let (fake, out, dl) = fx.download_from_fake(
        "have-all fake seeder",
        Misbehaviour::Honest,
        (true, true),
        "downloader",
        &[],
    );
    let parts: [&dyn Diagnose; 3] = [&dl, &fake, &fx.tracker];
    expect_exit(&dl, 0, DEADLINE, &parts);
    fx.assert_same(&out.join(&fx.name), &parts);
    let reserved = fake.report().their_reserved;
    assert!(
        reserved.first().is_some_and(has_fast_bit),
        "{}",
        report("bitfetch's handshake lacks the Fast bit", &parts)
    );
    let first = fake.report().first_msgs;
    assert_eq!(
        first.first(),
        Some(&id::HAVE_NONE),
        "{}",
        report(
            "bitfetch, having nothing, should open with `have none` (id 15) to a Fast peer",
            &parts
        )
    );
}

/// A bitfetch seeder of `fx` and a hand-driven connection to it from an address of our own,
/// on which our handshake (with the Fast bit or not, peer id tagged `tag`) and `then` went out.
fn seeder_and_wire(fx: &Fixture, fast: bool, tag: &str, then: &[u8]) -> (ChildGuard, Wire) {
    let seeder = fx.seed("seeder", own_ip(), &[]);
    let seed_addr = wait_for_listening(&seeder);
    let mut s = Wire::dial(own_ip(), seed_addr).expect("connect to the seeder");
    let mut hello = handshake(&fx.info_hash, &peer_id(tag), reserved(fast));
    hello.extend_from_slice(then);
    s.send(&hello).expect("send handshake");
    (seeder, s)
}

/// Sends a request for each of `blocks` in one write; returns how many went out.
fn send_requests(wire: &mut Wire, blocks: &[(u32, u32, u32)]) -> usize {
    let batch: Vec<u8> = blocks
        .iter()
        .flat_map(|b| frame(id::REQUEST, &triple(b.0, b.1, b.2)))
        .collect();
    wire.send(&batch).expect("send requests");
    blocks.len()
}

/// Reads messages until one satisfies `want`, failing on EOF or the deadline.
fn next_msg(
    wire: &mut Wire,
    deadline: Instant,
    what: &str,
    parts: &[&dyn Diagnose],
) -> (u8, Vec<u8>) {
    match wire.next_message(deadline) {
        Ok(Some(m)) => m,
        Ok(None) => fail(&format!("waiting for {what}: deadline passed"), parts),
        Err(e) => fail(&format!("waiting for {what}: {e}"), parts),
    }
}

/// bitfetch seeding to a hand-written Fast leecher: it sets the Fast bit, opens with
/// `have all`, rejects requests made while the peer is choked, serves after unchoking, and
/// answers every request exactly once.
#[test]
fn seeder_speaks_fast_to_a_fast_peer() {
    let fx = fixture("fastseed.bin", 512 * KIB + 1_000, 15, 5, PeerPolicy::Nobody);
    let (seeder, mut s) = seeder_and_wire(&fx, true, "FL3", &[]);
    let parts: [&dyn Diagnose; 2] = [&seeder, &fx.tracker];
    let deadline = Instant::now() + DEADLINE;
    let (theirs, hash, _) = s
        .handshake_parts(Duration::from_secs(30))
        .expect("the seeder's handshake");
    assert_eq!(hash, fx.info_hash);
    assert!(
        has_fast_bit(&theirs),
        "{}",
        report(
            &format!("bitfetch's reserved bytes {theirs:?} lack the Fast bit"),
            &parts
        )
    );
    let (first, payload) = next_msg(&mut s, deadline, "the first message", &parts);
    assert!(
        first == id::HAVE_ALL && payload.is_empty(),
        "{}",
        report(
            &format!(
                "first message was id {first} ({} bytes), expected have all (14)",
                payload.len()
            ),
            &parts
        )
    );

    // answers[request] = what came back for it, in order.
    let mut answers: std::collections::HashMap<(u32, u32, u32), Vec<u8>> = Default::default();
    let blocks = fx.geo().blocks();
    let choked_requests: Vec<_> = blocks[..3].to_vec();
    let unchoked_requests: Vec<_> = blocks[3..11].to_vec();
    let sentinel = *blocks.last().unwrap();
    let mut pending = 0usize;
    let mut unchoked = false;
    let record = |answers: &mut std::collections::HashMap<_, Vec<u8>>,
                  mid: u8,
                  payload: &[u8],
                  unchoked: &mut bool|
     -> bool {
        match mid {
            id::UNCHOKE => *unchoked = true,
            id::CHOKE => *unchoked = false,
            id::REJECT => {
                let t = parse_triple(payload).expect("12-byte reject");
                answers.entry(t).or_default().push(id::REJECT);
                return true;
            }
            id::PIECE => {
                let t = (be32(payload, 0), be32(payload, 4), payload.len() as u32 - 8);
                let start = fx.geo().offset(t.0, t.1);
                assert_eq!(
                    &payload[8..],
                    &fx.data()[start..start + t.2 as usize],
                    "wrong data for block {t:?}"
                );
                answers.entry(t).or_default().push(id::PIECE);
                return true;
            }
            _ => {}
        }
        false
    };

    // Requests while choked (we have not even said we are interested): one reject each.
    pending += send_requests(&mut s, &choked_requests);
    while pending > 0 {
        let (mid, p) = next_msg(
            &mut s,
            deadline,
            "rejects of requests made while choked",
            &parts,
        );
        assert_ne!(
            mid,
            id::PIECE,
            "{}",
            report("served a request made while choked", &parts)
        );
        if record(&mut answers, mid, &p, &mut unchoked) {
            pending -= 1;
        }
    }
    for b in &choked_requests {
        assert_eq!(
            answers.get(b).map(Vec::as_slice),
            Some(&[id::REJECT][..]),
            "{}",
            report(
                &format!(
                    "request {b:?} made while choked: answers {:?}",
                    answers.get(b)
                ),
                &parts
            )
        );
    }

    // Interested: bitfetch unchokes us (a free upload slot), then serves.
    s.send(&frame(id::INTERESTED, &[]))
        .expect("send interested");
    while !unchoked {
        let (mid, p) = next_msg(&mut s, deadline, "an unchoke after interested", &parts);
        record(&mut answers, mid, &p, &mut unchoked);
    }
    pending += send_requests(&mut s, &unchoked_requests);
    while pending > 0 {
        let (mid, p) = next_msg(&mut s, deadline, "answers to requests", &parts);
        if record(&mut answers, mid, &p, &mut unchoked) {
            pending -= 1;
        }
    }
    // A last request: by the time its answer arrives, any duplicate answer to an earlier one
    // would have been sent before it.
    s.send(&frame(
        id::REQUEST,
        &triple(sentinel.0, sentinel.1, sentinel.2),
    ))
    .expect("send request");
    while !answers.contains_key(&sentinel) {
        let (mid, p) = next_msg(&mut s, deadline, "the answer to the last request", &parts);
        record(&mut answers, mid, &p, &mut unchoked);
    }
    for b in unchoked_requests.iter().chain([&sentinel]) {
        assert_eq!(
            answers.get(b).map(Vec::len),
            Some(1),
            "{}",
            report(
                &format!("request {b:?}: answers {:?}", answers.get(b)),
                &parts
            )
        );
    }
    let asked: Vec<_> = choked_requests
        .iter()
        .chain(&unchoked_requests)
        .chain([&sentinel])
        .collect();
    let extra: Vec<_> = answers.keys().filter(|k| !asked.contains(k)).collect();
    assert!(
        extra.is_empty(),
        "{}",
        report(
            &format!("answers to requests never made: {extra:?}"),
            &parts
        )
    );
    // The only interested peer of a seeder with four slots stays unchoked: all are served.
    let served = answers.values().filter(|a| a == &&vec![id::PIECE]).count();
    assert_eq!(
        served,
        unchoked_requests.len() + 1,
        "{}",
        report(
            &format!("not every request made after the unchoke was served: {answers:?}"),
            &parts
        )
    );
}

/// BEP 6: `have all` / `have none` / bitfield must be the first message after the handshake.
/// A Fast peer that sends a request right behind its handshake (before it has seen what we
/// have) must still get `have all` first, and then exactly one reject for that request.
#[test]
fn fast_intro_comes_first_even_when_a_request_is_pipelined() {
    let fx = fixture(
        "fastpipe.bin",
        256 * KIB + 1_000,
        15,
        14,
        PeerPolicy::Nobody,
    );
    let request = frame(id::REQUEST, &triple(0, 0, BLOCK));
    let (seeder, mut s) = seeder_and_wire(&fx, true, "FLP", &request);
    let parts: [&dyn Diagnose; 2] = [&seeder, &fx.tracker];
    let deadline = Instant::now() + DEADLINE;
    s.handshake_parts(Duration::from_secs(30))
        .expect("the seeder's handshake");
    let (first, _) = next_msg(&mut s, deadline, "the first message", &parts);
    let (second, payload) = next_msg(&mut s, deadline, "the second message", &parts);
    assert!(
        first == id::HAVE_ALL
            && second == id::REJECT
            && parse_triple(&payload) == Some((0, 0, BLOCK)),
        "{}",
        report(
            &format!(
                "messages after the handshake: id {first}, then id {second}; expected have all \
                 (14) first, then the reject (16) of the request"
            ),
            &parts
        )
    );
}

/// A peer that did not set the Fast bit gets a bitfield (not `have all`), and is disconnected
/// when it sends a Fast message anyway. Before that, the connection works (interested →
/// unchoke), so the disconnection is the Fast message's doing.
#[test]
fn fast_message_without_the_fast_bit_disconnects() {
    let fx = fixture("nofast.bin", 256 * KIB + 10, 15, 6, PeerPolicy::Nobody);
    let (seeder, mut s) = seeder_and_wire(&fx, false, "NF3", &[]);
    let parts: [&dyn Diagnose; 2] = [&seeder, &fx.tracker];
    let deadline = Instant::now() + DEADLINE;
    s.handshake_parts(Duration::from_secs(30))
        .expect("the seeder's handshake");
    let (first, payload) = next_msg(&mut s, deadline, "the first message", &parts);
    assert!(
        first == id::BITFIELD && payload == full_bitfield(fx.geo().pieces()),
        "{}",
        report(
            &format!(
                "first message to a non-Fast peer was id {first} ({} bytes), expected a full bitfield (5)",
                payload.len()
            ),
            &parts
        )
    );
    s.send(&frame(id::INTERESTED, &[]))
        .expect("send interested");
    loop {
        let (mid, _) = next_msg(&mut s, deadline, "an unchoke after interested", &parts);
        if mid == id::UNCHOKE {
            break;
        }
    }
    s.send(&frame(id::HAVE_NONE, &[])).expect("send have none");
    loop {
        match s.next_message(deadline) {
            Ok(Some(_)) => continue,
            Err(_) => break,
            Ok(None) => fail(
                "after a Fast message without the Fast bit the connection stayed open (deadline passed)",
                &parts,
            ),
        }
    }
    assert!(seeder.is_running(), "{}", report("the seeder died", &parts));
}

// =============================================================================================
// 4. Both ends dial each other
// =============================================================================================

/// Both ends dial each other: a bitfetch seeder dials a fake peer (`--peer`), and the fake
/// peer, under the same peer id, connects back to the seeder's listening address. bitfetch
/// must close exactly one of the two, the one the shared rule says (both ends keep the
/// connection opened by the side with the larger peer id), and keep the other open. Run once
/// with a fake id above bitfetch's and once below, so both outcomes are exercised.
#[test]
fn both_ends_dialling_each_other_keep_one_connection() {
    let fx = fixture("twin.bin", 256 * KIB + 7, 15, 7, PeerPolicy::Nobody);
    for fake_id in [[0xffu8; 20], [0x00u8; 20]] {
        let fake_ip = own_ip();
        let listener = std::net::TcpListener::bind((fake_ip, 0)).expect("bind the fake peer");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let fake_addr = listener.local_addr().expect("local_addr");
        let seeder_ip = own_ip();
        let seeder = fx.seed(
            "seeder",
            seeder_ip,
            &[
                "--peer",
                &fake_addr.to_string(),
                "--announce-interval",
                "60",
            ],
        );
        let seeder_addr = wait_for_listening(&seeder);
        let parts: [&dyn Diagnose; 1] = [&seeder];

        // 1. The seeder dials us: answer its handshake.
        let accepted = poll_until(DEADLINE, || match listener.accept() {
            Ok((s, _)) => Some(s),
            Err(_) => None,
        });
        let Some(dialled) = accepted else {
            fail("the seeder never dialled the --peer address", &parts);
        };
        let mut dialled = Wire::new(dialled);
        let (_, hash, seeder_id) = dialled
            .handshake_parts(Duration::from_secs(30))
            .expect("the seeder's handshake");
        assert_eq!(hash, fx.info_hash);
        dialled
            .send(&handshake(&fx.info_hash, &fake_id, reserved(false)))
            .expect("answer the handshake");
        // Its first message (the bitfield) shows the connection is fully up on its side.
        let deadline = Instant::now() + DEADLINE;
        let (first, _) = next_msg(&mut dialled, deadline, "the bitfield", &parts);
        assert_eq!(first, id::BITFIELD, "{}", report("first message", &parts));

        // 2. The same peer connects back.
        let mut back = Wire::dial(fake_ip, seeder_addr).expect("connect back to the seeder");
        back.send(&handshake(&fx.info_hash, &fake_id, reserved(false)))
            .expect("send the second handshake");
        let _ = back.handshake_parts(Duration::from_secs(30));

        // 3. Exactly the one the rule names is closed.
        let keep_seeders_outbound = seeder_id > fake_id;
        let (mut doomed, mut kept, which) = if keep_seeders_outbound {
            (back, dialled, "the connection we opened")
        } else {
            (dialled, back, "the connection the seeder opened")
        };
        let closed = poll_until(DEADLINE, || {
            match doomed.next_message(Instant::now() + Duration::from_millis(200)) {
                Err(_) => Some(()),
                Ok(_) => None,
            }
        });
        if closed.is_none() {
            fail(
                &format!(
                    "seeder id {} vs ours {}: {which} should have been closed",
                    show(&seeder_id),
                    show(&fake_id)
                ),
                &parts,
            );
        }
        // The survivor still works: it is told about interest and answers with an unchoke
        // (the seeder has free upload slots).
        kept.send(&frame(id::INTERESTED, &[]))
            .expect("send interested on the survivor");
        let mut unchoked = false;
        while Instant::now() < deadline && !unchoked {
            match kept.next_message(deadline) {
                Ok(Some((m, _))) => unchoked = m == id::UNCHOKE,
                Ok(None) => {}
                Err(e) => fail(
                    &format!("the connection that should survive ended: {e}"),
                    &parts,
                ),
            }
        }
        assert!(
            unchoked,
            "{}",
            report("the survivor never unchoked us", &parts)
        );
        terminate(&seeder, 0, &parts);
    }
}

/// The same pair with an ordinary tracker that lists every peer on every announce (each side
/// re-announces every second). Once the twin connections are resolved, neither side may keep
/// dialling the other: over two more announces from each, no new TCP connection between them
/// may appear. A closed connection stays in TIME-WAIT for a minute, so `ss` cannot miss one.
#[test]
fn a_connected_peer_is_not_redialled_on_every_announce() {
    let fx = fixture("redial.bin", 512 * KIB + 9, 15, 13, PeerPolicy::Everyone);
    let (ip_a, ip_b) = (own_ip(), own_ip());
    let a = fx.seed("seeder A", ip_a, &["--announce-interval", "1"]);
    let addr_a = wait_for_listening(&a);
    let out = fx.out_dir("out");
    let b = fx.download(
        "downloader B (--seed)",
        &out,
        ip_b,
        &["--seed", "--announce-interval", "1"],
    );
    let addr_b = wait_for_listening(&b);
    let parts: [&dyn Diagnose; 3] = [&a, &b, &fx.tracker];
    if fx
        .tracker
        .wait_event(addr_b.port(), "completed", DEADLINE)
        .is_none()
    {
        fail("the downloader never announced `completed`", &parts);
    }
    fx.assert_same(&out.join(&fx.name), &parts);
    let keys = || -> std::collections::BTreeSet<(SocketAddr, SocketAddr)> {
        sockets_between(ip_a, ip_b)
            .iter()
            .map(connection_key)
            .collect()
    };
    // Settled: one connection is left (a twin may or may not have been opened and closed,
    // depending on who learnt of the other first).
    let settled = || {
        let estab: std::collections::BTreeSet<_> = sockets_between(ip_a, ip_b)
            .iter()
            .filter(|s| s.state == "ESTAB")
            .map(connection_key)
            .collect();
        estab.len() == 1
    };
    if poll_until(Duration::from_secs(50), || settled().then_some(())).is_none() {
        fail(
            &format!(
                "never exactly one established connection: {:?}",
                sockets_between(ip_a, ip_b)
            ),
            &parts,
        );
    }
    let before = keys();
    let count = |port: u16| fx.tracker.announces_from(port).len();
    let (na, nb) = (count(addr_a.port()), count(addr_b.port()));
    if poll_until(Duration::from_secs(60), || {
        (count(addr_a.port()) >= na + 2 && count(addr_b.port()) >= nb + 2).then_some(())
    })
    .is_none()
    {
        fail("the two peers stopped re-announcing", &parts);
    }
    let after = keys();
    let new: Vec<_> = after.difference(&before).collect();
    if !new.is_empty() {
        fail(
            &format!(
                "already connected (A {addr_a}, B {addr_b}), they opened {} more connection(s) \
                 to each other during two announces: {new:?}",
                new.len()
            ),
            &parts,
        );
    }
    terminate(&b, 0, &parts);
    terminate(&a, 0, &parts);
}

// =============================================================================================
// 5. Seeding limits
// =============================================================================================

/// `seed --seed-ratio 1` with two hand-written leechers that each want the whole torrent (twice
/// the size in demand, and they never learn of each other): the seeder exits 0 by itself once
/// it has uploaded the size, not when demand runs out (a leecher is left unfinished). The
/// seeder's upload is capped at 2M/s only so that both leechers are served side by side and
/// the ratio is reached in the middle of both transfers, not at the end of one.
///
/// Bounds. The `stopped` announce carries bitfetch's own count, which only moves a block (16
/// KiB) at a time and is checked after every block, so `size <= uploaded < size + one piece`
/// (32 KiB, two blocks) leaves a block of slack and still fails on any real overshoot. What
/// the leechers actually received may run ahead of that count by the blocks each connection
/// had already committed to the wire when the seeder's session decided to stop: the block
/// being sent plus the one a rate-limited connection's writer sends between looks at its
/// command queue; five blocks per leecher on top leaves room (seen: three to seven in all).
#[test]
fn seed_ratio_stops_at_exactly_the_ratio() {
    let fx = fixture("ratio.bin", MIB + 777, 15, 8, PeerPolicy::Nobody);
    let size = fx.size;
    let seeder = fx.seed(
        "seeder (--seed-ratio 1)",
        own_ip(),
        &["--seed-ratio", "1", "--max-upload-rate", "2M"],
    );
    let seed_addr = wait_for_listening(&seeder);
    let leechers: Vec<FakeLeecher> = (0..2)
        .map(|i| {
            FakeLeecher::start(
                &format!("fake leecher {i}"),
                own_ip(),
                seed_addr,
                fx.info_hash,
                fx.data(),
                fx.geo(),
                32,
            )
        })
        .collect();
    let mut parts: Vec<&dyn Diagnose> = vec![&seeder, &fx.tracker];
    parts.extend(leechers.iter().map(|l| l as &dyn Diagnose));

    expect_exit(&seeder, 0, DEADLINE, &parts);
    let Some(stopped) = fx
        .tracker
        .wait_event(seed_addr.port(), "stopped", Duration::from_secs(10))
    else {
        fail("the seeder sent no `stopped` announce", &parts);
    };
    // The leechers see the connection close; then their counts are final.
    if poll_until(Duration::from_secs(30), || {
        leechers.iter().all(|l| l.ended().is_some()).then_some(())
    })
    .is_none()
    {
        fail(
            "the leechers' connections stayed open after the seeder exited",
            &parts,
        );
    }
    let received: u64 = leechers.iter().map(FakeLeecher::bytes).sum();
    let bad: usize = leechers.iter().map(|l| l.report().bad_blocks).sum();
    let piece = fx.geo().piece_len;
    let each: Vec<u64> = leechers.iter().map(FakeLeecher::bytes).collect();
    let numbers = format!(
        "size {size}, stopped announce uploaded={}, leechers received {received} bytes \
         ({each:?})",
        stopped.uploaded
    );
    assert_eq!(bad, 0, "{}", report("the seeder sent wrong data", &parts));
    if leechers.iter().all(|l| l.report().done) {
        fail(
            &format!(
                "both leechers finished: the ratio was not what stopped the seeder ({numbers})"
            ),
            &parts,
        );
    }
    if !(size <= stopped.uploaded && stopped.uploaded < size + piece) {
        fail(
            &format!("reported upload outside [size, size + one piece): {numbers}"),
            &parts,
        );
    }
    let slack = 2 * 5 * u64::from(BLOCK);
    if !(received >= size && received < stopped.uploaded + slack) {
        fail(
            &format!("bytes actually received outside [size, reported + {slack}): {numbers}"),
            &parts,
        );
    }
    eprintln!("seed_ratio_stops_at_exactly_the_ratio: {numbers}");
}

/// `seed --seed-time 3s` with nobody to seed to: exits 0 by itself, no sooner than 3 s after
/// it was started, and says `stopped` to the tracker.
#[test]
fn seed_time_stops_after_the_time() {
    let fx = fixture("seedtime.bin", 64 * KIB + 1, 15, 9, PeerPolicy::Nobody);
    let started = Instant::now();
    let seeder = fx.seed("seeder (--seed-time 3s)", own_ip(), &["--seed-time", "3s"]);
    let port = wait_for_listening(&seeder).port();
    let parts: [&dyn Diagnose; 2] = [&seeder, &fx.tracker];
    expect_exit(&seeder, 0, DEADLINE, &parts);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3),
        "{}",
        report(&format!("--seed-time 3s exited after {elapsed:?}"), &parts)
    );
    if fx
        .tracker
        .wait_event(port, "stopped", Duration::from_secs(10))
        .is_none()
    {
        fail("no `stopped` announce after the seed time", &parts);
    }
}

// =============================================================================================
// 6. Rate limits
// =============================================================================================

const RATE: f64 = 1_048_576.0;
const WINDOW: Duration = Duration::from_secs(10);

fn check_rate(what: &str, bytes: u64, elapsed: Duration, parts: &[&dyn Diagnose]) {
    let rate = bytes as f64 / elapsed.as_secs_f64();
    let error = (rate - RATE) / RATE;
    eprintln!(
        "{what}: {bytes} bytes in {elapsed:?} = {rate:.0} B/s ({:+.1}% of 1 MiB/s)",
        error * 100.0
    );
    if error.abs() > 0.10 {
        fail(
            &format!(
                "{what}: {rate:.0} B/s over {elapsed:?} is {:+.1}% off 1 MiB/s (limit 1M, \
                 tolerance 10%)",
                error * 100.0
            ),
            parts,
        );
    }
}

/// `seed --max-upload-rate 1M` to a hand-written leecher that asks for 16 MiB as fast as it
/// can: after the first MiB (past the token bucket's initial burst), the bytes the leecher
/// receives over 10 s average 1 MiB/s within 10 %.
#[test]
fn upload_rate_limit_holds_over_ten_seconds() {
    let fx = fixture("uprate.bin", 16 * MIB, 18, 10, PeerPolicy::Nobody);
    let seeder = fx.seed("seeder (1M/s up)", own_ip(), &["--max-upload-rate", "1M"]);
    let seed_addr = wait_for_listening(&seeder);
    let leecher = FakeLeecher::start(
        "fake leecher",
        own_ip(),
        seed_addr,
        fx.info_hash,
        fx.data(),
        fx.geo(),
        64,
    );
    let parts: [&dyn Diagnose; 3] = [&seeder, &leecher, &fx.tracker];
    let Some((t0, b0)) = poll_until(DEADLINE, || {
        let b = leecher.bytes();
        (b >= MIB).then(|| (Instant::now(), b))
    }) else {
        fail("the leecher never got its first MiB", &parts);
    };
    let Some((t1, b1)) = poll_until(WINDOW + Duration::from_secs(5), || {
        let now = Instant::now();
        (now >= t0 + WINDOW).then(|| (now, leecher.bytes()))
    }) else {
        unreachable!("the window ends")
    };
    assert!(
        !leecher.report().done && leecher.ended().is_none(),
        "{}",
        report("the transfer ended inside the measuring window", &parts)
    );
    check_rate("upload limit", b1 - b0, t1 - t0, &parts);
}

/// `download --max-download-rate 1M` from a hand-written seeder that sends as fast as asked:
/// the downloader's own `downloaded` counter (from its announces, every second) grows by 1 MiB/s
/// within 10 % over a 10 s window that starts after its first MiB.
#[test]
fn download_rate_limit_holds_over_ten_seconds() {
    let fx = fixture("downrate.bin", 16 * MIB, 18, 11, PeerPolicy::Nobody);
    let (fake, _out, dl) = fx.download_from_fake(
        "fast fake seeder",
        Misbehaviour::Honest,
        (true, false),
        "downloader (1M/s down)",
        &["--max-download-rate", "1M", "--announce-interval", "1"],
    );
    let port = wait_for_listening(&dl).port();
    let parts: [&dyn Diagnose; 3] = [&dl, &fake, &fx.tracker];
    let Some(a0) = poll_until(DEADLINE, || {
        fx.tracker
            .announces_from(port)
            .into_iter()
            .find(|a| a.downloaded >= MIB)
    }) else {
        fail("the downloader never reported its first MiB", &parts);
    };
    let Some(a1) = poll_until(WINDOW + Duration::from_secs(20), || {
        fx.tracker
            .announces_from(port)
            .into_iter()
            .find(|a| a.at >= a0.at + WINDOW)
    }) else {
        fail("no announce 10 s after the first MiB", &parts);
    };
    assert!(
        a1.left > 0 && a1.event != "completed",
        "{}",
        report("the download ended inside the measuring window", &parts)
    );
    check_rate(
        "download limit",
        a1.downloaded - a0.downloaded,
        a1.at - a0.at,
        &parts,
    );
}

// =============================================================================================
// 7. Interop: bitfetch, Transmission and aria2 in one swarm
// =============================================================================================

/// aria2 seeds (its upload capped at 512K/s so it cannot serve everyone alone), bitfetch and
/// Transmission leech, all through one opentracker. Everyone ends with identical bytes;
/// bitfetch downloads, and uploads to Transmission: the kernel's `bytes_acked` on bitfetch's
/// sockets to Transmission's address must exceed two pieces (handshake and bitfield are a few
/// hundred bytes), polled while the transfer runs.
#[test]
fn interop_mixed_swarm_with_transmission_and_aria2() {
    for tool in [
        "opentracker",
        "aria2c",
        "transmission-daemon",
        "transmission-remote",
        "mktorrent",
        "transmission-show",
    ] {
        require_tool(tool);
    }
    let tracker = Opentracker::start();
    let dir = scratch_dir();
    let name = "interop.bin";
    let size = 4 * MIB + 4_321;
    let source_dir = dir.path().join("source");
    let source = source_dir.join(name);
    write_payload(&source, size, 12);
    let torrent = make_torrent_with_piece_log2(
        &source,
        &tracker.announce_url(),
        15,
        &dir.path().join("interop.torrent"),
    );
    let hash = info_hash_hex(&torrent);
    tracker.allow(&hash);

    let aria2_ip = own_ip();
    let aria2 = aria2_seed_limited(
        &torrent,
        &source_dir,
        aria2_ip,
        free_port_on(aria2_ip),
        "512K",
    );
    tracker.wait_for_swarm(&hash, 1, 1, DEADLINE, &[&aria2]);

    let t_ip = own_ip();
    let t_out = dir.path().join("transmission");
    std::fs::create_dir_all(&t_out).unwrap();
    let transmission = Transmission::start(t_ip, &t_out);
    transmission.add(&torrent, &t_out);

    let b_ip = own_ip();
    let b_out = dir.path().join("bitfetch");
    let mut args = strings(&["download"]);
    args.push(path_arg(&torrent));
    args.extend(strings(&[
        "-o",
        &path_arg(&b_out),
        "--bind",
        &b_ip.to_string(),
        "--port",
        "0",
        "--seed",
        "--announce-interval",
        "1",
    ]));
    let bf = spawn_bitfetch("bitfetch (download --seed)", &args);
    wait_for_listening(&bf);
    let parts: [&dyn Diagnose; 4] = [&bf, &transmission, &aria2, &tracker];

    // While Transmission downloads, watch bitfetch's sockets to it.
    let t_file = t_out.join(name);
    let mut sent_to_transmission = 0u64;
    let done = poll_until(TRANSMISSION_DEADLINE, || {
        for s in sockets_between(b_ip, t_ip) {
            if s.local.ip() == IpAddr::V4(b_ip) {
                sent_to_transmission = sent_to_transmission.max(s.bytes_acked);
            }
        }
        if !bf.is_running() || !transmission.guard().is_running() {
            return Some(false);
        }
        let complete = t_file.is_file()
            && transmission
                .status()
                .is_some_and(|st| st.percent_done >= 100.0);
        complete.then_some(true)
    });
    if done != Some(true) {
        fail("Transmission did not complete (or a client died)", &parts);
    }
    // bitfetch completes too (it may still be finishing if Transmission was quicker).
    if wait_for_stderr_opt(&bf, "bitfetch: downloaded", DEADLINE).is_none() {
        fail("bitfetch did not complete its download", &parts);
    }
    let b_file = b_out.join(name);
    for (who, file) in [("bitfetch", &b_file), ("Transmission", &t_file)] {
        if let Err(e) = files_equal(&source, file) {
            fail(&format!("{who}: {e}"), &parts);
        }
    }
    terminate(&bf, 0, &parts);
    eprintln!("interop: bitfetch sent {sent_to_transmission} bytes (acked) to Transmission");
    if sent_to_transmission < 64 * KIB {
        fail(
            &format!(
                "bitfetch uploaded only {sent_to_transmission} bytes to Transmission ({t_ip})"
            ),
            &parts,
        );
    }
}

/// Like `wait_for_stderr`, but `None` instead of a panic, so the caller can report everyone.
fn wait_for_stderr_opt(guard: &ChildGuard, needle: &str, timeout: Duration) -> Option<()> {
    poll_until(timeout, || {
        guard.stderr_text().contains(needle).then_some(())
    })
}
