//! Conformance of the in-memory API server (`fake_apiserver`) with the recorded
//! kube-apiserver transcripts: wire-level checks with reqwest, client-level ones with kube, and
//! kube-runtime's watcher/Controller plus kube-lease-manager running against it unmodified.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{CustomResource, CustomResourceExt, Resource, ResourceExt};
use kube_fault_proxy::{Fault, FaultProxy};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "conformance.test",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus"
)]
struct WidgetSpec {
    size: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, JsonSchema)]
struct WidgetStatus {
    observed: Option<i64>,
}

const SECRETS: &str = "/api/v1/namespaces/default/secrets";
const WIDGETS: &str = "/apis/conformance.test/v1/namespaces/default/widgets";

struct Raw {
    http: reqwest::Client,
    base: String,
}

impl Raw {
    fn new(server: &FakeApiServer) -> Self {
        Self::at(server.url())
    }
    /// Requests to `base` (the proxy in front of the server, where the log is kept).
    fn at(base: String) -> Self {
        Self {
            http: reqwest::Client::new(),
            base,
        }
    }
    async fn send(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: Option<String>,
    ) -> (u16, String, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = resp.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        let _ = ctype;
        (status, text, json)
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        let (s, _, j) = self.send("GET", path, None, None).await;
        (s, j)
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, _, j) = self
            .send(
                "POST",
                path,
                Some("application/json"),
                Some(body.to_string()),
            )
            .await;
        (s, j)
    }
    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        let (s, _, j) = self
            .send(
                "PUT",
                path,
                Some("application/json"),
                Some(body.to_string()),
            )
            .await;
        (s, j)
    }
    async fn patch(&self, path: &str, ct: &str, body: &str) -> (u16, Value) {
        let (s, _, j) = self
            .send("PATCH", path, Some(ct), Some(body.to_owned()))
            .await;
        (s, j)
    }
    async fn delete(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let ct = body.as_ref().map(|_| "application/json");
        let (s, _, j) = self
            .send("DELETE", path, ct, body.map(|b| b.to_string()))
            .await;
        (s, j)
    }
    /// Read a whole watch stream (it must end by itself) as (arrival, event) lines.
    async fn watch(&self, path_and_query: &str) -> Vec<(Duration, Value)> {
        let started = tokio::time::Instant::now();
        let mut resp = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.unwrap() {
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                out.push((started.elapsed(), serde_json::from_slice(&line).unwrap()));
            }
        }
        assert!(buf.is_empty(), "every event ends with a newline");
        out
    }
}

fn rv(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn install_widget_crd(server: &FakeApiServer) {
    let raw = Raw::new(server);
    let crd = serde_json::to_value(Widget::crd()).unwrap();
    let (s, body) = raw
        .post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            crd,
        )
        .await;
    assert_eq!(s, 201, "{body}");
}

#[tokio::test]
async fn secret_create_get_and_errors() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let (s, created) = raw
        .post(
            SECRETS,
            json!({"metadata": {"name": "s1", "labels": {"app": "x"}}, "data": {"a": "YQ=="}, "stringData": {"b": "bee"}}),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(created["kind"], "Secret");
    assert_eq!(created["apiVersion"], "v1");
    assert_eq!(created["type"], "Opaque");
    assert_eq!(created["data"], json!({"a": "YQ==", "b": "YmVl"}));
    assert!(created.get("stringData").is_none());
    assert!(
        created["metadata"].get("generation").is_none(),
        "Secrets have no generation"
    );
    let uid = created["metadata"]["uid"].as_str().unwrap();
    assert_eq!(uid.len(), 36);
    assert_eq!(&uid[14..15], "4", "UUID v4");
    let ts = created["metadata"]["creationTimestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 20, "{ts}");
    assert_eq!(
        created["metadata"]["managedFields"][0]["operation"],
        "Update"
    );
    assert_eq!(
        created["metadata"]["managedFields"][0]["manager"],
        "unknown"
    );

    let (s, again) = raw.post(SECRETS, json!({"metadata": {"name": "s1"}})).await;
    assert_eq!(s, 409);
    assert_eq!(
        again,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "secrets \"s1\" already exists", "reason": "AlreadyExists",
            "details": {"name": "s1", "kind": "secrets"}, "code": 409})
    );
    let (s, missing) = raw.get(&format!("{SECRETS}/nope")).await;
    assert_eq!(s, 404);
    assert_eq!(
        missing["details"],
        json!({"name": "nope", "kind": "secrets"})
    );
    assert_eq!(missing["message"], "secrets \"nope\" not found");

    let (s, ns_missing) = raw
        .post(
            "/api/v1/namespaces/no-such-ns/secrets",
            json!({"metadata": {"name": "x"}}),
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(ns_missing["message"], "namespaces \"no-such-ns\" not found");
    assert_eq!(
        ns_missing["details"],
        json!({"name": "no-such-ns", "kind": "namespaces"})
    );
    let (s, empty) = raw.get("/api/v1/namespaces/no-such-ns/secrets").await;
    assert_eq!(s, 200);
    assert_eq!(empty["items"], json!([]));

    let (s, generated) = raw
        .post(SECRETS, json!({"metadata": {"generateName": "gen-"}}))
        .await;
    assert_eq!(s, 201);
    let name = generated["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");
    let (s, neither) = raw.post(SECRETS, json!({"metadata": {}})).await;
    assert_eq!(s, 422);
    assert_eq!(neither["details"]["causes"][0]["field"], "metadata.name");

    // Lists: resourceVersion, selectors, bad selectors.
    let (s, list) = raw.get(&format!("{SECRETS}?labelSelector=app%3Dx")).await;
    assert_eq!(s, 200);
    assert_eq!(list["kind"], "SecretList");
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert!(
        list["items"][0].get("kind").is_none(),
        "typed list items carry no kind"
    );
    assert!(rv(&list) >= rv(&created));
    for (sel, n) in [
        ("app", 1),
        ("!app", 1),
        ("app in (x,y)", 1),
        ("app notin (x)", 1),
        ("app!=x", 1),
    ] {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("labelSelector", sel)
            .finish();
        let (_, l) = raw.get(&format!("{SECRETS}?{q}")).await;
        assert_eq!(l["items"].as_array().unwrap().len(), n, "{sel}");
    }
    let (s, bad) = raw
        .get(&format!("{SECRETS}?fieldSelector=data.foo%3Dbar"))
        .await;
    assert_eq!(
        (s, bad["message"].as_str().unwrap()),
        (400, "field label not supported: data.foo")
    );
    let (s, bad) = raw
        .get(&format!("{SECRETS}?labelSelector=a%3D%3D%3Db%21"))
        .await;
    assert_eq!(s, 400);
    assert_eq!(
        bad["message"],
        "unable to parse requirement: found '=', expected: identifier"
    );
    let (_, by_name) = raw
        .get(&format!("{SECRETS}?fieldSelector=metadata.name%3Ds1"))
        .await;
    assert_eq!(by_name["items"].as_array().unwrap().len(), 1);
    let (_, page) = raw.get(&format!("{SECRETS}?limit=1")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let token = page["metadata"]["continue"].as_str().unwrap();
    assert_eq!(page["metadata"]["remainingItemCount"], 1);
    let (_, page2) = raw
        .get(&format!("{SECRETS}?limit=1&continue={token}"))
        .await;
    assert_eq!(page2["items"].as_array().unwrap().len(), 1);
    assert!(page2["metadata"].get("continue").is_none());
    let (_, all) = raw.get("/api/v1/secrets").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn secret_update_patch_delete() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let path = format!("{SECRETS}/s");
    let (_, created) = raw
        .post(
            SECRETS,
            json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}),
        )
        .await;
    let rv0 = rv(&created);

    let mut body = created.clone();
    body["data"]["k"] = json!("djI=");
    let (s, updated) = raw.put(&path, body.clone()).await;
    assert_eq!(s, 200);
    assert!(rv(&updated) > rv0);
    let (s, stale) = raw.put(&path, body.clone()).await;
    assert_eq!(s, 409);
    assert_eq!(stale["reason"], "Conflict");
    assert_eq!(
        stale["message"],
        "Operation cannot be fulfilled on secrets \"s\": the object has been modified; please apply your changes to the latest version and try again"
    );
    body["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (s, _) = raw.put(&path, body.clone()).await;
    assert_eq!(s, 200, "no resourceVersion: unconditional");
    body["metadata"]["resourceVersion"] = json!("abc");
    let (s, bad_rv) = raw.put(&path, body.clone()).await;
    assert_eq!(s, 500);
    assert!(bad_rv.get("reason").is_none());
    let (s, mismatch) = raw.put(&path, json!({"metadata": {"name": "other"}})).await;
    assert_eq!(s, 400);
    assert_eq!(
        mismatch["message"],
        "the name of the object (other) does not match the name on the URL (s)"
    );

    // Merge patch and its no-op.
    let (s, p1) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"x":"1"}}}"#,
        )
        .await;
    assert_eq!(s, 200);
    let (_, p2) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"x":"1"}}}"#,
        )
        .await;
    assert_eq!(rv(&p1), rv(&p2), "a no-op patch keeps the resourceVersion");
    let (s, _) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"metadata":{"resourceVersion":"1","labels":{"y":"1"}}}"#,
        )
        .await;
    assert_eq!(s, 409, "resourceVersion in a patch is a precondition");
    let (s, bad) = raw
        .patch(&path, "application/merge-patch+json", r#"{"metadata": "#)
        .await;
    assert_eq!(
        (s, bad["message"].as_str().unwrap()),
        (400, "error decoding patch: unexpected end of JSON input")
    );
    let (s, _) = raw
        .patch(
            &format!("{SECRETS}/ghost"),
            "application/merge-patch+json",
            "{}",
        )
        .await;
    assert_eq!(s, 404);

    // JSON patch, including the kube-rs finalizer idiom and a failing test.
    let (s, jp) = raw
        .patch(
            &path,
            "application/json-patch+json",
            r#"[{"op":"test","path":"/metadata/finalizers","value":null},{"op":"add","path":"/metadata/finalizers","value":["a/b"]}]"#,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(jp["metadata"]["finalizers"], json!(["a/b"]));
    let (s, failed) = raw
        .patch(
            &path,
            "application/json-patch+json",
            r#"[{"op":"test","path":"/metadata/labels/x","value":"WRONG"}]"#,
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(failed["details"], json!({}));
    assert_eq!(
        failed["message"],
        "the server rejected our request due to an error in our request"
    );
    let (s, _) = raw
        .patch(&path, "application/json-patch+json", r#"{"op":"add"}"#)
        .await;
    assert_eq!(s, 400);

    // Strategic merge patch merges finalizers; a JSON merge patch replaces them.
    let (_, smp) = raw
        .patch(
            &path,
            "application/strategic-merge-patch+json",
            r#"{"metadata":{"finalizers":["c/d"]}}"#,
        )
        .await;
    assert_eq!(smp["metadata"]["finalizers"], json!(["c/d", "a/b"]));
    let (_, smp) = raw
        .patch(
            &path,
            "application/strategic-merge-patch+json",
            r#"{"metadata":{"$deleteFromPrimitiveList/finalizers":["c/d","a/b"]}}"#,
        )
        .await;
    assert!(smp["metadata"].get("finalizers").is_none());
    let (s, unsupported) = raw.patch(&path, "application/json", "{}").await;
    assert_eq!(
        (s, unsupported["reason"].as_str().unwrap()),
        (415, "UnsupportedMediaType")
    );
    let (s, forced) = raw
        .patch(
            &format!("{path}?force=true"),
            "application/merge-patch+json",
            "{}",
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(forced["details"]["causes"][0]["field"], "force");

    // DELETE shapes.
    let (s, pre) = raw
        .delete(
            &path,
            Some(json!({"preconditions": {"uid": "00000000-0000-0000-0000-000000000000"}})),
        )
        .await;
    assert_eq!(s, 409);
    assert!(
        pre["message"]
            .as_str()
            .unwrap()
            .contains("the UID in the precondition")
    );
    let (s, gone) = raw.delete(&path, None).await;
    assert_eq!(s, 200);
    assert_eq!(gone["status"], "Success");
    assert_eq!(gone["details"]["name"], "s");
    assert_eq!(gone["details"]["kind"], "secrets");
    assert_eq!(gone["details"]["uid"], created["metadata"]["uid"]);
    let (s, _) = raw.delete(&path, None).await;
    assert_eq!(s, 404);

    // deletecollection returns the deleted objects.
    for n in ["b1", "b2"] {
        raw.post(
            SECRETS,
            json!({"metadata": {"name": n, "labels": {"batch": "del"}}}),
        )
        .await;
    }
    let (s, coll) = raw
        .delete(&format!("{SECRETS}?labelSelector=batch%3Ddel"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(coll["kind"], "SecretList");
    assert_eq!(coll["items"].as_array().unwrap().len(), 2);
    let (_, after) = raw.get(SECRETS).await;
    assert_eq!(after["items"], json!([]));
    server.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_ownership() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let path = format!("{SECRETS}/ssa");
    let apply = |manager: &str, force: bool| {
        format!(
            "{path}?fieldManager={manager}{}",
            if force { "&force=true" } else { "" }
        )
    };
    let ct = "application/apply-patch+yaml";
    let doc = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssa", "labels": {"l": "1"}},
        "data": {"a": "YQ==", "b": "Yg=="}});
    let (s, created) = raw.patch(&apply("op", true), ct, &doc.to_string()).await;
    assert_eq!(s, 201);
    assert_eq!(
        created["metadata"]["managedFields"][0]["operation"],
        "Apply"
    );
    assert_eq!(
        created["metadata"]["managedFields"][0]["fieldsV1"],
        json!({"f:data": {"f:a": {}, "f:b": {}}, "f:metadata": {"f:labels": {"f:l": {}}}})
    );
    let (s, same) = raw.patch(&apply("op", true), ct, &doc.to_string()).await;
    assert_eq!(s, 200);
    assert_eq!(rv(&same), rv(&created), "identical apply is a no-op");

    let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: ssa\n  labels:\n    l: \"1\"\ndata:\n  b: Yg==  # kept\n";
    let (s, dropped) = raw.patch(&apply("op", true), ct, yaml).await;
    assert_eq!(s, 200);
    assert_eq!(
        dropped["data"],
        json!({"b": "Yg=="}),
        "a field dropped from the apply is removed"
    );

    let other = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ssa", "labels": {"l": "2"}},
        "data": {"b": "Yw=="}});
    let (s, conflict) = raw
        .patch(&apply("other", false), ct, &other.to_string())
        .await;
    assert_eq!(s, 409);
    assert_eq!(conflict["reason"], "Conflict");
    assert_eq!(
        conflict["message"],
        "Apply failed with 2 conflicts: conflicts with \"op\":\n- .data.b\n- .metadata.labels.l"
    );
    assert_eq!(
        conflict["details"]["causes"][0]["reason"],
        "FieldManagerConflict"
    );
    let (s, forced) = raw
        .patch(&apply("other", true), ct, &other.to_string())
        .await;
    assert_eq!(s, 200);
    assert_eq!(forced["data"]["b"], "Yw==");
    let (s, missing_manager) = raw
        .patch(&format!("{path}?force=true"), ct, &doc.to_string())
        .await;
    assert_eq!(s, 422);
    assert_eq!(
        missing_manager["details"]["causes"][0]["field"],
        "fieldManager"
    );
    let (s, wrong_kind) = raw
        .patch(
            &apply("op", true),
            ct,
            r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ssa"}}"#,
        )
        .await;
    assert_eq!(
        (s, wrong_kind["message"].as_str().unwrap()),
        (400, "invalid object type: /v1, Kind=ConfigMap")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn custom_resources_status_generation_finalizers() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let (s, _, _) = raw.send("GET", WIDGETS, None, None).await;
    assert_eq!(s, 404, "no CRD yet");
    install_widget_crd(&server).await;
    let (_, group) = raw.get("/apis/conformance.test/v1").await;
    assert_eq!(group["resources"][1]["name"], "widgets/status");

    let (s, w) = raw
        .post(
            WIDGETS,
            json!({"apiVersion": "conformance.test/v1", "kind": "Widget", "metadata": {"name": "w"},
                "spec": {"size": 1}, "status": {"observed": 9}}),
        )
        .await;
    assert_eq!(s, 201);
    assert!(w.get("status").is_none(), "status is dropped on create");
    assert_eq!(w["metadata"]["generation"], 1);
    let path = format!("{WIDGETS}/w");
    let (s, missing) = raw.get(&format!("{WIDGETS}/nope")).await;
    assert_eq!(s, 404);
    assert_eq!(
        missing["details"],
        json!({"name": "nope", "group": "conformance.test", "kind": "widgets"})
    );

    let (_, st) = raw
        .patch(
            &format!("{path}/status"),
            "application/merge-patch+json",
            r#"{"spec":{"size":5},"status":{"observed":1}}"#,
        )
        .await;
    assert_eq!(st["spec"]["size"], 1, "spec is ignored on /status");
    assert_eq!(st["status"]["observed"], 1);
    assert_eq!(st["metadata"]["generation"], 1);
    let (_, main) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"status":{"observed":7}}"#,
        )
        .await;
    assert_eq!(
        main["status"]["observed"], 1,
        "status is ignored on the main resource"
    );
    assert_eq!(rv(&main), rv(&st), "and that is a no-op");
    let (_, spec) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"spec":{"size":2}}"#,
        )
        .await;
    assert_eq!(spec["metadata"]["generation"], 2);
    let (_, labels) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"a":"b"}}}"#,
        )
        .await;
    assert_eq!(
        labels["metadata"]["generation"], 2,
        "metadata changes do not bump generation"
    );
    let (_, whole) = raw.get(&format!("{path}/status")).await;
    assert_eq!(
        whole["spec"]["size"], 2,
        "GET /status returns the whole object"
    );
    let (s, smp) = raw
        .patch(&path, "application/strategic-merge-patch+json", "{}")
        .await;
    assert_eq!(s, 415);
    assert!(smp.get("details").is_none());

    // Finalizer flow.
    raw.patch(
        &path,
        "application/json-patch+json",
        r#"[{"op":"add","path":"/metadata/finalizers","value":["x/y"]}]"#,
    )
    .await;
    let (s, deleting) = raw.delete(&path, None).await;
    assert_eq!(s, 200);
    assert_eq!(
        deleting["kind"], "Widget",
        "the object, not a Status, while finalizers remain"
    );
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(deleting["metadata"]["deletionGracePeriodSeconds"], 0);
    assert_eq!(deleting["metadata"]["generation"], 3);
    let (s, late) = raw
        .patch(
            &path,
            "application/json-patch+json",
            r#"[{"op":"add","path":"/metadata/finalizers/-","value":"late/x"}]"#,
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(late["details"]["causes"].as_array().unwrap().len(), 2);
    let (s, last) = raw
        .patch(
            &path,
            "application/json-patch+json",
            r#"[{"op":"remove","path":"/metadata/finalizers/0"}]"#,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        rv(&last),
        rv(&deleting),
        "removing the last finalizer returns the object at its old RV"
    );
    let (s, _) = raw.get(&path).await;
    assert_eq!(s, 404);

    // Deleting the CRD removes the paths.
    let (s, crd) = raw
        .delete(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.conformance.test",
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(crd["kind"], "CustomResourceDefinition");
    eventually("CR paths gone", || async {
        let (s, text, _) = raw.send("GET", WIDGETS, None, None).await;
        s == 404 && text == "404 page not found\n"
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn watch_wire_format() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let (_, list) = raw.get(SECRETS).await;
    let from = rv(&list);
    let w = {
        let raw = Raw::new(&server);
        tokio::spawn(async move {
            raw.watch(&format!(
                "{SECRETS}?watch=1&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=4"
            ))
            .await
        })
    };
    eventually("watch open", || async { server.open_watches() == 1 }).await;
    raw.post(
        SECRETS,
        json!({"metadata": {"name": "w", "labels": {"w": "1"}}}),
    )
    .await;
    raw.patch(
        &format!("{SECRETS}/w"),
        "application/merge-patch+json",
        r#"{"stringData":{"k":"v"}}"#,
    )
    .await;
    let (_, before_delete) = raw.get(&format!("{SECRETS}/w")).await;
    raw.delete(&format!("{SECRETS}/w"), None).await;
    let events = w.await.unwrap();
    let types: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]);
    let deleted = &events[2].1["object"];
    assert!(
        rv(deleted) > rv(&before_delete),
        "DELETED carries a new resourceVersion"
    );
    assert_eq!(
        deleted["data"], before_delete["data"],
        "and the previous state"
    );
    let (at, bookmark) = &events[3];
    assert!(
        *at >= Duration::from_secs(2) && *at < Duration::from_secs(4),
        "bookmark shortly before the timeout: {at:?}"
    );
    assert_eq!(rv(&bookmark["object"]), rv(deleted));
    assert_eq!(bookmark["object"]["kind"], "Secret");

    // Replay from the same RV, then a watch without RV: synthetic ADDED + initial-events-end.
    let replay = raw
        .watch(&format!(
            "{SECRETS}?watch=true&resourceVersion={from}&timeoutSeconds=1"
        ))
        .await;
    assert_eq!(replay.len(), 3);
    raw.post(SECRETS, json!({"metadata": {"name": "keep"}}))
        .await;
    let fresh = raw
        .watch(&format!(
            "{SECRETS}?watch=1&allowWatchBookmarks=true&timeoutSeconds=1"
        ))
        .await;
    assert_eq!(fresh[0].1["type"], "ADDED");
    assert_eq!(fresh[1].1["type"], "BOOKMARK");
    assert_eq!(
        fresh[1].1["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    let wl = raw
        .watch(&format!(
            "{SECRETS}?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1"
        ))
        .await;
    assert_eq!(wl.len(), 2);
    let (s, invalid) = raw
        .get(&format!(
            "{SECRETS}?watch=1&sendInitialEvents=true&timeoutSeconds=1"
        ))
        .await;
    assert_eq!(s, 422);
    assert_eq!(invalid["details"]["kind"], "ListOptions");

    // Too old after compaction: 200 plus one ERROR event, then the stream ends.
    server.compact();
    let expired = raw
        .watch(&format!(
            "{SECRETS}?watch=1&resourceVersion={from}&timeoutSeconds=5"
        ))
        .await;
    assert_eq!(expired.len(), 1);
    let (at, err) = &expired[0];
    assert!(*at < Duration::from_secs(1));
    assert_eq!(err["type"], "ERROR");
    assert_eq!(err["object"]["code"], 410);
    assert_eq!(err["object"]["reason"], "Expired");
    assert!(
        err["object"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("too old resource version: {from} ("))
    );
    server.shutdown().await;
}

#[tokio::test]
async fn events_and_micro_time() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let events_v1 = "/apis/events.k8s.io/v1/namespaces/default/events";
    let mut ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"generateName": "op-"},
        "eventTime": "2026-11-23T09:50:00Z",
        "regarding": {"kind": "Widget", "name": "w", "namespace": "default"},
        "note": "hello", "reason": "Test", "action": "Reconcile", "type": "Normal",
        "reportingController": "op", "reportingInstance": "op-0"});
    let (s, bad) = raw.post(events_v1, ev.clone()).await;
    assert_eq!(s, 400);
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("cannot parse \"Z\" as \".000000\"")
    );
    ev["eventTime"] = json!("2026-11-23T09:50:00.123456Z");
    let (s, created) = raw.post(events_v1, ev).await;
    assert_eq!(s, 201);
    let name = created["metadata"]["name"].as_str().unwrap().to_owned();
    let (s, patched) = raw
        .patch(
            &format!("{events_v1}/{name}"),
            "application/merge-patch+json",
            r#"{"series":{"count":2,"lastObservedTime":"2026-11-23T09:50:01.000001Z"}}"#,
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(patched["series"]["count"], 2);
    let (_, core) = raw
        .get(&format!("/api/v1/namespaces/default/events/{name}"))
        .await;
    assert_eq!(core["message"], "hello");
    assert_eq!(core["involvedObject"]["name"], "w");
    assert_eq!(core["reportingComponent"], "op");
    let (_, listed) = raw
        .get("/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dw")
        .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "l"},
        "spec": {"renewTime": "2026-11-23T09:50:00.123Z"}});
    let (s, _) = raw
        .post(
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            lease,
        )
        .await;
    assert_eq!(s, 400);
    server.shutdown().await;
}

#[tokio::test]
async fn owner_reference_garbage_collection() {
    let server = FakeApiServer::start().await;
    install_widget_crd(&server).await;
    let client = server.client();
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let owner = widgets
        .create(
            &PostParams::default(),
            &Widget::new("owner", WidgetSpec { size: 1 }),
        )
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let mut dep = Secret::default();
    dep.metadata.name = Some("dep".into());
    dep.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
    secrets.create(&PostParams::default(), &dep).await.unwrap();
    widgets
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    eventually("dependent deleted", || async {
        secrets.get_opt("dep").await.unwrap().is_none()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn the_server_logs_what_reached_it() {
    let server = FakeApiServer::start().await;
    let proxy = FaultProxy::start(server.client())
        .await
        .expect("start the proxy");
    let secrets: Api<Secret> = Api::default_namespaced(proxy.client());
    secrets.get_opt("before").await.unwrap();
    server.clear_request_log();
    proxy.clear_request_log();
    // Answered by the proxy itself: in the proxy's log only.
    proxy.inject_fault(Fault {
        method: Some(http::Method::GET),
        path_contains: "/secrets/faulty".into(),
        status: 500,
        times: 1,
    });
    secrets.get("faulty").await.unwrap_err();
    secrets.get_opt("missing").await.unwrap();
    secrets.list(&ListParams::default().limit(2)).await.unwrap();
    let raw = Raw::at(server.url());
    raw.http
        .post(format!("{}{SECRETS}", raw.base))
        .header("user-agent", "goto-admin/1.0 (linux/amd64)")
        .header("content-type", "application/json")
        .body(r#"{"metadata":{"name":"ua"}}"#)
        .send()
        .await
        .unwrap();
    raw.http
        .delete(format!("{}{SECRETS}", raw.base))
        .send()
        .await
        .unwrap();
    let log = server.request_log();
    let seen: Vec<(&str, &str, &str, u16)> = log
        .iter()
        .map(|r| {
            (
                r.method.as_str(),
                r.verb.as_str(),
                r.path.as_str(),
                r.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "GET",
                "get",
                "/api/v1/namespaces/default/secrets/missing",
                404
            ),
            ("GET", "list", "/api/v1/namespaces/default/secrets", 200),
            ("POST", "create", "/api/v1/namespaces/default/secrets", 201),
            (
                "DELETE",
                "deletecollection",
                "/api/v1/namespaces/default/secrets",
                200
            ),
        ]
    );
    assert!(log[1].query.contains("limit=2"), "{}", log[1].query);
    assert_eq!(
        log[2].user_agent.as_deref(),
        Some("goto-admin/1.0 (linux/amd64)")
    );
    assert_eq!(server.count_requests(|r| r.verb == "list"), 1);
    assert_eq!(
        proxy.request_log().len(),
        3,
        "the proxy saw the fault and its own two"
    );
    server.clear_request_log();
    assert!(server.request_log().is_empty());
    server.shutdown().await;
}

#[tokio::test]
async fn request_log_and_faults() {
    let server = FakeApiServer::start().await;
    // The request log and the faults are the proxy's, in front of the server.
    let proxy = FaultProxy::start(server.client())
        .await
        .expect("start the proxy");
    let secrets: Api<Secret> = Api::default_namespaced(proxy.client());
    proxy.clear_request_log();
    proxy.inject_fault(Fault {
        method: Some(http::Method::GET),
        path_contains: "/secrets/faulty".into(),
        status: 500,
        times: 1,
    });
    let err = secrets.get("faulty").await.unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 500);
            assert_eq!(status.reason, "InternalError");
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(
        secrets.get_opt("faulty").await.unwrap().is_none(),
        "the fault fires only once"
    );
    secrets
        .patch(
            "p",
            &PatchParams::apply("tester"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret"})),
        )
        .await
        .unwrap();
    let log = proxy.request_log();
    assert_eq!(log.len(), 3);
    assert_eq!((log[0].verb.as_str(), log[0].status), ("get", 500));
    assert_eq!((log[1].verb.as_str(), log[1].status), ("get", 404));
    assert_eq!(log[2].verb, "patch");
    assert_eq!(log[2].status, 201);
    assert_eq!(
        log[2].content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert!(log[2].query.contains("fieldManager=tester"));
    // The default field manager comes from the User-Agent prefix (kube-rs sends none: "unknown").
    let raw = Raw::at(proxy.url());
    let resp = raw
        .http
        .post(format!("{}{SECRETS}", raw.base))
        .header("user-agent", "goto-admin/1.0 (linux/amd64)")
        .header("content-type", "application/json")
        .body(r#"{"metadata":{"name":"ua"}}"#)
        .send()
        .await
        .unwrap();
    let created: Value = resp.json().await.unwrap();
    assert_eq!(
        created["metadata"]["managedFields"][0]["manager"],
        "goto-admin"
    );
    let last = proxy.request_log().pop().unwrap();
    assert_eq!(
        last.user_agent.as_deref(),
        Some("goto-admin/1.0 (linux/amd64)")
    );
    assert_eq!(
        (last.verb.as_str(), last.status, last.content_type),
        ("create", 201, None)
    );
    assert_eq!(log[2].path, "/api/v1/namespaces/default/secrets/p");

    // Discovery is good enough for a client to map kinds.
    let (s, text, _) = raw.send("GET", "/version", None, None).await;
    assert_eq!(s, 200);
    assert!(text.starts_with("{\n  \"major\"") && !text.ends_with('\n'));
    let (_, apis) = raw.get("/apis").await;
    assert_eq!(apis["kind"], "APIGroupList");
    let (_, core) = raw.get("/api/v1").await;
    assert!(
        core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "secrets")
    );
    server.shutdown().await;
}

#[tokio::test]
async fn kube_runtime_watcher_sees_changes() {
    let server = FakeApiServer::start().await;
    let secrets: Api<Secret> = Api::default_namespaced(server.client());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen_w = seen.clone();
    let stream = watcher(secrets.clone(), watcher::Config::default());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let line = match ev {
                Ok(watcher::Event::Apply(s)) => {
                    format!("apply {} {}", s.name_any(), s.labels().len())
                }
                Ok(watcher::Event::Delete(s)) => format!("delete {}", s.name_any()),
                Ok(watcher::Event::InitDone) => "init".to_owned(),
                Ok(_) => continue,
                Err(e) => format!("error {e}"),
            };
            seen_w.lock().unwrap().push(line);
        }
    });
    let has = |s: &str| seen.lock().unwrap().iter().any(|l| l == s);
    eventually("initial list", || async { has("init") }).await;
    let mut s = Secret::default();
    s.metadata.name = Some("x".into());
    secrets.create(&PostParams::default(), &s).await.unwrap();
    eventually("create seen", || async { has("apply x 0") }).await;
    secrets
        .patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    eventually("update seen", || async { has("apply x 1") }).await;
    secrets.delete("x", &DeleteParams::default()).await.unwrap();
    eventually("delete seen", || async { has("delete x") }).await;
    task.abort();
    server.shutdown().await;
}

/// Every size each Widget was reconciled with, by name.
type Reconciled = Arc<Mutex<BTreeMap<String, Vec<i64>>>>;

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[tokio::test]
async fn controller_reconciles_and_recovers() {
    let server = FakeApiServer::start().await;
    install_widget_crd(&server).await;
    // Through the proxy, whose request log shows the re-list.
    let proxy = FaultProxy::start(server.client())
        .await
        .expect("start the proxy");
    let client = proxy.client();
    let widgets: Api<Widget> = Api::default_namespaced(client.clone());
    let reconciled: Reconciled = Arc::default();
    let controller = Controller::new(widgets.clone(), watcher::Config::default());
    let cache = controller.store();
    let ctx = reconciled.clone();
    let controller = controller
        .run(
            |w: Arc<Widget>, ctx: Arc<Reconciled>| async move {
                ctx.lock()
                    .unwrap()
                    .entry(w.name_any())
                    .or_default()
                    .push(w.spec.size);
                Ok::<_, Never>(Action::await_change())
            },
            |_, _, _| Action::requeue(Duration::from_millis(50)),
            Arc::new(ctx),
        )
        .for_each(|_| futures::future::ready(()));
    let task = tokio::spawn(controller);
    let saw = |name: &str, size: i64| {
        reconciled
            .lock()
            .unwrap()
            .get(name)
            .is_some_and(|v| v.contains(&size))
    };

    widgets
        .create(
            &PostParams::default(),
            &Widget::new("a", WidgetSpec { size: 1 }),
        )
        .await
        .unwrap();
    eventually("create reconciled", || async { saw("a", 1) }).await;
    widgets
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    eventually("update reconciled", || async { saw("a", 2) }).await;
    widgets.delete("a", &DeleteParams::default()).await.unwrap();
    let a_ref = kube::runtime::reflector::ObjectRef::<Widget>::new("a").within("default");
    eventually("delete observed by the controller's cache", || async {
        cache.get(&a_ref).is_none()
    })
    .await;

    server.cut_watches();
    widgets
        .create(
            &PostParams::default(),
            &Widget::new("b", WidgetSpec { size: 3 }),
        )
        .await
        .unwrap();
    eventually("reconciled after cut_watches", || async { saw("b", 3) }).await;

    eventually("watch re-opened", || async { server.open_watches() >= 1 }).await;
    server.compact();
    server.cut_watches();
    widgets
        .create(
            &PostParams::default(),
            &Widget::new("c", WidgetSpec { size: 4 }),
        )
        .await
        .unwrap();
    eventually("reconciled after compact (410 then re-list)", || async {
        saw("c", 4)
    })
    .await;
    let relisted = proxy
        .request_log()
        .iter()
        .any(|r| r.verb == "list" && r.path.ends_with("/widgets"));
    assert!(relisted);
    task.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn lease_manager_acquires_and_hands_over() {
    use kube_lease_manager::LeaseManagerBuilder;
    let server = FakeApiServer::start().await;
    let client = server.client();
    let a = LeaseManagerBuilder::new(client.clone(), "leader")
        .with_identity("a")
        .with_duration(5)
        .with_grace(2)
        .build()
        .await
        .unwrap();
    let b = LeaseManagerBuilder::new(client.clone(), "leader")
        .with_identity("b")
        .with_duration(5)
        .with_grace(2)
        .build()
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), a.changed())
            .await
            .unwrap()
            .unwrap()
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::default_namespaced(client);
    let lease = leases.get("leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("a"));
    let b_is_leader = tokio::time::timeout(Duration::from_millis(300), b.changed()).await;
    assert!(
        b_is_leader.is_err() || !b_is_leader.unwrap().unwrap(),
        "b must not lead while a holds the lease"
    );
    a.release().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), b.changed())
            .await
            .unwrap()
            .unwrap()
    );
    let lease = leases.get("leader").await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("b"));
    server.shutdown().await;
}

/// `apps/v1` workloads, as the rollout restarts use them: a merge patch of the pod template's
/// annotations bumps `generation` (what makes the real Deployment controller roll), a
/// metadata-only change does not, and a missing target answers the API server's 404 `Status`
/// (a merge patch never creates).
#[tokio::test]
async fn workloads_generation_and_missing_targets() {
    const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    let (_, group) = raw.get("/apis/apps/v1").await;
    let names: Vec<&str> = group["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for plural in [
        "deployments",
        "statefulsets",
        "daemonsets",
        "deployments/status",
    ] {
        assert!(names.contains(&plural), "{plural} in {names:?}");
    }
    let (s, created) = raw
        .post(
            DEPLOYMENTS,
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
                "spec": {"selector": {"matchLabels": {"app": "a"}},
                    "template": {"metadata": {"labels": {"app": "a"}},
                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    assert_eq!(created["metadata"]["generation"], 1);

    let path = format!("{DEPLOYMENTS}/app");
    let (s, patched) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"spec":{"template":{"metadata":{"annotations":{"goto-oauth.dev/restartedAt":"2026-12-02T08:00:00Z"}}}}}"#,
        )
        .await;
    assert_eq!(s, 200, "{patched}");
    assert_eq!(patched["metadata"]["generation"], 2);
    assert_eq!(
        patched["spec"]["template"]["metadata"]["labels"]["app"], "a",
        "a merge patch keeps the rest of the template"
    );
    let (_, relabelled) = raw
        .patch(
            &path,
            "application/merge-patch+json",
            r#"{"metadata":{"labels":{"x":"y"}}}"#,
        )
        .await;
    assert_eq!(relabelled["metadata"]["generation"], 2);

    let (s, missing) = raw
        .patch(
            &format!("{DEPLOYMENTS}/nope"),
            "application/merge-patch+json",
            r#"{"spec":{"template":{"metadata":{"annotations":{"a":"b"}}}}}"#,
        )
        .await;
    assert_eq!(s, 404);
    assert_eq!(missing["reason"], "NotFound");
    assert_eq!(missing["message"], r#"deployments.apps "nope" not found"#);
    assert_eq!(
        missing["details"],
        json!({"name": "nope", "group": "apps", "kind": "deployments"})
    );
    server.shutdown().await;
}

/// Server-side apply that drops a list-map item the manager alone owned removes the whole
/// item, key field included (as structured-merge-diff does): a condition the operator stops
/// applying is gone, not left behind as `{type: …}` without its required fields.
#[tokio::test]
async fn apply_dropping_a_list_map_item_removes_it_whole() {
    let server = FakeApiServer::start().await;
    let raw = Raw::new(&server);
    install_widget_crd(&server).await;
    let (s, _) = raw
        .post(
            WIDGETS,
            json!({"apiVersion": "conformance.test/v1", "kind": "Widget", "metadata": {"name": "w"},
                "spec": {"size": 1}}),
        )
        .await;
    assert_eq!(s, 201);
    let status = format!("{WIDGETS}/w/status?fieldManager=op&force=true");
    let ct = "application/apply-patch+yaml";
    let condition = |t: &str| {
        json!({"type": t, "status": "True", "reason": "R", "message": "m",
            "lastTransitionTime": "2026-12-02T10:00:00Z"})
    };
    let doc = |conditions: Vec<Value>| {
        json!({"apiVersion": "conformance.test/v1", "kind": "Widget", "metadata": {"name": "w"},
            "status": {"conditions": conditions}})
        .to_string()
    };
    let (s, both) = raw
        .patch(
            &status,
            ct,
            &doc(vec![condition("Ready"), condition("Extra")]),
        )
        .await;
    assert_eq!(s, 200, "{both}");
    assert_eq!(both["status"]["conditions"].as_array().unwrap().len(), 2);
    let (s, one) = raw.patch(&status, ct, &doc(vec![condition("Ready")])).await;
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["status"]["conditions"], json!([condition("Ready")]));

    // An item another manager also owns a field of keeps that field and its key.
    let (s, other) = raw
        .patch(
            &format!("{WIDGETS}/w/status?fieldManager=other&force=true"),
            ct,
            &json!({"apiVersion": "conformance.test/v1", "kind": "Widget",
                "metadata": {"name": "w"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
            .to_string(),
        )
        .await;
    assert_eq!(s, 200, "{other}");
    let (s, shared) = raw.patch(&status, ct, &doc(vec![])).await;
    assert_eq!(s, 200, "{shared}");
    assert_eq!(
        shared["status"]["conditions"],
        json!([{"type": "Ready", "status": "True"}])
    );
    server.shutdown().await;
}
