//! The command line's grammar: argh structures for every command, the options `download`
//! and `seed` share, and the parsers of values (peers, sizes, durations, ratios, file
//! selections). Pure functions, unit-tested.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use argh::{ArgsInfo, FromArgs};

use crate::error::Error;
use crate::metainfo::Metainfo;

// The help screens (`help.rs`) are drawn from these structures: each option's placeholder is
// its `arg_name`, its line is its doc comment (what it does, then its default), and each
// command's examples are its `example`s. Where an option is listed, and under which heading,
// is `help.rs`'s business.

#[derive(FromArgs, ArgsInfo, Debug)]
/// A one-shot BitTorrent downloader and seeder.
pub struct Args {
    #[argh(subcommand)]
    pub command: Command,
}

/// The commands, most used first (the order of `bitfetch --help`).
#[derive(FromArgs, ArgsInfo, Debug)]
#[argh(subcommand)]
pub enum Command {
    Download(DownloadArgs),
    Seed(SeedArgs),
    Info(InfoArgs),
    Verify(VerifyArgs),
    Create(CreateArgs),
    Scrape(ScrapeArgs),
    Magnet(MagnetArgs),
}

#[derive(FromArgs, ArgsInfo, Debug)]
/// Print a torrent's magnet link.
#[argh(
    subcommand,
    name = "magnet",
    example = "bitfetch magnet ubuntu.torrent"
)]
pub struct MagnetArgs {
    /// a .torrent path, - for one on standard input, or an http(s):// URL of one
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
}

#[derive(FromArgs, ArgsInfo, Debug)]
/// Show what a torrent holds: name, size, files, trackers.
#[argh(
    subcommand,
    name = "info",
    example = "bitfetch info ubuntu.torrent",
    example = "bitfetch info x.torrent --json | jq .files"
)]
pub struct InfoArgs {
    /// a .torrent path, - for one on standard input, an http(s):// URL of one, or a
    /// magnet link (its metadata is fetched from peers)
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,
}

#[derive(FromArgs, ArgsInfo, Debug)]
/// Make a .torrent from a file or a directory.
#[argh(
    subcommand,
    name = "create",
    example = "bitfetch create ./dir -a http://tracker.example/announce",
    example = "bitfetch create big.iso --piece-length 4M -o big.torrent"
)]
pub struct CreateArgs {
    /// the file or directory to share
    #[argh(positional, arg_name = "PATH")]
    pub path: PathBuf,
    /// where to write the torrent (default: NAME.torrent in the current directory)
    #[argh(option, short = 'o', arg_name = "FILE")]
    pub output: Option<PathBuf>,
    /// tracker announce URL: http(s):// or udp://; repeat for backup trackers, each in its
    /// own tier (default: none, for use with --peer)
    #[argh(option, short = 'a', arg_name = "URL")]
    pub announce: Vec<String>,
    /// replace the output file if it exists
    #[argh(switch, short = 'f')]
    pub force: bool,
    /// piece length: a power of two from 16K to 256M, e.g. 256K or 1M (default: chosen
    /// from the size)
    #[argh(option, arg_name = "SIZE")]
    pub piece_length: Option<String>,
    /// mark the torrent private (BEP 27: clients take peers from its trackers only, no
    /// DHT or PEX)
    #[argh(switch)]
    pub private: bool,
    /// a comment to store in the torrent
    #[argh(option, arg_name = "TEXT")]
    pub comment: Option<String>,
    /// make a BitTorrent v2 torrent (BEP 52: per-file SHA-256 merkle trees), which v1-only
    /// clients cannot read
    #[argh(switch)]
    pub v2: bool,
    /// make a hybrid v1 + v2 torrent (BEP 52), readable by every client; files are padded
    /// to piece boundaries with BEP 47 pad files
    #[argh(switch)]
    pub hybrid: bool,
}

#[derive(FromArgs, ArgsInfo, Debug)]
/// Check data against a torrent; exit 0 only if complete.
#[argh(
    subcommand,
    name = "verify",
    example = "bitfetch verify x.torrent ~/Downloads && echo complete",
    example = "bitfetch verify x.torrent big.iso --json"
)]
pub struct VerifyArgs {
    /// a .torrent path, - for one on standard input, or an http(s):// URL of one
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
    /// the directory holding the content (as given to download -o), or the file itself
    /// for a single-file torrent (default: the current directory)
    #[argh(positional, default = "PathBuf::from(\".\")", arg_name = "DATA")]
    pub data: PathBuf,
    /// print nothing: the exit code says it all (0 complete, 1 not)
    #[argh(switch, short = 'q')]
    pub quiet: bool,
    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,
}

/// Declares a command struct with the options `download` and `seed` share after its own
/// (argh has no flattening of option groups).
macro_rules! with_session_options {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($own)*
            /// connect to this peer, with or without a tracker; repeatable
            #[argh(option, arg_name = "HOST:PORT")]
            pub peer: Vec<String>,
            /// port to listen on for incoming peers (default: the first free of 6881-6889,
            /// else any; 0 for any free port)
            #[argh(option, arg_name = "PORT")]
            pub port: Option<u16>,
            /// local address to listen on and connect from, e.g. 127.0.0.1 (default: listen
            /// on every address, IPv4 and IPv6)
            #[argh(option, arg_name = "IP")]
            pub bind: Option<IpAddr>,
            /// PEM file of certificate authorities to trust for HTTPS (default:
            /// $SSL_CERT_FILE if set, else the built-in Mozilla roots)
            #[argh(option, arg_name = "FILE")]
            pub ca_file: Option<PathBuf>,
            /// re-announce this often instead of at the tracker's interval, e.g. 30s
            /// (small swarms, tests)
            #[argh(option, arg_name = "DURATION")]
            pub announce_interval: Option<String>,
            /// join the DHT through this node instead of the public routers; repeatable
            #[argh(option, arg_name = "HOST:PORT")]
            pub dht_bootstrap: Vec<String>,
            /// do not use the DHT: peers come from trackers, --peer and peer exchange only
            /// (private torrents never use it)
            #[argh(switch)]
            pub no_dht: bool,
            /// most connections at once (default 80)
            #[argh(option, default = "80", arg_name = "N")]
            pub max_peers: usize,
            /// most connections to or from one IP address (default 8)
            #[argh(option, default = "8", arg_name = "N")]
            pub max_peers_per_ip: usize,
            /// peers uploaded to at once, plus one optimistic slot (default 4)
            #[argh(option, default = "4", arg_name = "N")]
            pub upload_slots: usize,
            /// no peer exchange (BEP 11): peers are neither told about each other nor
            /// learnt from each other (private torrents never exchange peers)
            #[argh(switch)]
            pub no_pex: bool,
            /// also fetch from this web seed (BEP 19): an http or https URL of the file, or of
            /// the directory holding the torrent's name; repeatable
            #[argh(option, arg_name = "URL")]
            pub web_seed: Vec<String>,
            /// use no web seed: neither the torrent's url-list, a magnet link's ws, nor
            /// --web-seed
            #[argh(switch)]
            pub no_web_seeds: bool,
            /// upload limit in bytes per second, e.g. 500K or 2M (default 0: no limit)
            #[argh(option, arg_name = "RATE")]
            pub max_upload_rate: Option<String>,
            /// download limit in bytes per second, e.g. 500K or 2M (default 0: no limit)
            #[argh(option, arg_name = "RATE")]
            pub max_download_rate: Option<String>,
            /// stop seeding once this run has uploaded RATIO times the torrent's size, e.g.
            /// 1.5; implies --seed
            #[argh(option, arg_name = "RATIO")]
            pub seed_ratio: Option<String>,
            /// stop seeding after this long, e.g. 30m, 2h, 1d; implies --seed
            #[argh(option, arg_name = "DURATION")]
            pub seed_time: Option<String>,
            /// give up (exit 7) if the download is not complete after this long, e.g. 10m;
            /// once it is, this only ends the seeding (exit 0)
            #[argh(option, arg_name = "DURATION")]
            pub timeout: Option<String>,
            /// give up (exit 8) if no piece is verified for this long, e.g. 2m
            #[argh(option, arg_name = "DURATION")]
            pub stall_timeout: Option<String>,
            /// newline-delimited JSON events on stdout instead of text (fields: see the
            /// README)
            #[argh(switch)]
            pub json: bool,
            /// no progress output; errors only
            #[argh(switch, short = 'q')]
            pub quiet: bool,
            /// when stderr is not a terminal (a CI log), a progress line this often; 0 for
            /// none (default 10s)
            #[argh(option, arg_name = "DURATION")]
            pub progress_interval: Option<String>,
        }
    };
}

with_session_options! {
#[derive(FromArgs, ArgsInfo, Debug, Clone)]
/// Download a torrent and exit (or keep seeding: --seed).
#[argh(
    subcommand,
    name = "download",
    example = "bitfetch download ubuntu.torrent -o ~/Downloads",
    example = "bitfetch download x.torrent --peer 192.0.2.7:6881 --seed-time 1h",
    example = "bitfetch download https://example.org/x.torrent -O - | tar x",
    example = "bitfetch download x.torrent --timeout 10m --stall-timeout 2m -q"
)]
pub struct DownloadArgs {
    /// a .torrent path, - for one on standard input, an http(s):// URL of one, or a
    /// magnet link
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
    /// directory to download into (default: the current directory; with -O -, a
    /// temporary one, removed at the end)
    #[argh(option, short = 'o', arg_name = "DIR")]
    pub output: Option<PathBuf>,
    /// stream the content to standard output in order, as pieces verify; FILE must be -
    /// (for one file of several, see --file)
    #[argh(option, short = 'O', arg_name = "FILE")]
    pub output_document: Option<String>,
    /// same as -O -
    #[argh(switch)]
    pub stdout: bool,
    /// with -O -: the file of a multi-file torrent to stream, by its --list index
    #[argh(option, arg_name = "N")]
    pub file: Option<usize>,
    /// wait until the data is on stable storage (msync) before exiting with success
    #[argh(switch)]
    pub fsync: bool,
    /// list the torrent's files (index, size, path), then exit
    #[argh(switch)]
    pub list: bool,
    /// with a magnet link: also write the fetched torrent to FILE
    #[argh(option, arg_name = "FILE")]
    pub save_torrent: Option<PathBuf>,
    /// download only these files, by --list index, e.g. 1,3-5
    #[argh(option, arg_name = "LIST")]
    pub select: Option<String>,
    /// download only files whose path matches GLOB (* and ?; * also matches /);
    /// repeatable
    #[argh(option, arg_name = "GLOB")]
    pub only: Vec<String>,
    /// keep seeding after the download completes, until a limit below or Ctrl-C
    #[argh(switch)]
    pub seed: bool,
    /// exit as soon as the download is complete (the default)
    #[argh(switch)]
    pub no_seed: bool,
}
}

with_session_options! {
#[derive(FromArgs, ArgsInfo, Debug)]
/// Check data on disk, then seed it until stopped.
#[argh(
    subcommand,
    name = "seed",
    example = "bitfetch seed x.torrent ~/Downloads",
    example = "bitfetch seed x.torrent big.iso --seed-ratio 2 --max-upload-rate 1M"
)]
pub struct SeedArgs {
    /// a .torrent path, - for one on standard input, or an http(s):// URL of one
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
    /// the directory holding the content (as given to download -o), or the file itself
    /// for a single-file torrent
    #[argh(positional, arg_name = "DATA")]
    pub data: PathBuf,
}
}

#[derive(FromArgs, ArgsInfo, Debug)]
/// Ask the trackers for counts of seeders and leechers.
#[argh(
    subcommand,
    name = "scrape",
    example = "bitfetch scrape x.torrent",
    example = "bitfetch scrape x.torrent --json | jq '.trackers[].seeders'"
)]
pub struct ScrapeArgs {
    /// a .torrent path, - for one on standard input, or an http(s):// URL of one
    #[argh(positional, arg_name = "TORRENT")]
    pub torrent: PathBuf,
    /// print one JSON object instead of text
    #[argh(switch)]
    pub json: bool,
    /// local address to connect from, e.g. 127.0.0.1 (default: chosen by the system)
    #[argh(option, arg_name = "IP")]
    pub bind: Option<IpAddr>,
    /// PEM file of certificate authorities to trust for HTTPS (default:
    /// $SSL_CERT_FILE if set, else the built-in Mozilla roots)
    #[argh(option, arg_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Resolves `HOST:PORT` arguments; a bad one is a usage error.
pub fn parse_peers(peers: &[String]) -> Result<Vec<SocketAddr>, Error> {
    peers
        .iter()
        .map(|p| parse_peer(p).map_err(|why| Error::Usage(format!("--peer {p}: {why}"))))
        .collect()
}

/// `HOST:PORT`, `IP:PORT` or `[IPv6]:PORT`, with a reason when it is none of these.
fn parse_peer(p: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = p.parse::<SocketAddr>() {
        return if addr.port() == 0 {
            Err("port 0 is not a port one can connect to".into())
        } else {
            Ok(addr)
        };
    }
    let Some((host, port)) = p.rsplit_once(':') else {
        return Err("expected HOST:PORT, e.g. 192.0.2.7:6881 or [2001:db8::7]:6881".into());
    };
    let port: u16 = match port.parse::<u64>() {
        Ok(n @ 1..=65535) => n as u16,
        Ok(n) => return Err(format!("port {n} is out of range (1 to 65535)")),
        Err(_) => return Err(format!("'{port}' is not a port number")),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err("the host is missing (HOST:PORT)".into());
    }
    match (host, port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("{host} has no address")),
        Err(e) => Err(format!(
            "cannot resolve {host}: {}",
            crate::error::reason(&e)
        )),
    }
}

/// Checks `--dht-bootstrap HOST:PORT` without resolving it: the DHT resolves its bootstrap
/// names on its own thread, in bounded time, so a slow resolver never holds up the start.
pub fn check_dht_nodes(nodes: &[String]) -> Result<Vec<String>, Error> {
    nodes
        .iter()
        .map(|n| {
            let bad = |why: &str| Error::Usage(format!("--dht-bootstrap {n}: {why}"));
            let (host, port) = n
                .rsplit_once(':')
                .ok_or_else(|| bad("expected HOST:PORT, e.g. 127.0.0.2:6881"))?;
            match port.parse::<u16>() {
                Ok(1..) => {}
                _ => return Err(bad(&format!("'{port}' is not a port number (1 to 65535)"))),
            }
            if host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .is_empty()
            {
                return Err(bad("the host is missing (HOST:PORT)"));
            }
            Ok(n.clone())
        })
        .collect()
}

/// Where the DHT keeps its node id and routing table between runs:
/// `$XDG_CACHE_HOME/bitfetch/dht.dat`, else `~/.cache/bitfetch/dht.dat`.
pub fn dht_state_file() -> Option<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".cache"))
        })?;
    Some(cache.join("bitfetch").join("dht.dat"))
}

/// The options `download` and `seed` share, borrowed from either.
pub struct SessionOptions<'a> {
    pub peer: &'a [String],
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub ca_file: Option<&'a Path>,
    pub announce_interval: Option<&'a str>,
    pub dht_bootstrap: &'a [String],
    pub no_dht: bool,
    pub max_peers: usize,
    pub max_peers_per_ip: usize,
    pub upload_slots: usize,
    pub no_pex: bool,
    pub web_seed: &'a [String],
    pub no_web_seeds: bool,
    pub max_upload_rate: Option<&'a str>,
    pub max_download_rate: Option<&'a str>,
    pub seed_ratio: Option<&'a str>,
    pub seed_time: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub stall_timeout: Option<&'a str>,
    pub json: bool,
    pub quiet: bool,
    pub progress_interval: Option<&'a str>,
}

macro_rules! session_options {
    ($a:expr) => {
        SessionOptions {
            peer: &$a.peer,
            port: $a.port,
            bind: $a.bind,
            ca_file: $a.ca_file.as_deref(),
            announce_interval: $a.announce_interval.as_deref(),
            dht_bootstrap: &$a.dht_bootstrap,
            no_dht: $a.no_dht,
            max_peers: $a.max_peers,
            max_peers_per_ip: $a.max_peers_per_ip,
            upload_slots: $a.upload_slots,
            no_pex: $a.no_pex,
            web_seed: &$a.web_seed,
            no_web_seeds: $a.no_web_seeds,
            max_upload_rate: $a.max_upload_rate.as_deref(),
            max_download_rate: $a.max_download_rate.as_deref(),
            seed_ratio: $a.seed_ratio.as_deref(),
            seed_time: $a.seed_time.as_deref(),
            timeout: $a.timeout.as_deref(),
            stall_timeout: $a.stall_timeout.as_deref(),
            json: $a.json,
            quiet: $a.quiet,
            progress_interval: $a.progress_interval.as_deref(),
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
        // Indices count the files a user sees (pad files are not among them).
        let visible: Vec<usize> = meta.content_files().map(|(i, _)| i).collect();
        let mut chosen = vec![false; meta.files.len()];
        if let Some(spec) = &self.select {
            for i in parse_index_list(spec, visible.len()).map_err(Error::Usage)? {
                chosen[visible[i]] = true;
            }
        }
        for (i, f) in meta.content_files() {
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

/// Parses a duration: a number of seconds (`90`), or numbers with units run together
/// (`90s`, `1.5s`, `250ms`, `30m`, `1h30m`, `2d`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s}: expected a duration like 90s, 1h30m or 1.5s");
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = t.parse().map_err(|_| format!("{s}: duration too long"))?;
        return Ok(Duration::from_secs(n));
    }
    let mut total = 0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let secs = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86_400.0,
            _ => return Err(bad()),
        };
        total += n * secs;
        rest = tail;
    }
    if !total.is_finite() || total > 1e12 {
        return Err(format!("{s}: duration too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a size or a rate: bytes (`16384`), or a number with a 1024-based suffix (`256K`,
/// `1.5M`, `2G`; also `KB`/`KiB` and lower case). The one reader of sizes, so every option
/// takes the same suffixes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s}: expected bytes, or a number with K, M or G, e.g. 500K or 1.5M");
    let digits = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    if !num.contains('.') {
        let n: u64 = num.parse().map_err(|_| bad())?;
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (n * mult as f64).floor();
    // Below 2^53 an f64 holds every whole number exactly.
    if !(0.0..9.0e15).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Parses a rate in bytes per second, written as a size is (`500K`, `1.5M`, `2MiB`, `64kb`):
/// the `B`/`iB` that [`parse_size`] allows after a number or a unit is dropped, and the rate
/// limiter reads the rest.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let unit = |r: &str| r.ends_with(['k', 'm', 'g']);
    let keep = match lower.strip_suffix("ib") {
        Some(r) if unit(r) => r.len(),
        _ => match lower.strip_suffix('b') {
            Some(r) if unit(r) || r.ends_with(|c: char| c.is_ascii_digit()) => r.len(),
            _ => t.len(),
        },
    };
    crate::ratelimit::parse_rate(&t[..keep])
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
        "--no-pex",
        "--no-web-seeds",
        "--quiet",
        "-q",
        "--force",
        "-f",
        "--fsync",
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
mod tests {
    use super::*;

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
    fn durations_with_units_run_together() {
        let secs = |s: &str| parse_duration(s).unwrap().as_secs_f64();
        assert_eq!(secs("1h30m"), 5400.0);
        assert_eq!(secs("1.5s"), 1.5);
        assert_eq!(secs("250ms"), 0.25);
        assert_eq!(secs("1d"), 86_400.0);
        for bad in ["", "1x", "h", "1.2.3s", "-5s", "1 h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_take_the_same_suffixes_everywhere() {
        assert_eq!(parse_size("16384").unwrap(), 16384);
        assert_eq!(parse_size("256K").unwrap(), 256 << 10);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        for (rate, bytes) in [("500K", 500 << 10), ("1.5M", 3 << 19), ("2MiB", 2 << 20)] {
            assert_eq!(parse_rate(rate).unwrap(), bytes, "{rate}");
            assert_eq!(parse_size(rate).unwrap(), bytes, "{rate}");
        }
        assert_eq!(parse_rate("64kb").unwrap(), 64 << 10);
        assert_eq!(parse_rate("100b").unwrap(), 100);
        assert_eq!(parse_size("500kb").unwrap(), 500 << 10);
        for bad in ["", "M", "1T", "1.2.3K", ".", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn peers_say_what_is_wrong_with_them() {
        assert_eq!(
            parse_peer("127.0.0.1:6881").unwrap(),
            "127.0.0.1:6881".parse().unwrap()
        );
        assert_eq!(parse_peer("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(
            parse_peer("127.0.0.1:70000")
                .unwrap_err()
                .contains("out of range")
        );
        assert!(
            parse_peer("127.0.0.1:x")
                .unwrap_err()
                .contains("not a port")
        );
        assert!(parse_peer("nocolon").unwrap_err().contains("HOST:PORT"));
        assert!(parse_peer("127.0.0.1:0").unwrap_err().contains("port 0"));
    }
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
