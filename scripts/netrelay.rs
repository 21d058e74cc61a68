//! A shaping TCP relay for `scripts/bench-net`: it stands in front of a peer and makes every
//! connection to it cross a link with latency, a bandwidth cap and, optionally, loss-like stalls.
//! This kernel has no `netem`, so the delay cannot come from the qdisc layer.
//!
//! Standard library only, built by the harness with `rustc -O` (it is not part of the crate):
//!
//!   netrelay ROUTE...
//!   ROUTE = LISTEN_IP:PORT>TARGET_IP:PORT/DELAY_MS/RATE_BPS[/STALL_PER_MILLE:STALL_MS]
//!
//! DELAY_MS is added to each direction (the round trip gains twice as much); RATE_BPS caps each
//! direction of the route (0: no cap), shared by every connection through it, as a host's access
//! link is. Stalls pause one direction of one connection for STALL_MS with the given chance per
//! chunk, as a retransmission time-out would. It prints `ready` once every route listens, then
//! every 100 ms a line `stat MILLISECONDS BYTES_TO_TARGETS BYTES_FROM_TARGETS` (totals over all
//! routes since start, as written), and runs until killed.
//!
//! Each accepted connection gets its own upstream source address (127.64.x.y onwards), so the
//! target sees every relayed peer at an address of its own, as on the internet.
//!
//! Per direction, a reader thread stamps what it reads and queues it, and a writer thread sends
//! it once due and paid for. The queue is bounded in bytes: a full queue stops the reader, and
//! TCP's flow control pushes back on the sender, as a router's full buffer would.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;
const STACK: usize = 128 * 1024;

#[derive(Clone, Copy)]
struct Shape {
    delay: Duration,
    rate: u64,
    stall_per_mille: u32,
    stall: Duration,
}

struct Route {
    listen: SocketAddrV4,
    target: SocketAddrV4,
    shape: Shape,
}

fn parse_route(s: &str) -> Result<Route, String> {
    let bad = || format!("bad route {s:?}: want LISTEN>TARGET/DELAY_MS/RATE_BPS[/PER_MILLE:MS]");
    let (listen, rest) = s.split_once('>').ok_or_else(bad)?;
    let mut parts = rest.split('/');
    let target = parts.next().ok_or_else(bad)?;
    let delay: u64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let rate: u64 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let (mut per_mille, mut stall) = (0, 0);
    if let Some(st) = parts.next() {
        let (p, ms) = st.split_once(':').ok_or_else(bad)?;
        per_mille = p.parse().map_err(|_| bad())?;
        stall = ms.parse().map_err(|_| bad())?;
    }
    if parts.next().is_some() || per_mille > 1000 {
        return Err(bad());
    }
    Ok(Route {
        listen: listen.parse().map_err(|_| bad())?,
        target: target.parse().map_err(|_| bad())?,
        shape: Shape {
            delay: Duration::from_millis(delay),
            rate,
            stall_per_mille: per_mille,
            stall: Duration::from_millis(stall),
        },
    })
}

/// A token bucket: `rate` bytes per second, bursts of at most 10 ms of it (16 KiB at least).
struct Bucket {
    rate: u64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        let burst = (rate as f64 / 100.0).max(16384.0);
        Bucket { rate, burst, tokens: burst, at: Instant::now() }
    }

    /// Takes up to `want` bytes' worth; returns how many it may send now, or how long to wait.
    /// It pays out at least 16 KiB at a time (or all that is wanted), so a capped link costs a
    /// few hundred wake-ups a second, not a spin.
    fn take(&mut self, want: usize) -> Result<usize, Duration> {
        let now = Instant::now();
        let rate = self.rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(self.burst);
        self.at = now;
        let need = want.min(16384) as f64;
        if self.tokens >= need {
            let n = (self.tokens as usize).min(want);
            self.tokens -= n as f64;
            Ok(n)
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / rate))
        }
    }
}

/// What a reader hands its writer: data stamped with when it may leave, or the end of input.
enum Item {
    Data(Instant, Vec<u8>),
    End,
}

/// A byte-bounded queue between one reader and one writer.
struct Queue {
    state: Mutex<(VecDeque<Item>, usize, bool)>,
    changed: Condvar,
    cap: usize,
}

impl Queue {
    fn push(&self, item: Item) -> bool {
        let len = match &item {
            Item::Data(_, d) => d.len(),
            Item::End => 0,
        };
        let mut s = self.state.lock().unwrap();
        while s.1 > 0 && s.1 + len > self.cap && !s.2 {
            s = self.changed.wait(s).unwrap();
        }
        if s.2 {
            return false;
        }
        s.1 += len;
        s.0.push_back(item);
        self.changed.notify_all();
        true
    }

    fn pop(&self) -> Item {
        let mut s = self.state.lock().unwrap();
        loop {
            if let Some(item) = s.0.pop_front() {
                if let Item::Data(_, d) = &item {
                    s.1 -= d.len();
                }
                self.changed.notify_all();
                return item;
            }
            s = self.changed.wait(s).unwrap();
        }
    }

    /// The writer is gone: the reader must not wait for room any more.
    fn close(&self) {
        self.state.lock().unwrap().2 = true;
        self.changed.notify_all();
    }
}

fn rand(seed: &mut u64) -> u32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed % 1000) as u32
}

/// One direction of one connection: `from` → `to`, shaped by `shape` and `bucket`.
fn pump(
    from: TcpStream,
    to: TcpStream,
    shape: Shape,
    bucket: Option<Arc<Mutex<Bucket>>>,
    seed: u64,
    sent: &'static AtomicU64,
) {
    // Room for the bytes in flight on the delayed link (rate × delay) plus a buffer.
    let in_flight = if shape.rate > 0 {
        shape.rate as f64 * shape.delay.as_secs_f64()
    } else {
        // Uncapped: as much as 1 GiB/s would keep in flight.
        1e9 * shape.delay.as_secs_f64()
    };
    let queue = Arc::new(Queue {
        state: Mutex::new((VecDeque::new(), 0, false)),
        changed: Condvar::new(),
        cap: in_flight as usize + 4 * CHUNK,
    });
    let q = queue.clone();
    let mut reader = from.try_clone().expect("clone");
    let writer_from = from;
    thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        q.push(Item::End);
                        return;
                    }
                    Ok(n) => {
                        if !q.push(Item::Data(Instant::now() + shape.delay, buf[..n].to_vec())) {
                            return;
                        }
                    }
                }
            }
        })
        .expect("spawn");
    thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || {
            let mut to = to;
            let mut seed = seed | 1;
            loop {
                let (due, data) = match queue.pop() {
                    Item::Data(due, data) => (due, data),
                    Item::End => break,
                };
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                if shape.stall_per_mille > 0 && rand(&mut seed) < shape.stall_per_mille {
                    thread::sleep(shape.stall);
                }
                let mut off = 0;
                while off < data.len() {
                    let n = match &bucket {
                        None => data.len() - off,
                        Some(b) => {
                            let got = b.lock().unwrap().take(data.len() - off);
                            match got {
                                Ok(n) => n,
                                Err(wait) => {
                                    thread::sleep(wait);
                                    continue;
                                }
                            }
                        }
                    };
                    if to.write_all(&data[off..off + n]).is_err() {
                        queue.close();
                        let _ = writer_from.shutdown(Shutdown::Both);
                        return;
                    }
                    off += n;
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
        .expect("spawn");
}

/// The next upstream source address: 127.64.0.1, 127.64.0.2, … (never .0 or .255 last).
fn next_source(counter: &AtomicU32) -> Ipv4Addr {
    loop {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let last = n & 0xff;
        if last != 0 && last != 255 {
            return Ipv4Addr::new(127, 64 + ((n >> 16) & 63) as u8, (n >> 8) as u8, last as u8);
        }
    }
}

// Binding before connecting is not in std; these are the libc calls for IPv4 on Linux.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}
extern "C" {
    fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrIn, len: u32) -> i32;
    fn close(fd: i32) -> i32;
}

fn sockaddr(a: SocketAddrV4) -> SockaddrIn {
    SockaddrIn {
        family: 2, // AF_INET
        port: a.port().to_be(),
        addr: u32::from(*a.ip()).to_be(),
        zero: [0; 8],
    }
}

/// Connects to `target` from `source` (any port).
fn connect_from(source: Ipv4Addr, target: SocketAddrV4) -> std::io::Result<TcpStream> {
    const SOCK_STREAM_CLOEXEC: i32 = 1 | 0o2000000;
    let len = std::mem::size_of::<SockaddrIn>() as u32;
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = socket(2, SOCK_STREAM_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let src = sockaddr(SocketAddrV4::new(source, 0));
        let dst = sockaddr(target);
        if bind(fd, &src, len) != 0 || connect(fd, &dst, len) != 0 {
            let e = std::io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

static TO_TARGETS: AtomicU64 = AtomicU64::new(0);
static FROM_TARGETS: AtomicU64 = AtomicU64::new(0);

fn serve(route: Route, counter: Arc<AtomicU32>, listener: TcpListener) {
    let shape = route.shape;
    let (down, up) = if shape.rate > 0 {
        (
            Some(Arc::new(Mutex::new(Bucket::new(shape.rate)))),
            Some(Arc::new(Mutex::new(Bucket::new(shape.rate)))),
        )
    } else {
        (None, None)
    };
    for (i, conn) in listener.incoming().enumerate() {
        let Ok(client) = conn else { continue };
        let source = next_source(&counter);
        let Ok(server) = connect_from(source, route.target) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
        let seed = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(route.listen.port());
        pump(client, s2, shape, down.clone(), seed, &TO_TARGETS);
        pump(server, c2, shape, up.clone(), seed.rotate_left(17), &FROM_TARGETS);
    }
}

fn main() {
    let routes: Result<Vec<Route>, String> = std::env::args().skip(1).map(|a| parse_route(&a)).collect();
    let routes = match routes {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => {
            eprintln!("usage: netrelay LISTEN_IP:PORT>TARGET_IP:PORT/DELAY_MS/RATE_BPS[/PER_MILLE:MS]...");
            std::process::exit(2)
        }
        Err(e) => {
            eprintln!("netrelay: {e}");
            std::process::exit(2)
        }
    };
    let counter = Arc::new(AtomicU32::new(1));
    let mut handles = Vec::new();
    for route in routes {
        let listener = match TcpListener::bind(SocketAddr::V4(route.listen)) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("netrelay: cannot listen on {}: {e}", route.listen);
                std::process::exit(1)
            }
        };
        let counter = counter.clone();
        handles.push(thread::spawn(move || serve(route, counter, listener)));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    let start = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(100));
        let line = format!(
            "stat {} {} {}\n",
            start.elapsed().as_millis(),
            TO_TARGETS.load(Ordering::Relaxed),
            FROM_TARGETS.load(Ordering::Relaxed)
        );
        // The harness has gone: so should the relay.
        if std::io::stdout().write_all(line.as_bytes()).and_then(|_| std::io::stdout().flush()).is_err() {
            break;
        }
    }
    drop(handles);
}
