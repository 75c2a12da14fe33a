//! Simulator configuration: accounts, credentials, limits, job timing, behaviour switches for the
//! points zendesk-api.md marks [unsure], field definitions and faults. Loadable from TOML or JSON.

use crate::faults::FaultConfig;
use crate::fields::FieldsFixture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Address for the binary; `Simulator::start` binds `127.0.0.1:0` when unset.
    pub bind: Option<SocketAddr>,
    /// Seed of every random choice (faults, item failures, job ids).
    pub seed: u64,
    /// The account answering a plain base URL (IP or `localhost` host, no `/sub/...` prefix).
    /// Defaults to the first account.
    pub default_account: Option<String>,
    pub accounts: Vec<AccountConfig>,
    pub rate_limit: RateLimitConfig,
    pub jobs: JobConfig,
    pub behavior: Behavior,
    /// The incremental ticket export: lag horizon and its own per-minute limit.
    pub incremental: IncrementalConfig,
    pub faults: FaultConfig,
    /// Inline custom-field definitions; replaces the built-in default set.
    pub fields: Option<FieldsFixture>,
    /// A JSON or TOML file of custom-field definitions (same shape as `fields`).
    pub fields_path: Option<PathBuf>,
    /// Entries kept in the request log (oldest dropped first).
    pub request_log_limit: usize,
    /// Keep the body of every API write (`POST`/`PUT`/`DELETE` under `/api/v2/`) in the request
    /// log, to compare what a client sent with what it said it would send. OAuth calls are
    /// never logged with their bodies.
    pub log_bodies: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            bind: None,
            seed: 42,
            default_account: None,
            accounts: vec![AccountConfig::default()],
            rate_limit: RateLimitConfig::default(),
            jobs: JobConfig::default(),
            behavior: Behavior::default(),
            incremental: IncrementalConfig::default(),
            faults: FaultConfig::default(),
            fields: None,
            fields_path: None,
            request_log_limit: 100_000,
            log_bodies: false,
        }
    }
}

impl SimConfig {
    /// Loads `.json` files as JSON and anything else as TOML. Relative `fields_path` values are
    /// resolved against the config file's folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: SimConfig = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        } else {
            toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(rel) = p.as_ref().filter(|p| p.is_relative()) {
                *p = Some(dir.join(rel));
            }
        };
        fix(&mut cfg.fields_path);
        for acct in &mut cfg.accounts {
            fix(&mut acct.fields_path);
        }
        Ok(cfg)
    }

    /// A config with one account and everything else at its defaults.
    pub fn single(subdomain: &str) -> Self {
        Self {
            accounts: vec![AccountConfig::new(subdomain)],
            ..Self::default()
        }
    }

    pub fn account(&self, subdomain: &str) -> Option<&AccountConfig> {
        self.accounts.iter().find(|a| a.subdomain == subdomain)
    }

    pub fn account_mut(&mut self, subdomain: &str) -> Option<&mut AccountConfig> {
        self.accounts.iter_mut().find(|a| a.subdomain == subdomain)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.accounts.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one account is needed".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.accounts {
            if a.subdomain.is_empty()
                || !a
                    .subdomain
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(ConfigError::Invalid(format!(
                    "bad subdomain {:?}",
                    a.subdomain
                )));
            }
            if !seen.insert(a.subdomain.to_lowercase()) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate subdomain {}",
                    a.subdomain
                )));
            }
        }
        if let Some(d) = &self.default_account {
            if self.account(d).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "default_account {d} is not an account"
                )));
            }
        }
        Ok(())
    }
}

/// One Zendesk account (`<subdomain>.zendesk.com`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountConfig {
    pub subdomain: String,
    /// The account owner; created as user `role: admin`.
    pub admin_email: String,
    pub admin_name: String,
    /// More staff who may authenticate (role `agent` or `admin`).
    pub agents: Vec<StaffConfig>,
    /// Account-wide API tokens; any staff email may use any active token (`email/token:TOKEN`).
    pub api_tokens: Vec<String>,
    pub oauth_clients: Vec<OAuthClientConfig>,
    pub oauth_tokens: Vec<OAuthTokenConfig>,
    /// Real accounts start with bulk user import off; the simulator starts with it on so the
    /// common path works. `false` makes users create_many / create_or_update_many answer 403.
    pub bulk_user_import: bool,
    /// User and organization tagging (Admin > Settings > Customers). When off, the tags
    /// endpoints of users / organizations answer 403 and `tags` is dropped on writes.
    pub user_tagging: bool,
    pub organization_tagging: bool,
    /// Requests per window for this account (overrides `rate_limit.rpm`; 0 = unlimited).
    pub rpm: Option<u32>,
    /// What the consent page of `/oauth/authorizations/new` answers: `approve` (redirect with a
    /// code) or `deny` (redirect with `error=access_denied`).
    pub oauth_consent: crate::auth::Consent,
    /// Lifetime of an authorization code in seconds (Zendesk: 120).
    pub oauth_code_ttl_secs: u64,
    pub fields: Option<FieldsFixture>,
    pub fields_path: Option<PathBuf>,
    /// Records created at start (and after a reset), through the same validation as the API.
    pub seed: SeedData,
}

impl Default for AccountConfig {
    fn default() -> Self {
        Self::new("acme")
    }
}

impl AccountConfig {
    pub fn new(subdomain: &str) -> Self {
        Self {
            subdomain: subdomain.to_string(),
            admin_email: format!("admin@{subdomain}.test"),
            admin_name: "Sim Admin".into(),
            agents: Vec::new(),
            api_tokens: vec![DEFAULT_API_TOKEN.into()],
            oauth_clients: vec![OAuthClientConfig::default()],
            oauth_tokens: vec![OAuthTokenConfig::default()],
            bulk_user_import: true,
            user_tagging: true,
            organization_tagging: true,
            rpm: None,
            oauth_consent: crate::auth::Consent::Approve,
            oauth_code_ttl_secs: 120,
            fields: None,
            fields_path: None,
            seed: SeedData::default(),
        }
    }
}

pub const DEFAULT_API_TOKEN: &str = "sim-api-token";
pub const DEFAULT_ACCESS_TOKEN: &str = "sim-access-token";
pub const DEFAULT_REFRESH_TOKEN: &str = "sim-refresh-token";
pub const DEFAULT_CLIENT_ID: &str = "zdsync";
pub const DEFAULT_CLIENT_SECRET: &str = "zdsync-secret";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaffConfig {
    pub email: String,
    #[serde(default = "default_staff_name")]
    pub name: String,
    /// `agent` or `admin`.
    #[serde(default = "default_staff_role")]
    pub role: String,
}

fn default_staff_name() -> String {
    "Sim Agent".into()
}
fn default_staff_role() -> String {
    "agent".into()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKind {
    Confidential,
    Public,
}

/// An OAuth client. Access is by its string `identifier` (Zendesk's "unique identifier"), never
/// by its numeric id. Redirect URIs are kept for the authorization-code flow.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthClientConfig {
    pub identifier: String,
    pub secret: Option<String>,
    pub kind: ClientKind,
    pub name: String,
    pub redirect_uris: Vec<String>,
    /// Access-token lifetime when a grant does not ask for one (None = no expiry).
    pub access_ttl_secs: Option<u64>,
    pub refresh_ttl_secs: u64,
    /// The user that client_credentials tokens act as (default: the account admin).
    pub owner_email: Option<String>,
}

impl Default for OAuthClientConfig {
    fn default() -> Self {
        Self {
            identifier: DEFAULT_CLIENT_ID.into(),
            secret: Some(DEFAULT_CLIENT_SECRET.into()),
            kind: ClientKind::Confidential,
            name: "zdsync".into(),
            redirect_uris: vec!["http://127.0.0.1/callback".into()],
            access_ttl_secs: Some(1800),
            refresh_ttl_secs: 2_592_000,
            owner_email: None,
        }
    }
}

/// A pre-issued OAuth token (as if the authorization flow had already run).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthTokenConfig {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub scopes: Vec<String>,
    /// Client identifier (default: the first client).
    pub client: Option<String>,
    /// Staff email the token acts as (default: the admin).
    pub user_email: Option<String>,
    /// Seconds from start until expiry; None = never, negative = already expired.
    pub expires_in_secs: Option<i64>,
    pub refresh_expires_in_secs: Option<i64>,
}

impl Default for OAuthTokenConfig {
    fn default() -> Self {
        Self {
            access_token: DEFAULT_ACCESS_TOKEN.into(),
            refresh_token: Some(DEFAULT_REFRESH_TOKEN.into()),
            scopes: vec!["read".into(), "write".into()],
            client: None,
            user_email: None,
            expires_in_secs: None,
            refresh_expires_in_secs: Some(2_592_000),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeedData {
    pub users: Vec<Value>,
    pub organizations: Vec<Value>,
    pub tickets: Vec<Value>,
}

/// A limit of `limit` requests per `window_ms`; `limit = 0` switches it off.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WindowLimit {
    pub limit: u32,
    pub window_ms: u64,
}

impl Default for WindowLimit {
    fn default() -> Self {
        Self {
            limit: 0,
            window_ms: 60_000,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Account-wide requests per window (Zendesk: per minute, 200..2500 by plan). 0 = off.
    pub rpm: u32,
    /// Window length; shorten it so tests do not wait a minute.
    pub window_ms: u64,
    /// `X-Rate-Limit` advertised while limiting is off.
    pub advertised_when_off: u32,
    /// `PUT /tickets/{id}` per account (Zendesk: 100/min).
    pub ticket_updates: WindowLimit,
    /// `PUT /tickets/{id}` per user per ticket (Zendesk: 30 per 10 min).
    pub ticket_updates_per_ticket: WindowLimit,
    /// Create-or-update / update of one user profile (Zendesk: 5/min per user).
    pub user_writes_per_user: WindowLimit,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            rpm: 0,
            window_ms: 60_000,
            advertised_when_off: 1_000_000,
            ticket_updates: WindowLimit::default(),
            ticket_updates_per_ticket: WindowLimit {
                limit: 0,
                window_ms: 600_000,
            },
            user_writes_per_user: WindowLimit::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Time a job stays `queued` before it turns `working`.
    pub queued_ms: u64,
    /// Time a job stays `working` before its items are applied and it completes.
    pub working_ms: u64,
    /// Jobs queued or working per account; one more gets 429 (Zendesk: ~30).
    pub max_concurrent: usize,
    /// `Retry-After` sent with the job-limit 429.
    pub limit_retry_after_secs: u64,
    /// How long a job status can be read after creation (Zendesk: 1 h or 24 h; sources differ).
    pub retention_secs: u64,
    /// Items per bulk call and ids per show_many / destroy_many.
    pub max_items: usize,
}

impl Default for JobConfig {
    fn default() -> Self {
        Self {
            queued_ms: 0,
            working_ms: 0,
            max_concurrent: 30,
            limit_retry_after_secs: 5,
            retention_secs: 3600,
            max_items: 100,
        }
    }
}

/// `GET /api/v2/incremental/tickets/cursor`: Zendesk leaves out items changed within the minute
/// before the request and allows 10 requests a minute per account (30 with High Volume).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct IncrementalConfig {
    /// Tickets updated less than this long ago (simulator clock) are not exported yet.
    pub lag_secs: u64,
    /// Requests per window per account to the export endpoint (0 = no endpoint limit).
    pub rpm: u32,
    /// Window of that limit (60 000 ms as Zendesk counts).
    pub window_ms: u64,
}

impl Default for IncrementalConfig {
    fn default() -> Self {
        Self {
            lag_secs: 60,
            rpm: 10,
            window_ms: 60_000,
        }
    }
}

/// Shapes of the per-item `results` of bulk jobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobResults {
    /// Exactly the shapes zendesk-api.md §8 documents: create `{"id","index"}`, update / delete
    /// `{"id","action","success","status"}`, failures as OAS FailedResult, users
    /// create_or_update_many `{"id","status","email"?}`.
    #[default]
    Documented,
    /// `index`, `action`, `success` and `status` on every item (the simulator's older shapes).
    Verbose,
}

/// Switches for behaviour zendesk-api.md marks [unsure]; defaults are the most likely reading.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behavior {
    /// Users create_or_update(_many) whose `external_id` and `email` match two different users:
    /// `error` (default: 422 "Email: X is already being used by another user"), or update the
    /// `external_id` match / the `email` match and leave the other key alone.
    pub match_conflict: MatchConflict,
    /// First `index` in job results (0-based is the likely reading).
    pub result_index_base: usize,
    /// Failed users create_or_update_many items carry `"id": <input position>`, as observed.
    pub failed_item_id_is_index: bool,
    /// A dropdown value that matches no option: rejected (default) or silently dropped (2016 report).
    pub invalid_dropdown: InvalidDropdown,
    /// Checkbox fields with a `tag` and dropdown / multiselect options add and remove tags.
    pub tag_backed_fields: bool,
    /// Date fields read back as Zendesk does (user `T00:00:00Z`, org `T00:00:00+00:00`), or as sent.
    pub date_readback: DateReadback,
    /// `additional_tags` / `remove_tags` honoured in batch tickets update_many.
    pub ticket_batch_tag_ops: bool,
    /// `additional_tags` / `remove_tags` honoured on users / organizations update_many.
    pub user_org_tag_ops: bool,
    /// Batch organizations update_many may key items by `external_id`.
    pub org_batch_by_external_id: bool,
    /// Shapes of job results: `documented` (default) or `verbose`.
    pub job_results: JobResults,
    /// Users create_or_update_many results echo the item's `external_id` (unconfirmed).
    pub upsert_echoes_external_id: bool,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            match_conflict: MatchConflict::Error,
            result_index_base: 0,
            failed_item_id_is_index: true,
            invalid_dropdown: InvalidDropdown::Reject,
            tag_backed_fields: true,
            date_readback: DateReadback::Zendesk,
            ticket_batch_tag_ops: true,
            user_org_tag_ops: false,
            org_batch_by_external_id: true,
            job_results: JobResults::Documented,
            upsert_echoes_external_id: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchConflict {
    Error,
    ExternalId,
    Email,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidDropdown {
    Reject,
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DateReadback {
    Zendesk,
    AsSent,
}
