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
        v.sort_by(|a, b| {
            b.finished_ms
                .cmp(&a.finished_ms)
                .then(b.created_ms.cmp(&a.created_ms))
        });
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
}

fn failed(index: usize, action: &str, error: &str, details: &str) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("index".into(), json!(index));
    m.insert("action".into(), json!(action));
    m.insert("success".into(), json!(false));
    m.insert("status".into(), json!("Failed"));
    m.insert("error".into(), json!(error));
    m.insert("details".into(), json!(details));
    m
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
    target: Target,
    index: usize,
    key: &Key,
    input: &Map<String, Value>,
) -> (Value, bool) {
    let ext = match key {
        Key::External(e) => Some(e.clone()),
        Key::Id(_) => None,
    };
    let Some(id) = resolve(store, target, key) else {
        let mut m = failed(index, "update", "RecordNotFound", "RecordNotFound");
        match key {
            Key::Id(id) => {
                m.insert("id".into(), json!(id));
            }
            Key::External(e) => {
                m.insert("external_id".into(), json!(e));
            }
        }
        return (Value::Object(m), false);
    };
    match update_one(store, ctx, target, id, input) {
        Ok(()) => {
            let mut m = Map::new();
            m.insert("id".into(), json!(id));
            m.insert("index".into(), json!(index));
            m.insert("action".into(), json!("update"));
            m.insert("success".into(), json!(true));
            m.insert("status".into(), json!("Updated"));
            if let Some(e) = ext {
                m.insert("external_id".into(), json!(e));
            }
            (Value::Object(m), true)
        }
        Err(e) => {
            let (code, text) = match &e {
                OpError::NotFound => ("RecordNotFound".to_string(), "RecordNotFound".to_string()),
                OpError::Invalid(inv) => (job_code(inv).to_string(), inv.text()),
                OpError::Conflict => (
                    "UpdateConflict".to_string(),
                    "Safe Update prevented the update due to outdated ticket data".to_string(),
                ),
            };
            let mut m = failed(index, "update", &code, &text);
            m.insert("id".into(), json!(id));
            (Value::Object(m), false)
        }
    }
}

/// Applies a job's items to the store. `failing[i]` forces item `i` to fail (fault injection).
/// `limit` stops after that many items (a killed job). Returns results and the failure count.
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
    let mut record = |v: Value, ok: bool, out: &mut Vec<Value>| {
        if !ok {
            failures += 1;
        }
        out.push(v);
    };
    let not_object = |i: usize, action: &str| {
        Value::Object(failed(
            i,
            action,
            "RecordInvalid",
            "Record validation errors",
        ))
    };
    match work {
        JobWork::Create { target, items } => {
            for (i, item) in items.iter().enumerate().take(limit) {
                let index = i + base;
                if let Some((e, d)) = forced(i) {
                    record(
                        Value::Object(failed(index, "create", e, d)),
                        false,
                        &mut out,
                    );
                    continue;
                }
                let Some(input) = item.as_object() else {
                    record(not_object(index, "create"), false, &mut out);
                    continue;
                };
                let res = match target {
                    Target::User => store.create_user(ctx, input),
                    Target::Organization => store.create_org(ctx, input),
                    Target::Ticket => store.create_ticket(ctx, input),
                };
                match res {
                    Ok(id) => record(
                        json!({"id": id, "index": index, "action": "create", "success": true, "status": "Created"}),
                        true,
                        &mut out,
                    ),
                    Err(inv) => record(
                        Value::Object(failed(index, "create", job_code(&inv), &inv.text())),
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
                let echo = |m: &mut Map<String, Value>| {
                    if let Some(inp) = input {
                        if let Some(e) = inp.get("email").filter(|v| !v.is_null()) {
                            m.insert("email".into(), e.clone());
                        }
                        if let Some(x) = inp.get("external_id").and_then(as_text) {
                            m.insert("external_id".into(), json!(x));
                        }
                    }
                };
                let fail = |code: &str, details: &str| {
                    let mut m = Map::new();
                    if opts.failed_id_is_index {
                        m.insert("id".into(), json!(index));
                    }
                    m.insert("index".into(), json!(index));
                    m.insert("status".into(), json!("Failed"));
                    m.insert("success".into(), json!(false));
                    m.insert("error".into(), json!(code));
                    m.insert("details".into(), json!(details));
                    echo(&mut m);
                    Value::Object(m)
                };
                if let Some((e, d)) = forced(i) {
                    record(fail(e, d), false, &mut out);
                    continue;
                }
                let Some(inp) = input else {
                    record(
                        fail("UserUpdateError", "Record validation errors"),
                        false,
                        &mut out,
                    );
                    continue;
                };
                match store.upsert_user(ctx, inp) {
                    Ok(up) => {
                        let mut m = Map::new();
                        m.insert("id".into(), json!(up.id));
                        m.insert("index".into(), json!(index));
                        m.insert(
                            "status".into(),
                            json!(if up.created { "Created" } else { "Updated" }),
                        );
                        m.insert("success".into(), json!(true));
                        echo(&mut m);
                        record(Value::Object(m), true, &mut out);
                    }
                    Err(inv) => record(fail("UserUpdateError", &inv.text()), false, &mut out),
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
                    let mut m = failed(index, "update", e, d);
                    if let Key::Id(id) = key {
                        m.insert("id".into(), json!(id));
                    }
                    record(Value::Object(m), false, &mut out);
                    continue;
                }
                let (v, ok) = update_result(store, ctx, *target, index, key, change);
                record(v, ok, &mut out);
            }
        }
        JobWork::UpdateBatch { target, items } => {
            for (i, item) in items.iter().enumerate().take(limit) {
                let index = i + base;
                let Some(input) = item.as_object() else {
                    record(not_object(index, "update"), false, &mut out);
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
                    let mut m = failed(index, "update", e, d);
                    if let Some(Key::Id(id)) = &key {
                        m.insert("id".into(), json!(id));
                    }
                    record(Value::Object(m), false, &mut out);
                    continue;
                }
                let Some(key) = key else {
                    record(
                        Value::Object(failed(index, "update", "RecordNotFound", "RecordNotFound")),
                        false,
                        &mut out,
                    );
                    continue;
                };
                let mut input = input.clone();
                input.remove("id");
                let (v, ok) = update_result(store, ctx, *target, index, &key, &input);
                record(v, ok, &mut out);
            }
        }
        JobWork::Destroy { target, keys } => {
            for (i, key) in keys.iter().enumerate().take(limit) {
                let index = i + base;
                if let Some((e, d)) = forced(i) {
                    let mut m = failed(index, "delete", e, d);
                    if let Key::Id(id) = key {
                        m.insert("id".into(), json!(id));
                    }
                    record(Value::Object(m), false, &mut out);
                    continue;
                }
                let id = resolve(store, *target, key);
                let deleted = id.is_some_and(|id| match target {
                    Target::User => store.delete_user(id).is_some(),
                    Target::Organization => store.delete_org(id).is_some(),
                    Target::Ticket => store.delete_ticket(id).is_some(),
                });
                if deleted {
                    record(
                        json!({"id": id, "index": index, "action": "delete", "success": true, "status": "Deleted"}),
                        true,
                        &mut out,
                    );
                } else {
                    let mut m = failed(index, "delete", "RecordNotFound", "RecordNotFound");
                    match key {
                        Key::Id(id) => m.insert("id".into(), json!(id)),
                        Key::External(e) => m.insert("external_id".into(), json!(e)),
                    };
                    record(Value::Object(m), false, &mut out);
                }
            }
        }
        JobWork::TicketAsync { id, item } => {
            if limit > 0 {
                if let Some((e, d)) = forced(0) {
                    record(Value::Object(failed(base, "create", e, d)), false, &mut out);
                } else {
                    match store.create_ticket_with_id(ctx, *id, item) {
                        Ok(id) => record(
                            json!({"id": id, "index": base, "action": "create", "success": true, "status": "Created"}),
                            true,
                            &mut out,
                        ),
                        Err(inv) => record(
                            Value::Object(failed(base, "create", job_code(&inv), &inv.text())),
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
