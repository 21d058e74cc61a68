//! BitTorrent v2 (BEP 52) and BEP 47 pad files, written by the tests themselves (never
//! bitfetch's own code): SHA-256 merkle trees over 16 KiB blocks, `file tree` and `piece
//! layers`, v2-only and hybrid info dictionaries built in memory (for hostile variants), a reader
//! of the v2 parts of a .torrent, and [`LtPayload`]: files on disk with a torrent made from them
//! by libtorrent (`lt.create_torrent`, hybrid by default, or v2-only or v1-only) and what
//! libtorrent reads in it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::bencode::{B, Value, bytes, dict, int, list};
use super::clients::libtorrent_create;
use super::files::{files_equal, pseudo_random, scratch_dir, walk, write_file};
use super::{Diagnose, hex, report};

/// BEP 52 leaves: 16 KiB blocks.
pub const LEAF: usize = 16 * 1024;

pub type Hash = [u8; 32];

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

fn parent(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of a layer whose length is a power of two.
fn reduce(mut layer: Vec<Hash>) -> Hash {
    assert!(
        layer.len().is_power_of_two(),
        "a layer of {} nodes",
        layer.len()
    );
    while layer.len() > 1 {
        layer = layer.chunks(2).map(|p| parent(&p[0], &p[1])).collect();
    }
    layer[0]
}

/// The root of a subtree of `leaves` (a power of two) zero leaves.
fn zero_subtree(leaves: usize) -> Hash {
    reduce(vec![[0; 32]; leaves])
}

/// A file's v2 hashes: its `pieces root`, and its piece layer (empty for a file no larger
/// than a piece: BEP 52 has no layer for those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHashes {
    pub root: Hash,
    pub layer: Vec<Hash>,
}

impl FileHashes {
    /// The `piece layers` value: the layer's hashes concatenated.
    pub fn layer_bytes(&self) -> Vec<u8> {
        self.layer.concat()
    }
}

/// The merkle tree of one file (BEP 52): SHA-256 leaves of 16 KiB blocks (the last one
/// shorter), zero leaves up to a power of two. `None` for an empty file (no root).
pub fn file_hashes(data: &[u8], piece_len: usize) -> Option<FileHashes> {
    assert!(
        piece_len.is_power_of_two() && piece_len >= LEAF,
        "piece length {piece_len}"
    );
    if data.is_empty() {
        return None;
    }
    let leaves: Vec<Hash> = data.chunks(LEAF).map(sha256).collect();
    if data.len() <= piece_len {
        let mut padded = leaves;
        padded.resize(padded.len().next_power_of_two(), [0; 32]);
        return Some(FileHashes {
            root: reduce(padded),
            layer: Vec::new(),
        });
    }
    let per_piece = piece_len / LEAF;
    let layer: Vec<Hash> = leaves
        .chunks(per_piece)
        .map(|chunk| {
            let mut padded = chunk.to_vec();
            padded.resize(per_piece, [0; 32]);
            reduce(padded)
        })
        .collect();
    let mut padded = layer.clone();
    padded.resize(layer.len().next_power_of_two(), zero_subtree(per_piece));
    Some(FileHashes {
        root: reduce(padded),
        layer,
    })
}

// =============================================================================================
// Building v2 and hybrid torrents in memory
// =============================================================================================

/// One file of a torrent built in memory: its path inside the torrent and its bytes.
#[derive(Debug, Clone)]
pub struct V2File {
    pub path: Vec<String>,
    pub data: Vec<u8>,
}

impl V2File {
    /// `rel` split at `/`, with `size` pseudo-random bytes.
    pub fn new(rel: &str, size: usize, seed: u64) -> V2File {
        V2File {
            path: rel.split('/').map(str::to_owned).collect(),
            data: pseudo_random(size, seed),
        }
    }

    pub fn rel(&self) -> String {
        self.path.join("/")
    }
}

/// A v2-only or hybrid torrent built in memory, in parts a hostile test can edit before
/// [`Built::encode`]: `info` (an editable map of the info dictionary), `layers` (the `piece
/// layers` entries) and `top` (other top-level keys).
#[derive(Debug, Clone)]
pub struct Built {
    pub name: String,
    pub piece_len: usize,
    /// In file tree order (sorted by path bytes, as BEP 52 dictionaries are).
    pub files: Vec<V2File>,
    pub info: BTreeMap<String, B>,
    pub layers: Vec<(Vec<u8>, Vec<u8>)>,
    pub top: BTreeMap<String, B>,
}

/// How a hybrid torrent pads: after every file but the last (BEP 47's minimum), or after the
/// last too (what libtorrent 2.0.8 writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadLast {
    No,
    Yes,
}

impl Built {
    /// A v2-only torrent named `name` (a directory holding `files`) of `piece_len` pieces.
    pub fn v2(name: &str, files: Vec<V2File>, piece_len: usize) -> Built {
        let mut files = files;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let hashes: Vec<Option<FileHashes>> = files
            .iter()
            .map(|f| file_hashes(&f.data, piece_len))
            .collect();
        let mut info = BTreeMap::new();
        info.insert("file tree".into(), file_tree(&files, &hashes));
        info.insert("meta version".into(), int(2));
        info.insert("name".into(), bytes(name));
        info.insert("piece length".into(), int(piece_len as i64));
        let layers = hashes
            .iter()
            .flatten()
            .filter(|h| !h.layer.is_empty())
            .map(|h| (h.root.to_vec(), h.layer_bytes()))
            .collect();
        Built {
            name: name.to_owned(),
            piece_len,
            files,
            info,
            layers,
            top: BTreeMap::new(),
        }
    }

    /// A hybrid torrent: [`Built::v2`] plus the v1 `files` (with BEP 47 pad files, attr `p`,
    /// path `.pad/N`) and `pieces` over the same piece space.
    pub fn hybrid(name: &str, files: Vec<V2File>, piece_len: usize, pad_last: PadLast) -> Built {
        let mut built = Built::v2(name, files, piece_len);
        let (v1_files, space) = v1_layout(&built.files, piece_len, pad_last);
        built.info.insert("files".into(), B::List(v1_files));
        let pieces: Vec<u8> = space
            .chunks(piece_len)
            .flat_map(|p| <[u8; 20]>::from(Sha1::digest(p)))
            .collect();
        built.info.insert("pieces".into(), B::Bytes(pieces));
        built
    }

    pub fn info_dict(&self) -> B {
        dict(self.info.clone())
    }

    /// The info dictionary's bytes.
    pub fn info_bytes(&self) -> Vec<u8> {
        self.info_dict().encode()
    }

    /// SHA-256 of the info dictionary.
    pub fn info_hash_v2(&self) -> Hash {
        sha256(&self.info_bytes())
    }

    /// SHA-1 of the info dictionary (the v1 swarm's hash, for a hybrid torrent).
    pub fn info_hash_v1(&self) -> [u8; 20] {
        Sha1::digest(self.info_bytes()).into()
    }

    /// The whole .torrent: `info`, `piece layers` (when there is any layer, or when a test
    /// left an empty list on purpose) and the other top-level keys.
    pub fn encode(&self) -> Vec<u8> {
        let mut top: BTreeMap<String, B> = self.top.clone();
        top.insert("info".into(), self.info_dict());
        if !self.layers.is_empty() {
            top.insert(
                "piece layers".into(),
                dict(
                    self.layers
                        .iter()
                        .map(|(k, v)| (k.clone(), B::Bytes(v.clone()))),
                ),
            );
        }
        dict(top).encode()
    }

    /// The bytes of the piece space: every non-empty file padded with zeros to a piece
    /// boundary (the last one too).
    pub fn piece_space(&self) -> Vec<u8> {
        v1_layout(&self.files, self.piece_len, PadLast::Yes).1
    }

    /// The hashes of the file at `rel`.
    pub fn hashes_of(&self, rel: &str) -> FileHashes {
        let file = self
            .files
            .iter()
            .find(|f| f.rel() == rel)
            .unwrap_or_else(|| panic!("no file {rel}"));
        file_hashes(&file.data, self.piece_len).expect("a non-empty file")
    }

    /// Writes the files under `dir`/NAME.
    pub fn write_files(&self, dir: &Path) {
        for f in &self.files {
            write_file(&dir.join(&self.name).join(f.rel()), &f.data);
        }
    }
}

/// `file tree`: nested dictionaries of path elements, each file a dictionary under the key
/// "" with `length` and (for a non-empty file) `pieces root`.
fn file_tree(files: &[V2File], hashes: &[Option<FileHashes>]) -> B {
    #[derive(Default)]
    struct Dir(BTreeMap<Vec<u8>, Node>);
    enum Node {
        File(B),
        Dir(Dir),
    }
    fn into_b(dir: Dir) -> B {
        B::Dict(
            dir.0
                .into_iter()
                .map(|(k, node)| {
                    let v = match node {
                        Node::File(leaf) => leaf,
                        Node::Dir(d) => into_b(d),
                    };
                    (k, v)
                })
                .collect(),
        )
    }
    let mut root = Dir::default();
    for (file, hash) in files.iter().zip(hashes) {
        let mut at = &mut root;
        let (last, dirs) = file.path.split_last().expect("a path");
        for element in dirs {
            let node =
                at.0.entry(element.as_bytes().to_vec())
                    .or_insert_with(|| Node::Dir(Dir::default()));
            at = match node {
                Node::Dir(d) => d,
                Node::File(_) => panic!("{} is both a file and a directory", file.rel()),
            };
        }
        let mut leaf = vec![("length", int(file.data.len() as i64))];
        if let Some(h) = hash {
            leaf.push(("pieces root", bytes(h.root)));
        }
        at.0.insert(
            last.as_bytes().to_vec(),
            Node::File(dict([("", dict(leaf))])),
        );
    }
    into_b(root)
}

/// The v1 file list of a hybrid torrent (pad files between files) and its piece space.
fn v1_layout(files: &[V2File], piece_len: usize, pad_last: PadLast) -> (Vec<B>, Vec<u8>) {
    let last_nonempty = files.iter().rposition(|f| !f.data.is_empty());
    let mut out = Vec::new();
    let mut space = Vec::new();
    for (i, f) in files.iter().enumerate() {
        out.push(dict([
            ("length", int(f.data.len() as i64)),
            ("path", list(f.path.iter().map(bytes))),
        ]));
        space.extend_from_slice(&f.data);
        let pad = (piece_len - f.data.len() % piece_len) % piece_len;
        let is_last = Some(i) == last_nonempty;
        if pad > 0 && (!is_last || pad_last == PadLast::Yes) {
            out.push(pad_file(pad));
            space.resize(space.len() + pad, 0);
        }
    }
    (out, space)
}

/// A BEP 47 pad file of `len` bytes as libtorrent writes it.
pub fn pad_file(len: usize) -> B {
    dict([
        ("attr", bytes("p")),
        ("length", int(len as i64)),
        ("path", list([bytes(".pad"), bytes(len.to_string())])),
    ])
}

// =============================================================================================
// Reading the v2 parts of a .torrent
// =============================================================================================

/// What the tests' own reader finds in a v2 or hybrid .torrent.
#[derive(Debug, Clone)]
pub struct V2Map {
    pub info_bytes: Vec<u8>,
    pub meta_version: Option<i64>,
    pub piece_len: u64,
    /// (path inside the torrent, length, pieces root) in file tree order.
    pub files: Vec<(String, u64, Option<Vec<u8>>)>,
    /// `piece layers`: root → layer bytes.
    pub layers: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl V2Map {
    pub fn read(torrent: &Path) -> V2Map {
        let raw = fs::read(torrent).unwrap_or_else(|e| panic!("read {}: {e}", torrent.display()));
        let top = Value::decode(&raw).expect("bencoded");
        let (info, span) = top.entry("info").expect("an info dictionary");
        let mut files = Vec::new();
        fn walk_tree(node: &Value, prefix: &str, out: &mut Vec<(String, u64, Option<Vec<u8>>)>) {
            let Value::Dict(entries) = node else {
                panic!("a file tree node that is not a dictionary")
            };
            for (key, value, _) in entries {
                if key.is_empty() {
                    let len = value.get("length").and_then(Value::int).expect("length") as u64;
                    let root = value
                        .get("pieces root")
                        .and_then(Value::bytes)
                        .map(<[u8]>::to_vec);
                    out.push((prefix.to_owned(), len, root));
                } else {
                    let name = String::from_utf8_lossy(key);
                    let path = if prefix.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{prefix}/{name}")
                    };
                    walk_tree(value, &path, out);
                }
            }
        }
        walk_tree(info.get("file tree").expect("a file tree"), "", &mut files);
        let layers = match top.get("piece layers") {
            Some(Value::Dict(entries)) => entries
                .iter()
                .map(|(k, v, _)| (k.clone(), v.bytes().expect("a layer string").to_vec()))
                .collect(),
            _ => BTreeMap::new(),
        };
        V2Map {
            info_bytes: raw[span].to_vec(),
            meta_version: info.get("meta version").and_then(Value::int),
            piece_len: info
                .get("piece length")
                .and_then(Value::int)
                .expect("piece length") as u64,
            files,
            layers,
        }
    }

    pub fn info_hash_v2(&self) -> Hash {
        sha256(&self.info_bytes)
    }
}

/// Converts a decoded value back into a writable one (keys and order as read).
pub fn to_b(value: &Value) -> B {
    match value {
        Value::Int(i) => B::Int(*i),
        Value::Bytes(b) => B::Bytes(b.clone()),
        Value::List(items) => B::List(items.iter().map(to_b).collect()),
        Value::Dict(entries) => B::Dict(
            entries
                .iter()
                .map(|(k, v, _)| (k.clone(), to_b(v)))
                .collect(),
        ),
    }
}

// =============================================================================================
// Files on disk and a torrent libtorrent made of them
// =============================================================================================

/// The kinds of torrent libtorrent makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    V1,
    V2,
    Hybrid,
}

impl Kind {
    /// The `--kind` of `libtorrent_client.py create`, and what `bitfetch info` calls it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::V1 => "v1",
            Kind::V2 => "v2",
            Kind::Hybrid => "hybrid",
        }
    }
}

/// Pseudo-random files under `DIR/source/NAME` and `DIR/NAME.torrent` made of them by
/// libtorrent, with what libtorrent reads in it (hashes, files with pad files, piece count).
pub struct LtPayload {
    pub dir: TempDir,
    pub kind: Kind,
    pub name: String,
    pub piece_len: usize,
    /// (path inside the torrent, bytes) of the real files, in the order given.
    pub files: Vec<(String, Vec<u8>)>,
    pub torrent: PathBuf,
    /// libtorrent's `inspect` reading of the torrent.
    pub lt: Json,
    /// The v1 info hash (hex), for v1 and hybrid torrents.
    pub v1_hex: Option<String>,
    /// The v2 info hash (64 hex digits), for v2 and hybrid torrents.
    pub v2_hex: Option<String>,
}

impl LtPayload {
    /// A directory NAME holding `tree` (relative path, size), pieces of `piece_len`, made
    /// into a torrent of `kind` by libtorrent (no tracker).
    pub fn new(
        kind: Kind,
        name: &str,
        tree: &[(&str, usize)],
        piece_len: usize,
        seed: u64,
    ) -> LtPayload {
        let dir = scratch_dir();
        let root = dir.path().join("source").join(name);
        let files: Vec<(String, Vec<u8>)> = tree
            .iter()
            .enumerate()
            .map(|(i, (rel, size))| {
                let data = pseudo_random(*size, seed.wrapping_mul(1000) + i as u64);
                write_file(&root.join(rel), &data);
                ((*rel).to_owned(), data)
            })
            .collect();
        let torrent = dir.path().join(format!("{name}.torrent"));
        let lt = libtorrent_create(&root, &torrent, piece_len, kind.name());
        let hash = |key: &str| lt[key].as_str().map(str::to_owned);
        let payload = LtPayload {
            kind,
            name: name.to_owned(),
            piece_len,
            files,
            torrent,
            v1_hex: hash("info_hash"),
            v2_hex: hash("info_hash_v2"),
            lt,
            dir,
        };
        assert_eq!(
            payload.v1_hex.is_some(),
            kind != Kind::V2,
            "libtorrent's v1 hash of a {kind:?} torrent: {}",
            payload.lt
        );
        assert_eq!(
            payload.v2_hex.is_some(),
            kind != Kind::V1,
            "libtorrent's v2 hash of a {kind:?} torrent: {}",
            payload.lt
        );
        payload
    }

    /// The hash the swarm uses in handshakes and announces (hex): the v1 hash of a v1 or
    /// hybrid torrent, the first 20 bytes of the v2 hash of a v2-only one.
    pub fn swarm_hex(&self) -> String {
        match (&self.v1_hex, &self.v2_hex) {
            (Some(v1), _) => v1.clone(),
            (None, Some(v2)) => v2[..40].to_owned(),
            (None, None) => unreachable!("a torrent with no hash"),
        }
    }

    pub fn swarm_hash(&self) -> [u8; 20] {
        super::info_hash_bytes(&self.swarm_hex())
    }

    /// The content's size: the real files only.
    pub fn content_size(&self) -> u64 {
        self.files.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// The bytes of libtorrent's pad files (the piece alignment a hybrid torrent spells out).
    pub fn lt_pad_bytes(&self) -> u64 {
        self.lt_files()
            .iter()
            .filter(|(_, _, pad)| *pad)
            .map(|(_, size, _)| size)
            .sum()
    }

    /// The size of libtorrent's last pad file when it follows the last real file (libtorrent
    /// 2.0.8 pads the last file to a piece too), else 0.
    pub fn lt_tail_pad(&self) -> u64 {
        match self.lt_files().last() {
            Some((_, size, true)) => *size,
            _ => 0,
        }
    }

    /// libtorrent's file list: (path with NAME/, size, pad), pad files included (libtorrent
    /// shows them for v2-only torrents too: its model of the piece space).
    pub fn lt_files(&self) -> Vec<(String, u64, bool)> {
        self.lt["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().expect("path").to_owned(),
                    f["size"].as_u64().expect("size"),
                    f["pad"].as_bool().expect("pad"),
                )
            })
            .collect()
    }

    pub fn num_pieces(&self) -> u64 {
        self.lt["num_pieces"].as_u64().expect("num_pieces")
    }

    /// The piece space as libtorrent lays it out: its file list in order, pad files as
    /// zeros (what a seeder of this torrent serves).
    pub fn piece_space(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, size, pad) in self.lt_files() {
            if pad {
                out.resize(out.len() + size as usize, 0);
            } else {
                let rel = path
                    .strip_prefix(&format!("{}/", self.name))
                    .expect("a path under NAME");
                out.extend_from_slice(self.file(rel));
            }
        }
        out
    }

    /// The bytes of the file at `rel`.
    pub fn file(&self, rel: &str) -> &[u8] {
        self.files
            .iter()
            .find(|(p, _)| p == rel)
            .map(|(_, d)| d.as_slice())
            .unwrap_or_else(|| panic!("no file {rel}"))
    }

    /// The directory holding NAME (what `seed` and libtorrent's save path take).
    pub fn source_dir(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    /// A fresh empty directory in the scratch directory.
    pub fn out_dir(&self, label: &str) -> PathBuf {
        let d = self.dir.path().join(label);
        fs::create_dir_all(&d).expect("create a directory");
        d
    }

    /// A copy of the source tree (for a test that changes the data).
    pub fn copy_source(&self, label: &str) -> PathBuf {
        let to = self.out_dir(label);
        for (rel, data) in &self.files {
            write_file(&to.join(&self.name).join(rel), data);
        }
        to
    }

    /// Paths (relative to OUT) of NAME/REL for every real file.
    pub fn expected_paths(&self, out: &Path) -> Vec<PathBuf> {
        self.files
            .iter()
            .map(|(rel, _)| out.join(&self.name).join(rel))
            .collect()
    }

    /// What `walk(OUT)` must list once the whole content is in OUT: NAME, its directories and
    /// every real file (empty ones too), and nothing else (no `.pad`).
    pub fn expected_tree(&self) -> Vec<PathBuf> {
        let mut set = std::collections::BTreeSet::new();
        for (rel, _) in &self.files {
            let full = Path::new(&self.name).join(rel);
            let mut at = full.as_path();
            loop {
                set.insert(at.to_path_buf());
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
        }
        set.into_iter().collect()
    }

    /// Problems with OUT after a complete download: a file that differs or is missing, or
    /// anything else there (a pad file, a `.pad` directory, a partial file).
    pub fn download_problems(&self, out: &Path) -> Vec<String> {
        let mut problems = Vec::new();
        let src = self.source_dir().join(&self.name);
        let dst = out.join(&self.name);
        for (rel, _) in &self.files {
            if let Err(e) = files_equal(&src.join(rel), &dst.join(rel)) {
                problems.push(e);
            }
        }
        let found = walk(out);
        let expected = self.expected_tree();
        let extra: Vec<_> = found.iter().filter(|p| !expected.contains(p)).collect();
        if !extra.is_empty() {
            problems.push(format!(
                "OUT holds more than the torrent's real files: {extra:?}"
            ));
        }
        problems
    }

    /// Panics with everyone's diagnostics unless OUT holds exactly the content.
    pub fn assert_downloaded(&self, out: &Path, parts: &[&dyn Diagnose]) {
        let problems = self.download_problems(out);
        if !problems.is_empty() {
            panic!(
                "{}",
                report(
                    &format!(
                        "{} ({:?} torrent) in {}:\n{}",
                        self.name,
                        self.kind,
                        out.display(),
                        problems.join("\n")
                    ),
                    parts
                )
            );
        }
    }
}

impl Diagnose for LtPayload {
    fn diagnostics(&self) -> String {
        format!(
            "===== the {:?} torrent {} (libtorrent's reading) =====\n{}\n",
            self.kind,
            self.torrent.display(),
            self.lt
        )
    }
}

/// Lowercase hex of a v2 hash.
pub fn hex32(h: &Hash) -> String {
    hex(h)
}
