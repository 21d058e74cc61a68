//! An independent bencode writer and reader for the tests (never bitfetch's own code).
//!
//! The writer keeps dictionaries in the order they were built: [`dict`] (and [`B::dict`])
//! sort the keys canonically, [`dict_unsorted`] keeps a deliberately wrong order, [`raw`]
//! writes malformed or non-canonical tokens verbatim.

use std::collections::BTreeMap;
use std::ops::Range;

/// A bencode value to write.
#[derive(Debug, Clone)]
pub enum B {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<B>),
    /// Written in exactly this order.
    Dict(Vec<(Vec<u8>, B)>),
    /// Written verbatim.
    Raw(Vec<u8>),
}

impl B {
    pub fn bytes(b: impl AsRef<[u8]>) -> B {
        B::Bytes(b.as_ref().to_vec())
    }

    pub fn str(s: impl AsRef<[u8]>) -> B {
        B::bytes(s)
    }

    /// A dictionary with its keys in canonical (raw byte) order.
    pub fn dict<K: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, B)>) -> B {
        dict(pairs)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            B::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            B::Bytes(b) => put_bytes(out, b),
            B::List(items) => {
                out.push(b'l');
                for item in items {
                    item.encode_into(out);
                }
                out.push(b'e');
            }
            B::Dict(pairs) => {
                out.push(b'd');
                for (k, v) in pairs {
                    put_bytes(out, k);
                    v.encode_into(out);
                }
                out.push(b'e');
            }
            B::Raw(r) => out.extend_from_slice(r),
        }
    }
}

impl B {
    /// The value under `key` of a dictionary, for editing; `None` if this is no dictionary or
    /// has no such key.
    pub fn get_mut(&mut self, key: impl AsRef<[u8]>) -> Option<&mut B> {
        match self {
            B::Dict(pairs) => pairs
                .iter_mut()
                .find(|(k, _)| k.as_slice() == key.as_ref())
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Follows dictionary keys from this value; panics (naming the path) if one is missing.
    pub fn at_mut(&mut self, path: &[&str]) -> &mut B {
        let mut at = self;
        for (i, key) in path.iter().enumerate() {
            at = at
                .get_mut(key)
                .unwrap_or_else(|| panic!("no key {:?} at {:?}", key, &path[..i]));
        }
        at
    }

    /// Sets `key` of a dictionary to `value`: replaced in place, or inserted where canonical
    /// order puts it (the dictionary is assumed sorted).
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: B) {
        let B::Dict(pairs) = self else {
            panic!("insert into a value that is not a dictionary")
        };
        let key = key.as_ref();
        match pairs.iter().position(|(k, _)| k.as_slice() >= key) {
            Some(i) if pairs[i].0 == key => pairs[i].1 = value,
            Some(i) => pairs.insert(i, (key.to_vec(), value)),
            None => pairs.push((key.to_vec(), value)),
        }
    }

    /// Removes `key` of a dictionary, returning its value.
    pub fn remove(&mut self, key: impl AsRef<[u8]>) -> Option<B> {
        match self {
            B::Dict(pairs) => {
                let i = pairs
                    .iter()
                    .position(|(k, _)| k.as_slice() == key.as_ref())?;
                Some(pairs.remove(i).1)
            }
            _ => None,
        }
    }

    /// The items of a list, for editing.
    pub fn items_mut(&mut self) -> &mut Vec<B> {
        match self {
            B::List(items) => items,
            _ => panic!("items_mut of a value that is not a list"),
        }
    }
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(b.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(b);
}

pub fn int(i: i64) -> B {
    B::Int(i)
}

pub fn bytes(b: impl AsRef<[u8]>) -> B {
    B::bytes(b)
}

pub fn raw(b: impl AsRef<[u8]>) -> B {
    B::Raw(b.as_ref().to_vec())
}

pub fn list(items: impl IntoIterator<Item = B>) -> B {
    B::List(items.into_iter().collect())
}

/// A dictionary with its keys in canonical (raw byte) order.
pub fn dict<K: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, B)>) -> B {
    let sorted: BTreeMap<Vec<u8>, B> = pairs
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_vec(), v))
        .collect();
    B::Dict(sorted.into_iter().collect())
}

/// A dictionary with its keys in exactly the order given.
pub fn dict_unsorted<K: AsRef<[u8]>>(pairs: impl IntoIterator<Item = (K, B)>) -> B {
    B::Dict(
        pairs
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_vec(), v))
            .collect(),
    )
}

/// A list of path elements.
pub fn path_list(elements: &[&str]) -> B {
    list(elements.iter().map(bytes))
}

// =============================================================================================
// Reader
// =============================================================================================

/// A decoded bencode value. Dictionary entries keep the byte range their value had in the
/// input (for hashing an info dictionary as it was written).
#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(Vec<(Vec<u8>, Value, Range<usize>)>),
}

impl Value {
    /// Decodes one whole value; `None` if `buf` is not exactly one bencoded value.
    pub fn decode(buf: &[u8]) -> Option<Value> {
        let mut at = 0;
        let value = decode_at(buf, &mut at)?;
        (at == buf.len()).then_some(value)
    }

    /// Decodes the value at the start of `buf`; returns it and how many bytes it took (a BEP 9
    /// data message carries raw bytes after its dictionary).
    pub fn decode_prefix(buf: &[u8]) -> Option<(Value, usize)> {
        let mut at = 0;
        let value = decode_at(buf, &mut at)?;
        Some((value, at))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entry(key).map(|(v, _)| v)
    }

    /// The value under `key` and the byte range it was read from.
    pub fn entry(&self, key: &str) -> Option<(&Value, Range<usize>)> {
        match self {
            Value::Dict(entries) => entries
                .iter()
                .find(|(k, _, _)| k == key.as_bytes())
                .map(|(_, v, span)| (v, span.clone())),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }
}

fn decode_at(buf: &[u8], at: &mut usize) -> Option<Value> {
    let until = |at: usize, stop: u8| -> Option<usize> {
        buf.get(at..)?
            .iter()
            .position(|&b| b == stop)
            .map(|p| at + p)
    };
    match *buf.get(*at)? {
        b'i' => {
            let end = until(*at + 1, b'e')?;
            let n = std::str::from_utf8(&buf[*at + 1..end]).ok()?.parse().ok()?;
            *at = end + 1;
            Some(Value::Int(n))
        }
        b'l' => {
            *at += 1;
            let mut items = Vec::new();
            while *buf.get(*at)? != b'e' {
                items.push(decode_at(buf, at)?);
            }
            *at += 1;
            Some(Value::List(items))
        }
        b'd' => {
            *at += 1;
            let mut entries = Vec::new();
            while *buf.get(*at)? != b'e' {
                let Value::Bytes(key) = decode_at(buf, at)? else {
                    return None;
                };
                let start = *at;
                let value = decode_at(buf, at)?;
                entries.push((key, value, start..*at));
            }
            *at += 1;
            Some(Value::Dict(entries))
        }
        b'0'..=b'9' => {
            let colon = until(*at, b':')?;
            let len: usize = std::str::from_utf8(&buf[*at..colon]).ok()?.parse().ok()?;
            let bytes = buf.get(colon + 1..colon + 1 + len)?.to_vec();
            *at = colon + 1 + len;
            Some(Value::Bytes(bytes))
        }
        _ => None,
    }
}
