//! Micro-benchmarks of the hot paths: wire frame decoding, picker assignment and piece
//! hashing. `cargo bench --bench hot_paths` prints time per operation and throughput, so a
//! regression shows as a changed number; `cargo test` runs each once as a smoke test.
//!
//! No benchmark framework: each case runs for about a second after a warm-up and reports the
//! median of several rounds, which is steady enough to compare two builds on one machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bitfetch::geometry::{BLOCK_LEN, Geometry};
use bitfetch::picker::{BlockOutcome, PeerKey, Picker};
use bitfetch::wire::{self, Frame, Message};
use sha1::{Digest, Sha1};

struct Bench {
    full: bool,
}

impl Bench {
    /// Runs `op` (which processes `bytes` bytes, or 0) and prints its cost.
    fn run(&self, name: &str, bytes: u64, mut op: impl FnMut()) {
        if !self.full {
            op();
            println!("{name}: ok");
            return;
        }
        let warm = Instant::now();
        let mut per_round = 0u64;
        while warm.elapsed() < Duration::from_millis(200) {
            op();
            per_round += 1;
        }
        // Rounds of ~100 ms each; median of 9.
        let per_round = (per_round / 2).max(1);
        let mut samples: Vec<f64> = (0..9)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..per_round {
                    op();
                }
                t.elapsed().as_secs_f64() / per_round as f64
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        let secs = samples[samples.len() / 2];
        let rate = if bytes > 0 {
            format!("  {:8.1} MiB/s", bytes as f64 / secs / (1024.0 * 1024.0))
        } else {
            String::new()
        };
        println!("{name:<44} {:>12.1} ns/op{rate}", secs * 1e9);
    }
}

fn main() {
    let bench = Bench {
        full: std::env::args().any(|a| a == "--bench"),
    };
    wire_decode(&bench);
    picker_assign(&bench);
    piece_hashing(&bench);
}

/// A stream as a fast seeder sends it: piece messages of 16 KiB with a have now and then.
fn wire_decode(bench: &Bench) {
    let piece_count = 4096;
    let mut stream = Vec::new();
    for i in 0..64u32 {
        wire::encode_piece_header(i / 16, (i % 16) * BLOCK_LEN, BLOCK_LEN, &mut stream);
        stream.extend(std::iter::repeat_n(i as u8, BLOCK_LEN as usize));
        if i % 8 == 0 {
            wire::encode(&Message::Have(i), &mut stream);
        }
    }
    let bitfield_len = (piece_count as usize).div_ceil(8);
    bench.run(
        "wire: decode 64 piece frames + haves",
        stream.len() as u64,
        || {
            let mut at = 0;
            let mut pieces = 0;
            while let Some((frame, used)) =
                wire::decode_frame(&stream[at..], bitfield_len, piece_count).expect("valid stream")
            {
                if matches!(frame, Frame::Piece { .. }) {
                    pieces += 1;
                }
                black_box(&frame);
                at += used;
            }
            assert_eq!(pieces, 64);
        },
    );

    let mut requests = Vec::new();
    for i in 0..256u32 {
        wire::encode(
            &Message::Request {
                index: i / 16,
                begin: (i % 16) * BLOCK_LEN,
                len: BLOCK_LEN,
            },
            &mut requests,
        );
    }
    bench.run("wire: decode 256 request frames", 0, || {
        let mut at = 0;
        while let Some((frame, used)) =
            wire::decode_frame(&requests[at..], bitfield_len, piece_count).expect("valid")
        {
            black_box(&frame);
            at += used;
        }
        assert_eq!(at, requests.len());
    });
}

/// The picker's work for a whole 1 GiB torrent of 256 KiB pieces with 8 seeders: assign in
/// batches of 32 blocks, take each block in, verify each piece.
fn picker_assign(bench: &Bench) {
    let piece_len = 256 * 1024;
    let total = 1u64 << 30;
    let pieces = total / piece_len;
    let geometry = Geometry::new(piece_len as u32, &[total], pieces).expect("geometry");
    let blocks_total = total / u64::from(BLOCK_LEN);
    let run_torrent = || {
        let mut picker = Picker::new(geometry.clone(), vec![false; pieces as usize], 7);
        let peers: Vec<PeerKey> = (0..8).map(PeerKey).collect();
        for &p in &peers {
            picker.add_peer(p);
            picker.peer_has_all(p);
        }
        let mut received = 0u64;
        'outer: loop {
            let mut any = false;
            for &p in &peers {
                let batch = picker.assign(p, 32);
                any |= !batch.is_empty();
                for b in batch {
                    received += 1;
                    if let BlockOutcome::Accepted {
                        piece_complete: true,
                        ..
                    } = picker.block_received(p, b, true)
                    {
                        picker.piece_verified(b.piece);
                    }
                }
                if picker.is_complete() {
                    break 'outer;
                }
            }
            assert!(any, "the picker stopped assigning before completion");
        }
        assert_eq!(received, blocks_total);
    };
    bench.run("picker: 1 GiB, 8 seeders, batches of 32", 0, run_torrent);
}

/// SHA-1 over a 256 KiB piece, the rate every downloaded and verified byte goes through.
fn piece_hashing(bench: &Bench) {
    let piece: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 + 7) as u8).collect();
    bench.run("hash: SHA-1 of a 256 KiB piece", piece.len() as u64, || {
        black_box(Sha1::digest(black_box(&piece)));
    });
}
