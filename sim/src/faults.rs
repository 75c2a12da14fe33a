//! Fault injection: rules that turn matching requests into 429 storms, 503s, 500s, gateway
//! 502s / 504s, dropped connections or slow answers, and jobs into failed / killed ones or
//! partial item failures. A rule with `after_commit` lets the request do its work first and
//! only then replaces (or delays) the answer, as a gateway timing out after Zendesk queued the
//! job would. Every random choice comes from one seeded generator, so a sequential test replays
//! exactly.

use crate::util::glob_match;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Seed for fault decisions (defaults to the simulator seed).
    pub seed: Option<u64>,
    pub rules: Vec<FaultRule>,
}

impl FaultConfig {
    pub fn with_rules(rules: Vec<FaultRule>) -> Self {
        Self { seed: None, rules }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 with the JSON body; `retry_after_secs` unset = no `Retry-After` header.
    RateLimit,
    /// 503 with `Retry-After` when `retry_after_secs` is set.
    Unavailable,
    /// 500 `{"errors":[{"code":"Unavailable","title":"Internal Server Error"}]}`.
    InternalError,
    /// 502 with a short `text/html` gateway error page (no JSON, no Zendesk headers).
    BadGateway,
    /// 504 with a short `text/html` gateway error page (no JSON, no Zendesk headers).
    GatewayTimeout,
    /// The request is processed, then the response body is cut after `after_bytes` bytes and
    /// the connection closed.
    DropConnection,
    /// The answer is delayed by `delay_ms`.
    Slow,
    /// A bulk job created by a matching request ends `failed` with `message`.
    FailJob,
    /// A bulk job created by a matching request ends `killed` with `message`.
    KillJob,
    /// Each item of a matching request's job fails with probability `fraction`.
    FailItems,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RateLimit => "rate_limit",
            FaultKind::Unavailable => "unavailable",
            FaultKind::InternalError => "internal_error",
            FaultKind::BadGateway => "bad_gateway",
            FaultKind::GatewayTimeout => "gateway_timeout",
            FaultKind::DropConnection => "drop_connection",
            FaultKind::Slow => "slow",
            FaultKind::FailJob => "fail_job",
            FaultKind::KillJob => "kill_job",
            FaultKind::FailItems => "fail_items",
        }
    }

    /// The name counted and logged for a fired rule: `<name>_after_commit` when the request was
    /// processed before the fault replaced or delayed its answer.
    pub fn label(self, after_commit: bool) -> &'static str {
        if !after_commit || !self.honours_after_commit() {
            return self.name();
        }
        match self {
            FaultKind::Unavailable => "unavailable_after_commit",
            FaultKind::InternalError => "internal_error_after_commit",
            FaultKind::BadGateway => "bad_gateway_after_commit",
            FaultKind::GatewayTimeout => "gateway_timeout_after_commit",
            FaultKind::Slow => "slow_after_commit",
            other => other.name(),
        }
    }

    /// Kinds that `after_commit` changes. A 429 always means "not done" (it ignores the
    /// flag), `drop_connection` always processes first, and job faults act on the job.
    fn honours_after_commit(self) -> bool {
        matches!(
            self,
            FaultKind::Unavailable
                | FaultKind::InternalError
                | FaultKind::BadGateway
                | FaultKind::GatewayTimeout
                | FaultKind::Slow
        )
    }

    fn is_job_fault(self) -> bool {
        matches!(
            self,
            FaultKind::FailJob | FaultKind::KillJob | FaultKind::FailItems
        )
    }
}

/// One rule. Matching requests are counted per rule: the first `skip` pass untouched, then the
/// rule fires (with `probability`) at most `times` times. A "storm" of N 429s is `times = N`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRule {
    pub kind: FaultKind,
    /// Glob (`*` = anything) on the path without `.json` and without any `/sub/<name>`
    /// prefix, e.g. `/api/v2/users/*`. Unset = every API request.
    pub path: Option<String>,
    pub method: Option<String>,
    pub account: Option<String>,
    pub probability: f64,
    pub skip: u64,
    pub times: Option<u64>,
    pub retry_after_secs: Option<u64>,
    pub delay_ms: u64,
    pub after_bytes: usize,
    pub message: Option<String>,
    pub fraction: f64,
    pub error: Option<String>,
    pub details: Option<String>,
    /// Process the request normally first (records written, jobs queued and run), then replace
    /// the answer (`internal_error`, `bad_gateway`, `gateway_timeout`, `unavailable` without
    /// `Retry-After`) or delay it (`slow`). Ignored by `rate_limit`, `drop_connection` (which
    /// always processes first) and the job faults.
    pub after_commit: bool,
}

impl Default for FaultRule {
    fn default() -> Self {
        Self::new(FaultKind::InternalError)
    }
}

impl FaultRule {
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            path: None,
            method: None,
            account: None,
            probability: 1.0,
            skip: 0,
            times: None,
            retry_after_secs: None,
            delay_ms: 0,
            after_bytes: 0,
            message: None,
            fraction: 0.0,
            error: None,
            details: None,
            after_commit: false,
        }
    }

    pub fn path(mut self, glob: &str) -> Self {
        self.path = Some(glob.to_string());
        self
    }
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.to_string());
        self
    }
    pub fn account(mut self, sub: &str) -> Self {
        self.account = Some(sub.to_string());
        self
    }
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }
    pub fn skip(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
    pub fn delay_ms(mut self, ms: u64) -> Self {
        self.delay_ms = ms;
        self
    }
    pub fn after_bytes(mut self, n: usize) -> Self {
        self.after_bytes = n;
        self
    }
    pub fn message(mut self, m: &str) -> Self {
        self.message = Some(m.to_string());
        self
    }
    pub fn fraction(mut self, f: f64) -> Self {
        self.fraction = f;
        self
    }
    /// See [`FaultRule::after_commit`].
    pub fn after_commit(mut self, yes: bool) -> Self {
        self.after_commit = yes;
        self
    }

    fn matches(&self, account: &str, method: &str, path: &str) -> bool {
        self.account.as_deref().is_none_or(|a| a == account)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self.path.as_deref().is_none_or(|p| glob_match(p, path))
    }
}

/// What the request pipeline must do for one request.
#[derive(Debug, Default, Clone)]
pub struct RequestFaults {
    /// Delay before the request is processed.
    pub delay_ms: u64,
    /// Delay after the request was processed, before the answer is sent.
    pub post_delay_ms: u64,
    /// A fault that replaces the answer instead of processing: (kind, retry_after).
    pub terminal: Option<(FaultKind, Option<u64>)>,
    /// A fault that replaces the answer after the request was processed.
    pub after_commit: Option<FaultKind>,
    pub drop_after: Option<usize>,
    /// Labels of the rules that fired (`internal_error`, `gateway_timeout_after_commit`, ...).
    pub fired: Vec<&'static str>,
}

/// What happens to a job created by one request.
#[derive(Debug, Default, Clone)]
pub struct JobFaults {
    /// `("failed" | "killed", message)`.
    pub end: Option<(&'static str, String)>,
    /// Per input item: `Some((error, details))` when that item must fail.
    pub failing_items: Vec<Option<(String, String)>>,
    pub fired: Vec<FaultKind>,
}

pub struct FaultEngine {
    rules: Vec<(FaultRule, u64, u64)>,
    rng: SmallRng,
}

impl FaultEngine {
    pub fn new(config: &FaultConfig, default_seed: u64) -> Self {
        Self {
            rules: config.rules.iter().map(|r| (r.clone(), 0, 0)).collect(),
            rng: SmallRng::seed_from_u64(config.seed.unwrap_or(default_seed)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn fire(&mut self, idx: usize) -> bool {
        let (rule, matched, injected) = &mut self.rules[idx];
        *matched += 1;
        if *matched <= rule.skip || rule.times.is_some_and(|t| *injected >= t) {
            return false;
        }
        let p = rule.probability;
        if p < 1.0 && self.rng.random::<f64>() >= p {
            return false;
        }
        self.rules[idx].2 += 1;
        true
    }

    pub fn on_request(&mut self, account: &str, method: &str, path: &str) -> RequestFaults {
        let mut out = RequestFaults::default();
        for i in 0..self.rules.len() {
            let (kind, matches) = {
                let r = &self.rules[i].0;
                (
                    r.kind,
                    !r.kind.is_job_fault() && r.matches(account, method, path),
                )
            };
            if !matches || !self.fire(i) {
                continue;
            }
            let r = &self.rules[i].0;
            let after = r.after_commit && kind.honours_after_commit();
            match kind {
                FaultKind::Slow if after => out.post_delay_ms += r.delay_ms,
                FaultKind::Slow => out.delay_ms += r.delay_ms,
                FaultKind::DropConnection => {
                    out.drop_after.get_or_insert(r.after_bytes);
                }
                _ if after => {
                    out.after_commit.get_or_insert(kind);
                }
                _ => {
                    if out.terminal.is_none() {
                        out.terminal = Some((kind, r.retry_after_secs));
                    }
                }
            }
            out.fired.push(kind.label(after));
        }
        out
    }

    pub fn on_job(&mut self, account: &str, method: &str, path: &str, items: usize) -> JobFaults {
        let mut out = JobFaults {
            failing_items: vec![None; items],
            ..JobFaults::default()
        };
        for i in 0..self.rules.len() {
            let (kind, matches) = {
                let r = &self.rules[i].0;
                (
                    r.kind,
                    r.kind.is_job_fault() && r.matches(account, method, path),
                )
            };
            if !matches || !self.fire(i) {
                continue;
            }
            let r = self.rules[i].0.clone();
            match kind {
                FaultKind::FailJob | FaultKind::KillJob => {
                    if out.end.is_none() {
                        let status = if kind == FaultKind::FailJob {
                            "failed"
                        } else {
                            "killed"
                        };
                        let msg = r
                            .message
                            .unwrap_or_else(|| format!("Job {status} by the simulator"));
                        out.end = Some((status, msg));
                    }
                }
                _ => {
                    let error = r.error.unwrap_or_else(|| "InternalError".into());
                    let details = r
                        .details
                        .unwrap_or_else(|| "Simulated failure of this item".into());
                    for slot in out.failing_items.iter_mut() {
                        if slot.is_none() && self.rng.random::<f64>() < r.fraction {
                            *slot = Some((error.clone(), details.clone()));
                        }
                    }
                }
            }
            out.fired.push(kind);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storm_skips_and_stops() {
        let cfg = FaultConfig::with_rules(vec![FaultRule::new(FaultKind::RateLimit)
            .path("/api/v2/users*")
            .skip(1)
            .times(2)
            .retry_after(3)]);
        let mut e = FaultEngine::new(&cfg, 1);
        let hits: Vec<bool> = (0..5)
            .map(|_| e.on_request("a", "GET", "/api/v2/users").terminal.is_some())
            .collect();
        assert_eq!(hits, vec![false, true, true, false, false]);
        assert!(e
            .on_request("a", "GET", "/api/v2/tickets")
            .terminal
            .is_none());
    }

    #[test]
    fn after_commit_rules() {
        let cfg = FaultConfig::with_rules(vec![
            FaultRule::new(FaultKind::GatewayTimeout)
                .after_commit(true)
                .times(1),
            FaultRule::new(FaultKind::Slow)
                .delay_ms(5)
                .after_commit(true)
                .times(1),
            FaultRule::new(FaultKind::RateLimit)
                .after_commit(true)
                .skip(1),
        ]);
        let mut e = FaultEngine::new(&cfg, 1);
        let f = e.on_request("a", "POST", "/api/v2/tickets/create_many");
        assert!(f.terminal.is_none());
        assert_eq!(f.after_commit, Some(FaultKind::GatewayTimeout));
        assert_eq!((f.delay_ms, f.post_delay_ms), (0, 5));
        assert_eq!(
            f.fired,
            ["gateway_timeout_after_commit", "slow_after_commit"]
        );
        // rate_limit ignores after_commit: a 429 never follows work.
        let f = e.on_request("a", "POST", "/api/v2/tickets/create_many");
        assert_eq!(f.terminal, Some((FaultKind::RateLimit, None)));
        assert_eq!(f.fired, ["rate_limit"]);
        let text = r#"{"rules":[{"kind":"bad_gateway","after_commit":true}]}"#;
        let parsed: FaultConfig = serde_json::from_str(text).unwrap();
        assert!(parsed.rules[0].after_commit);
        assert!(
            !serde_json::from_str::<FaultConfig>(r#"{"rules":[{"kind":"gateway_timeout"}]}"#)
                .unwrap()
                .rules[0]
                .after_commit
        );
    }

    #[test]
    fn item_failures_are_deterministic() {
        let cfg = FaultConfig::with_rules(vec![FaultRule::new(FaultKind::FailItems).fraction(0.5)]);
        let a = FaultEngine::new(&cfg, 7).on_job("a", "POST", "/x", 50);
        let b = FaultEngine::new(&cfg, 7).on_job("a", "POST", "/x", 50);
        let count = a.failing_items.iter().filter(|x| x.is_some()).count();
        assert!(count > 10 && count < 40, "{count}");
        assert_eq!(
            a.failing_items
                .iter()
                .map(Option::is_some)
                .collect::<Vec<_>>(),
            b.failing_items
                .iter()
                .map(Option::is_some)
                .collect::<Vec<_>>()
        );
    }
}
