//! End-to-end peer exchange (BEP 11, `ut_pex` over BEP 10).
//!
//! - bitfetch, told only of a middle peer that can hardly upload (libtorrent, then another
//!   bitfetch), learns the seeder the middle peer is connected to from its PEX messages, and
//!   completes from it;
//! - libtorrent, connected only to a bitfetch seeder, learns from bitfetch's PEX of a second
//!   peer the seeder dialled, and connects to it;
//! - a hostile peer floods PEX (10,000 addresses, flags that do not match, malformed
//!   dictionaries, a banned address): bitfetch dials at most one message's worth, never the
//!   banned peer, and still completes;
//! - `--no-pex` and private torrents: no `ut_pex` in our extension handshake.
//!
//! Every party runs on a loopback address of its own (per-IP rules stay out of the way), every
//! process is owned by a guard that kills it by PID, and every wait polls with a deadline.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use support::bencode::{B, Value};
use support::cli::{
    ChildGuard, assert_exit_code, download_args, spawn_bitfetch, start_seeder, wait_for_listening,
};
use support::clients::Libtorrent;
use support::files::scratch_dir;
use support::net::{accept_loop, next_loopback, require_private_network};
use support::torrent::{Content, Payload, single_info, torrent_bytes};
use support::wire::{
    EXT_HANDSHAKE, Wire, handshake, id, msg_extended, msg_piece, peer_id, with_extension_bit,
};
use support::{DEADLINE, Diagnose, Text, lock, poll_until, report, run_parallel, strings};

const MIB: u64 = 1024 * 1024;
/// bitfetch's id for `ut_pex` (the common choice).
const OUR_UT_PEX: i64 = 1;
/// BEP 11 as bitfetch applies it: entries taken from one list of one message.
const PEX_PER_MESSAGE: usize = 50;

/// Waits for a downloader to exit 0 and for its file to equal the payload.
fn expect_complete(
    dl: &ChildGuard,
    payload: &Payload,
    out: &std::path::Path,
    parts: &[&dyn Diagnose],
) {
    let mut all: Vec<&dyn Diagnose> = vec![dl];
    all.extend_from_slice(parts);
    if dl.wait_timeout(DEADLINE).is_none() {
        panic!(
            "{}",
            report(
                &format!("{} did not finish within {DEADLINE:?}", dl.name()),
                &all
            )
        );
    }
    assert_exit_code(dl, 0, parts);
    payload.assert_same(&payload.downloaded(out, &payload.name), &all);
}

// =============================================================================================
// Test peers
// =============================================================================================

/// Accepts connections on an address of its own and does what `serve` says with each, on a
/// thread per connection; records who connected. Stops and joins everything when dropped.
struct Peer {
    addr: SocketAddr,
    from: Arc<Mutex<Vec<SocketAddr>>>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

type Serve = dyn Fn(Wire, &AtomicBool, &Mutex<Vec<String>>) + Send + Sync;

impl Peer {
    fn start(ip: Ipv4Addr, serve: Arc<Serve>) -> Peer {
        Peer::start_on(SocketAddr::from((ip, 0)), serve)
    }

    fn start_on(bind: SocketAddr, serve: Arc<Serve>) -> Peer {
        let listener = TcpListener::bind(bind).expect("bind a test peer");
        let addr = listener.local_addr().expect("local_addr");
        let (from, log) = (
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(Mutex::new(Vec::new())),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (f, l, s, c) = (from.clone(), log.clone(), stop.clone(), conns.clone());
        let acceptor = accept_loop(listener, "test-peer", stop.clone(), move |stream, who| {
            lock(&f).push(who);
            let (serve, l, s) = (Arc::clone(&serve), Arc::clone(&l), Arc::clone(&s));
            let t = thread::spawn(move || serve(Wire::new(stream), &s, &l));
            lock(&c).push(t);
        });
        Peer {
            addr,
            from,
            log,
            stop,
            acceptor: Some(acceptor),
            conns,
        }
    }

    fn from(&self) -> Vec<SocketAddr> {
        lock(&self.from).clone()
    }

    fn log(&self) -> Vec<String> {
        lock(&self.log).clone()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for t in lock(&self.conns).drain(..) {
            let _ = t.join();
        }
    }
}

impl Diagnose for Peer {
    fn diagnostics(&self) -> String {
        format!(
            "test peer {}: connections from {:?}\n  {}",
            self.addr,
            self.from(),
            self.log().join("\n  ")
        )
    }
}

/// Answers a handshake for `info_hash` (with the extension bit), then `then`.
fn answer_handshake(wire: &mut Wire, info_hash: [u8; 20], tag: &str) -> Result<(), String> {
    let (_, theirs, _) = wire.handshake_parts(Duration::from_secs(20))?;
    if theirs != info_hash {
        return Err("a handshake for another torrent".into());
    }
    wire.send(&handshake(
        &info_hash,
        &peer_id(tag),
        with_extension_bit([0; 8]),
    ))
}

/// Reads until `deadline` or the stop flag, answering nothing; `Err` when the other side
/// closed.
fn hold(wire: &mut Wire, stop: &AtomicBool) -> Result<(), String> {
    while !stop.load(Ordering::SeqCst) {
        wire.next(Instant::now() + Duration::from_millis(100))?;
    }
    Ok(())
}

/// A peer that handshakes, says nothing of pieces (a keep-alive as its first message) and
/// keeps every connection open.
fn holder(info_hash: [u8; 20]) -> Arc<Serve> {
    Arc::new(move |mut wire, stop, log| {
        let r = answer_handshake(&mut wire, info_hash, "HOLD")
            .and_then(|()| wire.send(&[0, 0, 0, 0]))
            .and_then(|()| hold(&mut wire, stop));
        lock(log).push(format!("{}: {r:?}", wire.remote));
    })
}

/// The bitfetch extension handshake's `m` dictionary entry `key`, read from `wire` after the
/// handshakes (`Ok(None)`: not there).
fn their_ext_id(wire: &mut Wire, key: &str) -> Result<Option<i64>, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match wire.next_message(deadline)? {
            None => return Err("no extension handshake within 20 s".into()),
            Some((id::EXTENDED, payload)) if payload.first() == Some(&EXT_HANDSHAKE) => {
                let hello = Value::decode(&payload[1..]).ok_or("not bencode")?;
                return Ok(hello.get("m").and_then(|m| m.get(key)).and_then(Value::int));
            }
            Some(_) => {}
        }
    }
}

// =============================================================================================
// (a) bitfetch learns a seeder through a middle peer's PEX
// =============================================================================================

/// libtorrent (PEX on) downloads from a libtorrent seeder, slowly, and uploads at 2 KB/s.
/// bitfetch, told only of libtorrent, completes 2 MiB within the deadline: only possible if it
/// learnt the seeder from libtorrent's PEX and downloaded from it.
#[test]
fn bitfetch_learns_the_seeder_from_libtorrent() {
    let payload = Payload::single("pex-lt-middle.bin", 2 * MIB as usize, 11);
    let seeder = Libtorrent::seed(&payload.torrent, &payload.source_dir(), next_loopback());
    let middle = Libtorrent::download_torrent(
        &payload.torrent,
        &payload.dir_for("middle"),
        next_loopback(),
        &[seeder.addr()],
        &[
            "--pex",
            "--stay",
            "--upload-limit",
            "2000",
            "--download-limit",
            "20000",
        ],
    );
    let seeder_addr = seeder.addr().to_string();
    let connected = poll_until(DEADLINE, || {
        middle
            .events()
            .iter()
            .any(|e| {
                e["addresses"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(&seeder_addr)))
            })
            .then_some(())
    });
    if connected.is_none() {
        panic!(
            "{}",
            report(
                "libtorrent never connected to its seeder",
                &[&middle, &seeder]
            )
        );
    }
    let out = payload.dir_for("out");
    let dl = spawn_bitfetch(
        "bitfetch downloader",
        download_args(&payload.torrent, &out, next_loopback(), &[middle.addr()]),
    );
    expect_complete(&dl, &payload, &out, &[&middle, &seeder]);
}

/// The same with a bitfetch in the middle: it tells the downloader of the seeder it dialled.
#[test]
fn bitfetch_learns_the_seeder_from_bitfetch() {
    let payload = Payload::single("pex-bf-middle.bin", 2 * MIB as usize, 12);
    let (seeder, seeder_addr) = start_seeder(
        "bitfetch seeder",
        &payload.torrent,
        &payload.source_dir(),
        next_loopback(),
        &[],
    );
    let mut args = download_args(
        &payload.torrent,
        &payload.dir_for("middle"),
        next_loopback(),
        &[seeder_addr],
    );
    args.extend(strings(&[
        "--max-upload-rate",
        "2K",
        "--max-download-rate",
        "20K",
    ]));
    let middle = spawn_bitfetch("bitfetch middle", &args);
    let middle_addr = wait_for_listening(&middle);
    let out = payload.dir_for("out");
    let dl = spawn_bitfetch(
        "bitfetch downloader",
        download_args(&payload.torrent, &out, next_loopback(), &[middle_addr]),
    );
    expect_complete(&dl, &payload, &out, &[&middle, &seeder]);
}

// =============================================================================================
// (b) libtorrent learns a peer through bitfetch's PEX
// =============================================================================================

/// A bitfetch seeder dials a second peer (a test peer that only holds its connections), then
/// libtorrent connects to the seeder alone; bitfetch's PEX names the second peer, and
/// libtorrent dials it.
#[test]
fn libtorrent_learns_a_peer_from_bitfetch() {
    let payload = Payload::single("pex-to-lt.bin", 2 * MIB as usize, 13);
    let second = Peer::start(next_loopback(), holder(payload.info_hash));
    let seeder_ip = next_loopback();
    let (seeder, seeder_addr) = start_seeder(
        "bitfetch seeder",
        &payload.torrent,
        &payload.source_dir(),
        seeder_ip,
        &[
            "--peer",
            &second.addr.to_string(),
            "--max-upload-rate",
            "20K",
        ],
    );
    let dialled = poll_until(DEADLINE, || {
        second
            .from()
            .iter()
            .any(|a| a.ip() == IpAddr::V4(seeder_ip))
            .then_some(())
    });
    if dialled.is_none() {
        panic!(
            "{}",
            report(
                "the seeder never dialled the second peer",
                &[&seeder, &second]
            )
        );
    }
    let lt_ip = next_loopback();
    let lt = Libtorrent::download_torrent(
        &payload.torrent,
        &payload.dir_for("lt"),
        lt_ip,
        &[seeder_addr],
        &["--pex"],
    );
    let learnt = poll_until(DEADLINE, || {
        second
            .from()
            .iter()
            .any(|a| a.ip() == IpAddr::V4(lt_ip))
            .then_some(())
    });
    if learnt.is_none() {
        panic!(
            "{}",
            report(
                "libtorrent never connected to the peer bitfetch told it about",
                &[&lt, &seeder, &second]
            )
        );
    }
}

// =============================================================================================
// (c) a hostile PEX peer
// =============================================================================================

/// A PEX message: `added` (with `added.f` as given) and `dropped` in compact IPv4 form.
fn pex_message(added: &[SocketAddr], flags: &[u8]) -> Vec<u8> {
    let compact = |list: &[SocketAddr]| -> Vec<u8> {
        list.iter()
            .flat_map(|a| match a {
                SocketAddr::V4(v4) => {
                    let mut e = v4.ip().octets().to_vec();
                    e.extend_from_slice(&v4.port().to_be_bytes());
                    e
                }
                SocketAddr::V6(_) => unreachable!("IPv4 only"),
            })
            .collect()
    };
    B::dict([
        ("added", B::Bytes(compact(added))),
        ("added.f", B::Bytes(flags.to_vec())),
        ("dropped", B::Bytes(Vec::new())),
    ])
    .encode()
}

/// bitfetch dials a peer that breaks the protocol (an unasked `piece`: banned), a peer that
/// floods PEX, and a rate-limited seeder. The flooder offers `ut_pex`, and once the violator is
/// banned sends the banned address followed by 10,000 others (all reaching one counting
/// listener) with flags of the wrong count, then malformed messages and the banned address
/// again. bitfetch completes, dialled at most one message's worth of the addresses, and never
/// the banned peer again.
#[test]
fn a_pex_flood_is_bounded_and_never_reaches_a_banned_peer() {
    require_private_network("listens on every address of the namespace to count dials");
    let payload = Payload::single("pex-hostile.bin", 2 * MIB as usize, 14);
    let info_hash = payload.info_hash;

    // Every dial of a flooded address lands here (127.250.x.y:PORT are all local).
    // (who dialled, which address)
    let counted = Arc::new(Mutex::new(BTreeSet::<(IpAddr, SocketAddr)>::new()));
    let seen = Arc::clone(&counted);
    let counter = Peer::start_on(
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        Arc::new(move |wire: Wire, _: &AtomicBool, _: &Mutex<Vec<String>>| {
            if let Ok(local) = wire.stream.local_addr() {
                lock(&seen).insert((wire.remote.ip(), local));
            }
        }),
    );
    let port = counter.addr.port();

    let banned = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&banned);
    let violator = Peer::start(
        next_loopback(),
        Arc::new(
            move |mut wire: Wire, _: &AtomicBool, log: &Mutex<Vec<String>>| {
                let r = answer_handshake(&mut wire, info_hash, "VIOL")
                    .and_then(|()| wire.send(&msg_piece(0, 0, &[0; 16])))
                    .and_then(|()| wire.expect_closed(Duration::from_secs(20)));
                flag.store(r.is_ok(), Ordering::SeqCst);
                lock(log).push(format!("{}: {r:?}", wire.remote));
            },
        ),
    );
    let banned_addr = violator.addr;

    let flood: Vec<SocketAddr> = (0..10_000u32)
        .map(|i| SocketAddr::from(([127, 250, (i / 250) as u8, (i % 250 + 1) as u8], port)))
        .collect();
    let waiting = Arc::clone(&banned);
    let flooder = Peer::start(
        next_loopback(),
        Arc::new(
            move |mut wire: Wire, stop: &AtomicBool, log: &Mutex<Vec<String>>| {
                let hello = B::dict([
                    ("m", B::dict([("ut_pex", B::Int(3))])),
                    ("v", B::str("pex flooder")),
                ])
                .encode();
                let r = answer_handshake(&mut wire, info_hash, "FLOD")
                    .and_then(|()| wire.send(&msg_extended(EXT_HANDSHAKE, &hello)))
                    .and_then(|()| their_ext_id(&mut wire, "ut_pex"))
                    .and_then(|id| {
                        let id = id.ok_or("bitfetch did not offer ut_pex")?;
                        let id = u8::try_from(id).map_err(|_| "a ut_pex id over 255")?;
                        poll_until(DEADLINE, || waiting.load(Ordering::SeqCst).then_some(()))
                            .ok_or("the violator was never banned")?;
                        let mut added = vec![banned_addr];
                        added.extend_from_slice(&flood);
                        wire.send(&msg_extended(id, &pex_message(&added, &[0x12; 3])))?;
                        for junk in [
                            b"le".to_vec(),
                            b"d5:added5:abcdee".to_vec(),
                            vec![b'l'; 4000],
                            pex_message(&[banned_addr], &[0x10]),
                            pex_message(&flood, &vec![0xff; flood.len()]),
                        ] {
                            wire.send(&msg_extended(id, &junk))?;
                        }
                        hold(&mut wire, stop)
                    });
                lock(log).push(format!("{}: {r:?}", wire.remote));
            },
        ),
    );

    // (The seeder learns of the flooder from the downloader's PEX, and is flooded too: only
    // the downloader's dials are counted.)
    let (seeder, seeder_addr) = start_seeder(
        "bitfetch seeder",
        &payload.torrent,
        &payload.source_dir(),
        next_loopback(),
        &["--max-upload-rate", "300K"],
    );
    let out = payload.dir_for("out");
    let dl_ip = IpAddr::V4(next_loopback());
    let IpAddr::V4(dl_v4) = dl_ip else {
        unreachable!()
    };
    let mut args = download_args(
        &payload.torrent,
        &out,
        dl_v4,
        &[violator.addr, flooder.addr, seeder_addr],
    );
    args.extend(strings(&["--max-peers", "500"]));
    let dl = spawn_bitfetch("bitfetch downloader", &args);
    let dials = || Text(format!("flooded addresses dialled: {:?}", lock(&counted)));
    expect_complete(
        &dl,
        &payload,
        &out,
        &[&seeder, &flooder, &violator, &dials()],
    );

    let dialled = lock(&counted)
        .iter()
        .filter(|(who, _)| *who == dl_ip)
        .count();
    let parts: [&dyn Diagnose; 5] = [&dl, &seeder, &flooder, &violator, &dials()];
    assert!(
        (10..PEX_PER_MESSAGE).contains(&dialled),
        "{}",
        report(
            &format!(
                "{dialled} flooded addresses dialled: expected some, and fewer than the {} \
                 one PEX message may carry (the first entry was the banned peer)",
                PEX_PER_MESSAGE
            ),
            &parts
        )
    );
    let to_banned = violator.from().iter().filter(|a| a.ip() == dl_ip).count();
    assert_eq!(
        to_banned,
        1,
        "{}",
        report("the banned peer was dialled again", &parts)
    );
}

// =============================================================================================
// (d) --no-pex and private torrents
// =============================================================================================

/// A torrent of `content` written under `dir`; `private` adds BEP 27's flag.
fn torrent_file(
    dir: &std::path::Path,
    content: &Content,
    private: bool,
) -> (std::path::PathBuf, [u8; 20]) {
    let B::Dict(mut fields) = single_info(b"pex-handshake.bin", content) else {
        unreachable!("an info dictionary")
    };
    if private {
        fields.push((b"private".to_vec(), B::Int(1)));
        fields.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let (bytes, info_hash) = torrent_bytes(&B::Dict(fields), &[]);
    let path = dir.join(if private {
        "private.torrent"
    } else {
        "public.torrent"
    });
    std::fs::write(&path, bytes).expect("write the torrent");
    (path, info_hash)
}

/// What bitfetch's extension handshake says about `ut_pex`, and whether its handshake set the
/// DHT bit, when it downloads `torrent` with `extra` options.
fn our_ut_pex(
    name: &str,
    torrent: &std::path::Path,
    info_hash: [u8; 20],
    extra: &[&str],
) -> (Option<i64>, bool) {
    let listener = TcpListener::bind((next_loopback(), 0)).expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let out = scratch_dir();
    let mut args = download_args(torrent, out.path(), next_loopback(), &[addr]);
    args.extend(strings(extra));
    let dl = spawn_bitfetch(name, &args);
    let stream = support::net::accept_within(&listener, DEADLINE)
        .unwrap_or_else(|e| panic!("{}", report(&e, &[&dl])));
    let mut wire = Wire::new(stream);
    let (reserved, _, _) = wire
        .handshake_parts(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{}", report(&e, &[&dl])));
    let dht = reserved[7] & 0x01 != 0;
    wire.send(&handshake(
        &info_hash,
        &peer_id("LOOK"),
        with_extension_bit([0; 8]),
    ))
    .unwrap_or_else(|e| panic!("{}", report(&e, &[&dl])));
    let ut_pex =
        their_ext_id(&mut wire, "ut_pex").unwrap_or_else(|e| panic!("{}", report(&e, &[&dl])));
    drop(wire);
    drop(dl);
    (ut_pex, dht)
}

#[test]
fn no_ut_pex_or_dht_bit_when_off_or_for_a_private_torrent() {
    let dir = scratch_dir();
    let content = Content::new(64 * 1024, 15);
    let (public, public_hash) = torrent_file(dir.path(), &content, false);
    let (private, private_hash) = torrent_file(dir.path(), &content, true);
    run_parallel(vec![
        support::case("default", || {
            let (pex, dht) = our_ut_pex("bitfetch (default)", &public, public_hash, &[]);
            assert_eq!(pex, Some(OUR_UT_PEX), "ut_pex offered under id 1");
            assert!(dht, "a public torrent's handshake sets the DHT bit (BEP 5)");
        }),
        support::case("--no-dht", || {
            let (pex, dht) = our_ut_pex("bitfetch --no-dht", &public, public_hash, &["--no-dht"]);
            assert_eq!(pex, Some(OUR_UT_PEX), "--no-dht leaves peer exchange on");
            assert!(!dht, "no DHT bit without a DHT node");
        }),
        support::case("--no-pex", || {
            let (pex, _) = our_ut_pex("bitfetch --no-pex", &public, public_hash, &["--no-pex"]);
            assert_eq!(pex, None, "--no-pex still offers ut_pex");
        }),
        support::case("private", || {
            let (pex, dht) = our_ut_pex("bitfetch (private)", &private, private_hash, &[]);
            assert_eq!(pex, None, "a private torrent offers ut_pex");
            assert!(!dht, "a private torrent runs no DHT node (BEP 27)");
        }),
    ]);
}
