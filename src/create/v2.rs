//! Hashing for v2 and hybrid torrents (BEP 52).
//!
//! A v2 torrent hashes every file on its own, in pieces that start at the file's start. Each
//! piece is read once (`pread` into a per-thread buffer of one piece, so a file is never held
//! whole in memory) and gives its piece-layer node: the SHA-256 merkle root over its 16 KiB
//! leaves, the last piece of a file padded with zero leaves ([`merkle::piece_root`]). A file no
//! larger than a piece has no layer: its one piece's root over its own leaves is its `pieces
//! root` ([`merkle::small_file_root`]).
//!
//! A hybrid torrent also carries the v1 part. In a multi-file one every file is followed by a
//! BEP 47 pad file up to the next piece boundary ([`pad_after`]), so each v1 piece lies inside
//! one file, its tail zeros: the same read gives the piece's SHA-1 too.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use sha1::{Digest as _, Sha1};

use crate::error::Error;
use crate::merkle::{self, Hash};

/// One file's v2 hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    /// The file's `pieces root`; `None` for an empty file (BEP 52: it has none).
    pub root: Option<Hash>,
    /// The piece layer, for a file larger than a piece; empty otherwise.
    pub layer: Vec<Hash>,
}

/// What [`hash_files`] computes.
#[derive(Debug)]
pub struct Hashed {
    /// One per file, in the order given.
    pub files: Vec<FileHashes>,
    /// The v1 `pieces` over the files with their pads ([`pad_after`]); empty unless asked for.
    pub v1_pieces: Vec<u8>,
}

/// The pad file after each of `lens` in a multi-file hybrid torrent: up to the next piece
/// boundary, after every non-empty file that does not end on one, the last file included.
/// That is what libtorrent 2.0 makes (it pads the tail too, so the v1 part is whole pieces);
/// the same files then give the same torrent, and the same swarm, whichever of the two made
/// it. A single-file torrent has no pads.
pub fn pad_after(lens: &[u64], piece_len: u32) -> Vec<u64> {
    let pl = u64::from(piece_len);
    lens.iter().map(|&len| (pl - len % pl) % pl).collect()
}

/// A piece's v2 node and v1 hash (zeros when there is no v1 part).
type PieceHashes = (Hash, [u8; 20]);

/// Whether and how [`hash_files`] computes v1 piece hashes too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1 {
    /// A v2-only torrent: none.
    No,
    /// A single-file hybrid torrent: the file's own pieces, the last one short.
    Unpadded,
    /// A multi-file hybrid torrent: every file padded with zeros to whole pieces
    /// ([`pad_after`]).
    Padded,
}

/// The files to hash, and where each one's pieces start in the run of all pieces.
struct Plan<'a> {
    root: &'a Path,
    files: &'a [(PathBuf, u64)],
    piece_len: u32,
    /// `first_piece[i]`: how many pieces the files before `i` have; one more entry, the total.
    first_piece: Vec<u64>,
    v1: V1,
}

impl Plan<'_> {
    fn piece_count(&self) -> u64 {
        self.first_piece.last().copied().unwrap_or(0)
    }

    /// Which file piece `k` (of all pieces) belongs to, and its index within that file.
    fn locate(&self, k: u64) -> (usize, u64) {
        // The last file whose first piece is at or before k; empty files have no pieces, so
        // the one found is the one holding k (first_piece is non-decreasing).
        let file = self.first_piece.partition_point(|&start| start <= k) - 1;
        (file, k - self.first_piece[file])
    }

    /// The v2 node and (for a hybrid torrent) the v1 hash of piece `k`.
    fn hash_piece(&self, k: u64, scratch: &mut Vec<u8>) -> Result<PieceHashes, Error> {
        let (file, index) = self.locate(k);
        let (rel, file_len) = &self.files[file];
        let pl = u64::from(self.piece_len);
        let offset = index * pl;
        // At most one piece: fits in usize.
        let len = (file_len - offset).min(pl) as usize;
        let path = self.root.join(rel);
        let failed = |e: io::Error| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "file changed while hashing")
            } else {
                e
            };
            Error::io(format!("reading {}", path.display()), e)
        };
        scratch.resize(self.piece_len as usize, 0);
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut scratch[..len], offset))
            .map_err(failed)?;
        let leaves_per_piece = (self.piece_len as usize) / merkle::LEAF_LEN;
        let node = if *file_len <= pl {
            merkle::small_file_root(&scratch[..len])
        } else {
            merkle::piece_root(&scratch[..len], leaves_per_piece)
        };
        let sha1 = match self.v1 {
            V1::No => [0; 20],
            V1::Unpadded => Sha1::digest(&scratch[..len]).into(),
            V1::Padded => {
                scratch[len..].fill(0);
                Sha1::digest(&scratch[..]).into()
            }
        };
        Ok((node, sha1))
    }
}

/// Hashes `files` (paths under `root`, with their lengths) for a v2 torrent with pieces of
/// `piece_len` (a power of two, at least 16 KiB), on `threads` threads; and the v1 pieces of
/// a hybrid torrent over the same files as `v1` says.
pub fn hash_files(
    root: &Path,
    files: &[(PathBuf, u64)],
    piece_len: u32,
    v1: V1,
    threads: usize,
) -> Result<Hashed, Error> {
    debug_assert!(piece_len.is_power_of_two() && piece_len as usize >= merkle::LEAF_LEN);
    let pl = u64::from(piece_len);
    let mut first_piece = Vec::with_capacity(files.len() + 1);
    let mut count = 0u64;
    for (_, len) in files {
        first_piece.push(count);
        count += len.div_ceil(pl);
    }
    first_piece.push(count);
    let plan = Plan {
        root,
        files,
        piece_len,
        first_piece,
        v1,
    };
    let nodes = hash_pieces(&plan, threads)?;

    let leaves_per_piece = (piece_len as usize) / merkle::LEAF_LEN;
    let mut out = Hashed {
        files: Vec::with_capacity(files.len()),
        v1_pieces: Vec::with_capacity(if v1 == V1::No { 0 } else { nodes.len() * 20 }),
    };
    for (i, (_, len)) in files.iter().enumerate() {
        let pieces = &nodes[plan.first_piece[i] as usize..plan.first_piece[i + 1] as usize];
        let layer: Vec<Hash> = pieces.iter().map(|(node, _)| *node).collect();
        out.files.push(match layer.len() {
            0 => FileHashes {
                root: None,
                layer: Vec::new(),
            },
            1 => FileHashes {
                root: Some(layer[0]),
                layer: Vec::new(),
            },
            _ => FileHashes {
                root: Some(merkle::root_from_layer(&layer, leaves_per_piece)),
                layer,
            },
        });
        debug_assert!((*len > pl) == (out.files[i].layer.len() > 1));
        if v1 != V1::No {
            for (_, sha1) in pieces {
                out.v1_pieces.extend_from_slice(sha1);
            }
        }
    }
    Ok(out)
}

/// Every piece's hashes, in order, computed on `threads` threads that take the next piece
/// from a shared counter; the first failure stops them all.
fn hash_pieces(plan: &Plan, threads: usize) -> Result<Vec<PieceHashes>, Error> {
    let count = plan.piece_count();
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let parts: Vec<Result<Vec<(u64, PieceHashes)>, Error>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut scratch = Vec::new();
                    let mut done = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        if k >= count || stop.load(Ordering::Relaxed) {
                            return Ok(done);
                        }
                        match plan.hash_piece(k, &mut scratch) {
                            Ok(h) => done.push((k, h)),
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing thread panicked"))
            .collect()
    });
    let mut all = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for part in parts {
        all.extend(part?);
    }
    all.sort_unstable_by_key(|(k, _)| *k);
    debug_assert_eq!(all.len() as u64, count);
    Ok(all.into_iter().map(|(_, h)| h).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Sha256;

    fn write(dir: &Path, name: &str, data: &[u8]) -> (PathBuf, u64) {
        std::fs::write(dir.join(name), data).unwrap();
        (PathBuf::from(name), data.len() as u64)
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn pads_follow_every_unaligned_non_empty_file() {
        let pl = 32 * 1024;
        assert_eq!(
            pad_after(&[100, 0, 32768, 70000, 5], pl),
            vec![32668, 0, 0, 28304, 32763]
        );
        assert_eq!(pad_after(&[], pl), Vec::<u64>::new());
    }

    #[test]
    fn files_hash_on_their_own_with_zero_padded_v1_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let pl = 16 * 1024u32;
        let big = bytes(2 * 16384 + 500, 1); // 3 pieces: a layer
        let one = bytes(16384, 2); // exactly one piece: no layer
        let small = bytes(100, 3);
        let files = vec![
            write(dir.path(), "big", &big),
            write(dir.path(), "empty", b""),
            write(dir.path(), "one", &one),
            write(dir.path(), "small", &small),
        ];
        let h = hash_files(dir.path(), &files, pl, V1::Padded, 3).unwrap();

        let layer: Vec<Hash> = big
            .chunks(16384)
            .map(|p| merkle::piece_root(p, 1))
            .collect();
        assert_eq!(h.files[0].layer, layer);
        assert_eq!(h.files[0].root, Some(merkle::root_from_layer(&layer, 1)));
        assert_eq!(h.files[0].root, Some(merkle::small_file_root(&big)));
        assert_eq!(
            h.files[1],
            FileHashes {
                root: None,
                layer: vec![]
            }
        );
        assert_eq!(h.files[2].root, Some(Sha256::digest(&one).into()));
        assert!(h.files[2].layer.is_empty());
        assert_eq!(h.files[3].root, Some(merkle::small_file_root(&small)));

        // v1: the concatenation with pads (big: 16884 zeros after; one: none; small, the
        // last: 16284).
        let mut v1 = big.clone();
        v1.resize(3 * 16384, 0);
        v1.extend_from_slice(&one);
        v1.extend_from_slice(&small);
        v1.resize(5 * 16384, 0);
        let want: Vec<u8> = v1
            .chunks(16384)
            .flat_map(|p| Sha1::digest(p).to_vec())
            .collect();
        assert_eq!(h.v1_pieces, want);
    }

    #[test]
    fn wide_pieces_pad_the_last_piece_with_zero_leaves() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB pieces (4 leaves); 5 leaves of data: 2 pieces, the second 1 leaf of 4.
        let data = bytes(5 * 16384 - 7, 9);
        let files = vec![write(dir.path(), "f", &data)];
        let h = hash_files(dir.path(), &files, 64 * 1024, V1::No, 2).unwrap();
        let leaves = merkle::leaves(&data);
        assert_eq!(h.files[0].layer.len(), 2);
        assert_eq!(h.files[0].layer[1], merkle::root(&leaves[4..], 4, [0; 32]));
        assert_eq!(h.files[0].root, Some(merkle::root(&leaves, 8, [0; 32])));
        assert!(h.v1_pieces.is_empty());
        // One file of a hybrid torrent: its last v1 piece is short, not padded.
        let h = hash_files(dir.path(), &files, 64 * 1024, V1::Unpadded, 2).unwrap();
        assert_eq!(&h.v1_pieces[20..], &Sha1::digest(&data[64 * 1024..])[..]);
    }

    #[test]
    fn a_file_that_shrank_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (p, _) = write(dir.path(), "f", b"abc");
        let err = hash_files(dir.path(), &[(p, 50_000)], 16 * 1024, V1::Padded, 2).unwrap_err();
        assert!(err.to_string().contains("changed while hashing"), "{err}");
    }
}
