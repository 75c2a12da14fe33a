//! What tests look at: counters and the request log.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Counters for one account (or, from `SimHandle::counters`, all accounts added up).
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// API requests received (admin `/__sim/` calls are not counted).
    pub requests: u64,
    /// Requests by endpoint name, e.g. `users.create_many`, `job_statuses.show_many`.
    pub by_endpoint: BTreeMap<String, u64>,
    pub by_status: BTreeMap<u16, u64>,
    /// Every 429 sent, whatever the cause.
    pub rate_limited: u64,
    /// 429s from the account-wide limit, endpoint limits, the job limit.
    pub rate_limited_account: u64,
    pub rate_limited_endpoint: u64,
    pub rate_limited_jobs: u64,
    /// Requests received while a `Retry-After` sent earlier (429 or 503) was still running.
    pub early_requests: u64,
    pub faults: BTreeMap<String, u64>,
    pub auth_failures: u64,
    pub jobs_created: u64,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub jobs_killed: u64,
    /// Highest number of jobs queued or working at once.
    pub max_concurrent_jobs: u64,
    /// Items submitted in bulk jobs, and the items that failed.
    pub job_items: u64,
    pub job_items_failed: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.requests += o.requests;
        for (k, v) in &o.by_endpoint {
            *self.by_endpoint.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.by_status {
            *self.by_status.entry(*k).or_default() += v;
        }
        for (k, v) in &o.faults {
            *self.faults.entry(k.clone()).or_default() += v;
        }
        self.rate_limited += o.rate_limited;
        self.rate_limited_account += o.rate_limited_account;
        self.rate_limited_endpoint += o.rate_limited_endpoint;
        self.rate_limited_jobs += o.rate_limited_jobs;
        self.early_requests += o.early_requests;
        self.auth_failures += o.auth_failures;
        self.jobs_created += o.jobs_created;
        self.jobs_completed += o.jobs_completed;
        self.jobs_failed += o.jobs_failed;
        self.jobs_killed += o.jobs_killed;
        self.max_concurrent_jobs = self.max_concurrent_jobs.max(o.max_concurrent_jobs);
        self.job_items += o.job_items;
        self.job_items_failed += o.job_items_failed;
    }

    pub fn endpoint(&self, name: &str) -> u64 {
        self.by_endpoint.get(name).copied().unwrap_or(0)
    }

    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    pub seq: u64,
    pub at: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    pub account: Option<String>,
    pub endpoint: String,
    /// `none`, `basic` or `bearer`.
    pub auth: String,
    pub user_id: Option<u64>,
    /// Faults applied to this request.
    pub faults: Vec<String>,
    /// Sent while an earlier `Retry-After` was still running.
    pub early: bool,
    pub retry_after: Option<u64>,
    pub duration_us: u64,
    /// The request body of an API write, when the simulator keeps them (`log_bodies`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Debug, Default)]
pub struct RequestLog {
    pub entries: VecDeque<LogEntry>,
    pub limit: usize,
}

impl RequestLog {
    pub fn push(&mut self, e: LogEntry) {
        if self.limit == 0 {
            return;
        }
        if self.entries.len() >= self.limit {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }
}
