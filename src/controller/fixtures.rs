//! Test fixtures shared by the controller's unit tests.

use jiff::{SignedDuration, Timestamp};
use secrecy::SecretString;

use super::observe::ObjectKeys;
use crate::{
    resource::{GoToOAuthClient, GoToOAuthClientSpec},
    secret::StoredTokens,
    validation::ClientSettings,
};

/// The client `ns/demo` (uid `uid-1`) with a minimal spec and no status, and its keys.
pub(crate) fn demo_client() -> (GoToOAuthClient, ObjectKeys) {
    let mut obj = GoToOAuthClient::new(
        "demo",
        serde_json::from_value::<GoToOAuthClientSpec>(serde_json::json!({
            "clientId": "client", "clientSecretRef": {"name": "creds"}
        }))
        .unwrap(),
    );
    obj.metadata.namespace = Some("ns".into());
    obj.metadata.uid = Some("uid-1".into());
    let keys = ObjectKeys {
        namespace: "ns".into(),
        name: "demo".into(),
        uid: "uid-1".into(),
    };
    (obj, keys)
}

pub(crate) fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// Tokens issued at `issued` for an hour, of the consent given at `authorized`.
pub(crate) fn tokens(issued: &str, authorized: &str, refresh: &str) -> StoredTokens {
    StoredTokens {
        access_token: SecretString::from(format!("access-{issued}")),
        refresh_token: Some(SecretString::from(refresh.to_string())),
        token_type: "Bearer".into(),
        expires_at: at(issued) + SignedDuration::from_hours(1),
        issued_at: at(issued),
        authorized_at: at(authorized),
        refresh_token_obtained_at: at(authorized),
        scope: None,
        principal: Some("admin@example.com".into()),
        account_key: None,
        organizer_key: None,
        client_id: "client".into(),
        token_url: "https://auth.example/oauth/token".into(),
        obtained_by: Default::default(),
    }
}

/// Settings of a valid client `client` whose tokens go to `demo-token`.
pub(crate) fn settings() -> ClientSettings {
    ClientSettings {
        client_id: "client".into(),
        client_secret_name: "creds".into(),
        client_secret_key: "clientSecret".into(),
        redirect_uri: "https://op.example/callback".into(),
        scopes: vec![],
        secret_name: "demo-token".into(),
        refresh_before: None,
        authorize_url: "https://auth.example/oauth/authorize".parse().unwrap(),
        token_url: "https://auth.example/oauth/token".parse().unwrap(),
        secret_labels: Default::default(),
        secret_annotations: Default::default(),
        rollout: crate::validation::RolloutSettings {
            targets: Vec::new(),
            on: crate::validation::DEFAULT_ROLLOUT_RESTART_ON
                .into_iter()
                .collect(),
            min_interval: crate::validation::DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL,
        },
        personal_access_token: None,
    }
}
