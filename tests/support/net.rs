//! Loopback addresses and ports: one allocator for every suite, free and closed ports, and a
//! listener that only records who connects.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{lock, poll_until};

/// How long a server thread sleeps between two looks at a non-blocking socket.
pub const SERVER_POLL: Duration = Duration::from_millis(5);

static NEXT_IP: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other party of this test process uses: 127.A.B.C with A derived from
/// this process's id, so two test processes never share an address either, and `ss` filters
/// by address see only one test's connections. Transmission keeps one connection per IP
/// address, so every client gets its own. 127.0.0.1 is left to probes and fixed services.
pub fn next_loopback() -> Ipv4Addr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    assert!(
        n < 200 * 200,
        "ran out of loopback addresses in one test process"
    );
    let a = 20 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, a, (n / 200) as u8, 20 + (n % 200) as u8)
}

/// The address as an `IpAddr`, for `--bind`.
pub fn ip4(ip: Ipv4Addr) -> IpAddr {
    IpAddr::V4(ip)
}

pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("expected an IPv4 address, got {a}"),
    }
}

/// A TCP port that was free on 127.0.0.1 a moment ago (bind port 0, read it, drop it).
/// Only for reference clients that need a port number up front.
pub fn free_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// Like [`free_port`], on a given loopback address.
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("cannot bind {ip}:0 to find a free port: {e}"));
    listener.local_addr().expect("local_addr").port()
}

/// An address on 127.0.0.1 nothing listens on (bound a moment ago, then closed).
pub fn closed_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// A tracker URL on a port nothing listens on.
pub fn closed_port_url() -> String {
    format!("http://{}/announce", closed_addr())
}

/// Accepts one connection on `listener` within `within`, polling.
pub fn accept_within(listener: &TcpListener, within: Duration) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let got = poll_until(within, || match listener.accept() {
        Ok((stream, _)) => Some(Ok(stream)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => Some(Err(format!("accept failed: {e}"))),
    });
    let stream = got.unwrap_or_else(|| Err(format!("nobody connected within {within:?}")))?;
    stream.set_nonblocking(false).expect("blocking stream");
    Ok(stream)
}

/// A non-blocking accept loop on its own thread until `stop` is set; `handle` gets every
/// connection.
pub fn accept_loop(
    listener: TcpListener,
    name: &str,
    stop: Arc<AtomicBool>,
    mut handle: impl FnMut(TcpStream, SocketAddr) + Send + 'static,
) -> JoinHandle<()> {
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, from)) => {
                        let _ = stream.set_nonblocking(false);
                        handle(stream, from);
                    }
                    Err(_) => thread::sleep(SERVER_POLL),
                }
            }
        })
        .expect("spawn an accept thread")
}

/// A peer address bitfetch must never dial: records who connects.
pub struct Trap {
    pub addr: SocketAddr,
    hits: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Trap {
    /// On an address of its own.
    pub fn start() -> Trap {
        Trap::start_on(next_loopback())
    }

    pub fn start_on(ip: Ipv4Addr) -> Trap {
        let listener = TcpListener::bind((ip, 0)).expect("bind the trap");
        let addr = listener.local_addr().expect("local_addr");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let recorded = Arc::clone(&hits);
        let thread = accept_loop(listener, "trap", Arc::clone(&stop), move |_, from| {
            lock(&recorded).push(from)
        });
        Trap {
            addr,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Who connected, in order.
    pub fn hits(&self) -> Vec<SocketAddr> {
        lock(&self.hits).clone()
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Fails the test unless this process is in a network namespace whose only interface is
/// loopback (what `scripts/test` sets up). Tests that resolve names (under `.invalid`, which
/// must fail) call it first: outside such a namespace the resolver would ask a real DNS
/// server, and tests send nothing beyond loopback.
pub fn require_private_network(why: &str) {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    let others: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .filter(|name| *name != "lo")
        .collect();
    assert!(
        others.is_empty(),
        "this test {why}, so it runs only in a network namespace with nothing but loopback \
         (interfaces here: {others:?}); run it through scripts/test, or under \
         `unshare --net --map-root-user sh -c 'ip link set lo up && cargo test ...'`"
    );
}
