//! The fatal, command-level error: what ends a run (the CLI maps each to an exit code). Per-peer
//! trouble never reaches this type; it ends that peer only.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::{metainfo, storage};

#[derive(Debug)]
pub enum Error {
    Usage(String),
    ReadTorrent {
        path: PathBuf,
        source: io::Error,
    },
    Torrent {
        path: PathBuf,
        source: metainfo::Error,
    },
    Storage(storage::Error),
    Io {
        context: String,
        source: io::Error,
    },
    Incomplete {
        bad: u32,
        total: u32,
    },
    NoPeers(String),
    Timeout,
    Stalled,
    Interrupted,
    /// The reader of `-O -` closed the pipe: not a failure (exit 0).
    OutputClosed,
    /// A thread of ours died on a broken invariant (a bug, not bad input).
    Internal(&'static str),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m}"),
            Error::ReadTorrent { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            Error::Torrent { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Storage(e) => write!(f, "{e}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Incomplete { bad, total } => {
                write!(f, "{bad} of {total} pieces are missing or corrupt")
            }
            Error::NoPeers(m) => write!(f, "{m}"),
            Error::Timeout => write!(f, "timed out"),
            Error::Stalled => write!(f, "no progress for too long (stalled)"),
            Error::Interrupted => write!(f, "interrupted"),
            Error::OutputClosed => write!(f, "standard output was closed"),
            Error::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<storage::Error> for Error {
    fn from(e: storage::Error) -> Error {
        Error::Storage(e)
    }
}
