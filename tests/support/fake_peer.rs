//! Peers written in the tests: one fake seeder whose [`Misbehaviour`] covers what the suites
//! need (and, given a [`MetaSpec`], which serves the info dictionary over BEP 9 `ut_metadata`
//! as its [`MetaMisbehaviour`] says), a fake leecher that counts what it receives, and a relay
//! that counts what a real seeder sends. All speak through the tests' own codec
//! ([`super::wire`]).
//!
//! Every party listens on a loopback address of its own, runs on threads that notice a stop
//! flag within a fraction of a second, and is stopped and joined when dropped.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::net::accept_loop;
use super::torrent::{Content, Geometry};
use super::wire::{
    Closed, EXT_HANDSHAKE, ExtHello, Msg, Wire, bitfield, ext_handshake, frame, handshake,
    has_fast_bit, id, msg_extended, msg_piece, parse_ext_handshake, parse_triple, peer_id,
    reserved, triple, ut_metadata, with_extension_bit, with_v2_bit,
};
use super::{DEADLINE, Diagnose, lock, poll_until};

/// The largest block a fake serves (BEP 3 allows up to 128 KiB in practice).
const MAX_BLOCK: u32 = 128 * 1024;
/// How long a fake waits for a handshake.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(30);
/// How often a connection's loop looks at its stop flag (and, for [`Misbehaviour::Reverse`],
/// how long a pause in the requests must be before the batch is answered).
const TICK: Duration = Duration::from_millis(20);

// =============================================================================================
// The fake seeder
// =============================================================================================

/// How a fake seeder answers requests. Whatever it is, the seeder claims the pieces it has
/// (every piece unless told otherwise) and unchokes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Every request answered at once with the right bytes.
    Honest,
    /// The first byte of every block flipped: any piece it contributes to is bad.
    CorruptEveryBlock,
    /// The first byte of the block at offset 0 of each piece inverted: every piece it sends
    /// fails its hash.
    FlipFirstByte,
    /// Real data, except one byte flipped in the first block sent.
    CorruptFirstBlock,
    /// Answer at least `after_blocks` requests, then, on a request for a block of a piece it
    /// has already sent part of, send the frame header and half the block and close the
    /// connection. Later connections are closed at once.
    DropMidPiece { after_blocks: usize },
    /// Every request answered with a reject (as a seeder whose data changed on disk).
    RejectAll,
    /// Never a block.
    Stall,
    /// Collect requests and, whenever the downloader pauses, answer the batch last-first.
    Reverse,
    /// Answer the lowest requested piece, then wait this long before the next one.
    Paced(Duration),
}

/// How a fake seeder with a [`MetaSpec`] answers `ut_metadata` requests. Whatever it is, the
/// fake offers `ut_metadata` in its extension handshake (under [`FAKE_UT_METADATA_ID`]) with
/// the `metadata_size` of its spec, rejects requests for pieces past the end (as an honest peer
/// does), and serves the data of the torrent honestly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaMisbehaviour {
    /// Every request answered with the right piece.
    Honest,
    /// No request ever answered.
    Silent,
    /// Every request rejected.
    RejectAll,
    /// The first request answered with data for the piece index one past the last (then
    /// honest).
    PieceOutOfRange,
    /// The last piece sent one byte longer than it is.
    LastPieceLong,
    /// The last piece sent one byte short.
    LastPieceShort,
    /// Every piece sent with a `total_size` one more than the size announced.
    WrongTotalSize,
    /// One byte of every piece flipped (right lengths): the whole fails its SHA-1.
    Corrupt,
    /// On the first request, data for a piece not asked for (yet) goes out first; then every
    /// request answered honestly.
    Unasked,
}

/// The extended message id a fake seeder wants `ut_metadata` messages under. Not 1 or 2 (the
/// ids most clients pick for themselves), so a client that answers under its own id, not the
/// one its peer announced, is seen.
pub const FAKE_UT_METADATA_ID: u8 = 7;

/// The metadata a fake seeder serves: `info`, the bytes of an info dictionary, whose SHA-1 is
/// what the magnet names.
#[derive(Clone)]
pub struct MetaSpec {
    pub info: Arc<Vec<u8>>,
    /// The `metadata_size` announced; `None`: the real size.
    pub announced: Option<i64>,
    pub misbehaviour: MetaMisbehaviour,
}

impl MetaSpec {
    fn announced_size(&self) -> i64 {
        self.announced.unwrap_or(self.info.len() as i64)
    }
}

/// Something the fake seeder did, reported as it happens.
#[derive(Debug, Clone, Copy)]
pub enum FakeEvent {
    Connected,
    Request {
        piece: u32,
    },
    /// A `ut_metadata` request for `piece` arrived.
    MetaRequest {
        piece: i64,
    },
    /// A `ut_metadata` message that breaks the protocol (per its [`MetaMisbehaviour`]) went
    /// out.
    MetaAttack,
    /// The last requested block of `piece` in a batch went out; its write began at `at`.
    Served {
        piece: u32,
        at: Instant,
    },
}

/// What a fake seeder saw and did, for assertions and failure reports.
#[derive(Debug, Default, Clone)]
pub struct FakeReport {
    /// Connections accepted (the other side dialled).
    pub accepts: usize,
    /// Connections accepted or dialled.
    pub connections: usize,
    pub handshakes: usize,
    pub closed: usize,
    /// (piece, begin, length) of every request, in arrival order.
    pub requests: Vec<(u32, u32, u32)>,
    /// (piece, begin) of every block sent, in order.
    pub served: Vec<(u32, u32)>,
    pub bytes_sent: u64,
    /// Whole, correct blocks sent.
    pub good_blocks: usize,
    /// Blocks sent with a byte changed.
    pub flipped: usize,
    /// (piece, offset) of the block corrupted by [`Misbehaviour::CorruptFirstBlock`].
    pub corrupted: Option<(u32, u32)>,
    /// The piece a connection was dropped in the middle of.
    pub dropped_in_piece: Option<u32>,
    /// Id of the first message the other side sent on each connection.
    pub first_msgs: Vec<u8>,
    /// Reserved bytes of the other side's handshake on each connection.
    pub their_reserved: Vec<[u8; 8]>,
    /// How each connection ended (normal ends included).
    pub endings: Vec<String>,
    /// The other side's extension handshakes, one per connection that sent one.
    pub their_ext: Vec<ExtHello>,
    /// Piece index of every `ut_metadata` request, in arrival order.
    pub meta_requests: Vec<i64>,
    /// Piece index of every honest `ut_metadata` data message sent.
    pub meta_served: Vec<i64>,
    /// `ut_metadata` rejects sent.
    pub meta_rejects: usize,
    /// Messages sent that break the protocol on purpose ([`MetaMisbehaviour`]).
    pub meta_attacks: usize,
    /// What the other side got wrong in the extension protocol (seen, not acted upon).
    pub ext_errors: Vec<String>,
}

impl FakeReport {
    pub fn blocks_sent(&self) -> usize {
        self.served.len()
    }

    /// Distinct blocks requested.
    pub fn distinct_blocks(&self) -> usize {
        self.requests
            .iter()
            .map(|&(p, b, _)| (p, b))
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// The most times one block was requested.
    pub fn max_requests_per_block(&self) -> usize {
        let mut counts: HashMap<(u32, u32), usize> = HashMap::new();
        for &(p, b, _) in &self.requests {
            *counts.entry((p, b)).or_default() += 1;
        }
        counts.values().copied().max().unwrap_or(0)
    }

    /// Pieces in the order their first block went out.
    pub fn piece_order(&self) -> Vec<u32> {
        let mut seen = BTreeSet::new();
        self.served
            .iter()
            .filter(|(p, _)| seen.insert(*p))
            .map(|(p, _)| *p)
            .collect()
    }
}

/// What a fake seeder serves and how.
#[derive(Clone)]
pub struct SeedSpec {
    pub name: String,
    pub data: Arc<Vec<u8>>,
    pub geo: Geometry,
    /// `None`: answer whatever info hash the other side asks for.
    pub info_hash: Option<[u8; 20]>,
    /// The pieces it claims (every piece by default).
    pub has: Vec<bool>,
    /// Set the Fast bit in the handshake.
    pub fast: bool,
    /// Announce pieces with `have all` instead of a bitfield (when both sides are Fast).
    pub have_all: bool,
    pub misbehaviour: Misbehaviour,
    pub peer_id: [u8; 20],
    /// Offer the info dictionary over BEP 9 (and set the BEP 10 bit).
    pub metadata: Option<MetaSpec>,
    /// Set the BEP 52 bit in the handshake (a v2-capable peer). The fake speaks no hash
    /// messages: it serves torrents whose piece layers are in the .torrent. For a v2 torrent,
    /// `data` is the piece space: each file padded with zeros to a piece boundary.
    pub v2: bool,
}

impl SeedSpec {
    /// An honest seeder of `data`, cut into pieces of `piece_len`.
    pub fn new(data: impl Into<Arc<Vec<u8>>>, piece_len: u64) -> SeedSpec {
        let data = data.into();
        let geo = Geometry {
            total: data.len() as u64,
            piece_len,
        };
        SeedSpec {
            name: "fake seeder".into(),
            has: vec![true; geo.pieces() as usize],
            data,
            geo,
            info_hash: None,
            fast: false,
            have_all: false,
            misbehaviour: Misbehaviour::Honest,
            peer_id: peer_id("FSD"),
            metadata: None,
            v2: false,
        }
    }

    /// An honest seeder of an in-memory torrent.
    pub fn content(content: &Content, info_hash: [u8; 20]) -> SeedSpec {
        SeedSpec::new(content.data.clone(), u64::from(content.piece_len)).info_hash(info_hash)
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    pub fn info_hash(mut self, info_hash: [u8; 20]) -> Self {
        self.info_hash = Some(info_hash);
        self
    }

    pub fn has(mut self, has: Vec<bool>) -> Self {
        self.has = has;
        self
    }

    pub fn fast(mut self, fast: bool) -> Self {
        self.fast = fast;
        self
    }

    pub fn have_all(mut self, have_all: bool) -> Self {
        self.have_all = have_all;
        self
    }

    /// Sets the BEP 52 (v2) bit in its handshake.
    pub fn v2(mut self, v2: bool) -> Self {
        self.v2 = v2;
        self
    }

    pub fn misbehave(mut self, how: Misbehaviour) -> Self {
        if how == Misbehaviour::RejectAll {
            self.fast = true;
            self.have_all = true;
        }
        self.misbehaviour = how;
        self
    }

    /// Serves `info` (an info dictionary's bytes) over `ut_metadata`, honestly. Like
    /// libtorrent, it then says it has every piece with `have all` when the other side speaks
    /// the Fast extension.
    pub fn metadata(mut self, info: impl Into<Arc<Vec<u8>>>) -> Self {
        self.metadata = Some(MetaSpec {
            info: info.into(),
            announced: None,
            misbehaviour: MetaMisbehaviour::Honest,
        });
        self.fast = true;
        self.have_all = true;
        self
    }

    /// How the metadata is served (after [`SeedSpec::metadata`]).
    pub fn meta_misbehave(mut self, how: MetaMisbehaviour) -> Self {
        self.metadata
            .as_mut()
            .expect("meta_misbehave after metadata")
            .misbehaviour = how;
        self
    }

    /// Announces `size` as `metadata_size`, whatever the metadata's real size (after
    /// [`SeedSpec::metadata`]).
    pub fn announce_metadata_size(mut self, size: i64) -> Self {
        self.metadata
            .as_mut()
            .expect("announce_metadata_size after metadata")
            .announced = Some(size);
        self
    }

    /// Starts the seeder on `ip`, any port.
    pub fn start(self, ip: Ipv4Addr) -> FakeSeeder {
        FakeSeeder::start(ip, self)
    }
}

struct Shared {
    spec: SeedSpec,
    stop: AtomicBool,
    report: Mutex<FakeReport>,
    events: Mutex<mpsc::Sender<FakeEvent>>,
    /// Clones of the open connections, shut down on drop to end their threads.
    streams: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    started: Instant,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut FakeReport)) {
        f(&mut lock(&self.report));
    }

    fn event(&self, e: FakeEvent) {
        let _ = lock(&self.events).send(e);
    }
}

/// A seeder written by hand; see [`SeedSpec`] and [`Misbehaviour`].
pub struct FakeSeeder {
    pub addr: SocketAddr,
    pub peer_id: [u8; 20],
    shared: Arc<Shared>,
    events: Mutex<mpsc::Receiver<FakeEvent>>,
    accept_stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl FakeSeeder {
    pub fn start(ip: Ipv4Addr, spec: SeedSpec) -> FakeSeeder {
        let listener = TcpListener::bind((ip, 0)).expect("bind the fake seeder");
        let addr = listener.local_addr().expect("local_addr");
        let (tx, events) = mpsc::channel();
        let peer_id = spec.peer_id;
        let shared = Arc::new(Shared {
            spec,
            stop: AtomicBool::new(false),
            report: Mutex::default(),
            events: Mutex::new(tx),
            streams: Mutex::default(),
            threads: Mutex::default(),
            started: Instant::now(),
        });
        let accept_stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let shared = Arc::clone(&shared);
            accept_loop(
                listener,
                "fake-seeder",
                Arc::clone(&accept_stop),
                move |stream, _| spawn_connection(&shared, stream, false),
            )
        };
        FakeSeeder {
            addr,
            peer_id,
            shared,
            events: Mutex::new(events),
            accept_stop,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it has seen and done so far.
    pub fn report(&self) -> FakeReport {
        lock(&self.shared.report).clone()
    }

    /// All pieces of `data` with 32 KiB pieces.
    pub fn all_pieces(data: &[u8]) -> Vec<bool> {
        vec![true; data.len().div_ceil(super::torrent::PIECE_LEN as usize)]
    }

    /// Dials `to` from this fake's address and behaves as on an accepted connection.
    pub fn dial(&self, to: SocketAddr) {
        let ip = match self.addr.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => unreachable!("fakes listen on IPv4"),
        };
        match Wire::dial(ip, to) {
            Ok(wire) => spawn_connection(&self.shared, wire.stream, true),
            Err(e) => self.shared.record(|r| {
                r.endings
                    .push(format!("outbound to {to}: cannot dial: {e}"))
            }),
        }
    }

    /// Waits for the first event `pick` accepts; `None` after `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&FakeEvent) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let events = lock(&self.events);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match events.recv_timeout(left) {
                Ok(e) => {
                    if let Some(v) = pick(&e) {
                        return Some(v);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits until the downloader has sent a first request (it is connected, interested,
    /// unchoked).
    pub fn wait_for_request(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| {
            matches!(e, FakeEvent::Request { .. }).then_some(())
        })
        .is_some()
    }

    /// Waits until every connection it had has ended (after at least one); `false` after
    /// `timeout`.
    pub fn wait_all_closed(&self, timeout: Duration) -> bool {
        poll_until(timeout, || {
            let r = self.report();
            (r.connections > 0 && r.closed >= r.connections).then_some(())
        })
        .is_some()
    }

    /// Waits (a bounded time) for every connection to end, stops, and returns the report.
    /// Call once the downloader has exited.
    pub fn finish(mut self) -> FakeReport {
        poll_until(DEADLINE, || {
            let r = self.report();
            (r.closed >= r.connections).then_some(())
        });
        self.shutdown();
        self.report()
    }

    fn shutdown(&mut self) {
        self.accept_stop.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for s in lock(&self.shared.streams).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for FakeSeeder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Diagnose for FakeSeeder {
    fn diagnostics(&self) -> String {
        let r = self.report();
        let meta = match &self.shared.spec.metadata {
            None => String::new(),
            Some(m) => format!(
                "metadata ({:?}, {} bytes, announced {}): their extension handshakes {:?}, \
                 requests {:?}, served {:?}, {} reject(s), {} attack(s), their errors {:?}\n",
                m.misbehaviour,
                m.info.len(),
                m.announced_size(),
                r.their_ext,
                r.meta_requests,
                r.meta_served,
                r.meta_rejects,
                r.meta_attacks,
                r.ext_errors
            ),
        };
        format!(
            "===== {} ({:?}) on {}: {} connection(s), {} handshake(s), {} closed, {} request(s) \
             for {} block(s) (at most {} for one), {} block(s) sent ({} bytes), {} flipped, \
             first messages {:?}, their reserved {:?} =====\n{meta}{}\n",
            self.shared.spec.name,
            self.shared.spec.misbehaviour,
            self.addr,
            r.connections,
            r.handshakes,
            r.closed,
            r.requests.len(),
            r.distinct_blocks(),
            r.max_requests_per_block(),
            r.blocks_sent(),
            r.bytes_sent,
            r.flipped,
            r.first_msgs,
            r.their_reserved,
            r.endings.join("\n")
        )
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream, outbound: bool) {
    let from = stream.peer_addr().ok();
    if let Ok(clone) = stream.try_clone() {
        lock(&shared.streams).push(clone);
    }
    shared.record(|r| {
        r.connections += 1;
        r.accepts += usize::from(!outbound);
    });
    let conn = Arc::clone(shared);
    let t = thread::spawn(move || {
        let end = if lock(&conn.report).dropped_in_piece.is_some() {
            "closed at once (already dropped one connection)".to_owned()
        } else {
            match serve(&conn, Wire::new(stream), outbound) {
                Ok(()) => "stopped".to_owned(),
                Err(e) => e,
            }
        };
        let at = conn.started.elapsed();
        let side = if outbound { "outbound to" } else { "from" };
        conn.record(|r| {
            r.closed += 1;
            r.endings.push(format!("{at:>8.3?} {side} {from:?}: {end}"));
        });
    });
    lock(&shared.threads).push(t);
}

/// One connection: handshakes, the claim to have pieces, an unchoke, then the request loop.
/// Returns how it ended.
fn serve(shared: &Shared, mut wire: Wire, outbound: bool) -> Result<(), Closed> {
    let spec = &shared.spec;
    let _ = wire.stream.set_write_timeout(Some(Duration::from_secs(30)));
    let mut our_reserved = if spec.metadata.is_some() {
        with_extension_bit(reserved(spec.fast))
    } else {
        reserved(spec.fast)
    };
    if spec.v2 {
        our_reserved = with_v2_bit(our_reserved);
    }
    let ours = |hash: &[u8; 20]| handshake(hash, &spec.peer_id, our_reserved);
    if outbound {
        wire.send(&ours(
            &spec.info_hash.expect("a dialling fake knows its info hash"),
        ))?;
    }
    let (theirs, hash, _) = wire.handshake_parts(HANDSHAKE_WITHIN)?;
    if spec.info_hash.is_some_and(|h| h != hash) {
        return Err("handshake for another info hash".into());
    }
    shared.record(|r| {
        r.their_reserved.push(theirs);
        r.handshakes += 1;
    });
    let mut hello = if outbound { Vec::new() } else { ours(&hash) };
    if let Some(meta) = &spec.metadata {
        hello.extend(msg_extended(
            EXT_HANDSHAKE,
            &ext_handshake(FAKE_UT_METADATA_ID, Some(meta.announced_size())),
        ));
    }
    if spec.have_all && spec.fast && has_fast_bit(&theirs) {
        hello.extend(frame(id::HAVE_ALL, &[]));
    } else {
        hello.extend(frame(id::BITFIELD, &bitfield(&spec.has)));
    }
    hello.extend(frame(id::UNCHOKE, &[]));
    wire.send(&hello)?;
    shared.event(FakeEvent::Connected);

    let mut pending: Vec<(u32, u32, u32)> = Vec::new();
    // Blocks (piece, offset) sent whole on this connection.
    let mut sent: Vec<(u32, u32)> = Vec::new();
    let mut next_release = Instant::now();
    let mut first = true;
    let mut meta = MetaConn::default();
    while !shared.stop.load(Ordering::SeqCst) {
        let body = wire
            .next_body(Instant::now() + TICK)
            .map_err(|e| format!("the other side closed the connection ({e})"))?;
        let idle = body.is_none();
        if let Some(body) = body.filter(|b| !b.is_empty()) {
            if first {
                shared.record(|r| r.first_msgs.push(body[0]));
                first = false;
            }
            let parsed = parse_triple(&body[1..]);
            match (body[0], parsed) {
                (id::REQUEST, Some(req @ (piece, begin, len))) => {
                    shared.record(|r| r.requests.push(req));
                    shared.event(FakeEvent::Request { piece });
                    if len == 0 || len > MAX_BLOCK || !spec.geo.contains(piece, begin, len) {
                        return Err(format!("bad request {piece}/{begin}/{len}"));
                    }
                    match spec.misbehaviour {
                        Misbehaviour::Stall => {}
                        Misbehaviour::Reverse | Misbehaviour::Paced(_) => pending.push(req),
                        Misbehaviour::RejectAll => {
                            wire.send(&frame(id::REJECT, &triple(piece, begin, len)))?
                        }
                        Misbehaviour::DropMidPiece { after_blocks }
                            if sent.len() >= after_blocks
                                && sent.iter().any(|&(p, _)| p == piece)
                                && !sent.contains(&(piece, begin)) =>
                        {
                            let start = spec.geo.offset(piece, begin);
                            let mut out =
                                msg_piece(piece, begin, &spec.data[start..start + len as usize]);
                            out.truncate(13 + len as usize / 2);
                            wire.send(&out)?;
                            let _ = wire.stream.flush();
                            let _ = wire.stream.shutdown(Shutdown::Both);
                            shared.record(|r| r.dropped_in_piece = Some(piece));
                            return Err(format!(
                                "dropped by us half-way through block {begin} of piece {piece}"
                            ));
                        }
                        _ => {
                            send_blocks(shared, &mut wire, &[req])?;
                            sent.push((piece, begin));
                        }
                    }
                }
                (id::CANCEL, Some(req)) => pending.retain(|q| *q != req),
                (id::EXTENDED, _) => on_extended(shared, &mut wire, &body[1..], &mut meta)?,
                _ => {} // interested, have, keep-alive…: a fake only answers requests
            }
        }
        let batch: Vec<(u32, u32, u32)> = match spec.misbehaviour {
            Misbehaviour::Reverse if idle => pending.drain(..).rev().collect(),
            Misbehaviour::Paced(gap) => match pending.iter().map(|r| r.0).min() {
                Some(piece) if Instant::now() >= next_release => {
                    next_release = Instant::now() + gap;
                    let (now, later): (Vec<_>, Vec<_>) =
                        pending.drain(..).partition(|r| r.0 == piece);
                    pending = later;
                    now
                }
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        send_blocks(shared, &mut wire, &batch)?;
    }
    Ok(())
}

/// One connection's state of the extension protocol.
#[derive(Default)]
struct MetaConn {
    /// The id the other side wants `ut_metadata` messages under.
    their_id: Option<u8>,
    /// Metadata pieces it has asked for on this connection.
    requested: BTreeSet<i64>,
    /// A one-off attack already went out.
    attacked: bool,
}

/// An extended message from the other side: its extension handshake, or a `ut_metadata`
/// request answered as the [`MetaSpec`] says.
fn on_extended(
    shared: &Shared,
    wire: &mut Wire,
    body: &[u8],
    conn: &mut MetaConn,
) -> Result<(), Closed> {
    let error = |what: String| shared.record(|r| r.ext_errors.push(what));
    let Some((&ext_id, payload)) = body.split_first() else {
        error("an extended message without an extended id".into());
        return Ok(());
    };
    if ext_id == EXT_HANDSHAKE {
        match parse_ext_handshake(payload) {
            Some(hello) => {
                conn.their_id = hello.ut_metadata;
                shared.record(|r| r.their_ext.push(hello));
            }
            None => error("an extension handshake that is not a dictionary".into()),
        }
        return Ok(());
    }
    let Some(meta) = &shared.spec.metadata else {
        error(format!(
            "extended message {ext_id} to a fake without metadata"
        ));
        return Ok(());
    };
    if ext_id != FAKE_UT_METADATA_ID {
        error(format!(
            "extended message under id {ext_id}, which this fake never announced"
        ));
        return Ok(());
    }
    let Some(msg) = ut_metadata::parse(payload) else {
        error("a ut_metadata message that does not parse".into());
        return Ok(());
    };
    if msg.msg_type != ut_metadata::REQUEST {
        error(format!("a ut_metadata message of type {}", msg.msg_type));
        return Ok(());
    }
    let piece = msg.piece;
    shared.record(|r| r.meta_requests.push(piece));
    shared.event(FakeEvent::MetaRequest { piece });
    let Some(their_id) = conn.their_id else {
        error("a ut_metadata request before an extension handshake offering it".into());
        return Ok(());
    };
    conn.requested.insert(piece);
    answer_metadata(shared, wire, meta, their_id, piece, conn)
}

/// Answers a `ut_metadata` request for `piece` as `meta.misbehaviour` says.
fn answer_metadata(
    shared: &Shared,
    wire: &mut Wire,
    meta: &MetaSpec,
    their_id: u8,
    piece: i64,
    conn: &mut MetaConn,
) -> Result<(), Closed> {
    let info = meta.info.as_slice();
    let count = ut_metadata::pieces(info.len()) as i64;
    let total = meta.announced_size();
    let last = piece == count - 1;
    let attack = |wire: &mut Wire, payload: Vec<u8>| -> Result<(), Closed> {
        wire.send(&msg_extended(their_id, &payload))?;
        shared.record(|r| r.meta_attacks += 1);
        shared.event(FakeEvent::MetaAttack);
        Ok(())
    };
    let honest = |wire: &mut Wire, piece: i64| -> Result<(), Closed> {
        let bytes = ut_metadata::piece_of(info, piece as usize);
        wire.send(&msg_extended(
            their_id,
            &ut_metadata::data(piece, total, bytes),
        ))?;
        shared.record(|r| r.meta_served.push(piece));
        Ok(())
    };
    use MetaMisbehaviour as M;
    match meta.misbehaviour {
        M::Silent => Ok(()),
        M::RejectAll => {
            wire.send(&msg_extended(their_id, &ut_metadata::reject(piece)))?;
            shared.record(|r| r.meta_rejects += 1);
            Ok(())
        }
        _ if !(0..count).contains(&piece) => {
            wire.send(&msg_extended(their_id, &ut_metadata::reject(piece)))?;
            shared.record(|r| r.meta_rejects += 1);
            Ok(())
        }
        M::Honest => honest(wire, piece),
        M::PieceOutOfRange if !conn.attacked => {
            conn.attacked = true;
            let junk = vec![0x5a; ut_metadata::PIECE];
            attack(wire, ut_metadata::data(count, total, &junk))
        }
        M::LastPieceLong if last => {
            let mut bytes = ut_metadata::piece_of(info, piece as usize).to_vec();
            bytes.push(b'e');
            attack(wire, ut_metadata::data(piece, total, &bytes))
        }
        M::LastPieceShort if last => {
            let bytes = ut_metadata::piece_of(info, piece as usize);
            attack(
                wire,
                ut_metadata::data(piece, total, &bytes[..bytes.len() - 1]),
            )
        }
        M::WrongTotalSize => {
            let bytes = ut_metadata::piece_of(info, piece as usize);
            attack(wire, ut_metadata::data(piece, total + 1, bytes))
        }
        M::Corrupt => {
            let mut bytes = ut_metadata::piece_of(info, piece as usize).to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x20;
            attack(wire, ut_metadata::data(piece, total, &bytes))
        }
        M::Unasked if !conn.attacked => {
            conn.attacked = true;
            if let Some(other) = (0..count).rev().find(|p| !conn.requested.contains(p)) {
                let bytes = ut_metadata::piece_of(info, other as usize);
                attack(wire, ut_metadata::data(other, total, bytes))?;
            }
            honest(wire, piece)
        }
        M::PieceOutOfRange | M::LastPieceLong | M::LastPieceShort | M::Unasked => {
            honest(wire, piece)
        }
    }
}

/// Sends the blocks of `batch` the seeder has, as its misbehaviour says.
fn send_blocks(shared: &Shared, wire: &mut Wire, batch: &[(u32, u32, u32)]) -> Result<(), Closed> {
    let spec = &shared.spec;
    for (i, &(piece, begin, len)) in batch.iter().enumerate() {
        if !spec.has.get(piece as usize).copied().unwrap_or(false) {
            continue;
        }
        let start = spec.geo.offset(piece, begin);
        let mut block = spec.data[start..start + len as usize].to_vec();
        let mut report = lock(&shared.report);
        let flipped = match spec.misbehaviour {
            Misbehaviour::CorruptEveryBlock => {
                block[0] ^= 0xff;
                true
            }
            Misbehaviour::FlipFirstByte if begin == 0 => {
                block[0] = !block[0];
                true
            }
            Misbehaviour::CorruptFirstBlock if report.corrupted.is_none() => {
                block[len as usize / 2] ^= 0x5a;
                report.corrupted = Some((piece, begin));
                true
            }
            _ => false,
        };
        drop(report);
        // Taken before the write: the other side cannot have the block, let alone verify
        // its piece, before this instant.
        let before = Instant::now();
        wire.send(&msg_piece(piece, begin, &block))?;
        shared.record(|r| {
            r.served.push((piece, begin));
            r.bytes_sent += u64::from(len);
            if flipped {
                r.flipped += 1;
            } else {
                r.good_blocks += 1;
            }
        });
        if batch[i + 1..].iter().all(|r| r.0 != piece) {
            shared.event(FakeEvent::Served { piece, at: before });
        }
    }
    Ok(())
}

/// Answers the other side's requests with the right bytes, as a well-behaved seeder would,
/// until it closes the connection or `within` passes. Returns the number of blocks served.
pub fn serve_requests(wire: &mut Wire, content: &Content, within: Duration) -> Result<u32, String> {
    let deadline = Instant::now() + within;
    let mut served = 0;
    loop {
        match wire.next(deadline) {
            Ok(Some(Msg::Request { piece, offset, len })) => {
                let Some(data) = content.block(piece, offset, len) else {
                    return Err(format!(
                        "bitfetch requested a block outside the torrent: {piece}/{offset}/{len}"
                    ));
                };
                if wire.send(&msg_piece(piece, offset, data)).is_err() {
                    return Ok(served);
                }
                served += 1;
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("still connected after {within:?}")),
            Err(_) => return Ok(served),
        }
    }
}

// =============================================================================================
// The fake leecher
// =============================================================================================

#[derive(Debug, Default, Clone)]
pub struct LeechReport {
    /// Payload bytes of `piece` messages received.
    pub bytes: u64,
    pub blocks: usize,
    pub bad_blocks: usize,
    pub rejects: usize,
    pub chokes: usize,
    pub unchokes: usize,
    pub done: bool,
    pub ended: Option<String>,
}

/// A hand-written downloader: dials `to` from `ip` with the Fast bit, says interested, and
/// keeps `depth` requests outstanding over all blocks in order (once each), counting every
/// byte of block data it receives. Rejected requests are asked again.
pub struct FakeLeecher {
    report: Arc<Mutex<LeechReport>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    name: String,
}

impl FakeLeecher {
    pub fn start(
        name: &str,
        ip: Ipv4Addr,
        to: SocketAddr,
        info_hash: [u8; 20],
        data: Arc<Vec<u8>>,
        geo: Geometry,
        depth: usize,
    ) -> FakeLeecher {
        let report = Arc::new(Mutex::new(LeechReport::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (report, stop) = (Arc::clone(&report), Arc::clone(&stop));
            thread::spawn(move || {
                let result = leech(ip, to, info_hash, &data, geo, depth, &report, &stop);
                lock(&report).ended = Some(format!("{result:?}"));
            })
        };
        FakeLeecher {
            report,
            stop,
            thread: Some(thread),
            name: name.to_owned(),
        }
    }

    pub fn report(&self) -> LeechReport {
        lock(&self.report).clone()
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.report).bytes
    }

    pub fn ended(&self) -> Option<String> {
        lock(&self.report).ended.clone()
    }
}

impl Drop for FakeLeecher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Diagnose for FakeLeecher {
    fn diagnostics(&self) -> String {
        format!("===== {} =====\n{:?}\n", self.name, self.report())
    }
}

#[allow(clippy::too_many_arguments)]
fn leech(
    ip: Ipv4Addr,
    to: SocketAddr,
    info_hash: [u8; 20],
    data: &[u8],
    geo: Geometry,
    depth: usize,
    report: &Mutex<LeechReport>,
    stop: &AtomicBool,
) -> Result<(), Closed> {
    let mut wire = Wire::dial(ip, to).map_err(|e| format!("cannot dial: {e}"))?;
    let _ = wire.stream.set_write_timeout(Some(Duration::from_secs(30)));
    wire.send(&handshake(&info_hash, &peer_id("FLC"), reserved(true)))?;
    let (theirs, _, _) = wire.handshake_parts(HANDSHAKE_WITHIN)?;
    let fast = has_fast_bit(&theirs);
    wire.send(&frame(id::INTERESTED, &[]))?;
    let mut todo: VecDeque<(u32, u32, u32)> = geo.blocks().into();
    let mut outstanding: Vec<(u32, u32, u32)> = Vec::new();
    let mut unchoked = false;
    while !stop.load(Ordering::SeqCst) {
        if unchoked {
            let mut batch = Vec::new();
            while outstanding.len() < depth {
                let Some(b) = todo.pop_front() else { break };
                batch.extend_from_slice(&frame(id::REQUEST, &triple(b.0, b.1, b.2)));
                outstanding.push(b);
            }
            if !batch.is_empty() {
                wire.send(&batch)?;
            }
        }
        if todo.is_empty() && outstanding.is_empty() {
            // Stay connected (the seeder decides when it is done), until told to stop.
            lock(report).done = true;
        }
        let Some((mid, payload)) = wire.next_message(Instant::now() + TICK * 10)? else {
            continue;
        };
        let mut r = lock(report);
        match mid {
            id::UNCHOKE => {
                unchoked = true;
                r.unchokes += 1;
            }
            id::CHOKE => {
                unchoked = false;
                r.chokes += 1;
                if !fast {
                    // BEP 3: a choke drops every pending request.
                    for b in outstanding.drain(..).rev() {
                        todo.push_front(b);
                    }
                }
            }
            id::REJECT => {
                r.rejects += 1;
                if let Some(t) = parse_triple(&payload)
                    && let Some(i) = outstanding.iter().position(|b| *b == t)
                {
                    todo.push_front(outstanding.remove(i));
                }
            }
            id::PIECE if payload.len() >= 8 => {
                let (piece, begin) = (
                    super::wire::be32(&payload, 0),
                    super::wire::be32(&payload, 4),
                );
                let block = &payload[8..];
                let t = (piece, begin, block.len() as u32);
                r.bytes += block.len() as u64;
                r.blocks += 1;
                let start = geo.offset(piece, begin);
                if data.get(start..start + block.len()) != Some(block) {
                    r.bad_blocks += 1;
                }
                if let Some(i) = outstanding.iter().position(|b| *b == t) {
                    outstanding.remove(i);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

// =============================================================================================
// The counting relay
// =============================================================================================

/// Forwards every connection it accepts to `target` and counts the bytes `target` sends back.
pub struct Relay {
    addr: SocketAddr,
    from_target: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    pumps: Arc<Mutex<Vec<JoinHandle<()>>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `ip`, any port.
    pub fn start(ip: Ipv4Addr, target: SocketAddr) -> Relay {
        let listener =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let from_target = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let pumps: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let thread = {
            let (counter, pumps) = (Arc::clone(&from_target), Arc::clone(&pumps));
            accept_loop(listener, "relay", Arc::clone(&stop), move |client, _| {
                // A target that is gone is seen by the downloader as a dropped connection.
                let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(10))
                else {
                    return;
                };
                let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone())
                else {
                    return;
                };
                let mut pumps = lock(&pumps);
                pumps.push(pump(client, upstream, None));
                pumps.push(pump(upstream2, client2, Some(Arc::clone(&counter))));
            })
        };
        Relay {
            addr,
            from_target,
            stop,
            pumps,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes the target has sent through the relay so far.
    pub fn bytes_from_target(&self) -> u64 {
        self.from_target.load(Ordering::SeqCst)
    }

    /// Stops accepting and waits for the connections to end (call after both ends are done).
    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let pumps = std::mem::take(&mut *lock(&self.pumps));
        for p in pumps {
            let _ = p.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Only the accept loop: a pump ends with its connection.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies `from` into `to` until either side ends, then passes the end on.
fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let _ = from.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = to.set_write_timeout(Some(Duration::from_secs(60)));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(c) = &count {
                c.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    })
}
