//! The consent flow end to end: the real operator binary, the in-memory API server (or a real
//! cluster) and the fake GoTo provider, driven like a browser (cookies, redirects, form clicks).

mod common;

use common::{Browser, Page, Stack, TOKEN_SECRET_KEYS, eventually, secret_field};
use fake_goto::{Decision, TokenFault};
use goto_oauth_operator::{
    conditions::reason,
    consent::{StateClaims, StateKey},
    secret,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use std::time::Duration;

/// Creates a client (its token Secret labelled `team=payments`); returns its link once published.
async fn client(env: &Stack, name: &str) -> String {
    env.client(
        name,
        serde_json::json!({"secretTemplate": {"labels": {"team": "payments"}}}),
    )
    .await
}

/// Opens the link, clicks `decision` at GoTo and follows the redirect back: the result page.
async fn consent(env: &Stack, browser: &mut Browser, link: &str, decision: Decision) -> Page {
    let back = env.provider.consent_via(browser, link, decision).await;
    browser.get(&back).await
}

/// A new client whose admin allowed access at GoTo but whose browser has not followed the
/// redirect back yet: the browser and the callback URL it is about to open.
async fn consent_pending(env: &Stack, name: &str) -> (Browser, String) {
    let link = client(env, name).await;
    let mut browser = Browser::new();
    let back = env
        .provider
        .consent_via(&mut browser, &link, Decision::Allow)
        .await;
    (browser, back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_stores_tokens_and_publishes_a_fresh_link() {
    let env = Stack::start(&[]).await;
    let link = client(&env, "demo").await;
    assert!(link.starts_with(&env.op.public_url));

    let mut browser = Browser::new();
    let goto_url = browser.open_link(&link).await;
    let cookie = browser.cookies.join(";");
    assert!(
        cookie.contains("goto_oauth_binding="),
        "binding cookie set: {cookie}"
    );
    let consent = url::Url::parse(&goto_url).unwrap();
    let params: std::collections::HashMap<_, _> = consent.query_pairs().into_owned().collect();
    assert_eq!(params["client_id"], env.provider.client_id);
    assert_eq!(params["response_type"], "code");
    assert_eq!(
        params["redirect_uri"],
        format!("{}/callback", env.op.public_url)
    );
    assert_eq!(params["scope"], "identity: call-control.v1.calls.control");
    assert!(params["state"].len() > 40);

    let back = env
        .provider
        .goto
        .consent(&goto_url, Decision::Allow)
        .await
        .unwrap();
    let code = url::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let page = browser.get(&back).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Authorization complete"),
        "{}",
        page.body
    );
    assert!(page.body.contains("demo") && page.body.contains(&env.cluster.namespace));
    assert!(page.body.contains("demo-token"));
    assert!(
        !page.body.contains(&code),
        "the code never appears on a page"
    );
    env.provider.assert_no_secret_material(&page.body);

    let secret = env
        .cluster
        .token_secret("demo")
        .await
        .expect("token Secret");
    let data = secret.data.clone().unwrap();
    for key in TOKEN_SECRET_KEYS
        .into_iter()
        .chain(["account_key", "organizer_key"])
    {
        assert!(data.contains_key(key), "Secret lacks {key}");
    }
    assert_eq!(secret.type_.as_deref(), Some("Opaque"));
    let labels = secret.metadata.labels.clone().unwrap();
    assert_eq!(
        labels["app.kubernetes.io/managed-by"],
        "goto-oauth-operator"
    );
    assert_eq!(labels["team"], "payments");
    let access = secret_field(&secret, "access_token");
    assert!(env.provider.goto.is_access_token_live(&access));
    let refresh = secret_field(&secret, "refresh_token");
    assert!(env.provider.goto.is_refresh_token_valid(&refresh));
    assert_eq!(data["token_type"].0, b"Bearer");
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.kind, "GoToOAuthClient");

    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    let authorized = obj.condition("Authorized").unwrap();
    assert_eq!(authorized.status, "True");
    let status = obj.status.clone().unwrap();
    assert!(status.access_token_expires_at.is_some() && status.next_refresh_time.is_some());
    assert!(status.principal.is_some(), "principal from GoTo's response");
    let new_link = status.authorization_url.clone().unwrap();
    assert_ne!(new_link, link, "a used link is replaced");

    // One Event tells of the consent (and names the account); the condition's transition to
    // Authorized is not repeated as a second one.
    let events = eventually("ConsentGiven event", || async {
        let e = env.cluster.events_for("demo").await;
        e.iter().any(|(r, _)| r == "ConsentGiven").then_some(e)
    })
    .await;
    assert!(
        !events.iter().any(|(r, _)| r == reason::AUTHORIZED),
        "{events:?}"
    );
    for (_, note) in &events {
        env.provider.assert_no_secret_material(note);
    }
    env.provider
        .assert_no_secret_material(&serde_json::to_string(&status).unwrap());

    // The spent link no longer works; reusing the callback is refused as a replay.
    let reopened = browser.get_raw(&link).await;
    assert_eq!(reopened.status().as_u16(), 404);
    let replay = browser.get(&back).await;
    assert_eq!(replay.status, 409, "{}", replay.body);
    assert!(replay.body.contains("already used"));
    // The exchange happened exactly once.
    assert_eq!(env.provider.grant_requests("authorization_code"), 1);
    let logs = env.op.logs();
    env.provider.assert_no_secret_material(&logs);
    assert!(!logs.contains(&code), "the code never reaches a log line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_and_state_errors_get_pages_conditions_and_no_secret() {
    let env = Stack::start(&[]).await;
    let link = client(&env, "demo").await;

    // Deny.
    let mut browser = Browser::new();
    let page = consent(&env, &mut browser, &link, Decision::Deny).await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(page.body.contains("denied"), "{}", page.body);
    env.cluster
        .wait_condition("demo", "Authorized", "False", reason::ACCESS_DENIED)
        .await;
    assert!(env.cluster.token_secret("demo").await.is_none());
    eventually("AccessDenied event", || async {
        env.cluster
            .events_for("demo")
            .await
            .iter()
            .any(|(r, _)| r == reason::ACCESS_DENIED)
            .then_some(())
    })
    .await;

    let base = format!("{}/callback", env.op.public_url);
    // Missing state.
    let page = Browser::new().get(&format!("{base}?code=abc")).await;
    assert_eq!(page.status, 400);
    assert!(
        page.body.contains("not a valid authorization response"),
        "{}",
        page.body
    );
    // Malformed and forged state, with markup that must come back escaped.
    let page = Browser::new()
        .get(&format!(
            "{base}?code=abc&state=%3Cscript%3Ealert(1)%3C/script%3E"
        ))
        .await;
    assert_eq!(page.status, 400);
    assert!(!page.body.contains("<script>"));
    let forged = StateKey::generate().sign(&StateClaims {
        namespace: env.cluster.namespace.clone(),
        name: "demo".into(),
        uid: "x".into(),
        client_id: env.provider.client_id.clone(),
        nonce: "n".into(),
        expires_at: i64::MAX,
        browser: "b".into(),
        link: String::new(),
    });
    let page = Browser::new()
        .get(&format!("{base}?code=abc&state={forged}"))
        .await;
    assert_eq!(page.status, 400, "{}", page.body);

    // Cookie missing / another browser.
    let back = env
        .provider
        .consent_via(&mut Browser::new(), &link, Decision::Allow)
        .await;
    let page = Browser::new().get(&back).await;
    assert_eq!(page.status, 400);
    assert!(page.body.contains("same browser"), "{}", page.body);
    let mut other = Browser::new();
    other.open_link(&link).await; // gets its own cookie
    let page = other.get(&back).await;
    assert_eq!(page.status, 400);
    assert!(page.body.contains("same browser"));
    // A state without its browser is unauthenticated noise: a page and nothing else, so the
    // resource still shows the denial and no Event mentions the browser.
    let obj = env.cluster.clients().get("demo").await.unwrap();
    assert_eq!(
        obj.condition("Authorized").map(|c| c.reason.as_str()),
        Some(reason::ACCESS_DENIED)
    );
    assert!(
        !env.cluster
            .events_for("demo")
            .await
            .iter()
            .any(|(_, note)| note.contains("browser")),
        "no Event for a state from another browser"
    );

    // Expired: a correctly signed state from 11 minutes ago.
    let key_secret = env
        .cluster
        .secrets()
        .get("goto-oauth-operator-state-key")
        .await
        .unwrap();
    let key = StateKey::from_bytes(&key_secret.data.unwrap()["state-hmac-key"].0).unwrap();
    let obj = env.cluster.clients().get("demo").await.unwrap();
    let mut browser = Browser::new();
    browser.open_link(&link).await;
    let cookie = browser.cookies[0].split_once('=').unwrap().1.to_string();
    let expired = key.sign(&StateClaims {
        namespace: env.cluster.namespace.clone(),
        name: "demo".into(),
        uid: obj.metadata.uid.clone().unwrap(),
        client_id: env.provider.client_id.clone(),
        nonce: "old".into(),
        expires_at: jiff::Timestamp::now().as_second() - 60,
        browser: key.browser_binding(&cookie),
        link: key.link_binding(link.rsplit('/').next().unwrap()),
    });
    let page = browser
        .get(&format!("{base}?code=abc&state={expired}"))
        .await;
    assert_eq!(page.status, 400);
    assert!(page.body.contains("expired"), "{}", page.body);
    assert!(
        env.cluster.token_secret("demo").await.is_none(),
        "no Secret after any failure"
    );
    // Nothing but 404 elsewhere.
    let page = Browser::new()
        .get(&format!("{}/metrics", env.op.public_url))
        .await;
    assert_eq!(page.status, 404);
}

/// The admin closes the tab while GoTo is slow to answer the code exchange: the code is spent,
/// so the tokens must still reach the Secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_is_stored_when_the_browser_leaves_during_the_exchange() {
    let env = Stack::start(&[]).await;
    let (browser, back) = consent_pending(&env, "demo").await;
    env.provider
        .goto
        .push_token_fault(TokenFault::SlowResponse(Duration::from_secs(2)));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = impatient
        .get(&back)
        .header("cookie", browser.cookies.join("; "))
        .send()
        .await;
    assert!(
        gave_up.is_err_and(|e| e.is_timeout()),
        "the browser left first"
    );
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    let stored = env.cluster.secrets().get("demo-token").await.unwrap();
    assert!(stored.data.unwrap().contains_key("refresh_token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_failures_are_reported_and_store_nothing() {
    let env = Stack::start(&["--token-timeout", "1s"]).await;
    let link = client(&env, "demo").await;
    let cases: Vec<(TokenFault, u16, &str)> = vec![
        (
            TokenFault::invalid_grant(),
            400,
            "rejected the authorization code",
        ),
        (TokenFault::invalid_client(), 502, "client credentials"),
        (
            TokenFault::Status {
                status: 403,
                body: "{\"error\":\"unauthorized_client\"}".into(),
                content_type: "application/json".into(),
                retry_after: None,
            },
            502,
            "token service failed",
        ),
        (TokenFault::server_error_html(), 502, "token service failed"),
        (
            TokenFault::Delay(Duration::from_secs(3)),
            504,
            "did not answer in time",
        ),
        (TokenFault::NonJson, 502, "token service failed"),
        (
            TokenFault::OversizedBody(2 * 1024 * 1024),
            502,
            "token service failed",
        ),
    ];
    for (fault, status, text) in cases {
        env.provider.goto.push_token_fault(fault.clone());
        let mut browser = Browser::new();
        let page = consent(&env, &mut browser, &link, Decision::Allow).await;
        assert_eq!(page.status, status, "{fault:?}: {}", page.body);
        assert!(page.body.contains(text), "{fault:?}: {}", page.body);
        assert!(
            page.body.contains("open the authorization link again")
                || page.body.contains("Open the authorization link again")
                || page.body.contains("Tell the person"),
            "{}",
            page.body
        );
        let obj = env
            .cluster
            .wait_condition("demo", "Authorized", "False", reason::AUTHORIZATION_FAILED)
            .await;
        assert!(obj.condition("Ready").unwrap().status == "False");
        assert!(
            env.cluster.token_secret("demo").await.is_none(),
            "{fault:?} wrote a Secret"
        );
    }
    // After all that, a clean attempt works with the same link.
    let page = consent(&env, &mut Browser::new(), &link, Decision::Allow).await;
    assert_eq!(page.status, 200, "{}", page.body);
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    env.provider.assert_no_secret_material(&env.op.logs());
}

/// The callback of client `changed`, whose client id changed during its consent: a refusal
/// page, and `Authorized=False/AuthorizationFailed` on the client.
async fn refused_as_reconfigured(env: &Stack, browser: &mut Browser, back: &str) {
    let page = browser.get(back).await;
    assert_eq!(page.status, 409, "{}", page.body);
    assert!(page.body.contains("reconfigured"));
    env.cluster
        .wait_condition(
            "changed",
            "Authorized",
            "False",
            reason::AUTHORIZATION_FAILED,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_during_consent_are_refused() {
    let env = Stack::start(&[]).await;
    // Client deleted meanwhile.
    let (mut browser, back) = consent_pending(&env, "gone").await;
    env.cluster
        .clients()
        .delete("gone", &Default::default())
        .await
        .unwrap();
    env.cluster.wait_client_gone("gone").await;
    let page = browser.get(&back).await;
    assert_eq!(page.status, 410, "{}", page.body);
    assert!(page.body.contains("no longer exists"));

    // Client id changed meanwhile.
    let (mut browser, back) = consent_pending(&env, "changed").await;
    let patch = serde_json::json!({"spec": {"clientId": "another-client"}});
    env.cluster
        .clients()
        .patch("changed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    refused_as_reconfigured(&env, &mut browser, &back).await;
    assert!(env.cluster.token_secret("changed").await.is_none());

    // Client secret removed meanwhile.
    let (mut browser, back) = consent_pending(&env, "nosecret").await;
    env.cluster
        .secrets()
        .delete("creds", &Default::default())
        .await
        .unwrap();
    let page = browser.get(&back).await;
    assert_eq!(page.status, 409, "{}", page.body);
    // Which refusal comes first is a race: the callback finds the client secret gone, or the
    // controller has already withdrawn the link of a client without one.
    assert!(
        page.body.contains("client secret is missing")
            || page.body.contains("replaced by a newer one"),
        "{}",
        page.body
    );
    assert!(env.cluster.token_secret("nosecret").await.is_none());
    let obj = env
        .cluster
        .wait_condition("nosecret", "Ready", "False", reason::CLIENT_SECRET_MISSING)
        .await;
    assert_eq!(obj.condition("Authorized").unwrap().status, "False");
}

/// A refused consent keeps its condition when its status write meets a conflict (the
/// controller wrote meanwhile): the callback reads the client again and writes once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_consent_is_recorded_after_a_status_conflict() {
    let env = Stack::start(&[]).await;
    let (mut browser, back) = consent_pending(&env, "changed").await;
    let patch = serde_json::json!({"spec": {"clientId": "another-client"}});
    let changed = env
        .cluster
        .clients()
        .patch("changed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    // The controller has written its status for the change: the next status write is the
    // callback's.
    eventually("the controller saw the change", || async {
        let obj = env.cluster.clients().get("changed").await.ok()?;
        let observed = obj.status.as_ref()?.observed_generation;
        (observed == changed.metadata.generation).then_some(())
    })
    .await;
    env.cluster.proxy().clear_request_log();
    // The callback's first status write claims the attempt; the second records the refusal.
    env.cluster.proxy().inject_fault_after(
        1,
        kube_fault_proxy::Fault {
            method: Some(http::Method::PATCH),
            path_contains: "/gotooauthclients/changed/status".into(),
            status: 409,
            times: 1,
        },
    );

    refused_as_reconfigured(&env, &mut browser, &back).await;
    let conflicts = env
        .cluster
        .proxy()
        .request_log()
        .into_iter()
        .filter(|r| r.path.ends_with("/gotooauthclients/changed/status") && r.status == 409)
        .count();
    assert_eq!(conflicts, 1, "the injected conflict was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_secret_is_never_overwritten() {
    let env = Stack::start(&[]).await;
    let foreign = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("demo-token".into()),
            ..Default::default()
        },
        string_data: Some([("access_token".to_string(), "someone-elses".to_string())].into()),
        ..Default::default()
    };
    env.cluster
        .secrets()
        .create(&Default::default(), &foreign)
        .await
        .unwrap();
    env.cluster
        .create_client("demo", serde_json::json!({"clientId": env.provider.client_id, "clientSecretRef": {"name": "creds"}}))
        .await;
    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "False", reason::SECRET_CONFLICT)
        .await;
    assert!(
        obj.status.unwrap().authorization_url.is_none(),
        "no link while the target is taken"
    );
    let secret = env.cluster.token_secret("demo").await.unwrap();
    assert_eq!(secret.data.unwrap()["access_token"].0, b"someone-elses");
    // Removing the foreign Secret clears the conflict without a restart.
    env.cluster
        .secrets()
        .delete("demo-token", &Default::default())
        .await
        .unwrap();
    env.cluster
        .wait_condition("demo", "Ready", "False", reason::AWAITING_AUTHORIZATION)
        .await;
    let _ = secret::ACCESS_TOKEN_KEY;
}

/// The success page names the application by `spec.displayName`, escaped: a display name is
/// user input from the spec, and `<script>` in it is shown as text, never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_page_names_the_application_by_its_escaped_display_name() {
    let env = Stack::start(&[]).await;
    let link = env
        .client(
            "payroll",
            serde_json::json!({"displayName": "<script>alert(1)</script> Payroll & HR"}),
        )
        .await;
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(
            "is now connected to <strong>&lt;script&gt;alert(1)&lt;/script&gt; Payroll &amp; HR</strong>"
        ),
        "{}",
        page.body
    );
    assert!(!page.body.contains("<script>"), "{}", page.body);
    // The Kubernetes names stay, for the platform team, in their own block.
    let tech = page
        .body
        .split("For the platform team")
        .nth(1)
        .expect("platform block");
    assert!(tech.contains(&format!("{}/payroll", env.cluster.namespace)));
    assert!(tech.contains("payroll-token"));
}
