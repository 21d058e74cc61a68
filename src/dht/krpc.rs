//! KRPC messages (BEP 5, with BEP 32's `nodes6` and `want`) on byte slices, no sockets.
//!
//! [`decode`] is the one door for bytes from the network: a size check, then the bencode
//! pre-scan with limits fitted to a UDP datagram, then a field-by-field read that checks every
//! type. Lists a peer controls are truncated to fixed caps while reading, so nothing is ever
//! allocated from a size the sender declared.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bt_bencode::Value;

use crate::bencode::{self, Dict, Limits};

pub(crate) type NodeId = [u8; 20];

/// Larger datagrams are dropped unread; a real KRPC message fits in one Ethernet frame.
pub(crate) const MAX_PACKET: usize = 2048;
/// Transaction ids we echo back; ours are 2 bytes.
pub(crate) const MAX_TID: usize = 16;
/// `nodes` / `nodes6` entries read from one message (a well-behaved node sends 8).
pub(crate) const MAX_NODES: usize = 16;
/// `values` entries read from one message.
pub(crate) const MAX_VALUES: usize = 200;
pub(crate) const MAX_TOKEN: usize = 64;
const MAX_ERROR_TEXT: usize = 128;
/// Our `v` key: "BF" and two version bytes.
pub(crate) const VERSION: [u8; 4] = *b"BF\x00\x01";

/// Depth: message dict → argument dict → `values`/`want`/`e` list → string.
const LIMITS: Limits = Limits {
    max_size: MAX_PACKET,
    max_depth: 4,
    max_tokens: 600,
};

pub(crate) const ERR_GENERIC: i64 = 201;
pub(crate) const ERR_PROTOCOL: i64 = 203;
pub(crate) const ERR_METHOD: i64 = 204;

/// A node as compact node info names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Contact {
    pub id: NodeId,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    pub tid: Vec<u8>,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    Query(Query),
    Response(Response),
    Error { code: i64, text: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    pub id: NodeId,
    pub method: Method,
    pub want: Want,
    /// BEP 43 read-only node: answer it, never add it to the table.
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Method {
    Ping,
    FindNode {
        target: NodeId,
    },
    GetPeers {
        info_hash: NodeId,
    },
    AnnouncePeer {
        info_hash: NodeId,
        port: u16,
        implied_port: bool,
        token: Vec<u8>,
    },
}

/// BEP 32 `want`: which families of nodes the querier asks for (neither = its own family).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Want {
    pub v4: bool,
    pub v6: bool,
}

/// A response's fields; which ones matter depends on the query it answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Response {
    pub id: NodeId,
    pub nodes: Vec<Contact>,
    pub nodes6: Vec<Contact>,
    pub values: Vec<SocketAddr>,
    pub token: Option<Vec<u8>>,
}

/// Why a datagram was refused. `reply` is set when the sender asked a question we can answer
/// with an error (a query with a transaction id); anything else is dropped in silence, so two
/// nodes can never ping-pong errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError {
    pub what: &'static str,
    pub reply: Option<(Vec<u8>, i64)>,
    /// The transaction id, when there was a readable one (a broken answer to our query is
    /// matched to it, and the sender marked bad).
    pub tid: Option<Vec<u8>>,
}

impl DecodeError {
    fn bare(what: &'static str) -> DecodeError {
        DecodeError {
            what,
            reply: None,
            tid: None,
        }
    }
}

pub(crate) fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    if buf.len() > MAX_PACKET {
        return Err(DecodeError::bare("datagram too large"));
    }
    let Ok(Value::Dict(top)) = bencode::decode(buf, LIMITS) else {
        return Err(DecodeError::bare("not a bencoded dictionary"));
    };
    let tid = match bencode::get_bytes(&top, "t") {
        Some(t) if !t.is_empty() && t.len() <= MAX_TID => t.to_vec(),
        _ => return Err(DecodeError::bare("missing or oversized transaction id")),
    };
    let fail = |what, code: Option<i64>| DecodeError {
        what,
        reply: code.map(|c| (tid.clone(), c)),
        tid: Some(tid.clone()),
    };
    let body = match bencode::get_bytes(&top, "y") {
        Some(b"q") => Body::Query(decode_query(&top).map_err(|(w, c)| fail(w, Some(c)))?),
        Some(b"r") => Body::Response(decode_response(&top).map_err(|w| fail(w, None))?),
        Some(b"e") => decode_error(&top),
        _ => return Err(fail("unknown message type", None)),
    };
    Ok(Message { tid, body })
}

fn id_field(d: &Dict, key: &str) -> Option<NodeId> {
    bencode::get_bytes(d, key)?.try_into().ok()
}

fn decode_query(top: &Dict) -> Result<Query, (&'static str, i64)> {
    let proto = |w| (w, ERR_PROTOCOL);
    let args = bencode::get_dict(top, "a").ok_or(proto("query without arguments"))?;
    let id = id_field(args, "id").ok_or(proto("query without a 20-byte id"))?;
    let method = match bencode::get_bytes(top, "q") {
        Some(b"ping") => Method::Ping,
        Some(b"find_node") => Method::FindNode {
            target: id_field(args, "target").ok_or(proto("find_node without a target"))?,
        },
        Some(b"get_peers") => Method::GetPeers {
            info_hash: id_field(args, "info_hash").ok_or(proto("get_peers without info_hash"))?,
        },
        Some(b"announce_peer") => decode_announce(args)?,
        Some(_) => return Err(("unknown method", ERR_METHOD)),
        None => return Err(proto("query without a method")),
    };
    Ok(Query {
        id,
        method,
        want: decode_want(args),
        read_only: bencode::get_int(top, "ro") == Some(1),
    })
}

fn decode_announce(args: &Dict) -> Result<Method, (&'static str, i64)> {
    let proto = |w| (w, ERR_PROTOCOL);
    let info_hash = id_field(args, "info_hash").ok_or(proto("announce without info_hash"))?;
    let implied_port = bencode::get_int(args, "implied_port").is_some_and(|v| v != 0);
    let port = bencode::get_int(args, "port")
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(0);
    if port == 0 && !implied_port {
        return Err(proto("announce without a valid port"));
    }
    let token = bencode::get_bytes(args, "token")
        .filter(|t| t.len() <= MAX_TOKEN)
        .ok_or(proto("announce without a token"))?;
    Ok(Method::AnnouncePeer {
        info_hash,
        port,
        implied_port,
        token: token.to_vec(),
    })
}

fn decode_want(args: &Dict) -> Want {
    let mut want = Want::default();
    for item in bencode::get_list(args, "want").unwrap_or_default() {
        match item {
            Value::ByteStr(b) if b.as_slice() == b"n4" => want.v4 = true,
            Value::ByteStr(b) if b.as_slice() == b"n6" => want.v6 = true,
            _ => {}
        }
    }
    want
}

fn decode_response(top: &Dict) -> Result<Response, &'static str> {
    let r = bencode::get_dict(top, "r").ok_or("response without a body")?;
    let id = id_field(r, "id").ok_or("response without a 20-byte id")?;
    let nodes = match bencode::get(r, "nodes") {
        None => Vec::new(),
        Some(Value::ByteStr(b)) => parse_nodes(b.as_slice(), false)?,
        Some(_) => return Err("nodes is not a string"),
    };
    let nodes6 = match bencode::get(r, "nodes6") {
        None => Vec::new(),
        Some(Value::ByteStr(b)) => parse_nodes(b.as_slice(), true)?,
        Some(_) => return Err("nodes6 is not a string"),
    };
    let values = match bencode::get(r, "values") {
        None => Vec::new(),
        Some(Value::List(l)) => l
            .iter()
            .filter_map(|v| match v {
                Value::ByteStr(b) => parse_peer(b.as_slice()),
                _ => None,
            })
            .take(MAX_VALUES)
            .collect(),
        Some(_) => return Err("values is not a list"),
    };
    let token = match bencode::get(r, "token") {
        None => None,
        Some(Value::ByteStr(b)) if b.len() <= MAX_TOKEN => Some(b.to_vec()),
        Some(_) => return Err("bad token"),
    };
    Ok(Response {
        id,
        nodes,
        nodes6,
        values,
        token,
    })
}

fn decode_error(top: &Dict) -> Body {
    // Errors are only ever logged as a failed query; read them leniently.
    let list = bencode::get_list(top, "e").unwrap_or_default();
    let code = match list.first() {
        Some(Value::Int(n)) => bencode::number_to_i64(n).unwrap_or(ERR_GENERIC),
        _ => ERR_GENERIC,
    };
    let text = match list.get(1) {
        Some(Value::ByteStr(b)) => b.as_slice()[..b.len().min(MAX_ERROR_TEXT)].to_vec(),
        _ => Vec::new(),
    };
    Body::Error { code, text }
}

/// Compact node info: 26 bytes (IPv4) or 38 bytes (IPv6) each. A length that is not a multiple
/// is a broken message; entries past [`MAX_NODES`] are ignored.
pub(crate) fn parse_nodes(b: &[u8], v6: bool) -> Result<Vec<Contact>, &'static str> {
    let size = if v6 { 38 } else { 26 };
    if !b.len().is_multiple_of(size) {
        return Err("compact node info of a wrong length");
    }
    Ok(b.chunks_exact(size)
        .take(MAX_NODES)
        .filter_map(|c| {
            let id: NodeId = c[..20].try_into().ok()?;
            Some(Contact {
                id,
                addr: parse_peer(&c[20..])?,
            })
        })
        .collect())
}

/// A compact peer: 6 bytes (IPv4 and port) or 18 bytes (IPv6 and port).
pub(crate) fn parse_peer(b: &[u8]) -> Option<SocketAddr> {
    match b.len() {
        6 => {
            let ip: [u8; 4] = b[..4].try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(ip)),
                u16::from_be_bytes([b[4], b[5]]),
            ))
        }
        18 => {
            let ip: [u8; 16] = b[..16].try_into().ok()?;
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(ip)),
                u16::from_be_bytes([b[16], b[17]]),
            ))
        }
        _ => None,
    }
}

pub(crate) fn compact_peer(addr: SocketAddr) -> Vec<u8> {
    let mut out = match addr.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// The contacts of one family (`v6` or not), in compact form; others are skipped.
pub(crate) fn compact_nodes(contacts: &[Contact], v6: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for c in contacts.iter().filter(|c| c.addr.is_ipv6() == v6) {
        out.extend_from_slice(&c.id);
        out.extend_from_slice(&compact_peer(c.addr));
    }
    out
}

pub(crate) fn encode(msg: &Message) -> Vec<u8> {
    let mut entries = vec![
        ("t", bencode::bytes(msg.tid.clone())),
        ("v", bencode::bytes(VERSION.to_vec())),
    ];
    match &msg.body {
        Body::Query(q) => {
            entries.push(("y", bencode::bytes(b"q".to_vec())));
            let (name, args) = query_args(q);
            entries.push(("q", bencode::bytes(name.as_bytes().to_vec())));
            entries.push(("a", bencode::dict(args)));
            if q.read_only {
                entries.push(("ro", bencode::int(1)));
            }
        }
        Body::Response(r) => {
            entries.push(("y", bencode::bytes(b"r".to_vec())));
            entries.push(("r", bencode::dict(response_fields(r))));
        }
        Body::Error { code, text } => {
            entries.push(("y", bencode::bytes(b"e".to_vec())));
            entries.push((
                "e",
                Value::List(vec![bencode::int(*code), bencode::bytes(text.clone())]),
            ));
        }
    }
    bencode::encode(&bencode::dict(entries))
}

fn query_args(q: &Query) -> (&'static str, Vec<(&'static str, Value)>) {
    let mut args = vec![("id", bencode::bytes(q.id.to_vec()))];
    let name = match &q.method {
        Method::Ping => "ping",
        Method::FindNode { target } => {
            args.push(("target", bencode::bytes(target.to_vec())));
            "find_node"
        }
        Method::GetPeers { info_hash } => {
            args.push(("info_hash", bencode::bytes(info_hash.to_vec())));
            "get_peers"
        }
        Method::AnnouncePeer {
            info_hash,
            port,
            implied_port,
            token,
        } => {
            args.push(("info_hash", bencode::bytes(info_hash.to_vec())));
            args.push(("port", bencode::int(i64::from(*port))));
            args.push(("implied_port", bencode::int(i64::from(*implied_port))));
            args.push(("token", bencode::bytes(token.clone())));
            "announce_peer"
        }
    };
    let mut want = Vec::new();
    if q.want.v4 {
        want.push(bencode::bytes(b"n4".to_vec()));
    }
    if q.want.v6 {
        want.push(bencode::bytes(b"n6".to_vec()));
    }
    if !want.is_empty() {
        args.push(("want", Value::List(want)));
    }
    (name, args)
}

fn response_fields(r: &Response) -> Vec<(&'static str, Value)> {
    let mut fields = vec![("id", bencode::bytes(r.id.to_vec()))];
    if !r.nodes.is_empty() {
        fields.push(("nodes", bencode::bytes(compact_nodes(&r.nodes, false))));
    }
    if !r.nodes6.is_empty() {
        fields.push(("nodes6", bencode::bytes(compact_nodes(&r.nodes6, true))));
    }
    if !r.values.is_empty() {
        let values = r
            .values
            .iter()
            .map(|p| bencode::bytes(compact_peer(*p)))
            .collect();
        fields.push(("values", Value::List(values)));
    }
    if let Some(token) = &r.token {
        fields.push(("token", bencode::bytes(token.clone())));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contact(n: u8, addr: &str) -> Contact {
        Contact {
            id: [n; 20],
            addr: addr.parse().unwrap(),
        }
    }

    fn round_trip(body: Body) {
        let msg = Message {
            tid: b"ab".to_vec(),
            body,
        };
        let bytes = encode(&msg);
        assert!(bytes.len() <= MAX_PACKET);
        assert_eq!(decode(&bytes), Ok(msg));
    }

    #[test]
    fn queries_round_trip() {
        let want = Want { v4: true, v6: true };
        for method in [
            Method::Ping,
            Method::FindNode { target: [7; 20] },
            Method::GetPeers { info_hash: [8; 20] },
        ] {
            round_trip(Body::Query(Query {
                id: [1; 20],
                method,
                want,
                read_only: true,
            }));
        }
        round_trip(Body::Query(Query {
            id: [1; 20],
            method: Method::AnnouncePeer {
                info_hash: [9; 20],
                port: 6881,
                implied_port: false,
                token: b"tok".to_vec(),
            },
            want: Want::default(),
            read_only: false,
        }));
    }

    #[test]
    fn responses_and_errors_round_trip() {
        round_trip(Body::Response(Response {
            id: [2; 20],
            nodes: vec![contact(3, "1.2.3.4:5"), contact(4, "5.6.7.8:9")],
            nodes6: vec![contact(5, "[2001:db8::1]:6881")],
            values: vec!["9.9.9.9:1".parse().unwrap(), "[::2]:3".parse().unwrap()],
            token: Some(b"secret".to_vec()),
        }));
        round_trip(Body::Error {
            code: ERR_PROTOCOL,
            text: b"bad token".to_vec(),
        });
    }

    #[test]
    fn a_known_message_from_bep5_decodes() {
        let ping = b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe";
        let m = decode(ping).unwrap();
        assert_eq!(m.tid, b"aa");
        let Body::Query(q) = m.body else { panic!() };
        assert_eq!(q.id, *b"abcdefghij0123456789");
        assert_eq!(q.method, Method::Ping);
    }

    #[test]
    fn hostile_inputs_are_refused_without_a_reply_unless_a_query() {
        let too_big = vec![b'0'; MAX_PACKET + 1];
        for bad in [
            &b""[..],
            b"le",
            b"i1e",
            b"d1:y1:qe",
            b"d1:t0:1:y1:qe",
            b"d1:t17:aaaaaaaaaaaaaaaaa1:y1:qe",
            b"d1:t2:aa1:y1:xe",
            b"llllllllllllllllee",
            &too_big,
        ] {
            let e = decode(bad).unwrap_err();
            assert_eq!(e.reply, None, "{bad:?}");
        }
        // A query with a short id or unknown method is answered with an error.
        let e = decode(b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe").unwrap_err();
        assert_eq!(e.reply, Some((b"aa".to_vec(), ERR_PROTOCOL)));
        let e = decode(b"d1:ad2:id20:abcdefghij0123456789e1:q3:foo1:t2:aa1:y1:qe").unwrap_err();
        assert_eq!(e.reply, Some((b"aa".to_vec(), ERR_METHOD)));
        // announce_peer with port 0 and no implied_port.
        let a = b"d1:ad2:id20:abcdefghij01234567899:info_hash20:abcdefghij01234567894:porti0e5:token1:xe1:q13:announce_peer1:t2:aa1:y1:qe";
        assert_eq!(decode(a).unwrap_err().reply.unwrap().1, ERR_PROTOCOL);
        // A response with a truncated node entry is broken, and carries its tid for matching.
        let r = b"d1:rd2:id20:abcdefghij01234567895:nodes3:abce1:t2:aa1:y1:re";
        let e = decode(r).unwrap_err();
        assert_eq!((e.reply, e.tid), (None, Some(b"aa".to_vec())));
    }

    #[test]
    fn lists_are_truncated_to_their_caps() {
        let mut nodes = Vec::new();
        for i in 0..40u8 {
            nodes.extend_from_slice(&[i; 20]);
            nodes.extend_from_slice(&[10, 0, 0, i, 0, 1]);
        }
        let mut doc = b"d1:rd2:id20:abcdefghij01234567895:nodes1040:".to_vec();
        doc.extend_from_slice(&nodes);
        doc.extend_from_slice(b"e1:t2:aa1:y1:re");
        let Body::Response(r) = decode(&doc).unwrap().body else {
            panic!()
        };
        assert_eq!(r.nodes.len(), MAX_NODES);
        let mut doc = b"d1:rd2:id20:abcdefghij01234567896:valuesl".to_vec();
        for _ in 0..210 {
            doc.extend_from_slice(b"6:\x01\x02\x03\x04\x00\x01");
        }
        doc.extend_from_slice(b"3:badee1:t2:aa1:y1:re");
        let Body::Response(r) = decode(&doc).unwrap().body else {
            panic!()
        };
        assert_eq!(r.values.len(), MAX_VALUES);
    }

    #[test]
    fn want_is_read_from_a_list_of_strings() {
        let q = b"d1:ad2:id20:abcdefghij01234567896:target20:abcdefghij01234567894:wantl2:n62:zz1:xee1:q9:find_node1:t2:aa1:y1:qe";
        let Body::Query(q) = decode(q).unwrap().body else {
            panic!()
        };
        assert_eq!(
            q.want,
            Want {
                v4: false,
                v6: true
            }
        );
    }
}
