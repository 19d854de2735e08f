//! The operator-wide limiter for requests to GoTo's token endpoints.

use std::time::Duration;

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
