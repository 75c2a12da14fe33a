//! A whole run of a sync on one machine: lock → preflight → schema → plan → write → finalize,
//! leaving a run record. The Lambdas run the same steps one per function.

use crate::audience;
use crate::changeset::{self, ChangeSetError, FailedSample, FoldSummary, Manifest};
use crate::config::{ConfigError, Mode, SyncConfig, Target};
use crate::errors::ErrorName;
use crate::fields::Object;
use crate::layout;
use crate::lock::{self, LockError};
use crate::plan::{InvalidRow, PlanError, PlanOptions, PlanReport};
use crate::store::ObjectStore;
use crate::write::{ChunkSummary, Progress, Stop, WriteError, WriteOptions, Writer};
use crate::zendesk::{Client, ClientStats, ZendeskError};
use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// What started the run (`cli`, `schedule`, `s3:<key>`, `demo`).
    pub trigger: String,
    /// A fixed run id (default: UTC time + random suffix, so ids sort by start).
    pub run_id: Option<String>,
    pub write: WriteOptions,
    /// Chunks written at once (their batches share the job slots).
    pub chunk_concurrency: usize,
    pub lock_ttl: Duration,
    /// How long a run waits for another run of the same sync before giving up.
    pub lock_wait: Duration,
    /// Invalid-row samples per reason in the record.
    pub samples: usize,
    /// Requested on Ctrl-C / SIGTERM: nothing new is sent, calls in flight get `grace` to
    /// finish, the run is recorded `interrupted` and the next run finishes it.
    pub stop: Stop,
    pub grace: Duration,
    /// Send every row again, changed or not, without creating any record twice (tickets: the
    /// ids are read back from Zendesk first, see `rebuild`).
    pub full_resync: bool,
    /// Requests a minute the incremental ticket export allows (10; 30 with High Volume API).
    pub export_rpm: u32,
    /// The most rows the run may send; above it the run stops before writing (default: the
    /// config's `max_rows_per_run`).
    pub max_rows: Option<u64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            trigger: "cli".into(),
            run_id: None,
            write: WriteOptions::default(),
            chunk_concurrency: 4,
            lock_ttl: Duration::from_secs(15 * 60),
            lock_wait: Duration::ZERO,
            samples: 5,
            stop: Stop::default(),
            grace: Duration::from_secs(30),
            full_resync: false,
            export_rpm: 10,
            max_rows: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every row sent was confirmed and no row was refused.
    Succeeded,
    /// The run finished; some rows were refused before sending or failed in Zendesk.
    CompletedWithFailures,
    /// The run stopped on an error (config, credentials, Zendesk unreachable, ...).
    Failed,
    /// Stopped by Ctrl-C / SIGTERM; the next run of the sync finishes it.
    Interrupted,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    pub preflight: f64,
    pub schema: f64,
    pub plan: f64,
    pub write: f64,
    pub finalize: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowCounts {
    pub read: u64,
    pub invalid: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Insert mode: existing keys left alone.
    pub skipped: u64,
    pub removed: u64,
    /// Rows Zendesk refused, or whose write did not finish; sent again next run.
    pub failed: u64,
    /// Rows resent because they failed last run.
    pub retried: u64,
    /// Audience syncs: records whose tag was added / removed (confirmed).
    #[serde(default)]
    pub tagged: u64,
    #[serde(default)]
    pub untagged: u64,
}

/// Zendesk traffic of a run.
pub type Requests = ClientStats;

/// A row refused before sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidSample {
    pub file: String,
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pk: Option<String>,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl From<&InvalidRow> for InvalidSample {
    fn from(r: &InvalidRow) -> Self {
        InvalidSample {
            file: r.file.clone(),
            line: r.line,
            pk: r.pk.clone(),
            reason: r.reason.as_str().to_string(),
            field: r.field.clone(),
            message: r.message.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunErrorInfo {
    /// One of the closed set of error names (see `RunError::error_name`).
    pub name: String,
    pub message: String,
}

/// `runs/<sync>/<run>/run.json` (and a copy under `history/<sync>/` for listing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub run_id: String,
    pub sync: String,
    pub object: Object,
    pub mode: Mode,
    pub trigger: String,
    pub status: RunStatus,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    pub phases: Phases,
    pub rows: RowCounts,
    /// Requests made to Zendesk, 429s met, retries.
    pub requests: Requests,
    pub jobs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunErrorInfo>,
    /// Rows Zendesk refused, with its reasons.
    #[serde(default)]
    pub failed_samples: Vec<FailedSample>,
    /// Rows refused before sending, by reason.
    #[serde(default)]
    pub invalid_samples: Vec<InvalidSample>,
    /// This run finished one that an earlier process left unfinished.
    #[serde(default)]
    pub resumed: bool,
    /// The unfinished run this run finished before its own work (its figures are not counted
    /// here: they are in that run's record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_run: Option<String>,
    /// The mapping changed since the last confirmed run: rows resent for it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_change: Option<changeset::MappingChange>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    ChangeSet(#[from] ChangeSetError),
    #[error(transparent)]
    Lock(Box<LockError>),
    #[error("this run would send {rows} rows, more than its cap of {cap} (`max_rows_per_run`, or `--max-rows` / \"max_rows\" in the execution input); nothing was written. {why}Check the plan with `zdsync plan`, then raise the cap for one run if the rows are meant to go")]
    RowCapExceeded { rows: u64, cap: u64, why: String },
    #[error("{0}")]
    Internal(String),
}

impl RunError {
    /// The closed set of error names Step Functions and exit codes key on.
    pub fn error_name(&self) -> ErrorName {
        match self {
            RunError::Config(_) => ErrorName::ConfigInvalid,
            RunError::Zendesk(e) | RunError::Write(WriteError::Zendesk(e)) => e.error_name(),
            RunError::Plan(PlanError::Export(_)) => ErrorName::ExportUnreadable,
            RunError::Plan(PlanError::State(_)) => ErrorName::StateUnreadable,
            RunError::Plan(PlanError::Write { .. }) => ErrorName::StoreUnavailable,
            RunError::ChangeSet(_) | RunError::Write(_) => ErrorName::StoreUnavailable,
            RunError::Lock(e) => match **e {
                LockError::Held { .. } => ErrorName::RunLocked,
                LockError::Io { .. } => ErrorName::StoreUnavailable,
            },
            RunError::RowCapExceeded { .. } => ErrorName::RowCapExceeded,
            RunError::Internal(_) => ErrorName::Internal,
        }
    }
}

impl From<LockError> for RunError {
    fn from(e: LockError) -> Self {
        RunError::Lock(Box::new(e))
    }
}

/// A new run id: `20261125T101500Z-3f9a` (sorts by start time).
pub fn new_run_id() -> String {
    format!(
        "{}-{:04x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    )
}

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Whether the mapping names custom fields (then the schema is read and checked).
pub fn needs_schema(cfg: &SyncConfig) -> bool {
    cfg.mapping
        .iter()
        .any(|m| matches!(m.target, Target::FieldKey(_) | Target::TicketField(_)))
}

/// Stop a run before its writes when its change set is above the row cap.
pub fn check_cap(manifest: &Manifest, cap: Option<u64>, rpm: u32) -> Result<(), RunError> {
    let Some(cap) = cap else {
        return Ok(());
    };
    let rows = manifest.rows_to_write();
    if rows <= cap {
        return Ok(());
    }
    let why = match crate::plan::mapping_change_line(manifest, rpm) {
        Some(line) => format!("Why: {line}. "),
        None => String::new(),
    };
    Err(RunError::RowCapExceeded { rows, cap, why })
}

/// The object's field definitions when the mapping names custom fields, checked against the
/// mapping: labels then become option values, and a mistyped field key fails before any write.
/// With `keep`, the definitions are saved for offline previews (`SavedSchema`).
pub async fn read_schema(
    client: &Client,
    cfg: &SyncConfig,
    keep: Option<(&Arc<dyn ObjectStore>, &str)>,
) -> Result<Option<Arc<crate::schema::Schema>>, RunError> {
    if !needs_schema(cfg) {
        return Ok(None);
    }
    let s = crate::schema::fetch(client, cfg.object).await?;
    s.validate(cfg)?;
    if let Some((store, run_id)) = keep {
        let saved = SavedSchema {
            run_id: run_id.to_string(),
            read_at: rfc3339(chrono::Utc::now()),
            schema: s.clone(),
        };
        let (store, key) = (store.clone(), layout::fields_key(&cfg.name));
        let body = serde_json::to_vec(&saved).expect("schema serialises");
        // Only previews read it: a failure to keep it never fails the run.
        let put = tokio::task::spawn_blocking(move || store.put(&key, &body)).await;
        if let Ok(Err(e)) | Err(e) = put.map_err(std::io::Error::other) {
            tracing::warn!(sync = %cfg.name, error = %e, "could not keep the field definitions for offline previews");
        }
    }
    Ok(Some(Arc::new(s)))
}

/// The field definitions a run planned with, kept beside the state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedSchema {
    pub run_id: String,
    pub read_at: String,
    pub schema: crate::schema::Schema,
}

/// The kept field definitions of a sync, if a run kept them (at most 16 MiB).
pub fn saved_schema(store: &dyn ObjectStore, sync: &str) -> Option<SavedSchema> {
    let key = layout::fields_key(sync);
    let meta = store.head(&key).ok()??;
    if meta.size > 16 << 20 {
        return None;
    }
    let text = changeset::read_text(store, &key).ok()?;
    serde_json::from_str(&text).ok()
}

/// What one `run` did: the run it finished for a crashed process (if any), then its own; and
/// the error that stopped it, if one did.
#[derive(Debug)]
pub struct RunOutcome {
    pub records: Vec<RunRecord>,
    pub error: Option<RunError>,
}

impl RunOutcome {
    /// The run was stopped by a signal (its record says `interrupted`).
    pub fn interrupted(&self) -> bool {
        self.records
            .last()
            .is_some_and(|r| r.status == RunStatus::Interrupted)
    }
}

/// Everything a run needs from its caller.
pub struct RunContext {
    pub store: Arc<dyn ObjectStore>,
    pub config: SyncConfig,
    pub client: Client,
    pub progress: Arc<Progress>,
}

/// Run a sync once. Config, credential and preflight problems fail before any write; a run
/// that fails after its plan still folds what Zendesk confirmed into the state. Every run that
/// got past the lock leaves a run record, failed ones included.
pub async fn run(ctx: &RunContext, opts: &RunOptions) -> RunOutcome {
    let cfg = &ctx.config;
    let run_id = opts.run_id.clone().unwrap_or_else(new_run_id);
    let guard = match lock::acquire(
        ctx.store.clone(),
        &cfg.name,
        &run_id,
        opts.lock_ttl,
        opts.lock_wait,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            return RunOutcome {
                records: Vec::new(),
                error: Some(e.into()),
            }
        }
    };
    let mut records = Vec::new();
    let result = run_locked(ctx, opts, &run_id, guard.taken_over.clone(), &mut records).await;
    guard.release().await;
    RunOutcome {
        records,
        error: result.err(),
    }
}

async fn run_locked(
    ctx: &RunContext,
    opts: &RunOptions,
    run_id: &str,
    taken_over: Option<lock::LockInfo>,
    records: &mut Vec<RunRecord>,
) -> Result<(), RunError> {
    let cfg = &ctx.config;
    let mut base = Base::now(ctx);
    let mut phases = Phases::default();
    let mut t = Instant::now();
    let fail = |phases: &Phases, e: &RunError, rows: RowCounts, base: &Base| RunRecord {
        run_id: run_id.to_string(),
        sync: cfg.name.clone(),
        object: cfg.object,
        mode: cfg.mode,
        trigger: opts.trigger.clone(),
        status: RunStatus::Failed,
        started_at: rfc3339(base.started),
        finished_at: rfc3339(chrono::Utc::now()),
        seconds: base.clock.elapsed().as_secs_f64(),
        phases: phases.clone(),
        rows,
        requests: ctx.client.stats().since(&base.requests),
        jobs: 0,
        error: Some(RunErrorInfo {
            name: e.error_name().as_str().to_string(),
            message: e.to_string(),
        }),
        failed_samples: Vec::new(),
        invalid_samples: Vec::new(),
        resumed: false,
        resumed_run: None,
        mapping_change: None,
    };

    // Preflight: credentials, subdomain and scopes (and tagging, for an audience) before
    // anything is read or written.
    let checked = match ctx.client.preflight(cfg.object, true).await {
        Ok(_) if cfg.is_audience() => ctx.client.check_tagging(cfg.object).await,
        Ok(_) => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = checked {
        phases.preflight = t.elapsed().as_secs_f64();
        let e = RunError::from(e);
        let rec = fail(&phases, &e, RowCounts::default(), &base);
        save_record(ctx.store.clone(), &rec).await?;
        records.push(rec);
        return Err(e);
    }
    phases.preflight = t.elapsed().as_secs_f64();

    // A run a crashed or interrupted process left between plan and finalize is finished
    // first, so nothing it created is created again. Its work goes to its own record; this
    // run's figures start after it.
    let mut resumed_run = None;
    {
        let before = Base::now(ctx);
        if let Some(rec) = finish_unfinished(ctx, opts, taken_over).await? {
            resumed_run = Some(rec.run_id.clone());
            let interrupted = rec.status == RunStatus::Interrupted;
            records.push(rec);
            if interrupted {
                return Ok(());
            }
            // This run's figures: its preflight and what follows, not the finished run's part.
            let after = Base::now(ctx);
            base.requests.add(&after.requests.since(&before.requests));
            base.jobs += after.jobs.saturating_sub(before.jobs);
            base.started = after.started;
            base.clock = after.clock;
        }
    }

    t = Instant::now();
    let schema = match read_schema(&ctx.client, cfg, Some((&ctx.store, run_id))).await {
        Ok(s) => s,
        Err(e) => {
            phases.schema = t.elapsed().as_secs_f64();
            let rec = fail(&phases, &e, RowCounts::default(), &base);
            save_record(ctx.store.clone(), &rec).await?;
            records.push(rec);
            return Err(e);
        }
    };
    phases.schema = t.elapsed().as_secs_f64();

    // A tickets sync without its state, or asked to resync in full, learns from Zendesk which
    // ticket carries each key before anything is created.
    t = Instant::now();
    let rebuilt = rebuild_if_needed(
        &ctx.store,
        cfg,
        &ctx.client,
        opts.full_resync,
        opts.export_rpm,
    )
    .await;
    if let Err(e) = rebuilt {
        phases.plan = t.elapsed().as_secs_f64();
        let rec = fail(&phases, &e, RowCounts::default(), &base);
        save_record(ctx.store.clone(), &rec).await?;
        records.push(rec);
        return Err(e);
    }
    let mut popts = PlanOptions::new(run_id);
    popts.schema = schema;
    popts.samples_per_reason = opts.samples;
    popts.full_resync = opts.full_resync;
    let (store, pcfg) = (ctx.store.clone(), cfg.clone());
    let planned =
        tokio::task::spawn_blocking(move || audience::diff(store.as_ref(), &pcfg, &popts))
            .await
            .map_err(|e| RunError::Internal(format!("plan task: {e}")))?;
    phases.plan = t.elapsed().as_secs_f64();
    let report = match planned {
        Ok(r) => r,
        Err(e) => {
            let e = RunError::from(e);
            let rec = fail(&phases, &e, RowCounts::default(), &base);
            save_record(ctx.store.clone(), &rec).await?;
            records.push(rec);
            return Err(e);
        }
    };
    if let Err(e) = check_cap(
        &report.manifest,
        opts.max_rows.or(cfg.max_rows_per_run),
        cfg.rate_limit_rpm(),
    ) {
        let c = &report.manifest.counts;
        let rows = RowCounts {
            read: c.rows_read,
            invalid: c.invalid,
            unchanged: c.unchanged,
            ..RowCounts::default()
        };
        let rec = fail(&phases, &e, rows, &base);
        save_record(ctx.store.clone(), &rec).await?;
        records.push(rec);
        return Err(e);
    }

    let (mut rec, error) =
        write_and_finalize(ctx, opts, &report.manifest, Some(&report), phases, &base).await?;
    if resumed_run.is_some() {
        rec.resumed_run = resumed_run;
        save_record(ctx.store.clone(), &rec).await?;
    }
    records.push(rec);
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Finish the run a crashed or interrupted process left between plan and finalize, so nothing
/// it created is created again: the run of a stale lock this run took over, else the newest run
/// recorded `interrupted`. Its work goes to its own record, which is returned (`interrupted`
/// again when `opts.stop` came first). The local runner and the Lambda plan both start here.
pub async fn finish_unfinished(
    ctx: &RunContext,
    opts: &RunOptions,
    taken_over: Option<lock::LockInfo>,
) -> Result<Option<RunRecord>, RunError> {
    let unfinished = match taken_over {
        Some(stale) => Some(stale.run_id),
        None => last_interrupted(ctx).await?,
    };
    match unfinished {
        Some(old) => resume(ctx, opts, &old).await,
        None => Ok(None),
    }
}

/// Finish a run whose process died after planning: write what has no outcome, then finalize.
async fn resume(
    ctx: &RunContext,
    opts: &RunOptions,
    run_id: &str,
) -> Result<Option<RunRecord>, RunError> {
    let sync = ctx.config.name.clone();
    let (store, rid) = (ctx.store.clone(), run_id.to_string());
    type Found = Option<(Manifest, Option<RunRecord>)>;
    let manifest = tokio::task::spawn_blocking(move || -> Result<Found, ChangeSetError> {
        let key = layout::manifest_key(&sync, &rid);
        let record = layout::run_record_key(&sync, &rid);
        let io = |key: &str, source| ChangeSetError::Io {
            key: key.to_string(),
            source,
        };
        if store.head(&key).map_err(|e| io(&key, e))?.is_none() {
            return Ok(None);
        }
        // A recorded run is finished, unless it was interrupted.
        let earlier = match store.head(&record).map_err(|e| io(&record, e))? {
            None => None,
            Some(_) => {
                let text = changeset::read_text(store.as_ref(), &record)?;
                match serde_json::from_str::<RunRecord>(&text) {
                    Ok(r) if r.status == RunStatus::Interrupted => Some(r),
                    _ => return Ok(None),
                }
            }
        };
        changeset::read_manifest(store.as_ref(), &key).map(|m| Some((m, earlier)))
    })
    .await
    .map_err(|e| RunError::Internal(format!("resume task: {e}")))??;
    let Some((manifest, earlier)) = manifest else {
        return Ok(None);
    };
    tracing::info!(
        run = run_id,
        "finishing a run an earlier process left unfinished"
    );
    let mut opts = opts.clone();
    opts.trigger = "resume".into();
    let base = Base::now(ctx);
    let (mut rec, error) =
        write_and_finalize(ctx, &opts, &manifest, None, Phases::default(), &base).await?;
    // The interrupted part and the part that finished it make one run.
    if let Some(e) = earlier {
        rec.requests.add(&e.requests);
        rec.jobs += e.jobs;
        rec.seconds += e.seconds;
        rec.started_at = e.started_at;
        rec.trigger = e.trigger;
        rec.invalid_samples = e.invalid_samples;
        save_record(ctx.store.clone(), &rec).await?;
    }
    match error {
        Some(e) => Err(e),
        None => Ok(Some(rec)),
    }
}

/// Tickets only (their external ids are not unique, and creating one twice is permanent): with
/// no state, or on a full resync, the ticket ids are read back from Zendesk into the state.
pub async fn rebuild_if_needed(
    store: &Arc<dyn ObjectStore>,
    cfg: &SyncConfig,
    client: &Client,
    full_resync: bool,
    export_rpm: u32,
) -> Result<(), RunError> {
    if cfg.object != Object::Tickets || cfg.is_audience() {
        return Ok(());
    }
    let (st, key) = (store.clone(), layout::state_key(&cfg.name));
    let has_state = tokio::task::spawn_blocking(move || st.head(&key))
        .await
        .map_err(|e| RunError::Internal(format!("state task: {e}")))?
        .map_err(|source| {
            RunError::ChangeSet(ChangeSetError::Io {
                key: layout::state_key(&cfg.name),
                source,
            })
        })?
        .is_some();
    if has_state && !full_resync {
        return Ok(());
    }
    tracing::info!(
        sync = %cfg.name,
        "reading the account's tickets back (no state, or a full resync) so no ticket is created twice"
    );
    let scan = crate::rebuild::scan_tickets(client, 0, export_rpm).await?;
    let (store, sync) = (store.clone(), cfg.name.clone());
    let tickets = scan.tickets;
    let pages = scan.pages;
    let added = tokio::task::spawn_blocking(move || {
        crate::rebuild::merge_ticket_ids(store.as_ref(), &sync, "tickets", &scan)
    })
    .await
    .map_err(|e| RunError::Internal(format!("state task: {e}")))?
    .map_err(|e| RunError::Plan(PlanError::State(e)))?;
    tracing::info!(sync = %cfg.name, tickets, pages, keys = added, "ticket ids read back into the state");
    Ok(())
}

/// The sync's newest run, when it was interrupted (the next run finishes it).
pub(crate) async fn last_interrupted(ctx: &RunContext) -> Result<Option<String>, RunError> {
    newest_interrupted(ctx.store.clone(), ctx.config.name.clone()).await
}

pub(crate) async fn newest_interrupted(
    store: Arc<dyn ObjectStore>,
    sync: String,
) -> Result<Option<String>, RunError> {
    let newest = tokio::task::spawn_blocking(move || history(store.as_ref(), &sync, 1))
        .await
        .map_err(|e| RunError::Internal(format!("history task: {e}")))??;
    Ok(newest
        .into_iter()
        .find(|r| r.status == RunStatus::Interrupted)
        .map(|r| r.run_id))
}

/// Counters at the start of a run, so its record holds only its own traffic.
struct Base {
    requests: ClientStats,
    jobs: u64,
    started: chrono::DateTime<chrono::Utc>,
    clock: Instant,
}

impl Base {
    fn now(ctx: &RunContext) -> Base {
        Base {
            requests: ctx.client.stats(),
            jobs: ctx.progress.jobs.load(std::sync::atomic::Ordering::Relaxed),
            started: chrono::Utc::now(),
            clock: Instant::now(),
        }
    }
}

async fn write_and_finalize(
    ctx: &RunContext,
    opts: &RunOptions,
    manifest: &Manifest,
    report: Option<&PlanReport>,
    mut phases: Phases,
    base: &Base,
) -> Result<(RunRecord, Option<RunError>), RunError> {
    let t = Instant::now();
    let write = write_all(ctx, opts, manifest);
    tokio::pin!(write);
    // On a stop, calls in flight get `grace` to finish; past it they are cut off and left to
    // their journals.
    let grace = async {
        opts.stop.wait().await;
        tokio::time::sleep(opts.grace).await;
    };
    let (_, error) = tokio::select! {
        r = &mut write => r,
        _ = grace => (Vec::new(), Some(RunError::Write(WriteError::Stopped))),
    };
    phases.write = t.elapsed().as_secs_f64();
    if opts.stop.requested() {
        // Not folded (no counts of written rows yet): the next run finishes this one from its
        // change set and journals.
        let mut rec = record(
            ctx,
            opts,
            manifest,
            report,
            &FoldSummary::default(),
            phases,
            base,
            None,
        );
        rec.status = RunStatus::Interrupted;
        save_record(ctx.store.clone(), &rec).await?;
        return Ok((rec, None));
    }

    let t = Instant::now();
    let (store, m) = (ctx.store.clone(), manifest.clone());
    let fold = tokio::task::spawn_blocking(move || audience::fold(store.as_ref(), &m))
        .await
        .map_err(|e| RunError::Internal(format!("finalize task: {e}")))??;
    phases.finalize = t.elapsed().as_secs_f64();

    let rec = record(
        ctx,
        opts,
        manifest,
        report,
        &fold,
        phases,
        base,
        error.as_ref(),
    );
    save_record(ctx.store.clone(), &rec).await?;
    Ok((rec, error))
}

/// Write every chunk of a manifest (several at once, sharing the job slots). The first error
/// stops the rest; what finished stays recorded.
pub async fn write_all(
    ctx: &RunContext,
    opts: &RunOptions,
    manifest: &Manifest,
) -> (Vec<ChunkSummary>, Option<RunError>) {
    let total: u64 = manifest.chunks.iter().map(|c| c.rows).sum();
    ctx.progress
        .rows_total
        .store(total, std::sync::atomic::Ordering::Relaxed);
    if manifest.chunks.is_empty() {
        return (Vec::new(), None);
    }
    let mut wopts = opts.write.clone();
    if let Some(n) = ctx.config.zendesk.max_jobs_in_flight {
        wopts.max_jobs_in_flight = n.clamp(1, 100);
    }
    let writer = Writer::new(
        ctx.client.clone(),
        ctx.store.clone(),
        manifest,
        wopts,
        ctx.progress.clone(),
    )
    .with_stop(opts.stop.clone());
    let mut summaries = Vec::new();
    let mut error = None;
    let mut chunks = stream::iter(manifest.chunks.iter())
        .map(|c| writer.write_chunk(c))
        .buffer_unordered(opts.chunk_concurrency.max(1));
    while let Some(r) = chunks.next().await {
        match r {
            Ok(s) => summaries.push(s),
            // The other chunks finish what they have in flight.
            Err(WriteError::Stopped) => error = Some(RunError::Write(WriteError::Stopped)),
            Err(e) => {
                tracing::error!(error = %e, "writing stopped");
                error = Some(RunError::from(e));
                break;
            }
        }
    }
    (summaries, error)
}

#[allow(clippy::too_many_arguments)]
fn record(
    ctx: &RunContext,
    opts: &RunOptions,
    manifest: &Manifest,
    report: Option<&PlanReport>,
    fold: &FoldSummary,
    phases: Phases,
    base: &Base,
    error: Option<&RunError>,
) -> RunRecord {
    let invalid_samples = report
        .map(|r| {
            r.invalid_by_reason
                .values()
                .flat_map(|s| s.samples.iter().map(InvalidSample::from))
                .collect()
        })
        .unwrap_or_default();
    build_record(RecordParts {
        manifest,
        fold,
        invalid_samples,
        phases,
        started: base.started,
        seconds: base.clock.elapsed().as_secs_f64(),
        requests: ctx.client.stats().since(&base.requests),
        jobs: ctx
            .progress
            .jobs
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(base.jobs),
        trigger: &opts.trigger,
        error: error.map(|e| RunErrorInfo {
            name: e.error_name().as_str().to_string(),
            message: e.to_string(),
        }),
    })
}

/// What a run record is made of (the CLI has it in one process; the Lambdas gather it from the
/// bucket in finalize).
pub struct RecordParts<'a> {
    pub manifest: &'a Manifest,
    pub fold: &'a FoldSummary,
    pub invalid_samples: Vec<InvalidSample>,
    pub phases: Phases,
    pub started: chrono::DateTime<chrono::Utc>,
    pub seconds: f64,
    pub requests: Requests,
    pub jobs: u64,
    pub trigger: &'a str,
    pub error: Option<RunErrorInfo>,
}

pub fn build_record(p: RecordParts<'_>) -> RunRecord {
    let (manifest, fold) = (p.manifest, p.fold);
    let c = &manifest.counts;
    let failed = fold.failed + fold.unknown;
    let status = if p.error.is_some() {
        RunStatus::Failed
    } else if failed > 0 || c.invalid > 0 {
        RunStatus::CompletedWithFailures
    } else {
        RunStatus::Succeeded
    };
    RunRecord {
        run_id: manifest.run_id.clone(),
        sync: manifest.sync.clone(),
        object: manifest.object,
        mode: manifest.mode,
        trigger: p.trigger.to_string(),
        status,
        started_at: rfc3339(p.started),
        finished_at: rfc3339(chrono::Utc::now()),
        seconds: p.seconds,
        phases: p.phases,
        rows: RowCounts {
            read: c.rows_read,
            invalid: c.invalid,
            created: fold.created,
            updated: fold.updated,
            unchanged: c.unchanged,
            skipped: c.skipped + fold.existing,
            removed: c.removed,
            failed,
            retried: c.retried,
            tagged: fold.tagged,
            untagged: fold.untagged,
        },
        requests: p.requests,
        jobs: p.jobs,
        error: p.error,
        failed_samples: fold.failed_samples.clone(),
        invalid_samples: p.invalid_samples,
        resumed: p.trigger == "resume",
        resumed_run: None,
        mapping_change: manifest.mapping_change.clone(),
    }
}

/// Write a run record to `runs/<sync>/<run>/run.json` and its copy under `history/`.
pub async fn save_record(store: Arc<dyn ObjectStore>, rec: &RunRecord) -> Result<(), RunError> {
    let body = serde_json::to_vec_pretty(rec).expect("run record serialises");
    let (sync, run) = (rec.sync.clone(), rec.run_id.clone());
    tokio::task::spawn_blocking(move || -> Result<(), ChangeSetError> {
        for key in [
            layout::run_record_key(&sync, &run),
            layout::history_key(&sync, &run),
        ] {
            store
                .put(&key, &body)
                .map_err(|source| ChangeSetError::Io { key, source })?;
        }
        Ok(())
    })
    .await
    .map_err(|e| RunError::Internal(format!("record task: {e}")))??;
    Ok(())
}

/// Past runs of a sync, newest first (at most `limit`).
pub fn history(
    store: &dyn ObjectStore,
    sync: &str,
    limit: usize,
) -> Result<Vec<RunRecord>, ChangeSetError> {
    let prefix = layout::history_prefix(sync);
    let mut objects = store.list(&prefix).map_err(|source| ChangeSetError::Io {
        key: prefix.clone(),
        source,
    })?;
    objects.sort_by(|a, b| b.key.cmp(&a.key));
    let mut out = Vec::new();
    for o in objects
        .into_iter()
        .filter(|o| o.key.ends_with(".json"))
        .take(limit)
    {
        let text = changeset::read_text(store, &o.key)?;
        match serde_json::from_str(&text) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(key = %o.key, "skipping an unreadable run record: {e}"),
        }
    }
    Ok(out)
}
