//! Test support shared by the integration tests, the benchmark and the local demo: an in-memory
//! Kubernetes API server and a fake GoTo OAuth provider. Compiled only with the `testkit` feature,
//! never into the release binary.

pub mod apiserver;
pub mod goto;
pub mod operator;
pub mod setup;
