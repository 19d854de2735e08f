//! goto-oauth-operator: keeps GoTo (LogMeIn) OAuth tokens alive as Kubernetes Secrets.
//!
//! One module (or folder) per concern; the README's architecture section maps them. `app`
//! starts everything and `main.rs` only wires flags to it.

pub mod allocator;
pub mod api_client;
pub mod app;
pub mod cli;
pub(crate) mod client_cache;
pub mod clock;
pub mod conditions;
pub mod consent;
pub mod controller;
pub mod error;
pub mod goto;
pub mod leader;
pub mod metrics;
pub mod resource;
pub mod secret;
pub mod telemetry;
pub mod validation;
pub mod web;

pub use error::{Error, Result};

#[cfg(test)]
mod footprint;
#[cfg(test)]
mod fuzz;
