//! Trackers: HTTP(S) and UDP announces and scrapes, announce-list tiers (BEP 12), and the
//! tracker thread that keeps announcing and feeds peers to the session.
//!
//! `http` and `udp` each speak one protocol; [`Client`] picks by URL scheme; [`Tiers`] keeps
//! the BEP 12 order; [`Tracker::run`] is the thread: `started`, re-announces at the tracker's
//! interval (sooner when the session is short of peers, never below `min interval`),
//! `completed` once, `stopped` at the end with a short bounded wait. Failures back off
//! exponentially and never stop the download.

pub mod http;
pub mod udp;

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::messages::Input;
use crate::path_safety::escape;
use crate::rng::Rng;

pub const MAX_PEERS: usize = 2000;
/// Bounds applied to the intervals trackers ask for (0 and 2³¹ both happen).
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3 * 3600);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1800);
/// When short of peers, ask again after this long even if the interval is longer (but never
/// sooner than the tracker's `min interval`).
const SHORT_OF_PEERS_INTERVAL: Duration = Duration::from_secs(120);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(900);

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
    Timeout,
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
            e => Error::Http(e.to_string()),
        }
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
            Error::Timeout => write!(f, "no answer (timed out)"),
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

/// One announce or scrape on any supported URL.
pub struct Client {
    agent: ureq::Agent,
    /// Same settings with a short timeout, for the `stopped` announce at exit.
    quick_agent: ureq::Agent,
    quick: bool,
    udp: udp::UdpClient,
}

impl Client {
    pub fn new(net: &NetConfig, timeout: Duration) -> Result<Client, crate::http::Error> {
        Ok(Client {
            agent: crate::http::agent(timeout, net.bind, net.ca_file.as_deref())?,
            quick_agent: crate::http::agent(STOP_TIMEOUT, net.bind, net.ca_file.as_deref())?,
            quick: false,
            udp: udp::UdpClient::new(net.bind, Duration::from_secs(15).min(timeout), 2),
        })
    }

    /// Short timeouts and no retries from now on (the `stopped` announce at exit).
    pub fn set_quick(&mut self, quick: bool) {
        self.quick = quick;
        if quick {
            self.udp.set_timeouts(STOP_TIMEOUT, 0);
        }
    }

    fn agent(&self) -> &ureq::Agent {
        if self.quick {
            &self.quick_agent
        } else {
            &self.agent
        }
    }

    pub fn announce(&mut self, url: &str, p: &Announce) -> Result<Reply, Error> {
        if url.starts_with("http://") || url.starts_with("https://") {
            http::parse_reply(&http::get(self.agent(), &http::announce_url(url, p))?)
        } else if url.starts_with("udp://") {
            self.udp.announce(url, p)
        } else {
            Err(Error::UnsupportedScheme(url.to_string()))
        }
    }

    pub fn scrape(&mut self, url: &str, info_hash: &[u8; 20]) -> Result<ScrapeInfo, Error> {
        if url.starts_with("http://") || url.starts_with("https://") {
            let scrape = http::scrape_url(url, info_hash).ok_or(Error::NoScrape)?;
            http::parse_scrape(&http::get(self.agent(), &scrape)?, info_hash)
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

/// BEP 12 announce-list order: tiers in order, each shuffled once; a tracker that answers
/// moves to the front of its tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers(Vec<Vec<String>>);

impl Tiers {
    pub fn new(tiers: &[Vec<String>], rng: &mut Rng) -> Tiers {
        let mut tiers: Vec<Vec<String>> = tiers
            .iter()
            .map(|t| {
                t.iter()
                    .filter(|u| supported(u))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .filter(|t| !t.is_empty())
            .collect();
        for t in &mut tiers {
            rng.shuffle(t);
        }
        Tiers(tiers)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every tracker in the order to try, as (tier, position).
    pub fn order(&self) -> Vec<(usize, usize)> {
        self.0
            .iter()
            .enumerate()
            .flat_map(|(t, urls)| (0..urls.len()).map(move |i| (t, i)))
            .collect()
    }

    pub fn url(&self, at: (usize, usize)) -> &str {
        &self.0[at.0][at.1]
    }

    pub fn promote(&mut self, at: (usize, usize)) {
        let url = self.0[at.0].remove(at.1);
        self.0[at.0].insert(0, url);
    }

    #[cfg(test)]
    pub fn first(&self) -> Option<&str> {
        self.0.first().and_then(|t| t.first()).map(String::as_str)
    }
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
    pub peer_id: [u8; 20],
    pub port: u16,
    pub stats: Arc<Stats>,
    /// `--announce-interval`: overrides the tracker's interval (loopback swarms, tests).
    pub interval_override: Option<Duration>,
    pub net: NetConfig,
}

struct Schedule {
    interval: Duration,
    min_interval: Duration,
    last: Instant,
}

impl Tracker {
    /// The tracker thread's body.
    pub fn run(self, commands: Receiver<TrackerCommand>, out: &Sender<Input>) {
        let mut rng = Rng::from_os();
        let mut tiers = Tiers::new(&self.tiers, &mut rng);
        if tiers.is_empty() {
            let _ = out.send(Input::TrackersFailed);
            return;
        }
        let mut client = match Client::new(&self.net, REQUEST_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                let _ = out.send(Input::TrackerNotice(e.to_string()));
                let _ = out.send(Input::TrackersFailed);
                return;
            }
        };
        let key = rng.next_u64() as u32;
        let mut tracker_id: Option<Vec<u8>> = None;
        // `stopped` goes to the tracker that last answered (none if none ever did).
        let mut last_answered: Option<String> = None;
        let mut event = AnnounceEvent::Started;
        let mut backoff = Duration::from_secs(15);
        let mut sched = Schedule {
            interval: DEFAULT_INTERVAL,
            min_interval: Duration::ZERO,
            last: Instant::now(),
        };
        loop {
            let mut wait = backoff;
            match self.announce_tiers(&mut client, &mut tiers, event, key, tracker_id.as_deref()) {
                Ok((url, reply)) => {
                    last_answered = Some(url);
                    if let Some(w) = &reply.warning {
                        let _ = out.send(Input::TrackerNotice(format!(
                            "tracker warning: {}",
                            escape(w)
                        )));
                    }
                    if reply.tracker_id.is_some() {
                        tracker_id = reply.tracker_id.clone();
                    }
                    sched = Schedule {
                        interval: self.interval_override.unwrap_or(reply.interval),
                        // An explicit --announce-interval is the user's call, as in aria2.
                        min_interval: match self.interval_override {
                            Some(_) => Duration::ZERO,
                            None => reply.min_interval.unwrap_or(Duration::ZERO),
                        },
                        last: Instant::now(),
                    };
                    wait = sched.interval.max(sched.min_interval);
                    let _ = out.send(Input::Peers(reply.peers));
                    backoff = Duration::from_secs(15);
                    event = AnnounceEvent::Periodic;
                }
                Err(errors) => {
                    for e in errors {
                        let _ = out.send(Input::TrackerNotice(e));
                    }
                    if last_answered.is_none() {
                        let _ = out.send(Input::TrackersFailed);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            // Wait for the next announce, a command, or the end.
            let mut deadline = Instant::now() + wait;
            loop {
                match commands.recv_deadline(deadline) {
                    Ok(TrackerCommand::Completed) => {
                        event = AnnounceEvent::Completed;
                        break;
                    }
                    Ok(TrackerCommand::NeedPeers) => {
                        let soon = sched.last + SHORT_OF_PEERS_INTERVAL.max(sched.min_interval);
                        deadline = deadline.min(soon);
                    }
                    Ok(TrackerCommand::Stop) | Err(RecvTimeoutError::Disconnected) => {
                        if let Some(url) = &last_answered {
                            client.set_quick(true);
                            let p = self.params(AnnounceEvent::Stopped, key, tracker_id.as_deref());
                            let _ = client.announce(url, &p);
                        }
                        return;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
        }
    }

    fn params<'a>(
        &'a self,
        event: AnnounceEvent,
        key: u32,
        tracker_id: Option<&'a [u8]>,
    ) -> Announce<'a> {
        Announce {
            info_hash: &self.info_hash,
            peer_id: &self.peer_id,
            port: self.port,
            uploaded: self.stats.uploaded.load(Ordering::Relaxed),
            downloaded: self.stats.downloaded.load(Ordering::Relaxed),
            left: self.stats.left.load(Ordering::Relaxed),
            event,
            key,
            numwant: 80,
            tracker_id,
        }
    }

    /// Tries trackers in tier order until one answers; returns every error otherwise.
    fn announce_tiers(
        &self,
        client: &mut Client,
        tiers: &mut Tiers,
        event: AnnounceEvent,
        key: u32,
        tracker_id: Option<&[u8]>,
    ) -> Result<(String, Reply), Vec<String>> {
        let mut errors = Vec::new();
        for at in tiers.order() {
            let url = tiers.url(at).to_string();
            match client.announce(&url, &self.params(event, key, tracker_id)) {
                Ok(reply) => {
                    tiers.promote(at);
                    return Ok((url, reply));
                }
                Err(e) => errors.push(format!("tracker {}: {e}", escape(&url))),
            }
        }
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers(spec: &[&[&str]]) -> Vec<Vec<String>> {
        spec.iter()
            .map(|t| t.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn tiers_keep_order_shuffle_within_and_promote() {
        let spec = tiers(&[&["http://a/", "http://b/", "ftp://x/"], &[], &["udp://c:1"]]);
        let mut t = Tiers::new(&spec, &mut Rng::new(3));
        let order = t.order();
        assert_eq!(
            order.len(),
            3,
            "unsupported schemes and empty tiers dropped"
        );
        assert_eq!(t.url(order[2]), "udp://c:1", "tiers stay in order");
        let second = order[1];
        let url = t.url(second).to_string();
        t.promote(second);
        assert_eq!(t.first(), Some(url.as_str()));
        assert!(Tiers::new(&tiers(&[&["wss://x"]]), &mut Rng::new(1)).is_empty());
    }

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
}
