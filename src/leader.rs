//! Leader election: only the replica holding the Lease reconciles and refreshes.
//!
//! Built on `kube-lease-manager` (maintained, kube 5, server-side apply on a
//! coordination.k8s.io/v1 Lease, tolerant of clock skew through its grace period) rather than a
//! hand-written lease loop. [`elect`] reports leadership as a `watch` of `bool`; what runs while
//! leading is the caller's business (`app`), so this module knows nothing of the controller.
//! [`Leadership`] is the handle the context keeps to confirm, right before a refresh, that the
//! Lease is still this replica's.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};

/// Lease parameters.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease is valid after its last renewal.
    pub duration: Duration,
    /// How long before expiry the holder renews.
    pub grace: Duration,
}

/// Whether this replica may act as the leader right now.
#[derive(Clone)]
pub struct Leadership {
    lease: Option<(Client, LeaseSettings)>,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &self.lease.as_ref().map(|(_, lease)| lease))
            .finish()
    }
}

impl Leadership {
    /// No election: this replica always leads (one replica, or tests).
    pub fn always() -> Leadership {
        Leadership { lease: None }
    }

    /// Leadership through `lease`.
    pub fn elected(client: Client, lease: LeaseSettings) -> Leadership {
        Leadership {
            lease: Some((client, lease)),
        }
    }

    /// Whether the Lease is held by this replica and not expired. The election task only
    /// learns of a lost Lease when a renewal fails; a refresh must never rely on that, because
    /// two replicas refreshing the same token at once can lose a rotated refresh token.
    pub(crate) async fn confirm(&self) -> Result<bool, kube::Error> {
        let Some((client, lease)) = &self.lease else {
            return Ok(true);
        };
        let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
        let Some(spec) = api.get_opt(&lease.name).await?.and_then(|l| l.spec) else {
            return Ok(false);
        };
        let ours = spec.holder_identity.as_deref() == Some(lease.identity.as_str());
        let valid_until = spec.renew_time.map(|t| {
            t.0 + jiff::SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or(0),
            ))
        });
        Ok(ours && valid_until.is_some_and(|until| until > Timestamp::now()))
    }
}

/// A running election: `is_leader` follows the Lease; dropping it releases the Lease, after
/// which `task` finishes.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    pub task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

/// Starts competing for the Lease.
pub async fn elect(client: Client, lease: &LeaseSettings) -> Result<Election, LeaseManagerError> {
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration.as_secs().max(2))
        .with_grace(lease.grace.as_secs().max(1))
        // kube-lease-manager detects a competing holder through a server-side-apply conflict,
        // which only happens between different field managers: one per replica.
        .with_field_manager(format!(
            "{}-lease-{}",
            crate::resource::MANAGER,
            lease.identity
        ))
        .build()
        .await?;
    let (is_leader, task) = manager.watch().await;
    Ok(Election { is_leader, task })
}
