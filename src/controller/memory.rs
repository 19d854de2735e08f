//! What one replica remembers about its clients between reconciles: only what the API server
//! cannot hold for it.
//!
//! - Tokens obtained from GoTo but not yet written (a rotated refresh token must never be lost
//!   to a failed write), and the tokens last written, so a deleted or hand-edited Secret is
//!   restored without a new consent.
//! - The forced-refresh request those tokens answered, in case the status write that records it
//!   failed: the request is not sent twice.
//! - Backoff: consecutive refresh failures, when the next attempt may go, the last failure
//!   (shown in `Ready` while it lasts), and consecutive reconcile errors.
//! - The rollout-restart record of this replica's last restart, until a status write records
//!   it: a restart whose status write failed is not repeated.
//! - The resourceVersion of this replica's last status write, until the watch delivers it: a
//!   reconcile that runs on an older cached object waits for the watch instead of acting on
//!   it, and re-reads the object if the watch is slow to deliver.
//!
//! Everything else comes from the API server on every reconcile.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use jiff::Timestamp;

use crate::{resource::RolloutRestartStatus, secret::StoredTokens};

/// Consecutive failures and when to try again.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Backoff {
    /// Consecutive transient refresh failures.
    pub(crate) refresh_failures: u32,
    /// No refresh before this time (backoff or Retry-After).
    pub(crate) not_before: Option<Timestamp>,
    /// The last transient refresh failure, for the `Ready` condition's message.
    pub(crate) last_failure: Option<String>,
    /// Consecutive reconcile errors, for `error_policy`.
    pub(crate) reconcile_errors: u32,
}

/// Tokens this replica holds for a client.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HeldTokens {
    pub(crate) tokens: StoredTokens,
    /// `false` while the tokens came from GoTo and are not in the Secret yet: they are written
    /// before anything else happens, and no refresh is sent until they are.
    pub(crate) stored: bool,
}

/// What one replica remembers about one client.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ClientMemory {
    /// Namespace and name, to drop the metric series once the client is gone.
    pub(crate) owner: Option<(String, String)>,
    pub(crate) held: Option<HeldTokens>,
    /// The refresh-requested annotation value the last refresh answered.
    pub(crate) answered_refresh_request: Option<String>,
    pub(crate) backoff: Backoff,
    /// The resourceVersion of this replica's last status write and when it was written, until
    /// the cache shows it.
    pub(crate) written_resource_version: Option<(String, std::time::Instant)>,
    /// The record after this replica's last rollout restart (see [`super::rollout`]).
    pub(crate) rollout: Option<RolloutRestartStatus>,
}

/// Every client's memory, keyed by uid.
#[derive(Debug, Default)]
pub(crate) struct Memory(Mutex<HashMap<String, ClientMemory>>);

impl Memory {
    /// Reads or changes one client's memory.
    pub(crate) fn with<T>(&self, uid: &str, f: impl FnOnce(&mut ClientMemory) -> T) -> T {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(uid.to_string()).or_default())
    }

    pub(crate) fn forget(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// Drops clients of `scope` (a namespace, or all) that are not in `alive`, returning the
    /// namespace and name of each so their metric series can go too.
    pub(crate) fn prune(
        &self,
        scope: Option<&str>,
        alive: &HashSet<String>,
    ) -> Vec<(String, String)> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = all
            .iter()
            .filter(|(uid, m)| {
                !alive.contains(*uid)
                    && scope.is_none_or(|ns| m.owner.as_ref().is_some_and(|(owner, _)| owner == ns))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        gone.iter()
            .filter_map(|uid| all.remove(uid).and_then(|m| m.owner))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_living_and_other_scopes() {
        let memory = Memory::default();
        for (uid, ns) in [("a", "one"), ("b", "one"), ("c", "two")] {
            memory.with(uid, |m| m.owner = Some((ns.into(), uid.into())));
        }
        let alive = HashSet::from(["a".to_string()]);
        let gone = memory.prune(Some("one"), &alive);
        assert_eq!(gone, vec![("one".to_string(), "b".to_string())]);
        assert!(memory.with("a", |m| m.owner.is_some()));
        assert!(
            memory.with("c", |m| m.owner.is_some()),
            "other namespace untouched"
        );
    }
}
