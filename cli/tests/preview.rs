//! The preview is the run: for the demo's configs, the shipped example and several custom-field
//! setups, `zdsync plan --records` and then `zdsync run` against one simulator on 127.0.0.1. The
//! preview must send nothing but reads, change nothing in the bucket, count exactly what the
//! run's own plan counts, and list exactly the records the simulator then receives.

mod common;

use common::{text, zdsync};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zdsync::errors::ErrorName;
use zdsync_sim::{FieldsFixture, SimConfig, SimHandle, Simulator};

struct Fx {
    rt: tokio::runtime::Runtime,
    sim: Option<SimHandle>,
    dir: tempfile::TempDir,
}

impl Fx {
    fn start(fields: Option<Value>) -> Fx {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut cfg = SimConfig {
            log_bodies: true,
            fields: fields.map(|f| serde_json::from_value::<FieldsFixture>(f).unwrap()),
            ..SimConfig::default()
        };
        cfg.jobs.queued_ms = 5;
        cfg.jobs.working_ms = 5;
        let sim = rt.block_on(Simulator::start(cfg)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fx = Fx {
            rt,
            sim: Some(sim),
            dir,
        };
        fx.write(
            "config/credentials.json",
            &format!(
                "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
                zdsync_sim::DEFAULT_API_TOKEN
            ),
        );
        fx
    }

    fn sim(&self) -> &SimHandle {
        self.sim.as_ref().unwrap()
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn last_seq(&self) -> u64 {
        self.sim().request_log().last().map_or(0, |e| e.seq)
    }

    /// A sync config against this simulator.
    fn config(&self, name: &str, object: &str, mode: &str, pk: &str, mapping: &str) -> PathBuf {
        let rel = format!("config/{name}.toml");
        self.write(
            &rel,
            &format!(
                "name = \"{name}\"\nobject = \"{object}\"\nmode = \"{mode}\"\nprimary_key = \"{pk}\"\nchunk_rows = 100\n\n[source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:credentials.json\"\nrate_limit_rpm = 6000\n\n[mapping]\n{mapping}",
                self.sim().base_url()
            ),
        );
        self.root().join(rel)
    }

    /// A users upsert `people` of names and emails.
    fn people(&self) -> PathBuf {
        self.config(
            "people",
            "users",
            "upsert",
            "ID",
            "name = \"NAME\"\nemail = \"EMAIL\"\n",
        )
    }

    fn ticket_field_ids(&self) -> BTreeMap<String, u64> {
        self.rt.block_on(zdsync_tests::ticket_field_ids(
            &self.sim().base_url(),
            "file:credentials.json",
            &self.root().join("config"),
        ))
    }

    /// Files of the bucket folder (the records file aside), with their sizes.
    fn bucket(&self) -> BTreeMap<String, u64> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u64>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else if !p.ends_with("records.jsonl") {
                    let rel = p.strip_prefix(root).unwrap().display().to_string();
                    out.insert(rel, e.metadata().unwrap().len());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.root(), self.root(), &mut out);
        out
    }

    /// `plan --records` then `run`; asserts the preview is the run and returns both reports.
    fn preview_then_run(&self, config: &Path, compare_records: bool) -> (Value, Value) {
        let records = self.root().join("records.jsonl");
        let (s0, files0) = (self.last_seq(), self.bucket());
        let out = zdsync()
            .arg("plan")
            .arg(config)
            .arg("--json")
            .arg("--records")
            .arg(&records)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let preview: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(preview.get("approximate").is_none(), "{preview}");
        let s1 = self.last_seq();
        for e in self.sim().request_log() {
            if e.seq > s0 && e.seq <= s1 {
                assert_eq!(e.method, "GET", "a preview only reads: {e:?}");
            }
        }
        assert_eq!(
            files0,
            self.bucket(),
            "a preview leaves the bucket as it was"
        );

        let out = zdsync()
            .arg("run")
            .arg(config)
            .arg("--json")
            .output()
            .unwrap();
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 1)), "{t}");
        let recs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let rec = recs.last().unwrap().clone();
        let manifest: Value = serde_json::from_slice(
            &std::fs::read(self.root().join(format!(
                "runs/{}/{}/manifest.json",
                rec["sync"].as_str().unwrap(),
                rec["run_id"].as_str().unwrap()
            )))
            .unwrap(),
        )
        .unwrap();
        let (p, r) = (&preview["manifest"], &manifest);
        assert_eq!(p["counts"], r["counts"], "counts: preview vs run\n{t}");
        assert_eq!(p["mapping_change"], r["mapping_change"]);
        let rows: u64 = r["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["rows"].as_u64().unwrap())
            .sum();
        assert_eq!(preview["cost"]["rows"], rows);
        assert_eq!(preview["records"], rows, "one record line per row sent");

        let lines: Vec<Value> = std::fs::read_to_string(&records)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, rows);
        if compare_records {
            // What the simulator received in bulk bodies vs what the preview listed, per call.
            let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for e in self.sim().request_log() {
                let (Some(body), true) = (&e.body, e.seq > s1) else {
                    continue;
                };
                if !e.path.ends_with("_many.json") {
                    continue;
                }
                let v: Value = serde_json::from_str(body).unwrap();
                let (_, items) = v.as_object().unwrap().iter().next().unwrap();
                for item in items.as_array().unwrap() {
                    sent.entry(format!("{} {}", e.method, e.path))
                        .or_default()
                        .push(item.to_string());
                }
            }
            let mut listed: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for l in &lines {
                listed
                    .entry(format!(
                        "{} {}",
                        l["method"].as_str().unwrap(),
                        l["path"].as_str().unwrap()
                    ))
                    .or_default()
                    .push(l["record"].to_string());
            }
            assert_eq!(
                sent.values().map(Vec::len).sum::<usize>() as u64,
                rows,
                "every row went out in one bulk record"
            );
            for v in sent.values_mut().chain(listed.values_mut()) {
                v.sort();
            }
            assert_eq!(listed, sent, "records: preview vs what Zendesk received");
        }
        (preview, rec)
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            self.rt.block_on(sim.shutdown());
        }
    }
}

fn counts(v: &Value) -> (u64, u64, u64) {
    let c = &v["manifest"]["counts"];
    (
        c["create"].as_u64().unwrap(),
        c["update"].as_u64().unwrap(),
        c["unchanged"].as_u64().unwrap(),
    )
}

/// Replace the first `n` matches of `from` in a file of the bucket.
fn edit(fx: &Fx, rel: &str, from: &str, to: &str, n: usize) {
    let p = fx.root().join(rel);
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, s.replacen(from, to, n)).unwrap();
}

#[test]
fn the_demo_configs_preview_what_their_runs_send() {
    let fx = Fx::start(None);
    let out = zdsync()
        .args(["demo", "--rows", "300", "--sim"])
        .arg(fx.sim().base_url())
        .arg("--dir")
        .arg(fx.root())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(
        t.matches("the preview (`zdsync plan`) said the same")
            .count(),
        3,
        "{t}"
    );
    assert!(t.contains("keeps running"), "{t}");
    let cfg = |s: &str| fx.root().join(format!("config/{s}.toml"));

    // Nothing changed since the demo: nothing to send, and the dropdown labels agree with
    // the option values Zendesk holds.
    let (p, _) = fx.preview_then_run(&cfg("demo_users"), true);
    assert_eq!(counts(&p).1, 0, "{p}");
    // Offline, the preview uses the field definitions the last run kept: still exact here,
    // and labelled with where its definitions come from.
    let out = zdsync()
        .arg("plan")
        .arg(cfg("demo_users"))
        .args(["--offline", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let offline: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(counts(&offline), counts(&p), "{offline}");
    let why = offline["approximate"].as_str().unwrap();
    assert!(why.contains("checked against the definitions run"), "{why}");

    // Plan labels changed on 12 rows (Free → Pro): sent as the option value.
    edit(
        &fx,
        "exports/demo_users/part-0000.csv",
        ",Free,",
        ",Pro,",
        12,
    );
    let (p, rec) = fx.preview_then_run(&cfg("demo_users"), true);
    assert_eq!(counts(&p), (0, 12, 293), "{p}");
    assert_eq!(rec["rows"]["updated"], 12);
    let text = std::fs::read_to_string(fx.root().join("records.jsonl")).unwrap();
    assert!(text.contains("\"plan\":\"plan_pro\""), "{text}");

    // A mapping change: every organization is sent again, announced with its cost.
    edit(
        &fx,
        "config/demo_orgs.toml",
        "notes = \"NOTES\"\n",
        "details = \"NOTES\"\n",
        1,
    );
    let (p, rec) = fx.preview_then_run(&cfg("demo_orgs"), true);
    assert_eq!(counts(&p), (0, 30, 0), "{p}");
    assert_eq!(p["manifest"]["mapping_change"]["resend"], 30, "{p}");
    assert_eq!(rec["mapping_change"]["resend"], 30);

    // The audience: members leave and join.
    edit(
        &fx,
        "exports/demo_key_accounts/part-0000.csv",
        "o-00",
        "x-00",
        3,
    );
    let (p, _) = fx.preview_then_run(&cfg("demo_key_accounts"), false);
    let c = &p["manifest"]["counts"];
    assert!(c["tag_remove"].as_u64().unwrap() > 0, "{p}");
}

#[test]
fn the_shipped_example_previews_what_its_run_sends() {
    let fx = Fx::start(Some(json!({
        "user_fields": [
            {"key": "plan", "type": "dropdown", "title": "Plan", "custom_field_options": [
                {"name": "Enterprise", "value": "plan_enterprise"},
                {"name": "Pro", "value": "plan_pro"},
                {"name": "Starter", "value": "plan_starter"},
                {"name": "Trial", "value": "plan_trial"}]},
            {"key": "customer_since", "type": "date", "title": "Customer since"},
            {"key": "lifetime_value", "type": "decimal", "title": "Lifetime value"}
        ],
        "organization_fields": [],
        "ticket_fields": []
    })));
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let example = std::fs::read_to_string(examples.join("crm_users.toml")).unwrap();
    let (head, _) = example.split_once("[zendesk]").unwrap();
    let (_, mapping) = example.split_once("[mapping]").unwrap();
    fx.write(
        "config/crm_users.toml",
        &format!(
            "{head}[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:credentials.json\"\n\n[mapping]{mapping}",
            fx.sim().base_url()
        ),
    );
    for e in std::fs::read_dir(examples.join("exports/crm_users")).unwrap() {
        let e = e.unwrap();
        fx.write(
            &format!("exports/crm_users/{}", e.file_name().to_string_lossy()),
            &std::fs::read_to_string(e.path()).unwrap(),
        );
    }
    let cfg = fx.root().join("config/crm_users.toml");
    let (p, rec) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (7, 0, 0), "{p}");
    assert_eq!(rec["rows"]["created"], 7);
    edit(
        &fx,
        "exports/crm_users/part-0000.csv",
        "enterprise",
        "pro",
        1,
    );
    let (p, _) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (0, 1, 6), "{p}");
}

#[test]
fn organization_dropdowns_and_multiselects_preview_as_option_values() {
    let fx = Fx::start(None);
    let cfg = fx.config(
        "accounts",
        "organizations",
        "upsert",
        "ID",
        r#"name = "NAME"
"organization_fields.segment" = { column = "SEGMENT", type = "dropdown" }
"organization_fields.products" = { column = "PRODUCTS", type = "multiselect", split = "comma" }
"organization_fields.renewal_date" = { column = "RENEWAL", type = "date" }
"organization_fields.arr" = { column = "ARR", type = "decimal" }
"organization_fields.strategic" = { column = "STRATEGIC", type = "checkbox" }
"#,
    );
    let mut csv = String::from("ID,NAME,SEGMENT,PRODUCTS,RENEWAL,ARR,STRATEGIC\n");
    for i in 0..60 {
        csv.push_str(&format!(
            "a-{i},Account {i},{},\"{}\",2025-0{}-1{},{}.5,{}\n",
            ["SMB", "Mid-market", "Enterprise"][i % 3],
            ["Support", "Support, Chat", "Guide,Chat"][i % 3],
            1 + i % 9,
            i % 10,
            i * 1000,
            i % 2 == 0
        ));
    }
    fx.write("exports/accounts/part-0.csv", &csv);
    let (p, _) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (60, 0, 0), "{p}");
    // Labels written as their values are the same data: unchanged. One real change: sent.
    edit(
        &fx,
        "exports/accounts/part-0.csv",
        ",SMB,",
        ",segment_smb,",
        5,
    );
    edit(
        &fx,
        "exports/accounts/part-0.csv",
        "Account 7,",
        "Account Seven,",
        1,
    );
    let (p, _) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (0, 1, 59), "{p}");
    // A mistyped field key fails the preview before anything, as it fails the run.
    edit(
        &fx,
        "config/accounts.toml",
        "organization_fields.arr",
        "organization_fields.arrr",
        1,
    );
    let out = zdsync().arg("plan").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("arrr"), "{}", text(&out));
}

#[test]
fn tickets_preview_their_creates_and_updates_with_exact_timestamps() {
    let fx = Fx::start(None);
    let ids = fx.ticket_field_ids();
    let cfg = fx.config(
        "cases",
        "tickets",
        "upsert",
        "CASE_ID",
        &format!(
            r#"subject = "SUBJECT"
description = "BODY"
requester_email = "EMAIL"
priority = "PRIORITY"
due_at = "DUE"
"custom_fields.{}" = {{ column = "CATEGORY", type = "dropdown" }}
"custom_fields.{}" = {{ column = "PRODUCTS", type = "multiselect", split = "comma" }}
"custom_fields.{}" = {{ column = "INCIDENT", type = "date" }}
"#,
            ids["Category"], ids["Affected products"], ids["Incident date"]
        ),
    );
    let dues = [
        "2024-03-10 23:30:00.000 -0800",
        "2024-03-10 23:30:00 +05:30",
        "2024-03-10 23:30:00 UTC",
        "2024-03-10T23:30:00+0530",
    ];
    let mut csv =
        String::from("CASE_ID,SUBJECT,BODY,EMAIL,PRIORITY,DUE,CATEGORY,PRODUCTS,INCIDENT\n");
    for i in 0..40 {
        csv.push_str(&format!(
            "c-{i},Case {i},Something broke ({i}),user{}@example.com,{},{},{},\"{}\",2024-02-{:02}\n",
            i % 7,
            ["low", "normal", "high"][i % 3],
            dues[i % 4],
            ["Billing", "Technical", "Account"][i % 3],
            ["Support", "Chat,Guide"][i % 2],
            1 + i % 28
        ));
    }
    fx.write("exports/cases/part-0.csv", &csv);
    // A tickets sync with no state reads the ticket ids back first, in the preview as in the run.
    let (p, _) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (40, 0, 0), "{p}");
    let state = fx.sim().state("acme").unwrap();
    let due: Vec<&str> = state
        .tickets
        .iter()
        .filter_map(|t| t["due_at"].as_str())
        .collect();
    assert!(due.contains(&"2024-03-11T07:30:00Z"), "{due:?}");
    assert!(due.contains(&"2024-03-10T18:00:00Z"), "{due:?}");
    assert!(due.contains(&"2024-03-10T23:30:00Z"), "{due:?}");
    // Updates go by id and without the first comment, in the preview as in the run.
    edit(&fx, "exports/cases/part-0.csv", ",low,", ",urgent,", 4);
    let (p, _) = fx.preview_then_run(&cfg, true);
    assert_eq!(counts(&p), (0, 4, 36), "{p}");
    let text = std::fs::read_to_string(fx.root().join("records.jsonl")).unwrap();
    for line in text.lines() {
        let l: Value = serde_json::from_str(line).unwrap();
        assert!(l["record"]["id"].as_u64().is_some(), "{l}");
        assert!(l["record"].get("comment").is_none(), "{l}");
    }
}

#[test]
fn a_mapping_change_is_announced_and_the_row_cap_stops_the_run_before_any_write() {
    let fx = Fx::start(None);
    let cfg = fx.people();
    edit(
        &fx,
        "config/people.toml",
        "chunk_rows = 100\n",
        "chunk_rows = 100\nmax_rows_per_run = 50\n",
        1,
    );
    let mut csv = String::from("ID,NAME,EMAIL,NOTE\n");
    for i in 0..80 {
        csv.push_str(&format!("p{i},Person {i},p{i}@example.com,note {i}\n"));
    }
    fx.write("exports/people/part-0.csv", &csv);

    // 80 new rows against a cap of 50: the preview says the run would stop, and it does.
    let out = zdsync().arg("plan").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(text(&out).contains("ROW CAP"), "{}", text(&out));
    let before = zdsync_tests::write_requests(&fx.sim().counters());
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(8), "{t}");
    assert!(
        t.contains("more than its cap of 50") && t.contains("nothing was written"),
        "{t}"
    );
    assert_eq!(
        zdsync_tests::write_requests(&fx.sim().counters()),
        before,
        "no write sent"
    );
    // Raised for one run, it goes through.
    let out = zdsync()
        .arg("run")
        .arg(&cfg)
        .args(["--max-rows", "100"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // A mapping change resends all 80: announced by the preview with its cost, and stopped.
    edit(
        &fx,
        "config/people.toml",
        "email = \"EMAIL\"\n",
        "email = \"EMAIL\"\nnotes = \"NOTE\"\n",
        1,
    );
    let out = zdsync().arg("plan").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(8), "{t}");
    assert!(
        t.contains("the mapping changed since run")
            && t.contains("80 rows already in Zendesk are sent again")
            && t.contains("≈1 bulk call,"),
        "{t}"
    );
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(8), "{t}");
    assert!(t.contains("the mapping changed since run"), "{t}");
    // The run record says why it stopped.
    let out = zdsync()
        .arg("history")
        .arg(&cfg)
        .arg("--json")
        .output()
        .unwrap();
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let newest = runs
        .iter()
        .max_by_key(|r| r["finished_at"].as_str().unwrap().to_string())
        .unwrap();
    assert_eq!(
        newest["error"]["name"],
        ErrorName::RowCapExceeded.as_str(),
        "{runs:?}"
    );
    // Within the cap once raised: the run sends them and its record carries the notice.
    let out = zdsync()
        .arg("run")
        .arg(&cfg)
        .args(["--max-rows", "80"])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("NOTE: the mapping changed since run"), "{t}");
}

#[test]
fn a_preview_names_a_run_under_way_or_one_the_next_run_finishes_first() {
    let fx = Fx::start(None);
    let cfg = fx.people();
    fx.write(
        "exports/people/part-0.csv",
        "ID,NAME,EMAIL\np1,Ann,ann@example.com\n",
    );
    let lock = |run: &str, expires_at: i64| {
        fx.write(
            "locks/people.json",
            &json!({"sync": "people", "run_id": run, "host": "elsewhere", "pid": 1,
                    "acquired_at": "2026-01-01T00:00:00Z", "expires_at": expires_at})
            .to_string(),
        )
    };
    let preview = || -> Value {
        let out = zdsync()
            .arg("plan")
            .arg(&cfg)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    lock("r-live", unix_now() + 600);
    let p = preview();
    assert_eq!(p["running"], "r-live", "{p}");
    lock("r-crashed", 1);
    let p = preview();
    assert_eq!(p["unfinished_run"], "r-crashed", "{p}");
    assert!(p.get("running").is_none(), "{p}");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
