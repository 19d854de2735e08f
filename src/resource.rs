//! The `GoToOAuthClient` custom resource (`goto-oauth.dev/v1alpha1`).
//!
//! The spec names a GoTo OAuth client and where its tokens go; the status tells a human (and
//! `kubectl wait`) whether the client is authorized, where to send the GoTo admin, and when the
//! tokens expire and refresh. The CRD YAML in `crds/` is generated from these types by
//! `goto-oauth-operator crd`, so every doc comment here is what `kubectl explain` shows.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of the resource.
pub const API_GROUP: &str = "goto-oauth.dev";
/// The label and field-manager name the operator uses for what it writes.
pub const MANAGER: &str = "goto-oauth-operator";
/// Annotation that rotates the authorization link when its value changes.
pub const ROTATE_LINK_ANNOTATION: &str = "goto-oauth.dev/rotate-authorization-link";
/// Annotation that forces an immediate refresh when its value changes.
pub const FORCE_REFRESH_ANNOTATION: &str = "goto-oauth.dev/refresh-requested";
/// The prefix of the annotations the operator reads on a client (the two above).
const OWN_ANNOTATION_PREFIX: &str = "goto-oauth.dev/";

// CEL rules (`x-kubernetes-validations`) let the API server refuse a spec the operator could
// never use, at `kubectl apply`, with a message naming the field. They only check what needs no
// operator knowledge (formats, schemes); `validation::validate` still checks everything (hosts
// allowed by the operator's flags, the two Secret names differing, ...), and the rules are never
// stricter than it: an empty optional string, which the operator reads as "use the default",
// passes them. Every string a rule reads has a `maxLength`, so the API server's cost estimator
// accepts the regular expressions. `tests/crd_cel.rs` evaluates each rule.

/// RFC 1123 subdomain (Secret names), as a CEL condition on `self`.
macro_rules! dns_subdomain_rule {
    () => {
        r"size(self) <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    };
}

/// A URL the operator may send a browser or a client secret to: https, or http on this machine
/// (development, tests), as in `cli::check_web_url`.
macro_rules! web_url_rule {
    () => {
        r"self.matches('^(?i)https://') || self.matches('^(?i)http://(localhost|127(\\.[0-9]{1,3}){3}|\\[::1\\])(:[0-9]{1,5})?([/?#]|$)')"
    };
}

/// A duration as `humantime` reads it (`20m`, `1h30m`), as a regular expression.
macro_rules! duration_pattern {
    () => {
        "^([0-9]+ ?(ms|s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days|w|week|weeks) ?)+$"
    };
}

/// Longest URL accepted in the spec.
const MAX_URL: u32 = 2048;

/// A GoTo (LogMeIn) OAuth client whose tokens the operator obtains once through a GoTo admin's
/// consent and then keeps fresh in a Secret for as long as this resource exists.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "goto-oauth.dev",
    version = "v1alpha1",
    kind = "GoToOAuthClient",
    namespaced,
    shortname = "gotoclient",
    status = "GoToOAuthClientStatus",
    doc = "A GoTo OAuth client whose access and refresh tokens the operator keeps in a Secret.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Expires","type":"date","jsonPath":".status.accessTokenExpiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct GoToOAuthClientSpec {
    /// The OAuth client ID from GoTo's developer portal (OAuth Clients → your client). Not
    /// empty, without ':'.
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.trim() != '' && !self.contains(':')")
        .message("clientId must not be empty and must not contain ':'"))]
    pub client_id: String,

    /// The Secret in this namespace that holds the OAuth client secret.
    pub client_secret_ref: ClientSecretRef,

    /// The redirect URI registered on the OAuth client in GoTo's developer portal. Defaults to
    /// `<operator public URL>/callback`. It must reach this operator's callback endpoint, use
    /// https (http only for localhost / 127.0.0.1 during development) and be registered at GoTo
    /// byte for byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL))]
    #[x_kube(validation = Rule::new(web_url_rule!())
        .message("redirectUri must be an https URL (http only for localhost/127.0.0.1)"))]
    pub redirect_uri: Option<String>,

    /// Scopes to request. GoTo grants only scopes enabled on the OAuth client; leave empty to get
    /// all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,

    /// Name of the Secret (in this namespace) the tokens are written to. Defaults to
    /// `<metadata.name>-token`. The operator owns this Secret and never takes over one it did
    /// not create. A DNS-1123 subdomain, like every Secret name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(concat!("self == '' || (", dns_subdomain_rule!(), ")"))
        .message("secretName must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    pub secret_name: Option<String>,

    /// How long before the access token expires it is refreshed, as a duration such as `20m` or
    /// `1h`. Defaults to one third of the token's lifetime (20 minutes for GoTo's 60-minute
    /// tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(concat!("self == '' || self.matches('", duration_pattern!(), "')"))
        .message("refreshBefore must be a duration such as 20m, 1h or 1h30m"))]
    pub refresh_before: Option<String>,

    /// Per-client override of the operator-wide GoTo endpoints (for example the legacy or a
    /// regional host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Box<Endpoints>>,

    /// Labels and annotations copied onto the token Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<Box<SecretTemplate>>,

    /// The GoTo account that must give the consent: its e-mail address (compared without
    /// regard to case) or its account key. A consent by any other account is refused, and its
    /// tokens are not stored. Empty: any account that can consent is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_account: Option<String>,

    /// A name for the application these tokens are for, as a GoTo admin would recognise it
    /// (e.g. `Payroll sync`). The pages an admin sees at the end of an authorization use it;
    /// empty: the resource's name. At most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub display_name: Option<String>,

    /// Workloads in this namespace to restart (as `kubectl rollout restart` does) when the
    /// tokens change in a way their pods only see on start: pods that read the token Secret
    /// into environment variables. Pods that mount the Secret as a volume see new tokens without
    /// a restart and need no entry here. Restarting needs extra RBAC (see the README).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub rollout_restart_targets: Vec<RolloutRestartTarget>,

    /// Which token changes restart the targets: `Authorization` (a new consent),
    /// `RefreshTokenRotation` (GoTo issued a new refresh token) and `AccessToken` (every
    /// refresh, about hourly: only for consumers that hold the access token itself from their
    /// start). Defaults to `[Authorization, RefreshTokenRotation]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 3))]
    pub rollout_restart_on: Option<Vec<RolloutRestartTrigger>>,

    /// The shortest time between two restarts of the targets, as a duration such as `5m`
    /// (the default). Changes inside this window are coalesced into one restart at its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new(concat!("self == '' || self.matches('", duration_pattern!(), "')"))
        .message("rolloutRestartMinInterval must be a duration such as 5m, 1h or 1h30m"))]
    pub rollout_restart_min_interval: Option<String>,

    /// The Secret in this namespace that holds a GoTo personal access token (PAT) of this OAuth
    /// client, to obtain tokens without a browser: while no tokens are stored, the operator
    /// exchanges the PAT at the token URL (`grant_type=personal_access_token`). It refreshes
    /// with the refresh token when GoTo returns one, and exchanges the PAT again when the
    /// access token is due and no refresh token is stored, or when GoTo rejects the refresh
    /// token. A PAT GoTo rejects is not sent again until its Secret or this spec changes. The
    /// authorization link stays published: a consent still replaces the tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub personal_access_token_ref: Option<Box<PersonalAccessTokenRef>>,
}

/// A workload restarted when the tokens change.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartTarget {
    /// `Deployment`, `StatefulSet` or `DaemonSet` (group `apps`).
    pub kind: WorkloadKind,
    /// Name of the workload in this namespace (a DNS-1123 subdomain).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(dns_subdomain_rule!())
        .message("rolloutRestartTargets.name must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    pub name: String,
}

/// The kinds of workload a rollout restart applies to.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

/// A token change that restarts the rollout targets.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum RolloutRestartTrigger {
    /// A new consent was stored.
    Authorization,
    /// GoTo returned a new refresh token on a refresh.
    RefreshTokenRotation,
    /// A refresh stored a new access token.
    AccessToken,
}

impl RolloutRestartTrigger {
    pub const fn as_str(self) -> &'static str {
        match self {
            RolloutRestartTrigger::Authorization => "Authorization",
            RolloutRestartTrigger::RefreshTokenRotation => "RefreshTokenRotation",
            RolloutRestartTrigger::AccessToken => "AccessToken",
        }
    }
}

/// A key of a Secret in the resource's own namespace that holds a GoTo personal access token.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersonalAccessTokenRef {
    /// Name of the Secret, in the same namespace as this resource (a DNS-1123 subdomain).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(dns_subdomain_rule!())
        .message("personalAccessTokenRef.name must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    pub name: String,
    /// Key within the Secret that holds the personal access token. Defaults to
    /// `personalAccessToken`.
    #[serde(default = "default_personal_access_token_key")]
    pub key: String,
}

fn default_personal_access_token_key() -> String {
    "personalAccessToken".to_string()
}

/// A key of a Secret in the resource's own namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientSecretRef {
    /// Name of the Secret, in the same namespace as this resource (a DNS-1123 subdomain).
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new(dns_subdomain_rule!())
        .message("clientSecretRef.name must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    pub name: String,
    /// Key within the Secret that holds the client secret. Defaults to `clientSecret`.
    #[serde(default = "default_client_secret_key")]
    pub key: String,
}

fn default_client_secret_key() -> String {
    "clientSecret".to_string()
}

/// GoTo OAuth endpoints.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// The authorization (consent) URL the admin's browser is sent to: https (http only for
    /// localhost/127.0.0.1), on a host the operator's admin allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL))]
    #[x_kube(validation = Rule::new(concat!("self == '' || ", web_url_rule!()))
        .message("endpoints.authorizeUrl must be an https URL (http only for localhost/127.0.0.1)"))]
    pub authorize_url: Option<String>,
    /// The token URL codes and refresh tokens are exchanged at: https (http only for
    /// localhost/127.0.0.1), on a host the operator's admin allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL))]
    #[x_kube(validation = Rule::new(concat!("self == '' || ", web_url_rule!()))
        .message("endpoints.tokenUrl must be an https URL (http only for localhost/127.0.0.1)"))]
    pub token_url: Option<String>,
}

/// Metadata copied onto the token Secret.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Labels added to the token Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the token Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the operator observed and did. Conditions are derived from what was actually written.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GoToOAuthClientStatus {
    /// `Ready` (a usable access token is in the Secret) and `Authorized` (GoTo consent is on
    /// record and the refresh token works), with machine-readable reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The link to send to a GoTo admin to authorize (or re-authorize) this client. It is a
    /// bearer credential: whoever opens it can connect their own GoTo account and replace
    /// working tokens. It works without Kubernetes access, stays valid until used
    /// successfully, and is replaced after; change the annotation
    /// `goto-oauth.dev/rotate-authorization-link` to replace it at once (attempts already
    /// started from the old link are refused too). Set `spec.expectedAccount` to accept only
    /// one account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,

    /// When the access token in the Secret expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<Time>,

    /// When tokens were last obtained (authorization or refresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,

    /// When the next refresh is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,

    /// When GoTo issued the refresh token now stored: at the consent, or at the last refresh
    /// that returned a new one (unchanged by refreshes that keep the old one). GoTo's refresh
    /// tokens live about 30 days, so a time close to 30 days ago means a new consent may soon
    /// be needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_obtained_at: Option<Time>,

    /// The GoTo account that authorized the client (principal or email), when GoTo returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,

    /// GoTo account key, when GoTo returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_key: Option<String>,

    /// GoTo organizer key, when GoTo returns it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organizer_key: Option<String>,

    /// Where the client stands with GoTo, machine-readable: automation and the operator itself
    /// read this, never the conditions' messages. The conditions are derived from it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "readable_or_none"
    )]
    pub authorization: Option<AuthorizationStatus>,

    /// The Secret the tokens are currently stored in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// How the stored tokens were obtained: `AuthorizationCode` (a GoTo admin's consent through
    /// `authorizationUrl`) or `PersonalAccessToken` (the PAT of `spec.personalAccessTokenRef`
    /// exchanged at the token URL). Refreshes keep it; absent while no tokens are stored.
    // Read leniently: a value a later release adds must not make the whole client unreadable.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "readable_or_none"
    )]
    pub obtained_by: Option<TokenGrant>,

    /// The personal access token GoTo rejected, by the versions of what it was sent with; it is
    /// not sent again until the PAT Secret, the client secret or the spec changes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "readable_or_none"
    )]
    pub rejected_personal_access_token: Option<Box<RejectedPersonalAccessToken>>,

    /// When the consent was given whose refresh token GoTo rejected. The client stays
    /// `ReauthorizationRequired` while the Secret holds tokens of that consent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_authorization: Option<Time>,

    /// The last value of the rotate-link annotation the operator acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_link_rotation: Option<String>,

    /// The last value of the refresh-requested annotation the operator acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_refresh_request: Option<String>,

    /// Authorization attempts already completed (state nonces, never secret), kept until their
    /// `state` expires so that a replayed callback is refused on every replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumed_states: Vec<ConsumedState>,

    /// Where the rollout restarts of `spec.rolloutRestartTargets` stand.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "readable_or_none"
    )]
    pub rollout_restart: Option<Box<RolloutRestartStatus>>,

    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// `status.authorization` as stored, or `None` when it does not read as one. After a downgrade,
/// the previous release's status writes drop the field, and an API server can leave an empty
/// object behind (`authorization: {}`); the client must stay readable, and reads as a status
/// the previous release wrote (see README "Upgrading").
/// `status.rejectedPersonalAccessToken` is read the same way: server-side apply can leave
/// `{}` behind when the operator stops sending it.
fn readable_or_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// The authorization phase and, when it is not `Authorized`, why.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationStatus {
    /// `AwaitingAuthorization` (no consent yet), `Authorized` (consent on record, refresh token
    /// believed good), `ConsentFailed` (the last consent attempt failed; no tokens stored) or
    /// `ReauthorizationRequired` (a new consent is needed).
    pub phase: AuthorizationPhase,
    /// Why the phase is `ConsentFailed` or `ReauthorizationRequired`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<AuthorizationReason>,
    /// Details for a human; never read back by the operator to make a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a client stands with GoTo.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Hash, PartialEq, Eq, JsonSchema)]
pub enum AuthorizationPhase {
    AwaitingAuthorization,
    Authorized,
    ConsentFailed,
    ReauthorizationRequired,
}

impl AuthorizationPhase {
    pub const ALL: [AuthorizationPhase; 4] = [
        AuthorizationPhase::AwaitingAuthorization,
        AuthorizationPhase::Authorized,
        AuthorizationPhase::ConsentFailed,
        AuthorizationPhase::ReauthorizationRequired,
    ];

    /// The name as serialized (and as the `phase` metric label).
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthorizationPhase::AwaitingAuthorization => "AwaitingAuthorization",
            AuthorizationPhase::Authorized => "Authorized",
            AuthorizationPhase::ConsentFailed => "ConsentFailed",
            AuthorizationPhase::ReauthorizationRequired => "ReauthorizationRequired",
        }
    }
}

/// Why a client is not authorized.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AuthorizationReason {
    /// The GoTo admin clicked Deny.
    AccessDenied,
    /// The consent or the code exchange failed.
    AuthorizationFailed,
    /// GoTo rejected the stored refresh token.
    RefreshTokenRejected,
    /// The spec now names another client id or token endpoint than the tokens were issued to.
    ClientChanged,
    /// The consent came from another account than `spec.expectedAccount`.
    UnexpectedAccount,
}

/// The rollout restarts' record: which token change the targets are up to date with, and what
/// the last restart did. The operator decides from these fields alone.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutRestartStatus {
    /// When the operator began tracking restarts for these targets. Always set: an object
    /// without it (server-side apply can leave `{}` behind once the targets are removed) is no
    /// record, so targets listed again start from a fresh baseline.
    pub since: Time,
    /// The newest token change (of the kinds in `spec.rolloutRestartOn`) the targets were
    /// restarted for, or were already running with when restarts were configured. Empty: no
    /// tokens then, so the first tokens restart the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_change_time: Option<Time>,
    /// When the targets were last restarted (or a restart was last attempted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_time: Option<Time>,
    /// What the last restart was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_trigger: Option<RolloutRestartTrigger>,
    /// A token change waits for `spec.rolloutRestartMinInterval`: the targets restart then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_time: Option<Time>,
    /// Targets the last restart could not restart, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_targets: Vec<FailedRestartTarget>,
}

/// A target the last restart could not restart.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedRestartTarget {
    pub kind: WorkloadKind,
    pub name: String,
    /// `NotFound` (nothing to restart; not retried), `Forbidden` (the operator lacks RBAC for
    /// it; retried after `spec.rolloutRestartMinInterval`) or `Failed` (retried likewise).
    pub problem: RestartProblem,
}

/// Why a target was not restarted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestartProblem {
    NotFound,
    Forbidden,
    Failed,
}

/// How tokens were obtained from GoTo.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TokenGrant {
    /// A GoTo admin's consent in a browser, then the code exchange.
    #[default]
    AuthorizationCode,
    /// The personal access token grant (no browser).
    PersonalAccessToken,
}

impl TokenGrant {
    pub const fn as_str(self) -> &'static str {
        match self {
            TokenGrant::AuthorizationCode => "AuthorizationCode",
            TokenGrant::PersonalAccessToken => "PersonalAccessToken",
        }
    }

    /// The value written by [`TokenGrant::as_str`]; anything else is `None`.
    pub fn parse(written: &str) -> Option<TokenGrant> {
        [
            TokenGrant::AuthorizationCode,
            TokenGrant::PersonalAccessToken,
        ]
        .into_iter()
        .find(|g| g.as_str() == written)
    }
}

/// A personal access token GoTo rejected, and what it was sent with.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedPersonalAccessToken {
    /// The spec generation and the resourceVersions of the PAT Secret and the client-secret
    /// Secret when GoTo rejected the PAT (never the PAT itself).
    pub sent_with: String,
    /// GoTo's sanitized answer, for the conditions; never read back to decide.
    pub error: String,
}

/// A consumed authorization attempt.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumedState {
    /// The random nonce of the attempt's `state` parameter.
    pub nonce: String,
    /// Unix time (seconds) after which the `state` is expired anyway and the entry can go.
    pub expires_at: i64,
}

fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Ready and Authorized conditions (metav1.Condition shape).",
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "description": "Condition type: Ready or Authorized."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "reason": {"type": "string", "description": "Machine-readable CamelCase reason."},
                "message": {"type": "string", "description": "Human-readable details."},
                "lastTransitionTime": {"type": "string", "format": "date-time"},
                "observedGeneration": {"type": "integer", "format": "int64"}
            }
        }
    })
}

/// One string for a client's namespace and name, `namespace/name` (neither can hold a slash):
/// for the stores that keep an entry per client, one allocation instead of two.
pub(crate) fn client_key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into()
}

/// The namespace and name of a [`client_key`].
pub(crate) fn split_client_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}

/// The CRD as YAML, exactly as committed in `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let yaml = serde_yaml::to_string(&GoToOAuthClient::crd())?;
    Ok(format!(
        "# Generated by `goto-oauth-operator crd`; do not edit by hand.\n{yaml}"
    ))
}

impl GoToOAuthClient {
    /// Keeps of the metadata only what the operator reads: name, namespace, uid,
    /// resourceVersion, generation, deletionTimestamp and its own `goto-oauth.dev/`
    /// annotations. managedFields, the copy of the whole object `kubectl apply` keeps, other
    /// tools' labels and annotations, owner references and finalizers make up most of a stored
    /// object's size and are never read from a cached client.
    pub(crate) fn trim_for_cache(&mut self) {
        let meta = std::mem::take(&mut self.metadata);
        let annotations: BTreeMap<String, String> = meta
            .annotations
            .unwrap_or_default()
            .into_iter()
            .filter(|(key, _)| key.starts_with(OWN_ANNOTATION_PREFIX))
            .collect();
        self.metadata = ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            resource_version: meta.resource_version,
            generation: meta.generation,
            deletion_timestamp: meta.deletion_timestamp,
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        };
    }

    /// The target Secret's name: `spec.secretName` or `<name>-token`.
    pub fn target_secret_name(&self) -> String {
        match &self.spec.secret_name {
            Some(name) if !name.is_empty() => name.clone(),
            _ => format!(
                "{}-token",
                self.metadata.name.as_deref().unwrap_or_default()
            ),
        }
    }

    /// The name shown to a GoTo admin: `spec.displayName` (trimmed), else the resource's name.
    pub fn display_name(&self) -> String {
        match self.spec.display_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => self.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// A condition of the current status, by type.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_client_keeps_the_annotations_the_operator_reads() {
        let mut obj: GoToOAuthClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "goto-oauth.dev/v1alpha1", "kind": "GoToOAuthClient",
            "metadata": {
                "name": "demo", "namespace": "ns",
                "uid": "u-1", "resourceVersion": "7", "generation": 2,
                "labels": {"app.kubernetes.io/part-of": "billing"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}",
                    "argocd.argoproj.io/tracking-id": "billing:goto-oauth.dev/GoToOAuthClient:ns/demo",
                    FORCE_REFRESH_ANNOTATION: "1",
                    ROTATE_LINK_ANNOTATION: "2",
                },
                "finalizers": ["example.com/keep"],
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "o-1"}],
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {"clientId": "c", "clientSecretRef": {"name": "creds"}},
        }))
        .unwrap();
        obj.trim_for_cache();
        let meta = &obj.metadata;
        assert_eq!(
            (
                meta.name.as_deref(),
                meta.namespace.as_deref(),
                meta.uid.as_deref(),
                meta.resource_version.as_deref(),
                meta.generation
            ),
            (Some("demo"), Some("ns"), Some("u-1"), Some("7"), Some(2))
        );
        assert!(meta.managed_fields.is_none());
        assert!(meta.labels.is_none() && meta.finalizers.is_none());
        assert!(meta.owner_references.is_none());
        let annotations = meta.annotations.clone().unwrap();
        assert_eq!(annotations.len(), 2, "{annotations:?}");
        assert_eq!(annotations[FORCE_REFRESH_ANNOTATION], "1");
        assert_eq!(annotations[ROTATE_LINK_ANNOTATION], "2");
    }

    #[test]
    fn crd_is_structural_and_named() {
        let crd = GoToOAuthClient::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("gotooauthclients.goto-oauth.dev")
        );
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let yaml = crd_yaml().unwrap();
        // Keywords a real API server rejects in a structural schema.
        for forbidden in [
            "$ref",
            "definitions",
            "$defs",
            "anyOf: []",
            "nullable: null",
        ] {
            assert!(!yaml.contains(forbidden), "CRD contains {forbidden}");
        }
        assert!(yaml.contains("x-kubernetes-list-type: map"));
        assert!(yaml.contains("gotoclient"));
    }

    /// Every field the API server can check alone carries a CEL rule whose message names the
    /// field (the API server shows it at `kubectl apply`), and a `maxLength` that keeps the rule
    /// within the cost budget. `tests/crd_cel.rs` evaluates the rules.
    #[test]
    fn checked_fields_carry_cel_rules_naming_them() {
        let crd = serde_json::to_value(GoToOAuthClient::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        for field in [
            "clientId",
            "clientSecretRef.name",
            "secretName",
            "redirectUri",
            "refreshBefore",
            "endpoints.authorizeUrl",
            "endpoints.tokenUrl",
            "personalAccessTokenRef.name",
        ] {
            let node = field
                .split('.')
                .fold(spec, |node, key| &node["properties"][key]);
            let rules = node["x-kubernetes-validations"]
                .as_array()
                .unwrap_or_else(|| panic!("{field} has no x-kubernetes-validations"));
            assert_eq!(rules.len(), 1, "{field}");
            let message = rules[0]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("{field} must")),
                "{field}: {message}"
            );
            assert!(
                rules[0]["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("self"))
            );
            assert!(
                node["maxLength"].as_u64().is_some(),
                "{field} has no maxLength"
            );
        }
    }

    #[test]
    fn client_secret_key_defaults() {
        let spec: GoToOAuthClientSpec = serde_json::from_value(serde_json::json!({
            "clientId": "abc",
            "clientSecretRef": {"name": "creds"}
        }))
        .unwrap();
        assert_eq!(spec.client_secret_ref.key, "clientSecret");
        assert_eq!(spec.personal_access_token_ref, None);
        // What server-side apply leaves behind after the operator stopped sending the field.
        let status: GoToOAuthClientStatus =
            serde_json::from_value(serde_json::json!({"rejectedPersonalAccessToken": {}})).unwrap();
        assert_eq!(status.rejected_personal_access_token, None);
        let with_pat: GoToOAuthClientSpec = serde_json::from_value(serde_json::json!({
            "clientId": "abc",
            "clientSecretRef": {"name": "creds"},
            "personalAccessTokenRef": {"name": "pat"}
        }))
        .unwrap();
        assert_eq!(
            with_pat.personal_access_token_ref.map(|r| r.key).as_deref(),
            Some("personalAccessToken")
        );
        let mut client = GoToOAuthClient::new("demo", spec);
        assert_eq!(client.target_secret_name(), "demo-token");
        assert_eq!(client.display_name(), "demo");
        client.spec.display_name = Some("  ".into());
        assert_eq!(client.display_name(), "demo");
        client.spec.display_name = Some(" Payroll sync ".into());
        assert_eq!(client.display_name(), "Payroll sync");
    }
}
