//! The request pipeline: account resolution, faults, authentication, rate limiting, scope
//! checks, dispatch, headers, counters and the request log.

use crate::api::{self, Route};
use crate::auth::{check_scope, AuthError, AuthKind, AuthStore, Authorize, Consent, Principal};
use crate::config::{
    AccountConfig, Behavior, IncrementalConfig, JobConfig, RateLimitConfig, SimConfig,
};
use crate::faults::{FaultConfig, FaultEngine, FaultKind, RequestFaults};
use crate::fields::{default_fixture, FieldSet, FieldsFixture};
use crate::jobs::JobStore;
use crate::observe::{Counters, LogEntry, RequestLog};
use crate::rate::{RateDecision, RateState};
use crate::store::{Ctx, Store};
use crate::util::{iso, Query, SimClock};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the simulator keeps
/// serving; tests see the panic through their own assertions).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The switches that may change while running, swapped as a whole.
#[derive(Debug, Clone)]
pub(crate) struct Runtime {
    pub rate: RateLimitConfig,
    pub jobs: JobConfig,
    pub behavior: Behavior,
    pub incremental: IncrementalConfig,
}

/// Per-account switches that tests may flip at run time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AccountSettings {
    pub bulk_user_import: bool,
    pub user_tagging: bool,
    pub organization_tagging: bool,
    /// Overrides the simulator-wide `rate_limit.rpm` (0 = unlimited).
    pub rpm: Option<u32>,
    /// What the admin answers on the OAuth consent page (`approve` or `deny`).
    pub oauth_consent: Consent,
    /// Lifetime of an authorization code (Zendesk: 120 s).
    pub oauth_code_ttl_secs: u64,
}

impl Default for AccountSettings {
    fn default() -> Self {
        Self {
            bulk_user_import: true,
            user_tagging: true,
            organization_tagging: true,
            rpm: None,
            oauth_consent: Consent::Approve,
            oauth_code_ttl_secs: 120,
        }
    }
}

pub(crate) struct Account {
    pub subdomain: String,
    pub cfg: AccountConfig,
    pub settings: RwLock<AccountSettings>,
    pub fields: Arc<FieldSet>,
    pub store: Mutex<Store>,
    pub auth: Mutex<AuthStore>,
    pub rate: Mutex<RateState>,
    pub jobs: Mutex<JobStore>,
    pub counters: Mutex<Counters>,
    pub admin_id: Mutex<u64>,
    /// Bumped by reset so jobs started before it do not touch the new state.
    pub epoch: AtomicU64,
    pub audit_seq: AtomicU64,
}

impl Account {
    pub fn new(
        cfg: &AccountConfig,
        fields: Arc<FieldSet>,
        behavior: &Behavior,
        now_ms: i64,
        seed: u64,
    ) -> Result<Self, String> {
        let acct = Account {
            subdomain: cfg.subdomain.clone(),
            cfg: cfg.clone(),
            settings: RwLock::new(AccountSettings::default()),
            fields,
            store: Mutex::new(Store::default()),
            auth: Mutex::new(AuthStore::new(cfg, HashMap::new(), 0, now_ms, seed)),
            rate: Mutex::new(RateState::default()),
            jobs: Mutex::new(JobStore::default()),
            counters: Mutex::new(Counters::default()),
            admin_id: Mutex::new(0),
            epoch: AtomicU64::new(0),
            audit_seq: AtomicU64::new(40_000_000_000),
        };
        acct.reset(behavior, now_ms, seed)?;
        Ok(acct)
    }

    pub fn settings(&self) -> AccountSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn ctx<'a>(&'a self, behavior: &'a Behavior, now_ms: i64, actor: u64) -> Ctx<'a> {
        let s = self.settings();
        Ctx {
            fields: &self.fields,
            behavior,
            user_tagging: s.user_tagging,
            org_tagging: s.organization_tagging,
            now: iso(now_ms),
            actor_id: actor,
        }
    }

    /// Back to the configured state: staff, credentials and seed records; jobs, counters and
    /// limiter windows cleared.
    pub fn reset(&self, behavior: &Behavior, now_ms: i64, seed: u64) -> Result<(), String> {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let cfg = &self.cfg;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = AccountSettings {
            bulk_user_import: cfg.bulk_user_import,
            user_tagging: cfg.user_tagging,
            organization_tagging: cfg.organization_tagging,
            rpm: cfg.rpm,
            oauth_consent: cfg.oauth_consent,
            oauth_code_ttl_secs: cfg.oauth_code_ttl_secs,
        };
        let mut store = Store::new(&self.fields);
        let ctx = self.ctx(behavior, now_ms, 0);
        let mut staff = HashMap::new();
        let mut admin_id = 0;
        let people = std::iter::once((
            cfg.admin_email.clone(),
            cfg.admin_name.clone(),
            "admin".to_string(),
        ))
        .chain(
            cfg.agents
                .iter()
                .map(|a| (a.email.clone(), a.name.clone(), a.role.clone())),
        );
        for (email, name, role) in people {
            if role != "agent" && role != "admin" {
                return Err(format!("staff {email}: role must be agent or admin"));
            }
            let mut m = Map::new();
            m.insert("name".into(), json!(name));
            m.insert("email".into(), json!(email));
            m.insert("role".into(), json!(role));
            m.insert("verified".into(), json!(true));
            let id = store
                .create_user(&ctx, &m)
                .map_err(|e| format!("staff {email}: {}", e.text()))?;
            if admin_id == 0 {
                admin_id = id;
            }
            staff.insert(email.to_lowercase(), (id, role));
        }
        let ctx = Ctx {
            actor_id: admin_id,
            ..ctx
        };
        for (i, o) in cfg.seed.organizations.iter().enumerate() {
            let m = o
                .as_object()
                .ok_or(format!("seed organization {i} is not an object"))?;
            store
                .create_org(&ctx, m)
                .map_err(|e| format!("seed organization {i}: {}", e.text()))?;
        }
        for (i, u) in cfg.seed.users.iter().enumerate() {
            let m = u
                .as_object()
                .ok_or(format!("seed user {i} is not an object"))?;
            store
                .create_user(&ctx, m)
                .map_err(|e| format!("seed user {i}: {}", e.text()))?;
        }
        for (i, t) in cfg.seed.tickets.iter().enumerate() {
            let m = t
                .as_object()
                .ok_or(format!("seed ticket {i} is not an object"))?;
            store
                .create_ticket(&ctx, m)
                .map_err(|e| format!("seed ticket {i}: {}", e.text()))?;
        }
        let seed = seed ^ fnv(&cfg.subdomain);
        *lock(&self.auth) = AuthStore::new(cfg, staff, admin_id, now_ms, seed);
        *lock(&self.store) = store;
        *lock(&self.jobs) = JobStore::default();
        lock(&self.rate).reset();
        *lock(&self.counters) = Counters::default();
        *lock(&self.admin_id) = admin_id;
        Ok(())
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub(crate) struct Sim {
    pub runtime: RwLock<Arc<Runtime>>,
    pub accounts: RwLock<HashMap<String, Arc<Account>>>,
    pub default_account: RwLock<String>,
    pub clock: Arc<SimClock>,
    pub faults: Mutex<FaultEngine>,
    pub fault_config: Mutex<FaultConfig>,
    pub has_faults: AtomicBool,
    pub log: Mutex<RequestLog>,
    pub unrouted: Mutex<Counters>,
    pub seq: AtomicU64,
    pub job_seq: AtomicU64,
    pub seed: u64,
    pub initial_faults: FaultConfig,
    pub log_bodies: bool,
}

pub(crate) fn load_fields(
    inline: &Option<FieldsFixture>,
    path: &Option<std::path::PathBuf>,
    fallback: &FieldsFixture,
) -> Result<FieldsFixture, String> {
    if let Some(p) = path {
        return FieldsFixture::from_file(p);
    }
    Ok(inline.clone().unwrap_or_else(|| fallback.clone()))
}

impl Sim {
    pub fn new(config: &SimConfig) -> Result<Self, String> {
        let clock = Arc::new(SimClock::default());
        let now = clock.now_ms();
        let base_fixture = load_fields(&config.fields, &config.fields_path, &default_fixture())?;
        let mut accounts = HashMap::new();
        for a in &config.accounts {
            let fixture = load_fields(&a.fields, &a.fields_path, &base_fixture)?;
            let fields = Arc::new(FieldSet::build(fixture, iso(now))?);
            let acct = Account::new(a, fields, &config.behavior, now, config.seed)?;
            accounts.insert(a.subdomain.to_lowercase(), Arc::new(acct));
        }
        let default = config
            .default_account
            .clone()
            .unwrap_or_else(|| config.accounts[0].subdomain.clone())
            .to_lowercase();
        Ok(Self {
            runtime: RwLock::new(Arc::new(Runtime {
                rate: config.rate_limit.clone(),
                jobs: config.jobs.clone(),
                behavior: config.behavior.clone(),
                incremental: config.incremental.clone(),
            })),
            accounts: RwLock::new(accounts),
            default_account: RwLock::new(default),
            faults: Mutex::new(FaultEngine::new(&config.faults, config.seed)),
            has_faults: AtomicBool::new(!config.faults.rules.is_empty()),
            fault_config: Mutex::new(config.faults.clone()),
            clock,
            log: Mutex::new(RequestLog {
                entries: Default::default(),
                limit: config.request_log_limit,
            }),
            unrouted: Mutex::new(Counters::default()),
            seq: AtomicU64::new(0),
            job_seq: AtomicU64::new(0),
            seed: config.seed,
            initial_faults: config.faults.clone(),
            log_bodies: config.log_bodies,
        })
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_runtime(&self, f: impl FnOnce(&mut Runtime)) {
        let mut guard = self.runtime.write().unwrap_or_else(|e| e.into_inner());
        let mut rt = (**guard).clone();
        f(&mut rt);
        *guard = Arc::new(rt);
    }

    pub fn account(&self, sub: &str) -> Option<Arc<Account>> {
        self.accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sub.to_lowercase())
            .cloned()
    }

    pub fn default_account(&self) -> Option<Arc<Account>> {
        let d = self
            .default_account
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.account(&d)
    }

    pub fn all_accounts(&self) -> Vec<Arc<Account>> {
        let mut v: Vec<_> = self
            .accounts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.subdomain.cmp(&b.subdomain));
        v
    }

    pub fn set_faults(&self, cfg: FaultConfig) {
        *lock(&self.faults) = FaultEngine::new(&cfg, self.seed);
        self.has_faults
            .store(!cfg.rules.is_empty(), Ordering::SeqCst);
        *lock(&self.fault_config) = cfg;
    }

    /// Finds the account for a request: a `/sub/<name>` path prefix, else a `<name>.zendesk.com`
    /// or `<name>.localhost` Host, else a Host whose first label is an account, else the
    /// default account. Returns (account or unknown subdomain, path prefix, rest of the path).
    fn resolve<'p>(
        &self,
        host: &str,
        path: &'p str,
    ) -> (Result<Arc<Account>, String>, String, &'p str) {
        if let Some(rest) = path.strip_prefix("/sub/") {
            let (name, tail_start) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            let prefix = format!("/sub/{name}");
            return match self.account(name) {
                Some(a) => (Ok(a), prefix, tail_start),
                None => (Err(name.to_lowercase()), prefix, tail_start),
            };
        }
        let hostname = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        let hostname = hostname.to_lowercase();
        let is_ip = hostname.parse::<std::net::IpAddr>().is_ok() || hostname.starts_with('[');
        if !is_ip && hostname.contains('.') {
            let first = hostname.split('.').next().unwrap_or("");
            if let Some(a) = self.account(first) {
                return (Ok(a), String::new(), path);
            }
            if hostname.ends_with(".zendesk.com") || hostname.ends_with(".localhost") {
                return (Err(first.to_string()), String::new(), path);
            }
        }
        match self.default_account() {
            Some(a) => (Ok(a), String::new(), path),
            None => (Err(hostname), String::new(), path),
        }
    }
}

/// A response before headers common to all answers are added.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: ReplyBody,
    pub headers: Vec<(HeaderName, String)>,
    pub retry_after: Option<u64>,
    pub limit_kind: Option<LimitKind>,
    /// Sent without Zendesk's headers (rate limit, request id): an answer from the edge.
    pub bare: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Account,
    Endpoint,
    Jobs,
    Fault,
}

pub(crate) enum ReplyBody {
    Json(Value),
    Raw(&'static str, String),
    Empty,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Self {
        Reply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: ReplyBody::Json(body),
            headers: Vec::new(),
            retry_after: None,
            limit_kind: None,
            bare: false,
        }
    }

    pub fn ok(body: Value) -> Self {
        Self::json(200, body)
    }

    pub fn empty(status: u16) -> Self {
        Reply {
            body: ReplyBody::Empty,
            ..Self::json(status, Value::Null)
        }
    }

    pub fn created(body: Value, location: String) -> Self {
        Self::json(201, body).header(header::LOCATION, location)
    }

    pub fn header(mut self, name: HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn error(status: u16, error: &str, description: &str) -> Self {
        Self::json(status, json!({"error": error, "description": description}))
    }

    /// A body already serialized (saves building a `Value` for large answers).
    pub fn raw_json(status: u16, body: String) -> Self {
        Reply {
            body: ReplyBody::Raw("application/json; charset=utf-8", body),
            ..Self::empty(status)
        }
    }

    pub fn not_found() -> Self {
        Self::error(404, "RecordNotFound", "Not found")
    }

    pub fn invalid_endpoint() -> Self {
        Self::error(404, "InvalidEndpoint", "Not found")
    }

    pub fn too_many(retry_after: Option<u64>, body: Value, kind: LimitKind) -> Self {
        let mut r = Self::json(429, body);
        r.retry_after = retry_after;
        r.limit_kind = Some(kind);
        r
    }

    /// The nested form Zendesk uses for role/permission refusals.
    pub fn forbidden_role() -> Self {
        Self::json(
            403,
            json!({"error": {"title": "Forbidden", "message": "You do not have access to this page. Please contact the account owner of this help desk for further help."}}),
        )
    }
}

/// The request as handlers see it.
pub(crate) struct Req<'a> {
    pub sim: &'a Sim,
    pub account: &'a Arc<Account>,
    pub rt: &'a Runtime,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Query,
    pub body: Option<Value>,
    pub base: &'a str,
    pub now: i64,
    pub principal: Principal,
}

impl Req<'_> {
    pub fn ctx(&self) -> Ctx<'_> {
        self.account
            .ctx(&self.rt.behavior, self.now, self.principal.user_id)
    }
}

fn no_help_desk(sub: &str) -> Reply {
    Reply::json(
        404,
        json!({"error": {
            "title": format!("No help desk at {sub}.zendesk.com"),
            "message": "There is no help desk configured at this address. This means that the address is available and that you can claim it at http://www.zendesk.com/signup"
        }}),
    )
}

fn fault_reply(kind: FaultKind, retry_after: Option<u64>) -> Reply {
    let mut r = match kind {
        FaultKind::RateLimit => Reply::too_many(
            retry_after,
            json!({"errors": [{"code": "TooManyRequests", "title": "Too many requests"}]}),
            LimitKind::Fault,
        ),
        FaultKind::Unavailable => Reply::error(
            503,
            "ServiceUnavailable",
            "Zendesk is temporarily unavailable (maintenance). Please retry later.",
        ),
        FaultKind::BadGateway => gateway_page(502, "Bad Gateway"),
        FaultKind::GatewayTimeout => gateway_page(504, "Gateway Time-out"),
        _ => Reply::json(
            500,
            json!({"errors": [{"code": "Unavailable", "title": "Internal Server Error"}]}),
        ),
    };
    r.retry_after = retry_after;
    r
}

/// What a CDN / load balancer in front of Zendesk answers: a small HTML page, none of
/// Zendesk's headers.
fn gateway_page(status: u16, title: &str) -> Reply {
    let body = format!(
        "<html>\r\n<head><title>{status} {title}</title></head>\r\n<body>\r\n<center><h1>{status} {title}</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
    );
    Reply {
        body: ReplyBody::Raw("text/html", body),
        bare: true,
        ..Reply::empty(status)
    }
}

/// Strips `.json` and a trailing slash: `/api/v2/users.json` == `/api/v2/users`.
fn normalize(path: &str) -> &str {
    let p = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    p.strip_suffix(".json").unwrap_or(p)
}

/// A token request body: JSON (as Zendesk documents) or form-encoded (as RFC 6749 clients send).
fn token_request(bytes: &[u8]) -> Option<Map<String, Value>> {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(bytes) {
        return Some(m);
    }
    let m: Map<String, Value> = form_urlencoded::parse(bytes)
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    (!m.is_empty() && m.contains_key("grant_type")).then_some(m)
}

/// `Authorization: Basic base64(id:secret)` as a (client id, secret) pair.
fn basic_pair(header: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

struct Outcome {
    reply: Reply,
    auth: Option<(AuthKind, u64)>,
    rate: Option<RateDecision>,
}

#[allow(clippy::too_many_arguments)]
fn process(
    sim: &Sim,
    account: &Arc<Account>,
    rt: &Runtime,
    method: &Method,
    path: &str,
    route: Route,
    query: Option<&str>,
    auth_header: Option<&str>,
    bytes: Bytes,
    base: &str,
    now: i64,
) -> Outcome {
    if route == Route::OAuthAuthorize {
        let s = account.settings();
        let admin = *lock(&account.admin_id);
        let answer = lock(&account.auth).authorize(
            &Query::parse(query),
            s.oauth_consent,
            admin,
            s.oauth_code_ttl_secs,
            now,
        );
        let reply = match answer {
            Authorize::Redirect(to) => Reply::empty(302).header(header::LOCATION, to),
            Authorize::Refuse(text) => Reply {
                body: ReplyBody::Raw("text/plain; charset=utf-8", text),
                ..Reply::empty(400)
            },
        };
        return Outcome {
            reply,
            auth: None,
            rate: None,
        };
    }
    if route == Route::OAuthTokens {
        let Some(mut b) = token_request(&bytes) else {
            return Outcome {
                reply: Reply::json(
                    400,
                    json!({"error": "invalid_request", "error_description": "The request is missing a required parameter, includes an unsupported parameter value, or is otherwise malformed."}),
                ),
                auth: None,
                rate: None,
            };
        };
        // Client authentication may also come as HTTP Basic (client_secret_basic).
        if let Some((id, secret)) = auth_header.and_then(basic_pair) {
            b.entry("client_id").or_insert(Value::String(id));
            b.entry("client_secret").or_insert(Value::String(secret));
        }
        let reply = match lock(&account.auth).grant(&b, now) {
            Ok(v) => Reply::json(201, v),
            Err(e) => Reply::json(e.status, e.body),
        };
        return Outcome {
            reply,
            auth: None,
            rate: None,
        };
    }
    let body = if bytes.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                return Outcome {
                    reply: Reply::error(
                        400,
                        "InvalidJSON",
                        &format!("Invalid JSON in request body: {e}"),
                    ),
                    auth: None,
                    rate: None,
                }
            }
        }
    };
    let principal = match lock(&account.auth).authenticate(auth_header, now) {
        Ok(p) => p,
        Err(e) => {
            lock(&account.counters).auth_failures += 1;
            let reply = match e {
                AuthError::BadCredentials => Reply {
                    body: ReplyBody::Raw(
                        "application/json; charset=UTF-8",
                        r#"{"error":"Couldn't authenticate you"}"#.to_string(),
                    ),
                    ..Reply::empty(401)
                }
                .header(header::WWW_AUTHENTICATE, r#"Basic realm="Web Password""#.into()),
                AuthError::InvalidToken(desc) => Reply::json(
                    401,
                    json!({"error": "invalid_token", "error_description": desc}),
                )
                .header(
                    header::WWW_AUTHENTICATE,
                    format!(r#"Bearer realm="Doorkeeper", error="invalid_token", error_description="{desc}""#),
                ),
            };
            return Outcome {
                reply,
                auth: None,
                rate: None,
            };
        }
    };
    let auth = Some((principal.kind, principal.user_id));
    let rpm = account.settings().rpm.unwrap_or(rt.rate.rpm);
    let decision =
        lock(&account.rate).check(now, rpm, rt.rate.window_ms, rt.rate.advertised_when_off);
    if let Some(ra) = decision.retry_after {
        return Outcome {
            reply: Reply::too_many(
                Some(ra),
                json!({"errors": [{"code": "TooManyRequests", "title": "Too many requests: the API rate limit of this account is exceeded"}]}),
                LimitKind::Account,
            ),
            auth,
            rate: Some(decision),
        };
    }
    if let (Some(scopes), Some(resource)) = (&principal.scopes, route.scope_resource()) {
        if let Err(missing) = check_scope(scopes, resource, method != Method::GET) {
            return Outcome {
                reply: Reply::json(
                    403,
                    json!({"error": "Forbidden", "description": format!("You are missing the following required scopes: {missing}")}),
                ),
                auth,
                rate: Some(decision),
            };
        }
    }
    let mut req = Req {
        sim,
        account,
        rt,
        method,
        path,
        query: Query::parse(query),
        body,
        base,
        now,
        principal,
    };
    let reply = api::dispatch(&mut req, route);
    Outcome {
        reply,
        auth,
        rate: Some(decision),
    }
}

fn set(headers: &mut axum::http::HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

fn into_response(
    reply: Reply,
    rate: RateDecision,
    seq: u64,
    drop_after: Option<usize>,
) -> Response {
    let (content_type, bytes) = match reply.body {
        ReplyBody::Json(v) => (
            Some("application/json; charset=utf-8"),
            serde_json::to_vec(&v).unwrap_or_default(),
        ),
        ReplyBody::Raw(ct, s) => (Some(ct), s.into_bytes()),
        ReplyBody::Empty => (None, Vec::new()),
    };
    let body = match drop_after {
        Some(n) => {
            let head = bytes[..n.min(bytes.len())].to_vec();
            let mut chunks: Vec<Result<Bytes, std::io::Error>> = Vec::new();
            if !head.is_empty() {
                chunks.push(Ok(Bytes::from(head)));
            }
            chunks.push(Err(std::io::Error::other("simulated connection drop")));
            Body::from_stream(futures::stream::iter(chunks))
        }
        None => Body::from(bytes),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    if let Some(ct) = content_type {
        set(h, header::CONTENT_TYPE, ct);
    }
    if reply.bare {
        return resp;
    }
    set(
        h,
        HeaderName::from_static("x-rate-limit"),
        &rate.limit.to_string(),
    );
    set(
        h,
        HeaderName::from_static("x-rate-limit-remaining"),
        &rate.remaining.to_string(),
    );
    set(
        h,
        HeaderName::from_static("ratelimit-limit"),
        &rate.limit.to_string(),
    );
    set(
        h,
        HeaderName::from_static("ratelimit-remaining"),
        &rate.remaining.to_string(),
    );
    set(
        h,
        HeaderName::from_static("ratelimit-reset"),
        &rate.reset_secs.to_string(),
    );
    set(h, HeaderName::from_static("x-request-id"), &seq.to_string());
    if let Some(ra) = reply.retry_after {
        set(h, header::RETRY_AFTER, &ra.to_string());
    }
    for (name, value) in reply.headers {
        set(h, name, &value);
    }
    resp
}

/// The axum fallback handler: every request enters here.
pub(crate) async fn handle(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path();
    if raw_path == "/__sim" || raw_path.starts_with("/__sim/") {
        return crate::admin::handle(&sim, &parts, body).await;
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (resolved, prefix, rest) = sim.resolve(&host, raw_path);
    let now = sim.clock.now_ms();
    let seq = sim.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let rt = sim.runtime();
    let method = parts.method.clone();
    let query = parts.uri.query();
    let account = match resolved {
        Ok(a) => a,
        Err(sub) => {
            let reply = no_help_desk(&sub);
            let limit = if rt.rate.rpm == 0 {
                rt.rate.advertised_when_off
            } else {
                rt.rate.rpm
            };
            let rate = RateDecision {
                limit,
                remaining: limit,
                reset_secs: 0,
                retry_after: None,
            };
            let status = reply.status.as_u16();
            {
                let mut c = lock(&sim.unrouted);
                c.requests += 1;
                *c.by_endpoint.entry("unknown_subdomain".into()).or_default() += 1;
                *c.by_status.entry(status).or_default() += 1;
            }
            lock(&sim.log).push(LogEntry {
                seq,
                at: iso(now),
                method: method.to_string(),
                path: raw_path.to_string(),
                query: query.map(str::to_string),
                status,
                account: None,
                endpoint: "unknown_subdomain".into(),
                auth: "none".into(),
                user_id: None,
                faults: vec![],
                early: false,
                retry_after: None,
                duration_us: started.elapsed().as_micros() as u64,
                body: None,
            });
            return into_response(reply, rate, seq, None);
        }
    };
    let path = normalize(rest);
    let route = api::route(&method, path);
    let endpoint = route.name();
    let early = lock(&account.rate).is_early(now);
    let faults = if sim.has_faults.load(Ordering::Relaxed) {
        lock(&sim.faults).on_request(&account.subdomain, method.as_str(), path)
    } else {
        RequestFaults::default()
    };
    if faults.delay_ms > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(faults.delay_ms)).await;
    }
    let base = format!(
        "http://{}{}",
        if host.is_empty() { "localhost" } else { &host },
        prefix
    );
    let mut logged_body = None;
    let outcome = match faults.terminal {
        Some((kind, ra)) => Outcome {
            reply: fault_reply(kind, ra),
            auth: None,
            rate: None,
        },
        None => {
            let bytes = match axum::body::to_bytes(body, 256 << 20).await {
                Ok(b) => b,
                Err(_) => Bytes::new(),
            };
            if sim.log_bodies && method != Method::GET && path.starts_with("/api/v2/") {
                logged_body = Some(String::from_utf8_lossy(&bytes).into_owned());
            }
            let auth_header = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok());
            process(
                &sim,
                &account,
                &rt,
                &method,
                path,
                route,
                query,
                auth_header,
                bytes,
                &base,
                now,
            )
        }
    };
    let Outcome {
        mut reply,
        auth,
        rate,
    } = outcome;
    if faults.terminal.is_none() {
        // The work is done (records written, jobs queued); now the edge loses the answer.
        if let Some(kind) = faults.after_commit {
            // A Retry-After would promise that nothing happened: never sent after the work.
            reply = fault_reply(kind, None);
        }
    }
    let rpm = account.settings().rpm.unwrap_or(rt.rate.rpm);
    let rate = rate.unwrap_or_else(|| {
        lock(&account.rate).peek(now, rpm, rt.rate.window_ms, rt.rate.advertised_when_off)
    });
    let status = reply.status.as_u16();
    let retry_after = reply.retry_after;
    if let Some(ra) = retry_after {
        // Endpoint limits concern one record; only account-wide waits make later calls early.
        if reply.limit_kind != Some(LimitKind::Endpoint) {
            lock(&account.rate).note_retry_after(now, ra);
        }
    }
    {
        let mut c = lock(&account.counters);
        c.requests += 1;
        *c.by_endpoint.entry(endpoint.clone()).or_default() += 1;
        *c.by_status.entry(status).or_default() += 1;
        if status == 429 {
            c.rate_limited += 1;
            match reply.limit_kind {
                Some(LimitKind::Account) => c.rate_limited_account += 1,
                Some(LimitKind::Endpoint) => c.rate_limited_endpoint += 1,
                Some(LimitKind::Jobs) => c.rate_limited_jobs += 1,
                _ => {}
            }
        }
        if early {
            c.early_requests += 1;
        }
        for f in &faults.fired {
            *c.faults.entry(f.to_string()).or_default() += 1;
        }
    }
    lock(&sim.log).push(LogEntry {
        seq,
        at: iso(now),
        method: method.to_string(),
        path: raw_path.to_string(),
        query: query.map(str::to_string),
        status,
        account: Some(account.subdomain.clone()),
        endpoint,
        auth: auth.map_or("none", |a| a.0.name()).to_string(),
        user_id: auth.map(|a| a.1),
        faults: faults.fired.iter().map(|f| f.to_string()).collect(),
        early,
        retry_after,
        duration_us: started.elapsed().as_micros() as u64,
        body: logged_body,
    });
    if faults.terminal.is_none() && faults.post_delay_ms > 0 {
        // Counted and logged first: a client that times out meanwhile closes the connection,
        // which cancels this handler.
        tokio::time::sleep(std::time::Duration::from_millis(faults.post_delay_ms)).await;
    }
    into_response(reply, rate, seq, faults.drop_after)
}
