//! The phases of a run, in one place for every caller: the local runner (`run`), the Lambda
//! steps (`steps`) and the preview (`preview`). Each phase is a function; the callers only
//! schedule them (in one process, or one Lambda per step).
//!
//! check the account → finish an abandoned run → read the field definitions → plan (ticket ids
//! read back first when needed; the object or the audience planner) → check the row cap →
//! write every chunk → fold the outcomes into the state → record the run.

use crate::audience;
use crate::changeset::{self, ChangeSetError, FoldSummary, Manifest};
use crate::config::{SyncConfig, Target};
use crate::errors::RunError;
use crate::fields::Object;
use crate::layout;
use crate::lock;
use crate::plan::{PlanError, PlanOptions, PlanReport};
use crate::record::{
    build_record, history, rfc3339, save_record, InvalidSample, Phases, RecordParts, RunErrorInfo,
    RunRecord, RunStatus,
};
use crate::store::ObjectStore;
use crate::write::{ChunkSummary, Progress, Stop, WriteError, WriteOptions, Writer};
use crate::zendesk::{Client, ClientStats};
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
    /// Chunks written at once, at least (their batches share the job slots); more when the
    /// writer keeps more batches in progress than these chunks hold.
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

/// Everything a run needs from its caller.
pub struct RunContext {
    pub store: Arc<dyn ObjectStore>,
    pub config: SyncConfig,
    pub client: Client,
    pub progress: Arc<Progress>,
}

/// A new run id: `20261125T101500Z-3f9a` (sorts by start time).
pub fn new_run_id() -> String {
    format!(
        "{}-{:04x}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        rand::random::<u16>()
    )
}

/// Check the account before anything is read or written: credentials, subdomain and scopes,
/// and for an audience that the object can be tagged.
pub async fn check_account(client: &Client, cfg: &SyncConfig) -> Result<(), RunError> {
    client.preflight(cfg.object, true).await?;
    if cfg.is_audience() {
        client.check_tagging(cfg.object).await?;
    }
    Ok(())
}

/// What a plan needs besides the config.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    pub run_id: String,
    pub schema: Option<Arc<crate::schema::Schema>>,
    pub samples: usize,
    pub full_resync: bool,
    /// Requests a minute of the incremental ticket export.
    pub export_rpm: u32,
}

/// Plan a run into `store`: for a tickets sync without state (or a full resync) the ticket ids
/// are read back from Zendesk first (with a client), then the object planner, or for an
/// audience the membership planner, writes the change set.
pub async fn plan_run(
    store: &Arc<dyn ObjectStore>,
    cfg: &SyncConfig,
    client: Option<&Client>,
    inputs: &PlanInputs,
) -> Result<PlanReport, RunError> {
    if let Some(client) = client {
        rebuild_if_needed(store, cfg, client, inputs.full_resync, inputs.export_rpm).await?;
    }
    let mut popts = PlanOptions::new(inputs.run_id.clone());
    popts.schema = inputs.schema.clone();
    popts.samples_per_reason = inputs.samples;
    popts.full_resync = inputs.full_resync;
    let (store, cfg) = (store.clone(), cfg.clone());
    tokio::task::spawn_blocking(move || plan_changes(store.as_ref(), &cfg, &popts))
        .await
        .map_err(|e| RunError::Internal(format!("plan task: {e}")))?
        .map_err(RunError::from)
}

/// The planner of a sync: membership (tag operations) for audience-only modes, the object
/// planner for everything else (an audience upsert is an object upsert whose writes tag).
pub fn plan_changes(
    store: &dyn ObjectStore,
    cfg: &SyncConfig,
    opts: &PlanOptions,
) -> Result<PlanReport, PlanError> {
    if cfg.mode.audience_only() {
        audience::plan_membership(store, cfg, opts)
    } else {
        crate::plan::plan(store, cfg, opts)
    }
}

/// Fold a run's confirmed outcomes into the state (the membership state for audience-only
/// modes).
pub fn fold(store: &dyn ObjectStore, manifest: &Manifest) -> Result<FoldSummary, ChangeSetError> {
    if manifest.mode.audience_only() {
        return audience::fold_membership(store, manifest);
    }
    let mut s = changeset::fold(store, manifest)?;
    if manifest.audience.is_some() {
        // An audience upsert tags every record it confirms.
        s.tagged = s.confirmed;
    }
    Ok(s)
}

/// The writer of a run's chunks: `max_jobs_in_flight` from the sync's config, bounded. The
/// local runner writes every chunk with one; a write-batch invocation writes its chunk.
pub fn writer(ctx: &RunContext, base: &WriteOptions, manifest: &Manifest) -> Writer {
    let mut w = base.clone();
    if let Some(n) = ctx.config.zendesk.max_jobs_in_flight {
        w.max_jobs_in_flight = n.clamp(1, 100);
    }
    Writer::new(
        ctx.client.clone(),
        ctx.store.clone(),
        manifest,
        w,
        ctx.progress.clone(),
    )
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

/// Finish the run a crashed or interrupted process left between plan and finalize, so nothing
/// it created is created again: the run of a stale lock this run took over, else the newest run
/// recorded `interrupted`. Its work goes to its own record, which is returned (`interrupted`
/// again when `opts.stop` came first). The local runner and the Lambda plan both start here.
pub async fn finish_unfinished(
    ctx: &RunContext,
    opts: &RunOptions,
    holder: &str,
    taken_over: Option<lock::LockInfo>,
) -> Result<Option<RunRecord>, RunError> {
    let unfinished = match taken_over {
        Some(stale) => Some(stale.run_id),
        None => last_interrupted(ctx).await?,
    };
    match unfinished {
        Some(old) => resume(ctx, opts, holder, &old).await,
        None => Ok(None),
    }
}

/// Finish a run whose process died after planning: write what has no outcome, then finalize.
async fn resume(
    ctx: &RunContext,
    opts: &RunOptions,
    holder: &str,
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
    let (mut rec, error) = write_and_finalize(
        ctx,
        &opts,
        &manifest,
        None,
        Phases::default(),
        &base,
        holder,
    )
    .await?;
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
pub(crate) struct Base {
    pub(crate) requests: ClientStats,
    pub(crate) jobs: u64,
    pub(crate) started: chrono::DateTime<chrono::Utc>,
    pub(crate) clock: Instant,
}

impl Base {
    pub(crate) fn now(ctx: &RunContext) -> Base {
        Base {
            requests: ctx.client.stats(),
            jobs: ctx.progress.jobs.load(std::sync::atomic::Ordering::Relaxed),
            started: chrono::Utc::now(),
            clock: Instant::now(),
        }
    }
}

pub(crate) async fn write_and_finalize(
    ctx: &RunContext,
    opts: &RunOptions,
    manifest: &Manifest,
    report: Option<&PlanReport>,
    mut phases: Phases,
    base: &Base,
    holder: &str,
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
    let (store, m, holder) = (ctx.store.clone(), manifest.clone(), holder.to_string());
    let fold = tokio::task::spawn_blocking(move || -> Result<FoldSummary, RunError> {
        // Only the lock holder writes the state (a run being finished, through its finisher).
        lock::may_fold(store.as_ref(), &m.sync, &holder)?;
        Ok(fold(store.as_ref(), &m)?)
    })
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
    let writer = writer(ctx, &opts.write, manifest).with_stop(opts.stop.clone());
    let mut summaries = Vec::new();
    let mut error = None;
    // Enough chunks at once to keep the writer's batches busy: a chunk ends only once its
    // last job is polled, so too few chunks leave the budget idle while their tails finish.
    let per_chunk = manifest
        .chunks
        .iter()
        .map(|c| c.rows as usize)
        .max()
        .unwrap_or(1)
        .div_ceil(opts.write.batch_size.clamp(1, 100))
        .max(1);
    let chunks_at_once = opts
        .chunk_concurrency
        .max(writer.batch_capacity().div_ceil(per_chunk) + 1);
    let mut chunks = stream::iter(manifest.chunks.iter())
        .map(|c| writer.write_chunk(c))
        .buffer_unordered(chunks_at_once.max(1));
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
        error: error.map(RunErrorInfo::from),
    })
}
