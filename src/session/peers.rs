//! The session's connections: dialling what the peer table offers, accepting within the cap,
//! pruning idle connections, resolving duplicate connections, and bans. The address rules
//! themselves are the peer table's (`peer_table.rs`).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::peer_table::{Ended, are_twins, keep_new_twin};
use super::{Session, bitfield};
use crate::engine::NoticeKind;
use crate::geometry::{BlockRef, PieceIndex};
use crate::messages::{Command, HaveSummary};
use crate::outbox::Outbox;
use crate::peer::{self, Dial, PeerError};
use crate::picker::PeerKey;

/// A connection younger than this is not pruned to make room.
const PRUNE_GRACE: Duration = Duration::from_secs(60);
/// A connection that moved no payload (either way) for this long may be pruned to make room.
const IDLE_FOR_PRUNING: Duration = Duration::from_secs(60);
/// How long a peer's claim of its listening address is trusted while it is of no use.
const CLAIM_TRUST: Duration = Duration::from_secs(10);
/// How often a full table of idle connections makes room for a peer we still have to dial.
const MAKE_ROOM_EVERY: Duration = Duration::from_secs(5);
/// Blocks nobody asked for before a peer is dropped.
pub const MAX_UNREQUESTED: u32 = 32;
/// Failed pieces a peer may take part in before it is banned.
pub const MAX_HASH_FAILS: u32 = 3;

pub struct Peer {
    pub addr: SocketAddr,
    /// Where the peer listens, when that differs from `addr` (an inbound connection comes from
    /// an ephemeral port): learnt from its extended handshake or from a twin connection we
    /// dialled. Kept in `known` while connected, so the tracker's next list does not make us
    /// dial a peer we already have.
    pub listen_addr: Option<SocketAddr>,
    pub outbound: bool,
    pub thread: Option<JoinHandle<()>>,
    /// Set once the handshake is done.
    pub commands: Option<Outbox>,
    pub peer_id: Option<[u8; 20]>,
    pub fast: bool,
    pub reqq: Option<usize>,
    pub connected_at: Instant,
    pub am_choking: bool,
    pub am_interested: bool,
    pub peer_choking: bool,
    pub peer_interested: bool,
    /// Totals over the connection, and the rates the last rechoke measured.
    pub down_total: u64,
    pub up_total: u64,
    pub down_rate: u64,
    pub up_rate: u64,
    pub down_mark: u64,
    pub up_mark: u64,
    /// Download rate over the last tick, so a fast peer's pipeline deepens within a second.
    pub recent_rate: u64,
    pub tick_mark: u64,
    pub last_block_at: Instant,
    /// When requests last went out to an empty pipeline, and the first of them, until that
    /// block comes back: the wait is one round trip (plus the peer's time to read one block).
    /// Keyed by the block, so a late answer to an older request, voided by a choke, cannot
    /// pass for a round trip of almost nothing (the shortest sample sticks).
    pub rtt_probe: Option<(Instant, BlockRef)>,
    /// The shortest such round trip seen: the path's latency without our own queueing.
    pub rtt: Option<Duration>,
    /// `listen_addr` is only the peer's claim (not seen from a twin we dialled).
    pub listen_claimed: bool,
    /// Last time a block moved either way (for pruning: interest alone is free to claim).
    pub last_payload_at: Instant,
    pub unchoked_rounds: u32,
    pub allowed_fast: HashSet<PieceIndex>,
    /// Pieces this peer rejected while unchoking us (BEP 6), not asked of it again until the
    /// instant given: a peer that cannot serve a piece would otherwise be asked in a loop.
    pub rejected: HashMap<PieceIndex, Instant>,
    pub hash_fails: u32,
    pub unrequested: u32,
    /// Sat on our requests too long: its blocks went to others and it gets one at a time.
    pub snubbed: bool,
    /// We closed it (pruned, duplicate, banned): not to be redialled.
    pub dropped_by_us: bool,
    /// BEP 11: the id it takes `ut_pex` messages under (PEX on, and it offered it), what we
    /// told it, and when its next message is due.
    pub ut_pex: Option<u8>,
    pub pex_told: crate::pex::Told,
    pub pex_due: Option<Instant>,
}

impl Peer {
    fn new(addr: SocketAddr, outbound: bool, thread: JoinHandle<()>) -> Peer {
        Peer {
            addr,
            listen_addr: None,
            outbound,
            thread: Some(thread),
            commands: None,
            peer_id: None,
            fast: false,
            reqq: None,
            connected_at: Instant::now(),
            am_choking: true,
            am_interested: false,
            peer_choking: true,
            peer_interested: false,
            down_total: 0,
            up_total: 0,
            down_rate: 0,
            up_rate: 0,
            down_mark: 0,
            up_mark: 0,
            recent_rate: 0,
            tick_mark: 0,
            last_block_at: Instant::now(),
            rtt_probe: None,
            rtt: None,
            last_payload_at: Instant::now(),
            listen_claimed: false,
            unchoked_rounds: 0,
            allowed_fast: HashSet::new(),
            rejected: HashMap::new(),
            hash_fails: 0,
            unrequested: 0,
            snubbed: false,
            dropped_by_us: false,
            ut_pex: None,
            pex_told: crate::pex::Told::default(),
            pex_due: None,
        }
    }

    pub fn send(&self, cmd: Command) {
        if let Some(c) = &self.commands {
            // Never blocks; a connection whose outbox overflows ends, and its Gone event
            // follows as for any other ending.
            c.send(cmd);
        }
    }

    pub fn is_connected(&self) -> bool {
        self.commands.is_some()
    }
}

impl Session {
    pub(super) fn start_peer(&mut self, dial: Dial, addr: SocketAddr, outbound: bool) {
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        match peer::spawn(key, dial, Arc::clone(&self.ctx), self.input_tx.clone()) {
            Ok(thread) => {
                if !outbound {
                    // Dialled addresses are held from the moment they are picked.
                    self.table.hold(addr);
                }
                *self.per_ip.entry(addr.ip()).or_insert(0) += 1;
                self.peers.insert(key, Peer::new(addr, outbound, thread));
            }
            Err(e) => {
                if outbound {
                    self.table.release(addr);
                }
                self.notice(
                    NoticeKind::Other,
                    format!("cannot start a peer thread: {e}"),
                );
            }
        }
    }

    /// A connection of the metadata phase carries on as a full one.
    pub(super) fn start_handover(&mut self, h: peer::Handover) {
        let (addr, outbound) = (h.addr, h.outbound);
        if self.table.is_banned(addr) {
            return;
        }
        if outbound {
            // `start_peer` holds inbound addresses itself; a dialled one is held here, as
            // `dial` would have.
            self.table.hold(addr);
        }
        self.start_peer(Dial::Handover(Box::new(h)), addr, outbound);
    }

    pub(super) fn add_candidates(&mut self, list: Vec<SocketAddr>) {
        self.table.add(list);
        self.dial();
    }

    /// Dials candidates while there is room (the table skips those in back-off or banned),
    /// and no more than the per-IP cap to any one host. A full table of idle connections
    /// must not keep a download from the peers it still has to reach: then one idle
    /// connection makes way, at most every [`MAKE_ROOM_EVERY`].
    pub(super) fn dial(&mut self) {
        let now = Instant::now();
        if self.peers.len() >= self.cfg.max_peers
            && !self.picker.is_complete()
            && self.table.has_dialable(now)
            && self
                .last_made_room
                .is_none_or(|t| t.elapsed() >= MAKE_ROOM_EVERY)
            && self.prune_one(false)
        {
            self.last_made_room = Some(now);
        }
        let room = self.cfg.max_peers.saturating_sub(self.peers.len());
        let cap = self.cfg.max_peers_per_ip;
        let mut per_ip = self.per_ip.clone();
        let dials = self.table.take_dialable(room, now, |a| {
            let n = per_ip.entry(a.ip()).or_insert(0);
            *n += 1;
            *n <= cap
        });
        for addr in dials {
            self.start_peer(Dial::Outbound(addr), addr, true);
        }
    }

    /// Inbound connections may take at most this many slots: the rest stay free for the
    /// connections we dial, so an inbound flood never stops us reaching our own peers.
    fn inbound_cap(&self) -> usize {
        (self.cfg.max_peers - self.cfg.max_peers / 4).max(1)
    }

    pub(super) fn on_accepted(&mut self, stream: TcpStream, addr: SocketAddr) {
        if self.table.is_banned(addr)
            || self
                .per_ip
                .get(&addr.ip())
                .is_some_and(|n| *n >= self.cfg.max_peers_per_ip)
        {
            return;
        }
        let inbound = self.peers.values().filter(|p| !p.outbound).count();
        let full = self.peers.len() >= self.cfg.max_peers || inbound >= self.inbound_cap();
        // At a cap, an idle inbound connection makes way for the newcomer.
        if full && !self.prune_one(true) {
            return;
        }
        self.start_peer(Dial::Inbound(stream, addr), addr, false);
    }

    /// Drops the least useful connection that is old enough to have shown its use and has
    /// moved no payload either way lately ([`IDLE_FOR_PRUNING`]): preferably one we have no
    /// interest in, then one not interested in us, then the one that moved the fewest bytes.
    /// Claiming interest is free, so it protects nobody by itself; moving data does.
    /// `inbound_only`: make room among inbound connections. Returns whether one was dropped.
    fn prune_one(&mut self, inbound_only: bool) -> bool {
        let victim = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.is_connected()
                    && !p.dropped_by_us
                    && (!inbound_only || !p.outbound)
                    && p.connected_at.elapsed() >= PRUNE_GRACE
                    && p.last_payload_at.elapsed() >= IDLE_FOR_PRUNING
            })
            .min_by_key(|(_, p)| {
                (
                    p.am_interested,
                    p.peer_interested,
                    p.down_total + p.up_total,
                )
            })
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                self.drop_peer(k);
                true
            }
            None => false,
        }
    }

    /// Asks a connection to close; its Gone event does the bookkeeping.
    pub(super) fn drop_peer(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            p.dropped_by_us = true;
            p.send(Command::Shutdown);
            // Free its slot for the picker and the choker at once.
            p.peer_interested = false;
            p.am_interested = false;
            p.peer_choking = true;
        }
        self.picker.remove_peer(key);
    }

    pub(super) fn ban(&mut self, key: PeerKey, why: &str) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        if self.table.is_banned(p.addr) {
            // Already banned and on its way out (several of its pieces can fail in a row).
            return;
        }
        let addr = p.addr;
        self.table.ban(addr, p.peer_id);
        self.notice(NoticeKind::PeerBanned, format!("banned peer {addr}: {why}"));
        self.drop_peer(key);
    }

    pub(super) fn on_connected(
        &mut self,
        key: PeerKey,
        addr: SocketAddr,
        peer_id: [u8; 20],
        fast: bool,
        commands: Outbox,
    ) {
        self.table.connected(addr);
        {
            let p = self.peer_mut(key);
            p.commands = Some(commands);
            p.peer_id = Some(peer_id);
            p.fast = fast;
        }
        if self.table.is_banned_id(addr, &peer_id) {
            self.drop_peer(key);
            return;
        }
        let twin = self
            .peers
            .iter()
            .find(|(k, p)| {
                **k != key
                    && p.peer_id == Some(peer_id)
                    && p.is_connected()
                    && are_twins(p.addr, addr)
            })
            .map(|(k, p)| (*k, p.outbound));
        if let Some((other, other_outbound)) = twin {
            let this_outbound = self.peers[&key].outbound;
            let keep_this =
                keep_new_twin(&self.ctx.our_id, &peer_id, this_outbound, other_outbound);
            let (winner, loser) = if keep_this {
                (key, other)
            } else {
                (other, key)
            };
            if self.peers[&loser].outbound && !self.peers[&winner].outbound {
                let dialled = self.peers[&loser].addr;
                self.set_listen_addr(winner, dialled, true);
            }
            self.drop_peer(loser);
            if !keep_this {
                return;
            }
        }
        self.picker.add_peer(key);
        let summary = if self.picker.is_seed() {
            HaveSummary::All(bitfield(self.picker.have_flags()))
        } else if self.picker.have_count() == 0 {
            HaveSummary::None
        } else {
            HaveSummary::Some(bitfield(self.picker.have_flags()))
        };
        self.peers[&key].send(Command::Intro(summary));
    }

    /// Records where an inbound peer listens, so we do not dial it while connected.
    /// `proven`: seen from a twin connection we dialled; otherwise only claimed (BEP 10 `p`).
    pub(super) fn set_listen_addr(&mut self, key: PeerKey, addr: SocketAddr, proven: bool) {
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        if p.outbound || addr == p.addr || addr.port() == 0 || p.listen_addr == Some(addr) {
            p.listen_claimed &= !proven;
            return;
        }
        p.listen_claimed = !proven;
        if let Some(old) = p.listen_addr.replace(addr) {
            self.table.release(old);
        }
        self.table.hold(addr);
    }

    /// A listening address held only on a peer's claim is let go once the claimant has been
    /// of no use to an unfinished download for [`CLAIM_TRUST`]: it may be another peer's
    /// address (a claim costs nothing), and that peer is dialled after all.
    pub(super) fn distrust_idle_claims(&mut self) {
        if self.picker.is_complete() {
            return;
        }
        let mut released = Vec::new();
        for p in self.peers.values_mut() {
            if p.listen_claimed
                && !p.am_interested
                && p.connected_at.elapsed() >= CLAIM_TRUST
                && let Some(addr) = p.listen_addr.take()
            {
                p.listen_claimed = false;
                released.push(addr);
            }
        }
        for addr in released {
            self.table.release(addr);
            self.table.add([addr]);
        }
    }

    /// A connection ended: its addresses are released, its thread joined, and its address
    /// queued again when that is worth it (see `PeerTable::ended`).
    pub(super) fn on_gone(&mut self, key: PeerKey, error: Option<&PeerError>) {
        let Some(mut p) = self.peers.remove(&key) else {
            return;
        };
        // Two seeds have nothing to exchange; a leecher that left a seed may want data still
        // (aria2 leaves after fetching a magnet's metadata, and comes back for the data only
        // if dialled).
        let both_complete = self.picker.is_complete() && self.picker.peer_is_seed(key);
        self.picker.remove_peer(key);
        for addr in std::iter::once(p.addr).chain(p.listen_addr) {
            self.table.release(addr);
        }
        if let Some(n) = self.per_ip.get_mut(&p.addr.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&p.addr.ip());
            }
        }
        if let Some(t) = p.thread.take() {
            let _ = t.join();
        }
        if let Some(e) = error
            && p.outbound
            && p.peer_id.is_none()
            && self.named.contains(&p.addr)
            && !self.unreachable.contains_key(&p.addr)
        {
            self.unreachable.insert(p.addr, e.to_string());
            self.notice(
                NoticeKind::PeerUnreachable,
                format!("cannot reach peer {}: {e}; will retry", p.addr),
            );
        }
        if p.peer_id.is_some() {
            // It answered once: its earlier failure no longer stands.
            self.unreachable.remove(&p.addr);
        }
        // Only after a handshake: a garbled one (say an encrypted handshake we do not speak,
        // which aria2 tries first) is no proof of bad faith, and names nobody.
        if let Some(e) = error.filter(|e| e.is_violation())
            && p.peer_id.is_some()
            && !self.table.is_banned(p.addr)
        {
            // Its id is banned too (on its IP only), so it cannot come back inbound from
            // another port.
            self.table.ban(p.addr, p.peer_id);
            self.notice(
                NoticeKind::PeerBanned,
                format!("banned peer {}: {e}", p.addr),
            );
            // The same peer may have come back while this connection wound down.
            let back: Vec<PeerKey> = self
                .peers
                .iter()
                .filter(|(_, q)| q.addr.ip() == p.addr.ip() && q.peer_id == p.peer_id)
                .map(|(k, _)| *k)
                .collect();
            for k in back {
                self.drop_peer(k);
            }
        }
        let how = Ended {
            outbound: p.outbound,
            handshaken: p.peer_id.is_some(),
            dropped_by_us: p.dropped_by_us,
            never_again: error
                .is_some_and(|e| !e.may_redial() && !matches!(e, PeerError::SessionGone)),
            complete: both_complete,
        };
        self.table.ended(p.addr, how, Instant::now());
        if !p.am_choking {
            self.unchoke_free_slots();
        }
        self.fill_all();
    }
}
