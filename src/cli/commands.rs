//! The commands that need no peers: `info`, `create`, `verify`, `scrape`, and `download
//! --list`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::args::{
    CreateArgs, InfoArgs, MagnetArgs, ScrapeArgs, VerifyArgs, parse_size, torrent_relative,
};
use super::{ca_file, human_bytes, load_torrent, load_torrent_with, render, write_stdout};
use crate::create;
use crate::error::Error;
use crate::json;
use crate::metainfo::{self, Metainfo};
use crate::path_safety::escape;
use crate::storage::{Layout, Storage};
use crate::tracker::{self, NetConfig};

/// `--list`: index, size and path of every file (one JSON object with `--json`).
pub fn list_files(meta: &Metainfo, as_json: bool) -> Result<(), Error> {
    let text = if as_json {
        let files = json::array(meta.content_files().enumerate().map(|(i, (_, f))| {
            format!(
                "{{\"index\":{},\"path\":{},\"size\":{}}}",
                i + 1,
                json::string(&torrent_relative(meta, &f.path)),
                f.len
            )
        }));
        format!("{{\"files\":{files}}}")
    } else {
        meta.content_files()
            .enumerate()
            .map(|(i, (_, f))| {
                format!(
                    "{:>4} {:>14} {}",
                    i + 1,
                    f.len,
                    escape(&torrent_relative(meta, &f.path))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    write_stdout(&text)
}

pub fn scrape(a: &ScrapeArgs) -> Result<(), Error> {
    let m = load_torrent_with(&a.torrent, a.ca_file.as_deref())?;
    let net = NetConfig {
        bind: a.bind,
        ca_file: ca_file(a.ca_file.as_deref()),
    };
    let client = tracker::Client::new(&net, Duration::from_secs(15))
        .map_err(|e| Error::Usage(e.to_string()))?;
    let urls: Vec<String> = m.trackers.iter().flatten().cloned().collect();
    let results = tracker::scrape_all(&client, &urls, &m.info_hash);
    // With --json the answer is JSON whatever happened, so a script can always parse it.
    let out = if a.json {
        let items = results.iter().map(|(u, r)| match r {
            Ok(s) => format!(
                "{{\"url\":{},\"seeders\":{},\"leechers\":{},\"completed\":{}}}",
                json::string(u),
                s.seeders,
                s.leechers,
                s.completed
            ),
            Err(e) => format!(
                "{{\"url\":{},\"error\":{}}}",
                json::string(u),
                json::string(&e.to_string())
            ),
        });
        Some(format!("{{\"trackers\":{}}}", json::array(items)))
    } else if results.is_empty() {
        None
    } else {
        Some(
            results
                .iter()
                .map(|(u, r)| match r {
                    Ok(s) => format!(
                        "{}: {} seeders, {} leechers, {} completed",
                        escape(u),
                        s.seeders,
                        s.leechers,
                        s.completed
                    ),
                    Err(e) => format!("{}: {e}", escape(u)),
                })
                .collect::<Vec<_>>()
                .join("\n"),
        )
    };
    if let Some(out) = out {
        write_stdout(&out)?;
    }
    if results.is_empty() {
        Err(Error::NoPeers("the torrent names no tracker".into()))
    } else if results.iter().any(|(_, r)| r.is_ok()) {
        Ok(())
    } else {
        Err(Error::NoPeers("no tracker answered the scrape".into()))
    }
}

pub fn info(a: &InfoArgs) -> Result<(), Error> {
    let m = match super::load_source(&a.torrent, None)? {
        super::Loaded::Torrent(m) => *m,
        super::Loaded::Magnet(magnet) => fetch_metadata(*magnet)?,
    };
    let out = if a.json { info_json(&m) } else { info_text(&m) };
    write_stdout(&out)
}

/// A magnet's torrent, fetched from its peers and trackers (nothing is written); notices go
/// to stderr as a download's would.
fn fetch_metadata(magnet: crate::magnet::Magnet) -> Result<Metainfo, Error> {
    let got = std::sync::Arc::new(parking_lot::Mutex::new(None));
    let keep = std::sync::Arc::clone(&got);
    let choose = move |meta: &Metainfo| -> Result<crate::engine::Choice, Error> {
        *keep.lock() = Some(meta.clone());
        Ok(crate::engine::Choice::Stop)
    };
    let source = crate::engine::Source::Magnet(crate::engine::MagnetSource {
        magnet,
        choose: Some(Box::new(choose)),
    });
    let target = crate::engine::Target::Download {
        dir: std::path::PathBuf::from("."),
        selected: None,
        stream: None,
    };
    // The DHT with its saved table, as a download would: a trackerless magnet needs it.
    let config = crate::engine::Config {
        dht_state: super::args::dht_state_file(),
        ..crate::engine::Config::default()
    };
    super::transfer::drive(source, target, config, (super::render::Mode::Quiet, None))?;
    got.lock()
        .take()
        .ok_or(Error::Internal("the metadata was fetched but not kept"))
}

/// `magnet TORRENT`: the torrent's magnet link.
pub fn magnet(a: &MagnetArgs) -> Result<(), Error> {
    let m = load_torrent(&a.torrent)?;
    write_stdout(&crate::magnet::Magnet::from_metainfo(&m).to_uri())
}

/// `2024-05-01T12:00:00Z` from unix seconds (proleptic Gregorian, UTC).
pub fn iso8601(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn info_text(m: &Metainfo) -> String {
    let g = &m.geometry;
    let content = g.total_len() - m.pad_bytes();
    let mut s = format!(
        "name:          {}\nversion:       {}\ninfo hash:     {}\n",
        escape(&m.name),
        m.version.name(),
        m.info_hash_hex(),
    );
    if let Some(v2) = &m.v2 {
        s += &format!("info hash v2:  {}\n", metainfo::hex(&v2.info_hash));
    }
    s += &format!(
        "size:          {} ({} bytes)\n",
        human_bytes(content),
        content
    );
    if m.pad_bytes() > 0 {
        s += &format!(
            "padding:       {} bytes in pad files (not stored)\n",
            m.pad_bytes()
        );
    }
    s += &format!(
        "piece length:  {}\npieces:        {}\nprivate:       {}\n",
        human_bytes(u64::from(g.nominal_piece_len())),
        g.piece_count(),
        if m.private { "yes" } else { "no" },
    );
    if let Some(c) = &m.comment {
        s += &format!("comment:       {}\n", escape(c));
    }
    if let Some(c) = &m.created_by {
        s += &format!("created by:    {}\n", escape(c));
    }
    if let Some(d) = m.creation_date {
        s += &format!("created:       {}\n", iso8601(d));
    }
    s += &format!("files ({}):\n", m.content_files().count());
    for (_, f) in m.content_files() {
        s += &format!("  {:>14}  {}\n", f.len, escape(&f.path.to_string_lossy()));
    }
    s += "trackers:\n";
    for (i, tier) in m.trackers.iter().enumerate() {
        for url in tier {
            s += &format!("  tier {}: {}\n", i + 1, escape(url));
        }
    }
    if m.trackers.is_empty() {
        s += "  (none)\n";
    }
    s.pop();
    s
}

fn info_json(m: &Metainfo) -> String {
    let g = &m.geometry;
    let files = json::array(m.content_files().map(|(_, f)| {
        format!(
            "{{\"path\":{},\"size\":{}}}",
            json::string(&f.path.to_string_lossy()),
            f.len
        )
    }));
    let trackers = json::array(
        m.trackers
            .iter()
            .map(|t| json::array(t.iter().map(|u| json::string(u)))),
    );
    // `size` is the content (pad files apart); `total_size` kept for scripts written
    // against it.
    let content = g.total_len() - m.pad_bytes();
    let v2_hash = m.v2.as_ref().map_or("null".to_string(), |v2| {
        format!("\"{}\"", metainfo::hex(&v2.info_hash))
    });
    format!(
        "{{\"name\":{},\"version\":\"{}\",\"info_hash\":\"{}\",\"info_hash_v2\":{v2_hash},\"size\":{},\"total_size\":{},\"pad_bytes\":{},\"piece_length\":{},\"pieces\":{},\"private\":{},\"files\":{files},\"trackers\":{trackers},\"comment\":{},\"created_by\":{},\"creation_date\":{},\"created\":{}}}",
        json::string(&m.name),
        m.version.name(),
        m.info_hash_hex(),
        content,
        content,
        m.pad_bytes(),
        g.nominal_piece_len(),
        g.piece_count(),
        m.private,
        json::opt_string(m.comment.as_deref()),
        json::opt_string(m.created_by.as_deref()),
        m.creation_date
            .map_or("null".to_string(), |d| d.to_string()),
        json::opt_string(m.creation_date.map(iso8601).as_deref()),
    )
}

/// Whether `out` is `input` itself or lies inside it (a directory being shared).
fn is_inside(out: &Path, input: &Path) -> bool {
    let Ok(input) = fs::canonicalize(input) else {
        return false;
    };
    // The output may not exist yet: compare its directory's real path plus its name.
    let out_dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(dir) = fs::canonicalize(out_dir) else {
        return false;
    };
    let full = match out.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    };
    full == input || full.starts_with(&input)
}

pub fn create_cmd(a: &CreateArgs) -> Result<(), Error> {
    let piece_len = a
        .piece_length
        .as_deref()
        .map(|s| {
            parse_size(s)
                .ok()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|&n| {
                    n >= 16 * 1024 && n.is_power_of_two() && u64::from(n) <= metainfo::MAX_PIECE_LEN
                })
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--piece-length {s}: must be a power of two from 16K to {}M",
                        metainfo::MAX_PIECE_LEN >> 20
                    ))
                })
        })
        .transpose()?;
    for url in &a.announce {
        if !(url.starts_with("http://") || url.starts_with("https://") || url.starts_with("udp://"))
        {
            return Err(Error::Usage(format!(
                "-a {url}: tracker URLs start with http://, https:// or udp://"
            )));
        }
    }
    if let Some(out) = &a.output {
        if is_inside(out, &a.path) {
            return Err(Error::Usage(format!(
                "-o {}: the torrent would be written over (or into) what it describes; write it elsewhere",
                out.display()
            )));
        }
        if fs::symlink_metadata(out).is_ok() && !a.force {
            return Err(Error::Usage(format!(
                "-o {}: the file exists; add --force to replace it",
                out.display()
            )));
        }
    }
    let version = match (a.v2, a.hybrid) {
        (true, true) => {
            return Err(Error::Usage(
                "--v2 and --hybrid exclude each other: --v2 makes a v2-only torrent, \
                 --hybrid one with both a v1 and a v2 part"
                    .to_string(),
            ));
        }
        (true, false) => create::Version::V2,
        (false, true) => create::Version::Hybrid,
        (false, false) => create::Version::V1,
    };
    let opts = create::Options {
        trackers: a.announce.clone(),
        piece_len,
        private: a.private,
        comment: a.comment.clone(),
        threads: 0,
        version,
    };
    let made = create::build(&a.path, &opts)?;
    let bytes = &made.torrent;
    // Re-parse what we made: the same strict checks every reader applies.
    Metainfo::from_bytes(bytes).map_err(|source| Error::Torrent {
        path: a.path.clone(),
        source,
    })?;
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.torrent", made.name)));
    if a.output.is_none() && fs::symlink_metadata(&out).is_ok() && !a.force {
        return Err(Error::Usage(format!(
            "{} exists; add --force to replace it, or choose another name with -o",
            out.display()
        )));
    }
    // Written beside its final name and renamed over it: a failure leaves no half torrent.
    let tmp = out.with_extension("torrent.part");
    fs::write(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, &out))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("writing {}", out.display()), e)
        })?;
    let hashes = match (made.info_hash_v1, made.info_hash_v2) {
        (Some(v1), None) => format!("info hash {}", metainfo::hex(&v1)),
        (None, Some(v2)) => format!("v2 info hash {}", metainfo::hex(&v2)),
        (Some(v1), Some(v2)) => format!(
            "info hashes v1 {}, v2 {}",
            metainfo::hex(&v1),
            metainfo::hex(&v2)
        ),
        (None, None) => unreachable!("a torrent has a v1 or a v2 part"),
    };
    render::stderr_line(&format!(
        "bitfetch: created {} ({} in {} pieces, {hashes})",
        out.display(),
        human_bytes(made.total_len),
        made.piece_count,
    ));
    Ok(())
}

pub fn verify(a: &VerifyArgs) -> Result<(), Error> {
    let m = load_torrent(&a.torrent)?;
    let layout = Layout::for_data_path(&a.data, &m);
    let storage = Storage::open_existing(&layout, &m.geometry)?;
    if storage.files_present() == 0 {
        return Err(Error::no_data(&a.data, &m, &layout));
    }
    let results = storage.verify_all(&m, crate::engine::cores());
    let bad: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, ok)| !**ok)
        .map(|(i, _)| i)
        .collect();
    let total = results.len() as u32;
    // The files the bad pieces touch, in torrent order.
    let g = &m.geometry;
    let mut touched: Vec<usize> = bad
        .iter()
        .filter_map(|&i| g.piece(i as u32))
        .flat_map(|p| g.spans(g.piece_offset(p), u64::from(g.piece_len(p))))
        .map(|s| s.file)
        .collect();
    touched.dedup();
    touched.sort_unstable();
    touched.dedup();
    let bad_files: Vec<String> = touched
        .iter()
        .map(|&f| layout.full_path(f).display().to_string())
        .collect();
    let good = total as usize - bad.len();
    let report = if a.json {
        Some(format!(
            "{{\"name\":{},\"pieces\":{total},\"good\":{good},\"bad\":{},\"bad_pieces\":{},\"bad_files\":{}}}",
            json::string(&m.name),
            bad.len(),
            json::string(&ranges(&bad)),
            json::array(bad_files.iter().map(|f| json::string(f)))
        ))
    } else if a.quiet {
        None
    } else {
        let mut text = format!("{}: {good} of {total} pieces good", escape(&m.name));
        if !bad.is_empty() {
            text += &format!("\nbad pieces: {}", ranges(&bad));
            for f in &bad_files {
                text += &format!("\nbad file: {}", escape(f));
            }
        }
        Some(text)
    };
    if let Some(report) = report {
        write_stdout(&report)?;
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(Error::Incomplete {
            bad: bad.len() as u32,
            total,
        })
    }
}

/// `[1,2,3,7]` → `1-3,7`.
pub fn ranges(sorted: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_ranges_are_compact() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn dates_are_iso_8601_in_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_733_318_400 + 3661), "2024-12-04T14:21:01Z");
        assert_eq!(iso8601(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn an_output_inside_its_input_is_seen() {
        let dir = std::env::temp_dir().join(format!("bitfetch-inside-{}", std::process::id()));
        fs::create_dir_all(dir.join("share")).unwrap();
        fs::write(dir.join("share/a"), b"x").unwrap();
        assert!(is_inside(&dir.join("share/a"), &dir.join("share/a")));
        assert!(is_inside(
            &dir.join("share/new.torrent"),
            &dir.join("share")
        ));
        assert!(!is_inside(&dir.join("out.torrent"), &dir.join("share")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
