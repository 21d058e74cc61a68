//! Exit codes: one per cause, documented in the README and `--help`. Kept in one place so a
//! script can rely on them.

/// Every way bitfetch can end, with its process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Success = 0,
    /// `verify` found missing or corrupt pieces.
    Incomplete = 1,
    BadArguments = 2,
    BadTorrent = 3,
    Io = 4,
    DiskFull = 5,
    /// Every tracker failed and no peer could be reached.
    NoPeers = 6,
    Timeout = 7,
    Stalled = 8,
    Interrupted = 130,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// The table shown by `--help` and copied into the README.
pub const TABLE: &str = "\
Exit codes:
  0    success
  1    incomplete: missing or corrupt data (verify, seed)
  2    bad command-line arguments
  3    bad torrent file
  4    I/O error (reading or writing files)
  5    disk full
  6    tracker error or no reachable peers
  7    --timeout reached
  8    --stall-timeout reached
  130  interrupted (SIGINT/SIGTERM before completion)";

/// The exit code a failed command ends with.
pub fn of(e: &crate::error::Error) -> ExitCode {
    use crate::error::Error;
    use crate::storage;
    match e {
        Error::Usage(_) => ExitCode::BadArguments,
        Error::ReadTorrent { .. } => ExitCode::Io,
        Error::Torrent { .. } | Error::Magnet(_) => ExitCode::BadTorrent,
        Error::Storage(storage::Error::NoSpace { .. }) => ExitCode::DiskFull,
        Error::Storage(_) => ExitCode::Io,
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            ExitCode::DiskFull
        }
        Error::Io { .. } | Error::Internal(_) => ExitCode::Io,
        Error::Incomplete { .. } | Error::NoData(_) => ExitCode::Incomplete,
        Error::NoPeers(_) => ExitCode::NoPeers,
        Error::Timeout => ExitCode::Timeout,
        Error::Stalled => ExitCode::Stalled,
        Error::Interrupted => ExitCode::Interrupted,
        Error::OutputClosed => ExitCode::Success,
    }
}
