//! Process-wide settings, which belong to the program, not to the engine: SIGINT and SIGTERM
//! become a flag the CLI turns into `Handle::stop`, SIGBUS (a mapped file truncated under us)
//! becomes a clear message instead of a crash, and the open-file limit is raised.
//!
//! Besides storage, this is the one module with `unsafe`: these are all FFI calls.

use std::sync::atomic::{AtomicBool, Ordering};

/// Replaces the default SIGBUS crash with a one-line explanation and exit code 4 (I/O error).
/// Only async-signal-safe calls (`write`, `_exit`) run in the handler.
pub fn install_sigbus_guard() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] =
            b"bitfetch: error: a data file shrank or vanished while mapped (SIGBUS); \
            was it truncated by another program?\n";
        // SAFETY: write and _exit are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(4);
        }
    }
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGBUS, on_sigbus as *const () as libc::sighandler_t);
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into a flag the CLI polls, so a stop is orderly: files flushed,
/// `stopped` announced. A second signal exits at once.
pub fn install_stop_handler() {
    extern "C" fn on_stop(_: libc::c_int) {
        if STOP.swap(true, Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
    // SAFETY: the handler only touches an atomic and calls _exit, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
    }
}

pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Raises the soft limit on open files to the hard limit. Every data file of a torrent stays
/// open while it runs (plus a socket per peer), and the usual soft limit of 1024 is below
/// what a torrent of a thousand files needs; the hard limit is ours to take.
pub fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass; setrlimit only reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The width of the terminal on stderr, in columns, if stderr is one.
pub fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize we pass; fd 2 is only queried.
    let rc = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}
