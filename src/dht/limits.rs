//! Rate limits on the queries we answer: a token bucket per source IP and one for everything,
//! so a flood (or a spoofed flood naming a victim) costs us little and gets a victim nothing.
//!
//! The per-IP map is bounded; an entry idle long enough to have refilled is the same as no
//! entry, so those are dropped when the map is full. If it is still full (a spoofed flood from
//! thousands of addresses), unknown addresses share the global bucket only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

pub(crate) const PER_IP_RATE: f64 = 20.0;
pub(crate) const PER_IP_BURST: f64 = 40.0;
pub(crate) const GLOBAL_RATE: f64 = 500.0;
pub(crate) const GLOBAL_BURST: f64 = 1000.0;
pub(crate) const MAX_TRACKED_IPS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refilled(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * PER_IP_RATE
            >= PER_IP_BURST
    }
}

/// A plain token bucket for a rate of our own (pings we send to nodes that queried us).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    bucket: Bucket,
    rate: f64,
    burst: f64,
}

impl Rate {
    pub(crate) fn new(rate: f64, burst: f64, now: Instant) -> Rate {
        Rate {
            bucket: Bucket::full(burst, now),
            rate,
            burst,
        }
    }

    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.bucket.take(self.rate, self.burst, now)
    }
}

#[derive(Debug)]
pub(crate) struct QueryLimiter {
    per_ip: HashMap<IpAddr, Bucket>,
    global: Bucket,
}

impl QueryLimiter {
    pub(crate) fn new(now: Instant) -> QueryLimiter {
        QueryLimiter {
            per_ip: HashMap::new(),
            global: Bucket::full(GLOBAL_BURST, now),
        }
    }

    /// Whether to answer one more query from `ip` now.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.per_ip.contains_key(&ip) && self.per_ip.len() >= MAX_TRACKED_IPS {
            self.per_ip.retain(|_, b| !b.refilled(now));
        }
        let ip_ok = if let Some(b) = self.per_ip.get_mut(&ip) {
            b.take(PER_IP_RATE, PER_IP_BURST, now)
        } else if self.per_ip.len() < MAX_TRACKED_IPS {
            let mut b = Bucket::full(PER_IP_BURST, now);
            let ok = b.take(PER_IP_RATE, PER_IP_BURST, now);
            self.per_ip.insert(ip, b);
            ok
        } else {
            true
        };
        ip_ok && self.global.take(GLOBAL_RATE, GLOBAL_BURST, now)
    }

    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.per_ip.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_ip_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = QueryLimiter::new(t0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let allowed = (0..100).filter(|_| l.allow(ip, t0)).count();
        assert_eq!(allowed, PER_IP_BURST as usize);
        assert!(
            l.allow("10.0.0.2".parse().unwrap(), t0),
            "others unaffected"
        );
        assert!(
            l.allow(ip, t0 + Duration::from_millis(60)),
            "refills at 20/s"
        );
    }

    #[test]
    fn global_cap_and_bounded_map() {
        let t0 = Instant::now();
        let mut l = QueryLimiter::new(t0);
        let mut allowed = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            allowed += usize::from(l.allow(ip, t0));
        }
        assert_eq!(allowed, GLOBAL_BURST as usize);
        assert!(l.tracked() <= MAX_TRACKED_IPS);
    }
}
