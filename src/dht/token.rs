//! The write tokens we hand out with `get_peers` answers (BEP 5).
//!
//! A token proves that whoever announces later received our answer at that IP address, so
//! nobody can announce someone else's address into our peer store. It is SHA-1 over a random
//! secret and the requester's IP, cut to 8 bytes. The secret rotates every five minutes and the
//! previous one is still accepted, so a token stays good for five to ten minutes.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use crate::rng::Rng;

pub(crate) const ROTATE_EVERY: Duration = Duration::from_secs(5 * 60);
const TOKEN_LEN: usize = 8;

#[derive(Debug)]
pub(crate) struct Tokens {
    current: [u8; 16],
    previous: [u8; 16],
    rotated: Instant,
}

fn secret(rng: &mut Rng) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    s[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    s
}

fn token_for(secret: &[u8; 16], ip: IpAddr) -> [u8; TOKEN_LEN] {
    let mut h = Sha1::new();
    h.update(secret);
    match ip {
        IpAddr::V4(v4) => h.update(v4.octets()),
        IpAddr::V6(v6) => h.update(v6.octets()),
    }
    let digest = h.finalize();
    let mut t = [0u8; TOKEN_LEN];
    t.copy_from_slice(&digest[..TOKEN_LEN]);
    t
}

impl Tokens {
    pub(crate) fn new(rng: &mut Rng, now: Instant) -> Tokens {
        let current = secret(rng);
        Tokens {
            current,
            previous: current,
            rotated: now,
        }
    }

    /// Rotates the secret when it is due; called from the thread's timer.
    pub(crate) fn tick(&mut self, rng: &mut Rng, now: Instant) {
        if now.saturating_duration_since(self.rotated) >= ROTATE_EVERY {
            self.previous = self.current;
            self.current = secret(rng);
            self.rotated = now;
        }
    }

    pub(crate) fn issue(&self, ip: IpAddr) -> Vec<u8> {
        token_for(&self.current, ip).to_vec()
    }

    pub(crate) fn valid(&self, ip: IpAddr, token: &[u8]) -> bool {
        token == token_for(&self.current, ip) || token == token_for(&self.previous, ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_one_rotation_not_two_and_are_bound_to_the_ip() {
        let mut rng = Rng::new(1);
        let t0 = Instant::now();
        let mut tokens = Tokens::new(&mut rng, t0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let tok = tokens.issue(ip);
        assert!(tokens.valid(ip, &tok));
        assert!(!tokens.valid(other, &tok));
        assert!(!tokens.valid(ip, b""));
        tokens.tick(&mut rng, t0 + Duration::from_secs(60));
        assert!(tokens.valid(ip, &tok), "no rotation yet");
        tokens.tick(&mut rng, t0 + ROTATE_EVERY);
        assert!(tokens.valid(ip, &tok), "previous secret still accepted");
        assert_ne!(tokens.issue(ip), tok);
        tokens.tick(&mut rng, t0 + ROTATE_EVERY * 2);
        assert!(!tokens.valid(ip, &tok), "two rotations later it is gone");
    }
}
