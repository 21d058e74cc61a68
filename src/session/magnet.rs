//! The metadata phase of a magnet download: the session knows only the info hash. The
//! listener and the tracker thread are up already (they need no more than the hash); this
//! loop dials the magnet's and the trackers' peers with metadata-phase connections
//! (`meta_peer`), drives the pure [`MetadataFetch`] with their messages, and, once the info
//! dictionary hashes to the info hash, parses it with the same checks as a .torrent file and
//! collects the connections to hand over to the transfer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::engine::{Config, Event, NoticeKind};
use crate::error::Error;
use crate::messages::Input;
use crate::meta_peer::{self, MetaCommand, MetaContext, MetaEvent};
use crate::metadata::{LayerFetch, MetadataFetch, Outcome};
use crate::metainfo::{Metainfo, Version};
use crate::peer::{Dial, Handover, PeerError};
use crate::picker::PeerKey;

const TICK: Duration = Duration::from_millis(250);
/// How long the transfer waits for the metadata-phase connections to hand their sockets over.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// How long a v2-only torrent's piece layers may take to come in once its metadata is in.
const LAYERS_WAIT: Duration = Duration::from_secs(60);
/// Dial attempts per address in this phase, and the pause between two.
const MAX_DIALS: u32 = 5;
const REDIAL_AFTER: Duration = Duration::from_secs(10);
/// Addresses kept waiting to be dialled.
const MAX_CANDIDATES: usize = 4096;

/// The magnet's `x.pe` peers as addresses (host names resolved now; one that does not
/// resolve is left out).
pub(super) fn peers_of(m: &crate::magnet::Magnet) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for p in &m.peers {
        match p {
            crate::magnet::PeerAddr::Ip(a) => out.push(*a),
            crate::magnet::PeerAddr::Host { host, port } => {
                if let Ok(addrs) = (host.as_str(), *port).to_socket_addrs() {
                    out.extend(addrs.take(4));
                }
            }
        }
    }
    out
}

/// What the metadata phase gives the transfer.
pub(super) struct Fetched {
    pub meta: Metainfo,
    pub handovers: Vec<Handover>,
    /// Addresses banned in this phase (metadata that failed the hash, say): the transfer
    /// must not dial them again.
    pub banned: Vec<SocketAddr>,
}

struct Conn {
    addr: SocketAddr,
    commands: Option<Sender<MetaCommand>>,
    /// It set the v2 bit (BEP 52): it may answer hash requests.
    v2: bool,
    thread: Option<JoinHandle<()>>,
}

pub(super) struct Phase<'a> {
    pub info_hash: [u8; 20],
    /// Whether `info_hash` is a v1 hash, and the link's v2 info hash (BEP 52).
    pub has_v1: bool,
    pub info_hash_v2: Option<[u8; 32]>,
    pub trackers: Vec<Vec<String>>,
    pub peers: Vec<SocketAddr>,
    pub ctx: MetaContext,
    pub cfg: &'a Config,
    pub events: &'a Sender<Event>,
    pub stop: &'a AtomicBool,
    pub input_tx: &'a Sender<Input>,
    pub started: Instant,
    /// The DHT node (public torrents; a magnet is taken as public until its metadata says).
    pub dht: &'a mut Option<super::dht_source::DhtSource>,
}

struct State<'a> {
    p: Phase<'a>,
    fetch: MetadataFetch,
    conns: HashMap<PeerKey, Conn>,
    next_key: u64,
    candidates: VecDeque<SocketAddr>,
    dials: HashMap<SocketAddr, (u32, Instant)>,
    banned: HashSet<SocketAddr>,
    named: HashSet<SocketAddr>,
    reported: HashSet<SocketAddr>,
    trackers_failed: bool,
    last_progress: Instant,
    last_report: Instant,
}

/// Runs the metadata phase to the verified, parsed torrent (or to the run's end).
pub(super) fn fetch(p: Phase<'_>, input: &Receiver<Input>) -> Result<Fetched, Error> {
    let mut s = State {
        fetch: MetadataFetch::new(p.info_hash).with_v2(p.info_hash_v2, p.has_v1),
        conns: HashMap::new(),
        next_key: 0,
        candidates: VecDeque::new(),
        dials: HashMap::new(),
        banned: HashSet::new(),
        named: p.peers.iter().copied().collect(),
        reported: HashSet::new(),
        trackers_failed: false,
        last_progress: Instant::now(),
        last_report: Instant::now(),
        p,
    };
    let first = s.p.peers.clone();
    s.add_candidates(first);
    let result = s.run(input);
    match result {
        Ok(info) => {
            let mut meta = Metainfo::from_info(&info).map_err(|source| Error::Torrent {
                path: format!("the metadata of {}", hex(&s.p.info_hash)).into(),
                source,
            })?;
            if meta.version == Version::V2
                && let Err(e) = s.fetch_layers(&mut meta, input)
            {
                s.close_all();
                return Err(e);
            }
            meta.trackers = s.p.trackers.clone();
            let _ = s.p.events.send(Event::Metadata {
                size: info.len() as u64,
                pieces: crate::metadata::piece_count(info.len() as u32),
                peers: s.conns.len(),
            });
            let handovers = s.hand_over(input);
            Ok(Fetched {
                meta,
                handovers,
                banned: s.banned.iter().copied().collect(),
            })
        }
        Err(e) => {
            s.close_all();
            Err(e)
        }
    }
}

impl State<'_> {
    /// A stop request or the run's `--timeout` ends every part of this phase.
    fn check_stop(&self) -> Result<(), Error> {
        if self.p.stop.load(Ordering::SeqCst) {
            return Err(Error::Interrupted);
        }
        if self
            .p
            .cfg
            .timeout
            .is_some_and(|t| self.p.started.elapsed() >= t)
        {
            return Err(Error::Timeout);
        }
        Ok(())
    }

    fn run(&mut self, input: &Receiver<Input>) -> Result<Vec<u8>, Error> {
        let mut next_tick = Instant::now();
        loop {
            self.check_stop()?;
            if self
                .p
                .cfg
                .stall_timeout
                .is_some_and(|t| self.last_progress.elapsed() >= t)
            {
                return Err(Error::Stalled);
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
                self.check_sources()?;
            }
            let msg = match input.recv_deadline(next_tick) {
                Ok(m) => m,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    unreachable!("the session holds a sender")
                }
            };
            if let Some(info) = self.handle(msg)? {
                return Ok(info);
            }
        }
    }

    fn handle(&mut self, msg: Input) -> Result<Option<Vec<u8>>, Error> {
        match msg {
            Input::Meta { key, event } => return self.on_event(key, event),
            Input::Accepted { stream, addr }
                if !self.banned.contains(&addr) && self.conns.len() < self.p.cfg.max_peers =>
            {
                self.start(Dial::Inbound(stream, addr), addr);
            }
            Input::Peers(list) => {
                let _ = self.p.events.send(Event::PeersFound {
                    source: crate::engine::PeerSource::Tracker,
                    count: list.len(),
                });
                self.add_candidates(list);
            }
            Input::Dht(m) => {
                if let Some(d) = self.p.dht.as_mut() {
                    let peers = d.on_message(m, self.p.events);
                    self.add_candidates(peers);
                }
            }
            Input::NamedPeers(list) => {
                self.named.extend(list.iter().copied());
                self.add_candidates(list);
            }
            Input::TrackerNotice(m) => {
                let _ = self.p.events.send(Event::Notice {
                    kind: NoticeKind::Tracker,
                    message: m,
                });
            }
            Input::TrackerFailed { url, reason } => {
                let _ = self.p.events.send(Event::TrackerError {
                    url,
                    message: reason,
                });
            }
            Input::TrackersFailed => self.trackers_failed = true,
            Input::Panicked(what) => return Err(Error::Internal(what)),
            // Nothing else runs yet in this phase.
            _ => {}
        }
        Ok(None)
    }

    fn on_event(&mut self, key: PeerKey, event: MetaEvent) -> Result<Option<Vec<u8>>, Error> {
        let now = Instant::now();
        match event {
            MetaEvent::Connected { commands, v2 } => {
                if let Some(c) = self.conns.get_mut(&key) {
                    c.commands = Some(commands);
                    c.v2 = v2;
                }
            }
            // Never asked for yet (see `fetch_layers`).
            MetaEvent::Hashes { .. } | MetaEvent::HashReject(_) => {}
            MetaEvent::Extended(info) => {
                if info.ut_metadata.is_some()
                    && let Some(size) = info.metadata_size
                    && self.fetch.add_peer(key, size).is_ok()
                {
                    self.ask(key, now);
                }
            }
            MetaEvent::Data {
                piece,
                total_size,
                data,
            } => {
                self.last_progress = now;
                let outcome = self.fetch.on_data(key, piece, total_size, &data);
                return Ok(self.settle(key, outcome, now));
            }
            MetaEvent::Reject(piece) => {
                let outcome = self.fetch.on_reject(key, piece, now);
                return Ok(self.settle(key, outcome, now));
            }
            MetaEvent::HandedOver(h) => {
                // Not asked for yet: nothing to do with it now.
                drop(h);
                self.gone(key, None);
            }
            MetaEvent::Gone(error) => self.gone(key, error),
        }
        Ok(None)
    }

    fn settle(&mut self, key: PeerKey, outcome: Outcome, now: Instant) -> Option<Vec<u8>> {
        match outcome {
            Outcome::Continue => self.ask(key, now),
            Outcome::Drop(why) => {
                self.notice(key, &format!("dropped: it {why}"));
                self.close(key, false);
            }
            Outcome::HashFailed(f) => {
                for k in f.ban {
                    self.notice(k, "banned: its metadata did not match the info hash");
                    self.close(k, true);
                }
                self.ask_all(now);
            }
            Outcome::Complete(c) => {
                for k in c.ban {
                    self.close(k, true);
                }
                for k in c.wrong_size {
                    self.close(k, false);
                }
                return Some(c.info);
            }
        }
        None
    }

    fn notice(&self, key: PeerKey, what: &str) {
        if let Some(c) = self.conns.get(&key) {
            let _ = self.p.events.send(Event::Notice {
                kind: NoticeKind::PeerBanned,
                message: format!("peer {} {what}", c.addr),
            });
        }
    }

    fn ask(&mut self, key: PeerKey, now: Instant) {
        let Some(commands) = self.conns.get(&key).and_then(|c| c.commands.clone()) else {
            return;
        };
        while let Some(piece) = self.fetch.next_request(key, now) {
            if commands.try_send(MetaCommand::Request(piece)).is_err() {
                break;
            }
        }
    }

    fn ask_all(&mut self, now: Instant) {
        let keys: Vec<PeerKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.ask(k, now);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.fetch.expire(now);
        self.ask_all(now);
        self.dial(now);
        if let Some(d) = self.p.dht.as_mut() {
            d.tick(true);
        }
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            let (received, pieces) = self.fetch.progress();
            let _ = self.p.events.send(Event::MetadataProgress {
                peers: self.conns.len(),
                received,
                pieces,
            });
        }
    }

    fn add_candidates(&mut self, list: Vec<SocketAddr>) {
        for addr in list {
            if self.candidates.len() >= MAX_CANDIDATES {
                break;
            }
            if !self.candidates.contains(&addr) && !self.banned.contains(&addr) {
                self.candidates.push_back(addr);
            }
        }
    }

    fn dial(&mut self, now: Instant) {
        let room = self.p.cfg.max_peers.saturating_sub(self.conns.len());
        let mut later = Vec::new();
        let mut dialled = 0;
        while dialled < room {
            let Some(addr) = self.candidates.pop_front() else {
                break;
            };
            if self.banned.contains(&addr) || self.conns.values().any(|c| c.addr == addr) {
                continue;
            }
            let (tries, last) = self.dials.get(&addr).copied().unwrap_or((0, now));
            if tries >= MAX_DIALS {
                continue;
            }
            if tries > 0 && now.duration_since(last) < REDIAL_AFTER {
                later.push(addr);
                continue;
            }
            self.dials.insert(addr, (tries + 1, now));
            self.start(Dial::Outbound(addr), addr);
            dialled += 1;
        }
        self.candidates.extend(later);
    }

    fn start(&mut self, dial: Dial, addr: SocketAddr) {
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        match meta_peer::spawn(key, dial, self.p.ctx.clone(), self.p.input_tx.clone()) {
            Ok(thread) => {
                self.conns.insert(
                    key,
                    Conn {
                        addr,
                        commands: None,
                        v2: false,
                        thread: Some(thread),
                    },
                );
            }
            Err(_) => self.candidates.push_back(addr),
        }
    }

    fn gone(&mut self, key: PeerKey, error: Option<PeerError>) {
        self.fetch.remove_peer(key);
        let Some(mut c) = self.conns.remove(&key) else {
            return;
        };
        if let Some(t) = c.thread.take() {
            let _ = t.join();
        }
        let Some(e) = error else {
            // Closed cleanly: may be dialled again later.
            self.candidates.push_back(c.addr);
            return;
        };
        if e.is_violation() {
            self.banned.insert(c.addr);
        } else if e.may_redial() {
            self.candidates.push_back(c.addr);
        }
        if self.named.contains(&c.addr)
            && matches!(e, PeerError::Connect(_))
            && self.reported.insert(c.addr)
        {
            let _ = self.p.events.send(Event::Notice {
                kind: NoticeKind::PeerUnreachable,
                message: format!("cannot connect to peer {}: {e}", c.addr),
            });
        }
    }

    fn close(&mut self, key: PeerKey, ban: bool) {
        self.fetch.remove_peer(key);
        if let Some(c) = self.conns.get_mut(&key) {
            if ban {
                self.banned.insert(c.addr);
            }
            if let Some(tx) = c.commands.take() {
                let _ = tx.try_send(MetaCommand::Close);
            }
        }
    }

    /// A v2-only torrent's info dictionary names each file's root but carries no piece
    /// layers: they are asked of the connected peers (BEP 52 hash requests), each
    /// answer checked up to its file's root, until every file larger than a piece has its
    /// layer. A peer whose answer does not prove out is banned.
    fn fetch_layers(&mut self, meta: &mut Metainfo, input: &Receiver<Input>) -> Result<(), Error> {
        let Some(v2) = meta.v2.as_mut() else {
            return Ok(());
        };
        let mut layers = LayerFetch::new(v2);
        let deadline = Instant::now() + LAYERS_WAIT;
        let mut next_tick = Instant::now();
        while !layers.is_done() {
            let now = Instant::now();
            self.check_stop()?;
            if now >= deadline {
                return Err(Error::NoPeers(
                    "the piece layers of this v2 torrent did not come: no peer answered its hash requests (BEP 52); try its .torrent file".into(),
                ));
            }
            if now >= next_tick {
                next_tick = now + TICK;
                self.tick();
                layers.expire(now);
            }
            // Every connection is asked: libtorrent answers hash requests without setting the
            // v2 bit in its handshake. One that cannot answer rejects or hangs up.
            for (key, c) in &self.conns {
                let Some(commands) = c.commands.as_ref() else {
                    continue;
                };
                while let Some(req) = layers.next_request(*key, now) {
                    if commands.try_send(MetaCommand::Hashes(req)).is_err() {
                        layers.forget(*key);
                        break;
                    }
                }
            }
            let msg = match input.recv_deadline(next_tick) {
                Ok(m) => m,
                Err(_) => continue,
            };
            match msg {
                Input::Meta {
                    key,
                    event: MetaEvent::Hashes { req, hashes },
                } => match layers.on_hashes(key, &req, &hashes) {
                    Ok(Some((root, layer))) => {
                        self.last_progress = Instant::now();
                        let fits = v2.offer_layer(&root, layer);
                        debug_assert!(fits, "a proven layer fits its file");
                    }
                    Ok(None) => {}
                    Err(why) => {
                        self.notice(
                            key,
                            &format!("banned: its hashes did not prove out ({why:?})"),
                        );
                        layers.forget(key);
                        self.close(key, true);
                    }
                },
                Input::Meta {
                    key,
                    event: MetaEvent::HashReject(req),
                } => layers.on_reject(key, &req),
                Input::Meta { key, event } => {
                    if matches!(event, MetaEvent::Gone(_)) {
                        layers.forget(key);
                    }
                    // Metadata traffic no longer matters; connections coming and going do.
                    if matches!(
                        event,
                        MetaEvent::Connected { .. } | MetaEvent::Gone(_) | MetaEvent::HandedOver(_)
                    ) {
                        self.on_event(key, event)?;
                    }
                }
                other => {
                    self.handle(other)?;
                }
            }
        }
        Ok(())
    }

    /// With no tracker answering, nobody connected and nobody left to dial, nothing can come.
    fn check_sources(&self) -> Result<(), Error> {
        let hopeful = self
            .candidates
            .iter()
            .any(|a| self.dials.get(a).is_none_or(|(n, _)| *n < MAX_DIALS));
        let dht = self.p.dht.as_ref();
        if (self.trackers_failed || self.p.trackers.is_empty())
            && dht.is_none_or(|d| d.exhausted())
            && self.conns.is_empty()
            && !hopeful
        {
            let dht = dht.map_or(String::new(), |d| format!(", {}", d.why_exhausted()));
            return Err(Error::NoPeers(format!(
                "the metadata cannot be fetched: no tracker answered{dht} and no peer could \
                 be reached (add --peer HOST:PORT?)"
            )));
        }
        Ok(())
    }

    /// Asks every connection for its socket and collects them, for a bounded time.
    fn hand_over(&mut self, input: &Receiver<Input>) -> Vec<Handover> {
        for c in self.conns.values_mut() {
            if let Some(tx) = &c.commands {
                let _ = tx.try_send(MetaCommand::HandOver);
            }
        }
        let deadline = Instant::now() + HANDOVER_WAIT;
        let mut out = Vec::new();
        let mut early = Vec::new();
        while !self.conns.is_empty() {
            match input.recv_deadline(deadline) {
                Ok(Input::Meta { key, event }) => match event {
                    MetaEvent::HandedOver(h) => {
                        if let Some(mut c) = self.conns.remove(&key) {
                            if let Some(t) = c.thread.take() {
                                let _ = t.join();
                            }
                            out.push(*h);
                        }
                    }
                    MetaEvent::Gone(_) => {
                        if let Some(mut c) = self.conns.remove(&key)
                            && let Some(t) = c.thread.take()
                        {
                            let _ = t.join();
                        }
                    }
                    MetaEvent::Connected { commands, .. } => {
                        let _ = commands.try_send(MetaCommand::HandOver);
                    }
                    _ => {}
                },
                // Kept for the transfer, in order.
                Ok(other) => early.push(other),
                Err(_) => break,
            }
        }
        // Late ones are left to end on their own (their channel is closed below).
        self.conns.clear();
        for msg in early {
            // The transfer reads this channel next; never block on it here.
            let _ = self.p.input_tx.try_send(msg);
        }
        out
    }

    fn close_all(&mut self) {
        for c in self.conns.values_mut() {
            if let Some(tx) = c.commands.take() {
                let _ = tx.try_send(MetaCommand::Close);
            }
        }
        self.conns.clear();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetched")
            .field("info_hash", &self.meta.info_hash)
            .field("handovers", &self.handovers.len())
            .finish()
    }
}
