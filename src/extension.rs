//! The BEP 10 extension-protocol handshake: what we say about ourselves and what we read of
//! the peer (its client name, listen port and request-queue size `reqq`). We register no
//! extension messages yet, so `m` is empty; later work (metadata, PEX) adds entries.

use std::net::IpAddr;

use bt_bencode::Value;

use crate::bencode::{self, Limits};

/// Extended message id of the handshake itself.
pub const HANDSHAKE_ID: u8 = 0;
/// The queue depth we tell peers we accept (matches our serve-queue cap with room to spare).
pub const OUR_REQQ: i64 = 250;
/// A peer claiming a larger queue is taken at this.
pub const MAX_REQQ: usize = 2048;

/// What a peer said in its extended handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Info {
    pub client: Option<String>,
    pub listen_port: Option<u16>,
    pub reqq: Option<usize>,
}

pub fn our_handshake(listen_port: u16, their_ip: IpAddr) -> Vec<u8> {
    let yourip = match their_ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bencode::encode(&bencode::dict([
        ("m", Value::Dict(Default::default())),
        ("p", bencode::int(i64::from(listen_port))),
        ("reqq", bencode::int(OUR_REQQ)),
        (
            "v",
            bencode::bytes(format!("bitfetch {}", env!("CARGO_PKG_VERSION"))),
        ),
        ("yourip", bencode::bytes(yourip)),
    ]))
}

/// Parses a peer's extended handshake. Unknown or ill-typed fields are ignored; only a
/// payload that is not a bencoded dictionary is an error.
pub fn parse_handshake(payload: &[u8]) -> Result<Info, bencode::Error> {
    let Value::Dict(d) = bencode::decode(payload, Limits::SMALL)? else {
        return Err(bencode::Error::Syntax {
            offset: 0,
            what: "extended handshake is not a dictionary",
        });
    };
    Ok(Info {
        client: bencode::get_str(&d, "v").map(|v| v.chars().take(64).collect()),
        listen_port: bencode::get_int(&d, "p")
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        reqq: bencode::get_int(&d, "reqq")
            .and_then(|q| usize::try_from(q).ok())
            .filter(|q| *q > 0)
            .map(|q| q.min(MAX_REQQ)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ours = our_handshake(6881, "127.0.0.1".parse().unwrap());
        let info = parse_handshake(&ours).unwrap();
        assert_eq!(info.listen_port, Some(6881));
        assert_eq!(info.reqq, Some(250));
        assert!(info.client.unwrap().starts_with("bitfetch"));
    }

    #[test]
    fn hostile_fields_are_ignored_or_bounded() {
        let info = parse_handshake(b"d4:reqqi99999999e1:pi-1e1:vi3ee").unwrap();
        assert_eq!(info.reqq, Some(MAX_REQQ));
        assert_eq!(info.listen_port, None);
        assert_eq!(info.client, None);
        assert!(parse_handshake(b"le").is_err());
        assert!(parse_handshake(b"d").is_err());
        assert!(parse_handshake(&vec![b'l'; 10_000]).is_err());
    }
}
