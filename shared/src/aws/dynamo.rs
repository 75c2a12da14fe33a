//! The shared Zendesk budget (see `zendesk::budget`) in a DynamoDB table, so every Lambda of a
//! deployment and every sync of one account take from one budget.
//!
//! Table: partition key `pk` (S), sort key `sk` (S), on-demand, TTL on `ttl`. Per account `pk`:
//! - `sk = "window"`: the current window `w` and the requests `u` taken from it, changed only by
//!   conditional updates (the window's count never passes its cap);
//! - `sk = "jobs"`: the map `held` of job slot holders to their lease end (unix ms), taken
//!   with a condition on the map's size, so the account's open jobs never pass the cap.
//!
//! Both carry `ttl` so DynamoDB removes an account's items a day after their last use.

use crate::zendesk::budget::BudgetStore;
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
    fn take(&self, account: &str, window: u64, want: u32, cap: u32) -> io::Result<u32> {
        let mut want = want.min(cap);
        for _ in 0..6 {
            if want == 0 {
                return Ok(0);
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
                    .expression_attribute_values(":n", n(want.into()))
                    .expression_attribute_values(":w", n(window))
                    .expression_attribute_values(":ttl", ttl())
                    .send(),
            );
            match start {
                Ok(_) => return Ok(want),
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
    ) -> io::Result<bool> {
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
                    .send(),
            );
            match took {
                Ok(_) => return Ok(true),
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
                        .update_expression("SET held = :m, #ttl = :ttl")
                        .condition_expression("attribute_not_exists(held)")
                        .expression_attribute_names("#ttl", "ttl")
                        .expression_attribute_values(
                            ":m",
                            AttributeValue::M([(holder.to_string(), n(until_ms))].into()),
                        )
                        .expression_attribute_values(":ttl", ttl())
                        .send(),
                );
                match first {
                    Ok(_) => return Ok(true),
                    Err(e) if e.as_service_error().is_some_and(conditional) => continue,
                    Err(e) => return Err(err("UpdateItem", &self.table, e)),
                }
            };
            // Leases of writers that died: remove them, then try again.
            let expired: Vec<&String> = held
                .iter()
                .filter(|(_, v)| {
                    v.as_n()
                        .ok()
                        .and_then(|x| x.parse::<u64>().ok())
                        .is_none_or(|until| until <= now_ms)
                })
                .map(|(k, _)| k)
                .take(25)
                .collect();
            if expired.is_empty() {
                return Ok(false);
            }
            let mut req = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(account))
                .key("sk", s("jobs"));
            let mut paths = Vec::new();
            for (i, k) in expired.iter().enumerate() {
                req = req.expression_attribute_names(format!("#e{i}"), k.as_str());
                paths.push(format!("held.#e{i}"));
            }
            self.handle
                .block_on(
                    req.update_expression(format!("REMOVE {}", paths.join(", ")))
                        .send(),
                )
                .map_err(|e| err("UpdateItem", &self.table, e))?;
        }
        Ok(false)
    }

    fn end_job(&self, account: &str, holder: &str) -> io::Result<()> {
        self.handle
            .block_on(
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .key("pk", s(account))
                    .key("sk", s("jobs"))
                    .update_expression("REMOVE held.#k")
                    .expression_attribute_names("#k", holder)
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| err("UpdateItem", &self.table, e))
    }

    fn describe(&self) -> String {
        format!("dynamodb:{}", self.table)
    }
}
