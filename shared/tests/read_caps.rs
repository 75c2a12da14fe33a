//! The caps on what one run reads from its export (`source.max_rows_read`,
//! `source.max_bytes_read`) through the planners: a multi-part export over the cap stops the
//! plan in the part that crossed it, leaves no change set, and ends the run as
//! `ExportTooLarge` (exit 9).

use std::io::Write;
use zdsync::config::SyncConfig;
use zdsync::errors::{exit, ErrorName, RunError};
use zdsync::export::{ExportError, ReadCap};
use zdsync::pipeline::plan_changes;
use zdsync::plan::{PlanError, PlanOptions, PlanReport};
use zdsync::store::{LocalStore, ObjectStore};

fn config(mode: &str, source: &str) -> SyncConfig {
    let body = if mode == "mirror" {
        "[audience]\ntag = \"vip\"\n".to_string()
    } else {
        "[mapping]\nname = \"name\"\nemail = \"email\"\n".to_string()
    };
    let text = format!(
        "name = \"people\"\nobject = \"users\"\nmode = \"{mode}\"\nprimary_key = \"id\"\n\n\
         [source]\nlocation = \"exports/people/\"\n{source}\n\n[zendesk]\nsubdomain = \"acme\"\n\n{body}"
    );
    SyncConfig::parse(&text, "config/people.toml").unwrap()
}

/// Three gzip parts of 40 users each.
fn export(store: &LocalStore) {
    for part in 0..3 {
        let mut csv = String::from("id,name,email\n");
        for i in 0..40 {
            let n = part * 40 + i;
            csv.push_str(&format!("p{n},Person {n},p{n}@example.com\n"));
        }
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(csv.as_bytes()).unwrap();
        store
            .put(
                &format!("exports/people/part-{part}.csv.gz"),
                &z.finish().unwrap(),
            )
            .unwrap();
    }
}

fn plan(store: &LocalStore, cfg: &SyncConfig, run: &str) -> Result<PlanReport, PlanError> {
    plan_changes(store, cfg, &PlanOptions::new(run))
}

fn files_under(store: &LocalStore, prefix: &str) -> usize {
    store.list(prefix).map(|l| l.len()).unwrap_or(0)
}

#[test]
fn max_rows_read_stops_a_plan_in_the_part_that_crosses_it() {
    for mode in ["upsert", "mirror"] {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        export(&store);

        // 100 rows: parts 0 and 1 (80 rows) pass, part 2 crosses at its 21st row.
        let cfg = config(mode, "max_rows_read = 100");
        let err = plan(&store, &cfg, "run-1").expect_err("over the row cap");
        let PlanError::Export(ExportError::TooLarge { file, exceeded }) = &err else {
            panic!("{mode}: not the cap error: {err}");
        };
        assert_eq!(file, "exports/people/part-2.csv.gz", "{mode}");
        assert_eq!(
            (exceeded.cap, exceeded.read, exceeded.max),
            (ReadCap::Rows, 101, 100)
        );
        let msg = err.to_string();
        for says in [
            "stopped reading export file `exports/people/part-2.csv.gz`",
            "this run has read 101 rows",
            "more than its cap of 100 rows (`source.max_rows_read`)",
            "nothing was written to Zendesk",
            "Check the export",
            "raise `source.max_rows_read` in config/people.toml",
        ] {
            assert!(msg.contains(says), "{mode}: `{says}` not in: {msg}");
        }
        // No change set is left behind: no manifest, no chunk, no invalid rows.
        assert_eq!(files_under(&store, "runs/"), 0, "{mode}");
        // The run ends with its own name and exit code.
        let run_err = RunError::from(err);
        assert_eq!(run_err.error_name(), ErrorName::ExportTooLarge);
        assert!(!run_err.error_name().retryable());
        assert_eq!(run_err.error_name().exit_code(), exit::EXPORT_TOO_LARGE);
        assert_eq!(exit::EXPORT_TOO_LARGE, 9);

        // At the cap exactly the plan reads every row.
        let cfg = config(mode, "max_rows_read = 120");
        let report = plan(&store, &cfg, "run-2").unwrap();
        assert_eq!(report.manifest.counts.rows_read, 120, "{mode}");
    }
}

#[test]
fn max_bytes_read_counts_every_part_of_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    export(&store);
    // Each part is about 1.2 KB decoded: 3 KB lets two through and stops in the third.
    let cfg = config("upsert", "max_bytes_read = \"3KB\"");
    let err = plan(&store, &cfg, "run-1").expect_err("over the byte cap");
    let PlanError::Export(ExportError::TooLarge { file, exceeded }) = &err else {
        panic!("not the cap error: {err}");
    };
    assert_eq!(file, "exports/people/part-2.csv.gz");
    assert_eq!((exceeded.cap, exceeded.max), (ReadCap::Bytes, 3000));
    let msg = err.to_string();
    assert!(
        msg.contains("more than its cap of 3000 bytes (2.9 KiB, `source.max_bytes_read`)")
            && msg.contains("raise `source.max_bytes_read` in config/people.toml"),
        "{msg}"
    );
    assert_eq!(files_under(&store, "runs/"), 0);
    assert_eq!(RunError::from(err).error_name(), ErrorName::ExportTooLarge);
    // The default caps read it all.
    let report = plan(&store, &config("upsert", ""), "run-2").unwrap();
    assert_eq!(report.manifest.counts.rows_read, 120);
}
