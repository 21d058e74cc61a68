//! An independent peer wire codec for the tests (never bitfetch's own, so it checks it): the
//! handshake, frames and the messages the tests send, a decoder for what bitfetch sends, and
//! [`Wire`], a hand-driven connection with deadlines on every read.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";
pub const HANDSHAKE_LEN: usize = 68;
pub const NO_EXTENSIONS: [u8; 8] = [0; 8];
/// BEP 6 Fast extension: reserved byte 7, bit 0x04.
pub const FAST: [u8; 8] = [0, 0, 0, 0, 0, 0, 0, 0x04];
/// Frames longer than this are a protocol error (the largest block is 128 KiB).
pub const MAX_FRAME: usize = (1 << 20) + 64;

/// Message ids (BEP 3, BEP 6, BEP 10).
pub mod id {
    pub const CHOKE: u8 = 0;
    pub const UNCHOKE: u8 = 1;
    pub const INTERESTED: u8 = 2;
    pub const NOT_INTERESTED: u8 = 3;
    pub const HAVE: u8 = 4;
    pub const BITFIELD: u8 = 5;
    pub const REQUEST: u8 = 6;
    pub const PIECE: u8 = 7;
    pub const CANCEL: u8 = 8;
    pub const HAVE_ALL: u8 = 14;
    pub const HAVE_NONE: u8 = 15;
    pub const REJECT: u8 = 16;
    pub const ALLOWED_FAST: u8 = 17;
    pub const EXTENDED: u8 = 20;
}

/// Reserved bytes with or without the Fast bit.
pub fn reserved(fast: bool) -> [u8; 8] {
    if fast { FAST } else { NO_EXTENSIONS }
}

pub fn has_fast_bit(reserved: &[u8; 8]) -> bool {
    reserved[7] & 0x04 != 0
}

/// Sets the BEP 52 bit (the peer supports v2 torrents: the fourth most significant bit of
/// the last reserved byte).
pub fn with_v2_bit(mut reserved: [u8; 8]) -> [u8; 8] {
    reserved[7] |= 0x10;
    reserved
}

pub fn has_v2_bit(reserved: &[u8; 8]) -> bool {
    reserved[7] & 0x10 != 0
}

static NEXT_PEER_ID: AtomicU32 = AtomicU32::new(0);

/// A peer id unique within this test process: `-TAG-` (up to four characters) then the
/// process id and a counter.
pub fn peer_id(tag: &str) -> [u8; 20] {
    let n = NEXT_PEER_ID.fetch_add(1, Ordering::Relaxed);
    let mut id = *b"-FAKE-0000000000000-";
    for (i, b) in tag.bytes().take(4).enumerate() {
        id[1 + i] = b;
    }
    let digits = format!("{:08}{:05}", std::process::id() % 100_000_000, n % 100_000);
    id[6..19].copy_from_slice(digits.as_bytes());
    id
}

pub fn handshake(info_hash: &[u8; 20], peer_id: &[u8; 20], reserved: [u8; 8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HANDSHAKE_LEN);
    h.push(19);
    h.extend_from_slice(PROTOCOL);
    h.extend_from_slice(&reserved);
    h.extend_from_slice(info_hash);
    h.extend_from_slice(peer_id);
    h
}

/// The parts of a handshake: (reserved, info hash, peer id).
pub type HandshakeParts = ([u8; 8], [u8; 20], [u8; 20]);

/// The parts of a 68-byte handshake, or `None` if it is not a BitTorrent handshake.
pub fn parse_handshake(h: &[u8]) -> Option<HandshakeParts> {
    if h.len() != HANDSHAKE_LEN || h[0] != 19 || &h[1..20] != PROTOCOL {
        return None;
    }
    Some((
        h[20..28].try_into().ok()?,
        h[28..48].try_into().ok()?,
        h[48..68].try_into().ok()?,
    ))
}

/// A frame: 4-byte big-endian length, id, payload.
pub fn frame(id: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + payload.len());
    f.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    f.push(id);
    f.extend_from_slice(payload);
    f
}

/// Big-endian u32s, concatenated.
pub fn be(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

pub fn triple(a: u32, b: u32, c: u32) -> Vec<u8> {
    be(&[a, b, c])
}

pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub fn parse_triple(p: &[u8]) -> Option<(u32, u32, u32)> {
    (p.len() == 12).then(|| (be32(p, 0), be32(p, 4), be32(p, 8)))
}

pub fn msg_have(piece: u32) -> Vec<u8> {
    frame(id::HAVE, &be(&[piece]))
}

pub fn msg_request(piece: u32, offset: u32, len: u32) -> Vec<u8> {
    frame(id::REQUEST, &triple(piece, offset, len))
}

pub fn msg_reject(piece: u32, offset: u32, len: u32) -> Vec<u8> {
    frame(id::REJECT, &triple(piece, offset, len))
}

pub fn msg_piece(piece: u32, offset: u32, data: &[u8]) -> Vec<u8> {
    let mut payload = be(&[piece, offset]);
    payload.extend_from_slice(data);
    frame(id::PIECE, &payload)
}

/// A bitfield with the pieces in `has` set and the spare bits clear.
pub fn bitfield(has: &[bool]) -> Vec<u8> {
    let mut bits = vec![0u8; has.len().div_ceil(8)];
    for (i, _) in has.iter().enumerate().filter(|(_, h)| **h) {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    bits
}

/// A bitfield with the first `pieces` bits set and the spare bits clear.
pub fn full_bitfield(pieces: u32) -> Vec<u8> {
    bitfield(&vec![true; pieces as usize])
}

/// One frame bitfetch sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(Vec<u8>),
    Request { piece: u32, offset: u32, len: u32 },
    Piece { piece: u32, offset: u32, len: usize },
    Other { id: u8, len: usize },
}

impl Msg {
    /// Decodes a frame's body (id and payload; empty for a keep-alive).
    pub fn decode(body: &[u8]) -> Msg {
        let Some((&mid, rest)) = body.split_first() else {
            return Msg::KeepAlive;
        };
        match (mid, rest.len()) {
            (id::CHOKE, 0) => Msg::Choke,
            (id::UNCHOKE, 0) => Msg::Unchoke,
            (id::INTERESTED, 0) => Msg::Interested,
            (id::NOT_INTERESTED, 0) => Msg::NotInterested,
            (id::HAVE, 4) => Msg::Have(be32(rest, 0)),
            (id::BITFIELD, _) => Msg::Bitfield(rest.to_vec()),
            (id::REQUEST, 12) => Msg::Request {
                piece: be32(rest, 0),
                offset: be32(rest, 4),
                len: be32(rest, 8),
            },
            (id::PIECE, n) if n >= 8 => Msg::Piece {
                piece: be32(rest, 0),
                offset: be32(rest, 4),
                len: n - 8,
            },
            (mid, len) => Msg::Other { id: mid, len },
        }
    }
}

/// How a connection ended, from our side's point of view.
pub type Closed = String;

/// A hand-driven peer connection: every read has a deadline.
pub struct Wire {
    pub stream: TcpStream,
    rbuf: Vec<u8>,
    pub remote: SocketAddr,
}

impl Wire {
    pub fn new(stream: TcpStream) -> Wire {
        let remote = stream.peer_addr().expect("peer_addr");
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        Wire {
            stream,
            rbuf: Vec::new(),
            remote,
        }
    }

    /// Dials `to` from `from` (a loopback address of our own, so the other side sees it).
    pub fn dial(from: Ipv4Addr, to: SocketAddr) -> io::Result<Wire> {
        use socket2::{Domain, SockAddr, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(from), 0)))?;
        socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(10))?;
        Ok(Wire::new(socket.into()))
    }

    /// Writes `bytes`; a failure means the other side already closed the connection.
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), Closed> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("write failed: {e}"))
    }

    /// Reads more bytes until `deadline`: `Ok(false)` when none came, `Err` when closed.
    fn fill(&mut self, deadline: Instant) -> Result<bool, Closed> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let _ = self.stream.set_read_timeout(Some(
            left.clamp(Duration::from_millis(1), Duration::from_millis(200)),
        ));
        let mut chunk = [0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("end of stream".into()),
            Ok(n) => {
                self.rbuf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(format!("connection error: {e}")),
        }
    }

    /// Reads the other side's 68-byte handshake.
    pub fn read_handshake(&mut self, within: Duration) -> Result<Vec<u8>, Closed> {
        let deadline = Instant::now() + within;
        while self.rbuf.len() < HANDSHAKE_LEN {
            if Instant::now() >= deadline {
                return Err(format!("no handshake within {within:?}"));
            }
            self.fill(deadline)?;
        }
        let rest = self.rbuf.split_off(HANDSHAKE_LEN);
        Ok(std::mem::replace(&mut self.rbuf, rest))
    }

    /// Reads the other side's handshake: (reserved, info hash, peer id).
    pub fn handshake_parts(&mut self, within: Duration) -> Result<HandshakeParts, Closed> {
        let h = self.read_handshake(within)?;
        parse_handshake(&h).ok_or_else(|| "not a BitTorrent handshake".to_owned())
    }

    /// The body of the next frame (id and payload; empty for a keep-alive), `Ok(None)` if
    /// none came before `deadline`.
    pub fn next_body(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, Closed> {
        loop {
            if self.rbuf.len() >= 4 {
                let len = be32(&self.rbuf, 0) as usize;
                if len > MAX_FRAME {
                    return Err(format!("the other side sent a frame of {len} bytes"));
                }
                if self.rbuf.len() >= 4 + len {
                    return Ok(Some(self.rbuf.drain(..4 + len).skip(4).collect()));
                }
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.fill(deadline)?;
        }
    }

    /// The next frame, decoded; `Ok(None)` if none came before `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Result<Option<Msg>, Closed> {
        Ok(self.next_body(deadline)?.map(|body| Msg::decode(&body)))
    }

    /// The next message other than a keep-alive, as (id, payload); `Ok(None)` if none came
    /// before `deadline`.
    pub fn next_message(&mut self, deadline: Instant) -> Result<Option<(u8, Vec<u8>)>, Closed> {
        loop {
            match self.next_body(deadline)? {
                None => return Ok(None),
                Some(body) if body.is_empty() => {}
                Some(mut body) => {
                    let payload = body.split_off(1);
                    return Ok(Some((body[0], payload)));
                }
            }
        }
    }

    /// Reads until a frame matching `want` arrives (`Ok(None)` at the deadline).
    pub fn wait_for(
        &mut self,
        within: Duration,
        want: impl Fn(&Msg) -> bool,
    ) -> Result<Option<Msg>, Closed> {
        let deadline = Instant::now() + within;
        while let Some(m) = self.next(deadline)? {
            if want(&m) {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Reads and discards frames until `deadline`; `Err` if the connection closed first.
    pub fn idle_until(&mut self, deadline: Instant) -> Result<(), Closed> {
        while Instant::now() < deadline {
            self.next(deadline)?;
        }
        Ok(())
    }

    /// Reads and discards until the other side closes the connection; `Ok` says how long that
    /// took, `Err` that it was still open after `within`.
    pub fn expect_closed(&mut self, within: Duration) -> Result<String, String> {
        let start = Instant::now();
        let deadline = start + within;
        loop {
            match self.fill(deadline) {
                Err(how) => {
                    return Ok(format!(
                        "closed by bitfetch ({how}) after {:?}",
                        start.elapsed()
                    ));
                }
                Ok(_) => {
                    self.rbuf.clear();
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "bitfetch kept the connection open for {within:?} after the violation"
                        ));
                    }
                }
            }
        }
    }
}

// =============================================================================================
// BEP 10 (extension protocol) and BEP 9 (ut_metadata)
// =============================================================================================

/// BEP 10: the extension protocol is reserved byte 5, bit 0x10.
pub fn with_extension_bit(mut reserved: [u8; 8]) -> [u8; 8] {
    reserved[5] |= 0x10;
    reserved
}

pub fn has_extension_bit(reserved: &[u8; 8]) -> bool {
    reserved[5] & 0x10 != 0
}

/// Extended message id of the extension handshake itself.
pub const EXT_HANDSHAKE: u8 = 0;

/// An extended message (id 20): the extended id, then the payload.
pub fn msg_extended(ext_id: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(1 + payload.len());
    body.push(ext_id);
    body.extend_from_slice(payload);
    frame(id::EXTENDED, &body)
}

/// The payload of an extension handshake offering `ut_metadata` under `ut_metadata_id`, with
/// `metadata_size` written as given (`None`: left out, as a peer without the metadata does).
pub fn ext_handshake(ut_metadata_id: u8, metadata_size: Option<i64>) -> Vec<u8> {
    use super::bencode::{B, dict};
    let mut pairs = vec![
        (
            "m",
            dict([("ut_metadata", B::Int(i64::from(ut_metadata_id)))]),
        ),
        ("v", B::str("bitfetch-tests fake")),
    ];
    if let Some(size) = metadata_size {
        pairs.push(("metadata_size", B::Int(size)));
    }
    dict(pairs).encode()
}

/// What the other side's extension handshake says about `ut_metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtHello {
    /// The id it wants `ut_metadata` messages sent to it under (`None`: not offered, or 0,
    /// which BEP 10 says disables it).
    pub ut_metadata: Option<u8>,
    pub metadata_size: Option<i64>,
}

/// Parses an extension handshake payload; `None` if it is not a bencoded dictionary.
pub fn parse_ext_handshake(payload: &[u8]) -> Option<ExtHello> {
    use super::bencode::Value;
    let hello = Value::decode(payload)?;
    let ut_metadata = hello
        .get("m")
        .and_then(|m| m.get("ut_metadata"))
        .and_then(Value::int)
        .and_then(|id| u8::try_from(id).ok())
        .filter(|id| *id != 0);
    Some(ExtHello {
        ut_metadata,
        metadata_size: hello.get("metadata_size").and_then(Value::int),
    })
}

/// BEP 9 messages: a bencoded dictionary, and for `data` the piece's bytes after it.
pub mod ut_metadata {
    use super::super::bencode::{B, Value, dict};

    pub const REQUEST: i64 = 0;
    pub const DATA: i64 = 1;
    pub const REJECT: i64 = 2;
    /// Metadata travels in pieces of 16 KiB, the last one shorter.
    pub const PIECE: usize = 16 * 1024;

    /// Pieces of metadata of `size` bytes.
    pub fn pieces(size: usize) -> usize {
        size.div_ceil(PIECE)
    }

    /// The bytes of metadata piece `piece`.
    pub fn piece_of(metadata: &[u8], piece: usize) -> &[u8] {
        let start = (piece * PIECE).min(metadata.len());
        &metadata[start..(start + PIECE).min(metadata.len())]
    }

    pub fn request(piece: i64) -> Vec<u8> {
        dict([("msg_type", B::Int(REQUEST)), ("piece", B::Int(piece))]).encode()
    }

    pub fn reject(piece: i64) -> Vec<u8> {
        dict([("msg_type", B::Int(REJECT)), ("piece", B::Int(piece))]).encode()
    }

    pub fn data(piece: i64, total_size: i64, bytes: &[u8]) -> Vec<u8> {
        let mut out = dict([
            ("msg_type", B::Int(DATA)),
            ("piece", B::Int(piece)),
            ("total_size", B::Int(total_size)),
        ])
        .encode();
        out.extend_from_slice(bytes);
        out
    }

    /// One decoded message.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Message {
        pub msg_type: i64,
        pub piece: i64,
        pub total_size: Option<i64>,
        /// What followed the dictionary (a data message's bytes).
        pub data: Vec<u8>,
    }

    /// Decodes a `ut_metadata` payload; `None` if it is not a dictionary with integer
    /// `msg_type` and `piece`.
    pub fn parse(payload: &[u8]) -> Option<Message> {
        let (head, used) = Value::decode_prefix(payload)?;
        Some(Message {
            msg_type: head.get("msg_type")?.int()?,
            piece: head.get("piece")?.int()?,
            total_size: head.get("total_size").and_then(Value::int),
            data: payload[used..].to_vec(),
        })
    }
}
