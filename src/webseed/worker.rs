//! One connection to a web seed: a thread that takes assignments of blocks from the session,
//! asks the server for them with blocking range requests (one per file a run of blocks
//! touches), and writes the answers into the file maps under the same per-block claims as
//! peer connections (a block written by someone else meanwhile is read past). Each block is
//! read into a 16 KiB buffer before its claim is taken, so a stalled server never holds a
//! claim another source could use.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::plan::{self, Segment};
use super::response::{self, Delivery, Fault, Head};
use crate::geometry::BlockRef;
use crate::messages::Input;
use crate::peer;
use crate::picker::PeerKey;
use crate::storage::ReadInto;

/// No read waits longer than this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A request's whole deadline: [`READ_TIMEOUT`] plus the time its bytes take at this rate.
const MIN_RATE: u64 = 64 * 1024;

/// What the session tells a web seed connection.
#[derive(Debug)]
pub enum WebCommand {
    /// Fetch these blocks (the connection is idle when it gets this).
    Fetch(Vec<BlockRef>),
}

/// What a web seed connection reports to the session, on the session's input channel.
#[derive(Debug)]
pub enum WebEvent {
    /// As a peer's `Block`: `written` when the bytes are in storage under the block's claim;
    /// otherwise another copy was written first and these were read past.
    Block { block: BlockRef, written: bool },
    /// Every block of the assignment was reported.
    Done,
    /// The assignment broke off; the blocks not reported were not written.
    Failed(Fault),
    /// Something about the seed a person should know that is not a fault (said once per
    /// seed): e.g. it ignores `Range`, so every request reads from the start of the file.
    Notice(String),
    /// The connection's thread is ending (also after a panic): it can be joined.
    Gone,
}

/// One web seed, shared by its connections.
#[derive(Debug)]
pub struct Seed {
    /// As the torrent or the user gave it (for notices).
    pub url: String,
    /// Keep-alive connections, shared by this seed's connection threads.
    pub agent: ureq::Agent,
    /// Per file, its URL on this seed (`None` for pad files).
    pub file_urls: Vec<Option<String>>,
    /// Per file, whether it is a pad file (zeros).
    pub pad: Vec<bool>,
    /// Set when the seed is given up or the run ends: its connections stop at the next block.
    pub stop: AtomicBool,
    /// Whether the seed was reported to ignore `Range` (once, by whichever connection saw it).
    pub ignores_range_told: AtomicBool,
}

/// A connection's thread: takes assignments until the session drops its command sender or
/// stops the seed. Reports `Gone` last, whatever happens (a drop guard).
pub fn spawn(
    key: PeerKey,
    seed: Arc<Seed>,
    ctx: Arc<peer::Context>,
    commands: Receiver<WebCommand>,
    out: Sender<Input>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("web seed".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let guard = GoneGuard {
                key,
                out: out.clone(),
            };
            let mut conn = Conn {
                key,
                seed,
                ctx,
                out,
                scratch: vec![0; 64 * 1024],
                block: vec![0; crate::geometry::BLOCK_LEN as usize],
            };
            while let Ok(WebCommand::Fetch(blocks)) = commands.recv() {
                if conn.seed.stop.load(Ordering::Relaxed) {
                    break;
                }
                let event = match conn.fetch(&blocks) {
                    Ok(()) => WebEvent::Done,
                    Err(Ended::Fault(f)) => WebEvent::Failed(f),
                    Err(Ended::Stopped) => break,
                };
                if !conn.emit(event) {
                    break;
                }
            }
            drop(guard);
        })
}

struct GoneGuard {
    key: PeerKey,
    out: Sender<Input>,
}

impl Drop for GoneGuard {
    fn drop(&mut self) {
        let _ = self.out.send(Input::WebSeed {
            key: self.key,
            event: WebEvent::Gone,
        });
    }
}

/// Why an assignment ended early.
enum Ended {
    Fault(Fault),
    /// The seed was stopped or the session has gone.
    Stopped,
}

struct Conn {
    key: PeerKey,
    seed: Arc<Seed>,
    ctx: Arc<peer::Context>,
    out: Sender<Input>,
    /// Bytes read past (blocks written by others).
    scratch: Vec<u8>,
    /// The block being received, before it is claimed and copied into the map.
    block: Vec<u8>,
}

impl Conn {
    fn emit(&self, event: WebEvent) -> bool {
        self.out
            .send(Input::WebSeed {
                key: self.key,
                event,
            })
            .is_ok()
    }

    fn fetch(&mut self, blocks: &[BlockRef]) -> Result<(), Ended> {
        let g = &self.ctx.geometry;
        for run in plan::runs(g, blocks) {
            let segments = plan::segments(g, &self.seed.pad, run.offset, run.len);
            let mut src = Source {
                seed: &self.seed,
                geometry: g,
                segments,
                at: 0,
                body: None,
                fault: None,
                notice: None,
            };
            for (i, &block) in run.blocks.iter().enumerate() {
                if self.seed.stop.load(Ordering::Relaxed) {
                    return Err(Ended::Stopped);
                }
                let len = block.len as usize;
                let storage = &self.ctx.storage;
                let written = if storage.taken(block) {
                    // Others wrote the rest (endgame): no need to read it.
                    if run.blocks[i..].iter().all(|b| storage.taken(*b)) {
                        break;
                    }
                    src.skip(len as u64, &mut self.scratch)
                        .map_err(|e| src.ended(&e))?;
                    false
                } else {
                    if let Some(limit) = &self.ctx.download_limit {
                        limit.acquire(len as u64);
                    }
                    // The block is read first and claimed after: a connection waiting on a
                    // slow server must not hold a claim that a faster source could use.
                    let bytes = &mut self.block[..len];
                    src.read_into(bytes).map_err(|e| src.ended(&e))?;
                    storage
                        .claim(block)
                        .is_some_and(|claim| claim.fill(&mut &bytes[..]).is_ok())
                };
                if let Some(n) = src.notice.take()
                    && !self.emit(WebEvent::Notice(n))
                {
                    return Err(Ended::Stopped);
                }
                if !self.emit(WebEvent::Block { block, written }) {
                    return Err(Ended::Stopped);
                }
            }
        }
        Ok(())
    }
}

/// The bytes of one run, segment after segment: each file's bytes from its own request
/// (opened when first needed), a pad file's as zeros.
struct Source<'a> {
    seed: &'a Seed,
    geometry: &'a crate::geometry::Geometry,
    /// What is left of the run; `segments[at]` is the current one, shrunk as it is consumed.
    segments: Vec<Segment>,
    at: usize,
    /// The open answer for `segments[at]`, if any.
    body: Option<ureq::BodyReader<'static>>,
    /// Why the last read failed, when it was the server's answer.
    fault: Option<Fault>,
    /// A notice for the session, taken by the connection after each block.
    notice: Option<String>,
}

impl Source<'_> {
    /// Why the run ended, from the error a read returned.
    fn ended(&mut self, e: &io::Error) -> Ended {
        Ended::Fault(
            self.fault
                .take()
                .unwrap_or_else(|| Fault::Transient(format!("reading the body: {e}"))),
        )
    }

    fn fail(&mut self, fault: Fault) -> io::Error {
        let e = io::Error::other(fault.to_string());
        self.fault = Some(fault);
        e
    }

    /// The current segment, moving past finished ones.
    fn current(&mut self) -> io::Result<Segment> {
        while self.segments.get(self.at).is_some_and(|s| s.len == 0) {
            self.at += 1;
            self.body = None;
        }
        match self.segments.get(self.at) {
            Some(s) => Ok(*s),
            None => Err(io::Error::other("read past the end of a run")),
        }
    }

    fn consumed(&mut self, n: u64) {
        let s = &mut self.segments[self.at];
        s.file_offset += n;
        s.len -= n;
    }

    /// Opens the request for the rest of the current segment.
    fn open(&mut self, seg: Segment) -> io::Result<()> {
        let Some(url) = self.seed.file_urls.get(seg.file).cloned().flatten() else {
            return Err(io::Error::other("no URL for a file"));
        };
        let (first, last) = seg.range();
        let deadline = READ_TIMEOUT + Duration::from_secs(seg.len / MIN_RATE);
        let range = format!("bytes={first}-{last}");
        let resp = crate::http::get_with(&self.seed.agent, &url, &|req| {
            req.header("Range", &range)
                .header("Accept-Encoding", "identity")
                .config()
                .timeout_global(Some(deadline))
                .build()
        });
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Err(self.fail(classify(&e))),
        };
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok());
        let head = Head {
            status: resp.status().as_u16(),
            content_range: header("content-range"),
            content_length: header("content-length"),
            content_encoding: header("content-encoding"),
            retry_after: header("retry-after"),
        };
        let file_len = self.geometry.file_len(seg.file);
        let delivery = response::check(&head, seg.file, (first, last), file_len);
        let delivery = match delivery {
            Ok(d) => d,
            Err(f) => return Err(self.fail(f)),
        };
        let mut body = resp.into_body().into_reader();
        if let Delivery::Skip(mut n) = delivery {
            if !self.seed.ignores_range_told.swap(true, Ordering::Relaxed) {
                self.notice = Some(
                    "the server ignores Range requests (200 instead of 206): each request \
                     reads the file from its start; still used"
                        .into(),
                );
            }
            let mut scratch = [0u8; 16 * 1024];
            while n > 0 {
                let k = n.min(scratch.len() as u64) as usize;
                read_full(&mut body, &mut scratch[..k]).map_err(|e| self.fail(body_fault(&e)))?;
                n -= k as u64;
            }
        }
        self.body = Some(body);
        Ok(())
    }

    /// Reads past `n` bytes: with no answer open yet, the request simply starts later.
    fn skip(&mut self, mut n: u64, scratch: &mut [u8]) -> io::Result<()> {
        while n > 0 {
            let seg = self.current()?;
            let k = n.min(seg.len);
            if self.body.is_some() {
                let mut left = k;
                while left > 0 {
                    let c = left.min(scratch.len() as u64) as usize;
                    self.read_body(&mut scratch[..c])?;
                    left -= c as u64;
                }
            }
            self.consumed(k);
            n -= k;
        }
        Ok(())
    }

    fn read_body(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let body = self.body.as_mut().expect("opened by the caller");
        match read_full(body, dst) {
            Ok(()) => Ok(()),
            Err(e) => {
                let f = body_fault(&e);
                self.body = None;
                Err(self.fail(f))
            }
        }
    }
}

impl ReadInto for Source<'_> {
    fn read_into(&mut self, mut dst: &mut [u8]) -> io::Result<()> {
        while !dst.is_empty() {
            let seg = self.current()?;
            let k = (dst.len() as u64).min(seg.len) as usize;
            let (now, rest) = dst.split_at_mut(k);
            if seg.zeros {
                now.fill(0);
            } else {
                if self.body.is_none() {
                    self.open(seg)?;
                }
                self.read_body(now)?;
            }
            self.consumed(k as u64);
            dst = rest;
        }
        Ok(())
    }
}

/// Fills `dst` exactly; a body that ends first is short.
fn read_full(body: &mut impl Read, mut dst: &mut [u8]) -> io::Result<()> {
    while !dst.is_empty() {
        match body.read(dst) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => dst = &mut dst[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn body_fault(e: &io::Error) -> Fault {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Fault::Transient("the body ended early".to_string()),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            Fault::Transient("timed out reading the body".to_string())
        }
        _ => Fault::Transient(format!("reading the body: {e}")),
    }
}

/// Which request errors make a seed useless, and which are worth another try.
fn classify(e: &crate::http::GetError) -> Fault {
    use crate::http::GetError;
    match e {
        GetError::RedirectScheme(_) | GetError::Redirects(_) => Fault::Fatal(e.to_string()),
        GetError::Ureq(u) => match u {
            ureq::Error::HostNotFound
            | ureq::Error::BadUri(_)
            | ureq::Error::Tls(_)
            | ureq::Error::Rustls(_)
            | ureq::Error::TooManyRedirects
            | ureq::Error::RedirectFailed
            | ureq::Error::InvalidProxyUrl
            | ureq::Error::Protocol(_)
            | ureq::Error::LargeResponseHeader(..) => Fault::Fatal(e.to_string()),
            // TLS alerts and certificate errors surface as invalid data.
            ureq::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
                Fault::Fatal(e.to_string())
            }
            _ => Fault::Transient(e.to_string()),
        },
    }
}
