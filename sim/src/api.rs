//! Zendesk endpoints: routing and handlers for users, organizations, tickets, tags, job
//! statuses, custom field definitions, search and the "who am I" preflight.

use crate::faults::JobFaults;
use crate::fields::Target;
use crate::jobs::{
    completed_message, job_id, run_work, Job, JobState, JobView, JobWork, Key, RunOpts,
};
use crate::server::{lock, Account, LimitKind, Reply, Req, Runtime};
use crate::store::{OpError, Store};
use crate::util::{add_tags, as_text, normalize_tags, remove_tags, SimClock};
use axum::http::Method;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagVerb {
    List,
    Set,
    Add,
    Remove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    OAuthTokens,
    OAuthAuthorize,
    Me,
    TokenCurrent,
    List(Target),
    Create(Target),
    CreateOrUpdate(Target),
    CreateMany(Target),
    CreateOrUpdateMany(Target),
    UpdateMany(Target),
    DestroyMany(Target),
    ShowMany(Target),
    Search(Target),
    Show(Target, u64),
    Update(Target, u64),
    Delete(Target, u64),
    Tags(Target, u64, TagVerb),
    JobsList,
    JobsShowMany,
    /// `GET /api/v2/incremental/tickets/cursor`.
    IncrementalTickets,
    JobShow(String),
    FieldsList(Target),
    FieldShow(Target, String),
    FieldOptions(Target, String),
    GlobalSearch,
    /// A record path whose id is not a number.
    BadId(Target),
    NotFound,
}

pub(crate) fn plural(t: Target) -> &'static str {
    match t {
        Target::User => "users",
        Target::Organization => "organizations",
        Target::Ticket => "tickets",
    }
}

fn singular(t: Target) -> &'static str {
    match t {
        Target::User => "user",
        Target::Organization => "organization",
        Target::Ticket => "ticket",
    }
}

fn field_root_singular(t: Target) -> &'static str {
    match t {
        Target::User => "user_field",
        Target::Organization => "organization_field",
        Target::Ticket => "ticket_field",
    }
}

impl Route {
    /// Counter / log name, e.g. `users.create_many`.
    pub fn name(&self) -> String {
        match self {
            Route::OAuthTokens => "oauth.tokens".into(),
            Route::OAuthAuthorize => "oauth.authorizations.new".into(),
            Route::Me => "users.me".into(),
            Route::TokenCurrent => "oauth.tokens.current".into(),
            Route::List(t) => format!("{}.list", plural(*t)),
            Route::Create(t) => format!("{}.create", plural(*t)),
            Route::CreateOrUpdate(t) => format!("{}.create_or_update", plural(*t)),
            Route::CreateMany(t) => format!("{}.create_many", plural(*t)),
            Route::CreateOrUpdateMany(t) => format!("{}.create_or_update_many", plural(*t)),
            Route::UpdateMany(t) => format!("{}.update_many", plural(*t)),
            Route::DestroyMany(t) => format!("{}.destroy_many", plural(*t)),
            Route::ShowMany(t) => format!("{}.show_many", plural(*t)),
            Route::Search(t) => format!("{}.search", plural(*t)),
            Route::Show(t, _) | Route::BadId(t) => format!("{}.show", plural(*t)),
            Route::Update(t, _) => format!("{}.update", plural(*t)),
            Route::Delete(t, _) => format!("{}.delete", plural(*t)),
            Route::Tags(t, _, v) => format!(
                "{}.tags.{}",
                plural(*t),
                match v {
                    TagVerb::List => "list",
                    TagVerb::Set => "set",
                    TagVerb::Add => "add",
                    TagVerb::Remove => "remove",
                }
            ),
            Route::JobsList => "job_statuses.list".into(),
            Route::IncrementalTickets => "incremental.tickets.cursor".into(),
            Route::JobsShowMany => "job_statuses.show_many".into(),
            Route::JobShow(_) => "job_statuses.show".into(),
            Route::FieldsList(t) => format!("{}.list", t.root()),
            Route::FieldShow(t, _) => format!("{}.show", t.root()),
            Route::FieldOptions(t, _) => format!("{}.options", t.root()),
            Route::GlobalSearch => "search".into(),
            Route::NotFound => "not_found".into(),
        }
    }

    /// `None`: no scope needed (the token alone is enough). `Some(None)`: any valid scope with
    /// the right access. `Some(Some(r))`: `read`/`write` or `r:read`/`r:write`.
    pub fn scope_resource(&self) -> Option<Option<&'static str>> {
        match self {
            Route::OAuthTokens
            | Route::OAuthAuthorize
            | Route::Me
            | Route::TokenCurrent
            | Route::NotFound => None,
            Route::JobsList | Route::JobsShowMany | Route::JobShow(_) | Route::GlobalSearch => {
                Some(None)
            }
            Route::IncrementalTickets => Some(Some("tickets")),
            Route::List(t)
            | Route::Create(t)
            | Route::CreateOrUpdate(t)
            | Route::CreateMany(t)
            | Route::CreateOrUpdateMany(t)
            | Route::UpdateMany(t)
            | Route::DestroyMany(t)
            | Route::ShowMany(t)
            | Route::Search(t)
            | Route::Show(t, _)
            | Route::Update(t, _)
            | Route::Delete(t, _)
            | Route::Tags(t, _, _)
            | Route::FieldsList(t)
            | Route::FieldShow(t, _)
            | Route::FieldOptions(t, _)
            | Route::BadId(t) => Some(Some(plural(*t))),
        }
    }
}

pub(crate) fn route(method: &Method, path: &str) -> Route {
    if path == "/oauth/tokens" {
        return if method == Method::POST {
            Route::OAuthTokens
        } else {
            Route::NotFound
        };
    }
    if path == "/oauth/authorizations/new" {
        return if method == Method::GET {
            Route::OAuthAuthorize
        } else {
            Route::NotFound
        };
    }
    let Some(rest) = path.strip_prefix("/api/v2/") else {
        return Route::NotFound;
    };
    let seg: Vec<&str> = rest.split('/').collect();
    let m = method;
    let get = m == Method::GET;
    let target = |s: &str| match s {
        "users" => Some(Target::User),
        "organizations" => Some(Target::Organization),
        "tickets" => Some(Target::Ticket),
        _ => None,
    };
    let field_target = |s: &str| match s {
        "user_fields" => Some(Target::User),
        "organization_fields" => Some(Target::Organization),
        "ticket_fields" => Some(Target::Ticket),
        _ => None,
    };
    let (head, tail) = seg.split_first().expect("split yields at least one item");
    if let Some(f) = field_target(head) {
        return match tail {
            [] if get => Route::FieldsList(f),
            [id] if get => Route::FieldShow(f, id.to_string()),
            [id, "options"] if get && f != Target::Organization => {
                Route::FieldOptions(f, id.to_string())
            }
            _ => Route::NotFound,
        };
    }
    if let Some(t) = target(head) {
        return match tail {
            ["me"] if get && t == Target::User => Route::Me,
            [] => match *m {
                Method::GET => Route::List(t),
                Method::POST => Route::Create(t),
                _ => Route::NotFound,
            },
            [op] => record_route(t, op, m),
            [id, "tags"] => {
                let Ok(id) = id.parse::<u64>() else {
                    return Route::BadId(t);
                };
                match *m {
                    Method::GET => Route::Tags(t, id, TagVerb::List),
                    Method::POST => Route::Tags(t, id, TagVerb::Set),
                    Method::PUT => Route::Tags(t, id, TagVerb::Add),
                    Method::DELETE => Route::Tags(t, id, TagVerb::Remove),
                    _ => Route::NotFound,
                }
            }
            _ => Route::NotFound,
        };
    }
    match seg.as_slice() {
        ["oauth", "tokens", "current"] if get => Route::TokenCurrent,
        ["search"] if get => Route::GlobalSearch,
        ["job_statuses"] if get => Route::JobsList,
        ["incremental", "tickets", "cursor"] if get => Route::IncrementalTickets,
        ["job_statuses", "show_many"] if get => Route::JobsShowMany,
        ["job_statuses", id] if get => Route::JobShow(id.to_string()),
        _ => Route::NotFound,
    }
}

/// `/api/v2/{users|organizations|tickets}/{op or id}`.
fn record_route(t: Target, op: &str, m: &Method) -> Route {
    match (op, m.clone()) {
        ("create_or_update", Method::POST) if t != Target::Ticket => Route::CreateOrUpdate(t),
        ("create_many", Method::POST) => Route::CreateMany(t),
        ("create_or_update_many", Method::POST) if t == Target::User => {
            Route::CreateOrUpdateMany(t)
        }
        ("update_many", Method::PUT) => Route::UpdateMany(t),
        ("destroy_many", Method::DELETE) => Route::DestroyMany(t),
        ("show_many", Method::GET) => Route::ShowMany(t),
        ("search", Method::GET) if t != Target::Ticket => Route::Search(t),
        (
            "create_or_update"
            | "create_many"
            | "create_or_update_many"
            | "update_many"
            | "destroy_many"
            | "show_many"
            | "search",
            _,
        ) => Route::NotFound,
        (id, method) => match id.parse::<u64>() {
            Ok(id) => match method {
                Method::GET => Route::Show(t, id),
                Method::PUT => Route::Update(t, id),
                Method::DELETE => Route::Delete(t, id),
                _ => Route::NotFound,
            },
            Err(_) => Route::BadId(t),
        },
    }
}

pub(crate) fn dispatch(req: &mut Req, route: Route) -> Reply {
    let r = match route {
        Route::OAuthTokens | Route::OAuthAuthorize => Err(Reply::invalid_endpoint()),
        Route::Me => me(req),
        Route::TokenCurrent => token_current(req),
        Route::List(t) => list(req, t),
        Route::Create(t) => create(req, t),
        Route::CreateOrUpdate(t) => create_or_update(req, t),
        Route::CreateMany(t) => create_many(req, t, false),
        Route::CreateOrUpdateMany(t) => create_many(req, t, true),
        Route::UpdateMany(t) => update_many(req, t),
        Route::DestroyMany(t) => destroy_many(req, t),
        Route::ShowMany(t) => show_many(req, t),
        Route::Search(t) => search(req, t),
        Route::Show(t, id) => show(req, t, id),
        Route::Update(t, id) => update(req, t, id),
        Route::Delete(t, id) => delete(req, t, id),
        Route::Tags(t, id, verb) => tags(req, t, id, verb),
        Route::JobsList => {
            let ret = retention_ms(req.rt);
            crate::export::jobs_list(req, ret)
        }
        Route::IncrementalTickets => crate::export::incremental_tickets(req),
        Route::JobsShowMany => jobs_show_many(req),
        Route::JobShow(id) => job_show(req, &id),
        Route::FieldsList(t) => fields_list(req, t),
        Route::FieldShow(t, id) => field_show(req, t, &id),
        Route::FieldOptions(t, id) => field_options(req, t, &id),
        Route::GlobalSearch => global_search(req),
        Route::BadId(_) => Err(Reply::not_found()),
        Route::NotFound => Err(Reply::invalid_endpoint()),
    };
    r.unwrap_or_else(|e| e)
}

pub(crate) type Res = Result<Reply, Reply>;

fn missing_param(name: &str) -> Reply {
    Reply::error(
        400,
        "ParameterMissing",
        &format!("param is missing or the value is empty: {name}"),
    )
}

fn too_many_values(max: usize) -> Reply {
    Reply::error(
        400,
        "TooManyValues",
        &format!("Too many values: a maximum of {max} records can be sent per request"),
    )
}

/// The object under `key` in the request body.
fn root_object(req: &Req, key: &str) -> Result<Map<String, Value>, Reply> {
    match req.body.as_ref().and_then(|b| b.get(key)) {
        Some(Value::Object(m)) => Ok(m.clone()),
        _ => Err(missing_param(key)),
    }
}

fn root_array(req: &mut Req, key: &str) -> Result<Vec<Value>, Reply> {
    let max = req.rt.jobs.max_items;
    match req.body.as_mut().and_then(|b| b.get_mut(key)) {
        Some(Value::Array(a)) if a.is_empty() => Err(missing_param(key)),
        Some(Value::Array(a)) if a.len() > max => Err(too_many_values(max)),
        Some(Value::Array(a)) => Ok(std::mem::take(a)),
        _ => Err(missing_param(key)),
    }
}

fn tagging_on(acct: &Account, t: Target) -> bool {
    let s = acct.settings();
    match t {
        Target::User => s.user_tagging,
        Target::Organization => s.organization_tagging,
        Target::Ticket => true,
    }
}

pub(crate) fn render(
    store: &Store,
    acct: &Account,
    t: Target,
    id: u64,
    base: &str,
) -> Option<Value> {
    match t {
        Target::User => store
            .users
            .get(&id)
            .map(|u| store.render_user(u, base, tagging_on(acct, t))),
        Target::Organization => store.orgs.get(&id).map(|o| store.render_org(o, base)),
        Target::Ticket => store.tickets.get(&id).map(|x| store.render_ticket(x, base)),
    }
}

fn location(req: &Req, t: Target, id: u64) -> String {
    format!("{}/api/v2/{}/{id}.json", req.base, plural(t))
}

fn me(req: &mut Req) -> Res {
    let store = lock(&req.account.store);
    let user = render(
        &store,
        req.account,
        Target::User,
        req.principal.user_id,
        req.base,
    )
    .ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(json!({"user": user})))
}

fn token_current(req: &mut Req) -> Res {
    let id = req.principal.token_id.ok_or_else(Reply::not_found)?;
    let auth = lock(&req.account.auth);
    let tok = auth.token_by_id(id).ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(auth.render_token(tok, req.base)))
}

/// Offset (`page`, `per_page`) or cursor (`page[size]`, `page[after]`) pagination over ids.
fn paginate(req: &Req, t: Target, ids: Vec<u64>, root: &str) -> Res {
    let store = lock(&req.account.store);
    let list_url = format!("{}/api/v2/{}.json", req.base, plural(t));
    if let Some(size) = req.query.get("page[size]") {
        let size: usize = size.parse().unwrap_or(100).clamp(1, 100);
        let after: Option<u64> = req.query.get("page[after]").and_then(|c| c.parse().ok());
        let start = after.map_or(0, |a| ids.partition_point(|x| *x <= a));
        let page: Vec<u64> = ids.iter().skip(start).take(size).copied().collect();
        let has_more = start + page.len() < ids.len();
        let items: Vec<Value> = page
            .iter()
            .filter_map(|id| render(&store, req.account, t, *id, req.base))
            .collect();
        let after_cursor = page.last().map(|x| x.to_string());
        let before_cursor = page.first().map(|x| x.to_string());
        return Ok(Reply::ok(json!({
            root: items,
            "meta": {"has_more": has_more, "after_cursor": after_cursor, "before_cursor": before_cursor},
            "links": {
                "next": if has_more { Some(format!("{list_url}?page[size]={size}&page[after]={}", after_cursor.clone().unwrap_or_default())) } else { None },
                "prev": Value::Null,
            },
        })));
    }
    offset_page(req, t, &store, &ids, root, "")
}

/// One offset page (`page`, `per_page` ≤ 100; 400 past 10 000 records) of `ids` in the order
/// given; `extra` query parameters are repeated in `next_page` / `previous_page`.
pub(crate) fn offset_page(
    req: &Req,
    t: Target,
    store: &Store,
    ids: &[u64],
    root: &str,
    extra: &str,
) -> Res {
    let list_url = format!("{}/api/v2/{}.json", req.base, plural(t));
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("&{extra}")
    };
    let per_page: usize = req
        .query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    let page: usize = req
        .query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    if (page - 1) * per_page >= 10_000 {
        return Err(Reply::error(
            400,
            "InvalidPaginationParameter",
            "Offset pagination is limited to the first 10000 records. Use cursor pagination.",
        ));
    }
    let count = ids.len();
    let items: Vec<Value> = ids
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .filter_map(|id| render(store, req.account, t, *id, req.base))
        .collect();
    let next = (page * per_page < count)
        .then(|| format!("{list_url}?page={}&per_page={per_page}{extra}", page + 1));
    let prev =
        (page > 1).then(|| format!("{list_url}?page={}&per_page={per_page}{extra}", page - 1));
    Ok(Reply::ok(
        json!({root: items, "next_page": next, "previous_page": prev, "count": count}),
    ))
}

fn list(req: &mut Req, t: Target) -> Res {
    let ids: Vec<u64> = {
        let store = lock(&req.account.store);
        match (t, req.query.get("external_id")) {
            (Target::User, Some(ext)) => store.user_id_by_external(ext).into_iter().collect(),
            (Target::Organization, Some(ext)) => {
                store.org_id_by_external(ext).into_iter().collect()
            }
            (Target::Ticket, Some(ext)) => store.ticket_ids_by_external(ext),
            (Target::User, None) => match req.query.get("role") {
                Some(role) => store
                    .users
                    .values()
                    .filter(|u| u.role == role)
                    .map(|u| u.id)
                    .collect(),
                None => store.users.keys().copied().collect(),
            },
            (Target::Organization, None) => store.orgs.keys().copied().collect(),
            (Target::Ticket, None) => store.tickets.keys().copied().collect(),
        }
    };
    if let Some(sort) = crate::export::sort_param(req)? {
        return crate::export::sorted_list(req, t, ids, sort);
    }
    paginate(req, t, ids, plural(t))
}

fn check_user_write_limit(req: &Req, key: Option<String>) -> Result<(), Reply> {
    let lim = req.rt.rate.user_writes_per_user;
    if lim.limit == 0 {
        return Ok(());
    }
    let Some(key) = key else { return Ok(()) };
    match lock(&req.account.rate).check_endpoint(format!("uw:{key}"), lim, req.now) {
        Some(ra) => Err(Reply::too_many(
            Some(ra),
            json!({"errors": [{"code": "TooManyRequests", "title": "Too many requests to update this user"}]}),
            LimitKind::Endpoint,
        )),
        None => Ok(()),
    }
}

fn async_ticket(req: &mut Req, input: Map<String, Value>) -> Res {
    let id = lock(&req.account.store).reserve_ticket_id();
    let job = start_job(req, JobWork::TicketAsync { id, item: input })?;
    Ok(Reply::json(
        202,
        json!({"ticket": {"id": id}, "job_status": job}),
    ))
}

fn create(req: &mut Req, t: Target) -> Res {
    let input = root_object(req, singular(t))?;
    if t == Target::Ticket && req.query.flag("async") {
        return async_ticket(req, input);
    }
    let ctx = req.ctx();
    let mut store = lock(&req.account.store);
    let res = match t {
        Target::User => store.create_user(&ctx, &input),
        Target::Organization => store.create_org(&ctx, &input),
        Target::Ticket => store.create_ticket(&ctx, &input),
    };
    let id = res.map_err(|inv| Reply::json(422, inv.body()))?;
    let mut body = Map::new();
    body.insert(
        singular(t).into(),
        render(&store, req.account, t, id, req.base).unwrap_or_default(),
    );
    if t == Target::Ticket {
        let tk = &store.tickets[&id];
        body.insert(
            "audit".into(),
            audit(
                req,
                id,
                None,
                &store.render_ticket(tk, req.base),
                tk.comments.last(),
            ),
        );
    }
    Ok(Reply::created(Value::Object(body), location(req, t, id)))
}

fn create_or_update(req: &mut Req, t: Target) -> Res {
    let input = root_object(req, singular(t))?;
    if t == Target::User {
        let key = input
            .get("external_id")
            .and_then(as_text)
            .or_else(|| input.get("email").and_then(as_text))
            .map(|k| k.to_lowercase());
        check_user_write_limit(req, key)?;
    }
    let ctx = req.ctx();
    let mut store = lock(&req.account.store);
    let res = match t {
        Target::User => store.upsert_user(&ctx, &input),
        _ => store.upsert_org(&ctx, &input),
    };
    let up = res.map_err(|inv| Reply::json(422, inv.body()))?;
    let body = json!({singular(t): render(&store, req.account, t, up.id, req.base)});
    let status = if up.created { 201 } else { 200 };
    Ok(Reply::json(status, body).header(axum::http::header::LOCATION, location(req, t, up.id)))
}

fn bulk_import_check(req: &Req, t: Target) -> Result<(), Reply> {
    if t == Target::User && !req.account.settings().bulk_user_import {
        return Err(Reply::error(
            403,
            "Forbidden",
            "Bulk user import is not enabled for this account. Contact Zendesk Customer Support to enable it.",
        ));
    }
    Ok(())
}

fn create_many(req: &mut Req, t: Target, upsert: bool) -> Res {
    bulk_import_check(req, t)?;
    let items = root_array(req, plural(t))?;
    let work = if upsert {
        JobWork::UpsertUsers { items }
    } else {
        JobWork::Create { target: t, items }
    };
    let job = start_job(req, work)?;
    Ok(Reply::ok(json!({"job_status": job})))
}

/// `ids=` / `external_ids=` from the query, with the per-call maximum.
fn keys_from_query(req: &Req, t: Target, allow_external: bool) -> Result<Option<Vec<Key>>, Reply> {
    let max = req.rt.jobs.max_items;
    if let Some(ids) = req.query.list("ids") {
        if ids.is_empty() {
            return Err(missing_param("ids"));
        }
        if ids.len() > max {
            return Err(too_many_values(max));
        }
        let keys = ids
            .iter()
            .map(|s| s.parse::<u64>().map(Key::Id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                Reply::error(
                    400,
                    "InvalidValue",
                    "ids must be a comma-separated list of integers",
                )
            })?;
        return Ok(Some(keys));
    }
    if allow_external && t != Target::Ticket {
        if let Some(ext) = req.query.list("external_ids") {
            if ext.is_empty() {
                return Err(missing_param("external_ids"));
            }
            if ext.len() > max {
                return Err(too_many_values(max));
            }
            return Ok(Some(ext.into_iter().map(Key::External).collect()));
        }
    }
    Ok(None)
}

fn update_many(req: &mut Req, t: Target) -> Res {
    let work = match keys_from_query(req, t, true)? {
        Some(keys) => {
            let change = root_object(req, singular(t))?;
            JobWork::UpdateBulk {
                target: t,
                keys,
                change,
            }
        }
        None => JobWork::UpdateBatch {
            target: t,
            items: root_array(req, plural(t))?,
        },
    };
    let job = start_job(req, work)?;
    Ok(Reply::ok(json!({"job_status": job})))
}

fn destroy_many(req: &mut Req, t: Target) -> Res {
    if t == Target::User && req.principal.role != "admin" {
        return Err(Reply::forbidden_role());
    }
    let keys = keys_from_query(req, t, true)?.ok_or_else(|| missing_param("ids"))?;
    let job = start_job(req, JobWork::Destroy { target: t, keys })?;
    Ok(Reply::ok(json!({"job_status": job})))
}

fn show_many(req: &mut Req, t: Target) -> Res {
    let keys = keys_from_query(req, t, true)?.ok_or_else(|| missing_param("ids"))?;
    let store = lock(&req.account.store);
    let items: Vec<Value> = keys
        .iter()
        .filter_map(|k| match (t, k) {
            (_, Key::Id(id)) => Some(*id),
            (Target::User, Key::External(e)) => store.user_id_by_external(e),
            (Target::Organization, Key::External(e)) => store.org_id_by_external(e),
            (Target::Ticket, Key::External(_)) => None,
        })
        .filter_map(|id| render(&store, req.account, t, id, req.base))
        .collect();
    let count = items.len();
    Ok(Reply::ok(
        json!({plural(t): items, "next_page": null, "previous_page": null, "count": count}),
    ))
}

/// Zendesk search syntax, the subset lookups use: `email:`, `external_id:`, `name:`, `role:`,
/// `tags:`, and bare words matched against email / name.
fn user_matches(u: &crate::store::User, query: &str) -> bool {
    query.split_whitespace().all(|term| {
        let term = term.trim_matches('"');
        match term.split_once(':') {
            Some(("type", v)) => v == "user",
            Some(("email", v)) => {
                u.email
                    .as_deref()
                    .is_some_and(|e| e.eq_ignore_ascii_case(v))
                    || u.identities.iter().any(|e| e.eq_ignore_ascii_case(v))
            }
            Some(("external_id", v)) => u
                .external_id
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(v)),
            Some(("name", v)) => u.name.eq_ignore_ascii_case(v),
            Some(("role", v)) => u.role == v,
            Some(("tags", v)) | Some(("tag", v)) => u.tags.iter().any(|t| t == &v.to_lowercase()),
            Some(("organization_id", v)) => {
                u.organization_id.map(|o| o.to_string()).as_deref() == Some(v)
            }
            _ => {
                let t = term.to_lowercase();
                u.email.as_deref().is_some_and(|e| e.to_lowercase() == t)
                    || u.name.to_lowercase().contains(&t)
            }
        }
    })
}

fn org_matches(o: &crate::store::Organization, query: &str) -> bool {
    query.split_whitespace().all(|term| {
        let term = term.trim_matches('"');
        match term.split_once(':') {
            Some(("type", v)) => v == "organization",
            Some(("external_id", v)) => o
                .external_id
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(v)),
            Some(("name", v)) => o.name.eq_ignore_ascii_case(v),
            Some(("tags", v)) | Some(("tag", v)) => o.tags.iter().any(|t| t == &v.to_lowercase()),
            _ => o.name.to_lowercase().contains(&term.to_lowercase()),
        }
    })
}

fn ticket_matches(t: &crate::store::Ticket, query: &str) -> bool {
    query.split_whitespace().all(|term| {
        let term = term.trim_matches('"');
        match term.split_once(':') {
            Some(("type", v)) => v == "ticket",
            Some(("external_id", v)) => t.external_id.as_deref() == Some(v),
            Some(("status", v)) => t.status == v,
            Some(("tags", v)) | Some(("tag", v)) => t.tags.iter().any(|x| x == &v.to_lowercase()),
            Some(("requester_id", v)) | Some(("requester", v)) => t.requester_id.to_string() == v,
            _ => t
                .subject
                .as_deref()
                .is_some_and(|s| s.to_lowercase().contains(&term.to_lowercase())),
        }
    })
}

fn search(req: &mut Req, t: Target) -> Res {
    let store = lock(&req.account.store);
    let ids: Vec<u64> = match t {
        Target::User => {
            if let Some(ext) = req.query.get("external_id") {
                store.user_id_by_external(ext).into_iter().collect()
            } else if let Some(q) = req.query.get("query") {
                store
                    .users
                    .values()
                    .filter(|u| user_matches(u, q))
                    .map(|u| u.id)
                    .take(1000)
                    .collect()
            } else {
                return Err(missing_param("query"));
            }
        }
        _ => match (req.query.get("external_id"), req.query.get("name")) {
            (Some(_), Some(_)) => {
                return Err(Reply::error(
                    400,
                    "InvalidParameter",
                    "Search by external_id or by name, not both",
                ))
            }
            (Some(ext), None) => store.org_id_by_external(ext).into_iter().collect(),
            (None, Some(name)) => store.org_id_by_name(name).into_iter().collect(),
            (None, None) => return Err(missing_param("external_id")),
        },
    };
    let items: Vec<Value> = ids
        .iter()
        .filter_map(|id| render(&store, req.account, t, *id, req.base))
        .collect();
    let count = items.len();
    Ok(Reply::ok(
        json!({plural(t): items, "next_page": null, "previous_page": null, "count": count}),
    ))
}

fn global_search(req: &mut Req) -> Res {
    let q = req
        .query
        .get("query")
        .ok_or_else(|| Reply::error(400, "invalid", "query parameter is required"))?;
    let store = lock(&req.account.store);
    let kind = q
        .split_whitespace()
        .find_map(|t| t.strip_prefix("type:"))
        .unwrap_or("");
    let mut results: Vec<Value> = Vec::new();
    let tag = |mut v: Value, rt: &str| {
        if let Value::Object(m) = &mut v {
            m.insert("result_type".into(), json!(rt));
        }
        v
    };
    if kind.is_empty() || kind == "user" {
        for u in store.users.values().filter(|u| user_matches(u, q)) {
            results.push(tag(
                store.render_user(u, req.base, tagging_on(req.account, Target::User)),
                "user",
            ));
        }
    }
    if kind.is_empty() || kind == "organization" {
        for o in store.orgs.values().filter(|o| org_matches(o, q)) {
            results.push(tag(store.render_org(o, req.base), "organization"));
        }
    }
    if kind.is_empty() || kind == "ticket" {
        for t in store.tickets.values().filter(|t| ticket_matches(t, q)) {
            results.push(tag(store.render_ticket(t, req.base), "ticket"));
        }
    }
    let count = results.len();
    let page: usize = req
        .query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let per_page: usize = req
        .query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(100)
        .clamp(1, 100);
    if page > 10 {
        return Err(Reply::error(
            422,
            "invalid",
            "Search is limited to the first 1000 results",
        ));
    }
    let results: Vec<Value> = results
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let next = (page * per_page < count.min(1000)).then(|| {
        format!(
            "{}/api/v2/search.json?page={}&per_page={per_page}",
            req.base,
            page + 1
        )
    });
    Ok(Reply::ok(
        json!({"results": results, "facets": null, "next_page": next, "previous_page": null, "count": count}),
    ))
}

fn show(req: &mut Req, t: Target, id: u64) -> Res {
    let store = lock(&req.account.store);
    let v = render(&store, req.account, t, id, req.base).ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(json!({singular(t): v})))
}

/// A ticket audit with one `Change` event per changed attribute and the new comment.
fn audit(
    req: &Req,
    ticket_id: u64,
    before: Option<&Value>,
    after: &Value,
    comment: Option<&crate::store::Comment>,
) -> Value {
    let seq = &req.account.audit_seq;
    let mut events = Vec::new();
    if let Some(c) = comment {
        events.push(Store::render_comment(c));
    }
    for key in [
        "subject",
        "status",
        "priority",
        "type",
        "assignee_id",
        "group_id",
        "organization_id",
        "requester_id",
        "tags",
        "external_id",
    ] {
        let prev = before
            .and_then(|b| b.get(key))
            .cloned()
            .unwrap_or(Value::Null);
        let now = after.get(key).cloned().unwrap_or(Value::Null);
        if prev != now {
            events.push(json!({
                "id": seq.fetch_add(1, Ordering::Relaxed),
                "type": if before.is_some() { "Change" } else { "Create" },
                "field_name": key,
                "value": now,
                "previous_value": if before.is_some() { prev } else { Value::Null },
            }));
        }
    }
    json!({
        "id": seq.fetch_add(1, Ordering::Relaxed),
        "ticket_id": ticket_id,
        "created_at": crate::util::iso(req.now),
        "author_id": req.principal.user_id,
        "metadata": {"system": {"client": "zdsync-sim"}, "custom": {}},
        "via": {"channel": "api", "source": {"from": {}, "to": {}, "rel": null}},
        "events": events,
    })
}

fn ticket_update_limits(req: &Req, id: u64) -> Result<(), Reply> {
    let r = &req.rt.rate;
    let refuse = |ra: u64| {
        let mut reply = Reply::too_many(Some(ra), Value::Null, LimitKind::Endpoint);
        reply.body = crate::server::ReplyBody::Raw(
            "text/html; charset=utf-8",
            "Rate limit for ticket updates exceeded, please wait before updating this ticket again"
                .into(),
        );
        reply
    };
    let mut rate = lock(&req.account.rate);
    if let Some(ra) = rate.check_endpoint("tu".into(), r.ticket_updates, req.now) {
        return Err(refuse(ra));
    }
    let key = format!("tu:{}:{id}", req.principal.user_id);
    if let Some(ra) = rate.check_endpoint(key, r.ticket_updates_per_ticket, req.now) {
        return Err(refuse(ra));
    }
    Ok(())
}

fn op_error(e: OpError) -> Reply {
    match e {
        OpError::NotFound => Reply::not_found(),
        OpError::Invalid(inv) => Reply::json(422, inv.body()),
        OpError::Conflict => Reply::error(
            409,
            "UpdateConflict",
            "Safe Update prevented the update due to outdated ticket data. Please fetch the latest ticket data and try again.",
        ),
    }
}

fn update(req: &mut Req, t: Target, id: u64) -> Res {
    let input = root_object(req, singular(t))?;
    match t {
        Target::User => check_user_write_limit(req, Some(id.to_string()))?,
        Target::Ticket => ticket_update_limits(req, id)?,
        Target::Organization => {}
    }
    let ctx = req.ctx();
    let mut store = lock(&req.account.store);
    let before = if t == Target::Ticket {
        store
            .tickets
            .get(&id)
            .map(|x| (store.render_ticket(x, req.base), x.comments.len()))
    } else {
        None
    };
    let res = match t {
        Target::User => store.update_user(&ctx, id, &input, false),
        Target::Organization => store.update_org(&ctx, id, &input, false),
        Target::Ticket => store.update_ticket(&ctx, id, &input),
    };
    res.map_err(op_error)?;
    let v = render(&store, req.account, t, id, req.base).unwrap_or_default();
    if t == Target::Ticket {
        let tk = &store.tickets[&id];
        let new_comment = before
            .as_ref()
            .filter(|(_, n)| tk.comments.len() > *n)
            .and_then(|_| tk.comments.last());
        let a = audit(req, id, before.as_ref().map(|b| &b.0), &v, new_comment);
        return Ok(Reply::ok(json!({"ticket": v, "audit": a})));
    }
    Ok(Reply::ok(json!({singular(t): v})))
}

fn delete(req: &mut Req, t: Target, id: u64) -> Res {
    let mut store = lock(&req.account.store);
    match t {
        Target::User => {
            if req.principal.user_id == id {
                return Err(Reply::forbidden_role());
            }
            let mut v =
                render(&store, req.account, t, id, req.base).ok_or_else(Reply::not_found)?;
            store.delete_user(id);
            v["active"] = json!(false);
            Ok(Reply::ok(json!({"user": v})))
        }
        Target::Organization => {
            store.delete_org(id).ok_or_else(Reply::not_found)?;
            Ok(Reply::empty(204))
        }
        Target::Ticket => {
            store
                .delete_ticket(id, &crate::util::iso(req.now))
                .ok_or_else(Reply::not_found)?;
            Ok(Reply::empty(204))
        }
    }
}

fn tags(req: &mut Req, t: Target, id: u64, verb: TagVerb) -> Res {
    if !tagging_on(req.account, t) {
        let what = if t == Target::User {
            "User"
        } else {
            "Organization"
        };
        return Err(Reply::error(
            403,
            "Forbidden",
            &format!("{what} tagging is not enabled for this account. Enable it in Admin Center > People > Configuration > End users."),
        ));
    }
    let body = req
        .body
        .as_ref()
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let sent = match verb {
        TagVerb::List => Vec::new(),
        _ => match body.get("tags") {
            Some(v @ (Value::Array(_) | Value::String(_))) => normalize_tags(v),
            _ => return Err(missing_param("tags")),
        },
    };
    let now = crate::util::iso(req.now);
    let mut store = lock(&req.account.store);
    if t == Target::Ticket && matches!(verb, TagVerb::Add | TagVerb::Remove) {
        let tk = store.tickets.get(&id).ok_or_else(Reply::not_found)?;
        if let Some(stamp) = crate::store::safe_update_stamp(&body) {
            if stamp != tk.updated_at {
                return Err(op_error(OpError::Conflict));
            }
        }
    }
    let slot = match t {
        Target::User => store.user_tags_mut(id),
        Target::Organization => store.org_tags_mut(id),
        Target::Ticket => store.ticket_tags_mut(id),
    };
    let (tags, updated_at) = slot.ok_or_else(Reply::not_found)?;
    match verb {
        TagVerb::List => return Ok(Reply::ok(json!({"tags": tags}))),
        TagVerb::Set => *tags = sent,
        TagVerb::Add => add_tags(tags, &sent),
        TagVerb::Remove => remove_tags(tags, &sent),
    }
    *updated_at = now;
    match verb {
        TagVerb::Set => Ok(Reply::json(201, json!({"tags": tags}))),
        TagVerb::Add => Ok(Reply::ok(json!({"tags": tags}))),
        _ => Ok(Reply::empty(204)),
    }
}

fn retention_ms(rt: &Runtime) -> i64 {
    rt.jobs.retention_secs as i64 * 1000
}

fn jobs_show_many(req: &mut Req) -> Res {
    let ids = req
        .query
        .list("ids")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| missing_param("ids"))?;
    let jobs = lock(&req.account.jobs);
    let ret = retention_ms(req.rt);
    let list: Vec<JobView> = ids
        .iter()
        .filter_map(|id| jobs.get(id, req.now, ret))
        .map(Job::view)
        .collect();
    let body = serde_json::to_string(&json_map("job_statuses", list)).unwrap_or_default();
    Ok(Reply::raw_json(200, body))
}

fn job_show(req: &mut Req, id: &str) -> Res {
    let jobs = lock(&req.account.jobs);
    let job = jobs
        .get(id, req.now, retention_ms(req.rt))
        .ok_or_else(Reply::not_found)?;
    let body = serde_json::to_string(&json_map("job_status", job.view())).unwrap_or_default();
    Ok(Reply::raw_json(200, body))
}

/// `{"<key>": value}` for a borrowed value.
fn json_map<T: serde::Serialize>(
    key: &'static str,
    value: T,
) -> std::collections::BTreeMap<&'static str, T> {
    std::iter::once((key, value)).collect()
}

fn fields_list(req: &mut Req, t: Target) -> Res {
    let fs = &req.account.fields;
    let list: Vec<Value> = fs
        .list(t)
        .iter()
        .map(|f| fs.render(f, t, req.base))
        .collect();
    let count = list.len();
    Ok(Reply::ok(
        json!({t.root(): list, "next_page": null, "previous_page": null, "count": count}),
    ))
}

fn field_show(req: &mut Req, t: Target, id: &str) -> Res {
    let fs = &req.account.fields;
    let f = fs.find(t, id).ok_or_else(Reply::not_found)?;
    Ok(Reply::ok(
        json!({field_root_singular(t): fs.render(f, t, req.base)}),
    ))
}

fn field_options(req: &mut Req, t: Target, id: &str) -> Res {
    let fs = &req.account.fields;
    let f = fs.find(t, id).ok_or_else(Reply::not_found)?;
    let list: Vec<Value> = f
        .def
        .custom_field_options
        .iter()
        .map(|o| fs.render_option(f, t, o, req.base))
        .collect();
    let count = list.len();
    Ok(Reply::ok(
        json!({"custom_field_options": list, "next_page": null, "previous_page": null, "count": count}),
    ))
}

/// Queues a job (or refuses it with 429 at the per-account job limit) and starts its task.
/// Returns the rendered `queued` job status.
fn start_job(req: &mut Req, work: JobWork) -> Result<Value, Reply> {
    let rt = req.rt;
    let acct = req.account;
    let ret = retention_ms(rt);
    let total = work.total();
    let (job, rendered) = {
        let mut jobs = lock(&acct.jobs);
        jobs.sweep(req.now, ret);
        if jobs.active >= rt.jobs.max_concurrent {
            return Err(Reply::too_many(
                Some(rt.jobs.limit_retry_after_secs),
                json!({"errors": [{"code": "TooManyJobs", "title": format!("Too many jobs queued or running for this account (limit {})", rt.jobs.max_concurrent)}]}),
                LimitKind::Jobs,
            ));
        }
        let n = req.sim.job_seq.fetch_add(1, Ordering::Relaxed);
        let id = job_id(req.sim.seed, n);
        let job = Job {
            url: format!("{}/api/v2/job_statuses/{id}.json", req.base),
            id,
            job_type: work.job_type(),
            state: JobState::Queued,
            total,
            progress: None,
            message: None,
            results: None,
            created_ms: req.now,
            finished_ms: None,
        };
        let rendered = job.render();
        jobs.insert(job.clone());
        let active = jobs.active as u64;
        let mut c = lock(&acct.counters);
        c.jobs_created += 1;
        c.job_items += total as u64;
        c.max_concurrent_jobs = c.max_concurrent_jobs.max(active);
        (job, rendered)
    };
    let faults = if req.sim.has_faults.load(Ordering::Relaxed) {
        lock(&req.sim.faults).on_job(&acct.subdomain, req.method.as_str(), req.path, total)
    } else {
        JobFaults::default()
    };
    if !faults.fired.is_empty() {
        let mut c = lock(&acct.counters);
        for f in &faults.fired {
            *c.faults.entry(f.name().to_string()).or_default() += 1;
        }
    }
    let task = JobTask {
        account: acct.clone(),
        rt: Arc::new(rt.clone()),
        job_id: job.id,
        work,
        faults,
        epoch: acct.epoch.load(Ordering::SeqCst),
        actor: req.principal.user_id,
        clock: req.sim.clock.clone(),
    };
    tokio::spawn(task.run());
    Ok(rendered)
}

struct JobTask {
    account: Arc<Account>,
    rt: Arc<Runtime>,
    job_id: String,
    work: JobWork,
    faults: JobFaults,
    epoch: u64,
    actor: u64,
    clock: Arc<SimClock>,
}

impl JobTask {
    fn alive(&self) -> bool {
        self.account.epoch.load(Ordering::SeqCst) == self.epoch
    }

    fn set<F: FnOnce(&mut Job)>(&self, f: F) {
        if let Some(j) = lock(&self.account.jobs).jobs.get_mut(&self.job_id) {
            f(j);
        }
    }

    async fn run(self) {
        let clock = self.clock.clone();
        let (q, w) = (self.rt.jobs.queued_ms, self.rt.jobs.working_ms);
        if q > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(q)).await;
        }
        if !self.alive() {
            return;
        }
        self.set(|j| {
            j.state = JobState::Working;
            j.progress = Some(0);
        });
        if w > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(w)).await;
        }
        let total = self.work.total();
        // A killed job has applied its first half; a failed one applied nothing.
        let (end, limit) = match &self.faults.end {
            Some(("failed", m)) => (Some((JobState::Failed, m.clone())), 0),
            Some((_, m)) => (Some((JobState::Killed, m.clone())), total / 2),
            None => (None, total),
        };
        let acct = &self.account;
        let (results, failures) = {
            let mut store = lock(&acct.store);
            if !self.alive() {
                return;
            }
            let ctx = acct.ctx(&self.rt.behavior, clock.now_ms(), self.actor);
            let b = &self.rt.behavior;
            let opts = RunOpts {
                index_base: b.result_index_base,
                failed_id_is_index: b.failed_item_id_is_index,
                org_batch_by_external_id: b.org_batch_by_external_id,
                verbose: b.job_results == crate::config::JobResults::Verbose,
                upsert_echoes_external_id: b.upsert_echoes_external_id,
            };
            run_work(
                &mut store,
                &ctx,
                &self.work,
                &self.faults.failing_items,
                &opts,
                limit,
            )
        };
        let now = clock.now_ms();
        let mut jobs = lock(&acct.jobs);
        if !self.alive() {
            return;
        }
        let done = results.len();
        if let Some(j) = jobs.jobs.get_mut(&self.job_id) {
            j.finished_ms = Some(now);
            match &end {
                Some((state, msg)) => {
                    j.state = *state;
                    j.message = Some(msg.clone());
                    j.progress = Some(done);
                    j.results = if done > 0 {
                        Some(Value::Array(results))
                    } else {
                        None
                    };
                }
                None => {
                    j.state = JobState::Completed;
                    j.message = Some(completed_message(now));
                    j.progress = Some(total);
                    j.results = Some(Value::Array(results));
                }
            }
        }
        jobs.active = jobs.active.saturating_sub(1);
        drop(jobs);
        let mut c = lock(&acct.counters);
        c.job_items_failed += failures as u64;
        match end.map(|e| e.0) {
            Some(JobState::Failed) => c.jobs_failed += 1,
            Some(_) => c.jobs_killed += 1,
            None => c.jobs_completed += 1,
        }
    }
}
