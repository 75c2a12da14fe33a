//! The Lambda steps (plan → write-batch per chunk → finalize) as the state machine drives them,
//! on a local folder in place of S3 and the simulator in place of Zendesk, fed the event fixtures
//! in events/.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use zdsync::errors::ErrorName;
use zdsync::run::RunStatus;
use zdsync::steps::{parse_trigger, write_step, StepEnv};
use zdsync_sim::{SimConfig, Simulator};
use zdsync_tests::{chunk_inputs, finalize_event, plan_event};

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn triggers_come_from_s3_events_schedules_and_manual_starts() {
    let t = parse_trigger(&fixture("s3-object-created.json")).unwrap();
    assert_eq!(t.sync, "crm_users");
    assert_eq!(t.kind, "s3");
    assert_eq!(
        t.object,
        Some((
            "exports/crm_users/part-0000.csv".into(),
            "b1946ac92492d2347c6235b4d2611184".into()
        ))
    );
    let t = parse_trigger(&fixture("schedule.json")).unwrap();
    assert_eq!(
        (t.sync.as_str(), t.kind.as_str()),
        ("crm_users", "schedule")
    );
    let t = parse_trigger(&fixture("manual.json")).unwrap();
    assert_eq!(t.kind, "manual");
    let mut e = fixture("s3-object-created.json");
    e["detail"]["object"]["key"] = json!("loose-file.csv");
    let err = parse_trigger(&e).unwrap_err().to_string();
    assert!(err.contains("exports/<sync>/"), "{err}");
    assert!(parse_trigger(&json!({"hello": 1})).is_err());
}

/// Make the sync's lock look abandoned (its expiry long past); returns its path.
fn expire_lock(root: &Path) -> PathBuf {
    let lock_path = root.join("locks/people.json");
    let mut lock: Value =
        serde_json::from_str(&std::fs::read_to_string(&lock_path).unwrap()).unwrap();
    lock["expires_at"] = json!(1);
    std::fs::write(&lock_path, lock.to_string()).unwrap();
    lock_path
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    env: StepEnv,
    sim: zdsync_sim::SimHandle,
}

async fn setup() -> Setup {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    write(
        &root.join("creds.json"),
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
    write(
        &root.join("config/people.toml"),
        &format!(
            "name = \"people\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"ID\"\nchunk_rows = 100\n\n[source]\nlocation = \"exports/people/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:{}\"\n\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n\"user_fields.plan\" = {{ column = \"PLAN\", type = \"dropdown\" }}\n",
            sim.base_url(),
            root.join("creds.json").display()
        ),
    );
    let mut csv = String::from("ID,NAME,EMAIL,PLAN\n");
    for i in 0..250 {
        csv.push_str(&format!("p{i:03},Person {i},p{i}@example.com,Pro\n"));
    }
    csv.push_str("bad,No Email,,Pro\n");
    write(&root.join("exports/people/part-0000.csv"), &csv);
    let env = zdsync_tests::step_env(&root);
    Setup {
        _dir: dir,
        root,
        env,
        sim,
    }
}

fn s3_event(key: &str, etag: &str) -> Value {
    let mut e = fixture("s3-object-created.json");
    e["detail"]["object"]["key"] = json!(key);
    e["detail"]["object"]["etag"] = json!(etag);
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_event_runs_plan_write_batch_and_finalize_once() {
    let s = setup().await;
    let event = s3_event("exports/people/part-0000.csv", "etag-1");
    let d = plan_event(&s.env, &event).await.unwrap();
    // The state machine only ever carries this small descriptor.
    let size = serde_json::to_vec(&d).unwrap().len();
    assert!(size < 2048, "descriptor is {size} bytes");
    assert!(!d.nothing_to_do && !d.duplicate);
    assert_eq!(d.rows_to_write, 250);
    assert_eq!(d.chunks, 3);
    assert_eq!(d.counts.invalid, 1);
    assert!(
        s.root.join("locks/people.json").exists(),
        "plan holds the lock"
    );

    let items = chunk_inputs(&s.root, &d);
    assert_eq!(items.len(), 3);
    for item in &items {
        let out = write_step(&s.env, item).await.unwrap();
        assert_eq!(out.failed, 0);
    }
    // A retried invocation resumes from the stored outcomes: nothing is sent again.
    let before = s.sim.counters().requests;
    let again = write_step(&s.env, &items[0]).await.unwrap();
    assert_eq!(again.created, 100);
    let sent = s.sim.counters().requests - before;
    assert!(sent <= 1, "a resumed chunk sent {sent} requests");

    let state = json!({"plan": {"run": d}});
    let rec = finalize_event(&s.env, &state).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::CompletedWithFailures, "{rec:#?}");
    assert_eq!(rec.rows.created, 250);
    assert_eq!(rec.rows.invalid, 1);
    assert!(rec.requests.sent >= 3, "{:?}", rec.requests);
    assert!(
        !s.root.join("locks/people.json").exists(),
        "finalize released the lock"
    );
    assert!(s
        .root
        .join(format!("runs/people/{}/run.json", rec.run_id))
        .exists());
    let sim_state = s.sim.state("acme").unwrap();
    for i in 0..250 {
        let u = sim_state
            .user_by_external_id(&format!("p{i:03}"))
            .unwrap_or_else(|| panic!("p{i:03} missing"));
        assert_eq!(u["user_fields"]["plan"], "plan_pro");
    }
    assert_eq!(sim_state.users.len(), 251);

    // The same event again (EventBridge delivers duplicates): no second sync.
    let before = s.sim.counters().requests;
    let dup = plan_event(&s.env, &event).await.unwrap();
    assert!(dup.duplicate && dup.nothing_to_do);
    assert_eq!(s.sim.counters().requests, before);
    assert!(finalize_event(&s.env, &json!({"plan": {"run": dup}}))
        .await
        .unwrap()
        .is_none());

    // A new object (another ETag) with nothing changed: a run with nothing to write.
    let d2 = plan_event(&s.env, &s3_event("exports/people/part-0000.csv", "etag-2"))
        .await
        .unwrap();
    assert!(d2.nothing_to_do && !d2.duplicate);
    assert_eq!(d2.counts.unchanged, 250);
    let rec = finalize_event(&s.env, &json!({"plan": {"run": d2}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.rows.unchanged, 250);
    assert!(!s.root.join("locks/people.json").exists());
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_runs_are_refused_and_a_caught_failure_is_recorded() {
    let s = setup().await;
    let d = plan_event(&s.env, &json!({"sync": "people", "trigger": "schedule"}))
        .await
        .unwrap();
    // A second execution while the first holds the lock: RunLocked (the ASL retries it).
    let err = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RunLocked);
    // An export event refused that way leaves no dedupe marker: its retry is no duplicate.
    let event = s3_event("exports/people/part-0000.csv", "etag-locked");
    let err = plan_event(&s.env, &event).await.unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RunLocked);
    // The Map failed and the Catch hands the error to finalize: a failed record, lock released,
    // rows without outcome flagged to be looked up before they are created again.
    // One chunk failed after its retries; the item processor's Catch hands the Lambda error
    // to write-batch, which records it; the other chunks never ran.
    let mut items = chunk_inputs(&s.root, &d);
    let mut failed = items.remove(1);
    failed.error = Some(json!({
        "Error": ErrorName::ZendeskUnavailable.as_str(),
        "Cause": "{\"errorType\":\"ZendeskUnavailable\",\"errorMessage\":\"Zendesk answered 500 twice\"}"
    }));
    let out = write_step(&s.env, &failed).await.unwrap();
    assert_eq!((out.rows, out.failed), (100, 0));
    let rec = finalize_event(&s.env, &json!({"plan": {"run": d.clone()}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    let e = rec.error.as_ref().unwrap();
    assert_eq!(e.name, ErrorName::ZendeskUnavailable.as_str());
    assert!(
        e.message.contains("1 of 3 chunks failed")
            && e.message.contains("Zendesk answered 500 twice"),
        "{}",
        e.message
    );
    assert!(!s.root.join("locks/people.json").exists());
    // The event refused while locked now runs.
    let d = plan_event(&s.env, &event).await.unwrap();
    assert!(!d.duplicate && !d.nothing_to_do);
    // The run fails as a whole: its object's marker is dropped, so the same object (an event
    // redelivered, or the file put again) starts a run again rather than being skipped.
    let state = json!({"plan": {"run": d}, "error": {"Error": ErrorName::ZendeskUnavailable.as_str(), "Cause": "503"}});
    finalize_event(&s.env, &state).await.unwrap().unwrap();
    let d = plan_event(&s.env, &event).await.unwrap();
    assert!(!d.duplicate);
    finalize_event(&s.env, &json!({"plan": {"run": d}}))
        .await
        .unwrap();
    // A run that succeeds keeps the marker: the same event is then a duplicate.
    assert!(plan_event(&s.env, &event).await.unwrap().duplicate);

    // The Map itself failed and the Catch hands the error to finalize.
    let d = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    let state = json!({
        "plan": {"run": d},
        "error": {"Error": ErrorName::ZendeskUnavailable.as_str(), "Cause": "Zendesk answered 503 five times"}
    });
    let rec = finalize_event(&s.env, &state).await.unwrap().unwrap();
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(
        rec.error.as_ref().unwrap().name,
        ErrorName::ZendeskUnavailable.as_str()
    );
    assert_eq!(rec.rows.failed, 250);
    assert!(!s.root.join("locks/people.json").exists());
    // A plan that fails after taking the lock records nothing to fold and releases the lock.
    std::fs::write(
        s.root.join("creds.json"),
        "{\"email\":\"admin@acme.test\",\"api_token\":\"wrong\"}",
    )
    .unwrap();
    let err = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::AuthFailed);
    assert!(!s.root.join("locks/people.json").exists());
    assert!(finalize_event(
        &s.env,
        &json!({"error": {"Error": ErrorName::AuthFailed.as_str()}})
    )
    .await
    .unwrap()
    .is_none());
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_finishes_a_run_whose_execution_stopped_before_finalize() {
    let s = setup().await;
    let d = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    assert_eq!(d.rows_to_write, 250);
    // One chunk written, then the execution stopped: no finalize, the lock left to expire.
    let items = chunk_inputs(&s.root, &d);
    write_step(&s.env, &items[0]).await.unwrap();
    expire_lock(&s.root);

    // The next execution's plan takes the stale lock over and finishes that run first, as the
    // local runner does: its rows are written and folded, so none of them is planned again.
    let next = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    assert!(next.nothing_to_do, "{next:?}");
    assert_eq!(next.counts.unchanged, 250, "{next:?}");
    let old: zdsync::run::RunRecord = serde_json::from_str(
        &std::fs::read_to_string(s.root.join(format!("runs/people/{}/run.json", d.run_id)))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        old.status,
        RunStatus::CompletedWithFailures,
        "the invalid row stays refused"
    );
    assert!(old.resumed);
    let users = s.sim.state("acme").unwrap().users.len();
    assert_eq!(users, 251, "250 people and the admin, each once");
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lock_was_taken_over_never_writes_the_state() {
    let s = setup().await;
    let a = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    let items = chunk_inputs(&s.root, &a);
    write_step(&s.env, &items[0]).await.unwrap();
    // Run a looks dead (its lock expired); run b takes over and finishes it.
    let lock_path = expire_lock(&s.root);
    let b = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    // A late write-batch of run a writes nothing: run b finished a's chunks itself.
    let before = zdsync_tests::write_requests(&s.sim.counters());
    let err = write_step(&s.env, &items[1]).await.unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RunLocked, "{err}");
    assert_eq!(zdsync_tests::write_requests(&s.sim.counters()), before);
    let state_path = s.root.join("state/people/state.zst");
    let folded = std::fs::read(&state_path).unwrap();
    // Run a was only slow: its last write-batch and its finalize arrive now, and must not
    // write the state b holds the lock for.
    let err = finalize_event(&s.env, &json!({"plan": {"run": a}}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RunLocked, "{err}");
    assert_eq!(
        std::fs::read(&state_path).unwrap(),
        folded,
        "the state is b's to write"
    );
    finalize_event(&s.env, &json!({"plan": {"run": b}}))
        .await
        .unwrap();
    assert!(!lock_path.exists(), "b released its lock");
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_execution_hands_its_lock_and_export_to_the_next_run_at_once() {
    use zdsync::steps::{execution_ended_step, parse_plan_payload, plan_step, ExecutionEnded};
    let s = setup().await;
    let arn = "arn:aws:states:us-east-1:123456789012:execution:zdsync-sync:abc";
    let event = s3_event("exports/people/part-0000.csv", "etag-a");
    let trigger = parse_plan_payload(&json!({"input": event, "execution": arn})).unwrap();
    let d = plan_step(&s.env, &trigger).await.unwrap();
    write_step(&s.env, &chunk_inputs(&s.root, &d)[0])
        .await
        .unwrap();
    let marker = s.root.join(d.trigger_marker.clone().unwrap());
    assert!(marker.exists());
    let ended = |arn: &str, status: &str| -> ExecutionEnded {
        serde_json::from_value(json!({
            "detail-type": "Step Functions Execution Status Change",
            "source": "aws.states",
            "detail": {"executionArn": arn, "status": status, "input": event.to_string()}
        }))
        .unwrap()
    };
    // Another execution's end, or a success, changes nothing.
    assert!(
        !execution_ended_step(&s.env, &ended("arn:other", "ABORTED"))
            .await
            .unwrap()
    );
    assert!(!execution_ended_step(&s.env, &ended(arn, "SUCCEEDED"))
        .await
        .unwrap());
    // Its own abort: the lock is stale at once and the export may start a run again.
    assert!(execution_ended_step(&s.env, &ended(arn, "ABORTED"))
        .await
        .unwrap());
    assert!(!marker.exists());
    let next = plan_event(&s.env, &event).await.unwrap();
    assert!(!next.duplicate, "the same export object runs again");
    assert!(
        next.nothing_to_do,
        "the abandoned run was finished: {next:?}"
    );
    assert_eq!(next.counts.unchanged, 250);
    assert_eq!(s.sim.state("acme").unwrap().users.len(), 251);
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_state_cannot_reach_outside_its_run() {
    let s = setup().await;
    let d = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap();
    let items = chunk_inputs(&s.root, &d);
    // write-batch keeps the run's lock alive.
    let lock_path = s.root.join("locks/people.json");
    let expiry = |p: &Path| -> i64 {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["expires_at"].as_i64().unwrap()
    };
    let mut lock: Value =
        serde_json::from_str(&std::fs::read_to_string(&lock_path).unwrap()).unwrap();
    lock["expires_at"] = json!(expiry(&lock_path) - 1000);
    std::fs::write(&lock_path, lock.to_string()).unwrap();
    let shortened = expiry(&lock_path);
    write_step(&s.env, &items[0]).await.unwrap();
    assert!(expiry(&lock_path) > shortened, "renewed by write-batch");
    finalize_event(&s.env, &json!({"plan": {"run": d.clone()}}))
        .await
        .unwrap();
    let state = s.root.join("state/people/state.zst");
    assert!(state.exists());
    // A start request shaped like the state finalize reads, naming keys it should never touch.
    let crafted = |f: &dyn Fn(&mut Value)| {
        let mut run = serde_json::to_value(&d).unwrap();
        f(&mut run);
        json!({"plan": {"run": run}, "error": {"Error": "Internal"}})
    };
    for attack in [
        crafted(&|r| r["trigger_marker"] = json!("state/people/state.zst")),
        crafted(&|r| r["manifest_key"] = json!("runs/other/x/manifest.json")),
        crafted(&|r| r["chunks_key"] = json!("config/people.toml")),
        crafted(&|r| r["run_id"] = json!("../../state")),
        crafted(&|r| r["sync"] = json!("../people")),
    ] {
        let err = finalize_event(&s.env, &attack).await.unwrap_err();
        assert_eq!(
            err.error_name(),
            ErrorName::ConfigInvalid,
            "{attack}: {err}"
        );
    }
    assert!(state.exists(), "the state is still there");
    let mut outside = items[1].clone();
    outside.chunk.key = "state/people/state.zst".into();
    let err = write_step(&s.env, &outside).await.unwrap_err();
    assert_eq!(err.error_name(), ErrorName::ConfigInvalid, "{err}");
    let mut other = items[1].clone();
    other.manifest_key = "runs/other/r/manifest.json".into();
    assert!(write_step(&s.env, &other).await.is_err());
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_must_name_the_sync_it_is_stored_for() {
    let s = setup().await;
    let text = std::fs::read_to_string(s.root.join("config/people.toml")).unwrap();
    write(&s.root.join("config/other.toml"), &text);
    let err = plan_event(&s.env, &json!({"sync": "other"}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::ConfigInvalid);
    assert!(err.to_string().contains("config/people.toml"), "{err}");
    for bad in ["../people", "a/b", ""] {
        let err = plan_event(&s.env, &json!({"sync": bad})).await.unwrap_err();
        assert_eq!(err.error_name(), ErrorName::ConfigInvalid, "{bad}: {err}");
    }
    assert!(!s.root.join("locks/other.json").exists());
    // A config is a page of TOML, not read whole when it is far more.
    let huge = format!("{text}\n# {}\n", "x".repeat(300 * 1024));
    write(&s.root.join("config/people.toml"), &huge);
    let err = plan_event(&s.env, &json!({"sync": "people"}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::ConfigInvalid);
    assert!(err.to_string().contains("at most"), "{err}");
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_over_the_row_cap_of_its_execution_input_stops_before_any_write() {
    let s = setup().await;
    let err = parse_trigger(&json!({"sync": "people", "max_rows": "lots"})).unwrap_err();
    assert!(err.to_string().contains("max_rows"), "{err}");
    let t = parse_trigger(&json!({"sync": "people", "max_rows": 10})).unwrap();
    assert_eq!(t.max_rows, Some(10));
    let before = zdsync_tests::write_requests(&s.sim.counters());
    let err = plan_event(&s.env, &json!({"sync": "people", "max_rows": 10}))
        .await
        .unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RowCapExceeded, "{err}");
    assert!(err.to_string().contains("250 rows"), "{err}");
    assert!(!s.root.join("locks/people.json").exists());
    assert_eq!(zdsync_tests::write_requests(&s.sim.counters()), before);
    // Within the cap it plans as usual.
    let d = plan_event(&s.env, &json!({"sync": "people", "max_rows": 250}))
        .await
        .unwrap();
    assert_eq!(d.rows_to_write, 250);
    s.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_that_is_one_object_starts_only_when_that_object_lands() {
    let s = setup().await;
    // A multi-part unload: the parts land first, the manifest last; the sync reads the manifest.
    let config = std::fs::read_to_string(s.root.join("config/people.toml"))
        .unwrap()
        .replace("exports/people/", "exports/people/manifest");
    write(&s.root.join("config/people.toml"), &config);
    write(
        &s.root.join("exports/people/manifest"),
        "{\"entries\":[{\"url\":\"s3://zdsync-bucket/exports/people/part-0000.csv\",\"mandatory\":true}]}",
    );
    let before = s.sim.counters().requests;
    let part = plan_event(&s.env, &s3_event("exports/people/part-0000.csv", "e1"))
        .await
        .unwrap();
    assert!(part.nothing_to_do && !part.duplicate && part.manifest_key.is_empty());
    assert!(!s.root.join("locks/people.json").exists(), "no lock taken");
    assert_eq!(s.sim.counters().requests, before, "no Zendesk request");
    assert!(finalize_event(&s.env, &json!({"plan": {"run": part}}))
        .await
        .unwrap()
        .is_none());
    let d = plan_event(&s.env, &s3_event("exports/people/manifest", "e2"))
        .await
        .unwrap();
    assert!(!d.nothing_to_do, "{d:?}");
    assert_eq!(d.rows_to_write, 250);
    s.sim.shutdown().await;
}

/// One part of a prefix export: rows `q<from>`..`q<to>`.
fn write_part(root: &Path, name: &str, ids: std::ops::Range<u32>) {
    let mut csv = String::from("ID,NAME,EMAIL,PLAN\n");
    for i in ids {
        csv.push_str(&format!("q{i:04},Q {i},q{i}@example.com,Pro\n"));
    }
    write(&root.join("exports/people").join(name), &csv);
}

/// A multi-part unload into the sync's prefix: an event per part, all at once and one while the
/// run waits. One execution waits for the prefix to settle and plans every part; the others join
/// it. A part that lands after that run listed the prefix starts the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_multi_part_unload_starts_one_run_that_plans_every_part() {
    let mut s = setup().await;
    s.env.settle = std::time::Duration::from_millis(700);
    for p in 1..12u32 {
        write_part(&s.root, &format!("part-{p:04}.csv"), p * 10..p * 10 + 10);
    }
    let env = s.env;
    let mut events: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _>>>> = (0..12u32)
        .map(|p| {
            let env = &env;
            Box::pin(async move {
                let e = s3_event(&format!("exports/people/part-{p:04}.csv"), &format!("e{p}"));
                plan_event(env, &e).await.unwrap()
            }) as std::pin::Pin<Box<dyn std::future::Future<Output = _>>>
        })
        .collect();
    // A part that lands while the run waits for the prefix to settle.
    let (env2, root2) = (&env, s.root.clone());
    events.push(Box::pin(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        write_part(&root2, "part-0012.csv", 120..130);
        let e = s3_event("exports/people/part-0012.csv", "e12");
        plan_event(env2, &e).await.unwrap()
    }));
    let mut planned = Vec::new();
    for d in futures::future::join_all(events).await {
        if !d.duplicate {
            planned.push(d);
        } else {
            assert!(d.nothing_to_do && d.manifest_key.is_empty());
        }
    }
    assert_eq!(planned.len(), 1, "one execution plans: {planned:#?}");
    let d = planned.pop().unwrap();
    // 250 rows of part-0000 and 10 of each of the 12 other parts.
    assert_eq!(d.rows_to_write, 250 + 12 * 10, "{d:?}");
    assert!(!s.root.join("triggers/people/pending.json").exists());
    for item in chunk_inputs(&s.root, &d) {
        assert_eq!(write_step(&env, &item).await.unwrap().failed, 0);
    }
    let rec = finalize_event(&env, &json!({"plan": {"run": d}}))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.rows.created, 370);

    // After the run listed the prefix, a new part starts its own run with just its rows.
    write_part(&s.root, "part-0013.csv", 130..135);
    let late = plan_event(&env, &s3_event("exports/people/part-0013.csv", "e13"))
        .await
        .unwrap();
    assert!(!late.duplicate);
    assert_eq!((late.rows_to_write, late.counts.unchanged), (5, 370));
    assert_eq!(s.sim.state("acme").unwrap().users.len(), 371);
    s.sim.shutdown().await;
}

/// An execution aborted mid-write whose lock the next run took over: its write-batch notices
/// within `lock_check` and stops sending (the call in flight finishes and records), so the two
/// runs never write the same rows at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_batch_whose_run_was_taken_over_stops_sending() {
    use zdsync_sim::{FaultKind, FaultRule};
    let mut s = setup().await;
    s.env.write.batch_size = 10;
    s.env.write.max_jobs_in_flight = 1;
    s.env.lock_check = std::time::Duration::from_millis(100);
    let d = plan_event(&s.env, &json!({"sync": "people", "trigger": "manual"}))
        .await
        .unwrap();
    let items = chunk_inputs(&s.root, &d);
    assert_eq!(items[0].chunk.rows, 100, "ten batches of ten");
    s.sim.set_fault_rules(vec![FaultRule {
        path: Some("/api/v2/users/create_or_update_many".into()),
        delay_ms: 300,
        ..FaultRule::new(FaultKind::Slow)
    }]);
    let lock_path = s.root.join("locks/people.json");
    let take_over = async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut lock: Value =
            serde_json::from_str(&std::fs::read_to_string(&lock_path).unwrap()).unwrap();
        lock["run_id"] = json!("20261206T000000Z-next");
        std::fs::write(&lock_path, lock.to_string()).unwrap();
    };
    let (written, ()) = tokio::join!(write_step(&s.env, &items[0]), take_over);
    let err = written.unwrap_err();
    assert_eq!(err.error_name(), ErrorName::RunLocked, "{err}");
    let calls = s.sim.counters().by_endpoint["users.create_or_update_many"];
    assert!(
        (1..=4).contains(&calls),
        "stopped after {calls} of 10 batches"
    );
    s.sim.shutdown().await;
}
