//! `zdsync plan`: a preview that is the next run's own plan. It reads what a run reads before
//! planning (credentials and scopes, the field definitions, and for a tickets sync without
//! state the ticket ids) and plans with the same code into a scratch copy of the bucket, so
//! its counts, and the records it lists, are the ones the next run sends. The bucket is left
//! as it was: no change set, no state, no run record.

use crate::changeset::{self, ChangeSetError, ChunkRow, Cost, Manifest};
use crate::config::SyncConfig;
use crate::errors::RunError;
use crate::fields::Object;
use crate::pipeline;
use crate::plan::PlanReport;
use crate::store::{LocalObject, LocalStore, ObjectMeta, ObjectStore, ObjectWriter};
use crate::write::{first_call, wire_item, Call};
use crate::zendesk::Client;
use serde::Serialize;
use std::io::{self, Read, Write};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct PreviewOptions {
    pub run_id: String,
    pub samples_per_reason: usize,
    /// Preview `run --full-resync`.
    pub full_resync: bool,
    /// Requests a minute of the incremental ticket export (a tickets sync without state).
    pub export_rpm: u32,
    /// The row cap the run would apply (`--max-rows`, else `max_rows_per_run`).
    pub max_rows: Option<u64>,
}

impl PreviewOptions {
    pub fn new(run_id: impl Into<String>) -> Self {
        PreviewOptions {
            run_id: run_id.into(),
            samples_per_reason: 3,
            full_resync: false,
            export_rpm: 10,
            max_rows: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    #[serde(flatten)]
    pub report: PlanReport,
    /// Set when Zendesk was not read: why these figures may differ from the run's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approximate: Option<String>,
    /// An interrupted or crashed run the next run finishes before its own work (not in these
    /// figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unfinished_run: Option<String>,
    /// A run in progress now: these figures are from the state before it finishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// What the writes cost at the sync's request budget.
    pub cost: Cost,
    /// The run's row cap; the run stops before writing when `cost.rows` is above it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// Records written to the records file, if one was asked for.
    pub records: u64,
}

impl Preview {
    pub fn over_cap(&self) -> bool {
        self.max_rows.is_some_and(|cap| self.cost.rows > cap)
    }
}

/// Preview the next run of `cfg`. With a client, Zendesk is read exactly as a run reads it
/// (and a credential, scope or schema problem fails the preview as it would fail the run);
/// without one the preview is approximate and says why. `records` receives one JSON line per
/// row the run sends: its first call and the record in that call's body.
pub async fn preview(
    store: Arc<dyn ObjectStore>,
    cfg: &SyncConfig,
    client: Option<&Client>,
    opts: &PreviewOptions,
    records: Option<Box<dyn Write + Send>>,
) -> Result<Preview, RunError> {
    let io_err = |key: &str, source: io::Error| {
        RunError::ChangeSet(ChangeSetError::Io {
            key: key.to_string(),
            source,
        })
    };
    let scratch: Arc<dyn ObjectStore> =
        Arc::new(Scratch::new(store.clone()).map_err(|e| io_err("(scratch folder)", e))?);
    // What the next run does first: finish a crashed run (its lock went stale) or an
    // interrupted one; a live lock means a run is under way.
    let (lock_store, sync) = (store.clone(), cfg.name.clone());
    let holder =
        tokio::task::spawn_blocking(move || crate::lock::holder(lock_store.as_ref(), &sync))
            .await
            .map_err(|e| RunError::Internal(format!("lock task: {e}")))?
            .map_err(|e| io_err(&crate::layout::lock_key(&cfg.name), e))?;
    let (running, crashed) = match holder {
        Some(h) if h.is_stale() => (None, Some(h.run_id)),
        Some(h) => (Some(h.run_id), None),
        None => (None, None),
    };
    let unfinished_run = match crashed {
        Some(r) => Some(r),
        None => pipeline::newest_interrupted(store.clone(), cfg.name.clone()).await?,
    };

    let (schema, approximate) = match client {
        Some(client) => {
            pipeline::check_account(client, cfg).await?;
            (pipeline::read_schema(client, cfg, None).await?, None)
        }
        None => {
            // The definitions the last run planned with, when it kept them: labels then become
            // the option values the run would send, as far as Zendesk has not changed since.
            let saved = if pipeline::needs_schema(cfg) {
                let (s, name) = (store.clone(), cfg.name.clone());
                tokio::task::spawn_blocking(move || pipeline::saved_schema(s.as_ref(), &name))
                    .await
                    .map_err(|e| RunError::Internal(format!("schema task: {e}")))?
            } else {
                None
            };
            if let Some(saved) = &saved {
                saved.schema.validate(cfg)?;
            }
            let caveats = offline_caveats(&store, cfg, saved.as_ref());
            (saved.map(|s| Arc::new(s.schema)), Some(caveats))
        }
    };

    // The run's own plan phase, into the scratch folder.
    let inputs = pipeline::PlanInputs {
        run_id: opts.run_id.clone(),
        schema,
        samples: opts.samples_per_reason,
        full_resync: opts.full_resync,
        export_rpm: opts.export_rpm,
    };
    let mut report = pipeline::plan_run(&scratch, cfg, client, &inputs).await?;
    let written = match records {
        Some(out) => {
            let (plan_store, pcfg, m) = (scratch.clone(), cfg.clone(), report.manifest.clone());
            tokio::task::spawn_blocking(move || write_records(plan_store.as_ref(), &pcfg, &m, out))
                .await
                .map_err(|e| RunError::Internal(format!("preview task: {e}")))??
        }
        None => 0,
    };
    let report_ref = &mut report;
    // The change set existed only in the scratch folder.
    report_ref.manifest_key = None;
    report_ref.manifest.invalid_key = None;
    report_ref.manifest.removed_key = None;
    if let Some(a) = &mut report_ref.manifest.audience {
        a.membership_key = None;
    }
    let cost = report_ref.manifest.cost(cfg.rate_limit_rpm());
    Ok(Preview {
        report,
        approximate,
        unfinished_run,
        running,
        cost,
        max_rows: opts.max_rows,
        records: written,
    })
}

/// Why an offline preview may differ from the run.
fn offline_caveats(
    store: &Arc<dyn ObjectStore>,
    cfg: &SyncConfig,
    saved: Option<&pipeline::SavedSchema>,
) -> String {
    let mut why = vec!["Zendesk was not read, so credentials and scopes are unchecked".to_string()];
    match saved {
        Some(s) if pipeline::needs_schema(cfg) => why.push(format!(
            "custom fields are checked against the definitions run {} read at {} (changes made in Zendesk since are not seen)",
            s.run_id, s.read_at
        )),
        None if pipeline::needs_schema(cfg) => why.push(
            "custom field keys are unchecked and option labels are counted as written (a run sends their option values, so rows may show as changed that are not)"
                .into(),
        ),
        _ => {}
    }
    let no_state = store
        .head(&crate::layout::state_key(&cfg.name))
        .map(|h| h.is_none())
        .unwrap_or(true);
    if cfg.object == Object::Tickets && !cfg.is_audience() && no_state {
        why.push(
            "the sync has no state and the ticket ids were not read back, so tickets Zendesk already has are counted as creates"
                .into(),
        );
    }
    why.join("; ")
}

/// One line a row: the call it goes out in first and its record in that call's body.
#[derive(Serialize)]
struct RecordLine<'a> {
    op: &'static str,
    call: Call,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    key: &'a str,
    src: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<serde_json::Value>,
}

fn write_records(
    store: &dyn ObjectStore,
    cfg: &SyncConfig,
    manifest: &Manifest,
    mut out: Box<dyn Write + Send>,
) -> Result<u64, RunError> {
    let werr = |source: io::Error| {
        RunError::ChangeSet(ChangeSetError::Io {
            key: "(records file)".into(),
            source,
        })
    };
    let tag = manifest.audience.as_ref().map(|a| a.tag.as_str());
    let mut n = 0;
    for chunk in &manifest.chunks {
        for row in changeset::read_jsonl::<ChunkRow>(store, &chunk.key)? {
            let call = first_call(cfg.object, cfg.mode, chunk.op);
            let endpoint = call.endpoint(cfg.object);
            let update = call == Call::Update;
            let note = match call {
                Call::Create if row.lookup => Some(
                    "looked up by external id first: an earlier create of this key has an unknown outcome",
                ),
                Call::Update if cfg.object == Object::Tickets && row.zendesk_id.is_none() => Some(
                    "fails: no Zendesk ticket id is recorded for this key (tickets are updated by id only)",
                ),
                Call::Update if row.zendesk_id.is_none() => Some("updated by external id"),
                _ => None,
            };
            let line = RecordLine {
                op: chunk.op.as_str(),
                call,
                method: endpoint.as_ref().map(|e| e.0),
                path: endpoint.map(|e| e.1),
                key: &row.key,
                src: &row.source,
                id: row.zendesk_id,
                note,
                tag: (call == Call::Tag).then_some(tag).flatten(),
                record: (call != Call::Tag)
                    .then(|| wire_item(cfg.object, update, &row, row.zendesk_id.as_ref())),
            };
            serde_json::to_writer(&mut out, &line)
                .map_err(io::Error::from)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(werr)?;
            n += 1;
        }
    }
    out.flush().map_err(werr)?;
    Ok(n)
}

/// The bucket for reading, a temporary folder for writing: what a plan writes (change set,
/// rebuilt state) is read back from the folder, and dropped with it.
struct Scratch {
    base: Arc<dyn ObjectStore>,
    own: LocalStore,
    _dir: tempfile::TempDir,
}

impl Scratch {
    fn new(base: Arc<dyn ObjectStore>) -> io::Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("zdsync-preview-")
            .tempdir()?;
        Ok(Scratch {
            base,
            own: LocalStore::new(dir.path()),
            _dir: dir,
        })
    }

    fn holds(&self, key: &str) -> io::Result<bool> {
        Ok(self.own.head(key)?.is_some())
    }
}

impl ObjectStore for Scratch {
    fn open(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
        if self.holds(key)? {
            self.own.open(key)
        } else {
            self.base.open(key)
        }
    }
    fn local_path(&self, key: &str) -> io::Result<LocalObject> {
        if self.holds(key)? {
            self.own.local_path(key)
        } else {
            self.base.local_path(key)
        }
    }
    fn list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        let mut all = self.own.list(prefix)?;
        let mine: std::collections::HashSet<String> = all.iter().map(|o| o.key.clone()).collect();
        all.extend(
            self.base
                .list(prefix)?
                .into_iter()
                .filter(|o| !mine.contains(&o.key)),
        );
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }
    fn head(&self, key: &str) -> io::Result<Option<ObjectMeta>> {
        match self.own.head(key)? {
            Some(m) => Ok(Some(m)),
            None => self.base.head(key),
        }
    }
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.own.put(key, bytes)
    }
    fn create(&self, key: &str) -> io::Result<Box<dyn ObjectWriter>> {
        self.own.create(key)
    }
    fn delete_prefix(&self, prefix: &str) -> io::Result<()> {
        self.own.delete_prefix(prefix)
    }
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> io::Result<bool> {
        if self.base.head(key)?.is_some() {
            return Ok(false);
        }
        self.own.put_if_absent(key, bytes)
    }
    fn delete(&self, key: &str) -> io::Result<()> {
        self.own.delete(key)
    }
    fn describe(&self) -> String {
        self.base.describe()
    }
    fn get_tagged(&self, key: &str) -> io::Result<Option<(Vec<u8>, String)>> {
        if self.holds(key)? {
            self.own.get_tagged(key)
        } else {
            self.base.get_tagged(key)
        }
    }
    // The scratch store never takes over the bucket's objects: a swap applies to its own copy.
    fn put_if_match(&self, key: &str, bytes: &[u8], tag: &str) -> io::Result<bool> {
        self.own.put_if_match(key, bytes, tag)
    }
    fn delete_if_match(&self, key: &str, tag: &str) -> io::Result<bool> {
        self.own.delete_if_match(key, tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_reads_through_and_keeps_writes_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let base: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        base.put("exports/a.csv", b"id\n1\n").unwrap();
        base.put("state/s/state.zst", b"old").unwrap();
        let s = Scratch::new(base.clone()).unwrap();
        s.put("state/s/state.zst", b"new").unwrap();
        s.put("runs/s/r/manifest.json", b"{}").unwrap();
        let mut text = String::new();
        s.open("state/s/state.zst")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "new");
        let keys: Vec<String> = s.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(
            keys,
            [
                "exports/a.csv",
                "runs/s/r/manifest.json",
                "state/s/state.zst"
            ]
        );
        s.delete_prefix("runs/").unwrap();
        drop(s);
        // The bucket is as it was.
        let keys: Vec<String> = base.list("").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(keys, ["exports/a.csv", "state/s/state.zst"]);
        let mut text = String::new();
        base.open("state/s/state.zst")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "old");
    }
}
