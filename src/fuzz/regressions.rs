//! Replays the fuzz seed corpora and every saved crasher through the fuzz targets.
//!
//! `tests/fuzz/corpus/<target>/` holds the seeds `scripts/fuzz` starts from;
//! `tests/fuzz/regressions/<target>/` holds inputs that once broke a property (kept by
//! `scripts/fuzz` when libFuzzer finds a crash or a timeout). Each must now pass through
//! `fuzz::<target>` without a panic. The explicit cases at the end are hostile inputs
//! written by hand, run through the same 2 MiB-stack path the fuzzer uses.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::thread;

use crate::fuzz::{self, OutboxTally, outbox::Op};

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 9] = [
    ("metainfo", fuzz::metainfo),
    ("wire", fuzz::wire),
    ("tracker_http", fuzz::tracker_http),
    ("tracker_udp", fuzz::tracker_udp),
    ("path", fuzz::path),
    ("magnet", fuzz::magnet),
    ("ut_metadata", fuzz::ut_metadata),
    ("outbox", fuzz::outbox),
    ("krpc", fuzz::krpc),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

/// The files in `dir`, sorted; none when the directory does not exist. Dot files (a
/// `.gitkeep`) are not inputs.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a corpus directory").path())
        .filter(|p| p.is_file())
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// Runs `target` on `data` and returns the panic message, if it panicked.
fn run(target: Target, data: &[u8]) -> Option<String> {
    let payload = panic::catch_unwind(AssertUnwindSafe(|| target(data))).err()?;
    Some(
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic with a non-string payload".into()),
    )
}

fn replay(kind: &str) -> usize {
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (name, target) in TARGETS {
        for file in inputs(&fuzz_dir().join(kind).join(name)) {
            let data = fs::read(&file).expect("reading a fuzz input");
            if let Some(msg) = run(target, &data) {
                failures.push(format!("{}: {msg}", file.display()));
            }
            replayed += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz inputs that panic:\n{}",
        failures.join("\n")
    );
    replayed
}

#[test]
fn every_target_has_a_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        assert!(
            !inputs(&dir).is_empty(),
            "{} has no seed inputs",
            dir.display()
        );
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{name}.rs"))
                .is_file(),
            "no cargo-fuzz target for {name}"
        );
    }
}

#[test]
fn seed_corpora_replay_cleanly() {
    assert!(replay("corpus") >= TARGETS.len());
}

#[test]
fn saved_crashers_replay_cleanly() {
    replay("regressions");
}

/// A violated property inside the small-stack thread reaches the caller as a panic, so a
/// crasher can never pass here by being swallowed.
#[test]
fn a_panic_on_the_fuzz_thread_reaches_the_caller() {
    let msg = run(
        |data| fuzz::on_small_stack(data, |d| assert!(d.is_empty(), "property broken")),
        b"x",
    );
    assert_eq!(msg.as_deref(), Some("property broken"));
    assert_eq!(run(|data| fuzz::on_small_stack(data, |_| {}), b"x"), None);
}

// ---------------------------------------------------------------------------------------------
// Hostile inputs written by hand
// ---------------------------------------------------------------------------------------------

fn nested(open: &[u8], depth: usize) -> Vec<u8> {
    let mut v = open.repeat(depth);
    v.extend(std::iter::repeat_n(b'e', depth));
    v
}

/// `piece_count` as the wire target's 3-byte prefix, an all-zero handshake slot, then `frames`.
fn wire_input(piece_count: u32, frames: &[u8]) -> Vec<u8> {
    let mut v = piece_count.to_be_bytes()[1..].to_vec();
    v.extend([0u8; 68]);
    v.extend_from_slice(frames);
    v
}

fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32 + 1).to_be_bytes().to_vec();
    v.push(id);
    v.extend_from_slice(payload);
    v
}

#[test]
fn nesting_bombs_do_not_overflow_the_stack() {
    for bomb in [
        vec![b'l'; 100_000],
        nested(b"l", 100_000),
        nested(b"d1:a", 100_000),
        b"d4:infod5:files".repeat(20_000),
    ] {
        for (name, target) in TARGETS {
            assert_eq!(run(target, &bomb), None, "{name}");
        }
    }
    let ext = [&[0u8][..], &nested(b"l", 100_000)].concat();
    assert_eq!(run(fuzz::wire, &wire_input(8, &frame(20, &ext))), None);
}

#[test]
fn huge_declared_lengths_are_refused_without_allocating() {
    let cases: [&[u8]; 5] = [
        b"1099511627776:abc",
        b"d4:infod6:lengthi5e4:name1099511627776:abcee",
        b"d5:peers1099511627776:\x7f\x00\x00\x01\x1a\xe1e",
        b"18446744073709551616:x",
        b"li1ei99999999999999999999999ee",
    ];
    for data in cases {
        for (name, target) in TARGETS {
            assert_eq!(run(target, data), None, "{name} on {data:?}");
        }
    }
    // Frame lengths: over the cap, a bitfield for 16 million pieces, a piece over one block.
    for frames in [
        vec![0xff; 8],
        frame(5, &[0; 100]),
        [&(1u32 << 20).to_be_bytes()[..], &[5]].concat(),
        frame(7, &[0; 9 + 16 * 1024 + 1]),
    ] {
        assert_eq!(run(fuzz::wire, &wire_input(0xff_ffff, &frames)), None);
        assert_eq!(run(fuzz::wire, &wire_input(0, &frames)), None);
    }
}

#[test]
fn short_and_empty_inputs() {
    for len in 0..=80 {
        let data = vec![0u8; len];
        for (name, target) in TARGETS {
            assert_eq!(run(target, &data), None, "{name} on {len} zero bytes");
        }
    }
}

/// Peer threads run on 256 KiB stacks, smaller than the fuzz thread: the deepest extended
/// handshake the limits let through must still parse there.
#[test]
fn deepest_allowed_extended_handshake_fits_a_peer_thread_stack() {
    let depth = crate::bencode::Limits::SMALL.max_depth;
    let mut doc = b"d1:m".to_vec();
    doc.extend(nested(b"l", depth - 1));
    doc.push(b'e');
    let parsed = thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || crate::extension::parse_handshake(&doc).is_ok())
        .unwrap()
        .join()
        .unwrap();
    assert!(parsed);
}

#[test]
fn hostile_magnet_links() {
    let hash = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a";
    let long_pe: String = (0..20_000)
        .map(|i| format!("&x.pe=10.{}.{}.1:1", i / 256 % 256, i % 256))
        .collect();
    let cases = [
        format!("magnet:?xt=urn:btih:{hash}{long_pe}"),
        format!("magnet:?xt=urn:btih:{hash}&dn={}", "%".repeat(50_000)),
        format!("magnet:?xt=urn:btih:{hash}&so={}", "0-99999,".repeat(5_000)),
        format!("magnet:?xt=urn:btih:{hash}&dn={}", "..%2F".repeat(1_000)),
        format!(
            "magnet:?xt=urn:btih:{hash}&tr={}",
            "%E2%80%AE".repeat(1_000)
        ),
        format!("magnet:?{}", "xt=urn:btih:&".repeat(5_000)),
        "magnet:?xt=urn:btih:%C3%A9".to_string(),
    ];
    for uri in &cases {
        assert_eq!(run(fuzz::magnet, uri.as_bytes()), None, "{}", &uri[..60]);
    }
}

#[test]
fn hostile_ut_metadata_messages() {
    let data = |total: &str, bytes: usize| {
        let mut v = format!("d8:msg_typei1e5:piecei0e10:total_sizei{total}ee").into_bytes();
        v.resize(v.len() + bytes, 0);
        v
    };
    let cases = [
        data("0", 0),
        data("-1", 1),
        data("2147483648", 16384),
        data("67108865", 16384),
        data("16385", 16385),
        b"d8:msg_typei0e5:piecei4096ee".to_vec(),
        b"d8:msg_typei0e5:piecei-1ee".to_vec(),
        [&b"d8:msg_typei0e1:x"[..], &[b'l'; 100_000]].concat(),
        b"d8:msg_typei1e5:piecei0e10:total_sizei16ee4294967296:".to_vec(),
    ];
    for payload in &cases {
        assert_eq!(run(fuzz::ut_metadata, payload), None);
    }
}

// ---------------------------------------------------------------------------------------------
// The command queue, by hand
// ---------------------------------------------------------------------------------------------

/// An `outbox` input: `pieces` (1 to 64), the reader's cap on distinct cancels (`0x80`: the
/// real one), then `ops`.
fn outbox_input(pieces: u8, cap: u8, ops: &[Op]) -> Vec<u8> {
    let mut v = vec![pieces - 1, cap];
    for op in ops {
        op.encode(&mut v);
    }
    v
}

/// Runs an `outbox` input on the fuzz thread (any broken promise panics there), then again
/// here for what it went through.
fn run_outbox(data: &[u8]) -> OutboxTally {
    assert_eq!(run(fuzz::outbox, data), None);
    fuzz::run_outbox(data)
}

#[test]
fn outbox_ops_decode_as_encoded() {
    let ops = [
        Op::Choke(true),
        Op::Interested(false),
        Op::Have(7),
        Op::Request {
            first: 3,
            count: 200,
        },
        Op::Cancel(9),
        Op::Intro(2),
        Op::Shutdown,
        Op::Serve {
            first: 1,
            count: 64,
        },
        Op::CancelServe(4),
        Op::ReaderEnds,
        Op::Take,
        Op::TakeIntro,
        Op::Rung,
        Op::Wait,
        Op::Upload(5),
    ];
    assert_eq!(ops.len(), usize::from(Op::COUNT));
    let bytes = outbox_input(1, 0, &ops);
    let mut rest = bytes[2..].iter().copied();
    let decoded: Vec<Op> = std::iter::from_fn(|| Op::decode(&mut rest)).collect();
    assert_eq!(decoded, ops);
}

#[test]
fn outbox_flips_and_cancels_of_unsent_requests_run_clean() {
    let mut ops = Vec::new();
    for i in 0..1000 {
        ops.extend([Op::Choke(i % 2 == 0), Op::Interested(i % 3 == 0)]);
    }
    ops.extend([
        Op::Rung,
        Op::Request {
            first: 0,
            count: 16,
        },
        Op::Cancel(5),
        Op::Take,
        Op::Cancel(6),
        Op::Request { first: 6, count: 1 },
        Op::Cancel(6),
        Op::Take,
    ]);
    let t = run_outbox(&outbox_input(8, 0x80, &ops));
    assert_eq!(t.ops, ops.len());
    assert_eq!(t.takes, 2);
    assert!(!t.backlog && !t.cancel_overflow && !t.request_flood);
}

#[test]
fn outbox_caps_end_the_connection_or_the_reader() {
    // Our requests past MAX_PENDING_BLOCKS with no take between: a backlog.
    let flood = [Op::Request {
        first: 0,
        count: 255,
    }; 17];
    assert!(run_outbox(&outbox_input(64, 0x80, &flood)).backlog);
    // More haves than pieces.
    let haves = [Op::Have(0), Op::Have(1), Op::Have(0)];
    assert!(run_outbox(&outbox_input(2, 0x80, &haves)).backlog);
    // The peer's third distinct cancel, at a cap of two.
    let ops = [
        Op::Serve { first: 0, count: 4 },
        Op::CancelServe(0),
        Op::CancelServe(1),
        Op::CancelServe(0),
        Op::CancelServe(2),
    ];
    let t = run_outbox(&outbox_input(2, 2, &ops));
    assert!(t.cancel_overflow && !t.backlog);
    // More of the peer's requests at once than the reader lets through.
    let ops = [Op::Serve {
        first: 0,
        count: 255,
    }; 10];
    assert!(run_outbox(&outbox_input(2, 0x80, &ops)).request_flood);
}

#[test]
fn outbox_writer_uploads_what_the_peer_did_not_cancel_and_stops_on_shutdown() {
    let ops = [
        Op::Intro(1),
        Op::TakeIntro,
        Op::Serve { first: 0, count: 6 },
        Op::CancelServe(1),
        Op::Serve { first: 1, count: 1 },
        Op::Take,
        Op::Upload(255),
        Op::Shutdown,
        Op::Take,
        Op::Choke(true),
    ];
    let t = run_outbox(&outbox_input(4, 0x80, &ops));
    // Six asked, one cancelled, then asked again.
    assert_eq!(t.uploaded, 6);
    assert!(t.writer_stopped);
}

/// The seeds reach every path the target checks, so a fuzz run starts from all of them.
#[test]
fn outbox_seeds_reach_every_path() {
    let mut all = OutboxTally::default();
    for file in inputs(&fuzz_dir().join("corpus/outbox")) {
        let t = fuzz::run_outbox(&fs::read(&file).expect("reading a seed"));
        all.takes += t.takes;
        all.uploaded += t.uploaded;
        all.backlog |= t.backlog;
        all.cancel_overflow |= t.cancel_overflow;
        all.request_flood |= t.request_flood;
        all.writer_stopped |= t.writer_stopped;
    }
    assert!(all.takes > 0 && all.uploaded > 0, "{all:?}");
    assert!(
        all.backlog && all.cancel_overflow && all.request_flood && all.writer_stopped,
        "{all:?}"
    );
}

/// BEP 52 hash messages on the v2 replay (whose file's root is all zeros): floods of valid
/// and invalid requests, answers from piece data past their budget, `hashes` of every wrong
/// count, frames of the wrong size.
#[test]
fn hash_message_floods_and_malformed_ones() {
    let request = |id: u8, base: u32, index: u32, length: u32, proof: u32, hashes: usize| {
        let mut p = vec![0u8; 32];
        for v in [base, index, length, proof] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        p.extend(std::iter::repeat_n(5u8, 32 * hashes));
        frame(id, &p)
    };
    let cases = [
        request(21, 1, 0, 2, 1, 0).repeat(5000),
        request(21, 0, 0, 2, 2, 0).repeat(100),
        request(21, 1, u32::MAX - 1, 2, u32::MAX, 0).repeat(100),
        [request(21, 1, 0, 4, 0, 0), request(21, 1, 0, 2, 0, 0)]
            .concat()
            .repeat(70),
        request(23, 1, 0, 2, 1, 0).repeat(4097),
        request(22, 1, 0, 2, 1, 3),
        request(22, 1, 0, 2, 1, 2),
        request(22, 1, 0, 2, 1, 4),
        request(22, 0, 0, 2, 0, 8192 + 64),
        frame(21, &[0; 47]),
        frame(23, &[0; 49]),
        frame(22, &[0; 48]),
        frame(22, &[0; 48 + 31]),
    ];
    for frames in cases {
        for pieces in [1, 3, 2000, 0xff_ffff] {
            assert_eq!(run(fuzz::wire, &wire_input(pieces, &frames)), None);
        }
    }
}
