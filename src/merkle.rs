//! BEP 52 merkle trees: SHA-256 over 16 KiB leaves, one tree per file.
//!
//! A file's leaves are the SHA-256 of each 16 KiB block (the last one of what is left, not
//! padded). The tree is as wide as the next power of two; leaves beyond the file are 32 zero
//! bytes, so a node over nothing but such leaves is the root of an all-zero subtree
//! ([`pad_root`]). The *piece layer* is the layer whose nodes each cover one piece; a
//! torrent carries it for every file larger than a piece (`piece layers`), and its root is the
//! file's `pieces root`.
//!
//! Pure functions over byte slices, so the checks of `.torrent` files, of pieces and of hash
//! messages from peers all rest on the same few lines, tested here.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The leaf size of every v2 tree.
pub const LEAF_LEN: usize = 16 * 1024;

/// The hash of one leaf's data (up to [`LEAF_LEN`] bytes).
pub fn leaf(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

pub fn parent(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of a subtree `levels` high whose leaves are all zero hashes: what stands in for
/// the nodes of a layer that lie past the end of a file.
pub fn pad_root(levels: u32) -> Hash {
    let mut h = [0u8; 32];
    for _ in 0..levels {
        h = parent(&h, &h);
    }
    h
}

/// The root over `nodes`, the first nodes of a layer `width` wide (a power of two, at least
/// `nodes.len()`), whose missing nodes are `pad` (the root of an all-zero subtree as high as
/// that layer lies above the leaves).
pub fn root(nodes: &[Hash], width: usize, pad: Hash) -> Hash {
    debug_assert!(width.is_power_of_two() && width >= nodes.len());
    let mut layer: Vec<Hash> = nodes.to_vec();
    let mut pad = pad;
    let mut width = width.max(1);
    while width > 1 {
        if layer.len() % 2 == 1 {
            layer.push(pad);
        }
        layer = layer.chunks_exact(2).map(|p| parent(&p[0], &p[1])).collect();
        pad = parent(&pad, &pad);
        width /= 2;
    }
    layer.first().copied().unwrap_or(pad)
}

/// The leaf hashes of `data`, one per started 16 KiB block.
pub fn leaves(data: &[u8]) -> Vec<Hash> {
    data.chunks(LEAF_LEN).map(leaf).collect()
}

/// How many leaves `len` bytes make.
#[allow(dead_code)] // for the hash messages (BEP 52), landing next
pub fn leaf_count(len: u64) -> u64 {
    len.div_ceil(LEAF_LEN as u64)
}

/// The piece-layer node over `data`, one piece of a file (the file's last piece may be
/// shorter), `leaves_per_piece` leaves wide.
pub fn piece_root(data: &[u8], leaves_per_piece: usize) -> Hash {
    root(&leaves(data), leaves_per_piece, [0; 32])
}

/// The `pieces root` of a file no larger than one piece, from all its bytes.
pub fn small_file_root(data: &[u8]) -> Hash {
    let leaves = leaves(data);
    root(&leaves, leaves.len().next_power_of_two(), [0; 32])
}

/// The `pieces root` of a file from its piece layer.
pub fn root_from_layer(layer: &[Hash], leaves_per_piece: usize) -> Hash {
    root(
        layer,
        layer.len().next_power_of_two(),
        pad_root(leaves_per_piece.trailing_zeros()),
    )
}

/// The layer above `nodes` (a layer whose missing nodes are `pad`), and that layer's pad.
#[allow(dead_code)] // for the hash messages (BEP 52), landing next
pub fn layer_above(nodes: &[Hash], pad: Hash) -> (Vec<Hash>, Hash) {
    let up = nodes
        .chunks(2)
        .map(|p| parent(&p[0], p.get(1).unwrap_or(&pad)))
        .collect();
    (up, parent(&pad, &pad))
}

/// Splits `bytes` into 32-byte hashes; `None` unless the length is a multiple of 32.
pub fn split(bytes: &[u8]) -> Option<Vec<Hash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32-byte chunk"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(data: &[u8]) -> Hash {
        Sha256::digest(data).into()
    }

    #[test]
    fn a_small_file_is_its_padded_leaves_root() {
        // 3 leaves: the tree is 4 wide, the fourth leaf is zeros.
        let data = vec![7u8; 2 * LEAF_LEN + 100];
        let l0 = h(&data[..LEAF_LEN]);
        let l1 = h(&data[LEAF_LEN..2 * LEAF_LEN]);
        let l2 = h(&data[2 * LEAF_LEN..]);
        let want = parent(&parent(&l0, &l1), &parent(&l2, &[0; 32]));
        assert_eq!(small_file_root(&data), want);
        // One leaf: the root is the leaf.
        assert_eq!(small_file_root(b"abc"), h(b"abc"));
    }

    #[test]
    fn the_piece_layer_root_pads_with_zero_subtrees() {
        // Pieces of 2 leaves; a file of 5 leaves makes 3 pieces, the last one half empty.
        let data: Vec<u8> = (0..5 * LEAF_LEN).map(|i| (i / 7) as u8).collect();
        let leaves = leaves(&data);
        let layer: Vec<Hash> = data.chunks(2 * LEAF_LEN).map(|p| piece_root(p, 2)).collect();
        assert_eq!(layer[2], parent(&leaves[4], &[0; 32]));
        // The whole tree is 8 leaves wide; computed from the leaves it must agree.
        let full = root(&leaves, 8, [0; 32]);
        assert_eq!(root_from_layer(&layer, 2), full);
        // The fourth piece node is the root of two zero leaves, not zeros.
        let manual = parent(
            &parent(&layer[0], &layer[1]),
            &parent(&layer[2], &parent(&[0; 32], &[0; 32])),
        );
        assert_eq!(full, manual);
    }

    #[test]
    fn layer_above_matches_root() {
        let nodes: Vec<Hash> = (0..5u8).map(|i| h(&[i])).collect();
        let pad = pad_root(1);
        let (up, pad_up) = layer_above(&nodes, pad);
        assert_eq!(up.len(), 3);
        assert_eq!(up[2], parent(&nodes[4], &pad));
        assert_eq!(root(&up, 4, pad_up), root(&nodes, 8, pad));
    }

    #[test]
    fn split_wants_whole_hashes() {
        assert_eq!(split(&[1; 64]).unwrap().len(), 2);
        assert!(split(&[1; 33]).is_none());
        assert!(split(&[]).unwrap().is_empty());
    }
}
