//! One web seed's standing (pure, owned by the session): back-off after failures, files the
//! server does not have, hash failures, and when to give the seed up.

use std::time::{Duration, Instant};

use super::response::Fault;

/// Failed requests in a row (timeouts, broken bodies, `5xx`, `429`/`503`) before a seed is
/// given up.
pub const MAX_FAILURES: u32 = 6;
/// Pieces that failed their hash with only this seed's data in them before it is given up.
pub const MAX_HASH_FAILS: u32 = 3;
/// Failed pieces this seed shared with other sources before it is given up: an honest seed
/// whose runs meet a lying source's must outlast it (the liar's own pieces drop it first).
pub const MAX_SHARED_HASH_FAILS: u32 = 8;
/// Back-off after the first failure; it doubles with each one after, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Health {
    failures: u32,
    hash_fails: u32,
    shared_hash_fails: u32,
    until: Option<Instant>,
    /// Per file: the server said it does not have it.
    missing: Vec<bool>,
}

/// The back-off after `failures` failures in a row (at least one).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

impl Health {
    pub fn new(files: usize) -> Health {
        Health {
            failures: 0,
            hash_fails: 0,
            shared_hash_fails: 0,
            until: None,
            missing: vec![false; files],
        }
    }

    /// Whether the seed may be asked now (not backing off).
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// Whether the server may have file `f` (it has not said otherwise).
    pub fn has_file(&self, f: usize) -> bool {
        !self.missing.get(f).copied().unwrap_or(true)
    }

    /// Bytes arrived: the failures in a row are over.
    pub fn delivered(&mut self) {
        self.failures = 0;
    }

    /// A request failed. `wanted[f]`: file `f` still holds bytes we want from a web seed.
    /// Returns why the seed should be given up, if it should.
    pub fn fault(&mut self, now: Instant, fault: &Fault, wanted: &[bool]) -> Option<String> {
        match fault {
            Fault::Fatal(m) => return Some(m.clone()),
            Fault::FileMissing { file, status } => {
                if let Some(m) = self.missing.get_mut(*file) {
                    *m = true;
                }
                let any_left = wanted
                    .iter()
                    .enumerate()
                    .any(|(f, w)| *w && self.has_file(f));
                if !any_left {
                    return Some(format!("HTTP {status}: the server has none of the files"));
                }
            }
            Fault::Busy { retry_after, .. } => {
                self.failures += 1;
                let wait = retry_after.unwrap_or_else(|| backoff(self.failures));
                self.until = Some(now + wait.min(MAX_BACKOFF));
            }
            Fault::Transient(_) => {
                self.failures += 1;
                self.until = Some(now + backoff(self.failures));
            }
        }
        (self.failures >= MAX_FAILURES)
            .then(|| format!("{fault} ({} failures in a row)", self.failures))
    }

    /// A piece with this seed's data in it failed its hash; `sole`: nobody else's data was
    /// in it. Returns why the seed should be given up, if it should.
    pub fn hash_failed(&mut self, sole: bool) -> Option<String> {
        if sole {
            self.hash_fails += 1;
        } else {
            self.shared_hash_fails += 1;
        }
        if self.hash_fails >= MAX_HASH_FAILS {
            Some(format!(
                "{} pieces from this web seed alone failed their hash check",
                self.hash_fails
            ))
        } else if self.shared_hash_fails >= MAX_SHARED_HASH_FAILS {
            Some(format!(
                "{} pieces with data from this web seed failed their hash check",
                self.shared_hash_fails
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn busy_waits_as_told_within_the_cap_and_delivery_resets_the_count() {
        let now = Instant::now();
        let mut h = Health::new(1);
        let busy = Fault::Busy {
            status: 503,
            retry_after: Some(Duration::from_secs(20)),
        };
        assert_eq!(h.fault(now, &busy, &[true]), None);
        assert!(!h.ready(now + Duration::from_secs(19)));
        assert!(h.ready(now + Duration::from_secs(20)));
        let long = Fault::Busy {
            status: 429,
            retry_after: Some(Duration::from_secs(100_000)),
        };
        assert_eq!(h.fault(now, &long, &[true]), None);
        assert!(h.ready(now + MAX_BACKOFF));
        h.delivered();
        for _ in 1..MAX_FAILURES {
            assert_eq!(h.fault(now, &Fault::Transient("x".into()), &[true]), None);
        }
        assert!(
            h.fault(now, &Fault::Transient("x".into()), &[true])
                .is_some()
        );
    }

    #[test]
    fn a_missing_file_is_skipped_until_none_is_left() {
        let now = Instant::now();
        let mut h = Health::new(3);
        let missing = |file| Fault::FileMissing { file, status: 404 };
        // File 2 is wanted by nobody (already had).
        let wanted = [true, true, false];
        assert_eq!(h.fault(now, &missing(0), &wanted), None);
        assert!(!h.has_file(0) && h.has_file(1));
        assert!(h.ready(now), "a missing file is no reason to wait");
        assert!(h.fault(now, &missing(1), &wanted).is_some());
    }

    #[test]
    fn fatal_faults_and_three_bad_pieces_give_the_seed_up() {
        let mut h = Health::new(1);
        assert!(
            h.fault(Instant::now(), &Fault::Fatal("tls".into()), &[true])
                .is_some()
        );
        assert_eq!(h.hash_failed(true), None);
        assert_eq!(h.hash_failed(true), None);
        assert!(h.hash_failed(true).is_some());
    }

    #[test]
    fn pieces_shared_with_others_weigh_less() {
        let mut h = Health::new(1);
        for _ in 1..MAX_SHARED_HASH_FAILS {
            assert_eq!(h.hash_failed(false), None);
        }
        assert!(h.hash_failed(false).is_some());
    }
}
