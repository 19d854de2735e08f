//! The token Secret as read back ([`StoredTokens::from_secret`]): any data and annotations (a
//! Secret anyone with write access to the namespace may have edited) are read without a panic,
//! and what the operator writes ([`desired_secret`]) reads back as exactly what it wrote.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use proptest::{prelude::*, test_runner::TestCaseResult};
use secrecy::{ExposeSecret, SecretString};

use super::fuzz;
use crate::{
    resource::{GoToOAuthClient, TokenGrant},
    secret::{
        ACCESS_TOKEN_KEY, AUTHORIZED_AT_ANNOTATION, EXPIRES_AT_KEY, ISSUED_AT_ANNOTATION,
        OBTAINED_BY_ANNOTATION, REFRESH_TOKEN_KEY, REFRESH_TOKEN_OBTAINED_AT_ANNOTATION,
        StoredTokens, desired_secret,
    },
    validation::{ClientSettings, Defaults, validate},
};

const DATA_KEYS: [&str; 8] = [
    ACCESS_TOKEN_KEY,
    REFRESH_TOKEN_KEY,
    "token_type",
    EXPIRES_AT_KEY,
    "scope",
    "principal",
    "account_key",
    "organizer_key",
];

const ANNOTATIONS: [&str; 7] = [
    "goto-oauth.dev/client-id",
    "goto-oauth.dev/token-url",
    ISSUED_AT_ANNOTATION,
    AUTHORIZED_AT_ANNOTATION,
    REFRESH_TOKEN_OBTAINED_AT_ANNOTATION,
    OBTAINED_BY_ANNOTATION,
    "note",
];

/// Times as they may be written: valid RFC 3339 in and out of range, with offsets and
/// fractions, and garbage.
fn time_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (-377_705_116_800i64..=253_402_207_999).prop_map(|s| {
            Timestamp::from_second(s).map_or_else(|_| s.to_string(), |t| t.to_string())
        }),
        "[+-]?[0-9]{4,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})",
        any::<String>(),
    ]
}

fn value_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => time_text().prop_map(String::into_bytes),
        2 => any::<String>().prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => Just(Vec::new()),
        1 => prop_oneof![Just("AuthorizationCode"), Just("PersonalAccessToken")]
            .prop_map(|s| s.as_bytes().to_vec()),
    ]
}

fn annotation_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => time_text(),
        1 => prop_oneof![
            Just("AuthorizationCode".to_string()),
            Just("PersonalAccessToken".to_string()),
            any::<String>(),
        ],
    ]
}

/// A Secret with any of the known keys and annotations, holding anything.
fn any_secret() -> impl Strategy<Value = Secret> {
    (
        proptest::collection::vec(proptest::option::of(value_bytes()), DATA_KEYS.len()),
        proptest::collection::vec(proptest::option::of(annotation_value()), ANNOTATIONS.len()),
        proptest::collection::btree_map(any::<String>(), value_bytes(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(values, annotations, extra, no_data)| {
            let mut data: BTreeMap<String, ByteString> = DATA_KEYS
                .iter()
                .zip(values)
                .filter_map(|(k, v)| Some((k.to_string(), ByteString(v?))))
                .collect();
            data.extend(extra.into_iter().map(|(k, v)| (k, ByteString(v))));
            let annotations = ANNOTATIONS
                .iter()
                .zip(annotations)
                .filter_map(|(k, v)| Some((k.to_string(), v?)))
                .collect();
            let mut secret = Secret {
                data: (!no_data).then_some(data),
                ..Secret::default()
            };
            secret.metadata.annotations = Some(annotations);
            secret
        })
}

/// Non-empty text of any characters (the Secret stores bytes; empty means absent).
fn text() -> impl Strategy<Value = String> {
    any::<String>().prop_filter("non-empty", |s| !s.is_empty())
}

/// A whole second in the range tokens can have (year 0001 to 9999, as `expires_at` is written).
fn second() -> impl Strategy<Value = Timestamp> {
    (-62_135_596_800i64..=253_402_207_999)
        .prop_map(|s| Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH))
}

prop_compose! {
    fn tokens()(
        access in text(),
        refresh in proptest::option::of(text()),
        token_type in text(),
        times in (second(), second(), second(), second()),
        optional in (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        ids in (text(), text()),
        pat in any::<bool>(),
    ) -> StoredTokens {
        let (expires_at, issued_at, authorized_at, refresh_token_obtained_at) = times;
        let (scope, principal, account_key, organizer_key) = optional;
        let obtained_by = if pat || refresh.is_none() {
            TokenGrant::PersonalAccessToken
        } else {
            TokenGrant::AuthorizationCode
        };
        StoredTokens {
            access_token: SecretString::from(access),
            refresh_token: refresh.map(SecretString::from),
            token_type,
            expires_at,
            issued_at,
            authorized_at,
            refresh_token_obtained_at,
            scope,
            principal,
            account_key,
            organizer_key,
            client_id: ids.0,
            token_url: ids.1,
            obtained_by,
        }
    }
}

fn fixture() -> (GoToOAuthClient, ClientSettings) {
    let mut client = GoToOAuthClient::new(
        "demo",
        serde_json::from_value(serde_json::json!({
            "clientId": "client-1",
            "clientSecretRef": {"name": "creds"},
            "secretTemplate": {"labels": {"team": "a"}, "annotations": {"note": "x"}}
        }))
        .expect("a valid spec"),
    );
    client.metadata.namespace = Some("ns".into());
    client.metadata.uid = Some("uid-1".into());
    let settings = validate(
        &client,
        &Defaults {
            public_url: "https://op.example".parse().expect("a URL"),
            authorize_url: "https://auth.example/authorize".parse().expect("a URL"),
            token_url: "https://auth.example/token".parse().expect("a URL"),
            allowed_hosts: Vec::new(),
        },
    )
    .expect("valid settings");
    (client, settings)
}

fn text_of(secret: &Secret, key: &str) -> Option<String> {
    let bytes = &secret.data.as_ref()?.get(key)?.0;
    String::from_utf8(bytes.clone())
        .ok()
        .filter(|s| !s.is_empty())
}

fn check_any(secret: &Secret) -> TestCaseResult {
    let Some(tokens) = StoredTokens::from_secret(secret) else {
        return Ok(());
    };
    // What was read is what the Secret says; a consent's tokens always have a refresh token.
    prop_assert_eq!(
        Some(tokens.access_token.expose_secret().to_string()),
        text_of(secret, ACCESS_TOKEN_KEY)
    );
    prop_assert_eq!(
        tokens
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        text_of(secret, REFRESH_TOKEN_KEY)
    );
    prop_assert!(
        tokens.refresh_token.is_some() || tokens.obtained_by == TokenGrant::PersonalAccessToken
    );
    let expires = text_of(secret, EXPIRES_AT_KEY).and_then(|t| t.parse::<Timestamp>().ok());
    prop_assert_eq!(Some(tokens.expires_at), expires);
    prop_assert!(!tokens.token_type.is_empty());
    // The lifetime and the Debug output are safe to compute on whatever was read.
    let _ = tokens.lifetime();
    let debug = format!("{tokens:?}");
    let access = tokens.access_token.expose_secret();
    // Unless it is text the Debug output shows anyway (`AuthorizationCode`, a time).
    let mut other = tokens.clone();
    other.access_token = SecretString::from("x");
    if !format!("{other:?}").contains(access) {
        prop_assert!(!debug.contains(access), "{debug}");
    }
    Ok(())
}

#[test]
fn fuzz_stored_secret() {
    let (client, settings) = fixture();
    let input = (any_secret(), tokens());
    fuzz("stored_secret", 300, input, |(secret, tokens)| {
        check_any(&secret)?;
        let written = desired_secret(&client, &settings, &tokens);
        let read = StoredTokens::from_secret(&written);
        prop_assert!(
            read.as_ref() == Some(&tokens),
            "{tokens:?} read back as {read:?}"
        );
        // Reading what was read and written again is stable too.
        check_any(&written)
    });
}
