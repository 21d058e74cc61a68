//! One peer connection: a reader thread and a writer thread over one TCP socket.
//!
//! The reader owns the receiving half: it does the handshake, then decodes frames with
//! [`wire::Decoder`] (each length checked before its payload is read) and turns them into
//! [`PeerEvent`]s for the session. Requests from the peer go straight to the writer through
//! its [`Outbox`], so uploads never wait on the session. The writer owns the sending half: it
//! sleeps on its inbox's doorbell (so an idle connection costs no CPU), batches what it has
//! into one write, and sends a keep-alive when it has been quiet for a while.
//!
//! Both halves are generic over their byte streams: the connection runs them over the socket,
//! the unit tests and the fuzz target ([`replay_reader`]) over bytes in memory.
//!
//! # Hostile peers
//! Nothing a peer sends or fails to read may grow our memory or the session's work without
//! bound, and no wait is open-ended:
//! - *Queues carry state.* The writer's [`Outbox`] keeps the latest choke and interest, not
//!   every flip; each of its lists has a cap, and a connection that reaches one is ended.
//! - *Progress, not per-call timeouts.* Dialling, both handshakes and the peer's first whole
//!   message share one deadline ([`HANDSHAKE_DEADLINE`]); each flush of the writer must be
//!   taken within [`FLUSH_DEADLINE`] plus a second per [`MIN_SEND_RATE`] bytes. A byte now
//!   and then keeps neither alive.
//! - *The session hears news only.* The reader drops repeated haves, chokes and interests,
//!   tells a burst of flips as its outcome, passes on rejects only of requests we made (once
//!   each) and a few allowed-fast pieces; a second bitfield (or have all / have none) ends the
//!   connection as a violation (BEP 3, BEP 6). So no small message costs the session a walk
//!   over every piece more than once per connection.
//!
//! Per-peer faults end this connection only. Whichever half stops first says why (the other
//! half's failure that follows, a read on a socket the writer shut, is only a consequence), and
//! the reader thread sends it to the session as [`PeerEvent::Gone`], a typed [`PeerError`] it
//! can act on. Both threads catch their own panics, so a `Gone` goes out whatever happens and
//! the session never loses a connection slot to a thread that died silently.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::extension;

use crate::geometry::{BlockRef, Geometry, PieceIndex};
use crate::hash_msg::{self, Plan, Trees, Upper};
use crate::messages::{Command, HaveSummary, Input, PeerEvent};
use crate::metadata;
use crate::outbox::{self, CancelServe, HashWork, Inbox, Outbox, Pending, Wake};
use crate::pex;
use crate::picker::PeerKey;
use crate::ratelimit::TokenBucket;
use crate::recv::RecvBuf;
use crate::storage::Storage;
use crate::wire::{self, Body, Handshake, HashRequest, Message, reserved};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// From the start of a connection (dialling included) until both handshakes are through and
/// the peer's first whole message is in. A total, not a per-read timeout: a peer dribbling a
/// byte now and then cannot hold a connection slot past it.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(20);
/// A peer that sends nothing, not even a keep-alive, for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(90);
/// Each flush of the writer (pending messages and at most [`MAX_SERVES_PER_WRITE`] blocks)
/// must be taken by the peer within this, plus one second per [`MIN_SEND_RATE`] bytes it
/// holds. A peer that reads a little now and then does not keep a stuck writer alive.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(20);
/// Bytes per second: see [`FLUSH_DEADLINE`].
pub const MIN_SEND_RATE: u64 = 4096;
/// The window over which choke, interest and cancel messages are counted, and how many an
/// honest peer could send in it (one flip per piece it completes, a cancel per endgame block)
/// with room to spare; past that the connection is a flood and ends.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);
pub const MAX_CONTROL_PER_WINDOW: u32 = 5000;
/// Requests from one peer that we queue before calling it a flood: our advertised `reqq`
/// ([`crate::extension::OUR_REQQ`]) with a quarter on top for peers that overshoot it.
pub const MAX_QUEUED_SERVES: usize = crate::extension::OUR_REQQ as usize * 5 / 4;
/// Requests a peer may send while we choke it before we call it abuse. Many are normal: a
/// peer keeping our whole `reqq` outstanding has that many queued or on their way when the
/// choke leaves, and the ones our reader had not yet handed to the writer count too. So: a
/// full queue's worth, plus what it could send before the choke reaches it.
pub const MAX_REQUESTS_WHILE_CHOKED: u32 = MAX_QUEUED_SERVES as u32 + 1024;
/// Distinct allowed-fast pieces passed on per connection (BEP 6 suggests 10; libtorrent
/// sends 5); more are ignored, as the BEP allows.
pub const MAX_ALLOWED_FAST: usize = 32;
/// BEP 52 hash messages (requests, hashes, rejects) a peer may send per [`FLOOD_WINDOW`]. An
/// honest downloader keeps a request or two in flight, each for up to 512 pieces' hashes.
pub const MAX_HASH_MESSAGES_PER_WINDOW: u32 = 4096;
/// Hash requests below the piece layer answered per [`FLOOD_WINDOW`] (each has the writer
/// read and hash a piece); more are rejected. libtorrent asks for a piece's leaf hashes only
/// when the piece failed its check.
pub const MAX_PIECE_HASHES_PER_WINDOW: u32 = 32;
/// Extended handshakes read per connection (BEP 10 allows updates); later ones are skipped
/// unread.
pub const MAX_EXTENDED_HANDSHAKES: u32 = 4;
/// BEP 11 asks for a `ut_pex` message at most once a minute; one that comes sooner than this
/// after the last one taken is read past, unparsed (a flood costs the session nothing).
pub const PEX_MIN_INTERVAL: Duration = Duration::from_secs(45);
const THREAD_STACK: usize = 256 * 1024;
/// Blocks the reader remembers asking for (outstanding, or voided by a choke, cancel or
/// reject, whose answers may still come), in two generations: when the newer half is full,
/// the older is forgotten. A block asked that long ago and answered only now is dropped and
/// asked again, which only wastes its transfer.
const MAX_ASKED: usize = 8192;
/// A request frame's size on the wire: length prefix, id, index, begin, length.
const REQUEST_FRAME_LEN: usize = 17;
/// Most requests the reader holds before handing them to the writer.
const MAX_SERVE_BATCH: usize = 64;
/// Most blocks the writer sends in one write before it looks at its commands again (a cancel
/// or choke must not wait behind a long queue).
const MAX_SERVES_PER_WRITE: usize = 16;
/// Uploaded bytes a writer gathers before it tells the session: every event wakes the session,
/// and one per write was a sixth of a seeder's CPU.
const REPORT_EVERY: u32 = 1024 * 1024;
/// How long an idle writer keeps a smaller count to itself.
const REPORT_DELAY: Duration = Duration::from_millis(50);
/// A message buffer larger than this (a big extended handshake) is freed after use.
const KEEP_PAYLOAD: usize = 16 * 1024;

const STARTING: &str = "for the handshake and the first message (deadline passed)";
const WAITING: &str = "waiting for the peer (silent too long)";
const SENDING: &str = "sending to the peer (it takes too little, too slowly)";

/// Test-only: peer keys whose reader or writer thread panics on purpose, to show the guards
/// report it.
#[cfg(test)]
const PANIC_IN_READER: PeerKey = PeerKey(u64::MAX);
#[cfg(test)]
const PANIC_IN_WRITER: PeerKey = PeerKey(u64::MAX - 1);

#[cfg(test)]
fn inject_panic(key: PeerKey, at: PeerKey) {
    if key == at {
        panic!("panic injected into peer {}", key.0);
    }
}

/// A connection's deadlines ([`Timeouts::DEFAULT`] in production; tests shorten them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub handshake: Duration,
    pub idle: Duration,
    pub flush: Duration,
    pub min_send_rate: u64,
}

impl Timeouts {
    pub const DEFAULT: Timeouts = Timeouts {
        connect: CONNECT_TIMEOUT,
        handshake: HANDSHAKE_DEADLINE,
        idle: IDLE_TIMEOUT,
        flush: FLUSH_DEADLINE,
        min_send_rate: MIN_SEND_RATE,
    };

    /// How long a flush of `bytes` may take.
    fn flush_deadline(&self, bytes: usize) -> Duration {
        self.flush + Duration::from_secs(bytes as u64 / self.min_send_rate.max(1))
    }
}

/// Why a connection ended: what [`PeerEvent::Gone`] carries (`None` there is a clean close,
/// by either side). [`is_violation`](PeerError::is_violation) and
/// [`may_redial`](PeerError::may_redial) say what the session should make of it.
#[derive(Debug)]
#[non_exhaustive]
pub enum PeerError {
    /// Dialling failed.
    Connect(io::Error),
    Io(io::Error),
    /// Which wait or deadline ran out.
    Timeout(&'static str),
    /// A malformed handshake or frame.
    Protocol(wire::Error),
    /// A malformed `ut_metadata` message (BEP 9).
    BadMetadata(metadata::DecodeError),
    WrongTorrent,
    SelfConnection,
    /// A piece index or block range outside the torrent, in the named message.
    BadIndex(&'static str),
    /// More than [`MAX_QUEUED_SERVES`] requests waiting at once.
    RequestFlood,
    /// More than [`MAX_REQUESTS_WHILE_CHOKED`] requests while we choke the peer.
    RequestsWhileChoked,
    /// A message of an extension the handshake did not agree on.
    NotNegotiated(&'static str),
    /// A `piece` on a connection where we never asked for a block (a seeder's connections,
    /// say): nothing can explain it but abuse.
    Unasked,
    /// More of the named messages than any honest peer sends in [`FLOOD_WINDOW`].
    Flood(&'static str),
    /// A BEP 52 `hashes` message whose fields are no valid request on the torrent, or whose
    /// count of hashes does not match them.
    BadHashes(hash_msg::BadHashes),
    /// The writer has not taken its work for so long that the named list reached its cap
    /// (the peer does not read what we send): see [`Outbox`].
    Backlog(&'static str),
    SessionGone,
    /// A bug of ours: one of the connection's threads panicked (its message went to stderr).
    Panicked,
}

impl PeerError {
    /// The peer broke the protocol or abused it: malformed or misplaced frames, out-of-range
    /// indices, request floods, messages it did not negotiate. It must never be dialled again.
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            PeerError::Protocol(_)
                | PeerError::BadMetadata(_)
                | PeerError::BadIndex(_)
                | PeerError::RequestFlood
                | PeerError::RequestsWhileChoked
                | PeerError::NotNegotiated(_)
                | PeerError::Unasked
                | PeerError::Flood(_)
                | PeerError::BadHashes(_)
        )
    }

    /// Whether dialling the address again could go better: only after a mere failure (connect
    /// refused, reset, timeout, a peer too slow to read). Not after a violation, not for a
    /// peer on another torrent or ourselves (neither is misbehaviour, and neither changes),
    /// not after a panic (the same bytes would hit the same bug), and not while shutting down.
    pub fn may_redial(&self) -> bool {
        matches!(
            self,
            PeerError::Connect(_)
                | PeerError::Io(_)
                | PeerError::Timeout(_)
                | PeerError::Backlog(_)
        )
    }
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::Connect(e) => write!(f, "cannot connect: {}", crate::error::reason(e)),
            PeerError::Io(e) => write!(f, "{}", crate::error::reason(e)),
            PeerError::Timeout(what) => write!(f, "timed out {what}"),
            PeerError::Protocol(e) => write!(f, "protocol error: {e}"),
            PeerError::BadMetadata(e) => write!(f, "bad ut_metadata message: {e}"),
            PeerError::WrongTorrent => write!(f, "peer is on another torrent"),
            PeerError::SelfConnection => write!(f, "connected to ourselves"),
            PeerError::BadIndex(what) => write!(f, "out-of-range {what}"),
            PeerError::RequestFlood => write!(f, "too many queued requests"),
            PeerError::RequestsWhileChoked => write!(f, "kept requesting while choked"),
            PeerError::Unasked => write!(f, "sent a block without being asked for any"),
            PeerError::Flood(what) => write!(f, "flooded us with {what}"),
            PeerError::BadHashes(why) => write!(f, "malformed hashes message ({why:?})"),
            PeerError::NotNegotiated(what) => write!(f, "sent {what} without negotiating it"),
            PeerError::Backlog(what) => write!(f, "does not read what we send ({what} piled up)"),
            PeerError::SessionGone => write!(f, "shutting down"),
            PeerError::Panicked => write!(f, "connection thread panicked (a bug)"),
        }
    }
}

impl std::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PeerError::Connect(e) | PeerError::Io(e) => Some(e),
            PeerError::Protocol(e) => Some(e),
            PeerError::BadMetadata(e) => Some(e),
            _ => None,
        }
    }
}

impl From<wire::Error> for PeerError {
    fn from(e: wire::Error) -> PeerError {
        PeerError::Protocol(e)
    }
}

/// Maps an I/O error during `what` to a typed error that says which timeout fired.
fn io_err(what: &'static str) -> impl Fn(io::Error) -> PeerError {
    move |e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => PeerError::Timeout(what),
        _ => PeerError::Io(e),
    }
}

/// How a connection ended: set once, by whichever stopped it first (the writer, the reader,
/// or the outbox when a cap is reached). Each records before it shuts the socket or tears the
/// other half down, so the failure that follows is never taken for the cause.
#[derive(Default)]
pub(crate) struct Ending(Mutex<Option<Result<(), PeerError>>>);

impl Ending {
    pub fn record(&self, outcome: Result<(), PeerError>) {
        self.0.lock().get_or_insert(outcome);
    }

    pub fn take(&self) -> Result<(), PeerError> {
        self.0.lock().take().unwrap_or(Ok(()))
    }
}

/// What every connection of one torrent shares (read-only).
#[derive(Debug)]
pub struct Context {
    /// Piece hashes: uploads are checked against them before a byte goes out.
    pub meta: Arc<crate::metainfo::Metainfo>,
    pub info_hash: [u8; 20],
    pub our_id: [u8; 20],
    pub geometry: Geometry,
    pub storage: Arc<Storage>,
    pub bind: Option<IpAddr>,
    /// Our listening port, told to peers in the extended handshake.
    pub listen_port: u16,
    pub upload_limit: Option<Arc<TokenBucket>>,
    pub download_limit: Option<Arc<TokenBucket>>,
    /// BEP 11 peer exchange: `ut_pex` offered and read (off for private torrents).
    pub pex: bool,
    /// BEP 5: our DHT node's UDP port. When set, our handshake sets the DHT bit and peers that
    /// set it too are sent a `port` message after the intro.
    pub dht_port: Option<u16>,
}

pub enum Dial {
    Outbound(SocketAddr),
    Inbound(TcpStream, SocketAddr),
    /// A connection of the metadata phase (`meta_peer`), handshakes done, carrying on.
    Handover(Box<Handover>),
}

/// A connection the metadata phase made, handed to a full connection once the torrent is
/// known: both handshakes are done, we said `have none` (if Fast) and sent our extension
/// handshake; `prelude` is what the peer sent since that we have not read (frames kept whole,
/// then any partial one), read before the socket.
#[derive(Debug)]
pub struct Handover {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub peer_id: [u8; 20],
    pub reserved: [u8; 8],
    pub ext: Option<extension::Info>,
    pub prelude: Vec<u8>,
    pub outbound: bool,
}

/// Starts a connection's reader thread (which starts the writer after the handshake). The
/// thread always ends by sending [`PeerEvent::Gone`], even when it panics.
pub fn spawn(
    key: PeerKey,
    dial: Dial,
    ctx: Arc<Context>,
    events: Sender<Input>,
) -> io::Result<JoinHandle<()>> {
    spawn_with(key, dial, ctx, events, Timeouts::DEFAULT)
}

/// [`spawn`] with other deadlines.
pub(crate) fn spawn_with(
    key: PeerKey,
    dial: Dial,
    ctx: Arc<Context>,
    events: Sender<Input>,
    timeouts: Timeouts,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("peer-{}", key.0))
        .stack_size(THREAD_STACK)
        .spawn(move || {
            // A panic is a bug of ours, but it must not cost the session a connection slot:
            // the Gone event goes out whatever happens. The connection's own teardown ran
            // while unwinding (see `Teardown`).
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                run(key, dial, &ctx, &events, &timeouts)
            }));
            let error = outcome.unwrap_or(Err(PeerError::Panicked)).err();
            let _ = events.send(Input::Peer {
                key,
                event: PeerEvent::Gone { error },
            });
        })
}

pub(crate) fn connect(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    // socket2's timeout bounds the whole connect, not each wait inside it.
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    Ok(socket.into())
}

/// The reserved bits we set: BEP 10 extension protocol and BEP 6 Fast extension, BEP 5 DHT
/// when we run a DHT node (`dht`), and BEP 52 v2 for a torrent that has a v2 part.
pub(crate) fn our_reserved(dht: bool, v2: bool) -> [u8; 8] {
    let mut r = [0u8; 8];
    for (byte, bit) in [reserved::EXTENSION, reserved::FAST] {
        r[byte] |= bit;
    }
    if dht {
        r[reserved::DHT.0] |= reserved::DHT.1;
    }
    if v2 {
        r[reserved::V2.0] |= reserved::V2.1;
    }
    r
}

/// Our handshake naming the swarm `info_hash` (a hybrid torrent has two).
fn our_handshake(ctx: &Context, info_hash: [u8; 20]) -> [u8; wire::HANDSHAKE_LEN] {
    Handshake {
        reserved: our_reserved(ctx.dht_port.is_some(), ctx.meta.v2.is_some()),
        info_hash,
        peer_id: ctx.our_id,
    }
    .encode()
}

fn read_handshake(stream: &mut impl Read, ctx: &Context) -> Result<Handshake, PeerError> {
    read_peer_handshake(stream, |h| ctx.meta.is_our_swarm(h), &ctx.our_id)
}

/// Reads the peer's handshake: for our torrent (a hash `ours` accepts), and not from
/// ourselves.
pub(crate) fn read_peer_handshake(
    stream: &mut impl Read,
    ours: impl Fn(&[u8; 20]) -> bool,
    our_id: &[u8; 20],
) -> Result<Handshake, PeerError> {
    let mut buf = [0u8; wire::HANDSHAKE_LEN];
    stream.read_exact(&mut buf).map_err(io_err(STARTING))?;
    let h = Handshake::decode(&buf)?;
    if !ours(&h.info_hash) {
        return Err(PeerError::WrongTorrent);
    }
    if h.peer_id == *our_id {
        return Err(PeerError::SelfConnection);
    }
    Ok(h)
}

/// Time left until `deadline`; a `TimedOut` error once there is none.
pub(crate) fn time_left(deadline: Instant) -> io::Result<Duration> {
    left(deadline)
}

fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::from(io::ErrorKind::TimedOut))
    } else {
        Ok(left)
    }
}

/// Where a reader's bytes come from. The socket ([`Clocked`]) holds every read to the start-up
/// deadline until [`settle`](Source::settle) says the first whole message is in.
pub(crate) trait Source: Read {
    fn settle(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for &[u8] {}

/// The reader's socket, with a total deadline over every read until it is settled (each read
/// waits at most what is left of it), and the idle timeout per read after that.
struct Clocked<'a> {
    stream: &'a TcpStream,
    deadline: Option<Instant>,
    idle: Duration,
    /// Bytes the metadata phase read and left for us (see [`Handover`]), read first.
    prelude: io::Cursor<Vec<u8>>,
}

impl Clocked<'_> {
    fn arm(&self) -> io::Result<()> {
        match self.deadline {
            Some(d) => self.stream.set_read_timeout(Some(left(d)?)),
            None => Ok(()),
        }
    }
}

impl Clocked<'_> {
    fn prelude_left(&self) -> bool {
        (self.prelude.position() as usize) < self.prelude.get_ref().len()
    }
}

impl Read for Clocked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.prelude_left() {
            return self.prelude.read(buf);
        }
        self.arm()?;
        (&*self.stream).read(buf)
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        if self.prelude_left() {
            return self.prelude.read_vectored(bufs);
        }
        self.arm()?;
        (&*self.stream).read_vectored(bufs)
    }
}

impl Source for Clocked<'_> {
    fn settle(&mut self) -> io::Result<()> {
        if self.deadline.take().is_some() {
            self.stream.set_read_timeout(Some(self.idle))?;
        }
        Ok(())
    }
}

/// The writer's end of a connection: a socket, or bytes in memory for tests.
trait SendHalf: Write {
    /// Bounds each following write call (a socket's send timeout); in memory, a no-op.
    fn limit_calls(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}

impl SendHalf for Vec<u8> {}

/// The writer's socket, shared with the outbox (which shuts it when a cap is reached).
struct Socket(Arc<TcpStream>);

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&*self.0).write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SendHalf for Socket {
    fn limit_calls(&mut self, d: Duration) -> io::Result<()> {
        self.0.set_write_timeout(Some(d))
    }
}

/// Blocks the writer asked this peer for, for the reader: only these are written into storage,
/// and only their rejects are passed on. Two generations (see [`MAX_ASKED`]).
#[derive(Default)]
struct Asked {
    new: HashSet<BlockRef>,
    old: HashSet<BlockRef>,
    /// We asked this peer for something at least once.
    ever: bool,
}

impl Asked {
    fn insert(&mut self, blocks: &[BlockRef]) {
        self.ever |= !blocks.is_empty();
        for &b in blocks {
            if self.new.len() >= MAX_ASKED / 2 {
                std::mem::swap(&mut self.old, &mut self.new);
                self.new.clear();
            }
            self.new.insert(b);
        }
    }

    /// Whether `b` was asked (and not yet answered); forgets it.
    fn take(&mut self, b: &BlockRef) -> bool {
        self.new.remove(b) || self.old.remove(b)
    }
}

/// `Ok(())` is a clean close: the peer hung up between frames, or the session closed us.
fn run(
    key: PeerKey,
    dial: Dial,
    ctx: &Arc<Context>,
    events: &Sender<Input>,
    t: &Timeouts,
) -> Result<(), PeerError> {
    #[cfg(test)]
    inject_panic(key, PANIC_IN_READER);
    let deadline = Instant::now() + t.handshake;
    let (stream, addr, outbound, handover) = match dial {
        Dial::Outbound(addr) => (
            connect(addr, ctx.bind, t.connect.min(t.handshake)).map_err(PeerError::Connect)?,
            addr,
            true,
            None,
        ),
        Dial::Inbound(s, addr) => (s, addr, false, None),
        Dial::Handover(h) => {
            let Handover {
                stream,
                addr,
                peer_id,
                reserved,
                ext,
                prelude,
                outbound,
            } = *h;
            (
                stream,
                addr,
                outbound,
                Some((peer_id, reserved, ext, prelude)),
            )
        }
    };
    let mut clocked = Clocked {
        stream: &stream,
        deadline: Some(deadline),
        idle: t.idle,
        prelude: io::Cursor::new(Vec::new()),
    };
    let send_handshake = |info_hash| -> Result<(), PeerError> {
        let sending = io_err(STARTING);
        stream
            .set_write_timeout(Some(left(deadline).map_err(&sending)?))
            .map_err(PeerError::Io)?;
        (&stream)
            .write_all(&our_handshake(ctx, info_hash))
            .map_err(sending)
    };
    // The dialler speaks first; the answerer checks the info hash before revealing anything.
    let mut ext_info = None;
    let handed_over = handover.is_some();
    let theirs = match handover {
        Some((peer_id, reserved, ext, prelude)) => {
            clocked.prelude = io::Cursor::new(prelude);
            // It proved itself in the metadata phase.
            clocked.deadline = None;
            stream
                .set_read_timeout(Some(t.idle))
                .map_err(PeerError::Io)?;
            ext_info = ext;
            Handshake {
                reserved,
                info_hash: ctx.info_hash,
                peer_id,
            }
        }
        None if outbound => {
            send_handshake(ctx.info_hash)?;
            read_handshake(&mut clocked, ctx)?
        }
        None => {
            // Answered in the swarm the peer named (either of a hybrid torrent's).
            let h = read_handshake(&mut clocked, ctx)?;
            send_handshake(h.info_hash)?;
            h
        }
    };

    stream.set_nodelay(true).map_err(PeerError::Io)?;
    // A feature is on only when both sides set its bit (we always set ours).
    let fast = reserved::has(&theirs.reserved, reserved::FAST);
    let extended = reserved::has(&theirs.reserved, reserved::EXTENSION);

    let ending = Arc::new(Ending::default());
    let write_half = Arc::new(stream.try_clone().map_err(PeerError::Io)?);
    let (outbox, inbox) = outbox::outbox(
        Arc::clone(&ending),
        Some(Arc::clone(&write_half)),
        ctx.geometry.piece_count(),
    );
    // The writer tells the reader what it asked for before the requests go out, so the answer
    // never arrives before the reader knows it may keep it.
    let asked = Arc::new(Mutex::new(Asked::default()));
    let queued = Arc::new(AtomicUsize::new(0));
    let writer = {
        let ctx = Arc::clone(ctx);
        let events = events.clone();
        let queued = Arc::clone(&queued);
        let asked = Arc::clone(&asked);
        let ending = Arc::clone(&ending);
        let t = *t;
        // A handed-over connection offered PEX before the torrent was known to be private:
        // this update takes the offer back.
        let pex = match (ctx.pex, handed_over) {
            (true, _) => extension::PexOffer::Offer,
            (false, true) => extension::PexOffer::Withdraw,
            (false, false) => extension::PexOffer::Omit,
        };
        let ext_handshake = extended.then(|| {
            extension::our_handshake(
                ctx.listen_port,
                addr.ip(),
                Some(ctx.meta.info_bytes().len()),
                pex,
            )
        });
        // BEP 5: both sides run a DHT node. (The metadata phase sent it on a handed-over
        // connection.)
        let dht_port = ctx
            .dht_port
            .filter(|_| reserved::has(&theirs.reserved, reserved::DHT) && !handed_over);
        thread::Builder::new()
            .name(format!("peer-{}-w", key.0))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let socket = Socket(Arc::clone(&write_half));
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                    #[cfg(test)]
                    inject_panic(key, PANIC_IN_WRITER);
                    let links = WriterLinks {
                        key,
                        events,
                        queued,
                        asked,
                    };
                    let mut w = WriterState::new(&ctx, socket, links, fast, ext_handshake, &t);
                    // The metadata phase said `have none` (or nothing) already: what we
                    // have by now goes out as haves.
                    w.handed_over = handed_over;
                    w.dht_port = dht_port;
                    let result = w.run(&inbox);
                    // Bytes sent before a broken write still count.
                    w.report();
                    result
                }));
                ending.record(outcome.unwrap_or(Err(PeerError::Panicked)));
                // Told to stop, or the socket broke, or a panic: either way wake the reader so
                // the connection ends and its Gone event reaches the session.
                let _ = write_half.shutdown(Shutdown::Both);
            })
            .map_err(PeerError::Io)?
    };
    let teardown = Teardown {
        stream: &stream,
        commands: outbox.clone(),
        writer: Some(writer),
    };
    let connected = Input::Peer {
        key,
        event: PeerEvent::Connected {
            addr,
            peer_id: theirs.peer_id,
            fast,
            commands: outbox.clone(),
        },
    };
    let result = if events.send(connected).is_err() {
        Err(PeerError::SessionGone)
    } else {
        let links = Links {
            key,
            events,
            writer: &outbox,
            queued: &queued,
            asked: &asked,
        };
        let mut reader = Reader::new(
            clocked,
            &ctx.storage,
            ctx.meta.info_bytes(),
            ctx.download_limit.as_deref(),
            fast,
            links,
        );
        reader.pex = ctx.pex;
        reader.v2 = ctx.meta.v2.as_ref().map(|v| v as &dyn Trees);
        // What the metadata phase read of the peer's extension handshake.
        match ext_info {
            Some(info) => {
                reader.their_ut_metadata = info.ut_metadata;
                reader.extended_handshakes = 1;
                reader
                    .send(PeerEvent::Extended(info))
                    .and_then(|()| reader.run())
            }
            None => reader.run(),
        }
    };
    ending.record(result);
    drop(teardown);
    ending.take()
}

/// Ends a connection's writer once the reader is done, also when the reader panics: the socket
/// is shut (a write blocked on a full send buffer fails at once), the writer told to stop and
/// joined, so no thread outlives its connection's Gone event.
struct Teardown<'a> {
    stream: &'a TcpStream,
    commands: Outbox,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.commands.send(Command::Shutdown);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A reader's links: events to the session, requests to its writer, and the writer's word on
/// which blocks it asked for.
struct Links<'a> {
    key: PeerKey,
    events: &'a Sender<Input>,
    writer: &'a Outbox,
    /// Requests handed to the writer and not yet served or dropped (the writer counts down).
    queued: &'a AtomicUsize,
    asked: &'a Mutex<Asked>,
}

/// What the peer has told us it has, as far as the reader needs to drop repeats.
#[derive(Default)]
struct Announced {
    /// A bitfield came (a second one is a violation).
    bitfield: bool,
    /// Have none came, or anything that makes it moot.
    summary: bool,
    /// It has everything: every have is a repeat.
    all: bool,
    /// Pieces it announced, as a bitfield (allocated at the first have or bitfield).
    bits: Vec<u8>,
}

impl Announced {
    /// Records `piece`; false if it was known already.
    fn have(&mut self, piece: PieceIndex, bitfield_len: usize) -> bool {
        if self.all {
            return false;
        }
        if self.bits.is_empty() {
            self.bits = vec![0; bitfield_len];
        }
        let (byte, bit) = (piece.usize() / 8, 0x80 >> (piece.usize() % 8));
        let new = self.bits[byte] & bit == 0;
        self.bits[byte] |= bit;
        new
    }
}

struct Reader<'a, R> {
    stream: RecvBuf<R>,
    decoder: wire::Decoder,
    storage: &'a Storage,
    download_limit: Option<&'a TokenBucket>,
    links: Links<'a>,
    payload: Vec<u8>,
    fast: bool,
    /// Requests decoded but not yet handed to the writer: passed on together when the next
    /// read could block, or before any other message (so a cancel follows its request).
    serves: Vec<BlockRef>,
    /// The first whole message is in (the start-up deadline no longer applies).
    settled: bool,
    /// What a timeout of the next read means.
    waiting: &'static str,
    announced: Announced,
    /// The peer's choke and interest as last read, and as last told to the session: told
    /// when they differ and the reader is about to wait or to tell anything else.
    choking: bool,
    interested: bool,
    told_choking: bool,
    told_interested: bool,
    allowed_fast: Vec<PieceIndex>,
    extended_handshakes: u32,
    /// The info dictionary, served to peers that fetch it (BEP 9), and the id the peer wants
    /// `ut_metadata` messages under (from its extended handshake), and how fast it may have
    /// pieces of it.
    info: &'a [u8],
    their_ut_metadata: Option<u8>,
    serve_limit: metadata::ServeLimit,
    /// BEP 11 is on for this torrent, and when the last `ut_pex` message was taken.
    pex: bool,
    last_pex: Option<Instant>,
    /// A `port` message was passed on (later ones are ignored).
    dht_port_told: bool,
    /// Choke, interest and cancel messages in the current [`FLOOD_WINDOW`], and when it
    /// began: coalescing makes them cheap, a budget makes them end the connection.
    control: (std::time::Instant, u32),
    /// The torrent's v2 files, if it has any: their hash requests are answered (BEP 52).
    v2: Option<&'a dyn Trees>,
    /// The upper layers of the files asked about (at most one entry per file of the torrent,
    /// a byte per piece; see [`Upper`]).
    uppers: HashMap<crate::merkle::Hash, Option<Upper>>,
    /// Hash messages and answers from piece data in the current [`FLOOD_WINDOW`], and when it
    /// began.
    hash_window: (Instant, u32, u32),
}

impl<'a, R: Source> Reader<'a, R> {
    fn new(
        src: R,
        storage: &'a Storage,
        info: &'a [u8],
        download_limit: Option<&'a TokenBucket>,
        fast: bool,
        links: Links<'a>,
    ) -> Reader<'a, R> {
        Reader {
            stream: RecvBuf::new(src),
            decoder: wire::Decoder::new(storage.geometry().piece_count()),
            storage,
            download_limit,
            links,
            payload: Vec::new(),
            fast,
            serves: Vec::with_capacity(MAX_SERVE_BATCH),
            settled: false,
            waiting: STARTING,
            announced: Announced::default(),
            choking: true,
            interested: false,
            told_choking: true,
            told_interested: false,
            allowed_fast: Vec::new(),
            extended_handshakes: 0,
            info,
            their_ut_metadata: None,
            serve_limit: metadata::ServeLimit::default(),
            pex: false,
            last_pex: None,
            dht_port_told: false,
            control: (std::time::Instant::now(), 0),
            v2: None,
            uppers: HashMap::new(),
            hash_window: (Instant::now(), 0, 0),
        }
    }

    /// Counts one choke, interest or cancel message against the window's budget.
    fn control_message(&mut self) -> Result<(), PeerError> {
        let now = std::time::Instant::now();
        if now.duration_since(self.control.0) >= FLOOD_WINDOW {
            self.control = (now, 0);
        }
        self.control.1 += 1;
        if self.control.1 > MAX_CONTROL_PER_WINDOW {
            return Err(PeerError::Flood("choke, interest or cancel messages"));
        }
        Ok(())
    }

    fn pass_serves(&mut self) {
        self.links.writer.serve(&mut self.serves);
    }

    /// Tells the session an event, after any change of choke or interest read before it.
    fn emit(&mut self, event: PeerEvent) -> Result<(), PeerError> {
        self.tell_state()?;
        self.send(event)
    }

    fn send(&self, event: PeerEvent) -> Result<(), PeerError> {
        self.links
            .events
            .send(Input::Peer {
                key: self.links.key,
                event,
            })
            .map_err(|_| PeerError::SessionGone)
    }

    /// Tells the session where choke and interest ended up since it last heard: a burst of
    /// flips read in one go costs it nothing, or one event each.
    fn tell_state(&mut self) -> Result<(), PeerError> {
        if self.choking != self.told_choking {
            self.told_choking = self.choking;
            self.send(if self.choking {
                PeerEvent::Choke
            } else {
                PeerEvent::Unchoke
            })?;
        }
        if self.interested != self.told_interested {
            self.told_interested = self.interested;
            self.send(if self.interested {
                PeerEvent::Interested
            } else {
                PeerEvent::NotInterested
            })?;
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), PeerError> {
        self.stream.read_exact(buf).map_err(io_err(self.waiting))
    }

    /// Reads frames until the connection ends; `Ok(())` when the peer hangs up between frames.
    fn run(&mut self) -> Result<(), PeerError> {
        loop {
            if self.stream.buffered() < REQUEST_FRAME_LEN {
                self.pass_serves();
                self.tell_state()?;
            }
            if self.stream.at_eof().map_err(io_err(self.waiting))? {
                return Ok(());
            }
            self.read_frame()?;
            if !self.settled {
                self.settled = true;
                self.waiting = WAITING;
                self.stream.get_mut().settle().map_err(PeerError::Io)?;
            }
        }
    }

    fn read_frame(&mut self) -> Result<(), PeerError> {
        let mut prefix = [0u8; wire::LEN_PREFIX];
        self.read(&mut prefix)?;
        let Some(len) = self.decoder.frame_len(prefix)? else {
            return Ok(());
        };
        let mut id = [0u8; 1];
        self.read(&mut id)?;
        match self.decoder.body(len, id[0])? {
            Body::Piece { len } => {
                self.pass_serves();
                self.read_piece(len)
            }
            Body::Message { id, len } => {
                if id != wire::ID_REQUEST {
                    self.pass_serves();
                }
                if !wire::is_known(id) {
                    // Ignored: read past, never buffered.
                    return self.skip(len);
                }
                if id == wire::ID_EXTENDED {
                    return self.read_extended(len);
                }
                self.read_message(id, len)
            }
        }
    }

    fn skip(&mut self, len: usize) -> Result<(), PeerError> {
        self.stream.skip(len).map_err(io_err(self.waiting))
    }

    fn read_message(&mut self, id: u8, len: usize) -> Result<(), PeerError> {
        // One buffer for the connection's life (a big one is freed after use): `len` is
        // bounded by the decoder, and a message does not cost an allocation each.
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len, 0);
        let msg = self
            .read(&mut payload)
            .and_then(|()| self.decoder.decode(id, &payload).map_err(PeerError::from));
        if payload.capacity() <= KEEP_PAYLOAD {
            self.payload = payload;
        }
        self.handle(msg?)
    }

    /// The peer's extended handshake (only the first few of them) and `ut_metadata`
    /// messages are ours to read; any other extended message is read past.
    fn read_extended(&mut self, len: usize) -> Result<(), PeerError> {
        let mut ext = [0u8; 1];
        self.read(&mut ext)?;
        if ext[0] == extension::UT_METADATA_ID {
            return self.read_ut_metadata(len - 1);
        }
        if ext[0] == extension::UT_PEX_ID && self.pex {
            return self.read_pex(len - 1);
        }
        if ext[0] != extension::HANDSHAKE_ID || self.extended_handshakes >= MAX_EXTENDED_HANDSHAKES
        {
            return self.skip(len - 1);
        }
        self.extended_handshakes += 1;
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len - 1, 0);
        let read = self.read(&mut payload);
        // A malformed handshake is ignored, not fatal.
        let info = read.is_ok().then(|| extension::parse_handshake(&payload));
        if payload.capacity() <= KEEP_PAYLOAD {
            self.payload = payload;
        }
        read?;
        match info {
            Some(Ok(info)) => {
                self.their_ut_metadata = info.ut_metadata;
                self.emit(PeerEvent::Extended(info))
            }
            _ => Ok(()),
        }
    }

    /// A BEP 9 message. A request is answered from the info dictionary through the writer,
    /// under the per-connection [`metadata::ServeLimit`] (a reject past it, and nothing
    /// while [`outbox::MAX_PENDING_EXTENDED`] answers already wait); data and rejects are
    /// read past (we have the metadata); a malformed message ends the connection.
    fn read_ut_metadata(&mut self, len: usize) -> Result<(), PeerError> {
        if len > metadata::MAX_MESSAGE_LEN {
            return Err(PeerError::BadMetadata(metadata::DecodeError::TooLong {
                len,
            }));
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len, 0);
        let read = self.read(&mut payload);
        let piece =
            match read.and_then(|()| metadata::decode(&payload).map_err(PeerError::BadMetadata)) {
                Ok(Some(metadata::Message::Request { piece })) => Ok(Some(piece)),
                Ok(_) => Ok(None),
                Err(e) => Err(e),
            };
        if payload.capacity() <= KEEP_PAYLOAD {
            self.payload = payload;
        }
        let (Some(piece), Some(id)) = (piece?, self.their_ut_metadata) else {
            return Ok(());
        };
        self.control_message()?;
        let answer = if self.info.is_empty() {
            metadata::Message::Reject { piece }.encode()
        } else {
            metadata::answer(
                self.info,
                piece,
                &mut self.serve_limit,
                std::time::Instant::now(),
            )
        };
        self.links.writer.extended(id, answer);
        Ok(())
    }

    /// A BEP 11 message: at most one per [`PEX_MIN_INTERVAL`] is read (the others, and
    /// oversize ones, are read past); a malformed one is ignored, not fatal (PEX is advice).
    fn read_pex(&mut self, len: usize) -> Result<(), PeerError> {
        let now = Instant::now();
        let too_soon = self
            .last_pex
            .is_some_and(|t| now.duration_since(t) < PEX_MIN_INTERVAL);
        if too_soon || len > pex::MAX_MESSAGE_LEN {
            return self.skip(len);
        }
        self.last_pex = Some(now);
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len, 0);
        let read = self.read(&mut payload);
        let msg = read.is_ok().then(|| pex::decode(&payload));
        if payload.capacity() <= KEEP_PAYLOAD {
            self.payload = payload;
        }
        read?;
        match msg {
            Some(Ok(m)) if !m.added.is_empty() || !m.dropped.is_empty() => {
                self.emit(PeerEvent::Pex {
                    added: m.added,
                    dropped: m.dropped,
                })
            }
            _ => Ok(()),
        }
    }

    fn read_piece(&mut self, data_len: u32) -> Result<(), PeerError> {
        let mut header = [0u8; wire::PIECE_HEADER_LEN];
        self.read(&mut header)?;
        let (index, begin) = wire::piece_header(&header);
        let storage = self.storage;
        let block = storage
            .geometry()
            .aligned_block(index, begin, data_len)
            .ok_or(PeerError::BadIndex("block"))?;
        if let Some(limit) = self.download_limit {
            limit.acquire(u64::from(data_len));
        }
        // Straight from the socket into the file map when the block is ours to write;
        // otherwise read past it.
        let claim = {
            let mut asked = self.links.asked.lock();
            if !asked.ever {
                return Err(PeerError::Unasked);
            }
            if asked.take(&block) {
                storage.claim(block)
            } else {
                None
            }
        };
        let written = claim.is_some();
        match claim {
            Some(claim) => claim.fill(&mut self.stream),
            None => self.stream.skip(data_len as usize),
        }
        .map_err(io_err(self.waiting))?;
        self.emit(PeerEvent::Block { block, written })
    }

    fn handle(&mut self, msg: Message) -> Result<(), PeerError> {
        let storage = self.storage;
        let g = storage.geometry();
        match msg {
            Message::KeepAlive | Message::Unknown(_) => Ok(()),
            // BEP 5: the first usable one only.
            Message::Port(port) if port != 0 && !self.dht_port_told => {
                self.dht_port_told = true;
                self.emit(PeerEvent::DhtPort(port))
            }
            Message::Port(_) => Ok(()),
            // Read by `read_extended`; not reached.
            Message::Extended { .. } => Ok(()),
            Message::Choke => {
                self.choking = true;
                self.control_message()
            }
            Message::Unchoke => {
                self.choking = false;
                self.control_message()
            }
            Message::Interested => {
                self.interested = true;
                self.control_message()
            }
            Message::NotInterested => {
                self.interested = false;
                self.control_message()
            }
            Message::Have(i) => {
                let piece = g.piece(i).ok_or(PeerError::BadIndex("have"))?;
                if self.announced.have(piece, self.decoder_bitfield_len()) {
                    self.emit(PeerEvent::Have(piece))
                } else {
                    Ok(())
                }
            }
            Message::Bitfield(bits) => {
                // BEP 3 wants it first and once; aria2 sends one after have none or haves,
                // and again later. Only what is new is news: a later one becomes haves of
                // its new pieces, and counts against the flood budget.
                if std::mem::replace(&mut self.announced.bitfield, true) {
                    self.control_message()?;
                    if self.announced.all {
                        return Ok(());
                    }
                    let len = self.decoder_bitfield_len();
                    let mut news = Vec::new();
                    for (i, byte) in bits.iter().enumerate().filter(|(_, b)| **b != 0) {
                        for bit in 0..8u32 {
                            let index = i as u32 * 8 + bit;
                            if byte & (0x80 >> bit) != 0
                                && let Some(piece) = g.piece(index)
                                && self.announced.have(piece, len)
                            {
                                news.push(piece);
                            }
                        }
                    }
                    for piece in news {
                        self.emit(PeerEvent::Have(piece))?;
                    }
                    return Ok(());
                }
                self.announced.summary = true;
                if self.announced.all {
                    return Ok(());
                }
                let known = &mut self.announced.bits;
                if known.is_empty() {
                    known.extend_from_slice(&bits);
                } else {
                    for (k, b) in known.iter_mut().zip(&bits) {
                        *k |= b;
                    }
                }
                self.emit(PeerEvent::Bitfield(bits))
            }
            Message::Request { index, begin, len } => {
                let block = g
                    .request(index, begin, len)
                    .ok_or(PeerError::BadIndex("request"))?;
                if self.links.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_SERVES {
                    return Err(PeerError::RequestFlood);
                }
                self.serves.push(block);
                if self.serves.len() >= MAX_SERVE_BATCH {
                    self.pass_serves();
                }
                Ok(())
            }
            Message::Cancel { index, begin, len } => {
                self.control_message()?;
                // Nothing queued, nothing to cancel: a storm of cancels costs nothing.
                if let Some(block) = g.request(index, begin, len)
                    && self.links.queued.load(Ordering::Relaxed) > 0
                    && self.links.writer.cancel_serve(block, MAX_QUEUED_SERVES)
                        == CancelServe::Overflow
                {
                    return Err(PeerError::Backlog("the peer's cancels"));
                }
                Ok(())
            }
            Message::HashRequest(req) => self.hash_request(req),
            Message::Hashes { req, hashes } => self.hashes(&req, hashes.len()),
            Message::HashReject(_) => {
                // We send no hash requests: nothing to withdraw.
                self.hash_message()?;
                Ok(())
            }
            fast if !self.fast && is_fast_message(&fast) => {
                Err(PeerError::NotNegotiated("a Fast extension message"))
            }
            Message::HaveAll => {
                // Repeats say nothing new, and cost nothing.
                if self.announced.all {
                    return Ok(());
                }
                self.announced.summary = true;
                self.announced.all = true;
                self.announced.bits = Vec::new();
                self.emit(PeerEvent::HaveAll)
            }
            Message::HaveNone => {
                if std::mem::replace(&mut self.announced.summary, true) {
                    return Ok(());
                }
                self.emit(PeerEvent::HaveNone)
            }
            Message::Reject { index, begin, len } => {
                let block = g
                    .aligned_block(index, begin, len)
                    .ok_or(PeerError::BadIndex("reject"))?;
                // Only a request we made can be rejected, once: the rest would only make the
                // session look for other work in vain.
                if self.links.asked.lock().take(&block) {
                    self.emit(PeerEvent::Rejected(block))
                } else {
                    Ok(())
                }
            }
            Message::AllowedFast(i) => {
                let piece = g.piece(i).ok_or(PeerError::BadIndex("allowed fast"))?;
                if self.allowed_fast.len() >= MAX_ALLOWED_FAST || self.allowed_fast.contains(&piece)
                {
                    return Ok(());
                }
                self.allowed_fast.push(piece);
                self.emit(PeerEvent::AllowedFast(piece))
            }
            // A hint we may ignore; still checked.
            Message::Suggest(i) => g.piece(i).map(|_| ()).ok_or(PeerError::BadIndex("suggest")),
        }
    }

    /// Counts one BEP 52 message against the window's budget; an error, too, on a torrent
    /// without v2 files (libtorrent ends such connections too).
    fn hash_message(&mut self) -> Result<&'a dyn Trees, PeerError> {
        let trees = self
            .v2
            .ok_or(PeerError::NotNegotiated("a BEP 52 hash message"))?;
        let now = Instant::now();
        if now.duration_since(self.hash_window.0) >= FLOOD_WINDOW {
            self.hash_window = (now, 0, 0);
        }
        self.hash_window.1 += 1;
        if self.hash_window.1 > MAX_HASH_MESSAGES_PER_WINDOW {
            return Err(PeerError::Flood("hash messages"));
        }
        Ok(trees)
    }

    /// A BEP 52 `hash request`: answered through the writer with `hashes` (from the piece
    /// layer at once, or from a piece's data, which the writer reads) or a `hash reject`
    /// (BEP 52: "Hash requests MUST be answered with either a 'hashes' or 'hash reject'
    /// message"). Asking for what we do not serve is no violation; a flood is.
    fn hash_request(&mut self, req: HashRequest) -> Result<(), PeerError> {
        let trees = self.hash_message()?;
        let reject = HashWork::Send(Message::HashReject(req));
        let work = match trees.file(&req.root) {
            None => reject,
            Some(tree) => match hash_msg::check(&tree, &req) {
                Err(_) => reject,
                Ok(Plan::Layer) => {
                    let upper = self.upper(&tree);
                    HashWork::Send(Message::Hashes {
                        req,
                        hashes: hash_msg::answer_from_layer(&tree, upper, &req),
                    })
                }
                Ok(Plan::Piece { .. }) if self.hash_window.2 >= MAX_PIECE_HASHES_PER_WINDOW => {
                    reject
                }
                Ok(Plan::Piece { piece }) => {
                    self.hash_window.2 += 1;
                    let upper = self.upper(&tree);
                    HashWork::FromPiece(hash_msg::PieceAnswer::new(&tree, upper, &req, piece))
                }
            },
        };
        self.links.writer.hash_work(work);
        Ok(())
    }

    /// The upper layers of `tree`'s file, built at the first request that needs them.
    fn upper(&mut self, tree: &hash_msg::FileTree) -> Option<&Upper> {
        self.uppers
            .entry(*tree.root)
            .or_insert_with(|| Upper::build(tree))
            .as_ref()
    }

    /// A BEP 52 `hashes` message. We send no hash requests, so none answers one of ours: a
    /// well-formed one is read past (libtorrent keeps such hashes if they prove out; we have
    /// every layer already). One that fits no file, or whose count of hashes does not match
    /// its fields, ends the connection, as libtorrent ends it.
    fn hashes(&mut self, req: &HashRequest, count: usize) -> Result<(), PeerError> {
        let trees = self.hash_message()?;
        let tree =
            trees
                .file(&req.root)
                .ok_or(PeerError::BadHashes(hash_msg::BadHashes::Shape(
                    hash_msg::Refusal::UnknownRoot,
                )))?;
        hash_msg::check_shape(&tree, req, count).map_err(PeerError::BadHashes)?;
        Ok(())
    }

    fn decoder_bitfield_len(&self) -> usize {
        self.storage.geometry().piece_count().div_ceil(8) as usize
    }
}

/// What a reader did with bytes from memory (see [`replay_reader`]).
#[derive(Debug)]
#[cfg(any(test, feature = "fuzz"))]
pub(crate) struct Replay {
    /// How it ended: `Ok(())` when the bytes ran out between frames.
    pub result: Result<(), PeerError>,
    /// What it told the session, in order.
    pub events: Vec<PeerEvent>,
    /// What it left its writer: the peer's requests and cancels.
    pub pending: Pending,
}

/// Runs a connection's reader over `src` to its end, as the connection runs it after the
/// handshake, with the session and the writer replaced by a channel and an outbox read
/// afterwards. `asked`: blocks the writer has asked for (a block is written into `storage`
/// only if asked and claimable). The fuzz target and the unit tests drive the connection's own
/// code through this.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn replay_reader(
    src: impl Source,
    storage: &Storage,
    fast: bool,
    asked: Vec<BlockRef>,
) -> Replay {
    replay_reader_v2(src, storage, fast, asked, None)
}

/// [`replay_reader`] on a torrent with v2 files `v2`, whose hash requests it answers.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn replay_reader_v2(
    src: impl Source,
    storage: &Storage,
    fast: bool,
    asked: Vec<BlockRef>,
    v2: Option<&dyn Trees>,
) -> Replay {
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let ending = Arc::new(Ending::default());
    let (outbox, inbox) = outbox::outbox(ending, None, storage.geometry().piece_count());
    let mut remembered = Asked::default();
    remembered.insert(&asked);
    let asked = Mutex::new(remembered);
    let queued = AtomicUsize::new(0);
    let links = Links {
        key: PeerKey(0),
        events: &events_tx,
        writer: &outbox,
        queued: &queued,
        asked: &asked,
    };
    // A small info dictionary, so the fuzz target drives the metadata-serving path too.
    let mut reader = Reader::new(src, storage, b"d6:lengthi1ee", None, fast, links);
    // Peer exchange on, so the fuzz target drives its decoder too.
    reader.pex = true;
    reader.v2 = v2;
    let result = reader.run();
    let mut pending = Pending::default();
    inbox.take(&mut pending);
    Replay {
        result,
        events: events_rx
            .try_iter()
            .filter_map(|input| match input {
                Input::Peer { event, .. } => Some(event),
                _ => None,
            })
            .collect(),
        pending,
    }
}

fn is_fast_message(m: &Message) -> bool {
    matches!(
        m,
        Message::HaveAll
            | Message::HaveNone
            | Message::Reject { .. }
            | Message::Suggest(_)
            | Message::AllowedFast(_)
    )
}

/// A writer's ends: events to the session, the count of the peer's queued requests (shared
/// with the reader), and the blocks asked for (read by the reader).
struct WriterLinks {
    key: PeerKey,
    events: Sender<Input>,
    queued: Arc<AtomicUsize>,
    asked: Arc<Mutex<Asked>>,
}

struct WriterState<W> {
    stream: W,
    links: WriterLinks,
    storage: Arc<Storage>,
    upload_limit: Option<Arc<TokenBucket>>,
    /// BEP 6: every request gets exactly one answer (a piece or a reject).
    fast: bool,
    /// BEP 10 handshake to send after the first message, if negotiated.
    ext_handshake: Option<Vec<u8>>,
    requests_while_choked: u32,
    meta: Arc<crate::metainfo::Metainfo>,
    /// The piece uploads are served from: read whole, hash-checked (see `load_verified`).
    cached_piece: Option<PieceIndex>,
    cache: Vec<u8>,
    /// Pieces found not to match their hash on disk: rejected at once rather than re-read
    /// and re-hashed for every request.
    damaged: HashSet<PieceIndex>,
    /// What the peer was last told.
    choking: bool,
    interested: bool,
    /// The first message has gone out; nothing else may go before it.
    introduced: bool,
    /// A connection of the metadata phase, which said `have none` already (see [`Handover`]):
    /// the intro goes out as haves.
    handed_over: bool,
    /// BEP 5: our DHT port, sent after the intro (both sides set the DHT bit).
    dht_port: Option<u16>,
    /// Pieces we have told this peer about; we serve only those.
    have: Vec<bool>,
    serves: VecDeque<BlockRef>,
    /// Work taken from the inbox; kept so its lists' capacity is reused.
    work: Pending,
    /// Blocks waiting in the next write: each goes, straight from `cache`, after the first
    /// `at` bytes of `out` (the messages before it, its own header included). `cache` does
    /// not change while this is non-empty.
    blocks: Vec<QueuedBlock>,
    /// Bytes of blocks written and not yet reported to the session.
    unreported: u32,
    out: Vec<u8>,
    timeouts: Timeouts,
    /// The per-call write timeout last set on the stream.
    call_limit: Option<Duration>,
}

impl<W: SendHalf> WriterState<W> {
    /// `ext_handshake`: our BEP 10 handshake, when both sides support the extension protocol.
    fn new(
        ctx: &Context,
        stream: W,
        links: WriterLinks,
        fast: bool,
        ext_handshake: Option<Vec<u8>>,
        timeouts: &Timeouts,
    ) -> WriterState<W> {
        WriterState {
            stream,
            links,
            storage: Arc::clone(&ctx.storage),
            upload_limit: ctx.upload_limit.clone(),
            fast,
            ext_handshake,
            requests_while_choked: 0,
            meta: Arc::clone(&ctx.meta),
            cached_piece: None,
            cache: Vec::new(),
            damaged: HashSet::new(),
            choking: true,
            interested: false,
            introduced: false,
            handed_over: false,
            dht_port: None,
            have: vec![false; ctx.geometry.piece_count() as usize],
            serves: VecDeque::new(),
            work: Pending::default(),
            out: Vec::with_capacity(4096),
            blocks: Vec::with_capacity(MAX_SERVES_PER_WRITE),
            unreported: 0,
            timeouts: *timeouts,
            call_limit: None,
        }
    }

    /// Sends until told to stop (`Ok`) or the peer fails us.
    fn run(&mut self, inbox: &Inbox) -> Result<(), PeerError> {
        loop {
            let mut look = inbox.rung();
            if !look && self.serves.is_empty() {
                let wait = if self.unreported > 0 {
                    REPORT_DELAY
                } else {
                    KEEPALIVE_INTERVAL
                };
                match inbox.wait(wait) {
                    Wake::Rung => look = true,
                    Wake::TimedOut if self.unreported > 0 => self.report(),
                    Wake::TimedOut => wire::encode(&Message::KeepAlive, &mut self.out),
                    Wake::Closed => return self.flush().map_err(io_err(SENDING)),
                }
            }
            if look && !self.take(inbox) {
                return self.flush().map_err(io_err(SENDING));
            }
            if self.requests_while_choked > MAX_REQUESTS_WHILE_CHOKED {
                return Err(PeerError::RequestsWhileChoked);
            }
            // Serve a few blocks per round so new commands (cancel, choke) are seen promptly.
            // Under an upload limit each block is a write of its own anyway, and waits for
            // tokens: look at the commands after every one.
            let round = if self.upload_limit.is_some() {
                1
            } else {
                MAX_SERVES_PER_WRITE
            };
            for _ in 0..round {
                let Some(block) = self.serves.pop_front() else {
                    break;
                };
                self.links.queued.fetch_sub(1, Ordering::Relaxed);
                self.serve(block).map_err(io_err(SENDING))?;
            }
            self.flush().map_err(io_err(SENDING))?;
        }
    }

    /// Applies what is pending; false means stop. Until the intro is out, nothing else is
    /// looked at (the peer's early requests wait in the outbox).
    fn take(&mut self, inbox: &Inbox) -> bool {
        if !self.introduced {
            match inbox.take_intro() {
                (Some(summary), _) => {
                    self.intro(summary);
                    self.introduced = true;
                }
                (None, shutdown) => return !shutdown,
            }
        }
        let mut work = std::mem::take(&mut self.work);
        inbox.take(&mut work);
        self.apply(&work);
        let go_on = !work.shutdown;
        self.work = work;
        go_on
    }

    /// The first message after the handshake: have all / have none / bitfield, then our
    /// extended handshake.
    fn intro(&mut self, summary: HaveSummary) {
        if self.handed_over {
            let bits = match summary {
                HaveSummary::None => Vec::new(),
                HaveSummary::All(bits) | HaveSummary::Some(bits) => bits,
            };
            for i in 0..self.have.len() {
                if bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0) {
                    self.have[i] = true;
                    wire::encode(&Message::Have(i as u32), &mut self.out);
                }
            }
            // An update of our extension handshake, now with `metadata_size`.
            self.send_ext_handshake();
            return;
        }
        let bits = match summary {
            HaveSummary::All(bits) => {
                self.have.fill(true);
                if self.fast {
                    wire::encode(&Message::HaveAll, &mut self.out);
                    None
                } else {
                    Some(bits)
                }
            }
            HaveSummary::None => {
                if self.fast {
                    wire::encode(&Message::HaveNone, &mut self.out);
                }
                None
            }
            HaveSummary::Some(bits) => Some(bits),
        };
        if let Some(bits) = bits {
            for (i, h) in self.have.iter_mut().enumerate() {
                *h = bits.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0);
            }
            wire::encode(&Message::Bitfield(bits), &mut self.out);
        }
        self.send_ext_handshake();
    }

    /// Our BEP 10 handshake, once, if negotiated; then our BEP 5 DHT port, if both sides
    /// run a DHT node.
    fn send_ext_handshake(&mut self) {
        if let Some(payload) = self.ext_handshake.take() {
            wire::encode(
                &Message::Extended {
                    id: extension::HANDSHAKE_ID,
                    payload,
                },
                &mut self.out,
            );
        }
        if let Some(port) = self.dht_port.take() {
            wire::encode(&Message::Port(port), &mut self.out);
        }
    }

    /// Applies one batch of pending work, in an order that keeps every meaning: our choke
    /// before the peer's requests it refuses, haves before the requests they allow, cancels
    /// before the requests that may ask the same block again.
    fn apply(&mut self, work: &Pending) {
        if let Some(choke) = work.choke
            && choke != self.choking
        {
            self.set_choke(choke);
        }
        if let Some(yes) = work.interested
            && yes != self.interested
        {
            self.interested = yes;
            let msg = if yes {
                Message::Interested
            } else {
                Message::NotInterested
            };
            wire::encode(&msg, &mut self.out);
        }
        for &p in &work.haves {
            self.have[p.usize()] = true;
            wire::encode(&Message::Have(p.get()), &mut self.out);
        }
        for &b in &work.cancels {
            wire::encode(&request_msg(b, true), &mut self.out);
        }
        if !work.requests.is_empty() {
            for &b in &work.requests {
                wire::encode(&request_msg(b, false), &mut self.out);
            }
            self.links.asked.lock().insert(&work.requests);
        }
        for (id, payload) in &work.extended {
            wire::encode(
                &Message::Extended {
                    id: *id,
                    payload: payload.clone(),
                },
                &mut self.out,
            );
        }
        if let Some((id, payload)) = &work.pex {
            wire::encode(
                &Message::Extended {
                    id: *id,
                    payload: payload.clone(),
                },
                &mut self.out,
            );
        }
        for h in &work.hashes {
            self.answer_hashes(h);
        }
        self.cancel_serves(&work.cancel_serves);
        for (i, &b) in work.serves.iter().enumerate() {
            let cancelled = work.cancel_serves.get(&b).is_some_and(|&after| i < after);
            self.add_serve(b, cancelled);
        }
    }

    fn set_choke(&mut self, choke: bool) {
        self.choking = choke;
        let msg = if choke {
            Message::Choke
        } else {
            Message::Unchoke
        };
        wire::encode(&msg, &mut self.out);
        if choke {
            // BEP 3: a choke discards the peer's pending requests; BEP 6 peers are told so,
            // one reject each.
            self.requests_while_choked = 0;
            self.links
                .queued
                .fetch_sub(self.serves.len(), Ordering::Relaxed);
            for b in std::mem::take(&mut self.serves) {
                if self.fast {
                    wire::encode(&reject_msg(b), &mut self.out);
                }
            }
            // A choked peer gets nothing more for a while: free the cache.
            self.cached_piece = None;
            self.cache = Vec::new();
        }
    }

    /// One answer to the peer's hash requests. One from a piece's data needs a piece we have
    /// announced to this peer, read and found to hash to the torrent's node; otherwise the
    /// request is rejected. Neither choking nor cancels touch these (BEP 52 lets hash
    /// requests be sent whatever the choke state).
    fn answer_hashes(&mut self, work: &HashWork) {
        let answer = match work {
            HashWork::Send(msg) => {
                wire::encode(msg, &mut self.out);
                return;
            }
            HashWork::FromPiece(a) => {
                let g = self.storage.geometry();
                let len = a.len as usize;
                let hashes = g
                    .piece(a.piece)
                    .filter(|p| self.have[p.usize()])
                    .and_then(|p| {
                        if self.cached_piece == Some(p) && self.cache.len() >= len {
                            return a.finish(&self.cache[..len]);
                        }
                        let mut data = vec![0; len];
                        self.storage.read(g.piece_offset(p), &mut data).ok()?;
                        a.finish(&data)
                    });
                match hashes {
                    Some(hashes) => Message::Hashes { req: a.req, hashes },
                    None => Message::HashReject(a.req),
                }
            }
        };
        wire::encode(&answer, &mut self.out);
    }

    /// The peer's cancels, on the requests already queued here.
    fn cancel_serves(&mut self, cancels: &HashMap<BlockRef, usize>) {
        if cancels.is_empty() || self.serves.is_empty() {
            return;
        }
        let (out, fast, queued) = (&mut self.out, self.fast, &self.links.queued);
        self.serves.retain(|s| {
            let keep = !cancels.contains_key(s);
            if !keep {
                queued.fetch_sub(1, Ordering::Relaxed);
                if fast {
                    wire::encode(&reject_msg(*s), out);
                }
            }
            keep
        });
    }

    /// One request from the peer: queued, or refused (cancelled, choked, a piece we have not
    /// announced) with a reject under BEP 6.
    fn add_serve(&mut self, b: BlockRef, cancelled: bool) {
        if !cancelled && !self.choking && self.have[b.piece.usize()] {
            self.serves.push_back(b);
            return;
        }
        self.links.queued.fetch_sub(1, Ordering::Relaxed);
        if self.choking && !cancelled {
            self.requests_while_choked += 1;
        }
        if self.fast {
            wire::encode(&reject_msg(b), &mut self.out);
        }
    }

    /// Loads `piece` into the serve cache and checks it against its hash. Data on disk can
    /// change under a seeder (another program truncating or rewriting the file); a piece that
    /// no longer matches is never sent.
    ///
    /// Why a copy, when the kernel could send straight from the map: the bytes must be
    /// captured before the files are checked for changes. A write changes the file's mtime
    /// before its data, so bytes read first and found unchanged afterwards are good; bytes
    /// sent from the map would be read by the kernel later, unchecked.
    fn load_verified(&mut self, piece: PieceIndex) -> bool {
        if self.cached_piece == Some(piece) {
            return true;
        }
        if self.damaged.contains(&piece) {
            return false;
        }
        debug_assert!(self.blocks.is_empty(), "queued blocks point into the cache");
        self.cached_piece = None;
        let g = self.storage.geometry();
        let len = g.piece_len(piece) as usize;
        self.cache.resize(len, 0);
        // Files unchanged since all the data was verified need no second hash (it was a
        // third of a seeder's CPU); a file another program touched is checked piece by piece.
        let ok = self
            .storage
            .read(g.piece_offset(piece), &mut self.cache[..len])
            .is_ok()
            && (self.storage.unchanged(piece) || self.meta.piece_ok(piece, &self.cache[..len]));
        if ok {
            self.cached_piece = Some(piece);
        } else {
            self.damaged.insert(piece);
        }
        ok
    }

    fn serve(&mut self, block: BlockRef) -> io::Result<()> {
        if self.cached_piece != Some(block.piece) {
            // Queued blocks point into the cache: send them before it is refilled.
            self.flush()?;
        }
        if !self.load_verified(block.piece) {
            if self.fast {
                wire::encode(&reject_msg(block), &mut self.out);
            }
            let _ = self.links.events.send(Input::Peer {
                key: self.links.key,
                event: PeerEvent::CorruptOnDisk(block.piece),
            });
            return Ok(());
        }
        if let Some(limit) = self.upload_limit.clone() {
            // Send what is pending first, so the wait does not hold back other messages, and
            // count it (a seed ratio is checked against exact counts when uploads are slow).
            self.flush()?;
            self.report();
            limit.acquire(u64::from(block.len));
        }
        wire::encode_piece_header(block.piece.get(), block.offset, block.len, &mut self.out);
        let start = block.offset as usize;
        self.blocks.push(QueuedBlock {
            at: self.out.len(),
            data: start..start + block.len as usize,
        });
        Ok(())
    }

    /// Writes what is queued: messages from `out` with the queued blocks between them, taken
    /// from the cache without copying, in one vectored write (more only when the socket
    /// takes it in parts). The whole flush has one deadline (see [`FLUSH_DEADLINE`]).
    fn flush(&mut self) -> io::Result<()> {
        if self.blocks.is_empty() && self.out.is_empty() {
            return Ok(());
        }
        let mut iov = Vec::with_capacity(2 * self.blocks.len() + 1);
        let mut from = 0;
        for b in &self.blocks {
            iov.push(IoSlice::new(&self.out[from..b.at]));
            iov.push(IoSlice::new(&self.cache[b.data.clone()]));
            from = b.at;
        }
        iov.push(IoSlice::new(&self.out[from..]));
        iov.retain(|s| !s.is_empty());
        let total: usize = iov.iter().map(|s| s.len()).sum();
        let deadline = Instant::now() + self.timeouts.flush_deadline(total);
        let mut rest = &mut iov[..];
        while !rest.is_empty() {
            // Each call may wait what is left of the flush's time (capped at the base
            // deadline). The limit is set again only when it is off by more than a twentieth
            // of that, so quick flushes, which all start with the full base, cost no extra
            // system call.
            let limit = left(deadline)?.min(self.timeouts.flush);
            let slack = self.timeouts.flush / 20;
            if self
                .call_limit
                .is_none_or(|set| set.abs_diff(limit) > slack)
            {
                self.stream.limit_calls(limit)?;
                self.call_limit = Some(limit);
            }
            match self.stream.write_vectored(rest) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let sent: usize = self.blocks.iter().map(|b| b.data.len()).sum();
        self.blocks.clear();
        self.out.clear();
        self.unreported += sent as u32;
        if self.unreported >= REPORT_EVERY {
            self.report();
        }
        Ok(())
    }

    fn report(&mut self) {
        if self.unreported > 0 {
            let _ = self.links.events.send(Input::Peer {
                key: self.links.key,
                event: PeerEvent::Uploaded(std::mem::take(&mut self.unreported)),
            });
        }
    }
}

/// A block waiting in a writer's next write (see `WriterState::blocks`).
struct QueuedBlock {
    at: usize,
    data: std::ops::Range<usize>,
}

fn reject_msg(b: BlockRef) -> Message {
    Message::Reject {
        index: b.piece.get(),
        begin: b.offset,
        len: b.len,
    }
}

fn request_msg(b: BlockRef, cancel: bool) -> Message {
    let (index, begin, len) = (b.piece.get(), b.offset, b.len);
    if cancel {
        Message::Cancel { index, begin, len }
    } else {
        Message::Request { index, begin, len }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::ops::Range;

    use crossbeam_channel::Receiver;

    use super::*;
    use crate::geometry::BLOCK_LEN;
    use crate::metainfo::Metainfo;
    use crate::outbox::MAX_PENDING_BLOCKS;
    use crate::storage::Layout;
    use crate::wire::Frame;
    use sha1::{Digest, Sha1};

    const PIECE_LEN: u32 = 2 * BLOCK_LEN;
    /// Three pieces; the last is one full block and one of 1000 bytes.
    const TOTAL: u64 = 2 * PIECE_LEN as u64 + BLOCK_LEN as u64 + 1000;
    const DEADLINE: Duration = Duration::from_secs(60);
    const THEIR_ID: [u8; 20] = *b"-XX0000-their-peer-0";

    struct Fixture {
        _dir: tempfile::TempDir,
        ctx: Arc<Context>,
        data: Vec<u8>,
    }

    impl Fixture {
        /// A three-piece torrent in a temp dir; `filled`: all its data is on disk.
        fn new(filled: bool) -> Fixture {
            let data: Vec<u8> = (0..TOTAL).map(|i| (i * 31 % 251) as u8).collect();
            let mut torrent = format!(
                "d4:infod6:lengthi{TOTAL}e4:name1:t12:piece lengthi{PIECE_LEN}e6:pieces{}:",
                data.chunks(PIECE_LEN as usize).len() * 20
            )
            .into_bytes();
            for piece in data.chunks(PIECE_LEN as usize) {
                torrent.extend_from_slice(&Sha1::digest(piece));
            }
            torrent.extend_from_slice(b"ee");
            let meta = Metainfo::from_bytes(&torrent).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let layout = Layout::in_dir(dir.path(), &meta);
            let (storage, _) = Storage::create(&layout, &meta.geometry).unwrap();
            let ctx = Context {
                info_hash: meta.info_hash,
                our_id: *b"-BF0000-ourselves-00",
                geometry: meta.geometry.clone(),
                meta: Arc::new(meta),
                storage,
                bind: None,
                listen_port: 6881,
                upload_limit: None,
                download_limit: None,
                pex: true,
                dht_port: None,
            };
            let f = Fixture {
                _dir: dir,
                ctx: Arc::new(ctx),
                data,
            };
            if filled {
                let g = &f.ctx.geometry;
                for b in g.pieces().flat_map(|p| g.blocks(p)) {
                    let claim = f.ctx.storage.claim(b).unwrap();
                    claim.fill(&mut &f.data[f.range(b)]).unwrap();
                }
            }
            f
        }

        fn block(&self, piece: u32, n: u32) -> BlockRef {
            let g = &self.ctx.geometry;
            g.block(g.piece(piece).unwrap(), n).unwrap()
        }

        fn range(&self, b: BlockRef) -> Range<usize> {
            let start = (self.ctx.geometry.piece_offset(b.piece) + u64::from(b.offset)) as usize;
            start..start + b.len as usize
        }

        fn stored(&self, b: BlockRef) -> Vec<u8> {
            let mut buf = vec![0; b.len as usize];
            self.ctx.storage.read_block(b, &mut buf).unwrap();
            buf
        }

        /// The `piece` frame carrying block `b`'s true data.
        fn piece_frame(&self, b: BlockRef) -> Vec<u8> {
            let mut v = Vec::new();
            wire::encode_piece_header(b.piece.get(), b.offset, b.len, &mut v);
            v.extend_from_slice(&self.data[self.range(b)]);
            v
        }

        fn replay(&self, bytes: &[u8], fast: bool, asked: Vec<BlockRef>) -> Replay {
            replay_reader(bytes, &self.ctx.storage, fast, asked)
        }
    }

    fn frame(msg: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        wire::encode(msg, &mut v);
        v
    }

    fn frames(msgs: &[Message]) -> Vec<u8> {
        msgs.iter().flat_map(frame).collect()
    }

    fn request(b: BlockRef) -> Message {
        request_msg(b, false)
    }

    /// Hands the stream out in the given parts, one per read call.
    struct Parts(VecDeque<Vec<u8>>);

    impl Parts {
        fn bytewise(bytes: &[u8]) -> Parts {
            Parts(bytes.iter().map(|&b| vec![b]).collect())
        }
    }

    impl Read for Parts {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(front) = self.0.front_mut() else {
                return Ok(0);
            };
            let n = buf.len().min(front.len());
            buf[..n].copy_from_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                self.0.pop_front();
            }
            Ok(n)
        }
    }

    impl Source for Parts {}

    // ---------------------------------------------------------------------------------------
    // reader
    // ---------------------------------------------------------------------------------------

    #[test]
    fn frames_split_into_single_bytes_are_read_whole() {
        let f = Fixture::new(false);
        let wanted = f.block(0, 0);
        let mut bytes = frame(&Message::Have(1));
        bytes.extend(f.piece_frame(wanted));
        bytes.extend(frame(&Message::Bitfield(vec![0b1110_0000])));
        let r = replay_reader(Parts::bytewise(&bytes), &f.ctx.storage, false, vec![wanted]);
        assert!(r.result.is_ok(), "{:?}", r.result);
        let p1 = f.ctx.geometry.piece(1).unwrap();
        assert!(matches!(
            r.events[..],
            [
                PeerEvent::Have(p),
                PeerEvent::Block { block, written: true },
                PeerEvent::Bitfield(ref bits),
            ] if p == p1 && block == wanted && bits == &[0b1110_0000]
        ));
        assert_eq!(f.stored(wanted), f.data[f.range(wanted)]);
    }

    #[test]
    fn keep_alives_are_skipped() {
        let f = Fixture::new(false);
        let bytes = frames(&[
            Message::KeepAlive,
            Message::KeepAlive,
            Message::Unchoke,
            Message::KeepAlive,
        ]);
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok());
        assert!(
            matches!(r.events[..], [PeerEvent::Unchoke]),
            "{:?}",
            r.events
        );
    }

    #[test]
    fn an_oversize_frame_is_refused_before_its_payload() {
        let f = Fixture::new(false);
        for len in [wire::MAX_FRAME + 1, u32::MAX] {
            // Only the length prefix: nothing after it is read or allocated for.
            let r = f.replay(&len.to_be_bytes(), false, Vec::new());
            let err = r.result.unwrap_err();
            assert!(
                matches!(err, PeerError::Protocol(wire::Error::FrameTooLong { len: l }) if l == len)
            );
            assert!(err.is_violation() && !err.may_redial());
        }
    }

    /// How the reader refuses `bytes` (with the Fast extension on), checked to be a violation.
    fn refusal(f: &Fixture, bytes: &[u8]) -> PeerError {
        let err = f.replay(bytes, true, Vec::new()).result.unwrap_err();
        assert!(err.is_violation() && !err.may_redial(), "{err:?}");
        err
    }

    #[test]
    fn wrong_lengths_and_indices_are_violations() {
        use wire::Error::{BadBitfield, BadLength};
        let f = Fixture::new(false);
        let short_have = [0, 0, 0, 4, wire::ID_HAVE, 0, 0, 0];
        let err = refusal(&f, &short_have);
        assert!(matches!(
            err,
            PeerError::Protocol(BadLength { id: 4, len: 4 })
        ));
        let short_request = [&[0, 0, 0, 12, wire::ID_REQUEST][..], &[0; 11]].concat();
        let err = refusal(&f, &short_request);
        assert!(matches!(
            err,
            PeerError::Protocol(BadLength { id: 6, len: 12 })
        ));
        let empty_piece = [&[0, 0, 0, 9, wire::ID_PIECE][..], &[0; 8]].concat();
        let err = refusal(&f, &empty_piece);
        assert!(matches!(
            err,
            PeerError::Protocol(BadLength { id: 7, len: 9 })
        ));
        let long_choke = [0, 0, 0, 2, wire::ID_CHOKE, 0];
        let err = refusal(&f, &long_choke);
        assert!(matches!(
            err,
            PeerError::Protocol(BadLength { id: 0, len: 2 })
        ));
        for bits in [vec![0, 0], vec![0b0001_0000]] {
            let err = refusal(&f, &frame(&Message::Bitfield(bits)));
            assert!(matches!(err, PeerError::Protocol(BadBitfield)), "{err:?}");
        }

        let err = refusal(&f, &frame(&Message::Have(3)));
        assert!(matches!(err, PeerError::BadIndex("have")), "{err:?}");
        let mut unaligned = Vec::new();
        wire::encode_piece_header(0, 1, BLOCK_LEN, &mut unaligned);
        unaligned.extend(vec![0; BLOCK_LEN as usize]);
        let err = refusal(&f, &unaligned);
        assert!(matches!(err, PeerError::BadIndex("block")), "{err:?}");
        // A request past the end of the last (short) piece.
        let last = f.block(2, 1);
        let past = Message::Request {
            index: 2,
            begin: last.offset,
            len: last.len + 1,
        };
        let err = refusal(&f, &frame(&past));
        assert!(matches!(err, PeerError::BadIndex("request")), "{err:?}");
        let reject = Message::Reject {
            index: 0,
            begin: 0,
            len: 100,
        };
        let err = refusal(&f, &frame(&reject));
        assert!(matches!(err, PeerError::BadIndex("reject")), "{err:?}");

        // Fast extension messages need the Fast bit from both sides.
        let have_all = frame(&Message::HaveAll);
        let err = f.replay(&have_all, false, Vec::new()).result.unwrap_err();
        assert!(matches!(err, PeerError::NotNegotiated(_)) && err.is_violation());
        assert!(f.replay(&have_all, true, Vec::new()).result.is_ok());
    }

    #[test]
    fn a_frame_cut_off_is_a_failure_and_a_hang_up_between_frames_is_clean() {
        let f = Fixture::new(false);
        let mut bytes = frame(&Message::Have(0));
        assert!(f.replay(&bytes, false, Vec::new()).result.is_ok());
        assert!(f.replay(&[], false, Vec::new()).result.is_ok());
        bytes.pop();
        let err = f.replay(&bytes, false, Vec::new()).result.unwrap_err();
        assert!(
            matches!(&err, PeerError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
        assert!(!err.is_violation() && err.may_redial());
    }

    #[test]
    fn blocks_not_asked_for_are_read_past_not_written() {
        let f = Fixture::new(false);
        let asked = f.block(0, 0);
        let unasked = f.block(0, 1);
        let mut bytes = f.piece_frame(unasked);
        bytes.extend(f.piece_frame(asked));
        // Asked once, so written once: a second copy is dropped.
        bytes.extend(f.piece_frame(asked));
        bytes.extend(frame(&Message::Have(2)));
        let r = f.replay(&bytes, false, vec![asked]);
        assert!(r.result.is_ok(), "{:?}", r.result);
        let written: Vec<_> = r
            .events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Block { block, written } => Some((*block, *written)),
                _ => None,
            })
            .collect();
        assert_eq!(written, [(unasked, false), (asked, true), (asked, false)]);
        assert!(matches!(r.events.last(), Some(PeerEvent::Have(_))));
        assert!(f.ctx.storage.claim(unasked).is_some(), "still free");
        assert_eq!(f.stored(asked), f.data[f.range(asked)]);
    }

    #[test]
    fn requests_reach_the_writer_in_order_and_cancels_after_their_request() {
        let f = Fixture::new(false);
        let [a, b, c, d, e] = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)].map(|(p, n)| f.block(p, n));
        let parts = Parts(VecDeque::from([
            frames(&[request(a), request(b), request(c)]),
            frames(&[request(d), request_msg(d, true)]),
            frames(&[request(e)]),
        ]));
        let r = replay_reader(parts, &f.ctx.storage, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert_eq!(r.pending.serves, [a, b, c, d, e]);
        // The cancel covers the four requests before it, not a later one for the same block.
        assert_eq!(r.pending.cancel_serves, HashMap::from([(d, 4)]));
    }

    #[test]
    fn a_request_flood_is_a_violation() {
        let f = Fixture::new(false);
        let one = frame(&request(f.block(1, 0)));
        let r = f.replay(&one.repeat(MAX_QUEUED_SERVES + 1), false, Vec::new());
        assert!(
            matches!(r.result, Err(PeerError::RequestFlood)),
            "{:?}",
            r.result
        );
        let passed = r.pending.serves.len();
        // The batch in hand when the flood was seen is dropped with the connection.
        assert!(passed > 0 && passed <= MAX_QUEUED_SERVES, "{passed}");
    }

    /// Read-only storage of `pieces` pieces of two blocks, no file behind it: enough for a
    /// reader that writes nothing.
    fn bare_storage(pieces: u32) -> Storage {
        let g = Geometry::new(
            2 * BLOCK_LEN,
            &[u64::from(pieces) * u64::from(2 * BLOCK_LEN)],
            u64::from(pieces),
        )
        .unwrap();
        let layout = Layout {
            root: std::path::PathBuf::from("/nonexistent/bitfetch-peer-test"),
            files: vec![std::path::PathBuf::from("f")],
            pad: Vec::new(),
        };
        Storage::open_existing(&layout, &g).unwrap()
    }

    fn block_of(storage: &Storage, piece: u32, n: u32) -> BlockRef {
        let g = storage.geometry();
        g.block(g.piece(piece).unwrap(), n).unwrap()
    }

    #[test]
    fn repeated_haves_and_have_alls_cost_the_session_nothing() {
        let f = Fixture::new(false);
        let p1 = f.ctx.geometry.piece(1).unwrap();
        // Haves: each piece once, also when a bitfield already told it.
        let bytes = frames(&[
            Message::Have(1),
            Message::Have(1),
            Message::Bitfield(vec![0b1100_0000]),
            Message::Have(0),
            Message::Have(1),
            Message::Have(2),
        ]);
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            matches!(
                r.events[..],
                [PeerEvent::Have(a), PeerEvent::Bitfield(_), PeerEvent::Have(c)]
                    if a == p1 && c.get() == 2
            ),
            "{:?}",
            r.events
        );
        // After have all, no have is news.
        let mut bytes = frame(&Message::HaveAll);
        bytes.extend(frame(&Message::Have(0)).repeat(10_000));
        let r = f.replay(&bytes, true, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            matches!(r.events[..], [PeerEvent::HaveAll]),
            "{:?}",
            r.events
        );
    }

    #[test]
    fn repeated_summaries_pass_on_only_news() {
        use Message::{Bitfield, HaveAll, HaveNone};
        let f = Fixture::new(false);
        let bits = || Bitfield(vec![0b1010_0000]);
        // aria2 sends its bitfield again: the same one says nothing, a fuller one its new
        // pieces as haves.
        let r = f.replay(&frames(&[bits(), bits()]), true, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert_eq!(r.events.len(), 1, "the first is told");
        let more = Bitfield(vec![0b1110_0000]);
        let r = f.replay(&frames(&[bits(), more]), true, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            matches!(r.events[..], [PeerEvent::Bitfield(_), PeerEvent::Have(p)] if p.get() == 1),
            "{:?}",
            r.events
        );
        // Repeats that carry nothing new are dropped: the session hears the first only.
        for (twice, told) in [
            (vec![HaveAll, HaveAll, HaveAll], 1),
            (vec![HaveAll, bits()], 1),
            (vec![HaveAll, HaveNone], 1),
            (vec![HaveNone, HaveNone], 1),
            (vec![bits(), HaveNone], 1),
            // aria2 sends a bitfield after have none: news, passed on.
            (vec![HaveNone, bits()], 2),
            (vec![bits(), HaveAll], 2),
        ] {
            let r = f.replay(&frames(&twice), true, Vec::new());
            assert!(r.result.is_ok(), "{twice:?}: {:?}", r.result);
            assert_eq!(r.events.len(), told, "{twice:?}");
        }
        // A late first bitfield, after haves, is merged (aria2 sends one).
        let r = f.replay(&frames(&[Message::Have(2), bits()]), false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
    }

    #[test]
    fn choke_and_interest_flips_reach_the_session_as_their_outcome() {
        let f = Fixture::new(false);
        let flips = frames(&[
            Message::Unchoke,
            Message::Interested,
            Message::Choke,
            Message::NotInterested,
        ]);
        // Within the flood budget (4 messages a round).
        let count = (MAX_CONTROL_PER_WINDOW as usize - 2) / 4;
        let mut bytes = flips.repeat(count);
        bytes.extend(frames(&[Message::Unchoke, Message::Interested]));
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        // The reader reads at most a few hundred bytes at a time: at most a few events per
        // read reach the session, not one per message.
        let reads = bytes.len() / 512 + 1;
        assert!(r.events.len() <= 4 * reads, "{} events", r.events.len());
        assert!(r.events.len() < 4 * count / 10);
        let last_choke = r
            .events
            .iter()
            .rev()
            .find(|e| matches!(e, PeerEvent::Choke | PeerEvent::Unchoke));
        assert!(
            matches!(last_choke, Some(PeerEvent::Unchoke)),
            "{:?}",
            r.events
        );
        assert!(matches!(r.events.last(), Some(PeerEvent::Interested)));

        // Repeats are not news at all; the first choke is what we assumed already.
        let same = frames(&[Message::Choke, Message::Interested]).repeat(5_000);
        let r = f.replay(&same, false, Vec::new());
        assert!(
            matches!(r.events[..], [PeerEvent::Interested]),
            "{:?}",
            r.events
        );

        // Order with other events is kept: the unchoke comes before the have that follows.
        let r = f.replay(
            &frames(&[Message::Unchoke, Message::Have(0)]),
            false,
            Vec::new(),
        );
        assert!(matches!(
            r.events[..],
            [PeerEvent::Unchoke, PeerEvent::Have(_)]
        ));
    }

    #[test]
    fn only_rejects_of_our_own_requests_pass_and_once_each() {
        let f = Fixture::new(false);
        let (ours, other) = (f.block(0, 0), f.block(1, 0));
        let reject = |b: BlockRef| reject_msg(b);
        let mut bytes = frame(&reject(other)).repeat(1000);
        bytes.extend(frame(&reject(ours)).repeat(1000));
        let r = f.replay(&bytes, true, vec![ours]);
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            matches!(r.events[..], [PeerEvent::Rejected(b)] if b == ours),
            "{:?}",
            r.events
        );
    }

    #[test]
    fn allowed_fast_pieces_are_passed_once_each_and_a_few_at_most() {
        let storage = bare_storage(1000);
        let mut bytes = frame(&Message::AllowedFast(7)).repeat(100);
        for i in 0..1000 {
            bytes.extend(frame(&Message::AllowedFast(i)));
        }
        let r = replay_reader(&bytes[..], &storage, true, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert_eq!(r.events.len(), MAX_ALLOWED_FAST);
        let pieces: HashSet<u32> = r
            .events
            .iter()
            .map(|e| match e {
                PeerEvent::AllowedFast(p) => p.get(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pieces.len(), MAX_ALLOWED_FAST, "no piece twice");
    }

    #[test]
    fn a_cancel_storm_costs_nothing_without_requests_and_is_capped_with_them() {
        let storage = bare_storage(4096);
        let cancels: Vec<u8> = (0..4096)
            .flat_map(|i| (0..2).map(move |n| (i, n)))
            .flat_map(|(i, n)| frame(&request_msg(block_of(&storage, i, n), true)))
            .collect();
        // Nothing requested: nothing can be cancelled, nothing is kept (within the budget).
        let within = &cancels[..REQUEST_FRAME_LEN * MAX_CONTROL_PER_WINDOW as usize];
        let r = replay_reader(within, &storage, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(r.pending.cancel_serves.is_empty());
        // One request waiting behind a writer that does not take its work: distinct cancels
        // fill a bounded set, then the connection ends.
        let mut bytes = frame(&request(block_of(&storage, 0, 0)));
        bytes.extend(&cancels);
        let r = replay_reader(&bytes[..], &storage, false, Vec::new());
        assert!(
            matches!(r.result, Err(PeerError::Backlog(_))),
            "{:?}",
            r.result
        );
        assert_eq!(r.pending.cancel_serves.len(), MAX_QUEUED_SERVES);
        // The same cancel repeated costs one entry.
        let mut bytes = frame(&request(block_of(&storage, 0, 0)));
        let same = frame(&request_msg(block_of(&storage, 9, 1), true));
        bytes.extend(same.repeat(MAX_CONTROL_PER_WINDOW as usize - 1));
        let r = replay_reader(&bytes[..], &storage, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert_eq!(r.pending.cancel_serves.len(), 1);
        // Past the budget the storm is a flood, and the connection ends.
        let r = replay_reader(&cancels[..], &storage, false, Vec::new());
        assert!(
            matches!(r.result, Err(PeerError::Flood(_))),
            "{:?}",
            r.result
        );
    }

    #[test]
    fn pex_messages_are_passed_on_at_most_once_per_interval() {
        let f = Fixture::new(false);
        let pex_msg = |last: u8| {
            let msg = pex::Message {
                added: vec![(SocketAddr::from(([127, 0, 0, last], 6881)), pex::flag::SEED)],
                dropped: vec![],
            };
            frame(&Message::Extended {
                id: extension::UT_PEX_ID,
                payload: pex::encode(&msg),
            })
        };
        let mut bytes = pex_msg(2);
        // Too soon: read past, unparsed, however many.
        for i in 0..100 {
            bytes.extend(pex_msg(3 + i));
        }
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        let told: Vec<_> = r
            .events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Pex { added, .. } => Some(added.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            told,
            vec![vec![(
                SocketAddr::from(([127, 0, 0, 2], 6881)),
                pex::flag::SEED
            )]]
        );
        // Malformed or oversize messages are ignored, not fatal; none is passed on.
        for payload in [
            b"le".to_vec(),
            b"d5:added5:abcdee".to_vec(),
            vec![b'l'; 5000],
            [
                b"d5:added".as_slice(),
                &vec![b'x'; pex::MAX_MESSAGE_LEN + 10],
            ]
            .concat(),
        ] {
            let bytes = frame(&Message::Extended {
                id: extension::UT_PEX_ID,
                payload,
            });
            let r = f.replay(&bytes, false, Vec::new());
            assert!(r.result.is_ok(), "{:?}", r.result);
            assert!(r.events.is_empty(), "{:?}", r.events);
        }
    }

    #[test]
    fn the_first_usable_port_message_is_passed_on_once() {
        let f = Fixture::new(false);
        let mut bytes = frame(&Message::Port(0));
        for port in [6881, 6882, 6883] {
            bytes.extend(frame(&Message::Port(port)));
        }
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            matches!(r.events[..], [PeerEvent::DhtPort(6881)]),
            "{:?}",
            r.events
        );
        // The wrong length is a violation, as for every fixed-size message.
        let err = refusal(&f, &frame_with(wire::ID_PORT, &[0x1a]));
        assert!(err.is_violation(), "{err:?}");
    }

    #[test]
    fn unknown_messages_and_extra_extended_handshakes_are_read_past() {
        let f = Fixture::new(false);
        let handshake = Message::Extended {
            id: extension::HANDSHAKE_ID,
            payload: extension::our_handshake(
                7000,
                IpAddr::from([10, 0, 0, 2]),
                None,
                extension::PexOffer::Offer,
            ),
        };
        let mut bytes = frame(&handshake).repeat(10);
        // An unknown id with a frame near the cap, and an extension message we never
        // registered: neither is buffered or told.
        bytes.extend(frame_with(99, &vec![0; wire::MAX_FRAME as usize - 1]));
        bytes.extend(frame(&Message::Extended {
            id: 3,
            payload: vec![1; 1000],
        }));
        let r = f.replay(&bytes, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert_eq!(r.events.len(), MAX_EXTENDED_HANDSHAKES as usize);
        assert!(
            r.events
                .iter()
                .all(|e| matches!(e, PeerEvent::Extended(i) if i.listen_port == Some(7000)))
        );
    }

    fn frame_with(id: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32 + 1).to_be_bytes().to_vec();
        v.push(id);
        v.extend_from_slice(payload);
        v
    }

    // ---------------------------------------------------------------------------------------
    // writer
    // ---------------------------------------------------------------------------------------

    struct TestWriter<W> {
        w: WriterState<W>,
        events: Receiver<Input>,
        queued: Arc<AtomicUsize>,
        outbox: Outbox,
        inbox: Inbox,
        ending: Arc<Ending>,
    }

    /// What reaches a writer: the session's commands, or the reader's requests, cancels and
    /// answers to hash requests.
    enum Step {
        Cmd(Command),
        Serve(Vec<BlockRef>),
        Cancel(BlockRef),
        Hash(HashWork),
    }

    use Step::{Cancel, Cmd, Hash, Serve};

    fn writer_on<W: SendHalf>(
        f: &Fixture,
        stream: W,
        fast: bool,
        extended: bool,
        timeouts: &Timeouts,
    ) -> TestWriter<W> {
        let (tx, events) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let ext = extended.then(|| {
            extension::our_handshake(
                6881,
                IpAddr::from([10, 0, 0, 1]),
                Some(100),
                extension::PexOffer::Offer,
            )
        });
        let links = WriterLinks {
            key: PeerKey(1),
            events: tx,
            queued: Arc::clone(&queued),
            asked: Arc::new(Mutex::new(Asked::default())),
        };
        let w = WriterState::new(&f.ctx, stream, links, fast, ext, timeouts);
        let ending = Arc::new(Ending::default());
        let (outbox, inbox) =
            outbox::outbox(Arc::clone(&ending), None, f.ctx.geometry.piece_count());
        TestWriter {
            w,
            events,
            queued,
            outbox,
            inbox,
            ending,
        }
    }

    fn writer(f: &Fixture, fast: bool, extended: bool) -> TestWriter<Vec<u8>> {
        writer_on(f, Vec::new(), fast, extended, &Timeouts::DEFAULT)
    }

    impl<W: SendHalf> TestWriter<W> {
        /// Hands the writer `step`; requests count as the reader counts them.
        fn push(&self, step: Step) {
            match step {
                Cmd(cmd) => self.outbox.send(cmd),
                Serve(mut batch) => {
                    self.queued.fetch_add(batch.len(), Ordering::Relaxed);
                    self.outbox.serve(&mut batch);
                }
                Cancel(b) => {
                    let noted = self.outbox.cancel_serve(b, MAX_QUEUED_SERVES);
                    assert_eq!(noted, CancelServe::Noted);
                }
                Hash(work) => self.outbox.hash_work(work),
            }
        }

        /// Runs the writer over `steps`, all pending at once, until it has done them all and
        /// sees its outbox gone.
        fn run(&mut self, steps: Vec<Step>) -> Result<(), PeerError> {
            for step in steps {
                self.push(step);
            }
            let pieces = self.w.have.len() as u32;
            let (spare, inbox) = outbox::outbox(Arc::clone(&self.ending), None, pieces);
            drop(std::mem::replace(&mut self.outbox, spare));
            self.w.run(&std::mem::replace(&mut self.inbox, inbox))
        }

        /// Hands the writer one step and lets it take it.
        fn apply(&mut self, step: Step) {
            self.push(step);
            assert!(self.w.take(&self.inbox));
        }
    }

    /// Every frame in `bytes`, which must hold whole frames only.
    fn sent(f: &Fixture, mut bytes: &[u8]) -> Vec<Frame> {
        let count = f.ctx.geometry.piece_count();
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (frame, used) = wire::decode_frame(bytes, count.div_ceil(8) as usize, count)
                .unwrap()
                .expect("whole frames");
            out.push(frame);
            bytes = &bytes[used..];
        }
        out
    }

    fn msg(m: Message) -> Frame {
        Frame::Message(m)
    }

    fn reject(b: BlockRef) -> Frame {
        msg(reject_msg(b))
    }

    fn piece(f: &Fixture, b: BlockRef) -> Frame {
        Frame::Piece {
            index: b.piece.get(),
            begin: b.offset,
            data: f.data[f.range(b)].to_vec(),
        }
    }

    #[test]
    fn the_dht_port_follows_the_extension_handshake_and_pex_goes_out_as_told() {
        let f = Fixture::new(true);
        let mut t = writer(&f, true, true);
        t.w.dht_port = Some(6999);
        t.run(vec![
            Cmd(Command::Intro(HaveSummary::None)),
            Cmd(Command::Pex {
                id: 9,
                payload: b"old".to_vec(),
            }),
            Cmd(Command::Pex {
                id: 9,
                payload: b"de".to_vec(),
            }),
        ])
        .unwrap();
        let out = sent(&f, &t.w.stream);
        assert_eq!(out[0], msg(Message::HaveNone));
        assert!(matches!(
            &out[1],
            Frame::Message(Message::Extended { id: 0, .. })
        ));
        assert_eq!(out[2], msg(Message::Port(6999)));
        // Only the latest PEX message that waited goes out.
        assert_eq!(
            out[3..],
            [msg(Message::Extended {
                id: 9,
                payload: b"de".to_vec()
            })]
        );
    }

    #[test]
    fn the_intro_goes_first_even_after_early_requests() {
        let f = Fixture::new(true);
        let b = f.block(0, 0);
        let mut t = writer(&f, true, true);
        t.run(vec![
            Serve(vec![b]),
            Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))),
        ])
        .unwrap();
        let out = sent(&f, &t.w.stream);
        assert_eq!(out[0], msg(Message::HaveAll));
        assert!(
            matches!(&out[1], Frame::Message(Message::Extended { id: 0, payload }) if extension::parse_handshake(payload).is_ok())
        );
        // Still choked: the early request is refused, after the intro.
        assert_eq!(out[2..], [reject(b)]);
        assert_eq!(t.queued.load(Ordering::Relaxed), 0);

        // Without the Fast extension: a bitfield, or nothing at all for nothing.
        for (summary, want) in [
            (
                HaveSummary::All(vec![0b1110_0000]),
                vec![msg(Message::Bitfield(vec![0b1110_0000]))],
            ),
            (
                HaveSummary::Some(vec![0b0100_0000]),
                vec![msg(Message::Bitfield(vec![0b0100_0000]))],
            ),
            (HaveSummary::None, vec![]),
        ] {
            let mut t = writer(&f, false, false);
            t.run(vec![Cmd(Command::Intro(summary))]).unwrap();
            assert_eq!(sent(&f, &t.w.stream), want);
        }
    }

    #[test]
    fn a_choke_discards_queued_serves_with_fast_rejects() {
        let f = Fixture::new(true);
        let (b0, b1) = (f.block(0, 0), f.block(0, 1));
        for fast in [true, false] {
            let mut t = writer(&f, fast, false);
            t.apply(Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))));
            t.apply(Cmd(Command::Choke(false)));
            t.apply(Serve(vec![b0, b1]));
            assert_eq!(t.w.serves.len(), 2);
            t.apply(Cmd(Command::Choke(true)));
            assert!(t.w.serves.is_empty());
            assert_eq!(t.queued.load(Ordering::Relaxed), 0);
            t.w.flush().unwrap();
            let out = sent(&f, &t.w.stream);
            let mut want = vec![
                msg(if fast {
                    Message::HaveAll
                } else {
                    Message::Bitfield(vec![0b1110_0000])
                }),
                msg(Message::Unchoke),
                msg(Message::Choke),
            ];
            if fast {
                want.extend([reject(b0), reject(b1)]);
            }
            assert_eq!(out, want, "fast: {fast}");
        }
    }

    #[test]
    fn a_cancel_drops_a_queued_serve() {
        let f = Fixture::new(true);
        let (b0, b1) = (f.block(0, 0), f.block(0, 1));
        let mut t = writer(&f, true, false);
        t.run(vec![
            Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))),
            Cmd(Command::Choke(false)),
            Serve(vec![b0, b1]),
            Cancel(b0),
        ])
        .unwrap();
        let out = sent(&f, &t.w.stream);
        assert_eq!(
            out,
            [
                msg(Message::HaveAll),
                msg(Message::Unchoke),
                reject(b0),
                piece(&f, b1),
            ]
        );
        assert_eq!(t.queued.load(Ordering::Relaxed), 0);
        t.w.report();
        let reported: u32 = t
            .events
            .try_iter()
            .map(|e| match e {
                Input::Peer {
                    event: PeerEvent::Uploaded(n),
                    ..
                } => n,
                _ => 0,
            })
            .sum();
        assert_eq!(reported, b1.len);
    }

    #[test]
    fn only_pieces_we_have_are_served() {
        let f = Fixture::new(true);
        let (p0, p1, p2) = (f.block(0, 0), f.block(1, 0), f.block(2, 1));
        let mut t = writer(&f, true, false);
        t.run(vec![
            Cmd(Command::Intro(HaveSummary::Some(vec![0b1000_0000]))),
            Cmd(Command::Choke(false)),
            Serve(vec![p0, p1]),
            Cmd(Command::Have(p2.piece)),
            Serve(vec![p2]),
        ])
        .unwrap();
        assert_eq!(
            sent(&f, &t.w.stream),
            [
                msg(Message::Bitfield(vec![0b1000_0000])),
                msg(Message::Unchoke),
                msg(Message::Have(2)),
                reject(p1),
                piece(&f, p0),
                piece(&f, p2),
            ]
        );
    }

    #[test]
    fn requests_while_choked_end_the_connection_as_a_violation() {
        let f = Fixture::new(true);
        let b = f.block(0, 0);
        let mut t = writer(&f, false, false);
        let many = vec![b; MAX_REQUESTS_WHILE_CHOKED as usize + 1];
        let err = t
            .run(vec![Cmd(Command::Intro(HaveSummary::None)), Serve(many)])
            .unwrap_err();
        assert!(matches!(err, PeerError::RequestsWhileChoked) && err.is_violation());
    }

    /// Takes at most 1000 bytes per write, as a socket with a full buffer does.
    struct Narrow(Vec<u8>);

    impl SendHalf for Narrow {}

    impl Write for Narrow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(1000);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_vectored_writes_still_send_everything_in_order() {
        let f = Fixture::new(true);
        let blocks: Vec<_> = [(0, 0), (0, 1), (2, 1), (1, 0)]
            .map(|(p, n)| f.block(p, n))
            .to_vec();
        let cmds = || {
            vec![
                Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))),
                Cmd(Command::Choke(false)),
                Serve(blocks.clone()),
            ]
        };
        let mut narrow = writer_on(&f, Narrow(Vec::new()), true, false, &Timeouts::DEFAULT);
        narrow.run(cmds()).unwrap();
        let mut wide = writer(&f, true, false);
        wide.run(cmds()).unwrap();
        assert_eq!(narrow.w.stream.0, wide.w.stream);
        let out = sent(&f, &wide.w.stream);
        let pieces: Vec<_> = blocks.iter().map(|&b| piece(&f, b)).collect();
        assert_eq!(out[2..], pieces[..]);
    }

    /// A socket whose first write blocks until the test opens the gate: a peer that does not
    /// read. Says when a write is stuck.
    struct Gate {
        entered: Sender<()>,
        open: Receiver<()>,
        out: Vec<u8>,
    }

    impl SendHalf for Gate {}

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.entered.try_send(());
            let _ = self.open.recv_timeout(DEADLINE);
            self.out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flips_and_requests_for_a_writer_that_cannot_send_stay_bounded_and_never_block() {
        let f = Fixture::new(true);
        let (entered, stuck) = crossbeam_channel::bounded(1);
        let (gate, open) = crossbeam_channel::bounded(0);
        let stream = Gate {
            entered,
            open,
            out: Vec::new(),
        };
        let t = writer_on(&f, stream, true, false, &Timeouts::DEFAULT);
        t.push(Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))));
        let TestWriter {
            mut w,
            outbox,
            inbox,
            ending,
            ..
        } = t;
        thread::scope(|scope| {
            let writer = scope.spawn(move || (w.run(&inbox), w.stream.out));
            stuck
                .recv_timeout(DEADLINE)
                .expect("the writer is in a write");
            // The session flips choke and interest as fast as a peer's interest flips: the
            // outbox holds one state each, and the session never waits.
            for i in 0..100_000 {
                outbox.send(Command::Choke(i % 2 == 1));
                outbox.send(Command::Interested(i % 2 == 0));
            }
            outbox.send(Command::Choke(false));
            outbox.send(Command::Interested(true));
            outbox.peek(|p| {
                assert_eq!((p.choke, p.interested), (Some(false), Some(true)));
                assert!(p.requests.is_empty() && p.haves.is_empty() && p.cancels.is_empty());
            });
            // Requests pile up to the cap; the next one ends the connection.
            let blocks = vec![f.block(0, 0); 64];
            for _ in 0..MAX_PENDING_BLOCKS / 64 {
                outbox.send(Command::Request(blocks.clone()));
            }
            assert!(ending.take().is_ok(), "within the cap");
            outbox.send(Command::Request(blocks));
            let err = ending.take().unwrap_err();
            assert!(
                matches!(err, PeerError::Backlog(_)) && !err.is_violation(),
                "{err:?}"
            );
            drop(gate);
            let (result, out) = writer.join().unwrap();
            assert!(result.is_ok(), "{result:?}");
            assert_eq!(sent(&f, &out), [msg(Message::HaveAll)], "ended unsent");
        });
    }

    /// Takes one byte per write call, a millisecond each; records the call limits set.
    struct Dribble {
        out: Vec<u8>,
        limits: Vec<Duration>,
    }

    impl SendHalf for Dribble {
        fn limit_calls(&mut self, d: Duration) -> io::Result<()> {
            self.limits.push(d);
            Ok(())
        }
    }

    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            thread::sleep(Duration::from_millis(1));
            self.out.extend_from_slice(&buf[..buf.len().min(1)]);
            Ok(buf.len().min(1))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flush_the_peer_takes_too_slowly_ends_at_its_deadline() {
        let f = Fixture::new(true);
        let base = Duration::from_millis(100);
        let timeouts = Timeouts {
            flush: base,
            // No allowance per byte: the base is the whole deadline.
            min_send_rate: u64::MAX,
            ..Timeouts::DEFAULT
        };
        let stream = Dribble {
            out: Vec::new(),
            limits: Vec::new(),
        };
        let mut t = writer_on(&f, stream, true, false, &timeouts);
        let started = Instant::now();
        let err = t
            .run(vec![
                Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))),
                Cmd(Command::Choke(false)),
                Serve(vec![f.block(0, 0)]),
            ])
            .unwrap_err();
        assert!(matches!(err, PeerError::Timeout(SENDING)), "{err:?}");
        assert!(err.may_redial() && !err.is_violation());
        // Ended at the deadline, long before the block could have gone a byte at a time.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(t.w.stream.out.len() < BLOCK_LEN as usize);
        let limits = &t.w.stream.limits;
        assert!(
            !limits.is_empty() && limits.iter().all(|l| *l <= base),
            "{limits:?}"
        );
        // The first flush (intro, unchoke) set the limit once, not per call.
        assert!(limits.len() < 40, "{} limits set", limits.len());
    }

    #[test]
    fn the_flush_deadline_grows_with_what_it_carries() {
        let t = Timeouts::DEFAULT;
        assert_eq!(t.flush_deadline(100), FLUSH_DEADLINE);
        let sixteen_blocks = 16 * BLOCK_LEN as usize;
        assert_eq!(
            t.flush_deadline(sixteen_blocks),
            FLUSH_DEADLINE + Duration::from_secs(sixteen_blocks as u64 / MIN_SEND_RATE)
        );
    }

    // ---------------------------------------------------------------------------------------
    // the connection's threads
    // ---------------------------------------------------------------------------------------

    fn next_event(events: &Receiver<Input>) -> PeerEvent {
        match events.recv_timeout(DEADLINE).expect("an event in time") {
            Input::Peer { event, .. } => event,
            other => panic!("{other:?}"),
        }
    }

    /// A fake peer connected to a connection thread over a local socket, handshake done. The
    /// fake dials, so no step waits on an accept that might never come.
    fn connected(f: &Fixture, key: PeerKey) -> (TcpStream, Receiver<Input>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let thread = spawn(key, Dial::Inbound(ours, addr), Arc::clone(&f.ctx), tx).unwrap();
        peer.set_read_timeout(Some(DEADLINE)).unwrap();
        let theirs = Handshake {
            reserved: [0; 8],
            info_hash: f.ctx.info_hash,
            peer_id: THEIR_ID,
        };
        peer.write_all(&theirs.encode()).unwrap();
        let mut answer = [0u8; wire::HANDSHAKE_LEN];
        peer.read_exact(&mut answer).unwrap();
        let answer = Handshake::decode(&answer).unwrap();
        assert_eq!(answer.info_hash, f.ctx.info_hash);
        assert_eq!(answer.peer_id, f.ctx.our_id);
        (peer, events, thread)
    }

    fn gone(event: PeerEvent) -> Option<PeerError> {
        match event {
            PeerEvent::Gone { error } => error,
            other => panic!("expected Gone, got {other:?}"),
        }
    }

    /// A fake peer dialled into a connection thread with `timeouts`; no handshake yet.
    fn dialled(
        f: &Fixture,
        key: PeerKey,
        timeouts: Timeouts,
    ) -> (TcpStream, Receiver<Input>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, addr) = listener.accept().unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let thread = spawn_with(
            key,
            Dial::Inbound(ours, addr),
            Arc::clone(&f.ctx),
            tx,
            timeouts,
        )
        .unwrap();
        peer.set_read_timeout(Some(DEADLINE)).unwrap();
        (peer, events, thread)
    }

    /// Writes `bytes` one at a time, `gap` apart, until done or the socket fails; returns
    /// how many went.
    fn dribble(mut peer: &TcpStream, bytes: &[u8], gap: Duration) -> usize {
        for (i, b) in bytes.iter().enumerate() {
            if peer.write_all(&[*b]).is_err() {
                return i;
            }
            thread::sleep(gap);
        }
        bytes.len()
    }

    fn their_handshake(f: &Fixture) -> [u8; wire::HANDSHAKE_LEN] {
        Handshake {
            reserved: [0; 8],
            info_hash: f.ctx.info_hash,
            peer_id: THEIR_ID,
        }
        .encode()
    }

    const SHORT_START: Timeouts = Timeouts {
        handshake: Duration::from_millis(300),
        ..Timeouts::DEFAULT
    };

    #[test]
    fn a_handshake_dribbled_a_byte_at_a_time_fails_at_the_total_deadline() {
        let f = Fixture::new(false);
        let (peer, events, thread) = dialled(&f, PeerKey(10), SHORT_START);
        let started = Instant::now();
        let gap = Duration::from_millis(25);
        let hs = their_handshake(&f);
        thread::scope(|scope| {
            let dribbler = scope.spawn(|| dribble(&peer, &hs, gap));
            let error = gone(next_event(&events)).expect("an error");
            let took = started.elapsed();
            assert!(matches!(error, PeerError::Timeout(STARTING)), "{error:?}");
            assert!(took >= SHORT_START.handshake, "{took:?}");
            // Every read was within a per-read timeout; only the total deadline ends it.
            assert!(took < gap * wire::HANDSHAKE_LEN as u32, "{took:?}");
            assert!(dribbler.join().unwrap() < wire::HANDSHAKE_LEN);
        });
        thread.join().unwrap();
    }

    #[test]
    fn a_first_message_dribbled_after_a_quick_handshake_fails_at_the_same_deadline() {
        let f = Fixture::new(false);
        let (mut peer, events, thread) = dialled(&f, PeerKey(11), SHORT_START);
        peer.write_all(&their_handshake(&f)).unwrap();
        let mut answer = [0u8; wire::HANDSHAKE_LEN];
        peer.read_exact(&mut answer).unwrap();
        assert!(matches!(next_event(&events), PeerEvent::Connected { .. }));
        let have = frame(&Message::Have(0));
        let gap = Duration::from_millis(60);
        thread::scope(|scope| {
            let dribbler = scope.spawn(|| dribble(&peer, &have, gap));
            let error = gone(next_event(&events)).expect("an error");
            assert!(matches!(error, PeerError::Timeout(STARTING)), "{error:?}");
            assert!(dribbler.join().unwrap() < have.len());
        });
        thread.join().unwrap();
    }

    #[test]
    fn after_a_prompt_first_message_the_start_up_deadline_no_longer_applies() {
        let f = Fixture::new(false);
        let (mut peer, events, thread) = dialled(&f, PeerKey(12), SHORT_START);
        peer.write_all(&their_handshake(&f)).unwrap();
        peer.write_all(&frame(&Message::Unchoke)).unwrap();
        // Read, so closing later is a clean FIN and not a reset.
        let mut answer = [0u8; wire::HANDSHAKE_LEN];
        peer.read_exact(&mut answer).unwrap();
        assert!(matches!(next_event(&events), PeerEvent::Connected { .. }));
        assert!(matches!(next_event(&events), PeerEvent::Unchoke));
        // Quiet past the start-up deadline, well within the idle timeout.
        thread::sleep(2 * SHORT_START.handshake);
        peer.write_all(&frame(&Message::Have(1))).unwrap();
        assert!(matches!(next_event(&events), PeerEvent::Have(_)));
        drop(peer);
        let error = gone(next_event(&events));
        assert!(error.is_none(), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn a_panicking_reader_thread_still_reports_gone() {
        let f = Fixture::new(false);
        let (tx, events) = crossbeam_channel::unbounded();
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let thread = spawn(
            PANIC_IN_READER,
            Dial::Outbound(addr),
            Arc::clone(&f.ctx),
            tx,
        )
        .unwrap();
        let error = gone(next_event(&events));
        assert!(matches!(error, Some(PeerError::Panicked)), "{error:?}");
        thread.join().expect("the panic was caught");
    }

    #[test]
    fn a_panicking_writer_thread_reaches_the_session() {
        let f = Fixture::new(false);
        let (_peer, events, thread) = connected(&f, PANIC_IN_WRITER);
        assert!(matches!(next_event(&events), PeerEvent::Connected { .. }));
        // The peer stays connected: only the writer's guard can end this connection.
        let error = gone(next_event(&events));
        assert!(matches!(error, Some(PeerError::Panicked)), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn a_peer_hanging_up_between_frames_is_a_clean_close() {
        let f = Fixture::new(false);
        let (mut peer, events, thread) = connected(&f, PeerKey(7));
        assert!(matches!(next_event(&events), PeerEvent::Connected { .. }));
        peer.write_all(&frame(&Message::Unchoke)).unwrap();
        drop(peer);
        assert!(matches!(next_event(&events), PeerEvent::Unchoke));
        let error = gone(next_event(&events));
        assert!(error.is_none(), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn closing_a_connection_from_the_session_is_clean() {
        let f = Fixture::new(false);
        let (_peer, events, thread) = connected(&f, PeerKey(8));
        let PeerEvent::Connected { commands, .. } = next_event(&events) else {
            panic!("not connected");
        };
        commands.send(Command::Shutdown);
        let error = gone(next_event(&events));
        assert!(error.is_none(), "{error:?}");
        thread.join().unwrap();
    }

    #[test]
    fn a_protocol_violation_reaches_the_session_typed() {
        let f = Fixture::new(false);
        let (mut peer, events, thread) = connected(&f, PeerKey(9));
        assert!(matches!(next_event(&events), PeerEvent::Connected { .. }));
        peer.write_all(&[0xff; 4]).unwrap();
        let error = gone(next_event(&events)).expect("an error");
        assert!(
            matches!(error, PeerError::Protocol(wire::Error::FrameTooLong { .. })),
            "{error:?}"
        );
        assert!(error.is_violation() && !error.may_redial());
        thread.join().unwrap();
    }

    // ---------------------------------------------------------------------------------------
    // BEP 52 hash messages
    // ---------------------------------------------------------------------------------------

    use crate::hash_msg::OwnedTree;
    use crate::merkle;

    impl Fixture {
        /// The fixture's data as one v2 file: two leaves a piece, three pieces, a tree of
        /// eight leaves (the piece layer one above the leaves, the root three).
        fn v2(&self) -> Vec<OwnedTree> {
            vec![OwnedTree::of(&self.data, 0, PIECE_LEN / BLOCK_LEN)]
        }

        fn replay_v2(&self, bytes: &[u8], v2: &dyn Trees) -> Replay {
            replay_reader_v2(bytes, &self.ctx.storage, true, Vec::new(), Some(v2))
        }

        /// Leaf `i`'s hash (zeros past the end).
        fn leaf(&self, i: usize) -> merkle::Hash {
            let start = i * BLOCK_LEN as usize;
            match self.data.get(start..) {
                Some(rest) if !rest.is_empty() => merkle::leaf(&rest[..rest.len().min(16384)]),
                _ => [0; 32],
            }
        }
    }

    fn hreq(root: merkle::Hash, base: u32, index: u32, length: u32, proof: u32) -> HashRequest {
        HashRequest {
            root,
            base,
            index,
            length,
            proof_layers: proof,
        }
    }

    #[test]
    fn hash_messages_on_a_torrent_without_v2_are_violations() {
        let f = Fixture::new(false);
        let req = hreq([1; 32], 0, 0, 2, 0);
        for m in [
            Message::HashRequest(req),
            Message::HashReject(req),
            Message::Hashes {
                req,
                hashes: vec![[0; 32]; 2],
            },
        ] {
            let r = f.replay(&frame(&m), true, Vec::new());
            let e = r.result.unwrap_err();
            assert!(matches!(e, PeerError::NotNegotiated(_)), "{e:?}");
            assert!(e.is_violation());
        }
    }

    #[test]
    fn hash_requests_are_answered_or_rejected_and_bad_ones_are_not_fatal() {
        let f = Fixture::new(false);
        let v2 = f.v2();
        let root = v2[0].root;
        // Worked out by hand from the leaves: the piece layer's nodes and the one above.
        let node1 = |i: usize| merkle::parent(&f.leaf(2 * i), &f.leaf(2 * i + 1));
        let node2_1 = merkle::parent(&node1(2), &merkle::parent(&[0; 32], &[0; 32]));
        assert_eq!(
            merkle::parent(&merkle::parent(&node1(0), &node1(1)), &node2_1),
            root
        );
        let good = hreq(root, 1, 0, 2, 1);
        let from_data = hreq(root, 0, 2, 2, 2);
        let bad = [
            hreq([7; 32], 1, 0, 2, 1), // unknown root
            hreq(root, 1, 4, 2, 0),    // past the (padded) piece layer
            hreq(root, 1, u32::MAX - 1, 2, 0),
            hreq(root, 1, 0, 3, 0), // not a power of two
            hreq(root, 1, 0, 1, 0), // under two
            hreq(root, 1, 0, 0, 0),
            hreq(root, 1, 1, 2, 0),        // misaligned
            hreq(root, 1, 0, 2, 2),        // proof through the root
            hreq(root, 3, 0, 2, 0),        // the root's layer
            hreq(root, 2, 0, 2, 0),        // above the piece layer
            hreq(root, 0, 0, 4, 0),        // leaves of two pieces
            hreq(root, 0, 6, 2, 0),        // leaves past the last piece
            hreq(root, u32::MAX, 0, 2, 0), // no such layer
        ];
        let mut msgs = vec![Message::HashRequest(good)];
        msgs.extend(bad.iter().map(|r| Message::HashRequest(*r)));
        msgs.push(Message::HashRequest(from_data));
        let r = f.replay_v2(&frames(&msgs), &v2);
        assert!(r.result.is_ok(), "{:?}", r.result);
        assert!(
            r.events.is_empty(),
            "nothing for the session: {:?}",
            r.events
        );
        let hashes = &r.pending.hashes;
        assert_eq!(hashes.len(), 2 + bad.len());
        assert_eq!(
            hashes[0],
            HashWork::Send(Message::Hashes {
                req: good,
                hashes: vec![node1(0), node1(1), node2_1],
            })
        );
        for (work, req) in hashes[1..].iter().zip(&bad) {
            assert_eq!(work, &HashWork::Send(Message::HashReject(*req)));
        }
        let Some(HashWork::FromPiece(a)) = hashes.last() else {
            panic!("{:?}", hashes.last());
        };
        assert_eq!((a.req, a.piece, a.len), (from_data, 1, PIECE_LEN));
    }

    #[test]
    fn hash_requests_from_piece_data_and_hash_floods_are_budgeted() {
        let f = Fixture::new(false);
        let v2 = f.v2();
        let leaves = hreq(v2[0].root, 0, 0, 2, 0);
        let n = MAX_PIECE_HASHES_PER_WINDOW as usize + 8;
        let r = f.replay_v2(&frames(&vec![Message::HashRequest(leaves); n]), &v2);
        assert!(r.result.is_ok());
        let (from_data, rejected): (Vec<_>, Vec<_>) = r
            .pending
            .hashes
            .iter()
            .partition(|w| matches!(w, HashWork::FromPiece(_)));
        assert_eq!(from_data.len(), MAX_PIECE_HASHES_PER_WINDOW as usize);
        assert!(
            rejected
                .iter()
                .all(|w| **w == HashWork::Send(Message::HashReject(leaves)))
        );
        // Rejects we are sent cost nothing but count; past the budget the connection ends.
        let reject = Message::HashReject(leaves);
        let flood = vec![reject; MAX_HASH_MESSAGES_PER_WINDOW as usize + 1];
        let r = f.replay_v2(&frames(&flood), &v2);
        let e = r.result.unwrap_err();
        assert!(
            matches!(e, PeerError::Flood("hash messages")) && e.is_violation(),
            "{e:?}"
        );
        // Requests from a peer that does not read the answers end it sooner, not as a
        // violation: the answers pile up.
        let good = Message::HashRequest(hreq(v2[0].root, 1, 0, 4, 0));
        let r = f.replay_v2(&frames(&vec![good; 200]), &v2);
        assert!(r.result.is_ok());
        assert!(r.pending.shutdown && r.pending.hashes.is_empty());
    }

    #[test]
    fn hashes_we_never_asked_for_are_read_past_unless_malformed() {
        let f = Fixture::new(false);
        let v2 = f.v2();
        let root = v2[0].root;
        let req = hreq(root, 1, 0, 2, 1);
        let fine = Message::Hashes {
            req,
            hashes: vec![[3; 32]; 3],
        };
        let r = f.replay_v2(&frames(&[fine, Message::HashReject(req)]), &v2);
        assert!(r.result.is_ok() && r.events.is_empty() && r.pending.is_empty());
        let bad = [
            (req, 2, hash_msg::BadHashes::Count { want: 3, got: 2 }),
            (req, 4, hash_msg::BadHashes::Count { want: 3, got: 4 }),
            (
                hreq([5; 32], 1, 0, 2, 1),
                3,
                hash_msg::BadHashes::Shape(hash_msg::Refusal::UnknownRoot),
            ),
            (
                hreq(root, 1, 4, 2, 0),
                2,
                hash_msg::BadHashes::Shape(hash_msg::Refusal::OutOfRange),
            ),
        ];
        for (req, count, why) in bad {
            let m = Message::Hashes {
                req,
                hashes: vec![[3; 32]; count],
            };
            let e = f.replay_v2(&frame(&m), &v2).result.unwrap_err();
            assert!(matches!(e, PeerError::BadHashes(w) if w == why), "{e:?}");
            assert!(e.is_violation());
        }
        // A frame of the wrong size is the codec's to refuse.
        let mut short = frame(&Message::HashRequest(req));
        short[3] -= 1;
        short.pop();
        let e = f.replay_v2(&short, &v2).result.unwrap_err();
        assert!(matches!(
            e,
            PeerError::Protocol(wire::Error::BadLength { .. })
        ));
    }

    #[test]
    fn hash_answers_from_piece_data_need_an_announced_piece_that_matches() {
        let f = Fixture::new(true);
        let v2 = f.v2();
        let tree = v2[0].view();
        let answer = |piece: u32, req: HashRequest| {
            HashWork::FromPiece(hash_msg::PieceAnswer::new(&tree, None, &req, piece))
        };
        let first = hreq(v2[0].root, 0, 0, 2, 2);
        let last = hreq(v2[0].root, 0, 4, 2, 2);
        let mut t = writer(&f, true, false);
        t.run(vec![
            // Pieces 0 and 1 announced, not 2.
            Cmd(Command::Intro(HaveSummary::Some(vec![0b1100_0000]))),
            Hash(answer(0, first)),
            Hash(answer(2, last)),
            Hash(HashWork::Send(Message::HashReject(last))),
        ])
        .unwrap();
        let out = sent(&f, &t.w.stream);
        let node1 = |i: usize| merkle::parent(&f.leaf(2 * i), &f.leaf(2 * i + 1));
        let node2_1 = merkle::parent(&node1(2), &merkle::parent(&[0; 32], &[0; 32]));
        assert_eq!(
            &out[1..],
            [
                msg(Message::Hashes {
                    req: first,
                    hashes: vec![f.leaf(0), f.leaf(1), node1(1), node2_1],
                }),
                msg(Message::HashReject(last)),
                msg(Message::HashReject(last)),
            ]
        );
        // Data that no longer matches its hashes is not answered from.
        let damaged = Fixture::new(false);
        let mut t = writer(&damaged, true, false);
        t.run(vec![
            Cmd(Command::Intro(HaveSummary::All(vec![0b1110_0000]))),
            Hash(answer(0, first)),
        ])
        .unwrap();
        assert_eq!(
            sent(&damaged, &t.w.stream)[1..],
            [msg(Message::HashReject(first))]
        );
    }
}
