//! `.torrent` files (BEP 3, with BEP 12 announce lists, BEP 27 private flags, BEP 47 file
//! attributes and BEP 52 v2 and hybrid torrents).
//!
//! Parsing is strict: everything a later stage relies on (lengths, piece count, paths, merkle
//! roots and layers) is checked here once, and the result carries a validated [`Geometry`].
//! The v1 info hash is the SHA-1 of the raw `info` bytes as they stand in the file, the v2
//! one their SHA-256; a v2-only torrent's swarm is named by the first 20 bytes of the latter.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use bt_bencode::Value;
use sha1::{Digest, Sha1};
use sha2::Sha256;

use crate::bencode::{self, Dict, Limits};
use crate::geometry::{self, Geometry};
use crate::path_safety;

mod v2;
pub use v2::{Check, V2};

/// Largest piece length accepted; real torrents stay far below.
pub const MAX_PIECE_LEN: u64 = 256 << 20;
pub const MAX_FILES: usize = 100_000;
pub const MAX_PATH_DEPTH: usize = 64;
pub const MAX_PIECES: u64 = 4 << 20;

#[derive(Debug)]
pub enum Error {
    Bencode(bencode::Error),
    NotADict,
    Missing(&'static str),
    WrongType(&'static str),
    PieceLength(i64),
    PiecesLength(usize),
    TooManyPieces(u64),
    NegativeLength {
        file: usize,
    },
    LengthAndFiles,
    NoFiles,
    EmptyName,
    TooManyFiles(usize),
    PathTooDeep {
        file: usize,
        depth: usize,
    },
    EmptyPath {
        file: usize,
    },
    UnsafePath {
        file: usize,
        source: path_safety::Error,
    },
    UnsafeName(path_safety::Error),
    DuplicatePath(String),
    RepeatedInfo,
    FileDirClash(String),
    Geometry(geometry::Error),
    /// A `meta version` we do not know.
    MetaVersion(i64),
    /// Something wrong in the v2 part (file tree, roots, layers) or between it and the v1 part.
    V2(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use path_safety::escape;
        match self {
            Error::Bencode(e) => write!(f, "not a valid torrent file: {e}"),
            Error::NotADict => write!(f, "not a valid torrent file: top level is not a dictionary"),
            Error::Missing(k) => write!(f, "torrent has no `{k}`"),
            Error::WrongType(k) => write!(f, "torrent field `{k}` has the wrong type"),
            Error::PieceLength(n) => write!(
                f,
                "invalid piece length {n} (must be between 1 and {MAX_PIECE_LEN} bytes)"
            ),
            Error::PiecesLength(n) => {
                write!(f, "`pieces` is {n} bytes long, not a multiple of 20")
            }
            Error::TooManyPieces(n) => write!(f, "torrent has {n} pieces, over {MAX_PIECES}"),
            Error::NegativeLength { file } => write!(f, "file {file} has a negative length"),
            Error::LengthAndFiles => write!(f, "torrent has both `length` and `files`"),
            Error::NoFiles => write!(f, "torrent `files` list is empty"),
            Error::EmptyName => write!(f, "torrent name is empty"),
            Error::TooManyFiles(n) => write!(f, "torrent has {n} files, over {MAX_FILES}"),
            Error::PathTooDeep { file, depth } => write!(
                f,
                "file {file} has a path {depth} elements deep, over {MAX_PATH_DEPTH}"
            ),
            Error::EmptyPath { file } => write!(f, "file {file} has an empty path"),
            Error::UnsafePath { file, source } => {
                write!(f, "unsafe path in file {file}: {source}")
            }
            Error::UnsafeName(source) => write!(f, "unsafe torrent name: {source}"),
            Error::DuplicatePath(p) => write!(f, "duplicate file path {}", escape(p)),
            Error::RepeatedInfo => write!(f, "more than one info dictionary"),
            Error::FileDirClash(p) => {
                write!(f, "path {} is both a file and a directory", escape(p))
            }
            Error::Geometry(e) => write!(f, "inconsistent torrent: {e}"),
            Error::MetaVersion(n) => write!(
                f,
                "torrent has meta version {n}; bitfetch knows versions 1 and 2 (BEP 52)"
            ),
            Error::V2(what) => write!(f, "invalid v2 torrent: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<bencode::Error> for Error {
    fn from(e: bencode::Error) -> Error {
        Error::Bencode(e)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the output directory, sanitised: `NAME` for a single-file torrent,
    /// `NAME/dir/file` for a multi-file one.
    pub path: PathBuf,
    pub len: u64,
    /// The path's elements as the torrent spells them, unsanitised and without the torrent's
    /// name (empty for a single-file torrent): what a web seed's URL is built from (BEP 19).
    pub raw_path: Vec<Vec<u8>>,
    /// A BEP 47 pad file (`attr` holds `p`, or the path is `.pad/N`; and the pads bitfetch
    /// puts between a v2-only torrent's files): zeros, never on disk, never shown.
    pub pad: bool,
    /// BEP 47 `x`: the file gets its executable bits.
    pub exec: bool,
    /// BEP 47 `h`: a hidden file (recorded; nothing to do on Linux).
    pub hidden: bool,
    /// BEP 47 `l`: a symbolic link to this path inside the torrent (elements as spelled).
    pub symlink: Option<Vec<Vec<u8>>>,
}

impl FileEntry {
    fn plain(path: PathBuf, len: u64, raw_path: Vec<Vec<u8>>) -> FileEntry {
        FileEntry {
            path,
            len,
            raw_path,
            pad: false,
            exec: false,
            hidden: false,
            symlink: None,
        }
    }

    fn set_attr(&mut self, attr: &[u8]) {
        self.pad |= attr.contains(&b'p');
        self.exec = attr.contains(&b'x');
        self.hidden = attr.contains(&b'h');
    }
}

/// Which hashes a torrent carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
    /// Both (BEP 52 "hybrid"): two swarms, every piece checked against both.
    Hybrid,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
            Version::Hybrid => "hybrid",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metainfo {
    /// The swarm's name in handshakes, announces and the DHT: the v1 info hash, or for a
    /// v2-only torrent the first 20 bytes of the v2 one.
    pub info_hash: [u8; 20],
    pub version: Version,
    /// The v2 part (v2-only and hybrid torrents).
    pub v2: Option<V2>,
    /// Sanitised top-level name.
    pub name: String,
    /// The name as the torrent spells it (for web seed URLs).
    pub raw_name: Vec<u8>,
    pub multi_file: bool,
    pub files: Vec<FileEntry>,
    pub geometry: Geometry,
    piece_hashes: Vec<u8>,
    info_bytes: std::sync::Arc<[u8]>,
    pub private: bool,
    /// Announce tiers (BEP 12); a lone `announce` makes one tier of one.
    pub trackers: Vec<Vec<String>>,
    /// Web seeds (BEP 19), kept for when they are used.
    pub url_list: Vec<String>,
    pub comment: Option<String>,
    pub created_by: Option<String>,
    pub creation_date: Option<i64>,
}

impl Metainfo {
    pub fn from_bytes(buf: &[u8]) -> Result<Metainfo, Error> {
        let limits = Limits::METAINFO;
        let Value::Dict(top) = bencode::decode(buf, limits)? else {
            return Err(Error::NotADict);
        };
        // Two `info` keys would leave it open which one the info hash names; refuse.
        if bencode::dict_key_count(buf, b"info", limits) > 1 {
            return Err(Error::RepeatedInfo);
        }
        let raw_info =
            bencode::dict_value_span(buf, b"info", limits).ok_or(Error::Missing("info"))?;
        if bencode::get_dict(&top, "info").is_none() {
            return Err(Error::WrongType("info"));
        }
        let mut m = Metainfo::from_info(raw_info)?;
        if let Some(v2) = m.v2.as_mut() {
            let empty = Dict::new();
            let layers = match bencode::get(&top, "piece layers") {
                None => &empty,
                Some(Value::Dict(d)) => d,
                Some(_) => return Err(Error::WrongType("piece layers")),
            };
            v2.set_layers(layers)?;
        }
        m.trackers = parse_trackers(&top);
        m.url_list = parse_url_list(&top);
        m.comment = bencode::get_str(&top, "comment");
        m.created_by = bencode::get_str(&top, "created by");
        m.creation_date = bencode::get_int(&top, "creation date");
        Ok(m)
    }

    /// An info dictionary on its own (as peers send it for a magnet link), with every check
    /// a whole .torrent gets. The info hash is the SHA-1 of exactly these bytes.
    pub fn from_info(raw_info: &[u8]) -> Result<Metainfo, Error> {
        let Value::Dict(info) = bencode::decode(raw_info, Limits::METAINFO)? else {
            return Err(Error::WrongType("info"));
        };
        let info = &info;

        let name_raw = bencode::get_bytes(info, "name").ok_or(Error::Missing("name"))?;
        if name_raw.is_empty() {
            return Err(Error::EmptyName);
        }
        let name = path_safety::sanitize_element(name_raw).map_err(Error::UnsafeName)?;
        let piece_len = parse_piece_len(info)?;

        let meta_version = match bencode::get(info, "meta version") {
            None => 1,
            Some(Value::Int(n)) => bencode::number_to_i64(n).unwrap_or(i64::MAX),
            Some(_) => return Err(Error::WrongType("meta version")),
        };
        let tree = match meta_version {
            1 => None,
            2 => {
                v2::check_piece_len(piece_len)?;
                let tree = match bencode::get(info, "file tree") {
                    None => return Err(Error::Missing("file tree")),
                    Some(Value::Dict(d)) => d,
                    Some(_) => return Err(Error::WrongType("file tree")),
                };
                Some(v2::parse_file_tree(tree)?)
            }
            n => return Err(Error::MetaVersion(n)),
        };

        let hashes = match (bencode::get(info, "pieces"), &tree) {
            (None, None) => return Err(Error::Missing("pieces")),
            (None, Some(_)) => None,
            (Some(Value::ByteStr(b)), _) => Some(b.as_slice()),
            (Some(_), _) => return Err(Error::WrongType("pieces")),
        };
        let (multi_file, files, geometry) = match (hashes, &tree) {
            (Some(hashes), _) => {
                if !hashes.len().is_multiple_of(20) {
                    return Err(Error::PiecesLength(hashes.len()));
                }
                let piece_count = (hashes.len() / 20) as u64;
                if piece_count > MAX_PIECES {
                    return Err(Error::TooManyPieces(piece_count));
                }
                let (multi_file, files) = parse_files(info, &name)?;
                let lens: Vec<u64> = files.iter().map(|f| f.len).collect();
                let g = Geometry::new(piece_len, &lens, piece_count).map_err(Error::Geometry)?;
                (multi_file, files, g)
            }
            (None, Some(tree)) => {
                let (multi_file, files) = v2::layout(tree, &name, piece_len)?;
                let lens: Vec<u64> = files.iter().map(|f| f.len).collect();
                let total = lens.iter().try_fold(0u64, |a, &l| a.checked_add(l));
                let piece_count = total
                    .ok_or(Error::Geometry(geometry::Error::TooLarge))?
                    .div_ceil(u64::from(piece_len));
                if piece_count > MAX_PIECES {
                    return Err(Error::TooManyPieces(piece_count));
                }
                let g = Geometry::new(piece_len, &lens, piece_count).map_err(Error::Geometry)?;
                (multi_file, files, g)
            }
            (None, None) => unreachable!("refused above"),
        };

        let v2 = match &tree {
            Some(tree) => Some(v2::build(
                Sha256::digest(raw_info).into(),
                tree,
                &files,
                &geometry,
            )?),
            None => None,
        };
        let (info_hash, version) = match (&v2, hashes.is_some()) {
            (None, _) => (Sha1::digest(raw_info).into(), Version::V1),
            (Some(_), true) => (Sha1::digest(raw_info).into(), Version::Hybrid),
            (Some(v2), false) => (
                v2.info_hash[..20].try_into().expect("20 of 32 bytes"),
                Version::V2,
            ),
        };

        Ok(Metainfo {
            info_hash,
            version,
            v2,
            name,
            raw_name: name_raw.to_vec(),
            multi_file,
            files,
            geometry,
            piece_hashes: hashes.unwrap_or_default().to_vec(),
            private: bencode::get_int(info, "private") == Some(1),
            info_bytes: raw_info.into(),
            trackers: Vec::new(),
            url_list: Vec::new(),
            comment: None,
            created_by: None,
            creation_date: None,
        })
    }

    /// The info dictionary exactly as it stands in the torrent (what the info hash covers,
    /// and what peers are sent when they ask for the metadata).
    pub fn info_bytes(&self) -> &[u8] {
        &self.info_bytes
    }

    /// The v1 SHA-1 of a piece (`None` for a v2-only torrent).
    pub fn piece_hash(&self, piece: geometry::PieceIndex) -> Option<&[u8; 20]> {
        let start = piece.usize() * 20;
        // Geometry guarantees piece < piece_count == hashes.len() / 20 when there are hashes.
        self.piece_hashes
            .get(start..start + 20)
            .map(|h| h.try_into().expect("20-byte slice"))
    }

    /// Whether `data`, the whole of `piece` (pads as zeros), is that piece: it must match
    /// every hash the torrent has for it. A hybrid torrent's piece whose v2 layer is not known
    /// yet rests on its v1 hash.
    pub fn piece_ok(&self, piece: geometry::PieceIndex, data: &[u8]) -> bool {
        let v1 = self
            .piece_hash(piece)
            .map(|want| <[u8; 20]>::from(Sha1::digest(data)) == *want);
        let v2 = self.v2.as_ref().map(|v2| v2.check(piece, data));
        match (v1, v2) {
            (Some(false), _) | (_, Some(Check::Bad)) => false,
            (_, Some(Check::Good)) => true,
            (Some(true), _) => true,
            _ => false,
        }
    }

    /// The second swarm of a hybrid torrent: the first 20 bytes of its v2 info hash.
    pub fn v2_swarm_hash(&self) -> Option<[u8; 20]> {
        match (&self.v2, self.version) {
            (Some(v2), Version::Hybrid) => {
                Some(v2.info_hash[..20].try_into().expect("20 of 32 bytes"))
            }
            _ => None,
        }
    }

    /// Whether `hash` names this torrent's swarm (either one, for a hybrid torrent).
    pub fn is_our_swarm(&self, hash: &[u8; 20]) -> bool {
        *hash == self.info_hash || self.v2_swarm_hash().as_ref() == Some(hash)
    }

    /// The files a user sees: all but pad files, with their indices in `files`.
    pub fn content_files(&self) -> impl Iterator<Item = (usize, &FileEntry)> {
        self.files.iter().enumerate().filter(|(_, f)| !f.pad)
    }

    /// What the symbolic link `file` (BEP 47 `l`) should hold: the path of its target
    /// relative to the link's own directory. Refused (with why) unless the target is another
    /// path of this torrent's own tree that passes through no link of the torrent: a link
    /// never points outside the download, nor anywhere another link could redirect.
    pub fn link_text(&self, file: usize) -> Result<PathBuf, String> {
        let f = &self.files[file];
        let Some(target) = &f.symlink else {
            return Err("not a link".into());
        };
        if !self.multi_file {
            return Err("a single-file torrent cannot hold a link".into());
        }
        let mut clean = vec![self.name.clone()];
        for e in target {
            clean.push(path_safety::sanitize_element(e).map_err(|e| e.to_string())?);
        }
        if clean.len() < 2 {
            return Err("the target is empty".into());
        }
        let key = |p: &str| path_safety::collision_key(p);
        let links: HashSet<String> = self
            .files
            .iter()
            .filter(|g| g.symlink.is_some())
            .map(|g| key(&g.path.to_string_lossy()))
            .collect();
        for depth in 2..=clean.len() {
            if links.contains(&key(&clean[..depth].join("/"))) {
                return Err("the target is, or passes through, another link".into());
            }
        }
        // From the link's directory up to the torrent's top, then down to the target.
        let depth_below_top = f.path.components().count().saturating_sub(2);
        let mut text = PathBuf::new();
        for _ in 0..depth_below_top {
            text.push("..");
        }
        for e in &clean[1..] {
            text.push(e);
        }
        Ok(text)
    }

    /// How many bytes of the torrent are pad files.
    pub fn pad_bytes(&self) -> u64 {
        self.files.iter().filter(|f| f.pad).map(|f| f.len).sum()
    }

    pub fn total_len(&self) -> u64 {
        self.geometry.total_len()
    }

    pub fn info_hash_hex(&self) -> String {
        hex(&self.info_hash)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_piece_len(info: &Dict) -> Result<u32, Error> {
    let Some(v) = bencode::get(info, "piece length") else {
        return Err(Error::Missing("piece length"));
    };
    let Value::Int(n) = v else {
        return Err(Error::WrongType("piece length"));
    };
    let n = bencode::number_to_i64(n).unwrap_or(i64::MAX);
    if n <= 0 || n as u64 > MAX_PIECE_LEN {
        return Err(Error::PieceLength(n));
    }
    Ok(n as u32)
}

fn parse_len(dict: &Dict, file: usize) -> Result<u64, Error> {
    match bencode::get(dict, "length") {
        None => Err(Error::Missing("length")),
        Some(Value::Int(n)) => {
            let n = bencode::number_to_i64(n).ok_or(Error::WrongType("length"))?;
            u64::try_from(n).map_err(|_| Error::NegativeLength { file })
        }
        Some(_) => Err(Error::WrongType("length")),
    }
}

fn parse_files(info: &Dict, name: &str) -> Result<(bool, Vec<FileEntry>), Error> {
    let has_length = bencode::get(info, "length").is_some();
    let files = match bencode::get(info, "files") {
        None if has_length => {
            let len = parse_len(info, 0)?;
            let mut f = FileEntry::plain(PathBuf::from(name), len, Vec::new());
            f.set_attr(bencode::get_bytes(info, "attr").unwrap_or_default());
            // A single file cannot be a pad or a link: it is the whole torrent.
            f.pad = false;
            return Ok((false, vec![f]));
        }
        None => return Err(Error::Missing("length or files")),
        Some(_) if has_length => return Err(Error::LengthAndFiles),
        Some(Value::List(l)) => l,
        Some(_) => return Err(Error::WrongType("files")),
    };
    if files.is_empty() {
        return Err(Error::NoFiles);
    }
    if files.len() > MAX_FILES {
        return Err(Error::TooManyFiles(files.len()));
    }
    let mut out = Vec::with_capacity(files.len());
    let mut clean_paths = Vec::with_capacity(files.len());
    for (i, f) in files.iter().enumerate() {
        let Value::Dict(f) = f else {
            return Err(Error::WrongType("files"));
        };
        let len = parse_len(f, i)?;
        let elements = bencode::get_list(f, "path").ok_or(Error::Missing("path"))?;
        if elements.is_empty() {
            return Err(Error::EmptyPath { file: i });
        }
        if elements.len() > MAX_PATH_DEPTH {
            return Err(Error::PathTooDeep {
                file: i,
                depth: elements.len(),
            });
        }
        let raw_path = elements
            .iter()
            .map(|e| e.as_byte_str().map(|b| b.to_vec()))
            .collect::<Option<Vec<_>>>()
            .ok_or(Error::WrongType("path"))?;
        let (clean, path) = clean_path(name, &raw_path, i)?;
        let attr = bencode::get_bytes(f, "attr").unwrap_or_default();
        let mut entry = FileEntry::plain(path, len, raw_path);
        entry.set_attr(attr);
        // Creators older than the attribute (BitComet) name pad files `.pad/N`.
        entry.pad |= entry.raw_path.len() == 2 && entry.raw_path[0] == b".pad";
        if attr.contains(&b'l') {
            entry.symlink = Some(
                bencode::get_list(f, "symlink path")
                    .ok_or(Error::Missing("symlink path"))?
                    .iter()
                    .map(|e| e.as_byte_str().map(|b| b.to_vec()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(Error::WrongType("symlink path"))?,
            );
        }
        // Pads are never on disk, so their names (libtorrent repeats `.pad/N`) cannot clash.
        if !entry.pad {
            clean_paths.push(clean);
        }
        out.push(entry);
    }
    collision_check(&clean_paths)?;
    Ok((true, out))
}

/// File `i`'s path below the torrent's `name`, each element sanitised: the elements (name
/// first) and the joined path.
fn clean_path(name: &str, raw: &[Vec<u8>], i: usize) -> Result<(Vec<String>, PathBuf), Error> {
    let mut clean = Vec::with_capacity(raw.len() + 1);
    clean.push(name.to_string());
    for e in raw {
        clean.push(
            path_safety::sanitize_element(e)
                .map_err(|source| Error::UnsafePath { file: i, source })?,
        );
    }
    let path = path_safety::join_elements(&clean).ok_or(Error::UnsafePath {
        file: i,
        source: path_safety::Error::Empty,
    })?;
    Ok((clean, path))
}

/// Refuses two paths that one file system would merge into one file, and a path that is both
/// a file and a directory. Each path is its sanitised elements, the torrent name first.
fn collision_check(paths: &[Vec<String>]) -> Result<(), Error> {
    // Keys are case-folded: two paths that differ only in letter case are one file on
    // case-insensitive file systems (and when the output is copied to one), so the second
    // would silently overwrite the first.
    let mut seen = HashSet::with_capacity(paths.len());
    let mut dirs = HashSet::new();
    for clean in paths {
        let key = path_safety::collision_key(&clean.join("/"));
        for depth in 1..clean.len() {
            dirs.insert(path_safety::collision_key(&clean[..depth].join("/")));
        }
        if !seen.insert(key) {
            return Err(Error::DuplicatePath(clean.join("/")));
        }
    }
    if let Some(clash) = seen.iter().find(|p| dirs.contains(*p)) {
        return Err(Error::FileDirClash(clash.clone()));
    }
    Ok(())
}

fn parse_trackers(top: &Dict) -> Vec<Vec<String>> {
    let valid = |b: &[u8]| {
        let s = String::from_utf8_lossy(b).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    let mut tiers: Vec<Vec<String>> = Vec::new();
    if let Some(list) = bencode::get_list(top, "announce-list") {
        for tier in list {
            let Value::List(urls) = tier else { continue };
            let urls: Vec<String> = urls
                .iter()
                .filter_map(|u| u.as_byte_str().and_then(|b| valid(b)))
                .collect();
            if !urls.is_empty() {
                tiers.push(urls);
            }
        }
    }
    // BEP 12: when announce-list is present, announce is ignored.
    if tiers.is_empty()
        && let Some(url) = bencode::get_bytes(top, "announce").and_then(valid)
    {
        tiers.push(vec![url]);
    }
    tiers
}

fn parse_url_list(top: &Dict) -> Vec<String> {
    match bencode::get(top, "url-list") {
        Some(Value::ByteStr(b)) => vec![String::from_utf8_lossy(b).into_owned()],
        Some(Value::List(l)) => l
            .iter()
            .filter_map(|v| v.as_byte_str())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `doc` with `{pieces}` standing for one piece hash.
    fn with_pieces(doc: &str) -> Metainfo {
        let doc = doc.replace("{pieces}", &"x".repeat(20));
        Metainfo::from_bytes(doc.as_bytes()).unwrap()
    }

    fn single(extra_info: &str) -> Vec<u8> {
        let pieces = "x".repeat(60);
        format!(
            "d8:announce13:http://t/anno4:infod6:lengthi40000e4:name8:file.bin12:piece lengthi16384e6:pieces60:{pieces}{extra_info}ee"
        )
        .into_bytes()
    }

    #[test]
    fn parses_a_single_file_torrent() {
        let m = Metainfo::from_bytes(&single("")).unwrap();
        assert_eq!(m.name, "file.bin");
        assert!(!m.multi_file);
        assert_eq!(m.total_len(), 40000);
        assert_eq!(m.geometry.piece_count(), 3);
        assert_eq!(m.trackers, vec![vec!["http://t/anno".to_string()]]);
        assert!(!m.private);
    }

    #[test]
    fn info_hash_is_over_the_raw_bytes() {
        // Unsorted keys, an unknown key and a non-canonical integer.
        let pieces = "x".repeat(20);
        let info = format!(
            "d4:name1:a6:lengthi5e7:unknowni007e12:piece lengthi16384e6:pieces20:{pieces}e"
        );
        let doc = format!("d4:info{info}e");
        let m = Metainfo::from_bytes(doc.as_bytes()).unwrap();
        let want: [u8; 20] = Sha1::digest(info.as_bytes()).into();
        assert_eq!(m.info_hash, want);
    }

    #[test]
    fn names_one_file_system_would_merge_are_duplicates() {
        let pairs = [
            ("caf\u{e9}", "cafe\u{301}"),
            ("A", "\u{ff21}"),
            ("stra\u{df}e", "STRASSE"),
            ("x", "X"),
        ];
        for (a, b) in pairs {
            let doc = format!(
                "d4:infod5:filesld6:lengthi1e4:pathl{}:{a}eed6:lengthi1e4:pathl{}:{b}eee4:name1:t12:piece lengthi16384e6:pieces20:{}ee",
                a.len(),
                b.len(),
                "x".repeat(20)
            );
            let err = Metainfo::from_bytes(doc.as_bytes()).unwrap_err();
            assert!(
                matches!(err, Error::DuplicatePath(_)),
                "{a:?} / {b:?}: {err}"
            );
        }
    }

    #[test]
    fn multi_file_paths_are_prefixed_and_checked() {
        let m = with_pieces(
            "d4:infod5:filesld6:lengthi3e4:pathl3:sub1:aeed6:lengthi0e4:pathl1:beee4:name3:top12:piece lengthi16384e6:pieces20:{pieces}ee",
        );
        assert!(m.multi_file);
        assert_eq!(m.files[0].path, PathBuf::from("top/sub/a"));
        assert_eq!(m.files[1].path, PathBuf::from("top/b"));
        assert_eq!(m.files[1].len, 0);
    }

    #[test]
    fn rejects_inconsistent_torrents() {
        let pieces = "x".repeat(20);
        let cases = [
            (
                format!("d4:infod4:name1:a6:lengthi5e12:piece lengthi0e6:pieces20:{pieces}ee"),
                "piece length",
            ),
            (
                format!("d4:infod4:name1:a6:lengthi-5e12:piece lengthi16384e6:pieces20:{pieces}ee"),
                "negative",
            ),
            (
                format!("d4:infod4:name0:6:lengthi5e12:piece lengthi16384e6:pieces20:{pieces}ee"),
                "name",
            ),
            (
                format!(
                    "d4:infod4:name1:a6:lengthi99999e12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "pieces",
            ),
            (
                "d4:infod4:name1:a6:lengthi5e12:piece lengthi16384e6:pieces3:abcee".to_string(),
                "multiple of 20",
            ),
            (
                format!("d4:infod5:filesle4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"),
                "empty",
            ),
            (
                format!(
                    "d4:infod5:filesld6:lengthi1e4:pathl2:..eee4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "climbs",
            ),
            (
                format!(
                    "d4:infod5:filesld6:lengthi1e4:pathl1:beed6:lengthi1e4:pathl1:beee4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "duplicate",
            ),
            (
                format!(
                    "d4:infod5:filesld6:lengthi1e4:pathl6:File.Xeed6:lengthi1e4:pathl6:fILE.xeee4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "duplicate",
            ),
            (
                format!(
                    "d4:infod5:filesld6:lengthi1e4:pathl1:Beed6:lengthi1e4:pathl1:b1:ceee4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "both a file and a directory",
            ),
            (
                format!(
                    "d4:infod5:filesld6:lengthi1e4:pathl1:beed6:lengthi1e4:pathl1:b1:ceee4:name1:a12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "both a file and a directory",
            ),
            ("d4:infoi1ee".to_string(), "wrong type"),
            (
                format!(
                    "d4:infod4:name1:a6:lengthi1e12:piece lengthi16384e6:pieces20:{pieces}e4:infod4:name1:b6:lengthi1e12:piece lengthi16384e6:pieces20:{pieces}ee"
                ),
                "more than one info",
            ),
            ("le".to_string(), "dictionary"),
        ];
        for (doc, want) in cases {
            let err = Metainfo::from_bytes(doc.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{doc}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn announce_list_takes_precedence() {
        let m = with_pieces(
            "d8:announce5:http:13:announce-listll3:a:/3:b:/el3:c:/ee4:infod4:name1:a6:lengthi5e12:piece lengthi16384e6:pieces20:{pieces}e7:privatei1ee",
        );
        assert_eq!(m.trackers, vec![vec!["a:/", "b:/"], vec!["c:/"]]);
    }
}
