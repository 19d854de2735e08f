//! The spec a namespace user writes: [`validate`] on specs with garbage (and near misses) in
//! every field, including the two durations, never panics, returns settings that hold what it
//! promises, and never accepts what the CRD's CEL rules refuse (evaluated with Kubernetes' CEL
//! library, as `tests/crd_cel.rs` does). [`AllowedHost::parse`] on any text gives a canonical
//! entry or an error.

use kube::CustomResourceExt;
use kube_cel::{CompiledSchema, Validator, compile_schema};
use proptest::{prelude::*, test_runner::TestCaseResult};
use serde_json::{Value, json};
use url::Url;

use super::fuzz;
use crate::{
    cli::check_web_url,
    resource::GoToOAuthClient,
    validation::{AllowedHost, Defaults, check_dns_subdomain, validate},
};

/// Text that is nearly right, right, or anything: `parts` glued, then maybe one character
/// (whitespace, a control, a quote, a non-ASCII letter) inserted somewhere.
fn near(parts: Vec<BoxedStrategy<String>>) -> BoxedStrategy<String> {
    let glued = parts
        .into_iter()
        .fold(Just(String::new()).boxed(), |acc, part| {
            (acc, part).prop_map(|(a, b)| a + &b).boxed()
        });
    let noise = prop_oneof![
        Just(" "),
        Just("\t"),
        Just("\n"),
        Just("\u{0}"),
        Just("\u{a0}"),
        Just("'"),
        Just("\""),
        Just(":"),
        Just("@"),
        Just("%"),
        Just("é"),
        Just("K"),
        Just("."),
        Just("/"),
    ];
    prop_oneof![
        6 => glued.clone(),
        2 => (glued, any::<usize>(), noise).prop_map(|(s, at, c)| {
            let at = (0..=at % (s.len() + 1)).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
            let mut s = s;
            s.insert_str(at, c);
            s
        }),
        1 => any::<String>(),
        1 => Just(String::new()),
    ]
    .boxed()
}

fn one_of(items: &'static [&'static str]) -> BoxedStrategy<String> {
    proptest::sample::select(items)
        .prop_map(str::to_string)
        .boxed()
}

fn dns_name() -> BoxedStrategy<String> {
    near(vec![
        "[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?".boxed(),
        prop_oneof![Just(String::new()), "\\.[a-z0-9-]{1,8}"].boxed(),
    ])
}

fn url() -> BoxedStrategy<String> {
    near(vec![
        one_of(&[
            "https://",
            "HTTPS://",
            "http://",
            "Http://",
            "ftp://",
            "javascript:",
            " https://",
            "https:/",
            "https:",
            "",
        ]),
        one_of(&["", "user@", "user:pw@"]),
        one_of(&[
            "authentication.logmeininc.com",
            "AUTHENTICATION.logmeininc.com",
            "authentication.logmeininc.com.",
            "authentication.logmeininc.com.evil.example",
            "api.getgo.com",
            "regional.example",
            "goto-oauth.example.com",
            "localhost",
            "LocalHost",
            "localhost.",
            "127.0.0.1",
            "127.1",
            "127.000.000.001",
            "0x7f.0.0.1",
            "2130706433",
            "[::1]",
            "[0:0:0:0:0:0:0:1]",
            "[::ffff:127.0.0.1]",
            "xn--bcher-kva.example",
            "bücher.example",
            "%61pi.getgo.com",
            "",
        ]),
        one_of(&["", ":443", ":8443", ":9000", ":0", ":65536", ":"]),
        one_of(&[
            "",
            "/",
            "/oauth/token",
            "/callback",
            "?a=b",
            "#frag",
            "/a b",
            "\\x",
        ]),
    ])
}

fn duration() -> BoxedStrategy<String> {
    let unit = one_of(&[
        "ms", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
        "h", "hr", "hrs", "hour", "hours", "d", "day", "days", "w", "week", "weeks", "ns", "nsec",
        "us", "usec", "µs", "msec", "M", "month", "months", "y", "yr", "year", "years", "H", "",
    ]);
    let item = (
        prop_oneof![
            "[0-9]{1,3}",
            "[0-9]{1,3}\\.[0-9]{1,3}",
            "[0-9]{18,25}",
            Just("-1".to_string())
        ],
        one_of(&["", " "]),
        unit,
        one_of(&["", " ", "  "]),
    )
        .prop_map(|(n, a, u, b)| format!("{n}{a}{u}{b}"));
    let items = proptest::collection::vec(item, 1..4).prop_map(|v| v.concat());
    near(vec![items.boxed()])
}

fn text() -> BoxedStrategy<String> {
    prop_oneof![any::<String>(), "[a-zA-Z0-9_.:-]{0,12}"].boxed()
}

fn opt(s: BoxedStrategy<String>) -> BoxedStrategy<Option<String>> {
    proptest::option::of(s).boxed()
}

/// A spec object with every field absent, right, nearly right or garbage.
fn spec() -> impl Strategy<Value = Value> {
    let secret_ref = (dns_name(), opt(near(vec!["[a-zA-Z0-9_.-]{1,12}".boxed()])));
    let pat_ref =
        proptest::option::of((dns_name(), opt(near(vec!["[a-zA-Z0-9_.-]{1,12}".boxed()]))));
    let target = (
        one_of(&["Deployment", "StatefulSet", "DaemonSet"]),
        dns_name(),
    );
    let template = proptest::collection::btree_map(text(), text(), 0..3);
    (
        (
            near(vec!["[a-z0-9-]{1,36}".boxed()]),
            secret_ref,
            opt(url()),
            proptest::collection::vec(text(), 0..3),
            opt(dns_name()),
            opt(duration()),
        ),
        (
            opt(url()),
            opt(url()),
            proptest::option::of((template.clone(), template)),
            opt(text()),
            opt(text()),
        ),
        (
            proptest::collection::vec(target, 0..3),
            proptest::option::of(proptest::sample::subsequence(
                &["Authorization", "RefreshTokenRotation", "AccessToken"][..],
                0..=3,
            )),
            opt(duration()),
            pat_ref,
        ),
    )
        .prop_map(
            |(
                (client_id, (secret_name, secret_key), redirect, scopes, token_secret, refresh),
                (authorize, token, template, account, display),
                (targets, on, interval, pat),
            )| {
                let mut spec = json!({
                    "clientId": client_id,
                    "clientSecretRef": {"name": secret_name},
                    "scopes": scopes,
                    "rolloutRestartTargets": targets.into_iter()
                        .map(|(kind, name)| json!({"kind": kind, "name": name}))
                        .collect::<Vec<_>>(),
                });
                let set = |spec: &mut Value, key: &str, value: Option<Value>| {
                    if let Some(value) = value {
                        spec[key] = value;
                    }
                };
                if let Some(key) = secret_key {
                    spec["clientSecretRef"]["key"] = json!(key);
                }
                set(&mut spec, "redirectUri", redirect.map(Value::String));
                set(&mut spec, "secretName", token_secret.map(Value::String));
                set(&mut spec, "refreshBefore", refresh.map(Value::String));
                if authorize.is_some() || token.is_some() {
                    let mut endpoints = json!({});
                    set(&mut endpoints, "authorizeUrl", authorize.map(Value::String));
                    set(&mut endpoints, "tokenUrl", token.map(Value::String));
                    spec["endpoints"] = endpoints;
                }
                set(
                    &mut spec,
                    "secretTemplate",
                    template.map(|(labels, annotations)| {
                        json!({"labels": labels, "annotations": annotations})
                    }),
                );
                set(&mut spec, "expectedAccount", account.map(Value::String));
                set(&mut spec, "displayName", display.map(Value::String));
                set(&mut spec, "rolloutRestartOn", on.map(|on| json!(on)));
                set(
                    &mut spec,
                    "rolloutRestartMinInterval",
                    interval.map(Value::String),
                );
                if let Some((name, key)) = pat {
                    let mut r = json!({"name": name});
                    set(&mut r, "key", key.map(Value::String));
                    spec["personalAccessTokenRef"] = r;
                }
                spec
            },
        )
}

fn defaults() -> Defaults {
    Defaults {
        public_url: Url::parse("https://goto-oauth.example.com").expect("a URL"),
        authorize_url: Url::parse("https://authentication.logmeininc.com/oauth/authorize")
            .expect("a URL"),
        token_url: Url::parse("https://authentication.logmeininc.com/oauth/token").expect("a URL"),
        allowed_hosts: [
            "api.getgo.com",
            "regional.example:8443",
            "127.0.0.1:9000",
            "[::1]:9000",
        ]
        .into_iter()
        .map(|h| AllowedHost::parse(h).expect("a valid entry"))
        .collect(),
    }
}

fn schema() -> (Value, CompiledSchema) {
    let crd = GoToOAuthClient::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(serde_json::to_value)
        .expect("the CRD has a schema")
        .expect("the schema serialises");
    let compiled = compile_schema(&schema);
    (schema, compiled)
}

/// The `maxLength` of the spec field at `path` (dotted), if it has one: the API server refuses a
/// longer value before any rule runs.
fn max_length(schema: &Value, path: &str) -> Option<usize> {
    let mut node = &schema["properties"]["spec"];
    for key in path.split('.') {
        node = &node["properties"][key];
    }
    node["maxLength"].as_u64().map(|n| n as usize)
}

fn check(
    spec: &Value,
    defaults: &Defaults,
    cel: &Validator,
    schema: &Value,
    compiled: &CompiledSchema,
) -> TestCaseResult {
    let object = json!({
        "apiVersion": "goto-oauth.dev/v1alpha1",
        "kind": "GoToOAuthClient",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": spec,
    });
    let client: GoToOAuthClient = match serde_json::from_value(object.clone()) {
        Ok(client) => client,
        Err(e) => {
            prop_assert!(false, "the generated spec does not deserialise: {e}");
            unreachable!()
        }
    };
    let result = validate(&client, defaults);

    // What the operator accepts holds what it promises.
    if let Ok(settings) = &result {
        prop_assert!(!settings.client_id.is_empty() && !settings.client_id.contains(':'));
        prop_assert!(check_dns_subdomain(&settings.secret_name).is_ok());
        prop_assert!(check_dns_subdomain(&settings.client_secret_name).is_ok());
        prop_assert_ne!(&settings.secret_name, &settings.client_secret_name);
        for url in [&settings.authorize_url, &settings.token_url] {
            prop_assert!(check_web_url(url).is_ok(), "{url}");
            prop_assert!(
                url.username().is_empty() && url.password().is_none(),
                "{url}"
            );
        }
        let redirect = Url::parse(&settings.redirect_uri);
        prop_assert!(redirect.is_ok_and(|u| check_web_url(&u).is_ok()));
        if let Some(d) = settings.refresh_before {
            prop_assert!(d.as_secs() >= 1);
        }
    }

    // The CEL rules never refuse what the operator accepts (the CRD only moves the operator's
    // refusals to `kubectl apply`): every field they refuse, the operator refuses too.
    let problems = result
        .as_ref()
        .err()
        .map(|e| e.problems.clone())
        .unwrap_or_default();
    if let Err(errors) = cel.validate_compiled(compiled, &object, None) {
        for error in errors.iter() {
            // `spec.rolloutRestartTargets[1].name` is reported for the list by the operator.
            let field = error.field_path.split('[').next().unwrap_or_default();
            let within_limit =
                max_length(schema, field.trim_start_matches("spec.")).is_none_or(|max| {
                    let value = field
                        .trim_start_matches("spec.")
                        .split('.')
                        .fold(spec, |node, key| &node[key]);
                    value.as_str().is_none_or(|s| s.chars().count() <= max)
                });
            prop_assert!(
                !within_limit || problems.iter().any(|p| p.starts_with(field)),
                "CEL refuses {} ({}), the operator accepts it: {problems:?}",
                error.field_path,
                error.message
            );
        }
    }
    Ok(())
}

#[test]
fn fuzz_spec() {
    let defaults = defaults();
    let cel = Validator::new();
    let (schema, compiled) = schema();
    let host = prop_oneof![any::<String>(), url()];
    fuzz("spec", 100, (spec(), host), |(spec, host)| {
        check(&spec, &defaults, &cel, &schema, &compiled)?;
        // An allow-list entry is canonical: what it prints parses back to itself.
        if let Ok(entry) = AllowedHost::parse(&host) {
            let shown = entry.to_string();
            prop_assert!(
                !shown.is_empty() && shown.is_ascii() && !shown.contains(char::is_whitespace),
                "{shown:?}"
            );
            prop_assert_eq!(AllowedHost::parse(&shown), Ok(entry));
        }
        Ok(())
    });
}
