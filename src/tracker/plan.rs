//! The announce plan: which tracker to ask and when. A pure state machine that the tracker
//! thread drives with the clock and the outcome of each request, so the policy is tested
//! without sockets.
//!
//! - **Every tier at once.** Each tier of the announce-list (BEP 12) keeps its own schedule and
//!   announces in parallel with the others, as Transmission and qBittorrent do: a dead first
//!   tier never delays the second.
//! - **A race within a tier.** Until one of a tier's trackers has answered, all of them are
//!   asked at once (a torrent's list is often mostly dead, and a dead tracker asked in turn
//!   would cost its delay). After that, an announce starts with the tier's first tracker (the
//!   last winner); if it has not answered after [`RACE_DELAY`], the next one starts as well,
//!   and so on. A tracker that fails moves the race on at once. The first answer wins: it
//!   moves to the front of its tier and later announces go to it alone. The losers still
//!   running are abandoned.
//! - **Per-tracker back-off.** A tracker that fails is not asked again for 5 s, doubling up
//!   to 5 min, so one blip (a tracker restarting) costs a few seconds, not the download. A
//!   slow or dead tracker only ever slows itself.
//! - **Giving up** works as for peers: a run with no peer and no tracker that ever answered
//!   ends (exit 6) once every tracker has failed [`GIVE_UP_FAILURES`] times in a row (about
//!   35 s of trying), or at once when retrying cannot help (a URL we cannot use, a
//!   certificate we do not trust). Trackers are still retried after that, slowly, while the
//!   run goes on for other reasons.
//! - `started` goes to each tracker until it has answered once; `completed` to every tracker
//!   that answered, once; `stopped` (at exit) to the same.

use std::time::{Duration, Instant};

use super::{AnnounceEvent, supported};
use crate::rng::Rng;

/// How long a tier's tracker has to answer before the next one of the tier starts as well.
pub const RACE_DELAY: Duration = Duration::from_secs(2);
/// Failures in a row after which a tracker no longer counts as a hope of peers (it is still
/// retried, slowly): the same rule as for dialling a peer.
pub const GIVE_UP_FAILURES: u32 = 4;
/// Trackers kept from one torrent (or magnet); the rest are ignored.
pub const MAX_TRACKERS: usize = 200;
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// When short of peers, a tier that answered asks again after this long even if its interval
/// is longer (never sooner than the tracker's `min interval`).
const SHORT_OF_PEERS_INTERVAL: Duration = Duration::from_secs(120);
/// "Not before the end of this run".
const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A request to start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub tracker: usize,
    pub event: AnnounceEvent,
}

#[derive(Debug)]
struct Entry {
    url: String,
    tier: usize,
    in_flight: bool,
    /// Failures in a row.
    failures: u32,
    retry_at: Option<Instant>,
    /// Retrying cannot help (a URL we cannot use).
    permanent: bool,
    /// Answered an announce this run: no more `started`; owed `stopped` at exit.
    registered: bool,
    /// Its last announce succeeded.
    working: bool,
    owes_completed: bool,
}

#[derive(Debug)]
enum Phase {
    Waiting(Instant),
    /// An announce is under way: `launched` are this race's trackers; the next one starts at
    /// `next` (`None`: nothing left to start, waiting for those in flight).
    Racing {
        next: Option<Instant>,
        launched: Vec<usize>,
    },
}

#[derive(Debug)]
struct Tier {
    /// Entry indices in the order to try; the last winner first.
    order: Vec<usize>,
    phase: Phase,
    /// When its last announce succeeded, and the `min interval` that answer asked for.
    last_ok: Option<Instant>,
    min_interval: Duration,
}

#[derive(Debug)]
pub struct Plan {
    entries: Vec<Entry>,
    tiers: Vec<Tier>,
    completed: bool,
}

impl Plan {
    /// Tiers in order, each shuffled once (BEP 12); URLs we cannot use are dropped, as are
    /// repeats and everything past [`MAX_TRACKERS`]. Every tier is due at once.
    pub fn new(tiers: &[Vec<String>], rng: &mut Rng, now: Instant) -> Plan {
        let mut plan = Plan {
            entries: Vec::new(),
            tiers: Vec::new(),
            completed: false,
        };
        let mut seen = std::collections::HashSet::new();
        for urls in tiers {
            let mut order = Vec::new();
            for url in urls {
                if plan.entries.len() >= MAX_TRACKERS {
                    break;
                }
                if !supported(url) || !seen.insert(url.as_str()) {
                    continue;
                }
                order.push(plan.entries.len());
                plan.entries.push(Entry {
                    url: url.clone(),
                    tier: plan.tiers.len(),
                    in_flight: false,
                    failures: 0,
                    retry_at: None,
                    permanent: false,
                    registered: false,
                    working: false,
                    owes_completed: false,
                });
            }
            if order.is_empty() {
                continue;
            }
            rng.shuffle(&mut order);
            plan.tiers.push(Tier {
                order,
                phase: Phase::Waiting(now),
                last_ok: None,
                min_interval: Duration::ZERO,
            });
        }
        plan
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn url(&self, tracker: usize) -> &str {
        &self.entries[tracker].url
    }

    /// Trackers whose last announce succeeded.
    pub fn working(&self) -> usize {
        self.entries.iter().filter(|e| e.working).count()
    }

    /// No tracker has answered this run and none is worth waiting for any more.
    pub fn given_up(&self) -> bool {
        !self.entries.iter().any(|e| e.registered)
            && self
                .entries
                .iter()
                .all(|e| e.permanent || e.failures >= GIVE_UP_FAILURES)
    }

    /// Requests to start now, at most `room` of them (the caller's cap on requests in flight).
    pub fn due(&mut self, now: Instant, mut room: usize) -> Vec<Launch> {
        let mut out = Vec::new();
        // `completed` to every tracker that answered (those that never did will hear
        // `started` with nothing left, which says the same).
        if self.completed {
            for (i, e) in self.entries.iter_mut().enumerate() {
                if room > 0
                    && e.owes_completed
                    && e.registered
                    && !e.in_flight
                    && e.retry_at.is_none_or(|t| t <= now)
                {
                    e.in_flight = true;
                    room -= 1;
                    out.push(Launch {
                        tracker: i,
                        event: AnnounceEvent::Completed,
                    });
                }
            }
        }
        // Each racing tier's next tracker. With more wanted than `room`, first tries go
        // before retries (then tier order): a hundred trackers failing again and again in
        // the first tiers must not keep the last tier's first announce waiting.
        let mut wanted: Vec<(u32, usize, usize)> = Vec::new();
        for t in 0..self.tiers.len() {
            if let Phase::Waiting(at) = self.tiers[t].phase
                && at <= now
            {
                self.tiers[t].phase = Phase::Racing {
                    next: Some(now),
                    launched: Vec::new(),
                };
            }
            let Tier {
                order,
                phase,
                last_ok,
                ..
            } = &mut self.tiers[t];
            // Until one of the tier's trackers has answered, every one of them is asked at
            // once (within `room`): nobody knows yet which are dead, and each dead one
            // would cost the race its delay.
            let all_at_once = last_ok.is_none();
            let Phase::Racing { next, launched } = phase else {
                continue;
            };
            if next.is_none_or(|at| at > now) {
                continue;
            }
            let entries = &self.entries;
            let mut candidates = order.iter().copied().filter(|&i| {
                let e = &entries[i];
                !launched.contains(&i)
                    && !e.in_flight
                    && !e.permanent
                    && e.retry_at.is_none_or(|at| at <= now)
            });
            match candidates.next() {
                Some(i) => {
                    wanted.push((entries[i].failures, t, i));
                    if all_at_once {
                        wanted.extend(candidates.map(|i| (entries[i].failures, t, i)));
                    }
                }
                None => {
                    *next = None;
                    if !launched.iter().any(|&i| entries[i].in_flight) {
                        // Everyone in the race failed: the tier waits for its first tracker
                        // to come out of back-off.
                        let at = self.earliest_retry(t, now);
                        self.tiers[t].phase = Phase::Waiting(at);
                    }
                }
            }
        }
        wanted.sort_unstable();
        // The rest start when requests in flight come back.
        for (_, t, i) in wanted.into_iter().take(room) {
            if let Phase::Racing { next, launched } = &mut self.tiers[t].phase {
                launched.push(i);
                *next = Some(now + RACE_DELAY);
            }
            let e = &mut self.entries[i];
            e.in_flight = true;
            let event = if !e.registered {
                // Sent after completion, `started` says `left=0`: no `completed` needed.
                if self.completed {
                    e.owes_completed = false;
                }
                AnnounceEvent::Started
            } else if e.owes_completed {
                AnnounceEvent::Completed
            } else {
                AnnounceEvent::Periodic
            };
            out.push(Launch { tracker: i, event });
        }
        out
    }

    fn earliest_retry(&self, tier: usize, now: Instant) -> Instant {
        self.tiers[tier]
            .order
            .iter()
            .map(|&i| &self.entries[i])
            .filter(|e| !e.permanent)
            .map(|e| e.retry_at.unwrap_or(now).max(now))
            .min()
            .unwrap_or(now + FAR)
    }

    /// When [`Plan::due`] may next have something to start (results and commands aside).
    pub fn next_wakeup(&self) -> Option<Instant> {
        let tiers = self.tiers.iter().filter_map(|t| match &t.phase {
            Phase::Waiting(at) => Some(*at),
            Phase::Racing { next, .. } => *next,
        });
        let completions = self
            .entries
            .iter()
            .filter(|e| self.completed && e.owes_completed && !e.in_flight)
            .filter_map(|e| e.retry_at);
        tiers.chain(completions).min()
    }

    /// `tracker` answered. `wait` is the time to its next announce, `min_interval` the least
    /// the tracker allows. Returns the trackers of the same race still in flight, now
    /// abandoned.
    pub fn answered(
        &mut self,
        tracker: usize,
        event: AnnounceEvent,
        wait: Duration,
        min_interval: Duration,
        now: Instant,
    ) -> Vec<usize> {
        let e = &mut self.entries[tracker];
        e.in_flight = false;
        e.failures = 0;
        e.retry_at = None;
        e.registered = true;
        e.working = true;
        if event == AnnounceEvent::Completed {
            e.owes_completed = false;
        }
        let t = e.tier;
        let tier = &mut self.tiers[t];
        let Phase::Racing { launched, .. } = &tier.phase else {
            // A late answer from an abandoned racer or a `completed`: its peers are welcome,
            // the schedule stays.
            return Vec::new();
        };
        let abandoned = launched
            .iter()
            .copied()
            .filter(|&i| i != tracker && self.entries[i].in_flight)
            .collect();
        if let Some(pos) = tier.order.iter().position(|&i| i == tracker) {
            tier.order.remove(pos);
            tier.order.insert(0, tracker);
        }
        tier.last_ok = Some(now);
        tier.min_interval = min_interval;
        tier.phase = Phase::Waiting(now + wait.max(min_interval));
        abandoned
    }

    /// `tracker` failed; `permanent` when asking again cannot help. Returns true for the
    /// first failure after a success or since the start (the one worth reporting).
    pub fn failed(&mut self, tracker: usize, permanent: bool, now: Instant) -> bool {
        let e = &mut self.entries[tracker];
        e.in_flight = false;
        e.working = false;
        e.failures = e.failures.saturating_add(1);
        e.permanent |= permanent;
        let backoff = FIRST_BACKOFF * (1u32 << (e.failures - 1).min(6));
        e.retry_at = Some(now + backoff.min(MAX_BACKOFF));
        let first = e.failures == 1;
        if let Phase::Racing { next, launched } = &mut self.tiers[e.tier].phase
            && launched.contains(&tracker)
        {
            // Move on at once.
            *next = Some(now);
        }
        first
    }

    /// A request we abandoned came back without an answer: it says nothing of the tracker.
    pub fn abandoned(&mut self, tracker: usize) {
        self.entries[tracker].in_flight = false;
    }

    /// The download completed: `completed` is owed to every tracker that answered, and to
    /// those whose `started` (sent before, with bytes left) is still on its way.
    pub fn complete(&mut self) {
        self.completed = true;
        for e in &mut self.entries {
            e.owes_completed = e.registered || e.in_flight;
        }
    }

    /// A tracker that answered before has a request in flight: worth a short wait at exit
    /// (a `completed` on its way, say). Trackers that never answered are not waited for.
    pub fn registered_in_flight(&self) -> bool {
        self.entries.iter().any(|e| e.registered && e.in_flight)
    }

    pub fn is_registered(&self, tracker: usize) -> bool {
        self.entries[tracker].registered
    }

    /// Whether `tracker` still has to hear `completed`.
    pub fn owes_completed(&self, tracker: usize) -> bool {
        let e = &self.entries[tracker];
        self.completed && e.registered && e.owes_completed
    }

    /// The session is short of peers: tiers that answered ask again early, within what their
    /// tracker's `min interval` allows.
    pub fn need_peers(&mut self) {
        for tier in &mut self.tiers {
            if let (Phase::Waiting(at), Some(ok)) = (&mut tier.phase, tier.last_ok) {
                let soon = ok + SHORT_OF_PEERS_INTERVAL.max(tier.min_interval);
                *at = (*at).min(soon);
            }
        }
    }

    /// The trackers owed `stopped`: each that answered this run, last winners first.
    pub fn registered(&self) -> Vec<usize> {
        let winners = self.tiers.iter().filter_map(|t| t.order.first().copied());
        let mut out: Vec<usize> = winners.filter(|&i| self.entries[i].registered).collect();
        for (i, e) in self.entries.iter().enumerate() {
            if e.registered && !out.contains(&i) {
                out.push(i);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(spec: &[&[&str]], now: Instant) -> Plan {
        let tiers: Vec<Vec<String>> = spec
            .iter()
            .map(|t| t.iter().map(|s| s.to_string()).collect())
            .collect();
        Plan::new(&tiers, &mut Rng::new(7), now)
    }

    fn urls(p: &Plan, l: &[Launch]) -> Vec<String> {
        l.iter().map(|l| p.url(l.tracker).to_string()).collect()
    }

    #[test]
    fn unusable_and_repeated_urls_are_dropped_and_the_count_is_capped() {
        let now = Instant::now();
        let p = plan(
            &[&["http://a/", "ftp://x/", "http://a/"], &[], &["wss://y"]],
            now,
        );
        assert_eq!(p.len(), 1);
        let many: Vec<String> = (0..500).map(|i| format!("udp://t{i}:1")).collect();
        let p = Plan::new(&[many], &mut Rng::new(1), now);
        assert_eq!(p.len(), MAX_TRACKERS);
        assert!(plan(&[&["wss://only"]], now).given_up(), "nothing usable");
    }

    #[test]
    fn every_tier_starts_at_once() {
        let now = Instant::now();
        let mut p = plan(&[&["http://a/"], &["http://b/"], &["udp://c:1"]], now);
        let l = p.due(now, 16);
        assert_eq!(urls(&p, &l), ["http://a/", "http://b/", "udp://c:1"]);
        assert!(l.iter().all(|l| l.event == AnnounceEvent::Started));
        assert!(p.due(now, 16).is_empty(), "nothing twice");
    }

    #[test]
    fn the_first_announce_asks_a_whole_tier_at_once() {
        let t0 = Instant::now();
        let mut p = plan(&[&["http://a/", "http://b/", "http://c/"]], t0);
        let all = p.due(t0, 16);
        assert_eq!(all.len(), 3, "nobody has answered yet: all at once");
        let abandoned = p.answered(
            all[1].tracker,
            all[1].event,
            Duration::from_secs(60),
            Duration::ZERO,
            t0,
        );
        assert_eq!(abandoned.len(), 2, "the others lost the race");
        assert_eq!(p.due(t0, 2).len(), 0);
    }

    #[test]
    fn a_silent_tracker_is_raced_and_the_winner_promoted() {
        let t0 = Instant::now();
        let mut p = plan(&[&["http://a/", "http://b/", "http://c/"]], t0);
        // A first round: `b`... answers, so later announces race one at a time.
        let all = p.due(t0, 16);
        let w = all[0];
        p.answered(
            w.tracker,
            w.event,
            Duration::from_secs(60),
            Duration::ZERO,
            t0,
        );
        for l in &all[1..] {
            p.abandoned(l.tracker);
        }
        let t0 = t0 + Duration::from_secs(60);
        // The winner goes silent this time.
        let first = p.due(t0, 16);
        assert_eq!(first.len(), 1, "one tracker of the tier at a time");
        assert_eq!(first[0].tracker, w.tracker, "the last winner first");
        assert!(p.due(t0 + RACE_DELAY / 2, 16).is_empty());
        let t1 = t0 + RACE_DELAY;
        let second = p.due(t1, 16);
        assert_eq!(second.len(), 1, "the next starts beside the silent one");
        assert_ne!(first[0].tracker, second[0].tracker);
        // The second answers: it wins, the first is abandoned.
        let abandoned = p.answered(
            second[0].tracker,
            second[0].event,
            Duration::from_secs(1800),
            Duration::ZERO,
            t1,
        );
        assert_eq!(abandoned, [first[0].tracker]);
        assert_eq!(p.working(), 2, "the silent one has not failed yet");
        assert!(p.due(t1 + RACE_DELAY * 10, 16).is_empty(), "no more racing");
        p.abandoned(first[0].tracker);
        // The next announce goes to the winner first, as a periodic one.
        let again = p.due(t1 + Duration::from_secs(1800), 16);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].tracker, second[0].tracker);
        assert_eq!(again[0].event, AnnounceEvent::Periodic);
    }

    #[test]
    fn failures_move_the_race_on_at_once_and_back_off() {
        let t0 = Instant::now();
        let mut p = plan(&[&["http://a/", "http://b/", "http://c/"]], t0);
        // A first round in which `c` answers, so later rounds race.
        for l in p.due(t0, 16) {
            if p.url(l.tracker) == "http://c/" {
                p.answered(
                    l.tracker,
                    l.event,
                    Duration::from_secs(60),
                    Duration::ZERO,
                    t0,
                );
            } else {
                p.abandoned(l.tracker);
            }
        }
        let t0 = t0 + Duration::from_secs(60);
        let c = p.due(t0, 16);
        assert_eq!(c.len(), 1);
        assert!(
            p.failed(c[0].tracker, false, t0),
            "the first failure is reported"
        );
        let next = p.due(t0, 16);
        assert_eq!(next.len(), 1, "the failure moved the race on at once");
        assert!(p.failed(next[0].tracker, false, t0));
        let last = p.due(t0, 16);
        assert_eq!(last.len(), 1);
        assert!(p.failed(last[0].tracker, false, t0));
        assert!(p.due(t0, 16).is_empty(), "everyone failed");
        // Back-off: nothing before it ends, then again.
        assert!(p.due(t0 + FIRST_BACKOFF / 2, 16).is_empty());
        assert_eq!(p.next_wakeup(), Some(t0 + FIRST_BACKOFF));
        let retry = p.due(t0 + FIRST_BACKOFF, 16);
        assert_eq!(retry.len(), 1);
        assert!(
            !p.failed(retry[0].tracker, false, t0 + FIRST_BACKOFF),
            "reported once"
        );
    }

    #[test]
    fn gives_up_after_repeated_failures_each_or_a_permanent_one() {
        let mut now = Instant::now();
        let mut p = plan(&[&["http://a/"], &["udp://b:1"]], now);
        let mut launches = 0;
        while !p.given_up() {
            assert!(launches < 100, "never gave up");
            for l in p.due(now, 16) {
                launches += 1;
                p.failed(l.tracker, false, now);
            }
            now = p.next_wakeup().expect("a retry is planned");
        }
        assert_eq!(launches, 2 * GIVE_UP_FAILURES);
        let mut p = plan(&[&["http://a/"]], now);
        let l = p.due(now, 16);
        p.failed(l[0].tracker, true, now);
        assert!(p.given_up());
        assert!(p.due(now, 16).is_empty(), "never asked again");
        assert!(
            p.next_wakeup()
                .is_some_and(|t| t > now + Duration::from_secs(3600))
        );
        // One that answered once is never given up.
        let mut p = plan(&[&["http://a/"]], now);
        let l = p.due(now, 16)[0];
        p.answered(
            l.tracker,
            l.event,
            Duration::from_secs(60),
            Duration::ZERO,
            now,
        );
        for _ in 0..10 {
            p.failed(l.tracker, false, now);
        }
        assert!(!p.given_up());
    }

    #[test]
    fn room_caps_requests_in_flight() {
        let now = Instant::now();
        let spec: Vec<Vec<String>> = (0..10).map(|i| vec![format!("udp://t{i}:1")]).collect();
        let mut p = Plan::new(&spec, &mut Rng::new(2), now);
        assert_eq!(p.due(now, 4).len(), 4);
        assert_eq!(p.due(now, 0).len(), 0);
        assert_eq!(p.due(now, 16).len(), 6, "the rest start when there is room");
    }

    #[test]
    fn first_tries_go_before_retries_when_room_is_short() {
        let now = Instant::now();
        let spec: Vec<Vec<String>> = (0..6).map(|i| vec![format!("udp://t{i}:1")]).collect();
        let mut p = Plan::new(&spec, &mut Rng::new(2), now);
        for l in p.due(now, 3) {
            p.failed(l.tracker, false, now);
        }
        let later = now + FIRST_BACKOFF;
        let next = p.due(later, 3);
        assert_eq!(next.len(), 3);
        assert!(
            next.iter().all(|l| p.url(l.tracker) >= "udp://t3:1"),
            "the untried tiers first: {:?}",
            urls(&p, &next)
        );
    }

    #[test]
    fn completed_goes_to_every_tracker_that_answered_and_stopped_too() {
        let now = Instant::now();
        let mut p = plan(&[&["http://a/"], &["http://b/"], &["http://c/"]], now);
        let l = p.due(now, 16);
        let wait = Duration::from_secs(1800);
        p.answered(l[0].tracker, l[0].event, wait, Duration::ZERO, now);
        p.answered(l[1].tracker, l[1].event, wait, Duration::ZERO, now);
        p.failed(l[2].tracker, false, now);
        p.complete();
        let done = p.due(now, 16);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| d.event == AnnounceEvent::Completed));
        for d in &done {
            p.answered(d.tracker, d.event, wait, Duration::ZERO, now);
        }
        let later = p.due(now + FIRST_BACKOFF, 16);
        assert_eq!(later.len(), 1, "the failed one is retried, with started");
        assert_eq!(later[0].event, AnnounceEvent::Started);
        assert_eq!(p.registered().len(), 2);
        p.answered(later[0].tracker, later[0].event, wait, Duration::ZERO, now);
        assert!(
            !p.owes_completed(later[0].tracker),
            "its started said left=0"
        );
        assert!(p.due(now + FIRST_BACKOFF, 16).is_empty());
    }

    #[test]
    fn completed_follows_a_started_that_was_in_flight_at_completion() {
        let now = Instant::now();
        let mut p = plan(&[&["http://a/"]], now);
        let l = p.due(now, 16)[0];
        p.complete();
        assert!(p.due(now, 16).is_empty(), "not before it answered");
        p.answered(
            l.tracker,
            l.event,
            Duration::from_secs(60),
            Duration::ZERO,
            now,
        );
        assert!(p.owes_completed(l.tracker));
        let c = p.due(now, 16);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].event, AnnounceEvent::Completed);
        assert!(p.registered_in_flight());
    }

    #[test]
    fn short_of_peers_asks_early_within_min_interval() {
        let now = Instant::now();
        let mut p = plan(&[&["http://a/"]], now);
        let l = p.due(now, 16)[0];
        p.answered(
            l.tracker,
            l.event,
            Duration::from_secs(1800),
            Duration::from_secs(300),
            now,
        );
        p.need_peers();
        assert_eq!(p.next_wakeup(), Some(now + Duration::from_secs(300)));
    }
}
