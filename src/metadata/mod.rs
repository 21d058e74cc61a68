//! The metadata exchange of BEP 9 (`ut_metadata`, over the BEP 10 extension protocol): how a
//! magnet link's info dictionary is fetched from peers, and served to them.
//!
//! Pure code: no sockets, no clocks (every call that cares about time takes an `Instant`), no
//! channels. The session thread owns one [`MetadataFetch`] per magnet download and drives it
//! with peer keys and explicit times, as it drives the picker.
//!
//! - `message.rs`: the codec ([`decode`], [`Message::encode`]), hostile-input safe.
//! - `fetch.rs`: [`MetadataFetch`], which pieces to ask whom, what to store, whom to blame;
//!   its docs hold the policy (sizes peers disagree on, bans after a failed hash).
//! - `serve.rs`: answering peers that fetch from us ([`serve`], [`answer`]) under a per-peer
//!   token bucket ([`ServeLimit`]).
//! - `layers.rs`: [`LayerFetch`], a v2 torrent's piece layers asked of peers with BEP 52
//!   hash requests once its info dictionary is in, each answer's proof checked to the root.
//!
//! The metadata is cut into 16 KiB pieces, the last one shorter; [`piece_len`] is the one
//! home of that arithmetic.

mod fetch;
mod layers;
mod message;
mod serve;

pub use fetch::{MetadataFetch, Outcome};
pub use layers::LayerFetch;
pub use message::{DecodeError, MAX_MESSAGE_LEN, Message, decode};
#[cfg(test)]
pub use serve::serve;
pub use serve::{ServeLimit, answer};

/// Size of a metadata piece (BEP 9); the last piece may be shorter.
pub const PIECE_LEN: u32 = 16 * 1024;
/// Largest metadata accepted or served. Real info dictionaries stay far below: a 64 MiB one
/// would describe a torrent of over 3 million pieces.
pub const MAX_SIZE: u32 = 64 << 20;
/// Pieces of the largest metadata.
pub const MAX_PIECES: u32 = MAX_SIZE / PIECE_LEN;

/// Pieces in metadata of `size` bytes.
pub fn piece_count(size: u32) -> u32 {
    size.div_ceil(PIECE_LEN)
}

/// The length of `piece` in metadata of `size` bytes; `None` past the end.
pub fn piece_len(size: u32, piece: u32) -> Option<u32> {
    let start = piece.checked_mul(PIECE_LEN)?;
    (start < size).then(|| (size - start).min(PIECE_LEN))
}

/// Made-up metadata of `len` bytes for the tests.
#[cfg(test)]
fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 7) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_tile_the_metadata() {
        assert_eq!(piece_count(1), 1);
        assert_eq!(piece_count(PIECE_LEN), 1);
        assert_eq!(piece_count(PIECE_LEN + 1), 2);
        assert_eq!(piece_count(MAX_SIZE), MAX_PIECES);
        assert_eq!(piece_len(PIECE_LEN + 1, 0), Some(PIECE_LEN));
        assert_eq!(piece_len(PIECE_LEN + 1, 1), Some(1));
        assert_eq!(piece_len(PIECE_LEN + 1, 2), None);
        assert_eq!(piece_len(MAX_SIZE, MAX_PIECES - 1), Some(PIECE_LEN));
        assert_eq!(piece_len(MAX_SIZE, u32::MAX), None);
    }
}
