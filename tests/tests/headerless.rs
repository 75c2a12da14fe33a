//! Headerless CSV exports end to end, against the simulator: a Redshift `UNLOAD` without
//! `HEADER` writes pipe-delimited (`|`) lines with no header line and NULL as an empty field
//! (unless `NULL AS` is given; with the `CSV` option it writes commas and quotes instead). The
//! column names then come from the schema of a `MANIFEST VERBOSE` manifest, or from
//! `columns = [...]` in the sync config; with neither the run stops before any write.

use std::io::Write;
use std::path::Path;
use zdsync::config::SyncConfig;
use zdsync::errors::ErrorName;
use zdsync::plan::{plan, PlanOptions};
use zdsync::run::RunStatus;
use zdsync::store::LocalStore;
use zdsync_tests::{only_record, write_requests, E2e};

/// The unload's columns, in the order of its SELECT list.
const COLUMNS: [&str; 4] = ["user_id", "full_name", "email", "phone"];

/// Row `i` of the unload as Redshift writes it: `|` between fields, NULL as an empty field.
fn line(i: usize) -> String {
    let phone = if i.is_multiple_of(4) {
        String::new()
    } else {
        format!("+1555{i:07}")
    };
    format!("u-{i:04}|User {i}|USER{i}@EXAMPLE.COM|{phone}\n")
}

fn gzip(text: &str) -> Vec<u8> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(text.as_bytes()).unwrap();
    z.finish().unwrap()
}

/// `UNLOAD ('select user_id, full_name, email, phone from crm.users') TO 's3://bucket/<dir>/users_'
/// ... MANIFEST [VERBOSE] GZIP`: two slices of `n` rows between them, and `<dir>/users_manifest`
/// (with the schema when `verbose`).
fn write_unload(root: &Path, dir: &str, n: usize, verbose: bool) {
    let slices: [Vec<usize>; 2] = [
        (0..n).filter(|i| i.is_multiple_of(2)).collect(),
        (0..n).filter(|i| i % 2 == 1).collect(),
    ];
    let mut entries = Vec::new();
    for (s, rows) in slices.iter().enumerate() {
        let key = format!("{dir}/users_{s:04}_part_00.gz");
        let body = gzip(&rows.iter().map(|&i| line(i)).collect::<String>());
        let path = root.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &body).unwrap();
        entries.push(serde_json::json!({
            "url": format!("s3://warehouse-exports/{key}"),
            "meta": {"content_length": body.len(), "record_count": rows.len()},
        }));
    }
    let mut manifest = serde_json::json!({
        "entries": entries,
        "meta": {"content_length": 0, "record_count": n},
        "author": {"name": "Amazon Redshift", "version": "1.0.0"},
    });
    if verbose {
        manifest["schema"] = serde_json::json!({"elements": [
            {"name": "user_id", "type": {"base": "character varying", "max_length": 32}},
            {"name": "full_name", "type": {"base": "character varying", "max_length": 256}},
            {"name": "email", "type": {"base": "character varying", "max_length": 256}},
            {"name": "phone", "type": {"base": "character varying", "max_length": 32}},
        ]});
        manifest["cdt"] = serde_json::json!("2024-05-01T10:00:00Z");
    }
    zdsync_tests::write_file(
        root,
        &format!("{dir}/users_manifest"),
        &serde_json::to_string_pretty(&manifest).unwrap(),
    );
}

/// A users upsert reading `<dir>/users_manifest` without a header line; `columns` is the TOML
/// of the `columns` key, or empty.
fn sync_toml(e: &E2e, name: &str, dir: &str, columns: &str) -> String {
    let toml = zdsync_tests::sync_toml(
        name,
        "users",
        "upsert",
        "USER_ID",
        &e.sim.base_url(),
        "name = \"FULL_NAME\"\nemail = \"EMAIL\"\nphone = \"PHONE\"",
    );
    toml.replace(
        &format!("location = \"exports/{name}/\"\n"),
        &format!(
            "location = \"{dir}/users_manifest\"\ndelimiter = \"|\"\nheader = false\n{columns}\n"
        ),
    )
}

fn parse(toml: &str) -> SyncConfig {
    SyncConfig::parse(toml, "sync.toml").unwrap_or_else(|e| panic!("config: {e}\n{toml}"))
}

/// Every row of the unload is in Zendesk with its values; a NULL phone is no phone.
fn assert_landed(e: &E2e, n: usize) {
    let state = e.state();
    for i in 0..n {
        let u = state
            .user_by_external_id(&format!("u-{i:04}"))
            .unwrap_or_else(|| panic!("u-{i:04} not in Zendesk"));
        assert_eq!(u["name"], format!("User {i}"));
        assert_eq!(u["email"], format!("user{i}@example.com"));
        if i.is_multiple_of(4) {
            assert!(u["phone"].is_null(), "{u}");
        } else {
            assert_eq!(u["phone"], format!("+1555{i:07}"));
        }
    }
}

async fn run_and_check(e: &E2e, toml: &str, n: usize) {
    let outcome = e.run(toml).await;
    assert!(outcome.error.is_none(), "{:?}", outcome.error);
    let rec = only_record(&outcome);
    assert_eq!(rec.status, RunStatus::Succeeded, "{rec:#?}");
    let r = &rec.rows;
    assert_eq!(
        (r.read, r.invalid, r.created, r.failed),
        (n as u64, 0, n as u64, 0)
    );
    assert_landed(e, n);
    // The same unload again: nothing to send.
    let before = write_requests(&e.counters());
    let again = e.run(toml).await;
    let rec = only_record(&again);
    assert_eq!(rec.status, RunStatus::Succeeded);
    assert_eq!((rec.rows.unchanged, rec.rows.created), (n as u64, 0));
    assert_eq!(write_requests(&e.counters()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verbose_manifest_names_the_columns_of_a_headerless_unload() {
    let e = E2e::start().await;
    let n = 230;
    write_unload(e.root(), "unload/crm_users", n, true);
    let toml = sync_toml(&e, "rs_verbose", "unload/crm_users", "");

    // The plan alone (into a copy of the bucket): every line is a row, none is a header.
    let scratch = tempfile::tempdir().unwrap();
    write_unload(scratch.path(), "unload/crm_users", n, true);
    let store = LocalStore::new(scratch.path());
    let report = plan(&store, &parse(&toml), &PlanOptions::new("r-plan")).unwrap();
    let c = &report.manifest.counts;
    assert_eq!((c.rows_read, c.invalid, c.create), (n as u64, 0, n as u64));
    let parts: Vec<&str> = report
        .manifest
        .parts
        .iter()
        .map(|p| p.key.as_str())
        .collect();
    assert_eq!(
        parts,
        [
            "unload/crm_users/users_0000_part_00.gz",
            "unload/crm_users/users_0001_part_00.gz"
        ]
    );

    run_and_check(&e, &toml, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_in_the_config_name_a_headerless_unload_without_a_schema() {
    let e = E2e::start().await;
    let n = 170;
    write_unload(e.root(), "unload/plain", n, false);
    // Any case: names match the mapping case-insensitively.
    let columns = format!(
        "columns = [{}]",
        COLUMNS
            .iter()
            .map(|c| format!("\"{}\"", c.to_uppercase()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let toml = sync_toml(&e, "rs_columns", "unload/plain", &columns);
    run_and_check(&e, &toml, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headerless_without_names_fails_before_any_write() {
    let e = E2e::start().await;
    write_unload(e.root(), "unload/plain", 40, false);
    let toml = sync_toml(&e, "rs_nameless", "unload/plain", "");
    let outcome = e.run(&toml).await;
    let err = outcome.error.as_ref().expect("refused");
    assert_eq!(err.error_name(), ErrorName::ExportUnreadable, "{err}");
    let msg = err.to_string();
    for says in [
        "export `unload/plain/users_manifest` has no header line",
        "manifest `unload/plain/users_manifest` has no schema",
        "add `columns = [",
        "`HEADER`",
        "MANIFEST VERBOSE",
    ] {
        assert!(msg.contains(says), "`{says}` not in: {msg}");
    }
    let rec = only_record(&outcome);
    assert_eq!(rec.status, RunStatus::Failed);
    assert_eq!(
        rec.error.as_ref().unwrap().name,
        ErrorName::ExportUnreadable.as_str()
    );
    assert_eq!(write_requests(&e.counters()), 0);
    assert_eq!(e.counters().jobs_created, 0);
    assert!(e.state().user_by_external_id("u-0001").is_none());

    // A column count that disagrees with the manifest's schema is refused the same way.
    write_unload(e.root(), "unload/verbose", 40, true);
    let toml = sync_toml(
        &e,
        "rs_mismatch",
        "unload/verbose",
        r#"columns = ["user_id", "full_name", "email"]"#,
    );
    let outcome = e.run(&toml).await;
    let msg = outcome.error.as_ref().expect("refused").to_string();
    assert!(
        msg.contains("lists 3 columns (user_id, full_name, email)")
            && msg.contains("lists 4 (user_id, full_name, email, phone)"),
        "{msg}"
    );
    assert_eq!(write_requests(&e.counters()), 0);
}

#[test]
fn header_and_columns_are_checked_in_the_config() {
    let base = r#"name = "s"
object = "users"
mode = "update"
primary_key = "id"

[source]
location = "unload/users_manifest"
SOURCE

[zendesk]
subdomain = "acme"
"#;
    let with = |source: &str| SyncConfig::parse(&base.replace("SOURCE", source), "sync.toml");
    let err = |source: &str| with(source).unwrap_err().to_string();

    let ok = with("header = false\ncolumns = [\" id \", \"Email\"]").unwrap();
    assert!(!ok.source.read.header);
    assert_eq!(ok.source.read.columns, ["id", "Email"]);
    // Without columns: fine here, the manifest's schema is looked for when the run reads.
    let ok = with("header = false").unwrap();
    assert!(!ok.source.read.header && ok.source.read.columns.is_empty());
    assert!(with("").unwrap().source.read.header);

    let e = err("columns = [\"id\"]");
    assert!(
        e.contains("line 8")
            && e.contains("`source.columns`")
            && e.contains("add `header = false`"),
        "{e}"
    );
    let e = err("header = true\ncolumns = [\"id\"]");
    assert!(
        e.contains("line 9") && e.contains("add `header = false`"),
        "{e}"
    );
    let e = err("header = false\ncolumns = []");
    assert!(e.contains("`source.columns` is empty"), "{e}");
    let e = err("header = false\ncolumns = [\"id\", \" \"]");
    assert!(e.contains("entry 2 is empty"), "{e}");
    let e = err("header = false\ncolumns = [\"id\", \"email\", \"ID\"]");
    assert!(
        e.contains("names `ID` twice") && e.contains("entries 1 and 3"),
        "{e}"
    );
    let e = err("format = \"parquet\"\nheader = false");
    assert!(
        e.contains("`source.header = false` applies to CSV files only"),
        "{e}"
    );
}
