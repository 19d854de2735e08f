//! Which due refresh goes next: the one whose access token expires first.
//!
//! The controller runs a bounded number of reconciles at once, in the order of its queue, which
//! is not expiry order (after an outage or a fail-over, every client is due at once and the
//! queue holds them in list order). So a reconcile that would refresh asks for a turn first. A
//! few turns are out at a time ([`Admission::new`]'s capacity, about what the token limiter lets
//! through in a second); a reconcile that gets none *parks*: it ends at once, its client keyed
//! by expiry, and when a turn comes back the earliest parked clients are woken through the
//! controller (`reconcile_on`) and ask again. A woken reconcile observes afresh, so parking
//! never carries a token from one reconcile to another.
//!
//! Parking is a matter of order, not of safety: a reconcile that must write tokens first (held
//! and not yet stored) never parks, a wake that is lost (a full channel, a client that no longer
//! needs the refresh) costs only time, and a parked client is requeued after [`PARKED_RETRY`]
//! in case its wake never comes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use jiff::Timestamp;
use tokio::sync::broadcast;

use super::cached::ClientRef;

/// How soon a parked client asks again if no wake reaches it.
pub(crate) const PARKED_RETRY: Duration = Duration::from_secs(30);
/// Wakes not yet taken by a controller before the oldest are dropped (they fall back on
/// [`PARKED_RETRY`]). One wake per turn given back, and the controller takes them as they
/// come: far more than are ever waiting, and the buffer (an object reference a slot) is
/// allocated whole up front.
const WAKES: usize = 256;

/// The turns and the parked clients.
pub(crate) struct Admission {
    capacity: usize,
    inner: Mutex<Inner>,
    wake: broadcast::Sender<ClientRef>,
}

#[derive(Default)]
struct Inner {
    out: usize,
    /// Parked clients by (expiry, uid).
    parked: BTreeMap<(Timestamp, String), ClientRef>,
    /// The expiry each parked client is keyed by.
    by_uid: HashMap<String, Timestamp>,
}

/// One turn: a refresh may go. Dropping it wakes the earliest parked client.
pub(crate) struct Turn<'a>(&'a Admission);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut inner = self.0.inner();
        inner.out = inner.out.saturating_sub(1);
        self.0.wake_free(&mut inner);
    }
}

impl Admission {
    /// At most `capacity` turns out at once.
    pub(crate) fn new(capacity: usize) -> Admission {
        Admission {
            capacity: capacity.max(1),
            inner: Mutex::default(),
            wake: broadcast::channel(WAKES).0,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The clients to reconcile because their turn came.
    pub(crate) fn wakes(&self) -> broadcast::Receiver<ClientRef> {
        self.wake.subscribe()
    }

    /// A turn for the client `uid` whose access token expires at `expires_at`, if one is free
    /// and no parked client's token expires earlier; otherwise the client is parked.
    pub(crate) fn enter(
        &self,
        uid: &str,
        expires_at: Timestamp,
        client: ClientRef,
    ) -> Option<Turn<'_>> {
        let mut inner = self.inner();
        if let Some(at) = inner.by_uid.remove(uid) {
            inner.parked.remove(&(at, uid.to_string()));
        }
        let first = inner
            .parked
            .first_key_value()
            .is_none_or(|((at, _), _)| expires_at <= *at);
        if first && inner.out < self.capacity {
            inner.out += 1;
            return Some(Turn(self));
        }
        inner.parked.insert((expires_at, uid.to_string()), client);
        inner.by_uid.insert(uid.to_string(), expires_at);
        // A turn is free but an earlier client holds the line: make sure it is on its way.
        self.wake_free(&mut inner);
        None
    }

    /// Forgets a client that is gone.
    pub(crate) fn forget(&self, uid: &str) {
        let mut inner = self.inner();
        if let Some(at) = inner.by_uid.remove(uid) {
            inner.parked.remove(&(at, uid.to_string()));
        }
    }

    /// Wakes as many of the earliest parked clients as there are free turns. A woken client
    /// leaves the line: it asks again when its reconcile comes.
    fn wake_free(&self, inner: &mut Inner) {
        for _ in inner.out..self.capacity {
            let Some(((_, uid), client)) = inner.parked.pop_first() else {
                return;
            };
            inner.by_uid.remove(&uid);
            // No receiver (no controller running): the parked retry brings it back.
            let _ = self.wake.send(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minute: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + 60 * minute).unwrap()
    }

    fn client(name: &str) -> ClientRef {
        super::super::cached::client_ref("ns", name)
    }

    #[test]
    fn turns_go_in_expiry_order_once_the_line_is_full() {
        let admission = Admission::new(2);
        let mut wakes = admission.wakes();
        let a = admission
            .enter("a", at(9), client("a"))
            .expect("a free turn");
        let b = admission
            .enter("b", at(8), client("b"))
            .expect("a free turn");
        for (uid, minute) in [("late", 7), ("early", 3), ("middle", 5)] {
            assert!(admission.enter(uid, at(minute), client(uid)).is_none());
        }
        assert!(wakes.try_recv().is_err(), "no turn is free");

        drop(a);
        assert_eq!(wakes.try_recv().unwrap().name, "early");
        assert!(wakes.try_recv().is_err(), "one turn, one wake");
        // Someone later than a parked client does not take the turn meant for it.
        assert!(admission.enter("later", at(6), client("later")).is_none());
        let early = admission
            .enter("early", at(3), client("early"))
            .expect("its turn");

        drop(b);
        assert_eq!(wakes.try_recv().unwrap().name, "middle");
        drop(early);
        assert_eq!(wakes.try_recv().unwrap().name, "later");
    }

    #[test]
    fn a_lost_wake_is_made_good_by_the_next_one_to_park() {
        let admission = Admission::new(1);
        let mut wakes = admission.wakes();
        let a = admission.enter("a", at(0), client("a")).unwrap();
        assert!(admission.enter("x", at(1), client("x")).is_none());
        assert!(admission.enter("y", at(2), client("y")).is_none());
        drop(a);
        assert_eq!(wakes.try_recv().unwrap().name, "x");
        // x's reconcile does not come back (it no longer needs a refresh). z, later than the
        // parked y, parks too, and the free turn goes to y.
        assert!(admission.enter("z", at(3), client("z")).is_none());
        assert_eq!(wakes.try_recv().unwrap().name, "y");
        assert!(admission.enter("y", at(2), client("y")).is_some());
    }

    #[test]
    fn a_forgotten_client_leaves_the_line() {
        let admission = Admission::new(1);
        let mut wakes = admission.wakes();
        let a = admission.enter("a", at(1), client("a")).unwrap();
        assert!(admission.enter("gone", at(2), client("gone")).is_none());
        assert!(admission.enter("next", at(3), client("next")).is_none());
        admission.forget("gone");
        drop(a);
        assert_eq!(wakes.try_recv().unwrap().name, "next");
    }
}
