//! End-to-end downloads over the peer wire, bitfetch against bitfetch and against peers
//! written here, all on loopback and without a tracker (`--peer`):
//!
//! - single-file torrents at the sizes where piece and block arithmetic goes wrong (1 byte,
//!   exactly one piece, a last piece of one byte, many pieces, a size not a multiple of 16 KiB)
//!   and a multi-file tree with empty files, nested directories and files across piece
//!   boundaries, each checked byte for byte;
//! - two seeders, both of which must serve;
//! - a seeder that drops its connection half-way through a piece, and one that sends a
//!   corrupt block, each beside a good bitfetch seeder;
//! - a downloader killed with SIGKILL and restarted, which must resume from verified data.
//!
//! Every process is owned by a `ChildGuard` (killed by PID on drop); every client has its own
//! 127.0.0.x address; every wait polls a condition, with deadlines that are hang guards only.
//! Where a test needs a transfer to last long enough for something to happen in the middle,
//! it slows the downloader with `--max-download-rate`: a slower machine only makes that wider.

mod support;

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::cli::{
    ChildGuard, assert_exit_code, bitfetch, download_args, events, field as field_u64,
    json_listening, of_kind, progress, run_ok, spawn_bitfetch,
};
use support::fake_peer::{FakeReport, Misbehaviour, Relay, SeedSpec};
use support::files::{files_equal, files_under, scratch_dir, write_payload};
use support::net::next_loopback;
use support::torrent::PieceMap;
use support::{DEADLINE, Diagnose, poll_until, report};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Blocks are 16 KiB on the wire.
const BLOCK: u64 = 16 * KIB;
/// bitfetch's own give-up time, shorter than the test's hang guard so that a stuck download
/// ends with bitfetch's diagnostics rather than the guard's.
const BITFETCH_TIMEOUT: &str = "100s";

// =============================================================================================
// Fixtures
// =============================================================================================

/// Content on disk and a torrent made from it by `bitfetch create`.
struct Fixture {
    dir: TempDir,
    /// The torrent's name: the file, or the top directory of a multi-file torrent.
    name: String,
    torrent: PathBuf,
    /// (path relative to the torrent's root, size) for each file; `""` for a single file.
    files: Vec<(String, u64)>,
}

impl Fixture {
    /// A single file of `size` pseudo-random bytes, cut into pieces of `piece_len`.
    fn single(name: &str, size: u64, piece_len: u64) -> Fixture {
        let dir = scratch_dir();
        write_payload(&dir.path().join("source").join(name), size, size ^ 0x5eed);
        Fixture::finish(dir, name, piece_len, vec![(String::new(), size)])
    }

    /// A directory `name` holding `files` (relative paths and sizes).
    fn tree(name: &str, files: &[(&str, u64)], piece_len: u64) -> Fixture {
        let dir = scratch_dir();
        let root = dir.path().join("source").join(name);
        for (i, (rel, size)) in files.iter().enumerate() {
            write_payload(&root.join(rel), *size, 7 + i as u64);
        }
        let files = files.iter().map(|(p, n)| (p.to_string(), *n)).collect();
        Fixture::finish(dir, name, piece_len, files)
    }

    fn finish(dir: TempDir, name: &str, piece_len: u64, files: Vec<(String, u64)>) -> Fixture {
        let torrent = dir.path().join(format!("{name}.torrent"));
        run_ok(
            "bitfetch create",
            Command::new(bitfetch())
                .arg("create")
                .arg(dir.path().join("source").join(name))
                .arg("--piece-length")
                .arg(piece_len.to_string())
                .arg("-o")
                .arg(&torrent),
        );
        Fixture {
            dir,
            name: name.to_owned(),
            torrent,
            files,
        }
    }

    /// The directory that holds the content as `NAME` (what `seed` takes).
    fn source_dir(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    fn size(&self) -> u64 {
        self.files.iter().map(|(_, n)| n).sum()
    }

    fn source_bytes(&self) -> Vec<u8> {
        let path = self.source_dir().join(&self.name);
        fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// A fresh output directory.
    fn out_dir(&self, label: &str) -> PathBuf {
        let out = self.dir.path().join(label);
        fs::create_dir_all(&out).expect("create the output directory");
        out
    }

    /// Where a file of the torrent lives, relative to the directory holding the content.
    fn relative(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            PathBuf::from(&self.name)
        } else {
            Path::new(&self.name).join(rel)
        }
    }

    /// Panics with everyone's diagnostics unless `out` (a download's `-o`) holds exactly the
    /// original content: every file byte for byte, empty ones included, and nothing else.
    fn assert_downloaded(&self, out: &Path, parts: &[&dyn Diagnose]) {
        let fail = |why: String| -> ! { panic!("{}", report(&why, parts)) };
        for (rel, size) in &self.files {
            let expected = self.source_dir().join(self.relative(rel));
            let actual = out.join(self.relative(rel));
            match fs::metadata(&actual) {
                Ok(m) if m.is_file() && m.len() == *size => {}
                Ok(m) => fail(format!(
                    "{} is {} bytes (a file: {}), expected a file of {size} bytes",
                    actual.display(),
                    m.len(),
                    m.is_file()
                )),
                Err(e) => fail(format!("{} is missing: {e}", actual.display())),
            }
            if let Err(difference) = files_equal(&expected, &actual) {
                fail(difference);
            }
        }
        let mut expected: Vec<PathBuf> = self.files.iter().map(|(r, _)| self.relative(r)).collect();
        expected.sort();
        let found = files_under(out);
        if found != expected {
            fail(format!(
                "{} holds files {found:?}, expected exactly {expected:?}",
                out.display()
            ));
        }
    }
}

// =============================================================================================
// bitfetch processes
// =============================================================================================

/// `bitfetch seed --json` of `fixture` on `ip`, any port, waiting until it listens.
///
/// The address is read from the `listening` event rather than from the stderr line: stderr is
/// unbuffered, so that line can be seen half-written, while a JSON event is one write.
fn start_seeder(fixture: &Fixture, ip: Ipv4Addr) -> (ChildGuard, SocketAddr) {
    let seeder = spawn_bitfetch(
        "bitfetch seed",
        [
            "seed".to_owned(),
            fixture.torrent.display().to_string(),
            fixture.source_dir().display().to_string(),
            "--bind".into(),
            ip.to_string(),
            "--port".into(),
            "0".into(),
            "--json".into(),
        ],
    );
    let addr = json_listening(&seeder);
    let fail = |why: &str| -> ! { panic!("{}", report(why, &[&seeder])) };
    if addr.ip() != std::net::IpAddr::V4(ip) {
        fail(&format!(
            "bitfetch seed listens on {addr}, not on --bind {ip}"
        ));
    }
    (seeder, addr)
}

/// `bitfetch download --json --no-seed` of `fixture` into `out`, bound to `ip`, dialling
/// `peers`, with `extra` options.
fn start_download(
    fixture: &Fixture,
    out: &Path,
    ip: Ipv4Addr,
    peers: &[SocketAddr],
    extra: &[&str],
) -> ChildGuard {
    let mut args = download_args(&fixture.torrent, out, ip, peers);
    args.extend(["--no-seed", "--json", "--timeout", BITFETCH_TIMEOUT].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_bitfetch("bitfetch download", args)
}

/// Waits for the download to exit, asserts exit code 0, and returns its events after checking
/// the `start` and `finished` ones against `fixture` (and `pieces`, when given).
fn finish_download(
    download: &ChildGuard,
    fixture: &Fixture,
    pieces: Option<u64>,
    parts: &[&dyn Diagnose],
) -> Vec<Value> {
    let mut all: Vec<&dyn Diagnose> = vec![download];
    all.extend_from_slice(parts);
    download.wait_with_deadline(DEADLINE, &|| report("", parts));
    assert_exit_code(download, 0, parts);
    let events = events(download);
    let fail = |why: &str| -> ! { panic!("{}", report(why, &all)) };
    let Some(start) = events.first().filter(|e| e["event"] == "start") else {
        fail("the first --json event is not `start`");
    };
    if field_u64(start, "size") != fixture.size() {
        fail(&format!("`start` says size {}", start["size"]));
    }
    if let Some(pieces) = pieces
        && field_u64(start, "pieces") != pieces
    {
        fail(&format!(
            "`start` says {} pieces, expected {pieces}",
            start["pieces"]
        ));
    }
    let facts = PieceMap::read(&fixture.torrent);
    if start["info_hash"] != facts.info_hash_hex().as_str() {
        fail(&format!(
            "`start` says info hash {}, the torrent's is {}",
            start["info_hash"],
            facts.info_hash_hex()
        ));
    }
    if of_kind(&events, "finished").count() != 1 {
        fail("a successful download did not emit exactly one `finished` event");
    }
    if of_kind(&events, "error").next().is_some() {
        fail("a successful download emitted an `error` event");
    }
    events
}

/// One bitfetch seeder, one bitfetch downloader, byte-for-byte result.
fn seed_and_download(fixture: &Fixture, pieces: u64) {
    let (seeder, addr) = start_seeder(fixture, next_loopback());
    let out = fixture.out_dir("out");
    let download = start_download(fixture, &out, next_loopback(), &[addr], &[]);
    let events = finish_download(&download, fixture, Some(pieces), &[&seeder]);
    fixture.assert_downloaded(&out, &[&download, &seeder]);
    let finished = of_kind(&events, "finished")
        .next()
        .expect("a `finished` event");
    assert_eq!(
        field_u64(finished, "transferred"),
        fixture.size(),
        "a fresh download from one seeder should receive each byte once\n{}",
        download.diagnostics()
    );
    // The seeder is unaffected by a peer coming and going.
    assert!(
        seeder.is_running(),
        "{}",
        report("the seeder exited on its own", &[&seeder])
    );
}

// =============================================================================================
// One seeder, one downloader: sizes and layouts
// =============================================================================================

/// One test per case: `name: (file, size, piece length, expected pieces)`.
macro_rules! single_file_cases {
    ($($(#[doc = $doc:literal])* $name:ident: ($file:literal, $size:expr, $piece:expr, $pieces:expr);)*) => {
        $(
            $(#[doc = $doc])*
            #[test]
            fn $name() {
                seed_and_download(&Fixture::single($file, $size, $piece), $pieces);
            }
        )*
    };
}

single_file_cases! {
    single_file_of_one_byte: ("one-byte.bin", 1, 16 * KIB, 1);
    single_file_of_exactly_one_piece: ("one-piece.bin", 32 * KIB, 32 * KIB, 1);
    single_file_whose_last_piece_is_one_byte: ("last-byte.bin", 5 * 32 * KIB + 1, 32 * KIB, 6);
    /// 6 MiB in 16 KiB pieces: 384 pieces of one block each.
    single_file_of_many_pieces: ("many.bin", 6 * MIB, 16 * KIB, 384);
    /// Three 64 KiB pieces, then a last piece of two whole blocks and a short one.
    single_file_not_a_multiple_of_a_block: ("odd.bin", 3 * 64 * KIB + 2 * BLOCK + 5_000, 64 * KIB, 4);
}

#[test]
fn multi_file_tree_with_empty_files_and_nested_directories() {
    // Sorted as bitfetch create stores them. With 16 KiB pieces: an empty file first, a file
    // inside piece 0, one across pieces 0-2, empty files between and last, a one-byte file,
    // and one that spans several pieces and ends mid-piece.
    let files: &[(&str, u64)] = &[
        ("a-empty", 0),
        ("b.bin", 10_000),
        ("c/d/e.bin", 30_000),
        ("c/d/f-empty", 0),
        ("c/g.txt", 1),
        ("h/i/j/k.bin", 70_001),
        ("z-empty", 0),
    ];
    let fixture = Fixture::tree("tree", files, 16 * KIB);
    // 110_002 bytes in 16 KiB pieces.
    seed_and_download(&fixture, 7);
}

// =============================================================================================
// Two seeders
// =============================================================================================

/// Both seeders are reached through counting relays, so what each one sent is measured on the
/// wire; the download is slowed so that both have time to be asked.
#[test]
fn two_seeders_both_serve() {
    let fixture = Fixture::single("two.bin", 6 * MIB + 12_345, 64 * KIB);
    let (seeder_a, addr_a) = start_seeder(&fixture, next_loopback());
    let (seeder_b, addr_b) = start_seeder(&fixture, next_loopback());
    let relay_a = Relay::start(next_loopback(), addr_a);
    let relay_b = Relay::start(next_loopback(), addr_b);
    let out = fixture.out_dir("out");
    let download = start_download(
        &fixture,
        &out,
        next_loopback(),
        &[relay_a.addr(), relay_b.addr()],
        &["--max-download-rate", "2M"],
    );
    finish_download(&download, &fixture, None, &[&seeder_a, &seeder_b]);
    fixture.assert_downloaded(&out, &[&download, &seeder_a, &seeder_b]);

    let sent = [relay_a.bytes_from_target(), relay_b.bytes_from_target()];
    let parts: [&dyn Diagnose; 3] = [&download, &seeder_a, &seeder_b];
    for (label, bytes) in ["A", "B"].iter().zip(sent) {
        assert!(
            bytes >= 4 * BLOCK,
            "{}",
            report(
                &format!(
                    "seeder {label} sent only {bytes} bytes (A: {}, B: {}): both should serve",
                    sent[0], sent[1]
                ),
                &parts
            )
        );
    }
    assert!(
        sent[0] + sent[1] >= fixture.size(),
        "{}",
        report(
            &format!(
                "the seeders sent {} bytes in all, less than the {} downloaded",
                sent[0] + sent[1],
                fixture.size()
            ),
            &parts
        )
    );
    drop(download);
    relay_a.finish();
    relay_b.finish();
}

// =============================================================================================
// Misbehaving seeders beside a good one
// =============================================================================================

/// A download (slowed, so the fake gets its chance) from a good bitfetch seeder and a fake
/// one that misbehaves `how`: it must complete, byte for byte. Returns its events and what the
/// fake did.
fn download_beside_fake(name: &str, size: u64, how: Misbehaviour) -> (Vec<Value>, FakeReport) {
    let fixture = Fixture::single(name, size, 64 * KIB);
    let (seeder, addr) = start_seeder(&fixture, next_loopback());
    let facts = PieceMap::read(&fixture.torrent);
    // It checks the info hash it is asked for.
    let fake = SeedSpec::new(fixture.source_bytes(), facts.piece_len)
        .info_hash(facts.info_hash)
        .misbehave(how)
        .start(next_loopback());
    let out = fixture.out_dir("out");
    let download = start_download(
        &fixture,
        &out,
        next_loopback(),
        &[fake.addr(), addr],
        &["--max-download-rate", "2M"],
    );
    let events = finish_download(&download, &fixture, None, &[&seeder]);
    fixture.assert_downloaded(&out, &[&download, &seeder]);
    drop(download);
    (events, fake.finish())
}

/// A fake seeder that answers a few requests, then cuts its connection half-way through a
/// block of a piece it has partly sent. The download must finish from the good seeder, and
/// the half block must not end up in the file.
#[test]
fn seeder_dropping_mid_piece_is_survived() {
    let (events, fake) = download_beside_fake(
        "drop.bin",
        4 * MIB + 4_321,
        Misbehaviour::DropMidPiece { after_blocks: 3 },
    );
    assert!(
        fake.dropped_in_piece.is_some() && fake.good_blocks >= 3,
        "the fake seeder never got to drop a connection mid-piece: {fake:?}"
    );
    let failed: Vec<&Value> = of_kind(&events, "hash_failed").collect();
    assert!(
        failed.is_empty(),
        "only good data was sent, yet pieces failed their hash: {failed:?}"
    );
}

/// A fake seeder that sends one corrupt block. The piece holding it must fail its hash, be
/// reported as a `hash_failed` event, and be fetched again; the output must be correct.
#[test]
fn corrupt_block_is_detected_reported_and_refetched() {
    let (events, fake) = download_beside_fake(
        "corrupt.bin",
        4 * MIB + 999,
        Misbehaviour::CorruptFirstBlock,
    );
    let Some((piece, _)) = fake.corrupted else {
        panic!("the fake seeder was never asked for a block: {fake:?}");
    };
    let failed: Vec<&Value> = of_kind(&events, "hash_failed").collect();
    assert_eq!(
        failed.len(),
        1,
        "one corrupt block was sent (in piece {piece}): expected exactly one `hash_failed` \
         event, got {failed:?}"
    );
    let message = failed[0]["message"].as_str().unwrap_or_default();
    assert!(
        message
            .split(|c: char| !c.is_ascii_digit())
            .any(|n| n == piece.to_string()),
        "the `hash_failed` message should name piece {piece}: {message:?}"
    );
}

// =============================================================================================
// Resume after SIGKILL
// =============================================================================================

/// A slowed download is killed with SIGKILL once it has verified some data; a second run on
/// the same directory must start from what is verified there and fetch only the rest.
#[test]
fn killed_download_resumes_from_verified_data() {
    let fixture = Fixture::single("resume.bin", 4 * MIB + 77, 64 * KIB);
    let total = fixture.size();
    let (seeder, addr) = start_seeder(&fixture, next_loopback());
    let out = fixture.out_dir("out");
    let ip = next_loopback();

    let first = start_download(&fixture, &out, ip, &[addr], &["--max-download-rate", "1M"]);
    let progress = |guard: &ChildGuard| progress(&events(guard));
    let verified = poll_until(DEADLINE, || {
        if !first.is_running() {
            return Some(None);
        }
        progress(&first).into_iter().find(|&n| n >= MIB).map(Some)
    })
    .unwrap_or_else(|| {
        panic!(
            "{}",
            report(
                "the first run never reported 1 MiB verified",
                &[&first, &seeder]
            )
        )
    })
    .unwrap_or_else(|| {
        panic!(
            "{}",
            report(
                "the first run exited before it could be killed mid-way \
                 (is --max-download-rate honoured?)",
                &[&first, &seeder]
            )
        )
    });
    first.signal(libc::SIGKILL);
    let status = first.wait_with_deadline(DEADLINE, &String::new);
    let first_events = events(&first);
    assert!(
        of_kind(&first_events, "finished").next().is_none() && verified < total,
        "{}",
        report(
            &format!("the first run completed ({verified} of {total} bytes) before the kill"),
            &[&first]
        )
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{}",
        report("the first run was not ended by SIGKILL", &[&first])
    );

    let second = start_download(&fixture, &out, ip, &[addr], &[]);
    let events = finish_download(&second, &fixture, None, &[&seeder, &first]);
    fixture.assert_downloaded(&out, &[&second, &first, &seeder]);
    let fetched = field_u64(
        of_kind(&events, "finished")
            .next()
            .expect("a `finished` event"),
        "transferred",
    );
    assert!(
        fetched <= total - verified,
        "{}",
        report(
            &format!(
                "the restarted run downloaded {fetched} bytes, but {verified} of {total} were \
                 already verified: it should fetch at most {}",
                total - verified
            ),
            &[&second, &first]
        )
    );
    for p in progress(&second) {
        assert!(
            p >= verified,
            "the restarted run reported {p} bytes verified, less than the {verified} it \
             started with\n{}",
            second.diagnostics()
        );
    }
}
