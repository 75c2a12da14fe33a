//! Two syncs of one account sharing its budget through a store folder, as two `zdsync run`
//! processes on one machine do: together they never hold more jobs than the account's slots,
//! and a slot whose job finished is freed by whichever writer sees it first, so neither waits
//! for the other's slow own polls.

use std::sync::Arc;
use std::time::{Duration, Instant};
use zdsync::run::{run, RunContext, RunStatus};
use zdsync::store::LocalStore;
use zdsync::write::Progress;
use zdsync::zendesk::budget::StoreBudget;
use zdsync::zendesk::{credential_store, Client};
use zdsync_sim::SimConfig;
use zdsync_tests::{fast_client_options, fast_run_options, parse_config, E2e};

const ROWS: usize = 600;
const SLOTS: usize = 4;

fn users_csv(prefix: &str) -> String {
    let mut s = String::from("id,name,email\n");
    for i in 0..ROWS {
        s.push_str(&format!(
            "{prefix}{i},Person {prefix}{i},{prefix}{i}@example.com\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_of_one_account_share_its_job_slots_and_free_each_others() {
    let mut sc = SimConfig::default();
    sc.jobs.max_concurrent = SLOTS;
    sc.jobs.queued_ms = 150;
    sc.jobs.working_ms = 150;
    let e = E2e::with_config(sc).await;
    let budget_dir = tempfile::tempdir().unwrap();
    let budget = Arc::new(StoreBudget::new(
        Arc::new(LocalStore::new(budget_dir.path())),
        "",
        "test budget folder",
    ));
    let mut opts = fast_run_options();
    // A writer's own polls would come only after a minute: slots must be freed by the polls
    // made for the account's short slots, whoever's jobs they are.
    opts.write.poll_max = Duration::from_secs(60);
    let mut runs = Vec::new();
    for name in ["share_a", "share_b"] {
        e.write_export(name, &users_csv(name));
        let toml = e
            .toml(
                name,
                "users",
                "upsert",
                "id",
                "name = \"name\"\nemail = \"email\"\n",
            )
            .replace(
                "rate_limit_rpm = 0",
                &format!("rate_limit_rpm = 6000\nmax_jobs_in_flight = {SLOTS}"),
            );
        let cfg = parse_config(&toml);
        let mut o = fast_client_options(&cfg);
        o.budget = Some(budget.clone());
        let creds = credential_store(&cfg.zendesk.credentials, e.root()).unwrap();
        let client = Client::new(o, creds).await.unwrap();
        runs.push(RunContext {
            store: Arc::new(LocalStore::new(e.root())),
            config: cfg,
            client,
            progress: Arc::new(Progress::default()),
        });
    }
    let started = Instant::now();
    let (a, b) = tokio::join!(run(&runs[0], &opts), run(&runs[1], &opts));
    let took = started.elapsed();
    for outcome in [&a, &b] {
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let r = outcome.records.last().unwrap();
        assert_eq!(r.status, RunStatus::Succeeded, "{r:?}");
        assert_eq!(r.rows.created, ROWS as u64, "{r:?}");
    }
    let c = e.counters();
    assert_eq!(c.rate_limited, 0, "no 429: {c:?}");
    assert!(
        c.max_concurrent_jobs <= SLOTS as u64,
        "at most {SLOTS} jobs open for the account, saw {}",
        c.max_concurrent_jobs
    );
    // Twelve jobs of 300 ms through four slots: seconds. A slot waiting for its own writer's
    // next poll would take a minute.
    assert!(
        took < Duration::from_secs(40),
        "the syncs took {took:?}: finished jobs kept their slots"
    );
    let users = e.state().users.len();
    assert!(users >= 2 * ROWS, "{users} users");
}
