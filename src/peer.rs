//! One peer connection: a reader thread and a writer thread over one TCP socket.
//!
//! The reader owns the receiving half: it does the handshake, then decodes frames with
//! [`wire::Decoder`] (each length checked before its payload is read) and turns them into
//! [`PeerEvent`]s for the session. Requests from the peer go straight to the writer as
//! [`Command::Serve`], so uploads never wait on the session. The writer owns the sending half:
//! it blocks on its command channel (so an idle connection costs no CPU), batches what it has
//! into one write, and sends a keep-alive when it has been quiet for a while.
//!
//! Both halves are generic over `Read`/`Write`: the connection runs them over the socket, the
//! unit tests and the fuzz target ([`replay_reader`]) over bytes in memory.
//!
//! Per-peer faults end this connection only. Whichever half stops first says why (the other
//! half's failure that follows, a read on a socket the writer shut, is only a consequence), and
//! the reader thread sends it to the session as [`PeerEvent::Gone`], a typed [`PeerError`] it
//! can act on. Both threads catch their own panics, so a `Gone` goes out whatever happens and
//! the session never loses a connection slot to a thread that died silently.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::extension;
use sha1::{Digest, Sha1};

use crate::geometry::{BlockRef, Geometry, PieceIndex};
use crate::messages::{Command, HaveSummary, Input, PeerEvent};
use crate::picker::PeerKey;
use crate::ratelimit::TokenBucket;
use crate::recv::RecvBuf;
use crate::storage::Storage;
use crate::wire::{self, Body, Handshake, Message, reserved};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// A peer that sends nothing, not even a keep-alive, for this long is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(90);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests from one peer that we queue before calling it a flood.
pub const MAX_QUEUED_SERVES: usize = 512;
/// Requests a peer may send while we choke it before we call it abuse (a few are normal:
/// they were in flight when we choked).
pub const MAX_REQUESTS_WHILE_CHOKED: u32 = 1024;
const THREAD_STACK: usize = 256 * 1024;
/// Blocks the reader remembers asking for (outstanding, or voided by a choke, cancel or
/// reject, whose answers may still come). Past this the memory starts afresh: a late block
/// from before then is dropped and asked again, which only wastes its transfer.
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

const WAITING: &str = "waiting for the peer (silent too long)";
const SENDING: &str = "sending to the peer";

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

/// Why a connection ended: what [`PeerEvent::Gone`] carries (`None` there is a clean close,
/// by either side). [`is_violation`](PeerError::is_violation) and
/// [`may_redial`](PeerError::may_redial) say what the session should make of it.
#[derive(Debug)]
pub enum PeerError {
    /// Dialling failed.
    Connect(io::Error),
    Io(io::Error),
    /// Which wait timed out.
    Timeout(&'static str),
    /// A malformed handshake or frame.
    Protocol(wire::Error),
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
    SessionGone,
    /// A bug of ours: one of the connection's threads panicked (its message went to stderr).
    Panicked,
}

impl PeerError {
    /// The peer broke the protocol or abused it: malformed frames, out-of-range indices,
    /// request floods, messages it did not negotiate. It must never be dialled again.
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            PeerError::Protocol(_)
                | PeerError::BadIndex(_)
                | PeerError::RequestFlood
                | PeerError::RequestsWhileChoked
                | PeerError::NotNegotiated(_)
        )
    }

    /// Whether dialling the address again could go better: only after a mere failure (connect
    /// refused, reset, timeout). Not after a violation, not for a peer on another torrent or
    /// ourselves (neither is misbehaviour, and neither changes), not after a panic (the same
    /// bytes would hit the same bug), and not while shutting down.
    pub fn may_redial(&self) -> bool {
        matches!(
            self,
            PeerError::Connect(_) | PeerError::Io(_) | PeerError::Timeout(_)
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
            PeerError::WrongTorrent => write!(f, "peer is on another torrent"),
            PeerError::SelfConnection => write!(f, "connected to ourselves"),
            PeerError::BadIndex(what) => write!(f, "out-of-range {what}"),
            PeerError::RequestFlood => write!(f, "too many queued requests"),
            PeerError::RequestsWhileChoked => write!(f, "kept requesting while choked"),
            PeerError::NotNegotiated(what) => write!(f, "sent {what} without negotiating it"),
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

/// How a connection ended: set once, by whichever half stopped first. The writer records
/// before it shuts the socket, and the reader before it tears the writer down, so the other
/// half's failure that follows is never taken for the cause.
#[derive(Default)]
struct Ending(Mutex<Option<Result<(), PeerError>>>);

impl Ending {
    fn record(&self, outcome: Result<(), PeerError>) {
        self.0.lock().get_or_insert(outcome);
    }

    fn take(&self) -> Result<(), PeerError> {
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
}

pub enum Dial {
    Outbound(SocketAddr),
    Inbound(TcpStream, SocketAddr),
}

/// Starts a connection's reader thread (which starts the writer after the handshake). The
/// thread always ends by sending [`PeerEvent::Gone`], even when it panics.
pub fn spawn(
    key: PeerKey,
    dial: Dial,
    ctx: Arc<Context>,
    events: Sender<Input>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("peer-{}", key.0))
        .stack_size(THREAD_STACK)
        .spawn(move || {
            // A panic is a bug of ours, but it must not cost the session a connection slot:
            // the Gone event goes out whatever happens. The connection's own teardown ran
            // while unwinding (see `Teardown`).
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| run(key, dial, &ctx, &events)));
            let error = outcome.unwrap_or(Err(PeerError::Panicked)).err();
            let _ = events.send(Input::Peer {
                key,
                event: PeerEvent::Gone { error },
            });
        })
}

fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if let Some(ip) = bind.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
    }
    socket.connect_timeout(&SockAddr::from(addr), CONNECT_TIMEOUT)?;
    Ok(socket.into())
}

/// The reserved bits we set: BEP 10 extension protocol and BEP 6 Fast extension.
fn our_reserved() -> [u8; 8] {
    let mut r = [0u8; 8];
    for (byte, bit) in [reserved::EXTENSION, reserved::FAST] {
        r[byte] |= bit;
    }
    r
}

fn our_handshake(ctx: &Context) -> [u8; wire::HANDSHAKE_LEN] {
    Handshake {
        reserved: our_reserved(),
        info_hash: ctx.info_hash,
        peer_id: ctx.our_id,
    }
    .encode()
}

fn read_handshake(stream: &mut impl Read, ctx: &Context) -> Result<Handshake, PeerError> {
    let mut buf = [0u8; wire::HANDSHAKE_LEN];
    stream
        .read_exact(&mut buf)
        .map_err(io_err("waiting for the handshake"))?;
    let h = Handshake::decode(&buf)?;
    if h.info_hash != ctx.info_hash {
        return Err(PeerError::WrongTorrent);
    }
    if h.peer_id == ctx.our_id {
        return Err(PeerError::SelfConnection);
    }
    Ok(h)
}

/// `Ok(())` is a clean close: the peer hung up between frames, or the session closed us.
fn run(
    key: PeerKey,
    dial: Dial,
    ctx: &Arc<Context>,
    events: &Sender<Input>,
) -> Result<(), PeerError> {
    #[cfg(test)]
    inject_panic(key, PANIC_IN_READER);
    let (mut stream, addr, outbound) = match dial {
        Dial::Outbound(addr) => (
            connect(addr, ctx.bind).map_err(PeerError::Connect)?,
            addr,
            true,
        ),
        Dial::Inbound(s, addr) => (s, addr, false),
    };
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(PeerError::Io)?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(PeerError::Io)?;
    // The dialler speaks first; the answerer checks the info hash before revealing anything.
    let theirs = if outbound {
        stream
            .write_all(&our_handshake(ctx))
            .map_err(io_err("sending the handshake"))?;
        read_handshake(&mut stream, ctx)?
    } else {
        let h = read_handshake(&mut stream, ctx)?;
        stream
            .write_all(&our_handshake(ctx))
            .map_err(io_err("sending the handshake"))?;
        h
    };
    stream.set_nodelay(true).map_err(PeerError::Io)?;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(PeerError::Io)?;
    // A feature is on only when both sides set its bit (we always set ours).
    let fast = reserved::has(&theirs.reserved, reserved::FAST);
    let extended = reserved::has(&theirs.reserved, reserved::EXTENSION);

    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    // The writer tells the reader what it asked for before the requests go out, so the answer
    // never arrives before the reader knows it may keep it.
    let (asked_tx, asked_rx) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    let ending = Arc::new(Ending::default());
    let writer = {
        let stream = stream.try_clone().map_err(PeerError::Io)?;
        let ctx = Arc::clone(ctx);
        let events = events.clone();
        let queued = Arc::clone(&queued);
        let ending = Arc::clone(&ending);
        let ext_handshake = extended.then(|| extension::our_handshake(ctx.listen_port, addr.ip()));
        thread::Builder::new()
            .name(format!("peer-{}-w", key.0))
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
                    #[cfg(test)]
                    inject_panic(key, PANIC_IN_WRITER);
                    let mut w =
                        WriterState::new(&ctx, &stream, key, events, queued, fast, ext_handshake);
                    w.asked = Some(asked_tx);
                    let result = w.run(&cmd_rx);
                    // Bytes sent before a broken write still count.
                    w.report();
                    result
                }));
                ending.record(outcome.unwrap_or(Err(PeerError::Panicked)));
                // Told to stop, or the socket broke, or a panic: either way wake the reader so
                // the connection ends and its Gone event reaches the session.
                let _ = stream.shutdown(Shutdown::Both);
            })
            .map_err(PeerError::Io)?
    };
    let teardown = Teardown {
        stream: &stream,
        commands: cmd_tx.clone(),
        writer: Some(writer),
    };
    let connected = Input::Peer {
        key,
        event: PeerEvent::Connected {
            addr,
            peer_id: theirs.peer_id,
            fast,
            commands: cmd_tx.clone(),
        },
    };
    let result = if events.send(connected).is_err() {
        Err(PeerError::SessionGone)
    } else {
        let links = Links {
            key,
            events,
            writer: &cmd_tx,
            queued: &queued,
            asked: asked_rx,
        };
        Reader::new(
            &stream,
            &ctx.storage,
            ctx.download_limit.as_deref(),
            fast,
            links,
        )
        .run()
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
    commands: Sender<Command>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        let _ = self.commands.send(Command::Shutdown);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// A reader's ends of its channels: events to the session, requests to its writer, and the
/// writer's word on which blocks it asked for.
struct Links<'a> {
    key: PeerKey,
    events: &'a Sender<Input>,
    writer: &'a Sender<Command>,
    /// Requests handed to the writer and not yet served or dropped (the writer counts down).
    queued: &'a AtomicUsize,
    asked: Receiver<Vec<BlockRef>>,
}

struct Reader<'a, R> {
    stream: RecvBuf<R>,
    decoder: wire::Decoder,
    storage: &'a Storage,
    download_limit: Option<&'a TokenBucket>,
    /// Blocks we asked this peer for: only these may be written into storage.
    asked: HashSet<BlockRef>,
    links: Links<'a>,
    payload: Vec<u8>,
    fast: bool,
    /// Requests decoded but not yet handed to the writer: passed on in one command when the
    /// next read could block, or before any other message (so a cancel follows its request).
    serves: Vec<BlockRef>,
}

impl<'a, R: Read> Reader<'a, R> {
    fn new(
        src: R,
        storage: &'a Storage,
        download_limit: Option<&'a TokenBucket>,
        fast: bool,
        links: Links<'a>,
    ) -> Reader<'a, R> {
        Reader {
            stream: RecvBuf::new(src),
            decoder: wire::Decoder::new(storage.geometry().piece_count()),
            storage,
            download_limit,
            asked: HashSet::new(),
            links,
            payload: Vec::new(),
            fast,
            serves: Vec::new(),
        }
    }

    fn pass_serves(&mut self) -> Result<(), PeerError> {
        if self.serves.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.serves, Vec::with_capacity(MAX_SERVE_BATCH));
        self.links
            .writer
            .send(Command::Serve(batch))
            .map_err(|_| PeerError::SessionGone)
    }

    fn emit(&self, event: PeerEvent) -> Result<(), PeerError> {
        self.links
            .events
            .send(Input::Peer {
                key: self.links.key,
                event,
            })
            .map_err(|_| PeerError::SessionGone)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), PeerError> {
        self.stream.read_exact(buf).map_err(io_err(WAITING))
    }

    /// Reads frames until the connection ends; `Ok(())` when the peer hangs up between frames.
    fn run(&mut self) -> Result<(), PeerError> {
        loop {
            if self.stream.buffered() < REQUEST_FRAME_LEN {
                self.pass_serves()?;
            }
            if self.stream.at_eof().map_err(io_err(WAITING))? {
                return Ok(());
            }
            let mut prefix = [0u8; wire::LEN_PREFIX];
            self.read(&mut prefix)?;
            let Some(len) = self.decoder.frame_len(prefix)? else {
                continue;
            };
            let mut id = [0u8; 1];
            self.read(&mut id)?;
            match self.decoder.body(len, id[0])? {
                Body::Piece { len } => {
                    self.pass_serves()?;
                    self.read_piece(len)?;
                }
                Body::Message { id, len } => {
                    if id != wire::ID_REQUEST {
                        self.pass_serves()?;
                    }
                    self.read_message(id, len)?;
                }
            }
        }
    }

    fn read_message(&mut self, id: u8, len: usize) -> Result<(), PeerError> {
        // One buffer for the connection's life: `len` is bounded by the decoder, and a
        // bitfield or extension message does not cost an allocation each.
        let mut payload = std::mem::take(&mut self.payload);
        payload.resize(len, 0);
        let msg = self
            .read(&mut payload)
            .and_then(|()| self.decoder.decode(id, &payload).map_err(PeerError::from));
        self.payload = payload;
        self.handle(msg?)
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
        for batch in self.links.asked.try_iter() {
            if self.asked.len() + batch.len() > MAX_ASKED {
                self.asked.clear();
            }
            self.asked.extend(batch);
        }
        // Straight from the socket into the file map when the block is ours to write;
        // otherwise read past it.
        let claim = if self.asked.remove(&block) {
            storage.claim(block)
        } else {
            None
        };
        let written = claim.is_some();
        match claim {
            Some(claim) => claim.fill(&mut self.stream),
            None => self.stream.skip(data_len as usize),
        }
        .map_err(io_err(WAITING))?;
        self.emit(PeerEvent::Block { block, written })
    }

    fn handle(&mut self, msg: Message) -> Result<(), PeerError> {
        let storage = self.storage;
        let g = storage.geometry();
        match msg {
            Message::KeepAlive | Message::Port(_) | Message::Unknown(_) => Ok(()),
            Message::Extended { id, payload } => {
                // Only the handshake is ours to read; a malformed one is ignored, not fatal.
                if id == extension::HANDSHAKE_ID
                    && let Ok(info) = extension::parse_handshake(&payload)
                {
                    return self.emit(PeerEvent::Extended(info));
                }
                Ok(())
            }
            Message::Choke => self.emit(PeerEvent::Choke),
            Message::Unchoke => self.emit(PeerEvent::Unchoke),
            Message::Interested => self.emit(PeerEvent::Interested),
            Message::NotInterested => self.emit(PeerEvent::NotInterested),
            Message::Have(i) => {
                let piece = g.piece(i).ok_or(PeerError::BadIndex("have"))?;
                self.emit(PeerEvent::Have(piece))
            }
            // A bitfield may come late or twice (aria2 sends one after haves); the session
            // merges it.
            Message::Bitfield(bits) => self.emit(PeerEvent::Bitfield(bits)),
            Message::Request { index, begin, len } => {
                let block = g
                    .request(index, begin, len)
                    .ok_or(PeerError::BadIndex("request"))?;
                if self.links.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED_SERVES {
                    return Err(PeerError::RequestFlood);
                }
                self.serves.push(block);
                if self.serves.len() >= MAX_SERVE_BATCH {
                    self.pass_serves()?;
                }
                Ok(())
            }
            Message::Cancel { index, begin, len } => {
                if let Some(block) = g.request(index, begin, len) {
                    let _ = self.links.writer.send(Command::CancelServe(block));
                }
                Ok(())
            }
            fast if !self.fast && is_fast_message(&fast) => {
                Err(PeerError::NotNegotiated("a Fast extension message"))
            }
            Message::HaveAll => self.emit(PeerEvent::HaveAll),
            Message::HaveNone => self.emit(PeerEvent::HaveNone),
            Message::Reject { index, begin, len } => {
                let block = g
                    .aligned_block(index, begin, len)
                    .ok_or(PeerError::BadIndex("reject"))?;
                self.emit(PeerEvent::Rejected(block))
            }
            Message::AllowedFast(i) => {
                let piece = g.piece(i).ok_or(PeerError::BadIndex("allowed fast"))?;
                self.emit(PeerEvent::AllowedFast(piece))
            }
            // A hint we may ignore; still checked.
            Message::Suggest(i) => g.piece(i).map(|_| ()).ok_or(PeerError::BadIndex("suggest")),
        }
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
    /// What it told its writer, in order.
    pub commands: Vec<Command>,
}

/// Runs a connection's reader over `src` to its end, as the connection runs it after the
/// handshake, with the session and the writer replaced by channels read afterwards. `asked`:
/// blocks the writer has asked for (a block is written into `storage` only if asked and
/// claimable). The fuzz target and the unit tests drive the connection's own code through this.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn replay_reader(
    src: impl Read,
    storage: &Storage,
    fast: bool,
    asked: Vec<BlockRef>,
) -> Replay {
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let (writer_tx, writer_rx) = crossbeam_channel::unbounded();
    let (asked_tx, asked_rx) = crossbeam_channel::unbounded();
    let _ = asked_tx.send(asked);
    let queued = AtomicUsize::new(0);
    let links = Links {
        key: PeerKey(0),
        events: &events_tx,
        writer: &writer_tx,
        queued: &queued,
        asked: asked_rx,
    };
    let result = Reader::new(src, storage, None, fast, links).run();
    Replay {
        result,
        events: events_rx
            .try_iter()
            .filter_map(|input| match input {
                Input::Peer { event, .. } => Some(event),
                _ => None,
            })
            .collect(),
        commands: writer_rx.try_iter().collect(),
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

struct WriterState<W> {
    stream: W,
    key: PeerKey,
    events: Sender<Input>,
    queued: Arc<AtomicUsize>,
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
    choking: bool,
    /// Pieces we have told this peer about; we serve only those.
    have: Vec<bool>,
    serves: VecDeque<BlockRef>,
    /// Blocks waiting in the next write: each goes, straight from `cache`, after the first
    /// `at` bytes of `out` (the messages before it, its own header included). `cache` does
    /// not change while this is non-empty.
    blocks: Vec<QueuedBlock>,
    /// Bytes of blocks written and not yet reported to the session.
    unreported: u32,
    /// Requests that came before the intro was sent (bounded by `MAX_QUEUED_SERVES`).
    before_intro: Option<Vec<Command>>,
    out: Vec<u8>,
    /// Tells this connection's reader which blocks we asked for.
    asked: Option<Sender<Vec<BlockRef>>>,
}

impl<W: Write> WriterState<W> {
    /// `ext_handshake`: our BEP 10 handshake, when both sides support the extension protocol.
    fn new(
        ctx: &Context,
        stream: W,
        key: PeerKey,
        events: Sender<Input>,
        queued: Arc<AtomicUsize>,
        fast: bool,
        ext_handshake: Option<Vec<u8>>,
    ) -> WriterState<W> {
        WriterState {
            stream,
            key,
            events,
            queued,
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
            have: vec![false; ctx.geometry.piece_count() as usize],
            serves: VecDeque::new(),
            before_intro: Some(Vec::new()),
            out: Vec::with_capacity(4096),
            asked: None,
            blocks: Vec::with_capacity(MAX_SERVES_PER_WRITE),
            unreported: 0,
        }
    }

    /// Sends until told to stop (`Ok`) or the peer fails us.
    fn run(&mut self, commands: &Receiver<Command>) -> Result<(), PeerError> {
        loop {
            if self.serves.is_empty() {
                let wait = if self.unreported > 0 {
                    REPORT_DELAY
                } else {
                    KEEPALIVE_INTERVAL
                };
                match commands.recv_timeout(wait) {
                    Ok(cmd) => {
                        if !self.apply(cmd) {
                            return self.flush().map_err(io_err(SENDING));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) if self.unreported > 0 => self.report(),
                    Err(RecvTimeoutError::Timeout) => {
                        wire::encode(&Message::KeepAlive, &mut self.out)
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return self.flush().map_err(io_err(SENDING));
                    }
                }
            }
            while let Ok(cmd) = commands.try_recv() {
                if !self.apply(cmd) {
                    return self.flush().map_err(io_err(SENDING));
                }
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
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.serve(block).map_err(io_err(SENDING))?;
            }
            self.flush().map_err(io_err(SENDING))?;
        }
    }

    /// The first message after the handshake: have all / have none / bitfield, then our
    /// extended handshake.
    fn intro(&mut self, summary: HaveSummary) {
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
        if let Some(payload) = self.ext_handshake.take() {
            wire::encode(
                &Message::Extended {
                    id: extension::HANDSHAKE_ID,
                    payload,
                },
                &mut self.out,
            );
        }
    }

    /// Applies one command; false means stop.
    fn apply(&mut self, cmd: Command) -> bool {
        // The reader hands requests straight to us, and one may arrive before the session has
        // sent the intro; answering it first would put a reject before the bitfield.
        if let Some(early) = &mut self.before_intro {
            match cmd {
                Command::Serve(_) | Command::CancelServe(_) => {
                    early.push(cmd);
                    return true;
                }
                Command::Intro(summary) => {
                    self.intro(summary);
                    for c in self.before_intro.take().unwrap_or_default() {
                        self.apply(c);
                    }
                    return true;
                }
                _ => {}
            }
        }
        let out = &mut self.out;
        match cmd {
            Command::Intro(summary) => self.intro(summary),
            Command::Request(blocks) => {
                for &b in &blocks {
                    wire::encode(&request_msg(b, false), out);
                }
                if let Some(asked) = &self.asked {
                    let _ = asked.send(blocks);
                }
            }
            Command::Cancel(b) => wire::encode(&request_msg(b, true), out),
            Command::Interested(yes) => wire::encode(
                if yes {
                    &Message::Interested
                } else {
                    &Message::NotInterested
                },
                out,
            ),
            Command::Choke(choke) => {
                self.choking = choke;
                wire::encode(
                    if choke {
                        &Message::Choke
                    } else {
                        &Message::Unchoke
                    },
                    out,
                );
                if choke {
                    // BEP 3: a choke discards the peer's pending requests; BEP 6 peers are
                    // told so, one reject each.
                    self.requests_while_choked = 0;
                    self.queued.fetch_sub(self.serves.len(), Ordering::Relaxed);
                    for b in std::mem::take(&mut self.serves) {
                        if self.fast {
                            wire::encode(&reject_msg(b), out);
                        }
                    }
                    // A choked peer gets nothing more for a while: free the cache.
                    self.cached_piece = None;
                    self.cache = Vec::new();
                }
            }
            Command::Have(p) => {
                self.have[p.usize()] = true;
                wire::encode(&Message::Have(p.get()), out);
            }
            Command::Serve(batch) => {
                for b in batch {
                    if !self.choking && self.have[b.piece.usize()] {
                        self.serves.push_back(b);
                    } else {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                        if self.choking {
                            self.requests_while_choked += 1;
                        }
                        if self.fast {
                            wire::encode(&reject_msg(b), out);
                        }
                    }
                }
            }
            Command::CancelServe(b) => {
                let before = self.serves.len();
                self.serves.retain(|s| *s != b);
                let removed = before - self.serves.len();
                self.queued.fetch_sub(removed, Ordering::Relaxed);
                if self.fast && removed > 0 {
                    wire::encode(&reject_msg(b), out);
                }
            }
            Command::Shutdown => return false,
        }
        true
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
            && (self.storage.unchanged(piece)
                || <[u8; 20]>::from(Sha1::digest(&self.cache[..len]))
                    == *self.meta.piece_hash(piece));
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
            let _ = self.events.send(Input::Peer {
                key: self.key,
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
    /// takes it in parts).
    fn flush(&mut self) -> io::Result<()> {
        if self.blocks.is_empty() {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out)?;
                self.out.clear();
            }
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
        let mut rest = &mut iov[..];
        while !rest.is_empty() {
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
            let _ = self.events.send(Input::Peer {
                key: self.key,
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

    use super::*;
    use crate::geometry::BLOCK_LEN;
    use crate::metainfo::Metainfo;
    use crate::storage::Layout;
    use crate::wire::Frame;

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
    fn requests_reach_the_writer_in_batches_and_cancels_after_their_request() {
        let f = Fixture::new(false);
        let [a, b, c, d, e] = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1)].map(|(p, n)| f.block(p, n));
        let parts = Parts(VecDeque::from([
            frames(&[request(a), request(b), request(c)]),
            frames(&[request(d), request_msg(d, true)]),
            frames(&[request(e)]),
        ]));
        let r = replay_reader(parts, &f.ctx.storage, false, Vec::new());
        assert!(r.result.is_ok(), "{:?}", r.result);
        let got: Vec<String> = r.commands.iter().map(|c| format!("{c:?}")).collect();
        let want: Vec<String> = [
            Command::Serve(vec![a, b, c]),
            Command::Serve(vec![d]),
            Command::CancelServe(d),
            Command::Serve(vec![e]),
        ]
        .iter()
        .map(|c| format!("{c:?}"))
        .collect();
        assert_eq!(got, want);
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
        let passed: usize = r
            .commands
            .iter()
            .map(|c| match c {
                Command::Serve(batch) => batch.len(),
                other => panic!("{other:?}"),
            })
            .sum();
        // The batch in hand when the flood was seen is dropped with the connection.
        assert!(passed > 0 && passed <= MAX_QUEUED_SERVES, "{passed}");
    }

    // ---------------------------------------------------------------------------------------
    // writer
    // ---------------------------------------------------------------------------------------

    struct TestWriter<W> {
        w: WriterState<W>,
        events: Receiver<Input>,
        queued: Arc<AtomicUsize>,
    }

    fn writer_on<W: Write>(f: &Fixture, stream: W, fast: bool, extended: bool) -> TestWriter<W> {
        let (tx, events) = crossbeam_channel::unbounded();
        let queued = Arc::new(AtomicUsize::new(0));
        let ext = extended.then(|| extension::our_handshake(6881, IpAddr::from([10, 0, 0, 1])));
        let w = WriterState::new(
            &f.ctx,
            stream,
            PeerKey(1),
            tx,
            Arc::clone(&queued),
            fast,
            ext,
        );
        TestWriter { w, events, queued }
    }

    fn writer(f: &Fixture, fast: bool, extended: bool) -> TestWriter<Vec<u8>> {
        writer_on(f, Vec::new(), fast, extended)
    }

    impl<W: Write> TestWriter<W> {
        /// Runs the writer over `cmds` until they run out; requests count as the reader
        /// counts them.
        fn run(&mut self, cmds: Vec<Command>) -> Result<(), PeerError> {
            let (tx, rx) = crossbeam_channel::unbounded();
            for cmd in cmds {
                if let Command::Serve(batch) = &cmd {
                    self.queued.fetch_add(batch.len(), Ordering::Relaxed);
                }
                tx.send(cmd).unwrap();
            }
            drop(tx);
            self.w.run(&rx)
        }

        fn apply(&mut self, cmd: Command) {
            if let Command::Serve(batch) = &cmd {
                self.queued.fetch_add(batch.len(), Ordering::Relaxed);
            }
            assert!(self.w.apply(cmd));
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
    fn the_intro_goes_first_even_after_early_requests() {
        let f = Fixture::new(true);
        let b = f.block(0, 0);
        let mut t = writer(&f, true, true);
        t.run(vec![
            Command::Serve(vec![b]),
            Command::Intro(HaveSummary::All(vec![0b1110_0000])),
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
            t.run(vec![Command::Intro(summary)]).unwrap();
            assert_eq!(sent(&f, &t.w.stream), want);
        }
    }

    #[test]
    fn a_choke_discards_queued_serves_with_fast_rejects() {
        let f = Fixture::new(true);
        let (b0, b1) = (f.block(0, 0), f.block(0, 1));
        for fast in [true, false] {
            let mut t = writer(&f, fast, false);
            t.apply(Command::Intro(HaveSummary::All(vec![0b1110_0000])));
            t.apply(Command::Choke(false));
            t.apply(Command::Serve(vec![b0, b1]));
            assert_eq!(t.w.serves.len(), 2);
            t.apply(Command::Choke(true));
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
            Command::Intro(HaveSummary::All(vec![0b1110_0000])),
            Command::Choke(false),
            Command::Serve(vec![b0, b1]),
            Command::CancelServe(b0),
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
            Command::Intro(HaveSummary::Some(vec![0b1000_0000])),
            Command::Choke(false),
            Command::Serve(vec![p0, p1]),
            Command::Have(p2.piece),
            Command::Serve(vec![p2]),
        ])
        .unwrap();
        assert_eq!(
            sent(&f, &t.w.stream),
            [
                msg(Message::Bitfield(vec![0b1000_0000])),
                msg(Message::Unchoke),
                reject(p1),
                msg(Message::Have(2)),
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
            .run(vec![
                Command::Intro(HaveSummary::None),
                Command::Serve(many),
            ])
            .unwrap_err();
        assert!(matches!(err, PeerError::RequestsWhileChoked) && err.is_violation());
    }

    /// Takes at most 1000 bytes per write, as a socket with a full buffer does.
    struct Narrow(Vec<u8>);

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
                Command::Intro(HaveSummary::All(vec![0b1110_0000])),
                Command::Choke(false),
                Command::Serve(blocks.clone()),
            ]
        };
        let mut narrow = writer_on(&f, Narrow(Vec::new()), true, false);
        narrow.run(cmds()).unwrap();
        let mut wide = writer(&f, true, false);
        wide.run(cmds()).unwrap();
        assert_eq!(narrow.w.stream.0, wide.w.stream);
        let out = sent(&f, &wide.w.stream);
        let pieces: Vec<_> = blocks.iter().map(|&b| piece(&f, b)).collect();
        assert_eq!(out[2..], pieces[..]);
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
        commands.send(Command::Shutdown).unwrap();
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
}
