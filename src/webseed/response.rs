//! Checking a web seed's answer to a range request (pure): status, `Content-Range`,
//! `Content-Length`, `Content-Encoding`, `Retry-After`.

use std::fmt;
use std::time::Duration;

/// Past this offset into a body, a server that ignores `Range` (answers `200` with the whole
/// file) is not worth reading through.
pub const MAX_SKIP: u64 = 16 * 1024 * 1024;
/// Longest back-off a server can ask for with `Retry-After`.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How the wanted bytes come in an acceptable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// `206` with exactly the range asked for.
    Exact,
    /// `200` with the whole file: read past this many bytes first, then take the range.
    Skip(u64),
}

/// Why a request did not deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The file is not on this seed (`404`, `410`, another `4xx`): other files still are.
    FileMissing { file: usize, status: u16 },
    /// `429` or `503`: come back after `retry_after` (capped), or after the usual back-off.
    Busy {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// Worth another try after a back-off: a `5xx`, a timeout, a broken or short body.
    Transient(String),
    /// The seed cannot be used: name resolution, TLS, redirects, a wrong `Content-Range`, an
    /// encoded body, a size that differs from the torrent's, `Range` ignored too far in.
    Fatal(String),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::FileMissing { status, .. } => write!(f, "HTTP {status} for a file"),
            Fault::Busy {
                status,
                retry_after: Some(d),
            } => write!(f, "HTTP {status}, retry after {} s", d.as_secs()),
            Fault::Busy { status, .. } => write!(f, "HTTP {status}"),
            Fault::Transient(m) | Fault::Fatal(m) => write!(f, "{m}"),
        }
    }
}

/// The headers of an answer that matter, as received (values unparsed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Head<'a> {
    pub status: u16,
    pub content_range: Option<&'a str>,
    pub content_length: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub retry_after: Option<&'a str>,
}

/// Checks the answer to a request for bytes `want` (inclusive) of file `file`, `file_len`
/// bytes long by the torrent.
pub fn check(head: &Head, file: usize, want: (u64, u64), file_len: u64) -> Result<Delivery, Fault> {
    let status = head.status;
    match status {
        200 | 206 => {}
        429 | 503 => {
            return Err(Fault::Busy {
                status,
                retry_after: head.retry_after.and_then(retry_after),
            });
        }
        408 | 500..=599 => return Err(Fault::Transient(format!("HTTP {status}"))),
        400..=499 => return Err(Fault::FileMissing { file, status }),
        _ => return Err(Fault::Fatal(format!("unexpected HTTP status {status}"))),
    }
    if let Some(enc) = head.content_encoding
        && !enc.trim().eq_ignore_ascii_case("identity")
    {
        return Err(Fault::Fatal(format!(
            "refuses an encoded body (Content-Encoding: {})",
            crate::path_safety::escape(enc)
        )));
    }
    let length = match head.content_length {
        None => None,
        Some(v) => {
            Some(number(v).ok_or_else(|| Fault::Fatal("a malformed Content-Length".to_string()))?)
        }
    };
    if status == 200 {
        if let Some(n) = length
            && n != file_len
        {
            return Err(Fault::Fatal(format!(
                "the file is {n} bytes on the server, {file_len} in the torrent"
            )));
        }
        if want.0 > MAX_SKIP {
            return Err(Fault::Fatal(
                "the server ignores Range requests (200 instead of 206)".to_string(),
            ));
        }
        return Ok(Delivery::Skip(want.0));
    }
    let Some((first, last, total)) = head.content_range.and_then(content_range) else {
        return Err(Fault::Fatal(
            "a 206 answer without a usable Content-Range".to_string(),
        ));
    };
    if (first, last) != want {
        return Err(Fault::Fatal(format!(
            "sent bytes {first}-{last} when asked for {}-{}",
            want.0, want.1
        )));
    }
    if let Some(total) = total
        && total != file_len
    {
        return Err(Fault::Fatal(format!(
            "the file is {total} bytes on the server, {file_len} in the torrent"
        )));
    }
    if let Some(n) = length
        && n != last - first + 1
    {
        return Err(Fault::Fatal(format!(
            "Content-Length {n} does not match the range {first}-{last}"
        )));
    }
    Ok(Delivery::Exact)
}

/// A decimal number of at most 19 digits, nothing else.
fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`), with FIRST ≤ LAST.
pub fn content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?;
    let rest = rest.strip_prefix(' ')?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last) = (number(first)?, number(last)?);
    if first > last {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => {
            let t = number(t)?;
            if last >= t {
                return None;
            }
            Some(t)
        }
    };
    Some((first, last, total))
}

/// `Retry-After` in seconds, capped at [`MAX_RETRY_AFTER`]. An HTTP date is not parsed
/// (`None`: the caller's own back-off applies).
pub fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Too many digits to parse is far past the cap.
    let secs = v.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16) -> Head<'static> {
        Head {
            status,
            ..Head::default()
        }
    }

    #[test]
    fn content_range_parses_strictly() {
        assert_eq!(content_range("bytes 0-9/10"), Some((0, 9, Some(10))));
        assert_eq!(content_range("bytes 5-5/*"), Some((5, 5, None)));
        assert_eq!(content_range(" bytes  7-8/100 "), Some((7, 8, Some(100))));
        for bad in [
            "bytes 9-0/10",
            "bytes 0-10/10",
            "bytes */10",
            "bytes 0-9",
            "0-9/10",
            "bytes -1-9/10",
            "bytes 0-99999999999999999999/*",
            "items 0-9/10",
            "bytes 0-9/x",
        ] {
            assert_eq!(content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_206_must_carry_exactly_the_range_asked_for() {
        let ok = Head {
            content_range: Some("bytes 10-19/100"),
            content_length: Some("10"),
            ..head(206)
        };
        assert_eq!(check(&ok, 0, (10, 19), 100), Ok(Delivery::Exact));
        let other = Head {
            content_range: Some("bytes 0-19/100"),
            ..head(206)
        };
        assert!(matches!(
            check(&other, 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
        let size = Head {
            content_range: Some("bytes 10-19/99"),
            ..head(206)
        };
        assert!(matches!(
            check(&size, 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
        let length = Head {
            content_range: Some("bytes 10-19/100"),
            content_length: Some("11"),
            ..head(206)
        };
        assert!(matches!(
            check(&length, 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
        assert!(matches!(
            check(&head(206), 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
        let gzip = Head {
            content_encoding: Some("gzip"),
            ..ok
        };
        assert!(matches!(
            check(&gzip, 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
        let identity = Head {
            content_encoding: Some("Identity"),
            ..ok
        };
        assert_eq!(check(&identity, 0, (10, 19), 100), Ok(Delivery::Exact));
    }

    #[test]
    fn a_200_is_read_through_only_a_little_way() {
        assert_eq!(check(&head(200), 0, (10, 19), 100), Ok(Delivery::Skip(10)));
        let far = MAX_SKIP + 1;
        assert!(matches!(
            check(&head(200), 0, (far, far + 9), far + 10),
            Err(Fault::Fatal(_))
        ));
        let wrong_size = Head {
            content_length: Some("50"),
            ..head(200)
        };
        assert!(matches!(
            check(&wrong_size, 0, (10, 19), 100),
            Err(Fault::Fatal(_))
        ));
    }

    #[test]
    fn statuses_are_classified() {
        let want = (0, 9);
        assert_eq!(
            check(&head(404), 3, want, 10),
            Err(Fault::FileMissing {
                file: 3,
                status: 404
            })
        );
        assert!(matches!(
            check(&head(403), 3, want, 10),
            Err(Fault::FileMissing { .. })
        ));
        assert!(matches!(
            check(&head(500), 3, want, 10),
            Err(Fault::Transient(_))
        ));
        assert!(matches!(
            check(&head(204), 3, want, 10),
            Err(Fault::Fatal(_))
        ));
        let busy = Head {
            retry_after: Some("7"),
            ..head(429)
        };
        assert_eq!(
            check(&busy, 0, want, 10),
            Err(Fault::Busy {
                status: 429,
                retry_after: Some(Duration::from_secs(7))
            })
        );
    }

    #[test]
    fn retry_after_is_seconds_capped() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after("99999999999999999999999"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after("-1"), None);
        assert_eq!(retry_after(""), None);
    }
}
