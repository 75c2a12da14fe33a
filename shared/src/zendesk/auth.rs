//! Credentials and where they live. The core sees only the `CredentialStore` port: locally env
//! vars or a JSON file, in AWS a Secrets Manager secret (`crate::aws::secrets`, `aws` feature).

use super::error::ZendeskError;
use futures::future::BoxFuture;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
        /// Set when the token came from the `client_credentials` grant (no refresh token): the
        /// scopes it asked for, so the client grants a fresh token the same way on expiry.
        grant_scope: Option<String>,
    },
}

/// Where credentials are loaded from and rotated OAuth tokens are saved to.
pub trait CredentialStore: Send + Sync {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>>;
    /// Persist credentials after an OAuth refresh (the old refresh token no longer works).
    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>>;
    /// Where the credentials live, for messages (never the credentials themselves).
    fn describe(&self) -> String;
    /// The credentials as stored now, past any cache: another process (a Lambda container, a
    /// CLI run) may have rotated them.
    fn reload(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        self.load()
    }
}

/// The store named by a sync config's `credentials` reference: `env`, `file:<path>` (relative
/// paths against `base_dir`), or a Secrets Manager secret (`arn:aws:secretsmanager:...` or
/// `secretsmanager:<name>`, only in builds with the `aws` feature).
pub fn credential_store(
    reference: &str,
    base_dir: &std::path::Path,
) -> Result<Arc<dyn CredentialStore>, ZendeskError> {
    let reference = reference.trim();
    if reference == "env" {
        if let Some(path) = std::env::var_os(ENV_CREDENTIALS_FILE).filter(|p| !p.is_empty()) {
            return Ok(Arc::new(FileCredentials::new(PathBuf::from(path))));
        }
        return Ok(Arc::new(EnvCredentials::new()));
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let path = path.trim();
        if path.is_empty() {
            return Err(ZendeskError::Credentials {
                message: "`file:` needs a path, e.g. `file:zendesk-credentials.json`".into(),
            });
        }
        let path = Path::new(path);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            base_dir.join(path)
        };
        return Ok(Arc::new(FileCredentials::new(full)));
    }
    if reference.starts_with("arn:aws:secretsmanager:") || reference.starts_with("secretsmanager:")
    {
        return secrets_manager_store(reference);
    }
    // The reference is never echoed: a pasted token must not end up in a log.
    let what = if reference.starts_with("arn:") {
        "only Secrets Manager ARNs (`arn:aws:secretsmanager:...`) are supported"
    } else {
        "unsupported `credentials` reference"
    };
    Err(ZendeskError::Credentials {
        message: format!(
            "{what}: use `env` (the ZENDESK_* environment variables, or the file named by \
             {ENV_CREDENTIALS_FILE}), `file:<path>` (a JSON credentials file), or a Secrets \
             Manager secret (`arn:aws:secretsmanager:...` or `secretsmanager:<name>`)"
        ),
    })
}

#[cfg(feature = "aws")]
fn secrets_manager_store(reference: &str) -> Result<Arc<dyn CredentialStore>, ZendeskError> {
    Ok(Arc::new(
        crate::aws::secrets::SecretsManagerCredentials::from_reference(reference)?,
    ))
}

#[cfg(not(feature = "aws"))]
fn secrets_manager_store(_reference: &str) -> Result<Arc<dyn CredentialStore>, ZendeskError> {
    Err(ZendeskError::Credentials {
        message: "a Secrets Manager `credentials` reference needs AWS support, which this build \
                  lacks: rebuild zdsync with the `aws` feature (`--features aws`), or use `env` \
                  or `file:<path>`"
            .into(),
    })
}

/// `ZENDESK_EMAIL`: the admin's email, with `ZENDESK_API_TOKEN`.
pub const ENV_EMAIL: &str = "ZENDESK_EMAIL";
/// `ZENDESK_API_TOKEN`: a Zendesk API token (not the account password).
pub const ENV_API_TOKEN: &str = "ZENDESK_API_TOKEN";
/// `ZENDESK_ACCESS_TOKEN`: an OAuth access token (wins over an API token when both are set).
pub const ENV_ACCESS_TOKEN: &str = "ZENDESK_ACCESS_TOKEN";
pub const ENV_REFRESH_TOKEN: &str = "ZENDESK_REFRESH_TOKEN";
pub const ENV_CLIENT_ID: &str = "ZENDESK_CLIENT_ID";
pub const ENV_CLIENT_SECRET: &str = "ZENDESK_CLIENT_SECRET";
/// Unix seconds when the access token expires.
pub const ENV_TOKEN_EXPIRES_AT: &str = "ZENDESK_TOKEN_EXPIRES_AT";
/// When set, `env` reads and saves this JSON credentials file instead of the variables.
pub const ENV_CREDENTIALS_FILE: &str = "ZENDESK_CREDENTIALS_FILE";

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Credentials from `ZENDESK_*` environment variables. Rotated OAuth tokens cannot be written
/// back to the environment: they are kept in memory for this process only.
pub struct EnvCredentials {
    rotated: Mutex<Option<Credentials>>,
    warned: AtomicBool,
}

impl fmt::Debug for EnvCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvCredentials").finish_non_exhaustive()
    }
}

impl Default for EnvCredentials {
    fn default() -> Self {
        Self::new()
    }
}

impl EnvCredentials {
    pub fn new() -> Self {
        EnvCredentials {
            rotated: Mutex::new(None),
            warned: AtomicBool::new(false),
        }
    }

    fn read_env() -> Result<Credentials, ZendeskError> {
        if let Some(access) = env_nonempty(ENV_ACCESS_TOKEN) {
            let expires_at = match env_nonempty(ENV_TOKEN_EXPIRES_AT) {
                Some(v) => Some(v.parse::<i64>().map_err(|_| ZendeskError::Credentials {
                    message: format!("{ENV_TOKEN_EXPIRES_AT} must be unix seconds (an integer)"),
                })?),
                None => None,
            };
            return Ok(Credentials::OAuth {
                access_token: Secret::new(access),
                refresh_token: env_nonempty(ENV_REFRESH_TOKEN).map(Secret::new),
                client_id: env_nonempty(ENV_CLIENT_ID),
                client_secret: env_nonempty(ENV_CLIENT_SECRET).map(Secret::new),
                expires_at,
                grant_scope: None,
            });
        }
        match (env_nonempty(ENV_EMAIL), env_nonempty(ENV_API_TOKEN)) {
            (Some(email), Some(token)) => Ok(Credentials::ApiToken {
                email,
                token: Secret::new(token),
            }),
            (Some(_), None) => Err(ZendeskError::Credentials {
                message: format!(
                    "{ENV_EMAIL} is set but {ENV_API_TOKEN} is not: set {ENV_API_TOKEN} to a \
                     Zendesk API token (Admin Center > Apps and integrations > Zendesk API), or \
                     use OAuth with {ENV_ACCESS_TOKEN}"
                ),
            }),
            (None, Some(_)) => Err(ZendeskError::Credentials {
                message: format!(
                    "{ENV_API_TOKEN} is set but {ENV_EMAIL} is not: set {ENV_EMAIL} to the \
                     email of the Zendesk admin who owns the token"
                ),
            }),
            (None, None) => Err(ZendeskError::Credentials {
                message: format!(
                    "no Zendesk credentials in the environment: set {ENV_ACCESS_TOKEN} (OAuth; \
                     optionally {ENV_REFRESH_TOKEN}, {ENV_CLIENT_ID}, {ENV_CLIENT_SECRET}, \
                     {ENV_TOKEN_EXPIRES_AT}), or {ENV_EMAIL} and {ENV_API_TOKEN} (API token), or \
                     {ENV_CREDENTIALS_FILE} (a JSON credentials file); `zdsync connect` sets \
                     up OAuth"
                ),
            }),
        }
    }
}

impl CredentialStore for EnvCredentials {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move {
            if let Some(c) = self
                .rotated
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Ok(c);
            }
            Self::read_env()
        })
    }

    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
        Box::pin(async move {
            *self.rotated.lock().unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the OAuth token was refreshed, but the rotated refresh token cannot be stored \
                     in environment variables: the one in {ENV_REFRESH_TOKEN} no longer works \
                     after this run; use a credentials file (`credentials = \"file:<path>\"` or \
                     {ENV_CREDENTIALS_FILE}) so rotated tokens are kept"
                );
            }
            Ok(())
        })
    }

    fn describe(&self) -> String {
        "environment variables (ZENDESK_EMAIL / ZENDESK_API_TOKEN or ZENDESK_ACCESS_TOKEN)".into()
    }
}

/// Credentials held in memory only: for checking a credential before it is stored
/// (`zdsync connect`). Rotated tokens replace the held ones.
pub struct MemoryCredentials {
    creds: Mutex<Credentials>,
    what: String,
}

impl fmt::Debug for MemoryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryCredentials")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl MemoryCredentials {
    /// `what` names the credential in messages, e.g. "the API token being connected".
    pub fn new(creds: Credentials, what: impl Into<String>) -> Self {
        MemoryCredentials {
            creds: Mutex::new(creds),
            what: what.into(),
        }
    }

    /// The credentials now held (rotated ones included).
    pub fn current(&self) -> Credentials {
        self.creds.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl CredentialStore for MemoryCredentials {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move { Ok(self.current()) })
    }

    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
        Box::pin(async move {
            *self.creds.lock().unwrap_or_else(|e| e.into_inner()) = creds.clone();
            Ok(())
        })
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// Credentials in a JSON file: `{"email", "api_token"}` or `{"access_token", "refresh_token",
/// "client_id", "client_secret", "expires_at"}`. Rotated tokens are written back atomically
/// (temporary file + rename, mode 0600); keys the file holds besides these are kept.
pub struct FileCredentials {
    path: PathBuf,
    write_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for FileCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileCredentials")
            .field("path", &self.path)
            .finish()
    }
}

const FILE_KEYS: [&str; 8] = [
    "email",
    "api_token",
    "access_token",
    "refresh_token",
    "client_id",
    "client_secret",
    "expires_at",
    "grant_scope",
];

impl FileCredentials {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCredentials {
            path: path.into(),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, what: impl fmt::Display) -> ZendeskError {
        ZendeskError::Credentials {
            message: format!("credentials file `{}`: {what}", self.path.display()),
        }
    }

    fn parse(&self, bytes: &[u8]) -> Result<Credentials, ZendeskError> {
        parse_credentials_json(
            bytes,
            &format!("credentials file `{}`", self.path.display()),
        )
    }

    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "credentials".into());
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let result = (|| {
            let mut f = opts.open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, &self.path)?;
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Parse the JSON credentials shape shared by the file store and the Secrets Manager adapter:
/// `{"email", "api_token"}` or `{"access_token", "refresh_token", "client_id", "client_secret",
/// "expires_at"}`. Errors start with `context` and never quote the input.
pub fn parse_credentials_json(bytes: &[u8], context: &str) -> Result<Credentials, ZendeskError> {
    let err = |what: &dyn fmt::Display| ZendeskError::Credentials {
        message: format!("{context}: {what}"),
    };
    // serde_json's errors quote no input, only positions, so no secret leaks through them.
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| err(&format_args!("not valid JSON ({e})")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| err(&"must hold a JSON object"))?;
    let text = |key: &str| -> Result<Option<String>, ZendeskError> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(_) => Err(err(&format_args!("`{key}` must be a string"))),
        }
    };
    if let Some(access) = text("access_token")? {
        let expires_at = match obj.get("expires_at") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => Some(
                n.as_i64()
                    .or_else(|| n.as_f64().map(|f| f as i64))
                    .ok_or_else(|| err(&"`expires_at` must be unix seconds"))?,
            ),
            Some(serde_json::Value::String(s)) => Some(
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| err(&"`expires_at` must be unix seconds"))?,
            ),
            Some(_) => return Err(err(&"`expires_at` must be unix seconds")),
        };
        return Ok(Credentials::OAuth {
            access_token: Secret::new(access),
            refresh_token: text("refresh_token")?.map(Secret::new),
            client_id: text("client_id")?,
            client_secret: text("client_secret")?.map(Secret::new),
            expires_at,
            grant_scope: text("grant_scope")?,
        });
    }
    match (text("email")?, text("api_token")?) {
        (Some(email), Some(token)) => Ok(Credentials::ApiToken {
            email,
            token: Secret::new(token),
        }),
        _ => Err(err(
            &"holds no credentials: expected {\"access_token\", \"refresh_token\", \
             \"client_id\", \"client_secret\", \"expires_at\"} (OAuth, written by `zdsync \
             connect`) or {\"email\", \"api_token\"} (API token)",
        )),
    }
}

/// Replace the credential keys of a JSON object with `creds`, keeping every other key.
pub fn merge_credentials_json(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    creds: &Credentials,
) {
    for k in FILE_KEYS {
        obj.remove(k);
    }
    use serde_json::Value;
    match creds {
        Credentials::ApiToken { email, token } => {
            obj.insert("email".into(), Value::String(email.clone()));
            obj.insert("api_token".into(), Value::String(token.expose().into()));
        }
        Credentials::OAuth {
            access_token,
            refresh_token,
            client_id,
            client_secret,
            expires_at,
            grant_scope,
        } => {
            obj.insert(
                "access_token".into(),
                Value::String(access_token.expose().into()),
            );
            if let Some(r) = refresh_token {
                obj.insert("refresh_token".into(), Value::String(r.expose().into()));
            }
            if let Some(c) = client_id {
                obj.insert("client_id".into(), Value::String(c.clone()));
            }
            if let Some(s) = client_secret {
                obj.insert("client_secret".into(), Value::String(s.expose().into()));
            }
            if let Some(e) = expires_at {
                obj.insert("expires_at".into(), Value::from(*e));
            }
            if let Some(g) = grant_scope {
                obj.insert("grant_scope".into(), Value::String(g.clone()));
            }
        }
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl CredentialStore for FileCredentials {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move {
            let bytes = std::fs::read(&self.path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    self.err("not found: run `zdsync connect` to create it, or write {\"email\", \"api_token\"} into it")
                } else {
                    self.err(format_args!("cannot read it ({e})"))
                }
            })?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                if let Ok(meta) = std::fs::metadata(&self.path) {
                    if meta.permissions().mode() & 0o077 != 0 {
                        tracing::warn!(
                            path = %self.path.display(),
                            mode = format!("{:o}", meta.permissions().mode() & 0o777),
                            "the credentials file can be read by other users of this machine: `chmod 600` it (`zdsync connect` writes it owner-only)"
                        );
                    }
                }
            }
            self.parse(&bytes)
        })
    }

    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
        Box::pin(async move {
            let _guard = self.write_lock.lock().await;
            // Keep whatever else the file holds (subdomain, scopes, notes).
            let mut obj = std::fs::read(&self.path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Some(m),
                    _ => None,
                })
                .unwrap_or_default();
            merge_credentials_json(&mut obj, creds);
            use serde_json::Value;
            let mut bytes = serde_json::to_vec_pretty(&Value::Object(obj))
                .map_err(|e| self.err(format_args!("cannot encode ({e})")))?;
            bytes.push(b'\n');
            self.write_atomically(&bytes)
                .map_err(|e| self.err(format_args!("cannot save the rotated tokens ({e})")))
        })
    }

    fn describe(&self) -> String {
        format!("credentials file `{}`", self.path.display())
    }
}

impl Credentials {
    /// API token or OAuth, for messages and branching.
    pub fn method(&self) -> super::error::AuthMethod {
        match self {
            Credentials::ApiToken { .. } => super::error::AuthMethod::ApiToken,
            Credentials::OAuth { .. } => super::error::AuthMethod::OAuth,
        }
    }

    /// An OAuth credential zdsync can renew by itself: a refresh token, or a confidential
    /// client's `client_credentials` grant.
    pub(crate) fn renewable(&self) -> bool {
        match self {
            Credentials::ApiToken { .. } => false,
            Credentials::OAuth {
                refresh_token,
                client_id,
                client_secret,
                grant_scope,
                ..
            } => {
                refresh_token.is_some()
                    || (grant_scope.is_some() && client_id.is_some() && client_secret.is_some())
            }
        }
    }

    /// Every secret this credential holds, for scrubbing messages.
    pub(crate) fn secrets(&self) -> Vec<String> {
        match self {
            Credentials::ApiToken { token, .. } => vec![token.expose().to_string()],
            Credentials::OAuth {
                access_token,
                refresh_token,
                client_secret,
                ..
            } => [
                Some(access_token),
                refresh_token.as_ref(),
                client_secret.as_ref(),
            ]
            .into_iter()
            .flatten()
            .map(|s| s.expose().to_string())
            .collect(),
        }
    }
}
