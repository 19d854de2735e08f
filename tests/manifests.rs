//! Checks the deployment artefacts without a cluster: the plain manifests in `deploy/`, the CRD in
//! `crds/`, the Helm chart (through `helm lint` / `helm template`) and the Dockerfile.
//!
//! There is no API server here, so "valid" means: every YAML document decodes into the matching
//! k8s-openapi type (or the operator's own `GoToOAuthClient`), and re-serialising that typed value
//! loses no field of the original. serde ignores unknown fields, so a misspelt or misplaced
//! field (`imagePullPolicy` under `securityContext`, `readOnlyRootFS`) shows up as a field that
//! did not survive the round trip. On top of that come the properties that matter for this
//! operator: least-privilege yet sufficient RBAC, a hardened Deployment, consistent examples.
//!
//! helm and kubectl come from `.tools/bin` (installed by `scripts/install-test-deps.sh`). A missing
//! tool fails the test with that hint, unless `GOTO_OAUTH_SKIP_TOOL_TESTS=1`, which turns the
//! tool-based parts into a visible skip; the pure-Rust checks always run.
//!
//! `kubectl create --dry-run=client -f FILE` cannot be used: even client-side dry runs resolve
//! kinds through the API server's discovery (REST mapping) and fail offline with "unable to
//! recognize". `kubectl label --local` needs no server, so it serves to check that kubectl's own
//! YAML decoder (YAML 1.1 flavoured: octal `0400`, `yes`/`no`) reads every file exactly as serde_yaml
//! (YAML 1.2) does — otherwise these checks would validate something other than what is applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use goto_oauth_operator::{
    leader::Timing,
    resource::GoToOAuthClient,
    validation::{AllowedHost, Defaults, validate},
};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Container, Namespace, Secret, Service, ServiceAccount},
        networking::v1::Ingress,
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

const CHART: &str = "charts/goto-oauth-operator";
/// Where the chart keeps its copy of the CRD: outside Helm's special `crds/` directory, so that
/// `crds.install` is honoured (see templates/crds.yaml).
const CHART_CRD: &str =
    "charts/goto-oauth-operator/files/crds/gotooauthclients.goto-oauth.dev.yaml";
const OPERATOR_NS: &str = "goto-oauth-operator";
const RELEASE: &str = "goto-oauth-operator";
const PUBLIC_URL: &str = "https://goto-oauth.example.com";

// ------------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One Kubernetes object and the file (or helm run) it came from.
#[derive(Clone, Debug)]
struct Doc {
    source: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    fn typed<T: DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{}: {} {}: {e}", self.source, self.kind(), self.name()))
    }
}

/// Splits multi-document YAML; empty documents (only comments, or a trailing `---`) are dropped.
fn parse_docs(source: &str, text: &str) -> Vec<Doc> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .filter_map(|(i, de)| {
            let value = <Value as serde::Deserialize>::deserialize(de)
                .unwrap_or_else(|e| panic!("{source}: document {i} is not valid YAML: {e}"));
            (!value.is_null()).then(|| Doc {
                source: format!("{source}#{i}"),
                value,
            })
        })
        .collect()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{dir} has no YAML files");
    files
}

fn load_file(path: &Path) -> Vec<Doc> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let rel = path
        .strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string();
    let docs = parse_docs(&rel, &text);
    assert!(!docs.is_empty(), "{rel} holds no Kubernetes object");
    docs
}

fn load_dirs(dirs: &[&str]) -> Vec<Doc> {
    dirs.iter()
        .flat_map(|d| yaml_files(d))
        .flat_map(|p| load_file(&p))
        .collect()
}

fn of_kind<'a>(docs: &'a [Doc], kind: &'a str) -> impl Iterator<Item = &'a Doc> + 'a {
    docs.iter().filter(move |d| d.kind() == kind)
}

fn one<T: DeserializeOwned>(docs: &[Doc], kind: &str, name: &str) -> T {
    let found: Vec<&Doc> = of_kind(docs, kind).filter(|d| d.name() == name).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} {name}, found {}",
        found.len()
    );
    found[0].typed()
}

// ------------------------------------------------------------------------------------------------
// Schema validation: typed decode + lossless round trip
// ------------------------------------------------------------------------------------------------

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Scalars that Kubernetes treats as the same: a Quantity written as a number comes back as a
/// string (`cpu: 1` → `"1"`); an int-or-string keeps its type.
fn same_scalar(a: &Value, b: &Value) -> bool {
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    a == b || (text(a).is_some() && text(a) == text(b))
}

/// Every field path of `orig` that is missing or different in `back`.
fn lost_fields(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let child = format!("{path}.{key}");
                match b.get(key) {
                    Some(bv) => lost_fields(value, bv, &child, out),
                    None if is_empty(value) => {}
                    None => out.push(format!("{child} (unknown or misplaced field)")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost_fields(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if same_scalar(o, b) || (is_empty(o) && is_empty(b)) => {}
        (o, b) => out.push(format!("{path}: {o} came back as {b}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.value.clone())
        .map_err(|e| format!("does not decode as {}: {e}", std::any::type_name::<T>()))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("does not re-encode: {e}"))?;
    let mut lost = Vec::new();
    lost_fields(&doc.value, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(())
    } else {
        Err(lost.join("; "))
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

const CLUSTER_SCOPED: [&str; 4] = [
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
];

/// Validates one object; returns the problems found.
fn validate_doc(doc: &Doc, namespace_required: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let api_version = doc.value["apiVersion"].as_str().unwrap_or("");
    if api_version.is_empty() {
        problems.push("no apiVersion".into());
    }
    if doc.kind().is_empty() {
        problems.push("no kind".into());
    }
    if !is_dns_subdomain(doc.name()) {
        problems.push(format!(
            "metadata.name {:?} is not a DNS subdomain",
            doc.name()
        ));
    }
    let cluster_scoped = CLUSTER_SCOPED.contains(&doc.kind());
    match doc.namespace() {
        Some(_) if cluster_scoped => problems.push("cluster-scoped object has a namespace".into()),
        None if namespace_required && !cluster_scoped => {
            problems.push("no metadata.namespace".into())
        }
        _ => {}
    }
    if let Some(labels) = doc.value["metadata"]["labels"].as_object() {
        for (k, v) in labels {
            let ok = v.as_str().is_some_and(|s| {
                s.len() <= 63
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            });
            if !ok {
                problems.push(format!("label {k}={v} is not a valid label value"));
            }
        }
    }
    let typed = match (api_version, doc.kind()) {
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "Secret") => round_trip::<Secret>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("networking.k8s.io/v1", "Ingress") => round_trip::<Ingress>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc)
        }
        ("goto-oauth.dev/v1alpha1", "GoToOAuthClient") => round_trip::<GoToOAuthClient>(doc),
        // No Rust type for the Prometheus Operator's CRD: check the shape the chart relies on.
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            let endpoints = doc.value["spec"]["endpoints"].as_array();
            if endpoints.is_some_and(|e| !e.is_empty()) && doc.value["spec"]["selector"].is_object()
            {
                Ok(())
            } else {
                Err("ServiceMonitor without spec.selector or spec.endpoints".into())
            }
        }
        ("monitoring.coreos.com/v1", "PrometheusRule") => check_prometheus_rule(&doc.value),
        (a, k) => Err(format!(
            "no check for {a} {k}: add its type to validate_doc"
        )),
    };
    if let Err(e) = typed {
        problems.push(e);
    }
    problems
}

/// The shape of a PrometheusRule the Prometheus Operator accepts, and what this chart promises:
/// every alert has an expression, a severity, and a summary, description and runbook.
fn check_prometheus_rule(rule: &Value) -> Result<(), String> {
    let groups = rule["spec"]["groups"]
        .as_array()
        .filter(|g| !g.is_empty())
        .ok_or("PrometheusRule without spec.groups")?;
    for group in groups {
        let rules = group["rules"]
            .as_array()
            .filter(|r| !r.is_empty())
            .ok_or("rule group without rules")?;
        for r in rules {
            let alert = r["alert"].as_str().ok_or("rule without alert name")?;
            if r["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                return Err(format!("{alert}: no expr"));
            }
            if r["labels"]["severity"].as_str().is_none() {
                return Err(format!("{alert}: no severity label"));
            }
            for key in ["summary", "description", "runbook"] {
                if r["annotations"][key]
                    .as_str()
                    .is_none_or(|a| a.trim().is_empty())
                {
                    return Err(format!("{alert}: no {key} annotation"));
                }
            }
        }
    }
    Ok(())
}

fn assert_valid(docs: &[Doc], namespace_required: bool) {
    let problems: Vec<String> = docs
        .iter()
        .flat_map(|d| {
            validate_doc(d, namespace_required)
                .into_iter()
                .map(move |p| format!("{} ({} {}): {p}", d.source, d.kind(), d.name()))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "invalid manifests:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn round_trip_detects_misspelt_and_misplaced_fields() {
    // The validator itself must catch what it is there to catch.
    let good = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: n}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: x
          resources: {requests: {cpu: 1, memory: 32Mi}}
          securityContext: {readOnlyRootFilesystem: true}
"#;
    let docs = parse_docs("good", good);
    assert!(
        validate_doc(&docs[0], true).is_empty(),
        "{:?}",
        validate_doc(&docs[0], true)
    );
    for (typo, field) in [
        ("readOnlyRootFilesystem: true", "readOnlyRootFS: true"),
        (
            "securityContext: {readOnlyRootFilesystem: true}",
            "securityContext: {imagePullPolicy: Always}",
        ),
        ("image: x", "image: x\n          replicas: 2"),
    ] {
        let bad = good.replace(typo, field);
        let problems = validate_doc(&parse_docs("bad", &bad)[0], true);
        assert!(
            problems.iter().any(|p| p.contains("unknown or misplaced")),
            "{field} not detected: {problems:?}"
        );
    }
    let wrong_type = good.replace("image: x", "image: [x]");
    assert!(!validate_doc(&parse_docs("bad", &wrong_type)[0], true).is_empty());
    let no_namespace = good.replace(", namespace: n", "");
    assert!(!validate_doc(&parse_docs("bad", &no_namespace)[0], true).is_empty());
}

// ------------------------------------------------------------------------------------------------
// RBAC: least privilege, and enough for the operator to work
// ------------------------------------------------------------------------------------------------

/// (apiGroup, resource) → every verb the operator may hold on it. Nothing else is allowed.
fn allowed_permissions() -> BTreeMap<(&'static str, &'static str), BTreeSet<&'static str>> {
    let set = |verbs: &[&'static str]| verbs.iter().copied().collect::<BTreeSet<_>>();
    BTreeMap::from([
        (
            ("goto-oauth.dev", "gotooauthclients"),
            set(&["get", "list", "watch", "patch", "update"]),
        ),
        (
            ("goto-oauth.dev", "gotooauthclients/status"),
            set(&["get", "patch", "update"]),
        ),
        (
            ("", "secrets"),
            set(&[
                "get", "list", "watch", "create", "update", "patch", "delete",
            ]),
        ),
        (("", "events"), set(&["create", "patch"])),
        (("events.k8s.io", "events"), set(&["create", "patch"])),
        (
            ("coordination.k8s.io", "leases"),
            set(&["get", "create", "update", "patch"]),
        ),
        // Opt-in rollout restarts: a merge patch of the pod template, nothing else.
        (("apps", "deployments"), set(&["patch"])),
        (("apps", "statefulsets"), set(&["patch"])),
        (("apps", "daemonsets"), set(&["patch"])),
    ])
}

/// The rules that let the operator patch apps/v1 workloads, with where they came from.
fn workload_rules(docs: &[Doc]) -> Vec<(String, PolicyRule)> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "ClusterRole" | "Role"))
        .flat_map(|d| {
            let rules: Vec<PolicyRule> =
                serde_json::from_value(d.value["rules"].clone()).unwrap_or_default();
            let origin = format!("{} {}/{}", d.kind(), d.namespace().unwrap_or(""), d.name());
            rules
                .into_iter()
                .filter(|r| {
                    r.api_groups
                        .as_ref()
                        .is_some_and(|g| g.iter().any(|g| g == "apps"))
                })
                .map(move |r| (origin.clone(), r))
        })
        .collect()
}

/// Rollout restarts need `patch` on workloads, which the operator does not get by default:
/// deploy/ and the default chart grant none; the deploy/ example and the chart value grant
/// exactly `patch` on the three kinds (in every watched namespace), and nothing else.
#[test]
fn rollout_restart_rbac_is_opt_in_and_patch_only() {
    let expect_patch_only = |rules: &[(String, PolicyRule)]| {
        assert!(!rules.is_empty());
        for (origin, rule) in rules {
            assert_eq!(rule.verbs, ["patch"], "{origin}");
            assert_eq!(
                rule.resources.clone().unwrap_or_default(),
                ["deployments", "statefulsets", "daemonsets"],
                "{origin}"
            );
            assert!(rule.resource_names.is_none(), "{origin}");
        }
        let problems: Vec<String> = rules
            .iter()
            .flat_map(|(o, r)| check_rules_least_privilege(o, std::slice::from_ref(r), true))
            .collect();
        assert!(problems.is_empty(), "{problems:?}");
    };
    assert!(workload_rules(&load_dirs(&["deploy", "deploy/namespaced"])).is_empty());
    let example = load_file(&root().join("deploy/examples/rollout-restart-rbac.yaml"));
    expect_patch_only(&workload_rules(&example));
    let binding: ClusterRoleBinding = one(
        &example,
        "ClusterRoleBinding",
        "goto-oauth-operator-rollout-restart",
    );
    let subject = &binding.subjects.expect("subjects")[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("goto-oauth-operator", Some(OPERATOR_NS)),
        "binds the operator's ServiceAccount of deploy/"
    );

    let Some(helm_bin) = tool("helm", "rollout_restart_rbac_is_opt_in_and_patch_only") else {
        return;
    };
    let public_url = format!("publicUrl={PUBLIC_URL}");
    let render = |extra: &[&str]| {
        let mut args = vec!["--set", public_url.as_str()];
        args.extend_from_slice(extra);
        helm_template(&helm_bin, &args)
    };
    assert!(workload_rules(&render(&[])).is_empty());
    let rules = workload_rules(&render(&["--set", "rolloutRestart.enabled=true"]));
    expect_patch_only(&rules);
    assert!(rules.iter().all(|(o, _)| o.starts_with("ClusterRole")));
    let namespaced = render(&[
        "--set",
        "rolloutRestart.enabled=true",
        "--set",
        "watchNamespaces={team-a,team-b}",
    ]);
    let rules = workload_rules(&namespaced);
    expect_patch_only(&rules);
    let namespaces: BTreeSet<String> = rules
        .iter()
        .map(|(o, _)| o.split(['/', ' ']).nth(1).unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        namespaces,
        BTreeSet::from(["team-a".to_string(), "team-b".to_string()])
    );
}

/// What the operator needs in every namespace it watches.
const WATCH_NEEDS: [(&str, &str, &[&str]); 5] = [
    (
        "goto-oauth.dev",
        "gotooauthclients",
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "goto-oauth.dev",
        "gotooauthclients/status",
        &["get", "patch", "update"],
    ),
    (
        "",
        "secrets",
        &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    ),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

fn check_rules_least_privilege(
    origin: &str,
    rules: &[PolicyRule],
    cluster_wide: bool,
) -> Vec<String> {
    let allowed = allowed_permissions();
    let mut problems = Vec::new();
    for rule in rules {
        if rule
            .non_resource_urls
            .as_ref()
            .is_some_and(|u| !u.is_empty())
        {
            problems.push(format!("{origin}: nonResourceURLs are not needed"));
        }
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        for word in groups.iter().chain(&resources).chain(&rule.verbs) {
            if word.contains('*') {
                problems.push(format!("{origin}: wildcard {word:?}"));
            }
        }
        for group in &groups {
            for resource in &resources {
                if cluster_wide && resource == "leases" {
                    problems.push(format!(
                        "{origin}: leases belong in a Role of the operator namespace"
                    ));
                }
                match allowed.get(&(group.as_str(), resource.as_str())) {
                    None => problems.push(format!("{origin}: {group}/{resource} is not needed")),
                    Some(verbs) => {
                        for verb in &rule.verbs {
                            if !verbs.contains(verb.as_str()) {
                                problems.push(format!(
                                    "{origin}: verb {verb} on {group}/{resource} is not needed"
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    problems
}

fn rule_allows(
    rule: &PolicyRule,
    group: &str,
    resource: &str,
    verb: &str,
    name: Option<&str>,
) -> bool {
    let has = |list: &Option<Vec<String>>, want: &str| {
        list.as_ref().is_some_and(|l| l.iter().any(|x| x == want))
    };
    let names_ok = match rule.resource_names.as_ref().filter(|n| !n.is_empty()) {
        None => true,
        Some(names) => name.is_some_and(|n| names.iter().any(|x| x == n)),
    };
    has(&rule.api_groups, group)
        && has(&rule.resources, resource)
        && rule.verbs.iter().any(|v| v == verb)
        && names_ok
}

/// The RBAC objects of one rendering, evaluated the way the API server's authorizer does (for
/// the subset used here: ClusterRole/Role bound to one ServiceAccount).
struct Rbac {
    cluster_rules: Vec<PolicyRule>,
    namespace_rules: BTreeMap<String, Vec<PolicyRule>>,
}

impl Rbac {
    fn from_docs(docs: &[Doc], sa_namespace: &str, sa_name: &str) -> Self {
        let bound = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
            subjects.as_ref().is_some_and(|s| {
                s.iter().any(|s| {
                    s.kind == "ServiceAccount"
                        && s.name == sa_name
                        && s.namespace.as_deref() == Some(sa_namespace)
                })
            })
        };
        let cluster_roles: BTreeMap<String, ClusterRole> = of_kind(docs, "ClusterRole")
            .map(|d| (d.name().to_string(), d.typed()))
            .collect();
        let roles: BTreeMap<(String, String), Role> = of_kind(docs, "Role")
            .map(|d| {
                (
                    (
                        d.namespace().unwrap_or("").to_string(),
                        d.name().to_string(),
                    ),
                    d.typed(),
                )
            })
            .collect();
        let mut cluster_rules = Vec::new();
        for binding in of_kind(docs, "ClusterRoleBinding").map(|d| d.typed::<ClusterRoleBinding>())
        {
            if bound(&binding.subjects) && binding.role_ref.kind == "ClusterRole" {
                let role = cluster_roles
                    .get(&binding.role_ref.name)
                    .unwrap_or_else(|| {
                        panic!(
                            "ClusterRoleBinding refers to missing ClusterRole {}",
                            binding.role_ref.name
                        )
                    });
                cluster_rules.extend(role.rules.clone().unwrap_or_default());
            }
        }
        let mut namespace_rules: BTreeMap<String, Vec<PolicyRule>> = BTreeMap::new();
        for doc in of_kind(docs, "RoleBinding") {
            let binding: RoleBinding = doc.typed();
            let ns = doc.namespace().unwrap_or("").to_string();
            if !bound(&binding.subjects) {
                continue;
            }
            let rules = match binding.role_ref.kind.as_str() {
                "Role" => roles
                    .get(&(ns.clone(), binding.role_ref.name.clone()))
                    .unwrap_or_else(|| {
                        panic!("RoleBinding {ns}/{} refers to missing Role", doc.name())
                    })
                    .rules
                    .clone(),
                _ => cluster_roles
                    .get(&binding.role_ref.name)
                    .and_then(|r| r.rules.clone()),
            };
            namespace_rules
                .entry(ns)
                .or_default()
                .extend(rules.unwrap_or_default());
        }
        Rbac {
            cluster_rules,
            namespace_rules,
        }
    }

    fn allows(
        &self,
        namespace: &str,
        group: &str,
        resource: &str,
        verb: &str,
        name: Option<&str>,
    ) -> bool {
        self.cluster_rules
            .iter()
            .chain(self.namespace_rules.get(namespace).into_iter().flatten())
            .any(|r| rule_allows(r, group, resource, verb, name))
    }
}

/// What the operator Deployment tells about the RBAC it needs.
#[derive(Debug)]
struct OperatorConfig {
    namespace: String,
    service_account: String,
    watched: Vec<String>,
    leader_election: bool,
    lease_name: String,
    state_key_secret: String,
}

fn check_rbac(docs: &[Doc], config: &OperatorConfig) {
    let mut problems = Vec::new();
    for doc in of_kind(docs, "ClusterRole") {
        let role: ClusterRole = doc.typed();
        problems.extend(check_rules_least_privilege(
            &doc.source,
            &role.rules.unwrap_or_default(),
            true,
        ));
    }
    for doc in of_kind(docs, "Role") {
        let role: Role = doc.typed();
        let rules = role.rules.unwrap_or_default();
        problems.extend(check_rules_least_privilege(&doc.source, &rules, false));
        let has_leases = rules.iter().any(|r| {
            r.resources
                .as_ref()
                .is_some_and(|x| x.iter().any(|x| x == "leases"))
        });
        if has_leases && doc.namespace() != Some(config.namespace.as_str()) {
            problems.push(format!(
                "{}: leases outside the operator namespace",
                doc.source
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "RBAC is broader than needed:\n  {}",
        problems.join("\n  ")
    );

    let rbac = Rbac::from_docs(docs, &config.namespace, &config.service_account);
    let cluster_wide = config.watched.is_empty();
    assert_eq!(
        !rbac.cluster_rules.is_empty(),
        cluster_wide,
        "a ClusterRole is bound exactly when all namespaces are watched ({config:?})"
    );
    let probe_namespaces: Vec<String> = if cluster_wide {
        vec!["some-app".to_string(), config.namespace.clone()]
    } else {
        config.watched.clone()
    };
    for ns in &probe_namespaces {
        for (group, resource, verbs) in WATCH_NEEDS {
            for verb in verbs {
                assert!(
                    rbac.allows(ns, group, resource, verb, None),
                    "cannot {verb} {group}/{resource} in {ns}"
                );
            }
        }
    }
    if !cluster_wide {
        assert!(
            !rbac.allows("not-watched", "", "secrets", "get", None),
            "secrets readable outside the watched namespaces"
        );
    }
    let own = config.namespace.as_str();
    for verb in ["get", "create"] {
        assert!(
            rbac.allows(own, "", "secrets", verb, Some(&config.state_key_secret)),
            "cannot {verb} the state-key Secret {}",
            config.state_key_secret
        );
    }
    if config.leader_election {
        for verb in ["get", "create", "update", "patch"] {
            assert!(
                rbac.allows(
                    own,
                    "coordination.k8s.io",
                    "leases",
                    verb,
                    Some(&config.lease_name)
                ),
                "cannot {verb} the Lease {}",
                config.lease_name
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The operator Deployment
// ------------------------------------------------------------------------------------------------

fn env_value(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

fn env_field_ref(container: &Container, name: &str) -> Option<String> {
    let env = container.env.as_ref()?.iter().find(|e| e.name == name)?;
    Some(
        env.value_from
            .as_ref()?
            .field_ref
            .as_ref()?
            .field_path
            .clone(),
    )
}

/// Asserts the hardening and wiring of the operator Deployment; returns what RBAC must match.
fn check_operator_deployment(doc: &Doc) -> OperatorConfig {
    let deployment: Deployment = doc.typed();
    let src = &doc.source;
    let spec = &deployment.spec;
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "{src}: one container");
    let c = &pod.containers[0];

    let pod_sc = pod.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    assert_eq!(
        pod_sc.run_as_non_root,
        Some(true),
        "{src}: pod runAsNonRoot"
    );
    assert_eq!(
        sc.run_as_non_root,
        Some(true),
        "{src}: container runAsNonRoot"
    );
    assert_eq!(
        sc.run_as_user.or(pod_sc.run_as_user),
        Some(65532),
        "{src}: runAsUser 65532"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{src}: readOnlyRootFilesystem"
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{src}: allowPrivilegeEscalation false"
    );
    assert_eq!(sc.privileged, None, "{src}: privileged must not be set");
    let drop = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert!(
        drop.iter().any(|d| d == "ALL"),
        "{src}: capabilities drop ALL"
    );
    let add = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert!(add.is_empty(), "{src}: no added capabilities");
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(pod_sc.seccomp_profile.as_ref())
        .map(|s| s.type_.as_str());
    assert_eq!(
        seccomp,
        Some("RuntimeDefault"),
        "{src}: seccompProfile RuntimeDefault"
    );
    assert_ne!(pod.host_network, Some(true), "{src}: no hostNetwork");

    let ports: BTreeMap<String, i32> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("http".into(), 8080), ("metrics".into(), 9090)]),
        "{src}: ports"
    );
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let http = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{src}: {path} probe"));
        assert_eq!(http.path.as_deref(), Some(path), "{src}: probe path");
        assert_eq!(
            http.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into()),
            "{src}: {path} probe on port metrics"
        );
    }

    let resources = c.resources.clone().unwrap_or_default();
    let requests = resources.requests.unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    assert!(
        requests.contains_key("cpu") && requests.contains_key("memory"),
        "{src}: cpu and memory requests"
    );
    assert!(limits.contains_key("memory"), "{src}: memory limit");

    assert_eq!(
        env_field_ref(c, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace"),
        "{src}: POD_NAMESPACE"
    );
    assert_eq!(
        env_field_ref(c, "POD_NAME").as_deref(),
        Some("metadata.name"),
        "{src}: POD_NAME"
    );
    let public_url = env_value(c, "GOTO_OAUTH_PUBLIC_URL")
        .unwrap_or_else(|| panic!("{src}: GOTO_OAUTH_PUBLIC_URL"));
    assert!(
        public_url.starts_with("https://"),
        "{src}: public URL {public_url} is https"
    );

    if let Some(hosts) = env_value(c, "GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS") {
        for entry in hosts.split(',') {
            if let Err(e) = AllowedHost::parse(entry) {
                panic!("{src}: GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS entry the operator refuses: {e}");
            }
        }
    }

    let leader_election = env_value(c, "GOTO_OAUTH_LEADER_ELECTION").is_none_or(|v| v == "true");
    let replicas = spec.replicas.unwrap_or(1);
    assert!(
        replicas == 1 || leader_election,
        "{src}: {replicas} replicas need leader election"
    );

    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("run"),
        "{src}: args start with the run subcommand"
    );
    assert!(c.command.is_none(), "{src}: keep the image ENTRYPOINT");
    let mut watched: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--namespace="))
        .map(str::to_string)
        .collect();
    if let Some(list) = env_value(c, "GOTO_OAUTH_NAMESPACES") {
        watched.extend(
            list.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
    }

    // Selectors of the Deployment must match its own pod template.
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "{src}: selector {k}={v} matches the pod template"
        );
    }

    OperatorConfig {
        namespace: doc.namespace().expect("namespace").to_string(),
        service_account: pod
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        watched,
        leader_election,
        lease_name: env_value(c, "GOTO_OAUTH_LEASE_NAME")
            .unwrap_or_else(|| "goto-oauth-operator".into()),
        state_key_secret: env_value(c, "GOTO_OAUTH_STATE_KEY_SECRET")
            .unwrap_or_else(|| "goto-oauth-operator-state-key".into()),
    }
}

/// The Services select the operator pods and point at its named ports.
fn check_services(
    docs: &[Doc],
    deployment: &Deployment,
    http_service: &str,
    metrics_service: &str,
) {
    let pod_labels = deployment
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (name, port, target) in [
        (http_service, 80, "http"),
        (metrics_service, 9090, "metrics"),
    ] {
        let svc: Service = one(docs, "Service", name);
        let spec = svc.spec.expect("service spec");
        for (k, v) in spec.selector.iter().flatten() {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "Service {name} selector {k}={v} matches the pods"
            );
        }
        let ports = spec.ports.unwrap_or_default();
        assert_eq!(ports.len(), 1, "Service {name}: one port");
        assert_eq!(ports[0].port, port, "Service {name} port");
        assert_eq!(
            ports[0].target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(target.into())),
            "Service {name} targets the named port {target}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Plain manifests
// ------------------------------------------------------------------------------------------------

#[test]
fn deploy_files_are_valid_kubernetes_objects() {
    assert_valid(
        &load_dirs(&["deploy", "deploy/examples", "deploy/namespaced"]),
        true,
    );
    // The CRD is cluster-scoped; GoToOAuthClient's own schema lives there, so it goes through
    // the same typed decode (CustomResourceDefinition) and round trip.
    let crd = load_dirs(&["crds"]);
    assert_valid(&crd, false);
    let crd: CustomResourceDefinition = one(
        &crd,
        "CustomResourceDefinition",
        "gotooauthclients.goto-oauth.dev",
    );
    assert_eq!(crd.spec.group, "goto-oauth.dev");
    assert_eq!(crd.spec.names.kind, "GoToOAuthClient");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1alpha1")
        .expect("v1alpha1");
    assert!(
        version.served && version.storage,
        "v1alpha1 is served and stored"
    );
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some(),
        "status subresource"
    );
}

/// The allow-list is commented out in the plain manifests (GoTo's hosts are the default): the
/// example an admin uncomments must start the operator.
#[test]
fn deploy_allowed_endpoint_hosts_example_is_valid() {
    for file in [
        "deploy/30-deployment.yaml",
        "deploy/namespaced/30-deployment.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(file)).expect("read manifest");
        let example = text
            .lines()
            .skip_while(|l| !l.contains("# - name: GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS"))
            .nth(1)
            .and_then(|l| l.trim().strip_prefix("#   value: "))
            .unwrap_or_else(|| {
                panic!("{file}: commented GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS example")
            });
        let example: String = serde_yaml::from_str(example).expect("a YAML string");
        for entry in example.split(',') {
            AllowedHost::parse(entry).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}

#[test]
fn deploy_cluster_wide_install_is_hardened_and_least_privilege() {
    let docs = load_dirs(&["deploy"]);
    let kinds: BTreeSet<&str> = docs.iter().map(Doc::kind).collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(kinds.contains(kind), "deploy/ has a {kind}");
    }
    let deployment_doc = of_kind(&docs, "Deployment").next().expect("Deployment");
    let config = check_operator_deployment(deployment_doc);
    assert_eq!(config.namespace, OPERATOR_NS);
    assert!(config.watched.is_empty(), "deploy/ watches all namespaces");
    let deployment: Deployment = deployment_doc.typed();
    assert_eq!(deployment.spec.replicas, Some(2), "two replicas");
    let container = &deployment
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec")
        .containers[0];
    assert_eq!(
        env_value(container, "GOTO_OAUTH_PUBLIC_URL").as_deref(),
        Some(PUBLIC_URL),
        "placeholder URL"
    );
    let ns: Namespace = one(&docs, "Namespace", OPERATOR_NS);
    assert!(ns.metadata.name.is_some());
    let sa: ServiceAccount = one(&docs, "ServiceAccount", &config.service_account);
    assert_eq!(sa.metadata.namespace.as_deref(), Some(OPERATOR_NS));
    check_rbac(&docs, &config);
    check_services(
        &docs,
        &deployment,
        "goto-oauth-operator",
        "goto-oauth-operator-metrics",
    );
}

#[test]
fn deploy_namespaced_variant_differs_only_in_rbac_and_namespaces() {
    let base = load_dirs(&["deploy"]);
    let variant = load_dirs(&["deploy/namespaced"]);
    let mut docs: Vec<Doc> = base
        .iter()
        .filter(|d| {
            !matches!(
                d.kind(),
                "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" | "Deployment"
            )
        })
        .cloned()
        .collect();
    docs.extend(variant.iter().cloned());
    let deployment_doc = of_kind(&docs, "Deployment")
        .next()
        .expect("namespaced Deployment");
    let config = check_operator_deployment(deployment_doc);
    assert_eq!(config.watched, ["my-app"]);
    check_rbac(&docs, &config);

    // Apart from the --namespace arguments (and comments), the Deployment is the cluster-wide one.
    let mut namespaced = deployment_doc.value.clone();
    let base_deployment = of_kind(&base, "Deployment")
        .next()
        .expect("Deployment")
        .value
        .clone();
    namespaced["spec"]["template"]["spec"]["containers"][0]["args"] = serde_json::json!(["run"]);
    assert_eq!(
        namespaced, base_deployment,
        "deploy/namespaced/30-deployment.yaml drifted from deploy/"
    );
}

#[test]
fn examples_fit_together_and_pass_the_operator_validation() {
    let docs = load_dirs(&["deploy/examples"]);
    let client: GoToOAuthClient = one(&docs, "GoToOAuthClient", "goto-admin-api");
    let defaults = Defaults {
        public_url: PUBLIC_URL.parse().expect("url"),
        authorize_url: goto_oauth_operator::cli::DEFAULT_AUTHORIZE_URL
            .parse()
            .expect("url"),
        token_url: goto_oauth_operator::cli::DEFAULT_TOKEN_URL
            .parse()
            .expect("url"),
        allowed_hosts: goto_oauth_operator::cli::DEFAULT_ALLOWED_ENDPOINT_HOSTS
            .split(',')
            .map(|h| AllowedHost::parse(h).expect("default host"))
            .collect(),
    };
    let settings = validate(&client, &defaults)
        .unwrap_or_else(|e| panic!("example GoToOAuthClient is invalid: {e}"));
    assert_eq!(client.spec.refresh_before.as_deref(), Some("20m"));
    assert!(!client.spec.scopes.is_empty() && client.spec.secret_template.is_some());

    let secret: Secret = one(&docs, "Secret", &settings.client_secret_name);
    assert_eq!(
        secret.metadata.namespace, client.metadata.namespace,
        "client secret in the client's namespace"
    );
    assert!(
        secret
            .string_data
            .unwrap_or_default()
            .contains_key(&settings.client_secret_key),
        "client secret has key {}",
        settings.client_secret_key
    );

    let app: Deployment = one(&docs, "Deployment", "my-app");
    assert_eq!(app.metadata.namespace, client.metadata.namespace);
    let pod = app.spec.template.spec.expect("pod spec");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                == Some(settings.secret_name.as_str())
        })
        .expect("the app mounts the token Secret as a volume");
    let items = volume
        .secret
        .as_ref()
        .and_then(|s| s.items.clone())
        .unwrap_or_default();
    assert!(
        items.iter().any(|i| i.key == "access_token"),
        "access_token is projected"
    );
    let container = &pod.containers[0];
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("volume is mounted");
    assert_eq!(mount.mount_path, "/var/run/secrets/goto");
    assert!(mount.sub_path.is_none(), "subPath mounts are never updated");
    // Env from the token Secret would go stale after the first refresh.
    assert!(
        container.env_from.is_none()
            && container.env.iter().flatten().all(|e| e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref())
                .is_none()),
        "the app must read the token from the mounted file, not env"
    );
    let command = container.command.clone().unwrap_or_default().join(" ");
    assert!(
        command.contains("/var/run/secrets/goto/access_token"),
        "the app reads the mounted file"
    );

    let ingress: Ingress = one(&docs, "Ingress", "goto-oauth-operator");
    let host = ingress
        .spec
        .and_then(|s| s.rules)
        .and_then(|r| r.first().and_then(|r| r.host.clone()));
    assert_eq!(
        host.as_deref(),
        PUBLIC_URL.strip_prefix("https://"),
        "Ingress host is the public URL's"
    );
}

// ------------------------------------------------------------------------------------------------
// Dockerfile
// ------------------------------------------------------------------------------------------------

/// Dockerfile instructions with continuation lines joined and comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body.trim_end());
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (op, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((op.to_ascii_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_a_static_nonroot_image() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let instructions = dockerfile_instructions(&text);
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "multi-stage build");
    let build_from = &instructions[stages[0]].1;
    assert!(
        build_from.starts_with("rust:1.95"),
        "build stage on rust:1.95: {build_from}"
    );
    assert!(
        build_from.to_ascii_lowercase().contains(" as "),
        "named build stage"
    );
    let last_stage = *stages.last().expect("stage");
    let runtime_from = &instructions[last_stage].1;
    assert!(
        runtime_from.starts_with("gcr.io/distroless/static") || runtime_from == "scratch",
        "runtime on distroless/static or scratch: {runtime_from}"
    );
    let runtime = &instructions[last_stage..];
    let build = &instructions[..last_stage];

    let cargo_builds: Vec<&String> = build
        .iter()
        .filter(|(op, a)| op == "RUN" && a.contains("cargo build"))
        .map(|(_, a)| a)
        .collect();
    assert!(
        cargo_builds.len() >= 2,
        "dependencies are built before the sources are copied"
    );
    for args in &cargo_builds {
        assert!(
            args.contains("--locked"),
            "cargo build without --locked: {args}"
        );
        assert!(
            args.contains("--release"),
            "cargo build without --release: {args}"
        );
    }
    assert!(
        text.contains("x86_64-unknown-linux-musl") && text.contains("rustup target add"),
        "static musl target"
    );
    let position = |pred: &dyn Fn(&(String, String)) -> bool| build.iter().position(pred);
    let copy_manifest =
        position(&|(op, a)| op == "COPY" && a.contains("Cargo.lock")).expect("COPY Cargo.lock");
    let copy_src = position(&|(op, a)| op == "COPY" && a.starts_with("src")).expect("COPY src");
    let first_build =
        position(&|(op, a)| op == "RUN" && a.contains("cargo build")).expect("cargo build");
    assert!(
        copy_manifest < first_build && first_build < copy_src,
        "Cargo.toml/lock, build, then sources"
    );

    let users: Vec<&String> = runtime
        .iter()
        .filter(|(op, _)| op == "USER")
        .map(|(_, a)| a)
        .collect();
    let user = users.last().expect("USER in the runtime stage");
    let ids: Vec<&str> = user.split(':').collect();
    assert!(
        ids.iter().all(|id| id.parse::<u32>().is_ok_and(|n| n != 0)),
        "USER must be a numeric non-root uid[:gid], got {user}"
    );
    for (op, want) in [
        ("ENTRYPOINT", r#"["/goto-oauth-operator"]"#),
        ("CMD", r#"["run"]"#),
    ] {
        let value = runtime
            .iter()
            .rfind(|(o, _)| o == op)
            .map(|(_, a)| a.as_str());
        let parsed: Option<Vec<String>> = value.and_then(|v| serde_json::from_str(v).ok());
        let expected: Vec<String> = serde_json::from_str(want).expect("json");
        assert_eq!(
            parsed,
            Some(expected),
            "{op} in exec (JSON) form: {value:?}"
        );
    }
    assert!(
        !runtime.iter().any(|(op, _)| op == "RUN"),
        "the runtime stage has no shell to RUN with"
    );
    let expose: BTreeSet<&str> = runtime
        .iter()
        .filter(|(op, _)| op == "EXPOSE")
        .flat_map(|(_, a)| a.split_whitespace())
        .collect();
    assert_eq!(expose, BTreeSet::from(["8080", "9090"]));
    for label in ["title", "description", "source", "licenses"] {
        assert!(
            text.contains(&format!("org.opencontainers.image.{label}=")),
            "OCI label {label}"
        );
    }

    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let ignored: BTreeSet<&str> = ignore.lines().map(str::trim).collect();
    for entry in ["target", ".git", "node_modules", ".tools"] {
        assert!(ignored.contains(entry), ".dockerignore lists {entry}");
    }
}

#[test]
fn dockerfile_parser_sees_shell_form_and_root() {
    let bad = "FROM rust:1.95 AS b\nRUN cargo build\nFROM scratch\nUSER root\nENTRYPOINT /goto-oauth-operator run\n";
    let ins = dockerfile_instructions(bad);
    assert_eq!(ins.len(), 5);
    assert_eq!(
        ins[4],
        (
            "ENTRYPOINT".to_string(),
            "/goto-oauth-operator run".to_string()
        )
    );
    assert!(
        serde_json::from_str::<Vec<String>>(&ins[4].1).is_err(),
        "shell form is not JSON"
    );
    assert!("root".parse::<u32>().is_err());
    let joined = dockerfile_instructions("RUN a \\\n    && b\n");
    assert_eq!(joined, [("RUN".to_string(), "a && b".to_string())]);
}

// ------------------------------------------------------------------------------------------------
// Tools: helm and kubectl
// ------------------------------------------------------------------------------------------------

/// The tool in `.tools/bin`, or `None` (after a visible skip notice) when it is missing and
/// GOTO_OAUTH_SKIP_TOOL_TESTS=1. Missing without the opt-out is a failure: CI must not pass
/// silently because an install step broke.
fn tool(name: &str, test: &str) -> Option<PathBuf> {
    let path = root().join(".tools/bin").join(name);
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("GOTO_OAUTH_SKIP_TOOL_TESTS").as_deref() == Ok("1") {
        // Straight to the stderr handle: libtest captures eprintln! of passing tests, and a skip
        // must be seen.
        let notice = format!(
            "SKIPPED {test}: {} not installed and GOTO_OAUTH_SKIP_TOOL_TESTS=1\n",
            path.display()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), notice.as_bytes());
        return None;
    }
    panic!(
        "{} is missing: run scripts/install-test-deps.sh (or set GOTO_OAUTH_SKIP_TOOL_TESTS=1 to skip)",
        path.display()
    );
}

/// Runs helm with its state in a temporary directory and no kubeconfig, so nothing outside the
/// repository is read or written and no cluster is contacted.
fn helm(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let home = tempfile::tempdir().expect("tempdir");
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").expect("kubeconfig");
    let out = Command::new(helm)
        .args(args)
        .current_dir(root())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("run helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm_template(helm_bin: &Path, extra: &[&str]) -> Vec<Doc> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", OPERATOR_NS];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = helm(helm_bin, &args);
    assert!(ok, "helm {args:?} failed:\n{stderr}");
    parse_docs(&format!("helm template {}", extra.join(" ")), &stdout)
}

#[test]
fn helm_lint_passes_for_every_ci_values_file() {
    let Some(helm_bin) = tool("helm", "helm_lint_passes_for_every_ci_values_file") else {
        return;
    };
    let ci = yaml_files(&format!("{CHART}/ci"));
    assert!(ci.len() >= 2, "default and namespaced/ingress values files");
    for values in ci {
        let values = values.display().to_string();
        let (ok, stdout, stderr) =
            helm(&helm_bin, &["lint", "--strict", CHART, "--values", &values]);
        assert!(
            ok,
            "helm lint --strict with {values} failed:\n{stdout}\n{stderr}"
        );
    }
}

#[test]
fn helm_default_render_is_cluster_wide_hardened_and_valid() {
    let Some(helm_bin) = tool(
        "helm",
        "helm_default_render_is_cluster_wide_hardened_and_valid",
    ) else {
        return;
    };
    let docs = helm_template(&helm_bin, &["--set", &format!("publicUrl={PUBLIC_URL}")]);
    assert_valid(&docs, true);
    let config =
        check_operator_deployment(of_kind(&docs, "Deployment").next().expect("Deployment"));
    assert!(config.watched.is_empty());
    assert_eq!(config.namespace, OPERATOR_NS);
    check_rbac(&docs, &config);
    let deployment: Deployment = one(&docs, "Deployment", RELEASE);
    assert_eq!(deployment.spec.replicas, Some(2));
    check_services(&docs, &deployment, RELEASE, &format!("{RELEASE}-metrics"));
    assert_eq!(
        of_kind(&docs, "Ingress").count(),
        0,
        "no Ingress by default"
    );
    for kind in ["ServiceMonitor", "PrometheusRule", "ConfigMap"] {
        assert_eq!(
            of_kind(&docs, kind).count(),
            0,
            "no {kind} by default (monitoring is opt-in)"
        );
    }
    assert_eq!(of_kind(&docs, "PodDisruptionBudget").count(), 1);
    let c = &deployment.spec.template.spec.expect("pod spec").containers[0];
    assert_eq!(
        env_value(c, "GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS"),
        None,
        "allowedEndpointHosts: [] leaves the operator's default (GoTo's hosts)"
    );

    // The rendered CRD is the chart's file plus Helm's keep policy and labels, nothing lost
    // through the template's fromYaml/toYaml. (Whether that file equals the generated CRD is the
    // lead's drift test, tests/crd_drift.rs.)
    let rendered = one::<Value>(
        &docs,
        "CustomResourceDefinition",
        "gotooauthclients.goto-oauth.dev",
    );
    assert_eq!(
        rendered["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let file = load_file(&root().join(CHART_CRD)).remove(0).value;
    let mut stripped = rendered.clone();
    let meta = stripped["metadata"].as_object_mut().expect("metadata");
    for key in ["annotations", "labels"] {
        if file["metadata"].get(key).is_none() {
            meta.remove(key);
        }
    }
    assert_eq!(
        stripped, file,
        "templates/crds.yaml changes the CRD content"
    );
}

#[test]
fn helm_namespaced_ingress_render_uses_roles_and_exposes_the_endpoint() {
    let Some(helm_bin) = tool(
        "helm",
        "helm_namespaced_ingress_render_uses_roles_and_exposes_the_endpoint",
    ) else {
        return;
    };
    let values = format!("{CHART}/ci/namespaced-ingress-values.yaml");
    let docs = helm_template(&helm_bin, &["--values", &values]);
    assert_valid(&docs, true);
    let config =
        check_operator_deployment(of_kind(&docs, "Deployment").next().expect("Deployment"));
    assert_eq!(config.watched, ["team-a", "team-b"]);
    check_rbac(&docs, &config);
    assert_eq!(
        of_kind(&docs, "ClusterRole").count(),
        0,
        "no ClusterRole when namespaces are listed"
    );
    let role_namespaces: BTreeSet<&str> =
        of_kind(&docs, "Role").filter_map(Doc::namespace).collect();
    assert_eq!(
        role_namespaces,
        BTreeSet::from(["team-a", "team-b", OPERATOR_NS])
    );

    let ingress: Ingress = one(&docs, "Ingress", RELEASE);
    let spec = ingress.spec.expect("ingress spec");
    assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
    let rule = &spec.rules.expect("rules")[0];
    assert_eq!(rule.host.as_deref(), Some("goto-oauth.example.com"));
    let backend = &rule.http.as_ref().expect("http").paths[0].backend;
    let service = backend.service.as_ref().expect("service backend");
    assert_eq!(service.name, RELEASE);
    assert_eq!(
        service.port.as_ref().and_then(|p| p.name.as_deref()),
        Some("http")
    );
    assert!(spec.tls.is_some_and(|t| !t.is_empty()), "TLS");

    let monitor = of_kind(&docs, "ServiceMonitor")
        .next()
        .expect("ServiceMonitor")
        .value
        .clone();
    let metrics_service: Service = one(&docs, "Service", &format!("{RELEASE}-metrics"));
    let service_labels = metrics_service.metadata.labels.unwrap_or_default();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            service_labels.get(k).map(String::as_str),
            v.as_str(),
            "ServiceMonitor selects the metrics Service"
        );
    }
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["honorLabels"], true,
        "the client's namespace label survives the scrape (the alerts group by it)"
    );

    let deployment: Deployment = one(&docs, "Deployment", RELEASE);
    let c = &deployment.spec.template.spec.expect("pod spec").containers[0];
    assert_eq!(
        env_value(c, "GOTO_OAUTH_TOKEN_RATE_LIMIT").as_deref(),
        Some("5")
    );
    assert_eq!(
        env_value(c, "GOTO_OAUTH_ALLOWED_ENDPOINT_HOSTS").as_deref(),
        Some("authentication.logmeininc.com,auth.eu.example.com:8443")
    );
    assert_eq!(
        env_value(c, "GOTO_OAUTH_LOG_FORMAT").as_deref(),
        Some("text")
    );
    assert_eq!(
        env_value(c, "RUST_LOG").as_deref(),
        Some("goto_oauth_operator=debug,info")
    );
}

#[test]
fn helm_refuses_bad_values_and_honours_crds_install() {
    let Some(helm_bin) = tool("helm", "helm_refuses_bad_values_and_honours_crds_install") else {
        return;
    };
    let base = ["template", RELEASE, CHART, "--namespace", OPERATOR_NS];
    let run = |extra: &[&str]| helm(&helm_bin, &[&base[..], extra].concat());

    let (ok, _, stderr) = run(&[]);
    assert!(
        !ok && stderr.contains("publicUrl is required"),
        "publicUrl is required:\n{stderr}"
    );
    let (ok, _, stderr) = run(&["--set", "publicUrl=http://goto-oauth.example.com"]);
    assert!(!ok, "plain-http public URL refused:\n{stderr}");
    let (ok, _, stderr) = run(&[
        "--set",
        &format!("publicUrl={PUBLIC_URL}"),
        "--set",
        "replicaCount=3",
        "--set",
        "leaderElection.enabled=false",
    ]);
    assert!(
        !ok && stderr.contains("leaderElection"),
        "several replicas need leader election:\n{stderr}"
    );
    let (ok, _, stderr) = run(&[
        "--set",
        &format!("publicUrl={PUBLIC_URL}"),
        "--set",
        "imagePullPolicy=Always",
    ]);
    assert!(
        !ok,
        "unknown top-level value refused by values.schema.json:\n{stderr}"
    );
    for entry in [
        "https://auth.eu.example.com",
        "*.example.com",
        "auth.eu.example.com.",
        "auth.eu.example.com/oauth",
        "user@auth.eu.example.com",
    ] {
        let (ok, _, stderr) = run(&[
            "--set",
            &format!("publicUrl={PUBLIC_URL}"),
            "--set-json",
            &format!("allowedEndpointHosts=[{entry:?}]"),
        ]);
        assert!(
            !ok && stderr.contains("allowedEndpointHosts"),
            "allowedEndpointHosts entry {entry:?} refused by values.schema.json:\n{stderr}"
        );
    }

    let docs = helm_template(
        &helm_bin,
        &[
            "--set",
            &format!("publicUrl={PUBLIC_URL}"),
            "--set",
            "crds.install=false",
        ],
    );
    assert_eq!(
        of_kind(&docs, "CustomResourceDefinition").count(),
        0,
        "crds.install=false renders no CRD"
    );
    let docs = helm_template(
        &helm_bin,
        &[
            "--set",
            &format!("publicUrl={PUBLIC_URL}"),
            "--set",
            "replicaCount=1",
            "--set",
            "leaderElection.enabled=false",
        ],
    );
    let config =
        check_operator_deployment(of_kind(&docs, "Deployment").next().expect("Deployment"));
    assert!(!config.leader_election);
    check_rbac(&docs, &config);
    assert!(
        !docs
            .iter()
            .any(|d| d.value.to_string().contains("coordination.k8s.io")),
        "no Lease permissions without leader election"
    );
    assert_eq!(
        of_kind(&docs, "PodDisruptionBudget").count(),
        0,
        "no PDB for a single replica"
    );
    assert!(
        !Path::new(&root().join(CHART).join("crds")).exists(),
        "the CRD must stay out of Helm's crds/ dir"
    );
}

/// Each document as kubectl reads it, without a server (`label --local` decodes with kubectl's
/// YAML reader and prints the objects back).
fn kubectl_read(kubectl: &Path, file: &Path) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").expect("kubeconfig");
    let out = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["label", "--local", "-o", "json", "-f"])
        .arg(file)
        .arg("goto-oauth.dev/kubectl-check=1")
        .env_remove("KUBECONFIG")
        .env("HOME", dir.path())
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl cannot read {}:\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut values: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .map(|v| v.expect("kubectl prints JSON"))
        .collect();
    if values.len() == 1 && values[0]["kind"] == "List" {
        values = values[0]["items"].as_array().cloned().unwrap_or_default();
    }
    for value in &mut values {
        let meta = value["metadata"].as_object_mut().expect("metadata");
        let labels = meta
            .get_mut("labels")
            .and_then(Value::as_object_mut)
            .expect("labels");
        labels.remove("goto-oauth.dev/kubectl-check");
        if labels.is_empty() {
            meta.remove("labels");
        }
    }
    values
}

#[test]
fn kubectl_reads_every_file_as_the_checks_do() {
    let Some(kubectl) = tool("kubectl", "kubectl_reads_every_file_as_the_checks_do") else {
        return;
    };
    let files: Vec<PathBuf> = ["deploy", "deploy/examples", "deploy/namespaced", "crds"]
        .iter()
        .flat_map(|d| yaml_files(d))
        .collect();
    for file in files {
        let ours: Vec<Value> = load_file(&file).into_iter().map(|d| d.value).collect();
        let theirs = kubectl_read(&kubectl, &file);
        assert_eq!(
            theirs,
            ours,
            "kubectl and serde_yaml read {} differently",
            file.display()
        );
    }
}

/// The dependency layer of the Dockerfile sees only what its COPY lines before the first build
/// bring in (Cargo.toml, Cargo.lock, the workspace members' manifests) plus the placeholders its
/// stub RUN line creates. Cargo refuses a manifest whose declared targets (a `[[bench]]`, say)
/// or workspace members are missing, which would break `docker build` at its first cargo step;
/// those COPY lines and that RUN line are replayed here, against the current manifests, to catch
/// it without Docker.
#[test]
fn dockerfile_dependency_layer_satisfies_cargo() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let instructions = dockerfile_instructions(&text);
    let stub_at = instructions
        .iter()
        .position(|(op, args)| {
            op == "RUN" && args.contains("fn main() {}") && !args.contains("cargo ")
        })
        .expect("a RUN line that only writes placeholder sources");
    let stub = instructions[stub_at].1.clone();
    let dir = tempfile::tempdir().expect("tempdir");
    let copies = instructions[..stub_at]
        .iter()
        .filter(|(op, args)| op == "COPY" && !args.starts_with("--"));
    for (_, args) in copies {
        let words: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        for source in sources {
            let target = if dest.ends_with('/') {
                let name = Path::new(source).file_name().expect("a file name");
                dir.path().join(dest).join(name)
            } else {
                dir.path().join(dest)
            };
            std::fs::create_dir_all(target.parent().expect("a parent")).expect("mkdir");
            std::fs::copy(root().join(source), &target)
                .unwrap_or_else(|e| panic!("COPY {source} {dest}: {e}"));
        }
    }
    assert!(
        dir.path().join("Cargo.lock").is_file(),
        "the dependency layer has Cargo.lock"
    );
    let status = Command::new("sh")
        .args(["-ec", &stub])
        .current_dir(dir.path())
        .status()
        .expect("run sh");
    assert!(status.success(), "the placeholder RUN line fails: {stub}");
    assert!(dir.path().join("src/main.rs").is_file() && dir.path().join("src/lib.rs").is_file());

    // A bin that does not exist: cargo parses the whole manifest, then stops without building.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--offline", "--locked", "--bin", "no-such-bin"])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .expect("run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no bin target named"),
        "cargo rejects the Docker dependency layer (add a placeholder for the new target):\n{stderr}"
    );
}

#[test]
fn helm_renders_alerts_and_dashboard_only_when_enabled_with_their_labels() {
    let Some(helm_bin) = tool(
        "helm",
        "helm_renders_alerts_and_dashboard_only_when_enabled_with_their_labels",
    ) else {
        return;
    };
    let url = format!("publicUrl={PUBLIC_URL}");
    let docs = helm_template(
        &helm_bin,
        &[
            "--set",
            &url,
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.additionalLabels.release=prometheus",
            "--set",
            "metrics.prometheusRule.refreshTokenMaxAgeDays=20",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "metrics.grafanaDashboard.namespace=monitoring",
            "--set",
            "metrics.grafanaDashboard.annotations.grafana_folder=GoTo",
        ],
    );
    assert_valid(&docs, true);
    let rule = one::<Value>(&docs, "PrometheusRule", RELEASE);
    assert_eq!(rule["metadata"]["namespace"], OPERATOR_NS);
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(
        rule["metadata"]["labels"]["app.kubernetes.io/part-of"],
        "goto-oauth-operator"
    );
    let rules = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules");
    let alerts: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    for alert in [
        "GoToOAuthClientNotReady",
        "GoToOAuthReauthorizationRequired",
        "GoToOAuthAccessTokenExpiringWhileRefreshFails",
        "GoToOAuthRefreshFailureRatioHigh",
        "GoToOAuthRefreshTokenOld",
    ] {
        assert!(alerts.contains(alert), "{alert} missing: {alerts:?}");
    }
    let old = rules
        .iter()
        .find(|r| r["alert"] == "GoToOAuthRefreshTokenOld")
        .expect("GoToOAuthRefreshTokenOld");
    assert!(
        old["expr"]
            .as_str()
            .is_some_and(|e| e.contains("> 20 * 86400")),
        "the configured age is used: {}",
        old["expr"]
    );
    for r in rules {
        let runbook = r["annotations"]["runbook"].as_str().unwrap_or_default();
        assert!(
            runbook.contains("kubectl"),
            "{}: the runbook says what to run: {runbook}",
            r["alert"]
        );
        let summary = r["annotations"]["summary"].as_str().unwrap_or_default();
        assert!(
            !summary.contains("{{`") && !summary.contains("`}}"),
            "Prometheus templates are passed through, not Helm's quoting: {summary}"
        );
    }

    let dashboard: ConfigMap = one(&docs, "ConfigMap", &format!("{RELEASE}-dashboard"));
    assert_eq!(dashboard.metadata.namespace.as_deref(), Some("monitoring"));
    let labels = dashboard.metadata.labels.unwrap_or_default();
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1")
    );
    assert_eq!(
        dashboard
            .metadata
            .annotations
            .unwrap_or_default()
            .get("grafana_folder")
            .map(String::as_str),
        Some("GoTo")
    );
    let json = dashboard
        .data
        .unwrap_or_default()
        .remove("goto-oauth-operator.json")
        .expect("dashboard JSON key");
    let parsed: Value = serde_json::from_str(&json).expect("the dashboard is valid JSON");
    let file: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root()
                .join(CHART)
                .join("dashboards/goto-oauth-operator.json"),
        )
        .expect("dashboard file"),
    )
    .expect("the dashboard file is valid JSON");
    assert_eq!(parsed, file, "the ConfigMap carries the file unchanged");

    // Another sidecar label; the default namespace is the release's.
    let docs = helm_template(
        &helm_bin,
        &[
            "--set",
            &url,
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "metrics.grafanaDashboard.label=dashboards",
            "--set",
            "metrics.grafanaDashboard.labelValue=goto",
        ],
    );
    assert_eq!(of_kind(&docs, "PrometheusRule").count(), 0);
    let dashboard: ConfigMap = one(&docs, "ConfigMap", &format!("{RELEASE}-dashboard"));
    assert_eq!(dashboard.metadata.namespace.as_deref(), Some(OPERATOR_NS));
    let labels = dashboard.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("dashboards").map(String::as_str), Some("goto"));
    assert!(!labels.contains_key("grafana_dashboard"));
}

/// The Lease timings: the chart's defaults are the binary's, the values reach the operator's
/// environment in the form its flags parse, and combinations the operator would refuse at start
/// are refused at install.
#[test]
fn helm_lease_timings_reach_the_operator_and_impossible_ones_are_refused() {
    let Some(helm_bin) = tool(
        "helm",
        "helm_lease_timings_reach_the_operator_and_impossible_ones_are_refused",
    ) else {
        return;
    };
    let timing_env = |docs: &[Doc]| {
        let deployment: Deployment = one(docs, "Deployment", RELEASE);
        let c = &deployment.spec.template.spec.expect("pod spec").containers[0];
        let parse = |name: &str| {
            let raw = env_value(c, name).unwrap_or_else(|| panic!("{name} set"));
            humantime::parse_duration(&raw).unwrap_or_else(|e| panic!("{name}={raw}: {e}"))
        };
        Timing::new(
            parse("GOTO_OAUTH_LEASE_DURATION"),
            parse("GOTO_OAUTH_LEASE_RENEW_BEFORE"),
            parse("GOTO_OAUTH_LEASE_RETRY_PERIOD"),
        )
    };
    let public_url = format!("publicUrl={PUBLIC_URL}");
    let docs = helm_template(&helm_bin, &["--set", &public_url]);
    assert_eq!(
        timing_env(&docs),
        Ok(Timing::DEFAULT),
        "chart defaults = flag defaults"
    );
    let docs = helm_template(
        &helm_bin,
        &[
            "--set",
            &public_url,
            "--set",
            "leaderElection.leaseDuration=30s",
            "--set",
            "leaderElection.renewBefore=10s",
            "--set",
            "leaderElection.retryPeriod=500ms",
        ],
    );
    assert_eq!(
        timing_env(&docs),
        Timing::new(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(10),
            std::time::Duration::from_millis(500)
        )
    );

    let base = ["template", RELEASE, CHART, "--namespace", OPERATOR_NS];
    for (value, why) in [
        ("leaderElection.renewBefore=15s", "must be shorter than"),
        ("leaderElection.leaseDuration=1500ms", "leaseDuration"),
        ("leaderElection.leaseDuration=15", "leaseDuration"),
        ("leaderElection.retryPeriod=fast", "retryPeriod"),
    ] {
        let (ok, _, stderr) = helm(
            &helm_bin,
            &[&base[..], &["--set", &public_url, "--set", value]].concat(),
        );
        assert!(!ok && stderr.contains(why), "{value} refused:\n{stderr}");
    }
}

/// The plain manifest documents the Lease timing variables next to the Lease name.
#[test]
fn deploy_manifest_documents_the_lease_timings() {
    let text = std::fs::read_to_string(root().join("deploy/30-deployment.yaml")).unwrap();
    for name in [
        "GOTO_OAUTH_LEASE_DURATION",
        "GOTO_OAUTH_LEASE_RENEW_BEFORE",
        "GOTO_OAUTH_LEASE_RETRY_PERIOD",
    ] {
        assert!(
            text.contains(&format!("# - name: {name}")),
            "{name} documented in deploy/30-deployment.yaml"
        );
    }
}
