//! The peer table's pure core: which addresses to dial and when, which are held by live
//! connections, which are banned, and which of two connections to one peer survives. No
//! sockets and no clock of its own (the caller passes `now`), so every rule is unit-tested.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Dial failures (no handshake) after which an address no longer counts as a hope (see
/// `has_candidates`). It is still retried, at the longest back-off: a peer that was down for a
/// while, or kept busy by an attacker, is not lost for good.
pub(super) const MAX_DIAL_FAILURES: u32 = 5;
/// The longest pause between two dials of an address that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Pause before redialling a peer whose established connection ended.
pub(super) const REDIAL_AFTER: Duration = Duration::from_secs(30);
/// Back-off after the first failed dial; it doubles with each failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// Bans and hopeless addresses remembered at most (each needs a connection to earn).
const MAX_BANS: usize = 4096;
/// Candidates kept at most: a flood of tracker or peer-source addresses must not grow memory.
pub(super) const MAX_CANDIDATES: usize = 4096;
/// Of the candidates, at most this many learnt by peer exchange: however many peers a flood
/// of PEX messages names, the queue keeps room for the trackers' and the user's.
pub(super) const MAX_PEX_CANDIDATES: usize = 256;

/// How a connection ended, as far as redialling its address is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ended {
    /// We dialled it (inbound peers are not ours to redial: their address is ephemeral).
    pub outbound: bool,
    /// The handshake completed.
    pub handshaken: bool,
    /// We closed it (pruned, duplicate, banned).
    pub dropped_by_us: bool,
    /// It broke the protocol, or can never be of use (a peer on another torrent, ourselves):
    /// never dialled again.
    pub never_again: bool,
    /// Our download is complete and so was the peer's: nothing to exchange, not redialled.
    pub complete: bool,
}

#[derive(Debug, Default)]
pub(super) struct PeerTable {
    candidates: VecDeque<SocketAddr>,
    /// Addresses held by live connections (dialled, or learnt as an inbound peer's listening
    /// address), with how many connections hold each: never dialled while held.
    held: HashMap<SocketAddr, u32>,
    /// Past dial failures: count and when to try again.
    failures: HashMap<SocketAddr, (u32, Instant)>,
    /// Peer ids banned, each only on the IP address it misbehaved from: an id is a claim
    /// anyone can copy, so it must never ban a connection from elsewhere.
    banned_ids: HashSet<(IpAddr, [u8; 20])>,
    banned_addrs: HashSet<SocketAddr>,
    /// Addresses that broke the protocol.
    violators: HashSet<SocketAddr>,
    /// Our own listening addresses: dialling them would connect to ourselves.
    own: Vec<SocketAddr>,
    /// Candidates queued from peer exchange (a superset: those that left the queue are
    /// forgotten when the next PEX addresses come).
    from_pex: HashSet<SocketAddr>,
}

impl PeerTable {
    pub fn new(own: Vec<SocketAddr>, candidates: &[SocketAddr]) -> PeerTable {
        let mut t = PeerTable {
            own,
            ..PeerTable::default()
        };
        t.add(candidates.iter().copied());
        t
    }

    /// New candidate addresses (from a tracker, `--peer`, the embedder): queued unless
    /// ours, held, banned or queued already.
    pub fn add(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for addr in addrs {
            if self.candidates.len() >= MAX_CANDIDATES {
                break;
            }
            if !self.own.contains(&addr)
                && !self.is_held(addr)
                && !self.is_banned(addr)
                && !self.candidates.contains(&addr)
            {
                self.candidates.push_back(addr);
            }
        }
    }

    /// Candidates from peer exchange: as [`add`](PeerTable::add), while fewer than
    /// [`MAX_PEX_CANDIDATES`] of the queue came this way.
    pub fn add_from_pex(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let queued: HashSet<SocketAddr> = self.candidates.iter().copied().collect();
        self.from_pex.retain(|a| queued.contains(a));
        for addr in addrs {
            if self.from_pex.len() >= MAX_PEX_CANDIDATES {
                break;
            }
            let before = self.candidates.len();
            self.add([addr]);
            if self.candidates.len() > before {
                self.from_pex.insert(addr);
            }
        }
    }

    /// Addresses a peer said are gone: dropped from the queue if peer exchange alone put them
    /// there.
    pub fn forget_from_pex(&mut self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for addr in addrs {
            if self.from_pex.remove(&addr) {
                self.candidates.retain(|c| *c != addr);
            }
        }
    }

    /// Whether any queued address may still answer: one that has not failed
    /// [`MAX_DIAL_FAILURES`] times in a row.
    pub fn has_candidates(&self) -> bool {
        self.candidates
            .iter()
            .any(|a| self.failures.get(a).is_none_or(|f| f.0 < MAX_DIAL_FAILURES))
    }

    /// Up to `room` addresses to dial now, each held from here on. Those in back-off, or
    /// that `allow` refuses for now (a per-host cap), stay queued; banned or held ones are
    /// dropped from the queue.
    pub fn take_dialable(
        &mut self,
        room: usize,
        now: Instant,
        mut allow: impl FnMut(SocketAddr) -> bool,
    ) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        let mut deferred = Vec::new();
        while out.len() < room {
            let Some(addr) = self.candidates.pop_front() else {
                break;
            };
            if self.is_held(addr) || self.is_banned(addr) {
                continue;
            }
            if self.in_backoff(addr, now) || !allow(addr) {
                deferred.push(addr);
            } else {
                self.hold(addr);
                out.push(addr);
            }
        }
        self.candidates.extend(deferred);
        out
    }

    fn in_backoff(&self, addr: SocketAddr, now: Instant) -> bool {
        self.failures.get(&addr).is_some_and(|f| f.1 > now)
    }

    /// Whether some candidate could be dialled now.
    pub fn has_dialable(&self, now: Instant) -> bool {
        self.candidates
            .iter()
            .any(|a| !self.is_held(*a) && !self.is_banned(*a) && !self.in_backoff(*a, now))
    }

    pub fn is_held(&self, addr: SocketAddr) -> bool {
        self.held.contains_key(&addr)
    }

    /// A live connection holds `addr` (its own address, or the one it listens on).
    pub fn hold(&mut self, addr: SocketAddr) {
        *self.held.entry(addr).or_insert(0) += 1;
        self.candidates.retain(|c| *c != addr);
    }

    /// A connection no longer holds `addr`.
    pub fn release(&mut self, addr: SocketAddr) {
        if let Some(n) = self.held.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&addr);
            }
        }
    }

    pub fn is_banned(&self, addr: SocketAddr) -> bool {
        self.banned_addrs.contains(&addr) || self.violators.contains(&addr)
    }

    /// Whether a connection from `addr` that handshook with `id` is banned.
    pub fn is_banned_id(&self, addr: SocketAddr, id: &[u8; 20]) -> bool {
        self.banned_ids.contains(&(addr.ip(), *id))
    }

    /// Bans an address, and the id it handshook with on that IP: never dialled or accepted
    /// again.
    pub fn ban(&mut self, addr: SocketAddr, id: Option<[u8; 20]>) {
        // Bounded: past the cap a ban still ends the connection, it is just not remembered.
        if self.banned_addrs.len() < MAX_BANS {
            self.banned_addrs.insert(addr);
        }
        if self.banned_ids.len() < MAX_BANS {
            self.banned_ids.extend(id.map(|id| (addr.ip(), id)));
        }
        self.candidates.retain(|c| *c != addr);
    }

    /// A handshake succeeded: its past failures are forgiven.
    pub fn connected(&mut self, addr: SocketAddr) {
        self.failures.remove(&addr);
    }

    /// A connection to `addr` ended (the caller has released the addresses it held).
    /// Queues the address again when that is worth it.
    pub fn ended(&mut self, addr: SocketAddr, how: Ended, now: Instant) {
        if how.never_again {
            if self.violators.len() < MAX_BANS {
                self.violators.insert(addr);
            }
            self.candidates.retain(|c| *c != addr);
            return;
        }
        if !how.outbound || how.dropped_by_us || self.is_banned(addr) || self.is_held(addr) {
            return;
        }
        if !how.handshaken {
            // Never got through: retry later, a few times, waiting longer each time.
            let entry = self.failures.entry(addr).or_insert((0, now));
            entry.0 += 1;
            entry.1 = now + (FIRST_BACKOFF * (1 << (entry.0 - 1).min(6))).min(MAX_BACKOFF);
            self.candidates.push_back(addr);
        } else if !how.complete && !self.candidates.contains(&addr) {
            // A working peer that went away (restarted, or a network blip) may come back:
            // try it again after a pause, without counting it as a failure.
            let n = self.failures.get(&addr).map_or(0, |f| f.0);
            self.failures.insert(addr, (n, now + REDIAL_AFTER));
            self.candidates.push_back(addr);
        }
    }
}

/// Of two connections between the same pair of peers, both ends keep the one opened by the
/// side with the larger peer id, so they agree without talking about it.
pub(super) fn keep_outbound(our_id: &[u8; 20], their_id: &[u8; 20]) -> bool {
    our_id > their_id
}

/// Whether two connections that handshook with the same peer id are one peer connected
/// twice. Only from the same IP: an id is a claim anyone can copy, and a copy from elsewhere
/// must not evict (or hide) the peer it imitates.
pub(super) fn are_twins(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip()
}

/// Which of two connections to the same peer id survives: the new one (`true`) or the one
/// there before. Opposite directions follow [`keep_outbound`]; two of the same direction
/// (two addresses of one peer) keep the older.
pub(super) fn keep_new_twin(
    our_id: &[u8; 20],
    their_id: &[u8; 20],
    new_outbound: bool,
    old_outbound: bool,
) -> bool {
    new_outbound != old_outbound && new_outbound == keep_outbound(our_id, their_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 2], port))
    }

    const FAILED_DIAL: Ended = Ended {
        outbound: true,
        handshaken: false,
        dropped_by_us: false,
        never_again: false,
        complete: false,
    };
    const LEFT: Ended = Ended {
        handshaken: true,
        ..FAILED_DIAL
    };

    /// A table that dialled `a` (the only candidate) and saw the connection end `how`.
    fn dialled_and_ended(a: SocketAddr, how: Ended, now: Instant) -> PeerTable {
        let mut t = PeerTable::new(vec![], &[a]);
        assert_eq!(t.take_dialable(1, now, |_| true), vec![a]);
        if how.handshaken {
            t.connected(a);
        }
        t.release(a);
        t.ended(a, how, now);
        t
    }

    #[test]
    fn only_connections_from_one_ip_can_be_twins() {
        assert!(are_twins(addr(1), addr(2)), "one host, two connections");
        let other = SocketAddr::from(([127, 0, 0, 9], 1));
        assert!(!are_twins(addr(1), other), "a copied id from elsewhere");
        let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 1));
        assert!(!are_twins(addr(1), v6));
    }

    #[test]
    fn duplicate_tie_break_is_the_same_on_both_ends() {
        let a = [1u8; 20];
        let b = [2u8; 20];
        // Each end keeps its outbound connection iff its id is larger: exactly one end's
        // outbound (the same TCP connection) survives.
        assert_ne!(keep_outbound(&a, &b), keep_outbound(&b, &a));
        assert!(keep_outbound(&b, &a));
        // The new connection is our outbound one at a, their inbound one at b.
        let at_a = keep_new_twin(&a, &b, true, false);
        let at_b = keep_new_twin(&b, &a, false, true);
        assert_eq!(at_a, at_b, "both ends keep the same TCP connection");
        assert!(!at_a, "the larger id (b) keeps its own outbound connection");
        // Same direction twice: the older stays, whoever is larger.
        assert!(!keep_new_twin(&a, &b, true, true));
        assert!(!keep_new_twin(&b, &a, false, false));
    }

    #[test]
    fn candidates_skip_our_own_held_banned_and_queued_addresses() {
        let own = addr(1);
        let mut t = PeerTable::new(vec![own], &[addr(2), addr(2), own]);
        t.hold(addr(3));
        t.ban(addr(4), None);
        t.add([addr(3), addr(4), addr(5), addr(2)]);
        let now = Instant::now();
        assert_eq!(t.take_dialable(10, now, |_| true), vec![addr(2), addr(5)]);
        assert!(t.is_held(addr(2)) && t.is_held(addr(5)));
        assert!(!t.has_candidates());
    }

    #[test]
    fn addresses_refused_for_now_stay_queued() {
        let other = SocketAddr::from(([127, 0, 0, 9], 1));
        let mut t = PeerTable::new(vec![], &[addr(2), addr(3), other]);
        let now = Instant::now();
        assert!(t.has_dialable(now));
        // At most one connection to 127.0.0.2.
        let mut seen = 0;
        let first = t.take_dialable(10, now, |a| {
            if a.ip() == addr(2).ip() {
                seen += 1;
                seen <= 1
            } else {
                true
            }
        });
        assert_eq!(first, vec![addr(2), other]);
        assert!(t.has_candidates(), "the refused one waits");
        assert_eq!(t.take_dialable(10, now, |_| true), vec![addr(3)]);
        assert!(!t.has_dialable(now));
    }

    #[test]
    fn dialling_respects_the_room_given() {
        let mut t = PeerTable::new(vec![], &[addr(2), addr(3), addr(4)]);
        let now = Instant::now();
        assert_eq!(t.take_dialable(2, now, |_| true), vec![addr(2), addr(3)]);
        assert_eq!(t.take_dialable(0, now, |_| true), vec![]);
        assert_eq!(t.take_dialable(5, now, |_| true), vec![addr(4)]);
    }

    #[test]
    fn failed_dials_back_off_longer_each_time_and_never_for_good() {
        let start = Instant::now();
        let mut t = PeerTable::new(vec![], &[addr(2)]);
        let mut now = start;
        let mut waits = Vec::new();
        for _ in 0..MAX_DIAL_FAILURES {
            assert_eq!(t.take_dialable(1, now, |_| true), vec![addr(2)]);
            t.release(addr(2));
            t.ended(addr(2), FAILED_DIAL, now);
            assert!(
                t.take_dialable(1, now, |_| true).is_empty(),
                "in back-off right after failing"
            );
            let retry = t.failures[&addr(2)].1;
            waits.push(retry - now);
            now = retry;
        }
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert!(waits.iter().all(|w| *w <= MAX_BACKOFF), "{waits:?}");
        assert!(
            !t.has_candidates(),
            "after {MAX_DIAL_FAILURES} failures it is no longer a hope"
        );
        assert_eq!(
            t.take_dialable(1, now, |_| true),
            vec![addr(2)],
            "but it is still tried, at the longest back-off"
        );
        // A handshake in between forgives the failures.
        let mut t = dialled_and_ended(addr(3), FAILED_DIAL, start);
        t.connected(addr(3));
        assert!(!t.failures.contains_key(&addr(3)));
    }

    #[test]
    fn a_peer_that_left_is_redialled_after_a_pause_unless_we_are_complete() {
        let now = Instant::now();
        let mut t = dialled_and_ended(addr(2), LEFT, now);
        assert!(t.take_dialable(1, now, |_| true).is_empty());
        assert!(
            t.take_dialable(1, now + REDIAL_AFTER - Duration::from_millis(1), |_| true)
                .is_empty()
        );
        assert_eq!(
            t.take_dialable(1, now + REDIAL_AFTER, |_| true),
            vec![addr(2)]
        );

        let complete = Ended {
            complete: true,
            ..LEFT
        };
        let seed = dialled_and_ended(addr(3), complete, now);
        assert!(!seed.has_candidates(), "a seed redials nobody");
    }

    #[test]
    fn a_protocol_violator_is_never_redialled_nor_requeued() {
        let now = Instant::now();
        let violation = Ended {
            never_again: true,
            ..LEFT
        };
        let mut t = dialled_and_ended(addr(2), violation, now);
        assert!(!t.has_candidates());
        t.add([addr(2)]);
        assert!(
            !t.has_candidates(),
            "a tracker naming it again changes nothing"
        );
        assert!(
            t.take_dialable(1, now + Duration::from_secs(1 << 20), |_| true)
                .is_empty()
        );
        assert!(t.is_banned(addr(2)));
    }

    #[test]
    fn connections_we_dropped_and_inbound_ones_are_not_redialled() {
        let now = Instant::now();
        for how in [
            Ended {
                dropped_by_us: true,
                ..LEFT
            },
            Ended {
                outbound: false,
                ..LEFT
            },
        ] {
            assert!(
                !dialled_and_ended(addr(2), how, now).has_candidates(),
                "{how:?}"
            );
        }
    }

    #[test]
    fn bans_cover_the_address_and_the_id() {
        let mut t = PeerTable::new(vec![], &[addr(2)]);
        t.ban(addr(2), Some([9; 20]));
        assert!(t.is_banned(addr(2)));
        assert!(t.is_banned_id(addr(7), &[9; 20]), "same IP, another port");
        assert!(!t.is_banned_id(addr(7), &[8; 20]));
        let elsewhere = SocketAddr::from(([127, 0, 0, 9], 2));
        assert!(
            !t.is_banned_id(elsewhere, &[9; 20]),
            "a copied id never bans a connection from another address"
        );
        assert!(t.take_dialable(5, Instant::now(), |_| true).is_empty());
    }

    #[test]
    fn an_address_held_twice_stays_held_until_both_release_it() {
        let mut t = PeerTable::new(vec![], &[]);
        t.hold(addr(2));
        t.hold(addr(2));
        t.release(addr(2));
        assert!(t.is_held(addr(2)));
        t.release(addr(2));
        assert!(!t.is_held(addr(2)));
        t.release(addr(2));
        assert!(!t.is_held(addr(2)), "a stray release is harmless");
    }

    #[test]
    fn pex_candidates_have_a_cap_of_their_own_and_skip_bans() {
        let mut t = PeerTable::new(vec![], &[]);
        t.ban(addr(9), None);
        t.add_from_pex([addr(9)]);
        assert!(!t.has_candidates(), "a banned address stays banned");
        let flood = |ip: u8| (1..=2000u16).map(move |p| SocketAddr::from(([127, 0, 1, ip], p)));
        t.add_from_pex(flood(1));
        assert_eq!(t.candidates.len(), MAX_PEX_CANDIDATES);
        t.add_from_pex(flood(2));
        assert_eq!(
            t.candidates.len(),
            MAX_PEX_CANDIDATES,
            "more floods add nothing"
        );
        // The trackers' room is untouched.
        t.add((10..=1009u16).map(addr));
        assert_eq!(t.candidates.len(), MAX_PEX_CANDIDATES + 1000);
        // Dialled ones free room for more.
        let now = Instant::now();
        assert_eq!(t.take_dialable(10, now, |_| true).len(), 10);
        t.add_from_pex(flood(3));
        assert_eq!(t.candidates.len(), MAX_PEX_CANDIDATES + 1000);
        assert_eq!(t.from_pex.len(), MAX_PEX_CANDIDATES);
        // A peer's `dropped` removes only what PEX queued.
        let before = t.candidates.len();
        t.forget_from_pex([addr(500), SocketAddr::from(([127, 0, 1, 3], 5))]);
        assert_eq!(
            t.candidates.len(),
            before - 1,
            "the tracker's addr(500) stays"
        );
    }

    #[test]
    fn the_candidate_queue_is_bounded() {
        let mut t = PeerTable::new(vec![], &[]);
        t.add((0..=u16::MAX).map(|p| SocketAddr::from(([127, 0, 0, 3], p))));
        assert_eq!(t.candidates.len(), MAX_CANDIDATES);
    }
}
