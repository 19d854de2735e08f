//! Spec validation: turns a `GoToOAuthClient` into the settings the operator acts on, or into a
//! message a human can act on.
//!
//! Validation is pure (no API calls), so it is unit-tested directly and runs identically in the
//! controller and in the callback handler. Everything the API server's schema cannot express
//! lives here: URL schemes, the hosts an endpoint may name, name syntax, a client id usable in a
//! Basic header, durations.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use url::Url;

use crate::{
    cli::check_web_url,
    resource::{
        GoToOAuthClient, GoToOAuthClientSpec, MANAGER, RolloutRestartTarget, RolloutRestartTrigger,
    },
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
    /// Hosts a spec's endpoints may name besides those of `authorize_url` and `token_url`
    /// (`--allowed-endpoint-hosts`).
    pub allowed_hosts: Vec<AllowedHost>,
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
    pub rollout: RolloutSettings,
    /// Where the personal access token is, when the spec names one.
    pub personal_access_token: Option<SecretKeyRef>,
}

/// A key of a Secret in the client's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// The rollout restarts a client asks for (`spec.rolloutRestart*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutSettings {
    /// The targets, without duplicates, in spec order.
    pub targets: Vec<RolloutRestartTarget>,
    /// The token changes that restart them, without duplicates.
    pub on: BTreeSet<RolloutRestartTrigger>,
    pub min_interval: Duration,
}

/// `spec.rolloutRestartMinInterval` when the spec does not set it.
pub const DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL: Duration = Duration::from_secs(300);

/// `spec.rolloutRestartOn` when the spec does not set it: restarts for a new consent and a new
/// refresh token, never for the hourly access token.
pub const DEFAULT_ROLLOUT_RESTART_ON: [RolloutRestartTrigger; 2] = [
    RolloutRestartTrigger::Authorization,
    RolloutRestartTrigger::RefreshTokenRotation,
];

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
            } else if !is_web_url_as_written(&redirect_uri) {
                problems.push(format!("spec.redirectUri {redirect_uri:?} {WRITTEN_AS}"));
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

    let personal_access_token = spec
        .personal_access_token_ref
        .as_ref()
        .map(|r| SecretKeyRef {
            name: r.name.clone(),
            key: r.key.clone(),
        });
    if let Some(pat) = &personal_access_token {
        if let Err(e) = check_dns_subdomain(&pat.name) {
            problems.push(format!("spec.personalAccessTokenRef.name {e}"));
        }
        if !is_secret_key(&pat.key) {
            problems.push(format!(
                "spec.personalAccessTokenRef.key {:?} is not a valid Secret key (letters, digits, '-', '_', '.')",
                pat.key
            ));
        }
        if secret_name == pat.name {
            problems.push(
                "spec.secretName must differ from spec.personalAccessTokenRef.name (the operator would overwrite the personal access token)"
                    .to_string(),
            );
        }
    }

    let refresh_before = match spec.refresh_before.as_deref() {
        None | Some("") => None,
        Some(raw) => match parse_duration(raw) {
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
        defaults,
        &mut problems,
    );
    let token_url = endpoint(
        "spec.endpoints.tokenUrl",
        endpoints.token_url,
        &defaults.token_url,
        defaults,
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

    let rollout = rollout_settings(spec, &mut problems);

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
        rollout,
        personal_access_token,
    })
}

/// The units a spec's duration may use: those of the CRD's pattern (`duration_pattern!` in
/// `resource.rs`), which the API server checks.
const DURATION_UNITS: [&str; 22] = [
    "ms", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes", "h",
    "hr", "hrs", "hour", "hours", "d", "day", "days", "w", "week", "weeks",
];

/// A duration of the spec: the CRD's grammar (`^([0-9]+ ?(unit) ?)+$`), read by `humantime`.
/// `humantime` alone also reads fractions, `ns`, months and years (`1.5h`, `1y`), which the
/// CRD's rule refuses; accepting them here would make the operator accept a spec that
/// `kubectl apply` refuses.
pub(crate) fn parse_duration(raw: &str) -> Result<Duration, String> {
    let mut rest = raw;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        rest = &rest[digits..];
        rest = rest.strip_prefix(' ').unwrap_or(rest);
        let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        if digits == 0 || !DURATION_UNITS.contains(&&rest[..letters]) {
            return Err(format!(
                "write a number and a unit ({}), e.g. 1h30m",
                DURATION_UNITS.join(", ")
            ));
        }
        rest = &rest[letters..];
        rest = rest.strip_prefix(' ').unwrap_or(rest);
    }
    if raw.is_empty() {
        return Err("it is empty".into());
    }
    humantime::parse_duration(raw).map_err(|e| e.to_string())
}

fn rollout_settings(spec: &GoToOAuthClientSpec, problems: &mut Vec<String>) -> RolloutSettings {
    let mut targets: Vec<RolloutRestartTarget> = Vec::new();
    for target in &spec.rollout_restart_targets {
        if let Err(e) = check_dns_subdomain(&target.name) {
            problems.push(format!(
                "spec.rolloutRestartTargets {} {e}",
                target.kind.as_str()
            ));
        } else if !targets.contains(target) {
            targets.push(target.clone());
        }
    }
    let on = match &spec.rollout_restart_on {
        Some(on) => on.iter().copied().collect(),
        None => DEFAULT_ROLLOUT_RESTART_ON.into_iter().collect(),
    };
    let min_interval = match spec.rollout_restart_min_interval.as_deref() {
        None | Some("") => DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL,
        Some(raw) => match parse_duration(raw) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!(
                    "spec.rolloutRestartMinInterval {raw:?} is not a duration like 5m or 1h: {e}"
                ));
                DEFAULT_ROLLOUT_RESTART_MIN_INTERVAL
            }
        },
    };
    RolloutSettings {
        targets,
        on,
        min_interval,
    }
}

fn endpoint(
    field: &str,
    value: Option<String>,
    default: &Url,
    defaults: &Defaults,
    problems: &mut Vec<String>,
) -> Url {
    let Some(raw) = value.filter(|v| !v.is_empty()) else {
        return default.clone();
    };
    match Url::parse(&raw) {
        Ok(url) => {
            if let Err(e) =
                check_web_url(&url).and_then(|()| check_endpoint_host(&raw, &url, defaults))
            {
                problems.push(format!("{field} {e}"));
            } else if !is_web_url_as_written(&raw) {
                problems.push(format!("{field} {raw:?} {WRITTEN_AS}"));
            }
            url
        }
        Err(e) => {
            problems.push(format!("{field} {raw:?} is not a URL: {e}"));
            default.clone()
        }
    }
}

const WRITTEN_AS: &str = "must start with https:// (http:// only for localhost, 127.x.x.x or [::1], written so), without spaces before it";

/// The CRD's rule for URLs (`web_url_rule!` in `resource.rs`) on the URL as written:
/// `^(?i)https://`, or `^(?i)http://(localhost|127(\.[0-9]{1,3}){3}|\[::1\])(:[0-9]{1,5})?([/?#]|$)`.
/// The URL parser reads more (a leading space, `127.1`, `[0:0:0:0:0:0:0:1]`, `user@localhost`),
/// so without this the operator would accept specs that `kubectl apply` refuses.
fn is_web_url_as_written(raw: &str) -> bool {
    let starts = |s: &str, prefix: &str| {
        s.get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    if starts(raw, "https://") {
        return true;
    }
    if !starts(raw, "http://") {
        return false;
    }
    let rest = &raw["http://".len()..];
    let host_len = if starts(rest, "localhost") {
        "localhost".len()
    } else if rest.starts_with("[::1]") {
        "[::1]".len()
    } else if let Some(tail) = rest.strip_prefix("127") {
        let mut len = "127".len();
        let mut tail = tail;
        for _ in 0..3 {
            let Some(octet) = tail.strip_prefix('.') else {
                return false;
            };
            let digits = octet.bytes().take_while(u8::is_ascii_digit).count();
            if !(1..=3).contains(&digits) {
                return false;
            }
            len += 1 + digits;
            tail = &octet[digits..];
        }
        len
    } else {
        return false;
    };
    let mut rest = &rest[host_len..];
    if let Some(port) = rest.strip_prefix(':') {
        let digits = port.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return false;
        }
        rest = &port[digits..];
    }
    rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

/// One entry of the endpoint allow-list (`--allowed-endpoint-hosts`): a host name or IP address
/// and, when given, the one port allowed; without a port only the scheme's default port is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedHost {
    /// Lowercase ASCII, as the `url` crate writes hosts (`[..]` around IPv6 addresses).
    host: String,
    port: Option<u16>,
}

impl AllowedHost {
    /// Parses `host` or `host:port` (`[v6]:port` for IPv6). Letters are folded to lowercase;
    /// anything that is not the host's canonical form is refused rather than guessed at: a scheme
    /// or path, user information, wildcards, a trailing dot, non-ASCII (list an IDN as `xn--…`).
    pub fn parse(raw: &str) -> Result<AllowedHost, String> {
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(
                "an entry is empty: a stray comma, or an empty value (unset it to allow GoTo's hosts)"
                    .into(),
            );
        }
        if entry.contains('*') {
            return Err(format!(
                "{entry:?}: wildcards are not supported; list each host exactly"
            ));
        }
        if entry.contains(['/', '?', '#', '@', '\\']) {
            return Err(format!(
                "{entry:?} is not `host` or `host:port` (no scheme, path or user@)"
            ));
        }
        let url = Url::parse(&format!("https://{entry}/"))
            .map_err(|e| format!("{entry:?} is not a host name or IP address: {e}"))?;
        let host = url.host_str().unwrap_or_default();
        if host_as_written(entry).to_ascii_lowercase() != host {
            return Err(format!(
                "{entry:?}: write the host as {host:?} (its canonical ASCII form)"
            ));
        }
        if host.ends_with('.') {
            return Err(format!(
                "{entry:?}: a trailing dot names a different host; leave it out"
            ));
        }
        Ok(AllowedHost {
            host: host.to_string(),
            port: url.port(),
        })
    }

    /// The host and port of an endpoint the operator was configured with.
    fn of(url: &Url) -> Option<AllowedHost> {
        Some(AllowedHost {
            host: url.host_str()?.to_string(),
            port: url.port(),
        })
    }

    /// Exact host, and the entry's port (or the scheme's default when the entry has none).
    fn allows(&self, url: &Url) -> bool {
        url.host_str() == Some(self.host.as_str())
            && match self.port {
                None => url.port().is_none(),
                Some(port) => url.port_or_known_default() == Some(port),
            }
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            None => f.write_str(&self.host),
            Some(port) => write!(f, "{}:{port}", self.host),
        }
    }
}

/// Whether a spec may send browsers and client secrets to this endpoint. A spec is written by any
/// user of its namespace, not by the operator's admin: without this check `/authorize/…` on the
/// operator's trusted domain would redirect to any host, and code exchanges and refreshes would
/// POST client secrets to any host. Only hosts the admin allowed pass, matched exactly against the
/// URL as written (no user information, no escapes or IDN forms the parser would rewrite).
fn check_endpoint_host(raw: &str, url: &Url, defaults: &Defaults) -> Result<(), String> {
    let prefix = format!("{}://", url.scheme());
    let written = raw.trim();
    let Some(rest) = written
        .get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(&prefix))
        .and_then(|_| written.get(prefix.len()..))
    else {
        return Err(format!("{raw:?} must start with {prefix}"));
    };
    let authority = rest.split(['/', '?', '#', '\\']).next().unwrap_or_default();
    if authority.contains('@') || !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user information (user@ or :password@)".into());
    }
    let host = url.host_str().unwrap_or_default();
    let written_host = host_as_written(authority);
    if written_host.to_ascii_lowercase() != host {
        return Err(format!(
            "host {written_host:?} must be written as the plain ASCII host {host:?} it stands for"
        ));
    }
    let mut allowed = defaults.allowed_hosts.clone();
    for own in [&defaults.authorize_url, &defaults.token_url] {
        if let Some(own) = AllowedHost::of(own).filter(|h| !allowed.contains(h)) {
            allowed.push(own);
        }
    }
    if allowed.iter().any(|h| h.allows(url)) {
        return Ok(());
    }
    let named = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let list = allowed
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Err(format!(
        "host {named:?} is not allowed: the operator only uses endpoints on the hosts of --allowed-endpoint-hosts and of its --authorize-url/--token-url ({list}); ask the operator's administrator to add it"
    ))
}

/// The host part of an authority as written: without user information and port.
fn host_as_written(authority: &str) -> &str {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host_port.strip_prefix('[') {
        Some(v6) => v6.find(']').map_or(host_port, |end| &host_port[..end + 2]),
        None => host_port.split(':').next().unwrap_or_default(),
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
            allowed_hosts: [
                "authentication.logmeininc.com",
                "api.getgo.com",
                "regional.example:8443",
                "127.0.0.1:8443",
                "[::1]:9000",
                "xn--bcher-kva.example",
            ]
            .into_iter()
            .map(|h| AllowedHost::parse(h).unwrap())
            .collect(),
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
        c.spec.endpoints = Some(Box::new(Endpoints {
            authorize_url: Some("ftp://x".into()),
            token_url: None,
        }));
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
    fn personal_access_token_ref_is_checked() {
        let ok = validate(
            &client(
                serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"},
                "personalAccessTokenRef": {"name": "goto-pat"}}),
            ),
            &defaults(),
        )
        .unwrap();
        assert_eq!(
            ok.personal_access_token,
            Some(SecretKeyRef {
                name: "goto-pat".into(),
                key: "personalAccessToken".into()
            })
        );
        let problems = validate(
            &client(serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"},
                "secretName": "Bad_Name", "personalAccessTokenRef": {"name": "Bad_Name", "key": "a key"}})),
            &defaults(),
        )
        .unwrap_err()
        .to_string();
        for field in [
            "spec.personalAccessTokenRef.name",
            "spec.personalAccessTokenRef.key",
            "must differ from spec.personalAccessTokenRef.name",
        ] {
            assert!(problems.contains(field), "{field}: {problems}");
        }
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

    #[test]
    fn endpoints_must_name_an_allowed_host_exactly() {
        const NOT_ALLOWED: &str = "is not allowed";
        const USERINFO: &str = "user information";
        const NOT_CANONICAL: &str = "must be written as";
        let cases: &[(&str, Option<&str>)] = &[
            // GoTo's hosts, the operator's own endpoints' host and the listed extras.
            ("https://authentication.logmeininc.com/oauth/token", None),
            ("https://AUTHENTICATION.LogMeInInc.com/oauth/token", None),
            (
                "https://authentication.logmeininc.com:443/oauth/token",
                None,
            ),
            ("https://api.getgo.com/oauth/v2/token", None),
            ("https://auth.example/regional/token", None),
            ("https://regional.example:8443/oauth/token", None),
            ("https://127.0.0.1:8443/token", None),
            ("http://127.0.0.1:8443/token", None),
            ("https://[::1]:9000/token", None),
            ("https://xn--bcher-kva.example/token", None),
            // Not listed, and the tricks that would make a foreign host look like a listed one.
            ("https://evil.example/oauth/token", Some(NOT_ALLOWED)),
            (
                "https://authentication.logmeininc.com.evil.example/oauth/token",
                Some(NOT_ALLOWED),
            ),
            (
                "https://evil.authentication.logmeininc.com/",
                Some(NOT_ALLOWED),
            ),
            (
                "https://authentication.logmeininc.com./oauth/token",
                Some(NOT_ALLOWED),
            ),
            (
                "https://authentication.logmeininc.com:8443/",
                Some(NOT_ALLOWED),
            ),
            ("https://regional.example/oauth/token", Some(NOT_ALLOWED)),
            (
                "https://regional.example:8444/oauth/token",
                Some(NOT_ALLOWED),
            ),
            ("https://auth.example:8443/token", Some(NOT_ALLOWED)),
            ("https://127.0.0.1/token", Some(NOT_ALLOWED)),
            ("http://localhost:8443/token", Some(NOT_ALLOWED)),
            ("https://[::2]:9000/token", Some(NOT_ALLOWED)),
            ("https://xn--bcher-kva.evil/token", Some(NOT_ALLOWED)),
            // Cyrillic "а": the parser turns it into an xn-- name nobody listed.
            (
                "https://\u{430}uthentication.logmeininc.com/",
                Some(NOT_CANONICAL),
            ),
            (
                "https://authentication.logmeininc.com@evil.example/",
                Some(USERINFO),
            ),
            (
                "https://user:pass@authentication.logmeininc.com/",
                Some(USERINFO),
            ),
            (
                "https://:pass@authentication.logmeininc.com/",
                Some(USERINFO),
            ),
            ("https://@authentication.logmeininc.com/", Some(USERINFO)),
            // Forms the parser rewrites into a listed host: refused, never guessed at.
            ("https://b\u{fc}cher.example/token", Some(NOT_CANONICAL)),
            (
                "https://\u{ff41}uthentication.logmeininc.com/",
                Some(NOT_CANONICAL),
            ),
            (
                "https://authentication%2Elogmeininc.com/",
                Some(NOT_CANONICAL),
            ),
            ("https://2130706433:8443/token", Some(NOT_CANONICAL)),
            ("https://0x7f.0.0.1:8443/token", Some(NOT_CANONICAL)),
            ("https://[0:0::1]:9000/token", Some(NOT_CANONICAL)),
            (
                "https://authentication.logmeininc\t.com/",
                Some(NOT_CANONICAL),
            ),
            (
                "https:authentication.logmeininc.com/oauth/token",
                Some("must start with"),
            ),
        ];
        for field in ["authorizeUrl", "tokenUrl"] {
            for (url, refused) in cases {
                let mut c = client(
                    serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"}}),
                );
                c.spec.endpoints =
                    Some(serde_json::from_value(serde_json::json!({field: url})).unwrap());
                match (validate(&c, &defaults()), refused) {
                    (Ok(s), None) => {
                        let used = if field == "tokenUrl" {
                            s.token_url
                        } else {
                            s.authorize_url
                        };
                        assert_eq!(used, Url::parse(url).unwrap(), "{field} {url}");
                    }
                    (Err(e), Some(needle)) => {
                        let e = e.to_string();
                        assert!(
                            e.contains(&format!("spec.endpoints.{field}")) && e.contains(needle),
                            "{field} {url}: {e}"
                        );
                        if *needle == NOT_ALLOWED {
                            assert!(e.contains("--allowed-endpoint-hosts"), "{e}");
                        }
                    }
                    (result, _) => panic!("{field} {url}: {result:?}"),
                }
            }
        }
    }

    #[test]
    fn refusal_names_the_host_and_what_is_allowed() {
        let mut c =
            client(serde_json::json!({"clientId": "id", "clientSecretRef": {"name": "creds"}}));
        c.spec.endpoints = Some(Box::new(Endpoints {
            authorize_url: None,
            token_url: Some("https://evil.example:8443/oauth/token".into()),
        }));
        let err = validate(&c, &defaults()).unwrap_err().to_string();
        assert!(err.contains("\"evil.example:8443\""), "{err}");
        assert!(
            err.contains("(authentication.logmeininc.com, api.getgo.com, regional.example:8443, 127.0.0.1:8443, [::1]:9000, xn--bcher-kva.example, auth.example)"),
            "{err}"
        );
    }

    #[test]
    fn allowed_host_entries_are_canonical_or_refused() {
        for (entry, parsed) in [
            (
                "authentication.logmeininc.com",
                "authentication.logmeininc.com",
            ),
            (
                " Authentication.LogMeInInc.com ",
                "authentication.logmeininc.com",
            ),
            ("regional.example:8443", "regional.example:8443"),
            ("regional.example:443", "regional.example"),
            ("127.0.0.1:9000", "127.0.0.1:9000"),
            ("[::1]:9000", "[::1]:9000"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ] {
            assert_eq!(
                AllowedHost::parse(entry).map(|h| h.to_string()),
                Ok(parsed.into()),
                "{entry}"
            );
        }
        for (entry, needle) in [
            ("", "empty"),
            ("*.logmeininc.com", "wildcards"),
            ("https://authentication.logmeininc.com", "no scheme"),
            ("authentication.logmeininc.com/oauth", "no scheme"),
            ("user@authentication.logmeininc.com", "user@"),
            ("authentication.logmeininc.com.", "trailing dot"),
            ("b\u{fc}cher.example", "xn--bcher-kva.example"),
            ("2130706433", "127.0.0.1"),
            ("[0:0::1]", "[::1]"),
            ("regional.example:99999", "not a host"),
            ("two words", "not a host"),
        ] {
            let err = AllowedHost::parse(entry).unwrap_err();
            assert!(err.contains(needle), "{entry:?}: {err}");
        }
    }

    /// Found by `fuzz::spec`: `0ns` (and `1y`, `1.5h`) were accepted here although the CRD's
    /// rule refuses them at `kubectl apply`.
    #[test]
    fn durations_follow_the_crd_grammar() {
        for ok in [
            "20m",
            "1h30m",
            "1h 30m",
            "20 minutes",
            "90s",
            "0s",
            "2 d ",
            "1w",
        ] {
            assert!(parse_duration(ok).is_ok(), "{ok}");
        }
        for bad in [
            "0ns", "1y", "1.5h", "1M", "1 µs", "1usec", "20", "h", " 1h", "1h  30m", "-5m", "",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let mut c = client(serde_json::json!({"clientId": "a", "clientSecretRef": {"name": "0"}}));
        c.spec.rollout_restart_min_interval = Some("0ns".into());
        let problems = validate(&c, &defaults()).unwrap_err().problems;
        assert!(
            problems[0].starts_with("spec.rolloutRestartMinInterval \"0ns\" is not a duration"),
            "{problems:?}"
        );
    }

    /// Found by `fuzz::spec`: the URL parser reads `" https://…"` (and `127.1`, `user@localhost`)
    /// as a valid URL, so the operator accepted a redirectUri the CRD's rule refuses.
    #[test]
    fn urls_are_checked_as_written_like_the_crd_rule() {
        for ok in [
            "https://x",
            "HTTPS://goto.example.com/cb",
            "http://localhost",
            "http://LocalHost:8080/cb",
            "http://127.0.0.1:9000/t?x",
            "http://[::1]#f",
        ] {
            assert!(is_web_url_as_written(ok), "{ok}");
        }
        for bad in [
            " https://authentication.logmeininc.com",
            "http://127.1/cb",
            "http://0x7f.0.0.1/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://user@localhost/",
            "http://localhost:/cb",
            "http://localhost:123456/",
            "http://127.0.0.1234/",
            "http://localhost\\cb",
            "http://localhost.evil.example/",
            "ftp://x",
            "",
        ] {
            assert!(!is_web_url_as_written(bad), "{bad}");
        }
        let mut c = client(serde_json::json!({"clientId": "0", "clientSecretRef": {"name": "0"}}));
        c.spec.redirect_uri = Some(" https://authentication.logmeininc.com".into());
        let problems = validate(&c, &defaults()).unwrap_err().problems;
        assert!(problems[0].starts_with("spec.redirectUri"), "{problems:?}");
        c.spec.redirect_uri = None;
        c.spec.endpoints = Some(Box::new(Endpoints {
            authorize_url: None,
            token_url: Some(" https://auth.example/oauth/token".into()),
        }));
        let problems = validate(&c, &defaults()).unwrap_err().problems;
        assert!(
            problems[0].starts_with("spec.endpoints.tokenUrl"),
            "{problems:?}"
        );
    }
}
