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

use super::{Context, memory::ClientMemory};
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
    pub(crate) target: Option<Secret>,
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
        m.owner = Some((keys.namespace.clone(), keys.name.clone()));
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

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &keys.namespace);
    let target_name = obj.target_secret_name();
    let target = secrets.get_opt(&target_name).await?;
    let previous = match obj
        .status
        .as_ref()
        .and_then(|s| s.secret_name.clone())
        .filter(|n| *n != target_name)
    {
        Some(name) => secrets
            .get_opt(&name)
            .await?
            .filter(|s| is_owned_by(s, &obj))
            .map(|s| (name, s)),
        None => None,
    };
    let conflict = target.as_ref().is_some_and(|s| !is_owned_by(s, &obj));
    let stored = target
        .as_ref()
        .filter(|_| !conflict)
        .and_then(StoredTokens::from_secret)
        .or_else(|| {
            previous
                .as_ref()
                .and_then(|(_, s)| StoredTokens::from_secret(s))
        });

    let settings = validate(&obj, &ctx.settings.defaults);
    let (credentials, client_secret_version) = match &settings {
        Ok(settings) => {
            let secret = secrets.get_opt(&settings.client_secret_name).await?;
            (
                Some(credentials_in(secret.as_ref(), &keys.namespace, settings)),
                secret.and_then(|s| s.metadata.resource_version),
            )
        }
        Err(_) => (None, None),
    };
    let personal_access_token = match settings
        .as_ref()
        .ok()
        .and_then(|s| s.personal_access_token.as_ref())
    {
        Some(pat_ref) => {
            let secret = secrets.get_opt(&pat_ref.name).await?;
            Some(personal_access_token_in(
                secret.as_ref(),
                &keys.namespace,
                pat_ref,
            ))
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

/// The client secret the spec references, or what is wrong with the reference.
pub(crate) async fn read_credentials(
    ctx: &Context,
    namespace: &str,
    settings: &ClientSettings,
) -> Result<Result<ClientCredentials, ClientSecretProblem>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets.get_opt(&settings.client_secret_name).await?;
    Ok(credentials_in(secret.as_ref(), namespace, settings))
}

/// The credentials in the client-secret Secret, if it was found.
fn credentials_in(
    secret: Option<&Secret>,
    namespace: &str,
    settings: &ClientSettings,
) -> Result<ClientCredentials, ClientSecretProblem> {
    match secret {
        Some(secret) => credentials_from(secret, namespace, settings),
        None => Err(ClientSecretProblem::SecretNotFound {
            namespace: namespace.to_string(),
            name: settings.client_secret_name.clone(),
        }),
    }
}

/// The personal access token in its Secret, if it was found (pure: tested without a cluster).
fn personal_access_token_in(
    secret: Option<&Secret>,
    namespace: &str,
    pat_ref: &SecretKeyRef,
) -> Result<PersonalAccessToken, PersonalAccessTokenProblem> {
    let Some(secret) = secret else {
        return Err(PersonalAccessTokenProblem::SecretNotFound {
            namespace: namespace.to_string(),
            name: pat_ref.name.clone(),
        });
    };
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(&pat_ref.key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .filter(|v| !v.is_empty())
        .map(|value| PersonalAccessToken {
            value: SecretString::from(value),
            resource_version: secret.metadata.resource_version.clone(),
        })
        .ok_or_else(|| PersonalAccessTokenProblem::KeyMissing {
            namespace: namespace.to_string(),
            name: pat_ref.name.clone(),
            key: pat_ref.key.clone(),
        })
}

/// The credentials in a client-secret Secret (pure, so it is tested without a cluster).
fn credentials_from(
    secret: &Secret,
    namespace: &str,
    settings: &ClientSettings,
) -> Result<ClientCredentials, ClientSecretProblem> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(&settings.client_secret_key))
        .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
        .filter(|v| !v.is_empty())
        .map(|value| ClientCredentials {
            client_id: settings.client_id.clone(),
            client_secret: SecretString::from(value),
        })
        .ok_or_else(|| ClientSecretProblem::KeyMissing {
            namespace: namespace.to_string(),
            name: settings.client_secret_name.clone(),
            key: settings.client_secret_key.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::settings;
    use k8s_openapi::ByteString;
    use secrecy::ExposeSecret;

    #[test]
    fn client_secret_is_trimmed_and_must_not_be_empty() {
        let secret = |value: &str| Secret {
            data: Some([("clientSecret".to_string(), ByteString(value.into()))].into()),
            ..Secret::default()
        };
        let creds = credentials_from(&secret(" s3cr+t/=\n"), "ns", &settings()).unwrap();
        assert_eq!(creds.client_secret.expose_secret(), "s3cr+t/=");
        assert_eq!(
            credentials_from(&secret("  "), "ns", &settings()).unwrap_err(),
            ClientSecretProblem::KeyMissing {
                namespace: "ns".into(),
                name: "creds".into(),
                key: "clientSecret".into()
            }
        );
    }

    #[test]
    fn personal_access_token_is_read_trimmed_with_its_version() {
        let pat_ref = SecretKeyRef {
            name: "pat".into(),
            key: "personalAccessToken".into(),
        };
        let mut secret = Secret {
            data: Some(
                [(
                    "personalAccessToken".to_string(),
                    ByteString(" pat-value\n".into()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        secret.metadata.resource_version = Some("7".into());
        let pat = personal_access_token_in(Some(&secret), "ns", &pat_ref).unwrap();
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
        secret.data = None;
        assert!(matches!(
            personal_access_token_in(Some(&secret), "ns", &pat_ref),
            Err(PersonalAccessTokenProblem::KeyMissing { .. })
        ));
    }
}
