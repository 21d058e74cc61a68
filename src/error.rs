//! The fatal, command-level error: what ends a run, with the exit code it maps to. Per-peer
//! trouble never reaches this type; it ends that peer only.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::exit::ExitCode;
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
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::BadArguments,
            Error::ReadTorrent { .. } => ExitCode::Io,
            Error::Torrent { .. } => ExitCode::BadTorrent,
            Error::Storage(storage::Error::NoSpace { .. }) => ExitCode::DiskFull,
            Error::Storage(_) => ExitCode::Io,
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
                ExitCode::DiskFull
            }
            Error::Io { .. } => ExitCode::Io,
            Error::Incomplete { .. } => ExitCode::Incomplete,
            Error::NoPeers(_) => ExitCode::NoPeers,
            Error::Timeout => ExitCode::Timeout,
            Error::Stalled => ExitCode::Stalled,
            Error::Interrupted => ExitCode::Interrupted,
            Error::OutputClosed => ExitCode::Success,
        }
    }

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
        }
    }
}

impl std::error::Error for Error {}

impl From<storage::Error> for Error {
    fn from(e: storage::Error) -> Error {
        Error::Storage(e)
    }
}
