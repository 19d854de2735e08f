//! The operator-wide limiter for requests to GoTo's token endpoints: how many may be under way
//! or recently answered at once, and how that number adapts to GoTo's 429s.
//!
//! GoTo documents a default limit of 10 requests per second and counts arrivals in its own
//! one-second windows. A request reaches GoTo at some moment between the hand-out of its permit
//! and its answer here, so a request counts from its hand-out until one window (plus
//! [`WINDOW_MARGIN`]) after its answer, and a request in flight always counts. Then no window of
//! GoTo's holds more than the allowed rate however late a request leaves (a loaded machine) or
//! however long it travels: of the requests that arrive within one second, the last to be
//! handed out found every other one still counting.
//!
//! The allowed rate adapts (AIMD). A 429 halves it, once for all the requests handed out at the
//! old rate (their 429s say nothing new), and never below a quarter of `--token-rate-limit`
//! ([`Pace::floor`]): a provider that answers 429 whatever the pace (an incident, a shared quota)
//! must not stall every client's refresh, and each client that drew a 429 waits for its
//! `Retry-After` in its own backoff anyway. Without a 429 the rate climbs back by 1 per
//! [`RECOVERY_STEP`] up to just below the rate that drew the last 429, and past that by 1 per
//! [`PROBE_STEP`] only, up to `--token-rate-limit`: a provider whose limit is lower than
//! configured costs one or two bursts of 429s, then a probe every half minute.
//!
//! Hand-written rather than a crate: `governor` and tower's rate limit pace hand-outs (a GCRA or a
//! fixed window from the hand-out), with neither a count that lasts until the answer nor a rate
//! that adapts. [`Pace`] is a synchronous state machine over explicit instants, so its tests
//! drive it exactly; [`RateLimiter`] queues the waiters in order around it.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::time::Instant;
use tracing::warn;

/// Added to the one-second window for GoTo's own timing (how it rounds, what it counts as a
/// second). Small, because counting from the answer already leaves a margin of the request's
/// whole duration; every millisecond here costs throughput, since with a backlog each place
/// turns over once per window plus the request's duration.
pub(crate) const WINDOW_MARGIN: Duration = Duration::from_millis(50);
/// How long an answered request counts.
pub(crate) const WINDOW: Duration = Duration::from_secs(1).saturating_add(WINDOW_MARGIN);
/// Without a 429 for this long, the rate climbs by 1 per second while below the rate that drew
/// the last 429.
pub(crate) const RECOVERY_STEP: Duration = Duration::from_secs(3);
/// Without a 429 for this long, the rate climbs by 1 per second to or past the rate that drew
/// the last 429.
pub(crate) const PROBE_STEP: Duration = Duration::from_secs(30);

/// Why no request may be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Not before this instant (the oldest answer leaves the window).
    Until(Instant),
    /// Not before a request in flight is answered.
    Answer,
}

/// The window and the allowed rate. See the module documentation.
#[derive(Debug)]
pub(crate) struct Pace {
    configured: u32,
    rate: u32,
    /// The rate that drew the last 429, until the rate is back at `configured`.
    ceiling: Option<u32>,
    in_flight: usize,
    /// When the answers still in the window came, oldest first.
    answered: VecDeque<Instant>,
    /// Counts the decreases: a 429 for a request handed out before the last one changes nothing.
    epoch: u64,
    /// The last 429 that lowered the rate, or the last step back up: recovery counts from here.
    calm_since: Instant,
}

impl Pace {
    /// At most `per_second` requests in any window of one second plus the margin.
    pub(crate) fn new(per_second: u32, now: Instant) -> Pace {
        let configured = per_second.max(1);
        Pace {
            configured,
            rate: configured,
            ceiling: None,
            in_flight: 0,
            answered: VecDeque::new(),
            epoch: 0,
            calm_since: now,
        }
    }

    /// Requests allowed per window now.
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    /// The lowest rate a 429 leads to: a quarter of the configured one, at least 1.
    pub(crate) fn floor(&self) -> u32 {
        self.configured.div_ceil(4)
    }

    /// A place for one request at `now`, with the epoch it is handed out in.
    pub(crate) fn try_acquire(&mut self, now: Instant) -> Result<u64, Wait> {
        self.recover(now);
        while self
            .answered
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            self.answered.pop_front();
        }
        if self.in_flight + self.answered.len() >= self.rate as usize {
            return Err(self
                .answered
                .front()
                .map_or(Wait::Answer, |oldest| Wait::Until(*oldest + WINDOW)));
        }
        self.in_flight += 1;
        Ok(self.epoch)
    }

    /// The request handed out in `epoch` was answered at `now` (or given up: it counts as
    /// answered then). Returns whether its 429 lowered the rate.
    pub(crate) fn answer(&mut self, epoch: u64, rate_limited: bool, now: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.answered.push_back(now);
        if !rate_limited || epoch != self.epoch {
            return false;
        }
        self.ceiling = Some(self.rate);
        self.rate = (self.rate / 2).max(self.floor());
        self.epoch += 1;
        self.calm_since = now;
        true
    }

    /// Climbs back towards the configured rate after a calm spell.
    fn recover(&mut self, now: Instant) {
        while self.rate < self.configured {
            let step = match self.ceiling {
                Some(ceiling) if self.rate + 1 >= ceiling => PROBE_STEP,
                _ => RECOVERY_STEP,
            };
            if now.duration_since(self.calm_since) < step {
                return;
            }
            self.rate += 1;
            self.calm_since += step;
            if self.rate >= self.configured {
                self.ceiling = None;
            }
        }
    }
}

/// The right to send one request to GoTo's token endpoint now; it counts until answered.
#[must_use]
pub(crate) struct Permit {
    limiter: Option<Arc<RateLimiter>>,
    epoch: u64,
}

impl Permit {
    /// The request was answered; `rate_limited`: with a 429. Returns whether that lowered the
    /// rate.
    pub(crate) fn answered(mut self, rate_limited: bool) -> bool {
        self.limiter
            .take()
            .is_some_and(|limiter| limiter.answer(self.epoch, rate_limited))
    }
}

impl Drop for Permit {
    /// A permit dropped unanswered (the request was not sent, or its future was dropped)
    /// counts as answered now.
    fn drop(&mut self) {
        if let Some(limiter) = self.limiter.take() {
            limiter.answer(self.epoch, false);
        }
    }
}

/// Hands out [`Permit`]s in the order they were asked for.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Held by the waiter at the head of the line (tokio's Mutex is fair: the others queue in
    /// order behind it).
    line: tokio::sync::Mutex<()>,
    pace: Mutex<Pace>,
    /// An answer came: the head of the line may go.
    answered: tokio::sync::Notify,
}

impl RateLimiter {
    /// At most `per_second` requests in any window of one second (plus the margin).
    pub(crate) fn new(per_second: u32) -> Arc<RateLimiter> {
        Arc::new(RateLimiter {
            line: tokio::sync::Mutex::new(()),
            pace: Mutex::new(Pace::new(per_second, Instant::now())),
            answered: tokio::sync::Notify::new(),
        })
    }

    fn pace(&self) -> MutexGuard<'_, Pace> {
        self.pace.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests allowed per second now (recovery counted up to this moment).
    pub(crate) fn rate(&self) -> u32 {
        let mut pace = self.pace();
        pace.recover(Instant::now());
        pace.rate()
    }

    /// Waits until a request may be sent within the limit.
    pub(crate) async fn acquire(self: &Arc<Self>) -> Permit {
        let _head = self.line.lock().await;
        loop {
            let wait = self.pace().try_acquire(Instant::now());
            match wait {
                Ok(epoch) => {
                    return Permit {
                        limiter: Some(self.clone()),
                        epoch,
                    };
                }
                Err(Wait::Until(at)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.answered.notified() => {}
                    }
                }
                Err(Wait::Answer) => self.answered.notified().await,
            }
        }
    }

    fn answer(&self, epoch: u64, rate_limited: bool) -> bool {
        let (lowered, rate) = {
            let mut pace = self.pace();
            let lowered = pace.answer(epoch, rate_limited, Instant::now());
            (lowered, pace.rate())
        };
        if lowered {
            warn!(
                rate,
                "GoTo answered 429: token requests lowered to {rate} per second"
            );
        }
        // One waiter at most waits for an answer (the head of the line); a stored permit
        // covers the moment before it starts waiting.
        self.answered.notify_one();
        lowered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_request_counts_until_a_window_after_its_answer() {
        let t0 = Instant::now();
        let mut pace = Pace::new(2, t0);
        let a = pace.try_acquire(t0).unwrap();
        let b = pace.try_acquire(t0).unwrap();
        assert_eq!(pace.try_acquire(t0), Err(Wait::Answer), "both in flight");
        // A slow answer: the window counts from it, not from the hand-out.
        pace.answer(a, false, t0 + ms(800));
        assert_eq!(
            pace.try_acquire(t0 + ms(900)),
            Err(Wait::Until(t0 + ms(800) + WINDOW)),
            "one answered a moment ago, one in flight: until the answer leaves the window"
        );
        pace.answer(b, false, t0 + ms(900));
        assert_eq!(
            pace.try_acquire(t0 + ms(1000)),
            Err(Wait::Until(t0 + ms(800) + WINDOW))
        );
        assert!(pace.try_acquire(t0 + ms(800) + WINDOW).is_ok());
    }

    #[test]
    fn a_429_halves_the_rate_once_per_burst_and_not_below_the_floor() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, t0);
        let burst: Vec<u64> = (0..10).map(|_| pace.try_acquire(t0).unwrap()).collect();
        assert!(pace.answer(burst[0], true, t0 + ms(10)));
        assert_eq!(pace.rate(), 5);
        for epoch in &burst[1..] {
            assert!(!pace.answer(*epoch, true, t0 + ms(20)), "same burst");
        }
        assert_eq!(pace.rate(), 5);
        let later = t0 + ms(20) + WINDOW;
        let next = pace.try_acquire(later).unwrap();
        assert!(pace.answer(next, true, later));
        assert_eq!(pace.rate(), 3, "a quarter of 10, rounded up");
        let next = pace.try_acquire(later + WINDOW).unwrap();
        assert!(pace.answer(next, true, later + WINDOW));
        assert_eq!(pace.rate(), 3, "the floor holds");
        assert_eq!(Pace::new(1, t0).floor(), 1);
    }

    #[test]
    fn the_rate_climbs_back_quickly_below_the_ceiling_and_slowly_past_it() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, t0);
        let e = pace.try_acquire(t0).unwrap();
        pace.answer(e, true, t0);
        assert_eq!(pace.rate(), 5);
        let _ = pace.try_acquire(t0 + RECOVERY_STEP * 3);
        assert_eq!(pace.rate(), 8);
        let _ = pace.try_acquire(t0 + RECOVERY_STEP * 5);
        assert_eq!(pace.rate(), 9, "just below the 10 that drew the 429");
        // The probe counts from the last step up (at 4 steps).
        let _ = pace.try_acquire(t0 + RECOVERY_STEP * 4 + PROBE_STEP - ms(1));
        assert_eq!(pace.rate(), 9);
        let _ = pace.try_acquire(t0 + RECOVERY_STEP * 4 + PROBE_STEP);
        assert_eq!(pace.rate(), 10, "back at the configured rate");
        let _ = pace.try_acquire(t0 + RECOVERY_STEP * 5 + PROBE_STEP * 9);
        assert_eq!(pace.rate(), 10, "never past it");
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_of_one_second_sees_more_than_the_limit() {
        let limiter = RateLimiter::new(10);
        let start = Instant::now();
        let mut sent = Vec::new();
        for i in 0..45u64 {
            if i % 7 == 0 {
                // Late callers, as when a request leaves after others queued.
                tokio::time::sleep(ms(130)).await;
            }
            let permit = limiter.acquire().await;
            sent.push(Instant::now());
            // Each request takes a while to be answered.
            tokio::time::sleep(ms(5 * (i % 4))).await;
            assert!(!permit.answered(false));
        }
        for (i, t) in sent.iter().enumerate() {
            let in_window = sent[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
                .count();
            assert!(in_window <= 10, "{in_window} permits within one second");
        }
        assert!(start.elapsed() < Duration::from_secs(6), "it still moves");
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_an_answer_wakes_the_head() {
        let limiter = RateLimiter::new(1);
        let first = limiter.acquire().await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            let limiter = limiter.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let permit = limiter.acquire().await;
                tx.send(i).unwrap();
                drop(permit);
            });
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(ms(3000)).await;
        assert!(rx.try_recv().is_err(), "nobody passes a request in flight");
        drop(first);
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, vec![0, 1, 2]);
    }
}
