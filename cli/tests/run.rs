//! `zdsync demo`, `run` and `history` as a user runs them: the binary against a simulator this
//! test starts on 127.0.0.1 (or the demo's own), checking output and exit codes.

mod common;

use common::{text, zdsync};
use std::path::Path;
use std::process::Command;
use zdsync::errors::ErrorName;
use zdsync_sim::{SimConfig, Simulator};

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
        t.contains(ErrorName::AuthFailed.as_str()) && t.contains("not the account password"),
        "{t}"
    );
    assert!(!t.contains("not-the-token"), "the token leaked: {t}");
    assert_eq!(sim.counters().jobs_created, 0);

    // No credentials file yet: exit 6, naming the file it looked for and the exact command
    // that stores credentials there.
    let fresh = tempfile::tempdir().unwrap();
    let cfg_fresh = setup(fresh.path(), &base, "x");
    std::fs::remove_file(fresh.path().join("creds.json")).unwrap();
    let out = zdsync().arg("run").arg(&cfg_fresh).output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(6), "{t}");
    let wanted = fresh.path().join("creds.json");
    assert!(
        t.contains(&wanted.display().to_string())
            && t.contains(&format!("zdsync connect --config {}", cfg_fresh.display())),
        "{t}"
    );

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

/// A gzip bomb in the export (a 20 KB part that expands to 10 MB) against a 1 MiB
/// `max_bytes_read`: the run stops in its plan with `ExportTooLarge`, exit 9, before a single
/// write to Zendesk, and its run record says why (the part, the cap, the fix).
#[test]
fn a_gzip_bomb_over_max_bytes_read_fails_the_run_before_any_write() {
    use std::io::Write;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(Simulator::start(SimConfig::default())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = setup(root, &sim.base_url(), zdsync_sim::DEFAULT_API_TOKEN);
    let toml = std::fs::read_to_string(&cfg).unwrap().replace(
        "location = \"exports/people/\"\n",
        "location = \"exports/people/\"\nmax_bytes_read = \"1MiB\"\n",
    );
    write(&cfg, &toml);
    let mut bomb = Vec::with_capacity(10 << 20);
    bomb.extend_from_slice(b"ID,NAME,EMAIL\n");
    while bomb.len() < 10_000_000 {
        bomb.extend_from_slice(b"p9,Same Person Again,same@example.com\n");
    }
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&bomb).unwrap();
    let gz = z.finish().unwrap();
    assert!(gz.len() < 100_000, "{}", gz.len());
    std::fs::write(root.join("exports/people/part-1.csv.gz"), &gz).unwrap();

    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(zdsync::errors::exit::EXPORT_TOO_LARGE as i32),
        "{t}"
    );
    assert_eq!(zdsync::errors::exit::EXPORT_TOO_LARGE, 9);
    for says in [
        "stopped reading export file `exports/people/part-1.csv.gz`",
        "more than its cap of 1048576 bytes (1.0 MiB, `source.max_bytes_read`)",
        "nothing was written to Zendesk",
        "raise `source.max_bytes_read` in",
    ] {
        assert!(t.contains(says), "`{says}` not in: {t}");
    }
    // Nothing reached Zendesk: no job, no write request, no user.
    let c = sim.counters();
    assert_eq!(c.jobs_created, 0, "{c:?}");
    assert_eq!(zdsync_tests::write_requests(&c), 0, "{c:?}");
    let state = sim.state("acme").unwrap();
    assert!(state.user_by_external_id("p1").is_none());
    assert!(state.user_by_external_id("p9").is_none());
    // No state and no change set: the run record is all the run left.
    assert!(!root.join(zdsync::layout::state_key("people")).exists());
    let runs: Vec<_> = std::fs::read_dir(root.join("runs/people"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let files: Vec<String> = std::fs::read_dir(&runs[0])
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["run.json"], "only the record: {files:?}");
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runs[0].join("run.json")).unwrap()).unwrap();
    assert_eq!(rec["status"], "failed", "{rec:#}");
    assert_eq!(
        rec["error"]["name"],
        ErrorName::ExportTooLarge.as_str(),
        "{rec:#}"
    );
    let message = rec["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("exports/people/part-1.csv.gz")
            && message.contains("`source.max_bytes_read`")
            && message.contains(&format!("in {}", cfg.display())),
        "{message}"
    );
    assert_eq!(rec["rows"]["created"], 0, "{rec:#}");
    let out = zdsync().arg("history").arg(&cfg).output().unwrap();
    let t = text(&out);
    assert!(t.contains("failed: ExportTooLarge"), "{t}");
    rt.block_on(sim.shutdown());
}

/// Ctrl-C in the middle of a run: nothing new is sent, the jobs in flight finish, the run is
/// recorded `interrupted`, its lock released, exit 130. The next run finishes it first (the
/// interrupted run's record then holds both parts) and records only its own work; every
/// ticket exists exactly once.
#[test]
fn ctrl_c_records_an_interrupted_run_that_the_next_run_finishes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = SimConfig::default();
    cfg.jobs.queued_ms = 150;
    cfg.jobs.working_ms = 150;
    let sim = rt.block_on(Simulator::start(cfg)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        &root.join("creds.json"),
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
    let n = 3000;
    let mut csv = String::from("ID,SUBJECT,BODY\n");
    for i in 0..n {
        csv.push_str(&format!("t{i},Subject {i},Body {i}\n"));
    }
    write(&root.join("exports/tix/part-0.csv"), &csv);
    let toml = |rpm: u32| {
        format!(
            "name = \"tix\"\nobject = \"tickets\"\nmode = \"insert\"\nprimary_key = \"ID\"\n\n[source]\nlocation = \"exports/tix/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"file:creds.json\"\nrate_limit_rpm = {rpm}\n\n[mapping]\nsubject = \"SUBJECT\"\ndescription = \"BODY\"\n",
            sim.base_url()
        )
    };
    let cfg_path = root.join("tix.toml");
    // Slow enough (two requests a second) to be stopped halfway.
    write(&cfg_path, &toml(120));
    let child = zdsync()
        .arg("run")
        .arg(&cfg_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while sim.counters().jobs_created < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(130), "{t}");
    assert!(t.contains("interrupted"), "{t}");
    assert!(
        !root.join(zdsync::layout::lock_key("tix")).exists(),
        "the lock was released"
    );
    let first_id = std::fs::read_dir(root.join("runs/tix"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let rec_path = root.join(zdsync::layout::run_record_key("tix", &first_id));
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!(first["status"], "interrupted", "{first:#}");
    let first_sent = first["requests"]["sent"].as_u64().unwrap();
    let created_before = sim.state("acme").unwrap().tickets.len();
    assert!(created_before > 0 && created_before < n, "{created_before}");

    // The next run, at full speed: finishes the first, then does its own (nothing left).
    write(&cfg_path, &toml(0));
    let before = sim.counters().requests;
    let out = zdsync().arg("run").arg(&cfg_path).output().unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("first finished run {first_id}")), "{t}");
    let used = sim.counters().requests - before;
    let first: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec_path).unwrap()).unwrap();
    assert_eq!(first["status"], "succeeded", "{first:#}");
    assert_eq!(first["resumed"], true);
    let mut runs: Vec<String> = std::fs::read_dir(root.join("runs/tix"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    runs.sort();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let second_id = runs.iter().find(|r| **r != first_id).unwrap();
    let second: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join(zdsync::layout::run_record_key("tix", second_id))).unwrap(),
    )
    .unwrap();
    assert_eq!(second["resumed_run"], first_id.as_str(), "{second:#}");
    // Each record holds its own requests: the resumed part plus the new run's are what the
    // second process sent.
    let resumed_part = first["requests"]["sent"].as_u64().unwrap() - first_sent;
    let own = second["requests"]["sent"].as_u64().unwrap();
    assert_eq!(resumed_part + own, used, "{first:#}\n{second:#}");
    assert_eq!(second["rows"]["created"], 0, "{second:#}");
    let tickets = sim.state("acme").unwrap().tickets;
    assert_eq!(tickets.len(), n, "every ticket once");
    let mut keys: Vec<&str> = tickets
        .iter()
        .filter_map(|t| t["external_id"].as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n);
    rt.block_on(sim.shutdown());
}

/// A Zendesk that cannot be reached (nothing listens at the configured address) fails the run
/// in about a second, naming the address it tried and the settings to check, before any write.
#[test]
fn an_unreachable_zendesk_fails_fast_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let cfg = setup(dir.path(), &base, "whatever");
    let started = std::time::Instant::now();
    let out = zdsync().arg("run").arg(&cfg).output().unwrap();
    let took = started.elapsed();
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(ErrorName::ZendeskUnavailable.exit_code() as i32),
        "{t}"
    );
    assert!(
        took < std::time::Duration::from_secs(3),
        "took {took:?}: {t}"
    );
    assert!(
        t.contains(&format!("127.0.0.1:{port}")),
        "names the address: {t}"
    );
    assert!(t.contains("base_url"), "names the setting: {t}");
    assert!(!dir.path().join("state").exists(), "nothing folded");
}

/// An export that is not where the config says: the error names the folder it looked in and the
/// flag that sets it.
#[test]
fn a_missing_export_names_the_folder_it_looked_in() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "http://127.0.0.1:9", "whatever");
    std::fs::remove_dir_all(dir.path().join("exports")).unwrap();
    let out = zdsync()
        .arg("plan")
        .arg(&cfg)
        .arg("--offline")
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(3), "{t}");
    let root = std::fs::canonicalize(dir.path()).unwrap();
    assert!(
        t.contains(&root.display().to_string()),
        "names the folder: {t}"
    );
    assert!(t.contains("--store"), "names the flag: {t}");
}
