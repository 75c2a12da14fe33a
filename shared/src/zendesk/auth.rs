//! Credentials and where they live. The core sees only the `CredentialStore` port: locally env
//! vars or a JSON file, in AWS a Secrets Manager secret (an adapter in the Lambda crates).

use super::error::ZendeskError;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Arc;

/// A secret string: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for building an `Authorization` header and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// HTTP Basic `{email}/token:{token}`; the email must be an admin's.
    ApiToken { email: String, token: Secret },
    /// Bearer token; refreshed with the refresh token (rotation: both are replaced).
    OAuth {
        access_token: Secret,
        refresh_token: Option<Secret>,
        client_id: Option<String>,
        client_secret: Option<Secret>,
        /// Unix seconds when the access token expires, when known.
        expires_at: Option<i64>,
    },
}

/// Where credentials are loaded from and rotated OAuth tokens are saved to.
pub trait CredentialStore: Send + Sync {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>>;
    /// Persist credentials after an OAuth refresh (the old refresh token no longer works).
    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>>;
    /// Where the credentials live, for messages (never the credentials themselves).
    fn describe(&self) -> String;
}

/// The store named by a sync config's `credentials` reference: `env` or `file:<path>`
/// (relative paths against `base_dir`). Other references (a Secrets Manager ARN) are resolved
/// by the deployment's adapters.
pub fn credential_store(
    reference: &str,
    base_dir: &std::path::Path,
) -> Result<Arc<dyn CredentialStore>, ZendeskError> {
    let _ = (reference, base_dir);
    todo!("helper: EnvCredentials / FileCredentials")
}
