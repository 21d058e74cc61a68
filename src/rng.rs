//! A small non-cryptographic random generator (xorshift64*), seeded from the OS, for peer ids,
//! tie-breaks and shuffles. Nothing security-relevant depends on it.

use std::io::Read;

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Zero is the one state xorshift never leaves.
        Rng(seed | 1)
    }

    /// Seeded from /dev/urandom, falling back to the clock and process id.
    pub fn from_os() -> Rng {
        let mut b = [0u8; 8];
        let seeded = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .is_ok();
        if !seeded {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
        }
        Rng::new(u64::from_le_bytes(b))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in `[0, n)`; `n` must be non-zero.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A BEP 20 peer id, Azureus style: `-BF0100-` and twelve random characters.
pub fn peer_id(rng: &mut Rng) -> [u8; 20] {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut id = *b"-BF0100-000000000000";
    for b in &mut id[8..] {
        *b = ALPHABET[rng.below(ALPHABET.len() as u64) as usize];
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_ids_have_the_prefix() {
        let mut r = Rng::new(42);
        assert!((0..1000).all(|_| r.below(7) < 7));
        let id = peer_id(&mut r);
        assert_eq!(&id[..8], b"-BF0100-");
        assert_ne!(peer_id(&mut r), id);
        let mut v: Vec<u32> = (0..50).collect();
        r.shuffle(&mut v);
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
