//! High availability end to end: two in-process replicas elect a leader on the Lease
//! `goto-oauth-operator`, and the guarantees that make running two of them safe are checked
//! against the in-memory API server and the fake GoTo provider:
//!
//! - exactly one replica leads, and only the leader talks to GoTo's token endpoint (one due
//!   token, one refresh request — a second refresh of a rotating refresh token would lose it);
//! - any replica can finish a consent (the callback writes through the API; the leader picks it
//!   up);
//! - stopping the leader releases the Lease and the other replica takes it at its next look (the
//!   retry period), far inside the lease duration, while the stopped one sends nothing more; a
//!   leader killed with SIGKILL is replaced once its Lease expires (`--lease-duration`);
//! - while no replica leads, every replica's metrics report a client whose token expired as not
//!   ready, and the next leader corrects the stale status before it refreshes;
//! - leadership is never held by both replicas at the same moment, even when they start together,
//!   which needs each replica to take the Lease under its own server-side-apply field manager;
//! - a leader stopped while a rotated refresh token is still waiting to be written does not take
//!   that token (the only valid one) with it.
//!
//! Time for the refresh schedule comes from one manual clock shared by both replicas, so "the
//! token is due" is a clock advance, not a 40-minute wait. The Lease itself runs on wall time
//! (4 s duration, renewed 1 s before expiry, 500 ms retry period, see `common::operator`).

mod common;

use std::time::{Duration, Instant};

use common::{
    Cluster, Provider, bind_callback, eventually,
    metrics::{metric, metric_sum},
    operator::{InProcessOperator, Options},
    secret_field,
};
use fake_goto::{FakeGoToConfig, RefreshTokenRotation};
use goto_oauth_operator::{
    clock::Clock,
    conditions::reason,
    leader::Timing,
    secret::{EXPIRES_AT_KEY, REFRESH_TOKEN_KEY},
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_fault_proxy::Fault;

/// The Lease the in-process operator elects on, and its duration (see `common::operator`).
const LEASE_NAME: &str = "goto-oauth-operator";
const LEASE_DURATION: Duration = Duration::from_secs(4);

/// One replica: its identity, its callback URL and the running operator (`None` once stopped).
struct Replica {
    identity: String,
    callback: String,
    op: Option<InProcessOperator>,
}

impl Replica {
    fn op(&self) -> &InProcessOperator {
        self.op.as_ref().expect("replica is running")
    }

    fn metrics(&self) -> String {
        self.op().metrics.render()
    }

    fn leads(&self) -> bool {
        self.op.as_ref().is_some_and(leads)
    }
}

/// Whether a replica runs the controller, read from the exported `goto_oauth_leader` sample
/// line. Not `InProcessOperator::is_leader`: it matches "goto_oauth_leader 1" anywhere in the
/// exposition, and the metric's HELP text ("1 while this replica holds…") always contains it.
fn leads(op: &InProcessOperator) -> bool {
    leader_sample(&op.metrics.render()) == Some(1)
}

/// The value of the `goto_oauth_leader` sample (not its HELP or TYPE line).
fn leader_sample(rendered: &str) -> Option<i64> {
    rendered
        .lines()
        .find_map(|l| l.strip_prefix("goto_oauth_leader "))
        .and_then(|v| v.trim().parse().ok())
}

struct Ha {
    cluster: Cluster,
    provider: Provider,
    clock: Clock,
    replicas: Vec<Replica>,
}

/// Starts the cluster, the provider (with both replicas' callbacks registered) and two replicas
/// electing a leader, started at the same moment as two pods of a Deployment are.
async fn start() -> Ha {
    start_with(None).await
}

/// [`start`] with these Lease timings instead of the harness's test-sized ones.
async fn start_with(timing: Option<Timing>) -> Ha {
    let cluster = Cluster::start().await;
    let (la, callback_a) = bind_callback().await;
    let (lb, callback_b) = bind_callback().await;
    let callbacks = vec![callback_a, callback_b];
    let provider = Provider::start(FakeGoToConfig::default(), &callbacks[0]).await;
    provider.register(&provider.client_id, callbacks.clone(), "ha-e2e");
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;

    let clock = Clock::manual("2026-11-23T10:00:00Z".parse().unwrap());
    let identities = ["replica-a", "replica-b"];
    let options = |identity: &str| {
        let defaults = provider.operator_options(&cluster, clock.clone());
        Options {
            leader_identity: Some(identity.to_string()),
            lease_timing: timing.unwrap_or(defaults.lease_timing),
            ..defaults
        }
    };
    let (a, b) = tokio::join!(
        InProcessOperator::start(cluster.client.clone(), la, options(identities[0])),
        InProcessOperator::start(cluster.client.clone(), lb, options(identities[1])),
    );
    let replicas = [a, b]
        .into_iter()
        .zip(identities)
        .zip(callbacks)
        .map(|((op, identity), callback)| Replica {
            identity: identity.to_string(),
            callback,
            op: Some(op.expect("replica starts")),
        })
        .collect();
    Ha {
        cluster,
        provider,
        clock,
        replicas,
    }
}

impl Ha {
    /// Waits until exactly one running replica leads; returns its index.
    async fn leader(&self) -> usize {
        eventually("exactly one leader", || async {
            let leaders: Vec<usize> = self
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| r.leads())
                .map(|(i, _)| i)
                .collect();
            (leaders.len() == 1).then(|| leaders[0])
        })
        .await
    }

    /// Waits for the leader; returns (leader, follower).
    async fn roles(&self) -> (usize, usize) {
        let leader = self.leader().await;
        (leader, 1 - leader)
    }

    /// Stops every replica still running.
    async fn stop_all(self) {
        for op in self.replicas.into_iter().filter_map(|r| r.op) {
            op.stop().await;
        }
    }

    async fn lease_holder(&self) -> Option<String> {
        let leases: Api<Lease> =
            Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        leases.get(LEASE_NAME).await.ok()?.spec?.holder_identity
    }

    /// Waits until the Lease names replica `index`.
    async fn wait_lease_holder(&self, index: usize) {
        let identity = self.replicas[index].identity.as_str();
        eventually(&format!("Lease names {identity}"), || async {
            (self.lease_holder().await.as_deref() == Some(identity)).then_some(())
        })
        .await;
    }

    /// The field managers that own the Lease's `spec.holderIdentity` (server-side apply).
    async fn holder_field_managers(&self) -> Vec<String> {
        let leases: Api<Lease> =
            Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        let lease = leases.get(LEASE_NAME).await.expect("Lease exists");
        lease
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|m| {
                m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.to_string().contains("f:holderIdentity"))
            })
            .filter_map(|m| m.manager)
            .collect()
    }

    /// Creates a client whose redirect URI is replica `via`'s callback, and authorizes it through a
    /// browser whose callback therefore lands on that replica.
    async fn authorize(&self, name: &str, via: usize) {
        self.cluster
            .create_client(
                name,
                serde_json::json!({
                    "clientId": self.provider.client_id,
                    "clientSecretRef": {"name": "creds"},
                    "redirectUri": self.replicas[via].callback,
                }),
            )
            .await;
        let link = self.cluster.authorization_link(name).await;
        let (back, page) = self.provider.allow(&link).await;
        assert!(
            back.starts_with(&self.replicas[via].callback),
            "GoTo sends the browser back to replica {via}"
        );
        assert_eq!(
            page.status, 200,
            "callback on {}: {}",
            self.replicas[via].identity, page.body
        );
        self.cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }

    async fn expires_at(&self, name: &str) -> String {
        let secret = self.cluster.token_secret(name).await.expect("token Secret");
        secret_field(&secret, EXPIRES_AT_KEY)
    }

    /// Advances the shared clock past the client's next refresh and waits for the Secret to
    /// carry a new token.
    async fn refresh_due(&self, name: &str) {
        let before = self.expires_at(name).await;
        // nextRefreshTime is 20–40 min after issue; the token lives 60 min.
        self.clock.advance(Duration::from_secs(45 * 60));
        eventually(&format!("{name} refreshed"), || async {
            (self.expires_at(name).await != before).then_some(())
        })
        .await;
    }
}

/// Asserts that `check` holds every time it is sampled during `window`.
async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < window {
        assert!(check().await, "no longer true: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_only_the_leader_refreshes() {
    let ha = start().await;
    let (leader, follower) = ha.roles().await;
    assert!(!ha.replicas[follower].leads());
    assert_eq!(leader_sample(&ha.replicas[leader].metrics()), Some(1));
    assert_eq!(leader_sample(&ha.replicas[follower].metrics()), Some(0));
    assert_eq!(
        ha.lease_holder().await.as_deref(),
        Some(ha.replicas[leader].identity.as_str()),
        "the Lease names the leader"
    );

    ha.authorize("solo", leader).await;
    assert_eq!(ha.provider.refresh_requests(), 0);
    ha.refresh_due("solo").await;

    // Both replicas saw the clock move; a second refresh would spend the refresh token twice.
    holds_for(
        "exactly one refresh request",
        Duration::from_secs(3),
        || async { ha.provider.refresh_requests() == 1 },
    )
    .await;
    let success = r#"result="success""#;
    assert_eq!(
        metric_sum(
            &ha.replicas[leader].metrics(),
            "goto_oauth_refresh_total",
            success
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &ha.replicas[follower].metrics(),
            "goto_oauth_refresh_total",
            ""
        ),
        0.0
    );
    assert_eq!(
        metric_sum(
            &ha.replicas[follower].metrics(),
            "goto_oauth_reconcile_duration_seconds_count",
            ""
        ),
        0.0,
        "the follower never reconciles"
    );
    assert_eq!(leader_sample(&ha.replicas[follower].metrics()), Some(0));
    let obj = ha
        .cluster
        .wait_condition("solo", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert!(obj.status.unwrap().next_refresh_time.is_some());

    ha.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_on_the_follower_completes_the_authorization() {
    let ha = start().await;
    let (leader, follower) = ha.roles().await;

    ha.authorize("via-follower", follower).await;
    let secret = ha
        .cluster
        .secrets()
        .get("via-follower-token")
        .await
        .unwrap();
    let refresh = secret_field(&secret, REFRESH_TOKEN_KEY);
    assert!(
        ha.provider.goto.is_refresh_token_valid(&refresh),
        "the follower stored a working refresh token"
    );
    assert_eq!(ha.provider.grant_requests("authorization_code"), 1);

    // The leader (not the follower, which runs no controller) keeps the status: it reports the
    // authorization and schedules the refresh.
    let obj = ha
        .cluster
        .wait_condition("via-follower", "Authorized", "True", reason::AUTHORIZED)
        .await;
    let status = obj.status.unwrap();
    assert_eq!(status.secret_name.as_deref(), Some("via-follower-token"));
    assert!(status.access_token_expires_at.is_some());
    assert!(status.next_refresh_time.is_some());
    assert_eq!(
        metric_sum(
            &ha.replicas[follower].metrics(),
            "goto_oauth_reconcile_duration_seconds_count",
            ""
        ),
        0.0
    );
    assert!(
        metric_sum(
            &ha.replicas[leader].metrics(),
            "goto_oauth_reconcile_duration_seconds_count",
            ""
        ) > 0.0,
        "the leader reconciled the client"
    );
    // The leader refreshes what the follower stored.
    ha.refresh_due("via-follower").await;
    assert_eq!(
        metric_sum(
            &ha.replicas[leader].metrics(),
            "goto_oauth_refresh_total",
            r#"result="success""#
        ),
        1.0
    );
    assert_eq!(ha.provider.refresh_requests(), 1);

    ha.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_leader_hands_over_within_the_lease_duration() {
    let mut ha = start().await;
    let (leader, follower) = ha.roles().await;
    ha.authorize("handover", leader).await;
    ha.refresh_due("handover").await;
    assert_eq!(ha.provider.refresh_requests(), 1);

    let old = ha.replicas[leader].op.take().unwrap();
    let old_metrics = old.metrics.clone();
    let stopped = Instant::now();
    old.stop().await;
    let frozen = old_metrics.render();
    assert_eq!(
        leader_sample(&frozen),
        Some(0),
        "a stopped replica does not claim leadership"
    );

    // The Lease was released; the follower finds it free at its next look (retry period 500 ms),
    // well within the lease duration; 1 s of slack for scheduling on 2 cores.
    eventually("follower takes over", || async {
        ha.replicas[follower].leads().then_some(())
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("takeover {took:?} after stop()");
    assert!(
        took <= LEASE_DURATION + Duration::from_secs(1),
        "takeover took {took:?}, lease duration {LEASE_DURATION:?}"
    );
    ha.wait_lease_holder(follower).await;

    ha.refresh_due("handover").await;
    holds_for(
        "one more refresh, by the new leader",
        Duration::from_secs(2),
        || async { ha.provider.refresh_requests() == 2 },
    )
    .await;
    assert_eq!(
        metric_sum(
            &ha.replicas[follower].metrics(),
            "goto_oauth_refresh_total",
            r#"result="success""#
        ),
        1.0
    );
    assert_eq!(
        old_metrics.render(),
        frozen,
        "the stopped replica did nothing after stop()"
    );
    ha.cluster
        .wait_condition("handover", "Ready", "True", reason::AUTHORIZED)
        .await;

    ha.replicas[follower].op.take().unwrap().stop().await;
}

/// Two replicas that start together must never both lead. The Lease is taken by a server-side
/// apply without force: only a conflict between two *different* field managers stops the
/// second replica from overwriting the first one's `holderIdentity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_starting_together_never_both_lead() {
    // More trials make the start-up race likelier to show: GOTO_HA_TRIALS=50.
    let trials: usize = std::env::var("GOTO_HA_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    for trial in 0..trials {
        let ha = start().await;
        let start = Instant::now();
        let mut first_leader = None;
        let mut both = None;
        // A second leader shows up right after the first (both saw the Lease free); watch one
        // second past the first election, well inside the leader's first renewal.
        while first_leader.is_none_or(|at: Duration| start.elapsed() < at + Duration::from_secs(1))
        {
            assert!(
                start.elapsed() < common::DEADLINE,
                "trial {trial}: nobody became leader"
            );
            let (a, b) = (ha.replicas[0].leads(), ha.replicas[1].leads());
            if (a || b) && first_leader.is_none() {
                first_leader = Some(start.elapsed());
            }
            if a && b {
                both = Some(start.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let holder = ha.lease_holder().await;
        ha.stop_all().await;
        if let Some(at) = both {
            panic!(
                "trial {trial}: both replicas led at {at:?} after start (Lease holder {holder:?})"
            );
        }
    }
}

/// `InProcessOperator::is_leader` must agree with the `goto_oauth_leader` sample: other tests
/// (and this file's first draft) wait on it, and a follower must not look like a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_leader_agrees_with_the_leader_gauge() {
    let ha = start().await;
    let (leader, follower) = ha.roles().await;
    let op = ha.replicas[follower].op();
    assert_eq!(leader_sample(&op.metrics.render()), Some(0));
    assert!(
        !op.is_leader(),
        "InProcessOperator::is_leader() says the follower leads"
    );
    assert!(ha.replicas[leader].op().is_leader());
    ha.stop_all().await;
}

/// kube-lease-manager takes a free Lease with a server-side apply *without* force and relies on
/// the API server's field-ownership conflict to refuse a second taker; its docs require a field
/// manager that is unique per replica. If every replica applies under the same manager, the
/// second apply silently overwrites `holderIdentity` and both replicas believe they lead until
/// the first one's next renewal (what `two_replicas_starting_together_never_both_lead` catches
/// when the start-up race hits). Checked deterministically here through the Lease's
/// managedFields after a handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_replica_takes_the_lease_under_its_own_field_manager() {
    let mut ha = start().await;
    let (leader, follower) = ha.roles().await;
    let first = ha.holder_field_managers().await;
    assert!(
        !first.is_empty(),
        "holderIdentity is owned by a field manager"
    );

    ha.replicas[leader].op.take().unwrap().stop().await;
    ha.wait_lease_holder(follower).await;
    let second = ha.holder_field_managers().await;
    assert!(
        second.iter().all(|m| !first.contains(m)),
        "{} took the Lease under the same field manager as {}: {second:?} (before: {first:?}), \
         so a concurrent apply by the other replica would not conflict",
        ha.replicas[follower].identity,
        ha.replicas[leader].identity,
    );
    ha.replicas[follower].op.take().unwrap().stop().await;
}

/// A leader that refreshed a rotating token but could not store it yet (the API server answered
/// the Secret write with a 500) holds the only valid refresh token in memory. A rolling update
/// stops it at exactly such a moment; the token must reach the Secret before the Lease goes to
/// the other replica, or the client needs a human to authorize it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopping_with_an_unstored_rotated_token_does_not_lose_it() {
    let mut ha = start().await;
    ha.provider.goto.set_rotation(RefreshTokenRotation::Always);
    let (leader, follower) = ha.roles().await;
    ha.authorize("rolling", leader).await;
    let proxy = ha.cluster.proxy();

    proxy.inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/secrets/rolling-token".into(),
        status: 500,
        times: 1,
    });
    ha.clock.advance(Duration::from_secs(45 * 60));
    eventually("the refreshed token's write failed", || async {
        proxy
            .request_log()
            .iter()
            .any(|r| {
                r.verb == "patch" && r.path.ends_with("/secrets/rolling-token") && r.status == 500
            })
            .then_some(())
    })
    .await;
    assert_eq!(
        ha.provider.refresh_requests(),
        1,
        "the leader refreshed once"
    );
    // The rolling update: the leader is told to stop right now.
    ha.replicas[leader].op.take().unwrap().stop().await;

    eventually("follower takes over", || async {
        ha.replicas[follower].leads().then_some(())
    })
    .await;
    // Give the new leader time to act on what is stored (its first reconcile refreshes if due).
    holds_for(
        "GoTo accepts the new leader's refresh (invalid_grant: the stopped leader took the only \
         valid refresh token with it)",
        Duration::from_secs(2),
        || async {
            !ha.provider
                .goto
                .token_requests()
                .iter()
                .any(|r| r.error.as_deref() == Some("invalid_grant"))
        },
    )
    .await;
    let secret = ha.cluster.secrets().get("rolling-token").await.unwrap();
    let stored = secret_field(&secret, REFRESH_TOKEN_KEY);
    assert!(
        ha.provider.goto.valid_refresh_token(&ha.provider.client_id) == Some(stored),
        "the Secret does not hold the refresh token GoTo still accepts: the rotated one was lost \
         with the stopped leader"
    );
    let obj = ha.cluster.clients().get("rolling").await.unwrap();
    assert!(
        obj.condition("Authorized")
            .is_some_and(|c| c.status == "True"),
        "client needs a new authorization: {:?}",
        obj.condition("Authorized")
    );
    ha.replicas[follower].op.take().unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_lease_sends_no_refresh() {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    let ha = start().await;
    let (leader, _) = ha.roles().await;
    ha.authorize("solo", leader).await;
    // Another holder took the Lease (as after a partition) before the leader's election task
    // noticed: the leader must check the Lease itself before spending the refresh token.
    let leases: kube::Api<Lease> =
        kube::Api::namespaced(ha.cluster.client.clone(), &ha.cluster.namespace);
    let mut lease = leases.get("goto-oauth-operator").await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("replica-elsewhere".into());
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    spec.lease_duration_seconds = Some(30);
    leases
        .replace("goto-oauth-operator", &Default::default(), &lease)
        .await
        .unwrap();
    let before = ha.expires_at("solo").await;
    ha.clock.advance(Duration::from_secs(45 * 60));
    holds_for(
        "no refresh while another replica holds the Lease",
        Duration::from_secs(3),
        || async { ha.provider.refresh_requests() == 0 },
    )
    .await;
    assert_eq!(ha.expires_at("solo").await, before);
    ha.stop_all().await;
}

/// A rolling update stops the leader gracefully: it stops reconciling, releases the Lease, and
/// the other replica takes it at its next look (the retry period), not after the lease
/// duration, which is long here so that waiting it out would show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_over_at_once_not_after_the_lease_duration() {
    let timing = Timing::new(
        Duration::from_secs(15),
        Duration::from_secs(5),
        Duration::from_millis(500),
    )
    .unwrap();
    let mut ha = start_with(Some(timing)).await;
    let (leader, follower) = ha.roles().await;
    let leases: Api<Lease> = Api::namespaced(ha.cluster.client.clone(), &ha.cluster.namespace);
    let stored = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
    assert_eq!(stored.lease_duration_seconds, Some(15));

    let stopped = Instant::now();
    ha.replicas[leader].op.take().unwrap().stop().await;
    let stop_took = stopped.elapsed();
    eventually("follower takes over", || async {
        ha.replicas[follower].leads().then_some(())
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("graceful stop took {stop_took:?}; hand-over {took:?} after stop() began");
    assert!(
        took < Duration::from_secs(2),
        "hand-over took {took:?} after a graceful stop; the lease duration is 15 s"
    );
    ha.wait_lease_holder(follower).await;
    ha.replicas[follower].op.take().unwrap().stop().await;
}

/// The binary's leader metric, read from its /metrics.
async fn binary_leads(op: &common::Operator) -> bool {
    leader_sample(&op.metrics().await) == Some(1)
}

/// The Lease flags reach the Lease and set the fail-over time after a crash: a leader killed
/// with SIGKILL releases nothing, so the other replica takes over once the Lease expires, within
/// `--lease-duration` (3 s here) of the leader's last renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_lease_duration_flag_bounds_the_fail_over() {
    let cluster = Cluster::start().await;
    let provider = Provider::start(FakeGoToConfig::default(), "http://127.0.0.1:1/callback").await;
    let flags = |identity: &'static str| {
        [
            "--leader-election=true",
            "--pod-name",
            identity,
            "--lease-duration",
            "3s",
            "--lease-renew-before",
            "1s",
            "--lease-retry-period",
            "500ms",
        ]
    };
    let mut ops = vec![
        common::Operator::start(&cluster, &provider, &flags("bin-a")).await,
        common::Operator::start(&cluster, &provider, &flags("bin-b")).await,
    ];
    let leader = eventually("a binary leads", || async {
        for (i, op) in ops.iter().enumerate() {
            if binary_leads(op).await {
                return Some(i);
            }
        }
        None
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let spec = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(3), "--lease-duration");

    let mut killed = ops.remove(leader);
    let at = Instant::now();
    killed.child.start_kill().expect("SIGKILL");
    let _ = killed.child.wait().await;
    let follower = &ops[0];
    eventually("the other binary takes over", || async {
        binary_leads(follower).await.then_some(())
    })
    .await;
    let took = at.elapsed();
    eprintln!("fail-over after SIGKILL: {took:?} (lease duration 3 s)");
    // The killed leader renewed at most 2 s before (every duration - renew-before), so its
    // Lease had 1-3 s left; kube-lease-manager waits up to 1 s more after clearing an expired
    // holder; 1 s of slack for 2 shared cores.
    assert!(
        took <= Duration::from_secs(5),
        "fail-over took {took:?}, lease duration 3 s"
    );
    let holder = leases.get(LEASE_NAME).await.unwrap().spec.unwrap();
    assert_eq!(
        holder.holder_identity.as_deref(),
        Some(["bin-a", "bin-b"][1 - leader])
    );
    ops.remove(0).stop().await;
}

/// Timings that cannot work together stop the binary at start with a message naming the flags.
#[test]
fn impossible_lease_timings_are_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .args([
            "run",
            "--public-url",
            "http://127.0.0.1:8080",
            "--lease-duration",
            "5s",
            "--lease-renew-before",
            "5s",
        ])
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .expect("run the binary");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--lease-renew-before (5s) must be shorter than --lease-duration (5s)"),
        "{stderr}"
    );
}

/// `goto_oauth_client_ready` and the token expiry of client `name` in one replica's metrics.
fn client_series(rendered: &str, namespace: &str, name: &str) -> (Option<f64>, Option<f64>) {
    let labels = [("namespace", namespace), ("name", name)];
    (
        metric(rendered, "goto_oauth_client_ready", &labels),
        metric(
            rendered,
            "goto_oauth_token_expiry_timestamp_seconds",
            &labels,
        ),
    )
}

/// Status and metrics tell the truth without a leader. While no replica leads (another holder
/// has the Lease) the access token expires: nobody may write, so the status still claims Ready,
/// but every replica's /metrics says not ready from its own watch. When a replica wins the Lease
/// its first write for the client corrects the status (Ready=False, TokenExpired) before the
/// refresh that makes it Ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_metrics_tell_the_truth_and_a_new_leader_corrects_the_status_first() {
    use futures::StreamExt;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use kube::runtime::{WatchStreamExt, watcher};

    let ha = start().await;
    let leader = ha.leader().await;
    ha.authorize("stale", leader).await;
    // Two more clients: the new leader corrects all three statuses before any refresh.
    ha.authorize("stale-b", leader).await;
    ha.authorize("stale-c", leader).await;
    let ns = ha.cluster.namespace.clone();
    // Every replica exports the client's series, the follower from its own watch.
    let expiry = eventually("both replicas export the client as ready", || async {
        let series: Vec<_> = ha
            .replicas
            .iter()
            .map(|r| client_series(&r.metrics(), &ns, "stale"))
            .collect();
        (series[0] == series[1] && series[0].0 == Some(1.0))
            .then_some(series[0].1)
            .flatten()
    })
    .await;

    // A holder elsewhere takes the Lease for an hour: the leader loses it at its next renewal.
    let leases: Api<Lease> = Api::namespaced(ha.cluster.client.clone(), &ns);
    let mut lease = leases.get(LEASE_NAME).await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("replica-elsewhere".into());
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    spec.lease_duration_seconds = Some(3600);
    leases
        .replace(LEASE_NAME, &Default::default(), &lease)
        .await
        .unwrap();
    eventually("no replica leads", || async {
        ha.replicas.iter().all(|r| !r.leads()).then_some(())
    })
    .await;

    // The token expires (60 min) with nobody to refresh it.
    ha.clock.advance(Duration::from_secs(61 * 60));
    for r in &ha.replicas {
        let series = eventually(&format!("{} reports not ready", r.identity), || async {
            let series = client_series(&r.metrics(), &ns, "stale");
            (series.0 == Some(0.0)).then_some(series)
        })
        .await;
        assert_eq!(series.1, Some(expiry), "the expiry is the stored token's");
    }
    let obj = ha.cluster.clients().get("stale").await.unwrap();
    assert_eq!(
        obj.condition("Ready").map(|c| c.status.as_str()),
        Some("True"),
        "nobody leads, so nobody writes: the status still lies"
    );
    assert_eq!(ha.provider.refresh_requests(), 0);
    ha.cluster.proxy().clear_request_log();
    // stale-c's correction fails twice (retried after 1 s, then 2 s): the others' refreshes
    // must wait for it all the same.
    ha.cluster.proxy().inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/gotooauthclients/stale-c/status".into(),
        status: 500,
        times: 2,
    });

    // Record every status the client goes through from here on.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let recorder = {
        let seen = seen.clone();
        let clients = ha.cluster.clients();
        tokio::spawn(async move {
            let mut objs = watcher(clients, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(obj)) = objs.next().await {
                if obj.metadata.name.as_deref() != Some("stale") {
                    continue;
                }
                let ready = obj
                    .condition("Ready")
                    .map(|c| format!("{}/{}", c.status, c.reason))
                    .unwrap_or_default();
                let expires = obj
                    .status
                    .and_then(|s| s.access_token_expires_at)
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                let mut seen = seen.lock().unwrap();
                if seen.last() != Some(&(ready.clone(), expires.clone())) {
                    seen.push((ready, expires));
                }
            }
        })
    };
    eventually("the recorder saw the stale status", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;

    // The Lease is released: a replica takes it and reconciles.
    let mut lease = leases.get(LEASE_NAME).await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = None;
    spec.renew_time = None;
    spec.acquire_time = None;
    spec.lease_duration_seconds = None;
    leases
        .replace(LEASE_NAME, &Default::default(), &lease)
        .await
        .unwrap();
    ha.cluster
        .wait_condition("stale", "Ready", "True", reason::AUTHORIZED)
        .await;
    for name in ["stale-b", "stale-c"] {
        ha.cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }
    eventually("each client refreshed once", || async {
        (ha.provider.refresh_requests() == 3).then_some(())
    })
    .await;
    // The API requests since the Lease was released, in order: every client's corrected
    // status was written before the first refreshed token was.
    let writes: Vec<String> = ha
        .cluster
        .proxy()
        .request_log()
        .into_iter()
        .filter(|r| r.verb == "patch" && r.status < 300)
        .map(|r| r.path)
        .collect();
    let first_token_write = writes
        .iter()
        .position(|p| p.contains("/secrets/"))
        .expect("refreshed tokens were written");
    let corrected: std::collections::BTreeSet<&str> = writes[..first_token_write]
        .iter()
        .filter_map(|p| p.strip_suffix("/status"))
        .filter_map(|p| p.rsplit('/').next())
        .collect();
    assert_eq!(
        corrected,
        ["stale", "stale-b", "stale-c"].into(),
        "statuses corrected before the first refresh: {writes:?}"
    );
    let ready_true = || {
        seen.lock()
            .unwrap()
            .last()
            .is_some_and(|(ready, _)| ready == "True/Authorized")
    };
    eventually("the recorder saw the refreshed status", || async {
        ready_true().then_some(())
    })
    .await;
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    eprintln!("statuses after the Lease was released: {seen:?}");
    let readiness: Vec<&str> = seen.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        readiness,
        ["True/Authorized", "False/TokenExpired", "True/Authorized"],
        "stale status, corrected status, refreshed status"
    );
    assert_eq!(
        seen[0].1, seen[1].1,
        "the correction names the expired token"
    );
    assert_ne!(seen[1].1, seen[2].1, "then a new token");
    ha.stop_all().await;
}
