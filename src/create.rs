//! Making a .torrent from a file or a directory: v1 (the default), v2 or hybrid (BEP 52).

mod v2;

use std::fs;
use std::path::{Path, PathBuf};

use bt_bencode::{ByteString, Value};
use sha1::{Digest as _, Sha1};
use sha2::Sha256;

use crate::bencode::{self, Dict};
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
    pub version: Version,
}

/// Which BitTorrent versions a torrent is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Version {
    /// SHA-1 piece hashes over the files' concatenation (BEP 3).
    #[default]
    V1,
    /// Per-file SHA-256 merkle trees only (BEP 52).
    V2,
    /// Both: the v2 part, and a v1 part whose files are padded to piece boundaries (BEP 47
    /// pad files) so that both describe the same pieces.
    Hybrid,
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

/// What `create` made: the torrent, and what to say about it.
#[derive(Debug, Clone)]
pub struct Created {
    pub torrent: Vec<u8>,
    pub name: String,
    /// The content's size (pad files not counted).
    pub total_len: u64,
    pub piece_count: u64,
    /// SHA-1 of the `info` dictionary's bytes, when the torrent has a v1 part.
    pub info_hash_v1: Option<[u8; 20]>,
    /// SHA-256 of the `info` dictionary's bytes, when the torrent has a v2 part.
    pub info_hash_v2: Option<[u8; 32]>,
}

/// What is being shared: the files, relative to `root`, in the order of the torrent.
struct Content {
    root: PathBuf,
    files: Vec<(PathBuf, u64)>,
    /// A directory (a `files` list, a file tree under the name) rather than one file.
    multi: bool,
    name: String,
}

impl Content {
    fn read(path: &Path) -> Result<Content, Error> {
        let meta =
            fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let name = name_of(path)?;
        if meta.is_dir() {
            let files = walk(path)?;
            if files.is_empty() {
                return Err(Error::Usage(format!(
                    "{} contains no files",
                    path.display()
                )));
            }
            Ok(Content {
                root: path.to_path_buf(),
                files,
                multi: true,
                name,
            })
        } else {
            Ok(Content {
                root: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                files: vec![(
                    PathBuf::from(path.file_name().unwrap_or_default()),
                    meta.len(),
                )],
                multi: false,
                name,
            })
        }
    }

    fn total_len(&self) -> u64 {
        self.files.iter().map(|(_, l)| l).sum()
    }
}

/// A path's elements as bencode strings.
fn path_elements(p: &Path) -> Vec<Vec<u8>> {
    p.components()
        .map(|c| c.as_os_str().as_encoded_bytes().to_vec())
        .collect()
}

fn file_entry(path: Vec<Vec<u8>>, len: u64, pad: bool) -> Value {
    let mut entry = vec![
        ("length", bencode::int(len as i64)),
        (
            "path",
            Value::List(path.into_iter().map(bencode::bytes).collect()),
        ),
    ];
    if pad {
        entry.push(("attr", bencode::bytes(&b"p"[..])));
    }
    bencode::dict(entry)
}

/// Entries of the info dictionary.
type Entries = Vec<(&'static str, Value)>;

/// The version-specific part of a torrent.
struct Part {
    info: Entries,
    /// The top-level `piece layers` of a torrent with a v2 part.
    piece_layers: Option<Value>,
    piece_count: u64,
}

/// Builds the bencoded torrent for `path`.
pub fn create(path: &Path, opts: &Options) -> Result<Vec<u8>, Error> {
    build(path, opts).map(|c| c.torrent)
}

/// Builds the torrent for `path`, and says what it made.
pub fn build(path: &Path, opts: &Options) -> Result<Created, Error> {
    let content = Content::read(path)?;
    let total = content.total_len();
    let piece_len = opts.piece_len.unwrap_or_else(|| auto_piece_len(total));
    let threads = match opts.threads {
        0 => crate::engine::cores(),
        n => n,
    };
    let Part {
        mut info,
        piece_layers,
        piece_count,
    } = match opts.version {
        Version::V1 => v1_part(&content, piece_len, threads)?,
        Version::V2 => v2_part(&content, piece_len, false, threads)?,
        Version::Hybrid => v2_part(&content, piece_len, true, threads)?,
    };
    info.push(("name", bencode::bytes(content.name.clone())));
    info.push(("piece length", bencode::int(i64::from(piece_len))));
    if opts.private {
        info.push(("private", bencode::int(1)));
    }

    let mut top = vec![("info", bencode::dict(info))];
    if let Some(layers) = piece_layers {
        top.push(("piece layers", layers));
    }
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
    let torrent = bencode::encode(&bencode::dict(top));

    // The info hashes over the info dictionary's bytes as written.
    let raw_info = bencode::dict_value_span(&torrent, b"info", bencode::Limits::METAINFO)
        .expect("the torrent just encoded has an info dictionary");
    Ok(Created {
        info_hash_v1: (opts.version != Version::V2).then(|| Sha1::digest(raw_info).into()),
        info_hash_v2: (opts.version != Version::V1).then(|| Sha256::digest(raw_info).into()),
        torrent,
        name: content.name,
        total_len: total,
        piece_count,
    })
}

/// The v1 info entries (`pieces`, and `files` or `length`) over the files' concatenation,
/// and the piece count.
fn v1_part(content: &Content, piece_len: u32, threads: usize) -> Result<Part, Error> {
    let lens: Vec<u64> = content.files.iter().map(|(_, l)| *l).collect();
    let total: u64 = lens.iter().sum();
    let geometry = Geometry::new(piece_len, &lens, total.div_ceil(u64::from(piece_len)))
        .map_err(|e| Error::Usage(e.to_string()))?;
    let layout = Layout {
        root: content.root.clone(),
        files: content.files.iter().map(|(p, _)| p.clone()).collect(),
        pad: Vec::new(),
    };
    let storage = Storage::open_existing(&layout, &geometry)?;
    let hashes = storage.hash_all(threads).map_err(Error::Storage)?.concat();
    let mut info = vec![("pieces", bencode::bytes(hashes))];
    if content.multi {
        let files = content
            .files
            .iter()
            .map(|(p, len)| file_entry(path_elements(p), *len, false))
            .collect();
        info.push(("files", Value::List(files)));
    } else {
        info.push(("length", bencode::int(total as i64)));
    }
    Ok(Part {
        info,
        piece_layers: None,
        piece_count: u64::from(geometry.piece_count()),
    })
}

/// The v2 info entries (`file tree`, `meta version`) and, for a hybrid torrent, the v1 ones
/// with pad files; the `piece layers`; the piece count.
fn v2_part(content: &Content, piece_len: u32, hybrid: bool, threads: usize) -> Result<Part, Error> {
    let lens: Vec<u64> = content.files.iter().map(|(_, l)| *l).collect();
    let (pads, v1) = match (hybrid, content.multi) {
        (false, _) => (vec![0; lens.len()], v2::V1::No),
        (true, true) => (v2::pad_after(&lens, piece_len), v2::V1::Padded),
        (true, false) => (vec![0], v2::V1::Unpadded),
    };
    // The files aligned to pieces, as the v1 part of a hybrid torrent lays them out with its
    // pads: the limits of a v1 torrent apply, and its piece count is the v2 one (every v2
    // piece lies in one file).
    let padded: Vec<u64> = lens
        .iter()
        .zip(v2::pad_after(&lens, piece_len))
        .flat_map(|(&l, p)| [l, p])
        .collect();
    let padded_total = padded.iter().try_fold(0u64, |a, &l| a.checked_add(l));
    let padded_total =
        padded_total.ok_or_else(|| Error::Usage("the content is too large".into()))?;
    if padded_total == 0 {
        return Err(Error::Usage(format!(
            "{} holds no data (every file is empty)",
            if content.multi {
                content.root.clone()
            } else {
                content.root.join(&content.files[0].0)
            }
            .display()
        )));
    }
    let geometry = Geometry::new(
        piece_len,
        &padded,
        padded_total.div_ceil(u64::from(piece_len)),
    )
    .map_err(|e| Error::Usage(e.to_string()))?;

    let hashed = v2::hash_files(&content.root, &content.files, piece_len, v1, threads)?;

    let mut tree = Dict::new();
    let mut layers = Dict::new();
    for ((path, len), h) in content.files.iter().zip(&hashed.files) {
        let mut leaf = vec![("length", bencode::int(*len as i64))];
        if let Some(root) = h.root {
            leaf.push(("pieces root", bencode::bytes(root.to_vec())));
            if !h.layer.is_empty() {
                layers.insert(
                    ByteString::from(root.to_vec()),
                    bencode::bytes(h.layer.concat()),
                );
            }
        }
        let elements = if content.multi {
            path_elements(path)
        } else {
            vec![content.name.as_bytes().to_vec()]
        };
        insert_file(&mut tree, &elements, bencode::dict(leaf));
    }
    let mut info = vec![
        ("file tree", Value::Dict(tree)),
        ("meta version", bencode::int(2)),
    ];
    if hybrid {
        info.push(("pieces", bencode::bytes(hashed.v1_pieces)));
        if content.multi {
            let mut files = Vec::with_capacity(content.files.len() * 2);
            for ((path, len), &pad) in content.files.iter().zip(&pads) {
                files.push(file_entry(path_elements(path), *len, false));
                if pad > 0 {
                    let pad_path = vec![b".pad".to_vec(), pad.to_string().into_bytes()];
                    files.push(file_entry(pad_path, pad, true));
                }
            }
            info.push(("files", Value::List(files)));
        } else {
            info.push(("length", bencode::int(lens[0] as i64)));
        }
    }
    Ok(Part {
        info,
        piece_layers: Some(Value::Dict(layers)),
        piece_count: u64::from(geometry.piece_count()),
    })
}

/// Puts a file's `{"": leaf}` into a file tree at `path` (BEP 52: nested dictionaries keyed
/// by path element, sorted bytewise as every bencode dictionary is).
fn insert_file(tree: &mut Dict, path: &[Vec<u8>], leaf: Value) {
    let Some((last, dirs)) = path.split_last() else {
        return;
    };
    let mut node = tree;
    for dir in dirs {
        let entry = node
            .entry(ByteString::from(dir.clone()))
            .or_insert_with(|| Value::Dict(Dict::new()));
        node = match entry {
            Value::Dict(d) => d,
            // walk() lists files only, so no path element is both a file and a directory.
            _ => unreachable!("a file tree directory is a dictionary"),
        };
    }
    let mut file = Dict::new();
    file.insert(ByteString::from(Vec::new()), leaf);
    node.insert(ByteString::from(last.clone()), Value::Dict(file));
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

    /// The paths of a file tree, depth first, in its (bytewise sorted) key order.
    fn tree_order(tree: &Dict, prefix: &Path, out: &mut Vec<PathBuf>) {
        for (k, v) in tree {
            match v {
                _ if k.is_empty() => out.push(prefix.to_path_buf()),
                Value::Dict(d) => tree_order(d, &prefix.join(std::str::from_utf8(k).unwrap()), out),
                _ => panic!("a directory that is not a dictionary"),
            }
        }
    }

    #[test]
    fn the_walk_lists_files_in_file_tree_order() {
        // A plain sort of the path strings would put `a-x` and `a.b` before `a/x` ('-' and
        // '.' are below '/'); a file tree sorts `a` (the directory) first.
        let dir = tempfile::tempdir().unwrap();
        for p in ["a/x", "a-x", "a.b", "B", "a/y/z", "ab", "a0"] {
            let p = dir.path().join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, b"x").unwrap();
        }
        let walked: Vec<PathBuf> = walk(dir.path())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let mut tree = Dict::new();
        for p in &walked {
            insert_file(&mut tree, &path_elements(p), bencode::int(0));
        }
        let mut in_tree = Vec::new();
        tree_order(&tree, Path::new(""), &mut in_tree);
        assert_eq!(walked, in_tree);
        let names: Vec<&str> = walked.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(names, ["B", "a/x", "a/y/z", "a-x", "a.b", "a0", "ab"]);
    }
}
