//! Fuzz targets: one function per parser that reads bytes from outside (torrent files, peers,
//! trackers, path elements, magnet links, the metadata exchange, DHT datagrams), and one for a connection's
//! command queue, which the peer's requests and cancels fill (`outbox.rs` beside this file).
//!
//! Each function takes arbitrary bytes, must never panic, and checks with `assert!` the
//! properties its parser promises, so a broken promise is a crash the fuzzer reports. The
//! cargo-fuzz project in `tests/fuzz/` calls them from libFuzzer (`scripts/fuzz`), and
//! `regressions.rs` beside this file replays the seed corpora and every saved crasher through them
//! on each `cargo test`.
//!
//! Every body runs on a fresh thread with a 2 MiB stack and a panic there is re-raised on the
//! caller, so a nesting bomb that would overflow a worker thread's stack overflows this one
//! too (an abort the fuzzer catches), instead of being hidden by a larger main-thread stack.

mod outbox;
#[cfg(test)]
mod regressions;

pub use outbox::{OutboxTally, outbox, run_outbox};

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic;
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use bt_bencode::Value;
use sha1::{Digest, Sha1};

use crate::bencode::{self, Limits};
use crate::extension;
use crate::geometry::{BLOCK_LEN, Geometry, PieceIndex};
use crate::hash_msg::{self, OwnedTree};
use crate::magnet::{self, Magnet, PeerAddr};
use crate::messages::PeerEvent;
use crate::metadata::{self, MetadataFetch, Outcome};
use crate::metainfo::{self, Metainfo};
use crate::outbox::{self as peer_outbox, HashWork};
use crate::path_safety;
use crate::peer::{self, PeerError};
use crate::picker::PeerKey;
use crate::storage::{Layout, Storage};
use crate::tracker::{self, MAX_INTERVAL, MAX_PEERS, MIN_INTERVAL, Reply};
use crate::wire::{self, Frame, Message};

/// The most pieces for which the wire target also replays the frames on a v2 torrent.
pub const V2_MAX_PIECES: u32 = 4096;

/// Stack of the thread each target body runs on.
pub const STACK_SIZE: usize = 2 << 20;

/// The info hash `tracker_http` asks a scrape reply about; seed scrape replies use it.
pub const SCRAPE_INFO_HASH: [u8; 20] = [0x11; 20];

/// Runs `body(data)` on a fresh thread with a [`STACK_SIZE`] stack; a panic there is resumed
/// here, so the caller (libFuzzer, a test) sees it as its own.
pub fn on_small_stack(data: &[u8], body: fn(&[u8])) {
    let outcome = thread::scope(|scope| {
        thread::Builder::new()
            .name("fuzz-target".into())
            .stack_size(STACK_SIZE)
            .spawn_scoped(scope, || body(data))
            .expect("spawning the fuzz thread")
            .join()
    });
    if let Err(payload) = outcome {
        panic::resume_unwind(payload);
    }
}

// ---------------------------------------------------------------------------------------------
// metainfo: bencode pre-scan, decode, .torrent parsing
// ---------------------------------------------------------------------------------------------

/// Bencode and `.torrent` parsing.
pub fn metainfo(data: &[u8]) {
    on_small_stack(data, metainfo_body);
}

fn metainfo_body(data: &[u8]) {
    check_bencode(data, Limits::SMALL);
    check_bencode(data, Limits::METAINFO);
    if let Ok(m) = Metainfo::from_bytes(data) {
        check_metainfo(data, &m);
    }
}

fn check_bencode(data: &[u8], limits: Limits) {
    let scanned = bencode::prescan(data, limits);
    let decoded = bencode::decode(data, limits);
    match (&scanned, &decoded) {
        (Err(a), Err(b)) => assert_eq!(a, b, "decode must fail the way the pre-scan did"),
        (Ok(()), _) => {}
        (Err(_), Ok(_)) => panic!("decode accepted what the pre-scan refused"),
    }
    let Ok(value) = decoded else { return };
    // The canonical re-encoding is itself within the limits and is a fixed point.
    let canonical = bencode::encode(&value);
    assert!(canonical.len() <= data.len(), "canonical form grew");
    let again = bencode::decode(&canonical, limits).expect("canonical form decodes");
    assert_eq!(
        bencode::encode(&again),
        canonical,
        "re-encoding is not stable"
    );
    // Every raw span of a top-level value is itself one whole value.
    if let Value::Dict(top) = &value {
        for key in top.keys().take(8) {
            let span = bencode::dict_value_span(data, key.as_slice(), limits)
                .expect("a key of the decoded dict has a raw span");
            assert!(
                bencode::prescan(span, limits).is_ok(),
                "span is not one value"
            );
        }
    }
}

fn check_metainfo(data: &[u8], m: &Metainfo) {
    // The info hash is over the raw bytes of the very `info` dict the fields were read from.
    let raw_info = bencode::dict_value_span(data, b"info", Limits::METAINFO).expect("raw info");
    let hash: [u8; 20] = match &m.v2 {
        // A v2-only torrent's swarm is named by its SHA-256, cut to 20 bytes.
        Some(v2) if m.version == crate::metainfo::Version::V2 => {
            let full: [u8; 32] = sha2::Sha256::digest(raw_info).into();
            assert_eq!(
                v2.info_hash, full,
                "v2 info hash is not over the raw info bytes"
            );
            full[..20].try_into().expect("20 of 32")
        }
        _ => Sha1::digest(raw_info).into(),
    };
    assert_eq!(
        m.info_hash, hash,
        "info hash is not over the raw info bytes"
    );
    let Ok(Value::Dict(top)) = bencode::decode(data, Limits::METAINFO) else {
        panic!("a parsed torrent does not decode");
    };
    let parsed_info = bencode::get(&top, "info").expect("info");
    let hashed_info = bencode::decode(raw_info, Limits::METAINFO).expect("raw info decodes");
    assert_eq!(
        bencode::encode(parsed_info),
        bencode::encode(&hashed_info),
        "the info hash covers a different `info` than the one parsed"
    );

    assert!(!m.name.is_empty());
    assert_single_normal_component(&m.name);
    for tier in &m.trackers {
        assert!(!tier.is_empty(), "empty announce tier");
        assert!(tier.iter().all(|u| !u.is_empty() && u.trim() == u));
    }
    check_files(m);
    check_geometry(m);
}

fn check_files(m: &Metainfo) {
    assert!(!m.files.is_empty() && m.files.len() <= metainfo::MAX_FILES);
    if !m.multi_file {
        // One file, and for a v2-only torrent the pad that ends its last piece.
        assert_eq!(m.content_files().count(), 1);
        assert!(m.files[1..].iter().all(|f| f.pad) && m.files.len() <= 2);
        assert_eq!(m.files[0].path, PathBuf::from(&m.name));
    }
    let mut paths = HashSet::new();
    for f in &m.files {
        assert_relative_normal(&f.path);
        let depth = f.path.components().count();
        assert!(depth <= metainfo::MAX_PATH_DEPTH + 1, "path too deep");
        if m.multi_file {
            assert!(
                depth >= 2,
                "a multi-file path has no element under the name"
            );
        }
        assert_eq!(
            f.path.components().next(),
            Some(Component::Normal(m.name.as_ref())),
            "file outside the torrent's directory"
        );
        // Pad files are never on disk: libtorrent names many of them alike.
        assert!(
            f.pad || paths.insert(f.path.clone()),
            "duplicate path {:?}",
            f.path
        );
        assert!(!(f.pad && f.symlink.is_some()), "a pad file that is a link");
    }
    // No file is also a directory of another file (pads are never on disk).
    for f in m.files.iter().filter(|f| !f.pad) {
        for dir in f.path.ancestors().skip(1) {
            assert!(!paths.contains(dir), "{dir:?} is a file and a directory");
        }
    }
}

fn check_geometry(m: &Metainfo) {
    let g = &m.geometry;
    let piece_len = u64::from(g.nominal_piece_len());
    assert!(piece_len > 0 && piece_len <= metainfo::MAX_PIECE_LEN);
    let mut total = 0u64;
    assert_eq!(g.file_count(), m.files.len());
    for (i, f) in m.files.iter().enumerate() {
        assert_eq!(g.file_len(i), f.len);
        assert_eq!(g.file_start(i), total, "files are not contiguous");
        total = total.checked_add(f.len).expect("total length overflows");
    }
    assert_eq!(
        m.total_len(),
        total,
        "total length is not the sum of the files"
    );
    let count = u64::from(g.piece_count());
    assert_eq!(
        count,
        total.div_ceil(piece_len),
        "piece count does not fit the length"
    );
    assert!(count <= metainfo::MAX_PIECES);
    assert!(g.piece(g.piece_count()).is_none());
    let last = g.piece_count().checked_sub(1).and_then(|i| g.piece(i));
    for piece in g.piece(0).into_iter().chain(last) {
        let _ = m.piece_hash(piece); // in range of the hash list
        check_piece(g, piece);
        // Checking any bytes as the piece ends in a verdict, never a panic.
        let _ = m.piece_ok(piece, &vec![0; g.piece_len(piece) as usize]);
    }
    check_v2(m);
}

/// A v2 part describes files that start pieces, in order, inside the geometry.
fn check_v2(m: &Metainfo) {
    let Some(v2) = &m.v2 else {
        if let Some(p) = m.geometry.piece(0) {
            assert!(
                m.piece_hash(p).is_some(),
                "a v1 torrent without piece hashes"
            );
        }
        return;
    };
    let g = &m.geometry;
    let piece_len = u64::from(g.nominal_piece_len());
    let mut last = None;
    for f in &v2.files {
        assert!(!m.files[f.file].pad && f.len == g.file_len(f.file) && f.len > 0);
        assert_eq!(u64::from(f.first_piece) * piece_len, g.file_start(f.file));
        assert!(last < Some(f.file), "v2 files out of order");
        last = Some(f.file);
        assert!(f.layer.is_empty() || f.layer.len() as u32 == f.piece_count(g.nominal_piece_len()));
        let piece = g.piece(f.first_piece).expect("the file's first piece");
        assert_eq!(
            v2.file_of(piece).map(|(h, k)| (h.file, k)),
            Some((f.file, 0))
        );
    }
}

fn check_piece(g: &Geometry, piece: PieceIndex) {
    let len = g.piece_len(piece);
    assert!(len > 0 && len <= g.nominal_piece_len());
    let blocks: u64 = g.blocks(piece).map(|b| u64::from(b.len)).sum();
    assert_eq!(blocks, u64::from(len), "blocks do not tile the piece");
    assert_eq!(
        g.blocks(piece).count() as u64,
        u64::from(g.blocks_in(piece))
    );
    let mut covered = 0u64;
    for span in g.spans(g.piece_offset(piece), u64::from(len)) {
        assert!(span.len > 0 && span.file_offset + span.len <= g.file_len(span.file));
        assert_eq!(span.range_offset, covered, "file spans leave a gap");
        covered += span.len;
    }
    assert_eq!(covered, u64::from(len), "file spans do not cover the piece");
}

// ---------------------------------------------------------------------------------------------
// wire: handshake, frames, messages, BEP 10 extended handshake
// ---------------------------------------------------------------------------------------------

/// The peer wire codec. Input layout: 3 bytes of piece count (big-endian), then a 68-byte
/// handshake (its Fast bit decides whether BEP 6 messages are allowed), then frames as a peer
/// would send them. The frames go through the connection's own reader, and through the
/// buffer form of the same decoder, which must reach the same verdict; every frame decoded
/// must re-encode to its bytes. The reader runs twice: on a v1 torrent, and (up to
/// [`V2_MAX_PIECES`] pieces) on the same data as a v2 file whose `pieces root` is all zeros,
/// so BEP 52 hash requests reach the code that checks and answers them.
pub fn wire(data: &[u8]) {
    on_small_stack(data, wire_body);
}

fn wire_body(data: &[u8]) {
    let Some((count, rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let piece_count = u32::from_be_bytes([0, count[0], count[1], count[2]]);
    let bitfield_len = piece_count.div_ceil(8) as usize;
    let (fast, frames) = match rest.split_first_chunk::<{ wire::HANDSHAKE_LEN }>() {
        Some((handshake, frames)) => {
            check_handshake(handshake);
            let reserved: &[u8; 8] = handshake[20..28].try_into().expect("8 bytes");
            (wire::reserved::has(reserved, wire::reserved::FAST), frames)
        }
        None => (false, rest),
    };
    let end = check_frames(frames, bitfield_len, piece_count);
    check_reader(frames, piece_count, fast, &end);
    check_extended_handshake(frames);
}

fn check_handshake(raw: &[u8; wire::HANDSHAKE_LEN]) {
    if let Ok(h) = wire::Handshake::decode(raw) {
        assert_eq!(&h.encode(), raw, "handshake does not round-trip");
    }
    // Whatever the bytes, a handshake we build decodes to itself.
    let part = |at: usize| &raw[at..];
    let h = wire::Handshake {
        reserved: part(20)[..8].try_into().expect("68 bytes"),
        info_hash: part(28)[..20].try_into().expect("68 bytes"),
        peer_id: part(48)[..20].try_into().expect("68 bytes"),
    };
    assert_eq!(wire::Handshake::decode(&h.encode()), Ok(h));
}

/// How a stream of frames ends, by the buffer decoder's verdict.
#[derive(Debug, PartialEq)]
enum StreamEnd {
    /// Every byte was part of a whole frame.
    Clean,
    /// The bytes ran out inside a frame.
    Truncated,
    /// A frame was refused.
    Refused(wire::Error),
}

/// Decodes frames one after the other until one is refused or the bytes run out, checking
/// each round-trips.
fn check_frames(mut buf: &[u8], bitfield_len: usize, piece_count: u32) -> StreamEnd {
    loop {
        match wire::decode_frame(buf, bitfield_len, piece_count) {
            Err(e) => return StreamEnd::Refused(e),
            Ok(None) if buf.is_empty() => return StreamEnd::Clean,
            Ok(None) => return StreamEnd::Truncated,
            Ok(Some((frame, used))) => {
                assert!(used >= 4 && used <= buf.len(), "frame used {used} bytes");
                check_frame(&frame, &buf[..used], bitfield_len, piece_count);
                buf = &buf[used..];
            }
        }
    }
}

/// Runs the connection's reader over the frames (storage read-only, so no block is written)
/// and checks it ends as the buffer decoder did, and tells the session and the writer only
/// what the frames allow.
fn check_reader(frames: &[u8], piece_count: u32, fast: bool, end: &StreamEnd) {
    // Two blocks a piece, the last one short, so every kind of block check is reachable.
    let piece_len = 2 * BLOCK_LEN;
    let total = (u64::from(piece_count) * u64::from(piece_len)).saturating_sub(1000);
    let geometry = Geometry::new(piece_len, &[total], u64::from(piece_count))
        .expect("a valid geometry for any piece count");
    // No file there: nothing is read or written, and read-only storage grants no claims.
    let layout = Layout {
        root: PathBuf::from("/nonexistent/bitfetch-fuzz"),
        files: vec![PathBuf::from("f")],
        pad: Vec::new(),
    };
    let storage = Storage::open_existing(&layout, &geometry).expect("read-only storage");
    let replay = peer::replay_reader(frames, &storage, fast, Vec::new());
    check_replay(&replay, &geometry, fast, end);
    if (1..=V2_MAX_PIECES).contains(&piece_count) && total > 0 {
        // The file's piece layer: made-up hashes under an all-zero root, which answers are
        // checked against structurally (a request names the file by the root).
        let layer = if piece_count > 1 {
            (0..piece_count)
                .map(|i| <[u8; 32]>::from(sha2::Sha256::digest(i.to_be_bytes())))
                .collect()
        } else {
            Vec::new()
        };
        let v2 = vec![OwnedTree {
            root: [0; 32],
            len: total,
            layer,
            first_piece: 0,
            leaves_per_piece: piece_len / BLOCK_LEN,
        }];
        let replay = peer::replay_reader_v2(frames, &storage, fast, Vec::new(), Some(&v2));
        check_replay(&replay, &geometry, fast, end);
        check_hash_answers(&replay.pending.hashes, &v2[0].view());
    }
}

/// The answers a reader left its writer answer their requests: a reject, `hashes` from the
/// piece layer of the right count and content, or a plan on one of the file's pieces.
fn check_hash_answers(work: &[HashWork], tree: &hash_msg::FileTree) {
    assert!(work.len() <= peer_outbox::MAX_PENDING_HASHES);
    let from_data = work
        .iter()
        .filter(|w| matches!(w, HashWork::FromPiece(_)))
        .count();
    assert!(from_data <= peer::MAX_PIECE_HASHES_PER_WINDOW as usize);
    for w in work {
        match w {
            HashWork::Send(Message::HashReject(req)) => {
                // Never a request the piece layer answers (those are not budgeted).
                assert!(
                    req.root != *tree.root
                        || hash_msg::check(tree, req) != Ok(hash_msg::Plan::Layer)
                );
            }
            HashWork::Send(Message::Hashes { req, hashes }) => {
                assert_eq!(hash_msg::check(tree, req), Ok(hash_msg::Plan::Layer));
                assert_eq!(hashes.len(), hash_msg::answer_len(req));
                assert!(req.length <= hash_msg::MAX_LENGTH);
                let pad = crate::merkle::pad_root(tree.piece_height());
                for (i, h) in hashes[..req.length as usize].iter().enumerate() {
                    let at = req.index as usize + i;
                    assert_eq!(*h, tree.layer.get(at).copied().unwrap_or(pad));
                }
                assert!(
                    matches!(
                        hash_msg::verify(tree, req, hashes),
                        Ok(_) | Err(hash_msg::BadHashes::Mismatch)
                    ),
                    "an answer of the wrong shape"
                );
            }
            HashWork::FromPiece(a) => {
                let Ok(hash_msg::Plan::Piece { piece }) = hash_msg::check(tree, &a.req) else {
                    panic!("a piece answer to {:?}", a.req);
                };
                assert_eq!(a.piece, tree.first_piece + piece);
                assert!(u64::from(a.len) <= u64::from(tree.leaves_per_piece) * 16384);
            }
            HashWork::Send(other) => panic!("the reader answered a hash request with {other:?}"),
        }
    }
}

fn check_replay(replay: &peer::Replay, geometry: &Geometry, fast: bool, end: &StreamEnd) {
    match &replay.result {
        Ok(()) => assert_eq!(end, &StreamEnd::Clean, "the reader saw a clean end"),
        Err(PeerError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            assert_eq!(
                end,
                &StreamEnd::Truncated,
                "the reader ran out inside a frame"
            );
        }
        Err(PeerError::Protocol(e)) => {
            assert_eq!(
                end,
                &StreamEnd::Refused(e.clone()),
                "the reader refused a frame"
            );
        }
        // Checks past the codec's (indices, negotiation, floods): the reader stopped at a
        // frame the codec accepted.
        Err(e) if e.is_violation() => {}
        Err(e) => panic!("the reader over bytes in memory ended with {e:?}"),
    }
    for event in &replay.events {
        check_event(event, geometry, fast);
    }
    let pending = &replay.pending;
    let cancelled = pending.cancel_serves.keys();
    for b in pending.serves.iter().chain(cancelled) {
        let again = geometry.request(b.piece.get(), b.offset, b.len);
        assert_eq!(again, Some(*b), "the writer was asked to serve a bad range");
    }
    assert!(
        pending.serves.len() <= peer::MAX_QUEUED_SERVES,
        "{} requests queued",
        pending.serves.len()
    );
    assert!(
        pending.cancel_serves.len() <= peer::MAX_QUEUED_SERVES,
        "{} cancels queued",
        pending.cancel_serves.len()
    );
    assert!(
        pending.intro.is_none() && pending.choke.is_none() && pending.requests.is_empty(),
        "the reader gave its writer a session's command"
    );
}

fn check_event(event: &PeerEvent, geometry: &Geometry, fast: bool) {
    match event {
        PeerEvent::Block { block, written } => {
            assert!(!written, "a block was written into read-only storage");
            let again = geometry.aligned_block(block.piece.get(), block.offset, block.len);
            assert_eq!(again, Some(*block));
        }
        PeerEvent::Bitfield(bits) => {
            check_bitfield(
                bits,
                geometry.piece_count().div_ceil(8) as usize,
                geometry.piece_count(),
            );
        }
        PeerEvent::HaveAll | PeerEvent::HaveNone | PeerEvent::AllowedFast(_) => {
            assert!(fast, "{event:?} without the Fast extension");
        }
        PeerEvent::Rejected(block) => {
            assert!(fast, "a reject without the Fast extension");
            let again = geometry.aligned_block(block.piece.get(), block.offset, block.len);
            assert_eq!(again, Some(*block));
        }
        PeerEvent::DhtPort(port) => assert_ne!(*port, 0, "a `port` of 0 was passed on"),
        PeerEvent::Pex { added, dropped } => {
            assert!(added.len() <= 2 * crate::pex::MAX_PER_MESSAGE);
            assert!(dropped.len() <= 2 * crate::pex::MAX_PER_MESSAGE);
            let all = added.iter().map(|(a, _)| a).chain(dropped);
            assert!(all.into_iter().all(|a| crate::pex::is_usable(*a)));
        }
        PeerEvent::Extended(_)
        | PeerEvent::Have(_)
        | PeerEvent::Choke
        | PeerEvent::Unchoke
        | PeerEvent::Interested
        | PeerEvent::NotInterested => {}
        other => panic!("a reader sent {other:?}"),
    }
}

fn check_frame(frame: &Frame, raw: &[u8], bitfield_len: usize, piece_count: u32) {
    match frame {
        Frame::Piece { index, begin, data } => {
            assert!(!data.is_empty() && data.len() <= BLOCK_LEN as usize);
            let len = u32::try_from(data.len()).expect("a block fits in u32");
            let mut encoded = Vec::new();
            wire::encode_piece_header(*index, *begin, len, &mut encoded);
            encoded.extend_from_slice(data);
            assert_eq!(encoded, raw, "piece frame does not round-trip");
        }
        Frame::Message(msg) => check_message(msg, raw, bitfield_len, piece_count),
    }
}

fn check_message(msg: &Message, raw: &[u8], bitfield_len: usize, piece_count: u32) {
    let mut encoded = Vec::new();
    wire::encode(msg, &mut encoded);
    match msg {
        // An unknown message keeps only its id; its payload is skipped.
        Message::Unknown(id) => assert_eq!(encoded[4], *id),
        _ => assert_eq!(encoded, raw, "{msg:?} does not re-encode to its bytes"),
    }
    assert_eq!(
        wire::decode_frame(&encoded, bitfield_len, piece_count),
        Ok(Some((Frame::Message(msg.clone()), encoded.len()))),
        "{msg:?} does not decode back"
    );
    match msg {
        Message::Bitfield(bits) => check_bitfield(bits, bitfield_len, piece_count),
        Message::Extended { id, payload } if *id == extension::HANDSHAKE_ID => {
            check_extended_handshake(payload);
        }
        _ => {}
    }
}

fn check_bitfield(bits: &[u8], bitfield_len: usize, piece_count: u32) {
    assert_eq!(bits.len(), bitfield_len);
    let spare_set = (u64::from(piece_count)..bits.len() as u64 * 8)
        .any(|bit| bits[(bit / 8) as usize] & (0x80 >> (bit % 8)) != 0);
    assert!(!spare_set, "a bit past the last piece is set");
}

fn check_extended_handshake(payload: &[u8]) {
    if let Ok(info) = extension::parse_handshake(payload) {
        assert!(info.client.as_ref().is_none_or(|c| c.chars().count() <= 64));
        assert_ne!(info.listen_port, Some(0));
        assert!(
            info.reqq
                .is_none_or(|q| (1..=extension::MAX_REQQ).contains(&q))
        );
    }
    // Our own handshake, with a port and address taken from the input, reads back.
    let port = payload
        .first_chunk::<2>()
        .map_or(0, |p| u16::from_be_bytes(*p));
    let ip = match payload
        .get(2..18)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
    {
        Some(v6) if payload.len().is_multiple_of(2) => IpAddr::V6(Ipv6Addr::from(v6)),
        _ => IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
    };
    let ours = extension::parse_handshake(&extension::our_handshake(
        port,
        ip,
        None,
        extension::PexOffer::Offer,
    ))
    .expect("our extended handshake parses");
    assert_eq!(ours.listen_port, (port != 0).then_some(port));
    assert_eq!(ours.reqq, Some(extension::OUR_REQQ as usize));
}

// ---------------------------------------------------------------------------------------------
// trackers
// ---------------------------------------------------------------------------------------------

/// HTTP tracker announce and scrape replies (and scrape URLs made from announce URLs).
pub fn tracker_http(data: &[u8]) {
    on_small_stack(data, tracker_http_body);
}

fn tracker_http_body(data: &[u8]) {
    if let Ok(reply) = tracker::http::parse_reply(data) {
        check_reply(&reply);
        assert!(reply.min_interval.is_none_or(interval_in_bounds));
    }
    let _ = tracker::http::parse_scrape(data, &SCRAPE_INFO_HASH);
    let url = String::from_utf8_lossy(data);
    if let Some(scrape) = tracker::http::scrape_url(&url, &SCRAPE_INFO_HASH) {
        assert!(scrape.contains("scrape") && scrape.contains("info_hash="));
    }
}

fn interval_in_bounds(d: std::time::Duration) -> bool {
    (MIN_INTERVAL..=MAX_INTERVAL).contains(&d)
}

/// What every announce reply promises, HTTP or UDP.
fn check_reply(reply: &Reply) {
    assert!(
        reply.peers.len() <= MAX_PEERS,
        "{} peers",
        reply.peers.len()
    );
    let mut seen = HashSet::new();
    for p in &reply.peers {
        assert_ne!(p.port(), 0, "peer {p} has port 0");
        assert!(!p.ip().is_unspecified(), "peer {p} has no address");
        assert!(seen.insert(*p), "peer {p} listed twice");
    }
    assert!(interval_in_bounds(reply.interval), "{:?}", reply.interval);
}

/// UDP tracker packets (BEP 15): the header check, then connect, announce and scrape bodies.
pub fn tracker_udp(data: &[u8]) {
    on_small_stack(data, tracker_udp_body);
}

fn tracker_udp_body(data: &[u8]) {
    // Match the packet against its own action and transaction id, and against others.
    let (action, tid) = match data.first_chunk::<8>() {
        Some(h) => (
            u32::from_be_bytes([h[0], h[1], h[2], h[3]]),
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        ),
        None => (0, 0),
    };
    for (want_action, want_tid) in [(action, tid), (1, tid), (0, tid ^ 1)] {
        match tracker::udp::check_reply(data, want_action, want_tid) {
            Ok(Some(body)) => {
                assert!(data.len() >= 8 && action == want_action && tid == want_tid);
                assert_eq!(body, &data[8..]);
            }
            Ok(None) => {}
            Err(_) => assert!(data.len() >= 8 && action == 3 && tid == want_tid),
        }
    }
    let body = data.get(8..).unwrap_or_default();
    for bytes in [data, body] {
        if let Ok(id) = tracker::udp::parse_connect(bytes) {
            assert_eq!(id.to_be_bytes(), bytes[..8]);
        }
        for ipv6 in [false, true] {
            if let Ok(reply) = tracker::udp::parse_announce(bytes, ipv6) {
                check_reply(&reply);
                let per_peer = if ipv6 { 18 } else { 6 };
                assert!(reply.peers.len() <= (bytes.len() - 12) / per_peer);
                assert!(reply.peers.iter().all(|p| p.is_ipv6() == ipv6));
            }
        }
        if let Ok(s) = tracker::udp::parse_scrape(bytes) {
            assert!(s.seeders <= u64::from(u32::MAX) && s.leechers <= u64::from(u32::MAX));
        }
    }
    if let Ok((host, port)) = tracker::udp::host_port(&String::from_utf8_lossy(data)) {
        assert!(!host.is_empty() && port != 0);
    }
}

// ---------------------------------------------------------------------------------------------
// DHT (KRPC)
// ---------------------------------------------------------------------------------------------

/// DHT datagrams (BEP 5/32): the KRPC decoder, and a whole node answering and matching them
/// (routing tables, peer store, tokens, rate limits, lookups; no socket). Input layout in
/// `src/dht/fuzzing.rs`: datagrams separated by `\n--\n`, each after a sender/clock byte.
pub fn krpc(data: &[u8]) {
    on_small_stack(data, crate::dht::fuzzing::krpc);
}

// ---------------------------------------------------------------------------------------------
// magnet links
// ---------------------------------------------------------------------------------------------

/// Magnet links: whatever the text, a parse either fails with a one-line message or gives a
/// value within every cap, with a safe display name, that [`Magnet::to_uri`] writes back to a
/// link that parses to the same value.
pub fn magnet(data: &[u8]) {
    on_small_stack(data, magnet_body);
}

fn magnet_body(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Magnet::parse(&text) {
        Ok(m) => check_magnet(&m, &text),
        Err(e) => check_message_line(&e.to_string()),
    }
}

/// An error message is one line of printable text, however hostile the input it quotes.
fn check_message_line(msg: &str) {
    assert!(
        !msg.is_empty() && !msg.chars().any(|c| c.is_control()),
        "message {msg:?}"
    );
    assert!(msg.len() <= 1024, "a {}-byte message", msg.len());
}

fn check_magnet(m: &Magnet, text: &str) {
    assert!(m.trackers.len() <= magnet::MAX_TRACKERS);
    assert!(m.peers.len() <= magnet::MAX_PEERS);
    assert!(m.web_seeds.len() <= magnet::MAX_WEB_SEEDS);
    for list in [&m.trackers, &m.web_seeds] {
        assert_eq!(list.iter().collect::<HashSet<_>>().len(), list.len());
        for url in list {
            assert!(!url.is_empty() && url.len() <= magnet::MAX_URL_LEN);
            assert!(!url.chars().any(|c| c.is_control() || c.is_whitespace()));
        }
    }
    assert_eq!(m.peers.iter().collect::<HashSet<_>>().len(), m.peers.len());
    for peer in &m.peers {
        match peer {
            PeerAddr::Ip(addr) => assert!(addr.port() != 0 && !addr.ip().is_unspecified()),
            PeerAddr::Host { host, port } => {
                assert!(*port != 0 && !host.is_empty() && host.parse::<IpAddr>().is_err());
                assert!(!host.contains([':', '/', '[', ']', ' ']), "host {host:?}");
            }
        }
    }
    if let Some(name) = &m.name {
        check_element(name);
    }
    if let Some(select) = &m.select {
        check_selection(select);
    }
    assert_eq!(m.tracker_tiers().concat(), m.trackers);
    let uri = m.to_uri();
    assert!(
        uri.is_ascii() && !uri.contains(|c: char| c.is_ascii_control() || c == ' '),
        "{uri:?}"
    );
    assert!(
        uri.len() <= 3 * text.len() + 100,
        "a {}-byte link from {} bytes",
        uri.len(),
        text.len()
    );
    if uri.len() <= magnet::MAX_URI_LEN {
        assert_eq!(
            Magnet::parse(&uri).as_ref(),
            Ok(m),
            "{uri} does not read back"
        );
    }
}

fn check_selection(select: &magnet::FileSelection) {
    let ranges = select.ranges();
    assert!(!ranges.is_empty());
    for pair in ranges.windows(2) {
        assert!(pair[0].1 + 1 < pair[1].0, "ranges {pair:?} not merged");
    }
    for &(lo, hi) in ranges {
        assert!(lo <= hi && hi <= magnet::MAX_FILE_INDEX);
        for i in [lo, hi] {
            assert!(select.contains(i));
        }
        assert!(lo == 0 || !select.contains(lo - 1));
        assert!(!select.contains(hi + 1) || hi == magnet::MAX_FILE_INDEX);
    }
    let last = ranges[ranges.len() - 1].1 as usize;
    assert!(select.mask(last).is_err());
    let mask = select.mask(last + 1).expect("the selection fits");
    assert!(mask[last]);
}

// ---------------------------------------------------------------------------------------------
// ut_metadata: the BEP 9 codec and the metadata fetch
// ---------------------------------------------------------------------------------------------

/// The metadata exchange. The input is decoded as one `ut_metadata` payload (which must
/// re-encode to itself in canonical form), and its first [`SCRIPT_LEN`] bytes also drive a
/// [`MetadataFetch`] as a script: four honest peers and four hostile ones add themselves, ask,
/// answer, reject, leave, send garbage or raw messages, and time passes. Whatever the hostile
/// peers do: an honest peer is never dropped or banned, completion yields exactly the true
/// metadata, the fetch's invariants hold after every step, and once the script is over, an
/// honest peer alone (the hostile ones still connected, now silent) completes the fetch.
pub fn ut_metadata(data: &[u8]) {
    on_small_stack(data, ut_metadata_body);
}

/// How much of a `ut_metadata` input is also a script.
pub const SCRIPT_LEN: usize = 2048;
/// Size of the script's true metadata: three pieces, the last one short.
const SCRIPT_METADATA_LEN: usize = 2 * metadata::PIECE_LEN as usize + 7000;
/// Peers 0..4 are honest, 4..8 hostile.
const SCRIPT_PEERS: usize = 8;

fn ut_metadata_body(data: &[u8]) {
    check_metadata_payload(data);
    let mut script = Script::new(&data[..data.len().min(SCRIPT_LEN)]);
    while let Some(op) = script.byte() {
        script.step(op);
    }
    script.finale();
}

fn check_metadata_payload(payload: &[u8]) {
    let msg = match metadata::decode(payload) {
        Ok(Some(msg)) => msg,
        Ok(None) => return,
        Err(e) => return check_message_line(&e.to_string()),
    };
    let encoded = msg.encode();
    assert!(encoded.len() <= payload.len(), "the canonical form grew");
    assert_eq!(
        metadata::decode(&encoded),
        Ok(Some(msg)),
        "{msg:?} does not read back"
    );
    match msg {
        metadata::Message::Data {
            piece,
            total_size,
            data,
        } => {
            assert!((1..=metadata::MAX_SIZE).contains(&total_size));
            assert_eq!(
                Some(data.len() as u32),
                metadata::piece_len(total_size, piece)
            );
            assert!(payload.ends_with(data));
        }
        metadata::Message::Request { piece } | metadata::Message::Reject { piece } => {
            assert!(piece < metadata::MAX_PIECES);
        }
    }
}

/// The state of a `ut_metadata` script: the fetch, the clock, and what each peer owes.
struct Script<'a> {
    bytes: std::slice::Iter<'a, u8>,
    truth: Vec<u8>,
    fetch: MetadataFetch,
    now: Instant,
    /// Requests each peer was given and has not answered, oldest first.
    owed: [VecDeque<u32>; SCRIPT_PEERS],
}

impl<'a> Script<'a> {
    fn new(script: &'a [u8]) -> Script<'a> {
        let truth: Vec<u8> = (0..SCRIPT_METADATA_LEN).map(|i| (i % 251) as u8).collect();
        let hash: [u8; 20] = Sha1::digest(&truth).into();
        Script {
            bytes: script.iter(),
            truth,
            fetch: MetadataFetch::new(hash),
            now: Instant::now(),
            owed: Default::default(),
        }
    }

    fn byte(&mut self) -> Option<u8> {
        self.bytes.next().copied()
    }

    fn arg(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn true_size(&self) -> u32 {
        self.truth.len() as u32
    }

    /// The true bytes of `piece`, if it is a piece of the true metadata.
    fn true_piece(&self, piece: u32) -> Option<&[u8]> {
        let len = metadata::piece_len(self.true_size(), piece)? as usize;
        let start = (piece * metadata::PIECE_LEN) as usize;
        Some(&self.truth[start..start + len])
    }

    /// One operation: the low 3 bits say what, the next 3 bits which peer.
    fn step(&mut self, op: u8) {
        let who = usize::from(op >> 3) % SCRIPT_PEERS;
        let honest = who < SCRIPT_PEERS / 2;
        let key = PeerKey(who as u64);
        let outcome = match op & 7 {
            0 => {
                let size = if honest || self.arg() < 128 {
                    i64::from(self.true_size())
                } else {
                    let b = [self.arg(), self.arg(), self.arg(), self.arg()];
                    i64::from(i32::from_be_bytes(b))
                };
                let added = self.fetch.add_peer(key, size);
                assert!(
                    added.is_ok() || !honest,
                    "an honest size refused: {added:?}"
                );
                Outcome::Continue
            }
            1 => {
                self.ask(who);
                Outcome::Continue
            }
            2 => self.answer(who),
            3 => match self.owed[who].pop_front() {
                Some(piece) => self.fetch.on_reject(key, piece, self.now),
                None => Outcome::Continue,
            },
            4 => {
                let half_seconds = u64::from(self.arg());
                self.now += Duration::from_millis(500 * half_seconds);
                Outcome::Continue
            }
            5 => {
                self.fetch.remove_peer(key);
                self.owed[who].clear();
                Outcome::Continue
            }
            6 if !honest => self.garbage(who),
            7 if !honest => {
                let len = usize::from(self.arg());
                let payload: Vec<u8> = (0..len).map_while(|_| self.byte()).collect();
                match metadata::decode(&payload) {
                    Ok(Some(msg)) => self.fetch.on_message(key, &msg, self.now),
                    _ => Outcome::Continue,
                }
            }
            _ => self.answer(who),
        };
        self.judge(who, outcome);
    }

    fn ask(&mut self, who: usize) {
        if let Some(piece) = self.fetch.next_request(PeerKey(who as u64), self.now) {
            assert!(piece < metadata::MAX_PIECES);
            self.owed[who].push_back(piece);
        }
    }

    /// `who` answers its oldest request with the true data.
    fn answer(&mut self, who: usize) -> Outcome {
        let Some(piece) = self.owed[who].pop_front() else {
            return Outcome::Continue;
        };
        let Some(data) = self.true_piece(piece) else {
            // Only a peer that announced another size is asked past the true end.
            assert!(
                who >= SCRIPT_PEERS / 2,
                "an honest peer asked for piece {piece}"
            );
            return Outcome::Continue;
        };
        let data = data.to_vec();
        let size = self.true_size();
        self.fetch.on_data(PeerKey(who as u64), piece, size, &data)
    }

    /// A hostile peer sends a made-up data message: for a piece it owes or any other, with
    /// the true size or another, of the right length for that size or not.
    fn garbage(&mut self, who: usize) -> Outcome {
        let piece = match self.owed[who].pop_front() {
            Some(piece) if self.arg() < 192 => piece,
            _ => u32::from(self.arg()),
        };
        let total = if self.arg() < 192 {
            self.true_size()
        } else {
            u32::from_be_bytes([self.arg(), self.arg(), self.arg(), self.arg()])
        };
        let len = match metadata::piece_len(total, piece) {
            Some(len) if self.arg() < 192 => len as usize,
            _ => usize::from(self.arg()),
        };
        let fill = self.arg();
        let mut data = self
            .true_piece(piece)
            .map_or_else(|| vec![fill; len], <[u8]>::to_vec);
        data.resize(len, fill);
        if let Some(b) = data.get_mut(usize::from(fill)) {
            *b ^= 1;
        }
        self.fetch.on_data(PeerKey(who as u64), piece, total, &data)
    }

    /// Checks an outcome against who sent the message, then the fetch's invariants.
    fn judge(&mut self, who: usize, outcome: Outcome) {
        let hostile = |p: &PeerKey| p.0 as usize >= SCRIPT_PEERS / 2;
        match outcome {
            Outcome::Continue => {}
            Outcome::Drop(v) => {
                assert!(who >= SCRIPT_PEERS / 2, "honest peer {who} dropped: {v}");
                self.owed[who].clear();
            }
            Outcome::HashFailed(f) => {
                assert!(f.ban.iter().all(hostile), "an honest peer banned: {f:?}");
                assert!((f.ban.len() == 1 && f.suspects.is_empty()) || f.ban.is_empty());
                assert!(f.suspects.len() != 1, "one suspect is a culprit");
                for p in &f.ban {
                    self.owed[p.0 as usize].clear();
                }
            }
            Outcome::Complete(c) => {
                assert!(c.info == self.truth, "completed with the wrong metadata");
                assert!(
                    c.ban.iter().all(hostile),
                    "an honest peer convicted: {:?}",
                    c.ban
                );
                assert!(c.wrong_size.iter().all(hostile), "{:?}", c.wrong_size);
            }
        }
        self.fetch.check_invariants();
    }

    /// The hostile peers fall silent (but are still asked, as the session would ask them);
    /// honest peer 0 joins if it is not there, and every honest peer answers at once. The
    /// fetch must complete within a bounded time.
    fn finale(&mut self) {
        let _ = self.fetch.add_peer(PeerKey(0), i64::from(self.true_size()));
        for _ in 0..400 {
            if self.fetch.is_complete() {
                break;
            }
            self.now += Duration::from_secs(5);
            for who in 0..SCRIPT_PEERS {
                while let Some(piece) = self.fetch.next_request(PeerKey(who as u64), self.now) {
                    self.owed[who].push_back(piece);
                }
            }
            self.fetch.check_invariants();
            for who in 0..SCRIPT_PEERS / 2 {
                while !self.owed[who].is_empty() {
                    let outcome = self.answer(who);
                    self.judge(who, outcome);
                }
            }
        }
        assert!(
            self.fetch.is_complete(),
            "an honest peer could not finish the fetch"
        );
        for who in 0..SCRIPT_PEERS {
            assert_eq!(self.fetch.next_request(PeerKey(who as u64), self.now), None);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// paths
// ---------------------------------------------------------------------------------------------

/// Path elements from torrents: one element, then the input split at `/` as a path.
pub fn path(data: &[u8]) {
    on_small_stack(data, path_body);
}

fn path_body(data: &[u8]) {
    if let Ok(clean) = path_safety::sanitize_element(data) {
        check_element(&clean);
    }
    let mut clean = Vec::new();
    for raw in data
        .split(|&b| b == b'/')
        .take(metainfo::MAX_PATH_DEPTH + 1)
    {
        if let Ok(e) = path_safety::sanitize_element(raw) {
            check_element(&e);
            clean.push(e);
        }
    }
    match path_safety::join_elements(&clean) {
        Some(p) => {
            assert_relative_normal(&p);
            assert_eq!(p.components().count(), clean.len(), "{clean:?} -> {p:?}");
            assert!(path_safety::is_contained(&p));
        }
        None => assert!(clean.is_empty(), "safe elements {clean:?} did not join"),
    }
    let shown = path_safety::escape(&String::from_utf8_lossy(data));
    assert!(
        !shown.chars().any(|c| c.is_control()),
        "escape left {shown:?}"
    );
    let bidi = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
    assert!(
        !shown.contains(bidi),
        "escape left a bidi control in {shown:?}"
    );
}

fn check_element(e: &str) {
    assert!(!e.is_empty());
    assert!(e.len() <= path_safety::MAX_ELEMENT_BYTES);
    assert!(
        !e.contains(['/', '\\', '\0']) && !e.chars().any(char::is_control),
        "unsafe character left in {e:?}"
    );
    assert!(e != "." && e != "..");
    let b = e.as_bytes();
    assert!(
        !(b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'),
        "drive prefix left in {e:?}"
    );
    assert_single_normal_component(e);
}

fn assert_single_normal_component(e: &str) {
    let mut parts = Path::new(e).components();
    assert_eq!(parts.next(), Some(Component::Normal(e.as_ref())), "{e:?}");
    assert_eq!(parts.next(), None, "{e:?} is more than one component");
}

fn assert_relative_normal(p: &Path) {
    assert!(p.is_relative(), "{p:?} is absolute");
    assert!(p.components().next().is_some(), "empty path");
    assert!(
        p.components().all(|c| matches!(c, Component::Normal(_))),
        "{p:?} has a component that is not a plain name"
    );
}
