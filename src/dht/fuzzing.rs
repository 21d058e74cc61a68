//! The DHT's fuzz target body: bytes from hostile nodes through the decoder and through a
//! whole [`Node`] (tables, store, tokens, rate limits, lookups), with no socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Event;
use super::krpc::{self, Body};
use super::node::{MAX_PEER_LOOKUPS, MAX_PENDING, Node};
use super::store::{MAX_HASHES, MAX_PEERS_PER_HASH};
use super::table::{K, MAX_BUCKETS};
use crate::rng::Rng;

/// Datagrams are separated by these 4 bytes.
pub(crate) const SEPARATOR: &[u8] = b"\n--\n";
/// A transaction id of `TT` in a datagram is replaced by the id of our last query to its
/// sender, so the fuzzer reaches the response paths without guessing ids.
pub(crate) const TID_MARKER: &[u8] = b"1:t2:TT";
const MAX_SENDERS: usize = 16;

/// Input: datagrams separated by [`SEPARATOR`], each prefixed by one byte: its low 4 bits pick
/// the sender (a stranger, or one of the addresses the node has queried, in the order first
/// queried), its high 4 bits move the clock on in quarter seconds (so timeouts, Ready and
/// maintenance run). A chunk of that byte alone is a command instead: `add_node(sender)` when
/// its bit 7 is set, else `get_peers` (announcing when bit 0 is set). Every datagram is also
/// decoded on its own: a decoded message re-encodes to one that decodes the same. After each
/// step, what the node sends and keeps must stay within its bounds.
pub(crate) fn krpc(data: &[u8]) {
    run(data);
}

/// The target's body; returns how many `Peers` events the node reported.
pub(crate) fn run(data: &[u8]) -> usize {
    let now0 = Instant::now();
    let addr = |s: &str| -> SocketAddr { s.parse().expect("a literal address") };
    let mut node = Node::new(
        [0x42; 20],
        addr("10.0.0.1:6881"),
        (true, true),
        false,
        Rng::new(1),
        now0,
    );
    let mut senders = vec![addr("10.2.0.1:1"), addr("[2001:db8::2]:2")];
    let mut last_tid: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    node.bootstrap(&[addr("10.1.0.1:6881"), addr("[2001:db8::1]:6881")], now0);
    node.get_peers([0x43; 20], Some(6881), now0);
    let mut now = now0;
    let mut peer_events = check_output(&mut node, &mut senders, &mut last_tid);
    for chunk in split(data) {
        let Some((&selector, packet)) = chunk.split_first() else {
            continue;
        };
        let from = senders[usize::from(selector & 0x0f) % senders.len()];
        if packet.is_empty() {
            if selector & 0x80 != 0 {
                node.add_node(from, now);
            } else {
                node.get_peers([0x43; 20], (selector & 1 == 1).then_some(6881), now);
            }
            peer_events += check_output(&mut node, &mut senders, &mut last_tid);
            continue;
        }
        check_codec(packet);
        let mut packet = packet.to_vec();
        if let Some(at) = packet
            .windows(TID_MARKER.len())
            .position(|w| w == TID_MARKER)
            && let Some((_, tid)) = last_tid.iter().find(|(a, _)| *a == from)
        {
            packet[at + 5..at + 7].copy_from_slice(tid);
        }
        node.handle(from, &packet, now);
        now += Duration::from_millis(u64::from(selector >> 4) * 250);
        node.tick(now);
        peer_events += check_output(&mut node, &mut senders, &mut last_tid);
    }
    peer_events
}

fn check_output(
    node: &mut Node,
    senders: &mut Vec<SocketAddr>,
    last_tid: &mut Vec<(SocketAddr, Vec<u8>)>,
) -> usize {
    let mut peer_events = 0;
    for (to, bytes) in node.take_out() {
        assert!(bytes.len() <= 1500, "a {}-byte datagram", bytes.len());
        let msg = krpc::decode(&bytes).expect("we sent what we cannot read");
        if let Body::Query(_) = msg.body {
            assert_eq!(msg.tid.len(), 2);
            if !senders.contains(&to) && senders.len() < MAX_SENDERS {
                senders.push(to);
            }
            last_tid.retain(|(a, _)| *a != to);
            if last_tid.len() < MAX_SENDERS {
                last_tid.push((to, msg.tid));
            }
        }
    }
    for e in node.take_events() {
        if let Event::Peers { peers, .. } = e {
            assert!(!peers.is_empty() && peers.len() <= krpc::MAX_VALUES);
            assert!(peers.iter().all(|p| super::addr::allowed(*p, false)));
            peer_events += 1;
        }
    }
    let sizes = node.sizes();
    assert!(sizes.nodes <= 2 * MAX_BUCKETS * K);
    assert!(sizes.pending <= MAX_PENDING);
    assert!(sizes.lookups <= MAX_PEER_LOOKUPS + 4);
    assert!(sizes.stored.0 <= MAX_HASHES && sizes.stored.1 <= MAX_HASHES * MAX_PEERS_PER_HASH);
    peer_events
}

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let at = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR);
        let (packet, next) = match at {
            Some(i) => (&rest[..i], &rest[i + SEPARATOR.len()..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        Some(packet)
    })
}

fn check_codec(packet: &[u8]) {
    match krpc::decode(packet) {
        Ok(msg) => {
            assert!(packet.len() <= krpc::MAX_PACKET);
            if let Body::Response(r) = &msg.body {
                assert!(r.nodes.len() <= krpc::MAX_NODES && r.nodes6.len() <= krpc::MAX_NODES);
                assert!(r.values.len() <= krpc::MAX_VALUES);
            }
            let again = krpc::encode(&msg);
            assert_eq!(
                krpc::decode(&again).as_ref(),
                Ok(&msg),
                "re-encoding changed it"
            );
        }
        Err(e) => {
            if let Some((tid, _)) = &e.reply {
                assert!(!tid.is_empty() && tid.len() <= krpc::MAX_TID);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The seed that walks bootstrap → get_peers → an answer with values really gets there
    /// (the `TT` marker and the sender byte line up with what the node sent).
    #[test]
    fn the_lookup_seed_reaches_the_peers_path() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fuzz/corpus/krpc/bootstrap-answer-then-lookup-answers"
        );
        let seed = std::fs::read(path).unwrap();
        assert!(super::run(&seed) >= 1);
    }
}
