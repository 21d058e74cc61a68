//! Torrents for the tests: made by independent tools (mktorrent, transmission-show) from
//! payloads on disk, or bencoded in memory; and their geometry and piece hashes, read back by
//! the tests themselves (never asked of bitfetch).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha1::{Digest, Sha1};
use tempfile::TempDir;

use super::bencode::{B, Value};
use super::cli::run_ok;
use super::clients::require_tool;
use super::files::{files_equal, pseudo_random, scratch_dir, write_file, write_payload};
use super::{Diagnose, hex_to_bytes, report};

/// Blocks are 16 KiB on the wire.
pub const BLOCK: u32 = 16 * 1024;
/// mktorrent's `-l` minimum: 32 KiB pieces of two blocks.
pub const PIECE_LOG2: u32 = 15;
pub const PIECE_LEN: u32 = 1 << PIECE_LOG2;
/// A tracker nothing listens on: torrents need an announce URL, and this one is refused at
/// once (port 1 on loopback), so only `--peer` addresses matter.
pub const DEAD_TRACKER: &str = "http://127.0.0.1:1/announce";

// =============================================================================================
// Made by independent tools
// =============================================================================================

/// `mktorrent -a ANNOUNCE -l 15 -o OUT SRC`: 32 KiB pieces.
pub fn make_torrent(source: &Path, announce: &str, out: &Path) -> PathBuf {
    make_torrent_with_piece_log2(source, announce, PIECE_LOG2, out)
}

/// `mktorrent` with pieces of 2^`piece_log2` bytes.
pub fn make_torrent_with_piece_log2(
    source: &Path,
    announce: &str,
    piece_log2: u32,
    out: &Path,
) -> PathBuf {
    make_torrent_tiers(source, &[vec![announce.to_owned()]], piece_log2, out)
}

/// `mktorrent` with an announce-list: `tiers[i]` is tier i+1.
pub fn make_torrent_tiers(
    source: &Path,
    tiers: &[Vec<String>],
    piece_log2: u32,
    out: &Path,
) -> PathBuf {
    assert!(
        !tiers.is_empty() && tiers.iter().all(|t| !t.is_empty()),
        "mktorrent needs at least one tracker"
    );
    let mut command = Command::new(require_tool("mktorrent"));
    for tier in tiers {
        command.arg("-a").arg(tier.join(","));
    }
    command
        .arg("-l")
        .arg(piece_log2.to_string())
        .arg("-o")
        .arg(out)
        .arg(source);
    run_ok("mktorrent", &mut command);
    out.to_path_buf()
}

/// The info hash (40 lowercase hex digits) as computed by `transmission-show`, so the harness
/// does not depend on bitfetch being right.
pub fn info_hash_hex(torrent: &Path) -> String {
    let show = require_tool("transmission-show");
    let stdout = run_ok("transmission-show", Command::new(show).arg(torrent));
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("Hash:"))
        .map(|hash| hash.trim().to_ascii_lowercase())
        .filter(|hash| hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no info hash in transmission-show output:\n{stdout}"))
}

/// The raw bytes of a .torrent's info dictionary, as written (what the info hash is the SHA-1
/// of, and what BEP 9 hands a magnet downloader), read by the test's own bencode reader.
pub fn info_bytes(torrent: &Path) -> Vec<u8> {
    let raw = fs::read(torrent).unwrap_or_else(|e| panic!("read {}: {e}", torrent.display()));
    let top =
        Value::decode(&raw).unwrap_or_else(|| panic!("{} is not bencoded", torrent.display()));
    let (_, span) = top
        .entry("info")
        .unwrap_or_else(|| panic!("{} has no info dictionary", torrent.display()));
    raw[span].to_vec()
}

// =============================================================================================
// Geometry and piece hashes, read back by the tests
// =============================================================================================

/// The piece geometry of a torrent.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub total: u64,
    pub piece_len: u64,
}

impl Geometry {
    pub fn pieces(&self) -> u32 {
        u32::try_from(self.total.div_ceil(self.piece_len)).expect("piece count fits u32")
    }

    pub fn piece_size(&self, piece: u32) -> u64 {
        let start = u64::from(piece) * self.piece_len;
        (self.total - start).min(self.piece_len)
    }

    /// Byte offset of `begin` in `piece`.
    pub fn offset(&self, piece: u32, begin: u32) -> usize {
        (u64::from(piece) * self.piece_len + u64::from(begin)) as usize
    }

    /// Whether (piece, begin, len) lies inside the torrent.
    pub fn contains(&self, piece: u32, begin: u32, len: u32) -> bool {
        piece < self.pieces() && u64::from(begin) + u64::from(len) <= self.piece_size(piece)
    }

    /// Every block of the torrent, in order: (piece, begin, length).
    pub fn blocks(&self) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        for piece in 0..self.pieces() {
            let size = self.piece_size(piece) as u32;
            let mut begin = 0;
            while begin < size {
                let len = BLOCK.min(size - begin);
                out.push((piece, begin, len));
                begin += len;
            }
        }
        out
    }
}

/// Info hash, geometry and piece hashes of a .torrent, parsed by the test's own reader.
#[derive(Debug, Clone)]
pub struct PieceMap {
    pub info_hash: [u8; 20],
    pub geo: Geometry,
    pub piece_len: u64,
    pub total: u64,
    pub hashes: Vec<[u8; 20]>,
}

impl PieceMap {
    pub fn read(torrent: &Path) -> PieceMap {
        let raw = fs::read(torrent).unwrap_or_else(|e| panic!("read {}: {e}", torrent.display()));
        let top =
            Value::decode(&raw).unwrap_or_else(|| panic!("{} is not bencoded", torrent.display()));
        let (info, span) = top
            .entry("info")
            .unwrap_or_else(|| panic!("{} has no info dictionary", torrent.display()));
        let piece_len = info
            .get("piece length")
            .and_then(Value::int)
            .expect("piece length") as u64;
        let total = match info.get("length").and_then(Value::int) {
            Some(len) => len as u64,
            None => info
                .get("files")
                .and_then(Value::list)
                .expect("a length or a file list")
                .iter()
                .map(|f| f.get("length").and_then(Value::int).expect("file length") as u64)
                .sum(),
        };
        let pieces = info.get("pieces").and_then(Value::bytes).expect("pieces");
        assert!(
            pieces.len().is_multiple_of(20),
            "pieces is not a whole number of SHA-1 hashes"
        );
        let hashes: Vec<[u8; 20]> = pieces
            .chunks_exact(20)
            .map(|c| c.try_into().expect("20 bytes"))
            .collect();
        assert_eq!(
            hashes.len() as u64,
            total.div_ceil(piece_len),
            "piece count"
        );
        PieceMap {
            info_hash: Sha1::digest(&raw[span]).into(),
            geo: Geometry { total, piece_len },
            piece_len,
            total,
            hashes,
        }
    }

    pub fn info_hash_hex(&self) -> String {
        super::hex(&self.info_hash)
    }

    pub fn count(&self) -> usize {
        self.hashes.len()
    }

    pub fn len_of(&self, piece: usize) -> u64 {
        self.geo.piece_size(piece as u32)
    }

    /// Re-checks, by SHA-1, the pieces of `file` not yet known good. A piece that cannot be
    /// read whole (the file is missing or short) is not good.
    pub fn recheck(&self, file: &Path, good: &mut [bool]) {
        let Ok(f) = File::open(file) else {
            return;
        };
        let mut buf = vec![0u8; self.piece_len as usize];
        for (piece, ok) in good.iter_mut().enumerate() {
            if *ok {
                continue;
            }
            let len = self.len_of(piece) as usize;
            let at = piece as u64 * self.piece_len;
            if f.read_exact_at(&mut buf[..len], at).is_ok() {
                *ok = <[u8; 20]>::from(Sha1::digest(&buf[..len])) == self.hashes[piece];
            }
        }
    }

    /// Which pieces of `file` pass SHA-1 now.
    pub fn good(&self, file: &Path) -> Vec<bool> {
        let mut good = vec![false; self.count()];
        self.recheck(file, &mut good);
        good
    }

    /// Bytes in the pieces marked good.
    pub fn bytes(&self, good: &[bool]) -> u64 {
        good.iter()
            .enumerate()
            .filter(|(_, ok)| **ok)
            .map(|(piece, _)| self.len_of(piece))
            .sum()
    }
}

// =============================================================================================
// Payloads on disk and their torrents
// =============================================================================================

/// Pseudo-random payload files under `DIR/source/NAME` (one file, or a directory NAME holding
/// a tree) and `DIR/NAME.torrent` made from them by mktorrent, with the piece map read back.
pub struct Payload {
    pub dir: TempDir,
    pub name: String,
    /// DIR/source/NAME: the file, or the top directory of a multi-file torrent.
    pub data: PathBuf,
    pub torrent: PathBuf,
    pub size: u64,
    /// (path inside the torrent, bytes); for a single-file torrent one entry named NAME.
    pub files: Vec<(String, Vec<u8>)>,
    pub multi: bool,
    pub pieces: PieceMap,
    pub info_hash: [u8; 20],
    /// The info hash as transmission-show computes it.
    pub hash_hex: String,
    pub hash: Vec<u8>,
}

impl Payload {
    /// One file of `size` pseudo-random bytes, pieces of 2^`piece_log2`, one tracker.
    pub fn new(name: &str, size: u64, seed: u64, piece_log2: u32, announce: &str) -> Payload {
        Payload::with_tiers(name, size, seed, piece_log2, &[vec![announce.to_owned()]])
    }

    /// One file, 32 KiB pieces, an announce-list: `tiers[i]` is tier i+1.
    pub fn tiers(name: &str, size: u64, seed: u64, tiers: &[Vec<String>]) -> Payload {
        Payload::with_tiers(name, size, seed, PIECE_LOG2, tiers)
    }

    /// One file of `size` pseudo-random bytes, 32 KiB pieces, a dead tracker.
    pub fn single(name: &str, size: usize, seed: u64) -> Payload {
        Payload::new(name, size as u64, seed, PIECE_LOG2, DEAD_TRACKER)
    }

    pub fn with_tiers(
        name: &str,
        size: u64,
        seed: u64,
        piece_log2: u32,
        tiers: &[Vec<String>],
    ) -> Payload {
        let dir = scratch_dir();
        let data = dir.path().join("source").join(name);
        write_payload(&data, size, seed);
        let bytes = fs::read(&data).expect("read the payload back");
        Payload::finish(
            dir,
            name,
            vec![(name.to_owned(), bytes)],
            false,
            piece_log2,
            tiers,
        )
    }

    /// A directory NAME holding `tree` (relative path, size), 32 KiB pieces, a dead tracker.
    pub fn multi(name: &str, tree: &[(&str, usize)], seed: u64) -> Payload {
        Payload::multi_tiers(name, tree, seed, &[vec![DEAD_TRACKER.into()]])
    }

    /// A directory NAME holding `tree` (relative path, size), 32 KiB pieces, an announce-list:
    /// `tiers[i]` is tier i+1.
    pub fn multi_tiers(
        name: &str,
        tree: &[(&str, usize)],
        seed: u64,
        tiers: &[Vec<String>],
    ) -> Payload {
        let dir = scratch_dir();
        let root = dir.path().join("source").join(name);
        let files = tree
            .iter()
            .enumerate()
            .map(|(i, (rel, size))| {
                let data = pseudo_random(*size, seed + i as u64);
                write_file(&root.join(rel), &data);
                ((*rel).to_owned(), data)
            })
            .collect();
        Payload::finish(dir, name, files, true, PIECE_LOG2, tiers)
    }

    fn finish(
        dir: TempDir,
        name: &str,
        files: Vec<(String, Vec<u8>)>,
        multi: bool,
        piece_log2: u32,
        tiers: &[Vec<String>],
    ) -> Payload {
        let data = dir.path().join("source").join(name);
        let torrent = dir.path().join(format!("{name}.torrent"));
        make_torrent_tiers(&data, tiers, piece_log2, &torrent);
        let pieces = PieceMap::read(&torrent);
        let size = files.iter().map(|(_, d)| d.len() as u64).sum();
        assert_eq!(pieces.total, size, "the torrent's length");
        assert_eq!(
            pieces.piece_len,
            1 << piece_log2,
            "the torrent's piece length"
        );
        let hash_hex = info_hash_hex(&torrent);
        assert_eq!(
            pieces.info_hash_hex(),
            hash_hex,
            "the test's own info hash and transmission-show's differ"
        );
        Payload {
            dir,
            name: name.to_owned(),
            data,
            torrent,
            size,
            files,
            multi,
            info_hash: pieces.info_hash,
            pieces,
            hash: hex_to_bytes(&hash_hex),
            hash_hex,
        }
    }

    pub fn geo(&self) -> Geometry {
        self.pieces.geo
    }

    /// The raw bytes of the torrent's info dictionary.
    pub fn info_bytes(&self) -> Vec<u8> {
        info_bytes(&self.torrent)
    }

    /// The directory holding NAME, as `bitfetch seed` takes it.
    pub fn source_dir(&self) -> PathBuf {
        self.dir.path().join("source")
    }

    /// A path in this payload's scratch directory (not created).
    pub fn scratch(&self, label: &str) -> PathBuf {
        self.dir.path().join(label)
    }

    /// A fresh directory in this payload's scratch directory.
    pub fn dir_for(&self, label: &str) -> PathBuf {
        let d = self.scratch(label);
        fs::create_dir_all(&d).expect("create a directory");
        d
    }

    /// A copy of a single-file payload in its own directory (for a seeder whose file the
    /// test damages).
    pub fn copy_data(&self, label: &str) -> PathBuf {
        let copy = self.dir_for(label).join(&self.name);
        fs::copy(&self.data, &copy).expect("copy the payload");
        copy
    }

    pub fn pieces_count(&self) -> u64 {
        u64::from(self.geo().pieces())
    }

    /// The bytes of a single-file payload.
    pub fn bytes(&self) -> &[u8] {
        assert!(!self.multi, "bytes() is for single-file content");
        &self.files[0].1
    }

    /// The bytes of the file at `rel` inside the torrent.
    pub fn file(&self, rel: &str) -> &[u8] {
        self.files
            .iter()
            .find(|(p, _)| p == rel)
            .map(|(_, d)| d.as_slice())
            .unwrap_or_else(|| panic!("no file {rel} in the content"))
    }

    /// Where `download -o OUT` puts the file at `rel`: OUT/NAME, or OUT/NAME/REL.
    pub fn downloaded(&self, out: &Path, rel: &str) -> PathBuf {
        if self.multi {
            out.join(&self.name).join(rel)
        } else {
            out.join(&self.name)
        }
    }

    /// What `walk(OUT)` must list after fetching exactly `rels`: their paths and every
    /// directory above them, relative to OUT, sorted.
    pub fn expected_tree(&self, rels: &[&str]) -> Vec<PathBuf> {
        let mut set = BTreeSet::new();
        for rel in rels {
            let full = self.downloaded(Path::new(""), rel);
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

    /// Panics with everyone's diagnostics unless `downloaded` equals the single-file payload.
    pub fn assert_same(&self, downloaded: &Path, parts: &[&dyn Diagnose]) {
        if let Err(difference) = files_equal(&self.data, downloaded) {
            panic!("{}", report(&difference, parts));
        }
    }
}

// =============================================================================================
// Torrents bencoded in memory
// =============================================================================================

/// The bytes of a torrent (all files concatenated) and their piece geometry.
#[derive(Debug)]
pub struct Content {
    pub data: Vec<u8>,
    pub piece_len: u32,
}

impl Content {
    pub fn new(size: usize, seed: u64) -> Content {
        Content {
            data: pseudo_random(size, seed),
            piece_len: PIECE_LEN,
        }
    }

    pub fn geo(&self) -> Geometry {
        Geometry {
            total: self.data.len() as u64,
            piece_len: u64::from(self.piece_len),
        }
    }

    pub fn piece_count(&self) -> u32 {
        self.geo().pieces()
    }

    pub fn piece_size(&self, piece: u32) -> u32 {
        self.geo().piece_size(piece) as u32
    }

    /// The SHA-1 of every piece, concatenated (the `pieces` field).
    pub fn piece_hashes(&self) -> Vec<u8> {
        self.data
            .chunks(self.piece_len as usize)
            .flat_map(|piece| <[u8; 20]>::from(Sha1::digest(piece)))
            .collect()
    }

    /// `len` bytes at `offset` of `piece`, if that range lies inside the piece.
    pub fn block(&self, piece: u32, offset: u32, len: u32) -> Option<&[u8]> {
        let geo = self.geo();
        geo.contains(piece, offset, len).then(|| {
            let start = geo.offset(piece, offset);
            &self.data[start..start + len as usize]
        })
    }

    /// Every (piece, offset, len) block of the torrent, in order.
    pub fn blocks(&self) -> Vec<(u32, u32, u32)> {
        self.geo().blocks()
    }
}

/// The info dict of a single-file torrent.
pub fn single_info(name: &[u8], content: &Content) -> B {
    B::dict([
        ("length", B::Int(content.data.len() as i64)),
        ("name", B::bytes(name)),
        ("piece length", B::Int(i64::from(content.piece_len))),
        ("pieces", B::Bytes(content.piece_hashes())),
    ])
}

/// The info dict of a multi-file torrent; each file is (path elements, length), and the
/// lengths must add up to the content's size.
pub fn multi_info(name: &[u8], files: &[(Vec<Vec<u8>>, u64)], content: &Content) -> B {
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    assert_eq!(total, content.data.len() as u64, "file lengths vs content");
    let files = files
        .iter()
        .map(|(path, len)| {
            B::dict([
                ("length", B::Int(*len as i64)),
                ("path", B::List(path.iter().map(B::bytes).collect())),
            ])
        })
        .collect();
    B::dict([
        ("files", B::List(files)),
        ("name", B::bytes(name)),
        ("piece length", B::Int(i64::from(content.piece_len))),
        ("pieces", B::Bytes(content.piece_hashes())),
    ])
}

/// A .torrent around `info`, with the given announce-list tiers (none: a trackerless torrent
/// whose peers come from `--peer`). Returns the bytes and the info hash.
pub fn torrent_bytes(info: &B, tiers: &[Vec<String>]) -> (Vec<u8>, [u8; 20]) {
    let info_hash: [u8; 20] = Sha1::digest(info.encode()).into();
    let mut top = vec![("info", info.clone())];
    if let Some(first) = tiers.first().and_then(|t| t.first()) {
        top.push(("announce", B::bytes(first)));
        top.push((
            "announce-list",
            B::List(
                tiers
                    .iter()
                    .map(|t| B::List(t.iter().map(B::bytes).collect()))
                    .collect(),
            ),
        ));
    }
    (B::dict(top).encode(), info_hash)
}

// =============================================================================================
// A payload and the tracker it announces to
// =============================================================================================

/// A [`Payload`] together with the tracker its torrent announces to (whose diagnostics join
/// every failure report about the payload).
pub struct Tracked<T> {
    pub payload: Payload,
    pub tracker: T,
}

impl<T> std::ops::Deref for Tracked<T> {
    type Target = Payload;

    fn deref(&self) -> &Payload {
        &self.payload
    }
}

impl<T: Diagnose> Tracked<T> {
    /// A fresh, empty directory for a downloader.
    pub fn out_dir(&self, label: &str) -> PathBuf {
        self.payload.dir_for(label)
    }

    /// Panics with everyone's diagnostics (the tracker's too) unless `downloaded` equals the
    /// original.
    pub fn assert_same(&self, downloaded: &Path, parts: &[&dyn Diagnose]) {
        let mut all: Vec<&dyn Diagnose> = parts.to_vec();
        all.push(&self.tracker);
        self.payload.assert_same(downloaded, &all);
    }
}
