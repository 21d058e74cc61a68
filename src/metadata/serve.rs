//! Serving the metadata to peers that fetch it from us: [`serve`] answers one request from the
//! info bytes, [`ServeLimit`] is a per-peer token bucket so one peer cannot make us send the
//! metadata over and over, and [`answer`] puts the two together.

use std::time::Instant;

use super::{MAX_SIZE, Message, PIECE_LEN, piece_len};

/// The answer to a request for `piece` of the info dictionary `info`: its data, or a reject
/// when the piece is out of range (or the metadata is larger than anyone would accept).
pub fn serve(info: &[u8], piece: u32) -> Message<'_> {
    let total = u32::try_from(info.len())
        .ok()
        .filter(|n| (1..=MAX_SIZE).contains(n));
    let Some((total, len)) = total.and_then(|t| Some((t, piece_len(t, piece)?))) else {
        return Message::Reject { piece };
    };
    let start = (piece * PIECE_LEN) as usize;
    Message::Data {
        piece,
        total_size: total,
        data: &info[start..start + len as usize],
    }
}

/// A per-peer token bucket for serving metadata: `per_second` pieces a second, up to `burst`
/// at once after a quiet spell. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct ServeLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl ServeLimit {
    /// 16 pieces (256 KiB) a second per peer: a typical info dictionary goes out in one burst.
    pub const PER_SECOND: u32 = 16;
    /// 64 pieces (1 MiB) at once.
    pub const BURST: u32 = 64;

    pub fn new(per_second: u32, burst: u32) -> ServeLimit {
        let burst = f64::from(burst.max(1));
        ServeLimit {
            per_second: f64::from(per_second.max(1)),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes a token if there is one: whether a piece may be sent now.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(0.0, |last| now.saturating_duration_since(last).as_secs_f64());
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for ServeLimit {
    fn default() -> ServeLimit {
        ServeLimit::new(ServeLimit::PER_SECOND, ServeLimit::BURST)
    }
}

/// The encoded answer to a request for `piece`: the data if `limit` allows, a reject
/// otherwise (which tells the peer to ask later, or elsewhere).
pub fn answer(info: &[u8], piece: u32, limit: &mut ServeLimit, now: Instant) -> Vec<u8> {
    if limit.allow(now) {
        serve(info, piece).encode()
    } else {
        Message::Reject { piece }.encode()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metadata::{decode, sample};

    #[test]
    fn serves_pieces_and_rejects_out_of_range() {
        let info = sample(2 * PIECE_LEN as usize + 5);
        let Message::Data {
            piece: 1,
            total_size,
            data,
        } = serve(&info, 1)
        else {
            panic!()
        };
        assert_eq!(total_size as usize, info.len());
        assert_eq!(data, &info[PIECE_LEN as usize..2 * PIECE_LEN as usize]);
        assert_eq!(
            serve(&info, 2),
            Message::Data {
                piece: 2,
                total_size,
                data: &info[2 * PIECE_LEN as usize..]
            }
        );
        assert_eq!(serve(&info, 3), Message::Reject { piece: 3 });
        assert_eq!(serve(&info, u32::MAX), Message::Reject { piece: u32::MAX });
        assert_eq!(serve(&[], 0), Message::Reject { piece: 0 });
        // What we serve, we would accept.
        assert_eq!(decode(&serve(&info, 2).encode()), Ok(Some(serve(&info, 2))));
    }

    #[test]
    fn serve_limit_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limit = ServeLimit::new(4, 8);
        assert_eq!((0..20).filter(|_| limit.allow(t0)).count(), 8);
        assert!(!limit.allow(t0 + Duration::from_millis(200)));
        assert!(limit.allow(t0 + Duration::from_millis(260)));
        // A long quiet spell refills up to the burst, no more.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..20).filter(|_| limit.allow(later)).count(), 8);
        // Time going backwards (a caller's stale `now`) grants nothing.
        assert!(!limit.allow(t0));
        let info = sample(100);
        let mut limit = ServeLimit::new(1, 1);
        assert_eq!(answer(&info, 0, &mut limit, t0), serve(&info, 0).encode());
        assert_eq!(
            answer(&info, 0, &mut limit, t0),
            Message::Reject { piece: 0 }.encode()
        );
    }
}
