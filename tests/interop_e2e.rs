//! Interop with an OAuth 2.0 server nobody in this project wrote: `oauth2-mock-server` from npm,
//! started by `tests/interop/oauth2-mock.mjs` on 127.0.0.1.
//!
//! The fake GoTo in `crates/fake-goto` and the operator were written by the same team, so a
//! shared misreading of the protocol would pass every other test. Here the operator talks to an
//! independent implementation through the per-resource `spec.endpoints` override: the browser
//! round trip, the code exchange and a refresh must all work, and the requests must be the
//! standard ones GoTo documents — `Authorization: Basic` with the *plain* base64 of
//! `clientId:clientSecret` (the secret contains `+`, `/` and `=`, which URL-encoding would
//! change), `grant_type=authorization_code` with the byte-identical `redirect_uri`, JSON accepted,
//! no credentials in the body. oauth2-mock-server accepts any client, so the script records what it
//! received and this test judges it.
//!
//! Needs `npm ci --prefix tests/interop` (done by `bash scripts/install-test-deps.sh`); set
//! `GOTO_OAUTH_SKIP_INTEROP_TESTS=1` to skip.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use common::{
    Browser, SCOPES, Stack, eventually,
    node::{self, Script},
    secret_field,
};
use goto_oauth_operator::conditions::reason;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};

const SKIP_ENV: &str = "GOTO_OAUTH_SKIP_INTEROP_TESTS";
const INSTALL_HINT: &str = "run `bash scripts/install-test-deps.sh` (or `npm ci --prefix tests/interop`), \
                            or set GOTO_OAUTH_SKIP_INTEROP_TESTS=1 to skip";
const CLIENT_ID: &str = "7c1d2f0e-interop-client";
/// Shaped like a real GoTo client secret: `+`, `/` and `=` are exactly the characters that
/// RFC 6749 §2.3.1 URL-encoding would change.
const CLIENT_SECRET: &str = "Qm9v+Zt/xK2aLq8=rW+/pE9TGEQ==";
/// `expires_in` of the first token response: short, so the operator refreshes within seconds.
const FIRST_EXPIRES_IN: i64 = 5;

/// Whether to run; panics with the install hint when a prerequisite is missing and skipping was
/// not asked for.
fn prerequisites() -> bool {
    let mut missing = Vec::new();
    if !node::interop_dir()
        .join("node_modules/oauth2-mock-server/package.json")
        .is_file()
    {
        missing.push("tests/interop/node_modules/oauth2-mock-server".to_string());
    }
    missing.extend(node::missing_node());
    node::run_or_skip("interop_e2e", &missing, SKIP_ENV, INSTALL_HINT)
}

/// A token request as oauth2-mock-server received it, and what it answered.
#[derive(Clone, Debug, Deserialize)]
struct TokenRecord {
    headers: TokenHeaders,
    body: BTreeMap<String, String>,
    status: u16,
    response: serde_json::Value,
}

#[derive(Clone, Debug, Deserialize)]
struct TokenHeaders {
    authorization: Option<String>,
    accept: Option<String>,
    content_type: Option<String>,
}

impl TokenRecord {
    fn grant_type(&self) -> Option<&str> {
        self.body.get("grant_type").map(String::as_str)
    }

    fn issued(&self, field: &str) -> String {
        self.response[field]
            .as_str()
            .unwrap_or_else(|| panic!("mock response without {field}"))
            .to_string()
    }

    /// The body with grant values hidden, for assertion messages.
    fn redacted_body(&self) -> BTreeMap<&str, &str> {
        self.body
            .iter()
            .map(|(k, v)| match k.as_str() {
                "code" | "refresh_token" | "client_secret" => (k.as_str(), "<redacted>"),
                _ => (k.as_str(), v.as_str()),
            })
            .collect()
    }
}

/// `tests/interop/oauth2-mock.mjs` as a child process; its JSON lines are collected as they come.
/// Dropping it closes the script's stdin, which stops it; after 3 s it is killed.
struct MockServer {
    script: Script,
    url: String,
    records: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl MockServer {
    async fn start() -> MockServer {
        let mut cmd = node::command("oauth2-mock.mjs");
        cmd.arg("--first-expires-in")
            .arg(FIRST_EXPIRES_IN.to_string());
        let (script, out) = Script::spawn(cmd, Duration::from_secs(3));
        let records = Arc::new(Mutex::new(Vec::new()));
        {
            let records = records.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let record = serde_json::from_str(&line).unwrap_or_else(
                        |_| serde_json::json!({"event": "unparsable", "line": line}),
                    );
                    records.lock().unwrap().push(record);
                }
            });
        }
        let mut mock = MockServer {
            script,
            url: String::new(),
            records,
        };
        let start = Instant::now();
        mock.url = loop {
            if let Some(url) = mock
                .events("listening")
                .first()
                .and_then(|r| r["url"].as_str().map(str::to_string))
            {
                break url;
            }
            if let Ok(Some(status)) = mock.script.child.try_wait() {
                panic!(
                    "oauth2-mock.mjs exited ({status}); stderr:\n{}",
                    mock.stderr()
                );
            }
            assert!(
                start.elapsed() < common::DEADLINE,
                "oauth2-mock.mjs did not start; stderr:\n{}",
                mock.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            mock.url.starts_with("http://127.0.0.1:"),
            "mock listens on loopback: {}",
            mock.url
        );
        mock
    }

    fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["event"] == event)
            .cloned()
            .collect()
    }

    fn token_requests(&self) -> Vec<TokenRecord> {
        self.events("token")
            .into_iter()
            .map(|r| serde_json::from_value(r).expect("token record"))
            .collect()
    }

    fn stderr(&self) -> String {
        self.script.stderr()
    }
}

/// GoTo's rule for client authentication, with a diagnosis instead of the secret on failure.
fn assert_plain_basic_auth(record: &TokenRecord) {
    let header = record
        .headers
        .authorization
        .as_deref()
        .expect("the token request has an Authorization header");
    let (scheme, value) = header
        .split_once(' ')
        .expect("Authorization: <scheme> <value>");
    assert_eq!(scheme, "Basic", "client authentication by HTTP Basic");
    let expected = STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    if value == expected {
        return;
    }
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let diagnosis = match STANDARD.decode(value) {
        Err(_) => "the value is not plain (padded, standard-alphabet) base64".to_string(),
        Ok(decoded) if decoded == format!("{}:{}", encode(CLIENT_ID), encode(CLIENT_SECRET)).into_bytes() => {
            "the credentials were URL-encoded before base64 (RFC 6749 §2.3.1); GoTo wants them plain".to_string()
        }
        Ok(decoded) if decoded.starts_with(format!("{CLIENT_ID}:").as_bytes()) => {
            format!("the client id matches but the secret part differs ({} bytes instead of {})", decoded.len() - CLIENT_ID.len() - 1, CLIENT_SECRET.len())
        }
        Ok(decoded) => format!("decodes to {} bytes that are not `clientId:clientSecret`", decoded.len()),
    };
    panic!("wrong Basic credentials: {diagnosis}");
}

fn assert_standard_request(record: &TokenRecord) {
    assert_plain_basic_auth(record);
    let accept = record.headers.accept.as_deref().unwrap_or_default();
    assert!(
        accept.contains("application/json"),
        "Accept asks for JSON: {accept:?}"
    );
    let content_type = record.headers.content_type.as_deref().unwrap_or_default();
    assert!(
        content_type.starts_with("application/x-www-form-urlencoded"),
        "form body: {content_type:?}"
    );
    assert_eq!(
        record.status,
        200,
        "the mock accepted the request: {:?}",
        record.redacted_body()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizes_and_refreshes_against_oauth2_mock_server() {
    if !prerequisites() {
        return;
    }
    let mock = MockServer::start().await;
    // The operator-wide default endpoints point at the fake GoTo, which must stay untouched: the
    // per-resource override alone decides where this client goes, on a host the admin allowed.
    let mock_host = mock.url.trim_start_matches("http://").trim_end_matches('/');
    let Stack {
        cluster,
        provider,
        op,
        redirect_uri,
    } = Stack::start(&[&format!("--allowed-endpoint-hosts={mock_host}")]).await;
    cluster
        .create_client_secret("interop-creds", CLIENT_SECRET)
        .await;
    cluster
        .create_client(
            "interop",
            serde_json::json!({
                "clientId": CLIENT_ID,
                "clientSecretRef": {"name": "interop-creds"},
                "scopes": SCOPES,
                "endpoints": {
                    "authorizeUrl": format!("{}/authorize", mock.url),
                    "tokenUrl": format!("{}/token", mock.url),
                },
            }),
        )
        .await;
    let link = cluster.authorization_link("interop").await;

    // The browser part: the operator's link, the mock's /authorize (which redirects straight back
    // with a code), the operator's /callback.
    let mut browser = Browser::new();
    let authorize = browser.open_link(&link).await;
    assert!(
        authorize.starts_with(&format!("{}/authorize?", mock.url)),
        "the link leads to the overridden authorize URL: {authorize}"
    );
    let before = jiff::Timestamp::now();
    let page = browser.get(&authorize).await;
    let after = jiff::Timestamp::now();
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("Authorization complete"),
        "{}",
        page.body
    );
    assert!(
        page.url.starts_with(&format!("{redirect_uri}?")),
        "{}",
        page.url
    );

    // The authorization request, as the third-party server saw it.
    let authorizations = mock.events("authorize");
    assert_eq!(authorizations.len(), 1, "one authorization request");
    let query: BTreeMap<String, String> =
        serde_json::from_value(authorizations[0]["query"].clone()).expect("query");
    assert_eq!(
        query.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "client_id",
            "redirect_uri",
            "response_type",
            "scope",
            "state"
        ],
        "authorization request parameters"
    );
    assert_eq!(query["client_id"], CLIENT_ID);
    assert_eq!(query["response_type"], "code");
    assert_eq!(query["redirect_uri"], redirect_uri);
    assert_eq!(query["scope"], SCOPES.join(" "));
    assert!(query["state"].len() > 40, "state is unguessable");
    let code = authorizations[0]["code"]
        .as_str()
        .expect("the mock issued a code")
        .to_string();

    // The code exchange.
    let requests = mock.token_requests();
    assert_eq!(requests.len(), 1, "one token request so far");
    let exchange = &requests[0];
    assert_standard_request(exchange);
    assert_eq!(exchange.grant_type(), Some("authorization_code"));
    assert_eq!(
        exchange.body.keys().map(String::as_str).collect::<Vec<_>>(),
        ["code", "grant_type", "redirect_uri"],
        "exactly the documented form fields, no credentials in the body: {:?}",
        exchange.redacted_body()
    );
    assert!(
        exchange.body["code"] == code,
        "the code the mock issued is exchanged"
    );
    assert_eq!(
        exchange.body["redirect_uri"], query["redirect_uri"],
        "redirect_uri identical to the authorization request's"
    );
    assert!(
        !page.body.contains(&code),
        "the code never appears on a page"
    );

    // The tokens the mock issued are stored.
    let secret = cluster.token_secret("interop").await.expect("token Secret");
    assert!(
        secret_field(&secret, "access_token") == exchange.issued("access_token"),
        "stored access token is the issued one"
    );
    assert!(
        secret_field(&secret, "refresh_token") == exchange.issued("refresh_token"),
        "stored refresh token is the issued one"
    );
    assert_eq!(secret_field(&secret, "token_type"), "Bearer");
    assert_eq!(secret_field(&secret, "scope"), exchange.issued("scope"));
    let expires_at: jiff::Timestamp = secret_field(&secret, "expires_at")
        .parse()
        .expect("expires_at is RFC 3339");
    let lifetime = jiff::SignedDuration::from_secs(FIRST_EXPIRES_IN);
    let slack = jiff::SignedDuration::from_secs(2);
    assert!(
        expires_at >= before + lifetime - slack && expires_at <= after + lifetime + slack,
        "expires_at {expires_at} follows expires_in={FIRST_EXPIRES_IN} (exchange between {before} and {after})"
    );
    cluster
        .wait_condition("interop", "Ready", "True", reason::AUTHORIZED)
        .await;

    // The refresh, due seconds after the short-lived first token.
    let refresh = eventually("a refresh_token grant at oauth2-mock-server", || async {
        mock.token_requests()
            .into_iter()
            .find(|r| r.grant_type() == Some("refresh_token"))
    })
    .await;
    assert_standard_request(&refresh);
    assert_eq!(
        refresh.body.keys().map(String::as_str).collect::<Vec<_>>(),
        ["grant_type", "refresh_token"],
        "refresh form fields: {:?}",
        refresh.redacted_body()
    );
    assert!(
        refresh.body["refresh_token"] == exchange.issued("refresh_token"),
        "the stored refresh token is used"
    );
    // oauth2-mock-server rotates refresh tokens: the new pair must replace the old one.
    let (new_access, new_refresh) = (
        refresh.issued("access_token"),
        refresh.issued("refresh_token"),
    );
    eventually("the refreshed tokens in the Secret", || async {
        let secret = cluster.secrets().get_opt("interop-token").await.ok()??;
        let data = secret.data?;
        let stored = |k: &str| data.get(k).map(|v| v.0.clone());
        (stored("access_token")? == new_access.as_bytes()
            && stored("refresh_token")? == new_refresh.as_bytes())
        .then_some(())
    })
    .await;
    cluster
        .wait_condition("interop", "Ready", "True", reason::AUTHORIZED)
        .await;
    let obj = cluster.clients().get("interop").await.unwrap();
    assert_eq!(
        obj.condition("Authorized").map(|c| c.status.as_str()),
        Some("True")
    );

    assert!(
        provider.goto.token_requests().is_empty(),
        "the operator-wide default token URL was not used"
    );
    let logs = op.logs();
    for (what, value) in [
        ("client secret", CLIENT_SECRET.to_string()),
        ("code", code),
        ("access token", exchange.issued("access_token")),
        ("refresh token", exchange.issued("refresh_token")),
        ("refreshed access token", new_access),
        ("rotated refresh token", new_refresh),
    ] {
        assert!(!logs.contains(&value), "the operator logged a {what}");
    }
    assert!(
        mock.stderr().is_empty(),
        "oauth2-mock.mjs reported errors:\n{}",
        mock.stderr()
    );
}
