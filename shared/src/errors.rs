//! The closed set of error names a run, a Lambda step or a CLI command ends with. Step Functions
//! retries and catches on these names, and the CLI turns them into exit codes; both come from
//! here, so a name, its retry and its exit code are declared once.

use crate::changeset::ChangeSetError;
use crate::config::ConfigError;
use crate::export::ExportError;
use crate::lock::LockError;
use crate::plan::PlanError;
use crate::write::WriteError;
use crate::zendesk::ZendeskError;
use serde::{Deserialize, Serialize};

/// Exit codes of the `zdsync` command (documented in the README).
pub mod exit {
    pub const OK: u8 = 0;
    /// The run finished but some rows were refused or failed in Zendesk.
    pub const ROWS_FAILED: u8 = 1;
    pub const CONFIG: u8 = 2;
    pub const EXPORT: u8 = 3;
    pub const STATE: u8 = 4;
    /// Zendesk or the store failed mid-run.
    pub const WRITE: u8 = 5;
    /// Credentials, subdomain, scopes or account settings (bulk import, tagging) refused before
    /// any write.
    pub const AUTH: u8 = 6;
    /// Another run of the sync holds the lock.
    pub const LOCKED: u8 = 7;
    /// The run would send more rows than its cap; nothing was written.
    pub const ROW_CAP: u8 = 8;
    /// The export is larger than the sync reads in one run (`source.max_rows_read`,
    /// `source.max_bytes_read`); nothing was written.
    pub const EXPORT_TOO_LARGE: u8 = 9;
    /// Stopped by Ctrl-C / SIGTERM (128 + SIGINT); the next run finishes it.
    pub const INTERRUPTED: u8 = 130;
}

/// The enum, its list and its string forms from one list of names, so none can be missed.
macro_rules! error_names {
    ($($name:ident),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum ErrorName {
            $($name),*
        }

        impl ErrorName {
            /// Every name, in declaration order.
            pub const ALL: &'static [ErrorName] = &[$(ErrorName::$name),*];

            /// The name Lambda reports as the error type and the state machine matches.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorName::$name => stringify!($name)),*
                }
            }
        }
    };
}

error_names![
    ConfigInvalid,
    AuthFailed,
    SubdomainNotFound,
    MissingScope,
    BulkImportDisabled,
    TaggingDisabled,
    RateLimited,
    ZendeskUnavailable,
    ZendeskRejected,
    ExportUnreadable,
    ExportTooLarge,
    StateUnreadable,
    StoreUnavailable,
    RunLocked,
    RowCapExceeded,
    Internal,
];

impl ErrorName {
    pub fn parse(name: &str) -> Option<ErrorName> {
        ErrorName::ALL.iter().copied().find(|n| n.as_str() == name)
    }

    /// Whether Step Functions retries the step (with backoff and jitter); every other name is
    /// final and caught.
    pub fn retryable(self) -> bool {
        match self {
            ErrorName::RateLimited
            | ErrorName::ZendeskUnavailable
            | ErrorName::StoreUnavailable
            | ErrorName::RunLocked => true,
            ErrorName::ConfigInvalid
            | ErrorName::AuthFailed
            | ErrorName::SubdomainNotFound
            | ErrorName::MissingScope
            | ErrorName::BulkImportDisabled
            | ErrorName::TaggingDisabled
            | ErrorName::ZendeskRejected
            | ErrorName::ExportUnreadable
            | ErrorName::ExportTooLarge
            | ErrorName::StateUnreadable
            | ErrorName::RowCapExceeded
            | ErrorName::Internal => false,
        }
    }

    /// The `zdsync` exit code of a command that ends with this error.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorName::ConfigInvalid => exit::CONFIG,
            ErrorName::ExportUnreadable => exit::EXPORT,
            ErrorName::ExportTooLarge => exit::EXPORT_TOO_LARGE,
            ErrorName::StateUnreadable => exit::STATE,
            ErrorName::AuthFailed
            | ErrorName::SubdomainNotFound
            | ErrorName::MissingScope
            | ErrorName::BulkImportDisabled
            | ErrorName::TaggingDisabled => exit::AUTH,
            ErrorName::RunLocked => exit::LOCKED,
            ErrorName::RowCapExceeded => exit::ROW_CAP,
            ErrorName::RateLimited
            | ErrorName::ZendeskUnavailable
            | ErrorName::ZendeskRejected
            | ErrorName::StoreUnavailable
            | ErrorName::Internal => exit::WRITE,
        }
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run, a step or a command stopped; `error_name` places it in the closed set.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    ChangeSet(#[from] ChangeSetError),
    #[error(transparent)]
    Lock(Box<LockError>),
    #[error("this run would send {rows} rows, more than its cap of {cap} (`max_rows_per_run`, or `--max-rows` / \"max_rows\" in the execution input); nothing was written. {why}Check the plan with `zdsync plan`, then raise the cap for one run if the rows are meant to go")]
    RowCapExceeded { rows: u64, cap: u64, why: String },
    #[error("{0}")]
    Internal(String),
}

impl RunError {
    /// The closed set of error names Step Functions and exit codes key on.
    pub fn error_name(&self) -> ErrorName {
        match self {
            RunError::Config(_) => ErrorName::ConfigInvalid,
            RunError::Zendesk(e) | RunError::Write(WriteError::Zendesk(e)) => e.error_name(),
            RunError::Plan(PlanError::Export(ExportError::TooLarge { .. })) => {
                ErrorName::ExportTooLarge
            }
            RunError::Plan(PlanError::Export(_)) => ErrorName::ExportUnreadable,
            RunError::Plan(PlanError::State(_)) => ErrorName::StateUnreadable,
            RunError::Plan(PlanError::Write { .. }) => ErrorName::StoreUnavailable,
            RunError::ChangeSet(_) | RunError::Write(_) => ErrorName::StoreUnavailable,
            RunError::Lock(e) => match **e {
                LockError::Held { .. } | LockError::Abandoned { .. } => ErrorName::RunLocked,
                LockError::Io { .. } => ErrorName::StoreUnavailable,
            },
            RunError::RowCapExceeded { .. } => ErrorName::RowCapExceeded,
            RunError::Internal(_) => ErrorName::Internal,
        }
    }
}

impl From<LockError> for RunError {
    fn from(e: LockError) -> Self {
        RunError::Lock(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_reads_back_and_is_listed_once() {
        for &n in ErrorName::ALL {
            assert_eq!(ErrorName::parse(n.as_str()), Some(n));
            assert_eq!(ErrorName::ALL.iter().filter(|m| **m == n).count(), 1);
        }
        assert_eq!(ErrorName::parse("States.TaskFailed"), None);
    }
}
