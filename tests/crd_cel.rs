//! The CRD's CEL rules (`x-kubernetes-validations`), evaluated the way the API server evaluates
//! them: with Kubernetes' CEL library (the `kube-cel` crate), on the generated CRD schema. The
//! in-memory API server does not evaluate CEL, so this is where the rules are proven: each one
//! refuses what it should with a message naming the field, accepts what it should, agrees with
//! the operator's own validation (`validation::validate`) on every case, and stays within the
//! API server's cost budget. On a real cluster (`GOTO_OAUTH_E2E_REAL_CLUSTER=1`) the API server
//! itself refuses an invalid `apply`.

mod common;

use goto_oauth_operator::{
    resource::GoToOAuthClient,
    validation::{self, AllowedHost, Defaults},
};
use kube::CustomResourceExt;
use kube_cel::{ScopeContext, Validator, analyze_rule, compile_schema};
use serde_json::{Value, json};
use url::Url;

/// The schema the API server validates against.
fn schema() -> Value {
    let crd = GoToOAuthClient::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).unwrap()
}

/// A valid object with `value` at the spec field `path` (dotted).
fn object(path: &str, value: &str) -> Value {
    let mut obj = json!({
        "apiVersion": "goto-oauth.dev/v1alpha1",
        "kind": "GoToOAuthClient",
        "metadata": {"name": "demo", "namespace": "ns"},
        "spec": {
            "clientId": "00000000-0000-0000-0000-000000000000",
            "clientSecretRef": {"name": "creds"},
        },
    });
    let mut node = &mut obj["spec"];
    let mut keys = path.split('.').peekable();
    while let Some(key) = keys.next() {
        if keys.peek().is_none() {
            node[key] = json!(value);
        } else {
            if node.get(key).is_none() {
                node[key] = json!({});
            }
            node = &mut node[key];
        }
    }
    obj
}

/// What the API server's CEL rules say: the failures as `(field path, message)`.
fn cel_failures(obj: &Value) -> Vec<(String, String)> {
    match Validator::new().validate(&schema(), obj, None) {
        Ok(()) => vec![],
        Err(errors) => errors
            .iter()
            .map(|e| (e.field_path.clone(), e.message.clone()))
            .collect(),
    }
}

/// What the operator's own validation says.
fn operator_problems(obj: &Value) -> Vec<String> {
    let client: GoToOAuthClient = serde_json::from_value(obj.clone()).unwrap();
    let defaults = Defaults {
        public_url: Url::parse("https://goto-oauth.example.com").unwrap(),
        authorize_url: Url::parse("https://authentication.logmeininc.com/oauth/authorize").unwrap(),
        token_url: Url::parse("https://authentication.logmeininc.com/oauth/token").unwrap(),
        allowed_hosts: vec![AllowedHost::parse("127.0.0.1:9000").unwrap()],
    };
    validation::validate(&client, &defaults)
        .err()
        .map(|e| e.problems)
        .unwrap_or_default()
}

/// `(field, value, valid)`: every rule against values it must accept and refuse.
const CASES: &[(&str, &str, bool)] = &[
    ("clientId", "00000000-0000-0000-0000-000000000000", true),
    ("clientId", "", false),
    ("clientId", "   ", false),
    ("clientId", "abc:def", false),
    ("clientSecretRef.name", "creds", true),
    ("clientSecretRef.name", "goto.creds-1", true),
    ("clientSecretRef.name", "Creds", false),
    ("clientSecretRef.name", "-creds", false),
    ("clientSecretRef.name", "creds_1", false),
    ("clientSecretRef.name", "", false),
    ("personalAccessTokenRef.name", "goto-pat", true),
    ("personalAccessTokenRef.name", "Goto_PAT", false),
    ("personalAccessTokenRef.name", "", false),
    ("secretName", "demo-token", true),
    ("secretName", "", true), // the operator reads "" as the default name
    ("secretName", "Demo-Token", false),
    ("secretName", "demo token", false),
    ("secretName", "demo.", false),
    (
        "redirectUri",
        "https://goto-oauth.example.com/callback",
        true,
    ),
    (
        "redirectUri",
        "HTTPS://goto-oauth.example.com/callback",
        true,
    ),
    ("redirectUri", "http://localhost:8080/callback", true),
    ("redirectUri", "http://localhost:8080", true),
    ("redirectUri", "http://127.0.0.1/callback", true),
    ("redirectUri", "http://[::1]:8080/callback", true),
    (
        "redirectUri",
        "http://goto-oauth.example.com/callback",
        false,
    ),
    (
        "redirectUri",
        "http://localhost.evil.example/callback",
        false,
    ),
    (
        "redirectUri",
        "http://127.0.0.1.evil.example/callback",
        false,
    ),
    (
        "redirectUri",
        "ftp://goto-oauth.example.com/callback",
        false,
    ),
    ("redirectUri", "", false),
    ("refreshBefore", "20m", true),
    ("refreshBefore", "1h30m", true),
    ("refreshBefore", "1h 30m", true),
    ("refreshBefore", "90s", true),
    ("refreshBefore", "20 minutes", true),
    ("refreshBefore", "", true), // the default
    ("refreshBefore", "20", false),
    ("refreshBefore", "soon", false),
    ("refreshBefore", "-5m", false),
    (
        "endpoints.tokenUrl",
        "https://authentication.logmeininc.com/oauth/token",
        true,
    ),
    (
        "endpoints.tokenUrl",
        "http://127.0.0.1:9000/oauth/token",
        true,
    ),
    ("endpoints.tokenUrl", "", true), // the operator-wide default
    (
        "endpoints.tokenUrl",
        "http://authentication.logmeininc.com/oauth/token",
        false,
    ),
    (
        "endpoints.authorizeUrl",
        "https://authentication.logmeininc.com/oauth/authorize",
        true,
    ),
    (
        "endpoints.authorizeUrl",
        "http://authentication.logmeininc.com/oauth/authorize",
        false,
    ),
    ("endpoints.authorizeUrl", "javascript:alert(1)", false),
    ("rolloutRestartMinInterval", "5m", true),
    ("rolloutRestartMinInterval", "0s", true),
    ("rolloutRestartMinInterval", "", true), // the default
    ("rolloutRestartMinInterval", "5", false),
    ("rolloutRestartMinInterval", "often", false),
];

#[test]
fn each_rule_refuses_with_a_message_naming_the_field() {
    for &(field, value, valid) in CASES {
        let failures = cel_failures(&object(field, value));
        if valid {
            assert!(failures.is_empty(), "{field}={value:?}: {failures:?}");
            continue;
        }
        assert_eq!(failures.len(), 1, "{field}={value:?}: {failures:?}");
        let (path, message) = &failures[0];
        assert_eq!(path, &format!("spec.{field}"), "{field}={value:?}");
        assert!(
            message.starts_with(&format!("{field} must")),
            "{field}={value:?}: {message}"
        );
    }
}

/// A rollout target's name is checked in the list, at the item's own path; the operator
/// agrees. (Its `kind` is an enum of the schema, which the API server checks without CEL.)
#[test]
fn rollout_target_names_are_checked_per_item() {
    let mut obj = object("secretName", "demo-token");
    obj["spec"]["rolloutRestartTargets"] = json!([
        {"kind": "Deployment", "name": "app"},
        {"kind": "StatefulSet", "name": "Not_A_Name"},
    ]);
    let failures = cel_failures(&obj);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].0, "spec.rolloutRestartTargets[1].name");
    assert!(failures[0].1.starts_with("rolloutRestartTargets.name must"));
    let problems = operator_problems(&obj);
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("spec.rolloutRestartTargets StatefulSet")),
        "{problems:?}"
    );
    let kinds = &schema()["properties"]["spec"]["properties"]["rolloutRestartTargets"]["items"]["properties"]
        ["kind"]["enum"];
    assert_eq!(kinds, &json!(["Deployment", "StatefulSet", "DaemonSet"]));
}

/// The rules never refuse what the operator accepts (nor the other way round, on these cases):
/// the CRD only moves the operator's refusals to `kubectl apply`.
#[test]
fn rules_agree_with_the_operators_validation() {
    for &(field, value, valid) in CASES {
        let problems = operator_problems(&object(field, value));
        if valid {
            assert!(problems.is_empty(), "{field}={value:?}: {problems:?}");
        } else {
            assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&format!("spec.{field}"))),
                "{field}={value:?}: the operator accepts what the CRD refuses: {problems:?}"
            );
        }
    }
}

/// What only the operator can check stays with it: hosts its admin allowed, the token Secret
/// differing from the client-secret Secret, a `refreshBefore` of at least a second.
#[test]
fn the_operator_still_checks_what_cel_cannot_see() {
    let mut obj = object("endpoints.tokenUrl", "https://evil.example/oauth/token");
    obj["spec"]["secretName"] = json!("creds");
    obj["spec"]["refreshBefore"] = json!("0s");
    assert_eq!(cel_failures(&obj), vec![]);
    let problems = operator_problems(&obj).join("\n");
    for needle in [
        "spec.endpoints.tokenUrl",
        "spec.secretName must differ",
        "spec.refreshBefore must be at least 1s",
    ] {
        assert!(
            problems.contains(needle),
            "{needle} missing from {problems}"
        );
    }
}

/// Every rule compiles, uses only what a CRD rule may, and is cheap enough for the API
/// server's cost estimator (strings it reads are bounded by `maxLength`).
#[test]
fn rules_compile_and_fit_the_cost_budget() {
    let schema = schema();
    assert!(!compile_schema(&schema).has_errors());
    let mut rules = 0;
    let mut visit = vec![schema];
    while let Some(node) = visit.pop() {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            visit.extend(props.values().cloned());
        }
        if let Some(items) = node.get("items") {
            visit.push(items.clone());
        }
        let Some(validations) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        else {
            continue;
        };
        let compiled = compile_schema(&node);
        for v in validations {
            let rule = v["rule"].as_str().unwrap();
            let warnings = analyze_rule(rule, &compiled, ScopeContext::CrdValidation);
            assert!(warnings.is_empty(), "{rule}: {warnings:?}");
            rules += 1;
        }
    }
    assert_eq!(rules, 10, "one rule per checked field");
}

/// On a real cluster the API server refuses an invalid client at `kubectl apply`, naming every
/// field. (The in-memory API server does not evaluate CEL; the tests above evaluate the rules.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_api_server_refuses_an_invalid_client() {
    if !common::real_cluster() {
        eprintln!("skipped: needs GOTO_OAUTH_E2E_REAL_CLUSTER=1 and KUBECONFIG");
        return;
    }
    let cluster = common::Cluster::start().await;
    let mut obj = object("redirectUri", "http://goto-oauth.example.com/callback");
    obj["spec"]["clientId"] = json!("");
    obj["spec"]["secretName"] = json!("Not_A_Name");
    obj["spec"]["refreshBefore"] = json!("soon");
    obj["metadata"]["namespace"] = json!(cluster.namespace);
    let client: GoToOAuthClient = serde_json::from_value(obj).unwrap();
    let err = cluster
        .clients()
        .create(&Default::default(), &client)
        .await
        .expect_err("the API server refuses the client");
    let kube::Error::Api(status) = err else {
        panic!("expected an API error, got {err}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    for needle in [
        "spec.clientId",
        "spec.secretName",
        "spec.redirectUri",
        "spec.refreshBefore",
        "redirectUri must be an https URL",
    ] {
        assert!(
            status.message.contains(needle),
            "{needle}: {}",
            status.message
        );
    }
}
