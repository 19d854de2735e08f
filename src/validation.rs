//! Spec validation: turns a `GoToOAuthClient` into the settings the operator acts on, or into a
//! message a human can act on.
//!
//! Validation is pure (no API calls), so it is unit-tested directly and runs identically in the
//! controller and in the callback handler. Everything the API server's schema cannot express
//! lives here: URL schemes, name syntax, a client id usable in a Basic header, durations.

use std::{collections::BTreeMap, time::Duration};

use url::Url;

use crate::{
    cli::check_web_url,
    resource::{GoToOAuthClient, MANAGER},
};

/// Operator-wide defaults that a spec may leave out.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// External base URL of the authorize/callback endpoint.
    pub public_url: Url,
    /// Default authorization URL.
    pub authorize_url: Url,
    /// Default token URL.
    pub token_url: Url,
}

impl Defaults {
    /// `<public-url>/<path>`, keeping any path prefix the public URL has.
    pub fn public_endpoint(&self, path: &str) -> String {
        let base = self.public_url.as_str().trim_end_matches('/');
        format!("{base}/{}", path.trim_start_matches('/'))
    }
}

/// A spec with every default applied and every value checked.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientSettings {
    pub client_id: String,
    pub client_secret_name: String,
    pub client_secret_key: String,
    pub redirect_uri: String,
    pub scopes: Vec<String>,
    pub secret_name: String,
    pub refresh_before: Option<Duration>,
    pub authorize_url: Url,
    pub token_url: Url,
    pub secret_labels: BTreeMap<String, String>,
    pub secret_annotations: BTreeMap<String, String>,
}

/// Why a spec cannot work as written: every problem found, each naming its field.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
#[error("{}", .problems.join("; "))]
pub struct InvalidSpec {
    pub problems: Vec<String>,
}

/// Checks the spec; the error lists every problem found.
pub fn validate(
    client: &GoToOAuthClient,
    defaults: &Defaults,
) -> Result<ClientSettings, InvalidSpec> {
    let spec = &client.spec;
    let mut problems = Vec::new();

    let client_id = spec.client_id.trim().to_string();
    if client_id.is_empty() {
        problems.push("spec.clientId must not be empty".to_string());
    } else if client_id.contains(':') || client_id.chars().any(|c| c.is_control()) {
        // A colon would split the Basic credentials in the wrong place.
        problems.push("spec.clientId must not contain ':' or control characters".to_string());
    }

    let secret_ref = &spec.client_secret_ref;
    if let Err(e) = check_dns_subdomain(&secret_ref.name) {
        problems.push(format!("spec.clientSecretRef.name {e}"));
    }
    if !is_secret_key(&secret_ref.key) {
        problems.push(format!(
            "spec.clientSecretRef.key {:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
            secret_ref.key
        ));
    }

    let redirect_uri = spec
        .redirect_uri
        .clone()
        .unwrap_or_else(|| defaults.public_endpoint("callback"));
    match Url::parse(&redirect_uri) {
        Ok(url) => {
            if let Err(e) = check_web_url(&url) {
                problems.push(format!("spec.redirectUri {e}"));
            }
            if url.fragment().is_some() {
                problems.push("spec.redirectUri must not have a #fragment".to_string());
            }
        }
        Err(e) => problems.push(format!(
            "spec.redirectUri {redirect_uri:?} is not a URL: {e}"
        )),
    }

    for scope in &spec.scopes {
        if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
            problems.push(format!(
                "spec.scopes entry {scope:?} must be one non-empty word without spaces"
            ));
        }
    }

    let secret_name = client.target_secret_name();
    if let Err(e) = check_dns_subdomain(&secret_name) {
        problems.push(format!("spec.secretName {e}"));
    }
    if secret_name == secret_ref.name {
        problems.push(
            "spec.secretName must differ from spec.clientSecretRef.name (the operator would overwrite the client secret)"
                .to_string(),
        );
    }

    let refresh_before = match spec.refresh_before.as_deref() {
        None | Some("") => None,
        Some(raw) => match humantime::parse_duration(raw) {
            Ok(d) if d >= Duration::from_secs(1) => Some(d),
            Ok(_) => {
                problems.push("spec.refreshBefore must be at least 1s".to_string());
                None
            }
            Err(e) => {
                problems.push(format!(
                    "spec.refreshBefore {raw:?} is not a duration like 20m or 1h: {e}"
                ));
                None
            }
        },
    };

    let endpoints = spec.endpoints.clone().unwrap_or_default();
    let authorize_url = endpoint(
        "spec.endpoints.authorizeUrl",
        endpoints.authorize_url,
        &defaults.authorize_url,
        &mut problems,
    );
    let token_url = endpoint(
        "spec.endpoints.tokenUrl",
        endpoints.token_url,
        &defaults.token_url,
        &mut problems,
    );

    let template = spec.secret_template.clone().unwrap_or_default();
    for key in template.labels.keys().chain(template.annotations.keys()) {
        if key.is_empty() || key.len() > 317 || key.chars().any(char::is_whitespace) {
            problems.push(format!(
                "spec.secretTemplate key {key:?} is not a valid label/annotation key"
            ));
        }
    }
    if template.labels.contains_key("app.kubernetes.io/managed-by") {
        problems.push(format!(
            "spec.secretTemplate.labels must not set app.kubernetes.io/managed-by (the operator sets it to {MANAGER})"
        ));
    }

    if !problems.is_empty() {
        return Err(InvalidSpec { problems });
    }
    Ok(ClientSettings {
        client_id,
        client_secret_name: secret_ref.name.clone(),
        client_secret_key: secret_ref.key.clone(),
        redirect_uri,
        scopes: spec.scopes.clone(),
        secret_name,
        refresh_before,
        authorize_url,
        token_url,
        secret_labels: template.labels,
        secret_annotations: template.annotations,
    })
}

fn endpoint(field: &str, value: Option<String>, default: &Url, problems: &mut Vec<String>) -> Url {
    let Some(raw) = value.filter(|v| !v.is_empty()) else {
        return default.clone();
    };
    match Url::parse(&raw) {
        Ok(url) => {
            if let Err(e) = check_web_url(&url) {
                problems.push(format!("{field} {e}"));
            }
            url
        }
        Err(e) => {
            problems.push(format!("{field} {raw:?} is not a URL: {e}"));
            default.clone()
        }
    }
}

/// An RFC 1123 label, as Kubernetes requires for namespace names.
pub(crate) fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && check_dns_subdomain(name).is_ok() && !name.contains('.')
}

/// RFC 1123 subdomain, as Kubernetes requires for Secret and most object names.
pub(crate) fn check_dns_subdomain(name: &str) -> Result<(), String> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
        return Err(format!(
            "{name:?} is not a valid name (lowercase letters, digits, '-' and '.', at most 253 characters)"
        ));
    }
    Ok(())
}

fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::{ClientSecretRef, Endpoints, GoToOAuthClientSpec};

    fn defaults() -> Defaults {
        Defaults {
            public_url: Url::parse("https://goto.example.com/base/").unwrap(),
            authorize_url: Url::parse("https://auth.example/oauth/authorize").unwrap(),
            token_url: Url::parse("https://auth.example/oauth/token").unwrap(),
        }
    }

    fn client(spec: serde_json::Value) -> GoToOAuthClient {
        let spec: GoToOAuthClientSpec = serde_json::from_value(spec).unwrap();
        GoToOAuthClient::new("demo", spec)
    }

    #[test]
    fn dns_names() {
        for ok in ["a", "team-a", "a1", &"x".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            "a.b",
            "-a",
            "a-",
            "A",
            "a_b",
            &"x".repeat(64),
            "ä",
        ] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(check_dns_subdomain("demo.v1").is_ok());
        for bad in ["..", "a..b", ".a", "a.", "a/b", "%2e%2e"] {
            assert!(check_dns_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_fill_in() {
        let c =
            client(serde_json::json!({"clientId": "id-1", "clientSecretRef": {"name": "creds"}}));
        let s = validate(&c, &defaults()).unwrap();
        assert_eq!(s.redirect_uri, "https://goto.example.com/base/callback");
        assert_eq!(s.secret_name, "demo-token");
        assert_eq!(s.client_secret_key, "clientSecret");
        assert_eq!(s.token_url.as_str(), "https://auth.example/oauth/token");
        assert_eq!(s.refresh_before, None);
    }

    #[test]
    fn every_problem_is_reported() {
        let mut c = client(
            serde_json::json!({"clientId": "a:b", "clientSecretRef": {"name": "Creds", "key": "bad key"}}),
        );
        c.spec.redirect_uri = Some("http://example.com/cb".into());
        c.spec.scopes = vec!["two words".into()];
        c.spec.refresh_before = Some("soon".into());
        c.spec.endpoints = Some(Endpoints {
            authorize_url: Some("ftp://x".into()),
            token_url: None,
        });
        let err = validate(&c, &defaults()).unwrap_err().to_string();
        for needle in [
            "spec.clientId",
            "spec.clientSecretRef.name",
            "spec.clientSecretRef.key",
            "spec.redirectUri",
            "spec.scopes",
            "spec.refreshBefore",
            "spec.endpoints.authorizeUrl",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn loopback_http_is_allowed_for_development() {
        let mut c =
            client(serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"}}));
        c.spec.redirect_uri = Some("http://127.0.0.1:8080/callback".into());
        c.spec.refresh_before = Some("20m".into());
        let s = validate(&c, &defaults()).unwrap();
        assert_eq!(s.refresh_before, Some(Duration::from_secs(1200)));
    }

    #[test]
    fn token_secret_must_not_be_the_client_secret() {
        let mut c =
            client(serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"}}));
        c.spec.secret_name = Some("creds".into());
        c.spec.client_secret_ref = ClientSecretRef {
            name: "creds".into(),
            key: "clientSecret".into(),
        };
        assert!(
            validate(&c, &defaults())
                .unwrap_err()
                .to_string()
                .contains("must differ")
        );
    }
}
