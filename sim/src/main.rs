//! `zdsync-sim`: runs the Zendesk simulator as its own process.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use zdsync_sim::{SimConfig, Simulator};

#[derive(Parser, Debug)]
#[command(name = "zdsync-sim", about = "Zendesk Support simulator for zdsync")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    bind: SocketAddr,
    /// TOML or JSON config file (accounts, limits, fields, faults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Account-wide requests per window (0 = off).
    #[arg(long)]
    rpm: Option<u32>,
    /// Rate-limit window in milliseconds.
    #[arg(long)]
    window_ms: Option<u64>,
    /// Time a bulk job stays queued (and again working), in milliseconds.
    #[arg(long)]
    job_delay_ms: Option<u64>,
    /// Jobs queued or working per account before 429.
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Seed of all random choices.
    #[arg(long)]
    seed: Option<u64>,
    /// JSON or TOML custom-field fixture.
    #[arg(long)]
    fields: Option<PathBuf>,
    /// Incremental export: tickets updated less than this many seconds ago are not listed yet.
    #[arg(long)]
    export_lag_secs: Option<u64>,
    /// Incremental export: requests per minute per account (0 = no endpoint limit).
    #[arg(long)]
    export_rpm: Option<u32>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => SimConfig::from_file(p)?,
        None => SimConfig::default(),
    };
    cfg.bind = Some(args.bind);
    if let Some(v) = args.rpm {
        cfg.rate_limit.rpm = v;
    }
    if let Some(v) = args.window_ms {
        cfg.rate_limit.window_ms = v;
    }
    if let Some(v) = args.job_delay_ms {
        cfg.jobs.queued_ms = v;
        cfg.jobs.working_ms = v;
    }
    if let Some(v) = args.max_jobs {
        cfg.jobs.max_concurrent = v;
    }
    if let Some(v) = args.seed {
        cfg.seed = v;
    }
    if let Some(v) = args.export_lag_secs {
        cfg.incremental.lag_secs = v;
    }
    if let Some(v) = args.export_rpm {
        cfg.incremental.rpm = v;
    }
    if args.fields.is_some() {
        cfg.fields_path = args.fields.clone();
    }
    let accounts: Vec<String> = cfg.accounts.iter().map(|a| a.subdomain.clone()).collect();
    let handle = Simulator::start(cfg).await?;
    println!("zdsync-sim listening on {}", handle.base_url());
    for a in &accounts {
        println!("  account {a}: {}", handle.account_url(a));
    }
    println!("  admin: {}/__sim/state", handle.base_url());
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}
