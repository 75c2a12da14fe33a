//! Every object × mode through the real pipeline (`zdsync::run::run`) against the simulator.
//! Each test checks the final Zendesk state row by row (every valid row present exactly once,
//! with the mapped values), the run record's counts, and that running the same export again
//! writes nothing (rows Zendesk refused are the only ones sent again).

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use zdsync::run::{RunRecord, RunStatus};
use zdsync_sim::{SeedData, SimConfig};
use zdsync_tests::{endpoint_delta, only_record, stored_results, write_requests, E2e};

const PLANS: [(&str, &str); 3] = [
    ("Free", "plan_free"),
    ("Pro", "plan_pro"),
    ("Enterprise", "plan_enterprise"),
];
const SEGMENTS: [(&str, &str); 3] = [
    ("SMB", "segment_smb"),
    ("Mid-market", "segment_mid_market"),
    ("Enterprise", "segment_enterprise"),
];

/// Jobs take a moment, as Zendesk's do, so polling is exercised.
fn sim_config() -> SimConfig {
    let mut c = SimConfig::default();
    c.jobs.queued_ms = 5;
    c.jobs.working_ms = 5;
    c
}

// ---------------------------------------------------------------------------------------------
// Rows

#[derive(Clone, Debug)]
struct UserRow {
    pk: String,
    name: String,
    email: String,
    plan: usize,
    seats: u64,
    vip: bool,
}

fn users(n: usize) -> Vec<UserRow> {
    (0..n)
        .map(|i| UserRow {
            pk: format!("u-{i:04}"),
            name: format!("User {i}"),
            email: format!("user{i}@example.com"),
            plan: i % 3,
            seats: (i % 50) as u64,
            vip: i % 5 == 0,
        })
        .collect()
}

/// Rows the plan refuses: a bad email and a missing name.
const BAD_USER_ROWS: &str =
    "u-bad-1,Bad Email,not-an-email,Pro,1,no\nu-bad-2,,nameless@example.com,Pro,1,no\n";

fn users_csv(rows: &[UserRow], extra: &str) -> String {
    let mut s = String::from("USER_ID,FULL_NAME,EMAIL,PLAN,SEATS,VIP\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.pk,
            r.name,
            // Upper case in the export: the email is lower-cased on the way.
            r.email.to_uppercase(),
            PLANS[r.plan].0,
            r.seats,
            if r.vip { "yes" } else { "no" }
        ));
    }
    s.push_str(extra);
    s
}

const USER_MAPPING: &str = r#"name = "FULL_NAME"
email = "EMAIL"
"user_fields.plan" = { column = "PLAN", type = "dropdown" }
"user_fields.seats" = { column = "SEATS", type = "integer" }
"user_fields.vip" = { column = "VIP", type = "checkbox" }"#;

#[derive(Clone, Debug)]
struct OrgRow {
    pk: String,
    name: String,
    domain: String,
    segment: usize,
    notes: String,
}

fn orgs(n: usize) -> Vec<OrgRow> {
    (0..n)
        .map(|i| OrgRow {
            pk: format!("o-{i:04}"),
            name: format!("Org {i}"),
            domain: format!("org{i}.example.com"),
            segment: i % 3,
            notes: "Imported".into(),
        })
        .collect()
}

fn orgs_csv(rows: &[OrgRow]) -> String {
    let mut s = String::from("ORG_ID,NAME,DOMAIN,SEGMENT,NOTES\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{}\n",
            r.pk, r.name, r.domain, SEGMENTS[r.segment].0, r.notes
        ));
    }
    s
}

const ORG_MAPPING: &str = r#"name = "NAME"
domain_names = { column = "DOMAIN", split = "comma" }
notes = "NOTES"
"organization_fields.segment" = { column = "SEGMENT", type = "dropdown" }"#;

#[derive(Clone, Debug)]
struct TicketRow {
    pk: String,
    subject: String,
    description: String,
    priority: &'static str,
}

fn tickets(n: usize) -> Vec<TicketRow> {
    (0..n)
        .map(|i| TicketRow {
            pk: format!("t-{i:04}"),
            subject: format!("Ticket {i}"),
            description: format!("Something broke for customer {i}."),
            priority: ["low", "normal", "high", "urgent"][i % 4],
        })
        .collect()
}

fn tickets_csv(rows: &[TicketRow]) -> String {
    let mut s = String::from("TICKET_ID,SUBJECT,DESCRIPTION,PRIORITY\n");
    for r in rows {
        // Priorities in upper case: coerced to Zendesk's values.
        s.push_str(&format!(
            "{},{},\"{}\",{}\n",
            r.pk,
            r.subject,
            r.description,
            r.priority.to_uppercase()
        ));
    }
    s
}

const TICKET_MAPPING: &str = r#"subject = "SUBJECT"
description = "DESCRIPTION"
priority = "PRIORITY""#;

// ---------------------------------------------------------------------------------------------
// Checks

/// Users the export manages (external ids `u-...`), by external id; fails on a duplicate.
fn managed<'a>(records: &'a [Value], prefix: &str) -> BTreeMap<String, &'a Value> {
    let mut out = BTreeMap::new();
    for r in records {
        if let Some(x) = r["external_id"].as_str().filter(|x| x.starts_with(prefix)) {
            assert!(
                out.insert(x.to_lowercase(), r).is_none(),
                "external_id {x} appears twice in Zendesk"
            );
        }
    }
    out
}

fn assert_users(e: &E2e, rows: &[UserRow]) -> BTreeMap<String, u64> {
    let state = e.state();
    let by_ext = managed(&state.users, "u-");
    assert_eq!(by_ext.len(), rows.len(), "managed users in Zendesk");
    let emails: HashSet<&str> = state
        .users
        .iter()
        .filter_map(|u| u["email"].as_str())
        .collect();
    assert_eq!(emails.len(), state.users.len(), "no email twice");
    let mut ids = BTreeMap::new();
    for r in rows {
        let u = by_ext
            .get(&r.pk)
            .unwrap_or_else(|| panic!("user {} missing", r.pk));
        assert_eq!(u["name"], r.name.as_str(), "{}", r.pk);
        assert_eq!(u["email"], r.email.as_str(), "{}", r.pk);
        assert_eq!(u["role"], "end-user", "{}", r.pk);
        let f = &u["user_fields"];
        assert_eq!(
            f["plan"], PLANS[r.plan].1,
            "{}: dropdown label → value",
            r.pk
        );
        assert_eq!(f["seats"], r.seats, "{}", r.pk);
        assert_eq!(f["vip"], r.vip, "{}", r.pk);
        let tags: Vec<&str> = u["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(tags.contains(&PLANS[r.plan].1), "{}: {tags:?}", r.pk);
        assert_eq!(tags.contains(&"vip_customer"), r.vip, "{}: {tags:?}", r.pk);
        ids.insert(r.pk.clone(), u["id"].as_u64().unwrap());
    }
    ids
}

fn assert_orgs(e: &E2e, rows: &[OrgRow]) -> BTreeMap<String, u64> {
    let state = e.state();
    let by_ext = managed(&state.organizations, "o-");
    assert_eq!(by_ext.len(), rows.len(), "managed organizations in Zendesk");
    let mut ids = BTreeMap::new();
    for r in rows {
        let o = by_ext
            .get(&r.pk)
            .unwrap_or_else(|| panic!("organization {} missing", r.pk));
        assert_eq!(o["name"], r.name.as_str(), "{}", r.pk);
        assert_eq!(o["domain_names"], json!([r.domain]), "{}", r.pk);
        assert_eq!(o["notes"], r.notes.as_str(), "{}", r.pk);
        assert_eq!(
            o["organization_fields"]["segment"], SEGMENTS[r.segment].1,
            "{}: dropdown label → value",
            r.pk
        );
        ids.insert(r.pk.clone(), o["id"].as_u64().unwrap());
    }
    ids
}

fn assert_tickets(e: &E2e, rows: &[TicketRow]) -> BTreeMap<String, u64> {
    let state = e.state();
    let mut ids = BTreeMap::new();
    for r in rows {
        let found = state.tickets_by_external_id(&r.pk);
        assert_eq!(
            found.len(),
            1,
            "ticket {} appears {} times",
            r.pk,
            found.len()
        );
        let t = found[0];
        assert_eq!(t["subject"], r.subject.as_str(), "{}", r.pk);
        assert_eq!(t["description"], r.description.as_str(), "{}", r.pk);
        assert_eq!(t["priority"], r.priority, "{}", r.pk);
        let comments = t["comments"].as_array().unwrap();
        assert_eq!(comments.len(), 1, "{}: only the first comment", r.pk);
        assert_eq!(comments[0]["body"], r.description.as_str(), "{}", r.pk);
        ids.insert(r.pk.clone(), t["id"].as_u64().unwrap());
    }
    assert_eq!(
        state.tickets.len(),
        rows.len(),
        "no other ticket in Zendesk"
    );
    ids
}

#[derive(Debug, Default, Clone, Copy)]
struct Expect {
    read: u64,
    invalid: u64,
    created: u64,
    updated: u64,
    unchanged: u64,
    skipped: u64,
    failed: u64,
    retried: u64,
}

fn assert_counts(rec: &RunRecord, x: Expect) {
    let r = &rec.rows;
    let got = (
        r.read,
        r.invalid,
        r.created,
        r.updated,
        r.unchanged,
        r.skipped,
        r.failed,
        r.retried,
    );
    let want = (
        x.read,
        x.invalid,
        x.created,
        x.updated,
        x.unchanged,
        x.skipped,
        x.failed,
        x.retried,
    );
    assert_eq!(
        got, want,
        "(read, invalid, created, updated, unchanged, skipped, failed, retried) of {rec:#?}"
    );
    assert!(rec.error.is_none(), "{:?}", rec.error);
    let status = if x.failed > 0 || x.invalid > 0 {
        RunStatus::CompletedWithFailures
    } else {
        RunStatus::Succeeded
    };
    assert_eq!(rec.status, status);
    assert_eq!(rec.trigger, "test");
}

/// Run `toml` once and check its record; returns it with the simulator's counter deltas
/// (write requests, job items).
async fn run_expect(e: &E2e, toml: &str, x: Expect) -> (RunRecord, u64, u64) {
    let before = e.counters();
    let outcome = e.run(toml).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let rec = only_record(&outcome).clone();
    assert_counts(&rec, x);
    let after = e.counters();
    assert_eq!(after.early_requests, 0);
    (
        rec,
        write_requests(&after) - write_requests(&before),
        after.job_items - before.job_items,
    )
}

/// The same export again: nothing is written.
async fn assert_rerun_writes_nothing(e: &E2e, toml: &str, unchanged: u64, invalid: u64) {
    let before = e.counters();
    let (rec, writes, _) = run_expect(
        e,
        toml,
        Expect {
            read: unchanged + invalid,
            invalid,
            unchanged,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(
        writes,
        0,
        "a rerun wrote: {:?}",
        endpoint_delta(&before, &e.counters())
    );
    assert_eq!(rec.jobs, 0);
}

/// Failed rows of a run with their reasons, by key.
fn failures(e: &E2e, sync: &str, rec: &RunRecord) -> BTreeMap<String, String> {
    stored_results(e.root(), sync, &rec.run_id)
        .into_iter()
        .filter(|r| r.status == zdsync::changeset::RowStatus::Failed)
        .map(|r| (r.key, r.error.unwrap_or_default()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Users

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_upsert_creates_then_updates_only_changed_rows() {
    let e = E2e::with_config(sim_config()).await;
    let toml = e.toml("users_up", "users", "upsert", "USER_ID", USER_MAPPING);
    let mut rows = users(260);
    e.write_export("users_up", &users_csv(&rows, BAD_USER_ROWS));

    let before = e.counters();
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 262,
            invalid: 2,
            created: 260,
            ..Expect::default()
        },
    )
    .await;
    let after = e.counters();
    assert_eq!(items, 260, "each valid row sent once");
    let d = endpoint_delta(&before, &after);
    assert!(
        d.iter()
            .all(|(k, _)| k != "users.create_many" && k != "users.update_many"),
        "users upsert goes through create_or_update_many only: {d:?}"
    );
    // 260 rows in chunks of 150 → batches of 100, 50, 100, 10.
    assert_eq!(after.endpoint("users.create_or_update_many"), 4);
    assert!(rec.jobs >= 4);
    let reasons: HashSet<&str> = rec
        .invalid_samples
        .iter()
        .map(|s| s.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        HashSet::from(["invalid_email", "missing_required"]),
        "{:?}",
        rec.invalid_samples
    );
    let ids = assert_users(&e, &rows);
    let state = e.state();
    assert!(state.user_by_external_id("u-bad-1").is_none());
    assert!(state.user_by_email("nameless@example.com").is_none());

    assert_rerun_writes_nothing(&e, &toml, 260, 2).await;

    // Rename 20 rows and change the plan of 5 (one overlaps): only those 24 are sent.
    let mut changed = HashSet::new();
    for i in (0..260).step_by(13) {
        rows[i].name = format!("{} (renamed)", rows[i].name);
        changed.insert(i);
    }
    for i in [1, 2, 3, 4, 13] {
        rows[i].plan = (rows[i].plan + 1) % 3;
        changed.insert(i);
    }
    let n = changed.len() as u64;
    assert_eq!(n, 24);
    e.write_export("users_up", &users_csv(&rows, BAD_USER_ROWS));
    let (_, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 262,
            invalid: 2,
            updated: n,
            unchanged: 260 - n,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, n, "only the changed rows are sent");
    let ids2 = assert_users(&e, &rows);
    assert_eq!(ids, ids2, "updates keep every user's id");

    assert_rerun_writes_nothing(&e, &toml, 260, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_insert_refuses_existing_users_and_never_updates() {
    let e = E2e::with_config(sim_config()).await;
    // Already in Zendesk: one with the same external_id and email, one with the same email.
    e.sim
        .seed(
            "acme",
            &SeedData {
                users: vec![
                    json!({"name": "Existing Seven", "email": "user7@example.com", "external_id": "u-0007"}),
                    json!({"name": "Existing Twelve", "email": "user12@example.com"}),
                ],
                ..SeedData::default()
            },
        )
        .unwrap();
    let toml = e.toml("users_in", "users", "insert", "USER_ID", USER_MAPPING);
    let mut rows = users(200);
    e.write_export("users_in", &users_csv(&rows, ""));

    let before = e.counters();
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 200,
            created: 198,
            // u-0007 is in Zendesk with this external id: found, left as it is, not failed.
            skipped: 1,
            failed: 1,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 200);
    let d = endpoint_delta(&before, &e.counters());
    assert!(
        d.iter()
            .all(|(k, _)| k != "users.create_or_update_many" && k != "users.update_many"),
        "insert only creates: {d:?}"
    );
    let failed = failures(&e, "users_in", &rec);
    // u-0012's email belongs to a user with another external id: refused.
    assert_eq!(failed.keys().collect::<Vec<_>>(), ["u-0012"], "{failed:?}");
    for (pk, why) in &failed {
        assert!(why.contains("DuplicateValue"), "{pk}: {why}");
    }
    assert!(
        failed["u-0012"].contains("user12@example.com"),
        "{failed:?}"
    );
    assert_eq!(rec.failed_samples.len(), 1);

    let state = e.state();
    let seven = state.user_by_email("user7@example.com").unwrap();
    assert_eq!(seven["name"], "Existing Seven", "insert never updates");
    let twelve = state.user_by_email("user12@example.com").unwrap();
    assert_eq!(twelve["name"], "Existing Twelve");
    assert!(twelve["external_id"].is_null());
    let created: Vec<UserRow> = rows
        .iter()
        .filter(|r| r.pk != "u-0007" && r.pk != "u-0012")
        .cloned()
        .collect();
    // The seeded u-0007 counts as managed: check the others, then the total.
    let by_ext = managed(&state.users, "u-");
    assert_eq!(by_ext.len(), 199);
    let state_users = state.users.len();
    for r in &created {
        let u = by_ext[&r.pk];
        assert_eq!(u["name"], r.name.as_str());
        assert_eq!(u["email"], r.email.as_str());
        assert_eq!(u["user_fields"]["plan"], PLANS[r.plan].1);
    }

    // Same export: only the refused row goes again (and is refused again).
    let (_, writes, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 200,
            unchanged: 199,
            failed: 1,
            retried: 1,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((writes, items), (1, 1));

    // Changed rows are skipped, never updated.
    for r in rows.iter_mut().take(30) {
        r.name = format!("{} (renamed)", r.name);
    }
    e.write_export("users_in", &users_csv(&rows, ""));
    let (_, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 200,
            unchanged: 170,
            // u-0012 is among the first 30 but was never created: retried.
            skipped: 29,
            failed: 1,
            retried: 1,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 1);
    let state = e.state();
    assert_eq!(state.users.len(), state_users);
    for r in created.iter().take(28) {
        let u = state.user_by_external_id(&r.pk).unwrap();
        assert!(
            !u["name"].as_str().unwrap().contains("renamed"),
            "{}: insert updated a user",
            r.pk
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_update_changes_known_users_and_refuses_unknown_ones() {
    let e = E2e::with_config(sim_config()).await;
    let seeded: Vec<Value> = (0..40)
        .map(|i| {
            json!({
                "name": format!("Old {i}"),
                "email": format!("user{i}@example.com"),
                "external_id": format!("u-{i:04}"),
            })
        })
        .collect();
    e.sim
        .seed(
            "acme",
            &SeedData {
                users: seeded,
                ..SeedData::default()
            },
        )
        .unwrap();
    let users_before = e.state().users.len();
    let toml = e.toml("users_upd", "users", "update", "USER_ID", USER_MAPPING);
    let rows = users(80);
    e.write_export("users_upd", &users_csv(&rows, ""));

    let before = e.counters();
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 80,
            updated: 40,
            failed: 40,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 80);
    let d = endpoint_delta(&before, &e.counters());
    assert!(
        d.iter()
            .all(|(k, _)| !k.contains("create") || !k.starts_with("users")),
        "update mode never creates: {d:?}"
    );
    let failed = failures(&e, "users_upd", &rec);
    assert_eq!(failed.len(), 40);
    for (i, r) in rows.iter().enumerate().skip(40) {
        let why = &failed[&r.pk];
        assert!(why.contains("RecordNotFound"), "{i}: {why}");
        assert!(why.contains(&format!("external_id `{}`", r.pk)), "{why}");
    }
    assert_eq!(e.state().users.len(), users_before, "no user created");
    assert_users(&e, &rows[..40]);

    // Same export: only the refused rows go again.
    let (_, writes, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 80,
            unchanged: 40,
            updated: 0,
            failed: 40,
            retried: 40,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((writes, items), (1, 40));
    assert_eq!(e.state().users.len(), users_before);
}

// ---------------------------------------------------------------------------------------------
// Organizations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_upsert_resolves_unknown_existing_orgs_and_updates_by_id() {
    let e = E2e::with_config(sim_config()).await;
    // In Zendesk already, unknown to zdsync's state.
    let seeded = e
        .sim
        .seed(
            "acme",
            &SeedData {
                organizations: vec![json!({
                    "name": "Legacy Org Five",
                    "external_id": "O-0005",
                    "notes": "from the old CRM"
                })],
                ..SeedData::default()
            },
        )
        .unwrap();
    let legacy_id = seeded.organizations[0];
    let toml = e.toml("orgs_up", "organizations", "upsert", "ORG_ID", ORG_MAPPING);
    let mut rows = orgs(220);
    e.write_export("orgs_up", &orgs_csv(&rows));

    let before = e.counters();
    let (_, _, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: 220,
            created: 219,
            updated: 1,
            ..Expect::default()
        },
    )
    .await;
    let after = e.counters();
    assert!(after.endpoint("organizations.show_many") > before.endpoint("organizations.show_many"));
    let ids = assert_orgs(&e, &rows);
    assert_eq!(
        ids["o-0005"], legacy_id,
        "the existing organization was updated"
    );
    assert_eq!(e.state().organizations.len(), 220);

    assert_rerun_writes_nothing(&e, &toml, 220, 0).await;

    let mut changed = 0;
    for r in rows.iter_mut().step_by(15) {
        r.notes = "Renewal in Q3".into();
        changed += 1;
    }
    rows[7].segment = (rows[7].segment + 1) % 3;
    changed += 1;
    e.write_export("orgs_up", &orgs_csv(&rows));
    let before = e.counters();
    let (_, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 220,
            updated: changed,
            unchanged: 220 - changed,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, changed);
    let d = endpoint_delta(&before, &e.counters());
    assert!(
        d.iter().all(|(k, _)| k != "organizations.create_many"),
        "{d:?}"
    );
    assert_eq!(ids, assert_orgs(&e, &rows), "updates keep ids");
    assert_eq!(e.state().organizations.len(), 220);

    assert_rerun_writes_nothing(&e, &toml, 220, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_insert_creates_and_never_updates() {
    let e = E2e::with_config(sim_config()).await;
    e.sim
        .seed(
            "acme",
            &SeedData {
                organizations: vec![
                    json!({"name": "Org 3", "external_id": "o-0003", "notes": "kept"}),
                ],
                ..SeedData::default()
            },
        )
        .unwrap();
    let toml = e.toml("orgs_in", "organizations", "insert", "ORG_ID", ORG_MAPPING);
    let mut rows = orgs(160);
    e.write_export("orgs_in", &orgs_csv(&rows));

    let before = e.counters();
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 160,
            created: 159,
            // o-0003 is in Zendesk with this external id: found, left as it is, not failed.
            skipped: 1,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 160);
    let d = endpoint_delta(&before, &e.counters());
    assert!(
        d.iter().all(|(k, _)| k != "organizations.update_many"),
        "insert never updates: {d:?}"
    );
    assert!(failures(&e, "orgs_in", &rec).is_empty());
    let state = e.state();
    assert_eq!(state.organizations.len(), 160);
    assert_eq!(
        state.organization_by_external_id("o-0003").unwrap()["notes"],
        "kept"
    );
    let others: Vec<OrgRow> = rows.iter().filter(|r| r.pk != "o-0003").cloned().collect();
    let by_ext = managed(&state.organizations, "o-");
    for r in &others {
        let o = by_ext[&r.pk];
        assert_eq!(o["name"], r.name.as_str());
        assert_eq!(o["notes"], "Imported");
        assert_eq!(o["organization_fields"]["segment"], SEGMENTS[r.segment].1);
    }

    // Changed rows are skipped; nothing is sent.
    for r in rows.iter_mut().skip(100).take(10) {
        r.notes = "changed".into();
    }
    e.write_export("orgs_in", &orgs_csv(&rows));
    let (_, writes, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 160,
            unchanged: 150,
            skipped: 10,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((writes, items), (0, 0));
    let state = e.state();
    assert_eq!(state.organizations.len(), 160);
    for r in rows.iter().skip(100).take(10) {
        assert_eq!(
            state.organization_by_external_id(&r.pk).unwrap()["notes"],
            "Imported"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_update_changes_known_orgs_and_refuses_unknown_ones() {
    let e = E2e::with_config(sim_config()).await;
    let seeded: Vec<Value> = (0..25)
        .map(|i| json!({"name": format!("Seed Org {i}"), "external_id": format!("o-{i:04}")}))
        .collect();
    e.sim
        .seed(
            "acme",
            &SeedData {
                organizations: seeded,
                ..SeedData::default()
            },
        )
        .unwrap();
    let toml = e.toml("orgs_upd", "organizations", "update", "ORG_ID", ORG_MAPPING);
    let rows = orgs(50);
    e.write_export("orgs_upd", &orgs_csv(&rows));

    let before = e.counters();
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 50,
            updated: 25,
            failed: 25,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 50);
    let d = endpoint_delta(&before, &e.counters());
    assert!(
        d.iter().all(|(k, _)| k != "organizations.create_many"),
        "{d:?}"
    );
    let failed = failures(&e, "orgs_upd", &rec);
    assert_eq!(failed.len(), 25);
    for r in &rows[25..] {
        let why = &failed[&r.pk];
        assert!(why.contains("RecordNotFound"), "{why}");
        assert!(why.contains(&format!("external_id `{}`", r.pk)), "{why}");
    }
    assert_eq!(e.state().organizations.len(), 25, "nothing created");
    assert_orgs(&e, &rows[..25]);

    let (_, writes, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 50,
            unchanged: 25,
            failed: 25,
            retried: 25,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((writes, items), (1, 25));
}

// ---------------------------------------------------------------------------------------------
// Tickets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_insert_creates_each_ticket_once() {
    let e = E2e::with_config(sim_config()).await;
    let toml = e.toml("tix_in", "tickets", "insert", "TICKET_ID", TICKET_MAPPING);
    let mut rows = tickets(130);
    e.write_export("tix_in", &tickets_csv(&rows));

    run_expect(
        &e,
        &toml,
        Expect {
            read: 130,
            created: 130,
            ..Expect::default()
        },
    )
    .await;
    let ids = assert_tickets(&e, &rows);

    assert_rerun_writes_nothing(&e, &toml, 130, 0).await;

    for r in rows.iter_mut().take(12) {
        r.subject = format!("{} (edited)", r.subject);
    }
    e.write_export("tix_in", &tickets_csv(&rows));
    let (_, writes, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: 130,
            unchanged: 118,
            skipped: 12,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(writes, 0);
    let state = e.state();
    for (pk, id) in ids.iter().take(12) {
        let t = state.ticket(*id).unwrap();
        assert_eq!(t["external_id"], pk.as_str());
        assert!(!t["subject"].as_str().unwrap().contains("edited"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_upsert_updates_the_same_tickets() {
    let e = E2e::with_config(sim_config()).await;
    let toml = e.toml("tix_up", "tickets", "upsert", "TICKET_ID", TICKET_MAPPING);
    let mut rows = tickets(170);
    e.write_export("tix_up", &tickets_csv(&rows));

    run_expect(
        &e,
        &toml,
        Expect {
            read: 170,
            created: 170,
            ..Expect::default()
        },
    )
    .await;
    let ids = assert_tickets(&e, &rows);

    assert_rerun_writes_nothing(&e, &toml, 170, 0).await;

    for r in rows.iter_mut().step_by(6) {
        r.subject = format!("{} (edited)", r.subject);
    }
    let n = rows.iter().filter(|r| r.subject.contains("edited")).count() as u64;
    e.write_export("tix_up", &tickets_csv(&rows));
    let before = e.counters();
    let (_, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 170,
            updated: n,
            unchanged: 170 - n,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, n);
    let d = endpoint_delta(&before, &e.counters());
    assert!(d.iter().all(|(k, _)| k != "tickets.create_many"), "{d:?}");
    assert_eq!(ids, assert_tickets(&e, &rows), "the same ticket ids");

    assert_rerun_writes_nothing(&e, &toml, 170, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_update_needs_recorded_ids_then_updates_by_id() {
    let e = E2e::with_config(sim_config()).await;
    let update = e.toml("tix", "tickets", "update", "TICKET_ID", TICKET_MAPPING);
    let upsert = e.toml("tix", "tickets", "upsert", "TICKET_ID", TICKET_MAPPING);
    let mut rows = tickets(60);
    e.write_export("tix", &tickets_csv(&rows));

    // No ticket id recorded: every row fails, nothing is sent.
    let (rec, writes, _) = run_expect(
        &e,
        &update,
        Expect {
            read: 60,
            failed: 60,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(writes, 0);
    assert!(e.state().tickets.is_empty());
    let failed = failures(&e, "tix", &rec);
    assert_eq!(failed.len(), 60);
    for (pk, why) in &failed {
        assert!(
            why.contains("no Zendesk ticket id is recorded") && why.contains(pk.as_str()),
            "{why}"
        );
    }

    // An upsert run of the same sync creates them (the failed keys are retried as creates).
    run_expect(
        &e,
        &upsert,
        Expect {
            read: 60,
            created: 60,
            retried: 60,
            ..Expect::default()
        },
    )
    .await;
    let ids = assert_tickets(&e, &rows);

    // Update mode, changed subjects: updated by the recorded ids.
    for r in rows.iter_mut().step_by(3) {
        r.subject = format!("{} (edited)", r.subject);
    }
    e.write_export("tix", &tickets_csv(&rows));
    let before = e.counters();
    let (_, _, items) = run_expect(
        &e,
        &update,
        Expect {
            read: 60,
            updated: 20,
            unchanged: 40,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 20);
    let d = endpoint_delta(&before, &e.counters());
    assert!(d.iter().all(|(k, _)| k != "tickets.create_many"), "{d:?}");
    assert_eq!(ids, assert_tickets(&e, &rows));

    assert_rerun_writes_nothing(&e, &update, 60, 0).await;
}

// ---------------------------------------------------------------------------------------------
// Records deleted in Zendesk since zdsync confirmed them

/// Deletes a record through the API (`plural` = `tickets`, `organizations`, `users`).
async fn delete_in_zendesk(e: &E2e, plural: &str, id: u64) {
    let c = zdsync::zendesk::Client::new(
        zdsync::zendesk::ClientOptions::for_subdomain("acme", Some(&e.sim.base_url())),
        zdsync::zendesk::credential_store("file:creds.json", e.root()).unwrap(),
    )
    .await
    .unwrap();
    c.send(
        reqwest::Method::DELETE,
        &format!("/api/v2/{plural}/{id}.json"),
        Vec::new(),
        zdsync::zendesk::Idempotency::Safe,
    )
    .await
    .unwrap();
}

/// One object's upsert after its record 42 was deleted in Zendesk: the changed row is created
/// again under a new id (a ticket with its description as the first comment, like any new
/// ticket), nothing else is sent, and a rerun writes nothing.
async fn upsert_recreates_a_deleted_record<R>(
    (sync, object, pk, mapping): (&str, &str, &str, &str),
    mut rows: Vec<R>,
    key: &str,
    csv: fn(&[R]) -> String,
    change: fn(&mut R),
    check: fn(&E2e, &[R]) -> BTreeMap<String, u64>,
) {
    let n = rows.len() as u64;
    let e = E2e::with_config(sim_config()).await;
    let toml = e.toml(sync, object, "upsert", pk, mapping);
    e.write_export(sync, &csv(&rows));
    run_expect(
        &e,
        &toml,
        Expect {
            read: n,
            created: n,
            ..Expect::default()
        },
    )
    .await;
    let ids = check(&e, &rows);
    delete_in_zendesk(&e, object, ids[key]).await;
    change(&mut rows[42]);
    e.write_export(sync, &csv(&rows));
    let (rec, _, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: n,
            created: 1,
            unchanged: n - 1,
            ..Expect::default()
        },
    )
    .await;
    assert!(rec.failed_samples.is_empty(), "{:?}", rec.failed_samples);
    let ids2 = check(&e, &rows);
    assert_ne!(ids2[key], ids[key], "a new {object} record");
    assert_rerun_writes_nothing(&e, &toml, n, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_upsert_recreates_an_org_deleted_in_zendesk() {
    upsert_recreates_a_deleted_record(
        ("orgs_gone", "organizations", "ORG_ID", ORG_MAPPING),
        orgs(120),
        "o-0042",
        orgs_csv,
        |r| r.notes = "changed after the delete".into(),
        assert_orgs,
    )
    .await;
}

/// The recreate carries the create payload (with the description as the first comment): an
/// update payload has none, and Zendesk would refuse it ("Description: cannot be blank").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_upsert_recreates_a_ticket_deleted_in_zendesk() {
    upsert_recreates_a_deleted_record(
        ("tix_gone", "tickets", "TICKET_ID", TICKET_MAPPING),
        tickets(110),
        "t-0042",
        tickets_csv,
        |r| r.subject = "Changed after the delete".into(),
        assert_tickets,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_gone_from_the_export_are_reported_once_and_nothing_is_deleted() {
    let e = E2e::with_config(sim_config()).await;
    let toml = e.toml("users_rm", "users", "upsert", "USER_ID", USER_MAPPING);
    let rows = users(180);
    e.write_export("users_rm", &users_csv(&rows, ""));
    run_expect(
        &e,
        &toml,
        Expect {
            read: 180,
            created: 180,
            ..Expect::default()
        },
    )
    .await;

    // 20 keys leave the export; one more turns invalid (it is neither removed nor sent).
    let mut kept: Vec<UserRow> = rows[..160].to_vec();
    kept[5].email = "not-an-email".into();
    e.write_export("users_rm", &users_csv(&kept, ""));
    let before = e.counters();
    let (rec, _, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: 160,
            invalid: 1,
            unchanged: 159,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(rec.rows.removed, 20);
    assert_eq!(write_requests(&e.counters()), write_requests(&before));
    assert_users(&e, &rows);

    // Reported once.
    let (rec, writes, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: 160,
            invalid: 1,
            unchanged: 159,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((rec.rows.removed, writes), (0, 0));

    // Back in the export (unchanged values): sent again, matched to the same users.
    e.write_export("users_rm", &users_csv(&rows, ""));
    let (rec, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 180,
            updated: 20,
            unchanged: 160,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!((rec.rows.removed, items), (0, 20));
    assert_users(&e, &rows);
    assert_rerun_writes_nothing(&e, &toml, 180, 0).await;
}

// ---------------------------------------------------------------------------------------------
// Ticket custom fields, users matched by email

/// Ticket field ids by title, from the account's field definitions.
async fn ticket_field_ids(e: &E2e) -> BTreeMap<String, u64> {
    zdsync_tests::ticket_field_ids(&e.sim.base_url(), "file:creds.json", e.root()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticket_custom_fields_are_written_by_id_with_option_values() {
    let e = E2e::with_config(sim_config()).await;
    let ids = ticket_field_ids(&e).await;
    let (category, seats, escalated, products) = (
        ids["Category"],
        ids["Seat count"],
        ids["Escalated"],
        ids["Affected products"],
    );
    let mapping = format!(
        r#"subject = "SUBJECT"
description = "DESCRIPTION"
"custom_fields.{category}" = {{ column = "CATEGORY", type = "tagger" }}
"custom_fields.{seats}" = {{ column = "SEATS", type = "integer" }}
"custom_fields.{escalated}" = {{ column = "ESCALATED", type = "checkbox" }}
"custom_fields.{products}" = {{ column = "PRODUCTS", type = "multiselect", split = "comma" }}"#
    );
    const CATS: [(&str, &str); 3] = [
        ("Billing", "category_billing"),
        ("Technical", "category_technical"),
        ("Account", "category_account"),
    ];
    let csv = |n: usize, bump: usize| {
        let mut s =
            String::from("TICKET_ID,SUBJECT,DESCRIPTION,CATEGORY,SEATS,ESCALATED,PRODUCTS\n");
        for i in 0..n {
            s.push_str(&format!(
                "t-{i:04},Ticket {i},Body {i},{},{},{},\"{}\"\n",
                CATS[(i + usize::from(i < bump)) % 3].0,
                i * 2,
                if i % 4 == 0 { "true" } else { "false" },
                if i % 2 == 0 { "Support,Chat" } else { "Guide" }
            ));
        }
        s
    };
    let check = |bump: usize| {
        let state = e.state();
        assert_eq!(state.tickets.len(), 120);
        for i in 0..120 {
            let found = state.tickets_by_external_id(&format!("t-{i:04}"));
            assert_eq!(found.len(), 1);
            let t = found[0];
            let value = |id: u64| {
                t["custom_fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["id"] == id)
                    .map(|f| f["value"].clone())
                    .unwrap_or(Value::Null)
            };
            let cat = CATS[(i + usize::from(i < bump)) % 3].1;
            assert_eq!(value(category), cat, "t-{i:04}: option label → value");
            assert_eq!(value(seats), (i * 2).to_string(), "t-{i:04}");
            assert_eq!(value(escalated), i % 4 == 0, "t-{i:04}");
            let mut want = if i % 2 == 0 {
                vec!["affected_chat", "affected_support"]
            } else {
                vec!["affected_guide"]
            };
            let mut got: Vec<String> = value(products)
                .as_array()
                .unwrap_or_else(|| panic!("t-{i:04}: {}", value(products)))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "t-{i:04}");
            let tags: Vec<&str> = t["tags"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(tags.contains(&cat), "t-{i:04}: {tags:?}");
            assert_eq!(
                tags.contains(&"escalated"),
                i % 4 == 0,
                "t-{i:04}: {tags:?}"
            );
        }
    };
    let toml = e.toml("tix_cf", "tickets", "upsert", "TICKET_ID", &mapping);
    e.write_export("tix_cf", &csv(120, 0));
    run_expect(
        &e,
        &toml,
        Expect {
            read: 120,
            created: 120,
            ..Expect::default()
        },
    )
    .await;
    check(0);
    assert_rerun_writes_nothing(&e, &toml, 120, 0).await;

    // A new category for the first 10: only those are updated.
    e.write_export("tix_cf", &csv(120, 10));
    let (_, _, items) = run_expect(
        &e,
        &toml,
        Expect {
            read: 120,
            updated: 10,
            unchanged: 110,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(items, 10);
    check(10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_upsert_adopts_existing_users_matched_by_email() {
    let e = E2e::with_config(sim_config()).await;
    let seeded = e
        .sim
        .seed(
            "acme",
            &SeedData {
                users: vec![
                    json!({"name": "Legacy Three", "email": "user3@example.com"}),
                    json!({"name": "Legacy Nine", "email": "user9@example.com", "external_id": "U-0009"}),
                ],
                ..SeedData::default()
            },
        )
        .unwrap();
    let toml = e.toml("users_adopt", "users", "upsert", "USER_ID", USER_MAPPING);
    let rows = users(120);
    e.write_export("users_adopt", &users_csv(&rows, ""));
    run_expect(
        &e,
        &toml,
        Expect {
            read: 120,
            created: 118,
            updated: 2,
            ..Expect::default()
        },
    )
    .await;
    let ids = assert_users(&e, &rows);
    assert_eq!(
        ids["u-0003"], seeded.users[0],
        "matched by email, not duplicated"
    );
    assert_eq!(
        ids["u-0009"], seeded.users[1],
        "matched by external_id in any case"
    );
    assert_eq!(e.state().users.len(), 121);
    assert_rerun_writes_nothing(&e, &toml, 120, 0).await;
}

// ---------------------------------------------------------------------------------------------
// Job results numbered from 1 (zendesk-api.md §8: 0-based is [unsure])

fn one_based() -> SimConfig {
    let mut c = sim_config();
    c.behavior.result_index_base = 1;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_based_job_results_map_to_the_right_rows() {
    // Users insert (create_many) with a refused row in the middle of a batch.
    let e = E2e::with_config(one_based()).await;
    e.sim
        .seed(
            "acme",
            &SeedData {
                users: vec![json!({"name": "Existing", "email": "user50@example.com"})],
                ..SeedData::default()
            },
        )
        .unwrap();
    let toml = e.toml("u1", "users", "insert", "USER_ID", USER_MAPPING);
    let rows = users(230);
    e.write_export("u1", &users_csv(&rows, ""));
    let (rec, _, _) = run_expect(
        &e,
        &toml,
        Expect {
            read: 230,
            created: 229,
            failed: 1,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(
        failures(&e, "u1", &rec).keys().collect::<Vec<_>>(),
        ["u-0050"]
    );
    let state = e.state();
    for r in rows.iter().filter(|r| r.pk != "u-0050") {
        let u = state.user_by_external_id(&r.pk).unwrap();
        assert_eq!(u["email"], r.email.as_str());
    }

    // Tickets upsert: creates, then updates by the recorded ids.
    let toml = e.toml("t1", "tickets", "upsert", "TICKET_ID", TICKET_MAPPING);
    let mut rows = tickets(150);
    e.write_export("t1", &tickets_csv(&rows));
    run_expect(
        &e,
        &toml,
        Expect {
            read: 150,
            created: 150,
            ..Expect::default()
        },
    )
    .await;
    let ids = assert_tickets(&e, &rows);
    for r in rows.iter_mut().step_by(2) {
        r.subject = format!("{} (edited)", r.subject);
    }
    e.write_export("t1", &tickets_csv(&rows));
    run_expect(
        &e,
        &toml,
        Expect {
            read: 150,
            updated: 75,
            unchanged: 75,
            ..Expect::default()
        },
    )
    .await;
    assert_eq!(ids, assert_tickets(&e, &rows));
    assert_rerun_writes_nothing(&e, &toml, 150, 0).await;
}

/// A killed job applies its first half and reports results for those items only. With 1-based
/// indexes, `map_results` (shared/src/write.rs) decides the base from `min >= 1 && max == n`,
/// which a partial result list never meets: it reads them as 0-based, so every result lands on
/// the row after its own. BUG: row 50 (never created) is confirmed with row 49's ticket id and
/// rows 1..=49 get their neighbour's id; the state then points at the wrong tickets and t-0050
/// is never created. Run with `--ignored` to see it fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_based_results_of_a_killed_job_map_to_the_right_rows() {
    let e = E2e::with_config(one_based()).await;
    e.sim.set_fault_rules(vec![zdsync_sim::FaultRule::new(
        zdsync_sim::FaultKind::KillJob,
    )
    .path("/api/v2/tickets/create_many")
    .times(1)]);
    let toml = e.toml("t_kill", "tickets", "insert", "TICKET_ID", TICKET_MAPPING);
    let rows = tickets(100);
    e.write_export("t_kill", &tickets_csv(&rows));
    let outcome = e.run(&toml).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let rec = only_record(&outcome).clone();
    // The first half was applied and is confirmed; the rest failed with the job's reason.
    assert_eq!(
        (rec.rows.created, rec.rows.failed),
        (50, 50),
        "{:?}",
        rec.failed_samples
    );
    let confirmed: BTreeMap<String, u64> = stored_results(e.root(), "t_kill", &rec.run_id)
        .into_iter()
        .filter_map(|r| r.zendesk_id.map(|id| (r.key, id)))
        .collect();
    let state = e.state();
    for (pk, id) in &confirmed {
        assert_eq!(
            state.ticket(*id).map(|t| t["external_id"].clone()),
            Some(json!(pk)),
            "{pk} was confirmed with the id of another ticket"
        );
    }
    // The next run creates the rest, each ticket once.
    e.sim.clear_faults();
    run_expect(
        &e,
        &toml,
        Expect {
            read: 100,
            created: 50,
            unchanged: 50,
            retried: 50,
            ..Expect::default()
        },
    )
    .await;
    assert_tickets(&e, &rows);
}
