//! Wall-clock time as the operator sees it: the system clock in production, a manual clock in
//! tests that move time without sleeping (the controller re-checks every client when it moves).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
