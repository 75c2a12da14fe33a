//! Small helpers shared by the simulator modules: time, query strings, JSON and globbing.

use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The simulator's clock: wall time that tests can move forward (token expiry, job retention,
/// rate windows) without sleeping.
#[derive(Debug)]
pub struct SimClock {
    start: Instant,
    epoch_ms_at_start: i64,
    offset_ms: AtomicI64,
}

impl Default for SimClock {
    fn default() -> Self {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self {
            start: Instant::now(),
            epoch_ms_at_start: epoch,
            offset_ms: AtomicI64::new(0),
        }
    }
}

impl SimClock {
    /// Milliseconds since the Unix epoch, including any test offset.
    pub fn now_ms(&self) -> i64 {
        self.epoch_ms_at_start
            + self.start.elapsed().as_millis() as i64
            + self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// ISO 8601 UTC with second precision, as Zendesk writes timestamps (`2012-04-04T09:14:57Z`).
pub fn iso(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        None => "1970-01-01T00:00:00Z".to_string(),
    }
}

/// Unix seconds of an ISO 8601 timestamp written by [`iso`] (0 when it does not parse).
pub fn iso_secs(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

/// An opaque cursor: URL-safe base64 of `text`.
pub fn encode_cursor(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// The text inside a cursor made by [`encode_cursor`] (standard base64 is accepted too).
pub fn decode_cursor(cursor: &str) -> Option<String> {
    use base64::Engine;
    let c = cursor.trim().trim_end_matches('=');
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(c))
        .ok()?;
    String::from_utf8(raw).ok()
}

/// The job-status message format seen in the OAS examples (`Completed at 2018-03-08 10:07:04 +0000`).
pub fn job_message_time(ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(ms) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S +0000").to_string(),
        None => String::new(),
    }
}

/// A small multiply-rotate hasher for the record indexes: keys are short strings and the
/// simulator does not face hostile input, so SipHash's cost buys nothing here.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ *b as u64).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Lower case without allocating when the text has no upper-case letter.
pub fn lower(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_uppercase) {
        Cow::Owned(s.to_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Decoded query parameters in order of appearance.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        match raw {
            Some(q) => Query(
                form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect(),
            ),
            None => Query(Vec::new()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true") | Some("1"))
    }

    /// A comma-separated list parameter (`ids=1,2,3`); empty entries are skipped.
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        self.get(key).map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
    }
}

/// Email shape check: one `@`, a non-empty local part, a dotted domain, no whitespace.
pub fn email_is_valid(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email
            .chars()
            .any(|c| c.is_whitespace() || c == ',' || c == ';')
}

/// Zendesk tags are lower case and cannot contain spaces: a value with spaces becomes several tags.
pub fn normalize_tags(value: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: &str| {
        for t in s.split_whitespace() {
            let t = t.to_lowercase();
            if !out.contains(&t) {
                out.push(t);
            }
        }
    };
    match value {
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::String(s) => push(s),
                    Value::Number(n) => push(&n.to_string()),
                    _ => {}
                }
            }
        }
        Value::String(s) => push(s),
        _ => {}
    }
    out
}

pub fn add_tags(tags: &mut Vec<String>, add: &[String]) {
    for t in add {
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
}

pub fn remove_tags(tags: &mut Vec<String>, remove: &[String]) {
    tags.retain(|t| !remove.contains(t));
}

/// Reads an id that may be sent as a JSON number or a numeric string.
pub fn as_id(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A string value, or a number rendered as a string (Zendesk coerces scalars for text attributes).
pub fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Glob with `*` wildcards (matching any run of characters, including `/`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("/api/v2/users/*", "/api/v2/users/create_many"));
        assert!(glob_match("*create_many", "/api/v2/tickets/create_many"));
        assert!(glob_match("/api/*/tags", "/api/v2/users/5/tags"));
        assert!(!glob_match("/api/v2/users", "/api/v2/users/1"));
        assert!(glob_match("*", "/x"));
    }

    #[test]
    fn emails() {
        assert!(email_is_valid("a@b.co"));
        assert!(!email_is_valid("a@b"));
        assert!(!email_is_valid("not an email"));
        assert!(!email_is_valid("@b.co"));
    }

    #[test]
    fn tags() {
        let t = normalize_tags(&serde_json::json!(["VIP", "a b", "vip"]));
        assert_eq!(t, vec!["vip", "a", "b"]);
    }

    #[test]
    fn cursors() {
        let c = encode_cursor("1580753798.0||432|");
        assert!(c
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(decode_cursor(&c).as_deref(), Some("1580753798.0||432|"));
        assert_eq!(
            decode_cursor("MTU4MDc1Mzc5OC4wfHw0MzJ8").as_deref(),
            Some("1580753798.0||432|")
        );
        assert_eq!(decode_cursor("!!"), None);
    }

    #[test]
    fn times() {
        assert_eq!(iso_secs(&iso(1_700_000_000_123)), 1_700_000_000);
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(job_message_time(1_000), "1970-01-01 00:00:01 +0000");
    }
}
