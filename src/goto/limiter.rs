//! The pace of requests to GoTo's token endpoint: how many may be under way or recently answered
//! at once, how that number adapts to GoTo's 429s, and the pauses its `Retry-After` asks for.
//!
//! A synchronous state machine over explicit instants, so the tests drive it exactly; the
//! [`super::queue`] decides who gets the next request and when to ask again.
//!
//! GoTo counts requests in its own one-second windows (sliding or fixed, measured at its end).
//! A request reaches GoTo at some moment between the hand-out of its permit and its answer here,
//! so a request counts from its hand-out until one window (plus [`WINDOW_MARGIN`]) after its
//! answer, and a request in flight always counts. Then no window of GoTo's can hold more than
//! the allowed rate, however late a request leaves or however long it travels: of the requests
//! that arrive in one second, the last to be handed out found every other one still counting.
//!
//! The allowed rate adapts (AIMD): a 429 halves it (at least 1 per second, once for all the
//! requests sent at the old rate) and pauses every request for its `Retry-After` (1 s when
//! absent, at most [`MAX_PAUSE`]); then it climbs back by a tenth of `--token-rate-limit` (at
//! least 1) per [`RECOVERY_STEP`] without a 429 up to just below the rate that drew it, and past
//! that by the same per [`PROBE_STEP`] only, up to `--token-rate-limit`. The step scales with the
//! configured rate, so that a high limit does not take an hour to recover from a few 429s. A provider whose limit is lower than configured therefore costs one or
//! two bursts of 429s and then a probe every half minute, not a 429 every few seconds.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use tokio::time::Instant;

/// Added to the one-second window for GoTo's own timing (how it rounds, what it counts as a
/// second). Small, because counting from the answer already leaves a margin of the request's
/// whole duration; every millisecond here costs throughput: with a backlog each slot turns over
/// once per window plus the request's duration.
pub(crate) const WINDOW_MARGIN: Duration = Duration::from_millis(50);
/// How long an answered request counts.
pub(crate) const WINDOW: Duration = Duration::from_secs(1).saturating_add(WINDOW_MARGIN);
/// The pause after a 429 without `Retry-After`.
pub(crate) const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause of all requests after a 429. A longer `Retry-After` still holds back the
/// client that drew it (its own backoff), but a human waiting for a code exchange and every other
/// client's refresh do not wait minutes for it: the halved rate protects GoTo meanwhile.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(5);
/// Without a 429 for this long, the allowed rate climbs by one increment (below the rate that
/// drew the last 429).
pub(crate) const RECOVERY_STEP: Duration = Duration::from_secs(3);
/// Without a 429 for this long, the allowed rate climbs by one increment to or past the rate
/// that drew the last 429.
pub(crate) const PROBE_STEP: Duration = Duration::from_secs(30);

/// One request's place in the window, from its hand-out to its answer.
#[derive(Debug)]
pub(crate) struct Slot {
    id: u64,
}

/// What the answer to a request says about the limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Anything but a 429 (success, another error, no answer at all).
    Other,
    /// HTTP 429, with GoTo's `Retry-After` if it sent one.
    RateLimited { retry_after: Option<Duration> },
}

/// Why no request may be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Not before this instant (a pause, or the oldest answer leaving the window).
    Until(Instant),
    /// Not before a request in flight is answered.
    Answer,
}

/// The window, the allowed rate and the pause. See the module documentation.
#[derive(Debug)]
pub(crate) struct Pace {
    configured: u32,
    rate: u32,
    /// The rate that drew the last 429, until the rate is back at `configured`.
    ceiling: Option<u32>,
    window: Duration,
    max_in_flight: usize,
    /// Handed out and not answered yet, by slot id, with the decrease epoch they were sent in.
    in_flight: HashMap<u64, u64>,
    /// When the answers in the window came, oldest first.
    answered: VecDeque<Instant>,
    next_id: u64,
    /// Counts the decreases: a 429 for a request handed out before the last one changes nothing.
    epoch: u64,
    paused_until: Option<Instant>,
    /// The last 429 or rate change: the recovery counts from here.
    calm_since: Instant,
    pauses: u64,
}

impl Pace {
    /// At most `per_second` requests in any window (of one second plus the margin), and at most
    /// `max_in_flight` at once.
    pub(crate) fn new(per_second: u32, max_in_flight: u32, now: Instant) -> Pace {
        let configured = per_second.max(1);
        Pace {
            configured,
            rate: configured,
            ceiling: None,
            window: WINDOW,
            max_in_flight: max_in_flight.max(1) as usize,
            in_flight: HashMap::new(),
            answered: VecDeque::new(),
            next_id: 0,
            epoch: 0,
            paused_until: None,
            calm_since: now,
            pauses: 0,
        }
    }

    /// The number of requests allowed per window now.
    pub(crate) fn rate(&self) -> u32 {
        self.rate
    }

    /// How many pauses (429s that found no pause under way) there were.
    pub(crate) fn pauses(&self) -> u64 {
        self.pauses
    }

    /// Hands out a slot if a request may be sent at `now`.
    pub(crate) fn try_acquire(&mut self, now: Instant) -> Result<Slot, Wait> {
        self.recover(now);
        if let Some(until) = self.paused_until.filter(|until| now < *until) {
            return Err(Wait::Until(until));
        }
        self.prune(now);
        if self.in_flight.len() >= self.max_in_flight {
            return Err(Wait::Answer);
        }
        if self.in_flight.len() + self.answered.len() >= self.rate as usize {
            return Err(match self.answered.front() {
                Some(oldest) => Wait::Until(*oldest + self.window),
                None => Wait::Answer,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.in_flight.insert(id, self.epoch);
        Ok(Slot { id })
    }

    /// The request of `slot` was answered (or given up) at `now`: it counts for one more window.
    pub(crate) fn answered(&mut self, slot: Slot, now: Instant, answer: Answer) {
        let Some(epoch) = self.in_flight.remove(&slot.id) else {
            return;
        };
        // Instants are not strictly monotonic across threads; the queue stays ordered.
        let at = self.answered.back().map_or(now, |last| now.max(*last));
        self.answered.push_back(at);
        if let Answer::RateLimited { retry_after } = answer {
            self.recover(now);
            if epoch == self.epoch {
                // Sent at the current rate: that rate is too high.
                self.ceiling = Some(self.rate);
                self.rate = (self.rate / 2).max(1);
                self.epoch += 1;
            }
            self.calm_since = now;
            let until = now + retry_after.unwrap_or(DEFAULT_PAUSE).min(MAX_PAUSE);
            if self.paused_until.is_none_or(|p| p <= now) {
                self.pauses += 1;
            }
            if self.paused_until.is_none_or(|p| p < until) {
                self.paused_until = Some(until);
            }
        }
    }

    /// The slot was handed out but its request never sent: it does not count.
    pub(crate) fn unused(&mut self, slot: Slot) {
        self.in_flight.remove(&slot.id);
    }

    /// When the allowed rate climbs next, if it is below the configured one.
    pub(crate) fn next_recovery(&self) -> Option<Instant> {
        (self.rate < self.configured).then(|| self.calm_since + self.step())
    }

    /// How much the allowed rate climbs at a time: a tenth of the configured rate, at least 1.
    fn increment(&self) -> u32 {
        (self.configured / 10).max(1)
    }

    fn step(&self) -> Duration {
        match self.ceiling {
            Some(ceiling) if self.rate + self.increment() >= ceiling => PROBE_STEP,
            _ => RECOVERY_STEP,
        }
    }

    /// Brings the allowed rate up to date at `now`.
    pub(crate) fn recover(&mut self, now: Instant) {
        while self.rate < self.configured {
            let at = self.calm_since + self.step();
            if now < at {
                break;
            }
            self.rate = (self.rate + self.increment()).min(self.configured);
            self.calm_since = at;
        }
        if self.rate >= self.configured {
            self.ceiling = None;
        }
    }

    fn prune(&mut self, now: Instant) {
        while self
            .answered
            .front()
            .is_some_and(|at| now.duration_since(*at) >= self.window)
        {
            self.answered.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_window_is_a_second_and_a_margin() {
        assert_eq!(WINDOW, Duration::from_secs(1) + WINDOW_MARGIN);
        assert!(WINDOW_MARGIN > Duration::ZERO);
    }

    /// Hands out every slot available at `now`.
    fn drain(pace: &mut Pace, now: Instant) -> Vec<Slot> {
        std::iter::from_fn(|| pace.try_acquire(now).ok()).collect()
    }

    #[test]
    fn at_most_the_rate_per_window_then_one_window_after_the_oldest_answer() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 100, t0);
        let slots = drain(&mut pace, t0);
        assert_eq!(slots.len(), 10);
        assert_eq!(pace.try_acquire(t0).err(), Some(Wait::Answer));
        for (i, slot) in slots.into_iter().enumerate() {
            pace.answered(slot, t0 + ms(10 * i as u64), Answer::Other);
        }
        assert_eq!(
            pace.try_acquire(t0 + ms(50)).err(),
            Some(Wait::Until(t0 + WINDOW))
        );
        assert_eq!(drain(&mut pace, t0 + WINDOW).len(), 1);
        assert_eq!(drain(&mut pace, t0 + WINDOW + ms(25)).len(), 2);
    }

    #[test]
    fn a_request_in_flight_counts_however_long_it_takes() {
        let t0 = Instant::now();
        let mut pace = Pace::new(2, 100, t0);
        let slow = pace.try_acquire(t0).expect("first");
        let fast = pace.try_acquire(t0).expect("second");
        pace.answered(fast, t0 + ms(10), Answer::Other);
        // Ten seconds later the slow one is still under way: only one more.
        let later = t0 + Duration::from_secs(10);
        assert!(pace.try_acquire(later).is_ok());
        assert_eq!(pace.try_acquire(later).err(), Some(Wait::Answer));
        pace.answered(slow, later + ms(500), Answer::Other);
        // It counts for a window after its answer: it may have reached GoTo just then.
        assert_eq!(
            pace.try_acquire(later + ms(600)).err(),
            Some(Wait::Until(later + ms(500) + WINDOW))
        );
    }

    #[test]
    fn an_unused_slot_is_returned_and_never_counts() {
        let t0 = Instant::now();
        let mut pace = Pace::new(1, 100, t0);
        let slot = pace.try_acquire(t0).expect("slot");
        assert!(pace.try_acquire(t0).is_err());
        pace.unused(slot);
        assert!(pace.try_acquire(t0).is_ok());
    }

    #[test]
    fn concurrency_is_bounded_apart_from_the_rate() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 3, t0);
        assert_eq!(drain(&mut pace, t0).len(), 3);
        assert_eq!(pace.try_acquire(t0).err(), Some(Wait::Answer));
    }

    #[test]
    fn a_429_halves_the_rate_once_per_burst_and_pauses_for_retry_after() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 100, t0);
        let slots = drain(&mut pace, t0);
        let at = t0 + ms(200);
        for slot in slots {
            // Six of ten drew a 429: one decrease, not six.
            pace.answered(
                slot,
                at,
                Answer::RateLimited {
                    retry_after: Some(Duration::from_secs(2)),
                },
            );
        }
        assert_eq!(pace.rate(), 5);
        assert_eq!(pace.pauses(), 1);
        assert_eq!(
            pace.try_acquire(at + ms(1999)).err(),
            Some(Wait::Until(at + Duration::from_secs(2)))
        );
        // After the pause, five (the window of the burst has passed).
        assert_eq!(drain(&mut pace, at + Duration::from_secs(2)).len(), 5);
    }

    #[test]
    fn the_rate_halves_down_to_one_and_the_pause_defaults_to_a_second_and_is_capped() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 100, t0);
        let mut now = t0;
        for expected in [5, 2, 1, 1] {
            let slot = pace.try_acquire(now).expect("a slot after the pause");
            pace.answered(slot, now, Answer::RateLimited { retry_after: None });
            assert_eq!(pace.rate(), expected);
            assert_eq!(
                pace.try_acquire(now).err(),
                Some(Wait::Until(now + DEFAULT_PAUSE))
            );
            now += WINDOW;
        }
        let slot = pace.try_acquire(now).expect("slot");
        pace.answered(
            slot,
            now,
            Answer::RateLimited {
                retry_after: Some(Duration::from_secs(600)),
            },
        );
        assert_eq!(
            pace.try_acquire(now).err(),
            Some(Wait::Until(now + MAX_PAUSE))
        );
    }

    #[test]
    fn the_rate_climbs_back_slowly_and_more_slowly_near_the_rate_that_drew_the_429() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 100, t0);
        let slot = pace.try_acquire(t0).expect("slot");
        pace.answered(slot, t0, Answer::RateLimited { retry_after: None });
        assert_eq!(pace.rate(), 5);
        let rate_at = |pace: &mut Pace, at: Duration| {
            // Asking for a slot brings the rate up to date; give it back at once.
            if let Ok(slot) = pace.try_acquire(t0 + at) {
                pace.unused(slot);
            }
            pace.rate()
        };
        assert_eq!(rate_at(&mut pace, RECOVERY_STEP - ms(1)), 5);
        assert_eq!(rate_at(&mut pace, RECOVERY_STEP), 6);
        // 9 is one below the 10 that drew the 429: 10 takes a probe step.
        assert_eq!(rate_at(&mut pace, RECOVERY_STEP * 4), 9);
        assert_eq!(
            rate_at(&mut pace, RECOVERY_STEP * 4 + PROBE_STEP - ms(1)),
            9
        );
        assert_eq!(rate_at(&mut pace, RECOVERY_STEP * 4 + PROBE_STEP), 10);
        assert_eq!(pace.next_recovery(), None);
        assert_eq!(rate_at(&mut pace, Duration::from_secs(3600)), 10);
    }

    #[test]
    fn a_high_configured_rate_recovers_in_tenths() {
        let t0 = Instant::now();
        let mut pace = Pace::new(1000, 100, t0);
        // Sporadic 429s a second apart (each after the pause of the one before): down to 125.
        for i in 0..3u64 {
            let at = t0 + Duration::from_secs(i);
            let slot = pace.try_acquire(at).expect("slot");
            pace.answered(slot, at, Answer::RateLimited { retry_after: None });
        }
        assert_eq!(pace.rate(), 125);
        let at = t0 + Duration::from_secs(2) + RECOVERY_STEP;
        if let Ok(slot) = pace.try_acquire(at) {
            pace.unused(slot);
        }
        assert_eq!(pace.rate(), 225, "a tenth of 1000 per step");
    }

    #[test]
    fn a_429_restarts_the_quiet_period() {
        let t0 = Instant::now();
        let mut pace = Pace::new(10, 100, t0);
        let first = pace.try_acquire(t0).expect("slot");
        let old = pace.try_acquire(t0).expect("slot");
        pace.answered(first, t0, Answer::RateLimited { retry_after: None });
        // A late 429 for a request sent at the old rate: no second halving, but no climb yet.
        let late = t0 + RECOVERY_STEP - ms(1);
        pace.answered(old, late, Answer::RateLimited { retry_after: None });
        assert_eq!(pace.rate(), 5);
        assert_eq!(pace.next_recovery(), Some(late + RECOVERY_STEP));
    }
}
