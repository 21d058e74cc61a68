//! The peer wire protocol (BEP 3, plus the message ids of BEP 6 and BEP 10) on byte slices.
//!
//! Nothing here does I/O: [`Handshake`] and [`Message`] encode into buffers and decode from
//! them, so every malformed frame can be tested directly. [`Decoder`] is the one frame
//! decoder: the connection's reader drives it step by step over its socket, [`decode_frame`]
//! over a buffer. Frame lengths are checked against per-message exact sizes *before* a payload
//! is read, so a hostile length prefix never allocates more than one block.

use std::fmt;

use crate::geometry::BLOCK_LEN;

pub const PROTOCOL: &[u8; 19] = b"BitTorrent protocol";
pub const HANDSHAKE_LEN: usize = 68;
/// The largest frame we accept: a block plus its 9-byte header, or a bitfield, or an
/// extension message, whichever is larger; capped near 1 MiB.
pub const MAX_FRAME: u32 = 1 << 20;
/// BEP 10 extension messages are small; anything near the frame cap is abuse.
pub const MAX_EXTENDED: u32 = 256 * 1024;

pub const ID_CHOKE: u8 = 0;
pub const ID_UNCHOKE: u8 = 1;
pub const ID_INTERESTED: u8 = 2;
pub const ID_NOT_INTERESTED: u8 = 3;
pub const ID_HAVE: u8 = 4;
pub const ID_BITFIELD: u8 = 5;
pub const ID_REQUEST: u8 = 6;
pub const ID_PIECE: u8 = 7;
pub const ID_CANCEL: u8 = 8;
pub const ID_PORT: u8 = 9;
pub const ID_SUGGEST: u8 = 13;
pub const ID_HAVE_ALL: u8 = 14;
pub const ID_HAVE_NONE: u8 = 15;
pub const ID_REJECT: u8 = 16;
pub const ID_ALLOWED_FAST: u8 = 17;
pub const ID_EXTENDED: u8 = 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    BadProtocol,
    FrameTooLong { len: u32 },
    BadLength { id: u8, len: u32 },
    BadBitfield,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadProtocol => write!(f, "not a BitTorrent handshake"),
            Error::FrameTooLong { len } => write!(f, "frame of {len} bytes is over the limit"),
            Error::BadLength { id, len } => {
                write!(f, "message id {id} with invalid length {len}")
            }
            Error::BadBitfield => write!(f, "bitfield of the wrong size or with spare bits set"),
        }
    }
}

impl std::error::Error for Error {}

/// Reserved-bit flags we understand.
pub mod reserved {
    /// BEP 10 extension protocol: byte 5, 0x10.
    pub const EXTENSION: (usize, u8) = (5, 0x10);
    /// BEP 6 Fast extension: byte 7, 0x04.
    pub const FAST: (usize, u8) = (7, 0x04);
    /// BEP 5 DHT (we send and read the `port` message): byte 7, 0x01.
    pub const DHT: (usize, u8) = (7, 0x01);
    /// BEP 52: we speak v2 (hash messages, and either info hash of a hybrid torrent).
    pub const V2: (usize, u8) = (7, 0x10);

    pub fn has(bits: &[u8; 8], flag: (usize, u8)) -> bool {
        bits[flag.0] & flag.1 != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    pub reserved: [u8; 8],
    pub info_hash: [u8; 20],
    pub peer_id: [u8; 20],
}

impl Handshake {
    pub fn encode(&self) -> [u8; HANDSHAKE_LEN] {
        let mut out = [0u8; HANDSHAKE_LEN];
        out[0] = 19;
        out[1..20].copy_from_slice(PROTOCOL);
        out[20..28].copy_from_slice(&self.reserved);
        out[28..48].copy_from_slice(&self.info_hash);
        out[48..68].copy_from_slice(&self.peer_id);
        out
    }

    pub fn decode(buf: &[u8; HANDSHAKE_LEN]) -> Result<Handshake, Error> {
        if buf[0] != 19 || &buf[1..20] != PROTOCOL {
            return Err(Error::BadProtocol);
        }
        let mut h = Handshake {
            reserved: [0; 8],
            info_hash: [0; 20],
            peer_id: [0; 20],
        };
        h.reserved.copy_from_slice(&buf[20..28]);
        h.info_hash.copy_from_slice(&buf[28..48]);
        h.peer_id.copy_from_slice(&buf[48..68]);
        Ok(h)
    }
}

/// Every message except `piece`, whose payload the connection reads straight into a block
/// buffer (see [`piece_header`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    KeepAlive,
    Choke,
    Unchoke,
    Interested,
    NotInterested,
    Have(u32),
    Bitfield(Vec<u8>),
    Request {
        index: u32,
        begin: u32,
        len: u32,
    },
    Cancel {
        index: u32,
        begin: u32,
        len: u32,
    },
    Port(u16),
    Suggest(u32),
    HaveAll,
    HaveNone,
    Reject {
        index: u32,
        begin: u32,
        len: u32,
    },
    AllowedFast(u32),
    Extended {
        id: u8,
        payload: Vec<u8>,
    },
    /// An id we do not know; ignored.
    Unknown(u8),
}

/// Bytes of a frame's length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes after a `piece` id before the block: index and begin (see [`piece_header`]).
pub const PIECE_HEADER_LEN: usize = 8;

/// A frame's length prefix, checked: 1 to [`MAX_FRAME`] (a keep-alive has none). Made only by
/// [`Decoder::frame_len`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLen(u32);

impl FrameLen {
    #[cfg(any(test, feature = "fuzz"))]
    pub fn get(self) -> u32 {
        self.0
    }
}

/// What the rest of a frame holds, known from its length prefix and id before any of it is
/// read. Every length here has been checked against the message's exact size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `len` payload bytes after the id, to be read whole and given to [`Decoder::decode`].
    Message { id: u8, len: usize },
    /// A `piece`: [`PIECE_HEADER_LEN`] bytes for [`piece_header`], then a block of `len`
    /// bytes (1 to `BLOCK_LEN`) that the caller reads wherever the block belongs.
    Piece { len: u32 },
}

/// The one frame decoder. A frame is read in three steps, always in this order:
/// [`frame_len`](Decoder::frame_len) on the 4-byte prefix, [`body`](Decoder::body) on the id,
/// then [`decode`](Decoder::decode) on the payload (or, for a piece, [`piece_header`] and the
/// block). Each step says how many bytes the next one needs, so the blocking connection and
/// the buffer form ([`decode_frame`]) can never read past a bound or disagree on a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoder {
    piece_count: u32,
    bitfield_len: usize,
}

impl Decoder {
    pub fn new(piece_count: u32) -> Decoder {
        Decoder {
            piece_count,
            bitfield_len: piece_count.div_ceil(8) as usize,
        }
    }

    /// Bytes of a valid bitfield: ceil(pieces / 8).
    #[cfg(any(test, feature = "fuzz"))]
    pub fn bitfield_len(&self) -> usize {
        self.bitfield_len
    }

    /// Step one: the length prefix. `None` is a keep-alive, which has no id.
    pub fn frame_len(&self, prefix: [u8; LEN_PREFIX]) -> Result<Option<FrameLen>, Error> {
        match u32::from_be_bytes(prefix) {
            0 => Ok(None),
            len if len > MAX_FRAME => Err(Error::FrameTooLong { len }),
            len => Ok(Some(FrameLen(len))),
        }
    }

    /// Step two: the id, checked against the length before the payload is read.
    pub fn body(&self, len: FrameLen, id: u8) -> Result<Body, Error> {
        let len = len.0;
        check_len(id, len, self.bitfield_len)?;
        Ok(if id == ID_PIECE {
            // check_len: 9 < len <= 9 + BLOCK_LEN.
            Body::Piece { len: len - 9 }
        } else {
            Body::Message {
                id,
                len: len as usize - 1,
            }
        })
    }

    /// Step three: the payload (the bytes after the id) of a message [`body`](Decoder::body)
    /// accepted. Its length is checked again, so a caller that read the wrong number of bytes
    /// gets an error, not a panic.
    pub fn decode(&self, id: u8, payload: &[u8]) -> Result<Message, Error> {
        let len =
            u32::try_from(payload.len() + 1).map_err(|_| Error::FrameTooLong { len: u32::MAX })?;
        if id == ID_PIECE {
            return Err(Error::BadLength { id, len });
        }
        check_len(id, len, self.bitfield_len)?;
        decode(id, payload, self.piece_count)
    }
}

/// Whether `id` is a message we read (any other is skipped unread, whatever its payload).
pub fn is_known(id: u8) -> bool {
    matches!(
        id,
        ID_CHOKE..=ID_PORT | ID_SUGGEST..=ID_ALLOWED_FAST | ID_EXTENDED
    )
}

/// Checks a frame's declared length for message `id`. `bitfield_len` is ceil(pieces / 8).
fn check_len(id: u8, len: u32, bitfield_len: usize) -> Result<(), Error> {
    let ok = match id {
        ID_CHOKE | ID_UNCHOKE | ID_INTERESTED | ID_NOT_INTERESTED | ID_HAVE_ALL | ID_HAVE_NONE => {
            len == 1
        }
        ID_HAVE | ID_SUGGEST | ID_ALLOWED_FAST => len == 5,
        ID_REQUEST | ID_CANCEL | ID_REJECT => len == 13,
        ID_PORT => len == 3,
        ID_BITFIELD => len as usize == bitfield_len + 1,
        ID_PIECE => len > 9 && len <= 9 + BLOCK_LEN,
        ID_EXTENDED => (2..=MAX_EXTENDED).contains(&len),
        _ => len <= MAX_FRAME,
    };
    if ok {
        Ok(())
    } else if id == ID_BITFIELD {
        Err(Error::BadBitfield)
    } else {
        Err(Error::BadLength { id, len })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes a payload whose length passed [`check_len`] (see [`Decoder::decode`]).
fn decode(id: u8, payload: &[u8], piece_count: u32) -> Result<Message, Error> {
    let triple = |p: &[u8]| (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8));
    Ok(match id {
        ID_CHOKE => Message::Choke,
        ID_UNCHOKE => Message::Unchoke,
        ID_INTERESTED => Message::Interested,
        ID_NOT_INTERESTED => Message::NotInterested,
        ID_HAVE => Message::Have(u32_at(payload, 0)),
        ID_BITFIELD => {
            check_spare_bits(payload, piece_count)?;
            Message::Bitfield(payload.to_vec())
        }
        ID_REQUEST => {
            let (index, begin, len) = triple(payload);
            Message::Request { index, begin, len }
        }
        ID_CANCEL => {
            let (index, begin, len) = triple(payload);
            Message::Cancel { index, begin, len }
        }
        ID_REJECT => {
            let (index, begin, len) = triple(payload);
            Message::Reject { index, begin, len }
        }
        ID_PORT => Message::Port(u16::from_be_bytes([payload[0], payload[1]])),
        ID_SUGGEST => Message::Suggest(u32_at(payload, 0)),
        ID_ALLOWED_FAST => Message::AllowedFast(u32_at(payload, 0)),
        ID_HAVE_ALL => Message::HaveAll,
        ID_HAVE_NONE => Message::HaveNone,
        ID_EXTENDED => Message::Extended {
            id: payload[0],
            payload: payload[1..].to_vec(),
        },
        other => Message::Unknown(other),
    })
}

/// Bits past the last piece must be zero (BEP 3: clients should drop peers that set them).
fn check_spare_bits(bits: &[u8], piece_count: u32) -> Result<(), Error> {
    let spare = (bits.len() * 8) as u64 - u64::from(piece_count);
    if spare >= 8 {
        return Err(Error::BadBitfield);
    }
    if spare > 0 {
        let mask = (1u8 << spare) - 1;
        if bits.last().is_some_and(|b| b & mask != 0) {
            return Err(Error::BadBitfield);
        }
    }
    Ok(())
}

/// Splits the 8 bytes after a `piece` id into (index, begin).
pub fn piece_header(b: &[u8; 8]) -> (u32, u32) {
    (u32_at(b, 0), u32_at(b, 4))
}

/// Appends the frame for `msg` to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let simple = |out: &mut Vec<u8>, id: u8| {
        out.extend_from_slice(&1u32.to_be_bytes());
        out.push(id);
    };
    let with_u32 = |out: &mut Vec<u8>, id: u8, v: u32| {
        out.extend_from_slice(&5u32.to_be_bytes());
        out.push(id);
        out.extend_from_slice(&v.to_be_bytes());
    };
    let triple = |out: &mut Vec<u8>, id: u8, a: u32, b: u32, c: u32| {
        out.extend_from_slice(&13u32.to_be_bytes());
        out.push(id);
        for v in [a, b, c] {
            out.extend_from_slice(&v.to_be_bytes());
        }
    };
    match msg {
        Message::KeepAlive => out.extend_from_slice(&0u32.to_be_bytes()),
        Message::Choke => simple(out, ID_CHOKE),
        Message::Unchoke => simple(out, ID_UNCHOKE),
        Message::Interested => simple(out, ID_INTERESTED),
        Message::NotInterested => simple(out, ID_NOT_INTERESTED),
        Message::HaveAll => simple(out, ID_HAVE_ALL),
        Message::HaveNone => simple(out, ID_HAVE_NONE),
        Message::Have(i) => with_u32(out, ID_HAVE, *i),
        Message::Suggest(i) => with_u32(out, ID_SUGGEST, *i),
        Message::AllowedFast(i) => with_u32(out, ID_ALLOWED_FAST, *i),
        Message::Bitfield(bits) => {
            out.extend_from_slice(&(bits.len() as u32 + 1).to_be_bytes());
            out.push(ID_BITFIELD);
            out.extend_from_slice(bits);
        }
        Message::Request { index, begin, len } => triple(out, ID_REQUEST, *index, *begin, *len),
        Message::Cancel { index, begin, len } => triple(out, ID_CANCEL, *index, *begin, *len),
        Message::Reject { index, begin, len } => triple(out, ID_REJECT, *index, *begin, *len),
        Message::Port(p) => {
            out.extend_from_slice(&3u32.to_be_bytes());
            out.push(ID_PORT);
            out.extend_from_slice(&p.to_be_bytes());
        }
        Message::Extended { id, payload } => {
            out.extend_from_slice(&(payload.len() as u32 + 2).to_be_bytes());
            out.push(ID_EXTENDED);
            out.push(*id);
            out.extend_from_slice(payload);
        }
        Message::Unknown(id) => simple(out, *id),
    }
}

/// Appends the 13-byte header of a `piece` message carrying `len` bytes.
pub fn encode_piece_header(index: u32, begin: u32, len: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&(9 + len).to_be_bytes());
    out.push(ID_PIECE);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&begin.to_be_bytes());
}

/// A decoded frame from a byte buffer: what [`decode_frame`] found.
#[cfg(any(test, feature = "fuzz"))]
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    Piece {
        index: u32,
        begin: u32,
        data: Vec<u8>,
    },
}

/// Decodes one whole frame from the front of `buf`: `Ok(None)` when more bytes are needed,
/// otherwise the frame and the bytes it used. The buffer form of the [`Decoder`]'s steps, for
/// tests, benchmarks and the fuzz target's round trips; `bitfield_len` must be ceil(pieces / 8).
#[cfg(any(test, feature = "fuzz"))]
pub fn decode_frame(
    buf: &[u8],
    bitfield_len: usize,
    piece_count: u32,
) -> Result<Option<(Frame, usize)>, Error> {
    let decoder = Decoder {
        piece_count,
        bitfield_len,
    };
    let Some((prefix, rest)) = buf.split_first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let Some(len) = decoder.frame_len(*prefix)? else {
        return Ok(Some((Frame::Message(Message::KeepAlive), LEN_PREFIX)));
    };
    let Some((&id, rest)) = rest.split_first() else {
        return Ok(None);
    };
    let total = LEN_PREFIX + len.get() as usize;
    let frame = match decoder.body(len, id)? {
        Body::Piece { len } => {
            let Some((header, rest)) = rest.split_first_chunk::<PIECE_HEADER_LEN>() else {
                return Ok(None);
            };
            let Some(data) = rest.get(..len as usize) else {
                return Ok(None);
            };
            let (index, begin) = piece_header(header);
            Frame::Piece {
                index,
                begin,
                data: data.to_vec(),
            }
        }
        Body::Message { id, len } => {
            let Some(payload) = rest.get(..len) else {
                return Ok(None);
            };
            Frame::Message(decoder.decode(id, payload)?)
        }
    };
    Ok(Some((frame, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &Message) -> Vec<u8> {
        let mut v = Vec::new();
        encode(msg, &mut v);
        v
    }

    #[test]
    fn handshake_round_trip_and_rejection() {
        let h = Handshake {
            reserved: [0, 0, 0, 0, 0, 0x10, 0, 0x04],
            info_hash: [7; 20],
            peer_id: *b"-BF0100-abcdefghijkl",
        };
        let bytes = h.encode();
        assert_eq!(Handshake::decode(&bytes).unwrap(), h);
        assert!(reserved::has(&h.reserved, reserved::FAST));
        assert!(!reserved::has(&h.reserved, reserved::DHT));
        let mut bad = bytes;
        bad[0] = 18;
        assert_eq!(Handshake::decode(&bad), Err(Error::BadProtocol));
        let mut bad = bytes;
        bad[5] = b'x';
        assert_eq!(Handshake::decode(&bad), Err(Error::BadProtocol));
    }

    #[test]
    fn every_message_round_trips() {
        let msgs = [
            Message::KeepAlive,
            Message::Choke,
            Message::Unchoke,
            Message::Interested,
            Message::NotInterested,
            Message::Have(3),
            Message::Bitfield(vec![0b1010_0000]),
            Message::Request {
                index: 1,
                begin: 16384,
                len: 16384,
            },
            Message::Cancel {
                index: 1,
                begin: 0,
                len: 100,
            },
            Message::Port(6881),
            Message::Suggest(2),
            Message::HaveAll,
            Message::HaveNone,
            Message::Reject {
                index: 0,
                begin: 0,
                len: 1,
            },
            Message::AllowedFast(1),
            Message::Extended {
                id: 0,
                payload: b"de".to_vec(),
            },
        ];
        for m in msgs {
            let bytes = frame(&m);
            let (f, used) = decode_frame(&bytes, 1, 3).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(f, Frame::Message(m));
        }
    }

    #[test]
    fn piece_frames_and_split_delivery() {
        let mut bytes = Vec::new();
        encode_piece_header(2, 16384, 5, &mut bytes);
        bytes.extend_from_slice(b"hello");
        bytes.extend(frame(&Message::Have(1)));
        // Every prefix shorter than the first frame asks for more.
        for cut in 0..18 {
            assert_eq!(
                decode_frame(&bytes[..cut], 1, 3).unwrap(),
                None,
                "cut {cut}"
            );
        }
        let (f, used) = decode_frame(&bytes, 1, 3).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Piece {
                index: 2,
                begin: 16384,
                data: b"hello".to_vec()
            }
        );
        let (f, _) = decode_frame(&bytes[used..], 1, 3).unwrap().unwrap();
        assert_eq!(f, Frame::Message(Message::Have(1)));
    }

    #[test]
    fn decoder_steps_say_what_follows() {
        let d = Decoder::new(3);
        assert_eq!(d.bitfield_len(), 1);
        assert_eq!(d.frame_len([0; 4]), Ok(None));
        let len = |n: u32| d.frame_len(n.to_be_bytes()).unwrap().unwrap();
        assert_eq!(len(13).get(), 13);
        assert_eq!(
            d.body(len(13), ID_REQUEST),
            Ok(Body::Message {
                id: ID_REQUEST,
                len: 12
            })
        );
        assert_eq!(
            d.body(len(9 + BLOCK_LEN), ID_PIECE),
            Ok(Body::Piece { len: BLOCK_LEN })
        );
        assert_eq!(
            d.body(len(2), ID_BITFIELD),
            Ok(Body::Message {
                id: ID_BITFIELD,
                len: 1
            })
        );
        assert_eq!(d.body(len(3), ID_BITFIELD), Err(Error::BadBitfield));
        assert_eq!(
            d.frame_len((MAX_FRAME + 1).to_be_bytes()),
            Err(Error::FrameTooLong { len: MAX_FRAME + 1 })
        );
    }

    #[test]
    fn decode_checks_the_payload_it_is_given() {
        let d = Decoder::new(3);
        // A caller that read the wrong number of bytes gets an error, not a panic.
        assert_eq!(
            d.decode(ID_HAVE, &[0, 0, 1]),
            Err(Error::BadLength {
                id: ID_HAVE,
                len: 4
            })
        );
        assert!(d.decode(ID_REQUEST, &[]).is_err());
        assert!(d.decode(ID_EXTENDED, &[]).is_err());
        assert!(
            d.decode(ID_PIECE, &[0; 9]).is_err(),
            "a piece is not a message"
        );
        assert_eq!(d.decode(ID_HAVE, &[0, 0, 0, 2]), Ok(Message::Have(2)));
    }

    #[test]
    fn malformed_frames_are_refused_before_reading_payload() {
        // Length prefix 0xFFFFFFFF.
        assert_eq!(
            decode_frame(&[0xff, 0xff, 0xff, 0xff, 7], 1, 3),
            Err(Error::FrameTooLong { len: u32::MAX })
        );
        // Fixed-size messages with the wrong length.
        assert!(decode_frame(&[0, 0, 0, 2, ID_CHOKE, 0], 1, 3).is_err());
        assert!(decode_frame(&[0, 0, 0, 4, ID_HAVE, 0, 0, 0], 1, 3).is_err());
        assert!(decode_frame(&[0, 0, 0, 12, ID_REQUEST], 1, 3).is_err());
        // Piece with no data, and one over a block.
        assert!(decode_frame(&[0, 0, 0, 9, ID_PIECE], 1, 3).is_err());
        let over = (9 + BLOCK_LEN + 1).to_be_bytes();
        assert!(decode_frame(&[over[0], over[1], over[2], over[3], ID_PIECE], 1, 3).is_err());
        // Bitfield of the wrong size, and with spare bits set.
        assert_eq!(
            decode_frame(&[0, 0, 0, 3, ID_BITFIELD, 0, 0], 1, 3),
            Err(Error::BadBitfield)
        );
        assert_eq!(
            decode_frame(&[0, 0, 0, 2, ID_BITFIELD, 0b0001_0000], 1, 3),
            Err(Error::BadBitfield)
        );
        assert!(decode_frame(&[0, 0, 0, 2, ID_BITFIELD, 0b1110_0000], 1, 3).is_ok());
        // BEP 5 `port`: exactly two bytes of payload.
        assert_eq!(
            decode_frame(&[0, 0, 0, 3, ID_PORT, 0x1a, 0xe1], 1, 3),
            Ok(Some((Frame::Message(Message::Port(6881)), 7)))
        );
        assert!(decode_frame(&[0, 0, 0, 2, ID_PORT, 0x1a], 1, 3).is_err());
        assert!(decode_frame(&[0, 0, 0, 4, ID_PORT, 0x1a, 0xe1, 0], 1, 3).is_err());
        assert!(decode_frame(&[0, 0, 0, 1, ID_PORT], 1, 3).is_err());
        // Unknown ids are skipped, not fatal.
        let (f, _) = decode_frame(&[0, 0, 0, 2, 99, 1], 1, 3).unwrap().unwrap();
        assert_eq!(f, Frame::Message(Message::Unknown(99)));
    }
}
