//! Fetching the metadata: [`MetadataFetch`].
//!
//! Peers announce `metadata_size` in their extension handshake ([`MetadataFetch::add_peer`];
//! 1 byte to 64 MiB, anything else is refused for that peer). The metadata is split into
//! 16 KiB pieces (the last one shorter) and asked of several peers at once, at most
//! [`MAX_OUTSTANDING`] per peer; a request unanswered after [`REQUEST_TIMEOUT`] is asked of
//! someone else and its peer rests for [`REST`] (as after a reject). A piece is stored only if
//! it was asked of that peer and has exactly the right length, in a buffer of its own made when
//! it arrives: what a peer *declares* is never allocated. A data message that was not asked
//! for, or carries another `total_size` than its peer announced, or the wrong number of bytes,
//! is a [`Violation`]: the session should drop that peer (the fetch forgets it at once).
//!
//! When every piece is in, the SHA-1 of the whole must be the info hash: the hash, not any
//! peer's word, decides what the metadata is.
//!
//! # Peers that disagree on the size
//! Peers of one torrent all hold the same info dictionary, so two sizes mean someone is wrong.
//! The fetch works on one size at a time, the first one announced by a peer that is of use,
//! and only asks peers that announced that size. If every peer of that size stalls (resting
//! after a timeout or reject, or gone) while a peer of another size is ready, the fetch drops
//! what it holds and starts over with the other size. A peer that still owes
//! [`MAX_OUTSTANDING`] answers past their deadline is of no use until it answers, so a liar
//! that went silent cannot pull the fetch back to its size. So a peer that lies about the size
//! can stall the fetch for one request timeout, or feed it garbage until the hash check bans
//! it; it cannot stop it. A liar that answers every request just in time, with garbage, delays
//! the fetch by at most its declared size / 16 KiB / [`MAX_OUTSTANDING`] × [`REQUEST_TIMEOUT`]
//! (under 4 hours for a 64 MiB lie, seconds for a typical size), once per connection. When the
//! metadata is in, peers that announced another size are listed in
//! [`Completed::wrong_size`], for the session to drop.
//!
//! # Whom a failed hash blames
//! - One contributor: it sent garbage (or a wrong size); it is banned
//!   ([`HashFailure::ban`]) and the fetch starts over.
//! - Several: the fetch cannot tell who lied, and banning them all would let one liar get the
//!   honest peers banned. They are listed as [`HashFailure::suspects`] (not to ban), the SHA-1
//!   of each piece they sent is remembered, and the fetch starts over in *one-source* mode:
//!   every piece is fetched from a single peer, so the next failure has one contributor and
//!   bans it. If the source stalls or leaves, another peer (one that has not had its turn yet,
//!   if any) takes over and the pieces so far are dropped, so sources never mix.
//! - When the hash finally matches, every remembered piece that differs from the verified
//!   metadata convicts the peer that sent it (and every contributor to a remembered attempt at
//!   another size); they are listed in [`Completed::ban`].
//!
//! An honest peer is never banned or dropped by this module: it only answers what it was
//! asked, with the size it announced, and its pieces always match the verified metadata (the
//! `ut_metadata` fuzz target checks exactly that).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use super::{MAX_SIZE, Message, piece_count, piece_len};
use crate::picker::PeerKey;

/// Requests one peer may have unanswered, counting those that timed out.
pub const MAX_OUTSTANDING: usize = 3;
/// How long a request may go unanswered before its piece is asked of another peer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer is not asked after a reject or a timeout.
pub const REST: Duration = Duration::from_secs(30);
/// Failed attempts whose piece hashes are remembered to convict liars later.
const MAX_FAILED_RECORDS: usize = 4;

/// Why a peer's `metadata_size` was refused; the fetch will not ask that peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    Zero,
    Negative(i64),
    TooLarge(i64),
    /// A later extension handshake announced another size than the first.
    Changed { from: u32, to: i64 },
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::Zero => write!(f, "peer announced metadata_size 0"),
            SizeError::Negative(n) => write!(f, "peer announced a negative metadata_size {n}"),
            SizeError::TooLarge(n) => write!(
                f,
                "peer announced metadata_size {n}, over the {MAX_SIZE}-byte limit"
            ),
            SizeError::Changed { from, to } => write!(
                f,
                "peer changed its metadata_size from {from} to {to}"
            ),
        }
    }
}

impl std::error::Error for SizeError {}

/// A `metadata_size` from an extension handshake, checked.
pub fn check_size(size: i64) -> Result<u32, SizeError> {
    match size {
        0 => Err(SizeError::Zero),
        n if n < 0 => Err(SizeError::Negative(n)),
        n => u32::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_SIZE)
            .ok_or(SizeError::TooLarge(n)),
    }
}

/// A message the session should drop its peer for. The fetch has already forgotten the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Data for a piece that was never asked of this peer.
    Unrequested { piece: u32 },
    /// A reject for a piece that was never asked of this peer.
    UnrequestedReject { piece: u32 },
    /// Data whose `total_size` is not the size the peer announced.
    WrongTotalSize { announced: u32, got: u32 },
    /// Data of the wrong length for its piece.
    WrongLength { piece: u32, expected: u32, got: usize },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Unrequested { piece } => {
                write!(f, "sent metadata piece {piece}, which was not asked of it")
            }
            Violation::UnrequestedReject { piece } => write!(
                f,
                "rejected metadata piece {piece}, which was not asked of it"
            ),
            Violation::WrongTotalSize { announced, got } => write!(
                f,
                "sent metadata with total_size {got} after announcing {announced}"
            ),
            Violation::WrongLength {
                piece,
                expected,
                got,
            } => write!(
                f,
                "sent {got} bytes for metadata piece {piece}, which has {expected}"
            ),
        }
    }
}

impl std::error::Error for Violation {}

/// The verified info dictionary, and who turned out to have lied on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The info dictionary: its SHA-1 is the info hash.
    pub info: Vec<u8>,
    /// Peers proven to have sent bad pieces in an earlier, failed attempt: ban them.
    pub ban: Vec<PeerKey>,
    /// Connected peers that announced another `metadata_size`: drop them.
    pub wrong_size: Vec<PeerKey>,
}

/// A failed hash check; the fetch has started over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashFailure {
    /// The one peer that sent every piece: ban it (the fetch has forgotten it).
    pub ban: Vec<PeerKey>,
    /// Several peers sent pieces and one or more lied; not to be banned on this alone.
    pub suspects: Vec<PeerKey>,
}

/// What the session should do after a peer's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing (the message was stored, or was harmless and ignored).
    Continue,
    /// Drop the peer that sent the message.
    Drop(Violation),
    /// The metadata is in and verified; the fetch is over.
    Complete(Completed),
    /// The assembled metadata did not hash to the info hash.
    HashFailed(HashFailure),
}

#[derive(Debug)]
struct Asked {
    piece: u32,
    /// The attempt the request was made for; an answer to an older one is dropped.
    epoch: u64,
    deadline: Instant,
}

#[derive(Debug)]
struct PeerState {
    size: u32,
    /// Order of announcement: the first announced size is tried first.
    seq: u64,
    /// Requests not yet answered, oldest first, including timed-out ones (a late answer is
    /// still welcome).
    asked: Vec<Asked>,
    resting_until: Option<Instant>,
}

impl PeerState {
    fn resting(&self, now: Instant) -> bool {
        self.resting_until.is_some_and(|t| now < t)
    }

    fn can_ask(&self, now: Instant) -> bool {
        !self.resting(now) && self.asked.len() < MAX_OUTSTANDING
    }

    /// Of use to an attempt at its size: it can be asked now, or a request to it is in time.
    fn useful(&self, now: Instant) -> bool {
        !self.resting(now)
            && (self.asked.len() < MAX_OUTSTANDING || self.asked.iter().any(|a| a.deadline > now))
    }

    fn rest(&mut self, now: Instant) {
        let until = now + REST;
        self.resting_until = Some(self.resting_until.map_or(until, |t| t.max(until)));
    }
}

#[derive(Debug)]
enum Slot {
    Missing,
    Requested { peer: PeerKey, deadline: Instant },
    Received { peer: PeerKey, bytes: Box<[u8]> },
}

#[derive(Debug)]
struct OneSource {
    source: Option<PeerKey>,
    /// Peers that have been the source since the mode began.
    tried: BTreeSet<PeerKey>,
}

/// One try at assembling metadata of one size.
#[derive(Debug)]
struct Attempt {
    size: u32,
    epoch: u64,
    slots: Vec<Slot>,
    received: u32,
    /// Set after a hash failure with several contributors.
    one_source: Option<OneSource>,
}

impl Attempt {
    fn new(size: u32, epoch: u64, one_source: Option<OneSource>) -> Attempt {
        Attempt {
            size,
            epoch,
            slots: (0..piece_count(size)).map(|_| Slot::Missing).collect(),
            received: 0,
            one_source,
        }
    }

    /// Drops every piece and request, under a new epoch.
    fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.slots.iter_mut().for_each(|s| *s = Slot::Missing);
        self.received = 0;
    }

    fn pieces(&self) -> impl Iterator<Item = (PeerKey, &[u8])> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Received { peer, bytes } => Some((*peer, &bytes[..])),
            _ => None,
        })
    }
}

/// The piece hashes of a failed attempt, to convict liars once the metadata is known.
#[derive(Debug)]
struct FailedRecord {
    size: u32,
    pieces: Vec<(PeerKey, [u8; 20])>,
}

/// Fetches one torrent's info dictionary from peers (BEP 9). See the module docs for the
/// policy; the session calls:
/// - [`add_peer`](Self::add_peer) when a peer's extension handshake offers `ut_metadata` with
///   a `metadata_size`, and [`remove_peer`](Self::remove_peer) when it goes;
/// - [`next_request`](Self::next_request) for each such peer after every event and at
///   [`next_deadline`](Self::next_deadline), sending a request for each piece it returns;
/// - [`on_message`](Self::on_message) (or `on_data`/`on_reject`) for each message received.
#[derive(Debug)]
pub struct MetadataFetch {
    info_hash: [u8; 20],
    /// A v2 info hash (BEP 52): the SHA-256 the metadata must have. The SHA-1 check then
    /// applies only when `info_hash` is a v1 hash (`v1`).
    v2: Option<[u8; 32]>,
    v1: bool,
    peers: BTreeMap<PeerKey, PeerState>,
    next_seq: u64,
    next_epoch: u64,
    attempt: Option<Attempt>,
    failed: VecDeque<FailedRecord>,
    failures: u32,
    done: bool,
}

impl MetadataFetch {
    pub fn new(info_hash: [u8; 20]) -> MetadataFetch {
        MetadataFetch {
            info_hash,
            v2: None,
            v1: true,
            peers: BTreeMap::new(),
            next_seq: 0,
            next_epoch: 0,
            attempt: None,
            failed: VecDeque::new(),
            failures: 0,
            done: false,
        }
    }

    /// The metadata must also (or, `v1` false, only) have the v2 info hash `v2`.
    pub fn with_v2(mut self, v2: Option<[u8; 32]>, v1: bool) -> MetadataFetch {
        self.v1 = v1 || v2.is_none();
        self.v2 = v2;
        self
    }

    /// A peer announced `metadata_size` (as read from its extension handshake). A refused size
    /// leaves the peer out of the fetch; a repeat of the same size changes nothing.
    pub fn add_peer(&mut self, peer: PeerKey, metadata_size: i64) -> Result<(), SizeError> {
        let size = check_size(metadata_size)?;
        if let Some(p) = self.peers.get(&peer) {
            return if p.size == size {
                Ok(())
            } else {
                Err(SizeError::Changed {
                    from: p.size,
                    to: metadata_size,
                })
            };
        }
        self.peers.insert(
            peer,
            PeerState {
                size,
                seq: self.next_seq,
                asked: Vec::new(),
                resting_until: None,
            },
        );
        self.next_seq += 1;
        Ok(())
    }

    /// The peer is gone (or dropped): its requests go back to the pool. Pieces it sent stay.
    pub fn remove_peer(&mut self, peer: PeerKey) {
        self.peers.remove(&peer);
        if let Some(a) = &mut self.attempt {
            for slot in &mut a.slots {
                if matches!(slot, Slot::Requested { peer: p, .. } if *p == peer) {
                    *slot = Slot::Missing;
                }
            }
        }
    }

    /// The next piece to ask `peer` for, if any: the caller sends the request (and calls
    /// again, until `None`, to fill the peer's [`MAX_OUTSTANDING`] slots).
    pub fn next_request(&mut self, peer: PeerKey, now: Instant) -> Option<u32> {
        if self.done {
            return None;
        }
        self.expire(now);
        let size = self.peers.get(&peer).filter(|p| p.can_ask(now))?.size;
        self.settle_attempt(now);
        if self.attempt.as_ref()?.size != size || !self.settle_source(peer, now) {
            return None;
        }
        let attempt = self.attempt.as_mut()?;
        let index = attempt
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Missing))?;
        let deadline = now + REQUEST_TIMEOUT;
        attempt.slots[index] = Slot::Requested { peer, deadline };
        // Below piece_count(size) <= MAX_PIECES.
        let piece = index as u32;
        let epoch = attempt.epoch;
        self.peers.get_mut(&peer)?.asked.push(Asked {
            piece,
            epoch,
            deadline,
        });
        Some(piece)
    }

    /// Handles a decoded message from `peer`. A request is not the fetch's business (answer it
    /// with [`answer`]) and comes back as [`Outcome::Continue`].
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn on_message(&mut self, peer: PeerKey, msg: &Message<'_>, now: Instant) -> Outcome {
        match *msg {
            Message::Request { .. } => Outcome::Continue,
            Message::Data {
                piece,
                total_size,
                data,
            } => self.on_data(peer, piece, total_size, data),
            Message::Reject { piece } => self.on_reject(peer, piece, now),
        }
    }

    /// A data message from `peer`.
    pub fn on_data(&mut self, peer: PeerKey, piece: u32, total_size: u32, data: &[u8]) -> Outcome {
        if self.done {
            return Outcome::Continue;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return self.violation(peer, Violation::Unrequested { piece });
        };
        let Some(at) = p.asked.iter().position(|a| a.piece == piece) else {
            return self.violation(peer, Violation::Unrequested { piece });
        };
        let asked = p.asked.remove(at);
        if total_size != p.size {
            let announced = p.size;
            return self.violation(
                peer,
                Violation::WrongTotalSize {
                    announced,
                    got: total_size,
                },
            );
        }
        let Some(attempt) = self.attempt.as_mut().filter(|a| a.epoch == asked.epoch) else {
            return Outcome::Continue; // an answer for an attempt given up since
        };
        // Asked in this attempt, so the peer's size is the attempt's and the piece in range.
        let expected = piece_len(attempt.size, piece).unwrap_or(0);
        if data.len() != expected as usize {
            let got = data.len();
            return self.violation(
                peer,
                Violation::WrongLength {
                    piece,
                    expected,
                    got,
                },
            );
        }
        let slot = &mut attempt.slots[piece as usize];
        if matches!(slot, Slot::Received { .. }) {
            return Outcome::Continue; // asked twice after a timeout; the first copy won
        }
        *slot = Slot::Received {
            peer,
            bytes: data.into(),
        };
        attempt.received += 1;
        if attempt.received as usize == attempt.slots.len() {
            self.finish()
        } else {
            Outcome::Continue
        }
    }

    /// A reject from `peer`: the piece goes back to the pool and the peer rests for [`REST`].
    pub fn on_reject(&mut self, peer: PeerKey, piece: u32, now: Instant) -> Outcome {
        if self.done {
            return Outcome::Continue;
        }
        let at = self
            .peers
            .get(&peer)
            .and_then(|p| p.asked.iter().position(|a| a.piece == piece));
        let Some(at) = at else {
            return self.violation(peer, Violation::UnrequestedReject { piece });
        };
        let Some(p) = self.peers.get_mut(&peer) else {
            return Outcome::Continue;
        };
        let asked = p.asked.remove(at);
        p.rest(now);
        if let Some(a) = self.attempt.as_mut().filter(|a| a.epoch == asked.epoch) {
            let slot = &mut a.slots[piece as usize];
            if matches!(slot, Slot::Requested { peer: q, .. } if *q == peer) {
                *slot = Slot::Missing;
            }
        }
        Outcome::Continue
    }

    /// Requests past their deadline go back to the pool and their peers rest; rests that are
    /// over are forgotten. (Called by [`next_request`](Self::next_request) too.)
    pub fn expire(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            if !p.resting(now) {
                p.resting_until = None;
            }
        }
        let Some(a) = &mut self.attempt else {
            return;
        };
        for slot in &mut a.slots {
            if let Slot::Requested { peer, deadline } = *slot
                && deadline <= now
            {
                *slot = Slot::Missing;
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.rest(now);
                }
            }
        }
    }

    /// When a request times out or a peer's rest ends: call `next_request` again then. (It
    /// may be in the past, when nothing has called `next_request` or `expire` since.)
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.done {
            return None;
        }
        let requests = self.attempt.iter().flat_map(|a| &a.slots).filter_map(|s| match s {
            Slot::Requested { deadline, .. } => Some(*deadline),
            _ => None,
        });
        let rests = self.peers.values().filter_map(|p| p.resting_until);
        requests.chain(rests).min()
    }

    /// The size being fetched, once one is chosen.
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn size(&self) -> Option<u32> {
        self.attempt.as_ref().map(|a| a.size)
    }

    /// Pieces received and pieces in all, in the current attempt.
    pub fn progress(&self) -> (u32, u32) {
        self.attempt
            .as_ref()
            .map_or((0, 0), |a| (a.received, a.slots.len() as u32))
    }

    /// Bytes of metadata held (never more than the size being fetched).
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn buffered(&self) -> usize {
        self.attempt
            .as_ref()
            .map_or(0, |a| a.pieces().map(|(_, b)| b.len()).sum())
    }

    /// Whether the metadata is in and verified.
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// How many assembled attempts failed the hash check.
    #[cfg_attr(not(any(test, feature = "fuzz")), allow(dead_code))] // tests and fuzzing
    pub fn failures(&self) -> u32 {
        self.failures
    }

    fn violation(&mut self, peer: PeerKey, v: Violation) -> Outcome {
        self.remove_peer(peer);
        Outcome::Drop(v)
    }

    fn new_epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    /// Keeps the current attempt while a peer of its size is of use; otherwise moves to the
    /// size of the earliest-announced peer that is.
    fn settle_attempt(&mut self, now: Instant) {
        if let Some(a) = &self.attempt
            && self.peers.values().any(|p| p.size == a.size && p.useful(now))
        {
            return;
        }
        let Some(size) = self
            .peers
            .values()
            .filter(|p| p.useful(now))
            .min_by_key(|p| p.seq)
            .map(|p| p.size)
        else {
            return;
        };
        if self.attempt.as_ref().is_some_and(|a| a.size == size) {
            return;
        }
        let epoch = self.new_epoch();
        self.attempt = Some(Attempt::new(size, epoch, None));
    }

    /// In one-source mode, whether `peer` is (or now becomes) the source.
    fn settle_source(&mut self, peer: PeerKey, now: Instant) -> bool {
        let MetadataFetch {
            attempt,
            peers,
            next_epoch,
            ..
        } = self;
        let Some(attempt) = attempt else {
            return false;
        };
        let size = attempt.size;
        let Some(one) = &mut attempt.one_source else {
            return true;
        };
        match one.source {
            Some(s) if s == peer => return true,
            // The source keeps its turn while it is of use to this attempt (a key that left and
            // came back with another size is not).
            Some(s) if peers.get(&s).is_some_and(|p| p.size == size && p.useful(now)) => {
                return false;
            }
            _ => {}
        }
        let untried_other = peers.iter().any(|(k, p)| {
            *k != peer && p.size == size && p.useful(now) && !one.tried.contains(k)
        });
        if one.tried.contains(&peer) {
            if untried_other {
                return false;
            }
            one.tried.clear(); // everyone has had a turn: start the round again
        }
        one.tried.insert(peer);
        let had_source = one.source.replace(peer).is_some();
        if had_source {
            // What the old source sent is dropped, so a failure still has one contributor.
            *next_epoch += 1;
            attempt.restart(*next_epoch);
        }
        true
    }

    /// Every piece is in: check the hash.
    fn finish(&mut self) -> Outcome {
        let Some(attempt) = self.attempt.take() else {
            return Outcome::Continue;
        };
        let good_v1 = !self.v1 || {
            let mut sha = Sha1::new();
            attempt.pieces().for_each(|(_, bytes)| sha.update(bytes));
            <[u8; 20]>::from(sha.finalize()) == self.info_hash
        };
        let good_v2 = self.v2.is_none_or(|want| {
            let mut sha = sha2::Sha256::new();
            attempt.pieces().for_each(|(_, bytes)| sha.update(bytes));
            <[u8; 32]>::from(sha.finalize()) == want
        });
        if good_v1 && good_v2 {
            return Outcome::Complete(self.complete(&attempt));
        }
        self.failures += 1;
        let contributors: BTreeSet<PeerKey> = attempt.pieces().map(|(peer, _)| peer).collect();
        let epoch = self.new_epoch();
        if contributors.len() == 1 {
            // One peer sent it all, so it lied. In one-source mode the next peer takes a turn.
            let one_source = attempt.one_source.map(|one| OneSource {
                source: None,
                tried: one.tried,
            });
            self.attempt = Some(Attempt::new(attempt.size, epoch, one_source));
            let ban: Vec<PeerKey> = contributors.into_iter().collect();
            ban.iter().for_each(|peer| self.remove_peer(*peer));
            return Outcome::HashFailed(HashFailure {
                ban,
                suspects: Vec::new(),
            });
        }
        // Several (which happens only when sources were mixed): remember what each sent, and
        // take every piece from one source at a time from now on.
        if self.failed.len() == MAX_FAILED_RECORDS {
            self.failed.pop_front();
        }
        self.failed.push_back(FailedRecord {
            size: attempt.size,
            pieces: attempt
                .pieces()
                .map(|(peer, bytes)| (peer, Sha1::digest(bytes).into()))
                .collect(),
        });
        let one_source = OneSource {
            source: None,
            tried: BTreeSet::new(),
        };
        self.attempt = Some(Attempt::new(attempt.size, epoch, Some(one_source)));
        Outcome::HashFailed(HashFailure {
            ban: Vec::new(),
            suspects: contributors.into_iter().collect(),
        })
    }

    fn complete(&mut self, attempt: &Attempt) -> Completed {
        // Every byte of the size is here and verified: allocating it is safe now.
        let mut info = Vec::with_capacity(attempt.size as usize);
        attempt
            .pieces()
            .for_each(|(_, bytes)| info.extend_from_slice(bytes));
        let mut ban = BTreeSet::new();
        if !self.failed.is_empty() {
            let truth: Vec<[u8; 20]> = attempt
                .pieces()
                .map(|(_, bytes)| Sha1::digest(bytes).into())
                .collect();
            for record in &self.failed {
                for (i, (peer, hash)) in record.pieces.iter().enumerate() {
                    if record.size != attempt.size || truth.get(i) != Some(hash) {
                        ban.insert(*peer);
                    }
                }
            }
        }
        let wrong_size = self
            .peers
            .iter()
            .filter(|(_, p)| p.size != attempt.size)
            .map(|(k, _)| *k)
            .collect();
        self.done = true;
        self.failed.clear();
        self.peers.clear();
        Completed {
            info,
            ban: ban.into_iter().collect(),
            wrong_size,
        }
    }

    /// Checks the invariants the module docs promise; panics on a broken one. For tests and
    /// the fuzz target.
    #[cfg(any(test, feature = "fuzz"))]
    pub fn check_invariants(&self) {
        assert!(self.failed.len() <= MAX_FAILED_RECORDS);
        for p in self.peers.values() {
            assert!(p.asked.len() <= MAX_OUTSTANDING, "too many requests");
            assert!((1..=MAX_SIZE).contains(&p.size));
        }
        let Some(a) = &self.attempt else { return };
        assert!(!self.done, "an attempt after completion");
        assert_eq!(a.slots.len() as u32, piece_count(a.size));
        let received = a
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Received { .. }))
            .count();
        assert_eq!(received, a.received as usize);
        assert!(received < a.slots.len(), "a full attempt was not checked");
        assert!(self.buffered() <= a.size as usize);
        let source = a.one_source.as_ref().and_then(|o| o.source);
        for (i, slot) in a.slots.iter().enumerate() {
            match slot {
                Slot::Missing => {}
                Slot::Requested { peer, .. } => {
                    let p = self.peers.get(peer).expect("a request to a forgotten peer");
                    assert!(
                        p.asked
                            .iter()
                            .any(|x| x.piece as usize == i && x.epoch == a.epoch),
                        "a request the peer does not owe"
                    );
                    assert_eq!(p.size, a.size);
                    assert!(a.one_source.is_none() || source == Some(*peer));
                }
                Slot::Received { peer, bytes } => {
                    assert_eq!(Some(bytes.len() as u32), piece_len(a.size, i as u32));
                    assert!(a.one_source.is_none() || source == Some(*peer));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{MAX_PIECES, PIECE_LEN, sample, serve};

    const A: PeerKey = PeerKey(1);
    const B: PeerKey = PeerKey(2);
    const C: PeerKey = PeerKey(3);
    const LIAR: PeerKey = PeerKey(66);

    /// A fetch of `len` bytes of metadata, with the clock.
    struct Harness {
        info: Vec<u8>,
        fetch: MetadataFetch,
        now: Instant,
    }

    impl Harness {
        fn new(len: usize) -> Harness {
            let info = sample(len);
            let hash = Sha1::digest(&info).into();
            Harness {
                info,
                fetch: MetadataFetch::new(hash),
                now: Instant::now(),
            }
        }

        fn size(&self) -> i64 {
            self.info.len() as i64
        }

        fn add(&mut self, peer: PeerKey) {
            self.fetch.add_peer(peer, self.size()).unwrap();
        }

        fn ask(&mut self, peer: PeerKey) -> Option<u32> {
            let r = self.fetch.next_request(peer, self.now);
            self.fetch.check_invariants();
            r
        }

        /// Every request `peer` gets now.
        fn ask_all(&mut self, peer: PeerKey) -> Vec<u32> {
            std::iter::from_fn(|| self.ask(peer)).collect()
        }

        fn piece(&self, piece: u32) -> &[u8] {
            let start = (piece * PIECE_LEN) as usize;
            let len = piece_len(self.info.len() as u32, piece).unwrap() as usize;
            &self.info[start..start + len]
        }

        fn send(&mut self, peer: PeerKey, piece: u32) -> Outcome {
            let data = self.piece(piece).to_vec();
            self.send_bytes(peer, piece, &data)
        }

        fn send_bytes(&mut self, peer: PeerKey, piece: u32, data: &[u8]) -> Outcome {
            let total = self.info.len() as u32;
            let out = self.fetch.on_data(peer, piece, total, data);
            self.fetch.check_invariants();
            out
        }

        fn garbage(&mut self, peer: PeerKey, piece: u32) -> Outcome {
            let mut data = self.piece(piece).to_vec();
            data[0] ^= 0xff;
            self.send_bytes(peer, piece, &data)
        }

        fn reject(&mut self, peer: PeerKey, piece: u32) -> Outcome {
            let out = self.fetch.on_reject(peer, piece, self.now);
            self.fetch.check_invariants();
            out
        }

        fn wait(&mut self, d: Duration) {
            self.now += d;
        }

        /// `peer` fetches everything left, honestly; returns the last outcome.
        fn serve_all(&mut self, peer: PeerKey) -> Outcome {
            for _ in 0..10_000 {
                let asked = self.ask_all(peer);
                assert!(!asked.is_empty(), "{peer:?} got nothing to do");
                for piece in asked {
                    let out = self.send(peer, piece);
                    if out != Outcome::Continue {
                        return out;
                    }
                }
            }
            panic!("the fetch never ended");
        }

        fn completed(&self, out: Outcome) -> Completed {
            match out {
                Outcome::Complete(c) => {
                    assert_eq!(c.info, self.info);
                    assert!(self.fetch.is_complete());
                    c
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn sizes_are_checked() {
        let mut f = MetadataFetch::new([0; 20]);
        assert_eq!(f.add_peer(A, 0), Err(SizeError::Zero));
        assert_eq!(f.add_peer(A, -5), Err(SizeError::Negative(-5)));
        assert_eq!(f.add_peer(A, 1 << 31), Err(SizeError::TooLarge(1 << 31)));
        assert_eq!(
            f.add_peer(A, i64::from(MAX_SIZE) + 1),
            Err(SizeError::TooLarge(i64::from(MAX_SIZE) + 1))
        );
        assert_eq!(f.add_peer(A, i64::from(MAX_SIZE)), Ok(()));
        assert_eq!(f.add_peer(A, i64::from(MAX_SIZE)), Ok(()));
        assert_eq!(
            f.add_peer(A, 5),
            Err(SizeError::Changed {
                from: MAX_SIZE,
                to: 5
            })
        );
        assert_eq!(f.add_peer(B, 1), Ok(()));
        assert!(SizeError::Negative(-5).to_string().contains("negative"));
        // A refused peer is never asked.
        assert_eq!(f.next_request(C, Instant::now()), None);
    }

    #[test]
    fn a_declared_size_is_never_allocated() {
        let mut h = Harness::new(100);
        h.fetch.add_peer(LIAR, i64::from(MAX_SIZE)).unwrap();
        assert_eq!(h.ask_all(LIAR), [0, 1, 2]);
        assert_eq!(h.fetch.size(), Some(MAX_SIZE));
        assert_eq!(h.fetch.progress(), (0, MAX_PIECES));
        assert_eq!(h.fetch.buffered(), 0);
    }

    #[test]
    fn one_peer_fetches_everything() {
        let mut h = Harness::new(2 * PIECE_LEN as usize + 1234);
        h.add(A);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.send(A, 1), Outcome::Continue);
        assert_eq!(h.fetch.progress(), (1, 3));
        assert_eq!(h.fetch.buffered(), PIECE_LEN as usize);
        assert_eq!(h.send(A, 0), Outcome::Continue);
        let out = h.send(A, 2);
        let c = h.completed(out);
        assert!(c.ban.is_empty() && c.wrong_size.is_empty());
        assert_eq!(h.ask(A), None);
        assert_eq!(h.fetch.next_deadline(), None);
        // Late or stray messages after completion are harmless.
        assert_eq!(h.send(A, 0), Outcome::Continue);
        assert_eq!(h.reject(B, 7), Outcome::Continue);
    }

    #[test]
    fn a_single_tiny_piece() {
        let mut h = Harness::new(1);
        h.add(A);
        assert_eq!(h.ask_all(A), [0]);
        let out = h.send(A, 0);
        h.completed(out);
    }

    #[test]
    fn pieces_are_spread_over_peers() {
        let mut h = Harness::new(10 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        h.add(C);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(B), [3, 4, 5]);
        assert_eq!(h.ask_all(C), [6, 7, 8]);
        assert_eq!(h.send(B, 4), Outcome::Continue);
        assert_eq!(h.ask_all(B), [9]);
        assert_eq!(h.ask_all(B), []);
        for (peer, piece) in [(A, 0), (A, 1), (A, 2), (B, 3), (B, 5), (C, 6), (C, 7), (C, 8)] {
            assert_eq!(h.send(peer, piece), Outcome::Continue);
        }
        let out = h.send(B, 9);
        h.completed(out);
    }

    #[test]
    fn a_timed_out_piece_is_asked_elsewhere_and_a_late_answer_still_counts() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(B), []);
        assert_eq!(h.fetch.next_deadline(), Some(h.now + REQUEST_TIMEOUT));
        h.wait(REQUEST_TIMEOUT);
        assert_eq!(h.ask_all(B), [0, 1, 2]);
        // A rests, and its unanswered requests fill its slots anyway.
        assert_eq!(h.ask_all(A), []);
        // A's late answer is taken; B's copy of the same piece is then a harmless duplicate.
        assert_eq!(h.send(A, 0), Outcome::Continue);
        assert_eq!(h.send(B, 0), Outcome::Continue);
        assert_eq!(h.send(B, 1), Outcome::Continue);
        let out = h.send(B, 2);
        h.completed(out);
    }

    #[test]
    fn a_reject_rests_the_peer_and_frees_the_piece() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.send(A, 0), Outcome::Continue);
        assert_eq!(h.send(A, 2), Outcome::Continue);
        assert_eq!(h.reject(A, 1), Outcome::Continue);
        assert_eq!(h.fetch.next_deadline(), Some(h.now + REST));
        assert_eq!(h.ask_all(A), [], "a rejecting peer rests");
        h.wait(REST - Duration::from_millis(1));
        assert_eq!(h.ask_all(A), []);
        h.wait(Duration::from_millis(1));
        assert_eq!(h.ask_all(A), [1], "the rest is over");
        assert_eq!(h.fetch.next_deadline(), Some(h.now + REQUEST_TIMEOUT));
        assert_eq!(h.reject(A, 1), Outcome::Continue);
        assert_eq!(h.ask_all(B), [1]);
        let out = h.send(B, 1);
        h.completed(out);
    }

    #[test]
    fn a_reject_storm_costs_nothing_and_ends_in_a_drop() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        for round in 0..100 {
            let asked = h.ask_all(A);
            assert_eq!(asked.len(), 3, "round {round}");
            for piece in asked {
                assert_eq!(h.reject(A, piece), Outcome::Continue);
            }
            assert_eq!(h.ask_all(A), []);
            h.wait(REST);
        }
        // Rejects beyond what was asked are a violation.
        assert_eq!(
            h.reject(A, 0),
            Outcome::Drop(Violation::UnrequestedReject { piece: 0 })
        );
        assert_eq!(h.ask_all(A), [], "a dropped peer is forgotten");
        let out = h.serve_all(B);
        h.completed(out);
    }

    #[test]
    fn data_never_asked_for_drops_the_peer() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(
            h.send(B, 0),
            Outcome::Drop(Violation::Unrequested { piece: 0 })
        );
        // An unannounced peer, and a piece far out of range.
        assert_eq!(
            h.send_bytes(C, 4000, b"x"),
            Outcome::Drop(Violation::Unrequested { piece: 4000 })
        );
        assert_eq!(
            h.send_bytes(A, 3, b"x"),
            Outcome::Drop(Violation::Unrequested { piece: 3 })
        );
        // A was dropped: its pieces went back to the pool, and it is not asked again.
        assert_eq!(h.ask_all(A), []);
        h.add(B);
        assert_eq!(h.ask_all(B), [0, 1, 2]);
    }

    #[test]
    fn wrong_lengths_and_sizes_drop_the_peer() {
        let len = 2 * PIECE_LEN as usize + 100;
        let mut h = Harness::new(len);
        h.add(A);
        h.add(B);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        let full = vec![0u8; PIECE_LEN as usize];
        assert_eq!(
            h.send_bytes(A, 2, &full),
            Outcome::Drop(Violation::WrongLength {
                piece: 2,
                expected: 100,
                got: PIECE_LEN as usize
            })
        );
        assert_eq!(h.ask_all(B), [0, 1, 2]);
        let total = len as u32 + 1;
        assert_eq!(
            h.fetch.on_data(B, 0, total, &full),
            Outcome::Drop(Violation::WrongTotalSize {
                announced: len as u32,
                got: total
            })
        );
        assert_eq!(h.fetch.buffered(), 0);
    }

    #[test]
    fn a_lone_peer_whose_data_fails_the_hash_is_banned() {
        let mut h = Harness::new(2 * PIECE_LEN as usize);
        h.add(LIAR);
        h.add(A);
        assert_eq!(h.ask_all(LIAR), [0, 1]);
        assert_eq!(h.send(LIAR, 0), Outcome::Continue);
        assert_eq!(
            h.garbage(LIAR, 1),
            Outcome::HashFailed(HashFailure {
                ban: vec![LIAR],
                suspects: vec![]
            })
        );
        assert_eq!(h.fetch.failures(), 1);
        assert_eq!(h.fetch.progress(), (0, 2));
        assert_eq!(h.ask_all(LIAR), []);
        let out = h.serve_all(A);
        assert!(h.completed(out).ban.is_empty());
    }

    #[test]
    fn several_contributors_then_one_source_at_a_time_until_the_liar_is_proven() {
        let mut h = Harness::new(4 * PIECE_LEN as usize);
        h.add(A);
        h.add(LIAR);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(LIAR), [3]);
        for piece in [0, 1, 2] {
            assert_eq!(h.send(A, piece), Outcome::Continue);
        }
        assert_eq!(
            h.garbage(LIAR, 3),
            Outcome::HashFailed(HashFailure {
                ban: vec![],
                suspects: vec![A, LIAR]
            })
        );
        // One source now: the liar asked first, so it is the source and A waits.
        assert_eq!(h.ask_all(LIAR), [0, 1, 2]);
        assert_eq!(h.ask_all(A), []);
        for piece in [0, 1, 2] {
            assert_eq!(h.send(LIAR, piece), Outcome::Continue);
        }
        assert_eq!(h.ask_all(LIAR), [3]);
        assert_eq!(
            h.garbage(LIAR, 3),
            Outcome::HashFailed(HashFailure {
                ban: vec![LIAR],
                suspects: vec![]
            })
        );
        let out = h.serve_all(A);
        let c = h.completed(out);
        assert_eq!(c.ban, [LIAR]);
    }

    #[test]
    fn an_honest_source_convicts_the_liar_from_the_remembered_pieces() {
        let mut h = Harness::new(4 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        h.add(LIAR);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(LIAR), [3]);
        for piece in [0, 1, 2] {
            h.send(A, piece);
        }
        assert!(matches!(h.garbage(LIAR, 3), Outcome::HashFailed(f) if f.ban.is_empty()));
        // B becomes the source and the metadata is verified: the liar's remembered piece 3
        // differs from the truth, A's pieces do not.
        let out = h.serve_all(B);
        let c = h.completed(out);
        assert_eq!(c.ban, [LIAR]);
    }

    #[test]
    fn a_stalling_source_hands_over_and_sources_never_mix() {
        let mut h = Harness::new(4 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        h.add(LIAR);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(LIAR), [3]);
        for piece in [0, 1, 2] {
            h.send(A, piece);
        }
        assert!(matches!(h.garbage(LIAR, 3), Outcome::HashFailed(_)));
        // The liar becomes the source, answers one piece and stalls.
        assert_eq!(h.ask_all(LIAR), [0, 1, 2]);
        assert_eq!(h.send(LIAR, 0), Outcome::Continue);
        assert_eq!(h.ask_all(A), []);
        h.wait(REQUEST_TIMEOUT);
        // A takes over from scratch: the liar's piece 0 is dropped, not mixed with A's.
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.fetch.progress(), (0, 4));
        // The liar's late answers belong to the abandoned attempt and are ignored.
        assert_eq!(h.send(LIAR, 1), Outcome::Continue);
        assert_eq!(h.fetch.progress(), (0, 4));
        for piece in [0, 1, 2] {
            assert_eq!(h.send(A, piece), Outcome::Continue);
        }
        let out = h.serve_all(A);
        h.completed(out);
    }

    /// Regression (fuzz, ut_metadata liveness): a source that left and came back under the
    /// same key with another size kept its turn, and nobody else was ever asked.
    #[test]
    fn a_source_that_comes_back_with_another_size_loses_its_turn() {
        let mut h = Harness::new(4 * PIECE_LEN as usize);
        h.add(A);
        h.add(LIAR);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.ask_all(LIAR), [3]);
        for piece in [0, 1, 2] {
            h.send(A, piece);
        }
        assert!(matches!(h.garbage(LIAR, 3), Outcome::HashFailed(_)));
        assert_eq!(h.ask_all(LIAR), [0, 1, 2]);
        h.fetch.remove_peer(LIAR);
        h.fetch.add_peer(LIAR, 1).unwrap();
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        for piece in [0, 1, 2] {
            h.send(A, piece);
        }
        let out = h.serve_all(A);
        h.completed(out);
    }

    #[test]
    fn a_size_liar_that_stalls_cannot_prevent_completion() {
        let mut h = Harness::new(100 * PIECE_LEN as usize);
        h.fetch.add_peer(LIAR, 1 << 20).unwrap();
        h.add(A);
        assert_eq!(h.ask_all(LIAR), [0, 1, 2]);
        assert_eq!(h.fetch.size(), Some(1 << 20));
        assert_eq!(h.ask_all(A), [], "A's size is not the one being fetched");
        h.wait(REQUEST_TIMEOUT);
        // A answers each request a second later. The liar's rest ends on the way, but it still
        // owes three answers, so it is of no use and the fetch stays with A's size.
        let mut rounds = 0u64;
        let out = loop {
            let asked = h.ask_all(A);
            assert!(!asked.is_empty() && rounds < 100);
            assert_eq!(h.fetch.size(), Some(h.size() as u32));
            assert_eq!(h.ask_all(LIAR), []);
            h.wait(Duration::from_secs(1));
            rounds += 1;
            let outcomes: Vec<Outcome> = asked.into_iter().map(|p| h.send(A, p)).collect();
            if let Some(last) = outcomes.into_iter().find(|o| *o != Outcome::Continue) {
                break last;
            }
        };
        assert!(rounds > REST.as_secs(), "the liar's rest ended during the fetch");
        let c = h.completed(out);
        assert_eq!(c.wrong_size, [LIAR]);
        assert!(c.ban.is_empty());
    }

    #[test]
    fn a_size_liar_that_sends_garbage_is_banned_and_convicted() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        let fake = PIECE_LEN + 1;
        h.fetch.add_peer(LIAR, i64::from(fake)).unwrap();
        h.fetch.add_peer(B, i64::from(fake)).unwrap();
        h.add(A);
        assert_eq!(h.ask_all(LIAR), [0, 1]);
        assert_eq!(h.fetch.on_data(LIAR, 0, fake, &[0; PIECE_LEN as usize]), Outcome::Continue);
        let out = h.fetch.on_data(LIAR, 1, fake, &[0]);
        assert_eq!(
            out,
            Outcome::HashFailed(HashFailure {
                ban: vec![LIAR],
                suspects: vec![]
            })
        );
        // B still claims the fake size and is in time: the fetch stays there until B stalls.
        assert_eq!(h.ask_all(B), [0, 1]);
        h.wait(REQUEST_TIMEOUT);
        let out = h.serve_all(A);
        let c = h.completed(out);
        assert!(c.ban.is_empty(), "already banned when its attempt failed");
        assert_eq!(c.wrong_size, [B]);
    }

    #[test]
    fn a_peer_that_leaves_gives_its_requests_back() {
        let mut h = Harness::new(3 * PIECE_LEN as usize);
        h.add(A);
        h.add(B);
        assert_eq!(h.ask_all(A), [0, 1, 2]);
        assert_eq!(h.send(A, 0), Outcome::Continue);
        h.fetch.remove_peer(A);
        h.fetch.check_invariants();
        assert_eq!(h.ask_all(B), [1, 2]);
        assert_eq!(h.fetch.progress(), (1, 3));
        assert_eq!(h.send(B, 1), Outcome::Continue);
        let out = h.send(B, 2);
        h.completed(out);
    }

    #[test]
    fn on_message_dispatches() {
        let mut h = Harness::new(100);
        h.add(A);
        assert_eq!(h.ask_all(A), [0]);
        let now = h.now;
        assert_eq!(
            h.fetch.on_message(A, &Message::Request { piece: 0 }, now),
            Outcome::Continue
        );
        assert_eq!(
            h.fetch.on_message(A, &Message::Reject { piece: 0 }, now),
            Outcome::Continue
        );
        h.wait(REST);
        assert_eq!(h.ask_all(A), [0]);
        let info = h.info.clone();
        let out = h.fetch.on_message(A, &serve(&info, 0), h.now);
        h.completed(out);
    }
}
