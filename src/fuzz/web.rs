//! The browser-facing endpoint through the real router, against the in-process API of
//! [`super::api`]: `GET /callback` with any query and cookies, `GET /authorize/…` with any path.
//! Every answer is a bounded page with no markup from the request, and a request that does not
//! hold the right state and cookie (or the published link) causes no API request at all.

use std::sync::{Arc, atomic::AtomicUsize};

use axum::{Router, body::Body, http::Request};
use proptest::{prelude::*, test_runner::TestCaseResult};
use tower::ServiceExt as _;

use super::{
    api::{self, CLIENT_ID, LINK, NAME, NAMESPACE, NOW, UID, requests},
    check_page, fuzz,
};
use crate::{
    consent::{StateClaims, StateKey, link_token, state::STATE_TTL_SECONDS},
    resource::GoToOAuthClientStatus,
    web::{BINDING_COOKIE, MAX_URI_LENGTH, router},
};

/// The binding cookie of the browser that started the fuzzed attempts.
const COOKIE: &str = "browser-cookie-value-0123456789";

/// Largest page any answer may be.
const MAX_PAGE: usize = 16 * 1024;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
    key: StateKey,
    requests: Arc<AtomicUsize>,
}

impl Harness {
    /// Time is paused, so the fixed delay of a wrong link costs nothing.
    fn new() -> Harness {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        let key = StateKey::from_bytes(&[9u8; 32]).expect("a key");
        let (ctx, requests) = runtime.block_on(async { api::context(&key) });
        Harness {
            runtime,
            router: router(ctx),
            key,
            requests,
        }
    }

    /// The status, headers and body of one request, and how many API requests it caused.
    fn get(
        &self,
        uri: &str,
        cookie: Option<&[u8]>,
    ) -> Option<(u16, http::HeaderMap, String, usize)> {
        let mut request = Request::get(uri);
        if let Some(cookie) = cookie {
            request = request.header(
                http::header::COOKIE,
                http::HeaderValue::from_bytes(cookie).ok()?,
            );
        }
        let request = request.body(Body::empty()).ok()?;
        let before = requests(&self.requests);
        let response = self
            .runtime
            .block_on(self.router.clone().oneshot(request))
            .unwrap_or_else(|e| match e {});
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = self
            .runtime
            .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
            .expect("a body");
        let body = String::from_utf8(body.to_vec()).expect("pages are UTF-8");
        Some((status, headers, body, requests(&self.requests) - before))
    }

    fn state(&self, claims: &StateClaims) -> String {
        self.key.sign(claims)
    }

    fn claims(&self, expires_at: i64) -> StateClaims {
        StateClaims {
            namespace: NAMESPACE.into(),
            name: NAME.into(),
            uid: UID.into(),
            client_id: CLIENT_ID.into(),
            nonce: "nonce-nonce-nonce".into(),
            expires_at,
            browser: self.key.browser_binding(COOKIE),
            link: self.key.link_binding(LINK),
        }
    }
}

/// Bytes as a URI component: printable ASCII that URIs allow as it is, the rest %-escaped, and
/// stray `%` as they come.
fn uri_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => "[A-Za-z0-9._~!$'()*+,;=:@/?&-]{0,12}",
        2 => proptest::collection::vec(any::<u8>(), 0..12)
            .prop_map(|b| b.iter().map(|b| format!("%{b:02X}")).collect::<String>()),
        1 => Just("%3Cscript%3Ealert(1)%3C/script%3E".to_string()),
        1 => Just("%".to_string()),
        1 => Just("%zz".to_string()),
        1 => Just("%C3%28".to_string()),
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

fn percent(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// What the callback's `state` is.
#[derive(Debug, Clone)]
enum State {
    Absent,
    Garbage(String),
    /// A valid state (expiring at the offset from now), maybe with one byte changed.
    Signed {
        expires_in: i64,
        flip: Option<(usize, u8)>,
    },
}

#[derive(Debug, Clone)]
struct Callback {
    state: State,
    /// Other parameters, raw (`code`, `error`, `error_description`, anything).
    params: Vec<(String, String)>,
    /// Text appended to the query as it is.
    raw: String,
    cookie: Cookie,
    /// Pad the URI past its limit.
    overlong: bool,
}

#[derive(Debug, Clone)]
enum Cookie {
    Absent,
    Right,
    Other(String),
    Bytes(Vec<u8>),
}

fn callback() -> impl Strategy<Value = Callback> {
    let state = prop_oneof![
        1 => Just(State::Absent),
        2 => uri_text().prop_map(State::Garbage),
        4 => (-2 * STATE_TTL_SECONDS..STATE_TTL_SECONDS, proptest::option::of((any::<usize>(), any::<u8>())))
            .prop_map(|(expires_in, flip)| State::Signed { expires_in, flip }),
    ];
    let name = prop_oneof![
        Just("code".to_string()),
        Just("error".to_string()),
        Just("error_description".to_string()),
        Just("state".to_string()),
        any::<String>(),
    ];
    let value = prop_oneof![
        any::<String>(),
        Just("access_denied".to_string()),
        Just("<script>alert('x')</script>\"><img src=x>".to_string()),
        "[A-Za-z0-9]{20,40}".prop_map(|s| format!("CODE{s}")),
    ];
    let cookie = prop_oneof![
        1 => Just(Cookie::Absent),
        3 => Just(Cookie::Right),
        1 => "[A-Za-z0-9_-]{0,140}".prop_map(Cookie::Other),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Cookie::Bytes),
    ];
    (
        state,
        proptest::collection::vec((name, value), 0..4),
        uri_text(),
        cookie,
        proptest::bool::weighted(0.02),
    )
        .prop_map(|(state, params, raw, cookie, overlong)| Callback {
            state,
            params,
            raw,
            cookie,
            overlong,
        })
}

fn check_callback(h: &Harness, c: &Callback) -> TestCaseResult {
    let mut query = Vec::new();
    let mut authentic = false;
    match &c.state {
        State::Absent => {}
        State::Garbage(g) => query.push(format!("state={g}")),
        State::Signed { expires_in, flip } => {
            let mut state = h.state(&h.claims(NOW + expires_in)).into_bytes();
            let changed = flip.is_some_and(|(at, x)| {
                x != 0 && {
                    let at = at % state.len();
                    state[at] ^= x;
                    true
                }
            });
            authentic = !changed && *expires_in > 0;
            let state = String::from_utf8_lossy(&state).into_owned();
            query.push(format!("state={}", percent(&state)));
        }
    }
    for (name, value) in &c.params {
        query.push(format!("{}={}", percent(name), percent(value)));
    }
    query.push(c.raw.clone());
    let mut uri = format!("/callback?{}", query.join("&"));
    if c.overlong {
        uri.push_str(&"x".repeat(MAX_URI_LENGTH));
    }
    let cookie = match &c.cookie {
        Cookie::Absent => None,
        Cookie::Right => Some(format!("{BINDING_COOKIE}={COOKIE}").into_bytes()),
        Cookie::Other(v) => Some(format!("{BINDING_COOKIE}={v}; other=1").into_bytes()),
        Cookie::Bytes(b) => Some(b.clone()),
    };
    if http::Uri::try_from(uri.as_str()).is_err() {
        // Not a request a browser can send; hyper refuses it before the router.
        return Ok(());
    }
    let Some((status, headers, body, api_requests)) = h.get(&uri, cookie.as_deref()) else {
        return Ok(());
    };
    prop_assert!(
        [200, 400, 403, 404, 409, 410, 414, 429, 502, 503, 504].contains(&status),
        "status {status}"
    );
    prop_assert_eq!(
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    prop_assert!(headers.contains_key(http::header::CONTENT_SECURITY_POLICY));
    check_page(&body, MAX_PAGE)?;
    // Nothing from the request but GoTo's error (sanitized) and description (escaped) reaches
    // the page: never a code.
    for (name, value) in &c.params {
        if name == "code" && value.starts_with("CODE") {
            prop_assert!(
                !body.contains(value.as_str()),
                "the {name} {value:?} is on the page"
            );
        }
    }
    // No API request without an authentic, unexpired state and the browser's cookie.
    let may_call = authentic
        && !c.overlong
        && matches!(c.cookie, Cookie::Right)
        && query.iter().filter(|p| p.starts_with("state=")).count() == 1
        && !c.params.iter().any(|(n, _)| n == "state")
        && !c.raw.split('&').any(|p| p.starts_with("state="));
    if !may_call {
        prop_assert_eq!(
            api_requests,
            0,
            "{} API requests, status {}",
            api_requests,
            status
        );
    }
    Ok(())
}

#[test]
fn fuzz_callback() {
    let h = Harness::new();
    fuzz("callback", 300, callback(), |c| check_callback(&h, &c));
}

/// One path segment: the right one, near it, or anything.
fn segment(right: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(right.to_string()),
        1 => Just(right.to_uppercase()),
        1 => Just(format!("{right}%2F")),
        1 => Just(format!("{right}/x")),
        1 => Just("..".to_string()),
        1 => Just("%2e%2e".to_string()),
        1 => Just(String::new()),
        3 => uri_text().prop_map(|s| s.replace(['?', '/'], "")),
    ]
}

/// The link token as read from any `authorizationUrl`: the last path segment, at least 32
/// characters, and whatever it is, a link built from it round-trips when it is one segment.
fn check_link_token(url: &str) -> TestCaseResult {
    let status = GoToOAuthClientStatus {
        authorization_url: Some(url.to_string()),
        ..Default::default()
    };
    if let Some(token) = link_token(Some(&status)) {
        prop_assert!(token.len() >= 32 && !token.contains('/'), "{token:?}");
        let suffix = format!("/{token}");
        prop_assert!(
            url.ends_with(&suffix) || url == token,
            "{token:?} of {url:?}"
        );
    }
    Ok(())
}

#[test]
fn fuzz_authorize() {
    let h = Harness::new();
    let input = (
        (segment(NAMESPACE), segment(NAME), segment(LINK)),
        uri_text(),
        prop_oneof![
            Just(None),
            Just(Some(COOKIE.to_string())),
            "[ -~]{0,80}".prop_map(Some)
        ],
        prop_oneof![
            any::<String>(),
            uri_text(),
            "https://op\\.example/authorize/[a-z]{1,5}/[a-z]{1,5}/[A-Za-z0-9_-]{0,60}"
        ],
    );
    fuzz(
        "authorize",
        300,
        input,
        |((namespace, name, link), query, cookie, url)| {
            check_link_token(&url)?;
            let uri = format!("/authorize/{namespace}/{name}/{link}?{query}");
            if http::Uri::try_from(uri.as_str()).is_err() {
                return Ok(());
            }
            let cookie = cookie.map(|c| format!("{BINDING_COOKIE}={c}").into_bytes());
            let Some((status, headers, body, api_requests)) = h.get(&uri, cookie.as_deref()) else {
                return Ok(());
            };
            let published = namespace == NAMESPACE && name == NAME && link == LINK;
            if published {
                // The one published link sends the browser to GoTo with a state that verifies.
                prop_assert_eq!(status, 302);
                let location = headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let target = url::Url::parse(location).expect("an absolute URL");
                prop_assert_eq!(target.host_str(), Some("authentication.logmeininc.com"));
                let state = target
                    .query_pairs()
                    .find(|(k, _)| k == "state")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let claims = h.key.verify(&state, NOW);
                prop_assert!(claims.as_ref().is_ok_and(|c| c.uid == UID), "{claims:?}");
                prop_assert!(headers.contains_key(http::header::SET_COOKIE));
            } else {
                // Anything else: a page, and not one API request.
                prop_assert!([404, 414].contains(&status), "status {status} for {uri}");
                prop_assert_eq!(api_requests, 0, "API requests for {}", uri);
                check_page(&body, MAX_PAGE)?;
            }
            Ok(())
        },
    );
}

/// Found by `fuzz_authorize`: a segment that does not decode to UTF-8 got axum's plain-text 400
/// instead of the invalid-link page.
#[test]
fn an_undecodable_path_segment_is_an_invalid_link() {
    let h = Harness::new();
    let uri = format!("/authorize/../%80/{LINK}?");
    let (status, headers, body, api_requests) = h.get(&uri, None).expect("a request");
    assert_eq!(status, 404);
    assert_eq!(
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/html; charset=utf-8")
    );
    assert!(
        body.contains("This authorization link is not valid"),
        "{body}"
    );
    assert_eq!(api_requests, 0);
}
