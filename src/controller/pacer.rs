//! The client watch's triggers, handed to kube's controller a window at a time.
//!
//! kube's controller takes every trigger into its scheduler at once. It runs
//! [`super::watches::CONCURRENCY`] reconciles at a time; the due requests beyond those wait in a
//! set inside the scheduler, and that set keeps its size once it has grown: a list of 10,000
//! clients (start-up, a relist) or a change to all of them left about 2 MB behind for the life
//! of the process (a heap profile; BENCHMARKS.md, issue 11). So the watch's triggers wait here
//! instead, and at most [`WINDOW`] clients are handed over and not yet reconciled at any time;
//! the next goes as a reconcile ends. What waits here is freed once the burst has passed.
//!
//! - A change (of the client, or of a Secret it references) waits in a queue, oldest first,
//!   once: a client already queued, or not yet handed over by the current list's pass, is not
//!   queued again (kube's scheduler merged those the same way).
//! - A complete list (start-up, relist) hands over every client of the cache, after the queued
//!   changes; a relist starts the pass over. The pass keeps the cache's own entries and a
//!   digest of each name, 24 bytes a client, rather than a request each.
//!
//! A client counts against the window from its hand-over until a reconcile of it ends (kube
//! reports each end, success, failure or not found). One handed over twice while waiting
//! counts once; one whose end never comes back (a runner error has no object) stops counting
//! after [`FORGOTTEN_AFTER`], so the window cannot close for good.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::Stream;
use kube::runtime::{
    controller::{Action, Error as ControllerError},
    reflector::{ObjectRef, Store},
};
use tokio::{sync::Notify, time::Instant};

use super::{
    cached::{CachedClient, ClientRef, client_ref},
    index::Digest,
};

/// How many clients may be handed over and not yet reconciled: a few times the reconciles that
/// run at once, so the controller never waits for the next.
pub(crate) const WINDOW: usize = 64;

/// A client handed over this long ago no longer counts against the window, reconciled or not.
pub(crate) const FORGOTTEN_AFTER: Duration = Duration::from_secs(60);

/// Paces the triggers of one scope's client watch.
pub(crate) struct Pacer {
    store: Store<CachedClient>,
    state: Mutex<State>,
    /// Wakes the stream of hand-overs: something queued, or a turn freed.
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Changes delivered, oldest first.
    changed: VecDeque<ClientRef>,
    /// The clients in `changed`.
    queued: HashSet<ClientRef>,
    /// The clients of the last list not handed over yet, in reverse (the next is last).
    pass: Vec<Arc<CachedClient>>,
    /// Where each client of `pass` is, by the digest of its namespace and name.
    in_pass: HashMap<Digest, usize>,
    /// Handed over and not reconciled yet, with when.
    handed: HashMap<ClientRef, Instant>,
}

fn digest(namespace: Option<&str>, name: &str) -> Digest {
    Digest::of_all(&[namespace.unwrap_or_default(), name])
}

fn digest_of(client: &CachedClient) -> Digest {
    use kube::ResourceExt;
    digest(client.namespace().as_deref(), &client.name_any())
}

impl State {
    fn change(&mut self, client: ClientRef) {
        let waiting_in_pass = self
            .in_pass
            .get(&digest(client.namespace.as_deref(), &client.name))
            .and_then(|&at| self.pass.get(at))
            .is_some_and(|entry| ObjectRef::from_obj(&**entry) == client);
        if !waiting_in_pass && self.queued.insert(client.clone()) {
            self.changed.push_back(client);
        }
    }

    fn list(&mut self, mut clients: Vec<Arc<CachedClient>>) {
        clients.reverse();
        self.in_pass = clients
            .iter()
            .enumerate()
            .map(|(at, client)| (digest_of(client), at))
            .collect();
        self.pass = clients;
    }

    /// The next client to hand over, if the window allows one.
    fn next(&mut self, now: Instant) -> Option<ClientRef> {
        if self.handed.len() >= WINDOW {
            self.handed
                .retain(|_, at| now.duration_since(*at) < FORGOTTEN_AFTER);
            if self.handed.len() >= WINDOW {
                return None;
            }
        }
        let client = match self.changed.pop_front() {
            Some(client) => {
                self.queued.remove(&client);
                client
            }
            None => {
                let entry = self.pass.pop()?;
                let key = digest_of(&entry);
                if self.in_pass.get(&key) == Some(&self.pass.len()) {
                    self.in_pass.remove(&key);
                }
                ObjectRef::from_obj(&*entry)
            }
        };
        // A burst has passed: its memory goes now, not at the next burst.
        if self.changed.is_empty() && self.changed.capacity() > 0 {
            self.changed = VecDeque::new();
            self.queued = HashSet::new();
        }
        if self.pass.is_empty() && self.pass.capacity() > 0 {
            self.pass = Vec::new();
            self.in_pass = HashMap::new();
        }
        self.handed.insert(client.clone(), now);
        Some(client)
    }
}

impl Pacer {
    pub(crate) fn new(store: Store<CachedClient>) -> Pacer {
        Pacer {
            store,
            state: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch delivered a change of `client`.
    pub(crate) fn changed(&self, client: ClientRef) {
        self.state().change(client);
        self.wake.notify_one();
    }

    /// A list is complete (the cache holds it): every cached client is handed over again.
    pub(crate) fn listed(&self) {
        let clients = self.store.state();
        self.state().list(clients);
        self.wake.notify_one();
    }

    /// A reconcile ended, as kube's controller reports it.
    pub(crate) fn reconciled<E1, E2>(
        &self,
        result: &Result<(ClientRef, Action), ControllerError<E1, E2>>,
    ) {
        let client = match result {
            Ok((client, _)) => client.clone(),
            Err(
                ControllerError::ObjectNotFound(client)
                | ControllerError::ReconcilerFailed(_, client),
            ) => client_ref(
                client.namespace.as_deref().unwrap_or_default(),
                &client.name,
            ),
            // No object to tell: it stops counting after FORGOTTEN_AFTER.
            Err(_) => return,
        };
        if self.state().handed.remove(&client).is_some() {
            self.wake.notify_one();
        }
    }

    /// The clients to reconcile, as the window allows, for as long as the pacer lives.
    pub(crate) fn clients(self: Arc<Self>) -> impl Stream<Item = ClientRef> + Send + 'static {
        futures::stream::unfold(self, |pacer| async move {
            loop {
                let next = {
                    // Registered before looking, so a wake between the look and the wait counts.
                    let woken = pacer.wake.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    let next = pacer.state().next(Instant::now());
                    if next.is_none() {
                        // A forgotten hand-over frees its turn without a wake.
                        let _ = tokio::time::timeout(FORGOTTEN_AFTER, woken).await;
                    }
                    next
                };
                if let Some(client) = next {
                    return Some((client, pacer));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::controller::{cached::cache_event, fixtures::demo_client};

    type Outcome = Result<(ClientRef, Action), ControllerError<std::io::Error, std::io::Error>>;

    fn cached(count: usize) -> (Store<CachedClient>, Vec<String>) {
        let (store, mut writer) = reflector::store::<CachedClient>();
        let mut all = Vec::new();
        writer.apply_watcher_event(&watcher::Event::Init);
        for i in 0..count {
            let (mut obj, _) = demo_client();
            obj.metadata.name = Some(format!("client-{i}"));
            all.push(format!("client-{i}"));
            writer.apply_watcher_event(&cache_event(watcher::Event::InitApply(obj)));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (store, all)
    }

    /// Takes what the stream has ready now, without waiting (outside tokio's cooperative
    /// budget, which would otherwise make a long run of ready items look pending).
    fn ready(stream: &mut (impl Stream<Item = ClientRef> + Unpin)) -> Vec<ClientRef> {
        let mut clients = Vec::new();
        while let Some(Some(client)) = tokio::task::unconstrained(stream.next()).now_or_never() {
            clients.push(client);
        }
        clients
    }

    fn done(pacer: &Pacer, clients: &[ClientRef]) {
        for client in clients {
            let outcome: Outcome = Ok((client.clone(), Action::await_change()));
            pacer.reconciled(&outcome);
        }
    }

    fn names(clients: &[ClientRef]) -> Vec<String> {
        let mut names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_list_is_handed_over_a_window_at_a_time() {
        let (store, mut all) = cached(WINDOW + 10);
        let pacer = Arc::new(Pacer::new(store));
        let mut clients = Box::pin(pacer.clone().clients());
        assert!(ready(&mut clients).is_empty(), "nothing before a list");

        pacer.listed();
        let mut handed = ready(&mut clients);
        assert_eq!(handed.len(), WINDOW, "one window");
        done(&pacer, &handed[..3]);
        let more = ready(&mut clients);
        assert_eq!(more.len(), 3, "one more per reconcile ended");
        handed.extend(more);
        done(&pacer, &handed);
        handed.extend(ready(&mut clients));
        all.sort();
        assert_eq!(names(&handed), all, "every client once");
        done(&pacer, &handed);
        assert!(ready(&mut clients).is_empty(), "until the next list");
        let state = pacer.state();
        assert_eq!((state.pass.capacity(), state.handed.len()), (0, 0));
    }

    #[tokio::test]
    async fn changes_wait_their_turn_and_go_before_the_rest_of_a_list() {
        let (store, _) = cached(2 * WINDOW);
        let pacer = Arc::new(Pacer::new(store));
        let mut clients = Box::pin(pacer.clone().clients());
        pacer.listed();
        let first = ready(&mut clients);
        assert_eq!(first.len(), WINDOW);
        let changed = client_ref("ns", "changed");
        pacer.changed(changed.clone());
        assert!(ready(&mut clients).is_empty(), "the window is full");

        // Any end frees a turn: a failure, an object gone, a success.
        let failed: Outcome = Err(ControllerError::ReconcilerFailed(
            std::io::Error::other("boom"),
            Box::new(first[0].clone().erase()),
        ));
        pacer.reconciled(&failed);
        assert_eq!(ready(&mut clients), vec![changed.clone()], "a change first");
        let gone: Outcome = Err(ControllerError::ObjectNotFound(Box::new(
            first[1].clone().erase(),
        )));
        pacer.reconciled(&gone);
        let next = ready(&mut clients);
        assert_eq!(next.len(), 1, "then the list goes on");
        // The end of a client not handed over frees nothing.
        done(&pacer, &[client_ref("ns", "stranger")]);
        assert!(ready(&mut clients).is_empty());

        // A burst of changes waits here, not in kube's scheduler, and its queue is freed once
        // it has passed.
        done(&pacer, &first[2..]);
        done(&pacer, &[changed]);
        done(&pacer, &next);
        for i in 0..1000 {
            pacer.changed(client_ref("ns", &format!("burst-{i}")));
        }
        assert!(pacer.state().changed.capacity() >= 1000);
        let mut handed = Vec::new();
        // The burst, then what is left of the list.
        while handed.len() < 1000 + WINDOW - 1 {
            let now = ready(&mut clients);
            assert!(!now.is_empty(), "turns keep coming while reconciles end");
            assert!(now.len() <= WINDOW);
            done(&pacer, &now);
            handed.extend(now);
        }
        assert!(ready(&mut clients).is_empty());
        assert_eq!(pacer.state().changed.capacity(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hand_over_whose_end_never_comes_stops_counting() {
        let (store, _) = cached(WINDOW + 1);
        let pacer = Arc::new(Pacer::new(store));
        let mut clients = Box::pin(pacer.clone().clients());
        pacer.listed();
        assert_eq!(ready(&mut clients).len(), WINDOW);
        let next = tokio::spawn(async move { clients.next().await });
        tokio::time::sleep(FORGOTTEN_AFTER - Duration::from_secs(1)).await;
        assert!(!next.is_finished(), "still counting");
        let last = next.await.unwrap();
        assert!(last.is_some(), "the window opened again");
    }

    #[tokio::test]
    async fn a_client_waits_once() {
        let (store, _) = cached(WINDOW + 2);
        let pacer = Arc::new(Pacer::new(store));
        let mut clients = Box::pin(pacer.clone().clients());
        pacer.listed();
        let first = ready(&mut clients);
        // Two clients of the list not handed over yet.
        let waiting: Vec<ClientRef> = pacer
            .state()
            .pass
            .iter()
            .map(|c| ObjectRef::from_obj(&**c))
            .collect();
        assert_eq!(waiting.len(), 2);
        pacer.changed(waiting[0].clone());
        let other = client_ref("ns", "other");
        pacer.changed(other.clone());
        pacer.changed(other.clone());
        // A client handed over and changed since is queued again: its reconcile may have read
        // the cache before the change.
        pacer.changed(first[0].clone());
        done(&pacer, &first);
        let mut rest = names(&ready(&mut clients));
        let mut expected = names(&[
            waiting[0].clone(),
            waiting[1].clone(),
            other,
            first[0].clone(),
        ]);
        rest.sort();
        expected.sort();
        assert_eq!(rest, expected, "each once");
    }

    #[tokio::test]
    async fn a_relist_starts_over() {
        let (store, _) = cached(2 * WINDOW);
        let pacer = Arc::new(Pacer::new(store));
        let mut clients = Box::pin(pacer.clone().clients());
        pacer.listed();
        let first = ready(&mut clients);
        done(&pacer, &first);
        pacer.listed();
        let again = ready(&mut clients);
        assert_eq!(again, first, "from the start");
    }
}
