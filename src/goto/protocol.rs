//! GoTo's OAuth protocol on the wire: the consent URL, the code exchange, the refresh grant and
//! the personal access token grant.
//!
//! Written by hand instead of with a general OAuth library because GoTo's documents differ from RFC 6749 where it matters: the Basic
//! header is the plain base64 of `clientId:clientSecret` (no URL-encoding first; real secrets
//! contain `+`, `/` and `=`), responses may lack `refresh_token` and `token_type`, and fields may
//! be blank. The client makes exactly one attempt per call and never follows redirects; retry
//! policy belongs to the caller, which gets a classified [`OAuthError`] to decide with.
//!
//! Everything that leaves this module in an error is safe to show to a human: descriptions taken
//! from response bodies are truncated, stripped of control characters, and have anything that
//! looks like a token (or equals a credential we sent) replaced with `[redacted]`.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

/// Largest response body read from the token endpoint. Real responses are a few KiB (two JWTs
/// plus a handful of fields); anything far bigger is a misconfigured URL or a hostile server.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest error description (in characters) kept from a response body.
const MAX_DESCRIPTION_CHARS: usize = 200;

/// Upper bound on a `Retry-After` hint, so a broken server cannot park a resource for years.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Placeholder for anything removed from a human-facing message.
const REDACTED: &str = "[redacted]";

/// The OAuth client id and secret, as configured on the client in GoTo's developer portal.
#[derive(Clone)]
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &REDACTED)
            .finish()
    }
}

/// The value of the `Authorization` header GoTo expects: `Basic ` + standard base64 (with
/// padding) of `client_id:client_secret`, with nothing URL-encoded first.
pub fn basic_authorization(client_id: &str, client_secret: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{client_id}:{client_secret}"))
    )
}

/// Percent-encodes one query/form value. Spaces become `%20` rather than `+` so the scope list
/// looks exactly like GoTo's documents (`scope=s1%20s2`); `byte_serialize` encodes a literal `+`
/// as `%2B`, so every `+` left in its output stood for a space.
fn encode_component(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Parses a configured endpoint URL, accepting only `http` and `https`. The URL itself is not
/// echoed in the error: it is configuration and could carry credentials in its userinfo.
fn parse_endpoint(raw: &str, what: &str) -> Result<url::Url, OAuthError> {
    let url = url::Url::parse(raw)
        .map_err(|e| OAuthError::InvalidUrl(format!("{what} URL is not a valid URL: {e}")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(OAuthError::InvalidUrl(format!(
            "{what} URL must use http or https, not {other:?}"
        ))),
    }
}

/// Builds the URL the admin's browser is sent to.
///
/// The query has exactly `client_id`, `response_type=code`, `redirect_uri`, `state` and, when at
/// least one non-blank scope is given, `scope` (space-separated) — no PKCE or other extras, which
/// GoTo does not document. Query parameters already in `authorize_url` are kept, except ones with
/// these names, which are replaced. `redirect_uri` must be byte-identical to the one later sent to
/// [`TokenClient::exchange_code`].
pub fn authorization_request_url(
    authorize_url: &str,
    client_id: &str,
    redirect_uri: &str,
    scopes: &[String],
    state: &str,
) -> Result<url::Url, OAuthError> {
    const OURS: [&str; 5] = [
        "client_id",
        "response_type",
        "redirect_uri",
        "state",
        "scope",
    ];
    let mut url = parse_endpoint(authorize_url, "authorize")?;
    url.set_fragment(None);

    let mut parts: Vec<String> = url
        .query_pairs()
        .filter(|(k, _)| !OURS.contains(&k.as_ref()))
        .map(|(k, v)| format!("{}={}", encode_component(&k), encode_component(&v)))
        .collect();
    parts.push(format!("client_id={}", encode_component(client_id)));
    parts.push("response_type=code".to_string());
    parts.push(format!("redirect_uri={}", encode_component(redirect_uri)));
    parts.push(format!("state={}", encode_component(state)));
    let scope = scopes
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !scope.is_empty() {
        parts.push(format!("scope={}", encode_component(&scope)));
    }
    url.set_query(Some(&parts.join("&")));
    Ok(url)
}

/// A successful token-endpoint response, normalised.
///
/// Normalisation, following GoTo's documents: blank strings (`""`, GoTo: "may be blank") count
/// as missing; `expires_in` is accepted as a number or a numeric string; unknown fields (e.g.
/// `version`) are ignored; identity fields given as numbers are kept as their decimal text; both
/// the legacy `firstName`/`lastName` and snake_case spellings are read. `principal` falls back to
/// `email` when the response has no `principal` (the legacy response shape only has `email`), so
/// callers can always use `principal` to name the GoTo account.
#[derive(Clone)]
pub struct TokenResponse {
    pub access_token: SecretString,
    /// Usually absent on refresh; when present it replaces the stored one at once.
    pub refresh_token: Option<SecretString>,
    pub token_type: Option<String>,
    pub expires_in: Option<u64>,
    pub scope: Option<String>,
    pub principal: Option<String>,
    pub email: Option<String>,
    pub account_key: Option<String>,
    pub organizer_key: Option<String>,
    pub account_type: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &REDACTED)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| REDACTED),
            )
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("principal", &self.principal)
            .field("email", &self.email)
            .field("account_key", &self.account_key)
            .field("organizer_key", &self.organizer_key)
            .field("account_type", &self.account_type)
            .field("first_name", &self.first_name)
            .field("last_name", &self.last_name)
            .finish()
    }
}

/// A non-blank string field.
fn text_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A non-blank identity field: a string, or a number kept as its decimal text (GoTo's keys are
/// long digit strings that some endpoints send unquoted).
fn identity_field(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key) {
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => text_field(map, key),
    }
}

fn expires_in_field(map: &Map<String, Value>) -> Option<u64> {
    match map.get("expires_in")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
}

impl TokenResponse {
    /// Parses a 2xx response body. Fails with [`OAuthError::MalformedResponse`] when the body is
    /// not a JSON object or has no non-blank string `access_token`. The error never quotes the
    /// body: a 200 body is full of tokens.
    pub fn from_json(body: &[u8]) -> Result<Self, OAuthError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            // Only the position, never serde's message: it can quote values from the body.
            OAuthError::MalformedResponse(format!(
                "token response is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let Value::Object(map) = value else {
            return Err(OAuthError::MalformedResponse(
                "token response is not a JSON object".into(),
            ));
        };
        let access_token = text_field(&map, "access_token").ok_or_else(|| {
            OAuthError::MalformedResponse("token response has no access_token".into())
        })?;
        let email = identity_field(&map, "email");
        let principal = identity_field(&map, "principal").or_else(|| email.clone());
        Ok(TokenResponse {
            access_token: SecretString::from(access_token),
            refresh_token: text_field(&map, "refresh_token").map(SecretString::from),
            token_type: text_field(&map, "token_type"),
            expires_in: expires_in_field(&map),
            scope: text_field(&map, "scope"),
            principal,
            email,
            account_key: identity_field(&map, "account_key"),
            organizer_key: identity_field(&map, "organizer_key"),
            account_type: identity_field(&map, "account_type"),
            first_name: identity_field(&map, "firstName")
                .or_else(|| identity_field(&map, "first_name")),
            last_name: identity_field(&map, "lastName")
                .or_else(|| identity_field(&map, "last_name")),
        })
    }
}

/// Why a call to the token endpoint failed. `Display` never contains a token, code or secret.
#[derive(thiserror::Error, Debug)]
pub enum OAuthError {
    /// The code or refresh token is expired, revoked or already used (400/401 `invalid_grant`).
    #[error("GoTo rejected the grant (invalid_grant){}", describe(.description))]
    InvalidGrant { description: Option<String> },

    /// The client id or secret is wrong (`invalid_client`, or a 401 without a readable body).
    #[error("GoTo rejected the client credentials (invalid_client){}", describe(.description))]
    InvalidClient { description: Option<String> },

    /// HTTP 429; `retry_after` from the `Retry-After` header (seconds or HTTP-date, capped at a day).
    #[error("GoTo rate limit hit (HTTP 429){}", retry_hint(.retry_after))]
    RateLimited { retry_after: Option<Duration> },

    /// Any other 4xx.
    #[error("GoTo refused the request (HTTP {status}{}){}", error_code(.error), describe(.description))]
    Rejected {
        status: u16,
        error: Option<String>,
        description: Option<String>,
    },

    /// 5xx.
    #[error("GoTo token endpoint failed (HTTP {status})")]
    Server { status: u16 },

    #[error("timed out waiting for the GoTo token endpoint")]
    Timeout,

    /// Connecting, sending, or reading the response failed (DNS, TLS, reset, ...).
    #[error("could not reach the GoTo token endpoint: {0}")]
    Connect(String),

    /// A redirect, an unexpected status, or a 2xx body that is not a usable token response.
    #[error("unusable response from the GoTo token endpoint: {0}")]
    MalformedResponse(String),

    #[error("response from the GoTo token endpoint is larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,

    #[error("invalid URL: {0}")]
    InvalidUrl(String),

    /// The HTTP client could not be built or the request could not be formed.
    #[error("HTTP client error: {0}")]
    Client(String),
}

fn describe(description: &Option<String>) -> String {
    description
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

fn error_code(error: &Option<String>) -> String {
    error
        .as_deref()
        .map(|e| format!(", {e}"))
        .unwrap_or_default()
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    retry_after
        .map(|d| format!("; retry after {}s", d.as_secs()))
        .unwrap_or_default()
}

impl OAuthError {
    /// Whether the same request may succeed later without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            OAuthError::RateLimited { .. }
                | OAuthError::Server { .. }
                | OAuthError::Timeout
                | OAuthError::Connect(_)
        )
    }

    /// Whether only a human can fix this: a new authorization (`invalid_grant`) or a corrected
    /// client id/secret followed by one (`invalid_client`).
    pub fn needs_reauthorization(&self) -> bool {
        matches!(
            self,
            OAuthError::InvalidGrant { .. } | OAuthError::InvalidClient { .. }
        )
    }

    /// A short, fixed, machine-readable label (metrics, condition reasons).
    pub fn reason(&self) -> &'static str {
        match self {
            OAuthError::InvalidGrant { .. } => "invalid_grant",
            OAuthError::InvalidClient { .. } => "invalid_client",
            OAuthError::RateLimited { .. } => "rate_limited",
            OAuthError::Rejected { .. } => "rejected",
            OAuthError::Server { .. } => "server_error",
            OAuthError::Timeout => "timeout",
            OAuthError::Connect(_) => "connect_error",
            OAuthError::MalformedResponse(_) => "malformed_response",
            OAuthError::BodyTooLarge => "body_too_large",
            OAuthError::InvalidUrl(_) => "invalid_url",
            OAuthError::Client(_) => "client_error",
        }
    }
}

/// Client for GoTo's token endpoint. Cheap to clone (shares one connection pool).
#[derive(Clone, Debug)]
pub struct TokenClient {
    http: reqwest::Client,
}

impl TokenClient {
    /// A client whose every call (connect, send, read the whole body) must finish within
    /// `timeout`; 10 s is the intended default. Redirects are never followed. Proxy settings
    /// from the environment (`HTTPS_PROXY`, `NO_PROXY`) apply, as clusters often need them for
    /// egress.
    pub fn new(timeout: Duration) -> Result<Self, OAuthError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("goto-oauth-operator/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OAuthError::Client(e.without_url().to_string()))?;
        Ok(TokenClient { http })
    }

    /// Exchanges an authorization code (once: GoTo rejects a second exchange of the same code).
    /// `redirect_uri` must be byte-identical to the one in the authorization request.
    pub async fn exchange_code(
        &self,
        token_url: &str,
        creds: &ClientCredentials,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let body = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}",
            encode_component(code),
            encode_component(redirect_uri)
        );
        self.post(token_url, creds, body, &[code]).await
    }

    /// Uses a refresh token. The response usually has no `refresh_token`; keep the old one then.
    pub async fn refresh(
        &self,
        token_url: &str,
        creds: &ClientCredentials,
        refresh_token: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let body = format!(
            "grant_type=refresh_token&refresh_token={}",
            encode_component(refresh_token)
        );
        self.post(token_url, creds, body, &[refresh_token]).await
    }

    /// Exchanges a personal access token (`grant_type=personal_access_token&pat=…`, GoTo's
    /// grant without a browser). Whether the response has a `refresh_token` is undocumented.
    pub async fn exchange_personal_access_token(
        &self,
        token_url: &str,
        creds: &ClientCredentials,
        pat: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let body = format!(
            "grant_type=personal_access_token&pat={}",
            encode_component(pat)
        );
        self.post(token_url, creds, body, &[pat]).await
    }

    /// One POST to the token endpoint. `grant_secrets` are the values in the body that must
    /// never reappear in an error description.
    async fn post(
        &self,
        token_url: &str,
        creds: &ClientCredentials,
        body: String,
        grant_secrets: &[&str],
    ) -> Result<TokenResponse, OAuthError> {
        let url = parse_endpoint(token_url, "token")?;
        let secret = creds.client_secret.expose_secret();
        let mut response = self
            .http
            .post(url)
            .header(AUTHORIZATION, basic_authorization(&creds.client_id, secret))
            .header(ACCEPT, "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;

        let status = response.status();
        let mut secrets: Vec<&str> = grant_secrets.to_vec();
        secrets.push(secret);

        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, jiff::Timestamp::now()));
            return Err(OAuthError::RateLimited { retry_after });
        }
        if status.is_server_error() {
            return Err(OAuthError::Server {
                status: status.as_u16(),
            });
        }
        if status.is_redirection() {
            return Err(OAuthError::MalformedResponse(format!(
                "unexpected redirect (HTTP {}); check the token URL",
                status.as_u16()
            )));
        }
        if status.is_client_error() {
            // An unreadable or oversized error body still leaves the status to classify by.
            let body = match read_capped(&mut response).await {
                Ok(body) => body,
                Err(e) if e.is_timeout() => return Err(OAuthError::Timeout),
                Err(_) => None,
            };
            return Err(classify_client_error(
                status.as_u16(),
                body.as_deref(),
                &secrets,
            ));
        }
        if !status.is_success() {
            return Err(OAuthError::MalformedResponse(format!(
                "unexpected HTTP status {}",
                status.as_u16()
            )));
        }
        let body = read_capped(&mut response)
            .await
            .map_err(transport_error)?
            .ok_or(OAuthError::BodyTooLarge)?;
        TokenResponse::from_json(&body)
    }
}

/// Maps a reqwest failure without its URL (configuration, possibly with userinfo) and without
/// anything from the request body.
fn transport_error(error: reqwest::Error) -> OAuthError {
    if error.is_timeout() {
        return OAuthError::Timeout;
    }
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    if error.is_builder() {
        return OAuthError::Client(message);
    }
    OAuthError::Connect(message)
}

/// Reads the body chunk by chunk; `Ok(None)` once it exceeds [`MAX_BODY_BYTES`], so a huge or
/// endless body is never buffered.
async fn read_capped(response: &mut reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// `Retry-After` as delay-seconds or an HTTP-date (IMF-fixdate, which RFC 2822 parsing covers).
/// A date in the past means "now" (zero); the result is capped at [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits that overflow u64 are still "a very long time".
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = jiff::fmt::rfc2822::DateTimeParser::new()
            .parse_timestamp(value)
            .ok()?;
        let seconds = at.as_second().saturating_sub(now.as_second()).max(0);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Classifies a 4xx (other than 429) from its status and, when readable, its RFC 6749 §5.2 body.
pub(crate) fn classify_client_error(
    status: u16,
    body: Option<&[u8]>,
    secrets: &[&str],
) -> OAuthError {
    let parsed = body.and_then(|b| serde_json::from_slice::<Value>(b).ok());
    let (error, description) = match parsed {
        Some(Value::Object(map)) => (
            map.get("error")
                .and_then(Value::as_str)
                .and_then(sanitize_error_code),
            map.get("error_description")
                .and_then(Value::as_str)
                .and_then(|d| sanitize_description(d, secrets)),
        ),
        // Not JSON: a short plain-text body can still help a human; HTML cannot.
        _ => {
            let text = body
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(str::trim)
                .filter(|t| !t.starts_with('<'));
            (None, text.and_then(|t| sanitize_description(t, secrets)))
        }
    };
    match (status, error.as_deref()) {
        (400 | 401, Some("invalid_grant")) => OAuthError::InvalidGrant { description },
        (_, Some("invalid_client")) => OAuthError::InvalidClient { description },
        (401, None) => OAuthError::InvalidClient { description },
        _ => OAuthError::Rejected {
            status,
            error,
            description,
        },
    }
}

/// An RFC 6749 error code: it is an ASCII identifier, so anything else is dropped.
fn sanitize_error_code(code: &str) -> Option<String> {
    let clean: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(64)
        .collect();
    (!clean.is_empty()).then_some(clean)
}

/// Makes text from a response body fit to show a human: credentials we sent and token-like
/// words are redacted, control characters become spaces, whitespace is collapsed, and the result
/// is cut to [`MAX_DESCRIPTION_CHARS`] characters.
fn sanitize_description(raw: &str, secrets: &[&str]) -> Option<String> {
    // Bounding the input first keeps the work small for huge descriptions; the margin lets a
    // secret that straddles the cut still be found.
    let mut text: String = raw.chars().take(MAX_DESCRIPTION_CHARS * 8).collect();
    for secret in secrets {
        // Very short values would redact ordinary words; real codes and secrets are long.
        if secret.len() < 6 {
            continue;
        }
        text = text.replace(secret, REDACTED);
        let encoded = encode_component(secret);
        if encoded != *secret {
            text = text.replace(&encoded, REDACTED);
        }
    }
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let words: Vec<&str> = cleaned
        .split_whitespace()
        .map(|w| if is_token_like(w) { REDACTED } else { w })
        .collect();
    let joined = words.join(" ");
    if joined.is_empty() {
        return None;
    }
    if joined.chars().count() <= MAX_DESCRIPTION_CHARS {
        return Some(joined);
    }
    let mut cut: String = joined.chars().take(MAX_DESCRIPTION_CHARS - 1).collect();
    cut.push('…');
    Some(cut)
}

/// A word containing a long run of token alphabet (base64/base64url/JWT/hex) that mixes letters
/// and digits, or any very long run. Prose and error codes such as `invalid_authorization_code`
/// have no digits; JWTs, opaque tokens and secrets nearly always do.
fn is_token_like(word: &str) -> bool {
    word.split(|c: char| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '/' | '='))
    })
    .any(|run| {
        let has_digit = run.bytes().any(|b| b.is_ascii_digit());
        let has_alpha = run.bytes().any(|b| b.is_ascii_alphabetic());
        (run.len() >= 20 && has_digit && has_alpha) || run.len() >= 40
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderMap, Response as HttpResponse};
    use axum::routing::post;
    use std::sync::{Arc, Mutex};

    const CLIENT_ID: &str = "a20abc4f-868a-4339-934f-4da2d788d0aa";
    const CLIENT_SECRET: &str = "3naO10IA2agcvG+9I9TGEQ==";
    /// The Authorization value from goto-obtain-access-token.txt. Its first 8 base64 characters
    /// were faked in the document ("YTIwfAKe" decodes to "a20|\x02\x9e", not to text), so only
    /// the rest — which encodes `4f-868a-…:3naO10IA2agcvG+9I9TGEQ==` — is comparable.
    const SAMPLE_HEADER: &str = "Basic YTIwfAKeNGYtODY4YS00MzM5LTkzNGYtNGRhMmQ3ODhkMGFhOjNuYU8xMElBMmFnY3ZHKzlJOVRHRVE9PQ==";

    fn creds() -> ClientCredentials {
        ClientCredentials {
            client_id: CLIENT_ID.into(),
            client_secret: SecretString::from(CLIENT_SECRET),
        }
    }

    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        path: String,
        headers: HeaderMap,
        body: String,
    }

    type Reply = Arc<dyn Fn() -> HttpResponse<Body> + Send + Sync>;

    /// A token endpoint on 127.0.0.1 that records each request and answers with `reply`.
    async fn server(reply: Reply) -> (String, Arc<Mutex<Vec<Seen>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let handler = move |method: axum::http::Method,
                            uri: axum::http::Uri,
                            headers: HeaderMap,
                            body: String| {
            let record = record.clone();
            let reply = reply.clone();
            async move {
                record.lock().unwrap().push(Seen {
                    method: method.to_string(),
                    path: uri.path().to_string(),
                    headers,
                    body,
                });
                reply()
            }
        };
        let app = Router::new().route("/oauth/token", post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/oauth/token"), seen)
    }

    fn json(status: u16, body: &str) -> Reply {
        let body = body.to_string();
        Arc::new(move || {
            HttpResponse::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(body.clone()))
                .unwrap()
        })
    }

    fn client() -> TokenClient {
        TokenClient::new(Duration::from_secs(5)).unwrap()
    }

    const LEGACY: &str = r#"{"access_token":"eyJraWQiOiJvYXV0aHYyLmxt666","token_type":"Bearer",
        "refresh_token":"eyJraWQiOiJvYXV0aHYyLmxt999","expires_in":3600,"account_key":"9999982253621659654",
        "account_type":"","email":"mister.jones@fakemail.com","firstName":"Moon","lastName":"Beam",
        "organizer_key":"8439885694023999999","version":"3"}"#;

    #[test]
    fn basic_header_is_plain_base64_and_matches_the_documented_sample() {
        let header = basic_authorization(CLIENT_ID, CLIENT_SECRET);
        assert_eq!(
            header,
            "Basic YTIwYWJjNGYtODY4YS00MzM5LTkzNGYtNGRhMmQ3ODhkMGFhOjNuYU8xMElBMmFnY3ZHKzlJOVRHRVE9PQ=="
        );
        // Same 6-byte-aligned tail as GoTo's sample: `+` and `=` went in unencoded.
        assert_eq!(
            header["Basic ".len() + 8..],
            SAMPLE_HEADER["Basic ".len() + 8..]
        );
        let decoded = STANDARD.decode(&header["Basic ".len()..]).unwrap();
        assert_eq!(decoded, format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes());
    }

    #[test]
    fn authorization_url_has_exactly_the_documented_params() {
        let url = authorization_request_url(
            "https://authentication.logmeininc.com/oauth/authorize",
            "client 1",
            "https://op.example/callback?x=1&y=2",
            &[
                "identity:".into(),
                " ".into(),
                "call-control.v1.calls.control".into(),
            ],
            "st.ate",
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://authentication.logmeininc.com/oauth/authorize?client_id=client%201\
             &response_type=code&redirect_uri=https%3A%2F%2Fop.example%2Fcallback%3Fx%3D1%26y%3D2\
             &state=st.ate&scope=identity%3A%20call-control.v1.calls.control"
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(pairs[2].1, "https://op.example/callback?x=1&y=2");
        assert_eq!(pairs[4].1, "identity: call-control.v1.calls.control");

        let no_scope =
            authorization_request_url("https://a.example/authorize", "c", "https://r", &[], "s")
                .unwrap();
        let names: Vec<String> = no_scope
            .query_pairs()
            .map(|(k, _)| k.into_owned())
            .collect();
        assert_eq!(
            names,
            ["client_id", "response_type", "redirect_uri", "state"]
        );

        assert!(matches!(
            authorization_request_url("ftp://a.example/", "c", "r", &[], "s"),
            Err(OAuthError::InvalidUrl(_))
        ));
        assert!(matches!(
            authorization_request_url("not a url", "c", "r", &[], "s"),
            Err(OAuthError::InvalidUrl(_))
        ));
    }

    #[tokio::test]
    async fn code_exchange_sends_exactly_the_documented_request() {
        let (url, seen) = server(json(200, LEGACY)).await;
        let code = "iS0vynEEvRFA9i6kZ8gv+/=&x";
        let redirect = "https://op.example/callback?a=b c";
        let tokens = client()
            .exchange_code(&url, &creds(), code, redirect)
            .await
            .unwrap();
        assert_eq!(
            tokens.access_token.expose_secret(),
            "eyJraWQiOiJvYXV0aHYyLmxt666"
        );

        let seen = seen.lock().unwrap()[0].clone();
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.path, "/oauth/token");
        assert_eq!(
            seen.headers["authorization"],
            basic_authorization(CLIENT_ID, CLIENT_SECRET).as_str()
        );
        assert_eq!(seen.headers["accept"], "application/json");
        assert_eq!(
            seen.headers["content-type"],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(
            seen.body,
            "grant_type=authorization_code&code=iS0vynEEvRFA9i6kZ8gv%2B%2F%3D%26x\
             &redirect_uri=https%3A%2F%2Fop.example%2Fcallback%3Fa%3Db%20c"
        );
        // A form decoder gets back the exact bytes.
        let decoded: Vec<(String, String)> = url::form_urlencoded::parse(seen.body.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(decoded[1], ("code".into(), code.into()));
        assert_eq!(decoded[2], ("redirect_uri".into(), redirect.into()));
    }

    #[tokio::test]
    async fn refresh_sends_the_refresh_grant() {
        let (url, seen) = server(json(
            200,
            r#"{"access_token":"new-access","expires_in":3600}"#,
        ))
        .await;
        let tokens = client().refresh(&url, &creds(), "rt/1+2=").await.unwrap();
        assert_eq!(tokens.access_token.expose_secret(), "new-access");
        let seen = seen.lock().unwrap()[0].clone();
        assert_eq!(
            seen.body,
            "grant_type=refresh_token&refresh_token=rt%2F1%2B2%3D"
        );
        assert_eq!(seen.headers["accept"], "application/json");
        assert_eq!(
            seen.headers["authorization"],
            "Basic YTIwYWJjNGYtODY4YS00MzM5LTkzNGYtNGRhMmQ3ODhkMGFhOjNuYU8xMElBMmFnY3ZHKzlJOVRHRVE9PQ=="
        );
    }

    #[tokio::test]
    async fn personal_access_token_grant_sends_the_pat_with_the_basic_header() {
        let (url, seen) = server(json(200, r#"{"access_token":"a","expires_in":3600}"#)).await;
        let pat = "pat+with/odd=chars";
        let response = client()
            .exchange_personal_access_token(&url, &creds(), pat)
            .await
            .unwrap();
        assert!(response.refresh_token.is_none());
        let first = seen.lock().unwrap()[0].clone();
        assert_eq!(
            first.body,
            "grant_type=personal_access_token&pat=pat%2Bwith%2Fodd%3Dchars"
        );
        assert_eq!(
            first.headers["authorization"],
            basic_authorization(CLIENT_ID, CLIENT_SECRET).as_str()
        );
        // A description echoing the PAT is redacted like a code.
        let (url, _) = server(json(
            400,
            r#"{"error":"invalid_grant","error_description":"pat pat+with/odd=chars is revoked"}"#,
        ))
        .await;
        let error = client()
            .exchange_personal_access_token(&url, &creds(), pat)
            .await
            .unwrap_err();
        assert!(matches!(error, OAuthError::InvalidGrant { .. }));
        assert!(!error.to_string().contains(pat), "{error}");
    }

    #[test]
    fn legacy_response_shape() {
        let t = TokenResponse::from_json(LEGACY.as_bytes()).unwrap();
        assert_eq!(
            t.refresh_token.as_ref().unwrap().expose_secret(),
            "eyJraWQiOiJvYXV0aHYyLmxt999"
        );
        assert_eq!(t.token_type.as_deref(), Some("Bearer"));
        assert_eq!(t.expires_in, Some(3600));
        assert_eq!(t.email.as_deref(), Some("mister.jones@fakemail.com"));
        assert_eq!(t.principal.as_deref(), Some("mister.jones@fakemail.com"));
        assert_eq!(t.account_key.as_deref(), Some("9999982253621659654"));
        assert_eq!(t.organizer_key.as_deref(), Some("8439885694023999999"));
        assert_eq!(t.account_type, None, "blank counts as missing");
        assert_eq!(t.first_name.as_deref(), Some("Moon"));
        assert_eq!(t.last_name.as_deref(), Some("Beam"));
        assert_eq!(t.scope, None);
    }

    #[test]
    fn current_response_shape_without_refresh_token_or_token_type() {
        let t = TokenResponse::from_json(
            br#"{"access_token":"a","expires_in":"3599","scope":"identity: collab:",
                "principal":"admin@example.com","email":"other@example.com","unknown":{"x":[1]}}"#,
        )
        .unwrap();
        assert!(t.refresh_token.is_none());
        assert!(t.token_type.is_none());
        assert_eq!(t.expires_in, Some(3599));
        assert_eq!(t.scope.as_deref(), Some("identity: collab:"));
        assert_eq!(t.principal.as_deref(), Some("admin@example.com"));
        assert_eq!(t.email.as_deref(), Some("other@example.com"));
    }

    #[test]
    fn blank_and_odd_fields_count_as_missing() {
        let t = TokenResponse::from_json(
            br#"{"access_token":"a","refresh_token":"","token_type":" ","expires_in":"soon",
                "principal":"","email":"","account_key":12345}"#,
        )
        .unwrap();
        assert!(t.refresh_token.is_none());
        assert!(t.token_type.is_none());
        assert!(t.expires_in.is_none());
        assert!(t.principal.is_none());
        assert!(t.email.is_none());
        assert_eq!(t.account_key.as_deref(), Some("12345"));
    }

    #[test]
    fn missing_or_blank_access_token_is_malformed() {
        for body in [
            &br#"{"refresh_token":"r"}"#[..],
            br#"{"access_token":""}"#,
            br#"{"access_token":42}"#,
            b"[]",
            b"",
            b"<html>ok</html>",
        ] {
            let err = TokenResponse::from_json(body).unwrap_err();
            assert!(matches!(err, OAuthError::MalformedResponse(_)), "{err:?}");
        }
    }

    #[test]
    fn debug_redacts_tokens_and_secrets() {
        let t = TokenResponse::from_json(LEGACY.as_bytes()).unwrap();
        let debug = format!("{t:?}");
        assert!(!debug.contains("eyJ"), "{debug}");
        assert!(debug.contains("[redacted]"));
        assert!(debug.contains("mister.jones@fakemail.com"));
        let debug = format!("{:?}", creds());
        assert!(!debug.contains(CLIENT_SECRET));
        assert!(debug.contains(CLIENT_ID));
    }

    async fn exchange_error(reply: Reply) -> OAuthError {
        let (url, _) = server(reply).await;
        client()
            .exchange_code(&url, &creds(), "the-code-123456", "https://r")
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn invalid_grant_on_400_and_401() {
        for status in [400, 401] {
            let err = exchange_error(json(
                status,
                r#"{"error":"invalid_grant","error_description":"Invalid authorization code"}"#,
            ))
            .await;
            match &err {
                OAuthError::InvalidGrant { description } => {
                    assert_eq!(description.as_deref(), Some("Invalid authorization code"))
                }
                other => panic!("{other:?}"),
            }
            assert!(err.needs_reauthorization());
            assert!(!err.is_transient());
            assert_eq!(err.reason(), "invalid_grant");
        }
    }

    #[tokio::test]
    async fn invalid_client_from_body_or_bare_401() {
        let err = exchange_error(json(400, r#"{"error":"invalid_client"}"#)).await;
        assert!(
            matches!(err, OAuthError::InvalidClient { description: None }),
            "{err:?}"
        );
        assert_eq!(err.reason(), "invalid_client");
        assert!(err.needs_reauthorization());

        let err = exchange_error(Arc::new(|| {
            HttpResponse::builder()
                .status(401)
                .header("content-type", "text/html")
                .body(Body::from("<html><body>Unauthorized</body></html>"))
                .unwrap()
        }))
        .await;
        assert!(
            matches!(err, OAuthError::InvalidClient { description: None }),
            "{err:?}"
        );

        let err = exchange_error(json(401, "")).await;
        assert!(matches!(err, OAuthError::InvalidClient { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn other_4xx_is_rejected_with_sanitised_details() {
        let err = exchange_error(json(
            403,
            r#"{"error":"access_denied<script>","error_description":"no\u0007 access\nfor the-code-123456 or 3naO10IA2agcvG+9I9TGEQ== token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig"}"#,
        ))
        .await;
        match &err {
            OAuthError::Rejected {
                status,
                error,
                description,
            } => {
                assert_eq!(*status, 403);
                assert_eq!(error.as_deref(), Some("access_deniedscript"));
                assert_eq!(
                    description.as_deref(),
                    Some("no access for [redacted] or [redacted] token [redacted]")
                );
            }
            other => panic!("{other:?}"),
        }
        let shown = err.to_string();
        assert!(!shown.contains("the-code-123456"));
        assert!(!shown.contains(CLIENT_SECRET));
        assert!(!shown.contains("eyJ"));
        assert_eq!(err.reason(), "rejected");
        assert!(!err.is_transient() && !err.needs_reauthorization());

        // invalid_grant on a status other than 400/401 is not a reauthorization signal.
        let err = exchange_error(json(403, r#"{"error":"invalid_grant"}"#)).await;
        assert!(
            matches!(err, OAuthError::Rejected { status: 403, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn descriptions_are_truncated() {
        let long = "word ".repeat(500);
        let d = sanitize_description(&long, &[]).unwrap();
        assert_eq!(d.chars().count(), MAX_DESCRIPTION_CHARS);
        assert!(d.ends_with('…'));
        assert_eq!(sanitize_description(" \u{0} \t", &[]), None);
        assert_eq!(
            sanitize_description("invalid_authorization_code for 9999982253621659654", &[])
                .as_deref(),
            Some("invalid_authorization_code for 9999982253621659654")
        );
    }

    #[tokio::test]
    async fn rate_limited_with_retry_after_seconds_and_date() {
        let err = exchange_error(Arc::new(|| {
            HttpResponse::builder()
                .status(429)
                .header("retry-after", "7")
                .body(Body::empty())
                .unwrap()
        }))
        .await;
        assert!(
            matches!(err, OAuthError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(7)),
            "{err:?}"
        );
        assert!(err.is_transient());
        assert_eq!(err.reason(), "rate_limited");

        let err = exchange_error(json(429, "{}")).await;
        assert!(
            matches!(err, OAuthError::RateLimited { retry_after: None }),
            "{err:?}"
        );

        let now: jiff::Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        assert_eq!(
            parse_retry_after("Mon, 23 Nov 2026 10:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            parse_retry_after("Sun, 22 Nov 2026 10:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        for status in [500, 502, 503] {
            let err = exchange_error(Arc::new(move || {
                HttpResponse::builder()
                    .status(status)
                    .header("content-type", "text/html")
                    .body(Body::from("<html>Bad Gateway</html>"))
                    .unwrap()
            }))
            .await;
            assert!(
                matches!(err, OAuthError::Server { status: s } if s == status),
                "{err:?}"
            );
            assert!(err.is_transient());
            assert_eq!(err.reason(), "server_error");
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let app = Router::new().route(
            "/oauth/token",
            post(|| async {
                std::future::pending::<()>().await;
                ""
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let started = std::time::Instant::now();
        let err = TokenClient::new(Duration::from_millis(200))
            .unwrap()
            .refresh(&format!("http://{addr}/oauth/token"), &creds(), "rt-123456")
            .await
            .unwrap_err();
        assert!(matches!(err, OAuthError::Timeout), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert!(err.is_transient());
        assert_eq!(err.reason(), "timeout");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = client()
            .refresh(&format!("http://{addr}/oauth/token"), &creds(), "rt-123456")
            .await
            .unwrap_err();
        assert!(matches!(err, OAuthError::Connect(_)), "{err:?}");
        assert!(err.is_transient());
        assert!(!err.to_string().contains("rt-123456"));
    }

    #[tokio::test]
    async fn non_json_200_is_malformed_and_not_echoed() {
        let err = exchange_error(Arc::new(|| {
            HttpResponse::builder()
                .status(200)
                .header("content-type", "text/html")
                .body(Body::from("<html>secret-looking eyJabc123</html>"))
                .unwrap()
        }))
        .await;
        assert!(matches!(err, OAuthError::MalformedResponse(_)), "{err:?}");
        assert!(!err.to_string().contains("eyJabc123"));
        assert_eq!(err.reason(), "malformed_response");

        let err = exchange_error(json(200, r#"{"token_type":"Bearer"}"#)).await;
        assert!(matches!(err, OAuthError::MalformedResponse(_)), "{err:?}");
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        let err = exchange_error(Arc::new(|| {
            HttpResponse::builder()
                .status(302)
                .header("location", "http://127.0.0.1:9/elsewhere")
                .body(Body::empty())
                .unwrap()
        }))
        .await;
        assert!(matches!(err, OAuthError::MalformedResponse(_)), "{err:?}");
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        // Declared length over the cap.
        let err = exchange_error(json(200, &" ".repeat(MAX_BODY_BYTES + 1))).await;
        assert!(matches!(err, OAuthError::BodyTooLarge), "{err:?}");
        assert_eq!(err.reason(), "body_too_large");

        // No declared length and an endless stream: must stop at the cap, not buffer forever.
        let err = exchange_error(Arc::new(|| {
            let chunks = futures::stream::repeat_with(|| {
                Ok::<_, std::io::Error>(bytes_of(vec![b' '; 8192]))
            });
            HttpResponse::builder()
                .status(200)
                .body(Body::from_stream(chunks))
                .unwrap()
        }))
        .await;
        assert!(matches!(err, OAuthError::BodyTooLarge), "{err:?}");

        // An oversized error body still classifies by status.
        let err = exchange_error(json(401, &" ".repeat(MAX_BODY_BYTES + 1))).await;
        assert!(matches!(err, OAuthError::InvalidClient { .. }), "{err:?}");
    }

    fn bytes_of(v: Vec<u8>) -> axum::body::Bytes {
        axum::body::Bytes::from(v)
    }

    #[tokio::test]
    async fn bad_token_url_is_invalid_url() {
        let err = client()
            .refresh("file:///etc/passwd", &creds(), "rt-123456")
            .await
            .unwrap_err();
        assert!(matches!(err, OAuthError::InvalidUrl(_)), "{err:?}");
        assert!(!err.is_transient());
    }

    #[test]
    fn error_display_is_human_readable() {
        let err = OAuthError::RateLimited {
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            err.to_string(),
            "GoTo rate limit hit (HTTP 429); retry after 3s"
        );
        let err = OAuthError::Rejected {
            status: 403,
            error: Some("access_denied".into()),
            description: Some("nope".into()),
        };
        assert_eq!(
            err.to_string(),
            "GoTo refused the request (HTTP 403, access_denied): nope"
        );
    }
}
