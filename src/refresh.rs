//! The refresh schedule: when each client refreshes, how failures back off, and how the
//! operator stays inside GoTo's rate limit.
//!
//! The schedule is a pure function of what is stored (expiry, issue time, `refreshBefore`, the
//! object's uid), so an operator restart resumes it exactly and an idle reconcile computes the same
//! `nextRefreshTime` again (and so writes nothing). Time comes from a [`Clock`] so tests can move
//! it without sleeping.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

use crate::secret::StoredTokens;

/// Shortest gap between two refreshes of one client, whatever the spec says, so a misconfigured
/// `refreshBefore` cannot turn into a refresh loop.
pub const MIN_REFRESH_INTERVAL: SignedDuration = SignedDuration::from_secs(30);
/// First retry delay after a transient refresh failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after transient refresh failures.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// When the access token should be refreshed: `expires_at − refreshBefore` (default one third
/// of the lifetime), moved by a jitter within ±10% of `refreshBefore` that is stable for a given
/// object and token, so clients authorized together spread out.
pub fn next_refresh_at(
    tokens: &StoredTokens,
    refresh_before: Option<Duration>,
    uid: &str,
) -> Timestamp {
    let lifetime = tokens.lifetime().max(SignedDuration::from_secs(1));
    let default_before = lifetime / 3;
    let before = refresh_before
        .and_then(|d| SignedDuration::try_from(d).ok())
        .unwrap_or(default_before)
        // Refreshing earlier than MIN_REFRESH_INTERVAL after issue would loop.
        .min((lifetime - MIN_REFRESH_INTERVAL).max(lifetime / 2));
    let jitter_span = before / 10;
    let fraction = stable_fraction(uid, tokens.expires_at); // in [-1, 1]
    let jitter = SignedDuration::from_secs_f64(jitter_span.as_secs_f64() * fraction);
    let at = tokens.expires_at - before + jitter;
    at.max(tokens.issued_at + MIN_REFRESH_INTERVAL.min(lifetime / 2))
}

fn stable_fraction(uid: &str, expires_at: Timestamp) -> f64 {
    let mut hasher = DefaultHasher::new();
    uid.hash(&mut hasher);
    expires_at.as_second().hash(&mut hasher);
    let bucket = hasher.finish() % 2001;
    (bucket as f64 / 1000.0) - 1.0
}

/// Delay before retry number `attempt` (1-based) after transient failures: 5 s doubling up to
/// 5 minutes, never past the server's `Retry-After`.
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
    let delay = exp.min(BACKOFF_CAP);
    match retry_after {
        Some(server) => delay.max(server.min(Duration::from_secs(3600))),
        None => delay,
    }
}

/// Wall-clock time, as the operator sees it. Production uses the system clock; tests use a
/// manual clock they advance, and the controller re-checks every client when it moves.
#[derive(Clone)]
pub struct Clock {
    manual: Option<Arc<Mutex<Timestamp>>>,
    ticks: watch::Sender<u64>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("manual", &self.manual.is_some())
            .finish()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock {
            manual: None,
            ticks: watch::channel(0).0,
        }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual(start: Timestamp) -> Self {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
            ticks: watch::channel(0).0,
        }
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        match &self.manual {
            Some(now) => *now.lock().unwrap_or_else(|e| e.into_inner()),
            None => Timestamp::now(),
        }
    }

    /// Moves a manual clock forward and wakes whoever watches [`Clock::ticks`]. No effect on
    /// the system clock.
    pub fn advance(&self, by: Duration) {
        if let Some(now) = &self.manual {
            let mut guard = now.lock().unwrap_or_else(|e| e.into_inner());
            *guard = guard
                .checked_add(SignedDuration::try_from(by).unwrap_or(SignedDuration::ZERO))
                .unwrap_or(*guard);
            drop(guard);
            self.ticks.send_modify(|t| *t += 1);
        }
    }

    /// A receiver that changes whenever a manual clock moves (never for the system clock).
    pub fn ticks(&self) -> watch::Receiver<u64> {
        self.ticks.subscribe()
    }

    /// How long from now until `at`, zero when it is past. Used for requeue delays.
    pub fn until(&self, at: Timestamp) -> Duration {
        let gap = at.duration_since(self.now());
        Duration::try_from(gap).unwrap_or(Duration::ZERO)
    }
}

/// An operator-wide limiter for requests to GoTo's token endpoints: GoTo documents a default
/// limit of 10 requests per second, so every refresh and code exchange takes a permit.
///
/// GoTo counts arrivals in a sliding one-second window, so the limiter does the same with the
/// moments permits were actually handed out, plus a margin for requests that leave late or
/// travel unevenly: a fixed schedule lets a delayed request and its successor land in one
/// window and draw a 429.
#[derive(Debug)]
pub struct RateLimiter {
    per_window: usize,
    window: Duration,
    sent: tokio::sync::Mutex<std::collections::VecDeque<tokio::time::Instant>>,
}

/// Added to the one-second window for timing noise between this process and GoTo.
const RATE_WINDOW_MARGIN: Duration = Duration::from_millis(100);

impl RateLimiter {
    /// At most `per_second` permits in any window of one second (plus a margin).
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            per_window: per_second.max(1) as usize,
            window: Duration::from_secs(1) + RATE_WINDOW_MARGIN,
            sent: tokio::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// Waits until a request may be sent without exceeding the limit.
    pub async fn acquire(&self) {
        // Holding the lock while sleeping queues the waiters in order (tokio's Mutex is fair).
        let mut sent = self.sent.lock().await;
        loop {
            let now = tokio::time::Instant::now();
            while sent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                sent.pop_front();
            }
            if sent.len() < self.per_window {
                sent.push_back(now);
                return;
            }
            if let Some(oldest) = sent.front().copied() {
                tokio::time::sleep_until(oldest + self.window).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn tokens(issued: &str, lifetime_secs: i64) -> StoredTokens {
        let issued_at: Timestamp = issued.parse().unwrap();
        StoredTokens {
            access_token: SecretString::from("a"),
            refresh_token: SecretString::from("r"),
            token_type: "Bearer".into(),
            expires_at: issued_at + SignedDuration::from_secs(lifetime_secs),
            issued_at,
            authorized_at: issued_at,
            scope: None,
            principal: None,
            account_key: None,
            organizer_key: None,
            client_id: "c".into(),
            token_url: "t".into(),
        }
    }

    #[test]
    fn default_is_one_third_of_lifetime_with_bounded_jitter() {
        let t = tokens("2026-11-23T10:00:00Z", 3600);
        let nominal: Timestamp = "2026-11-23T10:40:00Z".parse().unwrap();
        let mut distinct = std::collections::BTreeSet::new();
        for i in 0..200 {
            let at = next_refresh_at(&t, None, &format!("uid-{i}"));
            let off = at.duration_since(nominal).as_secs_f64().abs();
            assert!(off <= 120.0 + 1e-6, "jitter {off}s beyond 10% of 20m");
            // Pods keep a token with at least 10 minutes of life (plus ~1 min kubelet delay).
            assert!(t.expires_at.duration_since(at) >= SignedDuration::from_mins(17));
            distinct.insert(at.as_second());
        }
        assert!(distinct.len() > 50, "jitter spreads refreshes");
        // Stable: the same object and token give the same time.
        assert_eq!(
            next_refresh_at(&t, None, "uid-1"),
            next_refresh_at(&t, None, "uid-1")
        );
    }

    #[test]
    fn refresh_before_is_honoured_and_clamped() {
        let t = tokens("2026-11-23T10:00:00Z", 3600);
        let at = next_refresh_at(&t, Some(Duration::from_secs(600)), "u");
        let off = at.duration_since("2026-11-23T10:50:00Z".parse::<Timestamp>().unwrap());
        assert!(off.abs() <= SignedDuration::from_secs(60));
        // refreshBefore longer than the lifetime must not produce a refresh loop.
        let at = next_refresh_at(&t, Some(Duration::from_secs(7200)), "u");
        assert!(at >= t.issued_at + MIN_REFRESH_INTERVAL);
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        assert_eq!(backoff(1, None), Duration::from_secs(5));
        assert_eq!(backoff(2, None), Duration::from_secs(10));
        assert_eq!(backoff(30, None), BACKOFF_CAP);
        assert_eq!(
            backoff(1, Some(Duration::from_secs(42))),
            Duration::from_secs(42)
        );
    }

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let start: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let clock = Clock::manual(start);
        let ticks = clock.ticks();
        assert_eq!(clock.now(), start);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + SignedDuration::from_secs(90));
        assert!(ticks.has_changed().unwrap());
        assert_eq!(clock.until(start), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_requests() {
        let limiter = RateLimiter::new(10);
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            limiter.acquire().await;
        }
        // 10 at once, then 10 more a window later, then 1 more a window after that.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(2200), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(2300), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_of_one_second_sees_more_than_the_limit() {
        let limiter = RateLimiter::new(10);
        let mut times = Vec::new();
        for i in 0..45u64 {
            if i % 7 == 0 {
                // Late callers, as when a request leaves after others queued.
                tokio::time::sleep(Duration::from_millis(130)).await;
            }
            limiter.acquire().await;
            times.push(tokio::time::Instant::now());
        }
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
                .count();
            assert!(in_window <= 10, "{in_window} permits within one second");
        }
    }
}
