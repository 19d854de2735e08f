//! Every replica's in-memory index of the authorization links its watched namespaces publish,
//! fed by the watch of `GoToOAuthClient`s that runs on every replica, leader or not
//! ([`crate::client_cache`]).
//!
//! `/authorize/...` is the one unauthenticated entry point: it must cost no API request for a
//! wrong link, and must not tell by its timing whether a namespace/name exists. A link is
//! checked here first, in constant time against the stored token (or against a dummy when
//! there is none); a miss is answered only at a fixed deadline, during which a link that was
//! published a moment ago (the index follows the watch) still gets through.
//!
//! A link that matches is started from the index too: each entry keeps what the redirect to
//! GoTo needs (the validated client id, endpoints and scopes, or why the authorization cannot
//! start), a few hundred bytes a client instead of the object, so opening a link costs no API
//! request either. The callback reads the client before anything is written.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock},
    time::Duration,
};

use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::link_token;
use crate::{
    conditions::Reason,
    resource::{GoToOAuthClient, client_key, split_client_key},
    validation::{Defaults, validate},
};

/// How long a link that does not match is looked for before the answer: every miss takes
/// this long, whether or not the client exists.
pub(crate) const MISS_DEADLINE: Duration = Duration::from_millis(500);

/// Compared against when no link is stored, so a miss does the same work as a mismatch.
const DUMMY_LINK: [u8; 43] = [b'x'; 43];

/// One published link. Every replica keeps one per client, so the strings are boxed (no spare
/// capacity) and the URLs most clients share (the operator's defaults) are shared.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    link: Box<str>,
    start: Start,
}

/// What starting an authorization for one client needs, as the watch last showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Start {
    pub(crate) uid: Box<str>,
    pub(crate) display_name: Box<str>,
    pub(crate) request: Result<StartRequest, Refusal>,
}

/// The parts of the authorization request, from the validated spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StartRequest {
    pub(crate) client_id: Box<str>,
    pub(crate) authorize_url: Arc<str>,
    pub(crate) redirect_uri: Arc<str>,
    pub(crate) scopes: Box<[String]>,
}

/// Why an authorization cannot start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    InvalidSpec,
    /// The controller reports the client secret missing (the `Ready` condition's reason).
    ClientSecretMissing,
}

/// `value`, as the shared `default` when it is the same.
fn shared(default: &Arc<str>, value: &str) -> Arc<str> {
    if **default == *value {
        default.clone()
    } else {
        value.into()
    }
}

/// Published links by [`client_key`] (every replica keeps an entry per client).
#[derive(Debug)]
pub(crate) struct LinkIndex {
    /// Boxed entries: a hash map keeps up to twice as many slots as entries, and an entry is
    /// over a hundred bytes.
    links: RwLock<HashMap<Box<str>, Box<Entry>>>,
    /// Bumped on every change, so a waiting lookup re-checks.
    version: watch::Sender<u64>,
    /// To validate specs as the controller does.
    defaults: Defaults,
    /// The default authorize URL and redirect URI, shared by the entries that use them.
    default_authorize_url: Arc<str>,
    default_redirect_uri: Arc<str>,
}

impl LinkIndex {
    pub(crate) fn new(defaults: Defaults) -> LinkIndex {
        LinkIndex {
            links: RwLock::default(),
            version: watch::channel(0).0,
            default_authorize_url: defaults.authorize_url.as_str().into(),
            default_redirect_uri: defaults.public_endpoint("callback").into(),
            defaults,
        }
    }

    /// The client whose published link is `presented`, checked in constant time.
    fn check(&self, namespace: &str, name: &str, presented: &str) -> Option<Start> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        // A slash in either part (a hostile request's) names no client; the comparison below
        // runs all the same.
        let entry = (!namespace.contains('/') && !name.contains('/'))
            .then(|| links.get(&*client_key(namespace, name)))
            .flatten();
        let expected = entry.map_or(&DUMMY_LINK[..], |e| e.link.as_bytes());
        let matches = bool::from(expected.ct_eq(presented.as_bytes()));
        entry.filter(|_| matches).map(|e| e.start.clone())
    }

    /// Like [`LinkIndex::check`], but a miss is answered only at [`MISS_DEADLINE`], and a link
    /// that appears in the index meanwhile is accepted.
    pub(crate) async fn resolve(
        &self,
        namespace: &str,
        name: &str,
        presented: &str,
    ) -> Option<Start> {
        let deadline = tokio::time::Instant::now() + MISS_DEADLINE;
        let mut changes = self.version.subscribe();
        loop {
            if let Some(uid) = self.check(namespace, name, presented) {
                return Some(uid);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return None,
                changed = changes.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(deadline).await;
                        return None;
                    }
                }
            }
        }
    }

    fn key(obj: &GoToOAuthClient) -> Option<Box<str>> {
        Some(client_key(
            obj.metadata.namespace.as_deref()?,
            obj.metadata.name.as_deref()?,
        ))
    }

    fn entry(&self, obj: &GoToOAuthClient) -> Option<Entry> {
        let link = link_token(obj.status.as_ref())?;
        let secret_missing = obj.status.iter().flat_map(|s| &s.conditions).any(|c| {
            c.type_ == crate::conditions::READY
                && Reason::parse(&c.reason) == Some(Reason::ClientSecretMissing)
        });
        let request = match validate(obj, &self.defaults) {
            Err(_) => Err(Refusal::InvalidSpec),
            Ok(_) if secret_missing => Err(Refusal::ClientSecretMissing),
            Ok(settings) => Ok(StartRequest {
                client_id: settings.client_id.into(),
                authorize_url: shared(&self.default_authorize_url, settings.authorize_url.as_str()),
                redirect_uri: shared(&self.default_redirect_uri, &settings.redirect_uri),
                scopes: settings.scopes.into(),
            }),
        };
        Some(Entry {
            link: link.into(),
            start: Start {
                uid: obj.metadata.uid.as_deref()?.into(),
                display_name: obj.display_name().into(),
                request,
            },
        })
    }

    pub(crate) fn apply(&self, obj: &GoToOAuthClient) {
        let Some(key) = Self::key(obj) else { return };
        let entry = self.entry(obj);
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        match entry {
            Some(entry) => links.insert(key, Box::new(entry)),
            None => links.remove(&key),
        };
        drop(links);
        self.version.send_modify(|v| *v += 1);
    }

    fn delete(&self, obj: &GoToOAuthClient) {
        let Some(key) = Self::key(obj) else { return };
        self.links
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        self.version.send_modify(|v| *v += 1);
    }

    /// Drops the links of `namespace` (all when `None`) whose client is not in `alive`
    /// (after a relist, which applied the others).
    fn retain(&self, namespace: Option<&str>, alive: &HashSet<(String, String)>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.retain(|key, _| {
            let Some((ns, name)) = split_client_key(key) else {
                return false;
            };
            namespace.is_some_and(|scope| scope != ns)
                || alive.contains(&(ns.to_string(), name.to_string()))
        });
        drop(links);
        self.version.send_modify(|v| *v += 1);
    }
}

impl crate::client_cache::ClientView for LinkIndex {
    fn apply(&self, obj: &GoToOAuthClient) {
        LinkIndex::apply(self, obj);
    }

    fn delete(&self, obj: &GoToOAuthClient) {
        LinkIndex::delete(self, obj);
    }

    fn retain(&self, scope: Option<&str>, alive: &HashSet<(String, String)>) {
        LinkIndex::retain(self, scope, alive);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{GoToOAuthClientSpec, GoToOAuthClientStatus};

    impl Default for LinkIndex {
        fn default() -> Self {
            LinkIndex::new(Defaults {
                public_url: "https://op.example/".parse().unwrap(),
                authorize_url: "https://auth.example/oauth/authorize".parse().unwrap(),
                token_url: "https://auth.example/oauth/token".parse().unwrap(),
                allowed_hosts: Vec::new(),
            })
        }
    }

    fn uid(start: Option<Start>) -> Option<String> {
        start.map(|s| s.uid.into())
    }

    fn client(ns: &str, name: &str, uid: &str, link: Option<&str>) -> GoToOAuthClient {
        let mut obj = GoToOAuthClient::new(
            name,
            serde_json::from_value::<GoToOAuthClientSpec>(serde_json::json!({
                "clientId": "c", "clientSecretRef": {"name": "creds"}
            }))
            .unwrap(),
        );
        obj.metadata.namespace = Some(ns.into());
        obj.metadata.uid = Some(uid.into());
        obj.status = Some(GoToOAuthClientStatus {
            authorization_url: link
                .map(|l| format!("https://op.example/authorize/{ns}/{name}/{l}")),
            ..Default::default()
        });
        obj
    }

    const LINK: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

    #[test]
    fn only_the_published_link_of_the_named_client_matches() {
        let index = LinkIndex::default();
        index.apply(&client("a", "demo", "uid-1", Some(LINK)));
        assert_eq!(uid(index.check("a", "demo", LINK)), Some("uid-1".into()));
        assert_eq!(uid(index.check("a", "demo", &LINK[1..])), None);
        assert_eq!(
            uid(index.check("b", "demo", LINK)),
            None,
            "another namespace"
        );
        assert_eq!(uid(index.check("a", "other", LINK)), None);
        for (namespace, name) in [("a/demo", ""), ("", "a/demo"), ("a", "demo/")] {
            assert_eq!(
                uid(index.check(namespace, name, LINK)),
                None,
                "{namespace:?} {name:?}: a slash names no client"
            );
        }
        // A withdrawn link (no authorizationUrl) and a deleted client are gone at once.
        index.apply(&client("a", "demo", "uid-1", None));
        assert_eq!(uid(index.check("a", "demo", LINK)), None);
        index.apply(&client("a", "demo", "uid-1", Some(LINK)));
        index.delete(&client("a", "demo", "uid-1", Some(LINK)));
        assert_eq!(uid(index.check("a", "demo", LINK)), None);
    }

    #[test]
    fn a_relist_replaces_only_its_own_namespace() {
        let index = LinkIndex::default();
        index.apply(&client("a", "x", "1", Some(LINK)));
        index.apply(&client("b", "y", "2", Some(LINK)));
        index.apply(&client("a", "z", "3", Some(LINK)));
        index.retain(
            Some("a"),
            &HashSet::from([("a".to_string(), "z".to_string())]),
        );
        assert_eq!(uid(index.check("a", "x", LINK)), None);
        assert_eq!(
            uid(index.check("a", "z", LINK)),
            Some("3".into()),
            "listed again"
        );
        assert_eq!(uid(index.check("b", "y", LINK)), Some("2".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_waits_for_the_deadline_and_a_late_link_gets_through() {
        let index = std::sync::Arc::new(LinkIndex::default());
        let started = tokio::time::Instant::now();
        assert_eq!(uid(index.resolve("a", "demo", LINK).await), None);
        assert_eq!(
            started.elapsed(),
            MISS_DEADLINE,
            "a miss takes the whole deadline"
        );

        let late = {
            let index = index.clone();
            tokio::spawn(async move { index.resolve("a", "demo", LINK).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        index.apply(&client("a", "demo", "uid-1", Some(LINK)));
        assert_eq!(uid(late.await.unwrap()), Some("uid-1".into()));
    }
}
