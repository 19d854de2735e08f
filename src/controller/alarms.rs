//! When each client is due for its next reconcile: one timer for all clients of a scope instead
//! of a requeue each in kube's scheduler.
//!
//! A reconcile that leaves nothing to do until a later time (the next refresh, an expiry, a
//! link's end) sets its client's alarm, and the scope's controller gets the client back as a
//! reconcile request when the alarm goes off. `Action::requeue` does the same, but kube's
//! scheduler holds two copies of the client's object reference (name, namespace, uid and
//! resourceVersion: eight strings) and a delay-queue slot for each client: about 600 bytes a
//! client that waits for nothing but time, against 163 for an alarm (one string, an entry in
//! a map and in an ordered set; BENCHMARKS.md, issue 11). Short retries (backoff, waiting for
//! a watch, a parked refresh) stay with kube's requeue: few clients have one at a time.
//!
//! Setting an alarm replaces the client's previous one: the latest reconcile saw the latest
//! state. A new leadership term starts with none ([`Alarms::reset`]); each client's first
//! reconcile of the term sets its own. A deleted client's alarm is not cleared by name (a new
//! client of the same name may have set it); it rings once into a reconcile that finds
//! nothing to do, as a requeue would.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::Stream;
use tokio::{sync::Notify, time::Instant};

use super::cached::{ClientRef, client_ref};

/// `namespace/name` (neither may contain a slash).
type Key = Arc<str>;

/// The longest an alarm is set for.
const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);

/// The alarms of one scope (all namespaces, or one).
#[derive(Debug, Default)]
struct Timers {
    by_time: BTreeSet<(Instant, Key)>,
    by_client: HashMap<Key, Instant>,
}

impl Timers {
    fn clear(&mut self, key: &str) {
        if let Some((key, at)) = self.by_client.remove_entry(key) {
            self.by_time.remove(&(at, key));
        }
    }
}

/// The alarms of every scope whose controller runs.
#[derive(Debug, Default)]
pub(crate) struct Alarms {
    /// By scope: `None` for all namespaces.
    scopes: Mutex<HashMap<Option<Box<str>>, Timers>>,
    /// Wakes the scopes' streams when an alarm is set.
    changed: Notify,
}

/// What a scope's stream does next.
#[derive(Debug, PartialEq)]
enum Next {
    Ring(ClientRef),
    SleepUntil(Instant),
    Wait,
}

impl Alarms {
    /// Forgets every alarm and scope: a new term's controllers register their own.
    pub(crate) fn reset(&self) {
        self.lock().clear();
    }

    /// Rings for `namespace/name` after `after`; `None` clears its alarm. Ignored when no
    /// running scope covers the namespace.
    pub(crate) fn set(&self, namespace: &str, name: &str, after: Option<Duration>) {
        let key = format!("{namespace}/{name}");
        let mut scopes = self.lock();
        let scope = match scopes.contains_key(&Some(Box::from(namespace))) {
            true => Some(Box::from(namespace)),
            false => None,
        };
        let Some(timers) = scopes.get_mut(&scope) else {
            return;
        };
        let Some(after) = after else {
            timers.clear(&key);
            return;
        };
        // Far enough for any schedule, and no overflow.
        let at = Instant::now() + after.min(LONGEST);
        let key: Key = match timers.by_client.get_key_value(key.as_str()) {
            Some((_, old)) if *old == at => return,
            Some((shared, _)) => shared.clone(),
            None => Key::from(key),
        };
        timers.clear(&key);
        let earliest = timers.by_time.first().map(|(at, _)| *at);
        timers.by_time.insert((at, key.clone()));
        timers.by_client.insert(key, at);
        drop(scopes);
        if earliest.is_none_or(|earliest| at < earliest) {
            self.changed.notify_waiters();
        }
    }

    /// The clients of `scope` as their alarms ring, from now until the alarms are reset.
    pub(crate) fn ringing(
        self: &Arc<Self>,
        scope: Option<&str>,
    ) -> impl Stream<Item = ClientRef> + Send + use<> {
        let scope: Option<Box<str>> = scope.map(Box::from);
        self.lock().entry(scope.clone()).or_default();
        futures::stream::unfold((self.clone(), scope), |(alarms, scope)| async move {
            loop {
                let rang = {
                    // Registered before looking, so an alarm set meanwhile is not missed.
                    let changed = alarms.changed.notified();
                    let mut changed = std::pin::pin!(changed);
                    changed.as_mut().enable();
                    match alarms.next(scope.as_deref(), Instant::now())? {
                        Next::Ring(client) => Some(client),
                        Next::SleepUntil(at) => {
                            tokio::select! {
                                () = tokio::time::sleep_until(at) => {}
                                () = changed => {}
                            }
                            None
                        }
                        Next::Wait => {
                            changed.await;
                            None
                        }
                    }
                };
                if let Some(client) = rang {
                    return Some((client, (alarms, scope)));
                }
            }
        })
    }

    /// The next client of `scope` whose alarm has rung (taking it off), or when to look again;
    /// `None` once the scope is gone (a reset ended its term).
    fn next(&self, scope: Option<&str>, now: Instant) -> Option<Next> {
        let mut scopes = self.lock();
        let timers = scopes.get_mut(&scope.map(Box::from))?;
        loop {
            return Some(match timers.by_time.first() {
                Some((at, _)) if *at <= now => {
                    let Some((_, key)) = timers.by_time.pop_first() else {
                        continue;
                    };
                    timers.by_client.remove(&key);
                    let Some((namespace, name)) = key.split_once('/') else {
                        continue;
                    };
                    Next::Ring(client_ref(namespace, name))
                }
                Some((at, _)) => Next::SleepUntil(*at),
                None => Next::Wait,
            });
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Option<Box<str>>, Timers>> {
        self.scopes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn alarms_ring_in_time_order_and_the_latest_setting_wins() {
        let alarms = Arc::new(Alarms::default());
        let mut ringing = Box::pin(alarms.ringing(None));
        let start = Instant::now();
        alarms.set("a", "late", Some(Duration::from_secs(30)));
        alarms.set("a", "early", Some(Duration::from_secs(10)));
        alarms.set("b", "moved", Some(Duration::from_secs(5)));
        alarms.set("b", "moved", Some(Duration::from_secs(20)));
        alarms.set("b", "cleared", Some(Duration::from_secs(15)));
        alarms.set("b", "cleared", None);

        let mut rang = Vec::new();
        for _ in 0..3 {
            let next = ringing.next().await.expect("a client");
            rang.push((next, start.elapsed().as_secs()));
        }
        assert_eq!(
            rang,
            vec![
                (client_ref("a", "early"), 10),
                (client_ref("b", "moved"), 20),
                (client_ref("a", "late"), 30),
            ]
        );
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), ringing.next())
                .await
                .is_err(),
            "nothing else rings"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_alarm_set_while_waiting_rings_first() {
        let alarms = Arc::new(Alarms::default());
        let mut ringing = Box::pin(alarms.ringing(None));
        let start = Instant::now();
        alarms.set("a", "later", Some(Duration::from_secs(60)));
        let waiter = tokio::spawn(async move { ringing.next().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        alarms.set("a", "sooner", Some(Duration::from_secs(5)));
        let first = waiter.await.expect("joined");
        assert_eq!(first, Some(client_ref("a", "sooner")));
        assert_eq!(start.elapsed().as_secs(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn each_scope_rings_for_its_own_clients_and_a_reset_ends_them() {
        let alarms = Arc::new(Alarms::default());
        let mut one = Box::pin(alarms.ringing(Some("one")));
        let mut two = Box::pin(alarms.ringing(Some("two")));
        alarms.set("one", "a", Some(Duration::from_secs(2)));
        alarms.set("two", "b", Some(Duration::from_secs(1)));
        alarms.set("unwatched", "c", Some(Duration::from_secs(1)));
        assert_eq!(one.next().await, Some(client_ref("one", "a")));
        assert_eq!(two.next().await, Some(client_ref("two", "b")));

        alarms.set("one", "a", Some(Duration::from_secs(1)));
        alarms.reset();
        alarms.set("one", "a", Some(Duration::from_secs(1)));
        assert_eq!(
            one.next().await,
            None,
            "the term's stream ended with the reset"
        );
    }

    #[test]
    fn a_cleared_alarm_leaves_nothing_behind() {
        let alarms = Alarms::default();
        alarms.lock().entry(None).or_default();
        alarms.set("ns", "gone", Some(Duration::from_secs(1)));
        alarms.set("ns", "kept", Some(Duration::from_secs(1)));
        alarms.set("ns", "kept", Some(Duration::from_secs(2)));
        alarms.set("ns", "gone", None);
        alarms.set("ns", "far", Some(Duration::MAX));
        let scopes = alarms.lock();
        let timers = &scopes[&None];
        assert_eq!(timers.by_time.len(), 2);
        assert_eq!(timers.by_client.len(), 2);
        assert!(timers.by_client.contains_key("ns/kept"));
    }
}
