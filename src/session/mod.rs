//! The session thread: the one owner of the picker, the storage writer, the peer table and the
//! choker.
//!
//! Every other thread talks to it through [`Input`] on one bounded channel, and it answers
//! peers through each connection's [`Command`] channel. It never blocks on a peer: command
//! channels are unbounded (their volume is bounded by the pipeline depth), while the input
//! channel is bounded so that fast peers feel back-pressure through TCP instead of growing our
//! memory.
//!
//! `mod.rs` holds start-up, the main loop, seeding limits and shutdown; `peers.rs` the peer
//! table (dialling, duplicates, bans, pruning); `transfer.rs` what flows over connections
//! (interest, requests, blocks, hashes, choking).

mod peers;
mod stream;
mod transfer;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::choker::Choker;
use crate::cli::{self, DownloadArgs, SeedArgs};
use crate::error::Error;
use crate::geometry::PieceIndex;
use crate::messages::{Command, Input, PeerEvent};
use crate::metainfo::Metainfo;
use crate::peer;
use crate::picker::{PeerKey, Picker};
use crate::progress::{Mode, Progress};
use crate::ratelimit::TokenBucket;
use crate::rng::{self, Rng};
use crate::storage::{self, Layout, Storage, Writer};
use crate::tracker::{NetConfig, Stats, Tracker, TrackerCommand};

use peers::Peer;

const INPUT_CAPACITY: usize = 1024;
/// Bytes of complete pieces that may wait for the hashers before the download pauses asking
/// for more. A piece's pages stay in our resident memory until it is hashed, so when the
/// hashers fall behind (both cores busy) this, not the torrent's size, bounds the memory.
const HASH_BACKLOG: u64 = 2 * 1024 * 1024;
const TICK: Duration = Duration::from_millis(250);
const RECHOKE_EVERY: Duration = Duration::from_secs(10);
/// Below this many connections the tracker is asked for more peers early.
const WANT_PEERS: usize = 10;

/// When to stop seeding: whichever limit comes first. No limit means until interrupted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedLimits {
    /// Upload at least `num / den` times the torrent's size.
    pub ratio: Option<(u64, u64)>,
    pub time: Option<Duration>,
}

pub struct Config {
    pub peers: Vec<SocketAddr>,
    pub port: u16,
    pub net: NetConfig,
    pub announce_interval: Option<Duration>,
    /// Wait for the data to reach stable storage at completion (`--fsync`). Otherwise the
    /// data is left in the page cache, safe from our own death, and written back by the
    /// kernel; a restart re-verifies what is on disk either way.
    pub fsync: bool,
    /// Keep running after the download completes (until a limit or a signal).
    pub seed_after: bool,
    pub seed_limits: SeedLimits,
    pub max_peers: usize,
    pub upload_slots: usize,
    pub max_upload_rate: Option<u64>,
    pub max_download_rate: Option<u64>,
    pub timeout: Option<Duration>,
    pub stall_timeout: Option<Duration>,
    pub mode: Mode,
}

/// What a run fetches and where it reports it.
pub struct Plan {
    /// Full paths of the files fetched, printed when the download completes.
    pub paths: Vec<String>,
    /// Which files are fetched (all when `None`).
    pub selected: Option<Vec<bool>>,
    /// Stream this file to stdout, in order.
    pub stream_file: Option<usize>,
}

/// Which file `-O -` streams: `--file N`, the only selected file, or the only file.
fn stream_file(
    a: &DownloadArgs,
    meta: &Metainfo,
    selection: Option<&[bool]>,
) -> Result<usize, Error> {
    let n = meta.files.len();
    if a.json {
        return Err(Error::Usage(
            "--json and -O - both want standard output; choose one".into(),
        ));
    }
    if let Some(i) = a.file {
        return if (1..=n).contains(&i) {
            Ok(i - 1)
        } else {
            Err(Error::Usage(format!(
                "--file {i}: the torrent has files 1 to {n}"
            )))
        };
    }
    let candidates: Vec<usize> = (0..n).filter(|&i| selection.is_none_or(|s| s[i])).collect();
    match candidates[..] {
        [only] => Ok(only),
        _ => Err(Error::Usage(
            "-O - streams one file: pick it with --file N (see --list)".into(),
        )),
    }
}

pub fn download(a: &DownloadArgs) -> Result<(), Error> {
    let meta = cli::load_torrent_with(&a.torrent, a.ca_file.as_deref())?;
    if a.list {
        return cli::list_files(&meta);
    }
    let mut config = cli::session_config(&a.options(), a.seeding())?;
    config.fsync = a.fsync;
    let streaming = a.streaming()?;
    let selection = a.selection(&meta)?;
    let stream = if streaming {
        Some(stream_file(a, &meta, selection.as_deref())?)
    } else if a.file.is_some() {
        return Err(Error::Usage("--file goes with -O - (streaming)".into()));
    } else {
        None
    };
    let selected = match stream {
        Some(f) => Some((0..meta.files.len()).map(|i| i == f).collect::<Vec<_>>()),
        None => selection,
    };
    // Streaming without -o keeps the data in a temporary directory, removed at the end.
    let (dir, temporary) = match (&a.output, streaming) {
        (Some(d), _) => (d.clone(), false),
        (None, true) => (
            std::env::temp_dir().join(format!(
                "bitfetch-{}-{}",
                std::process::id(),
                &meta.info_hash_hex()[..16]
            )),
            true,
        ),
        (None, false) => (std::path::PathBuf::from("."), false),
    };
    storage::install_stop_handler();
    fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let layout = Layout::in_dir(&dir, &meta);
    let spill = dir.join(format!(".bitfetch-{}.parts", &meta.info_hash_hex()[..16]));
    let is_selected = |i: usize| selected.as_ref().is_none_or(|s| s[i]);
    // Only data that was there before us needs checking; fresh files are all zeros.
    let resuming = spill.exists()
        || (0..layout.files.len()).any(|i| {
            is_selected(i)
                && fs::symlink_metadata(layout.full_path(i))
                    .is_ok_and(|m| m.is_file() && m.len() > 0)
        });
    let result = (|| {
        let (storage, writer) = Storage::create_selected(
            &layout,
            &meta.geometry,
            selected.as_deref().map(|s| (s, spill.as_path())),
        )?;
        let have = if resuming {
            storage.verify_all(&meta, cli::threads())
        } else {
            vec![false; meta.geometry.piece_count() as usize]
        };
        let plan = Plan {
            paths: (0..layout.files.len())
                .filter(|&i| is_selected(i) && !streaming)
                .map(|i| layout.full_path(i).display().to_string())
                .collect(),
            selected: selected.clone(),
            stream_file: stream,
        };
        run(meta.clone(), storage, Some(writer), have, plan, config)
    })();
    if temporary {
        let _ = fs::remove_dir_all(&dir);
    } else if result.is_ok() && selected.is_some() {
        // The boundary bytes of unselected files have served their purpose.
        let _ = fs::remove_file(&spill);
    }
    result
}

pub fn seed(a: &SeedArgs) -> Result<(), Error> {
    let meta = cli::load_torrent_with(&a.torrent, a.ca_file.as_deref())?;
    let config = cli::session_config(&a.options(), true)?;
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
    let plan = Plan {
        paths: Vec::new(),
        selected: None,
        stream_file: None,
    };
    run(meta, Arc::new(storage), None, have, plan, config)
}

struct Session {
    ctx: Arc<peer::Context>,
    writer: Option<Writer>,
    picker: Picker,
    choker: Choker,
    peers: HashMap<PeerKey, Peer>,
    next_key: u64,
    candidates: VecDeque<SocketAddr>,
    /// Addresses connected or being dialled.
    known: HashSet<SocketAddr>,
    /// Past dial failures: count and when to try again.
    failures: HashMap<SocketAddr, (u32, Instant)>,
    banned_ids: HashSet<[u8; 20]>,
    banned_addrs: HashSet<SocketAddr>,
    /// Pieces found changed on disk while serving (reported once each).
    corrupt_on_disk: HashSet<PieceIndex>,
    own_addrs: Vec<SocketAddr>,
    input_tx: Sender<Input>,
    hash_tx: Option<Sender<PieceIndex>>,
    /// Most pieces let wait for their hash before no new blocks are asked for (see `fill`).
    max_hashing: usize,
    tracker_tx: Option<Sender<TrackerCommand>>,
    stats: Arc<Stats>,
    progress: Progress,
    /// Full paths of the torrent's files, printed when the download completes.
    paths: Vec<String>,
    /// Streaming to stdout (`-O -`), while it lasts.
    stream: Option<stream::Stream>,
    /// Per file, pieces not yet verified (for `file_completed` events).
    files_left: Vec<u32>,
    started: Instant,
    /// Last time a piece was verified (for `--stall-timeout`).
    last_progress: Instant,
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
    /// The download completed in a run that does not seed: `finished` is reported after the
    /// shutdown.
    finish_pending: bool,
    last_rechoke: Instant,
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
    mut writer: Option<Writer>,
    have: Vec<bool>,
    plan: Plan,
    cfg: Config,
) -> Result<(), Error> {
    let meta = Arc::new(meta);
    let mut rng = Rng::from_os();
    let our_id = rng::peer_id(&mut rng);
    let listener = bind_listener(&cfg)?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("reading the listening address", e))?;

    let (input_tx, input_rx) = crossbeam_channel::bounded(INPUT_CAPACITY);
    spawn_listener(listener, input_tx.clone());

    let geometry = meta.geometry.clone();
    let wanted = match &plan.selected {
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
    {
        let out = input_tx.clone();
        thread::Builder::new()
            .name("tracker".into())
            .spawn(move || {
                tracker.run(tracker_rx, &out);
                let _ = out.send(Input::TrackerDone);
            })
            .map_err(|e| Error::io("starting the tracker thread", e))?;
    }

    let hash_tx = writer
        .as_ref()
        .map(|_| spawn_hashers(&meta, &storage, &input_tx));
    let total = geometry.total_len();
    let max_hashing = (HASH_BACKLOG / u64::from(geometry.nominal_piece_len())).max(2) as usize;
    let done = total - picker.bytes_left();
    let mut own_addrs = vec![local];
    if local.ip().is_unspecified() {
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
    let progress = Progress::new(total, done, cfg.mode, !complete);
    progress.start(
        &meta.name,
        &meta.info_hash_hex(),
        total,
        geometry.piece_count(),
        meta.files.len(),
    );
    progress.listening(local);
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
            bind: cfg.net.bind,
            listen_port: local.port(),
            upload_limit: cfg
                .max_upload_rate
                .map(|r| Arc::new(TokenBucket::per_second(r))),
            download_limit: cfg
                .max_download_rate
                .map(|r| Arc::new(TokenBucket::per_second(r))),
        }),
        writer,
        was_complete: complete,
        seeding_since: complete.then(Instant::now),
        picker,
        choker: Choker::new(cfg.upload_slots, rng.next_u64()),
        peers: HashMap::new(),
        next_key: 0,
        candidates: cfg.peers.iter().copied().collect(),
        known: HashSet::new(),
        failures: HashMap::new(),
        banned_ids: HashSet::new(),
        banned_addrs: HashSet::new(),
        corrupt_on_disk: HashSet::new(),
        own_addrs,
        input_tx,
        hash_tx,
        max_hashing,
        tracker_tx: Some(tracker_tx),
        stats,
        progress,
        paths: plan.paths,
        stream: None,
        files_left,
        started: Instant::now(),
        last_progress: Instant::now(),
        downloaded: 0,
        uploaded: 0,
        last_need_peers: Instant::now(),
        trackers_failed: false,
        finish_pending: false,
        last_rechoke: Instant::now(),
        cfg,
    };
    if let Some(file) = plan.stream_file {
        s.start_stream(file);
    }
    if s.picker.is_complete() {
        // Everything was verified at start-up (a seeder): uploads may trust unchanged files.
        s.ctx.storage.mark_known_good();
    }
    let result = s.main_loop(&input_rx);
    s.shutdown(&input_rx);
    if s.finish_pending && result.is_ok() {
        s.report_finished();
    }
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
            if self.picker.is_complete() && self.stream.is_none() && self.done_seeding() {
                return Ok(());
            }
            if self
                .cfg
                .timeout
                .is_some_and(|t| self.started.elapsed() >= t)
            {
                return Err(Error::Timeout);
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
    /// seeding limit reached. The ratio is checked in exact integers.
    fn done_seeding(&self) -> bool {
        if !self.cfg.seed_after {
            return true;
        }
        let limits = self.cfg.seed_limits;
        let total = self.picker.geometry().total_len();
        let ratio_met = limits.ratio.is_some_and(|(num, den)| {
            u128::from(self.uploaded) * u128::from(den) >= u128::from(total) * u128::from(num)
        });
        let time_met = limits
            .time
            .zip(self.seeding_since)
            .is_some_and(|(t, since)| since.elapsed() >= t);
        ratio_met || time_met
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
        self.release_stalled_requests();
        self.retry_after_backoff();
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
        let done = total - self.stats.left.load(Ordering::Relaxed);
        self.progress.update(done, total, peers, seeds);
    }

    /// A one-shot download with no answering tracker and no peer, connected or to dial, has
    /// nothing to wait for. Checked when the trackers fail and on every tick, since the last
    /// peer may go away after that.
    fn check_peer_sources(&self) -> Result<(), Error> {
        if self.trackers_failed
            && !self.picker.is_complete()
            && !self.cfg.seed_after
            && self.peers.is_empty()
            && self.candidates.is_empty()
        {
            return Err(Error::NoPeers(
                "no tracker answered and no peer is known (add --peer HOST:PORT?)".into(),
            ));
        }
        Ok(())
    }

    fn handle(&mut self, msg: Input) -> Result<(), Error> {
        match msg {
            Input::Peer { key, event } => self.on_peer_event(key, event)?,
            Input::Accepted { stream, addr } => self.on_accepted(stream, addr),
            Input::Peers(list) => self.add_candidates(list),
            Input::TrackerNotice(m) => self.progress.note_kind("tracker_error", &m),
            // The tracker thread ended by itself (a torrent without trackers ends it at
            // once): the shutdown must not wait for it to say so a second time.
            Input::TrackerDone => self.tracker_tx = None,
            Input::TrackersFailed => {
                self.trackers_failed = true;
                self.check_peer_sources()?;
            }
            Input::StreamDone => self.stream = None,
            // The reader has all it wants: end cleanly.
            Input::StreamClosed => return Err(Error::OutputClosed),
            Input::StreamFailed(e) => return Err(Error::io("writing to standard output", e)),
            Input::Hashed { piece, ok } => self.on_hashed(piece, ok)?,
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
        if let Some(w) = &mut self.writer {
            // Never wait for the disk here: Ctrl-C must stay quick.
            let _ = w.flush(false);
        }
        // Ctrl-C must end the process within 2 s even with a tracker that never answers the
        // `stopped` announce (the signal is seen within one tick).
        let budget = if storage::stop_requested() {
            1000
        } else {
            1500
        };
        let deadline = Instant::now() + Duration::from_millis(budget);
        while (tracker_running || !self.peers.is_empty()) && Instant::now() < deadline {
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
                Ok(Input::TrackerNotice(m)) => self.progress.note_kind("tracker_error", &m),
                Ok(Input::TrackerDone) => tracker_running = false,
                Ok(_) => {}
                Err(_) => break,
            }
        }
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
