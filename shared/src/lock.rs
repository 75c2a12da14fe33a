//! One active run per sync: a lock object created only if absent, renewed while the run lives,
//! and taken over once it expires or its process is gone. Every change after creation is a
//! compare-and-swap on the version read (S3 `If-Match`), so two contenders never both hold it:
//! the slower one's swap fails and it reads the winner's lock.

use crate::layout;
use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub sync: String,
    pub run_id: String,
    /// `host` and `pid` of the holder, to tell a crashed local run from a live one.
    pub host: String,
    pub pid: u32,
    pub acquired_at: String,
    /// Unix seconds; a lock not renewed by then is stale.
    pub expires_at: i64,
    /// The Step Functions execution that holds it, so its end can be told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<String>,
    /// That execution ended without finalizing: the lock is never renewed again, and the run's
    /// write-batches still running stop sending.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub abandoned: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("sync `{sync}` is already running: run {run_id} on {host} (pid {pid}) since {acquired_at}. Wait for it to finish (`zdsync run --wait SECONDS` waits that long); if that process is gone, the next run takes the lock over (at once on {host}, elsewhere after {expires}) and finishes that run first")]
    Held {
        sync: String,
        run_id: String,
        host: String,
        pid: u32,
        acquired_at: String,
        expires: String,
    },
    #[error("run {run_id} of sync `{sync}` belongs to an execution that ended without finalizing (aborted or timed out); the next run finishes it")]
    Abandoned { sync: String, run_id: String },
    #[error("lock `{key}`: {source}")]
    Io { key: String, source: io::Error },
}

/// A held lock; renewal stops and the lock is removed by `release` (or left to expire when the
/// process dies).
pub struct LockGuard {
    store: Arc<dyn ObjectStore>,
    pub info: LockInfo,
    /// A stale lock that was taken over: the run it belonged to may need finishing.
    pub taken_over: Option<LockInfo>,
    renew: Option<tokio::task::JoinHandle<()>>,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The name this process's host goes by (a Lambda container's log stream is unique to it).
pub fn host_name() -> String {
    std::env::var("AWS_LAMBDA_LOG_STREAM_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn pid_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // Signal 0 checks existence only; EPERM means it exists under another user.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

impl LockInfo {
    /// Expired, or held by a process of this host that no longer exists.
    pub fn is_stale(&self) -> bool {
        self.expires_at < now()
            || (self.host == host_name() && self.pid != std::process::id() && !pid_alive(self.pid))
    }
}

/// The error for a lock `h` holds.
fn held_error(sync: &str, h: LockInfo) -> LockError {
    let expires = chrono::DateTime::from_timestamp(h.expires_at, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default();
    LockError::Held {
        sync: sync.to_string(),
        run_id: h.run_id,
        host: h.host,
        pid: h.pid,
        acquired_at: h.acquired_at,
        expires,
    }
}

/// Whether `run_id` may write `sync`'s state: it holds the lock, or nobody does. A run whose lock
/// another run took over must not fold: the taker finishes it (see `pipeline::finish_unfinished`).
pub fn may_fold(store: &dyn ObjectStore, sync: &str, run_id: &str) -> Result<(), LockError> {
    let key = layout::lock_key(sync);
    match read(store, &key).map_err(|source| LockError::Io { key, source })? {
        Some(h) if h.run_id != run_id => Err(held_error(sync, h)),
        _ => Ok(()),
    }
}

/// How many times a swap that lost to another writer is retried on a fresh read.
const SWAP_TRIES: usize = 5;

/// Apply `change` to the lock of `sync` by compare-and-swap, re-reading when another writer
/// got in between. `change` returns `None` to leave the lock alone (it is not the caller's).
/// Returns the lock as read on the attempt that decided.
fn swap(
    store: &dyn ObjectStore,
    sync: &str,
    mut change: impl FnMut(&LockInfo) -> Option<Swap>,
) -> Result<Option<(LockInfo, bool)>, LockError> {
    let key = layout::lock_key(sync);
    let io_err = |source| LockError::Io {
        key: key.clone(),
        source,
    };
    for _ in 0..SWAP_TRIES {
        let Some((held, tag)) = read_tagged(store, &key).map_err(io_err)? else {
            return Ok(None);
        };
        let done = match change(&held) {
            None => return Ok(Some((held, false))),
            Some(Swap::Put(info)) => {
                let body = serde_json::to_vec_pretty(&info).expect("lock serialises");
                store.put_if_match(&key, &body, &tag).map_err(io_err)?
            }
            Some(Swap::Remove) => store.delete_if_match(&key, &tag).map_err(io_err)?,
        };
        if done {
            return Ok(Some((held, true)));
        }
        // Another writer won this round: back off a little, unevenly, before reading again.
        let jitter = chrono::Utc::now().timestamp_subsec_nanos() % 40;
        std::thread::sleep(Duration::from_millis(10 + u64::from(jitter)));
    }
    Err(io_err(io::Error::other(format!(
        "the lock kept changing under {SWAP_TRIES} attempts to update it"
    ))))
}

enum Swap {
    Put(LockInfo),
    Remove,
}

/// A write-batch of `run_id` keeps the run's lock alive while it writes, and refuses to write
/// when another run holds it (that run finishes this one's chunks itself).
pub fn renew_held(
    store: &dyn ObjectStore,
    sync: &str,
    run_id: &str,
    ttl: Duration,
) -> Result<(), LockError> {
    let ttl = ttl.as_secs().max(1) as i64;
    let expires_at = now() + ttl;
    // Many write-batches of one run check at once: a lock with most of its TTL left is only
    // read, so they do not contend for the swap.
    let fresh_until = now() + ttl * 3 / 4;
    match swap(store, sync, |h| {
        (h.run_id == run_id && !h.abandoned && h.expires_at < fresh_until).then(|| {
            Swap::Put(LockInfo {
                expires_at,
                ..h.clone()
            })
        })
    })? {
        Some((h, false)) if h.run_id != run_id => Err(held_error(sync, h)),
        Some((h, false)) if h.abandoned => Err(LockError::Abandoned {
            sync: sync.to_string(),
            run_id: h.run_id,
        }),
        _ => Ok(()),
    }
}

/// An execution ended without finalizing (aborted, timed out, failed outside a Catch): if it
/// still holds `sync`'s lock, the lock expires after `grace` (the time its write-batch
/// invocations need to notice and stop), so the next run takes it over and finishes the
/// abandoned run instead of waiting out the TTL. `true` when it did.
pub fn expire_for_execution(
    store: &dyn ObjectStore,
    sync: &str,
    execution: &str,
    grace: Duration,
) -> Result<bool, LockError> {
    let expires_at = now() + grace.as_secs() as i64;
    let swapped = swap(store, sync, |h| {
        (h.execution.as_deref() == Some(execution)).then(|| {
            Swap::Put(LockInfo {
                expires_at: if grace.is_zero() {
                    0
                } else {
                    h.expires_at.min(expires_at)
                },
                abandoned: true,
                ..h.clone()
            })
        })
    })?;
    Ok(matches!(swapped, Some((_, true))))
}

/// Who holds a sync's lock, if anyone.
pub fn holder(store: &dyn ObjectStore, sync: &str) -> io::Result<Option<LockInfo>> {
    read(store, &layout::lock_key(sync))
}

fn read(store: &dyn ObjectStore, key: &str) -> io::Result<Option<LockInfo>> {
    Ok(read_tagged(store, key)?.map(|(info, _)| info))
}

/// The lock with its version tag, for a compare-and-swap.
fn read_tagged(store: &dyn ObjectStore, key: &str) -> io::Result<Option<(LockInfo, String)>> {
    let Some((bytes, tag)) = store.get_tagged(key)? else {
        return Ok(None);
    };
    // An unreadable lock is treated as stale rather than blocking the sync forever.
    let info = serde_json::from_slice(&bytes).unwrap_or(LockInfo {
        sync: String::new(),
        run_id: String::new(),
        host: String::new(),
        pid: 0,
        acquired_at: String::new(),
        expires_at: 0,
        execution: None,
        abandoned: false,
    });
    Ok(Some((info, tag)))
}

/// Remove the lock of `sync` if `run_id` still holds it (a run that ends in another process
/// than the one that took the lock, as finalize does in AWS, releases it by name).
pub fn release(store: &dyn ObjectStore, sync: &str, run_id: &str) -> Result<(), LockError> {
    swap(store, sync, |h| {
        (h.run_id == run_id).then_some(Swap::Remove)
    })?;
    Ok(())
}

/// Take the lock of `sync` for `run_id`. A held lock is waited for up to `wait` (polling every
/// second), then reported as `Held`. Must be called inside a tokio runtime (renewal runs on it).
pub async fn acquire(
    store: Arc<dyn ObjectStore>,
    sync: &str,
    run_id: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<LockGuard, LockError> {
    acquire_for(store, sync, run_id, ttl, wait, None).await
}

/// [`acquire`], recording the Step Functions execution that takes the lock.
pub async fn acquire_for(
    store: Arc<dyn ObjectStore>,
    sync: &str,
    run_id: &str,
    ttl: Duration,
    wait: Duration,
    execution: Option<String>,
) -> Result<LockGuard, LockError> {
    let key = layout::lock_key(sync);
    let io_err = |source| LockError::Io {
        key: key.clone(),
        source,
    };
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let info = LockInfo {
        sync: sync.to_string(),
        run_id: run_id.to_string(),
        host: host_name(),
        pid: std::process::id(),
        acquired_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        expires_at: now() + ttl_secs,
        execution,
        abandoned: false,
    };
    let body = serde_json::to_vec_pretty(&info).expect("lock serialises");
    let deadline = tokio::time::Instant::now() + wait;
    let mut taken_over = None;
    loop {
        let (s, k, b) = (store.clone(), key.clone(), body.clone());
        let got = tokio::task::spawn_blocking(move || s.put_if_absent(&k, &b))
            .await
            .map_err(|e| io_err(io::Error::other(e.to_string())))?
            .map_err(io_err)?;
        if got {
            break;
        }
        let (s, k) = (store.clone(), key.clone());
        let held = tokio::task::spawn_blocking(move || read_tagged(s.as_ref(), &k))
            .await
            .map_err(|e| io_err(io::Error::other(e.to_string())))?
            .map_err(io_err)?;
        match held {
            None => continue,
            Some((h, tag)) if h.is_stale() => {
                // Replace exactly the stale version read: of several contenders that saw it,
                // one swap succeeds and the others read the winner's lock next round.
                let (s, k, b) = (store.clone(), key.clone(), body.clone());
                let won = tokio::task::spawn_blocking(move || s.put_if_match(&k, &b, &tag))
                    .await
                    .map_err(|e| io_err(io::Error::other(e.to_string())))?
                    .map_err(io_err)?;
                if won {
                    tracing::warn!(sync, stale_run = %h.run_id, holder = %h.host, pid = h.pid, "took over a stale lock");
                    taken_over = Some(h);
                    break;
                }
                continue;
            }
            Some((h, _)) => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(held_error(sync, h));
                }
                tokio::time::sleep(Duration::from_secs(1).min(wait)).await;
            }
        }
    }
    // Renew at a third of the TTL so a live run never looks stale.
    let renew = {
        let (store, sync, run) = (store.clone(), info.sync.clone(), info.run_id.clone());
        tokio::spawn(async move {
            let every = Duration::from_secs((ttl_secs as u64 / 3).max(1));
            loop {
                tokio::time::sleep(every).await;
                let (s, sync, mine) = (store.clone(), sync.clone(), run.clone());
                // Renew only a lock that is still ours: one taken over is never written back.
                let renewed = tokio::task::spawn_blocking(move || {
                    renew_held(
                        s.as_ref(),
                        &sync,
                        &mine,
                        Duration::from_secs(ttl_secs as u64),
                    )
                })
                .await;
                match renewed {
                    Ok(Err(LockError::Held { run_id, .. })) => {
                        tracing::warn!(%run, taken_by = %run_id, "the lock was taken over: no longer renewing it");
                        return;
                    }
                    Ok(Err(LockError::Abandoned { .. })) => return,
                    _ => {}
                }
            }
        })
    };
    Ok(LockGuard {
        store,
        info,
        taken_over,
        renew: Some(renew),
    })
}

impl LockGuard {
    /// Stop renewing and remove the lock if it is still ours.
    pub async fn release(mut self) {
        if let Some(r) = self.renew.take() {
            r.abort();
        }
        let (store, sync, run_id) = (
            self.store.clone(),
            self.info.sync.clone(),
            self.info.run_id.clone(),
        );
        let _ = tokio::task::spawn_blocking(move || release(store.as_ref(), &sync, &run_id)).await;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        // Dropped without `release` (a crash, a cancelled task): stop renewing so the lock
        // expires on its own.
        if let Some(r) = self.renew.take() {
            r.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    /// Sync `s`'s lock for `run`, one minute long, no waiting.
    async fn take(store: &Arc<dyn ObjectStore>, run: &str) -> Result<LockGuard, LockError> {
        acquire(
            store.clone(),
            "s",
            run,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await
    }

    #[tokio::test]
    async fn second_run_is_refused_then_takes_over_an_expired_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        let first = take(&store, "r1").await.unwrap();
        let err = take(&store, "r2").await.err().unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("already running") && msg.contains("r1"),
            "{msg}"
        );
        first.release().await;
        let second = take(&store, "r2").await.unwrap();
        assert!(second.taken_over.is_none());
        drop(second); // a crash: the lock stays until it expires

        // Make it expired.
        let mut info = read(store.as_ref(), "locks/s.json").unwrap().unwrap();
        info.expires_at = now() - 1;
        store
            .put("locks/s.json", &serde_json::to_vec(&info).unwrap())
            .unwrap();
        let third = take(&store, "r3").await.unwrap();
        assert_eq!(third.taken_over.as_ref().unwrap().run_id, "r2");
        third.release().await;
        assert!(store.head("locks/s.json").unwrap().is_none());
    }

    /// Many runs find the same expired lock at once: exactly one takes it over, the others are
    /// told who holds it; renewal and release by a loser never touch the winner's lock.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn contenders_for_a_stale_lock_never_both_hold_it() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
            let stale = LockInfo {
                sync: "s".into(),
                run_id: "crashed".into(),
                host: "elsewhere".into(),
                pid: 1,
                acquired_at: String::new(),
                expires_at: now() - 10,
                execution: None,
                abandoned: false,
            };
            store
                .put("locks/s.json", &serde_json::to_vec(&stale).unwrap())
                .unwrap();
            let tries: Vec<_> = (0..12)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { take(&store, &format!("r{round}-{i}")).await })
                })
                .collect();
            let mut winners = Vec::new();
            for t in tries {
                match t.await.unwrap() {
                    Ok(g) => winners.push(g),
                    Err(LockError::Held { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(winners.len(), 1, "round {round}: one winner");
            let winner = winners.pop().unwrap();
            assert_eq!(winner.taken_over.as_ref().unwrap().run_id, "crashed");
            let held = holder(store.as_ref(), "s").unwrap().unwrap();
            assert_eq!(held.run_id, winner.info.run_id);
            // A loser can neither renew nor release it.
            assert!(matches!(
                renew_held(store.as_ref(), "s", "crashed", Duration::from_secs(60)),
                Err(LockError::Held { .. })
            ));
            release(store.as_ref(), "s", "crashed").unwrap();
            assert_eq!(
                holder(store.as_ref(), "s").unwrap().unwrap().run_id,
                winner.info.run_id
            );
            winner.release().await;
            assert!(holder(store.as_ref(), "s").unwrap().is_none());
        }
    }

    #[tokio::test]
    async fn an_ended_execution_leaves_its_lock_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path()));
        let g = acquire_for(
            store.clone(),
            "s",
            "r1",
            Duration::from_secs(3600),
            Duration::ZERO,
            Some("arn:exec:1".into()),
        )
        .await
        .unwrap();
        drop(g);
        let grace = Duration::from_secs(120);
        assert!(!expire_for_execution(store.as_ref(), "s", "arn:exec:2", grace).unwrap());
        assert!(expire_for_execution(store.as_ref(), "s", "arn:exec:1", grace).unwrap());
        let h = holder(store.as_ref(), "s").unwrap().unwrap();
        assert!((now() + 110..=now() + 120).contains(&h.expires_at));
        assert!(!h.is_stale(), "its write-batches get the grace to stop");
        // They are told to stop, and cannot renew it.
        assert!(matches!(
            renew_held(store.as_ref(), "s", "r1", Duration::from_secs(3600)),
            Err(LockError::Abandoned { .. })
        ));
        assert_eq!(
            holder(store.as_ref(), "s").unwrap().unwrap().expires_at,
            h.expires_at
        );
        assert!(expire_for_execution(store.as_ref(), "s", "arn:exec:1", Duration::ZERO).unwrap());
        assert!(holder(store.as_ref(), "s").unwrap().unwrap().is_stale());
    }

    #[test]
    fn a_dead_local_process_makes_its_lock_stale() {
        let info = LockInfo {
            sync: "s".into(),
            run_id: "r".into(),
            host: host_name(),
            pid: u32::MAX - 7,
            acquired_at: String::new(),
            expires_at: now() + 3600,
            execution: None,
            abandoned: false,
        };
        assert!(info.is_stale());
        let live = LockInfo {
            pid: std::process::id(),
            ..info
        };
        assert!(!live.is_stale());
    }
}
