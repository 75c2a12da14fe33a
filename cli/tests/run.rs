//! `zdsync demo`, `run` and `history` as a user runs them: the binary against a simulator this
//! test starts on 127.0.0.1 (or the demo's own), checking output and exit codes.

use std::path::Path;
use std::process::{Command, Output};
use zdsync_sim::{SimConfig, Simulator};

fn zdsync() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zdsync"));
    c.env_remove("ZENDESK_API_TOKEN")
        .env_remove("ZENDESK_ACCESS_TOKEN")
        .env_remove("ZDSYNC_STORE")
        .env("CI", "1");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn demo_syncs_twice_and_reports_both_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out = zdsync()
        .args(["demo", "--rows", "300", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // Round 1 creates everything valid; round 2 sends only what changed.
    assert!(t.contains("sync demo_users (users, upsert)"), "{t}");
    assert!(t.contains("created              300"), "{t}");
    assert!(t.contains("invalid                5"), "{t}");
    assert!(t.contains("unchanged            290"), "{t}");
    assert!(t.contains("valid user rows missing in Zendesk: 0"), "{t}");
    assert!(t.contains("\"Platinum\" is not an option"), "{t}");
    // Its bucket folder holds the run records `zdsync history` lists.
    let cfg = dir.path().join("config/demo_users.toml");
    let out = zdsync().arg("history").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert_eq!(t.matches(" demo ").count(), 2, "{t}");
}

fn write(path: &Path, s: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, s).unwrap();
}

fn setup(dir: &Path, base: &str, token: &str) -> std::path::PathBuf {
    write(
        &dir.join("creds.json"),
        &format!("{{\"email\":\"admin@acme.test\",\"api_token\":\"{token}\"}}"),
    );
    let cfg = dir.join("people.toml");
    write(
        &cfg,
        &format!(
            "name = \"people\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"ID\"\n\n[source]\nlocation = \"exports/people/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{base}\"\ncredentials = \"file:creds.json\"\n\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n"
        ),
    );
    write(
        &dir.join("exports/people/part-0.csv"),
        "ID,NAME,EMAIL\np1,Ann,ann@example.com\np2,Bob,bob@example.com\np3,Bad,not-an-email\n",
    );
    cfg
}

#[test]
fn run_exit_codes_tell_failed_runs_from_failed_rows() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(Simulator::start(SimConfig::default())).unwrap();
    let base = sim.base_url();

    // A refused credential: exit 6 before any write, the message says what to fix.
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), &base, "not-the-token");
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(6), "{t}");
    assert!(
        t.contains("AuthFailed") && t.contains("not the account password"),
        "{t}"
    );
    assert!(!t.contains("not-the-token"), "the token leaked: {t}");
    assert_eq!(sim.counters().jobs_created, 0);

    // A run whose rows all went through except a refused one: exit 1, "completed with failures".
    let cfg = setup(dir.path(), &base, zdsync_sim::DEFAULT_API_TOKEN);
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("completed with failures"), "{t}");
    assert!(t.contains("created                2"), "{t}");
    let state = sim.state("acme").unwrap();
    assert!(state.user_by_external_id("p1").is_some());
    assert!(state.user_by_external_id("p2").is_some());

    // Nothing changed and the bad row fixed: exit 0, one row sent.
    write(
        &dir.path().join("exports/people/part-0.csv"),
        "ID,NAME,EMAIL\np1,Ann,ann@example.com\np2,Bob,bob@example.com\np3,Cy,cy@example.com\n",
    );
    let out = zdsync().args(["run", "--json"]).arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let records: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(records[0]["status"], "succeeded");
    assert_eq!(records[0]["rows"]["created"], 1);
    assert_eq!(records[0]["rows"]["unchanged"], 2);

    // A second run while one holds the lock: exit 7.
    let lock = serde_json::json!({
        "sync": "people", "run_id": "held", "host": zdsync::lock::host_name(),
        "pid": std::process::id(), "acquired_at": "now",
        "expires_at": chrono::Utc::now().timestamp() + 600,
    });
    write(&dir.path().join("locks/people.json"), &lock.to_string());
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(7), "{t}");
    assert!(t.contains("already running"), "{t}");

    let out = zdsync().arg("history").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert!(t.contains("failed: AuthFailed"), "{t}");
    assert!(t.contains("completed with failures"), "{t}");
    rt.block_on(sim.shutdown());
}
