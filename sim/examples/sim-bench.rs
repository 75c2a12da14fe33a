//! Drives an in-process simulator over loopback and prints requests/s (cheap calls) and rows/s
//! (users create_many of 100, each job polled to completion). Rate limiting off, job delay 0.
//!
//! cargo run --release -p zdsync-sim --example sim-bench -- [--secs 3] [--concurrency 32]

use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zdsync_sim::{SimConfig, Simulator, DEFAULT_API_TOKEN};

const AUTH_USER: &str = "admin@acme.test/token";

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn cheap(base: &str, http: &reqwest::Client, secs: u64, concurrency: u64) -> (u64, f64) {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, count, url) = (
            http.clone(),
            count.clone(),
            format!("{base}/api/v2/users/me.json"),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let r = http
                    .get(&url)
                    .basic_auth(AUTH_USER, Some(DEFAULT_API_TOKEN))
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let n = count.load(Ordering::Relaxed);
    (n, n as f64 / start.elapsed().as_secs_f64())
}

/// One create_many body of 100 users, written as text so the client spends little CPU.
fn users_body(worker: u64, batch: u64) -> String {
    let mut s = String::with_capacity(12_000);
    s.push_str(r#"{"users":["#);
    for i in 0..100 {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"name":"User {worker}-{batch}-{i}","email":"u{worker}.{batch}.{i}@bench.test","external_id":"ext-{worker}-{batch}-{i}"}}"#
        ));
    }
    s.push_str("]}");
    s
}

/// Returns (rows confirmed, rows/s, requests incl. polls). Bodies are built before the clock
/// starts; job polls are checked by substring instead of a full JSON parse.
async fn bulk(base: &str, http: &reqwest::Client, secs: u64, concurrency: u64) -> (u64, f64, u64) {
    let per_worker = (secs * 400_000 / 100 / concurrency).max(10);
    let bodies: Vec<Vec<String>> = (0..concurrency)
        .map(|w| (0..per_worker).map(|b| users_body(w, b)).collect())
        .collect();
    let rows = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker_bodies in bodies {
        let (http, rows, requests, base) = (
            http.clone(),
            rows.clone(),
            requests.clone(),
            base.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            for body in worker_bodies {
                if Instant::now() >= deadline {
                    break;
                }
                let r = http
                    .post(format!("{base}/api/v2/users/create_many.json"))
                    .basic_auth(AUTH_USER, Some(DEFAULT_API_TOKEN))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request");
                requests.fetch_add(1, Ordering::Relaxed);
                assert_eq!(r.status(), 200);
                let v: Value = r.json().await.expect("json");
                let url = v["job_status"]["url"].as_str().expect("url").to_string();
                loop {
                    let r = http
                        .get(&url)
                        .basic_auth(AUTH_USER, Some(DEFAULT_API_TOKEN))
                        .send()
                        .await
                        .expect("poll");
                    requests.fetch_add(1, Ordering::Relaxed);
                    let text = r.text().await.expect("body");
                    if text.contains(r#""status":"completed""#) {
                        // Documented create results: `{"id","index"}`, failures add `error`.
                        let ok = text.matches(r#""index":"#).count()
                            - text.matches(r#""error":"#).count();
                        rows.fetch_add(ok as u64, Ordering::Relaxed);
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let n = rows.load(Ordering::Relaxed);
    (
        n,
        n as f64 / start.elapsed().as_secs_f64(),
        requests.load(Ordering::Relaxed),
    )
}

#[tokio::main]
async fn main() {
    let secs = arg("--secs", 3);
    let concurrency = arg("--concurrency", 32);
    let mut cfg = SimConfig::default();
    cfg.rate_limit.rpm = 0;
    cfg.jobs.queued_ms = 0;
    cfg.jobs.working_ms = 0;
    cfg.jobs.max_concurrent = 1000;
    let sim = Simulator::start(cfg).await.expect("start");
    let base = sim.base_url();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency as usize)
        .build()
        .expect("client");

    let (n, rps) = cheap(&base, &http, secs, concurrency).await;
    println!("cheap GET /api/v2/users/me: {n} requests in {secs}s = {rps:.0} requests/s ({concurrency} clients)");
    let bulk_workers = concurrency.min(16);
    let (rows, rows_s, reqs) = bulk(&base, &http, secs, bulk_workers).await;
    println!(
        "bulk users/create_many x100 + job polls: {rows} rows in {secs}s = {rows_s:.0} rows/s ({reqs} requests, {bulk_workers} clients)"
    );
    let c = sim.counters();
    println!(
        "simulator counted {} requests, {} jobs completed",
        c.requests, c.jobs_completed
    );
    sim.shutdown().await;
}
