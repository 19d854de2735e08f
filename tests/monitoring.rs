//! The chart's alerts and dashboard query only metrics and labels the operator really exposes.
//!
//! A renamed metric or label would leave a PrometheusRule that never fires and a dashboard that
//! shows "No data", and nothing else would notice. This test renders the chart with helm (rules
//! and dashboard on), pulls every PromQL expression out of the PrometheusRule and the dashboard
//! JSON, and compares the `goto_oauth_*` names and the labels they use (matchers, `by`/`on`/…
//! lists, `label_values`) with the exposition of an in-process operator that has driven a client
//! through consent and a refresh, so every per-client series exists. There is no promtool here:
//! the small tokenizer below only needs to find names and labels, not to evaluate PromQL.
//!
//! helm comes from `.tools/bin`; `GOTO_OAUTH_SKIP_TOOL_TESTS=1` turns a missing helm into a
//! visible skip, as in `tests/manifests.rs`.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
};

use common::{eventually, in_process_stack, metrics::metric};
use goto_oauth_operator::{clock::Clock, conditions::reason, resource::FORCE_REFRESH_ANNOTATION};
use kube::api::{Patch, PatchParams};
use serde_json::Value;

const CHART: &str = "charts/goto-oauth-operator";
const PREFIX: &str = "goto_oauth_";
/// Labels Prometheus adds to every scraped series (the target's), which joins may use.
const TARGET_LABELS: [&str; 4] = ["instance", "job", "pod", "service"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ------------------------------------------------------------------------------------------------
// PromQL: the names and labels an expression uses
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
    Op(String),
}

/// Splits PromQL into identifiers, strings (contents dropped), label-matcher operators and
/// punctuation. Range selectors (`[5m]`, `[$__rate_interval]`), numbers and Grafana variables
/// (`$namespace`) are skipped: they name no metric or label.
fn tokenize(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            tokens.push(Token::Str);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_{}".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else if let Some(op) = ["=~", "!~", "!=", "=="]
            .iter()
            .find(|op| expr_at(&chars, i, op))
        {
            tokens.push(Token::Op((*op).to_string()));
            i += 2;
        } else if c == '=' {
            tokens.push(Token::Op("=".into()));
            i += 1;
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

fn expr_at(chars: &[char], i: usize, s: &str) -> bool {
    s.chars()
        .enumerate()
        .all(|(k, c)| chars.get(i + k) == Some(&c))
}

/// What one expression uses.
#[derive(Debug, Default, PartialEq)]
struct Uses {
    /// Each metric with the labels its selectors match on (and `label_values` reads).
    metrics: BTreeMap<String, BTreeSet<String>>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left` and `group_right` lists.
    grouping: BTreeSet<String>,
}

/// The label names of a `{…}` selector starting at `tokens[i]` (the brace) and the index after it.
fn selector_labels(tokens: &[Token], mut i: usize) -> (BTreeSet<String>, usize) {
    let mut labels = BTreeSet::new();
    i += 1;
    while i < tokens.len() && tokens[i] != Token::Punct('}') {
        if let (Token::Ident(label), Some(Token::Op(_))) = (&tokens[i], tokens.get(i + 1)) {
            labels.insert(label.clone());
        }
        i += 1;
    }
    (labels, i + 1)
}

fn uses(expr: &str) -> Uses {
    let tokens = tokenize(expr);
    let mut out = Uses::default();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(name) if name.starts_with(PREFIX) => {
                let entry = out.metrics.entry(name.clone()).or_default();
                i += 1;
                if tokens.get(i) == Some(&Token::Punct('{')) {
                    let (labels, next) = selector_labels(&tokens, i);
                    entry.extend(labels);
                    i = next;
                }
            }
            Token::Ident(word)
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) && tokens.get(i + 1) == Some(&Token::Punct('(')) =>
            {
                i += 2;
                while i < tokens.len() && tokens[i] != Token::Punct(')') {
                    if let Token::Ident(label) = &tokens[i] {
                        out.grouping.insert(label.clone());
                    }
                    i += 1;
                }
            }
            // Grafana's `label_values(metric{…}, label)`.
            Token::Ident(word)
                if word == "label_values" && tokens.get(i + 1) == Some(&Token::Punct('(')) =>
            {
                let Some(Token::Ident(name)) = tokens.get(i + 2) else {
                    i += 1;
                    continue;
                };
                let mut j = i + 3;
                let mut labels = BTreeSet::new();
                if tokens.get(j) == Some(&Token::Punct('{')) {
                    let (l, next) = selector_labels(&tokens, j);
                    labels = l;
                    j = next;
                }
                if let (Some(Token::Punct(',')), Some(Token::Ident(label))) =
                    (tokens.get(j), tokens.get(j + 1))
                {
                    labels.insert(label.clone());
                    j += 2;
                }
                out.metrics.entry(name.clone()).or_default().extend(labels);
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The exposition: which series exist, with which labels
// ------------------------------------------------------------------------------------------------

/// Sample names (`_total`, `_bucket`, … as exposed) and the label names seen on each.
fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, _)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let entry = out.entry(name.to_string()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            if let Some((k, _)) = pair.split_once('=') {
                entry.insert(k.to_string());
            }
        }
    }
    out
}

/// Every problem of `expr` against what is exposed; empty when all is well.
fn check(source: &str, expr: &str, exposed: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let used = uses(expr);
    let mut problems = Vec::new();
    let mut available: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for (name, labels) in &used.metrics {
        let Some(has) = exposed.get(name) else {
            problems.push(format!("{source}: metric {name} is not exposed"));
            continue;
        };
        available.extend(has.iter().map(String::as_str));
        for label in labels.iter().filter(|l| !has.contains(*l)) {
            problems.push(format!("{source}: {name} has no label {label:?}"));
        }
    }
    for label in &used.grouping {
        if !available.contains(label.as_str()) {
            problems.push(format!(
                "{source}: label {label:?} of a by/on list is on none of {:?}",
                used.metrics.keys().collect::<Vec<_>>()
            ));
        }
    }
    problems
}

#[test]
fn tokenizer_finds_names_labels_and_histogram_series() {
    let u = uses(
        r#"histogram_quantile(0.95, sum by (le, grant_type) (rate(goto_oauth_token_request_duration_seconds_bucket{result!="x",namespace=~"$namespace"}[$__rate_interval])))
           / on (instance) group_left goto_oauth_leader == 1 and max without (pod) (goto_oauth_client_ready) # goto_oauth_comment"#,
    );
    assert_eq!(
        u.metrics,
        BTreeMap::from([
            (
                "goto_oauth_token_request_duration_seconds_bucket".to_string(),
                BTreeSet::from(["result".to_string(), "namespace".to_string()])
            ),
            ("goto_oauth_leader".to_string(), BTreeSet::new()),
            ("goto_oauth_client_ready".to_string(), BTreeSet::new()),
        ])
    );
    assert_eq!(
        u.grouping,
        BTreeSet::from(["le", "grant_type", "instance", "pod"].map(String::from))
    );
    let u = uses("label_values(goto_oauth_client_ready{phase=\"x\"}, namespace)");
    assert_eq!(
        u.metrics["goto_oauth_client_ready"],
        BTreeSet::from(["phase".to_string(), "namespace".to_string()])
    );

    let exposed = exposed(
        "# TYPE goto_oauth_client_ready gauge\ngoto_oauth_client_ready{namespace=\"a\",name=\"b\"} 1\n\
         goto_oauth_refresh_total{namespace=\"a\",name=\"b\",result=\"success\"} 2\n",
    );
    assert!(
        check(
            "ok",
            "sum by (namespace) (goto_oauth_refresh_total{result=\"x\"})",
            &exposed
        )
        .is_empty()
    );
    assert_eq!(
        check(
            "t",
            "goto_oauth_refresh{phase=\"x\"} and goto_oauth_client_ready{phase=\"y\"}",
            &exposed
        ),
        vec![
            "t: goto_oauth_client_ready has no label \"phase\"".to_string(),
            "t: metric goto_oauth_refresh is not exposed".to_string(),
        ]
    );
    assert_eq!(
        check("t", "max by (result) (goto_oauth_client_ready)", &exposed).len(),
        1
    );
}

// ------------------------------------------------------------------------------------------------
// The chart, rendered
// ------------------------------------------------------------------------------------------------

/// Every expression of the rendered PrometheusRule and dashboard, with where it came from.
/// `None` when helm is missing and GOTO_OAUTH_SKIP_TOOL_TESTS=1.
fn chart_expressions() -> Option<Vec<(String, String)>> {
    let helm = root().join(".tools/bin/helm");
    if !helm.is_file() {
        if std::env::var("GOTO_OAUTH_SKIP_TOOL_TESTS").as_deref() == Ok("1") {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIPPED monitoring: helm not installed and GOTO_OAUTH_SKIP_TOOL_TESTS=1\n",
            );
            return None;
        }
        panic!(
            "{} is missing: run scripts/install-test-deps.sh (or set GOTO_OAUTH_SKIP_TOOL_TESTS=1 to skip)",
            helm.display()
        );
    }
    let home = tempfile::tempdir().expect("tempdir");
    let kubeconfig = home.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").expect("kubeconfig");
    let out = Command::new(&helm)
        .args([
            "template",
            "goto-oauth-operator",
            CHART,
            "--namespace",
            "goto-oauth-operator",
            "--set",
            "publicUrl=https://goto-oauth.example.com",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
        ])
        .current_dir(root())
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut exprs = Vec::new();
    let (mut rules, mut dashboards) = (0, 0);
    for de in serde_yaml::Deserializer::from_str(&text) {
        let doc = <Value as serde::Deserialize>::deserialize(de).expect("YAML");
        match doc["kind"].as_str() {
            Some("PrometheusRule") => {
                for group in doc["spec"]["groups"].as_array().into_iter().flatten() {
                    for rule in group["rules"].as_array().into_iter().flatten() {
                        rules += 1;
                        let name = rule["alert"].as_str().or(rule["record"].as_str());
                        exprs.push((
                            format!("alert {}", name.unwrap_or("?")),
                            rule["expr"].as_str().expect("expr").to_string(),
                        ));
                    }
                }
            }
            Some("ConfigMap") => {
                for (key, json) in doc["data"].as_object().into_iter().flatten() {
                    dashboards += 1;
                    let dashboard: Value = serde_json::from_str(json.as_str().expect("string"))
                        .unwrap_or_else(|e| panic!("dashboard {key} is not valid JSON: {e}"));
                    dashboard_expressions(&dashboard, key, &mut exprs);
                }
            }
            _ => {}
        }
    }
    assert!(
        rules >= 5,
        "the PrometheusRule was rendered ({rules} rules)"
    );
    assert_eq!(dashboards, 1, "the dashboard ConfigMap was rendered");
    Some(exprs)
}

/// Panel targets' `expr` (rows' nested panels too) and the templating variables' queries.
fn dashboard_expressions(dashboard: &Value, key: &str, out: &mut Vec<(String, String)>) {
    fn panels(list: &Value, key: &str, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((format!("{key} panel {title:?}"), expr.to_string()));
                }
            }
            panels(&panel["panels"], key, out);
        }
    }
    let before = out.len();
    panels(&dashboard["panels"], key, out);
    assert!(out.len() > before, "{key} has panel queries");
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = match &variable["query"] {
            Value::Object(q) => q.get("query").and_then(Value::as_str),
            Value::String(q) if variable["type"] == "query" => Some(q.as_str()),
            _ => None,
        };
        if let Some(query) = query {
            let name = variable["name"].as_str().unwrap_or("?");
            out.push((format!("{key} variable {name}"), query.to_string()));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_dashboard_use_only_exposed_metrics_and_labels() {
    let Some(exprs) = chart_expressions() else {
        return;
    };

    // A client consented and refreshed: every per-client and token-request series exists.
    let (cluster, provider, op) = in_process_stack(Clock::system(), |o| o).await;
    cluster
        .create_client("demo", provider.spec(serde_json::json!({})))
        .await;
    let link = cluster.authorization_link("demo").await;
    let (_, page) = provider.allow(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    cluster
        .wait_condition("demo", "Ready", "True", reason::AUTHORIZED)
        .await;
    cluster
        .clients()
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {FORCE_REFRESH_ANNOTATION: "1"}}
            })),
        )
        .await
        .expect("annotate");
    let text = eventually("a refresh counted in /metrics", || async {
        let text = op.metrics.render();
        let refreshed = metric(
            &text,
            "goto_oauth_refresh_total",
            &[("name", "demo"), ("result", "success")],
        );
        let obtained = metric(
            &text,
            "goto_oauth_refresh_token_obtained_timestamp_seconds",
            &[("name", "demo")],
        );
        (refreshed == Some(1.0) && obtained.is_some()).then_some(text)
    })
    .await;
    op.stop().await;

    let exposed = exposed(&text);
    let problems: Vec<String> = exprs
        .iter()
        .flat_map(|(source, expr)| check(source, expr, &exposed))
        .collect();
    assert!(
        problems.is_empty(),
        "the chart queries what the operator does not expose:\n{}\n\nexposed:\n{exposed:#?}",
        problems.join("\n")
    );
    // The check saw the metrics the brief asks the alerts and the dashboard to cover.
    let used: BTreeSet<String> = exprs
        .iter()
        .flat_map(|(_, e)| uses(e).metrics.into_keys())
        .collect();
    for name in [
        "goto_oauth_client_ready",
        "goto_oauth_client_authorization_phase",
        "goto_oauth_token_expiry_timestamp_seconds",
        "goto_oauth_refresh_total",
        "goto_oauth_refresh_token_obtained_timestamp_seconds",
        "goto_oauth_token_request_duration_seconds_bucket",
        "goto_oauth_leader",
    ] {
        assert!(used.contains(name), "{name} is used by no alert or panel");
    }
    // Every replica exports the per-client gauges from its own watch, leader or not: a query
    // combines them across replicas (a lagging one must not raise or hide an alert) and does
    // not pick the leader's, which would leave no data while no replica leads.
    for (source, expr) in &exprs {
        let per_client = [
            "goto_oauth_client_ready",
            "goto_oauth_client_authorization_phase",
            "goto_oauth_token_expiry_timestamp_seconds",
            "goto_oauth_refresh_token_obtained_timestamp_seconds",
        ];
        // A template variable's `label_values(...)` lists values and needs no combining.
        if per_client.iter().any(|m| expr.contains(m)) && !expr.starts_with("label_values(") {
            assert!(
                expr.contains("max by (namespace, name)")
                    || expr.contains("min by (namespace, name)"),
                "{source}: per-client gauges are combined across replicas: {expr}"
            );
            assert!(
                !expr.contains("goto_oauth_leader"),
                "{source}: per-client gauges come from every replica, not only the leader: {expr}"
            );
        }
    }
}
