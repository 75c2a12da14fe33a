//! `zdsync-bench recovery`: what resuming a killed tickets insert costs.
//!
//! Each round starts a fresh simulator with the account rate limit on and runs the same
//! `--tickets` insert twice: once clean, once stopped dead halfway (the run future is dropped
//! with its calls in flight, its lock left behind as a dead process leaves it) and then finished
//! by the next run. Prints the requests and wall time of killed + resumed ÷ the clean run
//! (targets: ≤ 1.1× the requests, < 2× the time), the minimum over `--rounds`, and the load
//! average.

use crate::sync::{start_sim, write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zdsync::config::SyncConfig;
use zdsync::lock::{self, LockInfo};
use zdsync::run::{run, RunContext, RunOptions, RunStatus};
use zdsync::store::{LocalStore, ObjectStore};
use zdsync::write::Progress;
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::SimHandle;

pub struct RecoveryBench {
    pub tickets: usize,
    pub rpm: u32,
    pub job_ms: u64,
    pub rounds: usize,
    pub dir: PathBuf,
}

const SYNC: &str = "bench_tickets";

async fn setup(b: &RecoveryBench, dir: &Path) -> SimHandle {
    let _ = std::fs::remove_dir_all(dir);
    let sim = start_sim(dir, b.rpm, b.job_ms).await;
    write(
        &dir.join(format!("{SYNC}.toml")),
        &format!(
            "name = \"{SYNC}\"\nobject = \"tickets\"\nmode = \"insert\"\nprimary_key = \"ticket_id\"\nchunk_rows = 1000\n\n[source]\nlocation = \"exports/{SYNC}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:credentials.json\"\nrate_limit_rpm = {}\n\n[mapping]\nsubject = \"subject\"\ndescription = \"body\"\npriority = \"priority\"\n",
            sim.base_url(),
            b.rpm
        ),
    );
    let mut csv = String::from("ticket_id,subject,body,priority\n");
    for i in 0..b.tickets {
        csv.push_str(&format!(
            "t{i:07},Order {i} delayed,Customer {i} asks where the order is,{}\n",
            ["low", "normal", "high", "urgent"][i % 4]
        ));
    }
    write(&dir.join(format!("exports/{SYNC}/part-0000.csv")), &csv);
    sim
}

async fn context(dir: &Path) -> RunContext {
    let cfg = SyncConfig::load(&dir.join(format!("{SYNC}.toml"))).expect("config");
    let creds = credential_store(&cfg.zendesk.credentials, dir).expect("credentials");
    let client = Client::new(ClientOptions::from_config(&cfg.zendesk), creds)
        .await
        .expect("client");
    RunContext {
        store: Arc::new(LocalStore::new(dir)),
        config: cfg,
        client,
        progress: Arc::new(Progress::default()),
    }
}

fn opts() -> RunOptions {
    RunOptions {
        trigger: "bench".into(),
        ..Default::default()
    }
}

/// Every ticket once: (tickets in the simulator, distinct external ids).
fn tickets(sim: &SimHandle) -> (usize, usize) {
    let t = sim.state("acme").expect("account").tickets;
    let mut keys: Vec<&str> = t.iter().filter_map(|x| x["external_id"].as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    (t.len(), keys.len())
}

struct Round {
    clean_requests: u64,
    clean_s: f64,
    killed_requests: u64,
    killed_s: f64,
    resumed_requests: u64,
    resumed_s: f64,
}

async fn round(b: &RecoveryBench, n: usize) -> Round {
    // Clean.
    let dir = b
        .dir
        .join(format!("recovery-{}-{n}-clean", std::process::id()));
    let sim = setup(b, &dir).await;
    let ctx = context(&dir).await;
    let t = Instant::now();
    let out = run(&ctx, &opts()).await;
    let clean_s = t.elapsed().as_secs_f64();
    let rec = out.records.last().expect("record");
    assert_eq!(rec.status, RunStatus::Succeeded, "clean run: {rec:?}");
    let clean_requests = sim.counters().requests;
    assert_eq!(tickets(&sim), (b.tickets, b.tickets));
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    // Killed halfway, then resumed.
    let dir = b
        .dir
        .join(format!("recovery-{}-{n}-killed", std::process::id()));
    let sim = setup(b, &dir).await;
    let batches = b.tickets.div_ceil(100) as u64;
    let ctx = context(&dir).await;
    let t = Instant::now();
    let half = async {
        while sim.counters().jobs_created < batches / 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let run_id = zdsync::run::new_run_id();
    let mut o = opts();
    o.run_id = Some(run_id.clone());
    tokio::select! {
        _ = run(&ctx, &o) => panic!("the run finished before it could be stopped"),
        _ = half => {}
    }
    let killed_s = t.elapsed().as_secs_f64();
    let killed_requests = sim.counters().requests;
    // The lock as a dead process leaves it.
    let store = LocalStore::new(&dir);
    let info = LockInfo {
        sync: SYNC.into(),
        run_id,
        host: lock::host_name(),
        pid: 999_999,
        acquired_at: "2026-01-01T00:00:00Z".into(),
        expires_at: 1_000,
        execution: None,
        abandoned: false,
    };
    store
        .put(
            &zdsync::layout::lock_key(SYNC),
            &serde_json::to_vec(&info).expect("lock"),
        )
        .expect("lock written");
    let ctx = context(&dir).await;
    let t = Instant::now();
    let out = run(&ctx, &opts()).await;
    let resumed_s = t.elapsed().as_secs_f64();
    assert!(out.error.is_none(), "resume: {:?}", out.error);
    assert!(
        out.records.first().is_some_and(|r| r.resumed),
        "the killed run was finished"
    );
    let resumed_requests = sim.counters().requests - killed_requests;
    let (all, distinct) = tickets(&sim);
    assert_eq!(
        (all, distinct),
        (b.tickets, b.tickets),
        "every ticket exactly once"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Round {
        clean_requests,
        clean_s,
        killed_requests,
        killed_s,
        resumed_requests,
        resumed_s,
    }
}

pub fn bench_recovery(b: RecoveryBench) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!(
            "zdsync-bench recovery: {} tickets (insert), simulator limit {} requests/min, jobs {} ms queued + {} ms working, killed after half the batches were submitted",
            b.tickets, b.rpm, b.job_ms, b.job_ms
        );
        let mut req_ratio = f64::MAX;
        let mut time_ratio = f64::MAX;
        for n in 0..b.rounds.max(1) {
            let r = round(&b, n).await;
            let rq = (r.killed_requests + r.resumed_requests) as f64 / r.clean_requests as f64;
            let tm = (r.killed_s + r.resumed_s) / r.clean_s;
            println!(
                "round {}: clean {} requests in {:.2} s · killed {} + resumed {} requests = {:.3}× · {:.2} + {:.2} s = {:.2}× the clean run's time",
                n + 1,
                r.clean_requests,
                r.clean_s,
                r.killed_requests,
                r.resumed_requests,
                rq,
                r.killed_s,
                r.resumed_s,
                tm
            );
            req_ratio = req_ratio.min(rq);
            time_ratio = time_ratio.min(tm);
        }
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "min over {} rounds: requests {:.3}× the clean run (target ≤ 1.1) · time {:.2}× (target < 2) · every ticket exactly once · load average {}",
            b.rounds.max(1),
            req_ratio,
            time_ratio,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        );
    });
}
