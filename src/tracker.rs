//! HTTP(S) tracker announces, and the tracker thread that feeds peers to the session.
//!
//! The request and reply handling is split from the network: [`announce_url`] builds the query
//! and [`parse_reply`] reads a reply body, both testable without a socket. Replies are hostile
//! input: size-capped, pre-scanned, every field type-checked, peer lists capped.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bt_bencode::Value;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::bencode::{self, Limits};
use crate::messages::Input;
use crate::path_safety::escape;

pub const MAX_BODY: u64 = 2 << 20;
pub const MAX_PEERS: usize = 2000;
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3 * 3600);
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1800);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

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
    UnsupportedScheme(String),
    Http(String),
    Status(u16),
    Failure(String),
    BadReply(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnsupportedScheme(u) => write!(f, "unsupported tracker URL {}", escape(u)),
            Error::Http(e) => write!(f, "{e}"),
            Error::Status(s) => write!(f, "HTTP status {s}"),
            Error::Failure(m) => write!(f, "tracker says: {}", escape(m)),
            Error::BadReply(m) => write!(f, "bad tracker reply: {m}"),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub peers: Vec<SocketAddr>,
    pub interval: Duration,
    pub min_interval: Option<Duration>,
    pub warning: Option<String>,
    pub tracker_id: Option<Vec<u8>>,
    pub complete: Option<u64>,
    pub incomplete: Option<u64>,
}

/// Percent-encodes raw bytes for a query string (RFC 3986 unreserved characters kept).
pub fn url_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

pub struct AnnounceParams<'a> {
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

/// The announce URL with our query appended; a query already in the URL is kept.
pub fn announce_url(base: &str, p: &AnnounceParams) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url = format!(
        "{base}{sep}info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact=1&numwant={}&key={:08x}",
        url_encode(p.info_hash),
        url_encode(p.peer_id),
        p.port,
        p.uploaded,
        p.downloaded,
        p.left,
        p.numwant,
        p.key,
    );
    if let Some(e) = p.event.as_query() {
        url.push_str("&event=");
        url.push_str(e);
    }
    if let Some(id) = p.tracker_id {
        url.push_str("&trackerid=");
        url.push_str(&url_encode(id));
    }
    url
}

fn clamp_interval(secs: i64) -> Duration {
    Duration::from_secs(secs.max(0) as u64).clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Reads an announce reply body.
pub fn parse_reply(body: &[u8]) -> Result<Reply, Error> {
    let value = bencode::decode(body, Limits::SMALL).map_err(|e| {
        Error::BadReply(if body.first() == Some(&b'<') {
            "HTML instead of bencode".to_string()
        } else {
            e.to_string()
        })
    })?;
    let Value::Dict(d) = value else {
        return Err(Error::BadReply("not a dictionary".into()));
    };
    if let Some(reason) = bencode::get_str(&d, "failure reason") {
        return Err(Error::Failure(reason));
    }
    let mut peers = Vec::new();
    match bencode::get(&d, "peers") {
        Some(Value::ByteStr(b)) => {
            if b.len() % 6 != 0 {
                return Err(Error::BadReply(format!(
                    "compact peers of {} bytes, not a multiple of 6",
                    b.len()
                )));
            }
            peers.extend(b.chunks_exact(6).map(|c| {
                SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
                    u16::from_be_bytes([c[4], c[5]]),
                )
            }));
        }
        Some(Value::List(list)) => peers.extend(list.iter().filter_map(dict_peer)),
        Some(_) => return Err(Error::BadReply("`peers` has the wrong type".into())),
        None => {}
    }
    if let Some(b) = bencode::get_bytes(&d, "peers6") {
        if b.len() % 18 != 0 {
            return Err(Error::BadReply(format!(
                "peers6 of {} bytes, not a multiple of 18",
                b.len()
            )));
        }
        peers.extend(b.chunks_exact(18).map(|c| {
            let ip: [u8; 16] = c[..16].try_into().expect("18-byte chunk");
            SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([c[16], c[17]]),
            )
        }));
    }
    let mut seen = HashSet::new();
    peers.retain(|p| p.port() != 0 && !p.ip().is_unspecified() && seen.insert(*p));
    peers.truncate(MAX_PEERS);
    let count = |k| bencode::get_int(&d, k).and_then(|v| u64::try_from(v).ok());
    Ok(Reply {
        peers,
        interval: bencode::get_int(&d, "interval").map_or(DEFAULT_INTERVAL, clamp_interval),
        min_interval: bencode::get_int(&d, "min interval").map(clamp_interval),
        warning: bencode::get_str(&d, "warning message"),
        tracker_id: bencode::get_bytes(&d, "tracker id").map(<[u8]>::to_vec),
        complete: count("complete"),
        incomplete: count("incomplete"),
    })
}

fn dict_peer(v: &Value) -> Option<SocketAddr> {
    let Value::Dict(p) = v else { return None };
    let ip = bencode::get_str(p, "ip")?;
    let port = u16::try_from(bencode::get_int(p, "port")?).ok()?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port))
}

/// One HTTP(S) announce.
pub fn announce_http(agent: &ureq::Agent, url: &str) -> Result<Reply, Error> {
    let mut resp = agent
        .get(url)
        .call()
        .map_err(|e| Error::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| Error::Http(e.to_string()))?;
    if status != 200 {
        // A failure reason in a non-200 body is still the most useful message.
        return match parse_reply(&body) {
            Err(Error::Failure(m)) => Err(Error::Failure(m)),
            _ => Err(Error::Status(status)),
        };
    }
    parse_reply(&body)
}

/// Messages from the session to the tracker thread.
#[derive(Debug)]
pub enum TrackerCommand {
    Completed,
    /// Announce `stopped` (bounded wait) and end.
    Stop,
}

pub struct Tracker {
    pub tiers: Vec<Vec<String>>,
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
    pub port: u16,
    pub stats: Arc<Stats>,
    pub interval_override: Option<Duration>,
    pub bind: Option<std::net::IpAddr>,
}

impl Tracker {
    /// The tracker thread's body: announce `started`, re-announce on the interval, `completed`
    /// when told, `stopped` at the end.
    pub fn run(self, commands: Receiver<TrackerCommand>, out: Sender<Input>) {
        let urls: Vec<String> = self
            .tiers
            .iter()
            .flatten()
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .cloned()
            .collect();
        if urls.is_empty() {
            return;
        }
        let agent = crate::http::agent(REQUEST_TIMEOUT, self.bind);
        let key = crate::rng::Rng::from_os().next_u64() as u32;
        let mut tracker_id: Option<Vec<u8>> = None;
        let mut event = AnnounceEvent::Started;
        let mut backoff = Duration::from_secs(15);
        loop {
            let mut next = backoff;
            let mut ok = false;
            for url in &urls {
                match self.announce(&agent, url, event, key, tracker_id.as_deref()) {
                    Ok(reply) => {
                        if let Some(w) = &reply.warning {
                            let _ = out.send(Input::TrackerNotice(format!(
                                "tracker warning: {}",
                                escape(w)
                            )));
                        }
                        if reply.tracker_id.is_some() {
                            tracker_id = reply.tracker_id.clone();
                        }
                        next = self.interval_override.unwrap_or_else(|| {
                            reply.interval.max(reply.min_interval.unwrap_or_default())
                        });
                        let _ = out.send(Input::Peers(reply.peers));
                        ok = true;
                        break;
                    }
                    Err(e) => {
                        let _ = out.send(Input::TrackerNotice(format!(
                            "tracker {}: {e}",
                            escape(url)
                        )));
                    }
                }
            }
            if ok {
                backoff = Duration::from_secs(15);
                event = AnnounceEvent::Periodic;
            } else {
                backoff = (backoff * 2).min(Duration::from_secs(900));
            }
            let deadline = Instant::now() + next;
            match commands.recv_deadline(deadline) {
                Ok(TrackerCommand::Completed) => event = AnnounceEvent::Completed,
                Ok(TrackerCommand::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        let stop_agent = crate::http::agent(STOP_TIMEOUT, self.bind);
        if let Some(url) = urls.first() {
            let _ = self.announce(
                &stop_agent,
                url,
                AnnounceEvent::Stopped,
                key,
                tracker_id.as_deref(),
            );
        }
    }

    fn announce(
        &self,
        agent: &ureq::Agent,
        base: &str,
        event: AnnounceEvent,
        key: u32,
        tracker_id: Option<&[u8]>,
    ) -> Result<Reply, Error> {
        let params = AnnounceParams {
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
        };
        announce_http(agent, &announce_url(base, &params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(event: AnnounceEvent) -> AnnounceParams<'static> {
        AnnounceParams {
            info_hash: &[0x12; 20],
            peer_id: b"-BF0100-abcdefghijkl",
            port: 6881,
            uploaded: 1,
            downloaded: 2,
            left: 3,
            event,
            key: 0xabcd,
            numwant: 50,
            tracker_id: None,
        }
    }

    #[test]
    fn query_encodes_raw_bytes_and_keeps_existing_query() {
        let url = announce_url(
            "http://t/announce?passkey=x",
            &params(AnnounceEvent::Started),
        );
        assert!(url.starts_with("http://t/announce?passkey=x&info_hash=%12%12"));
        assert!(url.contains("&peer_id=-BF0100-abcdefghijkl&port=6881"));
        assert!(url.contains("&left=3&compact=1"));
        assert!(url.ends_with("&event=started"));
        let url = announce_url("http://t/a", &params(AnnounceEvent::Periodic));
        assert!(url.starts_with("http://t/a?info_hash="));
        assert!(!url.contains("event="));
        assert_eq!(url_encode(b"a b\xff~"), "a%20b%FF~");
    }

    #[test]
    fn compact_dict_and_ipv6_peers() {
        let body = b"d8:intervali900e5:peers12:\x7f\x00\x00\x01\x1a\xe1\x7f\x00\x00\x02\x00\x006:peers618:\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x1a\xe2e";
        let r = parse_reply(body).unwrap();
        assert_eq!(
            r.peers,
            vec![
                "127.0.0.1:6881".parse().unwrap(),
                "[::1]:6882".parse().unwrap()
            ],
            "port 0 dropped"
        );
        assert_eq!(r.interval, Duration::from_secs(900));
        let body =
            b"d5:peersld2:ip9:127.0.0.14:porti80eed2:ip3:::14:porti81eed2:ip5:bogus4:porti1eeee";
        let r = parse_reply(body).unwrap();
        assert_eq!(
            r.peers,
            vec!["127.0.0.1:80".parse().unwrap(), "[::1]:81".parse().unwrap()]
        );
    }

    #[test]
    fn failures_and_malformed_replies_are_typed() {
        assert!(matches!(
            parse_reply(b"d14:failure reason6:deniede"),
            Err(Error::Failure(m)) if m == "denied"
        ));
        assert!(matches!(parse_reply(b"<html>"), Err(Error::BadReply(m)) if m.contains("HTML")));
        assert!(matches!(
            parse_reply(b"d5:peers5:abcdee"),
            Err(Error::BadReply(_))
        ));
        assert!(matches!(
            parse_reply(b"d6:peers65:abcdee"),
            Err(Error::BadReply(_))
        ));
        assert!(matches!(parse_reply(b"li1ee"), Err(Error::BadReply(_))));
        assert!(matches!(
            parse_reply(b"d5:peersi1ee"),
            Err(Error::BadReply(_))
        ));
        assert!(parse_reply(b"d8:intervali-5e").is_err());
        let r = parse_reply(b"d8:intervali-5ee").unwrap();
        assert_eq!(r.interval, MIN_INTERVAL);
        let r = parse_reply(b"d8:intervali99999999999ee").unwrap();
        assert_eq!(r.interval, MAX_INTERVAL);
        assert!(parse_reply(b"de").unwrap().peers.is_empty());
    }
}
