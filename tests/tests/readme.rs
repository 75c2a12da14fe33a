//! What the README states that can go stale: the Rust version the locked dependencies need
//! (against the `rust-version` of every locked crate in the local cargo registry) and the data
//! layout (against the files a real run writes and the key functions of `shared/src/layout.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use zdsync::layout;
use zdsync_tests::{only_record, E2e};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn readme() -> String {
    read(&workspace().join("README.md"))
}

/// `1.94.1` → `[1, 94, 1]`, `1.70` → `[1, 70, 0]`, so versions compare in order.
fn version_key(v: &str) -> Vec<u64> {
    let mut k: Vec<u64> = v
        .split('.')
        .map(|p| p.trim().parse().unwrap_or_else(|_| panic!("version {v:?}")))
        .collect();
    k.resize(3, 0);
    k
}

/// The value of `key = "..."` in the `[section]` table of a TOML manifest.
fn manifest_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
            continue;
        }
        if !inside {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            if k.trim() == key {
                let v = v.trim();
                if let Some(s) = v.strip_prefix('"').and_then(|v| v.split('"').next()) {
                    return Some(s.to_string());
                }
            }
        }
    }
    None
}

/// Locked packages from a registry: (name, version).
fn locked_registry_packages() -> Vec<(String, String)> {
    let lock = read(&workspace().join("Cargo.lock"));
    let mut out = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(&format!("{k} = \""))
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string)
            })
        };
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            continue;
        };
        if field("source").is_some_and(|s| s.starts_with("registry+") || s.starts_with("sparse+")) {
            out.push((name, version));
        }
    }
    out
}

/// The unpacked-sources folders of the local cargo registry.
fn registry_sources() -> Vec<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME");
    std::fs::read_dir(home.join("registry/src"))
        .map(|dirs| dirs.flatten().map(|d| d.path()).collect())
        .unwrap_or_default()
}

/// The highest `rust-version` among the locked crates: (version, crate that declares it).
fn highest_locked_rust_version() -> (String, String) {
    let packages = locked_registry_packages();
    assert!(
        !packages.is_empty(),
        "Cargo.lock lists no registry packages"
    );
    let sources = registry_sources();
    let mut read_ok = 0;
    let mut highest: Option<(Vec<u64>, String, String)> = None;
    for (name, version) in &packages {
        let Some(text) = sources
            .iter()
            .map(|s| s.join(format!("{name}-{version}/Cargo.toml")))
            .find_map(|p| std::fs::read_to_string(p).ok())
        else {
            continue;
        };
        read_ok += 1;
        if let Some(rv) = manifest_value(&text, "package", "rust-version") {
            let k = version_key(&rv);
            if highest.as_ref().is_none_or(|(h, _, _)| k > *h) {
                highest = Some((k, rv, format!("{name} {version}")));
            }
        }
    }
    assert!(
        read_ok * 5 >= packages.len() * 4,
        "only {read_ok} of the {} locked registry crates are unpacked under {sources:?}: \
         run `cargo fetch` first",
        packages.len()
    );
    let (_, v, by) = highest.expect("some locked crate declares a rust-version");
    (v, by)
}

#[test]
fn workspace_and_readme_name_the_rust_version_the_lock_needs() {
    let (needed, by) = highest_locked_rust_version();
    let root = read(&workspace().join("Cargo.toml"));
    let declared = manifest_value(&root, "workspace.package", "rust-version")
        .expect("[workspace.package] rust-version in Cargo.toml");
    assert_eq!(
        version_key(&declared),
        version_key(&needed),
        "the workspace declares rust-version {declared}, the locked crates need {needed} ({by})"
    );
    let text = readme();
    assert!(
        text.contains(&format!("Rust {declared} or newer")),
        "the README should say `Rust {declared} or newer`"
    );
    assert!(
        text.contains("rustup update stable"),
        "the README should say how to update the toolchain (`rustup update stable`)"
    );
}

// ---------------------------------------------------------------------------------------------
// Data layout

/// The path patterns of the README's "Data layout" block (the first word of each line that
/// does not continue the description above it).
fn readme_layout() -> Vec<String> {
    let text = readme();
    let start = text
        .find("## Data layout")
        .expect("README has a `## Data layout` section");
    let block = text[start..]
        .split("```")
        .nth(1)
        .expect("a code block in the Data layout section");
    block
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether `c` may stand for `<name>` in a pattern.
fn placeholder_char(name: &str, c: char) -> bool {
    match name {
        "row" => c.is_ascii_digit(),
        "hash" | "tag" => c.is_ascii_hexdigit(),
        "run" | "chunk" => c.is_ascii_alphanumeric() || c == '-',
        _ => c != '/',
    }
}

/// Glob match: `<name>` and `*` stand for one or more characters of one path segment, `...`
/// for the rest of the path, and a trailing `/` for anything under that folder.
fn matches(pattern: &str, path: &str) -> bool {
    if pattern.is_empty() {
        return path.is_empty();
    }
    if pattern == "..." {
        return !path.is_empty();
    }
    if pattern == "/" {
        return path.len() > 1 && path.starts_with('/');
    }
    let (name, rest) = if let Some(p) = pattern.strip_prefix('<') {
        match p.split_once('>') {
            Some((n, r)) => (Some(n), r),
            None => (None, pattern),
        }
    } else if let Some(r) = pattern.strip_prefix('*') {
        (Some(""), r)
    } else {
        (None, pattern)
    };
    match name {
        Some(name) => {
            for (i, c) in path.char_indices() {
                if !placeholder_char(name, c) {
                    break;
                }
                if matches(rest, &path[i + c.len_utf8()..]) {
                    return true;
                }
            }
            false
        }
        None => {
            let mut pc = pattern.chars();
            let first = pc.next().expect("non-empty");
            path.starts_with(first) && matches(pc.as_str(), &path[first.len_utf8()..])
        }
    }
}

/// Every file under `root`, as keys relative to it.
fn files_under(root: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                let rel = p.strip_prefix(root).expect("under root");
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn users_csv(ids: impl Iterator<Item = usize>, suffix: &str) -> String {
    let mut s = String::from("id,name,email,plan\n");
    for i in ids {
        let plan = ["Free", "Pro"][i % 2];
        s.push_str(&format!(
            "u-{i:04},User {i}{suffix},user{i}@example.com,{plan}\n"
        ));
    }
    s.push_str("u-bad,Bad Email,not-an-email,Pro\n");
    s
}

fn orgs_csv(n: usize) -> String {
    let mut s = String::from("id,name\n");
    for i in 0..n {
        s.push_str(&format!("o-{i:04},Org {i}\n"));
    }
    s
}

#[tokio::test]
async fn the_data_layout_names_the_files_a_run_writes() {
    let patterns = readme_layout();
    assert!(patterns.len() >= 10, "layout block: {patterns:?}");

    // Real runs against the simulator: users with a custom field twice (invalid rows, changed
    // and removed keys), organizations once (`create_many`, journaled).
    let e = E2e::start().await;
    let mapping = "name = \"name\"\nemail = \"email\"\n\
                   \"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }";
    let users = e.toml("people", "users", "upsert", "id", mapping);
    e.write_export("people", &users_csv(0..250, ""));
    let first = e.run(&users).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    e.write_export("people", &users_csv(20..250, " (renamed)"));
    let second = e.run(&users).await;
    assert!(second.error.is_none(), "{:?}", second.error);
    let orgs = e.toml("firms", "organizations", "upsert", "id", "name = \"name\"");
    e.write_export("firms", &orgs_csv(120));
    let third = e.run(&orgs).await;
    assert!(third.error.is_none(), "{:?}", third.error);
    let run = only_record(&second).run_id.clone();

    let written: BTreeSet<String> = files_under(e.root())
        .into_iter()
        .filter(|k| k != "creds.json") // the harness's credentials, not the layout's
        .collect();
    // The runs wrote each kind of file the layout test is about.
    for (kind, suffix) in [
        ("field definitions", "/fields.json"),
        ("batch outcomes", "-0000.jsonl"),
        ("batch journal", ".job.json"),
        ("invalid rows", "/invalid.jsonl"),
        ("removed keys", "/removed.jsonl.zst"),
    ] {
        let found = written.iter().any(|k| match kind {
            "batch outcomes" => k.contains("/results/") && k.ends_with(".jsonl"),
            _ => k.ends_with(suffix),
        });
        assert!(
            found,
            "the runs should have written {kind} ({suffix}): {written:#?}"
        );
    }
    // Every file a run wrote is named by a file pattern (a folder mention is not enough).
    for key in &written {
        assert!(
            patterns
                .iter()
                .any(|p| !p.ends_with('/') && matches(p, key)),
            "the run wrote `{key}`, which no line of the README's Data layout names: {patterns:#?}"
        );
    }

    // Keys a local run does not leave behind (the lock is released; the rest is the AWS
    // deployment's or an audience's), as layout.rs makes them.
    let chunk = "create-000000";
    let made = [
        layout::lock_key("people"),
        layout::config_key("people"),
        layout::pending_trigger_key("people"),
        layout::trigger_marker_key("people", "exports/people/part-0000.csv", "\"etag\""),
        layout::chunk_list_key("people", &run),
        layout::membership_key("people", &run),
        layout::batch_stats_key("people", &run, chunk, &zdsync::run::new_run_id()),
        layout::batch_journal_key("people", &run, chunk, "r000100-3f9a"),
        layout::batch_results_key("people", &run, chunk, "r000100-3f9a"),
        layout::fields_key("people"),
        layout::state_key("people"),
        layout::manifest_key("people", &run),
        layout::chunk_key("people", &run, "update", 3),
        layout::invalid_key("people", &run),
        layout::removed_key("people", &run),
        layout::run_record_key("people", &run),
        layout::history_key("people", &run),
        "map-results/0f3c/manifest.json".to_string(), // the Distributed Map's ResultWriter prefix
    ];
    for key in &made {
        assert!(
            patterns.iter().any(|p| matches(p, key)),
            "layout.rs makes `{key}`, which no line of the README's Data layout names"
        );
    }
    let asl = std::fs::read_to_string(workspace().join("statemachine/sync.asl.json"))
        .expect("the state machine definition");
    assert!(asl.contains("\"Prefix\": \"map-results\""));

    // And every line of the block names something real.
    for p in &patterns {
        assert!(
            written.iter().chain(&made).any(|k| matches(p, k)),
            "the README's Data layout lists `{p}`, which no run writes and layout.rs does not make \
             (written: {written:#?})"
        );
    }
}

#[test]
fn layout_patterns_match_as_meant() {
    assert!(matches(
        "runs/<sync>/<run>/results/<chunk>/r<row>-<tag>.jsonl",
        "runs/a/20261206T120000Z-3f9a/results/create-000001/r000100-b5a4.jsonl"
    ));
    assert!(!matches(
        "runs/<sync>/<run>/results/<chunk>/r<row>-<tag>.jsonl",
        "runs/a/r/results/create-000001/r000100-b5a4.job.json"
    ));
    assert!(!matches(
        "runs/<sync>/<run>/results/<chunk>/r<row>-<tag>.jsonl",
        "runs/a/r/results/create-000001/b0001.jsonl"
    ));
    assert!(matches("exports/<sync>/...", "exports/a/part-0000.csv"));
    assert!(matches("map-results/", "map-results/x/y.json"));
    assert!(!matches("locks/<sync>.json", "locks/a/b.json"));
    assert!(matches(
        "runs/<sync>/<run>/chunks/*.jsonl.zst",
        "runs/a/r/chunks/create-000000.jsonl.zst"
    ));
}
