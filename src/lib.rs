//! bitfetch: a one-shot BitTorrent downloader and seeder, as a command line and as an engine
//! to embed.
//!
//! No async runtime: one OS thread per peer connection does blocking I/O, one session thread
//! owns all torrent state, and blocks go straight into memory-mapped files. The README's
//! "Architecture" section describes the threads and the messages between them.
//!
//! The public API is the engine's: parse a torrent with [`Metainfo::from_bytes`], start a run
//! with [`Engine::start`], watch its [`Event`]s and steer it through its [`Handle`] (see the
//! example on the [`engine`] module). Dependencies run one way: `main → cli → engine →
//! (session, peer, picker, storage, tracker, wire, …)`; nothing below the CLI prints.

/// Modules that the `fuzz` feature opens to the fuzz targets and micro-benchmarks (not a
/// stable API); private otherwise, so rustc reports what nothing uses.
macro_rules! internal {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "fuzz")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "fuzz"))]
        mod $name;
    )*};
}

internal!(
    bencode, extension, geometry, hash_msg, magnet, merkle, metadata, pex, picker, wire
);

mod choker;
#[doc(hidden)]
pub mod cli;
mod create;
mod dht;
pub mod engine;
mod error;
#[cfg(any(test, feature = "fuzz"))]
#[doc(hidden)]
pub mod fuzz;
mod http;
mod json;
mod messages;
mod meta_peer;
mod metainfo;
mod outbox;
mod path_safety;
mod peer;
mod ratelimit;
mod recv;
mod rng;
mod session;
mod storage;
mod tracker;
mod webseed;

pub use create::{Options as CreateOptions, create as create_torrent};
pub use engine::{
    Choice, Chooser, Config, Engine, Event, Handle, MagnetSource, NoticeKind, PeerSource, Progress,
    SeedLimits, Source, Stats, StreamTo, Target,
};
pub use error::Error;
pub use magnet::{Error as MagnetError, Magnet};
pub use metainfo::{Error as TorrentError, Metainfo};
pub use storage::Error as StorageError;
