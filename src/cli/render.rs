//! The one owner of the terminal and of stdout during a transfer: the engine's events, drawn
//! for people or written as JSON. Only the CLI's main thread calls it.
//!
//! Three modes:
//! - a person at a terminal: a progress bar on stderr, notes above it, a summary at the end;
//! - a script (stderr not a terminal, or `--quiet`): no bar; notes and summary unless quiet;
//! - `--json`: newline-delimited events on stdout (schema in the README), nothing else there.
//!
//! Without `--json`, stdout carries only the paths of the downloaded files, one per line, once
//! the download is complete.

use std::io::{IsTerminal, Stderr, Write};
use std::time::{Duration, Instant};

use pbr::{ProgressBar, Units};

use super::human_bytes;
use crate::engine::{Event, NoticeKind};
use crate::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Human,
    Quiet,
    Json,
}

pub struct Render {
    bar: Option<ProgressBar<Stderr>>,
    mode: Mode,
    last_draw: Instant,
    last_json: Instant,
    /// (time, bytes) at the previous JSON progress event, for its rate.
    last_sample: (Instant, u64),
}

/// Progress events in JSON mode come at this steady interval.
const JSON_INTERVAL: Duration = Duration::from_secs(1);

impl Render {
    pub fn new(mode: Mode) -> Render {
        let now = Instant::now();
        Render {
            bar: None,
            mode,
            last_draw: now,
            last_json: now,
            last_sample: (now, 0),
        }
    }

    /// Shows one event of the engine.
    pub fn event(&mut self, event: &Event) {
        match event {
            Event::Started {
                name,
                info_hash,
                size,
                pieces,
                files,
                verified,
            } => self.start(name, info_hash, *size, *pieces, *files, *verified),
            Event::Listening(addr) => self.listening(*addr),
            Event::Progress(p) => self.update(p.verified, p.total, p.peers, p.seeds),
            Event::FileCompleted { path, size } => {
                self.file_completed(&path.display().to_string(), *size)
            }
            Event::Notice { kind, message } => self.note_kind(json_kind(*kind), message),
            Event::Finished {
                downloaded,
                uploaded,
                elapsed,
                paths,
            } => self.finish(*downloaded, *uploaded, *elapsed, paths),
            // Events of later versions of the engine are not ours to show.
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// The run ended (with or without `Finished`): a bar left open is closed.
    pub fn close(&mut self) {
        if let Some(mut pb) = self.bar.take() {
            pb.finish_print("");
        }
    }

    fn emit(&self, line: &str) {
        // A closed stdout is noticed by the caller's next write of data, not here.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    fn start(
        &mut self,
        name: &str,
        info_hash: &[u8; 20],
        size: u64,
        pieces: u32,
        files: usize,
        verified: u64,
    ) {
        let now = Instant::now();
        self.last_sample = (now, verified);
        self.last_json = now;
        if self.mode == Mode::Json {
            let info_hash: String = info_hash.iter().map(|b| format!("{b:02x}")).collect();
            self.emit(&format!(
                "{{\"event\":\"start\",\"name\":{},\"info_hash\":\"{info_hash}\",\"size\":{size},\"pieces\":{pieces},\"files\":{files}}}",
                json::string(name)
            ));
        }
        // No bar for data that is complete already (a seeder, a finished resume).
        let show = self.mode == Mode::Human && verified < size && std::io::stderr().is_terminal();
        self.bar = show.then(|| {
            let mut pb = ProgressBar::on(std::io::stderr(), size);
            pb.set_units(Units::Bytes);
            pb.set_max_refresh_rate(Some(Duration::from_millis(200)));
            pb.show_speed = true;
            pb.show_time_left = true;
            pb.set(verified);
            pb
        });
    }

    /// The listening address: a JSON event, or a stderr line (kept even with `--quiet`
    /// suppressed: scripts that seed need the port).
    fn listening(&self, addr: std::net::SocketAddr) {
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"listening\",\"address\":\"{addr}\"}}"
            )),
            Mode::Human => stderr_line(&format!("bitfetch: listening on {addr}")),
            Mode::Quiet => {}
        }
    }

    fn update(&mut self, done: u64, total: u64, peers: usize, seeds: usize) {
        let now = Instant::now();
        if self.mode == Mode::Json && now.duration_since(self.last_json) >= JSON_INTERVAL {
            let (t0, b0) = self.last_sample;
            let secs = now.duration_since(t0).as_secs_f64().max(1e-3);
            let rate = (done.saturating_sub(b0) as f64 / secs) as u64;
            self.last_json = now;
            self.last_sample = (now, done);
            self.emit(&format!(
                "{{\"event\":\"progress\",\"downloaded\":{done},\"total\":{total},\"rate\":{rate},\"peers\":{peers},\"seeders\":{seeds}}}"
            ));
        }
        if now.duration_since(self.last_draw) < Duration::from_millis(200) {
            return;
        }
        self.last_draw = now;
        if let Some(pb) = &mut self.bar {
            pb.message(&format!("{peers} peers ({seeds} seeds) "));
            pb.set(done);
        }
    }

    /// Something people should know (tracker trouble, bans, hash failures). `kind` names the
    /// JSON event.
    fn note_kind(&mut self, kind: &str, msg: &str) {
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"{kind}\",\"message\":{}}}",
                json::string(msg)
            )),
            Mode::Quiet => {}
            Mode::Human => {
                // Clear the bar's line first, in the same write.
                let clear = if self.bar.is_some() { "\r\x1b[2K" } else { "" };
                stderr_line(&format!("{clear}bitfetch: {msg}"));
            }
        }
    }

    fn file_completed(&self, path: &str, size: u64) {
        if self.mode == Mode::Json {
            self.emit(&format!(
                "{{\"event\":\"file_completed\",\"path\":{},\"size\":{size}}}",
                json::string(path)
            ));
        }
    }

    /// The download is complete: the bar closes; a person gets a summary on stderr, a script
    /// gets the file paths on stdout, JSON gets a `finished` event.
    fn finish(
        &mut self,
        downloaded: u64,
        uploaded: u64,
        elapsed: Duration,
        paths: &[std::path::PathBuf],
    ) {
        self.close();
        let secs = elapsed.as_secs_f64();
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"finished\",\"downloaded\":{downloaded},\"uploaded\":{uploaded},\"elapsed\":{secs:.3}}}"
            )),
            Mode::Human | Mode::Quiet => {
                if self.mode == Mode::Human {
                    let rate = if secs > 0.0 {
                        downloaded as f64 / secs
                    } else {
                        0.0
                    };
                    stderr_line(&format!(
                        "bitfetch: downloaded {} in {secs:.1} s ({}/s)",
                        human_bytes(downloaded),
                        human_bytes(rate as u64)
                    ));
                }
                let mut out = std::io::stdout().lock();
                for p in paths {
                    let _ = writeln!(out, "{}", p.display());
                }
                let _ = out.flush();
            }
        }
    }
}

/// The JSON event name of a notice.
fn json_kind(kind: NoticeKind) -> &'static str {
    match kind {
        NoticeKind::Tracker => "tracker_error",
        NoticeKind::PeerUnreachable => "peer_error",
        NoticeKind::PeerBanned => "peer_banned",
        NoticeKind::HashFailed => "hash_failed",
        NoticeKind::DiskChanged => "disk_changed",
        _ => "notice",
    }
}

/// The `error` event for `--json` runs (main prints the human line on stderr either way).
pub fn json_error(code: u8, msg: &str) -> String {
    format!(
        "{{\"event\":\"error\",\"code\":{code},\"message\":{}}}",
        json::string(msg)
    )
}

/// Writes one line to stderr in a single `write`: `eprintln!` on the unbuffered stderr issues
/// one write per formatted piece, and a script reading the listening line could see half an
/// address.
pub fn stderr_line(line: &str) {
    let mut buf = String::with_capacity(line.len() + 1);
    buf.push_str(line);
    buf.push('\n');
    let _ = std::io::stderr().lock().write_all(buf.as_bytes());
}
