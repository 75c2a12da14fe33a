//! The request budget every clone of a `Client` shares: a token bucket at the configured rate,
//! a client-wide pause while a `Retry-After` runs, pacing when Zendesk reports few requests left,
//! and a single probe request after a pause before the others go again. With a [`Shared`]
//! budget every request also needs a token of the account's shared window (see `budget`).

use super::budget::{self, BudgetStore};
use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// Longest spacing the header-based pacing imposes between two requests.
const MAX_PACE: Duration = Duration::from_secs(60);

/// Shared request budget. Every request calls [`Limiter::acquire`] right before it goes on the
/// wire and reports its answer with [`Permit::finish`] (or drops the permit).
pub struct Limiter {
    bucket: Option<Bucket>,
    shared: Option<Arc<Shared>>,
    state: Mutex<Gate>,
    notify: Notify,
    /// Wakes requests waiting for a pacing slot when the pacing changes (a fresh window).
    repace: Notify,
    paused_ms: AtomicU64,
    /// Three quarters of the bucket's period: the closest two requests may follow each other.
    min_gap: Duration,
    /// The configured requests per minute, and whether the account's lower limit was reported.
    rpm: u32,
    over_limit_told: std::sync::atomic::AtomicBool,
    /// Requests waiting for a token, urgent ones (job polls: they free the job slots the
    /// others wait for) first. One waiter at a time leads: it takes the tokens and hands each
    /// to the head of the queue, so a poll gets the next token however many writes wait.
    queue: Mutex<Waiting>,
    leader: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Waiting {
    urgent: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
    normal: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
}

impl Waiting {
    /// Gives a token to the first waiter still waiting; false when none is.
    fn hand_out(&mut self) -> bool {
        while let Some(tx) = self.urgent.pop_front().or_else(|| self.normal.pop_front()) {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }
}

#[derive(Debug)]
struct Gate {
    /// No request may be sent before this instant (a `Retry-After` is running).
    paused_until: Option<Instant>,
    /// After a 429/503 only one request (the probe) is in flight until an answer that is not
    /// a 429/503 comes back, so a storm is not answered by a burst of early requests.
    recovering: bool,
    probe_in_flight: bool,
    /// Spacing derived from `X-Rate-Limit-Remaining` (zero: no pacing).
    pace: Duration,
    /// The end of the window the pacing was computed for: Zendesk's window resets then, and
    /// waiting requests go at full rate again without an answer to tell them so.
    pace_until: Option<Instant>,
    next_paced: Option<Instant>,
    last_sent: Option<Instant>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("bucket", &self.bucket.is_some())
            .field("gate", &*self.gate())
            .finish()
    }
}

/// The right to send one request. Dropping it without [`Permit::finish`] (a transport error,
/// a cancelled task) ends the probe without ending the recovery.
#[must_use]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    probe: bool,
}

impl Permit<'_> {
    /// This request is the single probe after a 429/503: no other request goes until it is
    /// answered.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Report the answer's status: a 429/503 keeps the client in recovery, anything else ends it.
    pub fn finish(mut self, throttled: bool) {
        if self.probe {
            let mut g = self.limiter.gate();
            g.probe_in_flight = false;
            if !throttled {
                g.recovering = false;
            }
            drop(g);
            self.probe = false;
            self.limiter.notify.notify_waiters();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.limiter.gate().probe_in_flight = false;
            self.limiter.notify.notify_waiters();
        }
    }
}

impl Limiter {
    /// `rpm == 0`: no token bucket (pauses and pacing still apply).
    pub fn new(rpm: u32) -> Limiter {
        Self::with_shared(rpm, None)
    }

    /// A limiter that also takes every request from the account's shared budget.
    pub fn with_shared(rpm: u32, shared: Option<Shared>) -> Limiter {
        let bucket = NonZeroU32::new(rpm).map(|rpm| {
            // A tenth of a second's worth of burst (at least 2): timers wake a little late, and
            // with a burst of 1 every late wake-up is budget lost for good (about a tenth of it
            // at 6,000 rpm). The overshoot this allows over Zendesk's fixed window is the burst,
            // and the pacing on `X-Rate-Limit-Remaining` spends the end of a window slowly.
            let burst = NonZeroU32::new((rpm.get() / 600).max(2)).expect("at least 2");
            let quota = Quota::per_minute(rpm).allow_burst(burst);
            RateLimiter::direct(quota)
        });
        Limiter {
            bucket,
            shared: shared.map(Arc::new),
            state: Mutex::new(Gate {
                paused_until: None,
                recovering: false,
                probe_in_flight: false,
                pace: Duration::ZERO,
                pace_until: None,
                next_paced: None,
                last_sent: None,
            }),
            notify: Notify::new(),
            repace: Notify::new(),
            paused_ms: AtomicU64::new(0),
            min_gap: match NonZeroU32::new(rpm) {
                Some(r) => Duration::from_secs(45) / r.get(),
                None => Duration::ZERO,
            },
            rpm,
            over_limit_told: std::sync::atomic::AtomicBool::new(false),
            queue: Mutex::new(Waiting::default()),
            leader: tokio::sync::Mutex::new(()),
        }
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Total time the client spent paused by `Retry-After`, in ms.
    pub fn paused_ms(&self) -> u64 {
        self.paused_ms.load(Ordering::Relaxed)
    }

    /// Until when requests are held back, if a pause is running.
    pub fn paused_until(&self) -> Option<Instant> {
        let g = self.gate();
        g.paused_until.filter(|p| *p > Instant::now())
    }

    /// The account's shared budget, when there is one.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Waits for this request's token: queued, urgent ones first, and handed out by whichever
    /// waiter leads (a cancelled leader hands the lead on when its lock is dropped).
    async fn take_token(&self, urgent: bool) {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if urgent {
                q.urgent.push_back(tx);
            } else {
                q.normal.push_back(tx);
            }
        }
        tokio::select! {
            biased;
            _ = &mut rx => {}
            _lead = self.leader.lock() => loop {
                if rx.try_recv().is_ok() {
                    return;
                }
                self.next_token().await;
                let given = self
                    .queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .hand_out();
                debug_assert!(given, "the leader itself waits");
            },
        }
    }

    /// Requests of this client waiting for a token (the leader's own included).
    fn waiting(&self) -> u32 {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let live = |d: &std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>| {
            d.iter().filter(|tx| !tx.is_closed()).count()
        };
        (live(&q.urgent) + live(&q.normal)).max(1) as u32
    }

    /// The next token of the client's rate (and of the account's shared window).
    async fn next_token(&self) {
        if let Some(shared) = &self.shared {
            shared.take(|| self.waiting()).await;
        }
        let Some(bucket) = &self.bucket else { return };
        loop {
            match bucket.check() {
                Ok(()) => break,
                Err(not_until) => {
                    let wait = not_until.wait_time_from(bucket.clock().now());
                    tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                }
            }
        }
        // The burst only makes up for late wake-ups: requests still go out at least three
        // quarters of a period apart, so a 429 is almost always seen before the next request
        // leaves (a full period would give back the budget the burst recovers).
        let slot = {
            let mut g = self.gate();
            let now = Instant::now();
            let slot = g.last_sent.map_or(now, |l| (l + self.min_gap).max(now));
            g.last_sent = Some(slot);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }

    /// Waits until a request may go on the wire: no pause running, a token taken, the pacing
    /// slot reached and, while recovering from a 429/503, no other probe in flight. The pause is
    /// checked again after every wait, right before returning.
    pub async fn acquire(&self) -> Permit<'_> {
        self.acquire_as(false).await
    }

    /// [`Limiter::acquire`] ahead of every ordinary request waiting for its turn (job polls,
    /// which free the job slots the writes wait for).
    pub async fn acquire_urgent(&self) -> Permit<'_> {
        self.acquire_as(true).await
    }

    async fn acquire_as(&self, urgent: bool) -> Permit<'_> {
        loop {
            // A running pause: sleep it out before spending a token.
            let until = self.paused_until();
            if let Some(until) = until {
                tokio::time::sleep_until(until).await;
                continue;
            }
            self.take_token(urgent).await;
            self.wait_paced_slot().await;
            let notified = self.notify.notified();
            {
                let mut g = self.gate();
                let now = Instant::now();
                if g.paused_until.is_some_and(|p| p > now) {
                    continue;
                }
                if !g.recovering {
                    return Permit {
                        limiter: self,
                        probe: false,
                    };
                }
                if !g.probe_in_flight {
                    g.probe_in_flight = true;
                    return Permit {
                        limiter: self,
                        probe: true,
                    };
                }
            }
            // Another request is probing after a pause: wait for its answer.
            notified.await;
        }
    }

    /// Waits for a pacing slot (reserved, so concurrent tasks line up instead of bunching). A
    /// slot is given up when the pacing ends (an answer shows a fresh window, or the paced
    /// window's end passes): the request then goes at once.
    async fn wait_paced_slot(&self) {
        loop {
            let notified = self.repace.notified();
            let (slot, until) = {
                let mut g = self.gate();
                let now = Instant::now();
                if g.pace_until.is_some_and(|u| u <= now) {
                    g.pace = Duration::ZERO;
                    g.pace_until = None;
                    g.next_paced = None;
                }
                if g.pace.is_zero() {
                    return;
                }
                // The first paced request waits one spacing too: `remaining` requests then fit
                // before the window resets, the last one pace before it.
                let slot = g.next_paced.map_or(now + g.pace, |n| n.max(now));
                if slot <= now {
                    g.next_paced = Some(now + g.pace);
                    return;
                }
                g.next_paced = Some(slot + g.pace);
                (slot, g.pace_until.unwrap_or(slot))
            };
            tokio::select! {
                _ = tokio::time::sleep_until(slot.min(until)) => {
                    if Instant::now() >= slot {
                        return;
                    }
                }
                _ = notified => {}
            }
        }
    }

    /// Holds every request back for `wait` (a `Retry-After`); a longer pause already running
    /// is kept.
    pub fn pause(&self, wait: Duration) {
        let now = Instant::now();
        let until = now + wait;
        let mut g = self.gate();
        let current = g.paused_until.filter(|p| *p > now).unwrap_or(now);
        if until > current {
            let added = until - current;
            self.paused_ms
                .fetch_add(added.as_millis() as u64, Ordering::Relaxed);
            g.paused_until = Some(until);
        }
        g.recovering = true;
    }

    /// Reads the account-wide rate headers of an answer and sets the pacing: when few requests
    /// are left in the window, space them so the rest of the window is not exhausted at once.
    pub fn observe(&self, headers: &HeaderMap) {
        let num = |name: &str| -> Option<f64> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
        };
        let limit = num("x-rate-limit").or_else(|| num("ratelimit-limit"));
        let remaining = num("x-rate-limit-remaining").or_else(|| num("ratelimit-remaining"));
        let (Some(limit), Some(remaining)) = (limit, remaining) else {
            return;
        };
        if limit <= 0.0 {
            return;
        }
        if self.rpm > 0
            && f64::from(self.rpm) > limit
            && !self.over_limit_told.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                account_limit = limit,
                rate_limit_rpm = self.rpm,
                "the account allows {limit} requests a minute, fewer than this sync's rate_limit_rpm ({}): lower it to about 90 % of {limit}; until then the pacing on the remaining requests holds the run back",
                self.rpm
            );
        }
        let low = (limit * 0.05).max(2.0);
        let reset = num("ratelimit-reset");
        let pace = if remaining <= low {
            let per = match reset {
                Some(reset) => reset / (remaining + 1.0),
                None => 60.0 / limit,
            };
            Duration::from_secs_f64(per.max(0.0)).min(MAX_PACE)
        } else {
            Duration::ZERO
        };
        let mut g = self.gate();
        // Answers of concurrent requests arrive out of order: one a little above the low mark
        // while pacing is no fresh window. A refill shows at least half the limit left.
        if pace.is_zero() && !g.pace.is_zero() && remaining < limit / 2.0 {
            return;
        }
        if !pace.is_zero() {
            // Without `ratelimit-reset` the window is at most Zendesk's minute.
            let secs = reset.unwrap_or(60.0).min(60.0);
            g.pace_until = Some(Instant::now() + Duration::from_secs_f64(secs));
            if remaining < 1.0 {
                // Nothing left: slots booked at the spacing of a moment ago would be refused;
                // every waiting request books again from the window's end.
                g.next_paced = g.pace_until;
                g.pace = pace;
                drop(g);
                self.repace.notify_waiters();
                return;
            }
        }
        if pace != g.pace {
            if !pace.is_zero() {
                tracing::debug!(
                    remaining,
                    limit,
                    pace_ms = pace.as_millis() as u64,
                    "few Zendesk requests left in this window: pacing"
                );
            }
            g.pace = pace;
            if pace.is_zero() {
                // A fresh window: requests waiting for slots booked under the pacing go now.
                g.pace_until = None;
                g.next_paced = None;
                drop(g);
                self.repace.notify_waiters();
            }
        }
    }
}

/// The account-wide part of a client's budget: requests and job slots shared with every other
/// client of the same Zendesk account through a [`BudgetStore`].
pub struct Shared {
    store: Arc<dyn BudgetStore>,
    account: String,
    /// The account's `rate_limit_rpm` (each window holds its share of it).
    rpm: u32,
    /// Clients assumed to run at once when the store fails: each then keeps to its share.
    share: u32,
    member: String,
    /// The window of the current slice and the requests left in it.
    lease: tokio::sync::Mutex<(u64, u32)>,
    /// Job slots taken so far (each lease's holder name is unique).
    jobs_taken: AtomicU64,
    /// Job slots held locally while the store fails.
    local_jobs: AtomicU32,
    /// One task of this client at a time asks the store for a job slot; the others queue here,
    /// so a full account costs one store call per wait, not one per waiting batch.
    slot_turn: tokio::sync::Mutex<()>,
    /// Wakes the task waiting for a job slot when this client gives one back.
    freed: Notify,
    /// Every job slot of the account was held at the last try; `starving` tells the job
    /// pollers, which then look at every open job of the account.
    starved: std::sync::atomic::AtomicBool,
    starving: Notify,
    /// The account's slots held, and their number, at this client's last take.
    held_seen: AtomicU32,
    slots_seen: AtomicU32,
    /// Slots this client is giving back in the background: the store may count them still.
    returning: AtomicU32,
    /// Slots freed and not yet given back to the store (see [`Shared::end_jobs`]).
    to_return: Mutex<Vec<String>>,
    /// While the store fails, requests keep to `rpm ÷ share` locally until this instant.
    failed_until: Mutex<Option<Instant>>,
    fallback: Bucket,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store.describe())
            .field("rpm", &self.rpm)
            .field("share", &self.share)
            .finish()
    }
}

/// How long a failing budget store is left alone before it is tried again.
const STORE_RETRY: Duration = Duration::from_secs(60);

impl Shared {
    /// `rpm` for the account `base_url`; `share`: how many clients may run at once (the
    /// fallback divides the budget by it).
    pub fn new(store: Arc<dyn BudgetStore>, base_url: &str, rpm: u32, share: u32) -> Shared {
        let share = share.max(1);
        let per = NonZeroU32::new((rpm / share).max(1)).expect("at least 1");
        Shared {
            store,
            account: budget::account_key(base_url),
            rpm,
            share,
            member: format!(
                "{}-{}-{:08x}",
                super::super::lock::host_name(),
                std::process::id(),
                rand::random::<u32>()
            ),
            lease: tokio::sync::Mutex::new((0, 0)),
            jobs_taken: AtomicU64::new(0),
            local_jobs: AtomicU32::new(0),
            slot_turn: tokio::sync::Mutex::new(()),
            freed: Notify::new(),
            starved: std::sync::atomic::AtomicBool::new(false),
            starving: Notify::new(),
            held_seen: AtomicU32::new(0),
            slots_seen: AtomicU32::new(0),
            returning: AtomicU32::new(0),
            to_return: Mutex::new(Vec::new()),
            failed_until: Mutex::new(None),
            fallback: RateLimiter::direct(Quota::per_minute(per)),
        }
    }

    fn failing(&self) -> bool {
        let mut f = self.failed_until.lock().unwrap_or_else(|e| e.into_inner());
        match *f {
            Some(until) if until > Instant::now() => true,
            Some(_) => {
                *f = None;
                false
            }
            None => false,
        }
    }

    fn fail(&self, what: &str, e: &dyn std::fmt::Display) {
        let mut f = self.failed_until.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            tracing::warn!(
                store = %self.store.describe(),
                error = %e,
                share = self.share,
                "the shared Zendesk budget failed ({what}): keeping to 1/{} of rate_limit_rpm for a minute",
                self.share
            );
        }
        *f = Some(Instant::now() + STORE_RETRY);
    }

    /// One request's token of the account's current window; waits for the next window when
    /// this one is spent. `waiting`: this client's requests waiting for a token, so it takes
    /// no more than it spends now (a request left in its slice when the window ends, or when
    /// its writer falls idle, is lost to every writer of the account).
    async fn take(&self, waiting: impl Fn() -> u32) {
        loop {
            if self.failing() {
                loop {
                    match self.fallback.check() {
                        Ok(()) => return,
                        Err(not_until) => {
                            let wait = not_until.wait_time_from(self.fallback.clock().now());
                            tokio::time::sleep(wait.max(Duration::from_micros(100))).await;
                        }
                    }
                }
            }
            let mut lease = self.lease.lock().await;
            let now = budget::unix_ms();
            let window = budget::window_of(now);
            if lease.0 == window && lease.1 > 0 {
                lease.1 -= 1;
                return;
            }
            // The window's requests are released evenly over it, so clients that all wait at a
            // window's start do not spend it in a burst: any sixty seconds then hold about
            // `rate_limit_rpm`, wherever Zendesk's own minute starts.
            let win_ms = budget::WINDOW.as_millis() as u64;
            let into = now - window * win_ms;
            let cap = budget::window_cap(self.rpm, window);
            let released = ((u64::from(cap) * into / win_ms) as u32 + 1).min(cap);
            // Small slices, so a window is not held by clients that do not need it; what was
            // released more than a slice ago and not taken is forfeit, so requests nobody
            // asked for (between runs, or while jobs were the bound) do not go out in a burst
            // that would crowd Zendesk's own minute.
            let slice = budget::slice(self.rpm);
            let want = slice.min(released).min(waiting());
            let floor = released.saturating_sub(slice);
            let (store, account) = (self.store.clone(), self.account.clone());
            let got = tokio::task::spawn_blocking(move || {
                store.take(&account, window, want, released, floor)
            })
            .await
            .map_err(io_error)
            .and_then(|r| r);
            match got {
                Ok(n) if n > 0 => {
                    *lease = (window, n - 1);
                    return;
                }
                Ok(_) => {
                    drop(lease);
                    let jitter = u64::from(rand::random::<u8>() % 20);
                    let wait = if released < cap {
                        // What is released so far is taken: the next request comes free soon.
                        win_ms / u64::from(cap.max(1)) + jitter
                    } else {
                        // The window is spent: wait for the next one (a little after its start,
                        // so the clients that wait do not all ask at the same millisecond).
                        ((window + 1) * win_ms).saturating_sub(budget::unix_ms()) + jitter
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(e) => self.fail("taking requests", &e),
            }
        }
    }

    /// One of the account's `max` job slots, held until the returned guard is dropped; waits
    /// while other writers of the account hold them all. While the store fails, this client
    /// keeps to its share (`max ÷ share`) locally.
    pub async fn job_slot(self: &Arc<Self>, max: usize) -> JobSlot {
        let max = max.max(1) as u32;
        let holder = format!(
            "{}-{}",
            self.member,
            self.jobs_taken.fetch_add(1, Ordering::Relaxed)
        );
        let _turn = self.slot_turn.lock().await;
        let mut wait = Duration::from_millis(10);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.failing() {
                let share = (max / self.share).max(1);
                if self.local_jobs.fetch_add(1, Ordering::SeqCst) < share {
                    return JobSlot {
                        shared: self.clone(),
                        holder: None,
                    };
                }
                self.local_jobs.fetch_sub(1, Ordering::SeqCst);
            } else {
                let (store, account, h) =
                    (self.store.clone(), self.account.clone(), holder.clone());
                let took = tokio::task::spawn_blocking(move || {
                    let now = budget::unix_ms();
                    store.take_job(
                        &account,
                        &h,
                        max,
                        now + budget::JOB_LEASE.as_millis() as u64,
                        now,
                    )
                })
                .await
                .map_err(io_error)
                .and_then(|r| r);
                match took {
                    Ok(Some(held)) => {
                        self.note_held(held, max);
                        return JobSlot {
                            shared: self.clone(),
                            holder: Some(holder),
                        };
                    }
                    Ok(None) => self.note_held(max, max),
                    Err(e) => {
                        self.fail("taking a job slot", &e);
                        continue;
                    }
                }
            }
            // Every slot is held: a slot this client gives back wakes this task at once; one
            // given back by another process is seen within 50 ms (one task per client asks).
            let jitter = Duration::from_millis(u64::from(rand::random::<u8>() % 10));
            tokio::select! {
                _ = tokio::time::sleep(wait + jitter) => {}
                _ = freed => {}
            }
            wait = (wait * 2).min(Duration::from_millis(40));
        }
    }

    /// The account's slots held at this client's last take: from nine tenths of them on the
    /// job pollers look at every open job of the account, so finished jobs give their slots
    /// back about when the writers run out (a poll then frees many of them at once).
    fn note_held(&self, held: u32, max: u32) {
        let held = held.saturating_sub(self.returning.load(Ordering::SeqCst));
        self.held_seen.store(held, Ordering::SeqCst);
        self.slots_seen.store(max, Ordering::SeqCst);
        let short = held >= max - max / 10;
        if short {
            if !self.starved.swap(true, Ordering::SeqCst) {
                self.starving.notify_waiters();
            }
        } else {
            self.starved.store(false, Ordering::SeqCst);
        }
    }

    /// This client gave `n` slots back (its own, or other writers' finished jobs): the account
    /// holds that many fewer than at the last take, so a poll right after one that freed many
    /// does not go out for the few jobs left.
    fn given_back(&self, n: u32) {
        let held = self
            .held_seen
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                Some(h.saturating_sub(n))
            })
            .map_or(0, |h| h.saturating_sub(n));
        let max = self.slots_seen.load(Ordering::SeqCst);
        if held < max - max / 10 {
            self.starved.store(false, Ordering::SeqCst);
        }
    }

    /// Slots a poll should free to be worth a request while the account is short of them:
    /// one once at most one slot is left (the poll gets the next request, so writes wait for
    /// it about one request period and no request is lost), else nearly all of them (a poll
    /// then frees as many as it can).
    pub fn worth_freeing(&self) -> usize {
        let (held, max) = (
            self.held_seen.load(Ordering::SeqCst),
            self.slots_seen.load(Ordering::SeqCst),
        );
        if held + 1 >= max {
            1
        } else {
            (max - max / 10).max(1) as usize
        }
    }

    /// The account's job slots held as this client last saw them.
    pub fn held(&self) -> u32 {
        self.held_seen.load(Ordering::SeqCst)
    }

    /// At this client's last take, the account's job slots were all or nearly all held.
    pub fn starved(&self) -> bool {
        self.starved.load(Ordering::SeqCst)
    }

    /// Resolves once this client finds every job slot of the account held.
    pub async fn starving(&self) {
        let n = self.starving.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if !self.starved() {
            n.await;
        }
    }

    /// Whether a lease is this client's own.
    pub fn holds(&self, holder: &str) -> bool {
        holder
            .strip_prefix(self.member.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }

    /// Runs `call` with the store and the account's key on the blocking pool: store calls
    /// block (a file lock, an SDK call driven on the store's own runtime).
    async fn on_store<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn BudgetStore, &str) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let (store, account) = (self.store.clone(), self.account.clone());
        tokio::task::spawn_blocking(move || call(store.as_ref(), &account))
            .await
            .map_err(io_error)
            .and_then(|r| r)
    }

    /// The account's open jobs (those whose batch has submitted them); nothing when the store
    /// cannot tell.
    pub async fn open_jobs(&self) -> Vec<budget::OpenJob> {
        if self.failing() {
            return Vec::new();
        }
        match self
            .on_store(|store, account| store.open_jobs(account, budget::unix_ms()))
            .await
        {
            Ok(open) => open,
            Err(e) => {
                tracing::debug!(error = %e, "the account's open jobs could not be read");
                Vec::new()
            }
        }
    }

    /// The account's open jobs that other writers submitted.
    pub async fn others_jobs(&self) -> Vec<budget::OpenJob> {
        let mut open = self.open_jobs().await;
        open.retain(|j| !self.holds(&j.holder));
        open
    }

    /// Claims the poll of the account's open jobs for this client, unless another writer
    /// polled them within `every`. While the store fails, every client polls its own.
    pub async fn claim_poll(&self, every: Duration) -> bool {
        let every = every.as_millis() as u64;
        self.on_store(move |store, account| store.claim_poll(account, budget::unix_ms(), every))
            .await
            .unwrap_or(true)
    }

    /// Frees the slots of jobs seen finished (other writers' jobs too: Zendesk counts only
    /// queued and running jobs, whether or not their results were read), in the background.
    /// Slots freed while a give-back is queued go with it: a poll that finishes many jobs
    /// costs one change of the account's record, not one per job.
    pub fn end_jobs(self: &Arc<Self>, holders: Vec<String>) {
        if holders.is_empty() {
            return;
        }
        let n = holders.len() as u32;
        self.given_back(n);
        self.returning.fetch_add(n, Ordering::SeqCst);
        let queued = {
            let mut q = self.to_return.lock().unwrap_or_else(|e| e.into_inner());
            let queued = !q.is_empty();
            q.extend(holders);
            queued
        };
        if queued {
            return;
        }
        let shared = self.clone();
        in_background(move || loop {
            let holders =
                std::mem::take(&mut *shared.to_return.lock().unwrap_or_else(|e| e.into_inner()));
            if holders.is_empty() {
                return;
            }
            if let Err(e) = shared.store.end_jobs(&shared.account, &holders) {
                tracing::debug!(error = %e, "job slots were not given back: their leases run out");
            }
            shared
                .returning
                .fetch_sub(holders.len() as u32, Ordering::SeqCst);
            shared.freed.notify_waiters();
        });
    }

    /// Keeps the statuses of other writers' jobs this client saw finished, for those writers.
    pub async fn put_done(&self, done: Vec<(String, String)>) {
        if done.is_empty() || self.failing() {
            return;
        }
        let kept = self
            .on_store(move |store, account| store.put_done(account, &done))
            .await;
        if let Err(e) = kept {
            tracing::debug!(error = %e, "finished jobs' statuses were not kept: their writers poll them");
        }
    }

    /// The statuses other writers kept for these of this client's jobs.
    pub async fn take_done(&self, jobs: Vec<String>) -> Vec<(String, String)> {
        if jobs.is_empty() || self.failing() {
            return Vec::new();
        }
        match self
            .on_store(move |store, account| store.take_done(account, &jobs))
            .await
        {
            Ok(done) => done,
            Err(e) => {
                tracing::debug!(error = %e, "kept job statuses could not be read: polling Zendesk");
                Vec::new()
            }
        }
    }
}

/// A job slot of the account's; given back when dropped.
pub struct JobSlot {
    shared: Arc<Shared>,
    /// The lease's holder in the store; `None`: a local share while the store fails.
    holder: Option<String>,
}

impl JobSlot {
    /// Names the job this slot's batch submitted, so other writers of the account can poll it
    /// and free the slot once it is done. Done in the background: a lease already given back
    /// is left as it is.
    pub fn started(&self, job: &str) {
        let Some(holder) = self.holder.clone() else {
            return;
        };
        let (store, account, job) = (
            self.shared.store.clone(),
            self.shared.account.clone(),
            job.to_string(),
        );
        let note = move || {
            if let Err(e) = store.job_started(&account, &holder, &job) {
                tracing::debug!(error = %e, "a job was not named on its slot: only its writer polls it");
            }
        };
        in_background(note);
    }
}

impl Drop for JobSlot {
    fn drop(&mut self) {
        match self.holder.take() {
            None => {
                self.shared.given_back(1);
                self.shared.local_jobs.fetch_sub(1, Ordering::SeqCst);
                self.shared.freed.notify_waiters();
            }
            Some(holder) => self.shared.end_jobs(vec![holder]),
        }
    }
}

/// A store call nobody waits for: on the runtime's blocking pool, or here outside a runtime.
fn in_background(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            rt.spawn_blocking(f);
        }
        Err(_) => f(),
    }
}

fn io_error(e: tokio::task::JoinError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[tokio::test]
    async fn an_urgent_request_gets_the_next_token_however_many_wait() {
        // 6,000 rpm: a token every 10 ms; 30 ordinary requests queue for about 300 ms.
        let limiter = Arc::new(Limiter::new(6000));
        let served = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..30 {
            let (l, n) = (limiter.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let _p = l.acquire().await;
                n.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        let before = served.load(Ordering::SeqCst);
        assert!(
            before < 25,
            "the ordinary requests are still queued ({before} served)"
        );
        let permit = limiter.acquire_urgent().await;
        let after = served.load(Ordering::SeqCst);
        drop(permit);
        // At most the token being taken when it queued went to an ordinary request.
        assert!(
            after <= before + 1,
            "the urgent request waited for {} ordinary ones",
            after - before
        );
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            served.load(Ordering::SeqCst),
            30,
            "every queued request got a token"
        );
    }

    #[tokio::test]
    async fn pacing_follows_remaining() {
        let l = Limiter::new(0);
        l.observe(&headers(&[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "500"),
        ]));
        assert!(l.gate().pace.is_zero());
        l.observe(&headers(&[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "9"),
            ("ratelimit-reset", "20"),
        ]));
        assert_eq!(l.gate().pace, Duration::from_secs(2));
        l.observe(&headers(&[
            ("x-rate-limit", "100"),
            ("x-rate-limit-remaining", "1"),
        ]));
        assert_eq!(l.gate().pace, Duration::from_millis(600));
    }

    /// Ten requests at once while one request is left in a 10-second window: one goes 5 s in,
    /// the rest at once when the window resets, not at the spacing they booked.
    #[tokio::test(start_paused = true)]
    async fn paced_requests_go_at_once_when_the_window_resets() {
        let l = std::sync::Arc::new(Limiter::new(0));
        l.observe(&headers(&[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "1"),
            ("ratelimit-reset", "10"),
        ]));
        let t0 = Instant::now();
        let sent: Vec<_> = (0..10)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    let p = l.acquire().await;
                    p.finish(false);
                    t0.elapsed()
                })
            })
            .collect();
        let mut at = Vec::new();
        for s in sent {
            at.push(s.await.unwrap());
        }
        at.sort();
        // One request left: the first paced request waits one spacing, so it fits.
        assert_eq!(at[0], Duration::from_secs(5));
        assert!(
            at[1..].iter().all(|t| *t == Duration::from_secs(10)),
            "{at:?}"
        );
    }

    /// An answer that shows a refilled window ends the pacing for the requests already waiting.
    #[tokio::test(start_paused = true)]
    async fn a_refilled_window_wakes_paced_requests() {
        let l = std::sync::Arc::new(Limiter::new(0));
        l.observe(&headers(&[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "0"),
            ("ratelimit-reset", "50"),
        ]));
        let t0 = Instant::now();
        let sent: Vec<_> = (0..5)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    l.acquire().await.finish(false);
                    t0.elapsed()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        l.observe(&headers(&[
            ("x-rate-limit", "700"),
            ("x-rate-limit-remaining", "699"),
            ("ratelimit-reset", "60"),
        ]));
        let mut at = Vec::new();
        for s in sent {
            at.push(s.await.unwrap());
        }
        at.sort();
        // Nothing was left: every request waited for the refill.
        assert!(at.iter().all(|t| *t == Duration::from_secs(3)), "{at:?}");
    }

    #[tokio::test]
    async fn pause_holds_requests_and_counts_time() {
        let l = Limiter::new(0);
        l.pause(Duration::from_millis(150));
        l.pause(Duration::from_millis(50)); // shorter: kept at the longer one
        let t = Instant::now();
        let p = l.acquire().await;
        assert!(t.elapsed() >= Duration::from_millis(140));
        assert!(p.probe);
        p.finish(false);
        assert!(!l.gate().recovering);
        assert!((140..=200).contains(&l.paused_ms()));
    }
}
