//! Run records: what each run did (`runs/<sync>/<run>/run.json`, copied under `history/`),
//! built the same way by the local runner and by the Lambdas' finalize.

use crate::changeset::{
    self, ChangeSetError, FailedSample, FoldSummary, Manifest, Op, ResultRow, RowStatus,
};
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
    /// Audience syncs: the tag the sync owns (unset for object syncs, and for audience runs
    /// that failed before their plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience_tag: Option<String>,
}

impl RunRecord {
    /// An audience run: its tag is known, its mode exists only for audiences, or it tagged.
    pub fn is_audience(&self) -> bool {
        self.audience_tag.is_some()
            || self.mode.audience_only()
            || self.rows.tagged + self.rows.untagged > 0
    }
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
        audience_tag: manifest.audience.as_ref().map(|a| a.tag.clone()),
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
        audience_tag: None,
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

/// Past runs of a sync, newest first (at most `limit`): by `started_at` (milliseconds), then
/// by run id. Run ids name their start second only (`20261125T101500Z-3f9a`), and runs started
/// in the same second would sort by their random suffix; so the newest `limit` by key are read
/// together with every other run of the last second they reach, then ordered by their records.
pub fn history(
    store: &dyn ObjectStore,
    sync: &str,
    limit: usize,
) -> Result<Vec<RunRecord>, ChangeSetError> {
    let prefix = layout::history_prefix(sync);
    let objects = store.list(&prefix).map_err(|source| ChangeSetError::Io {
        key: prefix.clone(),
        source,
    })?;
    let mut keys: Vec<String> = objects
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".json"))
        .collect();
    keys.sort_by(|a, b| b.cmp(a));
    let mut take = limit.min(keys.len());
    if take > 0 {
        let second = run_second(&keys[take - 1]).to_string();
        while take < keys.len() && run_second(&keys[take]) == second {
            take += 1;
        }
    }
    let mut out = Vec::new();
    for key in &keys[..take] {
        let text = changeset::read_text(store, key)?;
        match serde_json::from_str(&text) {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(key = %key, "skipping an unreadable run record: {e}"),
        }
    }
    out.sort_by(newest_first);
    out.truncate(limit);
    Ok(out)
}

/// The start second of a history key's run id (`20261125T101500Z` of
/// `history/s/20261125T101500Z-3f9a.json`).
fn run_second(key: &str) -> &str {
    let name = key.rsplit('/').next().unwrap_or(key);
    let stem = name.strip_suffix(".json").unwrap_or(name);
    stem.rsplit_once('-').map_or(stem, |(second, _)| second)
}

/// Newest first: the later `started_at`, then the greater run id. A start time that does not
/// parse sorts after every one that does.
pub fn newest_first(a: &RunRecord, b: &RunRecord) -> std::cmp::Ordering {
    let at = |r: &RunRecord| chrono::DateTime::parse_from_rfc3339(&r.started_at).ok();
    at(b).cmp(&at(a)).then_with(|| b.run_id.cmp(&a.run_id))
}

/// A run's record: `runs/<sync>/<run>/run.json`, else its copy under `history/`; `None` when
/// neither exists.
pub fn read_record(
    store: &dyn ObjectStore,
    sync: &str,
    run: &str,
) -> Result<Option<RunRecord>, ChangeSetError> {
    for key in [
        layout::run_record_key(sync, run),
        layout::history_key(sync, run),
    ] {
        let found = store.head(&key).map_err(|source| ChangeSetError::Io {
            key: key.clone(),
            source,
        })?;
        if found.is_none() {
            continue;
        }
        let text = changeset::read_text(store, &key)?;
        return serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ChangeSetError::Bad {
                key,
                line: e.line(),
                reason: e.to_string(),
            });
    }
    Ok(None)
}

/// What went wrong with one row of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProblemKind {
    /// Sent to Zendesk and not confirmed (refused, outcome unknown, or never answered); sent
    /// again next run.
    Failed,
    /// Refused before sending (`invalid.jsonl`); sent once the warehouse row is fixed.
    Invalid,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Failed => "failed",
            ProblemKind::Invalid => "invalid",
        }
    }
}

/// One row of a run that did not reach Zendesk: a failed write or a refused row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemRow {
    pub kind: ProblemKind,
    /// The row's primary key (absent for a refused row without one).
    pub key: Option<String>,
    /// The export file the row came from (`state` for a row planned from the state alone).
    pub file: Option<String>,
    /// Its line (CSV, JSONL) or row (Parquet) in that file.
    pub line: Option<u64>,
    /// Failed rows: the operation (`create`, `update`, `add`, `remove`).
    pub op: Option<String>,
    /// Invalid rows: the mapped field or column at fault, when one is.
    pub field: Option<String>,
    /// Invalid rows: the validation reason (`invalid_email`, ...). Failed rows:
    /// `write_failed` (Zendesk's error says why), `outcome_unknown` (a create that may have happened; looked up before
    /// it is sent again) or `no_outcome` (the write did not finish).
    pub reason: String,
    pub message: String,
    /// Failed rows: Zendesk's error for the item (`error: details`).
    pub zendesk_error: Option<String>,
}

/// The CSV columns of [`ProblemRow`], in order.
pub const PROBLEM_COLUMNS: [&str; 9] = [
    "kind",
    "key",
    "file",
    "line",
    "op",
    "field",
    "reason",
    "message",
    "zendesk_error",
];

impl ProblemRow {
    /// The row's cells in [`PROBLEM_COLUMNS`] order (absent values empty).
    pub fn cells(&self) -> [String; 9] {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        [
            self.kind.as_str().to_string(),
            opt(&self.key),
            opt(&self.file),
            self.line.map(|l| l.to_string()).unwrap_or_default(),
            opt(&self.op),
            opt(&self.field),
            self.reason.clone(),
            self.message.clone(),
            opt(&self.zendesk_error),
        ]
    }
}

/// A chunk row's identity and source, without its payload.
#[derive(Deserialize)]
struct RowSource {
    i: u32,
    pk: String,
    src: String,
}

/// `file:line` of a chunk row, split; `state` (a row planned from the state) has no line.
fn split_source(src: &str) -> (String, Option<u64>) {
    match src.rsplit_once(':') {
        Some((file, line)) if !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()) => {
            (file.to_string(), line.parse().ok())
        }
        _ => (src.to_string(), None),
    }
}

fn failed_row(
    op: Op,
    key: String,
    source: Option<&str>,
    outcome: Option<&ResultRow>,
) -> ProblemRow {
    let (file, line) = match source {
        Some(src) => {
            let (f, l) = split_source(src);
            (Some(f), l)
        }
        None => (None, None),
    };
    let op_name = op.as_str();
    let (reason, message) = match outcome {
        Some(r) if r.unknown => (
            "outcome_unknown",
            format!(
                "the {op_name} may have happened in Zendesk; the key is looked up before it \
                 is sent again next run"
            ),
        ),
        Some(_) => (
            "write_failed",
            format!("the {op_name} failed in Zendesk; the row is sent again next run"),
        ),
        None => (
            "no_outcome",
            "no outcome was recorded (the write did not finish); the row is sent again next run"
                .to_string(),
        ),
    };
    ProblemRow {
        kind: ProblemKind::Failed,
        key: Some(key),
        file,
        line,
        op: Some(op_name.to_string()),
        field: None,
        reason: reason.to_string(),
        message,
        zendesk_error: outcome.and_then(|r| r.error.clone()),
    }
}

fn io_error(key: &str) -> impl FnOnce(std::io::Error) -> ChangeSetError + '_ {
    move |source| ChangeSetError::Io {
        key: key.to_string(),
        source,
    }
}

/// Every row of a run that did not reach Zendesk, handed to `each` one at a time: first the
/// rows that failed there (chunk by chunk, in row order, from the run's outcome files joined
/// with its change set for their source line), then the rows refused before sending
/// (`invalid.jsonl`, in export order). `unsent` also lists rows with no recorded outcome, as a
/// finished run counts them (leave it off for a run that is under way or interrupted: its
/// unsent rows are still to be written). A run with no change set (it stopped before its
/// plan) has only its refused rows, if any. Returns how many rows of each kind were handed out.
pub fn problem_rows(
    store: &dyn ObjectStore,
    sync: &str,
    run: &str,
    unsent: bool,
    each: &mut dyn FnMut(ProblemRow) -> std::io::Result<()>,
) -> Result<(u64, u64), ChangeSetError> {
    let (mut failed, mut invalid) = (0u64, 0u64);
    let manifest_key = layout::manifest_key(sync, run);
    let manifest = match store.head(&manifest_key).map_err(io_error(&manifest_key))? {
        Some(_) => Some(changeset::read_manifest(store, &manifest_key)?),
        None => None,
    };
    for chunk in manifest.iter().flat_map(|m| &m.chunks) {
        let name = layout::chunk_name(&chunk.key);
        let mut outcomes = changeset::read_results(store, sync, run, name)?;
        let rows = match store.head(&chunk.key).map_err(io_error(&chunk.key))? {
            Some(_) => changeset::read_jsonl::<RowSource>(store, &chunk.key)?,
            None => Vec::new(),
        };
        for row in rows {
            let outcome = outcomes.remove(&row.i);
            match &outcome {
                Some(r) if r.status == RowStatus::Confirmed => continue,
                None if !unsent => continue,
                _ => {}
            }
            failed += 1;
            each(failed_row(
                chunk.op,
                row.pk,
                Some(&row.src),
                outcome.as_ref(),
            ))
            .map_err(io_error(&chunk.key))?;
        }
        // Outcomes of rows the change set no longer has (its chunk is gone): without a source.
        let mut rest: Vec<ResultRow> = outcomes
            .into_values()
            .filter(|r| r.status == RowStatus::Failed)
            .collect();
        rest.sort_by_key(|r| r.index);
        for r in rest {
            failed += 1;
            each(failed_row(chunk.op, r.key.clone(), None, Some(&r)))
                .map_err(io_error(&chunk.key))?;
        }
    }
    let key = manifest
        .as_ref()
        .and_then(|m| m.invalid_key.clone())
        .unwrap_or_else(|| layout::invalid_key(sync, run));
    if store.head(&key).map_err(io_error(&key))?.is_some() {
        let input = std::io::BufReader::new(store.open(&key).map_err(io_error(&key))?);
        for (n, line) in std::io::BufRead::lines(input).enumerate() {
            let line = line.map_err(io_error(&key))?;
            if line.trim().is_empty() {
                continue;
            }
            let x: InvalidSample =
                serde_json::from_str(&line).map_err(|e| ChangeSetError::Bad {
                    key: key.clone(),
                    line: n + 1,
                    reason: e.to_string(),
                })?;
            invalid += 1;
            each(ProblemRow {
                kind: ProblemKind::Invalid,
                key: x.pk,
                file: Some(x.file),
                line: (x.line > 0).then_some(x.line),
                op: None,
                field: x.field,
                reason: x.reason,
                message: x.message,
                zendesk_error: None,
            })
            .map_err(io_error(&key))?;
        }
    }
    Ok((failed, invalid))
}

/// CSV of problem rows (RFC 4180 quoting: a field with a comma, a quote or a line break is
/// quoted, its quotes doubled; records end in `\n`), under a header line of
/// [`PROBLEM_COLUMNS`].
pub struct ProblemCsv<W: std::io::Write> {
    out: W,
    csv: csv_core::Writer,
    buf: Vec<u8>,
}

impl<W: std::io::Write> ProblemCsv<W> {
    /// Start the file with its header line.
    pub fn new(out: W) -> std::io::Result<Self> {
        let mut w = ProblemCsv {
            out,
            csv: csv_core::Writer::new(),
            buf: Vec::new(),
        };
        w.record(&PROBLEM_COLUMNS.map(String::from))?;
        Ok(w)
    }

    pub fn write(&mut self, row: &ProblemRow) -> std::io::Result<()> {
        self.record(&row.cells())
    }

    fn record(&mut self, cells: &[String]) -> std::io::Result<()> {
        for (i, cell) in cells.iter().enumerate() {
            let bytes = cell.as_bytes();
            // Quoted, every byte doubled at worst, plus the quotes and the separator.
            self.buf.resize(2 * bytes.len() + 4, 0);
            let (res, read, mut n) = self.csv.field(bytes, &mut self.buf);
            debug_assert!(res == csv_core::WriteResult::InputEmpty && read == bytes.len());
            let (_, m) = if i + 1 < cells.len() {
                self.csv.delimiter(&mut self.buf[n..])
            } else {
                self.csv.terminator(&mut self.buf[n..])
            };
            n += m;
            self.out.write_all(&self.buf[..n])?;
        }
        Ok(())
    }

    /// Flush and hand back the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}
