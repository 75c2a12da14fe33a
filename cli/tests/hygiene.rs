//! Terminal and pipe hygiene of the `zdsync` binary: plain logs in a pipe, a quiet end when the
//! reader of its output goes away, help text for every argument, and a demo that can run twice
//! into one folder.

mod common;

use common::{text, zdsync};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Output, Stdio};

/// `zdsync demo` with a small export into `dir`, logging at `log`.
fn demo(dir: &Path, log: &str) -> Output {
    zdsync()
        .args(["demo", "--rows", "40", "--dir"])
        .arg(dir)
        .env("ZDSYNC_LOG", log)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .expect("zdsync demo runs")
}

#[test]
fn logs_in_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path(), "debug");
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DEBUG"),
        "ZDSYNC_LOG=debug logs requests: {err}"
    );
    assert!(
        !err.contains("\x1b["),
        "ANSI escape codes in logs written to a pipe: {:?}",
        err.lines()
            .find(|l| l.contains("\x1b["))
            .unwrap_or_default()
    );
}

/// Runs `zdsync args`, reads one line of its output and closes the pipe.
fn read_one_line_then_close(args: &[&str], root: &Path) -> (Option<i32>, String) {
    let mut child = zdsync()
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("zdsync starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(!first.is_empty(), "zdsync {args:?} printed nothing");
    drop(stdout);
    let out = child.wait_with_output().expect("zdsync ends");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_closed_pipe_ends_zdsync_quietly() {
    // A history far longer than a pipe's buffer: one real run's record, filed 600 times.
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path(), "warn");
    assert!(out.status.success(), "{}", text(&out));
    let history = dir.path().join("history/demo_users");
    let record = std::fs::read_dir(&history)
        .unwrap()
        .flatten()
        .next()
        .expect("a run record")
        .path();
    let body = std::fs::read(&record).unwrap();
    for i in 0..600 {
        std::fs::write(history.join(format!("20250101T{i:06}Z-0000.json")), &body).unwrap();
    }
    for args in [
        &["history", "config/demo_users.toml", "--limit", "1000"][..],
        &[
            "history",
            "config/demo_users.toml",
            "--limit",
            "1000",
            "--json",
        ][..],
    ] {
        let (code, err) = read_one_line_then_close(args, dir.path());
        assert_ne!(code, Some(101), "zdsync {args:?} panicked: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "zdsync {args:?} after its reader left: {err}"
        );
    }
}

/// The subcommands a help text lists under `Commands:` (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if !line.starts_with(' ') {
            inside = line.trim_end() == "Commands:";
            continue;
        }
        if inside {
            if let Some(name) = line.split_whitespace().next() {
                if name != "help" {
                    out.push(name.to_string());
                }
            }
        }
    }
    out
}

/// The argument entries of a help text (`Arguments:` and `Options:`) that carry no description:
/// `[env: ...]`, `[default: ...]` and lists of possible values do not count as one.
fn undescribed(help: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut inside = false;
    // The entry being read: its line, its indent, and whether it has words yet.
    let mut entry: Option<(String, usize, bool)> = None;
    let is_words = |s: &str| {
        let s = s.trim();
        !(s.is_empty()
            || (s.starts_with('[') && s.ends_with(']'))
            || s == "Possible values:"
            || s.starts_with("- "))
            && s.chars().any(char::is_alphabetic)
    };
    let mut finish = |entry: &mut Option<(String, usize, bool)>| {
        if let Some((line, _, false)) = entry.take() {
            missing.push(line);
        }
    };
    for line in help.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            finish(&mut entry);
            inside = matches!(line.trim_end(), "Arguments:" | "Options:");
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim_start();
        let starts_entry = indent <= 6
            && (body.starts_with('-') || body.starts_with('<') || body.starts_with('['));
        if starts_entry {
            finish(&mut entry);
            // Short help: `  --name <V>  description [default: x]` on one line.
            let described = body
                .split_once("  ")
                .is_some_and(|(_, rest)| is_words(&strip_brackets(rest)));
            entry = Some((line.to_string(), indent, described));
        } else if let Some((_, at, described)) = entry.as_mut() {
            // Long help: the description on the lines below, indented deeper.
            if indent > *at && is_words(&strip_brackets(body)) {
                *described = true;
            }
        }
    }
    finish(&mut entry);
    missing
}

/// Text without its `[...]` annotations.
fn strip_brackets(s: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn help_of(args: &[&str]) -> String {
    let out = zdsync().args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "zdsync {args:?} --help: {}",
        text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_argument_has_help() {
    let top = help_of(&[]);
    assert!(
        top.contains("ZDSYNC_LOG"),
        "`zdsync --help` should name ZDSYNC_LOG: {top}"
    );
    let commands = subcommands(&top);
    for c in ["plan", "run", "history", "schema", "connect", "demo", "sim"] {
        assert!(commands.iter().any(|n| n == c), "no `{c}` in {commands:?}");
    }
    let mut todo: Vec<Vec<String>> = commands.into_iter().map(|c| vec![c]).collect();
    let mut missing = Vec::new();
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let help = help_of(&args);
        for line in undescribed(&help) {
            missing.push(format!("zdsync {}: {}", path.join(" "), line.trim()));
        }
        todo.extend(subcommands(&help).into_iter().map(|s| {
            let mut p = path.clone();
            p.push(s);
            p
        }));
    }
    assert!(
        missing.is_empty(),
        "arguments without a description:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_help_checker_finds_what_it_should() {
    let short = "Usage: x\n\nArguments:\n  <CONFIG>  \n\nOptions:\n      --store <STORE>  [env: ZDSYNC_STORE=]\n      --json           Print JSON\n  -h, --help           Print help\n";
    assert_eq!(
        undescribed(short),
        [
            "  <CONFIG>  ",
            "      --store <STORE>  [env: ZDSYNC_STORE=]"
        ]
    );
    let long = "Options:\n      --grant <GRANT>\n          Possible values:\n          - a: A\n          \n          [default: a]\n\n      --email <EMAIL>\n          The email\n          \n          [env: E=]\n";
    assert_eq!(undescribed(long), ["      --grant <GRANT>"]);
}

#[test]
fn demo_runs_twice_into_one_folder_and_prints_what_its_help_says() {
    let dir = tempfile::tempdir().unwrap();
    let first = demo(dir.path(), "warn");
    assert!(first.status.success(), "{}", text(&first));
    let second = demo(dir.path(), "warn");
    assert!(
        second.status.success(),
        "the second demo: {}",
        text(&second)
    );
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains("an earlier demo's state, runs and history removed"),
        "{out}"
    );
    assert!(
        out.contains("valid user rows missing in Zendesk: 0"),
        "{out}"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).trim().is_empty(),
        "warnings or errors: {}",
        text(&second)
    );
    // What the help promises, the demo prints.
    let help = help_of(&["demo"]);
    for (promise, printed) in [
        ("report", "rows read"),
        ("refused rows", "invalid  exports/demo_users/part-0000.csv"),
        (
            "preview (`zdsync plan`)",
            "the preview (`zdsync plan`) said the same",
        ),
        ("what the simulator holds", "the simulator now holds"),
        ("renamed users", "renamed users seen"),
        ("tags set wrongly", "tagged wrongly"),
    ] {
        assert!(
            help.contains(promise),
            "`demo --help` should mention {promise:?}: {help}"
        );
        assert!(
            out.contains(printed),
            "the demo should print {printed:?}: {out}"
        );
    }
    // Only the demo's own files were removed: something else in the folder stays.
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(dir.path().join("state/other")).unwrap();
    std::fs::write(dir.path().join("state/other/state.zst"), "x").unwrap();
    let third = demo(dir.path(), "warn");
    assert!(third.status.success(), "{}", text(&third));
    assert!(dir.path().join("notes.txt").exists());
    assert!(dir.path().join("state/other/state.zst").exists());
}
