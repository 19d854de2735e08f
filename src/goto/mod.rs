//! Talking to GoTo: one [`GoTo`] client owns the HTTP client for the token endpoint, the
//! operator-wide rate limiter and the token-request metrics, so no caller can send a token
//! request that skips the limit or goes unmeasured.
//!
//! [`protocol`] is the wire format (what is sent, how answers are classified); this module adds
//! the policy around it. A request needs a [`Permit`] from [`GoTo::permit`], so a caller that
//! must check something right before sending (the leader Lease) does it between the wait for
//! the limiter and the request.

mod limiter;
pub mod protocol;

use std::{sync::Arc, time::Duration};

use crate::metrics::{GrantType, Metrics, TokenRequestLabels};

pub(crate) use limiter::Permit;
use limiter::RateLimiter;
pub use protocol::{ClientCredentials, OAuthError, TokenResponse};

/// The token-endpoint client every refresh, code exchange and personal access token exchange
/// goes through.
pub(crate) struct GoTo {
    http: protocol::TokenClient,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GoTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoTo").finish_non_exhaustive()
    }
}

impl GoTo {
    /// `timeout` bounds each request; `per_second` is the limit over all clients.
    pub(crate) fn new(
        timeout: Duration,
        per_second: u32,
        metrics: Arc<Metrics>,
    ) -> Result<GoTo, OAuthError> {
        let goto = GoTo {
            http: protocol::TokenClient::new(timeout)?,
            limiter: RateLimiter::new(per_second),
            metrics,
        };
        goto.show_rate();
        Ok(goto)
    }

    /// Sets `goto_oauth_token_rate_limit_per_second`: the rate as of the last token request
    /// (the limiter climbs back lazily, when asked).
    fn show_rate(&self) {
        self.metrics
            .token_rate_limit
            .set(i64::from(self.limiter.rate()));
    }

    /// Waits until a request may be sent within the rate limit. The permit counts until the
    /// request it was for is answered (see [`limiter`]).
    pub(crate) async fn permit(&self) -> Permit {
        let permit = self.limiter.acquire().await;
        self.show_rate();
        permit
    }

    /// Exchanges an authorization code (once: GoTo rejects a second exchange of the same code).
    pub(crate) async fn exchange_code(
        &self,
        permit: Permit,
        token_url: &str,
        creds: &ClientCredentials,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let started = std::time::Instant::now();
        let response = self
            .http
            .exchange_code(token_url, creds, code, redirect_uri)
            .await;
        self.observe(permit, GrantType::AuthorizationCode, &response, started);
        response
    }

    /// Uses a refresh token.
    pub(crate) async fn refresh(
        &self,
        permit: Permit,
        token_url: &str,
        creds: &ClientCredentials,
        refresh_token: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let started = std::time::Instant::now();
        let response = self.http.refresh(token_url, creds, refresh_token).await;
        self.observe(permit, GrantType::RefreshToken, &response, started);
        response
    }

    /// Exchanges a personal access token for tokens (GoTo's grant without a browser).
    pub(crate) async fn exchange_personal_access_token(
        &self,
        permit: Permit,
        token_url: &str,
        creds: &ClientCredentials,
        pat: &str,
    ) -> Result<TokenResponse, OAuthError> {
        let started = std::time::Instant::now();
        let response = self
            .http
            .exchange_personal_access_token(token_url, creds, pat)
            .await;
        self.observe(permit, GrantType::PersonalAccessToken, &response, started);
        response
    }

    /// Records the answer: with the limiter (a 429 lowers the rate) and in the metrics.
    fn observe(
        &self,
        permit: Permit,
        grant_type: GrantType,
        response: &Result<TokenResponse, OAuthError>,
        started: std::time::Instant,
    ) {
        if permit.answered(matches!(response, Err(OAuthError::RateLimited { .. }))) {
            self.metrics.token_rate_limit_decreases.inc();
        }
        self.show_rate();
        let result = match response {
            Ok(_) => "success",
            Err(e) => e.reason(),
        };
        self.metrics
            .token_request_duration
            .get_or_create(&TokenRequestLabels { grant_type, result })
            .observe(started.elapsed().as_secs_f64());
    }
}
