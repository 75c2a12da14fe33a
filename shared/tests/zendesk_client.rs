//! The Zendesk client against the in-process simulator: auth, typed errors, the shared request
//! budget, `Retry-After` pauses, retries, OAuth refresh rotation, pagination, job statuses and
//! the absence of secrets in logs and errors.

use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zdsync::errors::ErrorName;
use zdsync::fields::Object;
use zdsync::zendesk::{
    credential_store, AuthMethod, Client, ClientOptions, CredentialStore, Credentials,
    FileCredentials, Idempotency, Secret, ZendeskError,
};
use zdsync_sim::{
    FaultKind, FaultRule, MintRequest, SeedData, SimConfig, SimHandle, Simulator,
    DEFAULT_ACCESS_TOKEN, DEFAULT_API_TOKEN, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
    DEFAULT_REFRESH_TOKEN,
};

const ADMIN: &str = "admin@acme.test";

/// Credentials in memory; records what the client saves.
struct MemStore {
    creds: Mutex<Credentials>,
    saved: Mutex<Vec<Credentials>>,
}

impl MemStore {
    fn new(creds: Credentials) -> Arc<MemStore> {
        Arc::new(MemStore {
            creds: Mutex::new(creds),
            saved: Mutex::new(Vec::new()),
        })
    }
}

impl CredentialStore for MemStore {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move { Ok(self.creds.lock().unwrap().clone()) })
    }
    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
        Box::pin(async move {
            *self.creds.lock().unwrap() = creds.clone();
            self.saved.lock().unwrap().push(creds.clone());
            Ok(())
        })
    }
    fn describe(&self) -> String {
        "the test's memory store".into()
    }
}

fn api_token(token: &str) -> Credentials {
    Credentials::ApiToken {
        email: ADMIN.into(),
        token: Secret::new(token),
    }
}

fn oauth(access: &str, refresh: Option<&str>, expires_at: Option<i64>) -> Credentials {
    Credentials::OAuth {
        access_token: Secret::new(access),
        refresh_token: refresh.map(Secret::new),
        client_id: Some(DEFAULT_CLIENT_ID.into()),
        client_secret: Some(Secret::new(DEFAULT_CLIENT_SECRET)),
        expires_at,
        grant_scope: None,
    }
}

/// Fast test options: no token bucket, short backoff and default wait.
fn opts(base: &str) -> ClientOptions {
    let mut o = ClientOptions::for_subdomain("acme", Some(base));
    o.rpm = 0;
    o.backoff_base = Duration::from_millis(5);
    o.backoff_max = Duration::from_millis(50);
    o.retry_after_default = Duration::from_millis(100);
    o.request_timeout = Duration::from_secs(10);
    o
}

async fn client(sim: &SimHandle, creds: Credentials) -> Client {
    Client::new(opts(&sim.base_url()), MemStore::new(creds))
        .await
        .unwrap()
}

async fn start() -> SimHandle {
    Simulator::start(SimConfig::default()).await.unwrap()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn api_token_preflight_and_requests() {
    let sim = start().await;
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    assert_eq!(c.auth_method(), AuthMethod::ApiToken);
    let p = c.preflight(Object::Users, true).await.unwrap();
    assert_eq!(p.role, "admin");
    assert_eq!(p.email.as_deref(), Some(ADMIN));
    assert!(p.user_id > 0);
    assert_eq!(p.scopes, None);

    let body = serde_json::to_vec(&json!({"user": {"name": "Ann", "email": "ann@x.io"}})).unwrap();
    let created = c
        .send(
            Method::POST,
            "/api/v2/users.json",
            body,
            Idempotency::Unsafe,
        )
        .await
        .unwrap();
    let id = created["user"]["id"].as_u64().unwrap();
    let got = c.get(&format!("/api/v2/users/{id}.json")).await.unwrap();
    assert_eq!(got["user"]["email"], "ann@x.io");
    // A DELETE with an empty body.
    c.send(
        Method::DELETE,
        &format!("/api/v2/users/{id}.json"),
        vec![],
        Idempotency::Safe,
    )
    .await
    .unwrap();

    let log = sim.request_log();
    assert!(log.iter().all(|e| e.auth == "basic"), "{log:?}");
    assert_eq!(c.stats().sent, 4);
    assert_eq!(c.stats().retries, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_api_token_is_auth_failed_with_guidance() {
    let sim = start().await;
    let c = client(&sim, api_token("not-the-token-123")).await;
    let err = c.preflight(Object::Users, true).await.unwrap_err();
    let ZendeskError::AuthFailed { method, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*method, AuthMethod::ApiToken);
    assert!(message.contains("not the account password"), "{message}");
    assert!(message.contains(ADMIN), "{message}");
    assert!(message.contains("admin"), "{message}");
    assert!(message.contains("the test's memory store"), "{message}");
    assert!(!format!("{err} {err:?}").contains("not-the-token-123"));
    assert!(err.is_fatal());
    // Not retried.
    assert_eq!(sim.counters().requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn unknown_subdomain() {
    let sim = start().await;
    let c = Client::new(
        opts(&sim.account_url("nope")),
        MemStore::new(api_token(DEFAULT_API_TOKEN)),
    )
    .await
    .unwrap();
    let err = c.preflight(Object::Users, true).await.unwrap_err();
    match &err {
        ZendeskError::SubdomainNotFound { subdomain } => assert_eq!(subdomain, "nope"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("nope.zendesk.com"));
    sim.shutdown().await;
}

#[tokio::test]
async fn oauth_preflight_checks_scopes() {
    let sim = start().await;
    // read + write: everything.
    let c = client(&sim, oauth(DEFAULT_ACCESS_TOKEN, None, None)).await;
    let p = c.preflight(Object::Tickets, true).await.unwrap();
    assert_eq!(p.scopes, Some(vec!["read".into(), "write".into()]));

    let t = sim
        .mint_token(
            "acme",
            &MintRequest {
                scopes: vec!["read".into(), "users:write".into()],
                ..MintRequest::default()
            },
        )
        .unwrap();
    let c = client(&sim, oauth(&t.access_token, None, None)).await;
    assert_eq!(c.auth_method(), AuthMethod::OAuth);
    c.preflight(Object::Users, true).await.unwrap();
    c.preflight(Object::Tickets, false).await.unwrap();
    let before = sim.counters().requests;
    let err = c.preflight(Object::Tickets, true).await.unwrap_err();
    match &err {
        ZendeskError::MissingScope { scope, hint } => {
            assert_eq!(scope, "tickets:write");
            assert!(hint.contains("tickets:write"), "{hint}");
        }
        other => panic!("{other:?}"),
    }
    // users/me and the token introspection only: no write was tried.
    assert_eq!(sim.counters().requests - before, 2);

    // A write the token lacks: the 403 is parsed into MissingScope too.
    let body = serde_json::to_vec(&json!({"ticket": {"comment": {"body": "x"}}})).unwrap();
    let err = c
        .send(
            Method::POST,
            "/api/v2/tickets.json",
            body,
            Idempotency::Unsafe,
        )
        .await
        .unwrap_err();
    match &err {
        ZendeskError::MissingScope { scope, .. } => assert_eq!(scope, "tickets:write"),
        other => panic!("{other:?}"),
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn bulk_import_disabled() {
    let sim = start().await;
    sim.update_settings("acme", |s| s.bulk_user_import = false);
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    let body = serde_json::to_vec(&json!({"users": [{"name": "A", "email": "a@x.io"}]})).unwrap();
    let err = c
        .send(
            Method::POST,
            "/api/v2/users/create_many.json",
            body,
            Idempotency::Unsafe,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ZendeskError::BulkImportDisabled), "{err:?}");
    assert_eq!(sim.counters().requests, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn expired_token_refreshes_once_and_rotation_is_saved() {
    let sim = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zendesk.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({
            "access_token": DEFAULT_ACCESS_TOKEN,
            "refresh_token": DEFAULT_REFRESH_TOKEN,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
            "subdomain": "acme",
        }))
        .unwrap(),
    )
    .unwrap();
    assert!(sim.expire_token("acme", DEFAULT_ACCESS_TOKEN));
    let store = credential_store("file:zendesk.json", dir.path()).unwrap();
    assert!(store.describe().contains("zendesk.json"));
    let c = Client::new(opts(&sim.base_url()), store).await.unwrap();

    // Eight tasks hit the expired token at once: one refresh, everyone retries with it.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get("/api/v2/users/me.json").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(c.stats().token_refreshes, 1);
    assert_eq!(
        sim.counters().by_endpoint.get("oauth.tokens").copied(),
        Some(1)
    );

    let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let new_access = saved["access_token"].as_str().unwrap();
    let new_refresh = saved["refresh_token"].as_str().unwrap();
    assert_ne!(new_access, DEFAULT_ACCESS_TOKEN);
    assert_ne!(new_refresh, DEFAULT_REFRESH_TOKEN);
    assert_eq!(saved["client_id"], DEFAULT_CLIENT_ID);
    assert_eq!(saved["subdomain"], "acme", "other keys are kept");
    assert!(saved["expires_at"].as_i64().unwrap() > now_unix());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The old refresh token no longer works (rotation).
    let old = reqwest::Client::new()
        .post(format!("{}/oauth/tokens", sim.base_url()))
        .json(&json!({
            "grant_type": "refresh_token",
            "refresh_token": DEFAULT_REFRESH_TOKEN,
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(old.status().as_u16(), 400);
    let body: Value = old.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");

    // A new client from the saved file works without refreshing.
    let c2 = Client::new(
        opts(&sim.base_url()),
        credential_store("file:zendesk.json", dir.path()).unwrap(),
    )
    .await
    .unwrap();
    c2.preflight(Object::Users, true).await.unwrap();
    assert_eq!(c2.stats().token_refreshes, 0);

    // A revoked token whose refresh token is used up: AuthFailed, reconnect.
    let t = sim
        .mint_token(
            "acme",
            &MintRequest {
                refresh: true,
                ..MintRequest::default()
            },
        )
        .unwrap();
    sim.revoke_token("acme", &t.access_token);
    let c3 = client(&sim, oauth(&t.access_token, Some("used-up-refresh"), None)).await;
    let err = c3.get("/api/v2/users/me.json").await.unwrap_err();
    let ZendeskError::AuthFailed { method, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*method, AuthMethod::OAuth);
    assert!(message.contains("zdsync connect"), "{message}");
    assert!(!message.contains("used-up-refresh"));
    sim.shutdown().await;
}

#[tokio::test]
async fn token_near_expiry_is_refreshed_before_use() {
    let sim = start().await;
    let store = MemStore::new(oauth(
        DEFAULT_ACCESS_TOKEN,
        Some(DEFAULT_REFRESH_TOKEN),
        Some(now_unix() + 30),
    ));
    let c = Client::new(opts(&sim.base_url()), store.clone())
        .await
        .unwrap();
    c.get("/api/v2/users/me.json").await.unwrap();
    assert_eq!(c.stats().token_refreshes, 1);
    let log = sim.request_log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].endpoint, "oauth.tokens");
    assert!(log.iter().all(|e| e.status < 400), "{log:?}");
    let saved = store.saved.lock().unwrap().clone();
    assert_eq!(saved.len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn oauth_refused_without_refresh_token() {
    let sim = start().await;
    sim.revoke_token("acme", DEFAULT_ACCESS_TOKEN);
    let c = client(&sim, oauth(DEFAULT_ACCESS_TOKEN, None, None)).await;
    let err = c.preflight(Object::Users, true).await.unwrap_err();
    let ZendeskError::AuthFailed { message, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(message.contains("expired or revoked"), "{message}");
    assert!(message.contains("zdsync connect"), "{message}");
    sim.shutdown().await;
}

#[tokio::test]
async fn rate_limit_storm_pauses_every_task() {
    let sim = start().await;
    sim.set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit)
        .path("/api/v2/users/me")
        .times(2)
        .retry_after(1)]);
    let mut o = opts(&sim.base_url());
    o.rpm = 600;
    let c = Client::new(o, MemStore::new(api_token(DEFAULT_API_TOKEN)))
        .await
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..2 {
                    c.get("/api/v2/users/me.json").await?;
                }
                Ok::<_, ZendeskError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let counters = sim.counters();
    assert_eq!(counters.rate_limited, 2);
    assert_eq!(counters.early_requests, 0, "{:?}", sim.request_log());
    assert!(started.elapsed() >= Duration::from_secs(2));
    let s = c.stats();
    assert_eq!(s.rate_limited, 2);
    assert_eq!(s.sent, 18);
    assert_eq!(s.retries, 2);
    assert!(s.paused_ms >= 1900, "{s:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn account_window_limit_is_respected() {
    let sim = start().await;
    sim.update_rate_limit(|r| {
        r.rpm = 5;
        r.window_ms = 1000;
    });
    let mut o = opts(&sim.base_url());
    o.rpm = 630;
    let c = Client::new(o, MemStore::new(api_token(DEFAULT_API_TOKEN)))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get("/api/v2/users/me.json").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(sim.counters().early_requests, 0, "{:?}", sim.request_log());
    let s = c.stats();
    assert_eq!(s.sent - s.rate_limited, 8);
    sim.shutdown().await;
}

/// Pacing that recovers: the end of a window run low is spent slowly, and the requests still
/// waiting go at full rate once the window resets, not at the spacing they booked while few
/// requests were left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_requests_go_at_full_rate_in_the_fresh_window() {
    let sim = start().await;
    sim.update_rate_limit(|r| {
        r.rpm = 200;
        r.window_ms = 4_000;
    });
    // No token bucket: only the pacing on the rate headers spaces the requests.
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    let t0 = Instant::now();
    let done = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (c, done) = (c.clone(), done.clone());
            tokio::spawn(async move {
                for _ in 0..75 {
                    c.get("/api/v2/users/me.json").await.unwrap();
                    done.lock().unwrap().push(t0.elapsed());
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut at = done.lock().unwrap().clone();
    at.sort();
    assert_eq!(at.len(), 300);
    let log: Vec<String> = sim
        .request_log()
        .iter()
        .map(|e| format!("{} {} {}", e.seq, e.at, e.status))
        .collect();
    assert_eq!(
        sim.counters().rate_limited,
        0,
        "paced, never refused: {log:#?}"
    );
    // The first window took 200 (its end paced); the next 100 went in a burst once it reset.
    let fresh = at[200] - at[199];
    let burst = at[299] - at[200];
    assert!(
        fresh >= Duration::from_millis(500),
        "the 201st waited for the window: {fresh:?}"
    );
    assert!(
        burst < Duration::from_millis(1_500),
        "100 requests of the fresh window took {burst:?}: {at:?}"
    );
    sim.shutdown().await;
}

/// Two clients of one account (two syncs, or two processes: they share only the budget
/// folder) together keep to one `rate_limit_rpm`: any 7 seconds span at most two 6-second
/// windows of a tenth of it each. Alone, each would send its full rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_one_account_share_its_budget() {
    use zdsync::store::LocalStore;
    use zdsync::zendesk::budget::{window_cap, StoreBudget};
    let sim = start().await;
    let dir = tempfile::tempdir().unwrap();
    let budget = Arc::new(StoreBudget::new(
        Arc::new(LocalStore::new(dir.path())),
        "",
        "test folder",
    ));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut o = opts(&sim.base_url());
        o.rpm = 300;
        o.budget = Some(budget.clone());
        clients.push(
            Client::new(o, MemStore::new(api_token(DEFAULT_API_TOKEN)))
                .await
                .unwrap(),
        );
    }
    let until = Instant::now() + Duration::from_secs(7);
    let sent = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let tasks: Vec<_> = clients
        .iter()
        .flat_map(|c| (0..4).map(move |_| c.clone()))
        .map(|c| {
            let sent = sent.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    c.get("/api/v2/users/me.json").await.unwrap();
                    if Instant::now() <= until {
                        sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    let cap = window_cap(300, 0).max(window_cap(300, 1));
    // Alone each client sends 5 a second: over 70 in 7 s together. Shared: two windows at most.
    assert!(sent <= 2 * cap, "{sent} requests, window cap {cap}");
    assert!(sent >= cap / 2, "{sent} requests: the budget was used");
    sim.shutdown().await;
}

#[tokio::test]
async fn unavailable_and_server_errors_are_retried() {
    let sim = start().await;
    sim.set_fault_rules(vec![FaultRule::new(FaultKind::Unavailable)
        .path("/api/v2/users/me")
        .times(1)]);
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    c.get("/api/v2/users/me.json").await.unwrap();
    sim.set_fault_rules(vec![FaultRule::new(FaultKind::InternalError)
        .path("/api/v2/users/me")
        .times(2)]);
    c.get("/api/v2/users/me.json").await.unwrap();
    let s = c.stats();
    assert_eq!((s.unavailable, s.server_errors, s.retries), (1, 2, 3));
    assert_eq!(sim.counters().requests, 5);

    // A create answered 500 is never resent: a gateway may have given up on work Zendesk did,
    // so the outcome is unknown and the caller looks the records up. A 503 without
    // `Retry-After` is as unknown; with it (Zendesk did nothing) it is resent.
    let body = serde_json::to_vec(&json!({"user": {"name": "B", "email": "b@x.io"}})).unwrap();
    let create_answered = |kind: FaultKind, retry_after: Option<u64>| {
        let mut rule = FaultRule::new(kind).path("/api/v2/users").method("POST");
        rule.retry_after_secs = retry_after;
        sim.set_fault_rules(vec![rule.times(1)]);
        c.send(
            Method::POST,
            "/api/v2/users.json",
            body.clone(),
            Idempotency::Unsafe,
        )
    };
    let sent = sim.counters().requests;
    let err = create_answered(FaultKind::InternalError, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ZendeskError::OutcomeUnknown { message, .. } if message.contains("HTTP 500")),
        "{err:?}"
    );
    assert_eq!(
        sim.counters().requests,
        sent + 1,
        "the create was sent once"
    );
    let err = create_answered(FaultKind::Unavailable, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ZendeskError::OutcomeUnknown { .. }),
        "{err:?}"
    );
    create_answered(FaultKind::Unavailable, Some(0))
        .await
        .unwrap();

    // The budget runs out: Unavailable, after max_attempts.
    sim.set_fault_rules(vec![FaultRule::new(FaultKind::InternalError)
        .path("/api/v2/users/me")
        .times(100)]);
    let mut o = opts(&sim.base_url());
    o.max_attempts = 3;
    let c = Client::new(o, MemStore::new(api_token(DEFAULT_API_TOKEN)))
        .await
        .unwrap();
    let err = c.get("/api/v2/users/me.json").await.unwrap_err();
    match &err {
        ZendeskError::Unavailable {
            status, attempts, ..
        } => assert_eq!((*status, *attempts), (500, 3)),
        other => panic!("{other:?}"),
    }
    assert_eq!(err.error_name(), ErrorName::ZendeskUnavailable);
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_answer_unsafe_is_outcome_unknown_safe_is_retried() {
    let sim = start().await;
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    sim.set_fault_rules(vec![FaultRule::new(FaultKind::DropConnection)
        .path("/api/v2/users")
        .method("POST")
        .after_bytes(5)
        .times(1)]);
    let body = serde_json::to_vec(&json!({"user": {"name": "C", "email": "c@x.io"}})).unwrap();
    let err = c
        .send(
            Method::POST,
            "/api/v2/users.json",
            body,
            Idempotency::Unsafe,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ZendeskError::OutcomeUnknown { .. }),
        "{err:?}"
    );
    assert_eq!(err.error_name(), ErrorName::ZendeskUnavailable);
    // Zendesk did act on it: the user exists, and it was sent once.
    assert!(sim.state("acme").unwrap().user_by_email("c@x.io").is_some());
    assert_eq!(sim.counters().requests, 1);

    sim.set_fault_rules(vec![FaultRule::new(FaultKind::DropConnection)
        .path("/api/v2/users/me")
        .times(1)]);
    let me = c.get("/api/v2/users/me.json").await.unwrap();
    assert_eq!(me["user"]["email"], ADMIN);
    assert_eq!(sim.counters().requests, 3);
    assert_eq!(c.stats().retries, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn validation_errors_are_not_retried() {
    let sim = start().await;
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    let body = serde_json::to_vec(&json!({"user": {"email": "no-name@x.io"}})).unwrap();
    let err = c
        .send(Method::POST, "/api/v2/users.json", body, Idempotency::Safe)
        .await
        .unwrap_err();
    match &err {
        ZendeskError::Api {
            status,
            code,
            details,
            ..
        } => {
            assert_eq!(*status, 422);
            assert_eq!(code, "RecordInvalid");
            assert!(details.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.error_name(), ErrorName::ZendeskRejected);
    let err = c.get("/api/v2/users/99.json").await.unwrap_err();
    assert!(
        matches!(err, ZendeskError::Api { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(sim.counters().requests, 2);
    assert_eq!(c.stats().retries, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn token_bucket_spaces_requests() {
    let sim = start().await;
    let mut o = opts(&sim.base_url());
    o.rpm = 600; // one request every 100 ms, burst 1
    let c = Client::new(o, MemStore::new(api_token(DEFAULT_API_TOKEN)))
        .await
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    c.get("/api/v2/users/me.json").await?;
                }
                Ok::<_, ZendeskError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 20 requests, the first two free (the burst): at least 18 × 100 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(1750),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(c.stats().sent, 20);
    sim.shutdown().await;
}

#[tokio::test]
async fn list_all_follows_cursor_and_offset_pages() {
    let sim = start().await;
    let users: Vec<Value> = (0..230)
        .map(|i| json!({"name": format!("U{i}"), "email": format!("u{i}@x.io")}))
        .collect();
    sim.seed(
        "acme",
        &SeedData {
            users,
            ..SeedData::default()
        },
    )
    .unwrap();
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    let all = c.list_all("/api/v2/users.json", "users").await.unwrap();
    assert_eq!(all.len(), 231);
    let ids: std::collections::HashSet<u64> =
        all.iter().map(|u| u["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), 231);
    assert_eq!(sim.counters().requests, 3);
    assert!(sim.request_log().iter().all(|e| e
        .query
        .as_deref()
        .unwrap_or("")
        .contains("page[size]=100")
        || e.query
            .as_deref()
            .unwrap_or("")
            .contains("page%5Bsize%5D=100")));

    // Offset pages when asked for (per_page): follows next_page.
    let all = c
        .list_all("/api/v2/users.json?per_page=100", "users")
        .await
        .unwrap();
    assert_eq!(all.len(), 231);

    let fields = c
        .list_all("/api/v2/user_fields.json", "user_fields")
        .await
        .unwrap();
    assert!(fields.len() >= 10, "{}", fields.len());
    sim.shutdown().await;
}

#[tokio::test]
async fn job_statuses_of_a_created_job() {
    let sim = start().await;
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    let body = serde_json::to_vec(&json!({"users": [
        {"name": "J1", "email": "j1@x.io"},
        {"name": "J2", "email": "j2@x.io"},
        {"name": "J3", "email": "bad email"},
    ]}))
    .unwrap();
    let v = c
        .send(
            Method::POST,
            "/api/v2/users/create_many.json",
            body,
            Idempotency::Unsafe,
        )
        .await
        .unwrap();
    let id = v["job_status"]["id"].as_str().unwrap().to_string();
    let mut done = None;
    for _ in 0..100 {
        let statuses = c.job_statuses(std::slice::from_ref(&id)).await.unwrap();
        assert_eq!(statuses.len(), 1);
        if statuses[0].is_terminal() {
            done = Some(statuses[0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = done.expect("the job completes");
    assert_eq!(job.id, id);
    assert_eq!(job.status, "completed");
    assert_eq!(job.results.len(), 3);
    assert_eq!(job.results.iter().filter(|r| r.failed()).count(), 1);
    assert!(c.job_statuses(&[]).await.unwrap().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn credential_stores() {
    let dir = tempfile::tempdir().unwrap();
    // Unknown references list the accepted forms and never echo the reference.
    let err = credential_store("sekrit-token-value", dir.path())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("`env`") && msg.contains("file:<path>"),
        "{msg}"
    );
    assert!(msg.contains("Secrets Manager"), "{msg}");
    assert!(!msg.contains("sekrit"));

    // API-token file.
    let path = dir.path().join("api.json");
    std::fs::write(&path, br#"{"email":"a@b.c","api_token":"tok-123456"}"#).unwrap();
    let store = credential_store(&format!("file:{}", path.display()), dir.path()).unwrap();
    let creds = store.load().await.unwrap();
    assert_eq!(creds, api_token_for("a@b.c", "tok-123456"));
    assert!(!format!("{creds:?} {store:?}", store = store.describe()).contains("tok-123456"));

    // Missing and malformed files.
    let missing = FileCredentials::new(dir.path().join("none.json"));
    let err = missing.load().await.unwrap_err();
    assert!(err.to_string().contains("zdsync connect"), "{err}");
    std::fs::write(dir.path().join("bad.json"), br#"{"email":"a@b.c"}"#).unwrap();
    let err = credential_store("file:bad.json", dir.path())
        .unwrap()
        .load()
        .await
        .unwrap_err();
    assert!(matches!(err, ZendeskError::Credentials { .. }), "{err:?}");

    // Saving an OAuth pair creates the file with mode 0600.
    let out = FileCredentials::new(dir.path().join("new.json"));
    out.save(&oauth("acc-123456", Some("ref-123456"), Some(42)))
        .await
        .unwrap();
    let back = out.load().await.unwrap();
    assert_eq!(back, oauth("acc-123456", Some("ref-123456"), Some(42)));
    assert!(!format!("{back:?} {out:?}").contains("123456"));
}

fn api_token_for(email: &str, token: &str) -> Credentials {
    Credentials::ApiToken {
        email: email.into(),
        token: Secret::new(token),
    }
}

/// Env-var stores. One test touches the process environment (tests run in threads).
#[tokio::test]
async fn env_credentials() {
    const VARS: [&str; 8] = [
        "ZENDESK_EMAIL",
        "ZENDESK_API_TOKEN",
        "ZENDESK_ACCESS_TOKEN",
        "ZENDESK_REFRESH_TOKEN",
        "ZENDESK_CLIENT_ID",
        "ZENDESK_CLIENT_SECRET",
        "ZENDESK_TOKEN_EXPIRES_AT",
        "ZENDESK_CREDENTIALS_FILE",
    ];
    // SAFETY (edition 2021: set_var is safe): no other test reads these variables.
    for v in VARS {
        std::env::remove_var(v);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = credential_store("env", dir.path()).unwrap();
    let err = store.load().await.unwrap_err();
    let msg = err.to_string();
    for v in ["ZENDESK_ACCESS_TOKEN", "ZENDESK_EMAIL", "ZENDESK_API_TOKEN"] {
        assert!(msg.contains(v), "{msg}");
    }

    std::env::set_var("ZENDESK_EMAIL", "e@x.io");
    std::env::set_var("ZENDESK_API_TOKEN", "env-api-token-1");
    assert_eq!(
        store.load().await.unwrap(),
        api_token_for("e@x.io", "env-api-token-1")
    );
    // OAuth wins when both kinds are set.
    std::env::set_var("ZENDESK_ACCESS_TOKEN", "env-access-1");
    std::env::set_var("ZENDESK_REFRESH_TOKEN", "env-refresh-1");
    std::env::set_var("ZENDESK_CLIENT_ID", DEFAULT_CLIENT_ID);
    std::env::set_var("ZENDESK_CLIENT_SECRET", DEFAULT_CLIENT_SECRET);
    std::env::set_var("ZENDESK_TOKEN_EXPIRES_AT", "42");
    let creds = store.load().await.unwrap();
    assert_eq!(
        creds,
        oauth("env-access-1", Some("env-refresh-1"), Some(42))
    );
    // Saving cannot persist: Ok, and the rotated pair is used for later loads in this process.
    let rotated = oauth("env-access-2", Some("env-refresh-2"), Some(43));
    store.save(&rotated).await.unwrap();
    assert_eq!(store.load().await.unwrap(), rotated);

    // ZENDESK_CREDENTIALS_FILE redirects `env` to a file.
    let path = dir.path().join("c.json");
    std::fs::write(&path, br#"{"email":"f@x.io","api_token":"file-token-1"}"#).unwrap();
    std::env::set_var("ZENDESK_CREDENTIALS_FILE", &path);
    let store = credential_store("env", dir.path()).unwrap();
    assert!(store.describe().contains("c.json"));
    assert_eq!(
        store.load().await.unwrap(),
        api_token_for("f@x.io", "file-token-1")
    );
    for v in VARS {
        std::env::remove_var(v);
    }
}

/// A `MakeWriter` collecting everything into one buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn secrets_never_reach_logs_or_errors() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace,zdsync_sim=off"))
        .with_writer(capture.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = start().await;
    let mut errors: Vec<String> = Vec::new();
    let mut note = |e: &ZendeskError| errors.push(format!("{e} | {e:?}"));

    // API token: good, then wrong.
    let c = client(&sim, api_token(DEFAULT_API_TOKEN)).await;
    c.preflight(Object::Users, true).await.unwrap();
    note(&c.get("/api/v2/users/1.json").await.unwrap_err());
    let bad = client(&sim, api_token("wrong-api-token-zz")).await;
    note(&bad.preflight(Object::Users, true).await.unwrap_err());
    let debug_client = format!("{c:?} {bad:?}");

    // OAuth: expired access token refreshed with the client secret, with retries around it.
    sim.expire_token("acme", DEFAULT_ACCESS_TOKEN);
    sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::Unavailable)
            .path("/api/v2/users/me")
            .times(1),
        FaultRule::new(FaultKind::DropConnection)
            .path("/api/v2/users/me")
            .times(1),
    ]);
    let store = MemStore::new(oauth(
        DEFAULT_ACCESS_TOKEN,
        Some(DEFAULT_REFRESH_TOKEN),
        None,
    ));
    let o = Client::new(opts(&sim.base_url()), store.clone())
        .await
        .unwrap();
    o.preflight(Object::Users, true).await.unwrap();
    assert_eq!(o.stats().token_refreshes, 1);
    let Credentials::OAuth {
        access_token: new_access,
        refresh_token: Some(new_refresh),
        ..
    } = store.creds.lock().unwrap().clone()
    else {
        panic!("not rotated")
    };
    note(&o.get("/api/v2/users/1.json").await.unwrap_err());
    // A refused refresh (used-up refresh token).
    let used = client(
        &sim,
        oauth("invalid-access-zz", Some(DEFAULT_REFRESH_TOKEN), None),
    )
    .await;
    note(&used.get("/api/v2/users/me.json").await.unwrap_err());
    let debug_client = format!("{debug_client} {o:?} {used:?}");
    sim.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("zendesk request"),
        "the client logs requests at debug: {logs}"
    );
    let basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(format!("{ADMIN}/token:{DEFAULT_API_TOKEN}"))
    };
    let secrets = [
        DEFAULT_API_TOKEN,
        "wrong-api-token-zz",
        DEFAULT_ACCESS_TOKEN,
        DEFAULT_REFRESH_TOKEN,
        DEFAULT_CLIENT_SECRET,
        new_access.expose(),
        new_refresh.expose(),
        "invalid-access-zz",
        basic.as_str(),
    ];
    assert_eq!(errors.len(), 4);
    for s in secrets {
        assert!(!logs.contains(s), "`{s}` in the logs:\n{logs}");
        for e in &errors {
            assert!(!e.contains(s), "`{s}` in an error: {e}");
        }
        assert!(!debug_client.contains(s), "`{s}` in {debug_client}");
    }
}

#[cfg(not(feature = "aws"))]
#[test]
fn secrets_manager_references_need_the_aws_feature() {
    let dir = std::path::Path::new(".");
    for reference in [
        "secretsmanager:zdsync/zendesk",
        "arn:aws:secretsmanager:eu-west-1:123456789012:secret:zdsync-AbCdEf",
    ] {
        let msg = credential_store(reference, dir).err().unwrap().to_string();
        assert!(
            msg.contains("AWS support") && msg.contains("--features aws"),
            "{msg}"
        );
        assert!(!msg.contains("zdsync-AbCdEf") && !msg.contains("zdsync/zendesk"));
    }
}

#[tokio::test]
async fn a_redirect_is_never_followed_so_the_credential_stays_home() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Another host the redirect points at: it must never see a request.
    let elsewhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = elsewhere.local_addr().unwrap();
    let visits = Arc::new(Mutex::new(0u32));
    let v = visits.clone();
    let trap = tokio::spawn(async move {
        while let Ok((_s, _)) = elsewhere.accept().await {
            *v.lock().unwrap() += 1;
        }
    });
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", api.local_addr().unwrap());
    let server = tokio::spawn(async move {
        for _ in 0..16 {
            let Ok((mut s, _)) = api.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://{target}/api/v2/users/me.json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let mut o = opts(&base);
    o.max_attempts = 2;
    let c = Client::new(o, MemStore::new(api_token("secret-token")))
        .await
        .unwrap();
    let err = c.get("/api/v2/users/me.json").await.unwrap_err();
    assert!(!err.to_string().contains("secret-token"), "{err}");
    assert_eq!(*visits.lock().unwrap(), 0, "the redirect was followed");
    server.abort();
    trap.abort();
}

#[tokio::test]
async fn containers_refreshing_at_once_leave_one_winner_and_the_others_read_its_pair() {
    let sim = start().await;
    assert!(sim.expire_token("acme", DEFAULT_ACCESS_TOKEN));
    // One secret, several containers: each its own client (and its own in-process lock).
    let store = MemStore::new(oauth(
        DEFAULT_ACCESS_TOKEN,
        Some(DEFAULT_REFRESH_TOKEN),
        None,
    ));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            Client::new(opts(&sim.base_url()), store.clone())
                .await
                .unwrap(),
        );
    }
    let tasks: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.get("/api/v2/users/me.json").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every container goes on");
    }
    let refreshes: u64 = clients.iter().map(|c| c.stats().token_refreshes).sum();
    assert_eq!(refreshes, 1, "one container refreshed");
    let saved = store.saved.lock().unwrap().clone();
    assert_eq!(saved.len(), 1, "one pair saved");
    // The stored pair is the live one.
    let stored = store.creds.lock().unwrap().clone();
    let Credentials::OAuth { access_token, .. } = stored else {
        panic!("oauth")
    };
    assert_ne!(access_token.expose(), DEFAULT_ACCESS_TOKEN);
    for c in &clients {
        c.get("/api/v2/users/me.json").await.unwrap();
    }
}

#[tokio::test]
async fn a_rotation_that_cannot_be_saved_fails_the_run_loudly() {
    struct ReadOnly(Credentials);
    impl CredentialStore for ReadOnly {
        fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
            let c = self.0.clone();
            Box::pin(async move { Ok(c) })
        }
        fn save<'a>(&'a self, _: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
            Box::pin(async move {
                Err(ZendeskError::Credentials {
                    message:
                        "AccessDenied: not authorized to perform secretsmanager:PutSecretValue"
                            .into(),
                })
            })
        }
        fn describe(&self) -> String {
            "a read-only secret".into()
        }
    }
    let sim = start().await;
    assert!(sim.expire_token("acme", DEFAULT_ACCESS_TOKEN));
    let creds = oauth(DEFAULT_ACCESS_TOKEN, Some(DEFAULT_REFRESH_TOKEN), None);
    let c = Client::new(opts(&sim.base_url()), Arc::new(ReadOnly(creds)))
        .await
        .unwrap();
    let err = c.get("/api/v2/users/me.json").await.unwrap_err();
    assert_eq!(err.error_name(), ErrorName::AuthFailed, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("PutSecretValue") && text.contains("zdsync connect"),
        "{text}"
    );
    assert!(!text.contains(DEFAULT_REFRESH_TOKEN), "{text}");
}
