//! A connection of the metadata phase: a magnet download knows only the info hash, so it
//! cannot run a full connection (`peer.rs` needs the piece count, the storage, the hashes).
//! This thread does the handshakes, asks for metadata pieces when the session says so, and
//! keeps what the peer announces (bitfield, haves, chokes, its DHT port) as raw frames, unread
//! (`ut_pex` messages are read past: peers found that early would wait for the torrent anyway). Once the
//! metadata is in, the session asks it to hand the socket over: it stops at the next read,
//! and a full connection carries on from there, reading the kept frames first — no second
//! connection, no second handshake.
//!
//! Hostile until checked: frames are bounded ([`MAX_FRAME`]), what is kept is bounded
//! ([`MAX_KEPT`]), a `piece` (never asked for) or a malformed `ut_metadata` message ends the
//! connection, and the whole start-up has one deadline.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::extension;
use crate::messages::Input;
use crate::metadata;
use crate::peer::{self, Handover, PeerError};
use crate::picker::PeerKey;
use crate::wire::{self, Handshake, reserved};

/// Longest frame read in this phase: a bitfield of the largest torrent metadata can describe
/// (64 MiB of metadata is 3.3 million pieces, a 420 KB bitfield), or a metadata piece.
const MAX_FRAME: usize = 512 * 1024;
/// Frames kept for the full connection (bitfield, haves, chokes): past this the peer is
/// flooding.
const MAX_KEPT: usize = 1 << 20;
/// How long a read waits before the thread looks for the session's commands.
const POLL: Duration = Duration::from_millis(100);
const KEEPALIVE: Duration = Duration::from_secs(90);

/// What the session tells a metadata-phase connection.
#[derive(Debug)]
pub enum MetaCommand {
    /// Ask for this metadata piece.
    Request(u32),
    /// Ask for hashes of a v2 file's tree (BEP 52), once the info dictionary is in.
    Hashes(wire::HashRequest),
    /// Stop reading and hand the socket over.
    HandOver,
    Close,
}

/// What a metadata-phase connection tells the session (as `Input::Meta`).
#[derive(Debug)]
pub enum MetaEvent {
    Connected {
        commands: Sender<MetaCommand>,
        /// The peer set the v2 bit (BEP 52): it may answer hash requests.
        v2: bool,
    },
    Extended(extension::Info),
    Data {
        piece: u32,
        total_size: u32,
        data: Vec<u8>,
    },
    Reject(u32),
    /// BEP 52 answers to our hash requests (checked by the session).
    Hashes {
        req: wire::HashRequest,
        hashes: Vec<[u8; 32]>,
    },
    HashReject(wire::HashRequest),
    /// The socket, for a full connection (after `HandOver`).
    HandedOver(Box<Handover>),
    Gone(Option<PeerError>),
}

/// What every metadata-phase connection shares.
#[derive(Debug, Clone)]
pub struct MetaContext {
    pub info_hash: [u8; 20],
    pub our_id: [u8; 20],
    pub bind: Option<IpAddr>,
    pub listen_port: u16,
    /// BEP 11 is on (`Config::pex`): `ut_pex` is offered (whether the torrent is private is
    /// not known yet; the full connection takes the offer back if it is).
    pub pex: bool,
    /// BEP 5: our DHT node's UDP port (see `peer::Context::dht_port`).
    pub dht_port: Option<u16>,
    /// The link names a v2 info hash: our handshake sets the v2 bit (BEP 52), and a peer
    /// may answer in the v2 swarm (the hash's first 20 bytes), as libtorrent does when both
    /// sides set the bit.
    pub v2_swarm: Option<[u8; 20]>,
}

/// Runs one connection on a thread of its own; it always ends with `Gone` or `HandedOver`.
pub fn spawn(
    key: PeerKey,
    dial: peer::Dial,
    ctx: MetaContext,
    events: Sender<Input>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("meta-{}", key.0))
        .stack_size(256 * 1024)
        .spawn(move || {
            let (tx, rx) = crossbeam_channel::bounded(64);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(key, dial, &ctx, &events, tx, &rx)
            }));
            let event = match result {
                Ok(Ok(Some(handover))) => MetaEvent::HandedOver(Box::new(handover)),
                Ok(Ok(None)) => MetaEvent::Gone(None),
                Ok(Err(e)) => MetaEvent::Gone(Some(e)),
                Err(_) => MetaEvent::Gone(Some(PeerError::Panicked)),
            };
            let _ = events.send(Input::Meta { key, event });
        })
}

fn send(events: &Sender<Input>, key: PeerKey, event: MetaEvent) -> Result<(), PeerError> {
    events
        .send(Input::Meta { key, event })
        .map_err(|_| PeerError::SessionGone)
}

fn run(
    key: PeerKey,
    dial: peer::Dial,
    ctx: &MetaContext,
    events: &Sender<Input>,
    commands_tx: Sender<MetaCommand>,
    commands: &Receiver<MetaCommand>,
) -> Result<Option<Handover>, PeerError> {
    let deadline = Instant::now() + peer::HANDSHAKE_DEADLINE;
    let (mut stream, addr, outbound) = match dial {
        peer::Dial::Outbound(addr) => (
            peer::connect(addr, ctx.bind, peer::CONNECT_TIMEOUT).map_err(PeerError::Connect)?,
            addr,
            true,
        ),
        peer::Dial::Inbound(s, addr) => (s, addr, false),
        peer::Dial::Handover(h) => return Ok(Some(*h)),
    };
    let ours = Handshake {
        reserved: peer::our_reserved(ctx.dht_port.is_some(), ctx.v2_swarm.is_some()),
        info_hash: ctx.info_hash,
        peer_id: ctx.our_id,
    }
    .encode();
    let timed_out = |_| PeerError::Timeout("for the handshake (deadline passed)");
    let read_theirs = |stream: &mut TcpStream| -> Result<Handshake, PeerError> {
        stream
            .set_read_timeout(Some(peer::time_left(deadline).map_err(timed_out)?))
            .map_err(PeerError::Io)?;
        peer::read_peer_handshake(
            stream,
            |h| *h == ctx.info_hash || Some(*h) == ctx.v2_swarm,
            &ctx.our_id,
        )
    };
    stream
        .set_write_timeout(Some(peer::time_left(deadline).map_err(timed_out)?))
        .map_err(PeerError::Io)?;
    let theirs = if outbound {
        stream.write_all(&ours).map_err(PeerError::Io)?;
        read_theirs(&mut stream)?
    } else {
        let h = read_theirs(&mut stream)?;
        stream.write_all(&ours).map_err(PeerError::Io)?;
        h
    };
    stream.set_nodelay(true).map_err(PeerError::Io)?;
    let fast = reserved::has(&theirs.reserved, reserved::FAST);
    let extended = reserved::has(&theirs.reserved, reserved::EXTENSION);
    // We have nothing: BEP 6 wants that said first; then our extension handshake, without
    // `metadata_size` (we are the one fetching it).
    let mut out = Vec::new();
    if fast {
        wire::encode(&wire::Message::HaveNone, &mut out);
    }
    if extended {
        wire::encode(
            &wire::Message::Extended {
                id: extension::HANDSHAKE_ID,
                payload: extension::our_handshake(
                    ctx.listen_port,
                    addr.ip(),
                    None,
                    if ctx.pex {
                        extension::PexOffer::Offer
                    } else {
                        extension::PexOffer::Omit
                    },
                ),
            },
            &mut out,
        );
    }
    // BEP 5: both sides run a DHT node. (The peer's `port` message is kept for the full
    // connection, which passes it on.)
    if let Some(port) = ctx
        .dht_port
        .filter(|_| reserved::has(&theirs.reserved, reserved::DHT))
    {
        wire::encode(&wire::Message::Port(port), &mut out);
    }
    stream.write_all(&out).map_err(PeerError::Io)?;
    send(
        events,
        key,
        MetaEvent::Connected {
            commands: commands_tx,
            v2: reserved::has(&theirs.reserved, reserved::V2),
        },
    )?;

    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(4096),
        kept: Vec::new(),
        ext: None,
        their_ut_metadata: None,
        handshakes: 0,
        last_sent: Instant::now(),
        settled: false,
        deadline,
    };
    loop {
        match commands.try_recv() {
            Ok(MetaCommand::Request(piece)) => conn.request(piece)?,
            Ok(MetaCommand::Hashes(req)) => {
                let mut out = Vec::new();
                wire::encode(&wire::Message::HashRequest(req), &mut out);
                conn.write(&out)?;
            }
            Ok(MetaCommand::HandOver) => {
                return Ok(Some(conn.hand_over(addr, theirs, outbound)));
            }
            Ok(MetaCommand::Close) | Err(TryRecvError::Disconnected) => return Ok(None),
            Err(TryRecvError::Empty) => {}
        }
        if !conn.read_some()? {
            return Ok(None);
        }
        while let Some(event) = conn.next_frame()? {
            send(events, key, event)?;
        }
        if conn.last_sent.elapsed() >= KEEPALIVE {
            conn.write(&[0, 0, 0, 0])?;
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet parsed (at most one frame and a bit).
    buf: Vec<u8>,
    /// Frames for the full connection, as they came.
    kept: Vec<u8>,
    ext: Option<extension::Info>,
    their_ut_metadata: Option<u8>,
    handshakes: u32,
    last_sent: Instant,
    /// A first whole frame came in (the start-up deadline no longer applies).
    settled: bool,
    deadline: Instant,
}

impl Conn {
    fn write(&mut self, bytes: &[u8]) -> Result<(), PeerError> {
        self.stream
            .set_write_timeout(Some(peer::FLUSH_DEADLINE))
            .map_err(PeerError::Io)?;
        self.last_sent = Instant::now();
        self.stream
            .write_all(bytes)
            .map_err(|_| PeerError::Timeout("sending to the peer"))
    }

    fn request(&mut self, piece: u32) -> Result<(), PeerError> {
        let Some(id) = self.their_ut_metadata else {
            return Ok(());
        };
        let mut out = Vec::new();
        wire::encode(
            &wire::Message::Extended {
                id,
                payload: metadata::Message::Request { piece }.encode(),
            },
            &mut out,
        );
        self.write(&out)
    }

    /// Reads what is there, waiting at most [`POLL`]; false when the peer closed.
    fn read_some(&mut self) -> Result<bool, PeerError> {
        if !self.settled && Instant::now() >= self.deadline {
            return Err(PeerError::Timeout(
                "for the handshake and the first message (deadline passed)",
            ));
        }
        let _ = self.stream.set_read_timeout(Some(POLL));
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(true)
            }
            Err(e) => Err(PeerError::Io(e)),
        }
    }

    /// The next whole frame in the buffer, as an event for the session if it is one.
    fn next_frame(&mut self) -> Result<Option<MetaEvent>, PeerError> {
        loop {
            if self.buf.len() < 4 {
                return Ok(None);
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_FRAME {
                return Err(PeerError::Protocol(wire::Error::FrameTooLong {
                    len: len as u32,
                }));
            }
            if self.buf.len() < 4 + len {
                return Ok(None);
            }
            let frame: Vec<u8> = self.buf.drain(..4 + len).collect();
            self.settled = true;
            if len == 0 {
                continue; // keep-alive
            }
            let id = frame[4];
            let body = &frame[5..];
            match id {
                wire::ID_EXTENDED if !body.is_empty() => {
                    if let Some(event) = self.extended(body[0], &body[1..])? {
                        return Ok(Some(event));
                    }
                }
                // Never asked for: nothing explains it but abuse.
                wire::ID_PIECE => return Err(PeerError::Unasked),
                // We have nothing to serve, and said so.
                wire::ID_REQUEST | wire::ID_CANCEL => {}
                // Answers to our hash requests: checked by the session against the roots.
                wire::ID_HASHES | wire::ID_HASH_REJECT => {
                    // Hash messages need no piece count; the decoder checks their lengths.
                    return match wire::Decoder::new(0)
                        .decode(id, body)
                        .map_err(PeerError::Protocol)?
                    {
                        wire::Message::Hashes { req, hashes } => {
                            Ok(Some(MetaEvent::Hashes { req, hashes }))
                        }
                        wire::Message::HashReject(req) => Ok(Some(MetaEvent::HashReject(req))),
                        _ => Ok(None),
                    };
                }
                _ => {
                    if self.kept.len() + frame.len() > MAX_KEPT {
                        return Err(PeerError::Flood("messages before the metadata"));
                    }
                    self.kept.extend_from_slice(&frame);
                }
            }
        }
    }

    fn extended(&mut self, id: u8, payload: &[u8]) -> Result<Option<MetaEvent>, PeerError> {
        if id == extension::HANDSHAKE_ID {
            self.handshakes += 1;
            if self.handshakes > peer::MAX_EXTENDED_HANDSHAKES {
                return Ok(None);
            }
            let Ok(info) = extension::parse_handshake(payload) else {
                return Ok(None);
            };
            self.their_ut_metadata = info.ut_metadata;
            self.ext = Some(info.clone());
            return Ok(Some(MetaEvent::Extended(info)));
        }
        if id != extension::UT_METADATA_ID {
            return Ok(None);
        }
        match metadata::decode(payload).map_err(PeerError::BadMetadata)? {
            Some(metadata::Message::Data {
                piece,
                total_size,
                data,
            }) => Ok(Some(MetaEvent::Data {
                piece,
                total_size,
                data: data.to_vec(),
            })),
            Some(metadata::Message::Reject { piece }) => Ok(Some(MetaEvent::Reject(piece))),
            // We have nothing to give yet.
            Some(metadata::Message::Request { piece }) => {
                if let Some(their) = self.their_ut_metadata {
                    let mut out = Vec::new();
                    wire::encode(
                        &wire::Message::Extended {
                            id: their,
                            payload: metadata::Message::Reject { piece }.encode(),
                        },
                        &mut out,
                    );
                    self.write(&out)?;
                }
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn hand_over(mut self, addr: SocketAddr, theirs: Handshake, outbound: bool) -> Handover {
        let mut prelude = std::mem::take(&mut self.kept);
        prelude.extend_from_slice(&self.buf);
        Handover {
            stream: self.stream,
            addr,
            peer_id: theirs.peer_id,
            reserved: theirs.reserved,
            ext: self.ext,
            prelude,
            outbound,
        }
    }
}
