//! bitfetch: a one-shot BitTorrent downloader and seeder.
//!
//! No async runtime: one OS thread per peer connection does blocking I/O, one session thread
//! owns all torrent state, and blocks go straight into memory-mapped files. The README's
//! "Architecture" section describes the threads and the messages between them.

pub mod bencode;
pub mod choker;
pub mod cli;
pub mod create;
pub mod error;
pub mod exit;
pub mod extension;
#[doc(hidden)]
pub mod fuzz;
pub mod geometry;
pub mod http;
pub mod json;
pub mod messages;
pub mod metainfo;
pub mod path_safety;
pub mod peer;
pub mod picker;
pub mod progress;
pub mod ratelimit;
pub mod recv;
pub mod rng;
pub mod session;
pub mod storage;
pub mod tracker;
pub mod wire;
