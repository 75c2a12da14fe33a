//! The shared Zendesk budget (see `zendesk::budget`) in a DynamoDB table, so every Lambda of a
//! deployment and every sync of one account take from one budget.
//!
//! Table: partition key `pk` (S), sort key `sk` (S), on-demand, TTL on `ttl`. Per account `pk`:
//! - `sk = "window"`: the current window `w` and the requests `u` taken from it, changed only by
//!   conditional updates (the window's count never passes its cap);
//! - `sk = "jobs"`: the map `held` of job slot holders to their lease end (unix ms), taken
//!   with a condition on the map's size, so the account's open jobs never pass the cap; and the
//!   map `ids` of holders to the Zendesk job they submitted, so any writer can poll them; and
//!   `kp`, when a writer last claimed the poll of those jobs (unix ms).
//!
//! - `sk = "done#<job>"`: a finished job's status `st` (JSON, as Zendesk answered it) kept by
//!   the writer that polled it for the writer that submitted it; `ttl` an hour on.
//!
//! The account's items carry `ttl` so DynamoDB removes them a day after their last use.

use crate::zendesk::budget::{
    keepable_job_id, BudgetStore, OpenJob, DONE_KEPT, DONE_MAX_BYTES, JOB_LEASE,
};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use std::io;
use std::sync::Arc;

/// The budget table of a deployment.
#[derive(Clone)]
pub struct DynamoBudget {
    client: Client,
    table: String,
    handle: tokio::runtime::Handle,
    _rt: Arc<super::OwnedRuntime>,
}

impl std::fmt::Debug for DynamoBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dynamodb:{}", self.table)
    }
}

/// Items outlive their use by a day, then DynamoDB's TTL removes them.
const ITEM_TTL_SECS: u64 = 24 * 3600;

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn ttl() -> AttributeValue {
    n(crate::zendesk::budget::unix_ms() / 1000 + ITEM_TTL_SECS)
}

fn err<E: std::fmt::Debug>(op: &str, table: &str, e: E) -> io::Error {
    io::Error::other(format!("DynamoDB {op} on table {table}: {e:?}"))
}

impl DynamoBudget {
    /// The table `table`, with the SDK configured as `config` says (region, endpoint).
    pub fn new(table: &str, config: super::AwsConfig) -> io::Result<Self> {
        if table.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the budget table name is empty",
            ));
        }
        let (rt, handle, shared) = super::own_runtime(&config, "zdsync-dynamodb", 1)?;
        Ok(DynamoBudget {
            client: Client::new(&shared),
            table: table.to_string(),
            handle,
            _rt: rt,
        })
    }

    /// Create the table as the template declares it (tests, local emulators).
    pub fn create_table(&self) -> io::Result<()> {
        use aws_sdk_dynamodb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(io::Error::other)
        };
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(io::Error::other)
        };
        let req = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?);
        self.handle
            .block_on(req.send())
            .map(|_| ())
            .map_err(|e| err("CreateTable", &self.table, e))
    }

    /// How many requests of `window` are taken, as a consistent read sees it.
    fn used(&self, account: &str, window: u64) -> io::Result<Option<u64>> {
        let got = self
            .handle
            .block_on(
                self.client
                    .get_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("window"))
                    .consistent_read(true)
                    .send(),
            )
            .map_err(|e| err("GetItem", &self.table, e))?;
        let num = |name: &str| -> Option<u64> {
            got.item()
                .and_then(|i| i.get(name))
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse().ok())
        };
        Ok(match num("w") {
            Some(w) if w == window => Some(num("u").unwrap_or(0)),
            Some(w) if w > window => Some(u64::MAX),
            _ => None,
        })
    }
}

/// Whether an SDK error is a failed condition (another writer got there first).
fn conditional<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

impl BudgetStore for DynamoBudget {
    fn take(&self, account: &str, window: u64, want: u32, cap: u32, floor: u32) -> io::Result<u32> {
        let floor = floor.min(cap);
        let mut want = want.min(cap);
        for _ in 0..6 {
            if want == 0 {
                return Ok(0);
            }
            // Requests below the floor nobody took are forfeit: the count starts there.
            if floor > 0 {
                let want_here = want.min(cap - floor);
                let raised = self.handle.block_on(
                    self.client
                        .update_item()
                        .table_name(&self.table)
                        .key("pk", s(account))
                        .key("sk", s("window"))
                        .update_expression("SET u = :u, #ttl = :ttl")
                        .condition_expression("w = :w AND u < :floor")
                        .expression_attribute_names("#ttl", "ttl")
                        .expression_attribute_values(":u", n((floor + want_here).into()))
                        .expression_attribute_values(":w", n(window))
                        .expression_attribute_values(":floor", n(floor.into()))
                        .expression_attribute_values(":ttl", ttl())
                        .send(),
                );
                match raised {
                    Ok(_) => return Ok(want_here),
                    Err(e) if e.as_service_error().is_some_and(conditional) => {}
                    Err(e) => return Err(err("UpdateItem", &self.table, e)),
                }
            }
            // The current window has room for `want`.
            let more = self.handle.block_on(
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("window"))
                    .update_expression("SET u = u + :n, #ttl = :ttl")
                    .condition_expression("w = :w AND u <= :room")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":n", n(want.into()))
                    .expression_attribute_values(":w", n(window))
                    .expression_attribute_values(":room", n((cap - want).into()))
                    .expression_attribute_values(":ttl", ttl())
                    .send(),
            );
            match more {
                Ok(_) => return Ok(want),
                Err(e) if e.as_service_error().is_some_and(conditional) => {}
                Err(e) => return Err(err("UpdateItem", &self.table, e)),
            }
            // A new window (or the first): start it with `want`.
            let start = self.handle.block_on(
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("window"))
                    .update_expression("SET w = :w, u = :n, #ttl = :ttl")
                    .condition_expression("attribute_not_exists(w) OR w < :w")
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":n", n((floor + want.min(cap - floor)).into()))
                    .expression_attribute_values(":w", n(window))
                    .expression_attribute_values(":ttl", ttl())
                    .send(),
            );
            match start {
                Ok(_) => return Ok(want.min(cap - floor)),
                Err(e) if e.as_service_error().is_some_and(conditional) => {}
                Err(e) => return Err(err("UpdateItem", &self.table, e)),
            }
            // This window exists with too little room for `want`: ask for what is left.
            match self.used(account, window)? {
                Some(used) => want = (u64::from(cap).saturating_sub(used)).min(want.into()) as u32,
                None => continue,
            }
        }
        Ok(0)
    }

    fn take_job(
        &self,
        account: &str,
        holder: &str,
        max: u32,
        until_ms: u64,
        now_ms: u64,
    ) -> io::Result<Option<u32>> {
        for _ in 0..4 {
            // A free slot: the holders' map has fewer than `max` entries.
            let took = self.handle.block_on(
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("jobs"))
                    .update_expression("SET held.#k = :until, #ttl = :ttl")
                    .condition_expression("attribute_exists(held) AND size(held) < :max")
                    .expression_attribute_names("#k", holder)
                    .expression_attribute_names("#ttl", "ttl")
                    .expression_attribute_values(":until", n(until_ms))
                    .expression_attribute_values(":max", n(max.into()))
                    .expression_attribute_values(":ttl", ttl())
                    .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
                    .send(),
            );
            match took {
                Ok(out) => {
                    let held = out
                        .attributes()
                        .and_then(|a| a.get("held"))
                        .and_then(|v| v.as_m().ok())
                        .map_or(1, |m| m.len() as u32);
                    return Ok(Some(held));
                }
                Err(e) if e.as_service_error().is_some_and(conditional) => {}
                Err(e) => return Err(err("UpdateItem", &self.table, e)),
            }
            // Full, or no map yet: look at the holders.
            let got = self
                .handle
                .block_on(
                    self.client
                        .get_item()
                        .table_name(&self.table)
                        .key("pk", s(account))
                        .key("sk", s("jobs"))
                        .consistent_read(true)
                        .send(),
                )
                .map_err(|e| err("GetItem", &self.table, e))?;
            let held = got
                .item()
                .and_then(|i| i.get("held"))
                .and_then(|v| v.as_m().ok());
            let Some(held) = held else {
                let first = self.handle.block_on(
                    self.client
                        .update_item()
                        .table_name(&self.table)
                        .key("pk", s(account))
                        .key("sk", s("jobs"))
                        .update_expression("SET held = :m, ids = :e, #ttl = :ttl")
                        .condition_expression("attribute_not_exists(held)")
                        .expression_attribute_names("#ttl", "ttl")
                        .expression_attribute_values(
                            ":m",
                            AttributeValue::M([(holder.to_string(), n(until_ms))].into()),
                        )
                        .expression_attribute_values(":e", AttributeValue::M(Default::default()))
                        .expression_attribute_values(":ttl", ttl())
                        .send(),
                );
                match first {
                    Ok(_) => return Ok(Some(1)),
                    Err(e) if e.as_service_error().is_some_and(conditional) => continue,
                    Err(e) => return Err(err("UpdateItem", &self.table, e)),
                }
            };
            // Leases of writers that died: remove them, then try again.
            let expired: Vec<String> = held
                .iter()
                .filter(|(_, v)| {
                    v.as_n()
                        .ok()
                        .and_then(|x| x.parse::<u64>().ok())
                        .is_none_or(|until| until <= now_ms)
                })
                .map(|(k, _)| k.clone())
                .take(25)
                .collect();
            if expired.is_empty() {
                return Ok(None);
            }
            self.end_jobs(account, &expired)?;
        }
        Ok(None)
    }

    fn job_started(&self, account: &str, holder: &str, job: &str) -> io::Result<()> {
        let set = self.handle.block_on(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(account))
                .key("sk", s("jobs"))
                .update_expression("SET ids.#k = :j")
                .condition_expression("attribute_exists(held.#k) AND attribute_exists(ids)")
                .expression_attribute_names("#k", holder)
                .expression_attribute_values(":j", s(job))
                .send(),
        );
        match set {
            // The lease is gone (run out, or freed by a writer that saw the job finish).
            Err(e) if e.as_service_error().is_some_and(conditional) => Ok(()),
            other => other
                .map(|_| ())
                .map_err(|e| err("UpdateItem", &self.table, e)),
        }
    }

    fn open_jobs(&self, account: &str, now_ms: u64) -> io::Result<Vec<OpenJob>> {
        let got = self
            .handle
            .block_on(
                self.client
                    .get_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("jobs"))
                    .send(),
            )
            .map_err(|e| err("GetItem", &self.table, e))?;
        let Some(item) = got.item() else {
            return Ok(Vec::new());
        };
        let map = |k: &str| item.get(k).and_then(|v| v.as_m().ok());
        let (Some(held), Some(ids)) = (map("held"), map("ids")) else {
            return Ok(Vec::new());
        };
        let lease = JOB_LEASE.as_millis() as u64;
        Ok(ids
            .iter()
            .filter_map(|(holder, job)| {
                let until = held.get(holder)?.as_n().ok()?.parse::<u64>().ok()?;
                let job = job.as_s().ok()?.clone();
                (until > now_ms).then(|| OpenJob {
                    holder: holder.clone(),
                    job,
                    since_ms: until.saturating_sub(lease),
                })
            })
            .collect())
    }

    fn end_jobs(&self, account: &str, holders: &[String]) -> io::Result<()> {
        for part in holders.chunks(50) {
            let remove = |with_ids: bool| {
                let mut req = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("jobs"));
                let mut paths = Vec::new();
                for (i, h) in part.iter().enumerate() {
                    req = req.expression_attribute_names(format!("#h{i}"), h.as_str());
                    paths.push(format!("held.#h{i}"));
                    if with_ids {
                        paths.push(format!("ids.#h{i}"));
                    }
                }
                req = req.update_expression(format!("REMOVE {}", paths.join(", ")));
                if with_ids {
                    req = req.condition_expression("attribute_exists(ids)");
                }
                // Ok(false): the condition failed.
                match self.handle.block_on(req.send()) {
                    Ok(_) => Ok(true),
                    Err(e) if e.as_service_error().is_some_and(conditional) => Ok(false),
                    Err(e) => Err(err("UpdateItem", &self.table, e)),
                }
            };
            // An item written before jobs were recorded has no `ids` map.
            if !remove(true)? {
                remove(false)?;
            }
        }
        Ok(())
    }

    fn claim_poll(&self, account: &str, now_ms: u64, every_ms: u64) -> io::Result<bool> {
        let claimed = self.handle.block_on(
            self.client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(account))
                .key("sk", s("jobs"))
                .update_expression("SET kp = :now")
                .condition_expression("attribute_not_exists(kp) OR kp <= :before")
                .expression_attribute_values(":now", n(now_ms))
                .expression_attribute_values(":before", n(now_ms.saturating_sub(every_ms)))
                .send(),
        );
        match claimed {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(conditional) => Ok(false),
            Err(e) => Err(err("UpdateItem", &self.table, e)),
        }
    }

    fn put_done(&self, account: &str, done: &[(String, String)]) -> io::Result<()> {
        use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
        let until = n(crate::zendesk::budget::unix_ms() / 1000 + DONE_KEPT.as_secs());
        let puts: Vec<WriteRequest> = done
            .iter()
            .filter(|(job, status)| keepable_job_id(job) && status.len() <= DONE_MAX_BYTES)
            .map(|(job, status)| {
                let item = PutRequest::builder()
                    .item("pk", s(account))
                    .item("sk", s(&format!("done#{job}")))
                    .item("st", s(status))
                    .item("ttl", until.clone())
                    .build()
                    .map_err(|e| err("BatchWriteItem", &self.table, e))?;
                Ok(WriteRequest::builder().put_request(item).build())
            })
            .collect::<io::Result<_>>()?;
        for part in puts.chunks(25) {
            // Items DynamoDB leaves unprocessed are not retried: their writers poll themselves.
            self.handle
                .block_on(
                    self.client
                        .batch_write_item()
                        .request_items(&self.table, part.to_vec())
                        .send(),
                )
                .map_err(|e| err("BatchWriteItem", &self.table, e))?;
        }
        Ok(())
    }

    fn take_done(&self, account: &str, jobs: &[String]) -> io::Result<Vec<(String, String)>> {
        use aws_sdk_dynamodb::types::KeysAndAttributes;
        let keys: Vec<_> = jobs
            .iter()
            .filter(|j| keepable_job_id(j))
            .map(|j| {
                std::collections::HashMap::from([
                    ("pk".to_string(), s(account)),
                    ("sk".to_string(), s(&format!("done#{j}"))),
                ])
            })
            .collect();
        let mut out = Vec::new();
        for part in keys.chunks(100) {
            let wanted = KeysAndAttributes::builder()
                .set_keys(Some(part.to_vec()))
                .projection_expression("sk, st")
                .build()
                .map_err(|e| err("BatchGetItem", &self.table, e))?;
            let got = self
                .handle
                .block_on(
                    self.client
                        .batch_get_item()
                        .request_items(&self.table, wanted)
                        .send(),
                )
                .map_err(|e| err("BatchGetItem", &self.table, e))?;
            // Kept items expire by TTL: another writer cannot mistake them for its own jobs.
            for item in got
                .responses()
                .and_then(|r| r.get(&self.table))
                .into_iter()
                .flatten()
            {
                let sk = item.get("sk").and_then(|v| v.as_s().ok());
                let st = item.get("st").and_then(|v| v.as_s().ok());
                if let (Some(job), Some(st)) = (sk.and_then(|k| k.strip_prefix("done#")), st) {
                    out.push((job.to_string(), st.clone()));
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("dynamodb:{}", self.table)
    }
}
