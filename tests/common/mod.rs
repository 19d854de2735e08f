//! Shared harness of the end-to-end tests: an API server (the in-memory one, or a real cluster
//! when `KUBECONFIG` is set and `GOTO_OAUTH_E2E_REAL_CLUSTER=1`) behind the fault-injecting,
//! request-logging proxy, the fake GoTo provider, and the real operator binary as a child process.
//!
//! Submodules: [`metrics`] reads Prometheus text, [`node`] runs the Node.js helper scripts of
//! the browser and interop tests, [`operator`] runs the operator in-process.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod metrics;
pub mod node;
pub mod operator;

use std::{
    future::Future,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use fake_goto::{ClientRegistration, Decision, FakeGoTo, FakeGoToConfig};
use goto_oauth_operator::{clock::Clock, conditions::reason, resource::GoToOAuthClient};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, CustomResourceExt, api::PostParams};
use kube_fault_proxy::FaultProxy;
use operator::Options;
use tokio::{io::AsyncBufReadExt, process::Child};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// The User-Agent of [`Cluster::operator_client`].
pub const OPERATOR_AGENT: &str = "goto-oauth-operator-e2e";

/// Keys every token Secret carries after a consent at GoTo (GoTo adds more of its own).
pub const TOKEN_SECRET_KEYS: [&str; 6] = [
    "access_token",
    "refresh_token",
    "token_type",
    "expires_at",
    "scope",
    "principal",
];

/// The scopes every test client asks for.
pub const SCOPES: [&str; 2] = ["identity:", "call-control.v1.calls.control"];

/// Polls `check` until it returns `Some`, or panics with `what` after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

/// [`eventually`] with another deadline, for waits on the wall clock (a token's schedule).
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether this run targets a real cluster.
pub fn real_cluster() -> bool {
    std::env::var("GOTO_OAUTH_E2E_REAL_CLUSTER").as_deref() == Ok("1")
        && std::env::var_os("KUBECONFIG").is_some()
}

/// The API server the test talks to, always through a [`FaultProxy`]: `client` and
/// `kubeconfig` point at the proxy, so every request of the test, an in-process operator and the
/// operator binary is logged and can be failed on purpose, on the in-memory server and on a real
/// cluster alike. `cut_watches` is the proxy's; of the in-memory server's own hooks only
/// `compact` is used by an e2e test (`tests/chaos.rs`, through [`Cluster::in_memory`], skipped
/// on a real cluster); `tests/apiserver_conformance.rs` tests the in-memory server itself.
pub struct Cluster {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub namespace: String,
    proxy: FaultProxy,
    /// The in-memory API server (`None` on a real cluster), kept alive for the test's duration.
    fake: Option<FakeApiServer>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let namespace = format!(
            "e2e-{}",
            goto_oauth_operator::consent::random_token(6)
                .to_lowercase()
                .replace(['_', '-'], "x")
        );
        let (fake, upstream) = if real_cluster() {
            eprintln!("e2e: running against the real cluster in KUBECONFIG");
            (None, Client::try_default().await.expect("kube client"))
        } else {
            eprintln!(
                "e2e: in-memory API server (set KUBECONFIG and GOTO_OAUTH_E2E_REAL_CLUSTER=1 to use a real cluster)"
            );
            let fake = FakeApiServer::start().await;
            let client = fake.client();
            (Some(fake), client)
        };
        let proxy = FaultProxy::start(upstream)
            .await
            .expect("start the API proxy");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, proxy.kubeconfig_yaml()).expect("write kubeconfig");
        let cluster = Cluster {
            client: proxy.client(),
            kubeconfig,
            namespace,
            proxy,
            fake,
            _dir: dir,
        };
        fake_apiserver::install_crd(
            &cluster.client,
            GoToOAuthClient::crd(),
            "e2e-tests",
            DEADLINE,
        )
        .await
        .expect("CRD installed");
        fake_apiserver::create_namespace(&cluster.client, &cluster.namespace)
            .await
            .expect("namespace created");
        cluster
    }

    /// The proxy in front of the API server: its request log and fault injection.
    pub fn proxy(&self) -> &FaultProxy {
        &self.proxy
    }

    /// A client through the proxy whose requests carry [`OPERATOR_AGENT`]: for an in-process
    /// operator whose requests a test counts apart from its own ([`Self::operator_requests`]).
    pub fn operator_client(&self) -> Client {
        let mut config = kube::Config::new(self.proxy.url().parse().expect("proxy url"));
        config.default_namespace = self.proxy.client().default_namespace().to_string();
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(OPERATOR_AGENT),
        ));
        goto_oauth_operator::api_client::build(config).expect("operator client")
    }

    /// The requests sent with [`Self::operator_client`] since the log was last cleared, as
    /// "verb path status".
    pub fn operator_requests(&self) -> Vec<String> {
        self.proxy
            .request_log()
            .into_iter()
            .filter(|r| r.user_agent.as_deref() == Some(OPERATOR_AGENT))
            .map(|r| format!("{} {} {}", r.verb, r.path, r.status))
            .collect()
    }

    /// The in-memory API server, for the hooks only it has (`compact`); `None` on a real
    /// cluster, where a test must skip what needs them.
    pub fn in_memory(&self) -> Option<&FakeApiServer> {
        self.fake.as_ref()
    }

    pub fn clients(&self) -> Api<GoToOAuthClient> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub async fn create_client_secret(&self, name: &str, secret: &str) {
        let s = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            string_data: Some([("clientSecret".to_string(), secret.to_string())].into()),
            ..Default::default()
        };
        self.secrets()
            .create(&PostParams::default(), &s)
            .await
            .expect("create client secret");
    }

    pub async fn create_client(&self, name: &str, spec: serde_json::Value) -> GoToOAuthClient {
        let obj: GoToOAuthClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "goto-oauth.dev/v1alpha1",
            "kind": "GoToOAuthClient",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("valid client");
        self.clients()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create client")
    }

    /// Waits until the named client's condition has the given status and reason.
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> GoToOAuthClient {
        eventually(&format!("{name} {type_}={status}/{reason}"), || async {
            let obj = self.clients().get(name).await.ok()?;
            let c = obj.condition(type_)?;
            (c.status == status && c.reason == reason).then_some(obj)
        })
        .await
    }

    /// Waits until the named client awaits its consent; returns it and its authorization link.
    pub async fn awaiting_authorization(&self, name: &str) -> (GoToOAuthClient, String) {
        let obj = self
            .wait_condition(name, "Ready", "False", reason::AWAITING_AUTHORIZATION)
            .await;
        let link = obj
            .status
            .as_ref()
            .and_then(|s| s.authorization_url.clone())
            .expect("status.authorizationUrl");
        (obj, link)
    }

    /// The authorization link of a client that awaits its consent.
    pub async fn authorization_link(&self, name: &str) -> String {
        self.awaiting_authorization(name).await.1
    }

    /// The token Secret of a client with the default `secretName` (`<name>-token`).
    /// The link a client publishes now, whatever its state.
    pub async fn published_link(&self, name: &str) -> Option<String> {
        self.clients()
            .get(name)
            .await
            .ok()?
            .status?
            .authorization_url
    }

    pub async fn token_secret(&self, name: &str) -> Option<Secret> {
        self.secrets()
            .get_opt(&format!("{name}-token"))
            .await
            .expect("get token Secret")
    }

    /// Waits until the named client is gone from the API.
    pub async fn wait_client_gone(&self, name: &str) {
        eventually(&format!("{name} deleted"), || async {
            self.clients()
                .get_opt(name)
                .await
                .expect("get client")
                .is_none()
                .then_some(())
        })
        .await;
    }

    /// Events recorded for a client (through events.k8s.io/v1, as kube's Recorder writes them).
    pub async fn events_for(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        api.list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// Writes the operator made (status, Secrets, Events) according to the proxy's request log.
    pub fn operator_writes(&self) -> Vec<String> {
        self.proxy
            .request_log()
            .into_iter()
            .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
            .filter(|r| r.path.contains(&format!("/namespaces/{}/", self.namespace)))
            .filter(|r| {
                r.path.ends_with("/status")
                    || r.path.contains("/secrets")
                    || r.path.contains("/events")
            })
            .map(|r| format!("{} {} {}", r.verb, r.path, r.status))
            .collect()
    }
}

/// The fake GoTo provider with one registered client.
pub struct Provider {
    pub goto: FakeGoTo,
    pub client_id: String,
    pub client_secret: String,
}

impl Provider {
    pub async fn start(config: FakeGoToConfig, redirect_uri: &str) -> Provider {
        let goto = FakeGoTo::start(config).await;
        let client_id = "0f0e8c7a-6c3d-4d1e-9a51-goto-e2e".to_string();
        let client_secret = fake_goto::sample_client_secret();
        let provider = Provider {
            goto,
            client_id,
            client_secret,
        };
        provider.register(&provider.client_id, vec![redirect_uri.to_string()], "e2e");
        provider
    }

    /// Registers (or re-registers) a GoTo client with this provider's client secret and [`SCOPES`].
    pub fn register(&self, client_id: &str, redirect_uris: Vec<String>, name: &str) {
        self.goto.register_client(ClientRegistration {
            client_id: client_id.to_string(),
            client_secret: self.client_secret.clone(),
            redirect_uris,
            scopes: SCOPES.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
        });
    }

    /// A client spec for the registered client, its secret in the Secret `creds`, asking for
    /// [`SCOPES`]; the fields of `extra` are added (or replace these).
    pub fn spec(&self, extra: serde_json::Value) -> serde_json::Value {
        let mut spec = serde_json::json!({
            "clientId": self.client_id,
            "clientSecretRef": {"name": "creds"},
            "scopes": SCOPES,
        });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        spec
    }

    /// Opens `link` in `browser` and answers GoTo's consent page with `decision`; returns the
    /// callback URL GoTo sends the browser back to (not yet followed).
    pub async fn consent_via(
        &self,
        browser: &mut Browser,
        link: &str,
        decision: Decision,
    ) -> String {
        let goto_url = browser.open_link(link).await;
        self.goto
            .consent(&goto_url, decision)
            .await
            .unwrap_or_else(|e| panic!("GoTo's consent page: {e}"))
    }

    /// An admin allowing access through `link` in a new browser: returns GoTo's callback URL
    /// (it carries the code) and the operator's result page.
    pub async fn allow(&self, link: &str) -> (String, Page) {
        let mut browser = Browser::new();
        let back = self.consent_via(&mut browser, link, Decision::Allow).await;
        let page = browser.get(&back).await;
        (back, page)
    }

    /// How many requests with this `grant_type` reached GoTo's token endpoint.
    pub fn grant_requests(&self, grant_type: &str) -> usize {
        self.goto
            .token_requests()
            .iter()
            .filter(|r| r.grant_type.as_deref() == Some(grant_type))
            .count()
    }

    /// Refresh requests at GoTo's token endpoint.
    pub fn refresh_requests(&self) -> usize {
        self.grant_requests("refresh_token")
    }

    /// What must never show in a page, log, status, Event or metric, each with what it is: the
    /// client secret and every token GoTo still honours for the client.
    pub fn secret_material(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("client secret", self.client_secret.clone())];
        out.extend(
            self.goto
                .live_access_tokens(&self.client_id)
                .into_iter()
                .map(|t| ("access token", t)),
        );
        out.extend(
            self.goto
                .valid_refresh_token(&self.client_id)
                .map(|t| ("refresh token", t)),
        );
        out
    }

    pub fn assert_no_secret_material(&self, text: &str) {
        for (what, value) in self.secret_material() {
            assert!(!text.contains(&value), "{what} leaked");
        }
    }

    /// Options for an in-process operator on `cluster`'s namespace that talks to this provider.
    pub fn operator_options(&self, cluster: &Cluster, clock: Clock) -> Options {
        Options {
            clock,
            ..Options::new(
                &cluster.namespace,
                &self.goto.authorize_url(),
                &self.goto.token_url(),
            )
        }
    }
}

/// A loopback listener for an in-process operator and the callback URL it serves (to register
/// at the provider before the operator starts).
pub async fn bind_callback() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let callback = format!(
        "http://{}/callback",
        listener.local_addr().expect("local addr")
    );
    (listener, callback)
}

/// A Secret's value as text; `None` when the key is missing or the value is not UTF-8.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?;
    String::from_utf8(data.get(key)?.0.clone()).ok()
}

/// A Secret's value as text; panics naming the key when it is missing or not UTF-8.
pub fn secret_field(secret: &Secret, key: &str) -> String {
    secret_text(secret, key).unwrap_or_else(|| panic!("token Secret lacks {key} (or not UTF-8)"))
}

/// A cluster, the fake GoTo (its client secret in the Secret `creds`) and an in-process
/// operator whose callback is registered there, with `options` adjusted: where tests begin
/// that need a manual clock or operator options the binary's flags do not reach.
pub async fn in_process_stack(
    clock: Clock,
    options: impl FnOnce(Options) -> Options,
) -> (Cluster, Provider, operator::InProcessOperator) {
    let cluster = Cluster::start().await;
    let (listener, callback) = bind_callback().await;
    let provider = Provider::start(FakeGoToConfig::default(), &callback).await;
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;
    let options = options(provider.operator_options(&cluster, clock));
    let op = operator::InProcessOperator::start(cluster.client.clone(), listener, options)
        .await
        .expect("start in-process operator");
    (cluster, provider, op)
}

/// The real operator binary (leader election off) with its callback registered at the fake
/// GoTo, and the registered client's secret in the Secret `creds`.
pub struct Stack {
    pub cluster: Cluster,
    pub provider: Provider,
    pub op: Operator,
    /// The operator's callback URL, as registered at the provider.
    pub redirect_uri: String,
}

impl Stack {
    pub async fn start(extra: &[&str]) -> Stack {
        let cluster = Cluster::start().await;
        let port = free_port();
        let redirect_uri = format!("http://127.0.0.1:{port}/callback");
        let provider = Provider::start(FakeGoToConfig::default(), &redirect_uri).await;
        let mut args = vec!["--leader-election=false"];
        args.extend_from_slice(extra);
        let op = Operator::start_on(&cluster, &provider, port, &args).await;
        cluster
            .create_client_secret("creds", &provider.client_secret)
            .await;
        Stack {
            cluster,
            provider,
            op,
            redirect_uri,
        }
    }

    /// Creates a client from [`Provider::spec`] with `extra`; returns its authorization link.
    pub async fn client(&self, name: &str, extra: serde_json::Value) -> String {
        self.cluster
            .create_client(name, self.provider.spec(extra))
            .await;
        self.cluster.authorization_link(name).await
    }
}

/// The operator binary running as a child process, its log captured.
pub struct Operator {
    pub child: Child,
    pub public_url: String,
    pub metrics_url: String,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Operator {
    pub async fn start(cluster: &Cluster, provider: &Provider, extra: &[&str]) -> Operator {
        Self::start_on(cluster, provider, free_port(), extra).await
    }

    pub async fn start_on(
        cluster: &Cluster,
        provider: &Provider,
        port: u16,
        extra: &[&str],
    ) -> Operator {
        let binary = std::path::Path::new(env!("CARGO_BIN_EXE_goto-oauth-operator"));
        Self::start_binary(binary, cluster, provider, port, extra).await
    }

    /// Starts `binary` (another build of the operator, e.g. the previous release) with the
    /// arguments [`Operator::start_on`] gives the current one; `extra` must be flags it knows.
    pub async fn start_binary(
        binary: &std::path::Path,
        cluster: &Cluster,
        provider: &Provider,
        port: u16,
        extra: &[&str],
    ) -> Operator {
        let public_url = format!("http://127.0.0.1:{port}");
        let op = Self::spawn_binary(binary, cluster, provider, port, &public_url, extra);
        op.wait_healthy().await;
        op
    }

    /// Spawns `binary` listening on `port` with `public_url` as its `--public-url` (replicas
    /// behind one Service share it) and returns at once: the process may still be starting, or
    /// exit (a pod that crash-loops). [`Operator::wait_healthy`] waits for it to serve.
    pub fn spawn_binary(
        binary: &std::path::Path,
        cluster: &Cluster,
        provider: &Provider,
        port: u16,
        public_url: &str,
        extra: &[&str],
    ) -> Operator {
        let metrics_port = free_port();
        let mut cmd = tokio::process::Command::new(binary);
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--public-url")
            .arg(public_url)
            .arg("--namespace")
            .arg(&cluster.namespace)
            .arg("--operator-namespace")
            .arg(&cluster.namespace)
            .arg("--authorize-url")
            .arg(provider.goto.authorize_url())
            .arg("--token-url")
            .arg(provider.goto.token_url())
            .args(extra)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "info,goto_oauth_operator=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn operator");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if std::env::var_os("E2E_SHOW_LOGS").is_some() {
                        eprintln!("operator: {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        Operator {
            child,
            public_url: public_url.to_string(),
            metrics_url: format!("http://127.0.0.1:{metrics_port}"),
            log,
        }
    }

    /// Waits until the operator serves `/healthz`.
    pub async fn wait_healthy(&self) {
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", self.metrics_url);
        eventually("operator serving /healthz", || async {
            http.get(&url)
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        })
        .await;
    }

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("operator exits after SIGTERM")
            .expect("wait")
    }
}

/// A minimal browser: follows redirects by hand, keeps cookies, returns the final response.
pub struct Browser {
    pub http: reqwest::Client,
    pub cookies: Vec<String>,
}

pub struct Page {
    pub status: u16,
    pub url: String,
    pub body: String,
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Vec::new(),
        }
    }

    /// GET with this browser's cookies; returns the response without following redirects.
    pub async fn get_raw(&mut self, url: &str) -> reqwest::Response {
        let mut req = self.http.get(url);
        if !self.cookies.is_empty() {
            req = req.header("cookie", self.cookies.join("; "));
        }
        let resp = req.send().await.expect("request");
        for c in resp.headers().get_all("set-cookie") {
            let pair = c.to_str().unwrap().split(';').next().unwrap().to_string();
            let name = pair.split('=').next().unwrap().to_string();
            self.cookies.retain(|c| !c.starts_with(&format!("{name}=")));
            self.cookies.push(pair);
        }
        resp
    }

    /// GET following redirects (up to 10).
    pub async fn get(&mut self, url: &str) -> Page {
        let mut url = url.to_string();
        for _ in 0..10 {
            let resp = self.get_raw(&url).await;
            if resp.status().is_redirection() {
                url = resp.headers()["location"].to_str().unwrap().to_string();
                continue;
            }
            return Page {
                status: resp.status().as_u16(),
                url,
                body: resp.text().await.unwrap(),
            };
        }
        panic!("too many redirects");
    }

    /// Opens an authorization link and returns GoTo's consent page URL (the 302 target).
    pub async fn open_link(&mut self, link: &str) -> String {
        let resp = self.get_raw(link).await;
        assert_eq!(
            resp.status().as_u16(),
            302,
            "authorize link redirects to GoTo"
        );
        resp.headers()["location"].to_str().unwrap().to_string()
    }
}
