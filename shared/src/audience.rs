//! Audience syncs: a segment export (member keys) kept as a zdsync-owned tag on users or
//! organizations.
//!
//! The membership state uses the state format of object syncs (`state/<sync>/state.zst`), one
//! entry per key ever seen, with these meanings:
//!
//! | fingerprint | flags | meaning |
//! |---|---|---|
//! | `MEMBER` | – | confirmed member: the tag was confirmed on the record (remove mode: recorded) |
//! | 0 | FAILED | member whose tag add is not confirmed: added again next run |
//! | 0 | ABSENT | not a member any more (tag removed, or gone in add mode) |
//! | 0 | ABSENT + FAILED | gone, but removing the tag is not confirmed: removed again next run |
//!
//! [`plan_membership`] compares the export with that state and writes `add` / `remove` chunks (write-batch
//! applies them like any chunk) plus the membership changes that need no write; [`fold_membership`] moves
//! the state forward only for confirmed operations. Audience `upsert` is an object upsert whose
//! writer also adds the tag (see `write`), planned and folded as an object sync.

use crate::changeset::{
    self, hex, parse_hex, AudienceInfo, ChangeSetError, ChunkPacker, ChunkWriter, Counts,
    FailedSample, FoldSummary, FullChunk, Manifest, NewRow, Op, ResultRow, RowStatus,
    FAILED_SAMPLES, MANIFEST_VERSION,
};
use crate::config::{Mode, SyncConfig};
use crate::export::ExportError;
use crate::export::{self, Next, Record, Value};
use crate::layout;
use crate::mapping::{self, Reason};
use crate::plan::{self, InvalidRow, InvalidRows, PlanError, PlanOptions, PlanReport};
use crate::state::{StateIndex, StateReader, FLAG_ABSENT, FLAG_FAILED};
use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io;
use std::time::Instant;

/// The fingerprint of a confirmed member.
pub const MEMBER: u64 = 1;

/// A membership change that needs no write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRow {
    pub h: String,
    pub pk: String,
    #[serde(default)]
    pub id: Option<u64>,
    pub member: bool,
}

pub use layout::membership_key;

/// Identifies the membership a state describes (object and tag).
fn audience_hash(cfg: &SyncConfig, tag: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("audience|{}|{tag}", cfg.object).as_bytes())
}

struct Differ<'a> {
    store: &'a dyn ObjectStore,
    cfg: &'a SyncConfig,
    opts: &'a PlanOptions,
    counts: Counts,
    out: ChunkWriter,
    packer: ChunkPacker,
    membership: Vec<u8>,
    membership_rows: u64,
    invalid: InvalidRows,
}

/// Plan one run of an audience-only sync (add, remove, mirror): the export's members against
/// the membership state → tag-operation chunks, membership changes, invalid rows and the
/// manifest (written last). Audience `upsert` is an object upsert (see `pipeline::plan_changes`).
pub fn plan_membership(
    store: &dyn ObjectStore,
    cfg: &SyncConfig,
    opts: &PlanOptions,
) -> Result<PlanReport, PlanError> {
    let audience = cfg
        .audience
        .as_ref()
        .filter(|_| cfg.mode.audience_only())
        .expect("the membership planner plans audience-only modes (see pipeline::plan_changes)");
    let started = Instant::now();
    // A headerless export reads with the column names of its manifest (`cfg` then carries them).
    let (parts, cfg) = export::resolve_source(store, cfg)?;
    let cfg = &*cfg;
    let state_key = layout::state_key(&cfg.name);
    let mut state = StateIndex::load(store, &state_key)?;
    let state_rows = state.as_ref().map_or(0, |s| s.len() as u64);
    let mut d = Differ {
        store,
        cfg,
        opts,
        counts: Counts::default(),
        out: ChunkWriter::new(&cfg.name, &opts.run_id, cfg.chunk_rows),
        packer: ChunkPacker::new().map_err(|source| PlanError::Write {
            key: "chunks".into(),
            source,
        })?,
        membership: Vec::new(),
        membership_rows: 0,
        invalid: InvalidRows::new(&cfg.name, opts),
    };
    let result = (|| -> Result<(), PlanError> {
        let columns = cfg.columns();
        let email_at = audience
            .email_column
            .as_ref()
            .and_then(|c| columns.iter().position(|x| x.eq_ignore_ascii_case(c)));
        // Keys not in the state that this export has: each key is one member however often
        // it is listed.
        let mut fresh: HashSet<u64> = HashSet::new();
        let mut record = Record::default();
        // Every part counts against one pass's caps on rows and decompressed bytes.
        let budget = export::ReadBudget::new(&cfg.source.read);
        for part in &parts {
            let mut reader =
                export::open_reader(store, &part.key, &columns, &cfg.source.read, &budget)?;
            let file_json = serde_json::to_vec(&part.key).expect("a string serialises");
            loop {
                match reader.next(&mut record)? {
                    Next::End => break,
                    Next::Malformed { line, reason } => {
                        d.counts.rows_read += 1;
                        d.refuse(&part.key, line, None, Reason::Malformed, None, reason)?;
                    }
                    Next::Record => {
                        d.counts.rows_read += 1;
                        let pk = match record.values.first() {
                            Some(Value::Text(t)) if !t.trim().is_empty() => t.trim().to_string(),
                            _ => {
                                d.refuse(
                                    &part.key,
                                    record.line,
                                    None,
                                    Reason::MissingPrimaryKey,
                                    Some(cfg.primary_key.clone()),
                                    format!(
                                        "column `{}` (the member key) is empty; every member needs its external_id",
                                        cfg.primary_key
                                    ),
                                )?;
                                continue;
                            }
                        };
                        let h = mapping::key_hash(cfg.object, &pk);
                        let pos = state.as_ref().and_then(|s| s.find(h));
                        let first = match (pos, state.as_mut()) {
                            (Some(i), Some(s)) => {
                                let e = s.entry_mut(i);
                                let first = e.seen == 0;
                                e.seen = 1;
                                first
                            }
                            _ => fresh.insert(h),
                        };
                        if !first {
                            continue;
                        }
                        let email = match email_at.map(|i| &record.values[i]) {
                            Some(Value::Text(t)) if !t.trim().is_empty() => {
                                let e = t.trim();
                                if !mapping::is_email(e) {
                                    // The member stays a member (nothing is removed for it);
                                    // only this run leaves it alone.
                                    d.refuse(
                                        &part.key,
                                        record.line,
                                        Some(pk.clone()),
                                        Reason::InvalidEmail,
                                        audience.email_column.clone(),
                                        format!("`{e}` is not an email address; fix it or leave the cell empty to match by external_id only"),
                                    )?;
                                    continue;
                                }
                                Some(e.to_string())
                            }
                            _ => None,
                        };
                        let (fp, flags, id) = match (pos, state.as_ref()) {
                            (Some(i), Some(s)) => {
                                let e = s.entry(i);
                                (e.fingerprint, e.flags(), e.zendesk_id())
                            }
                            _ => (0, 0, 0),
                        };
                        let confirmed = pos.is_some()
                            && fp == MEMBER
                            && flags & (FLAG_ABSENT | FLAG_FAILED) == 0;
                        if confirmed {
                            d.counts.unchanged += 1;
                            continue;
                        }
                        if flags & FLAG_FAILED != 0 && flags & FLAG_ABSENT == 0 {
                            d.counts.retried += 1;
                        }
                        let src = (&file_json[..], Some(record.line));
                        match cfg.mode {
                            // Remove mode never adds: a new member is only recorded.
                            Mode::Remove => d.member(h, &pk, id, true)?,
                            _ => d.push_op(Op::Add, h, &pk, id, email.as_deref(), src)?,
                        }
                    }
                }
            }
        }
        d.gone(state.as_ref())?;
        // An export without a single member is far more often a failed unload than an empty
        // segment; under mirror or remove it would untag everyone, so it needs a yes.
        let members = d.counts.rows_read - d.counts.invalid;
        if members == 0
            && d.counts.removed > 0
            && matches!(cfg.mode, Mode::Mirror | Mode::Remove)
            && !audience.allow_empty_export
        {
            return Err(PlanError::Export(ExportError::Unreadable {
                file: cfg.source.location.clone(),
                reason: format!(
                    "the export has no members, so this {} run would remove `{}` from all {} members; nothing was written. If the segment really is empty, set `allow_empty_export = true` under [audience] for this run",
                    cfg.mode.as_str(),
                    audience.tag,
                    d.counts.removed
                ),
            }));
        }
        d.close_chunks()?;
        d.finish()
    })();
    if let Err(e) = result {
        let _ = store.delete_prefix(&layout::run_prefix(&cfg.name, &opts.run_id));
        return Err(e);
    }

    let mkey = membership_key(&cfg.name, &opts.run_id);
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        run_id: opts.run_id.clone(),
        sync: cfg.name.clone(),
        object: cfg.object,
        mode: cfg.mode,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        mapping_hash: hex(audience_hash(cfg, &audience.tag)),
        location: cfg.source.location.clone(),
        parts: parts
            .iter()
            .map(|o| changeset::PartInfo {
                key: o.key.clone(),
                size: o.size,
            })
            .collect(),
        counts: d.counts.clone(),
        chunks: d.out.chunks().to_vec(),
        invalid_key: (d.counts.invalid > 0).then(|| layout::invalid_key(&cfg.name, &opts.run_id)),
        removed_key: None,
        base_state_run: state.as_ref().and_then(|s| s.header.run_id.clone()),
        audience: Some(AudienceInfo {
            tag: audience.tag.clone(),
            tag_writes: audience.tag_writes,
            membership_key: (d.membership_rows > 0).then_some(mkey),
        }),
        mapping_change: None,
    };
    let manifest_key = plan::write_manifest(store, &manifest)?;
    Ok(PlanReport {
        manifest,
        manifest_key,
        invalid_by_reason: d.invalid.by_reason,
        state_rows,
        seconds: started.elapsed().as_secs_f64(),
    })
}

impl Differ<'_> {
    /// A tag operation; `src` is the source file (as JSON) and line, or the state.
    fn push_op(
        &mut self,
        op: Op,
        h: u64,
        pk: &str,
        id: u64,
        email: Option<&str>,
        src: (&[u8], Option<u64>),
    ) -> Result<(), PlanError> {
        match op {
            Op::Remove => self.counts.tag_remove += 1,
            _ => self.counts.tag_add += 1,
        }
        let row = NewRow {
            key_hash: h,
            key: pk,
            fingerprint: if op == Op::Add { MEMBER } else { 0 },
            lookup: false,
            zendesk_id: id,
            file_json: src.0,
            line: src.1,
            email,
            payload: None,
        };
        match self.out.push(op, &row) {
            Some(full) => self.store_chunk(full),
            None => Ok(()),
        }
    }

    fn store_chunk(&mut self, (key, body): FullChunk) -> Result<(), PlanError> {
        self.packer
            .store(self.store, &key, &body)
            .map_err(|source| PlanError::Write { key, source })
    }

    fn close_chunks(&mut self) -> Result<(), PlanError> {
        for full in self.out.close() {
            self.store_chunk(full)?;
        }
        Ok(())
    }

    fn member(&mut self, h: u64, pk: &str, id: u64, member: bool) -> Result<(), PlanError> {
        self.membership_rows += 1;
        let row = MembershipRow {
            h: hex(h),
            pk: pk.to_string(),
            id: (id != 0).then_some(id),
            member,
        };
        serde_json::to_writer(&mut self.membership, &row).expect("vec write");
        self.membership.push(b'\n');
        Ok(())
    }

    /// Keys of the state this export no longer has.
    fn gone(&mut self, state: Option<&StateIndex>) -> Result<(), PlanError> {
        let Some(state) = state else {
            return Ok(());
        };
        let unseen = state.entries().iter().any(|e| e.seen == 0);
        if !unseen {
            return Ok(());
        }
        let state_key = layout::state_key(&self.cfg.name);
        let mut reader =
            StateReader::open(self.store, &state_key)?.ok_or_else(|| PlanError::Write {
                key: state_key.clone(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "the state disappeared while planning",
                ),
            })?;
        let mut i = 0usize;
        while let Some(e) = reader.next_entry()? {
            let seen = state.entry(i).seen != 0;
            i += 1;
            if seen {
                continue;
            }
            let absent = e.flags & FLAG_ABSENT != 0;
            let failed = e.flags & FLAG_FAILED != 0;
            let confirmed_member = e.fingerprint == MEMBER && !absent && !failed;
            if confirmed_member {
                self.counts.removed += 1;
            }
            let src: (&[u8], Option<u64>) = (b"\"state\"", None);
            match (self.cfg.mode, confirmed_member, absent, failed) {
                // A member that left: removed (remove, mirror) or only recorded (add).
                (Mode::Remove | Mode::Mirror, true, _, _) => {
                    self.push_op(Op::Remove, e.key_hash, &e.key, e.zendesk_id, None, src)?
                }
                // A removal that failed last run.
                (Mode::Remove | Mode::Mirror, _, true, true) => {
                    self.counts.retried += 1;
                    self.push_op(Op::Remove, e.key_hash, &e.key, e.zendesk_id, None, src)?
                }
                // Already not a member.
                (_, _, true, false) => {}
                // Left in add mode, a pending removal after a switch to add mode, or a member
                // whose add never got confirmed: recorded as gone, no write.
                _ => self.member(e.key_hash, &e.key, e.zendesk_id, false)?,
            }
        }
        Ok(())
    }

    fn refuse(
        &mut self,
        file: &str,
        line: u64,
        pk: Option<String>,
        reason: Reason,
        field: Option<String>,
        message: String,
    ) -> Result<(), PlanError> {
        let row = InvalidRow {
            file: file.to_string(),
            line,
            pk,
            reason,
            field,
            message,
        };
        self.counts.invalid += 1;
        self.invalid.push(self.store, row)
    }

    fn finish(&mut self) -> Result<(), PlanError> {
        self.invalid.commit()?;
        if self.membership_rows > 0 {
            let key = membership_key(&self.cfg.name, &self.opts.run_id);
            let packed =
                zstd::bulk::compress(&self.membership, 1).map_err(|source| PlanError::Write {
                    key: key.clone(),
                    source,
                })?;
            self.store
                .put(&key, &packed)
                .map_err(|source| PlanError::Write { key, source })?;
        }
        Ok(())
    }
}

/// The new state entry of one key.
struct Change {
    h: u64,
    fp: u64,
    id: u64,
    flags: u8,
    key: String,
}

/// Fold an audience-only run's outcomes into the membership state (audience `upsert` folds as
/// an object sync, see `pipeline::fold`): a key moves only when its tag operation is
/// confirmed; a failed add stays "not confirmed" and is sent again, a failed removal stays
/// pending and is sent again.
pub fn fold_membership(
    store: &dyn ObjectStore,
    manifest: &Manifest,
) -> Result<FoldSummary, ChangeSetError> {
    let bad = |key: &str, reason: String| ChangeSetError::Bad {
        key: key.to_string(),
        line: 0,
        reason,
    };
    let mut summary = FoldSummary::default();
    let mut changes: Vec<Change> = Vec::new();
    for chunk in &manifest.chunks {
        let name = layout::chunk_name(&chunk.key);
        let outcomes: HashMap<u32, ResultRow> =
            changeset::read_results(store, &manifest.sync, &manifest.run_id, name)?;
        for row in changeset::read_jsonl::<changeset::ChunkRow>(store, &chunk.key)? {
            let h = parse_hex(&row.key_hash)
                .ok_or_else(|| bad(&chunk.key, format!("bad key hash {:?}", row.key_hash)))?;
            let add = chunk.op == Op::Add;
            let outcome = outcomes.get(&row.index);
            let (fp, id, flags) = match outcome {
                Some(r) if r.status == RowStatus::Confirmed => {
                    summary.confirmed += 1;
                    let id = r.zendesk_id.or(row.zendesk_id).unwrap_or(0);
                    if add {
                        summary.tagged += 1;
                        (MEMBER, id, 0)
                    } else {
                        summary.untagged += 1;
                        (0, id, FLAG_ABSENT)
                    }
                }
                _ => {
                    let reason = match outcome {
                        Some(r) => {
                            summary.failed += 1;
                            r.error.clone().unwrap_or_default()
                        }
                        None => {
                            summary.unknown += 1;
                            "no outcome was recorded (the write did not finish); the row is sent again next run".into()
                        }
                    };
                    if summary.failed_samples.len() < FAILED_SAMPLES {
                        summary.failed_samples.push(FailedSample {
                            pk: row.key.clone(),
                            op: chunk.op,
                            reason,
                        });
                    }
                    // The id is forgotten for adds: next run finds the record again (it may
                    // have been created, or re-created, since).
                    if add {
                        (0, 0, FLAG_FAILED)
                    } else {
                        (0, row.zendesk_id.unwrap_or(0), FLAG_ABSENT | FLAG_FAILED)
                    }
                }
            };
            changes.push(Change {
                h,
                fp,
                id,
                flags,
                key: row.key,
            });
        }
    }
    if let Some(key) = manifest
        .audience
        .as_ref()
        .and_then(|a| a.membership_key.as_ref())
    {
        for r in changeset::read_jsonl::<MembershipRow>(store, key)? {
            let h = parse_hex(&r.h).ok_or_else(|| bad(key, format!("bad key hash {:?}", r.h)))?;
            if !r.member {
                summary.removed += 1;
            }
            changes.push(Change {
                h,
                fp: if r.member { MEMBER } else { 0 },
                id: r.id.unwrap_or(0),
                flags: if r.member { 0 } else { FLAG_ABSENT },
                key: r.pk,
            });
        }
    }
    changes.sort_unstable_by_key(|c| c.h);

    let (mut old, mut out) = changeset::rewrite_state(store, manifest, changes.len())?;
    let mut next_old = match old.as_mut() {
        Some(r) => r.next_entry()?,
        None => None,
    };
    let mut changes = changes.into_iter().peekable();
    loop {
        match (next_old.as_ref(), changes.peek()) {
            (None, None) => break,
            (Some(o), c) if c.is_none_or(|c| o.key_hash < c.h) => {
                out.push(o.key_hash, o.fingerprint, o.zendesk_id, o.flags, &o.key)?;
                next_old = old.as_mut().map_or(Ok(None), |r| r.next_entry())?;
            }
            (o, Some(_)) => {
                let c = changes.next().expect("peeked");
                let same = o.is_some_and(|o| o.key_hash == c.h);
                // A failed operation keeps the id the state knew, when the change has none.
                let id = match (c.id, o) {
                    (0, Some(o)) if same && c.flags & FLAG_ABSENT != 0 => o.zendesk_id,
                    (id, _) => id,
                };
                out.push(c.h, c.fp, id, c.flags, &c.key)?;
                if same {
                    next_old = old.as_mut().map_or(Ok(None), |r| r.next_entry())?;
                }
            }
            (Some(_), None) => unreachable!("handled by the first arm"),
        }
    }
    summary.state_entries = out.finish()?;
    Ok(summary)
}
