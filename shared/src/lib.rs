//! zdsync: keeps Zendesk Support users, organizations and tickets in step with warehouse exports.
//!
//! The whole pipeline as plain code over ports, shared by the `zdsync` CLI and the Lambdas:
//! [`export`] readers → [`mapping`] and validation → [`state`] and diff → change set ([`plan`]).

pub mod audience;
#[cfg(feature = "aws")]
pub mod aws;
pub mod changeset;
pub mod config;
pub mod errors;
pub mod export;
pub mod fields;
pub mod layout;
pub mod lock;
pub mod mapping;
pub mod pipeline;
pub mod plan;
pub mod preview;
pub mod rebuild;
pub mod record;
pub mod run;
pub mod schema;
pub mod state;
pub mod steps;
pub mod store;
pub mod write;
pub mod zendesk;
