//! The `ut_metadata` codec (BEP 9).
//!
//! A message is a bencoded dictionary (`msg_type`, `piece`, and for data `total_size`), and a
//! data message carries the piece's raw bytes right after the dictionary. [`decode`] finds the
//! end of the dictionary by walking it ([`bencode::leading_value_len`], under small limits),
//! never by trusting a length, then checks everything a later stage relies on: the piece index
//! (below [`MAX_PIECES`]), `total_size` (1 to [`MAX_SIZE`]), and the exact byte count of the
//! piece `total_size` implies. Unknown message types are ignored, as BEP 9 asks.

use std::fmt;

use bt_bencode::Value;

use super::{MAX_PIECES, MAX_SIZE, PIECE_LEN, piece_len};
use crate::bencode::{self, Limits};

/// Limits for the dictionary at the front of a message (about 50 bytes in practice).
const DICT_LIMITS: Limits = Limits {
    max_size: 1024,
    max_depth: 4,
    max_tokens: 64,
};
/// Longest message payload (after the extended message id) accepted.
pub const MAX_MESSAGE_LEN: usize = DICT_LIMITS.max_size + PIECE_LEN as usize;

const MSG_REQUEST: i64 = 0;
const MSG_DATA: i64 = 1;
const MSG_REJECT: i64 = 2;

/// A `ut_metadata` message. `data` borrows from the payload it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Request {
        piece: u32,
    },
    Data {
        piece: u32,
        total_size: u32,
        data: &'a [u8],
    },
    Reject {
        piece: u32,
    },
}

/// Why a `ut_metadata` payload was refused: the peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    TooLong { len: usize },
    Bencode(bencode::Error),
    NotADict,
    Missing(&'static str),
    PieceOutOfRange { piece: i64 },
    TotalSize { total_size: i64 },
    PieceLength { piece: u32, expected: u32, got: usize },
    TrailingData { len: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLong { len } => write!(
                f,
                "ut_metadata message of {len} bytes is over the {MAX_MESSAGE_LEN}-byte limit"
            ),
            DecodeError::Bencode(e) => write!(f, "ut_metadata message: {e}"),
            DecodeError::NotADict => {
                write!(f, "ut_metadata message does not start with a dictionary")
            }
            DecodeError::Missing(key) => {
                write!(f, "ut_metadata message has no integer `{key}`")
            }
            DecodeError::PieceOutOfRange { piece } => {
                write!(f, "ut_metadata piece {piece} is out of range")
            }
            DecodeError::TotalSize { total_size } => write!(
                f,
                "ut_metadata total_size {total_size} is not between 1 and {MAX_SIZE} bytes"
            ),
            DecodeError::PieceLength {
                piece,
                expected,
                got,
            } => write!(
                f,
                "ut_metadata piece {piece} carries {got} bytes instead of {expected}"
            ),
            DecodeError::TrailingData { len } => write!(
                f,
                "ut_metadata request or reject has {len} bytes after its dictionary"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

impl From<bencode::Error> for DecodeError {
    fn from(e: bencode::Error) -> DecodeError {
        DecodeError::Bencode(e)
    }
}

/// Decodes the payload of a `ut_metadata` message (what follows the extended message id).
/// `Ok(None)` is a message type BEP 9 does not define, which must be ignored.
pub fn decode(payload: &[u8]) -> Result<Option<Message<'_>>, DecodeError> {
    if payload.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong { len: payload.len() });
    }
    let end = bencode::leading_value_len(payload, DICT_LIMITS)?;
    let (head, rest) = payload.split_at(end);
    let Value::Dict(dict) = bencode::decode(head, DICT_LIMITS)? else {
        return Err(DecodeError::NotADict);
    };
    let msg_type = bencode::get_int(&dict, "msg_type").ok_or(DecodeError::Missing("msg_type"))?;
    if !(MSG_REQUEST..=MSG_REJECT).contains(&msg_type) {
        return Ok(None);
    }
    let piece = bencode::get_int(&dict, "piece").ok_or(DecodeError::Missing("piece"))?;
    let piece = u32::try_from(piece)
        .ok()
        .filter(|p| *p < MAX_PIECES)
        .ok_or(DecodeError::PieceOutOfRange { piece })?;
    if msg_type != MSG_DATA {
        if !rest.is_empty() {
            return Err(DecodeError::TrailingData { len: rest.len() });
        }
        return Ok(Some(if msg_type == MSG_REQUEST {
            Message::Request { piece }
        } else {
            Message::Reject { piece }
        }));
    }
    let total_size =
        bencode::get_int(&dict, "total_size").ok_or(DecodeError::Missing("total_size"))?;
    let total_size = u32::try_from(total_size)
        .ok()
        .filter(|n| (1..=MAX_SIZE).contains(n))
        .ok_or(DecodeError::TotalSize { total_size })?;
    let expected = piece_len(total_size, piece).ok_or(DecodeError::PieceOutOfRange {
        piece: i64::from(piece),
    })?;
    if rest.len() != expected as usize {
        return Err(DecodeError::PieceLength {
            piece,
            expected,
            got: rest.len(),
        });
    }
    Ok(Some(Message::Data {
        piece,
        total_size,
        data: rest,
    }))
}

impl Message<'_> {
    /// The payload of this message (to follow the peer's `ut_metadata` extended message id).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Message::Request { piece } => {
                format!("d8:msg_typei{MSG_REQUEST}e5:piecei{piece}ee").into_bytes()
            }
            Message::Reject { piece } => {
                format!("d8:msg_typei{MSG_REJECT}e5:piecei{piece}ee").into_bytes()
            }
            Message::Data {
                piece,
                total_size,
                data,
            } => {
                let mut out =
                    format!("d8:msg_typei{MSG_DATA}e5:piecei{piece}e10:total_sizei{total_size}ee")
                        .into_bytes();
                out.extend_from_slice(data);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_payload(piece: u32, total: i64, data: &[u8]) -> Vec<u8> {
        let mut v =
            format!("d8:msg_typei1e5:piecei{piece}e10:total_sizei{total}ee").into_bytes();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn encodes_as_bep9_shows() {
        assert_eq!(
            Message::Request { piece: 0 }.encode(),
            b"d8:msg_typei0e5:piecei0ee"
        );
        assert_eq!(
            Message::Reject { piece: 0 }.encode(),
            b"d8:msg_typei2e5:piecei0ee"
        );
        let msg = Message::Data {
            piece: 0,
            total_size: 3,
            data: b"xyz",
        };
        assert_eq!(msg.encode(), b"d8:msg_typei1e5:piecei0e10:total_sizei3eexyz");
    }

    #[test]
    fn decodes_what_it_encodes() {
        let bytes = vec![7u8; PIECE_LEN as usize];
        let last = [1u8; 100];
        for msg in [
            Message::Request { piece: 0 },
            Message::Request {
                piece: MAX_PIECES - 1,
            },
            Message::Reject { piece: 12 },
            Message::Data {
                piece: 0,
                total_size: 40_000,
                data: &bytes,
            },
            Message::Data {
                piece: 2,
                total_size: 2 * PIECE_LEN + 100,
                data: &last,
            },
        ] {
            assert_eq!(decode(&msg.encode()), Ok(Some(msg)));
        }
    }

    #[test]
    fn liberal_in_key_order_and_extra_keys() {
        let payload = b"d5:piecei1e3:xyzli1ee8:msg_typei0ee";
        assert_eq!(decode(payload), Ok(Some(Message::Request { piece: 1 })));
        // A reject carrying total_size, as some clients send.
        let payload = b"d8:msg_typei2e5:piecei3e10:total_sizei9ee";
        assert_eq!(decode(payload), Ok(Some(Message::Reject { piece: 3 })));
    }

    #[test]
    fn unknown_message_types_are_ignored() {
        assert_eq!(decode(b"d8:msg_typei3e5:piecei0ee"), Ok(None));
        assert_eq!(decode(b"d8:msg_typei-1eetrailing"), Ok(None));
    }

    #[test]
    fn data_length_must_match_the_piece_exactly() {
        let total = 2 * i64::from(PIECE_LEN) + 100;
        let full = vec![0u8; PIECE_LEN as usize];
        assert!(decode(&data_payload(0, total, &full)).is_ok());
        assert_eq!(
            decode(&data_payload(0, total, &full[1..])),
            Err(DecodeError::PieceLength {
                piece: 0,
                expected: PIECE_LEN,
                got: PIECE_LEN as usize - 1
            })
        );
        // The last piece is shorter: a full-length one is wrong.
        assert_eq!(
            decode(&data_payload(2, total, &full)),
            Err(DecodeError::PieceLength {
                piece: 2,
                expected: 100,
                got: PIECE_LEN as usize
            })
        );
        assert!(decode(&data_payload(2, total, &full[..100])).is_ok());
        assert_eq!(
            decode(&data_payload(3, total, b"")),
            Err(DecodeError::PieceOutOfRange { piece: 3 })
        );
        let over = [&data_payload(0, total, &full)[..], b"x"].concat();
        assert!(matches!(decode(&over), Err(DecodeError::PieceLength { .. })));
    }

    #[test]
    fn hostile_numbers_are_refused() {
        for total in [0, -1, i64::from(MAX_SIZE) + 1, 1 << 31, i64::MAX] {
            assert_eq!(
                decode(&data_payload(0, total, b"x")),
                Err(DecodeError::TotalSize { total_size: total }),
                "{total}"
            );
        }
        for piece in [-1, i64::from(MAX_PIECES), 1 << 32, i64::MIN + 1] {
            let payload = format!("d8:msg_typei0e5:piecei{piece}ee");
            assert_eq!(
                decode(payload.as_bytes()),
                Err(DecodeError::PieceOutOfRange { piece }),
                "{piece}"
            );
        }
        let huge_int = format!("d8:msg_typei0e5:piecei{}ee", "9".repeat(30));
        assert!(matches!(
            decode(huge_int.as_bytes()),
            Err(DecodeError::Bencode(_))
        ));
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let cases: [(&[u8], &str); 9] = [
            (b"", "empty"),
            (b"le", "dictionary"),
            (b"d8:msg_typei0ee", "`piece`"),
            (b"d5:piecei0ee", "`msg_type`"),
            (b"d8:msg_type1:05:piecei0ee", "`msg_type`"),
            (b"d8:msg_typei1e5:piecei0ee", "`total_size`"),
            (b"d8:msg_typei0e5:piecei0eeX", "after its dictionary"),
            (b"d8:msg_typei0e5:piecei0e", "end of data"),
            (b"d8:msg_typei1e5:piecei0e10:total_size99999:", "past the end"),
        ];
        for (payload, want) in cases {
            let err = decode(payload).unwrap_err().to_string();
            assert!(err.contains(want), "{payload:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn the_dictionary_is_bounded_without_trusting_lengths() {
        // A nesting bomb, a dictionary over the size limit, a declared string that runs past
        // the end: refused before bt_bencode sees them, without allocating what they declare.
        let bomb = [&b"d8:msg_typei0e1:x"[..], &b"l".repeat(10_000)].concat();
        assert!(matches!(decode(&bomb), Err(DecodeError::Bencode(_))));
        let big = format!("d1:x2000:{}8:msg_typei0e5:piecei0ee", "a".repeat(2000));
        assert!(matches!(
            decode(big.as_bytes()),
            Err(DecodeError::Bencode(bencode::Error::TooLarge { .. }))
        ));
        assert!(matches!(
            decode(b"d1:x4294967296:"),
            Err(DecodeError::Bencode(_))
        ));
        let long = vec![b'x'; MAX_MESSAGE_LEN + 1];
        assert_eq!(
            decode(&long),
            Err(DecodeError::TooLong {
                len: MAX_MESSAGE_LEN + 1
            })
        );
    }
}
