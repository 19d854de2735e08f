//! GoTo's token endpoint answers: 2xx bodies ([`TokenResponse::from_json`]) and 4xx bodies
//! ([`classify_client_error`]), as garbage bytes, arbitrary JSON, well-formed objects with wrong
//! types, huge and truncated ones. A 2xx body parses only when it is a JSON object with a
//! non-blank string `access_token`; no error message quotes a token, code or secret.

use proptest::{prelude::*, test_runner::TestCaseResult};
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

use super::fuzz;
use crate::goto::{
    OAuthError, TokenResponse,
    protocol::{MAX_BODY_BYTES, classify_client_error},
};

/// A token-like secret: what a JWT, a refresh token, a code or a client secret looks like.
fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{4,12}[0-9][A-Za-z][A-Za-z0-9._~+/=-]{8,60}"
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        "[ \t]*".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 14] = [
    "access_token",
    "refresh_token",
    "token_type",
    "expires_in",
    "scope",
    "principal",
    "email",
    "account_key",
    "organizer_key",
    "account_type",
    "firstName",
    "lastName",
    "first_name",
    "last_name",
];

/// A response-shaped object: each known field absent, right, blank or of a wrong type.
fn response_object() -> impl Strategy<Value = Map<String, Value>> {
    let field_value = prop_oneof![
        3 => secret().prop_map(Value::String),
        1 => json_value(),
        1 => (0u64..100_000).prop_map(|n| json!(n)),
        1 => "[0-9 ]{0,12}".prop_map(Value::String),
        1 => Just(json!("")),
    ];
    proptest::collection::vec(proptest::option::of(field_value), FIELDS.len()).prop_map(|values| {
        FIELDS
            .iter()
            .zip(values)
            .filter_map(|(k, v)| Some((k.to_string(), v?)))
            .collect()
    })
}

/// A body as it may arrive: bytes, JSON, a response object, cut short or padded out huge.
#[derive(Debug, Clone)]
enum Body {
    Bytes(Vec<u8>),
    Json(Value),
    Object(Map<String, Value>),
    /// The object's serialisation cut after `at` bytes.
    Truncated(Map<String, Value>, usize),
    /// The object with one huge string field.
    Huge(Map<String, Value>, usize),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Bytes(b) => b.clone(),
            Body::Json(v) => serde_json::to_vec(v).unwrap_or_default(),
            Body::Object(m) => serde_json::to_vec(m).unwrap_or_default(),
            Body::Truncated(m, at) => {
                let full = serde_json::to_vec(m).unwrap_or_default();
                full[..at % full.len().max(1)].to_vec()
            }
            Body::Huge(m, size) => {
                let mut m = m.clone();
                m.insert("padding".into(), Value::String("x".repeat(*size)));
                serde_json::to_vec(&m).unwrap_or_default()
            }
        }
    }
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..512).prop_map(Body::Bytes),
        2 => json_value().prop_map(Body::Json),
        4 => response_object().prop_map(Body::Object),
        2 => (response_object(), any::<usize>()).prop_map(|(m, at)| Body::Truncated(m, at)),
        1 => (response_object(), 0..4 * MAX_BODY_BYTES).prop_map(|(m, n)| Body::Huge(m, n)),
    ]
}

/// Every token-like run of the body (letters and digits mixed, 8 or more): none may reach a
/// message.
fn secrets_in(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() >= 8
                && w.bytes().any(|b| b.is_ascii_digit())
                && w.bytes().any(|b| b.is_ascii_alphabetic())
        })
        .map(str::to_string)
        .collect()
}

/// The runs of a token alphabet that look like a token, as the sanitiser defines them: 20 or
/// more characters mixing letters and digits, or 40 or more.
fn token_like_runs(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~' | '+' | '/' | '='))
    })
    .filter(|run| {
        let digit = run.bytes().any(|b| b.is_ascii_digit());
        let alpha = run.bytes().any(|b| b.is_ascii_alphabetic());
        (run.len() >= 20 && digit && alpha) || run.len() >= 40
    })
}

fn non_blank_string<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
}

fn check_success_body(body: &[u8]) -> TestCaseResult {
    let parsed = TokenResponse::from_json(body);
    let expected: Option<Map<String, Value>> = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) if non_blank_string(&map, "access_token").is_some() => Some(map),
        _ => None,
    };
    match (parsed, expected) {
        (Ok(response), Some(map)) => {
            prop_assert_eq!(
                Some(response.access_token.expose_secret()),
                non_blank_string(&map, "access_token")
            );
            prop_assert_eq!(
                response
                    .refresh_token
                    .as_ref()
                    .map(ExposeSecret::expose_secret),
                non_blank_string(&map, "refresh_token")
            );
            prop_assert_eq!(
                response.token_type.as_deref(),
                non_blank_string(&map, "token_type")
            );
            if let Some(n) = map.get("expires_in").and_then(Value::as_u64) {
                prop_assert_eq!(response.expires_in, Some(n));
            }
            // Debug output redacts both tokens.
            let debug = format!("{response:?}");
            for token in [
                Some(&response.access_token),
                response.refresh_token.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                let token = token.expose_secret();
                if token.len() >= 8 {
                    prop_assert!(!debug.contains(token), "{debug}");
                }
            }
        }
        (Err(e), None) => {
            prop_assert!(
                matches!(e, OAuthError::MalformedResponse(_)),
                "unexpected error {e:?}"
            );
            let message = e.to_string();
            prop_assert!(message.len() < 200, "{message}");
            for secret in secrets_in(body) {
                prop_assert!(!message.contains(&secret), "{secret:?} in {message:?}");
            }
        }
        (Ok(_), None) => prop_assert!(false, "accepted a body without a usable access_token"),
        (Err(e), Some(_)) => prop_assert!(false, "refused a well-formed response: {e}"),
    }
    Ok(())
}

/// A 4xx body: classified, and what it says is safe to show. The code and client secret we
/// sent (planted in the body, also URL-encoded) never come back, nor does any token-like word.
fn check_error_body(status: u16, body: &[u8], sent: &[String]) -> TestCaseResult {
    let sent: Vec<&str> = sent.iter().map(String::as_str).collect();
    let error = classify_client_error(status, Some(body), &sent);
    let message = error.to_string();
    prop_assert!(message.chars().count() < 400, "{message}");
    prop_assert!(!message.chars().any(char::is_control), "{message:?}");
    for secret in &sent {
        // Nor any part of one long enough to matter.
        for window in secret.as_bytes().windows(16) {
            let window = String::from_utf8_lossy(window);
            prop_assert!(
                !message.contains(&*window),
                "{window:?} of {secret:?} in {message:?}"
            );
        }
    }
    let mut texts = vec![String::from_utf8_lossy(body).into_owned()];
    if let Ok(Value::Object(map)) = serde_json::from_slice(body)
        && let Some(d) = map.get("error_description").and_then(Value::as_str)
    {
        texts.push(d.to_string());
    }
    for text in &texts {
        for word in token_like_runs(text) {
            prop_assert!(!message.contains(word), "{word:?} in {message:?}");
        }
    }
    match &error {
        OAuthError::InvalidGrant { .. } => prop_assert!(status == 400 || status == 401),
        OAuthError::InvalidClient { .. } | OAuthError::Rejected { .. } => {}
        other => prop_assert!(false, "a 4xx became {other:?}"),
    }
    Ok(())
}

/// A 4xx body that mentions what was sent, in the places a server might echo it.
fn error_body() -> impl Strategy<Value = (Vec<u8>, Vec<String>)> {
    let sent = proptest::collection::vec(secret(), 1..3);
    let error = prop_oneof![
        Just("invalid_grant".to_string()),
        Just("invalid_client".to_string()),
        any::<String>(),
    ];
    (
        sent,
        error,
        any::<String>(),
        any::<usize>(),
        body(),
        any::<bool>(),
    )
        .prop_map(|(sent, error, prose, at, other, json)| {
            let mut description = prose;
            let cut = (0..=at % (description.len() + 1))
                .rev()
                .find(|i| description.is_char_boundary(*i))
                .unwrap_or(0);
            let encoded: String =
                url::form_urlencoded::byte_serialize(sent[0].as_bytes()).collect();
            description.insert_str(cut, &format!(" {} {encoded} ", sent[sent.len() - 1]));
            let bytes = if json {
                serde_json::to_vec(&json!({"error": error, "error_description": description}))
                    .unwrap_or_default()
            } else if at % 3 == 0 {
                description.into_bytes()
            } else {
                other.bytes()
            };
            (bytes, sent)
        })
}

#[test]
fn fuzz_token_response() {
    let input = (body(), 400u16..500, error_body());
    fuzz(
        "token_response",
        200,
        input,
        |(body, status, (error, sent))| {
            let bytes = body.bytes();
            check_success_body(&bytes)?;
            let status = if status == 429 { 400 } else { status };
            check_error_body(status, &bytes, &sent)?;
            check_error_body(status, &error, &sent)
        },
    );
}
