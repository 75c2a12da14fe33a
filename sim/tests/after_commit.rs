//! Faults that strike after the work is committed: the request is processed (records written,
//! jobs queued and run) and only then does the answer become a 500 / 502 / 503 / 504, a delay or
//! a cut. A client that resends on those answers creates duplicates.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use zdsync_sim::*;

const KINDS: [&str; 3] = ["users", "organizations", "tickets"];

fn items(what: &str, tag: &str, n: usize) -> Value {
    let list: Vec<Value> = (0..n)
        .map(|i| match what {
            "users" => json!({"name": format!("{tag} {i}"), "email": format!("{tag}{i}@x.io")}),
            "organizations" => json!({"name": format!("{tag} org {i}")}),
            _ => json!({"subject": format!("{tag} {i}"), "comment": {"body": "hello"}, "external_id": format!("{tag}-{i}")}),
        })
        .collect();
    json!({ what: list })
}

fn count(t: &T, what: &str) -> usize {
    let s = t.sim.state("acme").unwrap();
    match what {
        "users" => s.users.len(),
        "organizations" => s.organizations.len(),
        _ => s.tickets.len(),
    }
}

async fn listed_jobs(t: &T) -> Vec<Value> {
    let r = t.get("/api/v2/job_statuses.json").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json["job_statuses"].as_array().unwrap().clone()
}

#[tokio::test]
async fn create_many_500_and_504_after_commit_still_create() {
    for what in KINDS {
        for (kind, status, label) in [
            (FaultKind::InternalError, 500, "internal_error_after_commit"),
            (
                FaultKind::GatewayTimeout,
                504,
                "gateway_timeout_after_commit",
            ),
        ] {
            let t = T::new().await;
            let path = format!("/api/v2/{what}/create_many");
            t.sim.set_fault_rules(vec![FaultRule::new(kind)
                .path(&path)
                .after_commit(true)
                .times(1)]);
            let before = count(&t, what);
            let r = t.post(&path, items(what, "ac", 3)).await;
            assert_eq!(r.status, status, "{what}: {}", r.text);
            assert!(r.header("retry-after").is_none());
            if status == 500 {
                assert_eq!(
                    r.json,
                    json!({"errors": [{"code": "Unavailable", "title": "Internal Server Error"}]})
                );
            } else {
                assert!(r.json.is_null(), "504 is an HTML page: {}", r.text);
                assert!(r.header("content-type").unwrap().starts_with("text/html"));
            }
            // The job was queued anyway: it is in the listing and runs to completion.
            let jobs = listed_jobs(&t).await;
            assert_eq!(jobs.len(), 1, "{what} {status}");
            assert_eq!(jobs[0]["total"], 3);
            let job = t.wait_job(&jobs[0]).await;
            assert_eq!(job["status"], "completed");
            let res = job["results"].as_array().unwrap();
            assert_eq!(res.len(), 3);
            assert!(res.iter().all(|r| r["id"].as_u64().is_some()), "{job}");
            assert_eq!(count(&t, what), before + 3, "{what} {status}");
            let listed = listed_jobs(&t).await;
            assert_eq!(listed[0]["results"], job["results"]);
            // A blind retry duplicates (tickets) or fails (users / organizations).
            let job = t.run_job("POST", &path, Some(items(what, "ac", 3))).await;
            if what == "tickets" {
                assert_eq!(count(&t, what), before + 6);
                assert_eq!(
                    t.sim
                        .state("acme")
                        .unwrap()
                        .tickets_by_external_id("ac-0")
                        .len(),
                    2
                );
            } else {
                assert!(job["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["error"].is_string()));
                assert_eq!(count(&t, what), before + 3);
            }
            let c = t.sim.counters();
            assert_eq!(c.faults[label], 1);
            assert_eq!(c.jobs_created, 2);
            let log = t.sim.request_log();
            let entry = log
                .iter()
                .find(|e| e.endpoint == format!("{what}.create_many"))
                .unwrap();
            assert_eq!(entry.faults, [label]);
            assert_eq!(entry.status, status);
        }
    }
}

#[tokio::test]
async fn the_same_faults_before_commit_create_nothing() {
    for what in KINDS {
        for (kind, status) in [
            (FaultKind::InternalError, 500),
            (FaultKind::GatewayTimeout, 504),
            (FaultKind::BadGateway, 502),
        ] {
            let t = T::new().await;
            let path = format!("/api/v2/{what}/create_many");
            t.sim
                .set_fault_rules(vec![FaultRule::new(kind).path(&path).times(1)]);
            let before = count(&t, what);
            let r = t.post(&path, items(what, "bc", 2)).await;
            assert_eq!(r.status, status);
            assert!(listed_jobs(&t).await.is_empty());
            assert_eq!(count(&t, what), before);
            assert_eq!(t.sim.counters().jobs_created, 0);
            assert_eq!(t.sim.counters().faults[kind.name()], 1);
        }
    }
}

#[tokio::test]
async fn bad_gateway_is_an_html_page_without_zendesk_headers() {
    let t = T::new().await;
    t.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::BadGateway)
            .path("/api/v2/users")
            .method("POST")
            .after_commit(true)
            .times(1),
        FaultRule::new(FaultKind::BadGateway)
            .path("/api/v2/users/me")
            .times(1),
    ]);
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "Edge", "email": "edge@x.io"}}),
        )
        .await;
    assert_eq!(r.status, 502);
    assert!(
        serde_json::from_str::<Value>(&r.text).is_err(),
        "{}",
        r.text
    );
    assert!(r.text.contains("502 Bad Gateway"));
    assert_eq!(r.header("content-type"), Some("text/html"));
    assert!(r.header("x-rate-limit").is_none());
    assert!(r.header("retry-after").is_none());
    // After commit: the user exists although the client saw a gateway error.
    assert!(t
        .sim
        .state("acme")
        .unwrap()
        .user_by_email("edge@x.io")
        .is_some());
    let r = t.get("/api/v2/users/me").await;
    assert_eq!(r.status, 502);
    assert!(r.json.is_null());
    let c = t.sim.counters();
    assert_eq!(
        (
            c.faults["bad_gateway_after_commit"],
            c.faults["bad_gateway"]
        ),
        (1, 1)
    );
    assert_eq!(c.status(502), 2);
}

#[tokio::test]
async fn every_write_endpoint_commits_before_the_fault() {
    let t = T::new().await;
    let ids = t
        .sim
        .seed(
            "acme",
            &SeedData {
                users: vec![json!({"name": "U", "email": "u@x.io", "external_id": "u"})],
                organizations: vec![json!({"name": "O"})],
                tickets: vec![json!({"subject": "T", "comment": {"body": "b"}})],
            },
        )
        .unwrap();
    let (uid, oid, tid) = (ids.users[0], ids.organizations[0], ids.tickets[0]);
    t.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::InternalError)
            .method("POST")
            .after_commit(true),
        FaultRule::new(FaultKind::GatewayTimeout)
            .method("PUT")
            .after_commit(true),
        FaultRule::new(FaultKind::Unavailable)
            .method("DELETE")
            .retry_after(30)
            .after_commit(true),
    ]);
    // Single creates (sync and async tickets).
    let r = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"subject": "one", "comment": {"body": "x"}}}),
        )
        .await;
    assert_eq!(r.status, 500);
    let r = t
        .post(
            "/api/v2/tickets?async=true",
            json!({"ticket": {"subject": "two", "comment": {"body": "x"}}}),
        )
        .await;
    assert_eq!(r.status, 500);
    // create_or_update_many and tags.
    assert_eq!(
        t.post(
            "/api/v2/users/create_or_update_many",
            json!({"users": [{"name": "V", "email": "v@x.io"}]})
        )
        .await
        .status,
        500
    );
    assert_eq!(
        t.post(
            &format!("/api/v2/users/{uid}/tags"),
            json!({"tags": ["set"]})
        )
        .await
        .status,
        500
    );
    assert_eq!(
        t.put(
            &format!("/api/v2/tickets/{tid}/tags"),
            json!({"tags": ["added"]})
        )
        .await
        .status,
        504
    );
    assert_eq!(
        t.put(
            &format!("/api/v2/organizations/update_many?ids={oid}"),
            json!({"organization": {"notes": "bulk"}})
        )
        .await
        .status,
        504
    );
    // 503 after the work never carries Retry-After: it would claim nothing happened.
    let r = t
        .delete(&format!("/api/v2/tickets/destroy_many?ids={tid}"))
        .await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_none());
    // Jobs run although every answer was an error.
    t.sim.clear_faults();
    for job in listed_jobs(&t).await {
        assert_eq!(t.wait_job(&job).await["status"], "completed");
    }
    let s = t.sim.state("acme").unwrap();
    let subjects: Vec<&str> = s
        .tickets
        .iter()
        .filter_map(|t| t["subject"].as_str())
        .collect();
    assert!(
        subjects.contains(&"one") && subjects.contains(&"two"),
        "{subjects:?}"
    );
    assert!(s.ticket(tid).is_none(), "destroy_many ran");
    assert!(s.user_by_email("v@x.io").is_some());
    assert_eq!(s.user(uid).unwrap()["tags"], json!(["set"]));
    assert_eq!(s.organization(oid).unwrap()["notes"], "bulk");
    let c = t.sim.counters();
    assert_eq!(c.faults["internal_error_after_commit"], 4);
    assert_eq!(c.faults["gateway_timeout_after_commit"], 2);
    assert_eq!(c.faults["unavailable_after_commit"], 1);
    assert_eq!(c.early_requests, 0);
}

#[tokio::test]
async fn slow_after_commit_times_out_after_the_work() {
    let t = T::new().await;
    t.sim.set_fault_rules(vec![FaultRule::new(FaultKind::Slow)
        .path("/api/v2/users")
        .delay_ms(1500)
        .after_commit(true)
        .times(1)]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = http
        .post(t.url("/api/v2/users.json"))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .json(&json!({"user": {"name": "Late", "email": "late@x.io"}}))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    // The client gave up, but the user was written before the delay.
    assert!(t
        .sim
        .state("acme")
        .unwrap()
        .user_by_email("late@x.io")
        .is_some());
    assert_eq!(t.sim.counters().faults["slow_after_commit"], 1);
}

#[tokio::test]
async fn after_commit_over_admin_json_and_config() {
    let t = T::new().await;
    assert_eq!(t.put("/__sim/faults", json!({"rules": [{"kind": "gateway_timeout", "path": "/api/v2/tickets/create_many", "after_commit": true, "times": 1}]})).await.status, 200);
    let v: Value = t.get("/__sim/faults").await.json;
    assert_eq!(v["rules"][0]["kind"], "gateway_timeout");
    assert_eq!(v["rules"][0]["after_commit"], true);
    let r = t
        .post("/api/v2/tickets/create_many", items("tickets", "adm", 1))
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(listed_jobs(&t).await.len(), 1);

    let cfg: SimConfig = toml::from_str(
        "[[faults.rules]]\nkind = \"bad_gateway\"\nafter_commit = true\n\n[[faults.rules]]\nkind = \"internal_error\"\n",
    )
    .unwrap();
    assert_eq!(cfg.faults.rules[0].kind, FaultKind::BadGateway);
    assert!(cfg.faults.rules[0].after_commit);
    assert!(!cfg.faults.rules[1].after_commit);
    assert_eq!(
        FaultRule::new(FaultKind::InternalError).after_commit(true),
        FaultRule {
            after_commit: true,
            ..FaultRule::default()
        }
    );
}
