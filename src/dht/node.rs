//! Our DHT node without sockets: routing tables, peer store, tokens, rate limits, outstanding
//! transactions and running lookups, driven by three calls: [`Node::handle`] for a datagram,
//! [`Node::tick`] for timers, and the commands ([`Node::get_peers`], [`Node::add_node`],
//! [`Node::bootstrap`]). What to send piles up in [`Node::take_out`], what to tell the session
//! in [`Node::take_events`]; the thread in `mod.rs` moves those to the socket and the sink.
//!
//! Invariants that keep it cheap to attack: at most one reply per datagram received (and only
//! to a sender within its rate), replies bounded in size (8 nodes per family, 50 peers), at
//! most [`MAX_PENDING`] queries of ours outstanding, pings to nodes that queried us at most
//! [`QUERIER_PINGS_PER_S`] a second, and every list we keep capped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Event;
use super::addr;
use super::krpc::{self, Body, Contact, Message, Method, NodeId, Query, Response, Want};
use super::limits::{QueryLimiter, Rate};
use super::lookup::Lookup;
use super::persist::{MAX_SAVED, Saved};
use super::store::PeerStore;
use super::table::{Insert, K, Table};
use super::token::Tokens;
use crate::rng::Rng;

pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const MAX_PENDING: usize = 256;
/// get_peers lookups at once; starting another ends the oldest.
pub(crate) const MAX_PEER_LOOKUPS: usize = 32;
/// find_node lookups at once (bootstrap, refresh).
const MAX_NODE_LOOKUPS: usize = 4;
/// `Ready` is said by then at the latest.
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(5);
const MAINTENANCE_EVERY: Duration = Duration::from_secs(60);
const QUERIER_PINGS_PER_S: f64 = 5.0;
/// Bootstrap addresses remembered for a later retry when the table runs empty.
const MAX_BOOTSTRAP_ADDRS: usize = 32;

#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// Liveness check; `retries` more pings before the node counts as failed twice.
    Ping {
        retries: u8,
    },
    Bootstrap,
    Lookup(u32),
    Announce,
}

#[derive(Debug)]
struct Pending {
    addr: SocketAddr,
    sent: Instant,
    purpose: Purpose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Peers {
        info_hash: NodeId,
        announce: Option<u16>,
    },
    Nodes,
}

#[derive(Debug)]
struct Running {
    lookup: Lookup,
    kind: Kind,
}

pub(crate) struct Node {
    id: NodeId,
    local: SocketAddr,
    local_mode: bool,
    v4: Option<Table>,
    v6: Option<Table>,
    store: PeerStore,
    tokens: Tokens,
    limiter: QueryLimiter,
    querier_pings: Rate,
    rng: Rng,
    next_tid: u16,
    pending: HashMap<u16, Pending>,
    lookups: HashMap<u32, Running>,
    next_lookup: u32,
    bootstrap_addrs: Vec<SocketAddr>,
    resolving: usize,
    started: Instant,
    ready_sent: bool,
    /// Peer lookups asked for while the table was still empty, before bootstrapping settled:
    /// started with `Ready` (started at once, they would find nobody to ask and end, leaving
    /// the first peers to a lookup half a minute later).
    deferred: Vec<(NodeId, Option<u16>)>,
    last_maintenance: Instant,
    out: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<Event>,
}

impl Node {
    /// `v4`/`v6`: which families the socket reaches (one table each). `local`: our socket
    /// address, never taken for a node.
    pub(crate) fn new(
        id: NodeId,
        local: SocketAddr,
        (v4, v6): (bool, bool),
        local_mode: bool,
        mut rng: Rng,
        now: Instant,
    ) -> Node {
        Node {
            id,
            local,
            local_mode,
            v4: v4.then(|| Table::new(id, local_mode, now)),
            v6: v6.then(|| Table::new(id, local_mode, now)),
            store: PeerStore::default(),
            tokens: Tokens::new(&mut rng, now),
            limiter: QueryLimiter::new(now),
            querier_pings: Rate::new(QUERIER_PINGS_PER_S, QUERIER_PINGS_PER_S * 2.0, now),
            next_tid: rng.next_u64() as u16,
            rng,
            pending: HashMap::new(),
            lookups: HashMap::new(),
            next_lookup: 0,
            bootstrap_addrs: Vec::new(),
            resolving: 0,
            started: now,
            ready_sent: false,
            deferred: Vec::new(),
            last_maintenance: now,
            out: Vec::new(),
            events: Vec::new(),
        }
    }

    fn table(&self, addr: SocketAddr) -> Option<&Table> {
        if addr.is_ipv6() {
            self.v6.as_ref()
        } else {
            self.v4.as_ref()
        }
    }

    fn table_mut(&mut self, addr: SocketAddr) -> Option<&mut Table> {
        if addr.is_ipv6() {
            self.v6.as_mut()
        } else {
            self.v4.as_mut()
        }
    }

    fn tables(&self) -> impl Iterator<Item = &Table> {
        self.v4.iter().chain(self.v6.iter())
    }

    /// Nodes in the routing tables.
    pub(crate) fn nodes(&self) -> usize {
        self.tables().map(Table::len).sum()
    }

    /// Nodes from the state file: into the tables as questionable.
    pub(crate) fn load(&mut self, nodes: &[Contact], now: Instant) {
        for c in nodes {
            let c = Contact {
                id: c.id,
                addr: addr::canonical(c.addr),
            };
            if c.addr != self.local
                && let Some(t) = self.table_mut(c.addr)
            {
                t.load(c, now);
            }
        }
    }

    pub(crate) fn to_save(&self, now: Instant) -> Saved {
        let mut nodes: Vec<Contact> = self.tables().flat_map(|t| t.to_save(now)).collect();
        nodes.truncate(MAX_SAVED);
        Saved { id: self.id, nodes }
    }

    /// How many bootstrap names are still being resolved (`Ready` waits for them, up to
    /// [`READY_WITHIN`]).
    pub(crate) fn set_resolving(&mut self, n: usize) {
        self.resolving = n;
    }

    /// Asks bootstrap nodes for the nodes closest to us, and starts the self-lookup through
    /// what the table already holds.
    pub(crate) fn bootstrap(&mut self, addrs: &[SocketAddr], now: Instant) {
        for &a in addrs {
            let a = addr::canonical(a);
            if self.bootstrap_addrs.len() < MAX_BOOTSTRAP_ADDRS
                && !self.bootstrap_addrs.contains(&a)
            {
                self.bootstrap_addrs.push(a);
            }
            let target = self.id;
            self.send_query(a, Method::FindNode { target }, Purpose::Bootstrap, now);
        }
        self.feed_self_lookup(Vec::new(), now);
    }

    /// A node learnt otherwise (a peer's `port` message): pinged, added if it answers.
    pub(crate) fn add_node(&mut self, addr: SocketAddr, now: Instant) {
        let addr = addr::canonical(addr);
        if !self.table(addr).is_some_and(|t| t.contains(addr)) {
            self.send_query(addr, Method::Ping, Purpose::Ping { retries: 0 }, now);
        }
    }

    pub(crate) fn get_peers(&mut self, info_hash: NodeId, announce: Option<u16>, now: Instant) {
        if !self.ready_sent && self.nodes() == 0 {
            self.deferred.retain(|(h, _)| *h != info_hash);
            if self.deferred.len() < MAX_PEER_LOOKUPS {
                self.deferred.push((info_hash, announce));
            }
            return;
        }
        // Replacing: the old lookup's transactions are ignored when they come back.
        self.lookups
            .retain(|_, r| !matches!(r.kind, Kind::Peers { info_hash: h, .. } if h == info_hash));
        let running = self
            .lookups
            .iter()
            .filter(|(_, r)| matches!(r.kind, Kind::Peers { .. }))
            .map(|(id, _)| *id);
        if running.clone().count() >= MAX_PEER_LOOKUPS
            && let Some(oldest) = running.min()
        {
            self.finish_lookup(oldest, now);
        }
        self.start_lookup(
            info_hash,
            Kind::Peers {
                info_hash,
                announce,
            },
            Vec::new(),
            now,
        );
    }

    fn start_lookup(&mut self, target: NodeId, kind: Kind, extra: Vec<Contact>, now: Instant) {
        let mut lookup = Lookup::new(target, now);
        let seeds: Vec<Contact> = self
            .tables()
            .flat_map(|t| t.closest(&target, K * 2, now))
            .collect();
        lookup.add(seeds);
        lookup.add(extra);
        let id = self.next_lookup;
        self.next_lookup = self.next_lookup.wrapping_add(1);
        self.lookups.insert(id, Running { lookup, kind });
        self.pump(id, now);
    }

    fn feed_self_lookup(&mut self, contacts: Vec<Contact>, now: Instant) {
        let own = self.id;
        let running = self
            .lookups
            .iter_mut()
            .find(|(_, r)| r.kind == Kind::Nodes && r.lookup.target == own);
        if let Some((&id, r)) = running {
            r.lookup.add(contacts);
            self.pump(id, now);
        } else if self.node_lookups() < MAX_NODE_LOOKUPS {
            self.start_lookup(own, Kind::Nodes, contacts, now);
        }
    }

    fn node_lookups(&self) -> usize {
        self.lookups
            .values()
            .filter(|r| r.kind == Kind::Nodes)
            .count()
    }

    /// Our wants: both families when the socket is dual-stack, else the default (ours).
    fn want(&self) -> Want {
        if self.v4.is_some() && self.v6.is_some() {
            Want { v4: true, v6: true }
        } else {
            Want::default()
        }
    }

    /// Queues a query; false when it cannot go (address refused, too many outstanding).
    fn send_query(
        &mut self,
        to: SocketAddr,
        method: Method,
        purpose: Purpose,
        now: Instant,
    ) -> bool {
        let to = addr::canonical(to);
        if to == self.local
            || !addr::allowed(to, self.local_mode)
            || self.table(to).is_none()
            || self.pending.len() >= MAX_PENDING
        {
            return false;
        }
        let mut tid = self.next_tid;
        while self.pending.contains_key(&tid) {
            tid = tid.wrapping_add(1);
        }
        self.next_tid = tid.wrapping_add(1);
        let msg = Message {
            tid: tid.to_be_bytes().to_vec(),
            body: Body::Query(Query {
                id: self.id,
                want: match method {
                    Method::FindNode { .. } | Method::GetPeers { .. } => self.want(),
                    Method::Ping | Method::AnnouncePeer { .. } => Want::default(),
                },
                method,
                read_only: false,
            }),
        };
        self.out.push((to, krpc::encode(&msg)));
        self.pending.insert(
            tid,
            Pending {
                addr: to,
                sent: now,
                purpose,
            },
        );
        true
    }

    /// One datagram from `from`.
    pub(crate) fn handle(&mut self, from: SocketAddr, buf: &[u8], now: Instant) {
        let from = addr::canonical(from);
        if buf.len() > krpc::MAX_PACKET || from == self.local {
            return;
        }
        match krpc::decode(buf) {
            Ok(Message {
                tid,
                body: Body::Query(q),
            }) => self.on_query(from, tid, q, now),
            Ok(Message {
                tid,
                body: Body::Response(r),
            }) => self.on_response(from, &tid, r, now),
            Ok(Message {
                tid,
                body: Body::Error { .. },
            }) => {
                // It is alive but refused: the lookup moves on, the table keeps it.
                if let Some(p) = self.take_pending(from, &tid) {
                    self.query_failed(p, false, now);
                }
            }
            Err(e) => {
                if let Some((tid, code)) = e.reply {
                    if self.may_answer(from, now) {
                        self.reply_error(from, tid, code, e.what);
                    }
                } else if let Some(tid) = e.tid
                    && let Some(p) = self.take_pending(from, &tid)
                {
                    // Garbage in answer to our query: the node is bad.
                    self.query_failed(p, true, now);
                }
            }
        }
    }

    fn take_pending(&mut self, from: SocketAddr, tid: &[u8]) -> Option<Pending> {
        let tid = u16::from_be_bytes(tid.try_into().ok()?);
        // An answer from another address than we asked is not an answer.
        if self.pending.get(&tid)?.addr != from {
            return None;
        }
        self.pending.remove(&tid)
    }

    fn may_answer(&mut self, from: SocketAddr, now: Instant) -> bool {
        addr::allowed(from, self.local_mode) && self.limiter.allow(from.ip(), now)
    }

    fn reply_error(&mut self, to: SocketAddr, tid: Vec<u8>, code: i64, what: &str) {
        let msg = Message {
            tid,
            body: Body::Error {
                code,
                text: what.as_bytes().to_vec(),
            },
        };
        self.out.push((to, krpc::encode(&msg)));
    }

    fn on_query(&mut self, from: SocketAddr, tid: Vec<u8>, q: Query, now: Instant) {
        if q.id == self.id || !self.may_answer(from, now) {
            return;
        }
        let want = if q.want.v4 || q.want.v6 {
            q.want
        } else {
            Want {
                v4: from.is_ipv4(),
                v6: from.is_ipv6(),
            }
        };
        let mut r = Response {
            id: self.id,
            ..Response::default()
        };
        match &q.method {
            Method::Ping => {}
            Method::FindNode { target } => self.fill_nodes(&mut r, target, want, now),
            Method::GetPeers { info_hash } => {
                r.token = Some(self.tokens.issue(from.ip()));
                r.values = self.store.get(info_hash, want, now);
                if r.values.is_empty() {
                    self.fill_nodes(&mut r, info_hash, want, now);
                }
            }
            Method::AnnouncePeer {
                info_hash,
                port,
                implied_port,
                token,
            } => {
                if !self.tokens.valid(from.ip(), token) {
                    self.reply_error(from, tid, krpc::ERR_PROTOCOL, "bad token");
                    return;
                }
                let port = if *implied_port { from.port() } else { *port };
                let peer = SocketAddr::new(from.ip(), port);
                if port == 0 || !self.store.announce(*info_hash, peer, now) {
                    self.reply_error(from, tid, krpc::ERR_GENERIC, "not stored");
                    return;
                }
            }
        }
        let msg = Message {
            tid,
            body: Body::Response(r),
        };
        self.out.push((from, krpc::encode(&msg)));
        self.consider_querier(
            Contact {
                id: q.id,
                addr: from,
            },
            q.read_only,
            now,
        );
    }

    fn fill_nodes(&self, r: &mut Response, target: &NodeId, want: Want, now: Instant) {
        if want.v4
            && let Some(t) = &self.v4
        {
            r.nodes = t.closest(target, K, now);
        }
        if want.v6
            && let Some(t) = &self.v6
        {
            r.nodes6 = t.closest(target, K, now);
        }
    }

    /// A node that queried us: noted if known; pinged (at a bounded rate) if its bucket has
    /// room, so that nodes which only ever ask still end up in the table once they answer.
    fn consider_querier(&mut self, c: Contact, read_only: bool, now: Instant) {
        let Some(table) = self.table_mut(c.addr) else {
            return;
        };
        table.heard_query(c.addr, now);
        if read_only || !table.has_room(&c, now) {
            return;
        }
        let already = self.pending.values().any(|p| p.addr == c.addr);
        if !already && self.querier_pings.take(now) {
            self.send_query(c.addr, Method::Ping, Purpose::Ping { retries: 0 }, now);
        }
    }

    fn usable(&self, c: &Contact) -> bool {
        c.id != self.id
            && c.addr != self.local
            && addr::allowed(c.addr, self.local_mode)
            && self.table(c.addr).is_some()
    }

    fn on_response(&mut self, from: SocketAddr, tid: &[u8], r: Response, now: Instant) {
        let Some(p) = self.take_pending(from, tid) else {
            return;
        };
        if r.id == self.id {
            // Our own id from another address: a reflection or a spoof.
            self.query_failed(p, true, now);
            return;
        }
        let responder = Contact {
            id: r.id,
            addr: from,
        };
        let inserted = self.table_mut(from).map(|t| t.insert(responder, now));
        if let Some(Insert::PingFirst(stale)) = inserted {
            self.send_query(stale.addr, Method::Ping, Purpose::Ping { retries: 1 }, now);
        }
        let learnt: Vec<Contact> = r
            .nodes
            .iter()
            .chain(&r.nodes6)
            .filter(|c| self.usable(c))
            .copied()
            .collect();
        match p.purpose {
            Purpose::Ping { .. } | Purpose::Announce => {}
            Purpose::Bootstrap => self.feed_self_lookup(learnt, now),
            Purpose::Lookup(id) => self.lookup_answered(id, from, r, learnt, now),
        }
    }

    fn lookup_answered(
        &mut self,
        id: u32,
        from: SocketAddr,
        r: Response,
        learnt: Vec<Contact>,
        now: Instant,
    ) {
        let local_mode = self.local_mode;
        let Some(running) = self.lookups.get_mut(&id) else {
            return;
        };
        running.lookup.answered(from, r.token);
        running.lookup.add(learnt);
        if let Kind::Peers { info_hash, .. } = running.kind {
            let values: Vec<SocketAddr> = r
                .values
                .iter()
                .map(|p| addr::canonical(*p))
                .filter(|p| addr::allowed(*p, local_mode))
                .collect();
            let peers = running.lookup.add_peers(&values);
            if !peers.is_empty() {
                self.events.push(Event::Peers { info_hash, peers });
            }
        }
        self.pump(id, now);
    }

    fn query_failed(&mut self, p: Pending, fatal: bool, now: Instant) {
        if fatal && let Some(t) = self.table_mut(p.addr) {
            t.failed(p.addr, true, now);
        }
        if let Purpose::Lookup(id) = p.purpose
            && let Some(r) = self.lookups.get_mut(&id)
        {
            r.lookup.failed(p.addr);
            self.pump(id, now);
        }
    }

    /// Sends what lookup `id` may send now; finishes it when done.
    fn pump(&mut self, id: u32, now: Instant) {
        let Some(mut running) = self.lookups.remove(&id) else {
            return;
        };
        let method = match running.kind {
            Kind::Peers { info_hash, .. } => Method::GetPeers { info_hash },
            Kind::Nodes => Method::FindNode {
                target: running.lookup.target,
            },
        };
        while let Some(c) = running.lookup.next(now) {
            if !self.send_query(c.addr, method.clone(), Purpose::Lookup(id), now) {
                running.lookup.failed(c.addr);
            }
        }
        let done = running.lookup.done(now);
        self.lookups.insert(id, running);
        if done {
            self.finish_lookup(id, now);
        }
    }

    fn finish_lookup(&mut self, id: u32, now: Instant) {
        let Some(running) = self.lookups.remove(&id) else {
            return;
        };
        let Kind::Peers {
            info_hash,
            announce,
        } = running.kind
        else {
            return;
        };
        if let Some(port) = announce {
            for (c, token) in running.lookup.announce_targets() {
                let method = Method::AnnouncePeer {
                    info_hash,
                    port,
                    implied_port: false,
                    token,
                };
                self.send_query(c.addr, method, Purpose::Announce, now);
            }
        }
        self.events.push(Event::LookupDone {
            info_hash,
            peers: running.lookup.peers_found(),
        });
    }

    /// Timers: query timeouts, lookups that ran out of time, `Ready`, periodic maintenance.
    pub(crate) fn tick(&mut self, now: Instant) {
        let expired: Vec<u16> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= QUERY_TIMEOUT)
            .map(|(tid, _)| *tid)
            .collect();
        for tid in expired {
            let Some(p) = self.pending.remove(&tid) else {
                continue;
            };
            if let Some(t) = self.table_mut(p.addr) {
                t.failed(p.addr, false, now);
            }
            if let Purpose::Ping { retries } = p.purpose
                && retries > 0
            {
                let purpose = Purpose::Ping {
                    retries: retries - 1,
                };
                self.send_query(p.addr, Method::Ping, purpose, now);
            }
            self.query_failed(p, false, now);
        }
        let ids: Vec<u32> = self.lookups.keys().copied().collect();
        for id in ids {
            self.pump(id, now);
        }
        self.check_ready(now);
        if now.saturating_duration_since(self.last_maintenance) >= MAINTENANCE_EVERY {
            self.last_maintenance = now;
            self.maintain(now);
        }
    }

    /// `Ready` once: when bootstrapping settled (names resolved, bootstrap queries answered or
    /// timed out, the self-lookup over), or at [`READY_WITHIN`], whichever comes first.
    fn check_ready(&mut self, now: Instant) {
        if self.ready_sent {
            return;
        }
        let own = self.id;
        let settled = self.resolving == 0
            && !self
                .pending
                .values()
                .any(|p| matches!(p.purpose, Purpose::Bootstrap))
            && !self
                .lookups
                .values()
                .any(|r| r.kind == Kind::Nodes && r.lookup.target == own);
        if settled || now.saturating_duration_since(self.started) >= READY_WITHIN {
            self.ready_sent = true;
            self.events.push(Event::Ready {
                nodes: self.nodes(),
            });
            for (info_hash, announce) in std::mem::take(&mut self.deferred) {
                self.get_peers(info_hash, announce, now);
            }
        }
    }

    fn maintain(&mut self, now: Instant) {
        self.tokens.tick(&mut self.rng, now);
        self.store.expire(now);
        if self.nodes() == 0 {
            let addrs = self.bootstrap_addrs.clone();
            self.bootstrap(&addrs, now);
            return;
        }
        let mut targets = Vec::new();
        let mut pings = Vec::new();
        for t in [self.v4.as_mut(), self.v6.as_mut()].into_iter().flatten() {
            if let Some(target) = t.refresh_target(&mut self.rng, now) {
                targets.push(target);
            }
            pings.extend(t.questionable(3, now));
        }
        for target in targets {
            if self.node_lookups() < MAX_NODE_LOOKUPS {
                self.start_lookup(target, Kind::Nodes, Vec::new(), now);
            }
        }
        for c in pings {
            self.send_query(c.addr, Method::Ping, Purpose::Ping { retries: 0 }, now);
        }
    }

    pub(crate) fn take_out(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    pub(crate) fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    #[cfg(any(test, feature = "fuzz"))]
    /// Sizes of everything bounded, for the fuzz target and tests.
    pub(crate) fn sizes(&self) -> Sizes {
        Sizes {
            nodes: self.nodes(),
            pending: self.pending.len(),
            lookups: self.lookups.len(),
            stored: self.store.len(),
        }
    }
}

#[cfg(any(test, feature = "fuzz"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub nodes: usize,
    pub pending: usize,
    pub lookups: usize,
    /// (info hashes, peers)
    pub stored: (usize, usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn node(now: Instant) -> Node {
        Node::new(
            [0x11; 20],
            a("10.0.0.1:6881"),
            (true, false),
            false,
            Rng::new(3),
            now,
        )
    }

    fn query(tid: &[u8], method: Method) -> Vec<u8> {
        krpc::encode(&Message {
            tid: tid.to_vec(),
            body: Body::Query(Query {
                id: [0x22; 20],
                method,
                want: Want::default(),
                read_only: true,
            }),
        })
    }

    /// Sends one datagram, returns the one reply (there must be exactly one).
    fn ask(n: &mut Node, from: SocketAddr, bytes: &[u8], now: Instant) -> Body {
        n.handle(from, bytes, now);
        let out = n.take_out();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].0, from);
        krpc::decode(&out[0].1).unwrap().body
    }

    #[test]
    fn answers_queries_and_stores_announces_only_with_a_valid_token() {
        let now = Instant::now();
        let mut n = node(now);
        let from = a("10.9.9.9:7000");
        let h = [0x33; 20];
        let Body::Response(r) = ask(&mut n, from, &query(b"p", Method::Ping), now) else {
            panic!()
        };
        assert_eq!(r.id, [0x11; 20]);
        let Body::Response(r) = ask(
            &mut n,
            from,
            &query(b"g", Method::GetPeers { info_hash: h }),
            now,
        ) else {
            panic!()
        };
        let token = r.token.unwrap();
        assert!(r.values.is_empty());
        let announce = |token: Vec<u8>| Method::AnnouncePeer {
            info_hash: h,
            port: 5555,
            implied_port: false,
            token,
        };
        let Body::Error { code, .. } = ask(
            &mut n,
            from,
            &query(b"a", announce(b"forged".to_vec())),
            now,
        ) else {
            panic!()
        };
        assert_eq!(code, krpc::ERR_PROTOCOL);
        // The token was issued to another IP.
        let other = a("10.9.9.8:7000");
        assert!(matches!(
            ask(&mut n, other, &query(b"a", announce(token.clone())), now),
            Body::Error { .. }
        ));
        assert!(matches!(
            ask(&mut n, from, &query(b"a", announce(token)), now),
            Body::Response(_)
        ));
        let Body::Response(r) = ask(
            &mut n,
            other,
            &query(b"g", Method::GetPeers { info_hash: h }),
            now,
        ) else {
            panic!()
        };
        assert_eq!(r.values, vec![a("10.9.9.9:5555")]);
        // A broken query gets a protocol error; garbage gets nothing.
        let Body::Error { code, .. } =
            ask(&mut n, from, b"d1:ad2:id1:xe1:q4:ping1:t1:x1:y1:qe", now)
        else {
            panic!()
        };
        assert_eq!(code, krpc::ERR_PROTOCOL);
        n.handle(from, b"\xff\xfe", now);
        assert!(n.take_out().is_empty());
    }

    #[test]
    fn queries_from_one_ip_are_rate_limited_and_martians_ignored() {
        let now = Instant::now();
        let mut n = node(now);
        let from = a("10.9.9.9:7000");
        let ping = query(b"p", Method::Ping);
        for _ in 0..200 {
            n.handle(from, &ping, now);
        }
        assert_eq!(
            n.take_out().len(),
            super::super::limits::PER_IP_BURST as usize
        );
        for bad in ["127.0.0.1:5", "0.0.0.0:5", "224.0.0.1:5"] {
            n.handle(a(bad), &ping, now);
        }
        assert!(n.take_out().is_empty());
    }

    #[test]
    fn answers_only_count_from_the_address_asked_and_lookups_report_peers() {
        let now = Instant::now();
        let mut n = node(now);
        let router = a("10.5.0.1:6881");
        n.bootstrap(&[router], now);
        let out = n.take_out();
        assert_eq!(out.len(), 1);
        let Message { tid, .. } = krpc::decode(&out[0].1).unwrap();
        let helper = Contact {
            id: [0x34; 20],
            addr: a("10.6.0.1:6881"),
        };
        let reply = krpc::encode(&Message {
            tid: tid.clone(),
            body: Body::Response(Response {
                id: [0x40; 20],
                nodes: vec![helper],
                ..Response::default()
            }),
        });
        n.handle(a("10.5.0.2:6881"), &reply, now);
        assert_eq!(n.nodes(), 0, "an answer from elsewhere is ignored");
        n.handle(router, &reply, now);
        assert_eq!(n.nodes(), 1);
        // The self-lookup asks the node it learnt of.
        let out = n.take_out();
        assert!(out.iter().any(|(to, _)| *to == helper.addr), "{out:?}");
        // A get_peers lookup streams peers as they come, then ends.
        let h = [0x35; 20];
        n.get_peers(h, None, now);
        let out = n.take_out();
        let mut ended = false;
        for (to, bytes) in out {
            let Message { tid, body } = krpc::decode(&bytes).unwrap();
            let Body::Query(Query {
                method: Method::GetPeers { .. },
                ..
            }) = body
            else {
                continue;
            };
            let id = if to == router { [0x40; 20] } else { helper.id };
            let reply = krpc::encode(&Message {
                tid,
                body: Body::Response(Response {
                    id,
                    values: vec![a("10.7.0.1:1"), a("127.0.0.1:2"), a("10.7.0.1:1")],
                    token: Some(b"t".to_vec()),
                    ..Response::default()
                }),
            });
            n.handle(to, &reply, now);
            for e in n.take_events() {
                match e {
                    Event::Peers { peers, .. } => assert_eq!(peers, vec![a("10.7.0.1:1")]),
                    Event::LookupDone { peers, .. } => {
                        assert_eq!(peers, 1);
                        ended = true;
                    }
                    Event::Ready { .. } | Event::Notice(_) | Event::Failed => {}
                }
            }
        }
        assert!(ended);
    }

    #[test]
    fn ready_is_said_once_promptly_with_nobody_to_ask() {
        let now = Instant::now();
        let mut n = node(now);
        n.bootstrap(&[], now);
        n.tick(now);
        assert_eq!(n.take_events(), vec![Event::Ready { nodes: 0 }]);
        n.tick(now + READY_WITHIN);
        assert!(n.take_events().is_empty());
        // With a name resolving, Ready waits for it, but not past READY_WITHIN.
        let mut n = node(now);
        n.set_resolving(1);
        n.bootstrap(&[], now);
        n.tick(now);
        assert!(n.take_events().is_empty());
        n.tick(now + READY_WITHIN);
        assert_eq!(n.take_events(), vec![Event::Ready { nodes: 0 }]);
    }
}
