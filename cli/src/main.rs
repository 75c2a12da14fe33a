//! `zdsync`: keep Zendesk Support users, organizations and tickets in step with warehouse
//! exports, from one machine, with a local folder in place of the S3 bucket.

mod connect_cmd;
mod demo;
mod run_cmd;
mod schema_cmd;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zdsync::audience;
use zdsync::config::SyncConfig;
use zdsync::plan::{PlanError, PlanOptions, PlanReport};
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
    /// Sync once: preflight, plan, bulk writes with job polling, finalize; prints the run
    /// report. Exit code 0 = succeeded, 1 = completed with refused or failed rows, 2 config,
    /// 3 export, 4 state, 5 Zendesk/store failure mid-run, 6 credentials/subdomain/scope,
    /// 7 another run holds the lock.
    Run {
        config: PathBuf,
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        /// Print the run records as JSON.
        #[arg(long)]
        json: bool,
        /// No progress bar (it is also off when stderr is not a terminal or CI is set).
        #[arg(long)]
        quiet: bool,
        /// Seconds to wait for another run of the same sync to finish before giving up.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// Send every row again, changed or not, without creating any record twice (tickets:
        /// their ids are first read back from Zendesk with the incremental export).
        #[arg(long)]
        full_resync: bool,
    },
    /// Connect a Zendesk account: sign in with OAuth (browser, or `--grant client-credentials`)
    /// or check an admin's API token (`--api-token`), and store the credentials in a local file
    /// (owner-only) or a Secrets Manager secret. `--check` reports what a stored credential can
    /// do. Exit code 0 = connected, 2 config, 6 credentials/subdomain/scope refused.
    Connect(connect_cmd::ConnectArgs),
    /// Read the custom fields of the sync's object from Zendesk, check the mapping against them
    /// and print them (options, types, which column feeds each field).
    Schema {
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Past runs of a sync, newest first.
    History {
        config: PathBuf,
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Start the built-in Zendesk simulator, write an example export and configs, sync users
    /// and organizations, change a few rows, sync again, and print both run reports.
    Demo {
        /// Folder for the demo's bucket (default: a new folder under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Users in the example export (organizations: a tenth of it).
        #[arg(long)]
        rows: Option<usize>,
    },
    /// Run the Zendesk simulator until Ctrl-C (same knobs as the `zdsync-sim` binary).
    Sim {
        #[arg(long, default_value = "127.0.0.1:8089")]
        bind: std::net::SocketAddr,
        /// Account-wide requests per minute (0 = off).
        #[arg(long)]
        rpm: Option<u32>,
        /// Time a bulk job stays queued (and again working), in milliseconds.
        #[arg(long)]
        job_delay_ms: Option<u64>,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZDSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn load(config: &Path) -> Result<SyncConfig, ExitCode> {
    SyncConfig::load(config).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(run_cmd::exit::CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Plan {
            config,
            dry_run,
            store,
            json,
            samples,
        } => run_plan(&config, dry_run, store, json, samples),
        Command::Run {
            config,
            store,
            json,
            quiet,
            wait,
            full_resync,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let root = store_root(&config, store);
            let args = run_cmd::RunArgs {
                json,
                quiet,
                wait: Duration::from_secs(wait),
                trigger: "cli".into(),
                full_resync,
            };
            let outcome = runtime().block_on(run_cmd::run_sync(cfg, &config, &root, &args));
            run_cmd::report(&outcome, json);
            ExitCode::from(run_cmd::outcome_code(&outcome))
        }
        Command::History {
            config,
            store,
            limit,
            json,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_cmd::history(&store_root(&config, store), &cfg, limit, json)
        }
        Command::Schema { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime().block_on(schema(cfg, &config, json))
        }
        Command::Connect(args) => runtime().block_on(connect_cmd::connect(args)),
        Command::Demo { dir, rows } => demo::demo(demo::DemoArgs { dir, rows }),
        Command::Sim {
            bind,
            rpm,
            job_delay_ms,
        } => runtime().block_on(run_sim(bind, rpm, job_delay_ms)),
    }
}

async fn schema(cfg: SyncConfig, config: &Path, json: bool) -> ExitCode {
    let client = match run_cmd::client_for(&cfg, config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(run_cmd::exit_code_for(e.error_name()));
        }
    };
    let fetched = match zdsync::schema::fetch(&client, cfg.object).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(run_cmd::exit_code_for(e.error_name()));
        }
    };
    if json {
        println!("{}", schema_cmd::render_json(&fetched));
    } else {
        print!("{}", schema_cmd::render(&fetched, Some(&cfg)));
    }
    match fetched.validate(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(run_cmd::exit::CONFIG)
        }
    }
}

async fn run_sim(
    bind: std::net::SocketAddr,
    rpm: Option<u32>,
    job_delay_ms: Option<u64>,
) -> ExitCode {
    let mut cfg = zdsync_sim::SimConfig {
        bind: Some(bind),
        ..Default::default()
    };
    if let Some(v) = rpm {
        cfg.rate_limit.rpm = v;
    }
    if let Some(v) = job_delay_ms {
        cfg.jobs.queued_ms = v;
        cfg.jobs.working_ms = v;
    }
    let sim = match zdsync_sim::Simulator::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot start the simulator: {e}");
            return ExitCode::from(run_cmd::exit::WRITE);
        }
    };
    println!(
        "Zendesk simulator listening on {} (account acme)",
        sim.base_url()
    );
    println!(
        "  API token: admin@acme.test / {}",
        zdsync_sim::DEFAULT_API_TOKEN
    );
    println!(
        "  OAuth:     client {} / {} (consent approved at once; redirect to any 127.0.0.1 port)",
        zdsync_sim::DEFAULT_CLIENT_ID,
        zdsync_sim::DEFAULT_CLIENT_SECRET
    );
    println!("  state:     {}/__sim/state", sim.base_url());
    let _ = tokio::signal::ctrl_c().await;
    sim.shutdown().await;
    ExitCode::SUCCESS
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
    zdsync::run::new_run_id()
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
            return ExitCode::from(run_cmd::exit::CONFIG);
        }
    };
    let root = store_root(config, store);
    let store = LocalStore::new(&root);
    let mut opts = PlanOptions::new(new_run_id());
    opts.dry_run = dry_run;
    opts.samples_per_reason = samples;
    // Audience syncs diff membership (audience upsert plans like an object upsert).
    match audience::diff(&store, &cfg, &opts) {
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

use run_cmd::num;

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
    if cfg.mode.audience_only() {
        println!("to tag      {:>12}", num(c.tag_add));
        println!("to untag    {:>12}", num(c.tag_remove));
    } else {
        println!("to create   {:>12}", num(c.create));
        println!("to update   {:>12}", num(c.update));
    }
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
