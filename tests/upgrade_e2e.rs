//! Upgrades and downgrades between the previous release and this one, end to end (issue 13).
//!
//! The previous release is built from its pinned git revision ([`PREVIOUS_RELEASE`]): its source
//! is extracted with `git archive` under `target/previous-release/src` and built there with its
//! own `CARGO_TARGET_DIR` (`target/previous-release/target`, excluded from the workspace), once
//! per run of this test binary; a later run reuses the build. `git archive` rather than
//! `git worktree add`, so that the shared repository metadata never holds a stale worktree. No
//! binary is committed. Without the git history (a shallow clone) the tests FAIL, saying so.
//! `GOTO_OAUTH_SKIP_UPGRADE_TEST=1` skips the three tests that build and run the previous release
//! (its first build takes about 10 minutes on 2 cores), each with a `SKIPPED` line on stderr; CI
//! does not set it.
//!
//! Scenarios, each against the in-memory API server (or a real cluster when
//! `GOTO_OAUTH_E2E_REAL_CLUSTER=1`), behind the request-logging proxy, with the fake GoTo:
//!
//! - [`upgrade_takes_over_every_client_without_a_new_consent`]: the old binary brings clients
//!   into every state, then the new binary takes over the same store;
//! - [`rolling_upgrade_with_an_old_and_a_new_replica`]: both side by side under leader election;
//! - [`downgrade_to_the_previous_release_keeps_tokens`]: the old binary on what the new one wrote;
//! - [`helm_upgrade_from_the_previous_chart`]: both charts render and the upgrade needs no manual
//!   step (plus a server-side dry run on a real cluster).

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant, SystemTime},
};

use common::{
    Browser, Cluster, Operator, Provider, eventually, eventually_within, free_port,
    metrics::metric, real_cluster,
};
use fake_goto::{Decision, FakeGoToConfig};
use goto_oauth_operator::{
    conditions::reason,
    resource::{AuthorizationPhase, FORCE_REFRESH_ANNOTATION, GoToOAuthClient},
    secret::{ACCESS_TOKEN_KEY, EXPIRES_AT_KEY, REFRESH_TOKEN_KEY},
};
use k8s_openapi::{ByteString, api::coordination::v1::Lease};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde::Deserialize as _;
use serde_json::json;

/// The last commit of release 0.1.0.
const PREVIOUS_RELEASE: &str = "3ae622e5c4052cfd78dd39f1bf6ab6a6d8838425";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Set to `1` to skip the tests that need the previous release's binary, rather than build it.
const SKIP_ENV: &str = "GOTO_OAUTH_SKIP_UPGRADE_TEST";

/// The previous release's operator binary, built on first use (once per test binary); `None`,
/// after a visible notice, when [`SKIP_ENV`] is `1`.
fn previous_release(test: &str) -> Option<&'static Path> {
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
        // must be seen.
        let notice = format!(
            "SKIPPED {test}: {SKIP_ENV}=1, the previous release {PREVIOUS_RELEASE} is not built\n"
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
        return None;
    }
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(build_previous_release) {
        Ok(path) => Some(path),
        Err(e) => panic!("cannot build the previous release {PREVIOUS_RELEASE}: {e}"),
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// Extracts `paths` (all when empty) of the previous release into `into`, through `tar`.
fn extract_previous_release(paths: &[&str], tar: &Path, into: &Path) -> Result<(), String> {
    run(
        Command::new("git")
            .args(["archive", "--format=tar", "-o"])
            .arg(tar)
            .arg(PREVIOUS_RELEASE)
            .args(paths)
            .current_dir(repo_root()),
        "git archive of the previous release (needs a clone with full history)",
    )?;
    run(
        Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(into),
        "tar -x",
    )
}

fn build_previous_release() -> Result<PathBuf, String> {
    let base = repo_root().join("target/previous-release");
    let src = base.join("src");
    let marker = src.join(".extracted");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(PREVIOUS_RELEASE) {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).map_err(|e| format!("create {}: {e}", src.display()))?;
        extract_previous_release(&[], &base.join("src.tar"), &src)?;
        std::fs::write(&marker, PREVIOUS_RELEASE).map_err(|e| e.to_string())?;
    }
    let started = Instant::now();
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--locked", "--bin", "goto-oauth-operator"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", base.join("target")),
        "cargo build of the previous release",
    )?;
    eprintln!(
        "upgrade_e2e: previous release {PREVIOUS_RELEASE} built (or found up to date) in {:?}",
        started.elapsed()
    );
    Ok(base.join("target/debug/goto-oauth-operator"))
}

// ------------------------------------------------------------------------------------------------
// What is stored, and what was written
// ------------------------------------------------------------------------------------------------

async fn client(cluster: &Cluster, name: &str) -> GoToOAuthClient {
    cluster.clients().get(name).await.expect("get client")
}

/// The `Ready` and `Authorized` reasons.
fn reasons(obj: &GoToOAuthClient) -> (String, String) {
    let r = |t: &str| {
        obj.condition(t)
            .map(|c| c.reason.clone())
            .unwrap_or_default()
    };
    (r("Ready"), r("Authorized"))
}

fn phase(obj: &GoToOAuthClient) -> Option<AuthorizationPhase> {
    obj.status.as_ref()?.authorization.as_ref().map(|a| a.phase)
}

fn link(obj: &GoToOAuthClient) -> String {
    obj.status
        .as_ref()
        .and_then(|s| s.authorization_url.clone())
        .expect("status.authorizationUrl")
}

fn next_refresh(obj: &GoToOAuthClient) -> SystemTime {
    let t = obj
        .status
        .as_ref()
        .and_then(|s| s.next_refresh_time.clone())
        .expect("status.nextRefreshTime");
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64)
}

async fn secret_data(cluster: &Cluster, name: &str) -> BTreeMap<String, ByteString> {
    cluster
        .token_secret(name)
        .await
        .and_then(|s| s.data)
        .unwrap_or_else(|| panic!("{name}'s token Secret has data"))
}

/// The Secret's keys apart from the ones a refresh replaces.
fn without_refreshed(mut data: BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    for key in [ACCESS_TOKEN_KEY, EXPIRES_AT_KEY, REFRESH_TOKEN_KEY] {
        data.remove(key);
    }
    data
}

/// Status writes to the named client and Secret writes, in the proxy's log from `from` on.
fn writes_since(cluster: &Cluster, from: usize, name: &str) -> (usize, usize) {
    let log = cluster.proxy().request_log();
    let writes: Vec<_> = log
        .iter()
        .skip(from)
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch"))
        .collect();
    let status = writes
        .iter()
        .filter(|r| {
            r.path
                .ends_with(&format!("/gotooauthclients/{name}/status"))
        })
        .count();
    let secrets = writes
        .iter()
        .filter(|r| r.path.contains(&format!("/secrets/{name}-token")))
        .count();
    (status, secrets)
}

fn log_len(cluster: &Cluster) -> usize {
    cluster.proxy().request_log().len()
}

async fn request_refresh(cluster: &Cluster, name: &str, value: &str) {
    cluster
        .clients()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {FORCE_REFRESH_ANNOTATION: value}}})),
        )
        .await
        .expect("annotate client");
}

/// Waits until the client is `Ready` and `Authorized` with the phase the new release writes.
async fn wait_authorized_by_new_release(cluster: &Cluster, name: &str) {
    eventually(
        &format!("{name} authorized under the new release"),
        || async {
            let obj = client(cluster, name).await;
            (phase(&obj) == Some(AuthorizationPhase::Authorized)
                && reasons(&obj).0 == reason::AUTHORIZED)
                .then_some(())
        },
    )
    .await;
}

async fn wait_refresh_handled(cluster: &Cluster, name: &str, value: &str) -> GoToOAuthClient {
    eventually(
        &format!("{name} handled refresh request {value}"),
        || async {
            let obj = client(cluster, name).await;
            let handled = obj.status.as_ref()?.handled_refresh_request.as_deref() == Some(value);
            handled.then_some(obj)
        },
    )
    .await
}

/// `spec.endpoints` naming `p`, and the `host:port` to allow for it.
fn endpoints_of(p: &Provider) -> (serde_json::Value, String) {
    let endpoints = json!({"endpoints": {
        "authorizeUrl": p.goto.authorize_url(),
        "tokenUrl": p.goto.token_url(),
    }});
    let host = p.goto.base_url().trim_start_matches("http://").to_string();
    (endpoints, host)
}

/// Opens `link` and consents at GoTo; returns the browser and the callback URL, not yet followed:
/// an attempt in flight.
async fn attempt_in_flight(provider: &Provider, link: &str) -> (Browser, String) {
    let mut browser = Browser::new();
    let back = provider
        .consent_via(&mut browser, link, Decision::Allow)
        .await;
    (browser, back)
}

async fn allow(provider: &Provider, link: &str) {
    let (_, page) = provider.allow(link).await;
    assert_eq!(page.status, 200, "{}", page.body);
}

// ------------------------------------------------------------------------------------------------
// In-place upgrade
// ------------------------------------------------------------------------------------------------

/// Clients of the main provider (tokens live an hour: they refresh neither under the old nor
/// under the new binary during the test, so every write seen is one the upgrade caused).
const STILL: [&str; 5] = ["authorized", "awaiting", "reauth", "midrotation", "denied"];
const REAUTH_CLIENT_ID: &str = "0f0e8c7a-6c3d-4d1e-9a51-goto-reauth";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_takes_over_every_client_without_a_new_consent() {
    let Some(old) = previous_release("upgrade_takes_over_every_client_without_a_new_consent")
    else {
        return;
    };
    let started = Instant::now();
    let cluster = Cluster::start().await;
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let provider = Provider::start(FakeGoToConfig::default(), &redirect).await;
    provider.register(REAUTH_CLIENT_ID, vec![redirect.clone()], "reauth");
    // Providers of their own: faults injected at `failing` hit only the refresh-failing client,
    // and `scheduled`'s tokens live 60 s, so its next refresh falls within the test.
    let failing = Provider::start(FakeGoToConfig::default(), &redirect).await;
    let scheduled = Provider::start(
        FakeGoToConfig {
            expires_in: 60,
            ..Default::default()
        },
        &redirect,
    )
    .await;
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;
    cluster
        .create_client_secret("failing-creds", &failing.client_secret)
        .await;
    cluster
        .create_client_secret("scheduled-creds", &scheduled.client_secret)
        .await;

    // ---- the previous release brings clients into every state ----
    let op =
        Operator::start_binary(old, &cluster, &provider, port, &["--leader-election=false"]).await;
    for name in STILL {
        let extra = if name == "reauth" {
            json!({"clientId": REAUTH_CLIENT_ID})
        } else {
            json!({})
        };
        cluster.create_client(name, provider.spec(extra)).await;
    }
    let (failing_endpoints, failing_host) = endpoints_of(&failing);
    let mut spec = failing.spec(failing_endpoints);
    spec["clientSecretRef"] = json!({"name": "failing-creds"});
    cluster.create_client("failing", spec).await;

    // First the two that need a refresh attempt: the previous release sends none within 30 s of
    // a consent, so their refreshes are requested now and awaited after the other set-up.
    allow(&provider, &cluster.authorization_link("reauth").await).await;
    allow(&failing, &cluster.authorization_link("failing").await).await;
    cluster
        .wait_condition("reauth", "Ready", "True", reason::AUTHORIZED)
        .await;
    provider.goto.revoke_refresh_tokens(REAUTH_CLIENT_ID);
    request_refresh(&cluster, "reauth", "1").await;
    cluster
        .wait_condition("failing", "Ready", "True", reason::AUTHORIZED)
        .await;
    failing.goto.set_random_faults(1.0, 13);
    request_refresh(&cluster, "failing", "1").await;
    for name in ["authorized", "midrotation"] {
        allow(&provider, &cluster.authorization_link(name).await).await;
    }
    let mut browser = Browser::new();
    let back = provider
        .consent_via(
            &mut browser,
            &cluster.authorization_link("denied").await,
            Decision::Deny,
        )
        .await;
    assert_eq!(browser.get(&back).await.status, 403);
    cluster
        .wait_condition("denied", "Authorized", "False", reason::ACCESS_DENIED)
        .await;

    // Re-authorization required (GoTo rejected the refresh token); refresh failing (every
    // request to its provider fails transiently).
    for (name, ready, why) in [
        ("reauth", "True", reason::REAUTHORIZATION_REQUIRED),
        ("failing", "True", reason::REFRESH_FAILING),
    ] {
        eventually_within(
            Duration::from_secs(60),
            &format!("{name} Ready={ready}/{why}"),
            || async {
                let obj = client(&cluster, name).await;
                let c = obj.condition("Ready")?;
                (c.status == ready && c.reason == why).then_some(())
            },
        )
        .await;
    }

    // Mid-rotation: authorized, and its new link opened and consented to at GoTo, but GoTo's
    // redirect back not yet followed.
    let mid_link = link(
        &cluster
            .wait_condition("midrotation", "Ready", "True", reason::AUTHORIZED)
            .await,
    );
    let (mut mid_browser, mid_back) = attempt_in_flight(&provider, &mid_link).await;

    // Last, so that its refresh (40 s after the consent) falls under the new binary.
    let (scheduled_endpoints, scheduled_host) = endpoints_of(&scheduled);
    let mut spec = scheduled.spec(scheduled_endpoints);
    spec["clientSecretRef"] = json!({"name": "scheduled-creds"});
    cluster.create_client("scheduled", spec).await;
    allow(&scheduled, &cluster.authorization_link("scheduled").await).await;
    cluster
        .wait_condition("scheduled", "Ready", "True", reason::AUTHORIZED)
        .await;
    for name in ["authorized", "midrotation"] {
        cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }

    // ---- what the previous release stored ----
    let all: Vec<&str> = STILL
        .iter()
        .copied()
        .chain(["failing", "scheduled"])
        .collect();
    let mut before = BTreeMap::new();
    for name in &all {
        let obj = client(&cluster, name).await;
        assert!(
            phase(&obj).is_none(),
            "the previous release has no status.authorization"
        );
        before.insert(*name, obj);
    }
    let mut secrets_before = BTreeMap::new();
    for name in [
        "authorized",
        "reauth",
        "midrotation",
        "failing",
        "scheduled",
    ] {
        secrets_before.insert(name, secret_data(&cluster, name).await);
    }
    let refreshes_before = provider.refresh_requests();
    assert!(
        op.stop().await.success(),
        "the previous release stops cleanly"
    );

    // ---- the new release on the same store ----
    let from = log_len(&cluster);
    let allowed = format!("{failing_host},{scheduled_host}");
    let op = Operator::start_on(
        &cluster,
        &provider,
        port,
        &[
            "--leader-election=false",
            "--allowed-endpoint-hosts",
            &allowed,
        ],
    )
    .await;
    let mut upgraded = BTreeMap::new();
    for name in &all {
        let obj = eventually(&format!("{name} has status.authorization"), || async {
            let obj = client(&cluster, name).await;
            phase(&obj).is_some().then_some(obj)
        })
        .await;
        upgraded.insert(*name, obj.clone());
        let expected = match *name {
            // A consent failure the previous release recorded only in its conditions: the new
            // release cannot tell it from "no consent yet" and shows the link again.
            "denied" => (
                reason::AWAITING_AUTHORIZATION.to_string(),
                reason::AWAITING_AUTHORIZATION.to_string(),
            ),
            _ => reasons(&before[name]),
        };
        assert_eq!(reasons(&obj), expected, "{name}'s condition reasons");
        assert_eq!(link(&obj), link(&before[name]), "{name}'s link is kept");
    }
    let phases: BTreeMap<&str, Option<AuthorizationPhase>> = {
        let mut m = BTreeMap::new();
        for name in &all {
            m.insert(*name, phase(&client(&cluster, name).await));
        }
        m
    };
    use AuthorizationPhase::*;
    for (name, expected) in [
        ("authorized", Authorized),
        ("awaiting", AwaitingAuthorization),
        ("reauth", ReauthorizationRequired),
        ("midrotation", Authorized),
        ("denied", AwaitingAuthorization),
        ("failing", Authorized),
        ("scheduled", Authorized),
    ] {
        assert_eq!(phases[name], Some(expected), "{name}'s phase");
    }
    for (name, data) in &secrets_before {
        assert_eq!(
            &secret_data(&cluster, name).await,
            data,
            "{name}'s token Secret is byte-identical"
        );
    }

    assert_eq!(
        writes_since(&cluster, from, "failing").1,
        0,
        "no Secret write while refreshes fail"
    );
    failing.goto.set_random_faults(0.0, 13);

    // ---- refresh continues on schedule (and settles the writes above) ----
    let refreshed = eventually_within(
        Duration::from_secs(90),
        "scheduled's refresh under the new release",
        || async { (scheduled.refresh_requests() == 1).then(SystemTime::now) },
    )
    .await;
    // The new release spreads refreshes (README "When tokens refresh"): it may move the
    // previous release's time once, within its window, and then keeps to its own.
    let rescheduled_at = next_refresh(&upgraded["scheduled"]);
    let expires_at = |obj: &GoToOAuthClient| {
        let t = obj
            .status
            .as_ref()
            .and_then(|s| s.access_token_expires_at.clone())
            .expect("status.accessTokenExpiresAt");
        SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64)
    };
    let expiry = expires_at(&before["scheduled"]);
    assert!(
        rescheduled_at <= expiry - Duration::from_secs(20)
            && rescheduled_at >= expiry - Duration::from_secs(30),
        "rescheduled within the window: 30 s after issue at the earliest, refreshBefore (20 s) before expiry at the latest"
    );
    assert!(
        refreshed + Duration::from_secs(1) >= rescheduled_at,
        "not refreshed before its schedule"
    );
    let obj = eventually("scheduled's refreshed status", || async {
        let obj = client(&cluster, "scheduled").await;
        (next_refresh(&obj) > rescheduled_at).then_some(obj)
    })
    .await;
    assert_eq!(reasons(&obj), reasons(&before["scheduled"]));
    let data = secret_data(&cluster, "scheduled").await;
    assert_ne!(
        data[ACCESS_TOKEN_KEY], secrets_before["scheduled"][ACCESS_TOKEN_KEY],
        "a new access token"
    );
    assert_eq!(
        without_refreshed(data),
        without_refreshed(secrets_before["scheduled"].clone()),
        "the public keys a refresh does not replace are byte-identical"
    );
    assert_eq!(
        writes_since(&cluster, from, "scheduled"),
        (2, 1),
        "scheduled: one status write for the upgrade, one status and one Secret write for the refresh"
    );

    // Nothing rewritten that did not need to be: one status write each (to add
    // status.authorization), no Secret write, no refresh of a client that was not due.
    for name in STILL {
        assert_eq!(
            writes_since(&cluster, from, name),
            (1, 0),
            "{name}: exactly one status write and no Secret write after the upgrade"
        );
    }
    assert_eq!(
        provider.refresh_requests(),
        refreshes_before,
        "no refresh was due"
    );

    // ---- refresh failing: recovers on the retry schedule ----
    eventually_within(
        Duration::from_secs(90),
        "failing Ready=True/Authorized",
        || async {
            (reasons(&client(&cluster, "failing").await).0 == reason::AUTHORIZED).then_some(())
        },
    )
    .await;
    let data = secret_data(&cluster, "failing").await;
    assert_ne!(
        data[ACCESS_TOKEN_KEY],
        secrets_before["failing"][ACCESS_TOKEN_KEY]
    );
    assert_eq!(
        data[REFRESH_TOKEN_KEY], secrets_before["failing"][REFRESH_TOKEN_KEY],
        "the consent is kept"
    );

    // ---- links published by the previous release ----
    // An attempt started under the previous release (no `link` claim in its state) is refused
    // with a clear page; nothing is written and the tokens stay.
    let page = mid_browser.get(&mid_back).await;
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(
        page.body
            .contains("This authorization link is no longer valid"),
        "{}",
        page.body
    );
    assert_eq!(
        secret_data(&cluster, "midrotation").await,
        secrets_before["midrotation"]
    );
    // The link itself still works under the new release.
    allow(&provider, &mid_link).await;
    eventually("midrotation's new consent stored", || async {
        let data = secret_data(&cluster, "midrotation").await;
        (data[ACCESS_TOKEN_KEY] != secrets_before["midrotation"][ACCESS_TOKEN_KEY]).then_some(())
    })
    .await;
    for name in ["awaiting", "denied", "reauth"] {
        allow(&provider, &link(&before[name])).await;
        cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }
    for name in ["authorized", "midrotation"] {
        cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }
    assert_eq!(
        secret_data(&cluster, "authorized").await,
        secrets_before["authorized"],
        "the authorized client's Secret was never rewritten"
    );
    assert!(op.stop().await.success());
    eprintln!("upgrade_e2e: in-place upgrade took {:?}", started.elapsed());
}

// ------------------------------------------------------------------------------------------------
// Rolling upgrade: an old and a new replica side by side
// ------------------------------------------------------------------------------------------------

fn leads(metrics: &str) -> Option<bool> {
    metric(metrics, "goto_oauth_leader", &[]).map(|v| v == 1.0)
}

async fn lease(cluster: &Cluster) -> Lease {
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    leases.get("goto-oauth-operator").await.expect("the Lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_with_an_old_and_a_new_replica() {
    let Some(old) = previous_release("rolling_upgrade_with_an_old_and_a_new_replica") else {
        return;
    };
    let started = Instant::now();
    let cluster = Cluster::start().await;
    let (port_old, port_new) = (free_port(), free_port());
    let callbacks = [port_old, port_new].map(|p| format!("http://127.0.0.1:{p}/callback"));
    let provider = Provider::start(FakeGoToConfig::default(), &callbacks[0]).await;
    provider.register(&provider.client_id, callbacks.to_vec(), "rolling");
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;
    let replica = |pod: &'static str| ["--leader-election=true", "--pod-name", pod];

    // Before the rollout: the old replica leads and has authorized a client.
    let op_old =
        Operator::start_binary(old, &cluster, &provider, port_old, &replica("old-a")).await;
    eventually("the old replica leads", || async {
        leads(&op_old.metrics().await)?.then_some(())
    })
    .await;
    let via = |i: usize| json!({"redirectUri": callbacks[i]});
    cluster.create_client("before", provider.spec(via(0))).await;
    allow(&provider, &cluster.authorization_link("before").await).await;
    cluster
        .wait_condition("before", "Ready", "True", reason::AUTHORIZED)
        .await;

    // The new replica starts beside it and waits for the Lease.
    let op_new = Operator::start_on(&cluster, &provider, port_new, &replica("new-b")).await;
    eventually("the new replica follows", || async {
        (!leads(&op_new.metrics().await)?).then_some(())
    })
    .await;
    let holder_before = lease(&cluster).await.spec.expect("Lease spec");
    assert_eq!(holder_before.holder_identity.as_deref(), Some("old-a"));

    // Side by side: links opened at the new replica (behind one Service either replica answers)
    // complete through either replica's callback.
    let from_overlap = log_len(&cluster);
    let at_new = |link: String| link.replacen(&op_old.public_url, &op_new.public_url, 1);
    for (name, i) in [("via-new", 1), ("via-old", 0)] {
        cluster.create_client(name, provider.spec(via(i))).await;
        allow(&provider, &at_new(cluster.authorization_link(name).await)).await;
        cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
    }
    // An attempt the old replica started has no `link` claim in its state: the new replica's
    // callback refuses it with a clear page, and the same link opened again completes.
    cluster.create_client("mixed", provider.spec(via(1))).await;
    let mixed_link = cluster.authorization_link("mixed").await;
    let (_, page) = provider.allow(&mixed_link).await;
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(
        page.body
            .contains("This authorization link is no longer valid")
    );
    allow(&provider, &at_new(mixed_link)).await;
    cluster
        .wait_condition("mixed", "Ready", "True", reason::AUTHORIZED)
        .await;
    request_refresh(&cluster, "before", "during-rollout").await;
    wait_refresh_handled(&cluster, "before", "during-rollout").await;
    assert_eq!(provider.refresh_requests(), 1, "the leader refreshed once");
    let overlap: Vec<_> = ["before", "via-new", "via-old", "mixed"]
        .iter()
        .map(|n| (*n, writes_since(&cluster, from_overlap, n)))
        .collect();
    assert!(
        !leads(&op_new.metrics().await).unwrap_or(true),
        "the new replica never led while the old one held the Lease"
    );

    // The old replica stops (it releases the Lease) and the new one takes over.
    let from_handover = log_len(&cluster);
    assert!(op_old.stop().await.success());
    eventually("the new replica leads", || async {
        leads(&op_new.metrics().await)?.then_some(())
    })
    .await;
    let holder_after = lease(&cluster).await.spec.expect("Lease spec");
    assert_eq!(holder_after.holder_identity.as_deref(), Some("new-b"));
    if let (Some(a), Some(b)) = (
        holder_before.lease_transitions,
        holder_after.lease_transitions,
    ) {
        assert_eq!(b, a + 1, "the Lease changed hands once");
    }
    for name in ["before", "via-new", "via-old", "mixed"] {
        wait_authorized_by_new_release(&cluster, name).await;
    }
    // A consent through the new leader's callback settles the controller's queue.
    cluster.create_client("after", provider.spec(via(1))).await;
    allow(&provider, &cluster.authorization_link("after").await).await;
    cluster
        .wait_condition("after", "Ready", "True", reason::AUTHORIZED)
        .await;

    eprintln!("upgrade_e2e: writes while side by side: {overlap:?}");
    let handover: Vec<_> = ["before", "via-new", "via-old", "mixed"]
        .iter()
        .map(|n| (*n, writes_since(&cluster, from_handover, n)))
        .collect();
    eprintln!("upgrade_e2e: writes after the handover: {handover:?}");
    // While side by side, the old leader drops status.authorization from what the new
    // replica's callback wrote (one write each); after the handover the new leader adds it back
    // once and nothing moves again: no back and forth.
    for (name, writes) in &handover {
        assert_eq!(
            *writes,
            (1, 0),
            "{name}: one status write (adding status.authorization), no Secret write after the handover"
        );
    }
    assert_eq!(
        provider.refresh_requests(),
        1,
        "the refresh requested under the old leader is not repeated by the new one"
    );
    assert!(op_new.stop().await.success());
    eprintln!("upgrade_e2e: rolling upgrade took {:?}", started.elapsed());
}

// ------------------------------------------------------------------------------------------------
// Downgrade
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_to_the_previous_release_keeps_tokens() {
    let Some(old) = previous_release("downgrade_to_the_previous_release_keeps_tokens") else {
        return;
    };
    let cluster = Cluster::start().await;
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let provider = Provider::start(FakeGoToConfig::default(), &redirect).await;
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;

    // The new release authorizes one client and has an attempt in flight for another.
    let op = Operator::start_on(&cluster, &provider, port, &["--leader-election=false"]).await;
    for name in ["kept", "pending"] {
        cluster.create_client(name, provider.spec(json!({}))).await;
    }
    allow(&provider, &cluster.authorization_link("kept").await).await;
    let kept = cluster
        .wait_condition("kept", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(phase(&kept), Some(AuthorizationPhase::Authorized));
    let (mut browser, back) =
        attempt_in_flight(&provider, &cluster.authorization_link("pending").await).await;
    let kept_secret = secret_data(&cluster, "kept").await;
    assert!(op.stop().await.success());

    // The previous release on that store.
    let op =
        Operator::start_binary(old, &cluster, &provider, port, &["--leader-election=false"]).await;
    let page = browser.get(&back).await;
    assert_eq!(
        page.status, 200,
        "an attempt started under the new release completes under the old one: {}",
        page.body
    );
    let pending = cluster
        .wait_condition("pending", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(
        phase(&pending),
        None,
        "the previous release drops status.authorization when it writes the status"
    );
    let obj = cluster
        .wait_condition("kept", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(reasons(&obj).1, reason::AUTHORIZED);
    assert_eq!(
        secret_data(&cluster, "kept").await,
        kept_secret,
        "tokens kept"
    );
    request_refresh(&cluster, "kept", "after-downgrade").await;
    let obj = wait_refresh_handled(&cluster, "kept", "after-downgrade").await;
    assert_eq!(reasons(&obj).0, reason::AUTHORIZED);
    assert_eq!(phase(&obj), None, "dropped on its next status write");
    assert_eq!(
        without_refreshed(secret_data(&cluster, "kept").await),
        without_refreshed(kept_secret),
    );
    assert!(op.stop().await.success());

    // And up again: the new release reads what the old one wrote.
    let op = Operator::start_on(&cluster, &provider, port, &["--leader-election=false"]).await;
    for name in ["kept", "pending"] {
        wait_authorized_by_new_release(&cluster, name).await;
    }
    assert!(op.stop().await.success());
}

// ------------------------------------------------------------------------------------------------
// Helm upgrade
// ------------------------------------------------------------------------------------------------

const CHART: &str = "charts/goto-oauth-operator";

fn helm_bin() -> PathBuf {
    let path = repo_root().join(".tools/bin/helm");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/install-test-deps.sh (or set GOTO_OAUTH_SKIP_TOOL_TESTS=1 to skip)",
        path.display()
    );
    path
}

/// Whether `test` may run: helm is installed, or it is missing and GOTO_OAUTH_SKIP_TOOL_TESTS=1
/// skips the test with a visible notice (as `tool()` in tests/manifests.rs does). Missing without
/// the opt-out fails, in [`helm_bin`].
fn helm_or_skip(test: &str) -> bool {
    let path = repo_root().join(".tools/bin/helm");
    if path.is_file() || std::env::var("GOTO_OAUTH_SKIP_TOOL_TESTS").as_deref() != Ok("1") {
        return true;
    }
    let notice = format!(
        "SKIPPED {test}: {} not installed and GOTO_OAUTH_SKIP_TOOL_TESTS=1\n",
        path.display()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
    false
}

/// `helm template` of the chart at `chart`, as JSON values.
fn render(chart: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let home = tempfile::tempdir().expect("tempdir");
    let out = Command::new(helm_bin())
        .args(["template", "goto-oauth-operator"])
        .arg(chart)
        .args(["--namespace", "goto-oauth-operator"])
        .args(["--set", "publicUrl=https://goto-oauth.example.com"])
        .args(extra)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template {} failed:\n{}",
        chart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn kind_names(docs: &[serde_json::Value]) -> std::collections::BTreeSet<(String, String)> {
    docs.iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_string(),
                d["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn helm_upgrade_from_the_previous_chart() {
    if !helm_or_skip("helm_upgrade_from_the_previous_chart") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    extract_previous_release(&[CHART], &dir.path().join("chart.tar"), dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    let old_chart = dir.path().join(CHART);
    let new_chart = repo_root().join(CHART);
    let chart_version = |chart: &Path| {
        let text = std::fs::read_to_string(chart.join("Chart.yaml")).expect("Chart.yaml");
        let v: serde_json::Value = serde_yaml::from_str(&text).expect("Chart.yaml is YAML");
        (v["version"].clone(), v["appVersion"].clone())
    };
    assert_eq!(chart_version(&old_chart), (json!("0.1.0"), json!("0.1.0")));
    assert_eq!(chart_version(&new_chart), (json!("0.3.0"), json!("0.3.0")));
    assert_eq!(
        toml_version(),
        "0.3.0",
        "Cargo.toml and the chart's appVersion agree"
    );

    let old = render(&old_chart, &[]);
    let new = render(&new_chart, &[]);
    // The previous chart's values are still accepted by the new one (values.schema.json).
    let old_values = old_chart.join("values.yaml");
    render(
        &new_chart,
        &["--values", old_values.to_str().expect("UTF-8 path")],
    );

    // The CRD is rendered (and so upgraded) while crds.install is on, and kept on uninstall.
    let crd = find(&new, "CustomResourceDefinition");
    assert_eq!(crd.len(), 1, "the new chart renders the CRD");
    assert_eq!(
        crd[0]["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the CRD is kept on uninstall"
    );
    assert_eq!(
        find(&old, "CustomResourceDefinition").len(),
        1,
        "the previous chart owned the CRD too, so the upgrade updates it in place"
    );
    let new_crd =
        std::fs::read_to_string(repo_root().join("crds/gotooauthclients.goto-oauth.dev.yaml"))
            .expect("crds/");
    let new_crd: serde_json::Value = serde_yaml::from_str(&new_crd).expect("CRD YAML");
    assert_eq!(
        crd[0]["spec"], new_crd["spec"],
        "the chart upgrades the CRD to this release's schema"
    );

    // Nothing the previous chart installed disappears or is renamed (helm would delete it).
    let missing: Vec<_> = kind_names(&old)
        .difference(&kind_names(&new))
        .cloned()
        .collect();
    assert!(
        missing.is_empty(),
        "objects the upgrade would delete: {missing:?}"
    );

    // Immutable fields: a changed Deployment selector would need a manual delete.
    for kind in ["Deployment", "PodDisruptionBudget", "Service"] {
        let selector = |docs: &[serde_json::Value]| {
            find(docs, kind)
                .iter()
                .map(|d| d["spec"]["selector"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(selector(&old), selector(&new), "{kind} selector unchanged");
    }
    let template_labels = |docs: &[serde_json::Value]| {
        find(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"].clone()
    };
    let selector = find(&new, "Deployment")[0]["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
        .clone();
    for (k, v) in selector {
        assert_eq!(
            template_labels(&new)[&k],
            v,
            "the new pods match the selector"
        );
    }
    let image = |docs: &[serde_json::Value]| {
        find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert!(image(&new).ends_with(":0.3.0"), "{}", image(&new));

    if real_cluster() {
        server_side_dry_run(&new);
    }
}

fn toml_version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// `kubectl apply --server-side --dry-run=server` of the new render on the real cluster.
fn server_side_dry_run(docs: &[serde_json::Value]) {
    let kubectl = repo_root().join(".tools/bin/kubectl");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("render.json");
    let list = json!({"apiVersion": "v1", "kind": "List", "items": docs});
    std::fs::write(&file, list.to_string()).expect("write render");
    run(
        Command::new(&kubectl)
            .args([
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=helm",
                "-f",
            ])
            .arg(&file),
        "kubectl apply --server-side --dry-run=server of the new chart",
    )
    .unwrap_or_else(|e| panic!("{e}"));
}
