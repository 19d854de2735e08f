//! Talking to GoTo: one [`GoTo`] client owns the HTTP client for the token endpoint, the
//! operator-wide rate limiter and the token-request metrics, so no caller can send a token
//! request that skips the limit or goes unmeasured.
//!
//! [`protocol`] is the wire format (what is sent, how answers are classified); this module adds
//! the policy around it. A request needs a [`Permit`]: a code exchange waits for one with
//! [`GoTo::permit_for_code_exchange`] (ahead of every refresh), a refresh asks for its
//! [`GoTo::turn`] (earliest-expiring first; when it must wait, it is woken when its turn comes).
//! A caller that must check something right before sending (the leader Lease) does it between
//! the permit and the request. Each request method reports GoTo's answer to the limiter, so a
//! 429 slows every later request down and no caller can forget to say so.
//!
//! `limiter` is the pace (the window, the adaptive rate, the pauses); `queue` decides who
//! goes next.

mod limiter;
pub mod protocol;
mod queue;

use std::{sync::Arc, time::Duration};

use jiff::Timestamp;

use crate::metrics::{GrantType, Metrics, TokenRequestLabels};

use limiter::Answer;
pub use protocol::{ClientCredentials, OAuthError, TokenResponse};
pub(crate) use queue::{Permit, Turn};

/// The token-endpoint client every refresh, code exchange and personal access token exchange
/// goes through.
pub(crate) struct GoTo {
    http: protocol::TokenClient,
    limiter: queue::Limiter,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for GoTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoTo").finish_non_exhaustive()
    }
}

impl GoTo {
    /// `timeout` bounds each request; `per_second` is the limit over all clients (lowered for a
    /// while after a 429), `max_in_flight` the most requests under way at once.
    pub(crate) fn new(
        timeout: Duration,
        per_second: u32,
        max_in_flight: u32,
        metrics: Arc<Metrics>,
    ) -> Result<GoTo, OAuthError> {
        Ok(GoTo {
            http: protocol::TokenClient::new(timeout)?,
            limiter: queue::Limiter::new(per_second, max_in_flight, metrics.clone()),
            metrics,
        })
    }

    /// Waits for a permit for a code exchange: a human waits in the browser, so it goes ahead
    /// of every refresh.
    pub(crate) async fn permit_for_code_exchange(&self) -> Permit {
        self.limiter.interactive().await
    }

    /// A refresh's (or personal access token exchange's) turn for the client `uid` whose
    /// access token expires at `expires_at`: [`Turn::Now`] with a permit, or [`Turn::Queued`]
    /// and a call of `wake` when the turn is granted; the client then calls again (within a few
    /// seconds, or the grant lapses) and gets the permit.
    pub(crate) fn turn(
        &self,
        uid: &str,
        expires_at: Timestamp,
        wake: impl FnOnce() + Send + 'static,
    ) -> Turn {
        self.limiter.turn(uid, expires_at, wake)
    }

    /// Forgets the turn of a client that is gone.
    pub(crate) fn forget(&self, uid: &str) {
        self.limiter.forget(uid);
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

    /// Reports the answer to the limiter and the metrics.
    fn observe(
        &self,
        permit: Permit,
        grant_type: GrantType,
        response: &Result<TokenResponse, OAuthError>,
        started: std::time::Instant,
    ) {
        permit.answered(match response {
            Err(OAuthError::RateLimited { retry_after }) => Answer::RateLimited {
                retry_after: *retry_after,
            },
            _ => Answer::Other,
        });
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
