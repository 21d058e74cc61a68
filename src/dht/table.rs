//! The routing table of one address family: k-buckets over the XOR distance from our id.
//!
//! Bucket `i` (all but the last) holds nodes whose id shares exactly `i` leading bits with ours;
//! the last bucket holds everything closer. Only the last bucket splits (it is the one holding
//! our own id), so the table knows many nodes near us and a few far away, at most
//! [`MAX_BUCKETS`] × [`K`] nodes in all.
//!
//! Only nodes that answered one of our queries (or were saved from a previous run) get in. A
//! full bucket replaces a bad node first; with none bad but some questionable, the newcomer
//! waits in the bucket's one replacement slot while the caller pings the stalest questionable
//! node, and takes its place if that node fails twice. Defences: one node per IP address, at
//! most [`SUBNET_CAP`] per /24 or /64 (loopback exempt), never our own id, never a martian.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::addr;
use super::krpc::{Contact, NodeId};
use crate::rng::Rng;

pub(crate) const K: usize = 8;
pub(crate) const MAX_BUCKETS: usize = 160;
pub(crate) const SUBNET_CAP: usize = 2;
/// A node that answered within this long is good; a bucket unchanged this long is refreshed.
pub(crate) const GOOD_FOR: Duration = Duration::from_secs(15 * 60);
/// Failed queries in a row that make a node bad.
pub(crate) const BAD_AFTER: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Good,
    Questionable,
    Bad,
}

#[derive(Debug, Clone)]
struct Entry {
    contact: Contact,
    last_reply: Option<Instant>,
    last_query: Option<Instant>,
    failures: u8,
}

impl Entry {
    fn status(&self, now: Instant) -> Status {
        let recent =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) < GOOD_FOR);
        if self.failures >= BAD_AFTER {
            Status::Bad
        } else if recent(self.last_reply) || (self.last_reply.is_some() && recent(self.last_query))
        {
            Status::Good
        } else {
            Status::Questionable
        }
    }
}

#[derive(Debug)]
struct Bucket {
    entries: Vec<Entry>,
    /// A node that answered us while the bucket was full of questionable nodes.
    replacement: Option<Contact>,
    changed: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Bucket {
        Bucket {
            entries: Vec::with_capacity(K),
            replacement: None,
            changed: now,
        }
    }
}

/// What [`Table::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Insert {
    Added,
    /// Already in the table; its timestamps were updated.
    Known,
    /// The bucket is full of questionable nodes: ping this one; the newcomer waits.
    PingFirst(Contact),
    /// The bucket is full of good nodes.
    Full,
    /// Refused by a defence (martian, our id, IP or subnet cap, an id on another address).
    Refused,
}

#[derive(Debug)]
pub(crate) struct Table {
    own: NodeId,
    buckets: Vec<Bucket>,
    local_mode: bool,
}

pub(crate) fn distance(a: &NodeId, b: &NodeId) -> NodeId {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// Leading bits `a` and `b` share (160 when equal).
pub(crate) fn common_prefix(a: &NodeId, b: &NodeId) -> usize {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let d = x ^ y;
        if d != 0 {
            return i * 8 + d.leading_zeros() as usize;
        }
    }
    160
}

impl Table {
    pub(crate) fn new(own: NodeId, local_mode: bool, now: Instant) -> Table {
        Table {
            own,
            buckets: vec![Bucket::new(now)],
            local_mode,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.buckets.iter().map(|b| b.entries.len()).sum()
    }

    #[cfg(test)]
    /// Nodes that are not bad.
    pub(crate) fn live(&self, now: Instant) -> usize {
        self.entries()
            .filter(|e| e.status(now) != Status::Bad)
            .count()
    }

    #[cfg(test)]
    pub(crate) fn buckets(&self) -> usize {
        self.buckets.len()
    }

    fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().flat_map(|b| b.entries.iter())
    }

    fn index(&self, id: &NodeId) -> usize {
        common_prefix(&self.own, id).min(self.buckets.len() - 1)
    }

    fn find_mut(&mut self, addr: SocketAddr) -> Option<&mut Entry> {
        self.buckets
            .iter_mut()
            .flat_map(|b| b.entries.iter_mut())
            .find(|e| e.contact.addr == addr)
    }

    pub(crate) fn contains(&self, addr: SocketAddr) -> bool {
        self.entries().any(|e| e.contact.addr == addr)
    }

    /// A node answered one of our queries.
    pub(crate) fn insert(&mut self, c: Contact, now: Instant) -> Insert {
        self.insert_entry(c, Some(now), now)
    }

    /// A node saved from an earlier run: in as questionable, without replacing anyone.
    pub(crate) fn load(&mut self, c: Contact, now: Instant) -> bool {
        self.insert_entry(c, None, now) == Insert::Added
    }

    fn insert_entry(&mut self, c: Contact, reply: Option<Instant>, now: Instant) -> Insert {
        let c = Contact {
            id: c.id,
            addr: addr::canonical(c.addr),
        };
        if c.id == self.own || !addr::allowed(c.addr, self.local_mode) {
            return Insert::Refused;
        }
        if let Some(e) = self.find_mut(c.addr) {
            if e.contact.id == c.id {
                if reply.is_some() {
                    e.last_reply = reply;
                    e.failures = 0;
                }
                return Insert::Known;
            }
            // The address now answers with another id; the old entry is stale.
            self.remove(c.addr);
        }
        if !self.passes_caps(&c, now) {
            return Insert::Refused;
        }
        let entry = Entry {
            contact: c,
            last_reply: reply,
            last_query: None,
            failures: 0,
        };
        loop {
            let i = self.index(&c.id);
            let last = i == self.buckets.len() - 1;
            let can_split = last && self.buckets.len() < MAX_BUCKETS;
            let bucket = &mut self.buckets[i];
            if bucket.entries.len() < K {
                bucket.entries.push(entry);
                bucket.changed = now;
                return Insert::Added;
            }
            if can_split {
                self.split(now);
                continue;
            }
            if let Some(bad) = bucket
                .entries
                .iter()
                .position(|e| e.status(now) == Status::Bad)
            {
                bucket.entries[bad] = entry;
                bucket.changed = now;
                return Insert::Added;
            }
            if reply.is_none() {
                return Insert::Full;
            }
            let stalest = bucket
                .entries
                .iter()
                .filter(|e| e.status(now) == Status::Questionable)
                .min_by_key(|e| e.last_reply);
            return match stalest {
                Some(q) => {
                    let ping = q.contact;
                    bucket.replacement = Some(c);
                    Insert::PingFirst(ping)
                }
                None => Insert::Full,
            };
        }
    }

    /// Defences that hold whatever the bucket: an id is not taken over by another address, one
    /// node per IP, a few per subnet. Bad entries do not count (they are about to go).
    fn passes_caps(&self, c: &Contact, now: Instant) -> bool {
        let subnet = addr::subnet(c.addr.ip());
        let mut same_subnet = 0;
        for e in self.entries().filter(|e| e.status(now) != Status::Bad) {
            if e.contact.id == c.id || e.contact.addr.ip() == c.addr.ip() {
                return false;
            }
            if subnet.is_some() && addr::subnet(e.contact.addr.ip()) == subnet {
                same_subnet += 1;
            }
        }
        same_subnet < SUBNET_CAP
    }

    fn split(&mut self, now: Instant) {
        let new_last = self.buckets.len();
        let own = self.own;
        let old = self
            .buckets
            .last_mut()
            .expect("the table always has a bucket");
        let (stay, go): (Vec<Entry>, Vec<Entry>) = old
            .entries
            .drain(..)
            .partition(|e| common_prefix(&own, &e.contact.id) < new_last);
        old.entries = stay;
        let moved_replacement = old
            .replacement
            .take_if(|r| common_prefix(&own, &r.id) >= new_last);
        let mut bucket = Bucket::new(now);
        bucket.entries = go;
        bucket.replacement = moved_replacement;
        self.buckets.push(bucket);
    }

    fn remove(&mut self, addr: SocketAddr) {
        for b in &mut self.buckets {
            b.entries.retain(|e| e.contact.addr != addr);
        }
    }

    /// Whether [`Table::insert`] would take `c` now without pinging anyone: worth a ping to a
    /// node that queried us.
    pub(crate) fn has_room(&self, c: &Contact, now: Instant) -> bool {
        let addr = addr::canonical(c.addr);
        if c.id == self.own || !addr::allowed(addr, self.local_mode) || self.contains(addr) {
            return false;
        }
        let c = Contact { id: c.id, addr };
        if !self.passes_caps(&c, now) {
            return false;
        }
        let i = self.index(&c.id);
        let b = &self.buckets[i];
        b.entries.len() < K
            || (i == self.buckets.len() - 1 && self.buckets.len() < MAX_BUCKETS)
            || b.entries.iter().any(|e| e.status(now) == Status::Bad)
    }

    /// A node we know queried us (BEP 5: a node that has answered before and queries us is good).
    pub(crate) fn heard_query(&mut self, addr: SocketAddr, now: Instant) {
        if let Some(e) = self.find_mut(addr::canonical(addr)) {
            e.last_query = Some(now);
        }
    }

    /// A query to `addr` timed out (or was answered with garbage, `fatal`). A node that turns
    /// bad gives its place to its bucket's waiting replacement, if any.
    pub(crate) fn failed(&mut self, addr: SocketAddr, fatal: bool, now: Instant) {
        let addr = addr::canonical(addr);
        for b in &mut self.buckets {
            let Some(pos) = b.entries.iter().position(|e| e.contact.addr == addr) else {
                continue;
            };
            let e = &mut b.entries[pos];
            e.failures = if fatal {
                BAD_AFTER
            } else {
                e.failures.saturating_add(1)
            };
            if e.status(now) == Status::Bad
                && let Some(r) = b.replacement.take()
            {
                b.entries[pos] = Entry {
                    contact: r,
                    last_reply: Some(now),
                    last_query: None,
                    failures: 0,
                };
                b.changed = now;
            }
            return;
        }
    }

    /// Up to `n` nodes that are not bad, closest to `target` first.
    pub(crate) fn closest(&self, target: &NodeId, n: usize, now: Instant) -> Vec<Contact> {
        let mut all: Vec<Contact> = self
            .entries()
            .filter(|e| e.status(now) != Status::Bad)
            .map(|e| e.contact)
            .collect();
        all.sort_by_key(|c| distance(&c.id, target));
        all.truncate(n);
        all
    }

    /// Every node that is not bad, good ones first: what the state file keeps.
    pub(crate) fn to_save(&self, now: Instant) -> Vec<Contact> {
        let mut all: Vec<&Entry> = self
            .entries()
            .filter(|e| e.status(now) != Status::Bad)
            .collect();
        all.sort_by_key(|e| e.status(now) != Status::Good);
        all.into_iter().map(|e| e.contact).collect()
    }

    /// Questionable nodes not heard from for a while, to ping (a few at a time).
    pub(crate) fn questionable(&self, n: usize, now: Instant) -> Vec<Contact> {
        self.entries()
            .filter(|e| e.status(now) == Status::Questionable)
            .take(n)
            .map(|e| e.contact)
            .collect()
    }

    /// A random id in the range of a bucket unchanged for [`GOOD_FOR`], marking it refreshed;
    /// None when every bucket is fresh.
    pub(crate) fn refresh_target(&mut self, rng: &mut Rng, now: Instant) -> Option<NodeId> {
        let last = self.buckets.len() - 1;
        let (i, b) = self
            .buckets
            .iter_mut()
            .enumerate()
            .find(|(_, b)| now.saturating_duration_since(b.changed) >= GOOD_FOR)?;
        b.changed = now;
        let mut id: NodeId = std::array::from_fn(|_| rng.next_u64() as u8);
        // Keep our first i bits; bucket i < last also differs from us at bit i.
        let prefix = if i == last { i } else { i + 1 };
        for bit in 0..prefix.min(160) {
            let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
            let own_bit = self.own[byte] & mask;
            let want = if bit == i && i != last {
                own_bit ^ mask
            } else {
                own_bit
            };
            id[byte] = (id[byte] & !mask) | want;
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn c(id: NodeId, n: u32) -> Contact {
        Contact {
            id,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (n << 8))), 6881),
        }
    }

    fn id_with_prefix(own: &NodeId, cpl: usize, salt: u8) -> NodeId {
        let mut id = *own;
        let (byte, mask) = (cpl / 8, 0x80u8 >> (cpl % 8));
        id[byte] ^= mask;
        id[19] ^= salt.wrapping_add(1);
        id
    }

    #[test]
    fn prefix_and_distance() {
        assert_eq!(common_prefix(&[0; 20], &[0; 20]), 160);
        let mut b = [0u8; 20];
        b[1] = 0x10;
        assert_eq!(common_prefix(&[0; 20], &b), 11);
        assert_eq!(distance(&[0xff; 20], &[0x0f; 20]), [0xf0; 20]);
    }

    #[test]
    fn only_the_bucket_with_our_id_splits() {
        let now = Instant::now();
        let own = [0u8; 20];
        let mut t = Table::new(own, false, now);
        // Nine far nodes (first bit differs): fill bucket 0 after one split, the ninth is Full.
        let mut n = 0;
        for salt in 0..9u8 {
            n += 1;
            let r = t.insert(c(id_with_prefix(&own, 0, salt), n), now);
            if salt < 8 {
                assert_eq!(r, Insert::Added);
            } else {
                assert_eq!(r, Insert::Full, "all good: no room, no split");
            }
        }
        assert_eq!(t.buckets(), 2);
        // Nodes close to us keep splitting the last bucket.
        for cpl in 1..30 {
            n += 1;
            assert_eq!(
                t.insert(c(id_with_prefix(&own, cpl, 0), n), now),
                Insert::Added
            );
        }
        assert!(t.buckets() > 2);
        assert_eq!(t.len(), 8 + 29);
        // The closest are found first.
        let near = t.closest(&own, 3, now);
        assert_eq!(common_prefix(&own, &near[0].id), 29);
    }

    #[test]
    fn defences_refuse_own_id_martians_same_ip_and_full_subnets() {
        let now = Instant::now();
        let own = [0u8; 20];
        let mut t = Table::new(own, false, now);
        assert_eq!(t.insert(c(own, 1), now), Insert::Refused);
        let lo = Contact {
            id: [1; 20],
            addr: "127.0.0.2:1".parse().unwrap(),
        };
        assert_eq!(t.insert(lo, now), Insert::Refused);
        let zero = Contact {
            id: [1; 20],
            addr: "0.0.0.0:1".parse().unwrap(),
        };
        assert_eq!(t.insert(zero, now), Insert::Refused);
        let a = Contact {
            id: [1; 20],
            addr: "10.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(t.insert(a, now), Insert::Added);
        assert_eq!(t.insert(a, now), Insert::Known);
        let same_ip = Contact {
            id: [2; 20],
            addr: "10.0.0.1:2".parse().unwrap(),
        };
        assert_eq!(t.insert(same_ip, now), Insert::Refused);
        let same_id = Contact {
            id: [1; 20],
            addr: "10.9.0.1:2".parse().unwrap(),
        };
        assert_eq!(t.insert(same_id, now), Insert::Refused);
        let b = Contact {
            id: [3; 20],
            addr: "10.0.0.2:1".parse().unwrap(),
        };
        assert_eq!(t.insert(b, now), Insert::Added);
        let third = Contact {
            id: [4; 20],
            addr: "10.0.0.3:1".parse().unwrap(),
        };
        assert_eq!(t.insert(third, now), Insert::Refused, "subnet cap");
        // Loopback is fine in local mode and exempt from the subnet cap.
        let mut t = Table::new(own, true, now);
        for i in 2..12u8 {
            let lo = Contact {
                id: [i; 20],
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)), 7),
            };
            assert_eq!(t.insert(lo, now), Insert::Added);
        }
    }

    #[test]
    fn bad_nodes_are_replaced_and_questionable_ones_pinged_first() {
        let t0 = Instant::now();
        let own = [0u8; 20];
        let mut t = Table::new(own, false, t0);
        let far: Vec<Contact> = (0..8u8)
            .map(|s| c(id_with_prefix(&own, 0, s), u32::from(s) + 1))
            .collect();
        for f in &far {
            t.insert(*f, t0);
        }
        // Make the bucket split away from the far nodes: one close node.
        t.insert(c(id_with_prefix(&own, 5, 0), 100), t0);
        let newcomer = c(id_with_prefix(&own, 0, 50), 200);
        // Later, all far nodes are questionable: ping the stalest, newcomer waits.
        let later = t0 + GOOD_FOR + Duration::from_secs(1);
        match t.insert(newcomer, later) {
            Insert::PingFirst(p) => {
                assert!(far.contains(&p));
                t.failed(p.addr, false, later);
                assert!(!t.contains(newcomer.addr), "one failure is not bad yet");
                t.failed(p.addr, false, later);
                assert!(t.contains(newcomer.addr), "replaced after two failures");
                assert!(!t.contains(p.addr));
            }
            other => panic!("{other:?}"),
        }
        // A node marked bad by garbage is replaced at once by the next newcomer.
        let victim = *far.iter().find(|f| t.contains(f.addr)).unwrap();
        t.failed(victim.addr, true, later);
        let another = c(id_with_prefix(&own, 0, 60), 300);
        assert_eq!(t.insert(another, later), Insert::Added);
        assert_eq!(t.live(later), t.len());
    }

    #[test]
    fn loaded_nodes_never_displace_and_refresh_targets_land_in_their_bucket() {
        let t0 = Instant::now();
        let own = [0x55u8; 20];
        let mut t = Table::new(own, false, t0);
        assert!(t.load(c(id_with_prefix(&own, 0, 1), 1), t0));
        assert_eq!(t.closest(&own, 8, t0).len(), 1);
        assert_eq!(t.questionable(8, t0).len(), 1);
        let mut rng = Rng::new(7);
        assert_eq!(t.refresh_target(&mut rng, t0), None);
        let later = t0 + GOOD_FOR;
        let target = t.refresh_target(&mut rng, later).unwrap();
        assert_ne!(target, own);
        assert_eq!(t.refresh_target(&mut rng, later), None, "marked refreshed");
        // With two buckets, a refresh of bucket 0 gives an id whose first bit differs.
        for i in 2..10u8 {
            t.insert(c(id_with_prefix(&own, 3, i), u32::from(i)), t0);
        }
        t.insert(c(id_with_prefix(&own, 0, 9), 77), t0);
        assert!(t.buckets() >= 2);
        let mut targets = Vec::new();
        while let Some(x) = t.refresh_target(&mut rng, later + GOOD_FOR) {
            targets.push(x);
        }
        assert_eq!(targets.len(), t.buckets());
        assert_eq!(common_prefix(&own, &targets[0]), 0);
        assert!(common_prefix(&own, &targets[1]) >= 1);
    }
}
