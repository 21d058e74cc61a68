//! The BEP 10 extension-protocol handshake: what we say about ourselves and what we read of
//! the peer (its client name, listen port, request-queue size `reqq`, and the BEP 9 metadata
//! exchange: its `ut_metadata` message id and `metadata_size`). We register `ut_metadata`
//! under [`UT_METADATA_ID`].

use std::net::IpAddr;

use bt_bencode::Value;

use crate::bencode::{self, Limits};

/// Extended message id of the handshake itself.
pub const HANDSHAKE_ID: u8 = 0;
/// The id under which peers send us `ut_metadata` messages (our `m` dictionary).
pub const UT_METADATA_ID: u8 = 2;
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
    /// The id the peer wants our `ut_metadata` messages under (it can serve and take them).
    pub ut_metadata: Option<u8>,
    /// The size of the info dictionary, as the peer says (unchecked: see `metadata`).
    pub metadata_size: Option<i64>,
}

/// Our handshake; `metadata_size` once we have the info dictionary (BEP 9: leave it out
/// while fetching it).
pub fn our_handshake(listen_port: u16, their_ip: IpAddr, metadata_size: Option<usize>) -> Vec<u8> {
    let yourip = match their_ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let m = bencode::dict([("ut_metadata", bencode::int(i64::from(UT_METADATA_ID)))]);
    let mut entries = vec![
        ("m", m),
        ("p", bencode::int(i64::from(listen_port))),
        ("reqq", bencode::int(OUR_REQQ)),
        (
            "v",
            bencode::bytes(format!("bitfetch {}", env!("CARGO_PKG_VERSION"))),
        ),
        ("yourip", bencode::bytes(yourip)),
    ];
    if let Some(size) = metadata_size {
        entries.push(("metadata_size", bencode::int(size as i64)));
    }
    entries.sort_by_key(|(k, _)| *k);
    bencode::encode(&bencode::dict(entries))
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
        // BEP 10: id 0 in `m` means the peer turned the extension off.
        ut_metadata: bencode::get_dict(&d, "m")
            .and_then(|m| bencode::get_int(m, "ut_metadata"))
            .and_then(|id| u8::try_from(id).ok())
            .filter(|id| *id != 0),
        metadata_size: bencode::get_int(&d, "metadata_size"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ours = our_handshake(6881, "127.0.0.1".parse().unwrap(), Some(1234));
        let info = parse_handshake(&ours).unwrap();
        assert_eq!(info.ut_metadata, Some(UT_METADATA_ID));
        assert_eq!(info.metadata_size, Some(1234));
        let fetching = parse_handshake(&our_handshake(1, "::1".parse().unwrap(), None)).unwrap();
        assert_eq!(fetching.metadata_size, None);
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
        let off = parse_handshake(b"d1:md11:ut_metadatai0ee13:metadata_sizei-5ee").unwrap();
        assert_eq!(off.ut_metadata, None, "id 0 turns the extension off");
        assert_eq!(off.metadata_size, Some(-5), "checked by the fetch, not here");
        let big = parse_handshake(b"d1:md11:ut_metadatai300eee").unwrap();
        assert_eq!(big.ut_metadata, None);
        assert!(parse_handshake(b"le").is_err());
        assert!(parse_handshake(b"d").is_err());
        assert!(parse_handshake(&vec![b'l'; 10_000]).is_err());
    }
}
