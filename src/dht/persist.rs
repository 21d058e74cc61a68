//! The state file: our node id and the nodes worth asking next time, so the id stays the same
//! across runs and a restart does not depend on the public routers.
//!
//! Format: one bencoded dictionary `{id: 20 bytes, nodes: compact IPv4 node infos, nodes6:
//! compact IPv6 node infos}`, at most [`MAX_SAVED`] nodes. Written atomically (a temporary file
//! in the same directory, then a rename), read with a size cap and the bencode pre-scan, like
//! anything else that could have been tampered with.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bt_bencode::Value;

use super::krpc::{self, Contact, NodeId};
use crate::bencode::{self, Limits};

pub(crate) const MAX_SAVED: usize = 300;
/// 300 IPv6 nodes are 11.4 KB; anything much bigger was not written by us.
const MAX_FILE: usize = 64 * 1024;
const LIMITS: Limits = Limits {
    max_size: MAX_FILE,
    max_depth: 2,
    max_tokens: 16,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Saved {
    pub id: NodeId,
    pub nodes: Vec<Contact>,
}

/// Why a state file was ignored.
#[derive(Debug)]
pub(crate) enum LoadError {
    Read { path: PathBuf, source: io::Error },
    Corrupt { path: PathBuf, what: String },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read { path, source } => {
                write!(
                    f,
                    "ignoring the DHT state file {}: {source}",
                    path.display()
                )
            }
            LoadError::Corrupt { path, what } => {
                write!(f, "ignoring the DHT state file {}: {what}", path.display())
            }
        }
    }
}

/// Ok(None) when there is no file (a first run).
pub(crate) fn load(path: &Path) -> Result<Option<Saved>, LoadError> {
    let corrupt = |what: String| LoadError::Corrupt {
        path: path.to_path_buf(),
        what,
    };
    let data = match read_capped(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            return Err(corrupt(format!("larger than {MAX_FILE} bytes")));
        }
        Err(source) => {
            return Err(LoadError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    parse(&data).map(Some).map_err(corrupt)
}

fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE as u64 + 1)
        .read_to_end(&mut data)?;
    if data.len() > MAX_FILE {
        return Err(io::ErrorKind::FileTooLarge.into());
    }
    Ok(data)
}

pub(crate) fn parse(data: &[u8]) -> Result<Saved, String> {
    let Value::Dict(d) = bencode::decode(data, LIMITS).map_err(|e| e.to_string())? else {
        return Err("not a dictionary".into());
    };
    let id: NodeId = bencode::get_bytes(&d, "id")
        .and_then(|b| b.try_into().ok())
        .ok_or("no 20-byte node id")?;
    let mut nodes = Vec::new();
    for (key, v6) in [("nodes", false), ("nodes6", true)] {
        let Some(b) = bencode::get_bytes(&d, key) else {
            continue;
        };
        let size = if v6 { 38 } else { 26 };
        if !b.len().is_multiple_of(size) {
            return Err(format!(
                "{key} has a length that is not a multiple of {size}"
            ));
        }
        for chunk in b.chunks_exact(size).take(MAX_SAVED - nodes.len()) {
            // parse_nodes caps at a message's worth; read the file's entries one by one.
            nodes.extend(krpc::parse_nodes(chunk, v6).map_err(str::to_string)?);
        }
    }
    Ok(Saved { id, nodes })
}

pub(crate) fn to_bytes(saved: &Saved) -> Vec<u8> {
    let nodes = &saved.nodes[..saved.nodes.len().min(MAX_SAVED)];
    bencode::encode(&bencode::dict([
        ("id", bencode::bytes(saved.id.to_vec())),
        ("nodes", bencode::bytes(krpc::compact_nodes(nodes, false))),
        ("nodes6", bencode::bytes(krpc::compact_nodes(nodes, true))),
    ]))
}

/// Writes the file atomically, creating its directory.
pub(crate) fn save(path: &Path, saved: &Saved) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dht.dat".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&to_bytes(saved))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved() -> Saved {
        Saved {
            id: [7; 20],
            nodes: vec![
                Contact {
                    id: [1; 20],
                    addr: "1.2.3.4:6881".parse().unwrap(),
                },
                Contact {
                    id: [2; 20],
                    addr: "[2001:db8::1]:6881".parse().unwrap(),
                },
            ],
        }
    }

    #[test]
    fn round_trips_through_a_file_in_a_new_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dht.dat");
        assert!(load(&path).unwrap().is_none(), "missing is silent");
        save(&path, &saved()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(saved()));
        // Overwriting leaves no temporary file behind.
        save(&path, &saved()).unwrap();
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn corrupt_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dht.dat");
        for bad in [
            &b"garbage"[..],
            b"d2:id3:abce",
            b"d2:id20:aaaaaaaaaaaaaaaaaaaa5:nodes5:abcdee",
            b"llllllllllllllllllllllee",
        ] {
            fs::write(&path, bad).unwrap();
            let msg = load(&path).unwrap_err().to_string();
            assert!(msg.contains("dht.dat"), "{msg}");
        }
        fs::write(&path, vec![b'x'; MAX_FILE + 1]).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("larger"));
        // A directory where the file should be is a read error, not a panic.
        let path = dir.path().to_path_buf();
        assert!(matches!(load(&path), Err(LoadError::Read { .. })));
    }

    #[test]
    fn at_most_max_saved_nodes_are_written_and_read() {
        let mut s = saved();
        s.nodes = (0..400u32)
            .map(|i| Contact {
                id: [1; 20],
                addr: std::net::SocketAddr::new(std::net::Ipv4Addr::from(i + 1).into(), 1),
            })
            .collect();
        let back = parse(&to_bytes(&s)).unwrap();
        assert_eq!(back.nodes.len(), MAX_SAVED);
    }
}
