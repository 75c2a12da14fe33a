//! `zdsync`: keep Zendesk Support users, organizations and tickets in step with warehouse
//! exports, from one machine, with a local folder in place of the S3 bucket.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use zdsync::config::SyncConfig;
use zdsync::plan::{plan, PlanError, PlanOptions, PlanReport};
use zdsync::store::LocalStore;

#[derive(Parser)]
#[command(name = "zdsync", version, about = "Reverse ETL into Zendesk Support: users, organizations and tickets from warehouse exports", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read the export, validate and map every row, diff against the last confirmed state and
    /// write the change set (chunks + manifest) under runs/<sync>/<run>/.
    Plan {
        /// The sync config (TOML; see the README for every key).
        config: PathBuf,
        /// Compute and print the summary without writing anything.
        #[arg(long)]
        dry_run: bool,
        /// The folder playing the bucket: export locations, state/ and runs/ are relative to it.
        /// Default: the config's folder (its parent when the config sits in a `config/` folder).
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        /// Print the report as JSON instead of the summary.
        #[arg(long)]
        json: bool,
        /// Invalid-row samples shown per reason.
        #[arg(long, default_value_t = 3)]
        samples: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan {
            config,
            dry_run,
            store,
            json,
            samples,
        } => run_plan(&config, dry_run, store, json, samples),
    }
}

/// The bucket root for a config: `--store`, else the config's folder (or its parent when the
/// config follows the bucket layout, `config/<sync>.toml`).
fn store_root(config: &Path, explicit: Option<PathBuf>) -> PathBuf {
    if let Some(s) = explicit {
        return s;
    }
    let dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir.file_name().is_some_and(|n| n == "config") {
        dir.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let salt = (now.timestamp_subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xffffff;
    format!("{}-{salt:06x}", now.format("%Y%m%dT%H%M%SZ"))
}

fn run_plan(
    config: &Path,
    dry_run: bool,
    store: Option<PathBuf>,
    json: bool,
    samples: usize,
) -> ExitCode {
    let cfg = match SyncConfig::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let root = store_root(config, store);
    let store = LocalStore::new(&root);
    let mut opts = PlanOptions::new(new_run_id());
    opts.dry_run = dry_run;
    opts.samples_per_reason = samples;
    match plan(&store, &cfg, &opts) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serialises")
                );
            } else {
                print_summary(&cfg, &root, &report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                PlanError::Export(_) => 3,
                PlanError::State(_) => 4,
                PlanError::Write { .. } => 5,
            })
        }
    }
}

fn num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_summary(cfg: &SyncConfig, root: &Path, r: &PlanReport) {
    let m = &r.manifest;
    let c = &m.counts;
    let bytes: u64 = m.parts.iter().map(|p| p.size).sum();
    println!(
        "zdsync plan{} · sync {} ({}, {}) · run {}",
        if r.manifest_key.is_none() {
            " --dry-run"
        } else {
            ""
        },
        m.sync,
        m.object,
        cfg.mode.as_str(),
        m.run_id
    );
    println!(
        "export      {} ({} file{}, {:.1} MB) in {}",
        m.location,
        m.parts.len(),
        if m.parts.len() == 1 { "" } else { "s" },
        bytes as f64 / 1e6,
        root.display()
    );
    println!(
        "state       {}",
        if r.state_rows == 0 {
            "none yet: every valid row is new".to_string()
        } else {
            format!(
                "{} keys from run {}",
                num(r.state_rows),
                m.base_state_run.as_deref().unwrap_or("?")
            )
        }
    );
    println!();
    println!("rows read   {:>12}", num(c.rows_read));
    println!("invalid     {:>12}", num(c.invalid));
    for (reason, s) in &r.invalid_by_reason {
        println!("  {reason:<22}{:>10}", num(s.count));
        for x in &s.samples {
            let pk =
                x.pk.as_deref()
                    .map(|p| format!(" key {p:?}"))
                    .unwrap_or_default();
            let at = if x.line > 0 {
                format!("{}:{}", x.file, x.line)
            } else {
                x.file.clone()
            };
            println!("      {at}{pk}: {}", x.message);
        }
    }
    println!("to create   {:>12}", num(c.create));
    println!("to update   {:>12}", num(c.update));
    println!("unchanged   {:>12}", num(c.unchanged));
    if c.skipped > 0 {
        println!(
            "skipped     {:>12}   (exist already; insert mode never updates)",
            num(c.skipped)
        );
    }
    println!(
        "removed     {:>12}   (in the last state, not in this export; left in Zendesk)",
        num(c.removed)
    );
    if c.retried > 0 {
        println!(
            "retried     {:>12}   (failed last run; included above)",
            num(c.retried)
        );
    }
    println!();
    match &r.manifest_key {
        Some(key) => {
            let creates = m
                .chunks
                .iter()
                .filter(|c| c.op == zdsync::changeset::Op::Create)
                .count();
            println!(
                "change set  {} chunk{} ({} create, {} update) → {}",
                m.chunks.len(),
                if m.chunks.len() == 1 { "" } else { "s" },
                creates,
                m.chunks.len() - creates,
                key
            );
            if let Some(k) = &m.invalid_key {
                println!("invalid rows with reasons → {k}");
            }
        }
        None => println!("dry run: nothing written"),
    }
    println!("planned in {:.2} s", r.seconds);
}
