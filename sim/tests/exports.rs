//! Reading back in bulk: the cursor-based incremental ticket export (lag horizon, its own
//! 10/min limit), ticket lists sorted by update time, and the job-status list.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use zdsync_sim::*;

fn no_export_limit() -> SimConfig {
    let mut cfg = SimConfig::default();
    cfg.incremental.rpm = 0;
    cfg
}

async fn ticket(t: &T, subject: &str) -> u64 {
    let r = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"subject": subject, "comment": {"body": "b"}}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json["ticket"]["id"].as_u64().unwrap()
}

fn ids(list: &Value) -> Vec<u64> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn incremental_export_pages_cursor_and_lag() {
    let t = T::start(no_export_limit()).await;
    let start = now_secs() - 5;
    let a = ticket(&t, "a").await;
    let b = ticket(&t, "b").await;
    let c = ticket(&t, "c").await;
    // Everything is younger than the one-minute lag: nothing yet, and the stream has ended.
    let r = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor.json?start_time={start}"
        ))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["tickets"], json!([]));
    assert_eq!(r.json["end_of_stream"], true);
    assert_eq!(r.json["before_url"], Value::Null);
    assert_eq!(r.json["before_cursor"], Value::Null);
    let resume = r.json["after_url"].as_str().unwrap().to_string();
    assert!(resume.contains("/api/v2/incremental/tickets/cursor.json?cursor="));

    // A minute later they are exported, two per page.
    t.sim.advance_clock(Duration::from_secs(61));
    let r = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor?start_time={start}&per_page=2"
        ))
        .await;
    assert_eq!(ids(&r.json["tickets"]), [a, b]);
    assert_eq!(r.json["end_of_stream"], false);
    let tk = &r.json["tickets"][0];
    assert_eq!(tk["subject"], "a");
    assert!(tk["updated_at"].as_str().unwrap().ends_with('Z'));
    assert!(tk["generated_timestamp"].as_i64().unwrap() >= start);
    assert_eq!(tk["url"], format!("{}/api/v2/tickets/{a}.json", t.base));
    let after_url = r.json["after_url"].as_str().unwrap().to_string();
    let after_cursor = r.json["after_cursor"].as_str().unwrap();
    assert!(after_url.contains(after_cursor) && after_url.contains("per_page=2"));
    let r = t.get(&after_url).await;
    assert_eq!(ids(&r.json["tickets"]), [c]);
    assert_eq!(r.json["end_of_stream"], true);
    let tail = r.json["after_url"].as_str().unwrap().to_string();
    // The earlier resume point (an empty page) sees the same three tickets.
    let r = t.get(&resume).await;
    assert_eq!(ids(&r.json["tickets"]), [a, b, c]);

    // An update moves a ticket to the end of the stream once the lag has passed.
    t.sim.advance_clock(Duration::from_secs(5));
    let r = t
        .put(
            &format!("/api/v2/tickets/{a}"),
            json!({"ticket": {"status": "open"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = t.get(&tail).await;
    assert_eq!(r.json["tickets"], json!([]));
    assert_eq!(r.json["end_of_stream"], true);
    assert_eq!(
        r.json["after_url"],
        tail.as_str(),
        "an empty page resumes in place"
    );
    t.sim.advance_clock(Duration::from_secs(61));
    let r = t.get(&tail).await;
    assert_eq!(ids(&r.json["tickets"]), [a]);
    assert_eq!(r.json["tickets"][0]["status"], "open");
    let from_start = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor?start_time={start}"
        ))
        .await;
    assert_eq!(ids(&from_start.json["tickets"]), [b, c, a]);

    // Deleted tickets come back with status "deleted" unless excluded.
    let tail = r.json["after_url"].as_str().unwrap().to_string();
    assert_eq!(t.delete(&format!("/api/v2/tickets/{b}")).await.status, 204);
    t.sim.advance_clock(Duration::from_secs(61));
    let r = t.get(&tail).await;
    assert_eq!(ids(&r.json["tickets"]), [b]);
    assert_eq!(r.json["tickets"][0]["status"], "deleted");
    let r = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor?start_time={start}&exclude_deleted=true"
        ))
        .await;
    assert_eq!(ids(&r.json["tickets"]), [c, a]);
    assert!(r.json["after_url"]
        .as_str()
        .unwrap()
        .contains("exclude_deleted=true"));

    // start_time filters by update time.
    let later = r.json["tickets"][1]["generated_timestamp"]
        .as_i64()
        .unwrap();
    let r = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor?start_time={later}"
        ))
        .await;
    assert_eq!(ids(&r.json["tickets"]), [a, b]);
    assert_eq!(t.sim.counters().endpoint("incremental.tickets.cursor"), 10);
}

#[tokio::test]
async fn incremental_export_bad_requests() {
    let t = T::start(no_export_limit()).await;
    let future = now_secs() + 3600;
    for q in [
        "".to_string(),
        "?start_time=".to_string(),
        "?start_time=yesterday".to_string(),
        "?start_time=-5".to_string(),
        format!("?start_time={future}"),
        "?cursor=!!!".to_string(),
        "?cursor=bm90IGEgY3Vyc29y".to_string(),
    ] {
        let r = t
            .get(&format!("/api/v2/incremental/tickets/cursor.json{q}"))
            .await;
        assert_eq!(r.status, 400, "{q}: {}", r.text);
        assert!(r.json["error"].is_string(), "{q}: {}", r.text);
        assert!(r.json["description"].is_string(), "{q}: {}", r.text);
    }
    // Zendesk's own cursor format is understood.
    let r = t
        .get("/api/v2/incremental/tickets/cursor.json?cursor=MTU4MDc1Mzc5OC4wfHw0MzJ8")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Moving the clock moves "the future".
    t.sim.advance_clock(Duration::from_secs(7200));
    let r = t
        .get(&format!(
            "/api/v2/incremental/tickets/cursor.json?start_time={future}"
        ))
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn incremental_export_has_its_own_limit() {
    let t = T::new().await;
    let q = format!(
        "/api/v2/incremental/tickets/cursor.json?start_time={}",
        now_secs() - 10
    );
    for _ in 0..10 {
        assert_eq!(t.get(&q).await.status, 200);
    }
    let r = t.get(&q).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(r.json["errors"][0]["code"], "TooManyRequests");
    assert!(r.header("x-rate-limit").is_some());
    // Other endpoints are not affected.
    assert_eq!(t.get("/api/v2/tickets.json").await.status, 200);
    let c = t.sim.counters();
    assert_eq!(
        (c.rate_limited, c.rate_limited_endpoint, c.early_requests),
        (1, 1, 0)
    );
    t.sim.advance_clock(Duration::from_secs(60));
    assert_eq!(t.get(&q).await.status, 200);
    // The limit is a switch.
    t.sim.update_incremental(|i| i.rpm = 1);
    assert_eq!(t.get(&q).await.status, 429);
    let v: Value = t.get("/__sim/incremental").await.json;
    assert_eq!(v, json!({"lag_secs": 60, "rpm": 1, "window_ms": 60000}));
    assert_eq!(
        t.put("/__sim/incremental", json!({"rpm": 0, "lag_secs": 0}))
            .await
            .status,
        200
    );
    // No lag: a ticket is exported at once.
    let id = ticket(&t, "now").await;
    t.sim.advance_clock(Duration::from_secs(1));
    let r = t.get(&q).await;
    assert_eq!(r.status, 200);
    assert_eq!(ids(&r.json["tickets"]), [id]);
}

#[tokio::test]
async fn tickets_sorted_by_update_time_with_cursors() {
    let t = T::new().await;
    let mut made = vec![];
    for i in 0..5 {
        made.push(ticket(&t, &format!("t{i}")).await);
        t.sim.advance_clock(Duration::from_secs(2));
    }
    // Touch the second ticket: it becomes the most recently updated.
    let r = t
        .put(
            &format!("/api/v2/tickets/{}", made[1]),
            json!({"ticket": {"priority": "high"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let by_update_desc = vec![made[1], made[4], made[3], made[2], made[0]];

    let mut seen = vec![];
    let mut url = "/api/v2/tickets.json?page[size]=2&sort=-updated_at".to_string();
    let mut pages = 0;
    loop {
        let r = t.get(&url).await;
        assert_eq!(r.status, 200, "{}", r.text);
        pages += 1;
        for tk in r.json["tickets"].as_array().unwrap() {
            assert!(tk["updated_at"].is_string());
            seen.push(tk["id"].as_u64().unwrap());
        }
        let more = r.json["meta"]["has_more"].as_bool().unwrap();
        assert!(r.json["meta"]["after_cursor"].is_string());
        if !more {
            assert_eq!(r.json["links"]["next"], Value::Null);
            break;
        }
        let next = r.json["links"]["next"].as_str().unwrap().to_string();
        assert!(next.contains("sort=-updated_at"));
        assert!(next.contains(r.json["meta"]["after_cursor"].as_str().unwrap()));
        url = next;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, by_update_desc);

    let list = |q: &str| {
        let q = q.to_string();
        let t = &t;
        async move {
            let r = t.get(&format!("/api/v2/tickets.json?{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text);
            ids(&r.json["tickets"])
        }
    };
    let mut asc = by_update_desc.clone();
    asc.reverse();
    assert_eq!(list("page[size]=100&sort=updated_at").await, asc);
    let mut by_id = made.clone();
    assert_eq!(list("page[size]=100&sort=id").await, by_id);
    by_id.reverse();
    assert_eq!(list("page[size]=3&sort=-id").await, by_id[..3]);
    // Offset pagination takes sort_by / sort_order.
    assert_eq!(
        list("sort_by=updated_at&sort_order=desc").await,
        by_update_desc
    );
    assert_eq!(
        t.get("/api/v2/tickets.json?page[size]=2&sort=priority")
            .await
            .status,
        400
    );
    assert_eq!(
        t.get("/api/v2/tickets.json?page[size]=2&sort=-updated_at&page[after]=zzz")
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn job_list_newest_first_with_results_and_cursor() {
    let t = T::new().await;
    let mut jobs = vec![];
    for i in 0..3 {
        let job = t
            .run_job(
                "POST",
                "/api/v2/organizations/create_many",
                Some(json!({"organizations": [{"name": format!("o{i}")}]})),
            )
            .await;
        jobs.push(job["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A job still queued is listed too (after the finished ones).
    t.sim.update_jobs(|j| j.queued_ms = 60_000);
    let r = t
        .post(
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "later"}]}),
        )
        .await;
    let queued = r.json["job_status"]["id"].as_str().unwrap().to_string();

    let r = t.get("/api/v2/job_statuses.json?page[size]=2").await;
    assert_eq!(r.status, 200);
    let page: Vec<&str> = r.json["job_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [jobs[2].as_str(), jobs[1].as_str()]);
    for j in r.json["job_statuses"].as_array().unwrap() {
        assert_eq!(j["status"], "completed");
        assert_eq!(j["results"].as_array().unwrap().len(), 1);
        assert!(j["results"][0]["id"].as_u64().is_some());
    }
    assert_eq!(r.json["meta"]["has_more"], true);
    let next = r.json["links"]["next"].as_str().unwrap().to_string();
    let r = t.get(&next).await;
    let page: Vec<&str> = r.json["job_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, [jobs[0].as_str(), queued.as_str()]);
    assert_eq!(r.json["meta"]["has_more"], false);
    assert_eq!(r.json["links"]["next"], Value::Null);
    assert_eq!(
        t.get("/api/v2/job_statuses.json?page[after]=@@")
            .await
            .status,
        400
    );
    // Retention: finished jobs leave the list after `retention_secs`.
    t.sim.advance_clock(Duration::from_secs(3601));
    let r = t.get("/api/v2/job_statuses.json").await;
    let left: Vec<&str> = r.json["job_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, [queued.as_str()]);
}
