//! The controller scenarios of the foundation issue, with the real operator binary against the
//! in-memory API server (or a real cluster, see `common::real_cluster`).

mod common;

use common::{Cluster, Operator, Provider, eventually};
use fake_goto::FakeGoToConfig;
use goto_oauth_operator::conditions::reason;
use kube::api::{DeleteParams, Patch, PatchParams};

/// The operator binary (leader election off) and a provider whose callback is never used here.
async fn start() -> (Cluster, Provider, Operator) {
    let cluster = Cluster::start().await;
    let provider = Provider::start(FakeGoToConfig::default(), "http://127.0.0.1:1/callback").await;
    let op = Operator::start(&cluster, &provider, &["--leader-election=false"]).await;
    (cluster, provider, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_client_secret_then_awaiting_authorization_then_idle_then_delete() {
    let (cluster, provider, op) = start().await;

    cluster
        .create_client(
            "demo",
            serde_json::json!({
                "clientId": provider.client_id,
                "clientSecretRef": {"name": "demo-credentials"},
                "scopes": ["identity:"],
            }),
        )
        .await;
    let obj = cluster
        .wait_condition("demo", "Ready", "False", reason::CLIENT_SECRET_MISSING)
        .await;
    let ready = obj.condition("Ready").unwrap();
    assert!(
        ready.message.contains("demo-credentials"),
        "{}",
        ready.message
    );
    assert_eq!(ready.observed_generation, Some(1));
    assert!(obj.status.as_ref().unwrap().authorization_url.is_none());
    let events = eventually("one ClientSecretMissing event", || async {
        let e = cluster.events_for("demo").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(
        events
            .iter()
            .filter(|(r, _)| r == reason::CLIENT_SECRET_MISSING)
            .count(),
        1,
        "{events:?}"
    );

    // Fixing the Secret triggers a reconcile without a restart.
    cluster
        .create_client_secret("demo-credentials", &provider.client_secret)
        .await;
    let (obj, url) = cluster.awaiting_authorization("demo").await;
    assert!(
        url.starts_with(&format!(
            "{}/authorize/{}/demo/",
            op.public_url, cluster.namespace
        )),
        "{url}"
    );
    assert!(
        url.rsplit('/').next().unwrap().len() >= 32,
        "link carries an unguessable token"
    );
    let authorized = obj.condition("Authorized").unwrap();
    assert_eq!(
        (authorized.status.as_str(), authorized.reason.as_str()),
        ("False", reason::AWAITING_AUTHORIZATION)
    );

    // Idle: touching metadata makes the controller reconcile, and it asks and writes nothing
    // (what it needs to know is in its watches and memory).
    let proxy = cluster.proxy();
    let before = cluster.operator_writes();
    let reconciles = || async {
        common::metrics::metric(
            &op.metrics().await,
            "goto_oauth_reconcile_duration_seconds_count",
            &[],
        )
        .unwrap_or_default()
    };
    for i in 0..3 {
        let done = reconciles().await;
        proxy.clear_request_log();
        let patch =
            serde_json::json!({"metadata": {"annotations": {"example.com/touch": i.to_string()}}});
        cluster
            .clients()
            .patch("demo", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        eventually("a reconcile after the touch", || async {
            (reconciles().await > done).then_some(())
        })
        .await;
        let reads: Vec<String> = proxy
            .request_log()
            .into_iter()
            .filter(|r| r.verb == "get" && r.path.contains("/secrets/"))
            .map(|r| r.path)
            .collect();
        assert_eq!(
            reads,
            Vec::<String>::new(),
            "an idle reconcile reads no Secret"
        );
    }
    let after = cluster.operator_writes();
    assert!(
        after.is_empty(),
        "idle reconciles wrote: {after:?} (before: {} writes)",
        before.len()
    );
    let obj = cluster.clients().get("demo").await.unwrap();
    assert_eq!(
        obj.status.as_ref().unwrap().authorization_url.as_deref(),
        Some(url.as_str()),
        "link is stable"
    );

    // Deleting the resource leaves nothing behind.
    cluster
        .clients()
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    cluster.wait_client_gone("demo").await;
    let leftovers: Vec<String> = cluster
        .secrets()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .filter(|n| n.starts_with("demo-token"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let status = op.stop().await;
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_waits_for_a_change_without_hot_looping() {
    let (cluster, provider, op) = start().await;
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;
    cluster
        .create_client(
            "bad",
            serde_json::json!({
                "clientId": provider.client_id,
                "clientSecretRef": {"name": "creds"},
                "redirectUri": "http://example.com/callback",
                "refreshBefore": "whenever",
            }),
        )
        .await;
    let obj = cluster
        .wait_condition("bad", "Ready", "False", reason::INVALID_SPEC)
        .await;
    let message = &obj.condition("Ready").unwrap().message;
    assert!(
        message.contains("spec.redirectUri") && message.contains("spec.refreshBefore"),
        "{message}"
    );
    assert!(obj.status.as_ref().unwrap().authorization_url.is_none());

    let proxy = cluster.proxy();
    // No hot loop: with nothing changing, the controller does not keep reading or writing.
    // An unrelated change elsewhere (a new Secret) proves the operator is alive and watching.
    proxy.clear_request_log();
    cluster.create_client_secret("unrelated", "x").await;
    cluster.create_client_secret("unrelated-2", "x").await;
    eventually("the operator saw the unrelated secrets", || async {
        let log = proxy.request_log();
        (log.iter()
            .filter(|r| r.verb == "create" && r.path.contains("/secrets"))
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    let reads = proxy
        .request_log()
        .iter()
        .filter(|r| r.path.contains("/gotooauthclients/bad") || r.path.contains("/secrets/creds"))
        .count();
    assert!(
        reads <= 2,
        "a bad spec should not be retried in a loop ({reads} requests)"
    );

    // Fixing the spec recovers.
    let patch = serde_json::json!({"spec": {"redirectUri": null, "refreshBefore": "15m"}});
    cluster
        .clients()
        .patch("bad", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let obj = cluster
        .wait_condition("bad", "Ready", "False", reason::AWAITING_AUTHORIZATION)
        .await;
    assert_eq!(obj.condition("Ready").unwrap().observed_generation, Some(2));
    drop(op);
}
