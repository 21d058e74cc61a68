//! The session thread: the one owner of the picker, the storage writer, the peer table and the
//! choker.
//!
//! Every other thread talks to it through [`Input`] on one bounded channel, and it answers
//! peers through each connection's outbox of [`Command`]s. It never blocks on a peer: an
//! outbox keeps state (the latest choke and interest, capped lists of requests and haves) and
//! ends its connection when a cap is reached, while the input channel is bounded so that fast
//! peers feel back-pressure through TCP instead of growing our memory.
//!
//! `mod.rs` holds start-up, the main loop, seeding limits and shutdown; `peers.rs` the peer
//! table (dialling, duplicates, bans, pruning); `transfer.rs` what flows over connections
//! (interest, requests, blocks, hashes, choking).

mod dht_source;
mod magnet;
mod peer_table;
mod peers;
mod pex;
mod stream;
mod transfer;
mod webseeds;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::choker::Choker;
use crate::engine::{Choice, Config, Event, MagnetSource, NoticeKind, Source, StreamTo, Target};
use crate::error::Error;
use crate::geometry::PieceIndex;
use crate::messages::{Command, Input, PeerEvent};
use crate::metainfo::Metainfo;
use crate::peer;
use crate::picker::{PeerKey, Picker};
use crate::ratelimit::TokenBucket;
use crate::rng::{self, Rng};
use crate::storage::{Layout, Storage, Undo, Writer};
use crate::tracker::{Stats, Tracker, TrackerCommand};

use dht_source::DhtSource;
use peer_table::PeerTable;
use peers::Peer;

pub(crate) const INPUT_CAPACITY: usize = 1024;
/// Bytes of complete pieces that may wait for the hashers before the download pauses asking
/// for more. A piece's pages stay in our resident memory until it is hashed, so when the
/// hashers fall behind (both cores busy) this, not the torrent's size, bounds the memory.
const HASH_BACKLOG: u64 = 2 * 1024 * 1024;
const TICK: Duration = Duration::from_millis(250);
/// Inputs handled per wake-up before the loop's checks run again.
const MAX_BATCH: usize = 256;
const RECHOKE_EVERY: Duration = Duration::from_secs(10);
/// Peers named by the front end that are followed by name (for failure reports).
const MAX_NAMED: usize = 1024;
/// Below this many connections the tracker is asked for more peers early.
const WANT_PEERS: usize = 10;

/// Everything a run starts from (built by `Engine::start`).
pub(crate) struct Run {
    pub source: Source,
    pub target: Target,
    pub config: Config,
    pub events: Sender<Event>,
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    pub input: (Sender<Input>, Receiver<Input>),
}

/// The storage side of a run, ready for the transfer.
struct Prepared {
    storage: Arc<Storage>,
    /// None when seeding (nothing is written).
    writer: Option<Writer>,
    have: Vec<bool>,
    /// Which files are fetched (all when `None`).
    selected: Option<Vec<bool>>,
    /// Per file of the torrent, its full path when it is fetched to disk (not when
    /// unselected or streamed): reported as it completes, and all together at the end.
    paths: Vec<Option<PathBuf>>,
    stream: Option<StreamTo>,
    /// What preparing had to skip (links it would not make), told once the run starts.
    notices: Vec<String>,
    /// The file (in the download directory) that keeps the boundary bytes of unselected
    /// files; removed after success.
    spill: Option<String>,
    /// What preparing the download created: taken back when the run ends having verified
    /// nothing (its files hold only zeros).
    created: Option<Undo>,
}

/// What a magnet's metadata phase started and leaves to the transfer: the listener and the
/// tracker thread (they needed only the info hash), our peer id, and the connections.
struct Started {
    threads: Helpers,
    local: SocketAddr,
    tracker_tx: Option<Sender<TrackerCommand>>,
    our_id: [u8; 20],
    handovers: Vec<peer::Handover>,
    banned: Vec<SocketAddr>,
}

impl Started {
    /// The run ends before the transfer: `stopped` to the trackers (bounded wait), the
    /// listener closed, the handed-over sockets dropped.
    fn shut_down(mut self, input: &Receiver<Input>) {
        self.handovers.clear();
        if let Some(t) = self.tracker_tx.take() {
            let _ = t.send(TrackerCommand::Stop);
            let deadline = Instant::now() + Duration::from_millis(1500);
            while let Ok(msg) = input.recv_deadline(deadline) {
                if matches!(msg, Input::TrackerDone) {
                    if let Some(t) = self.threads.tracker.take() {
                        let _ = t.join();
                    }
                    break;
                }
            }
        }
        if let Some(l) = self.threads.listener.take() {
            l.close();
        }
        if let Some(d) = self.threads.dht.take() {
            d.stop();
        }
    }
}

/// `left` announced while a magnet's size is unknown: not zero, which would say "seeder".
const LEFT_UNKNOWN: u64 = 16 * 1024;

/// A magnet's metadata phase: listener and tracker up, the info dictionary fetched and
/// parsed, the front end's choice of files. `None`: the chooser ended the run here.
fn magnet_phase(
    m: MagnetSource,
    target: Target,
    cfg: &mut Config,
    events: &Sender<Event>,
    stop: &Arc<AtomicBool>,
    stats: &Arc<Stats>,
    (input_tx, input_rx): (&Sender<Input>, &Receiver<Input>),
) -> Result<Option<(Metainfo, Target, Started)>, Error> {
    let Target::Download {
        dir,
        selected,
        stream,
    } = target
    else {
        return Err(Error::Usage(
            "a magnet link can be downloaded, not seeded: seed from the data and a .torrent".into(),
        ));
    };
    let magnet = m.magnet;
    // The link's web seeds come before the user's.
    let mut web_seeds = magnet.web_seeds.clone();
    web_seeds.append(&mut cfg.web_seeds);
    cfg.web_seeds = web_seeds;
    let mut rng = Rng::from_os();
    let our_id = rng::peer_id(&mut rng);
    let listener = bind_listener(cfg)?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;
    let mut threads = Helpers {
        listener: Some(spawn_listener(listener, input_tx)?),
        ..Helpers::default()
    };
    let _ = events.send(Event::Listening(local));
    stats.left.store(LEFT_UNKNOWN, Ordering::Relaxed);
    let tiers = magnet.tracker_tiers();
    let (tracker_tx, tracker) = spawn_tracker(
        tiers.clone(),
        (
            magnet.info_hash,
            magnet
                .info_hash_v2
                .filter(|_| magnet.has_v1)
                .map(|v2| v2[..20].try_into().expect("20 of 32 bytes")),
        ),
        our_id,
        local.port(),
        stats,
        cfg,
        input_tx,
    )?;
    threads.tracker = Some(tracker);
    threads.dht = DhtSource::start(cfg, magnet.info_hash, local, input_tx, events);
    let mut started = Started {
        threads,
        local,
        tracker_tx: Some(tracker_tx),
        our_id,
        handovers: Vec::new(),
        banned: Vec::new(),
    };
    // The magnet's own peers count as named ones: their failures are reported.
    for p in magnet::peers_of(&magnet) {
        if !cfg.peers.contains(&p) {
            cfg.peers.push(p);
        }
    }
    let dht_port = started.threads.dht.as_ref().map(DhtSource::port);
    let phase = magnet::Phase {
        info_hash: magnet.info_hash,
        has_v1: magnet.has_v1,
        info_hash_v2: magnet.info_hash_v2,
        trackers: tiers,
        peers: cfg.peers.clone(),
        ctx: crate::meta_peer::MetaContext {
            info_hash: magnet.info_hash,
            our_id,
            bind: cfg.bind,
            listen_port: local.port(),
            pex: cfg.pex,
            dht_port,
            v2_swarm: magnet
                .info_hash_v2
                .map(|v2| v2[..20].try_into().expect("20 of 32 bytes")),
        },
        cfg,
        events,
        stop,
        input_tx,
        started: Instant::now(),
        dht: &mut started.threads.dht,
    };
    let fetched = match magnet::fetch(phase, input_rx) {
        Ok(f) => f,
        Err(e) => {
            started.shut_down(input_rx);
            return Err(e);
        }
    };
    started.handovers = fetched.handovers;
    started.banned = fetched.banned;
    if fetched.meta.private
        && let Some(d) = started.threads.dht.take()
    {
        // BEP 27: a private torrent's peers come from its trackers only.
        d.stop();
    }
    let choice = match m.choose {
        Some(choose) => choose(&fetched.meta),
        None => Ok(Choice::Download(None)),
    };
    match choice {
        Ok(Choice::Download(chosen)) => Ok(Some((
            fetched.meta,
            Target::Download {
                dir,
                selected: chosen.or(selected),
                stream,
            },
            started,
        ))),
        Ok(Choice::Stream(file)) => {
            let files = fetched.meta.files.len();
            Ok(Some((
                fetched.meta,
                Target::Download {
                    dir,
                    selected: Some((0..files).map(|i| i == file).collect()),
                    stream: stream.map(|s| StreamTo { file, out: s.out }),
                },
                started,
            )))
        }
        Ok(Choice::Stop) => {
            started.shut_down(input_rx);
            Ok(None)
        }
        Err(e) => {
            started.shut_down(input_rx);
            Err(e)
        }
    }
}

/// The session thread's body: prepares the storage, runs the transfer, shuts down.
pub(crate) fn run(r: Run) -> Result<(), Error> {
    let Run {
        source,
        target,
        mut config,
        events,
        stop,
        stats,
        input,
    } = r;
    let (meta, target, started) = match source {
        Source::Torrent(meta) => (meta, target, None),
        Source::Magnet(m) => {
            let phase = magnet_phase(
                m,
                target,
                &mut config,
                &events,
                &stop,
                &stats,
                (&input.0, &input.1),
            )?;
            match phase {
                Some((meta, target, started)) => (meta, target, Some(started)),
                None => return Ok(()),
            }
        }
    };
    let mut prepared = match prepare(&meta, target, &config) {
        Ok(p) => p,
        Err(e) => {
            if let Some(s) = started {
                s.shut_down(&input.1);
            }
            return Err(e);
        }
    };
    let spill = prepared.spill.clone();
    let created = prepared.created.take();
    let storage = Arc::clone(&prepared.storage);
    let (result, progressed) = transfer(
        meta,
        prepared,
        config,
        (events, stop, stats),
        input,
        started,
    );
    match (&result, created) {
        (Ok(()), _) => {
            if let Some(spill) = spill {
                // The boundary bytes of unselected files have served their purpose.
                let _ = storage.remove_in_root(&spill);
            }
        }
        // Nothing verified: what this run made holds nothing worth resuming from.
        (Err(_), Some(created)) if !progressed => {
            drop(storage);
            created.undo();
        }
        (Err(_), _) => {}
    }
    result
}

fn prepare(meta: &Metainfo, target: Target, cfg: &Config) -> Result<Prepared, Error> {
    match target {
        Target::Download {
            dir,
            selected,
            stream,
        } => {
            if let Some(sel) = &selected
                && sel.len() != meta.files.len()
            {
                return Err(Error::Usage(format!(
                    "the selection names {} files; the torrent has {}",
                    sel.len(),
                    meta.files.len()
                )));
            }
            if stream.as_ref().is_some_and(|s| s.file >= meta.files.len()) {
                return Err(Error::Usage(
                    "the streamed file is not in the torrent".into(),
                ));
            }
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            let layout = Layout::in_dir(&dir, meta);
            let spill_name = format!(".bitfetch-{}.parts", &meta.info_hash_hex()[..16]);
            let spill = dir.join(&spill_name);
            // Pad files are never on disk, so never "selected", listed or reported.
            let is_selected =
                |i: usize| !meta.files[i].pad && selected.as_ref().is_none_or(|s| s[i]);
            // Only data that was there before us needs checking; fresh files are all zeros.
            let resuming = spill.exists()
                || (0..layout.files.len()).any(|i| {
                    is_selected(i)
                        && fs::symlink_metadata(layout.full_path(i))
                            .is_ok_and(|m| m.is_file() && m.len() > 0)
                });
            let (storage, writer, created) = Storage::create_selected(
                &layout,
                &meta.geometry,
                selected.as_deref().map(|s| (s, spill.as_path())),
            )?;
            let mut notices = Vec::new();
            let mut skipped = std::collections::HashSet::new();
            for (i, f) in meta.files.iter().enumerate() {
                if f.exec && is_selected(i) {
                    storage.make_executable(i)?;
                }
                if f.symlink.is_some() && is_selected(i) && stream.is_none() {
                    let rel = f.path.as_path();
                    let made = meta
                        .link_text(i)
                        .and_then(|text| storage.make_link(rel, &text).map_err(|e| e.to_string()));
                    if let Err(why) = made {
                        skipped.insert(i);
                        notices.push(format!(
                            "link {} skipped: {why}",
                            crate::path_safety::escape(&rel.to_string_lossy())
                        ));
                    }
                }
            }
            let have = if resuming {
                storage.verify_all(meta, cfg.hashers)
            } else {
                vec![false; meta.geometry.piece_count() as usize]
            };
            let paths = (0..layout.files.len())
                .map(|i| {
                    (is_selected(i) && stream.is_none() && !skipped.contains(&i))
                        .then(|| layout.full_path(i))
                })
                .collect();
            Ok(Prepared {
                notices,
                storage,
                writer: Some(writer),
                have,
                spill: selected.is_some().then_some(spill_name),
                created: Some(created),
                selected,
                paths,
                stream,
            })
        }
        Target::Seed { data } => {
            let layout = Layout::for_data_path(&data, meta);
            let storage = Storage::open_existing(&layout, &meta.geometry)?;
            if storage.files_present() == 0 {
                return Err(Error::no_data(&data, meta, &layout));
            }
            let have = storage.verify_all(meta, cfg.hashers);
            let bad = have.iter().filter(|h| !**h).count() as u32;
            if bad > 0 {
                return Err(Error::Incomplete {
                    bad,
                    total: have.len() as u32,
                });
            }
            Ok(Prepared {
                notices: Vec::new(),
                storage: Arc::new(storage),
                writer: None,
                have,
                selected: None,
                paths: Vec::new(),
                stream: None,
                spill: None,
                created: None,
            })
        }
    }
}

/// Tells the session that one of its helper threads died on a panic, so the run ends with
/// an error instead of waiting forever for what that thread would have sent.
struct PanicReport {
    tx: Sender<Input>,
    what: &'static str,
}

impl Drop for PanicReport {
    fn drop(&mut self) {
        if thread::panicking() {
            let _ = self.tx.send(Input::Panicked(self.what));
        }
    }
}

/// Spawns a helper thread of the session whose panic is reported as [`Input::Panicked`].
fn spawn_reporting(
    name: &str,
    what: &'static str,
    stack: usize,
    tx: &Sender<Input>,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    let guard = PanicReport {
        tx: tx.clone(),
        what,
    };
    thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(move || {
            let _guard = guard;
            body();
        })
        .map_err(|e| Error::io(format!("starting the {what} thread"), e))
}

struct Session {
    ctx: Arc<peer::Context>,
    writer: Option<Writer>,
    picker: Picker,
    choker: Choker,
    peers: HashMap<PeerKey, Peer>,
    next_key: u64,
    /// Addresses: candidates, back-offs, bans, which are held by connections.
    table: PeerTable,
    /// Connections per remote IP (for `max_peers_per_ip`).
    per_ip: HashMap<IpAddr, usize>,
    /// When an idle connection last made way for a dial (see `dial`).
    last_made_room: Option<Instant>,
    /// Pieces found changed on disk while serving (reported once each).
    corrupt_on_disk: HashSet<PieceIndex>,
    input_tx: Sender<Input>,
    hash_tx: Option<Sender<PieceIndex>>,
    /// Most pieces let wait for their hash before no new blocks are asked for (see `fill`).
    max_hashing: usize,
    tracker_tx: Option<Sender<TrackerCommand>>,
    stats: Arc<Stats>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    threads: Helpers,
    /// Per file, its full path when it is fetched to disk (see `Prepared::paths`).
    paths: Vec<Option<PathBuf>>,
    /// Streaming one file (`-O -`), while it lasts.
    stream: Option<stream::Stream>,
    /// Per file, pieces not yet verified (for `FileCompleted` events).
    files_left: Vec<u32>,
    started: Instant,
    completed_at: Option<Instant>,
    /// Last time a piece was verified (for `--stall-timeout`).
    last_progress: Instant,
    /// Peers named by the user (`--peer`, `Handle::add_peers`) that could not be reached,
    /// with why: each reported once as it happens, and all of them if the run gives up.
    unreachable: HashMap<SocketAddr, String>,
    /// Trackers failing now, with why (at most `tracker::plan::MAX_TRACKERS`), for the
    /// message of a run that gives up.
    tracker_failures: BTreeMap<String, String>,
    /// Peers named by the user rather than found.
    named: HashSet<SocketAddr>,
    /// Pieces verified in this run (a run that verified none takes back what it created).
    verified_this_run: u32,
    cfg: Config,
    downloaded: u64,
    /// Bytes uploaded since the torrent was complete in this run (for the seed ratio).
    uploaded: u64,
    was_complete: bool,
    seeding_since: Option<Instant>,
    last_need_peers: Instant,
    /// Every tracker failed its first round (or there is none): peers can only come from
    /// `--peer` and inbound connections.
    trackers_failed: bool,
    /// The download completed in a run that does not seed: `Finished` is reported after the
    /// shutdown.
    finish_pending: bool,
    last_rechoke: Instant,
    /// Web seeds (BEP 19) and their connections.
    web: webseeds::WebSeeds,
}

/// The session's helper threads, joined at shutdown (see `Session::shutdown`).
#[derive(Default)]
struct Helpers {
    listener: Option<Listener>,
    hashers: Vec<JoinHandle<()>>,
    tracker: Option<JoinHandle<()>>,
    streamer: Option<JoinHandle<()>>,
    /// The DHT node, for public torrents.
    dht: Option<DhtSource>,
}

/// The accepting thread and what wakes it for shutdown.
struct Listener {
    thread: JoinHandle<()>,
    /// The listening socket, shared with the thread: shutting it down wakes `accept`.
    socket: socket2::Socket,
    closing: Arc<AtomicBool>,
}

impl Listener {
    fn close(self) {
        self.closing.store(true, Ordering::SeqCst);
        // On Linux a blocked accept() returns EINVAL once its socket is shut down.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let _ = self.thread.join();
    }
}

/// The ports tried when none is given: BitTorrent's usual range, then any free port, so two
/// runs at once (two CI jobs on one runner) both start.
const DEFAULT_PORTS: std::ops::RangeInclusive<u16> = 6881..=6889;

/// Listens on the configured port, or on the first free one of [`DEFAULT_PORTS`] (then any
/// free port) when none is configured.
fn bind_listener(cfg: &Config) -> Result<TcpListener, Error> {
    let Some(port) = cfg.port else {
        let mut last = None;
        for port in DEFAULT_PORTS.chain([0]) {
            match bind_port(cfg.bind, port) {
                Ok(l) => return Ok(l),
                Err(e) => last = Some(e),
            }
        }
        return Err(last.expect("at least one port was tried"));
    };
    bind_port(cfg.bind, port)
}

/// Listens on `bind`, or on both IPv4 and IPv6 (one dual-stack socket) when none is given,
/// falling back to IPv4 where IPv6 is unavailable.
fn bind_port(bind: Option<IpAddr>, port: u16) -> Result<TcpListener, Error> {
    use socket2::{Domain, Socket, Type};
    let fail = |ip: IpAddr, e| Error::io(format!("listening on {ip} port {port}"), e);
    if let Some(ip) = bind {
        return TcpListener::bind((ip, port)).map_err(|e| fail(ip, e));
    }
    let dual = (|| -> std::io::Result<TcpListener> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into())?;
        s.listen(128)?;
        Ok(s.into())
    })();
    dual.or_else(|_| {
        let ip = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        TcpListener::bind((ip, port)).map_err(|e| fail(ip, e))
    })
}

/// How long the accept loop pauses after a failed accept (out of file descriptors, say), so
/// that a failure that repeats does not spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn spawn_listener(listener: TcpListener, tx: &Sender<Input>) -> Result<Listener, Error> {
    let socket = socket2::Socket::from(
        listener
            .try_clone()
            .map_err(|e| Error::io("sharing the listening socket", e))?,
    );
    let closing = Arc::new(AtomicBool::new(false));
    let (out, stop) = (tx.clone(), Arc::clone(&closing));
    let thread = spawn_reporting("listener", "listener", 64 * 1024, tx, move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let stream = match conn {
                Ok(s) => s,
                Err(_) => {
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let Ok(addr) = stream.peer_addr() else {
                continue;
            };
            if out.send(Input::Accepted { stream, addr }).is_err() {
                break;
            }
        }
    })?;
    Ok(Listener {
        thread,
        socket,
        closing,
    })
}

/// Hasher threads: check complete pieces off the session thread.
fn spawn_hashers(
    meta: &Arc<Metainfo>,
    storage: &Arc<Storage>,
    out: &Sender<Input>,
    count: usize,
) -> Result<(Sender<PieceIndex>, Vec<JoinHandle<()>>), Error> {
    // Unbounded but bounded in use: only complete pieces go in, and no new block is asked
    // for while `HASH_BACKLOG` worth of them wait (see `Session::fill`).
    let (tx, rx) = crossbeam_channel::unbounded::<PieceIndex>();
    let mut threads = Vec::new();
    for i in 0..count.max(1) {
        let (rx, tx_out, meta, storage) = (
            rx.clone(),
            out.clone(),
            Arc::clone(meta),
            Arc::clone(storage),
        );
        let name = format!("hasher-{i}");
        threads.push(spawn_reporting(
            &name,
            "hasher",
            256 * 1024,
            out,
            move || {
                let mut scratch = Vec::new();
                for piece in rx {
                    let ok = storage.piece_matches(piece, &meta, &mut scratch);
                    if tx_out.send(Input::Hashed { piece, ok }).is_err() {
                        break;
                    }
                }
            },
        )?);
    }
    Ok((tx, threads))
}

/// Runs the transfer; also says whether any piece was verified in this run.
fn transfer(
    meta: Metainfo,
    prepared: Prepared,
    cfg: Config,
    outputs: (Sender<Event>, Arc<AtomicBool>, Arc<Stats>),
    input: (Sender<Input>, Receiver<Input>),
    started: Option<Started>,
) -> (Result<(), Error>, bool) {
    let mut progressed = false;
    let result = run_transfer(
        meta,
        prepared,
        cfg,
        outputs,
        input,
        started,
        &mut progressed,
    );
    (result, progressed)
}

/// Starts the tracker thread; returns what commands it, and the thread.
fn spawn_tracker(
    tiers: Vec<Vec<String>>,
    (info_hash, second_hash): ([u8; 20], Option<[u8; 20]>),
    our_id: [u8; 20],
    port: u16,
    stats: &Arc<Stats>,
    cfg: &Config,
    input_tx: &Sender<Input>,
) -> Result<(Sender<TrackerCommand>, JoinHandle<()>), Error> {
    // The session sends at most a `NeedPeers` every 30 s, one `Completed` and a `Stop`.
    let (tracker_tx, tracker_rx) = crossbeam_channel::unbounded();
    let tracker = Tracker {
        tiers,
        info_hash,
        second_hash,
        peer_id: our_id,
        port,
        stats: Arc::clone(stats),
        interval_override: cfg.announce_interval,
        net: cfg.net(),
    };
    let out = input_tx.clone();
    let thread = spawn_reporting("tracker", "tracker", 2 * 1024 * 1024, input_tx, move || {
        tracker.run(tracker_rx, &out);
        let _ = out.send(Input::TrackerDone);
    })?;
    Ok((tracker_tx, thread))
}

fn run_transfer(
    meta: Metainfo,
    prepared: Prepared,
    cfg: Config,
    (events, stop, stats): (Sender<Event>, Arc<AtomicBool>, Arc<Stats>),
    (input_tx, input_rx): (Sender<Input>, Receiver<Input>),
    started: Option<Started>,
    progressed: &mut bool,
) -> Result<(), Error> {
    let Prepared {
        storage,
        mut writer,
        have,
        selected,
        paths,
        stream,
        notices,
        ..
    } = prepared;
    for message in notices {
        let _ = events.send(Event::Notice {
            kind: NoticeKind::Other,
            message,
        });
    }
    let meta = Arc::new(meta);
    let mut rng = Rng::from_os();
    let our_id = match &started {
        Some(s) => s.our_id,
        None => rng::peer_id(&mut rng),
    };

    let geometry = meta.geometry.clone();
    let wanted = match &selected {
        Some(sel) => geometry.pieces_touching(sel),
        None => vec![true; geometry.piece_count() as usize],
    };
    if let Some(w) = &mut writer {
        // Nobody may write into what we have or do not want.
        for piece in geometry.pieces() {
            if have[piece.usize()] || !wanted[piece.usize()] {
                w.settle(piece);
            }
        }
    }
    let picker = Picker::with_wanted(geometry.clone(), have, wanted, rng.next_u64());
    stats.left.store(picker.bytes_left(), Ordering::Relaxed);
    // A download whose data is all there already (a rerun, a cache hit) needs nobody: it
    // reports its files and ends without a listener, a tracker or a dial.
    let offline = writer.is_some() && picker.is_complete() && !cfg.seed_after;
    let mut handovers = Vec::new();
    let mut banned = Vec::new();
    let magnet_run = started.is_some();
    let (mut threads, local, tracker_tx) = match started {
        // A magnet's: up since the metadata phase.
        Some(s) => {
            handovers = s.handovers;
            banned = s.banned;
            (s.threads, Some(s.local), s.tracker_tx)
        }
        None if offline => (Helpers::default(), None, None),
        None => {
            let mut threads = Helpers::default();
            let listener = bind_listener(&cfg)?;
            let local = listener
                .local_addr()
                .map_err(|e| Error::io("reading the listening address", e))?;
            threads.listener = Some(spawn_listener(listener, &input_tx)?);
            let (tracker_tx, tracker) = spawn_tracker(
                meta.trackers.clone(),
                (meta.info_hash, meta.v2_swarm_hash()),
                our_id,
                local.port(),
                &stats,
                &cfg,
                &input_tx,
            )?;
            threads.tracker = Some(tracker);
            if !meta.private {
                threads.dht = DhtSource::start(&cfg, meta.info_hash, local, &input_tx, &events);
            }
            (threads, Some(local), Some(tracker_tx))
        }
    };
    let listen_port = local.map_or(0, |l| l.port());
    // A hybrid torrent's v2 swarm is looked up and announced too (BEP 52).
    if let (Some(d), Some(second)) = (threads.dht.as_mut(), meta.v2_swarm_hash()) {
        d.add_swarm(second);
    }
    let dht_port = threads.dht.as_ref().map(DhtSource::port);

    let hash_tx = match &writer {
        Some(_) => {
            let (tx, hashers) = spawn_hashers(&meta, &storage, &input_tx, cfg.hashers)?;
            threads.hashers = hashers;
            Some(tx)
        }
        None => None,
    };
    let total = geometry.total_len();
    let max_hashing = (HASH_BACKLOG / u64::from(geometry.nominal_piece_len())).max(2) as usize;
    let verified = total - picker.bytes_left();
    let mut own_addrs: Vec<SocketAddr> = local.into_iter().collect();
    if let Some(local) = local.filter(|l| l.ip().is_unspecified()) {
        own_addrs.push(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            local.port(),
        ));
        own_addrs.push(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            local.port(),
        ));
    }
    let complete = picker.is_complete();
    let _ = events.send(Event::Started {
        name: meta.name.clone(),
        info_hash: meta.info_hash,
        size: total,
        pieces: geometry.piece_count(),
        files: meta.content_files().count(),
        verified,
    });
    // (A magnet's run said so before its metadata phase.)
    if let Some(local) = local.filter(|_| !magnet_run) {
        let _ = events.send(Event::Listening(local));
    }
    let files_left = (0..geometry.file_count())
        .map(|f| {
            geometry
                .pieces_of_file(f)
                .filter(|&p| !picker.have_flags()[p as usize])
                .count() as u32
        })
        .collect();
    let mut s = Session {
        ctx: Arc::new(peer::Context {
            meta: Arc::clone(&meta),
            info_hash: meta.info_hash,
            our_id,
            geometry,
            storage,
            bind: cfg.bind,
            listen_port,
            upload_limit: cfg
                .max_upload_rate
                .map(|r| Arc::new(TokenBucket::per_second(r))),
            download_limit: cfg
                .max_download_rate
                .map(|r| Arc::new(TokenBucket::per_second(r))),
            // BEP 27: a private torrent's peers come from its trackers only.
            pex: cfg.pex && !meta.private,
            dht_port,
        }),
        writer,
        was_complete: complete,
        seeding_since: complete.then(Instant::now),
        picker,
        choker: Choker::new(cfg.upload_slots, rng.next_u64()),
        peers: HashMap::new(),
        next_key: 0,
        table: PeerTable::new(own_addrs, if offline { &[] } else { &cfg.peers }),
        per_ip: HashMap::new(),
        last_made_room: None,
        corrupt_on_disk: HashSet::new(),
        input_tx,
        hash_tx,
        max_hashing,
        tracker_tx,
        stats,
        events,
        stop,
        threads,
        paths,
        stream: None,
        files_left,
        started: Instant::now(),
        completed_at: None,
        last_progress: Instant::now(),
        verified_this_run: 0,
        unreachable: HashMap::new(),
        tracker_failures: BTreeMap::new(),
        named: cfg.peers.iter().copied().collect(),
        downloaded: 0,
        uploaded: 0,
        last_need_peers: Instant::now(),
        trackers_failed: false,
        finish_pending: false,
        last_rechoke: Instant::now(),
        web: webseeds::WebSeeds::default(),
        cfg,
    };
    if let Some(StreamTo { file, out }) = stream {
        s.start_stream(file, out)?;
    }
    if s.picker.is_complete() {
        // Everything was verified at start-up (a seeder): uploads may trust unchanged files.
        s.ctx.storage.mark_known_good();
    }
    if s.writer.is_some() {
        s.report_files_complete_at_start();
    }
    for addr in banned {
        s.table.ban(addr, None);
    }
    for h in handovers {
        s.start_handover(h);
    }
    s.start_web_seeds(&meta);
    let result = s.main_loop(&input_rx);
    s.shutdown(&input_rx);
    if s.finish_pending && result.is_ok() {
        s.report_finished();
    }
    *progressed = s.verified_this_run > 0;
    // Threads still sending to the session see it gone and end; then they can be joined.
    drop(input_rx);
    s.join_helpers();
    result
}

impl Session {
    fn main_loop(&mut self, input: &Receiver<Input>) -> Result<(), Error> {
        let mut next_tick = Instant::now();
        self.dial();
        loop {
            match input.recv_timeout(TICK) {
                Ok(msg) => {
                    self.handle(msg)?;
                    // Whatever else is waiting, at once: a blocking receive per message spins
                    // and yields before it parks, and the checks below need not run per block.
                    for msg in input.try_iter().take(MAX_BATCH) {
                        self.handle(msg)?;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the session holds a sender"),
            }
            if self.stop.load(Ordering::SeqCst) {
                return if self.picker.is_complete() {
                    Ok(())
                } else {
                    Err(Error::Interrupted)
                };
            }
            if self.picker.is_complete() && self.stream.is_none() && self.done_seeding() {
                return Ok(());
            }
            if self
                .cfg
                .timeout
                .is_some_and(|t| self.started.elapsed() >= t)
            {
                // A limit on the download never fails a finished download: it ends the
                // seeding that follows.
                return if self.picker.is_complete() && self.stream.is_none() {
                    Ok(())
                } else {
                    Err(Error::Timeout)
                };
            }
            if !self.picker.is_complete()
                && self
                    .cfg
                    .stall_timeout
                    .is_some_and(|t| self.last_progress.elapsed() >= t)
            {
                return Err(Error::Stalled);
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                self.tick();
                self.check_peer_sources()?;
            }
        }
    }

    /// Whether a complete torrent should stop now: at once without `--seed`, else at the first
    /// seeding limit reached.
    fn done_seeding(&self) -> bool {
        if !self.cfg.seed_after {
            return true;
        }
        self.cfg.seed_limits.reached(
            self.uploaded,
            self.picker.geometry().total_len(),
            self.seeding_since.map(|since| since.elapsed()),
        )
    }

    fn tick(&mut self) {
        self.dial();
        let per_sec = 1000 / TICK.as_millis().max(1) as u64;
        for p in self.peers.values_mut() {
            p.recent_rate = (p.down_total - p.tick_mark) * per_sec;
            p.tick_mark = p.down_total;
        }
        if self.peers.len() < WANT_PEERS
            && !self.picker.is_complete()
            && self.last_need_peers.elapsed() >= Duration::from_secs(30)
            && let Some(t) = &self.tracker_tx
        {
            self.last_need_peers = Instant::now();
            let _ = t.send(TrackerCommand::NeedPeers);
        }
        let want_peers = self.peers.len() < WANT_PEERS && !self.picker.is_complete();
        if let Some(d) = &mut self.threads.dht {
            d.tick(want_peers);
        }
        self.release_stalled_requests();
        self.retry_after_backoff();
        // Web seeds whose back-off ran out are asked again.
        self.fill_web_all();
        self.distrust_idle_claims();
        self.send_pex();
        if self.last_rechoke.elapsed() >= RECHOKE_EVERY {
            self.last_rechoke = Instant::now();
            self.rechoke();
        }
        let peers = self.peers.values().filter(|p| p.is_connected()).count();
        let seeds = self
            .peers
            .keys()
            .filter(|k| self.picker.peer_is_seed(**k))
            .count();
        let total = self.picker.geometry().total_len();
        let verified = total - self.stats.left.load(Ordering::Relaxed);
        let _ = self.events.send(Event::Progress(crate::engine::Progress {
            verified,
            total,
            transferred: self.downloaded,
            uploaded: self.stats.uploaded.load(Ordering::Relaxed),
            peers,
            seeds,
            web_seeds: self.web.live(),
            web_seed_bytes: self.web.bytes,
            trackers: self.stats.trackers_working.load(Ordering::Relaxed),
            complete: self.picker.is_complete(),
        }));
    }

    /// A one-shot download with no answering tracker and no peer, connected or to dial, has
    /// nothing to wait for. Checked when the trackers fail and on every tick, since the last
    /// peer may go away after that.
    fn check_peer_sources(&self) -> Result<(), Error> {
        if self.trackers_failed
            && self.threads.dht.as_ref().is_none_or(DhtSource::exhausted)
            && !self.picker.is_complete()
            && !self.cfg.seed_after
            && self.peers.is_empty()
            && self.web.live() == 0
            && !self.table.has_candidates()
        {
            let trackers = if self.tracker_failures.is_empty() {
                "no tracker answered".to_string()
            } else {
                let failed: Vec<String> = self
                    .tracker_failures
                    .iter()
                    .take(5)
                    .map(|(url, why)| format!("{} ({why})", crate::path_safety::escape(url)))
                    .collect();
                let more = self.tracker_failures.len().saturating_sub(failed.len());
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("no tracker answered: {}{more}", failed.join(", "))
            };
            let trackers = match &self.threads.dht {
                Some(d) => format!("{trackers}; {}", d.why_exhausted()),
                None => trackers,
            };
            let trackers = if self.web.any() {
                format!("{trackers}; no web seed is usable")
            } else {
                trackers
            };
            let message = if self.unreachable.is_empty() {
                format!("{trackers}; no peer is known (add --peer HOST:PORT?)")
            } else {
                let mut failed: Vec<String> = self
                    .unreachable
                    .iter()
                    .map(|(addr, why)| format!("{addr} ({why})"))
                    .collect();
                failed.sort();
                format!(
                    "{trackers}; no peer could be reached: {}",
                    failed.join(", ")
                )
            };
            return Err(Error::NoPeers(message));
        }
        Ok(())
    }

    fn handle(&mut self, msg: Input) -> Result<(), Error> {
        match msg {
            Input::Peer { key, event } => self.on_peer_event(key, event)?,
            Input::WebSeed { key, event } => self.on_web_event(key, event),
            Input::Accepted { stream, addr } => self.on_accepted(stream, addr),
            Input::Peers(list) => {
                let _ = self.events.send(Event::PeersFound {
                    source: crate::engine::PeerSource::Tracker,
                    count: list.len(),
                });
                self.add_candidates(list);
            }
            Input::Dht(m) => {
                if let Some(d) = &mut self.threads.dht {
                    let peers = d.on_message(m, &self.events);
                    if !peers.is_empty() {
                        self.add_candidates(peers);
                    }
                }
            }
            Input::NamedPeers(list) => {
                self.named.extend(list.iter().take(MAX_NAMED));
                self.add_candidates(list);
            }
            Input::TrackerNotice(m) => self.notice(NoticeKind::Tracker, m),
            Input::TrackerFailed { url, reason } => {
                self.tracker_failures.insert(url.clone(), reason.clone());
                let _ = self.events.send(Event::TrackerError {
                    url,
                    message: reason,
                });
            }
            // The tracker thread ended by itself (a torrent without trackers ends it at
            // once): the shutdown must not wait for it to say so a second time.
            Input::TrackerDone => self.tracker_tx = None,
            Input::TrackersFailed => {
                self.trackers_failed = true;
                self.check_peer_sources()?;
            }
            // A metadata-phase connection that handed its socket over late.
            Input::Meta {
                event: crate::meta_peer::MetaEvent::HandedOver(h),
                ..
            } => self.start_handover(*h),
            Input::Meta { .. } => {}
            Input::StreamDone => self.stream = None,
            // The reader has all it wants: end cleanly.
            Input::StreamClosed => return Err(Error::OutputClosed),
            Input::StreamFailed(e) => return Err(Error::io("writing the streamed file", e)),
            Input::Hashed { piece, ok } => self.on_hashed(piece, ok)?,
            Input::Panicked(what) => return Err(Error::Internal(what)),
        }
        Ok(())
    }

    /// Stops the tracker (which announces `stopped`) and every connection, and waits a
    /// bounded time for them: tracker notices still arriving are printed, peer threads joined.
    /// Whatever is still stuck at the deadline is left to process exit, so Ctrl-C stays quick.
    fn shutdown(&mut self, input: &Receiver<Input>) {
        let mut tracker_running = self.tracker_tx.is_some();
        if let Some(t) = self.tracker_tx.take() {
            let _ = t.send(TrackerCommand::Stop);
        }
        self.hash_tx = None;
        for p in self.peers.values() {
            p.send(Command::Shutdown);
        }
        self.stop_web_seeds();
        if let Some(w) = &mut self.writer {
            // Never wait for the disk here: Ctrl-C must stay quick.
            let _ = w.flush(false);
        }
        // Ctrl-C must end the process within 2 s even with a tracker that never answers the
        // `stopped` announce (the signal is seen within one tick).
        let budget = if self.stop.load(Ordering::SeqCst) {
            1000
        } else {
            1500
        };
        let deadline = Instant::now() + Duration::from_millis(budget);
        while (tracker_running || !self.peers.is_empty() || self.web.connections() > 0)
            && Instant::now() < deadline
        {
            match input.recv_deadline(deadline) {
                Ok(Input::Peer {
                    key,
                    event: PeerEvent::Gone { .. },
                }) => {
                    if let Some(mut p) = self.peers.remove(&key)
                        && let Some(t) = p.thread.take()
                    {
                        let _ = t.join();
                    }
                }
                Ok(Input::WebSeed {
                    key,
                    event: crate::webseed::WebEvent::Gone,
                }) => self.web_gone(key),
                Ok(Input::TrackerNotice(m)) => self.notice(NoticeKind::Tracker, m),
                Ok(Input::TrackerFailed { url, reason }) => {
                    let _ = self.events.send(Event::TrackerError {
                        url,
                        message: reason,
                    });
                }
                Ok(Input::TrackerDone) => tracker_running = false,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if tracker_running {
            // Stuck in a request past the budget: left to finish (its requests time out) or
            // to process exit; waiting for it would make Ctrl-C slow.
            self.threads.tracker = None;
        }
    }

    /// Joins the helper threads, once the input channel is closed (so none can block on it).
    /// A streamer still writing into a pipe nobody reads is left behind, like a stuck tracker.
    fn join_helpers(&mut self) {
        if let Some(l) = self.threads.listener.take() {
            l.close();
        }
        if let Some(d) = self.threads.dht.take() {
            d.stop();
        }
        for h in self.threads.hashers.drain(..) {
            let _ = h.join();
        }
        for t in [self.threads.tracker.take(), self.threads.streamer.take()]
            .into_iter()
            .flatten()
        {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }

    fn notice(&self, kind: NoticeKind, message: String) {
        let _ = self.events.send(Event::Notice { kind, message });
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
