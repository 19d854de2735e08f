//! The first look of a leadership term: a new leader corrects every stale status before it
//! sends any refresh.
//!
//! While no replica led, statuses may claim `Ready` for tokens that have expired since. The
//! reconcile of each client corrects its own status before refreshing it, but with several
//! reconciles at once a refresh of one client could still go out before another client's lie
//! is corrected, and a refresh can take seconds (rate limit, slow provider). So each term starts
//! with every cached client pending; a refresh waits until all of them have had their first
//! reconcile, or until [`DEADLINE`] has passed (a client whose reconcile keeps failing must not
//! hold back everyone's refreshes).
//!
//! A refresh also waits for the term's Secret watch to have listed (same deadline): until then
//! no Secret's version is known, so a reconcile reads the Secrets it needs (once a term: what
//! it read in this term is taken as current until the watch shows a version), and a refresh
//! sent before the watch could show another replica's write would rest on that read alone.

use std::{
    collections::HashSet,
    sync::Mutex,
    time::{Duration, Instant},
};

/// The longest a term's refreshes wait for the first look of every client.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);
/// How soon a refresh held back by the first look is tried again.
pub(crate) const RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct State {
    /// Clients of the cache not reconciled yet in this term.
    pending: HashSet<String>,
    /// Clients reconciled in this term (possibly before their scope's cache was listed).
    looked: HashSet<String>,
    /// Watched scopes whose cache has not been listed yet in this term.
    scopes_unlisted: usize,
    /// Watched scopes whose Secret watch has not listed yet in this term.
    secrets_unlisted: usize,
    started: Option<Instant>,
}

/// Which clients the current term has looked at.
#[derive(Debug, Default)]
pub(crate) struct FirstLook(Mutex<State>);

impl FirstLook {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new term over `scopes` watched scopes starts at `now`.
    pub(crate) fn begin(&self, scopes: usize, now: Instant) {
        *self.state() = State {
            scopes_unlisted: scopes,
            secrets_unlisted: scopes,
            started: Some(now),
            ..State::default()
        };
    }

    /// A scope's cache is listed: its clients (uids) are pending, except those already looked at.
    pub(crate) fn listed(&self, uids: impl IntoIterator<Item = String>) {
        let mut state = self.state();
        if state.started.is_none() {
            // The term's first look is over (or none began): nothing waits for these.
            return;
        }
        let fresh: Vec<String> = uids
            .into_iter()
            .filter(|u| !state.looked.contains(u))
            .collect();
        state.pending.extend(fresh);
        state.scopes_unlisted = state.scopes_unlisted.saturating_sub(1);
        state.settle(Instant::now());
    }

    /// A scope's Secret watch has listed. A relist counts again: at worst refreshes start
    /// before another scope's Secrets are listed, which costs reads, never correctness.
    pub(crate) fn secrets_listed(&self) {
        let mut state = self.state();
        state.secrets_unlisted = state.secrets_unlisted.saturating_sub(1);
        state.settle(Instant::now());
    }

    /// The client was reconciled (its status corrected if it lied).
    pub(crate) fn looked_at(&self, uid: &str) {
        let mut state = self.state();
        state.pending.remove(uid);
        if state.started.is_some() {
            state.looked.insert(uid.to_string());
        }
        state.settle(Instant::now());
    }

    /// Whether refreshes may go out at `now`. Once they may, the first look is over for the
    /// term and its sets go: at 10,000 clients the uids looked at are about a megabyte
    /// (BENCHMARKS.md, issue 11).
    pub(crate) fn refreshes_allowed(&self, now: Instant) -> bool {
        self.state().settle(now)
    }
}

impl State {
    /// Whether the term's first look is over at `now`; ends it when it is, dropping its sets.
    fn settle(&mut self, now: Instant) -> bool {
        let done =
            self.scopes_unlisted == 0 && self.secrets_unlisted == 0 && self.pending.is_empty();
        let over = done
            || self
                .started
                .is_none_or(|started| now.duration_since(started) >= DEADLINE);
        if over && self.started.is_some() {
            *self = State::default();
        }
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_wait_for_every_scope_and_client_or_the_deadline() {
        let look = FirstLook::default();
        let t0 = Instant::now();
        assert!(look.refreshes_allowed(t0), "outside a term nothing waits");
        look.begin(2, t0);
        assert!(!look.refreshes_allowed(t0), "no scope listed yet");
        look.listed(["a".to_string(), "b".to_string()]);
        look.looked_at("a");
        look.looked_at("b");
        assert!(!look.refreshes_allowed(t0), "one scope still unlisted");
        // A client looked at before its scope was listed is not pending again.
        look.looked_at("c");
        look.listed(["c".to_string()]);
        look.secrets_listed();
        assert!(
            !look.refreshes_allowed(t0),
            "one scope's Secrets still unlisted"
        );
        look.secrets_listed();
        assert!(look.refreshes_allowed(t0));
        let state = look.state();
        assert_eq!(
            (state.pending.capacity(), state.looked.capacity()),
            (0, 0),
            "the term's first look is over: its sets are gone"
        );
        drop(state);
        look.looked_at("d");
        look.listed(["e".to_string()]);
        assert!(
            look.refreshes_allowed(t0),
            "nothing waits after the first look"
        );
        assert!(look.state().looked.is_empty() && look.state().pending.is_empty());

        look.begin(1, t0);
        look.listed(["stuck".to_string()]);
        assert!(!look.refreshes_allowed(t0 + DEADLINE - Duration::from_millis(1)));
        assert!(
            look.refreshes_allowed(t0 + DEADLINE),
            "a failing client holds no one back"
        );
    }
}
