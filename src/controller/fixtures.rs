//! Test fixtures shared by the controller's unit tests.

use crate::validation::ClientSettings;

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
        personal_access_token: None,
    }
}
