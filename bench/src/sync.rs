//! `zdsync-bench sync`: the write path against the simulator with its account rate limit on.
//!
//! A cold load of users and organizations (one sync each, one after the other, each with the
//! whole budget), then a second run with 1 % of the rows changed. Prints rows confirmed per
//! minute ÷ (rpm × 100) (the bound when every request carries 100 rows), requests per row, the
//! requests of the 1 % run, and the requests the simulator saw while a `Retry-After` was
//! pending (`early_requests`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use zdsync::config::SyncConfig;
use zdsync::run::{run, RunContext, RunOptions, RunRecord};
use zdsync::store::LocalStore;
use zdsync::write::Progress;
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::{Counters, FaultKind, FaultRule, SimConfig, Simulator};

pub struct SyncBench {
    pub users: usize,
    pub orgs: usize,
    pub rpm: u32,
    pub job_ms: u64,
    pub dir: PathBuf,
    pub storm: bool,
}

fn users_csv(n: usize, changed_every: Option<usize>) -> String {
    let mut s = String::with_capacity(n * 90);
    s.push_str("user_id,full_name,email,plan,ltv\n");
    for i in 0..n {
        let bump = changed_every.is_some_and(|k| i % k == 0);
        let _ = writeln!(
            s,
            "u{i:08},Customer {i}{},customer.{i}@example-mail.com,{},{}.{:02}",
            if bump { " (changed)" } else { "" },
            ["Free", "Pro", "Enterprise"][i % 3],
            (i * 7919) % 100_000,
            i % 100
        );
    }
    s
}

fn orgs_csv(n: usize, changed_every: Option<usize>) -> String {
    let mut s = String::with_capacity(n * 70);
    s.push_str("org_id,name,domain,notes\n");
    for i in 0..n {
        let bump = changed_every.is_some_and(|k| i % k == 0);
        let _ = writeln!(
            s,
            "o{i:07},Company {i},company{i}.example.com,{}",
            if bump { "renewal moved" } else { "imported" }
        );
    }
    s
}

fn config(name: &str, object: &str, pk: &str, base: &str, rpm: u32, mapping: &str) -> String {
    format!(
        "name = \"{name}\"\nobject = \"{object}\"\nmode = \"upsert\"\nprimary_key = \"{pk}\"\nchunk_rows = 5000\n\n[source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{base}\"\ncredentials = \"file:credentials.json\"\nrate_limit_rpm = {rpm}\n\n[mapping]\n{mapping}"
    )
}

const USER_MAPPING: &str = "name = \"full_name\"\nemail = \"email\"\n\"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }\n\"user_fields.lifetime_value\" = { column = \"ltv\", type = \"decimal\" }\n";
const ORG_MAPPING: &str =
    "name = \"name\"\ndomain_names = { column = \"domain\", split = \"comma\" }\nnotes = \"notes\"\n";

pub(crate) fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write export");
}

/// A simulator with the account limit `rpm` (one-minute window) and jobs `job_ms` queued and
/// again working, and the API-token `credentials.json` bench configs read in `dir`.
pub(crate) async fn start_sim(dir: &Path, rpm: u32, job_ms: u64) -> zdsync_sim::SimHandle {
    let mut sc = SimConfig::default();
    sc.rate_limit.rpm = rpm;
    sc.rate_limit.window_ms = 60_000;
    sc.jobs.queued_ms = job_ms;
    sc.jobs.working_ms = job_ms;
    sc.request_log_limit = 1000;
    let sim = Simulator::start(sc).await.expect("simulator");
    let creds = dir.join("credentials.json");
    write(
        &creds,
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))
            .expect("credentials owner-only");
    }
    sim
}

struct Measured {
    record: RunRecord,
    sim: Counters,
}

/// One run of the sync `<dir>/<sync>.toml` through the whole pipeline, as `zdsync run` does it;
/// a run error ends the bench.
pub(crate) async fn run_once(dir: &Path, sync: &str) -> zdsync::run::RunOutcome {
    let path = dir.join(format!("{sync}.toml"));
    let cfg = SyncConfig::load(&path).expect("bench config is valid");
    let creds = credential_store(&cfg.zendesk.credentials, dir).expect("credentials");
    let client = Client::new(ClientOptions::from_config(&cfg.zendesk), creds)
        .await
        .expect("client");
    let ctx = RunContext {
        store: Arc::new(LocalStore::new(dir)),
        config: cfg,
        client,
        progress: Arc::new(Progress::default()),
    };
    let outcome = run(
        &ctx,
        &RunOptions {
            trigger: "bench".into(),
            ..Default::default()
        },
    )
    .await;
    if let Some(e) = &outcome.error {
        panic!("bench run of {sync} failed: {e}");
    }
    outcome
}

async fn one_run(dir: &Path, sync: &str, sim: &zdsync_sim::SimHandle) -> Measured {
    let before = sim.counters();
    let outcome = run_once(dir, sync).await;
    let after = sim.counters();
    Measured {
        record: outcome.records.last().expect("a record").clone(),
        sim: diff(&before, &after),
    }
}

fn diff(a: &Counters, b: &Counters) -> Counters {
    let mut d = b.clone();
    d.requests -= a.requests;
    d.rate_limited -= a.rate_limited;
    d.early_requests -= a.early_requests;
    for (k, v) in d.by_endpoint.iter_mut() {
        *v -= a.by_endpoint.get(k).copied().unwrap_or(0);
    }
    d
}

fn endpoints(c: &Counters) -> String {
    let mut v: Vec<_> = c.by_endpoint.iter().filter(|(_, n)| **n > 0).collect();
    v.sort();
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn bench_sync(b: SyncBench) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench_async(b));
}

async fn bench_async(b: SyncBench) {
    let dir = b.dir.join(format!("sync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sim = start_sim(&dir, b.rpm, b.job_ms).await;
    let base = sim.base_url();
    write(
        &dir.join("bench_users.toml"),
        &config(
            "bench_users",
            "users",
            "user_id",
            &base,
            b.rpm,
            USER_MAPPING,
        ),
    );
    write(
        &dir.join("bench_orgs.toml"),
        &config(
            "bench_orgs",
            "organizations",
            "org_id",
            &base,
            b.rpm,
            ORG_MAPPING,
        ),
    );
    write(
        &dir.join("exports/bench_users/part-0000.csv"),
        &users_csv(b.users, None),
    );
    write(
        &dir.join("exports/bench_orgs/part-0000.csv"),
        &orgs_csv(b.orgs, None),
    );
    println!(
        "zdsync-bench sync: {} users + {} organizations, simulator limit {} requests/min, jobs {} ms queued + {} ms working",
        b.users, b.orgs, b.rpm, b.job_ms, b.job_ms
    );
    let bound_per_min = b.rpm as f64 * 100.0;

    let mut total_rows = 0u64;
    let mut total_write = 0.0;
    let mut total_req = 0u64;
    let mut early = 0u64;
    let clock = Instant::now();
    for sync in ["bench_orgs", "bench_users"] {
        let m = one_run(&dir, sync, &sim).await;
        let r = &m.record;
        let rows = r.rows.created + r.rows.updated;
        let per_min = rows as f64 / (r.phases.write / 60.0);
        println!(
            "cold {sync:<12} {rows:>7} confirmed, {} failed · write {:.1} s → {:.0} rows/min = {:.3} of the bound · {} requests ({:.4}/row) · 429s {} · early {} · [{}]",
            r.rows.failed,
            r.phases.write,
            per_min,
            per_min / bound_per_min,
            r.requests.sent,
            r.requests.sent as f64 / rows.max(1) as f64,
            m.sim.rate_limited,
            m.sim.early_requests,
            endpoints(&m.sim)
        );
        total_rows += rows;
        total_write += r.phases.write;
        total_req += r.requests.sent;
        early += m.sim.early_requests;
    }
    let per_min = total_rows as f64 / (total_write / 60.0);
    println!(
        "cold load        {total_rows:>7} rows in {:.1} s writing ({:.1} s wall) → {:.3} of the bound (target ≥ 0.95) · {:.4} requests/row",
        total_write,
        clock.elapsed().as_secs_f64(),
        per_min / bound_per_min,
        total_req as f64 / total_rows.max(1) as f64
    );

    // 1 % changed.
    write(
        &dir.join("exports/bench_users/part-0000.csv"),
        &users_csv(b.users, Some(100)),
    );
    write(
        &dir.join("exports/bench_orgs/part-0000.csv"),
        &orgs_csv(b.orgs, Some(100)),
    );
    let mut changed = 0u64;
    let mut unchanged = 0u64;
    let mut sent = 0u64;
    let mut writes = 0u64;
    for sync in ["bench_users", "bench_orgs"] {
        let m = one_run(&dir, sync, &sim).await;
        let r = &m.record;
        let data: u64 = m
            .sim
            .by_endpoint
            .iter()
            .filter(|(k, _)| k.contains("many") && !k.starts_with("job_statuses"))
            .map(|(_, n)| *n)
            .sum();
        println!(
            "1 % {sync:<13} {:>6} changed, {:>7} unchanged · {} requests: [{}]",
            r.rows.updated + r.rows.created,
            r.rows.unchanged,
            r.requests.sent,
            endpoints(&m.sim)
        );
        changed += r.rows.updated + r.rows.created;
        unchanged += r.rows.unchanged;
        sent += r.requests.sent;
        writes += data;
        early += m.sim.early_requests;
    }
    println!(
        "1 % changed      {changed} rows sent, {unchanged} unchanged (0 requests for them) · {sent} requests in all = {:.4}/changed row (bulk writes alone {writes} = {:.4}; target ≤ 0.012)",
        sent as f64 / changed.max(1) as f64,
        writes as f64 / changed.max(1) as f64
    );

    if b.storm {
        // A 429 storm in the middle of a load: nothing may be sent while Retry-After runs.
        sim.set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit)
            .path("/api/v2/users/create_or_update_many")
            .skip(20)
            .times(3)
            .retry_after(2)]);
        write(
            &dir.join("exports/bench_users/part-0000.csv"),
            &users_csv(b.users, Some(10)),
        );
        let m = one_run(&dir, "bench_users", &sim).await;
        println!(
            "429 storm        {} rows updated · {} × 429 met · paused {:.1} s · requests sent while Retry-After was pending: {}",
            m.record.rows.updated,
            m.sim.rate_limited,
            m.record.requests.paused_ms as f64 / 1000.0,
            m.sim.early_requests
        );
        early += m.sim.early_requests;
        sim.clear_faults();
    }
    println!("requests sent while a Retry-After was pending, all runs: {early} (target 0)");
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
