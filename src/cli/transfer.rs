//! `download` and `seed`: arguments into an engine run, its events onto the terminal (or as
//! JSON), signals into a stop.

use std::fs::{self, DirBuilder};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

use super::render::{Mode, Render};
use super::{
    DownloadArgs, Loaded, SeedArgs, SessionOptions, load_source, load_torrent_with, process,
};
use crate::engine::{Choice, Config, Engine, MagnetSource, Source, StreamTo, Target};
use crate::error::Error;
use crate::metainfo::Metainfo;

/// Progress lines in a log (stderr not a terminal), like aria2c's summary interval.
const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the CLI looks at the signal flag while waiting for events.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// Which file `-O -` streams: `--file N`, the only selected file, or the only file.
fn stream_file(
    a: &DownloadArgs,
    meta: &Metainfo,
    selection: Option<&[bool]>,
) -> Result<usize, Error> {
    // Numbered as --list shows them: pad files are not among them.
    let visible: Vec<usize> = meta.content_files().map(|(i, _)| i).collect();
    let n = visible.len();
    if a.json {
        return Err(Error::Usage(
            "--json and -O - both want standard output; choose one".into(),
        ));
    }
    if let Some(i) = a.file {
        return if (1..=n).contains(&i) {
            Ok(visible[i - 1])
        } else {
            Err(Error::Usage(format!(
                "--file {i}: the torrent has files 1 to {n}"
            )))
        };
    }
    let candidates: Vec<usize> = visible
        .into_iter()
        .filter(|&i| selection.is_none_or(|s| s[i]))
        .collect();
    match candidates[..] {
        [only] => Ok(only),
        _ => Err(Error::Usage(
            "-O - streams one file: pick it with --file N (see --list)".into(),
        )),
    }
}

/// A directory of our own for streamed data: made fresh, readable by us alone, so no other
/// local user can have made it first and swapped the data under us.
fn private_temp_dir(info_hash_hex: &str) -> Result<PathBuf, Error> {
    let base = std::env::temp_dir();
    let mut rng = crate::rng::Rng::from_os();
    let mut last = None;
    for _ in 0..8 {
        let dir = base.join(format!(
            "bitfetch-{}-{}-{:08x}",
            std::process::id(),
            &info_hash_hex[..16],
            rng.next_u64() as u32
        ));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
        }
    }
    Err(Error::io(
        format!("creating a temporary directory in {}", base.display()),
        last.unwrap_or_else(|| std::io::Error::other("no free name")),
    ))
}

pub(super) fn download(a: &DownloadArgs) -> Result<(), Error> {
    let meta = match load_source(&a.torrent, a.ca_file.as_deref())? {
        Loaded::Torrent(meta) => *meta,
        Loaded::Magnet(m) => return download_magnet(a, *m),
    };
    if a.save_torrent.is_some() {
        return Err(Error::Usage(
            "--save-torrent goes with a magnet link (this is a torrent already)".into(),
        ));
    }
    if a.list {
        return super::commands::list_files(&meta, a.json);
    }
    let (mut config, mode, interval) = session_config(&a.options(), a.seeding())?;
    config.fsync = a.fsync;
    let streaming = a.streaming()?;
    let selection = a.selection(&meta)?;
    let stream = if streaming {
        Some(stream_file(a, &meta, selection.as_deref())?)
    } else if a.file.is_some() {
        return Err(Error::Usage("--file goes with -O - (streaming)".into()));
    } else {
        None
    };
    let selected = match stream {
        Some(f) => Some((0..meta.files.len()).map(|i| i == f).collect::<Vec<_>>()),
        None => selection,
    };
    check_output_dir(a)?;
    // Streaming without -o keeps the data in a temporary directory, removed at the end.
    let (dir, temporary) = match (&a.output, streaming) {
        (Some(d), _) => (d.clone(), false),
        (None, true) => (private_temp_dir(&meta.info_hash_hex())?, true),
        (None, false) => (PathBuf::from("."), false),
    };
    let target = Target::Download {
        dir: dir.clone(),
        selected,
        stream: stream.map(|file| StreamTo {
            file,
            out: Box::new(std::io::stdout()),
        }),
    };
    let result = drive(Source::Torrent(meta), target, config, (mode, interval));
    if temporary {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

/// `-o` names a directory (or nothing yet), never a file.
fn check_output_dir(a: &DownloadArgs) -> Result<(), Error> {
    if let Some(out) = &a.output
        && fs::metadata(out).is_ok_and(|m| !m.is_dir())
    {
        return Err(Error::io(
            format!("-o {}", out.display()),
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "that is a file; -o takes the directory to download into",
            ),
        ));
    }
    Ok(())
}

/// `download MAGNET`: the same options; what depends on the file list (`--list`,
/// `--select`, `--only`, `--file`, the magnet's `so`) is settled once the metadata is in.
fn download_magnet(a: &DownloadArgs, magnet: crate::magnet::Magnet) -> Result<(), Error> {
    let (mut config, mode, interval) = session_config(&a.options(), a.seeding())?;
    config.fsync = a.fsync;
    let streaming = a.streaming()?;
    if a.file.is_some() && !streaming {
        return Err(Error::Usage("--file goes with -O - (streaming)".into()));
    }
    check_output_dir(a)?;
    let hex: String = magnet
        .info_hash
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (dir, temporary) = match (&a.output, streaming) {
        (Some(d), _) => (d.clone(), false),
        (None, true) => (private_temp_dir(&hex)?, true),
        (None, false) => (PathBuf::from("."), false),
    };
    let list = a.list;
    let json = a.json;
    let save = a.save_torrent.clone();
    let trackers = magnet.tracker_tiers();
    let so = magnet.select.clone();
    let picks = a.clone();
    let choose = move |meta: &Metainfo| -> Result<Choice, Error> {
        if let Some(path) = &save {
            save_torrent(path, meta, &trackers)?;
        }
        if list {
            super::commands::list_files(meta, json)?;
            return Ok(Choice::Stop);
        }
        let mut selection = picks.selection(meta)?;
        if selection.is_none()
            && let Some(so) = &so
        {
            selection = Some(so.mask(meta.files.len()).map_err(Error::Magnet)?);
        }
        if streaming {
            let file = stream_file(&picks, meta, selection.as_deref())?;
            return Ok(Choice::Stream(file));
        }
        Ok(Choice::Download(selection))
    };
    let target = Target::Download {
        dir: dir.clone(),
        selected: None,
        stream: streaming.then(|| StreamTo {
            file: 0,
            out: Box::new(std::io::stdout()),
        }),
    };
    let source = Source::Magnet(MagnetSource {
        magnet,
        choose: Some(Box::new(choose)),
    });
    let result = drive(source, target, config, (mode, interval));
    if temporary {
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

/// Writes the fetched torrent: the info dictionary byte for byte (so the info hash is the
/// magnet's), with the magnet's trackers. Made beside the target and renamed into place.
pub(super) fn save_torrent(
    path: &std::path::Path,
    meta: &Metainfo,
    trackers: &[Vec<String>],
) -> Result<(), Error> {
    let mut out = b"d".to_vec();
    let bytes = |s: &str| format!("{}:{s}", s.len()).into_bytes();
    if let Some(first) = trackers.first().and_then(|t| t.first()) {
        out.extend(bytes("announce"));
        out.extend(bytes(first));
        out.extend(bytes("announce-list"));
        out.push(b'l');
        for tier in trackers {
            out.push(b'l');
            for url in tier {
                out.extend(bytes(url));
            }
            out.push(b'e');
        }
        out.push(b'e');
    }
    out.extend(bytes("info"));
    out.extend_from_slice(meta.info_bytes());
    out.push(b'e');
    let tmp = path.with_extension("torrent.part");
    fs::write(&tmp, &out)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("writing {}", path.display()), e)
        })
}

pub(super) fn seed(a: &SeedArgs) -> Result<(), Error> {
    let meta = load_torrent_with(&a.torrent, a.ca_file.as_deref())?;
    let (config, mode, interval) = session_config(&a.options(), true)?;
    let target = Target::Seed {
        data: a.data.clone(),
    };
    drive(Source::Torrent(meta), target, config, (mode, interval))
}

/// Runs the engine to its end, rendering its events; SIGINT/SIGTERM stop it in order.
pub(super) fn drive(
    source: Source,
    target: Target,
    config: Config,
    (mode, interval): (Mode, Option<Duration>),
) -> Result<(), Error> {
    process::install_stop_handler();
    let (handle, events) = Engine::start(source, target, config);
    let mut render = Render::new(mode, interval);
    let mut stop_sent = false;
    loop {
        match events.recv_timeout(SIGNAL_POLL) {
            Ok(event) => render.event(&event),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if !stop_sent && process::stop_requested() {
            handle.stop();
            stop_sent = true;
        }
    }
    render.close();
    handle.wait()
}

/// The engine's configuration, the output mode and the progress-line interval from the
/// options `download` and `seed` share.
pub(super) fn session_config(
    o: &SessionOptions,
    seed_after: bool,
) -> Result<(Config, Mode, Option<Duration>), Error> {
    // `0` means no limit, as in aria2c and curl.
    let rate = |name: &str, r: Option<&str>| -> Result<Option<u64>, Error> {
        match r.map(str::trim) {
            None | Some("0") => Ok(None),
            Some(r) => super::parse_rate(r)
                .map(Some)
                .map_err(|why| Error::Usage(format!("{name} {why}"))),
        }
    };
    let duration = |name: &str, d: Option<&str>| -> Result<Option<Duration>, Error> {
        d.map(super::parse_duration)
            .transpose()
            .map_err(|why| Error::Usage(format!("{name} {why}")))
    };
    if o.max_peers == 0 || o.max_peers_per_ip == 0 {
        return Err(Error::Usage(
            "--max-peers and --max-peers-per-ip must be at least 1".into(),
        ));
    }
    let config = Config {
        peers: super::parse_peers(o.peer)?,
        port: o.port,
        bind: o.bind,
        ca_file: super::ca_file(o.ca_file),
        announce_interval: duration("--announce-interval", o.announce_interval)?
            .map(|d| d.max(Duration::from_secs(1))),
        seed_after,
        fsync: false,
        seed_limits: crate::engine::SeedLimits {
            ratio: o
                .seed_ratio
                .map(super::parse_ratio)
                .transpose()
                .map_err(Error::Usage)?,
            time: duration("--seed-time", o.seed_time)?,
        },
        dht: !o.no_dht,
        dht_bootstrap: super::args::check_dht_nodes(o.dht_bootstrap)?,
        dht_state: super::args::dht_state_file(),
        max_peers: o.max_peers,
        max_peers_per_ip: o.max_peers_per_ip,
        upload_slots: o.upload_slots,
        max_upload_rate: rate("--max-upload-rate", o.max_upload_rate)?,
        max_download_rate: rate("--max-download-rate", o.max_download_rate)?,
        timeout: duration("--timeout", o.timeout)?,
        stall_timeout: duration("--stall-timeout", o.stall_timeout)?,
        pex: !o.no_pex,
        web_seeds: web_seeds(o.web_seed)?,
        use_web_seeds: !o.no_web_seeds,
        ..Config::default()
    };
    let mode = if o.json {
        Mode::Json
    } else if o.quiet {
        Mode::Quiet
    } else {
        Mode::Human
    };
    let interval =
        duration("--progress-interval", o.progress_interval)?.or(Some(DEFAULT_PROGRESS_INTERVAL));
    Ok((config, mode, interval))
}

/// `--web-seed` URLs: http or https only.
fn web_seeds(urls: &[String]) -> Result<Vec<String>, Error> {
    for url in urls {
        if !crate::webseed::url::usable(url) {
            return Err(Error::Usage(format!(
                "--web-seed {}: not an http or https URL",
                crate::path_safety::escape(url)
            )));
        }
    }
    Ok(urls.to_vec())
}
