//! The internet-facing endpoint tried as an attacker would (issue: harden the consent
//! endpoint): wrong links cost no API request, stale or foreign attempts write nothing, a
//! replaced link takes its attempts along, attempts are bounded, the expiry second is past,
//! and every consent names its GoTo account. Runs against the in-memory API server or, with
//! `GOTO_OAUTH_E2E_REAL_CLUSTER=1` + `KUBECONFIG`, a real cluster.

mod common;

use std::time::{Duration, Instant};

use common::{Browser, Cluster, Stack, eventually, in_process_stack};
use fake_goto::{Account, Decision, TokenFault};
use goto_oauth_operator::{
    clock::Clock,
    conditions::reason,
    resource::{AuthorizationPhase, ROTATE_LINK_ANNOTATION},
};
use kube::api::{Patch, PatchParams};

/// Requests the operator sent that read or wrote one client, per the proxy's log.
fn client_requests(cluster: &Cluster, name: &str) -> Vec<String> {
    cluster
        .proxy()
        .request_log()
        .into_iter()
        .filter(|r| r.path.ends_with(&format!("/gotooauthclients/{name}")))
        .map(|r| format!("{} {}", r.verb, r.path))
        .collect()
}

/// A browser whose admin clicked Deny at GoTo, and the callback URL it is sent back to.
async fn denied(env: &Stack, link: &str) -> (Browser, String) {
    let mut browser = Browser::new();
    let back = env
        .provider
        .consent_via(&mut browser, link, Decision::Deny)
        .await;
    (browser, back)
}

/// The callback URL `back` with its `state`, but GoTo's answer replaced by `error`.
fn with_error(back: &str, error: &str, description: Option<&str>) -> String {
    let mut url = url::Url::parse(back).unwrap();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    {
        let mut query = url.query_pairs_mut();
        query.clear().append_pair("error", error);
        if let Some(d) = description {
            query.append_pair("error_description", d);
        }
        query.append_pair("state", &state);
    }
    url.to_string()
}

/// Waits until the client publishes a link other than `old`.
async fn link_after(cluster: &Cluster, name: &str, old: &str) -> String {
    eventually("a new link", || async {
        cluster.published_link(name).await.filter(|l| l != old)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_link_costs_no_api_request_and_the_same_time_whether_or_not_the_client_exists() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    let base = format!("{}/authorize/{}", env.op.public_url, env.cluster.namespace);
    let wrong = "A".repeat(43);
    env.cluster.proxy().clear_request_log();

    let mut took = Vec::new();
    for url in [
        format!("{base}/demo/{wrong}"),
        format!("{base}/no-such-client/{wrong}"),
    ] {
        let started = Instant::now();
        let page = Browser::new().get(&url).await;
        took.push(started.elapsed());
        assert_eq!(page.status, 404, "{url}: {}", page.body);
        assert!(page.body.contains("not valid"), "{}", page.body);
    }
    // Every miss is answered at the same deadline, whatever exists.
    for t in &took {
        assert!(
            *t >= Duration::from_millis(500),
            "a miss is answered at the deadline: {t:?}"
        );
        assert!(*t < Duration::from_secs(5), "{t:?}");
    }
    // Names that are not DNS-1123 never reach the API server as path segments.
    for path in [
        "..%2F..%2Fsecrets/demo",
        "UPPER/demo",
        "a.b/demo",
        "ns/..",
        "ns/demo%2F..",
        "-ns/demo",
    ] {
        let page = Browser::new()
            .get(&format!("{}/authorize/{path}/{wrong}", env.op.public_url))
            .await;
        assert_eq!(page.status, 404, "{path}: {}", page.body);
    }
    assert_eq!(client_requests(&env.cluster, "demo"), Vec::<String>::new());
    assert_eq!(
        client_requests(&env.cluster, "no-such-client"),
        Vec::<String>::new()
    );
    let log = env.cluster.proxy().request_log();
    assert!(
        !log.iter().any(|r| r.path.contains("..")),
        "no dot segment reached the API server"
    );

    // The right link still works (and is what makes the operator read the client).
    let mut browser = Browser::new();
    browser.open_link(&link).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_the_operator_does_not_watch_is_not_served() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    // The same client, with a link in its status, in a namespace the operator does not watch
    // (as another operator, or a hand edit, could leave it).
    let other = format!("{}-unwatched", env.cluster.namespace);
    fake_apiserver::create_namespace(&env.cluster.client, &other)
        .await
        .expect("namespace");
    let clients: kube::Api<goto_oauth_operator::resource::GoToOAuthClient> =
        kube::Api::namespaced(env.cluster.client.clone(), &other);
    let mut obj = env.cluster.clients().get("demo").await.unwrap();
    obj.metadata = kube::api::ObjectMeta {
        name: Some("demo".into()),
        ..Default::default()
    };
    let status = obj.status.take().unwrap();
    clients
        .create(&Default::default(), &obj)
        .await
        .expect("client elsewhere");
    let elsewhere = link.replace(
        &format!("/authorize/{}/", env.cluster.namespace),
        &format!("/authorize/{other}/"),
    );
    clients
        .patch_status(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "authorizationUrl": elsewhere,
                "conditions": status.conditions,
            }})),
        )
        .await
        .expect("status elsewhere");
    let page = Browser::new().get(&elsewhere).await;
    assert_eq!(page.status, 404, "{}", page.body);
    assert_eq!(
        client_requests(&env.cluster, "demo")
            .iter()
            .filter(|r| r.contains(&other))
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_or_foreign_attempts_get_a_page_and_write_nothing() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    // GoTo's redirect back, and a second browser that opened the link itself.
    let back = env
        .provider
        .consent_via(&mut Browser::new(), &link, Decision::Allow)
        .await;
    let mut other = Browser::new();
    other.open_link(&link).await;
    let before = env.cluster.clients().get("demo").await.unwrap();
    let events_before = env.cluster.events_for("demo").await.len();
    env.cluster.proxy().clear_request_log();

    // The callback in a browser that never opened the link, and in the other one.
    let page = Browser::new().get(&back).await;
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.contains("same browser"), "{}", page.body);
    let page = other.get(&back).await;
    assert_eq!(page.status, 400, "{}", page.body);

    assert_eq!(
        client_requests(&env.cluster, "demo"),
        Vec::<String>::new(),
        "not even a read"
    );
    let after = env.cluster.clients().get("demo").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "no status write"
    );
    assert_eq!(env.cluster.events_for("demo").await.len(), events_before);
    assert_eq!(env.provider.grant_requests("authorization_code"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_or_rotated_link_takes_the_attempts_in_flight_along() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;

    // Two people opened the link; the first one completes the consent.
    let mut first = Browser::new();
    let first_back = env
        .provider
        .consent_via(&mut first, &link, Decision::Allow)
        .await;
    let mut second = Browser::new();
    let second_back = env
        .provider
        .consent_via(&mut second, &link, Decision::Allow)
        .await;
    let page = first.get(&first_back).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let page = second.get(&second_back).await;
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(page.body.contains("no longer valid"), "{}", page.body);
    assert_eq!(
        env.provider.grant_requests("authorization_code"),
        1,
        "the second attempt never reached GoTo"
    );

    // A rotation kills an attempt started from the link before it.
    let link = link_after(&env.cluster, "demo", &link).await;
    let mut third = Browser::new();
    let third_back = env
        .provider
        .consent_via(&mut third, &link, Decision::Allow)
        .await;
    env.cluster
        .clients()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {ROTATE_LINK_ANNOTATION: "now"}}
            })),
        )
        .await
        .unwrap();
    link_after(&env.cluster, "demo", &link).await;
    let page = third.get(&third_back).await;
    assert_eq!(page.status, 409, "{}", page.body);
    assert_eq!(env.provider.grant_requests("authorization_code"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_per_client_are_bounded() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    // Denials are claimed attempts that leave the link as it is.
    for _ in 0..20 {
        let (mut browser, back) = denied(&env, &link).await;
        assert_eq!(browser.get(&back).await.status, 403);
    }
    let mut browser = Browser::new();
    let back = env
        .provider
        .consent_via(&mut browser, &link, Decision::Allow)
        .await;
    let page = browser.get(&back).await;
    assert_eq!(page.status, 429, "{}", page.body);
    assert!(page.body.contains("Too many"), "{}", page.body);
    let obj = env.cluster.clients().get("demo").await.unwrap();
    assert_eq!(obj.status.unwrap().consumed_states.len(), 20);
    assert_eq!(env.provider.grant_requests("authorization_code"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goto_error_descriptions_stay_on_the_page() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    let (mut browser, back) = denied(&env, &link).await;
    // GoTo's answer, rewritten the way a hostile page could: another error with a description.
    let hostile = with_error(&back, "server_error", Some("<b>call evil.example</b>"));
    let page = browser.get(&hostile).await;
    assert_eq!(page.status, 502, "{}", page.body);
    assert!(
        page.body.contains("&lt;b&gt;call evil.example"),
        "{}",
        page.body
    );
    let obj = env
        .cluster
        .wait_condition("demo", "Authorized", "False", reason::AUTHORIZATION_FAILED)
        .await;
    let message = &obj.condition("Authorized").unwrap().message;
    assert_eq!(message, "GoTo returned error server_error");
    let events = env.cluster.events_for("demo").await;
    assert!(
        events.iter().all(|(_, note)| !note.contains("evil")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_causes_get_distinct_events() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    // A failure at GoTo's consent page, then a code exchange that fails: both are
    // AuthorizationFailed, and neither Event may swallow the other.
    let (mut browser, back) = denied(&env, &link).await;
    let failed = with_error(&back, "server_error", None);
    assert_eq!(browser.get(&failed).await.status, 502);
    env.provider
        .goto
        .push_token_fault(TokenFault::invalid_client());
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 502, "{}", page.body);
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let notes = eventually("both failures and the consent as Events", || async {
        let events = env.cluster.events_for("demo").await;
        let has = |s: &str| events.iter().any(|(_, note)| note.contains(s));
        (has("GoTo returned error server_error")
            && has("exchanging the authorization code failed")
            && has("consent given by"))
        .then_some(events)
    })
    .await;
    assert!(
        notes.iter().any(|(reason, note)| reason == "ConsentGiven"
            && note.contains("mister.jones@fakemail.com")
            && note.contains("9999982253621659654")),
        "{notes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_by_another_account_warns_and_an_unexpected_account_is_refused() {
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);

    // Re-consent by another admin: stored, with a Warning naming both accounts.
    env.provider.goto.set_account(Account {
        email: "someone.else@example.com".into(),
        account_key: "1111".into(),
        ..Account::default()
    });
    let link = link_after(&env.cluster, "demo", &link).await;
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    eventually("an AccountChanged warning", || async {
        env.cluster
            .events_for("demo")
            .await
            .into_iter()
            .find(|(reason, note)| {
                reason == "AccountChanged"
                    && note.contains("someone.else@example.com")
                    && note.contains("mister.jones@fakemail.com")
            })
    })
    .await;

    // A client that expects one account refuses the others and stores nothing.
    let link = env
        .client(
            "strict",
            serde_json::json!({"secretName": "strict-token", "expectedAccount": "Mister.Jones@fakemail.com"}),
        )
        .await;
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("cannot authorize"), "{}", page.body);
    let obj = env
        .cluster
        .wait_condition("strict", "Authorized", "False", reason::UNEXPECTED_ACCOUNT)
        .await;
    assert_eq!(
        obj.status
            .as_ref()
            .and_then(|s| s.authorization.as_ref())
            .map(|a| a.phase),
        Some(AuthorizationPhase::ConsentFailed)
    );
    assert!(env.cluster.token_secret("strict").await.is_none());

    env.provider.goto.set_account(Account::default());
    let link = env.cluster.published_link("strict").await.unwrap();
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    env.cluster
        .wait_condition("strict", "Ready", "True", reason::AUTHORIZED)
        .await;
}

/// At the second a `state` expires it is refused, also as a replay: the consumed nonce is kept
/// past it, and the state no longer counts as valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_expiry_second_a_replay_reaches_nothing() {
    let start = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).unwrap();
    let clock = Clock::manual(start);
    let (cluster, provider, op) = in_process_stack(clock.clone(), |o| o).await;
    cluster
        .create_client("demo", provider.spec(serde_json::json!({})))
        .await;
    let link = cluster.authorization_link("demo").await;
    let mut browser = Browser::new();
    let back = provider
        .consent_via(&mut browser, &link, Decision::Deny)
        .await;
    assert_eq!(browser.get(&back).await.status, 403);

    // Ten minutes later, to the second: the replay is an expired attempt, nothing more.
    clock.advance(Duration::from_secs(600));
    let exchanges = provider.grant_requests("authorization_code");
    let page = browser.get(&back).await;
    assert_eq!(page.status, 400, "{}", page.body);
    assert!(page.body.contains("expired"), "{}", page.body);
    assert_eq!(provider.grant_requests("authorization_code"), exchanges);
    op.stop().await;
}
