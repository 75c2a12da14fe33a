//! write-batch: the rows of a change-set chunk go to Zendesk in bulk calls of 100, every job is
//! polled to a final status, and every row ends confirmed (with its Zendesk id) or failed (with
//! Zendesk's reason).
//!
//! Outcomes are stored per batch as soon as the batch completes. Before a call that creates
//! records is sent, a journal names the batch's rows (and, once Zendesk answers, the job id), so a
//! writer that dies mid-batch is resumed by polling that job or by looking the rows up by
//! external id, never by creating them a second time.

use crate::changeset::{
    self, Action, ChangeSetError, ChunkInfo, ChunkRow, Op, ResultRow, RowStatus,
};
use crate::config::Mode;
use crate::fields::Object;
use crate::layout;
use crate::store::ObjectStore;
use crate::zendesk::{Client, Idempotency, JobResult, JobStatus, ZendeskError};
use futures::stream::{FuturesUnordered, StreamExt};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

mod tags;

#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// Rows per bulk call (Zendesk's maximum is 100).
    pub batch_size: usize,
    /// The account's job slots: jobs submitted and not yet seen finished by any writer of the
    /// account. Zendesk allows about 30 queued or running jobs per account (finished jobs not
    /// yet polled do not count there). Without a shared budget every batch in progress holds
    /// one; with one, a writer keeps up to four times as many batches in progress.
    pub max_jobs_in_flight: usize,
    /// Shortest spacing of job polls (they are also spaced at three request periods at
    /// least); doubles while polls find nothing finished.
    pub poll_min: Duration,
    /// Longest a finished job's rows wait to be confirmed while the account has job slots to
    /// spare and this writer has other batches to send.
    pub poll_max: Duration,
    /// First wait between checks of the account's unfinished jobs after a create whose answer
    /// was lost (doubles up to 10 s).
    pub lookup_delay: Duration,
    /// Longest wait for those jobs; rows still unsettled then are failed as "outcome unknown"
    /// and looked up before they are created next run.
    pub unknown_wait: Duration,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            batch_size: 100,
            max_jobs_in_flight: 30,
            poll_min: Duration::from_millis(20),
            poll_max: Duration::from_secs(20),
            lookup_delay: Duration::from_secs(1),
            unknown_wait: Duration::from_secs(120),
        }
    }
}

/// Live counters for progress displays.
#[derive(Debug, Default)]
pub struct Progress {
    pub rows_total: AtomicU64,
    pub rows_done: AtomicU64,
    pub confirmed: AtomicU64,
    pub failed: AtomicU64,
    pub jobs: AtomicU64,
    pub polls: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error(transparent)]
    ChangeSet(#[from] ChangeSetError),
    #[error("the write task stopped unexpectedly: {0}")]
    Task(String),
    /// The run was asked to stop (Ctrl-C, SIGTERM) before this batch was sent.
    #[error("interrupted: batches not yet sent were left for the next run")]
    Stopped,
}

/// Asks a run to stop sending: batches not yet on the wire are left unsent (no outcome, so the
/// next run sends them), calls in flight finish and record their outcomes.
#[derive(Debug, Clone)]
pub struct Stop {
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            tx: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl Stop {
    pub fn request(&self) {
        self.tx.send_replace(true);
    }

    pub fn requested(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once a stop is requested.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What one chunk came to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSummary {
    pub chunk: String,
    pub rows: u64,
    pub created: u64,
    pub updated: u64,
    /// Insert mode: keys that were already in Zendesk.
    #[serde(default)]
    pub existing: u64,
    pub failed: u64,
    /// Batches whose outcome was already stored by an earlier attempt.
    pub batches_reused: u64,
    /// Batches recovered from a journal (a writer died mid-batch).
    pub batches_recovered: u64,
}

/// Journal of a batch whose call may create records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    endpoint: String,
    #[serde(default)]
    job: Option<String>,
    /// Chunk positions (`i`) of the rows the call carries.
    #[serde(default)]
    rows: Vec<u32>,
}

/// Writes chunks of one run; cheap to share between tasks.
pub struct Writer {
    client: Client,
    store: Arc<dyn ObjectStore>,
    sync: String,
    run_id: String,
    object: Object,
    mode: Mode,
    /// Audience syncs: the tag and how it is written.
    audience: Option<changeset::AudienceInfo>,
    opts: WriteOptions,
    jobs: JobTracker,
    slots: Arc<Semaphore>,
    /// Every job this writer submitted (so lookups after a lost answer know which unfinished
    /// jobs are not theirs).
    known_jobs: std::sync::Mutex<HashSet<String>>,
    /// Names this writer's batches apart from an earlier attempt's.
    tag: String,
    /// Unix seconds before which no ticket of this run (or of the unknown creates of the run
    /// before) can have been created: where a ticket scan starts.
    lookup_since: i64,
    pub progress: Arc<Progress>,
    stop: Stop,
}

/// Rows found in Zendesk after a create whose outcome was unknown: created.
fn confirm_created(found: &HashMap<usize, u64>, out: &mut [Option<Outcome>]) {
    for (&k, &id) in found {
        out[k] = Some(Outcome::Confirmed {
            id,
            action: Action::Created,
        });
    }
}

/// Up to this many tickets are looked up one `?external_id=` call each; more are read back
/// with a scan of the tickets changed since the run started.
const TICKET_LOOKUPS_ONE_BY_ONE: usize = 8;

/// Pages of the account's job list read when a create's outcome is unknown (100 jobs a page).
const JOB_LIST_PAGES: usize = 10;

/// The failure code of rows whose create may or may not have happened.
const UNKNOWN: &str = "OutcomeUnknown";

/// One row's outcome while its batch is in progress.
#[derive(Debug, Clone)]
enum Outcome {
    Confirmed { id: u64, action: Action },
    Failed { code: String, reason: String },
}

impl Writer {
    pub fn new(
        client: Client,
        store: Arc<dyn ObjectStore>,
        manifest: &changeset::Manifest,
        opts: WriteOptions,
        progress: Arc<Progress>,
    ) -> Writer {
        let jobs = JobTracker::start(client.clone(), &opts);
        let run_start = |id: &str| {
            chrono::NaiveDateTime::parse_from_str(id.get(..16).unwrap_or(""), "%Y%m%dT%H%M%SZ")
                .ok()
                .map(|t| t.and_utc().timestamp())
        };
        let created = chrono::DateTime::parse_from_rfc3339(&manifest.created_at)
            .ok()
            .map(|t| t.timestamp());
        // Fifteen minutes to spare for clocks apart; no time known: the whole account.
        let lookup_since = [
            created,
            manifest.base_state_run.as_deref().and_then(run_start),
            run_start(&manifest.run_id),
        ]
        .into_iter()
        .flatten()
        .min()
        .map_or(0, |t| t - 900);
        Writer {
            lookup_since,
            slots: Arc::new(Semaphore::new(batches_in_progress(&client, &opts))),
            client,
            store,
            sync: manifest.sync.clone(),
            run_id: manifest.run_id.clone(),
            object: manifest.object,
            mode: manifest.mode,
            audience: manifest.audience.clone(),
            opts,
            jobs,
            known_jobs: Default::default(),
            tag: format!("{:04x}", rand::random::<u16>()),
            progress,
            stop: Stop::default(),
        }
    }

    /// Batches this writer keeps in progress at most.
    pub fn batch_capacity(&self) -> usize {
        batches_in_progress(&self.client, &self.opts)
    }

    /// Stop sending new batches once `stop` is requested.
    pub fn with_stop(mut self, stop: Stop) -> Writer {
        self.stop = stop;
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Write every row of `chunk` that has no stored outcome yet; outcomes land under
    /// `results/<chunk>/`. Row failures are outcomes, not errors: an error means the chunk
    /// could not be finished (credentials revoked, Zendesk unreachable) and can be retried.
    pub async fn write_chunk(&self, chunk: &ChunkInfo) -> Result<ChunkSummary, WriteError> {
        let name = layout::chunk_name(&chunk.key).to_string();
        let key = chunk.key.clone();
        let prefix = layout::results_prefix(&self.sync, &self.run_id, &name);
        let (rows, existing) = self
            .blocking(move |store| {
                let rows = changeset::read_jsonl::<ChunkRow>(store, &key)?;
                let existing = store.list(&prefix).map_err(|source| ChangeSetError::Io {
                    key: prefix,
                    source,
                })?;
                Ok((rows, existing))
            })
            .await?;
        let mut summary = ChunkSummary {
            chunk: name.clone(),
            rows: rows.len() as u64,
            ..Default::default()
        };
        // Outcomes are keyed by row: whatever batch size an earlier attempt used, a row with a
        // stored outcome is done, and a journal names exactly the rows its call may have created.
        let mut done: HashSet<u32> = HashSet::new();
        let mut journals: Vec<(String, Journal)> = Vec::new();
        for o in existing {
            let key = o.key.clone();
            if let Some(stem) = key.strip_suffix(".job.json") {
                let stem = stem.rsplit('/').next().unwrap_or(stem).to_string();
                if let Some(j) = self.read_journal(&key).await? {
                    // A journaled job is resolved by polling it: never a candidate for
                    // another batch's lost call.
                    if let Some(job) = &j.job {
                        self.known_jobs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(job.clone());
                    }
                    journals.push((stem, j));
                }
            } else if key.ends_with(".jsonl") {
                let stored = self
                    .blocking(move |store| changeset::read_jsonl::<ResultRow>(store, &key))
                    .await?;
                summary.batches_reused += 1;
                for r in stored {
                    if done.insert(r.index) {
                        count(&mut summary, &r);
                        self.progress.rows_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        let at: HashMap<u32, usize> = rows.iter().enumerate().map(|(n, r)| (r.index, n)).collect();
        let mut claimed: HashSet<u32> = HashSet::new();
        let mut batches: Vec<(String, Vec<ChunkRow>, Option<Journal>)> = Vec::new();
        for (stem, j) in journals {
            let mine: Vec<ChunkRow> = j
                .rows
                .iter()
                .filter(|i| !done.contains(i) && claimed.insert(**i))
                .filter_map(|i| at.get(i).map(|&n| rows[n].clone()))
                .collect();
            if !mine.is_empty() {
                batches.push((stem, mine, Some(j)));
            }
        }
        let rest: Vec<&ChunkRow> = rows
            .iter()
            .filter(|r| !done.contains(&r.index) && !claimed.contains(&r.index))
            .collect();
        let bs = self.opts.batch_size.clamp(1, 100);
        for part in rest.chunks(bs) {
            let stem = format!("r{:06}-{}", part[0].index, self.tag);
            batches.push((stem, part.iter().map(|r| (*r).clone()).collect(), None));
        }
        let mut work = FuturesUnordered::new();
        for (stem, batch, journal) in batches {
            let results_key = layout::batch_results_key(&self.sync, &self.run_id, &name, &stem);
            let journal_key = layout::batch_journal_key(&self.sync, &self.run_id, &name, &stem);
            let op = chunk.op;
            work.push(async move {
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .map_err(|e| WriteError::Task(e.to_string()))?;
                if self.stop.requested() && journal.is_none() {
                    return Err(WriteError::Stopped);
                }
                self.jobs.active.fetch_add(1, Ordering::SeqCst);
                let recovered = journal.is_some();
                let r = self
                    .write_batch(op, &batch, results_key, journal_key, journal)
                    .await;
                self.jobs.active.fetch_sub(1, Ordering::SeqCst);
                r.map(|rows| (rows, recovered))
            });
        }
        let mut stopped = false;
        while let Some(done) = work.next().await {
            // The first error ends the chunk: batches not yet sent stay unsent, and a batch cut
            // off mid-call is left to its journal, as after a crash. A stop lets the batches in
            // flight finish and record their outcomes.
            let (results, recovered) = match done {
                Err(WriteError::Stopped) => {
                    stopped = true;
                    continue;
                }
                other => other?,
            };
            summary.batches_recovered += recovered as u64;
            for r in &results {
                count(&mut summary, r);
            }
        }
        if stopped {
            return Err(WriteError::Stopped);
        }
        Ok(summary)
    }

    /// One of the account's job slots, when the client shares a budget (held until dropped).
    async fn job_slot(&self) -> Option<crate::zendesk::limiter::JobSlot> {
        self.client.job_slot(self.opts.max_jobs_in_flight).await
    }

    /// The right to send a job's request, and the account's job slot for the job. Other writers
    /// of the account (syncs, processes, Lambdas) hold slots too; the slot is taken once the
    /// request may go, so it is not held idle while the request waits for the rate. A probe
    /// after a 429 waits for its slot without its turn: no other request goes while it is
    /// held, and only polls (which need a turn; they go before waiting writes) free slots.
    async fn slot_and_token(
        &self,
    ) -> Result<
        (
            Option<crate::zendesk::limiter::JobSlot>,
            crate::zendesk::Reserved<'_>,
        ),
        WriteError,
    > {
        let reserve = || async {
            tokio::select! {
                r = self.client.reserve() => Ok(r),
                _ = self.stop.wait() => Err(WriteError::Stopped),
            }
        };
        let reserved = reserve().await?;
        let Some(budget) = self.client.budget() else {
            return Ok((None, reserved));
        };
        let max = self.opts.max_jobs_in_flight;
        if reserved.is_probe() {
            drop(reserved);
            let slot = budget.job_slot(max).await;
            return Ok((Some(slot), reserve().await?));
        }
        let t = Instant::now();
        let slot = budget.job_slot(max).await;
        tracing::trace!(
            waited_ms = t.elapsed().as_millis() as u64,
            held = budget.held(),
            "job slot taken"
        );
        Ok((Some(slot), reserved))
    }

    async fn write_batch(
        &self,
        op: Op,
        rows: &[ChunkRow],
        results_key: String,
        journal_key: String,
        journal: Option<Journal>,
    ) -> Result<Vec<ResultRow>, WriteError> {
        let mut out: Vec<Option<Outcome>> = vec![None; rows.len()];
        if let Some(j) = journal {
            self.recover(rows, &journal_key, j, &mut out).await?;
        }
        let all: Vec<usize> = (0..rows.len()).filter(|&k| out[k].is_none()).collect();
        if !all.is_empty() {
            match first_call(self.object, self.mode, op) {
                Call::Tag => self.tag_rows(rows, &all, op, &mut out).await?,
                Call::CreateOrUpdate => {
                    self.bulk(
                        rows,
                        &all,
                        Bulk::UsersCreateOrUpdate,
                        &journal_key,
                        &mut out,
                    )
                    .await?
                }
                Call::Create => self.create(rows, &all, &journal_key, &mut out).await?,
                Call::Update => self.update(rows, &all, &journal_key, &mut out).await?,
            }
        }
        // Audience upsert: the tag follows the record; a row is confirmed once both are.
        if self.audience.is_some() && matches!(op, Op::Create | Op::Update) {
            self.tag_written(rows, &mut out).await?;
        }
        let results: Vec<ResultRow> = rows
            .iter()
            .zip(out)
            .map(|(row, o)| result_row(row, o))
            .collect();
        let mut body = Vec::with_capacity(results.len() * 64);
        for r in &results {
            serde_json::to_writer(&mut body, r).expect("result rows serialise");
            body.push(b'\n');
        }
        self.blocking(move |store| {
            store
                .put(&results_key, &body)
                .map_err(|source| ChangeSetError::Io {
                    key: results_key,
                    source,
                })
        })
        .await?;
        let failed = results
            .iter()
            .filter(|r| r.status == RowStatus::Failed)
            .count() as u64;
        let p = &self.progress;
        p.rows_done
            .fetch_add(results.len() as u64, Ordering::Relaxed);
        p.failed.fetch_add(failed, Ordering::Relaxed);
        p.confirmed
            .fetch_add(results.len() as u64 - failed, Ordering::Relaxed);
        Ok(results)
    }

    /// Creates (`create_many`). Organizations in upsert mode whose key already exists in Zendesk
    /// are looked up and updated instead.
    async fn create(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        journal_key: &str,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        // Keys whose earlier create has an unknown outcome: found ones are not created again
        // (users and organizations get this run's values by id; a ticket is left as created,
        // since resending its payload would add its first comment twice).
        let check: Vec<usize> = idx.iter().copied().filter(|&k| rows[k].lookup).collect();
        let mut idx = idx.to_vec();
        if !check.is_empty() {
            let found = self.lookup(rows, &check).await?;
            if !found.is_empty() {
                let ids: HashMap<usize, u64> = found.clone();
                let hit: Vec<usize> = check
                    .iter()
                    .copied()
                    .filter(|k| found.contains_key(k))
                    .collect();
                if self.object == Object::Tickets || self.mode == Mode::Insert {
                    for &k in &hit {
                        out[k] = Some(Outcome::Confirmed {
                            id: ids[&k],
                            action: Action::Created,
                        });
                    }
                } else {
                    self.update_by(rows, &hit, &ids, out).await?;
                }
                idx.retain(|k| !found.contains_key(k));
            }
        }
        let idx = &idx[..];
        if idx.is_empty() {
            return Ok(());
        }
        self.bulk(rows, idx, Bulk::CreateMany, journal_key, out)
            .await?;
        // A key Zendesk already holds (state lost, or created by someone else): an organization
        // upsert updates it; an insert leaves it as it is and records its id.
        let resolve = matches!(
            (self.object, self.mode),
            (Object::Organizations, Mode::Upsert)
                | (Object::Users | Object::Organizations, Mode::Insert)
        );
        if resolve {
            let dups: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|&k| match &out[k] {
                    Some(Outcome::Failed { code, reason }) => {
                        code == "DuplicateValue"
                            || reason.contains("already been taken")
                            || reason.contains("already being used")
                            || reason.contains("already exists")
                    }
                    _ => false,
                })
                .collect();
            if !dups.is_empty() {
                let found = self.lookup(rows, &dups).await?;
                let mut again = Vec::new();
                let mut ids = HashMap::new();
                for &k in &dups {
                    if let Some(&id) = found.get(&k) {
                        ids.insert(k, id);
                        again.push(k);
                    }
                }
                // Keys not found by external id collide on another key (an organization's
                // name, a user's email): Zendesk's reason stays.
                if self.mode == Mode::Insert {
                    for &k in &again {
                        out[k] = Some(Outcome::Confirmed {
                            id: ids[&k],
                            action: Action::Existing,
                        });
                    }
                } else if !again.is_empty() {
                    for &k in &again {
                        out[k] = None;
                    }
                    self.update_by(rows, &again, &ids, out).await?;
                }
            }
        }
        Ok(())
    }

    /// Updates (`update_many` in its batch form) by the Zendesk id in state, or by external id
    /// for users and organizations zdsync has not confirmed yet.
    async fn update(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        journal_key: &str,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let mut ids = HashMap::new();
        let mut send = Vec::new();
        for &k in idx {
            match rows[k].zendesk_id {
                Some(id) if id != 0 => {
                    ids.insert(k, id);
                    send.push(k);
                }
                _ if self.object == Object::Tickets => {
                    out[k] = Some(Outcome::Failed {
                        code: "UnknownTicket".into(),
                        reason: format!(
                            "no Zendesk ticket id is recorded for key `{}`: tickets are matched only by the id zdsync recorded when it created them (a ticket's external_id is not unique); create it with an upsert or insert sync first",
                            rows[k].key
                        ),
                    })
                }
                _ => send.push(k),
            }
        }
        if send.is_empty() {
            return Ok(());
        }
        self.update_by(rows, &send, &ids, out).await?;
        // Upsert: a record deleted in Zendesk since it was confirmed is created again.
        if self.mode == Mode::Upsert {
            let gone: Vec<usize> = send
                .iter()
                .copied()
                .filter(|&k| {
                    matches!(&out[k], Some(Outcome::Failed { code, .. }) if code == "RecordNotFound")
                })
                .collect();
            if !gone.is_empty() {
                for &k in &gone {
                    out[k] = None;
                }
                self.bulk(rows, &gone, Bulk::CreateMany, journal_key, out)
                    .await?;
            }
        }
        Ok(())
    }

    async fn update_by(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        ids: &HashMap<usize, u64>,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        self.bulk(rows, idx, Bulk::UpdateMany(ids), "", out).await?;
        let object = self.object;
        for &k in idx {
            if let Some(Outcome::Failed { code, reason }) = &mut out[k] {
                if code == "RecordNotFound" {
                    *reason = format!(
                        "{reason} (no {} with {} exists in Zendesk; update mode never creates records)",
                        object.as_str().trim_end_matches('s'),
                        match ids.get(&k) {
                            Some(id) => format!("id {id}"),
                            None => format!("external_id `{}`", rows[k].key),
                        }
                    );
                }
            }
        }
        Ok(())
    }

    /// One bulk call for `idx` (≤ 100 rows), its job polled to the end, results mapped to rows.
    /// A call that creates records is journaled; when its answer is lost, or its job fails
    /// after doing part of the work, the rows are looked up by external id.
    async fn bulk(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        kind: Bulk<'_>,
        journal_key: &str,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        // Only a create is unsafe to repeat: users' create_or_update_many matches by external id.
        let (call, idempotency) = match kind {
            Bulk::UsersCreateOrUpdate => (Call::CreateOrUpdate, Idempotency::Safe),
            Bulk::CreateMany => (Call::Create, Idempotency::Unsafe),
            Bulk::UpdateMany(_) => (Call::Update, Idempotency::Safe),
        };
        let (method, path) = call.endpoint(self.object).expect("a bulk call");
        let method = if method == "PUT" {
            Method::PUT
        } else {
            Method::POST
        };
        let mut body = self.body(rows, idx, &kind);
        let creates = idempotency == Idempotency::Unsafe;
        let mut todo: Vec<usize> = idx.to_vec();
        for attempt in 0..2 {
            let body = if attempt == 0 {
                std::mem::take(&mut body)
            } else {
                self.body(rows, &todo, &kind)
            };
            // The journal names the rows only once the call has its rate-limit token and goes
            // on the wire next: a batch still waiting for its turn when the process dies is
            // not looked up on resume, just sent.
            let (slot, reserved) = self.slot_and_token().await?;
            if creates {
                let ids = todo.iter().map(|&k| rows[k].index).collect();
                self.journal(journal_key, &path, None, ids).await?;
            }
            let answer = self
                .client
                .send_reserved(reserved, method.clone(), &path, body, idempotency)
                .await;
            let lost = match answer {
                Ok(v) => {
                    let job = parse_job(&path, v)?;
                    if let Some(slot) = &slot {
                        slot.started(&job.id);
                    }
                    self.known_jobs
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(job.id.clone());
                    if creates {
                        let ids = todo.iter().map(|&k| rows[k].index).collect();
                        self.journal(journal_key, &path, Some(&job.id), ids).await?;
                    }
                    self.progress.jobs.fetch_add(1, Ordering::Relaxed);
                    match self.jobs.wait(job.id.clone()).await {
                        Ok(done) => return self.apply_job(rows, &todo, &done, creates, out).await,
                        // Zendesk no longer has the job: a safe call is simply sent again.
                        Err(ZendeskError::Api { status: 404, .. }) if !creates && attempt == 0 => {
                            tracing::warn!(%path, job = %job.id, "job expired before it was polled; sending the batch again");
                            continue;
                        }
                        Err(ZendeskError::Api { status: 404, .. }) if creates => {
                            // Zendesk no longer keeps the job: the rows are read back.
                            confirm_created(&self.lookup(rows, &todo).await?, out);
                            todo.retain(|&k| out[k].is_none());
                            if todo.is_empty() {
                                return Ok(());
                            }
                            format!("job {} expired before it was polled", job.id)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(ZendeskError::OutcomeUnknown { message, .. }) => message,
                Err(e) => return Err(e.into()),
            };
            // A create whose outcome is unknown: nothing is resent before the rows are looked
            // up, and the lookup waits until the job the lost call may have queued is done.
            tracing::warn!(%path, rows = todo.len(), "outcome of a create call unknown ({lost}); looking the rows up before anything is resent");
            let settled = self.settle(rows, &todo, out).await?;
            todo.retain(|&k| out[k].is_none());
            if todo.is_empty() {
                return Ok(());
            }
            if !settled || attempt == 1 {
                for &k in &todo {
                    out[k] = Some(Outcome::Failed {
                        code: UNKNOWN.into(),
                        reason: format!("the outcome of the create is unknown ({lost}); the row is looked up by external id before it is created next run"),
                    });
                }
                return Ok(());
            }
        }
        Ok(())
    }

    fn body(&self, rows: &[ChunkRow], idx: &[usize], kind: &Bulk<'_>) -> Vec<u8> {
        let plural = self.object.as_str();
        let mut body = Vec::with_capacity(idx.len() * 256);
        body.extend_from_slice(b"{\"");
        body.extend_from_slice(plural.as_bytes());
        body.extend_from_slice(b"\":[");
        for (n, &k) in idx.iter().enumerate() {
            if n > 0 {
                body.push(b',');
            }
            let item = match kind {
                Bulk::UpdateMany(ids) => wire_item(self.object, true, &rows[k], ids.get(&k)),
                _ => wire_item(self.object, false, &rows[k], None),
            };
            serde_json::to_writer(&mut body, &item).expect("payload serialises");
        }
        body.extend_from_slice(b"]}");
        body
    }

    /// After a create whose outcome is unknown: wait until every unfinished job this writer did
    /// not submit itself (the lost call's job among them) is done, then confirm the rows found
    /// by external id. `false` when those jobs did not finish within `unknown_wait`, so rows not
    /// found may still be created by them.
    async fn settle(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        out: &mut [Option<Outcome>],
    ) -> Result<bool, WriteError> {
        if self.object == Object::Tickets {
            return self.settle_tickets(rows, idx, out).await;
        }
        let unfinished = |jobs: &[JobStatus]| -> HashSet<String> {
            let known = self.known_jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.iter()
                .filter(|j| !j.is_terminal() && !known.contains(&j.id))
                .map(|j| j.id.clone())
                .collect()
        };
        let deadline = Instant::now() + self.opts.unknown_wait;
        let mut delay = self.opts.lookup_delay;
        let (jobs, complete) = self.recent_jobs().await?;
        let mut waiting = unfinished(&jobs);
        let settled = loop {
            if waiting.is_empty() && complete {
                break true;
            }
            if Instant::now() + delay > deadline {
                break false;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
            let (jobs, complete_now) = self.recent_jobs().await?;
            if !complete_now {
                continue;
            }
            let now = unfinished(&jobs);
            waiting.retain(|id| now.contains(id));
            if waiting.is_empty() {
                break true;
            }
        };
        confirm_created(&self.lookup(rows, idx).await?, out);
        Ok(settled)
    }

    /// Tickets after a create whose outcome is unknown (`idx` in the order the call carried
    /// them). A ticket's external_id is neither unique nor looked up in bulk, so the lost call's
    /// job is looked for among the account's recent jobs: every job this writer did not submit
    /// is a candidate; once finished, the ticket of each candidate's first result is read (one
    /// `show_many` for all of them), and the job whose first ticket carries the external id of
    /// the batch's row at that position is the lost call's. Its results are then applied as if
    /// the answer had come back. No candidate left (twice in a row, so a job queued late is
    /// still seen) means nothing was created. `false` when candidates were still unfinished
    /// at `unknown_wait`.
    async fn settle_tickets(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        out: &mut [Option<Outcome>],
    ) -> Result<bool, WriteError> {
        let deadline = Instant::now() + self.opts.unknown_wait;
        let mut delay = self.opts.lookup_delay;
        let mut checked: HashSet<String> = HashSet::new();
        let mut quiet = 0;
        loop {
            tokio::time::sleep(delay).await;
            let (jobs, complete) = self.recent_jobs().await?;
            let candidates: Vec<JobStatus> = {
                let known = self.known_jobs.lock().unwrap_or_else(|e| e.into_inner());
                jobs.into_iter()
                    .filter(|j| !known.contains(&j.id) && !checked.contains(&j.id))
                    .collect()
            };
            let (finished, running): (Vec<JobStatus>, Vec<JobStatus>) =
                candidates.into_iter().partition(JobStatus::is_terminal);
            checked.extend(finished.iter().map(|j| j.id.clone()));
            if let Some(job) = self.ticket_job_of(rows, idx, &finished).await? {
                tracing::info!(job = %job.id, rows = idx.len(), "found the job of a create call whose answer was lost");
                self.known_jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(job.id.clone());
                self.apply_job(rows, idx, &job, true, out).await?;
                return Ok(true);
            }
            // Unfinished jobs may sort after the finished ones: only a whole list shows that
            // none is left.
            if running.is_empty() && complete {
                quiet += 1;
                if quiet >= 2 {
                    return Ok(true);
                }
            } else {
                quiet = 0;
            }
            if Instant::now() + delay > deadline {
                return Ok(false);
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// The account's retained jobs (newest first), and whether that is all of them: at most
    /// `JOB_LIST_PAGES` pages are read, so an account keeping more jobs than that never has a
    /// lost create resent (its rows fail as unknown and are looked up next run).
    async fn recent_jobs(&self) -> Result<(Vec<JobStatus>, bool), WriteError> {
        let (items, complete) = self
            .client
            .list_pages(
                "/api/v2/job_statuses.json?page[size]=100",
                "job_statuses",
                JOB_LIST_PAGES,
            )
            .await?;
        let jobs = items
            .into_iter()
            .filter_map(|v| serde_json::from_value::<JobStatus>(v).ok())
            .collect();
        Ok((jobs, complete))
    }

    /// Among finished jobs, the one that created the batch `idx`: its first created ticket
    /// carries the external id of the row at the same position.
    async fn ticket_job_of(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        jobs: &[JobStatus],
    ) -> Result<Option<JobStatus>, WriteError> {
        let mut firsts: Vec<(usize, usize, u64)> = Vec::new();
        for (c, job) in jobs.iter().enumerate() {
            let mapped = map_results(rows, idx, &job.results);
            let first = mapped.iter().enumerate().find_map(|(pos, r)| {
                r.filter(|r| !r.failed())
                    .and_then(|r| r.id)
                    .map(|id| (pos, id))
            });
            if let Some((pos, id)) = first {
                firsts.push((c, pos, id));
            }
        }
        if firsts.is_empty() {
            return Ok(None);
        }
        let ids: Vec<u64> = firsts.iter().map(|f| f.2).collect();
        let external = self.tickets_by_id(&ids).await?;
        Ok(firsts
            .into_iter()
            .find(|(_, pos, id)| external.get(id).map(String::as_str) == Some(&rows[idx[*pos]].key))
            .map(|(c, _, _)| jobs[c].clone()))
    }

    /// The external id of each ticket of `ids` that exists (`show_many`, 100 a call).
    async fn tickets_by_id(&self, ids: &[u64]) -> Result<HashMap<u64, String>, WriteError> {
        let mut out = HashMap::new();
        for part in ids.chunks(100) {
            let list = part
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let v = self
                .client
                .get(&format!("/api/v2/tickets/show_many.json?ids={list}"))
                .await?;
            for t in v["tickets"].as_array().into_iter().flatten() {
                if let (Some(id), Some(x)) = (t["id"].as_u64(), t["external_id"].as_str()) {
                    out.insert(id, x.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Map a finished job's results onto the rows; rows the job left without a result fail
    /// with the job's reason (creates are looked up first: a killed job may have done part).
    async fn apply_job(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        job: &JobStatus,
        creates: bool,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let mapped = map_results(rows, idx, &job.results);
        let mut missing = Vec::new();
        for (n, &k) in idx.iter().enumerate() {
            match mapped[n] {
                Some(r) if r.failed() => {
                    out[k] = Some(Outcome::Failed {
                        code: r.error.clone().unwrap_or_else(|| "Failed".into()),
                        reason: r.reason(),
                    })
                }
                Some(r) => match r.id {
                    Some(id) => {
                        let action = match (r.status.as_deref(), r.action.as_deref()) {
                            (Some("Updated"), _) | (_, Some("update")) => Action::Updated,
                            _ => Action::Created,
                        };
                        out[k] = Some(Outcome::Confirmed { id, action })
                    }
                    None => missing.push(k),
                },
                None => missing.push(k),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let why = if job.status == "completed" {
            format!("job {} completed without a result for this row", job.id)
        } else {
            format!(
                "job {} ended `{}`{}",
                job.id,
                job.status,
                job.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        };
        if creates {
            confirm_created(&self.lookup(rows, &missing).await?, out);
        }
        for &k in &missing {
            if out[k].is_none() {
                out[k] = Some(Outcome::Failed {
                    code: format!("Job{}", capitalise(&job.status)),
                    reason: why.clone(),
                });
            }
        }
        Ok(())
    }

    /// Zendesk ids of rows found by external id (users and organizations: `show_many`, 100 a
    /// call; tickets: the oldest ticket with that external id, one lookup a row for a few rows,
    /// else a scan of the tickets changed since the run started).
    async fn lookup(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
    ) -> Result<HashMap<usize, u64>, WriteError> {
        let mut found = HashMap::new();
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        if self.object == Object::Tickets && idx.len() > TICKET_LOOKUPS_ONE_BY_ONE {
            // No bulk look-up by external id: the tickets changed since the run started are
            // read back (export pages of 1,000, then the newest through the ticket list).
            let scan = crate::rebuild::scan_tickets(&self.client, self.lookup_since, 10).await?;
            for &k in idx {
                if let Some(&id) = scan.by_key.get(&rows[k].key) {
                    found.insert(k, id);
                }
            }
            return Ok(found);
        }
        if self.object == Object::Tickets {
            for &k in idx {
                let v = self
                    .client
                    .get(&format!(
                        "/api/v2/tickets.json?external_id={}",
                        enc(&rows[k].key)
                    ))
                    .await?;
                let oldest = v["tickets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t["external_id"].as_str() == Some(rows[k].key.as_str()))
                    .filter_map(|t| t["id"].as_u64())
                    .min();
                if let Some(id) = oldest {
                    found.insert(k, id);
                }
            }
            return Ok(found);
        }
        let plural = self.object.as_str();
        for part in idx.chunks(100) {
            let list = part
                .iter()
                .map(|&k| enc(&rows[k].key))
                .collect::<Vec<_>>()
                .join(",");
            let v = self
                .client
                .get(&format!(
                    "/api/v2/{plural}/show_many.json?external_ids={list}"
                ))
                .await?;
            let mut by_key: HashMap<String, u64> = HashMap::new();
            for rec in v[plural].as_array().into_iter().flatten() {
                if let (Some(x), Some(id)) = (rec["external_id"].as_str(), rec["id"].as_u64()) {
                    by_key.insert(x.to_lowercase(), id);
                }
            }
            for &k in part {
                if let Some(&id) = by_key.get(&rows[k].key.to_lowercase()) {
                    found.insert(k, id);
                }
            }
        }
        Ok(found)
    }

    /// Journal and outcome reads after a crash: a journaled job still retained by Zendesk is
    /// polled; otherwise creates are looked up by external id, and what is found is confirmed.
    async fn recover(
        &self,
        rows: &[ChunkRow],
        journal_key: &str,
        journal: Journal,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let all: Vec<usize> = (0..rows.len()).collect();
        tracing::info!(journal = journal_key, job = ?journal.job, "resuming a batch a previous attempt left in flight");
        if let Some(id) = &journal.job {
            // The job may still be queued or running: it holds one of the account's slots.
            let slot = self.job_slot().await;
            if let Some(slot) = &slot {
                slot.started(id);
            }
            match self.jobs.wait(id.clone()).await {
                Ok(job) => {
                    self.apply_job(rows, &all, &job, true, out).await?;
                    // Keep what Zendesk confirmed; a failed create created nothing, so those
                    // rows go through the normal path again (an organization upsert resolves
                    // its duplicates there).
                    for o in out.iter_mut() {
                        if matches!(o, Some(Outcome::Failed { .. })) {
                            *o = None;
                        }
                    }
                    return Ok(());
                }
                // The job is gone, and with it its results: the rows are read back.
                Err(ZendeskError::Api { status: 404, .. }) if self.object == Object::Tickets => {
                    confirm_created(&self.lookup(rows, &all).await?, out);
                    return Ok(());
                }
                Err(ZendeskError::Api { status: 404, .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // No job id (the process died before Zendesk answered) or the job is gone: rows found
        // by external id are confirmed; the rest go through the normal path only once no job
        // that could still create them is unfinished.
        if !self.settle(rows, &all, out).await? {
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = Some(Outcome::Failed {
                    code: UNKNOWN.into(),
                    reason: "a create from an earlier attempt may still be running in Zendesk; the row is looked up by external id before it is created next run".into(),
                });
            }
        }
        Ok(())
    }

    /// A batch journal; `None` when it cannot be parsed (a torn write is treated as absent).
    async fn read_journal(&self, key: &str) -> Result<Option<Journal>, WriteError> {
        let key = key.to_string();
        self.blocking(move |store| {
            Ok(serde_json::from_str(&changeset::read_text(store, &key)?).ok())
        })
        .await
    }

    async fn journal(
        &self,
        key: &str,
        endpoint: &str,
        job: Option<&str>,
        rows: Vec<u32>,
    ) -> Result<(), WriteError> {
        if key.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&Journal {
            endpoint: endpoint.to_string(),
            job: job.map(str::to_string),
            rows,
        })
        .expect("journal serialises");
        let key = key.to_string();
        self.blocking(move |store| {
            store
                .put(&key, &body)
                .map_err(|source| ChangeSetError::Io { key, source })
        })
        .await?;
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn ObjectStore) -> Result<T, ChangeSetError> + Send + 'static,
    ) -> Result<T, WriteError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| WriteError::Task(e.to_string()))?
            .map_err(WriteError::from)
    }
}

/// The call a chunk row first goes out in. Zendesk's answer may send it on to another (a key
/// that already exists is updated, a record deleted since is created again), but a row's first
/// call and its record in that call follow from the change set alone, which is what lets a
/// preview show exactly what a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// `users/create_or_update_many`.
    CreateOrUpdate,
    /// `<object>/create_many`.
    Create,
    /// `<object>/update_many`, by the Zendesk id in the state or by external id.
    Update,
    /// The audience tag added or removed.
    Tag,
}

pub fn first_call(object: Object, mode: Mode, op: Op) -> Call {
    match (object, mode, op) {
        (_, _, Op::Add | Op::Remove) => Call::Tag,
        (Object::Users, Mode::Upsert, _) => Call::CreateOrUpdate,
        (_, Mode::Insert, _) | (_, Mode::Upsert, Op::Create) => Call::Create,
        _ => Call::Update,
    }
}

impl Call {
    /// Method and path of the bulk endpoint (`None` for tags, written per route).
    pub fn endpoint(self, object: Object) -> Option<(&'static str, String)> {
        let plural = object.as_str();
        match self {
            Call::CreateOrUpdate => Some((
                "POST",
                "/api/v2/users/create_or_update_many.json".to_string(),
            )),
            Call::Create => Some(("POST", format!("/api/v2/{plural}/create_many.json"))),
            Call::Update => Some(("PUT", format!("/api/v2/{plural}/update_many.json"))),
            Call::Tag => None,
        }
    }
}

/// One row's record in a bulk body: its payload, plus the Zendesk id on an update by id. A
/// ticket's first comment (its description) goes on create only; users created in bulk are
/// not sent a verification email.
pub fn wire_item(object: Object, update: bool, row: &ChunkRow, id: Option<&u64>) -> Value {
    let mut item = row.payload.clone();
    if let Value::Object(map) = &mut item {
        if update {
            if let Some(id) = id {
                map.insert("id".into(), Value::from(*id));
            }
            if object == Object::Tickets {
                map.remove("comment");
            }
        } else if object == Object::Users {
            map.entry("skip_verify_email").or_insert(Value::Bool(true));
        }
    }
    item
}

#[derive(Clone, Copy)]
enum Bulk<'a> {
    UsersCreateOrUpdate,
    CreateMany,
    UpdateMany(&'a HashMap<usize, u64>),
}

fn count(summary: &mut ChunkSummary, r: &ResultRow) {
    match (r.status, r.action) {
        (RowStatus::Failed, _) => summary.failed += 1,
        (RowStatus::Confirmed, Some(Action::Updated)) => summary.updated += 1,
        (RowStatus::Confirmed, Some(Action::Existing)) => summary.existing += 1,
        (RowStatus::Confirmed, _) => summary.created += 1,
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn result_row(row: &ChunkRow, o: Option<Outcome>) -> ResultRow {
    match o {
        Some(Outcome::Confirmed { id, action }) => ResultRow {
            index: row.index,
            key: row.key.clone(),
            status: RowStatus::Confirmed,
            zendesk_id: Some(id),
            error: None,
            unknown: false,
            action: Some(action),
        },
        Some(Outcome::Failed { code, reason }) => ResultRow {
            index: row.index,
            key: row.key.clone(),
            status: RowStatus::Failed,
            zendesk_id: None,
            error: Some(reason),
            unknown: code == UNKNOWN,
            action: None,
        },
        None => ResultRow {
            index: row.index,
            key: row.key.clone(),
            status: RowStatus::Failed,
            zendesk_id: None,
            error: Some("no outcome was recorded for this row".into()),
            unknown: false,
            action: None,
        },
    }
}

fn parse_job(path: &str, v: Value) -> Result<JobStatus, ZendeskError> {
    serde_json::from_value::<JobStatus>(v["job_status"].clone()).map_err(|e| {
        ZendeskError::Protocol {
            path: path.to_string(),
            message: format!("expected a job_status: {e}"),
        }
    })
}

/// The result of each row of a batch: by `index` (0- or 1-based, told apart by range), else by
/// position; a result echoing an `external_id` that names another row of the batch goes to that
/// row.
fn map_results<'a>(
    rows: &[ChunkRow],
    idx: &[usize],
    results: &'a [JobResult],
) -> Vec<Option<&'a JobResult>> {
    let n = idx.len();
    let mut mapped: Vec<Option<&JobResult>> = vec![None; n];
    let indexed = !results.is_empty() && results.iter().all(|r| r.index.is_some());
    let base = if indexed {
        let min = results.iter().filter_map(|r| r.index).min().unwrap_or(0);
        let max = results.iter().filter_map(|r| r.index).max().unwrap_or(0);
        // 1-based: no index 0, and either the whole batch (1..=n) or, as a killed job
        // reports, a prefix of it in input order (1..=k).
        let prefix = results
            .iter()
            .enumerate()
            .all(|(pos, r)| r.index == Some(pos as u64 + 1));
        u64::from(min >= 1 && (max as usize == n || prefix))
    } else {
        0
    };
    let by_key: HashMap<String, usize> = idx
        .iter()
        .enumerate()
        .map(|(n, &k)| (rows[k].key.to_lowercase(), n))
        .collect();
    for (pos, r) in results.iter().enumerate() {
        let mut at = if indexed {
            r.index
                .and_then(|i| i.checked_sub(base))
                .map(|i| i as usize)
        } else {
            Some(pos)
        };
        if let Some(x) = &r.external_id {
            if let Some(&n) = by_key.get(&x.to_lowercase()) {
                at = Some(n);
            }
        }
        if let Some(a) = at.filter(|&a| a < n) {
            mapped[a] = Some(r);
        }
    }
    mapped
}

/// Batches one writer keeps in progress. Without a shared budget that is the job cap itself;
/// with one, the account's job slots are the cap, and a batch whose job is finished but not yet
/// polled no longer holds one, so more may wait to be polled together (100 rows each).
fn batches_in_progress(client: &Client, opts: &WriteOptions) -> usize {
    let cap = opts.max_jobs_in_flight.max(1);
    if client.budget().is_some() {
        cap * 4
    } else {
        cap
    }
}

/// Polls every job of a run with `job_statuses/show_many` (up to 100 ids a call), so polling
/// costs a small share of the request budget however many batches are in flight.
struct JobTracker {
    tx: mpsc::UnboundedSender<Waiter>,
    /// Batches in progress; when all of them wait on a job, polling starts at once.
    active: Arc<AtomicUsize>,
}

struct Waiter {
    id: String,
    since: Instant,
    /// The last poll that saw the job still queued or working.
    running_at: Option<Instant>,
    done: oneshot::Sender<Result<JobStatus, ZendeskError>>,
}

impl JobTracker {
    fn start(client: Client, opts: &WriteOptions) -> JobTracker {
        let (tx, rx) = mpsc::unbounded_channel();
        let active = Arc::new(AtomicUsize::new(0));
        let batches = batches_in_progress(&client, opts);
        tokio::spawn(poll_loop(
            client,
            rx,
            active.clone(),
            opts.poll_min,
            opts.poll_max,
            (batches - batches / 5).max(1),
        ));
        JobTracker { tx, active }
    }

    async fn wait(&self, id: String) -> Result<JobStatus, ZendeskError> {
        let (done, rx) = oneshot::channel();
        let lost = || ZendeskError::Protocol {
            path: "/api/v2/job_statuses/show_many".into(),
            message: "the job poller stopped".into(),
        };
        self.tx
            .send(Waiter {
                id,
                since: Instant::now(),
                running_at: None,
                done,
            })
            .map_err(|_| lost())?;
        rx.await.map_err(|_| lost())?
    }
}

/// The job time learnt from one job a poll showed, as an interval: a job seen running took longer
/// than its age when that poll went out (`lower`); one seen done took at most its age now
/// (`upper`). The estimate moves only when a job falls outside it, so it settles just above a
/// steady job time (a poll a little late costs those ms; one too early finds the jobs running and
/// costs a poll `spacing`), and among most jobs' intervals when job times vary.
fn learn_job_time(
    expected: Option<Duration>,
    lower: Option<Duration>,
    upper: Option<Duration>,
    spacing: Duration,
) -> Option<Duration> {
    let e = match (expected, lower) {
        (Some(e), _) => e,
        // A job first seen done teaches nothing first, or late polls would teach that jobs are
        // slow; one seen running sets the first estimate.
        (None, None) => return None,
        (None, Some(lo)) => return Some(upper.map_or(lo, |hi| lo + hi.saturating_sub(lo) / 2)),
    };
    match (lower, upper) {
        (Some(lo), hi) if lo >= e => {
            // Longer than thought: halfway to a little past the bound (half the interval, at
            // most a third of a spacing), and by half at most: one job stuck in Zendesk's queue
            // does not teach that every job is slow (polls seldom come before the estimate, so
            // an estimate too high is slow to come down).
            let past = hi.map_or(spacing / 3, |hi| {
                (hi.saturating_sub(lo) / 2).min(spacing / 3)
            });
            Some((e / 2 + (lo + past) / 2).min(e.mul_f64(1.5)))
        }
        (_, Some(hi)) if hi < e => Some(e / 2 + hi / 2),
        _ => Some(e),
    }
}

/// An account's job time as this process learnt it (see `learn` in `poll_loop`): set it with
/// `Some`, read it.
fn job_time(account: &str, set: Option<Duration>) -> Option<Duration> {
    static TIMES: std::sync::OnceLock<std::sync::Mutex<HashMap<String, Duration>>> =
        std::sync::OnceLock::new();
    let mut m = TIMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match set {
        Some(t) => {
            m.insert(account.to_string(), t);
            Some(t)
        }
        None => m.get(account).copied(),
    }
}

/// When to poll, and what. A poll costs one request of the account's budget and is worth it
/// when it lets work go on:
/// - this writer has nothing else to send: poll when its newest job should be done (the
///   typical job time, learnt per account), then at the poll spacing;
/// - most of this writer's batches wait on jobs: poll when the oldest should be done;
/// - the account's job slots are (nearly) all held: once enough of the account's open jobs
///   should be done, one writer (claimed in the store) polls them, other writers' too (their
///   leases name their jobs), and frees the slots of finished ones;
/// - otherwise a batch's rows wait at most `poll_max` to be confirmed.
///
/// Every poll also carries the account's other open jobs that should be done (up to 100 ids a
/// call), so slots are freed by whichever writer polls first.
async fn poll_loop(
    client: Client,
    mut rx: mpsc::UnboundedReceiver<Waiter>,
    active: Arc<AtomicUsize>,
    poll_min: Duration,
    poll_max: Duration,
    threshold: usize,
) {
    let shared = client.budget();
    // Polls spaced at three request periods at least: they take at most a third of the
    // budget even when every poll finds little.
    let spacing = match client.rpm() {
        0 => poll_min,
        rpm => (Duration::from_secs(180) / rpm).max(poll_min),
    };
    let mut pending: Vec<Waiter> = Vec::new();
    let mut interval = spacing;
    // A new writer's first poll waits like any other (`poll_max` unless it has nothing else
    // to send), so short-lived writers (a write-batch invocation) do not each poll early.
    let mut last_poll = Instant::now();
    let mut open = true;
    // How long jobs take (learnt from what polls show, see `learn` below), remembered
    // per account for later writers.
    let account = client.base_url().to_string();
    let mut expected: Option<Duration> = job_time(&account, None);
    // Other writers' open jobs, read from the shared budget while the account's slots run short.
    let mut others: Vec<crate::zendesk::budget::OpenJob> = Vec::new();
    let mut others_read = Instant::now() - poll_max;
    // When this writer last looked for statuses other writers kept for its jobs.
    let mut last_check = Instant::now();
    loop {
        let starved = shared.as_ref().is_some_and(|s| s.starved());
        if pending.is_empty() && !open {
            return;
        }
        if pending.is_empty() && !starved {
            let starving = async {
                match &shared {
                    Some(s) => s.starving().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                w = rx.recv() => match w {
                    Some(w) => pending.push(w),
                    None => open = false,
                },
                _ = starving => {}
            }
            continue;
        }
        // Every job submitted so far counts: one received at a time, a poll could go out for a
        // few jobs while many more wait in the channel.
        while let Ok(w) = rx.try_recv() {
            pending.push(w);
        }
        pending.retain(|w| !w.done.is_closed());
        let now = Instant::now();
        // The writers of one process share what they learnt.
        if let Some(e) = job_time(&account, None) {
            expected = Some(e);
        }
        let typical = expected.unwrap_or(spacing);
        // Until this, no job of this writer is expected done.
        let own_due = pending.iter().map(|w| w.since + typical).min();
        let others_due: Vec<Instant> = if starved {
            if now >= others_read + spacing {
                if let Some(s) = &shared {
                    others = s.others_jobs().await;
                }
                others_read = Instant::now();
            }
            let now_ms = crate::zendesk::budget::unix_ms();
            others
                .iter()
                .map(|j| {
                    let due = j.since_ms + typical.as_millis() as u64;
                    now + Duration::from_millis(due.saturating_sub(now_ms))
                })
                .collect()
        } else {
            Vec::new()
        };
        let everyone_waits = !pending.is_empty() && pending.len() >= active.load(Ordering::SeqCst);
        let full = pending.len() >= threshold;
        let own = everyone_waits || full || (!open && !pending.is_empty());
        let deadline = if own && !full && !starved {
            // Nothing else to send here and slots to spare: one poll when the newest job
            // should be done finds them all (the spacing then takes over for stragglers).
            let newest = pending.iter().map(|w| w.since + typical).max();
            newest.map(|d| d.max(last_poll + interval))
        } else if own {
            own_due.map(|d| d.max(last_poll + interval))
        } else if starved {
            // When enough of the account's open jobs should be done to be worth a request.
            let mut due: Vec<Instant> = pending
                .iter()
                .map(|w| w.since + typical)
                .chain(others_due.iter().copied())
                .collect();
            due.sort();
            let k = shared.as_ref().map_or(1, |s| s.worth_freeing());
            due.get(k.min(due.len()).saturating_sub(1))
                .copied()
                .map(|d| d.max(last_poll + interval))
        } else {
            own_due.map(|d| d.max(last_poll + poll_max))
        };
        // Other writers of the account poll this writer's jobs too and keep their statuses in
        // the shared store: a look there costs no request, so it comes sooner than a poll.
        let check_at = match (&shared, own_due) {
            (Some(_), Some(due)) => {
                let at = due.max(last_check + spacing * 4);
                Some(deadline.map_or(at, |d| d.min(at)))
            }
            _ => None,
        };
        // Wake at least every spacing to look again: batches finishing elsewhere, and the
        // account's slots, change what is worth a poll.
        let wake = deadline
            .into_iter()
            .chain(check_at)
            .fold(now + spacing, Instant::min);
        if open {
            tokio::select! {
                w = rx.recv() => {
                    match w {
                        Some(w) => pending.push(w),
                        None => open = false,
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        } else {
            tokio::time::sleep_until(wake.into()).await;
        }
        if let (Some(s), Some(at)) = (&shared, check_at) {
            if Instant::now() >= at {
                last_check = Instant::now();
                while let Ok(w) = rx.try_recv() {
                    pending.push(w);
                }
                let ids: Vec<String> = pending.iter().map(|w| w.id.clone()).collect();
                let kept: HashMap<String, JobStatus> = s
                    .take_done(ids)
                    .await
                    .into_iter()
                    .filter_map(|(id, st)| Some((id, serde_json::from_str(&st).ok()?)))
                    .collect();
                if !kept.is_empty() {
                    let now = Instant::now();
                    let mut still = Vec::with_capacity(pending.len());
                    for w in pending.drain(..) {
                        match kept.get(&w.id) {
                            Some(j) if j.id == w.id && j.is_terminal() => {
                                let _ = w.done.send(Ok(j.clone()));
                            }
                            _ => still.push(w),
                        }
                    }
                    tracing::trace!(
                        kept = kept.len(),
                        waiting = still.len(),
                        at_ms = (now - last_poll).as_millis() as u64,
                        "job statuses kept by another writer"
                    );
                    pending = still;
                    continue;
                }
            }
        }
        let Some(deadline) = deadline else { continue };
        if Instant::now() < deadline {
            continue;
        }
        let mut claim_ms = 0;
        // One writer of the account polls at a time, for everyone's jobs that should be done:
        // a writer that finds the poll claimed looks for its statuses in the store instead.
        if let Some(s) = &shared {
            // While no other writer has jobs open, a poll may come every spacing; while slots
            // are short, one per half a job time for the whole account; otherwise one per 1.5
            // job times: each finds that many job times' worth of finished jobs, and writers
            // waiting on theirs find them in the store.
            // A writer that has not looked lately (a new write-batch invocation) learns first
            // whether others have jobs open, or it would claim polls at the short spacing.
            let stale = others_read.elapsed() >= spacing;
            if stale {
                others = s.others_jobs().await;
                others_read = Instant::now();
            }
            let every = if others.is_empty() {
                spacing
            } else if starved {
                spacing.max(typical / 2)
            } else {
                spacing.max(typical.mul_f64(1.5))
            };
            let every = every.mul_f64(0.9);
            claim_ms = every.as_millis() as u64;
            if !s.claim_poll(every).await {
                last_poll = Instant::now();
                last_check = last_poll - spacing * 3;
                continue;
            }
            // The poll carries every open job of the account: read them, unless just read.
            if !stale {
                others = s.others_jobs().await;
                others_read = Instant::now();
            }
        }
        last_poll = Instant::now();
        while let Ok(w) = rx.try_recv() {
            pending.push(w);
        }
        let mut ids: Vec<String> = Vec::new();
        {
            let mut seen = std::collections::HashSet::new();
            for w in &pending {
                if seen.insert(w.id.clone()) {
                    ids.push(w.id.clone());
                }
            }
            // Other writers' open jobs ride along, oldest first, as many as the poll's calls
            // hold: ids cost nothing, and any of them may be done even if not expected yet.
            let mut due: Vec<&crate::zendesk::budget::OpenJob> = others.iter().collect();
            due.sort_by_key(|j| j.since_ms);
            let room = ids.len().div_ceil(100) * 100;
            for j in due {
                if ids.len() >= room.max(100) {
                    break;
                }
                if seen.insert(j.job.clone()) {
                    ids.push(j.job.clone());
                }
            }
        }
        // A job seen running was running at least until this.
        let sent = Instant::now();
        let mut statuses: HashMap<String, JobStatus> = HashMap::new();
        let mut failure = None;
        for part in ids.chunks(100) {
            match client.job_statuses(part).await {
                Ok(list) => statuses.extend(list.into_iter().map(|j| (j.id.clone(), j))),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for w in pending.drain(..) {
                let _ = w.done.send(Err(e.clone()));
            }
            continue;
        }
        let other_ages: Vec<(Duration, bool)> = {
            let now_ms = crate::zendesk::budget::unix_ms();
            others
                .iter()
                .filter(|j| ids.contains(&j.job))
                .filter_map(|j| {
                    let age = Duration::from_millis(now_ms.saturating_sub(j.since_ms));
                    Some((age, statuses.get(&j.job)?.is_terminal()))
                })
                .collect()
        };
        // Other writers' jobs seen finished (or no longer kept) give their slots back.
        let freed: Vec<String> = others
            .iter()
            .filter(|j| ids.contains(&j.job))
            .filter(|j| statuses.get(&j.job).is_none_or(JobStatus::is_terminal))
            .map(|j| j.holder.clone())
            .collect();
        let freed_any = !freed.is_empty();
        if freed_any {
            if let Some(s) = &shared {
                // Their writers find the statuses in the store and need not poll them.
                let done: Vec<(String, String)> = others
                    .iter()
                    .filter(|j| freed.contains(&j.holder))
                    .filter_map(|j| {
                        let st = statuses.get(&j.job)?;
                        Some((j.job.clone(), serde_json::to_string(st).ok()?))
                    })
                    .collect();
                s.put_done(done).await;
                s.end_jobs(freed.clone());
            }
            others.retain(|j| !freed.contains(&j.holder));
        }
        let before = pending.len();
        let mut still = Vec::with_capacity(pending.len());
        let now = Instant::now();
        let mut learn = |lower: Option<Duration>, upper: Option<Duration>| {
            expected = learn_job_time(expected, lower, upper, spacing);
        };
        // Other writers' jobs in this poll teach as much as this writer's own.
        for (age, done) in other_ages {
            if done {
                learn(None, Some(age));
            } else {
                learn(Some(age.saturating_sub(now - sent)), None);
            }
        }
        for mut w in pending.drain(..) {
            match statuses.get(&w.id) {
                Some(j) if j.is_terminal() => {
                    learn(w.running_at.map(|seen| seen - w.since), Some(now - w.since));
                    let _ = w.done.send(Ok(j.clone()));
                }
                Some(_) => {
                    // Running when the poll went out, or after: its age then is the bound.
                    let seen = sent.max(w.since);
                    learn(Some(seen - w.since), None);
                    w.running_at = Some(seen);
                    still.push(w);
                }
                // Not listed: Zendesk no longer keeps the job.
                None => {
                    let _ = w.done.send(Err(ZendeskError::Api {
                        path: "/api/v2/job_statuses/show_many".into(),
                        status: 404,
                        code: "RecordNotFound".into(),
                        description: format!("job {} is no longer retained", w.id),
                        details: None,
                    }));
                }
            }
        }
        if expected.is_some() {
            job_time(&account, expected);
        }
        let finished = before - still.len();
        tracing::trace!(
            ids = ids.len(),
            finished,
            freed = freed_any,
            waiting = still.len(),
            starved,
            held = shared.as_ref().map(|s| s.held()),
            k = shared.as_ref().map(|s| s.worth_freeing()),
            own,
            typical_ms = typical.as_millis() as u64,
            claim_ms,
            others = others.len(),
            "polled jobs"
        );
        pending = still;
        let most = expected.map_or(poll_max, |e| (e / 2).clamp(spacing, poll_max.max(spacing)));
        interval = if finished == 0 && !freed_any {
            // Slots are the bound while they are all held: look again soon, since requests
            // are to spare then.
            let most = if starved { spacing } else { most };
            (interval * 2).min(most)
        } else {
            spacing
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Jobs of `time(n)` ms, each polled at its expected due time and by other polls every
    /// 30 ms (at a phase of their own): the estimate after `jobs` of them.
    fn learnt(start: u64, jobs: u64, time: impl Fn(u64) -> u64) -> u64 {
        let ms = Duration::from_millis;
        let mut e = Some(ms(start));
        for n in 0..jobs {
            let d = time(n);
            let due = e.unwrap().as_millis() as u64;
            let phase = (n * 7919) % 30;
            let mut ages: Vec<u64> = (0..100).map(|k| phase + 30 * k).collect();
            ages.push(due);
            ages.sort();
            let lower = ages.iter().rev().find(|&&a| a < d).map(|&a| ms(a));
            let upper = ages.iter().find(|&&a| a >= d).map(|&a| ms(a));
            if let Some(lo) = lower {
                e = learn_job_time(e, Some(lo), None, ms(30));
            }
            e = learn_job_time(e, lower, upper, ms(30));
        }
        e.unwrap().as_millis() as u64
    }

    #[test]
    fn the_job_time_settles_just_above_a_steady_one_from_either_side() {
        for start in [100, 300, 502, 900, 3000] {
            let e = learnt(start, 300, |_| 502);
            assert!((502..=512).contains(&e), "from {start} ms: {e} ms");
        }
    }

    #[test]
    fn the_job_time_stays_among_varying_ones() {
        let e = learnt(500, 500, |n| 400 + (n * 37) % 200);
        assert!((400..600).contains(&e), "{e} ms");
    }

    #[test]
    fn a_job_inside_the_estimate_leaves_it_and_a_late_poll_sets_nothing() {
        let ms = Duration::from_millis;
        let e = Some(ms(500));
        assert_eq!(learn_job_time(e, Some(ms(480)), Some(ms(530)), ms(30)), e);
        assert_eq!(learn_job_time(e, None, Some(ms(900)), ms(30)), e);
        assert_eq!(learn_job_time(None, None, Some(ms(900)), ms(30)), None);
        assert_eq!(
            learn_job_time(None, Some(ms(400)), None, ms(30)),
            Some(ms(400))
        );
        // Seen running at 520 and done at 530: halfway to 525.
        assert_eq!(
            learn_job_time(e, Some(ms(520)), Some(ms(530)), ms(30)),
            Some(ms(512) + Duration::from_micros(500))
        );
        // Done by 400: halfway down.
        assert_eq!(
            learn_job_time(e, None, Some(ms(400)), ms(30)),
            Some(ms(450))
        );
        // One job still running after a minute: half as long again, not thirty seconds.
        let e = Some(ms(2_000));
        assert_eq!(
            learn_job_time(e, Some(ms(60_000)), None, ms(30)),
            Some(ms(3_000))
        );
    }

    fn row(i: u32, pk: &str) -> ChunkRow {
        ChunkRow {
            key_hash: "0".into(),
            index: i,
            key: pk.into(),
            fingerprint: "0".into(),
            lookup: false,
            zendesk_id: None,
            source: "x:1".into(),
            payload: serde_json::json!({"external_id": pk}),
            email: None,
        }
    }

    fn res(index: Option<u64>, id: u64, ext: Option<&str>) -> JobResult {
        JobResult {
            index,
            id: Some(id),
            external_id: ext.map(str::to_string),
            status: Some("Created".into()),
            ..Default::default()
        }
    }

    #[test]
    fn results_map_by_index_base_position_and_external_id() {
        let rows = vec![row(0, "a"), row(1, "b"), row(2, "c")];
        let idx = [0, 1, 2];
        let zero = [res(Some(2), 12, None), res(Some(0), 10, None)];
        let m = map_results(&rows, &idx, &zero);
        assert_eq!(m[0].unwrap().id, Some(10));
        assert!(m[1].is_none());
        assert_eq!(m[2].unwrap().id, Some(12));

        let one = [
            res(Some(1), 10, None),
            res(Some(2), 11, None),
            res(Some(3), 12, None),
        ];
        let m = map_results(&rows, &idx, &one);
        assert_eq!(m[0].unwrap().id, Some(10));
        assert_eq!(m[2].unwrap().id, Some(12));

        let positional = [
            res(None, 10, None),
            res(None, 11, Some("C")),
            res(None, 12, None),
        ];
        let m = map_results(&rows, &idx, &positional);
        assert_eq!(m[0].unwrap().id, Some(10));
        assert_eq!(
            m[2].unwrap().id,
            Some(12),
            "the last positional result lands on row 2 too"
        );
        // A subset batch: results refer to positions within the subset.
        let sub = [res(Some(0), 99, None)];
        let m = map_results(&rows, &[2], &sub);
        assert_eq!(m[0].unwrap().id, Some(99));
    }
}
