//! Who sends the next token request: waiters are served by priority, not in arrival order. A code
//! exchange goes first (a human waits in the browser); refreshes go by their access token's
//! expiry, earliest first, across every due client; the [`Pace`] says when.
//!
//! A refresh does not wait for its turn inside a reconcile: with a thousand refreshes due and
//! sixteen reconciles at a time, only sixteen would compete, in the controller queue's order. So
//! [`Limiter::turn`] hands out a permit at once only when nobody waits and the pace allows;
//! otherwise it takes a ticket (the client's uid, ranked by its expiry) and returns, and the
//! reconcile ends. A dispatcher task grants the tickets in rank order as the pace allows and calls
//! each one's `wake` (the controller then reconciles that client again); the woken reconcile finds
//! its grant in [`Limiter::turn`] and sends at once. A grant that is not claimed within
//! [`GRANT_TTL`] (the client was deleted, the refresh is no longer due) expires and its slot is
//! returned; the client takes a new ticket when it comes back.
//!
//! A grant counts in the window from the moment it is granted, which is before its request can
//! leave, so granting early never lets more requests into one of GoTo's windows.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
    time::Duration,
};

use jiff::Timestamp;
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};

use super::limiter::{Answer, Pace, Slot, WINDOW, Wait};
use crate::metrics::Metrics;

/// How long a granted turn waits for its reconcile to claim it.
pub(crate) const GRANT_TTL: Duration = Duration::from_secs(5);

/// A waiter's rank: lower goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// A code exchange: a human waits.
    Interactive,
    /// A refresh (or personal access token exchange) of a token that expires then.
    Expiring(Timestamp),
}

/// A waiter's place: its rank, then its arrival.
type Key = (Rank, u64);

/// Called (outside any lock) when a refresh's turn is granted.
type Wake = Box<dyn FnOnce() + Send>;

enum Waiter {
    Interactive(oneshot::Sender<Permit>),
    Refresh { uid: String, wake: Wake },
}

struct Grant {
    slot: Slot,
    until: Instant,
}

struct State {
    pace: Pace,
    queue: BTreeMap<Key, Waiter>,
    /// The refreshes in `queue`, by uid.
    queued: HashMap<String, Key>,
    /// Granted turns not yet claimed, by uid.
    grants: HashMap<String, Grant>,
    seq: u64,
    dispatcher: bool,
    /// Pauses already added to the metric.
    pauses_counted: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the dispatcher: a waiter arrived, an answer came, a 429 paused everything.
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the dispatcher see that it is no longer needed.
        self.notify.notify_one();
    }
}

/// What [`Limiter::turn`] decided.
pub(crate) enum Turn {
    /// Send now.
    Now(Permit),
    /// A ticket is held; `wake` is called when the turn is granted, which should be within
    /// about `expected` (the queue ahead at the current rate).
    Queued { expected: Duration },
}

/// The right to send one request to GoTo's token endpoint now. Report the answer with
/// [`Permit::answered`]; a permit dropped without that counts as a request answered then.
#[must_use]
pub(crate) struct Permit {
    shared: Arc<Shared>,
    slot: Option<Slot>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Permit {
    /// The request was answered now, like this.
    pub(crate) fn answered(mut self, answer: Answer) {
        if let Some(slot) = self.slot.take() {
            self.shared.answered(slot, answer);
        }
    }

    /// The request was never sent: the slot is returned.
    fn unsent(mut self) {
        if let Some(slot) = self.slot.take() {
            let mut state = self.shared.lock();
            state.pace.unused(slot);
            drop(state);
            self.shared.notify.notify_one();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.shared.answered(slot, Answer::Other);
        }
    }
}

/// The operator-wide token-endpoint limiter: the pace and the priority queue in front of it.
pub(crate) struct Limiter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter").finish_non_exhaustive()
    }
}

impl Limiter {
    /// At most `per_second` requests per window (adapting down on 429s) and `max_in_flight` at
    /// once; the current rate, the pauses and the waiting refreshes go to `metrics`.
    pub(crate) fn new(per_second: u32, max_in_flight: u32, metrics: Arc<Metrics>) -> Limiter {
        let pace = Pace::new(per_second, max_in_flight, Instant::now());
        metrics.token_rate_limit.set(i64::from(pace.rate()));
        Limiter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    pace,
                    queue: BTreeMap::new(),
                    queued: HashMap::new(),
                    grants: HashMap::new(),
                    seq: 0,
                    dispatcher: false,
                    pauses_counted: 0,
                }),
                notify: Arc::new(Notify::new()),
                metrics,
            }),
        }
    }

    /// Waits for a permit ahead of every refresh: for a code exchange, while a human waits.
    pub(crate) async fn interactive(&self) -> Permit {
        let receiver = {
            let mut state = self.shared.lock();
            let human_waiting = state
                .queue
                .keys()
                .next()
                .is_some_and(|(rank, _)| *rank == Rank::Interactive);
            if !human_waiting && let Ok(slot) = state.pace.try_acquire(Instant::now()) {
                self.shared.publish(&mut state);
                return self.permit(slot);
            }
            let (sender, receiver) = oneshot::channel();
            let key = (Rank::Interactive, state.next_seq());
            state.queue.insert(key, Waiter::Interactive(sender));
            self.shared.start_dispatcher(&mut state);
            receiver
        };
        self.shared.notify.notify_one();
        match receiver.await {
            Ok(permit) => permit,
            // Only if the dispatcher is gone (it never drops a waiter): pace on our own.
            Err(_) => self.wait_alone().await,
        }
    }

    /// A refresh's turn for the client `uid`, whose access token expires at `expires_at`: a
    /// permit now (its ticket was granted, or nobody waits and the pace allows), or a ticket and
    /// a later call of `wake`, after which the client should call again.
    pub(crate) fn turn(
        &self,
        uid: &str,
        expires_at: Timestamp,
        wake: impl FnOnce() + Send + 'static,
    ) -> Turn {
        let mut state = self.shared.lock();
        if let Some(grant) = state.grants.remove(uid) {
            return Turn::Now(self.permit(grant.slot));
        }
        let rank = Rank::Expiring(expires_at);
        let key = match state.queued.get(uid).copied() {
            // Already waiting (reconciled again meanwhile): same place among equals, the current
            // expiry, the latest wake.
            Some((_, seq)) => (rank, seq),
            None => {
                if state.queue.is_empty()
                    && let Ok(slot) = state.pace.try_acquire(Instant::now())
                {
                    self.shared.publish(&mut state);
                    return Turn::Now(self.permit(slot));
                }
                (rank, state.next_seq())
            }
        };
        if let Some(old) = state.queued.insert(uid.to_owned(), key) {
            state.queue.remove(&old);
        }
        state.queue.insert(
            key,
            Waiter::Refresh {
                uid: uid.to_owned(),
                wake: Box::new(wake),
            },
        );
        let ahead = state.queue.range(..key).count();
        let expected =
            WINDOW.mul_f64((ahead as f64 + 1.0) / f64::from(state.pace.rate().max(1))) + GRANT_TTL;
        self.shared.start_dispatcher(&mut state);
        self.shared.publish(&mut state);
        drop(state);
        self.shared.notify.notify_one();
        Turn::Queued { expected }
    }

    /// Drops the ticket or grant of a client that is gone.
    pub(crate) fn forget(&self, uid: &str) {
        let mut state = self.shared.lock();
        if let Some(key) = state.queued.remove(uid) {
            state.queue.remove(&key);
        }
        if let Some(grant) = state.grants.remove(uid) {
            state.pace.unused(grant.slot);
        }
        self.shared.publish(&mut state);
        drop(state);
        self.shared.notify.notify_one();
    }

    fn permit(&self, slot: Slot) -> Permit {
        Permit {
            shared: self.shared.clone(),
            slot: Some(slot),
        }
    }

    async fn wait_alone(&self) -> Permit {
        loop {
            let wait = {
                let mut state = self.shared.lock();
                match state.pace.try_acquire(Instant::now()) {
                    Ok(slot) => return self.permit(slot),
                    Err(wait) => wait,
                }
            };
            match wait {
                Wait::Until(at) => tokio::time::sleep_until(at).await,
                Wait::Answer => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// What one dispatch hands over outside the lock.
#[derive(Default)]
struct Dispatched {
    permits: Vec<(oneshot::Sender<Permit>, Permit)>,
    wakes: Vec<Wake>,
    /// When to dispatch again at the latest.
    next: Option<Instant>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent: a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn answered(&self, slot: Slot, answer: Answer) {
        let mut state = self.lock();
        state.pace.answered(slot, Instant::now(), answer);
        self.publish(&mut state);
        drop(state);
        self.notify.notify_one();
    }

    fn publish(&self, state: &mut State) {
        let metrics = &self.metrics;
        metrics.token_rate_limit.set(i64::from(state.pace.rate()));
        metrics
            .token_requests_waiting
            .set(i64::try_from(state.queued.len()).unwrap_or(i64::MAX));
        let pauses = state.pace.pauses();
        metrics
            .token_rate_limit_pauses
            .inc_by(pauses - state.pauses_counted);
        state.pauses_counted = pauses;
    }

    fn start_dispatcher(self: &Arc<Self>, state: &mut State) {
        if state.dispatcher {
            return;
        }
        // Called from async code only, so there is a runtime.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        state.dispatcher = true;
        runtime.spawn(dispatcher(Arc::downgrade(self), self.notify.clone()));
    }

    /// Grants turns in rank order while the pace allows; expires unclaimed grants.
    fn dispatch(self: &Arc<Self>, now: Instant) -> Dispatched {
        let mut state = self.lock();
        let state = &mut *state;
        let mut out = Dispatched::default();
        // Also when nobody waits: the next recovery below must lie in the future.
        state.pace.recover(now);
        let expired: Vec<String> = state
            .grants
            .iter()
            .filter(|(_, grant)| grant.until <= now)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in expired {
            if let Some(grant) = state.grants.remove(&uid) {
                state.pace.unused(grant.slot);
            }
        }
        while let Some(entry) = state.queue.first_entry() {
            let slot = match state.pace.try_acquire(now) {
                Ok(slot) => slot,
                Err(Wait::Until(at)) => {
                    out.next = Some(at);
                    break;
                }
                Err(Wait::Answer) => break,
            };
            match entry.remove() {
                Waiter::Interactive(sender) => {
                    let permit = Permit {
                        shared: self.clone(),
                        slot: Some(slot),
                    };
                    out.permits.push((sender, permit));
                }
                Waiter::Refresh { uid, wake } => {
                    state.queued.remove(&uid);
                    state.grants.insert(
                        uid,
                        Grant {
                            slot,
                            until: now + GRANT_TTL,
                        },
                    );
                    out.wakes.push(wake);
                }
            }
        }
        let grant_expiry = state.grants.values().map(|g| g.until).min();
        out.next = [out.next, grant_expiry, state.pace.next_recovery()]
            .into_iter()
            .flatten()
            .min();
        self.publish(state);
        out
    }
}

/// Runs while the limiter exists: dispatches whenever something changed or a wait ran out.
async fn dispatcher(shared: Weak<Shared>, notify: Arc<Notify>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let out = strong.dispatch(Instant::now());
        drop(strong);
        for (sender, permit) in out.permits {
            // The human gave up (the request was cancelled): the slot was never used.
            if let Err(permit) = sender.send(permit) {
                permit.unsent();
            }
        }
        for wake in out.wakes {
            wake();
        }
        match out.next {
            Some(at) => {
                tokio::select! {
                    () = notify.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => notify.notified().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use tokio::sync::mpsc;

    use super::*;
    use crate::goto::limiter::RECOVERY_STEP;

    fn limiter(per_second: u32, max_in_flight: u32) -> (Arc<Limiter>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let limiter = Limiter::new(per_second, max_in_flight, metrics.clone());
        (Arc::new(limiter), metrics)
    }

    fn at(minutes: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + minutes * 60).expect("a time")
    }

    /// A wake that reports `uid` on `tx`.
    fn wake(
        tx: &mpsc::UnboundedSender<&'static str>,
        uid: &'static str,
    ) -> impl FnOnce() + Send + use<> {
        let tx = tx.clone();
        move || {
            let _ = tx.send(uid);
        }
    }

    fn claim(limiter: &Limiter, uid: &str) -> Permit {
        match limiter.turn(uid, at(0), || {}) {
            Turn::Now(permit) => permit,
            Turn::Queued { .. } => panic!("{uid} was woken but holds no grant"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_exchange_goes_first_then_the_earliest_expiry() {
        let (limiter, _) = limiter(1, 10);
        let (tx, mut woken) = mpsc::unbounded_channel();
        let Turn::Now(busy) = limiter.turn("busy", at(0), || {}) else {
            panic!("nobody waits: a permit at once");
        };
        for (uid, expires) in [("late", 30), ("soon", 10), ("middle", 20)] {
            assert!(matches!(
                limiter.turn(uid, at(expires), wake(&tx, uid)),
                Turn::Queued { .. }
            ));
        }
        // Reconciled again while waiting: still one ticket, with the newest wake.
        assert!(matches!(
            limiter.turn("late", at(30), wake(&tx, "late")),
            Turn::Queued { .. }
        ));
        let start = Instant::now();
        busy.answered(Answer::Other);
        // The human comes after the refreshes took their tickets and still goes first.
        let human = tokio::spawn({
            let limiter = limiter.clone();
            async move {
                let permit = limiter.interactive().await;
                let granted = Instant::now();
                permit.answered(Answer::Other);
                granted
            }
        });
        let human_at = human.await.expect("the code exchange got a permit");
        assert_eq!(human_at - start, WINDOW);
        let mut order = Vec::new();
        while order.len() < 3 {
            let uid = woken.recv().await.expect("a wake");
            order.push((uid, Instant::now() - start));
            claim(&limiter, uid).answered(Answer::Other);
        }
        assert_eq!(
            order,
            [
                ("soon", WINDOW * 2),
                ("middle", WINDOW * 3),
                ("late", WINDOW * 4),
            ]
        );
        assert!(woken.try_recv().is_err(), "each ticket is granted once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_grant_lapses_and_its_slot_goes_to_the_next() {
        let (limiter, metrics) = limiter(1, 10);
        let (tx, mut woken) = mpsc::unbounded_channel();
        claim(&limiter, "first").answered(Answer::Other);
        let start = Instant::now();
        assert!(matches!(
            limiter.turn("gone", at(5), wake(&tx, "gone")),
            Turn::Queued { .. }
        ));
        assert_eq!(metrics.token_requests_waiting.get(), 1);
        assert_eq!(woken.recv().await, Some("gone"));
        let granted = Instant::now();
        assert_eq!(granted - start, WINDOW);
        assert_eq!(metrics.token_requests_waiting.get(), 0);
        // "gone" never claims its turn; "next" waits for the grant to lapse, not for a window:
        // the unused grant never counted as a request.
        assert!(matches!(
            limiter.turn("next", at(10), wake(&tx, "next")),
            Turn::Queued { .. }
        ));
        assert_eq!(woken.recv().await, Some("next"));
        assert_eq!(Instant::now() - granted, GRANT_TTL);
        claim(&limiter, "next").answered(Answer::Other);
        // Back too late: a new ticket, no permit.
        assert!(matches!(
            limiter.turn("gone", at(5), wake(&tx, "gone")),
            Turn::Queued { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_pauses_everyone_for_retry_after_and_halves_the_rate() {
        let (limiter, metrics) = limiter(10, 10);
        assert_eq!(metrics.token_rate_limit.get(), 10);
        let start = Instant::now();
        let permit = limiter.interactive().await;
        permit.answered(Answer::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        });
        assert_eq!(metrics.token_rate_limit.get(), 5);
        assert_eq!(metrics.token_rate_limit_pauses.get(), 1);
        // Every refresh waits out the pause, and so does a code exchange (still going first).
        let (tx, mut woken) = mpsc::unbounded_channel();
        for uid in ["a", "b", "c", "d", "e"] {
            assert!(matches!(
                limiter.turn(uid, at(1), wake(&tx, uid)),
                Turn::Queued { .. }
            ));
        }
        let permit = limiter.interactive().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        permit.answered(Answer::Other);
        // Then four refreshes at once (rate 5, the code exchange in the window); the fifth when
        // the rate climbs to 6, RECOVERY_STEP after the 429 (before the window would let it).
        let mut granted = Vec::new();
        while granted.len() < 5 {
            let uid = woken.recv().await.expect("a wake");
            granted.push(Instant::now() - start);
            claim(&limiter, uid).answered(Answer::Other);
        }
        let two = Duration::from_secs(2);
        assert_eq!(granted, [two, two, two, two, RECOVERY_STEP]);
        assert_eq!(metrics.token_rate_limit.get(), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_allowed_rate_climbs_back_while_nobody_waits() {
        let (limiter, metrics) = limiter(10, 10);
        let start = Instant::now();
        limiter
            .interactive()
            .await
            .answered(Answer::RateLimited { retry_after: None });
        let (tx, mut woken) = mpsc::unbounded_channel();
        assert!(matches!(
            limiter.turn("a", at(1), wake(&tx, "a")),
            Turn::Queued { .. }
        ));
        assert_eq!(woken.recv().await, Some("a"));
        claim(&limiter, "a").answered(Answer::Other);
        assert_eq!(metrics.token_rate_limit.get(), 5);
        // The dispatcher keeps the gauge current (and sleeps between steps, or this test hangs).
        tokio::time::sleep_until(start + RECOVERY_STEP * 3 + Duration::from_millis(500)).await;
        assert_eq!(metrics.token_rate_limit.get(), 8);
    }

    /// Requests that leave late and answers that come late: however they fall, no second (as
    /// GoTo would count it, at the request's arrival) holds more than the rate.
    #[tokio::test(start_paused = true)]
    async fn no_second_sees_more_than_the_rate_with_late_and_slow_requests() {
        const RATE: usize = 5;
        let (limiter, _) = limiter(RATE as u32, 10);
        let arrivals = Arc::new(StdMutex::new(Vec::new()));
        let mut clients = Vec::new();
        for i in 0..60u64 {
            let (limiter, arrivals) = (limiter.clone(), arrivals.clone());
            // Between the permit and GoTo: 0–600 ms; GoTo to the answer: 0–1.5 s.
            let leaves_after = Duration::from_millis((i * 37 % 7) * 100);
            let answered_after = Duration::from_millis((i * 53 % 11) * 150);
            clients.push(tokio::spawn(async move {
                let uid = format!("client-{i}");
                let expires = at(i64::try_from(i * 7 % 13).expect("small"));
                loop {
                    let turn = Arc::new(Notify::new());
                    let wake = {
                        let turn = turn.clone();
                        move || turn.notify_one()
                    };
                    match limiter.turn(&uid, expires, wake) {
                        Turn::Now(permit) => {
                            tokio::time::sleep(leaves_after).await;
                            arrivals.lock().expect("arrivals").push(Instant::now());
                            tokio::time::sleep(answered_after).await;
                            permit.answered(Answer::Other);
                            return;
                        }
                        Turn::Queued { .. } => turn.notified().await,
                    }
                }
            }));
        }
        for client in clients {
            client.await.expect("every client sent its request");
        }
        let mut arrivals = arrivals.lock().expect("arrivals").clone();
        arrivals.sort();
        assert_eq!(arrivals.len(), 60);
        for (i, first) in arrivals.iter().enumerate() {
            let in_one_second = arrivals[i..]
                .iter()
                .take_while(|t| t.duration_since(*first) < Duration::from_secs(1))
                .count();
            assert!(
                in_one_second <= RATE,
                "{in_one_second} requests reached GoTo within one second"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_client_gives_its_grant_back_at_once() {
        let (limiter, _) = limiter(1, 10);
        let (tx, mut woken) = mpsc::unbounded_channel();
        claim(&limiter, "first").answered(Answer::Other);
        for (uid, expires) in [("deleted", 1), ("other", 2)] {
            assert!(matches!(
                limiter.turn(uid, at(expires), wake(&tx, uid)),
                Turn::Queued { .. }
            ));
        }
        assert_eq!(woken.recv().await, Some("deleted"));
        let granted = Instant::now();
        limiter.forget("deleted");
        assert_eq!(woken.recv().await, Some("other"));
        assert_eq!(Instant::now(), granted);
    }
}
