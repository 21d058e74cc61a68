//! Magnet links (`magnet:?xt=urn:btih:…`, BEP 9 and BEP 53, and what clients do in practice):
//! parsing a link from a stranger, and making one from a torrent.
//!
//! A magnet link carries the info hash and hints: a display name, trackers, peer addresses, web
//! seeds and a file selection. Everything but the info hash is a hint from whoever wrote the
//! link, so it is bounded and checked like any other input from outside:
//!
//! - The whole link is at most [`MAX_URI_LEN`] bytes, and each kind of value is counted against
//!   its own cap ([`MAX_TRACKERS`], [`MAX_PEERS`], [`MAX_WEB_SEEDS`], [`MAX_SELECT_RANGES`]); a
//!   link over a cap is refused rather than cut short, so nothing is dropped silently.
//! - Percent-decoding is strict: a `%` not followed by two hexadecimal digits is an error (and
//!   so is text that is not UTF-8 after decoding, except in the display name). A `+` is a
//!   literal `+` (RFC 3986 gives it no meaning in a query, and tracker URLs may contain one),
//!   except in `dn`: many sites write the display name form-encoded, with `+` for a space, and
//!   libtorrent reads it so. The display name is only shown until the metadata arrives, so
//!   reading `+` as a space there costs nothing when it was meant literally. [`Magnet::to_uri`]
//!   escapes both (`%20`, `%2B`), so its links read back the same either way.
//! - Keys may carry a numeric suffix (`tr.1`, `dn.2`); it is dropped, as libtorrent does. In
//!   the magnet-URI draft the suffix numbers the items of a link that names several files
//!   (`xt.1` goes with `dn.1`); it does not group trackers into tiers, and aria2, for one,
//!   does not read `tr.N` at all. Every tracker is therefore its own tier, in the order of the
//!   link ([`Magnet::tracker_tiers`]), and [`Magnet::to_uri`] writes plain `tr` keys.
//! - Repeated values are kept once (the first time they appear); an empty value is ignored;
//!   unknown keys are ignored without decoding their values.
//! - `xt=urn:btih:` takes 40 hexadecimal or 32 base32 characters. A link that names two
//!   different v1 info hashes is refused. `xt=urn:btmh:1220` takes the 64 hexadecimal digits
//!   of a v2 (SHA-256) info hash (BEP 52); a v2-only link's swarm is named by its first 20
//!   bytes, a hybrid link (both) uses its `btih`, and the metadata must match every hash given.
//! - `dn` goes through [`path_safety::sanitize_element`] like a torrent's name: separators and
//!   control characters become `_`, and a name that climbs out (`..`) or is absolute is refused.
//!   It is cut to [`path_safety::MAX_ELEMENT_BYTES`] first (it is only a label).
//! - `x.pe` is `a.b.c.d:port`, `[IPv6]:port` or `host:port` (kept as text, resolved later).
//! - `so` (BEP 53) is a list of zero-based file indices and ranges, `0,2,4-6`, the syntax of
//!   `--select` (which counts from 1, as `--list` shows files). The indices can only be checked
//!   against the torrent's files once the metadata is in: [`FileSelection::mask`].

// Nothing outside the tests and fuzz targets calls this yet: the session and the CLI are wired
// to it next.


use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use crate::metainfo::{self, Metainfo};
use crate::path_safety;

/// Longest link accepted, in bytes (a link is a command-line argument: Linux takes 128 KiB).
pub const MAX_URI_LEN: usize = 64 * 1024;
/// Most distinct trackers (`tr`) in one link.
pub const MAX_TRACKERS: usize = 200;
/// Most distinct peer addresses (`x.pe`) in one link.
pub const MAX_PEERS: usize = 200;
/// Most distinct web seeds (`ws`) in one link.
pub const MAX_WEB_SEEDS: usize = 50;
/// Longest tracker or web seed URL, in bytes after decoding.
pub const MAX_URL_LEN: usize = 2048;
/// Most indices and ranges in the `so` values of one link, before they are merged.
pub const MAX_SELECT_RANGES: usize = 1000;
/// Highest file index `so` may name (a torrent has at most [`metainfo::MAX_FILES`] files).
pub const MAX_FILE_INDEX: u32 = metainfo::MAX_FILES as u32 - 1;
/// Longest host name in `x.pe` (DNS: 253 characters).
const MAX_HOST_LEN: usize = 253;
/// How much of a bad value an error message quotes.
const QUOTE_CHARS: usize = 60;

/// Why a magnet link was refused. Each message names the problem and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    NotMagnet,
    TooLong {
        len: usize,
    },
    ControlCharacter,
    BadEscape {
        key: &'static str,
        escape: String,
    },
    NotUtf8 {
        key: &'static str,
    },
    NoInfoHash,
    BadV2Hash,
    BadInfoHash {
        value: String,
    },
    TwoInfoHashes,
    TooMany {
        key: &'static str,
        max: usize,
    },
    BadUrl {
        key: &'static str,
        value: String,
    },
    UrlTooLong {
        key: &'static str,
        len: usize,
    },
    BadPeer {
        value: String,
        reason: &'static str,
    },
    BadSelection {
        value: String,
    },
    UnsafeName(path_safety::Error),
    SelectionOutOfRange {
        index: u32,
        files: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotMagnet => write!(f, "not a magnet link: it must start with 'magnet:?'"),
            Error::TooLong { len } => write!(
                f,
                "magnet link is {len} bytes long, over the {MAX_URI_LEN}-byte limit; use the .torrent file instead"
            ),
            Error::ControlCharacter => write!(
                f,
                "magnet link contains a control character (a line break?); give it as one line"
            ),
            Error::BadEscape { key, escape } => write!(
                f,
                "magnet link: bad percent escape '{}' in {key}= (a % must be followed by two hexadecimal digits; a literal % is written %25)",
                quote(escape)
            ),
            Error::NotUtf8 { key } => write!(
                f,
                "magnet link: {key}= is not UTF-8 text once percent-decoded; check the link"
            ),
            Error::NoInfoHash => write!(
                f,
                "magnet link has no BitTorrent info hash (xt=urn:btih:...); check that the whole link was copied"
            ),
            Error::BadV2Hash => write!(
                f,
                "magnet link: a BitTorrent v2 info hash (xt=urn:btmh:) must be 1220 and 64 hexadecimal digits (SHA-256)"
            ),
            Error::BadInfoHash { value } => write!(
                f,
                "magnet link: info hash '{}' is not 40 hexadecimal or 32 base32 characters; check that the whole link was copied",
                quote(value)
            ),
            Error::TwoInfoHashes => write!(
                f,
                "magnet link names two different torrents (two xt=urn:btih: values); use one link per torrent"
            ),
            Error::TooMany { key, max } => write!(
                f,
                "magnet link has more than {max} distinct {key}= values; remove some"
            ),
            Error::BadUrl { key, value } => write!(
                f,
                "magnet link: {key}= value '{}' contains a space or control character; check the link",
                quote(value)
            ),
            Error::UrlTooLong { key, len } => write!(
                f,
                "magnet link: a {key}= value is {len} bytes long, over {MAX_URL_LEN}; remove it"
            ),
            Error::BadPeer { value, reason } => write!(
                f,
                "magnet link: x.pe={}: {reason}; expected a.b.c.d:port, [IPv6]:port or host:port",
                quote(value)
            ),
            Error::BadSelection { value } => write!(
                f,
                "magnet link: so={} is not a list of file indices and ranges counted from 0 (like 0,2,4-6, each at most {MAX_FILE_INDEX}, at most {MAX_SELECT_RANGES} of them)",
                quote(value)
            ),
            Error::UnsafeName(e) => write!(
                f,
                "magnet link: unsafe display name (dn=): {e}; remove dn= from the link"
            ),
            Error::SelectionOutOfRange { index, files } => write!(
                f,
                "magnet link selects file {index} (so=, counted from 0) but the torrent has {files} files; fix or remove so="
            ),
        }
    }
}

impl std::error::Error for Error {}

/// A bad value as an error message quotes it: escaped for the terminal, and cut short.
fn quote(s: &str) -> String {
    let cut: String = s.chars().take(QUOTE_CHARS).collect();
    let ellipsis = if cut.len() < s.len() { "..." } else { "" };
    format!("{}{ellipsis}", path_safety::escape(&cut))
}

/// A peer address from `x.pe`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    Ip(SocketAddr),
    /// A host name, to resolve when the peer is dialled (letters, digits, `-`, `_` and dots).
    Host {
        host: String,
        port: u16,
    },
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Ip(addr) => write!(f, "{addr}"),
            PeerAddr::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl PeerAddr {
    fn parse(value: &str) -> Result<PeerAddr, Error> {
        let bad = |reason| Error::BadPeer {
            value: value.to_string(),
            reason,
        };
        if let Ok(addr) = value.parse::<SocketAddr>() {
            return match addr {
                _ if addr.port() == 0 => Err(bad("port 0")),
                _ if addr.ip().is_unspecified() => Err(bad("an unspecified address")),
                _ => Ok(PeerAddr::Ip(addr)),
            };
        }
        let (host, port) = value.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = parse_port(port).ok_or_else(|| bad("not a port from 1 to 65535"))?;
        if host.starts_with('[') || host.contains(':') {
            return Err(bad("not an IPv6 address in brackets"));
        }
        if host.parse::<IpAddr>().is_err() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        {
            return Err(bad("not an IPv4 address"));
        }
        if !valid_host(host) {
            return Err(bad("not a host name"));
        }
        Ok(PeerAddr::Host {
            host: host.to_string(),
            port,
        })
    }
}

/// Digits only (no sign, no spaces), 1..=65535.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p != 0)
}

fn valid_host(host: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    host.len() <= MAX_HOST_LEN && host.split('.').all(label_ok)
}

/// BEP 53 `so`: zero-based file indices, kept as sorted, disjoint, non-adjacent inclusive
/// ranges, so two spellings of one selection compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileSelection {
    ranges: Vec<(u32, u32)>,
}

impl FileSelection {
    /// Whether file `index` (zero-based) is selected.
    pub fn contains(&self, index: u32) -> bool {
        let at = self.ranges.partition_point(|&(_, hi)| hi < index);
        self.ranges.get(at).is_some_and(|&(lo, _)| lo <= index)
    }

    /// The selection as one flag per file of a torrent with `files` files; an index past the
    /// last file is an error (as with `--select`), since the link then does not describe this
    /// torrent.
    pub fn mask(&self, files: usize) -> Result<Vec<bool>, Error> {
        if let Some(&(_, hi)) = self.ranges.last()
            && hi as usize >= files
        {
            return Err(Error::SelectionOutOfRange { index: hi, files });
        }
        let mut mask = vec![false; files];
        for &(lo, hi) in &self.ranges {
            mask[lo as usize..=hi as usize].fill(true);
        }
        Ok(mask)
    }

    /// The ranges, sorted and disjoint, each inclusive.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// Adds the indices and ranges of one `so` value; `parts` counts them across values.
    fn add(&mut self, value: &str, parts: &mut usize) -> Result<(), Error> {
        let bad = || Error::BadSelection {
            value: value.to_string(),
        };
        let index = |s: &str| {
            (!s.is_empty() && s.len() <= 6 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
                .filter(|i| *i <= MAX_FILE_INDEX)
        };
        let before = *parts;
        for part in value.split(',').filter(|p| !p.is_empty()) {
            *parts += 1;
            if *parts > MAX_SELECT_RANGES {
                return Err(bad());
            }
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            let (Some(lo), Some(hi)) = (index(lo), index(hi)) else {
                return Err(bad());
            };
            if lo > hi {
                return Err(bad());
            }
            self.ranges.push((lo, hi));
        }
        if *parts == before {
            return Err(bad());
        }
        self.normalise();
        Ok(())
    }

    fn normalise(&mut self) {
        self.ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(lo, hi) in &self.ranges {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        self.ranges = merged;
    }
}

impl fmt::Display for FileSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            if lo == hi {
                write!(f, "{comma}{lo}")?;
            } else {
                write!(f, "{comma}{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

/// A parsed magnet link. Build one with [`Magnet::parse`] or [`Magnet::from_metainfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Magnet {
    /// The swarm's name: the v1 info hash (what the metadata fetched from peers must hash to
    /// with SHA-1), or for a v2-only link the first 20 bytes of the v2 one.
    pub info_hash: [u8; 20],
    /// Whether `info_hash` is a v1 (`btih`) hash.
    pub has_v1: bool,
    /// The v2 info hash (`btmh`): the SHA-256 the metadata must have.
    pub info_hash_v2: Option<[u8; 32]>,
    /// Sanitised display name (`dn`), to show until the metadata names the torrent.
    pub name: Option<String>,
    /// Tracker URLs (`tr`), distinct, in the order of the link.
    pub trackers: Vec<String>,
    /// Peer addresses (`x.pe`), distinct, in the order of the link.
    pub peers: Vec<PeerAddr>,
    /// Web seed URLs (`ws`), distinct, kept for when web seeds are used.
    pub web_seeds: Vec<String>,
    /// The files to download (`so`); `None` is all of them.
    pub select: Option<FileSelection>,
}

impl FromStr for Magnet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Magnet, Error> {
        Magnet::parse(s)
    }
}

/// The keys this parser reads, after any numeric suffix is dropped.
#[derive(Clone, Copy)]
enum Key {
    Xt,
    Dn,
    Tr,
    Ws,
    Peer,
    Select,
}

impl Key {
    fn from_raw(raw: &str) -> Option<Key> {
        let base = match raw.rsplit_once('.') {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => raw,
        };
        Some(match base {
            "xt" => Key::Xt,
            "dn" => Key::Dn,
            "tr" => Key::Tr,
            "ws" => Key::Ws,
            "x.pe" => Key::Peer,
            "so" => Key::Select,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Key::Xt => "xt",
            Key::Dn => "dn",
            Key::Tr => "tr",
            Key::Ws => "ws",
            Key::Peer => "x.pe",
            Key::Select => "so",
        }
    }
}

/// What the parameters say, before the info hash is settled.
#[derive(Default)]
struct Builder {
    btih: Option<[u8; 20]>,
    btmh: Option<[u8; 32]>,
    name: Option<String>,
    trackers: Distinct<String>,
    peers: Distinct<PeerAddr>,
    web_seeds: Distinct<String>,
    select: Option<FileSelection>,
    select_parts: usize,
}

/// Values in first-seen order, each once, at most `max`.
struct Distinct<T> {
    list: Vec<T>,
    seen: HashSet<T>,
}

impl<T> Default for Distinct<T> {
    fn default() -> Self {
        Distinct {
            list: Vec::new(),
            seen: HashSet::new(),
        }
    }
}

impl<T: Clone + Eq + std::hash::Hash> Distinct<T> {
    /// Adds `value` unless seen; false when that would make more than `max`.
    fn push(&mut self, value: T, max: usize) -> bool {
        if self.seen.contains(&value) {
            return true;
        }
        if self.list.len() >= max {
            return false;
        }
        self.seen.insert(value.clone());
        self.list.push(value);
        true
    }
}

impl Magnet {
    /// Parses a magnet link. Surrounding whitespace (from a paste) is ignored.
    pub fn parse(uri: &str) -> Result<Magnet, Error> {
        let uri = uri.trim();
        if uri.len() > MAX_URI_LEN {
            return Err(Error::TooLong { len: uri.len() });
        }
        let query = strip_scheme(uri).ok_or(Error::NotMagnet)?;
        if uri.chars().any(char::is_control) {
            return Err(Error::ControlCharacter);
        }
        let mut b = Builder::default();
        for param in query.split('&') {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let Some(key) = Key::from_raw(key) else {
                continue;
            };
            if !value.is_empty() {
                b.add(key, value)?;
            }
        }
        let info_hash = match (b.btih, b.btmh) {
            (Some(hash), _) => hash,
            (None, Some(v2)) => v2[..20].try_into().expect("20 of 32 bytes"),
            (None, None) => return Err(Error::NoInfoHash),
        };
        Ok(Magnet {
            info_hash,
            has_v1: b.btih.is_some(),
            info_hash_v2: b.btmh,
            name: b.name,
            trackers: b.trackers.list,
            peers: b.peers.list,
            web_seeds: b.web_seeds.list,
            select: b.select,
        })
    }

    /// The magnet link of a torrent: its info hash, its name as `dn`, every tracker as `tr`
    /// in tier order (tiers cannot be written so that other clients read them: see the module
    /// docs) and its web seeds as `ws`. Trackers and web seeds that [`Magnet::parse`] would
    /// refuse, and any that would take the link past [`MAX_URI_LEN`] or a cap, are left out,
    /// so the link always reads back as this value.
    pub fn from_metainfo(meta: &Metainfo) -> Magnet {
        let mut magnet = Magnet {
            info_hash: meta.info_hash,
            has_v1: meta.version != crate::metainfo::Version::V2,
            info_hash_v2: meta.v2.as_ref().map(|v2| v2.info_hash),
            name: sanitize_name(meta.name.as_bytes()).ok().flatten(),
            trackers: Vec::new(),
            peers: Vec::new(),
            web_seeds: Vec::new(),
            select: None,
        };
        let mut len = magnet.to_uri().len();
        let mut fits = |key: &str, value: &str| {
            let extra = 2 + key.len() + encode_value(value).len();
            let ok = url_ok(value) && len + extra <= MAX_URI_LEN;
            len += if ok { extra } else { 0 };
            ok
        };
        let mut trackers = Distinct::default();
        for url in meta.trackers.iter().flatten() {
            if fits("tr", url) && !trackers.push(url.clone(), MAX_TRACKERS) {
                break;
            }
        }
        let mut seeds = Distinct::default();
        for url in &meta.url_list {
            if fits("ws", url) && !seeds.push(url.clone(), MAX_WEB_SEEDS) {
                break;
            }
        }
        magnet.trackers = trackers.list;
        magnet.web_seeds = seeds.list;
        magnet
    }

    /// The link: `xt` (hexadecimal), then `dn`, `tr`, `ws`, `x.pe` and `so` as present. Values
    /// are percent-encoded except for unreserved characters and `:`, `/` and `@` (which keeps
    /// tracker URLs readable); [`Magnet::parse`] of the result gives this value back.
    pub fn to_uri(&self) -> String {
        let mut uri = String::from("magnet:?");
        if self.has_v1 {
            uri += &format!("xt=urn:btih:{}", metainfo::hex(&self.info_hash));
        }
        if let Some(v2) = &self.info_hash_v2 {
            if self.has_v1 {
                uri.push('&');
            }
            uri += &format!("xt=urn:btmh:1220{}", metainfo::hex(v2));
        }
        let mut put = |key: &str, value: &str| {
            uri.push('&');
            uri.push_str(key);
            uri.push('=');
            uri.push_str(&encode_value(value));
        };
        if let Some(name) = &self.name {
            put("dn", name);
        }
        for t in &self.trackers {
            put("tr", t);
        }
        for w in &self.web_seeds {
            put("ws", w);
        }
        for p in &self.peers {
            put("x.pe", &p.to_string());
        }
        if let Some(s) = &self.select {
            put("so", &s.to_string());
        }
        uri
    }

    /// The trackers as announce tiers (BEP 12), one tracker per tier in the link's order, as
    /// [`Metainfo::trackers`] holds them.
    pub fn tracker_tiers(&self) -> Vec<Vec<String>> {
        self.trackers.iter().map(|t| vec![t.clone()]).collect()
    }
}

impl Builder {
    fn add(&mut self, key: Key, raw: &str) -> Result<(), Error> {
        match key {
            Key::Xt => self.add_xt(&decode_text(key, raw)?),
            Key::Dn => {
                if self.name.is_none() {
                    self.name = sanitize_name(&decode(key, raw, true)?)?;
                }
                Ok(())
            }
            Key::Tr => {
                let url = decode_url(key, raw)?;
                add_distinct(&mut self.trackers, url, MAX_TRACKERS, key)
            }
            Key::Ws => {
                let url = decode_url(key, raw)?;
                add_distinct(&mut self.web_seeds, url, MAX_WEB_SEEDS, key)
            }
            Key::Peer => {
                let peer = PeerAddr::parse(&decode_text(key, raw)?)?;
                add_distinct(&mut self.peers, peer, MAX_PEERS, key)
            }
            Key::Select => {
                let spec = decode_text(key, raw)?;
                let select = self.select.get_or_insert_with(FileSelection::default);
                select.add(&spec, &mut self.select_parts)
            }
        }
    }

    fn add_xt(&mut self, value: &str) -> Result<(), Error> {
        let prefix = |p: &str| {
            value
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        };
        if prefix("urn:btmh:") {
            // A multihash: 0x12 (SHA-256), 0x20 (32 bytes), the digest.
            let digits = &value["urn:btmh:".len()..];
            let hash = digits
                .get(..4)
                .filter(|code| *code == "1220")
                .and_then(|_| parse_v2_hash(&digits[4..]))
                .ok_or(Error::BadV2Hash)?;
            return match self.btmh {
                Some(old) if old != hash => Err(Error::TwoInfoHashes),
                _ => {
                    self.btmh = Some(hash);
                    Ok(())
                }
            };
        }
        if !prefix("urn:btih:") {
            return Ok(()); // another namespace (urn:sha1:, urn:ed2k:, ...): not ours
        }
        let digits = &value["urn:btih:".len()..];
        let hash = parse_info_hash(digits).ok_or_else(|| Error::BadInfoHash {
            value: digits.to_string(),
        })?;
        match self.btih {
            Some(old) if old != hash => Err(Error::TwoInfoHashes),
            _ => {
                self.btih = Some(hash);
                Ok(())
            }
        }
    }
}

fn add_distinct<T: Clone + Eq + std::hash::Hash>(
    list: &mut Distinct<T>,
    value: T,
    max: usize,
    key: Key,
) -> Result<(), Error> {
    if list.push(value, max) {
        Ok(())
    } else {
        Err(Error::TooMany {
            key: key.name(),
            max,
        })
    }
}

/// `magnet:?` in any letter case (a URI scheme is case-insensitive); returns the query.
fn strip_scheme(uri: &str) -> Option<&str> {
    let head = uri.get(..8)?;
    head.eq_ignore_ascii_case("magnet:?").then(|| &uri[8..])
}

/// 40 hexadecimal digits or 32 base32 characters (RFC 4648, either case, no padding).
/// A v2 info hash: 64 hexadecimal digits.
fn parse_v2_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(out)
}

pub fn parse_info_hash(s: &str) -> Option<[u8; 20]> {
    match s.len() {
        40 => {
            let mut out = [0u8; 20];
            for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
                out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
            }
            Some(out)
        }
        32 => {
            // 32 characters of 5 bits are exactly 160 bits: no spare bits to check.
            let mut acc: u64 = 0;
            let mut bits = 0;
            let mut out = Vec::with_capacity(20);
            for &c in s.as_bytes() {
                acc = acc << 5 | u64::from(base32_digit(c)?);
                bits += 5;
                if bits >= 8 {
                    bits -= 8;
                    out.push((acc >> bits) as u8);
                    acc &= (1 << bits) - 1;
                }
            }
            out.try_into().ok()
        }
        _ => None,
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn base32_digit(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a'),
        b'2'..=b'7' => Some(c - b'2' + 26),
        _ => None,
    }
}

/// Strict percent-decoding; `plus_is_space` only for `dn` (see the module docs).
fn decode(key: Key, raw: &str, plus_is_space: bool) -> Result<Vec<u8>, Error> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let pair = bytes.get(i + 1..i + 3);
                let byte = pair.and_then(|p| Some(hex_digit(p[0])? << 4 | hex_digit(p[1])?));
                let Some(byte) = byte else {
                    let end = raw.len().min(i + 3);
                    let escape = raw.get(i..end).unwrap_or("%");
                    return Err(Error::BadEscape {
                        key: key.name(),
                        escape: escape.to_string(),
                    });
                };
                out.push(byte);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

fn decode_text(key: Key, raw: &str) -> Result<String, Error> {
    String::from_utf8(decode(key, raw, false)?).map_err(|_| Error::NotUtf8 { key: key.name() })
}

/// A tracker or web seed URL: UTF-8, no spaces or control characters, at most
/// [`MAX_URL_LEN`] bytes. Its scheme is for the tracker or web seed code to judge.
fn decode_url(key: Key, raw: &str) -> Result<String, Error> {
    let url = decode_text(key, raw)?;
    if url.len() > MAX_URL_LEN {
        return Err(Error::UrlTooLong {
            key: key.name(),
            len: url.len(),
        });
    }
    if !url_ok(&url) {
        return Err(Error::BadUrl {
            key: key.name(),
            value: url,
        });
    }
    Ok(url)
}

fn url_ok(url: &str) -> bool {
    !url.is_empty()
        && url.len() <= MAX_URL_LEN
        && !url.chars().any(|c| c.is_control() || c.is_whitespace())
}

/// The display name: invalid UTF-8 replaced, cut to a file name's length, then sanitised like
/// a torrent's name. Empty is no name.
fn sanitize_name(raw: &[u8]) -> Result<Option<String>, Error> {
    let text = String::from_utf8_lossy(raw);
    let mut end = text.len().min(path_safety::MAX_ELEMENT_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end == 0 {
        return Ok(None);
    }
    path_safety::sanitize_element(text[..end].as_bytes())
        .map(Some)
        .map_err(Error::UnsafeName)
}

/// Percent-encodes all but unreserved characters (RFC 3986) and `:`, `/`, `@`.
fn encode_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:/@".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a";
    const BASE32: &str = "YEX6DQDLXISUVHOJ6UM3GNNKPQJWPKEK";

    fn hash() -> [u8; 20] {
        parse_info_hash(HEX).unwrap()
    }

    fn parse(rest: &str) -> Result<Magnet, Error> {
        Magnet::parse(&format!("magnet:?xt=urn:btih:{HEX}{rest}"))
    }

    #[test]
    fn parses_a_typical_link() {
        let m = parse(
            "&dn=Ubuntu+22.04%20desktop&tr=udp%3A%2F%2Ftracker.example%3A6969%2Fannounce&tr=http://t.example/announce?passkey=a%26b&x.pe=10.0.0.1:6881&x.pe=[::1]:51413&x.pe=peer.example:7000&ws=https://seed.example/files/&so=0,2,4-6",
        )
        .unwrap();
        assert_eq!(m.info_hash, hash());
        assert_eq!(m.name.as_deref(), Some("Ubuntu 22.04 desktop"));
        assert_eq!(
            m.trackers,
            [
                "udp://tracker.example:6969/announce",
                "http://t.example/announce?passkey=a&b"
            ]
        );
        assert_eq!(
            m.tracker_tiers(),
            vec![vec![m.trackers[0].clone()], vec![m.trackers[1].clone()]]
        );
        assert_eq!(
            m.peers,
            [
                PeerAddr::Ip("10.0.0.1:6881".parse().unwrap()),
                PeerAddr::Ip("[::1]:51413".parse().unwrap()),
                PeerAddr::Host {
                    host: "peer.example".into(),
                    port: 7000
                },
            ]
        );
        assert_eq!(m.web_seeds, ["https://seed.example/files/"]);
        let select = m.select.unwrap();
        assert_eq!(select.ranges(), [(0, 0), (2, 2), (4, 6)]);
        assert_eq!(
            select.mask(8).unwrap(),
            [true, false, true, false, true, true, true, false]
        );
        assert!(select.contains(5) && !select.contains(3) && !select.contains(7));
    }

    #[test]
    fn info_hash_in_hex_or_base32_either_case() {
        for digits in [HEX, &HEX.to_uppercase(), BASE32, &BASE32.to_lowercase()] {
            let m = Magnet::parse(&format!("MAGNET:?xt=URN:BTIH:{digits}")).unwrap();
            assert_eq!(m.info_hash, hash(), "{digits}");
        }
        // Percent-encoded inside the value, as some sites write it.
        let m = Magnet::parse(&format!("magnet:?xt=urn%3Abtih%3A{HEX}")).unwrap();
        assert_eq!(m.info_hash, hash());
    }

    #[test]
    fn bad_info_hashes_are_refused() {
        let bad = [
            &HEX[..39],
            &format!("{HEX}0"),
            &format!("g{}", &HEX[1..]),
            &BASE32[..31],
            &format!("{}1", &BASE32[..31]), // 1 is not in the base32 alphabet
            &format!("{}8", &BASE32[..31]),
            "",
        ];
        for digits in bad {
            let err = Magnet::parse(&format!("magnet:?xt=urn:btih:{digits}")).unwrap_err();
            assert!(matches!(err, Error::BadInfoHash { .. }), "{digits}: {err}");
            assert!(err.to_string().contains("40 hexadecimal or 32 base32"));
        }
    }

    #[test]
    fn v2_links_name_their_swarm_and_hybrids_use_btih() {
        let v2 = format!("urn:btmh:1220{}", "ab".repeat(32));
        let m = Magnet::parse(&format!("magnet:?xt={v2}&dn=x")).unwrap();
        assert_eq!(m.info_hash, [0xab; 20]);
        assert_eq!(m.info_hash_v2, Some([0xab; 32]));
        assert!(!m.has_v1);
        assert_eq!(Magnet::parse(&m.to_uri()).unwrap(), m);
        let hybrid = Magnet::parse(&format!("magnet:?xt={v2}&xt=urn:btih:{HEX}")).unwrap();
        assert_eq!(hybrid.info_hash, hash());
        assert_eq!(hybrid.info_hash_v2, Some([0xab; 32]));
        let hybrid = Magnet::parse(&format!("magnet:?xt=urn:btih:{HEX}&xt={v2}")).unwrap();
        assert_eq!(hybrid.info_hash, hash());
        assert_eq!(Magnet::parse(&hybrid.to_uri()).unwrap(), hybrid);
        for bad in [
            "urn:btmh:1220abc".to_string(),
            format!("urn:btmh:1114{}", "ab".repeat(32)),
            format!("urn:btmh:1220{}", "zz".repeat(32)),
        ] {
            let err = Magnet::parse(&format!("magnet:?xt={bad}")).unwrap_err();
            assert_eq!(err, Error::BadV2Hash, "{bad}");
        }
        let two = format!("magnet:?xt={v2}&xt=urn:btmh:1220{}", "cd".repeat(32));
        assert_eq!(Magnet::parse(&two).unwrap_err(), Error::TwoInfoHashes);
    }

    #[test]
    fn missing_or_conflicting_info_hashes() {
        assert_eq!(Magnet::parse("magnet:?dn=x"), Err(Error::NoInfoHash));
        assert_eq!(
            Magnet::parse("magnet:?xt=urn:sha1:XRX2PEFXOOEJFRVUCX6HMZMKS5TWG4K5"),
            Err(Error::NoInfoHash)
        );
        assert_eq!(
            parse(&format!("&xt=urn:btih:{}", "0".repeat(40))),
            Err(Error::TwoInfoHashes)
        );
        // The same hash twice, once in base32, is one torrent.
        assert!(parse(&format!("&xt.1=urn:btih:{BASE32}")).is_ok());
    }

    #[test]
    fn not_a_magnet_link() {
        for uri in ["", "magnet:", "magnet:xt=urn:btih:x", "http://x/?xt=urn:btih:", "magnet?:"] {
            assert_eq!(Magnet::parse(uri), Err(Error::NotMagnet), "{uri}");
        }
        // Surrounding whitespace from a paste is fine; a line break inside is not.
        assert!(Magnet::parse(&format!("  magnet:?xt=urn:btih:{HEX}\n")).is_ok());
        assert_eq!(parse("&dn=a\nb"), Err(Error::ControlCharacter));
        assert_eq!(parse("&dn=a\u{7f}b"), Err(Error::ControlCharacter));
    }

    #[test]
    fn percent_escapes_are_strict() {
        for (rest, key, escape) in [
            ("&dn=100%", "dn", "%"),
            ("&dn=a%4", "dn", "%4"),
            ("&tr=http://x/%zz", "tr", "%zz"),
            ("&tr=http://x/%%41", "tr", "%%4"),
            ("&x.pe=1.2.3.4%3", "x.pe", "%3"),
            ("&so=1%2G", "so", "%2G"),
            ("&xt=urn:btih:%", "xt", "%"),
        ] {
            let err = parse(rest).unwrap_err();
            assert_eq!(
                err,
                Error::BadEscape {
                    key,
                    escape: escape.into()
                },
                "{rest}"
            );
            assert!(err.to_string().contains("%25"), "{err}");
        }
        // A multi-byte character right after a % is an error, not a panic at a char boundary.
        assert!(matches!(parse("&dn=%é"), Err(Error::BadEscape { .. })));
        assert!(matches!(parse("&dn=%Aé"), Err(Error::BadEscape { .. })));
        // Escapes in unknown keys are not looked at.
        assert!(parse("&x.foo=%zz&kt=%").is_ok());
    }

    #[test]
    fn plus_is_a_space_only_in_the_display_name() {
        let m = parse("&dn=a+b%2Bc&tr=http://x/a+b").unwrap();
        assert_eq!(m.name.as_deref(), Some("a b+c"));
        assert_eq!(m.trackers, ["http://x/a+b"]);
        let again = Magnet::parse(&m.to_uri()).unwrap();
        assert_eq!(again, m);
        assert!(m.to_uri().contains("dn=a%20b%2Bc"));
    }

    #[test]
    fn text_values_must_be_utf8_but_the_name_is_lossy() {
        assert_eq!(
            parse("&tr=http://x/%FF"),
            Err(Error::NotUtf8 { key: "tr" })
        );
        let m = parse("&dn=caf%C3%A9%FF").unwrap();
        assert_eq!(m.name.as_deref(), Some("caf\u{e9}\u{fffd}"));
    }

    #[test]
    fn display_names_are_sanitised_like_torrent_names() {
        for dn in ["..", "../etc", "a/../../b", "%2F..%2Fx", "/etc/passwd", "C:%5Cx", "."] {
            let err = parse(&format!("&dn={dn}")).unwrap_err();
            assert!(matches!(err, Error::UnsafeName(_)), "{dn}: {err}");
            assert!(err.to_string().contains("remove dn="), "{err}");
        }
        let m = parse("&dn=a%2Fb%09c%E2%80%AEd").unwrap();
        assert_eq!(m.name.as_deref(), Some("a_b_c_d"));
        // Cut to a file name's length at a character boundary, not refused.
        let long = "%C3%A9".repeat(200);
        let name = parse(&format!("&dn={long}")).unwrap().name.unwrap();
        assert_eq!(name.len(), 254);
        assert!(name.chars().all(|c| c == '\u{e9}'));
        // The first dn counts; an empty one is none.
        assert_eq!(parse("&dn=a&dn=b").unwrap().name.as_deref(), Some("a"));
        assert_eq!(parse("&dn=").unwrap().name, None);
    }

    #[test]
    fn trackers_are_distinct_in_order_and_numbered_keys_are_plain() {
        let m = parse("&tr.2=udp://b:1&tr=udp://a:1&tr.1=udp://b:1&tr=&tr.x=udp://c:1").unwrap();
        assert_eq!(m.trackers, ["udp://b:1", "udp://a:1"]);
        for bad in ["&tr=http://x/a%20b", "&tr=http://x/%0d%0aHost:%20evil", "&ws=a%09b"] {
            assert!(matches!(parse(bad), Err(Error::BadUrl { .. })), "{bad}");
        }
        let long = format!("&tr=http://x/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(parse(&long), Err(Error::UrlTooLong { key: "tr", .. })));
    }

    #[test]
    fn caps_hold_and_say_which() {
        let many = |key: &str, n: usize, value: &dyn Fn(usize) -> String| {
            let rest: String = (0..n).map(|i| format!("&{key}={}", value(i))).collect();
            parse(&rest)
        };
        let tr = |i: usize| format!("udp://t{i}:1");
        assert_eq!(many("tr", MAX_TRACKERS, &tr).unwrap().trackers.len(), MAX_TRACKERS);
        assert_eq!(
            many("tr", MAX_TRACKERS + 1, &tr),
            Err(Error::TooMany {
                key: "tr",
                max: MAX_TRACKERS
            })
        );
        // Duplicates do not count against the cap.
        assert!(many("tr", 5 * MAX_TRACKERS, &|i| tr(i % 10)).is_ok());
        let pe = |i: usize| format!("10.0.{}.{}:1", i / 256, i % 256);
        assert_eq!(many("x.pe", MAX_PEERS, &pe).unwrap().peers.len(), MAX_PEERS);
        let err = many("x.pe", MAX_PEERS + 1, &pe).unwrap_err();
        assert_eq!(
            err,
            Error::TooMany {
                key: "x.pe",
                max: MAX_PEERS
            }
        );
        assert_eq!(err.to_string(), "magnet link has more than 200 distinct x.pe= values; remove some");
        let ws = |i: usize| format!("http://w{i}/");
        assert!(matches!(
            many("ws", MAX_WEB_SEEDS + 1, &ws),
            Err(Error::TooMany { key: "ws", .. })
        ));
        let huge = format!("magnet:?xt=urn:btih:{HEX}&dn={}", "a".repeat(MAX_URI_LEN));
        assert_eq!(
            Magnet::parse(&huge),
            Err(Error::TooLong { len: huge.len() })
        );
    }

    #[test]
    fn peer_addresses() {
        let ok = |v: &str| parse(&format!("&x.pe={v}")).map(|m| m.peers[0].clone());
        assert_eq!(
            ok("1.2.3.4:5").unwrap(),
            PeerAddr::Ip("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(
            ok("%5B2001:db8::1%5D:6881").unwrap(),
            PeerAddr::Ip("[2001:db8::1]:6881".parse().unwrap())
        );
        assert_eq!(
            ok("my-host_1.example:65535").unwrap(),
            PeerAddr::Host {
                host: "my-host_1.example".into(),
                port: 65535
            }
        );
        for bad in [
            "1.2.3.4",
            "1.2.3.4:0",
            "1.2.3.4:65536",
            "1.2.3.4:+80",
            "1.2.3.4:",
            "0.0.0.0:80",
            "[::]:80",
            "::1:80",
            "[::1:80",
            "999.1.1.1:80",
            "1.2.3:80",
            "host..example:80",
            ".host:80",
            "-host:80",
            "ho st:80",
            "h/x:80",
            ":80",
        ] {
            let err = ok(bad).unwrap_err();
            assert!(matches!(err, Error::BadPeer { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains("[IPv6]:port"));
        }
        let long_host = format!("{}:80", vec!["a".repeat(63); 5].join("."));
        assert!(ok(&long_host).is_err());
    }

    #[test]
    fn file_selection() {
        let sel = |v: &str| parse(&format!("&so={v}")).map(|m| m.select.unwrap());
        assert_eq!(sel("3,1-2,,0").unwrap().ranges(), [(0, 3)]);
        assert_eq!(sel("5-7,1,6-9").unwrap().to_string(), "1,5-9");
        // Several so values add up.
        let m = parse("&so=1&so.2=3").unwrap();
        assert_eq!(m.select.unwrap().ranges(), [(1, 1), (3, 3)]);
        for bad in ["a", "1-", "-1", "2-1", "1--2", ",", "1 ,2", "100000", "1-100000", "+1"] {
            assert!(matches!(sel(bad), Err(Error::BadSelection { .. })), "{bad}");
        }
        let parts: Vec<String> = (0..=MAX_SELECT_RANGES).map(|i| (i * 2).to_string()).collect();
        assert!(matches!(sel(&parts.join(",")), Err(Error::BadSelection { .. })));
        assert_eq!(
            sel(&parts[..MAX_SELECT_RANGES].join(",")).unwrap().ranges().len(),
            MAX_SELECT_RANGES
        );
        let s = sel("0,4").unwrap();
        assert_eq!(
            s.mask(4),
            Err(Error::SelectionOutOfRange { index: 4, files: 4 })
        );
        assert!(s.mask(5).unwrap()[4]);
        assert_eq!(sel("99999").unwrap().ranges(), [(MAX_FILE_INDEX, MAX_FILE_INDEX)]);
    }

    #[test]
    fn unknown_keys_and_odd_parameters_are_ignored() {
        let m = parse("&&xl=10826029&kt=a+b&foo&=x&as=http://a/&xs=x&dn.a=ignored").unwrap();
        assert_eq!(m, parse("").unwrap());
    }

    #[test]
    fn to_uri_round_trips() {
        let m = parse(
            "&dn=a+b%26c%3D%25&tr=udp://t:1/a?b=c%26d&tr=http://%E2%9C%93/&ws=http://w/%3F&x.pe=[::1]:5&x.pe=h:6&x.pe=1.2.3.4:7&so=4-6,0",
        )
        .unwrap();
        let uri = m.to_uri();
        assert!(uri.starts_with(&format!("magnet:?xt=urn:btih:{HEX}&dn=a%20b%26c%3D%25&tr=udp://t:1/a%3Fb%3Dc%26d")), "{uri}");
        assert_eq!(Magnet::parse(&uri).unwrap(), m);
        let bare = Magnet {
            info_hash: [0xab; 20],
            has_v1: true,
            info_hash_v2: None,
            name: None,
            trackers: vec![],
            peers: vec![],
            web_seeds: vec![],
            select: None,
        };
        assert_eq!(bare.to_uri(), format!("magnet:?xt=urn:btih:{}", "ab".repeat(20)));
        assert_eq!(Magnet::parse(&bare.to_uri()).unwrap(), bare);
    }

    fn torrent(announce_list: &str, extra: &str) -> Metainfo {
        let doc = format!(
            "d13:announce-list{announce_list}{extra}4:infod6:lengthi5e4:name8:a b+c.tx12:piece lengthi16384e6:pieces20:{}ee",
            "x".repeat(20)
        );
        Metainfo::from_bytes(doc.as_bytes()).unwrap()
    }

    #[test]
    fn from_metainfo_keeps_tier_order_and_reads_back() {
        let meta = torrent(
            "ll9:udp://a:18:http://bel9:udp://a:14:udp:ee",
            "8:url-listl9:http://w/9:http://w/e",
        );
        let m = Magnet::from_metainfo(&meta);
        assert_eq!(m.info_hash, meta.info_hash);
        assert_eq!(m.name.as_deref(), Some("a b+c.tx"));
        assert_eq!(m.trackers, ["udp://a:1", "http://b", "udp:"]);
        assert_eq!(m.web_seeds, ["http://w/"]);
        let uri = m.to_uri();
        assert_eq!(
            uri,
            format!(
                "magnet:?xt=urn:btih:{}&dn=a%20b%2Bc.tx&tr=udp://a:1&tr=http://b&tr=udp:&ws=http://w/",
                meta.info_hash_hex()
            )
        );
        assert_eq!(Magnet::parse(&uri).unwrap(), m);
    }

    #[test]
    fn from_metainfo_leaves_out_what_parse_would_refuse() {
        let meta = torrent("ll10:http://a b8:http://cee", "");
        assert_eq!(Magnet::from_metainfo(&meta).trackers, ["http://c"]);
        // Thousands of long trackers: the link stays within the cap and reads back.
        let url = format!("http://{}/", "t".repeat(1000));
        let tiers: String = (0..300).map(|i| format!("l{}:{url}{i}e", url.len() + i.to_string().len())).collect();
        let meta = torrent(&format!("l{tiers}e"), "");
        let m = Magnet::from_metainfo(&meta);
        assert!(!m.trackers.is_empty() && m.trackers.len() < 300);
        let uri = m.to_uri();
        assert!(uri.len() <= MAX_URI_LEN);
        assert_eq!(Magnet::parse(&uri).unwrap(), m);
    }

    #[test]
    fn error_messages_are_one_line_and_escape_what_they_quote() {
        let err = parse("&x.pe=%1B%5B31mred:x").unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains('\n') && !msg.chars().any(char::is_control), "{msg}");
        assert!(msg.contains("\\u{1b}"), "{msg}");
        let err = parse(&format!("&so={}", "9".repeat(500))).unwrap_err();
        assert!(err.to_string().len() < 300);
    }
}
