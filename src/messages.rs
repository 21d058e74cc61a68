//! The messages threads exchange. Every arrow in the README's architecture diagram is one of
//! these types.

use std::net::{SocketAddr, TcpStream};

use crate::geometry::{BlockRef, PieceIndex};
use crate::outbox::Outbox;
use crate::picker::PeerKey;

/// Everything the session thread receives, from all other threads, on one bounded channel.
#[derive(Debug)]
pub enum Input {
    /// From a peer connection's reader (or writer, for `Uploaded`).
    Peer { key: PeerKey, event: PeerEvent },
    /// From a web seed connection (see `webseed`).
    WebSeed {
        key: PeerKey,
        event: crate::webseed::WebEvent,
    },
    /// From the listener: an inbound connection, not yet handshaken.
    Accepted { stream: TcpStream, addr: SocketAddr },
    /// From the tracker thread (and later other sources): candidate peers.
    Peers(Vec<SocketAddr>),
    /// From the front end (`Handle::add_peers`): peers the user named, whose failures are
    /// reported.
    NamedPeers(Vec<SocketAddr>),
    /// From the tracker thread: a tracker warned, or the thread could not start (already
    /// formatted for people).
    TrackerNotice(String),
    /// From the tracker thread: a tracker failed (once per run of failures, not per retry).
    TrackerFailed { url: String, reason: String },
    /// From the tracker thread: no tracker has answered and none is worth waiting for any
    /// more (each failed five times in a row, or cannot be used at all).
    TrackersFailed,
    /// From the tracker thread, last: it has sent `stopped` (or given up) and ended.
    TrackerDone,
    /// From the streamer: everything was written.
    StreamDone,
    /// From the streamer: the reader went away (e.g. `| head`): a clean end.
    StreamClosed,
    /// From the streamer: writing failed otherwise.
    StreamFailed(std::io::Error),
    /// From a hasher thread: the result of checking a complete piece.
    Hashed { piece: PieceIndex, ok: bool },
    /// From a connection of the metadata phase (a magnet's, before the torrent is known).
    Meta {
        key: PeerKey,
        event: crate::meta_peer::MetaEvent,
    },
    /// From the DHT thread.
    Dht(DhtMessage),
    /// A helper thread (listener, tracker, hasher, streamer) died on a panic.
    Panicked(&'static str),
}

/// What the DHT thread reports (a wrapper for `Debug`: the DHT's events hold only data).
pub struct DhtMessage(pub crate::dht::Event);

impl std::fmt::Debug for DhtMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::dht::Event;
        match &self.0 {
            Event::Peers { peers, .. } => write!(f, "Dht(Peers({}))", peers.len()),
            Event::Ready { nodes } => write!(f, "Dht(Ready({nodes}))"),
            Event::LookupDone { peers, .. } => write!(f, "Dht(LookupDone({peers}))"),
            Event::Notice(m) => write!(f, "Dht(Notice({m:?}))"),
        }
    }
}

#[derive(Debug)]
pub enum PeerEvent {
    /// Handshake done; `commands` reaches this connection's writer (it never blocks: see
    /// [`Outbox`]). `fast` says whether both sides support BEP 6.
    Connected {
        addr: SocketAddr,
        peer_id: [u8; 20],
        fast: bool,
        commands: Outbox,
    },
    /// The peer's BEP 10 handshake.
    Extended(crate::extension::Info),
    /// BEP 6: the peer will not serve this request (one we made; each at most once).
    Rejected(BlockRef),
    /// BEP 6: we may request this piece even while choked (each piece once, a few at most).
    AllowedFast(PieceIndex),
    /// What the peer has: at most one of `Bitfield`, `HaveAll` and `HaveNone` per connection
    /// (a second is a protocol violation that ends it).
    Bitfield(Vec<u8>),
    /// A piece the peer had not announced yet (repeats are dropped by the reader).
    Have(PieceIndex),
    HaveAll,
    HaveNone,
    /// The peer's choke and interest, only when they change: repeats are dropped, and a burst
    /// of flips read in one go is told as its outcome.
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    /// A block arrived. `written`: the reader held the block's claim and the bytes are in
    /// storage; otherwise they were dropped (not asked of this peer, or another copy was
    /// written or being written).
    Block {
        block: BlockRef,
        written: bool,
    },
    /// Bytes of blocks sent to the peer since the last report: the writer reports once a MiB
    /// has gone, after 50 ms idle, before each wait under an upload limit, and as it ends.
    Uploaded(u32),
    /// A piece we had verified no longer matches its hash on disk; it was not sent.
    CorruptOnDisk(PieceIndex),
    /// BEP 11: peers the peer exchanged with us (its `ut_pex` message; only with PEX on, at
    /// most one message per [`crate::peer::PEX_MIN_INTERVAL`] and
    /// [`crate::pex::MAX_PER_MESSAGE`] addresses each, every address checked usable).
    Pex {
        added: Vec<(SocketAddr, u8)>,
        dropped: Vec<SocketAddr>,
    },
    /// BEP 5: the peer's DHT port (its `port` message: the first non-zero one only). For the
    /// session to hand to the DHT node.
    DhtPort(u16),
    /// The connection ended; its threads are finishing and can be joined. `error` is `None`
    /// for a clean close (the peer hung up between frames, or we closed it); otherwise its
    /// `is_violation` and `may_redial` say whether to ban the address or try it again. Sent
    /// also when a connection thread panics (`PeerError::Panicked`), so no slot is lost.
    Gone {
        error: Option<crate::peer::PeerError>,
    },
}

/// What the session tells a connection's writer, through its [`Outbox`]. The outbox keeps
/// state, not a log: only the latest `Choke` and `Interested` count, and a `Cancel` of a
/// request not yet sent removes it. (Requests *from* the peer reach the writer from its
/// reader, through the same outbox.)
#[derive(Debug)]
pub enum Command {
    Request(Vec<BlockRef>),
    Cancel(BlockRef),
    Interested(bool),
    /// true = choke, false = unchoke.
    Choke(bool),
    Have(PieceIndex),
    /// BEP 11: a `ut_pex` message (`payload` encoded by `pex::encode`) under the peer's id
    /// for it. Only the latest waits: a newer one replaces one the writer has not taken.
    Pex {
        id: u8,
        payload: Vec<u8>,
    },
    /// The first message after the handshake: what we have. Nothing else goes out before it.
    Intro(HaveSummary),
    Shutdown,
}

/// What we have, as the first message tells it: BEP 6 peers get `have all`/`have none` where
/// they fit; others get a bitfield, or nothing when we have nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HaveSummary {
    All(Vec<u8>),
    None,
    Some(Vec<u8>),
}
