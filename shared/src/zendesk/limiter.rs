//! The request budget every clone of a `Client` shares: a token bucket at the configured rate,
//! a client-wide pause while a `Retry-After` runs, pacing when Zendesk reports few requests left,
//! and a single probe request after a pause before the others go again.

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use reqwest::header::HeaderMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
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
    state: Mutex<Gate>,
    notify: Notify,
    paused_ms: AtomicU64,
    /// Three quarters of the bucket's period: the closest two requests may follow each other.
    min_gap: Duration,
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
            state: Mutex::new(Gate {
                paused_until: None,
                recovering: false,
                probe_in_flight: false,
                pace: Duration::ZERO,
                next_paced: None,
                last_sent: None,
            }),
            notify: Notify::new(),
            paused_ms: AtomicU64::new(0),
            min_gap: match NonZeroU32::new(rpm) {
                Some(r) => Duration::from_secs(45) / r.get(),
                None => Duration::ZERO,
            },
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

    async fn take_token(&self) {
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
        loop {
            // A running pause: sleep it out before spending a token.
            let until = self.paused_until();
            if let Some(until) = until {
                tokio::time::sleep_until(until).await;
                continue;
            }
            self.take_token().await;
            // Pacing slot (reserved, so concurrent tasks line up instead of bunching).
            let slot = {
                let mut g = self.gate();
                if g.pace.is_zero() {
                    None
                } else {
                    let now = Instant::now();
                    let slot = g.next_paced.map_or(now, |n| n.max(now));
                    g.next_paced = Some(slot + g.pace);
                    (slot > now).then_some(slot)
                }
            };
            if let Some(slot) = slot {
                tokio::time::sleep_until(slot).await;
            }
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
        let low = (limit * 0.05).max(2.0);
        let pace = if remaining <= low {
            let per = match num("ratelimit-reset") {
                Some(reset) => reset / (remaining + 1.0),
                None => 60.0 / limit,
            };
            Duration::from_secs_f64(per.max(0.0)).min(MAX_PACE)
        } else {
            Duration::ZERO
        };
        let mut g = self.gate();
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
                g.next_paced = None;
            }
        }
    }
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
