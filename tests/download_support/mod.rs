//! Peers written in the test itself, for the download tests: a fake seeder that speaks just
//! enough of the peer wire protocol to serve a single-file torrent and then misbehave on
//! purpose, and a counting relay that sits between a downloader and a real seeder to measure
//! what that seeder sent.
//!
//! Both run on a thread that accepts on a loopback listener. They never sleep: every read
//! has a timeout (a hang guard), and the accept loop is woken for shutdown by a connection of
//! our own. A test joins the thread and asserts on what it returns.
//!
//! Lives in a directory so cargo does not build it as a test crate itself.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use sha1::{Digest, Sha1};

/// How long a fake peer or relay waits on a silent socket before giving up on it.
const IDLE: Duration = Duration::from_secs(60);
/// Bigger frames than this from the downloader are a protocol error (ours are 17 bytes).
const MAX_FRAME: usize = 1 << 20;
/// The largest block a downloader may ask for (BEP 3 allows up to 128 KiB in practice).
const MAX_BLOCK: u32 = 128 * 1024;

const MSG_UNCHOKE: u8 = 1;
const MSG_BITFIELD: u8 = 5;
const MSG_REQUEST: u8 = 6;
const MSG_PIECE: u8 = 7;
const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";

// =============================================================================================
// The few torrent facts a fake seeder needs, read independently of bitfetch
// =============================================================================================

/// Info hash and piece geometry of a .torrent, parsed here rather than asked of bitfetch.
#[derive(Debug, Clone)]
pub struct TorrentFacts {
    pub info_hash: [u8; 20],
    pub piece_len: u64,
    pub pieces: u32,
}

impl TorrentFacts {
    pub fn read(torrent: &Path) -> TorrentFacts {
        let bytes = fs::read(torrent).unwrap_or_else(|e| panic!("read {}: {e}", torrent.display()));
        let info = dict_value(&bytes, 0, b"info")
            .unwrap_or_else(|| panic!("{} has no info dictionary", torrent.display()));
        let info_bytes = &bytes[info.clone()];
        let piece_len = dict_value(info_bytes, 0, b"piece length")
            .map(|r| parse_int(&info_bytes[r]))
            .expect("info has a piece length");
        let hashes = dict_value(info_bytes, 0, b"pieces")
            .map(|r| string_len(&info_bytes[r]))
            .expect("info has pieces");
        assert!(
            hashes.is_multiple_of(20),
            "pieces is not a whole number of SHA-1 hashes"
        );
        TorrentFacts {
            info_hash: Sha1::digest(info_bytes).into(),
            piece_len,
            pieces: u32::try_from(hashes / 20).expect("piece count fits u32"),
        }
    }

    pub fn info_hash_hex(&self) -> String {
        self.info_hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The byte range of the value stored under `key` in the dictionary starting at `at`.
fn dict_value(b: &[u8], at: usize, key: &[u8]) -> Option<std::ops::Range<usize>> {
    assert_eq!(b[at], b'd', "not a dictionary at offset {at}");
    let mut i = at + 1;
    while b[i] != b'e' {
        let key_end = skip_value(b, i);
        let value_end = skip_value(b, key_end);
        let colon = i + b[i..].iter().position(|&c| c == b':')?;
        if &b[colon + 1..key_end] == key {
            return Some(key_end..value_end);
        }
        i = value_end;
    }
    None
}

/// The end (exclusive) of the bencoded value starting at `i`. Panics on malformed input: the
/// torrents read here were just made by the test.
fn skip_value(b: &[u8], i: usize) -> usize {
    match b[i] {
        b'i' => i + b[i..].iter().position(|&c| c == b'e').expect("int end") + 1,
        b'l' | b'd' => {
            let mut j = i + 1;
            while b[j] != b'e' {
                j = skip_value(b, j);
            }
            j + 1
        }
        b'0'..=b'9' => {
            let colon = i + b[i..]
                .iter()
                .position(|&c| c == b':')
                .expect("string colon");
            let len: usize = std::str::from_utf8(&b[i..colon])
                .expect("ASCII length")
                .parse()
                .expect("string length");
            colon + 1 + len
        }
        other => panic!("unexpected byte {other:#04x} in bencode at {i}"),
    }
}

fn parse_int(value: &[u8]) -> u64 {
    std::str::from_utf8(&value[1..value.len() - 1])
        .expect("ASCII integer")
        .parse()
        .expect("non-negative integer")
}

fn string_len(value: &[u8]) -> usize {
    let colon = value.iter().position(|&c| c == b':').expect("string colon");
    value.len() - colon - 1
}

// =============================================================================================
// Accept loop with a clean shutdown
// =============================================================================================

/// A listener on its own thread. `finish` (or drop) sets the stop flag, wakes a blocked
/// `accept` with a connection of our own, and joins the thread.
struct Acceptor<T> {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Acceptor<T> {
    fn spawn(
        ip: Ipv4Addr,
        name: &str,
        body: impl FnOnce(TcpListener, Arc<AtomicBool>) -> T + Send + 'static,
    ) -> Acceptor<T> {
        let listener =
            TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(listener, flag))
            .expect("spawn an accept thread");
        Acceptor {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(&mut self) -> thread::Result<T> {
        self.stop.store(true, Ordering::SeqCst);
        // Refused once the thread has dropped its listener: then there is nothing to wake.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
        self.thread
            .take()
            .expect("an acceptor is finished once")
            .join()
    }
}

impl<T> Drop for Acceptor<T> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5));
            let _ = thread.join();
        }
    }
}

// =============================================================================================
// The fake seeder
// =============================================================================================

/// How a fake seeder misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Answer at least `after_blocks` requests, then, on a request for a block of a piece it
    /// has already sent part of, send the frame header and half the block and close the
    /// connection. Later connections are closed at once.
    DropMidPiece { after_blocks: usize },
    /// Serve real data, except one byte flipped in the first block sent.
    CorruptFirstBlock,
}

/// What a fake seeder did, returned when it is finished.
#[derive(Debug, Default, Clone)]
pub struct FakeReport {
    pub connections: usize,
    /// Whole, correct blocks sent.
    pub good_blocks: usize,
    /// The piece the connection was dropped in the middle of.
    pub dropped_in_piece: Option<u32>,
    /// (piece, offset) of the corrupted block.
    pub corrupted: Option<(u32, u32)>,
    /// How each connection ended (normal ends included), for failure messages.
    pub endings: Vec<String>,
}

pub struct FakeSeeder {
    acceptor: Acceptor<FakeReport>,
}

impl FakeSeeder {
    /// Serves `data` (the whole content of a single-file torrent described by `facts`) on
    /// `ip`, any port.
    pub fn start(
        ip: Ipv4Addr,
        facts: TorrentFacts,
        data: Vec<u8>,
        misbehaviour: Misbehaviour,
    ) -> FakeSeeder {
        let expected = facts.piece_len * (u64::from(facts.pieces) - 1);
        assert!(
            (expected + 1..=expected + facts.piece_len).contains(&(data.len() as u64)),
            "{} bytes do not fit {} pieces of {}",
            data.len(),
            facts.pieces,
            facts.piece_len
        );
        let acceptor = Acceptor::spawn(ip, "fake-seeder", move |listener, stop| {
            let mut fake = Fake {
                facts,
                data,
                misbehaviour,
                report: FakeReport::default(),
                peer_id: *b"-FK0001-fakeseeder01",
            };
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = conn else { continue };
                fake.report.connections += 1;
                let ending = if fake.report.dropped_in_piece.is_some() {
                    "closed at once (already dropped one connection)".to_owned()
                } else {
                    match fake.serve(stream) {
                        Ok(how) => how,
                        Err(e) => format!("I/O error: {e}"),
                    }
                };
                fake.report.endings.push(ending);
            }
            fake.report
        });
        FakeSeeder { acceptor }
    }

    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr
    }

    /// Stops accepting and returns the report. Call once the downloader has exited, so the
    /// connection being served has ended.
    pub fn finish(mut self) -> FakeReport {
        match self.acceptor.finish() {
            Ok(report) => report,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

struct Fake {
    facts: TorrentFacts,
    data: Vec<u8>,
    misbehaviour: Misbehaviour,
    report: FakeReport,
    peer_id: [u8; 20],
}

impl Fake {
    fn piece_size(&self, piece: u32) -> u64 {
        let start = u64::from(piece) * self.facts.piece_len;
        (self.data.len() as u64 - start).min(self.facts.piece_len)
    }

    /// One connection: handshake, bitfield of everything, unchoke, then answer requests.
    /// Returns how it ended.
    fn serve(&mut self, mut stream: TcpStream) -> io::Result<String> {
        stream.set_read_timeout(Some(IDLE))?;
        stream.set_write_timeout(Some(IDLE))?;
        let mut theirs = [0u8; 68];
        stream.read_exact(&mut theirs)?;
        if theirs[0] != 19 || &theirs[1..20] != PROTOCOL {
            return Ok("not a BitTorrent handshake".to_owned());
        }
        if theirs[28..48] != self.facts.info_hash {
            return Ok("handshake for another info hash".to_owned());
        }
        let mut hello = Vec::with_capacity(68);
        hello.push(19);
        hello.extend_from_slice(PROTOCOL);
        hello.extend_from_slice(&[0; 8]); // no extensions: plain BEP 3
        hello.extend_from_slice(&self.facts.info_hash);
        hello.extend_from_slice(&self.peer_id);
        let mut bits = vec![0u8; (self.facts.pieces as usize).div_ceil(8)];
        for i in 0..self.facts.pieces as usize {
            bits[i / 8] |= 0x80 >> (i % 8);
        }
        put_frame(&mut hello, MSG_BITFIELD, &bits);
        put_frame(&mut hello, MSG_UNCHOKE, &[]);
        stream.write_all(&hello)?;

        // Blocks (piece, offset) sent whole on this connection.
        let mut sent: Vec<(u32, u32)> = Vec::new();
        loop {
            let Some(frame) = read_frame(&mut stream)? else {
                return Ok("the downloader closed the connection".to_owned());
            };
            if frame.first() != Some(&MSG_REQUEST) {
                continue; // interested, have, cancel, keep-alive…: nothing to do
            }
            if frame.len() != 13 {
                return Ok(format!("request of {} bytes", frame.len()));
            }
            let field = |at: usize| u32::from_be_bytes(frame[at..at + 4].try_into().unwrap());
            let (piece, begin, len) = (field(1), field(5), field(9));
            if piece >= self.facts.pieces
                || len == 0
                || len > MAX_BLOCK
                || u64::from(begin) + u64::from(len) > self.piece_size(piece)
            {
                return Ok(format!("bad request {piece}/{begin}/{len}"));
            }
            let start = (u64::from(piece) * self.facts.piece_len + u64::from(begin)) as usize;
            let mut block = self.data[start..start + len as usize].to_vec();
            match self.misbehaviour {
                Misbehaviour::DropMidPiece { after_blocks }
                    if sent.len() >= after_blocks
                        && sent.iter().any(|&(p, _)| p == piece)
                        && !sent.contains(&(piece, begin)) =>
                {
                    let mut out = Vec::new();
                    put_frame_header(&mut out, MSG_PIECE, 8 + len as usize);
                    out.extend_from_slice(&piece.to_be_bytes());
                    out.extend_from_slice(&begin.to_be_bytes());
                    out.extend_from_slice(&block[..len as usize / 2]);
                    stream.write_all(&out)?;
                    stream.flush()?;
                    let _ = stream.shutdown(Shutdown::Both);
                    self.report.dropped_in_piece = Some(piece);
                    return Ok(format!(
                        "dropped by us half-way through block {begin} of piece {piece}"
                    ));
                }
                Misbehaviour::CorruptFirstBlock if self.report.corrupted.is_none() => {
                    block[len as usize / 2] ^= 0x5a;
                    self.report.corrupted = Some((piece, begin));
                }
                _ => self.report.good_blocks += 1,
            }
            let mut out = Vec::with_capacity(13 + block.len());
            put_frame_header(&mut out, MSG_PIECE, 8 + block.len());
            out.extend_from_slice(&piece.to_be_bytes());
            out.extend_from_slice(&begin.to_be_bytes());
            out.extend_from_slice(&block);
            stream.write_all(&out)?;
            sent.push((piece, begin));
        }
    }
}

fn put_frame_header(out: &mut Vec<u8>, id: u8, payload_len: usize) {
    let len = u32::try_from(payload_len + 1).expect("frame fits u32");
    out.extend_from_slice(&len.to_be_bytes());
    out.push(id);
}

fn put_frame(out: &mut Vec<u8>, id: u8, payload: &[u8]) {
    put_frame_header(out, id, payload.len());
    out.extend_from_slice(payload);
}

/// One frame (id and payload; empty for a keep-alive), or `None` at a clean end of stream.
fn read_frame(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut frame = vec![0u8; len];
    stream.read_exact(&mut frame)?;
    Ok(Some(frame))
}

// =============================================================================================
// The counting relay
// =============================================================================================

/// Forwards every connection it accepts to `target` and counts the bytes `target` sends back.
pub struct Relay {
    acceptor: Acceptor<Vec<JoinHandle<()>>>,
    from_target: Arc<AtomicU64>,
}

impl Relay {
    /// Listens on `ip`, any port.
    pub fn start(ip: Ipv4Addr, target: SocketAddr) -> Relay {
        let from_target = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&from_target);
        let acceptor = Acceptor::spawn(ip, "relay", move |listener, stop| {
            let mut pumps = Vec::new();
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                // A target that is gone is seen by the downloader as a dropped connection.
                let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(10))
                else {
                    continue;
                };
                let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone())
                else {
                    continue;
                };
                pumps.push(pump(client, upstream, None));
                pumps.push(pump(upstream2, client2, Some(Arc::clone(&counter))));
            }
            pumps
        });
        Relay {
            acceptor,
            from_target,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.acceptor.addr
    }

    /// Bytes the target has sent through the relay so far.
    pub fn bytes_from_target(&self) -> u64 {
        self.from_target.load(Ordering::SeqCst)
    }

    /// Stops accepting and waits for the connections to end (call after both ends are done).
    pub fn finish(mut self) {
        if let Ok(pumps) = self.acceptor.finish() {
            for p in pumps {
                let _ = p.join();
            }
        }
    }
}

/// Copies `from` into `to` until either side ends, then passes the end on.
fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<Arc<AtomicU64>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let _ = from.set_read_timeout(Some(IDLE));
        let _ = to.set_write_timeout(Some(IDLE));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
            if let Some(c) = &count {
                c.fetch_add(n as u64, Ordering::SeqCst);
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    })
}
