//! Which addresses the DHT will talk about: canonical forms, martians, and the subnet keys the
//! routing table caps.
//!
//! Every address a packet names (a sender, a `nodes` entry, a `values` peer) passes
//! [`allowed`] before it goes into a table, a lookup or an event: a hostile node must not be
//! able to point us, or the peers we hand to the session, at our own host or at addresses that
//! are never a real node.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The one spelling of an address: an IPv4-mapped IPv6 address (what a dual-stack socket reports
/// for IPv4 senders) becomes plain IPv4, so one node never counts as two.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => SocketAddr::new(IpAddr::V6(*a.ip()), a.port()),
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Whether `addr` may be a DHT node or a peer. Loopback only in local mode (bound to loopback, or
/// bootstrapping from a loopback node): on the Internet a node that names 127.0.0.1 is lying.
pub(crate) fn allowed(addr: SocketAddr, local_mode: bool) -> bool {
    let addr = canonical(addr);
    if addr.port() == 0 {
        return false;
    }
    match addr.ip() {
        IpAddr::V4(ip) => v4_allowed(ip, local_mode),
        IpAddr::V6(ip) => v6_allowed(ip, local_mode),
    }
}

fn v4_allowed(ip: Ipv4Addr, local_mode: bool) -> bool {
    let first = ip.octets()[0];
    if ip.is_loopback() {
        return local_mode;
    }
    // 0.0.0.0/8 (this network), 224/4 multicast, 240/4 reserved and the broadcast address.
    !(first == 0 || ip.is_multicast() || first >= 240)
}

fn v6_allowed(ip: Ipv6Addr, local_mode: bool) -> bool {
    if ip.is_loopback() {
        return local_mode;
    }
    !(ip.is_unspecified() || ip.is_multicast() || ip.to_ipv4_mapped().is_some())
}

/// The subnet the routing table counts nodes per: /24 for IPv4, /64 for IPv6; None for loopback,
/// which is exempt (tests run many nodes on 127.0.0.x).
pub(crate) fn subnet(ip: IpAddr) -> Option<[u8; 8]> {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => None,
        IpAddr::V6(v6) if v6.is_loopback() => None,
        IpAddr::V4(v4) => {
            let o = v4.octets();
            Some([4, o[0], o[1], o[2], 0, 0, 0, 0])
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            Some([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn martians_are_refused_and_loopback_only_in_local_mode() {
        for bad in [
            "0.0.0.0:1",
            "0.1.2.3:1",
            "224.0.0.1:1",
            "240.0.0.1:1",
            "255.255.255.255:1",
            "1.2.3.4:0",
            "[::]:1",
            "[ff02::1]:1",
        ] {
            assert!(!allowed(a(bad), true), "{bad}");
        }
        assert!(allowed(a("1.2.3.4:6881"), false));
        assert!(allowed(a("[2001:db8::1]:6881"), false));
        assert!(!allowed(a("127.0.0.2:6881"), false));
        assert!(allowed(a("127.0.0.2:6881"), true));
        assert!(!allowed(a("[::1]:6881"), false));
        assert!(allowed(a("[::1]:6881"), true));
        // A mapped loopback is loopback.
        assert!(!allowed(a("[::ffff:127.0.0.1]:6881"), false));
    }

    #[test]
    fn mapped_addresses_become_ipv4_and_subnets_group() {
        assert_eq!(canonical(a("[::ffff:1.2.3.4]:5")), a("1.2.3.4:5"));
        assert_eq!(canonical(a("[2001:db8::1]:5")), a("[2001:db8::1]:5"));
        let s = |x: &str| subnet(x.parse().unwrap());
        assert_eq!(s("1.2.3.4"), s("1.2.3.200"));
        assert_ne!(s("1.2.3.4"), s("1.2.4.4"));
        assert_eq!(s("2001:db8::1"), s("2001:db8::ffff:1"));
        assert_eq!(s("127.0.0.5"), None);
    }
}
