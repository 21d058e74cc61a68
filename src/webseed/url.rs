//! Web seed URLs (BEP 19): which URL serves which file of a torrent.
//!
//! A single-file torrent's URL is the file itself, or a directory (it ends with `/`) to which
//! the torrent's name is appended. A multi-file torrent's URL is a directory (a missing `/` is
//! added) below which `name/path/…` lies, each element percent-encoded. Pad files (BEP 47) have
//! no URL: their bytes are zeros.

use crate::metainfo::Metainfo;

/// Longest web seed URL we take (a torrent or link could carry megabytes).
pub const MAX_URL_LEN: usize = 2048;

/// Whether `url` can be a web seed: http or https, no spaces or control characters, not too
/// long. The host is checked by the HTTP client when asked.
pub fn usable(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &url[7..]
    } else if lower.starts_with("https://") {
        &url[8..]
    } else {
        return false;
    };
    url.len() <= MAX_URL_LEN
        && !rest.is_empty()
        && !rest.starts_with('/')
        && url.bytes().all(|b| b.is_ascii_graphic())
        && !url.contains('#')
}

/// Appends `element` to `out`, percent-encoded: RFC 3986 unreserved characters are kept, every
/// other byte becomes `%XX`.
pub fn encode_into(out: &mut String, element: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in element {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// The URL of each file of `meta` on the web seed `base`; `None` for pad files, which are
/// never requested.
pub fn file_urls(base: &str, meta: &Metainfo) -> Vec<Option<String>> {
    meta.files
        .iter()
        .map(|f| {
            if f.pad {
                return None;
            }
            if !meta.multi_file {
                if !base.ends_with('/') {
                    return Some(base.to_string());
                }
                let mut url = base.to_string();
                encode_into(&mut url, &meta.raw_name);
                return Some(url);
            }
            let mut url = base.to_string();
            if !url.ends_with('/') {
                url.push('/');
            }
            encode_into(&mut url, &meta.raw_name);
            for element in &f.raw_path {
                url.push('/');
                encode_into(&mut url, element);
            }
            Some(url)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(doc: &str) -> Metainfo {
        let doc = doc.replace("{pieces}", &"x".repeat(20));
        Metainfo::from_bytes(doc.as_bytes()).unwrap()
    }

    fn single() -> Metainfo {
        meta("d4:infod6:lengthi10e4:name8:a b+c.gz12:piece lengthi16384e6:pieces20:{pieces}ee")
    }

    fn multi() -> Metainfo {
        meta(concat!(
            "d4:infod5:filesl",
            "d6:lengthi3e4:pathl3:dir5:f%1!xee",
            "d4:attr1:p6:lengthi5e4:pathl4:.pad1:5ee",
            "d6:lengthi2e4:pathl4:.pad1:7ee",
            "d6:lengthi4e4:pathl9:\u{e9}t\u{e9}.~_-ee",
            "e4:name4:Name12:piece lengthi16384e6:pieces20:{pieces}ee"
        ))
    }

    #[test]
    fn a_single_file_url_is_the_file_or_a_directory_holding_it() {
        let m = single();
        assert_eq!(
            file_urls("http://127.0.0.1:8/x/file.bin", &m),
            vec![Some("http://127.0.0.1:8/x/file.bin".to_string())]
        );
        assert_eq!(
            file_urls("http://127.0.0.1:8/x/", &m),
            vec![Some("http://127.0.0.1:8/x/a%20b%2Bc.gz".to_string())]
        );
    }

    #[test]
    fn multi_file_urls_are_below_a_directory_each_element_encoded_and_pads_skipped() {
        let m = multi();
        for base in ["http://127.0.0.1:8/d", "http://127.0.0.1:8/d/"] {
            let urls = file_urls(base, &m);
            assert_eq!(
                urls,
                vec![
                    Some("http://127.0.0.1:8/d/Name/dir/f%251%21x".to_string()),
                    None,
                    None,
                    Some("http://127.0.0.1:8/d/Name/%C3%A9t%C3%A9.~_-".to_string()),
                ]
            );
        }
    }

    #[test]
    fn only_http_and_https_urls_are_usable() {
        for ok in ["http://127.0.0.1/a", "HTTPS://[::1]:8/x/", "http://h/?q=1"] {
            assert!(usable(ok), "{ok}");
        }
        let long = format!("http://h/{}", "a".repeat(MAX_URL_LEN));
        for bad in [
            "ftp://h/a",
            "file:///etc/passwd",
            "http://",
            "http:///x",
            "http://h/a b",
            "http://h/a\n",
            "http://h/a#frag",
            "h/a",
            "",
            long.as_str(),
        ] {
            assert!(!usable(bad), "{bad}");
        }
    }
}
