//! `zdsync run`, `zdsync history` and `zdsync schema`: the pipeline against Zendesk (or the
//! simulator) with a local folder as the bucket.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use zdsync::config::{Mode, SyncConfig};
use zdsync::run::{RunContext, RunError, RunOptions, RunOutcome, RunRecord, RunStatus};
use zdsync::store::{LocalStore, ObjectStore};
use zdsync::write::Progress;
use zdsync::zendesk::{credential_store, Client, ClientOptions, ZendeskError};

pub use zdsync::errors::exit;

pub fn outcome_code(outcome: &RunOutcome) -> u8 {
    if outcome.interrupted() {
        return exit::INTERRUPTED;
    }
    if let Some(e) = &outcome.error {
        return e.error_name().exit_code();
    }
    if outcome
        .records
        .iter()
        .any(|r| r.status != RunStatus::Succeeded)
    {
        exit::ROWS_FAILED
    } else {
        exit::OK
    }
}

pub struct RunArgs {
    pub json: bool,
    pub quiet: bool,
    pub wait: Duration,
    pub trigger: String,
    pub full_resync: bool,
    pub max_rows: Option<u64>,
}

/// Build the client for a config: credentials from its `credentials` reference (relative file
/// paths against the config's folder).
pub async fn client_for(cfg: &SyncConfig, config_path: &Path) -> Result<Client, ZendeskError> {
    let dir = config_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(path) = missing_credentials_file(&cfg.zendesk.credentials, dir) {
        return Err(ZendeskError::Credentials {
            message: format!(
                "credentials file `{}` (the config's `credentials = \"{}\"`, relative to the config's folder) does not exist: run `zdsync connect --config {}` to sign in and store them there (add `--api-token` for an admin's API token)",
                path.display(),
                cfg.zendesk.credentials.trim(),
                config_path.display()
            ),
        });
    }
    let creds = credential_store(&cfg.zendesk.credentials, dir)?;
    Client::new(ClientOptions::from_config(&cfg.zendesk), creds).await
}

/// The absolute path of a `file:` credentials reference when no file is there.
fn missing_credentials_file(reference: &str, dir: &Path) -> Option<std::path::PathBuf> {
    let path = Path::new(reference.trim().strip_prefix("file:")?.trim());
    if path.as_os_str().is_empty() {
        return None;
    }
    let full = std::path::absolute(dir.join(path)).ok()?;
    (!full.exists()).then_some(full)
}

/// Run a sync once and report; the caller has a runtime.
pub async fn run_sync(
    cfg: SyncConfig,
    config_path: &Path,
    root: &Path,
    args: &RunArgs,
) -> RunOutcome {
    let client = match client_for(&cfg, config_path).await {
        Ok(c) => c,
        Err(e) => {
            return RunOutcome {
                records: Vec::new(),
                error: Some(RunError::Zendesk(e)),
            }
        }
    };
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(root));
    let progress = Arc::new(Progress::default());
    let ctx = RunContext {
        store,
        config: cfg,
        client,
        progress: progress.clone(),
    };
    let opts = RunOptions {
        trigger: args.trigger.clone(),
        lock_wait: args.wait,
        full_resync: args.full_resync,
        max_rows: args.max_rows,
        ..RunOptions::default()
    };
    let signals = tokio::spawn(on_signals(opts.stop.clone(), opts.grace));
    let show = !args.quiet
        && !args.json
        && std::io::stderr().is_terminal()
        && std::env::var_os("CI").is_none();
    if !args.wait.is_zero() {
        if let Ok(Some(h)) = zdsync::lock::holder(ctx.store.as_ref(), &ctx.config.name) {
            if !h.is_stale() {
                eprintln!(
                    "zdsync: sync `{}` is running (run {} on {}, pid {}); waiting up to {} s for it to finish",
                    ctx.config.name,
                    h.run_id,
                    h.host,
                    h.pid,
                    args.wait.as_secs()
                );
            }
        }
    }
    let bar = show.then(|| spawn_progress(progress.clone()));
    let outcome = zdsync::run::run(&ctx, &opts).await;
    signals.abort();
    if let Some((bar, task)) = bar {
        task.abort();
        bar.finish_and_clear();
    }
    outcome
}

/// Ctrl-C or SIGTERM: stop sending and let calls in flight finish (the run then records itself
/// `interrupted` and releases its lock); a second one exits at once, leaving the lock and the
/// journals to the next run.
async fn on_signals(stop: zdsync::write::Stop, grace: Duration) {
    #[cfg(unix)]
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    for second in [false, true] {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        if second {
            eprintln!("zdsync: exiting now; the next run finishes this one from its journals");
            std::process::exit(exit::INTERRUPTED as i32);
        }
        eprintln!(
            "zdsync: interrupted: nothing new is sent; waiting up to {} s for the calls in \
             flight (press Ctrl-C again to exit at once)",
            grace.as_secs()
        );
        stop.request();
    }
}

/// A progress bar on stderr with rows/s and ETA, fed from the writer's counters.
fn spawn_progress(p: Arc<Progress>) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    // A bar of length 0 draws full: a spinner until the plan knows how many rows go out.
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.set_message("planning…");
    bar.enable_steady_tick(Duration::from_millis(120));
    let writing = ProgressStyle::with_template(
        "{spinner} [{bar:16}] {human_pos}/{human_len} rows · {rate} · ETA {eta} · {msg}",
    )
    .expect("valid template")
    .with_key(
        "rate",
        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let r = s.per_sec();
            let _ = if r < 10.0 {
                write!(w, "{r:.1}/s")
            } else {
                write!(w, "{r:.0}/s")
            };
        },
    )
    .progress_chars("=> ");
    let b = bar.clone();
    let task = tokio::spawn(async move {
        let mut writing_shown = false;
        loop {
            let total = p.rows_total.load(Ordering::Relaxed);
            if total > 0 {
                if !writing_shown {
                    b.set_style(writing.clone());
                    writing_shown = true;
                }
                b.set_length(total);
                b.set_position(p.rows_done.load(Ordering::Relaxed));
                b.set_message(format!(
                    "{} failed · {} jobs",
                    p.failed.load(Ordering::Relaxed),
                    p.jobs.load(Ordering::Relaxed)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    (bar, task)
}

pub fn num(n: u64) -> String {
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

/// Where a run's object `key` is: the real path under the store folder `root` (symlinks and
/// `..` resolved, as far as the path exists), else the key itself (relative to the store).
pub fn object_path(root: Option<&Path>, key: &str) -> String {
    let Some(root) = root else {
        return key.to_string();
    };
    let path = root.join(key);
    let real = std::fs::canonicalize(&path)
        .or_else(|_| std::fs::canonicalize(root).map(|r| r.join(key)))
        .or_else(|_| std::path::absolute(&path))
        .unwrap_or(path);
    real.display().to_string()
}

/// The end-of-run summary table; `root` is the store folder its file paths are shown under.
pub fn render_record(r: &RunRecord, root: Option<&Path>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let status = match r.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::CompletedWithFailures => "completed with failures",
        RunStatus::Failed => "FAILED",
        RunStatus::Interrupted => "INTERRUPTED (the next run finishes it)",
    };
    let _ = writeln!(
        s,
        "run {} · sync {} ({}, {}) · {}{} · {}",
        r.run_id,
        r.sync,
        r.object,
        r.mode.as_str(),
        status,
        if r.resumed { " (resumed)" } else { "" },
        r.trigger
    );
    if let Some(old) = &r.resumed_run {
        let _ = writeln!(
            s,
            "  first finished run {old}, left unfinished by an earlier process (its own record)"
        );
    }
    if let Some(m) = &r.mapping_change {
        let _ = writeln!(
            s,
            "  NOTE: the mapping changed since run {}: {} rows already in Zendesk were sent again",
            m.since_run.as_deref().unwrap_or("(unknown)"),
            num(m.resend)
        );
    }
    let rows = &r.rows;
    let line = |s: &mut String, k: &str, v: u64, note: &str| {
        let _ = writeln!(s, "  {k:<12}{:>12}  {note}", num(v));
    };
    line(&mut s, "rows read", rows.read, "");
    let invalid_note = if rows.invalid > 0 {
        let key = zdsync::layout::invalid_key(&r.sync, &r.run_id);
        format!("refused before sending ({})", object_path(root, &key))
    } else {
        "refused before sending".to_string()
    };
    line(&mut s, "invalid", rows.invalid, &invalid_note);
    line(&mut s, "created", rows.created, "");
    line(&mut s, "updated", rows.updated, "");
    if r.is_audience() {
        line(
            &mut s,
            "tagged",
            rows.tagged,
            "audience tag added (confirmed)",
        );
        line(
            &mut s,
            "untagged",
            rows.untagged,
            "audience tag removed (confirmed)",
        );
    }
    line(&mut s, "unchanged", rows.unchanged, "not sent");
    if rows.skipped > 0 {
        line(
            &mut s,
            "skipped",
            rows.skipped,
            "exist already; insert mode never updates",
        );
    }
    if rows.removed > 0 {
        // Audience syncs count members who left; object syncs, keys gone from the export.
        let (label, note) = match r.mode {
            Mode::Remove | Mode::Mirror => ("left", "members gone since the last run (untagged)"),
            Mode::Add => (
                "left",
                "members gone since the last run; add keeps their tag",
            ),
            _ => ("removed", "gone from the export; left in Zendesk"),
        };
        line(&mut s, label, rows.removed, note);
    }
    line(&mut s, "failed", rows.failed, "sent again next run");
    if rows.retried > 0 {
        line(
            &mut s,
            "retried",
            rows.retried,
            "failed last run, sent again",
        );
    }
    let q = &r.requests;
    let _ = writeln!(
        s,
        "  requests    {:>12}  {} job{} · {} × 429 · {} retr{} · paused {:.1} s",
        num(q.sent),
        r.jobs,
        if r.jobs == 1 { "" } else { "s" },
        q.rate_limited,
        q.retries,
        if q.retries == 1 { "y" } else { "ies" },
        q.paused_ms as f64 / 1000.0
    );
    let p = &r.phases;
    let written = if rows.tagged + rows.untagged > 0 && rows.created + rows.updated == 0 {
        rows.tagged + rows.untagged + rows.failed
    } else {
        rows.created + rows.updated + rows.failed
    };
    let rate = if p.write > 0.0 {
        format!(
            " · {} rows/s writing",
            num((written as f64 / p.write).round() as u64)
        )
    } else {
        String::new()
    };
    let _ = writeln!(s, "  time        {:>10.2} s{rate}", r.seconds);
    let _ = writeln!(
        s,
        "  phases (s)  preflight {:.1} · schema {:.1} · plan {:.1} · write {:.1} · finalize {:.1}",
        p.preflight, p.schema, p.plan, p.write, p.finalize
    );
    for x in r.invalid_samples.iter().take(6) {
        let key =
            x.pk.as_deref()
                .map(|k| format!(" key {k:?}"))
                .unwrap_or_default();
        let _ = writeln!(s, "  invalid  {}:{}{key}: {}", x.file, x.line, x.message);
    }
    for f in r.failed_samples.iter().take(6) {
        let _ = writeln!(
            s,
            "  failed   key {:?} ({}): {}",
            f.pk,
            f.op.as_str(),
            f.reason
        );
    }
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error    {}: {}", e.name, e.message);
    }
    s
}

/// Print a run's records, their files as real paths under the store folder `root`.
pub fn report_at(outcome: &RunOutcome, json: bool, root: Option<&Path>) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome.records).expect("records serialise")
        );
    } else {
        for r in &outcome.records {
            println!("{}", render_record(r, root));
        }
    }
    if let Some(e) = &outcome.error {
        // Failed runs already print their error in the record; a run refused before it began
        // (lock, credentials) has no record.
        if outcome.records.is_empty() || !json {
            eprintln!("error: {e}");
        }
    }
}

/// One count of a run record, as a `zdsync history` column shows it.
type Count = fn(&RunRecord) -> u64;

pub fn history(root: &Path, cfg: &SyncConfig, limit: usize, json: bool) -> ExitCode {
    let store = LocalStore::new(root);
    let runs = match zdsync::run::history(&store, &cfg.name, limit) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::STATE);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).expect("records serialise")
        );
        return ExitCode::SUCCESS;
    }
    if runs.is_empty() {
        println!("no runs of sync `{}` yet in {}", cfg.name, root.display());
        return ExitCode::SUCCESS;
    }
    // An audience sync counts tags (audience upsert: records written, and tagged too).
    let audience = cfg.is_audience() || runs.iter().any(|r| r.is_audience());
    let writes =
        !cfg.mode.audience_only() || runs.iter().any(|r| r.rows.created + r.rows.updated > 0);
    let mut columns: Vec<(&str, Count)> =
        vec![("read", |r| r.rows.read), ("invalid", |r| r.rows.invalid)];
    if writes {
        columns.push(("created", |r| r.rows.created));
        columns.push(("updated", |r| r.rows.updated));
    }
    if audience {
        columns.push(("tagged", |r| r.rows.tagged));
        columns.push(("untagged", |r| r.rows.untagged));
    }
    columns.push(("unchanged", |r| r.rows.unchanged));
    columns.push(("failed", |r| r.rows.failed));
    columns.push(("requests", |r| r.requests.sent));
    let mut head = format!(
        "{:<22} {:<23} {:<9} {:<24}",
        "run", "started", "trigger", "status"
    );
    for (name, _) in &columns {
        head.push_str(&format!(" {name:>9}"));
    }
    println!("{head} {:>5} {:>8}", "429s", "seconds");
    for r in &runs {
        let status = match r.status {
            RunStatus::Succeeded => "succeeded".to_string(),
            RunStatus::CompletedWithFailures => "completed with failures".to_string(),
            RunStatus::Failed => format!(
                "failed: {}",
                r.error.as_ref().map_or("?", |e| e.name.as_str())
            ),
            RunStatus::Interrupted => "interrupted".to_string(),
        };
        // Milliseconds: runs of one second tell apart (history is ordered by them).
        let started = r.started_at.trim_end_matches('Z');
        let mut line = format!(
            "{:<22} {:<23} {:<9} {:<24}",
            r.run_id,
            started.get(..23).unwrap_or(started),
            r.trigger,
            status
        );
        for (_, value) in &columns {
            line.push_str(&format!(" {:>9}", num(value(r))));
        }
        println!("{line} {:>5} {:>8.1}", r.requests.rate_limited, r.seconds);
    }
    ExitCode::SUCCESS
}
