//! The `outbox` target: a connection's command queue ([`crate::outbox`]) under any
//! interleaving of what the session, the reader and the writer do to it.
//!
//! The session's half is our own code, but the reader's half is the peer's: every request and
//! cancel a peer sends (once it is a valid range of the torrent) is passed on here, as many as
//! the reader lets through. The input is read as a list of operations on the real
//! [`Outbox`]es and [`Inbox`], and what the writer takes is checked against a plain model of
//! what each side asked for:
//!
//! - the latest choke, interest and intro win; haves and requests keep their order;
//! - a cancel of a request not yet taken removes it, so the requests the peer ends up told
//!   about are exactly those the session still wants;
//! - a peer's cancel drops all of its earlier requests for that range that are still queued
//!   when the writer takes it, and none of its later ones, however the writer's takes fall
//!   between them;
//! - no list outgrows its cap: our requests and cancels together stay within
//!   [`MAX_PENDING_BLOCKS`] and haves within the piece count, or the connection is ended with
//!   [`PeerError::Backlog`] and what piled up is dropped; the peer's distinct cancels stay
//!   within the reader's cap, and one past it is refused and changes nothing;
//! - the doorbell rings after every change, once however many, and the writer sees
//!   [`Wake::Closed`] once every outbox is gone.
//!
//! Input layout: byte 0 is the piece count less one (mod 64; two blocks a piece), byte 1 the
//! reader's cap on distinct cancels (bit 7 set: [`MAX_QUEUED_SERVES`], else the low four bits,
//! so 0 to 15), then operations: an opcode byte (mod [`Op::COUNT`]) and its argument bytes, as
//! [`Op::decode`] reads them. The input ends at the first operation missing an argument.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::geometry::{BLOCK_LEN, BlockRef, Geometry, PieceIndex};
use crate::messages::{Command, HaveSummary};
use crate::outbox::{self, CancelServe, Inbox, MAX_PENDING_BLOCKS, Outbox, Pending, Wake};
use crate::peer::{Ending, MAX_QUEUED_SERVES, PeerError};

use super::on_small_stack;

/// The per-peer command queue: session commands, the reader's serve requests and cancels,
/// and the writer's takes, in any order.
pub fn outbox(data: &[u8]) {
    on_small_stack(data, |data| {
        run_outbox(data);
    });
}

/// One step by one of the three parties. Block and piece arguments index the torrent's
/// blocks (or, for the peer's ranges, its blocks and one unaligned range a piece), wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    // The session.
    Choke(bool),
    Interested(bool),
    Have(u8),
    /// `count` consecutive blocks from `first`.
    Request {
        first: u8,
        count: u8,
    },
    Cancel(u8),
    /// 0: have none, 1: have all, 2: a bitfield.
    Intro(u8),
    Shutdown,
    // The reader, passing on the peer's messages.
    /// `count` consecutive ranges from `first`, as one batch.
    Serve {
        first: u8,
        count: u8,
    },
    CancelServe(u8),
    /// The reader ends (the peer closed): its outbox is dropped.
    ReaderEnds,
    // The writer.
    Take,
    TakeIntro,
    Rung,
    /// A wait that times out at once unless the doorbell rang.
    Wait,
    /// Sends up to this many of the peer's queued requests.
    Upload(u8),
}

impl Op {
    pub const COUNT: u8 = 15;

    /// The next operation in `bytes`; `None` when they run out.
    pub fn decode(bytes: &mut impl Iterator<Item = u8>) -> Option<Op> {
        let code = bytes.next()? % Op::COUNT;
        let mut arg = || bytes.next();
        Some(match code {
            0 => Op::Choke(arg()? & 1 == 1),
            1 => Op::Interested(arg()? & 1 == 1),
            2 => Op::Have(arg()?),
            3 => Op::Request {
                first: arg()?,
                count: arg()?,
            },
            4 => Op::Cancel(arg()?),
            5 => Op::Intro(arg()?),
            6 => Op::Shutdown,
            7 => Op::Serve {
                first: arg()?,
                count: arg()?,
            },
            8 => Op::CancelServe(arg()?),
            9 => Op::ReaderEnds,
            10 => Op::Take,
            11 => Op::TakeIntro,
            12 => Op::Rung,
            13 => Op::Wait,
            _ => Op::Upload(arg()?),
        })
    }

    /// The bytes [`Op::decode`] reads back as `self` (for handmade inputs).
    #[cfg(test)]
    pub fn encode(self, out: &mut Vec<u8>) {
        let (code, args): (u8, &[u8]) = match self {
            Op::Choke(c) => (0, &[u8::from(c)]),
            Op::Interested(i) => (1, &[u8::from(i)]),
            Op::Have(p) => (2, &[p]),
            Op::Request { first, count } => (3, &[first, count]),
            Op::Cancel(b) => (4, &[b]),
            Op::Intro(k) => (5, &[k]),
            Op::Shutdown => (6, &[]),
            Op::Serve { first, count } => (7, &[first, count]),
            Op::CancelServe(b) => (8, &[b]),
            Op::ReaderEnds => (9, &[]),
            Op::Take => (10, &[]),
            Op::TakeIntro => (11, &[]),
            Op::Rung => (12, &[]),
            Op::Wait => (13, &[]),
            Op::Upload(n) => (14, &[n]),
        };
        out.push(code);
        out.extend_from_slice(args);
    }
}

/// What a run went through, so tests can tell which paths their inputs reach.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OutboxTally {
    pub ops: usize,
    /// Takes of pending work (not counting the last look at the end).
    pub takes: usize,
    /// The outbox ended the connection: our requests and cancels, or haves, piled up.
    pub backlog: bool,
    /// A peer's cancel was refused at the cap.
    pub cancel_overflow: bool,
    /// The reader stopped passing requests on: too many queued at once.
    pub request_flood: bool,
    /// Blocks the writer sent to the peer.
    pub uploaded: usize,
    /// The writer stopped on a shutdown.
    pub writer_stopped: bool,
}

/// Runs `data` (see the module docs) and checks every promise on the way.
pub fn run_outbox(data: &[u8]) -> OutboxTally {
    let [pieces, cap, ops @ ..] = data else {
        return OutboxTally::default();
    };
    let cap = if cap & 0x80 != 0 {
        MAX_QUEUED_SERVES
    } else {
        usize::from(cap & 0x0f)
    };
    let mut h = Harness::new(u32::from(pieces % 64) + 1, cap);
    let mut bytes = ops.iter().copied();
    while let Some(op) = Op::decode(&mut bytes) {
        h.apply(op);
        h.tally.ops += 1;
    }
    h.finish()
}

/// What the outbox should hold: everything asked for since the writer last took its work.
#[derive(Debug, Default)]
struct Expected {
    intro: Option<HaveSummary>,
    choke: Option<bool>,
    interested: Option<bool>,
    haves: Vec<PieceIndex>,
    requests: Vec<BlockRef>,
    cancels: Vec<BlockRef>,
    serves: Vec<BlockRef>,
    /// The peer's cancels noted (distinct ranges).
    cancelled: HashSet<BlockRef>,
    shutdown: bool,
}

/// How many of each block: what the session wants from the peer, and what the peer was told.
type Counts = HashMap<BlockRef, usize>;

fn add(counts: &mut Counts, b: BlockRef) {
    *counts.entry(b).or_default() += 1;
}

/// Removes one `b`, if there is one (a cancel of a request that is not out does nothing).
fn remove(counts: &mut Counts, b: BlockRef) {
    if let Some(n) = counts.get_mut(&b) {
        *n -= 1;
        if *n == 0 {
            counts.remove(&b);
        }
    }
}

/// The peer's requests as BEP 3 reads them: a cancel drops the requests for its range that
/// came before it and are not sent yet. The writer learns of a cancel only when it takes its
/// work, and may send a block in between (the cancel came too late, as BEP 3 allows), so the
/// cancels wait here until the writer takes them.
#[derive(Debug, Default)]
struct Owed {
    /// Each request with the number of requests before it.
    requests: VecDeque<(u64, BlockRef)>,
    /// Cancels not yet taken, each with the number of requests before it.
    cancels: Vec<(u64, BlockRef)>,
    arrived: u64,
}

impl Owed {
    fn request(&mut self, b: BlockRef) {
        self.requests.push_back((self.arrived, b));
        self.arrived += 1;
    }

    fn cancel(&mut self, b: BlockRef) {
        self.cancels.push((self.arrived, b));
    }

    /// The writer took the cancels so far.
    fn taken(&mut self) {
        for (before, b) in self.cancels.drain(..) {
            self.requests.retain(|&(n, r)| r != b || n >= before);
        }
    }

    /// The writer sent the oldest request.
    fn sent(&mut self) -> Option<BlockRef> {
        self.requests.pop_front().map(|(_, b)| b)
    }

    fn blocks(&self) -> impl Iterator<Item = BlockRef> + '_ {
        self.requests.iter().map(|&(_, b)| b)
    }
}

struct Harness {
    geometry: Geometry,
    /// Our aligned blocks: what the session requests and cancels.
    blocks: Vec<BlockRef>,
    /// The ranges the peer asks for: the blocks and one unaligned range a piece.
    ranges: Vec<BlockRef>,
    /// The reader's cap on the peer's distinct cancels.
    cap: usize,
    ending: Arc<Ending>,
    session: Option<Outbox>,
    /// Dropped when the reader ends (the peer closed, or a cap or flood stopped it).
    reader: Option<Outbox>,
    /// Dropped when the writer stops (on a shutdown).
    inbox: Option<Inbox>,
    /// The writer's reused work, as [`crate::peer`]'s writer keeps it.
    work: Pending,
    expected: Expected,
    /// Whether the doorbell should ring.
    ringing: bool,
    /// The outbox ended the connection: what was pending is gone, so what was asked for and
    /// what went out no longer match.
    ended: bool,
    /// Our requests the session wants answered, and the ones the peer was told about.
    wanted: Counts,
    told: Counts,
    /// The peer's requests queued at the writer, and the ones the peer is owed.
    queue: VecDeque<BlockRef>,
    owed: Owed,
    /// The reader's count of the peer's requests at the writer or on the way to it (the
    /// `queued` counter shared by a connection's threads).
    queued: usize,
    tally: OutboxTally,
}

impl Harness {
    fn new(pieces: u32, cap: usize) -> Harness {
        // Two blocks a piece, the last one short.
        let piece_len = 2 * BLOCK_LEN;
        let total = u64::from(pieces) * u64::from(piece_len) - 1000;
        let geometry = Geometry::new(piece_len, &[total], u64::from(pieces))
            .expect("a valid geometry for 1 to 64 pieces");
        let blocks: Vec<BlockRef> = geometry
            .pieces()
            .flat_map(|p| geometry.blocks(p).collect::<Vec<_>>())
            .collect();
        let unaligned = geometry.pieces().map(|p| {
            geometry
                .request(p.get(), 1000, 100)
                .expect("inside the piece")
        });
        let ranges = blocks.iter().copied().chain(unaligned).collect();
        let ending = Arc::new(Ending::default());
        let (session, inbox) = outbox::outbox(Arc::clone(&ending), None, pieces);
        Harness {
            geometry,
            blocks,
            ranges,
            cap,
            ending,
            reader: Some(session.clone()),
            session: Some(session),
            inbox: Some(inbox),
            work: Pending::default(),
            expected: Expected::default(),
            ringing: false,
            ended: false,
            wanted: Counts::new(),
            told: Counts::new(),
            queue: VecDeque::new(),
            owed: Owed::default(),
            queued: 0,
            tally: OutboxTally::default(),
        }
    }

    fn block(&self, i: u8) -> BlockRef {
        self.blocks[usize::from(i) % self.blocks.len()]
    }

    fn range(&self, i: u8) -> BlockRef {
        self.ranges[usize::from(i) % self.ranges.len()]
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Choke(choke) => {
                self.expected.choke = Some(choke);
                self.send(Command::Choke(choke));
            }
            Op::Interested(yes) => {
                self.expected.interested = Some(yes);
                self.send(Command::Interested(yes));
            }
            Op::Have(i) => {
                let piece = self
                    .geometry
                    .piece(u32::from(i) % self.geometry.piece_count())
                    .expect("in range");
                self.expected.haves.push(piece);
                self.send(Command::Have(piece));
            }
            Op::Request { first, count } => {
                let blocks: Vec<BlockRef> = (0..count)
                    .map(|k| self.block(first.wrapping_add(k)))
                    .collect();
                for &b in &blocks {
                    add(&mut self.wanted, b);
                }
                self.expected.requests.extend(&blocks);
                self.send(Command::Request(blocks));
            }
            Op::Cancel(i) => self.cancel(self.block(i)),
            Op::Intro(kind) => self.intro(kind),
            Op::Shutdown => {
                self.expected.shutdown = true;
                self.send(Command::Shutdown);
            }
            Op::Serve { first, count } => self.serve(first, count),
            Op::CancelServe(i) => self.cancel_serve(self.range(i)),
            Op::ReaderEnds => self.reader = None,
            Op::Take => self.take(),
            Op::TakeIntro => self.take_intro(),
            Op::Rung => {
                if let Some(inbox) = &self.inbox {
                    assert_eq!(inbox.rung(), self.ringing, "doorbell");
                    self.ringing = false;
                }
            }
            Op::Wait => self.wait(),
            Op::Upload(n) => self.upload(n),
        }
    }

    /// A session command; the model has been updated for it. Predicts an overflow from the
    /// model and checks it happened, at the end, through the connection's ending.
    fn send(&mut self, cmd: Command) {
        let session = self.session.as_ref().expect("the session outlives the run");
        session.send(cmd);
        // Sent or failed, the writer is woken.
        self.ringing = true;
        let e = &self.expected;
        let overflow = e.requests.len() + e.cancels.len() > MAX_PENDING_BLOCKS
            || e.haves.len() > self.geometry.piece_count() as usize;
        if overflow {
            // Everything pending is dropped and the writer told to stop; the socket is shut,
            // so the reader ends too.
            self.expected = Expected {
                shutdown: true,
                ..Expected::default()
            };
            self.ended = true;
            self.tally.backlog = true;
            self.reader = None;
        }
    }

    fn cancel(&mut self, b: BlockRef) {
        remove(&mut self.wanted, b);
        let e = &mut self.expected;
        match e.requests.iter().position(|&r| r == b) {
            Some(at) => {
                e.requests.remove(at);
            }
            None => e.cancels.push(b),
        }
        self.send(Command::Cancel(b));
    }

    fn intro(&mut self, kind: u8) {
        let len = self.geometry.piece_count().div_ceil(8) as usize;
        let summary = match kind % 3 {
            0 => HaveSummary::None,
            1 => HaveSummary::All(vec![0xff; len]),
            _ => HaveSummary::Some(vec![kind; len]),
        };
        self.expected.intro = Some(summary.clone());
        self.send(Command::Intro(summary));
    }

    /// A batch of the peer's requests, passed on as the reader does unless it would take
    /// more than [`MAX_QUEUED_SERVES`] to the writer at once (the reader then ends with a
    /// request flood, passing nothing).
    fn serve(&mut self, first: u8, count: u8) {
        let Some(reader) = &self.reader else { return };
        let n = usize::from(count);
        if self.queued + n > MAX_QUEUED_SERVES {
            self.tally.request_flood = true;
            self.reader = None;
            return;
        }
        let mut batch: Vec<BlockRef> = (0..count)
            .map(|k| self.range(first.wrapping_add(k)))
            .collect();
        self.queued += n;
        for &b in &batch {
            self.owed.request(b);
        }
        self.expected.serves.extend(&batch);
        self.ringing |= n > 0;
        reader.serve(&mut batch);
        assert!(
            batch.is_empty(),
            "the outbox left requests in the reader's batch"
        );
    }

    /// A peer's cancel, passed on as the reader does: only while some request of the peer is
    /// queued; refused past the cap, which ends the reader.
    fn cancel_serve(&mut self, b: BlockRef) {
        let Some(reader) = &self.reader else { return };
        if self.queued == 0 {
            return;
        }
        let full =
            self.expected.cancelled.len() >= self.cap && !self.expected.cancelled.contains(&b);
        match reader.cancel_serve(b, self.cap) {
            CancelServe::Noted => {
                assert!(!full, "a cancel past the cap of {} was noted", self.cap);
                self.expected.cancelled.insert(b);
                self.owed.cancel(b);
                self.ringing = true;
            }
            CancelServe::Overflow => {
                assert!(full, "a cancel within the cap of {} was refused", self.cap);
                self.tally.cancel_overflow = true;
                self.reader = None;
            }
        }
    }

    fn take_intro(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        let (intro, shutdown) = inbox.take_intro();
        assert_eq!(intro, self.expected.intro.take(), "intro");
        assert_eq!(shutdown, self.expected.shutdown, "shutdown");
        if intro.is_none() && shutdown {
            // The writer stops before its intro goes out.
            self.writer_stops();
        }
    }

    /// The writer takes its work into the batch it reuses (holding the last batch's lists).
    fn take(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        inbox.take(&mut self.work);
        self.tally.takes += 1;
        let expected = std::mem::take(&mut self.expected);
        self.check_caps();
        self.check_taken(&expected);
        self.tell_peer();
        self.queue_serves();
        if self.work.shutdown {
            self.writer_stops();
        }
    }

    fn writer_stops(&mut self) {
        self.inbox = None;
        self.tally.writer_stopped = true;
    }

    fn check_caps(&self) {
        let w = &self.work;
        assert!(
            w.requests.len() + w.cancels.len() <= MAX_PENDING_BLOCKS,
            "{} requests and {} cancels pending",
            w.requests.len(),
            w.cancels.len()
        );
        assert!(
            w.haves.len() <= self.geometry.piece_count() as usize,
            "{} haves pending for {} pieces",
            w.haves.len(),
            self.geometry.piece_count()
        );
        assert!(
            w.serves.len() <= MAX_QUEUED_SERVES,
            "{} serves",
            w.serves.len()
        );
        assert!(
            w.cancel_serves.len() <= self.cap,
            "{} peer cancels pending, cap {}",
            w.cancel_serves.len(),
            self.cap
        );
    }

    fn check_taken(&self, e: &Expected) {
        let w = &self.work;
        assert_eq!(w.intro, e.intro, "intro");
        assert_eq!(w.choke, e.choke, "the latest choke decision");
        assert_eq!(w.interested, e.interested, "the latest interest");
        assert_eq!(w.haves, e.haves, "haves");
        assert_eq!(w.requests, e.requests, "requests");
        assert_eq!(w.cancels, e.cancels, "cancels");
        assert_eq!(w.serves, e.serves, "the peer's requests");
        let cancelled: HashSet<BlockRef> = w.cancel_serves.keys().copied().collect();
        assert_eq!(cancelled, e.cancelled, "the peer's cancels");
        assert!(
            w.cancel_serves
                .values()
                .all(|&after| after <= w.serves.len()),
            "a cancel after more requests than there are"
        );
        assert_eq!(w.shutdown, e.shutdown, "shutdown");
    }

    /// Our side of the wire: the writer sends the cancels, then the requests (as
    /// `WriterState::apply` does); the peer must then hold exactly the requests the session
    /// still wants.
    fn tell_peer(&mut self) {
        if self.ended {
            return;
        }
        for &c in &self.work.cancels {
            remove(&mut self.told, c);
        }
        for &r in &self.work.requests {
            add(&mut self.told, r);
        }
        assert_eq!(
            self.told, self.wanted,
            "the peer was told other requests than the session wants"
        );
    }

    /// The peer's side: the writer's reading of the cancels (`WriterState::cancel_serves` and
    /// `apply`): each drops the requests already queued and those of this batch before it.
    /// What stays queued must be what the peer is owed, in order, now that the writer knows
    /// of every cancel so far.
    fn queue_serves(&mut self) {
        self.owed.taken();
        let cancels = &self.work.cancel_serves;
        let before = self.queue.len();
        self.queue.retain(|s| !cancels.contains_key(s));
        self.queued -= before - self.queue.len();
        for (i, &b) in self.work.serves.iter().enumerate() {
            let cancelled = cancels.get(&b).is_some_and(|&after| i < after);
            if cancelled {
                self.queued -= 1;
            } else {
                self.queue.push_back(b);
            }
        }
        if !self.ended {
            assert!(
                self.queue.iter().copied().eq(self.owed.blocks()),
                "the writer would serve {:?}, the peer is owed {:?}",
                self.queue,
                self.owed.blocks().collect::<Vec<_>>()
            );
        }
    }

    fn wait(&mut self) {
        let Some(inbox) = &self.inbox else { return };
        let want = if self.ringing {
            Wake::Rung
        } else {
            Wake::TimedOut
        };
        assert_eq!(inbox.wait(Duration::ZERO), want);
        self.ringing = false;
    }

    /// The writer sends up to `n` of the peer's requests, oldest first.
    fn upload(&mut self, n: u8) {
        if self.inbox.is_none() {
            return;
        }
        for _ in 0..n {
            let Some(b) = self.queue.pop_front() else {
                break;
            };
            self.queued -= 1;
            self.tally.uploaded += 1;
            if !self.ended {
                assert_eq!(self.owed.sent(), Some(b), "served out of order");
            }
        }
    }

    /// The session and the reader let go: the writer takes what is left, then sees its
    /// outboxes gone. The connection ended with a backlog exactly when a cap was passed.
    fn finish(mut self) -> OutboxTally {
        let takes = self.tally.takes;
        self.take();
        self.tally.takes = takes;
        self.session = None;
        self.reader = None;
        if let Some(inbox) = &self.inbox {
            assert_eq!(inbox.rung(), self.ringing, "doorbell at the end");
            assert_eq!(inbox.wait(Duration::ZERO), Wake::Closed, "outboxes gone");
        }
        match self.ending.take() {
            Ok(()) => assert!(!self.ended, "a cap was passed and the connection goes on"),
            Err(PeerError::Backlog(_)) => assert!(self.ended, "a backlog within the caps"),
            Err(e) => panic!("the outbox ended the connection with {e:?}"),
        }
        self.tally
    }
}
