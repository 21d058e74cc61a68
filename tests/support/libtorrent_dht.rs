//! A DHT of libtorrent sessions on loopback ([`LtDht`]), driving `libtorrent_dht.py` beside
//! this file with Debian's `/usr/bin/python3`: one process holding N sessions, each on a
//! loopback address of its own, node 0 the bootstrap node of the others. Optionally one node
//! seeds a torrent (announcing it on the DHT alone) and one downloads a magnet link through
//! the DHT alone. The process is owned by a [`ChildGuard`] (SIGTERM, then SIGKILL, by PID).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::cli::{ChildGuard, describe_status};
use super::clients::{SYSTEM_PYTHON, require_libtorrent};
use super::net::next_loopback;
use super::{DEADLINE, Diagnose, poll_until, report};

pub const LIBTORRENT_DHT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/libtorrent_dht.py"
);

/// What to start: node addresses, extra bootstrap nodes, roles.
#[derive(Debug, Clone)]
pub struct LtDhtSpec {
    name: String,
    ips: Vec<Ipv4Addr>,
    bootstrap: Vec<SocketAddr>,
    seed: Option<(usize, PathBuf, PathBuf)>,
    download: Option<(usize, String, PathBuf)>,
    seconds: u64,
}

impl LtDhtSpec {
    /// `nodes` sessions, each on a fresh loopback address.
    pub fn new(name: &str, nodes: usize) -> LtDhtSpec {
        assert!(nodes > 0, "a DHT of no node");
        LtDhtSpec {
            name: name.to_owned(),
            ips: (0..nodes).map(|_| next_loopback()).collect(),
            bootstrap: Vec::new(),
            seed: None,
            download: None,
            seconds: 3 * DEADLINE.as_secs(),
        }
    }

    /// Node 0 (and through it the others) also bootstraps from `addr`; every other node
    /// names it too.
    pub fn bootstrap(mut self, addr: SocketAddr) -> LtDhtSpec {
        self.bootstrap.push(addr);
        self
    }

    /// Node `index` seeds `torrent` whose data is `data_parent`/NAME.
    pub fn seed_on(mut self, index: usize, torrent: &Path, data_parent: &Path) -> LtDhtSpec {
        self.seed = Some((index, torrent.to_owned(), data_parent.to_owned()));
        self
    }

    /// Node `index` downloads `magnet` (no `tr`, no `x.pe`) into `out`.
    pub fn download_on(mut self, index: usize, magnet: &str, out: &Path) -> LtDhtSpec {
        self.download = Some((index, magnet.to_owned(), out.to_owned()));
        self
    }

    /// The process gives up (and exits) after this long: a hang guard only.
    pub fn seconds(mut self, seconds: u64) -> LtDhtSpec {
        self.seconds = seconds;
        self
    }

    fn command(&self) -> Command {
        require_libtorrent();
        let mut command = Command::new(SYSTEM_PYTHON);
        command
            .arg("-u")
            .arg(LIBTORRENT_DHT)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .arg("--seconds")
            .arg(self.seconds.to_string());
        for ip in &self.ips {
            command.arg("--ip").arg(ip.to_string());
        }
        for addr in &self.bootstrap {
            command.arg("--bootstrap").arg(addr.to_string());
        }
        if let Some((index, torrent, data)) = &self.seed {
            command
                .arg("--seed-on")
                .arg(index.to_string())
                .arg("--torrent")
                .arg(torrent)
                .arg("--data")
                .arg(data);
        }
        if let Some((index, magnet, out)) = &self.download {
            command
                .arg("--download-on")
                .arg(index.to_string())
                .arg("--magnet")
                .arg(magnet)
                .arg("--save-path")
                .arg(out);
        }
        command
    }

    /// Starts the process and waits until every node listens (and a seeder seeds).
    pub fn start(self) -> LtDht {
        let guard = ChildGuard::spawn(&self.name, &mut self.command())
            .with_stop_signal(libc::SIGTERM, Duration::from_secs(5));
        let mut dht = LtDht {
            guard,
            nodes: Vec::new(),
            seeder: self.seed.as_ref().map(|(i, _, _)| *i),
            downloader: self.download.as_ref().map(|(i, _, _)| *i),
        };
        let ready = dht.wait_event("ready", DEADLINE);
        dht.nodes = ready["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str()?.parse().ok())
            .collect();
        if dht.nodes.len() != self.ips.len() {
            panic!(
                "{}",
                report(
                    &format!("`ready` lists not {} nodes", self.ips.len()),
                    &[&dht]
                )
            );
        }
        if dht.seeder.is_some() {
            dht.wait_event("seeding", DEADLINE);
        }
        dht
    }
}

/// A running libtorrent DHT (see [`LtDhtSpec`]).
pub struct LtDht {
    guard: ChildGuard,
    nodes: Vec<SocketAddr>,
    seeder: Option<usize>,
    downloader: Option<usize>,
}

impl LtDht {
    /// `nodes` plain DHT nodes.
    pub fn network(nodes: usize) -> LtDht {
        LtDhtSpec::new("libtorrent DHT", nodes).start()
    }

    /// Every node's address (TCP and DHT UDP alike).
    pub fn nodes(&self) -> &[SocketAddr] {
        &self.nodes
    }

    /// Node 0, the bootstrap node of the others.
    pub fn bootstrap_node(&self) -> SocketAddr {
        self.nodes[0]
    }

    /// The seeding node's address, if one seeds.
    pub fn seeder_addr(&self) -> Option<SocketAddr> {
        self.seeder.map(|i| self.nodes[i])
    }

    pub fn downloader_addr(&self) -> Option<SocketAddr> {
        self.downloader.map(|i| self.nodes[i])
    }

    pub fn guard(&self) -> &ChildGuard {
        &self.guard
    }

    /// The JSON lines printed so far.
    pub fn events(&self) -> Vec<Value> {
        self.guard
            .stdout_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The events named `name`.
    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"].as_str() == Some(name))
            .collect()
    }

    /// Polls the events until `pick` finds something; `None` after `timeout` or once the
    /// process has exited (after a last look).
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut pick: impl FnMut(&[Value]) -> Option<T>,
    ) -> Option<T> {
        poll_until(timeout, || {
            let exited = self.guard.exit_status().is_some();
            match pick(&self.events()) {
                Some(v) => Some(Some(v)),
                None if exited => Some(None),
                None => None,
            }
        })
        .flatten()
    }

    /// The first event named `name`; panics with diagnostics if none comes within `timeout`.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Value {
        self.wait_for(timeout, |events| {
            events
                .iter()
                .find(|e| e["event"].as_str() == Some(name))
                .cloned()
        })
        .unwrap_or_else(|| {
            panic!(
                "{}",
                report(
                    &format!(
                        "the libtorrent DHT never printed `{name}` (waited up to {timeout:?}; {})",
                        describe_status(self.guard.exit_status())
                    ),
                    &[self]
                )
            )
        })
    }

    /// The first `announce` a node stored for `info_hash` from `ip` (any port), waiting up to
    /// `timeout`.
    pub fn wait_announce(&self, info_hash: &str, ip: Ipv4Addr, timeout: Duration) -> Option<Value> {
        self.wait_for(timeout, |events| {
            events
                .iter()
                .find(|e| {
                    e["event"].as_str() == Some("announce")
                        && e["info_hash"].as_str() == Some(info_hash)
                        && e["address"]
                            .as_str()
                            .and_then(|a| a.parse::<SocketAddr>().ok())
                            .is_some_and(|a| a.ip() == ip)
                })
                .cloned()
        })
    }

    /// Waits for the downloading node's `finished`; panics with everyone's diagnostics
    /// otherwise.
    pub fn wait_finished(&self, timeout: Duration, parts: &[&dyn Diagnose]) -> Value {
        let found = self.wait_for(timeout, |events| {
            events
                .iter()
                .find(|e| e["event"].as_str() == Some("finished"))
                .cloned()
        });
        found.unwrap_or_else(|| {
            let mut all: Vec<&dyn Diagnose> = vec![self];
            all.extend_from_slice(parts);
            panic!(
                "{}",
                report(
                    &format!(
                        "the libtorrent downloader did not finish within {timeout:?} ({})",
                        describe_status(self.guard.exit_status())
                    ),
                    &all
                )
            )
        })
    }

    /// The addresses the downloading or seeding node had connections with.
    pub fn connected_peers(&self) -> Vec<SocketAddr> {
        self.events_named("peer_connected")
            .iter()
            .filter_map(|e| e["address"].as_str()?.parse().ok())
            .collect()
    }

    /// Seconds from adding the magnet to the first DHT reply with peers, if any.
    pub fn first_dht_peers_after(&self) -> Option<f64> {
        self.events_named("dht_peers")
            .first()
            .and_then(|e| e["since_add"].as_f64())
    }

    /// Seconds from adding the magnet to the first connection, if any.
    pub fn first_peer_after(&self) -> Option<f64> {
        self.events_named("peer_connected")
            .first()
            .and_then(|e| e["since_add"].as_f64())
    }
}

impl Diagnose for LtDht {
    fn diagnostics(&self) -> String {
        self.guard.diagnostics()
    }
}
