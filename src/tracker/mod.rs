//! Trackers: HTTP(S) and UDP announces and scrapes, and the tracker thread that keeps
//! announcing and feeds peers to the session.
//!
//! `http` and `udp` each speak one protocol; [`Client`] picks by URL scheme; [`plan::Plan`]
//! decides who is asked when (every tier at once, a race within a tier, back-off per
//! tracker); [`Tracker::run`] is the thread that carries the plan out: each request runs on a
//! short-lived thread of its own (at most [`MAX_IN_FLIGHT`] at a time), so a tracker that
//! never answers, or a name that takes long to resolve, holds up nobody else.

pub mod http;
pub mod plan;
pub mod udp;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use plan::Plan;

use crate::messages::Input;
use crate::path_safety::escape;
use crate::rng::Rng;

pub const MAX_PEERS: usize = 2000;
/// Bounds applied to the intervals trackers ask for (0 and 2³¹ both happen).
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3 * 3600);
/// The re-announce interval when a tracker names none.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1800);
/// Longest wait for one HTTP request (connect, TLS, reply together).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// BEP 15 waits 15 s for a reply, then twice as long on each retry. A request here makes
/// one try: the tracker's own back-off (5 s, doubling) spaces the next ones, so a silent UDP
/// tracker holds a request thread for 15 s at a time, like a silent HTTP one.
const UDP_TIMEOUT: Duration = Duration::from_secs(15);
const UDP_RETRIES: u32 = 0;
/// Budget of the `stopped` announces at exit, all sent at once.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests in flight at once, all trackers together (each is a thread): a torrent may list
/// a hundred trackers.
pub const MAX_IN_FLIGHT: usize = 16;
const REQUEST_STACK: usize = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnounceEvent {
    Started,
    Completed,
    Stopped,
    Periodic,
}

impl AnnounceEvent {
    fn as_query(self) -> Option<&'static str> {
        match self {
            AnnounceEvent::Started => Some("started"),
            AnnounceEvent::Completed => Some("completed"),
            AnnounceEvent::Stopped => Some("stopped"),
            AnnounceEvent::Periodic => None,
        }
    }
}

#[derive(Debug)]
pub enum Error {
    BadUrl(String),
    UnsupportedScheme(String),
    NoScrape,
    Http(String),
    Io(String),
    /// The tracker's name did not resolve.
    Dns(String),
    /// The TLS handshake failed (a certificate we do not trust, say): asking again cannot help.
    Tls(String),
    Timeout,
    /// We stopped waiting (another tracker of the tier answered first, or the run ended).
    Cancelled,
    Status(u16),
    Failure(String),
    BadReply(String),
}

impl Error {
    pub(crate) fn from_ureq(e: ureq::Error) -> Error {
        match e {
            ureq::Error::Timeout(t) => Error::Http(format!("timed out ({t})")),
            ureq::Error::BodyExceedsLimit(n) => {
                Error::BadReply(format!("reply larger than {n} bytes"))
            }
            ureq::Error::HostNotFound => Error::Dns("host not found".into()),
            ureq::Error::Io(e) => Error::io(e),
            e @ (ureq::Error::Tls(_) | ureq::Error::Rustls(_)) => Error::Tls(e.to_string()),
            e => Error::Http(e.to_string()),
        }
    }

    pub(crate) fn io(e: std::io::Error) -> Error {
        Error::Io(crate::error::reason(&e))
    }

    /// Asking again cannot help: the URL is unusable or the server's certificate untrusted.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Error::BadUrl(_) | Error::UnsupportedScheme(_) | Error::Tls(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadUrl(u) => write!(f, "malformed tracker URL {}", escape(u)),
            Error::UnsupportedScheme(u) => write!(
                f,
                "unsupported tracker URL {} (http, https and udp only)",
                escape(u)
            ),
            Error::NoScrape => write!(f, "this tracker offers no scrape"),
            Error::Http(e) => write!(f, "{}", escape(e)),
            Error::Io(e) => write!(f, "{}", escape(e)),
            Error::Dns(e) => write!(f, "cannot resolve {}", escape(e)),
            Error::Tls(e) => write!(f, "{}", escape(e)),
            Error::Timeout => write!(f, "no answer (timed out)"),
            Error::Cancelled => write!(f, "abandoned"),
            Error::Status(s) => write!(f, "HTTP status {s}"),
            Error::Failure(m) => write!(f, "tracker says: {}", escape(m)),
            Error::BadReply(m) => write!(f, "bad tracker reply: {}", escape(m)),
        }
    }
}

impl std::error::Error for Error {}

/// Transfer totals the session keeps current for announces.
#[derive(Debug, Default)]
pub struct Stats {
    pub uploaded: AtomicU64,
    pub downloaded: AtomicU64,
    pub left: AtomicU64,
    /// Trackers whose last announce succeeded.
    pub trackers_working: AtomicUsize,
}

/// What one announce asks.
#[derive(Debug, Clone, Copy)]
pub struct Announce<'a> {
    pub info_hash: &'a [u8; 20],
    pub peer_id: &'a [u8; 20],
    pub port: u16,
    pub uploaded: u64,
    pub downloaded: u64,
    pub left: u64,
    pub event: AnnounceEvent,
    pub key: u32,
    pub numwant: u32,
    pub tracker_id: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub peers: Vec<SocketAddr>,
    pub interval: Duration,
    pub min_interval: Option<Duration>,
    pub warning: Option<String>,
    pub tracker_id: Option<Vec<u8>>,
    pub seeders: Option<u64>,
    pub leechers: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrapeInfo {
    pub seeders: u64,
    pub leechers: u64,
    pub completed: u64,
}

fn clamp_interval(secs: i64) -> Duration {
    Duration::from_secs(secs.max(0) as u64).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Drops port 0, unspecified addresses and duplicates; caps the count.
fn finish_peers(mut peers: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let mut seen = HashSet::new();
    peers.retain(|p| p.port() != 0 && !p.ip().is_unspecified() && seen.insert(*p));
    peers.truncate(MAX_PEERS);
    peers
}

/// Network settings every tracker request shares.
#[derive(Debug, Clone, Default)]
pub struct NetConfig {
    pub bind: Option<IpAddr>,
    /// PEM file of CAs to trust instead of the built-in roots (`--ca-file`, `SSL_CERT_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
}

/// One announce or scrape on any supported URL; shared by the request threads.
pub struct Client {
    agent: ureq::Agent,
    udp: udp::UdpClient,
}

impl Client {
    pub fn new(net: &NetConfig, timeout: Duration) -> Result<Client, crate::http::Error> {
        Client::with_udp(net, timeout, UDP_TIMEOUT.min(timeout), UDP_RETRIES)
    }

    /// Short timeouts and no retries: the `stopped` announces at exit.
    fn quick(net: &NetConfig) -> Result<Client, crate::http::Error> {
        Client::with_udp(net, STOP_TIMEOUT, STOP_TIMEOUT, 0)
    }

    fn with_udp(
        net: &NetConfig,
        timeout: Duration,
        udp_timeout: Duration,
        udp_retries: u32,
    ) -> Result<Client, crate::http::Error> {
        Ok(Client {
            agent: crate::http::agent(timeout, net.bind, net.ca_file.as_deref())?,
            udp: udp::UdpClient::new(net.bind, udp_timeout, udp_retries),
        })
    }

    /// An announce; a UDP one gives up early once `cancel` is set (an HTTP one runs to its
    /// timeout).
    pub fn announce(&self, url: &str, p: &Announce, cancel: &AtomicBool) -> Result<Reply, Error> {
        if url.starts_with("http://") || url.starts_with("https://") {
            http::parse_reply(&http::get(&self.agent, &http::announce_url(url, p))?)
        } else if url.starts_with("udp://") {
            self.udp.announce(url, p, cancel)
        } else {
            Err(Error::UnsupportedScheme(url.to_string()))
        }
    }

    pub fn scrape(&self, url: &str, info_hash: &[u8; 20]) -> Result<ScrapeInfo, Error> {
        if url.starts_with("http://") || url.starts_with("https://") {
            let scrape = http::scrape_url(url, info_hash).ok_or(Error::NoScrape)?;
            http::parse_scrape(&http::get(&self.agent, &scrape)?, info_hash)
        } else if url.starts_with("udp://") {
            self.udp.scrape(url, info_hash)
        } else {
            Err(Error::UnsupportedScheme(url.to_string()))
        }
    }
}

pub fn supported(url: &str) -> bool {
    ["http://", "https://", "udp://"]
        .iter()
        .any(|s| url.starts_with(s))
}

/// Scrapes every tracker in `urls` (repeats asked once) at the same time, at most
/// [`MAX_IN_FLIGHT`] at once; the answers come back in the order of `urls`.
pub fn scrape_all(
    client: &Client,
    urls: &[String],
    info_hash: &[u8; 20],
) -> Vec<(String, Result<ScrapeInfo, Error>)> {
    let mut unique: Vec<&String> = Vec::new();
    for u in urls {
        if !unique.contains(&u) {
            unique.push(u);
        }
    }
    let mut out = Vec::with_capacity(unique.len());
    for chunk in unique.chunks(MAX_IN_FLIGHT) {
        std::thread::scope(|scope| {
            let running: Vec<_> = chunk
                .iter()
                .map(|u| {
                    let spawned = std::thread::Builder::new()
                        .name("tracker-scrape".into())
                        .stack_size(REQUEST_STACK)
                        .spawn_scoped(scope, || client.scrape(u, info_hash));
                    (u, spawned)
                })
                .collect();
            for (u, spawned) in running {
                let result = match spawned {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(Error::Io("the scrape thread failed".into()))),
                    Err(e) => Err(Error::io(e)),
                };
                out.push(((*u).clone(), result));
            }
        });
    }
    out
}

/// Messages from the session to the tracker thread.
#[derive(Debug)]
pub enum TrackerCommand {
    /// The download finished: announce `completed` now.
    Completed,
    /// The session has too few peers: announce early if `min interval` allows.
    NeedPeers,
    /// Announce `stopped` (bounded wait) and end.
    Stop,
}

pub struct Tracker {
    pub tiers: Vec<Vec<String>>,
    pub info_hash: [u8; 20],
    /// A hybrid torrent's second swarm (BEP 52: the v2 info hash's first 20 bytes), announced
    /// beside the first at every tracker.
    pub second_hash: Option<[u8; 20]>,
    pub peer_id: [u8; 20],
    pub port: u16,
    pub stats: Arc<Stats>,
    /// `--announce-interval`: overrides the tracker's interval (loopback swarms, tests).
    pub interval_override: Option<Duration>,
    pub net: NetConfig,
}

/// What a request thread sends back.
struct Done {
    tracker: usize,
    event: AnnounceEvent,
    result: Result<Reply, Error>,
}

/// What the tracker thread knows of each tracker besides the plan.
#[derive(Default)]
struct Known {
    tracker_id: Option<Vec<u8>>,
    last_warning: Option<String>,
    /// Set to abandon the request in flight.
    cancel: Option<Arc<AtomicBool>>,
}

impl Tracker {
    /// The tracker thread's body.
    pub fn run(self, commands: Receiver<TrackerCommand>, out: &Sender<Input>) {
        let mut rng = Rng::from_os();
        let mut plan = Plan::new(&self.tiers, &mut rng, Instant::now());
        if plan.is_empty() {
            let _ = out.send(Input::TrackersFailed);
            return;
        }
        let client = match Client::new(&self.net, REQUEST_TIMEOUT) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                let _ = out.send(Input::TrackerNotice(e.to_string()));
                let _ = out.send(Input::TrackersFailed);
                return;
            }
        };
        let key = rng.next_u64() as u32;
        let mut known: Vec<Known> = (0..plan.len()).map(|_| Known::default()).collect();
        // Each request thread sends one `Done`, and at most MAX_IN_FLIGHT run at once.
        let (done_tx, done_rx) = crossbeam_channel::bounded::<Done>(MAX_IN_FLIGHT);
        let mut in_flight = 0usize;
        let mut reported_given_up = false;
        loop {
            let now = Instant::now();
            for launch in plan.due(now, MAX_IN_FLIGHT - in_flight) {
                let cancel = Arc::new(AtomicBool::new(false));
                let k = &mut known[launch.tracker];
                k.cancel = Some(Arc::clone(&cancel));
                let request = Request {
                    url: plan.url(launch.tracker).to_string(),
                    params: self.owned_params(launch.event, key, k.tracker_id.clone()),
                };
                let tracker = launch.tracker;
                let event = launch.event;
                let tx = done_tx.clone();
                let client = Arc::clone(&client);
                let spawned = std::thread::Builder::new()
                    .name("tracker-request".into())
                    .stack_size(REQUEST_STACK)
                    .spawn(move || {
                        let result = panic::catch_unwind(AssertUnwindSafe(|| {
                            request.send(&client, &cancel)
                        }))
                        .unwrap_or_else(|_| Err(Error::Io("the request thread failed".into())));
                        let _ = tx.send(Done {
                            tracker,
                            event,
                            result,
                        });
                    });
                match spawned {
                    Ok(_) => in_flight += 1,
                    Err(e) => {
                        plan.failed(tracker, false, now);
                        let _ = out.send(Input::TrackerFailed {
                            url: plan.url(tracker).to_string(),
                            reason: format!("cannot start a request: {}", Error::io(e)),
                        });
                    }
                }
            }
            self.stats
                .trackers_working
                .store(plan.working(), Ordering::Relaxed);
            if !reported_given_up && plan.given_up() {
                reported_given_up = true;
                let _ = out.send(Input::TrackersFailed);
            }
            let wake = plan
                .next_wakeup()
                .unwrap_or(now + Duration::from_secs(3600));
            crossbeam_channel::select! {
                recv(done_rx) -> done => {
                    let Ok(done) = done else { unreachable!("the tracker thread holds a sender") };
                    in_flight -= 1;
                    self.settle(&mut plan, &mut known, done, out);
                }
                recv(commands) -> command => match command {
                    Ok(TrackerCommand::Completed) => plan.complete(),
                    Ok(TrackerCommand::NeedPeers) => plan.need_peers(),
                    Ok(TrackerCommand::Stop) | Err(_) => {
                        self.stop(&mut plan, &mut known, &done_rx, out, key);
                        return;
                    }
                },
                default(wake.saturating_duration_since(now)) => {}
            }
        }
    }

    /// Takes one request's outcome into the plan and tells the session.
    fn settle(&self, plan: &mut Plan, known: &mut [Known], done: Done, out: &Sender<Input>) {
        let now = Instant::now();
        let url = plan.url(done.tracker).to_string();
        known[done.tracker].cancel = None;
        match done.result {
            Ok(reply) => {
                let k = &mut known[done.tracker];
                if let Some(w) = &reply.warning
                    && k.last_warning.as_ref() != Some(w)
                {
                    k.last_warning = Some(w.clone());
                    let _ = out.send(Input::TrackerNotice(format!(
                        "tracker {}: warning: {}",
                        escape(&url),
                        escape(w)
                    )));
                }
                if reply.tracker_id.is_some() {
                    k.tracker_id = reply.tracker_id.clone();
                }
                let (wait, min_interval) = match self.interval_override {
                    // An explicit --announce-interval is the user's call, as in aria2.
                    Some(every) => (every, Duration::ZERO),
                    None => (reply.interval, reply.min_interval.unwrap_or(Duration::ZERO)),
                };
                for loser in plan.answered(done.tracker, done.event, wait, min_interval, now) {
                    if let Some(c) = &known[loser].cancel {
                        c.store(true, Ordering::Relaxed);
                    }
                }
                if !reply.peers.is_empty() {
                    let _ = out.send(Input::Peers(reply.peers));
                }
            }
            Err(Error::Cancelled) => plan.abandoned(done.tracker),
            Err(e) => {
                if plan.failed(done.tracker, e.is_permanent(), now) {
                    let _ = out.send(Input::TrackerFailed {
                        url,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }

    /// The end: `stopped` to every tracker that answered this run (after `completed` where it
    /// is still owed), all at once, for at most [`STOP_TIMEOUT`] together. Requests in flight
    /// to those trackers are waited for first, within the same budget (a `completed` on its
    /// way must not cross our `stopped`); trackers that never answered cost nothing.
    fn stop(
        &self,
        plan: &mut Plan,
        known: &mut [Known],
        done: &Receiver<Done>,
        out: &Sender<Input>,
        key: u32,
    ) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        for (i, k) in known.iter().enumerate() {
            if let Some(c) = k.cancel.as_ref().filter(|_| !plan.is_registered(i)) {
                c.store(true, Ordering::Relaxed);
            }
        }
        while plan.registered_in_flight() {
            match done.recv_deadline(deadline) {
                Ok(d) => self.settle(plan, known, d, out),
                Err(_) => break,
            }
        }
        let Ok(client) = Client::quick(&self.net) else {
            return;
        };
        let client = Arc::new(client);
        let (tx, rx) = crossbeam_channel::bounded::<()>(MAX_IN_FLIGHT);
        let mut sent = 0;
        for tracker in plan.registered().into_iter().take(MAX_IN_FLIGHT) {
            let url = plan.url(tracker).to_string();
            let tracker_id = known[tracker].tracker_id.clone();
            let mut requests = Vec::new();
            if plan.owes_completed(tracker) {
                requests.push(Request {
                    url: url.clone(),
                    params: self.owned_params(AnnounceEvent::Completed, key, tracker_id.clone()),
                });
            }
            requests.push(Request {
                url,
                params: self.owned_params(AnnounceEvent::Stopped, key, tracker_id),
            });
            let client = Arc::clone(&client);
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("tracker-stopped".into())
                .stack_size(REQUEST_STACK)
                .spawn(move || {
                    for request in requests {
                        let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                            request.send(&client, &AtomicBool::new(false))
                        }));
                    }
                    let _ = tx.send(());
                });
            if spawned.is_ok() {
                sent += 1;
            }
        }
        // Those still running at the deadline end by their own (short) timeouts.
        for _ in 0..sent {
            if rx.recv_deadline(deadline).is_err() {
                break;
            }
        }
    }

    fn owned_params(
        &self,
        event: AnnounceEvent,
        key: u32,
        tracker_id: Option<Vec<u8>>,
    ) -> OwnedAnnounce {
        OwnedAnnounce {
            info_hash: self.info_hash,
            second_hash: self.second_hash,
            peer_id: self.peer_id,
            port: self.port,
            uploaded: self.stats.uploaded.load(Ordering::Relaxed),
            downloaded: self.stats.downloaded.load(Ordering::Relaxed),
            left: self.stats.left.load(Ordering::Relaxed),
            event,
            key,
            tracker_id,
        }
    }
}

/// An announce's parameters, owned by the request thread.
struct OwnedAnnounce {
    info_hash: [u8; 20],
    second_hash: Option<[u8; 20]>,
    peer_id: [u8; 20],
    port: u16,
    uploaded: u64,
    downloaded: u64,
    left: u64,
    event: AnnounceEvent,
    key: u32,
    tracker_id: Option<Vec<u8>>,
}

struct Request {
    url: String,
    params: OwnedAnnounce,
}

impl Request {
    /// Announces in the torrent's swarm, and in its second one (hybrid torrents) right after:
    /// the peers of both count; the first swarm's answer leads unless only the second answered.
    fn send(&self, client: &Client, cancel: &AtomicBool) -> Result<Reply, Error> {
        let first = self.send_for(&self.params.info_hash, client, cancel);
        let Some(second) = self.params.second_hash else {
            return first;
        };
        if cancel.load(Ordering::Relaxed) {
            return first;
        }
        match (first, self.send_for(&second, client, cancel)) {
            (Ok(mut a), Ok(b)) => {
                a.peers.extend(b.peers);
                a.peers = finish_peers(std::mem::take(&mut a.peers));
                Ok(a)
            }
            (Err(_), Ok(b)) => Ok(b),
            (a, _) => a,
        }
    }

    fn send_for(
        &self,
        info_hash: &[u8; 20],
        client: &Client,
        cancel: &AtomicBool,
    ) -> Result<Reply, Error> {
        let p = &self.params;
        let announce = Announce {
            info_hash,
            peer_id: &p.peer_id,
            port: p.port,
            uploaded: p.uploaded,
            downloaded: p.downloaded,
            left: p.left,
            event: p.event,
            key: p.key,
            numwant: 80,
            tracker_id: p.tracker_id.as_deref(),
        };
        client.announce(&self.url, &announce, cancel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_cleaned() {
        let p: Vec<SocketAddr> = vec![
            "1.2.3.4:1".parse().unwrap(),
            "1.2.3.4:1".parse().unwrap(),
            "1.2.3.4:0".parse().unwrap(),
            "0.0.0.0:5".parse().unwrap(),
        ];
        assert_eq!(finish_peers(p), vec!["1.2.3.4:1".parse().unwrap()]);
        assert_eq!(clamp_interval(0), MIN_INTERVAL);
        assert_eq!(clamp_interval(1 << 31), MAX_INTERVAL);
        assert_eq!(clamp_interval(600), Duration::from_secs(600));
    }

    #[test]
    fn only_unusable_urls_and_untrusted_certificates_are_permanent() {
        assert!(Error::BadUrl("x".into()).is_permanent());
        assert!(Error::Tls("unknown issuer".into()).is_permanent());
        for transient in [
            Error::Timeout,
            Error::Io("connection refused".into()),
            Error::Dns("x.invalid".into()),
            Error::Status(503),
            Error::Failure("overloaded".into()),
        ] {
            assert!(!transient.is_permanent(), "{transient}");
        }
    }
}
