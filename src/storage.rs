//! The torrent's files on disk: creation, memory-mapped block writes, reads and piece hashing.
//!
//! All `unsafe` in bitfetch lives here.
//!
//! # Who touches what
//! - Blocks are received straight into the shared memory maps by the peer threads, each write
//!   under a [`Claim`]: a per-block right won with one compare-and-swap. A block is free,
//!   being written by the one claim holder, written, or held for a moment while the piece's
//!   first block prepares the piece (writes zeros into its free blocks to lay down their
//!   pages, see `Storage::prepare`). Only a free block can be claimed, so no two writes
//!   overlap and nothing is written into a piece that is complete (being hashed) or
//!   verified. The reader thread asks for a claim only for blocks it requested, so a
//!   stranger cannot write into a piece.
//! - Only the session's [`Writer`] (not `Clone`) turns written blocks back into free ones,
//!   after a piece fails its hash check, and drops verified pieces' pages.
//! - Reads (serving peers, verifying) use `pread` on the file descriptors; hashing reads a
//!   complete piece through the map, which no claim can touch while it is complete. The page
//!   cache is shared, so a read sees what the map wrote.
//!
//! # SIGBUS
//! Touching a mapped page beyond the end of a file that another process truncated raises SIGBUS.
//! Reads cannot hit it: `pread` past the end returns a short read, which we report as an error.
//! Space for every file is reserved with `posix_fallocate` before any write, so a full disk is
//! an error at start-up instead of a SIGBUS mid-download. What remains is a write racing an
//! outside truncation; [`install_sigbus_guard`] turns that into a clear message and exit code
//! instead of a bare crash.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use memmap2::MmapRaw;
use sha1::{Digest, Sha1};

use crate::geometry::{BLOCK_LEN, BlockRef, Geometry, PieceIndex};
use crate::metainfo::Metainfo;

#[derive(Debug)]
pub enum Error {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    NoSpace {
        path: PathBuf,
        needed: u64,
    },
    Symlink(PathBuf),
    NotADirectory(PathBuf),
    /// A FIFO, device or directory where a data file belongs.
    NotAFile(PathBuf),
    /// A data file to be written that has other names.
    HardLinked(PathBuf),
    LargerThanTorrent {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
}

impl Error {
    fn io(path: &Path, source: io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace {
                path: path.to_path_buf(),
                needed: 0,
            };
        }
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => {
                write!(f, "{}: {}", path.display(), crate::error::reason(source))
            }
            Error::NoSpace { path, needed } if *needed > 0 => write!(
                f,
                "no space left on device for {} ({needed} bytes needed)",
                path.display()
            ),
            Error::NoSpace { path, .. } => {
                write!(f, "no space left on device for {}", path.display())
            }
            Error::Symlink(p) => write!(
                f,
                "refusing to follow the symbolic link {} inside the data directory",
                p.display()
            ),
            Error::NotADirectory(p) => write!(f, "{} is in the way of a directory", p.display()),
            Error::NotAFile(p) => write!(
                f,
                "{} is not a regular file (a FIFO, device or directory?); not touching it",
                p.display()
            ),
            Error::HardLinked(p) => write!(
                f,
                "{} has other names (hard links); writing it would change them too, so it is left alone",
                p.display()
            ),
            Error::LargerThanTorrent {
                path,
                len,
                expected,
            } => write!(
                f,
                "{} is {len} bytes, larger than the {expected} bytes the torrent says; not touching it",
                path.display()
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Where a torrent's files live: a root directory and each file's path below it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
    /// Which files hold no data on disk (BEP 47): pad files (zeros) and symbolic links (made
    /// apart). Empty when none.
    pub pad: Vec<bool>,
}

impl Layout {
    /// The layout `download -o DIR` writes: `DIR/NAME` or `DIR/NAME/...`.
    pub fn in_dir(dir: &Path, meta: &Metainfo) -> Layout {
        Layout {
            root: dir.to_path_buf(),
            files: meta.files.iter().map(|f| f.path.clone()).collect(),
            // Links (BEP 47 `l`) are made apart (`Storage::make_link`), never as data files.
            pad: meta
                .files
                .iter()
                .map(|f| f.pad || f.symlink.is_some())
                .collect(),
        }
    }

    /// A data path as commands take it: the directory holding the content, or (single-file
    /// torrents) the file itself.
    pub fn for_data_path(data: &Path, meta: &Metainfo) -> Layout {
        if !meta.multi_file
            && let Ok(m) = fs::metadata(data)
            && m.is_file()
        {
            let parent = data.parent().filter(|p| !p.as_os_str().is_empty());
            // A v2-only single file is followed by a pad (see `metainfo::v2::layout`).
            let mut files = vec![PathBuf::from(data.file_name().unwrap_or_default())];
            files.extend(meta.files[1..].iter().map(|f| f.path.clone()));
            return Layout {
                root: parent.unwrap_or(Path::new(".")).to_path_buf(),
                pad: meta.files.iter().map(|f| f.pad).collect(),
                files,
            };
        }
        Layout::in_dir(data, meta)
    }

    pub fn full_path(&self, file: usize) -> PathBuf {
        self.root.join(&self.files[file])
    }

    pub fn is_pad(&self, file: usize) -> bool {
        self.pad.get(file).copied().unwrap_or(false)
    }
}

struct FileSlot {
    path: PathBuf,
    file: Option<File>,
    map: Option<MmapRaw>,
    /// Where this torrent file's bytes start in `file` (non-zero only in the spill file that
    /// holds unselected files' share of boundary pieces).
    base: u64,
    /// Where they start in `map` (the map begins at a page boundary at or before `base`).
    map_delta: u64,
    /// A pad file: reads give zeros, writes are dropped, nothing is on disk.
    zeros: bool,
}

impl FileSlot {
    /// Copies `len` bytes at `offset` of this file out of its map into `dst`, or writes
    /// zeros there when `dst` is `None`: for files kept as maps only. False without a map or
    /// outside it.
    fn fill_map(&self, offset: u64, len: u64, dst: Option<&mut [u8]>) -> bool {
        let Some(map) = &self.map else {
            return false;
        };
        let at = self.map_delta + offset;
        if at + len > map.len() as u64 {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above). Zeros go only to blocks
        // whose claims the caller holds (see `Storage::prepare`); reads only of verified or
        // complete pieces, as with `pread` on the file. A file truncated by another program
        // raises SIGBUS, which the CLI's guard turns into a clear error.
        unsafe {
            let p = map.as_mut_ptr().add(at as usize);
            match dst {
                Some(dst) => std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), len as usize),
                None => std::ptr::write_bytes(p, 0, len as usize),
            }
        }
        true
    }

    fn plain(path: PathBuf, file: Option<File>, map: Option<MmapRaw>) -> FileSlot {
        FileSlot {
            path,
            file,
            map,
            base: 0,
            map_delta: 0,
            zeros: false,
        }
    }

    fn zeros(path: PathBuf) -> FileSlot {
        FileSlot {
            zeros: true,
            ..FileSlot::plain(path, None, None)
        }
    }
}

/// The open files of one torrent.
pub struct Storage {
    geometry: Geometry,
    slots: Vec<FileSlot>,
    /// Each file's size and modification time when all the data was last known good (see
    /// [`Storage::mark_known_good`]).
    known_good: OnceLock<Vec<Stamp>>,
    /// Write rights per block; empty when the files are opened read-only.
    claims: Claims,
    /// The download directory as opened at start: files we remove later are removed through
    /// it, so a directory swapped for a symbolic link meanwhile leads nowhere else.
    root: Option<File>,
}

const FREE: u8 = 0;
const WRITING: u8 = 1;
const WRITTEN: u8 = 2;
/// Held by `Storage::prepare` while it lays down the block's page-cache pages.
const PREPARING: u8 = 3;

/// Blocks `Storage::prepare` holds at once: 256 KiB, a fraction of a millisecond to zero.
const PREPARE_CHUNK: u32 = 16;
/// How long a receiver waits for another connection preparing the piece to let go of a
/// block before it gives up on writing it (the block is then asked for again). A block is
/// held for tens of microseconds; this only bounds a thread the scheduler put aside.
const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The state of every block of a download (free, being written, written, being prepared), and
/// per piece whether it was prepared (see `Storage::prepare`).
#[derive(Debug, Default)]
struct Claims {
    blocks: Vec<AtomicU8>,
    per_piece: usize,
    prepared: Vec<AtomicBool>,
}

impl Claims {
    fn new(g: &Geometry) -> Claims {
        let per_piece = g.nominal_piece_len().div_ceil(BLOCK_LEN) as usize;
        let pieces = g.piece_count() as usize;
        Claims {
            blocks: (0..pieces * per_piece)
                .map(|_| AtomicU8::new(FREE))
                .collect(),
            per_piece,
            prepared: (0..pieces).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn slot(&self, block: BlockRef) -> Option<&AtomicU8> {
        self.blocks
            .get(block.piece.usize() * self.per_piece + block.index_in_piece() as usize)
    }

    fn piece(&self, piece: PieceIndex) -> &[AtomicU8] {
        let start = piece.usize() * self.per_piece;
        self.blocks
            .get(start..start + self.per_piece)
            .unwrap_or_default()
    }
}

/// The right to write one block into the maps, won by [`Storage::claim`]. Dropped without a
/// completed [`Claim::fill`] (the connection broke mid-block), the block is free again.
#[must_use]
pub struct Claim<'a> {
    storage: &'a Storage,
    block: BlockRef,
    slot: &'a AtomicU8,
}

impl Claim<'_> {
    /// Reads the block's bytes from `src` straight into its place in the files. On success the
    /// block counts as written; on error it is free again.
    pub fn fill(self, src: &mut impl ReadInto) -> io::Result<()> {
        let storage = self.storage;
        let g = &storage.geometry;
        // The first block of a piece to land prepares the piece, its own block included (left
        // to a page fault, the block would drag zero-filled readahead pages into the cache).
        storage.prepare(self.block.piece, Some(self.block.index_in_piece()));
        let offset = g.piece_offset(self.block.piece) + u64::from(self.block.offset);
        for span in g.spans(offset, u64::from(self.block.len)) {
            let slot = &storage.slots[span.file];
            if slot.zeros {
                // A pad file's share of the block: read and dropped (the piece hash covers
                // zeros there, whatever the peer sent).
                let mut sink = [0u8; 1024];
                let mut left = span.len as usize;
                while left > 0 {
                    let n = left.min(sink.len());
                    src.read_into(&mut sink[..n])?;
                    left -= n;
                }
                continue;
            }
            let Some(map) = slot.map.as_ref() else {
                return Err(io::Error::other("no map for a wanted piece's file"));
            };
            let at = slot.map_delta + span.file_offset;
            // Spans lie within the file, and the map covers the whole file (its length was
            // fixed by posix_fallocate before mapping).
            if at + span.len > map.len() as u64 {
                return Err(io::Error::other("block outside its file's map"));
            }
            // SAFETY: the range is inside the mapping (checked just above). This claim is the
            // only right to write the block: the compare-and-swap in `Storage::claim` lets one
            // holder at a time, and a piece is hashed (the only other reference into the map)
            // only once all its blocks are written, after which none can be claimed until the
            // session's Writer frees them. No other Rust reference aliases these bytes.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().add(at as usize), span.len as usize)
            };
            src.read_into(dst)?;
        }
        self.slot.store(WRITTEN, Ordering::Release);
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.slot.store(FREE, Ordering::Release);
    }
}

/// A source of exact byte counts: a peer connection's receive buffer, or a slice in tests.
pub trait ReadInto {
    /// Fills all of `dst` or fails.
    fn read_into(&mut self, dst: &mut [u8]) -> io::Result<()>;
}

impl ReadInto for &[u8] {
    fn read_into(&mut self, dst: &mut [u8]) -> io::Result<()> {
        io::Read::read_exact(self, dst)
    }
}

/// A file's length and modification time, to notice another program changing it.
type Stamp = Option<(u64, SystemTime)>;

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("files", &self.slots.len())
            .finish()
    }
}

/// Opens a directory handle on `root` (following a link there: the user named it).
fn open_root(root: &Path) -> Result<File, Error> {
    // The parent of a bare file name (`create data.bin`) is the empty path: the current
    // directory, which `open("")` would refuse.
    let root = if root.as_os_str().is_empty() {
        Path::new(".")
    } else {
        root
    };
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .map_err(|e| Error::io(root, e))
}

/// `openat(dir, name, flags)`, for names from the torrent (already sanitised: one normal
/// path element each).
fn openat(dir: &File, name: &std::ffi::OsStr, flags: libc::c_int) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let c = std::ffi::CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a descriptor we own and a valid NUL-terminated name; on success the returned
    // descriptor is new and ours, so `File` may own it.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, 0o666) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: see above.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

fn mkdirat(dir: &File, name: &std::ffi::OsStr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(name.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a descriptor we own and a valid NUL-terminated name.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o777) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens the data file `rel` below the directory handle `root`, one path element at a time
/// (`openat` with `O_NOFOLLOW`): no element may be a symbolic link, so a link planted in the
/// tree, or a directory swapped for one while we work, cannot lead reads or writes out of
/// it. Directories are created on the way when `undo` is given (a download), and recorded
/// there. The file must be a regular file (a FIFO or device planted where a data file
/// belongs would block or misbehave: it is opened non-blocking, which regular files ignore,
/// and refused), and a file we write must have no other names (writing through a hard link
/// would change another file). Read-only, a missing file is `Ok(None)`.
fn open_below(
    root: &File,
    root_path: &Path,
    rel: &Path,
    mut undo: Option<&mut Undo>,
) -> Result<Option<File>, Error> {
    let write = undo.is_some();
    let mut path = root_path.to_path_buf();
    // openat would reach deeper than PATH_MAX, but the paths we print could not be opened
    // by anyone else.
    let full = root_path.join(rel);
    if full.as_os_str().len() >= libc::PATH_MAX as usize {
        return Err(Error::io(
            &full,
            io::Error::from_raw_os_error(libc::ENAMETOOLONG),
        ));
    }
    let mut dir: Option<File> = None;
    let mut elements = rel.components().peekable();
    while let Some(element) = elements.next() {
        let name = element.as_os_str();
        path.push(name);
        let parent = dir.as_ref().unwrap_or(root);
        let fail = |e: io::Error, path: &Path| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::Symlink(path.to_path_buf()),
            Some(libc::ENXIO) => Error::NotAFile(path.to_path_buf()),
            _ => Error::io(path, e),
        };
        if elements.peek().is_some() {
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let opened = match openat(parent, name, flags) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && write => {
                    match mkdirat(parent, name) {
                        Ok(()) => {
                            if let Some(u) = undo.as_deref_mut() {
                                u.dirs.push(path.clone());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Error::io(&path, e)),
                    }
                    openat(parent, name, flags)
                }
                other => other,
            };
            dir = Some(match opened {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                // O_NOFOLLOW with O_DIRECTORY reports a link as "not a directory".
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    let link = fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink());
                    return Err(if link {
                        Error::Symlink(path)
                    } else {
                        Error::NotADirectory(path)
                    });
                }
                Err(e) => return Err(fail(e, &path)),
            });
            continue;
        }
        let base = libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let file = if write {
            // Exclusive first, to know whether this run made the file.
            match openat(
                parent,
                name,
                base | libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            ) {
                Ok(f) => {
                    if let Some(u) = undo.as_deref_mut() {
                        u.files.push(path.clone());
                    }
                    f
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    openat(parent, name, base | libc::O_RDWR).map_err(|e| fail(e, &path))?
                }
                Err(e) => return Err(fail(e, &path)),
            }
        } else {
            match openat(parent, name, base | libc::O_RDONLY) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(fail(e, &path)),
            }
        };
        let meta = file.metadata().map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            return Err(Error::NotAFile(path));
        }
        if write && meta.nlink() > 1 {
            return Err(Error::HardLinked(path));
        }
        return Ok(Some(file));
    }
    Err(Error::NotAFile(path))
}

/// What `create_selected` made, so that a failure can take it back and leave the disk as it
/// found it: files it created, files it extended (with their old length), directories. A
/// run that ends without verifying anything takes it back too ([`Undo::undo`]): its files
/// hold nothing but zeros.
#[derive(Default)]
pub struct Undo {
    files: Vec<PathBuf>,
    extended: Vec<(File, u64)>,
    dirs: Vec<PathBuf>,
}

impl Undo {
    pub fn undo(self) {
        for path in &self.files {
            let _ = fs::remove_file(path);
        }
        for (file, len) in &self.extended {
            // A failed reservation may have left blocks past the end without moving it;
            // growing by a byte and shrinking back makes the file system free them all.
            let _ = file.set_len(len + 1);
            let _ = file.set_len(*len);
        }
        for dir in self.dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// How many data files may stay open: the open-file limit less room for sockets and the
/// rest. A torrent of more files keeps only maps.
fn descriptor_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 512;
    }
    usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .saturating_sub(512)
        .max(64)
}

/// Bytes free for us on the file system holding `dir`, if it can be asked.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a buffer of the right type that
    // statvfs fills completely when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Reserves real blocks for `[0, len)`. A sparse file would let the map fault on a full disk.
fn allocate(file: &File, path: &Path, len: u64) -> Result<(), Error> {
    allocate_range(file, path, 0, len)
}

fn allocate_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), Error> {
    let too_big = || Error::NoSpace {
        path: path.to_path_buf(),
        needed: len,
    };
    let off = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let Ok(len_off) = libc::off_t::try_from(len) else {
        return Err(too_big());
    };
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain FFI call on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), off, len_off) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(Error::NoSpace {
            path: path.to_path_buf(),
            needed: len,
        }),
        rc => Err(Error::io(path, io::Error::from_raw_os_error(rc))),
    }
}

/// The file holding the boundary bytes of unselected files, opened when first needed.
struct Spill<'a> {
    path: &'a Path,
    file: Option<File>,
}

/// The slot of an unselected file: backed by the spill file where a wanted piece needs its
/// bytes, by nothing otherwise.
fn spill_slot(
    g: &Geometry,
    file: usize,
    wanted: &[bool],
    spill: &mut Spill,
    layout: &Layout,
    root: &File,
    undo: &mut Undo,
) -> Result<FileSlot, Error> {
    let spill_path = spill.path;
    let start = g.file_start(file);
    let len = g.file_len(file);
    let ranges: Vec<(u64, u64)> = g
        .pieces_of_file(file)
        .filter(|&p| wanted[p as usize])
        .filter_map(|p| g.piece(p))
        .flat_map(|p| g.spans(g.piece_offset(p), u64::from(g.piece_len(p))))
        .filter(|s| s.file == file)
        .map(|s| (s.file_offset, s.len))
        .collect();
    if ranges.is_empty() {
        return Ok(FileSlot::plain(layout.full_path(file), None, None));
    }
    if spill.file.is_none() {
        let rel = Path::new(spill_path.file_name().unwrap_or_default());
        let f = open_below(root, &layout.root, rel, Some(undo))?
            .ok_or_else(|| Error::NotAFile(spill_path.to_path_buf()))?;
        let total = g.total_len();
        if f.metadata().map_err(|e| Error::io(spill_path, e))?.len() < total {
            f.set_len(total).map_err(|e| Error::io(spill_path, e))?;
        }
        spill.file = Some(f);
    }
    let f = spill.file.as_ref().expect("opened above");
    for (off, n) in ranges {
        allocate_range(f, spill_path, start + off, n)?;
    }
    let page = page_size();
    let map_start = start / page * page;
    let map_delta = start - map_start;
    let map = memmap2::MmapOptions::new()
        .offset(map_start)
        .len((map_delta + len) as usize)
        .map_raw(f)
        .map_err(|e| Error::io(spill_path, e))?;
    Ok(FileSlot {
        path: spill_path.to_path_buf(),
        file: Some(f.try_clone().map_err(|e| Error::io(spill_path, e))?),
        map: Some(map),
        base: start,
        map_delta,
        zeros: false,
    })
}

impl Storage {
    #[cfg(test)]
    /// Opens (creating as needed) every file for download: directories made, space reserved,
    /// files mapped. Existing data is kept; a file larger than the torrent says is refused.
    pub fn create(layout: &Layout, geometry: &Geometry) -> Result<(Arc<Storage>, Writer), Error> {
        Storage::create_selected(layout, geometry, None).map(|(s, w, _)| (s, w))
    }

    /// Like [`Storage::create`] for a selection of files: unselected files are not created.
    /// Their share of the pieces they split with selected files goes to the `spill` file
    /// (sparse; only those ranges are allocated), so no unselected name appears on disk.
    pub fn create_selected(
        layout: &Layout,
        geometry: &Geometry,
        selection: Option<(&[bool], &Path)>,
    ) -> Result<(Arc<Storage>, Writer, Undo), Error> {
        let wanted = selection.map(|(sel, _)| geometry.pieces_touching(sel));
        let is_selected = |i: usize| selection.is_none_or(|(sel, _)| sel[i]);
        // Check the space first: some file systems (ext4) keep what a failed reservation
        // took, and a full disk is best refused before anything is written.
        if let Some(free) = free_space(&layout.root) {
            let mut needed = 0u64;
            let mut first_short = None;
            for i in (0..layout.files.len()).filter(|&i| is_selected(i) && !layout.is_pad(i)) {
                let have = fs::symlink_metadata(layout.full_path(i)).map_or(0, |m| m.len());
                needed += geometry.file_len(i).saturating_sub(have);
                if needed > free && first_short.is_none() {
                    first_short = Some(i);
                }
            }
            if let Some(i) = first_short {
                // Named by the first file that does not fit.
                return Err(Error::NoSpace {
                    path: layout.full_path(i),
                    needed,
                });
            }
        }
        let mut undo = Undo::default();
        match Storage::open_for_download(layout, geometry, selection, wanted.as_deref(), &mut undo)
        {
            Ok((slots, root)) => {
                let root = Some(root);
                let storage = Arc::new(Storage {
                    geometry: geometry.clone(),
                    slots,
                    known_good: OnceLock::new(),
                    claims: Claims::new(geometry),
                    root,
                });
                let writer = Writer {
                    storage: Arc::clone(&storage),
                };
                Ok((storage, writer, undo))
            }
            Err(e) => {
                undo.undo();
                Err(e)
            }
        }
    }

    fn open_for_download(
        layout: &Layout,
        geometry: &Geometry,
        selection: Option<(&[bool], &Path)>,
        wanted: Option<&[bool]>,
        undo: &mut Undo,
    ) -> Result<(Vec<FileSlot>, File), Error> {
        let root = open_root(&layout.root)?;
        let many = layout.files.len() > descriptor_budget();
        let mut slots = Vec::with_capacity(layout.files.len());
        let mut spill = Spill {
            path: selection.map_or(Path::new(""), |(_, p)| p),
            file: None,
        };
        for (i, rel) in layout.files.iter().enumerate() {
            if layout.is_pad(i) {
                slots.push(FileSlot::zeros(layout.full_path(i)));
                continue;
            }
            if let (Some((sel, _)), Some(wanted)) = (selection, wanted)
                && !sel[i]
            {
                slots.push(spill_slot(
                    geometry, i, wanted, &mut spill, layout, &root, undo,
                )?);
                continue;
            }
            let path = layout.full_path(i);
            let file = open_below(&root, &layout.root, rel, Some(undo))?
                .ok_or_else(|| Error::NotAFile(path.clone()))?;
            let expected = geometry.file_len(i);
            let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
            let created = undo.files.last() == Some(&path);
            if !created && len < expected {
                let again = file.try_clone().map_err(|e| Error::io(&path, e))?;
                undo.extended.push((again, len));
            }
            if len > expected {
                return Err(Error::LargerThanTorrent {
                    path,
                    len,
                    expected,
                });
            }
            allocate(&file, &path, expected)?;
            let map = if expected > 0 {
                Some(MmapRaw::map_raw(&file).map_err(|e| Error::io(&path, e))?)
            } else {
                None
            };
            // A torrent of more files than we may keep open works through its maps alone;
            // a map needs no descriptor once made.
            let keep = map.is_none() || !many;
            slots.push(FileSlot::plain(path, keep.then_some(file), map));
        }
        Ok((slots, root))
    }

    /// Opens existing files read-only (verify, seed). Missing files are allowed: their pieces
    /// simply fail to verify.
    pub fn open_existing(layout: &Layout, geometry: &Geometry) -> Result<Storage, Error> {
        let many = layout.files.len() > descriptor_budget();
        let mut slots = Vec::with_capacity(layout.files.len());
        // No directory at all: every file is missing.
        let root = match open_root(&layout.root) {
            Ok(r) => Some(r),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        for (i, rel) in layout.files.iter().enumerate() {
            let path = layout.full_path(i);
            if layout.is_pad(i) {
                slots.push(FileSlot::zeros(path));
                continue;
            }
            let file = match &root {
                Some(root) => open_below(root, &layout.root, rel, None)?,
                None => None,
            };
            // Map only a file of exactly the expected length, so every span of the
            // geometry lies inside its map. Others are read with pread (and fail cleanly).
            let expected = geometry.file_len(i);
            let map = file
                .as_ref()
                .filter(|f| expected > 0 && f.metadata().is_ok_and(|m| m.len() == expected))
                .and_then(|f| memmap2::MmapOptions::new().map_raw_read_only(f).ok());
            let file = if many && map.is_some() { None } else { file };
            slots.push(FileSlot::plain(path, file, map));
        }
        Ok(Storage {
            geometry: geometry.clone(),
            slots,
            known_good: OnceLock::new(),
            claims: Claims::default(),
            root: None,
        })
    }

    fn stamp(&self, file: usize) -> Stamp {
        let slot = &self.slots[file];
        if slot.zeros {
            return Some((0, SystemTime::UNIX_EPOCH));
        }
        let meta = match &slot.file {
            Some(f) => f.metadata().ok()?,
            // Kept open as a map only (a torrent of very many files): by name.
            None if slot.map.is_some() => fs::symlink_metadata(&slot.path).ok()?,
            None => return None,
        };
        Some((meta.len(), meta.modified().ok()?))
    }

    /// Records every file's size and modification time once all the data is verified (a
    /// seeder after its check, a download once complete). Later, [`Storage::unchanged`] tells
    /// cheaply whether a piece may still be trusted.
    pub fn mark_known_good(&self) {
        let stamps = (0..self.slots.len()).map(|i| self.stamp(i)).collect();
        let _ = self.known_good.set(stamps);
    }

    /// Whether the files holding `piece` are as they were at [`Storage::mark_known_good`]:
    /// same length, same modification time. Anything else (never marked, a file rewritten or
    /// truncated by another program) means the piece must be hash-checked again.
    pub fn unchanged(&self, piece: PieceIndex) -> bool {
        let Some(good) = self.known_good.get() else {
            return false;
        };
        let g = &self.geometry;
        g.spans(g.piece_offset(piece), u64::from(g.piece_len(piece)))
            .all(|span| good[span.file].is_some() && self.stamp(span.file) == good[span.file])
    }

    /// Removes the file `name` from the download directory opened at start (`unlinkat`),
    /// never through a path that may have been redirected since.
    pub fn remove_in_root(&self, name: &str) -> io::Result<()> {
        let root = self
            .root
            .as_ref()
            .ok_or_else(|| io::Error::other("no download directory"))?;
        let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: a descriptor we own and a valid NUL-terminated name; no memory is kept.
        let rc = unsafe { libc::unlinkat(root.as_raw_fd(), name.as_ptr(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Gives `file` the executable bits (BEP 47 `x`) where it is readable: `r` becomes `rx`
    /// for owner, group and others alike, so the umask the file was made under still rules.
    pub fn make_executable(&self, file: usize) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let slot = &self.slots[file];
        let Some(f) = slot.file.as_ref() else {
            return Ok(());
        };
        let meta = f.metadata().map_err(|e| Error::io(&slot.path, e))?;
        let mode = meta.permissions().mode();
        let wanted = mode | ((mode & 0o444) >> 2);
        if wanted != mode {
            f.set_permissions(fs::Permissions::from_mode(wanted))
                .map_err(|e| Error::io(&slot.path, e))?;
        }
        Ok(())
    }

    /// Makes the symbolic link `rel` (below the download directory) holding `text`, walking
    /// to it one directory at a time without following links, as data files are opened. An
    /// existing link with the same text is kept; anything else in the way is an error.
    pub fn make_link(&self, rel: &Path, text: &Path) -> Result<(), Error> {
        use std::os::unix::ffi::OsStrExt;
        let root = self
            .root
            .as_ref()
            .ok_or_else(|| Error::io(rel, io::Error::other("no download directory")))?;
        let mut elements: Vec<&std::ffi::OsStr> = rel.iter().collect();
        let Some(name) = elements.pop() else {
            return Err(Error::io(rel, io::Error::other("empty link path")));
        };
        let mut dir: Option<File> = None;
        for e in elements {
            let parent = dir.as_ref().unwrap_or(root);
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let opened = match openat(parent, e, flags) {
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    match mkdirat(parent, e) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(err) => return Err(Error::io(rel, err)),
                    }
                    openat(parent, e, flags)
                }
                other => other,
            };
            dir = Some(opened.map_err(|err| Error::io(rel, err))?);
        }
        let parent = dir.as_ref().unwrap_or(root);
        let c_name = std::ffi::CString::new(name.as_bytes()).map_err(io::Error::other);
        let c_text = std::ffi::CString::new(text.as_os_str().as_bytes()).map_err(io::Error::other);
        let (c_name, c_text) = match (c_name, c_text) {
            (Ok(n), Ok(t)) => (n, t),
            (Err(e), _) | (_, Err(e)) => return Err(Error::io(rel, e)),
        };
        // SAFETY: a descriptor we own and valid NUL-terminated strings.
        if unsafe { libc::symlinkat(c_text.as_ptr(), parent.as_raw_fd(), c_name.as_ptr()) } == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::AlreadyExists {
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: as above; `buf` is writable for its length.
            let n = unsafe {
                libc::readlinkat(
                    parent.as_raw_fd(),
                    c_name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n >= 0 && &buf[..n as usize] == text.as_os_str().as_bytes() {
                return Ok(());
            }
        }
        Err(Error::io(rel, err))
    }

    /// How many of the torrent's files exist (opened read-only: verify, seed).
    pub fn files_present(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.file.is_some() || s.map.is_some() || s.zeros)
            .count()
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Wins the right to write `block` (an aligned block), or `None` when it is written, being
    /// written by another connection, or the files are not open for writing.
    pub fn claim(&self, block: BlockRef) -> Option<Claim<'_>> {
        let slot = self.claims.slot(block)?;
        let mut since = None;
        loop {
            match slot.compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(Claim {
                        storage: self,
                        block,
                        slot,
                    });
                }
                Err(PREPARING) => {
                    if since.get_or_insert_with(std::time::Instant::now).elapsed() > PREPARE_WAIT {
                        return None;
                    }
                    std::thread::yield_now();
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether `block` is written (or being written) by someone: a claim would fail.
    pub fn taken(&self, block: BlockRef) -> bool {
        self.claims
            .slot(block)
            .is_none_or(|s| matches!(s.load(Ordering::Acquire), WRITING | WRITTEN))
    }

    /// Lays down a piece's page-cache pages when its first block lands, by writing zeros with
    /// `pwrite` over the blocks nobody has written yet (and over `own`, the block whose claim
    /// the caller holds), a chunk at a time. Once per piece; later calls return at once.
    ///
    /// Why: a block written through the map into a page that is not in the page cache costs
    /// a page fault that reads the page first (zero-filled from the reserved extent, with
    /// readahead dragging in more of them), and ext4's per-page `page_mkwrite`. A large
    /// `pwrite` instead makes whole large folios in one go, which the map's write faults then
    /// only map, and leaves them in the CPU cache for the blocks about to be copied in.
    /// Measured on 1 GiB in 256 KiB pieces: 0.27 s of system time, against 0.7-1.7 s when
    /// faulting in with MADV_POPULATE_WRITE and 0.4-0.8 s for `pwrite` of each 16 KiB block.
    /// Done by the receiving thread itself: a separate thread running ahead cost more CPU
    /// and time (by hand, 1 GiB: 1.9 against 1.6 CPU s), as its zeros left the cache before
    /// the data came.
    ///
    /// A block is zeroed only while this holds it (claimed as PREPARING from FREE), so bytes
    /// another connection wrote are never touched; a connection that wants the block meanwhile
    /// waits the few microseconds it takes. Only a hint otherwise: a failed write changes
    /// nothing.
    fn prepare(&self, piece: PieceIndex, own: Option<u32>) {
        let Some(flag) = self.claims.prepared.get(piece.usize()) else {
            return;
        };
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        let slots = self.claims.piece(piece);
        let g = &self.geometry;
        let blocks = g.blocks_in(piece).min(slots.len() as u32);
        let mut held = Vec::with_capacity(PREPARE_CHUNK as usize);
        for chunk in (0..blocks).step_by(PREPARE_CHUNK as usize) {
            let end = (chunk + PREPARE_CHUNK).min(blocks);
            held.clear();
            held.extend((chunk..end).filter(|&i| {
                Some(i) == own
                    || slots[i as usize]
                        .compare_exchange(FREE, PREPARING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
            }));
            // Zero each run of consecutive held blocks with as few writes as it takes.
            for run in held.chunk_by(|a, b| b - a == 1) {
                let (first, last) = (run[0], run[run.len() - 1]);
                let start = u64::from(first * BLOCK_LEN);
                let stop = u64::from(((last + 1) * BLOCK_LEN).min(g.piece_len(piece)));
                self.write_zeros(g.piece_offset(piece) + start, stop - start);
            }
            for &i in held.iter().filter(|&&i| Some(i) != own) {
                slots[i as usize].store(FREE, Ordering::Release);
            }
        }
    }

    /// Writes zeros over torrent bytes `[offset, offset + len)` (see `Storage::prepare`).
    fn write_zeros(&self, offset: u64, len: u64) {
        static ZEROS: OnceLock<Box<[u8]>> = OnceLock::new();
        // Never written, so its pages are the kernel's shared zero page: no resident memory.
        let zeros = ZEROS.get_or_init(|| vec![0; (PREPARE_CHUNK * BLOCK_LEN) as usize].into());
        for span in self.geometry.spans(offset, len) {
            let slot = &self.slots[span.file];
            let Some(file) = slot.file.as_ref() else {
                slot.fill_map(span.file_offset, span.len, None);
                continue;
            };
            let mut at = slot.base + span.file_offset;
            let mut left = span.len;
            while left > 0 {
                let n = left.min(zeros.len() as u64);
                if file.write_all_at(&zeros[..n as usize], at).is_err() {
                    return;
                }
                at += n;
                left -= n;
            }
        }
    }

    /// Reads torrent bytes `[offset, offset + buf.len())` with `pread`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        for span in self.geometry.spans(offset, buf.len() as u64) {
            let slot = &self.slots[span.file];
            let start = span.range_offset as usize;
            let dst = &mut buf[start..start + span.len as usize];
            if slot.zeros {
                dst.fill(0);
                continue;
            }
            let Some(file) = &slot.file else {
                if slot.fill_map(span.file_offset, span.len, Some(dst)) {
                    continue;
                }
                return Err(Error::io(
                    &slot.path,
                    io::Error::from(io::ErrorKind::NotFound),
                ));
            };
            file.read_exact_at(dst, slot.base + span.file_offset)
                .map_err(|e| Error::io(&slot.path, e))?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn read_block(&self, block: BlockRef, buf: &mut [u8]) -> Result<(), Error> {
        let offset = self.geometry.piece_offset(block.piece) + u64::from(block.offset);
        self.read(offset, &mut buf[..block.len as usize])
    }

    /// Runs `f` on a piece's bytes, or returns `None` if it cannot be read. A piece that lies
    /// in one mapped file is read in place (no copy); one that spans files (or pads) is
    /// gathered into `scratch` first.
    fn with_piece<T>(
        &self,
        piece: PieceIndex,
        scratch: &mut Vec<u8>,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Option<T> {
        let offset = self.geometry.piece_offset(piece);
        let len = self.geometry.piece_len(piece) as usize;
        let mut spans = self.geometry.spans(offset, len as u64);
        if let (Some(span), None) = (spans.next(), spans.next())
            && let Some(map) = &self.slots[span.file].map
            && self.slots[span.file].map_delta + span.file_offset + span.len <= map.len() as u64
        {
            let at = self.slots[span.file].map_delta + span.file_offset;
            // SAFETY: the range is inside the mapping (checked just above). Nothing in this
            // process writes it while the slice lives: in a download a piece is hashed once
            // all its blocks are written, and a written block cannot be claimed again until
            // the session's Writer reopens the piece after a failed hash (after this returns);
            // verify, create and seed have no claims at all. Another process changing the file changes what we hash,
            // which the hash check is there to catch; one truncating it raises SIGBUS, which
            // install_sigbus_guard turns into a clear error.
            let bytes = unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(at as usize), span.len as usize)
            };
            let out = f(bytes);
            // Verify, seed and resume hash every piece this way: without this, every page of
            // the torrent would stay mapped and counted in our resident memory.
            drop_pages(map, at, span.len);
            return Some(out);
        }
        scratch.resize(len, 0);
        self.read(offset, &mut scratch[..len]).ok()?;
        Some(f(&scratch[..len]))
    }

    /// SHA-1 of a piece, or `None` if it cannot be read.
    pub fn hash_piece(&self, piece: PieceIndex, scratch: &mut Vec<u8>) -> Option<[u8; 20]> {
        self.with_piece(piece, scratch, |bytes| Sha1::digest(bytes).into())
    }

    /// Whether a piece's data matches every hash `meta` has for it. Unreadable data is a bad
    /// piece.
    pub fn piece_matches(&self, piece: PieceIndex, meta: &Metainfo, scratch: &mut Vec<u8>) -> bool {
        self.with_piece(piece, scratch, |bytes| meta.piece_ok(piece, bytes))
            .unwrap_or(false)
    }

    /// Runs `f` on every piece, spread over `threads` threads; results in piece order.
    fn par_pieces<T: Send>(
        &self,
        threads: usize,
        f: impl Fn(PieceIndex, &mut Vec<u8>) -> T + Sync,
    ) -> Vec<T> {
        let count = self.geometry.piece_count();
        let next = AtomicU32::new(0);
        let mut parts: Vec<Vec<(u32, T)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| {
                        let mut scratch = Vec::new();
                        let mut done = Vec::new();
                        while let Some(piece) =
                            self.geometry.piece(next.fetch_add(1, Ordering::Relaxed))
                        {
                            done.push((piece.get(), f(piece, &mut scratch)));
                        }
                        done
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("hashing thread panicked"))
                .collect()
        });
        let mut all: Vec<(u32, T)> = parts.iter_mut().flat_map(std::mem::take).collect();
        all.sort_unstable_by_key(|(i, _)| *i);
        debug_assert_eq!(all.len(), count as usize);
        all.into_iter().map(|(_, v)| v).collect()
    }

    /// Checks every piece against the torrent's hashes; one flag per piece.
    pub fn verify_all(&self, meta: &Metainfo, threads: usize) -> Vec<bool> {
        self.par_pieces(threads, |piece, scratch| {
            self.piece_matches(piece, meta, scratch)
        })
    }

    /// Hashes every piece (torrent creation). Fails on the first unreadable range.
    pub fn hash_all(&self, threads: usize) -> Result<Vec<[u8; 20]>, Error> {
        let results = self.par_pieces(threads, |piece, scratch| {
            self.hash_piece(piece, scratch).ok_or(piece)
        });
        results
            .into_iter()
            .map(|r| {
                r.map_err(|piece| {
                    let offset = self.geometry.piece_offset(piece);
                    let file = self.geometry.spans(offset, 1).next().map_or(0, |s| s.file);
                    Error::io(
                        &self.slots[file].path,
                        io::Error::new(io::ErrorKind::UnexpectedEof, "file changed while hashing"),
                    )
                })
            })
            .collect()
    }
}

/// The session's handle on the download's write rights: it settles pieces nobody may write
/// (had or unwanted), frees the blocks of a piece that failed its hash, drops verified pieces'
/// pages and flushes. Not `Clone`: one owner.
#[derive(Debug)]
pub struct Writer {
    storage: Arc<Storage>,
}

impl Writer {
    /// Marks every block of `piece` written, so no connection writes it: pieces we have, and
    /// pieces of files not selected.
    pub fn settle(&mut self, piece: PieceIndex) {
        for b in self.storage.claims.piece(piece) {
            b.store(WRITTEN, Ordering::Relaxed);
        }
    }

    /// Frees every block of a piece that failed its hash check, so it can be fetched again.
    /// Call only once the piece is complete (all blocks written: no claim is in flight).
    pub fn reopen(&mut self, piece: PieceIndex) {
        for b in self.storage.claims.piece(piece) {
            b.store(FREE, Ordering::Release);
        }
        // Its pages stay prepared: they are in the page cache now.
    }

    /// Frees one written block that the picker did not take (its connection was dropped), so
    /// another copy can be written.
    pub fn unwrite(&mut self, block: BlockRef) {
        if let Some(slot) = self.storage.claims.slot(block) {
            let _ = slot.compare_exchange(WRITTEN, FREE, Ordering::Release, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn write_block(&mut self, block: BlockRef, data: &[u8]) {
        let claim = self.storage.claim(block).expect("block is free");
        claim.fill(&mut &data[..]).unwrap();
    }

    /// Drops the pages of a verified piece from our address space. The page cache keeps the
    /// data (dirty pages of a shared file mapping are written back, not discarded), so resident
    /// memory stays flat however large the torrent.
    pub fn release_piece(&mut self, piece: PieceIndex) {
        let g = &self.storage.geometry;
        for span in g.spans(g.piece_offset(piece), u64::from(g.piece_len(piece))) {
            let slot = &self.storage.slots[span.file];
            let Some(map) = slot.map.as_ref() else {
                continue;
            };
            drop_pages(map, slot.map_delta + span.file_offset, span.len);
        }
    }

    /// With `wait`, returns once the data is on stable storage (msync MS_SYNC: seconds for a
    /// large torrent on a slow disk); without, only starts the write-back (MS_ASYNC).
    pub fn flush(&mut self, wait: bool) -> Result<(), Error> {
        for slot in &self.storage.slots {
            if let Some(map) = &slot.map {
                let r = if wait { map.flush() } else { map.flush_async() };
                r.map_err(|e| Error::io(&slot.path, e))?;
            }
        }
        Ok(())
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).unwrap_or(4096).max(1)
}

/// Drops our page-table entries for the whole pages inside `[at, at + len)` of `map`. Only
/// whole pages are dropped, so a neighbouring piece's page is untouched (it would be faulted
/// back in anyway).
fn drop_pages(map: &MmapRaw, at: u64, len: u64) {
    let page = page_size();
    let start = at.div_ceil(page) * page;
    let end = (at + len) / page * page;
    if end > start {
        // SAFETY: MADV_DONTNEED on a shared file mapping only drops our page-table entries;
        // the data stays in the page cache (dirty pages are written back, not discarded). No
        // Rust reference into the map outlives its use (writes are raw copies, reads use
        // pread, hashing finishes before this call), so nothing observes the pages going.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "bitfetch-storage-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A scratch directory and an empty `out` inside it.
    fn with_out_dir(tag: &str) -> (PathBuf, PathBuf) {
        let dir = tmpdir(tag);
        let out = dir.join("out");
        fs::create_dir(&out).unwrap();
        (dir, out)
    }

    fn layout(root: &Path, names: &[&str]) -> Layout {
        Layout {
            pad: Vec::new(),
            root: root.to_path_buf(),
            files: names.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn writes_across_file_boundaries_and_reads_back() {
        let dir = tmpdir("span");
        let g = Geometry::new(16384, &[10_000, 0, 10_000], 2).unwrap();
        let (storage, mut w) =
            Storage::create(&layout(&dir, &["t/a", "t/empty", "t/b"]), &g).unwrap();
        let p0 = g.piece(0).unwrap();
        let block = g.block(p0, 0).unwrap();
        let data: Vec<u8> = (0..block.len).map(|i| (i % 251) as u8).collect();
        w.write_block(block, &data);
        let mut back = vec![0; block.len as usize];
        storage.read_block(block, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(fs::metadata(dir.join("t/empty")).unwrap().len(), 0);
        let a = fs::read(dir.join("t/a")).unwrap();
        assert_eq!(&a[..], &data[..10_000]);
        let b = fs::read(dir.join("t/b")).unwrap();
        assert_eq!(&b[..6384], &data[10_000..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_claim_per_block_until_the_piece_is_reopened() {
        let dir = tmpdir("claims");
        let g = Geometry::new(32768, &[70_000], 3).unwrap();
        let (storage, mut w) = Storage::create(&layout(&dir, &["c"]), &g).unwrap();
        let p0 = g.piece(0).unwrap();
        let b0 = g.block(p0, 0).unwrap();
        // Held: nobody else may write it.
        let held = storage.claim(b0).unwrap();
        assert!(storage.claim(b0).is_none());
        // Dropped unfinished (a connection broke mid-block): free again.
        drop(held);
        let data = vec![7u8; b0.len as usize];
        storage.claim(b0).unwrap().fill(&mut &data[..]).unwrap();
        assert!(storage.claim(b0).is_none(), "written blocks stay taken");
        // A fill that runs out of bytes leaves the block free, not half-claimed.
        let b1 = g.block(p0, 1).unwrap();
        assert!(storage.claim(b1).unwrap().fill(&mut &data[..100]).is_err());
        assert!(storage.claim(b1).is_some());
        // Reopened after a failed hash: every block of the piece is free.
        w.reopen(p0);
        assert!(storage.claim(b0).is_some());
        // Settled pieces (had, unwanted) are never writable; unwrite frees one block.
        let p2 = g.piece(2).unwrap();
        let last = g.block(p2, 0).unwrap();
        w.settle(p2);
        assert!(storage.claim(last).is_none());
        w.unwrite(last);
        assert!(storage.claim(last).is_some());
        // Read-only storage (seeding, verify) hands out no claims.
        let ro = Storage::open_existing(&layout(&dir, &["c"]), &g).unwrap();
        assert!(ro.claim(b0).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Prepares `piece` as if for the first time and returns its bytes.
    fn prepare_again(storage: &Storage, piece: PieceIndex) -> Vec<u8> {
        storage.claims.prepared[piece.usize()].store(false, Ordering::Relaxed);
        storage.prepare(piece, None);
        let g = storage.geometry();
        let mut bytes = vec![0; g.piece_len(piece) as usize];
        storage.read(g.piece_offset(piece), &mut bytes).unwrap();
        bytes
    }

    #[test]
    fn preparing_zeroes_only_blocks_nobody_wrote() {
        let dir = tmpdir("prepare");
        // Piece 1 (bytes 32768..65536) spans both files.
        let g = Geometry::new(32768, &[40_000, 30_000], 3).unwrap();
        fs::create_dir_all(dir.join("t")).unwrap();
        fs::write(dir.join("t/a"), vec![0xEE; 40_000]).unwrap();
        fs::write(dir.join("t/b"), vec![0xEE; 30_000]).unwrap();
        let (storage, _w) = Storage::create(&layout(&dir, &["t/a", "t/b"]), &g).unwrap();
        let p1 = g.piece(1).unwrap();
        let (b0, b1) = (g.block(p1, 0).unwrap(), g.block(p1, 1).unwrap());
        let data = vec![0x11u8; b1.len as usize];
        // The first fill prepares the piece (both blocks zeroed), then writes its block.
        storage.claim(b1).unwrap().fill(&mut &data[..]).unwrap();
        // Prepared again (as by another connection racing it): the written block stays.
        let piece = prepare_again(&storage, p1);
        assert!(piece[..16384].iter().all(|&b| b == 0), "free block zeroed");
        assert!(
            piece[16384..].iter().all(|&b| b == 0x11),
            "written block kept"
        );
        let mut others = vec![0; 32768];
        storage.read(0, &mut others).unwrap();
        assert!(others.iter().all(|&b| b == 0xEE), "piece 0 untouched");
        // Zeroed blocks are free again afterwards.
        assert!(storage.claim(b0).is_some());
        // A block held for preparing is not handed out; the wait for it is bounded.
        let slot = storage.claims.slot(b0).unwrap();
        slot.store(PREPARING, Ordering::Release);
        assert!(storage.claim(b0).is_none());
        slot.store(FREE, Ordering::Release);
        assert!(storage.claim(b0).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn preparing_zeroes_around_a_written_block() {
        let dir = tmpdir("prepare-gap");
        let g = Geometry::new(65536, &[65536], 1).unwrap();
        let (storage, _w) = Storage::create(&layout(&dir, &["g"]), &g).unwrap();
        let p0 = g.piece(0).unwrap();
        let b1 = g.block(p0, 1).unwrap();
        storage
            .claim(b1)
            .unwrap()
            .fill(&mut &vec![0x11u8; 16384][..])
            .unwrap();
        // Stale bytes in the free blocks on either side, then a second preparation.
        let file = OpenOptions::new().write(true).open(dir.join("g")).unwrap();
        file.write_all_at(&[0xEE; 16384], 0).unwrap();
        file.write_all_at(&[0xEE; 32768], 32768).unwrap();
        let piece = prepare_again(&storage, p0);
        assert!(piece[..16384].iter().all(|&b| b == 0), "block 0 zeroed");
        assert!(
            piece[16384..32768].iter().all(|&b| b == 0x11),
            "block 1 kept"
        );
        assert!(
            piece[32768..].iter().all(|&b| b == 0),
            "blocks 2 and 3 zeroed"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unselected_files_are_not_created_and_boundary_bytes_spill() {
        let dir = tmpdir("select");
        // Files of 10 000, 20 000 and 10 000 bytes; pieces of 16 KiB; only the middle wanted.
        let g = Geometry::new(16384, &[10_000, 20_000, 10_000], 3).unwrap();
        let l = layout(&dir, &["t/a", "t/b", "t/c"]);
        let spill = dir.join(".spill");
        let (storage, mut w, _) =
            Storage::create_selected(&l, &g, Some((&[false, true, false], &spill))).unwrap();
        assert!(!dir.join("t/a").exists() && !dir.join("t/c").exists());
        assert_eq!(fs::metadata(dir.join("t/b")).unwrap().len(), 20_000);
        // Piece 0 spans a (spilled) and b; write it and read it back whole.
        let p0 = g.piece(0).unwrap();
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 253) as u8).collect();
        w.write_block(g.block(p0, 0).unwrap(), &data);
        let mut back = vec![0; 16384];
        storage.read(0, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(&fs::read(dir.join("t/b")).unwrap()[..6384], &data[10_000..]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_symlinked_directory() {
        let (dir, out) = with_out_dir("symlink");
        let outside = dir.join("outside");
        fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, out.join("t")).unwrap();
        let g = Geometry::new(16384, &[10], 1).unwrap();
        let err = Storage::create(&layout(&out, &["t/a"]), &g).unwrap_err();
        assert!(matches!(err, Error::Symlink(_)), "{err}");
        std::os::unix::fs::symlink(outside.join("f"), out.join("f")).unwrap();
        let err = Storage::create(&layout(&out, &["f"]), &g).unwrap_err();
        assert!(matches!(err, Error::Symlink(_)), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory holding one file `a` with `contents`, and a torrent of one 10-byte file.
    fn one_file(tag: &str, contents: &[u8]) -> (PathBuf, Geometry) {
        let dir = tmpdir(tag);
        fs::write(dir.join("a"), contents).unwrap();
        (dir, Geometry::new(16384, &[10], 1).unwrap())
    }

    #[test]
    fn refuses_to_shrink_a_larger_file() {
        let (dir, g) = one_file("larger", &[7u8; 100]);
        let err = Storage::create(&layout(&dir, &["a"]), &g).unwrap_err();
        assert!(matches!(err, Error::LargerThanTorrent { .. }));
        assert_eq!(fs::read(dir.join("a")).unwrap(), vec![7u8; 100]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_changed_after_marking_is_no_longer_trusted() {
        let (dir, g) = one_file("stamp", b"0123456789");
        let s = Storage::open_existing(&layout(&dir, &["a"]), &g).unwrap();
        let p = g.piece(0).unwrap();
        assert!(!s.unchanged(p), "nothing is trusted before marking");
        s.mark_known_good();
        assert!(s.unchanged(p));
        // Another program rewrites a byte: the modification time moves.
        let f = OpenOptions::new().write(true).open(dir.join("a")).unwrap();
        let before = f.metadata().unwrap().modified().unwrap();
        f.set_modified(before + std::time::Duration::from_secs(1))
            .unwrap();
        f.write_at(b"X", 3).unwrap();
        assert!(!s.unchanged(p));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_data_is_kept() {
        let (dir, g) = one_file("keep", b"hello");
        let (_s, _w) = Storage::create(&layout(&dir, &["a"]), &g).unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"hello\0\0\0\0\0");
        fs::remove_dir_all(&dir).unwrap();
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_where_a_data_file_belongs_is_refused_at_once() {
        let dir = tmpdir("fifo");
        mkfifo(&dir.join("a"));
        let g = Geometry::new(16384, &[10], 1).unwrap();
        // Neither read-only (verify, seed) nor for writing may block on it.
        let err = Storage::open_existing(&layout(&dir, &["a"]), &g).unwrap_err();
        assert!(matches!(err, Error::NotAFile(_)), "{err}");
        let err = Storage::create(&layout(&dir, &["a"]), &g).unwrap_err();
        assert!(matches!(err, Error::NotAFile(_)), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hard_linked_file_is_not_written_through() {
        let (dir, g) = one_file("hardlink", b"other");
        fs::hard_link(dir.join("a"), dir.join("elsewhere")).unwrap();
        let err = Storage::create(&layout(&dir, &["a"]), &g).unwrap_err();
        assert!(matches!(err, Error::HardLinked(_)), "{err}");
        assert_eq!(fs::read(dir.join("elsewhere")).unwrap(), b"other");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torrent_larger_than_the_free_space_is_refused_before_anything_is_made() {
        let dir = tmpdir("nospace");
        // 1 PiB: more than any test machine has free.
        let big = 1u64 << 50;
        let g = Geometry::new(1 << 24, &[10, big], big.div_ceil(1 << 24) + 1).unwrap();
        let err = Storage::create(&layout(&dir, &["t/a", "t/b"]), &g).unwrap_err();
        assert!(
            matches!(err, Error::NoSpace { needed, .. } if needed > big),
            "{err}"
        );
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing created");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_half_way_takes_back_what_it_made() {
        let dir = tmpdir("undo");
        fs::create_dir(dir.join("t")).unwrap();
        fs::write(dir.join("t/kept"), b"12").unwrap();
        mkfifo(&dir.join("t/c"));
        let g = Geometry::new(16384, &[10, 10, 10, 10], 1).unwrap();
        let names = ["t/new/a", "t/kept", "t/b", "t/c"];
        let err = Storage::create(&layout(&dir, &names), &g).unwrap_err();
        assert!(matches!(err, Error::NotAFile(_)), "{err}");
        assert!(!dir.join("t/new").exists(), "the directory it made is gone");
        assert!(!dir.join("t/b").exists(), "the file it made is gone");
        assert_eq!(fs::read(dir.join("t/kept")).unwrap(), b"12", "shrunk back");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_removed_through_the_directory_opened_at_start() {
        let (dir, out) = with_out_dir("unlinkat");
        let g = Geometry::new(16384, &[10], 1).unwrap();
        let (storage, _w) = Storage::create(&layout(&out, &["a"]), &g).unwrap();
        fs::write(out.join("spill"), b"x").unwrap();
        // The directory is swapped for a link to somewhere else holding the same name.
        let elsewhere = dir.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::write(elsewhere.join("spill"), b"keep").unwrap();
        fs::rename(&out, dir.join("moved")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &out).unwrap();
        storage.remove_in_root("spill").unwrap();
        assert_eq!(fs::read(elsewhere.join("spill")).unwrap(), b"keep");
        assert!(!dir.join("moved/spill").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
