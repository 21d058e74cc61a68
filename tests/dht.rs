//! The DHT (BEP 5), end to end, on loopback inside a private network namespace:
//!
//! - bitfetch resolves a trackerless magnet and downloads it from a libtorrent seeder it found
//!   through a DHT of ten libtorrent nodes alone (and the time to the first DHT peer is shown
//!   beside libtorrent's on the same network);
//! - a libtorrent node, given only the info hash, finds a bitfetch seeder through the DHT;
//! - bitfetch finds bitfetch: a downloader bootstrapped from nothing but a bitfetch seeder's
//!   DHT node;
//! - hostile KRPC against a running bitfetch: oversized and truncated datagrams, wrong types
//!   for every key, `nodes` with thousands of entries and naming bitfetch itself, a forged
//!   `announce_peer` token, a ping flood; it stays up, answers others and still serves a
//!   download found through it;
//! - the node id and routing table saved at exit are used by the next run (no bootstrap node
//!   needed), and a corrupt state file is reported and ignored;
//! - `--no-dht` and a private torrent (BEP 27) send nothing to a DHT node.
//!
//! The `harness_*` test involves no bitfetch: it shows the libtorrent DHT works on this
//! machine (a seeder found and downloaded from through the DHT alone), so that a failure
//! elsewhere is bitfetch's.
//!
//! Every process is owned by a guard that kills it by PID; every wait is a poll with a
//! deadline; every bitfetch has its own `XDG_CACHE_HOME` (see `support::cli`), unless the test
//! gives it one.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::bencode::{B, Value as Bencode, bytes, dict, int, list};
use support::cli::{
    ChildGuard, assert_exit_code, events, json_listening, kind, of_kind, spawn_bitfetch,
    spawn_bitfetch_env, wait_event,
};
use support::files::scratch_dir;
use support::krpc::{self, Id, Krpc, Query, compact_node, compact_peer, id_of, response};
use support::libtorrent_dht::{LtDht, LtDhtSpec};
use support::magnet::Link;
use support::net::{next_loopback, require_private_network};
use support::torrent::{DEAD_TRACKER, Payload};
use support::{DEADLINE, Diagnose, Text, Worker, fail, lock, path_arg, poll_until, report};

/// A few MiB, not a whole number of 32 KiB pieces.
const SIZE: usize = 2 * 1024 * 1024 + 12_345;
/// Hang guard for one DHT download (bitfetch's own `--timeout` is the same).
const DHT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a KRPC reply may take.
const REPLY: Duration = Duration::from_secs(5);

const WHY: &str = "runs a DHT on loopback and must not reach any public DHT router";

// =============================================================================================
// Helpers
// =============================================================================================

/// `magnet:?xt=urn:btih:HASH&dn=NAME`: no tracker, no peer.
fn trackerless(payload: &Payload) -> String {
    Link::new(&payload.info_hash).name(&payload.name).uri()
}

fn dht_flags(bootstrap: &[SocketAddr]) -> Vec<String> {
    bootstrap
        .iter()
        .flat_map(|b| ["--dht-bootstrap".to_owned(), b.to_string()])
        .collect()
}

/// `bitfetch download SOURCE -o OUT --bind IP --port 0 --json --timeout 60s
/// [--dht-bootstrap B]… EXTRA…`.
fn download_args(
    source: &str,
    out: &Path,
    ip: Ipv4Addr,
    bootstrap: &[SocketAddr],
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "download".into(),
        source.into(),
        "-o".into(),
        path_arg(out),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
        "--json".into(),
        "--progress-interval".into(),
        "0".into(),
        "--timeout".into(),
        format!("{}s", DHT_DEADLINE.as_secs()),
    ];
    args.extend(dht_flags(bootstrap));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// `bitfetch seed TORRENT DATA --bind IP --port 0 --json [--dht-bootstrap B]… EXTRA…`.
fn seed_args(
    torrent: &Path,
    data: &Path,
    ip: Ipv4Addr,
    bootstrap: &[SocketAddr],
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "seed".into(),
        path_arg(torrent),
        path_arg(data),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
        "--json".into(),
        "--progress-interval".into(),
        "0".into(),
    ];
    args.extend(dht_flags(bootstrap));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// The `dht` event (its address and node count), waiting for it.
fn dht_event(run: &ChildGuard, parts: &[&dyn Diagnose]) -> (SocketAddr, u64) {
    let event = wait_event(run, DEADLINE, |ev| of_kind(ev, "dht").next().cloned());
    let Some(event) = event else {
        run.fail("never printed a `dht` event", parts)
    };
    let addr = event["address"].as_str().and_then(|a| a.parse().ok());
    let nodes = event["nodes"].as_u64();
    match (addr, nodes) {
        (Some(addr), Some(nodes)) => (addr, nodes),
        _ => run.fail(
            &format!("a `dht` event without an address and a node count: {event}"),
            parts,
        ),
    }
}

/// Asserts the `dht` event is on `ip` and knows at least one node; returns its address.
fn dht_ready(run: &ChildGuard, ip: Ipv4Addr, parts: &[&dyn Diagnose]) -> SocketAddr {
    let (addr, nodes) = dht_event(run, parts);
    if addr.ip() != IpAddr::V4(ip) {
        run.fail(
            &format!("with --bind {ip} the DHT listens on {addr}, not on {ip}"),
            parts,
        );
    }
    if nodes == 0 {
        run.fail(
            "the `dht` event says 0 nodes with a bootstrap node up",
            parts,
        );
    }
    addr
}

/// How long after `started` the first `peers` event with source `dht` was seen (polled).
fn wait_dht_peers(run: &ChildGuard, started: Instant, parts: &[&dyn Diagnose]) -> Duration {
    let seen = wait_event(run, DHT_DEADLINE, |ev| {
        of_kind(ev, "peers")
            .any(|e| e["source"].as_str() == Some("dht") && e["count"].as_u64() > Some(0))
            .then(|| started.elapsed())
    });
    seen.unwrap_or_else(|| run.fail("no `peers` event with source dht and a count", parts))
}

/// Waits for a download to exit 0 and compares the file with the original.
fn assert_downloaded(run: &ChildGuard, payload: &Payload, out: &Path, parts: &[&dyn Diagnose]) {
    run.wait_with_deadline(DHT_DEADLINE + Duration::from_secs(15), &|| {
        report("other parties:", parts)
    });
    assert_exit_code(run, 0, parts);
    let mut all: Vec<&dyn Diagnose> = vec![run];
    all.extend_from_slice(parts);
    payload.assert_same(&payload.downloaded(out, &payload.name), &all);
}

/// No `peers` event came from a tracker (the magnets here have none).
fn assert_no_tracker_peers(run: &ChildGuard, parts: &[&dyn Diagnose]) {
    let events = events(run);
    if let Some(e) = of_kind(&events, "peers").find(|e| e["source"].as_str() == Some("tracker")) {
        run.fail(
            &format!("a trackerless magnet got peers from a tracker: {e}"),
            parts,
        );
    }
}

fn ip_of(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("expected IPv4, got {ip}"),
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    support::net::v4(addr)
}

/// Waits until some libtorrent node stored an announce for the payload from `ip`.
fn wait_announced(
    net: &LtDht,
    payload: &Payload,
    ip: Ipv4Addr,
    who: &str,
    parts: &[&dyn Diagnose],
) -> Value {
    net.wait_announce(&payload.hash_hex, ip, DEADLINE)
        .unwrap_or_else(|| {
            let mut all: Vec<&dyn Diagnose> = vec![net];
            all.extend_from_slice(parts);
            fail(
                &format!(
                    "{who} ({ip}) never announced {} to any DHT node",
                    payload.hash_hex
                ),
                &all,
            )
        })
}

// =============================================================================================
// Harness: libtorrent alone
// =============================================================================================

/// Ten libtorrent nodes: one seeds, a fresh node given only the info hash finds it through the
/// DHT and downloads it. Prints libtorrent's time to the first DHT peer.
#[test]
fn harness_libtorrent_finds_a_seeder_through_the_dht() {
    require_private_network(WHY);
    let payload = Payload::single("dht-harness.bin", SIZE, 11);
    let net = LtDhtSpec::new("libtorrent DHT (node 9 seeds)", 10)
        .seed_on(9, &payload.torrent, &payload.source_dir())
        .start();
    let seeder = net.seeder_addr().expect("a seeder");
    wait_announced(&net, &payload, ip_of(seeder), "the libtorrent seeder", &[]);
    let out = payload.dir_for("out");
    let leecher = LtDhtSpec::new("libtorrent DHT downloader", 1)
        .bootstrap(net.bootstrap_node())
        .download_on(0, &trackerless(&payload), &out)
        .start();
    leecher.wait_finished(DHT_DEADLINE, &[&net]);
    payload.assert_same(&payload.downloaded(&out, &payload.name), &[&leecher, &net]);
    assert!(
        leecher.connected_peers().contains(&seeder),
        "{}",
        report("the downloader never connected to the seeder", &[&leecher])
    );
    eprintln!(
        "libtorrent: first DHT peers {:?} s and first connection {:?} s after adding the magnet",
        leecher.first_dht_peers_after(),
        leecher.first_peer_after()
    );
}

/// The raw KRPC client against a libtorrent node, so that what the hostile test expects of
/// bitfetch is what a mature DHT does: a ping and a find_node are answered, get_peers gives a
/// token, a forged token gets error 203 and a valid one is accepted and handed out.
#[test]
fn harness_krpc_against_a_libtorrent_node() {
    require_private_network(WHY);
    let net = LtDht::network(2);
    let node = net.nodes()[1];
    let mut k = client("harness krpc");
    let ping = k.ping();
    let reply = k
        .ask(node, &ping, REPLY)
        .expect("libtorrent answers a ping");
    assert!(
        reply.is_response() && reply.id().map(<[u8]>::len) == Some(20),
        "{}",
        reply.show()
    );
    let find = k.find_node(&id_of("somewhere"));
    let reply = k
        .ask(node, &find, REPLY)
        .expect("libtorrent answers find_node");
    assert!(reply.nodes().is_some(), "{}", reply.show());
    let topic = id_of("harness topic");
    let forged = k.announce_peer(&topic, 7777, b"forged");
    let reply = k
        .ask(node, &forged, REPLY)
        .expect("libtorrent answers a forged announce");
    assert_eq!(reply.error_code(), Some(203), "{}", reply.show());
    let q = k.get_peers(&topic);
    let token = k
        .ask(node, &q, REPLY)
        .and_then(|r| r.token().map(<[u8]>::to_vec))
        .expect("a token from get_peers");
    let q = k.announce_peer(&topic, 7778, &token);
    let reply = k
        .ask(node, &q, REPLY)
        .expect("libtorrent answers an announce");
    assert!(reply.is_response(), "{}", reply.show());
    let mut other = client("harness krpc asker");
    let q = other.get_peers(&topic);
    let reply = other.ask(node, &q, REPLY).expect("get_peers answered");
    let me = SocketAddrV4::new(ip_of(k.addr()), 7778);
    assert!(reply.values().contains(&me), "{}", reply.show());
    let mut answered = Vec::new();
    for (label, reply) in send_cases(node, &wrong_type_cases(&mut k, &topic, &token)) {
        if reply.as_ref().is_some_and(krpc::Reply::is_response) {
            answered.push(label);
        }
    }
    // What the hostile test holds bitfetch to: only a wrong-typed `t` is answered.
    assert!(
        answered.iter().all(|label| label.contains(" with t ")),
        "libtorrent answers wrong-typed queries: {answered:?}"
    );
}

// =============================================================================================
// bitfetch and libtorrent
// =============================================================================================

/// A trackerless magnet: bitfetch, bootstrapped from one libtorrent node, finds the seeder
/// through the DHT alone, fetches the metadata and the data. Then a libtorrent node does the
/// same on the same network, for the time to the first DHT peer.
#[test]
fn trackerless_magnet_from_a_libtorrent_seeder_found_through_the_dht() {
    require_private_network(WHY);
    let payload = Payload::single("dht-from-lt.bin", SIZE, 12);
    let net = LtDhtSpec::new("libtorrent DHT (node 9 seeds)", 10)
        .seed_on(9, &payload.torrent, &payload.source_dir())
        .start();
    let seeder = net.seeder_addr().expect("a seeder");
    wait_announced(&net, &payload, ip_of(seeder), "the libtorrent seeder", &[]);

    let out = payload.dir_for("out");
    let ip = next_loopback();
    let started = Instant::now();
    let run = spawn_bitfetch(
        "bitfetch DHT download",
        download_args(
            &trackerless(&payload),
            &out,
            ip,
            &[net.bootstrap_node()],
            &[],
        ),
    );
    dht_ready(&run, ip, &[&net]);
    let first = wait_dht_peers(&run, started, &[&net]);
    assert_downloaded(&run, &payload, &out, &[&net]);
    assert_no_tracker_peers(&run, &[&net]);

    let lt_out = payload.dir_for("lt-out");
    let leecher = LtDhtSpec::new("libtorrent DHT downloader", 1)
        .bootstrap(net.bootstrap_node())
        .download_on(0, &trackerless(&payload), &lt_out)
        .start();
    leecher.wait_finished(DHT_DEADLINE, &[&net]);
    let lt_first = leecher
        .events_named("dht_peers")
        .first()
        .and_then(|e| e["t"].as_f64());
    eprintln!(
        "time to first peer through the DHT, from process start: bitfetch {:.2} s, \
         libtorrent {}",
        first.as_secs_f64(),
        lt_first.map_or("never".to_owned(), |t| format!("{t:.2} s")),
    );
}

/// A libtorrent node, given only the info hash and a bootstrap node, finds a bitfetch seeder
/// through the DHT (bitfetch announced it with its listening port) and downloads from it.
#[test]
fn libtorrent_finds_a_bitfetch_seeder_through_the_dht() {
    require_private_network(WHY);
    let payload = Payload::single("dht-to-lt.bin", SIZE, 13);
    let net = LtDht::network(10);
    let ip = next_loopback();
    let seeder = spawn_bitfetch(
        "bitfetch DHT seeder",
        seed_args(
            &payload.torrent,
            &payload.source_dir(),
            ip,
            &[net.bootstrap_node()],
            &[],
        ),
    );
    let listening = json_listening(&seeder);
    dht_ready(&seeder, ip, &[&net]);
    let announce = wait_announced(&net, &payload, ip, "the bitfetch seeder", &[&seeder]);
    let announced: Option<SocketAddr> = announce["address"].as_str().and_then(|a| a.parse().ok());
    if announced != Some(listening) {
        fail(
            &format!("bitfetch announced {announced:?}, but it listens on {listening}: {announce}"),
            &[&seeder, &net],
        );
    }

    let out = payload.dir_for("lt-out");
    let leecher = LtDhtSpec::new("libtorrent DHT downloader", 1)
        .bootstrap(net.bootstrap_node())
        .download_on(0, &trackerless(&payload), &out)
        .start();
    leecher.wait_finished(DHT_DEADLINE, &[&seeder, &net]);
    payload.assert_same(
        &payload.downloaded(&out, &payload.name),
        &[&leecher, &seeder, &net],
    );
    if !leecher.connected_peers().contains(&listening) {
        fail(
            "the libtorrent downloader never connected to the bitfetch seeder",
            &[&leecher, &seeder],
        );
    }
    assert!(
        seeder.is_running(),
        "{}",
        report("the seeder exited", &[&seeder])
    );
}

/// bitfetch finds bitfetch: a downloader whose only bootstrap node is a bitfetch seeder's DHT
/// node learns the libtorrent nodes from it, and the seeder as a peer from them.
#[test]
fn bitfetch_finds_a_bitfetch_seeder_through_the_dht() {
    require_private_network(WHY);
    let payload = Payload::single("dht-bf-bf.bin", SIZE, 14);
    let net = LtDht::network(8);
    let seed_ip = next_loopback();
    let seeder = spawn_bitfetch(
        "bitfetch DHT seeder",
        seed_args(
            &payload.torrent,
            &payload.source_dir(),
            seed_ip,
            &[net.bootstrap_node()],
            &[],
        ),
    );
    let listening = json_listening(&seeder);
    let seeder_dht = dht_ready(&seeder, seed_ip, &[&net]);
    wait_announced(&net, &payload, seed_ip, "the bitfetch seeder", &[&seeder]);

    let out = payload.dir_for("out");
    let ip = next_loopback();
    let started = Instant::now();
    let run = spawn_bitfetch(
        "bitfetch DHT download",
        download_args(&trackerless(&payload), &out, ip, &[seeder_dht], &[]),
    );
    dht_ready(&run, ip, &[&seeder, &net]);
    let first = wait_dht_peers(&run, started, &[&seeder, &net]);
    assert_downloaded(&run, &payload, &out, &[&seeder, &net]);
    assert_no_tracker_peers(&run, &[&seeder]);
    eprintln!(
        "bitfetch from bitfetch {listening}: first DHT peer {:.2} s after start",
        first.as_secs_f64()
    );
}

// =============================================================================================
// Hostile KRPC
// =============================================================================================

/// A DHT node that answers every query with `nodes` naming the asker itself under its own id
/// and nodes nothing listens on (in 127.250/16), thousands of them in every other reply, and,
/// to `get_peers`, `values` naming the asker and dead peers. Counts the queries it got.
struct PoisonNode {
    addr: SocketAddr,
    queries: Arc<AtomicU64>,
    _worker: Worker,
}

/// The fake nodes the poison node hands out live here: nothing listens in 127.250/16.
const POISON_NET: [u8; 2] = [127, 250];
const POISON_NODES: usize = 2_400;

impl PoisonNode {
    fn start() -> PoisonNode {
        let socket = UdpSocket::bind((next_loopback(), 0)).expect("bind the poison node");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local_addr");
        let queries = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&queries);
        let own = id_of("poison node");
        let worker = Worker::spawn(move |stop| {
            let mut buf = vec![0u8; krpc::MAX_DATAGRAM];
            while !stop.load(Ordering::SeqCst) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Some(query) = Bencode::decode(&buf[..n]) else {
                    continue;
                };
                let n_query = counted.fetch_add(1, Ordering::SeqCst);
                let t = query.get("t").and_then(Bencode::bytes).unwrap_or(b"");
                let asker: Id = query
                    .get("a")
                    .and_then(|a| a.get("id"))
                    .and_then(Bencode::bytes)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 20]);
                // Alternately thousands of entries (more than a datagram bitfetch accepts may
                // hold) and a few that fit, so both the size cap and the entries are exercised.
                let many = if n_query.is_multiple_of(2) {
                    POISON_NODES
                } else {
                    10
                };
                let reply = poison_reply(t, &own, &asker, v4(from), query.get("q"), many);
                let _ = socket.send_to(&reply, from);
            }
        });
        PoisonNode {
            addr,
            queries,
            _worker: worker,
        }
    }

    fn queries(&self) -> u64 {
        self.queries.load(Ordering::SeqCst)
    }
}

fn poison_reply(
    t: &[u8],
    own: &Id,
    asker: &Id,
    from: SocketAddrV4,
    q: Option<&Bencode>,
    many: usize,
) -> Vec<u8> {
    let mut nodes = compact_node(asker, from);
    for i in 0..many {
        let id = id_of(&format!("poison {i}"));
        let [hi, lo] = u16::try_from(i).expect("few nodes").to_be_bytes();
        let addr = SocketAddrV4::new(Ipv4Addr::new(POISON_NET[0], POISON_NET[1], hi, lo), 6881);
        nodes.extend(compact_node(&id, addr));
    }
    let mut extra: Vec<(&str, B)> = vec![("nodes", bytes(nodes))];
    if q.and_then(Bencode::bytes) == Some(b"get_peers".as_slice()) {
        let mut values = vec![bytes(compact_peer(from))];
        values.extend((0..u16::try_from(many.min(300)).expect("few")).map(|i| {
            let [hi, lo] = i.to_be_bytes();
            bytes(compact_peer(SocketAddrV4::new(
                Ipv4Addr::new(POISON_NET[0], POISON_NET[1], hi, lo),
                6881,
            )))
        }));
        extra.push(("values", list(values)));
        extra.push(("token", bytes("poison")));
    }
    let reply = response(t, own, extra);
    assert!(reply.len() <= krpc::MAX_DATAGRAM, "poison reply too big");
    reply
}

/// A fresh KRPC client on an address of its own.
fn client(label: &str) -> Krpc {
    Krpc::bind(next_loopback(), id_of(label))
}

/// A ping from a fresh address is answered with a response; returns the responder's id.
fn assert_answers_ping(victim: &ChildGuard, dht: SocketAddr, after: &str) -> Id {
    let mut k = client(&format!("pinger after {after}"));
    // Up to five pings a second apart, as a client retries: a short global throttle right
    // after a burst is allowed, a node that stopped answering is not.
    let reply = (0..5).find_map(|_| {
        let ping = k.ping();
        k.ask(dht, &ping, Duration::from_secs(1))
    });
    match reply {
        Some(r) if r.is_response() => {
            r.id().and_then(|id| id.try_into().ok()).unwrap_or_else(|| {
                victim.fail(
                    &format!("a ping reply without a 20-byte id: {}", r.show()),
                    &[],
                )
            })
        }
        Some(r) => victim.fail(&format!("after {after}: a ping got {}", r.show()), &[]),
        None => victim.fail(
            &format!(
                "after {after}: bitfetch's DHT ({dht}) no longer answers a ping from a new address"
            ),
            &[],
        ),
    }
}

/// Each case from its own address at once; then every reply that came within a second.
fn send_cases(dht: SocketAddr, cases: &[(String, Vec<u8>)]) -> Vec<(String, Option<krpc::Reply>)> {
    let sockets: Vec<Krpc> = cases
        .iter()
        .map(|(label, datagram)| {
            let k = client(label);
            let _ = k.send(dht, datagram);
            k
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(1);
    sockets
        .iter()
        .zip(cases)
        .map(|(k, (label, _))| {
            let left = end
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(5));
            let reply = k.recv(left).and_then(|(d, _)| krpc::Reply::parse(&d));
            (label.clone(), reply)
        })
        .collect()
}

/// Queries with one key replaced by each value of a wrong type, for every key of every query
/// (valid otherwise, the token included).
fn wrong_type_cases(k: &mut Krpc, info_hash: &Id, token: &[u8]) -> Vec<(String, Vec<u8>)> {
    let wrong = |right: &str| -> Vec<(String, B)> {
        let mut values = vec![
            ("an integer".to_owned(), int(1)),
            ("a list".to_owned(), list([bytes("x")])),
            ("a dictionary".to_owned(), dict([("x", int(1))])),
        ];
        if right != "string" {
            values.push(("a string".to_owned(), bytes("abc")));
        }
        if right == "id" {
            values.push(("19 bytes".to_owned(), bytes([7u8; 19])));
            values.push(("21 bytes".to_owned(), bytes([7u8; 21])));
            values.push(("an empty string".to_owned(), bytes("")));
        }
        if right == "integer" {
            values.retain(|(l, _)| l != "an integer");
            values.push(("-1".to_owned(), int(-1)));
            values.push(("65536".to_owned(), int(65_536)));
            values.push(("2^63-1".to_owned(), int(i64::MAX)));
        }
        values
    };
    let queries: Vec<(Query, Vec<(&str, &str)>)> = vec![
        (k.ping(), vec![("id", "id")]),
        (k.find_node(info_hash), vec![("id", "id"), ("target", "id")]),
        (
            k.get_peers(info_hash),
            vec![("id", "id"), ("info_hash", "id")],
        ),
        (
            k.announce_peer(info_hash, 6881, token),
            vec![
                ("id", "id"),
                ("info_hash", "id"),
                ("port", "integer"),
                ("token", "string"),
            ],
        ),
    ];
    let mut cases = Vec::new();
    for (query, keys) in &queries {
        for (key, right) in keys {
            for (label, value) in wrong(right) {
                cases.push((
                    format!("{} with a.{key} {label}", query.q),
                    query.clone().with_arg(key, value).encode(),
                ));
            }
        }
        for (key, right) in [
            ("t", "string"),
            ("y", "string"),
            ("q", "string"),
            ("a", "dict"),
        ] {
            for (label, value) in wrong(right) {
                if right == "dict" && label == "a dictionary" {
                    continue;
                }
                cases.push((
                    format!("{} with {key} {label}", query.q),
                    query.encode_with(key, value),
                ));
            }
        }
    }
    cases
}

/// Pings from one address, 200 at a time, as fast as the loop goes; counts the replies a
/// reader thread sees. Returns (sent, answered).
fn ping_flood(dht: SocketAddr, total: usize) -> (usize, usize) {
    let k = client("flooder");
    let reader = k.socket().try_clone().expect("clone the flood socket");
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = Arc::clone(&answered);
    let worker = Worker::spawn(move |stop| {
        reader
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let mut buf = vec![0u8; krpc::MAX_DATAGRAM];
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, _)) = reader.recv_from(&mut buf)
                && let Some(r) = krpc::Reply::parse(&buf[..n])
                && r.is_response()
                && let Some(t) = r.t()
            {
                lock(&seen).insert(t.to_vec());
            }
        }
    });
    let id = id_of("flooder");
    for i in 0..total {
        let t = u32::try_from(i).expect("few pings").to_be_bytes();
        let ping = Query::new(t.to_vec(), "ping", vec![("id", bytes(id))]).encode();
        let _ = k.send(dht, &ping);
        if i % 200 == 199 {
            // Pacing, not synchronisation: keeps the kernel from dropping the flood before
            // bitfetch reads it, so the count below is bitfetch's own limit.
            thread::sleep(Duration::from_millis(10));
        }
    }
    // Replies still in flight: wait until none came for half a second (bounded).
    let mut last = lock(&answered).len();
    let _ = poll_until(Duration::from_secs(5), || {
        thread::sleep(Duration::from_millis(500));
        let now = lock(&answered).len();
        let quiet = now == last;
        last = now;
        quiet.then_some(())
    });
    drop(worker);
    let n = lock(&answered).len();
    (total, n)
}

/// A bitfetch seeder's DHT node under attack keeps answering others, refuses forged tokens,
/// rate-limits a flood, keeps its routing table clean, stays up and still serves a download
/// found through it.
#[test]
fn hostile_krpc_against_a_running_bitfetch() {
    require_private_network(WHY);
    let payload = Payload::single("dht-hostile.bin", SIZE, 15);
    let net = LtDht::network(6);
    let poison = PoisonNode::start();
    let ip = next_loopback();
    let victim = spawn_bitfetch(
        "bitfetch DHT seeder under attack",
        seed_args(
            &payload.torrent,
            &payload.source_dir(),
            ip,
            &[net.bootstrap_node(), poison.addr],
            &[],
        ),
    );
    let dht = dht_ready(&victim, ip, &[&net]);
    let ctx: Vec<&dyn Diagnose> = vec![&net];
    // The poison node was asked: its thousands of nodes (and bitfetch itself) reached it.
    support::wait_until(
        DEADLINE,
        "bitfetch never queried the poison bootstrap node",
        &[&victim, &net],
        || poison.queries() > 0 || !victim.is_running(),
    );
    if !victim.is_running() {
        victim.fail("exited before the attacks", &[&net]);
    }
    // Before any attack, it announces (the poison node answered too).
    wait_announced(
        &net,
        &payload,
        ip,
        "the bitfetch seeder, before the attacks",
        &[&victim],
    );
    let own_id = assert_answers_ping(&victim, dht, "start-up");
    let mut problems: Vec<String> = Vec::new();

    // Oversized and truncated datagrams.
    let mut k = client("oversize");
    let big_ping = dict([
        (
            "a",
            dict([("id", bytes(k.id)), ("pad", bytes(vec![b'x'; 65_000]))]),
        ),
        ("q", bytes("ping")),
        ("t", bytes("zz")),
        ("y", bytes("q")),
    ])
    .encode();
    let _ = k.send(dht, &big_ping);
    let _ = k.send(dht, &vec![b'd'; krpc::MAX_DATAGRAM]);
    let _ = k.send(dht, &vec![0xffu8; krpc::MAX_DATAGRAM]);
    assert_answers_ping(&victim, dht, "oversized datagrams");
    let whole = k.get_peers(&payload.info_hash).encode();
    let truncated: Vec<(String, Vec<u8>)> = (0..whole.len())
        .map(|n| (format!("get_peers cut to {n} bytes"), whole[..n].to_vec()))
        .collect();
    for (label, reply) in send_cases(dht, &truncated) {
        if let Some(r) = reply.filter(krpc::Reply::is_response) {
            problems.push(format!("{label}: answered with a response {}", r.show()));
        }
    }
    assert_answers_ping(&victim, dht, "truncated bencode");

    // Wrong types for every key (each from an address of its own, so no rate limit hides a
    // wrong answer); the untouched queries are answered (the control).
    let mut k = client("wrong types");
    let token = {
        let q = k.get_peers(&payload.info_hash);
        k.ask(dht, &q, REPLY)
            .and_then(|r| r.token().map(<[u8]>::to_vec))
            .unwrap_or_else(|| victim.fail("get_peers got no reply with a token", &ctx))
    };
    for (label, reply) in send_cases(dht, &wrong_type_cases(&mut k, &payload.info_hash, &token)) {
        // libtorrent answers a query whose `t` is not a string (echoing it): not a fault.
        if label.contains(" with t ") {
            continue;
        }
        if let Some(r) = reply.filter(krpc::Reply::is_response) {
            problems.push(format!("{label}: answered with a response {}", r.show()));
        }
    }
    assert_answers_ping(&victim, dht, "wrong types");

    // The routing table: no poison node (none ever answered), not bitfetch itself, at most 8.
    let mut k = client("routing check");
    let find = k.find_node(&own_id);
    match k.ask(dht, &find, REPLY) {
        None => problems.push("find_node for its own id: no reply".into()),
        Some(r) => match r.nodes() {
            None => problems.push(format!(
                "find_node reply without whole compact nodes: {}",
                r.show()
            )),
            Some(nodes) => {
                if nodes.len() > 8 {
                    problems.push(format!("find_node returned {} nodes (K is 8)", nodes.len()));
                }
                for (id, addr) in &nodes {
                    if addr.ip().octets()[..2] == POISON_NET {
                        problems.push(format!("find_node hands out {addr}, a node that never answered (from the poison node)"));
                    }
                    if SocketAddr::V4(*addr) == dht || *id == own_id {
                        problems.push(format!("find_node hands out bitfetch itself ({addr})"));
                    }
                }
            }
        },
    }

    // announce_peer with a forged token: error 203, and the peer is never handed out; a valid
    // token is accepted and its peer is handed out (the control).
    let topic = id_of("an info hash nobody has");
    let mut forger = client("forger");
    let forged = forger.announce_peer(&topic, 7777, b"forged-token");
    match forger.ask(dht, &forged, REPLY) {
        Some(r) if r.is_error() && r.error_code() == Some(203) => {}
        Some(r) => problems.push(format!(
            "a forged token got {} (expected error 203)",
            r.show()
        )),
        None => problems.push("a forged token got no reply (expected error 203)".into()),
    }
    let mut honest = client("honest announcer");
    let q = honest.get_peers(&topic);
    let honest_token = honest
        .ask(dht, &q, REPLY)
        .and_then(|r| r.token().map(<[u8]>::to_vec));
    match honest_token {
        None => problems.push("get_peers from the honest announcer: no token".into()),
        Some(token) => {
            let q = honest.announce_peer(&topic, 7778, &token);
            match honest.ask(dht, &q, REPLY) {
                Some(r) if r.is_response() => {}
                other => problems.push(format!(
                    "announce_peer with the token bitfetch gave: {:?}",
                    other.map(|r| r.show())
                )),
            }
        }
    }
    let mut asker = client("asker");
    let q = asker.get_peers(&topic);
    match asker.ask(dht, &q, REPLY) {
        None => problems.push("get_peers after the announces: no reply".into()),
        Some(r) => {
            let values = r.values();
            let forged_peer = SocketAddrV4::new(ip_of(forger.addr()), 7777);
            let honest_peer = SocketAddrV4::new(ip_of(honest.addr()), 7778);
            if values.contains(&forged_peer) {
                problems.push(format!(
                    "the forged announce ({forged_peer}) is handed out: {}",
                    r.show()
                ));
            }
            if !values.contains(&honest_peer) {
                problems.push(format!(
                    "the announce made with a valid token ({honest_peer}) is not handed out: {}",
                    r.show()
                ));
            }
        }
    }

    // A ping flood from one address: rate limited, yet others are still answered.
    let (sent, answered) = ping_flood(dht, 4_000);
    eprintln!("ping flood: {answered} of {sent} pings answered");
    if answered * 4 > sent {
        problems.push(format!(
            "a flood of {sent} pings from one address got {answered} replies: not rate limited"
        ));
    }
    assert_answers_ping(&victim, dht, "the ping flood");

    if !victim.is_running() {
        victim.fail("bitfetch exited under hostile KRPC", &ctx);
    }
    // Still useful: a downloader bootstrapped from the victim alone finds it and downloads.
    let out = payload.dir_for("out");
    let dl_ip = next_loopback();
    let run = spawn_bitfetch(
        "bitfetch DHT download after the attacks",
        download_args(&trackerless(&payload), &out, dl_ip, &[dht], &[]),
    );
    let finished = run.wait_timeout(DHT_DEADLINE + Duration::from_secs(15));
    if finished.is_none_or(|s| !s.success()) {
        problems.push(format!(
            "a download bootstrapped from the attacked bitfetch alone did not finish ({}); its \
             events: {}",
            support::cli::describe_status(run.exit_status()),
            run.stdout_text()
        ));
    } else {
        payload.assert_same(&payload.downloaded(&out, &payload.name), &[&run, &victim]);
    }
    if !problems.is_empty() {
        fail(
            &format!("hostile KRPC:\n- {}", problems.join("\n- ")),
            &[
                &victim,
                &Text(format!("poison node queried {} times", poison.queries())),
            ],
        );
    }
}

// =============================================================================================
// The saved routing table
// =============================================================================================

/// Run 1 learns the DHT from a bootstrap node and saves it; run 2, with the same cache and no
/// bootstrap node, starts with nodes and finds the seeder; a corrupt state file is reported
/// by name (`dht_notice`), ignored, and replaced at exit.
#[test]
fn the_saved_routing_table_survives_a_restart() {
    require_private_network(WHY);
    let payload = Payload::single("dht-persist.bin", SIZE, 16);
    let net = LtDhtSpec::new("libtorrent DHT (node 7 seeds)", 8)
        .seed_on(7, &payload.torrent, &payload.source_dir())
        .start();
    wait_announced(
        &net,
        &payload,
        ip_of(net.seeder_addr().expect("seeder")),
        "the libtorrent seeder",
        &[],
    );
    let cache = scratch_dir();
    let state = cache.path().join("bitfetch").join("dht.dat");
    let ip = next_loopback();
    let run_once = |label: &str, bootstrap: &[SocketAddr]| -> ChildGuard {
        let out = payload.dir_for(label);
        let run = spawn_bitfetch_env(
            &format!("bitfetch {label}"),
            download_args(&trackerless(&payload), &out, ip, bootstrap, &[]),
            &[("XDG_CACHE_HOME", cache.path())],
        );
        wait_dht_peers(&run, Instant::now(), &[&net]);
        assert_downloaded(&run, &payload, &out, &[&net]);
        run
    };

    let first = run_once("run-1", &[net.bootstrap_node()]);
    dht_ready(&first, ip, &[&net]);
    let saved = fs::read(&state).unwrap_or_else(|e| {
        first.fail(
            &format!("no DHT state at {} after exit: {e}", state.display()),
            &[],
        )
    });
    assert!(!saved.is_empty(), "{} is empty", state.display());

    let second = run_once("run-2", &[]);
    dht_ready(&second, ip, &[&net]);

    let garbage = b"not a DHT state file \xff\x00\x01".to_vec();
    fs::write(&state, &garbage).expect("corrupt the state file");
    let third = run_once("run-3", &[net.bootstrap_node()]);
    let ev = events(&third);
    let notice = of_kind(&ev, "dht_notice").find(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains(&state.display().to_string()) || m.contains("dht.dat"))
    });
    if notice.is_none() {
        third.fail(
            &format!("no `dht_notice` naming the corrupt {}", state.display()),
            &[],
        );
    }
    dht_ready(&third, ip, &[&net]);
    match fs::read(&state) {
        Ok(after) if after != garbage && !after.is_empty() => {}
        other => third.fail(
            &format!("the corrupt state file was not replaced at exit: {other:?}"),
            &[],
        ),
    }
}

// =============================================================================================
// No DHT: --no-dht and private torrents
// =============================================================================================

/// A UDP socket standing in for a DHT bootstrap node: counts every datagram.
struct UdpCounter {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(SocketAddr, usize)>>>,
    _worker: Worker,
}

impl UdpCounter {
    fn start() -> UdpCounter {
        let socket = UdpSocket::bind((next_loopback(), 0)).expect("bind the counting node");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("local_addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&got);
        let worker = Worker::spawn(move |stop| {
            let mut buf = vec![0u8; krpc::MAX_DATAGRAM];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    lock(&seen).push((from, n));
                }
            }
        });
        UdpCounter {
            addr,
            got,
            _worker: worker,
        }
    }

    fn datagrams(&self) -> Vec<(SocketAddr, usize)> {
        lock(&self.got).clone()
    }
}

/// Asserts a finished run printed no `dht` event and the counter got nothing.
fn assert_no_dht(run: &ChildGuard, counter: &UdpCounter, what: &str, parts: &[&dyn Diagnose]) {
    let ev = events(run);
    if let Some(e) = ev.iter().find(|e| kind(e) == "dht") {
        run.fail(&format!("{what}: a `dht` event: {e}"), parts);
    }
    let got = counter.datagrams();
    if !got.is_empty() {
        run.fail(
            &format!(
                "{what}: the DHT bootstrap node given got {} datagram(s): {got:?}",
                got.len()
            ),
            parts,
        );
    }
}

/// `--no-dht` (a magnet with a peer) and a private torrent (seeder and downloader) send no
/// datagram to a DHT bootstrap node given with `--dht-bootstrap`; the same command with the DHT
/// on does (the control).
#[test]
fn no_dht_and_private_torrents_run_no_dht() {
    require_private_network(WHY);
    let payload = Payload::single("dht-off.bin", SIZE, 17);

    // The control: DHT on, the bootstrap node hears from bitfetch.
    let control = UdpCounter::start();
    let on = spawn_bitfetch(
        "bitfetch seeder with the DHT on",
        seed_args(
            &payload.torrent,
            &payload.source_dir(),
            next_loopback(),
            &[control.addr],
            &[],
        ),
    );
    support::wait_until(
        DEADLINE,
        "with the DHT on, the bootstrap node never heard from bitfetch (the control)",
        &[&on],
        || !control.datagrams().is_empty() || !on.is_running(),
    );
    if control.datagrams().is_empty() {
        on.fail("exited before its DHT sent anything (the control)", &[]);
    }
    drop(on);

    // --no-dht: a seeder and a magnet downloader.
    let counter = UdpCounter::start();
    let seed_ip = next_loopback();
    let seeder = spawn_bitfetch(
        "bitfetch seeder --no-dht",
        seed_args(
            &payload.torrent,
            &payload.source_dir(),
            seed_ip,
            &[counter.addr],
            &["--no-dht"],
        ),
    );
    let seeder_addr = json_listening(&seeder);
    let out = payload.dir_for("out-no-dht");
    let link = Link::new(&payload.info_hash)
        .name(&payload.name)
        .peer(seeder_addr)
        .uri();
    let run = spawn_bitfetch(
        "bitfetch download --no-dht",
        download_args(&link, &out, next_loopback(), &[counter.addr], &["--no-dht"]),
    );
    assert_downloaded(&run, &payload, &out, &[&seeder]);
    assert_no_dht(&run, &counter, "download --no-dht", &[&seeder]);
    assert_no_dht(&seeder, &counter, "seed --no-dht", &[]);
    drop(seeder);

    // A private torrent: DHT on by default, off for it.
    let private = payload.scratch("private.torrent");
    let mut mk = std::process::Command::new(support::clients::require_tool("mktorrent"));
    mk.args(["-p", "-l", "15", "-a", DEAD_TRACKER, "-o"])
        .arg(&private)
        .arg(&payload.data);
    support::cli::run_ok("mktorrent -p", &mut mk);
    let counter = UdpCounter::start();
    let seeder = spawn_bitfetch(
        "bitfetch seeder of a private torrent",
        seed_args(
            &private,
            &payload.source_dir(),
            next_loopback(),
            &[counter.addr],
            &[],
        ),
    );
    let seeder_addr = json_listening(&seeder);
    let out = payload.dir_for("out-private");
    let run = spawn_bitfetch(
        "bitfetch download of a private torrent",
        download_args(
            &path_arg(&private),
            &out,
            next_loopback(),
            &[counter.addr],
            &["--peer", &seeder_addr.to_string()],
        ),
    );
    assert_downloaded(&run, &payload, &out, &[&seeder]);
    assert_no_dht(&run, &counter, "download of a private torrent", &[&seeder]);
    assert_no_dht(&seeder, &counter, "seed of a private torrent", &[]);
}
