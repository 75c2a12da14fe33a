//! Listings beyond plain id order, each with opaque cursors: the cursor-based incremental
//! ticket export, record lists sorted by `updated_at` / `created_at` / `id`, and the job-status
//! list (newest first).

use crate::api::{offset_page, plural, render, Res};
use crate::config::WindowLimit;
use crate::fields::Target;
use crate::jobs::Job;
use crate::server::{lock, LimitKind, Reply, Req};
use crate::store::{Store, Ticket};
use crate::util::{decode_cursor, encode_cursor, iso_secs};
use serde_json::{json, Value};

fn bad_cursor() -> Reply {
    Reply::error(
        400,
        "InvalidPaginationParameter",
        "The cursor is invalid or has expired",
    )
}

// ---- incremental ticket export -------------------------------------------------------------

/// Zendesk's cursor text: `<unix seconds>.0||<ticket id>|`, base64 encoded.
fn export_cursor(pos: (i64, u64)) -> String {
    encode_cursor(&format!("{}.0||{}|", pos.0, pos.1))
}

fn parse_export_cursor(c: &str) -> Option<(i64, u64)> {
    let text = decode_cursor(c)?;
    let rest = text.strip_suffix('|')?;
    let (secs, id) = rest.split_once("||")?;
    let secs = secs.strip_suffix(".0").unwrap_or(secs);
    Some((secs.parse().ok()?, id.parse().ok()?))
}

fn export_item(t: &Ticket, secs: i64, base: &str, store: &Store) -> Value {
    let mut v = store.render_ticket(t, base);
    v["generated_timestamp"] = json!(secs);
    v
}

/// `GET /api/v2/incremental/tickets/cursor?start_time=<unix secs>` or `?cursor=<after_cursor>`
/// (optional `per_page` ≤ 1000, `exclude_deleted=true`). Tickets in order of last update then
/// id; tickets updated within `incremental.lag_secs` of the clock are not exported yet.
pub(crate) fn incremental_tickets(req: &mut Req) -> Res {
    let inc = &req.rt.incremental;
    if inc.rpm > 0 {
        let lim = WindowLimit {
            limit: inc.rpm,
            window_ms: inc.window_ms.max(1),
        };
        let refused = lock(&req.account.rate).check_endpoint("incremental".into(), lim, req.now);
        if let Some(ra) = refused {
            return Err(Reply::too_many(
                Some(ra),
                json!({"errors": [{"code": "TooManyRequests", "title": format!("Too many requests to the incremental export API (limit {} per minute)", inc.rpm)}]}),
                LimitKind::Endpoint,
            ));
        }
    }
    let now_secs = req.now.div_euclid(1000);
    let per_page_given = req.query.get("per_page").is_some();
    let per_page: usize = req
        .query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1000)
        .clamp(1, 1000);
    let exclude_deleted = req.query.flag("exclude_deleted");
    // Position: export what comes strictly after (updated_at seconds, id).
    let pos: (i64, u64) = match req.query.get("cursor") {
        Some(c) => parse_export_cursor(c).ok_or_else(bad_cursor)?,
        None => {
            let Some(raw) = req.query.get("start_time") else {
                return Err(Reply::error(
                    400,
                    "InvalidValue",
                    "start_time or cursor is required",
                ));
            };
            let start: i64 = raw.trim().parse().ok().filter(|s| *s >= 0).ok_or_else(|| {
                Reply::error(
                    400,
                    "InvalidValue",
                    "start_time must be a Unix epoch time in seconds",
                )
            })?;
            if start > now_secs {
                return Err(Reply::error(
                    400,
                    "InvalidValue",
                    "start_time cannot be in the future",
                ));
            }
            // Ids start at 1, so "after (start, 0)" is "updated at or after start".
            (start, 0)
        }
    };
    // Items changed within the lag are left out (a second counts once it has fully passed).
    let horizon = (req.now - inc.lag_secs as i64 * 1000).div_euclid(1000);
    let store = lock(&req.account.store);
    let live = store.tickets.values().map(|t| (t, false));
    let gone = store
        .deleted_tickets
        .values()
        .filter(|_| !exclude_deleted)
        .map(|t| (t, true));
    let mut keyed: Vec<(i64, u64, bool)> = live
        .chain(gone)
        .map(|(t, d)| (iso_secs(&t.updated_at), t.id, d))
        .filter(|(secs, id, _)| (*secs, *id) > pos && *secs < horizon)
        .collect();
    keyed.sort_unstable();
    let end_of_stream = keyed.len() <= per_page;
    keyed.truncate(per_page);
    let tickets: Vec<Value> = keyed
        .iter()
        .filter_map(|(secs, id, deleted)| {
            let t = if *deleted {
                store.deleted_tickets.get(id)
            } else {
                store.tickets.get(id)
            };
            t.map(|t| export_item(t, *secs, req.base, &store))
        })
        .collect();
    let last = keyed.last().map_or(pos, |(s, id, _)| (*s, *id));
    let after_cursor = export_cursor(last);
    let mut after_url = format!(
        "{}/api/v2/incremental/tickets/cursor.json?cursor={after_cursor}",
        req.base
    );
    if per_page_given {
        after_url.push_str(&format!("&per_page={per_page}"));
    }
    if exclude_deleted {
        after_url.push_str("&exclude_deleted=true");
    }
    Ok(Reply::ok(json!({
        "tickets": tickets,
        "after_url": after_url,
        "after_cursor": after_cursor,
        "before_url": null,
        "before_cursor": null,
        "end_of_stream": end_of_stream,
    })))
}

// ---- sorted record lists -------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SortKey {
    Id,
    UpdatedAt,
    CreatedAt,
}

pub(crate) struct Sort {
    key: SortKey,
    desc: bool,
    /// The sort parameters as sent, repeated in pagination links.
    query: String,
}

fn bad_sort() -> Reply {
    Reply::error(
        400,
        "InvalidParameter",
        "sort must be id, updated_at or created_at, with a leading - for descending order",
    )
}

/// `sort=[-]updated_at|created_at|id` (cursor style) or `sort_by=..&sort_order=asc|desc`.
pub(crate) fn sort_param(req: &Req) -> Result<Option<Sort>, Reply> {
    let (name, desc, query) = if let Some(s) = req.query.get("sort") {
        match s.strip_prefix('-') {
            Some(n) => (n.to_string(), true, format!("sort={s}")),
            None => (s.to_string(), false, format!("sort={s}")),
        }
    } else if let Some(by) = req.query.get("sort_by") {
        let order = req.query.get("sort_order").unwrap_or("asc");
        let desc = match order {
            "asc" => false,
            "desc" => true,
            _ => return Err(bad_sort()),
        };
        (
            by.to_string(),
            desc,
            format!("sort_by={by}&sort_order={order}"),
        )
    } else {
        return Ok(None);
    };
    let key = match name.as_str() {
        "id" => SortKey::Id,
        "updated_at" => SortKey::UpdatedAt,
        "created_at" => SortKey::CreatedAt,
        _ => return Err(bad_sort()),
    };
    Ok(Some(Sort { key, desc, query }))
}

fn times(store: &Store, t: Target, id: u64) -> Option<(&str, &str)> {
    match t {
        Target::User => store
            .users
            .get(&id)
            .map(|u| (u.created_at.as_str(), u.updated_at.as_str())),
        Target::Organization => store
            .orgs
            .get(&id)
            .map(|o| (o.created_at.as_str(), o.updated_at.as_str())),
        Target::Ticket => store
            .tickets
            .get(&id)
            .map(|x| (x.created_at.as_str(), x.updated_at.as_str())),
    }
}

fn parse_sort_cursor(c: &str) -> Option<(i64, u64)> {
    let text = decode_cursor(c)?;
    let (k, id) = text.split_once(':')?;
    Some((k.parse().ok()?, id.parse().ok()?))
}

/// A record list in `sort` order, by cursor (`page[size]`, `page[after]`) or offset.
pub(crate) fn sorted_list(req: &Req, t: Target, ids: Vec<u64>, sort: Sort) -> Res {
    let store = lock(&req.account.store);
    let mut keyed: Vec<(i64, u64)> = ids
        .iter()
        .filter_map(|id| {
            let k = match sort.key {
                SortKey::Id => *id as i64,
                SortKey::UpdatedAt => iso_secs(times(&store, t, *id)?.1),
                SortKey::CreatedAt => iso_secs(times(&store, t, *id)?.0),
            };
            Some((k, *id))
        })
        .collect();
    keyed.sort_unstable();
    if sort.desc {
        keyed.reverse();
    }
    let Some(size) = req.query.get("page[size]") else {
        let ids: Vec<u64> = keyed.iter().map(|x| x.1).collect();
        return offset_page(req, t, &store, &ids, plural(t), &sort.query);
    };
    let size: usize = size.parse().unwrap_or(100).clamp(1, 100);
    let start = match req.query.get("page[after]") {
        None => 0,
        Some(c) => {
            let pos = parse_sort_cursor(c).ok_or_else(bad_cursor)?;
            keyed.partition_point(|x| if sort.desc { *x >= pos } else { *x <= pos })
        }
    };
    let page = &keyed[start..(start + size).min(keyed.len())];
    let has_more = start + page.len() < keyed.len();
    let items: Vec<Value> = page
        .iter()
        .filter_map(|(_, id)| render(&store, req.account, t, *id, req.base))
        .collect();
    let enc = |(k, id): &(i64, u64)| encode_cursor(&format!("{k}:{id}"));
    let after_cursor = page.last().map(enc);
    let before_cursor = page.first().map(enc);
    let next = match (&after_cursor, has_more) {
        (Some(c), true) => Some(format!(
            "{}/api/v2/{}.json?page[size]={size}&page[after]={c}&{}",
            req.base,
            plural(t),
            sort.query
        )),
        _ => None,
    };
    Ok(Reply::ok(json!({
        plural(t): items,
        "meta": {"has_more": has_more, "after_cursor": after_cursor, "before_cursor": before_cursor},
        "links": {"next": next, "prev": null},
    })))
}

// ---- job statuses --------------------------------------------------------------------------

fn parse_job_cursor(c: &str) -> Option<(i64, i64, String)> {
    let text = decode_cursor(c)?;
    let mut parts = text.splitn(3, ':');
    let f = parts.next()?.parse().ok()?;
    let cr = parts.next()?.parse().ok()?;
    let id = parts.next()?.to_string();
    Some((f, cr, id))
}

/// `GET /api/v2/job_statuses`: every retained job of the account, newest first (by completion,
/// then creation), with its `results`; cursor pagination, `page[size]` ≤ 100 (default 100).
pub(crate) fn jobs_list(req: &mut Req, retention_ms: i64) -> Res {
    let size: usize = req
        .query
        .get("page[size]")
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    let after = match req.query.get("page[after]") {
        Some(c) => Some(parse_job_cursor(c).ok_or_else(bad_cursor)?),
        None => None,
    };
    let jobs = lock(&req.account.jobs);
    let list = jobs.list(req.now, retention_ms);
    let start = after.map_or(0, |(f, c, id)| {
        list.partition_point(|j| j.list_key() >= (f, c, id.as_str()))
    });
    let page = &list[start..(start + size).min(list.len())];
    let has_more = start + page.len() < list.len();
    let items: Vec<Value> = page
        .iter()
        .map(|j| serde_json::to_value(j.view()).unwrap_or_default())
        .collect();
    let enc = |j: &&Job| {
        let (f, c, id) = j.list_key();
        encode_cursor(&format!("{f}:{c}:{id}"))
    };
    let after_cursor = page.last().map(enc);
    let before_cursor = page.first().map(enc);
    let next = match (&after_cursor, has_more) {
        (Some(c), true) => Some(format!(
            "{}/api/v2/job_statuses.json?page[size]={size}&page[after]={c}",
            req.base
        )),
        _ => None,
    };
    Ok(Reply::ok(json!({
        "job_statuses": items,
        "meta": {"has_more": has_more, "after_cursor": after_cursor, "before_cursor": before_cursor},
        "links": {"next": next, "prev": null},
    })))
}
