//! Every replica's in-memory index of the authorization links its watched namespaces publish,
//! fed by the watch of `GoToOAuthClient`s that runs on every replica, leader or not
//! ([`crate::client_cache`]).
//!
//! `/authorize/...` is the one unauthenticated entry point: it must cost no API request for a
//! wrong link, and must not tell by its timing whether a namespace/name exists. A link is
//! checked here first, in constant time against the stored token (or against a dummy when
//! there is none); a miss is answered only at a fixed deadline, during which a link that was
//! published a moment ago (the index follows the watch) still gets through.

use std::{collections::HashMap, sync::RwLock, time::Duration};

use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::link_token;
use crate::resource::GoToOAuthClient;

/// How long a link that does not match is looked for before the answer: every miss takes
/// this long, whether or not the client exists.
pub(crate) const MISS_DEADLINE: Duration = Duration::from_millis(500);

/// Compared against when no link is stored, so a miss does the same work as a mismatch.
const DUMMY_LINK: [u8; 43] = [b'x'; 43];

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    uid: String,
    link: String,
}

/// Published links by namespace and name.
#[derive(Debug)]
pub(crate) struct LinkIndex {
    links: RwLock<HashMap<(String, String), Entry>>,
    /// Bumped on every change, so a waiting lookup re-checks.
    version: watch::Sender<u64>,
}

impl Default for LinkIndex {
    fn default() -> Self {
        LinkIndex {
            links: RwLock::default(),
            version: watch::channel(0).0,
        }
    }
}

impl LinkIndex {
    /// The uid of the client whose published link is `presented`, checked in constant time.
    fn check(&self, namespace: &str, name: &str, presented: &str) -> Option<String> {
        let links = self.links.read().unwrap_or_else(|e| e.into_inner());
        let entry = links.get(&(namespace.to_string(), name.to_string()));
        let expected = entry.map_or(&DUMMY_LINK[..], |e| e.link.as_bytes());
        let matches = bool::from(expected.ct_eq(presented.as_bytes()));
        entry.filter(|_| matches).map(|e| e.uid.clone())
    }

    /// Like [`LinkIndex::check`], but a miss is answered only at [`MISS_DEADLINE`], and a link
    /// that appears in the index meanwhile is accepted.
    pub(crate) async fn resolve(
        &self,
        namespace: &str,
        name: &str,
        presented: &str,
    ) -> Option<String> {
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

    fn key(obj: &GoToOAuthClient) -> Option<(String, String)> {
        Some((obj.metadata.namespace.clone()?, obj.metadata.name.clone()?))
    }

    fn entry(obj: &GoToOAuthClient) -> Option<Entry> {
        Some(Entry {
            uid: obj.metadata.uid.clone()?,
            link: link_token(obj.status.as_ref())?,
        })
    }

    pub(crate) fn apply(&self, obj: &GoToOAuthClient) {
        let Some(key) = Self::key(obj) else { return };
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        match Self::entry(obj) {
            Some(entry) => links.insert(key, entry),
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

    /// Replaces everything of `namespace` (all when `None`) with `fresh` (after a relist).
    fn replace(&self, namespace: Option<&str>, fresh: HashMap<(String, String), Entry>) {
        let mut links = self.links.write().unwrap_or_else(|e| e.into_inner());
        links.retain(|(ns, _), _| namespace.is_some_and(|scope| scope != ns));
        links.extend(fresh);
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

    fn replace(&self, scope: Option<&str>, current: &[GoToOAuthClient]) {
        let fresh = current
            .iter()
            .filter_map(|obj| Some((LinkIndex::key(obj)?, LinkIndex::entry(obj)?)))
            .collect();
        LinkIndex::replace(self, scope, fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{GoToOAuthClientSpec, GoToOAuthClientStatus};

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
        assert_eq!(index.check("a", "demo", LINK), Some("uid-1".into()));
        assert_eq!(index.check("a", "demo", &LINK[1..]), None);
        assert_eq!(index.check("b", "demo", LINK), None, "another namespace");
        assert_eq!(index.check("a", "other", LINK), None);
        // A withdrawn link (no authorizationUrl) and a deleted client are gone at once.
        index.apply(&client("a", "demo", "uid-1", None));
        assert_eq!(index.check("a", "demo", LINK), None);
        index.apply(&client("a", "demo", "uid-1", Some(LINK)));
        index.delete(&client("a", "demo", "uid-1", Some(LINK)));
        assert_eq!(index.check("a", "demo", LINK), None);
    }

    #[test]
    fn a_relist_replaces_only_its_own_namespace() {
        let index = LinkIndex::default();
        index.apply(&client("a", "x", "1", Some(LINK)));
        index.apply(&client("b", "y", "2", Some(LINK)));
        index.replace(Some("a"), HashMap::new());
        assert_eq!(index.check("a", "x", LINK), None);
        assert_eq!(index.check("b", "y", LINK), Some("2".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_waits_for_the_deadline_and_a_late_link_gets_through() {
        let index = std::sync::Arc::new(LinkIndex::default());
        let started = tokio::time::Instant::now();
        assert_eq!(index.resolve("a", "demo", LINK).await, None);
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
        assert_eq!(late.await.unwrap(), Some("uid-1".into()));
    }
}
