//! What every Lambda builds once per container: the S3 store of the deployment's bucket, the
//! Zendesk client factory (credentials from Secrets Manager, cached for the container's life),
//! and JSON logs.

use super::s3::S3Store;
use crate::steps::{ClientFactory, StepEnv};
use crate::write::WriteOptions;
use crate::zendesk::{credential_store, Client, ClientOptions, CredentialStore};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What every function does before serving: JSON logs, the step environment (built once per
/// container), and an `init_ms` line, the init time a cold start spends in zdsync.
pub fn init() -> Result<StepEnv, String> {
    let started = std::time::Instant::now();
    init_tracing();
    let env = step_env_from_env()?;
    tracing::info!(
        init_ms = started.elapsed().as_secs_f64() * 1000.0,
        "function initialised"
    );
    Ok(env)
}

/// A step's error as Lambda reports it: the error type is the closed-set name the state
/// machine's Retry and Catch match.
pub fn diagnostic(e: crate::run::RunError) -> lambda_runtime::Diagnostic {
    named(e.error_name(), e.to_string())
}

/// A Lambda error with its closed-set name.
pub fn named(name: crate::errors::ErrorName, message: String) -> lambda_runtime::Diagnostic {
    lambda_runtime::Diagnostic {
        error_type: name.as_str().into(),
        error_message: message,
    }
}

/// JSON logs on stderr (Lambda's JSON log format); `ZDSYNC_LOG` sets the filter (default
/// `info`). Lambda stamps the time itself.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZDSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .without_time()
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The step environment from the function's environment: `ZDSYNC_BUCKET` (required),
/// `ZDSYNC_CREDENTIALS` (the Zendesk secret, used by syncs whose `credentials` is `env`),
/// `ZDSYNC_BUDGET_TABLE` (the DynamoDB table of the shared Zendesk budget),
/// `ZDSYNC_MAX_CONCURRENCY`, `ZDSYNC_MAX_ATTEMPTS` (per Zendesk request, default 8), and the SDK's own `AWS_REGION` / `AWS_ENDPOINT_URL`.
pub fn step_env_from_env() -> Result<StepEnv, String> {
    let bucket = std::env::var("ZDSYNC_BUCKET").map_err(|_| {
        "ZDSYNC_BUCKET is not set: the template sets it to the stack's bucket".to_string()
    })?;
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into());
    let endpoint = std::env::var("AWS_ENDPOINT_URL").ok();
    let store = S3Store::new(&bucket, endpoint.as_deref(), &region)
        .map_err(|e| format!("cannot set up S3 for bucket `{bucket}`: {e}"))?;
    let deployment_secret = std::env::var("ZDSYNC_CREDENTIALS").ok();
    // Attempts per Zendesk request inside one invocation; the state machine retries the whole
    // invocation on top, so a deployment may trade in-invocation waiting for task retries.
    let max_attempts: Option<u32> = std::env::var("ZDSYNC_MAX_ATTEMPTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1);
    let default_concurrency: u32 = std::env::var("ZDSYNC_MAX_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    // One request budget per Zendesk account across every Lambda and sync of the deployment.
    let budget: Option<Arc<dyn crate::zendesk::budget::BudgetStore>> =
        match std::env::var("ZDSYNC_BUDGET_TABLE")
            .ok()
            .filter(|t| !t.is_empty())
        {
            Some(table) => Some(Arc::new(
                super::dynamo::DynamoBudget::new(
                    &table,
                    super::AwsConfig::new(endpoint.as_deref(), Some(&region)),
                )
                .map_err(|e| format!("cannot set up the budget table `{table}`: {e}"))?,
            )),
            None => None,
        };
    let cache: Arc<Mutex<HashMap<String, Arc<dyn CredentialStore>>>> = Arc::default();
    let client_for: ClientFactory = Arc::new(move |cfg| {
        let reference = match (&deployment_secret, cfg.zendesk.credentials.as_str()) {
            (Some(secret), "env") => secret.clone(),
            (_, r) => r.to_string(),
        };
        let mut opts = ClientOptions::from_config(&cfg.zendesk);
        if let Some(n) = max_attempts {
            opts.max_attempts = n;
        }
        // Up to `default_concurrency` write-batches of a run at once: while the table fails
        // each keeps to its share; without a table each has its share from the start.
        opts.budget_share = default_concurrency.max(1);
        opts.budget = budget.clone();
        if opts.budget.is_none() {
            opts.rpm = (opts.rpm / opts.budget_share).max(1);
        }
        let cache = cache.clone();
        Box::pin(async move {
            let creds = {
                let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
                match c.get(&reference) {
                    Some(s) => s.clone(),
                    None => {
                        let s = credential_store(&reference, std::path::Path::new("."))?;
                        c.insert(reference.clone(), s.clone());
                        s
                    }
                }
            };
            Client::new(opts, creds).await
        })
    });
    Ok(StepEnv {
        store: Arc::new(store),
        bucket,
        client_for,
        default_concurrency,
        // A run's lock spans plan to finalize; a crashed execution's lock expires after this.
        lock_ttl: Duration::from_secs(6 * 3600),
        write: WriteOptions::default(),
        endpoint: crate::config::EndpointPolicy::deployed(
            std::env::var("ZDSYNC_ZENDESK_BASE_URL").ok(),
        ),
        lock_check: Duration::from_secs(seconds("ZDSYNC_LOCK_CHECK_SECONDS", 10)),
        // One request timeout (60 s) and a lock check, with room to spare.
        abort_grace: Duration::from_secs(seconds("ZDSYNC_ABORT_GRACE_SECONDS", 120)),
        settle: Duration::from_secs(seconds("ZDSYNC_EXPORT_SETTLE_SECONDS", 60)),
    })
}

/// A whole number of seconds from the environment the template sets, or `default`.
fn seconds(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
