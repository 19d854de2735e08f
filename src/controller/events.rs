//! Publishes Kubernetes Events (`events.k8s.io/v1`) about clients and the workloads they
//! restart, folding a repeat of the same Event within a few minutes into a series, as
//! client-go's event correlator does.
//!
//! Why not kube's `Recorder`: it keeps a full copy of every Event it published for six minutes
//! to build series, and scans that whole cache under a lock on every publish. This operator
//! publishes an Event for every client it first sees, so after a start-up with 1,000 clients
//! the cache held about 3 KB per client (the largest single store in a heap profile), and with
//! 10,000 clients each publish scanned 10,000 entries. Here a repeat is recognised by a 64-bit
//! digest of what makes it the same Event, and only the digest, the Event's name, its count
//! and its times are kept; the map is bounded, and what it forgets only costs a new Event
//! instead of a series.

use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent, events::v1::EventSeries},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::events::{Event, EventType},
};

/// How long a published Event can still turn into a series (kube's and client-go's figure).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// At most this many Events are remembered for series (client-go's correlator keeps 4,096).
const REMEMBERED: usize = 4096;

/// An Event published recently, as far as a repeat needs it.
#[derive(Clone, Debug, PartialEq)]
struct Published {
    name: String,
    namespace: String,
    count: i32,
    last: Timestamp,
}

/// What to send for one Event.
#[derive(Debug, PartialEq)]
pub(crate) enum Outgoing {
    Create(Box<K8sEvent>),
    /// A repeat: the named Event's series, as a merge patch.
    Series {
        namespace: String,
        name: String,
        series: EventSeries,
    },
}

/// Publishes Events under one reporting controller and instance.
pub(crate) struct Publisher {
    client: Client,
    reporter: Reporter,
    recent: Recent,
}

/// Who reports: the controller and this replica.
struct Reporter {
    controller: String,
    instance: String,
}

/// The Events published recently, by [`Reporter::key`], bounded.
#[derive(Default)]
struct Recent(Mutex<HashMap<u64, Published>>);

impl Publisher {
    pub(crate) fn new(client: Client, controller: &str, instance: Option<String>) -> Publisher {
        Publisher {
            client,
            reporter: Reporter {
                controller: controller.to_string(),
                instance: instance.unwrap_or_else(|| controller.to_string()),
            },
            recent: Recent::default(),
        }
    }

    /// Publishes `ev` about `regarding`. The caller logs a failure; Events are best effort.
    pub(crate) async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = self.reporter.key(ev, regarding);
        let send = plan(
            self.recent.get(key).as_ref(),
            self.reporter.event(ev, regarding, now),
            now,
        );
        let published = match send {
            Outgoing::Series {
                namespace,
                name,
                series,
            } => {
                let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                let patch = serde_json::json!({ "series": series });
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Published {
                        name,
                        namespace,
                        count: series.count,
                        last: now,
                    },
                    // Gone (expired, deleted): a new Event instead.
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        self.create(self.reporter.event(ev, regarding, now)).await?
                    }
                    Err(e) => return Err(e),
                }
            }
            Outgoing::Create(event) => self.create(*event).await?,
        };
        self.recent.remember(key, published, now);
        Ok(())
    }

    async fn create(&self, event: K8sEvent) -> Result<Published, kube::Error> {
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let created = api.create(&PostParams::default(), &event).await?;
        Ok(Published {
            name: created.metadata.name.unwrap_or_default(),
            namespace,
            count: 1,
            last: event.event_time.map_or_else(Timestamp::now, |t| t.0),
        })
    }
}

impl Recent {
    fn get(&self, key: u64) -> Option<Published> {
        let recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        recent.get(&key).cloned()
    }

    fn remember(&self, key: u64, published: Published, now: Timestamp) {
        let mut recent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= REMEMBERED && !recent.contains_key(&key) {
            recent.retain(|_, p| in_window(p.last, now));
            if recent.len() >= REMEMBERED {
                // Every remembered Event is recent: forgetting them costs new Events, not
                // series, for repeats in the next few minutes.
                recent.clear();
            }
            recent.shrink_to(REMEMBERED);
        }
        recent.insert(key, published);
    }
}

impl Reporter {
    /// What makes two Events the same (kube's and client-go's key): type, reason, action,
    /// the reporter, the object regarded and the related one; not the note.
    fn key(&self, ev: &Event, regarding: &ObjectReference) -> u64 {
        let mut h = DefaultHasher::new();
        (ev.type_ == EventType::Normal).hash(&mut h);
        (&ev.reason, &ev.action, &self.controller, &self.instance).hash(&mut h);
        for r in std::iter::once(Some(regarding)).chain([ev.secondary.as_ref()]) {
            r.map(|r| (&r.api_version, &r.kind, &r.namespace, &r.name, &r.uid))
                .hash(&mut h);
        }
        h.finish()
    }

    /// The Event object for `ev` about `regarding`, as first published.
    fn event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            note: ev.note.clone(),
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(match ev.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..K8sEvent::default()
        }
    }
}

fn in_window(last: Timestamp, now: Timestamp) -> bool {
    now.duration_since(last).unsigned_abs() < SERIES_WINDOW
}

/// A repeat within the window extends the earlier Event's series; anything else is created.
fn plan(earlier: Option<&Published>, fresh: K8sEvent, now: Timestamp) -> Outgoing {
    match earlier {
        Some(p) if in_window(p.last, now) => Outgoing::Series {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            series: EventSeries {
                count: p.count.saturating_add(1).max(2),
                last_observed_time: MicroTime(now),
            },
        },
        _ => Outgoing::Create(Box::new(fresh)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter {
            controller: "goto-oauth-operator".into(),
            instance: "replica-a".into(),
        }
    }

    fn reference(name: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("goto-oauth.dev/v1alpha1".into()),
            kind: Some("GoToOAuthClient".into()),
            namespace: Some("team".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..ObjectReference::default()
        }
    }

    fn ev(reason: &str, action: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: action.into(),
            secondary: None,
        }
    }

    #[test]
    fn the_event_carries_what_kubectl_shows() {
        let p = reporter();
        let now: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let e = p.event(
            &ev("RefreshFailed", "Refresh", "GoTo said no"),
            &reference("a"),
            now,
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("team"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("a."));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.reason.as_deref(), Some("RefreshFailed"));
        assert_eq!(e.action.as_deref(), Some("Refresh"));
        assert_eq!(e.note.as_deref(), Some("GoTo said no"));
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some("goto-oauth-operator")
        );
        assert_eq!(e.reporting_instance.as_deref(), Some("replica-a"));
        assert_eq!(e.regarding, Some(reference("a")));
        assert_eq!(e.event_time, Some(MicroTime(now)));
    }

    #[test]
    fn the_same_event_is_the_same_key_whatever_its_note() {
        let p = reporter();
        let a = p.key(&ev("RefreshFailed", "Refresh", "one"), &reference("a"));
        assert_eq!(
            a,
            p.key(&ev("RefreshFailed", "Refresh", "two"), &reference("a"))
        );
        for other in [
            p.key(&ev("RefreshFailed", "Consent", "one"), &reference("a")),
            p.key(&ev("ConsentGiven", "Refresh", "one"), &reference("a")),
            p.key(&ev("RefreshFailed", "Refresh", "one"), &reference("b")),
        ] {
            assert_ne!(a, other);
        }
        let mut normal = ev("RefreshFailed", "Refresh", "one");
        normal.type_ = EventType::Normal;
        assert_ne!(a, p.key(&normal, &reference("a")));
    }

    #[test]
    fn a_repeat_within_the_window_extends_the_series() {
        let p = reporter();
        let then: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let fresh = |now| p.event(&ev("R", "A", "n"), &reference("a"), now);
        let earlier = Published {
            name: "a.1".into(),
            namespace: "team".into(),
            count: 1,
            last: then,
        };
        let soon = then + jiff::SignedDuration::from_secs(60);
        assert_eq!(
            plan(Some(&earlier), fresh(soon), soon),
            Outgoing::Series {
                namespace: "team".into(),
                name: "a.1".into(),
                series: EventSeries {
                    count: 2,
                    last_observed_time: MicroTime(soon)
                },
            }
        );
        let third = Published {
            count: 2,
            last: soon,
            ..earlier.clone()
        };
        assert!(matches!(
            plan(Some(&third), fresh(soon), soon),
            Outgoing::Series {
                series: EventSeries { count: 3, .. },
                ..
            }
        ));
        let late = then + jiff::SignedDuration::from_secs(7 * 60);
        assert_eq!(
            plan(Some(&earlier), fresh(late), late),
            Outgoing::Create(Box::new(fresh(late)))
        );
        assert_eq!(
            plan(None, fresh(soon), soon),
            Outgoing::Create(Box::new(fresh(soon)))
        );
    }

    #[test]
    fn what_is_remembered_is_bounded() {
        let p = Recent::default();
        let now = Timestamp::now();
        let published = |last| Published {
            name: "x".into(),
            namespace: "team".into(),
            count: 1,
            last,
        };
        let old = now - jiff::SignedDuration::from_secs(3600);
        for key in 0..(REMEMBERED as u64 - 1) {
            p.remember(key, published(old), now);
        }
        p.remember(u64::MAX, published(now), now);
        assert_eq!(p.0.lock().unwrap().len(), REMEMBERED);
        // Full: the next one sweeps out what left the window and keeps the recent one.
        p.remember(u64::MAX - 1, published(now), now);
        let recent = p.0.lock().unwrap();
        assert_eq!(recent.len(), 2);
        assert!(recent.contains_key(&u64::MAX) && recent.contains_key(&(u64::MAX - 1)));
    }

    #[tokio::test]
    async fn a_repeat_patches_the_series_and_a_deleted_event_is_created_again() {
        let server = fake_apiserver::FakeApiServer::start().await;
        let client = server.client();
        let namespace = k8s_openapi::api::core::v1::Namespace {
            metadata: ObjectMeta {
                name: Some("team".into()),
                ..ObjectMeta::default()
            },
            ..Default::default()
        };
        Api::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let publisher = Publisher::new(client.clone(), "goto-oauth-operator", None);
        let api: Api<K8sEvent> = Api::namespaced(client, "team");
        let failed = ev("RefreshFailed", "Refresh", "GoTo said no");

        publisher.publish(&failed, &reference("a")).await.unwrap();
        publisher.publish(&failed, &reference("a")).await.unwrap();
        let events = api.list(&Default::default()).await.unwrap().items;
        assert_eq!(events.len(), 1, "a repeat is the same Event");
        assert_eq!(events[0].series.as_ref().map(|s| s.count), Some(2));
        assert_eq!(events[0].note.as_deref(), Some("GoTo said no"));

        publisher
            .publish(&ev("ConsentGiven", "Consent", "ok"), &reference("a"))
            .await
            .unwrap();
        assert_eq!(api.list(&Default::default()).await.unwrap().items.len(), 2);

        let name = events[0].metadata.name.clone().unwrap();
        api.delete(&name, &Default::default()).await.unwrap();
        publisher.publish(&failed, &reference("a")).await.unwrap();
        let events = api.list(&Default::default()).await.unwrap().items;
        let again: Vec<_> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("RefreshFailed"))
            .collect();
        assert_eq!(again.len(), 1, "the deleted Event is created anew");
        assert_eq!(again[0].series, None);
        server.shutdown().await;
    }
}
