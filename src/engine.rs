//! The engine's public face: start a run, steer it through a [`Handle`], watch it through
//! typed [`Event`]s.
//!
//! The engine never prints, never installs signal handlers, never reads argv and never picks
//! an exit code: those are the front end's (the CLI's, or an embedder's). A run is one session
//! thread (see `session`) that owns all torrent state; [`Engine::start`] spawns it and returns
//! at once, so preparing storage (and checking data already on disk) is reported through
//! events too.
//!
//! # Example: one engine seeds, another downloads, both on loopback
//!
//! ```
//! use std::time::Duration;
//! use bitfetch::{Config, Engine, Event, Metainfo, Source, Target};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("bitfetch-doc-{}", std::process::id()));
//! let (seed_dir, out_dir) = (dir.join("seed"), dir.join("out"));
//! std::fs::create_dir_all(&seed_dir)?;
//! let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
//! std::fs::write(seed_dir.join("hello.bin"), &data)?;
//! let torrent = bitfetch::create_torrent(&seed_dir.join("hello.bin"), &Default::default())?;
//! let meta = Metainfo::from_bytes(&torrent)?;
//!
//! let loopback = Config {
//!     port: Some(0),
//!     bind: Some("127.0.0.1".parse()?),
//!     ..Config::default()
//! };
//! let seed_config = Config { seed_after: true, ..loopback.clone() };
//! let (seeder, seeder_events) = Engine::start(
//!     Source::Torrent(meta.clone()),
//!     Target::Seed { data: seed_dir.join("hello.bin") },
//!     seed_config,
//! );
//! let seeder_addr = seeder_events
//!     .iter()
//!     .find_map(|e| match e {
//!         Event::Listening(addr) => Some(addr),
//!         _ => None,
//!     })
//!     .expect("the seeder listens");
//!
//! let leech_config = Config { peers: vec![seeder_addr], timeout: Some(Duration::from_secs(60)), ..loopback };
//! let target = Target::Download { dir: out_dir.clone(), selected: None, stream: None };
//! let (leecher, events) = Engine::start(Source::Torrent(meta), target, leech_config);
//! let finished = events.iter().any(|e| matches!(e, Event::Finished { .. }));
//! leecher.wait()?;
//! seeder.stop();
//! seeder.wait()?;
//!
//! assert!(finished);
//! assert_eq!(std::fs::read(out_dir.join("hello.bin"))?, data);
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::error::Error;
use crate::magnet::Magnet;
use crate::messages::Input;
use crate::metainfo::Metainfo;
use crate::session;
use crate::tracker;

/// What to fetch.
#[derive(Debug)]
#[non_exhaustive]
pub enum Source {
    /// A parsed .torrent.
    Torrent(Metainfo),
    /// A magnet link: the info dictionary is fetched from peers first (BEP 9).
    Magnet(MagnetSource),
}

/// A magnet link to fetch, and what to do once the torrent is known.
pub struct MagnetSource {
    pub magnet: Magnet,
    /// Called once the metadata is verified and parsed, before anything is written: which
    /// files to fetch, or to stop there (`--list`, `info MAGNET`). `None`: all files.
    pub choose: Option<Chooser>,
}

/// See [`MagnetSource::choose`].
pub type Chooser = Box<dyn FnOnce(&Metainfo) -> Result<Choice, Error> + Send>;

/// What a [`Chooser`] decided.
#[derive(Debug)]
pub enum Choice {
    /// Download these files (one flag per file; all when `None`).
    Download(Option<Vec<bool>>),
    /// Fetch this file alone and stream it (the target has a `stream`).
    Stream(usize),
    /// End the run here, successfully.
    Stop,
}

impl std::fmt::Debug for MagnetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MagnetSource")
            .field("magnet", &self.magnet)
            .field("choose", &self.choose.is_some())
            .finish()
    }
}

/// Where the data goes, or comes from.
pub enum Target {
    /// Download into `dir` (the torrent's name is created inside it), resuming from what is
    /// already there.
    Download {
        dir: PathBuf,
        /// Which files to fetch, one flag per file of the torrent (all when `None`).
        selected: Option<Vec<bool>>,
        /// Stream one file's content, in order, as its pieces verify.
        stream: Option<StreamTo>,
    },
    /// Seed existing data, verified first: the directory holding the content, or the file
    /// itself for a single-file torrent.
    Seed { data: PathBuf },
}

/// One file of the torrent, written in order to `out` as its pieces verify.
pub struct StreamTo {
    /// Index into the torrent's file list.
    pub file: usize,
    pub out: Box<dyn Write + Send>,
}

/// When to stop seeding: whichever limit comes first. No limit means until stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedLimits {
    /// Upload at least `num / den` times the torrent's size.
    pub ratio: Option<(u64, u64)>,
    pub time: Option<Duration>,
}

impl SeedLimits {
    /// Whether seeding should stop: `uploaded` bytes since completion of a torrent of `total`
    /// bytes, `seeding_for` since completion (None: not complete yet). The ratio is compared
    /// in exact integers, so `1.5` stops at exactly the byte it names.
    pub fn reached(&self, uploaded: u64, total: u64, seeding_for: Option<Duration>) -> bool {
        let ratio_met = self.ratio.is_some_and(|(num, den)| {
            u128::from(uploaded) * u128::from(den) >= u128::from(total) * u128::from(num)
        });
        let time_met = self
            .time
            .zip(seeding_for)
            .is_some_and(|(limit, elapsed)| elapsed >= limit);
        ratio_met || time_met
    }
}

/// How a run behaves. `Config::default()` is what the CLI does with no options.
#[derive(Debug, Clone)]
pub struct Config {
    /// Peers to dial besides those the trackers name.
    pub peers: Vec<SocketAddr>,
    /// Port to listen on; 0 picks a free one (see [`Event::Listening`]). `None`: the first
    /// free port of 6881–6889, else any free port.
    pub port: Option<u16>,
    /// Local address for listening and outgoing connections (both families when `None`).
    pub bind: Option<IpAddr>,
    /// PEM file of certificate authorities for HTTPS trackers (built-in roots when `None`).
    pub ca_file: Option<PathBuf>,
    /// Seconds between announces, overriding the tracker's interval.
    pub announce_interval: Option<Duration>,
    /// Wait for the data to reach stable storage at completion. Otherwise the data is left
    /// in the page cache, safe from our own death, and written back by the kernel; a restart
    /// re-verifies what is on disk either way.
    pub fsync: bool,
    /// Keep running after the download completes, until a seeding limit or [`Handle::stop`].
    pub seed_after: bool,
    pub seed_limits: SeedLimits,
    pub max_peers: usize,
    /// Connections to or from any one IP address at most (in and out together): one host
    /// cannot take every slot.
    pub max_peers_per_ip: usize,
    /// Regular upload slots; one optimistic slot comes on top.
    pub upload_slots: usize,
    /// Bytes per second.
    pub max_upload_rate: Option<u64>,
    /// Bytes per second.
    pub max_download_rate: Option<u64>,
    /// Give up ([`Error::Timeout`]) after this long.
    pub timeout: Option<Duration>,
    /// Give up ([`Error::Stalled`]) when no piece verifies for this long.
    pub stall_timeout: Option<Duration>,
    /// Threads that hash pieces (and check data at start-up).
    pub hashers: usize,
    /// Look for peers in the mainline DHT (BEP 5) and answer other nodes; never for private
    /// torrents (BEP 27).
    pub dht: bool,
    /// `HOST:PORT` nodes to join the DHT through, instead of the public routers. With `bind`
    /// on a loopback address and none given, no public name is looked up at all.
    pub dht_bootstrap: Vec<String>,
    /// Where the DHT keeps its node id and routing table between runs (nothing is kept when
    /// `None`). The command line uses `$XDG_CACHE_HOME/bitfetch/dht.dat`.
    pub dht_state: Option<PathBuf>,
    /// BEP 11 peer exchange: tell connected peers about each other (`ut_pex`) and dial the
    /// peers they tell us about (within the same caps, bans and back-off as tracker peers).
    /// Always off for private torrents (BEP 27).
    pub pex: bool,
    /// Web seeds (BEP 19) to use besides the torrent's `url-list` (and a magnet link's `ws`,
    /// which the engine adds itself): http or https URLs.
    pub web_seeds: Vec<String>,
    /// Use web seeds at all (the torrent's, the link's and `web_seeds`).
    pub use_web_seeds: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            peers: Vec::new(),
            port: None,
            bind: None,
            ca_file: None,
            announce_interval: None,
            fsync: false,
            seed_after: false,
            seed_limits: SeedLimits::default(),
            max_peers: 80,
            max_peers_per_ip: 8,
            upload_slots: 4,
            max_upload_rate: None,
            max_download_rate: None,
            timeout: None,
            stall_timeout: None,
            hashers: cores(),
            dht: true,
            dht_bootstrap: Vec::new(),
            dht_state: None,
            pex: true,
            web_seeds: Vec::new(),
            use_web_seeds: true,
        }
    }
}

/// Threads worth running for CPU-bound work (hashing): one per core.
pub(crate) fn cores() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

impl Config {
    pub(crate) fn net(&self) -> tracker::NetConfig {
        tracker::NetConfig {
            bind: self.bind,
            ca_file: self.ca_file.clone(),
        }
    }
}

/// What a run reports, in order: `Started` and `Listening` first, `Finished` last (when the
/// download completes; a run that fails ends without it and [`Handle::wait`] says why).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The torrent is known and its data on disk checked.
    Started {
        name: String,
        info_hash: [u8; 20],
        size: u64,
        pieces: u32,
        files: usize,
        /// Bytes already verified (resumed or seeded data).
        verified: u64,
    },
    Listening(SocketAddr),
    /// About four times a second.
    Progress(Progress),
    /// Every piece of this file has verified.
    FileCompleted {
        path: PathBuf,
        size: u64,
    },
    /// A tracker failed: once when it starts failing, not on every retry (it is retried with
    /// back-off all the same).
    TrackerError {
        url: String,
        message: String,
    },
    /// A web seed failed: a file it lacks, a failure it will retry after a back-off (once per
    /// run of failures), or why it is not used any more.
    WebSeedError {
        url: String,
        message: String,
    },
    /// A magnet's metadata phase, about once a second: connections, and metadata pieces
    /// received of how many (0 of 0 until a peer says the size).
    MetadataProgress {
        peers: usize,
        received: u32,
        pieces: u32,
    },
    /// A magnet's info dictionary arrived and matches the info hash: `size` bytes in
    /// `pieces` metadata pieces, with `peers` connections open. `Started` follows.
    Metadata {
        size: u64,
        pieces: u32,
        peers: usize,
    },
    /// The DHT is up on `address` (UDP) and knows `nodes` nodes after loading its saved
    /// table and bootstrapping; 0 means it has nobody to ask.
    Dht {
        address: SocketAddr,
        nodes: usize,
    },
    /// A source named `count` candidate peers.
    PeersFound {
        source: PeerSource,
        count: usize,
    },
    /// Something people should know: tracker warnings, bans, hash failures.
    Notice {
        kind: NoticeKind,
        message: String,
    },
    /// The download is complete and the files are in place.
    Finished {
        /// Bytes verified against their hashes (all that was wanted, now).
        verified: u64,
        /// Bytes received from peers and web seeds in this run (resumed data is not among
        /// them).
        transferred: u64,
        /// Of `transferred`, the bytes from web seeds.
        web_seed_bytes: u64,
        uploaded: u64,
        /// From the start of the transfer to completion.
        elapsed: Duration,
        /// The downloaded files (not when streaming).
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes verified against their hashes (resumed data included).
    pub verified: u64,
    /// The torrent's size.
    pub total: u64,
    /// Bytes received from peers and web seeds in this run.
    pub transferred: u64,
    /// Of `transferred`, the bytes from web seeds.
    pub web_seed_bytes: u64,
    /// Bytes sent to peers in this run.
    pub uploaded: u64,
    /// Connected peers, and how many of them have everything.
    pub peers: usize,
    pub seeds: usize,
    /// Web seeds in use (not given up).
    pub web_seeds: usize,
    /// Trackers whose last announce succeeded.
    pub trackers: usize,
    /// Everything wanted is verified (the run is seeding, or about to end).
    pub complete: bool,
}

/// Where candidate peers came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerSource {
    Tracker,
    Dht,
    /// Peer exchange (BEP 11): another peer told us.
    Pex,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoticeKind {
    Tracker,
    /// The DHT: a state file that could not be used, a socket that could not be opened.
    Dht,
    /// A peer the user named could not be reached (once per peer).
    PeerUnreachable,
    PeerBanned,
    HashFailed,
    DiskChanged,
    /// A web seed (BEP 19) failed.
    WebSeed,
    Other,
}

/// Counters of a running session, readable at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub downloaded: u64,
    pub uploaded: u64,
    /// Bytes still to verify.
    pub left: u64,
}

/// Steers a run; dropping it stops the run and waits for it.
pub struct Handle {
    stop: Arc<AtomicBool>,
    input: Sender<Input>,
    stats: Arc<tracker::Stats>,
    thread: Option<JoinHandle<Result<(), Error>>>,
}

/// Starts runs.
pub struct Engine;

impl Engine {
    /// Starts a run on its own thread. Errors (bad data path, port in use, no peers, …) end
    /// the run; [`Handle::wait`] returns them.
    pub fn start(source: Source, target: Target, config: Config) -> (Handle, Receiver<Event>) {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(tracker::Stats::default());
        // Events are few (progress four times a second, one per file, notices), so an
        // unbounded channel stays small, and the session never waits on a slow front end.
        // What a stranger can cause is paid for in kind: a ban or an unreachable peer is
        // reported once per address (bans remembered up to 4,096), a hash failure costs the
        // sender a whole piece of traffic.
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let (input_tx, input_rx) = crossbeam_channel::bounded(session::INPUT_CAPACITY);
        let run = session::Run {
            source,
            target,
            config,
            events: events_tx,
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            input: (input_tx.clone(), input_rx),
        };
        let thread = thread::Builder::new()
            .name("session".into())
            .spawn(move || session::run(run))
            .map_err(|e| Error::io("starting the session thread", e));
        let thread = match thread {
            Ok(t) => t,
            // No thread: hand back one that reports why.
            Err(e) => thread::spawn(move || Err(e)),
        };
        let handle = Handle {
            stop,
            input: input_tx,
            stats,
            thread: Some(thread),
        };
        (handle, events_rx)
    }
}

impl Handle {
    /// Asks the run to end: orderly (`stopped` announced, connections closed). A run stopped
    /// before its download completed ends with [`Error::Interrupted`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// More peers to dial.
    pub fn add_peers(&self, peers: Vec<SocketAddr>) {
        let _ = self.input.send(Input::NamedPeers(peers));
    }

    pub fn stats(&self) -> Stats {
        Stats {
            downloaded: self.stats.downloaded.load(Ordering::Relaxed),
            uploaded: self.stats.uploaded.load(Ordering::Relaxed),
            left: self.stats.left.load(Ordering::Relaxed),
        }
    }

    /// Whether the run has ended (`wait` then returns at once).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the run to end and says how it ended.
    pub fn wait(mut self) -> Result<(), Error> {
        self.join()
    }

    fn join(&mut self) -> Result<(), Error> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Internal("the session thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_seed_limit_means_seed_on() {
        let none = SeedLimits::default();
        assert!(!none.reached(u64::MAX, 1, Some(Duration::from_secs(1 << 40))));
    }

    #[test]
    fn the_ratio_stops_at_exactly_the_byte_it_names() {
        let limits = SeedLimits {
            ratio: Some((15, 10)),
            time: None,
        };
        assert!(!limits.reached(1499, 1000, Some(Duration::ZERO)));
        assert!(limits.reached(1500, 1000, Some(Duration::ZERO)));
        // No overflow on huge torrents.
        assert!(!limits.reached(u64::MAX / 2, u64::MAX, None));
        let zero = SeedLimits {
            ratio: Some((0, 1)),
            time: None,
        };
        assert!(zero.reached(0, 1000, None), "ratio 0 is met at once");
    }

    #[test]
    fn the_time_limit_counts_from_completion_only() {
        let limits = SeedLimits {
            ratio: None,
            time: Some(Duration::from_secs(90)),
        };
        assert!(!limits.reached(0, 1000, None));
        assert!(!limits.reached(0, 1000, Some(Duration::from_secs(89))));
        assert!(limits.reached(0, 1000, Some(Duration::from_secs(90))));
    }

    #[test]
    fn whichever_limit_comes_first_wins() {
        let limits = SeedLimits {
            ratio: Some((2, 1)),
            time: Some(Duration::from_secs(60)),
        };
        assert!(limits.reached(2000, 1000, Some(Duration::from_secs(1))));
        assert!(limits.reached(0, 1000, Some(Duration::from_secs(61))));
        assert!(!limits.reached(1999, 1000, Some(Duration::from_secs(59))));
    }
}
