//! The refresh schedule: when each client refreshes and how transient failures back off.
//!
//! The schedule is a pure function of what is stored (expiry, issue time, `refreshBefore`, the
//! object's uid), so an operator restart resumes it exactly and an idle reconcile computes the same
//! `nextRefreshTime` again (and so writes nothing).

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};

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
/// 5 minutes, never sooner than the server's `Retry-After`. The backoff is also capped by the
/// token's remaining life: a quarter of it while it lives, and [`BACKOFF_BASE`] once it has
/// expired, so that after an outage a token is renewed within seconds of GoTo answering
/// again (the operator-wide rate limit still bounds the total).
pub fn backoff(attempt: u32, retry_after: Option<Duration>, remaining: SignedDuration) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(16)));
    let by_expiry = Duration::try_from(remaining / 4)
        .unwrap_or(Duration::ZERO)
        .max(BACKOFF_BASE);
    let delay = exp.min(BACKOFF_CAP).min(by_expiry);
    match retry_after {
        Some(server) => delay.max(server.min(Duration::from_secs(3600))),
        None => delay,
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
            refresh_token: Some(SecretString::from("r")),
            token_type: "Bearer".into(),
            expires_at: issued_at + SignedDuration::from_secs(lifetime_secs),
            issued_at,
            authorized_at: issued_at,
            refresh_token_obtained_at: issued_at,
            scope: None,
            principal: None,
            account_key: None,
            organizer_key: None,
            client_id: "c".into(),
            token_url: "t".into(),
            obtained_by: Default::default(),
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
    fn backoff_quickens_as_the_token_runs_out() {
        // (failures so far, time the token has left) → delay
        let cases = [
            (10, 3600, BACKOFF_CAP),
            (10, 400, Duration::from_secs(100)),
            (10, 60, Duration::from_secs(15)),
            (10, 8, BACKOFF_BASE),
            (10, 0, BACKOFF_BASE),
            (10, -600, BACKOFF_BASE),
            (1, -600, BACKOFF_BASE),
        ];
        for (attempt, left, want) in cases {
            assert_eq!(
                backoff(attempt, None, SignedDuration::from_secs(left)),
                want,
                "attempt {attempt}, {left}s left"
            );
        }
        // GoTo's own Retry-After still wins: it asked not to be called sooner.
        assert_eq!(
            backoff(10, Some(Duration::from_secs(90)), SignedDuration::ZERO),
            Duration::from_secs(90)
        );
    }

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let hour = SignedDuration::from_hours(1);
        assert_eq!(backoff(1, None, hour), Duration::from_secs(5));
        assert_eq!(backoff(2, None, hour), Duration::from_secs(10));
        assert_eq!(backoff(30, None, hour), BACKOFF_CAP);
        assert_eq!(
            backoff(1, Some(Duration::from_secs(42)), hour),
            Duration::from_secs(42)
        );
    }
}
