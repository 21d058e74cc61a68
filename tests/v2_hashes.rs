//! BEP 52 hash messages against the real binary: a bitfetch seeder of a v2-only torrent made
//! by libtorrent 2.0 (the reference), and a raw peer that asks it for hashes. Correct requests
//! get `hashes` that this file checks against its own merkle trees of the data (built here
//! with SHA-256 directly, not with bitfetch's code); hostile ones get `hash reject`s echoing
//! them, and floods and malformed messages end the connection (and ban the address), never
//! the seeder.

mod support;

use std::ffi::OsString;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::cli::*;
use support::clients::{SYSTEM_PYTHON, require_libtorrent};
use support::files::{pseudo_random, scratch_dir};
use support::net::next_loopback;
use support::wire::*;
use support::*;

const LIBTORRENT_CREATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/libtorrent_create.py"
);
const PIECE_LEN: u32 = 32 * 1024;
const LEAF: usize = 16 * 1024;
/// How long an answer may take (hang guard).
const ANSWER: Duration = Duration::from_secs(30);

const HASH_REQUEST: u8 = 21;
const HASHES: u8 = 22;
const HASH_REJECT: u8 = 23;
/// BEP 52: the v2 bit of the reserved bytes, with Fast and the extension protocol.
const RESERVED_V2: [u8; 8] = [0, 0, 0, 0, 0, 0x10, 0, 0x14];

type Hash = [u8; 32];

/// A file's whole tree, every layer padded to the power of two (0 = the leaves).
struct Tree(Vec<Vec<Hash>>);

impl Tree {
    fn of(data: &[u8]) -> Tree {
        let mut leaves: Vec<Hash> = data
            .chunks(LEAF)
            .map(|c| Sha256::digest(c).into())
            .collect();
        leaves.resize(leaves.len().next_power_of_two(), [0; 32]);
        let mut layers = vec![leaves];
        while layers.last().unwrap().len() > 1 {
            let up = layers
                .last()
                .unwrap()
                .chunks(2)
                .map(|p| pair(&p[0], &p[1]))
                .collect();
            layers.push(up);
        }
        Tree(layers)
    }

    fn root(&self) -> Hash {
        self.0.last().unwrap()[0]
    }

    fn height(&self) -> u32 {
        self.0.len() as u32 - 1
    }

    /// The answer BEP 52 defines: the base range, then the uncle of each layer from
    /// base + log2(length) to base + proof layers, bottom up.
    fn answer(&self, r: &Req) -> Vec<Hash> {
        let mut out =
            self.0[r.base as usize][r.index as usize..(r.index + r.length) as usize].to_vec();
        for h in r.base + r.length.trailing_zeros()..=r.base + r.proof {
            out.push(self.0[h as usize][((r.index >> (h - r.base)) ^ 1) as usize]);
        }
        out
    }
}

fn pair(a: &Hash, b: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(a);
    h.update(b);
    h.finalize().into()
}

/// Folds `hashes` (an answer to `r`) up as far as its uncles reach: the node there.
fn fold(r: &Req, hashes: &[Hash]) -> (u32, Hash) {
    let (base, uncles) = hashes.split_at(r.length as usize);
    let mut layer = base.to_vec();
    while layer.len() > 1 {
        layer = layer.chunks(2).map(|p| pair(&p[0], &p[1])).collect();
    }
    let mut node = layer[0];
    let mut height = r.base + r.length.trailing_zeros();
    let mut index = r.index >> r.length.trailing_zeros();
    for u in uncles {
        node = if index.is_multiple_of(2) {
            pair(&node, u)
        } else {
            pair(u, &node)
        };
        height += 1;
        index /= 2;
    }
    (height, node)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Req {
    root: Hash,
    base: u32,
    index: u32,
    length: u32,
    proof: u32,
}

impl Req {
    fn payload(&self) -> Vec<u8> {
        let mut p = self.root.to_vec();
        p.extend(be(&[self.base, self.index, self.length, self.proof]));
        p
    }

    fn frame(&self) -> Vec<u8> {
        frame(HASH_REQUEST, &self.payload())
    }
}

/// The torrent's files, in tree order. The last one ends inside a block: libtorrent pads a v2
/// torrent's last file to a whole piece too, and asks for that block in full.
const SMALL: &str = "a-small.bin";
const BIG: &str = "b-big.bin";
const BIG_LEN: usize = 11 * PIECE_LEN as usize + 1000;

/// A v2-only torrent of two files made by libtorrent, its data and the files' trees.
struct V2Torrent {
    dir: tempfile::TempDir,
    swarm: [u8; 20],
    /// 11 pieces and a bit: a tree of 32 leaves (23 of data), the piece layer one above.
    big: Tree,
    /// Under a piece: two leaves.
    small: Tree,
}

impl V2Torrent {
    fn new() -> V2Torrent {
        require_libtorrent();
        let dir = scratch_dir();
        let content = dir.path().join("content");
        fs::create_dir(&content).unwrap();
        let big = pseudo_random(BIG_LEN, 52);
        let small = pseudo_random(20_000, 53);
        fs::write(content.join(BIG), &big).unwrap();
        fs::write(content.join(SMALL), &small).unwrap();
        let torrent = dir.path().join("t.torrent");
        let args: Vec<OsString> = vec![
            "make".into(),
            "--dir".into(),
            content.clone().into(),
            "--piece-length".into(),
            PIECE_LEN.to_string().into(),
            "--mode".into(),
            "v2".into(),
            "--out".into(),
            torrent.clone().into(),
        ];
        let mut command = Command::new(SYSTEM_PYTHON);
        command
            .arg("-u")
            .arg(LIBTORRENT_CREATE)
            .args(&args)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let run = run_guarded(command, "libtorrent_create.py make".into(), HANG_GUARD);
        run.assert_success();
        let hashes: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        let v2 = hex_to_bytes(hashes["v2"].as_str().expect("a v2 info hash"));
        V2Torrent {
            dir,
            swarm: v2[..20].try_into().unwrap(),
            big: Tree::of(&big),
            small: Tree::of(&small),
        }
    }

    fn torrent(&self) -> std::path::PathBuf {
        self.dir.path().join("t.torrent")
    }

    fn seed(&self) -> (ChildGuard, SocketAddr) {
        start_seeder(
            "v2-seeder",
            &self.torrent(),
            self.dir.path(),
            next_loopback(),
            &[],
        )
    }

    /// A raw peer on the v2 swarm, past both handshakes.
    fn dial(&self, from: Ipv4Addr, to: SocketAddr) -> Wire {
        self.dial_as(from, to, peer_id("v2h"))
    }

    fn dial_as(&self, from: Ipv4Addr, to: SocketAddr, id: [u8; 20]) -> Wire {
        let mut w = Wire::dial(from, to).expect("dialling the seeder");
        w.send(&handshake(&self.swarm, &id, RESERVED_V2)).unwrap();
        let (reserved, hash, _) = w.handshake_parts(ANSWER).expect("the seeder's handshake");
        assert_eq!(hash, self.swarm, "answered in the v2 swarm");
        assert_ne!(reserved[7] & 0x10, 0, "the seeder sets the v2 bit");
        w
    }
}

/// The next hash message (id, its request fields, the hashes), past anything else.
fn next_hash_message(w: &mut Wire) -> Result<(u8, Req, Vec<Hash>), String> {
    let deadline = Instant::now() + ANSWER;
    loop {
        let Some((id, payload)) = w.next_message(deadline)? else {
            return Err("no hash message in time".into());
        };
        if !(HASH_REQUEST..=HASH_REJECT).contains(&id) {
            continue;
        }
        assert!(
            payload.len() >= 48,
            "a hash message of {} bytes",
            payload.len()
        );
        let req = Req {
            root: payload[..32].try_into().unwrap(),
            base: be32(&payload, 32),
            index: be32(&payload, 36),
            length: be32(&payload, 40),
            proof: be32(&payload, 44),
        };
        let rest = &payload[48..];
        assert_eq!(rest.len() % 32, 0);
        let hashes = rest.chunks(32).map(|c| c.try_into().unwrap()).collect();
        return Ok((id, req, hashes));
    }
}

/// Waits until the seeder closes `w` (a hang guard of a minute).
fn closed(w: &mut Wire) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match w.next_body(deadline) {
            Err(_) => return true,
            Ok(None) => return false,
            Ok(Some(_)) => {}
        }
    }
}

#[test]
fn correct_hash_requests_get_hashes_that_prove_out_to_the_roots() {
    let t = V2Torrent::new();
    let (seeder, addr) = t.seed();
    let mut w = t.dial(next_loopback(), addr);
    let (big, small) = (t.big.root(), t.small.root());
    assert_eq!((t.big.height(), t.small.height()), (5, 1));
    let requests = [
        // The whole piece layer (12 pieces, padded to 16), which proves out alone.
        Req {
            root: big,
            base: 1,
            index: 0,
            length: 16,
            proof: 3,
        },
        // Two pieces with every uncle up to the root, as libtorrent asks near a file's end.
        Req {
            root: big,
            base: 1,
            index: 10,
            length: 2,
            proof: 3,
        },
        // Two pieces past the end of the file: the roots of empty subtrees.
        Req {
            root: big,
            base: 1,
            index: 14,
            length: 2,
            proof: 3,
        },
        // One piece's leaves with all their uncles (from the seeder's data).
        Req {
            root: big,
            base: 0,
            index: 6,
            length: 2,
            proof: 4,
        },
        // The last piece's: one leaf of data, one past the file's end.
        Req {
            root: big,
            base: 0,
            index: 22,
            length: 2,
            proof: 4,
        },
        // A file of one piece: its two leaves make its root.
        Req {
            root: small,
            base: 0,
            index: 0,
            length: 2,
            proof: 0,
        },
    ];
    for r in requests {
        w.send(&r.frame()).unwrap();
        let (id, echoed, hashes) =
            next_hash_message(&mut w).unwrap_or_else(|e| seeder.fail(&format!("{r:?}: {e}"), &[]));
        assert_eq!((id, echoed), (HASHES, r), "{r:?}");
        let tree = if r.root == big { &t.big } else { &t.small };
        assert_eq!(hashes, tree.answer(&r), "{r:?}");
        assert_eq!(
            fold(&r, &hashes),
            (tree.height(), r.root),
            "{r:?} proves out"
        );
    }
    assert!(seeder.is_running());
}

#[test]
fn hostile_hash_requests_get_rejects_and_floods_end_in_a_ban_never_a_crash() {
    let t = V2Torrent::new();
    let (seeder, addr) = t.seed();
    let (attacker, attacker_id) = (next_loopback(), peer_id("evil"));
    let mut w = t.dial_as(attacker, addr, attacker_id);
    let big = t.big.root();
    let at = |base, index, length, proof| Req {
        root: big,
        base,
        index,
        length,
        proof,
    };
    let hostile = [
        Req {
            root: [0xee; 32],
            ..at(1, 0, 2, 0)
        }, // no such file
        at(1, 16, 2, 0),           // past the (padded) piece layer
        at(1, u32::MAX - 1, 2, 0), // and far past it
        at(1, 0, 0, 0),            // no hashes
        at(1, 0, 1, 0),            // fewer than two
        at(1, 0, 3, 0),            // not a power of two
        at(1, 0, u32::MAX, 0),
        at(1, 1, 2, 0), // not a multiple of the length
        at(1, 0, 2, 4), // proof layers through the root
        at(1, 0, 2, u32::MAX),
        at(5, 0, 2, 0),        // the root's layer
        at(u32::MAX, 0, 2, 0), // no such layer
        at(2, 0, 2, 0),        // above the piece layer
        at(0, 0, 8, 0),        // leaves of more than one piece
        at(0, 24, 2, 0),       // leaves past the last piece
        Req {
            root: t.small.root(),
            ..at(0, 0, 4, 0)
        }, // past a small file's two leaves
    ];
    for r in hostile {
        w.send(&r.frame()).unwrap();
        let (id, echoed, hashes) =
            next_hash_message(&mut w).unwrap_or_else(|e| seeder.fail(&format!("{r:?}: {e}"), &[]));
        assert_eq!((id, echoed, hashes.len()), (HASH_REJECT, r, 0), "{r:?}");
    }
    // Still served after all that.
    let good = at(1, 0, 16, 3);
    w.send(&good.frame()).unwrap();
    let (id, _, hashes) = next_hash_message(&mut w).unwrap();
    assert_eq!((id, hashes), (HASHES, t.big.answer(&good)));

    // A `hashes` whose count does not match its fields ends the connection.
    let mut bad = good.payload();
    bad.extend([7u8; 32 * 15]);
    let from = next_loopback();
    let mut m = t.dial(from, addr);
    m.send(&frame(HASHES, &bad)).unwrap();
    assert!(closed(&mut m), "a malformed hashes message is a violation");
    let line = wait_for_stderr(&seeder, &format!("banned peer {from}:"), ANSWER);
    assert!(line.contains("malformed hashes message"), "{line}");

    // A flood of hash messages (rejects, which cost us nothing to read) ends it too.
    let reject = frame(HASH_REJECT, &good.payload());
    let flood = reject.repeat(5000);
    let _ = w.send(&flood);
    assert!(
        closed(&mut w),
        "a flood of hash messages ends the connection"
    );
    // The attacker is banned: coming back from its address with its id, it is dropped.
    let line = wait_for_stderr(&seeder, &format!("banned peer {attacker}:"), ANSWER);
    assert!(line.contains("flooded us with hash messages"), "{line}");
    let mut again = t.dial_as(attacker, addr, attacker_id);
    assert!(closed(&mut again), "the banned peer came back and was kept");
    // An honest peer is still served.
    let mut honest = t.dial(next_loopback(), addr);
    honest.send(&good.frame()).unwrap();
    let (id, _, hashes) = next_hash_message(&mut honest).unwrap();
    assert_eq!((id, hashes), (HASHES, t.big.answer(&good)));
    assert!(seeder.is_running(), "{}", seeder.stderr_text());
}

#[test]
fn hash_requests_on_a_v1_torrent_are_a_violation() {
    // The same data as a v1-only torrent (libtorrent's): no file has a tree to ask about.
    let t = V2Torrent::new();
    let v1 = t.dir.path().join("v1.torrent");
    let mut command = Command::new(SYSTEM_PYTHON);
    command.arg("-u").arg(LIBTORRENT_CREATE).args([
        "make".as_ref(),
        "--dir".as_ref(),
        t.dir.path().join("content").as_os_str(),
        "--piece-length".as_ref(),
        PIECE_LEN.to_string().as_ref(),
        "--mode".as_ref(),
        "v1".as_ref(),
        "--out".as_ref(),
        v1.as_os_str(),
    ]);
    let run = run_guarded(command, "libtorrent_create.py make v1".into(), HANG_GUARD);
    run.assert_success();
    let hashes: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let swarm: [u8; 20] = hex_to_bytes(hashes["v1"].as_str().unwrap())
        .try_into()
        .unwrap();
    let (seeder, addr) = start_seeder("v1-seeder", &v1, t.dir.path(), next_loopback(), &[]);
    let mut w = Wire::dial(next_loopback(), addr).unwrap();
    w.send(&handshake(&swarm, &peer_id("v1h"), RESERVED_V2))
        .unwrap();
    w.handshake_parts(ANSWER).unwrap();
    let r = Req {
        root: t.big.root(),
        base: 1,
        index: 0,
        length: 2,
        proof: 0,
    };
    w.send(&r.frame()).unwrap();
    assert!(closed(&mut w));
    assert!(seeder.is_running());
}

/// libtorrent fetching a v2-only magnet link from a bitfetch seeder: the info dictionary has no
/// `piece layers`, so libtorrent must ask for them with hash requests, and must accept our
/// answers, before it can check a piece.
#[test]
fn libtorrent_downloads_a_v2_magnet_from_us_with_the_layers_we_serve() {
    use support::clients::{Libtorrent, libtorrent_make_magnet};
    let t = V2Torrent::new();
    let (seeder, addr) = t.seed();
    let magnet = libtorrent_make_magnet(&t.torrent());
    assert!(magnet.contains("urn:btmh:1220"), "{magnet}");
    let out = t.dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let lt = Libtorrent::download_magnet(&magnet, &out, next_loopback(), &[addr]);
    lt.wait_finished(Duration::from_secs(120), &[&seeder]);
    for name in [BIG, SMALL] {
        let got = fs::read(out.join("content").join(name)).unwrap();
        let want = fs::read(t.dir.path().join("content").join(name)).unwrap();
        assert!(got == want, "{name} differs");
    }
    assert!(seeder.is_running());
}
