//! The DHT's fuzz target body: bytes from a hostile node through the decoder and through a
//! whole [`Node`] (tables, store, tokens, rate limits), with no socket.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::krpc::{self, Body};
use super::node::{MAX_PEER_LOOKUPS, MAX_PENDING, Node};
use super::store::{MAX_HASHES, MAX_PEERS_PER_HASH};
use super::table::{K, MAX_BUCKETS};
use crate::rng::Rng;

/// Input: datagrams separated by the 4 bytes `\n--\n`. Each is decoded on its own (a decoded
/// message must re-encode and decode to itself, within the size cap), then fed to a node as if
/// from one of a few senders, with the clock moving on a little each time; every output must
/// stay within its bounds.
pub(crate) fn krpc(data: &[u8]) {
    let now0 = Instant::now();
    let local: SocketAddr = "10.0.0.1:6881".parse().expect("a literal address");
    let mut node = Node::new([0x42; 20], local, (true, true), false, Rng::new(1), now0);
    // Something to look up, so responses can match transactions.
    node.bootstrap(&["10.1.0.1:6881".parse().expect("a literal address")], now0);
    node.get_peers([0x42; 20], Some(6881), now0);
    let sent: Vec<(SocketAddr, Vec<u8>)> = node.take_out();
    let senders: Vec<SocketAddr> = sent
        .iter()
        .map(|(a, _)| *a)
        .chain(["10.2.0.1:1".parse().expect("a literal address")])
        .collect();
    let mut now = now0;
    for (i, packet) in split(data).enumerate() {
        check_codec(packet);
        let from = senders[i % senders.len()];
        // Answer with our own transaction ids when the input has none of its own.
        node.handle(from, packet, now);
        now += Duration::from_millis(u64::from(packet.first().copied().unwrap_or(0)) * 20);
        node.tick(now);
        let out = node.take_out();
        for (_, bytes) in &out {
            assert!(bytes.len() <= 1500, "a {}-byte datagram", bytes.len());
            assert!(krpc::decode(bytes).is_ok(), "we sent what we cannot read");
        }
        let events = node.take_events();
        for e in &events {
            if let super::Event::Peers { peers, .. } = e {
                assert!(peers.len() <= krpc::MAX_VALUES);
            }
        }
        let sizes = node.sizes();
        assert!(sizes.nodes <= 2 * MAX_BUCKETS * K);
        assert!(sizes.pending <= MAX_PENDING);
        assert!(sizes.lookups <= MAX_PEER_LOOKUPS + 4);
        assert!(sizes.stored.0 <= MAX_HASHES && sizes.stored.1 <= MAX_HASHES * MAX_PEERS_PER_HASH);
    }
}

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let at = rest.windows(4).position(|w| w == b"\n--\n");
        let (packet, next) = match at {
            Some(i) => (&rest[..i], &rest[i + 4..]),
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
