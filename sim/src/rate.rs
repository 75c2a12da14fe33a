//! Per-account fixed-window rate limiting, endpoint limits, and the bookkeeping that spots
//! clients sending requests while a `Retry-After` they were given is still running.

use crate::config::WindowLimit;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct RateState {
    window_start: i64,
    count: u32,
    /// Until when the last `Retry-After` sent asks clients to wait (ms since epoch).
    pending_until: i64,
    endpoint: HashMap<String, (i64, u32)>,
}

/// Outcome of the account-wide check, with the header values to send.
#[derive(Debug, Clone, Copy)]
pub struct RateDecision {
    pub limit: u32,
    pub remaining: u32,
    pub reset_secs: u64,
    /// Set when the request is refused.
    pub retry_after: Option<u64>,
}

fn ceil_secs(ms: i64) -> u64 {
    (ms.max(0) as u64).div_ceil(1000)
}

impl RateState {
    fn roll(&mut self, now: i64, window_ms: u64) {
        // An empty window starts with the request that opens it.
        if self.count == 0 || now - self.window_start >= window_ms as i64 || now < self.window_start
        {
            self.window_start = now;
            self.count = 0;
        }
    }

    /// Counts the request if the account has budget left; otherwise refuses it.
    pub fn check(
        &mut self,
        now: i64,
        rpm: u32,
        window_ms: u64,
        advertised_off: u32,
    ) -> RateDecision {
        self.roll(now, window_ms);
        let reset_ms = self.window_start + window_ms as i64 - now;
        let limit = if rpm == 0 { advertised_off } else { rpm };
        if rpm > 0 && self.count >= rpm {
            return RateDecision {
                limit,
                remaining: 0,
                reset_secs: ceil_secs(reset_ms),
                retry_after: Some(ceil_secs(reset_ms).max(1)),
            };
        }
        self.count += 1;
        RateDecision {
            limit,
            remaining: limit.saturating_sub(self.count),
            reset_secs: ceil_secs(reset_ms),
            retry_after: None,
        }
    }

    /// Header values without counting (for answers sent before the limiter runs).
    pub fn peek(
        &mut self,
        now: i64,
        rpm: u32,
        window_ms: u64,
        advertised_off: u32,
    ) -> RateDecision {
        self.roll(now, window_ms);
        let limit = if rpm == 0 { advertised_off } else { rpm };
        RateDecision {
            limit,
            remaining: limit.saturating_sub(self.count),
            reset_secs: ceil_secs(self.window_start + window_ms as i64 - now),
            retry_after: None,
        }
    }

    /// An endpoint-specific limit keyed by `key`; returns the `Retry-After` when exceeded.
    pub fn check_endpoint(&mut self, key: String, lim: WindowLimit, now: i64) -> Option<u64> {
        if lim.limit == 0 {
            return None;
        }
        if self.endpoint.len() > 50_000 {
            let w = lim.window_ms as i64;
            self.endpoint.retain(|_, (start, _)| now - *start < w);
        }
        let slot = self.endpoint.entry(key).or_insert((now, 0));
        if now - slot.0 >= lim.window_ms as i64 {
            *slot = (now, 0);
        }
        if slot.1 >= lim.limit {
            return Some(ceil_secs(slot.0 + lim.window_ms as i64 - now).max(1));
        }
        slot.1 += 1;
        None
    }

    pub fn note_retry_after(&mut self, now: i64, secs: u64) {
        self.pending_until = self.pending_until.max(now + secs as i64 * 1000);
    }

    /// True when a request arrives while an earlier `Retry-After` is still running.
    pub fn is_early(&self, now: i64) -> bool {
        now < self.pending_until
    }

    pub fn reset(&mut self) {
        *self = RateState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_and_refuses() {
        let mut r = RateState::default();
        let d = r.check(1000, 2, 10_000, 0);
        assert_eq!((d.limit, d.remaining, d.retry_after), (2, 1, None));
        assert_eq!(r.check(1001, 2, 10_000, 0).remaining, 0);
        let d = r.check(2000, 2, 10_000, 0);
        assert_eq!(d.retry_after, Some(9));
        assert_eq!(r.check(11_000, 2, 10_000, 0).retry_after, None);
    }

    #[test]
    fn endpoint_limit() {
        let mut r = RateState::default();
        let lim = WindowLimit {
            limit: 1,
            window_ms: 5000,
        };
        assert_eq!(r.check_endpoint("k".into(), lim, 0), None);
        assert_eq!(r.check_endpoint("k".into(), lim, 100), Some(5));
        assert_eq!(r.check_endpoint("j".into(), lim, 100), None);
        r.note_retry_after(0, 2);
        assert!(r.is_early(1999));
        assert!(!r.is_early(2000));
    }
}
