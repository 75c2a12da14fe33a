//! plan: export → mapped, validated rows → diff against the last confirmed state → change set
//! (chunk files + manifest), invalid rows with reasons, and a summary.
//!
//! One pass over the export. Memory is bounded by the number of keys, not the data: the state
//! index keeps 25 bytes a key, and each key seen costs 8 more (16 for keys new to the state).
//! Chunks are compressed and written on a separate thread while reading goes on.

use crate::changeset::{
    hex, read_chunk_lines, row_key_hash, ChunkPacker, ChunkRow, ChunkWriter, Counts, FullChunk,
    Manifest, NewRow, Op, PartInfo, MANIFEST_VERSION,
};
use crate::config::{Mode, SyncConfig};
use crate::export::{self, ExportError, Next, Record};
use crate::layout;
use crate::mapping::{MappedRow, Mapper, Reason, Refusal};
use crate::state::{StateError, StateIndex, StateReader, FLAG_ABSENT, FLAG_FAILED, FLAG_UNKNOWN};
use crate::store::ObjectStore;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Write};
use std::sync::mpsc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub run_id: String,
    /// Invalid-row samples kept per reason for the summary.
    pub samples_per_reason: usize,
    /// Zendesk's field definitions: dropdown labels become option values, unknown options and
    /// pattern mismatches are refused (see `Mapper::with_schema`).
    pub schema: Option<std::sync::Arc<crate::schema::Schema>>,
    /// Send every row, changed or not (keys in the state are updated, never created again).
    pub full_resync: bool,
}

impl PlanOptions {
    pub fn new(run_id: impl Into<String>) -> Self {
        Self {
            run_id: run_id.into(),
            samples_per_reason: 3,
            schema: None,
            full_resync: false,
        }
    }
}

/// A row refused before sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidRow {
    pub file: String,
    /// Line (CSV/JSONL) or row (Parquet) where the record starts.
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pk: Option<String>,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReasonSummary {
    pub count: u64,
    pub samples: Vec<InvalidRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub manifest: Manifest,
    /// `None` for a preview (see `preview`).
    pub manifest_key: Option<String>,
    pub invalid_by_reason: BTreeMap<&'static str, ReasonSummary>,
    pub state_rows: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("writing the change set to `{key}` failed: {source}")]
    Write { key: String, source: io::Error },
}

/// Refused rows of one plan: counted and sampled per reason, and written to the run's
/// `invalid.jsonl`.
pub(crate) struct InvalidRows {
    pub(crate) by_reason: BTreeMap<&'static str, ReasonSummary>,
    out: Option<Box<dyn crate::store::ObjectWriter>>,
    key: String,
    samples: usize,
}

impl InvalidRows {
    pub(crate) fn new(sync: &str, opts: &PlanOptions) -> Self {
        InvalidRows {
            by_reason: BTreeMap::new(),
            out: None,
            key: layout::invalid_key(sync, &opts.run_id),
            samples: opts.samples_per_reason,
        }
    }

    pub(crate) fn push(
        &mut self,
        store: &dyn ObjectStore,
        row: InvalidRow,
    ) -> Result<(), PlanError> {
        let entry = self.by_reason.entry(row.reason.as_str()).or_default();
        entry.count += 1;
        if entry.samples.len() < self.samples {
            entry.samples.push(row.clone());
        }
        let out = match &mut self.out {
            Some(out) => out,
            None => {
                self.out
                    .insert(store.create(&self.key).map_err(|source| PlanError::Write {
                        key: self.key.clone(),
                        source,
                    })?)
            }
        };
        serde_json::to_writer(&mut *out, &row)
            .map_err(io::Error::from)
            .and_then(|_| out.write_all(b"\n"))
            .map_err(|source| PlanError::Write {
                key: self.key.clone(),
                source,
            })
    }

    pub(crate) fn commit(&mut self) -> Result<(), PlanError> {
        match self.out.take() {
            Some(out) => out.commit().map_err(|source| PlanError::Write {
                key: self.key.clone(),
                source,
            }),
            None => Ok(()),
        }
    }
}

/// Store a plan's manifest, the last object a plan writes.
pub(crate) fn write_manifest(
    store: &dyn ObjectStore,
    manifest: &Manifest,
) -> Result<Option<String>, PlanError> {
    let key = layout::manifest_key(&manifest.sync, &manifest.run_id);
    crate::changeset::write_manifest(store, manifest)
        .map(Some)
        .map_err(|source| PlanError::Write { key, source })
}

/// Identity hasher for keys that are already uniform 64-bit hashes.
#[derive(Default)]
struct KeyHasher(u64);
impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
type KeyMap<V> = HashMap<u64, V, BuildHasherDefault<KeyHasher>>;

/// Where the first copy of a key went: a chunk index, or one of these markers.
const SLOT_UNCHANGED: u32 = u32::MAX;
const SLOT_INVALID: u32 = u32::MAX - 1;
const SLOT_SKIPPED: u32 = u32::MAX - 2;

struct Dup {
    pk: String,
    first_ord: u32,
    first_slot: u32,
    /// Later copies: (ordinal, line); their refusal is written once all copies are known.
    others: Vec<(u32, u64)>,
    /// Copies past the listed ones, refused as they come (a key repeated a million times must
    /// not cost a million entries, nor a message listing them all).
    more: u64,
}

/// Copies of one key named in its refusal message (and kept until the plan ends).
const LISTED_COPIES: usize = 8;
/// Distinct keys with copies a plan keeps track of: past it the export is not one row per key.
const MAX_DUPLICATED_KEYS: usize = 100_000;

struct Planner<'a> {
    store: &'a dyn ObjectStore,
    cfg: &'a SyncConfig,
    opts: &'a PlanOptions,
    mapper: Mapper,
    state: Option<StateIndex>,
    fresh: KeyMap<(u32, u32)>,
    dups: KeyMap<Dup>,
    counts: Counts,
    out: ChunkWriter,
    sink: Option<mpsc::SyncSender<FullChunk>>,
    invalid: InvalidRows,
    parts: Vec<PartInfo>,
    /// First ordinal of each part, to turn ordinals back into files.
    part_start: Vec<u32>,
    line_of_first: KeyMap<u64>,
    /// The state's fingerprints were computed with another mapping.
    remapped: bool,
    /// Keys in the state sent again (counted when `remapped`).
    resend: u64,
}

/// Plan one run of a sync: the change set lands under `runs/<sync>/<run>/`, the manifest last.
/// A preview plans the same way into a scratch copy of the bucket (see `preview`).
pub fn plan(
    store: &dyn ObjectStore,
    cfg: &SyncConfig,
    opts: &PlanOptions,
) -> Result<PlanReport, PlanError> {
    let started = Instant::now();
    // A headerless export reads with the column names of its manifest (`cfg` then carries them).
    let (parts, cfg) = export::resolve_source(store, cfg)?;
    let cfg = &*cfg;
    let mapper = Mapper::with_schema(cfg, opts.schema.as_deref());
    let state = StateIndex::load(store, &layout::state_key(&cfg.name))?;
    let n = state.as_ref().map_or(0, |s| s.len());
    // A rebuilt state records no mapping: its rows are resent anyway, and announced as such.
    let remapped = state.as_ref().is_some_and(|s| {
        !s.header.mapping_hash.is_empty() && s.header.mapping_hash != hex(mapper.mapping_hash())
    });
    let run_prefix = layout::run_prefix(&cfg.name, &opts.run_id);
    let mut p = Planner {
        store,
        cfg,
        opts,
        mapper,
        state,
        fresh: KeyMap::default(),
        dups: KeyMap::default(),
        counts: Counts::default(),
        out: ChunkWriter::new(&cfg.name, &opts.run_id, cfg.chunk_rows),
        sink: None,
        invalid: InvalidRows::new(&cfg.name, opts),
        parts: parts
            .iter()
            .map(|o| PartInfo {
                key: o.key.clone(),
                size: o.size,
            })
            .collect(),
        part_start: Vec::new(),
        line_of_first: KeyMap::default(),
        remapped,
        resend: 0,
    };

    let result = std::thread::scope(|scope| -> Result<(), PlanError> {
        let (tx, rx) = mpsc::sync_channel::<FullChunk>(4);
        p.sink = Some(tx);
        let writer = scope.spawn(move || write_chunks(store, rx));
        let read = p.read_all();
        let flushed = read.and_then(|_| p.flush_all());
        p.sink = None; // closes the channel so the writer ends
        let written = writer.join().expect("chunk writer panicked");
        flushed?;
        written
    });
    if let Err(e) = result.and_then(|_| p.finish()) {
        // Leave no half change set behind: without a manifest nothing would use it anyway.
        let _ = store.delete_prefix(&run_prefix);
        return Err(e);
    }

    let manifest = Manifest {
        version: MANIFEST_VERSION,
        run_id: opts.run_id.clone(),
        sync: cfg.name.clone(),
        object: cfg.object,
        mode: cfg.mode,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        mapping_hash: hex(p.mapper.mapping_hash()),
        location: cfg.source.location.clone(),
        parts: p.parts.clone(),
        counts: p.counts.clone(),
        chunks: p.out.chunks().to_vec(),
        invalid_key: (p.counts.invalid > 0).then(|| layout::invalid_key(&cfg.name, &opts.run_id)),
        removed_key: (p.counts.removed > 0).then(|| layout::removed_key(&cfg.name, &opts.run_id)),
        base_state_run: p.state.as_ref().and_then(|s| s.header.run_id.clone()),
        audience: cfg
            .audience
            .as_ref()
            .map(|a| crate::changeset::AudienceInfo {
                tag: a.tag.clone(),
                tag_writes: a.tag_writes,
                membership_key: None,
            }),
        mapping_change: p.remapped.then(|| crate::changeset::MappingChange {
            since_run: p.state.as_ref().and_then(|s| s.header.run_id.clone()),
            resend: p.resend,
        }),
    };
    if let Some(m) = &manifest.mapping_change {
        let cost = manifest.cost(cfg.rate_limit_rpm());
        tracing::warn!(
            sync = %cfg.name,
            since_run = m.since_run.as_deref().unwrap_or("?"),
            resend = m.resend,
            calls = cost.calls,
            minutes = cost.minutes,
            "{}",
            mapping_change_line(&manifest, cfg.rate_limit_rpm()).unwrap_or_default()
        );
    }
    let manifest_key = write_manifest(store, &manifest)?;
    Ok(PlanReport {
        manifest,
        manifest_key,
        invalid_by_reason: p.invalid.by_reason,
        state_rows: n as u64,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The line a plan and a run print when the mapping changed since the last confirmed run.
pub fn mapping_change_line(manifest: &Manifest, rpm: u32) -> Option<String> {
    let m = manifest.mapping_change.as_ref()?;
    let cost = manifest.cost(rpm);
    Some(format!(
        "the mapping changed since run {}: {} rows already in Zendesk are sent again; this run sends {} rows in ≈{} bulk call{}, ≥{} at {} requests/min (cap a run with `max_rows_per_run` or `zdsync run --max-rows`)",
        m.since_run.as_deref().unwrap_or("(unknown)"),
        m.resend,
        cost.rows,
        cost.calls,
        if cost.calls == 1 { "" } else { "s" },
        minutes_text(cost.minutes),
        cost.rpm
    ))
}

/// `42 s`, `12 min`, `3 h 20 min`.
pub fn minutes_text(minutes: f64) -> String {
    let secs = (minutes * 60.0).ceil() as u64;
    match secs {
        0..=119 => format!("{secs} s"),
        120..=5999 => format!("{} min", secs.div_ceil(60)),
        _ => format!("{} h {} min", secs / 3600, (secs % 3600).div_ceil(60)),
    }
}

/// Compress and store chunks as they are handed over.
fn write_chunks(store: &dyn ObjectStore, rx: mpsc::Receiver<FullChunk>) -> Result<(), PlanError> {
    let mut packer = ChunkPacker::new().map_err(|source| PlanError::Write {
        key: "chunks".into(),
        source,
    })?;
    for (key, body) in rx {
        packer
            .store(store, &key, &body)
            .map_err(|source| PlanError::Write { key, source })?;
    }
    Ok(())
}

impl Planner<'_> {
    fn read_all(&mut self) -> Result<(), PlanError> {
        // Rows are mapped in batches, then their state entries are warmed together, so the
        // cache misses of the key lookups overlap instead of stalling row after row.
        const BATCH: usize = 64;
        let columns = self.mapper.columns().to_vec();
        let mut record = Record::default();
        let mut rows: Vec<MappedRow> = (0..BATCH).map(|_| MappedRow::default()).collect();
        let mut outcome: Vec<(u32, u64, Result<(), Refusal>)> = Vec::with_capacity(BATCH);
        let mut hashes: Vec<u64> = Vec::with_capacity(BATCH);
        // Rows are numbered in 32 bits: the budget's row cap (below `u32::MAX`) keeps the
        // ordinal from wrapping, and it and the byte cap stop an export that would never end.
        let budget = export::ReadBudget::new(&self.cfg.source.read);
        let mut ordinal: u32 = 0;
        let mut payload = Vec::with_capacity(1024);
        for part_idx in 0..self.parts.len() {
            self.part_start.push(ordinal + 1);
            let key = self.parts[part_idx].key.clone();
            let mut reader =
                export::open_reader(self.store, &key, &columns, &self.cfg.source.read, &budget)?;
            let file_json = serde_json::to_vec(&key).expect("a string serialises");
            let mut done = false;
            while !done {
                outcome.clear();
                hashes.clear();
                while outcome.len() < BATCH {
                    match reader.next(&mut record)? {
                        Next::End => {
                            done = true;
                            break;
                        }
                        Next::Malformed { line, reason } => {
                            ordinal += 1;
                            self.counts.rows_read += 1;
                            self.refuse(InvalidRow {
                                file: key.clone(),
                                line,
                                pk: None,
                                reason: Reason::Malformed,
                                field: None,
                                message: reason,
                            })?;
                        }
                        Next::Record => {
                            ordinal += 1;
                            self.counts.rows_read += 1;
                            let row = &mut rows[outcome.len()];
                            let r = self.mapper.map(&record, row);
                            if r.is_ok() {
                                hashes.push(row.pk_hash);
                            }
                            outcome.push((ordinal, record.line, r));
                        }
                    }
                }
                match &self.state {
                    Some(st) => st.warm(&hashes),
                    None => {
                        let hits = hashes.iter().filter(|h| self.fresh.contains_key(h)).count();
                        std::hint::black_box(hits);
                    }
                }
                for (k, (ord, line, r)) in outcome.drain(..).enumerate() {
                    match r {
                        Ok(()) => self.accept(&rows[k], ord, line, &file_json, &mut payload)?,
                        Err(refusal) => self.refuse_mapped(refusal, &rows[k], ord, line, &key)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// Record that the first copy of `h` went to `slot`; returns the earlier copy if any.
    fn register(
        &mut self,
        h: u64,
        state_pos: Option<usize>,
        ordinal: u32,
        slot: u32,
    ) -> Option<(u32, u32)> {
        if let (Some(i), Some(st)) = (state_pos, self.state.as_mut()) {
            let e = st.entry_mut(i);
            if e.seen != 0 {
                return Some((e.seen, e.slot));
            }
            e.seen = ordinal;
            e.slot = slot;
            return None;
        }
        match self.fresh.entry(h) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert((ordinal, slot));
                None
            }
        }
    }

    fn set_slot(&mut self, h: u64, state_pos: Option<usize>, slot: u32) {
        match (state_pos, self.state.as_mut()) {
            (Some(i), Some(st)) => st.entry_mut(i).slot = slot,
            _ => {
                if let Some(v) = self.fresh.get_mut(&h) {
                    v.1 = slot;
                }
            }
        }
    }

    fn note_dup(
        &mut self,
        row_pk: &str,
        h: u64,
        ordinal: u32,
        line: u64,
        first: (u32, u32),
    ) -> Result<(), PlanError> {
        if self.dups.len() >= MAX_DUPLICATED_KEYS && !self.dups.contains_key(&h) {
            return Err(PlanError::Export(ExportError::Unreadable {
                file: self.cfg.source.location.clone(),
                reason: format!(
                    "more than {MAX_DUPLICATED_KEYS} primary keys appear more than once: the export is not one row per `{}` (check the unload query's joins); nothing was written",
                    self.cfg.primary_key
                ),
            }));
        }
        let d = self.dups.entry(h).or_insert_with(|| Dup {
            pk: row_pk.to_string(),
            first_ord: first.0,
            first_slot: first.1,
            others: Vec::new(),
            more: 0,
        });
        if d.others.len() < LISTED_COPIES {
            d.others.push((ordinal, line));
            return Ok(());
        }
        d.more += 1;
        let message = format!(
            "primary key {:?} appears more than {} times; every copy is refused: keep one row per key",
            d.pk,
            LISTED_COPIES + 1
        );
        let pk = d.pk.clone();
        let file = self.file_of(ordinal);
        self.refuse(InvalidRow {
            file,
            line,
            pk: Some(pk),
            reason: Reason::DuplicatePrimaryKey,
            field: None,
            message,
        })
    }

    fn accept(
        &mut self,
        row: &MappedRow,
        ordinal: u32,
        line: u64,
        file_json: &[u8],
        payload: &mut Vec<u8>,
    ) -> Result<(), PlanError> {
        let h = row.pk_hash;
        let state_pos = self.state.as_ref().and_then(|s| s.find(h));
        // Decide before registering so the slot is known; registering may reveal a duplicate.
        if let Some((first_ord, first_slot)) = self.register(h, state_pos, ordinal, SLOT_UNCHANGED)
        {
            return self.note_dup(&row.pk, h, ordinal, line, (first_ord, first_slot));
        }
        let lookup = state_pos.is_some_and(|i| {
            let e = self
                .state
                .as_ref()
                .expect("position implies a state")
                .entry(i);
            e.flags() & FLAG_UNKNOWN != 0 && e.zendesk_id() == 0
        });
        let (op, id) = match state_pos {
            Some(i) => {
                let e = self
                    .state
                    .as_ref()
                    .expect("position implies a state")
                    .entry(i);
                let (fp, id, flags) = (e.fingerprint, e.zendesk_id(), e.flags());
                let failed = flags & FLAG_FAILED != 0;
                let same = !self.opts.full_resync
                    && fp == row.fingerprint
                    && flags & (FLAG_FAILED | FLAG_ABSENT) == 0;
                if failed {
                    self.counts.retried += 1;
                }
                match self.cfg.mode {
                    _ if same => (None, 0),
                    // A create that failed: Zendesk never got the record.
                    Mode::Upsert | Mode::Insert if failed && id == 0 => (Some(Op::Create), 0),
                    Mode::Insert => {
                        self.counts.skipped += 1;
                        self.set_slot(h, Some(i), SLOT_SKIPPED);
                        return Ok(());
                    }
                    // Audience-only modes never reach the object planner (see `audience`).
                    Mode::Upsert | Mode::Update | Mode::Add | Mode::Remove | Mode::Mirror => {
                        (Some(Op::Update), id)
                    }
                }
            }
            None => match self.cfg.mode {
                Mode::Upsert | Mode::Insert => (Some(Op::Create), 0),
                // Keys zdsync never confirmed are updated by external_id; unknown ones fail.
                Mode::Update | Mode::Add | Mode::Remove | Mode::Mirror => (Some(Op::Update), 0),
            },
        };
        let Some(op) = op else {
            self.counts.unchanged += 1;
            return Ok(());
        };
        match op {
            Op::Create | Op::Add => self.counts.create += 1,
            Op::Update | Op::Remove => self.counts.update += 1,
        }
        if self.remapped && state_pos.is_some() {
            self.resend += 1;
        }
        let slot = self.out.slot(op) as u32;
        self.set_slot(h, state_pos, slot);
        payload.clear();
        // Ticket upserts carry the create-only fields on updates too: a ticket deleted in
        // Zendesk is created again from this payload (the writer strips them from updates).
        let full = op == Op::Create
            || (self.cfg.object == crate::fields::Object::Tickets && self.cfg.mode == Mode::Upsert);
        self.mapper.write_payload(row, full, payload);
        let new = NewRow {
            key_hash: h,
            key: &row.pk,
            fingerprint: row.fingerprint,
            lookup: lookup && op == Op::Create,
            zendesk_id: id,
            file_json,
            line: Some(line),
            email: None,
            payload: Some(payload),
        };
        match self.out.push(op, &new) {
            Some(full) => self.send(full),
            None => Ok(()),
        }
    }

    /// Hand a full chunk to the writer thread.
    fn send(&mut self, chunk: FullChunk) -> Result<(), PlanError> {
        let Some(tx) = &self.sink else {
            return Ok(());
        };
        let key = chunk.0.clone();
        tx.send(chunk).map_err(|_| PlanError::Write {
            // The writer stopped on an error; it reports it when joined.
            key,
            source: io::Error::other("chunk writer stopped"),
        })
    }

    fn flush_all(&mut self) -> Result<(), PlanError> {
        for chunk in self.out.close() {
            self.send(chunk)?;
        }
        Ok(())
    }

    fn refuse_mapped(
        &mut self,
        refusal: Refusal,
        row: &MappedRow,
        ordinal: u32,
        line: u64,
        file: &str,
    ) -> Result<(), PlanError> {
        let pk = (refusal.reason != Reason::MissingPrimaryKey).then(|| row.pk.clone());
        if pk.is_some() {
            // A refused row still claims its key, so another copy of it is a duplicate too.
            let pos = self.state.as_ref().and_then(|s| s.find(row.pk_hash));
            if let Some(first) = self.register(row.pk_hash, pos, ordinal, SLOT_INVALID) {
                // This copy is refused for its own reason as well; count it once, as a duplicate.
                return self.note_dup(&row.pk, row.pk_hash, ordinal, line, first);
            }
            self.line_of_first.insert(row.pk_hash, line);
        }
        self.refuse(InvalidRow {
            file: file.to_string(),
            line,
            pk,
            reason: refusal.reason,
            field: refusal.field,
            message: refusal.message,
        })
    }

    fn refuse(&mut self, row: InvalidRow) -> Result<(), PlanError> {
        self.counts.invalid += 1;
        self.invalid.push(self.store, row)
    }

    fn part_of(&self, ordinal: u32) -> usize {
        self.part_start
            .partition_point(|&s| s <= ordinal)
            .saturating_sub(1)
    }

    fn part_start_of(&self, ordinal: u32) -> u32 {
        self.part_start[self.part_of(ordinal)]
    }

    fn file_of(&self, ordinal: u32) -> String {
        self.parts[self.part_of(ordinal)].key.clone()
    }

    /// Refuse every copy of duplicated keys, take first copies back out of their chunks,
    /// list removed keys, and close the invalid-rows file.
    fn finish(&mut self) -> Result<(), PlanError> {
        let dups = std::mem::take(&mut self.dups);
        let mut dup_list: Vec<(u64, Dup)> = dups.into_iter().collect();
        dup_list.sort_by_key(|(_, d)| d.first_ord);
        // Take first copies back out of their chunks (their lines come back with them).
        let mut rewrite: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
        let mut first_lines = std::mem::take(&mut self.line_of_first);
        for (h, d) in &dup_list {
            if !matches!(d.first_slot, SLOT_UNCHANGED | SLOT_SKIPPED | SLOT_INVALID) {
                match self.out.chunks()[d.first_slot as usize].op {
                    Op::Create | Op::Add => self.counts.create -= 1,
                    Op::Update | Op::Remove => self.counts.update -= 1,
                }
                if self.remapped && self.state.as_ref().and_then(|s| s.find(*h)).is_some() {
                    self.resend -= 1;
                }
                rewrite.entry(d.first_slot).or_default().insert(*h);
            }
            match d.first_slot {
                SLOT_UNCHANGED => self.counts.unchanged -= 1,
                SLOT_SKIPPED => self.counts.skipped -= 1,
                _ => {}
            }
        }
        for (chunk, hashes) in rewrite {
            self.drop_rows(chunk as usize, &hashes, &mut first_lines)?;
        }
        // First copies that went nowhere (unchanged, skipped) kept no line: look them up.
        let missing: BTreeMap<u32, u64> = dup_list
            .iter()
            .filter(|(h, _)| !first_lines.contains_key(h))
            .map(|(h, d)| (d.first_ord, *h))
            .collect();
        if !missing.is_empty() {
            self.find_lines(&missing, &mut first_lines)?;
        }
        for (h, d) in dup_list {
            let first_file = self.file_of(d.first_ord);
            let first_line = first_lines.get(&h).copied();
            let mut copies: Vec<String> = vec![match first_line {
                Some(l) => format!("{first_file}:{l}"),
                // Only when the part changed while it was being planned.
                None => format!(
                    "{first_file} record {}",
                    d.first_ord + 1 - self.part_start_of(d.first_ord)
                ),
            }];
            copies.extend(
                d.others
                    .iter()
                    .map(|(ord, line)| format!("{}:{line}", self.file_of(*ord))),
            );
            let more = if d.more > 0 {
                format!(" and {} more", d.more)
            } else {
                String::new()
            };
            let message = format!(
                "primary key {:?} appears {} times ({}{more}); every copy is refused: keep one row per key",
                d.pk,
                copies.len() as u64 + d.more,
                copies.join(", ")
            );
            if d.first_slot != SLOT_INVALID {
                self.refuse(InvalidRow {
                    file: first_file.clone(),
                    line: first_line.unwrap_or(0),
                    pk: Some(d.pk.clone()),
                    reason: Reason::DuplicatePrimaryKey,
                    field: None,
                    message: message.clone(),
                })?;
            }
            for (ord, line) in &d.others {
                self.refuse(InvalidRow {
                    file: self.file_of(*ord),
                    line: *line,
                    pk: Some(d.pk.clone()),
                    reason: Reason::DuplicatePrimaryKey,
                    field: None,
                    message: message.clone(),
                })?;
            }
        }
        self.out.chunks_mut().retain(|c| c.rows > 0);

        self.write_removed()?;
        self.invalid.commit()
    }

    /// Lines of the rows at the given ordinals (key hash by ordinal): their parts are read again
    /// up to the last of them. Only plans with duplicate keys whose first copy was not sent pay
    /// for this.
    fn find_lines(
        &self,
        want: &BTreeMap<u32, u64>,
        lines: &mut KeyMap<u64>,
    ) -> Result<(), PlanError> {
        let columns = self.mapper.columns().to_vec();
        let mut record = Record::default();
        // A second pass, over no more than the first read.
        let budget = export::ReadBudget::new(&self.cfg.source.read);
        for (k, part) in self.parts.iter().enumerate() {
            let start = self.part_start[k];
            let end = self.part_start.get(k + 1).copied().unwrap_or(u32::MAX);
            let Some((&last, _)) = want.range(start..end).next_back() else {
                continue;
            };
            let mut reader = export::open_reader(
                self.store,
                &part.key,
                &columns,
                &self.cfg.source.read,
                &budget,
            )?;
            let mut ordinal = start - 1;
            while ordinal < last {
                let line = match reader.next(&mut record)? {
                    Next::End => break,
                    Next::Malformed { line, .. } => line,
                    Next::Record => record.line,
                };
                ordinal += 1;
                if let Some(h) = want.get(&ordinal) {
                    lines.insert(*h, line);
                }
            }
        }
        Ok(())
    }

    /// Rewrite one chunk without the rows of the given keys.
    fn drop_rows(
        &mut self,
        chunk: usize,
        hashes: &HashSet<u64>,
        lines: &mut KeyMap<u64>,
    ) -> Result<(), PlanError> {
        let key = self.out.chunks()[chunk].key.clone();
        let werr = |source: io::Error| PlanError::Write {
            key: key.clone(),
            source,
        };
        let plain = read_chunk_lines(self.store, &key).map_err(werr)?;
        let mut kept = Vec::with_capacity(plain.len());
        let mut rows = 0;
        for line in plain.split_inclusive(|b| *b == b'\n') {
            if let Some(h) = row_key_hash(line).filter(|h| hashes.contains(h)) {
                // Its `source` tells where the dropped first copy came from.
                if let Ok(row) = serde_json::from_slice::<ChunkRow>(line) {
                    if let Some(l) = row.source.rsplit(':').next().and_then(|l| l.parse().ok()) {
                        lines.insert(h, l);
                    }
                }
                continue;
            }
            kept.extend_from_slice(line);
            rows += 1;
        }
        self.out.chunks_mut()[chunk].rows = rows;
        if rows == 0 {
            return self.store.delete_prefix(&key).map_err(werr);
        }
        ChunkPacker::new()
            .and_then(|mut p| p.store(self.store, &key, &kept))
            .map_err(werr)
    }

    fn write_removed(&mut self) -> Result<(), PlanError> {
        let Some(state) = &self.state else {
            return Ok(());
        };
        let removed = state
            .entries()
            .iter()
            .filter(|e| e.seen == 0 && e.flags() & FLAG_ABSENT == 0)
            .count() as u64;
        self.counts.removed = removed;
        if removed == 0 {
            return Ok(());
        }
        let key = layout::removed_key(&self.cfg.name, &self.opts.run_id);
        let werr = |source: io::Error| PlanError::Write {
            key: key.clone(),
            source,
        };
        let mut reader = StateReader::open(self.store, &layout::state_key(&self.cfg.name))?
            .ok_or_else(|| {
                werr(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the state disappeared while planning",
                ))
            })?;
        let raw = self.store.create(&key).map_err(werr)?;
        let mut enc = zstd::stream::write::Encoder::new(raw, 1).map_err(werr)?;
        let mut i = 0usize;
        while let Some(e) = reader.next_entry()? {
            debug_assert_eq!(e.key_hash, state.entry(i).hash);
            if state.entry(i).seen == 0 && e.flags & FLAG_ABSENT == 0 {
                let line = serde_json::json!({"h": hex(e.key_hash), "pk": e.key, "id": (e.zendesk_id != 0).then_some(e.zendesk_id)});
                serde_json::to_writer(&mut enc, &line)
                    .map_err(io::Error::from)
                    .map_err(werr)?;
                enc.write_all(b"\n").map_err(werr)?;
            }
            i += 1;
        }
        enc.finish().map_err(werr)?.commit().map_err(werr)
    }
}
