//! BEP 52 hash messages, pure: which `hash request`s we serve and with what, and whether the
//! hashes of a `hashes` message prove out against a file's root.
//!
//! # The tree and the request
//! A file's tree has `2^H` leaves (its 16 KiB blocks, zeros past the end); layer `h` (0 = the
//! leaves) has `2^(H-h)` nodes. The *piece layer* is at `P = log2(leaves per piece)`. A request
//! names a file by its `pieces root` and asks for `length` nodes of layer `base` from `index`
//! on, plus the uncles of `proof layers` layers above them (BEP 52):
//!
//! > Index MUST be a multiple of length, this includes zero. Length MUST be
//! > equal-to-or-greater-than two and a power of two unless it gets truncated by the end of
//! > the layer. Length SHOULD NOT be greater than 512. Proof layers is the number of ancestor
//! > layers to include. [...] Hashes starts with the base layer and ends with the uncle hash
//! > closest to the root. A proof layer is omitted if the requested hashes include the entire
//! > child layer. In other words, the first log2(length)-1 proof layers are omitted.
//!
//! So with `k = log2(length)`, the answer is the `length` base nodes, then for each height
//! `h` from `base + k` to `base + proof layers` the sibling of the range's ancestor at `h`:
//! `max(0, proof layers - k + 1)` uncles. Layers are counted as libtorrent counts them: padded
//! to the power of two, so a range may run into the nodes past the end of the file (roots of
//! all-zero subtrees), and `base + proof layers` stops below the root (the root is known).
//!
//! # What we serve
//! The piece layer (from the torrent) and, for a piece we have, any layer below it (hashed
//! from the piece's data, which the answer checks against the piece layer first); a range
//! below the piece layer must lie within one piece. Layers above the piece layer are refused
//! (BEP 52: "Clients are only required to support setting the base layer to the leaf and
//! piece layers"). An uncle above the piece layer is computed from the piece layer: those of
//! heights [`SUMMIT`] and more above it come from an [`Upper`] built once per file, so an
//! answer never hashes more than about a thousand nodes whatever the file's size.

use crate::merkle::{self, Hash, LEAF_LEN};
use crate::wire::HashRequest;

/// Most base-layer hashes we send or accept in one message (BEP 52: "Length SHOULD NOT be
/// greater than 512"); below the piece layer a whole piece's worth may be asked (libtorrent
/// asks for a piece's leaves at once), up to [`MAX_PIECE_LEAVES`].
pub const MAX_LENGTH: u32 = 512;
/// The most leaves a piece may have for us to hash it for an answer: 8192, a 128 MiB piece
/// (libtorrent's own limit on a request's length).
pub const MAX_PIECE_LEAVES: u32 = 8192;
/// An [`Upper`] keeps the layers from this many layers above the piece layer up: nodes over
/// 64 pieces each, so any node below them costs at most 63 hashes to compute, and the cache
/// costs a byte per piece.
pub const SUMMIT: u32 = 6;

/// What we know of one file's tree without reading its data: from the torrent.
#[derive(Debug, Clone, Copy)]
pub struct FileTree<'a> {
    pub root: &'a Hash,
    /// Bytes; more than zero (an empty file has no tree).
    pub len: u64,
    /// The piece layer: one node per piece of the file, empty for a file of one piece.
    pub layer: &'a [Hash],
    /// The torrent's index of the file's first piece (v2 files start on a piece boundary).
    pub first_piece: u32,
    /// A power of two.
    pub leaves_per_piece: u32,
}

/// A torrent's v2 files, as the reader of a connection looks them up.
pub trait Trees {
    /// The file whose `pieces root` is `root`.
    fn file(&self, root: &Hash) -> Option<FileTree<'_>>;
}

impl Trees for crate::metainfo::V2 {
    fn file(&self, root: &Hash) -> Option<FileTree<'_>> {
        let lpp = self.leaves_per_piece();
        self.file_by_root(root).map(|f| FileTree {
            root: &f.root,
            len: f.len,
            layer: &f.layer,
            first_piece: f.first_piece,
            leaves_per_piece: lpp,
        })
    }
}

/// One file's tree held by value (tests and the fuzz target), and a list of them as a
/// torrent's [`Trees`].
#[cfg(any(test, feature = "fuzz"))]
#[derive(Debug, Clone)]
pub struct OwnedTree {
    pub root: Hash,
    pub len: u64,
    pub layer: Vec<Hash>,
    pub first_piece: u32,
    pub leaves_per_piece: u32,
}

#[cfg(any(test, feature = "fuzz"))]
impl OwnedTree {
    /// The tree of `data`, a file starting at piece `first_piece`.
    pub fn of(data: &[u8], first_piece: u32, leaves_per_piece: u32) -> OwnedTree {
        let lpp = leaves_per_piece as usize;
        let layer: Vec<Hash> = data
            .chunks(lpp * LEAF_LEN)
            .map(|p| merkle::piece_root(p, lpp))
            .collect();
        let (root, layer) = if layer.len() > 1 {
            (merkle::root_from_layer(&layer, lpp), layer)
        } else {
            (merkle::small_file_root(data), Vec::new())
        };
        OwnedTree {
            root,
            len: data.len() as u64,
            layer,
            first_piece,
            leaves_per_piece,
        }
    }

    pub fn view(&self) -> FileTree<'_> {
        FileTree {
            root: &self.root,
            len: self.len,
            layer: &self.layer,
            first_piece: self.first_piece,
            leaves_per_piece: self.leaves_per_piece,
        }
    }
}

#[cfg(any(test, feature = "fuzz"))]
impl Trees for Vec<OwnedTree> {
    fn file(&self, root: &Hash) -> Option<FileTree<'_>> {
        self.iter().find(|t| t.root == *root).map(OwnedTree::view)
    }
}

impl FileTree<'_> {
    /// Layers above the leaves: the root is at this height.
    pub fn height(&self) -> u32 {
        merkle::leaf_count(self.len)
            .next_power_of_two()
            .trailing_zeros()
    }

    /// The height of the piece layer.
    pub fn piece_height(&self) -> u32 {
        self.leaves_per_piece.trailing_zeros()
    }

    /// The lowest height we know every node of without data: the piece layer, or the root of
    /// a file no larger than a piece.
    fn known_height(&self) -> u32 {
        self.piece_height().min(self.height())
    }

    fn piece_bytes(&self) -> u64 {
        u64::from(self.leaves_per_piece) * LEAF_LEN as u64
    }

    /// The file's pieces.
    pub fn pieces(&self) -> u64 {
        self.len.div_ceil(self.piece_bytes())
    }

    /// Whether the tree goes above the piece layer (the file is larger than a piece) and the
    /// torrent carries that layer.
    fn has_layer(&self) -> bool {
        self.height() > self.piece_height() && self.layer.len() as u64 == self.pieces()
    }

    /// The node at `height` (at least the piece layer's), `index`, computed from the piece
    /// layer, or taken from `upper` when it keeps that height.
    fn upper_node(&self, upper: Option<&Upper>, height: u32, index: u64) -> Hash {
        let p = self.piece_height();
        debug_assert!(height >= p && self.has_layer());
        if let Some(node) = upper.and_then(|u| u.node(height, index)) {
            return node;
        }
        let span = height - p;
        let first = index << span;
        let Some(nodes) = usize::try_from(first)
            .ok()
            .and_then(|first| self.layer.get(first..))
        else {
            return merkle::pad_root(height);
        };
        let nodes = &nodes[..nodes.len().min(1 << span)];
        merkle::root(nodes, 1 << span, merkle::pad_root(p))
    }
}

/// Why we will not serve a request: each is answered with a `hash reject`, none is a protocol
/// violation (a peer may well ask what we do not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No file of the torrent has that `pieces root`.
    UnknownRoot,
    /// Length not a power of two of at least 2, or over the limit.
    BadLength,
    /// Index not a multiple of length.
    Misaligned,
    /// Base at or above the root, a range past the end of the layer, or proof layers that
    /// reach the root or beyond.
    OutOfRange,
    /// A base layer above the piece layer.
    Unsupported,
    /// A range below the piece layer that spans pieces, or lies wholly past the file's last
    /// piece, or a piece too large to hash for an answer.
    NotOnePiece,
}

/// The shape every valid request has, whoever serves it: `k = log2(length)`.
fn shape(tree: &FileTree, req: &HashRequest) -> Result<u32, Refusal> {
    let n = req.length;
    if n < 2 || !n.is_power_of_two() || n > MAX_PIECE_LEAVES {
        return Err(Refusal::BadLength);
    }
    if !req.index.is_multiple_of(n) {
        return Err(Refusal::Misaligned);
    }
    let h = tree.height();
    if req.base >= h {
        return Err(Refusal::OutOfRange);
    }
    let width = 1u64 << (h - req.base);
    if u64::from(req.index) + u64::from(n) > width || req.proof_layers >= h - req.base {
        return Err(Refusal::OutOfRange);
    }
    Ok(n.trailing_zeros())
}

/// How many hashes answer `req` (valid): its length and its uncles.
pub fn answer_len(req: &HashRequest) -> usize {
    let k = req.length.trailing_zeros();
    req.length as usize + (req.proof_layers + 1).saturating_sub(k) as usize
}

/// How a request we serve is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// From the piece layer, at once ([`answer_from_layer`]).
    Layer,
    /// From the data of one piece of the file, its `piece`-th ([`PieceAnswer`]).
    Piece { piece: u32 },
}

/// Whether we serve `req` on `tree`, and from what.
pub fn check(tree: &FileTree, req: &HashRequest) -> Result<Plan, Refusal> {
    let k = shape(tree, req)?;
    let d = tree.known_height();
    if req.base == tree.piece_height() && tree.has_layer() {
        return if req.length <= MAX_LENGTH {
            Ok(Plan::Layer)
        } else {
            Err(Refusal::BadLength)
        };
    }
    if req.base >= d {
        return Err(Refusal::Unsupported);
    }
    // Below the known layer: the range must lie within one node of it (the range is aligned
    // to its power-of-two length, so fitting is enough).
    if req.base + k > d || (1u32 << d) > MAX_PIECE_LEAVES {
        return Err(Refusal::NotOnePiece);
    }
    let piece = (u64::from(req.index) << req.base) >> d;
    if piece >= tree.pieces() {
        return Err(Refusal::NotOnePiece);
    }
    if d == tree.piece_height() && !tree.has_layer() && tree.height() > d {
        // A file larger than a piece without its layer: nothing to check the data against.
        return Err(Refusal::Unsupported);
    }
    Ok(Plan::Piece {
        piece: u32::try_from(piece).map_err(|_| Refusal::NotOnePiece)?,
    })
}

/// The uncles of `req` at heights `from..=base + proof layers`, each the sibling of the
/// range's ancestor there, computed by `node(height, index)`.
fn uncles(req: &HashRequest, from: u32, mut node: impl FnMut(u32, u64) -> Hash) -> Vec<Hash> {
    let top = req.base + req.proof_layers;
    let first = from.max(req.base + req.length.trailing_zeros());
    (first..=top)
        .map(|h| node(h, (u64::from(req.index) >> (h - req.base)) ^ 1))
        .collect()
}

/// The answer to a request [`check`] planned as [`Plan::Layer`].
pub fn answer_from_layer(tree: &FileTree, upper: Option<&Upper>, req: &HashRequest) -> Vec<Hash> {
    let pad = merkle::pad_root(tree.piece_height());
    let start = req.index as usize;
    let mut out: Vec<Hash> = (start..start + req.length as usize)
        .map(|i| tree.layer.get(i).copied().unwrap_or(pad))
        .collect();
    out.extend(uncles(req, 0, |h, i| tree.upper_node(upper, h, i)));
    out
}

/// A request planned as [`Plan::Piece`], with all it needs from the torrent: what the
/// writer, which reads the piece, finishes with [`PieceAnswer::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PieceAnswer {
    pub req: HashRequest,
    /// The torrent's piece to read.
    pub piece: u32,
    /// Its bytes of the file (the file's last piece may be short).
    pub len: u32,
    /// The height of the node over the whole piece and the node itself, from the torrent:
    /// the data must hash to it.
    height: u32,
    expected: Hash,
    /// The uncles at that height and above.
    upper_uncles: Vec<Hash>,
}

impl PieceAnswer {
    /// `piece`: the file's piece, as [`check`] planned.
    pub fn new(tree: &FileTree, upper: Option<&Upper>, req: &HashRequest, piece: u32) -> Self {
        let d = tree.known_height();
        let (expected, upper_uncles) = if d == tree.height() {
            (*tree.root, Vec::new())
        } else {
            let expected = tree.layer[piece as usize];
            (
                expected,
                uncles(req, d, |h, i| tree.upper_node(upper, h, i)),
            )
        };
        let start = u64::from(piece) * tree.piece_bytes();
        let len = (tree.len - start).min(tree.piece_bytes());
        PieceAnswer {
            req: *req,
            piece: tree.first_piece + piece,
            len: u32::try_from(len).expect("a piece of at most MAX_PIECE_LEAVES leaves"),
            height: d,
            expected,
            upper_uncles,
        }
    }

    /// The answer from the piece's bytes; `None` when they do not hash to the torrent's node.
    pub fn finish(&self, data: &[u8]) -> Option<Vec<Hash>> {
        if data.len() != self.len as usize {
            return None;
        }
        // Every layer of the piece's subtree, from its leaves (zeros past the data) up.
        let mut layers = vec![merkle::leaves(data)];
        layers[0].resize(1 << self.height, [0; 32]);
        for _ in 0..self.height {
            let below = layers.last().expect("the leaves");
            let up = below.chunks_exact(2).map(|p| merkle::parent(&p[0], &p[1]));
            layers.push(up.collect());
        }
        if layers[self.height as usize][0] != self.expected {
            return None;
        }
        let req = &self.req;
        // Indices within the subtree: the piece's first node at height h is `first >> h`.
        let first = (u64::from(req.index) << req.base) >> self.height << self.height;
        let local = |h: u32, i: u64| (i - (first >> h)) as usize;
        let base = &layers[req.base as usize];
        let start = local(req.base, u64::from(req.index));
        let mut out = base[start..start + req.length as usize].to_vec();
        let top = req.base + req.proof_layers;
        let below_known = uncles(
            &HashRequest {
                proof_layers: top.min(self.height - 1) - req.base,
                ..*req
            },
            0,
            |h, i| layers[h as usize][local(h, i)],
        );
        out.extend(below_known);
        out.extend_from_slice(&self.upper_uncles);
        Some(out)
    }
}

/// The layers of one file's tree from [`SUMMIT`] layers above the piece layer up to the root,
/// from its piece layer: each node there covers `2^SUMMIT` pieces.
#[derive(Debug, Clone)]
pub struct Upper {
    /// The height of `layers[0]`.
    from: u32,
    /// Each layer's nodes up to the last one over any of the file (the rest are pads).
    layers: Vec<Vec<Hash>>,
}

impl Upper {
    /// `None` for a file whose tree does not reach that high (every node is cheap then).
    pub fn build(tree: &FileTree) -> Option<Upper> {
        let from = tree.piece_height() + SUMMIT;
        if !tree.has_layer() || tree.height() < from {
            return None;
        }
        let pad = merkle::pad_root(tree.piece_height());
        let first: Vec<Hash> = tree
            .layer
            .chunks(1 << SUMMIT)
            .map(|c| merkle::root(c, 1 << SUMMIT, pad))
            .collect();
        let mut layers = vec![first];
        let mut pad = merkle::pad_root(from);
        for _ in from..tree.height() {
            let (up, pad_up) = merkle::layer_above(layers.last().expect("one layer"), pad);
            layers.push(up);
            pad = pad_up;
        }
        Some(Upper { from, layers })
    }

    fn node(&self, height: u32, index: u64) -> Option<Hash> {
        let layer = self.layers.get(height.checked_sub(self.from)? as usize)?;
        Some(
            usize::try_from(index)
                .ok()
                .and_then(|i| layer.get(i).copied())
                .unwrap_or_else(|| merkle::pad_root(height)),
        )
    }
}

/// Why a `hashes` message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHashes {
    /// Its fields are no valid request on that file.
    Shape(Refusal),
    /// More or fewer hashes than its fields call for.
    Count { want: usize, got: usize },
    /// The proof reaches no node we know.
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))]
    Unprovable,
    /// The hashes do not hash up to the node we know.
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))]
    Mismatch,
}

/// Checks a `hashes` message's fields and its count of hashes (not the hashes themselves)
/// against the file's tree; returns log2 of its length.
pub fn check_shape(tree: &FileTree, req: &HashRequest, count: usize) -> Result<u32, BadHashes> {
    let k = shape(tree, req).map_err(BadHashes::Shape)?;
    let want = answer_len(req);
    if count != want {
        return Err(BadHashes::Count { want, got: count });
    }
    Ok(k)
}

/// Checks a `hashes` message's fields and hashes against the file's tree: the base hashes
/// with their uncles must hash up to the root (or, for a proof that stops short of it, to
/// the node of the piece layer or above that the torrent gives). Returns the base hashes.
/// (The connection reads past `hashes` it never asked for; this is for the ones it asks for
/// once it fetches layers, and for the fuzz target.)
#[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))]
pub fn verify<'h>(
    tree: &FileTree,
    req: &HashRequest,
    hashes: &'h [Hash],
) -> Result<&'h [Hash], BadHashes> {
    let k = check_shape(tree, req, hashes.len())?;
    let (base, uncles) = hashes.split_at(req.length as usize);
    let mut node = merkle::root(base, base.len(), [0; 32]);
    let mut height = req.base + k;
    let mut index = u64::from(req.index) >> k;
    for uncle in uncles {
        node = if index.is_multiple_of(2) {
            merkle::parent(&node, uncle)
        } else {
            merkle::parent(uncle, &node)
        };
        height += 1;
        index >>= 1;
    }
    let known = if height == tree.height() {
        *tree.root
    } else if height >= tree.piece_height() && tree.has_layer() {
        // At most the file's piece count of hashes: only for proofs we asked for.
        tree.upper_node(None, height, index)
    } else {
        return Err(BadHashes::Unprovable);
    };
    if node == known {
        Ok(base)
    } else {
        Err(BadHashes::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// An independent full tree: every layer, padded, from the data.
    fn full_tree(data: &[u8]) -> Vec<Vec<Hash>> {
        let mut leaves: Vec<Hash> = data
            .chunks(LEAF_LEN)
            .map(|c| Sha256::digest(c).into())
            .collect();
        let width = leaves.len().next_power_of_two();
        leaves.resize(width, [0; 32]);
        let mut layers = vec![leaves];
        while layers.last().unwrap().len() > 1 {
            let up = layers
                .last()
                .unwrap()
                .chunks(2)
                .map(|p| {
                    let mut h = Sha256::new();
                    h.update(p[0]);
                    h.update(p[1]);
                    h.finalize().into()
                })
                .collect();
            layers.push(up);
        }
        layers
    }

    /// The answer by the definition: the base range, then the sibling of each ancestor from
    /// height base + log2(length) to base + proof layers.
    fn expected(tree: &[Vec<Hash>], r: &HashRequest) -> Vec<Hash> {
        let b = r.base as usize;
        let mut out = tree[b][r.index as usize..(r.index + r.length) as usize].to_vec();
        let k = r.length.trailing_zeros();
        for h in r.base + k..=r.base + r.proof_layers {
            let ancestor = (r.index >> (h - r.base)) as usize;
            out.push(tree[h as usize][ancestor ^ 1]);
        }
        out
    }

    struct File {
        data: Vec<u8>,
        tree: Vec<Vec<Hash>>,
        layer: Vec<Hash>,
        lpp: u32,
    }

    impl File {
        fn new(len: usize, lpp: u32) -> File {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 9999) as u8).collect();
            let tree = full_tree(&data);
            let p = lpp.trailing_zeros() as usize;
            let pieces = len.div_ceil(lpp as usize * LEAF_LEN);
            let layer = if pieces > 1 {
                tree[p][..pieces].to_vec()
            } else {
                Vec::new()
            };
            File {
                data,
                tree,
                layer,
                lpp,
            }
        }

        fn tree(&self) -> FileTree<'_> {
            FileTree {
                root: &self.tree.last().unwrap()[0],
                len: self.data.len() as u64,
                layer: &self.layer,
                first_piece: 5,
                leaves_per_piece: self.lpp,
            }
        }

        fn piece_data(&self, piece: u32) -> &[u8] {
            let len = self.lpp as usize * LEAF_LEN;
            let start = piece as usize * len;
            &self.data[start..(start + len).min(self.data.len())]
        }

        /// Our answer, by whichever plan `check` makes.
        fn answer(&self, r: &HashRequest, upper: Option<&Upper>) -> Result<Vec<Hash>, Refusal> {
            let t = self.tree();
            match check(&t, r)? {
                Plan::Layer => Ok(answer_from_layer(&t, upper, r)),
                Plan::Piece { piece } => {
                    let a = PieceAnswer::new(&t, upper, r, piece);
                    assert_eq!(a.piece, t.first_piece + piece);
                    Ok(a.finish(self.piece_data(piece)).expect("the data matches"))
                }
            }
        }
    }

    fn req(base: u32, index: u32, length: u32, proof_layers: u32) -> HashRequest {
        HashRequest {
            root: [0; 32],
            base,
            index,
            length,
            proof_layers,
        }
    }

    /// Every valid request on a few files: what we serve is the definition's answer, and
    /// proves out; what we refuse is refused for a reason that holds.
    #[test]
    fn answers_match_the_definition_and_verify() {
        // 4 leaves a piece. 11 pieces and a bit (tree of 64 leaves), exactly 8 pieces, one
        // piece and a bit, a small file of 3 leaves, one of exactly a piece.
        let sizes = [
            (11 * 4 * LEAF_LEN + 100, 4),
            (32 * LEAF_LEN, 4),
            (4 * LEAF_LEN + 1, 4),
            (3 * LEAF_LEN - 5, 4),
            (4 * LEAF_LEN, 4),
            (9 * LEAF_LEN, 1),
        ];
        for (len, lpp) in sizes {
            let f = File::new(len, lpp);
            let t = f.tree();
            let h = t.height();
            let p = t.piece_height();
            let mut served = 0;
            for base in 0..h {
                for k in 1..=(h - base) {
                    let n = 1u32 << k;
                    for index in (0..1u32 << (h - base)).step_by(n as usize) {
                        for proof in 0..h - base {
                            let r = req(base, index, n, proof);
                            let want = expected(&f.tree, &r);
                            // Proofs that reach the root or the piece layer can be checked.
                            let top = base + k.max(proof + 1);
                            let provable = top == h || (top >= p && !t.layer.is_empty());
                            match f.answer(&r, None) {
                                Ok(got) => {
                                    served += 1;
                                    assert_eq!(got, want, "{len} {lpp} {r:?}");
                                    assert_eq!(got.len(), answer_len(&r));
                                }
                                Err(Refusal::Unsupported) => assert!(base > p),
                                Err(Refusal::NotOnePiece) => {
                                    let d = p.min(h);
                                    let piece = (u64::from(index) << base) >> d;
                                    assert!(base + k > d || piece >= t.pieces(), "{r:?}");
                                }
                                Err(e) => panic!("{r:?} refused: {e:?}"),
                            }
                            // Whether we serve it or not, the definition's answer proves out
                            // when it reaches a node we know.
                            let verdict = verify(&t, &r, &want);
                            if provable {
                                assert_eq!(verdict, Ok(&want[..n as usize]), "{r:?}");
                            } else {
                                assert_eq!(verdict, Err(BadHashes::Unprovable), "{r:?}");
                            }
                        }
                    }
                }
            }
            assert!(served > 0, "{len}");
        }
    }

    #[test]
    fn owned_trees_agree_with_the_independent_tree() {
        for (len, lpp) in [(11 * 4 * LEAF_LEN + 100, 4), (3 * LEAF_LEN - 5, 4), (100, 1)] {
            let f = File::new(len, lpp);
            let owned = OwnedTree::of(&f.data, 5, lpp);
            assert_eq!(owned.root, f.tree.last().unwrap()[0]);
            assert_eq!(owned.layer, f.layer);
            let trees = vec![owned.clone()];
            assert!(trees.file(&owned.root).is_some());
            assert!(trees.file(&[0; 32]).is_none());
        }
    }

    #[test]
    fn upper_layers_give_the_same_answers() {
        // 1,100 pieces of 2 leaves: a tree of 4,096 leaves, 11 layers above the pieces.
        let f = File::new(2 * 1100 * LEAF_LEN - 3, 2);
        let t = f.tree();
        let upper = Upper::build(&t).expect("tall enough");
        assert_eq!(upper.layers.len() as u32, t.height() - t.piece_height() - SUMMIT + 1);
        assert_eq!(upper.layers.last().unwrap(), &vec![*t.root]);
        for (index, n, proof) in [(0, 512, 10), (1024, 512, 10), (1536, 2, 10), (2, 2, 3)] {
            let r = req(1, index, n, proof);
            let with = f.answer(&r, Some(&upper)).unwrap();
            assert_eq!(with, f.answer(&r, None).unwrap());
            assert_eq!(with, expected(&f.tree, &r));
        }
        // Below the piece layer too.
        let r = req(0, 2000, 2, 11);
        assert_eq!(f.answer(&r, Some(&upper)).unwrap(), expected(&f.tree, &r));
        assert!(Upper::build(&File::new(40 * LEAF_LEN, 2).tree()).is_none());
    }

    #[test]
    fn malformed_and_out_of_range_requests_are_refused() {
        // 11 pieces of 4 leaves and a bit: 45 leaves, a tree 6 high, the piece layer at 2.
        let f = File::new(11 * 4 * LEAF_LEN + 100, 4);
        let t = f.tree();
        let refused = |r: HashRequest| check(&t, &r).unwrap_err();
        assert_eq!(refused(req(2, 0, 0, 0)), Refusal::BadLength);
        assert_eq!(refused(req(2, 0, 1, 0)), Refusal::BadLength);
        assert_eq!(refused(req(2, 0, 3, 0)), Refusal::BadLength);
        assert_eq!(refused(req(2, 0, u32::MAX, 0)), Refusal::BadLength);
        assert_eq!(refused(req(2, 0, 1 << 31, 0)), Refusal::BadLength);
        assert_eq!(refused(req(2, 2, 4, 0)), Refusal::Misaligned);
        assert_eq!(refused(req(2, 1, 2, 0)), Refusal::Misaligned);
        // The piece layer is 16 wide (padded): index 16 is past it, 14 + 2 is the end.
        assert_eq!(refused(req(2, 16, 2, 0)), Refusal::OutOfRange);
        assert_eq!(refused(req(2, u32::MAX - 1, 2, 0)), Refusal::OutOfRange);
        assert_eq!(refused(req(2, 0, 32, 0)), Refusal::OutOfRange);
        assert_eq!(check(&t, &req(2, 14, 2, 3)), Ok(Plan::Layer));
        // Proof layers: at most up to the root's children.
        assert_eq!(refused(req(2, 0, 2, 4)), Refusal::OutOfRange);
        assert_eq!(refused(req(2, 0, 2, u32::MAX)), Refusal::OutOfRange);
        // Base layers: the root and above are out of range, between pieces and root unserved.
        assert_eq!(refused(req(6, 0, 2, 0)), Refusal::OutOfRange);
        assert_eq!(refused(req(u32::MAX, 0, 2, 0)), Refusal::OutOfRange);
        assert_eq!(refused(req(3, 0, 2, 0)), Refusal::Unsupported);
        // Below the piece layer: within one piece, and one of the file's.
        assert_eq!(refused(req(0, 0, 8, 0)), Refusal::NotOnePiece);
        assert_eq!(refused(req(1, 0, 4, 0)), Refusal::NotOnePiece);
        assert_eq!(refused(req(0, 48, 4, 0)), Refusal::NotOnePiece);
        assert_eq!(check(&t, &req(0, 44, 4, 5)), Ok(Plan::Piece { piece: 11 }));
        // A file of one leaf has nothing but its root.
        let one = File::new(100, 4);
        assert_eq!(one.tree().height(), 0);
        assert_eq!(check(&one.tree(), &req(0, 0, 2, 0)), Err(Refusal::OutOfRange));
        // Over 512 at the piece layer: 1,100 pieces, 2 leaves each.
        let big = File::new(2 * 1100 * LEAF_LEN, 2);
        assert_eq!(check(&big.tree(), &req(1, 0, 1024, 0)), Err(Refusal::BadLength));
        assert_eq!(check(&big.tree(), &req(1, 0, 512, 0)), Ok(Plan::Layer));
    }

    #[test]
    fn a_piece_that_no_longer_matches_is_not_answered() {
        let f = File::new(11 * 4 * LEAF_LEN + 100, 4);
        let t = f.tree();
        let r = req(0, 8, 4, 5);
        let a = PieceAnswer::new(&t, None, &r, 2);
        let mut data = f.piece_data(2).to_vec();
        assert!(a.finish(&data).is_some());
        data[100] ^= 1;
        assert_eq!(a.finish(&data), None);
        assert_eq!(a.finish(&data[1..]), None, "a short read");
        // The file's last piece is short.
        let last = PieceAnswer::new(&t, None, &req(0, 44, 4, 5), 11);
        assert_eq!(last.len, 100);
        assert_eq!(last.piece, 16);
    }

    #[test]
    fn wrong_hashes_and_counts_are_caught() {
        let f = File::new(11 * 4 * LEAF_LEN + 100, 4);
        let t = f.tree();
        let r = req(2, 4, 4, 3);
        let good = expected(&f.tree, &r);
        assert_eq!(good.len(), 4 + 2);
        assert!(verify(&t, &r, &good).is_ok());
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i][0] ^= 1;
            assert_eq!(verify(&t, &r, &bad), Err(BadHashes::Mismatch), "hash {i}");
        }
        let mut swapped = good.clone();
        swapped.swap(4, 5);
        assert_eq!(verify(&t, &r, &swapped), Err(BadHashes::Mismatch));
        assert_eq!(
            verify(&t, &r, &good[..5]),
            Err(BadHashes::Count { want: 6, got: 5 })
        );
        assert_eq!(
            verify(&t, &req(2, 4, 4, 9), &good),
            Err(BadHashes::Shape(Refusal::OutOfRange))
        );
        // Below the piece layer with too few proof layers to reach it: nothing to check with.
        let low = req(0, 0, 2, 0);
        assert_eq!(
            verify(&t, &low, &expected(&f.tree, &low)),
            Err(BadHashes::Unprovable)
        );
        // Without the piece layer (a magnet's torrent), only the root proves.
        let bare = FileTree { layer: &[], ..t };
        let to_root = req(2, 0, 16, 3);
        assert!(verify(&bare, &to_root, &expected(&f.tree, &to_root)).is_ok());
        assert_eq!(
            verify(&bare, &r, &good[..4 + 1]),
            Err(BadHashes::Count { want: 6, got: 5 })
        );
        let short = req(2, 4, 4, 2);
        assert_eq!(
            verify(&bare, &short, &expected(&f.tree, &short)),
            Err(BadHashes::Unprovable)
        );
    }
}
