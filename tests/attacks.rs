//! Issue 16, "Hostile peers and hosts, round 2": one test per finding of the probe, each an
//! attack on the real binary on loopback. Every test fails against the behaviour the issue
//! describes and passes once that class of attack is defended; each also checks that, under
//! the attack, an honest peer still completes its download from the attacked seeder, or the
//! attacked downloader still completes from its honest seeder.
//!
//! Attackers and honest peers each dial from a loopback address of their own (127.A.B.C from
//! [`next_loopback`]), so per-address rules behave as they would on the internet. Memory and
//! CPU are asserted as bounds with generous margins, read from `/proc/PID` (`VmHWM`, `utime +
//! stime`), never as timings; every wait is a poll with a deadline (a hang guard); every
//! process is killed by PID when its guard drops. An attack on memory stops as soon as the
//! victim passes the bound, so a failing test does not take the machine's memory with it.
//!
//! Test names start with the finding they belong to: `queue_` (1, unbounded command queues),
//! `slots_` (2, slot exhaustion), `tmpdir_` (3), `spoof_` (4, peer-id spoofing), `cpu_` (5),
//! `disk_` (6), and `fds_`, `fifo_`, `hardlink_`, `names_`, `unasked_` (7).

mod support;

use std::fs;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use support::bencode::B;
use support::cli::*;
use support::fake_peer::SeedSpec;
use support::fake_tracker::{HttpAction, HttpTracker, announce_reply};
use support::files::{pseudo_random, scratch_dir, walk};
use support::net::{accept_loop, accept_within, closed_addr, next_loopback, v4};
use support::torrent::{BLOCK, Content, PIECE_LEN, multi_info, single_info, torrent_bytes};
use support::wire::*;
use support::*;

/// The single file of most cases.
const NAME: &str = "payload.bin";
/// 64 pieces of 32 KiB and a short 65th.
const SIZE: usize = 2 * 1024 * 1024 + 1234;
/// How long each flood lasts (the probe saw gigabytes within this).
const ATTACK: Duration = Duration::from_secs(10);
/// How long bitfetch may take to drop a connection it must drop (hang guard).
const CLOSE_DEADLINE: Duration = Duration::from_secs(60);
/// How long an honest peer may take to get through once slots are being held (hang guard; it
/// covers a handshake deadline or a 60 s idle rule, and the downloader's redials at 10, 30,
/// 70 and 150 s after a refused first dial, with a margin).
const SLOT_DEADLINE: Duration = Duration::from_secs(200);
/// How long `verify` or `seed` may take to report a FIFO in the data (hang guard).
const FIFO_DEADLINE: Duration = Duration::from_secs(15);

// =============================================================================================
// A torrent and the bitfetch processes around it
// =============================================================================================

/// A single-file torrent in memory and on disk: `t.torrent` (announcing to `tiers`, or to no
/// tracker), `quiet.torrent` (the same info, no tracker: for seeders), the seeder's data.
struct Torrent {
    dir: TempDir,
    content: Arc<Content>,
    info_hash: [u8; 20],
    torrent: PathBuf,
    quiet: PathBuf,
    data: PathBuf,
}

impl Torrent {
    fn new(label: &str, size: usize, piece_len: u32, tiers: &[Vec<String>]) -> Torrent {
        let dir = scratch_dir();
        let content = Arc::new(Content {
            data: pseudo_random(size, seed_of(label)),
            piece_len,
        });
        let info = single_info(NAME.as_bytes(), &content);
        let (bytes, info_hash) = torrent_bytes(&info, tiers);
        let torrent = dir.path().join("t.torrent");
        let quiet = dir.path().join("quiet.torrent");
        let data = dir.path().join("data").join(NAME);
        fs::write(&torrent, bytes).expect("write t.torrent");
        fs::write(&quiet, torrent_bytes(&info, &[]).0).expect("write quiet.torrent");
        fs::create_dir_all(data.parent().expect("a parent")).expect("mkdir data");
        fs::write(&data, &content.data).expect("write the seeder's data");
        Torrent {
            dir,
            content,
            info_hash,
            torrent,
            quiet,
            data,
        }
    }

    /// `bitfetch seed` of the data (no tracker) on `ip`, any port; returns once it listens.
    fn seeder(&self, ip: Ipv4Addr, extra: &[&str]) -> (ChildGuard, SocketAddr) {
        self.seeder_at(SocketAddr::from((ip, 0)), extra)
    }

    /// `bitfetch seed` of the data (no tracker) on `at` (port 0: any); returns once it listens.
    fn seeder_at(&self, at: SocketAddr, extra: &[&str]) -> (ChildGuard, SocketAddr) {
        let mut args = vec![
            s("seed"),
            path_arg(&self.quiet),
            path_arg(&self.data),
            s("--bind"),
            s(at.ip()),
            s("--port"),
            s(at.port()),
        ];
        args.extend(extra.iter().map(s));
        let guard = spawn_bitfetch(&format!("bitfetch seeder {}", at.ip()), &args);
        let addr = wait_for_listening(&guard);
        (guard, addr)
    }

    /// `bitfetch download` of `t.torrent` into a fresh OUT on an address of its own.
    fn downloader(
        &self,
        label: &str,
        peers: &[SocketAddr],
        extra: &[&str],
    ) -> (ChildGuard, PathBuf) {
        let out = self.dir.path().join(format!("out-{label}"));
        fs::create_dir_all(&out).expect("mkdir OUT");
        let ip = next_loopback();
        let mut args = download_args(&self.torrent, &out, ip, peers);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let d = spawn_bitfetch(&format!("bitfetch downloader {label} {ip}"), &args);
        (d, out)
    }

    /// Why the download into `out` did not end well (exit 0, the right bytes), if it did not:
    /// waits up to `within` for the exit.
    fn download_problem(&self, d: &ChildGuard, out: &Path, within: Duration) -> Option<String> {
        if d.wait_timeout(within).is_none() {
            return Some(format!("the download did not finish within {within:?}"));
        }
        let status = d.exit_status();
        if d.stderr_text().contains("panicked") || status.and_then(|s| s.code()) != Some(0) {
            return Some(format!("the download {}", describe_status(status)));
        }
        let got = fs::read(out.join(NAME)).unwrap_or_default();
        (got != self.content.data).then(|| {
            format!(
                "the downloaded file differs from the original ({} bytes, want {})",
                got.len(),
                self.content.data.len()
            )
        })
    }
}

/// Fails with every problem found and everyone's diagnostics, or returns.
fn verdict(label: &str, problems: &[String], parts: &[&dyn Diagnose]) {
    if !problems.is_empty() {
        fail(&format!("{label}:\n  {}", problems.join("\n  ")), parts);
    }
}

/// A listening socket that never accepts: a `--peer` that keeps a downloader hoping (and so
/// running) until the peers of the test arrive.
fn holder() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind((next_loopback(), 0)).expect("bind the holder");
    let addr = l.local_addr().expect("local_addr");
    (l, addr)
}

// =============================================================================================
// Attackers
// =============================================================================================

/// Dials `to` from `from` with a 4 KiB receive buffer, set before the connection exists, so
/// that a peer which stops reading makes bitfetch's writes block within a few kilobytes.
fn dial_small_window(from: Ipv4Addr, to: SocketAddr) -> Wire {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
        .bind(&SockAddr::from(SocketAddr::new(IpAddr::V4(from), 0)))
        .expect("bind the attacker");
    socket
        .connect_timeout(&SockAddr::from(to), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the attacker cannot dial {to}: {e}"));
    Wire::new(socket.into())
}

/// Sends our handshake and reads theirs: (reserved, info hash, peer id).
fn shake(
    wire: &mut Wire,
    info_hash: &[u8; 20],
    id: &[u8; 20],
    reserved: [u8; 8],
) -> HandshakeParts {
    wire.send(&handshake(info_hash, id, reserved))
        .unwrap_or_else(|e| panic!("sending the attacker's handshake: {e}"));
    wire.handshake_parts(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("reading bitfetch's handshake: {e}"))
}

/// What a flood achieved.
#[derive(Debug, Default)]
struct Flood {
    bytes: u64,
    /// bitfetch closed the connection during the flood (how).
    closed: Option<String>,
    /// Stopped early: the victim's resident memory passed the bound.
    over_memory: bool,
}

/// Writes `unit` (whole frames) over and over for [`ATTACK`] without reading a byte, never
/// splitting a frame; stops early when bitfetch closes the connection or the victim (`pid`)
/// has used more than [`MEMORY_LIMIT_KIB`].
fn flood(wire: &mut Wire, unit: &[u8], pid: u32, sent: &AtomicU64) -> Flood {
    let _ = wire
        .stream
        .set_write_timeout(Some(Duration::from_millis(200)));
    let mut f = Flood::default();
    let mut at = 0;
    let end = Instant::now() + ATTACK;
    while Instant::now() < end {
        if proc_status_kib(pid, "VmHWM").is_some_and(|kib| kib > MEMORY_LIMIT_KIB) {
            f.over_memory = true;
            break;
        }
        match wire.stream.write(&unit[at..]) {
            Ok(0) => {
                f.closed = Some("write returned 0".into());
                break;
            }
            Ok(n) => {
                f.bytes += n as u64;
                sent.store(f.bytes, Ordering::SeqCst);
                at = (at + n) % unit.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                f.closed = Some(format!("closed during the flood ({e})"));
                break;
            }
        }
    }
    f
}

/// Waits until the flood is under way (1 MiB sent) or already over (the victim dropped the
/// attacker first: the verdict looks at that), with a hang guard.
fn wait_for_flood(sent: &AtomicU64, ended: &AtomicBool) {
    let started = poll_until(Duration::from_secs(30), || {
        (sent.load(Ordering::SeqCst) >= 1 << 20 || ended.load(Ordering::SeqCst)).then_some(())
    });
    assert!(started.is_some(), "the flood never got under way");
}

/// Bytes waiting to be read on `stream` (FIONREAD).
fn unread_bytes(stream: &TcpStream) -> usize {
    use std::os::unix::io::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

/// `unit` repeated until it is about 64 KiB: one write's worth.
fn repeated(unit: &[u8]) -> Vec<u8> {
    unit.repeat((64 * 1024 / unit.len()).max(1))
}

/// The memory, drop and completion verdict of a flood.
/// A victim that closes the connection only when it exits has not dropped the attacker.
fn flood_problems(
    label: &str,
    f: &Flood,
    wire: &mut Wire,
    mem: &MemWatch,
    victim: &ChildGuard,
) -> Vec<String> {
    let mut problems = Vec::new();
    let peak = mem.peak_kib();
    eprintln!(
        "{label}: flooded {} bytes; victim peak {peak} KiB; {f:?}",
        f.bytes
    );
    if f.over_memory || peak >= MEMORY_LIMIT_KIB {
        problems.push(format!(
            "the victim's peak resident memory reached {peak} KiB under the flood (bound \
             {MEMORY_LIMIT_KIB} KiB) after {} bytes of attack",
            f.bytes
        ));
    }
    if f.closed.is_none() {
        match wire.expect_closed(CLOSE_DEADLINE) {
            Err(e) => problems.push(format!("the attacker was not dropped: {e}")),
            Ok(_) if !victim.is_running() => problems.push(
                "the attacker was not dropped: its connection closed only when the victim exited"
                    .into(),
            ),
            Ok(_) => {}
        }
    }
    problems
}

/// An attacker dials a `bitfetch seed` with a small receive window, shakes hands, runs
/// `prepare` (while still reading), then floods `unit` without reading. Three seconds in, an
/// honest downloader starts; it must complete from the seeder, whose memory must stay bounded
/// and which must drop the attacker.
fn flood_seeder(label: &str, size: usize, prepare: impl FnOnce(&mut Wire), unit: &[u8]) {
    let t = Torrent::new(label, size, PIECE_LEN, &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &[]);
    let mem = MemWatch::start(&seeder);
    let mut wire = dial_small_window(next_loopback(), s_addr);
    shake(&mut wire, &t.info_hash, &peer_id("ATK"), FAST);
    prepare(&mut wire);
    let unit = repeated(unit);
    let sent = AtomicU64::new(0);
    let ended = AtomicBool::new(false);
    let (f, d, out) = thread::scope(|scope| {
        let attack = scope.spawn(|| {
            let f = flood(&mut wire, &unit, seeder.pid(), &sent);
            ended.store(true, Ordering::SeqCst);
            f
        });
        wait_for_flood(&sent, &ended);
        let (d, out) = t.downloader("honest", &[s_addr], &[]);
        let f = attack.join().expect("the flood thread");
        (f, d, out)
    });
    let mut problems = flood_problems(label, &f, &mut wire, &mem, &seeder);
    problems.extend(t.download_problem(&d, &out, DEADLINE));
    verdict(label, &problems, &[&seeder, &d]);
}

// =============================================================================================
// 1. Unbounded command queues
// =============================================================================================

fn interest_flapping() -> Vec<u8> {
    [frame(id::INTERESTED, &[]), frame(id::NOT_INTERESTED, &[])].concat()
}

#[test]
fn queue_interest_flapping_peer_that_never_reads_cannot_grow_a_seeder() {
    flood_seeder(
        "interest flapping vs seeder",
        SIZE,
        |_| {},
        &interest_flapping(),
    );
}

#[test]
fn queue_cancel_storm_against_a_writer_that_cannot_send_cannot_grow_a_seeder() {
    // 300 blocks asked for (4.7 MiB, more than the kernel's largest send buffer, fewer than
    // a seeder may queue), so the writer is stuck on them; then cancels of those same blocks,
    // over and over.
    let asked: Vec<(u32, u32, u32)> = (0..150)
        .flat_map(|p| [(p, 0, BLOCK), (p, BLOCK, BLOCK)])
        .collect();
    let storm: Vec<u8> = asked
        .iter()
        .flat_map(|&(p, o, l)| frame(id::CANCEL, &triple(p, o, l)))
        .collect();
    flood_seeder(
        "cancel storm vs seeder",
        8 << 20,
        |wire| {
            wire.send(&frame(id::INTERESTED, &[]))
                .expect("send interested");
            let unchoked = wire
                .wait_for(Duration::from_secs(30), |m| *m == Msg::Unchoke)
                .expect("the seeder hung up before unchoking");
            assert!(
                unchoked.is_some(),
                "the seeder never unchoked an interested peer"
            );
            let requests: Vec<u8> = asked
                .iter()
                .flat_map(|&(p, o, l)| msg_request(p, o, l))
                .collect();
            wire.send(&requests).expect("send the requests");
            // Not reading from here on: the storm starts once the seeder's blocks fill our
            // small window, so its writer is stuck behind them.
            let full = poll_until(Duration::from_secs(30), || {
                (unread_bytes(&wire.stream) >= 4096).then_some(())
            });
            assert!(
                full.is_some(),
                "the seeder never filled the attacker's window"
            );
        },
        &storm,
    );
}

/// The downloader dials a holder (so it waits), the attacker dials the downloader and floods
/// interest flapping without reading; three seconds in, an honest bitfetch seeder dials the
/// downloader, which must complete with bounded memory and drop the attacker.
#[test]
fn queue_interest_flapping_peer_that_never_reads_cannot_grow_a_downloader() {
    let label = "interest flapping vs downloader";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let (_holder, hold) = holder();
    let (d, out) = t.downloader("attacked", &[hold], &[]);
    let mem = MemWatch::start(&d);
    let target = wait_for_listening(&d);
    let mut wire = dial_small_window(next_loopback(), target);
    shake(&mut wire, &t.info_hash, &peer_id("ATK"), FAST);
    let unit = repeated(&interest_flapping());
    let sent = AtomicU64::new(0);
    let ended = AtomicBool::new(false);
    let (f, seeder) = thread::scope(|scope| {
        let attack = scope.spawn(|| {
            let f = flood(&mut wire, &unit, d.pid(), &sent);
            ended.store(true, Ordering::SeqCst);
            f
        });
        wait_for_flood(&sent, &ended);
        let target_arg = target.to_string();
        // Slowed (2 MiB at 32 KiB/s, about a minute), so the downloader is still running when
        // the drop is checked: a close at its exit is not a drop.
        let (seeder, _) = t.seeder(
            next_loopback(),
            &["--peer", &target_arg, "--max-upload-rate", "32K"],
        );
        (attack.join().expect("the flood thread"), seeder)
    });
    let mut problems = flood_problems(label, &f, &mut wire, &mem, &d);
    problems.extend(t.download_problem(&d, &out, DEADLINE));
    verdict(label, &problems, &[&d, &seeder]);
}

// =============================================================================================
// 2. Slot exhaustion
// =============================================================================================

/// Connections an attacker holds open from a thread of its own until dropped.
struct Siege {
    _worker: Worker,
    what: Arc<Mutex<String>>,
}

impl Siege {
    /// Runs `tend` every 100 ms over `wires` until dropped; `tend` says what it saw.
    fn start(
        mut wires: Vec<Wire>,
        mut tend: impl FnMut(&mut [Wire], Instant) -> String + Send + 'static,
    ) -> Siege {
        let what = Arc::new(Mutex::new(String::new()));
        let said = Arc::clone(&what);
        let worker = Worker::spawn(move |stop| {
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                *lock(&said) = tend(&mut wires, started);
                thread::sleep(Duration::from_millis(100));
            }
        });
        Siege {
            _worker: worker,
            what,
        }
    }
}

impl Diagnose for Siege {
    fn diagnostics(&self) -> String {
        format!(
            "===== the attacker's connections =====\n{}\n",
            lock(&self.what)
        )
    }
}

/// Reads whatever is waiting on each wire without blocking; says how many are still open.
fn drain_all(wires: &mut [Wire]) -> usize {
    let mut open = 0;
    for w in wires.iter_mut() {
        // A millisecond's read: enough to see an end of stream, short enough for 50 wires.
        if w.next(Instant::now() + Duration::from_millis(1)).is_ok() {
            open += 1;
        }
    }
    open
}

/// A `bitfetch seed --max-peers 10` whose slots an attacker on one address tries to hold
/// with `siege`; an honest downloader must still complete from it within [`SLOT_DEADLINE`].
fn seeder_keeps_a_slot_for_the_honest(
    label: &str,
    siege: impl FnOnce(SocketAddr, [u8; 20]) -> Siege,
) {
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &["--max-peers", "10"]);
    let held = siege(s_addr, t.info_hash);
    let (d, out) = t.downloader("honest", &[s_addr], &[]);
    let problems: Vec<String> = t
        .download_problem(&d, &out, SLOT_DEADLINE)
        .into_iter()
        .collect();
    verdict(label, &problems, &[&seeder, &d, &held]);
}

/// Twelve connections from one address, each sending one byte of its handshake every 5 s:
/// the handshake must have a deadline of its own, not one per read.
#[test]
fn slots_half_open_handshakes_dribbling_a_byte_every_5s_do_not_lock_out_a_seeder() {
    seeder_keeps_a_slot_for_the_honest("dribbling handshakes", |s_addr, info_hash| {
        let ip = next_loopback();
        let wires: Vec<Wire> = (0..12)
            .map(|_| Wire::dial(ip, s_addr).expect("dial the seeder"))
            .collect();
        let hs = handshake(&info_hash, &peer_id("DRB"), NO_EXTENSIONS);
        let mut sent = 0;
        Siege::start(wires, move |wires, started| {
            let due = (started.elapsed().as_secs() / 5 + 1) as usize;
            while sent < due.min(hs.len()) {
                for w in wires.iter_mut() {
                    let _ = w.send(&hs[sent..=sent]);
                }
                sent += 1;
            }
            let open = drain_all(wires);
            format!("{sent} handshake byte(s) sent on each; {open} of 12 still open")
        })
    });
}

/// Ten connections from one address: a full handshake and `interested`, then nothing but a
/// keep-alive every 30 s (they read what they are sent). Idle peers must give way.
#[test]
fn slots_idle_interested_peers_do_not_lock_out_a_seeder() {
    seeder_keeps_a_slot_for_the_honest("idle interested peers", |s_addr, info_hash| {
        let ip = next_loopback();
        let wires: Vec<Wire> = (0..10)
            .filter_map(|_| {
                let mut w = Wire::dial(ip, s_addr).ok()?;
                w.send(&handshake(&info_hash, &peer_id("IDL"), NO_EXTENSIONS))
                    .ok()?;
                w.send(&frame(id::INTERESTED, &[])).ok()?;
                Some(w)
            })
            .collect();
        let mut last_keepalive = Instant::now();
        Siege::start(wires, move |wires, _| {
            if last_keepalive.elapsed() >= Duration::from_secs(30) {
                for w in wires.iter_mut() {
                    let _ = w.send(&[0, 0, 0, 0]);
                }
                last_keepalive = Instant::now();
            }
            let open = drain_all(wires);
            format!("{open} idle interested connection(s) still open")
        })
    });
}

/// A reserved address on its own loopback IP, nothing listening on it yet.
fn reserved_addr() -> SocketAddr {
    let l = TcpListener::bind((next_loopback(), 0)).expect("reserve an address");
    l.local_addr().expect("local_addr")
}

/// The downloader's only peer is down when it starts (one failed dial); 50 idle inbound
/// connections from one address then fill its table; the seeder comes up. Inbound floods
/// must never stop a downloader dialling: it must reach the seeder and complete.
#[test]
fn slots_fifty_idle_inbound_sockets_do_not_stop_a_downloader_dialling_its_seeder() {
    let label = "fifty idle inbound vs downloader";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let s_addr = reserved_addr();
    let (d, out) = t.downloader("attacked", &[s_addr], &[]);
    let target = wait_for_listening(&d);
    let ip = next_loopback();
    let wires: Vec<Wire> = (0..50)
        .filter_map(|_| {
            let mut w = Wire::dial(ip, target).ok()?;
            w.send(&handshake(&t.info_hash, &peer_id("IDL"), NO_EXTENSIONS))
                .ok()?;
            Some(w)
        })
        .collect();
    let idle = Siege::start(wires, |wires, _| {
        format!(
            "{} of 50 idle inbound connection(s) still open",
            drain_all(wires)
        )
    });
    let (seeder, _) = t.seeder_at(s_addr, &[]);
    let problems: Vec<String> = t
        .download_problem(&d, &out, SLOT_DEADLINE)
        .into_iter()
        .collect();
    verdict(label, &problems, &[&d, &seeder, &idle]);
}

/// Forwards every connection it accepts to `target` once `failures` connections have been
/// accepted and closed at once (a peer that was down, or kept busy, for a while).
struct Flaky {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _worker: Worker,
}

impl Flaky {
    fn start(failures: usize, target: Arc<Mutex<Option<SocketAddr>>>) -> Flaky {
        let listener = TcpListener::bind((next_loopback(), 0)).expect("bind the flaky peer");
        let addr = listener.local_addr().expect("local_addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let accepted = Arc::clone(&accepted);
            accept_loop(listener, "flaky", Arc::clone(&stop), move |client, _| {
                let n = accepted.fetch_add(1, Ordering::SeqCst);
                let to = *lock(&target);
                if n < failures {
                    return; // dropped: closed before any handshake
                }
                if let Some(upstream) = to.and_then(|to| TcpStream::connect(to).ok()) {
                    splice(client, upstream);
                }
            })
        };
        Flaky {
            addr,
            accepted,
            _worker: Worker::watching(stop, thread),
        }
    }
}

/// Copies both ways between `a` and `b` on two threads until either side ends.
fn splice(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// The seeder refuses the first two dials (closed before a handshake), then answers: the
/// downloader must come back to it after its back-off (10 s, then 20 s) and complete.
#[test]
fn slots_a_seeder_that_failed_two_dials_is_dialled_again_and_used() {
    let label = "seeder down for two dials";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let target = Arc::new(Mutex::new(None));
    let flaky = Flaky::start(2, Arc::clone(&target));
    let (d, out) = t.downloader("patient", &[flaky.addr], &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &[]);
    *lock(&target) = Some(s_addr);
    let mut problems: Vec<String> = t
        .download_problem(&d, &out, SLOT_DEADLINE)
        .into_iter()
        .collect();
    let dials = flaky.accepted.load(Ordering::SeqCst);
    if dials <= 2 {
        problems.push(format!(
            "the downloader dialled the seeder {dials} time(s) only"
        ));
    }
    verdict(label, &problems, &[&d, &seeder]);
}

// =============================================================================================
// 3. Predictable temporary directory
// =============================================================================================

/// `download -O -` without `-o` keeps its data in a directory under `$TMPDIR`. Another local
/// user who made that directory first (every name bitfetch has used or might derive from its
/// pid and the info hash, world-writable) must not get it used: bitfetch makes a fresh one,
/// mode 0700, and leaves the planted ones untouched. bitfetch is started through `sh`, which
/// waits for the planting before it execs bitfetch with its own pid.
#[test]
fn tmpdir_streaming_without_o_uses_a_fresh_private_directory() {
    let label = "predictable temporary directory";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &["--max-upload-rate", "512K"]);
    let tmp = t.dir.path().join("tmp");
    fs::create_dir(&tmp).expect("mkdir TMPDIR");
    let go = t.dir.path().join("go");
    let mut command = Command::new("sh");
    command
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
        .arg("-c")
        .arg(r#"while [ ! -e "$0" ]; do sleep 0.02; done; exec "$@""#)
        .arg(&go)
        .arg(bitfetch())
        .args([
            "download",
            &path_arg(&t.torrent),
            "-O",
            "-",
            "--bind",
            &next_loopback().to_string(),
            "--port",
            "0",
            "--peer",
            &s_addr.to_string(),
        ])
        .env("TMPDIR", &tmp)
        .env_remove("SSL_CERT_FILE");
    let d = ChildGuard::spawn("bitfetch download -O - (through sh)", &mut command);
    let hash = hex(&t.info_hash);
    let planted: Vec<PathBuf> = [
        format!("bitfetch-{}-{hash}", d.pid()),
        format!("bitfetch-{}-{}", d.pid(), &hash[..16]),
        format!("bitfetch-{}", d.pid()),
        format!("bitfetch-{hash}"),
    ]
    .iter()
    .map(|name| tmp.join(name))
    .collect();
    for dir in &planted {
        fs::create_dir(dir).expect("plant a directory");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    }
    fs::write(&go, b"").expect("let bitfetch start");
    let mut problems = Vec::new();
    // Its own directory, seen while it runs; and whatever it does to the planted ones.
    let mut used: Vec<String> = Vec::new();
    let mut look_at_planted = || {
        for dir in &planted {
            let inside = walk(dir);
            let what = if !dir.is_dir() {
                format!("it removed or replaced the planted {}", dir.display())
            } else if !inside.is_empty() {
                format!("it used the planted {}: {inside:?}", dir.display())
            } else {
                continue;
            };
            if !used.contains(&what) {
                used.push(what);
            }
        }
    };
    let own = poll_until(DEADLINE, || {
        look_at_planted();
        let fresh = fs::read_dir(&tmp)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| !planted.contains(p) && p.is_dir());
        fresh.or_else(|| d.exit_status().map(|_| PathBuf::new()))
    });
    match own {
        Some(dir) if dir.as_os_str().is_empty() => {
            problems.push("no fresh directory of its own appeared in $TMPDIR while it ran".into())
        }
        None => problems.push("no directory appeared in $TMPDIR".into()),
        Some(dir) => {
            let mode = fs::symlink_metadata(&dir).map(|m| m.permissions().mode() & 0o7777);
            if !matches!(mode, Ok(0o700)) {
                problems.push(format!(
                    "its directory {} has mode {:?}, not 0700",
                    dir.display(),
                    mode.map(|m| format!("{m:o}"))
                ));
            }
        }
    }
    d.wait_with_deadline(DEADLINE, &|| seeder.diagnostics());
    if d.exit_status().and_then(|s| s.code()) != Some(0) {
        problems.push(format!("it {}", describe_status(d.exit_status())));
    } else if d.stdout() != t.content.data {
        problems.push(format!(
            "stdout carried {} bytes that are not the torrent's {}",
            d.stdout().len(),
            t.content.data.len()
        ));
    }
    look_at_planted();
    problems.extend(used);
    verdict(label, &problems, &[&d, &seeder]);
}

// =============================================================================================
// 4. Peer-id spoofing
// =============================================================================================

/// The peer id a seeder at `addr` handshakes with: anyone can learn it by dialling it.
fn learn_peer_id(addr: SocketAddr, info_hash: &[u8; 20]) -> [u8; 20] {
    let mut wire = Wire::dial(next_loopback(), addr).expect("dial the seeder to learn its id");
    shake(&mut wire, info_hash, &peer_id("SPY"), NO_EXTENSIONS).2
}

/// A tracker whose every reply lists `peers` as they are at the time of the announce.
fn tracker_of(peers: Arc<Mutex<Vec<SocketAddrV4>>>) -> HttpTracker {
    let tracker = HttpTracker::start("tracker");
    tracker.set_script(move |_, _| HttpAction::ok(announce_reply(1, &lock(&peers))));
    tracker
}

/// BEP 10: the extension bit in reserved byte 5.
const EXTENDED: [u8; 8] = [0, 0, 0, 0, 0, 0x10, 0, 0];

/// Which id the attacker handshakes with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Claimed {
    /// One of its own.
    Own,
    /// The honest seeder's, learnt by dialling it.
    Stolen,
    /// The seeder's, against a downloader whose own id is lower: the one of the two orders in
    /// which the twin rule (the larger id's outbound connection survives) keeps the attacker's
    /// inbound connection over the seeder's, where one address's claim could evict another's.
    StolenAndWinningTheTwinRule,
}

/// The downloader announces every second to a tracker that lists only a holder at first. An
/// attacker connects inbound, handshakes with the `claimed` id and plays `act` (which says
/// what became of it); only then does the tracker list the honest seeder, which must still
/// be dialled, used and not banned.
fn seeder_found_after_a_claim(
    label: &str,
    claimed: Claimed,
    from_seeders_ip: bool,
    reserved: [u8; 8],
    act: impl FnOnce(&mut Wire, SocketAddr) -> Result<String, String>,
) {
    let (_holder, hold) = holder();
    let peers = Arc::new(Mutex::new(vec![v4(hold)]));
    let tracker = tracker_of(Arc::clone(&peers));
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[vec![tracker.announce_url()]]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &[]);
    let id = match claimed {
        Claimed::Own => peer_id("CLM"),
        _ => learn_peer_id(s_addr, &t.info_hash),
    };
    let mut attempt = 0;
    let (d, out, mut wire) = loop {
        attempt += 1;
        let (d, out) = t.downloader(
            &format!("victim{attempt}"),
            &[],
            &["--announce-interval", "1"],
        );
        let target = wait_for_listening(&d);
        let IpAddr::V4(seeders_ip) = s_addr.ip() else {
            unreachable!("the seeder listens on IPv4 loopback")
        };
        let from = if from_seeders_ip {
            seeders_ip
        } else {
            next_loopback()
        };
        let mut wire = Wire::dial(from, target).expect("the attacker dials the downloader");
        let theirs = shake(&mut wire, &t.info_hash, &id, reserved).2;
        if claimed != Claimed::StolenAndWinningTheTwinRule || theirs < id || attempt == 20 {
            break (d, out, wire);
        }
    };
    let outcome = act(&mut wire, s_addr);
    lock(&peers).push(v4(s_addr));
    let idle = Siege::start(vec![wire], move |wires, _| {
        let state = if drain_all(wires) == 1 {
            "connected"
        } else {
            "gone"
        };
        format!("the claimant ({attempt} attempt(s)) is {state}; it said: {outcome:?}")
    });
    let mut problems: Vec<String> = t.download_problem(&d, &out, DEADLINE).into_iter().collect();
    let banned = format!("banned peer {}", s_addr.ip());
    if d.stderr_text().contains(&banned) {
        problems.push(format!("the honest seeder was banned ({banned})"));
    }
    verdict(label, &problems, &[&d, &seeder, &tracker, &idle]);
}

/// Claims to have nothing, and waits two seconds for the claim to be read.
fn has_nothing(wire: &mut Wire) -> Result<String, String> {
    let pieces = SIZE.div_ceil(PIECE_LEN as usize);
    wire.send(&frame(id::BITFIELD, &vec![0; pieces.div_ceil(8)]))?;
    wire.idle_until(Instant::now() + Duration::from_secs(2))?;
    Ok("connected, has nothing".into())
}

/// (a) The attacker claims the seeder's id and pushes blocks nobody asked for: it must be
/// banned alone, on its own address; the seeder, listed afterwards, must not be refused.
#[test]
fn spoof_a_peer_claiming_the_seeders_id_and_misbehaving_does_not_get_the_seeder_banned() {
    seeder_found_after_a_claim(
        "spoofed id, unasked blocks",
        Claimed::Stolen,
        false,
        NO_EXTENSIONS,
        |wire, _| {
            let garbage = vec![0xa5u8; BLOCK as usize];
            for piece in 0..40 {
                if wire.send(&msg_piece(piece, 0, &garbage)).is_err() {
                    break;
                }
            }
            wire.expect_closed(CLOSE_DEADLINE)
        },
    );
}

/// (b) The attacker, inbound, handshakes with the seeder's id before the downloader has
/// dialled the seeder: the twin rule must not attach the seeder's address to it.
#[test]
fn spoof_an_inbound_peer_with_the_seeders_id_does_not_stop_the_seeder_being_dialled() {
    seeder_found_after_a_claim(
        "inbound with the seeder's id",
        Claimed::StolenAndWinningTheTwinRule,
        false,
        NO_EXTENSIONS,
        |wire, _| has_nothing(wire),
    );
}

/// (c) The attacker claims the seeder's port in its BEP 10 handshake (`p`). It dials from
/// the seeder's IP address, from another port (a neighbour behind the same NAT): a claim
/// from another IP names another address anyway, and a claim from the same IP is only a
/// claim; neither may remove the seeder's own address from the candidates.
#[test]
fn spoof_a_bep10_port_claim_by_another_connection_does_not_hide_the_seeder() {
    seeder_found_after_a_claim(
        "BEP 10 p claim",
        Claimed::Own,
        true,
        EXTENDED,
        |wire, s_addr| {
            let ext = B::dict([
                ("m", B::dict(Vec::<(&str, B)>::new())),
                ("p", B::Int(i64::from(s_addr.port()))),
            ]);
            wire.send(&frame(id::EXTENDED, &[&[0u8][..], &ext.encode()].concat()))?;
            has_nothing(wire)
        },
    );
}

// =============================================================================================
// 5. CPU amplification
// =============================================================================================

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Samples a process's CPU time until it exits; the last sample.
fn cpu_until_exit(guard: &ChildGuard, within: Duration) -> Duration {
    let mut last = Duration::ZERO;
    poll_until(within, || {
        if let Some(c) = cpu_time(guard.pid()) {
            last = c;
        }
        guard.exit_status().map(|_| ())
    });
    last
}

/// A 16 MiB torrent of 16,384 pieces of 1 KiB, downloaded from a bitfetch seeder: once clean,
/// once while a second peer sends `have all` as fast as it can (a second one is already a
/// protocol violation). The attacked download may cost at most three times the clean one's
/// CPU time plus 3 s (the probe saw eight times the wall time).
#[test]
fn cpu_repeated_have_all_does_not_multiply_a_downloads_cpu_time() {
    let label = "have-all storm";
    let t = Torrent::new(label, 16 * 1024 * 1024, 1024, &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &[]);
    let (clean, clean_out) = t.downloader("clean", &[s_addr], &[]);
    let clean_cpu = cpu_until_exit(&clean, DEADLINE);
    let mut problems: Vec<String> = t
        .download_problem(&clean, &clean_out, Duration::from_secs(5))
        .map(|p| format!("clean run: {p}"))
        .into_iter()
        .collect();
    let listener = TcpListener::bind((next_loopback(), 0)).expect("bind the attacker");
    let a_addr = listener.local_addr().expect("local_addr");
    let (d, out) = t.downloader("attacked", &[a_addr, s_addr], &[]);
    let info_hash = t.info_hash;
    let stop = Arc::new(AtomicBool::new(false));
    let attack = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || -> String {
            let Ok(stream) = accept_within(&listener, DEADLINE) else {
                return "never dialled".into();
            };
            let mut wire = Wire::new(stream);
            if wire.read_handshake(Duration::from_secs(30)).is_err()
                || wire
                    .send(&handshake(&info_hash, &peer_id("HAV"), FAST))
                    .is_err()
            {
                return "no handshake".into();
            }
            let storm = frame(id::HAVE_ALL, &[]).repeat(10_000);
            let mut sent = 0u64;
            // At most ~30 MB of attack traffic, as long as the download lasts.
            while !stop.load(Ordering::SeqCst) && sent < 600_000 {
                if wire.send(&storm).is_err() {
                    return format!("dropped after {sent} have-all(s) sent");
                }
                sent += 10_000;
            }
            format!("still connected after {sent} have-all(s)")
        })
    };
    let attacked_cpu = cpu_until_exit(&d, DEADLINE);
    stop.store(true, Ordering::SeqCst);
    problems.extend(t.download_problem(&d, &out, Duration::from_secs(5)));
    let outcome = attack
        .join()
        .unwrap_or_else(|_| "the attacker panicked".into());
    eprintln!(
        "{label}: clean {clean_cpu:?} CPU, attacked {attacked_cpu:?} CPU; attacker {outcome}"
    );
    let bound = clean_cpu * 3 + Duration::from_secs(3);
    if attacked_cpu > bound {
        problems.push(format!(
            "the attacked download used {attacked_cpu:?} of CPU, the clean one {clean_cpu:?} \
             (bound {bound:?}); the attacker was {outcome}"
        ));
    }
    verdict(label, &problems, &[&d, &seeder]);
}

// =============================================================================================
// 6. Disk left full
// =============================================================================================

/// A 64 MiB ext4 file system loop-mounted on a directory of its own, unmounted on drop. ext4,
/// not tmpfs: tmpfs gives back a failed `posix_fallocate` by itself, ext4 keeps what it took.
struct Ext4 {
    dir: TempDir,
    mnt: PathBuf,
}

impl Ext4 {
    fn mount() -> Ext4 {
        let dir = scratch_dir();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("create the image");
        fs::create_dir(&mnt).expect("mkdir the mount point");
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F"]).arg(&img);
        let mut mount = Command::new("mount");
        mount.args(["-o", "loop"]).arg(&img).arg(&mnt);
        for (what, command) in [("mkfs.ext4", &mut mkfs), ("mount -o loop", &mut mount)] {
            match command.output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => panic!(
                    "cannot make the ext4 file system this test needs ({what}: {}, {}): it needs \
                     root and a loop device; tmpfs cannot show the bug",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => panic!("cannot run {what} for the ext4 file system this test needs: {e}"),
            }
        }
        Ext4 { dir, mnt }
    }

    /// Bytes free for an unprivileged writer (`statvfs`'s `f_bavail`).
    fn free(&self) -> u64 {
        let path = std::ffi::CString::new(path_arg(&self.mnt)).expect("no NUL in the path");
        // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs {}", self.mnt.display());
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = &self.dir;
    }
}

/// A torrent 16 MiB larger than the free space: exit 5 (disk full), and the file system has
/// as much free space afterwards as before (give or take 1 MiB of metadata).
#[test]
fn disk_a_torrent_larger_than_the_free_space_exits_5_and_gives_the_space_back() {
    let label = "torrent larger than the disk";
    let fs = Ext4::mount();
    let before = fs.free();
    let piece: u64 = 1 << 20;
    let size = before + (16 << 20);
    let pieces = size.div_ceil(piece) as usize;
    // The content is never sent: only its size and piece count matter.
    let info = B::dict([
        ("length", B::Int(size as i64)),
        ("name", B::bytes(NAME)),
        ("piece length", B::Int(piece as i64)),
        ("pieces", B::Bytes(vec![0x11; pieces * 20])),
    ]);
    let torrent = fs.dir.path().join("big.torrent");
    fs::write(&torrent, torrent_bytes(&info, &[]).0).expect("write the torrent");
    let out = fs.mnt.join("out");
    fs::create_dir(&out).expect("mkdir OUT");
    let (_holder, hold) = holder();
    let d = spawn_bitfetch(
        label,
        download_args(&torrent, &out, next_loopback(), &[hold]),
    );
    let mut problems = Vec::new();
    match d.wait_timeout(COMMAND_DEADLINE).and_then(|s| s.code()) {
        Some(5) => {}
        _ => problems.push(format!(
            "bitfetch {} (want exit 5, disk full)",
            describe_status(d.exit_status())
        )),
    }
    let _ = Command::new("sync").status();
    let after = fs.free();
    eprintln!("{label}: free before {before} bytes, after {after}");
    if after + (1 << 20) < before {
        problems.push(format!(
            "the file system had {before} bytes free before and {after} after: bitfetch left \
             {} bytes reserved ({:?} in OUT)",
            before - after,
            walk(&out)
        ));
    }
    verdict(label, &problems, &[&d]);
}

// =============================================================================================
// 7. Smaller findings
// =============================================================================================

/// A multi-file torrent `dir` of `files` (path elements, content), with its content.
fn multi_torrent(files: &[(Vec<&str>, Vec<u8>)]) -> (Vec<u8>, [u8; 20], Content) {
    let content = Content {
        data: files.iter().flat_map(|(_, d)| d.clone()).collect(),
        piece_len: PIECE_LEN,
    };
    let list: Vec<(Vec<Vec<u8>>, u64)> = files
        .iter()
        .map(|(p, d)| {
            (
                p.iter().map(|e| e.as_bytes().to_vec()).collect(),
                d.len() as u64,
            )
        })
        .collect();
    let (bytes, hash) = torrent_bytes(&multi_info(b"dir", &list, &content), &[]);
    (bytes, hash, content)
}

/// A scratch directory holding `NAME` (the torrent's bytes) and an empty `out/`: (it, the
/// torrent, OUT).
fn scratch_torrent(name: &str, bytes: &[u8]) -> (TempDir, PathBuf, PathBuf) {
    let dir = scratch_dir();
    let torrent = dir.path().join(name);
    fs::write(&torrent, bytes).expect("write the torrent");
    let out = dir.path().join("out");
    fs::create_dir(&out).expect("mkdir OUT");
    (dir, torrent, out)
}

/// 1,100 files: every one held open at once cannot fit under `ulimit -n 1024`. The downloader
/// runs under that limit (hard and soft, set by `sh` before it execs bitfetch) and must
/// complete from a fake seeder with every file right.
#[test]
fn fds_a_torrent_of_1100_files_downloads_under_ulimit_n_1024() {
    let label = "1100 files under ulimit -n 1024";
    let files: Vec<(Vec<&str>, Vec<u8>)> = (0..1100)
        .map(|i| {
            let name: &'static str = Box::leak(format!("f{i:04}.bin").into_boxed_str());
            (vec![name], pseudo_random(1000 + i % 7, i as u64))
        })
        .collect();
    let (bytes, info_hash, content) = multi_torrent(&files);
    let (_dir, torrent, out) = scratch_torrent("many.torrent", &bytes);
    let seeder = SeedSpec::content(&content, info_hash).start(next_loopback());
    let mut command = Command::new("sh");
    command
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
        .arg("-c")
        .arg(r#"ulimit -n 1024 && exec "$@""#)
        .arg("sh")
        .arg(bitfetch())
        .args(download_args(
            &torrent,
            &out,
            next_loopback(),
            &[seeder.addr],
        ))
        .env_remove("SSL_CERT_FILE");
    let d = ChildGuard::spawn("bitfetch download (ulimit -n 1024)", &mut command);
    let mut problems = Vec::new();
    if d.wait_timeout(DEADLINE).and_then(|s| s.code()) != Some(0) {
        problems.push(format!("bitfetch {}", describe_status(d.exit_status())));
    } else {
        let wrong: Vec<&str> = files
            .iter()
            .filter(|(p, data)| fs::read(out.join("dir").join(p[0])).ok().as_ref() != Some(data))
            .map(|(p, _)| p[0])
            .collect();
        if !wrong.is_empty() {
            problems.push(format!(
                "{} file(s) wrong or missing, first {:?}",
                wrong.len(),
                wrong[0]
            ));
        }
    }
    verdict(label, &problems, &[&d, &seeder]);
}

/// A torrent `dir` of `a.bin` and `b.bin` whose data directory holds `b.bin` as a FIFO.
fn fifo_case() -> (TempDir, PathBuf, PathBuf) {
    let files = vec![
        (vec!["a.bin"], pseudo_random(40_000, 1)),
        (vec!["b.bin"], pseudo_random(40_000, 2)),
    ];
    let (bytes, _, content) = multi_torrent(&files);
    let dir = scratch_dir();
    let torrent = dir.path().join("fifo.torrent");
    fs::write(&torrent, bytes).expect("write the torrent");
    let data = dir.path().join("data");
    fs::create_dir_all(data.join("dir")).expect("mkdir data/dir");
    fs::write(data.join("dir/a.bin"), &content.data[..40_000]).expect("write a.bin");
    let fifo = std::ffi::CString::new(path_arg(&data.join("dir/b.bin"))).expect("no NUL");
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo");
    (dir, torrent, data)
}

/// Why a command run on the FIFO case was not a quick, clear error. If it is still running
/// after [`FIFO_DEADLINE`], it gets SIGINT and 5 s more.
fn fifo_problem(what: &str, guard: &ChildGuard) -> Option<String> {
    if guard.wait_timeout(FIFO_DEADLINE).is_none() {
        guard.signal(libc::SIGINT);
        let after = if guard.wait_timeout(Duration::from_secs(5)).is_some() {
            "SIGINT then ended it"
        } else {
            "and SIGINT did not end it within 5 s"
        };
        return Some(format!(
            "`{what}` hung on the FIFO for {FIFO_DEADLINE:?}, {after}"
        ));
    }
    let code = guard.exit_status().and_then(|s| s.code());
    let said = format!("{}\n{}", guard.stdout_text(), guard.stderr_text());
    if guard.stderr_text().contains("panicked") || !matches!(code, Some(1 | 4)) {
        return Some(format!(
            "`{what}` {} (want 1 or 4)",
            describe_status(guard.exit_status())
        ));
    }
    (!said.contains("b.bin")).then(|| format!("`{what}` did not name b.bin in what it printed"))
}

/// A FIFO where a file of the torrent should be: `verify` and `seed` must say so quickly
/// (exit 1 or 4, naming the file) instead of blocking in `open`.
#[test]
fn fifo_in_the_data_directory_is_a_quick_clear_error_for_verify_and_seed() {
    let (_dir, torrent, data) = fifo_case();
    let verify = ChildGuard::bitfetch(["verify".into(), path_arg(&torrent), path_arg(&data)]);
    let seed = ChildGuard::bitfetch([
        "seed".into(),
        path_arg(&torrent),
        path_arg(&data),
        "--bind".into(),
        next_loopback().to_string(),
        "--port".into(),
        "0".into(),
    ]);
    let problems: Vec<String> = [fifo_problem("verify", &verify), fifo_problem("seed", &seed)]
        .into_iter()
        .flatten()
        .collect();
    verdict("FIFO in the data", &problems, &[&verify, &seed]);
}

const VICTIM: &[u8] = b"another name of this file, outside OUT: must not change\n";

/// OUT already holds the torrent's file as a hard link to a file outside OUT. bitfetch may
/// refuse (a clear error) or replace the name, but must not write through the link.
#[test]
fn hardlink_in_the_output_directory_is_not_written_through() {
    let label = "hard link in OUT";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let victim = t.dir.path().join("victim");
    fs::write(&victim, VICTIM).expect("write the victim");
    let seeder = SeedSpec::content(&t.content, t.info_hash).start(next_loopback());
    let out = t.dir.path().join("out-linked");
    fs::create_dir(&out).expect("mkdir OUT");
    fs::hard_link(&victim, out.join(NAME)).expect("hard link into OUT");
    let d = spawn_bitfetch(
        label,
        download_args(&t.torrent, &out, next_loopback(), &[seeder.addr]),
    );
    let mut problems = Vec::new();
    let code = d.wait_timeout(DEADLINE).and_then(|s| s.code());
    if fs::read(&victim).ok().as_deref() != Some(VICTIM) {
        problems.push("the file's other name outside OUT changed: written through the link".into());
    }
    match code {
        Some(0) if fs::read(out.join(NAME)).ok().as_deref() != Some(&t.content.data[..]) => {
            problems.push("exit 0, but OUT does not hold the torrent's file".into())
        }
        Some(0) => {}
        _ if d.error_line().is_none() => problems.push(format!(
            "bitfetch {} without a `bitfetch: error:` line",
            describe_status(d.exit_status())
        )),
        _ => {}
    }
    verdict(label, &problems, &[&d, &seeder]);
}

/// Two paths that name one file on a file system that normalises, folds width or folds case
/// (macOS, Windows, or a case-insensitive ext4 directory): `info` and `download` must refuse
/// the torrent with exit 3, and write nothing.
fn colliding_names_refused(label: &str, first: &str, second: &str) {
    let files = vec![
        (vec![first], pseudo_random(1000, 1)),
        (vec![second], pseudo_random(1000, 2)),
    ];
    let (bytes, _, _) = multi_torrent(&files);
    let (_dir, torrent, out) = scratch_torrent("names.torrent", &bytes);
    let info = run_bitfetch(
        "bitfetch info",
        ["info".into(), path_arg(&torrent)],
        COMMAND_DEADLINE,
    );
    let dl = run_bitfetch(
        "bitfetch download",
        download_args(&torrent, &out, next_loopback(), &[closed_addr()]),
        Duration::from_secs(15),
    );
    let mut problems = Vec::new();
    for run in [&info, &dl] {
        if run.crash_problem().is_some() || run.code() != Some(3) || run.error_line().is_none() {
            problems.push(format!(
                "not refused with exit 3 and an error: {}",
                run.dump()
            ));
        }
    }
    if !walk(&out).is_empty() {
        problems.push(format!("OUT holds {:?}", walk(&out)));
    }
    if !problems.is_empty() {
        panic!(
            "{label} ({first:?} vs {second:?}):\n  {}",
            problems.join("\n  ")
        );
    }
}

#[test]
fn names_equal_after_normalisation_width_or_case_folding_are_refused() {
    run_parallel(vec![
        case("NFC vs NFD", || {
            colliding_names_refused("NFC vs NFD", "caf\u{e9}.txt", "cafe\u{301}.txt")
        }),
        case("width", || {
            colliding_names_refused("width", "A.txt", "\u{ff21}.txt")
        }),
        case("case folding", || {
            colliding_names_refused("case folding", "stra\u{df}e.txt", "STRASSE.txt")
        }),
    ]);
}

/// A peer that pushes `piece` messages a seeder never asked for (it asks for nothing) is
/// dropped; meanwhile an honest downloader completes from the seeder.
#[test]
fn unasked_pieces_sent_to_a_seeder_get_the_sender_dropped() {
    let label = "unasked pieces to a seeder";
    let t = Torrent::new(label, SIZE, PIECE_LEN, &[]);
    let (seeder, s_addr) = t.seeder(next_loopback(), &[]);
    let mut wire = Wire::dial(next_loopback(), s_addr).expect("dial the seeder");
    shake(&mut wire, &t.info_hash, &peer_id("UNA"), NO_EXTENSIONS);
    for piece in 0..8 {
        let data = t
            .content
            .block(piece, 0, BLOCK)
            .expect("a block of the torrent");
        if wire.send(&msg_piece(piece, 0, data)).is_err() {
            break;
        }
    }
    let (d, out) = t.downloader("honest", &[s_addr], &[]);
    let mut problems: Vec<String> = wire
        .expect_closed(CLOSE_DEADLINE)
        .err()
        .map(|e| format!("the sender of unasked pieces was not dropped: {e}"))
        .into_iter()
        .collect();
    problems.extend(t.download_problem(&d, &out, DEADLINE));
    verdict(label, &problems, &[&seeder, &d]);
}
