//! What a connection's writer is to do next: the session's [`Command`]s and its reader's
//! requests, kept as *state*, not as a log of every event.
//!
//! A peer that stops reading its socket must not make us queue without bound. So the choke
//! and interest decisions keep only their latest value (a thousand flips cost one `bool`),
//! cancels of requests that have not gone out yet remove them instead of queueing beside
//! them, and every list has a cap; a connection whose cap is reached is ended with
//! [`PeerError::Backlog`] (the writer has not been taking its work for a long while). Nothing
//! here blocks for longer than a short critical section: the session never waits on a peer.
//!
//! The session and the reader hold [`Outbox`]es; the writer holds the one [`Inbox`]. A bounded
//! doorbell channel of one slot wakes the writer: ringing it when it already rings is a no-op.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::Mutex;

use crate::geometry::{BlockRef, PieceIndex};
use crate::hash_msg::PieceAnswer;
use crate::messages::{Command, HaveSummary};
use crate::peer::{Ending, PeerError};

/// Our requests and cancels waiting for a writer, together. The session keeps at most 2,000
/// requests outstanding per peer (a long fat pipe's worth), and may hand a whole pipeline over
/// at once; past twice that the writer has been stuck through several refills (the peer
/// choking and unchoking us while it does not read, say).
pub const MAX_PENDING_BLOCKS: usize = 4096;
/// Extended messages (metadata pieces we serve, 16 KiB each) that may wait for the writer;
/// past this many, more requests are answered by nobody (the peer asks again or elsewhere).
pub const MAX_PENDING_EXTENDED: usize = 8;
/// Answers to the peer's BEP 52 hash requests that may wait for the writer (each up to some
/// 18 KiB); past this many the peer is not reading them, and the connection ends.
pub const MAX_PENDING_HASHES: usize = 64;

/// The answer to one of the peer's hash requests, for the writer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashWork {
    /// Ready to go: `hashes` or `hash reject`.
    Send(crate::wire::Message),
    /// `hashes` from a piece's data, which the writer reads (or a `hash reject` when it has
    /// not announced the piece or the data does not match).
    FromPiece(PieceAnswer),
}

/// The writer's work, as the session and the reader left it.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub intro: Option<HaveSummary>,
    /// Latest choke decision (true = choke), if any since the writer last looked.
    pub choke: Option<bool>,
    /// Latest interest decision.
    pub interested: Option<bool>,
    /// Pieces to announce; each piece is verified once, so never more than the torrent has.
    pub haves: Vec<PieceIndex>,
    /// Cancels of requests that already went out (a cancel of one still here removes it).
    pub cancels: Vec<BlockRef>,
    pub requests: Vec<BlockRef>,
    /// Requests from the peer, in order (counted against `MAX_QUEUED_SERVES` by the reader).
    pub serves: Vec<BlockRef>,
    /// The peer's cancels: each block with how many of `serves` came before its latest
    /// cancel. The cancel applies to those and to everything the writer already queued; a
    /// request for the same block after the cancel stands.
    pub cancel_serves: HashMap<BlockRef, usize>,
    /// Extended messages to send, as (the peer's id for the extension, payload).
    pub extended: Vec<(u8, Vec<u8>)>,
    /// The latest `ut_pex` message (the peer's id for it, payload): one at most.
    pub pex: Option<(u8, Vec<u8>)>,
    /// Answers to the peer's hash requests, in order.
    pub hashes: Vec<HashWork>,
    pub shutdown: bool,
}

impl Pending {
    fn clear(&mut self) {
        self.intro = None;
        self.choke = None;
        self.interested = None;
        self.haves.clear();
        self.cancels.clear();
        self.requests.clear();
        self.serves.clear();
        self.cancel_serves.clear();
        self.extended.clear();
        self.pex = None;
        self.hashes.clear();
        self.shutdown = false;
    }

    /// Nothing for the writer to do.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.intro.is_none()
            && self.choke.is_none()
            && self.interested.is_none()
            && self.haves.is_empty()
            && self.cancels.is_empty()
            && self.requests.is_empty()
            && self.serves.is_empty()
            && self.cancel_serves.is_empty()
            && self.extended.is_empty()
            && self.pex.is_none()
            && self.hashes.is_empty()
            && !self.shutdown
    }
}

/// How the reader's pass of a cancel went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CancelServe {
    /// Recorded for the writer.
    Noted,
    /// More distinct cancels wait than requests could: the writer is stuck.
    Overflow,
}

struct Shared {
    pending: Mutex<Pending>,
    /// How the connection ended, shared with its threads: an overflow is recorded here first,
    /// so the failures it causes in the reader and writer are not taken for the cause.
    ending: Arc<Ending>,
    /// Shut on overflow, so a writer blocked on a full socket stops at once.
    socket: Option<Arc<TcpStream>>,
    /// Most haves that can ever be pending (the torrent's piece count).
    max_haves: usize,
}

/// The sending side: cheap to clone, never blocks. (The doorbell's sender lives here, not in
/// the shared state, so the writer sees [`Wake::Closed`] once every outbox is gone.)
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    bell: Sender<()>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbox")
    }
}

/// The writer's side.
pub(crate) struct Inbox {
    shared: Arc<Shared>,
    bell: Receiver<()>,
}

/// What waiting on the inbox gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Something may be pending.
    Rung,
    TimedOut,
    /// Every outbox is gone: nobody can ask for anything more.
    Closed,
}

/// A connection's outbox and inbox. `socket`: shut when a cap is reached; `pieces`: the
/// torrent's piece count.
pub(crate) fn outbox(
    ending: Arc<Ending>,
    socket: Option<Arc<TcpStream>>,
    pieces: u32,
) -> (Outbox, Inbox) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        ending,
        socket,
        max_haves: pieces as usize,
    });
    (
        Outbox {
            shared: Arc::clone(&shared),
            bell: tx,
        },
        Inbox { shared, bell: rx },
    )
}

impl Outbox {
    /// Folds a session command into the writer's state. A cap reached ends the connection
    /// ([`PeerError::Backlog`]); its `Gone` event follows as for any other ending.
    pub fn send(&self, cmd: Command) {
        let overflow = {
            let mut p = self.shared.pending.lock();
            match cmd {
                Command::Intro(summary) => p.intro = Some(summary),
                Command::Choke(choke) => p.choke = Some(choke),
                Command::Interested(yes) => p.interested = Some(yes),
                Command::Have(piece) => p.haves.push(piece),
                Command::Pex { id, payload } => p.pex = Some((id, payload)),
                Command::Request(blocks) => p.requests.extend(blocks),
                Command::Cancel(block) => match p.requests.iter().position(|b| *b == block) {
                    // Never sent: nothing to cancel on the wire.
                    Some(at) => {
                        p.requests.remove(at);
                    }
                    None => p.cancels.push(block),
                },
                Command::Shutdown => p.shutdown = true,
            }
            if p.requests.len() + p.cancels.len() > MAX_PENDING_BLOCKS {
                Some("requests to send")
            } else if p.haves.len() > self.shared.max_haves {
                Some("haves to send")
            } else {
                None
            }
        };
        match overflow {
            Some(what) => self.fail(PeerError::Backlog(what)),
            None => self.ring(),
        }
    }

    /// Ends the connection: the cause is recorded first, then the writer is woken and the
    /// socket shut (which wakes the reader and a blocked write).
    fn fail(&self, why: PeerError) {
        self.shared.ending.record(Err(why));
        {
            // What piled up is never sent: free it now.
            let mut p = self.shared.pending.lock();
            *p = Pending::default();
            p.shutdown = true;
        }
        if let Some(s) = &self.shared.socket {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.ring();
    }

    fn ring(&self) {
        match self.bell.try_send(()) {
            // Full: the writer is already due to look. Disconnected: it has ended.
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    /// The reader's requests, in the order they came.
    pub(crate) fn serve(&self, blocks: &mut Vec<BlockRef>) {
        if blocks.is_empty() {
            return;
        }
        self.shared.pending.lock().serves.append(blocks);
        self.ring();
    }

    /// An extended message for the writer to send (the reader's answer to a metadata
    /// request). False, and nothing queued, when [`MAX_PENDING_EXTENDED`] already wait.
    pub(crate) fn extended(&self, id: u8, payload: Vec<u8>) -> bool {
        {
            let mut p = self.shared.pending.lock();
            if p.extended.len() >= MAX_PENDING_EXTENDED {
                return false;
            }
            p.extended.push((id, payload));
        }
        self.ring();
        true
    }

    /// The answer to one of the peer's hash requests (dropped once the connection is
    /// ending). Past [`MAX_PENDING_HASHES`] waiting, the connection ends
    /// ([`PeerError::Backlog`]).
    pub(crate) fn hash_work(&self, work: HashWork) {
        let overflow = {
            let mut p = self.shared.pending.lock();
            if p.shutdown {
                // Ending: nothing more goes out.
                return;
            }
            p.hashes.push(work);
            p.hashes.len() > MAX_PENDING_HASHES
        };
        if overflow {
            self.fail(PeerError::Backlog("answers to hash requests"));
        } else {
            self.ring();
        }
    }

    /// The reader's pass of a peer's cancel; `cap`: most distinct cancels that may wait.
    pub(crate) fn cancel_serve(&self, block: BlockRef, cap: usize) -> CancelServe {
        {
            let mut p = self.shared.pending.lock();
            let before = p.serves.len();
            if p.cancel_serves.len() >= cap && !p.cancel_serves.contains_key(&block) {
                return CancelServe::Overflow;
            }
            p.cancel_serves.insert(block, before);
        }
        self.ring();
        CancelServe::Noted
    }

    /// What is pending, for tests that drive a reader without a writer.
    #[cfg(test)]
    pub(crate) fn peek<T>(&self, f: impl FnOnce(&Pending) -> T) -> T {
        f(&self.shared.pending.lock())
    }
}

impl Inbox {
    /// Waits up to `wait` for the doorbell.
    pub fn wait(&self, wait: Duration) -> Wake {
        match self.bell.recv_timeout(wait) {
            Ok(()) => Wake::Rung,
            Err(RecvTimeoutError::Timeout) => Wake::TimedOut,
            Err(RecvTimeoutError::Disconnected) => Wake::Closed,
        }
    }

    /// Whether the doorbell rang since the last look (consumes the ring).
    pub fn rung(&self) -> bool {
        self.bell.try_recv().is_ok()
    }

    /// Takes the intro, if it is pending, and whether a shutdown is: all the writer may look
    /// at before the intro has gone out (nothing may precede it on the wire).
    pub fn take_intro(&self) -> (Option<HaveSummary>, bool) {
        let mut p = self.shared.pending.lock();
        (p.intro.take(), p.shutdown)
    }

    /// Swaps what is pending into `into` (cleared first, so its capacity is reused and a
    /// steady flow of work allocates nothing).
    pub fn take(&self, into: &mut Pending) {
        into.clear();
        std::mem::swap(&mut *self.shared.pending.lock(), into);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::Geometry;

    fn blocks(n: u32) -> Vec<BlockRef> {
        let g = Geometry::new(16384, &[u64::from(n) * 16384], u64::from(n)).unwrap();
        g.pieces().map(|p| g.block(p, 0).unwrap()).collect()
    }

    fn boxes() -> (Outbox, Inbox, Arc<Ending>) {
        let ending = Arc::new(Ending::default());
        let (o, i) = outbox(Arc::clone(&ending), None, 4096);
        (o, i, ending)
    }

    #[test]
    fn choke_and_interest_flips_keep_only_the_latest_state() {
        let (o, inbox, ending) = boxes();
        for i in 0..100_000 {
            o.send(Command::Choke(i % 2 == 0));
            o.send(Command::Interested(i % 2 == 1));
        }
        let mut p = Pending::default();
        assert!(inbox.rung());
        assert!(!inbox.rung(), "one ring however many sends");
        inbox.take(&mut p);
        assert_eq!((p.choke, p.interested), (Some(false), Some(true)));
        assert!(p.haves.is_empty() && p.requests.is_empty());
        assert!(ending.take().is_ok(), "no overflow");
    }

    #[test]
    fn a_cancel_of_an_unsent_request_removes_it() {
        let (o, inbox, _) = boxes();
        let b = blocks(3);
        o.send(Command::Request(b.clone()));
        o.send(Command::Cancel(b[1]));
        o.send(Command::Cancel(b[2]));
        // Sent long ago (not pending): goes out as a cancel.
        let old = blocks(4)[3];
        o.send(Command::Cancel(old));
        let mut p = Pending::default();
        inbox.take(&mut p);
        assert_eq!(p.requests, [b[0]]);
        assert_eq!(p.cancels, [old]);
    }

    #[test]
    fn requests_piling_up_behind_a_stuck_writer_end_the_connection() {
        let (o, inbox, ending) = boxes();
        let b = blocks(64);
        for _ in 0..=MAX_PENDING_BLOCKS / b.len() {
            o.send(Command::Request(b.clone()));
        }
        let err = ending.take().unwrap_err();
        assert!(matches!(err, PeerError::Backlog(_)), "{err:?}");
        assert!(!err.is_violation());
        let mut p = Pending::default();
        inbox.take(&mut p);
        assert!(p.shutdown);
    }

    #[test]
    fn the_intro_can_be_taken_alone() {
        let (o, inbox, _) = boxes();
        let b = blocks(2);
        o.serve(&mut b.clone());
        o.send(Command::Choke(false));
        assert_eq!(inbox.take_intro(), (None, false));
        o.send(Command::Intro(HaveSummary::None));
        assert_eq!(inbox.take_intro(), (Some(HaveSummary::None), false));
        let mut p = Pending::default();
        inbox.take(&mut p);
        assert_eq!((&p.serves, p.choke), (&b, Some(false)));
        inbox.take(&mut p);
        assert!(p.is_empty());
    }

    #[test]
    fn a_cancel_storm_costs_one_entry_per_distinct_block_within_a_cap() {
        let (o, _inbox, _) = boxes();
        let b = blocks(8);
        for _ in 0..10_000 {
            for &x in &b[..4] {
                assert_eq!(o.cancel_serve(x, 4), CancelServe::Noted);
            }
        }
        assert_eq!(o.peek(|p| p.cancel_serves.len()), 4);
        assert_eq!(o.cancel_serve(b[4], 4), CancelServe::Overflow);
    }

    #[test]
    fn only_the_latest_pex_message_waits() {
        let (o, inbox, ending) = boxes();
        for i in 0..10_000u32 {
            o.send(Command::Pex {
                id: 1,
                payload: i.to_be_bytes().to_vec(),
            });
        }
        let mut p = Pending::default();
        inbox.take(&mut p);
        assert_eq!(p.pex, Some((1, 9_999u32.to_be_bytes().to_vec())));
        assert!(ending.take().is_ok(), "no overflow");
        inbox.take(&mut p);
        assert!(p.is_empty());
    }

    #[test]
    fn hash_answers_piling_up_behind_a_stuck_writer_end_the_connection() {
        let (o, inbox, ending) = boxes();
        let reject = HashWork::Send(crate::wire::Message::HashReject(crate::wire::HashRequest {
            root: [1; 32],
            base: 0,
            index: 0,
            length: 2,
            proof_layers: 0,
        }));
        for _ in 0..MAX_PENDING_HASHES {
            o.hash_work(reject.clone());
        }
        assert!(ending.take().is_ok(), "within the cap");
        let mut p = Pending::default();
        inbox.take(&mut p);
        assert_eq!(p.hashes.len(), MAX_PENDING_HASHES);
        for _ in 0..=MAX_PENDING_HASHES {
            o.hash_work(reject.clone());
        }
        assert!(matches!(ending.take(), Err(PeerError::Backlog(_))));
        inbox.take(&mut p);
        assert!(
            p.shutdown && p.hashes.is_empty(),
            "what piled up is dropped"
        );
    }

    #[test]
    fn a_closed_inbox_is_seen_by_the_writer() {
        let (o, inbox, _) = boxes();
        assert_eq!(inbox.wait(Duration::from_millis(1)), Wake::TimedOut);
        o.send(Command::Have(blocks(1)[0].piece));
        assert_eq!(inbox.wait(Duration::from_secs(60)), Wake::Rung);
        drop(o);
        assert_eq!(inbox.wait(Duration::from_secs(60)), Wake::Closed);
    }
}
