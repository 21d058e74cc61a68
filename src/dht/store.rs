//! Peers other nodes announced to us (`announce_peer`), for answering `get_peers`.
//!
//! Bounded so that a flood of announces costs at most a few megabytes: [`MAX_HASHES`] info
//! hashes of [`MAX_PEERS_PER_HASH`] peers each (about 500 × 100 × 48 bytes ≈ 2.4 MB). Entries
//! expire after [`PEER_TTL`]; a full list replaces its oldest entry; when every slot for a new
//! info hash is taken, the announce is dropped (expired ones are purged first).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::krpc::{NodeId, Want};

pub(crate) const MAX_HASHES: usize = 500;
pub(crate) const MAX_PEERS_PER_HASH: usize = 100;
/// Peers given in one `values` reply: 50 × 18 bytes keeps an IPv6 answer under 1 KiB.
pub(crate) const MAX_VALUES_REPLY: usize = 50;
pub(crate) const PEER_TTL: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Default)]
pub(crate) struct PeerStore {
    torrents: HashMap<NodeId, Vec<(SocketAddr, Instant)>>,
}

impl PeerStore {
    /// Records (or refreshes) `peer` for `info_hash`; false when the store is full.
    pub(crate) fn announce(&mut self, info_hash: NodeId, peer: SocketAddr, now: Instant) -> bool {
        if !self.torrents.contains_key(&info_hash) && self.torrents.len() >= MAX_HASHES {
            self.expire(now);
            if self.torrents.len() >= MAX_HASHES {
                return false;
            }
        }
        let peers = self.torrents.entry(info_hash).or_default();
        if let Some(entry) = peers.iter_mut().find(|(p, _)| *p == peer) {
            entry.1 = now;
        } else if peers.len() < MAX_PEERS_PER_HASH {
            peers.push((peer, now));
        } else if let Some(oldest) = peers.iter_mut().min_by_key(|(_, t)| *t) {
            *oldest = (peer, now);
        }
        true
    }

    /// Up to [`MAX_VALUES_REPLY`] live peers of the wanted families, newest first.
    pub(crate) fn get(&self, info_hash: &NodeId, want: Want, now: Instant) -> Vec<SocketAddr> {
        let Some(peers) = self.torrents.get(info_hash) else {
            return Vec::new();
        };
        let mut live: Vec<&(SocketAddr, Instant)> = peers
            .iter()
            .filter(|(p, t)| {
                now.saturating_duration_since(*t) < PEER_TTL
                    && if p.is_ipv6() { want.v6 } else { want.v4 }
            })
            .collect();
        live.sort_by_key(|(_, t)| std::cmp::Reverse(*t));
        live.iter()
            .take(MAX_VALUES_REPLY)
            .map(|(p, _)| *p)
            .collect()
    }

    pub(crate) fn expire(&mut self, now: Instant) {
        self.torrents.retain(|_, peers| {
            peers.retain(|(_, t)| now.saturating_duration_since(*t) < PEER_TTL);
            !peers.is_empty()
        });
    }

    #[cfg(any(test, feature = "fuzz"))]
    pub(crate) fn len(&self) -> (usize, usize) {
        (
            self.torrents.len(),
            self.torrents.values().map(Vec::len).sum(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOTH: Want = Want { v4: true, v6: true };

    fn peer(i: u32) -> SocketAddr {
        SocketAddr::new(std::net::Ipv4Addr::from(0x0a00_0000 + i).into(), 6881)
    }

    #[test]
    fn peers_expire_and_refresh() {
        let t0 = Instant::now();
        let mut s = PeerStore::default();
        assert!(s.announce([1; 20], peer(1), t0));
        assert!(s.announce([1; 20], peer(2), t0 + Duration::from_secs(10)));
        assert_eq!(
            s.get(&[1; 20], BOTH, t0 + Duration::from_secs(11)),
            vec![peer(2), peer(1)]
        );
        let later = t0 + PEER_TTL + Duration::from_secs(1);
        assert_eq!(s.get(&[1; 20], BOTH, later), vec![peer(2)]);
        s.announce([1; 20], peer(2), later);
        s.expire(later + PEER_TTL - Duration::from_secs(1));
        assert_eq!(s.len(), (1, 1));
        s.expire(later + PEER_TTL);
        assert_eq!(s.len(), (0, 0));
    }

    #[test]
    fn store_is_bounded_and_filters_families() {
        let t0 = Instant::now();
        let mut s = PeerStore::default();
        for i in 0..(MAX_PEERS_PER_HASH as u32 + 50) {
            assert!(s.announce([1; 20], peer(i), t0 + Duration::from_millis(u64::from(i))));
        }
        assert_eq!(s.len(), (1, MAX_PEERS_PER_HASH));
        let got = s.get(&[1; 20], BOTH, t0 + Duration::from_secs(1));
        assert_eq!(got.len(), MAX_VALUES_REPLY);
        assert_eq!(got[0], peer(MAX_PEERS_PER_HASH as u32 + 49), "newest first");
        let v6_only = Want {
            v4: false,
            v6: true,
        };
        assert!(s.get(&[1; 20], v6_only, t0).is_empty());
        for h in 1..MAX_HASHES as u32 {
            let mut hash = [0u8; 20];
            hash[..4].copy_from_slice(&h.to_be_bytes());
            assert!(s.announce(hash, peer(1), t0));
        }
        assert!(!s.announce([0xff; 20], peer(1), t0), "full");
        assert!(
            s.announce([0xff; 20], peer(1), t0 + PEER_TTL * 2),
            "after expiry"
        );
    }
}
