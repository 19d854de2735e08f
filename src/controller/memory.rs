//! What one replica remembers about its clients between reconciles: only what the API server
//! cannot hold for it.
//!
//! - Tokens obtained from GoTo but not yet written (a rotated refresh token must never be lost
//!   to a failed write), and the tokens last written or read without their access token, so a
//!   deleted or hand-edited Secret is restored by a refresh, without a new consent. The access
//!   token is a kilobyte a client, and only a write back from memory would need it.
//! - The forced-refresh request those tokens answered, in case the status write that records it
//!   failed: the request is not sent twice.
//! - Backoff: consecutive refresh failures, when the next attempt may go, the last failure
//!   (shown in `Ready` while it lasts), and consecutive reconcile errors.
//! - The rollout-restart record of this replica's last restart, until a status write records
//!   it: a restart whose status write failed is not repeated.
//! - The resourceVersion of this replica's last status write, until the watch delivers it: a
//!   reconcile that runs on an older cached object waits for the watch instead of acting on
//!   it, and re-reads the object if the watch is slow to deliver.
//! - The resourceVersion of the Secret that holds the held tokens, and the client secret and
//!   personal access token as last read with their versions: while the Secret watch shows the
//!   same versions ([`super::index::SecretVersions`]) a reconcile reads none of them again.
//!   A version is only ever compared for equality, never ordered.
//!
//! Everything else comes from the watches, or from the API server when they cannot tell.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use jiff::Timestamp;
use secrecy::{ExposeSecret, SecretString};

use super::{index::Digest, packed::PackedTokens};
use crate::{
    resource::{RolloutRestartStatus, split_client_key},
    secret::StoredTokens,
};

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
#[derive(Clone, Debug)]
pub(crate) struct HeldTokens {
    /// Packed ([`super::packed`]); without the access token once stored: [`Self::tokens`]
    /// then gives an empty one.
    tokens: PackedTokens,
    /// `None` while the tokens came from GoTo and are not in the Secret yet: they are written
    /// before anything else happens, and no refresh is sent until they are. Once stored, the
    /// digest of the access token in place of it: enough to tell a hand-edited access token.
    stored_access_token: Option<Digest>,
    /// The resourceVersion of the token Secret that holds exactly these tokens, when known.
    pub(crate) resource_version: Option<String>,
    /// When this replica wrote that version: until the watch delivers it, a reconcile waits.
    pub(crate) written_at: Option<std::time::Instant>,
    /// When and in which term this replica read or wrote these tokens (see [`Seen`]).
    pub(crate) seen: Seen,
}

/// How long a value read or written in the current term stands in for a read while the term's
/// Secret watch has not listed: long enough for any start-up's list (a storm's reconciles retry
/// every 250 ms meanwhile), short enough that a watch that cannot list at all (no RBAC to list
/// Secrets, an API server that keeps failing the list) still sees a change within a minute.
pub(crate) const UNLISTED_TRUST: std::time::Duration = std::time::Duration::from_secs(30);

/// When, and in which term of the Secret watch ([`super::index::SecretVersions::term`]), this
/// replica last read or wrote a value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Seen {
    pub(crate) term: u64,
    pub(crate) at: std::time::Instant,
}

impl Seen {
    pub(crate) fn now(term: u64) -> Seen {
        Seen {
            term,
            at: std::time::Instant::now(),
        }
    }

    /// Whether the value may stand in for a read while the watch of `term` has not listed:
    /// seen in that term (what came before may be stale: another replica may have led
    /// meanwhile) and within [`UNLISTED_TRUST`].
    pub(crate) fn stands_in(&self, term: u64) -> bool {
        self.term == term && self.at.elapsed() < UNLISTED_TRUST
    }
}

impl HeldTokens {
    pub(crate) fn new(
        tokens: &StoredTokens,
        stored: bool,
        resource_version: Option<String>,
        written_at: Option<std::time::Instant>,
        term: u64,
    ) -> HeldTokens {
        let (tokens, stored_access_token) = match stored {
            true => without_access_token(tokens),
            false => (PackedTokens::pack(tokens), None),
        };
        HeldTokens {
            tokens,
            stored_access_token,
            resource_version,
            written_at,
            seen: Seen::now(term),
        }
    }

    /// Tokens this replica has just written at `resource_version` in the watches' `term`.
    pub(crate) fn written(
        tokens: &StoredTokens,
        resource_version: Option<String>,
        term: u64,
    ) -> HeldTokens {
        HeldTokens::new(
            tokens,
            true,
            resource_version,
            Some(std::time::Instant::now()),
            term,
        )
    }

    /// The tokens held, unpacked; the access token is empty once they are stored.
    pub(crate) fn tokens(&self) -> StoredTokens {
        self.tokens.unpack()
    }

    /// Whether these tokens are in the Secret.
    pub(crate) fn stored(&self) -> bool {
        self.stored_access_token.is_some()
    }

    /// Whether `secret` holds exactly the tokens this replica stored.
    pub(crate) fn stored_as(&self, secret: &StoredTokens) -> bool {
        self.stored_access_token
            .is_some_and(|digest| digest.is(secret.access_token.expose_secret()))
            && StoredTokens {
                access_token: secret.access_token.clone(),
                ..self.tokens()
            } == *secret
    }

    /// The tokens are in the Secret at `resource_version`, written by this replica just now in
    /// the watches' `term`: the access token goes, the refresh token stays.
    pub(crate) fn now_stored(&mut self, resource_version: Option<String>, term: u64) {
        if !self.stored() {
            (self.tokens, self.stored_access_token) = without_access_token(&self.tokens());
        }
        self.resource_version = resource_version;
        self.written_at = Some(std::time::Instant::now());
        self.seen = Seen::now(term);
    }
}

/// `tokens` packed without the access token, and the digest kept in its place.
fn without_access_token(tokens: &StoredTokens) -> (PackedTokens, Option<Digest>) {
    let digest = Digest::of(tokens.access_token.expose_secret());
    let packed = PackedTokens::pack(&StoredTokens {
        access_token: SecretString::from(String::new()),
        ..tokens.clone()
    });
    (packed, Some(digest))
}

impl PartialEq for HeldTokens {
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens
            && (
                self.stored_access_token,
                &self.resource_version,
                self.written_at,
                self.seen,
            ) == (
                other.stored_access_token,
                &other.resource_version,
                other.written_at,
                other.seen,
            )
    }
}

/// One key of a referenced Secret (the client secret, the personal access token) as read, and
/// the version it was read at.
#[derive(Clone)]
pub(crate) struct ReadValue {
    /// Which Secret and key it was read from ([`ReadValue::source`]): only ever compared with
    /// the reference in the spec, so a digest instead of two strings.
    pub(crate) source: Digest,
    pub(crate) resource_version: Option<String>,
    /// `None`: the key is missing or blank.
    pub(crate) value: Option<SecretString>,
    /// When and in which term it was read.
    pub(crate) seen: Seen,
}

impl ReadValue {
    /// The digest of a reference to `key` in the Secret `name`.
    pub(crate) fn source(name: &str, key: &str) -> Digest {
        Digest::of_all(&[name, key])
    }
}

impl std::fmt::Debug for ReadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadValue")
            .field("source", &self.source)
            .field("resource_version", &self.resource_version)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .field("seen", &self.seen)
            .finish()
    }
}

impl PartialEq for ReadValue {
    fn eq(&self, other: &Self) -> bool {
        (self.source, &self.resource_version, self.seen)
            == (other.source, &other.resource_version, other.seen)
            && self.value.as_ref().map(|v| v.expose_secret())
                == other.value.as_ref().map(|v| v.expose_secret())
    }
}

/// What one replica remembers about one client.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ClientMemory {
    /// Namespace and name ([`crate::resource::client_key`]), to drop the metric series once
    /// the client is gone.
    pub(crate) owner: Option<Box<str>>,
    pub(crate) held: Option<HeldTokens>,
    /// The refresh-requested annotation value the last refresh answered.
    pub(crate) answered_refresh_request: Option<String>,
    pub(crate) backoff: Backoff,
    /// The resourceVersion of this replica's last status write and when it was written, until
    /// the cache shows it.
    pub(crate) written_resource_version: Option<(String, std::time::Instant)>,
    /// The record after this replica's last rollout restart (see [`super::rollout`]). Boxed,
    /// like the personal access token: most clients have neither, and an entry is per client.
    pub(crate) rollout: Option<Box<RolloutRestartStatus>>,
    /// The client secret as last read.
    pub(crate) client_secret: Option<ReadValue>,
    /// The personal access token as last read.
    pub(crate) personal_access_token: Option<Box<ReadValue>>,
    /// Since when a callback on this replica is storing a consent's tokens: reconciles wait for
    /// it rather than write a status it is about to write.
    pub(crate) consent_in_flight: Option<std::time::Instant>,
}

/// One client's memory as [`Memory`] keeps it between reconciles: what every client has
/// inline (the held tokens, the client secret as read, the owner as one string), and the
/// fields most clients leave at their defaults (backoff, a pending status write or consent, a
/// rollout record, a personal access token) in one box that exists only while one of them is
/// set. At 10,000 clients an entry is per client, so the 150 bytes of defaults each would carry
/// inline are 1.5 MB (BENCHMARKS.md, issue 11). [`Memory::with`] hands out the whole
/// [`ClientMemory`] and packs it back, so no caller sees the difference.
#[derive(Debug, Default)]
struct Kept {
    held: Option<HeldTokens>,
    client_secret: Option<ReadValue>,
    owner: Option<Box<str>>,
    rare: Option<Box<Rare>>,
}

/// The fields of [`ClientMemory`] most clients leave at their defaults.
#[derive(Debug, Default, PartialEq)]
struct Rare {
    answered_refresh_request: Option<String>,
    backoff: Backoff,
    written_resource_version: Option<(String, std::time::Instant)>,
    rollout: Option<Box<RolloutRestartStatus>>,
    personal_access_token: Option<Box<ReadValue>>,
    consent_in_flight: Option<std::time::Instant>,
}

impl Kept {
    fn pack(memory: ClientMemory) -> Kept {
        let ClientMemory {
            owner,
            held,
            answered_refresh_request,
            backoff,
            written_resource_version,
            rollout,
            client_secret,
            personal_access_token,
            consent_in_flight,
        } = memory;
        let rare = Rare {
            answered_refresh_request,
            backoff,
            written_resource_version,
            rollout,
            personal_access_token,
            consent_in_flight,
        };
        Kept {
            held,
            client_secret,
            owner,
            rare: (rare != Rare::default()).then(|| Box::new(rare)),
        }
    }

    fn unpack(self) -> ClientMemory {
        let Kept {
            held,
            client_secret,
            owner,
            rare,
        } = self;
        let Rare {
            answered_refresh_request,
            backoff,
            written_resource_version,
            rollout,
            personal_access_token,
            consent_in_flight,
        } = rare.map(|r| *r).unwrap_or_default();
        ClientMemory {
            owner,
            held,
            answered_refresh_request,
            backoff,
            written_resource_version,
            rollout,
            client_secret,
            personal_access_token,
            consent_in_flight,
        }
    }

    fn namespace(&self) -> Option<&str> {
        self.owner
            .as_deref()
            .and_then(split_client_key)
            .map(|(namespace, _)| namespace)
    }
}

/// A client's memory unpacked for one [`Memory::with`]; packed back when dropped, also when
/// the caller panics, so nothing held is lost.
struct Unpacked<'a> {
    slot: &'a mut Kept,
    memory: ClientMemory,
}

impl Drop for Unpacked<'_> {
    fn drop(&mut self) {
        *self.slot = Kept::pack(std::mem::take(&mut self.memory));
    }
}

/// Every client's memory, keyed by uid. Boxed: a hash map keeps up to twice as many slots as
/// entries.
#[derive(Debug, Default)]
pub(crate) struct Memory(Mutex<HashMap<Box<str>, Box<Kept>>>);

impl Memory {
    /// Reads or changes one client's memory.
    pub(crate) fn with<T>(&self, uid: &str, f: impl FnOnce(&mut ClientMemory) -> T) -> T {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let slot: &mut Kept = all.entry(uid.into()).or_default();
        let memory = std::mem::take(slot).unpack();
        let mut unpacked = Unpacked { slot, memory };
        f(&mut unpacked.memory)
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
        let gone: Vec<Box<str>> = all
            .iter()
            .filter(|(uid, m)| {
                !alive.contains(&***uid) && scope.is_none_or(|ns| m.namespace() == Some(ns))
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        gone.iter()
            .filter_map(|uid| all.remove(uid))
            .filter_map(|m| {
                let (namespace, name) = split_client_key(m.owner.as_deref()?)?;
                Some((namespace.to_string(), name.to_string()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::client_key;

    #[test]
    fn stored_tokens_are_held_without_their_access_token() {
        let tokens = crate::controller::fixtures::tokens(
            "2026-12-03T10:00:00Z",
            "2026-12-01T10:00:00Z",
            "refresh-1",
        );
        let mut held = HeldTokens::new(&tokens, false, None, None, 1);
        assert!(!held.stored());
        assert_eq!(held.tokens(), tokens, "unstored: whole");
        assert!(!held.stored_as(&tokens), "not stored yet");

        held.now_stored(Some("7".into()), 1);
        assert!(held.stored());
        assert_eq!(held.tokens().access_token.expose_secret(), "");
        assert_eq!(
            held.tokens()
                .refresh_token
                .map(|r| r.expose_secret().to_string()),
            Some("refresh-1".into())
        );
        assert!(held.stored_as(&tokens));
        let mut edited = tokens.clone();
        edited.access_token = SecretString::from("hand-edited");
        assert!(!held.stored_as(&edited), "an edited access token is told");
        edited = tokens.clone();
        edited.principal = Some("someone@else".into());
        assert!(!held.stored_as(&edited));
        assert_eq!(
            HeldTokens::written(&tokens, Some("7".into()), 1).tokens(),
            held.tokens()
        );
    }

    #[test]
    fn memory_is_packed_and_unpacked_unchanged() {
        let tokens = crate::controller::fixtures::tokens(
            "2026-12-03T10:00:00Z",
            "2026-12-01T10:00:00Z",
            "refresh-1",
        );
        let read = ReadValue {
            source: ReadValue::source("creds", "clientSecret"),
            resource_version: Some("3".into()),
            value: Some(SecretString::from("s3cret")),
            seen: Seen::now(1),
        };
        let common = ClientMemory {
            owner: Some(client_key("team-a", "billing")),
            held: Some(HeldTokens::written(&tokens, Some("7".into()), 1)),
            client_secret: Some(read.clone()),
            ..ClientMemory::default()
        };
        let kept = Kept::pack(common.clone());
        assert!(kept.rare.is_none(), "defaults take no box");
        assert_eq!(kept.unpack(), common);

        let every = ClientMemory {
            answered_refresh_request: Some("2".into()),
            backoff: Backoff {
                refresh_failures: 2,
                not_before: Some("2026-12-03T10:00:05Z".parse().unwrap()),
                last_failure: Some("GoTo answered 503".into()),
                reconcile_errors: 1,
            },
            written_resource_version: Some(("9".into(), std::time::Instant::now())),
            rollout: Some(serde_json::from_str(r#"{"since":"2026-12-03T09:00:00Z"}"#).unwrap()),
            personal_access_token: Some(Box::new(read)),
            consent_in_flight: Some(std::time::Instant::now()),
            ..common
        };
        assert_eq!(Kept::pack(every.clone()).unpack(), every);
    }

    #[test]
    fn memory_survives_a_panic_while_unpacked() {
        let memory = Memory::default();
        memory.with("a", |m| m.answered_refresh_request = Some("1".into()));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            memory.with("a", |m| {
                m.backoff.refresh_failures = 3;
                panic!("a bug while the memory is unpacked");
            })
        }));
        assert!(panicked.is_err());
        memory.with("a", |m| {
            assert_eq!(m.answered_refresh_request.as_deref(), Some("1"));
            assert_eq!(m.backoff.refresh_failures, 3);
        });
    }

    #[test]
    fn prune_keeps_the_living_and_other_scopes() {
        let memory = Memory::default();
        for (uid, ns) in [("a", "one"), ("b", "one"), ("c", "two")] {
            memory.with(uid, |m| m.owner = Some(client_key(ns, uid)));
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
