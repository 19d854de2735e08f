//! The refresh lifecycle end to end, with the operator in-process on a manual clock: the
//! in-memory API server, the fake GoTo provider and a scripted browser for the consent.
//!
//! Time only moves when a test calls [`Env::advance`], so "just before" and "just after" a
//! refresh are exact and no test waits for wall-clock refresh times. Every absence ("no refresh
//! request yet") is asserted after [`Env::advance`], which waits until at least one reconcile ran
//! at the new time and the controller went quiet, so a missing request is really missing rather
//! than not sent yet.

mod common;

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{
    Browser, Cluster, DEADLINE, Provider, bind_callback, eventually, metrics::metric,
    operator::InProcessOperator,
};
use fake_goto::{Decision, FakeGoToConfig, RefreshTokenRotation, TokenFault};
use goto_oauth_operator::{
    clock::Clock,
    conditions::reason,
    resource::{FORCE_REFRESH_ANNOTATION, GoToOAuthClient, ROTATE_LINK_ANNOTATION},
};
use jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube_fault_proxy::{Fault, FaultProxy};

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

/// How long the controller must stay idle to count as settled.
const QUIET: Duration = Duration::from_millis(300);

/// GoTo's access-token lifetime, as the fake provider issues it.
const LIFETIME: SignedDuration = SignedDuration::from_secs(3600);

/// One test's world: the API server, GoTo, the manual clock and the operator (restartable).
struct Env {
    cluster: Cluster,
    provider: Provider,
    clock: Clock,
    port: u16,
    op: Option<InProcessOperator>,
    /// Every token and authorization code the test saw, to check none of them leaks.
    seen: Mutex<Vec<String>>,
}

fn whole_second_now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).expect("valid timestamp")
}

impl Env {
    async fn start() -> Env {
        Self::start_at(whole_second_now()).await
    }

    async fn start_at(start: Timestamp) -> Env {
        let cluster = Cluster::start().await;
        let (listener, callback) = bind_callback().await;
        let port = listener.local_addr().expect("addr").port();
        let provider = Provider::start(FakeGoToConfig::default(), &callback).await;
        cluster
            .create_client_secret("creds", &provider.client_secret)
            .await;
        let mut env = Env {
            cluster,
            provider,
            clock: Clock::manual(start),
            port,
            op: None,
            seen: Mutex::new(Vec::new()),
        };
        env.start_operator(listener).await;
        env
    }

    async fn start_operator(&mut self, listener: tokio::net::TcpListener) {
        let options = self
            .provider
            .operator_options(&self.cluster, self.clock.clone());
        let op = InProcessOperator::start(self.cluster.operator_client(), listener, options)
            .await
            .expect("start in-process operator");
        self.op = Some(op);
    }

    fn op(&self) -> &InProcessOperator {
        self.op.as_ref().expect("operator running")
    }

    async fn stop_operator(&mut self) {
        if let Some(op) = self.op.take() {
            op.stop().await;
        }
    }

    /// A new operator with empty memory on the same port (so the registered redirect URI holds).
    async fn restart_operator(&mut self) {
        self.stop_operator().await;
        self.start_again().await;
    }

    /// Starts a new operator (empty memory) after [`Env::stop_operator`]; waits for its first
    /// reconciles to finish.
    async fn start_again(&mut self) {
        let addr = format!("127.0.0.1:{}", self.port);
        let listener = eventually("rebind the operator port", || async {
            tokio::net::TcpListener::bind(&addr).await.ok()
        })
        .await;
        self.start_operator(listener).await;
        self.quiet_after(Some(0)).await;
    }

    fn proxy(&self) -> &FaultProxy {
        self.cluster.proxy()
    }

    async fn create(&self, name: &str, extra: serde_json::Value) {
        self.cluster
            .create_client(name, self.provider.spec(extra))
            .await;
    }

    /// A fresh world with the client "demo" (default spec) authorized; its state after consent.
    async fn with_demo() -> (Env, GoToOAuthClient) {
        let env = Env::start().await;
        env.create("demo", serde_json::json!({})).await;
        let obj = env.authorize("demo").await;
        (env, obj)
    }

    async fn get(&self, name: &str) -> GoToOAuthClient {
        self.cluster.clients().get(name).await.expect("get client")
    }

    async fn link(&self, name: &str) -> String {
        eventually(&format!("{name} has an authorization link"), || async {
            self.cluster.published_link(name).await
        })
        .await
    }

    /// Consent through the published link, like an admin in a browser; waits for Ready.
    async fn authorize(&self, name: &str) -> GoToOAuthClient {
        let link = self.link(name).await;
        let (back, page) = self.provider.allow(&link).await;
        if let Some((_, code)) = url::Url::parse(&back)
            .expect("callback url")
            .query_pairs()
            .find(|(k, _)| k == "code")
        {
            self.remember(&code);
        }
        assert_eq!(page.status, 200, "callback page: {}", page.body);
        let obj = self
            .cluster
            .wait_condition(name, "Ready", "True", reason::AUTHORIZED)
            .await;
        self.tokens(&format!("{name}-token"))
            .await
            .expect("token Secret after consent");
        obj
    }

    fn remember(&self, value: &str) {
        self.seen.lock().expect("seen").push(value.to_string());
    }

    /// The token Secret's data as text (and remembers the tokens for the leak checks).
    async fn tokens(&self, secret: &str) -> Option<BTreeMap<String, String>> {
        let s = self
            .cluster
            .secrets()
            .get_opt(secret)
            .await
            .expect("get secret")?;
        let data: BTreeMap<String, String> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8 secret value")))
            .collect();
        for key in ["access_token", "refresh_token"] {
            if let Some(v) = data.get(key) {
                self.remember(v);
            }
        }
        Some(data)
    }

    /// "demo"'s token Secret data, which must exist.
    async fn demo_tokens(&self) -> BTreeMap<String, String> {
        self.tokens("demo-token").await.expect("Secret")
    }

    /// Waits until "demo"'s token Secret holds an access token other than `old`; returns its data.
    async fn new_demo_tokens(&self, what: &str, old: &str) -> BTreeMap<String, String> {
        eventually(what, || async {
            self.tokens("demo-token")
                .await
                .filter(|d| d["access_token"] != old)
        })
        .await
    }

    /// Waits until the client's consent no longer stands (`Authorized=False/ReauthorizationRequired`).
    async fn wait_reauthorization_required(&self, name: &str) -> GoToOAuthClient {
        self.cluster
            .wait_condition(
                name,
                "Authorized",
                "False",
                reason::REAUTHORIZATION_REQUIRED,
            )
            .await
    }

    fn refresh_requests(&self) -> usize {
        self.provider.refresh_requests()
    }

    async fn wait_refresh_requests(&self, n: usize) {
        eventually(&format!("{n} refresh requests"), || async {
            (self.refresh_requests() >= n).then_some(())
        })
        .await;
    }

    fn metrics(&self) -> String {
        self.op().metrics.render()
    }

    /// The `goto_oauth_client_ready` sample of a client.
    fn client_ready(&self, name: &str) -> Option<f64> {
        metric(
            &self.metrics(),
            "goto_oauth_client_ready",
            &[("name", name)],
        )
    }

    fn reconciles(&self) -> u64 {
        metric(
            &self.metrics(),
            "goto_oauth_reconcile_duration_seconds_count",
            &[],
        )
        .unwrap_or(0.0) as u64
    }

    fn refresh_metric(&self, name: &str, result: &str) -> f64 {
        metric(
            &self.metrics(),
            "goto_oauth_refresh_total",
            &[
                ("namespace", &self.cluster.namespace),
                ("name", name),
                ("result", result),
            ],
        )
        .unwrap_or(0.0)
    }

    /// Waits until no reconcile has completed for a while: the controller has nothing queued.
    async fn quiet(&self) {
        self.quiet_after(None).await;
    }

    /// Like [`Env::quiet`], but first waits for the reconcile count to pass `after`.
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
            assert!(
                start.elapsed() < DEADLINE,
                "the controller never settled ({last} reconciles, waiting for more than {after:?})"
            );
        }
    }

    /// Moves the operator's clock, then waits until a reconcile ran at the new time and the
    /// controller went quiet. Quiet first, so the reconcile counted cannot be one that started
    /// before the clock moved.
    async fn advance(&self, by: SignedDuration) {
        self.quiet().await;
        let before = self.reconciles();
        self.clock.advance(Duration::try_from(by).expect("forward"));
        self.quiet_after(Some(before)).await;
    }

    /// Moves the clock to `at` (which must be in the future) and settles.
    async fn advance_to(&self, at: Timestamp) {
        let by = at.duration_since(self.clock.now());
        assert!(
            by > SignedDuration::ZERO,
            "advance_to({at}) is not in the future"
        );
        self.advance(by).await;
    }

    /// Moves the clock from one nextRefreshTime to the next until every client holds a token
    /// newer than in `before`; returns the schedules then.
    async fn cycle_through_schedules(
        &self,
        before: &[(String, Timestamp, Timestamp)],
    ) -> Vec<(String, Timestamp, Timestamp)> {
        let start: BTreeMap<&str, Timestamp> = before
            .iter()
            .map(|(name, expires, _)| (name.as_str(), *expires))
            .collect();
        let begun = Instant::now();
        self.quiet().await;
        loop {
            // Every branch below ends quiet (advance_to) or waits.
            let all = schedules(self).await;
            if all
                .iter()
                .all(|(name, expires, _)| *expires > start[name.as_str()])
            {
                return all;
            }
            assert!(begun.elapsed() < DEADLINE * 4, "the cycle never completed");
            let now = self.clock.now();
            let due = all.iter().map(|(_, _, next)| *next).min();
            match due {
                Some(due) if due > now => self.advance_to(due).await,
                // Due and not done yet: the limiter paces the refreshes (10 a second, so the
                // controller can look quiet in between), or a status write trails its Secret.
                _ => tokio::time::sleep(QUIET).await,
            }
        }
    }

    /// Events for a client as (reason, how many times it was published): kube's Recorder
    /// folds repeats of one event into a series, so the series count is the number of publishes.
    async fn event_counts(&self, name: &str) -> BTreeMap<String, i32> {
        let api: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        let mut out = BTreeMap::new();
        for e in api
            .list(&Default::default())
            .await
            .expect("list events")
            .items
        {
            if e.regarding.as_ref().and_then(|r| r.name.as_deref()) != Some(name) {
                continue;
            }
            let n = e.series.as_ref().map(|s| s.count).unwrap_or(1);
            *out.entry(e.reason.unwrap_or_default()).or_insert(0) += n;
        }
        out
    }

    /// Status writes and Secret writes the operator made since the request log was cleared.
    fn writes(&self) -> Vec<String> {
        self.cluster.operator_writes()
    }

    /// No token, code or client secret in any status, annotation, Event or metric.
    async fn assert_no_secret_material(&self) {
        let mut haystacks = Vec::new();
        let clients = self
            .cluster
            .clients()
            .list(&Default::default())
            .await
            .expect("list clients");
        haystacks.push(serde_json::to_string(&clients.items).expect("json"));
        let events: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        haystacks.push(
            serde_json::to_string(
                &events
                    .list(&Default::default())
                    .await
                    .expect("events")
                    .items,
            )
            .expect("json"),
        );
        let core_events: kube::Api<k8s_openapi::api::core::v1::Event> =
            kube::Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        if let Ok(list) = core_events.list(&Default::default()).await {
            haystacks.push(serde_json::to_string(&list.items).expect("json"));
        }
        if let Some(op) = &self.op {
            haystacks.push(op.metrics.render());
        }
        let mut needles = self.seen.lock().expect("seen").clone();
        needles.extend(self.provider.secret_material().into_iter().map(|(_, v)| v));
        for hay in &haystacks {
            for needle in &needles {
                assert!(
                    needle.len() >= 8,
                    "a needle that short would match by chance"
                );
                assert!(
                    !hay.contains(needle.as_str()),
                    "secret material leaked into status, events or metrics"
                );
            }
        }
    }
}

fn ts(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> Timestamp {
    t.0
}

/// (lastRefreshTime, accessTokenExpiresAt, nextRefreshTime) of a client's status.
fn schedule(obj: &GoToOAuthClient) -> (Timestamp, Timestamp, Timestamp) {
    let s = obj.status.as_ref().expect("status");
    (
        ts(s.last_refresh_time.as_ref().expect("lastRefreshTime")),
        ts(s.access_token_expires_at
            .as_ref()
            .expect("accessTokenExpiresAt")),
        ts(s.next_refresh_time.as_ref().expect("nextRefreshTime")),
    )
}

/// Checks the default schedule: issued now, expires a lifetime later, refresh at the client's
/// phase in the second half of the interval: after issue + lifetime/3, no later than
/// expiry − lifetime/3.
fn assert_default_schedule(obj: &GoToOAuthClient, issued: Timestamp) -> Timestamp {
    let (last, expires, next) = schedule(obj);
    assert_eq!(last, issued, "lastRefreshTime is when the token was issued");
    assert_eq!(
        expires,
        issued + LIFETIME,
        "accessTokenExpiresAt = issue + expires_in"
    );
    assert!(
        next > issued + LIFETIME / 3 && next <= expires - LIFETIME / 3,
        "nextRefreshTime {next} is outside ({}, {}]",
        issued + LIFETIME / 3,
        expires - LIFETIME / 3
    );
    next
}

fn condition(obj: &GoToOAuthClient, type_: &str) -> (String, String) {
    let c = obj
        .condition(type_)
        .unwrap_or_else(|| panic!("condition {type_}"));
    (c.status.clone(), c.reason.clone())
}

fn pair(status: &str, reason: &str) -> (String, String) {
    (status.to_string(), reason.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_happens_before_expiry_for_three_cycles() {
    let (env, obj) = Env::with_demo().await;
    let first = env.demo_tokens().await;
    let refresh_token = first["refresh_token"].clone();
    let mut next = assert_default_schedule(&obj, env.clock.now());
    let mut access = first["access_token"].clone();

    for cycle in 1..=3usize {
        // Just before the refresh time: nothing happens.
        env.advance_to(next - SignedDuration::from_secs(1)).await;
        assert_eq!(
            env.refresh_requests(),
            cycle - 1,
            "cycle {cycle}: no refresh before nextRefreshTime"
        );
        // Just after: exactly one refresh.
        env.advance(SignedDuration::from_secs(2)).await;
        env.wait_refresh_requests(cycle).await;
        let refreshed_at = env.clock.now();
        let data = env
            .new_demo_tokens("the refreshed token is stored", &access)
            .await;
        env.quiet().await;
        assert_eq!(
            env.refresh_requests(),
            cycle,
            "cycle {cycle}: exactly one refresh"
        );
        assert_eq!(
            data["refresh_token"], refresh_token,
            "GoTo returned no refresh_token: the old one is kept"
        );
        assert_eq!(
            data["token_type"], "Bearer",
            "GoTo omitted token_type: Bearer is kept"
        );
        assert!(
            env.provider
                .goto
                .is_access_token_live(&data["access_token"])
        );
        assert_eq!(
            data["expires_at"],
            goto_oauth_operator::secret::rfc3339(refreshed_at + LIFETIME)
        );
        access = data["access_token"].clone();

        let obj = env.get("demo").await;
        assert_eq!(condition(&obj, "Ready"), pair("True", reason::AUTHORIZED));
        assert_eq!(
            condition(&obj, "Authorized"),
            pair("True", reason::AUTHORIZED)
        );
        let new_next = assert_default_schedule(&obj, refreshed_at);
        assert!(new_next > next, "the schedule moves forward");
        next = new_next;
        assert_eq!(
            env.refresh_metric("demo", "success"),
            cycle as f64,
            "{}",
            env.metrics()
        );
        // Each stored refresh measured its rotation window (response → Secret stored).
        assert_eq!(
            metric(
                &env.metrics(),
                "goto_oauth_token_store_duration_seconds_count",
                &[]
            ),
            Some(cycle as f64)
        );
        let expiry_metric = metric(
            &env.metrics(),
            "goto_oauth_token_expiry_timestamp_seconds",
            &[("namespace", &env.cluster.namespace), ("name", "demo")],
        );
        assert_eq!(
            expiry_metric,
            Some((refreshed_at + LIFETIME).as_second() as f64)
        );
    }
    assert_eq!(env.client_ready("demo"), Some(1.0));
    let counts = env.event_counts("demo").await;
    assert_eq!(
        counts.values().sum::<i32>(),
        2,
        "refreshes on schedule publish no Events, the creation and the consent one each: {counts:?}"
    );
    env.assert_no_secret_material().await;
}

/// Merge-patches a client (spec or metadata).
async fn patch_client(env: &Env, name: &str, patch: serde_json::Value) {
    env.cluster
        .clients()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch client");
}

/// Merge-patches demo's spec.
async fn patch_spec(env: &Env, spec: serde_json::Value) {
    patch_client(env, "demo", serde_json::json!({"spec": spec})).await;
}

/// Changes demo's spec so that its tokens no longer match it: waits until the consent no longer
/// stands, and checks the token still counts as usable meanwhile (Ready stays True).
async fn change_spec_requiring_reauthorization(
    env: &Env,
    spec: serde_json::Value,
) -> GoToOAuthClient {
    patch_spec(env, spec).await;
    let obj = env.wait_reauthorization_required("demo").await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("True", reason::REAUTHORIZATION_REQUIRED)
    );
    obj
}

async fn annotate(env: &Env, name: &str, key: &str, value: &str) {
    patch_client(
        env,
        name,
        serde_json::json!({"metadata": {"annotations": {key: value}}}),
    )
    .await;
}

/// Issue 11: what a consent, a refresh and a reconcile with nothing to do cost in API
/// requests (the operator's only, counted at the proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_per_consent_refresh_and_idle_reconcile() {
    let is_read = |r: &String| r.starts_with("get ");
    let env = Env::start().await;
    env.create("demo", serde_json::json!({})).await;
    env.link("demo").await;
    env.quiet().await;

    // Link opened → tokens stored → settled.
    env.proxy().clear_request_log();
    let obj = env.authorize("demo").await;
    env.quiet().await;
    let consent = env.cluster.operator_requests();
    assert!(consent.len() <= 6, "a consent: {consent:#?}");
    assert_eq!(
        consent
            .iter()
            .filter(|r| r.contains("/secrets/demo-token"))
            .count(),
        2,
        "the token Secret is read once and written once: {consent:#?}"
    );

    // A reconcile with nothing due asks nothing.
    env.proxy().clear_request_log();
    let before = env.reconciles();
    annotate(&env, "demo", "example.com/unrelated", "1").await;
    env.quiet_after(Some(before)).await;
    assert_eq!(
        env.cluster.operator_requests(),
        Vec::<String>::new(),
        "an idle reconcile"
    );

    // A refresh: the Secret and the status are written; nothing is read again.
    let (_, _, next) = schedule(&obj);
    env.proxy().clear_request_log();
    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;
    env.quiet().await;
    let refresh = env.cluster.operator_requests();
    assert_eq!(
        refresh.iter().filter(|r| !is_read(r)).count(),
        2,
        "Secret and status: {refresh:#?}"
    );
    assert!(refresh.len() <= 4, "a refresh: {refresh:#?}");

    // After a restart memory is empty: the first look reads both Secrets, the refresh none.
    let mut env = env;
    env.restart_operator().await;
    let obj = env.get("demo").await;
    let (_, _, next) = schedule(&obj);
    env.proxy().clear_request_log();
    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(2).await;
    env.quiet().await;
    let refresh = env.cluster.operator_requests();
    assert!(
        refresh.iter().filter(|r| is_read(r)).count() <= 2 && refresh.len() <= 4,
        "a refresh after a restart: {refresh:#?}"
    );
}

/// Issue 11: until its Secret watch has listed, a new operator knows no Secret's version, so it
/// reads the Secrets a client needs; it reads them once, not at every reconcile (a client held
/// back by the first look or parked by the token limiter wakes many times in that while).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_secret_watch_has_listed_a_clients_secrets_are_read_once() {
    let reads = |env: &Env| {
        let mut reads: Vec<String> = env
            .cluster
            .operator_requests()
            .into_iter()
            .filter(|r| {
                r.starts_with("get ")
                    && (r.contains("/secrets/demo-token ") || r.contains("/secrets/creds "))
            })
            .collect();
        reads.sort();
        reads
    };
    let mut env = Env::start().await;
    env.create("demo", serde_json::json!({})).await;
    env.authorize("demo").await;
    env.quiet().await;
    env.stop_operator().await;

    // The next operator's Secret watch cannot list (its reads of single Secrets go through).
    env.proxy().inject_fault(Fault {
        method: Some(http::Method::GET),
        path_contains: "/secrets?".into(),
        status: 500,
        times: usize::MAX,
    });
    env.proxy().clear_request_log();
    env.start_again().await;
    for i in 0..3 {
        let before = env.reconciles();
        annotate(&env, "demo", "example.com/unrelated", &i.to_string()).await;
        env.quiet_after(Some(before)).await;
    }
    let requests = env.cluster.operator_requests();
    assert!(
        !requests
            .iter()
            .any(|r| r.starts_with("list ") && r.contains("/secrets") && r.ends_with(" 200")),
        "the Secret watch listed: the test proves nothing: {requests:#?}"
    );
    let first = reads(&env);
    assert_eq!(
        first.len(),
        2,
        "the token Secret and the client secret: {first:#?}"
    );
    assert_ne!(first[0], first[1], "each read once: {first:#?}");

    // Once the watch has listed, the versions it shows are what was read: nothing is read.
    env.proxy().clear_faults();
    eventually("the Secret watch lists", || async {
        env.cluster
            .operator_requests()
            .iter()
            .any(|r| r.starts_with("watch ") && r.contains("/secrets"))
            .then_some(())
    })
    .await;
    let before = env.reconciles();
    annotate(&env, "demo", "example.com/unrelated", "listed").await;
    env.quiet_after(Some(before)).await;
    assert_eq!(reads(&env), first, "read again after the watch listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_token_is_stored_even_when_the_first_secret_write_conflicts() {
    let env = Env::start().await;
    env.provider.goto.set_rotation(RefreshTokenRotation::Always);
    env.create("demo", serde_json::json!({})).await;
    let obj = env.authorize("demo").await;
    let before = env.demo_tokens().await;
    let (_, _, next) = schedule(&obj);

    env.quiet().await;
    env.proxy().clear_request_log();
    env.proxy().inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/secrets/demo-token".into(),
        status: 409,
        times: 1,
    });
    env.advance_to(next + secs(1)).await;
    let rotated = eventually("the rotated refresh token is stored", || async {
        let valid = env
            .provider
            .goto
            .valid_refresh_token(&env.provider.client_id)?;
        env.tokens("demo-token")
            .await
            .filter(|d| d["refresh_token"] == valid)
    })
    .await;
    env.quiet().await;
    let conflicts = env
        .proxy()
        .request_log()
        .into_iter()
        .filter(|r| {
            r.method == "PATCH" && r.path.contains("/secrets/demo-token") && r.status == 409
        })
        .count();
    assert_eq!(conflicts, 1, "the injected conflict was served");
    assert_eq!(
        env.refresh_requests(),
        1,
        "the held token was written again, not refreshed again"
    );
    assert_ne!(rotated["refresh_token"], before["refresh_token"]);
    assert!(
        !env.provider
            .goto
            .is_refresh_token_valid(&before["refresh_token"]),
        "GoTo spent the old one"
    );
    assert!(
        env.provider
            .goto
            .is_access_token_live(&rotated["access_token"])
    );
    let obj = env.get("demo").await;
    assert_eq!(condition(&obj, "Ready"), pair("True", reason::AUTHORIZED));
    assert_default_schedule(&obj, env.clock.now());
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);
    assert_eq!(
        metric(
            &env.metrics(),
            "goto_oauth_reconcile_errors_total",
            &[("reason", "tokens_unstored")]
        )
        .unwrap_or(0.0),
        0.0,
        "the write is retried inside the refresh, before anything can drop the held token: {}",
        env.metrics()
    );
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_refresh_waits_for_retry_after() {
    let (env, obj) = Env::with_demo().await;
    let before = env.demo_tokens().await;
    let (_, _, next) = schedule(&obj);

    env.provider
        .goto
        .push_token_fault(TokenFault::too_many_requests(120));
    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;
    env.quiet().await;
    let obj = env.get("demo").await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("True", reason::REFRESH_FAILING)
    );
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED)
    );
    assert_eq!(env.refresh_metric("demo", "rate_limited"), 1.0);

    env.advance(secs(60)).await;
    assert_eq!(
        env.refresh_requests(),
        1,
        "no retry before Retry-After (120 s)"
    );
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::REFRESH_FAILING)
    );

    env.advance(secs(61)).await;
    env.wait_refresh_requests(2).await;
    env.new_demo_tokens("refreshed after Retry-After", &before["access_token"])
        .await;
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(env.refresh_requests(), 2);
    assert_eq!(env.refresh_metric("demo", "rate_limited"), 1.0);
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_refresh_does_not_stall_another_clients_consent() {
    let env = Env::start().await;
    env.create("first", serde_json::json!({})).await;
    let obj = env.authorize("first").await;
    let (_, _, next) = schedule(&obj);
    env.create("second", serde_json::json!({})).await;
    let link = env.link("second").await;

    env.provider
        .goto
        .push_token_fault(TokenFault::too_many_requests(600));
    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;

    // The admin of "second" consents now; the callback must not wait 10 minutes.
    let mut browser = Browser::new();
    let back = env
        .provider
        .consent_via(&mut browser, &link, Decision::Allow)
        .await;
    let started = Instant::now();
    let page = tokio::time::timeout(Duration::from_secs(15), browser.get(&back)).await;
    assert!(
        page.is_ok(),
        "the consent callback hung for {:?} behind another client's Retry-After",
        started.elapsed()
    );
    env.cluster
        .wait_condition("second", "Ready", "True", reason::AUTHORIZED)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_and_recover_with_one_event_per_state_change() {
    let (env, obj) = Env::with_demo().await;
    let before = env.demo_tokens().await;
    let (_, _, next) = schedule(&obj);
    env.provider
        .goto
        .push_token_fault(TokenFault::service_unavailable());
    env.provider
        .goto
        .push_token_fault(TokenFault::service_unavailable());

    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;
    env.quiet().await;
    let obj = env.get("demo").await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("True", reason::REFRESH_FAILING)
    );
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED)
    );

    // First retry 5 s later.
    env.advance(secs(4)).await;
    assert_eq!(env.refresh_requests(), 1, "no retry within 5 s");
    env.advance(secs(2)).await;
    env.wait_refresh_requests(2).await;
    env.quiet().await;
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::REFRESH_FAILING)
    );
    // Second retry 10 s after the second failure.
    env.advance(secs(9)).await;
    assert_eq!(env.refresh_requests(), 2, "no retry within 10 s");
    env.advance(secs(2)).await;
    env.wait_refresh_requests(3).await;
    env.new_demo_tokens("recovered token stored", &before["access_token"])
        .await;
    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED)
    );
    assert_default_schedule(&obj, env.clock.now());
    env.quiet().await;
    assert_eq!(env.refresh_requests(), 3);
    assert_eq!(env.refresh_metric("demo", "transient_error"), 2.0);
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);

    let counts = eventually("recovery event", || async {
        let c = env.event_counts("demo").await;
        // The consent's Event is ConsentGiven: Authorized is the recovery's alone.
        (c.get(reason::AUTHORIZED) == Some(&1)).then_some(c)
    })
    .await;
    assert_eq!(
        counts.get(reason::REFRESH_FAILING),
        Some(&1),
        "one Event for the failing state, not one per attempt: {counts:?}"
    );
    assert_eq!(
        counts
            .keys()
            .filter(|r| *r != reason::AWAITING_AUTHORIZATION && *r != "ConsentGiven")
            .count(),
        2,
        "besides the consent, only Authorized (consent, recovery) and RefreshFailing: {counts:?}"
    );
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_requires_reauthorization_and_stops_refreshing() {
    let (env, obj) = Env::with_demo().await;
    let before = env.demo_tokens().await;
    let (_, expires, next) = schedule(&obj);
    let old_link = obj
        .status
        .as_ref()
        .and_then(|s| s.authorization_url.clone())
        .expect("link");
    env.provider
        .goto
        .revoke_refresh_tokens(&env.provider.client_id);

    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;
    let obj = env.wait_reauthorization_required("demo").await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("True", reason::REAUTHORIZATION_REQUIRED),
        "the token still lives"
    );
    let status = obj.status.clone().expect("status");
    let new_link = status
        .authorization_url
        .clone()
        .expect("a link for the re-authorization");
    assert_ne!(new_link, old_link, "a fresh link");
    assert!(
        status.next_refresh_time.is_none(),
        "no refresh scheduled: {:?}",
        status.next_refresh_time
    );
    assert_eq!(
        link_status(&old_link).await,
        404,
        "the previous link is dead"
    );
    assert_eq!(env.refresh_metric("demo", "invalid_grant"), 1.0);
    let counts = eventually("ReauthorizationRequired event", || async {
        let c = env.event_counts("demo").await;
        c.contains_key(reason::REAUTHORIZATION_REQUIRED)
            .then_some(c)
    })
    .await;
    assert_eq!(
        counts.get(reason::REAUTHORIZATION_REQUIRED),
        Some(&1),
        "{counts:?}"
    );

    // No retry loop: minutes later, still the one request.
    env.advance(secs(5 * 60)).await;
    assert_eq!(env.refresh_requests(), 1);
    assert_eq!(
        env.event_counts("demo")
            .await
            .get(reason::REAUTHORIZATION_REQUIRED),
        Some(&1),
        "exactly one ReauthorizationRequired Event while the token lives"
    );
    // After expiry the Secret's token is useless: Ready turns False; still no request.
    env.advance_to(expires + secs(1)).await;
    let obj = env.get("demo").await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("False", reason::REAUTHORIZATION_REQUIRED)
    );
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("False", reason::REAUTHORIZATION_REQUIRED)
    );
    assert_eq!(env.client_ready("demo"), Some(0.0));
    let after_expiry = env.event_counts("demo").await;
    // At most one more: Ready turning False when the token expires is a state change too.
    assert!(
        after_expiry
            .get(reason::REAUTHORIZATION_REQUIRED)
            .is_some_and(|n| *n <= 2),
        "{after_expiry:?}"
    );
    env.advance(secs(6 * 3600)).await;
    assert_eq!(
        env.refresh_requests(),
        1,
        "a rejected refresh token is never retried"
    );
    assert_eq!(
        env.event_counts("demo").await,
        after_expiry,
        "no Events while nothing changes"
    );
    assert_eq!(
        env.get("demo")
            .await
            .status
            .and_then(|s| s.authorization_url),
        Some(new_link.clone()),
        "the link stays put"
    );

    // The admin re-authorizes through the new link.
    let obj = env.authorize("demo").await;
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED)
    );
    let after = env.demo_tokens().await;
    assert_ne!(after["refresh_token"], before["refresh_token"]);
    assert!(
        env.provider
            .goto
            .is_refresh_token_valid(&after["refresh_token"])
    );
    // ... and the schedule runs again.
    let next = assert_default_schedule(&obj, env.clock.now());
    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(2).await;
    env.quiet().await;
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::AUTHORIZED)
    );
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);
    env.assert_no_secret_material().await;
}

/// Expiry alerts must not go blind after a fail-over: a new operator exports every client's
/// series although nothing about the client changed (and so nothing is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_series_exist_right_after_a_restart() {
    let (mut env, obj) = Env::with_demo().await;
    env.quiet().await;
    let expiry = ts(obj
        .status
        .as_ref()
        .and_then(|s| s.access_token_expires_at.as_ref())
        .expect("expiry"))
    .as_second();
    env.proxy().clear_request_log();
    env.restart_operator().await;
    let series = |rendered: &str, metric: &str| -> Option<String> {
        rendered
            .lines()
            .find(|l| l.starts_with(metric) && l.contains("name=\"demo\""))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    eventually(
        "client_ready and token_expiry after the restart",
        || async {
            let rendered = env.op().metrics.render();
            (series(&rendered, "goto_oauth_client_ready{").as_deref() == Some("1")
                && series(&rendered, "goto_oauth_token_expiry_timestamp_seconds{")
                    == Some(expiry.to_string()))
            .then_some(())
        },
    )
    .await;
    assert_eq!(env.writes(), Vec::<String>::new(), "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_operator_resumes_the_schedule() {
    let (mut env, _) = Env::with_demo().await;
    env.quiet().await;
    let obj = env.get("demo").await;
    let before = env.demo_tokens().await;
    let (_, _, next) = schedule(&obj);

    // A restart in the middle of the token's life recomputes the same schedule: no write.
    env.proxy().clear_request_log();
    env.restart_operator().await;
    let after = env.get("demo").await;
    assert_eq!(
        schedule(&after),
        schedule(&obj),
        "nextRefreshTime survives a restart"
    );
    assert_eq!(
        after.metadata.resource_version, obj.metadata.resource_version,
        "no status write"
    );
    assert_eq!(
        env.writes(),
        Vec::<String>::new(),
        "a restart writes nothing"
    );
    assert_eq!(env.refresh_requests(), 0);

    // Down while the refresh falls due: the new operator refreshes at once.
    env.stop_operator().await;
    let overdue = next.duration_since(env.clock.now()) + secs(600);
    env.clock
        .advance(Duration::try_from(overdue).expect("forward"));
    env.start_again().await;
    env.wait_refresh_requests(1).await;
    let data = env
        .new_demo_tokens("overdue refresh stored", &before["access_token"])
        .await;
    env.quiet().await;
    assert_eq!(
        env.refresh_requests(),
        1,
        "exactly one refresh for the overdue token"
    );
    assert_eq!(data["refresh_token"], before["refresh_token"]);
    let obj = env.get("demo").await;
    assert_eq!(condition(&obj, "Ready"), pair("True", reason::AUTHORIZED));
    assert_default_schedule(&obj, env.clock.now());
    env.assert_no_secret_material().await;
}

/// The issue time of a client's token (its lastRefreshTime).
fn obj_now(obj: &GoToOAuthClient) -> Timestamp {
    schedule(obj).0
}

/// Sets the force-refresh annotation to `value`; waits until the operator marked it handled
/// and went quiet. Returns the token Secret's data afterwards.
async fn force_refresh(env: &Env, value: &str) -> BTreeMap<String, String> {
    let before = env.demo_tokens().await;
    let requests = env.refresh_requests();
    annotate(env, "demo", FORCE_REFRESH_ANNOTATION, value).await;
    env.wait_refresh_requests(requests + 1).await;
    let data = env
        .new_demo_tokens("forced refresh stored", &before["access_token"])
        .await;
    eventually("the request is marked handled", || async {
        let obj = env.get("demo").await;
        (obj.status?.handled_refresh_request.as_deref() == Some(value)).then_some(())
    })
    .await;
    env.quiet().await;
    assert_eq!(
        env.refresh_requests(),
        requests + 1,
        "refresh-requested={value:?} must cause exactly one refresh"
    );
    assert_eq!(data["refresh_token"], before["refresh_token"]);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_refresh_annotation_refreshes_once_immediately() {
    let (env, _) = Env::with_demo().await;
    env.quiet().await;

    // Each new value: one refresh at once, without the clock moving.
    for (i, value) in ["2026-01-01T00:00:00Z", "again", "and-again"]
        .into_iter()
        .enumerate()
    {
        force_refresh(&env, value).await;
        let obj = env.get("demo").await;
        assert_eq!(
            obj_now(&obj),
            env.clock.now(),
            "refreshed without the clock moving"
        );
        assert_eq!(schedule(&obj).1, env.clock.now() + LIFETIME);
        assert_eq!(env.refresh_metric("demo", "success"), (i + 1) as f64);
    }
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::AUTHORIZED)
    );
    env.assert_no_secret_material().await;
}

/// The request is handled once the refresh is stored, even if recording that in the status
/// fails the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_refresh_is_not_repeated_when_the_status_write_fails() {
    let (env, _) = Env::with_demo().await;
    env.quiet().await;
    env.proxy().inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/gotooauthclients/demo/status".into(),
        status: 500,
        times: 1,
    });
    force_refresh(&env, "once").await;
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_link_annotation_replaces_the_link_once() {
    let (env, _) = Env::with_demo().await;
    env.quiet().await;
    let old_link = env
        .get("demo")
        .await
        .status
        .and_then(|s| s.authorization_url)
        .expect("link");
    assert_eq!(
        link_status(&old_link).await,
        302,
        "the link works before rotation"
    );
    annotate(&env, "demo", ROTATE_LINK_ANNOTATION, "1").await;
    let obj = eventually("a new link", || async {
        let obj = env.get("demo").await;
        let url = obj.status.as_ref()?.authorization_url.clone()?;
        (url != old_link).then_some(obj)
    })
    .await;
    let new_link = obj
        .status
        .as_ref()
        .and_then(|s| s.authorization_url.clone())
        .expect("link");
    assert_eq!(
        obj.status
            .as_ref()
            .and_then(|s| s.handled_link_rotation.as_deref()),
        Some("1")
    );
    assert_eq!(link_status(&old_link).await, 404, "the old link is dead");
    assert_eq!(link_status(&new_link).await, 302, "the new link works");
    env.quiet().await;
    env.advance(secs(1)).await;
    assert_eq!(
        env.get("demo")
            .await
            .status
            .and_then(|s| s.authorization_url),
        Some(new_link),
        "rotated once per annotation value"
    );
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::AUTHORIZED),
        "rotating the link keeps the tokens"
    );
    assert_eq!(
        env.refresh_requests(),
        0,
        "rotating the link does not refresh"
    );
    env.assert_no_secret_material().await;
}

/// The operator holds the refresh token of what it stored (the access token only until the
/// Secret watch shows it stored): a deleted or hand-edited Secret is restored by a refresh with
/// it, with no new consent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_or_edited_secret_is_restored_by_a_refresh_from_memory() {
    let (mut env, _) = Env::with_demo().await;
    let original = env.demo_tokens().await;
    env.quiet().await;
    assert_eq!(env.refresh_requests(), 0);
    // Fields the refresh does not change: the identity and the grant.
    let unchanged = |data: &BTreeMap<String, String>| {
        data.iter()
            .filter(|(k, _)| !["access_token", "refresh_token", "expires_at"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };

    // GoTo fails the first attempt: until a refresh succeeds, Ready says the Secret is lost.
    env.provider
        .goto
        .push_token_fault(TokenFault::service_unavailable());
    env.cluster
        .secrets()
        .delete("demo-token", &DeleteParams::default())
        .await
        .expect("delete Secret");
    // The status is corrected before the refresh is sent, then says why the refresh failed.
    let obj = eventually("Ready says restoring fails", || async {
        let obj = env.get("demo").await;
        let message = obj
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        message
            .contains("restoring it with a refresh fails")
            .then_some(obj)
    })
    .await;
    assert_eq!(
        condition(&obj, "Ready"),
        pair("False", reason::TOKEN_SECRET_LOST)
    );
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED),
        "the consent stands"
    );
    assert_eq!(env.refresh_requests(), 1);
    assert!(env.tokens("demo-token").await.is_none());
    env.advance(secs(6)).await;
    let restored = env
        .new_demo_tokens("deleted Secret restored", &original["access_token"])
        .await;
    assert_eq!(unchanged(&restored), unchanged(&original));
    assert!(unchanged(&original).contains_key("principal"));
    assert_eq!(env.refresh_requests(), 2, "restored by the retried refresh");
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    let secret = env
        .cluster
        .secrets()
        .get("demo-token")
        .await
        .expect("Secret");
    assert!(
        secret
            .metadata
            .owner_references
            .is_some_and(|o| o.iter().any(|o| o.kind == "GoToOAuthClient"))
    );
    env.quiet().await;

    // Sets one key of the token Secret by hand.
    let edit = |key: &'static str, value: &'static str| {
        let patch = serde_json::json!({"data": {key: base64_encode(value)}});
        let secrets = env.cluster.secrets();
        async move {
            secrets
                .patch("demo-token", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("edit Secret");
        }
    };
    let garbage = "hand-edited-refresh-token-value";
    edit("refresh_token", garbage).await;
    let repaired = eventually("edited Secret restored", || async {
        env.tokens("demo-token").await.filter(|d| {
            d["refresh_token"] != garbage && d["access_token"] != restored["access_token"]
        })
    })
    .await;
    env.quiet().await;
    assert_eq!(unchanged(&repaired), unchanged(&original));
    assert_eq!(
        env.refresh_requests(),
        3,
        "one refresh with the held refresh token, not the edited one"
    );
    assert_eq!(env.tokens("demo-token").await, Some(repaired.clone()));
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::AUTHORIZED)
    );

    // An edited access token is told too, though memory keeps only its digest.
    let garbage = "hand-edited-access-token-value";
    edit("access_token", garbage).await;
    eventually("edited access token replaced", || async {
        env.tokens("demo-token").await.filter(|d| {
            d["access_token"] != garbage && d["access_token"] != repaired["access_token"]
        })
    })
    .await;
    env.quiet().await;
    assert_eq!(env.refresh_requests(), 4);

    // A restarted operator has no memory: a Secret lost while it was down means a new consent.
    env.stop_operator().await;
    env.cluster
        .secrets()
        .delete("demo-token", &DeleteParams::default())
        .await
        .expect("delete Secret");
    env.start_again().await;
    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "False", reason::AWAITING_AUTHORIZATION)
        .await;
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("False", reason::AWAITING_AUTHORIZATION)
    );
    assert!(
        obj.status
            .as_ref()
            .is_some_and(|s| s.access_token_expires_at.is_none() && s.next_refresh_time.is_none())
    );
    env.quiet().await;
    assert!(
        env.tokens("demo-token").await.is_none(),
        "nothing to restore from"
    );
    env.assert_no_secret_material().await;
}

/// The HTTP status a fresh browser gets for an authorization link (302 to GoTo while it works).
async fn link_status(link: &str) -> u16 {
    Browser::new().get_raw(link).await.status().as_u16()
}

fn base64_encode(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_name_change_moves_tokens_and_client_id_change_requires_reauthorization() {
    let (env, obj) = Env::with_demo().await;
    let original = env.demo_tokens().await;
    let (_, _, next) = schedule(&obj);

    patch_spec(&env, serde_json::json!({"secretName": "moved"})).await;
    let moved = eventually("tokens in the new Secret", || async {
        env.tokens("moved").await
    })
    .await;
    assert_eq!(moved, original, "the same tokens, moved");
    eventually("old Secret deleted", || async {
        env.cluster
            .secrets()
            .get_opt("demo-token")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let obj = eventually("status names the new Secret", || async {
        let obj = env.get("demo").await;
        (obj.status.as_ref()?.secret_name.as_deref() == Some("moved")).then_some(obj)
    })
    .await;
    assert_eq!(condition(&obj, "Ready"), pair("True", reason::AUTHORIZED));
    assert_eq!(env.refresh_requests(), 0);

    let obj = change_spec_requiring_reauthorization(
        &env,
        serde_json::json!({"clientId": "another-goto-client"}),
    )
    .await;
    assert!(
        obj.status
            .as_ref()
            .is_some_and(|s| s.authorization_url.is_some())
    );
    env.advance_to(next + secs(1)).await;
    assert_eq!(
        env.refresh_requests(),
        0,
        "tokens of another client are never refreshed"
    );
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_change_requires_reauthorization() {
    let (env, obj) = Env::with_demo().await;
    let (_, _, next) = schedule(&obj);
    let other = format!("{}/regional/oauth/v2/token", env.provider.goto.base_url());

    let obj = change_spec_requiring_reauthorization(
        &env,
        serde_json::json!({"endpoints": {"tokenUrl": other}}),
    )
    .await;
    assert!(
        obj.condition("Authorized")
            .is_some_and(|c| c.message.contains(&other)),
        "the message names the new endpoint"
    );
    env.advance_to(next + secs(1)).await;
    assert_eq!(
        env.refresh_requests(),
        0,
        "tokens of another endpoint are never refreshed"
    );
    assert!(
        env.provider
            .goto
            .token_requests()
            .iter()
            .all(|r| r.status == 200),
        "nothing sent to the new endpoint"
    );
    env.assert_no_secret_material().await;
}

/// A mistaken spec change that is put back leaves valid tokens: no consent should be needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverting_a_client_id_change_restores_authorized() {
    let (env, obj) = Env::with_demo().await;
    let (_, _, next) = schedule(&obj);

    patch_spec(&env, serde_json::json!({"clientId": "typo-client-id"})).await;
    env.wait_reauthorization_required("demo").await;
    env.advance(secs(60)).await;
    patch_spec(
        &env,
        serde_json::json!({"clientId": env.provider.client_id}),
    )
    .await;
    env.quiet().await;
    env.advance(secs(1)).await;
    let obj = env.get("demo").await;
    assert_eq!(
        (condition(&obj, "Authorized"), condition(&obj, "Ready")),
        (
            pair("True", reason::AUTHORIZED),
            pair("True", reason::AUTHORIZED)
        ),
        "the stored tokens belong to the spec's client again"
    );
    env.advance_to(next + secs(1)).await;
    assert_eq!(
        env.refresh_requests(),
        1,
        "and they are refreshed on schedule"
    );
    env.assert_no_secret_material().await;
}

/// An outage that outlasts the token: retries quicken as the token runs out, so once GoTo
/// answers again the token is renewed within seconds, not at the end of a 5-minute backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_past_expiry_the_token_is_renewed_within_seconds_of_recovery() {
    let (env, obj) = Env::with_demo().await;
    let (_, expires, next) = schedule(&obj);
    for _ in 0..500 {
        env.provider
            .goto
            .push_token_fault(TokenFault::server_error_html());
    }
    env.advance_to(next + secs(1)).await;
    while env.clock.now() < expires + secs(120) {
        env.advance(secs(60)).await;
    }
    let failures = env.refresh_requests();
    assert!(failures >= 8, "retried through the outage: {failures}");
    env.cluster
        .wait_condition("demo", "Ready", "False", reason::REFRESH_FAILING)
        .await;

    env.provider.goto.clear_token_faults();
    env.advance(secs(6)).await;
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_false_after_expiry_while_refresh_keeps_failing() {
    let (env, obj) = Env::with_demo().await;
    let (_, expires, next) = schedule(&obj);
    for _ in 0..20 {
        env.provider
            .goto
            .push_token_fault(TokenFault::server_error_html());
    }

    env.advance_to(next + secs(1)).await;
    env.wait_refresh_requests(1).await;
    env.quiet().await;
    assert_eq!(
        condition(&env.get("demo").await, "Ready"),
        pair("True", reason::REFRESH_FAILING)
    );
    env.advance_to(expires - secs(1)).await;
    assert_eq!(
        condition(&env.get("demo").await, "Ready").0,
        "True",
        "usable until it expires"
    );
    let failures = env.refresh_requests();
    assert!(failures >= 2, "retried meanwhile");

    env.advance(secs(2)).await;
    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "False", reason::REFRESH_FAILING)
        .await;
    assert_eq!(
        condition(&obj, "Authorized"),
        pair("True", reason::AUTHORIZED),
        "the consent still stands"
    );
    assert_eq!(env.client_ready("demo"), Some(0.0));
    assert!(env.refresh_metric("demo", "transient_error") >= 2.0);

    env.provider.goto.clear_token_faults();
    env.advance(secs(300)).await;
    let obj = env
        .cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(env.client_ready("demo"), Some(1.0));
    assert_eq!(env.refresh_metric("demo", "success"), 1.0);
    assert!(schedule(&obj).1 > env.clock.now());
    env.assert_no_secret_material().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_before_overrides_the_default_schedule() {
    let env = Env::start().await;
    env.create("demo", serde_json::json!({"refreshBefore": "10m"}))
        .await;
    let obj = env.authorize("demo").await;
    let (issued, expires, next) = schedule(&obj);
    assert_eq!(expires, issued + LIFETIME);
    // Never later than expiry − 10m, never before half the 50-minute interval.
    assert!(
        next > issued + secs(25 * 60) && next <= expires - secs(600),
        "nextRefreshTime {next} is outside (issue + 25m, expiry − 10m]"
    );
    env.advance_to(next - secs(1)).await;
    assert_eq!(env.refresh_requests(), 0);
    env.advance(secs(2)).await;
    env.wait_refresh_requests(1).await;
}

/// Each client's (name, accessTokenExpiresAt, nextRefreshTime).
async fn schedules(env: &Env) -> Vec<(String, Timestamp, Timestamp)> {
    env.cluster
        .clients()
        .list(&Default::default())
        .await
        .expect("list clients")
        .items
        .iter()
        .map(|obj| {
            let (_, expires, next) = schedule(obj);
            (obj.metadata.name.clone().expect("name"), expires, next)
        })
        .collect()
}

/// The most of `times` inside any 5-second window.
fn most_within_5s(times: &[Timestamp]) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| t.duration_since(sorted[i]) < secs(5))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Issue 12.3: clients refreshed together (consents in the same second, then all overdue after
/// a fail-over) do not stay bunched: one cycle on schedule spreads their expiries over the
/// refresh window, and the spread holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_bunched_by_an_outage_spread_out_within_one_cycle() {
    const CLIENTS: usize = 40;
    let mut env = Env::start().await;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("spread-{i:02}")).collect();
    for name in &names {
        env.create(name, serde_json::json!({})).await;
    }
    // The clock does not move while the admins click through: every consent is in one second.
    for name in &names {
        env.authorize(name).await;
    }
    env.quiet().await;
    let expiries = |s: &[(String, Timestamp, Timestamp)]| -> Vec<Timestamp> {
        s.iter().map(|(_, expires, _)| *expires).collect()
    };
    let consented = schedules(&env).await;
    assert_eq!(most_within_5s(&expiries(&consented)), CLIENTS);

    // A fail-over that outlasts every refresh time: the new leader refreshes all at once. (The
    // fake's own limit is off: a 429 there backs a client off on the manual clock, which only
    // blurs the bunch this test makes on purpose.)
    env.provider.goto.set_rate_limit(None);
    env.stop_operator().await;
    env.clock.advance(Duration::from_secs(45 * 60));
    env.start_again().await;
    let bunched = env.cycle_through_schedules(&consented).await;
    let most = most_within_5s(&expiries(&bunched));
    assert_eq!(most, CLIENTS, "all refreshed in the same second");

    // Two cycles, each client refreshed at its nextRefreshTime.
    let mut figures = vec![most];
    let mut before = bunched;
    for cycle in 1..=2 {
        let after = env.cycle_through_schedules(&before).await;
        let most = most_within_5s(&expiries(&after));
        figures.push(most);
        // 40 expiries uniform over a 20-minute window: 2 or 3 within the busiest 5 s (4 in
        // 1.5 % of draws, 5 in 0.05 %: the uids are random). Unspread, all 40 stay together.
        assert!(
            most <= 5,
            "cycle {cycle}: {most} of {CLIENTS} tokens expire within 5 s"
        );
        for (name, expires, next) in &after {
            assert!(
                *next <= *expires - LIFETIME / 3,
                "{name}: refresh {next} later than expiry − refreshBefore"
            );
            assert_eq!(
                env.client_ready(name),
                Some(1.0),
                "{name} kept a valid token"
            );
        }
        before = after;
    }
    eprintln!("most of {CLIENTS} expiries within 5 s: {CLIENTS} at consent, then {figures:?}");
}

/// Production clocks have sub-second precision while the Secret stores whole seconds: an idle
/// reconcile and a restart must still find nothing to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_second_clock_idle_reconciles_and_restarts_write_nothing() {
    let start = whole_second_now() + SignedDuration::from_millis(437);
    let mut env = Env::start_at(start).await;
    env.create("demo", serde_json::json!({})).await;
    env.authorize("demo").await;
    env.quiet().await;
    let obj = env.get("demo").await;

    env.proxy().clear_request_log();
    env.advance(secs(1)).await;
    let idle_writes = env.writes();

    env.proxy().clear_request_log();
    env.restart_operator().await;
    let after = env.get("demo").await;
    let restart_writes = env.writes();
    assert_eq!(
        (idle_writes, restart_writes, schedule(&after)),
        (Vec::new(), Vec::new(), schedule(&obj)),
        "an idle reconcile and a restart write nothing (Secret, status), and the schedule is kept"
    );
}

/// `status.refreshTokenObtainedAt` and its metric: set at the consent, kept by a refresh that
/// returns no refresh token, read back from the Secret after a restart, moved by a rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_obtained_at_follows_consent_and_rotation_across_restarts() {
    let (mut env, obj) = Env::with_demo().await;
    let obtained = |obj: &GoToOAuthClient| {
        obj.status
            .as_ref()
            .and_then(|s| s.refresh_token_obtained_at.as_ref())
            .map(ts)
    };
    let series = |env: &Env| {
        metric(
            &env.metrics(),
            "goto_oauth_refresh_token_obtained_timestamp_seconds",
            &[("namespace", &env.cluster.namespace), ("name", "demo")],
        )
    };
    let consented = obj_now(&obj);
    assert_eq!(obtained(&obj), Some(consented), "set at the consent");
    assert_eq!(series(&env), Some(consented.as_second() as f64));

    // GoTo's refresh response omits the refresh token: the time stays.
    env.advance(secs(60)).await;
    force_refresh(&env, "1").await;
    let obj = env.get("demo").await;
    assert!(obj_now(&obj) > consented, "a refresh happened");
    assert_eq!(obtained(&obj), Some(consented), "kept without a new one");

    // A new operator (no memory) derives it from the Secret: nothing moves, nothing is written.
    env.quiet().await;
    env.proxy().clear_request_log();
    env.restart_operator().await;
    eventually("the series after the restart", || async {
        (series(&env) == Some(consented.as_second() as f64)).then_some(())
    })
    .await;
    assert_eq!(obtained(&env.get("demo").await), Some(consented));
    assert_eq!(
        env.writes(),
        Vec::<String>::new(),
        "a restart writes nothing"
    );

    // GoTo rotates the refresh token: the time moves to that refresh.
    env.provider.goto.set_rotation(RefreshTokenRotation::Always);
    env.advance(secs(60)).await;
    let rotated_at = env.clock.now();
    let requests = env.refresh_requests();
    annotate(&env, "demo", FORCE_REFRESH_ANNOTATION, "2").await;
    env.wait_refresh_requests(requests + 1).await;
    let obj = eventually("refreshTokenObtainedAt moves with the rotation", || async {
        let obj = env.get("demo").await;
        (obtained(&obj) == Some(rotated_at)).then_some(obj)
    })
    .await;
    assert_eq!(obj_now(&obj), rotated_at);
    env.quiet().await;
    assert_eq!(series(&env), Some(rotated_at.as_second() as f64));
    let secret = env.cluster.token_secret("demo").await.expect("Secret");
    assert_eq!(
        secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("goto-oauth.dev/refresh-token-obtained-at"))
            .map(String::as_str),
        Some(goto_oauth_operator::secret::rfc3339(rotated_at).as_str())
    );
    env.assert_no_secret_material().await;
}

// ----- rollout restarts (spec.rolloutRestartTargets) -----

/// A Deployment with no replicas (on a real cluster nothing is scheduled), for restarts.
async fn create_deployment(env: &Env, name: &str) {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.cluster.client.clone(), &env.cluster.namespace);
    let deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}}
    }))
    .expect("deployment");
    api.create(&Default::default(), &deployment)
        .await
        .expect("create deployment");
}

/// The restart annotation on a Deployment's pod template, if set.
async fn restarted_at(env: &Env, name: &str) -> Option<String> {
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.cluster.client.clone(), &env.cluster.namespace);
    api.get(name)
        .await
        .expect("get deployment")
        .spec
        .template
        .metadata?
        .annotations?
        .get("goto-oauth.dev/restartedAt")
        .cloned()
}

/// PATCHes of a Deployment the operator sent, according to the proxy's request log.
fn deployment_patches(env: &Env, name: &str) -> usize {
    env.proxy()
        .request_log()
        .iter()
        .filter(|r| r.verb == "patch" && r.path.ends_with(&format!("/deployments/{name}")))
        .count()
}

fn rollout_condition(obj: &GoToOAuthClient) -> (String, String) {
    condition(obj, "RolloutTargetsUpToDate")
}

/// A consent restarts the env-var consumer once; an hourly refresh does not; consents inside
/// the minimum interval coalesce into one restart at its end; the Deployment and the client
/// both get an Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consents_restart_targets_once_debounced_and_refreshes_do_not() {
    let env = Env::start().await;
    create_deployment(&env, "env-app").await;
    env.create(
        "demo",
        serde_json::json!({
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "env-app"}],
            "rolloutRestartMinInterval": "5m",
        }),
    )
    .await;
    let before = eventually("a baseline before any consent", || async {
        let obj = env.get("demo").await;
        obj.status.as_ref()?.rollout_restart.as_ref()?;
        Some(obj)
    })
    .await;
    assert_eq!(
        rollout_condition(&before),
        pair("True", reason::NO_RESTART_NEEDED)
    );
    assert_eq!(restarted_at(&env, "env-app").await, None);

    env.authorize("demo").await;
    let restarted = eventually("the consent restarts env-app", || async {
        let obj = env.get("demo").await;
        (rollout_condition(&obj) == pair("True", reason::ROLLOUT_RESTARTED)).then_some(obj)
    })
    .await;
    let first = restarted_at(&env, "env-app").await.expect("annotation set");
    assert_eq!(first, env.clock.now().to_string());
    assert_eq!(deployment_patches(&env, "env-app"), 1);
    let record = restarted
        .status
        .as_ref()
        .and_then(|s| s.rollout_restart.clone())
        .expect("record");
    assert_eq!(
        record.last_restart_trigger,
        Some(goto_oauth_operator::resource::RolloutRestartTrigger::Authorization)
    );
    let on_deployment = env.cluster.events_for("env-app").await;
    assert!(
        on_deployment
            .iter()
            .any(|(r, n)| r == "RolloutRestarted" && n.contains("GoToOAuthClient demo")),
        "{on_deployment:?}"
    );
    assert_eq!(
        env.event_counts("demo").await.get("RolloutRestarted"),
        Some(&1)
    );

    // Refreshes (GoTo keeps the refresh token) restart nothing.
    let requests = env.refresh_requests();
    env.advance(LIFETIME).await;
    env.wait_refresh_requests(requests + 1).await;
    env.quiet().await;
    assert_eq!(
        restarted_at(&env, "env-app").await.as_deref(),
        Some(first.as_str())
    );
    assert_eq!(deployment_patches(&env, "env-app"), 1);

    // GoTo rotating the refresh token on the next refresh restarts (the default asks for it).
    env.provider.goto.set_rotation(RefreshTokenRotation::Always);
    env.advance(LIFETIME).await;
    env.wait_refresh_requests(requests + 2).await;
    let rotated = eventually("the rotation restarts env-app", || async {
        let obj = env.get("demo").await;
        let record = obj.status?.rollout_restart?;
        (record.last_restart_trigger
            == Some(goto_oauth_operator::resource::RolloutRestartTrigger::RefreshTokenRotation))
        .then_some(record)
    })
    .await;
    assert_eq!(deployment_patches(&env, "env-app"), 2);
    assert_eq!(
        rotated.last_restart_time.map(|t| t.0),
        Some(env.clock.now())
    );
    env.provider.goto.set_rotation(RefreshTokenRotation::Never);

    // A new consent an hour later restarts at once; two more within the next minute wait and
    // restart once, at the end of the 5-minute window.
    env.advance(LIFETIME).await;
    env.authorize("demo").await;
    let second = env.clock.now();
    eventually("the second consent restarts env-app", || async {
        (deployment_patches(&env, "env-app") == 3).then_some(())
    })
    .await;
    assert_eq!(
        restarted_at(&env, "env-app").await,
        Some(second.to_string())
    );
    env.advance(secs(30)).await;
    env.authorize("demo").await;
    assert_eq!(
        eventually("the restart waits", || async {
            let obj = env.get("demo").await;
            let c = rollout_condition(&obj);
            (c.1 == reason::RESTART_PENDING).then_some(c)
        })
        .await,
        pair("False", reason::RESTART_PENDING)
    );
    env.advance(secs(30)).await;
    env.authorize("demo").await;
    env.advance(secs(60)).await;
    assert_eq!(
        deployment_patches(&env, "env-app"),
        3,
        "still inside the window"
    );
    env.advance_to(second + secs(300)).await;
    let obj = env
        .cluster
        .wait_condition(
            "demo",
            "RolloutTargetsUpToDate",
            "True",
            reason::ROLLOUT_RESTARTED,
        )
        .await;
    assert_eq!(
        deployment_patches(&env, "env-app"),
        4,
        "one restart for both"
    );
    assert_eq!(
        restarted_at(&env, "env-app").await,
        Some((second + secs(300)).to_string())
    );
    assert!(
        obj.status
            .unwrap()
            .rollout_restart
            .unwrap()
            .pending_restart_time
            .is_none()
    );
    env.advance(secs(600)).await;
    assert_eq!(
        deployment_patches(&env, "env-app"),
        4,
        "nothing more to restart"
    );

    // Targets removed, then listed again: a fresh baseline (the pods run with these tokens),
    // not the record of the restarts before.
    patch_spec(&env, serde_json::json!({"rolloutRestartTargets": null})).await;
    eventually("the record goes with the targets", || async {
        let obj = env.get("demo").await;
        obj.status
            .as_ref()
            .is_some_and(|s| s.rollout_restart.is_none())
            .then_some(())
    })
    .await;
    patch_spec(
        &env,
        serde_json::json!({"rolloutRestartTargets": [{"kind": "Deployment", "name": "env-app"}]}),
    )
    .await;
    env.cluster
        .wait_condition(
            "demo",
            "RolloutTargetsUpToDate",
            "True",
            reason::NO_RESTART_NEEDED,
        )
        .await;
    env.quiet().await;
    assert_eq!(deployment_patches(&env, "env-app"), 4);
    env.assert_no_secret_material().await;
}

/// A missing target and a forbidden one are a condition and a Warning Event each, never a
/// retry storm: a missing one is not retried, a forbidden one once per interval until it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_forbidden_targets_are_reported_and_retried_calmly() {
    let env = Env::start().await;
    create_deployment(&env, "locked").await;
    env.create(
        "demo",
        serde_json::json!({
            "rolloutRestartTargets": [
                {"kind": "Deployment", "name": "absent"},
            ],
        }),
    )
    .await;
    env.authorize("demo").await;
    let obj = env
        .cluster
        .wait_condition(
            "demo",
            "RolloutTargetsUpToDate",
            "False",
            reason::RESTART_TARGET_NOT_FOUND,
        )
        .await;
    assert!(rollout_condition(&obj).1.contains("NotFound"));
    let message = obj
        .condition("RolloutTargetsUpToDate")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("Deployment/absent"), "{message}");
    env.advance(secs(900)).await;
    assert_eq!(
        deployment_patches(&env, "absent"),
        1,
        "a missing target is not retried"
    );
    assert_eq!(
        env.event_counts("demo")
            .await
            .get(reason::RESTART_TARGET_NOT_FOUND),
        Some(&1)
    );

    // The operator may not patch "locked" (as without the opt-in RBAC) for two attempts.
    env.proxy().inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/deployments/locked".into(),
        status: 403,
        times: 2,
    });
    patch_spec(
        &env,
        serde_json::json!({
            "rolloutRestartTargets": [{"kind": "Deployment", "name": "locked"}],
        }),
    )
    .await;
    env.quiet().await;
    env.authorize("demo").await;
    let t0 = env.clock.now();
    let obj = env
        .cluster
        .wait_condition(
            "demo",
            "RolloutTargetsUpToDate",
            "False",
            reason::RESTART_FORBIDDEN,
        )
        .await;
    assert!(
        obj.condition("RolloutTargetsUpToDate")
            .is_some_and(|c| c.message.contains("Deployment/locked") && c.message.contains("RBAC"))
    );
    assert_eq!(deployment_patches(&env, "locked"), 1);
    env.advance(secs(299)).await;
    assert_eq!(
        deployment_patches(&env, "locked"),
        1,
        "no retry inside the interval"
    );
    env.advance_to(t0 + secs(300)).await;
    assert_eq!(
        deployment_patches(&env, "locked"),
        2,
        "one retry per interval"
    );
    assert_eq!(
        env.event_counts("demo")
            .await
            .get(reason::RESTART_FORBIDDEN),
        Some(&1),
        "an Event when the condition turns, not per attempt"
    );
    env.advance_to(t0 + secs(600)).await;
    env.cluster
        .wait_condition(
            "demo",
            "RolloutTargetsUpToDate",
            "True",
            reason::ROLLOUT_RESTARTED,
        )
        .await;
    assert_eq!(deployment_patches(&env, "locked"), 3);
    assert!(restarted_at(&env, "locked").await.is_some());
    env.advance(secs(900)).await;
    assert_eq!(deployment_patches(&env, "locked"), 3);
}

/// Issue 11: the provider allows fewer requests per second than `--token-rate-limit` (4 against
/// 10). The first requests of a storm of due refreshes draw 429s; the limiter halves its rate
/// once per burst (10 → 5 → 3, the floor) and climbs back only to just below the rate that drew
/// the last one, so every later refresh goes through without a 429. Paced at a fixed 10 per
/// second, about every second request of the storm would draw one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_limit_below_the_configured_rate_costs_429s_only_until_the_limiter_adapts() {
    const CLIENTS: usize = 40;
    const PROVIDER_LIMIT: u32 = 4;
    let env = Env::start().await;
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("storm-{i:02}")).collect();
    for name in &names {
        env.create(name, serde_json::json!({})).await;
    }
    for name in &names {
        env.authorize(name).await;
    }
    env.quiet().await;
    let before = env.provider.goto.token_requests().len();
    let consent_expiry = schedules(&env)
        .await
        .iter()
        .map(|(_, expires, _)| *expires)
        .max()
        .expect("clients");
    let refreshes_since = |env: &Env| {
        let mut storm: Vec<_> = env.provider.goto.token_requests()[before..]
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .map(|r| (r.at, r.status))
            .collect();
        storm.sort();
        storm
    };

    env.provider.goto.set_rate_limit(Some(PROVIDER_LIMIT));
    // Past every client's refresh time, before any expiry: all due at once. A client that draws
    // a 429 backs off on the manual clock, which stands still: one request per client.
    env.clock.advance(Duration::from_secs(45 * 60));
    let storm = eventually(&format!("{CLIENTS} refresh requests"), || async {
        let storm = refreshes_since(&env);
        (storm.len() >= CLIENTS).then_some(storm)
    })
    .await;
    env.quiet().await;
    assert_eq!(
        refreshes_since(&env).len(),
        CLIENTS,
        "one request per client: no retries on the standing clock"
    );
    let limited: Vec<usize> = storm
        .iter()
        .enumerate()
        .filter(|(_, (_, status))| *status == 429)
        .map(|(i, _)| i)
        .collect();
    assert!(
        !limited.is_empty(),
        "the provider's lower limit was never hit: the test proves nothing"
    );
    // At most the first burst (10 at once) and the next (5, the halved rate) can draw a 429;
    // from 3 per second the rate climbs back to 4 and stops below the 5 that drew the last one.
    assert!(
        limited.iter().all(|i| *i < 15),
        "429s after the limiter adapted: requests {limited:?} of {CLIENTS}"
    );
    let metrics = env.metrics();
    let rate = metric(&metrics, "goto_oauth_token_rate_limit_per_second", &[]).unwrap_or(0.0);
    assert!(
        (3.0..=4.0).contains(&rate),
        "the allowed rate is {rate} per second"
    );
    let decreases =
        metric(&metrics, "goto_oauth_token_rate_limit_decreases_total", &[]).unwrap_or(0.0);
    assert!(
        (1.0..=2.0).contains(&decreases),
        "{decreases} decreases: one per burst"
    );

    // The clients that drew one retry after their backoff, without a 429 either.
    env.advance(secs(60)).await;
    eventually("every client refreshed", || async {
        let now = schedules(&env).await;
        (now.len() == CLIENTS && now.iter().all(|(_, expires, _)| *expires > consent_expiry))
            .then_some(())
    })
    .await;
    let statuses: Vec<u16> = refreshes_since(&env).iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses.len(), CLIENTS + limited.len());
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        limited.len(),
        "no 429 among the retries"
    );
}

/// Issue 11: a storm of due refreshes reaches GoTo earliest expiry first across all due clients,
/// not in the controller queue's order (which, after a fail-over or an outage, is the order of a
/// list). 30 clients whose tokens expire a second apart are all due at once; the first 10
/// requests (sent before anyone had to wait) are answered slowly, so every other client has
/// asked for its turn and parked by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_due_refreshes_is_served_earliest_expiry_first() {
    const CLIENTS: usize = 30;
    /// Turns out at once (`--max-concurrent-refreshes`): the first ones go in queue order, and
    /// clients woken together may race each other to GoTo.
    const TURNS: usize = 10;
    let env = Env::start().await;
    env.provider.goto.set_rate_limit(None);
    let names: Vec<String> = (0..CLIENTS).map(|i| format!("order-{i:02}")).collect();
    for name in &names {
        env.create(name, serde_json::json!({})).await;
    }
    // One consent a second: each client's token expires a second after the previous one's.
    for name in &names {
        env.authorize(name).await;
        env.clock.advance(Duration::from_secs(1));
    }
    env.quiet().await;
    let before = env.provider.goto.token_requests().len();

    for _ in 0..TURNS {
        env.provider
            .goto
            .push_token_fault(TokenFault::SlowResponse(Duration::from_secs(2)));
    }
    env.clock.advance(Duration::from_secs(45 * 60));
    let storm = eventually(&format!("{CLIENTS} refresh requests"), || async {
        let mut storm: Vec<_> = env.provider.goto.token_requests()[before..]
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .map(|r| (r.at, r.status, r.refresh_token_seq))
            .collect();
        storm.sort();
        (storm.len() >= CLIENTS).then_some(storm)
    })
    .await;
    // Refresh tokens were issued in consent order, so their issue numbers follow the expiries.
    let queued: Vec<u64> = storm[TURNS..]
        .iter()
        .map(|(_, status, seq)| {
            assert_eq!(*status, 200);
            seq.expect("a refresh token the provider issued")
        })
        .collect();
    for (i, earlier) in queued.iter().enumerate() {
        for later in queued.iter().skip(i + TURNS) {
            assert!(
                earlier < later,
                "refresh token {later} (earlier expiry) reached GoTo {TURNS}+ places after \
                 {earlier}: {queued:?}"
            );
        }
    }
    env.quiet().await;
    assert_eq!(
        env.provider.goto.token_requests()[before..]
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
            .count(),
        CLIENTS,
        "one refresh per client"
    );
}
