//! Control operations shared by `SimHandle` and the `/__sim/` HTTP endpoints, so a simulator
//! started as a separate process can be driven like an in-process one.

use crate::api::render;
use crate::config::{Behavior, IncrementalConfig, JobConfig, RateLimitConfig, SeedData};
use crate::faults::FaultConfig;
use crate::fields::Target;
use crate::observe::{Counters, LogEntry};
use crate::server::{lock, AccountSettings, Sim};
use crate::store::Store;
use crate::util::Query;
use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

/// Everything one account holds, rendered as the API renders it (tickets also carry their
/// `comments`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AccountSnapshot {
    pub subdomain: String,
    pub settings: AccountSettings,
    pub users: Vec<Value>,
    pub organizations: Vec<Value>,
    pub tickets: Vec<Value>,
    pub jobs: Vec<Value>,
}

fn eq_ci(v: &Value, key: &str, want: &str) -> bool {
    v.get(key)
        .and_then(Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case(want))
}

impl AccountSnapshot {
    pub fn user(&self, id: u64) -> Option<&Value> {
        self.users.iter().find(|u| u["id"] == id)
    }
    pub fn user_by_email(&self, email: &str) -> Option<&Value> {
        self.users.iter().find(|u| eq_ci(u, "email", email))
    }
    pub fn user_by_external_id(&self, ext: &str) -> Option<&Value> {
        self.users.iter().find(|u| eq_ci(u, "external_id", ext))
    }
    pub fn organization(&self, id: u64) -> Option<&Value> {
        self.organizations.iter().find(|o| o["id"] == id)
    }
    pub fn organization_by_external_id(&self, ext: &str) -> Option<&Value> {
        self.organizations
            .iter()
            .find(|o| eq_ci(o, "external_id", ext))
    }
    pub fn organization_by_name(&self, name: &str) -> Option<&Value> {
        self.organizations.iter().find(|o| eq_ci(o, "name", name))
    }
    pub fn ticket(&self, id: u64) -> Option<&Value> {
        self.tickets.iter().find(|t| t["id"] == id)
    }
    pub fn tickets_by_external_id(&self, ext: &str) -> Vec<&Value> {
        self.tickets
            .iter()
            .filter(|t| t["external_id"].as_str() == Some(ext))
            .collect()
    }
    pub fn job(&self, id: &str) -> Option<&Value> {
        self.jobs.iter().find(|j| j["id"] == id)
    }
}

/// Ids of records created by a seed call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SeedIds {
    pub users: Vec<u64>,
    pub organizations: Vec<u64>,
    pub tickets: Vec<u64>,
}

/// A token minted for tests.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MintedToken {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub scopes: Vec<String>,
    pub user_id: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MintRequest {
    pub scopes: Vec<String>,
    /// None = never expires; negative = already expired.
    pub expires_in_secs: Option<i64>,
    pub refresh: bool,
    /// Staff email (default: the admin).
    pub user_email: Option<String>,
}

impl Sim {
    pub fn snapshot(&self, sub: &str, base: &str) -> Option<AccountSnapshot> {
        let acct = self.account(sub)?;
        let rt = self.runtime();
        let store = lock(&acct.store);
        let users = store
            .users
            .keys()
            .filter_map(|id| render(&store, &acct, Target::User, *id, base))
            .collect();
        let organizations = store
            .orgs
            .keys()
            .filter_map(|id| render(&store, &acct, Target::Organization, *id, base))
            .collect();
        let tickets = store
            .tickets
            .values()
            .map(|t| {
                let mut v = store.render_ticket(t, base);
                v["comments"] =
                    Value::Array(t.comments.iter().map(Store::render_comment).collect());
                v
            })
            .collect();
        drop(store);
        let now = self.clock.now_ms();
        let jobs = lock(&acct.jobs)
            .list(now, rt.jobs.retention_secs as i64 * 1000)
            .iter()
            .map(|j| j.render())
            .collect();
        Some(AccountSnapshot {
            subdomain: acct.subdomain.clone(),
            settings: acct.settings(),
            users,
            organizations,
            tickets,
            jobs,
        })
    }

    pub fn counters_for(&self, sub: Option<&str>) -> Option<Counters> {
        match sub {
            Some(s) => self.account(s).map(|a| lock(&a.counters).clone()),
            None => {
                let mut total = lock(&self.unrouted).clone();
                for a in self.all_accounts() {
                    total.add(&lock(&a.counters));
                }
                Some(total)
            }
        }
    }

    pub fn log_since(&self, since: u64) -> Vec<LogEntry> {
        lock(&self.log)
            .entries
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect()
    }

    /// Back to the configured state: records, credentials, jobs, counters, log, limiter
    /// windows and faults (the configured fault rules are restored).
    pub fn reset_all(&self, faults: FaultConfig) -> Result<(), String> {
        let rt = self.runtime();
        let now = self.clock.now_ms();
        for a in self.all_accounts() {
            a.reset(&rt.behavior, now, self.seed)?;
        }
        lock(&self.log).entries.clear();
        *lock(&self.unrouted) = Counters::default();
        self.set_faults(faults);
        Ok(())
    }

    pub fn seed(&self, sub: &str, data: &SeedData) -> Result<SeedIds, String> {
        let acct = self.account(sub).ok_or(format!("no account {sub}"))?;
        let rt = self.runtime();
        let admin = *lock(&acct.admin_id);
        let ctx = acct.ctx(&rt.behavior, self.clock.now_ms(), admin);
        let mut store = lock(&acct.store);
        let mut ids = SeedIds::default();
        let obj = |v: &Value, what: &str, i: usize| {
            v.as_object()
                .cloned()
                .ok_or(format!("{what} {i} is not an object"))
        };
        for (i, o) in data.organizations.iter().enumerate() {
            let id = store
                .create_org(&ctx, &obj(o, "organization", i)?)
                .map_err(|e| format!("organization {i}: {}", e.text()))?;
            ids.organizations.push(id);
        }
        for (i, u) in data.users.iter().enumerate() {
            let id = store
                .create_user(&ctx, &obj(u, "user", i)?)
                .map_err(|e| format!("user {i}: {}", e.text()))?;
            ids.users.push(id);
        }
        for (i, t) in data.tickets.iter().enumerate() {
            let id = store
                .create_ticket(&ctx, &obj(t, "ticket", i)?)
                .map_err(|e| format!("ticket {i}: {}", e.text()))?;
            ids.tickets.push(id);
        }
        Ok(ids)
    }

    pub fn mint(&self, sub: &str, req: &MintRequest) -> Result<MintedToken, String> {
        let acct = self.account(sub).ok_or(format!("no account {sub}"))?;
        let mut auth = lock(&acct.auth);
        let user_id = match &req.user_email {
            Some(e) => auth
                .staff
                .get(&e.to_lowercase())
                .map(|s| s.0)
                .ok_or(format!("{e} is not staff of {sub}"))?,
            None => *lock(&acct.admin_id),
        };
        let scopes = if req.scopes.is_empty() {
            vec!["read".into(), "write".into()]
        } else {
            req.scopes.clone()
        };
        let t = auth.mint(
            user_id,
            scopes,
            req.expires_in_secs,
            req.refresh,
            self.clock.now_ms(),
        );
        Ok(MintedToken {
            access_token: t.access_token,
            refresh_token: t.refresh_token,
            scopes: t.scopes,
            user_id,
        })
    }

    pub fn expire_token(&self, sub: &str, token: &str) -> bool {
        let now = self.clock.now_ms();
        self.account(sub)
            .is_some_and(|a| lock(&a.auth).expire(token, now))
    }

    pub fn revoke_token(&self, sub: &str, token: &str) -> bool {
        self.account(sub)
            .is_some_and(|a| lock(&a.auth).revoke(token))
    }

    pub fn set_settings(&self, sub: &str, s: AccountSettings) -> bool {
        match self.account(sub) {
            Some(a) => {
                *a.settings.write().unwrap_or_else(|e| e.into_inner()) = s;
                true
            }
            None => false,
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn bad(msg: impl Into<String>) -> Response {
    reply(StatusCode::BAD_REQUEST, json!({"error": msg.into()}))
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("invalid body: {e}"))
}

/// `/__sim/...` requests. Not counted, not logged, not rate limited.
pub(crate) async fn handle(sim: &Arc<Sim>, parts: &Parts, body: Body) -> Response {
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let q = Query::parse(parts.uri.query());
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let default_sub = sim
        .default_account()
        .map(|a| a.subdomain.clone())
        .unwrap_or_default();
    let sub = q.get("account").unwrap_or(&default_sub).to_string();
    let path = parts.uri.path().trim_end_matches('/');
    let m = &parts.method;
    let result: Result<Response, String> = (|| {
        Ok(match (m.clone(), path) {
            (Method::GET, "/__sim/health") => reply(StatusCode::OK, json!({"ok": true})),
            (Method::GET, "/__sim/accounts") => {
                let list: Vec<Value> = sim
                    .all_accounts()
                    .iter()
                    .map(|a| json!({"subdomain": a.subdomain, "url": format!("http://{host}/sub/{}", a.subdomain)}))
                    .collect();
                reply(
                    StatusCode::OK,
                    json!({"accounts": list, "default": default_sub}),
                )
            }
            (Method::GET, "/__sim/state") => {
                let base = format!("http://{host}/sub/{sub}");
                let snap = sim
                    .snapshot(&sub, &base)
                    .ok_or_else(|| format!("no account {sub}"))?;
                reply(
                    StatusCode::OK,
                    serde_json::to_value(snap).unwrap_or_default(),
                )
            }
            (Method::GET, "/__sim/counters") => {
                let which = q.get("account");
                let c = sim
                    .counters_for(which)
                    .ok_or_else(|| format!("no account {sub}"))?;
                reply(StatusCode::OK, serde_json::to_value(c).unwrap_or_default())
            }
            (Method::GET, "/__sim/requests") => {
                let since = q.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
                reply(StatusCode::OK, json!({"requests": sim.log_since(since)}))
            }
            (Method::POST, "/__sim/reset") => {
                let faults: FaultConfig = if bytes.is_empty() {
                    sim.initial_faults.clone()
                } else {
                    parse(&bytes)?
                };
                sim.reset_all(faults)?;
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::GET, "/__sim/faults") => reply(
                StatusCode::OK,
                serde_json::to_value(lock(&sim.fault_config).clone()).unwrap_or_default(),
            ),
            (Method::PUT | Method::POST, "/__sim/faults") => {
                sim.set_faults(parse(&bytes)?);
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::DELETE, "/__sim/faults") => {
                sim.set_faults(FaultConfig::default());
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::POST, "/__sim/seed") => {
                let data: SeedData = parse(&bytes)?;
                let ids = sim.seed(&sub, &data)?;
                reply(
                    StatusCode::CREATED,
                    serde_json::to_value(ids).unwrap_or_default(),
                )
            }
            (Method::POST, "/__sim/tokens") => {
                let r: MintRequest = if bytes.is_empty() {
                    MintRequest::default()
                } else {
                    parse(&bytes)?
                };
                let t = sim.mint(&sub, &r)?;
                reply(
                    StatusCode::CREATED,
                    serde_json::to_value(t).unwrap_or_default(),
                )
            }
            (Method::POST, "/__sim/tokens/expire" | "/__sim/tokens/revoke") => {
                let v: Value = parse(&bytes)?;
                let tok = v["access_token"]
                    .as_str()
                    .ok_or("access_token is required")?;
                let ok = if path.ends_with("expire") {
                    sim.expire_token(&sub, tok)
                } else {
                    sim.revoke_token(&sub, tok)
                };
                if !ok {
                    return Err("unknown token".into());
                }
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::POST, "/__sim/clock") => {
                let v: Value = parse(&bytes)?;
                let ms = v["advance_ms"].as_i64().ok_or("advance_ms is required")?;
                sim.clock.advance(ms);
                reply(
                    StatusCode::OK,
                    json!({"now": crate::util::iso(sim.clock.now_ms())}),
                )
            }
            (Method::GET, "/__sim/settings") => {
                let a = sim
                    .account(&sub)
                    .ok_or_else(|| format!("no account {sub}"))?;
                reply(
                    StatusCode::OK,
                    serde_json::to_value(a.settings()).unwrap_or_default(),
                )
            }
            (Method::PUT, "/__sim/settings") => {
                if !sim.set_settings(&sub, parse(&bytes)?) {
                    return Err(format!("no account {sub}"));
                }
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::GET, "/__sim/rate_limit") => reply(
                StatusCode::OK,
                serde_json::to_value(sim.runtime().rate.clone()).unwrap_or_default(),
            ),
            (Method::PUT, "/__sim/rate_limit") => {
                let v: RateLimitConfig = parse(&bytes)?;
                sim.update_runtime(|rt| rt.rate = v);
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::GET, "/__sim/jobs") => reply(
                StatusCode::OK,
                serde_json::to_value(sim.runtime().jobs.clone()).unwrap_or_default(),
            ),
            (Method::PUT, "/__sim/jobs") => {
                let v: JobConfig = parse(&bytes)?;
                sim.update_runtime(|rt| rt.jobs = v);
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::GET, "/__sim/behavior") => reply(
                StatusCode::OK,
                serde_json::to_value(sim.runtime().behavior.clone()).unwrap_or_default(),
            ),
            (Method::PUT, "/__sim/behavior") => {
                let v: Behavior = parse(&bytes)?;
                sim.update_runtime(|rt| rt.behavior = v);
                reply(StatusCode::OK, json!({"ok": true}))
            }
            (Method::GET, "/__sim/incremental") => reply(
                StatusCode::OK,
                serde_json::to_value(sim.runtime().incremental.clone()).unwrap_or_default(),
            ),
            (Method::PUT, "/__sim/incremental") => {
                let v: IncrementalConfig = parse(&bytes)?;
                sim.update_runtime(|rt| rt.incremental = v);
                reply(StatusCode::OK, json!({"ok": true}))
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown admin endpoint"}),
            ),
        })
    })();
    result.unwrap_or_else(bad)
}
