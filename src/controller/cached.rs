//! The controller's cache of clients: one entry per client for as long as it exists, and at
//! 10,000 clients one of the largest things a replica holds (BENCHMARKS.md, issue 11).
//!
//! A typed `GoToOAuthClient` is over a kilobyte inline (the spec's and status's optional fields
//! take their room whether set or not) plus some twenty small strings, each its own allocation:
//! about 2 KB a client. A reconcile reads a client about once an hour, so the cache keeps the
//! metadata kube itself reads (trimmed as [`GoToOAuthClient::trim_for_cache`] says) and the
//! spec and status as JSON, LZ4-compressed against a dictionary of what clients' JSON has in
//! common (a quarter of a kilobyte for an authorized client); a reconcile expands it into the
//! typed object once, in microseconds. LZ4 because it is fast, pure Rust and takes a dictionary;
//! without one, a kilobyte of JSON barely compresses.
//!
//! Of the metadata, only the name and namespace stay outside the compressed body (kube's store
//! and queue key on them) and the uid beside it (pruning and backoff read it without expanding):
//! a resourceVersion kept as metadata would be two more strings a client, one in the object and
//! one in kube's store key.
//!
//! The expanded object is exactly the object the watch delivered, trimmed: the controller
//! decides on the same data as before, only kept smaller in between.

use std::borrow::Cow;

use kube::{
    Resource,
    core::{NamespaceResourceScope, ObjectMeta},
    runtime::{reflector::ObjectRef, watcher},
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::resource::{GoToOAuthClient, GoToOAuthClientSpec, GoToOAuthClientStatus};

/// A client as the controller's cache keeps it.
#[derive(Clone, Debug)]
pub(crate) struct CachedClient {
    /// The name and namespace only.
    metadata: ObjectMeta,
    uid: Option<Box<str>>,
    /// `{"metadata": …, "spec": …, "status": …}` as JSON, compressed against [`DICTIONARY`];
    /// the metadata without what is kept outside.
    body: Box<[u8]>,
}

/// A reference to a client in the controller's queue.
pub(crate) type ClientRef = ObjectRef<CachedClient>;

/// The reference of the client `name` in `namespace`.
pub(crate) fn client_ref(namespace: &str, name: &str) -> ClientRef {
    ObjectRef::new(name).within(namespace)
}

/// What most clients' JSON has in common: the field names and the operator's own words.
/// LZ4 refers back into it, so a client's field names cost a few bytes instead of their text.
/// It only ever changes with the binary: what one process compressed, it decompresses.
const DICTIONARY: &[u8] = br#"{"metadata":{"annotations":{"goto-oauth.dev/"},"deletionTimestamp":"","generation":1,"resourceVersion":""},"spec":{"clientId":"","clientSecretRef":{"name":"-credentials","key":"clientSecret"},"redirectUri":"https://","scopes":["identity:"],"secretName":"-token","displayName":"","refreshBefore":"","endpoints":{"authorizeUrl":"","tokenUrl":""},"secretTemplate":{"labels":{},"annotations":{}},"expectedAccount":"","rolloutRestartTargets":[{"kind":"Deployment","name":""}],"rolloutRestartOn":["Authorization","RefreshTokenRotation","AccessToken"],"rolloutRestartMinInterval":"","personalAccessTokenRef":{"name":"","key":"pat"}},"status":{"conditions":[{"lastTransitionTime":"2026-12-02T10:00:00Z","message":"the access token in the Secret is valid until 2026-12-02T11:00:00Z","observedGeneration":1,"reason":"Authorized","status":"True","type":"Ready"},{"lastTransitionTime":"2026-12-02T10:00:00Z","message":"authorized by GoTo account @example.com","observedGeneration":1,"reason":"AwaitingAuthorization","status":"False","type":"Authorized"},{"type":"RolloutTargetsUpToDate","reason":"NoRestartNeeded"}],"authorizationUrl":"https://goto-oauth/authorize/","accessTokenExpiresAt":"2026-12-02T11:00:00Z","lastRefreshTime":"2026-12-02T10:00:00Z","nextRefreshTime":"2026-12-02T10:40:00Z","refreshTokenObtainedAt":"2026-12-02T10:00:00Z","principal":"","accountKey":"","organizerKey":"","authorization":{"phase":"Authorized"},"secretName":"-token","obtainedBy":"AuthorizationCode","rejectedPersonalAccessToken":{"sentWith":"","error":""},"rejectedAuthorization":"","handledLinkRotation":"","handledRefreshRequest":"","consumedStates":[{"nonce":"","expiresAt":""}],"rolloutRestart":{},"observedGeneration":1}}"#;

#[derive(Serialize)]
struct BodyRef<'a> {
    metadata: &'a ObjectMeta,
    spec: &'a GoToOAuthClientSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: &'a Option<GoToOAuthClientStatus>,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: GoToOAuthClientSpec,
    #[serde(default)]
    status: Option<GoToOAuthClientStatus>,
}

impl CachedClient {
    /// The cache entry of `obj`, trimmed.
    pub(crate) fn new(mut obj: GoToOAuthClient) -> CachedClient {
        obj.trim_for_cache();
        let metadata = ObjectMeta {
            name: obj.metadata.name.take(),
            namespace: obj.metadata.namespace.take(),
            ..ObjectMeta::default()
        };
        let uid = obj.metadata.uid.take().map(String::into_boxed_str);
        let json = serde_json::to_vec(&BodyRef {
            metadata: &obj.metadata,
            spec: &obj.spec,
            status: &obj.status,
        })
        // Encoding typed values without maps of non-string keys does not fail; if it ever did,
        // the empty body makes the client's reconciles fail with the error, visibly.
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "a client could not be cached");
            Vec::new()
        });
        let body = lz4_flex::block::compress_prepend_size_with_dict(&json, DICTIONARY);
        CachedClient {
            metadata,
            uid,
            body: body.into_boxed_slice(),
        }
    }

    /// The client's uid, without expanding it.
    pub(crate) fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }

    /// The client as the watch delivered it, trimmed.
    pub(crate) fn expand(&self) -> crate::Result<GoToOAuthClient> {
        let json = lz4_flex::block::decompress_size_prepended_with_dict(&self.body, DICTIONARY)
            // Only `new` compresses, against the same dictionary: a bug if it fails.
            .map_err(<serde_json::Error as serde::de::Error>::custom)?;
        let Body {
            metadata,
            spec,
            status,
        } = serde_json::from_slice(&json)?;
        let mut obj = GoToOAuthClient::new("", spec);
        obj.metadata = ObjectMeta {
            name: self.metadata.name.clone(),
            namespace: self.metadata.namespace.clone(),
            uid: self.uid.as_deref().map(str::to_string),
            ..metadata
        };
        obj.status = status;
        Ok(obj)
    }
}

#[cfg(test)]
impl CachedClient {
    /// The bytes the spec and status take in the cache.
    pub(crate) fn body_len(&self) -> usize {
        self.body.len()
    }
}

/// The watch's event with every client as the cache keeps it.
pub(crate) fn cache_event(event: watcher::Event<GoToOAuthClient>) -> watcher::Event<CachedClient> {
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::InitApply(obj) => watcher::Event::InitApply(CachedClient::new(obj)),
        watcher::Event::Apply(obj) => watcher::Event::Apply(CachedClient::new(obj)),
        watcher::Event::Delete(obj) => watcher::Event::Delete(CachedClient::new(obj)),
    }
}

impl Resource for CachedClient {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        GoToOAuthClient::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        GoToOAuthClient::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        GoToOAuthClient::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        GoToOAuthClient::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// kube's controller asks for a deserializable object; the cache is only ever filled through
/// [`cache_event`], but an object read this way is cached the same.
impl<'de> Deserialize<'de> for CachedClient {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        GoToOAuthClient::deserialize(deserializer).map(CachedClient::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::demo_client;

    /// The client as the API server would see it (the typed client has no `PartialEq`).
    fn json(obj: &GoToOAuthClient) -> serde_json::Value {
        serde_json::to_value(obj).unwrap()
    }

    #[test]
    fn a_cached_client_expands_to_the_trimmed_client() {
        let (mut obj, _) = demo_client();
        obj.metadata.managed_fields = Some(Vec::new());
        obj.metadata.labels = Some([("team".to_string(), "billing".to_string())].into());
        obj.metadata.resource_version = Some("48213".into());
        obj.metadata.generation = Some(4);
        obj.metadata.uid = Some("6f1c2a4e-0b7d-4c1e-9a3f-000000000001".into());
        obj.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-03T10:00:00Z".parse().unwrap(),
            ));
        obj.metadata.annotations = Some(
            [
                ("goto-oauth.dev/refresh-requested".to_string(), "1".into()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{}".into(),
                ),
            ]
            .into(),
        );
        let mut trimmed = obj.clone();
        trimmed.trim_for_cache();
        let cached = CachedClient::new(obj);
        assert_eq!(json(&cached.expand().unwrap()), json(&trimmed));
        assert_eq!(cached.expand().unwrap().metadata, trimmed.metadata);
        assert_eq!(cached.uid(), trimmed.metadata.uid.as_deref());
        assert_eq!(
            (
                cached.meta().name.as_ref(),
                cached.meta().namespace.as_ref()
            ),
            (
                trimmed.metadata.name.as_ref(),
                trimmed.metadata.namespace.as_ref()
            )
        );
    }

    #[test]
    fn a_cached_client_without_status_expands_without_one() {
        let (mut obj, _) = demo_client();
        obj.status = None;
        let cached = CachedClient::new(obj.clone());
        assert_eq!(cached.expand().unwrap().status, None);
        assert_eq!(cached.expand().unwrap().spec, obj.spec);
    }

    #[test]
    fn a_client_unlike_the_dictionary_expands_the_same() {
        let (mut obj, _) = demo_client();
        obj.spec.display_name = Some("Zürich — 会計 ".repeat(200));
        obj.spec.scopes = (0..50).map(|i| format!("scope-{i}")).collect();
        let status = obj.status.get_or_insert_with(Default::default);
        status.principal = Some("\u{0}\"{}".into());
        let cached = CachedClient::new(obj.clone());
        obj.trim_for_cache();
        assert_eq!(json(&cached.expand().unwrap()), json(&obj));
    }

    #[test]
    fn a_client_read_as_json_is_cached_the_same() {
        let (obj, _) = demo_client();
        let read: CachedClient = serde_json::from_value(json(&obj)).unwrap();
        assert_eq!(
            json(&read.expand().unwrap()),
            json(&CachedClient::new(obj).expand().unwrap())
        );
    }
}
