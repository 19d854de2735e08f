//! Preparing an API server the way the e2e tests, the demo and the benchmark all begin: the
//! `GoToOAuthClient` CRD applied and served, and a namespace to work in.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};

use crate::resource::GoToOAuthClient;

/// Applies the CRD (server-side apply under `field_manager`) and waits, up to `deadline`, until
/// the API server serves the custom resource (a real one takes a moment to establish it).
pub async fn install_crd(
    client: &Client,
    field_manager: &str,
    deadline: Duration,
) -> Result<(), String> {
    let crd = GoToOAuthClient::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| format!("apply CRD {name}: {e}"))?;
    let clients: Api<GoToOAuthClient> = Api::all(client.clone());
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match clients.list(&Default::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= until => {
                return Err(format!("CRD {name} not served after {deadline:?}: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Creates a namespace.
pub async fn create_namespace(client: &Client, name: &str) -> Result<(), String> {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .map(|_| ())
        .map_err(|e| format!("create namespace {name}: {e}"))
}
