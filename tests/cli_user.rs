//! The command line as a new user meets it (issue 17): data safety in `create`, reruns on
//! complete data, closed pipes, limits that must not fail a finished download, peers that
//! cannot be reached, junk left by failed starts, a busy default port, the status line in
//! narrow and wide terminals, and the argument syntax aria2c and curl users expect.
//!
//! Loopback only; every process is run with a hang guard or owned by a guard that kills it
//! by PID; waits poll with deadlines.

mod support;

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cli::{
    ChildGuard, Run, bitfetch, download_args, events, of_kind, run_bitfetch, start_seeder,
};
use support::net::{free_port, next_loopback};
use support::torrent::Payload;
use support::{COMMAND_DEADLINE, DEADLINE, poll_until, s};

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn run(args: &[&str]) -> Run {
    run_bitfetch("bitfetch", args, COMMAND_DEADLINE)
}

#[test]
fn create_refuses_to_overwrite_anything_and_above_all_its_input() {
    let p = Payload::single("big.bin", 100_000, 1);
    let before = fs::read(&p.data).unwrap();
    let data = s(p.data.display());
    let r = run(&["create", &data, "-o", &data]);
    r.assert_code(2);
    assert!(r.stderr.contains("bitfetch: error:"), "{}", r.dump());
    assert_eq!(
        fs::read(&p.data).unwrap(),
        before,
        "the input was overwritten"
    );

    let out = p.dir.path().join("x.torrent");
    fs::write(&out, b"precious").unwrap();
    let r = run(&["create", &data, "-o", &s(out.display())]);
    r.assert_code(2);
    assert!(r.stderr.contains("--force"), "{}", r.dump());
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    let r = run(&["create", &data, "-o", &s(out.display()), "--force"]);
    r.assert_success();
    let info = run(&["info", "--json", &s(out.display())]);
    info.assert_success();
    let v: Value = serde_json::from_str(info.stdout.trim()).unwrap();
    assert_eq!(v["size"].as_u64(), Some(100_000), "{v}");
    assert!(
        v["created"].as_str().is_some_and(|d| d.ends_with('Z')),
        "{v}"
    );
    // Sizes take suffixes: --piece-length 1M.
    let one_m = p.dir.path().join("m.torrent");
    run(&[
        "create",
        &data,
        "--piece-length=1M",
        "-o",
        &s(one_m.display()),
    ])
    .assert_success();
    let v: Value =
        serde_json::from_str(run(&["info", "--json", &s(one_m.display())]).stdout.trim()).unwrap();
    assert_eq!(v["piece_length"].as_u64(), Some(1 << 20), "{v}");
}

/// Regression: `create data.bin` named in the current directory hashed nothing ("file
/// changed while hashing"): the parent of a bare name is the empty path, which cannot be
/// opened. Bare names must work for `create`, `verify` and `info` alike.
#[test]
fn bare_names_in_the_current_directory_work() {
    let p = Payload::single("bare.bin", 300_000, 7);
    let dir = p.data.parent().expect("the payload's directory");
    support::cli::run_in(dir, ["create", "bare.bin", "-o", "bare.torrent"]).assert_success();
    let r = support::cli::run_in(dir, ["verify", "bare.torrent", "bare.bin"]);
    r.assert_success();
    let r = support::cli::run_in(dir, ["verify", "bare.torrent"]);
    r.assert_success();
    let info = support::cli::run_in(dir, ["info", "--json", "bare.torrent"]);
    info.assert_success();
    let v: Value = serde_json::from_str(info.stdout.trim()).unwrap();
    assert_eq!(v["size"].as_u64(), Some(300_000), "{v}");
}

/// Downloads `p` from a seeder into a fresh directory and returns (out dir, stdout).
fn download_once(p: &Payload, extra: &[&str]) -> (PathBuf, String) {
    // A multi-file torrent is seeded from the directory that holds its top directory.
    let data = if p.multi {
        p.data.parent().unwrap()
    } else {
        &p.data
    };
    let (seeder, addr) = start_seeder("seeder", &p.torrent, data, next_loopback(), &[]);
    let out = p.dir.path().join(format!("out-{}", free_port()));
    let mut args = download_args(&p.torrent, &out, next_loopback(), &[addr]);
    args.extend(extra.iter().map(|a| a.to_string()));
    let r = run_bitfetch("download", &args, DEADLINE);
    r.assert_success();
    drop(seeder);
    (out, r.stdout)
}

#[test]
fn a_rerun_on_complete_data_reports_exactly_what_a_fresh_download_does() {
    let p = Payload::multi("tree", &[("a", 70_000), ("sub/b", 40_000)], 2);
    let (out, first) = download_once(&p, &[]);
    // No seeder and a dead tracker now: nothing to dial, and nothing needed.
    let started = Instant::now();
    let mut args = download_args(&p.torrent, &out, next_loopback(), &[]);
    let again = run_bitfetch("rerun", &args, COMMAND_DEADLINE);
    again.assert_success();
    assert_eq!(again.stdout, first, "the same paths, in the same order");
    assert!(
        !again.stderr.contains("listening"),
        "a complete download needs no listener: {}",
        again.dump()
    );
    assert!(started.elapsed() < COMMAND_DEADLINE);
    args.push("--json".into());
    let json = run_bitfetch("rerun --json", &args, COMMAND_DEADLINE);
    json.assert_success();
    let events = json_lines(&json.stdout);
    assert_eq!(
        of_kind(&events, "file_completed").count(),
        2,
        "{}",
        json.stdout
    );
    let finished = of_kind(&events, "finished").next().expect("finished");
    assert_eq!(finished["downloaded"].as_u64(), Some(110_000), "{finished}");
    assert_eq!(finished["transferred"].as_u64(), Some(0), "{finished}");
}

/// `sh -c 'bitfetch ARGS | head -c 10'`, many times: bitfetch must end quietly.
fn into_closed_pipe(args: &str, times: usize) {
    for _ in 0..times {
        let script = format!(
            "'{}' {args} | head -c 10 >/dev/null; exit ${{PIPESTATUS[0]}}",
            bitfetch().display()
        );
        let out = Command::new("bash")
            .args(["-c", &script])
            .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args}: {stderr}");
        assert!(
            !stderr.contains("panicked") && stderr.is_empty(),
            "{args}: {stderr}"
        );
    }
}

#[test]
fn a_closed_stdout_is_a_normal_end() {
    let p = Payload::multi("many", &[("a", 1000), ("b", 1000), ("c", 1000)], 3);
    into_closed_pipe("help download", 20);
    into_closed_pipe("--help", 10);
    // Enough output to outlast the pipe's first read.
    let long: Vec<(String, usize)> = (0..300).map(|i| (format!("f{i:03}"), 10)).collect();
    let long_tree: Vec<(&str, usize)> = long.iter().map(|(n, l)| (n.as_str(), *l)).collect();
    let big = Payload::multi("long", &long_tree, 4);
    for args in [
        format!("info '{}'", big.torrent.display()),
        format!("download '{}' --list", big.torrent.display()),
        format!(
            "verify '{}' '{}'",
            p.torrent.display(),
            p.data.parent().unwrap().display()
        ),
    ] {
        into_closed_pipe(&args, 5);
    }
}

#[test]
fn a_time_limit_never_fails_a_finished_download() {
    let p = Payload::single("t.bin", 300_000, 5);
    let (seeder, addr) = start_seeder("seeder", &p.torrent, &p.data, next_loopback(), &[]);
    let out = p.dir.path().join("out");
    let mut args = download_args(&p.torrent, &out, next_loopback(), &[addr]);
    args.extend(["--seed".into(), "--timeout".into(), "3s".into()]);
    let r = run_bitfetch("download --seed --timeout", &args, DEADLINE);
    r.assert_success();
    assert!(r.stdout.contains("t.bin"), "{}", r.dump());
    assert!(!r.stderr.contains("timed out"), "{}", r.dump());
    drop(seeder);
}

#[test]
fn an_unreachable_peer_is_reported_at_once_and_leaves_no_junk() {
    let p = Payload::single("j.bin", 4 << 20, 6);
    let out = p.dir.path().join("out");
    let dead = format!("{}:{}", next_loopback(), free_port());
    let mut args = download_args(&p.torrent, &out, next_loopback(), &[]);
    args.extend([
        "--peer".into(),
        dead.clone(),
        "--timeout".into(),
        "4s".into(),
        "--json".into(),
    ]);
    let guard = ChildGuard::bitfetch(&args);
    let reported = poll_until(Duration::from_secs(20), || {
        of_kind(&events(&guard), "peer_error").next().cloned()
    });
    let reported = reported.unwrap_or_else(|| guard.fail("no peer_error event", &[]));
    assert!(
        reported["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&dead),
        "{reported}"
    );
    let status = guard.wait(DEADLINE, &[]);
    assert_eq!(status.code(), Some(7), "{}", guard.stderr_text());
    // The preallocated file held nothing: it is gone, and so is the directory made for it.
    let left: Vec<_> = fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn without_port_a_busy_default_port_is_no_failure() {
    let p = Payload::single("port.bin", 50_000, 7);
    let ip = next_loopback();
    let seed = |name: &str| {
        let args = vec![
            "seed".to_string(),
            s(p.torrent.display()),
            s(p.data.display()),
            "--bind".into(),
            ip.to_string(),
        ];
        let guard = ChildGuard::bitfetch(&args);
        let addr = support::cli::wait_for_listening(&guard);
        (name.to_string(), guard, addr)
    };
    let (_, a, first) = seed("first");
    let (_, b, second) = seed("second");
    assert_ne!(first.port(), second.port());
    assert!(a.is_running() && b.is_running());
}

/// Runs `cmd` under a pseudo-terminal of `cols` columns (util-linux `script`) and returns
/// what it drew.
fn in_terminal(cols: u16, cmd: &str) -> String {
    let log = std::env::temp_dir().join(format!("bitfetch-pty-{}-{cols}", std::process::id()));
    let inner = format!("stty cols {cols} rows 30; {cmd}");
    let status = Command::new("script")
        .env("XDG_CACHE_HOME", support::cli::fresh_cache_home())
        .args(["-q", "-e", "-c", &inner])
        .arg(&log)
        .stdin(std::process::Stdio::null())
        .status()
        .expect("util-linux `script` runs");
    assert!(status.success(), "{cmd} under a terminal: {status:?}");
    let text = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    text
}

#[test]
fn the_status_line_fits_the_terminal_and_says_what_it_means() {
    let p = Payload::single("bar.bin", 3 << 20, 8);
    let (seeder, addr) = start_seeder("seeder", &p.torrent, &p.data, next_loopback(), &[]);
    for cols in [40u16, 120] {
        let out = p.dir.path().join(format!("out{cols}"));
        let args = download_args(&p.torrent, &out, next_loopback(), &[addr]);
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let cmd = format!(
            "'{}' {} --max-download-rate 1M",
            bitfetch().display(),
            quoted.join(" ")
        );
        let screen = in_terminal(cols, &cmd);
        // Every redraw is `\r` + line + clear-to-end: no piece between two returns or
        // newlines may be wider than the terminal.
        for piece in screen.split(['\r', '\n']).filter(|p| p.contains('%')) {
            let visible = piece.replace("\x1b[K", "");
            assert!(
                visible.chars().count() < usize::from(cols),
                "{cols} columns, a {} wide line: {visible:?}",
                visible.chars().count()
            );
        }
        assert!(screen.contains('%'), "no status line drawn: {screen:?}");
        assert!(screen.contains("MiB"), "{screen:?}");
        assert!(!screen.contains(" MB"), "one unit everywhere: {screen:?}");
        assert!(!screen.contains("1 peers"), "{screen:?}");
        assert!(
            screen.contains("bitfetch: downloaded"),
            "a summary: {screen:?}"
        );
        if cols == 120 {
            assert!(
                screen.contains("ETA"),
                "the time left is labelled: {screen:?}"
            );
        }
    }
    drop(seeder);
}

#[test]
fn logs_get_a_progress_line_every_interval() {
    let p = Payload::single("log.bin", 3 << 20, 9);
    let (seeder, addr) = start_seeder("seeder", &p.torrent, &p.data, next_loopback(), &[]);
    let out = p.dir.path().join("out");
    let mut args = download_args(&p.torrent, &out, next_loopback(), &[addr]);
    args.extend([
        "--max-download-rate=1M".into(),
        "--progress-interval".into(),
        "1s".into(),
    ]);
    let r = run_bitfetch("download", &args, DEADLINE);
    r.assert_success();
    let lines = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("bitfetch: ") && l.contains('%'));
    assert!(lines.count() >= 1, "{}", r.dump());
    drop(seeder);
}

#[test]
fn arguments_read_as_aria2c_and_curl_users_expect() {
    let p = Payload::single("args.bin", 10_000, 10);
    let torrent = s(p.torrent.display());
    let r = run(&["--version"]);
    r.assert_success();
    assert!(r.stdout.starts_with("bitfetch "), "{}", r.dump());
    run(&["version"]).assert_success();
    let r = run(&["-h"]);
    r.assert_success();
    assert_eq!(r.stdout.matches("Exit codes:").count(), 1, "{}", r.stdout);
    let r = run(&["download", "-h"]);
    r.assert_success();
    assert!(r.stdout.contains("HOST:PORT"), "{}", r.stdout);
    let r = run(&["downlod", &torrent]);
    r.assert_code(2);
    assert!(r.stderr.contains("did you mean 'download'"), "{}", r.dump());
    let r = run(&["download", &torrent, "--no-such-option"]);
    r.assert_code(2);
    assert!(r.stderr.starts_with("bitfetch: error:"), "{}", r.dump());
    let r = run(&["download", &torrent, "--list", "--json", "--max-peers=5"]);
    r.assert_success();
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("--list --json is JSON");
    assert_eq!(v["files"][0]["size"].as_u64(), Some(10_000), "{v}");
    for (args, says) in [
        (
            vec!["download", &torrent, "--peer", "127.0.0.1:70000"],
            "out of range",
        ),
        (
            vec!["download", "ftp://example.invalid/x.torrent"],
            "ftp:// is not supported",
        ),
        (
            vec!["download", &torrent, "--seed-time", "soon"],
            "duration",
        ),
    ] {
        let r = run(&args);
        r.assert_code(2);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.dump());
        assert!(!r.stderr.contains("os error"), "{}", r.dump());
    }
    // A malformed magnet link is a bad torrent (exit 3), said in one line.
    let r = run(&["download", "magnet:?xt=urn:btih:00", "-o", "x"]);
    r.assert_code(3);
    assert!(
        r.stderr.contains("magnet link") && r.stderr.lines().count() == 1,
        "{}",
        r.dump()
    );
    // -o naming a file says so (an I/O error, exit 4).
    let r = run(&["download", &torrent, "-o", &torrent]);
    r.assert_code(4);
    assert!(r.stderr.contains("that is a file"), "{}", r.dump());
}

#[test]
fn seed_and_verify_say_what_is_missing() {
    let p = Payload::multi("multi", &[("a", 50_000), ("b", 20_000)], 11);
    let torrent = s(p.torrent.display());
    let nowhere = p.dir.path().join("nowhere");
    let r = run(&["verify", &torrent, &s(nowhere.display())]);
    r.assert_code(1);
    assert!(r.stderr.contains("no multi/ in"), "{}", r.dump());
    // The directory given to `create` is the content itself.
    let r = run(&[
        "seed",
        &torrent,
        &s(p.data.display()),
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
    ]);
    r.assert_code(1);
    assert!(r.stderr.contains("its parent"), "{}", r.dump());
    // A damaged file is named, in text and in JSON; -q prints nothing.
    let parent = p.data.parent().unwrap();
    let a = p.data.join("a");
    let mut bytes = fs::read(&a).unwrap();
    bytes[100] ^= 1;
    fs::write(&a, bytes).unwrap();
    let r = run(&["verify", &torrent, &s(parent.display())]);
    r.assert_code(1);
    assert!(
        r.stdout.contains("bad file:") && r.stdout.contains("multi/a"),
        "{}",
        r.dump()
    );
    let r = run(&["verify", &torrent, &s(parent.display()), "--json"]);
    r.assert_code(1);
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(
        v["bad_files"][0]
            .as_str()
            .unwrap_or_default()
            .ends_with("multi/a"),
        "{v}"
    );
    let r = run(&["verify", &torrent, &s(parent.display()), "-q"]);
    r.assert_code(1);
    assert!(r.stdout.is_empty(), "{}", r.dump());
}

#[test]
fn scrape_json_is_json_even_when_there_is_nothing_to_ask() {
    let dir = support::files::scratch_dir();
    let data = dir.path().join("x.bin");
    fs::write(&data, vec![5u8; 1000]).unwrap();
    let torrent = dir.path().join("x.torrent");
    run(&["create", &s(data.display()), "-o", &s(torrent.display())]).assert_success();
    let r = run(&["scrape", "--json", &s(torrent.display())]);
    r.assert_code(6);
    let v: Value = serde_json::from_str(r.stdout.trim()).expect("JSON even so");
    assert!(
        v["trackers"].as_array().is_some_and(|t| t.is_empty()),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------------------
// Help screens (issue 17: "--help of every command reads well next to aria2c --help, and the
// README's usage section matches")
// ---------------------------------------------------------------------------------------------

/// `bitfetch ARGS`, which must succeed quietly; its stdout.
fn help_text(args: &[&str]) -> String {
    let r = run(args);
    r.assert_success();
    assert!(r.stderr.is_empty(), "{}", r.dump());
    r.stdout
}

/// The commands `bitfetch --help` lists that have options of their own (all but `version`).
fn commands_in_help() -> Vec<String> {
    let top = help_text(&["--help"]);
    let listed: Vec<String> = top
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "version")
        .collect();
    assert!(listed.len() >= 6, "{top}");
    listed
}

/// One option as a help screen lists it: `-o, --output DIR   text...`.
#[derive(Debug)]
struct HelpOption {
    short: Option<String>,
    long: String,
    value: Option<String>,
    text: String,
}

impl HelpOption {
    /// `--output DIR`, or `--seed` for a switch.
    fn long_form(&self) -> String {
        match &self.value {
            Some(v) => format!("{} {v}", self.long),
            None => self.long.clone(),
        }
    }

    /// `-o DIR`, or `-q` for a switch.
    fn short_form(&self) -> Option<String> {
        let short = self.short.as_ref()?;
        Some(match &self.value {
            Some(v) => format!("{short} {v}"),
            None => short.clone(),
        })
    }
}

/// The options of a help screen: a line indented by 2 (with a short name) or 6 columns that
/// starts with `-`; deeper indented lines continue its description.
fn options_in_help(help: &str) -> Vec<HelpOption> {
    let mut options: Vec<HelpOption> = Vec::new();
    for line in help.lines() {
        let body = line.trim_start();
        let indent = line.len() - body.len();
        if (indent == 2 || indent == 6) && body.starts_with('-') {
            let (head, text) = body.split_once("  ").unwrap_or((body, ""));
            let mut words = head.split_whitespace();
            let mut first = words.next().unwrap_or_default();
            let short = first.strip_suffix(',').map(|s| {
                let short = s.to_string();
                first = words.next().unwrap_or_default();
                short
            });
            options.push(HelpOption {
                short,
                long: first.to_string(),
                value: words.next().map(str::to_string),
                text: text.trim().to_string(),
            });
            assert!(
                words.next().is_none(),
                "one placeholder per option: {line:?}"
            );
        } else if indent > 6
            && let Some(last) = options.last_mut()
        {
            last.text = format!("{} {body}", last.text).trim().to_string();
        }
    }
    options
}

#[test]
fn help_reads_the_same_however_it_is_asked_and_fits_80_columns() {
    let top = help_text(&["--help"]);
    assert_eq!(help_text(&["-h"]), top);
    assert_eq!(help_text(&["help"]), top);
    assert_eq!(top.matches("Exit codes:").count(), 1, "{top}");
    assert!(top.starts_with("bitfetch "), "{top}");
    let mut screens = vec![("--help".to_string(), top)];
    for cmd in commands_in_help() {
        let text = help_text(&[&cmd, "--help"]);
        for other in [
            vec![cmd.as_str(), "-h"],
            vec!["help", &cmd],
            vec![&cmd, "x.torrent", "--json", "--help"],
        ] {
            assert_eq!(help_text(&other), text, "bitfetch {}", other.join(" "));
        }
        assert!(
            text.starts_with(&format!("Usage: bitfetch {cmd} [OPTIONS] ")),
            "{text}"
        );
        assert_eq!(
            text.matches("Exit codes:").count(),
            1,
            "one pointer: {text}"
        );
        assert!(!text.contains("130"), "the table itself only once: {text}");
        screens.push((cmd, text));
    }
    for (name, text) in &screens {
        for line in text.lines() {
            let cols = line.chars().count();
            assert!(cols <= 80, "{name}: a line of {cols} columns: {line:?}");
        }
        // argh's own wording and layout must not show through.
        for artefact in [
            "display usage information",
            "help, --help",
            "--help, help",
            "[--]",
            "<",
        ] {
            assert!(!text.contains(artefact), "{name}: {artefact:?} in:\n{text}");
        }
    }
}

#[test]
fn every_option_in_help_shows_its_value_as_the_parser_reads_it() {
    for cmd in commands_in_help() {
        let help = help_text(&[&cmd, "--help"]);
        let options = options_in_help(&help);
        assert!(
            options.iter().any(|o| o.long == "--help"),
            "{cmd}: no -h, --help in:\n{help}"
        );
        for o in options.iter().filter(|o| o.long != "--help") {
            assert!(!o.text.is_empty(), "{cmd} {}: no description", o.long);
            if let Some(v) = &o.value {
                assert!(
                    v.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ':'),
                    "{cmd} {}: placeholder {v:?}",
                    o.long
                );
            }
            // Given without a value (and without the arguments), an option that takes one
            // is refused as needing one, by the name the help shows; a switch is accepted
            // and the missing argument is what is refused.
            let r = run(&[&cmd, &o.long]);
            r.assert_code(2);
            let line = r.error_line().unwrap_or_else(|| panic!("{}", r.dump()));
            match &o.value {
                Some(_) => assert_eq!(
                    line,
                    format!(
                        "bitfetch: error: {} needs a value: {}",
                        o.long,
                        o.long_form()
                    ),
                    "{cmd}: {}",
                    r.dump()
                ),
                None => assert!(
                    line.starts_with("bitfetch: error: missing "),
                    "{cmd} {} is a switch in the help: {}",
                    o.long,
                    r.dump()
                ),
            }
        }
    }
}

#[test]
fn the_readme_documents_every_option_the_help_lists_as_the_help_writes_it() {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("\n## Usage\n").expect("a usage section");
    let usage = &readme[start..];
    let usage = &usage[..usage[1..].find("\n## ").map_or(usage.len(), |e| e + 1)];
    for cmd in commands_in_help() {
        let help = help_text(&[&cmd, "--help"]);
        let usage_line = help.lines().next().unwrap_or_default();
        let synopsis = usage_line.trim_start_matches("Usage: ");
        assert!(
            usage.contains(&format!("`{synopsis}`")),
            "README: no `{synopsis}`"
        );
        for o in options_in_help(&help)
            .into_iter()
            .filter(|o| o.long != "--help")
        {
            // Written as the help writes it, placeholder and all, in backquotes.
            let forms: Vec<String> = [Some(o.long_form()), o.short_form()]
                .into_iter()
                .flatten()
                .collect();
            for form in &forms {
                assert!(
                    usage.contains(&format!("`{form}`")),
                    "README's usage section does not show `{form}` ({cmd})"
                );
            }
            // The same default, where the help states one.
            let Some(at) = o.text.find("default") else {
                continue;
            };
            let default: String = o.text[at..]
                .chars()
                .take_while(|c| !matches!(c, ';' | ')' | ','))
                .collect();
            if default.trim() == "default" {
                continue;
            }
            let rows: Vec<String> = usage
                .lines()
                .filter(|l| l.contains(&format!("`{}`", o.long_form())))
                .map(|l| l.replace('`', ""))
                .collect();
            assert!(
                rows.iter().any(|r| r.contains(&default)),
                "{cmd} {}: the help says {default:?}; README's rows: {rows:#?}",
                o.long
            );
        }
    }
}

#[test]
fn mistakes_get_one_error_line_a_suggestion_and_the_usage() {
    let p = Payload::single("typo.bin", 10_000, 12);
    let torrent = s(p.torrent.display());
    for (args, says) in [
        (
            vec!["download", &torrent, "--max-peer", "3"],
            "unknown option '--max-peer'; did you mean '--max-peers'?",
        ),
        (
            vec!["download", &torrent, "--seed-tim=1h"],
            "unknown option '--seed-tim'; did you mean '--seed-time'?",
        ),
        (
            vec!["seed", &torrent, ".", "-peer", "127.0.0.1:1"],
            "unknown option '-peer'; did you mean '--peer'?",
        ),
        (
            vec!["info", &torrent, "--peer", "127.0.0.1:1"],
            "info has no option '--peer' (download and seed have)",
        ),
        (vec!["help", "downlod"], "did you mean 'download'?"),
        (vec!["seed", &torrent], "missing DATA"),
        (
            vec!["download", &torrent, "extra"],
            "unexpected argument 'extra'",
        ),
        (
            vec!["download", &torrent, "--max-peers", "lots"],
            "--max-peers lots: expected a whole number",
        ),
        (
            vec!["download", &torrent, "--port", "70000"],
            "--port 70000: expected a port number",
        ),
        (
            vec!["download", &torrent, "--max-upload-rate", "fast"],
            "--max-upload-rate fast:",
        ),
        (
            vec!["download", &torrent, "--announce-interval", "soon"],
            "--announce-interval soon: expected a duration",
        ),
        (vec![], "no command given"),
    ] {
        let r = run(&args);
        r.assert_code(2);
        let first = r.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("bitfetch: error: ") && first.contains(says),
            "{args:?}: wanted {says:?}: {}",
            r.dump()
        );
        assert_eq!(
            r.stderr.matches("bitfetch: error:").count(),
            1,
            "{}",
            r.dump()
        );
        assert!(r.stdout.is_empty(), "{}", r.dump());
        // argh's capitalised sentences never show through.
        for argh in [
            "Unrecognized",
            "Required",
            "No value",
            "Error parsing",
            "One of",
        ] {
            assert!(!r.stderr.contains(argh), "{args:?}: {}", r.dump());
        }
    }
    // The parser's complaints end with the command's usage and where to read more.
    let r = run(&["download", &torrent, "--max-peer", "3"]);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines[1..],
        [
            "Usage: bitfetch download [OPTIONS] TORRENT",
            "Run 'bitfetch download --help' for its options."
        ],
        "{}",
        r.dump()
    );
}
