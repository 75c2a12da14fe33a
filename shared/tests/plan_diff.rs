//! plan end to end on a local folder: first run, unchanged re-run, 1 % changed, failed-row
//! retry, mapping change, removed keys, duplicates, insert and update modes.

use std::collections::{BTreeSet, HashMap};
use zdsync::changeset::{self, ChunkRow, Manifest, Op, ResultRow, RowStatus};
use zdsync::config::SyncConfig;
use zdsync::layout;
use zdsync::plan::{plan, PlanOptions, PlanReport};
use zdsync::store::{LocalStore, ObjectStore};

const CONFIG: &str = r#"
name = "people"
object = "users"
mode = "upsert"
primary_key = "id"
chunk_rows = 100

[source]
location = "exports/people/"

[zendesk]
subdomain = "acme"

[mapping]
name = "name"
email = "email"
"user_fields.score" = { column = "score", type = "integer" }
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    store: LocalStore,
    runs: u32,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        Fixture {
            _dir: dir,
            store,
            runs: 0,
        }
    }

    fn export(&self, rows: &[(String, String, String, i64)]) {
        let mut csv = String::from("id,name,email,score\n");
        for (id, name, email, score) in rows {
            csv.push_str(&format!("{id},{name},{email},{score}\n"));
        }
        self.store
            .put("exports/people/part-0.csv", csv.as_bytes())
            .unwrap();
    }

    fn plan(&mut self, config: &str) -> PlanReport {
        self.runs += 1;
        let cfg = SyncConfig::parse(config, "people.toml").unwrap();
        plan(
            &self.store,
            &cfg,
            &PlanOptions::new(format!("run-{:03}", self.runs)),
        )
        .unwrap()
    }

    fn manifest(&self, r: &PlanReport) -> Manifest {
        changeset::read_manifest(&self.store, r.manifest_key.as_ref().unwrap()).unwrap()
    }

    fn rows(&self, m: &Manifest, op: Op) -> Vec<ChunkRow> {
        m.chunks
            .iter()
            .filter(|c| c.op == op)
            .flat_map(|c| changeset::read_jsonl::<ChunkRow>(&self.store, &c.key).unwrap())
            .collect()
    }

    /// What write-batch does: record an outcome per chunk row (`fail` decides failures).
    fn write_results(&self, m: &Manifest, fail: impl Fn(&str) -> bool) {
        for c in &m.chunks {
            let mut out = String::new();
            for row in changeset::read_jsonl::<ChunkRow>(&self.store, &c.key).unwrap() {
                let num: u64 = row.key.trim_start_matches('p').parse().unwrap();
                let r = if fail(&row.key) {
                    ResultRow {
                        index: row.index,
                        key: row.key.clone(),
                        status: RowStatus::Failed,
                        zendesk_id: None,
                        error: Some("RecordInvalid: nope".into()),
                        unknown: false,
                        action: None,
                    }
                } else {
                    ResultRow {
                        index: row.index,
                        key: row.key.clone(),
                        status: RowStatus::Confirmed,
                        zendesk_id: Some(90_000 + num),
                        error: None,
                        unknown: false,
                        action: None,
                    }
                };
                out.push_str(&serde_json::to_string(&r).unwrap());
                out.push('\n');
            }
            let key =
                layout::batch_results_key(&m.sync, &m.run_id, layout::chunk_name(&c.key), "b0");
            self.store.put(&key, out.as_bytes()).unwrap();
        }
    }

    fn confirm_all(&self, r: &PlanReport) {
        let m = self.manifest(r);
        self.write_results(&m, |_| false);
        changeset::fold(&self.store, &m).unwrap();
    }
}

fn people(n: usize) -> Vec<(String, String, String, i64)> {
    (0..n)
        .map(|i| {
            (
                format!("p{i}"),
                format!("Person {i}"),
                format!("person{i}@example.com"),
                i as i64,
            )
        })
        .collect()
}

fn pks(rows: &[ChunkRow]) -> BTreeSet<String> {
    rows.iter().map(|r| r.key.clone()).collect()
}

#[test]
fn first_run_creates_everything_then_unchanged_rerun_sends_nothing() {
    let mut f = Fixture::new();
    f.export(&people(1000));
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!(
        (
            c.rows_read,
            c.invalid,
            c.create,
            c.update,
            c.unchanged,
            c.removed
        ),
        (1000, 0, 1000, 0, 0, 0)
    );
    let m = f.manifest(&r);
    assert_eq!(m.chunks.len(), 10, "chunk_rows = 100");
    assert!(m.chunks.iter().all(|c| c.rows == 100 && c.op == Op::Create));
    let rows = f.rows(&m, Op::Create);
    assert_eq!(pks(&rows).len(), 1000);
    let p7 = rows.iter().find(|r| r.key == "p7").unwrap();
    assert_eq!(
        p7.payload,
        serde_json::json!({"external_id":"p7","name":"Person 7","email":"person7@example.com","user_fields":{"score":7}})
    );
    assert_eq!(p7.source, "exports/people/part-0.csv:9");

    f.confirm_all(&r);
    let r2 = f.plan(CONFIG);
    let c = &r2.manifest.counts;
    assert_eq!(
        (c.create, c.update, c.unchanged, c.removed),
        (0, 0, 1000, 0)
    );
    assert!(r2.manifest.chunks.is_empty());
    assert_eq!(r2.manifest.base_state_run.as_deref(), Some("run-001"));
}

#[test]
fn one_percent_changed_sends_exactly_the_changed_rows_with_their_ids() {
    let mut f = Fixture::new();
    let mut rows = people(2000);
    f.export(&rows);
    let r = f.plan(CONFIG);
    f.confirm_all(&r);

    let changed: BTreeSet<String> = (0..2000).step_by(100).map(|i| format!("p{i}")).collect();
    for row in rows.iter_mut() {
        if changed.contains(&row.0) {
            row.3 += 1_000_000;
        }
    }
    f.export(&rows);
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.update, c.unchanged), (0, 20, 1980));
    let m = f.manifest(&r);
    let updates = f.rows(&m, Op::Update);
    assert_eq!(pks(&updates), changed);
    // Updates carry the Zendesk id confirmed last run.
    let p100 = updates.iter().find(|r| r.key == "p100").unwrap();
    assert_eq!(p100.zendesk_id, Some(90_100));
    assert_eq!(p100.payload["user_fields"]["score"], 1_000_100);
}

#[test]
fn failed_rows_go_again_next_run_and_then_settle() {
    let mut f = Fixture::new();
    f.export(&people(300));
    let r = f.plan(CONFIG);
    let m = f.manifest(&r);
    f.write_results(&m, |pk| pk == "p5" || pk == "p250");
    let folded = changeset::fold(&f.store, &m).unwrap();
    assert_eq!((folded.confirmed, folded.failed), (298, 2));

    // Unchanged export: the two failed rows are resent (as creates: Zendesk never had them).
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.update, c.unchanged, c.retried), (2, 0, 298, 2));
    let m = f.manifest(&r);
    assert_eq!(
        pks(&f.rows(&m, Op::Create)),
        BTreeSet::from(["p5".to_string(), "p250".to_string()])
    );

    // A chunk whose outcome never came back counts as failed too.
    f.fold_without_results(&m);
    let r = f.plan(CONFIG);
    assert_eq!(r.manifest.counts.create, 2);
    f.confirm_all(&r);
    let r = f.plan(CONFIG);
    assert_eq!(
        (r.manifest.counts.create, r.manifest.counts.unchanged),
        (0, 300)
    );
}

impl Fixture {
    fn fold_without_results(&self, m: &Manifest) {
        let s = changeset::fold(&self.store, m).unwrap();
        assert_eq!((s.confirmed, s.unknown), (0, 2));
    }
}

#[test]
fn an_updated_row_that_fails_keeps_its_id_and_is_retried_as_an_update() {
    let mut f = Fixture::new();
    let mut rows = people(200);
    f.export(&rows);
    let r = f.plan(CONFIG);
    f.confirm_all(&r);
    rows[3].1 = "Renamed".into();
    f.export(&rows);
    let r = f.plan(CONFIG);
    let m = f.manifest(&r);
    f.write_results(&m, |_| true);
    changeset::fold(&f.store, &m).unwrap();
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.update, c.retried), (1, 1));
    let upd = f.rows(&f.manifest(&r), Op::Update);
    assert_eq!(
        (upd[0].key.as_str(), upd[0].zendesk_id),
        ("p3", Some(90_003))
    );
}

#[test]
fn changing_the_mapping_forces_a_full_resend() {
    let mut f = Fixture::new();
    f.export(&people(500));
    let r = f.plan(CONFIG);
    assert_eq!(
        r.manifest.mapping_change, None,
        "no state yet: nothing to announce"
    );
    f.confirm_all(&r);
    let r = f.plan(CONFIG);
    assert_eq!(r.manifest.mapping_change, None);
    f.confirm_all(&r);
    let confirmed_by = r.manifest.run_id.clone();
    // A new row and a changed mapping: only the 500 known rows count as resent.
    let mut more = people(500);
    more.extend(people(501).into_iter().skip(500));
    f.export(&more);
    let changed = CONFIG.replace("type = \"integer\"", "type = \"decimal\"");
    let r = f.plan(&changed);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.update, c.unchanged), (1, 500, 0));
    let change = r.manifest.mapping_change.clone().expect("announced");
    assert_eq!(change.resend, 500);
    assert_eq!(change.since_run.as_deref(), Some(confirmed_by.as_str()));
    let cost = r.manifest.cost(600);
    assert_eq!(
        (cost.rows, cost.calls),
        (501, 6),
        "chunks of 100: 5 update calls, 1 create"
    );
    let line = zdsync::plan::mapping_change_line(&r.manifest, 600).unwrap();
    assert!(
        line.contains("500 rows already in Zendesk are sent again"),
        "{line}"
    );
    assert!(line.contains(&confirmed_by), "{line}");
    f.export(&people(500));
    let added = format!("{CONFIG}notes = \"name\"\n");
    f.confirm_all(&r);
    let r = f.plan(&added);
    assert_eq!(r.manifest.counts.update, 500);
}

#[test]
fn removed_keys_are_listed_once_and_returning_keys_are_resent() {
    let mut f = Fixture::new();
    let rows = people(100);
    f.export(&rows);
    let r = f.plan(CONFIG);
    f.confirm_all(&r);
    f.export(&rows[..90]);
    let r = f.plan(CONFIG);
    assert_eq!(
        (r.manifest.counts.removed, r.manifest.counts.unchanged),
        (10, 90)
    );
    let m = f.manifest(&r);
    let removed: Vec<changeset::RemovedRow> =
        changeset::read_jsonl(&f.store, m.removed_key.as_ref().unwrap()).unwrap();
    assert_eq!(removed.len(), 10);
    assert!(removed.iter().all(|r| r.id.is_some()));
    let fold = changeset::fold(&f.store, &m).unwrap();
    assert_eq!((fold.removed, fold.state_entries), (10, 100));
    let r = f.plan(CONFIG);
    assert_eq!(r.manifest.counts.removed, 0, "already reported");
    f.export(&rows);
    let r = f.plan(CONFIG);
    assert_eq!(
        (r.manifest.counts.update, r.manifest.counts.unchanged),
        (10, 90)
    );
}

#[test]
fn duplicate_keys_refuse_every_copy_and_leave_the_chunks() {
    let mut f = Fixture::new();
    let mut rows = people(250);
    rows.push(("p10".into(), "Copy".into(), "copy@example.com".into(), 1));
    rows.push((
        "P20".into(),
        "Case copy".into(),
        "case@example.com".into(),
        2,
    ));
    f.export(&rows);
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.rows_read, c.invalid, c.create), (252, 4, 248));
    let m = f.manifest(&r);
    let created = pks(&f.rows(&m, Op::Create));
    assert_eq!(created.len(), 248);
    assert!(!created.contains("p10") && !created.contains("p20"));
    assert_eq!(m.chunks.iter().map(|c| c.rows).sum::<u64>(), 248);
    let invalid: Vec<serde_json::Value> =
        changeset::read_jsonl(&f.store, m.invalid_key.as_ref().unwrap()).unwrap();
    let lines: HashMap<u64, String> = invalid
        .iter()
        .map(|v| {
            (
                v["line"].as_u64().unwrap(),
                v["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // p10 sits on line 12 and again on line 252: both copies are refused, each naming both.
    assert!(
        lines[&12].contains("part-0.csv:12") && lines[&12].contains("part-0.csv:252"),
        "{lines:?}"
    );
    assert!(lines.contains_key(&252) && lines.contains_key(&22) && lines.contains_key(&253));
    assert!(invalid
        .iter()
        .all(|v| v["reason"] == "duplicate_primary_key"));
}

#[test]
fn a_duplicate_whose_first_copy_is_unchanged_names_both_lines() {
    let mut f = Fixture::new();
    f.export(&people(50));
    let r = f.plan(CONFIG);
    f.confirm_all(&r);
    // p7 (line 9 of part-0, unchanged since the last run) comes again in a second file.
    f.store
        .put(
            "exports/people/part-1.csv",
            b"id,name,email,score\np100,New,new@example.com,1\np7,Again,again@example.com,7\n",
        )
        .unwrap();
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.invalid, c.unchanged), (1, 2, 49));
    let m = f.manifest(&r);
    let invalid: Vec<serde_json::Value> =
        changeset::read_jsonl(&f.store, m.invalid_key.as_ref().unwrap()).unwrap();
    let first = invalid
        .iter()
        .find(|v| v["line"] == 9)
        .expect("first copy at line 9");
    assert_eq!(first["file"], "exports/people/part-0.csv");
    let message = first["message"].as_str().unwrap();
    assert!(
        message.contains("exports/people/part-0.csv:9")
            && message.contains("exports/people/part-1.csv:3"),
        "{message}"
    );
    assert!(invalid.iter().all(|v| v["line"] != 0), "{invalid:?}");
}

#[test]
fn a_key_repeated_thousands_of_times_costs_little_and_every_copy_is_refused() {
    let mut f = Fixture::new();
    let mut rows = people(20);
    for i in 0..3000 {
        rows.push((
            "p7".into(),
            format!("Copy {i}"),
            format!("c{i}@example.com"),
            1,
        ));
    }
    f.export(&rows);
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.invalid), (19, 3001), "p7 and its 3000 copies");
    let m = f.manifest(&r);
    let invalid: Vec<serde_json::Value> =
        changeset::read_jsonl(&f.store, m.invalid_key.as_ref().unwrap()).unwrap();
    assert_eq!(invalid.len(), 3001);
    let longest = invalid
        .iter()
        .map(|v| v["message"].as_str().unwrap().len())
        .max()
        .unwrap();
    assert!(
        longest < 600,
        "a message names a few copies, not all: {longest} bytes"
    );
    let first = invalid.iter().find(|v| v["line"] == 9).unwrap();
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .contains("appears 3001 times"),
        "{first}"
    );
}

#[test]
fn invalid_rows_are_written_with_reasons_and_do_not_stop_the_run() {
    let mut f = Fixture::new();
    let csv = "id,name,email,score\np1,Ann,ann@example.com,1\np2,,b@example.com,2\np3,Cid,not-an-email,3\np4,Dee,d@example.com,lots\n,Eve,e@example.com,5\np6,\"Fay\",f@example.com,6,extra\np7,Gus,g@example.com,7\n";
    f.store
        .put("exports/people/part-0.csv", csv.as_bytes())
        .unwrap();
    let r = f.plan(CONFIG);
    let c = &r.manifest.counts;
    assert_eq!((c.rows_read, c.invalid, c.create), (7, 5, 2));
    let reasons: BTreeSet<&str> = r.invalid_by_reason.keys().copied().collect();
    assert_eq!(
        reasons,
        BTreeSet::from([
            "invalid_email",
            "invalid_value",
            "malformed_record",
            "missing_primary_key",
            "missing_required"
        ])
    );
    let m = f.manifest(&r);
    let invalid: Vec<serde_json::Value> =
        changeset::read_jsonl(&f.store, m.invalid_key.as_ref().unwrap()).unwrap();
    let by_line: HashMap<u64, &serde_json::Value> = invalid
        .iter()
        .map(|v| (v["line"].as_u64().unwrap(), v))
        .collect();
    assert_eq!(by_line[&3]["field"], "name");
    assert_eq!(by_line[&4]["reason"], "invalid_email");
    assert_eq!(by_line[&5]["field"], "user_fields.score");
    assert_eq!(by_line[&6]["reason"], "missing_primary_key");
    assert_eq!(by_line[&7]["reason"], "malformed_record");
    assert_eq!(
        pks(&f.rows(&m, Op::Create)),
        BTreeSet::from(["p1".to_string(), "p7".to_string()])
    );
}

#[test]
fn insert_mode_skips_existing_keys_and_update_mode_never_creates() {
    let mut f = Fixture::new();
    let mut rows = people(100);
    f.export(&rows);
    let r = f.plan(CONFIG);
    f.confirm_all(&r);
    rows[0].1 = "Changed".into();
    rows.push(("p500".into(), "New".into(), "new@example.com".into(), 0));
    f.export(&rows);
    let insert = CONFIG.replace("mode = \"upsert\"", "mode = \"insert\"");
    let r = f.plan(&insert);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.update, c.skipped, c.unchanged), (1, 0, 1, 99));
    let update = CONFIG.replace("mode = \"upsert\"", "mode = \"update\"");
    let r = f.plan(&update);
    let c = &r.manifest.counts;
    assert_eq!((c.create, c.update, c.unchanged), (0, 2, 99));
    let upd = f.rows(&f.manifest(&r), Op::Update);
    let new = upd.iter().find(|r| r.key == "p500").unwrap();
    assert_eq!(
        new.zendesk_id, None,
        "unknown to zdsync: updated by external_id"
    );
}

#[test]
fn a_preview_writes_nothing_and_export_errors_leave_nothing() {
    let f = Fixture::new();
    let mut rows = people(10);
    rows.push(rows[3].clone());
    f.export(&rows);
    let cfg = SyncConfig::parse(CONFIG, "people.toml").unwrap();
    let keys = |store: &LocalStore| -> Vec<String> {
        store.list("").unwrap().into_iter().map(|o| o.key).collect()
    };
    let before = keys(&f.store);
    let out = tempfile::NamedTempFile::new().unwrap();
    let store: std::sync::Arc<dyn ObjectStore> =
        std::sync::Arc::new(LocalStore::new(f.store.root()));
    let p = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(zdsync::preview::preview(
            store,
            &cfg,
            None,
            &zdsync::preview::PreviewOptions::new("dry"),
            Some(Box::new(out.reopen().unwrap())),
        ))
        .unwrap();
    let c = &p.report.manifest.counts;
    assert_eq!(
        (c.create, c.invalid),
        (9, 2),
        "both copies of p3 are refused"
    );
    assert!(p.report.manifest_key.is_none());
    assert!(p.approximate.is_some(), "no client: labelled approximate");
    assert_eq!(before, keys(&f.store), "the bucket is untouched");
    // One record line per row sent, with the body record the run sends.
    let text = std::fs::read_to_string(out.path()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9);
    assert_eq!(p.records, 9);
    assert_eq!(lines[0]["path"], "/api/v2/users/create_or_update_many.json");
    assert_eq!(lines[0]["record"]["external_id"], lines[0]["key"]);
    assert_eq!(lines[0]["record"]["skip_verify_email"], true);

    f.store
        .put(
            "exports/people/part-1.csv.gz",
            b"id,name\nnot gzip at all\n",
        )
        .unwrap();
    let e = plan(&f.store, &cfg, &PlanOptions::new("bad"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("part-1.csv.gz"), "{e}");
    assert!(f.store.list("runs/people/bad/").unwrap().is_empty());
}
