//! The refresh schedule: when each client refreshes and how transient failures back off.
//!
//! The schedule is a pure function of what is stored (expiry, issue time, `refreshBefore`, the
//! object's uid), so an operator restart resumes it exactly and an idle reconcile computes the same
//! `nextRefreshTime` again (and so writes nothing).
//!
//! Refreshes stay spread: each client has a fixed phase (a hash of its uid) on a grid whose period
//! is half its refresh interval, and its next refresh is the last grid point at or before
//! `expires_at − refreshBefore`. Clients refreshed in the same second (after an outage, a
//! fail-over, consents given together) therefore refresh next at their own phases, spread over
//! half an interval, and from then on each keeps its phase: bunching is gone after one cycle and
//! does not come back. A jitter drawn anew each cycle (what this replaced) only random-walks
//! clients apart, far too slowly to undo a bunch before the next outage makes one.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::secret::StoredTokens;

/// Shortest gap between two refreshes of one client, whatever the spec says, so a misconfigured
/// `refreshBefore` cannot turn into a refresh loop.
pub const MIN_REFRESH_INTERVAL: SignedDuration = SignedDuration::from_secs(30);
/// First retry delay after a transient refresh failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay after transient refresh failures.
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);

/// When the access token should be refreshed.
///
/// - Never later than `expires_at − refreshBefore` (default one third of the lifetime): that is
///   the promise `refreshBefore` makes to the workloads, so spreading only ever moves a refresh
///   earlier.
/// - Never earlier than half the nominal interval after issue (`issued_at + (lifetime −
///   refreshBefore) / 2`), nor than [`MIN_REFRESH_INTERVAL`] after it: spreading a bunch costs
///   each bunched client at most half an interval of token life, once.
/// - Within that window (half an interval wide), at the client's phase: the grid point
///   `≡ phase(uid)` modulo the window's width, counted in whole seconds from the Unix epoch.
///   Since the width divides the interval (up to a second of rounding), a client refreshed on
///   time lands on its phase again: in steady state it refreshes every `lifetime −
///   refreshBefore`, as without spreading.
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
    let latest = tokens.expires_at - before;
    let earliest = tokens.issued_at + MIN_REFRESH_INTERVAL.min(lifetime / 2);
    // Whole seconds, so the time survives the status' second precision unchanged.
    let width = (lifetime - before).as_secs() / 2;
    if width < 1 {
        return latest.max(earliest);
    }
    let latest_second = latest.as_second();
    let slot = latest_second - (latest_second - phase(uid, width)).rem_euclid(width);
    let at = Timestamp::from_second(slot).unwrap_or(latest);
    at.max(earliest)
}

/// The client's place in `[0, width)` seconds: a hash of its uid, fixed for the client's life.
/// FNV-1a with a final mix, written out rather than `DefaultHasher`, whose algorithm may change
/// between Rust releases and would then move every client's schedule at an upgrade.
fn phase(uid: &str, width: i64) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in uid.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone leaves similar uids with similar low bits.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    // `width` is positive and far below u64::MAX, so the remainder fits an i64.
    i64::try_from(hash % width.unsigned_abs()).unwrap_or(0)
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

    /// Object uids as the API server makes them (random UUIDs), fixed here.
    fn uid(i: usize) -> String {
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            (i as u64).wrapping_mul(0x9E37_79B9) as u32,
            i * 7919 % 0xffff,
            i * 31 % 0xfff,
            i * 131 % 0xfff,
            (i as u64).wrapping_mul(0x5851_F42D_4C95_7F2D) & 0xffff_ffff_ffff
        )
    }

    /// The most of `times` inside any window of `width` (inclusive of its start).
    fn most_within(times: &[Timestamp], width: SignedDuration) -> usize {
        let mut sorted = times.to_vec();
        sorted.sort();
        (0..sorted.len())
            .map(|i| {
                sorted[i..]
                    .iter()
                    .take_while(|t| t.duration_since(sorted[i]) < width)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn never_after_expiry_minus_refresh_before_nor_before_half_the_interval() {
        // (lifetime s, refreshBefore s, earliest after issue (exclusive), latest after issue)
        let cases = [
            (3600, None, 1200, 2400),
            (3600, Some(600), 1500, 3000),
            (3600, Some(60), 1770, 3540),
            // Lifetime not a multiple of 3: the latest time is not a whole second.
            (3599, None, 1199, 2399),
            // Short tokens (the demo's): the floor of 30 s after issue holds.
            (60, None, 29, 40),
            // refreshBefore beyond the lifetime is clamped: 30 s after issue, no loop.
            (3600, Some(7200), 29, 30),
        ];
        for (lifetime, before, after, latest) in cases {
            let t = tokens("2026-11-23T10:00:00Z", lifetime);
            let before = before.map(Duration::from_secs);
            let mut distinct = std::collections::BTreeSet::new();
            for i in 0..500 {
                let at = next_refresh_at(&t, before, &uid(i));
                let since_issue = at.duration_since(t.issued_at);
                let case = format!("lifetime {lifetime}, refreshBefore {before:?}, {at}");
                assert!(since_issue > SignedDuration::from_secs(after), "{case}");
                assert!(since_issue <= SignedDuration::from_secs(latest), "{case}");
                assert!(since_issue >= MIN_REFRESH_INTERVAL, "{case}");
                assert_eq!(at.subsec_nanosecond(), 0, "{case}: whole seconds");
                distinct.insert(at);
            }
            if latest - after > 100 {
                assert!(distinct.len() > 100, "spread: {}", distinct.len());
            }
        }
    }

    #[test]
    fn the_same_client_and_token_give_the_same_time() {
        let t = tokens("2026-11-23T10:00:00Z", 3600);
        let first: Vec<_> = (0..50)
            .map(|i| next_refresh_at(&t, None, &uid(i)))
            .collect();
        let again: Vec<_> = (0..50)
            .map(|i| next_refresh_at(&t, None, &uid(i)))
            .collect();
        assert_eq!(first, again);
        // Pinned, so a change of the hash (which moves every client once) is a decision.
        assert_eq!(
            next_refresh_at(&t, None, "0b1c8e0e-3f5a-4c1e-9a4b-2d6f1e7c9a00"),
            "2026-11-23T10:25:30Z".parse::<Timestamp>().unwrap()
        );
    }

    #[test]
    fn clients_refreshed_in_the_same_second_spread_in_one_cycle() {
        let lifetime = SignedDuration::from_secs(3600);
        // 40 clients whose tokens were all issued in the same second (an outage just ended).
        let uids: Vec<String> = (0..40).map(uid).collect();
        let issued = "2026-11-23T10:00:00Z";
        let now: Vec<Timestamp> = uids
            .iter()
            .map(|_| tokens(issued, 3600).expires_at)
            .collect();
        assert_eq!(most_within(&now, SignedDuration::from_secs(5)), 40);

        // Each refreshes when its schedule says (a few seconds late, as the limiter paces them),
        // and its next token expires a lifetime later.
        let mut at: Vec<Timestamp> = uids
            .iter()
            .map(|u| next_refresh_at(&tokens(issued, 3600), None, u))
            .collect();
        for cycle in 1..=5 {
            let expiries: Vec<Timestamp> = at
                .iter()
                .enumerate()
                .map(|(i, t)| *t + SignedDuration::from_secs((i % 4) as i64) + lifetime)
                .collect();
            // 40 points uniform over the 1,200 s window: the most within any 5 s is 2 or 3
            // (4 in about 1.5 % of draws, 5 in 0.05 %).
            let bunched = most_within(&expiries, SignedDuration::from_secs(5));
            assert!(
                bunched <= 4,
                "cycle {cycle}: {bunched} of 40 expire within 5 s"
            );
            let next: Vec<Timestamp> = expiries
                .iter()
                .zip(&uids)
                .map(|(expires, u)| {
                    let t = tokens(&(*expires - lifetime).to_string(), 3600);
                    next_refresh_at(&t, None, u)
                })
                .collect();
            for ((before, after), expires) in at.iter().zip(&next).zip(&expiries) {
                // On its phase from the first spread refresh on: one refresh every lifetime −
                // refreshBefore, as without spreading.
                assert_eq!(after.duration_since(*before), SignedDuration::from_mins(40));
                assert!(*after <= *expires - lifetime / 3);
            }
            at = next;
        }
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
