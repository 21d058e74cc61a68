//! UDP trackers (BEP 15): connect, announce and scrape.
//!
//! Packets are built and read by plain functions on byte slices; [`UdpClient`] adds the
//! socket, the retry schedule (15·2ⁿ seconds), transaction-id checks and connection-id reuse
//! (valid for one minute).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::http::compact_peers;
use super::{Announce, AnnounceEvent, Error, Reply, ScrapeInfo, clamp_interval, finish_peers};
use crate::rng::Rng;

const PROTOCOL_ID: u64 = 0x417_2710_1980;
const ACTION_CONNECT: u32 = 0;
const ACTION_ANNOUNCE: u32 = 1;
const ACTION_SCRAPE: u32 = 2;
const ACTION_ERROR: u32 = 3;
/// BEP 15: a connection id may be used for one minute.
const CONNECTION_ID_LIFETIME: Duration = Duration::from_secs(60);
const MAX_PACKET: usize = 64 * 1024;

/// Host and port of a `udp://host:port/...` URL.
pub fn host_port(url: &str) -> Result<(String, u16), Error> {
    let bad = || Error::BadUrl(url.to_string());
    let rest = url.strip_prefix("udp://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?']).next().ok_or_else(bad)?;
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
        (h, p)
    } else {
        authority.rsplit_once(':').ok_or_else(bad)?
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

pub fn connect_request(tid: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&PROTOCOL_ID.to_be_bytes());
    b[8..12].copy_from_slice(&ACTION_CONNECT.to_be_bytes());
    b[12..].copy_from_slice(&tid.to_be_bytes());
    b
}

fn event_code(e: AnnounceEvent) -> u32 {
    match e {
        AnnounceEvent::Periodic => 0,
        AnnounceEvent::Completed => 1,
        AnnounceEvent::Started => 2,
        AnnounceEvent::Stopped => 3,
    }
}

pub fn announce_request(conn: u64, tid: u32, p: &Announce) -> [u8; 98] {
    let mut b = [0u8; 98];
    b[..8].copy_from_slice(&conn.to_be_bytes());
    b[8..12].copy_from_slice(&ACTION_ANNOUNCE.to_be_bytes());
    b[12..16].copy_from_slice(&tid.to_be_bytes());
    b[16..36].copy_from_slice(p.info_hash);
    b[36..56].copy_from_slice(p.peer_id);
    b[56..64].copy_from_slice(&p.downloaded.to_be_bytes());
    b[64..72].copy_from_slice(&p.left.to_be_bytes());
    b[72..80].copy_from_slice(&p.uploaded.to_be_bytes());
    b[80..84].copy_from_slice(&event_code(p.event).to_be_bytes());
    // 84..88: IP address 0 = the sender's.
    b[88..92].copy_from_slice(&p.key.to_be_bytes());
    b[92..96].copy_from_slice(&(p.numwant as i32).to_be_bytes());
    b[96..98].copy_from_slice(&p.port.to_be_bytes());
    b
}

pub fn scrape_request(conn: u64, tid: u32, info_hash: &[u8; 20]) -> [u8; 36] {
    let mut b = [0u8; 36];
    b[..8].copy_from_slice(&conn.to_be_bytes());
    b[8..12].copy_from_slice(&ACTION_SCRAPE.to_be_bytes());
    b[12..16].copy_from_slice(&tid.to_be_bytes());
    b[16..].copy_from_slice(info_hash);
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks a reply's header: `Ok(None)` for a packet that is not ours (another transaction),
/// an error for a tracker error message, or the body after the 8-byte header.
pub fn check_reply(packet: &[u8], action: u32, tid: u32) -> Result<Option<&[u8]>, Error> {
    if packet.len() < 8 || u32_at(packet, 4) != tid {
        return Ok(None);
    }
    match u32_at(packet, 0) {
        ACTION_ERROR => Err(Error::Failure(
            String::from_utf8_lossy(&packet[8..]).into_owned(),
        )),
        a if a == action => Ok(Some(&packet[8..])),
        _ => Ok(None),
    }
}

pub fn parse_connect(body: &[u8]) -> Result<u64, Error> {
    let id: [u8; 8] = body
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::BadReply("short connect reply".into()))?;
    Ok(u64::from_be_bytes(id))
}

/// An announce reply body; the tracker's address family decides the peer format.
pub fn parse_announce(body: &[u8], ipv6: bool) -> Result<Reply, Error> {
    if body.len() < 12 {
        return Err(Error::BadReply("short announce reply".into()));
    }
    let peers = compact_peers(&body[12..], ipv6)?;
    Ok(Reply {
        peers: finish_peers(peers),
        interval: clamp_interval(i64::from(u32_at(body, 0))),
        min_interval: None,
        warning: None,
        tracker_id: None,
        leechers: Some(u64::from(u32_at(body, 4))),
        seeders: Some(u64::from(u32_at(body, 8))),
    })
}

pub fn parse_scrape(body: &[u8]) -> Result<ScrapeInfo, Error> {
    if body.len() < 12 {
        return Err(Error::BadReply("short scrape reply".into()));
    }
    Ok(ScrapeInfo {
        seeders: u64::from(u32_at(body, 0)),
        completed: u64::from(u32_at(body, 4)),
        leechers: u64::from(u32_at(body, 8)),
    })
}

/// How often a wait for a reply looks whether the request was abandoned.
const CANCEL_CHECK: Duration = Duration::from_millis(250);

/// Talks to UDP trackers, remembering connection ids. Shared by the request threads: each
/// request has its own socket and transaction ids; the connection ids are common.
pub struct UdpClient {
    bind: Option<IpAddr>,
    /// First wait; doubles on every retry (BEP 15: 15 s).
    base_timeout: Duration,
    retries: u32,
    connections: Mutex<HashMap<SocketAddr, (u64, Instant)>>,
}

impl UdpClient {
    pub fn new(bind: Option<IpAddr>, base_timeout: Duration, retries: u32) -> UdpClient {
        UdpClient {
            bind,
            base_timeout,
            retries,
            connections: Mutex::new(HashMap::new()),
        }
    }

    fn socket(&self, url: &str) -> Result<(UdpSocket, SocketAddr), Error> {
        let (host, port) = host_port(url)?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| Error::Dns(format!("{host}: {}", crate::error::reason(&e))))?
            .find(|a| self.bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
            .ok_or_else(|| Error::Dns(format!("{host}: no usable address")))?;
        let local = match (self.bind, addr) {
            (Some(ip), _) => SocketAddr::new(ip, 0),
            (None, SocketAddr::V4(_)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            (None, SocketAddr::V6(_)) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
        };
        let socket = UdpSocket::bind(local).map_err(Error::io)?;
        // A connected socket hears ICMP "port unreachable" as an error straight away.
        socket.connect(addr).map_err(Error::io)?;
        Ok((socket, addr))
    }

    /// Sends `request` and waits for the matching reply, retrying on the BEP 15 schedule
    /// (`retries` times, each wait twice the one before). Gives up early when `cancel` is set.
    fn transact(
        &self,
        socket: &UdpSocket,
        make: &dyn Fn(u32) -> Vec<u8>,
        action: u32,
        cancel: &AtomicBool,
    ) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut rng = Rng::from_os();
        for n in 0..=self.retries {
            let tid = rng.next_u64() as u32;
            socket.send(&make(tid)).map_err(Error::io)?;
            let deadline = Instant::now() + self.base_timeout * (1 << n.min(8));
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                socket
                    .set_read_timeout(Some(left.min(CANCEL_CHECK)))
                    .map_err(Error::io)?;
                match socket.recv(&mut buf) {
                    Ok(len) => {
                        if let Some(body) = check_reply(&buf[..len], action, tid)? {
                            return Ok(body.to_vec());
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(Error::io(e)),
                }
            }
        }
        Err(Error::Timeout)
    }

    fn connection_id(
        &self,
        socket: &UdpSocket,
        addr: SocketAddr,
        cancel: &AtomicBool,
    ) -> Result<u64, Error> {
        if let Some((id, at)) = self.connections.lock().get(&addr)
            && at.elapsed() < CONNECTION_ID_LIFETIME
        {
            return Ok(*id);
        }
        let body = self.transact(
            socket,
            &|tid| connect_request(tid).to_vec(),
            ACTION_CONNECT,
            cancel,
        )?;
        let id = parse_connect(&body)?;
        self.connections.lock().insert(addr, (id, Instant::now()));
        Ok(id)
    }

    pub fn announce(&self, url: &str, p: &Announce, cancel: &AtomicBool) -> Result<Reply, Error> {
        let (socket, addr) = self.socket(url)?;
        let conn = self.connection_id(&socket, addr, cancel)?;
        let body = self
            .transact(
                &socket,
                &|tid| announce_request(conn, tid, p).to_vec(),
                ACTION_ANNOUNCE,
                cancel,
            )
            .inspect_err(|_| {
                self.connections.lock().remove(&addr);
            })?;
        parse_announce(&body, addr.is_ipv6())
    }

    pub fn scrape(&self, url: &str, info_hash: &[u8; 20]) -> Result<ScrapeInfo, Error> {
        let cancel = AtomicBool::new(false);
        let (socket, addr) = self.socket(url)?;
        let conn = self.connection_id(&socket, addr, &cancel)?;
        let body = self.transact(
            &socket,
            &|tid| scrape_request(conn, tid, info_hash).to_vec(),
            ACTION_SCRAPE,
            &cancel,
        )?;
        parse_scrape(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("udp://t.example:80/announce").unwrap(),
            ("t.example".into(), 80)
        );
        assert_eq!(host_port("udp://[::1]:6969").unwrap(), ("::1".into(), 6969));
        assert!(host_port("udp://t.example/announce").is_err());
        assert!(host_port("udp://t:0").is_err());
        assert!(host_port("http://t:1").is_err());
    }

    #[test]
    fn replies_are_matched_by_transaction_and_action() {
        let mut p = vec![0, 0, 0, 0, 0, 0, 0, 9];
        p.extend(7u64.to_be_bytes());
        assert_eq!(
            check_reply(&p, ACTION_CONNECT, 8).unwrap(),
            None,
            "other tid"
        );
        assert_eq!(
            parse_connect(check_reply(&p, ACTION_CONNECT, 9).unwrap().unwrap()).unwrap(),
            7
        );
        assert_eq!(
            check_reply(&p, ACTION_ANNOUNCE, 9).unwrap(),
            None,
            "other action"
        );
        let mut e = vec![0, 0, 0, 3, 0, 0, 0, 9];
        e.extend(b"go away");
        assert!(
            matches!(check_reply(&e, ACTION_CONNECT, 9), Err(Error::Failure(m)) if m == "go away")
        );
        assert_eq!(check_reply(&[1, 2, 3], 0, 0).unwrap(), None);
    }

    #[test]
    fn announce_bodies() {
        let mut b = Vec::new();
        for v in [1800u32, 3, 4] {
            b.extend(v.to_be_bytes());
        }
        b.extend([127, 0, 0, 1, 0x1a, 0xe1]);
        let r = parse_announce(&b, false).unwrap();
        assert_eq!(r.peers, vec!["127.0.0.1:6881".parse().unwrap()]);
        assert_eq!((r.leechers, r.seeders), (Some(3), Some(4)));
        assert!(
            parse_announce(&b, true).is_err(),
            "6 bytes is not an IPv6 peer"
        );
        assert!(parse_announce(&b[..8], false).is_err());
        assert!(parse_scrape(&[0; 11]).is_err());
    }

    /// A scripted UDP tracker on loopback: drops the first connect (to exercise the retry),
    /// then answers connect and announce.
    #[test]
    fn client_retries_and_announces() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let url = format!("udp://{}/announce", server.local_addr().unwrap());
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 200];
            let mut seen = Vec::new();
            for round in 0..3 {
                let (len, from) = server.recv_from(&mut buf).unwrap();
                let action = u32_at(&buf, 8);
                let tid = u32_at(&buf, 12);
                seen.push((action, len));
                if round == 0 {
                    continue; // lost packet
                }
                let mut reply = Vec::new();
                reply.extend(action.to_be_bytes());
                reply.extend(tid.to_be_bytes());
                if action == ACTION_CONNECT {
                    reply.extend(42u64.to_be_bytes());
                } else {
                    assert_eq!(u64::from_be_bytes(buf[..8].try_into().unwrap()), 42);
                    for v in [60u32, 1, 2] {
                        reply.extend(v.to_be_bytes());
                    }
                    reply.extend([127, 0, 0, 2, 0, 80]);
                }
                server.send_to(&reply, from).unwrap();
            }
            seen
        });
        let client = UdpClient::new(None, Duration::from_millis(200), 3);
        let p = Announce {
            info_hash: &[1; 20],
            peer_id: b"-BF0100-abcdefghijkl",
            port: 1,
            uploaded: 0,
            downloaded: 0,
            left: 10,
            event: AnnounceEvent::Started,
            key: 5,
            numwant: 50,
            tracker_id: None,
        };
        let reply = client.announce(&url, &p, &AtomicBool::new(false)).unwrap();
        assert_eq!(reply.peers, vec!["127.0.0.2:80".parse().unwrap()]);
        let seen = handle.join().unwrap();
        assert_eq!(seen, vec![(0, 16), (0, 16), (1, 98)]);
    }

    #[test]
    fn closed_port_fails_fast() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let url = format!("udp://{}", s.local_addr().unwrap());
        drop(s);
        let client = UdpClient::new(None, Duration::from_secs(5), 0);
        let start = Instant::now();
        assert!(client.scrape(&url, &[0; 20]).is_err());
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
