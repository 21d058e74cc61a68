//! The command line: arguments, the commands, exit codes. The only part of bitfetch that
//! prints, reads argv or handles signals; it drives the engine through its public API, and
//! nothing below it imports it.

pub mod exit;
pub mod process;
mod render;
mod transfer;

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use argh::FromArgs;

use crate::create;
use crate::error::Error;
use crate::json;
use crate::metainfo::{self, Metainfo};
use crate::path_safety::escape;
use crate::storage::{Layout, Storage};
use crate::tracker::{self, NetConfig};
use std::time::Duration;

pub use render::stderr_line;

#[derive(FromArgs, Debug)]
/// bitfetch: a one-shot BitTorrent downloader and seeder.
#[argh(
    note = "Exit codes: 0 success, 1 incomplete, 2 bad arguments, 3 bad torrent, 4 I/O error, \
5 disk full, 6 tracker error or no peers, 7 timeout, 8 stalled, 130 interrupted."
)]
pub struct Args {
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Info(InfoArgs),
    Create(CreateArgs),
    Verify(VerifyArgs),
    Download(DownloadArgs),
    Seed(SeedArgs),
    Scrape(ScrapeArgs),
}

#[derive(FromArgs, Debug)]
/// Show what a .torrent file holds.
#[argh(subcommand, name = "info")]
pub struct InfoArgs {
    /// the .torrent file
    #[argh(positional)]
    pub torrent: PathBuf,
    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs, Debug)]
/// Make a .torrent from a file or a directory.
#[argh(subcommand, name = "create")]
pub struct CreateArgs {
    /// the file or directory to share
    #[argh(positional)]
    pub path: PathBuf,
    /// tracker announce URL (repeat for backup trackers, each its own tier)
    #[argh(option, short = 'a')]
    pub announce: Vec<String>,
    /// piece length in bytes: a power of two of at least 16384 (default: automatic)
    #[argh(option)]
    pub piece_length: Option<u32>,
    /// where to write the torrent (default: NAME.torrent in the current directory)
    #[argh(option, short = 'o')]
    pub output: Option<PathBuf>,
    /// mark the torrent private (BEP 27: trackers only, no DHT or PEX)
    #[argh(switch)]
    pub private: bool,
    /// a comment to store in the torrent
    #[argh(option)]
    pub comment: Option<String>,
}

#[derive(FromArgs, Debug)]
/// Check data on disk against a torrent; exit 0 only when complete and correct.
#[argh(subcommand, name = "verify")]
pub struct VerifyArgs {
    /// the .torrent file
    #[argh(positional)]
    pub torrent: PathBuf,
    /// the directory holding the content, or the file itself for a single-file torrent
    /// (default: .)
    #[argh(positional, default = "PathBuf::from(\".\")")]
    pub data: PathBuf,
}

/// Declares a command struct with the options `download` and `seed` share after its own
/// (argh has no flattening of option groups).
macro_rules! with_session_options {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($own)*
            /// a peer to connect to, HOST:PORT (repeatable); works with or without a tracker
            #[argh(option)]
            pub peer: Vec<String>,
            /// port to listen on for incoming peers (default: the first free of 6881-6889, else
            /// any free port; 0 picks any free port)
            #[argh(option)]
            pub port: Option<u16>,
            /// local address for listening and for outgoing connections (e.g. 127.0.0.1)
            #[argh(option)]
            pub bind: Option<IpAddr>,
            /// PEM file of certificate authorities to trust for HTTPS trackers (default: built-in
            /// roots, or $SSL_CERT_FILE)
            #[argh(option)]
            pub ca_file: Option<PathBuf>,
            /// seconds between announces, overriding the tracker's interval
            #[argh(option)]
            pub announce_interval: Option<u64>,
            /// most peers to be connected to at once (default 50)
            #[argh(option, default = "50")]
            pub max_peers: usize,
            /// most connections to or from one IP address (default 8)
            #[argh(option, default = "8")]
            pub max_peers_per_ip: usize,
            /// regular upload slots; one optimistic slot comes on top (default 4)
            #[argh(option, default = "4")]
            pub upload_slots: usize,
            /// upload limit in bytes per second, e.g. 500K or 2M (default: none)
            #[argh(option)]
            pub max_upload_rate: Option<String>,
            /// download limit in bytes per second, e.g. 500K or 2M (default: none)
            #[argh(option)]
            pub max_download_rate: Option<String>,
            /// stop seeding once uploaded bytes reach this multiple of the torrent size, e.g. 1.5
            #[argh(option)]
            pub seed_ratio: Option<String>,
            /// stop seeding after this long, e.g. 90s, 30m, 2h
            #[argh(option)]
            pub seed_time: Option<String>,
            /// give up (exit 7) if the whole run takes longer than this, e.g. 10m
            #[argh(option)]
            pub timeout: Option<String>,
            /// give up (exit 8) if no piece is verified for this long, e.g. 2m
            #[argh(option)]
            pub stall_timeout: Option<String>,
            /// newline-delimited JSON events on stdout instead of text (see the README)
            #[argh(switch)]
            pub json: bool,
            /// no progress output; errors only
            #[argh(switch, short = 'q')]
            pub quiet: bool,
        }
    };
}

with_session_options! {
#[derive(FromArgs, Debug)]
/// Download a torrent, then exit (or keep seeding with --seed).
#[argh(subcommand, name = "download")]
pub struct DownloadArgs {
    /// the .torrent file
    #[argh(positional)]
    pub torrent: PathBuf,
    /// directory to download into (default: ., or a temporary directory with -O -)
    #[argh(option, short = 'o')]
    pub output: Option<PathBuf>,
    /// write the content to stdout ('-'), in order, as pieces verify (one file: see --file)
    #[argh(option, short = 'O')]
    pub output_document: Option<String>,
    /// same as -O -
    #[argh(switch)]
    pub stdout: bool,
    /// with -O -: the file of a multi-file torrent to stream, by its --list index
    #[argh(option)]
    pub file: Option<usize>,
    /// list the torrent's files with their index and size, then exit
    #[argh(switch)]
    pub list: bool,
    /// download only files whose path matches this glob (* and ?; repeatable)
    #[argh(option)]
    pub only: Vec<String>,
    /// download only these files, by --list index: e.g. 1,3-5
    #[argh(option)]
    pub select: Option<String>,
    /// keep seeding after the download completes, until a seeding limit or Ctrl-C
    #[argh(switch)]
    pub seed: bool,
    /// exit as soon as the download is complete (the default)
    #[argh(switch)]
    pub no_seed: bool,
    /// wait until the data is on stable storage before reporting success (msync)
    #[argh(switch)]
    pub fsync: bool,
}
}

with_session_options! {
#[derive(FromArgs, Debug)]
/// Seed existing data (verified first) until interrupted.
#[argh(subcommand, name = "seed")]
pub struct SeedArgs {
    /// the .torrent file
    #[argh(positional)]
    pub torrent: PathBuf,
    /// the directory holding the content, or the file itself for a single-file torrent
    #[argh(positional)]
    pub data: PathBuf,
}
}

#[derive(FromArgs, Debug)]
/// Ask the torrent's trackers how many seeders and leechers they know.
#[argh(subcommand, name = "scrape")]
pub struct ScrapeArgs {
    /// the .torrent file
    #[argh(positional)]
    pub torrent: PathBuf,
    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,
    /// local address for outgoing connections
    #[argh(option)]
    pub bind: Option<IpAddr>,
    /// PEM file of certificate authorities to trust for HTTPS trackers
    #[argh(option)]
    pub ca_file: Option<PathBuf>,
}

/// The program: arguments from argv, the command run, its outcome as an exit code.
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode as Code;
    let argv: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let (cmd, rest) = strs
        .split_first()
        .map_or(("bitfetch", &[][..]), |(c, r)| (*c, r));
    let cmd = Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bitfetch");
    let rest = lone_dash_last(rest);
    let args = match Args::from_args(&[cmd], &rest) {
        Ok(a) => a,
        Err(early) => {
            return if early.status.is_ok() {
                // A reader that closed the pipe (`| head`) has what it wanted.
                let _ = writeln!(
                    std::io::stdout().lock(),
                    "{}\n\n{}",
                    early.output,
                    exit::TABLE
                );
                Code::SUCCESS
            } else {
                stderr_line(&format!(
                    "{}\nRun 'bitfetch --help' for usage.",
                    early.output.trim_end()
                ));
                Code::from(exit::ExitCode::BadArguments.code())
            };
        }
    };
    process::install_sigbus_guard();
    process::raise_open_file_limit();
    match run(args) {
        Ok(()) => Code::SUCCESS,
        Err(e) => {
            stderr_line(&format!("bitfetch: error: {e}"));
            Code::from(exit::of(&e).code())
        }
    }
}

fn run(args: Args) -> Result<(), Error> {
    let json = match &args.command {
        Command::Download(a) => a.json,
        Command::Seed(a) => a.json,
        _ => false,
    };
    let result = match dispatch(args) {
        // A closed `-O -` pipe means the reader has what it wanted.
        Err(Error::OutputClosed) => Ok(()),
        other => other,
    };
    if json && let Err(e) = &result {
        let line = render::json_error(exit::of(e).code(), &e.to_string());
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
    result
}

fn dispatch(args: Args) -> Result<(), Error> {
    match args.command {
        Command::Info(a) => info(&a),
        Command::Create(a) => create_cmd(&a),
        Command::Verify(a) => verify(&a),
        Command::Download(a) => transfer::download(&a),
        Command::Seed(a) => transfer::seed(&a),
        Command::Scrape(a) => scrape(&a),
    }
}

/// Loads a torrent from a path, from standard input (`-`), or from an `http(s)://` URL.
pub fn load_torrent(path: &Path) -> Result<Metainfo, Error> {
    load_torrent_with(path, None)
}

/// As [`load_torrent`]; `ca_file` is trusted for an `https://` torrent URL.
pub fn load_torrent_with(path: &Path, ca_file: Option<&Path>) -> Result<Metainfo, Error> {
    let limit = crate::bencode::Limits::METAINFO.max_size;
    let text = path.to_string_lossy();
    let read_err = |source: std::io::Error| Error::ReadTorrent {
        path: path.to_path_buf(),
        source,
    };
    let bytes = if text == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        buf
    } else if text.starts_with("http://") || text.starts_with("https://") {
        fetch_torrent(&text, ca_file).map_err(|e| match e {
            FetchError::TooLarge => too_large(path, limit as u64 + 1),
            FetchError::Other(m) => read_err(std::io::Error::other(m)),
        })?
    } else {
        let meta = fs::metadata(path).map_err(read_err)?;
        if meta.len() > limit as u64 {
            return Err(too_large(path, meta.len()));
        }
        fs::read(path).map_err(read_err)?
    };
    if bytes.len() > limit {
        return Err(too_large(path, bytes.len() as u64));
    }
    Metainfo::from_bytes(&bytes).map_err(|source| Error::Torrent {
        path: path.to_path_buf(),
        source,
    })
}

fn too_large(path: &Path, size: u64) -> Error {
    Error::Torrent {
        path: path.to_path_buf(),
        source: metainfo::Error::Bencode(crate::bencode::Error::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            max: crate::bencode::Limits::METAINFO.max_size,
        }),
    }
}

enum FetchError {
    TooLarge,
    Other(String),
}

/// GETs a .torrent: certificates verified, 60 s overall, body capped at the metainfo limit.
fn fetch_torrent(url: &str, ca: Option<&Path>) -> Result<Vec<u8>, FetchError> {
    let agent = crate::http::agent(Duration::from_secs(60), None, ca_file(ca).as_deref())
        .map_err(|e| FetchError::Other(e.to_string()))?;
    let mut resp = crate::http::get(&agent, url).map_err(|e| FetchError::Other(e.to_string()))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(FetchError::Other(format!("HTTP status {status}")));
    }
    let limit = crate::bencode::Limits::METAINFO.max_size as u64;
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge,
            e => FetchError::Other(e.to_string()),
        })
}

/// Resolves `HOST:PORT` arguments; a bad one is a usage error.
pub fn parse_peers(peers: &[String]) -> Result<Vec<SocketAddr>, Error> {
    peers
        .iter()
        .map(|p| {
            p.to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Error::Usage(format!("--peer {p}: expected HOST:PORT")))
        })
        .collect()
}

/// The options `download` and `seed` share, borrowed from either.
pub struct SessionOptions<'a> {
    pub peer: &'a [String],
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub ca_file: Option<&'a Path>,
    pub announce_interval: Option<u64>,
    pub max_peers: usize,
    pub max_peers_per_ip: usize,
    pub upload_slots: usize,
    pub max_upload_rate: Option<&'a str>,
    pub max_download_rate: Option<&'a str>,
    pub seed_ratio: Option<&'a str>,
    pub seed_time: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub stall_timeout: Option<&'a str>,
    pub json: bool,
    pub quiet: bool,
}

macro_rules! session_options {
    ($a:expr) => {
        SessionOptions {
            peer: &$a.peer,
            port: $a.port,
            bind: $a.bind,
            ca_file: $a.ca_file.as_deref(),
            announce_interval: $a.announce_interval,
            max_peers: $a.max_peers,
            max_peers_per_ip: $a.max_peers_per_ip,
            upload_slots: $a.upload_slots,
            max_upload_rate: $a.max_upload_rate.as_deref(),
            max_download_rate: $a.max_download_rate.as_deref(),
            seed_ratio: $a.seed_ratio.as_deref(),
            seed_time: $a.seed_time.as_deref(),
            timeout: $a.timeout.as_deref(),
            stall_timeout: $a.stall_timeout.as_deref(),
            json: $a.json,
            quiet: $a.quiet,
        }
    };
}

impl DownloadArgs {
    pub fn options(&self) -> SessionOptions<'_> {
        session_options!(self)
    }
    /// Whether to keep running after completion: `--seed` or any seeding limit.
    pub fn seeding(&self) -> bool {
        !self.no_seed && (self.seed || self.seed_ratio.is_some() || self.seed_time.is_some())
    }

    /// Whether the content goes to stdout (`-O -` or `--stdout`).
    pub fn streaming(&self) -> Result<bool, Error> {
        match self.output_document.as_deref() {
            Some("-") => Ok(true),
            Some(other) => Err(Error::Usage(format!(
                "-O {other}: only '-' (standard output) is supported; use -o DIR for files"
            ))),
            None => Ok(self.stdout),
        }
    }

    /// Which files to download: all, or those `--select` and `--only` name (1-based
    /// indices as `--list` shows them).
    pub fn selection(&self, meta: &Metainfo) -> Result<Option<Vec<bool>>, Error> {
        if self.select.is_none() && self.only.is_empty() {
            return Ok(None);
        }
        let n = meta.files.len();
        let mut chosen = vec![false; n];
        if let Some(spec) = &self.select {
            for i in parse_index_list(spec, n).map_err(Error::Usage)? {
                chosen[i] = true;
            }
        }
        for (i, f) in meta.files.iter().enumerate() {
            let rel = torrent_relative(meta, &f.path);
            if self.only.iter().any(|g| glob_match(g, &rel)) {
                chosen[i] = true;
            }
        }
        if !chosen.iter().any(|c| *c) {
            return Err(Error::Usage(
                "--select/--only match no file of the torrent (see --list)".into(),
            ));
        }
        Ok(Some(chosen))
    }
}

/// A file's path inside the torrent, as `--list` shows it and `--only` matches it: without
/// the top directory of a multi-file torrent.
pub fn torrent_relative(meta: &Metainfo, path: &Path) -> String {
    let rel = if meta.multi_file {
        path.strip_prefix(&meta.name).unwrap_or(path)
    } else {
        path
    };
    rel.to_string_lossy().into_owned()
}

/// `*` matches any run of characters (including `/`), `?` any one character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `1,3-5` → zero-based indices, each checked against `n` files.
pub fn parse_index_list(spec: &str, n: usize) -> Result<Vec<usize>, String> {
    let bad = |part: &str| format!("--select {spec}: '{part}' is not an index or range of 1..={n}");
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let a: usize = a.trim().parse().map_err(|_| bad(part))?;
        let b: usize = b.trim().parse().map_err(|_| bad(part))?;
        if a == 0 || b < a || b > n {
            return Err(bad(part));
        }
        out.extend(a - 1..b);
    }
    if out.is_empty() {
        return Err(bad(spec));
    }
    Ok(out)
}

/// `--list`: index, size and path of every file.
pub fn list_files(meta: &Metainfo) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    for (i, f) in meta.files.iter().enumerate() {
        writeln!(
            out,
            "{:>4} {:>14} {}",
            i + 1,
            f.len,
            escape(&torrent_relative(meta, &f.path))
        )
        .map_err(|e| Error::io("writing to stdout", e))?;
    }
    Ok(())
}

impl SeedArgs {
    pub fn options(&self) -> SessionOptions<'_> {
        session_options!(self)
    }
}

/// Parses `1.5` into 15/10: exact, so a ratio stops at exactly the byte it names.
pub fn parse_ratio(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--seed-ratio {s}: expected a number like 1 or 1.5");
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if int.is_empty() && frac.is_empty() || frac.len() > 6 || int.len() > 9 {
        return Err(bad());
    }
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || !digits(frac) {
        return Err(bad());
    }
    let den = 10u64.pow(frac.len() as u32);
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let frac: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    Ok((int * den + frac, den))
}

/// Parses `90`, `90s`, `30m`, `2h` or `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        Some('d') => (&t[..t.len() - 1], 86400),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s}: expected a duration like 90s, 30m or 2h"))?;
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s}: duration too long"))
}

/// `--ca-file`, with `SSL_CERT_FILE` as the fallback.
fn ca_file(arg: Option<&Path>) -> Option<PathBuf> {
    arg.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SSL_CERT_FILE").map(PathBuf::from))
}

fn scrape(a: &ScrapeArgs) -> Result<(), Error> {
    let m = load_torrent(&a.torrent)?;
    let net = NetConfig {
        bind: a.bind,
        ca_file: ca_file(a.ca_file.as_deref()),
    };
    let mut client = tracker::Client::new(&net, Duration::from_secs(15))
        .map_err(|e| Error::Usage(e.to_string()))?;
    let urls: Vec<&String> = m.trackers.iter().flatten().collect();
    if urls.is_empty() {
        return Err(Error::NoPeers("the torrent names no tracker".into()));
    }
    let results: Vec<(&String, Result<tracker::ScrapeInfo, tracker::Error>)> = urls
        .into_iter()
        .map(|u| (u, client.scrape(u, &m.info_hash)))
        .collect();
    let out = if a.json {
        let items = results.iter().map(|(u, r)| match r {
            Ok(s) => format!(
                "{{\"url\":{},\"seeders\":{},\"leechers\":{},\"completed\":{}}}",
                json::string(u),
                s.seeders,
                s.leechers,
                s.completed
            ),
            Err(e) => format!(
                "{{\"url\":{},\"error\":{}}}",
                json::string(u),
                json::string(&e.to_string())
            ),
        });
        format!("{{\"trackers\":{}}}", json::array(items))
    } else {
        results
            .iter()
            .map(|(u, r)| match r {
                Ok(s) => format!(
                    "{}: {} seeders, {} leechers, {} completed",
                    escape(u),
                    s.seeders,
                    s.leechers,
                    s.completed
                ),
                Err(e) => format!("{}: {e}", escape(u)),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    writeln!(std::io::stdout().lock(), "{out}").map_err(|e| Error::io("writing to stdout", e))?;
    if results.iter().any(|(_, r)| r.is_ok()) {
        Ok(())
    } else {
        Err(Error::NoPeers("no tracker answered the scrape".into()))
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

fn info(a: &InfoArgs) -> Result<(), Error> {
    let m = load_torrent(&a.torrent)?;
    let out = if a.json { info_json(&m) } else { info_text(&m) };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}").map_err(|e| Error::io("writing to stdout", e))
}

fn info_text(m: &Metainfo) -> String {
    let g = &m.geometry;
    let mut s = format!(
        "name:          {}\ninfo hash:     {}\nsize:          {} ({} bytes)\npiece length:  {}\npieces:        {}\nprivate:       {}\n",
        escape(&m.name),
        m.info_hash_hex(),
        human_bytes(g.total_len()),
        g.total_len(),
        human_bytes(u64::from(g.nominal_piece_len())),
        g.piece_count(),
        if m.private { "yes" } else { "no" },
    );
    if let Some(c) = &m.comment {
        s += &format!("comment:       {}\n", escape(c));
    }
    if let Some(c) = &m.created_by {
        s += &format!("created by:    {}\n", escape(c));
    }
    if let Some(d) = m.creation_date {
        s += &format!("creation date: {d} (unix time)\n");
    }
    s += &format!("files ({}):\n", m.files.len());
    for f in &m.files {
        s += &format!("  {:>14}  {}\n", f.len, escape(&f.path.to_string_lossy()));
    }
    s += "trackers:\n";
    for (i, tier) in m.trackers.iter().enumerate() {
        for url in tier {
            s += &format!("  tier {}: {}\n", i + 1, escape(url));
        }
    }
    if m.trackers.is_empty() {
        s += "  (none)\n";
    }
    s.pop();
    s
}

fn info_json(m: &Metainfo) -> String {
    let g = &m.geometry;
    let files = json::array(m.files.iter().map(|f| {
        format!(
            "{{\"path\":{},\"size\":{}}}",
            json::string(&f.path.to_string_lossy()),
            f.len
        )
    }));
    let trackers = json::array(
        m.trackers
            .iter()
            .map(|t| json::array(t.iter().map(|u| json::string(u)))),
    );
    format!(
        "{{\"name\":{},\"info_hash\":\"{}\",\"total_size\":{},\"piece_length\":{},\"pieces\":{},\"private\":{},\"files\":{files},\"trackers\":{trackers},\"comment\":{},\"created_by\":{},\"creation_date\":{}}}",
        json::string(&m.name),
        m.info_hash_hex(),
        g.total_len(),
        g.nominal_piece_len(),
        g.piece_count(),
        m.private,
        json::opt_string(m.comment.as_deref()),
        json::opt_string(m.created_by.as_deref()),
        m.creation_date
            .map_or("null".to_string(), |d| d.to_string()),
    )
}

fn create_cmd(a: &CreateArgs) -> Result<(), Error> {
    if let Some(pl) = a.piece_length
        && (pl < 16 * 1024 || !pl.is_power_of_two() || u64::from(pl) > metainfo::MAX_PIECE_LEN)
    {
        return Err(Error::Usage(format!(
            "--piece-length {pl}: must be a power of two between 16384 and {}",
            metainfo::MAX_PIECE_LEN
        )));
    }
    for url in &a.announce {
        if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("udp://"))
        {
            return Err(Error::Usage(format!(
                "-a {url}: tracker URLs start with http://, https:// or udp://"
            )));
        }
    }
    let opts = create::Options {
        trackers: a.announce.clone(),
        piece_len: a.piece_length,
        private: a.private,
        comment: a.comment.clone(),
        threads: 0,
    };
    let bytes = create::create(&a.path, &opts)?;
    // Re-parse what we made: the same strict checks every reader applies.
    let meta = Metainfo::from_bytes(&bytes).map_err(|source| Error::Torrent {
        path: a.path.clone(),
        source,
    })?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.torrent", meta.name)));
    fs::write(&out, &bytes).map_err(|e| Error::io(format!("writing {}", out.display()), e))?;
    render::stderr_line(&format!(
        "bitfetch: created {} ({} in {} pieces, info hash {})",
        out.display(),
        human_bytes(meta.total_len()),
        meta.geometry.piece_count(),
        meta.info_hash_hex()
    ));
    Ok(())
}

fn verify(a: &VerifyArgs) -> Result<(), Error> {
    let m = load_torrent(&a.torrent)?;
    let layout = Layout::for_data_path(&a.data, &m);
    let storage = Storage::open_existing(&layout, &m.geometry)?;
    let results = storage.verify_all(&m, crate::engine::cores());
    let bad: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, ok)| !**ok)
        .map(|(i, _)| i)
        .collect();
    let total = results.len() as u32;
    let mut out = std::io::stdout().lock();
    let report = |out: &mut std::io::StdoutLock| -> std::io::Result<()> {
        writeln!(
            out,
            "{}: {} of {} pieces good",
            escape(&m.name),
            total as usize - bad.len(),
            total
        )?;
        if !bad.is_empty() {
            writeln!(out, "bad pieces: {}", ranges(&bad))?;
        }
        Ok(())
    };
    report(&mut out).map_err(|e| Error::io("writing to stdout", e))?;
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Incomplete {
            bad: bad.len() as u32,
            total,
        })
    }
}

/// `[1,2,3,7]` → `1-3,7`.
fn ranges(sorted: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_ranges_are_compact() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn ratios_and_durations_parse_exactly() {
        assert_eq!(parse_ratio("1.5").unwrap(), (15, 10));
        assert_eq!(parse_ratio("2").unwrap(), (2, 1));
        assert_eq!(parse_ratio("0.25").unwrap(), (25, 100));
        assert_eq!(parse_ratio(".5").unwrap(), (5, 10));
        for bad in ["", ".", "-1", "1e3", "x", "1.2345678"] {
            assert!(parse_ratio(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn globs_and_index_lists() {
        assert!(glob_match("*.iso", "dir/a.iso"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("*.iso", "a.img"));
        assert!(glob_match("d*/*.txt", "dir/x/y.txt"));
        assert_eq!(parse_index_list("1,3-5", 5).unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_index_list("0", 5).is_err());
        assert!(parse_index_list("6", 5).is_err());
        assert!(parse_index_list("3-1", 5).is_err());
        assert!(parse_index_list("x", 5).is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
    }
}

/// argh takes every argument that starts with `-` for an option, so `download - -o out` (the
/// torrent on stdin) would be refused. A lone `-` in a positional place is moved behind `--`,
/// where argh reads it as the positional it is. A `-` that is an option's value (`-O -`) stays.
pub fn lone_dash_last<'a>(args: &[&'a str]) -> Vec<&'a str> {
    // Flags without a value; every other `-x`/`--xyz` (without `=`) takes the next argument.
    const SWITCHES: &[&str] = &[
        "--json",
        "--private",
        "--stdout",
        "--list",
        "--seed",
        "--no-seed",
        "--quiet",
        "-q",
        "--help",
        "-h",
    ];
    if args.contains(&"--") {
        return args.to_vec();
    }
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut dash = false;
    let mut value_next = false;
    // The first argument is the subcommand.
    for (i, &a) in args.iter().enumerate() {
        if i > 0 && a == "-" && !value_next && !dash {
            dash = true;
            continue;
        }
        value_next = i > 0
            && a.starts_with('-')
            && a.len() > 1
            && !a.contains('=')
            && !SWITCHES.contains(&a);
        out.push(a);
    }
    if dash {
        out.extend(["--", "-"]);
    }
    out
}

#[cfg(test)]
mod lone_dash_tests {
    use super::lone_dash_last;

    #[test]
    fn a_positional_dash_moves_behind_double_dash() {
        assert_eq!(
            lone_dash_last(&["download", "-", "-o", "out"]),
            ["download", "-o", "out", "--", "-"]
        );
        assert_eq!(
            lone_dash_last(&["download", "--json", "-", "-O", "-"]),
            ["download", "--json", "-O", "-", "--", "-"]
        );
        // `-O -` alone is an option value, not the torrent.
        assert_eq!(
            lone_dash_last(&["download", "x.torrent", "-O", "-"]),
            ["download", "x.torrent", "-O", "-"]
        );
        assert_eq!(
            lone_dash_last(&["download", "-o", "-", "x"]),
            ["download", "-o", "-", "x"]
        );
    }
}
