//! Leader election: only the replica holding the Lease reconciles and refreshes.
//!
//! Built on `kube-lease-manager` (maintained, kube 5, server-side apply on a
//! coordination.k8s.io/v1 Lease, tolerant of clock skew through its grace period) rather than a
//! hand-written lease loop. Every replica serves the authorize/callback endpoint regardless; the
//! callback writes through the API, so the leader picks the result up from its watches.

use std::{future::Future, sync::Arc, time::Duration};

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::controller::{self, Context};

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

/// Runs the controller while this replica holds the Lease, stopping it as soon as leadership is
/// lost, until `shutdown` resolves. The Lease is released on shutdown so a successor takes over
/// at once.
pub async fn run_when_leader(
    client: Client,
    ctx: Arc<Context>,
    lease: LeaseSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), kube_lease_manager::LeaseManagerError> {
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
    let (mut is_leader, task) = manager.watch().await;
    info!(identity = %lease.identity, lease = %lease.name, "waiting for leadership");
    loop {
        if *shutdown.borrow() {
            break;
        }
        if *is_leader.borrow_and_update() {
            info!("became leader; starting the controller");
            ctx.metrics.leader.set(1);
            let mut lost = is_leader.clone();
            let mut stop = shutdown.clone();
            controller::run(ctx.clone(), async move {
                tokio::select! {
                    _ = wait_for(&mut lost, false) => {}
                    _ = wait_for(&mut stop, true) => {}
                }
            })
            .await;
            ctx.metrics.leader.set(0);
            info!("controller stopped (leadership lost or shutting down)");
            continue;
        }
        tokio::select! {
            changed = is_leader.changed() => {
                if changed.is_err() {
                    warn!("lease manager stopped");
                    break;
                }
            }
            _ = shutdown.changed() => {}
        }
    }
    // Dropping the receiver makes the manager release the Lease and finish.
    drop(is_leader);
    match task.await {
        Ok(Ok(_)) => info!("lease released"),
        Ok(Err(e)) => warn!(error = %e, "releasing the lease failed"),
        Err(e) => warn!(error = %e, "lease task failed"),
    }
    Ok(())
}

async fn wait_for(rx: &mut watch::Receiver<bool>, value: bool) {
    while *rx.borrow_and_update() != value {
        if rx.changed().await.is_err() {
            // The sender is gone: treat as the condition holding, so the controller stops.
            return;
        }
    }
}

/// Runs the controller without leader election (single replica, or tests).
pub fn run_always(
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) -> impl Future<Output = ()> {
    ctx.metrics.leader.set(1);
    controller::run(ctx, async move { wait_for(&mut shutdown, true).await })
}
