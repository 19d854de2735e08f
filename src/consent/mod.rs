//! Consent: everything about a GoTo admin's authorization round trip that is not HTTP.
//!
//! [`link`] builds and reads the shareable authorization link; [`index`] keeps every
//! replica's in-memory index of published links, so a wrong link costs no API request; [`state`] signs and verifies the
//! OAuth `state` that carries an attempt through GoTo; [`attempt`] claims an attempt once
//! across replicas, completes it (tokens into the Secret, status through the controller's one
//! status function) or records why it failed.

pub(crate) mod attempt;
pub(crate) mod index;
pub(crate) mod link;
pub mod state;

pub use link::{authorization_url, link_token};
pub use state::{
    StateClaims, StateError, StateKey, StateKeyError, load_or_create_key, random_token,
};
