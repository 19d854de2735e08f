//! Prometheus metrics and the operations endpoint (`/healthz`, `/readyz`, `/metrics`).
//!
//! Labels are only namespace, name, result and reason values from fixed sets: nothing
//! token-grade, and no unbounded label values besides the clients themselves (whose series are
//! removed when a client is deleted).
//!
//! The per-client series (readiness, authorization phase, access token expiry, refresh token
//! issue time) are every replica's, leader or not: each keeps [`ClientFacts`] from its own watch
//! of the clients ([`crate::client_cache`]), so the alerts keep working through a fail-over and
//! while no replica leads. `goto_oauth_client_ready` is worked out at scrape time, so it turns 0
//! when the access token expires even though no leader wrote the status.

use std::{
    collections::HashMap,
    num::NonZeroI64,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use jiff::Timestamp;

use crate::{
    clock::Clock,
    conditions,
    resource::{AuthorizationPhase, GoToOAuthClient, GoToOAuthClientStatus},
};
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        text::encode,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

/// A client's labels. Shared (`Arc`): a scrape writes each client's eight or more series with
/// clones of the one key, not copies of its namespace and name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ClientLabels {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

/// Label values that are a fixed set: a typed enum each, written as its `as_str`.
macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

/// How a refresh ended, as counted in `goto_oauth_refresh_total{result}`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RefreshResult {
    Success,
    TransientError,
    RateLimited,
    InvalidGrant,
    InvalidClient,
}

impl RefreshResult {
    pub const ALL: [RefreshResult; 5] = [
        RefreshResult::Success,
        RefreshResult::TransientError,
        RefreshResult::RateLimited,
        RefreshResult::InvalidGrant,
        RefreshResult::InvalidClient,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshResult::Success => "success",
            RefreshResult::TransientError => "transient_error",
            RefreshResult::RateLimited => "rate_limited",
            RefreshResult::InvalidGrant => "invalid_grant",
            RefreshResult::InvalidClient => "invalid_client",
        }
    }
}
label_value!(RefreshResult);

/// The OAuth grant of a token-endpoint request.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum GrantType {
    AuthorizationCode,
    RefreshToken,
    PersonalAccessToken,
}

impl GrantType {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantType::AuthorizationCode => "authorization_code",
            GrantType::RefreshToken => "refresh_token",
            GrantType::PersonalAccessToken => "personal_access_token",
        }
    }
}
label_value!(GrantType);
label_value!(AuthorizationPhase);

/// A client's series of `goto_oauth_client_authorization_phase`: one per phase, 1 for the
/// current one (the kube-state-metrics shape, so `== 1` selects and absent means unknown).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub phase: AuthorizationPhase,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub result: RefreshResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenRequestLabels {
    pub grant_type: GrantType,
    /// `success` or the token endpoint error's fixed label (`OAuthError::reason`).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// What a client's per-client series are derived from: its status as this replica last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClientFacts {
    /// The `Ready` condition is True.
    ready_condition: bool,
    /// Unix seconds (what the series show; the status has no finer times). Eight bytes with
    /// the niche of zero, against 24 for an optional `Timestamp`: one entry is per client.
    access_token_expires_at: Option<NonZeroI64>,
    refresh_token_obtained_at: Option<NonZeroI64>,
    phase: Option<AuthorizationPhase>,
}

impl ClientFacts {
    pub(crate) fn of(status: Option<&GoToOAuthClientStatus>) -> ClientFacts {
        let Some(status) = status else {
            return ClientFacts::default();
        };
        ClientFacts {
            ready_condition: status
                .conditions
                .iter()
                .any(|c| c.type_ == conditions::READY && c.status == "True"),
            access_token_expires_at: status
                .access_token_expires_at
                .as_ref()
                .and_then(|t| NonZeroI64::new(t.0.as_second())),
            refresh_token_obtained_at: status
                .refresh_token_obtained_at
                .as_ref()
                .and_then(|t| NonZeroI64::new(t.0.as_second())),
            phase: status.authorization.as_ref().map(|a| a.phase),
        }
    }

    /// Ready at `now`: the status says so and the access token it names has not expired. A
    /// status nobody rewrote (no leader, or a leader that has not reached the client yet) does
    /// not keep an expired token ready.
    pub(crate) fn ready_at(&self, now: Timestamp) -> bool {
        self.ready_condition
            && self
                .access_token_expires_at
                .is_none_or(|expires| expires.get() > now.as_second())
    }
}

/// One client's per-client series as plain values.
#[derive(Debug, Default)]
struct ClientEntry {
    facts: ClientFacts,
    /// `goto_oauth_refresh_total`, indexed by [`RefreshResult`] (`as usize`). 32 bits: a
    /// client retrying once a second would take 136 years to fill one.
    refreshes: [u32; RefreshResult::ALL.len()],
}

/// Every client's series, kept as values and written out at scrape time (a [`Collector`]):
/// a `Family` would keep a labelled atomic per series, nine or more a client, which at 10,000
/// clients was the largest store after the cached objects. `goto_oauth_client_ready` is worked
/// out at the scrape from the clock.
#[derive(Debug)]
struct ClientSeries {
    clients: Mutex<HashMap<ClientLabels, ClientEntry>>,
    /// Whose "now" decides whether an access token has expired.
    clock: Clock,
}

impl ClientSeries {
    fn all(&self) -> std::sync::MutexGuard<'_, HashMap<ClientLabels, ClientEntry>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads or changes one client's entry, creating it if needed.
    fn with(&self, namespace: &str, name: &str, f: impl FnOnce(&mut ClientEntry)) {
        let mut all = self.all();
        let probe = Metrics::client(namespace, name);
        f(all.entry(probe).or_default());
    }
}

impl Collector for ClientSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = self.clock.now();
        let all = self.all();
        let gauge = |encoder: &mut DescriptorEncoder,
                     name: &str,
                     help: &str,
                     value: &dyn Fn(&ClientFacts) -> Option<i64>|
         -> Result<(), std::fmt::Error> {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, entry) in all.iter() {
                if let Some(v) = value(&entry.facts) {
                    ConstGauge::new(v).encode(family.encode_family(labels)?)?;
                }
            }
            Ok(())
        };
        gauge(
            &mut encoder,
            "token_expiry_timestamp_seconds",
            "Unix time at which the stored access token expires",
            &|f| f.access_token_expires_at.map(NonZeroI64::get),
        )?;
        gauge(
            &mut encoder,
            "client_ready",
            "1 when the client's Ready condition is True and its access token has not expired, else 0",
            &|f| Some(i64::from(f.ready_at(now))),
        )?;
        gauge(
            &mut encoder,
            "refresh_token_obtained_timestamp_seconds",
            "Unix time at which GoTo issued the stored refresh token (consent or rotation)",
            &|f| f.refresh_token_obtained_at.map(NonZeroI64::get),
        )?;
        let mut family = encoder.encode_descriptor(
            "client_authorization_phase",
            "1 for the client's current status.authorization.phase, 0 for the other phases",
            None,
            MetricType::Gauge,
        )?;
        for (labels, entry) in all.iter() {
            let Some(current) = entry.facts.phase else {
                continue;
            };
            for phase in AuthorizationPhase::ALL {
                let labels = PhaseLabels {
                    namespace: labels.namespace.clone(),
                    name: labels.name.clone(),
                    phase,
                };
                ConstGauge::new(i64::from(phase == current))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "refresh",
            "Token refreshes by result (success, transient_error, rate_limited, invalid_grant, invalid_client, ...)",
            None,
            MetricType::Counter,
        )?;
        for (labels, entry) in all.iter() {
            for result in RefreshResult::ALL {
                let count = entry.refreshes[result as usize];
                if count > 0 {
                    let labels = RefreshLabels {
                        namespace: labels.namespace.clone(),
                        name: labels.name.clone(),
                        result,
                    };
                    ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub token_request_duration: Family<TokenRequestLabels, Histogram>,
    /// From a token response received to its Secret write acknowledged: the window in which a
    /// killed process loses a rotated refresh token.
    pub token_store_duration: Histogram,
    pub reconcile_duration: Histogram,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub leader: Gauge,
    /// Token requests per second the limiter allowed at the last token request.
    pub token_rate_limit: Gauge,
    pub token_rate_limit_decreases: Counter,
    /// Set once the API server has answered; cleared when it stops answering.
    api_reachable: AtomicBool,
    /// The per-client series, written out at scrape time.
    clients: Arc<ClientSeries>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(Clock::system())
    }
}

impl Metrics {
    /// The metrics, with `clock` deciding when an access token has expired.
    pub fn new(clock: Clock) -> Self {
        let mut registry = Registry::with_prefix("goto_oauth");
        let clients = Arc::new(ClientSeries {
            clients: Mutex::default(),
            clock,
        });
        registry.register_collector(Box::new(clients.clone()));
        let token_request_duration =
            Family::<TokenRequestLabels, Histogram>::new_with_constructor(|| {
                Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            });
        registry.register(
            "token_request_duration_seconds",
            "Duration of requests to GoTo's token endpoint",
            token_request_duration.clone(),
        );
        // Fine buckets: the window is a few milliseconds, and the benchmark reads its median
        // and p99 from them.
        let token_store_duration = Histogram::new([
            0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
            0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "token_store_duration_seconds",
            "Time from a token response received from GoTo to the token Secret write acknowledged",
            token_store_duration.clone(),
        );
        let reconcile_duration =
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconcile errors by reason",
            reconcile_errors.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controller",
            leader.clone(),
        );
        let token_rate_limit = Gauge::default();
        registry.register(
            "token_rate_limit_per_second",
            "Token requests per second the limiter allowed at the last token request: --token-rate-limit, lowered after a 429 from GoTo until it recovers",
            token_rate_limit.clone(),
        );
        let token_rate_limit_decreases = Counter::default();
        registry.register(
            "token_rate_limit_decreases",
            "Times a 429 from GoTo lowered the allowed token request rate",
            token_rate_limit_decreases.clone(),
        );
        Metrics {
            registry,
            token_rate_limit,
            token_rate_limit_decreases,
            token_request_duration,
            token_store_duration,
            reconcile_duration,
            reconcile_errors,
            leader,
            api_reachable: AtomicBool::new(false),
            clients,
        }
    }

    /// The text exposition format; `goto_oauth_client_ready` as of now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn client(namespace: &str, name: &str) -> ClientLabels {
        ClientLabels {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Counts one refresh of the client (a client not observed yet gets its entry now).
    pub fn count_refresh(&self, namespace: &str, name: &str, result: RefreshResult) {
        self.clients.with(namespace, name, |series| {
            let count = &mut series.refreshes[result as usize];
            *count = count.saturating_add(1);
        });
    }

    /// Sets the client's series from its status (`None`: it has none yet).
    pub(crate) fn observe_client(
        &self,
        namespace: &str,
        name: &str,
        status: Option<&GoToOAuthClientStatus>,
    ) {
        let facts = ClientFacts::of(status);
        self.clients
            .with(namespace, name, |series| series.facts = facts);
    }

    /// [`Metrics::observe_client`] for a client as the watch delivers it.
    pub(crate) fn observe(&self, obj: &GoToOAuthClient) {
        if let (Some(namespace), Some(name)) = (&obj.metadata.namespace, &obj.metadata.name) {
            self.observe_client(namespace, name, obj.status.as_ref());
        }
    }

    /// After a relist of `scope` (all namespaces when `None`), which observed the clients there
    /// now (`alive`, as namespace and name): the series of the others in `scope` go.
    pub(crate) fn retain_clients(
        &self,
        scope: Option<&str>,
        alive: &std::collections::HashSet<(String, String)>,
    ) {
        self.clients.all().retain(|labels, _| {
            scope.is_some_and(|ns| ns != &*labels.namespace)
                || alive.contains(&(labels.namespace.to_string(), labels.name.to_string()))
        });
    }

    /// Drops a deleted client's series so dashboards do not show ghosts.
    pub fn forget_client(&self, namespace: &str, name: &str) {
        self.clients.all().remove(&Self::client(namespace, name));
    }

    /// Observes the time until the returned guard is dropped as one reconcile's duration.
    pub(crate) fn time_reconcile(&self) -> ReconcileTimer<'_> {
        ReconcileTimer {
            histogram: &self.reconcile_duration,
            started: std::time::Instant::now(),
        }
    }

    pub fn set_api_reachable(&self, reachable: bool) {
        self.api_reachable.store(reachable, Ordering::Relaxed);
    }

    pub fn api_reachable(&self) -> bool {
        self.api_reachable.load(Ordering::Relaxed)
    }
}

/// Records a reconcile's duration when dropped, whichever way the reconcile returned.
pub(crate) struct ReconcileTimer<'a> {
    histogram: &'a Histogram,
    started: std::time::Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

/// `/healthz` (the process serves), `/readyz` (the API server answers), `/metrics`.
pub fn ops_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.api_reachable() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Kubernetes API not reachable",
        )
    }
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::default();
        let mut status = ready_status("2027-01-15T08:00:00Z");
        status.refresh_token_obtained_at =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2023-11-14T22:13:20Z".parse().unwrap(),
            ));
        if let Some(authorization) = &mut status.authorization {
            authorization.phase = AuthorizationPhase::ReauthorizationRequired;
        }
        m.observe_client("ns", "a", Some(&status));
        m.count_refresh("ns", "a", RefreshResult::Success);
        m.count_refresh("ns", "a", RefreshResult::Success);
        m.count_refresh("ns", "a", RefreshResult::RateLimited);
        m.leader.set(1);
        let text = m.render();
        for name in [
            "# TYPE goto_oauth_token_expiry_timestamp_seconds gauge",
            "goto_oauth_token_expiry_timestamp_seconds{namespace=\"ns\",name=\"a\"} 1800000000",
            "# TYPE goto_oauth_refresh counter",
            "goto_oauth_refresh_total{namespace=\"ns\",name=\"a\",result=\"success\"} 2",
            "goto_oauth_refresh_total{namespace=\"ns\",name=\"a\",result=\"rate_limited\"} 1",
            "goto_oauth_client_ready{namespace=\"ns\",name=\"a\"} 1",
            "goto_oauth_leader 1",
            "goto_oauth_refresh_token_obtained_timestamp_seconds{namespace=\"ns\",name=\"a\"} 1700000000",
            "goto_oauth_client_authorization_phase{namespace=\"ns\",name=\"a\",phase=\"ReauthorizationRequired\"} 1",
            "goto_oauth_client_authorization_phase{namespace=\"ns\",name=\"a\",phase=\"Authorized\"} 0",
            "goto_oauth_reconcile_duration_seconds",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(
            !text.contains("result=\"transient_error\""),
            "no series for a result that never happened:\n{text}"
        );
        m.forget_client("ns", "a");
        assert!(!m.render().contains("name=\"a\""));
    }

    fn ready_status(expires: &str) -> GoToOAuthClientStatus {
        serde_json::from_value(serde_json::json!({
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Authorized", "message": "",
                "lastTransitionTime": "2026-11-23T09:00:00Z"
            }],
            "accessTokenExpiresAt": expires,
            "refreshTokenObtainedAt": "2026-11-23T09:00:00Z",
            "authorization": {"phase": "Authorized"},
        }))
        .unwrap()
    }

    #[test]
    fn ready_needs_the_condition_and_an_unexpired_token() {
        let at = |t: &str| t.parse::<Timestamp>().unwrap();
        let facts = ClientFacts::of(Some(&ready_status("2026-11-23T10:00:00Z")));
        assert!(facts.ready_at(at("2026-11-23T09:59:59Z")));
        assert!(!facts.ready_at(at("2026-11-23T10:00:00Z")), "expired");
        assert!(!ClientFacts::of(None).ready_at(at("2026-11-23T09:00:00Z")));
        let mut not_ready = ready_status("2026-11-23T10:00:00Z");
        not_ready.conditions[0].status = "False".into();
        assert!(!ClientFacts::of(Some(&not_ready)).ready_at(at("2026-11-23T09:00:00Z")));
    }

    #[test]
    fn readiness_follows_the_clock_at_scrape_time_without_a_status_write() {
        let clock = Clock::manual("2026-11-23T09:30:00Z".parse().unwrap());
        let m = Metrics::new(clock.clone());
        m.observe_client("ns", "a", Some(&ready_status("2026-11-23T10:00:00Z")));
        let ready = "goto_oauth_client_ready{namespace=\"ns\",name=\"a\"}";
        assert!(m.render().contains(&format!("{ready} 1")));
        clock.advance(std::time::Duration::from_secs(31 * 60));
        assert!(
            m.render().contains(&format!("{ready} 0")),
            "expired: not ready"
        );
        assert!(
            m.render().contains(
                "goto_oauth_token_expiry_timestamp_seconds{namespace=\"ns\",name=\"a\"} 1795428000"
            ),
            "{}",
            m.render()
        );
    }

    #[test]
    fn a_relist_drops_the_series_of_clients_gone_from_its_scope_only() {
        let m = Metrics::default();
        let client = |ns: &str, name: &str| {
            let mut obj = GoToOAuthClient::new(
                name,
                serde_json::from_value(serde_json::json!({
                    "clientId": "c", "clientSecretRef": {"name": "creds"}
                }))
                .unwrap(),
            );
            obj.metadata.namespace = Some(ns.into());
            obj.status = Some(ready_status("2099-01-01T00:00:00Z"));
            obj
        };
        m.observe(&client("a", "x"));
        m.observe(&client("a", "y"));
        m.observe(&client("b", "z"));
        m.retain_clients(Some("a"), &[("a".to_string(), "y".to_string())].into());
        let text = m.render();
        assert!(!text.contains("name=\"x\""), "deleted while not watched");
        assert!(text.contains("name=\"y\""));
        assert!(text.contains("name=\"z\""), "another scope's client stays");
    }
}
