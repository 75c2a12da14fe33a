//! The `/__sim/` control endpoints, the config file and the binary.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use zdsync_sim::*;

async fn admin(t: &T, method: &str, path: &str, body: Option<Value>) -> Resp {
    t.send_as(&Auth::None, method, path, body).await
}

#[tokio::test]
async fn admin_endpoints() {
    let t = T::new().await;
    assert_eq!(
        admin(&t, "GET", "/__sim/health", None).await.json,
        json!({"ok": true})
    );
    let r = admin(
        &t,
        "POST",
        "/__sim/seed?account=acme",
        Some(
            json!({"users": [{"name": "S", "email": "s@x.io"}], "organizations": [{"name": "O"}]}),
        ),
    )
    .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["users"].as_array().unwrap().len(), 1);
    let r = admin(
        &t,
        "POST",
        "/__sim/seed",
        Some(json!({"users": [{"email": "no-name@x.io"}]})),
    )
    .await;
    assert_eq!(r.status, 400);

    let r = admin(
        &t,
        "POST",
        "/__sim/tokens",
        Some(json!({"scopes": ["users:read"], "expires_in_secs": 100, "refresh": true})),
    )
    .await;
    assert_eq!(r.status, 201);
    let tok = r.json["access_token"].as_str().unwrap().to_string();
    assert!(r.json["refresh_token"].is_string());
    let me = t
        .send_as(&Auth::Bearer(tok.clone()), "GET", "/api/v2/users/me", None)
        .await;
    assert_eq!(me.status, 200);
    admin(
        &t,
        "POST",
        "/__sim/clock",
        Some(json!({"advance_ms": 101_000})),
    )
    .await;
    let me = t
        .send_as(&Auth::Bearer(tok.clone()), "GET", "/api/v2/users/me", None)
        .await;
    assert_eq!(me.json["error_description"], "The access token expired");
    let r = admin(
        &t,
        "POST",
        "/__sim/tokens/revoke",
        Some(json!({"access_token": DEFAULT_ACCESS_TOKEN})),
    )
    .await;
    assert_eq!(r.status, 200);

    let r = admin(&t, "GET", "/__sim/state?account=acme", None).await;
    assert_eq!(r.json["subdomain"], "acme");
    assert_eq!(r.json["users"].as_array().unwrap().len(), 2);
    assert_eq!(r.json["organizations"][0]["name"], "O");

    let r = admin(&t, "GET", "/__sim/counters", None).await;
    assert_eq!(r.json["requests"], 2);
    assert_eq!(r.json["by_endpoint"]["users.me"], 2);
    assert_eq!(r.json["auth_failures"], 1);
    let r = admin(&t, "GET", "/__sim/requests?since=1", None).await;
    assert_eq!(r.json["requests"].as_array().unwrap().len(), 1);
    assert_eq!(r.json["requests"][0]["status"], 401);
    let r = admin(&t, "GET", "/__sim/requests", None).await;
    assert_eq!(r.json["requests"][0]["auth"], "bearer");

    let r = admin(
        &t,
        "PUT",
        "/__sim/faults",
        Some(json!({"rules": [{"kind": "internal_error", "times": 1}]})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(t.get("/api/v2/users/me").await.status, 500);
    assert_eq!(
        admin(&t, "GET", "/__sim/faults", None).await.json["rules"][0]["kind"],
        "internal_error"
    );
    admin(&t, "DELETE", "/__sim/faults", None).await;

    let r = admin(
        &t,
        "PUT",
        "/__sim/settings?account=acme",
        Some(json!({"bulk_user_import": false})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        t.post(
            "/api/v2/users/create_many",
            json!({"users": [{"name": "a"}]})
        )
        .await
        .status,
        403
    );
    let mut rl = admin(&t, "GET", "/__sim/rate_limit", None).await.json;
    rl["rpm"] = json!(1);
    admin(&t, "PUT", "/__sim/rate_limit", Some(rl)).await;
    let mut jobs = admin(&t, "GET", "/__sim/jobs", None).await.json;
    jobs["max_items"] = json!(2);
    admin(&t, "PUT", "/__sim/jobs", Some(jobs)).await;
    let mut b = admin(&t, "GET", "/__sim/behavior", None).await.json;
    b["invalid_dropdown"] = json!("drop");
    assert_eq!(
        admin(&t, "PUT", "/__sim/behavior", Some(b)).await.status,
        200
    );
    assert_eq!(
        admin(&t, "PUT", "/__sim/behavior", Some(json!({"nope": 1})))
            .await
            .status,
        400
    );

    let r = admin(&t, "POST", "/__sim/reset", None).await;
    assert_eq!(r.status, 200);
    let r = admin(&t, "GET", "/__sim/state", None).await;
    assert_eq!(r.json["users"].as_array().unwrap().len(), 1);
    assert_eq!(r.json["settings"]["bulk_user_import"], true);
    assert_eq!(
        admin(&t, "GET", "/__sim/counters", None).await.json["requests"],
        0
    );
    assert_eq!(admin(&t, "GET", "/__sim/nope", None).await.status, 404);
    let r = admin(&t, "GET", "/__sim/accounts", None).await;
    assert_eq!(r.json["default"], "acme");
}

#[tokio::test]
async fn example_config_loads_and_serves() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sim.example.toml");
    let cfg = SimConfig::from_file(&path).expect("example config parses");
    assert_eq!(cfg.accounts.len(), 2);
    let t = T::start(cfg).await;
    let s = t.sim.state("acme").unwrap();
    assert_eq!(s.users.len(), 3);
    assert!(s.user_by_external_id("user-1").is_some());
    assert_eq!(s.tickets_by_external_id("t-1").len(), 1);
    let ro = Auth::Bearer("read-only-token".into());
    let r = t
        .send_as(
            &ro,
            "PUT",
            "/api/v2/tickets/1",
            Some(json!({"ticket": {"status": "open"}})),
        )
        .await;
    assert_eq!(r.status, 403);
    let beta = Auth::Basic("admin@beta.test/token".into(), "beta-token".into());
    let r = t
        .send_as(
            &beta,
            "POST",
            &format!("{}/api/v2/users/create_many", t.sim.account_url("beta")),
            Some(json!({"users": [{"name": "x"}]})),
        )
        .await;
    assert_eq!(r.status, 403);
    // Bad configs are refused.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[accounts]]\nsubdomain = \"a\"\nbogus = 1\n").unwrap();
    assert!(SimConfig::from_file(&bad).is_err());
    let dup = SimConfig {
        accounts: vec![AccountConfig::new("a"), AccountConfig::new("A")],
        ..SimConfig::default()
    };
    assert!(Simulator::start(dup).await.is_err());
}

#[tokio::test]
async fn binary_starts_and_prints_its_url() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zdsync-sim"))
        .args([
            "--bind",
            "127.0.0.1:0",
            "--rpm",
            "50",
            "--job-delay-ms",
            "10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("binary runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{url}/api/v2/users/me.json"))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-rate-limit"], "50");
    let health: Value = http
        .get(format!("{url}/__sim/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["ok"], true);
    child.kill().unwrap();
    child.wait().unwrap();
}
