//! Bootstrap without a browser: GoTo's personal access token (PAT) grant end to end, against the
//! in-memory API server (or a real cluster, `GOTO_OAUTH_E2E_REAL_CLUSTER=1`) and the fake GoTo.
//!
//! Most tests run the operator in-process on a manual clock, so "the token is due" is a clock
//! move, not a wait; every absence ("no second exchange") is asserted after the controller went
//! quiet at the new time. The leak test runs the operator binary, whose log the harness keeps.

mod common;

use std::time::{Duration, Instant};

use common::{
    Cluster, DEADLINE, Provider, Stack, bind_callback, eventually, metrics::metric,
    operator::InProcessOperator,
};
use fake_goto::{FakeGoToConfig, PatRefreshToken, sample_personal_access_token};
use goto_oauth_operator::{
    clock::Clock,
    conditions::reason,
    resource::{GoToOAuthClient, TokenGrant},
};
use jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};

/// The Secret and key the test clients name in `spec.personalAccessTokenRef`.
const PAT_SECRET: &str = "goto-pat";
const PAT_KEY: &str = "personalAccessToken";
const PAT_GRANT: &str = "personal_access_token";

/// How long the controller must stay idle to count as settled.
const QUIET: Duration = Duration::from_millis(300);

/// One test's world: the API server, GoTo, the manual clock and an in-process operator.
struct Env {
    cluster: Cluster,
    provider: Provider,
    clock: Clock,
    op: InProcessOperator,
}

impl Env {
    async fn start(mode: PatRefreshToken) -> Env {
        let cluster = Cluster::start().await;
        let (listener, callback) = bind_callback().await;
        let config = FakeGoToConfig {
            pat_refresh_token: mode,
            ..FakeGoToConfig::default()
        };
        let provider = Provider::start(config, &callback).await;
        cluster
            .create_client_secret("creds", &provider.client_secret)
            .await;
        let now = Timestamp::from_second(Timestamp::now().as_second()).expect("now");
        let clock = Clock::manual(now);
        let options = provider.operator_options(&cluster, clock.clone());
        let op = InProcessOperator::start(cluster.client.clone(), listener, options)
            .await
            .expect("start in-process operator");
        Env {
            cluster,
            provider,
            clock,
            op,
        }
    }

    /// A new PAT that GoTo honours for the test's client.
    fn valid_pat(&self) -> String {
        let pat = sample_personal_access_token();
        self.provider
            .goto
            .register_personal_access_token(&self.provider.client_id, &pat);
        pat
    }

    async fn create_client(&self, name: &str) {
        self.cluster
            .create_client(
                name,
                self.provider
                    .spec(serde_json::json!({"personalAccessTokenRef": {"name": PAT_SECRET}})),
            )
            .await;
    }

    fn pat_grants(&self) -> usize {
        self.provider.grant_requests(PAT_GRANT)
    }

    async fn get(&self, name: &str) -> GoToOAuthClient {
        self.cluster.clients().get(name).await.expect("get client")
    }

    async fn ready(&self, name: &str) -> GoToOAuthClient {
        self.cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await
    }

    async fn access_token(&self, name: &str) -> String {
        let secret = self.cluster.token_secret(name).await.expect("token Secret");
        common::secret_field(&secret, "access_token")
    }

    fn reconciles(&self) -> u64 {
        metric(
            &self.op.metrics.render(),
            "goto_oauth_reconcile_duration_seconds_count",
            &[],
        )
        .unwrap_or(0.0) as u64
    }

    /// Waits until the reconcile count passed `after` (if given) and then stayed put a while.
    async fn quiet_after(&self, after: Option<u64>) {
        let start = Instant::now();
        let mut last = self.reconciles();
        let mut quiet_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.reconciles();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
            if after.is_none_or(|a| last > a) && quiet_since.elapsed() >= QUIET {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "the controller never settled");
        }
    }

    /// Moves the operator's clock and waits until a reconcile ran at the new time and settled.
    async fn advance(&self, by: SignedDuration) {
        self.quiet_after(None).await;
        let before = self.reconciles();
        self.clock.advance(Duration::try_from(by).expect("forward"));
        self.quiet_after(Some(before)).await;
    }
}

/// Creates or replaces the PAT Secret with `value` under [`PAT_KEY`].
async fn put_pat(cluster: &Cluster, value: &str) {
    use base64::Engine;
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": PAT_SECRET},
        "data": {PAT_KEY: base64::engine::general_purpose::STANDARD.encode(value)},
    });
    cluster
        .secrets()
        .patch(
            PAT_SECRET,
            &PatchParams::apply("e2e-tests").force(),
            &Patch::Apply(secret),
        )
        .await
        .expect("apply the PAT Secret");
}

/// Everything a test can see of a client besides its token Secret: status and Events.
async fn visible_text(cluster: &Cluster, name: &str) -> String {
    let obj = cluster.clients().get(name).await.expect("get client");
    let events = cluster.events_for(name).await;
    format!(
        "{}\n{events:?}",
        serde_json::to_string(&obj.status).expect("status json")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_without_a_browser_then_refresh_with_the_refresh_token() {
    let env = Env::start(PatRefreshToken::Issue).await;
    let pat = env.valid_pat();
    put_pat(&env.cluster, &pat).await;
    env.create_client("demo").await;

    let obj = env.ready("demo").await;
    let status = obj.status.clone().expect("status");
    assert_eq!(status.obtained_by, Some(TokenGrant::PersonalAccessToken));
    assert_eq!(
        obj.condition("Authorized").map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(env.provider.grant_requests("authorization_code"), 0);
    assert_eq!(env.pat_grants(), 1);
    let secret = env
        .cluster
        .token_secret("demo")
        .await
        .expect("token Secret");
    for key in common::TOKEN_SECRET_KEYS {
        assert!(common::secret_text(&secret, key).is_some(), "{key} missing");
    }
    // A consent could still replace the tokens: the link stays published.
    assert!(status.authorization_url.is_some());

    // Due: GoTo gave a refresh token, so it refreshes with it and sends the PAT no more.
    let before = env.access_token("demo").await;
    env.advance(SignedDuration::from_mins(45)).await;
    assert_eq!(env.provider.refresh_requests(), 1);
    assert_eq!(env.pat_grants(), 1);
    assert_ne!(env.access_token("demo").await, before);
    let obj = env.ready("demo").await;
    assert_eq!(
        obj.status.and_then(|s| s.obtained_by),
        Some(TokenGrant::PersonalAccessToken),
        "a refresh keeps how the tokens were obtained"
    );
    let metrics = env.op.metrics.render();
    assert!(
        metrics.contains("grant_type=\"personal_access_token\",result=\"success\""),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_refresh_token_the_pat_is_exchanged_again_and_a_rotated_one_is_used() {
    let env = Env::start(PatRefreshToken::Omit).await;
    let pat = env.valid_pat();
    put_pat(&env.cluster, &pat).await;
    env.create_client("demo").await;
    env.ready("demo").await;
    let secret = env
        .cluster
        .token_secret("demo")
        .await
        .expect("token Secret");
    assert_eq!(common::secret_text(&secret, "refresh_token"), None);
    assert_eq!(env.pat_grants(), 1);

    // Not due yet: nothing is sent.
    env.advance(SignedDuration::from_mins(10)).await;
    assert_eq!(env.pat_grants(), 1);

    // Due: the PAT again (there is no refresh token to use).
    let before = env.access_token("demo").await;
    env.advance(SignedDuration::from_mins(35)).await;
    assert_eq!((env.pat_grants(), env.provider.refresh_requests()), (2, 0));
    assert_ne!(env.access_token("demo").await, before);
    env.ready("demo").await;

    // The PAT is rotated in its Secret and the old one revoked: the next exchange uses the new
    // one (the old one would be refused).
    let rotated = env.valid_pat();
    put_pat(&env.cluster, &rotated).await;
    env.provider.goto.revoke_personal_access_token(&pat);
    env.quiet_after(None).await;
    assert_eq!(env.pat_grants(), 2, "a rotation alone sends nothing");
    let before = env.access_token("demo").await;
    env.advance(SignedDuration::from_mins(45)).await;
    assert_eq!(env.pat_grants(), 3);
    let last = env.provider.goto.token_requests();
    assert_eq!(last.last().map(|r| r.status), Some(200));
    assert_ne!(env.access_token("demo").await, before);
    env.ready("demo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_refresh_token_is_replaced_by_the_pat_without_a_consent() {
    let env = Env::start(PatRefreshToken::Issue).await;
    put_pat(&env.cluster, &env.valid_pat()).await;
    env.create_client("demo").await;
    env.ready("demo").await;

    env.provider
        .goto
        .revoke_refresh_tokens(&env.provider.client_id);
    env.advance(SignedDuration::from_mins(45)).await;
    assert_eq!((env.provider.refresh_requests(), env.pat_grants()), (1, 2));
    let obj = env.ready("demo").await;
    assert_eq!(
        obj.condition("Authorized").map(|c| c.reason.as_str()),
        Some(reason::AUTHORIZED)
    );
    let status = obj.status.expect("status");
    assert_eq!(status.rejected_authorization, None);
    let secret = env
        .cluster
        .token_secret("demo")
        .await
        .expect("token Secret");
    let stored = common::secret_field(&secret, "refresh_token");
    assert!(env.provider.goto.is_refresh_token_valid(&stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_pat_is_reported_once_and_not_retried_until_it_changes() {
    let env = Env::start(PatRefreshToken::Issue).await;
    let unknown = sample_personal_access_token();
    put_pat(&env.cluster, &unknown).await;
    env.create_client("demo").await;

    let obj = env
        .cluster
        .wait_condition(
            "demo",
            "Ready",
            "False",
            reason::PERSONAL_ACCESS_TOKEN_REJECTED,
        )
        .await;
    let authorized = obj.condition("Authorized").expect("Authorized");
    assert_eq!(authorized.reason, reason::PERSONAL_ACCESS_TOKEN_REJECTED);
    assert!(
        authorized.message.contains("invalid_grant"),
        "{}",
        authorized.message
    );
    let status = obj.status.clone().expect("status");
    assert!(
        status.authorization_url.is_some(),
        "a consent still works: the link stays"
    );
    eventually("a PersonalAccessTokenRejected Event", || async {
        env.cluster
            .events_for("demo")
            .await
            .iter()
            .any(|(r, _)| r == reason::PERSONAL_ACCESS_TOKEN_REJECTED)
            .then_some(())
    })
    .await;

    // No retry storm: time passes, reconciles happen, the rejected PAT is not sent again.
    for _ in 0..3 {
        env.advance(SignedDuration::from_mins(20)).await;
    }
    assert_eq!(env.pat_grants(), 1);
    assert_eq!(
        env.get("demo")
            .await
            .condition("Ready")
            .map(|c| c.reason.clone())
            .as_deref(),
        Some(reason::PERSONAL_ACCESS_TOKEN_REJECTED)
    );
    let rejected_events = env
        .cluster
        .events_for("demo")
        .await
        .into_iter()
        .filter(|(r, _)| r == reason::PERSONAL_ACCESS_TOKEN_REJECTED)
        .count();
    assert_eq!(rejected_events, 1, "one Event, not one per reconcile");

    // A valid PAT in the Secret: the operator tries again at once.
    let valid = env.valid_pat();
    put_pat(&env.cluster, &valid).await;
    let obj = env.ready("demo").await;
    assert_eq!(env.pat_grants(), 2);
    assert_eq!(
        obj.status.and_then(|s| s.rejected_personal_access_token),
        None
    );

    let text = visible_text(&env.cluster, "demo").await;
    for (what, pat) in [("rejected PAT", &unknown), ("valid PAT", &valid)] {
        assert!(!text.contains(pat.as_str()), "{what} in status or Events");
    }
    assert!(!env.op.metrics.render().contains(valid.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_pat_secret_is_reported_until_it_is_created() {
    let env = Env::start(PatRefreshToken::Issue).await;
    env.create_client("demo").await;
    let obj = env
        .cluster
        .wait_condition(
            "demo",
            "Ready",
            "False",
            reason::PERSONAL_ACCESS_TOKEN_MISSING,
        )
        .await;
    let ready = obj.condition("Ready").expect("Ready");
    assert!(
        ready.message.contains(PAT_SECRET),
        "names the Secret: {}",
        ready.message
    );
    eventually("a PersonalAccessTokenMissing Event", || async {
        env.cluster
            .events_for("demo")
            .await
            .iter()
            .any(|(r, _)| r == reason::PERSONAL_ACCESS_TOKEN_MISSING)
            .then_some(())
    })
    .await;
    assert_eq!(env.pat_grants(), 0);

    // The Secret without the key is still missing it.
    put_pat(&env.cluster, "").await;
    env.quiet_after(None).await;
    let ready = env.get("demo").await;
    let ready = ready.condition("Ready").expect("Ready");
    assert_eq!(ready.reason, reason::PERSONAL_ACCESS_TOKEN_MISSING);
    assert!(ready.message.contains(PAT_KEY), "{}", ready.message);

    // Created: the Secret's change wakes the client, without any clock move.
    put_pat(&env.cluster, &env.valid_pat()).await;
    env.ready("demo").await;
    assert_eq!(env.pat_grants(), 1);
}

/// The operator binary (its log captured): the PAT, valid or rejected, never shows in the
/// log, a status, an Event or the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pat_never_appears_in_logs_status_events_or_metrics() {
    let stack = Stack::start(&[]).await;
    let goto = &stack.provider.goto;
    let valid = sample_personal_access_token();
    goto.register_personal_access_token(&stack.provider.client_id, &valid);
    put_pat(&stack.cluster, &valid).await;
    stack
        .cluster
        .create_client(
            "good",
            stack
                .provider
                .spec(serde_json::json!({"personalAccessTokenRef": {"name": PAT_SECRET}})),
        )
        .await;
    stack
        .cluster
        .wait_condition("good", "Ready", "True", reason::AUTHORIZED)
        .await;

    let rejected = sample_personal_access_token();
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bad-pat"},
        "stringData": {"pat": rejected},
    });
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(secret).expect("Secret");
    stack
        .cluster
        .secrets()
        .create(&Default::default(), &secret)
        .await
        .expect("create the rejected PAT's Secret");
    stack
        .cluster
        .create_client(
            "bad",
            stack.provider.spec(
                serde_json::json!({"personalAccessTokenRef": {"name": "bad-pat", "key": "pat"}}),
            ),
        )
        .await;
    stack
        .cluster
        .wait_condition(
            "bad",
            "Ready",
            "False",
            reason::PERSONAL_ACCESS_TOKEN_REJECTED,
        )
        .await;

    let mut seen = stack.op.logs();
    seen.push_str(&stack.op.metrics().await);
    for name in ["good", "bad"] {
        seen.push_str(&visible_text(&stack.cluster, name).await);
    }
    assert!(
        seen.contains("personal access token"),
        "the log says what happened"
    );
    for (what, pat) in [("valid PAT", &valid), ("rejected PAT", &rejected)] {
        assert!(!seen.contains(pat.as_str()), "{what} leaked");
    }
    stack.provider.assert_no_secret_material(&seen);
    stack.op.stop().await;
}
