//! One Zendesk request budget per account, shared by every client of that account: the syncs of
//! one process, concurrent `zdsync` processes on one machine, and every Lambda of a deployment.
//!
//! Zendesk counts requests per account per minute, and about 30 queued bulk jobs per account.
//! The shared part of the request budget is a fixed window of [`WINDOW`] (a tenth of a minute)
//! holding at most a tenth of `rate_limit_rpm`, kept in a [`BudgetStore`] every client takes
//! small slices from. Short windows keep any sixty seconds within 1.1 × `rate_limit_rpm` even
//! when clients bunch at a window's start (the default `rate_limit_rpm` is 90 % of the plan's).
//! A client that dies holds nothing: its slice ends with its window. Job slots are leases in
//! the same store: a batch takes one before it submits its job and gives it back when the job
//! is done, so the account never has more than `max_jobs_in_flight` jobs open from zdsync; a
//! lease left by a crashed writer runs out after [`JOB_LEASE`].

use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shared window: a tenth of Zendesk's minute.
pub const WINDOW: Duration = Duration::from_secs(6);
/// A job slot taken by a writer that died is free again after this long (a job that takes
/// longer to finish may then share its slot).
pub const JOB_LEASE: Duration = Duration::from_secs(300);

/// Where an account's shared budget lives between processes.
pub trait BudgetStore: Send + Sync + std::fmt::Debug {
    /// Take up to `want` requests of window `window` (unix ms ÷ [`WINDOW`]) for `account`, of
    /// which at most `cap` may be taken in all; how many were granted (0: the window is spent).
    fn take(&self, account: &str, window: u64, want: u32, cap: u32) -> io::Result<u32>;
    /// Take one of the account's `max` job slots for `holder` until `until_ms` (unix ms);
    /// leases that ran out by `now_ms` are free. `false`: all slots are held.
    fn take_job(
        &self,
        account: &str,
        holder: &str,
        max: u32,
        until_ms: u64,
        now_ms: u64,
    ) -> io::Result<bool>;
    /// Give `holder`'s job slot back.
    fn end_job(&self, account: &str, holder: &str) -> io::Result<()>;
    /// What the store is, for logs (`file:…`, `dynamodb:…`).
    fn describe(&self) -> String;
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The window a unix-ms instant falls in.
pub fn window_of(ms: u64) -> u64 {
    ms / WINDOW.as_millis() as u64
}

/// Requests one window holds for a per-minute budget.
pub fn window_cap(rpm: u32) -> u32 {
    let per_minute = (60_000 / WINDOW.as_millis()) as u32;
    (rpm / per_minute).max(1)
}

/// The name an account's budget is kept under: its base URL (the subdomain's host, or the
/// configured endpoint), so every sync of one Zendesk account shares one budget.
pub fn account_key(base_url: &str) -> String {
    let url = base_url.trim().trim_end_matches('/').to_ascii_lowercase();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(url.as_bytes()))
}

/// The budget of each account as one small JSON object in an [`ObjectStore`], changed by
/// compare-and-swap: a folder on this machine (every local `zdsync` shares it) or a bucket.
#[derive(Clone)]
pub struct StoreBudget {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    what: String,
}

impl std::fmt::Debug for StoreBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    window: u64,
    used: u32,
    /// Job slot holder → lease end (unix ms).
    #[serde(default)]
    jobs: BTreeMap<String, u64>,
}

/// Swaps that lost to another writer are retried this often before the store counts as failing.
const TRIES: usize = 20;

impl StoreBudget {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, what: impl Into<String>) -> Self {
        StoreBudget {
            store,
            prefix: prefix.trim_end_matches('/').to_string(),
            what: what.into(),
        }
    }

    /// The machine-wide budget folder: `$ZDSYNC_BUDGET_DIR`, else the user's cache folder.
    pub fn machine() -> io::Result<Self> {
        let dir = match std::env::var_os("ZDSYNC_BUDGET_DIR") {
            Some(d) => std::path::PathBuf::from(d),
            None => {
                let base = std::env::var_os("XDG_CACHE_HOME")
                    .map(std::path::PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
                    })
                    .unwrap_or_else(std::env::temp_dir);
                base.join("zdsync").join("budget")
            }
        };
        std::fs::create_dir_all(&dir)?;
        let what = format!("file:{}", dir.display());
        Ok(Self::new(
            Arc::new(crate::store::LocalStore::new(dir)),
            "",
            what,
        ))
    }

    fn key(&self, account: &str) -> String {
        if self.prefix.is_empty() {
            format!("{account}.json")
        } else {
            format!("{}/{account}.json", self.prefix)
        }
    }

    /// Apply `change` to the account's record by compare-and-swap; returns what `change` said.
    fn update<T>(&self, account: &str, mut change: impl FnMut(&mut Account) -> T) -> io::Result<T> {
        let key = self.key(account);
        for _ in 0..TRIES {
            let current = self.store.get_tagged(&key)?;
            let mut acct = match &current {
                Some((bytes, _)) => serde_json::from_slice(bytes).unwrap_or_default(),
                None => Account::default(),
            };
            let out = change(&mut acct);
            let body = serde_json::to_vec(&acct).expect("budget serialises");
            let done = match &current {
                Some((_, tag)) => self.store.put_if_match(&key, &body, tag)?,
                None => self.store.put_if_absent(&key, &body)?,
            };
            if done {
                return Ok(out);
            }
            let jitter = u64::from(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
                    % 5,
            );
            std::thread::sleep(Duration::from_millis(1 + jitter));
        }
        Err(io::Error::other(format!(
            "{}: the budget of account {account} kept changing under {TRIES} attempts",
            self.what
        )))
    }
}

impl BudgetStore for StoreBudget {
    fn take(&self, account: &str, window: u64, want: u32, cap: u32) -> io::Result<u32> {
        self.update(account, |a| {
            if a.window != window {
                if a.window > window {
                    // Another client's clock runs ahead: this window is over for it.
                    return 0;
                }
                a.window = window;
                a.used = 0;
            }
            let granted = want.min(cap.saturating_sub(a.used));
            a.used += granted;
            granted
        })
    }

    fn take_job(
        &self,
        account: &str,
        holder: &str,
        max: u32,
        until_ms: u64,
        now_ms: u64,
    ) -> io::Result<bool> {
        self.update(account, |a| {
            a.jobs.retain(|_, until| *until > now_ms);
            if a.jobs.len() >= max as usize {
                return false;
            }
            a.jobs.insert(holder.to_string(), until_ms);
            true
        })
    }

    fn end_job(&self, account: &str, holder: &str) -> io::Result<()> {
        self.update(account, |a| {
            a.jobs.remove(holder);
        })
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn budget(dir: &std::path::Path) -> StoreBudget {
        StoreBudget::new(Arc::new(LocalStore::new(dir)), "budget", "test")
    }

    #[test]
    fn a_window_grants_its_cap_once_then_the_next_window_starts_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let b = budget(dir.path());
        assert_eq!(b.take("a", 10, 40, 70).unwrap(), 40);
        assert_eq!(b.take("a", 10, 40, 70).unwrap(), 30);
        assert_eq!(b.take("a", 10, 40, 70).unwrap(), 0);
        // Another account has its own budget.
        assert_eq!(b.take("b", 10, 40, 70).unwrap(), 40);
        assert_eq!(b.take("a", 11, 40, 70).unwrap(), 40);
        // A client whose clock lags gets nothing from a window already over.
        assert_eq!(b.take("a", 10, 40, 70).unwrap(), 0);
    }

    /// Processes on one machine share the file: many threads taking at once never get more
    /// than the window's cap between them.
    #[test]
    fn concurrent_takers_share_one_cap() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(budget(dir.path()));
        let granted: u32 = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut got = 0;
                    loop {
                        match b.take("acct", 5, 3, 100).unwrap() {
                            0 => return got,
                            n => got += n,
                        }
                    }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(granted, 100);
    }

    #[test]
    fn job_slots_are_leases_that_end_or_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let b = budget(dir.path());
        assert!(b.take_job("a", "j1", 2, 2_000, 1_000).unwrap());
        assert!(b.take_job("a", "j2", 2, 2_000, 1_000).unwrap());
        assert!(
            !b.take_job("a", "j3", 2, 2_000, 1_000).unwrap(),
            "both held"
        );
        assert!(
            b.take_job("b", "j3", 2, 2_000, 1_000).unwrap(),
            "another account"
        );
        b.end_job("a", "j1").unwrap();
        assert!(b.take_job("a", "j3", 2, 5_000, 1_100).unwrap());
        // j2's lease ran out (a writer that died): its slot is free.
        assert!(b.take_job("a", "j4", 2, 5_000, 2_500).unwrap());
        assert!(!b.take_job("a", "j5", 2, 5_000, 2_500).unwrap());
    }

    #[test]
    fn window_caps_and_account_keys() {
        assert_eq!(window_cap(700), 70);
        assert_eq!(window_cap(6000), 600);
        assert_eq!(window_cap(5), 1);
        assert_eq!(
            account_key("https://acme.zendesk.com/"),
            account_key("https://ACME.zendesk.com")
        );
        assert_ne!(
            account_key("https://acme.zendesk.com"),
            account_key("https://other.zendesk.com")
        );
    }
}
