//! Connecting an account (`zdsync::zendesk::connect`) against the simulator over loopback: the
//! OAuth authorization-code flow with PKCE (success, wrong state, expired code, PKCE mismatch,
//! denied consent, missing scope), confidential clients and `client_credentials`, the API-token
//! check (bad token, password instead of token, non-admin, wrong subdomain), the local file
//! store (owner-only) and refresh-token rotation written back to it.

use std::sync::Arc;
use std::time::Duration;
use zdsync::errors::ErrorName;
use zdsync::fields::Object;
use zdsync::zendesk::connect::{self, ConnectError, Loopback, OAuthApp, Pkce};
use zdsync::zendesk::{
    Client, ClientOptions, CredentialStore, Credentials, FileCredentials, Secret, ZendeskError,
};
use zdsync_sim::{
    ClientKind, Consent, OAuthClientConfig, SimConfig, SimHandle, Simulator, StaffConfig,
    DEFAULT_API_TOKEN, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
};
use zdsync_tests::{ACCOUNT, ADMIN_EMAIL};

const PUBLIC_CLIENT: &str = "zdsync-cli";
const AGENT_EMAIL: &str = "agent@acme.test";
const WAIT: Duration = Duration::from_secs(20);

async fn sim() -> SimHandle {
    let mut cfg = SimConfig::default();
    let acct = cfg.account_mut(ACCOUNT).expect("default account");
    acct.oauth_clients.push(OAuthClientConfig {
        identifier: PUBLIC_CLIENT.into(),
        secret: None,
        kind: ClientKind::Public,
        ..OAuthClientConfig::default()
    });
    acct.agents.push(StaffConfig {
        email: AGENT_EMAIL.into(),
        name: "Agent".into(),
        role: "agent".into(),
    });
    Simulator::start(cfg).await.expect("simulator starts")
}

fn opts(sim: &SimHandle, subdomain: &str) -> ClientOptions {
    let mut o = ClientOptions::for_subdomain(subdomain, Some(&sim.account_url(subdomain)));
    o.max_attempts = 2;
    o.backoff_base = Duration::from_millis(5);
    o
}

fn public_app(sim: &SimHandle) -> OAuthApp {
    OAuthApp::new(&opts(sim, ACCOUNT), PUBLIC_CLIENT, None)
}

fn confidential_app(sim: &SimHandle, secret: &str) -> OAuthApp {
    OAuthApp::new(
        &opts(sim, ACCOUNT),
        DEFAULT_CLIENT_ID,
        Some(Secret::new(secret)),
    )
}

/// The browser: opens the authorization URL and follows the redirect to the loopback listener.
/// Returns the HTTP status of the last page, or the transport error.
async fn browse(url: String) -> Result<u16, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    http.get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

/// Runs the whole browser flow; `tamper` may change the authorization URL first.
async fn flow(
    app: &OAuthApp,
    scopes: &str,
    tamper: impl FnOnce(&str) -> String,
) -> Result<Credentials, ConnectError> {
    connect::authorize(app, scopes, 0, WAIT, |url| {
        assert!(url.starts_with(&app.base_url), "{url}");
        tokio::spawn(browse(tamper(url)));
    })
    .await
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn oauth_parts(c: &Credentials) -> (String, Option<String>, Option<i64>) {
    match c {
        Credentials::OAuth {
            access_token,
            refresh_token,
            expires_at,
            ..
        } => (
            access_token.expose().to_string(),
            refresh_token.as_ref().map(|r| r.expose().to_string()),
            *expires_at,
        ),
        other => panic!("expected OAuth credentials, got {other:?}"),
    }
}

fn token_grants(sim: &SimHandle) -> u64 {
    sim.account_counters(ACCOUNT)
        .unwrap()
        .by_endpoint
        .get("oauth.tokens")
        .copied()
        .unwrap_or(0)
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_flow_with_pkce_connects_checks_and_stores_owner_only() {
    let sim = sim().await;
    let creds = flow(&public_app(&sim), connect::SYNC_SCOPES, str::to_string)
        .await
        .expect("the flow connects");
    let (access, refresh, expires_at) = oauth_parts(&creds);
    assert!(refresh.is_some(), "a refresh token is issued");
    let now = unix_now();
    let expires_at = expires_at.expect("expiry known");
    assert!(
        (now + 1700..=now + 1810).contains(&expires_at),
        "{expires_at}"
    );
    // Nothing secret in Debug output.
    let debug = format!("{creds:?}");
    assert!(!debug.contains(&access) && !debug.contains(refresh.as_deref().unwrap()));

    let report = connect::verify(opts(&sim, ACCOUNT), creds.clone(), "new token")
        .await
        .unwrap();
    assert_eq!(report.who.email.as_deref(), Some(ADMIN_EMAIL));
    assert_eq!(report.who.role, "admin");
    assert_eq!(
        report.who.scopes.as_deref().unwrap(),
        [
            "read",
            "users:write",
            "organizations:write",
            "tickets:write"
        ]
    );
    assert!(report.who.token_expires_at.is_some());
    for o in [Object::Users, Object::Organizations, Object::Tickets] {
        assert!(report.can_write(o), "{o:?}");
    }

    // Stored in a file under a new folder: owner-only, the documented JSON shape.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("creds.json");
    std::fs::write(&path, r#"{"subdomain": "acme", "note": "kept"}"#).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let store = FileCredentials::new(&path);
    store.save(&creds).await.unwrap();
    #[cfg(unix)]
    assert_eq!(mode(&path), 0o600);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["access_token"], access.as_str());
    assert_eq!(v["refresh_token"], refresh.as_deref().unwrap());
    assert_eq!(v["client_id"], PUBLIC_CLIENT);
    assert_eq!(v["expires_at"], expires_at);
    assert_eq!(v["note"], "kept");
    assert!(v.get("client_secret").is_none());
    assert_eq!(store.load().await.unwrap(), creds);

    // A run's preflight with the stored credential passes.
    let client = Client::new(opts(&sim, ACCOUNT), Arc::new(store))
        .await
        .unwrap();
    client.preflight(Object::Tickets, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_clients_and_client_credentials() {
    let sim = sim().await;
    // Authorization code with a confidential client (secret sent with the code).
    let creds = flow(
        &confidential_app(&sim, DEFAULT_CLIENT_SECRET),
        "read write",
        str::to_string,
    )
    .await
    .unwrap();
    match &creds {
        Credentials::OAuth {
            client_id,
            client_secret,
            ..
        } => {
            assert_eq!(client_id.as_deref(), Some(DEFAULT_CLIENT_ID));
            assert_eq!(
                client_secret.as_ref().map(Secret::expose),
                Some(DEFAULT_CLIENT_SECRET)
            );
        }
        other => panic!("{other:?}"),
    }
    // A wrong secret is refused at the exchange, and the message never carries it.
    let err = flow(
        &confidential_app(&sim, "wrong-secret-123"),
        "read write",
        str::to_string,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::ClientRefused { .. }), "{err:?}");
    assert!(err.to_string().contains("--client-id"), "{err}");
    assert!(!err.to_string().contains("wrong-secret-123"));

    // client_credentials: no browser, no refresh token, acts as the admin.
    let cc = connect::client_credentials(
        &confidential_app(&sim, DEFAULT_CLIENT_SECRET),
        connect::SYNC_SCOPES,
        Some(3600),
    )
    .await
    .unwrap();
    let (_, refresh, expires_at) = oauth_parts(&cc);
    assert!(refresh.is_none());
    assert!(expires_at.unwrap() > unix_now() + 3500);
    let report = connect::verify(opts(&sim, ACCOUNT), cc.clone(), "cc")
        .await
        .unwrap();
    assert_eq!(report.who.email.as_deref(), Some(ADMIN_EMAIL));
    assert!(report.can_write(Object::Tickets));
    // A headless set-up keeps working past the token's life: with no refresh token, the client
    // grants a new token the same way and stores it.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileCredentials::new(dir.path().join("cc.json")));
    store.save(&cc).await.unwrap();
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cc.json")).unwrap()).unwrap();
    assert_eq!(stored["grant_scope"], connect::SYNC_SCOPES);
    let (access, _, _) = oauth_parts(&cc);
    assert!(sim.expire_token(ACCOUNT, &access));
    let client = Client::new(opts(&sim, ACCOUNT), store.clone())
        .await
        .unwrap();
    client.preflight(Object::Tickets, true).await.unwrap();
    assert_eq!(client.stats().token_refreshes, 1);
    let renewed = store.load().await.unwrap();
    let (access2, refresh2, _) = oauth_parts(&renewed);
    assert_ne!(access2, access);
    assert!(refresh2.is_none());
    assert!(matches!(
        &renewed,
        Credentials::OAuth { grant_scope: Some(g), .. } if g == connect::SYNC_SCOPES
    ));

    // A public client cannot use it.
    let mut public = public_app(&sim);
    public.client_secret = Some(Secret::new("anything"));
    let err = connect::client_credentials(&public, "read", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::NotConfidential { .. }),
        "{err:?}"
    );
    let err = connect::client_credentials(&public_app(&sim), "read", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("confidential"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_state_is_refused_and_no_code_is_exchanged() {
    let sim = sim().await;
    let err = flow(&public_app(&sim), connect::SYNC_SCOPES, |url| {
        let at = url.find("state=").unwrap() + "state=".len();
        format!("{}forged{}", &url[..at], &url[at..])
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::StateMismatch), "{err:?}");
    assert!(err.to_string().contains("nothing was stored"), "{err}");
    assert_eq!(token_grants(&sim), 0, "no exchange after a wrong state");
}

/// Runs the browser part by hand and returns (code, pkce, redirect URI) for the exchange.
async fn code_for(app: &OAuthApp, scopes: &str) -> (Secret, Pkce, String) {
    let lb = Loopback::bind(0).await.unwrap();
    let pkce = Pkce::generate();
    let state = connect::new_state();
    let url = connect::authorization_url(app, lb.redirect_uri(), scopes, &state, &pkce);
    let browser = tokio::spawn(browse(url));
    let code = lb.receive(&state, WAIT).await.unwrap();
    assert_eq!(browser.await.unwrap(), Ok(200), "the browser gets a page");
    (code, pkce, lb.redirect_uri().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_expire_after_two_minutes_and_are_single_use() {
    let sim = sim().await;
    let app = public_app(&sim);
    // 119 s later the code still works.
    let (code, pkce, redirect) = code_for(&app, "read").await;
    sim.advance_clock(Duration::from_secs(119));
    connect::exchange_code(&app, &code, &redirect, &pkce)
        .await
        .expect("a code is good for two minutes");
    // Used once: a second exchange fails.
    let err = connect::exchange_code(&app, &code, &redirect, &pkce)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");

    // 121 s later it has expired, and the message says how long codes last.
    let (code, pkce, redirect) = code_for(&app, "read").await;
    sim.advance_clock(Duration::from_secs(121));
    let err = connect::exchange_code(&app, &code, &redirect, &pkce)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("about two minutes"), "{text}");
    assert!(!text.contains(code.expose()));

    // The simulator's code lifetime is a setting: 0 makes the whole flow hit an expired code.
    sim.update_settings(ACCOUNT, |s| s.oauth_code_ttl_secs = 0);
    let err = flow(&app, "read", str::to_string).await.unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pkce_mismatch_and_redirect_mismatch_are_refused() {
    let sim = sim().await;
    let app = public_app(&sim);
    let (code, pkce, redirect) = code_for(&app, "read").await;
    let other = Pkce::generate();
    let err = connect::exchange_code(&app, &code, &redirect, &other)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("code_verifier"), "{text}");
    assert!(!text.contains(other.verifier().expose()) && !text.contains(code.expose()));
    // The failed attempt used the code up: the right verifier no longer helps.
    let err = connect::exchange_code(&app, &code, &redirect, &pkce)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");

    let (code, pkce, _) = code_for(&app, "read").await;
    let err = connect::exchange_code(&app, &code, "http://127.0.0.1:1/callback", &pkce)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::CodeRefused { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_consent_and_refused_requests() {
    let sim = sim().await;
    sim.update_settings(ACCOUNT, |s| s.oauth_consent = Consent::Deny);
    let err = flow(&public_app(&sim), connect::SYNC_SCOPES, str::to_string)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ConnectError::Denied(_)), "{err:?}");
    assert!(
        text.contains("access_denied") && text.contains("click Allow"),
        "{text}"
    );
    assert_eq!(token_grants(&sim), 0);

    sim.update_settings(ACCOUNT, |s| s.oauth_consent = Consent::Approve);
    // An unknown scope comes back as an error redirect.
    let err = flow(&public_app(&sim), "read bogus:write", str::to_string)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid_scope"), "{err}");
    // An unknown client is refused on the Zendesk page (no redirect): the flow waits, then
    // times out with the fix.
    let mut unknown = public_app(&sim);
    unknown.client_id = "nope".into();
    let status = Arc::new(std::sync::Mutex::new(None));
    let seen = status.clone();
    let err = connect::authorize(&unknown, "read", 0, Duration::from_millis(800), |url| {
        let url = url.to_string();
        tokio::spawn(async move {
            *seen.lock().unwrap() = Some(browse(url).await);
        });
    })
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::Timeout { .. }), "{err:?}");
    assert_eq!(*status.lock().unwrap(), Some(Ok(400)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_scope_shows_in_the_check_and_stops_a_run() {
    let sim = sim().await;
    let creds = flow(&public_app(&sim), "read users:write", str::to_string)
        .await
        .unwrap();
    let report = connect::verify(opts(&sim, ACCOUNT), creds.clone(), "t")
        .await
        .unwrap();
    assert!(report.can_write(Object::Users));
    assert!(!report.can_write(Object::Organizations));
    let tickets = report
        .writable
        .iter()
        .find(|(o, _)| *o == Object::Tickets)
        .unwrap();
    match &tickets.1 {
        Err(ZendeskError::MissingScope { scope, .. }) => assert_eq!(scope, "tickets:write"),
        other => panic!("{other:?}"),
    }
    // The same message a run stops with.
    let client = Client::new(
        opts(&sim, ACCOUNT),
        Arc::new(zdsync::zendesk::MemoryCredentials::new(creds.clone(), "t")),
    )
    .await
    .unwrap();
    let err = client.preflight(Object::Tickets, true).await.unwrap_err();
    assert_eq!(err.to_string(), tickets.1.as_ref().unwrap_err().to_string());
    assert!(err.to_string().contains("zdsync connect"), "{err}");
    // And the simulator enforces it: a ticket write is refused with 403.
    let (access, _, _) = oauth_parts(&creds);
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v2/tickets.json", sim.account_url(ACCOUNT)))
        .bearer_auth(access)
        .json(&serde_json::json!({"ticket": {"subject": "x", "comment": {"body": "y"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_checked_before_they_are_stored() {
    let sim = sim().await;
    let token = |email: &str, t: &str| Credentials::ApiToken {
        email: email.into(),
        token: Secret::new(t),
    };
    let ok = connect::verify(
        opts(&sim, ACCOUNT),
        token(ADMIN_EMAIL, DEFAULT_API_TOKEN),
        "the API token being connected",
    )
    .await
    .unwrap();
    assert_eq!(ok.who.role, "admin");
    assert!(ok.who.scopes.is_none());
    assert!(ok.can_write(Object::Tickets));

    // A bad token, and a password typed where the token goes: the run's message, which says
    // an API token is not the password.
    for secret in ["not-the-token-9f8e", "Summer2024!"] {
        let err = connect::verify(
            opts(&sim, ACCOUNT),
            token(ADMIN_EMAIL, secret),
            "the API token being connected",
        )
        .await
        .unwrap_err();
        assert_eq!(err.error_name(), ErrorName::AuthFailed);
        let text = err.to_string();
        assert!(
            text.contains("an API token is not the account password"),
            "{text}"
        );
        assert!(!text.contains(secret), "{text}");
    }
    // A valid token with an agent's email: refused (a sync needs an admin).
    let err = connect::verify(
        opts(&sim, ACCOUNT),
        token(AGENT_EMAIL, DEFAULT_API_TOKEN),
        "t",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("needs an admin"), "{err}");
    // A wrong subdomain.
    let err = connect::verify(
        opts(&sim, "acmee"),
        token(ADMIN_EMAIL, DEFAULT_API_TOKEN),
        "t",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ZendeskError::SubdomainNotFound { subdomain } if subdomain == "acmee"),
        "{err:?}"
    );
    assert!(err.to_string().contains("enter \"mycompany\""), "{err}");
    // ... and the OAuth exchange on a wrong subdomain says the same.
    let app = OAuthApp::new(&opts(&sim, "acmee"), PUBLIC_CLIENT, None);
    let err = connect::exchange_code(
        &app,
        &Secret::new("code"),
        "http://127.0.0.1:1/callback",
        &Pkce::generate(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Zendesk(ZendeskError::SubdomainNotFound { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_refresh_tokens_are_written_back_to_the_file() {
    let sim = sim().await;
    let creds = flow(&public_app(&sim), connect::SYNC_SCOPES, str::to_string)
        .await
        .unwrap();
    let (access, refresh, _) = oauth_parts(&creds);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acme.json");
    let store = Arc::new(FileCredentials::new(&path));
    store.save(&creds).await.unwrap();

    // The access token expires; the next run refreshes and writes the new pair back.
    assert!(sim.expire_token(ACCOUNT, &access));
    let client = Client::new(opts(&sim, ACCOUNT), store.clone())
        .await
        .unwrap();
    client.preflight(Object::Users, true).await.unwrap();
    assert_eq!(client.stats().token_refreshes, 1);
    let (access2, refresh2, _) = oauth_parts(&store.load().await.unwrap());
    assert_ne!(access2, access);
    assert_ne!(refresh2, refresh);
    #[cfg(unix)]
    assert_eq!(mode(&path), 0o600);
    // The old refresh token no longer works; a fresh process with the file does.
    let fresh = Client::new(opts(&sim, ACCOUNT), store.clone())
        .await
        .unwrap();
    assert!(sim.expire_token(ACCOUNT, &access2));
    fresh.preflight(Object::Users, true).await.unwrap();
    let (_, refresh3, _) = oauth_parts(&store.load().await.unwrap());
    assert_ne!(refresh3, refresh2);
}
