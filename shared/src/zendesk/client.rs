//! The HTTP client: base URL, auth (API token or OAuth with refresh rotation), one request
//! budget shared by every task of a run, `Retry-After` pauses, backoff, typed errors.

use super::auth::{CredentialStore, Credentials, Secret};
use super::error::{AuthMethod, ZendeskError};
use super::jobs::JobStatus;
use super::limiter::{Limiter, Permit};
use crate::fields::Object;
use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `https://<subdomain>.zendesk.com`, or the config's `base_url` override.
    pub base_url: String,
    pub subdomain: String,
    /// Requests per minute this run may use (job-status polls included).
    pub rpm: u32,
    /// Longest `Retry-After` honoured; a longer one is capped.
    pub retry_after_cap: Duration,
    /// Wait when a 429/503 has no `Retry-After`.
    pub retry_after_default: Duration,
    /// Attempts per request before giving up (429, 503, 5xx, timeouts, connection errors;
    /// requests that may create records are resent only after a 429, a 503 with
    /// `Retry-After` or a connection that never opened).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// The account's budget shared with every other client of it (other syncs, processes,
    /// Lambdas); `None`: this client's `rpm` and job slots are its own.
    pub budget: Option<Arc<dyn super::budget::BudgetStore>>,
    /// How many clients of the account may run at once: while the shared budget fails, each
    /// keeps to `rpm ÷ budget_share`.
    pub budget_share: u32,
}

impl ClientOptions {
    /// From a sync config's `[zendesk]` table; `rpm` defaults to 90 % of 700. The budget is
    /// shared with every `zdsync` of this machine through the machine's budget folder.
    pub fn from_config(z: &crate::config::Zendesk) -> Self {
        let mut o = Self::for_subdomain(&z.subdomain, Some(&z.endpoint()));
        if let Some(rpm) = z.rate_limit_rpm {
            o.rpm = rpm;
        }
        o.budget = match super::budget::StoreBudget::machine() {
            Ok(b) => Some(Arc::new(b)),
            Err(e) => {
                tracing::warn!(error = %e, "no budget folder: this run's budget is not shared with other zdsync processes");
                None
            }
        };
        o
    }

    /// Defaults for one account: `https://{subdomain}.zendesk.com` unless `base_url` is given
    /// (a trailing `/` is dropped).
    pub fn for_subdomain(subdomain: &str, base_url: Option<&str>) -> Self {
        let subdomain = subdomain.trim().to_string();
        let base_url = match base_url.map(str::trim).filter(|b| !b.is_empty()) {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => format!("https://{subdomain}.zendesk.com"),
        };
        ClientOptions {
            base_url,
            subdomain,
            rpm: DEFAULT_RPM,
            retry_after_cap: Duration::from_secs(120),
            retry_after_default: Duration::from_secs(10),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            budget: None,
            budget_share: 2,
        }
    }
}

/// 90 % of the 700 requests per minute of Zendesk Enterprise plans.
pub const DEFAULT_RPM: u32 = 630;

/// Refresh an OAuth access token this long before it expires.
const REFRESH_MARGIN_SECS: i64 = 60;

/// Whether a request may be sent again when its answer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Reads, updates, create-or-update: repeating is harmless.
    Safe,
    /// Creates: a lost answer, a timeout, or a 5xx other than a 503 with `Retry-After`
    /// becomes `ZendeskError::OutcomeUnknown` instead of a resend (the work may be done).
    Unsafe,
}

/// Zendesk traffic of one client (one run, or one Lambda invocation): the run record's
/// `requests`, summed over invocations with [`ClientStats::add`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientStats {
    /// Requests sent (job-status polls and retries included).
    pub sent: u64,
    /// 429 answers met (each followed by a pause of every request of the run).
    pub rate_limited: u64,
    pub unavailable: u64,
    pub server_errors: u64,
    pub transport_errors: u64,
    pub retries: u64,
    pub token_refreshes: u64,
    pub paused_ms: u64,
}

impl ClientStats {
    /// The traffic since `earlier` (a snapshot of the same client): one run's own share when
    /// a client served several.
    pub fn since(&self, earlier: &ClientStats) -> ClientStats {
        ClientStats {
            sent: self.sent.saturating_sub(earlier.sent),
            rate_limited: self.rate_limited.saturating_sub(earlier.rate_limited),
            unavailable: self.unavailable.saturating_sub(earlier.unavailable),
            server_errors: self.server_errors.saturating_sub(earlier.server_errors),
            transport_errors: self
                .transport_errors
                .saturating_sub(earlier.transport_errors),
            retries: self.retries.saturating_sub(earlier.retries),
            token_refreshes: self.token_refreshes.saturating_sub(earlier.token_refreshes),
            paused_ms: self.paused_ms.saturating_sub(earlier.paused_ms),
        }
    }

    /// Sum another invocation's traffic into this one.
    pub fn add(&mut self, o: &ClientStats) {
        self.sent += o.sent;
        self.rate_limited += o.rate_limited;
        self.unavailable += o.unavailable;
        self.server_errors += o.server_errors;
        self.transport_errors += o.transport_errors;
        self.retries += o.retries;
        self.token_refreshes += o.token_refreshes;
        self.paused_ms += o.paused_ms;
    }
}

/// What the preflight learned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Preflight {
    pub user_id: u64,
    pub email: Option<String>,
    pub role: String,
    /// OAuth scopes, when the credential is a token.
    pub scopes: Option<Vec<String>>,
    /// When the OAuth access token expires (ISO 8601), as Zendesk reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<String>,
    /// The email sent with an API token (for messages).
    #[serde(skip)]
    api_token_login: Option<String>,
    #[serde(skip)]
    credentials_source: String,
}

impl Preflight {
    /// Whether a sync of `object` (a write when `write`) may run with this credential: an API
    /// token must be an admin's, an OAuth token needs the read and write scopes. The errors are
    /// the troubleshooting messages a run stops with.
    pub fn check(&self, object: Object, write: bool) -> Result<(), ZendeskError> {
        if let Some(login) = &self.api_token_login {
            if self.role != "admin" {
                return Err(ZendeskError::Forbidden {
                    path: "/api/v2/users/me.json".into(),
                    message: format!(
                        "`{login}` is a Zendesk {} and zdsync needs an admin: use an admin's \
                         email with the API token (credentials from {}), or connect with OAuth \
                         as an admin (`zdsync connect`)",
                        if self.role.is_empty() {
                            "user"
                        } else {
                            &self.role
                        },
                        self.credentials_source
                    ),
                });
            }
        }
        if let Some(scopes) = &self.scopes {
            check_scopes(scopes, object, write)?;
        }
        Ok(())
    }
}

/// A cheap-to-clone handle: every clone shares the connection pool, the credentials, the
/// request budget (token bucket, `Retry-After` pauses) and the counters.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    opts: ClientOptions,
    store: Arc<dyn CredentialStore>,
    creds: RwLock<Credentials>,
    /// Every secret seen (rotated ones included), scrubbed from messages built from answers.
    secrets: Mutex<Vec<String>>,
    /// One refresh at a time; the others wait and reuse its token.
    refresh_lock: tokio::sync::Mutex<()>,
    limiter: Limiter,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    rate_limited: AtomicU64,
    unavailable: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    retries: AtomicU64,
    token_refreshes: AtomicU64,
    /// Answers of any status received: before the first, a connection that cannot even be
    /// opened (refused, no such host) is a wrong address, not a blip, and fails fast.
    answers: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.inner.opts.base_url)
            .field("auth", &self.auth_method())
            .field("credentials", &self.inner.store.describe())
            .field("rpm", &self.inner.opts.rpm)
            .finish_non_exhaustive()
    }
}

/// One request to send (possibly several times).
struct Req<'a> {
    method: Method,
    url: String,
    /// The path for messages and logs (no host, no query).
    path: String,
    body: Option<&'a [u8]>,
    idempotency: Idempotency,
}

/// A request's place in the rate budget, taken before the request is built: the caller records
/// what it is about to send (a journal) only once the request may go on the wire at once.
#[must_use]
pub struct Reserved<'a>(Permit<'a>);

impl Reserved<'_> {
    /// The reserved request is the single probe after a 429/503.
    pub fn is_probe(&self) -> bool {
        self.0.is_probe()
    }
}

/// A complete answer: status, headers, the whole body.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// An error envelope in any of Zendesk's three shapes (or a text body).
#[derive(Debug, Default)]
struct Envelope {
    code: String,
    description: String,
    title: Option<String>,
    details: Option<Value>,
}

fn as_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn parse_envelope(status: u16, body: &[u8]) -> Envelope {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
        .to_string();
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        return Envelope {
            code: reason,
            description: truncate(&text, 500),
            ..Envelope::default()
        };
    };
    let mut env = Envelope::default();
    match v.get("error") {
        Some(Value::String(code)) => {
            env.code = code.clone();
            env.description = as_text(v.get("description"))
                .or_else(|| as_text(v.get("error_description")))
                .or_else(|| as_text(v.get("message")))
                .unwrap_or_default();
            env.details = v.get("details").filter(|d| !d.is_null()).cloned();
        }
        Some(Value::Object(o)) => {
            env.title = as_text(o.get("title"));
            env.code = env.title.clone().unwrap_or_default();
            env.description = as_text(o.get("message"))
                .or_else(|| as_text(o.get("description")))
                .unwrap_or_default();
            env.details = v.get("details").filter(|d| !d.is_null()).cloned();
        }
        _ => {
            if let Some(errors) = v.get("errors").and_then(Value::as_array) {
                let mut descs = Vec::new();
                for e in errors {
                    if env.code.is_empty() {
                        env.code = as_text(e.get("code")).unwrap_or_default();
                        env.title = as_text(e.get("title"));
                    }
                    let mut d = as_text(e.get("title")).unwrap_or_default();
                    if let Some(detail) = as_text(e.get("detail")) {
                        if d.is_empty() {
                            d = detail;
                        } else {
                            d = format!("{d} ({detail})");
                        }
                    }
                    if !d.is_empty() {
                        descs.push(d);
                    }
                }
                env.description = descs.join("; ");
                if errors.len() > 1 {
                    env.details = Some(Value::Array(errors.clone()));
                }
            } else {
                env.description = as_text(v.get("description"))
                    .or_else(|| as_text(v.get("message")))
                    .unwrap_or_else(|| truncate(&v.to_string(), 500));
                env.details = v.get("details").filter(|d| !d.is_null()).cloned();
            }
        }
    }
    if env.code.is_empty() {
        env.code = reason;
    }
    env
}

/// `Retry-After` in seconds (fractions accepted); an HTTP date or garbage counts as absent.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let secs: f64 = v.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `a,b` with anything but `[A-Za-z0-9._~-]` percent-encoded.
fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// A reqwest error as one line, without the URL (it is named separately).
fn transport_message(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_body() || e.is_decode() {
        "the answer was cut off".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut seen = 0;
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
        seen += 1;
        if seen > 4 {
            break;
        }
    }
    msg
}

impl Client {
    /// Loads credentials from `store` (fails with `Credentials` when there are none).
    pub async fn new(
        opts: ClientOptions,
        store: Arc<dyn CredentialStore>,
    ) -> Result<Client, ZendeskError> {
        let creds = store.load().await?;
        // Fail now, not on the first request, when a credential cannot go in a header.
        auth_header(&creds, &store.describe())?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("zdsync/", env!("CARGO_PKG_VERSION")))
            // A redirect could carry the credential to another host: never followed.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(opts.request_timeout)
            .connect_timeout(opts.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .build()
            .map_err(|e| ZendeskError::Transport {
                path: opts.base_url.clone(),
                attempts: 0,
                message: format!("cannot set up the HTTP client: {}", transport_message(&e)),
            })?;
        // An unlimited client (`rpm` 0, tests) has nothing to share.
        let shared = match &opts.budget {
            Some(store) if opts.rpm > 0 => Some(super::limiter::Shared::new(
                store.clone(),
                &opts.base_url,
                opts.rpm,
                opts.budget_share,
            )),
            _ => None,
        };
        let limiter = Limiter::with_shared(opts.rpm, shared);
        let secrets = creds.secrets();
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                opts,
                store,
                creds: RwLock::new(creds),
                secrets: Mutex::new(secrets),
                refresh_lock: tokio::sync::Mutex::new(()),
                limiter,
                stats: Stats::default(),
            }),
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// One of the account's `max` bulk-job slots when the budget is shared with other writers
    /// (held until dropped); `None` when this client's job slots are its own.
    pub async fn job_slot(&self, max: usize) -> Option<super::limiter::JobSlot> {
        match self.inner.limiter.shared() {
            Some(s) => Some(s.job_slot(max).await),
            None => None,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.inner.opts.base_url
    }

    /// The account's shared budget, when this client takes part in one.
    pub fn budget(&self) -> Option<Arc<super::limiter::Shared>> {
        self.inner.limiter.shared().cloned()
    }

    /// The configured requests per minute (0: no limit of zdsync's own).
    pub fn rpm(&self) -> u32 {
        self.inner.opts.rpm
    }

    /// API token or OAuth.
    pub fn auth_method(&self) -> AuthMethod {
        self.creds().method()
    }

    /// Where the credentials came from (never the credentials).
    pub fn credentials_source(&self) -> String {
        self.inner.store.describe()
    }

    /// Until when a `Retry-After` holds every request of this client back, if one is running.
    pub fn paused_until(&self) -> Option<tokio::time::Instant> {
        self.inner.limiter.paused_until()
    }

    fn creds(&self) -> Credentials {
        self.inner
            .creds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `s` with every known secret replaced.
    fn scrub(&self, s: String) -> String {
        let secrets = self.inner.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = s;
        for secret in secrets.iter().filter(|x| x.len() >= 4) {
            if s.contains(secret.as_str()) {
                s = s.replace(secret.as_str(), "[redacted]");
            }
        }
        s
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with('/') {
            format!("{}{path}", self.inner.opts.base_url)
        } else {
            format!("{}/{path}", self.inner.opts.base_url)
        }
    }

    /// GET a path (`/api/v2/...`, query included) and parse the JSON body.
    pub async fn get(&self, path: &str) -> Result<serde_json::Value, ZendeskError> {
        let req = Req {
            method: Method::GET,
            url: self.url(path),
            path: path_only(path).to_string(),
            body: None,
            idempotency: Idempotency::Safe,
        };
        let answer = self.execute(&req).await?;
        self.answer_json(&req, answer)
    }

    /// Send a JSON body (already encoded) with POST/PUT/DELETE and parse the JSON answer
    /// (`Value::Null` for an empty body).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        idempotency: Idempotency,
    ) -> Result<serde_json::Value, ZendeskError> {
        self.send_with(None, method, path, body, idempotency).await
    }

    /// Waits for a rate-limit token (and any `Retry-After` pause) without sending anything.
    /// [`Client::send_reserved`] then sends at once with it.
    pub async fn reserve(&self) -> Reserved<'_> {
        Reserved(self.inner.limiter.acquire().await)
    }

    /// [`Client::send`] whose first attempt uses a token taken by [`Client::reserve`].
    pub async fn send_reserved(
        &self,
        reserved: Reserved<'_>,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        idempotency: Idempotency,
    ) -> Result<serde_json::Value, ZendeskError> {
        self.send_with(Some(reserved.0), method, path, body, idempotency)
            .await
    }

    async fn send_with(
        &self,
        first: Option<Permit<'_>>,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
        idempotency: Idempotency,
    ) -> Result<serde_json::Value, ZendeskError> {
        let req = Req {
            method,
            url: self.url(path),
            path: path_only(path).to_string(),
            body: (!body.is_empty()).then_some(body.as_slice()),
            idempotency,
        };
        let answer = self.execute_with(&req, first).await?;
        self.answer_json(&req, answer)
    }

    /// Every item under `root` of a paginated list, following cursor pagination.
    pub async fn list_all(
        &self,
        path: &str,
        root: &str,
    ) -> Result<Vec<serde_json::Value>, ZendeskError> {
        Ok(self.list_pages(path, root, usize::MAX).await?.0)
    }

    /// The items under `root` of at most `max_pages` pages of a paginated list, and whether
    /// they are the whole list.
    pub async fn list_pages(
        &self,
        path: &str,
        root: &str,
        max_pages: usize,
    ) -> Result<(Vec<serde_json::Value>, bool), ZendeskError> {
        let first = if path.contains("page[size]")
            || path.contains("page%5Bsize%5D")
            || path.contains("per_page")
        {
            path.to_string()
        } else if path.contains('?') {
            format!("{path}&page[size]=100")
        } else {
            format!("{path}?page[size]=100")
        };
        let mut link = first;
        let mut items = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..max_pages {
            let (list, next) = self.page(&link, root).await?;
            items.extend(list);
            match next {
                Some(next) if seen.insert(next.clone()) => link = next,
                Some(_) => {
                    return Err(ZendeskError::Protocol {
                        path: path_only(path).to_string(),
                        message: "the pagination links go round in a circle".into(),
                    })
                }
                None => return Ok((items, true)),
            }
        }
        Ok((items, false))
    }

    /// One page of a list: the items under `root` and the link to the next page, if any.
    /// `path_or_link` is a path (`/api/v2/...`) or a link an earlier page gave (accepted only
    /// on this client's base URL).
    pub async fn page(
        &self,
        path_or_link: &str,
        root: &str,
    ) -> Result<(Vec<serde_json::Value>, Option<String>), ZendeskError> {
        let (url, path) = if path_or_link.starts_with('/') {
            (self.url(path_or_link), path_only(path_or_link).to_string())
        } else {
            let url = self.follow(path_or_link, root)?;
            let path = url[self.inner.opts.base_url.len()..].to_string();
            (url, path_only(&path).to_string())
        };
        let req = Req {
            method: Method::GET,
            url,
            path,
            body: None,
            idempotency: Idempotency::Safe,
        };
        let answer = self.execute(&req).await?;
        let mut page = self.answer_json(&req, answer)?;
        let list = match page.get_mut(root).map(Value::take) {
            Some(Value::Array(list)) => list,
            _ => {
                return Err(ZendeskError::Protocol {
                    path: req.path,
                    message: format!("the answer has no `{root}` list"),
                })
            }
        };
        let next = match page.get("meta").and_then(|m| m.get("has_more")) {
            Some(has_more) => {
                if has_more.as_bool() == Some(true) {
                    page.get("links")
                        .and_then(|l| l.get("next"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                } else {
                    None
                }
            }
            None => page
                .get("next_page")
                .and_then(Value::as_str)
                .map(str::to_string),
        };
        Ok((list, next.filter(|n| !n.is_empty())))
    }

    /// A pagination link, accepted only on this client's base URL (credentials never go to
    /// another host).
    fn follow(&self, link: &str, path: &str) -> Result<String, ZendeskError> {
        let base = &self.inner.opts.base_url;
        if link.starts_with('/') {
            return Ok(self.url(link));
        }
        if link.starts_with(base.as_str()) && link[base.len()..].starts_with(['/', '?']) {
            return Ok(link.to_string());
        }
        Err(ZendeskError::Protocol {
            path: path.to_string(),
            message: format!("a pagination link points outside {base}"),
        })
    }

    /// `GET /api/v2/job_statuses/show_many?ids=` for up to 100 ids.
    pub async fn job_statuses(&self, ids: &[String]) -> Result<Vec<JobStatus>, ZendeskError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(100) {
            let list: Vec<String> = chunk.iter().map(|i| encode_query_value(i)).collect();
            let path = format!("/api/v2/job_statuses/show_many.json?ids={}", list.join(","));
            // Polls go before the writes waiting for their turn: they free the job slots those
            // writes wait for.
            let first = self.inner.limiter.acquire_urgent().await;
            let mut v = self
                .send_with(
                    Some(first),
                    Method::GET,
                    &path,
                    Vec::new(),
                    Idempotency::Safe,
                )
                .await?;
            let statuses = v.get_mut("job_statuses").map(Value::take);
            let parsed: Vec<JobStatus> = match statuses {
                Some(s @ Value::Array(_)) => {
                    serde_json::from_value(s).map_err(|e| ZendeskError::Protocol {
                        path: path_only(&path).to_string(),
                        message: format!("job statuses not as documented: {e}"),
                    })?
                }
                _ => {
                    return Err(ZendeskError::Protocol {
                        path: path_only(&path).to_string(),
                        message: "the answer has no `job_statuses` list".into(),
                    })
                }
            };
            out.extend(parsed);
        }
        Ok(out)
    }

    /// Check credentials, subdomain and the scopes a write to `object` needs, before any write.
    pub async fn preflight(&self, object: Object, write: bool) -> Result<Preflight, ZendeskError> {
        let who = self.whoami().await?;
        who.check(object, write)?;
        Ok(who)
    }

    /// Who the credential authenticates as (`users/me`) and, for OAuth, the token's scopes and
    /// expiry (`oauth/tokens/current`); fails on refused credentials or an unknown subdomain.
    /// [`Preflight::check`] then says whether a sync of an object may run.
    pub async fn whoami(&self) -> Result<Preflight, ZendeskError> {
        const ME: &str = "/api/v2/users/me.json";
        let me = self.get(ME).await?;
        let user = me.get("user").cloned().unwrap_or(Value::Null);
        let user_id = user.get("id").and_then(Value::as_u64).unwrap_or(0);
        let email = user
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_string);
        let role = user
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let creds = self.creds();
        if user_id == 0 {
            return Err(match &creds {
                Credentials::ApiToken { email, .. } => ZendeskError::AuthFailed {
                    method: AuthMethod::ApiToken,
                    message: self.api_token_refused(email),
                },
                Credentials::OAuth { .. } => ZendeskError::AuthFailed {
                    method: AuthMethod::OAuth,
                    message: self.oauth_refused(),
                },
            });
        }
        let (login, scopes, token_expires_at) = match &creds {
            Credentials::ApiToken { email: login, .. } => (Some(login.clone()), None, None),
            Credentials::OAuth { .. } => {
                const CURRENT: &str = "/api/v2/oauth/tokens/current.json";
                let t = self.get(CURRENT).await?;
                let token = t.get("token");
                let scopes: Vec<String> = token
                    .and_then(|t| t.get("scopes"))
                    .and_then(Value::as_array)
                    .ok_or_else(|| ZendeskError::Protocol {
                        path: CURRENT.into(),
                        message: "the token has no `scopes` list".into(),
                    })?
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect();
                let expires = token
                    .and_then(|t| t.get("expires_at"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (None, Some(scopes), expires)
            }
        };
        Ok(Preflight {
            user_id,
            email,
            role,
            scopes,
            token_expires_at,
            api_token_login: login,
            credentials_source: self.inner.store.describe(),
        })
    }

    /// Audience syncs: whether the account allows tags on `object` (users or organizations).
    /// Users carry `tags` only while user tagging is on (`users/me` shows it); organizations
    /// always show `tags`, so their tags endpoint is asked (it answers 403 while tagging is off,
    /// and 404 for an id that names no organization).
    pub async fn check_tagging(&self, object: Object) -> Result<(), ZendeskError> {
        let disabled = || ZendeskError::TaggingDisabled {
            object: object.as_str().to_string(),
        };
        match object {
            Object::Users => {
                let me = self.get("/api/v2/users/me.json").await?;
                if me["user"].get("tags").is_none() {
                    return Err(disabled());
                }
                Ok(())
            }
            Object::Organizations => {
                let page = self.get("/api/v2/organizations.json?page[size]=1").await?;
                let id = page["organizations"][0]["id"].as_u64().unwrap_or(1);
                match self
                    .get(&format!("/api/v2/organizations/{id}/tags.json"))
                    .await
                {
                    Ok(_) | Err(ZendeskError::Api { status: 404, .. }) => Ok(()),
                    Err(ZendeskError::TaggingDisabled { .. } | ZendeskError::Forbidden { .. }) => {
                        Err(disabled())
                    }
                    Err(e) => Err(e),
                }
            }
            Object::Tickets => Ok(()),
        }
    }

    pub fn stats(&self) -> ClientStats {
        let s = &self.inner.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            sent: get(&s.requests),
            rate_limited: get(&s.rate_limited),
            unavailable: get(&s.unavailable),
            server_errors: get(&s.server_errors),
            transport_errors: get(&s.transport_errors),
            retries: get(&s.retries),
            token_refreshes: get(&s.token_refreshes),
            paused_ms: self.inner.limiter.paused_ms(),
        }
    }

    fn answer_json(&self, req: &Req<'_>, answer: Answer) -> Result<Value, ZendeskError> {
        if !(200..300).contains(&answer.status) {
            return Err(self.error_for(&req.path, &answer));
        }
        if answer.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&answer.body).map_err(|e| ZendeskError::Protocol {
            path: req.path.clone(),
            message: format!("HTTP {} with a body that is not JSON ({e})", answer.status),
        })
    }

    fn api_token_refused(&self, email: &str) -> String {
        format!(
            "Zendesk refused the email and API token (credentials from {}): check that the \
             token is a Zendesk API token (Admin Center > Apps and integrations > Zendesk API; \
             an API token is not the account password), that it is still active, and that \
             `{email}` is the email of an admin of this account",
            self.inner.store.describe()
        )
    }

    fn oauth_refused(&self) -> String {
        format!(
            "the OAuth token was refused (expired or revoked): reconnect with `zdsync connect` \
             (credentials from {})",
            self.inner.store.describe()
        )
    }

    /// The typed error for a final non-2xx answer.
    fn error_for(&self, path: &str, answer: &Answer) -> ZendeskError {
        let status = answer.status;
        let env = parse_envelope(status, &answer.body);
        let description = self.scrub(env.description.clone());
        let code = self.scrub(env.code.clone());
        match status {
            401 => match self.creds() {
                Credentials::ApiToken { email, .. } => ZendeskError::AuthFailed {
                    method: AuthMethod::ApiToken,
                    message: self.api_token_refused(&email),
                },
                Credentials::OAuth { .. } => ZendeskError::AuthFailed {
                    method: AuthMethod::OAuth,
                    message: self.oauth_refused(),
                },
            },
            404 if env
                .title
                .as_deref()
                .is_some_and(|t| t.starts_with("No help desk at")) =>
            {
                let title = env.title.as_deref().unwrap_or_default();
                let host = title
                    .trim_start_matches("No help desk at")
                    .trim()
                    .trim_end_matches('.');
                let sub = host.strip_suffix(".zendesk.com").unwrap_or(host);
                ZendeskError::SubdomainNotFound {
                    subdomain: if sub.is_empty() {
                        self.inner.opts.subdomain.clone()
                    } else {
                        sub.to_string()
                    },
                }
            }
            403 => {
                const MISSING: &str = "missing the following required scopes:";
                let lower = description.to_ascii_lowercase();
                if let Some(at) = lower.find(MISSING) {
                    let scope = description[at + MISSING.len()..]
                        .trim()
                        .trim_end_matches('.')
                        .to_string();
                    return ZendeskError::MissingScope {
                        hint: scope_hint(&scope),
                        scope,
                    };
                }
                let bulk_path = path.contains("/users/create_many")
                    || path.contains("/users/create_or_update_many");
                let text = format!("{code} {description}").to_ascii_lowercase();
                if bulk_path && text.contains("bulk") {
                    return ZendeskError::BulkImportDisabled;
                }
                let tags_path = path.trim_end_matches(".json").ends_with("/tags");
                if tags_path && !path.contains("/tickets/") {
                    let object = if path.contains("/organizations/") {
                        "organizations"
                    } else {
                        "users"
                    };
                    return ZendeskError::TaggingDisabled {
                        object: object.into(),
                    };
                }
                let mut message = if description.is_empty() {
                    code
                } else if code.is_empty() || code == "Forbidden" {
                    description
                } else {
                    format!("{code}: {description}")
                };
                if let Credentials::ApiToken { email, .. } = self.creds() {
                    message.push_str(&format!(
                        " (authenticated as `{email}`: zdsync needs an admin)"
                    ));
                }
                ZendeskError::Forbidden {
                    path: path.to_string(),
                    message,
                }
            }
            _ => ZendeskError::Api {
                path: path.to_string(),
                status,
                code,
                description,
                details: env.details.map(|d| {
                    // Details come from the answer; scrub them like the description.
                    let text = d.to_string();
                    let clean = self.scrub(text.clone());
                    if clean == text {
                        d
                    } else {
                        Value::String(clean)
                    }
                }),
            },
        }
    }

    /// Sends with credentials: proactive OAuth refresh near expiry, one refresh + retry on a
    /// 401 `invalid_token`. Returns the final complete answer (any status).
    async fn execute(&self, req: &Req<'_>) -> Result<Answer, ZendeskError> {
        self.execute_with(req, None).await
    }

    async fn execute_with(
        &self,
        req: &Req<'_>,
        mut first: Option<Permit<'_>>,
    ) -> Result<Answer, ZendeskError> {
        let mut refreshed = false;
        loop {
            if self.expiring_token().is_some() {
                // The refresh takes a token of its own: never hold one while waiting for it.
                first = None;
            }
            self.refresh_if_expiring().await?;
            let creds = self.creds();
            let header = auth_header(&creds, &self.inner.store.describe())?;
            let answer = self.run(req, Some(&header), first.take()).await?;
            if answer.status == 401 && !refreshed {
                if let Credentials::OAuth { access_token, .. } = &creds {
                    let invalid_token = answer.json().is_some_and(|v| {
                        v.get("error").and_then(Value::as_str) == Some("invalid_token")
                    }) || answer
                        .headers
                        .get(reqwest::header::WWW_AUTHENTICATE)
                        .and_then(|h| h.to_str().ok())
                        .is_some_and(|h| h.contains("invalid_token"));
                    if invalid_token && creds.renewable() {
                        tracing::warn!(
                            path = %req.path,
                            "Zendesk refused the OAuth access token: refreshing it"
                        );
                        self.refresh(access_token.expose()).await?;
                        refreshed = true;
                        continue;
                    }
                }
            }
            return Ok(answer);
        }
    }

    /// The OAuth access token, when it is due for a refresh.
    fn expiring_token(&self) -> Option<String> {
        let c = self.inner.creds.read().unwrap_or_else(|e| e.into_inner());
        match &*c {
            Credentials::OAuth {
                access_token,
                expires_at: Some(at),
                ..
            } if c.renewable() && *at - now_unix() <= REFRESH_MARGIN_SECS => {
                Some(access_token.expose().to_string())
            }
            _ => None,
        }
    }

    async fn refresh_if_expiring(&self) -> Result<(), ZendeskError> {
        let Some(used) = self.expiring_token() else {
            return Ok(());
        };
        tracing::debug!("the OAuth access token expires within a minute: refreshing it");
        self.refresh(&used).await
    }

    /// Exchanges the refresh token for a new pair (rotation) unless another task already
    /// replaced `used`; saves the new pair to the credential store.
    async fn refresh(&self, used: &str) -> Result<(), ZendeskError> {
        let _guard = self.inner.refresh_lock.lock().await;
        // Another container or process may have rotated the pair already (each holds only its
        // own lock): the stored pair is taken instead of refreshing with a used-up token.
        if self.adopt_stored(used).await {
            return Ok(());
        }
        let (refresh_token, client_id, client_secret, grant_scope) = {
            let c = self.inner.creds.read().unwrap_or_else(|e| e.into_inner());
            if !c.renewable() {
                return match &*c {
                    Credentials::OAuth { .. } => Err(ZendeskError::AuthFailed {
                        method: AuthMethod::OAuth,
                        message: self.oauth_refused(),
                    }),
                    Credentials::ApiToken { .. } => Ok(()),
                };
            }
            match &*c {
                Credentials::OAuth {
                    access_token,
                    refresh_token,
                    client_id,
                    client_secret,
                    grant_scope,
                    ..
                } => {
                    if access_token.expose() != used {
                        return Ok(()); // another task refreshed meanwhile
                    }
                    (
                        refresh_token.clone(),
                        client_id.clone(),
                        client_secret.clone(),
                        grant_scope.clone(),
                    )
                }
                Credentials::ApiToken { .. } => return Ok(()),
            }
        };
        // A refresh token is exchanged (and rotated); a client_credentials token has none and
        // is granted anew with the scopes it was first granted.
        let mut body = match (&refresh_token, &grant_scope) {
            (Some(r), _) => serde_json::json!({
                "grant_type": "refresh_token",
                "refresh_token": r.expose(),
            }),
            (None, scope) => serde_json::json!({
                "grant_type": "client_credentials",
                "scope": scope.clone().unwrap_or_default(),
            }),
        };
        if let Some(id) = &client_id {
            body["client_id"] = Value::String(id.clone());
        }
        if let Some(secret) = &client_secret {
            body["client_secret"] = Value::String(secret.expose().to_string());
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        drop(body);
        let req = Req {
            method: Method::POST,
            url: self.url("/oauth/tokens"),
            path: "/oauth/tokens".into(),
            body: Some(&bytes),
            // The old refresh token stops working once Zendesk acts: never resend blindly.
            idempotency: Idempotency::Unsafe,
        };
        let failed = |why: String| ZendeskError::AuthFailed {
            method: AuthMethod::OAuth,
            message: format!(
                "refreshing the OAuth token failed ({why}): reconnect with `zdsync connect` \
                 (credentials from {})",
                self.inner.store.describe()
            ),
        };
        let answer = match self.run(&req, None, None).await {
            Ok(a) => a,
            Err(ZendeskError::OutcomeUnknown { message, .. }) => {
                return Err(failed(format!(
                    "no answer from Zendesk ({}); the stored refresh token may be used up",
                    self.scrub(message)
                )))
            }
            Err(e) => return Err(e),
        };
        if !(200..300).contains(&answer.status) {
            let env = parse_envelope(answer.status, &answer.body);
            let mut why = format!("HTTP {}: {}", answer.status, env.code);
            if !env.description.is_empty() {
                why.push_str(": ");
                why.push_str(&env.description);
            }
            if env.code == "invalid_client" {
                why.push_str("; check the OAuth client id and secret");
            }
            if env.code == "invalid_grant" {
                // The refresh token was used up by a refresh elsewhere: its winner saves the new
                // pair, which is read back here (the save may take a moment to land).
                for wait_ms in [0u64, 250, 500, 1000, 2000] {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    if self.adopt_stored(used).await {
                        return Ok(());
                    }
                }
            }
            return Err(failed(self.scrub(why)));
        }
        let v = answer.json().unwrap_or(Value::Null);
        let Some(access) = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        else {
            return Err(failed("the answer carries no access token".into()));
        };
        let new_refresh = v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .or(refresh_token);
        let expires_at = v
            .get("expires_in")
            .and_then(Value::as_i64)
            .map(|secs| now_unix() + secs);
        let new = Credentials::OAuth {
            access_token: Secret::new(access),
            refresh_token: new_refresh,
            client_id,
            client_secret,
            expires_at,
            grant_scope,
        };
        {
            let mut secrets = self.inner.secrets.lock().unwrap_or_else(|e| e.into_inner());
            for s in new.secrets() {
                if !secrets.contains(&s) {
                    secrets.push(s);
                }
            }
        }
        *self.inner.creds.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
        bump(&self.inner.stats.token_refreshes);
        tracing::info!(
            expires_at = ?expires_at,
            "OAuth access token renewed (a refresh token is rotated; a client_credentials token is granted anew)"
        );
        if let Err(e) = self.inner.store.save(&new).await {
            // Zendesk has revoked the stored pair: keeping quiet would leave every later run
            // (and every other container) with a dead credential.
            return Err(ZendeskError::AuthFailed {
                method: AuthMethod::OAuth,
                message: format!(
                    "the OAuth tokens were rotated but could not be saved to {} ({}); the stored pair no longer works: let the function write the secret (secretsmanager:PutSecretValue), then reconnect with `zdsync connect`",
                    self.inner.store.describe(),
                    self.scrub(e.to_string())
                ),
            });
        }
        Ok(())
    }

    /// Take the stored credentials when they hold another OAuth access token than `used`:
    /// someone else rotated the pair. `false` when the store has nothing newer.
    async fn adopt_stored(&self, used: &str) -> bool {
        let stored = match self.inner.store.reload().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %self.scrub(e.to_string()), "could not re-read the stored credentials");
                return false;
            }
        };
        let newer = matches!(&stored, Credentials::OAuth { access_token, .. } if access_token.expose() != used);
        if !newer {
            return false;
        }
        {
            let mut secrets = self.inner.secrets.lock().unwrap_or_else(|e| e.into_inner());
            for s in stored.secrets() {
                if !secrets.contains(&s) {
                    secrets.push(s);
                }
            }
        }
        *self.inner.creds.write().unwrap_or_else(|e| e.into_inner()) = stored;
        tracing::info!("OAuth tokens rotated elsewhere: using the stored pair");
        true
    }

    async fn backoff(&self, attempt: u32) {
        let o = &self.inner.opts;
        let exp = o
            .backoff_base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(20));
        let cap = exp.min(o.backoff_max).as_millis() as u64;
        let ms = if cap == 0 {
            0
        } else {
            rand::random_range(0..=cap)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// A transport failure of one attempt: an unsafe request that may have reached Zendesk
    /// (`reached`) has an unknown outcome and is never resent; otherwise it is retried after a
    /// backoff until the attempts run out.
    async fn retry_transport(
        &self,
        req: &Req<'_>,
        attempt: u32,
        max: u32,
        message: String,
        reached: bool,
        what: &str,
    ) -> Result<(), ZendeskError> {
        if reached && req.idempotency == Idempotency::Unsafe {
            return Err(ZendeskError::OutcomeUnknown {
                path: req.path.clone(),
                message,
            });
        }
        // A connection that never opened while this client has had no answer at all: the
        // address is wrong or the host is down. One quick second try, then say where.
        let never_answered = !reached && self.inner.stats.answers.load(Ordering::Relaxed) == 0;
        if attempt >= max || (never_answered && attempt >= 2) {
            return Err(ZendeskError::Transport {
                path: if req.path.starts_with("http") {
                    req.path.clone()
                } else {
                    format!("{}{}", self.inner.opts.base_url, req.path)
                },
                attempts: attempt,
                message,
            });
        }
        if never_answered {
            tokio::time::sleep(Duration::from_millis(250)).await;
            return Ok(());
        }
        tracing::warn!(
            method = %req.method, path = %req.path, attempt,
            error = %message, "{what}: retrying"
        );
        self.backoff(attempt).await;
        Ok(())
    }

    /// The retry loop of one request: takes a token and passes the pause gate before every
    /// attempt, pauses the whole client on 429/503, backs off on 5xx and transport errors.
    async fn run(
        &self,
        req: &Req<'_>,
        auth: Option<&HeaderValue>,
        mut first: Option<Permit<'_>>,
    ) -> Result<Answer, ZendeskError> {
        let opts = &self.inner.opts;
        let stats = &self.inner.stats;
        let max = opts.max_attempts.max(1);
        let unsafe_req = req.idempotency == Idempotency::Unsafe;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if attempt > 1 {
                bump(&stats.retries);
            }
            let permit = match first.take() {
                Some(p) => p,
                None => self.inner.limiter.acquire().await,
            };
            let mut rb = self
                .inner
                .http
                .request(req.method.clone(), &req.url)
                .header(ACCEPT, "application/json");
            if let Some(auth) = auth {
                rb = rb.header(AUTHORIZATION, auth.clone());
            }
            if let Some(body) = req.body {
                rb = rb
                    .header(CONTENT_TYPE, "application/json")
                    .body(body.to_vec());
            }
            bump(&stats.requests);
            let started = Instant::now();
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    drop(permit);
                    bump(&stats.transport_errors);
                    let message = transport_message(&e);
                    tracing::debug!(
                        method = %req.method, path = %req.path, attempt,
                        ms = started.elapsed().as_millis() as u64,
                        error = %message, "zendesk request failed"
                    );
                    // A connect error happens before anything is written; anything else may
                    // have reached Zendesk.
                    let reached = !e.is_connect();
                    self.retry_transport(
                        req,
                        attempt,
                        max,
                        message,
                        reached,
                        "cannot reach Zendesk",
                    )
                    .await?;
                    continue;
                }
            };
            bump(&stats.answers);
            let status = resp.status().as_u16();
            let told_to_wait = retry_after(resp.headers());
            // Zendesk documents that a 429, or a 503 with `Retry-After`, did nothing. A 503
            // without it may come from a gateway that gave up on a request Zendesk still ran:
            // for a create that is an unknown outcome, like any other 5xx.
            let throttled =
                status == 429 || (status == 503 && (told_to_wait.is_some() || !unsafe_req));
            let mut wait = None;
            if throttled {
                // Pause first, before reading the body: no other task may send meanwhile.
                let w = told_to_wait
                    .map(|d| d.min(opts.retry_after_cap))
                    .unwrap_or(opts.retry_after_default);
                self.inner.limiter.pause(w);
                wait = Some(w);
            } else {
                self.inner.limiter.observe(resp.headers());
            }
            permit.finish(throttled);
            let headers = resp.headers().clone();
            let body = resp.bytes().await;
            let ms = started.elapsed().as_millis() as u64;
            tracing::debug!(
                method = %req.method, path = %req.path, status, attempt, ms,
                "zendesk request"
            );
            let body = match body {
                Ok(b) => b.to_vec(),
                // The status of a 429/503/5xx is the whole answer; a cut body does not matter.
                Err(_) if throttled || status >= 500 => Vec::new(),
                Err(e) => {
                    bump(&stats.transport_errors);
                    let message = format!("HTTP {status}, then {}", transport_message(&e));
                    let what = "the Zendesk answer was cut off";
                    self.retry_transport(req, attempt, max, message, true, what)
                        .await?;
                    continue;
                }
            };
            if let Some(wait) = wait {
                if status == 429 {
                    bump(&stats.rate_limited);
                } else {
                    bump(&stats.unavailable);
                }
                if attempt >= max {
                    return Err(if status == 429 {
                        ZendeskError::RateLimited {
                            path: req.path.clone(),
                            attempts: attempt,
                            retry_after: Some(wait),
                        }
                    } else {
                        ZendeskError::Unavailable {
                            path: req.path.clone(),
                            status,
                            attempts: attempt,
                            message: self.scrub(parse_envelope(status, &body).description),
                        }
                    });
                }
                tracing::warn!(
                    method = %req.method, path = %req.path, status, attempt,
                    wait_ms = wait.as_millis() as u64,
                    "Zendesk asked to wait: pausing every request of this client"
                );
                continue;
            }
            if status >= 500 {
                bump(&stats.server_errors);
                if unsafe_req {
                    // The work may be done (a gateway timing out after Zendesk queued the job):
                    // the caller looks it up instead of sending it a second time.
                    let detail = parse_envelope(status, &body).description;
                    tracing::warn!(
                        method = %req.method, path = %req.path, status, attempt,
                        "Zendesk server error on a request that may create records: its outcome is unknown"
                    );
                    return Err(ZendeskError::OutcomeUnknown {
                        path: req.path.clone(),
                        message: self.scrub(format!(
                            "HTTP {status}{}",
                            if detail.is_empty() {
                                String::new()
                            } else {
                                format!(": {}", truncate(&detail, 200))
                            }
                        )),
                    });
                }
                if attempt >= max {
                    return Err(ZendeskError::Unavailable {
                        path: req.path.clone(),
                        status,
                        attempts: attempt,
                        message: self.scrub(parse_envelope(status, &body).description),
                    });
                }
                tracing::warn!(
                    method = %req.method, path = %req.path, status, attempt,
                    "Zendesk server error: retrying"
                );
                self.backoff(attempt).await;
                continue;
            }
            if status == 409
                && attempt < max
                && parse_envelope(status, &body).code == "DatabaseConflict"
            {
                tracing::warn!(
                    method = %req.method, path = %req.path, attempt,
                    "Zendesk database collision: retrying"
                );
                self.backoff(attempt).await;
                continue;
            }
            return Ok(Answer {
                status,
                headers,
                body,
            });
        }
    }
}

/// The `Authorization` header for `creds`, marked sensitive.
fn auth_header(creds: &Credentials, source: &str) -> Result<HeaderValue, ZendeskError> {
    let text = match creds {
        Credentials::ApiToken { email, token } => {
            let raw = format!("{email}/token:{}", token.expose());
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        }
        Credentials::OAuth { access_token, .. } => format!("Bearer {}", access_token.expose()),
    };
    let mut v = HeaderValue::from_str(&text).map_err(|_| ZendeskError::Credentials {
        message: format!(
            "the credential from {source} contains characters that cannot be sent in an HTTP \
             header (a stray quote or line break?)"
        ),
    })?;
    v.set_sensitive(true);
    Ok(v)
}

/// What to tell the user to do about a missing scope.
fn scope_hint(scope: &str) -> String {
    format!(
        "reconnect with `zdsync connect` and grant the `{scope}` scope (or `read write`), or \
         add `{scope}` to the scopes the OAuth client requests"
    )
}

/// The scopes a sync of `object` needs: reading its fields and records, and writing it.
fn check_scopes(scopes: &[String], object: Object, write: bool) -> Result<(), ZendeskError> {
    let has = |s: &str| scopes.iter().any(|x| x == s);
    let res = object.as_str();
    let read_scope = format!("{res}:read");
    if !has("read") && !has(&read_scope) {
        return Err(ZendeskError::MissingScope {
            hint: scope_hint("read"),
            scope: "read".into(),
        });
    }
    let write_scope = format!("{res}:write");
    if write && !has("write") && !has(&write_scope) {
        return Err(ZendeskError::MissingScope {
            hint: scope_hint(&write_scope),
            scope: write_scope,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_parse() {
        let e = parse_envelope(
            422,
            br#"{"error":"RecordInvalid","description":"Record validation errors","details":{"email":[]}}"#,
        );
        assert_eq!(e.code, "RecordInvalid");
        assert_eq!(e.description, "Record validation errors");
        assert!(e.details.is_some());
        let e = parse_envelope(
            429,
            br#"{"errors":[{"code":"TooManyRequests","title":"Too many requests"}]}"#,
        );
        assert_eq!(
            (e.code.as_str(), e.description.as_str()),
            ("TooManyRequests", "Too many requests")
        );
        let e = parse_envelope(
            404,
            br#"{"error":{"title":"No help desk at x.zendesk.com","message":"claim it"}}"#,
        );
        assert_eq!(e.title.as_deref(), Some("No help desk at x.zendesk.com"));
        assert_eq!(e.description, "claim it");
        let e = parse_envelope(429, b"Rate limit for ticket updates exceeded");
        assert_eq!(e.code, "Too Many Requests");
        assert_eq!(e.description, "Rate limit for ticket updates exceeded");
    }

    #[test]
    fn options_defaults() {
        let o = ClientOptions::for_subdomain("acme", None);
        assert_eq!(o.base_url, "https://acme.zendesk.com");
        assert_eq!(o.rpm, 630);
        let o = ClientOptions::for_subdomain("acme", Some("http://127.0.0.1:9/"));
        assert_eq!(o.base_url, "http://127.0.0.1:9");
    }

    #[test]
    fn scopes() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_scopes(&s(&["read", "write"]), Object::Tickets, true).is_ok());
        assert!(check_scopes(&s(&["read", "users:write"]), Object::Users, true).is_ok());
        match check_scopes(&s(&["read", "users:write"]), Object::Tickets, true) {
            Err(ZendeskError::MissingScope { scope, .. }) => assert_eq!(scope, "tickets:write"),
            other => panic!("{other:?}"),
        }
        assert!(check_scopes(&s(&["users:write"]), Object::Users, false).is_err());
    }
}
