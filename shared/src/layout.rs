//! Object keys of the bucket layout (ARCHITECTURE.md, "Data in the bucket"). A local folder
//! uses the same keys as paths.

/// Last confirmed state of a sync.
pub fn state_key(sync: &str) -> String {
    format!("state/{sync}/state.zst")
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

/// Per-row outcomes of one chunk, written by write-batch.
pub fn results_key(sync: &str, run: &str, chunk_name: &str) -> String {
    format!("runs/{sync}/{run}/results/{chunk_name}.jsonl")
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

/// The file name of a chunk key without folder and extension (`create-000001`).
pub fn chunk_name(chunk_key: &str) -> &str {
    let name = chunk_key.rsplit('/').next().unwrap_or(chunk_key);
    name.strip_suffix(".jsonl.zst").unwrap_or(name)
}
