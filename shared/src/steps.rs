//! The pipeline as the Step Functions steps run it, one Lambda each: `plan` (trigger → change
//! set + a small descriptor), `write_batch` (one chunk), `finalize` (fold, run record, lock
//! release). Plain async functions over the ports, so they are tested without AWS; the Lambda
//! crates only add the runtime, the S3 store and the Secrets Manager credentials.

use crate::changeset::{self, read_text, ChangeSetError, ChunkInfo, Counts, Manifest};
use crate::config::SyncConfig;
use crate::errors::ErrorName;
use crate::errors::RunError;
use crate::layout;
use crate::lock;
use crate::pipeline;
use crate::record::{self, InvalidSample, Phases, RecordParts, RunErrorInfo, RunRecord, RunStatus};
use crate::store::ObjectStore;
use crate::write::{Progress, WriteOptions};
use crate::zendesk::{Client, ZendeskError};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Builds the Zendesk client of a sync (credentials from the deployment's secret).
pub type ClientFactory =
    Arc<dyn Fn(&SyncConfig) -> BoxFuture<'static, Result<Client, ZendeskError>> + Send + Sync>;

/// What every step needs from its Lambda.
#[derive(Clone)]
pub struct StepEnv {
    pub store: Arc<dyn ObjectStore>,
    /// The bucket's name, echoed into descriptors for the Distributed Map's reader.
    pub bucket: String,
    pub client_for: ClientFactory,
    /// write-batch invocations at once when the sync sets no `max_jobs_in_flight`-based value.
    pub default_concurrency: u32,
    /// A run's lock outlives the plan invocation; finalize releases it.
    pub lock_ttl: Duration,
    pub write: WriteOptions,
    /// Where configs may send the credential (a deployment: the account's own Zendesk only).
    pub endpoint: crate::config::EndpointPolicy,
    /// How often a write-batch checks that its run still holds the lock (and renews it); a
    /// write-batch whose run was taken over stops sending at once.
    pub lock_check: Duration,
    /// An execution that ended without finalizing leaves its lock to the next run after this
    /// long: its write-batch invocations may still be finishing a call (they stop within
    /// `lock_check` plus one request timeout).
    pub abort_grace: Duration,
    /// An S3-triggered run of a prefix export starts once the prefix's listing has not changed
    /// for this long (a multi-part unload lands part by part); zero plans at once.
    pub settle: Duration,
}

/// What started an execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub sync: String,
    /// `s3`, `schedule`, `manual`.
    pub kind: String,
    /// The export object (key, ETag) of an S3 trigger: a run is keyed by it.
    pub object: Option<(String, String)>,
    /// `{"sync": "...", "full_resync": true}`: send every row again (see `RunOptions`).
    #[serde(default)]
    pub full_resync: bool,
    /// `{"sync": "...", "max_rows": N}`: this run's row cap, in place of `max_rows_per_run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// The Step Functions execution running the plan (recorded in the lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<String>,
}

/// Read the execution input: an EventBridge S3 "Object Created" event under `exports/<sync>/`,
/// or `{"sync": "...", "trigger": "..."}` from a schedule or a manual start.
pub fn parse_trigger(event: &Value) -> Result<Trigger, RunError> {
    let bad = |m: String| {
        RunError::Config(crate::config::ConfigError::Invalid {
            file: "execution input".into(),
            message: m,
        })
    };
    if event["detail-type"] == "Object Created" {
        let key = event["detail"]["object"]["key"]
            .as_str()
            .ok_or_else(|| bad("an S3 event without detail.object.key".into()))?;
        // AWS sends `etag`; some emitters (moto) spell it `eTag`.
        let object = &event["detail"]["object"];
        let etag = object["etag"]
            .as_str()
            .or_else(|| object["eTag"].as_str())
            .unwrap_or_default()
            .trim_matches('"')
            .to_string();
        let mut parts = key.split('/');
        let sync = match (parts.next(), parts.next()) {
            (Some("exports"), Some(s)) if !s.is_empty() => s.to_string(),
            _ => {
                return Err(bad(format!(
                    "export key `{key}` is not under exports/<sync>/: put each sync's files in its own folder"
                )))
            }
        };
        return Ok(Trigger {
            sync,
            kind: "s3".into(),
            object: Some((key.to_string(), etag)),
            full_resync: false,
            max_rows: None,
            execution: None,
        });
    }
    match event["sync"].as_str() {
        Some(s) if !s.is_empty() => Ok(Trigger {
            sync: s.to_string(),
            kind: event["trigger"].as_str().unwrap_or("manual").to_string(),
            object: None,
            full_resync: event["full_resync"].as_bool().unwrap_or(false),
            execution: None,
            max_rows: match &event["max_rows"] {
                Value::Null => None,
                v => Some(v.as_u64().filter(|n| *n > 0).ok_or_else(|| {
                    bad(format!(
                        "\"max_rows\" must be a whole number of rows above 0, not {v}"
                    ))
                })?),
            },
        }),
        _ => Err(bad(
            "expected an S3 Object Created event or {\"sync\": \"<name>\"}".into(),
        )),
    }
}

/// Finalize's input: the execution's state (`{"plan": {"run": …}, "error": {…}}`), where
/// `plan` is missing when plan itself failed and `error` is what a Catch caught.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FinalizeState {
    #[serde(default)]
    pub plan: Option<PlannedRun>,
    #[serde(default)]
    pub error: Option<CaughtError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedRun {
    pub run: PlanDescriptor,
}

/// A Step Functions Catch's error output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaughtError {
    #[serde(rename = "Error")]
    pub error: String,
    #[serde(rename = "Cause", default)]
    pub cause: String,
}

impl FinalizeState {
    /// Read finalize's input; a malformed one is a `ConfigInvalid` (the definition is wrong).
    pub fn parse(v: &Value) -> Result<FinalizeState, RunError> {
        serde_json::from_value(v.clone()).map_err(|e| {
            RunError::Config(crate::config::ConfigError::Invalid {
                file: "finalize input".into(),
                message: format!("expected {{\"plan\": {{\"run\": …}}, \"error\": …}}: {e}"),
            })
        })
    }
}

/// An execution's state comes back to the steps as input a start request could have shaped: a
/// descriptor or a write input is only followed when every key it names belongs to its own sync
/// and run.
fn confine(sync: &str, run_id: &str, keys: &[(&str, bool)]) -> Result<(), RunError> {
    let bad = |m: String| {
        RunError::Config(crate::config::ConfigError::Invalid {
            file: "execution state".into(),
            message: m,
        })
    };
    if !crate::config::valid_sync_name(sync) || !layout::valid_run_id(run_id) {
        return Err(bad(format!(
            "sync {sync:?} / run {run_id:?} are not a sync name and a run id"
        )));
    }
    for (key, ok) in keys {
        if !ok {
            return Err(bad(format!(
                "key {key:?} is not one of run {run_id} of sync {sync}; nothing was read or written"
            )));
        }
    }
    Ok(())
}

impl PlanDescriptor {
    /// Every key the descriptor names is its own run's (see [`confine`]).
    pub fn confine(&self) -> Result<(), RunError> {
        let (s, r) = (&self.sync, &self.run_id);
        let mut keys = vec![
            (
                self.manifest_key.as_str(),
                self.manifest_key.is_empty() || self.manifest_key == layout::manifest_key(s, r),
            ),
            (
                self.chunks_key.as_str(),
                self.chunks_key.is_empty() || self.chunks_key == layout::chunk_list_key(s, r),
            ),
        ];
        if let Some(m) = &self.trigger_marker {
            keys.push((m.as_str(), layout::is_trigger_marker_of(s, m)));
        }
        confine(s, r, &keys)
    }
}

impl WriteInput {
    /// The manifest and the chunk are its own run's (see [`confine`]).
    pub fn confine(&self) -> Result<(), RunError> {
        let (s, r) = (&self.sync, &self.run_id);
        confine(
            s,
            r,
            &[
                (
                    self.manifest_key.as_str(),
                    self.manifest_key == layout::manifest_key(s, r),
                ),
                (
                    self.chunk.key.as_str(),
                    layout::is_chunk_of(s, r, &self.chunk.key),
                ),
            ],
        )
    }
}

/// The Plan task's payload: `{"input": <execution input>, "execution": <execution ARN>}` as the
/// definition sends it, or the execution input alone (a direct invocation).
pub fn parse_plan_payload(payload: &Value) -> Result<Trigger, RunError> {
    match (
        payload.get("input"),
        payload.get("execution").and_then(Value::as_str),
    ) {
        (Some(input), Some(execution)) => {
            let mut t = parse_trigger(input)?;
            t.execution = Some(execution.to_string());
            Ok(t)
        }
        _ => parse_trigger(payload),
    }
}

/// EventBridge's "Step Functions Execution Status Change" for an execution that ended.
#[derive(Debug, Clone, Deserialize)]
pub struct ExecutionEnded {
    pub detail: ExecutionEndedDetail,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExecutionEndedDetail {
    #[serde(rename = "executionArn")]
    pub execution_arn: String,
    pub status: String,
    /// The execution's input, as JSON text.
    #[serde(default)]
    pub input: Option<String>,
}

/// An execution that ended without finalize (aborted, timed out, or failed outside every
/// Catch): its lock expires after `abort_grace`, so the next execution takes it over and
/// finishes the run, and its export's trigger marker is dropped so the same object can start a run
/// again. An execution that did finalize left neither behind: nothing happens.
pub async fn execution_ended_step(env: &StepEnv, event: &ExecutionEnded) -> Result<bool, RunError> {
    let d = &event.detail;
    if !matches!(d.status.as_str(), "ABORTED" | "TIMED_OUT" | "FAILED") {
        return Ok(false);
    }
    let input: Value = d
        .input
        .as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null);
    let Ok(trigger) = parse_trigger(&input) else {
        return Ok(false);
    };
    if !crate::config::valid_sync_name(&trigger.sync) {
        return Ok(false);
    }
    let (store, sync, arn) = (
        env.store.clone(),
        trigger.sync.clone(),
        d.execution_arn.clone(),
    );
    let grace = env.abort_grace;
    let expired = blocking(move || {
        Ok(lock::expire_for_execution(
            store.as_ref(),
            &sync,
            &arn,
            grace,
        )?)
    })
    .await?;
    if expired {
        tracing::warn!(sync = %trigger.sync, execution = %d.execution_arn, status = %d.status, "the execution ended without finalizing: its lock is released to the next run, which finishes it");
        if let Some((key, etag)) = &trigger.object {
            forget_trigger(env, layout::trigger_marker_key(&trigger.sync, key, etag)).await;
        }
    }
    // A plan that died while waiting for its export to settle: the next part's event plans.
    let (store, k, arn) = (
        env.store.clone(),
        layout::pending_trigger_key(&trigger.sync),
        d.execution_arn.clone(),
    );
    let _ = blocking(move || {
        if let Ok(Some((bytes, tag))) = store.get_tagged(&k) {
            let held: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if held["execution"].as_str() == Some(arn.as_str()) {
                let _ = store.delete_if_match(&k, &tag);
            }
        }
        Ok(())
    })
    .await;
    Ok(expired)
}

/// What plan hands to the state machine: keys and counts, never rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDescriptor {
    pub sync: String,
    pub run_id: String,
    pub bucket: String,
    pub trigger: String,
    /// `object` (users, organizations, tickets) or `audience`.
    pub kind: String,
    pub manifest_key: String,
    /// A JSON array of chunk descriptors, the Distributed Map's items.
    pub chunks_key: String,
    pub chunks: u64,
    pub rows_to_write: u64,
    pub max_concurrency: u32,
    /// No chunk to write (or a duplicate event): the Choice goes straight to finalize.
    pub nothing_to_do: bool,
    /// The export object was already synced by an earlier execution.
    pub duplicate: bool,
    /// The export object's dedupe marker; finalize drops it when the run fails, so the same
    /// object can start a run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_marker: Option<String>,
    pub counts: Counts,
    pub started_at: String,
    /// The execution input's run options, for audience-diff (which plans audience upserts).
    #[serde(default)]
    pub full_resync: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RunError> + Send + 'static,
) -> Result<T, RunError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RunError::Internal(format!("task: {e}")))?
}

/// The largest sync config read from the bucket.
const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// The sync config stored at `config/<sync>.toml`.
pub async fn load_config(env: &StepEnv, sync: &str) -> Result<SyncConfig, RunError> {
    let (store, policy) = (env.store.clone(), env.endpoint.clone());
    if !crate::config::valid_sync_name(sync) {
        return Err(RunError::Config(crate::config::ConfigError::Invalid {
            file: "execution input".into(),
            message: format!("sync {sync:?} is not a sync name (letters, digits, `_` and `-`)"),
        }));
    }
    let key = layout::config_key(sync);
    let sync = sync.to_string();
    blocking(move || {
        let read_err = |reason: String| {
            RunError::Config(crate::config::ConfigError::Read {
                path: key.clone(),
                reason,
            })
        };
        // A config is a page of TOML: anything far larger is not one, and is not read whole.
        match store.head(&key) {
            Ok(Some(meta)) if meta.size > MAX_CONFIG_BYTES => {
                return Err(read_err(format!(
                    "it is {} bytes; a sync config is at most {MAX_CONFIG_BYTES}",
                    meta.size
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(read_err(e.to_string())),
        }
        let text = read_text(store.as_ref(), &key).map_err(|e| read_err(e.to_string()))?;
        let cfg = SyncConfig::parse(&text, &key)?;
        cfg.check_stored_as(&sync, &key)?;
        cfg.zendesk.check_endpoint(&policy, &key)?;
        Ok(cfg)
    })
    .await
}

/// plan: dedupe the trigger, take the sync's lock, preflight, read the schema, plan, and store
/// the chunk list. On an error after the lock is taken the run is recorded as failed and the
/// lock released before the error is returned (finalize has no run to close then).
pub async fn plan_step(env: &StepEnv, trigger: &Trigger) -> Result<PlanDescriptor, RunError> {
    let started = chrono::Utc::now();
    let cfg = load_config(env, &trigger.sync).await?;
    let run_id = pipeline::new_run_id();
    let descriptor = |manifest_key: String, chunks_key: String| PlanDescriptor {
        sync: cfg.name.clone(),
        run_id: run_id.clone(),
        bucket: env.bucket.clone(),
        trigger: trigger.kind.clone(),
        kind: "object".into(),
        manifest_key,
        chunks_key,
        chunks: 0,
        rows_to_write: 0,
        max_concurrency: env.default_concurrency.max(1),
        nothing_to_do: true,
        duplicate: false,
        trigger_marker: None,
        counts: Counts::default(),
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        full_resync: trigger.full_resync,
        max_rows: trigger.max_rows,
    };

    // An export that is one object (a file, or the manifest a multi-part UNLOAD writes after
    // its parts) starts a run only when that object lands: events for the parts would plan a
    // half-written export.
    if let Some((key, _)) = &trigger.object {
        let location = cfg.source.location.trim_start_matches('/').to_string();
        if key != &location && !location.ends_with('/') {
            let (store, l) = (env.store.clone(), location.clone());
            let single = blocking(move || {
                store
                    .head(&l)
                    .map_err(|source| RunError::ChangeSet(ChangeSetError::Io { key: l, source }))
            })
            .await?
            .is_some();
            if single {
                tracing::info!(sync = %cfg.name, %key, %location, "not the export's trigger object (the sync reads {location}); nothing to do");
                return Ok(descriptor(String::new(), String::new()));
            }
        }
    }

    // A run is keyed by its export object: EventBridge may deliver an event twice.
    let mut marker = None;
    if let Some((key, etag)) = &trigger.object {
        let m = layout::trigger_marker_key(&cfg.name, key, etag);
        let body = serde_json::to_vec(&serde_json::json!({
            "key": key, "etag": etag, "run_id": run_id,
        }))
        .expect("marker serialises");
        let (store, k) = (env.store.clone(), m.clone());
        let fresh = blocking(move || {
            store
                .put_if_absent(&k, &body)
                .map_err(|source| RunError::ChangeSet(ChangeSetError::Io { key: k, source }))
        })
        .await?;
        if !fresh {
            tracing::info!(sync = %cfg.name, %key, %etag, "this export object was synced already; nothing to do");
            let mut d = descriptor(String::new(), String::new());
            d.duplicate = true;
            return Ok(d);
        }
        marker = Some(m);
    }
    // A prefix export (a multi-part unload) lands part by part, each part an event: one
    // execution waits for the prefix to settle and plans it whole; the others join it.
    if let Some((key, etag)) = &trigger.object {
        let location = cfg.source.location.trim_start_matches('/');
        if key != location {
            let claim =
                claim_pending(env, &cfg.name, key, etag, trigger.execution.as_deref()).await;
            match claim {
                Ok(Claim::Mine(tag)) => {
                    settle(env, &cfg.name, location).await;
                    // From here on a new part starts a new execution, which plans after this
                    // run (the lock); every part listed now is this run's.
                    let (store, k) = (env.store.clone(), layout::pending_trigger_key(&cfg.name));
                    let _ = blocking(move || {
                        store.delete_if_match(&k, &tag).map_err(|source| {
                            RunError::ChangeSet(ChangeSetError::Io { key: k, source })
                        })
                    })
                    .await;
                }
                other => {
                    // This part is planned by the execution already waiting (or, on an error,
                    // by the next event's): its own marker must not hide it later.
                    if let Some(m) = marker {
                        forget_trigger(env, m).await;
                    }
                    if let Ok(Claim::Joined(by)) = &other {
                        tracing::info!(sync = %cfg.name, %key, pending = %by, "another execution is waiting for this export to settle; this part joins it");
                    }
                    other?;
                    let mut d = descriptor(String::new(), String::new());
                    d.duplicate = true;
                    return Ok(d);
                }
            }
        }
    }
    let result = plan_with_lock(env, &cfg, &run_id, trigger, started).await;
    match result {
        Ok(mut d) => {
            d.trigger_marker = marker;
            Ok(d)
        }
        Err(e) => {
            // No run happened: the object may trigger again (the state machine retries a
            // RunLocked plan with this very event).
            if let Some(m) = marker {
                forget_trigger(env, m).await;
            }
            Err(e)
        }
    }
}

/// Write-batch invocations at once that keep the account's budget busy and no more (one more
/// only waits, billed, for a job slot or a request), the most of:
/// - enough chunks in flight to hold every job slot (a chunk of `chunk_rows` has
///   `chunk_rows / 100` batches), and one more to cover the gap while an invocation starts;
/// - one sending, one starting, and as many as the budget sends chunks while one waits out its
///   chunk's last jobs: an invocation ends only once Zendesk has finished them and a poll has
///   seen it ([`CHUNK_TAIL`]), and it sends nothing meanwhile;
/// - one per 1,500 requests a minute.
///
/// Capped by the deployment's `DefaultMaxConcurrency`.
pub fn map_concurrency(cfg: &SyncConfig) -> u32 {
    let batches_per_chunk = (cfg.chunk_rows / 100).max(1);
    let jobs = cfg.zendesk.max_jobs_in_flight.unwrap_or(30).clamp(1, 100);
    let by_jobs = jobs.div_ceil(batches_per_chunk) as u32 + 1;
    // Batches a second the account takes: its rate, or its job slots if jobs take a second.
    let per_s = (f64::from(cfg.rate_limit_rpm()) / 60.0).min(jobs as f64);
    let in_tail = per_s * CHUNK_TAIL.as_secs_f64() / batches_per_chunk as f64;
    // Each one sending takes a job slot: more than the slots would only wait.
    let by_tail = (2 + in_tail.ceil() as u32).min(jobs as u32 + 1);
    let by_rate = 1 + cfg.rate_limit_rpm() / 1500;
    by_jobs.max(by_tail).max(by_rate)
}

/// How long a write-batch invocation waits after its chunk's last batch is sent: Zendesk's
/// job time (a second or more) and the account's next poll (about 1.5 job times later).
pub const CHUNK_TAIL: Duration = Duration::from_secs(3);

/// A pending marker older than this belongs to a plan that died while settling.
const PENDING_STALE_SECS: i64 = 20 * 60;
/// The longest a plan waits for a prefix export to stop growing before it plans what is there.
const MAX_SETTLE: Duration = Duration::from_secs(300);

enum Claim {
    /// This execution settles and plans the prefix; the marker's version tag.
    Mine(String),
    /// Another execution is settling it (the export key that started it).
    Joined(String),
}

/// Take the sync's pending marker, or learn that another execution holds it.
async fn claim_pending(
    env: &StepEnv,
    sync: &str,
    key: &str,
    etag: &str,
    execution: Option<&str>,
) -> Result<Claim, RunError> {
    let k = layout::pending_trigger_key(sync);
    let body = serde_json::to_vec(&serde_json::json!({
        "key": key, "etag": etag, "execution": execution,
        "since": chrono::Utc::now().timestamp(),
    }))
    .expect("marker serialises");
    let store = env.store.clone();
    blocking(move || {
        let io = |source| {
            RunError::ChangeSet(ChangeSetError::Io {
                key: k.clone(),
                source,
            })
        };
        for _ in 0..5 {
            if store.put_if_absent(&k, &body).map_err(io)? {
                if let Some((_, tag)) = store.get_tagged(&k).map_err(io)? {
                    return Ok(Claim::Mine(tag));
                }
                continue;
            }
            let Some((bytes, tag)) = store.get_tagged(&k).map_err(io)? else {
                continue;
            };
            let held: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let since = held["since"].as_i64().unwrap_or(0);
            if chrono::Utc::now().timestamp() - since > PENDING_STALE_SECS {
                if store.put_if_match(&k, &body, &tag).map_err(io)? {
                    if let Some((_, tag)) = store.get_tagged(&k).map_err(io)? {
                        return Ok(Claim::Mine(tag));
                    }
                }
                continue;
            }
            return Ok(Claim::Joined(
                held["key"].as_str().unwrap_or_default().to_string(),
            ));
        }
        Err(io(std::io::Error::other(
            "the pending-trigger marker kept changing; the next event retries",
        )))
    })
    .await
}

/// Wait until the listing under `location` is the same twice `env.settle` apart (at most
/// [`MAX_SETTLE`]).
async fn settle(env: &StepEnv, sync: &str, location: &str) {
    if env.settle.is_zero() {
        return;
    }
    let list = || {
        let (store, l) = (env.store.clone(), location.to_string());
        async move {
            blocking(move || Ok(store.list(&l).ok()))
                .await
                .ok()
                .flatten()
        }
    };
    let deadline = tokio::time::Instant::now() + MAX_SETTLE.max(env.settle);
    let mut last = list().await;
    loop {
        tokio::time::sleep(env.settle).await;
        let now = list().await;
        if now == last {
            tracing::info!(%sync, %location, parts = now.as_ref().map_or(0, Vec::len), "the export has settled");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(%sync, %location, "the export is still growing after {}s; planning what is there (later parts start another run)", MAX_SETTLE.as_secs());
            return;
        }
        last = now;
    }
}

/// Store one small object (chunk list, stats, failure marker).
async fn put_object(env: &StepEnv, key: String, body: Vec<u8>) -> Result<(), RunError> {
    let store = env.store.clone();
    blocking(move || {
        store
            .put(&key, &body)
            .map_err(|source| RunError::ChangeSet(ChangeSetError::Io { key, source }))
    })
    .await
}

/// Drop an export object's marker so the same object (a redelivered event, or the file put
/// again) starts a run again.
async fn forget_trigger(env: &StepEnv, marker: String) {
    let store = env.store.clone();
    let _ = blocking(move || {
        store.delete(&marker).map_err(|source| {
            RunError::ChangeSet(ChangeSetError::Io {
                key: marker,
                source,
            })
        })
    })
    .await
    .map_err(|e| tracing::warn!(error = %e, "could not drop the trigger marker"));
}

async fn plan_with_lock(
    env: &StepEnv,
    cfg: &SyncConfig,
    run_id: &str,
    trigger: &Trigger,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<PlanDescriptor, RunError> {
    let guard = lock::acquire_for(
        env.store.clone(),
        &cfg.name,
        run_id,
        env.lock_ttl,
        Duration::ZERO,
        trigger.execution.clone(),
    )
    .await?;
    let taken_over = guard.taken_over.clone();
    let result = plan_locked(env, cfg, run_id, trigger, started, taken_over).await;
    match result {
        Ok(d) => {
            // The lock stays for write-batch and finalize; only its renewal stops here.
            drop(guard);
            Ok(d)
        }
        Err(e) => {
            guard.release().await;
            Err(e)
        }
    }
}

/// How long plan spends finishing an abandoned run before it hands the sync back (its
/// invocation may run 15 minutes); what is left is finished by the retry.
const RESUME_BUDGET: Duration = Duration::from_secs(10 * 60);

async fn plan_locked(
    env: &StepEnv,
    cfg: &SyncConfig,
    run_id: &str,
    trigger: &Trigger,
    started: chrono::DateTime<chrono::Utc>,
    taken_over: Option<lock::LockInfo>,
) -> Result<PlanDescriptor, RunError> {
    let client = (env.client_for)(cfg).await?;
    pipeline::check_account(&client, cfg).await?;
    // A run whose execution stopped between plan and finalize (or a local run interrupted) is
    // finished first, exactly as the local runner does, so nothing it created is created again.
    let ctx = pipeline::RunContext {
        store: env.store.clone(),
        config: cfg.clone(),
        client: client.clone(),
        progress: Arc::new(Progress::default()),
    };
    let opts = pipeline::RunOptions {
        trigger: trigger.kind.clone(),
        write: env.write.clone(),
        lock_ttl: env.lock_ttl,
        ..pipeline::RunOptions::default()
    };
    let stop = opts.stop.clone();
    let budget = tokio::spawn(async move {
        tokio::time::sleep(RESUME_BUDGET).await;
        stop.request();
    });
    let finished = pipeline::finish_unfinished(&ctx, &opts, run_id, taken_over).await;
    budget.abort();
    let mut started = started;
    if let Some(rec) = finished? {
        // This run starts after the one it finished, as the local runner counts it.
        started = chrono::Utc::now();
        tracing::info!(sync = %cfg.name, run = %rec.run_id, status = ?rec.status, "finished an abandoned run before planning");
        if rec.status == RunStatus::Interrupted {
            // Not done within the budget: the retry (RunLocked) goes on with it.
            return Err(RunError::from(lock::LockError::Held {
                sync: cfg.name.clone(),
                run_id: rec.run_id.clone(),
                host: lock::host_name(),
                pid: std::process::id(),
                acquired_at: rec.started_at.clone(),
                expires: "when it is finished".into(),
            }));
        }
    }
    if cfg.is_audience() {
        // audience-diff plans (tagging was checked with the account).
        return Ok(PlanDescriptor {
            sync: cfg.name.clone(),
            run_id: run_id.to_string(),
            bucket: env.bucket.clone(),
            trigger: trigger.kind.clone(),
            kind: "audience".into(),
            manifest_key: String::new(),
            chunks_key: String::new(),
            chunks: 0,
            rows_to_write: 0,
            max_concurrency: env.default_concurrency.max(1),
            nothing_to_do: false,
            duplicate: false,
            trigger_marker: None,
            counts: Counts::default(),
            started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            full_resync: trigger.full_resync,
            max_rows: trigger.max_rows,
        });
    }
    plan_object(env, cfg, &client, run_id, trigger, started).await
}

/// The object plan (and, for audience upserts, audience-diff's): schema, plan, chunk list.
async fn plan_object(
    env: &StepEnv,
    cfg: &SyncConfig,
    client: &Client,
    run_id: &str,
    trigger: &Trigger,
    started: chrono::DateTime<chrono::Utc>,
) -> Result<PlanDescriptor, RunError> {
    let defaults = pipeline::RunOptions::default();
    let inputs = pipeline::PlanInputs {
        run_id: run_id.to_string(),
        schema: pipeline::read_schema(client, cfg, Some((&env.store, run_id))).await?,
        samples: defaults.samples,
        full_resync: trigger.full_resync,
        export_rpm: defaults.export_rpm,
    };
    let report = pipeline::plan_run(&env.store, cfg, Some(client), &inputs).await?;
    let m = &report.manifest;
    pipeline::check_cap(
        m,
        trigger.max_rows.or(cfg.max_rows_per_run),
        cfg.rate_limit_rpm(),
    )?;
    let chunks_key = layout::chunk_list_key(&m.sync, &m.run_id);
    let body = serde_json::to_vec(&m.chunks).expect("chunk list serialises");
    put_object(env, chunks_key.clone(), body).await?;
    let rows: u64 = m.chunks.iter().map(|c| c.rows).sum();
    let by_budget = map_concurrency(cfg);
    Ok(PlanDescriptor {
        sync: m.sync.clone(),
        run_id: m.run_id.clone(),
        bucket: env.bucket.clone(),
        trigger: trigger.kind.clone(),
        kind: if cfg.is_audience() {
            "audience".into()
        } else {
            "object".into()
        },
        manifest_key: report.manifest_key.clone().unwrap_or_default(),
        chunks_key,
        chunks: m.chunks.len() as u64,
        rows_to_write: rows,
        max_concurrency: env.default_concurrency.clamp(1, by_budget),
        nothing_to_do: m.chunks.is_empty(),
        duplicate: false,
        trigger_marker: None,
        counts: m.counts.clone(),
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        full_resync: trigger.full_resync,
        max_rows: trigger.max_rows,
    })
}

/// audience-diff: the membership export against the membership state → tag-operation chunks
/// (audience upsert: the object change set, whose writes also add the tag), under the run plan
/// opened. The input is plan's descriptor; the answer replaces it.
pub async fn audience_diff_step(
    env: &StepEnv,
    d: &PlanDescriptor,
) -> Result<PlanDescriptor, RunError> {
    if d.kind != "audience" || d.nothing_to_do || d.duplicate {
        return Ok(d.clone());
    }
    d.confine()?;
    let cfg = load_config(env, &d.sync).await?;
    if !cfg.is_audience() {
        return Err(RunError::Config(crate::config::ConfigError::Invalid {
            file: layout::config_key(&d.sync),
            message: "the sync is no longer an audience sync (its [audience] table is gone) while a run of it was planned as one; start the run again".into(),
        }));
    }
    let started = chrono::DateTime::parse_from_rfc3339(&d.started_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let trigger = Trigger {
        sync: d.sync.clone(),
        kind: d.trigger.clone(),
        object: None,
        full_resync: d.full_resync,
        max_rows: d.max_rows,
        execution: None,
    };
    let client = (env.client_for)(&cfg).await?;
    let mut out = plan_object(env, &cfg, &client, &d.run_id, &trigger, started).await?;
    out.started_at = d.started_at.clone();
    out.trigger_marker = d.trigger_marker.clone();
    Ok(out)
}

/// One item of the Distributed Map.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteInput {
    pub sync: String,
    pub run_id: String,
    pub manifest_key: String,
    pub chunk: ChunkInfo,
    /// Set by the item processor's Catch (`{"Error", "Cause"}`): the chunk failed after its
    /// retries, and this invocation only records that for finalize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// What a caught chunk failure leaves next to the chunk's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkFailure {
    pub chunk: String,
    pub error: String,
    pub cause: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteOutput {
    pub chunk: String,
    pub rows: u64,
    pub created: u64,
    pub updated: u64,
    pub failed: u64,
    pub requests: u64,
}

/// write-batch: one chunk to Zendesk. A retried invocation resumes from the stored outcomes and
/// journals. Its request counters land next to the chunk's results for finalize.
pub async fn write_step(env: &StepEnv, input: &WriteInput) -> Result<WriteOutput, RunError> {
    input.confine()?;
    if input.error.is_none() {
        // The run's lock lives while its chunks are written; a run taken over writes nothing.
        let (store, sync, run, ttl) = (
            env.store.clone(),
            input.sync.clone(),
            input.run_id.clone(),
            env.lock_ttl,
        );
        blocking(move || Ok(lock::renew_held(store.as_ref(), &sync, &run, ttl)?)).await?;
    }
    if let Some(e) = &input.error {
        return record_chunk_failure(env, input, e).await;
    }
    let cfg = load_config(env, &input.sync).await?;
    let (store, key) = (env.store.clone(), input.manifest_key.clone());
    let manifest = blocking(move || Ok(changeset::read_manifest(store.as_ref(), &key)?)).await?;
    let client = (env.client_for)(&cfg).await?;
    let progress = Arc::new(Progress::default());
    let ctx = pipeline::RunContext {
        store: env.store.clone(),
        config: cfg,
        client: client.clone(),
        progress: progress.clone(),
    };
    // While the chunk is written the run must keep its lock: an execution that was aborted and
    // whose lock the next run took over stops sending (calls in flight finish and record).
    let stop = crate::write::Stop::default();
    let watcher = {
        let (store, sync, run, ttl, every, stop) = (
            env.store.clone(),
            input.sync.clone(),
            input.run_id.clone(),
            env.lock_ttl,
            env.lock_check.max(Duration::from_millis(100)),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (s, y, r) = (store.clone(), sync.clone(), run.clone());
                let held =
                    tokio::task::spawn_blocking(move || lock::renew_held(s.as_ref(), &y, &r, ttl))
                        .await;
                if let Ok(Err(
                    e @ (lock::LockError::Held { .. } | lock::LockError::Abandoned { .. }),
                )) = held
                {
                    tracing::warn!(%sync, %run, error = %e, "this write-batch stops sending");
                    stop.request();
                    return Some(e);
                }
            }
        })
    };
    let written = pipeline::writer(&ctx, &env.write, &manifest)
        .with_stop(stop)
        .write_chunk(&input.chunk)
        .await;
    watcher.abort();
    let summary = match (written, watcher.await) {
        (Err(crate::write::WriteError::Stopped), Ok(Some(held))) => return Err(held.into()),
        (written, _) => written?,
    };
    let stats = client.stats();
    let name = layout::chunk_name(&input.chunk.key).to_string();
    let key = layout::batch_stats_key(
        &manifest.sync,
        &manifest.run_id,
        &name,
        &pipeline::new_run_id(),
    );
    let body = serde_json::to_vec(&serde_json::json!({
        "requests": stats,
        "jobs": progress.jobs.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .expect("stats serialise");
    put_object(env, key, body).await?;
    Ok(WriteOutput {
        chunk: name,
        rows: summary.rows,
        created: summary.created,
        updated: summary.updated,
        failed: summary.failed,
        requests: stats.sent,
    })
}

/// The item processor caught a chunk failure: store it for finalize, which names it in the run
/// record. The chunk's rows without an outcome are sent again (creates looked up first) next run.
async fn record_chunk_failure(
    env: &StepEnv,
    input: &WriteInput,
    error: &Value,
) -> Result<WriteOutput, RunError> {
    let name = layout::chunk_name(&input.chunk.key).to_string();
    let failure = ChunkFailure {
        chunk: name.clone(),
        error: error["Error"]
            .as_str()
            .unwrap_or(ErrorName::Internal.as_str())
            .to_string(),
        cause: cause_message(error["Cause"].as_str().unwrap_or_default()),
    };
    tracing::warn!(chunk = %name, error = %failure.error, cause = %failure.cause, "chunk failed after its retries");
    let key = format!(
        "{}failed-{}.json",
        layout::results_prefix(&input.sync, &input.run_id, &name),
        pipeline::new_run_id()
    );
    let body = serde_json::to_vec(&failure).expect("failure serialises");
    put_object(env, key, body).await?;
    Ok(WriteOutput {
        chunk: name,
        rows: input.chunk.rows,
        created: 0,
        updated: 0,
        failed: 0,
        requests: 0,
    })
}

/// A Lambda error reaches a Catch as `Cause` = `{"errorType", "errorMessage", ...}` JSON text;
/// keep the message only.
fn cause_message(cause: &str) -> String {
    serde_json::from_str::<Value>(cause)
        .ok()
        .and_then(|v| v["errorMessage"].as_str().map(str::to_string))
        .unwrap_or_else(|| cause.to_string())
}

/// finalize: fold the outcomes into the state, write the run record (failed when the execution
/// caught an error) and release the lock. The input is the execution state: `plan.run` is the
/// descriptor, `error` what a Catch recorded.
pub async fn finalize_step(
    env: &StepEnv,
    state: &FinalizeState,
) -> Result<Option<RunRecord>, RunError> {
    let t = Instant::now();
    let Some(d) = state.plan.as_ref().map(|p| p.run.clone()) else {
        // plan failed: it recorded nothing to fold and released the lock itself.
        return Ok(None);
    };
    d.confine()?;
    // A duplicate event, or an object that is not the export's trigger: no run to close.
    if d.duplicate || (d.manifest_key.is_empty() && d.nothing_to_do) {
        return Ok(None);
    }
    let mut error = state.error.as_ref().map(|e| RunErrorInfo {
        name: e.error.clone(),
        message: cause_message(&e.cause),
    });
    if d.manifest_key.is_empty() {
        // audience-diff failed before writing a change set: record the failure, free the lock.
        return finalize_unplanned(env, &d, error).await.map(Some);
    }
    let store = env.store.clone();
    let d2 = d.clone();
    let (manifest, fold, requests, jobs, failures) = blocking(move || {
        let manifest = changeset::read_manifest(store.as_ref(), &d2.manifest_key)?;
        // Only the lock holder writes the state (a run taken over is folded by its taker).
        lock::may_fold(store.as_ref(), &d2.sync, &d2.run_id)?;
        let fold = pipeline::fold(store.as_ref(), &manifest)?;
        // Sum what every write-batch invocation recorded.
        let mut requests = record::Requests::default();
        let mut jobs = 0;
        let mut failures: Vec<ChunkFailure> = Vec::new();
        let prefix = layout::run_results_prefix(&d2.sync, &d2.run_id);
        let objects = store.list(&prefix).map_err(|source| ChangeSetError::Io {
            key: prefix,
            source,
        })?;
        for o in objects
            .iter()
            .filter(|o| layout::is_batch_stats_key(&o.key))
        {
            let v: Value =
                serde_json::from_str(&read_text(store.as_ref(), &o.key)?).unwrap_or(Value::Null);
            if let Ok(r) = serde_json::from_value::<record::Requests>(v["requests"].clone()) {
                requests.add(&r);
            }
            jobs += v["jobs"].as_u64().unwrap_or(0);
        }
        for o in objects.iter().filter(|o| o.key.contains("/failed-")) {
            if let Ok(f) = serde_json::from_str::<ChunkFailure>(&read_text(store.as_ref(), &o.key)?)
            {
                failures.push(f);
            }
        }
        failures.sort_by(|a, b| a.chunk.cmp(&b.chunk));
        failures.dedup_by(|a, b| a.chunk == b.chunk);
        Ok((manifest, fold, requests, jobs, failures))
    })
    .await?;
    if error.is_none() {
        if let Some(first) = failures.first() {
            error = Some(RunErrorInfo {
                name: first.error.clone(),
                message: format!(
                    "{} of {} chunks failed after their retries (first: {}: {}); their rows without an outcome are sent again next run, creates looked up first",
                    failures.len(),
                    manifest.chunks.len(),
                    first.chunk,
                    first.cause
                ),
            });
        }
    }
    let invalid_samples = read_invalid_samples(env.store.clone(), &manifest, 10).await;
    let started = chrono::DateTime::parse_from_rfc3339(&d.started_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let seconds = (chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0;
    let rec = record::build_record(RecordParts {
        manifest: &manifest,
        fold: &fold,
        invalid_samples,
        phases: Phases {
            finalize: t.elapsed().as_secs_f64(),
            ..Phases::default()
        },
        started,
        seconds,
        requests,
        jobs,
        trigger: &d.trigger,
        error,
    });
    record::save_record(env.store.clone(), &rec).await?;
    if rec.error.is_some() {
        if let Some(m) = d.trigger_marker.clone() {
            forget_trigger(env, m).await;
        }
    }
    let (store, sync, run_id) = (env.store.clone(), d.sync.clone(), d.run_id.clone());
    blocking(move || Ok(lock::release(store.as_ref(), &sync, &run_id)?)).await?;
    Ok(Some(rec))
}

/// A run that ended before its change set existed (audience-diff failed): a failed run record
/// from the config, and the lock released.
async fn finalize_unplanned(
    env: &StepEnv,
    d: &PlanDescriptor,
    error: Option<RunErrorInfo>,
) -> Result<RunRecord, RunError> {
    let cfg = load_config(env, &d.sync).await;
    let (object, mode) = match &cfg {
        Ok(c) => (c.object, c.mode),
        Err(_) => (crate::fields::Object::Users, crate::config::Mode::Upsert),
    };
    let started = chrono::DateTime::parse_from_rfc3339(&d.started_at)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    let rec = record::failed_record(record::FailedRun {
        run_id: &d.run_id,
        sync: &d.sync,
        object,
        mode,
        trigger: &d.trigger,
        started,
        seconds: (chrono::Utc::now() - started).num_milliseconds().max(0) as f64 / 1000.0,
        phases: Phases::default(),
        rows: record::RowCounts::default(),
        requests: record::Requests::default(),
        error: error.unwrap_or(RunErrorInfo {
            name: ErrorName::Internal.as_str().into(),
            message: "the run ended before its change set was written".into(),
        }),
    });
    record::save_record(env.store.clone(), &rec).await?;
    if let Some(m) = d.trigger_marker.clone() {
        forget_trigger(env, m).await;
    }
    let (store, sync, run_id) = (env.store.clone(), d.sync.clone(), d.run_id.clone());
    blocking(move || Ok(lock::release(store.as_ref(), &sync, &run_id)?)).await?;
    Ok(rec)
}

async fn read_invalid_samples(
    store: Arc<dyn ObjectStore>,
    manifest: &Manifest,
    n: usize,
) -> Vec<InvalidSample> {
    let Some(key) = manifest.invalid_key.clone() else {
        return Vec::new();
    };
    blocking(move || {
        let text = read_text(store.as_ref(), &key)?;
        Ok(text
            .lines()
            .take(n)
            .filter_map(|l| serde_json::from_str::<InvalidSample>(l).ok())
            .collect())
    })
    .await
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra_top: &str, zendesk: &str) -> SyncConfig {
        let text = format!(
            "name = \"s\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"id\"\n{extra_top}\n\
             [source]\nlocation = \"exports/s/\"\n\n[zendesk]\nsubdomain = \"acme\"\n{zendesk}\n\n[mapping]\nname = \"n\"\nemail = \"e\"\n"
        );
        SyncConfig::parse(&text, "s.toml").unwrap()
    }

    #[test]
    fn the_map_runs_as_many_write_batches_as_the_budget_keeps_busy() {
        // 1,000-row chunks are 10 batches: 3 chunks hold the 30 job slots, one more starts;
        // but at 630 rpm (10.5 batches a second) 3.15 chunks go out while one waits out its
        // last jobs, with one sending and one starting.
        assert_eq!(map_concurrency(&cfg("", "")), 6);
        assert_eq!(map_concurrency(&cfg("", "rate_limit_rpm = 200")), 4);
        // 100-row chunks: one batch each, so the job slots need many.
        assert_eq!(map_concurrency(&cfg("chunk_rows = 100", "")), 31);
        // Big chunks: one fills the slots, one sends while another waits out its last jobs;
        // the rate adds one per 1,500 rpm.
        assert_eq!(map_concurrency(&cfg("chunk_rows = 10000", "")), 3);
        assert_eq!(
            map_concurrency(&cfg("chunk_rows = 10000", "rate_limit_rpm = 6000")),
            5
        );
        // Few slots: no more invocations than slots, one more to start.
        assert_eq!(
            map_concurrency(&cfg("chunk_rows = 200", "max_jobs_in_flight = 7")),
            8
        );
    }
}
