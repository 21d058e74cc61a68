//! A smoke run of `scripts/bench-net` (tiny payloads, fewer peers, one run), so the
//! network benchmark cannot rot: the relay must build and shape, every scenario must run
//! bitfetch, libtorrent and aria2 to completion with byte-identical copies, and the table must
//! hold a figure for each. Nothing here asserts a time: the figures of a smoke run mean
//! nothing; the full run is `scripts/bench-net` (see the README).

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::clients::{require_libtorrent, require_tool};

/// The smoke run takes about a minute here; this only guards against a hang.
const DEADLINE: Duration = Duration::from_secs(900);

#[test]
fn bench_net_smoke_run_completes_every_scenario_with_checked_copies() {
    require_libtorrent();
    for tool in ["aria2c", "openssl", "rustc", "cmp"] {
        require_tool(tool);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench-net");
    let mut child = Command::new(&script)
        .arg("--smoke")
        .env("BITFETCH_BIN", env!("CARGO_BIN_EXE_bitfetch"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting scripts/bench-net");
    // Both pipes are drained on threads so neither can fill and stall the script.
    let mut out_pipe = child.stdout.take().expect("stdout");
    let mut err_pipe = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for bench-net") {
            break Some(status);
        }
        if started.elapsed() > DEADLINE {
            // SIGTERM first: the script then stops every process it started, by PID.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let grace = Instant::now();
            while child.try_wait().ok().flatten().is_none()
                && grace.elapsed() < Duration::from_secs(20)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().expect("stdout reader");
    let err = err_reader.join().expect("stderr reader");
    let shown = format!("--- stdout\n{out}\n--- stderr\n{err}");
    let status =
        status.unwrap_or_else(|| panic!("bench-net still running after {DEADLINE:?}\n{shown}"));
    assert!(
        status.success(),
        "bench-net --smoke failed ({status})\n{shown}"
    );

    // One table row per scenario and client, each with a wall time.
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario"))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let wall = |scenario: &str, client: &str| -> Option<f64> {
        rows.iter()
            .find(|r| r.len() >= 4 && r[0].starts_with(scenario) && r[1].starts_with(client))
            .and_then(|r| r[3].split(" / ").next()?.parse().ok())
    };
    for scenario in [
        "0 loopback",
        "1 WAN",
        "2 long fat pipe",
        "3 many slow peers",
    ] {
        for client in ["bitfetch", "libtorrent", "aria2"] {
            let w = wall(scenario, client);
            assert!(
                w.is_some_and(|w| w > 0.0),
                "no wall time for {client} in scenario {scenario:?}\n{shown}"
            );
        }
    }
    for seeder in ["bitfetch seeding", "libtorrent seeding"] {
        assert!(
            wall("4 seeding", seeder).is_some(),
            "no row for {seeder}\n{shown}"
        );
    }
    for swarm in ["bitfetch swarm", "libtorrent swarm"] {
        assert!(
            wall("5 swarm", swarm).is_some(),
            "no row for the {swarm}\n{shown}"
        );
    }
    assert!(
        wall("0 through an unshaped relay", "bitfetch").is_some(),
        "no relay control\n{shown}"
    );
    // The relay delayed what it carried: through a 200 ms round trip, a download takes a
    // round trip for the handshakes, one for interest and unchoke and one for the first
    // request, so no client can finish scenario 2 in under two. (A lower bound the relay
    // sets, not a speed: a slow machine only makes it longer.)
    for client in ["bitfetch", "libtorrent", "aria2"] {
        let w = wall("2 long fat pipe", client).expect("checked above");
        assert!(
            w >= 0.4,
            "{client} finished in {w} s through a 200 ms round trip\n{shown}"
        );
    }
    assert!(out.contains("relay ceiling"), "{shown}");
}
