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
    /// A malformed magnet link.
    Magnet(crate::magnet::Error),
    Storage(storage::Error),
    Io {
        context: String,
        source: io::Error,
    },
    Incomplete {
        bad: u32,
        total: u32,
    },
    /// The data path holds none of the torrent's files (the message says what was looked
    /// for).
    NoData(String),
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
    /// The error for a data path that holds none of the torrent's files: what was looked for,
    /// and for a multi-file torrent, that the path is the directory holding its top directory.
    pub(crate) fn no_data(
        data: &std::path::Path,
        meta: &metainfo::Metainfo,
        layout: &storage::Layout,
    ) -> Error {
        if !meta.multi_file {
            return Error::NoData(format!("no file at {}", layout.full_path(0).display()));
        }
        let given = data.display();
        let name = &meta.name;
        Error::NoData(if data.file_name().is_some_and(|n| *n == **name) {
            format!(
                "{given} holds the torrent's files themselves; give the directory that holds {name}/ (its parent)"
            )
        } else {
            format!("no {name}/ in {given}: give the directory that holds the torrent's {name}/")
        })
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
                write!(f, "cannot read {}: {}", path.display(), reason(source))
            }
            Error::Torrent { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Magnet(e) => write!(f, "{e}"),
            Error::Storage(e) => write!(f, "{e}"),
            Error::Io { context, source } => write!(f, "{context}: {}", reason(source)),
            Error::Incomplete { bad, total } => {
                write!(f, "{bad} of {total} pieces are missing or corrupt")
            }
            Error::NoPeers(m) | Error::NoData(m) => write!(f, "{m}"),
            Error::Timeout => write!(f, "timed out"),
            Error::Stalled => write!(f, "no progress for too long (stalled)"),
            Error::Interrupted => write!(f, "interrupted"),
            Error::OutputClosed => write!(f, "standard output was closed"),
            Error::Internal(what) => write!(f, "internal error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// An I/O error as people read it: the system's words without the " (os error N)" that
/// `io::Error` appends, first letter lower-cased to sit after a colon.
pub(crate) fn reason(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) if chars.clone().next().is_some_and(char::is_lowercase) => {
            c.to_lowercase().chain(chars).collect()
        }
        _ => text.to_string(),
    }
}

impl From<storage::Error> for Error {
    fn from(e: storage::Error) -> Error {
        Error::Storage(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_reasons_read_as_words() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(reason(&e), "connection refused");
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(reason(&e), "no such file or directory");
        assert_eq!(
            reason(&io::Error::other("HTTP status 404")),
            "HTTP status 404"
        );
    }
}
