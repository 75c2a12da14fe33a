//! The `zdsync` binary as a user runs it, on the example shipped in examples/.

mod common;

use common::zdsync;
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "runs" && e.file_name() != "state" {
                copy_dir(&e.path(), &target);
            }
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn an_offline_preview_of_the_example_is_labelled_approximate_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), dir.path());
    let out = zdsync()
        .args(["plan", "crm_users.toml", "--offline"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "preview, APPROXIMATE",
        "option labels are counted as written",
        "rows read             14",
        "invalid                7",
        "to create              7",
        "duplicate_primary_key          2",
        "\"alan@example\" is not an email address",
        "nothing written",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn a_preview_without_reachable_credentials_stops_and_names_the_offline_way() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), dir.path());
    // The example reads its API token from the environment; there is none here.
    let out = zdsync()
        .args(["plan", "crm_users.toml", "--dry-run"])
        .current_dir(dir.path())
        .env_remove("ZENDESK_API_TOKEN")
        .env_remove("ZENDESK_ACCESS_TOKEN")
        .env_remove("ZENDESK_EMAIL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("--offline"), "{err}");
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn the_offline_json_report_counts_and_lists_the_records() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), dir.path());
    let out = zdsync()
        .args([
            "plan",
            "crm_users.toml",
            "--offline",
            "--json",
            "--records",
            "records.jsonl",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["manifest"]["counts"]["create"], 7);
    assert!(report["manifest_key"].is_null());
    assert!(report["approximate"].is_string());
    assert_eq!(report["records"], 7);
    let lines = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 7);
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn a_bad_config_fails_with_its_line_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "name = \"x\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"id\"\n[source]\nlocation = \"e/\"\n[zendesk]\nsubdomain = \"a\"\n[mapping]\nname = \"n\"\nemail = \"e\"\nsubject = \"s\"\n",
    )
    .unwrap();
    let out = zdsync().args(["plan"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 12") && err.contains("no field `subject`"),
        "{err}"
    );
}

#[test]
fn a_config_in_the_bucket_layout_must_name_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), dir.path());
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::copy(
        dir.path().join("crm_users.toml"),
        dir.path().join("config/contacts.toml"),
    )
    .unwrap();
    let out = zdsync()
        .args(["plan", "config/contacts.toml", "--offline"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config/crm_users.toml"), "{err}");
}

#[test]
fn help_documents_every_command_and_flag() {
    let out = zdsync().args(["plan", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--offline",
        "--records",
        "--full-resync",
        "--max-rows",
        "--store",
        "--json",
        "--samples",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}
