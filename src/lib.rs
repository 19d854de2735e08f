//! goto-oauth-operator: keeps GoTo (LogMeIn) OAuth tokens alive as Kubernetes Secrets.
//!
//! The crate is split by concern, following kube-rs/controller-rs: the resource types, pure
//! builders (validation, conditions, the target Secret, the refresh schedule), the OAuth client,
//! the browser-facing HTTP endpoints, the controller that ties them together, and the operational
//! pieces (metrics, telemetry, leader election). `main.rs` only wires them.

pub mod cli;
pub mod conditions;
pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod oauth;
pub mod pages;
pub mod refresh;
pub mod resource;
pub mod secret;
pub mod state;
pub mod telemetry;
pub mod validation;
pub mod web;

pub use error::{Error, Result};
