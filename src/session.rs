//! The session thread: the one owner of the picker, the storage writer and the peer table.
//!
//! Every other thread talks to it through [`Input`] on one bounded channel, and it answers
//! peers through each connection's [`Command`] channel. It never blocks on a peer: command
//! channels are unbounded (their volume is bounded by the pipeline depth), while the input
//! channel is bounded so that fast peers feel back-pressure through TCP instead of growing our
//! memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::cli::{self, DownloadArgs, SeedArgs};
use crate::error::Error;
use crate::geometry::{BlockRef, PieceIndex};
use crate::messages::{Command, Input, PeerEvent};
use crate::metainfo::Metainfo;
use crate::peer::{self, Dial};
use crate::picker::{BlockOutcome, PeerKey, Picker};
use crate::progress::Progress;
use crate::rng::{self, Rng};
use crate::storage::{self, Layout, Storage, Writer};
use crate::tracker::{NetConfig, Stats, Tracker, TrackerCommand};

/// Blocks kept requested from one peer. 64 × 16 KiB = 1 MiB in flight, enough for a fast
/// link, and well within what Transmission, libtorrent and aria2 accept.
const PIPELINE_DEPTH: usize = 64;
/// Top a pipeline up once this many slots are free, so requests go out in batches.
const REFILL_BATCH: usize = 8;
const UPLOAD_SLOTS: usize = 8;
const MAX_PEERS: usize = 50;
const INPUT_CAPACITY: usize = 1024;
const TICK: Duration = Duration::from_millis(500);
const MAX_DIAL_FAILURES: u32 = 5;
/// Below this many connections the tracker is asked for more peers early.
const WANT_PEERS: usize = 10;

pub struct Config {
    pub peers: Vec<SocketAddr>,
    pub port: u16,
    pub net: NetConfig,
    pub announce_interval: Option<Duration>,
    pub seed_after: bool,
    pub quiet: bool,
}

pub fn download(a: &DownloadArgs) -> Result<(), Error> {
    let meta = cli::load_torrent(&a.torrent)?;
    let peers = cli::parse_peers(&a.peer)?;
    storage::install_stop_handler();
    fs::create_dir_all(&a.output)
        .map_err(|e| Error::io(format!("creating {}", a.output.display()), e))?;
    let layout = Layout::in_dir(&a.output, &meta);
    // Only data that was there before us needs checking; fresh files are all zeros.
    let resuming = (0..layout.files.len()).any(|i| {
        fs::symlink_metadata(layout.full_path(i)).is_ok_and(|m| m.is_file() && m.len() > 0)
    });
    let (storage, writer) = Storage::create(&layout, &meta.geometry)?;
    let have = if resuming {
        storage.verify_all(&meta, cli::threads())
    } else {
        vec![false; meta.geometry.piece_count() as usize]
    };
    let config = Config {
        peers,
        port: a.port,
        net: cli::net_config(a.bind, a.ca_file.as_deref()),
        announce_interval: a.announce_interval.map(Duration::from_secs),
        seed_after: a.seed,
        quiet: a.quiet,
    };
    run(meta, storage, Some(writer), have, config)
}

pub fn seed(a: &SeedArgs) -> Result<(), Error> {
    let meta = cli::load_torrent(&a.torrent)?;
    let peers = cli::parse_peers(&a.peer)?;
    storage::install_stop_handler();
    let layout = Layout::for_data_path(&a.data, &meta);
    let storage = Storage::open_existing(&layout, &meta.geometry)?;
    let have = storage.verify_all(&meta, cli::threads());
    let bad = have.iter().filter(|h| !**h).count() as u32;
    if bad > 0 {
        return Err(Error::Incomplete {
            bad,
            total: have.len() as u32,
        });
    }
    let config = Config {
        peers,
        port: a.port,
        net: cli::net_config(a.bind, a.ca_file.as_deref()),
        announce_interval: a.announce_interval.map(Duration::from_secs),
        seed_after: true,
        quiet: a.quiet,
    };
    run(meta, Arc::new(storage), None, have, config)
}

struct Peer {
    addr: SocketAddr,
    outbound: bool,
    thread: Option<JoinHandle<()>>,
    /// Set once the handshake is done.
    commands: Option<Sender<Command>>,
    peer_id: Option<[u8; 20]>,
    am_choking: bool,
    am_interested: bool,
    peer_choking: bool,
    peer_interested: bool,
}

impl Peer {
    fn send(&self, cmd: Command) {
        if let Some(c) = &self.commands {
            // A closed channel means the connection is ending; its Gone event will follow.
            let _ = c.send(cmd);
        }
    }
}

struct Session {
    ctx: Arc<peer::Context>,
    writer: Option<Writer>,
    picker: Picker,
    peers: HashMap<PeerKey, Peer>,
    next_key: u64,
    candidates: VecDeque<SocketAddr>,
    /// Addresses connected or being dialled, and failure counts of past attempts.
    known: HashSet<SocketAddr>,
    failures: HashMap<SocketAddr, (u32, Instant)>,
    own_addrs: Vec<SocketAddr>,
    input_tx: Sender<Input>,
    hash_tx: Option<Sender<PieceIndex>>,
    tracker_tx: Option<Sender<TrackerCommand>>,
    stats: Arc<Stats>,
    progress: Progress,
    seed_after: bool,
    downloaded: u64,
    was_complete: bool,
    last_need_peers: Instant,
}

/// Listens on the `--bind` address, or on both IPv4 and IPv6 (one dual-stack socket) when
/// none is given, falling back to IPv4 where IPv6 is unavailable.
fn bind_listener(cfg: &Config) -> Result<TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let fail = |ip: IpAddr, e| Error::io(format!("listening on {ip} port {}", cfg.port), e);
    if let Some(ip) = cfg.net.bind {
        return TcpListener::bind((ip, cfg.port)).map_err(|e| fail(ip, e));
    }
    let dual = (|| -> std::io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), cfg.port).into())?;
        s.listen(128)?;
        Ok(s.into())
    })();
    dual.or_else(|_| {
        let ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        TcpListener::bind((ip, cfg.port)).map_err(|e| fail(ip, e))
    })
}

fn spawn_listener(listener: TcpListener, tx: Sender<Input>) {
    let _ = thread::Builder::new()
        .name("listener".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let Ok(addr) = stream.peer_addr() else {
                    continue;
                };
                if tx.send(Input::Accepted { stream, addr }).is_err() {
                    break;
                }
            }
        });
}

/// Hasher threads: check complete pieces off the session thread.
fn spawn_hashers(
    meta: &Arc<Metainfo>,
    storage: &Arc<Storage>,
    out: &Sender<Input>,
) -> Sender<PieceIndex> {
    let (tx, rx) = crossbeam_channel::unbounded::<PieceIndex>();
    for i in 0..cli::threads() {
        let (rx, out, meta, storage) = (
            rx.clone(),
            out.clone(),
            Arc::clone(meta),
            Arc::clone(storage),
        );
        let _ = thread::Builder::new()
            .name(format!("hasher-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut scratch = Vec::new();
                for piece in rx {
                    let ok = storage.piece_matches(piece, meta.piece_hash(piece), &mut scratch);
                    if out.send(Input::Hashed { piece, ok }).is_err() {
                        break;
                    }
                }
            });
    }
    tx
}

fn run(
    meta: Metainfo,
    storage: Arc<Storage>,
    writer: Option<Writer>,
    have: Vec<bool>,
    cfg: Config,
) -> Result<(), Error> {
    let meta = Arc::new(meta);
    let mut rng = Rng::from_os();
    let our_id = rng::peer_id(&mut rng);
    let listener = bind_listener(&cfg)?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;
    eprintln!("bitfetch: listening on {local}");

    let (input_tx, input_rx) = crossbeam_channel::bounded(INPUT_CAPACITY);
    spawn_listener(listener, input_tx.clone());

    let geometry = meta.geometry.clone();
    let picker = Picker::new(geometry.clone(), have, rng.next_u64());
    let stats = Arc::new(Stats::default());
    stats.left.store(picker.bytes_left(), Ordering::Relaxed);

    let (tracker_tx, tracker_rx) = crossbeam_channel::unbounded();
    let tracker = Tracker {
        tiers: meta.trackers.clone(),
        info_hash: meta.info_hash,
        peer_id: our_id,
        port: local.port(),
        stats: Arc::clone(&stats),
        interval_override: cfg.announce_interval,
        net: cfg.net.clone(),
    };
    let (tracker_done_tx, tracker_done) = crossbeam_channel::bounded::<()>(1);
    {
        let out = input_tx.clone();
        thread::Builder::new()
            .name("tracker".into())
            .spawn(move || {
                tracker.run(tracker_rx, out);
                let _ = tracker_done_tx.send(());
            })
            .map_err(|e| Error::io("starting the tracker thread", e))?;
    }

    let hash_tx = writer
        .as_ref()
        .map(|_| spawn_hashers(&meta, &storage, &input_tx));
    let total = geometry.total_len();
    let done = total - picker.bytes_left();
    let mut own_addrs = vec![local];
    if local.ip().is_unspecified() {
        own_addrs.push(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            local.port(),
        ));
    }
    let mut s = Session {
        ctx: Arc::new(peer::Context {
            info_hash: meta.info_hash,
            our_id,
            geometry,
            storage,
            bind: cfg.net.bind,
        }),
        writer,
        was_complete: picker.is_complete(),
        picker,
        peers: HashMap::new(),
        next_key: 0,
        candidates: cfg.peers.iter().copied().collect(),
        known: HashSet::new(),
        failures: HashMap::new(),
        own_addrs,
        input_tx,
        hash_tx,
        tracker_tx: Some(tracker_tx),
        stats,
        progress: Progress::new(total, done, cfg.quiet || cfg.seed_after && done == total),
        seed_after: cfg.seed_after,
        downloaded: 0,
        last_need_peers: Instant::now(),
    };
    let result = s.main_loop(&input_rx);
    s.shutdown(&tracker_done, &input_rx);
    result
}

impl Session {
    fn main_loop(&mut self, input: &Receiver<Input>) -> Result<(), Error> {
        let mut next_tick = Instant::now();
        self.dial();
        loop {
            match input.recv_timeout(TICK) {
                Ok(msg) => self.handle(msg)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the session holds a sender"),
            }
            if storage::stop_requested() {
                return if self.picker.is_complete() {
                    Ok(())
                } else {
                    Err(Error::Interrupted)
                };
            }
            if self.picker.is_complete() && !self.seed_after {
                return Ok(());
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
            }
        }
    }

    fn tick(&mut self) {
        self.dial();
        let connected = self.peers.len();
        if connected < WANT_PEERS
            && !self.picker.is_complete()
            && self.last_need_peers.elapsed() >= Duration::from_secs(30)
            && let Some(t) = &self.tracker_tx
        {
            self.last_need_peers = Instant::now();
            let _ = t.send(TrackerCommand::NeedPeers);
        }
        self.unchoke_interested();
        let peers = self.peers.values().filter(|p| p.commands.is_some()).count();
        let seeds = self
            .peers
            .keys()
            .filter(|k| self.picker.peer_is_seed(**k))
            .count();
        let total = self.picker.geometry().total_len();
        self.progress.update(
            total - self.stats.left.load(Ordering::Relaxed),
            peers,
            seeds,
        );
    }

    fn handle(&mut self, msg: Input) -> Result<(), Error> {
        match msg {
            Input::Peer { key, event } => self.on_peer_event(key, event)?,
            Input::Accepted { stream, addr } => {
                if self.peers.len() < MAX_PEERS {
                    self.start_peer(Dial::Inbound(stream, addr), addr, false);
                }
            }
            Input::Peers(list) => {
                for addr in list {
                    if !self.own_addrs.contains(&addr)
                        && !self.known.contains(&addr)
                        && !self.candidates.contains(&addr)
                    {
                        self.candidates.push_back(addr);
                    }
                }
                self.dial();
            }
            Input::TrackerNotice(m) => self.progress.note(&m),
            Input::Hashed { piece, ok } => self.on_hashed(piece, ok)?,
        }
        Ok(())
    }

    fn start_peer(&mut self, dial: Dial, addr: SocketAddr, outbound: bool) {
        let key = PeerKey(self.next_key);
        self.next_key += 1;
        match peer::spawn(key, dial, Arc::clone(&self.ctx), self.input_tx.clone()) {
            Ok(thread) => {
                self.known.insert(addr);
                self.peers.insert(
                    key,
                    Peer {
                        addr,
                        outbound,
                        thread: Some(thread),
                        commands: None,
                        peer_id: None,
                        am_choking: true,
                        am_interested: false,
                        peer_choking: true,
                        peer_interested: false,
                    },
                );
            }
            Err(e) => self
                .progress
                .note(&format!("cannot start a peer thread: {e}")),
        }
    }

    /// Dials candidates while there is room, skipping those in back-off.
    fn dial(&mut self) {
        let now = Instant::now();
        let mut deferred = Vec::new();
        while self.peers.len() < MAX_PEERS {
            let Some(addr) = self.candidates.pop_front() else {
                break;
            };
            if self.known.contains(&addr) {
                continue;
            }
            match self.failures.get(&addr) {
                Some((n, _)) if *n >= MAX_DIAL_FAILURES => continue,
                Some((_, retry_at)) if *retry_at > now => deferred.push(addr),
                _ => self.start_peer(Dial::Outbound(addr), addr, true),
            }
        }
        self.candidates.extend(deferred);
    }

    fn on_peer_event(&mut self, key: PeerKey, event: PeerEvent) -> Result<(), Error> {
        if !self.peers.contains_key(&key) {
            return Ok(());
        }
        match event {
            PeerEvent::Connected {
                addr,
                peer_id,
                commands,
                ..
            } => self.on_connected(key, addr, peer_id, commands),
            PeerEvent::Bitfield(bits) => {
                self.picker.peer_has_bits(key, &bits);
                self.update_interest(key);
            }
            PeerEvent::Have(piece) => {
                if self.picker.peer_has(key, piece) {
                    self.update_interest(key);
                }
            }
            PeerEvent::HaveAll => {
                self.picker.peer_has_all(key);
                self.update_interest(key);
            }
            PeerEvent::HaveNone => {}
            PeerEvent::Choke => {
                self.peer_mut(key).peer_choking = true;
                self.picker.peer_choked(key);
                self.fill_all();
            }
            PeerEvent::Unchoke => {
                self.peer_mut(key).peer_choking = false;
                self.fill(key);
            }
            PeerEvent::Interested => {
                self.peer_mut(key).peer_interested = true;
                self.unchoke_interested();
            }
            PeerEvent::NotInterested => {
                let p = self.peer_mut(key);
                p.peer_interested = false;
                if !p.am_choking {
                    p.am_choking = true;
                    p.send(Command::Choke(true));
                }
            }
            PeerEvent::Block { block, data } => self.on_block(key, block, &data),
            PeerEvent::Uploaded(n) => {
                self.stats
                    .uploaded
                    .fetch_add(u64::from(n), Ordering::Relaxed);
            }
            PeerEvent::Gone { reason } => self.on_gone(key, &reason),
        }
        Ok(())
    }

    fn peer_mut(&mut self, key: PeerKey) -> &mut Peer {
        self.peers.get_mut(&key).expect("caller checked the key")
    }

    fn on_connected(
        &mut self,
        key: PeerKey,
        addr: SocketAddr,
        peer_id: [u8; 20],
        commands: Sender<Command>,
    ) {
        self.failures.remove(&addr);
        let duplicate = self
            .peers
            .iter()
            .any(|(k, p)| *k != key && p.peer_id == Some(peer_id));
        let p = self.peer_mut(key);
        p.commands = Some(commands);
        p.peer_id = Some(peer_id);
        if duplicate {
            // Keep the older connection; this one's Gone event will clean up.
            p.send(Command::Shutdown);
            return;
        }
        self.picker.add_peer(key);
        if self.picker.have_count() > 0 {
            let bits = bitfield(self.picker.have_flags());
            self.peers[&key].send(Command::Bitfield(bits));
        }
    }

    fn update_interest(&mut self, key: PeerKey) {
        let want = self.picker.is_interesting(key);
        let p = self.peer_mut(key);
        if p.am_interested != want {
            p.am_interested = want;
            p.send(Command::Interested(want));
        }
        if want {
            self.fill(key);
        }
    }

    /// Tops up `key`'s request pipeline.
    fn fill(&mut self, key: PeerKey) {
        let Some(p) = self.peers.get(&key) else {
            return;
        };
        if p.peer_choking || !p.am_interested || p.commands.is_none() {
            return;
        }
        let outstanding = self.picker.outstanding(key);
        let room = PIPELINE_DEPTH.saturating_sub(outstanding);
        if room < REFILL_BATCH && outstanding > 0 {
            return;
        }
        let blocks = self.picker.assign(key, room);
        if !blocks.is_empty() {
            self.peers[&key].send(Command::Request(blocks));
        }
    }

    fn fill_all(&mut self) {
        let keys: Vec<PeerKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.fill(k);
        }
    }

    fn on_block(&mut self, key: PeerKey, block: BlockRef, data: &[u8]) {
        self.stats
            .downloaded
            .fetch_add(u64::from(block.len), Ordering::Relaxed);
        self.downloaded += u64::from(block.len);
        match self.picker.block_received(key, block) {
            BlockOutcome::Accepted {
                piece_complete,
                cancel,
            } => {
                if let Some(w) = &mut self.writer {
                    w.write_block(block, data);
                }
                for other in cancel {
                    if let Some(p) = self.peers.get(&other) {
                        p.send(Command::Cancel(block));
                    }
                }
                if piece_complete && let Some(tx) = &self.hash_tx {
                    let _ = tx.send(block.piece);
                }
            }
            BlockOutcome::Duplicate | BlockOutcome::Unrequested => {}
        }
        self.fill(key);
    }

    fn on_hashed(&mut self, piece: PieceIndex, ok: bool) -> Result<(), Error> {
        if !ok {
            let senders = self.picker.piece_failed(piece);
            self.progress.note(&format!(
                "piece {piece} failed its hash check (from {} peer(s)); fetching it again",
                senders.len()
            ));
            self.fill_all();
            return Ok(());
        }
        let bored = self.picker.piece_verified(piece);
        if let Some(w) = &mut self.writer {
            w.release_piece(piece);
        }
        let len = u64::from(self.picker.geometry().piece_len(piece));
        self.stats.left.fetch_sub(len, Ordering::Relaxed);
        for p in self.peers.values() {
            p.send(Command::Have(piece));
        }
        for key in bored {
            self.update_interest(key);
        }
        if self.picker.is_complete() && !self.was_complete {
            self.was_complete = true;
            self.on_complete()?;
        }
        Ok(())
    }

    fn on_complete(&mut self) -> Result<(), Error> {
        if let Some(w) = &mut self.writer {
            w.flush()?;
        }
        if let Some(t) = &self.tracker_tx {
            let _ = t.send(TrackerCommand::Completed);
        }
        self.progress.finish(self.downloaded);
        Ok(())
    }

    fn on_gone(&mut self, key: PeerKey, _reason: &str) {
        let Some(mut p) = self.peers.remove(&key) else {
            return;
        };
        self.picker.remove_peer(key);
        self.known.remove(&p.addr);
        if let Some(t) = p.thread.take() {
            let _ = t.join();
        }
        if p.outbound && p.peer_id.is_none() {
            // Never got through the handshake: retry later, a few times.
            let entry = self.failures.entry(p.addr).or_insert((0, Instant::now()));
            entry.0 += 1;
            entry.1 = Instant::now() + Duration::from_secs(5 << entry.0.min(6));
            self.candidates.push_back(p.addr);
        }
        if p.am_choking {
            self.fill_all();
        } else {
            self.unchoke_interested();
            self.fill_all();
        }
    }

    /// Unchokes interested peers up to the slot limit (the full choking algorithm is its
    /// own piece of work).
    fn unchoke_interested(&mut self) {
        let mut open = self.peers.values().filter(|p| !p.am_choking).count();
        for p in self.peers.values_mut() {
            if open >= UPLOAD_SLOTS {
                break;
            }
            if p.am_choking && p.peer_interested && p.commands.is_some() {
                p.am_choking = false;
                p.send(Command::Choke(false));
                open += 1;
            }
        }
    }

    fn shutdown(&mut self, tracker_done: &Receiver<()>, input: &Receiver<Input>) {
        if let Some(t) = self.tracker_tx.take() {
            let _ = t.send(TrackerCommand::Stop);
        }
        self.hash_tx = None;
        for p in self.peers.values() {
            p.send(Command::Shutdown);
        }
        // Peer threads end once their sockets close; drain their events so none blocks on a
        // full channel, and join them. Bounded: a stuck thread is left to process exit.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.peers.is_empty() && Instant::now() < deadline {
            if let Ok(Input::Peer {
                key,
                event: PeerEvent::Gone { .. },
            }) = input.recv_deadline(deadline)
                && let Some(mut p) = self.peers.remove(&key)
                && let Some(t) = p.thread.take()
            {
                let _ = t.join();
            }
        }
        if let Some(w) = &mut self.writer {
            let _ = w.flush();
        }
        // The `stopped` announce has its own short timeout; an announce already in flight
        // is not waited for past this bound, so Ctrl-C stays quick.
        let _ = tracker_done.recv_timeout(Duration::from_millis(1500));
    }
}

/// Packs have-flags into a BEP 3 bitfield (high bit first).
pub fn bitfield(have: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; have.len().div_ceil(8)];
    for (i, _) in have.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitfield_packs_high_bit_first() {
        assert_eq!(bitfield(&[true, false, true]), vec![0b1010_0000]);
        assert_eq!(bitfield(&[false; 9]), vec![0, 0]);
        assert_eq!(bitfield(&[true; 9]), vec![0xff, 0x80]);
    }
}
