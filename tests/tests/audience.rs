//! Audience syncs (add, remove, mirror, upsert) end to end against the simulator: membership
//! churn over three runs on users and organizations through both tag-write routes, foreign tags
//! kept, a failed tag write retried next run, tagging disabled, a member missing in Zendesk, email
//! matching, and the Lambda steps. Every check reads each record's tags back from the simulator.

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use zdsync::errors::ErrorName;
use zdsync::run::{RunOutcome, RunRecord, RunStatus};
use zdsync_sim::{FaultKind, FaultRule, SeedData};
use zdsync_tests::{only_record, write_requests, E2e, ACCOUNT};

const TAG: &str = "segment_vip";
/// Tags zdsync does not own, on every seeded record.
const FOREIGN: [&str; 2] = ["legacy_vip", "keep_me"];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Obj {
    Users,
    Orgs,
}

impl Obj {
    fn name(self) -> &'static str {
        match self {
            Obj::Users => "users",
            Obj::Orgs => "organizations",
        }
    }
}

fn key(i: usize) -> String {
    format!("m{i:02}")
}

/// Records `m00`..`m{n-1}` with the foreign tags; those in `tagged` also carry the audience tag.
fn seed(e: &E2e, obj: Obj, n: usize, tagged: &[usize]) {
    let mut data = SeedData::default();
    for i in 0..n {
        let mut tags: Vec<&str> = FOREIGN.to_vec();
        if tagged.contains(&i) {
            tags.push(TAG);
        }
        let rec = match obj {
            Obj::Users => json!({
                "name": format!("Member {i}"),
                "email": format!("member{i}@example.com"),
                "external_id": key(i),
                "tags": tags,
            }),
            Obj::Orgs => json!({"name": format!("Org {i}"), "external_id": key(i), "tags": tags}),
        };
        match obj {
            Obj::Users => data.users.push(rec),
            Obj::Orgs => data.organizations.push(rec),
        }
    }
    e.sim.seed(ACCOUNT, &data).expect("seed");
}

/// An audience sync config: `[audience]` with the tag (and `extra` lines), and `mapping`.
fn audience_toml(e: &E2e, name: &str, obj: Obj, mode: &str, extra: &str, mapping: &str) -> String {
    format!(
        "{}\n[audience]\ntag = \"{TAG}\"\n{extra}\n",
        e.toml(name, obj.name(), mode, "KEY", mapping)
    )
}

fn members_csv(keys: &[String]) -> String {
    let mut csv = String::from("KEY\n");
    for k in keys {
        csv.push_str(k);
        csv.push('\n');
    }
    csv
}

/// Every record's tags by external_id.
fn tags_by_key(e: &E2e, obj: Obj) -> BTreeMap<String, BTreeSet<String>> {
    let snap = e.state();
    let list = match obj {
        Obj::Users => &snap.users,
        Obj::Orgs => &snap.organizations,
    };
    list.iter()
        .filter_map(|r| {
            let k = r["external_id"].as_str()?.to_string();
            let tags = r["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect();
            Some((k, tags))
        })
        .collect()
}

/// Each record has the foreign tags, and the audience tag exactly when `want` says so.
fn check_tags(e: &E2e, obj: Obj, want: &BTreeMap<String, bool>, context: &str) {
    let now = tags_by_key(e, obj);
    for (k, has) in want {
        let tags = now
            .get(k)
            .unwrap_or_else(|| panic!("{context}: no record {k}"));
        for f in FOREIGN {
            assert!(
                tags.contains(f),
                "{context}: {k} lost foreign tag {f}: {tags:?}"
            );
        }
        assert_eq!(
            tags.contains(TAG),
            *has,
            "{context}: {k} should {}have {TAG}: {tags:?}",
            if *has { "" } else { "not " }
        );
    }
}

fn ok_record(out: &RunOutcome, context: &str) -> RunRecord {
    assert!(out.error.is_none(), "{context}: {:?}", out.error);
    let rec = only_record(out).clone();
    assert_eq!(rec.status, RunStatus::Succeeded, "{context}: {rec:#?}");
    rec
}

/// Three runs of churn: the model says which record has the tag after each run, from the
/// mode's rules and the previous run's membership.
async fn churn(obj: Obj, mode: &str, route: &str) {
    let e = E2e::start().await;
    const N: usize = 14;
    // m00..m03 and m12 start with the tag (m12 is never a member: only removals could touch it).
    let initially: Vec<usize> = vec![0, 1, 2, 3, 12];
    seed(&e, obj, N, &initially);
    let name = format!("aud_{}_{mode}", obj.name());
    let toml = audience_toml(
        &e,
        &name,
        obj,
        mode,
        &format!("tag_writes = \"{route}\""),
        "",
    );
    let mut has: BTreeMap<String, bool> =
        (0..N).map(|i| (key(i), initially.contains(&i))).collect();
    let runs: [Vec<usize>; 3] = [
        (0..8).collect(),             // first run
        (2..10).collect(),            // m00, m01 leave; m08, m09 join
        (4..12).chain([0]).collect(), // m02, m03 leave; m10, m11 join; m00 returns
    ];
    let mut prev: Option<BTreeSet<String>> = None;
    for (n, members) in runs.iter().enumerate() {
        let cur: BTreeSet<String> = members.iter().map(|&i| key(i)).collect();
        e.write_export(
            &name,
            &members_csv(&cur.iter().cloned().collect::<Vec<_>>()),
        );
        let context = format!("{} {mode} ({route}) run {}", obj.name(), n + 1);
        let rec = ok_record(&e.run(&toml).await, &context);
        let joined: BTreeSet<String> = match &prev {
            Some(p) => cur.difference(p).cloned().collect(),
            None => cur.clone(),
        };
        let left: BTreeSet<String> = match &prev {
            Some(p) => p.difference(&cur).cloned().collect(),
            None => BTreeSet::new(),
        };
        let (adds, removes) = match mode {
            "add" => (true, false),
            "remove" => (false, true),
            "mirror" => (true, true),
            _ => unreachable!(),
        };
        if adds {
            for k in &joined {
                has.insert(k.clone(), true);
            }
        }
        if removes {
            for k in &left {
                has.insert(k.clone(), false);
            }
        }
        check_tags(&e, obj, &has, &context);
        // Membership changes only: a member already confirmed is not touched again.
        assert_eq!(
            rec.rows.tagged + rec.rows.untagged,
            if adds { joined.len() as u64 } else { 0 }
                + if removes { left.len() as u64 } else { 0 },
            "{context}: {:?}",
            rec.rows
        );
        prev = Some(cur);
    }
    // The first mirror run only adds: m12 kept the tag it had though it was never a member.
    if mode == "mirror" || mode == "add" {
        assert!(has[&key(12)]);
    }
    // A run with nothing new writes nothing.
    let before = e.counters();
    let rec = ok_record(&e.run(&toml).await, "rerun");
    assert_eq!(rec.rows.tagged + rec.rows.untagged, 0);
    assert_eq!(write_requests(&e.counters()) - write_requests(&before), 0);
    check_tags(&e, obj, &has, "rerun");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_keeps_every_tag_and_adds_new_members_on_users_and_organizations() {
    for obj in [Obj::Users, Obj::Orgs] {
        for route in ["bulk", "per_record"] {
            churn(obj, "add", route).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_records_first_then_untags_members_that_left() {
    for obj in [Obj::Users, Obj::Orgs] {
        for route in ["bulk", "per_record"] {
            churn(obj, "remove", route).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_adds_only_on_its_first_run_then_follows_churn() {
    for obj in [Obj::Users, Obj::Orgs] {
        for route in ["bulk", "per_record"] {
            churn(obj, "mirror", route).await;
        }
    }
}

/// Upsert: members' attributes are written (records created when missing) and they get the tag;
/// a member that leaves keeps it.
async fn upsert(obj: Obj) {
    let e = E2e::start().await;
    seed(&e, obj, 3, &[]);
    let name = format!("aud_{}_upsert", obj.name());
    let (mapping, header) = match obj {
        Obj::Users => ("name = \"NAME\"\nemail = \"EMAIL\"", "KEY,NAME,EMAIL"),
        Obj::Orgs => ("name = \"NAME\"", "KEY,NAME"),
    };
    let row = |i: usize, v: &str| match obj {
        Obj::Users => format!("{},Member {i} {v},member{i}@example.com", key(i)),
        Obj::Orgs => format!("{},Org {i} {v}", key(i)),
    };
    let toml = audience_toml(&e, &name, obj, "upsert", "", mapping);
    let export = |keys: &[usize], v: &str| {
        let mut csv = format!("{header}\n");
        for &i in keys {
            csv.push_str(&row(i, v));
            csv.push('\n');
        }
        csv
    };
    // m00..m02 exist (foreign tags); m03..m05 are created.
    e.write_export(&name, &export(&[0, 1, 2, 3, 4, 5], "v1"));
    let rec = ok_record(&e.run(&toml).await, "upsert run 1");
    assert_eq!(rec.rows.tagged, 6, "{:?}", rec.rows);
    let names = |e: &E2e| -> BTreeMap<String, String> {
        let snap = e.state();
        let list = match obj {
            Obj::Users => snap.users.clone(),
            Obj::Orgs => snap.organizations.clone(),
        };
        list.iter()
            .filter_map(|r| {
                Some((
                    r["external_id"].as_str()?.into(),
                    r["name"].as_str()?.into(),
                ))
            })
            .collect()
    };
    let now = names(&e);
    let tags = tags_by_key(&e, obj);
    for i in 0..6 {
        assert!(now[&key(i)].ends_with("v1"), "{:?}", now);
        assert!(
            tags[&key(i)].contains(TAG),
            "{}: {:?}",
            key(i),
            tags[&key(i)]
        );
        if i < 3 {
            for f in FOREIGN {
                assert!(tags[&key(i)].contains(f), "{:?}", tags[&key(i)]);
            }
        }
    }
    // m00 leaves (keeps the tag), m01 changes, m06 joins.
    e.write_export(&name, &export(&[1, 2, 3, 4, 5, 6], "v1"));
    let csv = export(&[1], "v2") + &export(&[2, 3, 4, 5, 6], "v1")[header.len() + 1..];
    e.write_export(&name, &csv);
    let rec = ok_record(&e.run(&toml).await, "upsert run 2");
    assert_eq!(
        (rec.rows.created, rec.rows.updated),
        (1, 1),
        "{:?}",
        rec.rows
    );
    let now = names(&e);
    let tags = tags_by_key(&e, obj);
    assert!(now[&key(1)].ends_with("v2"));
    for i in 0..7 {
        assert!(
            tags[&key(i)].contains(TAG),
            "{}: {:?}",
            key(i),
            tags[&key(i)]
        );
    }
    for f in FOREIGN {
        assert!(tags[&key(0)].contains(f) && tags[&key(1)].contains(f));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_writes_attributes_creates_missing_records_and_tags_them() {
    upsert(Obj::Users).await;
    upsert(Obj::Orgs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tag_write_is_retried_next_run() {
    for obj in [Obj::Users, Obj::Orgs] {
        let e = E2e::start().await;
        seed(&e, obj, 40, &[]);
        let name = format!("aud_{}_retry", obj.name());
        let toml = audience_toml(&e, &name, obj, "mirror", "", "");
        let keys: Vec<String> = (0..40).map(key).collect();
        e.write_export(&name, &members_csv(&keys));
        e.sim
            .set_fault_rules(vec![FaultRule::new(FaultKind::FailItems)
                .path(&format!("/api/v2/{}/update_many", obj.name()))
                .fraction(0.5)
                .times(1)]);
        let out = e.run(&toml).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        let rec = only_record(&out);
        assert_eq!(rec.status, RunStatus::CompletedWithFailures);
        let failed = rec.rows.failed;
        assert!(failed > 0 && failed < 40, "{:?}", rec.rows);
        assert_eq!(rec.rows.tagged, 40 - failed);
        let tags = tags_by_key(&e, obj);
        let untagged: Vec<&String> = keys.iter().filter(|k| !tags[*k].contains(TAG)).collect();
        assert_eq!(untagged.len() as u64, failed);
        e.sim.clear_faults();
        // Next run: exactly the failed members go again.
        let rec = ok_record(&e.run(&toml).await, "retry");
        assert_eq!((rec.rows.retried, rec.rows.tagged), (failed, failed));
        let want: BTreeMap<String, bool> = keys.iter().map(|k| (k.clone(), true)).collect();
        check_tags(&e, obj, &want, "after retry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_disabled_is_one_clear_error_before_any_write() {
    for obj in [Obj::Users, Obj::Orgs] {
        let e = E2e::start().await;
        seed(&e, obj, 5, &[]);
        e.sim.update_settings(ACCOUNT, |s| match obj {
            Obj::Users => s.user_tagging = false,
            Obj::Orgs => s.organization_tagging = false,
        });
        let name = format!("aud_{}_off", obj.name());
        for (mode, mapping) in [
            ("add", ""),
            (
                "upsert",
                if obj == Obj::Users {
                    "name = \"KEY\"\nemail = \"KEY\""
                } else {
                    "name = \"KEY\""
                },
            ),
        ] {
            let toml = audience_toml(&e, &name, obj, mode, "", mapping);
            e.write_export(&name, &members_csv(&[key(0), key(1)]));
            let out = e.run(&toml).await;
            let err = out.error.as_ref().expect("refused");
            assert_eq!(err.error_name(), ErrorName::TaggingDisabled, "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{} tagging is not enabled", obj.name()))
                    && msg.contains("Admin Center"),
                "{msg}"
            );
            assert_eq!(write_requests(&e.counters()), 0);
            assert_eq!(only_record(&out).status, RunStatus::Failed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_missing_in_zendesk_fails_with_a_reason_and_is_retried() {
    let e = E2e::start().await;
    seed(&e, Obj::Users, 3, &[]);
    let toml = audience_toml(&e, "aud_ghost", Obj::Users, "add", "", "");
    let keys = vec![key(0), key(1), "ghost".to_string()];
    e.write_export("aud_ghost", &members_csv(&keys));
    let out = e.run(&toml).await;
    let rec = only_record(&out);
    assert_eq!(rec.status, RunStatus::CompletedWithFailures);
    assert_eq!((rec.rows.tagged, rec.rows.failed), (2, 1));
    let sample = &rec.failed_samples[0];
    assert_eq!(sample.pk, "ghost");
    assert!(
        sample
            .reason
            .contains("no user with external_id `ghost` exists in Zendesk")
            && sample.reason.contains("tried again next run"),
        "{}",
        sample.reason
    );
    // Still missing: failed again (and only it is tried).
    let rec = e.run(&toml).await.records[0].clone();
    assert_eq!(
        (rec.rows.retried, rec.rows.failed, rec.rows.tagged),
        (1, 1, 0)
    );
    // Created by someone else: the next run tags it.
    e.sim
        .seed(
            ACCOUNT,
            &SeedData {
                users: vec![json!({"name": "Ghost", "email": "ghost@example.com", "external_id": "ghost", "tags": ["keep_me"]})],
                ..Default::default()
            },
        )
        .unwrap();
    let rec = ok_record(&e.run(&toml).await, "ghost exists");
    assert_eq!(rec.rows.tagged, 1);
    let tags = tags_by_key(&e, Obj::Users);
    assert!(tags["ghost"].contains(TAG) && tags["ghost"].contains("keep_me"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_without_a_matching_external_id_are_found_by_email() {
    let e = E2e::start().await;
    seed(&e, Obj::Users, 2, &[]);
    // A user zdsync never saw: no external_id, matched by the email column.
    e.sim
        .seed(
            ACCOUNT,
            &SeedData {
                users: vec![json!({"name": "Walk In", "email": "walkin@example.com", "tags": ["keep_me", "legacy_vip"]})],
                ..Default::default()
            },
        )
        .unwrap();
    for route in ["bulk", "per_record"] {
        let name = format!("aud_email_{route}");
        let toml = audience_toml(
            &e,
            &name,
            Obj::Users,
            "mirror",
            &format!("email_column = \"EMAIL\"\ntag_writes = \"{route}\""),
            "",
        );
        e.write_export(
            &name,
            "KEY,EMAIL\nm00,member0@example.com\ncrm-77,walkin@example.com\nm01,not-an-email\n",
        );
        let out = e.run(&toml).await;
        let rec = only_record(&out);
        // The bad email is refused with its field; its member is left alone.
        assert_eq!(rec.rows.invalid, 1, "{rec:#?}");
        assert_eq!(rec.invalid_samples[0].field.as_deref(), Some("EMAIL"));
        assert_eq!(rec.rows.tagged, 2, "{rec:#?}");
        let snap = e.state();
        let walkin = snap.user_by_email("walkin@example.com").unwrap();
        let tags: Vec<&str> = walkin["tags"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(tags.contains(&TAG) && tags.contains(&"keep_me"), "{tags:?}");
        // The walk-in leaves: mirror removes the tag by the id it recorded.
        e.write_export(&name, "KEY,EMAIL\nm00,member0@example.com\n");
        let rec = ok_record(&e.run(&toml).await, "walk-in left");
        assert_eq!(rec.rows.untagged, 1);
        let snap = e.state();
        let tags = &snap.user_by_email("walkin@example.com").unwrap()["tags"];
        assert_eq!(tags, &json!(["keep_me", "legacy_vip"]));
    }
}

#[test]
fn audience_configs_are_validated_with_the_key_and_the_fix() {
    let base = "name = \"a\"\nobject = \"users\"\nmode = \"mirror\"\nprimary_key = \"K\"\n\n[source]\nlocation = \"exports/a/\"\n\n[zendesk]\nsubdomain = \"acme\"\n";
    let err = |t: &str| {
        zdsync::config::SyncConfig::parse(t, "a.toml")
            .unwrap_err()
            .to_string()
    };
    let e = err(base);
    assert!(e.contains("line 3") && e.contains("[audience]"), "{e}");
    let e = err(&format!("{base}\n[audience]\ntag = \"Segment VIP\"\n"));
    assert!(
        e.contains("audience.tag") && e.contains("segment_vip"),
        "{e}"
    );
    let e = err(&format!("{base}\n[audience]\ntag = \"Segment_VIP\"\n"));
    assert!(e.contains("lower case") && e.contains("segment_vip"), "{e}");
    let e =
        err(&format!("{base}\n[audience]\ntag = \"vip\"\n").replace("\"users\"", "\"tickets\""));
    assert!(e.contains("not tickets"), "{e}");
    let e = err(&format!("{base}\n[audience]\ntag = \"vip\"\n").replace("mirror", "insert"));
    assert!(e.contains("not an audience mode"), "{e}");
    let e = err(&format!(
        "{base}\n[mapping]\nname = \"N\"\n\n[audience]\ntag = \"vip\"\n"
    ));
    assert!(
        e.contains("only applies to audience syncs in mode \"upsert\""),
        "{e}"
    );
    let upsert = base.replace("mirror", "upsert");
    let e = err(&format!(
        "{upsert}\n[mapping]\nname = \"N\"\nemail = \"E\"\ntags = \"T\"\n\n[audience]\ntag = \"vip\"\n"
    ));
    assert!(e.contains("mapping.tags"), "{e}");
    let e = err(&format!(
        "{upsert}\n[mapping]\nname = \"N\"\n\n[audience]\ntag = \"vip\"\n"
    ));
    assert!(e.contains("`email = \"<column>\"`"), "{e}");
    let c = zdsync::config::SyncConfig::parse(
        &format!("{base}\n[audience]\ntag = \"vip\"\nemail_column = \"EMAIL\"\ntag_writes = \"per_record\"\n"),
        "a.toml",
    )
    .unwrap();
    assert!(c.is_audience());
    assert_eq!(c.columns(), ["K", "EMAIL"]);
}

mod lambda_steps {
    use super::*;
    use zdsync::changeset::ChunkInfo;
    use zdsync::steps::{audience_diff_step, write_step, PlanDescriptor, StepEnv, WriteInput};
    use zdsync_tests::{finalize_event, plan_event, write_file};

    fn env(e: &E2e) -> StepEnv {
        zdsync_tests::step_env(e.root())
    }

    /// What the state machine does after Plan: AudienceDiff, then the Map (write-batch per
    /// chunk) unless there is nothing to write, then Finalize.
    async fn execute(env: &StepEnv, e: &E2e) -> (PlanDescriptor, RunRecord) {
        let d = plan_event(env, &json!({"sync": "aud", "trigger": "manual"}))
            .await
            .unwrap();
        assert_eq!(d.kind, "audience");
        assert!(!d.nothing_to_do && d.manifest_key.is_empty());
        let d = audience_diff_step(env, &d).await.unwrap();
        assert!(serde_json::to_vec(&d).unwrap().len() < 4096);
        if !d.nothing_to_do {
            let text = std::fs::read_to_string(e.root().join(&d.chunks_key)).unwrap();
            let chunks: Vec<ChunkInfo> = serde_json::from_str(&text).unwrap();
            assert_eq!(chunks.len() as u64, d.chunks);
            for chunk in chunks {
                let input = WriteInput {
                    sync: d.sync.clone(),
                    run_id: d.run_id.clone(),
                    manifest_key: d.manifest_key.clone(),
                    chunk,
                    error: None,
                };
                let out = write_step(env, &input).await.unwrap();
                assert_eq!(out.failed, 0);
            }
        }
        let rec = finalize_event(env, &json!({"plan": {"run": d}}))
            .await
            .unwrap()
            .expect("a run record");
        (d, rec)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_audience_runs_through_plan_audience_diff_write_batch_and_finalize() {
        let e = E2e::start().await;
        seed(&e, Obj::Users, 230, &[]);
        let toml = audience_toml(&e, "aud", Obj::Users, "mirror", "", "").replace(
            "file:creds.json",
            &format!("file:{}", e.root().join("creds.json").display()),
        );
        write_file(e.root(), "config/aud.toml", &toml);
        let env = env(&e);
        let keys = |r: std::ops::Range<usize>| r.map(key).collect::<Vec<_>>();
        e.write_export("aud", &members_csv(&keys(0..200)));
        let (d, rec) = execute(&env, &e).await;
        assert_eq!(d.counts.tag_add, 200);
        assert!(d.chunks >= 2, "{d:?}");
        assert_eq!((rec.status, rec.rows.tagged), (RunStatus::Succeeded, 200));
        let want: BTreeMap<String, bool> = (0..230).map(|i| (key(i), i < 200)).collect();
        check_tags(&e, Obj::Users, &want, "steps run 1");

        // Churn: 20 leave, 30 join.
        e.write_export("aud", &members_csv(&keys(20..230)));
        let (d, rec) = execute(&env, &e).await;
        assert_eq!((d.counts.tag_add, d.counts.tag_remove), (30, 20));
        assert_eq!((rec.rows.tagged, rec.rows.untagged), (30, 20));
        let want: BTreeMap<String, bool> = (0..230).map(|i| (key(i), i >= 20)).collect();
        check_tags(&e, Obj::Users, &want, "steps run 2");

        // Nothing changed: AnyTagToWrite goes straight to Finalize.
        let (d, rec) = execute(&env, &e).await;
        assert!(d.nothing_to_do);
        assert_eq!(
            (rec.status, rec.rows.unchanged),
            (RunStatus::Succeeded, 210)
        );

        // audience-diff fails (the export is gone): finalize records it and frees the lock.
        std::fs::remove_dir_all(e.root().join("exports/aud")).unwrap();
        let d = plan_event(&env, &json!({"sync": "aud"})).await.unwrap();
        let err = audience_diff_step(&env, &d).await.unwrap_err();
        assert_eq!(err.error_name(), ErrorName::ExportUnreadable);
        let state = json!({"plan": {"run": d}, "error": {"Error": err.error_name().as_str(), "Cause": err.to_string()}});
        let rec = finalize_event(&env, &state).await.unwrap().unwrap();
        assert_eq!(rec.status, RunStatus::Failed);
        assert_eq!(
            rec.error.unwrap().name,
            ErrorName::ExportUnreadable.as_str()
        );
        assert!(
            plan_event(&env, &json!({"sync": "aud"})).await.is_ok(),
            "the lock was released"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plan_refuses_an_audience_when_tagging_is_disabled() {
        let e = E2e::start().await;
        e.sim
            .update_settings(ACCOUNT, |s| s.organization_tagging = false);
        let toml = audience_toml(&e, "aud", Obj::Orgs, "add", "", "").replace(
            "file:creds.json",
            &format!("file:{}", e.root().join("creds.json").display()),
        );
        write_file(e.root(), "config/aud.toml", &toml);
        e.write_export("aud", &members_csv(&[key(0)]));
        let err = plan_event(&env(&e), &json!({"sync": "aud"}))
            .await
            .unwrap_err();
        assert_eq!(err.error_name(), ErrorName::TaggingDisabled);
        assert_eq!(write_requests(&e.counters()), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_export_needs_a_yes_before_mirror_untags_everyone() {
    let e = E2e::start().await;
    seed(&e, Obj::Users, 6, &[]);
    let name = "aud_empty";
    let keys: Vec<String> = (0..6).map(key).collect();
    let toml = audience_toml(&e, name, Obj::Users, "mirror", "", "");
    e.write_export(name, &members_csv(&keys));
    ok_record(&e.run(&toml).await, "first run");
    // A failed unload leaves a header and no rows: refused before any write.
    e.write_export(name, &members_csv(&[]));
    let before = e.counters();
    let out = e.run(&toml).await;
    let err = out.error.as_ref().expect("refused");
    assert_eq!(err.error_name(), ErrorName::ExportUnreadable, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("no members") && msg.contains("allow_empty_export = true"),
        "{msg}"
    );
    assert_eq!(write_requests(&e.counters()) - write_requests(&before), 0);
    let all: BTreeMap<String, bool> = keys.iter().map(|k| (k.clone(), true)).collect();
    check_tags(&e, Obj::Users, &all, "after the refused run");
    // The segment really is empty: with the yes, everyone is untagged.
    let toml = audience_toml(
        &e,
        name,
        Obj::Users,
        "mirror",
        "allow_empty_export = true",
        "",
    );
    let rec = ok_record(&e.run(&toml).await, "allowed");
    assert_eq!(rec.rows.untagged, 6);
    let none: BTreeMap<String, bool> = keys.iter().map(|k| (k.clone(), false)).collect();
    check_tags(&e, Obj::Users, &none, "after the allowed run");
}
