//! Observe: read what is stored for one client into a typed [`Observed`], and nothing else.
//!
//! Reads are the client (from the watch cache, or fresh when this replica's own last status
//! write is not in the cache yet), the token Secret, the previous token Secret after a
//! `secretName` change, the client secret and, when the spec names one, the personal access
//! token. No decision is taken here; `plan` does that.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use secrecy::SecretString;
use std::fmt;

use super::{
    Context,
    index::Known,
    memory::{ClientMemory, HeldTokens, ReadValue, Seen},
};
use crate::{
    Error, Result,
    conditions::{ClientSecretProblem, PersonalAccessTokenProblem},
    goto::ClientCredentials,
    resource::GoToOAuthClient,
    secret::{StoredTokens, is_owned_by},
    validation::{ClientSettings, InvalidSpec, SecretKeyRef, validate},
};

/// The personal access token as read, and the version of the Secret it was read from.
#[derive(Clone)]
pub(crate) struct PersonalAccessToken {
    pub(crate) value: SecretString,
    pub(crate) resource_version: Option<String>,
}

impl fmt::Debug for PersonalAccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersonalAccessToken")
            .field("value", &"<redacted>")
            .field("resource_version", &self.resource_version)
            .finish()
    }
}

/// Names of an object the API server always sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKeys {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ObjectKeys {
    pub fn of(obj: &GoToOAuthClient) -> Result<ObjectKeys> {
        Ok(ObjectKeys {
            namespace: obj
                .namespace()
                .ok_or(Error::MissingObjectKey("namespace"))?,
            name: obj
                .metadata
                .name
                .clone()
                .ok_or(Error::MissingObjectKey("name"))?,
            uid: obj
                .metadata
                .uid
                .clone()
                .ok_or(Error::MissingObjectKey("uid"))?,
        })
    }
}

/// Everything stored about one client, as read at the start of a reconcile.
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    pub(crate) obj: Arc<GoToOAuthClient>,
    pub(crate) keys: ObjectKeys,
    pub(crate) settings: Result<ClientSettings, InvalidSpec>,
    /// `None` when the spec is invalid (the reference cannot be trusted).
    pub(crate) credentials: Option<Result<ClientCredentials, ClientSecretProblem>>,
    /// The resourceVersion of the client-secret Secret, when it exists.
    pub(crate) client_secret_version: Option<String>,
    /// `None` when the spec names no personal access token or is invalid.
    pub(crate) personal_access_token:
        Option<Result<PersonalAccessToken, PersonalAccessTokenProblem>>,
    /// The Secret at the target name, whoever owns it.
    pub(crate) target: Option<TargetSecret>,
    /// The target Secret exists and is not this client's.
    pub(crate) conflict: bool,
    /// The name tokens were stored under before `spec.secretName` changed, while that Secret
    /// still exists and is this client's.
    pub(crate) previous_secret_name: Option<String>,
    /// Tokens readable from the target Secret (or, after a rename, from the previous one).
    pub(crate) stored: Option<StoredTokens>,
    pub(crate) memory: ClientMemory,
}

/// How long the watch gets to deliver this replica's own status write before a reconcile
/// re-reads the object instead (a watch normally delivers within milliseconds).
pub(crate) const WATCH_DELIVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`observe`] found.
#[derive(Debug)]
pub(crate) enum Snapshot {
    Current(Box<Observed>),
    /// The cache does not show this replica's last write yet; the watch will deliver it.
    WaitForWatch,
    /// The client is gone (or was replaced).
    Gone,
}

/// Reads what is stored for `obj`.
pub(crate) async fn observe(ctx: &Context, obj: Arc<GoToOAuthClient>) -> Result<Snapshot> {
    let keys = ObjectKeys::of(&obj)?;
    let mut memory = ctx.memory.with(&keys.uid, |m| {
        m.owner = Some(crate::resource::client_key(&keys.namespace, &keys.name));
        if m.written_resource_version.as_ref().map(|(rv, _)| rv)
            == obj.metadata.resource_version.as_ref()
        {
            m.written_resource_version = None;
        }
        m.clone()
    });
    let obj = match &memory.written_resource_version {
        // This replica wrote a status the cache does not show yet: the cached object may be
        // older than that write (acting on it would repeat what was just done) or newer (someone
        // else wrote since). resourceVersions cannot be ordered: give the watch a moment to
        // deliver the write (it triggers a reconcile of its own), then ask the API server.
        Some((_, written_at)) if written_at.elapsed() < WATCH_DELIVERY => {
            return Ok(Snapshot::WaitForWatch);
        }
        Some(_) => {
            let api: Api<GoToOAuthClient> = Api::namespaced(ctx.client.clone(), &keys.namespace);
            match api.get_opt(&keys.name).await? {
                Some(fresh) if fresh.metadata.uid.as_deref() == Some(keys.uid.as_str()) => {
                    ctx.memory
                        .with(&keys.uid, |m| m.written_resource_version = None);
                    memory.written_resource_version = None;
                    Arc::new(fresh)
                }
                _ => return Ok(Snapshot::Gone),
            }
        }
        None => obj,
    };

    if memory
        .consent_in_flight
        .is_some_and(|since| since.elapsed() < WATCH_DELIVERY)
    {
        // A callback on this replica is storing tokens and will write the status itself.
        return Ok(Snapshot::WaitForWatch);
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let target_name = obj.target_secret_name();
    let (target, from_target) =
        match read_target(ctx, &secrets, &obj, &target_name, memory.held.as_ref()).await? {
            TargetRead::Seen(target, stored) => (target, stored.map(|s| *s)),
            TargetRead::WaitForWatch => return Ok(Snapshot::WaitForWatch),
        };
    let previous = match obj
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .filter(|n| *n != target_name)
    {
        Some(name) if ctx.secrets.get(&keys.namespace, &name) != Known::Absent => secrets
            .get_opt(&name)
            .await?
            .filter(|s| is_owned_by(s, &obj))
            .map(|s| (name, s)),
        _ => None,
    };
    let conflict = target.as_ref().is_some_and(|t| !t.owned);
    let stored = from_target.or_else(|| {
        previous
            .as_ref()
            .and_then(|(_, s)| StoredTokens::from_secret(s))
    });

    let settings = validate(&obj, &ctx.settings.defaults);
    let (credentials, client_secret_version) = match &settings {
        Ok(settings) => {
            let read = read_value(
                ctx,
                &secrets,
                &settings.client_secret_name,
                &settings.client_secret_key,
                memory.client_secret.as_ref(),
            )
            .await?;
            let version = read.as_ref().and_then(|r| r.resource_version.clone());
            let credentials = credentials_in(read.as_ref(), &keys.namespace, settings);
            ctx.memory.with(&keys.uid, |m| m.client_secret = read);
            (Some(credentials), version)
        }
        Err(_) => (None, None),
    };
    let personal_access_token = match settings
        .as_ref()
        .ok()
        .and_then(|s| s.personal_access_token.as_ref())
    {
        Some(pat_ref) => {
            let read = read_value(
                ctx,
                &secrets,
                &pat_ref.name,
                &pat_ref.key,
                memory.personal_access_token.as_deref(),
            )
            .await?;
            let pat = personal_access_token_in(read.as_ref(), &keys.namespace, pat_ref);
            ctx.memory
                .with(&keys.uid, |m| m.personal_access_token = read.map(Box::new));
            Some(pat)
        }
        None => None,
    };
    Ok(Snapshot::Current(Box::new(Observed {
        obj,
        keys,
        settings,
        credentials,
        client_secret_version,
        personal_access_token,
        target,
        conflict,
        previous_secret_name: previous.map(|(name, _)| name),
        stored,
        memory,
    })))
}

/// The token Secret as a reconcile needs it: its version (a write is conditional on it) and
/// whether it is this client's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TargetSecret {
    pub(crate) resource_version: Option<String>,
    pub(crate) owned: bool,
}

impl TargetSecret {
    pub(crate) fn of(secret: &Secret, obj: &GoToOAuthClient) -> TargetSecret {
        TargetSecret {
            resource_version: secret.metadata.resource_version.clone(),
            owned: is_owned_by(secret, obj),
        }
    }
}

/// What [`read_target`] found.
enum TargetRead {
    /// The Secret (absent: `None`) and the tokens it holds, if it is this client's.
    Seen(Option<TargetSecret>, Option<Box<StoredTokens>>),
    /// The watch has not delivered this replica's own write yet.
    WaitForWatch,
}

/// The token Secret: from memory when the watch shows the version the held tokens were read
/// or written at, otherwise read. An absent Secret is taken from the watch only when nothing
/// is held, so no write ever rests on the watch's word that a Secret is absent.
async fn read_target(
    ctx: &Context,
    secrets: &Api<Secret>,
    obj: &GoToOAuthClient,
    name: &str,
    held: Option<&HeldTokens>,
) -> Result<TargetRead> {
    let namespace = obj.metadata.namespace.as_deref().unwrap_or_default();
    let known = ctx.secrets.get(namespace, name);
    let term = ctx.secrets.term();
    match (known_target(&known, held, term), held) {
        (TargetKnown::Held, Some(held)) => {
            return Ok(TargetRead::Seen(
                Some(TargetSecret {
                    resource_version: held.resource_version.clone(),
                    owned: true,
                }),
                Some(Box::new(held.tokens())),
            ));
        }
        (TargetKnown::Absent, _) => return Ok(TargetRead::Seen(None, None)),
        (TargetKnown::OwnWriteInFlight, _) => return Ok(TargetRead::WaitForWatch),
        _ => {}
    }
    let secret = secrets.get_opt(name).await?;
    Ok(match secret {
        Some(secret) => {
            let target = TargetSecret::of(&secret, obj);
            let stored = target
                .owned
                .then(|| StoredTokens::from_secret(&secret))
                .flatten()
                .map(Box::new);
            if let (Some(tokens), Some(uid)) = (&stored, obj.metadata.uid.as_deref()) {
                ctx.memory.with(uid, |m| match &mut m.held {
                    // Read again at the version held: what is held was seen just now.
                    Some(h) if h.resource_version == target.resource_version => {
                        h.seen = Seen::now(term);
                    }
                    // What `act` would hold after this reconcile (nothing held: the Secret's
                    // tokens are current), held now: a reconcile that ends before `act` (a
                    // refresh held back by the first look, an invalid spec) must not make the
                    // next read again.
                    None => {
                        m.held = Some(HeldTokens::new(
                            tokens,
                            true,
                            target.resource_version.clone(),
                            None,
                            term,
                        ));
                    }
                    Some(_) => {}
                });
            }
            TargetRead::Seen(Some(target), stored)
        }
        None => TargetRead::Seen(None, None),
    })
}

/// What the watch and memory together say about the token Secret (pure).
#[derive(Debug, PartialEq, Eq)]
enum TargetKnown {
    /// The Secret is at the version the held tokens are stored at, or the watch has not
    /// listed yet and this replica read or wrote them in its term.
    Held,
    /// No Secret, and no tokens held that could be written.
    Absent,
    /// This replica wrote the Secret a moment ago and the watch has not delivered it yet.
    OwnWriteInFlight,
    /// Read it.
    Read,
}

fn known_target(known: &Known, held: Option<&HeldTokens>, term: u64) -> TargetKnown {
    let held_version = held
        .filter(|h| h.stored())
        .and_then(|h| h.resource_version.as_deref());
    match (known, held_version) {
        (Known::At(rv), Some(version)) if rv.is(version) => TargetKnown::Held,
        // Until the watch has listed, what this replica read or wrote in this term is the
        // latest it knows: reading it again at every wake-up (a client parked by the token
        // limiter wakes many times) would only repeat the read. A write stays conditional on
        // the version, so a change made meanwhile is a conflict, never overwritten.
        (Known::Unknown, Some(_)) if held.is_some_and(|h| h.seen.stands_in(term)) => {
            TargetKnown::Held
        }
        (Known::Absent, None) if held.is_none() => TargetKnown::Absent,
        (Known::Unknown, _) => TargetKnown::Read,
        (_, Some(_))
            if held
                .and_then(|h| h.written_at)
                .is_some_and(|at| at.elapsed() < WATCH_DELIVERY) =>
        {
            TargetKnown::OwnWriteInFlight
        }
        _ => TargetKnown::Read,
    }
}

/// One key of a referenced Secret: from memory while the watch shows the version it was read
/// at, otherwise read. `None`: the Secret does not exist.
async fn read_value(
    ctx: &Context,
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
    cached: Option<&ReadValue>,
) -> Result<Option<ReadValue>> {
    let namespace = secrets_namespace(secrets);
    let term = ctx.secrets.term();
    let source = ReadValue::source(name, key);
    let same = |c: &ReadValue| c.source == source;
    match ctx.secrets.get(&namespace, name) {
        Known::At(rv)
            if cached.is_some_and(|c| {
                same(c) && c.resource_version.as_deref().is_some_and(|v| rv.is(v))
            }) =>
        {
            return Ok(cached.cloned());
        }
        // Read in this term before the watch has listed: as for the token Secret.
        Known::Unknown if cached.is_some_and(|c| same(c) && c.seen.stands_in(term)) => {
            return Ok(cached.cloned());
        }
        Known::Absent => return Ok(None),
        _ => {}
    }
    Ok(secrets
        .get_opt(name)
        .await?
        .map(|secret| read_key(&secret, name, key, term)))
}

fn secrets_namespace(secrets: &Api<Secret>) -> String {
    secrets.namespace().unwrap_or_default().to_string()
}

/// The value of `key` in `secret`, trimmed; blank counts as missing (pure).
fn read_key(secret: &Secret, name: &str, key: &str, term: u64) -> ReadValue {
    ReadValue {
        seen: Seen::now(term),
        source: ReadValue::source(name, key),
        resource_version: secret.metadata.resource_version.clone(),
        value: secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
            .filter(|v| !v.is_empty())
            .map(SecretString::from),
    }
}

/// The client secret the spec references, or what is wrong with the reference; from what
/// this replica read before while its version is current.
pub(crate) async fn read_credentials(
    ctx: &Context,
    keys: &ObjectKeys,
    settings: &ClientSettings,
) -> Result<Result<ClientCredentials, ClientSecretProblem>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let cached = ctx.memory.with(&keys.uid, |m| m.client_secret.clone());
    let read = read_value(
        ctx,
        &secrets,
        &settings.client_secret_name,
        &settings.client_secret_key,
        cached.as_ref(),
    )
    .await?;
    let credentials = credentials_in(read.as_ref(), &keys.namespace, settings);
    ctx.memory.with(&keys.uid, |m| m.client_secret = read);
    Ok(credentials)
}

/// The credentials in the client-secret Secret, if it was found (pure).
fn credentials_in(
    read: Option<&ReadValue>,
    namespace: &str,
    settings: &ClientSettings,
) -> Result<ClientCredentials, ClientSecretProblem> {
    let Some(read) = read else {
        return Err(ClientSecretProblem::SecretNotFound {
            namespace: namespace.to_string(),
            name: settings.client_secret_name.clone(),
        });
    };
    read.value
        .clone()
        .map(|client_secret| ClientCredentials {
            client_id: settings.client_id.clone(),
            client_secret,
        })
        .ok_or_else(|| ClientSecretProblem::KeyMissing {
            namespace: namespace.to_string(),
            name: settings.client_secret_name.clone(),
            key: settings.client_secret_key.clone(),
        })
}

/// The personal access token in its Secret, if it was found (pure: tested without a cluster).
fn personal_access_token_in(
    read: Option<&ReadValue>,
    namespace: &str,
    pat_ref: &SecretKeyRef,
) -> Result<PersonalAccessToken, PersonalAccessTokenProblem> {
    let Some(read) = read else {
        return Err(PersonalAccessTokenProblem::SecretNotFound {
            namespace: namespace.to_string(),
            name: pat_ref.name.clone(),
        });
    };
    read.value
        .clone()
        .map(|value| PersonalAccessToken {
            value,
            resource_version: read.resource_version.clone(),
        })
        .ok_or_else(|| PersonalAccessTokenProblem::KeyMissing {
            namespace: namespace.to_string(),
            name: pat_ref.name.clone(),
            key: pat_ref.key.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::index::Digest;
    use crate::controller::{
        fixtures::{settings, tokens},
        memory::UNLISTED_TRUST,
    };
    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret;

    fn secret_with(key: &str, value: &str, rv: &str) -> Secret {
        let mut secret = Secret {
            data: Some([(key.to_string(), ByteString(value.into()))].into()),
            ..Secret::default()
        };
        secret.metadata.resource_version = Some(rv.into());
        secret
    }

    #[test]
    fn client_secret_is_trimmed_and_must_not_be_empty() {
        let read = read_key(
            &secret_with("clientSecret", " s3cr+t/=\n", "3"),
            "creds",
            "clientSecret",
            1,
        );
        assert_eq!(read.resource_version.as_deref(), Some("3"));
        let creds = credentials_in(Some(&read), "ns", &settings()).unwrap();
        assert_eq!(creds.client_secret.expose_secret(), "s3cr+t/=");
        assert!(!format!("{read:?}").contains("s3cr"), "redacted");
        let blank = read_key(
            &secret_with("clientSecret", "  ", "4"),
            "creds",
            "clientSecret",
            1,
        );
        assert_eq!(
            credentials_in(Some(&blank), "ns", &settings()).unwrap_err(),
            ClientSecretProblem::KeyMissing {
                namespace: "ns".into(),
                name: "creds".into(),
                key: "clientSecret".into()
            }
        );
        assert!(matches!(
            credentials_in(None, "ns", &settings()),
            Err(ClientSecretProblem::SecretNotFound { .. })
        ));
    }

    #[test]
    fn personal_access_token_is_read_trimmed_with_its_version() {
        let pat_ref = SecretKeyRef {
            name: "pat".into(),
            key: "personalAccessToken".into(),
        };
        let secret = secret_with("personalAccessToken", " pat-value\n", "7");
        let read = read_key(&secret, "pat", "personalAccessToken", 1);
        let pat = personal_access_token_in(Some(&read), "ns", &pat_ref).unwrap();
        assert_eq!(pat.value.expose_secret(), "pat-value");
        assert_eq!(pat.resource_version.as_deref(), Some("7"));
        assert!(!format!("{pat:?}").contains("pat-value"));
        assert_eq!(
            personal_access_token_in(None, "ns", &pat_ref).unwrap_err(),
            PersonalAccessTokenProblem::SecretNotFound {
                namespace: "ns".into(),
                name: "pat".into()
            }
        );
        let other_key = read_key(&secret, "pat", "other", 1);
        assert!(matches!(
            personal_access_token_in(Some(&other_key), "ns", &pat_ref),
            Err(PersonalAccessTokenProblem::KeyMissing { .. })
        ));
    }

    #[test]
    fn the_token_secret_is_read_unless_the_watch_shows_the_held_version() {
        let t = tokens("2026-11-23T10:00:00Z", "2026-11-23T10:00:00Z", "r");
        // Held in the current term (2) unless a case says otherwise.
        const TERM: u64 = 2;
        let held = |stored: bool, rv: Option<&str>, just_written: bool| {
            HeldTokens::new(
                &t,
                stored,
                rv.map(String::from),
                just_written.then(std::time::Instant::now),
                TERM,
            )
        };
        let earlier_term = |mut h: HeldTokens| {
            h.seen.term = TERM - 1;
            h
        };
        let long_ago = |mut h: HeldTokens| {
            h.seen.at = std::time::Instant::now()
                .checked_sub(UNLISTED_TRUST)
                .expect("an instant that long ago");
            h
        };
        let at = |rv: &str| Known::At(Digest::of(rv));
        let cases = [
            (
                "held at the version shown",
                at("5"),
                Some(held(true, Some("5"), false)),
                TargetKnown::Held,
            ),
            (
                "just written, shown",
                at("5"),
                Some(held(true, Some("5"), true)),
                TargetKnown::Held,
            ),
            (
                "changed by someone else",
                at("6"),
                Some(held(true, Some("5"), false)),
                TargetKnown::Read,
            ),
            (
                "own write not delivered yet",
                at("4"),
                Some(held(true, Some("5"), true)),
                TargetKnown::OwnWriteInFlight,
            ),
            (
                "own create not delivered yet",
                Known::Absent,
                Some(held(true, Some("5"), true)),
                TargetKnown::OwnWriteInFlight,
            ),
            (
                "deleted: verified before a restore",
                Known::Absent,
                Some(held(true, Some("5"), false)),
                TargetKnown::Read,
            ),
            (
                "unstored tokens: verified before the write",
                Known::Absent,
                Some(held(false, None, false)),
                TargetKnown::Read,
            ),
            (
                "nothing held, nothing there",
                Known::Absent,
                None,
                TargetKnown::Absent,
            ),
            ("nothing held, exists", at("5"), None, TargetKnown::Read),
            (
                "not listed yet, written in this term",
                Known::Unknown,
                Some(held(true, Some("5"), true)),
                TargetKnown::Held,
            ),
            (
                "not listed yet, read in this term",
                Known::Unknown,
                Some(held(true, Some("5"), false)),
                TargetKnown::Held,
            ),
            (
                "not listed yet, held from an earlier term",
                Known::Unknown,
                Some(earlier_term(held(true, Some("5"), false))),
                TargetKnown::Read,
            ),
            (
                "not listed yet, read in this term but long ago",
                Known::Unknown,
                Some(long_ago(held(true, Some("5"), false))),
                TargetKnown::Read,
            ),
            (
                "not listed yet, unstored tokens",
                Known::Unknown,
                Some(held(false, None, false)),
                TargetKnown::Read,
            ),
            (
                "not listed yet, held without a version",
                Known::Unknown,
                Some(held(true, None, false)),
                TargetKnown::Read,
            ),
            (
                "not listed yet, nothing held",
                Known::Unknown,
                None,
                TargetKnown::Read,
            ),
            (
                "held without a version",
                at("5"),
                Some(held(true, None, false)),
                TargetKnown::Read,
            ),
            (
                "unstored at the same version",
                at("5"),
                Some(held(false, Some("5"), false)),
                TargetKnown::Read,
            ),
        ];
        for (what, known, held, want) in cases {
            assert_eq!(known_target(&known, held.as_ref(), TERM), want, "{what}");
        }
    }
}
