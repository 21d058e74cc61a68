//! The BEP 10 extension-protocol handshake: what we say about ourselves and what we read of
//! the peer (its client name, listen port, request-queue size `reqq`, and the BEP 9 metadata
//! exchange: its `ut_metadata` message id and `metadata_size`; BEP 11 peer exchange: its
//! `ut_pex` id). We register `ut_metadata` under [`UT_METADATA_ID`] and `ut_pex` under
//! [`UT_PEX_ID`].

use std::net::IpAddr;

use bt_bencode::Value;

use crate::bencode::{self, Limits};

/// Extended message id of the handshake itself.
pub const HANDSHAKE_ID: u8 = 0;
/// The id under which peers send us `ut_metadata` messages (our `m` dictionary).
pub const UT_METADATA_ID: u8 = 2;
/// The id under which peers send us `ut_pex` messages (BEP 11), when we offer it.
pub const UT_PEX_ID: u8 = 1;
/// The queue depth we tell peers we accept (below our serve-queue cap, with room to spare). A
/// queued request costs a few bytes (the block is read from the map when sent), and a peer
/// behind a long fat pipe needs rate × RTT of them in flight: 2,000 blocks keep 64 MiB/s going
/// over a 400 ms round trip. libtorrent 2.0 accepts as many.
pub const OUR_REQQ: i64 = 2000;
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
    /// The id the peer wants our `ut_pex` messages under (it takes peer exchange).
    pub ut_pex: Option<u8>,
}

/// What our handshake says about `ut_pex`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PexOffer {
    /// Offered under [`UT_PEX_ID`].
    Offer,
    /// Not mentioned (PEX off, or a private torrent).
    Omit,
    /// Turned off (`ut_pex: 0`): an update after a handshake that offered it (a magnet's
    /// torrent that turned out private).
    Withdraw,
}

/// Our handshake; `metadata_size` once we have the info dictionary (BEP 9: leave it out
/// while fetching it).
pub fn our_handshake(
    listen_port: u16,
    their_ip: IpAddr,
    metadata_size: Option<usize>,
    pex: PexOffer,
) -> Vec<u8> {
    let yourip = match their_ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let mut m = vec![("ut_metadata", bencode::int(i64::from(UT_METADATA_ID)))];
    match pex {
        PexOffer::Offer => m.push(("ut_pex", bencode::int(i64::from(UT_PEX_ID)))),
        PexOffer::Withdraw => m.push(("ut_pex", bencode::int(0))),
        PexOffer::Omit => {}
    }
    let m = bencode::dict(m);
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
        ut_pex: bencode::get_dict(&d, "m")
            .and_then(|m| bencode::get_int(m, "ut_pex"))
            .and_then(|id| u8::try_from(id).ok())
            .filter(|id| *id != 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let ours = our_handshake(
            6881,
            "127.0.0.1".parse().unwrap(),
            Some(1234),
            PexOffer::Offer,
        );
        let info = parse_handshake(&ours).unwrap();
        assert_eq!(info.ut_metadata, Some(UT_METADATA_ID));
        assert_eq!(info.ut_pex, Some(UT_PEX_ID));
        assert_eq!(info.metadata_size, Some(1234));
        let fetching = parse_handshake(&our_handshake(
            1,
            "::1".parse().unwrap(),
            None,
            PexOffer::Omit,
        ))
        .unwrap();
        assert_eq!(fetching.metadata_size, None);
        assert_eq!(fetching.ut_pex, None);
        assert_eq!(info.listen_port, Some(6881));
        assert_eq!(info.reqq, Some(OUR_REQQ as usize));
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
        let no_pex = parse_handshake(b"d1:md6:ut_pexi0eee").unwrap();
        assert_eq!(no_pex.ut_pex, None, "id 0 turns PEX off");
        assert_eq!(parse_handshake(b"d1:md6:ut_pexi256eee").unwrap().ut_pex, None);
        assert!(parse_handshake(b"le").is_err());
        assert!(parse_handshake(b"d").is_err());
        assert!(parse_handshake(&vec![b'l'; 10_000]).is_err());
    }

    #[test]
    fn pex_is_offered_omitted_or_withdrawn() {
        let ip = "127.0.0.1".parse().unwrap();
        let said = |pex| String::from_utf8_lossy(&our_handshake(1, ip, None, pex)).into_owned();
        assert!(said(PexOffer::Offer).contains("6:ut_pexi1e"));
        assert!(!said(PexOffer::Omit).contains("ut_pex"));
        assert!(said(PexOffer::Withdraw).contains("6:ut_pexi0e"));
    }
}
