//! The one owner of the terminal and of stdout during a transfer: the engine's events, drawn
//! for people or written as JSON. Only the CLI's main thread calls it.
//!
//! Three modes:
//! - a person (`Human`): on a terminal, one status line redrawn in place on stderr, fitted to
//!   the terminal's width, notes printed above it, a summary at the end; when stderr is not a
//!   terminal (a CI log), a plain progress line every `--progress-interval` instead;
//! - `--quiet`: errors only (main prints those);
//! - `--json`: newline-delimited events on stdout (schema in the README), nothing else there.
//!
//! Without `--json`, stdout carries only the paths of the downloaded files, one per line, once
//! the download is complete.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::human_bytes;
use crate::engine::{Event, NoticeKind, PeerSource, Progress};
use crate::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Human,
    Quiet,
    Json,
}

/// How often the status line is redrawn on a terminal.
const REDRAW: Duration = Duration::from_millis(200);
/// Progress events in JSON mode come at this steady interval.
const JSON_INTERVAL: Duration = Duration::from_secs(1);
/// Rates are measured over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(5);

pub struct Render {
    mode: Mode,
    /// stderr is a terminal: the status line is redrawn in place.
    tty: bool,
    /// Plain progress lines when stderr is not a terminal (`None`: never).
    interval: Option<Duration>,
    /// A status line is on screen (to clear before printing anything else).
    drawn: bool,
    last_draw: Option<Instant>,
    last_json: Instant,
    last_line: Instant,
    rates: Rates,
    /// Bytes per second from web seeds (part of the download rate).
    web_rates: Rates,
    size: u64,
    /// Bytes verified at start (resumed data): not counted as transfer.
    verified_at_start: u64,
    last: Option<Progress>,
    finished: bool,
    started: Instant,
}

/// Download and upload rates over the last few seconds, from cumulative counters.
struct Rates {
    samples: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl Rates {
    fn new() -> Rates {
        Rates {
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Records the counters now; returns (download, upload) bytes per second.
    fn sample(&mut self, now: Instant, down: u64, up: u64) -> (u64, u64) {
        self.samples.push_back((now, down, up));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|s| now.duration_since(s.0) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let (t0, d0, u0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs < 0.2 {
            return (0, 0);
        }
        let rate = |a: u64, b: u64| (a.saturating_sub(b) as f64 / secs) as u64;
        (rate(down, d0), rate(up, u0))
    }
}

impl Render {
    /// `interval`: plain progress lines when stderr is not a terminal (`None` or zero: off).
    pub fn new(mode: Mode, interval: Option<Duration>) -> Render {
        let now = Instant::now();
        Render {
            mode,
            tty: std::io::stderr().is_terminal(),
            interval: interval.filter(|d| !d.is_zero()),
            drawn: false,
            last_draw: None,
            last_json: now,
            last_line: now,
            rates: Rates::new(),
            web_rates: Rates::new(),
            size: 0,
            verified_at_start: 0,
            last: None,
            finished: false,
            started: now,
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
            Event::Progress(p) => self.update(p),
            Event::FileCompleted { path, size } => {
                self.file_completed(&path.display().to_string(), *size)
            }
            Event::Notice { kind, message } => self.note_kind(json_kind(*kind), message),
            Event::TrackerError { url, message } => self.tracker_error(url, message),
            Event::WebSeedError { url, message } => self.web_seed_error(url, message),
            Event::Dht { address, nodes } => self.dht(*address, *nodes),
            Event::PeersFound { source, count } => self.peers_found(*source, *count),
            Event::MetadataProgress {
                peers,
                received,
                pieces,
            } => self.metadata_progress(*peers, *received, *pieces),
            Event::Metadata {
                size,
                pieces,
                peers,
            } => self.metadata(*size, *pieces, *peers),
            Event::Finished {
                verified,
                transferred,
                web_seed_bytes,
                uploaded,
                elapsed,
                paths,
            } => self.finish(
                *verified,
                (*transferred, *web_seed_bytes),
                *uploaded,
                *elapsed,
                paths,
            ),
            // Events of later versions of the engine are not ours to show.
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// The run ended (with or without `Finished`): the status line is cleared, and a run
    /// that was seeding says what it gave.
    pub fn close(&mut self) {
        self.clear();
        if self.mode != Mode::Human {
            return;
        }
        if let Some(p) = self.last.filter(|p| p.complete && p.uploaded > 0) {
            stderr_line(&format!(
                "bitfetch: uploaded {} (ratio {:.2}) in {}",
                human_bytes(p.uploaded),
                ratio(p.uploaded, p.total),
                duration(self.started.elapsed())
            ));
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
        self.size = size;
        self.verified_at_start = verified;
        self.started = Instant::now();
        if self.mode == Mode::Json {
            let info_hash: String = info_hash.iter().map(|b| format!("{b:02x}")).collect();
            self.emit(&format!(
                "{{\"event\":\"start\",\"name\":{},\"info_hash\":\"{info_hash}\",\"size\":{size},\"pieces\":{pieces},\"files\":{files},\"verified\":{verified}}}",
                json::string(name)
            ));
        }
    }

    /// The listening address: a JSON event, or a stderr line (scripts that seed need the
    /// port).
    fn listening(&self, addr: std::net::SocketAddr) {
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"listening\",\"address\":\"{addr}\"}}"
            )),
            Mode::Human => stderr_line(&format!("bitfetch: listening on {addr}")),
            Mode::Quiet => {}
        }
    }

    fn update(&mut self, p: &Progress) {
        let now = Instant::now();
        let (down, up) = self.rates.sample(now, p.transferred, p.uploaded);
        let (web, _) = self.web_rates.sample(now, p.web_seed_bytes, 0);
        self.last = Some(*p);
        match self.mode {
            Mode::Json if now.duration_since(self.last_json) >= JSON_INTERVAL => {
                self.last_json = now;
                self.emit(&format!(
                    "{{\"event\":\"progress\",\"downloaded\":{},\"total\":{},\"transferred\":{},\"uploaded\":{},\"rate\":{down},\"upload_rate\":{up},\"peers\":{},\"seeders\":{},\"trackers\":{},\"web_seeds\":{},\"web_seed_bytes\":{},\"web_seed_rate\":{web}}}",
                    p.verified,
                    p.total,
                    p.transferred,
                    p.uploaded,
                    p.peers,
                    p.seeds,
                    p.trackers,
                    p.web_seeds,
                    p.web_seed_bytes
                ));
            }
            Mode::Human if self.tty && !self.finished => {
                if self
                    .last_draw
                    .is_some_and(|t| now.duration_since(t) < REDRAW)
                {
                    return;
                }
                self.last_draw = Some(now);
                let width = super::process::terminal_width().unwrap_or(80);
                let line = status_line(p, down, up, width);
                // One write: carriage return, the line, clear to its end.
                let _ = std::io::stderr()
                    .lock()
                    .write_all(format!("\r{line}\x1b[K").as_bytes());
                self.drawn = true;
            }
            Mode::Human if !self.tty => {
                let Some(every) = self.interval else { return };
                if now.duration_since(self.last_line) < every {
                    return;
                }
                self.last_line = now;
                stderr_line(&format!(
                    "bitfetch: {}",
                    status_line(p, down, up, usize::MAX)
                ));
            }
            _ => {}
        }
    }

    /// Clears the status line, if one is drawn.
    fn clear(&mut self) {
        if self.drawn {
            let _ = std::io::stderr().lock().write_all(b"\r\x1b[K");
            self.drawn = false;
            self.last_draw = None;
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
                self.clear();
                stderr_line(&format!("bitfetch: {msg}"));
            }
        }
    }

    /// A magnet's metadata phase, on a terminal: what it waits for.
    fn metadata_progress(&mut self, peers: usize, received: u32, pieces: u32) {
        if self.mode != Mode::Human || !self.tty {
            return;
        }
        let line = if pieces == 0 {
            format!("fetching the metadata: {}", peers_text(peers))
        } else {
            format!(
                "fetching the metadata: {received} of {pieces} pieces, {}",
                peers_text(peers)
            )
        };
        let width = super::process::terminal_width().unwrap_or(80);
        let line: String = line.chars().take(width.saturating_sub(1)).collect();
        let _ = write!(std::io::stderr().lock(), "\r\x1b[K{line}");
        self.drawn = true;
    }

    /// A magnet's metadata is in.
    fn metadata(&mut self, size: u64, pieces: u32, peers: usize) {
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"metadata\",\"size\":{size},\"pieces\":{pieces},\"peers\":{peers}}}"
            )),
            Mode::Quiet | Mode::Human => self.clear(),
        }
    }

    /// A tracker failed: `tracker URL: why` for people, the URL as its own field in JSON.
    fn tracker_error(&mut self, url: &str, message: &str) {
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"tracker_error\",\"url\":{},\"message\":{}}}",
                json::string(url),
                json::string(&format!(
                    "tracker {}: {message}",
                    crate::path_safety::escape(url)
                ))
            )),
            Mode::Quiet => {}
            Mode::Human => {
                self.clear();
                stderr_line(&format!(
                    "bitfetch: tracker {}: {message}",
                    crate::path_safety::escape(url)
                ));
            }
        }
    }

    /// A web seed failed: `web seed URL: why` for people, the URL as its own field in JSON.
    fn web_seed_error(&mut self, url: &str, message: &str) {
        let text = format!("web seed {}: {message}", crate::path_safety::escape(url));
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"web_seed_error\",\"url\":{},\"message\":{}}}",
                json::string(url),
                json::string(&text)
            )),
            Mode::Quiet => {}
            Mode::Human => {
                self.clear();
                stderr_line(&format!("bitfetch: {text}"));
            }
        }
    }

    /// The DHT is up: JSON only (people see DHT trouble as notices).
    fn dht(&self, address: std::net::SocketAddr, nodes: usize) {
        if self.mode == Mode::Json {
            self.emit(&format!(
                "{{\"event\":\"dht\",\"address\":\"{address}\",\"nodes\":{nodes}}}"
            ));
        }
    }

    /// A source named peers: JSON only (the status line counts connections).
    fn peers_found(&self, source: PeerSource, count: usize) {
        if self.mode == Mode::Json {
            let source = match source {
                PeerSource::Tracker => "tracker",
                PeerSource::Dht => "dht",
                PeerSource::Pex => "pex",
                #[allow(unreachable_patterns)]
                _ => "other",
            };
            self.emit(&format!(
                "{{\"event\":\"peers\",\"source\":\"{source}\",\"count\":{count}}}"
            ));
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

    /// The download is complete: the status line goes; a person gets a summary on stderr, a
    /// script gets the file paths on stdout, JSON gets a `finished` event.
    fn finish(
        &mut self,
        verified: u64,
        (transferred, web_seed_bytes): (u64, u64),
        uploaded: u64,
        elapsed: Duration,
        paths: &[std::path::PathBuf],
    ) {
        self.clear();
        self.finished = true;
        let secs = elapsed.as_secs_f64();
        match self.mode {
            Mode::Json => self.emit(&format!(
                "{{\"event\":\"finished\",\"downloaded\":{verified},\"transferred\":{transferred},\"web_seed_bytes\":{web_seed_bytes},\"uploaded\":{uploaded},\"elapsed\":{secs:.3}}}"
            )),
            Mode::Human | Mode::Quiet => {
                if self.mode == Mode::Human {
                    let summary = if transferred == 0 && verified > 0 {
                        format!(
                            "bitfetch: downloaded nothing: all {} were already here",
                            human_bytes(verified)
                        )
                    } else {
                        let rate = if secs > 0.0 {
                            transferred as f64 / secs
                        } else {
                            0.0
                        };
                        format!(
                            "bitfetch: downloaded {} in {} ({}/s)",
                            human_bytes(transferred),
                            duration(elapsed),
                            human_bytes(rate as u64)
                        )
                    };
                    stderr_line(&summary);
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

/// `uploaded / total`, for a seed ratio.
fn ratio(uploaded: u64, total: u64) -> f64 {
    uploaded as f64 / total.max(1) as f64
}

/// `1h 02m`, `3m 05s`, `12.3 s`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, s / 60 % 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn peers_text(n: usize) -> String {
    if n == 1 {
        "1 peer".into()
    } else {
        format!("{n} peers")
    }
}

/// Peers, and web seeds when there are any: `3 peers`, `2 peers +1 web`.
fn sources_text(peers: usize, web_seeds: usize) -> String {
    if web_seeds == 0 {
        peers_text(peers)
    } else {
        format!("{} +{web_seeds} web", peers_text(peers))
    }
}

/// The status line, fitted to `width` columns: the parts that matter most first, a bar only
/// where there is room for a useful one.
///
/// Downloading: `[#####-----]  45%  45.2 MiB / 100.0 MiB  12.3 MiB/s  3 peers  ETA 5s`.
/// Seeding: `seeding  up 1.20 MiB/s  3 peers  ratio 0.42`.
fn status_line(p: &Progress, down: u64, up: u64, width: usize) -> String {
    if p.complete {
        let parts = [
            "seeding".to_string(),
            format!("up {}/s", human_bytes(up)),
            peers_text(p.peers),
            format!("ratio {:.2}", ratio(p.uploaded, p.total)),
        ];
        return fit(&parts, width);
    }
    let pct = if p.total == 0 {
        100.0
    } else {
        p.verified as f64 * 100.0 / p.total as f64
    };
    let eta = (down > 0).then(|| {
        let secs = p.total.saturating_sub(p.verified) / down.max(1);
        format!("ETA {}", short_duration(secs))
    });
    let parts: Vec<String> = [
        Some(format!("{pct:.0}%")),
        Some(format!(
            "{} / {}",
            human_bytes(p.verified),
            human_bytes(p.total)
        )),
        Some(format!("{}/s", human_bytes(down))),
        Some(sources_text(p.peers, p.web_seeds)),
        eta,
    ]
    .into_iter()
    .flatten()
    .collect();
    let text = fit(&parts, width);
    // A bar in what is left, when at least 10 columns are.
    let room = width
        .saturating_sub(1)
        .saturating_sub(text.chars().count() + 1);
    if width == usize::MAX || room < 12 {
        return text;
    }
    let inner = (room - 2).min(30);
    let filled = ((pct / 100.0) * inner as f64) as usize;
    format!(
        "[{}{}] {text}",
        "#".repeat(filled.min(inner)),
        "-".repeat(inner - filled.min(inner))
    )
}

/// Joins `parts` with two spaces, dropping parts from the end until the line fits `width`
/// (a terminal's last column is left free, so the line never wraps).
fn fit(parts: &[String], width: usize) -> String {
    let limit = width.saturating_sub(1);
    let mut n = parts.len();
    loop {
        let line = parts[..n].join("  ");
        if line.chars().count() <= limit || n == 1 {
            return line.chars().take(limit).collect();
        }
        n -= 1;
    }
}

/// `45s`, `3m 05s`, `2h 10m`.
fn short_duration(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}h {:02}m", secs / 3600, secs / 60 % 60)
    } else if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
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
        NoticeKind::Dht => "dht_notice",
        NoticeKind::WebSeed => "web_seed_error",
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

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(verified: u64, complete: bool) -> Progress {
        Progress {
            verified,
            total: 100 << 20,
            transferred: verified,
            uploaded: 3 << 20,
            peers: 1,
            seeds: 1,
            web_seeds: 0,
            web_seed_bytes: 0,
            trackers: 1,
            complete,
        }
    }

    #[test]
    fn web_seeds_show_beside_peers_within_the_width() {
        let p = Progress {
            peers: 12,
            web_seeds: 2,
            ..progress(45 << 20, false)
        };
        for width in [20, 40, 80] {
            let line = status_line(&p, 12 << 20, 0, width);
            assert!(line.chars().count() < width, "{width}: {line:?}");
        }
        assert!(status_line(&p, 12 << 20, 0, 120).contains("12 peers +2 web"));
        assert_eq!(sources_text(0, 1), "0 peers +1 web");
    }

    #[test]
    fn the_status_line_fits_narrow_and_wide_terminals() {
        let p = progress(45 << 20, false);
        for width in [20, 40, 80, 120, 200] {
            let line = status_line(&p, 12 << 20, 0, width);
            assert!(line.chars().count() < width, "{width}: {line:?}");
            assert!(line.contains("45%"), "{width}: {line:?}");
        }
        let wide = status_line(&p, 12 << 20, 0, 120);
        assert!(wide.starts_with('[') && wide.contains("] 45%"), "{wide}");
        for part in ["45.00 MiB / 100.00 MiB", "12.00 MiB/s", "1 peer ", "ETA 4s"] {
            assert!(wide.contains(part), "{part} in {wide}");
        }
        assert!(!wide.contains("peers"), "one peer is a peer: {wide}");
        let narrow = status_line(&p, 12 << 20, 0, 40);
        assert!(!narrow.contains('['), "no room for a bar: {narrow}");
    }

    #[test]
    fn seeding_shows_upload_rate_peers_and_ratio() {
        let line = status_line(&progress(100 << 20, true), 0, 1 << 20, 120);
        assert_eq!(line, "seeding  up 1.00 MiB/s  1 peer  ratio 0.03");
    }

    #[test]
    fn resumed_data_is_not_a_transfer_rate() {
        let mut rates = Rates::new();
        let t0 = Instant::now();
        // 2 TB verified at start is not in the counters at all: only transfers are.
        assert_eq!(rates.sample(t0, 0, 0), (0, 0));
        let (down, _) = rates.sample(t0 + Duration::from_secs(1), 1 << 20, 0);
        assert_eq!(down, 1 << 20);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(short_duration(45), "45s");
        assert_eq!(short_duration(185), "3m 05s");
        assert_eq!(short_duration(7800), "2h 10m");
        assert_eq!(duration(Duration::from_millis(12_340)), "12.3 s");
    }
}
