//! Fault injection and crash recovery, end to end: a whole `run` against the in-process Zendesk
//! simulator with 429 storms, 503s and 500s, lost answers, failed / killed jobs, failed items,
//! expired jobs and processes that die between (or in the middle of) writes and finalize.
//!
//! Every test checks the final Zendesk state row by row (each valid row present exactly once
//! with its mapped values: nothing lost, nothing duplicated), the sync state (each key confirmed
//! with the id Zendesk holds) and the run record's counts; where rows fail, a second run retries
//! exactly them and completes.
//!
//! Helpers are private to this file (the shared harness in `src/lib.rs` belongs to the other
//! end-to-end suites).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zdsync::config::SyncConfig;
use zdsync::errors::ErrorName;
use zdsync::layout;
use zdsync::lock::{self, LockInfo};
use zdsync::run::{run, RunContext, RunOptions, RunOutcome, RunRecord, RunStatus};
use zdsync::state::StateReader;
use zdsync::store::{LocalStore, ObjectStore};
use zdsync::write::{Progress, WriteOptions};
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::{Counters, FaultKind, FaultRule, SimConfig, SimHandle, Simulator};

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Obj {
    Users,
    Orgs,
    Tickets,
}

impl Obj {
    fn sync(self) -> &'static str {
        match self {
            Obj::Users => "f_users",
            Obj::Orgs => "f_orgs",
            Obj::Tickets => "f_tickets",
        }
    }

    fn object(self) -> &'static str {
        match self {
            Obj::Users => "users",
            Obj::Orgs => "organizations",
            Obj::Tickets => "tickets",
        }
    }

    fn pk(self, i: usize) -> String {
        match self {
            Obj::Users => format!("u-{i:04}"),
            Obj::Orgs => format!("o-{i:04}"),
            Obj::Tickets => format!("t-{i:04}"),
        }
    }

    fn csv(self, n: usize) -> String {
        self.csv_with(n, "")
    }

    /// The export with `old` before every name, note and subject (an earlier version of it).
    fn csv_with(self, n: usize, old: &str) -> String {
        let mut s = String::new();
        match self {
            Obj::Users => {
                s.push_str("USER_ID,FULL_NAME,EMAIL,SEGMENTS\n");
                for i in 0..n {
                    s.push_str(&format!(
                        "{},{old}User {i},User{i}@Example.com,\"Alpha,grp{}\"\n",
                        self.pk(i),
                        i % 3
                    ));
                }
            }
            Obj::Orgs => {
                s.push_str("ORG_ID,NAME,NOTES\n");
                for i in 0..n {
                    s.push_str(&format!(
                        "{},{old}Org {i},{old}notes about org {i}\n",
                        self.pk(i)
                    ));
                }
            }
            Obj::Tickets => {
                s.push_str("TICKET_ID,SUBJECT,BODY,PRIORITY\n");
                for i in 0..n {
                    s.push_str(&format!(
                        "{},{old}Subject {i},Body of ticket {i},{}\n",
                        self.pk(i),
                        PRIORITIES[i % 4].to_uppercase()
                    ));
                }
            }
        }
        s
    }

    fn mapping(self) -> &'static str {
        match self {
            Obj::Users => {
                "name = \"FULL_NAME\"\nemail = \"EMAIL\"\ntags = { column = \"SEGMENTS\", split = \"comma\" }\n"
            }
            Obj::Orgs => "name = \"NAME\"\nnotes = \"NOTES\"\n",
            Obj::Tickets => {
                "subject = \"SUBJECT\"\ndescription = \"BODY\"\npriority = \"PRIORITY\"\n"
            }
        }
    }
}

const PRIORITIES: [&str; 4] = ["low", "normal", "high", "urgent"];

struct Fx {
    sim: SimHandle,
    dir: tempfile::TempDir,
    obj: Obj,
    n: usize,
    cfg: SyncConfig,
}

fn sim_config() -> SimConfig {
    SimConfig::default()
}

impl Fx {
    async fn new(obj: Obj, n: usize) -> Fx {
        Fx::with_sim(obj, n, sim_config()).await
    }

    async fn with_sim(obj: Obj, n: usize, sim_cfg: SimConfig) -> Fx {
        Fx::with_mode(obj, n, sim_cfg, "upsert").await
    }

    async fn with_mode(obj: Obj, n: usize, sim_cfg: SimConfig, mode: &str) -> Fx {
        let sim = Simulator::start(sim_cfg).await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::write(
            root.join("creds.json"),
            format!(
                "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
                zdsync_sim::DEFAULT_API_TOKEN
            ),
        )
        .unwrap();
        let sync = obj.sync();
        let exports = root.join(format!("exports/{sync}"));
        std::fs::create_dir_all(&exports).unwrap();
        std::fs::write(exports.join("part-0000.csv"), obj.csv(n)).unwrap();
        let pk = match obj {
            Obj::Users => "USER_ID",
            Obj::Orgs => "ORG_ID",
            Obj::Tickets => "TICKET_ID",
        };
        let text = format!(
            "name = \"{sync}\"\nobject = \"{}\"\nmode = \"{mode}\"\nprimary_key = \"{pk}\"\nchunk_rows = 150\n\n\
             [source]\nlocation = \"exports/{sync}/\"\n\n\
             [zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:creds.json\"\n\n\
             [mapping]\n{}",
            obj.object(),
            sim.base_url(),
            obj.mapping()
        );
        let cfg = SyncConfig::parse(&text, "t.toml").expect("config parses");
        Fx {
            sim,
            dir,
            obj,
            n,
            cfg,
        }
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(LocalStore::new(self.dir.path()))
    }

    /// A fresh process: its own client (budget, counters) over the same folder.
    async fn ctx(&self) -> RunContext {
        self.ctx_with(|_| {}).await
    }

    async fn ctx_with(&self, tweak: impl FnOnce(&mut ClientOptions)) -> RunContext {
        let mut o = ClientOptions::from_config(&self.cfg.zendesk);
        o.rpm = 0;
        o.backoff_base = Duration::from_millis(5);
        o.backoff_max = Duration::from_millis(40);
        o.retry_after_default = Duration::from_millis(100);
        o.request_timeout = Duration::from_secs(15);
        o.connect_timeout = Duration::from_secs(5);
        tweak(&mut o);
        let creds = credential_store(&self.cfg.zendesk.credentials, self.dir.path()).unwrap();
        let client = Client::new(o, creds).await.expect("client");
        RunContext {
            store: self.store(),
            config: self.cfg.clone(),
            client,
            progress: Arc::new(Progress::default()),
        }
    }

    /// Rows of the export as Zendesk must hold them: (external id, expected fields).
    fn expected(&self, i: usize) -> Vec<(&'static str, Value)> {
        match self.obj {
            Obj::Users => vec![
                ("name", Value::from(format!("User {i}"))),
                ("email", Value::from(format!("user{i}@example.com"))),
            ],
            Obj::Orgs => vec![
                ("name", Value::from(format!("Org {i}"))),
                ("notes", Value::from(format!("notes about org {i}"))),
            ],
            Obj::Tickets => vec![
                ("subject", Value::from(format!("Subject {i}"))),
                ("description", Value::from(format!("Body of ticket {i}"))),
                ("priority", Value::from(PRIORITIES[i % 4])),
            ],
        }
    }

    /// Zendesk holds every row exactly once with its mapped values (and nothing else with
    /// these external ids), and the sync state confirms each key with that record's id.
    /// Returns the Zendesk id of each key.
    fn check_complete(&self) -> HashMap<String, u64> {
        let st = self.sim.state("acme").unwrap();
        let records: &Vec<Value> = match self.obj {
            Obj::Users => &st.users,
            Obj::Orgs => &st.organizations,
            Obj::Tickets => &st.tickets,
        };
        let mut by_ext: HashMap<String, Vec<&Value>> = HashMap::new();
        for r in records {
            if let Some(x) = r["external_id"].as_str() {
                by_ext.entry(x.to_lowercase()).or_default().push(r);
            }
        }
        let dups: Vec<String> = by_ext
            .iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(k, v)| format!("{k} x{}", v.len()))
            .collect();
        assert!(
            dups.is_empty(),
            "duplicated {} in Zendesk: {dups:?}",
            self.obj.object()
        );
        let mut ids = HashMap::new();
        let mut missing = Vec::new();
        for i in 0..self.n {
            let pk = self.obj.pk(i);
            let Some(found) = by_ext.get(&pk.to_lowercase()) else {
                missing.push(pk);
                continue;
            };
            let rec = found[0];
            for (field, want) in self.expected(i) {
                assert_eq!(&rec[field], &want, "{pk}: field `{field}` in {rec}");
            }
            if self.obj == Obj::Users {
                let tags: Vec<&str> = rec["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                let grp = format!("grp{}", i % 3);
                assert!(
                    tags.contains(&"alpha") && tags.contains(&grp.as_str()),
                    "{pk}: tags {tags:?}"
                );
            }
            ids.insert(pk, rec["id"].as_u64().unwrap());
        }
        assert!(
            missing.is_empty(),
            "{} rows missing in Zendesk: {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        assert_eq!(
            by_ext.len(),
            self.n,
            "Zendesk holds {} with external ids the export does not have",
            self.obj.object()
        );
        // The sync state agrees: every key confirmed (no failure flag) with Zendesk's id.
        let state = self.state_entries();
        assert_eq!(state.len(), self.n, "state entries");
        for (pk, id) in &ids {
            let (sid, flags) = state.get(pk).copied().unwrap_or_else(|| {
                panic!("{pk} missing from the state");
            });
            assert_eq!(flags, 0, "{pk}: state flags");
            assert_eq!(sid, *id, "{pk}: state id vs Zendesk id");
        }
        ids
    }

    /// Number of records with each external id (tickets may repeat one).
    fn copies(&self) -> HashMap<String, usize> {
        let st = self.sim.state("acme").unwrap();
        let records = match self.obj {
            Obj::Users => st.users,
            Obj::Orgs => st.organizations,
            Obj::Tickets => st.tickets,
        };
        let mut out = HashMap::new();
        for r in records {
            if let Some(x) = r["external_id"].as_str() {
                *out.entry(x.to_lowercase()).or_insert(0) += 1;
            }
        }
        out
    }

    fn assert_no_duplicates(&self) {
        let dups: Vec<(String, usize)> =
            self.copies().into_iter().filter(|(_, c)| *c > 1).collect();
        assert!(
            dups.is_empty(),
            "{} duplicated {}: {:?}",
            dups.len(),
            self.obj.object(),
            &dups[..dups.len().min(10)]
        );
    }

    /// key → (zendesk id, flags) of the sync's state.
    fn state_entries(&self) -> HashMap<String, (u64, u8)> {
        let store = self.store();
        let mut r = StateReader::open(store.as_ref(), &layout::state_key(self.obj.sync()))
            .unwrap()
            .expect("the sync has a state");
        let mut out = HashMap::new();
        while let Some(e) = r.next_entry().unwrap() {
            out.insert(e.key, (e.zendesk_id, e.flags));
        }
        out
    }

    fn counters(&self) -> Counters {
        self.sim.account_counters("acme").unwrap()
    }

    fn lock_key(&self) -> String {
        layout::lock_key(self.obj.sync())
    }

    /// Object keys under `prefix`.
    fn keys(&self, prefix: &str) -> Vec<String> {
        self.store()
            .list(prefix)
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    /// Leave the lock as a process that died would: its run id, a dead pid, expired.
    fn write_stale_lock(&self, run_id: &str) {
        let info = LockInfo {
            sync: self.obj.sync().into(),
            run_id: run_id.into(),
            host: lock::host_name(),
            pid: 999_999,
            acquired_at: "2026-01-01T00:00:00Z".into(),
            expires_at: 1_000,
            execution: None,
            abandoned: false,
        };
        self.store()
            .put(&self.lock_key(), &serde_json::to_vec_pretty(&info).unwrap())
            .unwrap();
    }
}

fn run_opts() -> RunOptions {
    RunOptions {
        trigger: "test".into(),
        write: WriteOptions {
            poll_min: Duration::from_millis(10),
            poll_max: Duration::from_millis(200),
            lookup_delay: Duration::from_millis(50),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn batch_opts(batch_size: usize) -> RunOptions {
    let mut o = run_opts();
    o.write.batch_size = batch_size;
    o
}

/// The one record of a run that finished without an error.
fn only_record(outcome: &RunOutcome) -> &RunRecord {
    assert!(outcome.error.is_none(), "run error: {:?}", outcome.error);
    assert_eq!(outcome.records.len(), 1, "{:#?}", outcome.records);
    &outcome.records[0]
}

/// A first run that confirmed every row.
fn assert_all_created(rec: &RunRecord, n: usize) {
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.read, n as u64);
    assert_eq!(rec.rows.invalid, 0);
    assert_eq!(rec.rows.created, n as u64, "{rec:#?}");
    assert_eq!(rec.rows.updated, 0);
    assert_eq!(rec.rows.failed, 0, "{:#?}", rec.failed_samples);
    assert!(rec.failed_samples.is_empty());
    assert!(!rec.resumed);
    assert!(rec.error.is_none());
}

/// A run after a complete one: nothing to send.
async fn assert_rerun_unchanged(fx: &Fx) {
    let before = fx.counters();
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.unchanged, fx.n as u64, "{rec:#?}");
    assert_eq!((rec.rows.created, rec.rows.updated), (0, 0));
    assert_eq!(rec.rows.retried, 0);
    let after = fx.counters();
    assert_eq!(
        after.job_items, before.job_items,
        "an unchanged run sends rows"
    );
}

fn elapsed(t: Instant) -> String {
    format!("{:.2}s", t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// 429s, 503s and 500s
// ---------------------------------------------------------------------------------------------

/// A storm of N 429s with `Retry-After: 1` on users `create_or_update_many` while ten batches
/// are in flight: every request of the run waits the pause out (no request reaches Zendesk
/// early), the batches are retried, every row confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_storm_with_retry_after_pauses_every_request() {
    let t = Instant::now();
    let mut sim_cfg = sim_config();
    // Jobs take a while, so many batches are in flight when the storm hits.
    sim_cfg.jobs.queued_ms = 1000;
    sim_cfg.jobs.working_ms = 500;
    let fx = Fx::with_sim(Obj::Users, 250, sim_cfg).await;
    const N: u64 = 3;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit)
            .path("/api/v2/users/create_or_update_many")
            .skip(2)
            .times(N)
            .retry_after(1)]);
    // A request budget (one request every 60 ms, as Zendesk's own limit spaces them) so the
    // client hears each 429 before its next request leaves; the 1 s Retry-After is honoured
    // as sent (cap well above it).
    let ctx = fx
        .ctx_with(|o| {
            o.rpm = 1000;
            o.retry_after_cap = Duration::from_secs(30);
        })
        .await;
    let out = run(&ctx, &batch_opts(25)).await;
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    fx.check_complete();

    let c = fx.counters();
    assert_eq!(c.early_requests, 0, "requests sent during a Retry-After");
    assert_eq!(c.faults.get("rate_limit").copied(), Some(N));
    assert!(c.rate_limited >= N);
    assert!(
        rec.requests.rate_limited >= N,
        "record counts {} 429s",
        rec.requests.rate_limited
    );
    assert!(rec.requests.retries >= N);
    // Each 429 paused the whole client for its second.
    assert!(
        rec.requests.paused_ms >= 900 * N,
        "paused {} ms",
        rec.requests.paused_ms
    );
    // 10 batches of 25 rows: ten jobs (the 429s created none), several in flight at once.
    assert_eq!(
        c.by_endpoint.get("users.create_or_update_many"),
        Some(&(10 + N))
    );
    assert_eq!(c.jobs_created, 10);
    assert_eq!(c.job_items, fx.n as u64);
    assert!(
        c.max_concurrent_jobs >= 6,
        "max concurrent jobs {}",
        c.max_concurrent_jobs
    );
    assert_rerun_unchanged(&fx).await;
    eprintln!(
        "rate_limit_storm: {} (max concurrent jobs {})",
        elapsed(t),
        c.max_concurrent_jobs
    );
}

/// 429s without `Retry-After`: the client waits its default pause and retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_without_retry_after_waits_the_default() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Users, 250).await;
    const N: u64 = 4;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::RateLimit)
            .path("/api/v2/users/create_or_update_many")
            .times(N)]);
    let ctx = fx
        .ctx_with(|o| o.retry_after_default = Duration::from_millis(150))
        .await;
    let out = run(&ctx, &batch_opts(25)).await;
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    fx.check_complete();
    let c = fx.counters();
    assert_eq!(c.faults.get("rate_limit").copied(), Some(N));
    assert_eq!(
        c.early_requests, 0,
        "no Retry-After was sent: nothing is early"
    );
    assert!(rec.requests.rate_limited >= N, "{:?}", rec.requests);
    assert!(
        rec.requests.paused_ms >= 150,
        "paused {} ms",
        rec.requests.paused_ms
    );
    assert_eq!(c.jobs_created, 10);
    assert_eq!(c.job_items, fx.n as u64);
    assert_rerun_unchanged(&fx).await;
    eprintln!("rate_limit_default: {}", elapsed(t));
}

/// 503s with `Retry-After` and 500s (before any work) on the bulk calls, and 500s on the
/// job-status polls: all sent again, every row confirmed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_and_server_errors_on_bulk_calls_and_polls_are_retried() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::Unavailable)
            .path("/api/v2/tickets/create_many")
            .times(2)
            .retry_after(1),
        // Rules count every matching request: the two answered with 503 are skipped here.
        FaultRule::new(FaultKind::InternalError)
            .path("/api/v2/tickets/create_many")
            .skip(2)
            .times(2),
        FaultRule::new(FaultKind::InternalError)
            .path("/api/v2/job_statuses/*")
            .times(3),
    ]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    fx.check_complete();
    let c = fx.counters();
    assert_eq!(c.faults.get("unavailable").copied(), Some(2));
    assert_eq!(c.faults.get("internal_error").copied(), Some(5));
    assert!(rec.requests.unavailable >= 2, "{:?}", rec.requests);
    assert!(rec.requests.server_errors >= 5, "{:?}", rec.requests);
    // The 503s (with `Retry-After`) and the polls are resent by the client; a 500 to a create
    // is an unknown outcome, looked up (nothing found) before the writer sends it again.
    assert!(rec.requests.retries >= 5, "{:?}", rec.requests);
    assert!(c.endpoint("job_statuses.list") >= 2, "{:?}", c.by_endpoint);
    // Neither a 503 nor a 500 created a job: four batches, four jobs.
    assert_eq!(c.jobs_created, 4);
    assert_eq!(c.job_items, fx.n as u64);
    assert_rerun_unchanged(&fx).await;
    eprintln!("unavailable_and_500s: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Lost answers
// ---------------------------------------------------------------------------------------------

/// The connection drops twice after Zendesk created the job (`create_many` is not idempotent):
/// the rows are looked up by external id, never created twice. Returns the simulator's counters.
async fn dropped_create_many_answers(obj: Obj, endpoint: &str) -> zdsync_sim::Counters {
    let fx = Fx::new(obj, 300).await;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::DropConnection)
            .path(&format!("/api/v2/{endpoint}"))
            .times(2)]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    assert!(rec.requests.transport_errors >= 2, "{:?}", rec.requests);
    fx.check_complete();
    let c = fx.counters();
    assert_eq!(c.faults.get("drop_connection").copied(), Some(2));
    // Four batches, four calls: the two lost answers were settled by lookups, not resends.
    assert_eq!(
        c.by_endpoint.get(&endpoint.replace('/', ".")),
        Some(&4),
        "{:?}",
        c.by_endpoint
    );
    assert_eq!(c.job_items, fx.n as u64);
    assert_rerun_unchanged(&fx).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answer_to_tickets_create_many_creates_no_duplicates() {
    let t = Instant::now();
    let c = dropped_create_many_answers(Obj::Tickets, "tickets/create_many").await;
    // Tickets have no bulk external-id look-up: the lost calls' jobs are found in the job list
    // and their first tickets read with `show_many`, not one `?external_id=` call a row.
    // (One list page is the first run's scan of the account for tickets it already holds.)
    assert!(c.endpoint("tickets.list") <= 1, "{:?}", c.by_endpoint);
    assert!(c.endpoint("job_statuses.list") >= 2, "{:?}", c.by_endpoint);
    assert!(c.endpoint("tickets.show_many") <= 4, "{:?}", c.by_endpoint);
    eprintln!("drop_tickets: {}", elapsed(t));
}

/// Lost answers to calls that are safe to repeat (users `create_or_update_many`, job-status
/// polls) are resent: the repeated upsert updates what the lost one created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answers_to_safe_calls_are_resent() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Users, 250).await;
    fx.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::DropConnection)
            .path("/api/v2/users/create_or_update_many")
            .times(2),
        FaultRule::new(FaultKind::DropConnection)
            .path("/api/v2/job_statuses/*")
            .times(2),
    ]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.failed, 0);
    // A resent batch finds the users its lost call created: Zendesk says "Updated".
    assert_eq!(rec.rows.created + rec.rows.updated, fx.n as u64, "{rec:#?}");
    assert!(rec.requests.transport_errors >= 4, "{:?}", rec.requests);
    fx.check_complete();
    let c = fx.counters();
    assert_eq!(c.faults.get("drop_connection").copied(), Some(4));
    // Three batches (100, 50, 100), two of them sent twice.
    assert_eq!(c.by_endpoint.get("users.create_or_update_many"), Some(&5));
    assert_rerun_unchanged(&fx).await;
    eprintln!("drop_safe: {}", elapsed(t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answer_to_organizations_create_many_creates_no_duplicates() {
    let t = Instant::now();
    dropped_create_many_answers(Obj::Orgs, "organizations/create_many").await;
    eprintln!("drop_orgs: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Failed, killed and partly failed jobs
// ---------------------------------------------------------------------------------------------

/// Keys whose state entry carries the failure flag.
fn flagged(fx: &Fx) -> Vec<String> {
    let mut v: Vec<String> = fx
        .state_entries()
        .into_iter()
        .filter(|(_, (_, flags))| flags & 1 != 0)
        .map(|(k, _)| k)
        .collect();
    v.sort();
    v
}

/// After a first run where some rows failed (and nothing was duplicated): Zendesk holds
/// exactly the confirmed rows, the state flags exactly the others; a second run (faults
/// cleared) sends exactly the failed rows, leaves the confirmed records alone and completes.
async fn retry_failed_rows(fx: &Fx, first: &RunRecord) {
    let n = fx.n as u64;
    let failed = first.rows.failed;
    assert!(failed > 0 && failed < n, "{first:#?}");
    assert_eq!(first.status, RunStatus::CompletedWithFailures);
    assert_eq!(first.rows.created + failed, n, "{first:#?}");
    fx.assert_no_duplicates();
    let present = fx.copies();
    assert_eq!(
        present.len() as u64,
        first.rows.created,
        "Zendesk vs confirmed rows"
    );
    let flagged = flagged(fx);
    assert_eq!(
        flagged.len() as u64,
        failed,
        "failed rows flagged in the state"
    );
    for k in &flagged {
        assert!(
            !present.contains_key(&k.to_lowercase()),
            "{k} failed but exists in Zendesk"
        );
    }
    let ids_before: HashMap<String, u64> = fx
        .state_entries()
        .into_iter()
        .filter(|(_, (_, f))| *f == 0)
        .map(|(k, (id, _))| (k, id))
        .collect();

    fx.sim.clear_faults();
    let before = fx.counters();
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.retried, failed, "{rec:#?}");
    assert_eq!(rec.rows.created, failed, "{rec:#?}");
    assert_eq!(rec.rows.unchanged, n - failed);
    assert_eq!(rec.rows.failed, 0);
    let after = fx.counters();
    assert_eq!(
        after.job_items - before.job_items,
        failed,
        "the retry run sends exactly the failed rows"
    );
    let ids = fx.check_complete();
    for (k, id) in ids_before {
        assert_eq!(
            ids[&k], id,
            "{k} was confirmed by the first run and must stay as is"
        );
    }
    assert_rerun_unchanged(fx).await;
}

/// Two `create_many` jobs end `failed`: their rows fail with the job's reason; the next run
/// retries exactly them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_jobs_fail_their_rows_with_the_reason_and_are_retried() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::FailJob)
            .path("/api/v2/tickets/create_many")
            .times(2)
            .message("Shard 7 is on fire")]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    // Batches of 100, 50, 100, 50: two of them failed.
    assert!(
        [100, 150, 200].contains(&rec.rows.failed),
        "{}",
        rec.rows.failed
    );
    assert_eq!(fx.counters().jobs_failed, 2);
    assert!(!rec.failed_samples.is_empty());
    for s in &rec.failed_samples {
        assert!(
            s.reason.contains("ended `failed`: Shard 7 is on fire"),
            "{s:?}"
        );
        assert_eq!(s.op, zdsync::changeset::Op::Create);
    }
    retry_failed_rows(&fx, rec).await;
    eprintln!("fail_job: {}", elapsed(t));
}

/// A `create_many` job killed after applying its first half: the applied rows are found and
/// confirmed, the rest fail; nothing is duplicated, neither now nor by the retry run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_job_confirms_its_applied_half_and_retries_the_rest() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::KillJob)
            .path("/api/v2/tickets/create_many")
            .times(1)
            .message("Killed by a deploy")]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_eq!(fx.counters().jobs_killed, 1);
    // Half of a batch of 100 or 50.
    assert!([25, 50].contains(&rec.rows.failed), "{rec:#?}");
    for s in &rec.failed_samples {
        assert!(
            s.reason.contains("ended `killed`: Killed by a deploy"),
            "{s:?}"
        );
    }
    retry_failed_rows(&fx, rec).await;
    eprintln!("kill_job: {}", elapsed(t));
}

/// A fifth of the items fail inside their jobs: those rows carry Zendesk's error; the second
/// run sends exactly them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_items_carry_zendesks_error_and_only_they_are_resent() {
    let t = Instant::now();
    for obj in [Obj::Tickets, Obj::Users] {
        let fx = Fx::new(obj, 300).await;
        let mut rule = FaultRule::new(FaultKind::FailItems).fraction(0.2);
        rule.error = Some("RecordInvalid".into());
        rule.details = Some("Value is too spicy".into());
        fx.sim.set_fault_rules(vec![rule]);
        let ctx = fx.ctx().await;
        let out = run(&ctx, &run_opts()).await;
        let rec = only_record(&out);
        let c = fx.counters();
        assert!(c.job_items_failed > 20, "{obj:?}: {}", c.job_items_failed);
        assert_eq!(rec.rows.failed, c.job_items_failed, "{obj:?}: {rec:#?}");
        assert_eq!(c.job_items, fx.n as u64);
        assert!(!rec.failed_samples.is_empty());
        for s in &rec.failed_samples {
            assert!(
                s.reason.contains("RecordInvalid") && s.reason.contains("Value is too spicy"),
                "{obj:?}: {s:?}"
            );
        }
        retry_failed_rows(&fx, rec).await;
    }
    eprintln!("fail_items: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Crashes
// ---------------------------------------------------------------------------------------------

/// Plan a run as `run` would (same run id), in a blocking task.
async fn plan_run(fx: &Fx, run_id: &str) -> zdsync::changeset::Manifest {
    let (store, cfg, rid) = (fx.store(), fx.cfg.clone(), run_id.to_string());
    tokio::task::spawn_blocking(move || {
        zdsync::plan::plan(store.as_ref(), &cfg, &zdsync::plan::PlanOptions::new(rid))
    })
    .await
    .unwrap()
    .expect("plan")
    .manifest
}

/// The two records of a run that first finished a crashed one.
fn resumed_then_fresh<'a>(out: &'a RunOutcome, crashed: &str) -> (&'a RunRecord, &'a RunRecord) {
    assert!(out.error.is_none(), "run error: {:?}", out.error);
    assert_eq!(out.records.len(), 2, "{:#?}", out.records);
    let (old, new) = (&out.records[0], &out.records[1]);
    assert_eq!(old.run_id, crashed);
    assert!(old.resumed, "{old:#?}");
    assert_eq!(old.trigger, "resume");
    assert!(!new.resumed);
    assert_ne!(new.run_id, crashed);
    (old, new)
}

/// The process died after every batch was written and before finalize: the next run takes
/// over the stale lock, finishes that run (its record says `resumed`), folds the state and then
/// plans its own run, which finds everything unchanged. Nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_write_and_finalize_is_finished_by_the_next_run() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    let crashed = "20260101T000000Z-dead";
    {
        let ctx = fx.ctx().await;
        let manifest = plan_run(&fx, crashed).await;
        assert_eq!(manifest.counts.create, fx.n as u64);
        let (summaries, err) = zdsync::run::write_all(&ctx, &run_opts(), &manifest).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(
            summaries.iter().map(|s| s.created).sum::<u64>(),
            fx.n as u64
        );
        fx.write_stale_lock(crashed);
    }
    let store = fx.store();
    let sync = fx.obj.sync();
    assert!(store.head(&layout::state_key(sync)).unwrap().is_none());
    assert!(store
        .head(&layout::run_record_key(sync, crashed))
        .unwrap()
        .is_none());
    let before = fx.counters();
    assert_eq!(before.job_items, fx.n as u64);

    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let (old, new) = resumed_then_fresh(&out, crashed);
    assert_eq!(old.status, RunStatus::Succeeded, "{old:#?}");
    assert_eq!(old.rows.created, fx.n as u64);
    assert_eq!(old.rows.failed, 0);
    assert_eq!(new.status, RunStatus::Succeeded, "{new:#?}");
    assert_eq!(new.rows.unchanged, fx.n as u64, "{new:#?}");
    assert_eq!((new.rows.created, new.rows.updated), (0, 0));
    // Nothing written again: the stored batch outcomes were reused.
    let after = fx.counters();
    assert_eq!(after.job_items, before.job_items);
    assert_eq!(
        after.by_endpoint.get("tickets.create_many"),
        before.by_endpoint.get("tickets.create_many")
    );
    assert!(store
        .head(&layout::run_record_key(sync, crashed))
        .unwrap()
        .is_some());
    assert!(
        store.head(&fx.lock_key()).unwrap().is_none(),
        "lock released"
    );
    fx.check_complete();
    eprintln!("crash_before_finalize: {}", elapsed(t));
}

/// Journals of a run that name a submitted job.
fn journaled_jobs(fx: &Fx, run_id: &str) -> usize {
    let store = fx.store();
    fx.keys(&format!("runs/{}/{run_id}/results/", fx.obj.sync()))
        .iter()
        .filter(|k| k.ends_with(".job.json"))
        .filter(|k| {
            let mut s = String::new();
            store
                .open(k)
                .and_then(|mut r| std::io::Read::read_to_string(&mut r, &mut s))
                .is_ok()
                && serde_json::from_str::<Value>(&s).is_ok_and(|v| v["job"].is_string())
        })
        .count()
}

/// Run, and "crash" (drop the run future) once `jobs` batches have journaled their job ids
/// while those jobs still run (the simulator's jobs must be slow).
async fn run_until_jobs_journaled(fx: &Fx, opts: &RunOptions, jobs: usize) {
    let ctx = fx.ctx().await;
    let run_id = opts.run_id.clone().expect("a fixed run id");
    let watch = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while journaled_jobs(fx, &run_id) < jobs {
            assert!(
                Instant::now() < deadline,
                "the batches were never submitted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        out = run(&ctx, opts) => panic!("the run finished before the crash: {out:?}"),
        () = watch => {}
    }
}

/// The process dies while its batches' jobs are still running (the run future is dropped):
/// the journals name the submitted jobs; the next run polls them instead of creating the rows
/// again, finishes the crashed run and folds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_the_middle_of_batches_resumes_from_the_journals() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim.update_jobs(|j| {
        j.queued_ms = 300;
        j.working_ms = 300;
    });
    let crashed = "20260101T000000Z-cut0";
    let mut opts = batch_opts(50);
    opts.run_id = Some(crashed.into());
    run_until_jobs_journaled(&fx, &opts, 6).await;
    let sync = fx.obj.sync();
    let keys = fx.keys(&format!("runs/{sync}/{crashed}/results/"));
    let journals: Vec<&String> = keys.iter().filter(|k| k.ends_with(".job.json")).collect();
    let results = keys.iter().filter(|k| k.ends_with(".jsonl")).count();
    assert_eq!(journals.len(), 6, "six batches submitted: {keys:?}");
    assert!(
        results < 6,
        "some batches unfinished at the crash: {keys:?}"
    );
    assert_eq!(journaled_jobs(&fx, crashed), 6, "journals name their jobs");
    assert_eq!(
        fx.counters().by_endpoint.get("tickets.create_many"),
        Some(&6)
    );
    // Our own process still holds the lock as far as the file says: make it a dead one's.
    fx.write_stale_lock(crashed);

    // The next process runs with the same write options (batch outcomes are stored by batch
    // number: see `resume_with_another_batch_size_keeps_outcomes_on_their_rows`).
    let ctx = fx.ctx().await;
    let out = run(&ctx, &batch_opts(50)).await;
    let (old, new) = resumed_then_fresh(&out, crashed);
    assert_eq!(old.status, RunStatus::Succeeded, "{old:#?}");
    assert_eq!(old.rows.created, fx.n as u64, "{old:#?}");
    assert_eq!(new.rows.unchanged, fx.n as u64, "{new:#?}");
    let c = fx.counters();
    assert_eq!(
        c.by_endpoint.get("tickets.create_many"),
        Some(&6),
        "a journaled batch was sent again"
    );
    assert_eq!(c.job_items, fx.n as u64);
    fx.check_complete();
    eprintln!("crash_mid_batch: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Expired jobs
// ---------------------------------------------------------------------------------------------

/// A create job that Zendesk no longer keeps when it is polled (the poll finds no such job):
/// the rows are found by external id and confirmed, nothing is created twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_job_expired_before_its_poll_is_settled_by_lookup() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 150).await; // one chunk: batches of 100 and 50
    fx.sim.update_jobs(|j| j.retention_secs = 60);
    let ctx = fx.ctx().await;
    let mut opts = run_opts();
    // The first poll comes 1.5 s after the jobs were submitted: they expire meanwhile.
    opts.write.poll_min = Duration::from_millis(1500);
    opts.write.poll_max = Duration::from_millis(1500);
    let expire = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fx.counters().jobs_completed < 2 {
            assert!(Instant::now() < deadline, "jobs never completed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            fx.counters().by_endpoint.get("job_statuses.show_many"),
            None
        );
        fx.sim.advance_clock(Duration::from_secs(61));
    };
    // (The run future is not `Send`, so it is not spawned: both go on this task.)
    let (out, ()) = tokio::join!(run(&ctx, &opts), expire);
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    let c = fx.counters();
    assert_eq!(c.by_endpoint.get("tickets.create_many"), Some(&2));
    assert_eq!(c.job_items, fx.n as u64);
    // The expired job's tickets were read back with one export page and the ticket list, not
    // one lookup a row.
    assert!(
        c.endpoint("incremental.tickets.cursor") >= 2,
        "{:?}",
        c.by_endpoint
    );
    assert!(c.endpoint("tickets.list") <= 6, "{:?}", c.by_endpoint);
    fx.check_complete();
    assert_rerun_unchanged(&fx).await;
    eprintln!("expired_job: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Lost answers and crashes while the job is still queued; runs stopped by an error
// ---------------------------------------------------------------------------------------------

/// The answer to a tickets `create_many` is lost while its job is still queued (Zendesk often
/// queues jobs for seconds): the lookup after `lookup_delay` finds nothing yet, and the rows
/// must still not be created a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_answer_while_the_job_is_still_queued_creates_no_duplicates() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 150).await;
    fx.sim.update_jobs(|j| j.queued_ms = 400);
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::DropConnection)
            .path("/api/v2/tickets/create_many")
            .times(1)]);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    // Whatever the first run recorded, a second one must leave every row exactly once.
    fx.sim.clear_faults();
    let ctx = fx.ctx().await;
    let out2 = run(&ctx, &run_opts()).await;
    fx.assert_no_duplicates();
    let rec = only_record(&out);
    assert_all_created(rec, fx.n);
    let rec2 = only_record(&out2);
    assert_eq!(rec2.rows.unchanged, fx.n as u64);
    fx.check_complete();
    eprintln!("drop_queued: {}", elapsed(t));
}

/// A process died right after Zendesk accepted a batch's `create_many` and before the job id
/// reached the journal (`{"job": null}`), while the job is still queued: resuming must not
/// create the batch's rows a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_the_job_id_was_journaled_creates_no_duplicates() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 150).await;
    fx.sim.update_jobs(|j| j.queued_ms = 400);
    let crashed = "20260101T000000Z-nojb";
    let sync = fx.obj.sync();
    {
        let ctx = fx.ctx().await;
        let manifest = plan_run(&fx, crashed).await;
        // What the dead process did for batch 0 of the only chunk: journal, then send.
        let chunk = &manifest.chunks[0];
        let name = layout::chunk_name(&chunk.key).to_string();
        let rows: Vec<zdsync::changeset::ChunkRow> =
            zdsync::changeset::read_jsonl(fx.store().as_ref(), &chunk.key).unwrap();
        let path = "/api/v2/tickets/create_many.json";
        let first: Vec<u32> = rows.iter().take(100).map(|r| r.index).collect();
        let journal = serde_json::json!({"endpoint": path, "job": null, "rows": first});
        fx.store()
            .put(
                &layout::batch_journal_key(sync, crashed, &name, "r000000-dead"),
                journal.to_string().as_bytes(),
            )
            .unwrap();
        let payloads: Vec<&Value> = rows.iter().take(100).map(|r| &r.payload).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "tickets": payloads })).unwrap();
        let answer = ctx
            .client
            .send(
                reqwest_post(),
                path,
                body,
                zdsync::zendesk::Idempotency::Unsafe,
            )
            .await
            .unwrap();
        assert_eq!(answer["job_status"]["status"], "queued");
        fx.write_stale_lock(crashed);
    }
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    fx.assert_no_duplicates();
    let (old, new) = resumed_then_fresh(&out, crashed);
    assert_eq!(old.rows.created, fx.n as u64, "{old:#?}");
    assert_eq!(new.rows.unchanged, fx.n as u64, "{new:#?}");
    fx.check_complete();
    eprintln!("crash_no_job_id: {}", elapsed(t));
}

fn reqwest_post() -> reqwest::Method {
    reqwest::Method::POST
}

/// Job-status polls fail until the client gives up, so the run stops with an error while its
/// `create_many` jobs were accepted (and complete). The rows have no outcome; the next run must
/// find them instead of creating them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_while_its_create_jobs_ran_does_not_duplicate_them_next_run() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim
        .set_fault_rules(vec![FaultRule::new(FaultKind::InternalError)
            .path("/api/v2/job_statuses/*")
            .times(3)]);
    let ctx = fx.ctx_with(|o| o.max_attempts = 3).await;
    let out = run(&ctx, &run_opts()).await;
    assert!(out.error.is_some(), "{:#?}", out.records);
    let rec = &out.records[0];
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(
        rec.error.as_ref().unwrap().name,
        ErrorName::ZendeskUnavailable.as_str(),
        "{rec:#?}"
    );
    fx.sim.clear_faults();
    let ctx = fx.ctx().await;
    let out2 = run(&ctx, &run_opts()).await;
    fx.assert_no_duplicates();
    assert!(out2.error.is_none(), "{:?}", out2.error);
    fx.check_complete();
    eprintln!("stopped_run: {}", elapsed(t));
}

/// A users `create_or_update_many` job expired before its poll: the batch is safe to resend
/// (or to look up); the run must not stop on the 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_job_expired_before_its_poll_does_not_stop_the_run() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Users, 150).await;
    fx.sim.update_jobs(|j| j.retention_secs = 60);
    let ctx = fx.ctx().await;
    let mut opts = run_opts();
    opts.write.poll_min = Duration::from_millis(1500);
    opts.write.poll_max = Duration::from_millis(1500);
    let expire = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while fx.counters().jobs_completed < 2 {
            assert!(Instant::now() < deadline, "jobs never completed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fx.sim.advance_clock(Duration::from_secs(61));
    };
    let (out, ()) = tokio::join!(run(&ctx, &opts), expire);
    let rec = only_record(&out);
    // The resent batch finds the rows the expired job created: Zendesk says "Updated".
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.created + rec.rows.updated, fx.n as u64, "{rec:#?}");
    assert_eq!(rec.rows.failed, 0, "{:#?}", rec.failed_samples);
    fx.check_complete();
    eprintln!("expired_upsert_job: {}", elapsed(t));
}

/// A crashed run resumed by a process whose batch size differs: stored batch outcomes and
/// journals must stay on the rows they belong to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_another_batch_size_keeps_outcomes_on_their_rows() {
    let t = Instant::now();
    let fx = Fx::new(Obj::Tickets, 300).await;
    fx.sim.update_jobs(|j| {
        j.queued_ms = 300;
        j.working_ms = 300;
    });
    let crashed = "20260101T000000Z-bsz0";
    let mut opts = batch_opts(50);
    opts.run_id = Some(crashed.into());
    run_until_jobs_journaled(&fx, &opts, 6).await;
    fx.write_stale_lock(crashed);
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await; // batches of 100
    let (old, _) = resumed_then_fresh(&out, crashed);
    assert_eq!(old.rows.created, fx.n as u64, "{old:#?}");
    fx.check_complete();
    eprintln!("resume_batch_size: {}", elapsed(t));
}

// ---------------------------------------------------------------------------------------------
// Failures after Zendesk did the work
// ---------------------------------------------------------------------------------------------

/// 500, 502 and 504 answers given after the simulator did the work (a gateway timing out on a
/// queued job), on about `p` of the bulk write calls (POST and PUT), plus one for certain.
fn after_commit_faults(p: f64) -> Vec<FaultRule> {
    let mut rules = vec![FaultRule::new(FaultKind::InternalError)
        .after_commit(true)
        .path("/api/v2/*_many")
        .method("POST")
        .skip(1)
        .times(1)];
    for kind in [
        FaultKind::InternalError,
        FaultKind::BadGateway,
        FaultKind::GatewayTimeout,
    ] {
        for method in ["POST", "PUT"] {
            rules.push(
                FaultRule::new(kind)
                    .after_commit(true)
                    .method(method)
                    .path("/api/v2/*_many")
                    .probability(p / 3.0),
            );
        }
    }
    rules
}

fn after_commit_fired(c: &Counters) -> u64 {
    c.faults
        .iter()
        .filter(|(k, _)| k.contains("after_commit"))
        .map(|(_, v)| *v)
        .sum()
}

/// One object × mode with a fifth of the write calls answered 5xx after the work was done:
/// no record twice, no row reported failed although Zendesk holds it, the run succeeds, and
/// the next run has nothing to send. Update mode first creates the records (older values)
/// without faults.
async fn five_hundreds_after_commit(obj: Obj, mode: &str) {
    let t = Instant::now();
    let fx = Fx::with_mode(obj, 600, sim_config(), mode).await;
    let export = fx
        .dir
        .path()
        .join(format!("exports/{}/part-0000.csv", obj.sync()));
    if mode == "update" {
        std::fs::write(&export, obj.csv_with(fx.n, "Old ")).unwrap();
        let mut ctx = fx.ctx().await;
        ctx.config.mode = zdsync::config::Mode::Upsert;
        let out = run(&ctx, &run_opts()).await;
        assert_eq!(only_record(&out).status, RunStatus::Succeeded);
        std::fs::write(&export, obj.csv(fx.n)).unwrap();
    }
    let before = after_commit_fired(&fx.counters());
    fx.sim.set_fault_rules(after_commit_faults(0.2));
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    fx.sim.clear_faults();
    let rec = only_record(&out);
    let fired = after_commit_fired(&fx.counters()) - before;
    assert!(fired >= 1, "no fault fired: {:?}", fx.counters().faults);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.failed, 0, "{:#?}", rec.failed_samples);
    let done = match mode {
        "update" => rec.rows.updated,
        // A resent users upsert finds what the lost call created: Zendesk says "Updated".
        _ => rec.rows.created + rec.rows.updated,
    };
    assert_eq!(done, fx.n as u64, "{rec:#?}");
    fx.check_complete();
    assert_rerun_unchanged(&fx).await;
    eprintln!(
        "after_commit {} {mode}: {fired} faults, {} requests, {}",
        obj.object(),
        rec.requests.sent,
        elapsed(t)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_5xx_after_commit_upsert_insert_update() {
    for mode in ["upsert", "insert", "update"] {
        five_hundreds_after_commit(Obj::Users, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_5xx_after_commit_upsert_insert_update() {
    for mode in ["upsert", "insert", "update"] {
        five_hundreds_after_commit(Obj::Orgs, mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_5xx_after_commit_upsert_insert_update() {
    for mode in ["upsert", "insert", "update"] {
        five_hundreds_after_commit(Obj::Tickets, mode).await;
    }
}

// ---------------------------------------------------------------------------------------------
// State that can be lost
// ---------------------------------------------------------------------------------------------

/// The state file deleted between two runs (a wiped prefix, a restored bucket): nothing is
/// created twice. Tickets read their ids back from Zendesk first (right after the first run, so
/// the export's last minute is covered by the ticket list); users and organizations resolve the
/// records that exist by external id.
async fn state_deleted_between_runs(obj: Obj, mode: &str) {
    let fx = Fx::with_mode(obj, 300, sim_config(), mode).await;
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    assert_all_created(only_record(&out), fx.n);
    let created = fx.counters().job_items;
    fx.store()
        .delete(&layout::state_key(obj.sync()))
        .expect("state deleted");
    let ctx = fx.ctx().await;
    let out = run(&ctx, &run_opts()).await;
    let rec = only_record(&out);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    assert_eq!(rec.rows.failed, 0, "{:#?}", rec.failed_samples);
    assert_eq!(rec.rows.created, 0, "{} {mode}: {rec:#?}", obj.object());
    fx.assert_no_duplicates();
    fx.check_complete();
    if obj == Obj::Tickets {
        let c = fx.counters();
        assert!(
            c.endpoint("incremental.tickets.cursor") >= 1,
            "{:?}",
            c.by_endpoint
        );
        // Upsert resends each row as an update (the payload is not known to match), insert
        // leaves them: no create either way.
        let sent = c.job_items - created;
        match mode {
            "insert" => assert_eq!(sent, 0, "{rec:#?}"),
            _ => assert_eq!(rec.rows.updated, fx.n as u64, "{rec:#?}"),
        }
    }
    if mode == "insert" && obj == Obj::Tickets {
        // Insert mode leaves the tickets it found as they are: skipped, never sent.
        let before = fx.counters().job_items;
        let out = run(&fx.ctx().await, &run_opts()).await;
        let rec = only_record(&out);
        assert_eq!(
            rec.rows.skipped + rec.rows.unchanged,
            fx.n as u64,
            "{rec:#?}"
        );
        assert_eq!(fx.counters().job_items, before);
    } else {
        assert_rerun_unchanged(&fx).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_state_creates_nothing_twice() {
    for obj in [Obj::Tickets, Obj::Users, Obj::Orgs] {
        for mode in ["upsert", "insert"] {
            state_deleted_between_runs(obj, mode).await;
        }
    }
}

/// `--full-resync`: every row is sent again, as an update, and nothing is created; with the
/// state gone as well, tickets are found through the export once its minute has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_resync_resends_every_row_and_creates_nothing() {
    for obj in [Obj::Tickets, Obj::Orgs, Obj::Users] {
        let fx = Fx::new(obj, 250).await;
        let ctx = fx.ctx().await;
        assert_all_created(only_record(&run(&ctx, &run_opts()).await), fx.n);
        if obj == Obj::Tickets {
            fx.store()
                .delete(&layout::state_key(obj.sync()))
                .expect("state deleted");
            fx.sim.advance_clock(Duration::from_secs(600));
        }
        let mut opts = run_opts();
        opts.full_resync = true;
        let ctx = fx.ctx().await;
        let out = run(&ctx, &opts).await;
        let rec = only_record(&out);
        assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
        assert_eq!(rec.rows.unchanged, 0, "{rec:#?}");
        assert_eq!(rec.rows.created, 0, "{} {rec:#?}", obj.object());
        assert_eq!(rec.rows.updated, fx.n as u64, "{rec:#?}");
        fx.check_complete();
        assert_rerun_unchanged(&fx).await;
    }
}

/// A create whose answer comes after the client gave up (a timeout, the work done): looked up,
/// never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_timed_out_after_the_work_was_done_is_not_sent_again() {
    for obj in [Obj::Tickets, Obj::Orgs] {
        let fx = Fx::with_mode(obj, 250, sim_config(), "insert").await;
        fx.sim.set_fault_rules(vec![FaultRule::new(FaultKind::Slow)
            .after_commit(true)
            .path("/api/v2/*/create_many")
            .delay_ms(1500)
            .times(1)]);
        let ctx = fx
            .ctx_with(|o| o.request_timeout = Duration::from_millis(700))
            .await;
        let out = run(&ctx, &run_opts()).await;
        let rec = only_record(&out);
        assert_all_created(rec, fx.n);
        assert!(rec.requests.transport_errors >= 1, "{:?}", rec.requests);
        let c = fx.counters();
        assert_eq!(
            c.jobs_created, 3,
            "three batches, three jobs: {:?}",
            c.by_endpoint
        );
        fx.check_complete();
    }
}
