//! A tiny raw KRPC (BEP 5) client over UDP for the hostile DHT tests: queries built with the
//! tests' own bencode writer (or any bytes at all), replies read with the tests' own bencode
//! reader, every receive bounded by a deadline. Never bitfetch's code.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use super::bencode::{B, Value, bytes, dict, int};

/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// A compact node: 20-byte id, 4-byte IPv4 address, 2-byte port.
pub const COMPACT_NODE: usize = 26;

/// A 20-byte node id or info hash.
pub type Id = [u8; 20];

/// A UDP socket on a loopback address of its own.
pub struct Krpc {
    socket: UdpSocket,
    pub id: Id,
    next_t: u16,
}

impl Krpc {
    /// Binds `ip`:0 with node id `id`.
    pub fn bind(ip: Ipv4Addr, id: Id) -> Krpc {
        let socket =
            UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind a UDP socket on {ip}: {e}"));
        Krpc {
            socket,
            id,
            next_t: 1,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local_addr")
    }

    /// The socket itself (to clone it for a reader thread).
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// A fresh transaction id (two bytes).
    pub fn transaction(&mut self) -> Vec<u8> {
        let t = self.next_t;
        self.next_t = self.next_t.wrapping_add(1);
        t.to_be_bytes().to_vec()
    }

    /// Sends raw bytes; an error (say, a datagram too large) is returned, not a panic.
    pub fn send(&self, to: SocketAddr, datagram: &[u8]) -> std::io::Result<usize> {
        self.socket.send_to(datagram, to)
    }

    /// The next datagram within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.socket
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) => return Some((buf[..n].to_vec(), from)),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                // An ICMP port-unreachable from an earlier send shows up here: not a reply.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                Err(e) => panic!("recv_from on {}: {e}", self.addr()),
            }
        }
    }

    /// Every datagram that arrives until `quiet` passes without one (at most `max` in all).
    pub fn drain(&self, quiet: Duration, max: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
        let end = Instant::now() + max;
        let mut got = Vec::new();
        while Instant::now() < end {
            match self.recv(quiet.min(end - Instant::now())) {
                Some(d) => got.push(d),
                None => break,
            }
        }
        got
    }

    /// Sends `query` to `to` and waits up to `timeout` for the reply carrying its `t`
    /// (other datagrams are skipped).
    pub fn ask(&self, to: SocketAddr, query: &Query, timeout: Duration) -> Option<Reply> {
        self.send(to, &query.encode())
            .unwrap_or_else(|e| panic!("send a {} to {to}: {e}", query.q));
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (datagram, from) = self.recv(left)?;
            if from != to {
                continue;
            }
            if let Some(reply) = Reply::parse(&datagram)
                && reply.t() == Some(query.t.as_slice())
            {
                return Some(reply);
            }
        }
    }

    /// `ping`.
    pub fn ping(&mut self) -> Query {
        let t = self.transaction();
        Query::new(t, "ping", vec![("id", bytes(self.id))])
    }

    /// `find_node` for `target`.
    pub fn find_node(&mut self, target: &Id) -> Query {
        let t = self.transaction();
        Query::new(
            t,
            "find_node",
            vec![("id", bytes(self.id)), ("target", bytes(target))],
        )
    }

    /// `get_peers` for `info_hash`.
    pub fn get_peers(&mut self, info_hash: &Id) -> Query {
        let t = self.transaction();
        Query::new(
            t,
            "get_peers",
            vec![("id", bytes(self.id)), ("info_hash", bytes(info_hash))],
        )
    }

    /// `announce_peer` for `info_hash` on `port` with `token`.
    pub fn announce_peer(&mut self, info_hash: &Id, port: u16, token: &[u8]) -> Query {
        let t = self.transaction();
        Query::new(
            t,
            "announce_peer",
            vec![
                ("id", bytes(self.id)),
                ("info_hash", bytes(info_hash)),
                ("port", int(i64::from(port))),
                ("token", bytes(token)),
            ],
        )
    }
}

/// A query: transaction id, method and arguments, each of which a test may replace.
#[derive(Debug, Clone)]
pub struct Query {
    pub t: Vec<u8>,
    pub q: String,
    pub args: Vec<(String, B)>,
}

impl Query {
    pub fn new(t: Vec<u8>, q: &str, args: Vec<(&str, B)>) -> Query {
        Query {
            t,
            q: q.to_owned(),
            args: args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// The argument `key` replaced by `value` (added if absent).
    pub fn with_arg(mut self, key: &str, value: B) -> Query {
        match self.args.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.args.push((key.to_owned(), value)),
        }
        self
    }

    /// The whole message as a dictionary, each top-level key replaceable with
    /// [`Query::encode_with`].
    pub fn message(&self) -> Vec<(&'static str, B)> {
        vec![
            (
                "a",
                dict(self.args.iter().map(|(k, v)| (k.as_bytes(), v.clone()))),
            ),
            ("q", bytes(&self.q)),
            ("t", bytes(&self.t)),
            ("y", bytes("q")),
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        dict(self.message()).encode()
    }

    /// The message with top-level `key` replaced by `value`.
    pub fn encode_with(&self, key: &str, value: B) -> Vec<u8> {
        let mut message = self.message();
        for (k, v) in &mut message {
            if *k == key {
                *v = value.clone();
            }
        }
        dict(message).encode()
    }
}

/// A decoded reply (`y` = `r` or `e`).
#[derive(Debug, Clone)]
pub struct Reply {
    pub value: Value,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn parse(datagram: &[u8]) -> Option<Reply> {
        Some(Reply {
            value: Value::decode(datagram)?,
            raw: datagram.to_vec(),
        })
    }

    pub fn t(&self) -> Option<&[u8]> {
        self.value.get("t")?.bytes()
    }

    pub fn y(&self) -> Option<&[u8]> {
        self.value.get("y")?.bytes()
    }

    pub fn is_response(&self) -> bool {
        self.y() == Some(b"r")
    }

    pub fn is_error(&self) -> bool {
        self.y() == Some(b"e")
    }

    /// The error code of an `e` reply.
    pub fn error_code(&self) -> Option<i64> {
        self.value.get("e")?.list()?.first()?.int()
    }

    /// A key of the `r` dictionary.
    pub fn r(&self, key: &str) -> Option<&Value> {
        self.value.get("r")?.get(key)
    }

    pub fn id(&self) -> Option<&[u8]> {
        self.r("id")?.bytes()
    }

    pub fn token(&self) -> Option<&[u8]> {
        self.r("token")?.bytes()
    }

    /// The compact `nodes` of the reply (id, address); `None` if absent or not a whole
    /// number of entries.
    pub fn nodes(&self) -> Option<Vec<(Id, SocketAddrV4)>> {
        let raw = self.r("nodes")?.bytes()?;
        if !raw.len().is_multiple_of(COMPACT_NODE) {
            return None;
        }
        Some(
            raw.chunks_exact(COMPACT_NODE)
                .map(|c| {
                    let id: Id = c[..20].try_into().expect("20 bytes");
                    (id, compact_addr(&c[20..]))
                })
                .collect(),
        )
    }

    /// The compact peers in `values`.
    pub fn values(&self) -> Vec<SocketAddrV4> {
        self.r("values")
            .and_then(Value::list)
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.bytes().filter(|b| b.len() == 6).map(compact_addr))
            .collect()
    }

    pub fn show(&self) -> String {
        super::show_bytes(&self.raw)
    }
}

fn compact_addr(b: &[u8]) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::new(b[0], b[1], b[2], b[3]),
        u16::from_be_bytes([b[4], b[5]]),
    )
}

/// 6 bytes: IPv4 address and port.
pub fn compact_peer(addr: SocketAddrV4) -> Vec<u8> {
    let mut out = addr.ip().octets().to_vec();
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// 26 bytes: id, IPv4 address, port.
pub fn compact_node(id: &Id, addr: SocketAddrV4) -> Vec<u8> {
    let mut out = id.to_vec();
    out.extend_from_slice(&compact_peer(addr));
    out
}

/// A response to the query `t` from node `id`, with extra `r` keys.
pub fn response(t: &[u8], id: &Id, extra: Vec<(&str, B)>) -> Vec<u8> {
    let mut r: Vec<(&str, B)> = vec![("id", bytes(id))];
    r.extend(extra);
    dict(vec![("r", dict(r)), ("t", bytes(t)), ("y", bytes("r"))]).encode()
}

/// A node id from a label (the same label, the same id).
pub fn id_of(label: &str) -> Id {
    use sha1::{Digest, Sha1};
    Sha1::digest(label.as_bytes()).into()
}
