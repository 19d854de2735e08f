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

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    Stack, TOKEN_SECRET_KEYS,
    node::{self, Script},
    secret_field,
};
use goto_oauth_operator::conditions::reason;
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::ChildStdout,
};

const SKIP_ENV: &str = "GOTO_OAUTH_SKIP_BROWSER_TESTS";
const INSTALL_HINT: &str = "run `bash scripts/install-test-deps.sh` (it installs Chromium and runs \
                            `npm ci --prefix tests/interop`), or set GOTO_OAUTH_SKIP_BROWSER_TESTS=1 to skip";
/// Longest a single browser step (navigation, click, screenshot) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const DESKTOP: (u32, u32) = (1280, 800);
const PHONE: (u32, u32) = (390, 844);

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
    if !node::interop_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("tests/interop/node_modules/playwright-core".to_string());
    }
    missing.extend(node::missing_node());
    node::run_or_skip("browser_e2e", &missing, SKIP_ENV, INSTALL_HINT).then_some(chromium)
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

/// Headless Chromium behind `tests/interop/browser.js`, one JSON command per line. Dropping it
/// closes `browser.js`'s stdin, which makes it close Chromium and exit (Chromium, started with a
/// debugging pipe, exits with it); after 5 s it is killed.
struct Chromium {
    script: Script,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Chromium {
    async fn launch(chromium: &Path) -> Chromium {
        let mut cmd = node::command("browser.js");
        cmd.env("GOTO_OAUTH_CHROMIUM", chromium);
        let (script, stdout) = Script::spawn(cmd, Duration::from_secs(5));
        let mut browser = Chromium {
            script,
            stdout: BufReader::new(stdout).lines(),
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
        self.script.stderr()
    }

    async fn call(&mut self, command: serde_json::Value) -> serde_json::Value {
        let what = command.to_string();
        let stdin = self.script.stdin();
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
    let env = Stack::start(&[]).await;
    let link = env.client("demo", serde_json::json!({})).await;
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
        .token_secret("demo")
        .await
        .expect("token Secret after Allow");
    let data = secret.data.clone().unwrap_or_default();
    for key in TOKEN_SECRET_KEYS {
        assert!(
            data.get(key).is_some_and(|v| !v.0.is_empty()),
            "Secret lacks {key}"
        );
    }
    let access = secret_field(&secret, "access_token");
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
    let other = env.client("other", serde_json::json!({})).await;
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
        env.cluster.token_secret("other").await.is_none(),
        "no Secret after Deny"
    );
    assert_eq!(
        env.provider.grant_requests("authorization_code"),
        1,
        "one code exchange for one Allow"
    );
}
