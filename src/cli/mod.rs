//! The command line: arguments, the commands, exit codes. The only part of bitfetch that
//! prints, reads argv or handles signals; it drives the engine through its public API, and
//! nothing below it imports it.

mod args;
mod commands;
pub mod exit;
mod help;
pub mod process;
mod render;
mod transfer;
mod usage;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use argh::FromArgs;

use crate::error::Error;
use crate::metainfo::{self, Metainfo};

use args::*;
pub use render::stderr_line;

/// The program: arguments from argv, the command run, its outcome as an exit code.
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode as Code;
    let mut argv = std::env::args();
    let cmd = argv.next().unwrap_or_default();
    let cmd = Path::new(&cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("bitfetch")
        .to_string();
    let rest = normalize_args(argv.collect());
    if let Some(help) = help_request(&rest) {
        return match help {
            // A reader that closed the pipe (`| head`) has what it wanted.
            Ok(text) => {
                let _ = writeln!(std::io::stdout().lock(), "{text}");
                Code::SUCCESS
            }
            Err(message) => {
                stderr_line(&message);
                Code::from(exit::ExitCode::BadArguments.code())
            }
        };
    }
    if matches!(
        rest.first().map(String::as_str),
        Some("--version" | "-V" | "version")
    ) {
        let _ = writeln!(
            std::io::stdout().lock(),
            "bitfetch {}",
            env!("CARGO_PKG_VERSION")
        );
        return Code::SUCCESS;
    }
    let strs: Vec<&str> = rest.iter().map(String::as_str).collect();
    let rest = lone_dash_last(&strs);
    let args = match Args::from_args(&[&cmd], &rest) {
        Ok(a) => a,
        // argh's own help word in a positional place (`download help`): the same help.
        Err(early) if early.status.is_ok() => {
            let text = strs
                .first()
                .and_then(|c| help::command(c))
                .unwrap_or_else(help::top);
            let _ = writeln!(std::io::stdout().lock(), "{text}");
            return Code::SUCCESS;
        }
        Err(early) => {
            stderr_line(&usage::argh_error(&early.output, &strs));
            return Code::from(exit::ExitCode::BadArguments.code());
        }
    };
    process::install_sigbus_guard();
    process::raise_open_file_limit();
    match run(args) {
        Ok(()) => Code::SUCCESS,
        Err(e) => {
            stderr_line(&format!("bitfetch: error: {e}"));
            Code::from(exit::of(&e).code())
        }
    }
}

/// The help asked for, if any: `help [COMMAND]`, or `--help` (`-h`) anywhere before `--`,
/// for the command named first or for bitfetch. An unknown command is an error.
fn help_request(args: &[String]) -> Option<Result<String, String>> {
    let first = args.first()?;
    let topic = if first == "help" {
        args.get(1)
    } else if args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--help")
    {
        Some(first).filter(|c| !c.starts_with('-'))
    } else {
        return None;
    };
    Some(match topic {
        None => Ok(help::top()),
        Some(c) => help::command(c).ok_or_else(|| usage::unknown_command(c)),
    })
}

/// What argh does not do itself: `--opt=value` split in two (as getopt does), and `-h` as
/// `--help`. Nothing after `--` is touched.
fn normalize_args(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 2);
    let mut rest = args.into_iter();
    for a in rest.by_ref() {
        if a == "--" {
            out.push(a);
            break;
        }
        if a == "-h" {
            out.push("--help".to_string());
        } else if a.starts_with("--")
            && let Some((opt, value)) = a.split_once('=')
        {
            out.push(opt.to_string());
            out.push(value.to_string());
        } else {
            out.push(a);
        }
    }
    out.extend(rest);
    out
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`) ends the
/// command quietly: that is a normal end for a command line tool.
fn write_stdout(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Error::OutputClosed
            } else {
                Error::io("writing to standard output", e)
            }
        })
}

fn run(args: Args) -> Result<(), Error> {
    let json = match &args.command {
        Command::Download(a) => a.json,
        Command::Seed(a) => a.json,
        _ => false,
    };
    let result = match dispatch(args) {
        // A closed `-O -` pipe means the reader has what it wanted.
        Err(Error::OutputClosed) => Ok(()),
        other => other,
    };
    if json && let Err(e) = &result {
        let line = render::json_error(exit::of(e).code(), &e.to_string());
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
    result
}

fn dispatch(args: Args) -> Result<(), Error> {
    match args.command {
        Command::Info(a) => commands::info(&a),
        Command::Create(a) => commands::create_cmd(&a),
        Command::Verify(a) => commands::verify(&a),
        Command::Download(a) => transfer::download(&a),
        Command::Seed(a) => transfer::seed(&a),
        Command::Scrape(a) => commands::scrape(&a),
        Command::Magnet(a) => commands::magnet(&a),
    }
}

/// Loads a torrent from a path, from standard input (`-`), or from an `http(s)://` URL.
pub fn load_torrent(path: &Path) -> Result<Metainfo, Error> {
    load_torrent_with(path, None)
}

/// What a TORRENT argument gave: a torrent, or a magnet link whose torrent is to be fetched.
pub enum Loaded {
    Torrent(Box<Metainfo>),
    Magnet(Box<crate::magnet::Magnet>),
}

/// Reads a TORRENT argument that may also be a magnet link (given as is, or on standard
/// input with `-`).
pub fn load_source(path: &Path, ca_file: Option<&Path>) -> Result<Loaded, Error> {
    let text = path.to_string_lossy();
    if text.starts_with("magnet:") {
        return parse_magnet(&text);
    }
    if text == "-" {
        let limit = crate::bencode::Limits::METAINFO.max_size;
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|source| Error::ReadTorrent {
                path: path.to_path_buf(),
                source,
            })?;
        if buf.starts_with(b"magnet:") {
            return parse_magnet(String::from_utf8_lossy(&buf).trim());
        }
        if buf.len() > limit {
            return Err(too_large(path, buf.len() as u64));
        }
        return Metainfo::from_bytes(&buf)
            .map(|m| Loaded::Torrent(Box::new(m)))
            .map_err(|source| Error::Torrent {
                path: path.to_path_buf(),
                source,
            });
    }
    if text.starts_with("http://") || text.starts_with("https://") {
        // A URL may lead to a magnet link instead of a .torrent.
        let limit = crate::bencode::Limits::METAINFO.max_size;
        let bytes = match fetch_torrent(&text, ca_file) {
            Ok(bytes) => bytes,
            Err(FetchError::Magnet(to)) => return parse_magnet(&to),
            Err(FetchError::TooLarge) => return Err(too_large(path, limit as u64 + 1)),
            Err(FetchError::Other(m)) => {
                return Err(Error::ReadTorrent {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(m),
                });
            }
        };
        return Metainfo::from_bytes(&bytes)
            .map(|m| Loaded::Torrent(Box::new(m)))
            .map_err(|source| Error::Torrent {
                path: path.to_path_buf(),
                source,
            });
    }
    load_torrent_with(path, ca_file).map(|m| Loaded::Torrent(Box::new(m)))
}

fn parse_magnet(text: &str) -> Result<Loaded, Error> {
    crate::magnet::Magnet::parse(text)
        .map(|m| Loaded::Magnet(Box::new(m)))
        .map_err(Error::Magnet)
}

/// As [`load_torrent`]; `ca_file` is trusted for an `https://` torrent URL.
pub fn load_torrent_with(path: &Path, ca_file: Option<&Path>) -> Result<Metainfo, Error> {
    let limit = crate::bencode::Limits::METAINFO.max_size;
    let text = path.to_string_lossy();
    let read_err = |source: std::io::Error| Error::ReadTorrent {
        path: path.to_path_buf(),
        source,
    };
    if text.starts_with("magnet:") {
        return Err(Error::Usage(format!(
            "{text}: magnet links are not supported yet; give a .torrent file, - for one on standard input, or an http(s):// URL"
        )));
    }
    if let Some((scheme, _)) = text.split_once("://")
        && !matches!(scheme, "http" | "https")
        && !scheme.contains('/')
    {
        return Err(Error::Usage(format!(
            "{text}: {scheme}:// is not supported; give a .torrent file, - for one on standard input, or an http(s):// URL"
        )));
    }
    let bytes = if text == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .take(limit as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(read_err)?;
        buf
    } else if text.starts_with("http://") || text.starts_with("https://") {
        fetch_torrent(&text, ca_file).map_err(|e| match e {
            FetchError::TooLarge => too_large(path, limit as u64 + 1),
            FetchError::Magnet(_) => Error::Usage(format!(
                "{text} leads to a magnet link, which this command cannot take"
            )),
            FetchError::Other(m) => read_err(std::io::Error::other(m)),
        })?
    } else {
        let meta = fs::metadata(path).map_err(read_err)?;
        if meta.len() > limit as u64 {
            return Err(too_large(path, meta.len()));
        }
        fs::read(path).map_err(read_err)?
    };
    if bytes.len() > limit {
        return Err(too_large(path, bytes.len() as u64));
    }
    Metainfo::from_bytes(&bytes).map_err(|source| Error::Torrent {
        path: path.to_path_buf(),
        source,
    })
}

fn too_large(path: &Path, size: u64) -> Error {
    Error::Torrent {
        path: path.to_path_buf(),
        source: metainfo::Error::Bencode(crate::bencode::Error::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            max: crate::bencode::Limits::METAINFO.max_size,
        }),
    }
}

enum FetchError {
    TooLarge,
    /// The URL redirected to a magnet link (sites do that for "download" buttons).
    Magnet(String),
    Other(String),
}

/// GETs a .torrent: certificates verified, 60 s overall, body capped at the metainfo limit.
fn fetch_torrent(url: &str, ca: Option<&Path>) -> Result<Vec<u8>, FetchError> {
    let agent = crate::http::agent(Duration::from_secs(60), None, ca_file(ca).as_deref())
        .map_err(|e| FetchError::Other(e.to_string()))?;
    let mut resp = crate::http::get(&agent, url).map_err(|e| match e {
        crate::http::GetError::RedirectScheme(to) if to.starts_with("magnet:") => {
            FetchError::Magnet(to)
        }
        e => FetchError::Other(e.to_string()),
    })?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(FetchError::Other(format!("HTTP status {status}")));
    }
    let limit = crate::bencode::Limits::METAINFO.max_size as u64;
    resp.body_mut()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge,
            e => FetchError::Other(e.to_string()),
        })
}

/// `--ca-file`, with `SSL_CERT_FILE` as the fallback.
fn ca_file(arg: Option<&Path>) -> Option<PathBuf> {
    arg.map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SSL_CERT_FILE").map(PathBuf::from))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10), "10 B");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
    }

    #[test]
    fn arguments_are_normalised_as_aria2c_and_curl_users_expect() {
        let norm = |a: &[&str]| normalize_args(a.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            norm(&["download", "x.torrent", "--max-peers=5", "-o", "out"]),
            ["download", "x.torrent", "--max-peers", "5", "-o", "out"]
        );
        assert_eq!(norm(&["-h"]), ["--help"]);
        assert_eq!(norm(&["info", "-h"]), ["info", "--help"]);
        // After `--` everything is positional, `=` included.
        assert_eq!(
            norm(&["info", "--", "--x=y.torrent"]),
            ["info", "--", "--x=y.torrent"]
        );
    }
}
