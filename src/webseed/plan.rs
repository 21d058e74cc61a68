//! What to ask a web seed for (pure): the blocks of an assignment grouped into runs of
//! contiguous torrent bytes, each run cut at file boundaries into the byte ranges of one file
//! (one HTTP request each) or of a pad file (zeros, never requested).

use crate::geometry::{BlockRef, Geometry};

/// Consecutive blocks whose bytes follow each other in the torrent, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub blocks: Vec<BlockRef>,
    /// Torrent offset of the first byte, and the byte count.
    pub offset: u64,
    pub len: u64,
}

/// A part of a run inside one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub file: usize,
    /// Offset inside the file, and the byte count (never zero).
    pub file_offset: u64,
    pub len: u64,
    /// A pad file's bytes: zeros, written without a request.
    pub zeros: bool,
}

impl Segment {
    /// The inclusive `Range: bytes=first-last` of this segment.
    pub fn range(&self) -> (u64, u64) {
        (self.file_offset, self.file_offset + self.len - 1)
    }
}

/// Groups `blocks` into runs of contiguous bytes (sorted first; duplicates dropped).
pub fn runs(g: &Geometry, blocks: &[BlockRef]) -> Vec<Run> {
    let mut sorted = blocks.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut out: Vec<Run> = Vec::new();
    for b in sorted {
        let at = g.piece_offset(b.piece) + u64::from(b.offset);
        match out.last_mut() {
            Some(run) if run.offset + run.len == at => {
                run.len += u64::from(b.len);
                run.blocks.push(b);
            }
            _ => out.push(Run {
                blocks: vec![b],
                offset: at,
                len: u64::from(b.len),
            }),
        }
    }
    out
}

/// Cuts the torrent bytes `[offset, offset + len)` at file boundaries; `pad[f]` marks pad files.
pub fn segments(g: &Geometry, pad: &[bool], offset: u64, len: u64) -> Vec<Segment> {
    g.spans(offset, len)
        .map(|s| Segment {
            file: s.file,
            file_offset: s.file_offset,
            len: s.len,
            zeros: pad.get(s.file).copied().unwrap_or(false),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = crate::geometry::BLOCK_LEN as u64;

    fn block(g: &Geometry, piece: u32, n: u32) -> BlockRef {
        g.block(g.piece(piece).unwrap(), n).unwrap()
    }

    #[test]
    fn blocks_group_into_contiguous_runs_across_pieces() {
        // Pieces of two blocks; the last piece one short block.
        let g = Geometry::new(2 * B as u32, &[5 * B + 10], 3).unwrap();
        let blocks = [
            block(&g, 2, 0),
            block(&g, 0, 1),
            block(&g, 1, 0),
            block(&g, 2, 1),
            block(&g, 0, 1),
        ];
        let r = runs(&g, &blocks);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].offset, r[0].len, r[0].blocks.len()), (B, 2 * B, 2));
        assert_eq!(
            (r[1].offset, r[1].len, r[1].blocks.len()),
            (4 * B, B + 10, 2)
        );
    }

    #[test]
    fn a_run_is_cut_at_file_boundaries_and_pad_files_are_zeros() {
        // Files: 10 bytes, a 6-byte pad, an empty file, then 2 blocks.
        let g = Geometry::new(B as u32, &[10, 6, 0, 2 * B], 3).unwrap();
        let pad = [false, true, false, false];
        let s = segments(&g, &pad, 4, 2 * B);
        assert_eq!(
            s,
            vec![
                Segment {
                    file: 0,
                    file_offset: 4,
                    len: 6,
                    zeros: false
                },
                Segment {
                    file: 1,
                    file_offset: 0,
                    len: 6,
                    zeros: true
                },
                Segment {
                    file: 3,
                    file_offset: 0,
                    len: 2 * B - 12,
                    zeros: false
                },
            ]
        );
        assert_eq!(s[0].range(), (4, 9));
        assert_eq!(s[2].range(), (0, 2 * B - 13));
    }
}
