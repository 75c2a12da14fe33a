//! zdsync benchmarks. They print numbers; targets live in the README and the issue notes, never
//! in tests (the machines are shared and noisy).
//!
//! `zdsync-bench plan --rows 10000000 --cores 1` generates a users export (CSV.gz), runs plan on
//! it with everything to create, confirms the change set (as write-batch would), changes 1 % of
//! the rows, plans again and checks that exactly the changed rows are in the change set. Each
//! plan runs in a child process pinned to `--cores` CPUs so its peak RSS is its own.

mod audience;
mod budget;
mod recovery;
mod sync;
mod timestamps;

use clap::{Parser, Subcommand};
use std::collections::HashSet;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use zdsync::changeset::{self, ChunkRow, Op, ResultRow, RowStatus};
use zdsync::config::SyncConfig;
use zdsync::layout;
use zdsync::plan::{plan, PlanOptions};
use zdsync::store::{LocalStore, ObjectStore};

#[derive(Parser)]
#[command(
    name = "zdsync-bench",
    about = "zdsync benchmarks (they print figures)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plan a generated users export twice: cold (all creates) and with 1 % changed.
    Plan {
        #[arg(long, default_value_t = 10_000_000)]
        rows: u64,
        /// CPUs the plan process may use (1 = Lambda-sized).
        #[arg(long, default_value_t = 1)]
        cores: usize,
        /// Working folder (generated exports are kept and reused).
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
    },
    /// Cold load of users and organizations through the whole pipeline against the simulator
    /// at its account rate limit, then a 1 % change run (and optionally a 429 storm).
    Sync {
        #[arg(long, default_value_t = 100_000)]
        users: usize,
        #[arg(long, default_value_t = 10_000)]
        orgs: usize,
        /// The simulator's account limit and the sync's budget, requests per minute (700 is
        /// Zendesk Enterprise; 6,000 runs the same shape ten times faster).
        #[arg(long, default_value_t = 6000)]
        rpm: u32,
        /// Milliseconds a job stays queued, and again working, in the simulator.
        #[arg(long, default_value_t = 0)]
        job_ms: u64,
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
        /// Also inject a 429 storm during a third run.
        #[arg(long)]
        storm: bool,
    },
    /// An audience sync (mirror) of `--members` users, then `--churn` % of them replaced,
    /// through the bulk and the per-record tag routes, against the simulator's rate limit.
    Audience {
        #[arg(long, default_value_t = 50_000)]
        members: usize,
        /// Percent of the members that leave (as many join) in the second run.
        #[arg(long, default_value_t = 2.0)]
        churn: f64,
        /// The simulator's account limit and the sync's budget, requests per minute.
        #[arg(long, default_value_t = 20_000)]
        rpm: u32,
        /// `bulk`, `per_record` or `both`.
        #[arg(long, default_value = "both")]
        route: String,
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
    },
    /// A tickets insert run clean, then killed halfway and finished by the next run: the
    /// requests and wall time of killed + resumed ÷ the clean run, against the simulator's
    /// rate limit.
    Recovery {
        #[arg(long, default_value_t = 5_000)]
        tickets: usize,
        /// The simulator's account limit and the sync's budget, requests per minute.
        #[arg(long, default_value_t = 700)]
        rpm: u32,
        /// Milliseconds a job stays queued, and again working, in the simulator.
        #[arg(long, default_value_t = 200)]
        job_ms: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
    },
    /// The account budget shared by every writer of one Zendesk account: rows/min against the
    /// bound, 429s and polls for one sync, three syncs at once, and the write-batch steps.
    Budget {
        /// `one` (R 700 and 6,000), `one700`, `one6000`, `three`, `steps` or `all`; `one6000:250`
        /// keeps only the cases whose jobs queue and work 250 ms each.
        #[arg(long, default_value = "all")]
        scenario: String,
        /// Runs of each scenario (the best is printed); default 2, 1 with `--quick`.
        #[arg(long)]
        repeat: Option<usize>,
        /// About 15 s per run instead of about 60 s (a smoke test).
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "bench-data")]
        dir: PathBuf,
    },
    /// The date-time parser on Snowflake's default TIMESTAMP_TZ text, against chrono parsing
    /// the same texts with a fixed format.
    Timestamps {
        #[arg(long, default_value_t = 2_000_000)]
        values: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Internal: one preview (`zdsync plan --offline`) in this process, printing JSON figures.
    #[command(hide = true)]
    PreviewOnce { dir: PathBuf, cores: usize },
    /// Internal: one plan run in this process, printing JSON figures.
    #[command(hide = true)]
    PlanOnce {
        dir: PathBuf,
        run: String,
        cores: usize,
    },
    /// Internal: gunzip the export only, for the decompression floor.
    #[command(hide = true)]
    GunzipOnce { file: PathBuf, cores: usize },
}

const CONFIG: &str = r#"
name = "bench_users"
object = "users"
mode = "upsert"
primary_key = "user_id"

[source]
location = "exports/bench_users/"

[zendesk]
subdomain = "bench"

[mapping]
name = "full_name"
email = "email"
phone = "phone"
tags = { column = "segments", split = "comma" }
"user_fields.plan" = { column = "plan", type = "dropdown" }
"user_fields.customer_since" = { column = "customer_since", type = "date" }
"user_fields.lifetime_value" = { column = "ltv", type = "decimal" }
"#;

fn main() {
    // Warnings (a failing shared budget, a lower account limit) reach stderr; `ZDSYNC_LOG`
    // sets another level.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZDSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match Cli::parse().command {
        Cmd::Plan { rows, cores, dir } => bench_plan(rows, cores, &dir),
        Cmd::PlanOnce { dir, run, cores } => plan_once(&dir, &run, cores),
        Cmd::PreviewOnce { dir, cores } => preview_once(&dir, cores),
        Cmd::Timestamps { values, rounds } => timestamps::bench_timestamps(values, rounds),
        Cmd::Sync {
            users,
            orgs,
            rpm,
            job_ms,
            dir,
            storm,
        } => sync::bench_sync(sync::SyncBench {
            users,
            orgs,
            rpm,
            job_ms,
            dir,
            storm,
        }),
        Cmd::Audience {
            members,
            churn,
            rpm,
            route,
            dir,
        } => audience::bench_audience(audience::AudienceBench {
            members,
            churn_percent: churn,
            rpm,
            dir,
            route,
        }),
        Cmd::Recovery {
            tickets,
            rpm,
            job_ms,
            rounds,
            dir,
        } => recovery::bench_recovery(recovery::RecoveryBench {
            tickets,
            rpm,
            job_ms,
            rounds,
            dir,
        }),
        Cmd::Budget {
            scenario,
            repeat,
            quick,
            dir,
        } => budget::bench_budget(budget::BudgetBench {
            scenario,
            quick,
            repeat: repeat.unwrap_or(if quick { 1 } else { 2 }),
            dir,
        }),
        Cmd::GunzipOnce { file, cores } => gunzip_once(&file, cores),
    }
}

fn pin(cores: usize) {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..cores.max(1) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    ru.ru_maxrss as f64 / 1024.0
}

/// One row of the generated export, about 120 bytes. `version` changes the score of the rows
/// chosen by `changed`.
fn write_row(out: &mut impl Write, i: u64, changed: bool) -> std::io::Result<()> {
    const PLANS: [&str; 4] = ["starter", "pro", "enterprise", "trial"];
    const SEGMENTS: [&str; 4] = [
        "\"vip,early_adopter\"",
        "newsletter",
        "\"trial,webinar\"",
        "",
    ];
    let ltv_cents = (i * 7919) % 10_000_000 + if changed { 1 } else { 0 };
    writeln!(
        out,
        "u{i:010},Customer Number {i},customer.{i}@example-mail.com,+1-555-{:07},{},20{:02}-{:02}-{:02},{}.{:02},{}",
        i % 10_000_000,
        PLANS[(i % 4) as usize],
        10 + i % 15,
        1 + i % 12,
        1 + i % 28,
        ltv_cents / 100,
        ltv_cents % 100,
        SEGMENTS[(i % 4) as usize]
    )
}

fn generate(path: &Path, rows: u64, changed_every: Option<u64>) {
    if path.exists() {
        return;
    }
    let t = Instant::now();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_extension("tmp");
    let file = std::fs::File::create(&tmp).unwrap();
    let gz = flate2::write::GzEncoder::new(
        BufWriter::with_capacity(1 << 20, file),
        flate2::Compression::fast(),
    );
    let mut out = BufWriter::with_capacity(1 << 20, gz);
    out.write_all(b"user_id,full_name,email,phone,plan,customer_since,ltv,segments\n")
        .unwrap();
    for i in 0..rows {
        let changed = changed_every.is_some_and(|k| i % k == 0);
        write_row(&mut out, i, changed).unwrap();
    }
    out.into_inner()
        .ok()
        .unwrap()
        .finish()
        .unwrap()
        .into_inner()
        .ok()
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::rename(&tmp, path).unwrap();
    eprintln!(
        "generated {} in {:.1} s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
}

fn plan_once(dir: &Path, run: &str, cores: usize) {
    pin(cores);
    let store = LocalStore::new(dir);
    let cfg = SyncConfig::parse(CONFIG, "bench.toml").unwrap();
    let t = Instant::now();
    let report = plan(&store, &cfg, &PlanOptions::new(run)).unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"seconds": secs, "rss_mib": peak_rss_mib(), "counts": report.manifest.counts, "chunks": report.manifest.chunks.len()})
    );
}

fn preview_once(dir: &Path, cores: usize) {
    pin(cores);
    let store: std::sync::Arc<dyn ObjectStore> = std::sync::Arc::new(LocalStore::new(dir));
    let cfg = SyncConfig::parse(CONFIG, "bench.toml").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Instant::now();
    let p = rt
        .block_on(zdsync::preview::preview(
            store,
            &cfg,
            None,
            &zdsync::preview::PreviewOptions::new("preview"),
            None,
        ))
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"seconds": secs, "rss_mib": peak_rss_mib(), "counts": p.report.manifest.counts})
    );
}

fn gunzip_once(file: &Path, cores: usize) {
    pin(cores);
    let t = Instant::now();
    let mut d = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(file).unwrap(),
    ));
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = d.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    println!(
        "{}",
        serde_json::json!({"seconds": t.elapsed().as_secs_f64(), "bytes": total})
    );
}

fn child(args: &[&str]) -> serde_json::Value {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe).args(args).output().unwrap();
    if !out.status.success() {
        panic!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What write-batch would record: every row of every chunk confirmed, with an id.
fn confirm_all(store: &LocalStore, run: &str) {
    let m = changeset::read_manifest(store, &layout::manifest_key("bench_users", run)).unwrap();
    for c in &m.chunks {
        let mut out = Vec::new();
        for row in changeset::read_jsonl::<ChunkRow>(store, &c.key).unwrap() {
            let id = 1 + row.key.trim_start_matches('u').parse::<u64>().unwrap();
            let r = ResultRow {
                index: row.index,
                key: row.key,
                status: RowStatus::Confirmed,
                zendesk_id: Some(id),
                error: None,
                unknown: false,
                action: None,
            };
            serde_json::to_writer(&mut out, &r).unwrap();
            out.push(b'\n');
        }
        store
            .put(
                &layout::batch_results_key(&m.sync, run, layout::chunk_name(&c.key), "b0"),
                &out,
            )
            .unwrap();
    }
    changeset::fold(store, &m).unwrap();
}

fn bench_plan(rows: u64, cores: usize, dir: &Path) {
    let data = dir.join(format!("rows-{rows}"));
    let v1 = data.join("v1/exports/bench_users/users.csv.gz");
    let v2 = data.join("v2/exports/bench_users/users.csv.gz");
    generate(&v1, rows, None);
    generate(&v2, rows, Some(100));
    let size = std::fs::metadata(&v1).unwrap().len();

    let floor = child(&["gunzip-once", v1.to_str().unwrap(), &cores.to_string()]);
    let floor_s = floor["seconds"].as_f64().unwrap();
    let raw_bytes = floor["bytes"].as_u64().unwrap();

    // A fresh bucket whose export is swapped between the runs.
    let bucket = data.join("bucket");
    let _ = std::fs::remove_dir_all(&bucket);
    std::fs::create_dir_all(bucket.join("exports/bench_users")).unwrap();
    let export = bucket.join("exports/bench_users/users.csv.gz");
    std::fs::hard_link(&v1, &export).unwrap();
    let first = child(&[
        "plan-once",
        bucket.to_str().unwrap(),
        "run-1",
        &cores.to_string(),
    ]);

    let store = LocalStore::new(&bucket);
    let t = Instant::now();
    confirm_all(&store, "run-1");
    let confirm_s = t.elapsed().as_secs_f64();

    std::fs::remove_file(&export).unwrap();
    std::fs::hard_link(&v2, &export).unwrap();
    let second = child(&[
        "plan-once",
        bucket.to_str().unwrap(),
        "run-2",
        &cores.to_string(),
    ]);

    // The preview of the same run: the plan's own work into a scratch folder.
    let preview = child(&["preview-once", bucket.to_str().unwrap(), &cores.to_string()]);
    assert_eq!(
        preview["counts"], second["counts"],
        "the preview counts what the plan counts"
    );

    // Exactly the changed rows must be in the change set.
    let m =
        changeset::read_manifest(&store, &layout::manifest_key("bench_users", "run-2")).unwrap();
    let mut sent = HashSet::new();
    for c in &m.chunks {
        assert_eq!(c.op, Op::Update);
        for row in changeset::read_jsonl::<ChunkRow>(&store, &c.key).unwrap() {
            sent.insert(row.key.trim_start_matches('u').parse::<u64>().unwrap());
        }
    }
    let expected: HashSet<u64> = (0..rows).step_by(100).collect();
    let exact = sent == expected;

    let line = |name: &str, r: &serde_json::Value| {
        let s = r["seconds"].as_f64().unwrap();
        println!(
            "{name:<26} {:>8.2} s  {:>12.0} rows/s  {:>6.2} × gunzip  peak RSS {:>6.0} MiB  create {} update {} unchanged {}",
            s,
            rows as f64 / s,
            s / floor_s,
            r["rss_mib"].as_f64().unwrap(),
            r["counts"]["create"],
            r["counts"]["update"],
            r["counts"]["unchanged"]
        );
    };
    println!(
        "plan bench: {rows} rows, export {:.0} MB gzip / {:.0} MB CSV ({:.0} B/row), {cores} core(s)",
        size as f64 / 1e6,
        raw_bytes as f64 / 1e6,
        raw_bytes as f64 / rows as f64
    );
    println!(
        "{:<26} {:>8.2} s  (decompression floor on the same cores)",
        "gunzip only", floor_s
    );
    line("plan, first run", &first);
    line("plan, 1 % changed", &second);
    line("preview, 1 % changed", &preview);
    println!(
        "preview ÷ plan (same export and state): {:.2}",
        preview["seconds"].as_f64().unwrap() / second["seconds"].as_f64().unwrap()
    );
    println!(
        "change set of run 2: {} rows, exactly the {} changed rows: {}",
        sent.len(),
        expected.len(),
        if exact { "yes" } else { "NO" }
    );
    println!(
        "(confirming run 1 and folding it into the state took {confirm_s:.1} s; not part of plan)"
    );
    if !exact {
        std::process::exit(1);
    }
}
