//! State that can be lost: a tickets sync with no state (its first run against an account that
//! already holds its tickets, a wiped prefix, a restored bucket) or asked for a full resync reads
//! back from Zendesk which ticket carries each external id before it creates anything. Users and
//! organizations need no scan: their external ids are unique and looked up by `show_many`
//! whenever a create meets a record that exists.
//!
//! A ticket's external id is neither unique nor looked up in bulk, so the scan reads the
//! account's tickets through the cursor-based incremental export (1,000 a page, at most
//! `export_rpm` requests a minute, 10 on most plans). The export leaves out tickets changed in
//! the minute before each request; the newest-updated tickets are then read from the ticket list
//! (`sort=-updated_at`) back past that minute, so a ticket created just before the scan is seen.

use crate::layout;
use crate::mapping::key_hash;
use crate::state::{StateError, StateHeader, StateReader, StateWriter};
use crate::store::ObjectStore;
use crate::zendesk::{Client, ZendeskError};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// What a scan found: external id → the oldest ticket carrying it.
#[derive(Debug, Default)]
pub struct TicketScan {
    pub by_key: HashMap<String, u64>,
    /// Ticket records read, deleted ones left out (one in both the export and the list counts
    /// twice).
    pub tickets: u64,
    /// Export pages and list pages requested.
    pub pages: u64,
}

/// Spaces requests to an endpoint with its own per-minute limit (a sliding minute).
struct Pacer {
    rpm: usize,
    sent: VecDeque<Instant>,
}

impl Pacer {
    fn new(rpm: u32) -> Pacer {
        Pacer {
            rpm: rpm.max(1) as usize,
            sent: VecDeque::new(),
        }
    }

    async fn wait(&mut self) {
        let minute = Duration::from_secs(60);
        while let Some(first) = self.sent.front().copied() {
            if first.elapsed() >= minute {
                self.sent.pop_front();
            } else {
                break;
            }
        }
        if self.sent.len() >= self.rpm {
            let first = self.sent.pop_front().expect("full");
            tokio::time::sleep_until(first + minute).await;
        }
        self.sent.push_back(Instant::now());
    }
}

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn note(scan: &mut TicketScan, t: &Value) {
    if t["status"].as_str() == Some("deleted") {
        return;
    }
    scan.tickets += 1;
    let (Some(x), Some(id)) = (t["external_id"].as_str(), t["id"].as_u64()) else {
        return;
    };
    if x.is_empty() {
        return;
    }
    scan.by_key
        .entry(x.to_string())
        .and_modify(|v| *v = (*v).min(id))
        .or_insert(id);
}

/// Every ticket updated since `since` (unix seconds; 0 for the whole account) that carries an
/// external id.
pub async fn scan_tickets(
    client: &Client,
    since: i64,
    export_rpm: u32,
) -> Result<TicketScan, ZendeskError> {
    const EXPORT: &str = "/api/v2/incremental/tickets/cursor.json";
    let mut scan = TicketScan::default();
    let mut pacer = Pacer::new(export_rpm);
    let mut path = format!("{EXPORT}?start_time={}", since.max(0));
    let mut last_request;
    loop {
        pacer.wait().await;
        last_request = now_unix();
        let v = client.get(&path).await?;
        scan.pages += 1;
        for t in v["tickets"].as_array().into_iter().flatten() {
            note(&mut scan, t);
        }
        if v["end_of_stream"].as_bool() != Some(false) {
            break;
        }
        let Some(cursor) = v["after_cursor"].as_str().filter(|c| !c.is_empty()) else {
            return Err(ZendeskError::Protocol {
                path: EXPORT.into(),
                message: "the export is not at its end but gives no `after_cursor`".into(),
            });
        };
        path = format!("{EXPORT}?cursor={}", enc(cursor));
    }
    // The export's last page stops a minute before its request: read the newest-updated
    // tickets back past that (with five minutes to spare for clocks apart).
    let horizon = last_request - 60 - 300;
    let mut next = Some("/api/v2/tickets.json?page[size]=100&sort=-updated_at".to_string());
    while let Some(link) = next {
        let (items, more) = client.page(&link, "tickets").await?;
        scan.pages += 1;
        let mut older = false;
        for t in &items {
            note(&mut scan, t);
            let updated = t["updated_at"]
                .as_str()
                .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                .map(|d| d.timestamp());
            if updated.is_some_and(|u| u < horizon) {
                older = true;
            }
        }
        next = if older || items.is_empty() {
            None
        } else {
            more
        };
    }
    Ok(scan)
}

/// Writes the ticket ids a scan found into the sync's state: keys the state lacks are added
/// (with no fingerprint, so the next plan sends them as updates, never as creates); keys it has
/// without an id get theirs. Returns the number of keys added or given an id.
pub fn merge_ticket_ids(
    store: &dyn ObjectStore,
    sync: &str,
    object: &str,
    scan: &TicketScan,
) -> Result<u64, StateError> {
    let key = layout::state_key(sync);
    let mut old = StateReader::open(store, &key)?;
    let mut entries: Vec<(u64, u64, u64, u8, String)> = Vec::new();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut changed = 0u64;
    let header = match &old {
        Some(r) => r.header.clone(),
        None => StateHeader {
            version: 1,
            sync: sync.to_string(),
            object: object.to_string(),
            mapping_hash: String::new(),
            count_hint: 0,
            written_at: String::new(),
            run_id: None,
        },
    };
    if let Some(r) = old.as_mut() {
        while let Some(e) = r.next_entry()? {
            let mut id = e.zendesk_id;
            let mut flags = e.flags;
            if id == 0 {
                if let Some(&found) = scan.by_key.get(&e.key) {
                    id = found;
                    // Found: no longer an unknown create.
                    flags &= !crate::state::FLAG_UNKNOWN;
                    changed += 1;
                }
            }
            seen.insert(e.key_hash);
            entries.push((e.key_hash, e.fingerprint, id, flags, e.key));
        }
    }
    for (k, &id) in &scan.by_key {
        let h = key_hash(crate::fields::Object::Tickets, k);
        if seen.insert(h) {
            entries.push((h, 0, id, 0, k.clone()));
            changed += 1;
        }
    }
    drop(old);
    entries.sort_unstable_by_key(|e| e.0);
    let header = StateHeader {
        count_hint: entries.len() as u64,
        written_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ..header
    };
    let mut out = StateWriter::create(store, &key, &header)?;
    for (h, fp, id, flags, k) in &entries {
        out.push(*h, *fp, *id, *flags, k)?;
    }
    out.finish()?;
    Ok(changed)
}
