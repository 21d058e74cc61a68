//! BEP 11 peer exchange, the session's side: what each connection that takes `ut_pex` is told
//! about our other connections (a diff per peer, kept by [`crate::pex::Told`]), and the peers
//! connections tell us about, which join the candidates like a tracker's, through the peer
//! table (so they never bypass bans, back-off or the connection caps) and under a cap of
//! their own ([`super::peer_table::MAX_PEX_CANDIDATES`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Session;
use crate::messages::Command;
use crate::pex::{self, flag};
use crate::picker::PeerKey;

/// The first message goes this long after the peer's extension handshake (its other
/// messages, and ours, are through by then).
const FIRST_AFTER: Duration = Duration::from_secs(3);
/// BEP 11: at most one message a minute per peer.
const EVERY: Duration = Duration::from_secs(60);
/// How soon to look again when there was nothing new to tell.
const IDLE_LOOK: Duration = Duration::from_secs(5);

impl Session {
    /// The peer's extension handshake named its `ut_pex` id (or not).
    pub(super) fn on_pex_offer(&mut self, key: PeerKey, id: Option<u8>) {
        let on = self.ctx.pex;
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let was = p.ut_pex;
        p.ut_pex = id.filter(|_| on);
        if was.is_none() && p.ut_pex.is_some() {
            p.pex_due = Some(Instant::now() + FIRST_AFTER);
        }
    }

    /// Addresses a connection told us about. Of the `dropped` ones, only those that came by
    /// PEX and wait undialled are let go (a peer's word never removes a tracker's peer).
    pub(super) fn on_pex(&mut self, added: Vec<(SocketAddr, u8)>, dropped: Vec<SocketAddr>) {
        if !self.ctx.pex {
            return;
        }
        self.table
            .forget_from_pex(dropped.into_iter().map(pex::canonical));
        let addrs: Vec<SocketAddr> = added
            .into_iter()
            .map(|(a, _)| pex::canonical(a))
            .filter(|a| pex::is_usable(*a))
            .collect();
        if !addrs.is_empty() {
            let _ = self.events.send(crate::engine::Event::PeersFound {
                source: crate::engine::PeerSource::Pex,
                count: addrs.len(),
            });
        }
        self.table.add_from_pex(addrs);
        self.dial();
    }

    /// Sends each connection that is due its next message (called every tick).
    pub(super) fn send_pex(&mut self) {
        if !self.ctx.pex {
            return;
        }
        let now = Instant::now();
        let due: Vec<PeerKey> = self
            .peers
            .iter()
            .filter(|(_, p)| p.is_connected() && p.ut_pex.is_some())
            .filter(|(_, p)| p.pex_due.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let live = self.pex_view_for(key);
            let p = self.peers.get_mut(&key).expect("listed above");
            let Some(id) = p.ut_pex else {
                continue;
            };
            match p.pex_told.next(&live) {
                Some(msg) => {
                    p.send(Command::Pex {
                        id,
                        payload: pex::encode(&msg),
                    });
                    p.pex_due = Some(now + EVERY);
                }
                None => p.pex_due = Some(now + IDLE_LOOK),
            }
        }
    }

    /// Where our other connections listen, with their flags, as `key` may be told: the
    /// address we dialled, or an inbound peer's address with the port of its extension
    /// handshake (none without one). Never the peer itself.
    fn pex_view_for(&self, key: PeerKey) -> Vec<(SocketAddr, u8)> {
        let Some(me) = self.peers.get(&key) else {
            return Vec::new();
        };
        let mine = [Some(me.addr), me.listen_addr];
        let mut live: Vec<(SocketAddr, u8)> = self
            .peers
            .iter()
            .filter(|(k, p)| **k != key && p.is_connected() && !p.dropped_by_us)
            .filter(|(_, p)| p.peer_id.is_none() || p.peer_id != me.peer_id)
            .filter_map(|(k, p)| {
                let (addr, mut f) = if p.outbound {
                    (p.addr, flag::REACHABLE)
                } else {
                    (p.listen_addr?, 0)
                };
                if self.picker.peer_is_seed(*k) {
                    f |= flag::SEED;
                }
                Some((pex::canonical(addr), f))
            })
            .filter(|(a, _)| !mine.contains(&Some(*a)) && !self.table.is_banned(*a))
            .collect();
        // A stable order, so the peers told first are the same from one message to the next.
        live.sort();
        live
    }
}
