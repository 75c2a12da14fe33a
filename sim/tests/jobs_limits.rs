//! Job lifecycle, job limit, retention, and rate limits over HTTP.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use zdsync_sim::*;

#[tokio::test]
async fn job_moves_queued_working_completed() {
    let mut cfg = SimConfig::default();
    cfg.jobs.queued_ms = 150;
    cfg.jobs.working_ms = 150;
    let t = T::start(cfg).await;
    let r = t
        .post(
            "/api/v2/users/create_many.json",
            json!({"users": [{"name": "a"}, {"name": "b"}]}),
        )
        .await;
    assert_eq!(r.status, 200);
    let js = r.json["job_status"].clone();
    let id = js["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(js["status"], "queued");
    assert_eq!(js["total"], 2);
    assert_eq!(js["progress"], serde_json::Value::Null);
    assert_eq!(js["results"], serde_json::Value::Null);
    assert_eq!(
        js["url"],
        format!("{}/api/v2/job_statuses/{id}.json", t.base)
    );
    assert_eq!(t.sim.active_jobs("acme"), 1);
    // Nothing applied while queued.
    assert_eq!(t.sim.state("acme").unwrap().users.len(), 1);

    let mut seen = vec![];
    let start = Instant::now();
    for _ in 0..200 {
        let r = t
            .get(&format!(
                "/api/v2/job_statuses/show_many.json?ids={id},unknown"
            ))
            .await;
        assert_eq!(r.json["job_statuses"].as_array().unwrap().len(), 1);
        let s = r.json["job_statuses"][0]["status"]
            .as_str()
            .unwrap()
            .to_string();
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        if s == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, ["queued", "working", "completed"]);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(t.sim.active_jobs("acme"), 0);
    let c = t.sim.counters();
    assert_eq!(
        (c.jobs_created, c.jobs_completed, c.max_concurrent_jobs),
        (1, 1, 1)
    );
    assert_eq!(c.job_items, 2);
    let list = t.get("/api/v2/job_statuses.json").await;
    assert_eq!(list.json["job_statuses"][0]["id"], id);
    assert_eq!(t.get("/api/v2/job_statuses/nope.json").await.status, 404);
}

#[tokio::test]
async fn job_limit_gives_429() {
    let mut cfg = SimConfig::default();
    cfg.jobs.queued_ms = 300;
    cfg.jobs.max_concurrent = 2;
    cfg.jobs.limit_retry_after_secs = 3;
    let t = T::start(cfg).await;
    let body = json!({"organizations": [{"name": "x"}]});
    let a = t
        .post("/api/v2/organizations/create_many", body.clone())
        .await;
    let b = t
        .post(
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "y"}]}),
        )
        .await;
    assert_eq!((a.status, b.status), (200, 200));
    let c = t
        .post(
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "z"}]}),
        )
        .await;
    assert_eq!(c.status, 429);
    assert_eq!(c.header("retry-after"), Some("3"));
    assert_eq!(c.json["errors"][0]["code"], "TooManyJobs");
    let counters = t.sim.counters();
    assert_eq!(
        (
            counters.rate_limited,
            counters.rate_limited_jobs,
            counters.max_concurrent_jobs
        ),
        (1, 1, 2)
    );
    t.wait_job(&a.json["job_status"]).await;
    t.wait_job(&b.json["job_status"]).await;
    let d = t
        .post(
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "z"}]}),
        )
        .await;
    assert_eq!(d.status, 200);
}

#[tokio::test]
async fn job_retention_window() {
    let mut cfg = SimConfig::default();
    cfg.jobs.retention_secs = 3600;
    let t = T::start(cfg).await;
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many",
            Some(json!({"users": [{"name": "a"}]})),
        )
        .await;
    let url = job["url"].as_str().unwrap().to_string();
    assert_eq!(t.get(&url).await.status, 200);
    t.sim.advance_clock(Duration::from_secs(3601));
    let r = t.get(&url).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json["error"], "RecordNotFound");
    let r = t
        .get(&format!(
            "/api/v2/job_statuses/show_many?ids={}",
            job["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.json["job_statuses"], json!([]));
}

#[tokio::test]
async fn account_rate_limit_and_early_retries() {
    let mut cfg = SimConfig::default();
    cfg.rate_limit.rpm = 3;
    cfg.rate_limit.window_ms = 1000;
    let t = T::start(cfg).await;
    let mut remaining = vec![];
    for _ in 0..3 {
        let r = t.get("/api/v2/users/me").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-rate-limit"), Some("3"));
        remaining.push(r.header("x-rate-limit-remaining").unwrap().to_string());
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = t.get("/api/v2/users/me").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-rate-limit-remaining"), Some("0"));
    assert_eq!(r.json["errors"][0]["code"], "TooManyRequests");
    // Asking again at once is "early": the client ignored Retry-After.
    let r = t.get("/api/v2/users/me").await;
    assert_eq!(r.status, 429);
    let c = t.sim.counters();
    assert_eq!(
        (c.rate_limited, c.rate_limited_account, c.early_requests),
        (2, 2, 1)
    );
    assert!(t.sim.request_log().last().unwrap().early);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = t.get("/api/v2/users/me").await;
    assert_eq!(r.status, 200);
    assert_eq!(t.sim.counters().early_requests, 1);
}

#[tokio::test]
async fn job_polls_count_and_per_account_rpm() {
    let mut cfg = SimConfig::default();
    cfg.rate_limit.rpm = 100;
    cfg.accounts[0].rpm = Some(10);
    let t = T::start(cfg).await;
    let r = t
        .post(
            "/api/v2/users/create_many",
            json!({"users": [{"name": "a"}]}),
        )
        .await;
    assert_eq!(r.header("x-rate-limit"), Some("10"));
    assert_eq!(r.header("x-rate-limit-remaining"), Some("9"));
    let poll = t.get(r.json["job_status"]["url"].as_str().unwrap()).await;
    assert_eq!(poll.header("x-rate-limit-remaining"), Some("8"));
    assert!(poll.header("ratelimit-reset").is_some());
    t.sim.update_settings("acme", |s| s.rpm = Some(0));
    let r = t.get("/api/v2/users/me").await;
    assert_eq!(r.header("x-rate-limit"), Some("1000000"));
}

#[tokio::test]
async fn ticket_update_limits() {
    let mut cfg = SimConfig::default();
    cfg.rate_limit.ticket_updates_per_ticket = WindowLimit {
        limit: 2,
        window_ms: 60_000,
    };
    let t = T::start(cfg).await;
    let a = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"comment": {"body": "a"}}}),
        )
        .await
        .json["ticket"]["id"]
        .as_u64()
        .unwrap();
    let b = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"comment": {"body": "b"}}}),
        )
        .await
        .json["ticket"]["id"]
        .as_u64()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            t.put(
                &format!("/api/v2/tickets/{a}"),
                json!({"ticket": {"priority": "low"}})
            )
            .await
            .status,
            200
        );
    }
    let r = t
        .put(
            &format!("/api/v2/tickets/{a}"),
            json!({"ticket": {"priority": "low"}}),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.text,
        "Rate limit for ticket updates exceeded, please wait before updating this ticket again"
    );
    assert_eq!(r.text.len(), 85);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(r.header("retry-after"), Some("60"));
    // Other tickets are fine, and that is not an early retry.
    assert_eq!(
        t.put(
            &format!("/api/v2/tickets/{b}"),
            json!({"ticket": {"priority": "low"}})
        )
        .await
        .status,
        200
    );
    let c = t.sim.counters();
    assert_eq!((c.rate_limited_endpoint, c.early_requests), (1, 0));

    t.sim.update_rate_limit(|r| {
        r.ticket_updates = WindowLimit {
            limit: 1,
            window_ms: 60_000,
        };
        r.user_writes_per_user = WindowLimit {
            limit: 1,
            window_ms: 60_000,
        };
    });
    assert_eq!(
        t.put(&format!("/api/v2/tickets/{b}"), json!({"ticket": {}}))
            .await
            .status,
        200
    );
    assert_eq!(
        t.put(&format!("/api/v2/tickets/{b}"), json!({"ticket": {}}))
            .await
            .status,
        429
    );
    let body = json!({"user": {"name": "P", "email": "p@x.io"}});
    assert_eq!(
        t.post("/api/v2/users/create_or_update", body.clone())
            .await
            .status,
        201
    );
    let r = t.post("/api/v2/users/create_or_update", body).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json["errors"][0]["code"], "TooManyRequests");
    assert_eq!(
        t.post(
            "/api/v2/users/create_or_update",
            json!({"user": {"name": "Q", "email": "q@x.io"}})
        )
        .await
        .status,
        201
    );
}
