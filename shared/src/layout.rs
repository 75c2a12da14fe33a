//! Object keys of the bucket layout (ARCHITECTURE.md, "Data in the bucket"). A local folder
//! uses the same keys as paths.

/// A run id as zdsync makes them (`20261125T101500Z-3f9a`): letters, digits and `-`.
pub fn valid_run_id(run: &str) -> bool {
    !run.is_empty() && run.len() <= 64 && run.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// Whether `key` is a trigger marker of `sync` (`triggers/<sync>/<hash>.json`).
pub fn is_trigger_marker_of(sync: &str, key: &str) -> bool {
    key.strip_prefix(&format!("triggers/{sync}/"))
        .and_then(|n| n.strip_suffix(".json"))
        .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether `key` is a chunk of run `run` of `sync`.
pub fn is_chunk_of(sync: &str, run: &str, key: &str) -> bool {
    key.strip_prefix(&format!("runs/{sync}/{run}/chunks/"))
        .and_then(|n| n.strip_suffix(".jsonl.zst"))
        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// A sync's config in the bucket.
pub fn config_key(sync: &str) -> String {
    format!("config/{sync}.toml")
}

/// Last confirmed state of a sync.
pub fn state_key(sync: &str) -> String {
    format!("state/{sync}/state.zst")
}

/// The field definitions the last run planned with (what an offline preview reads).
pub fn fields_key(sync: &str) -> String {
    format!("state/{sync}/fields.json")
}

pub fn run_prefix(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/")
}

pub fn manifest_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/manifest.json")
}

pub fn chunk_key(sync: &str, run: &str, op: &str, index: usize) -> String {
    format!("runs/{sync}/{run}/chunks/{op}-{index:06}.jsonl.zst")
}

/// Per-row outcomes of one chunk, written by write-batch as each batch of 100 completes:
/// `<prefix><batch>.jsonl`, ... (and `<batch>.job.json`, the journal of a batch in flight). A
/// batch is named by its first row and the writer that formed it; outcomes are keyed by row.
pub fn results_prefix(sync: &str, run: &str, chunk_name: &str) -> String {
    format!("runs/{sync}/{run}/results/{chunk_name}/")
}

/// Every chunk's outcomes of a run.
pub fn run_results_prefix(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/results/")
}

pub fn batch_results_key(sync: &str, run: &str, chunk_name: &str, batch: &str) -> String {
    format!("runs/{sync}/{run}/results/{chunk_name}/{batch}.jsonl")
}

pub fn batch_journal_key(sync: &str, run: &str, chunk_name: &str, batch: &str) -> String {
    format!("runs/{sync}/{run}/results/{chunk_name}/{batch}.job.json")
}

/// A copy of each run record, so past runs list without walking change sets.
pub fn history_key(sync: &str, run: &str) -> String {
    format!("history/{sync}/{run}.json")
}

pub fn history_prefix(sync: &str) -> String {
    format!("history/{sync}/")
}

/// Every run of a sync lives under this prefix.
pub fn runs_prefix(sync: &str) -> String {
    format!("runs/{sync}/")
}

/// The lock that keeps one run of a sync active at a time.
pub fn lock_key(sync: &str) -> String {
    format!("locks/{sync}.json")
}

/// Audience runs: membership changes that need no write.
pub fn membership_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/membership.jsonl.zst")
}

/// The chunk list a Distributed Map reads.
pub fn chunk_list_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/chunks.json")
}

/// One write-batch invocation's request counters, beside its chunk's results (`tag` tells
/// retried invocations apart).
pub fn batch_stats_key(sync: &str, run: &str, chunk_name: &str, tag: &str) -> String {
    format!("runs/{sync}/{run}/results/{chunk_name}/stats-{tag}.json")
}

/// Whether a key under a chunk's results is a [`batch_stats_key`].
pub fn is_batch_stats_key(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with("stats-") && n.ends_with(".json"))
}

pub fn invalid_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/invalid.jsonl")
}

pub fn removed_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/removed.jsonl.zst")
}

pub fn run_record_key(sync: &str, run: &str) -> String {
    format!("runs/{sync}/{run}/run.json")
}

/// Marks an export object (key + ETag) as synced, so a redelivered S3 event starts no run.
pub fn trigger_marker_key(sync: &str, key: &str, etag: &str) -> String {
    format!(
        "triggers/{sync}/{:016x}.json",
        xxhash_rust::xxh3::xxh3_64(format!("{key}\n{etag}").as_bytes())
    )
}

/// Held while one execution waits for a prefix export to stop growing: the events of the other
/// parts join that execution instead of starting their own.
pub fn pending_trigger_key(sync: &str) -> String {
    format!("triggers/{sync}/pending.json")
}

/// The file name of a chunk key without folder and extension (`create-000001`).
pub fn chunk_name(chunk_key: &str) -> &str {
    let name = chunk_key.rsplit('/').next().unwrap_or(chunk_key);
    name.strip_suffix(".jsonl.zst").unwrap_or(name)
}
