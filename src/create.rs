//! Making a .torrent from a file or a directory.

use std::fs;
use std::path::{Path, PathBuf};

use bt_bencode::Value;

use crate::bencode;
use crate::error::Error;
use crate::geometry::Geometry;
use crate::metainfo::MAX_FILES;
use crate::storage::{Layout, Storage};

/// How `create` makes a torrent. The default: no tracker, an automatic piece length, public,
/// hashed on every core.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Announce URLs, each its own tier.
    pub trackers: Vec<String>,
    /// A power of two of at least 16 KiB (automatic when `None`).
    pub piece_len: Option<u32>,
    pub private: bool,
    pub comment: Option<String>,
    /// Hashing threads; 0 means one per core.
    pub threads: usize,
}

/// Picks a power of two giving roughly 1000–2000 pieces, between 16 KiB and 16 MiB.
pub fn auto_piece_len(total: u64) -> u32 {
    let target = (total / 1500).max(1);
    let p = target.next_power_of_two().clamp(16 << 10, 16 << 20);
    p as u32
}

/// Regular files under `dir`, relative to it, in a stable order. Symbolic links are skipped:
/// following them could pull files from anywhere into a torrent.
fn walk(dir: &Path) -> Result<Vec<(PathBuf, u64)>, Error> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let entries =
            fs::read_dir(&abs).map_err(|e| Error::io(format!("reading {}", abs.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("reading {}", abs.display()), e))?;
            let ft = entry
                .file_type()
                .map_err(|e| Error::io(format!("reading {}", abs.display()), e))?;
            let child = rel.join(entry.file_name());
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() {
                let len = entry
                    .metadata()
                    .map_err(|e| Error::io(format!("reading {}", child.display()), e))?
                    .len();
                out.push((child, len));
                if out.len() > MAX_FILES {
                    return Err(Error::Usage(format!(
                        "{} holds more than {MAX_FILES} files",
                        dir.display()
                    )));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn name_of(path: &Path) -> Result<String, Error> {
    let canonical =
        fs::canonicalize(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::Usage(format!(
                "{} has no name to give the torrent",
                path.display()
            ))
        })
}

/// Builds the bencoded torrent for `path`.
pub fn create(path: &Path, opts: &Options) -> Result<Vec<u8>, Error> {
    let meta =
        fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let name = name_of(path)?;
    let (layout, lens, multi) = if meta.is_dir() {
        let files = walk(path)?;
        if files.is_empty() {
            return Err(Error::Usage(format!(
                "{} contains no files",
                path.display()
            )));
        }
        let lens: Vec<u64> = files.iter().map(|(_, l)| *l).collect();
        let layout = Layout {
            root: path.to_path_buf(),
            files: files.iter().map(|(p, _)| p.clone()).collect(),
            pad: Vec::new(),
        };
        (layout, lens, true)
    } else {
        let layout = Layout {
            root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            files: vec![PathBuf::from(path.file_name().unwrap_or_default())],
            pad: Vec::new(),
        };
        (layout, vec![meta.len()], false)
    };
    let total: u64 = lens.iter().sum();
    let piece_len = opts.piece_len.unwrap_or_else(|| auto_piece_len(total));
    let geometry = Geometry::new(piece_len, &lens, total.div_ceil(u64::from(piece_len)))
        .map_err(|e| Error::Usage(e.to_string()))?;
    let storage = Storage::open_existing(&layout, &geometry)?;
    let hashes = storage
        .hash_all(match opts.threads {
            0 => crate::engine::cores(),
            n => n,
        })
        .map_err(Error::Storage)?
        .concat();

    let mut info = vec![
        ("name", bencode::bytes(name)),
        ("piece length", bencode::int(i64::from(piece_len))),
        ("pieces", bencode::bytes(hashes)),
    ];
    if multi {
        let files = layout
            .files
            .iter()
            .zip(&lens)
            .map(|(p, &len)| {
                let path = p
                    .components()
                    .map(|c| bencode::bytes(c.as_os_str().as_encoded_bytes().to_vec()))
                    .collect();
                bencode::dict([
                    ("length", bencode::int(len as i64)),
                    ("path", Value::List(path)),
                ])
            })
            .collect();
        info.push(("files", Value::List(files)));
    } else {
        info.push(("length", bencode::int(total as i64)));
    }
    if opts.private {
        info.push(("private", bencode::int(1)));
    }

    let mut top = vec![("info", bencode::dict(info))];
    if let Some(first) = opts.trackers.first() {
        top.push(("announce", bencode::bytes(first.as_bytes().to_vec())));
        let tiers = opts
            .trackers
            .iter()
            .map(|t| Value::List(vec![bencode::bytes(t.as_bytes().to_vec())]))
            .collect();
        top.push(("announce-list", Value::List(tiers)));
    }
    if let Some(c) = &opts.comment {
        top.push(("comment", bencode::bytes(c.as_bytes().to_vec())));
    }
    top.push((
        "created by",
        bencode::bytes(format!("bitfetch {}", env!("CARGO_PKG_VERSION"))),
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    top.push(("creation date", bencode::int(now)));
    Ok(bencode::encode(&bencode::dict(top)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_piece_length_is_bounded() {
        assert_eq!(auto_piece_len(0), 16 << 10);
        assert_eq!(auto_piece_len(1 << 30), 1 << 20);
        assert_eq!(auto_piece_len(u64::MAX / 2), 16 << 20);
    }
}
