//! HTTP(S) trackers (BEP 3, BEP 23 compact peers, BEP 7 `peers6`, BEP 48 scrape).
//!
//! The query is built by [`announce_url`] and replies are read by [`parse_reply`] and
//! [`parse_scrape`]: both work on strings and bytes, so every reply shape is unit-tested
//! without a socket. Replies are hostile input: size-capped before parsing, pre-scanned, every
//! field type-checked, peer lists capped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bt_bencode::Value;

use super::{Announce, Error, Reply, ScrapeInfo, clamp_interval, finish_peers};
use crate::bencode::{self, Limits};

/// Replies larger than this are refused unread.
pub const MAX_BODY: u64 = 2 << 20;

/// Percent-encodes raw bytes for a query string (RFC 3986 unreserved characters kept).
pub fn url_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The announce URL with our query appended; a query already in the URL is kept.
pub fn announce_url(base: &str, p: &Announce) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut url = format!(
        "{base}{sep}info_hash={}&peer_id={}&port={}&uploaded={}&downloaded={}&left={}&compact=1&numwant={}&key={:08x}",
        url_encode(p.info_hash),
        url_encode(p.peer_id),
        p.port,
        p.uploaded,
        p.downloaded,
        p.left,
        p.numwant,
        p.key,
    );
    if let Some(e) = p.event.as_query() {
        url.push_str("&event=");
        url.push_str(e);
    }
    if let Some(id) = p.tracker_id {
        url.push_str("&trackerid=");
        url.push_str(&url_encode(id));
    }
    url
}

/// BEP 48: the scrape URL exists only when the last path segment starts with `announce`.
pub fn scrape_url(announce: &str, info_hash: &[u8; 20]) -> Option<String> {
    let (path, query) = match announce.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (announce, None),
    };
    let slash = path.rfind('/')?;
    let last = &path[slash + 1..];
    let rest = last.strip_prefix("announce")?;
    let mut url = format!("{}scrape{rest}", &path[..=slash]);
    url.push('?');
    if let Some(q) = query {
        url.push_str(q);
        url.push('&');
    }
    url.push_str("info_hash=");
    url.push_str(&url_encode(info_hash));
    Some(url)
}

fn decode_dict(body: &[u8]) -> Result<bencode::Dict, Error> {
    let value = bencode::decode(body, Limits::SMALL).map_err(|e| {
        Error::BadReply(if body.trim_ascii_start().first() == Some(&b'<') {
            "HTML instead of bencode".to_string()
        } else {
            e.to_string()
        })
    })?;
    match value {
        Value::Dict(d) => Ok(d),
        _ => Err(Error::BadReply("not a dictionary".into())),
    }
}

/// Compact peers (BEP 23; BEP 7 for IPv6): 6 bytes each for IPv4, 18 for IPv6, the port
/// last.
pub fn compact_peers(b: &[u8], v6: bool) -> Result<Vec<SocketAddr>, Error> {
    let (width, family) = if v6 { (18, " IPv6") } else { (6, "") };
    if !b.len().is_multiple_of(width) {
        return Err(Error::BadReply(format!(
            "compact{family} peers of {} bytes, not a multiple of {width}",
            b.len()
        )));
    }
    Ok(b.chunks_exact(width)
        .map(|c| {
            let (ip, port) = c.split_at(width - 2);
            let ip = match <[u8; 16]>::try_from(ip) {
                Ok(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
                Err(_) => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
            };
            SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]]))
        })
        .collect())
}

/// Reads an announce reply body.
pub fn parse_reply(body: &[u8]) -> Result<Reply, Error> {
    let d = decode_dict(body)?;
    if let Some(reason) = bencode::get_str(&d, "failure reason") {
        return Err(Error::Failure(reason));
    }
    let mut peers = match bencode::get(&d, "peers") {
        Some(Value::ByteStr(b)) => compact_peers(b, false)?,
        // Dictionary peers: entries that are not well-formed are skipped, not fatal.
        Some(Value::List(list)) => list.iter().filter_map(dict_peer).collect(),
        Some(_) => return Err(Error::BadReply("`peers` has the wrong type".into())),
        None => Vec::new(),
    };
    if let Some(b) = bencode::get_bytes(&d, "peers6") {
        peers.extend(compact_peers(b, true)?);
    }
    let count = |k| bencode::get_int(&d, k).and_then(|v| u64::try_from(v).ok());
    Ok(Reply {
        peers: finish_peers(peers),
        interval: bencode::get_int(&d, "interval").map_or(super::DEFAULT_INTERVAL, clamp_interval),
        min_interval: bencode::get_int(&d, "min interval").map(clamp_interval),
        warning: bencode::get_str(&d, "warning message"),
        tracker_id: bencode::get_bytes(&d, "tracker id").map(<[u8]>::to_vec),
        seeders: count("complete"),
        leechers: count("incomplete"),
    })
}

fn dict_peer(v: &Value) -> Option<SocketAddr> {
    let Value::Dict(p) = v else { return None };
    let ip = bencode::get_str(p, "ip")?;
    let port = u16::try_from(bencode::get_int(p, "port")?).ok()?;
    let ip: IpAddr = ip
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()?;
    Some(SocketAddr::new(ip, port))
}

/// Reads a scrape reply for `info_hash`.
pub fn parse_scrape(body: &[u8], info_hash: &[u8; 20]) -> Result<ScrapeInfo, Error> {
    let d = decode_dict(body)?;
    if let Some(reason) = bencode::get_str(&d, "failure reason") {
        return Err(Error::Failure(reason));
    }
    let files = bencode::get_dict(&d, "files")
        .ok_or_else(|| Error::BadReply("scrape reply has no `files`".into()))?;
    let Some(Value::Dict(entry)) = files.get(&info_hash[..]) else {
        return Err(Error::BadReply(
            "the tracker does not know this torrent".into(),
        ));
    };
    let count = |k| {
        bencode::get_int(entry, k)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0)
    };
    Ok(ScrapeInfo {
        seeders: count("complete"),
        leechers: count("incomplete"),
        completed: count("downloaded"),
    })
}

/// GETs `url`, size-capped; a non-200 status is an error unless the body carries a failure
/// reason (then that is the more useful message).
pub fn get(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, Error> {
    let mut resp = crate::http::get(agent, url).map_err(|e| match e {
        crate::http::GetError::Ureq(e) => Error::from_ureq(e),
        e => Error::Http(e.to_string()),
    })?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(Error::from_ureq)?;
    if status != 200 {
        if let Ok(d) = decode_dict(&body)
            && let Some(reason) = bencode::get_str(&d, "failure reason")
        {
            return Err(Error::Failure(reason));
        }
        return Err(Error::Status(status));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::{AnnounceEvent, MAX_INTERVAL, MIN_INTERVAL};
    use std::time::Duration;

    fn params(event: AnnounceEvent) -> Announce<'static> {
        Announce {
            info_hash: &[0x12; 20],
            peer_id: b"-BF0100-abcdefghijkl",
            port: 6881,
            uploaded: 1,
            downloaded: 2,
            left: 3,
            event,
            key: 0xabcd,
            numwant: 50,
            tracker_id: None,
        }
    }

    #[test]
    fn query_encodes_raw_bytes_and_keeps_existing_query() {
        let url = announce_url(
            "http://t/announce?passkey=x",
            &params(AnnounceEvent::Started),
        );
        assert!(url.starts_with("http://t/announce?passkey=x&info_hash=%12%12"));
        assert!(url.contains("&peer_id=-BF0100-abcdefghijkl&port=6881"));
        assert!(url.contains("&uploaded=1&downloaded=2&left=3&compact=1"));
        assert!(url.ends_with("&event=started"));
        let mut p = params(AnnounceEvent::Periodic);
        p.tracker_id = Some(b"id 1");
        let url = announce_url("http://t/a", &p);
        assert!(url.starts_with("http://t/a?info_hash="));
        assert!(!url.contains("event="));
        assert!(url.ends_with("&trackerid=id%201"));
        assert_eq!(url_encode(b"a b\xff~"), "a%20b%FF~");
    }

    #[test]
    fn scrape_urls_follow_bep_48() {
        let h = [0xab; 20];
        let enc = url_encode(&h);
        assert_eq!(
            scrape_url("http://t/announce", &h).unwrap(),
            format!("http://t/scrape?info_hash={enc}")
        );
        assert_eq!(
            scrape_url("http://t/x/announce.php?k=1", &h).unwrap(),
            format!("http://t/x/scrape.php?k=1&info_hash={enc}")
        );
        assert_eq!(scrape_url("http://t/a", &h), None);
        assert_eq!(scrape_url("http://t/announce/x", &h), None);
    }

    #[test]
    fn compact_dict_and_ipv6_peers() {
        let body = b"d8:intervali900e5:peers12:\x7f\x00\x00\x01\x1a\xe1\x7f\x00\x00\x02\x00\x006:peers618:\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x1a\xe2e";
        let r = parse_reply(body).unwrap();
        assert_eq!(
            r.peers,
            vec![
                "127.0.0.1:6881".parse().unwrap(),
                "[::1]:6882".parse().unwrap()
            ],
            "port 0 dropped"
        );
        assert_eq!(r.interval, Duration::from_secs(900));
        let body =
            b"d5:peersld2:ip9:127.0.0.14:porti80eed2:ip3:::14:porti81eed2:ip5:bogus4:porti1eee8:completei3e10:incompletei4ee";
        let r = parse_reply(body).unwrap();
        assert_eq!(
            r.peers,
            vec!["127.0.0.1:80".parse().unwrap(), "[::1]:81".parse().unwrap()]
        );
        assert_eq!((r.seeders, r.leechers), (Some(3), Some(4)));
        // Duplicates collapse.
        let r =
            parse_reply(b"d5:peers12:\x01\x02\x03\x04\x00\x01\x01\x02\x03\x04\x00\x01e").unwrap();
        assert_eq!(r.peers.len(), 1);
    }

    #[test]
    fn failures_and_malformed_replies_are_typed() {
        assert!(matches!(
            parse_reply(b"d14:failure reason6:deniede"),
            Err(Error::Failure(m)) if m == "denied"
        ));
        assert!(matches!(parse_reply(b"<html>"), Err(Error::BadReply(m)) if m.contains("HTML")));
        let bad: [&[u8]; 6] = [
            b"d5:peers5:abcdee",
            b"d6:peers65:abcdee",
            b"li1ee",
            b"d5:peersi1ee",
            b"d8:intervali-5e",
            b"",
        ];
        for reply in bad {
            assert!(
                matches!(parse_reply(reply), Err(Error::BadReply(_))),
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
        let r = parse_reply(b"d8:intervali-5ee").unwrap();
        assert_eq!(r.interval, MIN_INTERVAL);
        let r = parse_reply(b"d8:intervali0ee").unwrap();
        assert_eq!(r.interval, MIN_INTERVAL);
        let r = parse_reply(b"d8:intervali2147483648ee").unwrap();
        assert_eq!(r.interval, MAX_INTERVAL);
        let r = parse_reply(b"d15:warning message4:hmm!e").unwrap();
        assert!(r.peers.is_empty());
        assert_eq!(r.warning.as_deref(), Some("hmm!"));
    }

    #[test]
    fn huge_peer_lists_are_capped() {
        let mut body = b"d5:peers".to_vec();
        let n = 500_000usize;
        body.extend(format!("{}:", n * 6).as_bytes());
        for i in 0..n as u32 {
            body.extend(i.to_be_bytes());
            body.extend(1u16.to_be_bytes());
        }
        body.push(b'e');
        // Over the body cap of a real request, but the parser itself must also cope.
        let r = parse_reply(&body);
        assert!(r.is_err() || r.unwrap().peers.len() <= super::super::MAX_PEERS);
    }

    #[test]
    fn scrape_replies() {
        let h = [7u8; 20];
        let mut body = b"d5:filesd20:".to_vec();
        body.extend_from_slice(&h);
        body.extend_from_slice(b"d8:completei5e10:downloadedi50e10:incompletei10eeee");
        assert_eq!(
            parse_scrape(&body, &h).unwrap(),
            ScrapeInfo {
                seeders: 5,
                leechers: 10,
                completed: 50
            }
        );
        assert!(parse_scrape(&body, &[8u8; 20]).is_err());
        assert!(parse_scrape(b"de", &h).is_err());
    }
}
