//! Fetching a v2 torrent's piece layers from peers (BEP 52 `hash request`), for a magnet link:
//! its info dictionary names each file's `pieces root` but carries no layers, and without a
//! file's layer its pieces cannot be checked one by one.
//!
//! Pure: the session says which peers can answer and passes their answers in; this plans the
//! requests and checks every answer's proof up to the file's root before keeping it. Requests
//! are chunks of up to 512 nodes of the piece layer, with the uncles that take them to the
//! root, at most [`PER_PEER`] in flight per peer; a rejected or late chunk goes to another peer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::hash_msg::{self, BadHashes, FileTree};
use crate::merkle::{self, Hash};
use crate::metainfo::V2;
use crate::picker::PeerKey;
use crate::wire::HashRequest;

/// Nodes per request (BEP 52: "Length SHOULD NOT be greater than 512").
const CHUNK: u32 = 512;
/// Requests in flight per peer (libtorrent's own figure).
const PER_PEER: usize = 2;
/// A request unanswered this long goes to another peer.
pub const PATIENCE: Duration = Duration::from_secs(10);

struct Want {
    root: Hash,
    len: u64,
    first_piece: u32,
    pieces: u32,
    /// Per chunk: the nodes, once proven.
    chunks: Vec<Option<Vec<Hash>>>,
}

#[derive(Default)]
pub struct LayerFetch {
    wants: Vec<Want>,
    leaves_per_piece: u32,
    /// (file, chunk) → (peer, sent at).
    in_flight: HashMap<(usize, u32), (PeerKey, Instant)>,
    /// Peers that rejected a file's chunk: not asked for that file again.
    refused: HashSet<(PeerKey, usize)>,
}

impl LayerFetch {
    /// What `v2` still lacks: the layer of every file larger than a piece that has none.
    pub fn new(v2: &V2) -> LayerFetch {
        let piece_len = v2.piece_len();
        let wants = v2
            .files
            .iter()
            .filter(|f| f.needs_layer(piece_len) && f.layer.is_empty())
            .map(|f| {
                let pieces = f.piece_count(piece_len);
                Want {
                    root: f.root,
                    len: f.len,
                    first_piece: f.first_piece,
                    pieces,
                    chunks: vec![None; pieces.div_ceil(CHUNK) as usize],
                }
            })
            .collect();
        LayerFetch {
            wants,
            leaves_per_piece: v2.leaves_per_piece(),
            ..LayerFetch::default()
        }
    }

    pub fn is_done(&self) -> bool {
        self.wants
            .iter()
            .all(|w| w.chunks.iter().all(Option::is_some))
    }

    fn tree<'a>(&self, w: &'a Want) -> FileTree<'a> {
        FileTree {
            root: &w.root,
            len: w.len,
            layer: &[],
            first_piece: w.first_piece,
            leaves_per_piece: self.leaves_per_piece,
        }
    }

    fn request(&self, w: &Want, chunk: u32) -> HashRequest {
        let tree = self.tree(w);
        let base = tree.piece_height();
        // The piece layer, padded to a power of two, is `width` nodes wide.
        let width = 1u32 << (tree.height() - base);
        HashRequest {
            root: w.root,
            base,
            index: chunk * CHUNK,
            length: width.min(CHUNK),
            // Uncles up to just below the root (which we know).
            proof_layers: tree.height() - base - 1,
        }
    }

    /// The next request for `peer`, if it has room and something is left to ask.
    pub fn next_request(&mut self, peer: PeerKey, now: Instant) -> Option<HashRequest> {
        let busy = self.in_flight.values().filter(|(p, _)| *p == peer).count();
        if busy >= PER_PEER {
            return None;
        }
        for (f, w) in self.wants.iter().enumerate() {
            if self.refused.contains(&(peer, f)) {
                continue;
            }
            for (c, have) in w.chunks.iter().enumerate() {
                let c = c as u32;
                if have.is_some() || self.in_flight.contains_key(&(f, c)) {
                    continue;
                }
                self.in_flight.insert((f, c), (peer, now));
                return Some(self.request(w, c));
            }
        }
        None
    }

    fn find(&self, req: &HashRequest) -> Option<(usize, u32)> {
        let f = self.wants.iter().position(|w| w.root == req.root)?;
        let chunk = req.index / CHUNK;
        (req.index.is_multiple_of(CHUNK) && *req == self.request(&self.wants[f], chunk))
            .then_some((f, chunk))
    }

    /// `peer` answered `req`. Unasked answers are ignored (`Ok(None)`); an answer that does not
    /// prove out is the peer's fault. When it completes a file's layer, returns the file's
    /// root and layer.
    pub fn on_hashes(
        &mut self,
        peer: PeerKey,
        req: &HashRequest,
        hashes: &[Hash],
    ) -> Result<Option<(Hash, Vec<Hash>)>, BadHashes> {
        let Some((f, chunk)) = self.find(req) else {
            return Ok(None);
        };
        if self.in_flight.get(&(f, chunk)).is_none_or(|(p, _)| *p != peer) {
            return Ok(None);
        }
        self.in_flight.remove(&(f, chunk));
        let w = &self.wants[f];
        let nodes = hash_msg::verify(&self.tree(w), req, hashes)?;
        // Keep the nodes of real pieces only (the rest pad the layer to a power of two).
        let first = (chunk * CHUNK) as usize;
        let real = (w.pieces as usize).saturating_sub(first).min(nodes.len());
        let nodes = nodes[..real].to_vec();
        let w = &mut self.wants[f];
        w.chunks[chunk as usize] = Some(nodes);
        if !w.chunks.iter().all(Option::is_some) {
            return Ok(None);
        }
        let layer: Vec<Hash> = w.chunks.iter().flatten().flatten().copied().collect();
        debug_assert_eq!(
            merkle::root_from_layer(&layer, self.leaves_per_piece as usize),
            w.root
        );
        Ok(Some((w.root, layer)))
    }

    /// `peer` will not serve `req`: someone else is asked.
    pub fn on_reject(&mut self, peer: PeerKey, req: &HashRequest) {
        if let Some((f, chunk)) = self.find(req)
            && self
                .in_flight
                .get(&(f, chunk))
                .is_some_and(|(p, _)| *p == peer)
        {
            self.in_flight.remove(&(f, chunk));
            self.refused.insert((peer, f));
        }
    }

    /// `peer` is gone: its requests go back.
    pub fn forget(&mut self, peer: PeerKey) {
        self.in_flight.retain(|_, (p, _)| *p != peer);
    }

    /// Requests older than [`PATIENCE`] go back; their peers are not asked for that file
    /// again.
    pub fn expire(&mut self, now: Instant) {
        let late: Vec<((usize, u32), PeerKey)> = self
            .in_flight
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) >= PATIENCE)
            .map(|(k, (p, _))| (*k, *p))
            .collect();
        for ((f, c), p) in late {
            self.in_flight.remove(&(f, c));
            self.refused.insert((p, f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_msg::OwnedTree;
    use crate::metainfo::Metainfo;

    /// A v2-only single-file torrent of `data` in 16 KiB pieces, from its info dict alone
    /// (no layers, as from a magnet link).
    fn magnet_torrent(data: &[u8]) -> (Metainfo, OwnedTree) {
        let tree = OwnedTree::of(data, 0, 1);
        let mut info = format!(
            "d9:file treed4:filed0:d6:lengthi{}e11:pieces root32:",
            data.len()
        )
        .into_bytes();
        info.extend_from_slice(&tree.root);
        info.extend_from_slice(b"eee12:meta versioni2e4:name4:file12:piece lengthi16384ee");
        (Metainfo::from_info(&info).unwrap(), tree)
    }

    /// Answers `req` from the whole tree, as an honest peer would.
    fn answer(tree: &OwnedTree, req: &HashRequest) -> Vec<Hash> {
        hash_msg::answer_from_layer(&tree.view(), None, req)
    }

    #[test]
    fn layers_are_fetched_in_proven_chunks_from_several_peers() {
        // 1,300 pieces: three chunks of up to 512.
        let data: Vec<u8> = (0..1300 * 16384u32).map(|i| (i / 4099) as u8).collect();
        let (mut meta, tree) = magnet_torrent(&data);
        let v2 = meta.v2.as_mut().unwrap();
        assert!(!v2.layers_complete());
        let mut lf = LayerFetch::new(v2);
        let now = Instant::now();
        let (a, b) = (PeerKey(1), PeerKey(2));
        let r1 = lf.next_request(a, now).unwrap();
        let r2 = lf.next_request(a, now).unwrap();
        assert!(lf.next_request(a, now).is_none(), "two in flight per peer");
        let r3 = lf.next_request(b, now).unwrap();
        assert_eq!((r1.index, r2.index, r3.index), (0, 512, 1024));
        assert_eq!((r1.length, r1.base), (512, 0));
        // A peer answering another's request is ignored; a wrong proof is refused.
        assert_eq!(lf.on_hashes(b, &r1, &answer(&tree, &r1)), Ok(None));
        let mut bad = answer(&tree, &r2);
        bad[3][0] ^= 1;
        assert!(lf.on_hashes(a, &r2, &bad).is_err());
        assert_eq!(lf.on_hashes(a, &r1, &answer(&tree, &r1)), Ok(None));
        // The refused chunk is asked again.
        let again = lf.next_request(b, now).unwrap();
        assert_eq!(again.index, 512);
        assert_eq!(lf.on_hashes(b, &r3, &answer(&tree, &r3)), Ok(None));
        let (root, layer) = lf
            .on_hashes(b, &again, &answer(&tree, &again))
            .unwrap()
            .unwrap();
        assert!(lf.is_done());
        assert_eq!(layer.len(), 1300);
        assert!(v2.offer_layer(&root, layer));
        assert!(v2.layers_complete());
    }

    #[test]
    fn rejected_and_late_requests_go_to_other_peers() {
        let data = vec![7u8; 5 * 16384];
        let (meta, _) = magnet_torrent(&data);
        let mut lf = LayerFetch::new(meta.v2.as_ref().unwrap());
        let now = Instant::now();
        let (a, b, c) = (PeerKey(1), PeerKey(2), PeerKey(3));
        let r = lf.next_request(a, now).unwrap();
        assert_eq!(
            (r.length, r.proof_layers),
            (8, 2),
            "the whole layer, padded"
        );
        lf.on_reject(a, &r);
        assert!(lf.next_request(a, now).is_none(), "a refused file");
        let r = lf.next_request(b, now).unwrap();
        lf.expire(now + PATIENCE);
        assert!(lf.next_request(b, now + PATIENCE).is_none());
        assert_eq!(lf.next_request(c, now + PATIENCE), Some(r));
        lf.forget(c);
        assert!(!lf.is_done());
    }
}
