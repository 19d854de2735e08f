//! The endpoint allow-list end to end (`--allowed-endpoint-hosts`). A GoToOAuthClient is written
//! by any user of its namespace, not by the operator's admin, so its `spec.endpoints` must not turn
//! the operator into someone else's redirector (`/authorize/…` on the operator's trusted domain)
//! or HTTP client (code exchanges and refreshes carry the client secret). The operator runs
//! in-process with GoTo's default hosts plus the fake GoTo's `127.0.0.1:PORT` (the host of its
//! `--authorize-url`/`--token-url`); foreign hosts are a listener that counts connections.

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use common::{
    Browser, Cluster, Provider, eventually, in_process_stack, operator::InProcessOperator,
    operator::Options,
};
use fake_goto::Decision;
use goto_oauth_operator::{clock::Clock, conditions::reason, consent::random_token};
use kube::api::{Patch, PatchParams};

/// A host the operator must never contact: counts every connection and closes it at once.
struct Trap {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind trap");
        let port = listener.local_addr().expect("trap addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Trap {
            port,
            connections,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The API server, the fake GoTo with the client secret in `creds`, and an in-process operator.
struct Env {
    cluster: Cluster,
    provider: Provider,
    op: InProcessOperator,
}

impl Env {
    /// `options` adjusts the operator's defaults (GoTo's hosts, the fake GoTo's endpoints).
    async fn start(options: impl FnOnce(Options) -> Options) -> Env {
        let (cluster, provider, op) = in_process_stack(Clock::system(), options).await;
        Env {
            cluster,
            provider,
            op,
        }
    }

    /// A fake GoTo URL under the fake's other name, `localhost`: the same socket, but not the host
    /// the operator was configured with.
    fn fake_goto_as_localhost(&self, url: &str) -> String {
        url.replacen("://127.0.0.1:", "://localhost:", 1)
    }

    /// Waits for `Ready=False/InvalidSpec`; asserts the message names what to change and that no
    /// link is published.
    async fn assert_refused(&self, name: &str, field: &str, host: &str) {
        let obj = self
            .cluster
            .wait_condition(name, "Ready", "False", reason::INVALID_SPEC)
            .await;
        let message = obj.condition("Ready").expect("Ready").message.clone();
        for needle in [
            &format!("spec.endpoints.{field}"),
            &format!("{host:?}"),
            "--allowed-endpoint-hosts",
        ] {
            assert!(message.contains(needle), "{name}: {needle} in {message}");
        }
        assert_eq!(
            obj.status.and_then(|s| s.authorization_url),
            None,
            "{name}: no authorization link"
        );
    }

    /// Opens an `/authorize/…` URL; asserts that if the operator redirects, it is not to
    /// `foreign`. `/authorize` answers from the link index, which follows the clients' watch:
    /// for the moment the watch takes to deliver a spec change, a published link still leads to
    /// the host it was published for, which was allowed; never to the new one.
    async fn assert_not_sent_to(&self, link: &str, foreign: &str) {
        let response = Browser::new().get_raw(link).await;
        let location = response
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .unwrap_or_default();
        assert!(
            !location.contains(foreign),
            "{link} answered {} to {location}",
            response.status()
        );
    }

    /// Opens an `/authorize/…` URL until the operator answers without redirecting anywhere.
    async fn assert_no_redirect_soon(&self, link: &str) {
        eventually(&format!("{link} redirects nowhere"), || async {
            let response = Browser::new().get_raw(link).await;
            (!response.status().is_redirection() && response.headers().get("location").is_none())
                .then_some(())
        })
        .await;
    }

    /// Opens an `/authorize/…` URL; asserts the operator answers without redirecting anywhere.
    async fn assert_no_redirect(&self, link: &str) {
        let response = Browser::new().get_raw(link).await;
        assert!(
            !response.status().is_redirection() && response.headers().get("location").is_none(),
            "{link} answered {} {:?}",
            response.status(),
            response.headers().get("location")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_endpoints_are_invalid_spec_and_publish_no_link() {
    let env = Env::start(|o| o).await;
    let alias_token_url = env.fake_goto_as_localhost(&env.provider.goto.token_url());
    let alias_host = alias_token_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("host")
        .to_string();
    for (name, field, url) in [
        (
            "redirector",
            "authorizeUrl",
            "https://evil.example/oauth/authorize",
        ),
        (
            "exfiltrator",
            "tokenUrl",
            "https://evil.example/oauth/token",
        ),
        // The fake GoTo itself, under a name the admin did not list.
        ("alias", "tokenUrl", alias_token_url.as_str()),
    ] {
        env.cluster
            .create_client(
                name,
                env.provider
                    .spec(serde_json::json!({"endpoints": {field: url}})),
            )
            .await;
    }
    env.assert_refused("redirector", "authorizeUrl", "evil.example")
        .await;
    env.assert_refused("exfiltrator", "tokenUrl", "evil.example")
        .await;
    env.assert_refused("alias", "tokenUrl", &alias_host).await;

    for name in ["redirector", "exfiltrator", "alias"] {
        let guessed = format!(
            "{}/authorize/{}/{name}/{}",
            env.op.public_url,
            env.cluster.namespace,
            random_token(32)
        );
        env.assert_no_redirect(&guessed).await;
    }
    assert!(
        env.provider.goto.token_requests().is_empty(),
        "no token request from any refused client"
    );
}

/// The worst case: the spec turns foreign after the link went out and while an admin is at GoTo's
/// consent page. The old link must not redirect to the new host, and the pending callback must
/// not send its code and the client secret there, even before the controller has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_link_and_a_pending_callback_never_reach_a_foreign_host() {
    let env = Env::start(|o| o).await;
    let trap = Trap::start().await;
    env.cluster
        .create_client("demo", env.provider.spec(serde_json::json!({})))
        .await;
    let link = env.cluster.authorization_link("demo").await;
    let mut admin = Browser::new();
    let callback = env
        .provider
        .consent_via(&mut admin, &link, Decision::Allow)
        .await;

    let foreign = format!("localhost:{}", trap.port);
    env.cluster
        .clients()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"endpoints": {
                "authorizeUrl": format!("http://{foreign}/oauth/authorize"),
                "tokenUrl": format!("http://{foreign}/oauth/token"),
            }}})),
        )
        .await
        .expect("patch endpoints");

    // At once, before any reconcile: the callback validates the spec it reads itself.
    env.assert_not_sent_to(&link, &foreign).await;
    let page = admin.get(&callback).await;
    assert_eq!(page.status, 409, "callback page: {}", page.body);
    // Refused by the handler's own validation, or, once the controller has withdrawn the
    // link of the now invalid spec, because the attempt's link is gone: both store nothing.
    assert!(
        page.body.contains("misconfigured") || page.body.contains("no longer valid"),
        "callback page: {}",
        page.body
    );

    env.assert_refused("demo", "authorizeUrl", &foreign).await;
    env.assert_refused("demo", "tokenUrl", &foreign).await;
    env.assert_no_redirect_soon(&link).await;
    assert_eq!(trap.connections(), 0, "nothing was sent to {foreign}");
    assert_eq!(
        env.provider.grant_requests("authorization_code"),
        0,
        "the code was never exchanged"
    );
    assert!(env.cluster.token_secret("demo").await.is_none());
}

/// A host the admin lists works like GoTo's own: here the fake GoTo under the name `localhost`,
/// which the previous test shows refused by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_host_authorizes_like_the_default() {
    let env = Env::start(|o| {
        let port = url::Url::parse(&o.token_url)
            .expect("token url")
            .port()
            .expect("fake GoTo port");
        Options {
            allowed_endpoint_hosts: vec![
                "authentication.logmeininc.com".into(),
                format!("localhost:{port}"),
            ],
            ..o
        }
    })
    .await;
    let authorize_url = env.fake_goto_as_localhost(&env.provider.goto.authorize_url());
    let token_url = env.fake_goto_as_localhost(&env.provider.goto.token_url());
    env.cluster
        .create_client(
            "listed",
            env.provider.spec(serde_json::json!({"endpoints": {
                "authorizeUrl": authorize_url,
                "tokenUrl": token_url,
            }})),
        )
        .await;
    let link = env.cluster.authorization_link("listed").await;
    let consent = Browser::new().open_link(&link).await;
    assert!(
        consent.starts_with(&format!("{authorize_url}?")),
        "the link leads to the listed host: {consent}"
    );
    let (_, page) = env.provider.allow(&link).await;
    assert_eq!(page.status, 200, "callback page: {}", page.body);
    env.cluster
        .wait_condition("listed", "Ready", "True", reason::AUTHORIZED)
        .await;
    assert_eq!(env.provider.grant_requests("authorization_code"), 1);
}
