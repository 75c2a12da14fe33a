//! One pipeline wherever it runs: each scenario is driven once through the local runner
//! (`zdsync run`) and once through the Lambda steps in sequence (plan → audience-diff →
//! write-batch per chunk → finalize), each against its own simulator and bucket. Both must end
//! with the same records in Zendesk, the same state file and the same run-record counts.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use zdsync::record::RowCounts;
use zdsync::run::{RunRecord, RunStatus};
use zdsync::state::StateReader;
use zdsync::store::LocalStore;
use zdsync_sim::{FaultKind, FaultRule, SimConfig, SimHandle, Simulator};
use zdsync_tests::{chunk_inputs, plan_event, run_steps, step_env, write_file};

/// What happens before a run of the scenario.
enum Round {
    /// Write these export rows (`ID,NAME,EMAIL`), then run.
    Export(Vec<(String, String, String)>),
    /// An execution that plans and writes one chunk, then stops dead before finalize (its
    /// lock left stale); the next run finishes it.
    Crash(Vec<(String, String, String)>),
    /// Write these rows and run while Zendesk's edge loses answers after the work is done: a
    /// 502 and a 504 on bulk writes that Zendesk carried out.
    LostAnswers(Vec<(String, String, String)>),
}

#[derive(Clone, Copy, PartialEq)]
enum Via {
    Local,
    Steps,
}

fn people(n: usize, renamed: &[usize]) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| {
            let name = if renamed.contains(&i) {
                format!("Person {i} (renamed)")
            } else {
                format!("Person {i}")
            };
            (format!("p{i:03}"), name, format!("p{i}@example.com"))
        })
        .collect()
}

fn csv(rows: &[(String, String, String)]) -> String {
    let mut s = String::from("ID,NAME,EMAIL\n");
    for (id, name, email) in rows {
        s.push_str(&format!("{id},{name},{email}\n"));
    }
    s
}

fn config(name: &str, base_url: &str, audience: bool) -> String {
    let (mode, tail) = if audience {
        ("mirror", "[audience]\ntag = \"vip\"\n")
    } else {
        ("upsert", "[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n")
    };
    format!(
        "name = \"{name}\"\nobject = \"users\"\nmode = \"{mode}\"\nprimary_key = \"ID\"\nchunk_rows = 100\n\n[source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{base_url}\"\ncredentials = \"file:creds.json\"\nrate_limit_rpm = 0\n\n{tail}"
    )
}

/// Everything that must agree between the two paths.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// external_id → (name, email, tags), as Zendesk holds them.
    users: BTreeMap<String, (Value, Value, Value)>,
    /// Every user record Zendesk holds (a key created twice would show here).
    user_records: usize,
    /// key → (fingerprint, flags, has a Zendesk id), from the state file.
    state: BTreeMap<String, (u64, u8, bool)>,
    /// Every run record, oldest first: (status, counts, resumed).
    runs: Vec<(RunStatus, RowCounts, bool)>,
}

async fn drive(path: Via, audience: bool, seed_users: usize, rounds: &[Round]) -> Outcome {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_file(
        root,
        "creds.json",
        &json!({"email": "admin@acme.test", "api_token": zdsync_sim::DEFAULT_API_TOKEN})
            .to_string(),
    );
    let sync = "people";
    // An audience tags users that exist: seed them through an object sync first, by the same
    // path.
    if seed_users > 0 {
        write_file(
            root,
            "config/seed.toml",
            &config("seed", &sim.base_url(), false),
        );
        write_file(
            root,
            "exports/seed/part-0.csv",
            &csv(&people(seed_users, &[])),
        );
        run_once(path, root, "seed").await;
    }
    write_file(
        root,
        &format!("config/{sync}.toml"),
        &config(sync, &sim.base_url(), audience),
    );
    let env = step_env(root);
    for round in rounds {
        match round {
            Round::Export(rows) => {
                write_file(root, &format!("exports/{sync}/part-0.csv"), &csv(rows));
                run_once(path, root, sync).await;
            }
            Round::LostAnswers(rows) => {
                write_file(root, &format!("exports/{sync}/part-0.csv"), &csv(rows));
                let lost = |kind, skip| {
                    FaultRule::new(kind)
                        .after_commit(true)
                        .method("POST")
                        .path("/api/v2/*_many")
                        .skip(skip)
                        .times(1)
                };
                sim.set_fault_rules(vec![
                    lost(FaultKind::BadGateway, 0),
                    lost(FaultKind::GatewayTimeout, 1),
                ]);
                let before = after_commit_fired(&sim);
                run_once(path, root, sync).await;
                assert_eq!(
                    after_commit_fired(&sim) - before,
                    2,
                    "both answers were lost after the work"
                );
                sim.clear_faults();
            }
            Round::Crash(rows) => {
                write_file(root, &format!("exports/{sync}/part-0.csv"), &csv(rows));
                let d = plan_event(&env, &json!({"sync": sync})).await.unwrap();
                let first = chunk_inputs(root, &d).remove(0);
                zdsync::steps::write_step(&env, &first).await.unwrap();
                let lock = root.join(format!("locks/{sync}.json"));
                let mut held: Value =
                    serde_json::from_str(&std::fs::read_to_string(&lock).unwrap()).unwrap();
                held["expires_at"] = json!(1);
                std::fs::write(&lock, held.to_string()).unwrap();
            }
        }
    }
    let outcome = observe(&sim, root, sync);
    sim.shutdown().await;
    outcome
}

async fn run_once(path: Via, root: &Path, sync: &str) {
    match path {
        Via::Local => {
            let text = std::fs::read_to_string(root.join(format!("config/{sync}.toml"))).unwrap();
            let outcome = zdsync_tests::run_toml(root, &text).await;
            assert!(outcome.error.is_none(), "{:?}", outcome.error);
        }
        Via::Steps => {
            run_steps(&step_env(root), root, sync).await.unwrap();
        }
    }
}

/// Faults the simulator applied after doing the work.
fn after_commit_fired(sim: &SimHandle) -> u64 {
    sim.counters()
        .faults
        .iter()
        .filter(|(k, _)| k.contains("after_commit"))
        .map(|(_, v)| v)
        .sum()
}

fn observe(sim: &SimHandle, root: &Path, sync: &str) -> Outcome {
    let snapshot = sim.state("acme").unwrap();
    let users = snapshot
        .users
        .iter()
        .filter_map(|u| {
            let ext = u["external_id"].as_str()?.to_string();
            let mut tags: Vec<Value> = u["tags"].as_array().cloned().unwrap_or_default();
            tags.sort_by_key(|t| t.to_string());
            Some((
                ext,
                (u["name"].clone(), u["email"].clone(), Value::from(tags)),
            ))
        })
        .collect();
    let store = LocalStore::new(root);
    let mut state = BTreeMap::new();
    if let Some(mut reader) = StateReader::open(&store, &zdsync::layout::state_key(sync)).unwrap() {
        while let Some(e) = reader.next_entry().unwrap() {
            state.insert(e.key, (e.fingerprint, e.flags, e.zendesk_id != 0));
        }
    }
    let mut records: Vec<RunRecord> = zdsync::run::history(&store, sync, 100).unwrap();
    records.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    let runs = records
        .into_iter()
        .map(|r| (r.status, r.rows, r.resumed))
        .collect();
    Outcome {
        users,
        user_records: snapshot.users.len(),
        state,
        runs,
    }
}

fn fmt_map<V: std::fmt::Debug>(m: &BTreeMap<String, V>) -> std::collections::BTreeSet<String> {
    m.iter().map(|(k, v)| format!("{k}: {v:?}")).collect()
}

/// Drive the scenario both ways, assert they agree, and return what they agreed on.
async fn both(name: &str, audience: bool, seed_users: usize, rounds: Vec<Round>) -> Outcome {
    let local = drive(Via::Local, audience, seed_users, &rounds).await;
    let steps = drive(Via::Steps, audience, seed_users, &rounds).await;
    assert!(!local.runs.is_empty(), "{name}: no run recorded");
    assert_eq!(
        local.runs, steps.runs,
        "{name}: run records, local vs steps"
    );
    assert_eq!(
        local.user_records, steps.user_records,
        "{name}: user records in Zendesk"
    );
    for (what, a, b) in [
        ("users", fmt_map(&local.users), fmt_map(&steps.users)),
        ("state", fmt_map(&local.state), fmt_map(&steps.state)),
    ] {
        let only: Vec<&String> = a.symmetric_difference(&b).take(6).collect();
        assert!(
            only.is_empty(),
            "{name}: {what} differ (local vs steps), e.g. {only:?}"
        );
    }
    local
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_run_then_nothing_to_do() {
    let o = both(
        "clean, then unchanged",
        false,
        0,
        vec![
            Round::Export(people(250, &[])),
            Round::Export(people(250, &[])),
        ],
    )
    .await;
    let last = &o.runs.last().unwrap().1;
    assert_eq!((o.runs.len(), last.unchanged, last.created), (2, 250, 0));
    assert_eq!(o.users.len(), 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_zendesk_refuses_fail_alike() {
    // p006 takes p005's email: Zendesk refuses the item (the email belongs to another user).
    let mut clash = people(250, &[1, 2]);
    clash[6].2 = "p5@example.com".into();
    let o = both(
        "item failures",
        false,
        0,
        vec![Round::Export(people(250, &[])), Round::Export(clash)],
    )
    .await;
    let (status, last, _) = o.runs.last().unwrap();
    assert_eq!(*status, RunStatus::CompletedWithFailures);
    assert_eq!((last.failed, last.updated), (1, 2), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_run_is_finished_alike_by_the_next_run() {
    let o = both(
        "crash mid-write, then resume",
        false,
        0,
        vec![
            Round::Crash(people(250, &[])),
            Round::Export(people(260, &[3])),
        ],
    )
    .await;
    assert!(o.runs[0].2, "the crashed run was finished (resumed)");
    assert_eq!(o.runs[0].1.created, 250);
    assert_eq!(o.users.len(), 260, "every person once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_churns_alike() {
    let members = |range: std::ops::Range<usize>| -> Vec<(String, String, String)> {
        people(200, &[])
            .into_iter()
            .enumerate()
            .filter(|(i, _)| range.contains(i))
            .map(|(_, r)| r)
            .collect()
    };
    let o = both(
        "audience churn",
        true,
        200,
        vec![
            Round::Export(members(0..120)),
            Round::Export(members(20..150)),
        ],
    )
    .await;
    let last = &o.runs.last().unwrap().1;
    assert_eq!((last.tagged, last.untagged), (30, 20), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_after_the_work_is_done_end_alike_with_every_row_once() {
    let o = both(
        "lost answers",
        false,
        0,
        // The updates' answers are lost (which create a lost answer hits, and so whether the
        // resent row counts as created or updated, depends on the order parallel chunks go out).
        vec![
            Round::Export(people(250, &[])),
            Round::LostAnswers(people(250, &[4, 150])),
        ],
    )
    .await;
    // Row by row: every person once, with this export's values.
    assert_eq!(o.user_records, 251, "250 people and the admin, none twice");
    for (i, (_, name, email)) in people(250, &[4, 150]).iter().enumerate() {
        let (n, e, _) = &o.users[&format!("p{i:03}")];
        assert_eq!(
            (n.as_str(), e.as_str()),
            (Some(name.as_str()), Some(email.as_str()))
        );
    }
    let last = &o.runs.last().unwrap().1;
    assert_eq!((last.updated, last.failed), (2, 0), "{last:?}");
}
