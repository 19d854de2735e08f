//! Logging set-up: text for people, JSON for log pipelines; the level comes from `RUST_LOG`.
//!
//! Nothing token-grade is ever passed to a tracing macro, so no filtering happens here: the
//! guarantee lives at the call sites and in the tests that grep the logs.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::LogFormat;

/// Installs the global subscriber. Call once at start-up.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().flatten_event(true))
            .init(),
        LogFormat::Text => registry.with(fmt::layer()).init(),
    }
}
