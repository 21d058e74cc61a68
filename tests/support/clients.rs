//! The reference clients the interop tests drive, each in a [`ChildGuard`] killed by PID:
//! opentracker, aria2c, Transmission, libtorrent (Debian's python3-libtorrent, through
//! `libtorrent_client.py` beside this file), nginx as a TLS-terminating proxy (with a test CA
//! made by openssl); and `ss` snapshots of the kernel's TCP connections.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use serde_json::Value;

use super::cli::{ChildGuard, describe_status, run_bounded, run_ok};
use super::files::scratch_dir;
use super::net::{free_port, free_port_on};
use super::nginx::NginxProcess;
use super::{COMMAND_DEADLINE, DEADLINE, Diagnose, hex_to_bytes, poll_until, report, url_encode};

/// Finds `name` on PATH (and in the sbin directories, which a non-root PATH may lack) or
/// panics: a test never silently skips because a reference tool is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in ["/usr/local/sbin", "/usr/sbin", "/sbin"] {
        dirs.push(PathBuf::from(extra));
    }
    for dir in dirs {
        let candidate = dir.join(name);
        if let Ok(meta) = fs::metadata(&candidate)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            return candidate;
        }
    }
    panic!("{name} not found: run scripts/test which installs it");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// =============================================================================================
// opentracker
// =============================================================================================

/// `GET path` from `addr` over HTTP/1.0; returns the status code and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| e.to_string())?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(&response)))?;
    let head = String::from_utf8_lossy(&response[..split]);
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((code, response[split + 4..].to_vec()))
}

/// The integer after `key` (a bencoded key such as `8:complete`) in a bencoded body.
fn bencode_int_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = body.get(at..)?.strip_prefix(b"i")?;
    let end = rest.iter().position(|&b| b == b'e')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// An opentracker on 127.0.0.1 (HTTP and UDP on one port) with a whitelist.
pub struct Opentracker {
    guard: ChildGuard,
    port: u16,
    whitelist: PathBuf,
}

impl Opentracker {
    /// Starts a tracker and waits until it answers HTTP.
    pub fn start() -> Opentracker {
        let binary = require_tool("opentracker");
        let mut last_failure = String::new();
        // A port found free can be taken by someone else before opentracker binds it: retry.
        for _attempt in 0..3 {
            let dir = scratch_dir();
            let whitelist = dir.path().join("whitelist");
            // Not empty: opentracker warns "Can't open accesslist file" about an empty one,
            // which would be a red herring in failure reports.
            fs::write(&whitelist, format!("{}\n", "0".repeat(40))).expect("create the whitelist");
            fs::set_permissions(&whitelist, fs::Permissions::from_mode(0o644))
                .expect("chmod the whitelist");
            let port = free_port();
            let mut command = Command::new(&binary);
            command
                .args([
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-P",
                    &port.to_string(),
                ])
                .arg("-w")
                .arg(&whitelist);
            if is_root() {
                // opentracker refuses to keep root privileges: it wants a user to drop to.
                command.args(["-u", &unprivileged_user()]);
            }
            let guard = ChildGuard::spawn("opentracker", &mut command).with_scratch(dir);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let ready = poll_until(DEADLINE, || {
                if guard.exit_status().is_some() {
                    return Some(false);
                }
                match http_get(addr, "/scrape") {
                    Ok((200, _)) => Some(true),
                    _ => None,
                }
            });
            match ready {
                Some(true) => {
                    return Opentracker {
                        guard,
                        port,
                        whitelist,
                    };
                }
                Some(false) => last_failure = guard.diagnostics(),
                None => panic!(
                    "opentracker did not answer on {addr} within {DEADLINE:?}\n{}",
                    guard.diagnostics()
                ),
            }
        }
        panic!("opentracker failed to start three times; last attempt:\n{last_failure}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn announce_url(&self) -> String {
        format!("http://127.0.0.1:{}/announce", self.port)
    }

    pub fn udp_url(&self) -> String {
        format!("udp://127.0.0.1:{}/announce", self.port)
    }

    /// Whitelists `info_hash_hex`, makes opentracker reload the list (SIGHUP) and waits until
    /// it accepts announces for that hash.
    pub fn allow(&self, info_hash_hex: &str) {
        let hash = info_hash_hex.to_ascii_lowercase();
        assert!(
            hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "not an info hash: {info_hash_hex:?}"
        );
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.whitelist)
            .expect("open the whitelist");
        writeln!(file, "{hash}").expect("append to the whitelist");
        drop(file);
        self.guard.signal(libc::SIGHUP);

        // The reload is asynchronous. Probe with a real announce (a `stopped` one is answered
        // even for unlisted hashes, so it proves nothing), then withdraw the probe peer so no
        // client is handed the bogus address 127.0.0.1:1.
        let probe = |event: &str| {
            let path = format!(
                "/announce?info_hash={}&peer_id=-HARNESS-probe000000&port=1&uploaded=0\
                 &downloaded=0&left=1&compact=1{event}",
                url_encode(&hex_to_bytes(&hash))
            );
            http_get(self.addr(), &path)
        };
        let mut last = String::new();
        let accepted = poll_until(Duration::from_secs(30), || match probe("") {
            Ok((200, body)) if !body.windows(14).any(|w| w == b"not authorized") => Some(()),
            Ok((code, body)) => {
                last = format!("HTTP {code}: {}", String::from_utf8_lossy(&body));
                None
            }
            Err(e) => {
                last = e;
                None
            }
        });
        let _ = probe("&event=stopped");
        if accepted.is_none() {
            panic!(
                "opentracker still refuses {hash} after SIGHUP (last reply: {last}); \
                 is {} readable by the user it runs as?\n{}",
                self.whitelist.display(),
                self.guard.diagnostics()
            );
        }
    }

    /// (seeders, leechers) the tracker knows for `info_hash_hex`, from a scrape.
    pub fn scrape(&self, info_hash_hex: &str) -> Option<(u64, u64)> {
        let path = format!(
            "/scrape?info_hash={}",
            url_encode(&hex_to_bytes(info_hash_hex))
        );
        let (code, body) = http_get(self.addr(), &path).ok()?;
        if code != 200 {
            return None;
        }
        let complete = bencode_int_after(&body, b"8:complete")?;
        let incomplete = bencode_int_after(&body, b"10:incomplete")?;
        Some((complete, incomplete))
    }

    /// Waits until the tracker knows at least `seeders` seeders and `peers` peers in all.
    pub fn wait_for_swarm(
        &self,
        info_hash_hex: &str,
        seeders: u64,
        peers: u64,
        timeout: Duration,
        parts: &[&dyn Diagnose],
    ) {
        let seen = poll_until(timeout, || {
            self.scrape(info_hash_hex)
                .filter(|&(c, i)| c >= seeders && c + i >= peers)
        });
        if seen.is_none() {
            let mut all: Vec<&dyn Diagnose> = vec![self];
            all.extend_from_slice(parts);
            panic!(
                "{}",
                report(
                    &format!(
                        "the tracker never saw {seeders} seeder(s) and {peers} peer(s) for \
                         {info_hash_hex} within {timeout:?} (last scrape: {:?})",
                        self.scrape(info_hash_hex)
                    ),
                    &all
                )
            );
        }
    }
}

impl Diagnose for Opentracker {
    fn diagnostics(&self) -> String {
        let whitelist = fs::read_to_string(&self.whitelist).unwrap_or_default();
        format!(
            "{}----- opentracker whitelist -----\n{whitelist}",
            self.guard.diagnostics()
        )
    }
}

/// A user opentracker can drop privileges to; its files must be world-readable.
fn unprivileged_user() -> String {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for candidate in ["nobody", "daemon"] {
        if passwd
            .lines()
            .any(|line| line.split(':').next() == Some(candidate))
        {
            return candidate.to_owned();
        }
    }
    panic!("running as root but neither `nobody` nor `daemon` exists for opentracker -u");
}

// =============================================================================================
// aria2
// =============================================================================================

/// Flags common to every aria2c run: loopback only, no DHT/LPD/PEX, no user config, a log.
/// `source` is a .torrent path or a magnet link.
fn aria2_command(
    source: impl AsRef<OsStr>,
    dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
    log: &Path,
) -> Command {
    let mut command = Command::new(require_tool("aria2c"));
    command
        .arg("--no-conf=true")
        .arg(format!("--dir={}", dir.display()))
        .arg(format!("--interface={bind_ip}"))
        .arg(format!("--listen-port={port}"))
        .args([
            "--disable-ipv6=true",
            "--enable-dht=false",
            "--enable-dht6=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=false",
            "--bt-tracker-interval=2",
            "--seed-ratio=0.0",
            "--summary-interval=0",
            "--show-console-readout=false",
            "--console-log-level=warn",
            "--log-level=info",
        ])
        .arg(format!("--log={}", log.display()))
        .arg(source);
    command
}

/// aria2c seeding the data of `torrent` found in `data_parent_dir` (which holds NAME), bound
/// to `bind_ip`, listening on `port`. Runs until dropped.
pub fn aria2_seed(
    torrent: &Path,
    data_parent_dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
) -> ChildGuard {
    aria2_seed_with(torrent, data_parent_dir, bind_ip, port, &[])
}

/// [`aria2_seed`] uploading at most `upload_limit` (aria2 syntax, e.g. "512K") in all.
pub fn aria2_seed_limited(
    torrent: &Path,
    data_parent_dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
    upload_limit: &str,
) -> ChildGuard {
    let limit = format!("--max-overall-upload-limit={upload_limit}");
    aria2_seed_with(torrent, data_parent_dir, bind_ip, port, &[&limit])
}

fn aria2_seed_with(
    torrent: &Path,
    data_parent_dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
    extra: &[&str],
) -> ChildGuard {
    let scratch = scratch_dir();
    let log = scratch.path().join("aria2-seed.log");
    let mut command = aria2_command(torrent, data_parent_dir, bind_ip, port, &log);
    command
        .args(["--bt-seed-unverified=true", "--check-integrity=false"])
        .args(extra);
    ChildGuard::spawn(&format!("aria2c seeder {bind_ip}:{port}"), &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
        .with_log(log)
        .with_scratch(scratch)
}

/// aria2c downloading `torrent` into `out_dir`, bound to `bind_ip`, listening on `port`.
/// With `--seed-time=0` it exits once complete: wait for exit code 0 with
/// [`ChildGuard::wait_with_deadline`].
pub fn aria2_download(torrent: &Path, out_dir: &Path, bind_ip: Ipv4Addr, port: u16) -> ChildGuard {
    let scratch = scratch_dir();
    let log = scratch.path().join("aria2-download.log");
    let mut command = aria2_command(torrent, out_dir, bind_ip, port, &log);
    command.args(["--seed-time=0", "--file-allocation=falloc"]);
    ChildGuard::spawn(&format!("aria2c downloader {bind_ip}:{port}"), &mut command)
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
        .with_log(log)
        .with_scratch(scratch)
}

/// aria2c downloading from a magnet link into `out_dir` (metadata first, then the data),
/// bound to `bind_ip`, listening on `port`; exits once complete, as [`aria2_download`].
/// aria2 1.36 ignores `x.pe`: its peers come from the link's trackers, or dial it.
pub fn aria2_download_magnet(
    magnet: &str,
    out_dir: &Path,
    bind_ip: Ipv4Addr,
    port: u16,
) -> ChildGuard {
    let scratch = scratch_dir();
    let log = scratch.path().join("aria2-magnet.log");
    let mut command = aria2_command(magnet, out_dir, bind_ip, port, &log);
    command.args([
        "--seed-time=0",
        "--file-allocation=falloc",
        "--bt-save-metadata=false",
    ]);
    ChildGuard::spawn(
        &format!("aria2c magnet downloader {bind_ip}:{port}"),
        &mut command,
    )
    .with_stop_signal(libc::SIGTERM, Duration::from_secs(5))
    .with_log(log)
    .with_scratch(scratch)
}

// =============================================================================================
// libtorrent (python3-libtorrent)
// =============================================================================================

/// Debian's python3, which has the libtorrent bindings (the first python3 on PATH may not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// The script that drives libtorrent (see its docstring for its commands and output).
pub const LIBTORRENT_CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/libtorrent_client.py"
);

/// Panics unless `/usr/bin/python3` can import libtorrent (scripts/test installs it).
pub fn require_libtorrent() {
    let status = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import libtorrent"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "{SYSTEM_PYTHON} cannot import libtorrent: run scripts/test, which installs \
         python3-libtorrent"
    );
}

fn libtorrent_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    require_libtorrent();
    let mut command = Command::new(SYSTEM_PYTHON);
    command
        .arg("-u")
        .arg(LIBTORRENT_CLIENT)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    command
}

/// A libtorrent session on a loopback address of its own: a seeder, or a downloader that
/// exits 0 once complete. Its JSON lines are read from its stdout.
pub struct Libtorrent {
    guard: ChildGuard,
    addr: SocketAddr,
}

impl Libtorrent {
    /// Seeds `torrent` whose data is `data_parent_dir`/NAME (seed mode, no check); returns
    /// once it listens and seeds.
    pub fn seed(torrent: &Path, data_parent_dir: &Path, bind_ip: Ipv4Addr) -> Libtorrent {
        Libtorrent::seed_dialling(torrent, data_parent_dir, bind_ip, &[])
    }

    /// [`Libtorrent::seed`], dialling each of `peers` (`handle.connect_peer`).
    pub fn seed_dialling(
        torrent: &Path,
        data_parent_dir: &Path,
        bind_ip: Ipv4Addr,
        peers: &[SocketAddr],
    ) -> Libtorrent {
        Libtorrent::seed_with(torrent, data_parent_dir, bind_ip, peers, &[])
    }

    /// [`Libtorrent::seed_dialling`] with the script's `extra` options (`--pex`,
    /// `--upload-limit N`).
    pub fn seed_with(
        torrent: &Path,
        data_parent_dir: &Path,
        bind_ip: Ipv4Addr,
        peers: &[SocketAddr],
        extra: &[&str],
    ) -> Libtorrent {
        let mut command = libtorrent_command(["seed", "--bind", &bind_ip.to_string()]);
        command.args(extra);
        command
            .arg("--torrent")
            .arg(torrent)
            .arg("--save-path")
            .arg(data_parent_dir);
        for peer in peers {
            command.arg("--peer").arg(peer.to_string());
        }
        let lt = Libtorrent::start(&format!("libtorrent seeder {bind_ip}"), &mut command);
        lt.wait_event("seeding", DEADLINE);
        lt
    }

    /// Downloads from `magnet` into `out_dir`, dialling each of `peers` with
    /// `handle.connect_peer` (besides the link's own `x.pe` and trackers). Wait for its exit
    /// with [`Libtorrent::wait_finished`].
    pub fn download_magnet(
        magnet: &str,
        out_dir: &Path,
        bind_ip: Ipv4Addr,
        peers: &[SocketAddr],
    ) -> Libtorrent {
        let mut command = libtorrent_command([
            "download",
            "--bind",
            &bind_ip.to_string(),
            "--magnet",
            magnet,
            "--seconds",
            &DEADLINE.as_secs().to_string(),
        ]);
        command.arg("--save-path").arg(out_dir);
        for peer in peers {
            command.arg("--peer").arg(peer.to_string());
        }
        Libtorrent::start(
            &format!("libtorrent magnet downloader {bind_ip}"),
            &mut command,
        )
    }

    /// Downloads `torrent` into `out_dir`, dialling each of `peers`, with the script's `extra`
    /// options (`--pex`, `--stay`, `--upload-limit N`, `--download-limit N`).
    pub fn download_torrent(
        torrent: &Path,
        out_dir: &Path,
        bind_ip: Ipv4Addr,
        peers: &[SocketAddr],
        extra: &[&str],
    ) -> Libtorrent {
        let mut command = libtorrent_command([
            "download",
            "--bind",
            &bind_ip.to_string(),
            "--seconds",
            &DEADLINE.as_secs().to_string(),
        ]);
        command
            .arg("--torrent")
            .arg(torrent)
            .arg("--save-path")
            .arg(out_dir)
            .args(extra);
        for peer in peers {
            command.arg("--peer").arg(peer.to_string());
        }
        Libtorrent::start(&format!("libtorrent downloader {bind_ip}"), &mut command)
    }

    fn start(name: &str, command: &mut Command) -> Libtorrent {
        let guard = ChildGuard::spawn(name, command)
            .with_stop_signal(libc::SIGTERM, Duration::from_secs(5));
        let mut lt = Libtorrent {
            guard,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        let listening = lt.wait_event("listening", DEADLINE);
        lt.addr = listening["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{}", report("no address in `listening`", &[&lt])));
        lt
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn guard(&self) -> &ChildGuard {
        &self.guard
    }

    /// The JSON lines it has printed so far.
    pub fn events(&self) -> Vec<Value> {
        self.guard
            .stdout_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The first event named `name`, waiting for it; panics if it exits first or `timeout`
    /// passes.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Value {
        let found = poll_until(timeout, || {
            let hit = self
                .events()
                .into_iter()
                .find(|e| e["event"].as_str() == Some(name));
            match hit {
                Some(e) => Some(Some(e)),
                None if self.guard.exit_status().is_some() => Some(None),
                None => None,
            }
        })
        .flatten();
        found.unwrap_or_else(|| {
            panic!(
                "{}",
                report(
                    &format!("libtorrent never printed `{name}` (waited up to {timeout:?})"),
                    &[self]
                )
            )
        })
    }

    /// Waits for a downloader to exit 0 after `finished`; panics with everyone's diagnostics
    /// otherwise.
    pub fn wait_finished(&self, timeout: Duration, parts: &[&dyn Diagnose]) {
        let status = self.guard.wait_timeout(timeout);
        let finished = self
            .events()
            .iter()
            .any(|e| e["event"].as_str() == Some("finished"));
        if !(finished && status.is_some_and(|s| s.success())) {
            let mut all: Vec<&dyn Diagnose> = vec![self];
            all.extend_from_slice(parts);
            panic!(
                "{}",
                report(
                    &format!(
                        "libtorrent did not finish its download within {timeout:?} ({})",
                        describe_status(status)
                    ),
                    &all
                )
            );
        }
    }
}

impl Diagnose for Libtorrent {
    fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }
}

/// Runs a one-shot libtorrent_client.py command and returns its one JSON line.
fn libtorrent_oneshot(what: &str, command: &mut Command) -> Value {
    let guard = run_bounded(what, command, COMMAND_DEADLINE);
    let ok = guard.exit_status().is_some_and(|s| s.success());
    let line = guard.stdout_text();
    match serde_json::from_str(line.trim()) {
        Ok(v) if ok => v,
        _ => panic!("{}", report(&format!("{what} failed"), &[&guard])),
    }
}

/// What libtorrent's `parse_magnet_uri` reads from `uri`: `info_hash` (v1, hex, null for a
/// v2-only link), `info_hash_v2` (hex or null), `name`,
/// `trackers`, `peers`.
pub fn libtorrent_parse_magnet(uri: &str) -> Value {
    libtorrent_oneshot(
        "libtorrent parse_magnet_uri",
        &mut libtorrent_command(["parse-magnet", uri]),
    )
}

/// libtorrent's `make_magnet_uri` for `torrent`.
pub fn libtorrent_make_magnet(torrent: &Path) -> String {
    let mut command = libtorrent_command(["make-magnet", "--torrent"]);
    command.arg(torrent);
    let v = libtorrent_oneshot("libtorrent make_magnet_uri", &mut command);
    v["uri"]
        .as_str()
        .unwrap_or_else(|| panic!("no uri in {v}"))
        .to_owned()
}

/// `lt.create_torrent` of `source` (a file or a directory) into `out`, pieces of
/// `piece_len`, `kind` `hybrid` (libtorrent's default: v1 + v2 with BEP 47 pad files), `v2` or
/// `v1`; returns libtorrent's reading of the result (see [`libtorrent_inspect`]).
pub fn libtorrent_create(source: &Path, out: &Path, piece_len: usize, kind: &str) -> Value {
    let mut command = libtorrent_command(["create", "--kind", kind]);
    command
        .arg("--source")
        .arg(source)
        .arg("--out")
        .arg(out)
        .arg("--piece-length")
        .arg(piece_len.to_string());
    libtorrent_oneshot("libtorrent create_torrent", &mut command)
}

/// libtorrent's reading of `torrent`: `{"event":"torrent", "info_hash" (v1 hex or null),
/// "info_hash_v2" (hex or null), "name", "total_size" (pad files included), "num_pieces",
/// "piece_length", "last_piece_size", "files": [{"path","size","pad"}]}`, or
/// `{"event":"refused","error":…}` when libtorrent cannot load it.
pub fn libtorrent_inspect(torrent: &Path) -> Value {
    let mut command = libtorrent_command(["inspect", "--torrent"]);
    command.arg(torrent);
    libtorrent_oneshot("libtorrent torrent_info", &mut command)
}

// =============================================================================================
// Transmission
// =============================================================================================

/// A `transmission-daemon -f -g CONFIG` on its own loopback address, driven with
/// `transmission-remote` over RPC on 127.0.0.1.
pub struct Transmission {
    guard: ChildGuard,
    bind_ip: Ipv4Addr,
    peer_port: u16,
    rpc_port: u16,
}

/// What `transmission-remote -i` says about the (single) torrent.
#[derive(Debug, Clone)]
pub struct TransmissionStatus {
    pub percent_done: f64,
    pub state: String,
}

impl Transmission {
    /// Starts the daemon bound to `bind_ip`, downloading into `download_dir`, and waits until
    /// its RPC answers.
    pub fn start(bind_ip: Ipv4Addr, download_dir: &Path) -> Transmission {
        let daemon = require_tool("transmission-daemon");
        require_tool("transmission-remote");
        let config = scratch_dir();
        let log = config.path().join("transmission.log");
        let peer_port = free_port_on(bind_ip);
        let rpc_port = free_port();
        let settings = format!(
            r#"{{
    "alt-speed-enabled": false,
    "bind-address-ipv4": "{bind_ip}",
    "bind-address-ipv6": "::1",
    "blocklist-enabled": false,
    "dht-enabled": false,
    "download-dir": "{download_dir}",
    "download-queue-enabled": false,
    "encryption": 0,
    "idle-seeding-limit-enabled": false,
    "incomplete-dir-enabled": false,
    "lpd-enabled": false,
    "message-level": 2,
    "peer-port": {peer_port},
    "peer-port-random-on-start": false,
    "pex-enabled": false,
    "port-forwarding-enabled": false,
    "queue-stalled-enabled": false,
    "ratio-limit-enabled": false,
    "rename-partial-files": true,
    "rpc-authentication-required": false,
    "rpc-bind-address": "127.0.0.1",
    "rpc-enabled": true,
    "rpc-host-whitelist-enabled": false,
    "rpc-port": {rpc_port},
    "rpc-whitelist-enabled": false,
    "scrape-paused-torrents-enabled": false,
    "seed-queue-enabled": false,
    "speed-limit-down-enabled": false,
    "speed-limit-up-enabled": false,
    "start-added-torrents": true,
    "utp-enabled": false,
    "watch-dir-enabled": false
}}
"#,
            download_dir = json_escape(&download_dir.display().to_string()),
        );
        fs::write(config.path().join("settings.json"), settings).expect("write settings.json");
        let mut command = Command::new(daemon);
        command
            .arg("-f")
            .arg("-g")
            .arg(config.path())
            .arg("--logfile")
            .arg(&log);
        // SIGTERM lets it send its `stopped` announces; SIGKILL if it takes too long.
        let guard = ChildGuard::spawn(
            &format!("transmission-daemon {bind_ip}:{peer_port}"),
            &mut command,
        )
        .with_stop_signal(libc::SIGTERM, Duration::from_secs(15))
        .with_log(log)
        .with_scratch(config);
        let transmission = Transmission {
            guard,
            bind_ip,
            peer_port,
            rpc_port,
        };
        let up = poll_until(DEADLINE, || {
            if transmission.guard.exit_status().is_some() {
                return Some(false);
            }
            transmission.remote(&["-l"]).ok().map(|_| true)
        });
        if up != Some(true) {
            panic!(
                "transmission-daemon RPC on 127.0.0.1:{rpc_port} never answered\n{}",
                transmission.guard.diagnostics()
            );
        }
        transmission
    }

    pub fn peer_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.bind_ip, self.peer_port)
    }

    pub fn guard(&self) -> &ChildGuard {
        &self.guard
    }

    /// Runs `transmission-remote 127.0.0.1:RPC ARGS…`; `Err` holds its output on failure.
    pub fn remote(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new(require_tool("transmission-remote"));
        command
            .arg(format!("127.0.0.1:{}", self.rpc_port))
            .args(args);
        let guard = ChildGuard::spawn("transmission-remote", &mut command);
        let Some(status) = guard.wait_timeout(Duration::from_secs(30)) else {
            return Err(format!("transmission-remote {args:?} timed out"));
        };
        let stdout = guard.stdout_text();
        if status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "transmission-remote {args:?}: {}\n{stdout}{}",
                describe_status(Some(status)),
                guard.stderr_text()
            ))
        }
    }

    /// Adds `torrent`, with its data in (or to be downloaded to) `dir`.
    pub fn add(&self, torrent: &Path, dir: &Path) {
        let torrent = torrent.to_str().expect("UTF-8 torrent path");
        let dir = dir.to_str().expect("UTF-8 directory path");
        if let Err(e) = self.remote(&["-a", torrent, "-w", dir]) {
            panic!("adding {torrent} failed: {e}\n{}", self.diagnostics());
        }
    }

    /// Percent done and state of the torrent, if the daemon reports them.
    pub fn status(&self) -> Option<TransmissionStatus> {
        let info = self.remote(&["-t", "all", "-i"]).ok()?;
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let percent_done = field("Percent Done:")?.trim_end_matches('%').parse().ok()?;
        let state = field("State:")?;
        Some(TransmissionStatus {
            percent_done,
            state,
        })
    }

    /// Waits until the torrent is 100 % verified and seeding (after adding existing data).
    pub fn wait_seeding(&self, timeout: Duration, parts: &[&dyn Diagnose]) {
        let ready = poll_until(timeout, || {
            self.status().filter(|s| {
                s.percent_done >= 100.0
                    && !s.state.starts_with("Verif")
                    && !s.state.starts_with("Queued")
                    && !s.state.starts_with("Stopped")
            })
        });
        if ready.is_none() {
            self.fail(
                "Transmission never reported 100 % verified and seeding",
                parts,
            );
        }
    }

    /// Waits until the torrent is 100 % done and `final_path` exists under its final name
    /// (Transmission flushes and closes a file before renaming it from NAME.part).
    pub fn wait_complete(&self, final_path: &Path, timeout: Duration, parts: &[&dyn Diagnose]) {
        let done = poll_until(timeout, || {
            if self.guard.exit_status().is_some() {
                return Some(false);
            }
            let status = self.status()?;
            (status.percent_done >= 100.0 && final_path.is_file()).then_some(true)
        });
        if done != Some(true) {
            self.fail(
                &format!(
                    "Transmission did not complete {} within {timeout:?}",
                    final_path.display()
                ),
                parts,
            );
        }
    }

    fn fail(&self, why: &str, parts: &[&dyn Diagnose]) -> ! {
        let mut all: Vec<&dyn Diagnose> = vec![self];
        all.extend_from_slice(parts);
        panic!("{}", report(why, &all))
    }
}

impl Diagnose for Transmission {
    fn diagnostics(&self) -> String {
        let mut out = self.guard.diagnostics();
        if self.guard.is_running() {
            for (what, args) in [
                ("torrent", ["-t", "all", "-i"]),
                ("peers", ["-t", "all", "-pi"]),
            ] {
                let text = self.remote(&args).unwrap_or_else(|e| e);
                let _ = writeln!(out, "----- transmission-remote {what} -----\n{text}");
            }
        }
        out
    }
}

fn json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

// =============================================================================================
// TLS: a test CA with openssl, nginx as a TLS-terminating proxy
// =============================================================================================

/// A CA and a server certificate for IP 127.0.0.1 signed by it.
pub struct TestCa {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub server_pem: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    pub fn make() -> TestCa {
        let openssl = require_tool("openssl");
        let dir = scratch_dir();
        let p = |n: &str| dir.path().join(n);
        let run = |what: &str, args: &[&str]| {
            let mut command = Command::new(&openssl);
            command.args(args).current_dir(dir.path());
            run_ok(&format!("openssl {what}"), &mut command);
        };
        // A new P-256 key in KEY and a request (or, with `extra` -x509, a certificate) in OUT.
        let new_key = |what: &str, key: &str, out: &str, extra: &[&str]| {
            let mut args = vec![
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key,
                "-out",
                out,
            ];
            args.extend_from_slice(extra);
            run(what, &args);
        };
        new_key(
            "req (CA)",
            "ca.key",
            "ca.pem",
            &[
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=bitfetch test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        new_key(
            "req (server)",
            "server.key",
            "server.csr",
            &["-subj", "/CN=127.0.0.1"],
        );
        fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write server.ext");
        run(
            "x509 (sign)",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        TestCa {
            ca_pem: p("ca.pem"),
            server_pem: p("server.pem"),
            server_key: p("server.key"),
            dir,
        }
    }
}

/// nginx terminating TLS on 127.0.0.1:PORT and proxying to `upstream` (see
/// [`super::nginx`] for how it is run).
pub struct Nginx {
    process: NginxProcess,
}

impl Nginx {
    pub fn start(ca: &TestCa, upstream: SocketAddr) -> Nginx {
        let body = format!("location / {{ proxy_pass http://{upstream}; }}\n");
        Nginx {
            process: NginxProcess::start("tls proxy", Some(ca), &body),
        }
    }

    pub fn announce_url(&self) -> String {
        format!("https://127.0.0.1:{}/announce", self.process.port)
    }
}

impl Diagnose for Nginx {
    fn diagnostics(&self) -> String {
        self.process.diagnostics()
    }
}

// =============================================================================================
// TCP connections as `ss` sees them
// =============================================================================================

/// One TCP socket from `ss -Htain`: state, addresses and the kernel's byte counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    pub state: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Bytes this end sent that the other end acknowledged.
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// Every IPv4 TCP socket on the machine (this network namespace), as `ss` reports them.
pub fn tcp_sockets() -> Vec<Socket> {
    let output = Command::new("ss")
        .args(["-H", "-t", "-a", "-i", "-n", "-4"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ss (iproute2): {e}"));
    assert!(
        output.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let mut sockets: Vec<Socket> = Vec::new();
    for line in text.lines() {
        if line.starts_with(char::is_whitespace) {
            // The info line of the socket above it.
            if let Some(last) = sockets.last_mut() {
                for word in line.split_whitespace() {
                    if let Some(v) = word.strip_prefix("bytes_acked:") {
                        last.bytes_acked = v.parse().unwrap_or(0);
                    } else if let Some(v) = word.strip_prefix("bytes_received:") {
                        last.bytes_received = v.parse().unwrap_or(0);
                    }
                }
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 5 {
            continue;
        }
        let (Ok(local), Ok(peer)) = (cols[3].parse(), cols[4].parse()) else {
            continue;
        };
        sockets.push(Socket {
            state: cols[0].to_owned(),
            local,
            peer,
            bytes_acked: 0,
            bytes_received: 0,
        });
    }
    sockets
}

/// Sockets of connections between `a` and `b` (either end, any state but LISTEN).
pub fn sockets_between(a: Ipv4Addr, b: Ipv4Addr) -> Vec<Socket> {
    tcp_sockets()
        .into_iter()
        .filter(|s| {
            s.state != "LISTEN"
                && ((s.local.ip() == IpAddr::V4(a) && s.peer.ip() == IpAddr::V4(b))
                    || (s.local.ip() == IpAddr::V4(b) && s.peer.ip() == IpAddr::V4(a)))
        })
        .collect()
}

/// Every IPv4 address with a listening TCP socket, as `ss -l` reports them ([`tcp_sockets`]
/// leaves listeners out: their peer column, `0.0.0.0:*`, is no address).
pub fn tcp_listeners() -> Vec<SocketAddr> {
    let output = Command::new("ss")
        .args(["-H", "-t", "-l", "-n", "-4"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run ss (iproute2): {e}"));
    assert!(
        output.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3)?.parse().ok())
        .collect()
}

/// Waits until something listens on `addr` (as `ss` sees it, without connecting to it).
pub fn wait_listening(addr: SocketAddr, timeout: Duration, parts: &[&dyn Diagnose]) {
    let up = poll_until(timeout, || tcp_listeners().contains(&addr).then_some(()));
    if up.is_none() {
        panic!(
            "{}",
            report(
                &format!("nothing listened on {addr} within {timeout:?}"),
                parts
            )
        );
    }
}

/// A connection named by its two ends, the same from either side.
pub fn connection_key(s: &Socket) -> (SocketAddr, SocketAddr) {
    if s.local < s.peer {
        (s.local, s.peer)
    } else {
        (s.peer, s.local)
    }
}
