//! Leader election: only the replica holding the Lease reconciles and refreshes.
//!
//! Built on `kube-lease-manager` (maintained, kube 5, server-side apply on a
//! coordination.k8s.io/v1 Lease, tolerant of clock skew through its grace period) rather than a
//! hand-written lease protocol. [`elect`] reports leadership as a `watch` of `bool`; what runs
//! while leading is the caller's business (`app`), so this module knows nothing of the
//! controller. [`Leadership`] is the handle the context keeps to confirm, right before a
//! refresh, that the Lease is still this replica's.
//!
//! kube-lease-manager alone lets a waiting replica sleep until the Lease it last saw would
//! expire, so a Lease released by a graceful stop would sit free for up to a lease duration.
//! [`elect`] therefore also reads the Lease every retry period while not leading and, when it
//! finds it released, starts over with a fresh manager, which takes it at once.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, warn};

/// How long a Lease stays valid, when its holder renews it, how often the others look.
///
/// Shorter is a faster fail-over after a crash (a replica killed without releasing the Lease
/// is replaced after at most `duration`), paid for with more Lease writes and a higher risk
/// that a slow API server makes the leader miss its renewal and stop. A graceful stop releases
/// the Lease, so the others take it within `retry_period` whatever `duration` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long the Lease is valid after its last renewal (whole seconds: the Lease stores
    /// seconds).
    pub duration: Duration,
    /// How long before expiry the holder renews (whole seconds): the holder renews every
    /// `duration - renew_before`, and this is also the clock skew between nodes it tolerates.
    pub renew_before: Duration,
    /// How often a replica that does not lead reads the Lease to find it released.
    pub retry_period: Duration,
}

/// A combination of Lease timings that cannot work.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum TimingError {
    #[error("--lease-duration must be whole seconds and at least 2s, got {0:?}")]
    Duration(Duration),
    #[error("--lease-renew-before must be whole seconds and at least 1s, got {0:?}")]
    RenewBefore(Duration),
    #[error(
        "--lease-renew-before ({renew_before:?}) must be shorter than --lease-duration \
         ({duration:?}): the holder renews that long before the Lease expires"
    )]
    RenewAfterExpiry {
        renew_before: Duration,
        duration: Duration,
    },
    #[error(
        "--lease-retry-period must be at least 100ms and shorter than --lease-duration \
         ({duration:?}), got {retry_period:?}"
    )]
    RetryPeriod {
        retry_period: Duration,
        duration: Duration,
    },
}

impl Timing {
    /// The defaults of the `run` flags: fail-over after a crash within 15 s, a renewal every
    /// 10 s, a released Lease taken within 2 s.
    pub const DEFAULT: Timing = Timing {
        duration: Duration::from_secs(15),
        renew_before: Duration::from_secs(5),
        retry_period: Duration::from_secs(2),
    };

    /// Checks that the timings can work together.
    pub fn new(
        duration: Duration,
        renew_before: Duration,
        retry_period: Duration,
    ) -> Result<Timing, TimingError> {
        let whole = |d: Duration| d.subsec_nanos() == 0;
        if !whole(duration) || duration < Duration::from_secs(2) {
            return Err(TimingError::Duration(duration));
        }
        if !whole(renew_before) || renew_before < Duration::from_secs(1) {
            return Err(TimingError::RenewBefore(renew_before));
        }
        if renew_before >= duration {
            return Err(TimingError::RenewAfterExpiry {
                renew_before,
                duration,
            });
        }
        if retry_period < Duration::from_millis(100) || retry_period >= duration {
            return Err(TimingError::RetryPeriod {
                retry_period,
                duration,
            });
        }
        Ok(Timing {
            duration,
            renew_before,
            retry_period,
        })
    }
}

/// Lease parameters.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub timing: Timing,
}

/// Whether this replica may act as the leader right now.
#[derive(Clone)]
pub struct Leadership {
    lease: Option<(Client, LeaseSettings)>,
    /// Until when the last read of the Lease proves it this replica's: its renewal time plus
    /// the duration, less `renew_before`. No other replica takes a Lease before it expires, and
    /// `renew_before` is the clock skew the election tolerates, so within this time a refresh
    /// needs no read of its own (one Lease GET per refresh was most of a storm's reads).
    confirmed_until: Arc<Mutex<Option<Timestamp>>>,
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
        Leadership {
            lease: None,
            confirmed_until: Arc::default(),
        }
    }

    /// Leadership through `lease`.
    pub fn elected(client: Client, lease: LeaseSettings) -> Leadership {
        Leadership {
            lease: Some((client, lease)),
            confirmed_until: Arc::default(),
        }
    }

    /// Whether the Lease is held by this replica and not expired. The election task only
    /// learns of a lost Lease when a renewal fails; a refresh must never rely on that, because
    /// two replicas refreshing the same token at once can lose a rotated refresh token. The
    /// Lease is read when the last read no longer proves it ours (see `confirmed_until`).
    pub(crate) async fn confirm(&self) -> Result<bool, kube::Error> {
        let Some((client, lease)) = &self.lease else {
            return Ok(true);
        };
        let now = Timestamp::now();
        let mut confirmed = self
            .confirmed_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|until| *until > now);
        if confirmed.is_none() {
            let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
            let spec = api.get_opt(&lease.name).await?.and_then(|l| l.spec);
            confirmed = spec.and_then(|spec| confirmed_until(&spec, lease, now));
            *self
                .confirmed_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = confirmed;
        }
        Ok(confirmed.is_some())
    }
}

/// Until when `spec` (as just read) proves the Lease `lease.identity`'s, if it does at `now`:
/// until its expiry less `renew_before`.
fn confirmed_until(spec: &LeaseSpec, lease: &LeaseSettings, now: Timestamp) -> Option<Timestamp> {
    if spec.holder_identity.as_deref() != Some(lease.identity.as_str()) {
        return None;
    }
    let expires = spec
        .renew_time
        .as_ref()?
        .0
        .checked_add(jiff::SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds.unwrap_or(0),
        )));
    let margin = jiff::SignedDuration::try_from(lease.timing.renew_before).ok()?;
    expires
        .ok()?
        .checked_sub(margin)
        .ok()
        .filter(|until| *until > now)
}

/// A running election: `is_leader` follows the Lease; dropping it releases the Lease (when
/// held), after which `task` finishes.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    pub task: JoinHandle<Result<(), LeaseManagerError>>,
}

/// Starts competing for the Lease.
pub async fn elect(client: Client, lease: &LeaseSettings) -> Result<Election, LeaseManagerError> {
    let manager = new_manager(&client, lease).await?;
    let (tx, is_leader) = watch::channel(false);
    let task = tokio::spawn(campaign(client, lease.clone(), manager, tx));
    Ok(Election { is_leader, task })
}

/// A fresh manager: it reads the Lease before deciding anything.
async fn new_manager(
    client: &Client,
    lease: &LeaseSettings,
) -> Result<LeaseManager, LeaseManagerError> {
    LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.timing.duration.as_secs())
        .with_grace(lease.timing.renew_before.as_secs())
        // kube-lease-manager detects a competing holder through a server-side-apply conflict,
        // which only happens between different field managers: one per replica.
        .with_field_manager(format!(
            "{}-lease-{}",
            crate::resource::MANAGER,
            lease.identity
        ))
        .build()
        .await
}

/// What ended one wait of [`campaign`].
enum Step {
    /// Nobody listens any more: release and stop.
    Stop,
    Changed(Result<bool, LeaseManagerError>),
    /// The Lease was released while this replica waited for it to expire.
    Released,
}

/// Holds or waits for the Lease, publishing leadership on `tx`, until every receiver is gone;
/// then releases the Lease if held.
async fn campaign(
    client: Client,
    lease: LeaseSettings,
    mut manager: LeaseManager,
    tx: watch::Sender<bool>,
) -> Result<(), LeaseManagerError> {
    let mut leading = false;
    loop {
        let step = {
            // Cancelling `changed` while it waits only drops a sleep; a renewal or take-over
            // cut short is re-read by the next manager, which starts from the stored Lease.
            let changed = manager.changed();
            tokio::pin!(changed);
            tokio::select! {
                biased;
                _ = tx.closed() => Step::Stop,
                result = &mut changed => Step::Changed(result),
                _ = released(&client, &lease), if !leading => Step::Released,
            }
        };
        match step {
            Step::Stop => break,
            Step::Changed(Ok(now_leading)) => {
                leading = now_leading;
                if tx.send(leading).is_err() {
                    break;
                }
            }
            Step::Changed(Err(e)) => {
                // The holder keeps leading until its Lease runs out; `Leadership::confirm`
                // guards every refresh meanwhile.
                warn!(error = %e, "reading or renewing the Lease failed; retrying");
                tokio::time::sleep(lease.timing.retry_period).await;
            }
            Step::Released => {
                debug!(lease = %lease.name, "Lease released by its holder; taking it");
                match new_manager(&client, &lease).await {
                    Ok(fresh) => manager = fresh,
                    Err(e) => {
                        warn!(error = %e, "reading the Lease failed; retrying");
                        tokio::time::sleep(lease.timing.retry_period).await;
                    }
                }
            }
        }
    }
    if leading {
        manager.release().await?;
    }
    Ok(())
}

/// Resolves once the Lease has no holder (released) or is missing, checking every retry
/// period.
async fn released(client: &Client, lease: &LeaseSettings) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    loop {
        tokio::time::sleep(lease.timing.retry_period).await;
        match api.get_opt(&lease.name).await {
            Ok(found) if is_free(found.as_ref()) => return,
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading the Lease failed"),
        }
    }
}

/// Whether `lease` can be taken without waiting: missing, or released (no holder).
fn is_free(lease: Option<&Lease>) -> bool {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn timings_must_fit_together() {
        assert_eq!(Timing::new(secs(15), secs(5), secs(2)), Ok(Timing::DEFAULT));
        assert!(Timing::new(secs(2), secs(1), Duration::from_millis(100)).is_ok());
        for (duration, renew_before, retry, want) in [
            (secs(1), secs(1), secs(1), "--lease-duration"),
            (
                Duration::from_millis(2500),
                secs(1),
                secs(1),
                "whole seconds",
            ),
            (
                secs(15),
                Duration::ZERO,
                secs(1),
                "--lease-renew-before must be",
            ),
            (
                secs(15),
                Duration::from_millis(1500),
                secs(1),
                "whole seconds",
            ),
            (secs(15), secs(15), secs(1), "shorter than --lease-duration"),
            (secs(15), secs(20), secs(1), "shorter than --lease-duration"),
            (secs(15), secs(5), secs(15), "--lease-retry-period"),
            (
                secs(15),
                secs(5),
                Duration::from_millis(10),
                "--lease-retry-period",
            ),
        ] {
            let err = Timing::new(duration, renew_before, retry).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{duration:?}/{renew_before:?}/{retry:?}: {err}"
            );
        }
    }

    #[test]
    fn only_a_lease_without_holder_is_free() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        assert!(is_free(None), "missing");
        assert!(is_free(Some(&lease(None))), "released");
        assert!(is_free(Some(&lease(Some("")))), "released");
        assert!(is_free(Some(&Lease::default())), "no spec");
        assert!(!is_free(Some(&lease(Some("replica-a")))));
    }

    /// A read Lease proves leadership until its expiry less the tolerated clock skew, and only
    /// when it names this replica.
    #[test]
    fn a_read_lease_is_trusted_until_expiry_less_renew_before() {
        let settings = LeaseSettings {
            namespace: "ops".into(),
            name: "goto-oauth-operator".into(),
            identity: "replica-a".into(),
            timing: Timing::DEFAULT,
        };
        let renewed: Timestamp = "2026-12-02T10:00:00Z".parse().unwrap();
        let spec = |holder: &str| LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let at = |s: i64| renewed + jiff::SignedDuration::from_secs(s);
        assert_eq!(
            confirmed_until(&spec("replica-a"), &settings, at(1)),
            Some(at(10)),
            "15 s Lease, 5 s skew margin"
        );
        assert_eq!(confirmed_until(&spec("replica-a"), &settings, at(10)), None);
        assert_eq!(confirmed_until(&spec("replica-b"), &settings, at(1)), None);
        let mut never_renewed = spec("replica-a");
        never_renewed.renew_time = None;
        assert_eq!(confirmed_until(&never_renewed, &settings, at(1)), None);
    }

    /// One read of the Lease serves every refresh within its proof; a Lease taken by another
    /// replica is never trusted.
    #[tokio::test]
    async fn refreshes_within_the_proof_read_the_lease_once() {
        let server = fake_apiserver::FakeApiServer::start().await;
        let proxy = kube_fault_proxy::FaultProxy::start(server.client())
            .await
            .unwrap();
        let settings = LeaseSettings {
            namespace: "default".into(),
            name: "goto-oauth-operator".into(),
            identity: "replica-a".into(),
            timing: Timing::DEFAULT,
        };
        let leases: Api<Lease> = Api::namespaced(proxy.client(), "default");
        let lease = |holder: &str| Lease {
            metadata: kube::api::ObjectMeta {
                name: Some("goto-oauth-operator".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_duration_seconds: Some(15),
                ..LeaseSpec::default()
            }),
        };
        leases
            .create(&Default::default(), &lease("replica-a"))
            .await
            .unwrap();
        let lease_reads = || {
            proxy
                .request_log()
                .iter()
                .filter(|r| r.verb == "get" && r.path.ends_with("/leases/goto-oauth-operator"))
                .count()
        };
        let ours = Leadership::elected(proxy.client(), settings.clone());
        for _ in 0..100 {
            assert!(ours.confirm().await.unwrap());
        }
        assert_eq!(lease_reads(), 1);

        let theirs = Leadership::elected(
            proxy.client(),
            LeaseSettings {
                identity: "replica-b".into(),
                ..settings
            },
        );
        for _ in 0..3 {
            assert!(!theirs.confirm().await.unwrap());
        }
        assert_eq!(
            lease_reads(),
            4,
            "a Lease that is not ours is read every time"
        );
    }
}
