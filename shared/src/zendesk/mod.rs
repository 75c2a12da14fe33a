//! The Zendesk port: an HTTP client with authentication, one shared request budget, retries and
//! typed errors, plus the job-status shapes the writer polls.

pub mod auth;
pub mod budget;
pub mod client;
pub mod connect;
pub mod error;
pub mod jobs;
pub mod limiter;

pub use auth::{
    credential_store, CredentialStore, Credentials, EnvCredentials, FileCredentials,
    MemoryCredentials, Secret,
};
pub use client::{Client, ClientOptions, ClientStats, Idempotency, Preflight, Reserved};
pub use error::{AuthMethod, ZendeskError};
pub use jobs::{JobResult, JobStatus};
