//! The consent flow in a real browser: headless Chromium opens `status.authorizationUrl`, clicks
//! Allow (or Deny) on the fake GoTo consent page and lands on the operator's result page.
//!
//! The other end-to-end tests drive the flow with a hand-written HTTP client; this one proves it
//! also works where it matters — in a browser, with its real cookie rules (the binding cookie is
//! `HttpOnly`, `SameSite=Lax` and must survive the cross-site round trip through GoTo), real form
//! submission and real redirects. It also saves screenshots of the pages an admin sees, at desktop
//! and phone widths, to `target/screenshots/`.
//!
//! Chromium is the system one (`/usr/bin/chromium`, or `$GOTO_OAUTH_CHROMIUM`), driven by
//! `tests/interop/browser.js` with `playwright-core` (which never downloads a browser). Both come
//! from `bash scripts/install-test-deps.sh`; set `GOTO_OAUTH_SKIP_BROWSER_TESTS=1` to skip.

mod common;

use std::io::Write as _;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Cluster, Operator, Provider, free_port};
use goto_oauth_operator::{conditions::reason, testkit::goto::FakeGoToConfig};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

const SKIP_ENV: &str = "GOTO_OAUTH_SKIP_BROWSER_TESTS";
const INSTALL_HINT: &str = "run `bash scripts/install-test-deps.sh` (it installs Chromium and runs \
                            `npm ci --prefix tests/interop`), or set GOTO_OAUTH_SKIP_BROWSER_TESTS=1 to skip";
/// Longest a single browser step (navigation, click, screenshot) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots")
}

/// Chromium's path, or `None` when the test is to be skipped; panics with the install hint when a
/// prerequisite is missing and skipping was not asked for.
fn prerequisites() -> Option<PathBuf> {
    let chromium = std::env::var_os("GOTO_OAUTH_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!("Chromium ({})", chromium.display()));
    }
    if !interop_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("tests/interop/node_modules/playwright-core".to_string());
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("node (Node.js ≥ 20.19)".to_string());
    }
    if missing.is_empty() {
        return Some(chromium);
    }
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures `eprintln!` of passing tests, and a
        // skip must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED browser_e2e: missing {} ({SKIP_ENV}=1)",
            missing.join(", ")
        );
        return None;
    }
    panic!("browser_e2e needs {}: {INSTALL_HINT}", missing.join(", "));
}

/// What `browser.js` reports about the page after a navigation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageInfo {
    status: Option<u16>,
    url: String,
    title: String,
    h1: Option<String>,
    text: String,
    scroll_width: u32,
    viewport_width: u32,
    viewport_meta: Option<String>,
}

/// Headless Chromium behind `tests/interop/browser.js`, one JSON command per line.
struct Chromium {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Chromium {
    async fn launch(chromium: &Path) -> Chromium {
        let mut child = tokio::process::Command::new("node")
            .arg(interop_dir().join("browser.js"))
            .current_dir(interop_dir())
            .env("GOTO_OAUTH_CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node tests/interop/browser.js");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    stderr.lock().unwrap().push(line);
                }
            });
        }
        let mut browser = Chromium {
            child,
            stdin,
            stdout,
            stderr,
        };
        let ready = browser.read_answer("launch Chromium").await;
        eprintln!(
            "browser_e2e: Chromium {}",
            ready["version"].as_str().unwrap_or("?")
        );
        browser
    }

    async fn read_answer(&mut self, what: &str) -> serde_json::Value {
        let line = match tokio::time::timeout(STEP_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => panic!(
                "browser.js exited during {what}; stderr:\n{}",
                self.stderr()
            ),
            Err(_) => panic!(
                "browser.js did not answer {what} within {STEP_TIMEOUT:?}; stderr:\n{}",
                self.stderr()
            ),
        };
        let answer: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("browser.js answered {what} with non-JSON ({e}): {line}"));
        assert_eq!(
            answer["ok"],
            true,
            "browser step {what} failed: {answer}\nstderr:\n{}",
            self.stderr()
        );
        answer
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    async fn call(&mut self, command: serde_json::Value) -> serde_json::Value {
        let what = command.to_string();
        let stdin = self.stdin.as_mut().expect("browser.js stdin open");
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to browser.js");
        stdin.flush().await.expect("flush browser.js stdin");
        self.read_answer(&what).await
    }

    async fn page(&mut self, command: serde_json::Value) -> PageInfo {
        let answer = self.call(command).await;
        serde_json::from_value(answer.clone()).unwrap_or_else(|e| panic!("page info {answer}: {e}"))
    }

    async fn goto(&mut self, url: &str) -> PageInfo {
        self.page(serde_json::json!({"op": "goto", "url": url}))
            .await
    }

    async fn click(&mut self, selector: &str) -> PageInfo {
        self.page(serde_json::json!({"op": "click", "selector": selector}))
            .await
    }

    async fn reset(&mut self) {
        self.call(serde_json::json!({"op": "reset"})).await;
    }

    /// Saves `<name>-phone.png` at phone width and `<name>.png` at desktop width; returns what
    /// the page looked like at phone width.
    async fn screenshots(&mut self, name: &str) -> PageInfo {
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("create target/screenshots");
        let mut phone = None;
        for ((width, height), suffix) in [(PHONE, "-phone"), (DESKTOP, "")] {
            self.call(serde_json::json!({"op": "viewport", "width": width, "height": height}))
                .await;
            if phone.is_none() {
                phone = Some(self.page(serde_json::json!({"op": "info"})).await);
            }
            let path = dir.join(format!("{name}{suffix}.png"));
            self.call(serde_json::json!({"op": "screenshot", "path": path}))
                .await;
            let png = std::fs::read(&path).expect("read screenshot");
            assert!(
                png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
                "{} is a PNG",
                path.display()
            );
            eprintln!("browser_e2e: saved {}", path.display());
        }
        phone.expect("phone-width page info")
    }
}

impl Drop for Chromium {
    /// Closing stdin makes `browser.js` close Chromium and exit; if it does not within a few
    /// seconds it is killed (Chromium, started with a debugging pipe, exits with it).
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.start_kill();
    }
}

struct Env {
    cluster: Cluster,
    provider: Provider,
    op: Operator,
}

async fn env() -> Env {
    let cluster = Cluster::start().await;
    let port = free_port();
    let provider = Provider::start(
        FakeGoToConfig::default(),
        &format!("http://127.0.0.1:{port}/callback"),
    )
    .await;
    let op = Operator::start_on(&cluster, &provider, port, &["--leader-election=false"]).await;
    cluster
        .create_client_secret("creds", &provider.client_secret)
        .await;
    Env {
        cluster,
        provider,
        op,
    }
}

impl Env {
    /// Creates a client and returns its authorization link once published.
    async fn client(&self, name: &str) -> String {
        self.cluster
            .create_client(
                name,
                serde_json::json!({
                    "clientId": self.provider.client_id,
                    "clientSecretRef": {"name": "creds"},
                    "scopes": ["identity:", "call-control.v1.calls.control"],
                }),
            )
            .await;
        let obj = self
            .cluster
            .wait_condition(name, "Ready", "False", reason::AWAITING_AUTHORIZATION)
            .await;
        obj.status
            .and_then(|s| s.authorization_url)
            .expect("status.authorizationUrl")
    }
}

fn assert_page(page: &PageInfo, status: u16, title: &str) {
    assert_eq!(page.status, Some(status), "{page:#?}");
    assert_eq!(page.title, title, "{page:#?}");
    assert!(
        page.h1.as_deref().is_some_and(|h| h.contains(title)),
        "{page:#?}"
    );
}

/// The operator's pages must not scroll sideways on a phone.
fn assert_no_horizontal_scroll(page: &PageInfo) {
    assert!(
        page.scroll_width <= page.viewport_width,
        "{}: {}px wide content in a {}px viewport",
        page.url,
        page.scroll_width,
        page.viewport_width
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_in_a_real_browser() {
    let Some(chromium) = prerequisites() else {
        return;
    };
    let env = env().await;
    let link = env.client("demo").await;
    let mut browser = Chromium::launch(&chromium).await;

    // The link sends the browser to GoTo's consent page.
    let consent = browser.goto(&link).await;
    assert_page(&consent, 200, "Sign in to GoTo");
    assert!(
        consent.url.starts_with(&env.provider.goto.authorize_url()),
        "{consent:#?}"
    );
    assert!(
        consent.text.contains("call-control.v1.calls.control"),
        "{consent:#?}"
    );
    browser.screenshots("consent-goto").await;

    // Allow: the operator exchanges the code and shows the success page.
    let done = browser.click("#allow").await;
    assert_page(&done, 200, "Authorization complete");
    assert!(
        done.url
            .starts_with(&format!("{}/callback?", env.op.public_url)),
        "{done:#?}"
    );
    for expected in [
        "demo",
        env.cluster.namespace.as_str(),
        "demo-token",
        env.provider.client_id.as_str(),
        "You can close this tab now.",
    ] {
        assert!(
            done.text.contains(expected),
            "success page lacks {expected:?}: {done:#?}"
        );
    }
    assert_eq!(
        done.viewport_meta.as_deref(),
        Some("width=device-width, initial-scale=1")
    );
    assert_no_horizontal_scroll(&browser.screenshots("consent-success").await);

    let secret = env
        .cluster
        .secrets()
        .get_opt("demo-token")
        .await
        .unwrap()
        .expect("token Secret after Allow");
    let data = secret.data.unwrap_or_default();
    for key in [
        "access_token",
        "refresh_token",
        "token_type",
        "expires_at",
        "scope",
        "principal",
    ] {
        assert!(
            data.get(key).is_some_and(|v| !v.0.is_empty()),
            "Secret lacks {key}"
        );
    }
    let access = String::from_utf8(data["access_token"].0.clone()).unwrap();
    assert!(
        env.provider.goto.is_access_token_live(&access),
        "the stored access token is the one GoTo issued"
    );
    env.cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    env.cluster
        .wait_condition("demo", "Authorized", "True", reason::AUTHORIZED)
        .await;

    // The used link was replaced: opening it again shows the "not valid" page.
    let stale = browser.goto(&link).await;
    assert_page(&stale, 404, "This authorization link is not valid");
    assert_no_horizontal_scroll(&browser.screenshots("consent-invalid-link").await);

    // Deny, on a second client in a fresh browser profile.
    browser.reset().await;
    let other = env.client("other").await;
    let consent = browser.goto(&other).await;
    assert_page(&consent, 200, "Sign in to GoTo");
    let denied = browser.click("#deny").await;
    assert_page(&denied, 403, "Authorization was denied");
    assert!(denied.text.contains("other"), "{denied:#?}");
    assert_no_horizontal_scroll(&browser.screenshots("consent-error").await);
    env.cluster
        .wait_condition("other", "Authorized", "False", reason::ACCESS_DENIED)
        .await;
    assert!(
        env.cluster
            .secrets()
            .get_opt("other-token")
            .await
            .unwrap()
            .is_none(),
        "no Secret after Deny"
    );

    let exchanges = env
        .provider
        .goto
        .token_requests()
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("authorization_code"))
        .count();
    assert_eq!(exchanges, 1, "one code exchange for one Allow");
}
