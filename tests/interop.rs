//! End-to-end transfers between bitfetch and real clients (aria2, Transmission) through a real
//! tracker (opentracker), all on loopback, with byte-for-byte checks of the result.
//!
//! The `harness_*` tests involve no bitfetch at all: they prove the harness and the reference
//! clients work on this machine, so that a failure of a bitfetch test is bitfetch's.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::cli::*;
use support::clients::*;
use support::net::{free_port_on, next_loopback};
use support::torrent::{Payload, Tracked};
use support::*;

/// A few MiB, not a whole number of 32 KiB pieces, so the short last piece is exercised too.
const PAYLOAD_SIZE: u64 = 3 * 1024 * 1024 + 12_345;

/// One torrent registered with its own tracker: the original data and the .torrent file.
type Swarm = Tracked<Opentracker>;

/// (Every test starts with one: it checks the reference tools are installed first.)
fn swarm(name: &str, seed: u64) -> Swarm {
    require_interop_tools();
    let tracker = Opentracker::start();
    let payload = Payload::new(name, PAYLOAD_SIZE, seed, 15, &tracker.announce_url());
    tracker.allow(&payload.hash_hex);
    Tracked { payload, tracker }
}

fn require_interop_tools() {
    for tool in [
        "opentracker",
        "aria2c",
        "transmission-daemon",
        "transmission-remote",
        "transmission-show",
        "mktorrent",
    ] {
        require_tool(tool);
    }
}

/// Starts `bitfetch seed` bound to `ip`, waits until it serves and the tracker knows it.
fn start_bitfetch_seeder(
    swarm: &Swarm,
    ip: std::net::Ipv4Addr,
    parts: &[&dyn Diagnose],
) -> ChildGuard {
    let (seeder, addr) = start_seeder(
        "bitfetch seeder",
        &swarm.torrent,
        &swarm.source_dir(),
        ip,
        &[],
    );
    assert_eq!(
        addr.ip(),
        std::net::IpAddr::V4(ip),
        "bitfetch seed listens on {addr}, not on the --bind address {ip}\n{}",
        seeder.diagnostics()
    );
    let mut all: Vec<&dyn Diagnose> = vec![&seeder];
    all.extend_from_slice(parts);
    swarm
        .tracker
        .wait_for_swarm(&swarm.hash_hex, 1, 1, DEADLINE, &all);
    seeder
}

/// SIGTERM to a seeding bitfetch: the contract says it exits 0.
fn stop_bitfetch_seeder(seeder: &ChildGuard, parts: &[&dyn Diagnose]) {
    assert!(
        seeder.is_running(),
        "{}",
        report("bitfetch seed exited on its own while seeding", &[seeder])
    );
    seeder.signal(libc::SIGTERM);
    seeder.wait_with_deadline(Duration::from_secs(30), &String::new);
    assert_exit_code(seeder, 0, parts);
}

// =============================================================================================
// Harness sanity: no bitfetch involved
// =============================================================================================

/// aria2c seeding the swarm's data on an address of its own, once the tracker knows it.
fn aria2_seeder(swarm: &Swarm) -> ChildGuard {
    let seed_ip = next_loopback();
    let seeder = aria2_seed(
        &swarm.torrent,
        &swarm.source_dir(),
        seed_ip,
        free_port_on(seed_ip),
    );
    swarm
        .tracker
        .wait_for_swarm(&swarm.hash_hex, 1, 1, DEADLINE, &[&seeder]);
    seeder
}

/// Transmission seeding the swarm's data, once verified and known to the tracker.
fn transmission_seeder(swarm: &Swarm) -> Transmission {
    let seeder = Transmission::start(next_loopback(), &swarm.source_dir());
    seeder.add(&swarm.torrent, &swarm.source_dir());
    // It announces before it has verified its data: count it as a seeder only at 100 %.
    seeder.wait_seeding(DEADLINE, &[&swarm.tracker]);
    swarm
        .tracker
        .wait_for_swarm(&swarm.hash_hex, 0, 1, DEADLINE, &[&seeder]);
    seeder
}

/// Transmission downloading the torrent into a fresh directory: (it, where the file lands).
fn transmission_leecher(swarm: &Swarm) -> (Transmission, PathBuf) {
    let out = swarm.out_dir("transmission-out");
    let leecher = Transmission::start(next_loopback(), &out);
    leecher.add(&swarm.torrent, &out);
    let target = out.join(&swarm.name);
    (leecher, target)
}

/// Waits for Transmission to complete the download from `seeder`; byte-for-byte check.
fn transmission_completes(
    swarm: &Swarm,
    leecher: &Transmission,
    target: &Path,
    seeder: &dyn Diagnose,
) {
    leecher.wait_complete(target, TRANSMISSION_DEADLINE, &[seeder, &swarm.tracker]);
    swarm.assert_same(target, &[leecher, seeder]);
}

/// aria2c downloads the torrent (from `seeder`) within `deadline`; byte-for-byte check.
fn aria2_downloads(swarm: &Swarm, seeder: &dyn Diagnose, deadline: Duration) -> ChildGuard {
    let out = swarm.out_dir("aria2-out");
    let leech_ip = next_loopback();
    let leecher = aria2_download(&swarm.torrent, &out, leech_ip, free_port_on(leech_ip));
    let status = leecher.wait_with_deadline(deadline, &|| report("", &[seeder, &swarm.tracker]));
    assert!(
        status.success(),
        "{}",
        report("aria2 download failed", &[&leecher, seeder, &swarm.tracker])
    );
    swarm.assert_same(&out.join(&swarm.name), &[&leecher, seeder]);
    leecher
}

/// bitfetch downloads the torrent (from `seeder`) within `deadline`: exit 0, byte-for-byte.
fn bitfetch_downloads(swarm: &Swarm, seeder: &dyn Diagnose, deadline: Duration) {
    let out = swarm.out_dir("bitfetch-out");
    let leecher = spawn_bitfetch(
        "bitfetch leecher",
        download_args(&swarm.torrent, &out, next_loopback(), &[]),
    );
    leecher.wait_with_deadline(deadline, &|| report("", &[seeder, &swarm.tracker]));
    assert_exit_code(&leecher, 0, &[seeder, &swarm.tracker]);
    swarm.assert_same(&out.join(&swarm.name), &[&leecher, seeder]);
}

#[test]
fn harness_aria2_to_aria2() {
    let swarm = swarm("harness-aria2.bin", 1);
    let seeder = aria2_seeder(&swarm);
    aria2_downloads(&swarm, &seeder, DEADLINE);
}

#[test]
fn harness_aria2_to_transmission() {
    let swarm = swarm("harness-a2t.bin", 2);
    let seeder = aria2_seeder(&swarm);
    // Transmission never dials loopback peers: aria2 (2 s tracker interval) must dial it.
    let (leecher, target) = transmission_leecher(&swarm);
    transmission_completes(&swarm, &leecher, &target, &seeder);
}

#[test]
fn harness_transmission_to_aria2() {
    let swarm = swarm("harness-t2a.bin", 3);
    let seeder = transmission_seeder(&swarm);
    aria2_downloads(&swarm, &seeder, TRANSMISSION_DEADLINE);
}

// =============================================================================================
// bitfetch downloading
// =============================================================================================

#[test]
fn bitfetch_downloads_from_aria2() {
    let swarm = swarm("from-aria2.bin", 11);
    let seeder = aria2_seeder(&swarm);
    bitfetch_downloads(&swarm, &seeder, DEADLINE);
}

#[test]
fn bitfetch_downloads_from_transmission() {
    let swarm = swarm("from-transmission.bin", 12);
    let seeder = transmission_seeder(&swarm);
    // Transmission never dials loopback peers but accepts them: bitfetch dials it.
    bitfetch_downloads(&swarm, &seeder, TRANSMISSION_DEADLINE);
}

// =============================================================================================
// bitfetch seeding
// =============================================================================================

#[test]
fn aria2_downloads_from_bitfetch() {
    let swarm = swarm("to-aria2.bin", 21);
    let seeder = start_bitfetch_seeder(&swarm, next_loopback(), &[&swarm.tracker]);
    let leecher = aria2_downloads(&swarm, &seeder, DEADLINE);
    stop_bitfetch_seeder(&seeder, &[&leecher, &swarm.tracker]);
}

#[test]
fn transmission_downloads_from_bitfetch() {
    let swarm = swarm("to-transmission.bin", 22);

    // Transmission never dials peers in 127.0.0.0/8: bitfetch has to learn of it from the
    // tracker and dial it. Transmission registers first, so bitfetch's first announce already
    // returns it (opentracker's interval is ~30 min, min interval ~15 min: a client that
    // honours them would not hear of a later leecher within this test).
    let (leecher, target) = transmission_leecher(&swarm);
    swarm
        .tracker
        .wait_for_swarm(&swarm.hash_hex, 0, 1, DEADLINE, &[&leecher]);
    let seeder = start_bitfetch_seeder(&swarm, next_loopback(), &[&leecher, &swarm.tracker]);
    transmission_completes(&swarm, &leecher, &target, &seeder);
    stop_bitfetch_seeder(&seeder, &[&leecher, &swarm.tracker]);
}
