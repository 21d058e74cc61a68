//! Piece and block arithmetic: the one home of it.
//!
//! A torrent's bytes are the concatenation of its files, cut into pieces of `piece_length`
//! (the last one shorter), each piece cut into 16 KiB blocks (the last one shorter). Only
//! [`Geometry`] makes [`PieceIndex`] and [`BlockRef`] values, so code that holds one knows it
//! is in range. All arithmetic is checked or done in `u64` where it cannot overflow.

use std::fmt;

/// The request size every client uses; BEP 3 peers may refuse larger requests.
pub const BLOCK_LEN: u32 = 16 * 1024;

/// A piece index known to be in range for the torrent it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PieceIndex(u32);

impl PieceIndex {
    pub fn get(self) -> u32 {
        self.0
    }
    pub fn usize(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A byte range inside one piece, known to be in range. Blocks we request are aligned to
/// [`BLOCK_LEN`]; ranges peers request from us need only lie inside the piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRef {
    pub piece: PieceIndex,
    pub offset: u32,
    pub len: u32,
}

impl BlockRef {
    /// The index of this block within its piece (meaningful for aligned blocks).
    pub fn index_in_piece(self) -> u32 {
        self.offset / BLOCK_LEN
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    ZeroPieceLength,
    PieceCountMismatch { expected: u64, got: u64 },
    TooLarge,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ZeroPieceLength => write!(f, "piece length is zero"),
            Error::PieceCountMismatch { expected, got } => write!(
                f,
                "the total length needs {expected} pieces but the torrent has {got} piece hashes"
            ),
            Error::TooLarge => write!(f, "torrent is too large"),
        }
    }
}

impl std::error::Error for Error {}

/// A contiguous part of one file that a byte range of the torrent covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpan {
    pub file: usize,
    pub file_offset: u64,
    pub len: u64,
    /// Offset of this span within the range that was mapped.
    pub range_offset: u64,
}

#[derive(Debug, Clone)]
pub struct Geometry {
    total_len: u64,
    piece_len: u32,
    piece_count: u32,
    /// Start offset of each file within the torrent; `file_starts[i] + file_lens[i]` is its end.
    file_starts: Vec<u64>,
    file_lens: Vec<u64>,
}

impl Geometry {
    /// `piece_count` is the number of hashes the torrent carries; it must match the length.
    pub fn new(piece_len: u32, file_lens: &[u64], piece_count: u64) -> Result<Geometry, Error> {
        if piece_len == 0 {
            return Err(Error::ZeroPieceLength);
        }
        let mut file_starts = Vec::with_capacity(file_lens.len());
        let mut total: u64 = 0;
        for &len in file_lens {
            file_starts.push(total);
            total = total.checked_add(len).ok_or(Error::TooLarge)?;
        }
        let expected = total.div_ceil(u64::from(piece_len));
        if expected != piece_count {
            return Err(Error::PieceCountMismatch {
                expected,
                got: piece_count,
            });
        }
        let piece_count = u32::try_from(piece_count).map_err(|_| Error::TooLarge)?;
        Ok(Geometry {
            total_len: total,
            piece_len,
            piece_count,
            file_starts,
            file_lens: file_lens.to_vec(),
        })
    }

    pub fn total_len(&self) -> u64 {
        self.total_len
    }
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }
    /// The nominal piece length (every piece but possibly the last).
    pub fn nominal_piece_len(&self) -> u32 {
        self.piece_len
    }
    pub fn file_count(&self) -> usize {
        self.file_lens.len()
    }
    pub fn file_len(&self, file: usize) -> u64 {
        self.file_lens[file]
    }
    pub fn file_start(&self, file: usize) -> u64 {
        self.file_starts[file]
    }

    pub fn piece(&self, index: u32) -> Option<PieceIndex> {
        (index < self.piece_count).then_some(PieceIndex(index))
    }

    pub fn pieces(&self) -> impl Iterator<Item = PieceIndex> + use<> {
        (0..self.piece_count).map(PieceIndex)
    }

    pub fn piece_offset(&self, piece: PieceIndex) -> u64 {
        u64::from(piece.0) * u64::from(self.piece_len)
    }

    pub fn piece_len(&self, piece: PieceIndex) -> u32 {
        let start = self.piece_offset(piece);
        let len = (self.total_len - start).min(u64::from(self.piece_len));
        // Bounded by piece_len, a u32.
        len as u32
    }

    pub fn blocks_in(&self, piece: PieceIndex) -> u32 {
        self.piece_len(piece).div_ceil(BLOCK_LEN)
    }

    /// The `n`th aligned block of `piece`; `None` past the last one.
    pub fn block(&self, piece: PieceIndex, n: u32) -> Option<BlockRef> {
        let piece_len = self.piece_len(piece);
        let offset = n.checked_mul(BLOCK_LEN).filter(|&o| o < piece_len)?;
        Some(BlockRef {
            piece,
            offset,
            len: (piece_len - offset).min(BLOCK_LEN),
        })
    }

    pub fn blocks(&self, piece: PieceIndex) -> impl Iterator<Item = BlockRef> + '_ {
        (0..self.blocks_in(piece)).filter_map(move |n| self.block(piece, n))
    }

    /// Validates a range a peer asked for: inside one piece, 1 to 16 KiB long.
    pub fn request(&self, index: u32, offset: u32, len: u32) -> Option<BlockRef> {
        let piece = self.piece(index)?;
        let end = u64::from(offset) + u64::from(len);
        (len > 0 && len <= BLOCK_LEN && end <= u64::from(self.piece_len(piece)))
            .then_some(BlockRef { piece, offset, len })
    }

    /// Validates a block a peer sent: it must be exactly one of our aligned blocks.
    pub fn aligned_block(&self, index: u32, offset: u32, len: u32) -> Option<BlockRef> {
        let piece = self.piece(index)?;
        if !offset.is_multiple_of(BLOCK_LEN) {
            return None;
        }
        self.block(piece, offset / BLOCK_LEN)
            .filter(|b| b.len == len)
    }

    /// Splits the torrent byte range `[offset, offset + len)` into per-file spans, skipping
    /// zero-length files. The range must lie inside the torrent.
    pub fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = FileSpan> + '_ {
        let end = offset + len;
        debug_assert!(end <= self.total_len);
        // First file whose end is past `offset`.
        let first = self
            .file_starts
            .partition_point(|&start| start <= offset)
            .saturating_sub(1);
        (first..self.file_lens.len())
            .take_while(move |&f| self.file_starts[f] < end)
            .filter_map(move |f| {
                let f_start = self.file_starts[f];
                let f_end = f_start + self.file_lens[f];
                let s = offset.max(f_start);
                let e = end.min(f_end);
                (e > s).then_some(FileSpan {
                    file: f,
                    file_offset: s - f_start,
                    len: e - s,
                    range_offset: s - offset,
                })
            })
    }

    /// One flag per piece: does it hold any byte of a file flagged in `files`?
    pub fn pieces_touching(&self, files: &[bool]) -> Vec<bool> {
        let mut out = vec![false; self.piece_count as usize];
        for (f, _) in files.iter().enumerate().filter(|(_, sel)| **sel) {
            for p in self.pieces_of_file(f) {
                out[p as usize] = true;
            }
        }
        out
    }

    /// The pieces that hold any byte of `file` (none for a zero-length file).
    pub fn pieces_of_file(&self, file: usize) -> std::ops::Range<u32> {
        let start = self.file_starts[file];
        let len = self.file_lens[file];
        if len == 0 {
            return 0..0;
        }
        let pl = u64::from(self.piece_len);
        // Both bounded by piece_count, a u32.
        (start / pl) as u32..(start + len).div_ceil(pl) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_piece_and_last_block() {
        let g = Geometry::new(32 * 1024, &[100_000], 4).unwrap();
        assert_eq!(g.piece_count(), 4);
        let last = g.piece(3).unwrap();
        assert_eq!(g.piece_len(last), 100_000 - 3 * 32 * 1024);
        assert_eq!(g.blocks_in(last), 1);
        let b = g.block(last, 0).unwrap();
        assert_eq!(b.len, 100_000 - 3 * 32 * 1024);
        assert!(g.block(last, 1).is_none());
        assert!(g.piece(4).is_none());
        let first = g.piece(0).unwrap();
        assert_eq!(g.blocks_in(first), 2);
        assert_eq!(g.block(first, 1).unwrap().len, BLOCK_LEN);
    }

    #[test]
    fn last_piece_of_one_byte() {
        let g = Geometry::new(16384, &[16385], 2).unwrap();
        let last = g.piece(1).unwrap();
        assert_eq!(g.piece_len(last), 1);
        assert_eq!(g.block(last, 0).unwrap().len, 1);
    }

    #[test]
    fn piece_count_must_match() {
        assert_eq!(
            Geometry::new(16384, &[16385], 1).unwrap_err(),
            Error::PieceCountMismatch {
                expected: 2,
                got: 1
            }
        );
        assert!(Geometry::new(0, &[1], 1).is_err());
        assert!(Geometry::new(16384, &[u64::MAX, 1], 1).is_err());
        // A torrent of only empty files has no pieces.
        assert!(Geometry::new(16384, &[0, 0], 0).is_ok());
    }

    #[test]
    fn piece_spanning_three_files() {
        // Files of 10, 5 (inside), 0 (empty) and 30 bytes, piece length 20.
        let g = Geometry::new(20, &[10, 5, 0, 30], 3).unwrap();
        let p0 = g.piece(0).unwrap();
        let spans: Vec<_> = g
            .spans(g.piece_offset(p0), u64::from(g.piece_len(p0)))
            .collect();
        assert_eq!(
            spans,
            vec![
                FileSpan {
                    file: 0,
                    file_offset: 0,
                    len: 10,
                    range_offset: 0
                },
                FileSpan {
                    file: 1,
                    file_offset: 0,
                    len: 5,
                    range_offset: 10
                },
                FileSpan {
                    file: 3,
                    file_offset: 0,
                    len: 5,
                    range_offset: 15
                },
            ]
        );
        let p2 = g.piece(2).unwrap();
        assert_eq!(g.piece_len(p2), 5);
        let spans: Vec<_> = g.spans(40, 5).collect();
        assert_eq!(
            spans,
            vec![FileSpan {
                file: 3,
                file_offset: 25,
                len: 5,
                range_offset: 0
            }]
        );
        assert_eq!(g.pieces_of_file(0), 0..1);
        assert_eq!(g.pieces_of_file(2), 0..0);
        assert_eq!(g.pieces_of_file(3), 0..3);
    }

    #[test]
    fn requests_are_bounded() {
        let g = Geometry::new(32768, &[40000], 2).unwrap();
        assert!(g.request(0, 0, BLOCK_LEN).is_some());
        assert!(g.request(0, 100, BLOCK_LEN).is_some());
        assert!(g.request(0, 0, BLOCK_LEN + 1).is_none());
        assert!(g.request(0, 32767, 2).is_none());
        assert!(g.request(0, 0, 0).is_none());
        assert!(g.request(1, 0, 7232).is_some());
        assert!(g.request(1, 0, 7233).is_none());
        assert!(g.request(2, 0, 1).is_none());
        assert!(g.request(0, u32::MAX, u32::MAX).is_none());
    }

    #[test]
    fn aligned_blocks_must_match_exactly() {
        let g = Geometry::new(32768, &[40000], 2).unwrap();
        assert!(g.aligned_block(0, BLOCK_LEN, BLOCK_LEN).is_some());
        assert!(g.aligned_block(0, 1, BLOCK_LEN).is_none());
        assert!(g.aligned_block(1, 0, 7232).is_some());
        assert!(g.aligned_block(1, 0, BLOCK_LEN).is_none());
        assert!(g.aligned_block(1, BLOCK_LEN, 1).is_none());
    }
}
