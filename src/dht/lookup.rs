//! One iterative lookup (BEP 5's get_peers, or find_node for bootstrap and refresh) as a state
//! machine: the caller asks [`Lookup::next`] whom to query, and reports answers and failures.
//!
//! Candidates are kept sorted by XOR distance to the target and bounded ([`MAX_CANDIDATES`]; the
//! farthest fall off). At most [`ALPHA`] queries are in flight, always to the closest candidates
//! not yet asked. The lookup is done when the [`K`] closest candidates that did not fail have all
//! answered, when nobody is left to ask, or at its deadline.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::addr;
use super::krpc::{Contact, NodeId};
use super::table::{K, distance};

pub(crate) const ALPHA: usize = 3;
pub(crate) const MAX_CANDIDATES: usize = 128;
/// Addresses a lookup remembers having seen, so a node is never asked twice.
const MAX_SEEN: usize = 2048;
/// Distinct peers one lookup reports; the rest are dropped.
pub(crate) const MAX_PEERS: usize = 400;
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);
/// A query unanswered this long stops counting against [`ALPHA`] (it may still answer until
/// its timeout): nodes that are gone, or addresses a poisoner handed out, would otherwise
/// hold every slot of the lookup for the whole query timeout, one after the other.
pub(crate) const SLOW_AFTER: Duration = Duration::from_millis(800);

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Fresh,
    InFlight { since: Instant },
    Answered { token: Option<Vec<u8>> },
    Failed,
}

#[derive(Debug, Clone)]
struct Candidate {
    contact: Contact,
    distance: NodeId,
    state: State,
}

#[derive(Debug)]
pub(crate) struct Lookup {
    pub target: NodeId,
    candidates: Vec<Candidate>,
    seen: HashSet<SocketAddr>,
    peers: HashSet<SocketAddr>,
    deadline: Instant,
}

impl Lookup {
    pub(crate) fn new(target: NodeId, now: Instant) -> Lookup {
        Lookup {
            target,
            candidates: Vec::new(),
            seen: HashSet::new(),
            peers: HashSet::new(),
            deadline: now + DEADLINE,
        }
    }

    /// Adds nodes to ask (already checked by the caller: not martian, not us). Known addresses
    /// are ignored; past the cap, the farthest candidates that are not in flight or answered
    /// are dropped.
    pub(crate) fn add(&mut self, contacts: impl IntoIterator<Item = Contact>) {
        for c in contacts {
            let c = Contact {
                id: c.id,
                addr: addr::canonical(c.addr),
            };
            if self.seen.len() >= MAX_SEEN || !self.seen.insert(c.addr) {
                continue;
            }
            let d = distance(&c.id, &self.target);
            let at = self.candidates.partition_point(|x| x.distance <= d);
            if at >= MAX_CANDIDATES {
                continue;
            }
            self.candidates.insert(
                at,
                Candidate {
                    contact: c,
                    distance: d,
                    state: State::Fresh,
                },
            );
            if self.candidates.len() > MAX_CANDIDATES {
                self.candidates.pop();
            }
        }
    }

    /// Queries out and not yet slow.
    fn in_flight(&self, now: Instant) -> usize {
        self.candidates
            .iter()
            .filter(|c| {
                matches!(c.state, State::InFlight { since }
                    if now.saturating_duration_since(since) < SLOW_AFTER)
            })
            .count()
    }

    /// The next node to query, marked in flight; None when [`ALPHA`] are already out or nobody
    /// useful is left (only candidates among the K closest live ones are worth asking once the
    /// lookup has converged).
    pub(crate) fn next(&mut self, now: Instant) -> Option<Contact> {
        if self.in_flight(now) >= ALPHA {
            return None;
        }
        let mut live = 0;
        for c in &mut self.candidates {
            if c.state == State::Failed {
                continue;
            }
            if c.state == State::Fresh {
                c.state = State::InFlight { since: now };
                return Some(c.contact);
            }
            live += 1;
            if live >= K {
                // The K closest live candidates are all asked; farther ones cannot help.
                return None;
            }
        }
        None
    }

    fn find(&mut self, addr: SocketAddr) -> Option<&mut Candidate> {
        let addr = addr::canonical(addr);
        self.candidates
            .iter_mut()
            .find(|c| c.contact.addr == addr && matches!(c.state, State::InFlight { .. }))
    }

    /// `addr` answered (with a write token for get_peers).
    pub(crate) fn answered(&mut self, addr: SocketAddr, token: Option<Vec<u8>>) {
        if let Some(c) = self.find(addr) {
            c.state = State::Answered { token };
        }
    }

    pub(crate) fn failed(&mut self, addr: SocketAddr) {
        if let Some(c) = self.find(addr) {
            c.state = State::Failed;
        }
    }

    /// Peers from a `values` list (already filtered by the caller); returns the new ones.
    pub(crate) fn add_peers(&mut self, values: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut new = Vec::new();
        for p in values {
            if self.peers.len() >= MAX_PEERS {
                break;
            }
            if self.peers.insert(addr::canonical(*p)) {
                new.push(addr::canonical(*p));
            }
        }
        new
    }

    pub(crate) fn peers_found(&self) -> usize {
        self.peers.len()
    }

    pub(crate) fn done(&self, now: Instant) -> bool {
        if now >= self.deadline {
            return true;
        }
        let mut live = self
            .candidates
            .iter()
            .filter(|c| c.state != State::Failed)
            .peekable();
        if live.peek().is_none() {
            return true;
        }
        live.take(K)
            .all(|c| matches!(c.state, State::Answered { .. }))
    }

    /// The closest (up to K) nodes that answered with a token: where to announce.
    pub(crate) fn announce_targets(&self) -> Vec<(Contact, Vec<u8>)> {
        self.candidates
            .iter()
            .filter_map(|c| match &c.state {
                State::Answered { token: Some(t) } => Some((c.contact, t.clone())),
                _ => None,
            })
            .take(K)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn c(first: u8, n: u32) -> Contact {
        let mut id = [0u8; 20];
        id[0] = first;
        id[19] = n as u8;
        Contact {
            id,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)), 6881),
        }
    }

    #[test]
    fn queries_go_closest_first_alpha_at_a_time() {
        let now = Instant::now();
        let mut l = Lookup::new([0; 20], now);
        l.add([c(0x80, 1), c(0x01, 2), c(0x40, 3), c(0x02, 4), c(0x01, 2)]);
        let first: Vec<Contact> = std::iter::from_fn(|| l.next(now)).collect();
        assert_eq!(first, vec![c(0x01, 2), c(0x02, 4), c(0x40, 3)]);
        assert_eq!(l.next(now), None, "alpha in flight");
        l.failed(c(0x01, 2).addr);
        assert_eq!(l.next(now), Some(c(0x80, 1)));
        assert!(!l.done(now));
    }

    #[test]
    fn a_slow_query_frees_its_slot_but_still_counts_when_it_answers() {
        let now = Instant::now();
        let mut l = Lookup::new([0; 20], now);
        l.add((1..=6).map(|n| c(n as u8, n)));
        let first: Vec<Contact> = std::iter::from_fn(|| l.next(now)).collect();
        assert_eq!(first.len(), ALPHA);
        let later = now + SLOW_AFTER;
        assert_eq!(
            l.next(later),
            Some(c(4, 4)),
            "three slow queries free three slots"
        );
        l.answered(first[0].addr, Some(vec![1]));
        assert_eq!(l.announce_targets().len(), 1, "a slow answer still counts");
    }

    #[test]
    fn ends_when_the_k_closest_answered() {
        let now = Instant::now();
        let mut l = Lookup::new([0; 20], now);
        l.add((1..=20).map(|n| c(n as u8, n)));
        let mut answered = 0;
        while !l.done(now) {
            let Some(q) = l.next(now) else {
                panic!("stuck after {answered} answers")
            };
            // The third-closest fails; its place among the K is taken by the ninth.
            if q.addr == c(3, 3).addr {
                l.failed(q.addr);
            } else {
                l.answered(q.addr, Some(vec![q.id[0]]));
                answered += 1;
            }
        }
        assert_eq!(answered, K);
        let targets = l.announce_targets();
        assert_eq!(targets.len(), K);
        assert_eq!(targets[0].1, vec![1]);
        assert!(targets.iter().all(|(t, _)| t.addr != c(3, 3).addr));
    }

    #[test]
    fn ends_when_everyone_failed_or_at_the_deadline() {
        let now = Instant::now();
        let mut l = Lookup::new([0; 20], now);
        assert!(l.done(now), "nobody to ask");
        l.add([c(1, 1)]);
        let q = l.next(now).unwrap();
        assert!(!l.done(now));
        assert!(l.done(now + DEADLINE));
        l.failed(q.addr);
        assert!(l.done(now));
        // An answer from an address never queried changes nothing.
        l.answered(c(9, 9).addr, None);
        assert!(l.announce_targets().is_empty());
    }

    #[test]
    fn candidates_and_peers_are_bounded_and_deduplicated() {
        let now = Instant::now();
        let mut l = Lookup::new([0; 20], now);
        l.add((0..1000).map(|n| c((n % 250) as u8, n)));
        assert!(l.candidates.len() <= MAX_CANDIDATES);
        assert!(
            l.candidates
                .windows(2)
                .all(|w| w[0].distance <= w[1].distance)
        );
        let peers: Vec<SocketAddr> = (0..1000).map(|n| c(0, n).addr).collect();
        let new = l.add_peers(&peers[..10]);
        assert_eq!(new.len(), 10);
        assert!(l.add_peers(&peers[..10]).is_empty());
        l.add_peers(&peers);
        assert_eq!(l.peers_found(), MAX_PEERS);
    }
}
