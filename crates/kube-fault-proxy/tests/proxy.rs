//! The proxy in front of the in-memory API server: faults fire exactly `times` times with a
//! proper `Status`, the log records what clients sent and got, and watches stream through (and
//! end on `cut_watches`); `set_unavailable` plays an unreachable API server.

use std::time::Duration;

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use kube_fault_proxy::{Fault, FaultProxy};

const DEADLINE: Duration = Duration::from_secs(10);

async fn start() -> (FakeApiServer, FaultProxy) {
    let fake = FakeApiServer::start().await;
    let proxy = FaultProxy::start(fake.client())
        .await
        .expect("start the proxy");
    (fake, proxy)
}

fn secret(name: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Secret::default()
    }
}

#[tokio::test]
async fn a_fault_fires_exactly_times_times_and_is_logged() {
    let (_fake, proxy) = start().await;
    let secrets: Api<Secret> = Api::default_namespaced(proxy.client());
    secrets
        .create(&PostParams::default(), &secret("s"))
        .await
        .expect("create");
    proxy.clear_request_log();
    proxy.inject_fault(Fault {
        method: Some(http::Method::PATCH),
        path_contains: "/secrets/s".into(),
        status: 409,
        times: 2,
    });
    let patch = Patch::Merge(serde_json::json!({"metadata": {"labels": {"a": "b"}}}));
    let mut codes = Vec::new();
    for _ in 0..3 {
        match secrets.patch("s", &PatchParams::default(), &patch).await {
            Ok(_) => codes.push(200),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.reason, "Conflict");
                assert_eq!(status.message, "injected fault: 409");
                codes.push(status.code);
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(codes, [409, 409, 200], "two faults, then the real server");

    // A GET on the same path was never a candidate (the fault names PATCH).
    secrets.get("s").await.expect("get is not faulted");

    let log: Vec<(String, String, u16)> = proxy
        .request_log()
        .into_iter()
        .map(|r| (r.verb, r.path, r.status))
        .collect();
    let path = "/api/v1/namespaces/default/secrets/s".to_string();
    assert_eq!(
        log,
        [
            ("patch".into(), path.clone(), 409),
            ("patch".into(), path.clone(), 409),
            ("patch".into(), path.clone(), 200),
            ("get".into(), path, 200),
        ]
    );
    let first = &proxy.request_log()[0];
    assert_eq!(
        first.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(first.method, "PATCH");
    proxy.clear_request_log();
    assert!(proxy.request_log().is_empty());
    // A fault injected after one request: the first match goes through, the second fails.
    proxy.inject_fault_after(
        1,
        Fault {
            method: Some(http::Method::PATCH),
            path_contains: "/secrets/s".into(),
            status: 409,
            times: 1,
        },
    );
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(
            match secrets.patch("s", &PatchParams::default(), &patch).await {
                Ok(_) => 200,
                Err(kube::Error::Api(status)) => status.code,
                Err(e) => panic!("unexpected error: {e}"),
            },
        );
    }
    assert_eq!(
        after,
        [200, 409, 200],
        "one let through, one fault, then none"
    );
}

#[tokio::test]
async fn a_watch_streams_through_until_it_is_cut() {
    let (_fake, proxy) = start().await;
    let secrets: Api<Secret> = Api::default_namespaced(proxy.client());
    let list = secrets.list(&Default::default()).await.expect("list");
    let rv = list
        .metadata
        .resource_version
        .expect("list resourceVersion");
    let mut stream = secrets
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .expect("watch")
        .boxed();
    // The event arrives while the watch is open: the proxy does not buffer the response.
    secrets
        .create(&PostParams::default(), &secret("w"))
        .await
        .expect("create");
    let event = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("an event within the deadline")
        .expect("the stream is open")
        .expect("a well-formed event");
    match event {
        WatchEvent::Added(s) => assert_eq!(s.metadata.name.as_deref(), Some("w")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    assert!(
        proxy
            .request_log()
            .iter()
            .any(|r| r.verb == "watch" && r.status == 200),
        "the watch is logged"
    );

    proxy.cut_watches();
    let end = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the cut stream ends within the deadline");
    assert!(end.is_none(), "a clean end of stream, got {end:?}");
}

#[tokio::test]
async fn the_kubeconfig_points_at_the_proxy() {
    let (_fake, proxy) = start().await;
    let yaml = proxy.kubeconfig_yaml();
    assert!(yaml.contains(&format!("server: {}", proxy.url())), "{yaml}");
    assert!(yaml.contains("namespace: default"), "{yaml}");
}

#[tokio::test]
async fn an_unavailable_api_server_answers_502_ends_watches_and_comes_back() {
    let (_fake, proxy) = start().await;
    let secrets: Api<Secret> = Api::default_namespaced(proxy.client());
    secrets
        .create(&PostParams::default(), &secret("u"))
        .await
        .expect("create");
    let list = secrets.list(&Default::default()).await.expect("list");
    let rv = list
        .metadata
        .resource_version
        .expect("list resourceVersion");
    let mut stream = secrets
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .expect("watch")
        .boxed();
    proxy.inject_fault(Fault {
        method: Some(http::Method::GET),
        path_contains: "/secrets/u".into(),
        status: 409,
        times: 1,
    });
    proxy.clear_request_log();

    proxy.set_unavailable(true);
    assert!(proxy.is_unavailable());
    let end = tokio::time::timeout(DEADLINE, stream.next())
        .await
        .expect("the open watch ends within the deadline");
    assert!(end.is_none(), "a clean end of stream, got {end:?}");
    for _ in 0..2 {
        let got = tokio::time::timeout(DEADLINE, secrets.get("u"))
            .await
            .expect("answered within the deadline");
        match got {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 502);
                assert_eq!(status.reason, "BadGateway");
            }
            other => panic!("expected a 502 while unavailable, got {other:?}"),
        }
    }
    let label = Patch::Merge(serde_json::json!({"metadata": {"labels": {"a": "b"}}}));
    assert!(
        secrets
            .patch("u", &PatchParams::default(), &label)
            .await
            .is_err(),
        "a write fails while unavailable"
    );
    // kube reports a refused watch either at once or as the stream's first item.
    let refused = match secrets.watch(&WatchParams::default().timeout(5), &rv).await {
        Err(_) => true,
        Ok(stream) => {
            let first = tokio::time::timeout(DEADLINE, stream.boxed().next())
                .await
                .expect("the refused watch answers within the deadline");
            !matches!(
                first,
                Some(Ok(WatchEvent::Added(_) | WatchEvent::Modified(_)))
            )
        }
    };
    assert!(refused, "a new watch fails while unavailable");
    let log = proxy.request_log();
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log.iter().all(|r| r.status == 502), "{log:?}");
    assert!(
        log.windows(2).all(|w| w[0].at <= w[1].at),
        "log times are in order"
    );

    proxy.set_unavailable(false);
    assert!(!proxy.is_unavailable());
    // The write that failed changed nothing; the fault injected before still fires once.
    match secrets.get("u").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
        other => panic!("expected the pending injected 409, got {other:?}"),
    }
    let s = secrets.get("u").await.expect("get after recovery");
    assert!(
        s.metadata.labels.is_none(),
        "the refused write was not applied"
    );
}
