//! The token Secret: what the operator stores, how it reads it back, and who owns it.
//!
//! The Secret is the source of truth for tokens: the status only describes it. Reading and
//! building are pure functions so the exact bytes a pod mounts are unit-tested, and so the
//! callback handler (any replica) and the controller (the leader) write the very same object.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    goto::TokenResponse,
    resource::{GoToOAuthClient, MANAGER, TokenGrant},
    validation::ClientSettings,
};

pub const ACCESS_TOKEN_KEY: &str = "access_token";
pub const REFRESH_TOKEN_KEY: &str = "refresh_token";
pub const TOKEN_TYPE_KEY: &str = "token_type";
pub const EXPIRES_AT_KEY: &str = "expires_at";
pub const SCOPE_KEY: &str = "scope";
pub const PRINCIPAL_KEY: &str = "principal";
pub const ACCOUNT_KEY_KEY: &str = "account_key";
pub const ORGANIZER_KEY_KEY: &str = "organizer_key";

/// The OAuth client the tokens were issued to: tokens of another client id or token endpoint
/// are useless after a spec change, and a new authorization is needed.
pub const CLIENT_ID_ANNOTATION: &str = "goto-oauth.dev/client-id";
pub const TOKEN_URL_ANNOTATION: &str = "goto-oauth.dev/token-url";
/// When the current access token was issued; with `expires_at` it gives the token lifetime.
pub const ISSUED_AT_ANNOTATION: &str = "goto-oauth.dev/issued-at";
/// When the consent behind the refresh token was given (or the personal access token was
/// exchanged).
pub const AUTHORIZED_AT_ANNOTATION: &str = "goto-oauth.dev/authorized-at";
/// When GoTo issued the refresh token now stored: at the consent, or at the last refresh whose
/// response carried a new one. GoTo's refresh tokens live about 30 days, so this is what says
/// how soon a new consent may be needed. Absent on Secrets written before 0.3.0; read as
/// [`AUTHORIZED_AT_ANNOTATION`] then (the oldest the token can be).
pub const REFRESH_TOKEN_OBTAINED_AT_ANNOTATION: &str = "goto-oauth.dev/refresh-token-obtained-at";
/// How the tokens were obtained ([`TokenGrant`]); absent on Secrets written before 0.3.0, which
/// were all obtained by a consent.
pub const OBTAINED_BY_ANNOTATION: &str = "goto-oauth.dev/obtained-by";

/// GoTo's documented access-token lifetime, used when a response omits `expires_in`.
pub const DEFAULT_EXPIRES_IN_SECONDS: u64 = 3600;

/// The tokens of one client and the non-secret facts about them. A replica holds them packed
/// (`controller::packed`).
#[derive(Clone)]
pub struct StoredTokens {
    pub access_token: SecretString,
    /// Absent only for tokens of a personal access token grant whose response had none: they
    /// are renewed by exchanging the PAT again.
    pub refresh_token: Option<SecretString>,
    pub token_type: String,
    pub expires_at: Timestamp,
    pub issued_at: Timestamp,
    pub authorized_at: Timestamp,
    /// When GoTo issued `refresh_token` (see [`REFRESH_TOKEN_OBTAINED_AT_ANNOTATION`]).
    pub refresh_token_obtained_at: Timestamp,
    pub scope: Option<String>,
    pub principal: Option<String>,
    pub account_key: Option<String>,
    pub organizer_key: Option<String>,
    pub client_id: String,
    pub token_url: String,
    pub obtained_by: TokenGrant,
}

impl std::fmt::Debug for StoredTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTokens")
            .field("access_token", &"<redacted>")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("expires_at", &self.expires_at)
            .field("obtained_by", &self.obtained_by)
            .field("issued_at", &self.issued_at)
            .field("refresh_token_obtained_at", &self.refresh_token_obtained_at)
            .field("principal", &self.principal)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for StoredTokens {
    fn eq(&self, other: &Self) -> bool {
        fn secrets(t: &StoredTokens) -> (&str, Option<&str>) {
            (
                t.access_token.expose_secret(),
                t.refresh_token.as_ref().map(|r| r.expose_secret()),
            )
        }
        secrets(self) == secrets(other)
            && (
                &self.token_type,
                self.expires_at,
                self.issued_at,
                self.authorized_at,
                self.refresh_token_obtained_at,
                &self.scope,
                &self.principal,
                &self.account_key,
                &self.organizer_key,
                &self.client_id,
                &self.token_url,
                self.obtained_by,
            ) == (
                &other.token_type,
                other.expires_at,
                other.issued_at,
                other.authorized_at,
                other.refresh_token_obtained_at,
                &other.scope,
                &other.principal,
                &other.account_key,
                &other.organizer_key,
                &other.client_id,
                &other.token_url,
                other.obtained_by,
            )
    }
}

/// Why a token response could not become stored tokens.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum TokenMergeError {
    #[error("the token endpoint returned no refresh_token and there is no earlier one to keep")]
    NoRefreshToken,
}

impl StoredTokens {
    /// Tokens from a token-endpoint response. A response without `refresh_token` keeps the
    /// previous one (GoTo usually omits it on refresh); a returned one replaces it at once.
    /// A missing `token_type` keeps the previous one or defaults to `Bearer`.
    /// `refresh_token_obtained_at` moves to `now` only when the refresh token is new: a
    /// response that omits it, or repeats the one stored, keeps the previous time.
    pub fn from_response(
        response: &TokenResponse,
        previous: Option<&StoredTokens>,
        settings: &ClientSettings,
        now: Timestamp,
    ) -> Result<StoredTokens, TokenMergeError> {
        let mut tokens = Self::from_new_grant(response, previous, settings, now);
        // A refresh token is new only when it differs from the one stored: its issue time
        // says how soon a new consent may be needed.
        let (refresh_token, refresh_token_obtained_at) = match (&response.refresh_token, previous) {
            (Some(new), Some(previous))
                if previous
                    .refresh_token
                    .as_ref()
                    .is_some_and(|old| old.expose_secret() == new.expose_secret()) =>
            {
                (Some(new.clone()), previous.refresh_token_obtained_at)
            }
            (Some(new), _) => (Some(new.clone()), tokens.issued_at),
            (None, Some(previous)) => (
                previous.refresh_token.clone(),
                previous.refresh_token_obtained_at,
            ),
            (None, None) => return Err(TokenMergeError::NoRefreshToken),
        };
        tokens.refresh_token = refresh_token;
        tokens.refresh_token_obtained_at = refresh_token_obtained_at;
        Ok(tokens)
    }

    /// Tokens from a personal access token grant: a new grant like a consent (identity and
    /// authorization time are its own), with the refresh token only when GoTo returned one.
    pub fn from_personal_access_token(
        response: &TokenResponse,
        settings: &ClientSettings,
        now: Timestamp,
    ) -> StoredTokens {
        let mut tokens = Self::from_new_grant(response, None, settings, now);
        tokens.obtained_by = TokenGrant::PersonalAccessToken;
        tokens
    }

    /// The response's tokens, keeping what `previous` knew that the response leaves out.
    fn from_new_grant(
        response: &TokenResponse,
        previous: Option<&StoredTokens>,
        settings: &ClientSettings,
        now: Timestamp,
    ) -> StoredTokens {
        // The Secret stores whole seconds; what is held in memory must compare equal to what
        // is read back, or the operator would take its own Secret for a hand edit.
        let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
        let expires_in = response.expires_in.unwrap_or(DEFAULT_EXPIRES_IN_SECONDS);
        let expires_at = now
            .checked_add(jiff::SignedDuration::from_secs(
                i64::try_from(expires_in)
                    .unwrap_or(i64::MAX / 2)
                    .min(10 * 365 * 86_400),
            ))
            .unwrap_or(now);
        let keep = |new: &Option<String>, old: Option<&Option<String>>| {
            new.clone().or_else(|| old.cloned().flatten())
        };
        let principal = response
            .principal
            .clone()
            .or_else(|| response.email.clone());
        StoredTokens {
            access_token: response.access_token.clone(),
            refresh_token: response.refresh_token.clone(),
            token_type: response
                .token_type
                .clone()
                .or_else(|| previous.map(|p| p.token_type.clone()))
                .unwrap_or_else(|| "Bearer".to_string()),
            expires_at,
            issued_at: now,
            authorized_at: previous.map(|p| p.authorized_at).unwrap_or(now),
            refresh_token_obtained_at: now,
            scope: keep(&response.scope, previous.map(|p| &p.scope)),
            principal: keep(&principal, previous.map(|p| &p.principal)),
            account_key: keep(&response.account_key, previous.map(|p| &p.account_key)),
            organizer_key: keep(&response.organizer_key, previous.map(|p| &p.organizer_key)),
            client_id: settings.client_id.clone(),
            token_url: settings.token_url.to_string(),
            obtained_by: previous.map(|p| p.obtained_by).unwrap_or_default(),
        }
    }

    /// Reads tokens back from a Secret the operator wrote; `None` when any required key is
    /// missing or unreadable (edited by hand, or not written yet).
    pub fn from_secret(secret: &Secret) -> Option<StoredTokens> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .filter(|v| !v.is_empty())
        };
        let annotations = secret.annotations();
        let time = |raw: Option<&String>| raw.and_then(|v| v.parse::<Timestamp>().ok());
        let expires_at = time(text(EXPIRES_AT_KEY).as_ref())?;
        let issued_at = time(annotations.get(ISSUED_AT_ANNOTATION)).unwrap_or(expires_at);
        let authorized_at = time(annotations.get(AUTHORIZED_AT_ANNOTATION)).unwrap_or(issued_at);
        let obtained_by = annotations
            .get(OBTAINED_BY_ANNOTATION)
            .and_then(|v| TokenGrant::parse(v))
            .unwrap_or_default();
        let refresh_token = text(REFRESH_TOKEN_KEY).map(SecretString::from);
        // Only a personal access token grant may lack a refresh token; a consent's tokens
        // without one were edited by hand.
        if refresh_token.is_none() && obtained_by != TokenGrant::PersonalAccessToken {
            return None;
        }
        Some(StoredTokens {
            access_token: SecretString::from(text(ACCESS_TOKEN_KEY)?),
            refresh_token,
            token_type: text(TOKEN_TYPE_KEY).unwrap_or_else(|| "Bearer".to_string()),
            expires_at,
            issued_at,
            authorized_at,
            refresh_token_obtained_at: time(annotations.get(REFRESH_TOKEN_OBTAINED_AT_ANNOTATION))
                .unwrap_or(authorized_at),
            scope: text(SCOPE_KEY),
            principal: text(PRINCIPAL_KEY),
            account_key: text(ACCOUNT_KEY_KEY),
            organizer_key: text(ORGANIZER_KEY_KEY),
            client_id: annotations
                .get(CLIENT_ID_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
            token_url: annotations
                .get(TOKEN_URL_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
            obtained_by,
        })
    }

    /// Whether these tokens were issued to the client the settings describe.
    pub fn issued_to(&self, settings: &ClientSettings) -> bool {
        self.client_id == settings.client_id && self.token_url == settings.token_url.as_str()
    }

    /// The access token's whole lifetime, as issued.
    pub fn lifetime(&self) -> jiff::SignedDuration {
        self.expires_at.duration_since(self.issued_at)
    }
}

/// RFC 3339 in UTC with second precision, as stored in `expires_at` and annotations.
pub fn rfc3339(ts: Timestamp) -> String {
    ts.round(jiff::Unit::Second)
        .unwrap_or(ts)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// The token Secret exactly as the operator wants it: keys, labels, annotations and an owner
/// reference to the resource (so deleting the resource deletes the Secret).
pub fn desired_secret(
    client: &GoToOAuthClient,
    settings: &ClientSettings,
    tokens: &StoredTokens,
) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: &str| {
        data.insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
    };
    put(ACCESS_TOKEN_KEY, tokens.access_token.expose_secret());
    if let Some(refresh_token) = &tokens.refresh_token {
        put(REFRESH_TOKEN_KEY, refresh_token.expose_secret());
    }
    put(TOKEN_TYPE_KEY, &tokens.token_type);
    put(EXPIRES_AT_KEY, &rfc3339(tokens.expires_at));
    for (key, value) in [
        (SCOPE_KEY, &tokens.scope),
        (PRINCIPAL_KEY, &tokens.principal),
        (ACCOUNT_KEY_KEY, &tokens.account_key),
        (ORGANIZER_KEY_KEY, &tokens.organizer_key),
    ] {
        if let Some(value) = value {
            put(key, value);
        }
    }

    let mut labels = settings.secret_labels.clone();
    labels.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    let mut annotations = settings.secret_annotations.clone();
    annotations.insert(CLIENT_ID_ANNOTATION.into(), tokens.client_id.clone());
    annotations.insert(TOKEN_URL_ANNOTATION.into(), tokens.token_url.clone());
    annotations.insert(ISSUED_AT_ANNOTATION.into(), rfc3339(tokens.issued_at));
    annotations.insert(
        AUTHORIZED_AT_ANNOTATION.into(),
        rfc3339(tokens.authorized_at),
    );
    annotations.insert(
        REFRESH_TOKEN_OBTAINED_AT_ANNOTATION.into(),
        rfc3339(tokens.refresh_token_obtained_at),
    );
    annotations.insert(
        OBTAINED_BY_ANNOTATION.into(),
        tokens.obtained_by.as_str().into(),
    );

    Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            namespace: client.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: client.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Whether the resource controls this Secret (an owner reference with its uid and
/// `controller: true`). The operator never writes a Secret that fails this test.
pub fn is_owned_by(secret: &Secret, client: &GoToOAuthClient) -> bool {
    let Some(uid) = client.metadata.uid.as_deref() else {
        return false;
    };
    secret
        .owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::{Defaults, validate};

    pub(crate) fn fixture_client() -> GoToOAuthClient {
        let mut c = GoToOAuthClient::new(
            "demo",
            serde_json::from_value(serde_json::json!({
                "clientId": "client-1",
                "clientSecretRef": {"name": "creds"},
                "secretTemplate": {"labels": {"team": "a"}, "annotations": {"note": "x"}}
            }))
            .unwrap(),
        );
        c.metadata.namespace = Some("ns".into());
        c.metadata.uid = Some("uid-1".into());
        c
    }

    fn settings(c: &GoToOAuthClient) -> ClientSettings {
        validate(
            c,
            &Defaults {
                public_url: "https://op.example".parse().unwrap(),
                authorize_url: "https://auth.example/authorize".parse().unwrap(),
                token_url: "https://auth.example/token".parse().unwrap(),
                allowed_hosts: Vec::new(),
            },
        )
        .unwrap()
    }

    fn response(refresh: Option<&str>, token_type: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: SecretString::from("access-1"),
            refresh_token: refresh.map(SecretString::from),
            token_type: token_type.map(str::to_string),
            expires_in: Some(3600),
            scope: None,
            principal: None,
            email: Some("admin@example.com".into()),
            account_key: Some("42".into()),
            organizer_key: None,
            account_type: None,
            first_name: None,
            last_name: None,
        }
    }

    #[test]
    fn secret_has_every_key_and_round_trips() {
        let c = fixture_client();
        let s = settings(&c);
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let tokens = StoredTokens::from_response(
            &response(Some("refresh-1"), Some("Bearer")),
            None,
            &s,
            now,
        )
        .unwrap();
        let secret = desired_secret(&c, &s, &tokens);
        let data = secret.data.as_ref().unwrap();
        assert_eq!(data[EXPIRES_AT_KEY].0, b"2026-11-23T11:00:00Z");
        assert_eq!(data[PRINCIPAL_KEY].0, b"admin@example.com");
        assert_eq!(data[ACCOUNT_KEY_KEY].0, b"42");
        assert!(!data.contains_key(ORGANIZER_KEY_KEY));
        assert_eq!(secret.labels()["app.kubernetes.io/managed-by"], MANAGER);
        assert_eq!(secret.labels()["team"], "a");
        assert_eq!(secret.annotations()["note"], "x");
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let owner = &secret.owner_references()[0];
        assert_eq!(
            (owner.uid.as_str(), owner.controller),
            ("uid-1", Some(true))
        );
        assert!(is_owned_by(&secret, &c));

        let back = StoredTokens::from_secret(&secret).unwrap();
        assert_eq!(back, tokens);
        assert!(back.issued_to(&s));
    }

    #[test]
    fn refresh_without_refresh_token_keeps_the_old_one() {
        let c = fixture_client();
        let s = settings(&c);
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let first = StoredTokens::from_response(
            &response(Some("refresh-1"), Some("Bearer")),
            None,
            &s,
            now,
        )
        .unwrap();
        let later = now + jiff::SignedDuration::from_mins(40);
        let second =
            StoredTokens::from_response(&response(None, None), Some(&first), &s, later).unwrap();
        assert_eq!(
            second.refresh_token.as_ref().unwrap().expose_secret(),
            "refresh-1"
        );
        assert_eq!(second.token_type, "Bearer");
        assert_eq!(second.authorized_at, now);
        assert_eq!(
            second.refresh_token_obtained_at, now,
            "no new refresh token"
        );
        let same = StoredTokens::from_response(
            &response(Some("refresh-1"), None),
            Some(&second),
            &s,
            later,
        )
        .unwrap();
        assert_eq!(same.refresh_token_obtained_at, now, "the same one repeated");
        let third = StoredTokens::from_response(
            &response(Some("refresh-2"), None),
            Some(&second),
            &s,
            later,
        )
        .unwrap();
        assert_eq!(
            third.refresh_token.as_ref().unwrap().expose_secret(),
            "refresh-2"
        );
        assert_eq!(third.refresh_token_obtained_at, later, "a rotated one");
        assert_eq!(third.authorized_at, now);
        assert_eq!(
            StoredTokens::from_response(&response(None, None), None, &s, now).unwrap_err(),
            TokenMergeError::NoRefreshToken
        );
    }

    #[test]
    fn refresh_token_age_survives_the_secret_and_defaults_for_old_secrets() {
        let c = fixture_client();
        let s = settings(&c);
        let consent: Timestamp = "2026-11-01T10:00:00Z".parse().unwrap();
        let first =
            StoredTokens::from_response(&response(Some("refresh-1"), None), None, &s, consent)
                .unwrap();
        let later = consent + jiff::SignedDuration::from_hours(24 * 3);
        let rotated = StoredTokens::from_response(
            &response(Some("refresh-2"), None),
            Some(&first),
            &s,
            later,
        )
        .unwrap();
        let mut secret = desired_secret(&c, &s, &rotated);
        assert_eq!(
            secret.annotations()[REFRESH_TOKEN_OBTAINED_AT_ANNOTATION],
            "2026-11-04T10:00:00Z"
        );
        let back = StoredTokens::from_secret(&secret).unwrap();
        assert_eq!(back.refresh_token_obtained_at, later);
        assert_eq!(back.authorized_at, consent);

        // A Secret written by a release without the annotation: the consent's time.
        secret
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(REFRESH_TOKEN_OBTAINED_AT_ANNOTATION);
        let old = StoredTokens::from_secret(&secret).unwrap();
        assert_eq!(old.refresh_token_obtained_at, consent);
    }

    #[test]
    fn personal_access_token_tokens_may_lack_a_refresh_token() {
        let c = fixture_client();
        let s = settings(&c);
        let now: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let tokens = StoredTokens::from_personal_access_token(&response(None, None), &s, now);
        assert_eq!(tokens.obtained_by, TokenGrant::PersonalAccessToken);
        assert!(tokens.refresh_token.is_none());
        assert_eq!(
            (tokens.authorized_at, tokens.token_type.as_str()),
            (now, "Bearer")
        );
        let secret = desired_secret(&c, &s, &tokens);
        assert!(
            !secret
                .data
                .as_ref()
                .unwrap()
                .contains_key(REFRESH_TOKEN_KEY)
        );
        assert_eq!(
            secret.annotations()[OBTAINED_BY_ANNOTATION],
            "PersonalAccessToken"
        );
        assert_eq!(StoredTokens::from_secret(&secret).as_ref(), Some(&tokens));

        // A refresh of PAT tokens stays a PAT grant; a consent's tokens without their refresh
        // token were edited by hand and do not count as tokens.
        let with_refresh =
            StoredTokens::from_personal_access_token(&response(Some("r"), None), &s, now);
        let later = now + jiff::SignedDuration::from_mins(40);
        let refreshed =
            StoredTokens::from_response(&response(None, None), Some(&with_refresh), &s, later)
                .unwrap();
        assert_eq!(refreshed.obtained_by, TokenGrant::PersonalAccessToken);
        assert_eq!(refreshed.authorized_at, now);
        let consent =
            StoredTokens::from_response(&response(Some("r"), None), None, &s, now).unwrap();
        assert_eq!(consent.obtained_by, TokenGrant::AuthorizationCode);
        let mut edited = desired_secret(&c, &s, &consent);
        edited.data.as_mut().unwrap().remove(REFRESH_TOKEN_KEY);
        assert!(StoredTokens::from_secret(&edited).is_none());
        // Secrets written before the annotation existed hold a consent's tokens.
        let mut old = desired_secret(&c, &s, &consent);
        old.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(OBTAINED_BY_ANNOTATION);
        assert_eq!(StoredTokens::from_secret(&old), Some(consent));
    }

    #[test]
    fn foreign_or_edited_secrets_are_recognised() {
        let c = fixture_client();
        let mut foreign = Secret::default();
        assert!(!is_owned_by(&foreign, &c));
        assert!(StoredTokens::from_secret(&foreign).is_none());
        foreign.data = Some(BTreeMap::from([(
            ACCESS_TOKEN_KEY.to_string(),
            ByteString(b"x".to_vec()),
        )]));
        assert!(StoredTokens::from_secret(&foreign).is_none());
    }

    #[test]
    fn debug_never_shows_tokens() {
        let c = fixture_client();
        let s = settings(&c);
        let tokens = StoredTokens::from_response(
            &response(Some("refresh-secret-value"), None),
            None,
            &s,
            Timestamp::now(),
        )
        .unwrap();
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("refresh-secret-value") && !debug.contains("access-1"));
    }
}
