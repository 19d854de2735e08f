//! The shareable authorization link: `<public URL>/authorize/<namespace>/<name>/<token>`, whose
//! random token is the credential (knowing the namespace and name is not enough).

use crate::{controller::ObjectKeys, resource::GoToOAuthClientStatus, validation::Defaults};

/// Shortest link token accepted when reading one back; published ones are 43 characters.
const MIN_LINK_TOKEN_LEN: usize = 32;

/// The authorization link for a client, with its unguessable token.
pub fn authorization_url(defaults: &Defaults, keys: &ObjectKeys, link_token: &str) -> String {
    defaults.public_endpoint(&format!(
        "authorize/{}/{}/{}",
        keys.namespace, keys.name, link_token
    ))
}

/// The link token inside a published authorization URL.
pub fn link_token(status: Option<&GoToOAuthClientStatus>) -> Option<String> {
    let url = status?.authorization_url.as_deref()?;
    url.rsplit('/')
        .next()
        .filter(|t| t.len() >= MIN_LINK_TOKEN_LEN)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_round_trips_through_the_status() {
        let defaults = Defaults {
            public_url: "https://op.example/prefix/".parse().unwrap(),
            authorize_url: "https://auth.example/a".parse().unwrap(),
            token_url: "https://auth.example/t".parse().unwrap(),
            allowed_hosts: Vec::new(),
        };
        let keys = ObjectKeys {
            namespace: "ns".into(),
            name: "demo".into(),
            uid: "u".into(),
        };
        let token = "A".repeat(43);
        let url = authorization_url(&defaults, &keys, &token);
        assert_eq!(
            url,
            format!("https://op.example/prefix/authorize/ns/demo/{token}")
        );
        let status = GoToOAuthClientStatus {
            authorization_url: Some(url),
            ..Default::default()
        };
        assert_eq!(link_token(Some(&status)), Some(token));
        let short = GoToOAuthClientStatus {
            authorization_url: Some("https://op.example/authorize/ns/demo/short".into()),
            ..Default::default()
        };
        assert_eq!(link_token(Some(&short)), None);
    }
}
