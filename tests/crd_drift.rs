//! The committed CRD YAML (in `crds/` and the Helm chart) must equal what
//! `goto-oauth-operator crd` generates. Regenerate with:
//! `cargo run -- crd > crds/gotooauthclients.goto-oauth.dev.yaml` and copy it into the chart.

use std::path::Path;

const CRD_FILE: &str = "crds/gotooauthclients.goto-oauth.dev.yaml";
const CHART_CRD_FILES: [&str; 2] = [
    "charts/goto-oauth-operator/crds/gotooauthclients.goto-oauth.dev.yaml",
    "charts/goto-oauth-operator/files/crds/gotooauthclients.goto-oauth.dev.yaml",
];

fn generated() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_goto-oauth-operator"))
        .arg("crd")
        .output()
        .expect("run goto-oauth-operator crd");
    assert!(
        out.status.success(),
        "crd command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn committed_crd_matches_generated() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = generated();
    let committed = std::fs::read_to_string(root.join(CRD_FILE)).expect("crds/ file exists");
    assert!(
        committed == generated,
        "{CRD_FILE} is stale: run `cargo run -- crd > {CRD_FILE}`"
    );
    let chart_copies: Vec<_> = CHART_CRD_FILES
        .iter()
        .filter(|p| root.join(p).exists())
        .collect();
    assert!(!chart_copies.is_empty(), "the Helm chart carries the CRD");
    for path in chart_copies {
        let copy = std::fs::read_to_string(root.join(path)).unwrap();
        assert!(copy == generated, "{path} is stale: copy {CRD_FILE} there");
    }
}

#[test]
fn crd_schema_is_structural() {
    let crd: serde_json::Value = serde_yaml::from_str(&generated()).expect("YAML");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "gotoclient");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<_> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Ready", "Expires", "Age"]);
    // Walk the schema: every node has a type (or x-kubernetes-int-or-string /
    // x-kubernetes-preserve-unknown-fields) and nothing a structural schema forbids.
    fn walk(path: &str, node: &serde_json::Value) {
        let obj = node
            .as_object()
            .unwrap_or_else(|| panic!("{path} is not an object"));
        for forbidden in ["$ref", "definitions", "$defs", "oneOf", "allOf", "not"] {
            assert!(!obj.contains_key(forbidden), "{path} uses {forbidden}");
        }
        if let Some(any_of) = obj.get("anyOf") {
            panic!("{path} uses anyOf: {any_of}");
        }
        assert!(
            obj.contains_key("type")
                || obj.contains_key("x-kubernetes-int-or-string")
                || obj.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path} has no type"
        );
        if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v);
            }
        }
        if let Some(items) = obj.get("items") {
            walk(&format!("{path}[]"), items);
        }
        if let Some(ap) = obj.get("additionalProperties").filter(|a| a.is_object()) {
            walk(&format!("{path}{{}}"), ap);
        }
    }
    let schema = &version["schema"]["openAPIV3Schema"];
    walk("", schema);
    let spec = &schema["properties"]["spec"];
    assert_eq!(
        spec["required"],
        serde_json::json!(["clientId", "clientSecretRef"])
    );
    for field in [
        "clientId",
        "clientSecretRef",
        "redirectUri",
        "scopes",
        "secretName",
        "refreshBefore",
        "endpoints",
        "secretTemplate",
    ] {
        let description = spec["properties"][field]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(
            !description.is_empty(),
            "spec.{field} has no description for kubectl explain"
        );
    }
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
}
