//! A stateful Zendesk Support simulator for zdsync's tests, demo and benchmarks.
//!
//! It speaks the subset of the Support API that zdsync uses (users, organizations, tickets,
//! bulk jobs, tags, custom field definitions, OAuth token refresh) with Zendesk's status codes,
//! headers and error bodies, as described in `zendesk-api.md`, plus rate limits and fault
//! injection. Start it in-process:
//!
//! ```no_run
//! # async fn demo() {
//! use zdsync_sim::{SimConfig, Simulator};
//! let sim = Simulator::start(SimConfig::default()).await.unwrap();
//! let url = sim.base_url(); // http://127.0.0.1:<port>, the default account
//! // ... drive it over HTTP ...
//! let state = sim.state("acme").unwrap();
//! assert!(state.users.len() >= 1);
//! sim.shutdown().await;
//! # }
//! ```

mod admin;
mod api;
mod auth;
pub mod config;
mod export;
pub mod faults;
pub mod fields;
mod jobs;
pub mod observe;
mod rate;
mod server;
mod store;
mod util;

pub use admin::{AccountSnapshot, MintRequest, MintedToken, SeedIds};
pub use auth::{s256, Consent};
pub use config::{
    AccountConfig, Behavior, ClientKind, DateReadback, IncrementalConfig, InvalidDropdown,
    JobConfig, JobResults, MatchConflict, OAuthClientConfig, OAuthTokenConfig, RateLimitConfig,
    SeedData, SimConfig, StaffConfig, WindowLimit, DEFAULT_ACCESS_TOKEN, DEFAULT_API_TOKEN,
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_REFRESH_TOKEN,
};
pub use faults::{FaultConfig, FaultKind, FaultRule};
pub use fields::{FieldDef, FieldOption, FieldsFixture};
pub use observe::{Counters, LogEntry};
pub use server::AccountSettings;

use axum::serve::ListenerExt;
use server::{lock, Sim};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("invalid simulator setup: {0}")]
    Setup(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Simulator;

impl Simulator {
    /// Binds `config.bind` (default `127.0.0.1:0`) and serves until the handle is shut down or
    /// dropped. Must be called inside a Tokio runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        config.validate()?;
        let sim = Arc::new(Sim::new(&config).map_err(SimError::Setup)?);
        let addr = config
            .bind
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SimError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| SimError::Bind { addr, source })?;
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(sim.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let listener = listener.tap_io(|tcp| {
            // Small JSON answers must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = rx.await;
            });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "simulator server stopped");
            }
        });
        tracing::info!(addr = %local, "zendesk simulator listening");
        Ok(SimHandle {
            sim,
            addr: local,
            shutdown: Some(tx),
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops the server (in-flight connections are closed).
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: a plain base URL, served by the default account.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/sub/<subdomain>`: one account through a path prefix, usable
    /// by any client that takes a base URL.
    pub fn account_url(&self, subdomain: &str) -> String {
        format!("http://{}/sub/{subdomain}", self.addr)
    }

    /// `http://<subdomain>.zendesk.com:<port>`: Host-based routing as Zendesk does it. The
    /// client must resolve that name to `addr()` (reqwest: `ClientBuilder::resolve`).
    pub fn host_url(&self, subdomain: &str) -> String {
        format!("http://{subdomain}.zendesk.com:{}", self.addr.port())
    }

    /// Users, organizations, tickets and jobs of one account, rendered as the API does.
    pub fn state(&self, subdomain: &str) -> Option<AccountSnapshot> {
        self.sim.snapshot(subdomain, &self.account_url(subdomain))
    }

    /// Counters of all accounts added up (plus requests to unknown subdomains).
    pub fn counters(&self) -> Counters {
        self.sim.counters_for(None).unwrap_or_default()
    }

    pub fn account_counters(&self, subdomain: &str) -> Option<Counters> {
        self.sim.counters_for(Some(subdomain))
    }

    pub fn request_log(&self) -> Vec<LogEntry> {
        self.sim.log_since(0)
    }

    /// Back to the configured state: records, credentials, jobs, counters, the request log,
    /// limiter windows, and the fault rules given at start.
    pub fn reset(&self) {
        if let Err(e) = self.sim.reset_all(self.sim.initial_faults.clone()) {
            tracing::error!(error = %e, "reset failed");
        }
    }

    pub fn set_faults(&self, faults: FaultConfig) {
        self.sim.set_faults(faults);
    }

    pub fn set_fault_rules(&self, rules: Vec<FaultRule>) {
        self.sim.set_faults(FaultConfig::with_rules(rules));
    }

    pub fn clear_faults(&self) {
        self.sim.set_faults(FaultConfig::default());
    }

    pub fn settings(&self, subdomain: &str) -> Option<AccountSettings> {
        self.sim.account(subdomain).map(|a| a.settings())
    }

    /// Changes one account's switches (bulk import, tagging, rpm).
    pub fn update_settings(&self, subdomain: &str, f: impl FnOnce(&mut AccountSettings)) -> bool {
        match self.sim.account(subdomain) {
            Some(a) => {
                let mut s = a.settings();
                f(&mut s);
                self.sim.set_settings(subdomain, s)
            }
            None => false,
        }
    }

    pub fn update_rate_limit(&self, f: impl FnOnce(&mut RateLimitConfig)) {
        self.sim.update_runtime(|rt| f(&mut rt.rate));
    }

    pub fn update_jobs(&self, f: impl FnOnce(&mut JobConfig)) {
        self.sim.update_runtime(|rt| f(&mut rt.jobs));
    }

    pub fn update_behavior(&self, f: impl FnOnce(&mut Behavior)) {
        self.sim.update_runtime(|rt| f(&mut rt.behavior));
    }

    /// Changes the incremental export's lag horizon and per-minute limit.
    pub fn update_incremental(&self, f: impl FnOnce(&mut IncrementalConfig)) {
        self.sim.update_runtime(|rt| f(&mut rt.incremental));
    }

    /// Moves the simulator clock forward (token expiry, job retention, rate windows).
    pub fn advance_clock(&self, by: Duration) {
        self.sim.clock.advance(by.as_millis() as i64);
    }

    /// Creates records directly (same validation as the API, no rate limit, no log entry).
    pub fn seed(&self, subdomain: &str, data: &SeedData) -> Result<SeedIds, String> {
        self.sim.seed(subdomain, data)
    }

    pub fn mint_token(&self, subdomain: &str, req: &MintRequest) -> Result<MintedToken, String> {
        self.sim.mint(subdomain, req)
    }

    pub fn expire_token(&self, subdomain: &str, access_token: &str) -> bool {
        self.sim.expire_token(subdomain, access_token)
    }

    pub fn revoke_token(&self, subdomain: &str, access_token: &str) -> bool {
        self.sim.revoke_token(subdomain, access_token)
    }

    /// Jobs queued or working in an account now.
    pub fn active_jobs(&self, subdomain: &str) -> usize {
        self.sim
            .account(subdomain)
            .map(|a| lock(&a.jobs).active)
            .unwrap_or(0)
    }

    /// Stops accepting connections and waits (at most 5 s) for open ones to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
