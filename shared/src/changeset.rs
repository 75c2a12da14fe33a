//! The change set a plan writes and the per-row outcomes that come back for it: the manifest,
//! chunk rows, result rows, and the fold of outcomes into the next state.

use crate::config::Mode;
use crate::fields::Object;
use crate::layout;
use crate::state::{
    StateError, StateHeader, StateReader, StateWriter, FLAG_ABSENT, FLAG_FAILED, FLAG_UNKNOWN,
};
use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

pub const MANIFEST_VERSION: u32 = 1;

/// What a chunk asks of Zendesk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    Update,
    /// Audience: add the sync's tag to the record.
    Add,
    /// Audience: remove the sync's tag from the record.
    Remove,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Add => "add",
            Op::Remove => "remove",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Records read from the export (malformed ones included).
    pub rows_read: u64,
    pub invalid: u64,
    pub create: u64,
    pub update: u64,
    pub unchanged: u64,
    /// Existing keys an insert-mode sync leaves alone although they changed.
    pub skipped: u64,
    /// Keys in the last state that this export no longer has.
    pub removed: u64,
    /// Rows resent because their write failed last run (included in create/update).
    pub retried: u64,
    /// Audience: records to tag / untag (their operations failed last run included).
    #[serde(default)]
    pub tag_add: u64,
    #[serde(default)]
    pub tag_remove: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub key: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub key: String,
    pub op: Op,
    pub rows: u64,
}

/// `runs/<sync>/<run>/manifest.json`: everything later steps need, and nothing row-sized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub run_id: String,
    pub sync: String,
    pub object: Object,
    pub mode: Mode,
    pub created_at: String,
    pub mapping_hash: String,
    pub location: String,
    pub parts: Vec<PartInfo>,
    pub counts: Counts,
    pub chunks: Vec<ChunkInfo>,
    pub invalid_key: Option<String>,
    pub removed_key: Option<String>,
    /// The state the diff was computed against (its producing run), if any.
    pub base_state_run: Option<String>,
    /// Set for audience syncs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<AudienceInfo>,
    /// The mapping differs from the one the state's fingerprints were computed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping_change: Option<MappingChange>,
}

/// A mapping changed since the last confirmed run: every row already in Zendesk is sent again,
/// changed or not (its fingerprint covers the mapping).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingChange {
    /// The run whose state was computed with the previous mapping.
    pub since_run: Option<String>,
    /// Rows of this plan sent again although Zendesk has them (new keys not included).
    pub resend: u64,
}

/// What a change set costs at a request budget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    pub rows: u64,
    /// Bulk calls: one per 100 rows of a chunk; tags two per 100 (read, then write), or one a
    /// record when written per record.
    pub calls: u64,
    /// The budget the estimate uses, in requests a minute.
    pub rpm: u32,
    /// `calls / rpm`: the least time the writes take at that budget (job polls come on top).
    pub minutes: f64,
}

impl Manifest {
    /// Rows this change set sends.
    pub fn rows_to_write(&self) -> u64 {
        self.chunks.iter().map(|c| c.rows).sum()
    }

    /// Bulk calls and minutes this change set needs at `rpm` requests a minute.
    pub fn cost(&self, rpm: u32) -> Cost {
        let per_record = self
            .audience
            .as_ref()
            .is_some_and(|a| a.tag_writes == crate::config::TagWrites::PerRecord);
        let calls = self
            .chunks
            .iter()
            .map(|c| match c.op {
                Op::Add | Op::Remove if per_record => c.rows,
                // The records' tags are read, then written in one job.
                Op::Add | Op::Remove => c.rows.div_ceil(100) * 2,
                Op::Create | Op::Update => c.rows.div_ceil(100),
            })
            .sum::<u64>();
        Cost {
            rows: self.rows_to_write(),
            calls,
            rpm,
            minutes: calls as f64 / f64::from(rpm.max(1)),
        }
    }
}

/// What write-batch and finalize need to know of an audience sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudienceInfo {
    pub tag: String,
    pub tag_writes: crate::config::TagWrites,
    /// Membership changes that need no write (keys recorded as members, or as gone), folded
    /// into the state by finalize: `{"h","pk","id","member"}` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_key: Option<String>,
}

/// One row of a chunk, as write-batch reads it (the payload is kept as parsed JSON).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChunkRow {
    /// Key hash, hex.
    #[serde(rename = "h")]
    pub key_hash: String,
    /// Position in the chunk; results refer to rows by it.
    #[serde(rename = "i")]
    pub index: u32,
    /// The primary key (sent as external_id).
    #[serde(rename = "pk")]
    pub key: String,
    /// Payload fingerprint, hex.
    #[serde(rename = "fp")]
    pub fingerprint: String,
    /// A create of this key may have happened without zdsync learning of it: look the key up
    /// before creating it.
    #[serde(default)]
    pub lookup: bool,
    /// Zendesk id from the state, for updates.
    #[serde(default, rename = "id")]
    pub zendesk_id: Option<u64>,
    /// `file:line` of the source row (`state` for rows planned from the state).
    #[serde(rename = "src")]
    pub source: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Audience (users): the member's email, to find a user with no matching external_id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Outcome of one chunk row, as write-batch records it in `results/<chunk>.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRow {
    /// The chunk row's position.
    #[serde(rename = "i")]
    pub index: u32,
    #[serde(rename = "pk")]
    pub key: String,
    pub status: RowStatus,
    #[serde(default, rename = "id", skip_serializing_if = "Option::is_none")]
    pub zendesk_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A failed create whose outcome is unknown (the record may exist in Zendesk).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// What Zendesk did with a confirmed row: `created` or `updated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Updated,
    /// Insert mode: the record was already in Zendesk (found by external id after a create
    /// refused as a duplicate); left as it is.
    Existing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowStatus {
    Confirmed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedRow {
    pub h: String,
    pub pk: String,
    #[serde(default)]
    pub id: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeSetError {
    #[error("{key}: {source}")]
    Io { key: String, source: io::Error },
    #[error("{key} line {line}: {reason}")]
    Bad {
        key: String,
        line: usize,
        reason: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// One row as a plan writes it into a chunk; write-batch reads it back as [`ChunkRow`].
pub struct NewRow<'a> {
    pub key_hash: u64,
    pub key: &'a str,
    pub fingerprint: u64,
    pub lookup: bool,
    /// 0 when zdsync knows no Zendesk id for the key.
    pub zendesk_id: u64,
    /// The source file as a JSON string (quotes included), escaped once per file.
    pub file_json: &'a [u8],
    /// The line (or Parquet row) in it; `None` for rows that come from the state.
    pub line: Option<u64>,
    pub email: Option<&'a str>,
    /// The record for Zendesk, already JSON.
    pub payload: Option<&'a [u8]>,
}

/// Append `row` as one JSON line at position `index` of its chunk. Hand-encoded (this runs once
/// per changed row of a 10 M-row export) with exactly [`ChunkRow`]'s serde names; a round-trip
/// test holds the two together. The line starts with the key hash (see [`row_key_hash`]).
pub fn encode_row(buf: &mut Vec<u8>, index: u64, row: &NewRow<'_>) {
    use std::io::Write;
    let _ = write!(
        buf,
        "{{\"h\":\"{:016x}\",\"i\":{index},\"pk\":",
        row.key_hash
    );
    serde_json::to_writer(&mut *buf, row.key).expect("vec write");
    let _ = write!(buf, ",\"fp\":\"{:016x}\"", row.fingerprint);
    if row.lookup {
        buf.extend_from_slice(b",\"lookup\":true");
    }
    if row.zendesk_id != 0 {
        let _ = write!(buf, ",\"id\":{}", row.zendesk_id);
    }
    buf.extend_from_slice(b",\"src\":");
    match row.line {
        Some(line) => {
            buf.extend_from_slice(&row.file_json[..row.file_json.len() - 1]);
            let _ = write!(buf, ":{line}\"");
        }
        None => buf.extend_from_slice(row.file_json),
    }
    if let Some(email) = row.email {
        buf.extend_from_slice(b",\"email\":");
        serde_json::to_writer(&mut *buf, email).expect("vec write");
    }
    if let Some(payload) = row.payload {
        buf.extend_from_slice(b",\"payload\":");
        buf.extend_from_slice(payload);
    }
    buf.extend_from_slice(b"}\n");
}

/// The key hash of an encoded chunk line, read from its fixed prefix `{"h":"<16 hex digits>"`.
pub fn row_key_hash(line: &[u8]) -> Option<u64> {
    line.get(6..22)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(parse_hex)
}

/// A chunk ready to store: its key and its JSON lines.
pub type FullChunk = (String, Vec<u8>);

/// The chunks of one plan, per operation: rows go to the open chunk of their op until it holds
/// `chunk_rows`, then it is handed back to be stored and the next one opens. Object plans
/// (create/update) and audience plans (add/remove) share it.
pub struct ChunkWriter {
    sync: String,
    run_id: String,
    chunk_rows: usize,
    open: [Option<OpenChunk>; 2],
    next_index: [usize; 2],
    chunks: Vec<ChunkInfo>,
}

struct OpenChunk {
    slot: usize,
    rows: u64,
    buf: Vec<u8>,
}

impl ChunkWriter {
    pub fn new(sync: &str, run_id: &str, chunk_rows: usize) -> ChunkWriter {
        ChunkWriter {
            sync: sync.to_string(),
            run_id: run_id.to_string(),
            chunk_rows: chunk_rows.max(1),
            open: [None, None],
            next_index: [0, 0],
            chunks: Vec::new(),
        }
    }

    fn lane(op: Op) -> usize {
        match op {
            Op::Create | Op::Add => 0,
            Op::Update | Op::Remove => 1,
        }
    }

    /// The chunk (its index in [`Self::chunks`]) that `op`'s next row goes to.
    pub fn slot(&mut self, op: Op) -> usize {
        let k = Self::lane(op);
        if self.open[k].is_none() {
            let key = layout::chunk_key(&self.sync, &self.run_id, op.as_str(), self.next_index[k]);
            self.next_index[k] += 1;
            self.chunks.push(ChunkInfo { key, op, rows: 0 });
            self.open[k] = Some(OpenChunk {
                slot: self.chunks.len() - 1,
                rows: 0,
                buf: Vec::with_capacity(self.chunk_rows * 160),
            });
        }
        self.open[k].as_ref().map(|c| c.slot).expect("opened above")
    }

    /// Add a row; a chunk that is full now comes back to be stored.
    pub fn push(&mut self, op: Op, row: &NewRow<'_>) -> Option<FullChunk> {
        self.slot(op);
        let chunk = self.open[Self::lane(op)].as_mut().expect("slot opened it");
        encode_row(&mut chunk.buf, chunk.rows, row);
        chunk.rows += 1;
        if chunk.rows as usize >= self.chunk_rows {
            return self.close_lane(Self::lane(op));
        }
        None
    }

    fn close_lane(&mut self, k: usize) -> Option<FullChunk> {
        let chunk = self.open[k].take()?;
        let info = &mut self.chunks[chunk.slot];
        info.rows = chunk.rows;
        Some((info.key.clone(), chunk.buf))
    }

    /// Close the open chunks; they come back to be stored.
    pub fn close(&mut self) -> Vec<FullChunk> {
        (0..2).filter_map(|k| self.close_lane(k)).collect()
    }

    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    pub fn chunks_mut(&mut self) -> &mut Vec<ChunkInfo> {
        &mut self.chunks
    }
}

/// Compresses and stores chunks (one zstd context for all of a plan's chunks).
pub struct ChunkPacker {
    z: zstd::bulk::Compressor<'static>,
}

impl ChunkPacker {
    pub fn new() -> io::Result<ChunkPacker> {
        Ok(ChunkPacker {
            z: zstd::bulk::Compressor::new(1)?,
        })
    }

    pub fn store(&mut self, store: &dyn ObjectStore, key: &str, body: &[u8]) -> io::Result<()> {
        let packed = self.z.compress(body)?;
        store.put(key, &packed)
    }
}

/// A stored chunk's JSON lines.
pub fn read_chunk_lines(store: &dyn ObjectStore, key: &str) -> io::Result<Vec<u8>> {
    let mut packed = Vec::new();
    store.open(key)?.read_to_end(&mut packed)?;
    zstd::decode_all(&packed[..])
}

pub fn hex(v: u64) -> String {
    format!("{v:016x}")
}

pub fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

fn open_lines(
    store: &dyn ObjectStore,
    key: &str,
    zstd: bool,
) -> Result<Box<dyn BufRead>, ChangeSetError> {
    let raw = store.open(key).map_err(|source| ChangeSetError::Io {
        key: key.to_string(),
        source,
    })?;
    let r: Box<dyn Read> = if zstd {
        Box::new(
            zstd::stream::read::Decoder::new(raw).map_err(|source| ChangeSetError::Io {
                key: key.to_string(),
                source,
            })?,
        )
    } else {
        Box::new(raw)
    };
    Ok(Box::new(BufReader::with_capacity(1 << 17, r)))
}

/// Read every JSON line of an object (`.zst` objects are decompressed).
pub fn read_jsonl<T: for<'de> Deserialize<'de>>(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Vec<T>, ChangeSetError> {
    let input = open_lines(store, key, key.ends_with(".zst"))?;
    let mut out = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|source| ChangeSetError::Io {
            key: key.to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| ChangeSetError::Bad {
                key: key.to_string(),
                line: n + 1,
                reason: e.to_string(),
            })?,
        );
    }
    Ok(out)
}

/// A whole (small) object as text: manifests, journals, locks, run records.
pub fn read_text(store: &dyn ObjectStore, key: &str) -> Result<String, ChangeSetError> {
    let mut text = String::new();
    store
        .open(key)
        .and_then(|mut r| r.read_to_string(&mut text))
        .map_err(|source| ChangeSetError::Io {
            key: key.to_string(),
            source,
        })?;
    Ok(text)
}

/// Store a manifest at its run's key (the key is returned).
pub fn write_manifest(store: &dyn ObjectStore, manifest: &Manifest) -> io::Result<String> {
    let key = layout::manifest_key(&manifest.sync, &manifest.run_id);
    let body = serde_json::to_vec_pretty(manifest).expect("manifest serialises");
    store.put(&key, &body)?;
    Ok(key)
}

pub fn read_manifest(store: &dyn ObjectStore, key: &str) -> Result<Manifest, ChangeSetError> {
    let text = read_text(store, key)?;
    serde_json::from_str(&text).map_err(|e| ChangeSetError::Bad {
        key: key.to_string(),
        line: e.line(),
        reason: e.to_string(),
    })
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FoldSummary {
    pub confirmed: u64,
    /// Confirmed rows Zendesk created / updated (its own word where the job said, else the
    /// chunk's op).
    pub created: u64,
    pub updated: u64,
    /// Insert mode: keys found already in Zendesk (left alone, counted as skipped).
    pub existing: u64,
    pub failed: u64,
    /// Rows of chunks with no recorded outcome (never sent, or the writer died): resent next run.
    pub unknown: u64,
    pub removed: u64,
    /// Audience: records whose tag was confirmed added / removed.
    pub tagged: u64,
    pub untagged: u64,
    pub state_entries: u64,
    /// The first failed rows, with Zendesk's reasons.
    pub failed_samples: Vec<FailedSample>,
}

/// A row Zendesk refused (or that has no outcome), for run records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedSample {
    pub pk: String,
    pub op: Op,
    pub reason: String,
}

/// Failed rows kept as samples in a fold summary.
pub const FAILED_SAMPLES: usize = 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Confirmed,
    Failed,
    /// Failed, and a create may have happened in Zendesk all the same.
    Unknown,
    Removed,
}

struct Change {
    h: u64,
    fp: u64,
    id: u64,
    kind: Kind,
    key_start: u32,
    key_len: u32,
}

/// Every recorded outcome of one chunk (all its batch result files), by row position. A row
/// recorded twice (a batch redone after a crash) keeps its last outcome.
pub fn read_results(
    store: &dyn ObjectStore,
    sync: &str,
    run: &str,
    chunk_name: &str,
) -> Result<HashMap<u32, ResultRow>, ChangeSetError> {
    let prefix = layout::results_prefix(sync, run, chunk_name);
    let objects = store.list(&prefix).map_err(|source| ChangeSetError::Io {
        key: prefix.clone(),
        source,
    })?;
    let mut outcomes = HashMap::new();
    for o in objects.iter().filter(|o| o.key.ends_with(".jsonl")) {
        for r in read_jsonl::<ResultRow>(store, &o.key)? {
            outcomes.insert(r.index, r);
        }
    }
    Ok(outcomes)
}

/// Fold a run's outcomes into the sync's next state: confirmed rows advance to their new
/// fingerprint and Zendesk id; failed rows (and rows with no outcome) keep their previous
/// state and are flagged to go again; removed keys are flagged absent.
/// The sync's state as it is (if any) and a writer of its next version, for a fold that merges
/// `changes` changed keys into it.
pub(crate) fn rewrite_state(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    changes: usize,
) -> Result<(Option<StateReader>, StateWriter), ChangeSetError> {
    let state_key = layout::state_key(&manifest.sync);
    let old = StateReader::open(store, &state_key)?;
    let header = StateHeader {
        version: 1,
        sync: manifest.sync.clone(),
        object: manifest.object.as_str().to_string(),
        mapping_hash: manifest.mapping_hash.clone(),
        count_hint: old.as_ref().map_or(0, |o| o.header.count_hint) + changes as u64,
        written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        run_id: Some(manifest.run_id.clone()),
    };
    let out = StateWriter::create(store, &state_key, &header)?;
    Ok((old, out))
}

pub fn fold(store: &dyn ObjectStore, manifest: &Manifest) -> Result<FoldSummary, ChangeSetError> {
    let mut summary = FoldSummary::default();
    let mut changes: Vec<Change> = Vec::new();
    let mut keys: Vec<u8> = Vec::new();
    let mut push = |changes: &mut Vec<Change>, h: u64, fp: u64, id: u64, kind: Kind, key: &str| {
        changes.push(Change {
            h,
            fp,
            id,
            kind,
            key_start: keys.len() as u32,
            key_len: key.len() as u32,
        });
        keys.extend_from_slice(key.as_bytes());
    };
    let bad = |key: &str, reason: String| ChangeSetError::Bad {
        key: key.to_string(),
        line: 0,
        reason,
    };

    for chunk in &manifest.chunks {
        let name = layout::chunk_name(&chunk.key);
        let outcomes = read_results(store, &manifest.sync, &manifest.run_id, name)?;
        for row in read_jsonl::<ChunkRowHead>(store, &chunk.key)? {
            let h = parse_hex(&row.h)
                .ok_or_else(|| bad(&chunk.key, format!("bad key hash {:?}", row.h)))?;
            let fp = parse_hex(&row.fp)
                .ok_or_else(|| bad(&chunk.key, format!("bad fingerprint {:?}", row.fp)))?;
            match outcomes.get(&row.i) {
                Some(r) if r.status == RowStatus::Confirmed => {
                    summary.confirmed += 1;
                    match (r.action, chunk.op) {
                        (Some(Action::Updated), _) | (None, Op::Update) => summary.updated += 1,
                        (Some(Action::Existing), _) => summary.existing += 1,
                        _ => summary.created += 1,
                    }
                    let id = r.zendesk_id.or(row.id).unwrap_or(0);
                    push(&mut changes, h, fp, id, Kind::Confirmed, &row.pk);
                }
                Some(r) => {
                    summary.failed += 1;
                    if summary.failed_samples.len() < FAILED_SAMPLES {
                        summary.failed_samples.push(FailedSample {
                            pk: row.pk.clone(),
                            op: chunk.op,
                            reason: r.error.clone().unwrap_or_default(),
                        });
                    }
                    let kind = if r.unknown && chunk.op == Op::Create {
                        Kind::Unknown
                    } else {
                        Kind::Failed
                    };
                    push(&mut changes, h, 0, row.id.unwrap_or(0), kind, &row.pk);
                }
                None => {
                    summary.unknown += 1;
                    if summary.failed_samples.len() < FAILED_SAMPLES {
                        summary.failed_samples.push(FailedSample {
                            pk: row.pk.clone(),
                            op: chunk.op,
                            reason: "no outcome was recorded (the write did not finish); the row is sent again next run".into(),
                        });
                    }
                    // A create without an outcome may have reached Zendesk: look it up first.
                    let kind = if chunk.op == Op::Create {
                        Kind::Unknown
                    } else {
                        Kind::Failed
                    };
                    push(&mut changes, h, 0, row.id.unwrap_or(0), kind, &row.pk);
                }
            }
        }
    }
    if let Some(key) = &manifest.removed_key {
        for r in read_jsonl::<RemovedRow>(store, key)? {
            let h = parse_hex(&r.h).ok_or_else(|| bad(key, format!("bad key hash {:?}", r.h)))?;
            summary.removed += 1;
            push(&mut changes, h, 0, r.id.unwrap_or(0), Kind::Removed, &r.pk);
        }
    }
    changes.sort_unstable_by_key(|c| c.h);
    let key_of = |c: &Change| -> &str {
        std::str::from_utf8(&keys[c.key_start as usize..(c.key_start + c.key_len) as usize])
            .unwrap_or_default()
    };

    let (mut old, mut out) = rewrite_state(store, manifest, changes.len())?;
    let mut next_old = match old.as_mut() {
        Some(r) => r.next_entry()?,
        None => None,
    };
    let mut ci = 0;
    loop {
        let c = changes.get(ci);
        match (next_old.as_ref(), c) {
            (None, None) => break,
            (Some(o), c) if c.is_none_or(|c| o.key_hash < c.h) => {
                out.push(o.key_hash, o.fingerprint, o.zendesk_id, o.flags, &o.key)?;
                next_old = old.as_mut().map_or(Ok(None), |r| r.next_entry())?;
            }
            (o, Some(c)) => {
                let same = o.filter(|o| o.key_hash == c.h);
                match (c.kind, same) {
                    (Kind::Confirmed, _) => out.push(c.h, c.fp, c.id, 0, key_of(c))?,
                    (Kind::Failed | Kind::Unknown, Some(o)) => {
                        let id = if o.zendesk_id != 0 {
                            o.zendesk_id
                        } else {
                            c.id
                        };
                        let flag = if c.kind == Kind::Unknown && id == 0 {
                            FLAG_FAILED | FLAG_UNKNOWN
                        } else {
                            FLAG_FAILED
                        };
                        out.push(o.key_hash, o.fingerprint, id, o.flags | flag, &o.key)?
                    }
                    (Kind::Failed, None) => out.push(c.h, 0, c.id, FLAG_FAILED, key_of(c))?,
                    (Kind::Unknown, None) => {
                        out.push(c.h, 0, c.id, FLAG_FAILED | FLAG_UNKNOWN, key_of(c))?
                    }
                    (Kind::Removed, Some(o)) => out.push(
                        o.key_hash,
                        o.fingerprint,
                        o.zendesk_id,
                        o.flags | FLAG_ABSENT,
                        &o.key,
                    )?,
                    (Kind::Removed, None) => {}
                }
                if same.is_some() {
                    next_old = old.as_mut().map_or(Ok(None), |r| r.next_entry())?;
                }
                ci += 1;
            }
            (Some(_), None) => unreachable!("handled by the first arm"),
        }
    }
    summary.state_entries = out.finish()?;
    Ok(summary)
}

/// A chunk row without its payload (the fold needs only the identity).
#[derive(Deserialize)]
struct ChunkRowHead {
    h: String,
    i: u32,
    pk: String,
    fp: String,
    #[serde(default)]
    id: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_rows_read_back_as_chunk_rows() {
        let payload = br#"{"name":"Zo\u00eb \"Z\"","user_fields":{"plan":"plan_pro"}}"#;
        let rows = [
            NewRow {
                key_hash: 0x00ab_cdef_0123_4567,
                key: "u-1 \"quoted\" \\ ünï",
                fingerprint: u64::MAX,
                lookup: true,
                zendesk_id: 0,
                file_json: br#""exports/a \"b\".csv""#,
                line: Some(42),
                email: None,
                payload: Some(payload),
            },
            NewRow {
                key_hash: 7,
                key: "m1",
                fingerprint: 1,
                lookup: false,
                zendesk_id: 9_007_199_254_740_993,
                file_json: br#""state""#,
                line: None,
                email: Some("a+b@example.com"),
                payload: None,
            },
        ];
        let mut buf = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            encode_row(&mut buf, i as u64, r);
        }
        let lines: Vec<&[u8]> = buf.split_inclusive(|b| *b == b'\n').collect();
        assert_eq!(lines.len(), 2);
        let a: ChunkRow = serde_json::from_slice(lines[0]).unwrap();
        assert_eq!(row_key_hash(lines[0]), Some(0x00ab_cdef_0123_4567));
        assert_eq!(a.key_hash, "00abcdef01234567");
        assert_eq!((a.index, a.key.as_str()), (0, "u-1 \"quoted\" \\ ünï"));
        assert_eq!(a.fingerprint, "ffffffffffffffff");
        assert!(a.lookup);
        assert_eq!(a.zendesk_id, None);
        assert_eq!(a.source, "exports/a \"b\".csv:42");
        assert_eq!(a.payload["name"], "Zoë \"Z\"");
        assert_eq!(a.email, None);
        let b: ChunkRow = serde_json::from_slice(lines[1]).unwrap();
        assert_eq!(row_key_hash(lines[1]), Some(7));
        assert_eq!(
            (b.index, b.zendesk_id, b.source.as_str()),
            (1, Some(9_007_199_254_740_993), "state")
        );
        assert_eq!(b.email.as_deref(), Some("a+b@example.com"));
        assert!(!b.lookup && b.payload.is_null());
    }

    #[test]
    fn the_chunk_writer_fills_chunks_per_operation() {
        let mut w = ChunkWriter::new("s", "r", 2);
        let row = |h| NewRow {
            key_hash: h,
            key: "k",
            fingerprint: 0,
            lookup: false,
            zendesk_id: 0,
            file_json: br#""f""#,
            line: Some(h),
            email: None,
            payload: None,
        };
        assert!(w.push(Op::Create, &row(1)).is_none());
        assert!(w.push(Op::Update, &row(2)).is_none());
        let (key, body) = w.push(Op::Create, &row(3)).expect("two rows fill a chunk");
        assert_eq!(key, layout::chunk_key("s", "r", "create", 0));
        assert_eq!(body.iter().filter(|b| **b == b'\n').count(), 2);
        let rest = w.close();
        assert_eq!(rest.len(), 1);
        let rows: Vec<(Op, u64)> = w.chunks().iter().map(|c| (c.op, c.rows)).collect();
        assert_eq!(rows, [(Op::Create, 2), (Op::Update, 1)]);
    }
}
