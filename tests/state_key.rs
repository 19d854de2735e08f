//! The state-signing key is shared by every replica: created once, read by all, even when
//! replicas start at the same moment.

use fake_apiserver::FakeApiServer;
use goto_oauth_operator::consent::load_or_create_key;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube_fault_proxy::FaultProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replicas_agree_on_one_key() {
    let fake = FakeApiServer::start().await;
    // The proxy's request log counts the creates.
    let api = FaultProxy::start(fake.client())
        .await
        .expect("start the proxy");
    let client = api.client();
    let loads = (0..5).map(|_| load_or_create_key(client.clone(), "default", "state-key"));
    let keys: Vec<_> = futures::future::join_all(loads)
        .await
        .into_iter()
        .map(|k| k.expect("key").as_bytes().to_vec())
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] == w[1]),
        "every replica uses the same key"
    );
    let secret = Api::<Secret>::namespaced(client.clone(), "default")
        .get("state-key")
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap()["state-hmac-key"].0, keys[0]);
    assert_eq!(keys[0].len(), 32);
    let creates = api
        .request_log()
        .iter()
        .filter(|r| r.verb == "create" && r.status == 201)
        .count();
    assert_eq!(creates, 1, "created exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_key_is_a_clear_error() {
    let api = FakeApiServer::start().await;
    let client = api.client();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "state-key"},
        "stringData": {"state-hmac-key": "short"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&Default::default(), &secret)
        .await
        .unwrap();
    let err = load_or_create_key(client, "default", "state-key")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("state-key"), "{err}");
}
