//! Magnet links (BEP 9 `ut_metadata` over BEP 10), end to end, all on loopback:
//!
//! - bitfetch fetches a magnet's metadata and then its data from aria2, Transmission,
//!   libtorrent and bitfetch seeders named by `x.pe`, and from seeders found through
//!   opentracker (`tr=` only, libtorrent's own link included);
//! - libtorrent and aria2, given only a magnet, fetch from a bitfetch seeder, and from a
//!   bitfetch that is itself still downloading from a magnet;
//! - `--save-torrent`, `bitfetch magnet`, `info MAGNET`, `download MAGNET --list` and the other
//!   download options;
//! - hostile metadata from a scripted peer (`support::fake_peer` with a `MetaMisbehaviour`):
//!   sizes of 0, negative and 2^31 in the extension handshake, pieces out of range, of the
//!   wrong size or never asked for, metadata failing its SHA-1, reject storms, metadata that
//!   hashes right but describes a hostile torrent; and malformed magnet links.
//!
//! The `harness_*` tests involve no bitfetch: they show that the reference clients do magnets
//! on this machine (libtorrent from libtorrent, aria2 and Transmission; aria2 from libtorrent
//! through opentracker and when dialled) and that the scripted peer speaks BEP 9 as a real
//! client expects and misbehaves as documented, so that a failure elsewhere is bitfetch's.
//! aria2 1.36 ignores `x.pe`: it is given peers through a tracker or by being dialled.
//! Transmission never dials loopback peers, so it only ever seeds here.
//!
//! A magnet download that is attacked is reached by its honest peer through its listening
//! port, so these tests expect bitfetch to listen (and print `listening`) while it fetches
//! the metadata.
//!
//! Every client has a 127.x address of its own, with DHT, LSD, UPnP, NAT-PMP and PEX off;
//! every process is owned by a guard that kills it by PID; every wait is a poll with a
//! deadline (a hang guard, not a speed expectation); data is compared byte for byte.

mod support;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::bencode::B;
use support::cli::{
    ChildGuard, MemWatch, Run, assert_exit_code, events, json_listening, kind, of_kind,
    run_bitfetch, spawn_bitfetch, start_seeder, verify,
};
use support::clients::{
    Libtorrent, Opentracker, Transmission, aria2_download_magnet, aria2_seed,
    libtorrent_make_magnet, libtorrent_parse_magnet, require_tool, wait_listening,
};
use support::fake_peer::{FAKE_UT_METADATA_ID, FakeSeeder, MetaMisbehaviour, SeedSpec};
use support::files::{Sandbox, files_equal, walk};
use support::magnet::{Link, base32};
use support::net::{Trap, closed_port_url, free_port_on, next_loopback};
use support::torrent::{
    Content, DEAD_TRACKER, Payload, info_bytes, info_hash_hex, multi_info, single_info,
};
use support::wire::{
    EXT_HANDSHAKE, Wire, ext_handshake, handshake, has_extension_bit, id as wire_id, msg_extended,
    parse_ext_handshake, peer_id, reserved, ut_metadata, with_extension_bit,
};
use support::{
    DEADLINE, Diagnose, TRANSMISSION_DEADLINE, case, fail, hex, path_arg, report, run_parallel,
    seed_of,
};

/// Metadata travels in pieces of 16 KiB (BEP 9).
const META_PIECE: usize = 16 * 1024;
/// How long bitfetch may take to drop a peer once it broke the metadata protocol.
const DROP_DEADLINE: Duration = Duration::from_secs(30);
/// A malformed magnet must be refused before anything touches the network; a run still going
/// after this is a hang.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(10);
/// A single-file payload of a few MiB, not a whole number of 32 KiB pieces.
const SINGLE_SIZE: u64 = 3 * 1024 * 1024 + 12_345;
/// A small multi-file tree.
const TREE: &[(&str, usize)] = &[
    ("a.bin", 300_001),
    ("docs/b.txt", 77_777),
    ("docs/deeper/c.iso", 1_048_576),
];

// =============================================================================================
// Payloads and links
// =============================================================================================

/// 400 files in 8 directories: an info dictionary of over 16 KiB, so the metadata travels
/// in two pieces or more.
fn many_files() -> Vec<(String, usize)> {
    (0..400)
        .map(|i| {
            (
                format!("dir-{}/file-number-{i:04}.dat", i / 50),
                1_000 + 37 * i,
            )
        })
        .collect()
}

fn many_files_payload(name: &str, seed: u64) -> Payload {
    let tree = many_files();
    let refs: Vec<(&str, usize)> = tree.iter().map(|(p, n)| (p.as_str(), *n)).collect();
    let payload = Payload::multi(name, &refs, seed);
    let size = payload.info_bytes().len();
    assert!(
        size > META_PIECE,
        "the many-files payload was meant to have metadata over one piece, it has {size} bytes"
    );
    payload
}

/// `magnet:?xt=urn:btih:HASH&dn=NAME&x.pe=PEER…`.
fn link_to(payload: &Payload, peers: &[SocketAddr]) -> Link {
    Link::new(&payload.info_hash)
        .name(&payload.name)
        .peers(peers)
}

// =============================================================================================
// bitfetch with a magnet
// =============================================================================================

/// `bitfetch download URI -o OUT --bind IP --port 0 --json EXTRA…`, started.
fn magnet_download(name: &str, uri: &str, out: &Path, ip: Ipv4Addr, extra: &[&str]) -> ChildGuard {
    let mut args: Vec<String> = vec![
        "download".into(),
        uri.into(),
        "-o".into(),
        path_arg(out),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        "0".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    spawn_bitfetch(name, &args)
}

/// Waits for a `--json` magnet download to exit 0, then checks every file byte for byte and
/// the `metadata` event.
fn assert_magnet_download(
    run: &ChildGuard,
    payload: &Payload,
    out: &Path,
    deadline: Duration,
    parts: &[&dyn Diagnose],
) {
    run.wait_with_deadline(deadline, &|| report("other parties:", parts));
    assert_exit_code(run, 0, parts);
    assert_payload_files(payload, out, run, parts);
    assert_metadata_event(run, &payload.info_bytes(), parts);
}

/// Every file of `payload` under `out` (OUT/NAME or OUT/NAME/REL), byte for byte.
fn assert_payload_files(
    payload: &Payload,
    out: &Path,
    who: &dyn Diagnose,
    parts: &[&dyn Diagnose],
) {
    for (rel, _) in &payload.files {
        let original = payload.downloaded(&payload.source_dir(), rel);
        let copy = payload.downloaded(out, rel);
        if let Err(e) = files_equal(&original, &copy) {
            let mut all: Vec<&dyn Diagnose> = vec![who];
            all.extend_from_slice(parts);
            fail(&format!("the download is wrong: {e}"), &all);
        }
    }
}

/// `path` holds exactly `expected`.
fn assert_bytes(path: &Path, expected: &[u8], parts: &[&dyn Diagnose]) {
    let problem = match fs::read(path) {
        Err(e) => format!("cannot read {}: {e}", path.display()),
        Ok(got) if got == expected => return,
        Ok(got) => match got.iter().zip(expected).position(|(a, b)| a != b) {
            Some(at) => format!("{} differs from the original at byte {at}", path.display()),
            None => format!(
                "{} is {} bytes, the original {} (equal up to the shorter)",
                path.display(),
                got.len(),
                expected.len()
            ),
        },
    };
    fail(&problem, parts);
}

/// Exactly one `metadata` event, before `start`, with the size of the info dictionary, its
/// number of 16 KiB pieces and at least one peer; `start` names the info hash of `info`.
fn assert_metadata_event(run: &ChildGuard, info: &[u8], parts: &[&dyn Diagnose]) {
    let events = events(run);
    let bad = |why: String| -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![run];
        all.extend_from_slice(parts);
        fail(&why, &all)
    };
    let metas: Vec<usize> = positions(&events, "metadata");
    let [meta_at] = metas[..] else {
        bad(format!(
            "a magnet download must print exactly one `metadata` event, it printed {}",
            metas.len()
        ))
    };
    let meta = &events[meta_at];
    let number = |key: &str| {
        meta[key]
            .as_u64()
            .unwrap_or_else(|| bad(format!("`{key}` is not a non-negative integer in {meta}")))
    };
    if number("size") != info.len() as u64 {
        bad(format!(
            "`metadata` says size {}, the info dictionary is {} bytes: {meta}",
            number("size"),
            info.len()
        ));
    }
    if number("pieces") != info.len().div_ceil(META_PIECE) as u64 {
        bad(format!(
            "`metadata` says {} pieces, {} bytes of metadata are {} pieces of 16 KiB: {meta}",
            number("pieces"),
            info.len(),
            info.len().div_ceil(META_PIECE)
        ));
    }
    if number("peers") == 0 {
        bad(format!("`metadata` says it came from no peer: {meta}"));
    }
    let Some(&start_at) = positions(&events, "start").first() else {
        bad("no `start` event".into())
    };
    if start_at < meta_at {
        bad("`start` came before `metadata`".into());
    }
    let want = hex(&sha1_of(info));
    if events[start_at]["info_hash"].as_str() != Some(want.as_str()) {
        bad(format!(
            "`start` names another info hash than {want}: {}",
            events[start_at]
        ));
    }
}

fn positions(events: &[Value], name: &str) -> Vec<usize> {
    events
        .iter()
        .enumerate()
        .filter(|(_, e)| kind(e) == name)
        .map(|(i, _)| i)
        .collect()
}

fn sha1_of(bytes: &[u8]) -> [u8; 20] {
    use sha1::{Digest, Sha1};
    Sha1::digest(bytes).into()
}

/// A bitfetch seeder of `payload` on an address of its own, listening.
fn bitfetch_seeder(payload: &Payload, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    start_seeder(
        "bitfetch seeder",
        &payload.torrent,
        &payload.source_dir(),
        next_loopback(),
        extra,
    )
}

// =============================================================================================
// Harness sanity: no bitfetch involved
// =============================================================================================

/// libtorrent seeds; another libtorrent, given only a magnet link written by the tests'
/// own [`Link`] (hex, then base32), fetches metadata and data; libtorrent reads the links as
/// the tests mean them.
#[test]
fn harness_libtorrent_fetches_a_magnet_from_libtorrent() {
    let payload = many_files_payload("harness-lt", 1);
    let seeder = Libtorrent::seed(&payload.torrent, &payload.source_dir(), next_loopback());
    for (label, link) in [
        ("hex", link_to(&payload, &[seeder.addr()])),
        (
            "base32",
            Link::base32(&payload.info_hash)
                .name(&payload.name)
                .peer(seeder.addr()),
        ),
    ] {
        let parsed = libtorrent_parse_magnet(&link.uri());
        assert_eq!(
            parsed["info_hash"].as_str(),
            Some(payload.hash_hex.as_str()),
            "{label}: libtorrent reads another info hash from {link}: {parsed}"
        );
        assert_eq!(
            parsed["name"].as_str(),
            Some(payload.name.as_str()),
            "{parsed}"
        );
        assert_eq!(
            parsed["peers"],
            serde_json::json!([seeder.addr().to_string()]),
            "{parsed}"
        );
        let out = payload.dir_for(&format!("lt-out-{label}"));
        let leecher = Libtorrent::download_magnet(&link.uri(), &out, next_loopback(), &[]);
        leecher.wait_finished(DEADLINE, &[&seeder]);
        assert_payload_files(&payload, &out, &leecher, &[&seeder]);
        let meta = leecher.wait_event("metadata", DEADLINE);
        assert_eq!(
            meta["metadata_size"].as_u64(),
            Some(payload.info_bytes().len() as u64),
            "{meta}"
        );
    }
}

/// libtorrent, given a magnet naming only an aria2 or a Transmission seeder, fetches metadata
/// and data from it: both serve `ut_metadata` on loopback, as the tests of bitfetch fetching
/// from them need.
#[test]
fn harness_libtorrent_fetches_a_magnet_from_aria2_and_transmission() {
    require_tool("aria2c");
    require_tool("transmission-daemon");
    run_parallel(vec![
        case("aria2 seeder", || {
            let payload = Payload::new("harness-a2-seed.bin", SINGLE_SIZE, 4, 15, DEAD_TRACKER);
            let ip = next_loopback();
            let addr = SocketAddr::from((ip, free_port_on(ip)));
            let seeder = aria2_seed(&payload.torrent, &payload.source_dir(), ip, addr.port());
            wait_listening(addr, DEADLINE, &[&seeder]);
            libtorrent_fetches(&payload, addr, &[&seeder]);
        }),
        case("Transmission seeder", || {
            let payload = Payload::multi("harness-tr-seed", TREE, 5);
            let seeder = Transmission::start(next_loopback(), &payload.source_dir());
            seeder.add(&payload.torrent, &payload.source_dir());
            seeder.wait_seeding(TRANSMISSION_DEADLINE, &[]);
            libtorrent_fetches(&payload, SocketAddr::V4(seeder.peer_addr()), &[&seeder]);
        }),
    ]);
}

/// libtorrent, given a magnet naming only the scripted honest peer, fetches its five pieces of
/// metadata and the data: the fake speaks BEP 9 and BEP 10 as a real client expects.
#[test]
fn harness_libtorrent_fetches_a_magnet_from_the_scripted_peer() {
    let scripted = Scripted::new("harness-fake");
    let fake = scripted
        .fake("honest", MetaMisbehaviour::Honest)
        .start(next_loopback());
    let out = support::files::scratch_dir();
    let leecher = Libtorrent::download_magnet(
        &scripted.link(&[fake.addr()]).uri(),
        out.path(),
        next_loopback(),
        &[],
    );
    leecher.wait_finished(DEADLINE, &[&fake]);
    assert_bytes(
        &out.path().join(&scripted.name),
        &scripted.content.data,
        &[&leecher, &fake],
    );
    let r = fake.report();
    assert_eq!(
        r.meta_served.len(),
        5,
        "libtorrent should have fetched 5 metadata pieces\n{}",
        fake.diagnostics()
    );
    assert!(r.ext_errors.is_empty(), "{}", fake.diagnostics());
}

/// The scripted peer's misbehaviours, driven by hand with the tests' own codec: each sends
/// what its documentation says (so a hostile-metadata test that passes or fails does so for
/// bitfetch's reasons).
#[test]
fn harness_scripted_peer_misbehaves_as_documented() {
    use MetaMisbehaviour as M;
    let scripted = Scripted::new("harness-misbehaviour");
    let info = &scripted.info;
    let last = info.len() - 4 * META_PIECE;
    let (scripted, info) = (&scripted, info.as_slice());
    let check = move |how: M, expect: &dyn Fn(&[ut_metadata::Message])| {
        let answers = drive_scripted_peer(scripted, how);
        expect(&answers);
    };
    let data = |m: &ut_metadata::Message| (m.msg_type == ut_metadata::DATA).then_some(m.piece);
    run_parallel(vec![
        case("honest", move || {
            check(M::Honest, &|got| {
                let pieces: Vec<_> = got.iter().filter_map(data).collect();
                assert_eq!(pieces, [0, 1, 2, 3, 4], "{got:?}");
                let whole: Vec<u8> = got.iter().flat_map(|m| m.data.clone()).collect();
                assert!(whole == info, "honest pieces do not make up the metadata");
                assert!(got.iter().all(|m| m.total_size == Some(info.len() as i64)));
            })
        }),
        case("silent", move || {
            check(M::Silent, &|got| assert!(got.is_empty(), "{got:?}"))
        }),
        case("reject all", move || {
            check(M::RejectAll, &|got| {
                assert_eq!(got.len(), 5, "{got:?}");
                assert!(got.iter().all(|m| m.msg_type == ut_metadata::REJECT));
            })
        }),
        case("piece out of range", move || {
            check(M::PieceOutOfRange, &|got| {
                let pieces: Vec<_> = got.iter().filter_map(data).collect();
                assert_eq!(pieces, [5, 1, 2, 3, 4], "{got:?}");
            })
        }),
        case("last piece long and short", move || {
            for (how, len) in [(M::LastPieceLong, last + 1), (M::LastPieceShort, last - 1)] {
                check(how, &|got| {
                    assert_eq!(got.len(), 5, "{got:?}");
                    assert_eq!(got[4].piece, 4);
                    assert_eq!(got[4].data.len(), len, "{how:?}");
                    assert!(got[..4].iter().all(|m| m.data.len() == META_PIECE));
                })
            }
        }),
        case("wrong total size", move || {
            check(M::WrongTotalSize, &|got| {
                assert_eq!(got.len(), 5, "{got:?}");
                assert!(
                    got.iter()
                        .all(|m| m.total_size == Some(info.len() as i64 + 1))
                );
            })
        }),
        case("corrupt", move || {
            check(M::Corrupt, &|got| {
                let whole: Vec<u8> = got.iter().flat_map(|m| m.data.clone()).collect();
                assert_eq!(whole.len(), info.len());
                assert!(
                    sha1_of(&whole) != scripted.hash,
                    "corrupt metadata hashes right"
                );
            })
        }),
        case("unasked", move || {
            check(M::Unasked, &|got| {
                let pieces: Vec<_> = got.iter().filter_map(data).collect();
                assert_eq!(pieces, [4, 0, 1, 2, 3, 4], "{got:?}");
            })
        }),
    ]);
}

/// Connects to a scripted peer serving metadata as `how` says, checks its handshakes, asks
/// for the five pieces of metadata at once and returns every `ut_metadata` message it sent
/// until it has been quiet for a second.
fn drive_scripted_peer(scripted: &Scripted, how: MetaMisbehaviour) -> Vec<ut_metadata::Message> {
    const OUR_ID: u8 = 3;
    let fake = scripted.fake("driven", how).start(next_loopback());
    let mut wire = Wire::dial(next_loopback(), fake.addr()).expect("dial the scripted peer");
    let ours = with_extension_bit(reserved(true));
    wire.send(&handshake(&scripted.hash, &peer_id("DRV"), ours))
        .expect("send a handshake");
    let (theirs, hash, _) = wire
        .handshake_parts(DEADLINE)
        .expect("the scripted peer's handshake");
    assert!(has_extension_bit(&theirs) && hash == scripted.hash);
    let deadline = std::time::Instant::now() + DEADLINE;
    let hello = loop {
        match wire.next_message(deadline).expect("connected") {
            Some((wire_id::EXTENDED, payload)) if payload.first() == Some(&EXT_HANDSHAKE) => {
                break parse_ext_handshake(&payload[1..]).expect("a dictionary");
            }
            Some(_) => {}
            None => panic!("no extension handshake\n{}", fake.diagnostics()),
        }
    };
    assert_eq!(hello.ut_metadata, Some(FAKE_UT_METADATA_ID), "{hello:?}");
    assert_eq!(
        hello.metadata_size,
        Some(scripted.info.len() as i64),
        "{hello:?}"
    );
    let mut out = msg_extended(EXT_HANDSHAKE, &ext_handshake(OUR_ID, None));
    for piece in 0..5 {
        out.extend(msg_extended(
            FAKE_UT_METADATA_ID,
            &ut_metadata::request(piece),
        ));
    }
    wire.send(&out).expect("send requests");
    let mut answers = Vec::new();
    while let Some((mid, payload)) = wire
        .next_message(std::time::Instant::now() + Duration::from_secs(1))
        .expect("connected")
    {
        if mid == wire_id::EXTENDED {
            assert_eq!(payload[0], OUR_ID, "answered under another id than ours");
            answers.push(ut_metadata::parse(&payload[1..]).expect("a ut_metadata message"));
        }
    }
    assert!(
        fake.report().ext_errors.is_empty(),
        "{}",
        fake.diagnostics()
    );
    answers
}

/// aria2c, given only a magnet link, fetches from a libtorrent seeder it finds through
/// opentracker, and from one that dials it: the two ways aria2 meets bitfetch below.
#[test]
fn harness_aria2_fetches_a_magnet_from_libtorrent() {
    run_parallel(vec![
        case("through opentracker", || {
            let tracker = Opentracker::start();
            let payload = Payload::new(
                "harness-a2-tracker.bin",
                SINGLE_SIZE,
                2,
                15,
                &tracker.announce_url(),
            );
            tracker.allow(&payload.hash_hex);
            let seeder = Libtorrent::seed(&payload.torrent, &payload.source_dir(), next_loopback());
            tracker.wait_for_swarm(&payload.hash_hex, 1, 1, DEADLINE, &[&seeder]);
            let link = Link::new(&payload.info_hash).tracker(&tracker.announce_url());
            aria2_fetches(&payload, &link, None, &[&seeder, &tracker]);
        }),
        case("dialled by the seeder", || {
            let payload = Payload::multi("harness-a2-dialled", TREE, 3);
            let link = link_to(&payload, &[]);
            aria2_fetches(
                &payload,
                &link,
                Some(&|aria2| {
                    Box::new(Libtorrent::seed_dialling(
                        &payload.torrent,
                        &payload.source_dir(),
                        next_loopback(),
                        &[aria2],
                    ))
                }),
                &[],
            );
        }),
    ]);
}

/// Something that keeps a seeder alive and describes it.
type Seeder<'a> = Box<dyn Diagnose + 'a>;

/// aria2c downloads `link` into a fresh directory; with `dialler`, once aria2 listens, that
/// seeder is started and given aria2's address to dial. Exit 0 and every file byte for byte.
fn aria2_fetches<'a>(
    payload: &'a Payload,
    link: &Link,
    dialler: Option<&dyn Fn(SocketAddr) -> Seeder<'a>>,
    parts: &[&dyn Diagnose],
) {
    let out = payload.dir_for("aria2-out");
    let ip = next_loopback();
    let port = free_port_on(ip);
    let leecher = aria2_download_magnet(&link.uri(), &out, ip, port);
    let seeder = dialler.map(|start| {
        let addr = SocketAddr::from((ip, port));
        wait_listening(addr, DEADLINE, &[&leecher]);
        start(addr)
    });
    let mut all: Vec<&dyn Diagnose> = parts.to_vec();
    if let Some(s) = &seeder {
        all.push(s.as_ref());
    }
    let status = leecher.wait_with_deadline(DEADLINE, &|| report("other parties:", &all));
    if !status.success() {
        let mut with: Vec<&dyn Diagnose> = vec![&leecher];
        with.extend_from_slice(&all);
        fail("aria2c did not complete the magnet download", &with);
    }
    assert_payload_files(payload, &out, &leecher, &all);
}

// =============================================================================================
// 1. bitfetch fetches a magnet from reference seeders
// =============================================================================================

#[test]
fn bitfetch_fetches_a_magnet_from_each_reference_seeder_by_x_pe() {
    require_tool("aria2c");
    require_tool("transmission-daemon");
    run_parallel(vec![
        case("aria2 seeder, one file", || {
            let payload = Payload::new("from-aria2.bin", SINGLE_SIZE, 11, 15, DEAD_TRACKER);
            let ip = next_loopback();
            let addr = SocketAddr::from((ip, free_port_on(ip)));
            let seeder = aria2_seed(&payload.torrent, &payload.source_dir(), ip, addr.port());
            wait_listening(addr, DEADLINE, &[&seeder]);
            fetch_by_x_pe(&payload, addr, &seeder, DEADLINE);
        }),
        case("Transmission seeder, three files", || {
            let payload = Payload::multi("from-transmission", TREE, 12);
            let seeder = Transmission::start(next_loopback(), &payload.source_dir());
            seeder.add(&payload.torrent, &payload.source_dir());
            seeder.wait_seeding(TRANSMISSION_DEADLINE, &[]);
            let addr = SocketAddr::V4(seeder.peer_addr());
            fetch_by_x_pe(&payload, addr, &seeder, TRANSMISSION_DEADLINE);
        }),
        case(
            "libtorrent seeder, 400 files (metadata in two pieces)",
            || {
                let payload = many_files_payload("from-libtorrent", 13);
                let seeder =
                    Libtorrent::seed(&payload.torrent, &payload.source_dir(), next_loopback());
                fetch_by_x_pe(&payload, seeder.addr(), &seeder, DEADLINE);
            },
        ),
        case(
            "bitfetch seeder, 400 files (metadata in two pieces)",
            || {
                let payload = many_files_payload("from-bitfetch", 14);
                let (seeder, addr) = bitfetch_seeder(&payload, &[]);
                fetch_by_x_pe(&payload, addr, &seeder, DEADLINE);
            },
        ),
    ]);
}

/// bitfetch downloads `magnet:?xt=…&dn=…&x.pe=SEEDER` with `--json`: exit 0, the bytes, the
/// `metadata` event.
fn fetch_by_x_pe(
    payload: &Payload,
    seeder_addr: SocketAddr,
    seeder: &dyn Diagnose,
    deadline: Duration,
) {
    let out = payload.dir_for("bitfetch-out");
    let link = link_to(payload, &[seeder_addr]);
    let run = magnet_download(
        "bitfetch magnet download",
        &link.uri(),
        &out,
        next_loopback(),
        &[],
    );
    assert_magnet_download(&run, payload, &out, deadline, &[seeder]);
}

#[test]
fn bitfetch_fetches_a_magnet_through_opentracker() {
    require_tool("aria2c");
    run_parallel(vec![
        case("aria2 seeder, three files, tr= only", || {
            let tracker = Opentracker::start();
            let payload =
                Payload::multi_tiers("tracked-aria2", TREE, 21, &[vec![tracker.announce_url()]]);
            tracker.allow(&payload.hash_hex);
            let ip = next_loopback();
            let seeder = aria2_seed(
                &payload.torrent,
                &payload.source_dir(),
                ip,
                free_port_on(ip),
            );
            tracker.wait_for_swarm(&payload.hash_hex, 1, 1, DEADLINE, &[&seeder]);
            let link = Link::new(&payload.info_hash).tracker(&tracker.announce_url());
            fetch_through_tracker(&payload, &link.uri(), &[&seeder, &tracker]);
        }),
        case("libtorrent seeder, libtorrent's own magnet link", || {
            let tracker = Opentracker::start();
            let payload = Payload::new(
                "tracked-libtorrent.bin",
                SINGLE_SIZE,
                22,
                15,
                &tracker.announce_url(),
            );
            tracker.allow(&payload.hash_hex);
            let seeder = Libtorrent::seed(&payload.torrent, &payload.source_dir(), next_loopback());
            tracker.wait_for_swarm(&payload.hash_hex, 1, 1, DEADLINE, &[&seeder]);
            let uri = libtorrent_make_magnet(&payload.torrent);
            assert!(
                !uri.contains("x.pe"),
                "libtorrent's link names a peer, so the tracker would not be needed: {uri}"
            );
            fetch_through_tracker(&payload, &uri, &[&seeder, &tracker]);
        }),
    ]);
}

fn fetch_through_tracker(payload: &Payload, uri: &str, parts: &[&dyn Diagnose]) {
    let out = payload.dir_for("bitfetch-out");
    let run = magnet_download("bitfetch magnet download", uri, &out, next_loopback(), &[]);
    assert_magnet_download(&run, payload, &out, DEADLINE, parts);
}

// =============================================================================================
// 2. Reference clients fetch a magnet from bitfetch
// =============================================================================================

#[test]
fn reference_clients_fetch_a_magnet_from_bitfetch() {
    require_tool("aria2c");
    run_parallel(vec![
        case("libtorrent, x.pe and connect_peer, 400 files", || {
            let payload = many_files_payload("lt-from-bitfetch", 31);
            let (seeder, addr) = bitfetch_seeder(&payload, &[]);
            libtorrent_fetches(&payload, addr, &[&seeder]);
        }),
        case("aria2 through opentracker (it reads no x.pe)", || {
            let tracker = Opentracker::start();
            let payload = Payload::new(
                "a2-from-bitfetch.bin",
                SINGLE_SIZE,
                32,
                15,
                &tracker.announce_url(),
            );
            tracker.allow(&payload.hash_hex);
            let (seeder, _) = bitfetch_seeder(&payload, &[]);
            tracker.wait_for_swarm(&payload.hash_hex, 1, 1, DEADLINE, &[&seeder]);
            let link = Link::new(&payload.info_hash).tracker(&tracker.announce_url());
            aria2_fetches(&payload, &link, None, &[&seeder, &tracker]);
        }),
        case("aria2 dialled by a bitfetch seeder", || {
            let payload = Payload::multi("a2-dialled-by-bitfetch", TREE, 33);
            aria2_fetches(
                &payload,
                &link_to(&payload, &[]),
                Some(&|aria2| {
                    let (seeder, _) = bitfetch_seeder(&payload, &["--peer", &aria2.to_string()]);
                    Box::new(seeder)
                }),
                &[],
            );
        }),
        case(
            "libtorrent from a bitfetch still downloading from a magnet",
            || magnet_downloader_serves_metadata(34),
        ),
    ]);
}

/// libtorrent downloads `magnet:?…&x.pe=SEEDER`, also dialling it with `connect_peer`.
fn libtorrent_fetches(payload: &Payload, seeder_addr: SocketAddr, parts: &[&dyn Diagnose]) {
    let out = payload.dir_for("lt-out");
    let link = link_to(payload, &[seeder_addr]);
    let leecher = Libtorrent::download_magnet(&link.uri(), &out, next_loopback(), &[seeder_addr]);
    leecher.wait_finished(DEADLINE, parts);
    assert_payload_files(payload, &out, &leecher, parts);
    let meta = leecher.wait_event("metadata", DEADLINE);
    assert_eq!(
        meta["info_hash"].as_str(),
        Some(payload.hash_hex.as_str()),
        "{meta}"
    );
}

/// A bitfetch seeder S; bitfetch A downloads from a magnet naming only S, with `--seed`;
/// libtorrent, given a magnet naming only A, completes from A (no PEX anywhere, so it can
/// never learn of S). A's own copy is right, and A exits 0 on SIGINT once complete.
fn magnet_downloader_serves_metadata(seed: u64) {
    let payload = many_files_payload("relayed", seed);
    let (seeder, seeder_addr) = bitfetch_seeder(&payload, &[]);
    let relay_out = payload.dir_for("relay-out");
    let relay = magnet_download(
        "bitfetch magnet download --seed",
        &link_to(&payload, &[seeder_addr]).uri(),
        &relay_out,
        next_loopback(),
        &["--seed"],
    );
    let relay_addr = json_listening(&relay);
    libtorrent_fetches(&payload, relay_addr, &[&relay, &seeder]);
    assert_payload_files(&payload, &relay_out, &relay, &[&seeder]);
    assert_metadata_event(&relay, &payload.info_bytes(), &[&seeder]);
    relay.signal(libc::SIGINT);
    relay.wait_with_deadline(Duration::from_secs(30), &String::new);
    assert_exit_code(&relay, 0, &[&seeder]);
}

// =============================================================================================
// 3. --save-torrent
// =============================================================================================

#[test]
fn save_torrent_writes_the_info_dictionary_that_was_fetched() {
    let payload = Payload::multi("saved", TREE, 41);
    let (seeder, addr) = bitfetch_seeder(&payload, &[]);
    let out = payload.dir_for("out");
    let saved = payload.scratch("saved.torrent");
    let run = magnet_download(
        "bitfetch magnet download --save-torrent",
        &link_to(&payload, &[addr]).uri(),
        &out,
        next_loopback(),
        &["--save-torrent", &path_arg(&saved)],
    );
    assert_magnet_download(&run, &payload, &out, DEADLINE, &[&seeder]);
    if !saved.is_file() {
        run.fail(&format!("--save-torrent wrote no {}", saved.display()), &[]);
    }
    assert!(
        info_bytes(&saved) == payload.info_bytes(),
        "the saved torrent's info dictionary is not the original's byte for byte"
    );
    assert_eq!(
        info_hash_hex(&saved),
        payload.hash_hex,
        "transmission-show reads another info hash from the saved torrent"
    );
    let info = run_bitfetch(
        "bitfetch info --json SAVED",
        ["info".into(), path_arg(&saved), "--json".into()],
        DEADLINE,
    );
    info.assert_success();
    let v: Value = serde_json::from_str(info.stdout.trim())
        .unwrap_or_else(|e| panic!("info --json printed no JSON ({e}): {}", info.dump()));
    assert_eq!(
        v["info_hash"].as_str(),
        Some(payload.hash_hex.as_str()),
        "{}",
        info.dump()
    );
    let check = verify(&saved, &out);
    assert_exit_code(&check, 0, &[&run]);
}

// =============================================================================================
// 4. bitfetch magnet TORRENT
// =============================================================================================

#[test]
fn magnet_command_prints_a_link_that_downloads_and_that_libtorrent_reads() {
    // A name and trackers that need escaping in a link.
    let trackers = vec![
        DEAD_TRACKER.to_owned(),
        format!("{}?key=a&b=c+d", closed_port_url()),
    ];
    let payload = Payload::with_tiers(
        "magnet & co+1 = ok.bin",
        SINGLE_SIZE,
        51,
        15,
        &[vec![trackers[0].clone()], vec![trackers[1].clone()]],
    );
    let printed = run_bitfetch(
        "bitfetch magnet TORRENT",
        ["magnet".into(), path_arg(&payload.torrent)],
        DEADLINE,
    );
    printed.assert_success();
    let lines: Vec<&str> = printed.stdout.lines().collect();
    let [uri] = lines[..] else {
        panic!("`bitfetch magnet` must print one line: {}", printed.dump())
    };
    let prefix = "magnet:?xt=urn:btih:";
    assert!(
        uri.starts_with(prefix)
            && uri
                .get(prefix.len()..prefix.len() + 40)
                .is_some_and(|h| h.eq_ignore_ascii_case(&payload.hash_hex)),
        "the link does not start with {prefix}{}: {uri}",
        payload.hash_hex
    );
    let parsed = libtorrent_parse_magnet(uri);
    assert_eq!(
        parsed["info_hash"].as_str(),
        Some(payload.hash_hex.as_str()),
        "libtorrent reads another info hash from {uri}: {parsed}"
    );
    assert_eq!(
        parsed["name"].as_str(),
        Some(payload.name.as_str()),
        "libtorrent reads another name from {uri}: {parsed}"
    );
    assert_eq!(
        parsed["trackers"],
        serde_json::json!(trackers),
        "libtorrent reads other trackers from {uri}: {parsed}"
    );

    let (seeder, addr) = bitfetch_seeder(&payload, &[]);
    let out = payload.dir_for("out");
    let run = magnet_download(
        "bitfetch download $(bitfetch magnet) --peer",
        uri,
        &out,
        next_loopback(),
        &["--peer", &addr.to_string()],
    );
    assert_magnet_download(&run, &payload, &out, DEADLINE, &[&seeder]);
}

// =============================================================================================
// 5. info MAGNET, download MAGNET --list
// =============================================================================================

/// A fake seeder serving `payload`'s metadata honestly (its data is never asked for here).
fn metadata_only_fake(payload: &Payload) -> FakeSeeder {
    SeedSpec::new(vec![0u8; payload.size as usize], payload.pieces.piece_len)
        .name("metadata server")
        .info_hash(payload.info_hash)
        .metadata(payload.info_bytes())
        .start(next_loopback())
}

/// Runs bitfetch with `args` to completion (hang guard [`DEADLINE`]).
fn run_args(desc: &str, args: &[String]) -> Run {
    let run = run_bitfetch(desc, args, DEADLINE);
    assert!(
        !run.timed_out,
        "{desc}: still running after {DEADLINE:?}: {}",
        run.dump()
    );
    run
}

/// The fake was asked for metadata, and for no block of data.
fn assert_metadata_only(fake: &FakeSeeder, run: &Run) {
    let r = fake.report();
    assert!(
        !r.meta_requests.is_empty(),
        "bitfetch never asked the fake for metadata: {}\n{}",
        run.dump(),
        fake.diagnostics()
    );
    assert!(
        r.requests.is_empty(),
        "only the metadata was wanted, yet bitfetch asked for {} block(s) of data: {}\n{}",
        r.requests.len(),
        run.dump(),
        fake.diagnostics()
    );
}

#[test]
fn info_and_list_fetch_only_the_metadata() {
    let payload = Payload::multi("listed", TREE, 61);
    let info_json = |source: String| -> (Run, Value) {
        let run = run_args(
            "bitfetch info --json",
            &["info".into(), source, "--json".into()],
        );
        run.assert_success();
        let v = serde_json::from_str(run.stdout.trim())
            .unwrap_or_else(|e| panic!("info --json printed no JSON ({e}): {}", run.dump()));
        (run, v)
    };
    let (_, from_torrent) = info_json(path_arg(&payload.torrent));
    let same_as_torrent = |label: &str, v: &Value| {
        // Everything that comes from the info dictionary (a link has no comment or date).
        for key in [
            "name",
            "info_hash",
            "total_size",
            "piece_length",
            "pieces",
            "private",
            "files",
        ] {
            assert_eq!(
                v[key], from_torrent[key],
                "{label}: `{key}` differs between info MAGNET and info TORRENT:\n{v}\n{from_torrent}"
            );
        }
    };
    let (payload, same_as_torrent, info_json) = (&payload, &same_as_torrent, &info_json);
    run_parallel(vec![
        case("info --json", move || {
            let fake = metadata_only_fake(payload);
            let (run, v) = info_json(link_to(payload, &[fake.addr()]).uri());
            same_as_torrent("hex link", &v);
            assert_metadata_only(&fake, &run);
        }),
        case("info, text", move || {
            let fake = metadata_only_fake(payload);
            let run = run_args(
                "bitfetch info MAGNET",
                &["info".into(), link_to(payload, &[fake.addr()]).uri()],
            );
            run.assert_success();
            for needle in [&payload.hash_hex, &payload.name].into_iter().chain(
                TREE.iter()
                    .map(|(rel, _)| rel.to_string())
                    .collect::<Vec<_>>()
                    .iter(),
            ) {
                assert!(
                    run.stdout.contains(needle.as_str()),
                    "info MAGNET does not show {needle:?}: {}",
                    run.dump()
                );
            }
            assert_metadata_only(&fake, &run);
        }),
        case("info --json, base32 link", move || {
            let fake = metadata_only_fake(payload);
            let link = Link::base32(&payload.info_hash).peer(fake.addr());
            let (_, v) = info_json(link.uri());
            same_as_torrent("base32 link", &v);
        }),
        case("info, a btmh the metadata does not have", move || {
            // The metadata matches the link's btih but not its v2 hash: refused, as the link
            // asserts both (v1 torrents have no v2 hash; hybrid ones are in tests/v2.rs).
            let fake = metadata_only_fake(payload);
            let link = Link::new(&payload.info_hash)
                .raw("xt", &format!("urn:btmh:1220{}", "ab".repeat(32)))
                .peer(fake.addr());
            let run = run_args("bitfetch info (wrong btmh)", &["info".into(), link.uri()]);
            run.assert_code(6);
            assert!(run.stdout.is_empty(), "{}", run.dump());
        }),
        case("download --list", move || {
            let listed = |source: String, out: &Path| {
                let run = run_args(
                    "bitfetch download --list",
                    &[
                        "download".into(),
                        source,
                        "--list".into(),
                        "-o".into(),
                        path_arg(out),
                        "--bind".into(),
                        next_loopback().to_string(),
                        "--port".into(),
                        "0".into(),
                    ],
                );
                run.assert_success();
                assert!(
                    !out.exists(),
                    "--list created {}: {}",
                    out.display(),
                    run.dump()
                );
                run
            };
            let want = listed(path_arg(&payload.torrent), &payload.scratch("list-torrent"));
            let fake = metadata_only_fake(payload);
            let got = listed(
                link_to(payload, &[fake.addr()]).uri(),
                &payload.scratch("list-magnet"),
            );
            assert_eq!(
                got.stdout, want.stdout,
                "download MAGNET --list lists other files than download TORRENT --list"
            );
            assert_metadata_only(&fake, &got);
        }),
    ]);
}

// =============================================================================================
// The download options with a magnet
// =============================================================================================

#[test]
fn download_options_work_with_a_magnet() {
    run_parallel(vec![
        case("--select 1,3 of three files", select_two_of_three),
        case("-O - streams the file", stream_to_stdout),
        case(
            "--peer instead of x.pe, a fixed --port",
            peer_and_fixed_port,
        ),
    ]);
}

fn select_two_of_three() {
    let payload = Payload::multi("selected", TREE, 71);
    let listing = run_args(
        "bitfetch download TORRENT --list",
        &[
            "download".into(),
            path_arg(&payload.torrent),
            "--list".into(),
        ],
    );
    listing.assert_success();
    let path_of = |index: &str| -> String {
        listing
            .stdout
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(index)).then(|| words.nth(1).unwrap_or_default().to_owned())
            })
            .unwrap_or_else(|| panic!("no file {index} in --list: {}", listing.dump()))
    };
    let chosen = [path_of("1"), path_of("3")];
    let (seeder, addr) = bitfetch_seeder(&payload, &[]);
    let out = payload.dir_for("out");
    let run = magnet_download(
        "bitfetch magnet --select 1,3",
        &link_to(&payload, &[addr]).uri(),
        &out,
        next_loopback(),
        &["--select", "1,3"],
    );
    run.wait_with_deadline(DEADLINE, &|| seeder.diagnostics());
    assert_exit_code(&run, 0, &[&seeder]);
    let refs: Vec<&str> = chosen.iter().map(String::as_str).collect();
    let tree = walk(&out);
    if tree != payload.expected_tree(&refs) {
        run.fail(
            &format!("the output should hold exactly {chosen:?}, it holds {tree:#?}"),
            &[&seeder],
        );
    }
    for rel in &refs {
        assert_bytes(&payload.downloaded(&out, rel), payload.file(rel), &[&run]);
    }
    assert_metadata_event(&run, &payload.info_bytes(), &[&seeder]);
}

fn stream_to_stdout() {
    let payload = Payload::new("streamed.bin", SINGLE_SIZE, 72, 15, DEAD_TRACKER);
    let (seeder, addr) = bitfetch_seeder(&payload, &[]);
    let run = ChildGuard::bitfetch([
        "download".into(),
        link_to(&payload, &[addr]).uri(),
        "-O".into(),
        "-".into(),
        "--bind".into(),
        next_loopback().to_string(),
        "--port".into(),
        "0".into(),
        "-q".into(),
    ]);
    run.expect_code(0, &[&seeder]);
    if run.stdout() != payload.bytes() {
        run.fail(
            &format!(
                "-O - printed {} bytes that are not the file's {}",
                run.stdout().len(),
                payload.size
            ),
            &[&seeder],
        );
    }
}

fn peer_and_fixed_port() {
    let payload = Payload::new("by-peer.bin", SINGLE_SIZE, 73, 15, DEAD_TRACKER);
    let (seeder, addr) = bitfetch_seeder(&payload, &[]);
    let ip = next_loopback();
    let port = free_port_on(ip);
    let out = payload.dir_for("out");
    let link = Link::new(&payload.info_hash);
    let mut args: Vec<String> = vec![
        "download".into(),
        link.uri(),
        "-o".into(),
        path_arg(&out),
        "--bind".into(),
        ip.to_string(),
        "--port".into(),
        port.to_string(),
        "--peer".into(),
        addr.to_string(),
        "--json".into(),
    ];
    args.extend([
        "--timeout".into(),
        "10m".into(),
        "--stall-timeout".into(),
        "5m".into(),
    ]);
    let run = spawn_bitfetch("bitfetch magnet --peer --port", &args);
    let listening = json_listening(&run);
    assert_eq!(
        listening,
        SocketAddr::from((ip, port)),
        "bitfetch does not listen on --bind IP --port N"
    );
    assert_magnet_download(&run, &payload, &out, DEADLINE, &[&seeder]);
}

// =============================================================================================
// Metadata that never comes
// =============================================================================================

/// In-memory content for scripted peers: its metadata padded to 5 pieces (the last one short),
/// so that a peer can send a piece before it is asked (bitfetch asks a peer for at most three at
/// a time) and a wrong-sized last piece is a short one.
struct Scripted {
    content: Content,
    name: String,
    info: Vec<u8>,
    hash: [u8; 20],
}

impl Scripted {
    fn new(label: &str) -> Scripted {
        let content = Content::new(10 * 32 * 1024 + 1_234, seed_of(label));
        let name = format!(
            "{}.bin",
            label.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        );
        let info = padded(single_info(name.as_bytes(), &content));
        Scripted::with_info(content, name, info)
    }

    /// Content described by `info` (whose files add up to the content's size).
    fn with_info(content: Content, name: String, info: Vec<u8>) -> Scripted {
        Scripted {
            hash: sha1_of(&info),
            content,
            name,
            info,
        }
    }

    /// A fake seeder of this content whose metadata is served as `how` says.
    fn fake(&self, label: &str, how: MetaMisbehaviour) -> SeedSpec {
        SeedSpec::content(&self.content, self.hash)
            .name(label)
            .metadata(self.info.clone())
            .meta_misbehave(how)
    }

    fn link(&self, peers: &[SocketAddr]) -> Link {
        Link::new(&self.hash).name(&self.name).peers(peers)
    }
}

/// `info` (an info dictionary) with an `x-padding` entry that brings it to about four and a
/// half metadata pieces: a key bitfetch ignores, but part of the info hash.
fn padded(info: B) -> Vec<u8> {
    let B::Dict(mut pairs) = info else {
        panic!("an info dictionary")
    };
    let fill = support::files::pseudo_random(4 * META_PIECE + META_PIECE / 2, 99);
    pairs.push((b"x-padding".to_vec(), B::Bytes(fill)));
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = B::Dict(pairs).encode();
    assert_eq!(
        bytes.len().div_ceil(META_PIECE),
        5,
        "padded metadata pieces"
    );
    bytes
}

/// Whether `check` comes to hold before `run` exits (a last look after the exit) and within
/// [`DEADLINE`].
fn before_exit(run: &ChildGuard, check: impl Fn() -> bool) -> bool {
    let seen = support::poll_until(DEADLINE, || {
        if check() {
            Some(true)
        } else if run.exit_status().is_some() {
            Some(check())
        } else {
            None
        }
    });
    seen == Some(true)
}

/// A listener nobody accepts on: a second peer that never answers, so a downloader whose
/// only other peer was dropped has a reason to wait rather than to give up with exit 6.
fn holder() -> TcpListener {
    TcpListener::bind((next_loopback(), 0)).expect("bind the holder")
}

#[test]
fn a_magnet_whose_metadata_never_comes_ends_at_the_time_limits() {
    run_parallel(vec![
        case("a silent peer, --stall-timeout 2s: exit 8", || {
            never_comes(
                "silent-stall",
                MetaMisbehaviour::Silent,
                &["--stall-timeout", "2s", "--timeout", "1h"],
                8,
            );
        }),
        case("a silent peer, --timeout 2s: exit 7", || {
            never_comes(
                "silent-timeout",
                MetaMisbehaviour::Silent,
                &["--timeout", "2s", "--stall-timeout", "1h"],
                7,
            );
        }),
        case(
            "a peer rejecting every request, --stall-timeout 3s: exit 8",
            || {
                let fake = never_comes(
                    "reject-alone",
                    MetaMisbehaviour::RejectAll,
                    &["--stall-timeout", "3s", "--timeout", "1h"],
                    8,
                );
                let r = fake.report();
                assert!(r.meta_rejects >= 1, "{}", fake.diagnostics());
                // A reject is an answer to rest on, not to ask again at once: a few seconds
                // of a storm are a handful of requests, not a loop.
                assert!(
                    r.meta_requests.len() <= 50,
                    "bitfetch asked a rejecting peer {} times in 3 s\n{}",
                    r.meta_requests.len(),
                    fake.diagnostics()
                );
            },
        ),
    ]);
}

/// A download of a magnet whose only peer serves its metadata as `how` says, with the time
/// limits in `limits`: it asks for metadata, then ends with `code`, its `error` event last,
/// no `metadata` or `start` event, nothing written. Returns the fake for more checks.
fn never_comes(label: &str, how: MetaMisbehaviour, limits: &[&str], code: i32) -> FakeSeeder {
    let scripted = Scripted::new(label);
    let fake = scripted.fake(label, how).start(next_loopback());
    let out = support::files::scratch_dir();
    let run = magnet_download(
        label,
        &scripted.link(&[fake.addr()]).uri(),
        out.path(),
        next_loopback(),
        limits,
    );
    if !before_exit(&run, || !fake.report().meta_requests.is_empty()) {
        run.fail("bitfetch never asked the only peer for metadata", &[&fake]);
    }
    run.wait_with_deadline(DEADLINE, &|| fake.diagnostics());
    assert_exit_code(&run, code, &[&fake]);
    let events = events(&run);
    let last = events.last().cloned().unwrap_or_default();
    if kind(&last) != "error" || last["code"].as_u64() != Some(code as u64) {
        run.fail(
            &format!("the last event must be an `error` with code {code}: {last}"),
            &[&fake],
        );
    }
    for never in ["metadata", "start", "finished"] {
        if of_kind(&events, never).next().is_some() {
            run.fail(&format!("a `{never}` event without metadata"), &[&fake]);
        }
    }
    let written = walk(out.path());
    if !written.is_empty() {
        run.fail(&format!("wrote {written:?} without metadata"), &[&fake]);
    }
    fake
}

// =============================================================================================
// Hostile metadata
// =============================================================================================

#[test]
fn hostile_metadata_sizes_in_the_extension_handshake_are_refused() {
    let sizes: [(&str, i64); 4] = [
        ("0", 0),
        ("-16384", -16_384),
        ("2^31", 1 << 31),
        ("i64::MAX", i64::MAX),
    ];
    let mut cases = Vec::new();
    for (label, size) in sizes {
        cases.push(case(format!("metadata_size {label}, alone"), move || {
            size_liar_alone(label, size)
        }));
        cases.push(case(
            format!("metadata_size {label}, with an honest peer"),
            move || size_liar_beside_an_honest_peer(label, size),
        ));
    }
    run_parallel(cases);
}

/// The liar alone (with a holder that never answers): never asked for metadata, the download
/// ends with the stall timeout, in bounded memory.
fn size_liar_alone(label: &str, size: i64) {
    let scripted = Scripted::new(&format!("liar-alone-{label}"));
    let liar = scripted
        .fake("size liar", MetaMisbehaviour::Honest)
        .announce_metadata_size(size)
        .start(next_loopback());
    // A second peer that never answers: whether bitfetch drops the liar or keeps it, it
    // then waits for metadata (rather than giving up for want of peers, exit 6).
    let holder = holder();
    let out = support::files::scratch_dir();
    let run = magnet_download(
        "bitfetch magnet, a size liar alone",
        &scripted.link(&[liar.addr()]).uri(),
        out.path(),
        next_loopback(),
        &[
            "--stall-timeout",
            "3s",
            "--timeout",
            "1h",
            "--peer",
            &holder.local_addr().expect("local_addr").to_string(),
        ],
    );
    let mem = MemWatch::start(&run);
    run.wait_with_deadline(DEADLINE, &|| liar.diagnostics());
    assert_exit_code(&run, 8, &[&liar]);
    mem.assert_bounded(&format!("metadata_size {label}"), &|| run.diagnostics());
    let asked = liar.report().meta_requests;
    if !asked.is_empty() {
        run.fail(
            &format!("bitfetch asked for metadata of size {size} (pieces {asked:?})"),
            &[&liar],
        );
    }
    assert!(
        walk(out.path()).is_empty(),
        "wrote something without metadata"
    );
}

/// The liar first in the link, an honest peer second: the download completes, the liar never
/// asked for metadata.
fn size_liar_beside_an_honest_peer(label: &str, size: i64) {
    let scripted = Scripted::new(&format!("liar-honest-{label}"));
    let liar = scripted
        .fake("size liar", MetaMisbehaviour::Honest)
        .announce_metadata_size(size)
        .start(next_loopback());
    let honest = scripted
        .fake("honest", MetaMisbehaviour::Honest)
        .start(next_loopback());
    let out = support::files::scratch_dir();
    let run = magnet_download(
        "bitfetch magnet, a size liar and an honest peer",
        &scripted.link(&[liar.addr(), honest.addr()]).uri(),
        out.path(),
        next_loopback(),
        &[],
    );
    let mem = MemWatch::start(&run);
    scripted_completes(&run, &scripted, out.path(), &[&liar, &honest]);
    mem.assert_bounded(&format!("metadata_size {label}"), &|| run.diagnostics());
    let asked = liar.report().meta_requests;
    if !asked.is_empty() {
        run.fail(
            &format!("bitfetch asked a peer announcing metadata_size {size} for pieces {asked:?}"),
            &[&liar, &honest],
        );
    }
}

/// Exit 0, OUT/NAME is the content byte for byte, the `metadata` event is right.
fn scripted_completes(run: &ChildGuard, scripted: &Scripted, out: &Path, parts: &[&dyn Diagnose]) {
    run.wait_with_deadline(DEADLINE, &|| report("other parties:", parts));
    assert_exit_code(run, 0, parts);
    let mut all: Vec<&dyn Diagnose> = vec![run];
    all.extend_from_slice(parts);
    assert_bytes(&out.join(&scripted.name), &scripted.content.data, &all);
    assert_metadata_event(run, &scripted.info, parts);
}

#[test]
fn peers_sending_bad_metadata_pieces_are_dropped_and_an_honest_peer_completes() {
    use MetaMisbehaviour as M;
    let attacks = [
        ("data for a piece index out of range", M::PieceOutOfRange),
        ("the last piece one byte long", M::LastPieceLong),
        ("the last piece one byte short", M::LastPieceShort),
        ("a total_size other than announced", M::WrongTotalSize),
        ("a piece never asked for", M::Unasked),
        ("metadata failing its SHA-1", M::Corrupt),
    ];
    run_parallel(
        attacks
            .into_iter()
            .map(|(label, how)| case(label, move || attacked_then_honest(label, how)))
            .collect(),
    );
}

/// A download whose only peer at first is the attacker (named by `x.pe`; a holder that never
/// answers is given with `--peer`). Once the attack went out, bitfetch must drop the attacker;
/// then an honest peer dials in and the download completes, in bounded memory. A peer whose
/// metadata failed the hash must be banned: reported, and never dialled again.
fn attacked_then_honest(label: &str, how: MetaMisbehaviour) {
    let scripted = Scripted::new(label);
    let attacker = scripted.fake("attacker", how).start(next_loopback());
    let holder = holder();
    let out = support::files::scratch_dir();
    let run = magnet_download(
        "bitfetch magnet, attacked",
        &scripted.link(&[attacker.addr()]).uri(),
        out.path(),
        next_loopback(),
        &[
            "--peer",
            &holder.local_addr().expect("local_addr").to_string(),
        ],
    );
    let mem = MemWatch::start(&run);
    let listen = json_listening(&run);
    if !before_exit(&run, || attacker.report().meta_attacks > 0) {
        run.fail(
            "the attacker never got to attack (no metadata request?)",
            &[&attacker],
        );
    }
    if !attacker.wait_all_closed(DROP_DEADLINE) {
        run.fail(
            &format!("bitfetch kept the peer that sent {label} for {DROP_DEADLINE:?}"),
            &[&attacker],
        );
    }
    let honest = scripted
        .fake("honest", MetaMisbehaviour::Honest)
        .start(next_loopback());
    honest.dial(listen);
    scripted_completes(&run, &scripted, out.path(), &[&attacker, &honest]);
    mem.assert_bounded(label, &|| run.diagnostics());
    if how == MetaMisbehaviour::Corrupt {
        if of_kind(&events(&run), "peer_banned").next().is_none() {
            run.fail(
                "the peer whose metadata failed its SHA-1 was not reported banned",
                &[&attacker],
            );
        }
        let dials = attacker.report().accepts;
        if dials != 1 {
            run.fail(
                &format!("a banned peer was dialled again ({dials} connections in all)"),
                &[&attacker, &honest],
            );
        }
    }
}

#[test]
fn a_reject_storm_does_not_stop_a_download_that_has_an_honest_peer() {
    let scripted = Scripted::new("reject-storm");
    let rejecter = scripted
        .fake("rejecter", MetaMisbehaviour::RejectAll)
        .start(next_loopback());
    let holder = holder();
    let out = support::files::scratch_dir();
    let run = magnet_download(
        "bitfetch magnet, rejected",
        &scripted.link(&[rejecter.addr()]).uri(),
        out.path(),
        next_loopback(),
        &[
            "--peer",
            &holder.local_addr().expect("local_addr").to_string(),
        ],
    );
    let listen = json_listening(&run);
    if !before_exit(&run, || rejecter.report().meta_rejects > 0) {
        run.fail("the rejecter was never asked for metadata", &[&rejecter]);
    }
    let honest = scripted
        .fake("honest", MetaMisbehaviour::Honest)
        .start(next_loopback());
    honest.dial(listen);
    scripted_completes(&run, &scripted, out.path(), &[&rejecter, &honest]);
}

#[test]
fn metadata_that_hashes_right_but_describes_a_hostile_torrent_is_refused() {
    run_parallel(vec![
        case("name ..", || {
            hostile_torrent("name-dotdot", |_, content| single_info(b"..", content))
        }),
        case("path [.., .., evil]", || {
            hostile_torrent("path-dotdot", |_, content| {
                multi_info(
                    b"inner",
                    &[(
                        vec![b"..".to_vec(), b"..".to_vec(), b"evil".to_vec()],
                        content.data.len() as u64,
                    )],
                    content,
                )
            })
        }),
        case("an absolute path into the sandbox", || {
            hostile_torrent("absolute", |sandbox, content| {
                let target = sandbox.root.join("box").join("evil");
                let element = target.to_str().expect("UTF-8 sandbox").as_bytes().to_vec();
                multi_info(
                    b"inner",
                    &[(vec![element], content.data.len() as u64)],
                    content,
                )
            })
        }),
    ]);
}

/// An honest fake serves metadata built by `info` (for the sandbox) and its data: bitfetch
/// must refuse the torrent with exit 3 and one error line, ask for no data, and write nothing
/// anywhere (OUT stays empty, nothing appears beside it).
fn hostile_torrent(label: &str, info: impl Fn(&Sandbox, &Content) -> B) {
    let sandbox = Sandbox::new();
    let content = Content::new(3 * 32 * 1024 + 77, seed_of(label));
    let bytes = info(&sandbox, &content).encode();
    let scripted = Scripted::with_info(content, label.to_owned(), bytes);
    let fake = scripted
        .fake("hostile torrent", MetaMisbehaviour::Honest)
        .start(next_loopback());
    let run = run_args(
        "bitfetch download MAGNET of a hostile torrent",
        &[
            "download".into(),
            scripted.link(&[fake.addr()]).uri(),
            "-o".into(),
            path_arg(&sandbox.out),
            "--bind".into(),
            next_loopback().to_string(),
            "--port".into(),
            "0".into(),
            "-q".into(),
        ],
    );
    run.assert_code(3);
    assert_one_error_line(&run);
    sandbox.assert_sentinel(&|| run.dump());
    let inside = walk(&sandbox.out);
    assert!(
        inside.is_empty(),
        "{label}: wrote {inside:?} under OUT: {}",
        run.dump()
    );
    assert!(
        fake.report().requests.is_empty(),
        "{label}: bitfetch asked for data of a torrent it must refuse\n{}",
        fake.diagnostics()
    );
    assert!(
        !fake.report().meta_requests.is_empty(),
        "{label}: the refusal must come from the fetched metadata, yet none was asked for: {}",
        run.dump()
    );
}

/// stderr is exactly one line, `bitfetch: error: …`.
fn assert_one_error_line(run: &Run) {
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("bitfetch: error:"),
        "expected one `bitfetch: error:` line on stderr: {}",
        run.dump()
    );
}

// =============================================================================================
// Malformed magnet links
// =============================================================================================

#[test]
fn malformed_magnet_links_are_refused_at_once_with_one_error_line() {
    let trap = Trap::start();
    let hash = [0x5au8; 20];
    let hex40 = hex(&hash);
    let b32 = base32(&hash);
    let with_trap = |link: Link| link.peer(trap.addr()).uri();
    let many_peers = |n: u16| {
        let peers: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i)))
            .collect();
        with_trap(Link::new(&hash).peers(&peers))
    };
    let links: Vec<(&str, String)> = vec![
        (
            "a bad hex digit",
            with_trap(Link::empty().raw("xt", &format!("urn:btih:{}g", &hex40[..39]))),
        ),
        (
            "39 hex digits",
            with_trap(Link::empty().raw("xt", &format!("urn:btih:{}", &hex40[..39]))),
        ),
        (
            "41 hex digits",
            with_trap(Link::empty().raw("xt", &format!("urn:btih:{hex40}0"))),
        ),
        (
            "a bad base32 character",
            with_trap(Link::empty().raw("xt", &format!("urn:btih:{}1{}", &b32[..10], &b32[11..]))),
        ),
        (
            "31 base32 characters",
            with_trap(Link::empty().raw("xt", &format!("urn:btih:{}", &b32[..31]))),
        ),
        (
            "btmh of 31 bytes",
            with_trap(Link::empty().raw("xt", &format!("urn:btmh:1220{}", "cd".repeat(31)))),
        ),
        ("no xt", with_trap(Link::empty().name("nothing"))),
        (
            "two different btih",
            with_trap(Link::new(&hash).raw("xt", &format!("urn:btih:{}", hex(&[0xa5; 20])))),
        ),
        ("1,000 x.pe peers", many_peers(1_000)),
        ("5,000 x.pe peers", many_peers(5_000)),
    ];
    let trap = &trap;
    let cases = links
        .into_iter()
        .flat_map(|(label, uri)| {
            let uri2 = uri.clone();
            [
                case(format!("download: {label}"), move || {
                    refused(label, &uri, true, trap)
                }),
                case(format!("info: {label}"), move || {
                    refused(label, &uri2, false, trap)
                }),
            ]
        })
        .collect();
    run_parallel(cases);
}

/// `download URI -o OUT …` or `info URI`: exit 3 before the hang guard, one error line,
/// nothing created, the trap (a peer in the link) never dialled.
fn refused(label: &str, uri: &str, download: bool, trap: &Trap) {
    let out = support::files::scratch_dir();
    let target = out.path().join("out");
    let args: Vec<String> = if download {
        vec![
            "download".into(),
            uri.into(),
            "-o".into(),
            path_arg(&target),
            "--bind".into(),
            next_loopback().to_string(),
            "--port".into(),
            "0".into(),
        ]
    } else {
        vec!["info".into(), uri.into()]
    };
    let run = run_bitfetch(label, &args, REFUSAL_DEADLINE);
    assert!(
        !run.timed_out,
        "{label}: a malformed link must be refused at once, bitfetch was still running after \
         {REFUSAL_DEADLINE:?}: {}",
        run.dump()
    );
    run.assert_code(3);
    assert_one_error_line(&run);
    assert!(
        !target.exists(),
        "{label}: created {}: {}",
        target.display(),
        run.dump()
    );
    let hits = trap.hits();
    assert!(
        hits.is_empty(),
        "{label}: bitfetch dialled a peer of a link it refused ({hits:?}): {}",
        run.dump()
    );
}
