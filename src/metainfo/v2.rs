//! The BEP 52 part of a torrent: the `file tree`, each file's merkle root, the `piece layers`,
//! and checking a piece against them.
//!
//! v2 files are aligned to pieces: each starts a new piece. bitfetch keeps one byte space for
//! every torrent (the geometry), so a v2-only torrent gets virtual pad files between its files,
//! just as a hybrid torrent carries real ones in its v1 part; pieces then never span files.

use std::path::PathBuf;

use bt_bencode::Value;

use super::{Error, FileEntry, MAX_FILES, MAX_PATH_DEPTH, clean_path, collision_check};
use crate::bencode::{self, Dict};
use crate::geometry::{Geometry, PieceIndex};
use crate::merkle::{self, Hash};
use crate::path_safety;

/// The v2 side of a torrent (v2-only or hybrid).
#[derive(Debug, Clone)]
pub struct V2 {
    /// SHA-256 of the info dictionary.
    pub info_hash: [u8; 32],
    /// The files with data, in torrent order (empty files have no tree).
    pub files: Vec<V2File>,
    piece_len: u32,
}

#[derive(Debug, Clone)]
pub struct V2File {
    /// Index into `Metainfo::files` and the geometry.
    pub file: usize,
    pub len: u64,
    /// The file's `pieces root`.
    pub root: Hash,
    /// The torrent piece this file starts.
    pub first_piece: u32,
    /// The piece layer: one hash per piece of the file. Empty for a file no larger than a
    /// piece (its root is its only piece hash), and for a larger one until it is known (an
    /// info dictionary from a magnet link carries no layers).
    pub layer: Vec<Hash>,
}

impl V2File {
    /// How many pieces the file spans.
    pub fn piece_count(&self, piece_len: u32) -> u32 {
        self.len.div_ceil(u64::from(piece_len)) as u32
    }

    /// Whether the file needs a piece layer (it is larger than one piece).
    pub fn needs_layer(&self, piece_len: u32) -> bool {
        self.len > u64::from(piece_len)
    }
}

/// What a piece check against the v2 hashes found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Good,
    Bad,
    /// The piece's layer is not known (yet).
    Unknown,
}

impl V2 {
    pub fn leaves_per_piece(&self) -> u32 {
        self.piece_len / merkle::LEAF_LEN as u32
    }

    pub fn piece_len(&self) -> u32 {
        self.piece_len
    }

    pub fn file_by_root(&self, root: &Hash) -> Option<&V2File> {
        self.files.iter().find(|f| f.root == *root)
    }

    /// The file holding `piece`, and the piece's index within it.
    pub fn file_of(&self, piece: PieceIndex) -> Option<(&V2File, u32)> {
        let p = piece.get();
        let i = self.files.partition_point(|f| f.first_piece <= p);
        let f = self.files.get(i.checked_sub(1)?)?;
        let k = p - f.first_piece;
        (k < f.piece_count(self.piece_len)).then_some((f, k))
    }

    /// Whether every file larger than a piece has its layer.
    pub fn layers_complete(&self) -> bool {
        self.files
            .iter()
            .all(|f| !f.needs_layer(self.piece_len) || !f.layer.is_empty())
    }

    /// Checks `data`, the whole of `piece` as the geometry has it (a virtual pad's zeros
    /// included), against the file's merkle tree.
    pub fn check(&self, piece: PieceIndex, data: &[u8]) -> Check {
        let Some((f, k)) = self.file_of(piece) else {
            return Check::Bad;
        };
        let start = u64::from(k) * u64::from(self.piece_len);
        let part = (f.len - start).min(u64::from(self.piece_len)) as usize;
        let Some(bytes) = data.get(..part) else {
            return Check::Bad;
        };
        let good = if f.needs_layer(self.piece_len) {
            let Some(want) = f.layer.get(k as usize) else {
                return Check::Unknown;
            };
            merkle::piece_root(bytes, self.leaves_per_piece() as usize) == *want
        } else {
            merkle::small_file_root(bytes) == f.root
        };
        if good { Check::Good } else { Check::Bad }
    }

    /// Takes each file's layer from the torrent's `piece layers`, checked against its root.
    pub fn set_layers(&mut self, layers: &Dict) -> Result<(), Error> {
        let piece_len = self.piece_len;
        let lpp = self.leaves_per_piece() as usize;
        for f in self.files.iter_mut() {
            if !f.needs_layer(piece_len) {
                continue;
            }
            let Some(v) = layers.get(&f.root[..]) else {
                return Err(Error::V2(format!(
                    "no piece layer for file {} (larger than a piece)",
                    f.file
                )));
            };
            let Value::ByteStr(bytes) = v else {
                return Err(Error::WrongType("piece layers"));
            };
            let want = f.piece_count(piece_len) as usize;
            let layer = merkle::split(bytes)
                .filter(|l| l.len() == want)
                .ok_or_else(|| {
                    Error::V2(format!(
                        "the piece layer of file {} is {} bytes, not {} (32 per piece)",
                        f.file,
                        bytes.len(),
                        want * 32
                    ))
                })?;
            if merkle::root_from_layer(&layer, lpp) != f.root {
                return Err(Error::V2(format!(
                    "the piece layer of file {} does not match its pieces root",
                    f.file
                )));
            }
            f.layer = layer;
        }
        Ok(())
    }

    /// Sets the layer of the file with `root`, if `layer` is its piece layer: what peers send
    /// for a magnet link. False when it does not fit.
    pub fn offer_layer(&mut self, root: &Hash, layer: Vec<Hash>) -> bool {
        let piece_len = self.piece_len;
        let lpp = self.leaves_per_piece() as usize;
        let Some(f) = self.files.iter_mut().find(|f| f.root == *root) else {
            return false;
        };
        if !f.needs_layer(piece_len)
            || layer.len() != f.piece_count(piece_len) as usize
            || merkle::root_from_layer(&layer, lpp) != f.root
        {
            return false;
        }
        f.layer = layer;
        true
    }
}

/// One file of the `file tree`, in tree order.
#[derive(Debug)]
pub struct TreeFile {
    /// Path elements as the torrent spells them.
    pub raw_path: Vec<Vec<u8>>,
    pub len: u64,
    pub root: Option<Hash>,
    pub attr: Vec<u8>,
    pub symlink: Option<Vec<Vec<u8>>>,
}

/// A v2 piece length: a power of two of at least 16 KiB.
pub fn check_piece_len(piece_len: u32) -> Result<(), Error> {
    if piece_len.is_power_of_two() && piece_len as usize >= merkle::LEAF_LEN {
        Ok(())
    } else {
        Err(Error::V2(format!(
            "piece length {piece_len} is not a power of two of at least 16 KiB"
        )))
    }
}

/// Walks the `file tree` depth first, keys in order (as bencode sorts them), with the same
/// limits as a v1 file list. Recursion is bounded by the bencode depth limit.
pub fn parse_file_tree(tree: &Dict) -> Result<Vec<TreeFile>, Error> {
    fn walk(dir: &Dict, path: &[Vec<u8>], out: &mut Vec<TreeFile>) -> Result<(), Error> {
        for (key, value) in dir.iter() {
            let Value::Dict(node) = value else {
                return Err(Error::WrongType("file tree"));
            };
            if key.is_empty() {
                return Err(Error::V2("a file tree entry has an empty name".into()));
            }
            let mut child = path.to_vec();
            child.push(key.to_vec());
            if child.len() > MAX_PATH_DEPTH {
                return Err(Error::PathTooDeep {
                    file: out.len(),
                    depth: child.len(),
                });
            }
            match node.get(&b""[..]) {
                Some(Value::Dict(file)) if node.len() == 1 => {
                    let n = out.len();
                    out.push(tree_file(file, child, n)?);
                    if out.len() > MAX_FILES {
                        return Err(Error::TooManyFiles(out.len()));
                    }
                }
                Some(Value::Dict(_)) => {
                    return Err(Error::V2(format!(
                        "file tree entry {} is both a file and a directory",
                        path_safety::escape(&String::from_utf8_lossy(key))
                    )));
                }
                Some(_) => return Err(Error::WrongType("file tree")),
                None => walk(node, &child, out)?,
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(tree, &[], &mut out)?;
    if out.is_empty() {
        return Err(Error::NoFiles);
    }
    Ok(out)
}

fn tree_file(file: &Dict, raw_path: Vec<Vec<u8>>, index: usize) -> Result<TreeFile, Error> {
    let len = super::parse_len(file, index)?;
    let root = match bencode::get(file, "pieces root") {
        None => None,
        Some(Value::ByteStr(b)) => Some(<Hash>::try_from(b.as_slice()).map_err(|_| {
            Error::V2(format!(
                "file {index} has a pieces root of {} bytes, not 32",
                b.len()
            ))
        })?),
        Some(_) => return Err(Error::WrongType("pieces root")),
    };
    if len > 0 && root.is_none() {
        return Err(Error::V2(format!("file {index} has no pieces root")));
    }
    let attr = bencode::get_bytes(file, "attr").unwrap_or_default();
    let symlink = match bencode::get_list(file, "symlink path") {
        _ if !attr.contains(&b'l') => None,
        None => return Err(Error::Missing("symlink path")),
        Some(elements) => Some(
            elements
                .iter()
                .map(|e| e.as_byte_str().map(|b| b.to_vec()))
                .collect::<Option<Vec<_>>>()
                .ok_or(Error::WrongType("symlink path"))?,
        ),
    };
    Ok(TreeFile {
        raw_path,
        len,
        root: root.filter(|_| len > 0),
        attr: attr.to_vec(),
        symlink,
    })
}

/// The files of a v2-only torrent as bitfetch lays them out: each tree file, followed by a
/// virtual pad up to the next piece boundary (as libtorrent does, the last one and a single
/// file's included). `single` is a tree of
/// one file at its top, stored as the file `name` itself.
pub fn layout(
    tree: &[TreeFile],
    name: &str,
    piece_len: u32,
) -> Result<(bool, Vec<FileEntry>), Error> {
    let single = tree.len() == 1 && tree[0].raw_path.len() == 1;
    let mut files = Vec::with_capacity(tree.len() * 2);
    let mut clean_paths = Vec::with_capacity(tree.len());
    for (i, t) in tree.iter().enumerate() {
        let (path, raw_path) = if single {
            (PathBuf::from(name), Vec::new())
        } else {
            let (clean, path) = clean_path(name, &t.raw_path, i)?;
            clean_paths.push(clean);
            (path, t.raw_path.clone())
        };
        let mut entry = FileEntry::plain(path, t.len, raw_path);
        entry.set_attr(&t.attr);
        entry.pad = false; // a v2 file with data is never a pad (pads are ours, below)
        entry.symlink = t.symlink.clone();
        files.push(entry);
        let tail = t.len % u64::from(piece_len);
        // The last file too: libtorrent (so most of the swarm) counts a v2 torrent's last
        // piece as whole, and asks for its blocks so; without this pad those requests would
        // fall past our end and be refused.
        if tail != 0 {
            let pad_len = u64::from(piece_len) - tail;
            let mut pad = FileEntry::plain(
                PathBuf::from(name).join(".pad").join(pad_len.to_string()),
                pad_len,
                vec![b".pad".to_vec(), pad_len.to_string().into_bytes()],
            );
            pad.pad = true;
            files.push(pad);
        }
    }
    collision_check(&clean_paths)?;
    Ok((!single, files))
}

/// The v2 view of `files` (the torrent's files, pads included) given the tree: each tree file
/// must be the next non-pad file, start a piece, and have the same length and path.
pub fn build(
    info_hash: [u8; 32],
    tree: &[TreeFile],
    files: &[FileEntry],
    geometry: &Geometry,
) -> Result<V2, Error> {
    let piece_len = geometry.nominal_piece_len();
    let real: Vec<usize> = (0..files.len()).filter(|&i| !files[i].pad).collect();
    if real.len() != tree.len() {
        return Err(Error::V2(format!(
            "the v1 file list has {} files but the v2 file tree {}",
            real.len(),
            tree.len()
        )));
    }
    let mut out = Vec::new();
    for (t, &i) in tree.iter().zip(&real) {
        let f = &files[i];
        let single_ok = f.raw_path.is_empty() && t.raw_path.len() == 1;
        if f.len != t.len || (f.raw_path != t.raw_path && !single_ok) {
            return Err(Error::V2(format!(
                "file {i} differs between the v1 file list and the v2 file tree"
            )));
        }
        let Some(root) = t.root else { continue };
        let start = geometry.file_start(i);
        if !start.is_multiple_of(u64::from(piece_len)) {
            return Err(Error::V2(format!(
                "file {i} does not start on a piece boundary"
            )));
        }
        out.push(V2File {
            file: i,
            len: t.len,
            root,
            first_piece: (start / u64::from(piece_len)) as u32,
            layer: Vec::new(),
        });
    }
    Ok(V2 {
        info_hash,
        files: out,
        piece_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tf(path: &[&str], len: u64) -> TreeFile {
        TreeFile {
            raw_path: path.iter().map(|p| p.as_bytes().to_vec()).collect(),
            len,
            root: (len > 0).then_some([len as u8; 32]),
            attr: Vec::new(),
            symlink: None,
        }
    }

    #[test]
    fn v2_files_get_virtual_pads_up_to_the_next_piece() {
        let tree = [
            tf(&["a"], 5),
            tf(&["b"], 0),
            tf(&["c"], 32768),
            tf(&["d"], 3),
        ];
        let (multi, files) = layout(&tree, "t", 16384).unwrap();
        assert!(multi);
        let lens: Vec<(u64, bool)> = files.iter().map(|f| (f.len, f.pad)).collect();
        assert_eq!(
            lens,
            [
                (5, false),
                (16379, true),
                (0, false),
                (32768, false),
                (3, false),
                (16381, true)
            ]
        );
        let g = Geometry::new(16384, &files.iter().map(|f| f.len).collect::<Vec<_>>(), 4).unwrap();
        assert_eq!(
            g.piece_len(g.piece(3).unwrap()),
            16384,
            "the last piece is whole"
        );
        let v2 = build([0; 32], &tree, &files, &g).unwrap();
        assert_eq!(
            v2.files.iter().map(|f| f.first_piece).collect::<Vec<_>>(),
            [0, 1, 3]
        );
        let (f, k) = v2.file_of(g.piece(2).unwrap()).unwrap();
        assert_eq!((f.file, k), (3, 1));
        assert_eq!(v2.file_of(g.piece(3).unwrap()).unwrap().0.file, 4);
    }

    #[test]
    fn a_file_tree_is_walked_in_key_order() {
        let doc = b"d1:ad1:bd0:d6:lengthi1e11:pieces root32:xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxee1:cd0:d6:lengthi2e11:pieces root32:yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyeee1:bd0:d6:lengthi0eeee";
        let Value::Dict(tree) =
            crate::bencode::decode(doc, crate::bencode::Limits::METAINFO).unwrap()
        else {
            panic!()
        };
        let files = parse_file_tree(&tree).unwrap();
        let paths: Vec<String> = files
            .iter()
            .map(|f| {
                f.raw_path
                    .iter()
                    .map(|e| String::from_utf8_lossy(e).into_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .collect();
        assert_eq!(paths, ["a/b", "a/c", "b"]);
        assert!(files[2].root.is_none());
    }

    #[test]
    fn bad_trees_are_refused() {
        let cases: [(&[u8], &str); 4] = [
            (b"d1:ad0:d6:lengthi1eeee", "no pieces root"),
            (b"d1:ad0:d6:lengthi1e11:pieces root3:abceee", "not 32"),
            (b"d1:ai1ee", "wrong type"),
            (
                b"d1:ad0:d6:lengthi0ee1:bd0:d6:lengthi0eeeee",
                "both a file and a directory",
            ),
        ];
        for (doc, want) in cases {
            let Value::Dict(tree) =
                crate::bencode::decode(doc, crate::bencode::Limits::METAINFO).unwrap()
            else {
                panic!()
            };
            let err = parse_file_tree(&tree).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(doc)
            );
        }
    }
}
