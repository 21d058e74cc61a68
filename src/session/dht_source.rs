//! The DHT as a source of peers for one torrent: starts the node, runs its lookups again
//! while peers are wanted (and re-announces while we are in the swarm), and says when it has
//! nothing more to give, so that a one-shot download with no other source can end.
//!
//! The node itself (`crate::dht`) owns its socket and thread; this is the session's side of
//! it, shared by the metadata phase of a magnet and the transfer that follows.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::dht::{self, Dht};
use crate::engine::{Config, Event, NoticeKind, PeerSource};
use crate::messages::{DhtMessage, Input};

/// After a lookup, the next one comes this soon while peers are wanted...
const RELOOK_WANTING: Duration = Duration::from_secs(30);
/// ...and this soon otherwise: an announce stays on a node for about 30 minutes.
const REANNOUNCE: Duration = Duration::from_secs(15 * 60);
/// Lookups that found nobody, in a row, before the DHT counts as having nothing to give.
const EMPTY_LOOKUPS: u32 = 3;
/// How long `stop` may take (the state file is written then).
const STOP_BUDGET: Duration = Duration::from_millis(500);

pub(super) struct DhtSource {
    dht: Dht,
    info_hash: [u8; 20],
    /// A hybrid torrent's second swarm (BEP 52: the v2 info hash's first 20 bytes), looked up
    /// and announced beside the first; its lookups do not count towards `exhausted`.
    second_hash: Option<[u8; 20]>,
    /// Our TCP listen port, announced so that others find us.
    announce_port: u16,
    /// Nodes known when the node said it was ready (`None`: not yet).
    ready: Option<usize>,
    lookup_running: bool,
    next_lookup: Option<Instant>,
    empty_lookups: u32,
    found_any: bool,
    /// The node's thread died (a bug): no more lookups, nothing more to give.
    failed: bool,
}

impl DhtSource {
    /// Starts the node for a public torrent when the configuration allows it. A node that
    /// cannot start (no UDP socket) is reported and left out: the other sources go on.
    pub(super) fn start(
        cfg: &Config,
        info_hash: [u8; 20],
        listen: SocketAddr,
        input_tx: &Sender<Input>,
        events: &Sender<Event>,
    ) -> Option<DhtSource> {
        if !cfg.dht {
            return None;
        }
        let tx = input_tx.clone();
        let started = Dht::start(
            dht::Config {
                bind: cfg.bind,
                port: listen.port(),
                bootstrap: cfg.dht_bootstrap.clone(),
                state_file: cfg.dht_state.clone(),
            },
            Box::new(move |e| tx.send(Input::Dht(DhtMessage(e))).is_ok()),
        );
        match started {
            Ok(dht) => {
                dht.get_peers(info_hash, Some(listen.port()));
                Some(DhtSource {
                    dht,
                    info_hash,
                    second_hash: None,
                    announce_port: listen.port(),
                    ready: None,
                    lookup_running: true,
                    next_lookup: None,
                    empty_lookups: 0,
                    found_any: false,
                    failed: false,
                })
            }
            Err(e) => {
                let _ = events.send(Event::Notice {
                    kind: NoticeKind::Dht,
                    message: format!("the DHT is off: cannot open its UDP socket: {e}"),
                });
                None
            }
        }
    }

    /// Looks up and announces `hash` too from now on (a hybrid torrent's v2 swarm).
    pub(super) fn add_swarm(&mut self, hash: [u8; 20]) {
        if hash != self.info_hash && self.second_hash.is_none() {
            self.second_hash = Some(hash);
            self.dht.get_peers(hash, Some(self.announce_port));
        }
    }

    /// The UDP port other peers may reach the node on (for BEP 5 `port` messages).
    pub(super) fn port(&self) -> u16 {
        self.dht.local_addr().port()
    }

    /// Handles what the node reported; returns peers for this torrent.
    pub(super) fn on_message(
        &mut self,
        DhtMessage(event): DhtMessage,
        events: &Sender<Event>,
    ) -> Vec<SocketAddr> {
        match event {
            dht::Event::Peers { info_hash, peers }
                if info_hash == self.info_hash || Some(info_hash) == self.second_hash =>
            {
                if !peers.is_empty() {
                    self.found_any = true;
                    let _ = events.send(Event::PeersFound {
                        source: PeerSource::Dht,
                        count: peers.len(),
                    });
                }
                return peers;
            }
            dht::Event::Peers { .. } => {}
            dht::Event::Ready { nodes } => {
                self.ready = Some(nodes);
                if nodes > 0 && !self.lookup_running && !self.found_any {
                    // A lookup that ended before bootstrapping gave it anyone to ask.
                    self.next_lookup = Some(Instant::now());
                }
                let _ = events.send(Event::Dht {
                    address: self.dht.local_addr(),
                    nodes,
                });
            }
            dht::Event::LookupDone { info_hash, peers } if info_hash == self.info_hash => {
                self.lookup_running = false;
                if peers == 0 {
                    self.empty_lookups += 1;
                } else {
                    self.empty_lookups = 0;
                    self.found_any = true;
                }
            }
            dht::Event::LookupDone { .. } => {}
            dht::Event::Failed => {
                self.failed = true;
                let _ = events.send(Event::Notice {
                    kind: NoticeKind::Dht,
                    message: "the DHT stopped on an internal error; going on without it".into(),
                });
            }
            dht::Event::Notice(message) => {
                let _ = events.send(Event::Notice {
                    kind: NoticeKind::Dht,
                    message,
                });
            }
        }
        Vec::new()
    }

    /// Called on the session's tick: schedules the next lookup once one has ended.
    pub(super) fn tick(&mut self, want_peers: bool) {
        if self.lookup_running || self.failed {
            return;
        }
        let now = Instant::now();
        let wait = if want_peers {
            RELOOK_WANTING
        } else {
            REANNOUNCE
        };
        let due = *self.next_lookup.get_or_insert(now + wait);
        // Peers wanted again before a long wait is over: look sooner.
        if want_peers && due > now + RELOOK_WANTING {
            self.next_lookup = Some(now + RELOOK_WANTING);
        }
        if self.next_lookup.is_some_and(|t| now >= t) {
            self.next_lookup = None;
            self.lookup_running = true;
            self.dht.get_peers(self.info_hash, Some(self.announce_port));
            if let Some(second) = self.second_hash {
                self.dht.get_peers(second, Some(self.announce_port));
            }
        }
    }

    /// Whether the DHT has nothing to give: nobody to ask, or lookups that keep finding no
    /// peer for a torrent it never found a peer for.
    pub(super) fn exhausted(&self) -> bool {
        self.failed
            || self.ready == Some(0)
            || (!self.found_any && self.empty_lookups >= EMPTY_LOOKUPS)
    }

    /// Why [`exhausted`](Self::exhausted) holds, for people.
    pub(super) fn why_exhausted(&self) -> &'static str {
        if self.failed {
            "the DHT stopped on an internal error"
        } else if self.ready == Some(0) {
            "the DHT reached no node"
        } else {
            "the DHT found no peer"
        }
    }

    /// A peer told us the port of its DHT node (BEP 5 `port` message).
    pub(super) fn add_node(&self, ip: IpAddr, port: u16) {
        self.dht.add_node(SocketAddr::new(ip, port));
    }

    /// Saves the routing table and stops the node, within a short budget.
    pub(super) fn stop(self) {
        self.dht.stop(STOP_BUDGET);
    }
}
