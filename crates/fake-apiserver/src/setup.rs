//! Preparing an API server the way the e2e tests, the demo and the benchmark all begin: a CRD
//! applied and served, and a namespace to work in. They work on any API server, this crate's or
//! a real cluster's.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams},
};

/// Applies `crd` (server-side apply under `field_manager`) and waits, up to `deadline`, until
/// the API server serves its custom resources (a real one takes a moment to establish them).
pub async fn install_crd(
    client: &Client,
    crd: CustomResourceDefinition,
    field_manager: &str,
    deadline: Duration,
) -> Result<(), String> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let version = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage)
        .or_else(|| crd.spec.versions.first())
        .map(|v| v.name.clone())
        .ok_or_else(|| format!("CRD {name} declares no version"))?;
    let resource = ApiResource {
        group: crd.spec.group.clone(),
        api_version: format!("{}/{version}", crd.spec.group),
        version,
        kind: crd.spec.names.kind.clone(),
        plural: crd.spec.names.plural.clone(),
    };
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            &name,
            &PatchParams::apply(field_manager).force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| format!("apply CRD {name}: {e}"))?;
    let objects: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match objects.list(&Default::default()).await {
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
