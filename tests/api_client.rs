//! The operator's API client (`api_client::build`, kube's stack with hyper's read buffer capped
//! at `READ_BUFFER_MAX`) against the API server the tests use: a LIST answer and a watch event
//! far larger than the buffer arrive whole, and the kubeconfig's headers reach the server.

mod common;

use std::collections::BTreeMap;

use common::Cluster;
use futures::{StreamExt, TryStreamExt};
use goto_oauth_operator::api_client::READ_BUFFER_MAX;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};

/// `n` bytes that differ from Secret to Secret and do not repeat within one.
fn payload(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

fn secret(name: &str, label: &str, seed: u8, n: usize) -> Secret {
    Secret {
        metadata: kube::core::ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([("test".into(), label.into())])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("v".into(), ByteString(payload(seed, n)))])),
        ..Default::default()
    }
}

#[tokio::test]
async fn answers_far_larger_than_the_read_buffer_arrive_whole() {
    let cluster = Cluster::start().await;
    let secrets: Api<Secret> = Api::namespaced(cluster.operator_client(), &cluster.namespace);

    // One LIST answer of 40 × 32 KiB (base64: ~1.7 MB), many times the buffer.
    const EACH: usize = 32 * 1024;
    for i in 0..40u8 {
        secrets
            .create(
                &PostParams::default(),
                &secret(&format!("big-{i:02}"), "api-client", i, EACH),
            )
            .await
            .expect("create");
    }
    let listed = secrets
        .list(&ListParams::default().labels("test=api-client"))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 40);
    const { assert!(40 * EACH >= 20 * READ_BUFFER_MAX) };
    for s in &listed.items {
        let name = s.metadata.name.clone().unwrap_or_default();
        let seed: u8 = name.trim_start_matches("big-").parse().expect("seed");
        let data = s.data.as_ref().and_then(|d| d.get("v")).expect("data");
        assert!(data.0 == payload(seed, EACH), "{name} arrived changed");
    }

    // A watch event of ~700 KB (base64 of 512 KiB) on a connection that stays open.
    let events = watcher(
        secrets.clone(),
        watcher::Config::default().labels("test=huge"),
    )
    .applied_objects()
    .boxed();
    let watching = tokio::spawn(async move {
        let mut events = events;
        events.try_next().await
    });
    const HUGE: usize = 512 * 1024;
    secrets
        .create(&PostParams::default(), &secret("huge", "huge", 7, HUGE))
        .await
        .expect("create huge");
    let seen = tokio::time::timeout(common::DEADLINE, watching)
        .await
        .expect("the watch delivers the event in time")
        .expect("watch task")
        .expect("watch stream")
        .expect("an event");
    let data = seen.data.as_ref().and_then(|d| d.get("v")).expect("data");
    assert!(
        data.0 == payload(7, HUGE),
        "the watched Secret arrived changed"
    );

    // The kubeconfig's User-Agent (an extra header) reached the server on every request.
    let sent = cluster.operator_requests();
    assert!(
        sent.iter().any(|r| r.starts_with("list ")) && sent.iter().any(|r| r.starts_with("watch ")),
        "{sent:?}"
    );
}
