//! Which block to ask which peer for: the piece picker. Pure state, no I/O, no channels; the
//! session thread owns the one instance and feeds it events.
//!
//! # Invariants
//! - A piece is in exactly one of: *had* (`have[p]`, hash verified), *active* (in `active`,
//!   some blocks requested or received), or *untouched* (neither). `untouched` counts the
//!   untouched pieces that are *wanted* (file selection); unwanted pieces are never active.
//! - The torrent is complete for us when every wanted piece is had (`missing == 0`).
//! - In an active piece each block is `Missing`, `Requested` by one or more peers (more than
//!   one only in endgame), or `Received` (written to storage, with the peer that sent it).
//! - A block is in a peer's `outstanding` set iff that block is `Requested` and lists the peer.
//! - A peer's block is taken only if its reader wrote it into storage, which it does only for
//!   blocks it asked that peer for (and only while the block is free: see `storage::Claim`):
//!   nobody can inject data into a piece they were not asked for, so a hash failure blames
//!   only peers we chose.
//! - An active piece whose blocks are all `Received` is `hashing`: none of its blocks is
//!   handed out until the hash result comes back ([`Picker::piece_verified`] /
//!   [`Picker::piece_failed`]). `hashing` counts those pieces.
//! - `availability[p]` is the number of connected peers that have piece `p`.
//!
//! # Policy
//! Rarest first, ties broken at random, except the first few pieces, which are picked at random
//! so a new peer soon has something to trade. Started pieces are finished before new ones.
//! Endgame starts once no block is left unrequested: a peer may then ask for blocks already
//! requested from others, and the first copy to arrive wins (the caller cancels the rest).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::geometry::{BLOCK_LEN, BlockRef, Geometry, PieceIndex};

/// Identifies one connection for the session's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub u64);

/// How many pieces to pick at random before switching to rarest first.
const RANDOM_FIRST: u32 = 4;
/// In endgame, how many peers may be asked for the same block.
const ENDGAME_REQUESTERS: usize = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
enum BlockState {
    Missing,
    Requested(Vec<PeerKey>),
    Received(PeerKey),
}

#[derive(Debug)]
struct Active {
    blocks: Vec<BlockState>,
    received: u32,
    hashing: bool,
}

#[derive(Debug, Default)]
struct PeerState {
    has: Vec<bool>,
    has_count: u32,
    /// Pieces this peer has that we want and lack: the peer is interesting iff non-zero.
    wanted: u32,
    outstanding: HashSet<BlockRef>,
    /// Blocks once asked of this peer whose request a choke, cancel or timeout voided: the
    /// peer may still send them and they are taken. Anything else it sends is unrequested,
    /// so a stranger cannot slip bad blocks into pieces and get honest senders banned.
    voided: HashSet<BlockRef>,
}

impl PeerState {
    /// Remembers voided requests, within a bound: past it the memory starts afresh (a late
    /// block from before then counts as unrequested, which is only a nuisance).
    fn void(&mut self, blocks: &[BlockRef]) {
        if self.voided.len() + blocks.len() > MAX_VOIDED {
            self.voided.clear();
        }
        self.voided.extend(blocks.iter().copied());
    }
}

const MAX_VOIDED: usize = 4096;

/// What happened to a block a peer sent.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    /// New data: write it. If `piece_complete`, hash the piece next. `cancel` lists the other
    /// peers that were asked for the same block (endgame).
    Accepted {
        piece_complete: bool,
        cancel: Vec<PeerKey>,
    },
    /// We already have this block (a late endgame duplicate): drop it.
    Duplicate,
    /// Nobody asked this peer for it (also when we have its piece: a seeder asks for
    /// nothing), or its piece is not being downloaded.
    Unrequested,
}

pub struct Picker {
    geometry: Geometry,
    have: Vec<bool>,
    have_count: u32,
    /// Pieces we want (file selection); the others are never picked.
    wanted: Vec<bool>,
    /// Wanted pieces not yet had.
    missing: u32,
    /// Streaming: only pieces in `[start, start + len)` are started, lowest first.
    window: Option<(u32, u32)>,
    availability: Vec<u32>,
    active: BTreeMap<PieceIndex, Active>,
    untouched: u32,
    hashing: u32,
    peers: HashMap<PeerKey, PeerState>,
    rng: crate::rng::Rng,
    /// Test-only: pieces walked by whole-bitfield updates, to show repeats cost nothing.
    #[cfg(test)]
    walked: u64,
}

impl Picker {
    #[cfg(any(test, feature = "fuzz"))]
    pub fn new(geometry: Geometry, have: Vec<bool>, seed: u64) -> Picker {
        let n = geometry.piece_count() as usize;
        Picker::with_wanted(geometry, have, vec![true; n], seed)
    }

    /// A picker that fetches only the pieces flagged in `wanted`.
    pub fn with_wanted(
        geometry: Geometry,
        have: Vec<bool>,
        wanted: Vec<bool>,
        seed: u64,
    ) -> Picker {
        let n = geometry.piece_count() as usize;
        assert_eq!(have.len(), n, "one have flag per piece");
        assert_eq!(wanted.len(), n, "one wanted flag per piece");
        let have_count = have.iter().filter(|h| **h).count() as u32;
        let missing = (0..n).filter(|&i| wanted[i] && !have[i]).count() as u32;
        Picker {
            have_count,
            untouched: missing,
            hashing: 0,
            missing,
            window: None,
            wanted,
            availability: vec![0; n],
            active: BTreeMap::new(),
            peers: HashMap::new(),
            rng: crate::rng::Rng::new(seed),
            have,
            geometry,
            #[cfg(test)]
            walked: 0,
        }
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }
    #[cfg(test)]
    pub fn have(&self, piece: PieceIndex) -> bool {
        self.have[piece.usize()]
    }
    pub fn have_count(&self) -> u32 {
        self.have_count
    }
    /// Every wanted piece is had.
    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// Every piece of the torrent is had (we are a seed).
    pub fn is_seed(&self) -> bool {
        self.have_count == self.geometry.piece_count()
    }

    /// Streaming: start only pieces in `[start, start + len)`, lowest index first.
    pub fn set_window(&mut self, start: u32, len: u32) {
        self.window = Some((start, len));
    }
    pub fn have_flags(&self) -> &[bool] {
        &self.have
    }

    /// Bytes still missing (not verified).
    pub fn bytes_left(&self) -> u64 {
        self.geometry
            .pieces()
            .filter(|p| !self.have[p.usize()] && self.wanted[p.usize()])
            .map(|p| u64::from(self.geometry.piece_len(p)))
            .sum()
    }

    pub fn add_peer(&mut self, peer: PeerKey) {
        let n = self.geometry.piece_count() as usize;
        self.peers.insert(
            peer,
            PeerState {
                has: vec![false; n],
                ..PeerState::default()
            },
        );
    }

    /// Records that `peer` has `piece`. Returns true if that makes the peer newly interesting.
    pub fn peer_has(&mut self, peer: PeerKey, piece: PieceIndex) -> bool {
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        if p.has[piece.usize()] {
            return false;
        }
        p.has[piece.usize()] = true;
        p.has_count += 1;
        self.availability[piece.usize()] += 1;
        let wanted = !self.have[piece.usize()] && self.wanted[piece.usize()];
        if wanted {
            p.wanted += 1;
        }
        wanted
    }

    /// Records a whole bitfield. Bits must already be validated. Walks the pieces only while
    /// the peer is not known to have them all, so a repeat from a seed costs nothing (the
    /// reader refuses a second bitfield anyway).
    pub fn peer_has_bits(&mut self, peer: PeerKey, bits: &[u8]) {
        if self.peer_is_seed(peer) {
            return;
        }
        for p in self.geometry.pieces() {
            let i = p.usize();
            if bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0) {
                self.peer_has(peer, p);
            }
        }
        #[cfg(test)]
        {
            self.walked += u64::from(self.geometry.piece_count());
        }
    }

    /// Records that the peer has everything: a walk over the pieces the first time, nothing
    /// after that.
    pub fn peer_has_all(&mut self, peer: PeerKey) {
        if self.peer_is_seed(peer) {
            return;
        }
        for p in self.geometry.pieces() {
            self.peer_has(peer, p);
        }
        #[cfg(test)]
        {
            self.walked += u64::from(self.geometry.piece_count());
        }
    }

    pub fn peer_is_seed(&self, peer: PeerKey) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.has_count == self.geometry.piece_count())
    }

    /// Whether `peer` has any piece we still want.
    pub fn is_interesting(&self, peer: PeerKey) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.wanted > 0)
    }

    /// Complete pieces waiting for their hash result.
    pub fn pieces_hashing(&self) -> usize {
        self.hashing as usize
    }

    pub fn outstanding(&self, peer: PeerKey) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.outstanding.len())
    }

    /// Hands `peer` up to `max` blocks to request.
    pub fn assign(&mut self, peer: PeerKey, max: usize) -> Vec<BlockRef> {
        self.assign_filtered(peer, max, &|_| true)
    }

    /// Like [`Picker::assign`], limited to pieces `allow` accepts (BEP 6 allowed-fast pieces
    /// while choked).
    pub fn assign_filtered(
        &mut self,
        peer: PeerKey,
        max: usize,
        allow: &dyn Fn(PieceIndex) -> bool,
    ) -> Vec<BlockRef> {
        let mut out = Vec::new();
        if !self.peers.contains_key(&peer) || max == 0 {
            return out;
        }
        // 1. Finish what is started (only pieces with a block nobody was asked for: with many
        // peers, most started pieces are fully requested, and this runs per refill).
        let has = &self.peers[&peer].has;
        let started: Vec<PieceIndex> = self
            .active
            .iter()
            .filter(|(p, a)| {
                !a.hashing
                    && has[p.usize()]
                    && a.blocks.contains(&BlockState::Missing)
                    && allow(**p)
            })
            .map(|(p, _)| *p)
            .collect();
        for piece in started {
            self.take_missing(peer, piece, max, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        // 2. Start new pieces.
        while out.len() < max {
            let Some(piece) = self.choose_new_piece(peer, allow) else {
                break;
            };
            self.start(piece);
            self.take_missing(peer, piece, max, &mut out);
        }
        // 3. Endgame: nothing left unrequested anywhere.
        if out.len() < max && self.nothing_to_start() && !self.any_missing() {
            self.take_endgame(peer, max, allow, &mut out);
        }
        out
    }

    /// Web seeds: up to `max` blocks for `peer` (about; whole pieces) as one run of
    /// consecutive untouched pieces, taken from the largest gap of untouched pieces it may
    /// have (`allow`): from the gap's start when the piece before it is not being fetched,
    /// else from its middle, so connections working side by side do not run into each other.
    /// Peers keep picking rarest first among the pieces left. With nothing left to start, the
    /// missing blocks of started pieces, then endgame copies, as for a peer.
    pub fn assign_run(
        &mut self,
        peer: PeerKey,
        max: usize,
        allow: &dyn Fn(PieceIndex) -> bool,
    ) -> Vec<BlockRef> {
        let mut out = Vec::new();
        if !self.peers.contains_key(&peer) || max == 0 {
            return out;
        }
        if self.window.is_some() {
            // Streaming: the window's order wins over long runs.
            return self.assign_filtered(peer, max, allow);
        }
        if let Some((start, len)) = self.largest_gap(peer, allow) {
            let per_piece = self.geometry.nominal_piece_len().div_ceil(BLOCK_LEN) as usize;
            let pieces = max.div_ceil(per_piece).max(1) as u32;
            let bordered = start > 0
                && self
                    .geometry
                    .piece(start - 1)
                    .is_some_and(|p| self.active.contains_key(&p));
            let first = if bordered && len > 2 * pieces {
                start + len / 2
            } else {
                start
            };
            let end = (first + pieces).min(start + len);
            for i in first..end {
                let piece = self.geometry.piece(i).expect("inside the gap");
                self.start(piece);
                self.take_missing(peer, piece, usize::MAX, &mut out);
            }
            return out;
        }
        let started: Vec<PieceIndex> = self
            .active
            .iter()
            .filter(|(p, a)| !a.hashing && self.peers[&peer].has[p.usize()] && allow(**p))
            .map(|(p, _)| *p)
            .collect();
        for piece in started {
            self.take_missing(peer, piece, max, &mut out);
            if out.len() >= max {
                return out;
            }
        }
        if out.is_empty() && self.nothing_to_start() && !self.any_missing() {
            // A connection reads its run front to back: copies are taken from the back, a
            // piece's worth at most, so the two copies meet instead of racing all the way.
            // Without the cap on requesters: other connections of a stalled server must not
            // be the two that keep everyone else off a block.
            let per_piece = self.geometry.nominal_piece_len().div_ceil(BLOCK_LEN) as usize;
            self.take_endgame_from_end(peer, max.min(per_piece), allow, &mut out);
            out.reverse();
        }
        out
    }

    fn take_endgame_from_end(
        &mut self,
        peer: PeerKey,
        max: usize,
        allow: &dyn Fn(PieceIndex) -> bool,
        out: &mut Vec<BlockRef>,
    ) {
        let state = self.peers.get_mut(&peer).expect("checked by caller");
        for (piece, active) in self.active.iter_mut().rev() {
            if active.hashing || !state.has[piece.usize()] || !allow(*piece) {
                continue;
            }
            for (i, b) in active.blocks.iter_mut().enumerate().rev() {
                if out.len() >= max {
                    return;
                }
                if let BlockState::Requested(who) = b
                    && !who.contains(&peer)
                {
                    who.push(peer);
                    let block = self
                        .geometry
                        .block(*piece, i as u32)
                        .expect("block index within piece");
                    state.outstanding.insert(block);
                    out.push(block);
                }
            }
        }
    }

    /// The longest stretch of consecutive pieces that are wanted, neither had nor started,
    /// held by `peer` and allowed: (first piece, length). The earliest among equals.
    fn largest_gap(
        &self,
        peer: PeerKey,
        allow: &dyn Fn(PieceIndex) -> bool,
    ) -> Option<(u32, u32)> {
        if self.untouched == 0 {
            return None;
        }
        let has = &self.peers[&peer].has;
        let mut best: Option<(u32, u32)> = None;
        let mut run: Option<(u32, u32)> = None;
        for piece in self.geometry.pieces() {
            let i = piece.usize();
            let free = self.wanted[i]
                && !self.have[i]
                && has[i]
                && !self.active.contains_key(&piece)
                && allow(piece);
            run = match (free, run) {
                (true, Some((s, l))) => Some((s, l + 1)),
                (true, None) => Some((piece.get(), 1)),
                (false, _) => None,
            };
            if let Some((s, l)) = run
                && best.is_none_or(|(_, bl)| l > bl)
            {
                best = Some((s, l));
            }
        }
        best
    }

    /// No wanted piece is left to start (within the window, when streaming).
    fn nothing_to_start(&self) -> bool {
        match self.window {
            None => self.untouched == 0,
            Some((start, len)) => {
                (start..start.saturating_add(len).min(self.geometry.piece_count())).all(|i| {
                    let i = i as usize;
                    self.have[i]
                        || !self.wanted[i]
                        || self
                            .geometry
                            .piece(i as u32)
                            .is_some_and(|p| self.active.contains_key(&p))
                })
            }
        }
    }

    fn any_missing(&self) -> bool {
        self.active
            .values()
            .any(|a| a.blocks.contains(&BlockState::Missing))
    }

    fn start(&mut self, piece: PieceIndex) {
        let n = self.geometry.blocks_in(piece) as usize;
        self.active.insert(
            piece,
            Active {
                blocks: vec![BlockState::Missing; n],
                received: 0,
                hashing: false,
            },
        );
        self.untouched -= 1;
    }

    fn take_missing(
        &mut self,
        peer: PeerKey,
        piece: PieceIndex,
        max: usize,
        out: &mut Vec<BlockRef>,
    ) {
        let Some(active) = self.active.get_mut(&piece) else {
            return;
        };
        let state = self.peers.get_mut(&peer).expect("checked by caller");
        for (i, b) in active.blocks.iter_mut().enumerate() {
            if out.len() >= max {
                break;
            }
            if *b == BlockState::Missing {
                let block = self
                    .geometry
                    .block(piece, i as u32)
                    .expect("block index within piece");
                *b = BlockState::Requested(vec![peer]);
                state.outstanding.insert(block);
                out.push(block);
            }
        }
    }

    fn take_endgame(
        &mut self,
        peer: PeerKey,
        max: usize,
        allow: &dyn Fn(PieceIndex) -> bool,
        out: &mut Vec<BlockRef>,
    ) {
        let state = self.peers.get_mut(&peer).expect("checked by caller");
        for (piece, active) in self.active.iter_mut() {
            if active.hashing || !state.has[piece.usize()] || !allow(*piece) {
                continue;
            }
            for (i, b) in active.blocks.iter_mut().enumerate() {
                if out.len() >= max {
                    return;
                }
                if let BlockState::Requested(who) = b
                    && !who.contains(&peer)
                    && who.len() < ENDGAME_REQUESTERS
                {
                    who.push(peer);
                    let block = self
                        .geometry
                        .block(*piece, i as u32)
                        .expect("block index within piece");
                    state.outstanding.insert(block);
                    out.push(block);
                }
            }
        }
    }

    /// Rarest untouched piece the peer has; random among equals (and entirely random for the
    /// first few pieces).
    fn choose_new_piece(
        &mut self,
        peer: PeerKey,
        allow: &dyn Fn(PieceIndex) -> bool,
    ) -> Option<PieceIndex> {
        if self.untouched == 0 {
            return None;
        }
        let has = &self.peers[&peer].has;
        let n = self.geometry.piece_count() as usize;
        if let Some((start, len)) = self.window {
            let end = (start as usize).saturating_add(len as usize).min(n);
            return (start as usize..end)
                .filter(|&i| !self.have[i] && self.wanted[i] && has[i])
                .filter_map(|i| self.geometry.piece(i as u32))
                .find(|p| !self.active.contains_key(p) && allow(*p));
        }
        let random_phase = self.have_count + (self.active.len() as u32) < RANDOM_FIRST;
        let start = self.rng.below(n as u64) as usize;
        let mut best: Option<(u32, usize)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if self.have[i] || !self.wanted[i] || !has[i] {
                continue;
            }
            let piece = self
                .geometry
                .piece(i as u32)
                .expect("index below piece count");
            if self.active.contains_key(&piece) || !allow(piece) {
                continue;
            }
            if random_phase {
                return Some(piece);
            }
            let avail = self.availability[i];
            if best.is_none_or(|(a, _)| avail < a) {
                best = Some((avail, i));
                if avail <= 1 {
                    break;
                }
            }
        }
        best.and_then(|(_, i)| self.geometry.piece(i as u32))
    }

    /// A block arrived from `peer`; `written` says whether its reader wrote it into storage
    /// (it holds a claim only for blocks it asked for, and only while the block is free).
    ///
    /// A written block is taken whatever our bookkeeping says of the request (cancelled,
    /// voided by a choke, or its piece forgotten after a failed hash): the bytes are in place,
    /// the piece hash decides, and the sender answers for them. A block that was not written
    /// is dropped, and its request, if still open, goes back to the pool.
    pub fn block_received(
        &mut self,
        peer: PeerKey,
        block: BlockRef,
        written: bool,
    ) -> BlockOutcome {
        let Some(state) = self.peers.get_mut(&peer) else {
            return BlockOutcome::Unrequested;
        };
        let outstanding = state.outstanding.remove(&block);
        let asked = outstanding || state.voided.remove(&block);
        let i = block.piece.usize();
        if self.have[i] {
            // A late copy of what we asked for, or (a seeder asks for nothing) a block pushed
            // at us: the caller counts those against the peer.
            return if asked {
                BlockOutcome::Duplicate
            } else {
                BlockOutcome::Unrequested
            };
        }
        if !written {
            if outstanding {
                state.void(&[block]);
                self.release(peer, block);
            }
            let received = self.active.get(&block.piece).is_some_and(|a| {
                matches!(
                    a.blocks[block.index_in_piece() as usize],
                    BlockState::Received(_)
                )
            });
            return if asked || received {
                BlockOutcome::Duplicate
            } else {
                BlockOutcome::Unrequested
            };
        }
        if !self.wanted[i] {
            // Unwanted pieces are never claimable; nothing to record.
            return BlockOutcome::Duplicate;
        }
        if !self.active.contains_key(&block.piece) {
            self.start(block.piece);
        }
        let active = self.active.get_mut(&block.piece).expect("started above");
        let slot = &mut active.blocks[block.index_in_piece() as usize];
        if matches!(slot, BlockState::Received(_)) {
            return BlockOutcome::Duplicate;
        }
        let cancel: Vec<PeerKey> = match std::mem::replace(slot, BlockState::Received(peer)) {
            BlockState::Requested(who) => who.into_iter().filter(|p| *p != peer).collect(),
            _ => Vec::new(),
        };
        for other in &cancel {
            if let Some(s) = self.peers.get_mut(other) {
                // Our cancel may cross its answer on the wire.
                if s.outstanding.remove(&block) {
                    s.void(&[block]);
                }
            }
        }
        active.received += 1;
        let piece_complete = active.received as usize == active.blocks.len();
        if piece_complete {
            active.hashing = true;
            self.hashing += 1;
        }
        BlockOutcome::Accepted {
            piece_complete,
            cancel,
        }
    }

    /// The piece's hash matched. Returns the peers that this made uninteresting (they have
    /// nothing more we want).
    pub fn piece_verified(&mut self, piece: PieceIndex) -> Vec<PeerKey> {
        let Some(active) = self.active.remove(&piece) else {
            return Vec::new();
        };
        self.hashing -= u32::from(active.hashing);
        self.have[piece.usize()] = true;
        self.have_count += 1;
        if self.wanted[piece.usize()] {
            self.missing -= 1;
        }
        let mut done = Vec::new();
        for (key, p) in &mut self.peers {
            if p.has[piece.usize()] && self.wanted[piece.usize()] {
                p.wanted -= 1;
                if p.wanted == 0 {
                    done.push(*key);
                }
            }
        }
        done
    }

    /// The piece's hash failed: its blocks are forgotten and it is untouched again. Returns the
    /// peers that sent its blocks, each with how many.
    pub fn piece_failed(&mut self, piece: PieceIndex) -> Vec<(PeerKey, u32)> {
        let Some(active) = self.active.remove(&piece) else {
            return Vec::new();
        };
        self.hashing -= u32::from(active.hashing);
        self.untouched += 1;
        let mut senders: BTreeMap<PeerKey, u32> = BTreeMap::new();
        for b in active.blocks {
            if let BlockState::Received(p) = b {
                *senders.entry(p).or_default() += 1;
            }
        }
        senders.into_iter().collect()
    }

    /// The peer choked us: everything it was asked for goes back to the pool.
    pub fn peer_choked(&mut self, peer: PeerKey) -> Vec<BlockRef> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Vec::new();
        };
        let blocks: Vec<BlockRef> = state.outstanding.drain().collect();
        state.void(&blocks);
        for b in &blocks {
            self.release(peer, *b);
        }
        blocks
    }

    /// The peer rejected one request (BEP 6) or we cancelled it. Returns whether the request
    /// was still open (a reject of a request we had cancelled is only its acknowledgement).
    pub fn request_dropped(&mut self, peer: PeerKey, block: BlockRef) -> bool {
        let open = self.peers.get_mut(&peer).is_some_and(|s| {
            let was = s.outstanding.remove(&block);
            if was {
                s.void(&[block]);
            }
            was
        });
        if open {
            self.release(peer, block);
        }
        open
    }

    pub fn remove_peer(&mut self, peer: PeerKey) {
        self.peer_choked(peer);
        if let Some(state) = self.peers.remove(&peer) {
            for (i, h) in state.has.iter().enumerate() {
                if *h {
                    self.availability[i] -= 1;
                }
            }
        }
    }

    fn release(&mut self, peer: PeerKey, block: BlockRef) {
        let Some(active) = self.active.get_mut(&block.piece) else {
            return;
        };
        let slot = &mut active.blocks[block.index_in_piece() as usize];
        if let BlockState::Requested(who) = slot {
            who.retain(|p| *p != peer);
            if who.is_empty() {
                *slot = BlockState::Missing;
            }
        }
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let untouched = (0..self.have.len())
            .filter(|&i| {
                self.wanted[i]
                    && !self.have[i]
                    && !self
                        .active
                        .contains_key(&self.geometry.piece(i as u32).unwrap())
            })
            .count() as u32;
        assert_eq!(untouched, self.untouched);
        let hashing = self.active.values().filter(|a| a.hashing).count();
        assert_eq!(hashing, self.pieces_hashing());
        for (key, state) in &self.peers {
            for b in &state.outstanding {
                let a = &self.active[&b.piece];
                match &a.blocks[b.index_in_piece() as usize] {
                    BlockState::Requested(who) => assert!(who.contains(key)),
                    other => panic!("outstanding block {b:?} is {other:?}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: PeerKey = PeerKey(1);
    const B: PeerKey = PeerKey(2);

    fn picker(pieces: u64) -> Picker {
        // Pieces of two blocks each.
        let g = Geometry::new(32 * 1024, &[pieces * 32 * 1024], pieces).unwrap();
        Picker::new(g, vec![false; pieces as usize], 7)
    }

    /// A picker with one peer, A, that has everything.
    fn one_seed(pieces: u64) -> Picker {
        let mut p = picker(pieces);
        p.add_peer(A);
        p.peer_has_all(A);
        p
    }

    /// A picker with two peers, A and B, that have everything.
    fn two_seeds(pieces: u64) -> Picker {
        let mut p = picker(pieces);
        for peer in [A, B] {
            p.add_peer(peer);
            p.peer_has_all(peer);
        }
        p
    }

    fn receive_all(p: &mut Picker, peer: PeerKey, blocks: &[BlockRef]) -> Vec<PieceIndex> {
        let mut complete = Vec::new();
        for b in blocks {
            if let BlockOutcome::Accepted {
                piece_complete: true,
                ..
            } = p.block_received(peer, *b, true)
            {
                complete.push(b.piece);
            }
        }
        complete
    }

    #[test]
    fn assigns_only_pieces_the_peer_has() {
        let mut p = picker(8);
        p.add_peer(A);
        assert!(p.assign(A, 10).is_empty());
        let piece = p.geometry().piece(5).unwrap();
        assert!(p.peer_has(A, piece));
        let got = p.assign(A, 10);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|b| b.piece == piece));
        p.check_invariants();
    }

    #[test]
    fn rarest_first_after_the_random_start() {
        let mut p = picker(12);
        let peers: Vec<PeerKey> = (1..=4).map(PeerKey).collect();
        for &k in &peers {
            p.add_peer(k);
        }
        // Piece 9 is held by one peer, everything else by all four.
        for &k in &peers {
            for i in 0..12 {
                if i != 9 || k == A {
                    p.peer_has(k, p.geometry().piece(i).unwrap());
                }
            }
        }
        // Use up the random phase: four pieces fetched and verified.
        for _ in 0..4 {
            let blocks = p.assign(B, 2);
            for piece in receive_all(&mut p, B, &blocks) {
                p.piece_verified(piece);
            }
            assert!(p.is_interesting(A));
        }
        let next = p.assign(A, 2);
        if !p.have(p.geometry().piece(9).unwrap()) {
            assert_eq!(next[0].piece.get(), 9, "rarest piece first");
        }
        p.check_invariants();
    }

    #[test]
    fn filtered_assignment_stays_inside_the_filter() {
        let mut p = one_seed(6);
        let only = p.geometry().piece(4).unwrap();
        let got = p.assign_filtered(A, 10, &|piece| piece == only);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|b| b.piece == only));
        p.check_invariants();
    }

    #[test]
    fn unwanted_pieces_are_never_picked_and_do_not_block_completion() {
        let g = Geometry::new(32 * 1024, &[4 * 32 * 1024], 4).unwrap();
        let mut p = Picker::with_wanted(g, vec![false; 4], vec![false, true, false, true], 1);
        p.add_peer(A);
        p.peer_has_all(A);
        assert_eq!(p.bytes_left(), 2 * 32 * 1024);
        let got = p.assign(A, 100);
        assert!(got.iter().all(|b| b.piece.get() == 1 || b.piece.get() == 3));
        for c in receive_all(&mut p, A, &got) {
            p.piece_verified(c);
        }
        assert!(p.is_complete());
        assert!(!p.is_seed());
        p.check_invariants();
    }

    #[test]
    fn streaming_window_fetches_in_order() {
        let mut p = one_seed(10);
        p.set_window(2, 3);
        let got = p.assign(A, 100);
        let pieces: Vec<u32> = got.iter().map(|b| b.piece.get()).collect();
        assert_eq!(
            pieces,
            vec![2, 2, 3, 3, 4, 4],
            "in order, inside the window only"
        );
        // The window is full of requested blocks: a second peer gets endgame copies.
        p.add_peer(B);
        p.peer_has_all(B);
        assert!(!p.assign(B, 2).is_empty());
        p.check_invariants();
    }

    #[test]
    fn finishes_started_pieces_before_new_ones() {
        let mut p = two_seeds(4);
        let first = p.assign(A, 1);
        let second = p.assign(B, 1);
        assert_eq!(first[0].piece, second[0].piece);
        assert_ne!(first[0], second[0]);
    }

    #[test]
    fn block_in_piece_ok_and_piece_bad() {
        let mut p = one_seed(2);
        let blocks = p.assign(A, 2);
        let piece = blocks[0].piece;
        assert_eq!(
            p.block_received(A, blocks[0], true),
            BlockOutcome::Accepted {
                piece_complete: false,
                cancel: vec![]
            }
        );
        assert_eq!(
            p.block_received(A, blocks[0], false),
            BlockOutcome::Duplicate
        );
        assert_eq!(
            p.block_received(A, blocks[1], true),
            BlockOutcome::Accepted {
                piece_complete: true,
                cancel: vec![]
            }
        );
        // While hashing, nothing of that piece is handed out again.
        assert_eq!(p.pieces_hashing(), 1);
        let other = p.assign(A, 10);
        assert!(other.iter().all(|b| b.piece != piece));
        for c in receive_all(&mut p, A, &other) {
            p.piece_verified(c);
        }
        assert_eq!(p.pieces_hashing(), 1);
        assert_eq!(p.piece_failed(piece), vec![(A, 2)]);
        assert_eq!(p.pieces_hashing(), 0);
        p.check_invariants();
        let again: Vec<_> = p.assign(A, 10);
        assert!(
            again.iter().any(|b| b.piece == piece),
            "refetched after failure"
        );
        let mut bored = Vec::new();
        for c in receive_all(&mut p, A, &again) {
            bored.extend(p.piece_verified(c));
        }
        assert!(p.is_complete());
        assert_eq!(bored, vec![A], "A has nothing more to give");
        assert!(!p.is_interesting(A));
        assert_eq!(p.bytes_left(), 0);
    }

    #[test]
    fn choke_and_gone_return_blocks() {
        let mut p = two_seeds(4);
        let a = p.assign(A, 4);
        assert_eq!(a.len(), 4);
        assert!(p.assign(B, 4).len() <= 4);
        assert_eq!(p.peer_choked(A).len(), 4);
        assert_eq!(p.outstanding(A), 0);
        p.check_invariants();
        let b = p.assign(B, 4);
        assert!(!b.is_empty(), "A's blocks went back to the pool");
        p.remove_peer(B);
        p.check_invariants();
        assert_eq!(p.assign(A, 4).len(), 4);
        // A late block from a removed peer is not accepted.
        assert_eq!(p.block_received(B, b[0], false), BlockOutcome::Unrequested);
    }

    #[test]
    fn blocks_are_taken_only_from_peers_that_were_asked() {
        let mut p = two_seeds(4);
        let a = p.assign(A, 2);
        // B was never asked for A's blocks: its copy (good or poisoned) is refused.
        assert_eq!(p.block_received(B, a[0], false), BlockOutcome::Unrequested);
        // A choke voids A's requests, but A's late answers are still taken.
        p.peer_choked(A);
        assert!(matches!(
            p.block_received(A, a[0], true),
            BlockOutcome::Accepted { .. }
        ));
        // A rejected request that is answered after all is also taken, once.
        let again = p.assign(A, 1);
        assert!(p.request_dropped(A, again[0]), "an open request");
        assert!(
            !p.request_dropped(A, again[0]),
            "a second reject (or one acknowledging a cancel) drops nothing"
        );
        assert!(matches!(
            p.block_received(A, again[0], true),
            BlockOutcome::Accepted { .. }
        ));
        p.check_invariants();
    }

    #[test]
    fn unwritten_blocks_go_back_to_the_pool_and_written_ones_revive_a_failed_piece() {
        let mut p = one_seed(1);
        let a = p.assign(A, 2);
        // A's reader could not write the block (say another copy was being written): the
        // request is open again and nothing is counted.
        assert_eq!(p.block_received(A, a[0], false), BlockOutcome::Duplicate);
        assert_eq!(p.outstanding(A), 1);
        assert_eq!(p.assign(A, 2), vec![a[0]]);
        for b in &a {
            p.block_received(A, *b, true);
        }
        let piece = a[0].piece;
        assert_eq!(p.piece_failed(piece), vec![(A, 2)]);
        // A late block of the forgotten piece that A's reader did write is recorded, so the
        // piece is active again and only its other block is handed out.
        assert!(matches!(
            p.block_received(A, a[1], true),
            BlockOutcome::Accepted {
                piece_complete: false,
                ..
            }
        ));
        assert_eq!(p.assign(A, 2), vec![a[0]]);
        p.check_invariants();
    }

    #[test]
    fn repeated_have_all_and_bitfields_walk_the_pieces_once() {
        let mut p = picker(1000);
        p.add_peer(A);
        p.peer_has_all(A);
        assert_eq!(p.walked, 1000);
        for _ in 0..10_000 {
            p.peer_has_all(A);
            p.peer_has_bits(A, &[0xff; 125]);
        }
        assert_eq!(p.walked, 1000, "repeats cost nothing");
        assert!(p.peer_is_seed(A));
        assert_eq!(p.availability.iter().sum::<u32>(), 1000, "counted once");
        // A bitfield that makes a peer a seed ends the walks too.
        p.add_peer(B);
        p.peer_has_bits(B, &[0xff; 125]);
        p.peer_has_all(B);
        assert_eq!(p.walked, 2000);
        assert_eq!(p.availability.iter().sum::<u32>(), 2000);
        p.check_invariants();
    }

    #[test]
    fn unasked_blocks_of_pieces_we_have_are_unrequested_so_a_seeder_counts_them() {
        let g = Geometry::new(32 * 1024, &[4 * 32 * 1024], 4).unwrap();
        let mut seeder = Picker::new(g.clone(), vec![true; 4], 3);
        seeder.add_peer(A);
        let b = g.block(g.piece(2).unwrap(), 1).unwrap();
        assert_eq!(seeder.block_received(A, b, false), BlockOutcome::Unrequested);

        // A downloader: a block asked of A and B in endgame, B's copy first. A's late copy
        // after the piece verified is a duplicate; the same block from a stranger is not.
        let mut p = two_seeds(1);
        p.add_peer(PeerKey(3));
        let a = p.assign(A, 2);
        assert_eq!(p.assign(B, 2), a);
        for x in &a {
            p.block_received(B, *x, true);
        }
        p.piece_verified(a[0].piece);
        assert_eq!(p.block_received(A, a[0], false), BlockOutcome::Duplicate);
        assert_eq!(
            p.block_received(PeerKey(3), a[0], false),
            BlockOutcome::Unrequested
        );
        p.check_invariants();
    }

    #[test]
    fn endgame_duplicates_and_cancels() {
        let mut p = two_seeds(1);
        let a = p.assign(A, 10);
        assert_eq!(a.len(), 2);
        // Everything is requested: B gets the same blocks (endgame).
        let b = p.assign(B, 10);
        assert_eq!(b, a);
        assert_eq!(
            p.block_received(B, b[0], true),
            BlockOutcome::Accepted {
                piece_complete: false,
                cancel: vec![A]
            }
        );
        assert_eq!(p.outstanding(A), 1);
        // A's copy arrives late after the cancel: dropped.
        assert_eq!(p.block_received(A, a[0], false), BlockOutcome::Duplicate);
        assert_eq!(
            p.block_received(A, a[1], true),
            BlockOutcome::Accepted {
                piece_complete: true,
                cancel: vec![B]
            }
        );
        p.check_invariants();
    }

    fn pieces_of(blocks: &[BlockRef]) -> Vec<u32> {
        let mut v: Vec<u32> = blocks.iter().map(|b| b.piece.get()).collect();
        v.dedup();
        v
    }

    #[test]
    fn web_seed_runs_are_long_consecutive_and_side_by_side_runs_start_mid_gap() {
        let mut p = two_seeds(64);
        // 8 pieces of two blocks each.
        let first = p.assign_run(A, 16, &|_| true);
        assert_eq!(pieces_of(&first), (0..8).collect::<Vec<_>>());
        assert!(first.len() == 16);
        // The gap after it borders a started piece: the next run starts in its middle.
        let second = p.assign_run(B, 16, &|_| true);
        assert_eq!(pieces_of(&second), (36..44).collect::<Vec<_>>());
        p.check_invariants();
        // Once the first run is verified, its connection carries on right after it.
        for piece in receive_all(&mut p, A, &first) {
            p.piece_verified(piece);
        }
        let third = p.assign_run(A, 16, &|_| true);
        assert_eq!(pieces_of(&third)[0], 8);
        p.check_invariants();
    }

    #[test]
    fn web_seed_runs_never_overlap_peer_claims_and_respect_the_filter() {
        let mut p = two_seeds(16);
        // Peer B picks a few pieces at random (rarest first among equals).
        let peer_blocks = p.assign(B, 8);
        let peer_pieces = pieces_of(&peer_blocks);
        let run = p.assign_run(A, 64, &|piece| piece.get() != 15);
        assert!(!run.is_empty());
        for b in &run {
            assert!(!peer_pieces.contains(&b.piece.get()), "{b:?}");
            assert_ne!(b.piece.get(), 15);
        }
        assert!(run.iter().all(|b| !peer_blocks.contains(b)));
        p.check_invariants();
    }

    #[test]
    fn web_seeds_finish_started_pieces_then_share_the_endgame() {
        let mut p = two_seeds(2);
        let peer = p.assign(B, 1);
        assert_eq!(peer.len(), 1);
        // The untouched piece first, then the started piece's missing block.
        let run = p.assign_run(A, 64, &|_| true);
        let started = peer[0].piece;
        assert!(run.iter().all(|b| b.piece != started));
        let rest = p.assign_run(A, 64, &|_| true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].piece, started);
        // Nothing left unrequested: endgame copies of B's block.
        let endgame = p.assign_run(A, 64, &|_| true);
        assert_eq!(endgame, peer);
        p.check_invariants();
    }
}
