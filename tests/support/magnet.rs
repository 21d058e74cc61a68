//! Magnet links written by the tests (never by bitfetch's own code): [`Link`] builds one from
//! an info hash and its hints (`dn`, `tr`, `x.pe`) or from raw parameters, hostile ones
//! included; [`base32`] writes the 32-character form of an info hash.

use std::net::SocketAddr;

use super::{hex, url_encode};

/// A magnet link under construction. Parameters are written in the order they were added,
/// each value percent-encoded (except those given to [`Link::raw`]).
#[derive(Debug, Clone, Default)]
pub struct Link {
    params: Vec<(String, String)>,
}

impl Link {
    /// `magnet:?xt=urn:btih:HEX` for a v1 info hash.
    pub fn new(info_hash: &[u8; 20]) -> Link {
        Link::default().raw("xt", &format!("urn:btih:{}", hex(info_hash)))
    }

    /// `magnet:?xt=urn:btih:BASE32`.
    pub fn base32(info_hash: &[u8; 20]) -> Link {
        Link::default().raw("xt", &format!("urn:btih:{}", base32(info_hash)))
    }

    /// `magnet:?xt=urn:btmh:1220HEX` for a v2 info hash (BEP 52: a SHA-256 multihash).
    pub fn v2(info_hash_v2: &[u8; 32]) -> Link {
        Link::default().btmh(info_hash_v2)
    }

    /// `magnet:?xt=urn:btih:HEX&xt=urn:btmh:1220HEX` for a hybrid torrent.
    pub fn hybrid(info_hash: &[u8; 20], info_hash_v2: &[u8; 32]) -> Link {
        Link::new(info_hash).btmh(info_hash_v2)
    }

    /// `xt=urn:btmh:1220HEX`.
    pub fn btmh(self, info_hash_v2: &[u8; 32]) -> Link {
        self.raw("xt", &format!("urn:btmh:1220{}", hex(info_hash_v2)))
    }

    /// A link with no parameter yet (for hostile ones).
    pub fn empty() -> Link {
        Link::default()
    }

    /// `dn=NAME`.
    pub fn name(self, name: &str) -> Link {
        self.param("dn", name)
    }

    /// `tr=URL`.
    pub fn tracker(self, url: &str) -> Link {
        self.param("tr", url)
    }

    /// `x.pe=IP:PORT`.
    pub fn peer(self, addr: SocketAddr) -> Link {
        self.raw("x.pe", &addr.to_string())
    }

    /// `x.pe=` for each address.
    pub fn peers(self, addrs: &[SocketAddr]) -> Link {
        addrs.iter().fold(self, |link, a| link.peer(*a))
    }

    /// `KEY=VALUE`, the value percent-encoded.
    pub fn param(self, key: &str, value: &str) -> Link {
        let encoded = url_encode(value.as_bytes());
        self.raw(key, &encoded)
    }

    /// `KEY=VALUE` written as given.
    pub fn raw(mut self, key: &str, value: &str) -> Link {
        self.params.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn uri(&self) -> String {
        let query: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("magnet:?{}", query.join("&"))
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.uri())
    }
}

/// RFC 4648 base32 (upper case, no padding: 20 bytes are exactly 32 characters).
pub fn base32(bytes: &[u8; 20]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(32);
    for chunk in bytes.chunks(5) {
        let mut word = [0u8; 8];
        word[3..3 + chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes(word);
        for i in (0..8).rev() {
            out.push(ALPHABET[((bits >> (i * 5)) & 31) as usize] as char);
        }
    }
    out
}
