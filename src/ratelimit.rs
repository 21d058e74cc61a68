//! A token bucket shared by peer threads, for `--max-upload-rate` and `--max-download-rate`.
//!
//! This is the one lock peers share, and it is held only for a few arithmetic steps. A thread
//! that wants more than the bucket holds takes the tokens on credit and sleeps until the
//! credit is paid back, so the long-run rate is exact and waiting threads are served in order.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug)]
struct State {
    /// May go negative: bytes already promised to sleeping threads.
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

impl TokenBucket {
    /// `rate` bytes per second; at most `burst` bytes may go out at once after a quiet spell.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            state: Mutex::new(State {
                tokens: burst.max(1) as f64,
                last: Instant::now(),
            }),
        }
    }

    /// A bucket for a limit in bytes per second: a burst of a quarter second, at least 4 blocks.
    pub fn per_second(rate: u64) -> TokenBucket {
        TokenBucket::new(rate, (rate / 4).max(64 * 1024))
    }

    /// Takes `n` bytes' worth of tokens; returns how long the caller must wait before using them.
    pub fn take(&self, n: u64, now: Instant) -> Duration {
        let mut s = self.state.lock();
        let elapsed = now.saturating_duration_since(s.last).as_secs_f64();
        s.last = s.last.max(now);
        s.tokens = (s.tokens + elapsed * self.rate).min(self.burst);
        s.tokens -= n as f64;
        if s.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.tokens / self.rate)
        }
    }

    /// Takes `n` bytes' worth and sleeps for as long as that requires.
    pub fn acquire(&self, n: u64) {
        let wait = self.take(n, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

/// Parses a rate like `500K`, `2M`, `1.5M` or `100000` (bytes per second; K, M, G are 1024-based).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1024.0),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1024.0 * 1024.0),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1024.0 * 1024.0 * 1024.0),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s}: expected a rate like 500K or 2M"))?;
    let bytes = v * mult;
    if !(1.0..=1e15).contains(&bytes) {
        return Err(format!("{s}: rate out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accuracy over a simulated 10 s window: the bytes granted without waiting past the end
    /// of the window stay within the rate plus the burst.
    #[test]
    fn rate_holds_over_a_window() {
        let rate = 1_000_000;
        let bucket = TokenBucket::new(rate, 100_000);
        let start = Instant::now();
        let mut now = start;
        let mut granted = 0u64;
        // A greedy sender asks for 16 KiB blocks and waits as told.
        while now < start + Duration::from_secs(10) {
            let wait = bucket.take(16_384, now);
            now += wait;
            granted += 16_384;
        }
        let expected = rate * 10 + 100_000;
        let err = (granted as f64 - expected as f64).abs() / expected as f64;
        assert!(err < 0.01, "granted {granted}, expected about {expected}");
    }

    #[test]
    fn burst_is_capped_after_idle() {
        let bucket = TokenBucket::new(1000, 500);
        let later = Instant::now() + Duration::from_secs(100);
        assert_eq!(bucket.take(500, later), Duration::ZERO);
        assert!(bucket.take(500, later) >= Duration::from_millis(499));
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("500K").unwrap(), 512_000);
        assert_eq!(parse_rate("2m").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_rate("1.5M").unwrap(), 1_572_864);
        assert_eq!(parse_rate("100000").unwrap(), 100_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5K").is_err());
    }
}
