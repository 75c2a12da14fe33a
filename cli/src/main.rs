//! `zdsync`: keep Zendesk Support users, organizations and tickets in step with warehouse
//! exports, from one machine, with a local folder in place of the S3 bucket.

mod connect_cmd;
mod demo;
mod init_cmd;
mod run_cmd;
mod schema_cmd;
mod show_cmd;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use zdsync::config::SyncConfig;
use zdsync::preview::{self, Preview, PreviewOptions};
use zdsync::run::RunError;
use zdsync::store::{LocalStore, ObjectStore};

#[derive(Parser)]
#[command(name = "zdsync", version, about = "Reverse ETL into Zendesk Support: users, organizations and tickets from warehouse exports", long_about = None)]
#[command(
    after_help = "Logs go to stderr. ZDSYNC_LOG sets their level or filter (default `warn`; \
                  `ZDSYNC_LOG=debug` shows every request, never credentials); they are coloured \
                  only on a terminal and when NO_COLOR is unset."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preview the next run: read Zendesk as a run does (credentials, scopes, field
    /// definitions; for a tickets sync without state, its ticket ids), then read, map and diff
    /// the export with the run's own code. Prints what the run would send and what it costs;
    /// writes nothing to the bucket or to Zendesk. Exit code 0, 2 config, 3 export, 4 state,
    /// 5 Zendesk/store, 6 credentials/subdomain/scope, 8 the run would be over its row cap.
    Plan {
        /// The sync config (TOML; see the README for every key).
        config: PathBuf,
        /// Accepted for scripts: a plan never writes.
        #[arg(long, hide = true)]
        dry_run: bool,
        /// Do not read Zendesk: an approximate preview, labelled so (custom fields are checked
        /// against the definitions the last run kept, if any; a tickets sync without state
        /// counts every ticket as new).
        #[arg(long)]
        offline: bool,
        /// Write one JSON line per row the run sends: its bulk call and the record in that
        /// call's body.
        #[arg(long, value_name = "FILE")]
        records: Option<PathBuf>,
        /// Preview `run --full-resync`.
        #[arg(long)]
        full_resync: bool,
        /// Preview with this row cap in place of the config's `max_rows_per_run`.
        #[arg(long, value_name = "ROWS")]
        max_rows: Option<u64>,
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
    /// 7 another run holds the lock, 8 more rows to send than the row cap (nothing written).
    Run {
        /// The sync config (TOML; see the README for every key).
        config: PathBuf,
        /// The folder playing the bucket: export locations, state/ and runs/ are relative to it.
        /// Default: the config's folder (its parent when the config sits in a `config/` folder).
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
        /// Stop before writing anything when the run would send more rows than this (default:
        /// the config's `max_rows_per_run`, else no cap).
        #[arg(long, value_name = "ROWS")]
        max_rows: Option<u64>,
    },
    /// Connect a Zendesk account: sign in with OAuth (browser, or `--grant client-credentials`)
    /// or check an admin's API token (`--api-token`), and store the credentials in a local file
    /// (owner-only) or a Secrets Manager secret. `--check` reports what a stored credential can
    /// do. Exit code 0 = connected, 2 config, 6 credentials/subdomain/scope refused.
    Connect(connect_cmd::ConnectArgs),
    /// Write a starting sync config from an export (a file or a folder of parts) and the
    /// account's fields: columns matched to standard and custom fields, a guessed primary key
    /// and the unmatched columns, marked for review. Exit code 0, 2 config, 3 export,
    /// 5 Zendesk, 6 credentials/subdomain/scope.
    Init(init_cmd::InitArgs),
    /// Read the custom fields of the sync's object from Zendesk, check the mapping against them
    /// and print them (options, types, which column feeds each field).
    Schema {
        /// The sync config (TOML): its object, mapping and Zendesk account.
        config: PathBuf,
        /// Print the field definitions as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Past runs of a sync, newest first.
    History {
        /// The sync config (TOML) whose runs to list.
        config: PathBuf,
        /// The folder playing the bucket (its history/ is read). Default: the config's folder
        /// (its parent when the config sits in a `config/` folder).
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        /// Show at most this many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print the run records as JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// One run of a sync (default: the newest): status, trigger, times, row counts, phases,
    /// requests, its error, the run it finished or that finished it, a mapping change, and
    /// the paths of its files.
    Show {
        /// The sync config (TOML) whose run to show.
        config: PathBuf,
        /// The run id (`zdsync history` lists them; a prefix naming one run is enough).
        run: Option<String>,
        /// The folder playing the bucket. Default: the config's folder (its parent when the
        /// config sits in a `config/` folder).
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        /// Print the run record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every row of a run (default: the newest) that failed in Zendesk or was refused before
    /// sending: kind, key, source file and line, field, reason, message and Zendesk's error.
    /// The list to fix in the warehouse.
    Failed {
        /// The sync config (TOML) whose run to read.
        config: PathBuf,
        /// The run id (`zdsync history` lists them; a prefix naming one run is enough).
        run: Option<String>,
        /// The folder playing the bucket. Default: the config's folder (its parent when the
        /// config sits in a `config/` folder).
        #[arg(long, env = "ZDSYNC_STORE")]
        store: Option<PathBuf>,
        /// CSV with a header line, or one JSON object a line.
        #[arg(long, value_enum, default_value = "csv")]
        format: show_cmd::Format,
        /// Write the rows to this file instead of stdout.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// The whole pipeline on the built-in Zendesk simulator: sync example users, organizations
    /// and an audience, change a few rows, preview and sync again; prints every run report.
    ///
    /// Writes an example export (2,000 users, 5 of them invalid on purpose; 200 organizations;
    /// key accounts to tag `key_account`) and sync configs into a folder, then runs two rounds
    /// of three syncs over HTTP. It prints each run's report (counts, requests, timings,
    /// refused rows with their reasons), in round 2 whether the preview (`zdsync plan`) said
    /// what the run did, and finally what the simulator holds: users and organizations, valid
    /// rows missing, renamed users, tags set wrongly. A folder used before is first cleared of
    /// the demo's own earlier state, runs and history.
    Demo {
        /// Folder for the demo's bucket (default: a new folder under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Users in the example export (default 2000; organizations: a tenth of it).
        #[arg(long)]
        rows: Option<usize>,
        /// Use a simulator that is already running (`zdsync sim`) instead of starting one, so
        /// `plan`, `run` and `schema` keep working on the demo's configs afterwards.
        #[arg(long, value_name = "URL")]
        sim: Option<String>,
    },
    /// Run the Zendesk simulator until Ctrl-C (same knobs as the `zdsync-sim` binary).
    Sim {
        /// Address and port to listen on.
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
    // Colour codes only on a terminal (never in a log file or a pipe), and never with NO_COLOR.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`zdsync history x.toml | head -1`)
/// would panic; with the default action the process ends quietly, as other Unix tools do.
/// Sockets are unaffected (the standard library sends with MSG_NOSIGNAL).
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread starts; resets one signal's action.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Read a sync config. One in the bucket layout (`config/<sync>.toml`) must name that sync, as
/// the deployment requires.
fn load(config: &Path) -> Result<SyncConfig, ExitCode> {
    let in_layout = config
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "config");
    SyncConfig::load(config)
        .and_then(|cfg| match config.file_stem().and_then(|s| s.to_str()) {
            Some(stem) if in_layout => cfg
                .check_stored_as(stem, &config.display().to_string())
                .map(|()| cfg),
            _ => Ok(cfg),
        })
        .and_then(|cfg| {
            let policy = zdsync::config::EndpointPolicy::default();
            cfg.zendesk
                .check_endpoint(&policy, &config.display().to_string())
                .map(|()| cfg)
        })
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(run_cmd::exit::CONFIG)
        })
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Plan {
            config,
            dry_run: _,
            offline,
            records,
            full_resync,
            max_rows,
            store,
            json,
            samples,
        } => {
            let args = PlanArgs {
                offline,
                records,
                full_resync,
                max_rows,
                json,
                samples,
            };
            runtime().block_on(run_plan(&config, store, args))
        }
        Command::Run {
            config,
            store,
            json,
            quiet,
            wait,
            full_resync,
            max_rows,
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
                max_rows,
            };
            let outcome = runtime().block_on(run_cmd::run_sync(cfg, &config, &root, &args));
            run_cmd::report_at(&outcome, json, Some(&root));
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
        Command::Show {
            config,
            run,
            store,
            json,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let root = store_root(&config, store);
            show_cmd::show(&config, &root, &cfg, run.as_deref(), json)
        }
        Command::Failed {
            config,
            run,
            store,
            format,
            output,
        } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let root = store_root(&config, store);
            show_cmd::failed(&root, &cfg, run.as_deref(), format, output.as_deref())
        }
        Command::Schema { config, json } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime().block_on(schema(cfg, &config, json))
        }
        Command::Connect(args) => runtime().block_on(connect_cmd::connect(args)),
        Command::Init(args) => runtime().block_on(init_cmd::init(args)),
        Command::Demo { dir, rows, sim } => demo::demo(demo::DemoArgs { dir, rows, sim }),
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
            return ExitCode::from(e.error_name().exit_code());
        }
    };
    let fetched = match zdsync::schema::fetch(&client, cfg.object).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(e.error_name().exit_code());
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

struct PlanArgs {
    offline: bool,
    records: Option<PathBuf>,
    full_resync: bool,
    max_rows: Option<u64>,
    json: bool,
    samples: usize,
}

async fn run_plan(config: &Path, store: Option<PathBuf>, args: PlanArgs) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let root = store_root(config, store);
    // A preview reads Zendesk exactly as the run will; without it the figures are approximate.
    let client = if args.offline {
        None
    } else {
        match run_cmd::client_for(&cfg, config).await {
            Ok(c) => Some(c),
            Err(e) => return preview_failed(&RunError::Zendesk(e)),
        }
    };
    let records = match &args.records {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(Box::new(std::io::BufWriter::new(f)) as Box<dyn std::io::Write + Send>),
            Err(e) => {
                eprintln!(
                    "error: cannot write the records file {}: {e}",
                    path.display()
                );
                return ExitCode::from(run_cmd::exit::CONFIG);
            }
        },
        None => None,
    };
    let mut opts = PreviewOptions::new(zdsync::run::new_run_id());
    opts.samples_per_reason = args.samples;
    opts.full_resync = args.full_resync;
    opts.max_rows = args.max_rows.or(cfg.max_rows_per_run);
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(&root));
    let no_state = store
        .head(&zdsync::layout::state_key(&cfg.name))
        .map(|h| h.is_none())
        .unwrap_or(false);
    if client.is_some()
        && cfg.object == zdsync::fields::Object::Tickets
        && !cfg.is_audience()
        && (no_state || args.full_resync)
    {
        eprintln!(
            "zdsync: reading the account's ticket ids back first, as the run will (the incremental export, at most {} requests a minute)",
            opts.export_rpm
        );
    }
    match preview::preview(store, &cfg, client.as_ref(), &opts, records).await {
        Ok(p) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&p).expect("preview serialises")
                );
            } else {
                print_summary(&cfg, &root, &p, args.records.as_deref());
            }
            if p.over_cap() {
                ExitCode::from(run_cmd::exit::ROW_CAP)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => preview_failed(&e),
    }
}

fn preview_failed(e: &RunError) -> ExitCode {
    eprintln!("error: {e}");
    let code = e.error_name().exit_code();
    if matches!(e, RunError::Zendesk(_)) {
        eprintln!(
            "  (a preview reads Zendesk as the run does: credentials, scopes and field definitions; \
             `zdsync plan --offline` previews without it, approximately)"
        );
    }
    ExitCode::from(code)
}

use run_cmd::num;

fn print_summary(cfg: &SyncConfig, root: &Path, p: &Preview, records: Option<&Path>) {
    let r = &p.report;
    let m = &r.manifest;
    let c = &m.counts;
    let bytes: u64 = m.parts.iter().map(|p| p.size).sum();
    println!(
        "zdsync plan · sync {} ({}, {}) · preview{}",
        m.sync,
        m.object,
        cfg.mode.as_str(),
        if p.approximate.is_some() {
            ", APPROXIMATE"
        } else {
            " of the next run"
        }
    );
    if let Some(why) = &p.approximate {
        println!("approximate {why}; run `zdsync plan` without --offline for the exact figures");
    }
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
    if let Some(old) = &p.unfinished_run {
        println!(
            "unfinished  run {old} was interrupted or crashed: the next run finishes it first (its rows are not counted below)"
        );
    }
    if let Some(now) = &p.running {
        println!(
            "running     run {now} is under way: these figures are from the state before it finishes"
        );
    }
    if let Some(line) = zdsync::plan::mapping_change_line(m, cfg.rate_limit_rpm()) {
        println!();
        println!("NOTE        {line}");
    }
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
    let cost = &p.cost;
    println!(
        "cost        {} rows in ≈{} bulk call{}: ≥{} at {} requests/min (plus job polling)",
        num(cost.rows),
        num(cost.calls),
        if cost.calls == 1 { "" } else { "s" },
        zdsync::plan::minutes_text(cost.minutes),
        cost.rpm
    );
    if let Some(cap) = p.max_rows {
        if p.over_cap() {
            println!(
                "ROW CAP     the run would stop before writing: {} rows to send, cap {} (raise it for one run with `zdsync run --max-rows N`)",
                num(cost.rows),
                num(cap)
            );
        } else {
            println!("row cap     {} (this run is within it)", num(cap));
        }
    }
    if let Some(path) = records {
        println!(
            "records     {} → {} (one line per row: its call and body record)",
            num(p.records),
            path.display()
        );
    }
    println!("nothing written; planned in {:.2} s", r.seconds);
}
