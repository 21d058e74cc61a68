//! Who we upload to: the choking algorithm (BEP 3, as the reference client does it). Pure:
//! the session feeds it a snapshot of its peers every rechoke and applies the answer.
//!
//! - Every rechoke (10 s) the `slots` interested peers that gave us the best download rate over
//!   the last window are unchoked; snubbed peers (unchoked us but sent nothing for 60 s) are
//!   passed over.
//! - When seeding there is no download rate: peers are ranked by our upload rate to them, and
//!   a peer that has held a slot for [`SEED_TURN`] rechokes while others wait goes to the back,
//!   so every peer gets a turn.
//! - One more slot is the optimistic unchoke, rotated every third rechoke (30 s) to a random
//!   interested peer outside the regular set; peers connected in the last minute are three
//!   times as likely to get it, so newcomers soon have something to reciprocate with.

use std::collections::HashSet;

use crate::picker::PeerKey;
use crate::rng::Rng;

/// Rechokes per optimistic rotation (3 × 10 s).
pub const OPTIMISTIC_EVERY: u64 = 3;
/// Consecutive rechokes a seeding slot is held before it yields to waiting peers.
pub const SEED_TURN: u32 = 3;

/// One peer as the choker sees it.
#[derive(Debug, Clone, Copy)]
pub struct PeerView {
    pub key: PeerKey,
    pub interested: bool,
    /// Bytes per second it sent us over the last window.
    pub download_rate: u64,
    /// Bytes per second we sent it over the last window.
    pub upload_rate: u64,
    pub snubbed: bool,
    /// Connected within the last minute.
    pub is_new: bool,
    /// Consecutive rechokes it has been unchoked for (0 if choked now).
    pub unchoked_rounds: u32,
}

pub struct Choker {
    slots: usize,
    optimistic: Option<PeerKey>,
    round: u64,
    rng: Rng,
}

impl Choker {
    pub fn new(slots: usize, seed: u64) -> Choker {
        Choker {
            slots,
            optimistic: None,
            round: 0,
            rng: Rng::new(seed),
        }
    }

    #[cfg(test)]
    pub fn optimistic(&self) -> Option<PeerKey> {
        self.optimistic
    }

    /// Decides the set of peers to have unchoked after this rechoke.
    pub fn rechoke(&mut self, peers: &[PeerView], seeding: bool) -> HashSet<PeerKey> {
        let mut ranked: Vec<&PeerView> = peers
            .iter()
            .filter(|p| p.interested && (seeding || !p.snubbed))
            .collect();
        if seeding {
            // Peers that had their turn go last; then the fastest uploads first.
            ranked.sort_by_key(|p| {
                (
                    p.unchoked_rounds >= SEED_TURN,
                    std::cmp::Reverse(p.upload_rate),
                )
            });
        } else {
            ranked.sort_by_key(|p| std::cmp::Reverse(p.download_rate));
        }
        let mut unchoke: HashSet<PeerKey> = ranked.iter().take(self.slots).map(|p| p.key).collect();

        let rotate = self.round.is_multiple_of(OPTIMISTIC_EVERY)
            || self
                .optimistic
                .is_none_or(|o| !peers.iter().any(|p| p.key == o && p.interested));
        self.round += 1;
        if rotate {
            self.optimistic = self.pick_optimistic(peers, &unchoke);
        }
        if let Some(o) = self.optimistic {
            if unchoke.contains(&o) {
                // It earned a regular slot; give the optimistic one to someone else.
                self.optimistic = self.pick_optimistic(peers, &unchoke);
            }
            if let Some(o) = self.optimistic {
                unchoke.insert(o);
            }
        }
        unchoke
    }

    fn pick_optimistic(
        &mut self,
        peers: &[PeerView],
        regular: &HashSet<PeerKey>,
    ) -> Option<PeerKey> {
        let pool: Vec<&PeerView> = peers
            .iter()
            .filter(|p| p.interested && !regular.contains(&p.key))
            .collect();
        let total: u64 = pool.iter().map(|p| if p.is_new { 3 } else { 1 }).sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.rng.below(total);
        for p in pool {
            let w = if p.is_new { 3 } else { 1 };
            if ticket < w {
                return Some(p.key);
            }
            ticket -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(k: u64, down: u64, up: u64) -> PeerView {
        PeerView {
            key: PeerKey(k),
            interested: true,
            download_rate: down,
            upload_rate: up,
            snubbed: false,
            is_new: false,
            unchoked_rounds: 0,
        }
    }

    #[test]
    fn leeching_unchokes_the_best_uploaders_plus_one_optimistic() {
        let mut peers: Vec<PeerView> = (1..=8).map(|k| view(k, k * 100, 0)).collect();
        peers[7].interested = false; // the fastest, but not interested
        let mut c = Choker::new(4, 1);
        let set = c.rechoke(&peers, false);
        for k in [7, 6, 5, 4] {
            assert!(set.contains(&PeerKey(k)), "{k} is among the best");
        }
        assert!(
            !set.contains(&PeerKey(8)),
            "uninterested peers are not unchoked"
        );
        assert_eq!(set.len(), 5, "four regular slots and one optimistic");
        let o = c.optimistic().unwrap();
        assert!([1, 2, 3].contains(&o.0));
    }

    #[test]
    fn snubbed_peers_lose_regular_slots() {
        let mut peers: Vec<PeerView> = (1..=5).map(|k| view(k, k * 100, 0)).collect();
        peers[4].snubbed = true;
        let mut c = Choker::new(4, 1);
        let set = c.rechoke(&peers, false);
        assert!([1, 2, 3, 4].iter().all(|k| set.contains(&PeerKey(*k))));
        // Peer 5 can only be there as the optimistic unchoke.
        assert_eq!(
            set.contains(&PeerKey(5)),
            c.optimistic() == Some(PeerKey(5))
        );
    }

    #[test]
    fn optimistic_rotates_every_third_rechoke() {
        let peers: Vec<PeerView> = (1..=20)
            .map(|k| view(k, if k <= 4 { 1000 } else { 0 }, 0))
            .collect();
        let mut c = Choker::new(4, 9);
        let mut picks = Vec::new();
        for _ in 0..30 {
            c.rechoke(&peers, false);
            picks.push(c.optimistic().unwrap());
        }
        for chunk in picks.chunks(3) {
            assert!(
                chunk.iter().all(|p| *p == chunk[0]),
                "held for 30 s: {picks:?}"
            );
        }
        let distinct: HashSet<_> = picks.iter().collect();
        assert!(distinct.len() > 3, "it rotates: {picks:?}");
    }

    #[test]
    fn new_peers_are_three_times_as_likely() {
        let mut peers: Vec<PeerView> = (1..=2).map(|k| view(k, 0, 0)).collect();
        peers[0].is_new = true;
        let mut new_wins = 0;
        for seed in 0..4000 {
            let mut c = Choker::new(0, seed);
            c.rechoke(&peers, false);
            if c.optimistic() == Some(PeerKey(1)) {
                new_wins += 1;
            }
        }
        // Expect 3000 of 4000.
        assert!((2700..3300).contains(&new_wins), "{new_wins}");
    }

    #[test]
    fn seeding_ranks_by_upload_and_rotates_turns() {
        let mut peers: Vec<PeerView> = (1..=6).map(|k| view(k, 0, k * 100)).collect();
        let mut c = Choker::new(2, 3);
        let set = c.rechoke(&peers, true);
        assert!(set.contains(&PeerKey(6)) && set.contains(&PeerKey(5)));
        // 6 and 5 have had their turn: others come first now.
        peers[5].unchoked_rounds = SEED_TURN;
        peers[4].unchoked_rounds = SEED_TURN;
        let set = c.rechoke(&peers, true);
        assert!(
            set.contains(&PeerKey(4)) && set.contains(&PeerKey(3)),
            "{set:?}"
        );
        // Snubbing means nothing when we only upload.
        peers[3].snubbed = true;
        assert!(c.rechoke(&peers, true).contains(&PeerKey(4)));
    }

    #[test]
    fn nobody_interested_means_nobody_unchoked() {
        let mut peers: Vec<PeerView> = (1..=3).map(|k| view(k, 5, 5)).collect();
        for p in &mut peers {
            p.interested = false;
        }
        let mut c = Choker::new(4, 1);
        assert!(c.rechoke(&peers, false).is_empty());
        assert_eq!(c.optimistic(), None);
    }
}
