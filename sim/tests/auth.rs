//! Accounts, routing and authentication over HTTP.

mod common;

use common::*;
use serde_json::json;
use zdsync_sim::*;

#[tokio::test]
async fn api_token_basic_auth_and_me() {
    let t = T::new().await;
    let r = t.get("/api/v2/users/me.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["user"]["email"], ADMIN);
    assert_eq!(r.json["user"]["role"], "admin");
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(r.header("x-rate-limit"), Some("1000000"));
    assert!(r.header("x-rate-limit-remaining").is_some());
    // `.json` is optional.
    let r2 = t.get("/api/v2/users/me").await;
    assert_eq!(r2.json["user"]["id"], r.json["user"]["id"]);
    let c = t.sim.counters();
    assert_eq!(c.endpoint("users.me"), 2);
    let log = t.sim.request_log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].auth, "basic");
    assert_eq!(log[0].account.as_deref(), Some("acme"));
}

#[tokio::test]
async fn bad_credentials_are_401_with_exact_body() {
    let t = T::new().await;
    for auth in [
        Auth::Basic(format!("{ADMIN}/token"), "wrong".into()),
        Auth::Basic(ADMIN.into(), DEFAULT_API_TOKEN.into()), // password-style, unsupported
        Auth::Basic("nobody@acme.test/token".into(), DEFAULT_API_TOKEN.into()),
        Auth::None,
    ] {
        let r = t.send_as(&auth, "GET", "/api/v2/users/me.json", None).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.text, r#"{"error":"Couldn't authenticate you"}"#);
        assert_eq!(r.text.len(), 37);
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=UTF-8")
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Basic realm="Web Password""#)
        );
        assert!(r.header("x-rate-limit").is_some());
    }
    assert_eq!(t.sim.counters().auth_failures, 4);
}

#[tokio::test]
async fn bearer_tokens_invalid_expired_revoked() {
    let t = T::new().await;
    let ok = Auth::Bearer(DEFAULT_ACCESS_TOKEN.into());
    assert_eq!(
        t.send_as(&ok, "GET", "/api/v2/users/me", None).await.status,
        200
    );

    let r = t
        .send_as(
            &Auth::Bearer("nope".into()),
            "GET",
            "/api/v2/users/me",
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json,
        json!({"error": "invalid_token", "error_description": "The access token is invalid"})
    );
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains(r#"error="invalid_token""#));

    let m = t
        .sim
        .mint_token(
            "acme",
            &MintRequest {
                expires_in_secs: Some(60),
                ..Default::default()
            },
        )
        .unwrap();
    let auth = Auth::Bearer(m.access_token.clone());
    assert_eq!(
        t.send_as(&auth, "GET", "/api/v2/users/me", None)
            .await
            .status,
        200
    );
    t.sim.advance_clock(std::time::Duration::from_secs(61));
    let r = t.send_as(&auth, "GET", "/api/v2/users/me", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json["error_description"], "The access token expired");

    let m2 = t.sim.mint_token("acme", &MintRequest::default()).unwrap();
    assert!(t.sim.revoke_token("acme", &m2.access_token));
    let r = t
        .send_as(
            &Auth::Bearer(m2.access_token),
            "GET",
            "/api/v2/users/me",
            None,
        )
        .await;
    assert_eq!(r.json["error_description"], "The access token was revoked");
}

#[tokio::test]
async fn missing_and_invalid_scopes_are_403() {
    let t = T::new().await;
    let m = t
        .sim
        .mint_token(
            "acme",
            &MintRequest {
                scopes: vec!["read".into(), "users:write".into()],
                ..Default::default()
            },
        )
        .unwrap();
    let auth = Auth::Bearer(m.access_token);
    let r = t
        .send_as(
            &auth,
            "POST",
            "/api/v2/tickets.json",
            Some(json!({"ticket": {"comment": {"body": "x"}}})),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json,
        json!({"error": "Forbidden", "description": "You are missing the following required scopes: tickets:write"})
    );
    // users:write is enough for users; read covers GETs.
    let r = t
        .send_as(
            &auth,
            "POST",
            "/api/v2/users.json",
            Some(json!({"user": {"name": "A"}})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        t.send_as(&auth, "GET", "/api/v2/tickets.json", None)
            .await
            .status,
        200
    );

    // An unknown scope yields a token that is refused everywhere.
    let bad = t
        .sim
        .mint_token(
            "acme",
            &MintRequest {
                scopes: vec!["read".into(), "bogus".into()],
                ..Default::default()
            },
        )
        .unwrap();
    let r = t
        .send_as(
            &Auth::Bearer(bad.access_token),
            "GET",
            "/api/v2/users.json",
            None,
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json["description"],
        "You are missing the following required scopes: users:read"
    );
}

#[tokio::test]
async fn unknown_subdomain_is_404_no_help_desk() {
    let t = T::new().await;
    let r = t
        .get(&format!(
            "{}/api/v2/users/me.json",
            t.sim.account_url("nope")
        ))
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json["error"]["title"], "No help desk at nope.zendesk.com");
    assert!(r.json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("claim"));

    // Host-based routing.
    let client = reqwest::Client::builder()
        .resolve("nope.zendesk.com", t.sim.addr())
        .resolve("acme.zendesk.com", t.sim.addr())
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/api/v2/users/me.json", t.sim.host_url("nope")))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["title"], "No help desk at nope.zendesk.com");
    let r = client
        .get(format!("{}/api/v2/users/me.json", t.sim.host_url("acme")))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["user"]["url"]
        .as_str()
        .unwrap()
        .starts_with("http://acme.zendesk.com:"));
}

#[tokio::test]
async fn accounts_are_isolated() {
    let mut cfg = SimConfig::default();
    let mut b = AccountConfig::new("beta");
    b.api_tokens = vec!["beta-token".into()];
    cfg.accounts.push(b);
    let t = T::start(cfg).await;
    let beta = t.sim.account_url("beta");
    let beta_auth = Auth::Basic("admin@beta.test/token".into(), "beta-token".into());
    let r = t
        .send_as(
            &beta_auth,
            "POST",
            &format!("{beta}/api/v2/users.json"),
            Some(json!({"user": {"name": "B", "email": "b@x.io"}})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r
        .header("location")
        .unwrap()
        .starts_with(&format!("{beta}/api/v2/users/")));
    // acme credentials do not work on beta, and beta's user is not in acme.
    let r = t.get(&format!("{beta}/api/v2/users/me.json")).await;
    assert_eq!(r.status, 401);
    assert!(t
        .sim
        .state("acme")
        .unwrap()
        .user_by_email("b@x.io")
        .is_none());
    assert!(t
        .sim
        .state("beta")
        .unwrap()
        .user_by_email("b@x.io")
        .is_some());
    assert_eq!(t.sim.account_counters("beta").unwrap().requests, 2);
}

#[tokio::test]
async fn refresh_token_rotation() {
    let t = T::new().await;
    let grant = |rt: &str| json!({"grant_type": "refresh_token", "refresh_token": rt, "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET});
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(DEFAULT_REFRESH_TOKEN)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["token_type"], "bearer");
    assert_eq!(r.json["scope"], "read write");
    assert_eq!(r.json["expires_in"], 1800);
    assert_eq!(r.json["refresh_token_expires_in"], 2_592_000);
    let access = r.json["access_token"].as_str().unwrap().to_string();
    let refresh = r.json["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(refresh, DEFAULT_REFRESH_TOKEN);

    // Old pair is dead.
    let old = t
        .send_as(
            &Auth::Bearer(DEFAULT_ACCESS_TOKEN.into()),
            "GET",
            "/api/v2/users/me",
            None,
        )
        .await;
    assert_eq!(old.status, 401);
    assert_eq!(old.json["error"], "invalid_token");
    let again = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(DEFAULT_REFRESH_TOKEN)),
        )
        .await;
    assert_eq!(again.status, 400);
    assert_eq!(again.json["error"], "invalid_grant");

    // New access token works and introspects.
    let r = t
        .send_as(
            &Auth::Bearer(access.clone()),
            "GET",
            "/api/v2/oauth/tokens/current.json",
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["token"]["token"], access[..10]);
    assert_eq!(r.json["token"]["scopes"], json!(["read", "write"]));
    assert!(r.json["token"]["expires_at"]
        .as_str()
        .unwrap()
        .ends_with('Z'));

    // Bad client secret, unknown grant, bad TTL.
    let mut bad = grant(&refresh);
    bad["client_secret"] = json!("wrong");
    let r = t
        .send_as(&Auth::None, "POST", "/oauth/tokens", Some(bad))
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json["error"], "invalid_client");
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(json!({"grant_type": "password"})),
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let mut ttl = grant(&refresh);
    ttl["expires_in"] = json!(60);
    let r = t
        .send_as(&Auth::None, "POST", "/oauth/tokens", Some(ttl))
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // The rotated refresh token still works (the failed calls did not consume it).
    let r = t
        .send_as(&Auth::None, "POST", "/oauth/tokens", Some(grant(&refresh)))
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn client_credentials_grant() {
    let t = T::new().await;
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(json!({"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET, "scope": "users:read"})),
        )
        .await;
    assert_eq!(r.status, 201);
    assert!(r.json.get("refresh_token").is_none());
    let auth = Auth::Bearer(r.json["access_token"].as_str().unwrap().into());
    let me = t.send_as(&auth, "GET", "/api/v2/users/me", None).await;
    assert_eq!(me.json["user"]["email"], ADMIN);
    let w = t
        .send_as(
            &auth,
            "POST",
            "/api/v2/users",
            Some(json!({"user": {"name": "x"}})),
        )
        .await;
    assert_eq!(w.status, 403);
}

#[tokio::test]
async fn bulk_import_disabled_and_role_limits() {
    let mut cfg = SimConfig::default();
    cfg.accounts[0].bulk_user_import = false;
    cfg.accounts[0].agents.push(StaffConfig {
        email: "agent@acme.test".into(),
        name: "Agent".into(),
        role: "agent".into(),
    });
    let t = T::start(cfg).await;
    for path in [
        "/api/v2/users/create_many.json",
        "/api/v2/users/create_or_update_many.json",
    ] {
        let r = t.post(path, json!({"users": [{"name": "a"}]})).await;
        assert_eq!(r.status, 403);
        assert_eq!(r.json["error"], "Forbidden");
        assert!(r.json["description"]
            .as_str()
            .unwrap()
            .contains("Bulk user import"));
    }
    // Organizations are not affected.
    let r = t
        .post(
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "o"}]}),
        )
        .await;
    assert_eq!(r.status, 200);
    t.sim.update_settings("acme", |s| s.bulk_user_import = true);
    let r = t
        .post(
            "/api/v2/users/create_many",
            json!({"users": [{"name": "a"}]}),
        )
        .await;
    assert_eq!(r.status, 200);

    let agent = Auth::Basic("agent@acme.test/token".into(), DEFAULT_API_TOKEN.into());
    let me = t.send_as(&agent, "GET", "/api/v2/users/me", None).await;
    assert_eq!(me.json["user"]["role"], "agent");
    let r = t
        .send_as(&agent, "DELETE", "/api/v2/users/destroy_many?ids=1", None)
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json["error"]["title"], "Forbidden");
}

#[tokio::test]
async fn unknown_endpoint_and_bad_json() {
    let t = T::new().await;
    let r = t.get("/api/v2/nothing_here.json").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json,
        json!({"error": "InvalidEndpoint", "description": "Not found"})
    );
    let r = t.get("/api/v2/users/abc.json").await;
    assert_eq!(
        r.json,
        json!({"error": "RecordNotFound", "description": "Not found"})
    );
    let r = t
        .http
        .post(t.url("/api/v2/users.json"))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn localhost_host_routing_and_default_account() {
    let mut cfg = SimConfig::default();
    cfg.accounts.push(AccountConfig::new("beta"));
    cfg.default_account = Some("beta".into());
    let t = T::start(cfg).await;
    let port = t.sim.addr().port();
    let client = reqwest::Client::builder()
        .resolve("acme.localhost", t.sim.addr())
        .build()
        .unwrap();
    let r = client
        .get(format!("http://acme.localhost:{port}/api/v2/users/me.json"))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The plain base URL now serves beta, so acme's credentials fail there.
    assert_eq!(t.get("/api/v2/users/me.json").await.status, 401);
    let beta = Auth::Basic("admin@beta.test/token".into(), DEFAULT_API_TOKEN.into());
    let r = t.send_as(&beta, "GET", "/api/v2/users/me.json", None).await;
    assert_eq!(r.json["user"]["email"], "admin@beta.test");
    // Token introspection needs a bearer token.
    assert_eq!(
        t.send_as(&beta, "GET", "/api/v2/oauth/tokens/current", None)
            .await
            .status,
        404
    );
    assert_eq!(t.sim.counters().requests, 4);
}

#[tokio::test]
async fn token_endpoint_takes_form_bodies_and_basic_client_auth() {
    let t = T::new().await;
    let r = t
        .http
        .post(t.url("/oauth/tokens"))
        .basic_auth(DEFAULT_CLIENT_ID, Some(DEFAULT_CLIENT_SECRET))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=refresh_token&refresh_token={DEFAULT_REFRESH_TOKEN}&expires_in=3600"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 3600);
    let r = t
        .send_as(&Auth::None, "POST", "/oauth/tokens", Some(json!({})))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"], "invalid_request");
}

/// `GET /oauth/authorizations/new` without following the redirect: (status, Location, body).
async fn authorize(t: &T, query: &[(&str, &str)]) -> (u16, String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut url = reqwest::Url::parse(&t.url("/oauth/authorizations/new")).unwrap();
    url.query_pairs_mut().extend_pairs(query);
    let r = http.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, location, r.text().await.unwrap())
}

fn query_param(url: &str, key: &str) -> Option<String> {
    let q = url.split_once('?')?.1;
    form_urlencoded_pairs(q)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn form_urlencoded_pairs(q: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn authorization_code_flow_with_pkce() {
    let t = T::new().await;
    let verifier = "a-verifier-that-is-long-enough-for-pkce-0123456789abcdefghijklmnop";
    let challenge = s256(verifier);
    let redirect = "http://127.0.0.1:4567/callback";
    let base = [
        ("response_type", "code"),
        ("client_id", DEFAULT_CLIENT_ID),
        ("redirect_uri", redirect),
        ("scope", "read tickets:write"),
        ("state", "xyz"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let (status, location, _) = authorize(&t, &base).await;
    assert_eq!(status, 302);
    assert!(
        location.starts_with(&format!("{redirect}?code=")),
        "{location}"
    );
    assert_eq!(query_param(&location, "state").as_deref(), Some("xyz"));
    let code = query_param(&location, "code").unwrap();
    let grant = |code: &str, verifier: &str| {
        json!({"grant_type": "authorization_code", "code": code, "client_id": DEFAULT_CLIENT_ID,
               "client_secret": DEFAULT_CLIENT_SECRET, "redirect_uri": redirect, "code_verifier": verifier})
    };
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(&code, verifier)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["scope"], "read tickets:write");
    assert!(r.json["refresh_token"].is_string());
    let bearer = Auth::Bearer(r.json["access_token"].as_str().unwrap().into());
    let cur = t
        .send_as(&bearer, "GET", "/api/v2/oauth/tokens/current", None)
        .await;
    assert_eq!(
        cur.json["token"]["scopes"],
        json!(["read", "tickets:write"])
    );
    // Single use.
    let again = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(&code, verifier)),
        )
        .await;
    assert_eq!(
        (again.status, again.json["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // A wrong verifier.
    let (_, location, _) = authorize(&t, &base).await;
    let code = query_param(&location, "code").unwrap();
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(&code, "wrong")),
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // Expired after 120 s on the simulator clock.
    let (_, location, _) = authorize(&t, &base).await;
    let code = query_param(&location, "code").unwrap();
    t.sim.advance_clock(std::time::Duration::from_secs(120));
    let r = t
        .send_as(
            &Auth::None,
            "POST",
            "/oauth/tokens",
            Some(grant(&code, verifier)),
        )
        .await;
    assert_eq!(
        (r.status, r.json["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // Refused without a redirect: unknown client, unregistered redirect URI.
    let mut q = base.to_vec();
    q[1] = ("client_id", "nope");
    let (status, location, body) = authorize(&t, &q).await;
    assert_eq!((status, location.as_str()), (400, ""));
    assert!(body.contains("nope"), "{body}");
    let mut q = base.to_vec();
    q[2] = ("redirect_uri", "https://evil.example/callback");
    let (status, location, _) = authorize(&t, &q).await;
    assert_eq!((status, location.as_str()), (400, ""));
    // Errors the client must see come back on the redirect, with the state.
    let mut q = base.to_vec();
    q[6] = ("code_challenge_method", "plain");
    let (status, location, _) = authorize(&t, &q).await;
    assert_eq!(status, 302);
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query_param(&location, "state").as_deref(), Some("xyz"));
    t.sim
        .update_settings("acme", |s| s.oauth_consent = Consent::Deny);
    let (_, location, _) = authorize(&t, &base).await;
    assert_eq!(
        query_param(&location, "error").as_deref(),
        Some("access_denied")
    );
    assert!(query_param(&location, "code").is_none());
}
