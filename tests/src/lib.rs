//! End-to-end tests live in `tests/`. This library is their shared harness: a simulator, a
//! store folder (the bucket) with a credentials file, exports and sync configs, and a run of the
//! real pipeline (`zdsync::run::run`) against the simulator.

pub mod moto;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zdsync::changeset::{self, ResultRow};
use zdsync::config::SyncConfig;
use zdsync::run::{run, RunContext, RunError, RunOptions, RunOutcome, RunRecord};
use zdsync::store::{LocalStore, ObjectStore};
use zdsync::write::{Progress, WriteOptions};
use zdsync::zendesk::{credential_store, Client, ClientOptions};
use zdsync_sim::{Counters, SimConfig, SimHandle, Simulator};

pub use zdsync_sim;

/// The simulator's default admin.
pub const ADMIN_EMAIL: &str = "admin@acme.test";
/// The account every harness config points at.
pub const ACCOUNT: &str = "acme";
/// Rows per change-set chunk in harness configs: small, so a few hundred rows make several
/// chunks and several batches of 100.
pub const CHUNK_ROWS: usize = 150;

/// Whether a simulator endpoint name (`users.create_many`, `tickets.update`, ...) changes
/// records in Zendesk.
pub fn is_write_endpoint(name: &str) -> bool {
    let Some((object, op)) = name.split_once('.') else {
        return false;
    };
    matches!(object, "users" | "organizations" | "tickets")
        && matches!(
            op,
            "create"
                | "create_or_update"
                | "create_many"
                | "create_or_update_many"
                | "update_many"
                | "destroy_many"
                | "update"
                | "delete"
                | "tags.set"
                | "tags.add"
                | "tags.remove"
        )
}

/// Requests to endpoints that change records.
pub fn write_requests(c: &Counters) -> u64 {
    c.by_endpoint
        .iter()
        .filter(|(k, _)| is_write_endpoint(k))
        .map(|(_, v)| *v)
        .sum()
}

/// Per-endpoint request counts that grew between two counter snapshots.
pub fn endpoint_delta(before: &Counters, after: &Counters) -> Vec<(String, u64)> {
    after
        .by_endpoint
        .iter()
        .map(|(k, v)| (k.clone(), v - before.endpoint(k)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// A sync config for the simulator: `chunk_rows = CHUNK_ROWS`, credentials from
/// `creds.json` in the store folder, no request budget (`rate_limit_rpm = 0`), the export under
/// `exports/<name>/`. `mapping` is the body of the `[mapping]` table.
pub fn sync_toml(
    name: &str,
    object: &str,
    mode: &str,
    primary_key: &str,
    base_url: &str,
    mapping: &str,
) -> String {
    format!(
        r#"name = "{name}"
object = "{object}"
mode = "{mode}"
primary_key = "{primary_key}"
chunk_rows = {CHUNK_ROWS}

[source]
location = "exports/{name}/"

[zendesk]
subdomain = "{ACCOUNT}"
base_url = "{base_url}"
credentials = "file:creds.json"
rate_limit_rpm = 0

[mapping]
{mapping}
"#
    )
}

/// Write options that keep tests quick: short job polls and lookup delay.
pub fn fast_write_options() -> WriteOptions {
    WriteOptions {
        poll_min: Duration::from_millis(10),
        poll_max: Duration::from_millis(200),
        lookup_delay: Duration::from_millis(50),
        ..WriteOptions::default()
    }
}

/// Run options for tests: trigger `test`, fast write options.
pub fn fast_run_options() -> RunOptions {
    RunOptions {
        trigger: "test".into(),
        write: fast_write_options(),
        ..RunOptions::default()
    }
}

/// Client options from a config with short backoff and a short default `Retry-After`.
pub fn fast_client_options(cfg: &SyncConfig) -> ClientOptions {
    let mut o = ClientOptions::from_config(&cfg.zendesk);
    o.backoff_base = Duration::from_millis(5);
    o.backoff_max = Duration::from_millis(50);
    o.retry_after_default = Duration::from_millis(100);
    o.request_timeout = Duration::from_secs(20);
    o
}

/// Parse config text (panics on a bad config: tests write valid ones).
pub fn parse_config(toml: &str) -> SyncConfig {
    SyncConfig::parse(toml, "sync.toml").unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

/// Run a parsed sync once against `root` as the bucket; credentials are resolved against
/// `root`. A client that cannot be built becomes the outcome's error, as in the CLI.
pub async fn run_parsed(root: &Path, cfg: SyncConfig, opts: &RunOptions) -> RunOutcome {
    let store = match credential_store(&cfg.zendesk.credentials, root) {
        Ok(s) => s,
        Err(e) => {
            return RunOutcome {
                records: Vec::new(),
                error: Some(RunError::Zendesk(e)),
            }
        }
    };
    let client = match Client::new(fast_client_options(&cfg), store).await {
        Ok(c) => c,
        Err(e) => {
            return RunOutcome {
                records: Vec::new(),
                error: Some(RunError::Zendesk(e)),
            }
        }
    };
    let ctx = RunContext {
        store: Arc::new(LocalStore::new(root)),
        config: cfg,
        client,
        progress: Arc::new(Progress::default()),
    };
    run(&ctx, opts).await
}

/// Run config text once with `fast_run_options`.
pub async fn run_toml(root: &Path, toml: &str) -> RunOutcome {
    run_parsed(root, parse_config(toml), &fast_run_options()).await
}

/// The single run record of an outcome that finished no earlier run.
pub fn only_record(outcome: &RunOutcome) -> &RunRecord {
    assert_eq!(
        outcome.records.len(),
        1,
        "expected one run record, got {:#?} (error: {:?})",
        outcome.records,
        outcome.error
    );
    &outcome.records[0]
}

/// Every per-row outcome a run stored (`runs/<sync>/<run>/results/**/*.jsonl`).
pub fn stored_results(root: &Path, sync: &str, run_id: &str) -> Vec<ResultRow> {
    let store = LocalStore::new(root);
    let prefix = format!("runs/{sync}/{run_id}/results/");
    let mut objects = store.list(&prefix).expect("list results");
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| o.key.ends_with(".jsonl")) {
        out.extend(changeset::read_jsonl::<ResultRow>(&store, &o.key).expect("read results"));
    }
    out
}

/// Write `text` to `root/rel`, creating folders.
pub fn write_file(root: &Path, rel: &str, text: &str) -> PathBuf {
    let path = root.join(rel);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("create folders");
    }
    std::fs::write(&path, text).expect("write file");
    path
}

/// A running simulator plus a store folder holding an API-token `creds.json`.
pub struct E2e {
    pub sim: SimHandle,
    pub dir: tempfile::TempDir,
}

impl E2e {
    /// The default simulator (account `acme`, no job delay, no rate limit).
    pub async fn start() -> E2e {
        Self::with_config(SimConfig::default()).await
    }

    pub async fn with_config(config: SimConfig) -> E2e {
        let sim = Simulator::start(config).await.expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let e = E2e { sim, dir };
        e.write_api_token_creds(zdsync_sim::DEFAULT_API_TOKEN);
        e
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `creds.json` with the admin's email and `token`.
    pub fn write_api_token_creds(&self, token: &str) {
        let body = serde_json::json!({"email": ADMIN_EMAIL, "api_token": token});
        write_file(self.root(), "creds.json", &body.to_string());
    }

    /// `creds.json` with an OAuth token pair and the simulator's default client.
    pub fn write_oauth_creds(&self, access_token: &str, refresh_token: Option<&str>) {
        let body = serde_json::json!({
            "access_token": access_token,
            "refresh_token": refresh_token,
            "client_id": zdsync_sim::DEFAULT_CLIENT_ID,
            "client_secret": zdsync_sim::DEFAULT_CLIENT_SECRET,
        });
        write_file(self.root(), "creds.json", &body.to_string());
    }

    /// Mints an OAuth token with `scopes` (no refresh token) on account `acme` and makes it
    /// the credential of the runs.
    pub fn use_minted_token(&self, scopes: &[&str]) -> zdsync_sim::MintedToken {
        let token = self
            .sim
            .mint_token(
                "acme",
                &zdsync_sim::MintRequest {
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    ..zdsync_sim::MintRequest::default()
                },
            )
            .expect("mint a token");
        self.write_oauth_creds(&token.access_token, None);
        token
    }

    /// The whole export of a sync: `exports/<sync>/part-0000.csv`.
    pub fn write_export(&self, sync: &str, csv: &str) {
        write_file(self.root(), &format!("exports/{sync}/part-0000.csv"), csv);
    }

    /// `sync_toml` pointed at this simulator's base URL.
    pub fn toml(&self, name: &str, object: &str, mode: &str, pk: &str, mapping: &str) -> String {
        sync_toml(name, object, mode, pk, &self.sim.base_url(), mapping)
    }

    /// Run config text once (fast options).
    pub async fn run(&self, toml: &str) -> RunOutcome {
        run_toml(self.root(), toml).await
    }

    /// The account's records now.
    pub fn state(&self) -> zdsync_sim::AccountSnapshot {
        self.sim.state(ACCOUNT).expect("account exists")
    }

    pub fn counters(&self) -> Counters {
        self.sim.counters()
    }
}

/// Ticket field ids by title, from the account's field definitions (`credentials` is a
/// credential reference such as `file:creds.json`, relative to `dir`).
pub async fn ticket_field_ids(
    base_url: &str,
    credentials: &str,
    dir: &Path,
) -> std::collections::BTreeMap<String, u64> {
    let c = Client::new(
        ClientOptions::for_subdomain("acme", Some(base_url)),
        credential_store(credentials, dir).unwrap(),
    )
    .await
    .unwrap();
    let v = c.get("/api/v2/ticket_fields.json").await.unwrap();
    v["ticket_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["title"].as_str().unwrap().to_string(),
                f["id"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// plan_step on a raw execution input, as the plan Lambda reads it.
pub async fn plan_event(
    env: &zdsync::steps::StepEnv,
    event: &serde_json::Value,
) -> Result<zdsync::steps::PlanDescriptor, RunError> {
    let trigger = zdsync::steps::parse_trigger(event)?;
    zdsync::steps::plan_step(env, &trigger).await
}

/// finalize_step on a raw execution state, as the finalize Lambda reads it.
pub async fn finalize_event(
    env: &zdsync::steps::StepEnv,
    state: &serde_json::Value,
) -> Result<Option<RunRecord>, RunError> {
    let state = zdsync::steps::FinalizeState::parse(state)?;
    zdsync::steps::finalize_step(env, &state).await
}

/// The Lambdas' step environment on a local folder: credentials resolved against `root`, the
/// harness's quick write options.
pub fn step_env(root: &Path) -> zdsync::steps::StepEnv {
    let base = root.to_path_buf();
    let client_for: zdsync::steps::ClientFactory = Arc::new(move |cfg| {
        let (opts, creds) = (fast_client_options(cfg), cfg.zendesk.credentials.clone());
        let base = base.clone();
        Box::pin(async move { Client::new(opts, credential_store(&creds, &base)?).await })
    });
    zdsync::steps::StepEnv {
        store: Arc::new(LocalStore::new(root)),
        bucket: "zdsync-bucket".into(),
        client_for,
        default_concurrency: 4,
        lock_ttl: Duration::from_secs(3600),
        write: fast_write_options(),
        endpoint: zdsync::config::EndpointPolicy::default(),
        lock_check: Duration::from_millis(200),
        abort_grace: Duration::ZERO,
        settle: Duration::ZERO,
    }
}

/// One execution of the state machine, step by step as the definition runs them: plan,
/// audience-diff for an audience, write-batch for each chunk of the chunk list, finalize.
pub async fn run_steps(
    env: &zdsync::steps::StepEnv,
    root: &Path,
    sync: &str,
) -> Result<Option<RunRecord>, RunError> {
    let mut d = plan_event(env, &serde_json::json!({"sync": sync})).await?;
    if d.kind == "audience" && !d.nothing_to_do && !d.duplicate {
        d = zdsync::steps::audience_diff_step(env, &d).await?;
    }
    if !d.nothing_to_do {
        for input in chunk_inputs(root, &d) {
            zdsync::steps::write_step(env, &input).await?;
        }
    }
    finalize_event(env, &serde_json::json!({"plan": {"run": d}})).await
}

/// What the Distributed Map does: read the chunk list, one write-batch input per chunk.
pub fn chunk_inputs(
    root: &Path,
    d: &zdsync::steps::PlanDescriptor,
) -> Vec<zdsync::steps::WriteInput> {
    let text = std::fs::read_to_string(root.join(&d.chunks_key)).unwrap();
    let chunks: Vec<zdsync::changeset::ChunkInfo> = serde_json::from_str(&text).unwrap();
    chunks
        .into_iter()
        .map(|chunk| zdsync::steps::WriteInput {
            sync: d.sync.clone(),
            run_id: d.run_id.clone(),
            manifest_key: d.manifest_key.clone(),
            chunk,
            error: None,
        })
        .collect()
}
