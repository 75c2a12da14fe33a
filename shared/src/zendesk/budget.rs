//! One Zendesk request budget per account, shared by every client of that account: the syncs of
//! one process, concurrent `zdsync` processes on one machine, and every Lambda of a deployment.
//!
//! Zendesk counts requests per account per minute, and about 30 queued bulk jobs per account.
//! The shared part of the request budget is a fixed window of [`WINDOW`] (a tenth of a minute)
//! holding a tenth of [`per_minute`] (`rate_limit_rpm` less one slice and one request), kept in
//! a [`BudgetStore`] every client takes small slices from as the window releases them. Any
//! sixty seconds then hold at most `rate_limit_rpm`, wherever Zendesk's minute starts.
//! A client that dies holds nothing: its slice ends with its window. Job slots are leases in
//! the same store: a batch takes one before it submits its job and gives it back when the job
//! is done, so the account never has more than `max_jobs_in_flight` jobs open from zdsync; a
//! lease left by a crashed writer runs out after [`JOB_LEASE`]. Whichever writer polls also
//! polls the other writers' jobs that should be done, and keeps the finished ones' statuses in
//! the store for their writers ([`BudgetStore::put_done`]), so each job is polled about once
//! however many writers share the account.

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

/// A job slot lease with the Zendesk job its batch submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenJob {
    pub holder: String,
    pub job: String,
    /// When the lease was taken (unix ms), about when the job was submitted.
    pub since_ms: u64,
}

/// Where an account's shared budget lives between processes.
pub trait BudgetStore: Send + Sync + std::fmt::Debug {
    /// Take up to `want` requests of window `window` (unix ms ÷ [`WINDOW`]) for `account`, of
    /// which at most `cap` may be taken in all; how many were granted (0: the window is spent).
    /// Requests below `floor` that nobody took are forfeit (counted as taken first), so a
    /// window's requests cannot pile up while no one asks and then go out in a burst.
    fn take(&self, account: &str, window: u64, want: u32, cap: u32, floor: u32) -> io::Result<u32>;
    /// Take one of the account's `max` job slots for `holder` until `until_ms` (unix ms);
    /// leases that ran out by `now_ms` are free. The slots held once this one is taken, or
    /// `None`: all slots are held.
    fn take_job(
        &self,
        account: &str,
        holder: &str,
        max: u32,
        until_ms: u64,
        now_ms: u64,
    ) -> io::Result<Option<u32>>;
    /// Record the Zendesk job a lease's batch submitted, so any writer of the account can poll
    /// it and free the slot once the job is done (a finished job no longer counts in Zendesk's
    /// cap, whether or not its own writer has read its results yet).
    fn job_started(&self, account: &str, holder: &str, job: &str) -> io::Result<()>;
    /// The account's leases that carry a job and have not run out by `now_ms`.
    fn open_jobs(&self, account: &str, now_ms: u64) -> io::Result<Vec<OpenJob>>;
    /// Give the slots of `holders` back (a holder already gone is no error).
    fn end_jobs(&self, account: &str, holders: &[String]) -> io::Result<()>;
    /// Claim the poll of the account's open jobs at `now_ms`, unless another writer claimed
    /// one after `now_ms - every_ms`: when every slot is held, one writer polls for all.
    fn claim_poll(&self, account: &str, now_ms: u64, every_ms: u64) -> io::Result<bool>;
    /// Keep finished jobs' statuses (`(job, status as JSON)`, as Zendesk answered them) for the
    /// writers that submitted them, for [`DONE_KEPT`].
    fn put_done(&self, account: &str, done: &[(String, String)]) -> io::Result<()>;
    /// Hand over the statuses kept for these of the writer's jobs (no longer kept after).
    fn take_done(&self, account: &str, jobs: &[String]) -> io::Result<Vec<(String, String)>>;
    /// What the store is, for logs (`file:…`, `dynamodb:…`).
    fn describe(&self) -> String;
}

/// How long a finished job's status is kept for its writer.
pub const DONE_KEPT: Duration = Duration::from_secs(3600);
/// A status larger than this is not kept: its writer polls the job itself.
pub const DONE_MAX_BYTES: usize = 256 * 1024;

/// Whether a job id (Zendesk's answer, so untrusted) can name a kept status: a short token of
/// letters, digits, `-` and `_`, so it stays a single name inside the account's folder.
pub fn keepable_job_id(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= 128
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

/// Windows in a minute.
const WINDOWS_PER_MINUTE: u32 = (60_000 / WINDOW.as_millis()) as u32;

/// Requests a writer takes from a window at once: a sixteenth of the window, at least one.
pub fn slice(rpm: u32) -> u32 {
    (rpm / WINDOWS_PER_MINUTE / 16).max(1)
}

/// Requests the windows of any minute hold together: `rpm` less one slice and one request.
/// Requests released just before a minute starts (a slice at most, and the request that opens
/// a window) may go out inside it, so Zendesk's minute, wherever it starts, counts no more than
/// `rate_limit_rpm`.
pub fn per_minute(rpm: u32) -> u32 {
    rpm.saturating_sub(slice(rpm) + 1).max(1)
}

/// Requests window `window` holds: the minute's share spread evenly over its windows (some
/// hold one more than others; any ten in a row hold [`per_minute`] together).
pub fn window_cap(rpm: u32, window: u64) -> u32 {
    let (total, n) = (u64::from(per_minute(rpm)), u64::from(WINDOWS_PER_MINUTE));
    ((window + 1) * total / n - window * total / n) as u32
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
    /// Job slot holder → its lease.
    #[serde(default)]
    jobs: BTreeMap<String, Lease>,
    /// When a writer last claimed the poll of the open jobs (unix ms).
    #[serde(default)]
    polled: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    /// Lease end (unix ms).
    until: u64,
    /// The Zendesk job the holder submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job: Option<String>,
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
        let existed = dir.exists();
        std::fs::create_dir_all(&dir)?;
        // Kept job statuses name records of the syncs: a folder made here is the user's own.
        #[cfg(unix)]
        if !existed {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        #[cfg(not(unix))]
        let _ = existed;
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

    /// Where the account's kept job statuses live (one object per job).
    fn done_prefix(&self, account: &str) -> String {
        if self.prefix.is_empty() {
            format!("{account}.done/")
        } else {
            format!("{}/{account}.done/", self.prefix)
        }
    }

    /// Apply `change` to the account's record by compare-and-swap; returns what `change` said.
    fn update<T>(&self, account: &str, mut change: impl FnMut(&mut Account) -> T) -> io::Result<T> {
        let key = self.key(account);
        // The writers of one process take turns: swaps then lose only to other processes, so
        // a busy process never runs out of tries (which would leave a job slot leased).
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
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
    fn take(&self, account: &str, window: u64, want: u32, cap: u32, floor: u32) -> io::Result<u32> {
        self.update(account, |a| {
            if a.window != window {
                if a.window > window {
                    // Another client's clock runs ahead: this window is over for it.
                    return 0;
                }
                a.window = window;
                a.used = 0;
            }
            a.used = a.used.max(floor.min(cap));
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
    ) -> io::Result<Option<u32>> {
        self.update(account, |a| {
            a.jobs.retain(|_, l| l.until > now_ms);
            if a.jobs.len() >= max as usize {
                return None;
            }
            a.jobs.insert(
                holder.to_string(),
                Lease {
                    until: until_ms,
                    job: None,
                },
            );
            Some(a.jobs.len() as u32)
        })
    }

    fn job_started(&self, account: &str, holder: &str, job: &str) -> io::Result<()> {
        self.update(account, |a| {
            if let Some(l) = a.jobs.get_mut(holder) {
                l.job = Some(job.to_string());
            }
        })
    }

    fn open_jobs(&self, account: &str, now_ms: u64) -> io::Result<Vec<OpenJob>> {
        let Some((bytes, _)) = self.store.get_tagged(&self.key(account))? else {
            return Ok(Vec::new());
        };
        let a: Account = serde_json::from_slice(&bytes).unwrap_or_default();
        Ok(a.jobs
            .into_iter()
            .filter(|(_, l)| l.until > now_ms)
            .filter_map(|(holder, l)| {
                Some(OpenJob {
                    holder,
                    job: l.job?,
                    since_ms: l.until.saturating_sub(JOB_LEASE.as_millis() as u64),
                })
            })
            .collect())
    }

    fn end_jobs(&self, account: &str, holders: &[String]) -> io::Result<()> {
        self.update(account, |a| {
            for h in holders {
                a.jobs.remove(h);
            }
        })
    }

    fn claim_poll(&self, account: &str, now_ms: u64, every_ms: u64) -> io::Result<bool> {
        self.update(account, |a| {
            if a.polled + every_ms > now_ms {
                return false;
            }
            a.polled = now_ms;
            true
        })
    }

    fn put_done(&self, account: &str, done: &[(String, String)]) -> io::Result<()> {
        let prefix = self.done_prefix(account);
        // Statuses no writer took (it polled the job itself first, or died) would pile up:
        // past a bound they are all dropped, and their writers poll Zendesk instead.
        if self.store.list(&prefix)?.len() > 4096 {
            self.store.delete_prefix(&prefix)?;
        }
        for (job, status) in done {
            if keepable_job_id(job) && status.len() <= DONE_MAX_BYTES {
                self.store
                    .put(&format!("{prefix}{job}.json"), status.as_bytes())?;
            }
        }
        Ok(())
    }

    fn take_done(&self, account: &str, jobs: &[String]) -> io::Result<Vec<(String, String)>> {
        let prefix = self.done_prefix(account);
        let mut out = Vec::new();
        for job in jobs.iter().filter(|j| keepable_job_id(j)) {
            let key = format!("{prefix}{job}.json");
            let Some((bytes, tag)) = self.store.get_tagged(&key)? else {
                continue;
            };
            // Only what this writer removes is its own to use (a stale copy is not read twice).
            if self.store.delete_if_match(&key, &tag)? {
                if let Ok(status) = String::from_utf8(bytes) {
                    out.push((job.clone(), status));
                }
            }
        }
        Ok(out)
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
        assert_eq!(b.take("a", 10, 40, 70, 0).unwrap(), 40);
        assert_eq!(b.take("a", 10, 40, 70, 0).unwrap(), 30);
        assert_eq!(b.take("a", 10, 40, 70, 0).unwrap(), 0);
        // Another account has its own budget.
        assert_eq!(b.take("b", 10, 40, 70, 0).unwrap(), 40);
        assert_eq!(b.take("a", 11, 40, 70, 0).unwrap(), 40);
        // A client whose clock lags gets nothing from a window already over.
        assert_eq!(b.take("a", 10, 40, 70, 0).unwrap(), 0); // Requests below the floor nobody took are forfeit: 60 released, at most 10 unspent.
        assert_eq!(b.take("c", 10, 5, 70, 0).unwrap(), 5);
        assert_eq!(b.take("c", 10, 40, 60, 50).unwrap(), 10);
        assert_eq!(b.take("c", 10, 40, 60, 50).unwrap(), 0);
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
                        match b.take("acct", 5, 3, 100, 0).unwrap() {
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
        assert!(b.take_job("a", "j1", 2, 2_000, 1_000).unwrap().is_some());
        assert!(b.take_job("a", "j2", 2, 2_000, 1_000).unwrap().is_some());
        assert!(
            b.take_job("a", "j3", 2, 2_000, 1_000).unwrap().is_none(),
            "both held"
        );
        assert!(
            b.take_job("b", "j3", 2, 2_000, 1_000).unwrap().is_some(),
            "another account"
        );
        // A lease shows its job once the batch has submitted it.
        assert!(b.open_jobs("a", 1_000).unwrap().is_empty());
        b.job_started("a", "j1", "job-1").unwrap();
        b.job_started("a", "gone", "job-x").unwrap();
        let open = b.open_jobs("a", 1_000).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(
            (open[0].holder.as_str(), open[0].job.as_str()),
            ("j1", "job-1")
        );
        // Another writer that saw job-1 finished frees its slot; ending it twice is no error.
        b.end_jobs("a", &["j1".into()]).unwrap();
        b.end_jobs("a", &["j1".into(), "never".into()]).unwrap();
        assert!(b.take_job("a", "j3", 2, 5_000, 1_100).unwrap().is_some());
        // j2's lease ran out (a writer that died): its slot is free.
        assert!(b.take_job("a", "j4", 2, 5_000, 2_500).unwrap().is_some());
        assert!(b.take_job("a", "j5", 2, 5_000, 2_500).unwrap().is_none());
        b.job_started("a", "j4", "job-4").unwrap();
        let open = b.open_jobs("a", 2_500).unwrap();
        assert_eq!(open.len(), 1, "{open:?}");
        assert_eq!(
            open[0].since_ms,
            5_000u64.saturating_sub(JOB_LEASE.as_millis() as u64)
        );
        assert!(
            b.open_jobs("a", 5_000).unwrap().is_empty(),
            "its lease ran out"
        );
        // One poll of the open jobs per interval, whoever claims it.
        assert!(b.claim_poll("a", 10_000, 300).unwrap());
        assert!(!b.claim_poll("a", 10_200, 300).unwrap());
        assert!(b.claim_poll("b", 10_200, 300).unwrap(), "another account");
        assert!(b.claim_poll("a", 10_300, 300).unwrap());
    }

    #[test]
    fn finished_jobs_statuses_are_kept_for_their_writer_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = budget(dir.path());
        let status = r#"{"id":"abc123","status":"completed","results":[]}"#.to_string();
        b.put_done(
            "a",
            &[
                ("abc123".into(), status.clone()),
                // A job id that would leave the account's folder, and one too large to keep.
                ("../x".into(), status.clone()),
                ("big".into(), "x".repeat(DONE_MAX_BYTES + 1)),
            ],
        )
        .unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            b.take_done("b", &ids(&["abc123"])).unwrap().is_empty(),
            "another account"
        );
        assert_eq!(
            b.take_done("a", &ids(&["abc123", "../x", "big", "nope"]))
                .unwrap(),
            vec![("abc123".to_string(), status)]
        );
        assert!(
            b.take_done("a", &ids(&["abc123"])).unwrap().is_empty(),
            "handed over once"
        );
        assert!(!dir.path().join("x.json").exists());
    }

    #[test]
    fn window_caps_and_account_keys() {
        // Any ten windows in a row hold the minute's share: the plan's limit less one slice
        // and one request, so requests released just before a minute starts cannot push it over.
        for (rpm, share) in [(700, 695), (6000, 5962), (200, 198), (5, 3)] {
            assert_eq!(per_minute(rpm), share, "{rpm} rpm");
            for start in [0u64, 3, 1_000_001] {
                let sum: u32 = (start..start + 10).map(|w| window_cap(rpm, w)).sum();
                assert_eq!(sum, share, "{rpm} rpm from window {start}");
            }
        }
        assert!((0..10).all(|w| matches!(window_cap(700, w), 69 | 70)));
        assert_eq!(slice(700), 4);
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
