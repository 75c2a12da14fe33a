//! No credential ever shows up in logs (at TRACE), errors, run records or the bucket. Its own
//! test binary: tracing caches per-callsite interest process-wide, so a capture running beside
//! other tests can miss events.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use zdsync::errors::ErrorName;
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::MintRequest;
use zdsync_tests::{fast_run_options, parse_config, run_parsed, E2e, ADMIN_EMAIL};

const USER_MAPPING: &str = r#"name = "FULL_NAME"
email = "EMAIL"
"user_fields.plan" = { column = "PLAN", type = "dropdown" }"#;

const ORG_MAPPING: &str = r#"name = "NAME"
notes = "NOTES""#;

fn users_csv(n: usize) -> String {
    let mut s = String::from("USER_ID,FULL_NAME,EMAIL,PLAN\n");
    for i in 0..n {
        s.push_str(&format!(
            "u-{i:04},User {i},user{i}@example.com,{}\n",
            ["Free", "Pro", "Enterprise"][i % 3]
        ));
    }
    s
}

fn orgs_csv(n: usize) -> String {
    let mut s = String::from("ORG_ID,NAME,NOTES\n");
    for i in 0..n {
        s.push_str(&format!("o-{i:04},Org {i},note {i}\n"));
    }
    s
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every file under `dir` as text (`.zst` objects decompressed).
fn all_files(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(&path, out);
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let bytes = if path.extension().is_some_and(|x| x == "zst") {
            zstd::decode_all(bytes.as_slice()).unwrap_or(bytes)
        } else {
            bytes
        };
        out.push((
            path.display().to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
}

fn assert_no_secret(what: &str, text: &str, secrets: &[(&str, String)]) {
    for (name, s) in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{name} found in {what}:\n{}",
            &text[text.find(s.as_str()).unwrap().saturating_sub(300)..]
                .chars()
                .take(700)
                .collect::<String>()
        );
    }
}

/// A users sync with the API token, an organizations sync whose OAuth access token has
/// expired (refreshed and rotated mid-run), and two failing runs (wrong API token, dead OAuth
/// pair), all under a TRACE subscriber: no credential appears anywhere.
#[test]
fn no_credential_in_logs_errors_records_or_bucket() {
    let buf = Capture::default();
    let writer = buf.clone();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_target(true)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let _guard = tracing::dispatcher::set_default(&dispatch);
    let d2 = dispatch.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_start(move || {
            // Blocking-pool threads (plan, store I/O) log into the same buffer.
            std::mem::forget(tracing::dispatcher::set_default(&d2));
        })
        .build()
        .unwrap();

    let mut secrets: Vec<(&str, String)> = Vec::new();
    let mut texts: Vec<(String, String)> = Vec::new();
    rt.block_on(async {
        let e = E2e::start().await;
        let creds_dir = tempfile::tempdir().unwrap();
        let creds_path = creds_dir.path().join("oauth.json");
        // Credentials files live outside the bucket folder (which is scanned below).
        let api_path = creds_dir.path().join("api.json");
        std::fs::rename(e.root().join("creds.json"), &api_path).unwrap();
        let creds_at = |toml: String, path: &Path| {
            toml.replace(
                "credentials = \"file:creds.json\"",
                &format!("credentials = \"file:{}\"", path.display()),
            )
        };

        // 1. API token, users upsert.
        e.write_export("s_users", &users_csv(120));
        let toml = creds_at(
            e.toml("s_users", "users", "upsert", "USER_ID", USER_MAPPING),
            &api_path,
        );
        let out = e.run(&toml).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.records[0].rows.created, 120);
        texts.push((
            "run record 1".into(),
            serde_json::to_string(&out.records).unwrap(),
        ));
        texts.push(("outcome 1".into(), format!("{out:?}")));

        // 2. OAuth with refresh: the access token is expired, refreshed and rotated mid-run.
        let minted = e
            .sim
            .mint_token(
                "acme",
                &MintRequest {
                    scopes: vec!["read".into(), "write".into()],
                    refresh: true,
                    ..MintRequest::default()
                },
            )
            .unwrap();
        let refresh = minted.refresh_token.clone().expect("a refresh token");
        std::fs::write(
            &creds_path,
            serde_json::json!({
                "access_token": minted.access_token,
                "refresh_token": refresh,
                "client_id": zdsync_sim::DEFAULT_CLIENT_ID,
                "client_secret": zdsync_sim::DEFAULT_CLIENT_SECRET,
            })
            .to_string(),
        )
        .unwrap();
        assert!(e.sim.expire_token("acme", &minted.access_token));
        e.write_export("s_orgs", &orgs_csv(130));
        let toml = creds_at(
            e.toml("s_orgs", "organizations", "upsert", "ORG_ID", ORG_MAPPING),
            &creds_path,
        );
        let cfg = parse_config(&toml);
        let client = Client::new(
            ClientOptions::from_config(&cfg.zendesk),
            credential_store(&cfg.zendesk.credentials, e.root()).unwrap(),
        )
        .await
        .unwrap();
        texts.push(("client Debug".into(), format!("{client:?}")));
        let out = run_parsed(e.root(), cfg, &fast_run_options()).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let rec = &out.records[0];
        assert_eq!(rec.rows.created, 130);
        assert!(rec.requests.token_refreshes >= 1, "{:?}", rec.requests);
        assert!(e.counters().endpoint("oauth.tokens") >= 1);
        texts.push((
            "run record 2".into(),
            serde_json::to_string(&out.records).unwrap(),
        ));
        texts.push(("outcome 2".into(), format!("{out:?}")));
        // The rotated pair was saved.
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&creds_path).unwrap()).unwrap();
        let (a2, r2) = (
            saved["access_token"].as_str().unwrap().to_string(),
            saved["refresh_token"].as_str().unwrap().to_string(),
        );
        assert_ne!(a2, minted.access_token);
        assert_ne!(r2, refresh);

        // 3. A wrong API token.
        std::fs::write(
            &api_path,
            serde_json::json!({"email": ADMIN_EMAIL, "api_token": "wrong-token-0123456789"})
                .to_string(),
        )
        .unwrap();
        e.write_export("s_bad", &users_csv(10));
        let toml = creds_at(
            e.toml("s_bad", "users", "upsert", "USER_ID", USER_MAPPING),
            &api_path,
        );
        let out = e.run(&toml).await;
        let err = out.error.as_ref().expect("refused");
        assert_eq!(err.error_name(), ErrorName::AuthFailed);
        texts.push(("error 3 Display".into(), err.to_string()));
        texts.push(("error 3 Debug".into(), format!("{err:?}")));
        texts.push((
            "run record 3".into(),
            serde_json::to_string(&out.records).unwrap(),
        ));

        // 4. A dead OAuth pair: the refresh is refused too.
        std::fs::write(
            &creds_path,
            serde_json::json!({
                "access_token": "dead-access-token-0123",
                "refresh_token": "dead-refresh-token-0123",
                "client_id": zdsync_sim::DEFAULT_CLIENT_ID,
                "client_secret": zdsync_sim::DEFAULT_CLIENT_SECRET,
            })
            .to_string(),
        )
        .unwrap();
        let toml = creds_at(
            e.toml("s_dead", "organizations", "upsert", "ORG_ID", ORG_MAPPING),
            &creds_path,
        );
        e.write_export("s_dead", &orgs_csv(10));
        let out = e.run(&toml).await;
        let err = out.error.as_ref().expect("refused");
        assert_eq!(err.error_name(), ErrorName::AuthFailed);
        assert!(
            err.to_string()
                .contains("refreshing the OAuth token failed"),
            "{err}"
        );
        texts.push(("error 4 Display".into(), err.to_string()));
        texts.push(("error 4 Debug".into(), format!("{err:?}")));
        texts.push((
            "run record 4".into(),
            serde_json::to_string(&out.records).unwrap(),
        ));

        all_files(e.root(), &mut texts);
        assert!(texts.iter().any(|(p, _)| p.ends_with("run.json")));
        assert!(texts.iter().any(|(p, _)| p.ends_with(".jsonl.zst")));
        secrets = vec![
            ("API token", zdsync_sim::DEFAULT_API_TOKEN.to_string()),
            (
                "API token header",
                base64_basic(&format!(
                    "{ADMIN_EMAIL}/token:{}",
                    zdsync_sim::DEFAULT_API_TOKEN
                )),
            ),
            ("wrong API token", "wrong-token-0123456789".into()),
            ("OAuth access token", minted.access_token.clone()),
            ("OAuth refresh token", refresh.clone()),
            ("rotated access token", a2),
            ("rotated refresh token", r2),
            ("dead access token", "dead-access-token-0123".into()),
            ("dead refresh token", "dead-refresh-token-0123".into()),
            (
                "client secret",
                zdsync_sim::DEFAULT_CLIENT_SECRET.to_string(),
            ),
        ];
    });
    drop(rt);

    let log = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    // The capture saw the run: requests, the refresh, the failures.
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "nothing captured"
    );
    assert!(log.contains("zendesk request"), "request logs missing");
    assert!(
        log.contains("refreshing it") || log.contains("refreshed"),
        "no refresh logged"
    );
    assert!(!secrets.is_empty());
    assert_no_secret("the TRACE log", &log, &secrets);
    for (what, text) in &texts {
        assert_no_secret(what, text, &secrets);
    }
    let _ = std::io::stderr().flush();
}

fn base64_basic(raw: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(raw)
}
