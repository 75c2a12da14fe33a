//! The troubleshooting cases, end to end: each stops the run before anything is written to
//! Zendesk, with a named error whose message says what to fix, and (past the lock) a failed run
//! record. And no credential ever shows up in logs, errors, run records or the bucket.

use std::time::Duration;
use zdsync::errors::ErrorName;
use zdsync::lock::{host_name, LockInfo};
use zdsync::run::{RunOutcome, RunStatus};
use zdsync_sim::SimConfig;
use zdsync_tests::{
    endpoint_delta, fast_run_options, parse_config, run_parsed, sync_toml, write_file,
    write_requests, E2e, ADMIN_EMAIL,
};

const USER_MAPPING: &str = r#"name = "FULL_NAME"
email = "EMAIL"
"user_fields.plan" = { column = "PLAN", type = "dropdown" }"#;

const ORG_MAPPING: &str = r#"name = "NAME"
notes = "NOTES""#;

const TICKET_MAPPING: &str = r#"subject = "SUBJECT"
description = "DESCRIPTION""#;

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

fn tickets_csv(n: usize) -> String {
    let mut s = String::from("TICKET_ID,SUBJECT,DESCRIPTION\n");
    for i in 0..n {
        s.push_str(&format!("t-{i:04},Ticket {i},Body {i}\n"));
    }
    s
}

/// The run stopped with `name` before writing anything, its message names each of `says`,
/// and the failed run record (returned: the record's error text) is in the bucket.
fn assert_failed_before_writes(
    e: &E2e,
    outcome: &RunOutcome,
    name: ErrorName,
    says: &[&str],
) -> String {
    let err = outcome
        .error
        .as_ref()
        .unwrap_or_else(|| panic!("expected {name}, the run succeeded: {:#?}", outcome.records));
    let msg = err.to_string();
    assert_eq!(err.error_name(), name, "{msg}");
    for s in says {
        assert!(msg.contains(s), "`{s}` not in: {msg}");
    }
    let c = e.counters();
    assert_eq!(
        write_requests(&c),
        0,
        "written before failing: {:?}",
        endpoint_delta(&Default::default(), &c)
    );
    assert_eq!(c.jobs_created, 0);
    let state = e.state();
    assert!(
        state.users.iter().all(|u| u["role"] != "end-user"),
        "only staff"
    );
    assert!(state.organizations.is_empty() && state.tickets.is_empty());

    assert_eq!(outcome.records.len(), 1, "{:#?}", outcome.records);
    let rec = &outcome.records[0];
    assert_eq!(rec.status, RunStatus::Failed);
    let info = rec.error.as_ref().expect("the record names the error");
    assert_eq!(info.name, name.as_str());
    assert_eq!(info.message, msg);
    assert_eq!((rec.rows.created, rec.rows.updated), (0, 0));
    let saved = e
        .root()
        .join(format!("runs/{}/{}/run.json", rec.sync, rec.run_id));
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(saved["status"], "failed");
    assert_eq!(saved["error"]["name"], name.as_str());
    assert!(e
        .root()
        .join(format!("history/{}/{}.json", rec.sync, rec.run_id))
        .exists());
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_token_fails_before_any_write() {
    let e = E2e::start().await;
    e.write_api_token_creds("my-zendesk-password");
    e.write_export("e_users", &users_csv(120));
    let toml = e.toml("e_users", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let msg = assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::AuthFailed,
        &[
            "Zendesk refused the email and API token",
            "an API token is not the account password",
            &format!("`{ADMIN_EMAIL}` is the email of an admin"),
            "creds.json",
        ],
    );
    assert!(!msg.contains("my-zendesk-password"), "{msg}");
    assert!(e.counters().auth_failures >= 1);
    // Nothing past the preflight: no field definitions, no plan.
    assert_eq!(e.counters().endpoint("user_fields.list"), 0);
    assert!(!e.root().join("state/e_users").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_of_an_agent_is_refused_before_any_write() {
    let mut cfg = SimConfig::default();
    cfg.accounts[0].agents.push(zdsync_sim::StaffConfig {
        email: "agent@acme.test".into(),
        name: "Agent".into(),
        role: "agent".into(),
    });
    let e = E2e::with_config(cfg).await;
    write_file(
        e.root(),
        "creds.json",
        &serde_json::json!({"email": "agent@acme.test", "api_token": zdsync_sim::DEFAULT_API_TOKEN})
            .to_string(),
    );
    e.write_export("e_agent", &orgs_csv(30));
    let toml = e.toml("e_agent", "organizations", "upsert", "ORG_ID", ORG_MAPPING);
    let outcome = e.run(&toml).await;
    // A role problem is reported under the 403 family's name.
    assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::MissingScope,
        &[
            "`agent@acme.test` is a Zendesk agent and zdsync needs an admin",
            "use an admin's email with the API token",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_oauth_token_without_refresh_token_says_reconnect() {
    let e = E2e::start().await;
    let token = e.use_minted_token(&["read", "write"]);
    assert!(e.sim.expire_token("acme", &token.access_token));
    e.write_export("e_exp", &users_csv(30));
    let toml = e.toml("e_exp", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let msg = assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::AuthFailed,
        &[
            "the OAuth token was refused (expired or revoked)",
            "reconnect with `zdsync connect`",
        ],
    );
    assert!(!msg.contains(&token.access_token));
    assert_eq!(
        e.counters().endpoint("oauth.tokens"),
        0,
        "nothing to refresh with"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_credentials_file_fails_before_any_request() {
    let e = E2e::start().await;
    std::fs::remove_file(e.root().join("creds.json")).unwrap();
    e.write_export("e_nocreds", &users_csv(10));
    let toml = e.toml("e_nocreds", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let err = outcome.error.as_ref().expect("refused");
    assert_eq!(err.error_name(), ErrorName::AuthFailed, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("creds.json") && msg.contains("not found") && msg.contains("zdsync connect"),
        "{msg}"
    );
    assert_eq!(e.counters().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subdomain_says_what_to_enter() {
    let e = E2e::start().await;
    e.write_export("e_sub", &users_csv(50));
    let toml = sync_toml(
        "e_sub",
        "users",
        "upsert",
        "USER_ID",
        &e.sim.account_url("nope"),
        USER_MAPPING,
    );
    let outcome = e.run(&toml).await;
    assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::SubdomainNotFound,
        &[
            "no Zendesk account at `nope.zendesk.com`",
            "check `subdomain` in [zendesk]",
            "for https://mycompany.zendesk.com enter \"mycompany\"",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_token_without_tickets_write_fails_with_missing_scope() {
    let e = E2e::start().await;
    let token = e.use_minted_token(&["read", "users:write"]);
    e.write_export("e_tix", &tickets_csv(40));
    let toml = e.toml("e_tix", "tickets", "insert", "TICKET_ID", TICKET_MAPPING);
    let outcome = e.run(&toml).await;
    let msg = assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::MissingScope,
        &["lacks the `tickets:write` scope", "zdsync connect"],
    );
    assert!(!msg.contains(&token.access_token));

    // The same token is enough for a users sync.
    e.write_export("e_users", &users_csv(30));
    let toml = e.toml("e_users", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    assert_eq!(outcome.records[0].rows.created, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_user_import_disabled_stops_at_the_first_bulk_call() {
    let e = E2e::start().await;
    assert!(e
        .sim
        .update_settings("acme", |s| s.bulk_user_import = false));
    e.write_export("e_bulk", &users_csv(260));
    let toml = e.toml("e_bulk", "users", "insert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let err = outcome.error.as_ref().expect("the run fails");
    assert_eq!(err.error_name(), ErrorName::BulkImportDisabled, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("bulk user import is not enabled")
            && msg.contains("ask Zendesk Customer Support"),
        "{msg}"
    );
    let c = e.counters();
    // Refused at the bulk call itself: no user written, no job created, no other write tried.
    assert_eq!(c.jobs_created, 0);
    assert_eq!(e.state().users.len(), 1, "only the admin");
    assert_eq!(
        write_requests(&c),
        c.endpoint("users.create_many"),
        "{:?}",
        c.by_endpoint
    );
    // Batches already in flight (up to the job slots) may each meet the 403.
    let calls = c.endpoint("users.create_many");
    assert!(calls >= 1, "{calls} create_many calls");
    assert_eq!(c.status(403), calls);
    assert_eq!(outcome.records.len(), 1);
    let rec = &outcome.records[0];
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(
        rec.error.as_ref().unwrap().name,
        ErrorName::BulkImportDisabled.as_str()
    );
    assert_eq!(rec.rows.read, 260);
    assert_eq!((rec.rows.created, rec.rows.updated), (0, 0));
    assert_eq!(rec.rows.failed, 260, "every row is left for the next run");

    // Once Zendesk turns it on, the next run creates every row exactly once.
    e.sim.update_settings("acme", |s| s.bulk_user_import = true);
    let outcome = e.run(&toml).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let rec = &outcome.records[0];
    assert_eq!(rec.status, RunStatus::Succeeded);
    assert_eq!((rec.rows.created, rec.rows.retried), (260, 260));
    let state = e.state();
    assert_eq!(state.users.len(), 261);
    for i in 0..260 {
        let u = state.user_by_external_id(&format!("u-{i:04}")).unwrap();
        assert_eq!(u["email"], format!("user{i}@example.com"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_custom_field_key_is_a_config_error() {
    let e = E2e::start().await;
    e.write_export("e_field", &users_csv(20));
    let mapping = r#"name = "FULL_NAME"
email = "EMAIL"
"user_fields.plann" = { column = "PLAN", type = "dropdown" }"#;
    let toml = e.toml("e_field", "users", "upsert", "USER_ID", mapping);
    let outcome = e.run(&toml).await;
    assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::ConfigInvalid,
        &[
            "mapping `user_fields.plann`",
            "no user field with key `plann`",
            "did you mean `plan`?",
        ],
    );
    // Checked against the account's fields, before the export is planned.
    assert_eq!(e.counters().endpoint("user_fields.list"), 1);
    assert!(!e.root().join("state/e_field").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ticket_field_id_is_a_config_error() {
    let e = E2e::start().await;
    e.write_export("e_tfield", &tickets_csv(20));
    let mapping = format!(
        "{TICKET_MAPPING}\n\"custom_fields.424242\" = {{ column = \"SUBJECT\", type = \"text\" }}"
    );
    let toml = e.toml("e_tfield", "tickets", "upsert", "TICKET_ID", &mapping);
    let outcome = e.run(&toml).await;
    assert_failed_before_writes(
        &e,
        &outcome,
        ErrorName::ConfigInvalid,
        &[
            "mapping `custom_fields.424242`",
            "Zendesk has no ticket field with id 424242",
            "Order number",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_user_import_disabled_stops_a_users_upsert_too() {
    let e = E2e::start().await;
    e.sim
        .update_settings("acme", |s| s.bulk_user_import = false);
    e.write_export("e_bulk_up", &users_csv(120));
    let toml = e.toml("e_bulk_up", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let err = outcome.error.as_ref().expect("the run fails");
    assert_eq!(err.error_name(), ErrorName::BulkImportDisabled, "{err}");
    let c = e.counters();
    assert_eq!(c.jobs_created, 0);
    assert_eq!(
        write_requests(&c),
        c.endpoint("users.create_or_update_many")
    );
    assert_eq!(e.state().users.len(), 1);
    let rec = &outcome.records[0];
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(
        rec.error.as_ref().unwrap().name,
        ErrorName::BulkImportDisabled.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_lock_refuses_a_second_run() {
    let e = E2e::start().await;
    e.write_export("e_lock", &users_csv(20));
    let held = LockInfo {
        sync: "e_lock".into(),
        run_id: "20260101T000000Z-held".into(),
        host: host_name(),
        // This very process: alive.
        pid: std::process::id(),
        acquired_at: "2026-01-01T00:00:00Z".into(),
        expires_at: chrono_like_now() + 3600,
        execution: None,
        abandoned: false,
    };
    let lock_path = write_file(
        e.root(),
        "locks/e_lock.json",
        &serde_json::to_string(&held).unwrap(),
    );
    let toml = e.toml("e_lock", "users", "upsert", "USER_ID", USER_MAPPING);
    let outcome = e.run(&toml).await;
    let err = outcome.error.as_ref().expect("refused");
    assert_eq!(err.error_name(), ErrorName::RunLocked, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("sync `e_lock` is already running")
            && msg.contains("20260101T000000Z-held")
            && msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
    // Refused at the lock: no record (the run never started), nothing sent, the lock kept.
    assert!(outcome.records.is_empty());
    assert_eq!(e.counters().requests, 0);
    assert!(!e.root().join("runs/e_lock").exists());
    let kept: LockInfo = serde_json::from_slice(&std::fs::read(&lock_path).unwrap()).unwrap();
    assert_eq!(kept, held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_run_of_the_same_sync_is_refused() {
    let mut cfg = SimConfig::default();
    cfg.jobs.queued_ms = 150;
    cfg.jobs.working_ms = 150;
    let e = E2e::with_config(cfg).await;
    e.write_export("e_conc", &users_csv(150));
    let toml = e.toml("e_conc", "users", "upsert", "USER_ID", USER_MAPPING);
    let mut first_opts = fast_run_options();
    first_opts.run_id = Some("run-first".into());
    let lock = e.root().join("locks/e_conc.json");
    let first = run_parsed(e.root(), parse_config(&toml), &first_opts);
    let second = async {
        // Wait until the first run holds the lock and its jobs are under way.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while e.sim.active_jobs("acme") == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the first run never wrote"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(lock.exists());
        let before = e.counters();
        let outcome = e.run(&toml).await;
        (outcome, before, e.counters())
    };
    let (first, (second, before, after)) = tokio::join!(first, second);
    let err = second.error.as_ref().expect("the second run is refused");
    assert_eq!(err.error_name(), ErrorName::RunLocked, "{err}");
    assert!(err.to_string().contains("run-first"), "{err}");
    assert!(second.records.is_empty());
    // Refused at the lock, before its preflight: the second run sent nothing at all.
    assert_eq!(after.endpoint("users.me"), before.endpoint("users.me"));

    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.records[0].run_id, "run-first");
    assert_eq!(first.records[0].rows.created, 150);
    assert_eq!(e.state().users.len(), 151);
    assert!(!lock.exists(), "released");
}

fn chrono_like_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------------------------
// Secrets
