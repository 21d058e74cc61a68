//! Turning file names chosen by strangers into relative paths that stay inside the output
//! directory.
//!
//! `Path::join` with an absolute component replaces the base, and `..` climbs out of it, so
//! every element of a torrent path goes through [`sanitize_element`]: traversal and absolute
//! elements are refused outright (a torrent that carries them is hostile or broken), separators
//! inside an element and control characters are replaced with `_`. [`is_contained`] is the
//! second line of defence, applied to every joined path.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Longest file name most file systems accept (NAME_MAX).
pub const MAX_ELEMENT_BYTES: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    Empty,
    Traversal(String),
    Absolute(String),
    TooLong(usize),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Empty => write!(f, "empty path element"),
            Error::Traversal(e) => {
                write!(f, "path element {} climbs out of the directory", escape(e))
            }
            Error::Absolute(e) => write!(f, "path element {} is an absolute path", escape(e)),
            Error::TooLong(n) => write!(
                f,
                "path element of {n} bytes is longer than {MAX_ELEMENT_BYTES} bytes"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Makes one path element safe, or refuses it.
pub fn sanitize_element(raw: &[u8]) -> Result<String, Error> {
    if raw.is_empty() {
        return Err(Error::Empty);
    }
    let text = String::from_utf8_lossy(raw);
    if text.starts_with('/') || text.starts_with('\\') || is_drive_prefixed(&text) {
        return Err(Error::Absolute(text.into_owned()));
    }
    if text
        .split(['/', '\\'])
        .any(|part| part == ".." || part == ".")
    {
        return Err(Error::Traversal(text.into_owned()));
    }
    let clean: String = text
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() || is_bidi_control(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    if clean.len() > MAX_ELEMENT_BYTES {
        return Err(Error::TooLong(clean.len()));
    }
    Ok(clean)
}

fn is_drive_prefixed(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

/// True when `path` is relative and made only of normal components, so joining it to a
/// directory cannot leave that directory.
pub fn is_contained(path: &Path) -> bool {
    path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Joins sanitised elements; fails closed if the result is not contained.
pub fn join_elements(elements: &[String]) -> Option<PathBuf> {
    let path: PathBuf = elements.iter().collect();
    is_contained(&path).then_some(path)
}

/// Bidirectional formatting characters: they reorder how the rest of a line is displayed.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// Escapes text for a terminal: control characters and bidirectional overrides (which can make
/// `evil.exe` look like `exe.live`) are shown as `\u{…}`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The form under which two names count as the same file: compatibility-normalised (NFKC:
/// precomposed and decomposed accents, full- and half-width forms agree) and case-folded
/// (upper- then lower-casing maps `ß` and `SS` alike). File systems differ in which of these
/// they merge (APFS normalises, NTFS and case-insensitive mounts fold case), and two entries
/// of one torrent that land on one file would overwrite each other's data.
pub fn collision_key(name: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let folded = name
        .nfkc()
        .collect::<String>()
        .to_uppercase()
        .to_lowercase();
    folded.nfkc().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_traversal_and_absolute_elements() {
        for bad in [
            &b".."[..],
            b".",
            b"/etc/passwd",
            b"\\evil",
            b"a/../../b",
            b"..\\..\\evil",
            b"C:\\evil",
            b"c:evil",
            b"",
        ] {
            assert!(
                sanitize_element(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(sanitize_element(&[b'a'; 256]), Err(Error::TooLong(256)));
    }

    #[test]
    fn neutralises_separators_and_control_characters() {
        assert_eq!(sanitize_element(b"a/b").unwrap(), "a_b");
        assert_eq!(sanitize_element(b"a\\b").unwrap(), "a_b");
        assert_eq!(sanitize_element(b"new\nline\x07").unwrap(), "new_line_");
        assert_eq!(sanitize_element(b"..hidden").unwrap(), "..hidden");
        assert_eq!(sanitize_element(b"\xff\xfe").unwrap(), "\u{fffd}\u{fffd}");
    }

    /// Property: whatever bytes come in, an accepted element joins to a contained, normal,
    /// non-empty relative path of exactly one component.
    #[test]
    fn every_accepted_element_is_one_normal_component() {
        let alphabet: &[u8] = b"./\\:a\x00\n\xff C";
        let mut seed = 0x1234_5678_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 7) as usize;
            let raw: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i * 5)) % alphabet.len() as u64) as usize])
                .collect();
            if let Ok(clean) = sanitize_element(&raw) {
                let p = PathBuf::from(&clean);
                assert!(is_contained(&p), "{raw:?} -> {clean:?}");
                assert_eq!(p.components().count(), 1, "{raw:?} -> {clean:?}");
                assert!(!clean.is_empty());
            }
        }
    }

    #[test]
    fn containment_check() {
        assert!(is_contained(Path::new("a/b")));
        assert!(!is_contained(Path::new("/a")));
        assert!(!is_contained(Path::new("a/../b")));
        assert!(!is_contained(Path::new("")));
        assert!(join_elements(&["a".into(), "b".into()]).is_some());
    }

    #[test]
    fn escape_shows_bidi_overrides() {
        assert_eq!(escape("abc\u{202e}exe.txt"), "abc\\u{202e}exe.txt");
        assert_eq!(escape("a\nb"), "a\\u{a}b");
    }

    #[test]
    fn names_that_one_file_system_or_another_merges_have_one_key() {
        let same = [
            ("caf\u{e9}", "cafe\u{301}"),
            ("A.txt", "\u{ff21}.txt"),
            ("stra\u{df}e", "STRASSE"),
            ("Readme", "README"),
            ("\u{3a3}\u{3a3}", "\u{3c3}\u{3c2}"),
        ];
        for (a, b) in same {
            assert_eq!(collision_key(a), collision_key(b), "{a:?} / {b:?}");
        }
        assert_ne!(collision_key("a"), collision_key("b"));
        assert_ne!(collision_key("cafe"), collision_key("caf\u{e9}"));
    }
}
