//! The crate's one error type.
//!
//! Every failure the controller and the HTTP endpoints can meet is a variant here, so that
//! `error_policy` can decide between "wait for a change" and "back off and retry", and so that the
//! reconcile-error metric has a small, fixed set of labels.

use crate::goto::OAuthError;

/// Everything that can go wrong while reconciling or serving a callback.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A Kubernetes API call failed (transient unless the API says otherwise).
    #[error("Kubernetes API error: {}", describe_kube_error(.0))]
    Kube(#[source] kube::Error),

    /// The target Secret exists but belongs to someone else.
    #[error("secret conflict: {0}")]
    SecretConflict(String),

    /// GoTo's token endpoint refused or failed.
    #[error("token endpoint: {0}")]
    OAuth(#[from] OAuthError),

    /// Serialising an object failed (a bug, not an input problem).
    #[error("serialization error: {0}")]
    Serialization(#[from] serde_json::Error),

    /// The resource lacks a field the API server always sets (name, namespace, uid).
    #[error("resource is missing {0}")]
    MissingObjectKey(&'static str),

    /// A refreshed token could not be stored yet; it is kept in memory and retried.
    #[error("new tokens are not stored yet: {0}")]
    TokensUnstored(String),
}

/// The API server's own message for API errors (not the whole Status struct), the error's
/// display otherwise.
fn describe_kube_error(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

impl Error {
    /// Whether this is the API server's 409: the object changed since it was read.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

impl Error {
    /// A short, fixed label for metrics (`goto_oauth_reconcile_errors_total{reason=...}`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::SecretConflict(_) => "secret_conflict",
            Error::OAuth(e) => e.reason(),
            Error::Serialization(_) => "serialization",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::TokensUnstored(_) => "tokens_unstored",
        }
    }

    /// Whether retrying without any change can help. Errors that need a human (a foreign
    /// Secret) wait for the next watch event instead of hot-looping; a bad spec or a missing
    /// client secret is not an error at all but a condition the reconcile writes.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::SecretConflict(_) => false,
            Error::OAuth(e) => e.is_transient(),
            _ => true,
        }
    }
}

/// The crate's result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
