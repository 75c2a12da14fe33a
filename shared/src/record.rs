//! Run records: what each run did (`runs/<sync>/<run>/run.json`, copied under `history/`),
//! built the same way by the local runner and by the Lambdas' finalize.

use crate::changeset::{self, ChangeSetError, FailedSample, FoldSummary, Manifest};
use crate::config::Mode;
use crate::errors::RunError;
use crate::fields::Object;
use crate::layout;
use crate::plan::InvalidRow;
use crate::store::ObjectStore;
use crate::zendesk::ClientStats;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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

pub(crate) fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
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

/// A run that stopped on an error before its outcomes could be folded.
pub struct FailedRun<'a> {
    pub run_id: &'a str,
    pub sync: &'a str,
    pub object: Object,
    pub mode: Mode,
    pub trigger: &'a str,
    pub started: chrono::DateTime<chrono::Utc>,
    pub seconds: f64,
    pub phases: Phases,
    pub rows: RowCounts,
    pub requests: Requests,
    pub error: RunErrorInfo,
}

pub fn failed_record(f: FailedRun<'_>) -> RunRecord {
    RunRecord {
        run_id: f.run_id.to_string(),
        sync: f.sync.to_string(),
        object: f.object,
        mode: f.mode,
        trigger: f.trigger.to_string(),
        status: RunStatus::Failed,
        started_at: rfc3339(f.started),
        finished_at: rfc3339(chrono::Utc::now()),
        seconds: f.seconds,
        phases: f.phases,
        rows: f.rows,
        requests: f.requests,
        jobs: 0,
        error: Some(f.error),
        failed_samples: Vec::new(),
        invalid_samples: Vec::new(),
        resumed: false,
        resumed_run: None,
        mapping_change: None,
    }
}

impl From<&RunError> for RunErrorInfo {
    fn from(e: &RunError) -> Self {
        RunErrorInfo {
            name: e.error_name().as_str().to_string(),
            message: e.to_string(),
        }
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
