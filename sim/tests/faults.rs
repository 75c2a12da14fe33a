//! Every fault knob over HTTP.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use zdsync_sim::*;

#[tokio::test]
async fn storm_of_429_with_retry_after() {
    let t = T::new().await;
    t.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit)
            .path("/api/v2/users/*")
            .times(3)
            .retry_after(2)]);
    for _ in 0..3 {
        let r = t.get("/api/v2/users/me.json").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("2"));
        assert_eq!(
            r.json,
            json!({"errors": [{"code": "TooManyRequests", "title": "Too many requests"}]})
        );
        assert!(r.header("x-rate-limit").is_some());
    }
    assert_eq!(t.get("/api/v2/users/me.json").await.status, 200);
    // Other paths were never affected.
    assert_eq!(t.get("/api/v2/tickets.json").await.status, 200);
    let c = t.sim.counters();
    assert_eq!(c.faults["rate_limit"], 3);
    assert_eq!(c.rate_limited, 3);
    // Requests 2..5 came while the 2 s Retry-After was running.
    assert_eq!(c.early_requests, 4);
    assert_eq!(t.sim.request_log()[0].faults, ["rate_limit"]);
}

#[tokio::test]
async fn storm_without_retry_after_and_skip() {
    let t = T::new().await;
    t.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit).skip(1).times(2)]);
    let statuses: Vec<u16> = {
        let mut v = vec![];
        for _ in 0..4 {
            let r = t.get("/api/v2/users/me").await;
            if r.status == 429 {
                assert!(r.header("retry-after").is_none());
            }
            v.push(r.status);
        }
        v
    };
    assert_eq!(statuses, [200, 429, 429, 200]);
    assert_eq!(t.sim.counters().early_requests, 0);
}

#[tokio::test]
async fn unavailable_and_internal_error() {
    let t = T::new().await;
    t.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::Unavailable)
            .method("POST")
            .times(1)
            .retry_after(7),
        FaultRule::new(FaultKind::InternalError)
            .path("/api/v2/tickets*")
            .times(1),
    ]);
    let r = t
        .post("/api/v2/users", json!({"user": {"name": "a"}}))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.json["error"], "ServiceUnavailable");
    // The faulted request did nothing.
    assert_eq!(t.sim.state("acme").unwrap().users.len(), 1);
    let r = t.get("/api/v2/tickets.json").await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.json,
        json!({"errors": [{"code": "Unavailable", "title": "Internal Server Error"}]})
    );
    assert!(r.header("retry-after").is_none());
    assert_eq!(
        t.post("/api/v2/users", json!({"user": {"name": "a"}}))
            .await
            .status,
        201
    );
    let c = t.sim.counters();
    assert_eq!(
        (c.faults["unavailable"], c.faults["internal_error"]),
        (1, 1)
    );
}

#[tokio::test]
async fn dropped_connection_mid_response() {
    let t = T::new().await;
    t.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::DropConnection)
            .path("/api/v2/users")
            .method("POST")
            .after_bytes(10)
            .times(1)]);
    let resp = t
        .http
        .post(t.url("/api/v2/users.json"))
        .basic_auth(format!("{ADMIN}/token"), Some(DEFAULT_API_TOKEN))
        .json(&json!({"user": {"name": "Ghost", "email": "ghost@x.io"}}))
        .send()
        .await;
    let broken = match resp {
        Err(_) => true,
        Ok(r) => {
            assert_eq!(r.status(), 201);
            r.text().await.is_err()
        }
    };
    assert!(broken, "the body must not read cleanly");
    // The write happened even though the client never saw the answer.
    assert!(t
        .sim
        .state("acme")
        .unwrap()
        .user_by_email("ghost@x.io")
        .is_some());
    assert_eq!(t.sim.counters().faults["drop_connection"], 1);
    // The client recovers on a new connection.
    assert_eq!(t.get("/api/v2/users/me").await.status, 200);
}

#[tokio::test]
async fn slow_responses() {
    let t = T::new().await;
    t.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::Slow).delay_ms(300).times(1)]);
    let start = Instant::now();
    assert_eq!(t.get("/api/v2/users/me").await.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(300));
    let start = Instant::now();
    t.get("/api/v2/users/me").await;
    assert!(start.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn failed_and_killed_jobs() {
    let t = T::new().await;
    t.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::FailJob)
            .path("/api/v2/users/create_many")
            .times(1)
            .message("Job failed: database timeout"),
        FaultRule::new(FaultKind::KillJob)
            .path("/api/v2/organizations/create_many")
            .times(1),
    ]);
    let users: Vec<_> = (0..4).map(|i| json!({"name": format!("u{i}")})).collect();
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many",
            Some(json!({"users": users})),
        )
        .await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["message"], "Job failed: database timeout");
    assert_eq!(job["results"], serde_json::Value::Null);
    assert_eq!(t.sim.state("acme").unwrap().users.len(), 1);

    let orgs: Vec<_> = (0..4).map(|i| json!({"name": format!("o{i}")})).collect();
    let job = t
        .run_job(
            "POST",
            "/api/v2/organizations/create_many",
            Some(json!({"organizations": orgs})),
        )
        .await;
    assert_eq!(job["status"], "killed");
    assert_eq!(job["message"], "Job killed by the simulator");
    assert_eq!(job["progress"], 2);
    // A killed job may have applied part of its items.
    assert_eq!(t.sim.state("acme").unwrap().organizations.len(), 2);
    let c = t.sim.counters();
    assert_eq!((c.jobs_failed, c.jobs_killed, c.jobs_completed), (1, 1, 0));
    // Next job is normal.
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many",
            Some(json!({"users": [{"name": "x"}]})),
        )
        .await;
    assert_eq!(job["status"], "completed");
}

async fn failing_indexes(seed: u64) -> Vec<u64> {
    let cfg = SimConfig {
        seed,
        faults: FaultConfig::with_rules(vec![FaultRule {
            error: Some("InternalError".into()),
            details: Some("Item failed".into()),
            ..FaultRule::new(FaultKind::FailItems).fraction(0.3)
        }]),
        ..SimConfig::default()
    };
    let t = T::start(cfg).await;
    let users: Vec<_> = (0..100)
        .map(|i| json!({"name": format!("u{i}"), "email": format!("u{i}@x.io")}))
        .collect();
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_or_update_many",
            Some(json!({"users": users})),
        )
        .await;
    assert_eq!(job["status"], "completed");
    let res = job["results"].as_array().unwrap();
    assert_eq!(res.len(), 100);
    let failed: Vec<u64> = res
        .iter()
        .enumerate()
        .filter(|(_, r)| r["status"] == "Failed")
        .map(|(i, _)| i as u64)
        .collect();
    for i in &failed {
        // The documented failure shape: the input position as `id`, no email echo.
        assert_eq!(
            res[*i as usize],
            json!({"id": i, "status": "Failed", "error": "InternalError", "details": "Item failed"})
        );
    }
    let c = t.sim.counters();
    assert_eq!(c.job_items_failed, failed.len() as u64);
    assert_eq!(
        t.sim.state("acme").unwrap().users.len(),
        1 + 100 - failed.len()
    );
    failed
}

#[tokio::test]
async fn a_fraction_of_items_fail_deterministically() {
    let a = failing_indexes(7).await;
    let b = failing_indexes(7).await;
    let c = failing_indexes(8).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.len() > 10 && a.len() < 50, "{}", a.len());
}

#[tokio::test]
async fn probability_is_seeded_and_account_scoped() {
    let run = |seed: u64| async move {
        let mut cfg = SimConfig {
            seed,
            ..SimConfig::default()
        };
        cfg.accounts.push(AccountConfig::new("other"));
        cfg.faults = FaultConfig::with_rules(vec![FaultRule::new(FaultKind::InternalError)
            .probability(0.5)
            .account("acme")]);
        let t = T::start(cfg).await;
        let mut v = vec![];
        for _ in 0..30 {
            v.push(t.get("/api/v2/users/me").await.status);
        }
        let other = Auth::Basic("admin@other.test/token".into(), DEFAULT_API_TOKEN.into());
        let o = t
            .send_as(
                &other,
                "GET",
                &format!("{}/api/v2/users/me", t.sim.account_url("other")),
                None,
            )
            .await;
        assert_eq!(o.status, 200);
        v
    };
    let a = run(1).await;
    assert_eq!(a, run(1).await);
    assert!(a.contains(&500) && a.contains(&200));
}

#[tokio::test]
async fn faults_from_config_and_reset() {
    let cfg = SimConfig {
        faults: FaultConfig::with_rules(vec![FaultRule::new(FaultKind::InternalError).times(1)]),
        ..SimConfig::default()
    };
    let t = T::start(cfg).await;
    assert_eq!(t.get("/api/v2/users/me").await.status, 500);
    assert_eq!(t.get("/api/v2/users/me").await.status, 200);
    t.sim.reset();
    // Reset restores the configured rules with fresh counts.
    assert_eq!(t.get("/api/v2/users/me").await.status, 500);
    t.sim.clear_faults();
    t.sim.reset();
    assert_eq!(t.get("/api/v2/users/me").await.status, 500);
}
