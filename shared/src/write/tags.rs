//! Audience tag operations: add or remove the sync's tag on users or organizations.
//!
//! Zendesk has no bulk tag add/remove for users and organizations, so two routes exist
//! (`[audience] tag_writes`):
//! - `bulk`: `show_many` (100 records a call) reads each record's tags, then one batch
//!   `update_many` job sends each record's full list (its tags plus or minus ours). A record whose
//!   list already says what we want is confirmed without a write. A tag someone else adds between
//!   the read and the job is lost: the job replaces the list it was given.
//! - `per_record`: one `PUT` (add) or `DELETE` (remove) on `/{users|organizations}/{id}/tags` per
//!   record. It never replaces a list, and costs one request per record.
//!
//! Records are found by the Zendesk id zdsync recorded, else by external_id (`show_many`), else
//! (users with an email column) by email. A record not found is a failed row, tried again next run.

use super::{map_results, parse_job, Outcome, WriteError, Writer};
use crate::changeset::{Action, ChunkRow, Op};
use crate::config::TagWrites;
use crate::fields::Object;
use crate::zendesk::{Idempotency, ZendeskError};
use futures::stream::{self, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Per-record tag requests in flight at once within a batch (the client's budget paces them).
const PER_RECORD_CONCURRENCY: usize = 8;

/// A record found in Zendesk: its id, and its tags when they were read.
struct Found {
    id: u64,
    tags: Option<Vec<String>>,
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn tags_of(rec: &Value) -> Option<Vec<String>> {
    rec.get("tags")?.as_array().map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    })
}

impl Writer {
    fn tag(&self) -> &str {
        self.audience.as_ref().map_or("", |a| a.tag.as_str())
    }

    fn tag_route(&self) -> TagWrites {
        self.audience
            .as_ref()
            .map_or(TagWrites::default(), |a| a.tag_writes)
    }

    /// The rows of an `add` / `remove` chunk.
    pub(super) async fn tag_rows(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        op: Op,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let known: HashMap<usize, u64> = idx
            .iter()
            .filter_map(|&k| rows[k].zendesk_id.filter(|&id| id != 0).map(|id| (k, id)))
            .collect();
        self.apply_tag(rows, idx, &known, op, out).await
    }

    /// Audience upsert: add the tag to the records the object write confirmed. A row whose tag
    /// is not added fails as a whole, so next run sends it (and its tag) again.
    pub(super) async fn tag_written(
        &self,
        rows: &[ChunkRow],
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let mut known = HashMap::new();
        let mut idx = Vec::new();
        for (k, o) in out.iter().enumerate() {
            if let Some(Outcome::Confirmed { id, .. }) = o {
                known.insert(k, *id);
                idx.push(k);
            }
        }
        if idx.is_empty() {
            return Ok(());
        }
        let mut tagged: Vec<Option<Outcome>> = vec![None; rows.len()];
        self.apply_tag(rows, &idx, &known, Op::Add, &mut tagged)
            .await?;
        for &k in &idx {
            if let Some(Outcome::Failed { code, reason }) = tagged[k].take() {
                out[k] = Some(Outcome::Failed {
                    code,
                    reason: format!(
                        "the record was written but the `{}` tag was not added ({reason}); the row is sent again next run",
                        self.tag()
                    ),
                });
            }
        }
        Ok(())
    }

    async fn apply_tag(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        known: &HashMap<usize, u64>,
        op: Op,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let route = self.tag_route();
        let found = self
            .find_records(rows, idx, known, route == TagWrites::Bulk)
            .await?;
        let verb = if op == Op::Add { "added" } else { "removed" };
        for &k in idx {
            if found.contains_key(&k) {
                continue;
            }
            let email = rows[k]
                .email
                .as_deref()
                .map(|e| format!(" nor email `{e}`"))
                .unwrap_or_default();
            out[k] = Some(Outcome::Failed {
                code: "RecordNotFound".into(),
                reason: format!(
                    "no {} with external_id `{}`{email} exists in Zendesk, so the `{}` tag cannot be {verb}; the row is tried again next run",
                    self.object.as_str().trim_end_matches('s'),
                    rows[k].key,
                    self.tag()
                ),
            });
        }
        match route {
            TagWrites::Bulk => self.tags_bulk(rows, idx, &found, op, out).await,
            TagWrites::PerRecord => self.tags_per_record(idx, &found, op, out).await,
        }
    }

    /// Find the rows' records: by the known id, else by external_id, else (users) by email.
    /// With `read_tags`, every record is read (ids included) so its tag list is known.
    async fn find_records(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        known: &HashMap<usize, u64>,
        read_tags: bool,
    ) -> Result<HashMap<usize, Found>, WriteError> {
        let plural = self.object.as_str();
        let mut found: HashMap<usize, Found> = HashMap::new();
        let users = self.object == Object::Users;
        let check = |rec: &Value| -> Result<Option<Vec<String>>, WriteError> {
            let tags = tags_of(rec);
            // Users show `tags` only while user tagging is on.
            if read_tags && users && tags.is_none() {
                return Err(ZendeskError::TaggingDisabled {
                    object: "users".into(),
                }
                .into());
            }
            Ok(tags)
        };

        let with_id: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|k| known.contains_key(k))
            .collect();
        if read_tags {
            for part in with_id.chunks(100) {
                let list: Vec<String> = part.iter().map(|k| known[k].to_string()).collect();
                let v = self
                    .client
                    .get(&format!(
                        "/api/v2/{plural}/show_many.json?ids={}",
                        list.join(",")
                    ))
                    .await?;
                let mut by_id: HashMap<u64, &Value> = HashMap::new();
                for rec in v[plural].as_array().into_iter().flatten() {
                    if let Some(id) = rec["id"].as_u64() {
                        by_id.insert(id, rec);
                    }
                }
                for &k in part {
                    if let Some(rec) = by_id.get(&known[&k]) {
                        let tags = check(rec)?;
                        found.insert(
                            k,
                            Found {
                                id: known[&k],
                                tags,
                            },
                        );
                    }
                }
            }
        } else {
            for &k in &with_id {
                found.insert(
                    k,
                    Found {
                        id: known[&k],
                        tags: None,
                    },
                );
            }
        }

        // A recorded id Zendesk no longer has (the record was deleted or merged) is looked up
        // by external_id like a key never resolved.
        let by_key: Vec<usize> = idx
            .iter()
            .copied()
            .filter(|k| !found.contains_key(k))
            .collect();
        for part in by_key.chunks(100) {
            let list: Vec<String> = part.iter().map(|&k| enc(&rows[k].key)).collect();
            let v = self
                .client
                .get(&format!(
                    "/api/v2/{plural}/show_many.json?external_ids={}",
                    list.join(",")
                ))
                .await?;
            let mut by_ext: HashMap<String, &Value> = HashMap::new();
            for rec in v[plural].as_array().into_iter().flatten() {
                if let Some(x) = rec["external_id"].as_str() {
                    by_ext.insert(x.to_lowercase(), rec);
                }
            }
            for &k in part {
                if let Some(rec) = by_ext.get(&rows[k].key.to_lowercase()) {
                    if let Some(id) = rec["id"].as_u64() {
                        let tags = check(rec)?;
                        found.insert(k, Found { id, tags });
                    }
                }
            }
        }

        if users {
            // No bulk lookup by email exists: one search per member still unresolved.
            for &k in idx {
                let Some(email) = rows[k].email.as_deref() else {
                    continue;
                };
                if found.contains_key(&k) {
                    continue;
                }
                let v = self
                    .client
                    .get(&format!(
                        "/api/v2/users/search.json?query={}",
                        enc(&format!("email:{email}"))
                    ))
                    .await?;
                let hit = v["users"].as_array().into_iter().flatten().find(|u| {
                    u["email"]
                        .as_str()
                        .is_some_and(|e| e.eq_ignore_ascii_case(email))
                });
                if let Some(rec) = hit {
                    if let Some(id) = rec["id"].as_u64() {
                        let tags = check(rec)?;
                        found.insert(k, Found { id, tags });
                    }
                }
            }
        }
        Ok(found)
    }

    /// One batch `update_many` job with each record's full tag list.
    async fn tags_bulk(
        &self,
        rows: &[ChunkRow],
        idx: &[usize],
        found: &HashMap<usize, Found>,
        op: Op,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let tag = self.tag().to_string();
        let mut send: Vec<usize> = Vec::new();
        let mut items: Vec<Value> = Vec::new();
        for &k in idx {
            let Some(f) = found.get(&k) else { continue };
            let mut tags = f.tags.clone().unwrap_or_default();
            let has = tags.iter().any(|t| t.eq_ignore_ascii_case(&tag));
            let wanted = op == Op::Add;
            if has == wanted {
                // Already as wanted: nothing to send.
                out[k] = Some(Outcome::Confirmed {
                    id: f.id,
                    action: Action::Updated,
                });
                continue;
            }
            if wanted {
                tags.push(tag.clone());
            } else {
                tags.retain(|t| !t.eq_ignore_ascii_case(&tag));
            }
            send.push(k);
            items.push(json!({"id": f.id, "tags": tags}));
        }
        if send.is_empty() {
            return Ok(());
        }
        let plural = self.object.as_str();
        let path = format!("/api/v2/{plural}/update_many.json");
        let body = serde_json::to_vec(&json!({ plural: items })).expect("items serialise");
        let slot = self.job_slot().await;
        let v = self
            .client
            .send(Method::PUT, &path, body, Idempotency::Safe)
            .await?;
        let job = parse_job(&path, v)?;
        if let Some(slot) = &slot {
            slot.started(&job.id);
        }
        self.known_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.id.clone());
        self.progress.jobs.fetch_add(1, Ordering::Relaxed);
        let done = match self.jobs.wait(job.id.clone()).await {
            Ok(done) => done,
            Err(ZendeskError::Api { status: 404, .. }) => {
                for &k in &send {
                    out[k] = Some(Outcome::Failed {
                        code: "JobExpired".into(),
                        reason: format!(
                            "job {} expired before it was polled; the row is tried again next run",
                            job.id
                        ),
                    });
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let mapped = map_results(rows, &send, &done.results);
        for (n, &k) in send.iter().enumerate() {
            out[k] = Some(match mapped[n] {
                Some(r) if r.failed() => Outcome::Failed {
                    code: r.error.clone().unwrap_or_else(|| "Failed".into()),
                    reason: r.reason(),
                },
                Some(_) => Outcome::Confirmed {
                    id: found[&k].id,
                    action: Action::Updated,
                },
                None => Outcome::Failed {
                    code: "JobIncomplete".into(),
                    reason: format!(
                        "job {} ended `{}` without a result for this row",
                        done.id, done.status
                    ),
                },
            });
        }
        Ok(())
    }

    /// One tags request per record: `PUT` adds, `DELETE` removes; other tags are never sent.
    async fn tags_per_record(
        &self,
        idx: &[usize],
        found: &HashMap<usize, Found>,
        op: Op,
        out: &mut [Option<Outcome>],
    ) -> Result<(), WriteError> {
        let plural = self.object.as_str();
        let method = if op == Op::Add {
            Method::PUT
        } else {
            Method::DELETE
        };
        let body = serde_json::to_vec(&json!({"tags": [self.tag()]})).expect("tags serialise");
        let work: Vec<(usize, u64)> = idx
            .iter()
            .filter_map(|k| found.get(k).map(|f| (*k, f.id)))
            .collect();
        let answers: Vec<(usize, u64, Result<Value, ZendeskError>)> = stream::iter(work)
            .map(|(k, id)| {
                let (method, body) = (method.clone(), body.clone());
                async move {
                    let path = format!("/api/v2/{plural}/{id}/tags.json");
                    let r = self
                        .client
                        .send(method, &path, body, Idempotency::Safe)
                        .await;
                    (k, id, r)
                }
            })
            .buffer_unordered(PER_RECORD_CONCURRENCY)
            .collect()
            .await;
        for (k, id, r) in answers {
            out[k] = Some(match r {
                Ok(_) => Outcome::Confirmed {
                    id,
                    action: Action::Updated,
                },
                // Deleted since it was found; the next run looks it up again.
                Err(ZendeskError::Api {
                    status: 404, code, ..
                }) => Outcome::Failed {
                    code: if code.is_empty() {
                        "RecordNotFound".into()
                    } else {
                        code
                    },
                    reason: format!(
                        "{} {id} no longer exists in Zendesk; the row is tried again next run",
                        plural.trim_end_matches('s')
                    ),
                },
                Err(ZendeskError::Api {
                    status,
                    code,
                    description,
                    ..
                }) if (400..500).contains(&status) => Outcome::Failed {
                    code,
                    reason: format!("HTTP {status}: {description}"),
                },
                Err(e) => return Err(e.into()),
            });
        }
        Ok(())
    }
}
