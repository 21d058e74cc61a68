//! The guarded front of every bencode parse.
//!
//! bt_bencode recurses once per nesting level and has no token limit, so a few kilobytes of
//! `llll…` overflow the stack of a peer thread, and that abort cannot be caught. Every untrusted
//! document therefore goes through [`prescan`] first: an iterative walk that checks the syntax,
//! the nesting depth, the number of tokens and every declared string length against the bytes
//! that are really there. Only a document that passes is handed to bt_bencode.
//!
//! The pre-scan also finds raw spans ([`dict_value_span`]), which is how the info hash is taken
//! over the exact bytes of the `info` value.

use std::collections::BTreeMap;
use std::fmt;

use bt_bencode::{ByteString, Value};

/// Limits for one document. Each caller picks limits that fit what it parses.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: usize,
    pub max_depth: usize,
    pub max_tokens: usize,
}

impl Limits {
    /// Torrent files: a 4 GiB torrent with 16 KiB pieces has 5 MiB of hashes; allow 64 MiB.
    pub const METAINFO: Limits = Limits {
        max_size: 64 << 20,
        max_depth: 64,
        max_tokens: 4_000_000,
    };
    /// Tracker replies and peer extension messages.
    pub const SMALL: Limits = Limits {
        max_size: 2 << 20,
        max_depth: 32,
        max_tokens: 200_000,
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    TooLarge {
        size: usize,
        max: usize,
    },
    TooDeep {
        max: usize,
    },
    TooManyTokens {
        max: usize,
    },
    Syntax {
        offset: usize,
        what: &'static str,
    },
    TrailingData {
        offset: usize,
    },
    Empty,
    /// bt_bencode rejected something the pre-scan let through.
    Decode(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge { size, max } => {
                write!(
                    f,
                    "bencode document of {size} bytes exceeds the {max}-byte limit"
                )
            }
            Error::TooDeep { max } => write!(f, "bencode nesting deeper than {max} levels"),
            Error::TooManyTokens { max } => write!(f, "bencode document has over {max} values"),
            Error::Syntax { offset, what } => write!(f, "invalid bencode at byte {offset}: {what}"),
            Error::TrailingData { offset } => {
                write!(f, "invalid bencode: trailing data at byte {offset}")
            }
            Error::Empty => write!(f, "empty bencode document"),
            Error::Decode(e) => write!(f, "invalid bencode: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// Checks that `buf` holds exactly one well-formed bencode value within `limits`.
pub fn prescan(buf: &[u8], limits: Limits) -> Result<(), Error> {
    if buf.len() > limits.max_size {
        return Err(Error::TooLarge {
            size: buf.len(),
            max: limits.max_size,
        });
    }
    if buf.is_empty() {
        return Err(Error::Empty);
    }
    let end = skip_value(buf, 0, limits)?;
    if end != buf.len() {
        return Err(Error::TrailingData { offset: end });
    }
    Ok(())
}

/// The length of the one value at the start of `buf`, checked as [`prescan`] checks a whole
/// document; the bytes after it are not looked at (a BEP 9 `data` message is a dictionary
/// followed by raw bytes). `limits.max_size` bounds the value, not the buffer; the walk never
/// goes past the value's end, so its cost is bounded by the value too.
pub fn leading_value_len(buf: &[u8], limits: Limits) -> Result<usize, Error> {
    if buf.is_empty() {
        return Err(Error::Empty);
    }
    let end = skip_value(buf, 0, limits)?;
    if end > limits.max_size {
        return Err(Error::TooLarge {
            size: end,
            max: limits.max_size,
        });
    }
    Ok(end)
}

/// Pre-scans and then decodes with bt_bencode.
pub fn decode(buf: &[u8], limits: Limits) -> Result<Value, Error> {
    prescan(buf, limits)?;
    bt_bencode::from_slice(buf).map_err(|e| Error::Decode(e.to_string()))
}

/// Walks one value starting at `pos` without recursion and returns the offset just past it.
/// A dictionary's keys must be strings; keys need not be sorted (we are liberal in what we
/// read, and hash raw bytes anyway).
fn skip_value(buf: &[u8], mut pos: usize, limits: Limits) -> Result<usize, Error> {
    // One entry per open container: true for a dict (where the next item must be a key).
    let mut stack: Vec<DictState> = Vec::new();
    let mut tokens = 0usize;
    loop {
        tokens += 1;
        if tokens > limits.max_tokens {
            return Err(Error::TooManyTokens {
                max: limits.max_tokens,
            });
        }
        let Some(&b) = buf.get(pos) else {
            return Err(Error::Syntax {
                offset: pos,
                what: "unexpected end of data",
            });
        };
        let expecting_key = matches!(stack.last(), Some(DictState::Key));
        if b == b'e' && !stack.is_empty() && !matches!(stack.last(), Some(DictState::Value)) {
            stack.pop();
            pos += 1;
        } else if expecting_key && !b.is_ascii_digit() {
            return Err(Error::Syntax {
                offset: pos,
                what: "dictionary key is not a string",
            });
        } else {
            match b {
                b'i' => pos = skip_int(buf, pos)?,
                b'0'..=b'9' => pos = skip_string(buf, pos)?,
                b'l' | b'd' => {
                    if stack.len() >= limits.max_depth {
                        return Err(Error::TooDeep {
                            max: limits.max_depth,
                        });
                    }
                    flip_dict_state(&mut stack);
                    stack.push(if b == b'd' {
                        DictState::Key
                    } else {
                        DictState::List
                    });
                    pos += 1;
                    continue;
                }
                b'e' => {
                    return Err(Error::Syntax {
                        offset: pos,
                        what: "dictionary key without a value",
                    });
                }
                _ => {
                    return Err(Error::Syntax {
                        offset: pos,
                        what: "unexpected byte",
                    });
                }
            }
            flip_dict_state(&mut stack);
        }
        if stack.is_empty() {
            return Ok(pos);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum DictState {
    List,
    /// Inside a dict, the next item is a key (or the closing `e`).
    Key,
    /// Inside a dict, the next item is the value for the key just read.
    Value,
}

/// After a complete item inside a dict, alternate between key and value.
fn flip_dict_state(stack: &mut [DictState]) {
    if let Some(top) = stack.last_mut() {
        *top = match *top {
            DictState::Key => DictState::Value,
            DictState::Value => DictState::Key,
            DictState::List => DictState::List,
        }
    }
}

fn skip_int(buf: &[u8], start: usize) -> Result<usize, Error> {
    let mut pos = start + 1;
    if buf.get(pos) == Some(&b'-') {
        pos += 1;
    }
    let digits_start = pos;
    while buf.get(pos).is_some_and(u8::is_ascii_digit) {
        pos += 1;
    }
    let digits = pos - digits_start;
    if digits == 0 || digits > 20 {
        return Err(Error::Syntax {
            offset: start,
            what: "malformed integer",
        });
    }
    if buf.get(pos) != Some(&b'e') {
        return Err(Error::Syntax {
            offset: pos,
            what: "integer not terminated",
        });
    }
    Ok(pos + 1)
}

fn skip_string(buf: &[u8], start: usize) -> Result<usize, Error> {
    let (len, colon) = string_header(buf, start)?;
    let data_start = colon + 1;
    if len > buf.len() - data_start {
        return Err(Error::Syntax {
            offset: start,
            what: "string length runs past the end of the data",
        });
    }
    Ok(data_start + len)
}

/// Reads `<digits>:` and returns (length, offset of the colon).
fn string_header(buf: &[u8], start: usize) -> Result<(usize, usize), Error> {
    let mut pos = start;
    let mut len: usize = 0;
    while let Some(&d) = buf.get(pos).filter(|d| d.is_ascii_digit()) {
        len = len
            .checked_mul(10)
            .and_then(|l| l.checked_add(usize::from(d - b'0')))
            .ok_or(Error::Syntax {
                offset: start,
                what: "string length overflows",
            })?;
        pos += 1;
    }
    if buf.get(pos) != Some(&b':') {
        return Err(Error::Syntax {
            offset: pos,
            what: "string length not followed by ':'",
        });
    }
    Ok((len, pos))
}

/// In a document that passed [`prescan`], finds the raw bytes of the value stored under `key`
/// in the top-level dictionary.
///
/// When the key occurs more than once, the span is that of the last occurrence: the decoded
/// [`Dict`] keeps the last value for a repeated key too, so the span always holds the value
/// the parsed fields came from (a torrent with two `info` dicts must not be hashed over one
/// and read from the other).
pub fn dict_value_span<'a>(buf: &'a [u8], key: &[u8], limits: Limits) -> Option<&'a [u8]> {
    if buf.first() != Some(&b'd') {
        return None;
    }
    let mut found = None;
    let mut pos = 1;
    while buf.get(pos).is_some_and(|&b| b != b'e') {
        let (len, colon) = string_header(buf, pos).ok()?;
        let k = buf.get(colon + 1..colon + 1 + len)?;
        let value_start = colon + 1 + len;
        let value_end = skip_value(buf, value_start, limits).ok()?;
        if k == key {
            found = Some(&buf[value_start..value_end]);
        }
        pos = value_end;
    }
    found
}

/// How many times `key` occurs in the top-level dictionary of a document that passed
/// [`prescan`] (0 when it is not a dictionary).
pub fn dict_key_count(buf: &[u8], key: &[u8], limits: Limits) -> usize {
    if buf.first() != Some(&b'd') {
        return 0;
    }
    let mut count = 0;
    let mut pos = 1;
    while buf.get(pos).is_some_and(|&b| b != b'e') {
        let Ok((len, colon)) = string_header(buf, pos) else {
            break;
        };
        let Some(k) = buf.get(colon + 1..colon + 1 + len) else {
            break;
        };
        count += usize::from(k == key);
        let Ok(end) = skip_value(buf, colon + 1 + len, limits) else {
            break;
        };
        pos = end;
    }
    count
}

/// Typed access to decoded dictionaries, so parsers read as field lists.
pub type Dict = BTreeMap<ByteString, Value>;

pub fn get<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    dict.get(key.as_bytes())
}

pub fn get_int(dict: &Dict, key: &str) -> Option<i64> {
    match get(dict, key)? {
        Value::Int(n) => number_to_i64(n),
        _ => None,
    }
}

pub fn number_to_i64(n: &bt_bencode::value::Number) -> Option<i64> {
    match *n {
        bt_bencode::value::Number::Signed(v) => Some(v),
        bt_bencode::value::Number::Unsigned(v) => i64::try_from(v).ok(),
    }
}

pub fn get_bytes<'a>(dict: &'a Dict, key: &str) -> Option<&'a [u8]> {
    match get(dict, key)? {
        Value::ByteStr(b) => Some(b.as_slice()),
        _ => None,
    }
}

pub fn get_str(dict: &Dict, key: &str) -> Option<String> {
    get_bytes(dict, key).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub fn get_dict<'a>(dict: &'a Dict, key: &str) -> Option<&'a Dict> {
    match get(dict, key)? {
        Value::Dict(d) => Some(d),
        _ => None,
    }
}

pub fn get_list<'a>(dict: &'a Dict, key: &str) -> Option<&'a [Value]> {
    match get(dict, key)? {
        Value::List(l) => Some(l),
        _ => None,
    }
}

/// Builds bencode; dictionary keys come out sorted because `Dict` is a `BTreeMap`.
pub fn encode(value: &Value) -> Vec<u8> {
    // Serialising an in-memory Value only fails for types bencode cannot hold, which Value
    // cannot contain.
    bt_bencode::to_vec(value).expect("a bt_bencode::Value always serialises")
}

pub fn bytes(b: impl Into<Vec<u8>>) -> Value {
    Value::ByteStr(ByteString::from(b.into()))
}

pub fn int(i: i64) -> Value {
    Value::Int(bt_bencode::value::Number::Signed(i))
}

pub fn dict(entries: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::Dict(
        entries
            .into_iter()
            .map(|(k, v)| (ByteString::from(k.as_bytes().to_vec()), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &[u8]) {
        prescan(s, Limits::SMALL).unwrap_or_else(|e| panic!("{s:?}: {e}"));
    }
    fn err(s: &[u8]) -> Error {
        prescan(s, Limits::SMALL).expect_err(&format!("{:?} should fail", s))
    }

    #[test]
    fn accepts_well_formed_values() {
        ok(b"i42e");
        ok(b"i-3e");
        ok(b"0:");
        ok(b"4:spam");
        ok(b"le");
        ok(b"de");
        ok(b"l4:spami42ee");
        ok(b"d3:bar4:spam3:fooi42ee");
        ok(b"d1:ad1:bl1:cee1:xi0ee");
        // Unsorted keys and non-canonical integers are read, not judged.
        ok(b"d1:bi1e1:ai007ee");
    }

    #[test]
    fn rejects_malformed_values() {
        assert!(matches!(err(b""), Error::Empty));
        assert!(matches!(err(b"i42"), Error::Syntax { .. }));
        assert!(matches!(err(b"ie"), Error::Syntax { .. }));
        assert!(matches!(err(b"i-e"), Error::Syntax { .. }));
        assert!(matches!(err(b"5:abc"), Error::Syntax { .. }));
        assert!(matches!(err(b"l"), Error::Syntax { .. }));
        assert!(matches!(err(b"di1e1:ae"), Error::Syntax { .. }));
        assert!(matches!(err(b"d1:ae"), Error::Syntax { .. }));
        assert!(matches!(err(b"x"), Error::Syntax { .. }));
        assert!(matches!(err(b"i1ei2e"), Error::TrailingData { offset: 3 }));
        assert!(matches!(err(b"e"), Error::Syntax { .. }));
    }

    #[test]
    fn huge_declared_lengths_are_rejected_without_allocating() {
        assert!(matches!(err(b"99999999999:abc"), Error::Syntax { .. }));
        let overflow = b"99999999999999999999999999:a";
        assert!(matches!(err(overflow), Error::Syntax { .. }));
        let long_int = format!("i{}e", "9".repeat(200));
        assert!(matches!(err(long_int.as_bytes()), Error::Syntax { .. }));
    }

    #[test]
    fn depth_limit_holds_for_lists_and_dicts() {
        let limits = Limits {
            max_depth: 4,
            ..Limits::SMALL
        };
        assert!(prescan(b"llllleeeee", limits).is_err());
        assert!(prescan(b"lllleeee", limits).is_ok());
        assert!(prescan(b"d1:ad1:ad1:ad1:ad1:aleeeee", limits).is_err());
        let bomb = vec![b'l'; 1_000_000];
        assert!(matches!(
            prescan(&bomb, Limits::METAINFO),
            Err(Error::TooDeep { max: 64 })
        ));
    }

    #[test]
    fn token_and_size_limits_hold() {
        let limits = Limits {
            max_tokens: 10,
            ..Limits::SMALL
        };
        let many = format!("l{}e", "i1e".repeat(20));
        assert!(matches!(
            prescan(many.as_bytes(), limits),
            Err(Error::TooManyTokens { .. })
        ));
        let limits = Limits {
            max_size: 3,
            ..Limits::SMALL
        };
        assert!(matches!(
            prescan(b"4:spam", limits),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn finds_raw_span_of_a_top_level_value() {
        let doc = b"d1:zi1e4:infod1:bi007e1:a1:xe1:ai2ee";
        prescan(doc, Limits::SMALL).unwrap();
        assert_eq!(
            dict_value_span(doc, b"info", Limits::SMALL),
            Some(&b"d1:bi007e1:a1:xe"[..])
        );
        assert_eq!(dict_value_span(doc, b"nope", Limits::SMALL), None);
    }

    /// Regression (fuzz property, metainfo target): with two `info` keys the span was the
    /// first while the decoded dict held the second, so the info hash covered other bytes
    /// than the ones parsed.
    #[test]
    fn span_of_a_repeated_key_is_the_value_the_decoder_keeps() {
        let doc = b"d4:infod1:ai1ee4:infod1:bi2eee";
        let Value::Dict(top) = decode(doc, Limits::SMALL).unwrap() else {
            panic!()
        };
        let span = dict_value_span(doc, b"info", Limits::SMALL).unwrap();
        assert_eq!(span, b"d1:bi2ee");
        assert_eq!(encode(get(&top, "info").unwrap()), span);
    }

    #[test]
    fn leading_value_len_stops_where_the_first_value_ends() {
        assert_eq!(leading_value_len(b"d1:ai1eeRAW\xff", Limits::SMALL), Ok(8));
        assert_eq!(leading_value_len(b"i1e", Limits::SMALL), Ok(3));
        assert_eq!(leading_value_len(b"", Limits::SMALL), Err(Error::Empty));
        assert!(matches!(
            leading_value_len(b"d1:a", Limits::SMALL),
            Err(Error::Syntax { .. })
        ));
        assert!(matches!(
            leading_value_len(b"d1:a999:xe", Limits::SMALL),
            Err(Error::Syntax { .. })
        ));
        let small = Limits {
            max_size: 8,
            ..Limits::SMALL
        };
        assert_eq!(leading_value_len(b"d1:ai1eeXX", small), Ok(8));
        assert_eq!(
            leading_value_len(b"d1:ai12eeXX", small),
            Err(Error::TooLarge { size: 9, max: 8 })
        );
        assert!(matches!(
            leading_value_len(&[b'l'; 1000], small),
            Err(Error::TooDeep { .. })
        ));
    }

    #[test]
    fn decode_round_trips_through_bt_bencode() {
        let v = decode(b"d3:fooli1e3:baree", Limits::SMALL).unwrap();
        let Value::Dict(d) = &v else { panic!() };
        assert_eq!(get_list(d, "foo").unwrap().len(), 2);
        assert_eq!(encode(&v), b"d3:fooli1e3:baree");
    }
}
