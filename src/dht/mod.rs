//! The mainline DHT (BEP 5, with BEP 32 for IPv6): finds peers for an info hash without a
//! tracker, and answers other nodes' queries as a good citizen.
//!
//! One thread ("dht") owns one UDP socket and does blocking I/O: `recv_from` with a
//! [`POLL`] read timeout, so commands and timers are serviced between datagrams. Everything
//! with state is a plain data structure with its own tests and no socket:
//!
//! | file | holds |
//! |---|---|
//! | `krpc.rs` | the KRPC message codec (the one door for network bytes) |
//! | `table.rs` | one family's routing table of k-buckets, with its defences |
//! | `lookup.rs` | one iterative lookup: whom to ask next, when it is done |
//! | `token.rs` | the write tokens we issue, and their rotating secret |
//! | `store.rs` | peers announced to us |
//! | `limits.rs` | rate limits on the queries we answer |
//! | `persist.rs` | the state file (node id, nodes to start from) |
//! | `addr.rs` | canonical addresses, martians, subnets |
//! | `node.rs` | all of the above together, driven by datagrams, commands and a clock |
//!
//! The thread here only moves bytes between the socket and [`node::Node`], commands from the
//! bounded channel into it, and its events to the sink. Bootstrap names are resolved on
//! short-lived threads of their own (getaddrinfo can hang), each given [`RESOLVE_WAIT`].

mod addr;
mod krpc;
mod limits;
mod lookup;
mod node;
mod persist;
mod store;
mod table;
mod token;

#[cfg(any(test, feature = "fuzz"))]
pub(crate) mod fuzzing;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use self::node::Node;
use crate::rng::Rng;

/// How long the thread waits for a datagram before looking at commands and timers.
const POLL: Duration = Duration::from_millis(100);
/// Commands queued for the thread; `get_peers`/`add_node` are dropped when it is full.
const COMMAND_QUEUE: usize = 64;
/// How long a bootstrap name may take to resolve before it counts as failed.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

const PUBLIC_ROUTERS: [&str; 4] = [
    "router.bittorrent.com:6881",
    "dht.transmissionbt.com:6881",
    "router.utorrent.com:6881",
    "dht.libtorrent.org:25401",
];

pub(crate) struct Config {
    /// Local address to bind; None = dual-stack [::]:port (fallback 0.0.0.0:port).
    pub bind: Option<IpAddr>,
    /// Preferred UDP port (the session passes its TCP listen port); if taken, any free port.
    pub port: u16,
    /// "host:port" routers/nodes to bootstrap from. Empty = the public routers
    /// (router.bittorrent.com:6881, dht.transmissionbt.com:6881, router.utorrent.com:6881,
    /// dht.libtorrent.org:25401) — EXCEPT when `bind` is a loopback address: then no public
    /// name is ever resolved (loopback-only runs must never reach out).
    pub bootstrap: Vec<String>,
    /// Where the node id and routing table are loaded from at start and saved to at stop
    /// (None = neither). The caller picks `$XDG_CACHE_HOME/bitfetch/dht.dat`.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// Peers found for an info hash by a lookup (sent as they arrive, not at lookup end:
    /// time to first peer matters). Deduplicated per lookup, at most a few hundred per lookup.
    Peers {
        info_hash: [u8; 20],
        peers: Vec<SocketAddr>,
    },
    /// Said once the DHT knows whether it can work: `nodes` in the routing table after
    /// loading the saved table and the bootstrap attempt (0 = the DHT has nobody to ask).
    Ready { nodes: usize },
    /// A lookup ended (its k closest answered, or it ran out of nodes/time): how many
    /// distinct peers it found.
    LookupDone { info_hash: [u8; 20], peers: usize },
    /// Something a person should know, formatted (e.g. "ignoring the DHT state file X: …").
    Notice(String),
    /// The thread died on a panic (a bug): the DHT gives nothing more.
    Failed,
}

enum Command {
    GetPeers {
        info_hash: [u8; 20],
        announce_port: Option<u16>,
    },
    AddNode(SocketAddr),
}

pub(crate) struct Dht {
    commands: Sender<Command>,
    stop: Arc<AtomicBool>,
    /// Closed (dropped) by the thread when it ends, so `stop` can wait with a deadline.
    finished: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
    /// The thread's socket, to wake its `recv_from` at stop with an empty datagram to itself
    /// (otherwise every exit would wait up to a [`POLL`]).
    waker: Option<UdpSocket>,
}

type Sink = Box<dyn FnMut(Event) -> bool + Send>;

impl Dht {
    /// Binds, loads the state file, spawns the thread (name "dht"), starts bootstrapping.
    /// `sink` is called from the DHT thread; returning false means the receiver is gone
    /// (the thread then winds down).
    pub fn start(cfg: Config, mut sink: Sink) -> io::Result<Dht> {
        let (socket, families) = bind(cfg.bind, cfg.port)?;
        socket.set_read_timeout(Some(POLL))?;
        let local = addr::canonical(socket.local_addr()?);
        let now = Instant::now();
        let mut rng = Rng::from_os();
        let saved = match cfg.state_file.as_deref().map(persist::load) {
            Some(Ok(saved)) => saved,
            Some(Err(e)) => {
                sink(Event::Notice(e.to_string()));
                None
            }
            None => None,
        };
        let id = saved
            .as_ref()
            .map_or_else(|| std::array::from_fn(|_| rng.next_u64() as u8), |s| s.id);
        let bound_loopback = cfg.bind.is_some_and(|ip| ip.is_loopback());
        let plan = BootstrapPlan::new(&cfg.bootstrap, bound_loopback);
        let local_mode = bound_loopback || plan.loopback;
        let mut node = Node::new(id, local, families, local_mode, rng, now);
        if let Some(saved) = &saved {
            node.load(&saved.nodes, now);
        }
        for notice in &plan.notices {
            sink(Event::Notice(notice.clone()));
        }
        let waker = socket.try_clone().ok();
        let (commands, command_rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
        let (finished_tx, finished) = crossbeam_channel::bounded::<()>(0);
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            socket,
            dual_stack: families.0 && families.1 && local.is_ipv6(),
            node,
            commands: command_rx,
            stop: Arc::clone(&stop),
            sink,
            state_file: cfg.state_file,
            _finished: finished_tx,
        };
        let thread = thread::Builder::new()
            .name("dht".into())
            .spawn(move || worker.run(plan))?;
        Ok(Dht {
            commands,
            stop,
            finished,
            thread: Some(thread),
            local,
            waker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts a get_peers lookup for `info_hash` (replacing one running for it). With
    /// `announce_port` Some(p), ends with announce_peer (port p, implied_port 0) to the
    /// closest nodes that gave tokens.
    pub fn get_peers(&self, info_hash: [u8; 20], announce_port: Option<u16>) {
        let _ = self.commands.try_send(Command::GetPeers {
            info_hash,
            announce_port,
        });
    }

    /// A node learnt otherwise (BEP 5 `port` message from a peer): pinged, added if it answers.
    pub fn add_node(&self, addr: SocketAddr) {
        let _ = self.commands.try_send(Command::AddNode(addr));
    }

    /// Saves the state file (atomically: write temp + rename, in the same dir, creating the
    /// dir), stops and joins the thread within `budget`.
    pub fn stop(mut self, budget: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = &self.waker {
            let port = self.local.port();
            let to: Vec<IpAddr> = match self.local.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => vec![Ipv4Addr::LOCALHOST.into()],
                // A dual-stack socket: whichever loopback this namespace has.
                IpAddr::V6(ip) if ip.is_unspecified() => vec![
                    Ipv6Addr::LOCALHOST.into(),
                    Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
                ],
                ip => vec![ip],
            };
            for ip in to {
                let _ = w.send_to(&[], SocketAddr::new(ip, port));
            }
        }
        // The thread drops its end of `finished` after saving; a thread still busy past the
        // budget is left to end on its own (it checks the flag every POLL).
        let ended = matches!(
            self.finished.recv_timeout(budget),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        if ended && let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Dht {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Binds the socket; returns it with the families it reaches (v4, v6).
fn bind(ip: Option<IpAddr>, port: u16) -> io::Result<(UdpSocket, (bool, bool))> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |ip: IpAddr, dual: bool| -> io::Result<UdpSocket> {
        let domain = if ip.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let try_port = |port: u16| -> io::Result<UdpSocket> {
            let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
            if ip.is_ipv6() {
                s.set_only_v6(!dual)?;
            }
            s.bind(&SocketAddr::new(ip, port).into())?;
            Ok(s.into())
        };
        // The preferred port, else any free one.
        try_port(port).or_else(|e| if port == 0 { Err(e) } else { try_port(0) })
    };
    match ip {
        None => match open(IpAddr::V6(Ipv6Addr::UNSPECIFIED), true) {
            Ok(s) => Ok((s, (true, true))),
            Err(_) => Ok((
                open(IpAddr::V4(Ipv4Addr::UNSPECIFIED), false)?,
                (true, false),
            )),
        },
        Some(IpAddr::V6(v6)) if v6.is_unspecified() => {
            Ok((open(IpAddr::V6(v6), true)?, (true, true)))
        }
        Some(ip) => Ok((open(ip, false)?, (ip.is_ipv4(), ip.is_ipv6()))),
    }
}

/// Bootstrap entries sorted into addresses known at once and names to resolve.
struct BootstrapPlan {
    addrs: Vec<SocketAddr>,
    names: Vec<(String, u16)>,
    /// A bootstrap node is on loopback: local mode (loopback nodes are accepted).
    loopback: bool,
    notices: Vec<String>,
}

impl BootstrapPlan {
    fn new(entries: &[String], bound_loopback: bool) -> BootstrapPlan {
        let mut plan = BootstrapPlan {
            addrs: Vec::new(),
            names: Vec::new(),
            loopback: false,
            notices: Vec::new(),
        };
        let defaults: Vec<String>;
        let entries = if entries.is_empty() {
            if bound_loopback {
                return plan;
            }
            defaults = PUBLIC_ROUTERS.iter().map(|s| s.to_string()).collect();
            &defaults
        } else {
            entries
        };
        for e in entries {
            if let Ok(a) = e.parse::<SocketAddr>() {
                plan.loopback |= a.ip().is_loopback();
                plan.addrs.push(a);
                continue;
            }
            let parsed = e
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p != 0);
            match parsed {
                Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
                    plan.loopback = true;
                    plan.names.push((host.to_string(), port));
                }
                Some(_) if bound_loopback => plan.notices.push(format!(
                    "not resolving DHT bootstrap node {e}: bound to a loopback address"
                )),
                Some((host, port)) => plan.names.push((host.to_string(), port)),
                None => plan
                    .notices
                    .push(format!("ignoring DHT bootstrap node {e:?}: not HOST:PORT")),
            }
        }
        plan
    }
}

struct Worker {
    socket: UdpSocket,
    /// An AF_INET6 socket reaching IPv4 too: IPv4 destinations are written IPv4-mapped.
    dual_stack: bool,
    node: Node,
    commands: Receiver<Command>,
    stop: Arc<AtomicBool>,
    sink: Sink,
    state_file: Option<PathBuf>,
    _finished: Sender<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A bug must not leave the session waiting for a source that is gone.
        if thread::panicking() {
            (self.sink)(Event::Failed);
        }
    }
}

impl Worker {
    fn run(mut self, plan: BootstrapPlan) {
        let now = Instant::now();
        let (resolved_tx, resolved) = crossbeam_channel::bounded(plan.names.len().max(1));
        let mut resolving: Vec<(String, Instant)> = Vec::new();
        for (host, port) in plan.names {
            let tx = resolved_tx.clone();
            let name = host.clone();
            let spawned = thread::Builder::new()
                .name("dht-resolve".into())
                .spawn(move || {
                    let addrs: Vec<SocketAddr> = (name.as_str(), port)
                        .to_socket_addrs()
                        .map(|a| a.take(8).collect())
                        .unwrap_or_default();
                    let _ = tx.send((name, addrs));
                });
            if spawned.is_ok() {
                resolving.push((host, now + RESOLVE_WAIT));
            }
        }
        drop(resolved_tx);
        self.node.set_resolving(resolving.len());
        self.node.bootstrap(&plan.addrs, now);

        let mut buf = vec![0u8; krpc::MAX_PACKET + 1];
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if !self.take_commands(now) {
                break;
            }
            while let Ok((name, addrs)) = resolved.try_recv() {
                if let Some(i) = resolving.iter().position(|(n, _)| *n == name) {
                    resolving.swap_remove(i);
                }
                self.node.bootstrap(&addrs, now);
            }
            resolving.retain(|(_, deadline)| now < *deadline);
            self.node.set_resolving(resolving.len());
            self.node.tick(now);
            self.flush();
            if !self.deliver() {
                break;
            }
            match self.socket.recv_from(&mut buf) {
                Ok((n, from)) if n <= krpc::MAX_PACKET => {
                    self.node.handle(from, &buf[..n], Instant::now());
                }
                // Oversized (truncated) datagrams, timeouts, ICMP errors: nothing to do.
                Ok(_) | Err(_) => {}
            }
        }
        self.save();
    }

    /// False when the handle is gone (the thread winds down).
    fn take_commands(&mut self, now: Instant) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::GetPeers {
                    info_hash,
                    announce_port,
                }) => self.node.get_peers(info_hash, announce_port, now),
                Ok(Command::AddNode(a)) => self.node.add_node(a, now),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn flush(&mut self) {
        for (to, bytes) in self.node.take_out() {
            let to = match to {
                SocketAddr::V4(v4) if self.dual_stack => {
                    SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                }
                _ => to,
            };
            // A full send buffer or an unreachable network loses this datagram; queries time
            // out like any other lost one.
            let _ = self.socket.send_to(&bytes, to);
        }
    }

    fn deliver(&mut self) -> bool {
        self.node.take_events().into_iter().all(|e| (self.sink)(e))
    }

    fn save(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        if let Err(e) = persist::save(path, &self.node.to_save(Instant::now())) {
            let _ = (self.sink)(Event::Notice(format!(
                "could not save the DHT state file {}: {e}",
                path.display()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::RecvTimeoutError;

    /// Starts a node on 127.0.0.`n`; its events go to `tx` tagged with `n`.
    fn start(n: u8, bootstrap: Vec<String>, tx: &Sender<(u8, Event)>) -> Dht {
        let tx = tx.clone();
        let cfg = Config {
            bind: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))),
            port: 0,
            bootstrap,
            state_file: None,
        };
        Dht::start(cfg, Box::new(move |e| tx.send((n, e)).is_ok())).unwrap()
    }

    /// The next event matching `pick`, waiting until `deadline`.
    fn wait_for<T>(
        rx: &Receiver<(u8, Event)>,
        deadline: Instant,
        mut pick: impl FnMut(u8, &Event) -> Option<T>,
    ) -> T {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((n, e)) => {
                    if let Some(t) = pick(n, &e) {
                        return t;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("deadline passed"),
                Err(RecvTimeoutError::Disconnected) => panic!("every node is gone"),
            }
        }
    }

    #[test]
    fn ten_nodes_on_loopback_find_an_announced_peer() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let first = start(2, Vec::new(), &tx);
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            wait_for(&rx, deadline, |n, e| match e {
                Event::Ready { nodes } if n == 2 => Some(*nodes),
                _ => None,
            }),
            0,
            "the first node has nobody to ask, and says so at once"
        );
        let boot = vec![first.local_addr().to_string()];
        let mut nodes = vec![first];
        for n in 3..12u8 {
            nodes.push(start(n, boot.clone(), &tx));
            let ready = wait_for(&rx, deadline, |m, e| match e {
                Event::Ready { nodes } if m == n => Some(*nodes),
                _ => None,
            });
            assert!(ready >= 1, "node {n} reached the first");
        }
        let h = [0xab; 20];
        // Node 127.0.0.4 announces port 4242.
        nodes[2].get_peers(h, Some(4242));
        wait_for(&rx, deadline, |n, e| {
            matches!(e, Event::LookupDone { info_hash, .. } if n == 4 && *info_hash == h)
                .then_some(())
        });
        // Node 127.0.0.11 looks until it finds it (the announces may still be on their way).
        let want: SocketAddr = "127.0.0.4:4242".parse().unwrap();
        nodes[9].get_peers(h, None);
        wait_for(&rx, deadline, |n, e| match e {
            Event::Peers { info_hash, peers } if n == 11 && *info_hash == h => {
                peers.contains(&want).then_some(())
            }
            Event::LookupDone { info_hash, .. } if n == 11 && *info_hash == h => {
                nodes[9].get_peers(h, None);
                None
            }
            _ => None,
        });
        for d in nodes {
            d.stop(Duration::from_secs(2));
        }
    }

    #[test]
    fn the_state_file_keeps_the_id_and_a_corrupt_one_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache/dht.dat");
        let (tx, rx) = crossbeam_channel::unbounded();
        let run = |tx: &Sender<(u8, Event)>| {
            let tx = tx.clone();
            let cfg = Config {
                bind: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                port: 0,
                bootstrap: Vec::new(),
                state_file: Some(path.clone()),
            };
            let d = Dht::start(cfg, Box::new(move |e| tx.send((1, e)).is_ok())).unwrap();
            d.stop(Duration::from_secs(2));
        };
        run(&tx);
        let first = persist::load(&path).unwrap().unwrap();
        run(&tx);
        assert_eq!(persist::load(&path).unwrap().unwrap().id, first.id);
        std::fs::write(&path, b"not bencode").unwrap();
        run(&tx);
        let deadline = Instant::now() + Duration::from_secs(10);
        let notice = wait_for(&rx, deadline, |_, e| match e {
            Event::Notice(m) => Some(m.clone()),
            _ => None,
        });
        assert!(notice.contains("dht.dat"), "{notice}");
        assert_ne!(persist::load(&path).unwrap().unwrap().id, first.id);
    }

    #[test]
    fn loopback_binds_never_resolve_public_names() {
        let plan = BootstrapPlan::new(&[], true);
        assert!(plan.addrs.is_empty() && plan.names.is_empty());
        let plan = BootstrapPlan::new(&["example.org:1".into(), "127.0.0.9:5".into()], true);
        assert!(plan.names.is_empty() && plan.loopback);
        assert_eq!(plan.notices.len(), 1);
        let plan = BootstrapPlan::new(&[], false);
        assert_eq!(plan.names.len(), PUBLIC_ROUTERS.len());
        let plan = BootstrapPlan::new(&["[::1]:7".into(), "nonsense".into()], false);
        assert!(plan.loopback && plan.addrs.len() == 1 && plan.notices.len() == 1);
    }
}
