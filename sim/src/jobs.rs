//! Bulk jobs: the job-status records clients poll, and the per-item work with results in the
//! shapes Zendesk returns for each bulk endpoint.

use crate::fields::Target;
use crate::store::{Ctx, Invalid, OpError, Store};
use crate::util::{as_id, as_text, job_message_time};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, VecDeque};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Working,
    Completed,
    Failed,
    Killed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Working => "working",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Killed => "killed",
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Working)
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub url: String,
    pub job_type: &'static str,
    pub state: JobState,
    pub total: usize,
    pub progress: Option<usize>,
    pub message: Option<String>,
    pub results: Option<Value>,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
}

/// A job status serialized straight from the record (results are not cloned).
#[derive(Serialize)]
pub struct JobView<'a> {
    id: &'a str,
    url: &'a str,
    status: &'static str,
    job_type: &'static str,
    total: usize,
    progress: Option<usize>,
    message: &'a Option<String>,
    results: &'a Option<Value>,
}

impl Job {
    pub fn view(&self) -> JobView<'_> {
        JobView {
            id: &self.id,
            url: &self.url,
            status: self.state.as_str(),
            job_type: self.job_type,
            total: self.total,
            progress: self.progress,
            message: &self.message,
            results: &self.results,
        }
    }

    /// The job list sorts by this, descending: completion time (unfinished jobs last), then
    /// creation time, then id.
    pub fn list_key(&self) -> (i64, i64, &str) {
        (self.finished_ms.unwrap_or(-1), self.created_ms, &self.id)
    }

    pub fn render(&self) -> Value {
        json!({
            "id": self.id,
            "url": self.url,
            "status": self.state.as_str(),
            "job_type": self.job_type,
            "total": self.total,
            "progress": self.progress,
            "message": self.message,
            "results": self.results,
        })
    }
}

#[derive(Debug, Default)]
pub struct JobStore {
    pub jobs: HashMap<String, Job>,
    order: VecDeque<(i64, String)>,
    pub active: usize,
}

impl JobStore {
    /// Drops jobs older than the retention window.
    pub fn sweep(&mut self, now: i64, retention_ms: i64) {
        while let Some((created, id)) = self.order.front() {
            if now - *created < retention_ms {
                break;
            }
            if self.jobs.get(id).is_some_and(|j| !j.state.is_active()) {
                self.jobs.remove(id);
            }
            self.order.pop_front();
        }
    }

    pub fn insert(&mut self, job: Job) {
        self.order.push_back((job.created_ms, job.id.clone()));
        self.active += 1;
        self.jobs.insert(job.id.clone(), job);
    }

    pub fn get(&self, id: &str, now: i64, retention_ms: i64) -> Option<&Job> {
        self.jobs
            .get(id)
            .filter(|j| j.state.is_active() || now - j.created_ms < retention_ms)
    }

    /// Newest first, as the list endpoint sorts.
    pub fn list(&self, now: i64, retention_ms: i64) -> Vec<&Job> {
        let mut v: Vec<&Job> = self
            .jobs
            .values()
            .filter(|j| j.state.is_active() || now - j.created_ms < retention_ms)
            .collect();
        v.sort_by(|a, b| b.list_key().cmp(&a.list_key()));
        v
    }
}

/// A record reference in `ids=` / `external_ids=` lists.
#[derive(Debug, Clone)]
pub enum Key {
    Id(u64),
    External(String),
}

#[derive(Debug, Clone)]
pub enum JobWork {
    Create {
        target: Target,
        items: Vec<Value>,
    },
    UpsertUsers {
        items: Vec<Value>,
    },
    UpdateBulk {
        target: Target,
        keys: Vec<Key>,
        change: Map<String, Value>,
    },
    UpdateBatch {
        target: Target,
        items: Vec<Value>,
    },
    Destroy {
        target: Target,
        keys: Vec<Key>,
    },
    TicketAsync {
        id: u64,
        item: Map<String, Value>,
    },
}

impl JobWork {
    pub fn total(&self) -> usize {
        match self {
            JobWork::Create { items, .. }
            | JobWork::UpsertUsers { items }
            | JobWork::UpdateBatch { items, .. } => items.len(),
            JobWork::UpdateBulk { keys, .. } | JobWork::Destroy { keys, .. } => keys.len(),
            JobWork::TicketAsync { .. } => 1,
        }
    }

    pub fn job_type(&self) -> &'static str {
        match self {
            JobWork::Create { .. } | JobWork::TicketAsync { .. } => "bulk_create_job",
            JobWork::UpsertUsers { .. } => "bulk_create_or_update_job",
            JobWork::UpdateBulk { .. } | JobWork::UpdateBatch { .. } => "bulk_update_job",
            JobWork::Destroy { .. } => "bulk_delete_job",
        }
    }
}

/// Switches the item runner needs.
pub struct RunOpts {
    pub index_base: usize,
    pub failed_id_is_index: bool,
    pub org_batch_by_external_id: bool,
    /// `Behavior::job_results == Verbose`: `index`, `action`, `success` and `status` on every
    /// item (the simulator's older shapes) instead of the documented ones.
    pub verbose: bool,
    /// Users create_or_update_many results echo the item's `external_id`.
    pub upsert_echoes_external_id: bool,
}

/// Builds per-item results in the documented shapes (zendesk-api.md §8) or the verbose ones.
struct Shapes<'a>(&'a RunOpts);

impl Shapes<'_> {
    /// Documented: `{"id", "index"}` (OAS CreateResourceResult).
    fn create_ok(&self, id: u64, index: usize) -> Value {
        if self.0.verbose {
            json!({"id": id, "index": index, "action": "create", "success": true, "status": "Created"})
        } else {
            json!({"id": id, "index": index})
        }
    }

    /// Documented: `{"index", "error", "details"}`.
    fn create_fail(&self, index: usize, error: &str, details: &str) -> Value {
        let mut m = Map::new();
        m.insert("index".into(), json!(index));
        if self.0.verbose {
            m.insert("action".into(), json!("create"));
            m.insert("success".into(), json!(false));
            m.insert("status".into(), json!("Failed"));
        }
        m.insert("error".into(), json!(error));
        m.insert("details".into(), json!(details));
        Value::Object(m)
    }

    /// update / delete success. Documented: `{"id", "action", "success": true, "status"}`.
    fn change_ok(
        &self,
        action: &str,
        status: &str,
        id: u64,
        index: usize,
        ext: Option<&str>,
    ) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        if self.0.verbose {
            m.insert("index".into(), json!(index));
        }
        m.insert("action".into(), json!(action));
        m.insert("success".into(), json!(true));
        m.insert("status".into(), json!(status));
        if self.0.verbose {
            if let Some(e) = ext {
                m.insert("external_id".into(), json!(e));
            }
        }
        Value::Object(m)
    }

    /// update / delete failure (OAS FailedResult): `{"id", "action", "success": false, "error",
    /// "details"}`; no `id` when the record is unknown, `external_id` instead when that was
    /// the key.
    fn change_fail(
        &self,
        action: &str,
        index: usize,
        id: Option<u64>,
        ext: Option<&str>,
        error: &str,
        details: &str,
    ) -> Value {
        let mut m = Map::new();
        match (id, ext) {
            (Some(id), _) => {
                m.insert("id".into(), json!(id));
            }
            (None, Some(e)) => {
                m.insert("external_id".into(), json!(e));
            }
            (None, None) => {}
        }
        if self.0.verbose {
            m.insert("index".into(), json!(index));
        }
        m.insert("action".into(), json!(action));
        m.insert("success".into(), json!(false));
        if self.0.verbose {
            m.insert("status".into(), json!("Failed"));
        }
        m.insert("error".into(), json!(error));
        m.insert("details".into(), json!(details));
        Value::Object(m)
    }

    fn echo(&self, m: &mut Map<String, Value>, input: Option<&Map<String, Value>>, email: bool) {
        let Some(inp) = input else { return };
        if email {
            if let Some(e) = inp.get("email").filter(|v| !v.is_null()) {
                m.insert("email".into(), e.clone());
            }
        }
        if self.0.upsert_echoes_external_id {
            if let Some(x) = inp.get("external_id").and_then(as_text) {
                m.insert("external_id".into(), json!(x));
            }
        }
    }

    /// Users create_or_update_many success. Documented: `{"id", "status", "email"?}`.
    fn upsert_ok(
        &self,
        id: u64,
        index: usize,
        created: bool,
        input: Option<&Map<String, Value>>,
    ) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(id));
        if self.0.verbose {
            m.insert("index".into(), json!(index));
        }
        m.insert(
            "status".into(),
            json!(if created { "Created" } else { "Updated" }),
        );
        if self.0.verbose {
            m.insert("success".into(), json!(true));
        }
        self.echo(&mut m, input, true);
        Value::Object(m)
    }

    /// Users create_or_update_many failure. Documented:
    /// `{"id": <input position>, "status": "Failed", "error", "details"}`.
    fn upsert_fail(
        &self,
        index: usize,
        error: &str,
        details: &str,
        input: Option<&Map<String, Value>>,
    ) -> Value {
        let mut m = Map::new();
        if self.0.failed_id_is_index {
            m.insert("id".into(), json!(index));
        }
        if self.0.verbose {
            m.insert("index".into(), json!(index));
        }
        m.insert("status".into(), json!("Failed"));
        if self.0.verbose {
            m.insert("success".into(), json!(false));
        }
        m.insert("error".into(), json!(error));
        m.insert("details".into(), json!(details));
        self.echo(&mut m, input, self.0.verbose);
        Value::Object(m)
    }
}

fn job_code(inv: &Invalid) -> &'static str {
    if inv.is_duplicate() {
        "DuplicateValue"
    } else {
        "RecordInvalid"
    }
}

fn resolve(store: &Store, target: Target, key: &Key) -> Option<u64> {
    match (target, key) {
        (Target::User, Key::Id(id)) => store.users.contains_key(id).then_some(*id),
        (Target::Organization, Key::Id(id)) => store.orgs.contains_key(id).then_some(*id),
        (Target::Ticket, Key::Id(id)) => store.tickets.contains_key(id).then_some(*id),
        (Target::User, Key::External(e)) => store.user_id_by_external(e),
        (Target::Organization, Key::External(e)) => store.org_id_by_external(e),
        (Target::Ticket, Key::External(_)) => None,
    }
}

/// The id a result names: the one sent, else the record an external id points at.
fn known_id(store: &Store, target: Target, key: &Key) -> Option<u64> {
    match key {
        Key::Id(id) => Some(*id),
        Key::External(_) => resolve(store, target, key),
    }
}

fn key_ext(key: &Key) -> Option<&str> {
    match key {
        Key::External(e) => Some(e),
        Key::Id(_) => None,
    }
}

fn update_one(
    store: &mut Store,
    ctx: &Ctx,
    target: Target,
    id: u64,
    input: &Map<String, Value>,
) -> Result<(), OpError> {
    match target {
        Target::User => store.update_user(ctx, id, input, true),
        Target::Organization => store.update_org(ctx, id, input, true),
        Target::Ticket => {
            let mut input = input.clone();
            if !ctx.behavior.ticket_batch_tag_ops {
                input.remove("additional_tags");
                input.remove("remove_tags");
            }
            store.update_ticket(ctx, id, &input)
        }
    }
}

fn update_result(
    store: &mut Store,
    ctx: &Ctx,
    sh: &Shapes,
    target: Target,
    index: usize,
    key: &Key,
    input: &Map<String, Value>,
) -> (Value, bool) {
    let ext = key_ext(key);
    let Some(id) = resolve(store, target, key) else {
        let id = match key {
            Key::Id(id) => Some(*id),
            Key::External(_) => None,
        };
        let v = sh.change_fail("update", index, id, ext, "RecordNotFound", "RecordNotFound");
        return (v, false);
    };
    match update_one(store, ctx, target, id, input) {
        Ok(()) => (sh.change_ok("update", "Updated", id, index, ext), true),
        Err(e) => {
            let (code, text) = match &e {
                OpError::NotFound => ("RecordNotFound".to_string(), "RecordNotFound".to_string()),
                OpError::Invalid(inv) => (job_code(inv).to_string(), inv.text()),
                OpError::Conflict => (
                    "UpdateConflict".to_string(),
                    "Safe Update prevented the update due to outdated ticket data".to_string(),
                ),
            };
            let v = sh.change_fail("update", index, Some(id), ext, &code, &text);
            (v, false)
        }
    }
}

/// Applies a job's items to the store. `failing[i]` forces item `i` to fail (fault injection).
/// `limit` stops after that many items (a killed job). Returns results (one per item applied,
/// in input order) and the failure count.
pub fn run_work(
    store: &mut Store,
    ctx: &Ctx,
    work: &JobWork,
    failing: &[Option<(String, String)>],
    opts: &RunOpts,
    limit: usize,
) -> (Vec<Value>, usize) {
    let mut out = Vec::with_capacity(work.total().min(limit));
    let mut failures = 0;
    let forced = |i: usize| failing.get(i).and_then(|f| f.as_ref());
    let base = opts.index_base;
    let sh = Shapes(opts);
    let mut record = |v: Value, ok: bool, out: &mut Vec<Value>| {
        if !ok {
            failures += 1;
        }
        out.push(v);
    };
    const INVALID: (&str, &str) = ("RecordInvalid", "Record validation errors");
    match work {
        JobWork::Create { target, items } => {
            for (i, item) in items.iter().enumerate().take(limit) {
                let index = i + base;
                if let Some((e, d)) = forced(i) {
                    record(sh.create_fail(index, e, d), false, &mut out);
                    continue;
                }
                let Some(input) = item.as_object() else {
                    record(sh.create_fail(index, INVALID.0, INVALID.1), false, &mut out);
                    continue;
                };
                let res = match target {
                    Target::User => store.create_user(ctx, input),
                    Target::Organization => store.create_org(ctx, input),
                    Target::Ticket => store.create_ticket(ctx, input),
                };
                match res {
                    Ok(id) => record(sh.create_ok(id, index), true, &mut out),
                    Err(inv) => record(
                        sh.create_fail(index, job_code(&inv), &inv.text()),
                        false,
                        &mut out,
                    ),
                }
            }
        }
        JobWork::UpsertUsers { items } => {
            for (i, item) in items.iter().enumerate().take(limit) {
                let index = i + base;
                let input = item.as_object();
                if let Some((e, d)) = forced(i) {
                    record(sh.upsert_fail(index, e, d, input), false, &mut out);
                    continue;
                }
                let Some(inp) = input else {
                    record(
                        sh.upsert_fail(index, "UserUpdateError", INVALID.1, input),
                        false,
                        &mut out,
                    );
                    continue;
                };
                match store.upsert_user(ctx, inp) {
                    Ok(up) => record(
                        sh.upsert_ok(up.id, index, up.created, input),
                        true,
                        &mut out,
                    ),
                    Err(inv) => record(
                        sh.upsert_fail(index, "UserUpdateError", &inv.text(), input),
                        false,
                        &mut out,
                    ),
                }
            }
        }
        JobWork::UpdateBulk {
            target,
            keys,
            change,
        } => {
            for (i, key) in keys.iter().enumerate().take(limit) {
                let index = i + base;
                if let Some((e, d)) = forced(i) {
                    let id = known_id(store, *target, key);
                    let v = sh.change_fail("update", index, id, key_ext(key), e, d);
                    record(v, false, &mut out);
                    continue;
                }
                let (v, ok) = update_result(store, ctx, &sh, *target, index, key, change);
                record(v, ok, &mut out);
            }
        }
        JobWork::UpdateBatch { target, items } => {
            for (i, item) in items.iter().enumerate().take(limit) {
                let index = i + base;
                let Some(input) = item.as_object() else {
                    let v = sh.change_fail("update", index, None, None, INVALID.0, INVALID.1);
                    record(v, false, &mut out);
                    continue;
                };
                let by_ext = match target {
                    Target::User => true,
                    Target::Organization => opts.org_batch_by_external_id,
                    Target::Ticket => false,
                };
                let key = match input.get("id").and_then(as_id) {
                    Some(id) => Some(Key::Id(id)),
                    None if by_ext => input
                        .get("external_id")
                        .and_then(as_text)
                        .map(Key::External),
                    None => None,
                };
                if let Some((e, d)) = forced(i) {
                    let id = key.as_ref().and_then(|k| known_id(store, *target, k));
                    let ext = key.as_ref().and_then(key_ext);
                    record(
                        sh.change_fail("update", index, id, ext, e, d),
                        false,
                        &mut out,
                    );
                    continue;
                }
                let Some(key) = key else {
                    let v = sh.change_fail(
                        "update",
                        index,
                        None,
                        None,
                        "RecordNotFound",
                        "RecordNotFound",
                    );
                    record(v, false, &mut out);
                    continue;
                };
                let mut input = input.clone();
                input.remove("id");
                let (v, ok) = update_result(store, ctx, &sh, *target, index, &key, &input);
                record(v, ok, &mut out);
            }
        }
        JobWork::Destroy { target, keys } => {
            for (i, key) in keys.iter().enumerate().take(limit) {
                let index = i + base;
                let ext = key_ext(key);
                if let Some((e, d)) = forced(i) {
                    let id = known_id(store, *target, key);
                    record(
                        sh.change_fail("delete", index, id, ext, e, d),
                        false,
                        &mut out,
                    );
                    continue;
                }
                let id = resolve(store, *target, key);
                let deleted = id.filter(|id| match target {
                    Target::User => store.delete_user(*id).is_some(),
                    Target::Organization => store.delete_org(*id).is_some(),
                    Target::Ticket => store.delete_ticket(*id, &ctx.now).is_some(),
                });
                match deleted {
                    Some(id) => record(
                        sh.change_ok("delete", "Deleted", id, index, None),
                        true,
                        &mut out,
                    ),
                    None => {
                        let id = match key {
                            Key::Id(id) => Some(*id),
                            Key::External(_) => None,
                        };
                        let v = sh.change_fail(
                            "delete",
                            index,
                            id,
                            ext,
                            "RecordNotFound",
                            "RecordNotFound",
                        );
                        record(v, false, &mut out);
                    }
                }
            }
        }
        JobWork::TicketAsync { id, item } => {
            if limit > 0 {
                if let Some((e, d)) = forced(0) {
                    record(sh.create_fail(base, e, d), false, &mut out);
                } else {
                    match store.create_ticket_with_id(ctx, *id, item) {
                        Ok(id) => record(sh.create_ok(id, base), true, &mut out),
                        Err(inv) => record(
                            sh.create_fail(base, job_code(&inv), &inv.text()),
                            false,
                            &mut out,
                        ),
                    }
                }
            }
        }
    }
    (out, failures)
}

/// `Completed at 2018-03-08 10:07:04 +0000`.
pub fn completed_message(now_ms: i64) -> String {
    format!("Completed at {}", job_message_time(now_ms))
}

/// 32 hex characters derived from a counter (splitmix64), so ids look like Zendesk's and are
/// reproducible for a given seed.
pub fn job_id(seed: u64, n: u64) -> String {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let a = mix(seed ^ n.wrapping_mul(2));
    let b = mix(a ^ n.wrapping_mul(2).wrapping_add(1));
    format!("{a:016x}{b:016x}")
}
