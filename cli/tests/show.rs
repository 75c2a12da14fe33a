//! `zdsync show`, `zdsync failed` and the order of `zdsync history`, as a user runs them: the
//! binary against a simulator this test starts on 127.0.0.1, checking output and exit codes.

mod common;

use common::{text, zdsync};
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use zdsync::export::{open_reader, Format, Next, ReadBudget, ReadOptions, Record, Value};
use zdsync::record::PROBLEM_COLUMNS;
use zdsync::store::LocalStore;
use zdsync_sim::{FaultKind, FaultRule, SimConfig, Simulator};

fn write(path: &Path, s: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, s).unwrap();
}

/// A sync config (`name`, users) against the simulator, with the credentials file beside it.
fn config(dir: &Path, base: &str, name: &str, mode: &str, extra: &str) -> PathBuf {
    write(
        &dir.join("creds.json"),
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
    let cfg = dir.join(format!("{name}.toml"));
    write(
        &cfg,
        &format!(
            "name = \"{name}\"\nobject = \"users\"\nmode = \"{mode}\"\nprimary_key = \"ID\"\n\n\
             [source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\n\
             base_url = \"{base}\"\ncredentials = \"file:creds.json\"\n{extra}"
        ),
    );
    cfg
}

/// `zdsync <args> <cfg>` (the config right after the command), its output and exit code.
fn run(args: &[&str], cfg: &Path, rest: &[&str]) -> (i32, String, String) {
    let out = zdsync()
        .arg(args[0])
        .arg(cfg)
        .args(&args[1..])
        .args(rest)
        .output()
        .unwrap();
    let t = text(&out);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        t,
    )
}

/// Parse a CSV file back with zdsync's own export reader (RFC 4180, quoted line breaks),
/// every column of the header, empty cells as empty strings.
fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let header = std::fs::read_to_string(path).unwrap();
    let first = header.lines().next().unwrap();
    assert_eq!(first, PROBLEM_COLUMNS.join(","), "the header line");
    let store = LocalStore::new(path.parent().unwrap());
    let columns: Vec<String> = PROBLEM_COLUMNS.iter().map(|c| c.to_string()).collect();
    let options = ReadOptions {
        format: Format::Csv,
        empty_as_null: false,
        null_values: Vec::new(),
        ..ReadOptions::default()
    };
    let key = path.file_name().unwrap().to_str().unwrap();
    let mut reader =
        open_reader(&store, key, &columns, &options, &ReadBudget::new(&options)).unwrap();
    let mut rows = Vec::new();
    let mut rec = Record::default();
    loop {
        match reader.next(&mut rec).unwrap() {
            Next::Record => rows.push(
                rec.values
                    .iter()
                    .map(|v| match v {
                        Value::Text(s) => s.clone(),
                        Value::Null => String::new(),
                        Value::List(l) => panic!("a list cell {l:?}"),
                    })
                    .collect(),
            ),
            Next::Malformed { line, reason } => panic!("line {line} malformed: {reason}"),
            Next::End => return rows,
        }
    }
}

fn col(name: &str) -> usize {
    PROBLEM_COLUMNS.iter().position(|c| *c == name).unwrap()
}

/// Every line of `zdsync show` fits 80 columns.
fn assert_narrow(out: &str) {
    for line in out.lines() {
        assert!(
            line.chars().count() <= 80,
            "{} columns: {line}\n{out}",
            line.chars().count()
        );
    }
}

/// The value after `label` on its line of `zdsync show`.
fn shown<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| {
            l.strip_prefix(label)
                .filter(|rest| rest.starts_with(' '))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"))
}

/// The path `zdsync show` lists for one of a run's files: after its label, or alone on the
/// next line when both do not fit 80 columns.
fn path_shown(out: &str, label: &str) -> String {
    let mut lines = out.lines();
    while let Some(l) = lines.next() {
        if let Some(rest) = l.strip_prefix(&format!("  {label}")) {
            if rest.is_empty() {
                return lines.next().unwrap().trim().to_string();
            }
            if rest.starts_with(' ') {
                return rest.trim().to_string();
            }
        }
    }
    panic!("no `{label}` path in:\n{out}")
}

/// The count on a `zdsync show` row line (`  failed   3  sent again next run`).
fn count(out: &str, label: &str) -> u64 {
    let line = shown(out, &format!("  {label}"));
    line.split_whitespace()
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap_or_else(|e| panic!("{label}: `{line}`: {e}\n{out}"))
}

/// A run in which Zendesk fails about half the users (its error has a comma, quotes and a
/// line break) and two rows are refused before sending: `show` reports it, `failed` lists
/// exactly those rows with their source lines, and the CSV parses back.
#[test]
fn show_and_failed_list_a_runs_failed_and_refused_rows() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(Simulator::start(SimConfig::default())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(
        root,
        &sim.base_url(),
        "people",
        "upsert",
        "\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n",
    );
    // Line n + 2 holds pn; line 12 a bad email, line 13 no key.
    let mut csv = String::from("ID,NAME,EMAIL\n");
    for n in 0..10 {
        csv.push_str(&format!("p{n},Person {n},p{n}@example.com\n"));
    }
    csv.push_str("p10,\"Bad, Email\",not-an-email\n");
    csv.push_str(",No Key,nokey@example.com\n");
    write(&root.join("exports/people/part-0.csv"), &csv);
    let mut rule = FaultRule::new(FaultKind::FailItems)
        .path("/api/v2/users/create_or_update_many")
        .fraction(0.5)
        .times(1);
    rule.error = Some("DuplicateValue".into());
    rule.details = Some("Email: \"taken\" is already used,\nby another user".into());
    sim.set_fault_rules(vec![rule]);

    let (code, stdout, t) = run(&["run"], &cfg, &[]);
    assert_eq!(code, 1, "{t}");
    // The run report names the refused rows' real file, no placeholder.
    let runs: Vec<String> = std::fs::read_dir(root.join("runs/people"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run_id = runs[0].clone();
    let invalid_path =
        std::fs::canonicalize(root.join(format!("runs/people/{run_id}/invalid.jsonl"))).unwrap();
    assert!(
        stdout.contains(&format!(
            "refused before sending ({})",
            invalid_path.display()
        )),
        "{t}"
    );
    assert!(
        !stdout.contains("<sync>") && !stdout.contains("<run>"),
        "{t}"
    );

    let state = sim.state("acme").unwrap();
    let missing: BTreeSet<String> = (0..10)
        .map(|n| format!("p{n}"))
        .filter(|k| state.user_by_external_id(k).is_none())
        .collect();
    let created = 10 - missing.len();
    assert!(!missing.is_empty() && created > 0, "{missing:?}");

    // show, the newest run: every field, real paths, 80 columns.
    let (code, out, t) = run(&["show"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    assert_narrow(&out);
    assert_eq!(shown(&out, "run"), run_id, "{out}");
    assert_eq!(shown(&out, "sync"), "people (users, upsert)", "{out}");
    assert_eq!(shown(&out, "status"), "completed with failures", "{out}");
    assert_eq!(shown(&out, "trigger"), "cli", "{out}");
    let rec: Json = serde_json::from_slice(
        &std::fs::read(root.join(format!("runs/people/{run_id}/run.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        shown(&out, "started"),
        rec["started_at"].as_str().unwrap(),
        "{out}"
    );
    assert!(
        shown(&out, "finished").starts_with(rec["finished_at"].as_str().unwrap()),
        "{out}"
    );
    for (label, want) in [
        ("read", 12),
        ("created", created),
        ("updated", 0),
        ("unchanged", 0),
        ("skipped", 0),
        ("invalid", 2),
        ("failed", missing.len()),
        ("removed", 0),
    ] {
        assert_eq!(count(&out, label), want as u64, "{label}\n{out}");
    }
    assert!(
        !out.contains("  tagged"),
        "an object sync counts no tags:\n{out}"
    );
    let requests = shown(&out, "requests");
    assert!(
        requests.starts_with(&format!("{} sent", rec["requests"]["sent"]))
            && requests.contains(&format!("{} × 429", rec["requests"]["rate_limited"])),
        "{out}"
    );
    assert!(shown(&out, "phases").starts_with("preflight "), "{out}");
    assert_eq!(
        shown(&out, "to fix"),
        format!(
            "{} rows, listed with source line and reason by:",
            missing.len() + 2
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "\n          zdsync failed {} {run_id}\n",
            cfg.display()
        )),
        "{out}"
    );
    let real = |key: String| {
        std::fs::canonicalize(root.join(key))
            .unwrap()
            .display()
            .to_string()
    };
    assert_eq!(
        path_shown(&out, "run.json"),
        real(format!("runs/people/{run_id}/run.json")),
        "{out}"
    );
    assert_eq!(
        path_shown(&out, "invalid.jsonl"),
        invalid_path.display().to_string()
    );
    assert_eq!(
        path_shown(&out, "results/"),
        real(format!("runs/people/{run_id}/results/")),
        "{out}"
    );

    // --json prints the record itself.
    let (code, out, t) = run(&["show"], &cfg, &[&run_id, "--json"]);
    assert_eq!(code, 0, "{t}");
    let shown_rec: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(shown_rec, rec);

    // failed: CSV on stdout with a header, parsed back.
    let (code, out, t) = run(&["failed"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    let csv_path = root.join("failed.csv");
    std::fs::write(&csv_path, &out).unwrap();
    let rows = read_csv(&csv_path);
    assert_eq!(rows.len(), missing.len() + 2, "{out}");
    let failed: Vec<&Vec<String>> = rows.iter().filter(|r| r[col("kind")] == "failed").collect();
    let keys: BTreeSet<String> = failed.iter().map(|r| r[col("key")].clone()).collect();
    assert_eq!(
        keys, missing,
        "the failed rows are the users Zendesk has not: {out}"
    );
    for r in &failed {
        let n: u64 = r[col("key")][1..].parse().unwrap();
        assert_eq!(r[col("file")], "exports/people/part-0.csv", "{r:?}");
        assert_eq!(r[col("line")], (n + 2).to_string(), "{r:?}");
        assert_eq!(r[col("op")], "create", "{r:?}");
        assert_eq!(r[col("reason")], "write_failed", "{r:?}");
        assert!(r[col("message")].contains("sent again next run"), "{r:?}");
        assert_eq!(
            r[col("zendesk_error")],
            "DuplicateValue: Email: \"taken\" is already used,\nby another user",
            "{r:?}"
        );
    }
    let invalid: Vec<&Vec<String>> = rows
        .iter()
        .filter(|r| r[col("kind")] == "invalid")
        .collect();
    assert_eq!(invalid.len(), 2, "{out}");
    let bad = invalid.iter().find(|r| r[col("key")] == "p10").unwrap();
    assert_eq!(bad[col("line")], "12", "{bad:?}");
    assert_eq!(bad[col("file")], "exports/people/part-0.csv");
    assert_eq!(bad[col("field")], "email", "{bad:?}");
    assert_eq!(bad[col("reason")], "invalid_email", "{bad:?}");
    assert!(bad[col("message")].contains("not-an-email"), "{bad:?}");
    assert_eq!(bad[col("zendesk_error")], "");
    let nokey = invalid.iter().find(|r| r[col("key")].is_empty()).unwrap();
    assert_eq!(nokey[col("line")], "13", "{nokey:?}");
    assert_eq!(nokey[col("reason")], "missing_primary_key", "{nokey:?}");
    assert!(
        t.contains(&format!("{} failed and 2 invalid rows", missing.len())),
        "{t}"
    );

    // --format jsonl --output FILE, by run id: the same rows.
    let jsonl = root.join("out/failed.jsonl");
    std::fs::create_dir_all(jsonl.parent().unwrap()).unwrap();
    let (code, out, t) = run(
        &["failed"],
        &cfg,
        &[
            &run_id,
            "--format",
            "jsonl",
            "--output",
            jsonl.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{t}");
    assert!(out.is_empty(), "nothing on stdout with --output: {out}");
    let lines: Vec<Json> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows.len());
    for (j, r) in lines.iter().zip(&rows) {
        assert_eq!(j["kind"], r[col("kind")].as_str());
        assert_eq!(j["key"].as_str().unwrap_or(""), r[col("key")]);
        assert_eq!(
            j["line"]
                .as_u64()
                .map(|l| l.to_string())
                .unwrap_or_default(),
            r[col("line")]
        );
        assert_eq!(j["reason"], r[col("reason")].as_str());
        assert_eq!(
            j["zendesk_error"].as_str().unwrap_or(""),
            r[col("zendesk_error")]
        );
    }

    // A second run without the fault: show picks it as the newest; the first stays by id (or
    // a prefix of it) with its own figures; nothing failed in the second.
    sim.clear_faults();
    let (code, _, t) = run(&["run"], &cfg, &[]);
    assert_eq!(code, 1, "the refused rows remain: {t}");
    let (_, newest, _) = run(&["show"], &cfg, &[]);
    assert_ne!(shown(&newest, "run"), run_id, "{newest}");
    assert_eq!(count(&newest, "failed"), 0, "{newest}");
    assert_eq!(count(&newest, "created"), missing.len() as u64, "{newest}");
    assert_eq!(count(&newest, "retried"), missing.len() as u64, "{newest}");
    assert_eq!(count(&newest, "unchanged"), created as u64, "{newest}");
    // The first run again, by its id and by a prefix of it.
    for name in [run_id.as_str(), &run_id[..run_id.len() - 2]] {
        let (code, first, t) = run(&["show"], &cfg, &[name]);
        assert_eq!(code, 0, "{t}");
        assert_eq!(shown(&first, "run"), run_id, "{first}");
        assert_eq!(count(&first, "failed"), missing.len() as u64, "{first}");
        assert_eq!(count(&first, "created"), created as u64, "{first}");
    }
    let (code, out, t) = run(&["failed"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    assert_eq!(
        out.lines().count(),
        3,
        "header and the two refused rows: {out}"
    );
    assert!(
        out.lines().skip(1).all(|l| l.starts_with("invalid,")),
        "{out}"
    );
    // An unknown run: exit 2, nothing on stdout.
    let (code, out, t) = run(&["show"], &cfg, &["20000101T000000Z-0000"]);
    assert_eq!(code, 2, "{t}");
    assert!(
        out.is_empty() && t.contains("no run `20000101T000000Z-0000`"),
        "{t}"
    );
    rt.block_on(sim.shutdown());
}

/// An audience sync: show and history count tags, not creates; `failed` lists the member
/// Zendesk does not have.
#[test]
fn show_and_history_count_an_audience_runs_tags() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt.block_on(Simulator::start(SimConfig::default())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let people = config(
        root,
        &sim.base_url(),
        "people",
        "upsert",
        "\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n",
    );
    write(
        &root.join("exports/people/part-0.csv"),
        "ID,NAME,EMAIL\np1,Ann,ann@example.com\np2,Bob,bob@example.com\np3,Cy,cy@example.com\n",
    );
    let (code, _, t) = run(&["run"], &people, &[]);
    assert_eq!(code, 0, "{t}");
    let vip = config(
        root,
        &sim.base_url(),
        "vip",
        "mirror",
        "\n[audience]\ntag = \"vip\"\n",
    );
    write(&root.join("exports/vip/part-0.csv"), "ID\np1\np2\nghost\n");
    let (code, _, t) = run(&["run"], &vip, &[]);
    assert_eq!(code, 1, "the ghost member fails: {t}");

    let (code, out, t) = run(&["show"], &vip, &[]);
    assert_eq!(code, 0, "{t}");
    assert_narrow(&out);
    assert_eq!(
        shown(&out, "sync"),
        "vip (users, mirror) · audience tag `vip`",
        "{out}"
    );
    for (label, want) in [
        ("read", 3),
        ("tagged", 2),
        ("untagged", 0),
        ("failed", 1),
        ("created", 0),
    ] {
        assert_eq!(count(&out, label), want, "{label}\n{out}");
    }
    assert_eq!(
        path_shown(&out, "invalid.jsonl"),
        "(none: no row was refused)",
        "{out}"
    );
    let (_, json, _) = run(&["show"], &vip, &["--json"]);
    let rec: Json = serde_json::from_str(&json).unwrap();
    assert_eq!(rec["audience_tag"], "vip");
    assert_eq!(rec["rows"]["tagged"], 2);
    let state = sim.state("acme").unwrap();
    for k in ["p1", "p2"] {
        let u = state.user_by_external_id(k).unwrap();
        assert!(
            u["tags"].as_array().unwrap().iter().any(|t| t == "vip"),
            "{u}"
        );
    }

    let (code, out, t) = run(&["failed"], &vip, &["--format", "jsonl"]);
    assert_eq!(code, 0, "{t}");
    let lines: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["kind"], "failed");
    assert_eq!(lines[0]["key"], "ghost");
    assert_eq!(lines[0]["op"], "add");
    assert_eq!(lines[0]["file"], "exports/vip/part-0.csv");
    assert_eq!(lines[0]["line"], 4);
    assert!(
        lines[0]["zendesk_error"]
            .as_str()
            .unwrap()
            .contains("ghost"),
        "{out}"
    );

    // history: tag columns for the audience, none for the object sync.
    let (code, out, t) = run(&["history"], &vip, &[]);
    assert_eq!(code, 0, "{t}");
    let mut lines = out.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert!(
        head.contains(&"tagged") && head.contains(&"untagged"),
        "{out}"
    );
    assert!(
        !head.contains(&"created") && !head.contains(&"updated"),
        "{out}"
    );
    let row = lines.next().unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // run, date, trigger, "completed with failures" (3 words), then the counts.
    let counts = &cells[6..];
    let at = |name: &str| head.iter().position(|h| *h == name).unwrap() - 4;
    assert_eq!(counts[at("tagged")], "2", "{out}");
    assert_eq!(counts[at("untagged")], "0", "{out}");
    assert_eq!(counts[at("failed")], "1", "{out}");
    let (_, out, _) = run(&["history"], &people, &[]);
    let head = out.lines().next().unwrap();
    assert!(
        head.contains("created") && !head.contains("tagged"),
        "{out}"
    );
    rt.block_on(sim.shutdown());
}

/// A run record as `zdsync run` writes it: `read` rows, all created.
fn record_json(sync: &str, run: &str, started: &str, read: u64) -> Json {
    serde_json::json!({
        "run_id": run, "sync": sync, "object": "users", "mode": "upsert",
        "trigger": "cli", "status": "succeeded", "started_at": started,
        "finished_at": started, "seconds": 0.5,
        "phases": {"preflight": 0.0, "schema": 0.0, "plan": 0.0, "write": 0.0, "finalize": 0.0},
        "rows": {"read": read, "invalid": 0, "created": read, "updated": 0, "unchanged": 0,
                 "skipped": 0, "removed": 0, "failed": 0, "retried": 0},
        "requests": {"sent": 3, "rate_limited": 0, "unavailable": 0, "server_errors": 0,
                     "transport_errors": 0, "retries": 0, "token_refreshes": 0,
                     "paused_ms": 0},
        "jobs": 1,
    })
}

/// Store a run record where a run leaves it (its run folder and the history).
fn put_record(root: &Path, rec: &Json) {
    let (sync, run) = (
        rec["sync"].as_str().unwrap(),
        rec["run_id"].as_str().unwrap(),
    );
    let body = serde_json::to_string_pretty(rec).unwrap();
    write(&root.join(format!("history/{sync}/{run}.json")), &body);
    write(&root.join(format!("runs/{sync}/{run}/run.json")), &body);
}

/// Runs started in the same second list by their start time to the millisecond, whatever
/// their run ids' random suffixes say; `--limit` cuts after ordering, and `show` picks the
/// truly newest.
#[test]
fn history_orders_runs_of_one_second_by_their_start_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(
        root,
        "http://127.0.0.1:9",
        "people",
        "upsert",
        "\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n",
    );
    let record = |run: &str, started: &str, read: u64| record_json("people", run, started, read);
    // Newest first by start time: b (…00.101), a (…00.100), then c from the second before;
    // by run id a (`ffff`) would come before b (`0001`).
    let runs = [
        ("20260101T101500Z-ffff", "2026-01-01T10:15:00.100Z", 1),
        ("20260101T101500Z-0001", "2026-01-01T10:15:00.101Z", 2),
        ("20260101T101459Z-aaaa", "2026-01-01T10:14:59.900Z", 3),
    ];
    for (run, started, read) in runs {
        put_record(root, &record(run, started, read));
    }
    let order = |limit: &str| -> Vec<String> {
        let (code, out, t) = run(&["history"], &cfg, &["--json", "--limit", limit]);
        assert_eq!(code, 0, "{t}");
        let v: Json = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (a, b, c) = (runs[0].0, runs[1].0, runs[2].0);
    assert_eq!(order("20"), [b, a, c]);
    assert_eq!(order("2"), [b, a]);
    assert_eq!(order("1"), [b], "the newest, though its id sorts second");
    // The table: the same order, with milliseconds.
    let (code, out, t) = run(&["history"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    let listed: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(listed, [b, a, c], "{out}");
    assert!(out.contains("2026-01-01T10:15:00.101"), "{out}");
    // show without a run id: the newest by start time; by a unique id prefix: that run.
    let (code, out, t) = run(&["show"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    assert_eq!(shown(&out, "run"), b, "{out}");
    let (_, out, _) = run(&["show"], &cfg, &["20260101T101459Z"]);
    assert_eq!(shown(&out, "run"), c, "{out}");
    let (code, _, t) = run(&["show"], &cfg, &["20260101T1015"]);
    assert_eq!(code, 2, "an ambiguous prefix: {t}");
    assert!(t.contains(a) && t.contains(b), "{t}");
}

/// A run interrupted and finished by the next one, which also met a mapping change and then
/// failed: `show` says which run finished which, the mapping change and the whole error, in
/// lines of at most 80 columns.
#[test]
fn show_tells_which_run_finished_which_and_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = config(
        root,
        "http://127.0.0.1:9",
        "people",
        "upsert",
        "\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n",
    );
    let (old, new) = ("20260101T100000Z-1111", "20260101T110000Z-2222");
    let mut first = record_json("people", old, "2026-01-01T10:00:00.000Z", 40);
    first["trigger"] = "resume".into();
    first["resumed"] = true.into();
    put_record(root, &first);
    let message = "Zendesk answered 503 Service Unavailable to 8 attempts over 2 minutes \
                   (POST /api/v2/users/create_or_update_many); what it confirmed is kept and \
                   the rest is sent again next run";
    let mut second = record_json("people", new, "2026-01-01T11:00:00.000Z", 40);
    second["status"] = "failed".into();
    second["resumed_run"] = old.into();
    second["mapping_change"] = serde_json::json!({"since_run": old, "resend": 1234});
    second["error"] = serde_json::json!({"name": "ZendeskUnavailable", "message": message});
    put_record(root, &second);

    let (code, out, t) = run(&["show"], &cfg, &[]);
    assert_eq!(code, 0, "{t}");
    assert_narrow(&out);
    assert_eq!(shown(&out, "run"), new, "{out}");
    assert_eq!(shown(&out, "status"), "FAILED", "{out}");
    assert!(
        shown(&out, "resumed").starts_with(&format!("first finished run {old},")),
        "{out}"
    );
    assert!(
        shown(&out, "mapping").starts_with(&format!(
            "changed since run {old}: 1,234 rows already in Zendesk"
        )),
        "{out}"
    );
    // The error, wrapped: its lines put back together are the message.
    let start = out.find("\nerror").unwrap() + 1;
    let mut words = Vec::new();
    for (i, line) in out[start..].lines().enumerate() {
        let text = if i == 0 {
            line.strip_prefix("error").unwrap()
        } else if let Some(more) = line.strip_prefix("          ") {
            more
        } else {
            break;
        };
        words.extend(text.split_whitespace());
    }
    assert_eq!(
        words.join(" "),
        format!("ZendeskUnavailable: {message}"),
        "{out}"
    );
    assert!(
        out[start..]
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("          "),
        "a long error wraps: {out}"
    );
    // The interrupted run names the run that finished it.
    let (code, out, t) = run(&["show"], &cfg, &[old]);
    assert_eq!(code, 0, "{t}");
    assert_narrow(&out);
    assert_eq!(shown(&out, "trigger"), "resume", "{out}");
    let resumed: String = out
        .lines()
        .skip_while(|l| !l.starts_with("resumed"))
        .take_while(|l| l.starts_with("resumed") || l.starts_with("          "))
        .flat_map(str::split_whitespace)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        resumed.contains(&format!("finished by run {new};")),
        "{resumed}\n{out}"
    );
    assert!(!out.contains("\nerror"), "{out}");
}
