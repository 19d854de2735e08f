//! Soak: 200 clients through many refresh cycles while GoTo's token endpoint and the Kubernetes
//! API fail at random, asserting that no refresh token is ever lost.
//!
//! The provider rotates on every refresh and invalidates the old refresh token at once (the
//! strictest reading of GoTo's "valid for one use only"), so a refresh whose new token is not
//! stored, a second refresh of the same token, or a retry with an old token is a lost client. At
//! the end of every cycle each client's Secret must hold exactly the refresh token the provider
//! still accepts, and no client may need a new authorization.
//!
//! Chaos: 20% of token requests fail (500 HTML, 503 JSON, 429 with `Retry-After: 1`, or a delayed
//! 504; none consumes the grant), some cycles start with injected 409/500 answers to token-Secret
//! PATCHes, and one cycle cuts every watch. Time is a manual clock: a cycle advances it past every
//! `nextRefreshTime`, then in one-minute steps until the retries (backoff 5 s doubling, on the
//! same clock) have all gone through.
//!
//! Determinism: the random fault sequence comes from [`FAULT_SEED`]; which request draws which
//! fault still depends on the order requests arrive in, so runs differ in detail but not in what
//! is asserted. Runs in about a minute on two cores (`cargo test --test soak -- --nocapture`
//! prints the summary).

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::{
    Cluster, Provider, bind_callback,
    metrics::metric_sum,
    operator::{InProcessOperator, Options},
    secret_text,
};
use fake_goto::{FakeGoToConfig, RefreshTokenRotation, TokenOutcome};
use futures::StreamExt;
use goto_oauth_operator::{
    clock::Clock,
    conditions::reason,
    secret::{EXPIRES_AT_KEY, REFRESH_TOKEN_KEY},
};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube_fault_proxy::Fault;

/// Seed of the provider's random token-endpoint faults. Change it to explore another sequence;
/// keep it fixed in the repository so a failure can be rerun.
const FAULT_SEED: u64 = 0x5EED_2026_1123;
/// Probability that a token request is answered by a transient fault.
const FAULT_PROBABILITY: f64 = 0.2;
const CLIENTS: usize = 200;
const CYCLES: usize = 8;
/// Clients authorized at the same time (admins clicking through consent pages).
const AUTHORIZE_CONCURRENCY: usize = 20;
/// GoTo's access-token lifetime (the fake's default `expires_in`).
const TOKEN_LIFETIME: SignedDuration = SignedDuration::from_secs(3600);
/// Past every `nextRefreshTime`: at most 40 min after issue — the first step reaches all that
/// were refreshed in one step.
const CYCLE_ADVANCE: Duration = Duration::from_secs(41 * 60);
const RETRY_STEP: Duration = Duration::from_secs(60);
/// Retry steps a cycle may need before a client counts as stuck. The last client left in a
/// cycle draws consecutive values of the fault sequence, so a run of faults there pushes its
/// backoff to the 5-minute cap (the seed has a run of 5; it costs about 14 steps). Retries past
/// 20 minutes may meet the next refreshes of the clients refreshed first (spread over 20–40
/// minutes after them): those refresh once more, which the checks below cover too.
const MAX_RETRY_STEPS: usize = 30;
/// How long a cycle may wait without any client getting refreshed before the clock moves on.
/// Moving on early is harmless (it only advances the clock sooner); a 429's `Retry-After: 1`
/// pauses every refresh for a second, hence not less.
const STALL: Duration = Duration::from_secs(1);

fn client_name(i: usize) -> String {
    format!("soak-{i:03}")
}

/// A UUID-shaped GoTo client id per client, stable across runs.
fn client_id(i: usize) -> String {
    format!("5ea10000-0000-4000-8000-{i:012}")
}

/// Every client's token Secret, by client name.
async fn token_secrets(cluster: &Cluster) -> BTreeMap<String, Secret> {
    cluster
        .secrets()
        .list(&Default::default())
        .await
        .expect("list Secrets")
        .items
        .into_iter()
        .filter_map(|s| {
            let name = s.metadata.name.clone()?;
            let client = name.strip_suffix("-token")?.to_string();
            Some((client, s))
        })
        .collect()
}

fn expires_at(secret: &Secret) -> Option<Timestamp> {
    secret_text(secret, EXPIRES_AT_KEY)?.parse().ok()
}

/// Reconciles the operator has finished so far.
fn reconcile_count(op: &InProcessOperator) -> f64 {
    metric_sum(
        &op.metrics.render(),
        "goto_oauth_reconcile_duration_seconds_count",
        "",
    )
}

/// Sum of the samples of `goto_oauth_refresh_total` with the given result.
fn refreshes_with_result(rendered: &str, result: &str) -> u64 {
    metric_sum(
        rendered,
        "goto_oauth_refresh_total{",
        &format!("result=\"{result}\""),
    ) as u64
}

/// Waits until every client is Ready with its consent in place.
async fn all_ready(cluster: &Cluster) {
    futures::stream::iter(0..CLIENTS)
        .map(|i| async move {
            cluster
                .wait_condition(&client_name(i), "Ready", "True", reason::AUTHORIZED)
                .await;
        })
        .buffer_unordered(AUTHORIZE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// Creates the client, opens its link, clicks Allow at GoTo and follows the callback.
async fn authorize(cluster: &Cluster, provider: &Provider, i: usize) {
    let name = client_name(i);
    cluster
        .create_client(
            &name,
            serde_json::json!({
                "clientId": client_id(i),
                "clientSecretRef": {"name": "creds"},
            }),
        )
        .await;
    let link = cluster.authorization_link(&name).await;
    let (_, page) = provider.allow(&link).await;
    assert_eq!(page.status, 200, "{name}: callback page: {}", page.body);
}

/// Fault injections at the start of a cycle: cycle-dependent, so every run sees the same plan.
fn api_chaos(cycle: usize) -> Vec<Fault> {
    let patch = |status, times| Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/secrets/".into(),
        status,
        times,
    };
    match cycle % 3 {
        0 => vec![patch(409, 5)],
        1 => vec![patch(500, 3)],
        _ => vec![patch(409, 2), patch(500, 2)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_refresh_token_is_lost_under_faults() {
    // `SOAK_LOG=goto_oauth_operator=debug` shows the in-process operator's log.
    if let Ok(filter) = std::env::var("SOAK_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let started = Instant::now();
    let cluster = Cluster::start().await;
    // The API faults and the watch cut go through the proxy, so the soak runs on a real cluster too.
    let proxy = cluster.proxy();
    let (listener, callback) = bind_callback().await;
    let provider = Provider::start(FakeGoToConfig::default(), &callback).await;
    provider.goto.set_rotation(RefreshTokenRotation::Always);
    provider.goto.set_rate_limit(None);
    for i in 0..CLIENTS {
        provider.register(&client_id(i), vec![callback.clone()], &client_name(i));
    }
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;

    let clock = Clock::manual("2026-11-23T10:00:00Z".parse().unwrap());
    let options = Options {
        token_rate_limit: 1000,
        max_concurrent_refreshes: 50,
        token_timeout: Duration::from_secs(2),
        ..provider.operator_options(&cluster, clock.clone())
    };
    let op = InProcessOperator::start(cluster.client.clone(), listener, options)
        .await
        .expect("operator starts");

    // Authorize everyone with a healthy token endpoint: the soak is about keeping tokens, and a
    // failed code exchange only means the admin clicks the link again.
    futures::stream::iter(0..CLIENTS)
        .map(|i| authorize(&cluster, &provider, i))
        .buffer_unordered(AUTHORIZE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    all_ready(&cluster).await;
    let authorized_in = started.elapsed();
    eprintln!("soak: {CLIENTS} clients authorized in {authorized_in:?}");

    provider
        .goto
        .set_random_faults(FAULT_PROBABILITY, FAULT_SEED);
    let requests_before = provider.goto.token_requests().len();
    let mut api_faults_planned = 0;
    let mut retry_steps_total = 0;

    for cycle in 0..CYCLES {
        let cycle_started = Instant::now();
        for fault in api_chaos(cycle) {
            api_faults_planned += fault.times;
            proxy.inject_fault(fault);
        }
        // Reconciles finished when the clock last moved: every move re-checks all clients.
        let mut reconciles_at_move = reconcile_count(&op);
        clock.advance(CYCLE_ADVANCE);
        if cycle == CYCLES / 2 {
            proxy.cut_watches();
        }
        // A token refreshed in this cycle was issued at or after the advance.
        let threshold = clock.now() + TOKEN_LIFETIME;

        let mut retry_steps = 0;
        let mut last_progress = Instant::now();
        let mut done_before = 0;
        loop {
            let secrets = token_secrets(&cluster).await;
            assert_eq!(
                secrets.len(),
                CLIENTS,
                "cycle {cycle}: every client keeps its token Secret"
            );
            let pending: Vec<String> = (0..CLIENTS)
                .map(client_name)
                .filter(|name| {
                    secrets
                        .get(name)
                        .and_then(expires_at)
                        .is_none_or(|at| at < threshold)
                })
                .collect();
            let done = CLIENTS - pending.len();
            if pending.is_empty() {
                break;
            }
            if done > done_before {
                done_before = done;
                last_progress = Instant::now();
            }
            // Time moves on only once the operator has looked at every client since it last
            // moved: on a loaded machine a pass over 200 clients takes longer than any fixed wait.
            let caught_up = reconcile_count(&op) - reconciles_at_move >= CLIENTS as f64;
            if last_progress.elapsed() >= STALL && caught_up {
                // The rest are backing off (on the manual clock) after faults: let time pass.
                retry_steps += 1;
                if retry_steps > MAX_RETRY_STEPS {
                    // Say where the stuck clients stand, for whoever reads the failure.
                    let mut states = Vec::new();
                    for name in pending.iter().take(5) {
                        let status = cluster
                            .clients()
                            .get(name)
                            .await
                            .ok()
                            .and_then(|c| c.status);
                        states.push(format!(
                            "{name}: {:?}",
                            status.map(|s| (
                                s.conditions,
                                s.next_refresh_time,
                                s.access_token_expires_at
                            ))
                        ));
                    }
                    panic!(
                        "cycle {cycle}: {} clients never refreshed (clock {}): {states:#?}",
                        pending.len(),
                        clock.now()
                    );
                }
                reconciles_at_move = reconcile_count(&op);
                clock.advance(RETRY_STEP);
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        retry_steps_total += retry_steps;

        // Every refresh of this cycle is stored: the Secret must hold the one refresh token the
        // provider still accepts. Anything else is a client a human must authorize again.
        let secrets = token_secrets(&cluster).await;
        let mut lost = Vec::new();
        for i in 0..CLIENTS {
            let name = client_name(i);
            let stored = secrets
                .get(&name)
                .and_then(|s| secret_text(s, REFRESH_TOKEN_KEY));
            let valid = provider.goto.valid_refresh_token(&client_id(i));
            if stored.is_none() || stored != valid {
                lost.push(name);
            }
        }
        assert!(
            lost.is_empty(),
            "cycle {cycle}: refresh token lost for {} clients: {lost:?}",
            lost.len()
        );
        let clients = cluster
            .clients()
            .list(&Default::default())
            .await
            .unwrap()
            .items;
        assert_eq!(clients.len(), CLIENTS);
        let needs_consent: Vec<String> = clients
            .iter()
            .filter(|c| {
                c.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.reason == reason::REAUTHORIZATION_REQUIRED)
                })
            })
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert!(
            needs_consent.is_empty(),
            "cycle {cycle}: ReauthorizationRequired: {needs_consent:?}"
        );
        eprintln!(
            "soak: cycle {cycle}: all {CLIENTS} refreshed in {:?} ({retry_steps} retry steps)",
            cycle_started.elapsed()
        );
    }

    // Summary, and the invariants over the whole run.
    let requests = provider.goto.token_requests();
    let soak_requests = &requests[requests_before..];
    let refresh_requests = soak_requests
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
        .count();
    let random_faults = soak_requests
        .iter()
        .filter(|r| matches!(r.outcome, TokenOutcome::Fault { random: true, .. }))
        .count();
    let refreshed = soak_requests
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token") && r.status == 200)
        .count();
    let rejected: Vec<_> = soak_requests
        .iter()
        .filter(|r| {
            r.error
                .as_deref()
                .is_some_and(|e| e == "invalid_grant" || e == "invalid_client")
        })
        .map(|r| (r.client_id.clone(), r.error.clone()))
        .collect();
    let metrics = op.metrics.render();
    // Refreshes whose tokens were still unstored when the refresh ended.
    let unstored_retries = metric_sum(
        &metrics,
        "goto_oauth_reconcile_errors_total{",
        "tokens_unstored",
    ) as u64;
    let api_faults_hit = proxy
        .request_log()
        .iter()
        .filter(|r| {
            r.verb == "patch" && r.path.contains("/secrets/") && matches!(r.status, 409 | 500)
        })
        .count();
    eprintln!(
        "soak summary (seed {FAULT_SEED:#x}): {CLIENTS} clients x {CYCLES} cycles; \
         {refresh_requests} refresh requests, {refreshed} succeeded, {random_faults} random token faults; \
         operator metrics: success={} transient_error={} rate_limited={}; \
         {api_faults_hit}/{api_faults_planned} injected Secret PATCH faults answered \
         ({unstored_retries} refreshes left tokens unstored), 1 watch cut; \
         {retry_steps_total} one-minute retry steps; {:?} in total",
        refreshes_with_result(&metrics, "success"),
        refreshes_with_result(&metrics, "transient_error"),
        refreshes_with_result(&metrics, "rate_limited"),
        started.elapsed(),
    );

    assert!(rejected.is_empty(), "GoTo rejected a grant: {rejected:?}");
    assert_eq!(
        refreshed,
        CLIENTS * CYCLES,
        "exactly one successful refresh per client and cycle"
    );
    assert!(random_faults > 0, "the fault injection was active");
    assert_eq!(
        refresh_requests,
        refreshed + random_faults,
        "every refresh request either succeeded or drew a random fault"
    );
    // Genuine 409s (a write at a stale resourceVersion) come on top of the injected ones.
    assert!(
        api_faults_hit >= api_faults_planned,
        "every injected API fault hit a Secret write"
    );
    assert_eq!(
        refreshes_with_result(&metrics, "success") as usize,
        CLIENTS * CYCLES
    );
    // Refreshed tokens whose Secret write failed were stored by the retry inside the refresh,
    // never left for a later reconcile that a shutdown could drop.
    assert_eq!(
        unstored_retries, 0,
        "no refreshed token waited unstored past its refresh"
    );
    // The status follows the Secrets: everyone ends Ready.
    all_ready(&cluster).await;

    op.stop().await;
}
