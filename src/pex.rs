//! BEP 11 peer exchange: the `ut_pex` message on byte slices (no I/O), and the per-peer record
//! of what we told it ([`Told`]).
//!
//! A message is a bencoded dictionary: `added` (compact IPv4 entries, 6 bytes each: address
//! then port, big-endian), `added.f` (one flag byte per added entry), `dropped`, and the IPv6
//! forms `added6`, `added6.f`, `dropped6` (18-byte entries).
//!
//! Hostile until checked: the payload is bounded ([`MAX_MESSAGE_LEN`]) and pre-scanned with
//! tight bencode limits; a list whose length is not a whole number of entries is an error; at
//! most [`MAX_PER_MESSAGE`] added and dropped entries are taken per family (the rest ignored);
//! flags whose count does not match the entries are ignored (not an error); an address no one
//! can connect to (port 0, unspecified, multicast, broadcast) is left out.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bt_bencode::Value;

use crate::bencode::{self, Limits};

/// Most entries taken from one list of a message (`added`, `dropped`, per family), and most
/// we send in one.
pub const MAX_PER_MESSAGE: usize = 50;
/// A larger payload is not parsed (50 entries of each list fit in under 3 KiB; this leaves
/// room for clients that send long lists, which are cut to [`MAX_PER_MESSAGE`]).
pub const MAX_MESSAGE_LEN: usize = 128 * 1024;
/// Bencode limits of the pre-scan: one flat dictionary of a few strings.
const LIMITS: Limits = Limits {
    max_size: MAX_MESSAGE_LEN,
    max_depth: 4,
    max_tokens: 256,
};

/// BEP 11 flag bits of an added peer that we set. (The others: 0x01 prefers encryption,
/// 0x04 supports uTP, 0x08 supports holepunch; we speak none of these, and flags we receive
/// are advice we do not act on.)
pub mod flag {
    /// It is a seed (or upload-only).
    pub const SEED: u8 = 0x02;
    /// The sender connected to it (so it is reachable).
    pub const REACHABLE: u8 = 0x10;
}

const V4_LEN: usize = 6;
const V6_LEN: usize = 18;

/// One `ut_pex` message: peers added (with their flags) and dropped since the last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub added: Vec<(SocketAddr, u8)>,
    pub dropped: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLong { len: usize },
    Bencode(bencode::Error),
    NotADict,
    /// A list (by its key) whose length is not a multiple of its entry size.
    BadLength { key: &'static str, len: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLong { len } => write!(f, "ut_pex message of {len} bytes is too long"),
            DecodeError::Bencode(e) => write!(f, "ut_pex message: {e}"),
            DecodeError::NotADict => write!(f, "ut_pex message is not a dictionary"),
            DecodeError::BadLength { key, len } => {
                write!(f, "ut_pex `{key}` of {len} bytes is not a list of addresses")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Whether anyone could connect to `addr`: a port, and an address that names one host.
/// Loopback and private addresses pass (as they do from a tracker).
pub fn is_usable(addr: SocketAddr) -> bool {
    let ip_ok = match addr.ip() {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    };
    addr.port() != 0 && ip_ok
}

/// Decodes a `ut_pex` payload (the bytes after the extended message id).
pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
    if payload.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong {
            len: payload.len(),
        });
    }
    let Value::Dict(d) = bencode::decode(payload, LIMITS).map_err(DecodeError::Bencode)? else {
        return Err(DecodeError::NotADict);
    };
    let mut msg = Message::default();
    for (added, flags, dropped, entry) in [
        ("added", "added.f", "dropped", V4_LEN),
        ("added6", "added6.f", "dropped6", V6_LEN),
    ] {
        let list = |key: &'static str| -> Result<&[u8], DecodeError> {
            let b = bencode::get_bytes(&d, key).unwrap_or_default();
            if b.len().is_multiple_of(entry) {
                Ok(b)
            } else {
                Err(DecodeError::BadLength { key, len: b.len() })
            }
        };
        let added = list(added)?;
        let dropped = list(dropped)?;
        // Flags that do not match the entries one for one say nothing reliable.
        let flags = bencode::get_bytes(&d, flags).filter(|f| f.len() == added.len() / entry);
        for (i, chunk) in added.chunks_exact(entry).take(MAX_PER_MESSAGE).enumerate() {
            let addr = compact(chunk);
            if is_usable(addr) {
                let f = flags.map_or(0, |f| f[i]);
                msg.added.push((addr, f));
            }
        }
        msg.dropped.extend(
            dropped
                .chunks_exact(entry)
                .take(MAX_PER_MESSAGE)
                .map(compact)
                .filter(|a| is_usable(*a)),
        );
    }
    Ok(msg)
}

/// A 6- or 18-byte compact address (checked by the caller's `chunks_exact`).
fn compact(b: &[u8]) -> SocketAddr {
    let (ip, port) = b.split_at(b.len() - 2);
    let port = u16::from_be_bytes([port[0], port[1]]);
    let ip = match <[u8; 4]>::try_from(ip) {
        Ok(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        Err(_) => {
            let mut v6 = [0u8; 16];
            v6.copy_from_slice(ip);
            IpAddr::V6(Ipv6Addr::from(v6))
        }
    };
    SocketAddr::new(ip, port)
}

fn put_compact(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(v4) => out.extend_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.extend_from_slice(&v6.octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// Encodes a message. Every list is written, empty or not, with `added.f` beside `added`
/// (libtorrent reads `added` only with flags of the same count). An IPv4-mapped IPv6 address
/// goes out as IPv4.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut lists: [Vec<u8>; 6] = Default::default();
    let [added, added_f, dropped, added6, added6_f, dropped6] = &mut lists;
    for &(addr, f) in &msg.added {
        match canonical(addr) {
            a @ SocketAddr::V4(_) => {
                put_compact(a, added);
                added_f.push(f);
            }
            a @ SocketAddr::V6(_) => {
                put_compact(a, added6);
                added6_f.push(f);
            }
        }
    }
    for &addr in &msg.dropped {
        match canonical(addr) {
            a @ SocketAddr::V4(_) => put_compact(a, dropped),
            a @ SocketAddr::V6(_) => put_compact(a, dropped6),
        }
    }
    let [added, added_f, dropped, added6, added6_f, dropped6] = lists;
    bencode::encode(&bencode::dict([
        ("added", bencode::bytes(added)),
        ("added.f", bencode::bytes(added_f)),
        ("added6", bencode::bytes(added6)),
        ("added6.f", bencode::bytes(added6_f)),
        ("dropped", bencode::bytes(dropped)),
        ("dropped6", bencode::bytes(dropped6)),
    ]))
}

/// An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// What one peer has been told about the others: the session keeps one per connection that
/// takes `ut_pex`, and each message it sends is the difference between what is live now and
/// what was told. Pure (no clock, no I/O).
#[derive(Debug, Default)]
pub struct Told {
    told: HashSet<SocketAddr>,
}

/// The most addresses a [`Told`] remembers: more would only be told as we connect to more
/// peers, and our connection cap is far below it.
const MAX_TOLD: usize = 1024;

impl Told {
    /// The next message for this peer, given `live`: the listen addresses of our other
    /// connections, with their flags (the caller leaves out the peer itself). `None` when
    /// there is nothing new. At most [`MAX_PER_MESSAGE`] added and dropped; the rest wait for
    /// the next message. What it returns is recorded as told.
    pub fn next(&mut self, live: &[(SocketAddr, u8)]) -> Option<Message> {
        let now: HashSet<SocketAddr> = live.iter().map(|(a, _)| *a).collect();
        let mut dropped: Vec<SocketAddr> = self
            .told
            .iter()
            .filter(|a| !now.contains(a))
            .copied()
            .collect();
        dropped.sort();
        dropped.truncate(MAX_PER_MESSAGE);
        for a in &dropped {
            self.told.remove(a);
        }
        let mut added = Vec::new();
        let mut seen = HashSet::new();
        for &(addr, f) in live {
            if added.len() >= MAX_PER_MESSAGE || self.told.len() >= MAX_TOLD {
                break;
            }
            if is_usable(addr) && !self.told.contains(&addr) && seen.insert(addr) {
                added.push((addr, f));
            }
        }
        self.told.extend(added.iter().map(|(a, _)| *a));
        (!added.is_empty() || !dropped.is_empty()).then_some(Message { added, dropped })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.told.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], port))
    }

    fn v6(port: u16) -> SocketAddr {
        SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7], port))
    }

    fn raw(entries: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
        bencode::encode(&bencode::dict(
            entries.iter().map(|(k, v)| (*k, bencode::bytes(v.clone()))),
        ))
    }

    #[test]
    fn round_trip_both_families() {
        let msg = Message {
            added: vec![
                (v4(2, 6881), flag::SEED | flag::REACHABLE),
                (v6(7000), 0x01),
                (v4(3, 1), 0),
            ],
            dropped: vec![v4(4, 80), v6(81)],
        };
        let back = decode(&encode(&msg)).unwrap();
        // Grouped by family on the wire: IPv4 first.
        assert_eq!(
            back.added,
            vec![
                (v4(2, 6881), flag::SEED | flag::REACHABLE),
                (v4(3, 1), 0),
                (v6(7000), 0x01)
            ]
        );
        assert_eq!(back.dropped, vec![v4(4, 80), v6(81)]);
        assert_eq!(decode(&encode(&Message::default())).unwrap(), Message::default());
    }

    #[test]
    fn mapped_addresses_go_out_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.9]:5000".parse().unwrap();
        let msg = Message {
            added: vec![(mapped, 0)],
            dropped: vec![],
        };
        assert_eq!(decode(&encode(&msg)).unwrap().added, vec![(v4(9, 5000), 0)]);
    }

    #[test]
    fn ten_thousand_added_are_cut_to_the_cap() {
        let mut added = Vec::new();
        for i in 0..10_000u32 {
            added.extend_from_slice(&[10, (i >> 16) as u8, (i >> 8) as u8, i as u8, 0x1a, 0xe1]);
        }
        let flags = vec![flag::SEED; 10_000];
        let payload = raw(&[("added", added.clone()), ("added.f", flags), ("dropped", added)]);
        assert!(payload.len() < MAX_MESSAGE_LEN);
        let msg = decode(&payload).unwrap();
        assert_eq!(msg.added.len(), MAX_PER_MESSAGE);
        assert_eq!(msg.dropped.len(), MAX_PER_MESSAGE);
        assert!(msg.added.iter().all(|(_, f)| *f == flag::SEED));
    }

    #[test]
    fn bad_lengths_are_errors_and_bad_flags_are_ignored() {
        let one = vec![127, 0, 0, 2, 0x1a, 0xe1];
        let err = decode(&raw(&[("added", vec![1, 2, 3, 4, 5])])).unwrap_err();
        assert_eq!(err, DecodeError::BadLength { key: "added", len: 5 });
        assert!(decode(&raw(&[("dropped", vec![0; 7])])).is_err());
        assert!(decode(&raw(&[("added6", vec![0; 6])])).is_err());
        assert!(decode(&raw(&[("dropped6", vec![0; 17])])).is_err());
        // Flags of the wrong count: the entries stand, without flags.
        for flags in [vec![], vec![0xff, 0xff], vec![0xff; 100]] {
            let msg = decode(&raw(&[("added", one.clone()), ("added.f", flags)])).unwrap();
            assert_eq!(msg.added, vec![(v4(2, 6881), 0)]);
        }
        // Flags that are not a string, or unknown bits: taken as they come (never trusted).
        let msg = decode(b"d5:added6:\x7f\x00\x00\x02\x1a\xe17:added.fi3ee").unwrap();
        assert_eq!(msg.added, vec![(v4(2, 6881), 0)]);
        let msg = decode(&raw(&[("added", one), ("added.f", vec![0xe0])])).unwrap();
        assert_eq!(msg.added, vec![(v4(2, 6881), 0xe0)]);
        // Lists of the wrong type count as absent.
        assert_eq!(decode(b"d5:addedi5e7:droppedle4:junk3:abce").unwrap(), Message::default());
    }

    #[test]
    fn addresses_nobody_can_reach_are_left_out() {
        let mut added = Vec::new();
        for (ip, port) in [
            ([0, 0, 0, 0], 6881u16),
            ([224, 0, 0, 1], 6881),
            ([255, 255, 255, 255], 6881),
            ([127, 0, 0, 2], 0),
            ([127, 0, 0, 2], 6881),
            ([192, 168, 1, 2], 6881),
        ] {
            added.extend_from_slice(&ip);
            added.extend_from_slice(&port.to_be_bytes());
        }
        let mut added6 = Vec::new();
        added6.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
        added6.extend_from_slice(&[0x1a, 0xe1]);
        added6.extend_from_slice(&"ff02::1".parse::<Ipv6Addr>().unwrap().octets());
        added6.extend_from_slice(&[0x1a, 0xe1]);
        let msg = decode(&raw(&[("added", added.clone()), ("added6", added6), ("dropped", added)]))
            .unwrap();
        let good = vec![v4(2, 6881), SocketAddr::from(([192, 168, 1, 2], 6881))];
        assert_eq!(msg.added.iter().map(|(a, _)| *a).collect::<Vec<_>>(), good);
        assert_eq!(msg.dropped, good);
        assert!(is_usable(v4(1, 1)), "loopback is allowed");
    }

    #[test]
    fn malformed_and_oversize_payloads_are_refused() {
        assert_eq!(decode(b"le").unwrap_err(), DecodeError::NotADict);
        assert_eq!(decode(b"i3e").unwrap_err(), DecodeError::NotADict);
        assert!(matches!(decode(b"d5:added"), Err(DecodeError::Bencode(_))));
        assert!(matches!(decode(b""), Err(DecodeError::Bencode(_))));
        assert!(matches!(decode(&vec![b'l'; 5000]), Err(DecodeError::Bencode(_))));
        assert!(matches!(decode(b"d1:ad1:ad1:ad1:ad1:aleeeeee"), Err(DecodeError::Bencode(_))));
        // Many keys: past the token limit.
        let mut many = b"d".to_vec();
        for i in 0..1000 {
            many.extend_from_slice(format!("4:k{i:03}i1e").as_bytes());
        }
        many.push(b'e');
        assert!(matches!(decode(&many), Err(DecodeError::Bencode(_))));
        let huge = raw(&[("added", vec![0; MAX_MESSAGE_LEN])]);
        assert_eq!(decode(&huge).unwrap_err(), DecodeError::TooLong { len: huge.len() });
    }

    #[test]
    fn told_sends_each_address_once_and_drops_what_is_gone() {
        let mut t = Told::default();
        assert_eq!(t.next(&[]), None, "nothing to say");
        let first = t.next(&[(v4(2, 1), flag::SEED), (v4(3, 1), 0)]).unwrap();
        assert_eq!(first.added, vec![(v4(2, 1), flag::SEED), (v4(3, 1), 0)]);
        assert!(first.dropped.is_empty());
        assert_eq!(t.next(&[(v4(2, 1), flag::SEED), (v4(3, 1), 0)]), None);
        let second = t.next(&[(v4(3, 1), 0), (v4(4, 1), flag::REACHABLE)]).unwrap();
        assert_eq!(second.added, vec![(v4(4, 1), flag::REACHABLE)]);
        assert_eq!(second.dropped, vec![v4(2, 1)]);
        // Gone and back: told again as added.
        let third = t.next(&[(v4(2, 1), 0), (v4(3, 1), 0), (v4(4, 1), 0)]).unwrap();
        assert_eq!(third.added, vec![(v4(2, 1), 0)]);
        assert!(third.dropped.is_empty());
    }

    #[test]
    fn told_sends_at_most_the_cap_per_message_and_the_rest_later() {
        let live: Vec<(SocketAddr, u8)> = (1..=120u16).map(|p| (v4(2, p), 0)).collect();
        let mut t = Told::default();
        let mut total = 0;
        while let Some(m) = t.next(&live) {
            assert!(m.added.len() <= MAX_PER_MESSAGE);
            total += m.added.len();
        }
        assert_eq!(total, 120);
        assert_eq!(t.len(), 120);
        let gone = t.next(&[]).unwrap();
        assert_eq!(gone.dropped.len(), MAX_PER_MESSAGE);
        assert!(gone.added.is_empty());
        assert_eq!(t.len(), 70, "the rest of the drops wait for the next message");
        // Duplicates and unusable addresses in `live` are never told.
        let mut t = Told::default();
        let m = t.next(&[(v4(2, 1), 0), (v4(2, 1), 2), (v4(2, 0), 0)]).unwrap();
        assert_eq!(m.added, vec![(v4(2, 1), 0)]);
    }
}
