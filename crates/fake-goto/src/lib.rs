//! A fake GoTo (LogMeIn) OAuth 2.0 provider for the operator's integration tests, its benchmark and
//! the local demo.
//!
//! It is a crate of its own, not a feature of the operator, so that it can never end up in the
//! release binary; it does not depend on the operator either.
//!
//! It speaks the protocol the way GoTo's own documents describe it (see the shared
//! `goto-oauth-protocol.md`), including the parts where GoTo differs from generic OAuth
//! libraries, so that the operator is tested against the provider it will meet in production:
//!
//! * the token endpoint only accepts client authentication by an `Authorization: Basic` header whose
//!   value is the *plain* base64 of `clientId:clientSecret`; a header built the RFC 6749 §2.3.1 way
//!   (credentials URL-encoded first) does not match a secret containing `+`, `/` or `=` and is refused
//!   with `invalid_client`, as are credentials sent in the body;
//! * `redirect_uri` must be byte-identical to a registered one and, at the code exchange, to the one of
//!   the authorization request; codes are long (≥ 300 characters), single use and live 5 minutes;
//! * a refresh returns a new access token and, by default, neither a `refresh_token` nor a
//!   `token_type` field: the old refresh token stays valid. [`RefreshTokenRotation::Always`] models
//!   the stricter "valid for one use only" reading, where a returned refresh token replaces the
//!   old one at once;
//! * the token endpoint is rate limited (10 requests per second by default) with HTTP 429;
//! * the personal access token grant (`grant_type=personal_access_token&pat=…`, same Basic header)
//!   accepts the PATs registered with [`FakeGoTo::register_personal_access_token`] for their client
//!   and answers any other with `invalid_grant`. GoTo does not document whether its response
//!   carries a refresh token, so [`PatRefreshToken`] chooses.
//!
//! Error paths are driven by fault injection ([`FakeGoTo::push_token_fault`],
//! [`FakeGoTo::set_random_faults`]). A faulted request is **not processed**: it consumes no
//! authorization code and rotates no refresh token, so a test can always retry with the same grant.
//! The only exception is [`TokenFault::SlowResponse`], which models a slow but working provider.
//!
//! Everything the fake observes is kept for assertions ([`FakeGoTo::token_requests`] and friends);
//! the records never hold a code, token or secret, because tests print them on failure.
//!
//! All timing uses `tokio::time`, so tests running with a paused clock (`tokio::time::pause`) control
//! code expiry, rate windows and injected delays. Beware that a paused clock auto-advances whenever
//! the runtime idles, including while it waits for loopback I/O.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION, PRAGMA, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use axum::http::{StatusCode, header::AUTHORIZATION};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Path of the browser authorization endpoint.
pub(crate) const AUTHORIZE_PATH: &str = "/oauth/authorize";
/// Path the consent page posts the Allow/Deny decision to.
pub(crate) const DECISION_PATH: &str = "/oauth/authorize/decision";
/// Path of the token endpoint.
pub(crate) const TOKEN_PATH: &str = "/oauth/token";

/// Length of an authorization code: GoTo says its codes are "at least 10 times larger" than the
/// ~30-character fragment in its sample.
pub(crate) const CODE_LEN: usize = 320;
/// How long an authorization code can be exchanged.
pub(crate) const CODE_TTL: Duration = Duration::from_secs(5 * 60);

const URL_SAFE_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const ALNUM_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Whether a refresh hands out a new refresh token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefreshTokenRotation {
    /// GoTo's current behaviour: no `refresh_token` in the refresh response; the old one stays valid.
    #[default]
    Never,
    /// Every refresh returns a new refresh token and the old one is invalid at once (the older GoTo
    /// page's "valid for one use only").
    Always,
}

/// Whether a personal access token grant's response carries a `refresh_token` (GoTo does not
/// document it, so the operator must handle both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PatRefreshToken {
    /// A refresh token comes with the access token, as after a consent.
    #[default]
    Issue,
    /// Only an access token: the client exchanges the PAT again when it is due.
    Omit,
}

/// Which identity fields accompany the tokens in a token response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResponseStyle {
    /// `account_key`, `account_type` (""), `email`, `firstName`, `lastName`, `organizer_key`, `version` ("3").
    Legacy,
    /// `scope` (space-separated) and `principal` (the email).
    Current,
    /// Both sets.
    #[default]
    Both,
}

/// Start-up configuration; most of it can also be changed at runtime through setters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeGoToConfig {
    /// `expires_in` of every token response, in seconds.
    pub expires_in: u64,
    pub rotation: RefreshTokenRotation,
    /// Leave `token_type` out of refresh responses (GoTo's current page says it may be missing).
    pub omit_token_type_on_refresh: bool,
    pub response_style: ResponseStyle,
    /// Token requests admitted per second (sliding one-second window); `None` disables the limit.
    pub rate_limit_per_second: Option<u32>,
    /// Length of generated access and refresh tokens.
    pub token_len: usize,
    /// Whether a personal access token grant returns a refresh token.
    pub pat_refresh_token: PatRefreshToken,
}

impl Default for FakeGoToConfig {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            rotation: RefreshTokenRotation::Never,
            omit_token_type_on_refresh: true,
            response_style: ResponseStyle::Both,
            rate_limit_per_second: Some(10),
            token_len: 1024,
            pat_refresh_token: PatRefreshToken::Issue,
        }
    }
}

/// An OAuth client as registered in GoTo's developer portal.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientRegistration {
    pub client_id: String,
    pub client_secret: String,
    /// Compared byte for byte with the `redirect_uri` of requests.
    pub redirect_uris: Vec<String>,
    /// The scopes enabled on the client; only these can be granted.
    pub scopes: Vec<String>,
    /// Shown on the consent page.
    pub name: String,
}

impl ClientRegistration {
    /// A client with a random UUID-like id, a GoTo-like secret ([`sample_client_secret`]) and two scopes.
    #[cfg(test)] // only the unit tests use it
    pub(crate) fn sample(redirect_uri: &str) -> Self {
        Self {
            client_id: random_client_id(),
            client_secret: sample_client_secret(),
            redirect_uris: vec![redirect_uri.to_owned()],
            scopes: vec![
                "identity:".to_owned(),
                "call-control.v1.calls.control".to_owned(),
            ],
            name: "Token Keeper".to_owned(),
        }
    }
}

// Hand-written so that a failing test that prints a registration does not print the secret.
impl fmt::Debug for ClientRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRegistration")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("redirect_uris", &self.redirect_uris)
            .field("scopes", &self.scopes)
            .field("name", &self.name)
            .finish()
    }
}

/// The GoTo account that is "signed in" on the consent page and whose identity the token responses carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub account_key: String,
    pub organizer_key: String,
    pub account_type: String,
}

impl Default for Account {
    /// The account of GoTo's documented response example.
    fn default() -> Self {
        Self {
            email: "mister.jones@fakemail.com".to_owned(),
            first_name: "Moon".to_owned(),
            last_name: "Beam".to_owned(),
            account_key: "9999982253621659654".to_owned(),
            organizer_key: "8439885694023999999".to_owned(),
            account_type: String::new(),
        }
    }
}

/// The button the (headless) admin clicks on the consent page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

/// A failure injected into the next token request. Apart from [`TokenFault::SlowResponse`], a faulted
/// request is answered without being processed: no code is consumed and no refresh token rotated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenFault {
    /// Answer with this status, body, content type and optional `Retry-After` (seconds).
    Status {
        status: u16,
        body: String,
        content_type: String,
        retry_after: Option<u64>,
    },
    /// Wait this long, then answer 504 with an HTML body (a gateway timing out). For client timeouts.
    Delay(Duration),
    /// Wait this long, then process the request normally (this one DOES consume the grant).
    SlowResponse(Duration),
    /// 200 `application/json` whose body is this many bytes (a JSON object without tokens).
    OversizedBody(usize),
    /// 200 `text/html` (a sign-in page served where JSON was expected).
    NonJson,
    /// Close the connection without writing a response.
    Drop,
}

impl TokenFault {
    /// 500 with an HTML error page.
    pub fn server_error_html() -> Self {
        Self::Status {
            status: 500,
            body: "<html><body><h1>500 Internal Server Error</h1></body></html>".to_owned(),
            content_type: "text/html; charset=utf-8".to_owned(),
            retry_after: None,
        }
    }

    /// 503 with an RFC 6749-style JSON body.
    pub fn service_unavailable() -> Self {
        Self::json_error(503, "temporarily_unavailable", None)
    }

    /// 400 `invalid_grant`, as if the refresh token had been revoked (it is not).
    pub fn invalid_grant() -> Self {
        Self::json_error(400, "invalid_grant", None)
    }

    /// 401 `invalid_client`, as if the client secret had been changed (it is not).
    pub fn invalid_client() -> Self {
        Self::json_error(401, "invalid_client", None)
    }

    /// 429 with `Retry-After`.
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        Self::json_error(429, "too_many_requests", Some(retry_after_secs))
    }

    fn json_error(status: u16, error: &str, retry_after: Option<u64>) -> Self {
        Self::Status {
            status,
            body: json!({"error": error, "error_description": "injected fault"}).to_string(),
            content_type: "application/json".to_owned(),
            retry_after,
        }
    }

    fn kind(&self) -> FaultKind {
        match self {
            TokenFault::Status { status, .. } => FaultKind::Status(*status),
            TokenFault::Delay(_) => FaultKind::Delay,
            TokenFault::SlowResponse(_) => FaultKind::SlowResponse,
            TokenFault::OversizedBody(_) => FaultKind::OversizedBody,
            TokenFault::NonJson => FaultKind::NonJson,
            TokenFault::Drop => FaultKind::Drop,
        }
    }
}

/// How the `Authorization` header of a token request looked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasicAuth {
    /// No `Authorization` header.
    Missing,
    /// Not `Basic <standard base64 of "id:secret">`.
    Malformed,
    /// Id or secret contain `%XX` escapes: URL-encoded before base64 (RFC 6749 §2.3.1 style).
    UrlEncoded,
    /// Well-formed, but the client id is not registered.
    UnknownClient,
    /// Well-formed, registered client, wrong secret.
    WrongSecret,
    /// The plain base64 of a registered `clientId:clientSecret`.
    Valid,
}

impl BasicAuth {
    /// A syntactically plain Basic header (whether or not the credentials are right).
    pub(crate) fn is_well_formed(self) -> bool {
        matches!(
            self,
            BasicAuth::UnknownClient | BasicAuth::WrongSecret | BasicAuth::Valid
        )
    }
}

/// Which fault was applied to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Status(u16),
    Delay,
    SlowResponse,
    OversizedBody,
    NonJson,
    Drop,
}

/// What the token endpoint did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOutcome {
    /// Processed as a real token request (successfully or with an OAuth error).
    Processed,
    /// Refused by the rate limiter (429).
    RateLimited,
    /// Answered by an injected fault; `random` when it came from [`FakeGoTo::set_random_faults`].
    Fault { kind: FaultKind, random: bool },
}

/// One request to the token endpoint. Holds no code, token or secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequestRecord {
    pub grant_type: Option<String>,
    /// From the Basic header when it decodes, else the body's `client_id`.
    pub client_id: Option<String>,
    /// The `redirect_uri` form parameter, if sent.
    pub redirect_uri: Option<String>,
    /// Arrival time on the tokio clock.
    pub at: Instant,
    /// Arrival time on the wall clock.
    pub system_time: SystemTime,
    /// When the answer was decided, on the wall clock (after any injected delay); a refresh's
    /// tokens were issued (and a rotated refresh token invalidated) at this moment.
    pub answered_at: SystemTime,
    /// Which refresh token a processed `refresh_token` grant presented: the issue number of a
    /// token this provider issued (not the token), `None` for an unknown one or another grant.
    /// Tells apart "the same refresh token sent twice" from two different ones.
    pub refresh_token_seq: Option<u64>,
    /// Response status; 0 when the connection was dropped without a response.
    pub status: u16,
    pub basic_auth: BasicAuth,
    /// `basic_auth.is_well_formed()`.
    pub basic_header_well_formed: bool,
    /// Whether the body carried `client_secret` (GoTo documents only the header).
    pub secret_in_body: bool,
    pub outcome: TokenOutcome,
    /// The OAuth `error` code of the response, if it was one.
    pub error: Option<String>,
}

/// One GET of the authorization endpoint. Holds no state value (it is a CSRF secret of the caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizeRequestRecord {
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub response_type: Option<String>,
    pub scope: Option<String>,
    pub state_present: bool,
    pub at: Instant,
    pub system_time: SystemTime,
    /// 200 (consent page), 302 (error redirect) or 400 (error page).
    pub status: u16,
}

/// A random secret shaped like GoTo's sample (24 characters with `+` and `/`, ending in `==`), so tests
/// exercise the characters that URL-encoding changes.
pub fn sample_client_secret() -> String {
    let mut rng = rand::rng();
    format!(
        "{}+{}/{}==",
        random_string(&mut rng, ALNUM_ALPHABET, 10),
        random_string(&mut rng, ALNUM_ALPHABET, 5),
        random_string(&mut rng, ALNUM_ALPHABET, 5)
    )
}

/// A random personal access token, shaped like an opaque GoTo credential.
pub fn sample_personal_access_token() -> String {
    format!(
        "pat-{}",
        random_string(&mut rand::rng(), URL_SAFE_ALPHABET, 48)
    )
}

/// A random client id shaped like GoTo's (a UUID).
#[cfg(test)] // only the unit tests use it
pub(crate) fn random_client_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The fake provider. Dropping it shuts the server down.
pub struct FakeGoTo {
    base_url: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Drop for FakeGoTo {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl fmt::Debug for FakeGoTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeGoTo")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeGoTo {
    /// Starts on an ephemeral port of 127.0.0.1. Panics if it cannot bind (start-up code of tests).
    pub async fn start(config: FakeGoToConfig) -> FakeGoTo {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config)
            .await
            .expect("bind the fake GoTo provider on 127.0.0.1")
    }

    /// Starts on `addr`, e.g. a fixed port of 127.0.0.1 that a user forwards to a browser on
    /// another machine (the demo's `--interactive`). Fails, rather than panicking, when it cannot
    /// bind (the port is taken), so the caller can say which option picks another one.
    pub async fn start_on(addr: SocketAddr, config: FakeGoToConfig) -> io::Result<FakeGoTo> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(ProviderState::new(config)),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route(AUTHORIZE_PATH, get(authorize))
            .route(DECISION_PATH, post(decide))
            .route(TOKEN_PATH, post(token))
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let server = axum::serve(
            KillableListener(listener),
            router.into_make_service_with_connect_info::<ConnHandle>(),
        )
        .with_graceful_shutdown(signal);
        tokio::spawn(async move {
            if let Err(error) = server.await {
                tracing::warn!(%error, "fake GoTo provider stopped");
            }
        });
        Ok(FakeGoTo {
            base_url: format!("http://{addr}"),
            shared,
            shutdown,
        })
    }

    /// `http://127.0.0.1:{port}`, no trailing slash.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn authorize_url(&self) -> String {
        format!("{}{AUTHORIZE_PATH}", self.base_url)
    }

    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url)
    }

    fn state(&self) -> MutexGuard<'_, ProviderState> {
        self.shared.lock()
    }

    /// Registers (or replaces) a client.
    pub fn register_client(&self, client: ClientRegistration) {
        self.state()
            .clients
            .insert(client.client_id.clone(), client);
    }

    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn set_expires_in(&self, secs: u64) {
        self.state().config.expires_in = secs;
    }

    /// Signs another account in on the consent page (and into the token responses).
    pub fn set_account(&self, account: Account) {
        self.state().account = account;
    }

    /// Makes `pat` a valid personal access token of the client (or valid again).
    pub fn register_personal_access_token(&self, client_id: &str, pat: &str) {
        self.state().pats.insert(
            pat.to_owned(),
            PatGrant {
                client_id: client_id.to_owned(),
                valid: true,
            },
        );
    }

    /// Revokes a personal access token: the next grant with it gets `invalid_grant`.
    pub fn revoke_personal_access_token(&self, pat: &str) {
        if let Some(grant) = self.state().pats.get_mut(pat) {
            grant.valid = false;
        }
    }

    /// Whether a personal access token grant returns a refresh token from now on.
    pub fn set_pat_refresh_token(&self, mode: PatRefreshToken) {
        self.state().config.pat_refresh_token = mode;
    }

    pub fn set_rotation(&self, rotation: RefreshTokenRotation) {
        self.state().config.rotation = rotation;
    }

    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn set_omit_token_type_on_refresh(&self, omit: bool) {
        self.state().config.omit_token_type_on_refresh = omit;
    }

    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn set_response_style(&self, style: ResponseStyle) {
        self.state().config.response_style = style;
    }

    /// `None` disables the limit. Clears the current window.
    pub fn set_rate_limit(&self, per_second: Option<u32>) {
        let mut state = self.state();
        state.config.rate_limit_per_second = per_second;
        state.rate_window.clear();
    }

    /// Queues a fault for the next token request that passes the rate limiter; faults apply in order.
    pub fn push_token_fault(&self, fault: TokenFault) {
        self.state().faults.push_back(fault);
    }

    pub fn clear_token_faults(&self) {
        self.state().faults.clear();
    }

    /// Faults not yet applied.
    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn pending_token_faults(&self) -> usize {
        self.state().faults.len()
    }

    /// Soak mode: each token request (after queued faults) independently fails with `probability`
    /// with a transient fault chosen at random — 500 HTML, 503 JSON, 429 with `Retry-After: 1`, or a
    /// 20–200 ms delay followed by 504 — without being processed. `seed` makes the sequence repeatable
    /// for a given request order.
    pub fn set_random_faults(&self, probability: f64, seed: u64) {
        self.state().random_faults = Some(RandomFaults {
            probability: if probability.is_finite() {
                probability.clamp(0.0, 1.0)
            } else {
                0.0
            },
            rng: StdRng::seed_from_u64(seed),
        });
    }

    /// Every token request so far, in completion order (`at` is the arrival time).
    pub fn token_requests(&self) -> Vec<TokenRequestRecord> {
        self.state().token_records.clone()
    }

    /// Every GET of the authorization endpoint so far.
    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn authorize_requests(&self) -> Vec<AuthorizeRequestRecord> {
        self.state().authorize_records.clone()
    }

    /// Peak number of token requests being handled at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts [`Self::max_in_flight`] again from the requests being handled now (e.g. after a
    /// set-up that exchanged codes in parallel, so the peak that follows is the system's).
    pub fn reset_max_in_flight(&self) {
        self.shared.max_in_flight.store(
            self.shared.in_flight.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
    }

    /// Token requests being handled now.
    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Token requests refused by the rate limiter (not counting injected 429 faults).
    pub fn rate_limited_count(&self) -> u64 {
        self.state().rate_limited
    }

    /// The most recently issued refresh token of this client that is still valid.
    pub fn valid_refresh_token(&self, client_id: &str) -> Option<String> {
        let state = self.state();
        state
            .refresh_tokens
            .iter()
            .filter(|(_, grant)| grant.valid && grant.client_id == client_id)
            .max_by_key(|(_, grant)| grant.seq)
            .map(|(token, _)| token.clone())
    }

    pub fn is_refresh_token_valid(&self, refresh_token: &str) -> bool {
        self.state()
            .refresh_tokens
            .get(refresh_token)
            .is_some_and(|grant| grant.valid)
    }

    /// Invalidates every refresh token of the client: the next refresh gets `invalid_grant`.
    pub fn revoke_refresh_tokens(&self, client_id: &str) {
        for grant in self.state().refresh_tokens.values_mut() {
            if grant.client_id == client_id {
                grant.valid = false;
            }
        }
    }

    /// Makes every outstanding authorization code expired (for tests that cannot pause the clock).
    #[cfg(test)] // only the unit tests below use it
    pub(crate) fn expire_all_codes(&self) {
        let now = Instant::now();
        for grant in self.state().codes.values_mut() {
            grant.expires_at = now;
        }
    }

    /// Whether this access token was issued here and has not expired (tokio clock).
    pub fn is_access_token_live(&self, access_token: &str) -> bool {
        self.access_token_expires_at(access_token)
            .is_some_and(|expires_at| Instant::now() < expires_at)
    }

    /// When an access token issued here expires (tokio clock).
    pub(crate) fn access_token_expires_at(&self, access_token: &str) -> Option<Instant> {
        self.state()
            .access_tokens
            .get(access_token)
            .map(|grant| grant.expires_at)
    }

    /// The client's access tokens that have not expired, newest first.
    pub fn live_access_tokens(&self, client_id: &str) -> Vec<String> {
        let now = Instant::now();
        let state = self.state();
        let mut live: Vec<(&String, &AccessGrant)> = state
            .access_tokens
            .iter()
            .filter(|(_, grant)| grant.client_id == client_id && now < grant.expires_at)
            .collect();
        live.sort_by_key(|(_, grant)| std::cmp::Reverse(grant.seq));
        live.into_iter().map(|(token, _)| token.clone()).collect()
    }

    /// Issues an authorization code without the browser round trip, as if the admin had clicked Allow
    /// on a request for all of the client's scopes. Errors if the client or redirect URI is not registered.
    pub fn issue_code(&self, client_id: &str, redirect_uri: &str) -> Result<String, String> {
        let mut state = self.state();
        let client = state
            .clients
            .get(client_id)
            .ok_or_else(|| format!("unknown client {client_id}"))?;
        if !client.redirect_uris.iter().any(|uri| uri == redirect_uri) {
            return Err(format!("redirect_uri {redirect_uri} is not registered"));
        }
        let scopes = client.scopes.clone();
        Ok(state.issue_code(client_id, redirect_uri, scopes))
    }

    /// Does what the admin's browser does: GETs `authorize_url`, clicks Allow or Deny on the consent
    /// page, and returns the `Location` the provider redirects to. If the authorize request itself is
    /// answered with a redirect (e.g. `unsupported_response_type`), that `Location` is returned.
    pub async fn consent(&self, authorize_url: &str, decision: Decision) -> Result<String, String> {
        consent(authorize_url, decision).await
    }
}

/// [`FakeGoTo::consent`] for a caller that has only the URL, like a browser that is not in the
/// process that started the provider: everything it does goes over HTTP to `authorize_url`.
pub async fn consent(authorize_url: &str, decision: Decision) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("build HTTP client: {e}"))?;
    let page = client
        .get(authorize_url)
        .send()
        .await
        .map_err(|e| format!("GET authorize page: {e}"))?;
    if page.status() == reqwest::StatusCode::FOUND {
        return location_of(&page);
    }
    if page.status() != reqwest::StatusCode::OK {
        let status = page.status();
        let text = page.text().await.unwrap_or_default();
        return Err(format!("authorize page answered {status}: {text}"));
    }
    let page_url = page.url().clone();
    let html = page
        .text()
        .await
        .map_err(|e| format!("read authorize page: {e}"))?;
    let form = parse_consent_form(&html)?;
    let action = page_url
        .join(&form.action)
        .map_err(|e| format!("form action {}: {e}", form.action))?;
    let mut fields = form.hidden;
    fields.push(("decision".to_owned(), decision.as_str().to_owned()));
    let answer = client
        .post(action)
        .form(&fields)
        .send()
        .await
        .map_err(|e| format!("POST decision: {e}"))?;
    if answer.status() != reqwest::StatusCode::FOUND {
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        return Err(format!("decision answered {status}: {text}"));
    }
    location_of(&answer)
}

fn location_of(response: &reqwest::Response) -> Result<String, String> {
    response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| "redirect without a Location header".to_owned())
}

// ---------------------------------------------------------------------------------------------
// State

struct Shared {
    state: Mutex<ProviderState>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ProviderState> {
        // A panicking test thread must not turn every later assertion into a poison error.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    expires_at: Instant,
    used: bool,
}

struct RefreshGrant {
    client_id: String,
    scopes: Vec<String>,
    valid: bool,
    seq: u64,
}

struct PatGrant {
    client_id: String,
    valid: bool,
}

struct AccessGrant {
    client_id: String,
    expires_at: Instant,
    seq: u64,
}

struct RandomFaults {
    probability: f64,
    rng: StdRng,
}

struct ProviderState {
    config: FakeGoToConfig,
    account: Account,
    clients: HashMap<String, ClientRegistration>,
    codes: HashMap<String, CodeGrant>,
    refresh_tokens: HashMap<String, RefreshGrant>,
    access_tokens: HashMap<String, AccessGrant>,
    pats: HashMap<String, PatGrant>,
    seq: u64,
    faults: VecDeque<TokenFault>,
    random_faults: Option<RandomFaults>,
    rate_window: VecDeque<Instant>,
    rate_limited: u64,
    token_records: Vec<TokenRequestRecord>,
    authorize_records: Vec<AuthorizeRequestRecord>,
}

impl ProviderState {
    fn new(config: FakeGoToConfig) -> Self {
        Self {
            config,
            account: Account::default(),
            clients: HashMap::new(),
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
            access_tokens: HashMap::new(),
            pats: HashMap::new(),
            seq: 0,
            faults: VecDeque::new(),
            random_faults: None,
            rate_window: VecDeque::new(),
            rate_limited: 0,
            token_records: Vec::new(),
            authorize_records: Vec::new(),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn issue_code(&mut self, client_id: &str, redirect_uri: &str, scopes: Vec<String>) -> String {
        let code = random_string(&mut rand::rng(), URL_SAFE_ALPHABET, CODE_LEN);
        self.codes.insert(
            code.clone(),
            CodeGrant {
                client_id: client_id.to_owned(),
                redirect_uri: redirect_uri.to_owned(),
                scopes,
                expires_at: Instant::now() + CODE_TTL,
                used: false,
            },
        );
        code
    }

    /// Sliding one-second window over admitted requests.
    fn admit(&mut self, now: Instant) -> bool {
        let Some(limit) = self.config.rate_limit_per_second else {
            return true;
        };
        while let Some(oldest) = self.rate_window.front() {
            if now.saturating_duration_since(*oldest) >= Duration::from_secs(1) {
                self.rate_window.pop_front();
            } else {
                break;
            }
        }
        if self.rate_window.len() >= limit as usize {
            self.rate_limited += 1;
            return false;
        }
        self.rate_window.push_back(now);
        true
    }

    fn next_fault(&mut self) -> Option<(TokenFault, bool)> {
        if let Some(fault) = self.faults.pop_front() {
            return Some((fault, false));
        }
        let random = self.random_faults.as_mut()?;
        if !random.rng.random_bool(random.probability) {
            return None;
        }
        let fault = match random.rng.random_range(0..4u8) {
            0 => TokenFault::server_error_html(),
            1 => TokenFault::service_unavailable(),
            2 => TokenFault::too_many_requests(1),
            _ => TokenFault::Delay(Duration::from_millis(random.rng.random_range(20..=200))),
        };
        Some((fault, true))
    }

    fn issue_access_token(&mut self, client_id: &str, now: Instant) -> String {
        let token = jwt_like(self.config.token_len);
        let seq = self.next_seq();
        self.access_tokens.insert(
            token.clone(),
            AccessGrant {
                client_id: client_id.to_owned(),
                expires_at: now + Duration::from_secs(self.config.expires_in),
                seq,
            },
        );
        token
    }

    fn issue_refresh_token(&mut self, client_id: &str, scopes: &[String]) -> String {
        let token = jwt_like(self.config.token_len);
        let seq = self.next_seq();
        self.refresh_tokens.insert(
            token.clone(),
            RefreshGrant {
                client_id: client_id.to_owned(),
                scopes: scopes.to_vec(),
                valid: true,
                seq,
            },
        );
        token
    }

    fn add_identity_fields(&self, body: &mut Map<String, Value>, scopes: &[String]) {
        let style = self.config.response_style;
        let account = &self.account;
        if matches!(style, ResponseStyle::Legacy | ResponseStyle::Both) {
            body.insert("account_key".into(), json!(account.account_key));
            body.insert("account_type".into(), json!(account.account_type));
            body.insert("email".into(), json!(account.email));
            body.insert("firstName".into(), json!(account.first_name));
            body.insert("lastName".into(), json!(account.last_name));
            body.insert("organizer_key".into(), json!(account.organizer_key));
            body.insert("version".into(), json!("3"));
        }
        if matches!(style, ResponseStyle::Current | ResponseStyle::Both) {
            body.insert("scope".into(), json!(scopes.join(" ")));
            body.insert("principal".into(), json!(account.email));
        }
    }

    /// Processes a token request whose client has been authenticated.
    fn grant(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: Instant,
    ) -> Result<Value, ProviderError> {
        let grant_type = params
            .get("grant_type")
            .ok_or_else(|| ProviderError::invalid_request("grant_type is missing"))?;
        match grant_type.as_str() {
            "authorization_code" => self.exchange_code(client_id, params, now),
            "refresh_token" => self.refresh(client_id, params, now),
            "personal_access_token" => self.exchange_pat(client_id, params, now),
            _ => Err(ProviderError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "the grant type is not supported",
            )),
        }
    }

    fn exchange_code(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: Instant,
    ) -> Result<Value, ProviderError> {
        let code = params
            .get("code")
            .ok_or_else(|| ProviderError::invalid_request("code is missing"))?;
        // GoTo marks redirect_uri optional, but the authorization request always carries one and
        // RFC 6749 §4.1.3 then requires it; being strict catches an operator that forgets it.
        let redirect_uri = params
            .get("redirect_uri")
            .ok_or_else(|| ProviderError::invalid_request("redirect_uri is missing"))?;
        let grant = self
            .codes
            .get_mut(code)
            .ok_or_else(|| ProviderError::invalid_grant("the authorization code is unknown"))?;
        if grant.used {
            return Err(ProviderError::invalid_grant(
                "the authorization code has already been used",
            ));
        }
        if now >= grant.expires_at {
            return Err(ProviderError::invalid_grant(
                "the authorization code has expired",
            ));
        }
        if grant.client_id != client_id {
            return Err(ProviderError::invalid_grant(
                "the authorization code was issued to another client",
            ));
        }
        if &grant.redirect_uri != redirect_uri {
            return Err(ProviderError::invalid_grant(
                "redirect_uri does not match the authorization request",
            ));
        }
        // Consumed only on success: a rejected attempt leaves the code usable, like a fault does.
        grant.used = true;
        let scopes = grant.scopes.clone();
        let access_token = self.issue_access_token(client_id, now);
        let refresh_token = self.issue_refresh_token(client_id, &scopes);
        let mut body = Map::new();
        body.insert("access_token".into(), json!(access_token));
        body.insert("token_type".into(), json!("Bearer"));
        body.insert("refresh_token".into(), json!(refresh_token));
        body.insert("expires_in".into(), json!(self.config.expires_in));
        self.add_identity_fields(&mut body, &scopes);
        Ok(Value::Object(body))
    }

    /// The personal access token grant: the client's registered scopes, and a refresh token
    /// only in [`PatRefreshToken::Issue`] mode.
    fn exchange_pat(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: Instant,
    ) -> Result<Value, ProviderError> {
        let pat = params
            .get("pat")
            .ok_or_else(|| ProviderError::invalid_request("pat is missing"))?;
        self.pats
            .get(pat)
            .filter(|grant| grant.valid && grant.client_id == client_id)
            .ok_or_else(|| {
                ProviderError::invalid_grant("the personal access token is invalid or revoked")
            })?;
        let scopes = self
            .clients
            .get(client_id)
            .map(|c| c.scopes.clone())
            .unwrap_or_default();
        let access_token = self.issue_access_token(client_id, now);
        let mut body = Map::new();
        body.insert("access_token".into(), json!(access_token));
        body.insert("token_type".into(), json!("Bearer"));
        if self.config.pat_refresh_token == PatRefreshToken::Issue {
            let refresh_token = self.issue_refresh_token(client_id, &scopes);
            body.insert("refresh_token".into(), json!(refresh_token));
        }
        body.insert("expires_in".into(), json!(self.config.expires_in));
        self.add_identity_fields(&mut body, &scopes);
        Ok(Value::Object(body))
    }

    fn refresh(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: Instant,
    ) -> Result<Value, ProviderError> {
        let refresh_token = params
            .get("refresh_token")
            .ok_or_else(|| ProviderError::invalid_request("refresh_token is missing"))?;
        let grant = self
            .refresh_tokens
            .get_mut(refresh_token)
            .filter(|grant| grant.valid && grant.client_id == client_id)
            .ok_or_else(|| {
                ProviderError::invalid_grant("the refresh token is invalid, expired or revoked")
            })?;
        let rotate = self.config.rotation == RefreshTokenRotation::Always;
        let scopes = grant.scopes.clone();
        if rotate {
            grant.valid = false;
        }
        let access_token = self.issue_access_token(client_id, now);
        let mut body = Map::new();
        body.insert("access_token".into(), json!(access_token));
        if !self.config.omit_token_type_on_refresh {
            body.insert("token_type".into(), json!("Bearer"));
        }
        if rotate {
            let new_refresh = self.issue_refresh_token(client_id, &scopes);
            body.insert("refresh_token".into(), json!(new_refresh));
        }
        body.insert("expires_in".into(), json!(self.config.expires_in));
        self.add_identity_fields(&mut body, &scopes);
        Ok(Value::Object(body))
    }
}

// ---------------------------------------------------------------------------------------------
// Connections that a handler can drop without answering

/// Set by a handler to make hyper fail the connection before any response byte is written.
#[derive(Clone, Debug)]
struct ConnHandle(Arc<AtomicBool>);

struct KillableListener(TcpListener);

struct KillableStream {
    inner: TcpStream,
    killed: Arc<AtomicBool>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, addr)) => {
                    let _ = inner.set_nodelay(true);
                    let stream = KillableStream {
                        inner,
                        killed: Arc::new(AtomicBool::new(false)),
                    };
                    return (stream, addr);
                }
                // Accept errors (e.g. too many open files) are transient; back off briefly.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        ConnHandle(stream.io().killed.clone())
    }
}

impl KillableStream {
    fn check(&self) -> io::Result<()> {
        if self.killed.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "dropped by fault injection",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

struct ProviderError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl ProviderError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_request(description: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_grant(description: &str) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn invalid_client(description: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut response = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"oauth\""),
            );
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Counts a token request as in flight for as long as its handler future lives.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The parts of a token request the handler needs, parsed before anything else happens.
struct TokenRequest {
    params: HashMap<String, String>,
    /// A problem with the body that makes it an `invalid_request`.
    body_error: Option<&'static str>,
    basic: BasicAuth,
    /// The client id from the Basic header, when it decodes.
    header_client_id: Option<String>,
}

impl TokenRequest {
    fn parse(
        headers: &HeaderMap,
        body: &[u8],
        clients: &HashMap<String, ClientRegistration>,
    ) -> Self {
        let mut params = HashMap::new();
        let mut body_error = None;
        let is_form = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                value
                    .trim()
                    .to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            });
        if !is_form {
            body_error = Some("the body must be application/x-www-form-urlencoded");
        }
        for (name, value) in url::form_urlencoded::parse(body) {
            if params
                .insert(name.into_owned(), value.into_owned())
                .is_some()
            {
                body_error = Some("a parameter is repeated");
            }
        }
        let (basic, header_client_id) = classify_basic(headers, clients);
        Self {
            params,
            body_error,
            basic,
            header_client_id,
        }
    }

    fn record(&self, at: Instant, system_time: SystemTime, status: u16) -> TokenRequestRecord {
        TokenRequestRecord {
            grant_type: self.params.get("grant_type").cloned(),
            client_id: self
                .header_client_id
                .clone()
                .or_else(|| self.params.get("client_id").cloned()),
            redirect_uri: self.params.get("redirect_uri").cloned(),
            at,
            system_time,
            answered_at: SystemTime::now(),
            refresh_token_seq: None,
            status,
            basic_auth: self.basic,
            basic_header_well_formed: self.basic.is_well_formed(),
            secret_in_body: self.params.contains_key("client_secret"),
            outcome: TokenOutcome::Processed,
            error: None,
        }
    }
}

fn has_percent_escape(text: &str) -> bool {
    text.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
}

fn classify_basic(
    headers: &HeaderMap,
    clients: &HashMap<String, ClientRegistration>,
) -> (BasicAuth, Option<String>) {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return (BasicAuth::Missing, None);
    };
    let Ok(value) = value.to_str() else {
        return (BasicAuth::Malformed, None);
    };
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return (BasicAuth::Malformed, None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return (BasicAuth::Malformed, None);
    }
    let Ok(decoded) = STANDARD.decode(encoded.trim()) else {
        return (BasicAuth::Malformed, None);
    };
    let Ok(decoded) = String::from_utf8(decoded) else {
        return (BasicAuth::Malformed, None);
    };
    let Some((id, secret)) = decoded.split_once(':') else {
        return (BasicAuth::Malformed, None);
    };
    let id = id.to_owned();
    // GoTo secrets are base64 text and never contain '%': an escape means the client URL-encoded
    // the credentials first, which GoTo does not undo.
    if has_percent_escape(&id) || has_percent_escape(secret) {
        return (BasicAuth::UrlEncoded, Some(id));
    }
    match clients.get(&id) {
        None => (BasicAuth::UnknownClient, Some(id)),
        Some(client) if client.client_secret.as_bytes() != secret.as_bytes() => {
            (BasicAuth::WrongSecret, Some(id))
        }
        Some(_) => (BasicAuth::Valid, Some(id)),
    }
}

async fn token(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnHandle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let at = Instant::now();
    let system_time = SystemTime::now();

    let (request, fault) = {
        let mut state = shared.lock();
        let request = TokenRequest::parse(&headers, &body, &state.clients);
        if !state.admit(at) {
            let mut record = request.record(at, system_time, 429);
            record.outcome = TokenOutcome::RateLimited;
            record.error = Some("too_many_requests".to_owned());
            state.token_records.push(record);
            return ProviderError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "rate limit exceeded: at most the configured number of requests per second",
            )
            .into_response();
        }
        (request, state.next_fault())
    };

    if let Some((fault, random)) = fault {
        let kind = fault.kind();
        let (response, status) = match fault {
            TokenFault::SlowResponse(delay) => {
                tokio::time::sleep(delay).await;
                return process_token(&shared, &request, at, system_time);
            }
            TokenFault::Delay(delay) => {
                tokio::time::sleep(delay).await;
                (
                    raw_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        "text/html; charset=utf-8",
                        "<html><body><h1>504 Gateway Time-out</h1></body></html>".to_owned(),
                        None,
                    ),
                    504,
                )
            }
            TokenFault::Status {
                status,
                body,
                content_type,
                retry_after,
            } => {
                let code =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (
                    raw_response(code, &content_type, body, retry_after),
                    code.as_u16(),
                )
            }
            TokenFault::OversizedBody(size) => (
                raw_response(
                    StatusCode::OK,
                    "application/json",
                    oversized_json(size),
                    None,
                ),
                200,
            ),
            TokenFault::NonJson => (
                raw_response(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    "<!DOCTYPE html><html><head><title>Sign in to GoTo</title></head>\
                     <body><form><input name=\"emailAddress\"></form></body></html>"
                        .to_owned(),
                    None,
                ),
                200,
            ),
            TokenFault::Drop => {
                conn.0.store(true, Ordering::SeqCst);
                (StatusCode::BAD_GATEWAY.into_response(), 0)
            }
        };
        let mut record = request.record(at, system_time, status);
        record.outcome = TokenOutcome::Fault { kind, random };
        shared.lock().token_records.push(record);
        return response;
    }

    process_token(&shared, &request, at, system_time)
}

fn process_token(
    shared: &Shared,
    request: &TokenRequest,
    at: Instant,
    system_time: SystemTime,
) -> Response {
    let mut state = shared.lock();
    let refresh_token_seq = match request.params.get("grant_type").map(String::as_str) {
        Some("refresh_token") => request
            .params
            .get("refresh_token")
            .and_then(|token| state.refresh_tokens.get(token))
            .map(|grant| grant.seq),
        _ => None,
    };
    let result = authenticate(request).and_then(|client_id| {
        // Checked after authentication so a bad client always learns about its credentials first.
        if let Some(problem) = request.body_error {
            return Err(ProviderError::invalid_request(problem));
        }
        state.grant(&client_id, &request.params, Instant::now())
    });
    let (response, status, error) = match result {
        Ok(body) => (json_response(StatusCode::OK, &body), 200, None),
        Err(error) => {
            let status = error.status.as_u16();
            let code = error.error.to_owned();
            (error.into_response(), status, Some(code))
        }
    };
    let mut record = request.record(at, system_time, status);
    record.error = error;
    record.refresh_token_seq = refresh_token_seq;
    state.token_records.push(record);
    response
}

fn authenticate(request: &TokenRequest) -> Result<String, ProviderError> {
    let secret_in_body = request.params.contains_key("client_secret");
    match request.basic {
        BasicAuth::Valid => {
            if secret_in_body {
                // RFC 6749 §2.3: a client MUST NOT use more than one authentication method.
                return Err(ProviderError::invalid_request(
                    "client credentials must be sent only in the Authorization header",
                ));
            }
            request
                .header_client_id
                .clone()
                .ok_or_else(|| ProviderError::invalid_client("client authentication failed"))
        }
        BasicAuth::Missing if secret_in_body || request.params.contains_key("client_id") => {
            Err(ProviderError::invalid_client(
                "client credentials must be sent in an HTTP Basic Authorization header",
            ))
        }
        BasicAuth::Missing => Err(ProviderError::invalid_client(
            "client authentication by HTTP Basic is required",
        )),
        BasicAuth::Malformed => Err(ProviderError::invalid_client(
            "the Authorization header is not Basic base64(clientId:clientSecret)",
        )),
        BasicAuth::UrlEncoded | BasicAuth::UnknownClient | BasicAuth::WrongSecret => Err(
            ProviderError::invalid_client("client authentication failed"),
        ),
    }
}

fn raw_response(
    status: StatusCode,
    content_type: &str,
    body: String,
    retry_after: Option<u64>,
) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(secs) = retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// A valid JSON object of exactly `size` bytes (when `size` allows) that carries no token.
fn oversized_json(size: usize) -> String {
    const HEAD: &str = "{\"padding\":\"";
    const TAIL: &str = "\"}";
    let fill = size.saturating_sub(HEAD.len() + TAIL.len());
    let mut body = String::with_capacity(HEAD.len() + fill + TAIL.len());
    body.push_str(HEAD);
    body.extend(std::iter::repeat_n('x', fill));
    body.push_str(TAIL);
    body
}

// ---------------------------------------------------------------------------------------------
// Authorization endpoint and consent page

fn query_params(raw: Option<&str>) -> HashMap<String, String> {
    // The first occurrence wins, as in most servers; repeated parameters are not a case worth modelling.
    let mut params = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        params
            .entry(name.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    params
}

fn html_page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;background:#f4f5f7;margin:0}}\
         .card{{max-width:420px;margin:60px auto;background:#fff;border-radius:8px;padding:32px;\
         box-shadow:0 2px 8px rgba(0,0,0,.1)}}h1{{font-size:22px}}\
         button{{font-size:16px;padding:10px 24px;margin-right:12px;border-radius:4px;border:1px solid #999}}\
         #allow{{background:#0052cc;color:#fff;border-color:#0052cc}}</style></head>\
         <body><div class=\"card\"><div class=\"brand\">GoTo</div>{body}</div></body></html>\n",
        title = escape_html(title),
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error_page(message: &str) -> Response {
    html_page(
        StatusCode::BAD_REQUEST,
        "Error - GoTo",
        &format!(
            "<h1>Something went wrong</h1><p id=\"error\">{}</p>",
            escape_html(message)
        ),
    )
}

/// Appends `params` to `redirect_uri` (with `&` if it already has a query), percent-encoding values
/// so that any callback parser reads them back byte for byte.
fn redirect_with(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let mut location = redirect_uri.to_owned();
    let mut separator = if redirect_uri.contains('?') { '&' } else { '?' };
    for (name, value) in params {
        location.push(separator);
        location.push_str(&percent_encode(name));
        location.push('=');
        location.push_str(&percent_encode(value));
        separator = '&';
    }
    let mut response = StatusCode::FOUND.into_response();
    let headers = response.headers_mut();
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            headers.insert(LOCATION, value);
        }
        Err(_) => return error_page("the redirect URI cannot be used in a Location header"),
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Form-urlencoding, but with `%20` for a space: `+` would be read back as `+` by a plain
/// percent-decoder.
fn percent_encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn unescape_html(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Requested ∩ registered scopes, in the order requested; all registered scopes when none are
/// requested ("Only the scopes set in your OAuth client will be requested").
fn granted_scopes(requested: Option<&str>, registered: &[String]) -> Vec<String> {
    match requested {
        None => registered.to_vec(),
        Some(requested) => {
            let mut granted: Vec<String> = Vec::new();
            for scope in requested.split(' ').filter(|s| !s.is_empty()) {
                if registered.iter().any(|r| r == scope) && !granted.iter().any(|g| g == scope) {
                    granted.push(scope.to_owned());
                }
            }
            granted
        }
    }
}

/// A validated authorization request, or the response that refuses it.
struct AuthorizeRequest {
    client: ClientRegistration,
    redirect_uri: String,
    state: Option<String>,
    scopes: Vec<String>,
}

fn validate_authorize(
    state: &ProviderState,
    params: &HashMap<String, String>,
) -> Result<AuthorizeRequest, Box<Response>> {
    let client = params
        .get("client_id")
        .and_then(|id| state.clients.get(id))
        .ok_or_else(|| Box::new(error_page("The client_id is missing or unknown.")))?;
    let redirect_uri = params
        .get("redirect_uri")
        .filter(|uri| client.redirect_uris.iter().any(|r| r == *uri))
        .ok_or_else(|| {
            Box::new(error_page(
                "The redirect_uri is missing or not registered for this client.",
            ))
        })?;
    // From here on errors go back to the (registered) client, as RFC 6749 §4.1.2.1 says.
    let oauth_state = params.get("state").cloned();
    let with_state = |mut pairs: Vec<(&'static str, String)>| {
        if let Some(s) = &oauth_state {
            pairs.push(("state", s.clone()));
        }
        pairs
    };
    match params.get("response_type").map(String::as_str) {
        Some("code") => {}
        Some(_) => {
            let pairs = with_state(vec![
                ("error", "unsupported_response_type".to_owned()),
                (
                    "error_description",
                    "only response_type=code is supported".to_owned(),
                ),
            ]);
            return Err(Box::new(redirect_pairs(redirect_uri, &pairs)));
        }
        None => {
            let pairs = with_state(vec![
                ("error", "invalid_request".to_owned()),
                ("error_description", "response_type is missing".to_owned()),
            ]);
            return Err(Box::new(redirect_pairs(redirect_uri, &pairs)));
        }
    }
    Ok(AuthorizeRequest {
        scopes: granted_scopes(params.get("scope").map(String::as_str), &client.scopes),
        client: client.clone(),
        redirect_uri: redirect_uri.clone(),
        state: oauth_state,
    })
}

fn redirect_pairs(redirect_uri: &str, pairs: &[(&'static str, String)]) -> Response {
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
    redirect_with(redirect_uri, &borrowed)
}

async fn authorize(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    let params = query_params(query.as_deref());
    let mut state = shared.lock();
    let validated = validate_authorize(&state, &params);
    let response = match validated {
        Err(response) => *response,
        Ok(request) => consent_page(&request, &state.account, params.get("scope")),
    };
    state.authorize_records.push(AuthorizeRequestRecord {
        client_id: params.get("client_id").cloned(),
        redirect_uri: params.get("redirect_uri").cloned(),
        response_type: params.get("response_type").cloned(),
        scope: params.get("scope").cloned(),
        state_present: params.contains_key("state"),
        at: Instant::now(),
        system_time: SystemTime::now(),
        status: response.status().as_u16(),
    });
    response
}

fn consent_page(
    request: &AuthorizeRequest,
    account: &Account,
    raw_scope: Option<&String>,
) -> Response {
    let hidden = |name: &str, value: &str| {
        format!(
            "<input type=\"hidden\" name=\"{}\" value=\"{}\">\n",
            escape_html(name),
            escape_html(value)
        )
    };
    let mut fields = String::new();
    fields.push_str(&hidden("client_id", &request.client.client_id));
    fields.push_str(&hidden("redirect_uri", &request.redirect_uri));
    fields.push_str(&hidden("response_type", "code"));
    if let Some(state) = &request.state {
        fields.push_str(&hidden("state", state));
    }
    if let Some(scope) = raw_scope {
        fields.push_str(&hidden("scope", scope));
    }
    let scopes: String = if request.scopes.is_empty() {
        "<li>(no scopes)</li>".to_owned()
    } else {
        request
            .scopes
            .iter()
            .map(|s| format!("<li class=\"scope\">{}</li>", escape_html(s)))
            .collect()
    };
    let body = format!(
        "<h1>Sign in to GoTo</h1>\
         <p>Signed in as <strong id=\"account\">{email}</strong></p>\
         <p><strong id=\"client-name\">{name}</strong> would like to access your GoTo account:</p>\
         <ul id=\"scopes\">{scopes}</ul>\
         <form id=\"consent\" method=\"post\" action=\"{action}\">\n{fields}\
         <button type=\"submit\" id=\"allow\" name=\"decision\" value=\"allow\">Allow</button>\
         <button type=\"submit\" id=\"deny\" name=\"decision\" value=\"deny\">Deny</button>\
         </form>",
        email = escape_html(&account.email),
        name = escape_html(&request.client.name),
        action = DECISION_PATH,
    );
    html_page(StatusCode::OK, "Sign in to GoTo", &body)
}

async fn decide(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let mut params = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(&body) {
        params
            .entry(name.into_owned())
            .or_insert_with(|| value.into_owned());
    }
    let mut state = shared.lock();
    // The hidden fields come back from the browser: validate them again so a tampered form can
    // never redirect to an unregistered URI.
    let request = match validate_authorize(&state, &params) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let state_param = request.state.as_deref();
    match params.get("decision").map(String::as_str) {
        Some("allow") => {
            let code = state.issue_code(
                &request.client.client_id,
                &request.redirect_uri,
                request.scopes.clone(),
            );
            let mut pairs = vec![("code", code.as_str())];
            if let Some(s) = state_param {
                pairs.push(("state", s));
            }
            redirect_with(&request.redirect_uri, &pairs)
        }
        Some("deny") => {
            let mut pairs = vec![
                ("error", "access_denied"),
                ("error_description", "The user denied the request"),
            ];
            if let Some(s) = state_param {
                pairs.push(("state", s));
            }
            redirect_with(&request.redirect_uri, &pairs)
        }
        _ => error_page("decision must be allow or deny"),
    }
}

/// The consent form as the headless browser sees it.
struct ConsentForm {
    action: String,
    hidden: Vec<(String, String)>,
}

/// Reads the form this module renders (not a general HTML parser).
fn parse_consent_form(html: &str) -> Result<ConsentForm, String> {
    let form_start = html
        .find("<form")
        .ok_or_else(|| "no form on the consent page".to_owned())?;
    let form_html = &html[form_start..];
    let action = attribute(form_html, "action")
        .ok_or_else(|| "the consent form has no action".to_owned())?;
    let mut hidden = Vec::new();
    let mut rest = form_html;
    while let Some(pos) = rest.find("<input") {
        let tag_end = rest[pos..]
            .find('>')
            .ok_or_else(|| "unterminated input tag".to_owned())?;
        let tag = &rest[pos..pos + tag_end];
        if attribute(tag, "type").as_deref() == Some("hidden") {
            let name =
                attribute(tag, "name").ok_or_else(|| "hidden input without name".to_owned())?;
            hidden.push((name, attribute(tag, "value").unwrap_or_default()));
        }
        rest = &rest[pos + tag_end..];
    }
    if !form_html.contains("id=\"allow\"") || !form_html.contains("id=\"deny\"") {
        return Err("the consent form lacks the Allow/Deny buttons".to_owned());
    }
    Ok(ConsentForm { action, hidden })
}

/// The unescaped value of `name="..."` in the first tag of `tag`.
fn attribute(tag: &str, name: &str) -> Option<String> {
    let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let end = tag[start..].find('"')?;
    Some(unescape_html(&tag[start..start + end]))
}

// ---------------------------------------------------------------------------------------------
// Random values

fn random_string(rng: &mut impl Rng, alphabet: &[u8], len: usize) -> String {
    (0..len)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}

/// A random URL-safe string shaped like GoTo's tokens (a JWT: `eyJraWQiOiJvYXV0aHYyLmxt...`).
fn jwt_like(len: usize) -> String {
    // A JWT's shape: three base64url encodings (header, payload, signature), `len` characters
    // in all; the payload and signature bytes are random. No encoding is 1 modulo 4 long.
    let mut rng = rand::rng();
    let header = URL_SAFE_NO_PAD.encode(br#"{"kid":"oauthv2.lmi.com.0219","alg":"RS512"}"#);
    let remaining = len.saturating_sub(header.len() + 2);
    let payload_len = (0..=remaining * 2 / 3)
        .rev()
        .find(|p| p % 4 != 1 && (remaining - p) % 4 != 1)
        .unwrap_or(0);
    let mut random_bytes = |chars: usize| {
        let mut bytes = vec![0u8; chars * 3 / 4];
        rng.fill_bytes(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    };
    let payload = random_bytes(payload_len);
    let signature = random_bytes(remaining - payload_len);
    format!("{header}.{payload}.{signature}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::join_all;
    use std::collections::HashSet;

    const CALLBACK: &str = "http://127.0.0.1:9/oauth/callback";

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap()
    }

    fn plain_basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    /// What RFC 6749 §2.3.1 libraries (e.g. the `oauth2` crate) send.
    fn rfc_basic(id: &str, secret: &str) -> String {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
        )
    }

    fn no_limit() -> FakeGoToConfig {
        FakeGoToConfig {
            rate_limit_per_second: None,
            ..FakeGoToConfig::default()
        }
    }

    async fn setup(config: FakeGoToConfig) -> (FakeGoTo, ClientRegistration) {
        let fake = FakeGoTo::start(config).await;
        let client = ClientRegistration::sample(CALLBACK);
        fake.register_client(client.clone());
        (fake, client)
    }

    fn authorize_url(
        fake: &FakeGoTo,
        client_id: &str,
        redirect_uri: &str,
        state: &str,
        scope: Option<&str>,
    ) -> String {
        let mut url = url::Url::parse(&fake.authorize_url()).unwrap();
        url.query_pairs_mut()
            .append_pair("client_id", client_id)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", state);
        if let Some(scope) = scope {
            url.query_pairs_mut().append_pair("scope", scope);
        }
        url.to_string()
    }

    fn query_of(location: &str) -> HashMap<String, String> {
        url::Url::parse(location)
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    async fn code_for(fake: &FakeGoTo, client: &ClientRegistration) -> String {
        let url = authorize_url(fake, &client.client_id, CALLBACK, "st", None);
        let location = fake.consent(&url, Decision::Allow).await.unwrap();
        query_of(&location)["code"].clone()
    }

    struct Answer {
        status: u16,
        headers: reqwest::header::HeaderMap,
        text: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).unwrap()
        }
        fn error(&self) -> String {
            self.json()["error"].as_str().unwrap().to_owned()
        }
    }

    async fn post_token(fake: &FakeGoTo, auth: Option<String>, params: &[(&str, &str)]) -> Answer {
        let mut request = http().post(fake.token_url()).form(params);
        if let Some(auth) = auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let response = request.send().await.unwrap();
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        }
    }

    async fn exchange(
        fake: &FakeGoTo,
        client: &ClientRegistration,
        code: &str,
        redirect_uri: &str,
    ) -> Answer {
        post_token(
            fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
            ],
        )
        .await
    }

    async fn refresh(fake: &FakeGoTo, client: &ClientRegistration, refresh_token: &str) -> Answer {
        post_token(
            fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ],
        )
        .await
    }

    /// Authorizes and exchanges the code; returns the refresh token.
    async fn authorized(fake: &FakeGoTo, client: &ClientRegistration) -> String {
        let code = code_for(fake, client).await;
        let answer = exchange(fake, client, &code, CALLBACK).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        answer.json()["refresh_token"].as_str().unwrap().to_owned()
    }

    #[test]
    fn sample_secret_has_the_characters_url_encoding_changes() {
        let secret = sample_client_secret();
        assert!(secret.contains('+') && secret.contains('/') && secret.ends_with("=="));
        assert_eq!(secret.len(), 24);
        let client = ClientRegistration::sample(CALLBACK);
        assert!(!format!("{client:?}").contains(&client.client_secret));
    }

    #[tokio::test]
    async fn consent_page_shows_client_scopes_account_and_both_buttons() {
        let (fake, mut client) = setup(no_limit()).await;
        client.name = "Keeper <b>&</b>".to_owned();
        fake.register_client(client.clone());
        let state = "\"><script>alert(1)</script>";
        let url = authorize_url(
            &fake,
            &client.client_id,
            CALLBACK,
            state,
            Some("identity: not.registered"),
        );
        let response = http().get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let html = response.text().await.unwrap();
        assert!(html.contains("Sign in to GoTo"));
        assert!(html.contains("id=\"allow\" name=\"decision\" value=\"allow\""));
        assert!(html.contains("id=\"deny\" name=\"decision\" value=\"deny\""));
        assert!(html.contains(&format!("action=\"{DECISION_PATH}\"")));
        assert!(html.contains("Keeper &lt;b&gt;&amp;&lt;/b&gt;"));
        assert!(html.contains("mister.jones@fakemail.com"));
        assert!(html.contains("<li class=\"scope\">identity:</li>"));
        assert!(!html.contains("<li class=\"scope\">not.registered</li>"));
        assert!(!html.contains("<script>"), "state must be HTML-escaped");
        let form = parse_consent_form(&html).unwrap();
        assert!(
            form.hidden
                .contains(&("state".to_owned(), state.to_owned()))
        );
        assert!(
            form.hidden
                .contains(&("redirect_uri".to_owned(), CALLBACK.to_owned()))
        );
        let records = fake.authorize_requests();
        assert_eq!(records.len(), 1);
        assert!(records[0].state_present);
        assert_eq!(records[0].status, 200);
    }

    #[tokio::test]
    async fn allow_redirects_with_a_long_code_and_the_exact_state() {
        let (fake, mut client) = setup(no_limit()).await;
        let with_query = "http://127.0.0.1:9/cb?tenant=a%20b";
        client.redirect_uris.push(with_query.to_owned());
        fake.register_client(client.clone());
        let state = "s p+a/c=e&é?#";
        let url = authorize_url(
            &fake,
            &client.client_id,
            with_query,
            state,
            Some("identity: unknown"),
        );
        let location = fake.consent(&url, Decision::Allow).await.unwrap();
        assert!(
            location.starts_with("http://127.0.0.1:9/cb?tenant=a%20b&code="),
            "{location}"
        );
        let query = query_of(&location);
        assert_eq!(query["state"], state);
        assert_eq!(query["tenant"], "a b");
        let code = &query["code"];
        assert!(code.len() >= 300);
        assert!(
            code.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );

        // The granted scopes are requested ∩ registered.
        let answer = exchange(&fake, &client, code, with_query).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.json()["scope"], "identity:");
    }

    #[tokio::test]
    async fn deny_redirects_with_access_denied_and_state() {
        let (fake, client) = setup(no_limit()).await;
        let url = authorize_url(&fake, &client.client_id, CALLBACK, "xyz 1", None);
        let location = fake.consent(&url, Decision::Deny).await.unwrap();
        assert!(location.starts_with(&format!("{CALLBACK}?error=access_denied&")));
        let query = query_of(&location);
        assert_eq!(query["state"], "xyz 1");
        assert!(!query.contains_key("code"));
        assert!(query.contains_key("error_description"));
    }

    #[tokio::test]
    async fn unknown_client_or_unregistered_redirect_uri_gets_an_error_page_never_a_redirect() {
        let (fake, client) = setup(no_limit()).await;
        let cases = [
            authorize_url(
                &fake,
                &client.client_id,
                "http://127.0.0.1:9/oauth/callback/",
                "s",
                None,
            ),
            authorize_url(
                &fake,
                &client.client_id,
                "http://evil.example/cb",
                "s",
                None,
            ),
            authorize_url(&fake, "no-such-client", CALLBACK, "s", None),
        ];
        for url in cases {
            let response = http().get(&url).send().await.unwrap();
            assert_eq!(response.status(), 400, "{url}");
            assert!(response.headers().get(LOCATION).is_none());
            assert!(fake.consent(&url, Decision::Allow).await.is_err());
        }
        // A tampered consent form is validated again.
        let response = http()
            .post(format!("{}{DECISION_PATH}", fake.base_url()))
            .form(&[
                ("client_id", client.client_id.as_str()),
                ("redirect_uri", "http://evil.example/cb"),
                ("response_type", "code"),
                ("decision", "allow"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert!(response.headers().get(LOCATION).is_none());
    }

    #[tokio::test]
    async fn unsupported_response_type_redirects_with_an_error() {
        let (fake, client) = setup(no_limit()).await;
        let url = authorize_url(&fake, &client.client_id, CALLBACK, "s1", None)
            .replace("response_type=code", "response_type=token");
        let location = fake.consent(&url, Decision::Allow).await.unwrap();
        let query = query_of(&location);
        assert_eq!(query["error"], "unsupported_response_type");
        assert_eq!(query["state"], "s1");
    }

    #[tokio::test]
    async fn code_exchange_returns_goto_shaped_tokens() {
        let (fake, client) = setup(no_limit()).await;
        let code = code_for(&fake, &client).await;
        let answer = exchange(&fake, &client, &code, CALLBACK).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert_eq!(answer.headers[CONTENT_TYPE], "application/json");
        assert_eq!(answer.headers[CACHE_CONTROL], "no-store");
        let body = answer.json();
        let access = body["access_token"].as_str().unwrap();
        let refresh_token = body["refresh_token"].as_str().unwrap();
        for token in [access, refresh_token] {
            assert_eq!(token.len(), 1024);
            assert!(token.starts_with("eyJ"));
            let segments: Vec<&str> = token.split('.').collect();
            assert_eq!(segments.len(), 3, "header, payload, signature");
            for segment in segments {
                let bytes = URL_SAFE_NO_PAD.decode(segment).expect("base64url");
                assert_eq!(URL_SAFE_NO_PAD.encode(bytes), segment);
            }
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            );
        }
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        for field in [
            "account_key",
            "account_type",
            "email",
            "firstName",
            "lastName",
            "organizer_key",
            "version",
            "scope",
            "principal",
        ] {
            assert!(body.get(field).is_some(), "missing {field}");
        }
        assert_eq!(body["version"], "3");
        assert_eq!(body["principal"], body["email"]);
        assert!(fake.is_access_token_live(access));
        assert_eq!(
            fake.live_access_tokens(&client.client_id),
            vec![access.to_owned()]
        );
        assert_eq!(
            fake.valid_refresh_token(&client.client_id).as_deref(),
            Some(refresh_token)
        );

        fake.set_response_style(ResponseStyle::Current);
        let answer = refresh(&fake, &client, refresh_token).await;
        let body = answer.json();
        assert!(body.get("email").is_none() && body.get("principal").is_some());
        fake.set_response_style(ResponseStyle::Legacy);
        let body = refresh(&fake, &client, refresh_token).await.json();
        assert!(body.get("email").is_some() && body.get("scope").is_none());
    }

    #[tokio::test]
    async fn code_is_single_use_bound_to_its_client_and_redirect_uri_and_expires() {
        let (fake, client) = setup(no_limit()).await;
        let other = ClientRegistration::sample(CALLBACK);
        fake.register_client(other.clone());
        let code = code_for(&fake, &client).await;

        let answer = exchange(&fake, &client, &code, "http://127.0.0.1:9/oauth/callback/").await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_grant".to_owned())
        );
        let answer = exchange(&fake, &other, &code, CALLBACK).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_grant".to_owned())
        );
        let answer = post_token(
            &fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &[("grant_type", "authorization_code"), ("code", &code)],
        )
        .await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_request".to_owned())
        );

        assert_eq!(exchange(&fake, &client, &code, CALLBACK).await.status, 200);
        let again = exchange(&fake, &client, &code, CALLBACK).await;
        assert_eq!(
            (again.status, again.error()),
            (400, "invalid_grant".to_owned())
        );
        assert_eq!(again.headers[CONTENT_TYPE], "application/json");
        assert_eq!(again.headers[CACHE_CONTROL], "no-store");

        let unknown = exchange(&fake, &client, "not-a-code", CALLBACK).await;
        assert_eq!(unknown.error(), "invalid_grant");

        let late = code_for(&fake, &client).await;
        fake.expire_all_codes();
        let answer = exchange(&fake, &client, &late, CALLBACK).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_grant".to_owned())
        );
    }

    #[test]
    fn code_expiry_and_rate_window_follow_the_tokio_clock() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut state = ProviderState::new(FakeGoToConfig::default());
            let client = ClientRegistration::sample(CALLBACK);
            state
                .clients
                .insert(client.client_id.clone(), client.clone());
            let code = state.issue_code(&client.client_id, CALLBACK, vec![]);
            let params: HashMap<String, String> = [
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", CALLBACK),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            tokio::time::advance(CODE_TTL).await;
            let error = state
                .grant(&client.client_id, &params, Instant::now())
                .unwrap_err();
            assert_eq!(error.error, "invalid_grant");
            let fresh = state.issue_code(&client.client_id, CALLBACK, vec![]);
            let mut params = params;
            params.insert("code".to_owned(), fresh);
            tokio::time::advance(CODE_TTL - Duration::from_secs(1)).await;
            assert!(
                state
                    .grant(&client.client_id, &params, Instant::now())
                    .is_ok()
            );

            let start = Instant::now();
            assert!((0..10).all(|_| state.admit(start)));
            assert!(!state.admit(start + Duration::from_millis(999)));
            assert!(state.admit(start + Duration::from_secs(1)));
            assert_eq!(state.rate_limited, 1);
        });
    }

    #[tokio::test]
    async fn url_encoded_basic_header_is_refused_and_the_plain_one_accepted() {
        let (fake, client) = setup(no_limit()).await;
        assert!(client.client_secret.contains('+'));
        let code = code_for(&fake, &client).await;
        let params = [
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", CALLBACK),
        ];

        let encoded = post_token(
            &fake,
            Some(rfc_basic(&client.client_id, &client.client_secret)),
            &params,
        )
        .await;
        assert_eq!(
            (encoded.status, encoded.error()),
            (401, "invalid_client".to_owned())
        );
        assert!(
            encoded.headers[WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );

        let wrong = post_token(&fake, Some(plain_basic(&client.client_id, "nope")), &params).await;
        assert_eq!(
            (wrong.status, wrong.error()),
            (401, "invalid_client".to_owned())
        );
        let missing = post_token(&fake, None, &params).await;
        assert_eq!(
            (missing.status, missing.error()),
            (401, "invalid_client".to_owned())
        );
        let mut in_body = params.to_vec();
        in_body.push(("client_id", &client.client_id));
        in_body.push(("client_secret", &client.client_secret));
        let body_creds = post_token(&fake, None, &in_body).await;
        assert_eq!(
            (body_creds.status, body_creds.error()),
            (401, "invalid_client".to_owned())
        );
        let garbage = post_token(&fake, Some("Basic !!!".to_owned()), &params).await;
        assert_eq!(garbage.status, 401);

        // None of those consumed the code.
        let plain = post_token(
            &fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &params,
        )
        .await;
        assert_eq!(plain.status, 200, "{}", plain.text);

        let kinds: Vec<BasicAuth> = fake.token_requests().iter().map(|r| r.basic_auth).collect();
        assert_eq!(
            kinds,
            [
                BasicAuth::UrlEncoded,
                BasicAuth::WrongSecret,
                BasicAuth::Missing,
                BasicAuth::Missing,
                BasicAuth::Malformed,
                BasicAuth::Valid
            ]
        );
        let records = fake.token_requests();
        assert!(!records[0].basic_header_well_formed && records[5].basic_header_well_formed);
        assert!(records[3].secret_in_body);
        assert_eq!(
            records[0].client_id.as_deref(),
            Some(client.client_id.as_str())
        );
    }

    #[tokio::test]
    async fn refresh_by_default_returns_neither_refresh_token_nor_token_type_and_the_old_one_stays_valid()
     {
        let (fake, client) = setup(no_limit()).await;
        let refresh_token = authorized(&fake, &client).await;
        let mut access_tokens = HashSet::new();
        for _ in 0..2 {
            let answer = refresh(&fake, &client, &refresh_token).await;
            assert_eq!(answer.status, 200, "{}", answer.text);
            let body = answer.json();
            assert!(body.get("refresh_token").is_none());
            assert!(body.get("token_type").is_none());
            assert_eq!(body["expires_in"], 3600);
            access_tokens.insert(body["access_token"].as_str().unwrap().to_owned());
        }
        assert_eq!(access_tokens.len(), 2);
        assert!(fake.is_refresh_token_valid(&refresh_token));
        assert_eq!(
            fake.valid_refresh_token(&client.client_id),
            Some(refresh_token.clone())
        );

        fake.set_omit_token_type_on_refresh(false);
        fake.set_expires_in(60);
        let body = refresh(&fake, &client, &refresh_token).await.json();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 60);
        let access = body["access_token"].as_str().unwrap();
        let ttl = fake.access_token_expires_at(access).unwrap() - Instant::now();
        assert!(ttl <= Duration::from_secs(60) && ttl > Duration::from_secs(50));
    }

    #[tokio::test]
    async fn always_rotation_invalidates_the_old_refresh_token_at_once() {
        let (fake, client) = setup(FakeGoToConfig {
            rotation: RefreshTokenRotation::Always,
            ..no_limit()
        })
        .await;
        let first = authorized(&fake, &client).await;
        let answer = refresh(&fake, &client, &first).await;
        assert_eq!(answer.status, 200);
        let second = answer.json()["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(first, second);
        assert!(!fake.is_refresh_token_valid(&first));
        let old = refresh(&fake, &client, &first).await;
        assert_eq!((old.status, old.error()), (400, "invalid_grant".to_owned()));
        assert_eq!(
            fake.valid_refresh_token(&client.client_id),
            Some(second.clone())
        );
        assert_eq!(refresh(&fake, &client, &second).await.status, 200);
    }

    #[tokio::test]
    async fn refresh_records_tell_which_refresh_token_was_presented_and_when_it_was_answered() {
        let (fake, client) = setup(FakeGoToConfig {
            rotation: RefreshTokenRotation::Always,
            ..no_limit()
        })
        .await;
        let first = authorized(&fake, &client).await;
        let second = refresh(&fake, &client, &first).await.json()["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        refresh(&fake, &client, &first).await; // reused: invalid_grant
        fake.push_token_fault(TokenFault::Delay(Duration::from_millis(50)));
        refresh(&fake, &client, &second).await; // faulted: never processed
        refresh(&fake, &client, "not-a-token").await;
        let records: Vec<TokenRequestRecord> = fake
            .token_requests()
            .into_iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .collect();
        let seqs: Vec<Option<u64>> = records.iter().map(|r| r.refresh_token_seq).collect();
        assert!(seqs[0].is_some());
        assert_eq!(seqs[1], seqs[0], "the reused token has the same number");
        assert_eq!(records[1].error.as_deref(), Some("invalid_grant"));
        assert_eq!(
            seqs[2], None,
            "a faulted request presented nothing GoTo looked at"
        );
        assert_eq!(seqs[3], None, "an unknown token has no number");
        assert!(records.iter().all(|r| r.answered_at >= r.system_time));
        assert!(
            records[2]
                .answered_at
                .duration_since(records[2].system_time)
                .unwrap()
                >= Duration::from_millis(50),
            "answered after the injected delay"
        );
    }

    #[tokio::test]
    async fn revoked_refresh_token_and_bad_requests_get_rfc_errors() {
        let (fake, client) = setup(no_limit()).await;
        let refresh_token = authorized(&fake, &client).await;
        fake.revoke_refresh_tokens(&client.client_id);
        let answer = refresh(&fake, &client, &refresh_token).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_grant".to_owned())
        );
        assert!(answer.json()["error_description"].is_string());
        assert_eq!(fake.valid_refresh_token(&client.client_id), None);

        let auth = Some(plain_basic(&client.client_id, &client.client_secret));
        let answer = post_token(&fake, auth.clone(), &[("grant_type", "password")]).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "unsupported_grant_type".to_owned())
        );
        let answer = post_token(&fake, auth.clone(), &[("code", "x")]).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_request".to_owned())
        );
        let answer = post_token(&fake, auth, &[("grant_type", "refresh_token")]).await;
        assert_eq!(
            (answer.status, answer.error()),
            (400, "invalid_request".to_owned())
        );
    }

    #[tokio::test]
    async fn rate_limit_answers_429_with_retry_after() {
        let (fake, _client) = setup(FakeGoToConfig {
            rate_limit_per_second: Some(2),
            ..FakeGoToConfig::default()
        })
        .await;
        let mut statuses = Vec::new();
        let mut last = None;
        for _ in 0..3 {
            let answer = post_token(&fake, None, &[("grant_type", "refresh_token")]).await;
            statuses.push(answer.status);
            last = Some(answer);
        }
        assert_eq!(statuses, [401, 401, 429]);
        let last = last.unwrap();
        assert_eq!(last.headers[RETRY_AFTER], "1");
        assert_eq!(last.headers[CONTENT_TYPE], "application/json");
        assert_eq!(last.error(), "too_many_requests");
        assert_eq!(fake.rate_limited_count(), 1);
        assert_eq!(fake.token_requests()[2].outcome, TokenOutcome::RateLimited);
    }

    #[tokio::test]
    async fn status_faults_answer_as_injected_and_consume_nothing() {
        let (fake, client) = setup(no_limit()).await;
        let code = code_for(&fake, &client).await;
        let faults = [
            (
                TokenFault::server_error_html(),
                500,
                "text/html; charset=utf-8",
                None,
            ),
            (
                TokenFault::service_unavailable(),
                503,
                "application/json",
                None,
            ),
            (TokenFault::invalid_grant(), 400, "application/json", None),
            (TokenFault::invalid_client(), 401, "application/json", None),
            (
                TokenFault::too_many_requests(7),
                429,
                "application/json",
                Some("7"),
            ),
            (TokenFault::NonJson, 200, "text/html; charset=utf-8", None),
        ];
        for (fault, ..) in &faults {
            fake.push_token_fault(fault.clone());
        }
        for (_, status, content_type, retry_after) in faults {
            let answer = exchange(&fake, &client, &code, CALLBACK).await;
            assert_eq!(answer.status, status);
            assert_eq!(answer.headers[CONTENT_TYPE], content_type);
            assert_eq!(
                answer.headers.get(RETRY_AFTER).map(|v| v.to_str().unwrap()),
                retry_after
            );
            assert!(
                serde_json::from_str::<Value>(&answer.text)
                    .map_or(true, |v| v.get("access_token").is_none())
            );
        }
        assert_eq!(fake.pending_token_faults(), 0);
        assert_eq!(exchange(&fake, &client, &code, CALLBACK).await.status, 200);
        let outcomes: Vec<TokenOutcome> = fake.token_requests().iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes[0],
            TokenOutcome::Fault {
                kind: FaultKind::Status(500),
                random: false
            }
        );
        assert_eq!(
            outcomes[5],
            TokenOutcome::Fault {
                kind: FaultKind::NonJson,
                random: false
            }
        );
        assert_eq!(outcomes[6], TokenOutcome::Processed);
    }

    #[tokio::test]
    async fn oversized_body_has_the_requested_size_and_no_token() {
        let (fake, client) = setup(no_limit()).await;
        let refresh_token = authorized(&fake, &client).await;
        fake.push_token_fault(TokenFault::OversizedBody(3 * 1024 * 1024));
        let answer = refresh(&fake, &client, &refresh_token).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text.len(), 3 * 1024 * 1024);
        assert!(answer.json().get("access_token").is_none());
    }

    #[tokio::test]
    async fn delay_fault_outlasts_a_client_timeout_and_consumes_nothing() {
        let (fake, client) = setup(FakeGoToConfig {
            rotation: RefreshTokenRotation::Always,
            ..no_limit()
        })
        .await;
        let refresh_token = authorized(&fake, &client).await;
        fake.push_token_fault(TokenFault::Delay(Duration::from_secs(30)));
        let result = http()
            .post(fake.token_url())
            .timeout(Duration::from_millis(200))
            .header(
                reqwest::header::AUTHORIZATION,
                plain_basic(&client.client_id, &client.client_secret),
            )
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token.as_str()),
            ])
            .send()
            .await;
        assert!(result.unwrap_err().is_timeout());
        assert!(fake.is_refresh_token_valid(&refresh_token));
        assert_eq!(refresh(&fake, &client, &refresh_token).await.status, 200);
    }

    #[tokio::test]
    async fn drop_fault_closes_the_connection_without_a_response() {
        let (fake, client) = setup(no_limit()).await;
        let code = code_for(&fake, &client).await;
        fake.push_token_fault(TokenFault::Drop);
        let result = http()
            .post(fake.token_url())
            .header(
                reqwest::header::AUTHORIZATION,
                plain_basic(&client.client_id, &client.client_secret),
            )
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", CALLBACK),
            ])
            .send()
            .await;
        let error = result.unwrap_err();
        assert!(!error.is_timeout() && error.status().is_none(), "{error:?}");
        assert_eq!(fake.token_requests()[0].status, 0);
        assert_eq!(exchange(&fake, &client, &code, CALLBACK).await.status, 200);
    }

    #[tokio::test]
    async fn slow_response_is_processed_after_the_delay() {
        let (fake, client) = setup(no_limit()).await;
        let code = code_for(&fake, &client).await;
        fake.push_token_fault(TokenFault::SlowResponse(Duration::from_millis(50)));
        let started = std::time::Instant::now();
        assert_eq!(exchange(&fake, &client, &code, CALLBACK).await.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(
            exchange(&fake, &client, &code, CALLBACK).await.error(),
            "invalid_grant"
        );
    }

    #[tokio::test]
    async fn concurrent_requests_are_counted_in_flight() {
        let (fake, client) = setup(no_limit()).await;
        for _ in 0..3 {
            fake.push_token_fault(TokenFault::Delay(Duration::from_millis(300)));
        }
        let answers = join_all((0..3).map(|_| refresh(&fake, &client, "x"))).await;
        assert!(answers.iter().all(|a| a.status == 504));
        assert_eq!(fake.max_in_flight(), 3);
        assert_eq!(fake.in_flight(), 0);
    }

    #[tokio::test]
    async fn random_faults_are_transient_and_never_lose_a_refresh_token() {
        let (fake, client) = setup(FakeGoToConfig {
            rotation: RefreshTokenRotation::Always,
            ..no_limit()
        })
        .await;
        let mut current = authorized(&fake, &client).await;
        fake.set_random_faults(0.5, 7);
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..16 {
            let answer = refresh(&fake, &client, &current).await;
            if answer.status == 200 {
                ok += 1;
                current = answer.json()["refresh_token"].as_str().unwrap().to_owned();
            } else {
                failed += 1;
                assert!(
                    [500, 503, 504, 429].contains(&answer.status),
                    "{}",
                    answer.status
                );
            }
            assert_eq!(
                fake.valid_refresh_token(&client.client_id),
                Some(current.clone())
            );
        }
        assert!(ok > 0 && failed > 0, "ok {ok} failed {failed}");
        let random = fake
            .token_requests()
            .iter()
            .filter(|r| matches!(r.outcome, TokenOutcome::Fault { random: true, .. }))
            .count();
        assert_eq!(random, failed);
    }

    #[tokio::test]
    async fn records_never_hold_codes_tokens_secrets_or_state() {
        let (fake, client) = setup(FakeGoToConfig {
            rotation: RefreshTokenRotation::Always,
            ..no_limit()
        })
        .await;
        let state = "csrf-state-value-123";
        let url = authorize_url(&fake, &client.client_id, CALLBACK, state, None);
        let code = query_of(&fake.consent(&url, Decision::Allow).await.unwrap())["code"].clone();
        let first = exchange(&fake, &client, &code, CALLBACK).await.json();
        let refresh_token = first["refresh_token"].as_str().unwrap().to_owned();
        let second = refresh(&fake, &client, &refresh_token).await.json();
        post_token(
            &fake,
            Some(rfc_basic(&client.client_id, &client.client_secret)),
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &refresh_token),
            ],
        )
        .await;
        let dump = format!("{:?}{:?}", fake.token_requests(), fake.authorize_requests());
        assert_eq!(fake.token_requests().len(), 3);
        let secrets = [
            code.as_str(),
            first["access_token"].as_str().unwrap(),
            refresh_token.as_str(),
            second["access_token"].as_str().unwrap(),
            second["refresh_token"].as_str().unwrap(),
            client.client_secret.as_str(),
            state,
        ];
        for secret in secrets {
            assert!(!dump.contains(secret));
        }
        assert!(dump.contains(&client.client_id));
    }

    #[tokio::test]
    async fn dropping_the_fake_stops_the_server() {
        let fake = FakeGoTo::start(no_limit()).await;
        let url = fake.token_url();
        drop(fake);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let result = reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .post(&url)
                .send()
                .await;
            if result.as_ref().err().is_some_and(|e| e.is_connect()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "server still answering"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn pat_grant(fake: &FakeGoTo, client: &ClientRegistration, pat: &str) -> Answer {
        post_token(
            fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &[("grant_type", "personal_access_token"), ("pat", pat)],
        )
        .await
    }

    #[tokio::test]
    async fn personal_access_token_grant_issues_tokens_with_or_without_a_refresh_token() {
        let (fake, client) = setup(no_limit()).await;
        let pat = sample_personal_access_token();
        fake.register_personal_access_token(&client.client_id, &pat);

        let answer = pat_grant(&fake, &client, &pat).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        let body = answer.json();
        let access = body["access_token"].as_str().unwrap();
        assert!(fake.is_access_token_live(access));
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], client.scopes.join(" "));
        let refresh_token = body["refresh_token"].as_str().unwrap().to_owned();
        assert!(fake.is_refresh_token_valid(&refresh_token));
        // The refresh token works like one from a consent.
        assert_eq!(refresh(&fake, &client, &refresh_token).await.status, 200);

        fake.set_pat_refresh_token(PatRefreshToken::Omit);
        let answer = pat_grant(&fake, &client, &pat).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(answer.json().get("refresh_token").is_none());
        assert!(answer.json()["access_token"].is_string());
        // A PAT is not used up: it works again.
        assert_eq!(pat_grant(&fake, &client, &pat).await.status, 200);
        let records = fake.token_requests();
        assert!(
            records
                .iter()
                .filter(|r| r.grant_type.as_deref() == Some("personal_access_token"))
                .all(|r| r.basic_header_well_formed && !r.secret_in_body)
        );
        // The records never hold the PAT.
        assert!(!format!("{records:?}").contains(&pat));
    }

    #[tokio::test]
    async fn unknown_revoked_or_foreign_personal_access_tokens_are_invalid_grant() {
        let (fake, client) = setup(no_limit()).await;
        let other = ClientRegistration::sample(CALLBACK);
        fake.register_client(other.clone());
        let pat = sample_personal_access_token();
        fake.register_personal_access_token(&client.client_id, &pat);

        let unknown = pat_grant(&fake, &client, &sample_personal_access_token()).await;
        assert_eq!(
            (unknown.status, unknown.error()),
            (400, "invalid_grant".into())
        );
        // Another client's PAT is not this client's.
        let foreign = pat_grant(&fake, &other, &pat).await;
        assert_eq!(
            (foreign.status, foreign.error()),
            (400, "invalid_grant".into())
        );
        // Without the pat parameter.
        let missing = post_token(
            &fake,
            Some(plain_basic(&client.client_id, &client.client_secret)),
            &[("grant_type", "personal_access_token")],
        )
        .await;
        assert_eq!(missing.error(), "invalid_request");
        // The client secret is checked first, as for every grant.
        let wrong = post_token(
            &fake,
            Some(plain_basic(&client.client_id, "wrong")),
            &[("grant_type", "personal_access_token"), ("pat", &pat)],
        )
        .await;
        assert_eq!(wrong.error(), "invalid_client");

        assert_eq!(pat_grant(&fake, &client, &pat).await.status, 200);
        fake.revoke_personal_access_token(&pat);
        let revoked = pat_grant(&fake, &client, &pat).await;
        assert_eq!(
            (revoked.status, revoked.error()),
            (400, "invalid_grant".into())
        );
        // Registered again (rotated back), it works.
        fake.register_personal_access_token(&client.client_id, &pat);
        assert_eq!(pat_grant(&fake, &client, &pat).await.status, 200);
    }
}
