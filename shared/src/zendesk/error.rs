//! Typed Zendesk errors: the troubleshooting cases of the product spec each get one variant and
//! one message that says what to fix. Messages never contain a credential.

use crate::errors::ErrorName;
use std::time::Duration;

/// How the client authenticates, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ApiToken,
    OAuth,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ZendeskError {
    /// The credential store has nothing usable (missing env var, unreadable file).
    #[error("Zendesk credentials: {message}")]
    Credentials { message: String },
    /// 401 (after one refresh for OAuth).
    #[error("{message}")]
    AuthFailed { method: AuthMethod, message: String },
    #[error("no Zendesk account at `{subdomain}.zendesk.com`: check `subdomain` in [zendesk]; for https://mycompany.zendesk.com enter \"mycompany\"")]
    SubdomainNotFound { subdomain: String },
    #[error("the Zendesk credential lacks the `{scope}` scope: {hint}")]
    MissingScope { scope: String, hint: String },
    #[error("bulk user import is not enabled on this Zendesk account: the account owner must ask Zendesk Customer Support to turn it on (users `create_many` / `create_or_update_many` answer 403 until then)")]
    BulkImportDisabled,
    /// An audience sync needs user / organization tagging, which the account has turned off.
    #[error("{object} tagging is not enabled on this Zendesk account, so an audience sync cannot keep its tag on {object}: an admin turns it on in Admin Center > People > Configuration > End users (\"Allow tagging on users and organizations\"); nothing was written")]
    TaggingDisabled { object: String },
    /// 403 for any other reason (role, plan).
    #[error("Zendesk refused the request ({path}): {message}")]
    Forbidden { path: String, message: String },
    /// 429s outlasted the retry budget.
    #[error("Zendesk rate limit: still limited after {attempts} attempts ({path})")]
    RateLimited {
        path: String,
        attempts: u32,
        retry_after: Option<Duration>,
    },
    /// 5xx (503 included) outlasted the retry budget.
    #[error("Zendesk unavailable: HTTP {status} after {attempts} attempts ({path}): {message}")]
    Unavailable {
        path: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    /// Connection errors and timeouts outlasted the retry budget. `path` is the whole URL tried.
    #[error("cannot reach Zendesk at {path} after {attempts} attempts: {message}; check `subdomain` and `base_url` in the config, and the network or proxy between here and that host")]
    Transport {
        path: String,
        attempts: u32,
        message: String,
    },
    /// A request that must not be repeated (it may create records) was sent, but no answer came
    /// back: Zendesk may or may not have acted on it.
    #[error("no answer from Zendesk for {path} after it was sent: {message}")]
    OutcomeUnknown { path: String, message: String },
    /// Any other 4xx: the error envelope parsed (`error`/`description`/`details`, `errors[]`,
    /// or `error.title`/`error.message`).
    #[error("Zendesk answered HTTP {status} to {path}: {code}: {description}")]
    Api {
        path: String,
        status: u16,
        code: String,
        description: String,
        details: Option<serde_json::Value>,
    },
    /// A 2xx with a body that is not what the endpoint documents.
    #[error("unexpected answer from Zendesk ({path}): {message}")]
    Protocol { path: String, message: String },
}

impl ZendeskError {
    /// The closed set of error names Step Functions retries and catches on.
    pub fn error_name(&self) -> ErrorName {
        match self {
            ZendeskError::Credentials { .. } | ZendeskError::AuthFailed { .. } => {
                ErrorName::AuthFailed
            }
            ZendeskError::SubdomainNotFound { .. } => ErrorName::SubdomainNotFound,
            ZendeskError::MissingScope { .. } | ZendeskError::Forbidden { .. } => {
                ErrorName::MissingScope
            }
            ZendeskError::BulkImportDisabled => ErrorName::BulkImportDisabled,
            ZendeskError::TaggingDisabled { .. } => ErrorName::TaggingDisabled,
            ZendeskError::RateLimited { .. } => ErrorName::RateLimited,
            ZendeskError::Unavailable { .. }
            | ZendeskError::Transport { .. }
            | ZendeskError::OutcomeUnknown { .. } => ErrorName::ZendeskUnavailable,
            ZendeskError::Api { .. } | ZendeskError::Protocol { .. } => ErrorName::ZendeskRejected,
        }
    }

    /// Errors that no retry fixes: the run stops and the user changes config or credentials.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ZendeskError::Credentials { .. }
                | ZendeskError::AuthFailed { .. }
                | ZendeskError::SubdomainNotFound { .. }
                | ZendeskError::MissingScope { .. }
                | ZendeskError::BulkImportDisabled
                | ZendeskError::TaggingDisabled { .. }
                | ZendeskError::Forbidden { .. }
        )
    }
}
