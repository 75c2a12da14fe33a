//! `zdsync-bench budget`: how close the shared Zendesk budget lets writers of one account come
//! to the account's bound, and whether they ever overshoot it.
//!
//! Every run gets a fresh simulator (a fresh account: limit R requests per 60 s window) and a
//! fresh `ZDSYNC_BUDGET_DIR`; every sync sets `rate_limit_rpm` = R, so any overshoot shows as a
//! 429. The bound is B = min(R × 100, slots × 100 × 60 ÷ job_seconds) rows/min, job_seconds the
//! time a job takes in the simulator (queued + working). Scenarios:
//! - `one`: one users sync (create_or_update_many) at R 700 and 6,000, jobs 0, 250+250 and
//!   500+500 ms;
//! - `three`: a users, an organizations and a second users sync of one account at once, each
//!   through the CLI's pipeline in its own task;
//! - `steps`: one users sync through the Lambda steps (plan, write-batch per chunk as many at a
//!   time like the Distributed Map, each invocation with its own client, finalize).
//!
//! Each line is the run with the best ratio of `--repeat`.

use crate::sync::{run_once, start_sim, write};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zdsync::changeset::ChunkInfo;
use zdsync::config::DEFAULT_CHUNK_ROWS;
use zdsync::record::RunRecord;
use zdsync::steps::{self, FinalizeState, PlannedRun, StepEnv, WriteInput};
use zdsync::store::LocalStore;
use zdsync::write::WriteOptions;
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::Counters;

pub struct BudgetBench {
    pub scenario: String,
    pub quick: bool,
    pub repeat: usize,
    pub dir: PathBuf,
}

/// Job slots of an account (the simulator's `max_concurrent`, zdsync's `max_jobs_in_flight`).
const SLOTS: f64 = 30.0;
/// Milliseconds a job stays queued, and again working, in the shared scenarios.
const SHARED_JOB_MS: u64 = 500;
/// The template's `DefaultMaxConcurrency`: the plan step sizes the Map's concurrency within it.
const DEFAULT_MAX_CONCURRENCY: u32 = 8;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// One sync through the CLI pipeline.
    One,
    /// Three syncs of one account at once, each through the CLI pipeline.
    Three,
    /// One sync through the Lambda steps, chunks written as many at a time as the plan sizes
    /// the Map's concurrency.
    Steps,
}

struct Case {
    label: String,
    kind: Kind,
    rpm: u32,
    job_ms: u64,
    rows: u64,
    /// The sync's `chunk_rows` (rows per write-batch invocation in `steps`).
    chunk_rows: usize,
}

impl Case {
    fn job_seconds(&self) -> f64 {
        2.0 * self.job_ms as f64 / 1000.0
    }

    /// B, rows per minute.
    fn bound(&self) -> f64 {
        let requests = self.rpm as f64 * 100.0;
        if self.job_ms == 0 {
            requests
        } else {
            requests.min(SLOTS * 100.0 * 60.0 / self.job_seconds())
        }
    }
}

/// What one run measured.
#[derive(Clone)]
struct Measured {
    rows: u64,
    failed: u64,
    /// Wall time of the writing: first write to last write done, all writers together.
    secs: f64,
    /// The same span as unix seconds (start, end).
    span: (f64, f64),
    /// Requests per minute the simulator saw during the span ÷ R.
    used: f64,
    /// Of the whole 6 s windows inside the span: requests the clients took from the shared
    /// windows ÷ what the windows held (granted but never sent = slices left unspent).
    granted: Option<f64>,
    /// Mean job-slot leases held in the shared store during the span ÷ slots.
    slots: Option<f64>,
    /// Most requests the simulator saw in any 60 s of the run ÷ R (runs of 60 s or more).
    max60: Option<f64>,
    /// write-batch invocations at once (`steps`: the Map's concurrency the plan chose).
    invocations: Option<u32>,
    sim: Counters,
    load: f64,
}

impl Measured {
    /// What the writers reported; the rest is filled in from the samples after the run.
    fn writing(rows: u64, failed: u64, span: (f64, f64)) -> Measured {
        Measured {
            rows,
            failed,
            secs: span.1 - span.0,
            span,
            used: 0.0,
            granted: None,
            slots: None,
            max60: None,
            invocations: None,
            sim: Counters::default(),
            load: 0.0,
        }
    }

    fn per_min(&self) -> f64 {
        self.rows as f64 / (self.secs / 60.0)
    }

    fn polls(&self) -> u64 {
        self.sim
            .by_endpoint
            .iter()
            .filter(|(k, _)| k.starts_with("job_statuses."))
            .map(|(_, n)| *n)
            .sum()
    }
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Requests the simulator had answered by `t` (unix s), from samples taken every 50 ms.
fn requests_at(samples: &[(f64, u64)], t: f64) -> f64 {
    let i = samples.partition_point(|s| s.0 <= t);
    match (i.checked_sub(1).map(|j| samples[j]), samples.get(i)) {
        (Some(a), Some(b)) if b.0 > a.0 => {
            a.1 as f64 + (b.1 as f64 - a.1 as f64) * (t - a.0) / (b.0 - a.0)
        }
        (Some(a), _) => a.1 as f64,
        (None, Some(b)) => b.1 as f64,
        (None, None) => 0.0,
    }
}

/// The account's record in the run's budget folder (one account): window, requests taken
/// from it, job-slot leases held.
fn budget_record(dir: &Path) -> Option<(u64, u64, usize)> {
    let file = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))?;
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
    Some((
        v["window"].as_u64()?,
        v["used"].as_u64()?,
        v["jobs"].as_object().map_or(0, |j| j.len()),
    ))
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn cases(scenario: &str, quick: bool) -> Vec<Case> {
    // Rows for about this long at the bound.
    let secs = if quick { 15.0 } else { 60.0 };
    let rows_for = |rpm: u32, job_ms: u64| {
        let c = Case {
            label: String::new(),
            kind: Kind::One,
            rpm,
            job_ms,
            rows: 0,
            chunk_rows: DEFAULT_CHUNK_ROWS,
        };
        ((c.bound() * secs / 60.0 / 1000.0).round() as u64 * 1000).max(1000)
    };
    let mut out = Vec::new();
    let all = scenario == "all";
    if all || scenario == "one" || scenario == "one700" || scenario == "one6000" {
        let rpms: &[u32] = match scenario {
            "one700" => &[700],
            "one6000" => &[6000],
            _ => &[700, 6000],
        };
        for &rpm in rpms {
            // Jobs of 0 ms, of 500 ms (250 queued + 250 working) and of 1 s.
            for job_ms in [0, 250, 500] {
                out.push(Case {
                    label: "one users".into(),
                    kind: Kind::One,
                    rpm,
                    job_ms,
                    rows: rows_for(rpm, job_ms),
                    chunk_rows: DEFAULT_CHUNK_ROWS,
                });
            }
        }
    }
    if all || scenario == "three" {
        out.push(Case {
            label: "three syncs".into(),
            kind: Kind::Three,
            rpm: 700,
            job_ms: SHARED_JOB_MS,
            rows: rows_for(700, SHARED_JOB_MS),
            chunk_rows: DEFAULT_CHUNK_ROWS,
        });
    }
    if all || scenario == "steps" {
        // Every invocation polls its chunk's last jobs before it returns: at least one poll
        // per chunk, so the chunk size sets a floor on polls per 100 rows.
        for chunk_rows in [DEFAULT_CHUNK_ROWS, 5000] {
            out.push(Case {
                label: format!("steps c{chunk_rows}"),
                kind: Kind::Steps,
                rpm: 700,
                job_ms: SHARED_JOB_MS,
                rows: rows_for(700, SHARED_JOB_MS),
                chunk_rows,
            });
        }
    }
    out
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.2}"))
}

pub fn bench_budget(b: BudgetBench) {
    // `one6000:250` runs only that scenario's cases with 250 ms job phases.
    let (scenario, job_ms) = match b.scenario.split_once(':') {
        Some((s, ms)) => (s, ms.parse::<u64>().ok()),
        None => (b.scenario.as_str(), None),
    };
    let cases: Vec<Case> = cases(scenario, b.quick)
        .into_iter()
        .filter(|c| job_ms.is_none_or(|ms| c.job_ms == ms))
        .collect();
    if cases.is_empty() {
        eprintln!(
            "unknown scenario {:?}: one, one700, one6000, three, steps or all (one…:MS for one job time)",
            b.scenario
        );
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Absolute, so credentials and exports resolve whatever the working folder.
    let root = std::env::current_dir()
        .expect("working folder")
        .join(&b.dir)
        .join(format!("budget-{}", std::process::id()));
    println!(
        "zdsync-bench budget: best ratio of {} run(s) each; fresh simulator account (R requests per 60 s) and budget folder per run; rate_limit_rpm = R; {} job slots; B = min(R×100, slots×100×60÷job_s) rows/min; load = 1-min load average at the run's end ({} cores)",
        b.repeat,
        SLOTS,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<15} {:>5} {:>9} {:>7} {:>7} {:>8} {:>8} {:>6} {:>13} {:>15} {:>7} {:>5} {:>9} {:>7} {:>5} {:>5} {:>5} {:>5} {:>5}",
        "scenario",
        "R",
        "job ms",
        "rows",
        "write s",
        "rows/min",
        "B",
        "ratio",
        "(each run)",
        "429 acct/job/ep",
        "429 all",
        "jobs≤",
        "polls/100",
        "req/100",
        "used",
        "grant",
        "slots",
        "max60",
        "load"
    );
    for (n, case) in cases.iter().enumerate() {
        let mut runs: Vec<Measured> = Vec::new();
        for k in 0..b.repeat.max(1) {
            let dir = root.join(format!("case{n}-run{k}"));
            let _ = std::fs::remove_dir_all(&dir);
            let m = rt.block_on(run_case(case, &dir));
            if m.failed > 0 {
                eprintln!("{}: {} rows failed", case.label, m.failed);
            }
            runs.push(m);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let bound = case.bound();
        let ratios: Vec<String> = runs
            .iter()
            .map(|m| format!("{:.3}", m.per_min() / bound))
            .collect();
        let best = runs
            .iter()
            .max_by(|a, b| a.per_min().total_cmp(&b.per_min()))
            .expect("at least one run");
        let s = &best.sim;
        println!(
            "{:<15} {:>5} {:>9} {:>7} {:>7.1} {:>8.0} {:>8.0} {:>6.3} {:>13} {:>15} {:>7} {:>5} {:>9.2} {:>7.2} {:>5.2} {:>5} {:>5} {:>5} {:>5.2}",
            match best.invocations {
                Some(n) => case.label.replacen("steps", &format!("steps×{n}"), 1),
                None => case.label.clone(),
            },
            case.rpm,
            format!("{}+{}", case.job_ms, case.job_ms),
            best.rows,
            best.secs,
            best.per_min(),
            bound,
            best.per_min() / bound,
            ratios.join("/"),
            format!(
                "{}/{}/{}",
                s.rate_limited_account, s.rate_limited_jobs, s.rate_limited_endpoint
            ),
            runs.iter().map(|m| m.sim.rate_limited).sum::<u64>(),
            s.max_concurrent_jobs,
            best.polls() as f64 * 100.0 / best.rows.max(1) as f64,
            s.requests as f64 * 100.0 / best.rows.max(1) as f64,
            best.used,
            opt(best.granted),
            opt(best.slots),
            best.max60.map_or("-".to_string(), |v| format!("{v:.2}")),
            best.load
        );
    }
    println!("429 acct/job/ep: the best run's 429s (account limit, job cap, endpoint limits); 429 all: every run's; jobs≤: most jobs open at once; polls/100, req/100: job polls, and requests of all kinds, per 100 rows confirmed; used: requests/min while writing ÷ R; grant: requests taken from the shared 6 s windows ÷ their cap (whole windows while writing); slots: mean job slots leased ÷ 30; max60: most requests in any 60 s of the run ÷ R");
    let _ = std::fs::remove_dir_all(&root);
}

async fn run_case(case: &Case, dir: &Path) -> Measured {
    std::fs::create_dir_all(dir).expect("run folder");
    // The budget of this run alone, before any client is built.
    let budget = dir.join("budget");
    std::fs::create_dir_all(&budget).expect("budget folder");
    std::env::set_var("ZDSYNC_BUDGET_DIR", &budget);
    let sim = start_sim(dir, case.rpm, case.job_ms).await;
    let base = sim.base_url();
    let work = async {
        match case.kind {
            Kind::One => {
                setup(
                    dir,
                    "",
                    "b_users",
                    Object::Users,
                    case.rows,
                    &base,
                    case.rpm,
                    0,
                );
                cli_runs(dir, &["b_users"]).await
            }
            Kind::Three => {
                let third = (case.rows / 3 / 100).max(1) * 100;
                setup(dir, "", "b_users", Object::Users, third, &base, case.rpm, 0);
                setup(dir, "", "b_orgs", Object::Orgs, third, &base, case.rpm, 0);
                setup(
                    dir,
                    "",
                    "b_users2",
                    Object::Users,
                    third,
                    &base,
                    case.rpm,
                    5_000_000,
                );
                cli_runs(dir, &["b_users", "b_orgs", "b_users2"]).await
            }
            Kind::Steps => {
                setup(
                    dir,
                    "config/",
                    "b_steps",
                    Object::Users,
                    case.rows,
                    &base,
                    case.rpm,
                    0,
                );
                let cfg = dir.join("config/b_steps.toml");
                let text = std::fs::read_to_string(&cfg).expect("config");
                write(
                    &cfg,
                    &text.replacen(
                        "\n\n[source]",
                        &format!("\nchunk_rows = {}\n\n[source]", case.chunk_rows),
                        1,
                    ),
                );
                step_runs(dir, "b_steps").await
            }
        }
    };
    // What the simulator answered over time, for the budget's use and any 60 s's peak.
    tokio::pin!(work);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    // (unix s, window, taken from it, job leases) as the budget store holds them.
    let mut store: Vec<(f64, u64, u64, usize)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut m = loop {
        tokio::select! {
            m = &mut work => break m,
            _ = tick.tick() => {
                let t = unix_secs();
                samples.push((t, sim.counters().requests));
                if let Some((w, used, jobs)) = budget_record(&budget) {
                    store.push((t, w, used, jobs));
                }
            }
        }
    };
    samples.push((unix_secs(), sim.counters().requests));
    let rpm = f64::from(case.rpm);
    let (start, end) = m.span;
    m.used =
        (requests_at(&samples, end) - requests_at(&samples, start)) / ((end - start) / 60.0) / rpm;
    // Whole windows inside the span: what was taken from each (its last sample) ÷ its cap.
    let win = zdsync::zendesk::budget::WINDOW.as_secs_f64();
    let cap = f64::from(zdsync::zendesk::budget::per_minute(case.rpm)) / 10.0;
    let (first, end_w) = ((start / win).ceil() as u64, (end / win).floor() as u64);
    let taken: Vec<f64> = (first..end_w)
        .filter_map(|w| {
            store
                .iter()
                .filter(|s| s.1 == w)
                .map(|s| s.2 as f64)
                .reduce(f64::max)
        })
        .collect();
    m.granted = (!taken.is_empty()).then(|| taken.iter().sum::<f64>() / (taken.len() as f64 * cap));
    let held: Vec<f64> = store
        .iter()
        .filter(|s| s.0 >= start && s.0 <= end)
        .map(|s| s.3 as f64)
        .collect();
    m.slots = (!held.is_empty()).then(|| held.iter().sum::<f64>() / held.len() as f64 / SLOTS);
    let last = samples.last().map_or(0.0, |s| s.0);
    m.max60 = samples
        .iter()
        .filter(|s| s.0 + 60.0 <= last)
        .map(|s| (requests_at(&samples, s.0 + 60.0) - s.1 as f64) / rpm)
        .reduce(f64::max);
    m.sim = sim.counters();
    m.load = load_average();
    sim.shutdown().await;
    m
}

#[derive(Clone, Copy)]
enum Object {
    Users,
    Orgs,
}

/// The export and the config of one sync (the config under `config_dir`: the CLI reads
/// `<dir>/<name>.toml`, the steps `config/<name>.toml`); keys start at `first`.
#[allow(clippy::too_many_arguments)]
fn setup(
    dir: &Path,
    config_dir: &str,
    name: &str,
    object: Object,
    rows: u64,
    base: &str,
    rpm: u32,
    first: u64,
) {
    let (object_name, pk, mapping, csv) = match object {
        Object::Users => (
            "users",
            "user_id",
            "name = \"full_name\"\nemail = \"email\"\n\"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }\n\"user_fields.lifetime_value\" = { column = \"ltv\", type = \"decimal\" }\n",
            users_csv(first, rows),
        ),
        Object::Orgs => (
            "organizations",
            "org_id",
            "name = \"name\"\ndomain_names = { column = \"domain\", split = \"comma\" }\nnotes = \"notes\"\n",
            orgs_csv(first, rows),
        ),
    };
    write(&dir.join(format!("exports/{name}/part-0000.csv")), &csv);
    write(
        &dir.join(format!("{config_dir}{name}.toml")),
        &format!(
            "name = \"{name}\"\nobject = \"{object_name}\"\nmode = \"upsert\"\nprimary_key = \"{pk}\"\n\n[source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{base}\"\ncredentials = \"file:credentials.json\"\nrate_limit_rpm = {rpm}\n\n[mapping]\n{mapping}"
        ),
    );
}

fn users_csv(first: u64, n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 90);
    s.push_str("user_id,full_name,email,plan,ltv\n");
    for i in first..first + n {
        let _ = writeln!(
            s,
            "u{i:08},Customer {i},customer.{i}@example-mail.com,{},{}.{:02}",
            ["Free", "Pro", "Enterprise"][(i % 3) as usize],
            (i * 7919) % 100_000,
            i % 100
        );
    }
    s
}

fn orgs_csv(first: u64, n: u64) -> String {
    let mut s = String::with_capacity(n as usize * 70);
    s.push_str("org_id,name,domain,notes\n");
    for i in first..first + n {
        let _ = writeln!(s, "o{i:07},Company {i},company{i}.example.com,imported");
    }
    s
}

/// The syncs run at once, each in its own task through the CLI's pipeline. The writing spans
/// from the first write phase's start to the last one's end.
async fn cli_runs(dir: &Path, syncs: &[&str]) -> Measured {
    let tasks: Vec<_> = syncs
        .iter()
        .map(|s| {
            let (dir, s) = (dir.to_path_buf(), s.to_string());
            // The run's future is not provably `Send` (a higher-ranked lifetime the compiler
            // cannot see through), so each sync is driven by its own blocking task; what it
            // spawns (job polling, file work) runs on the shared runtime as in the CLI.
            let rt = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let outcome = rt.block_on(run_once(&dir, &s));
                outcome.records.last().expect("a run record").clone()
            })
        })
        .collect();
    let mut records: Vec<RunRecord> = Vec::new();
    for t in tasks {
        records.push(t.await.expect("sync task"));
    }
    let spans: Vec<(f64, f64)> = records.iter().map(write_span).collect();
    let start = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    Measured::writing(
        records
            .iter()
            .map(|r| r.rows.created + r.rows.updated)
            .sum(),
        records.iter().map(|r| r.rows.failed).sum(),
        (start, end),
    )
}

/// A run's write phase as unix seconds (start, end): it follows preflight, schema and plan.
fn write_span(r: &RunRecord) -> (f64, f64) {
    let started = chrono::DateTime::parse_from_rfc3339(&r.started_at)
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
        .expect("run record start time");
    let p = &r.phases;
    let start = started + p.preflight + p.schema + p.plan;
    (start, start + p.write)
}

/// The Lambda steps on `dir` as the bucket: plan, every chunk by its own write-batch
/// invocation (its own client, as a Lambda builds one), as many at a time as the plan's
/// `max_concurrency` (the Map's), finalize.
async fn step_runs(dir: &Path, sync: &str) -> Measured {
    let env = step_env(dir);
    let trigger = steps::parse_trigger(&serde_json::json!({"sync": sync})).expect("trigger");
    let d = steps::plan_step(&env, &trigger).await.expect("plan step");
    let text = std::fs::read_to_string(dir.join(&d.chunks_key)).expect("chunk list");
    let chunks: Vec<ChunkInfo> = serde_json::from_str(&text).expect("chunk list parses");
    let gate = Arc::new(tokio::sync::Semaphore::new(d.max_concurrency as usize));
    let invocations = d.max_concurrency;
    let (t, start) = (Instant::now(), unix_secs());
    let mut set = tokio::task::JoinSet::new();
    for chunk in chunks {
        let input = WriteInput {
            sync: d.sync.clone(),
            run_id: d.run_id.clone(),
            manifest_key: d.manifest_key.clone(),
            chunk,
            error: None,
        };
        let (env, gate) = (env.clone(), gate.clone());
        set.spawn(async move {
            let _slot = gate.acquire_owned().await.expect("gate");
            steps::write_step(&env, &input).await
        });
    }
    let (mut rows, mut failed) = (0, 0);
    while let Some(r) = set.join_next().await {
        let out = r.expect("write task").expect("write step");
        rows += out.created + out.updated;
        failed += out.failed;
    }
    let (secs, end) = (t.elapsed().as_secs_f64(), unix_secs());
    let state = FinalizeState {
        plan: Some(PlannedRun { run: d }),
        error: None,
    };
    let record = steps::finalize_step(&env, &state)
        .await
        .expect("finalize step")
        .expect("a run record");
    assert_eq!(
        record.rows.created + record.rows.updated,
        rows,
        "finalize counts what the write-batch invocations confirmed"
    );
    Measured {
        secs,
        invocations: Some(invocations),
        ..Measured::writing(rows, failed, (start, end))
    }
}

/// A deployment's step environment on a local folder: each client built as the Lambdas build
/// theirs (`ClientOptions::from_config`, so with the machine's shared budget).
fn step_env(root: &Path) -> StepEnv {
    let base = root.to_path_buf();
    let client_for: steps::ClientFactory = Arc::new(move |cfg| {
        let (opts, creds) = (
            ClientOptions::from_config(&cfg.zendesk),
            cfg.zendesk.credentials.clone(),
        );
        let base = base.clone();
        Box::pin(async move { Client::new(opts, credential_store(&creds, &base)?).await })
    });
    StepEnv {
        store: Arc::new(LocalStore::new(root)),
        bucket: "zdsync-bench".into(),
        client_for,
        default_concurrency: DEFAULT_MAX_CONCURRENCY,
        lock_ttl: Duration::from_secs(3600),
        write: WriteOptions::default(),
        endpoint: zdsync::config::EndpointPolicy::default(),
        lock_check: Duration::from_secs(10),
        abort_grace: Duration::ZERO,
        settle: Duration::ZERO,
    }
}
