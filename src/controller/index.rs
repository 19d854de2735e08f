//! What the controller knows from its watches without asking the API server: the
//! resourceVersion of every Secret in the watched namespaces ([`SecretVersions`]) and which
//! clients reference which Secret ([`References`]).
//!
//! A reconcile reads a Secret only when it cannot know it: [`SecretVersions`] says whether the
//! Secret exists and at which version, and the reconcile re-uses what it read or wrote at that
//! version (see `observe`). Only digests of names and versions are kept ([`Digest`]: sixteen
//! bytes a Secret, no strings, no data), so the unrelated Secrets of a namespace cost little,
//! and knowing them all is what lets an absent Secret be known absent without a GET.
//!
//! [`References`] turns a Secret's watch event into the clients to reconcile in constant time;
//! scanning every cached client per Secret event is quadratic at start-up (every Secret is an
//! event) and would take seconds at 10,000 clients.
//!
//! Both follow a relist the way kube's reflector store does: the objects listed between `Init`
//! and `InitDone` replace the scope's entries at once, so an object deleted while the watch was
//! down is forgotten.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{Arc, LazyLock, RwLock},
};

use kube::runtime::watcher;

use crate::resource::GoToOAuthClient;

/// A Secret's name or resourceVersion as [`SecretVersions`] keeps it: a 64-bit digest keyed
/// per process. Every Secret of the watched namespaces has an entry, related to a client or
/// not (at 10,000 clients with two unrelated Secrets each, 40,000): two digests are sixteen
/// bytes, the two strings they replace some ninety with their allocations.
///
/// A digest only ever stands for equality, and a collision never makes a reconcile act on a
/// Secret it has not seen: two names of one digest share an entry, so one Secret is reported
/// at the other's version, which is never the version this replica read or wrote it at
/// (resourceVersions are unique in a cluster): it is read, as after any change. A deleted one
/// of the two makes the other look absent, and two versions of one Secret with one digest would
/// hide a change until the next: each a chance of 2^-64 per pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Digest(u64);

/// The keys of every [`Digest`] this process makes.
static DIGEST_KEYS: LazyLock<RandomState> = LazyLock::new(RandomState::new);

impl Digest {
    pub(crate) fn of(text: &str) -> Digest {
        Digest(DIGEST_KEYS.hash_one(text))
    }

    /// The digest of several strings together (each delimited, so no two lists share one).
    pub(crate) fn of_all(texts: &[&str]) -> Digest {
        Digest(DIGEST_KEYS.hash_one(texts))
    }

    /// Whether this is the digest of `text`.
    pub(crate) fn is(self, text: &str) -> bool {
        self == Digest::of(text)
    }
}

/// What the Secret watch says about one Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// It exists at the resourceVersion of this digest (as of the last event delivered).
    At(Digest),
    /// The namespace was listed and the Secret is not there.
    Absent,
    /// Not listed yet, or delivered without a version: read it.
    Unknown,
}

/// name → resourceVersion, as digests, per namespace.
type Versions = HashMap<Box<str>, HashMap<Digest, Digest>>;

/// The resourceVersion of every Secret in the watched namespaces, fed by the Secret metadata
/// watch of each scope (all namespaces, or one each).
#[derive(Debug, Default)]
pub(crate) struct SecretVersions {
    inner: RwLock<VersionsInner>,
}

#[derive(Debug, Default)]
struct VersionsInner {
    /// How often [`SecretVersions::reset`] was called.
    term: u64,
    versions: Versions,
    /// Namespaces whose list has completed (a scope of all namespaces: every one).
    listed_all: bool,
    listed: HashSet<Box<str>>,
    /// A relist in progress, per scope (`None`: all namespaces).
    relisting: HashMap<Option<Box<str>>, Versions>,
}

impl SecretVersions {
    /// Forgets everything and begins a new term: until the next list, every Secret is unknown.
    pub(crate) fn reset(&self) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *inner = VersionsInner {
            term: inner.term.wrapping_add(1),
            ..VersionsInner::default()
        };
    }

    /// The term of the watches: what this replica read or wrote in the current term is as
    /// current as anything it knows until they have listed; what it read before is not
    /// (another replica may have led meanwhile).
    pub(crate) fn term(&self) -> u64 {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).term
    }

    /// What is known about the Secret `namespace/name`.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Known {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        match inner
            .versions
            .get(namespace)
            .and_then(|n| n.get(&Digest::of(name)))
        {
            Some(rv) => Known::At(*rv),
            None if inner.listed_all || inner.listed.contains(namespace) => Known::Absent,
            None => Known::Unknown,
        }
    }

    /// Follows one event of the Secret watch of `scope` (all namespaces when `None`).
    pub(crate) fn follow<M: kube::Resource>(&self, scope: Option<&str>, event: &watcher::Event<M>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let scope_key = scope.map(Box::from);
        match event {
            watcher::Event::Init => {
                inner.relisting.insert(scope_key, Versions::default());
            }
            watcher::Event::InitApply(obj) => {
                if let (Some(buffer), Some((ns, name, rv))) =
                    (inner.relisting.get_mut(&scope_key), keys(obj))
                {
                    buffer.entry(ns).or_default().insert(name, rv);
                }
            }
            watcher::Event::InitDone => {
                let fresh = inner.relisting.remove(&scope_key).unwrap_or_default();
                match scope {
                    None => {
                        inner.versions = fresh;
                        inner.listed_all = true;
                    }
                    Some(ns) => {
                        let names = fresh.into_values().next().unwrap_or_default();
                        inner.versions.insert(ns.into(), names);
                        inner.listed.insert(ns.into());
                    }
                }
            }
            watcher::Event::Apply(obj) => {
                if let Some((ns, name, rv)) = keys(obj) {
                    inner.versions.entry(ns).or_default().insert(name, rv);
                }
            }
            watcher::Event::Delete(obj) => {
                let meta = obj.meta();
                if let (Some(ns), Some(name)) = (&meta.namespace, &meta.name)
                    && let Some(names) = inner.versions.get_mut(ns.as_str())
                {
                    names.remove(&Digest::of(name));
                }
            }
        }
    }
}

fn keys<M: kube::Resource>(obj: &M) -> Option<(Box<str>, Digest, Digest)> {
    let meta = obj.meta();
    Some((
        meta.namespace.as_deref()?.into(),
        Digest::of(meta.name.as_deref()?),
        Digest::of(meta.resource_version.as_deref()?),
    ))
}

/// The names of the Secrets a client references: its client secret, its personal access
/// token, its token Secret and the one it stored tokens in before a `secretName` change.
pub(crate) fn referenced_secrets(client: &GoToOAuthClient) -> Vec<String> {
    let mut names = vec![
        client.spec.client_secret_ref.name.clone(),
        client.target_secret_name(),
    ];
    if let Some(pat) = &client.spec.personal_access_token_ref {
        names.push(pat.name.clone());
    }
    if let Some(previous) = client.status.as_ref().and_then(|s| s.secret_name.clone()) {
        names.push(previous);
    }
    names.sort();
    names.dedup();
    names
}

/// A client: (namespace, name). The namespace is shared by its clients and their Secrets.
type Key = (Arc<str>, Arc<str>);
/// A Secret: its namespace and the [`Digest`] of its name. Two names of one digest share an
/// entry: a change to either wakes the clients of both, a reconcile with nothing to do.
type SecretKey = (Arc<str>, Digest);
/// Clients listed so far in a relist, with the Secrets each references.
type Listed = Vec<(Key, Vec<String>)>;

/// Which clients reference which Secret, fed by the client watch of each scope.
#[derive(Debug, Default)]
pub(crate) struct References {
    inner: RwLock<ReferencesInner>,
}

#[derive(Debug, Default)]
struct ReferencesInner {
    /// Client → the Secrets it references. Boxed slices, like the clients of a Secret: one a
    /// client or a Secret, exactly sized (a `Vec` that grew by one push holds four).
    by_client: HashMap<Key, Box<[Digest]>>,
    /// Secret → the clients referencing it (mostly one: a slice, not a set, saves a table).
    by_secret: HashMap<SecretKey, Box<[Arc<str>]>>,
    /// Every namespace seen, so each client's key shares its namespace's one string.
    namespaces: HashSet<Arc<str>>,
    /// A relist in progress, per scope: the clients listed so far with their Secrets.
    relisting: HashMap<Option<Box<str>>, Listed>,
}

impl ReferencesInner {
    fn remove(&mut self, client: &Key) {
        for secret in self.by_client.remove(client).unwrap_or_default() {
            let key = (client.0.clone(), secret);
            if let Some(clients) = self.by_secret.get_mut(&key) {
                if clients.len() == 1 && clients[0] == client.1 {
                    self.by_secret.remove(&key);
                } else {
                    *clients = clients
                        .iter()
                        .filter(|c| **c != client.1)
                        .cloned()
                        .collect();
                }
            }
        }
    }

    fn insert(&mut self, (namespace, name): Key, secrets: Vec<String>) {
        let namespace = match self.namespaces.get(&namespace) {
            Some(shared) => shared.clone(),
            None => {
                self.namespaces.insert(namespace.clone());
                namespace
            }
        };
        let client = (namespace, name);
        self.remove(&client);
        let secrets: Box<[Digest]> = secrets.iter().map(|s| Digest::of(s)).collect();
        for secret in &secrets {
            let clients = self
                .by_secret
                .entry((client.0.clone(), *secret))
                .or_default();
            if !clients.contains(&client.1) {
                *clients = clients.iter().chain([&client.1]).cloned().collect();
            }
        }
        self.by_client.insert(client, secrets);
    }
}

fn client_key(client: &GoToOAuthClient) -> Option<Key> {
    Some((
        client.metadata.namespace.as_deref()?.into(),
        client.metadata.name.as_deref()?.into(),
    ))
}

impl References {
    /// The names of the clients in `namespace` that reference the Secret `name`.
    pub(crate) fn clients_of(&self, namespace: &str, name: &str) -> Vec<String> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_secret
            .get(&(namespace.into(), Digest::of(name)))
            .map(|clients| clients.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default()
    }

    /// Follows one event of the client watch of `scope` (all namespaces when `None`).
    pub(crate) fn follow(&self, scope: Option<&str>, event: &watcher::Event<GoToOAuthClient>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let scope_key = scope.map(Box::from);
        match event {
            watcher::Event::Init => {
                inner.relisting.insert(scope_key, Vec::new());
            }
            watcher::Event::InitApply(client) => {
                if let (Some(buffer), Some(key)) =
                    (inner.relisting.get_mut(&scope_key), client_key(client))
                {
                    buffer.push((key, referenced_secrets(client)));
                }
            }
            watcher::Event::InitDone => {
                let listed = inner.relisting.remove(&scope_key).unwrap_or_default();
                let stale: Vec<Key> = inner
                    .by_client
                    .keys()
                    .filter(|(ns, _)| scope.is_none_or(|s| s == &**ns))
                    .cloned()
                    .collect();
                for key in &stale {
                    inner.remove(key);
                }
                for (key, secrets) in listed {
                    inner.insert(key, secrets);
                }
            }
            watcher::Event::Apply(client) => {
                if let Some(key) = client_key(client) {
                    inner.insert(key, referenced_secrets(client));
                }
            }
            watcher::Event::Delete(client) => {
                if let Some(key) = client_key(client) {
                    inner.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::{ObjectMeta, PartialObjectMeta};

    use super::*;

    fn secret(ns: &str, name: &str, rv: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    #[test]
    fn versions_know_absent_only_after_the_list() {
        type Event = watcher::Event<PartialObjectMeta<Secret>>;
        let versions = SecretVersions::default();
        assert_eq!(versions.get("a", "s"), Known::Unknown);
        versions.follow(Some("a"), &Event::Init);
        versions.follow(Some("a"), &Event::InitApply(secret("a", "s", "1")));
        assert_eq!(
            versions.get("a", "s"),
            Known::Unknown,
            "a relist applies at its end"
        );
        versions.follow(Some("a"), &Event::InitDone);
        assert_eq!(versions.get("a", "s"), Known::At(Digest::of("1")));
        assert_eq!(versions.get("a", "other"), Known::Absent);
        assert_eq!(
            versions.get("b", "s"),
            Known::Unknown,
            "another scope is not listed"
        );

        versions.follow(Some("a"), &watcher::Event::Apply(secret("a", "s", "2")));
        assert_eq!(versions.get("a", "s"), Known::At(Digest::of("2")));
        versions.follow(Some("a"), &watcher::Event::Delete(secret("a", "s", "3")));
        assert_eq!(versions.get("a", "s"), Known::Absent);
    }

    #[test]
    fn a_relist_forgets_what_was_deleted_meanwhile() {
        let versions = SecretVersions::default();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(secret("a", "gone", "1")),
            watcher::Event::InitApply(secret("b", "kept", "1")),
            watcher::Event::InitDone,
        ] {
            versions.follow(None, &event);
        }
        assert_eq!(versions.get("b", "anything"), Known::Absent, "all listed");
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(secret("b", "kept", "5")),
        ] {
            versions.follow(None, &event);
        }
        assert_eq!(versions.get("a", "gone"), Known::At(Digest::of("1")));
        versions.follow(None, &watcher::Event::<PartialObjectMeta<Secret>>::InitDone);
        assert_eq!(versions.get("a", "gone"), Known::Absent);
        assert_eq!(versions.get("b", "kept"), Known::At(Digest::of("5")));
    }

    fn client(ns: &str, name: &str, client_secret: &str, target: &str) -> GoToOAuthClient {
        let mut client = crate::controller::fixtures::demo_client().0;
        client.metadata.namespace = Some(ns.into());
        client.metadata.name = Some(name.into());
        client.spec.client_secret_ref.name = client_secret.into();
        client.spec.secret_name = Some(target.into());
        client
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn references_follow_changes_deletes_and_relists() {
        let refs = References::default();
        let one = client("a", "one", "shared", "one-token");
        let two = client("a", "two", "shared", "two-token");
        refs.follow(None, &watcher::Event::Apply(one.clone()));
        refs.follow(None, &watcher::Event::Apply(two.clone()));
        assert_eq!(sorted(refs.clients_of("a", "shared")), ["one", "two"]);
        assert_eq!(refs.clients_of("a", "one-token"), ["one"]);
        assert!(refs.clients_of("b", "shared").is_empty(), "per namespace");

        // A changed reference leaves the old Secret.
        refs.follow(
            None,
            &watcher::Event::Apply(client("a", "one", "own", "one-token")),
        );
        assert_eq!(refs.clients_of("a", "shared"), ["two"]);
        assert_eq!(refs.clients_of("a", "own"), ["one"]);

        refs.follow(None, &watcher::Event::Delete(two.clone()));
        assert!(refs.clients_of("a", "shared").is_empty());

        // A relist that no longer lists "one" forgets it.
        refs.follow(None, &watcher::Event::Init);
        refs.follow(None, &watcher::Event::InitApply(two));
        refs.follow(None, &watcher::Event::InitDone);
        assert!(refs.clients_of("a", "own").is_empty());
        assert_eq!(refs.clients_of("a", "shared"), ["two"]);
    }

    #[test]
    fn the_previous_token_secret_is_referenced_while_the_status_names_it() {
        let mut c = client("a", "one", "creds", "new-token");
        c.status = Some(crate::resource::GoToOAuthClientStatus {
            secret_name: Some("old-token".into()),
            ..Default::default()
        });
        assert_eq!(
            referenced_secrets(&c),
            ["creds", "new-token", "old-token"].map(String::from)
        );
    }
}
