//! `zdsync show` and `zdsync failed`: one run of a sync, read back from its record and files in
//! the store folder.

use crate::run_cmd::{exit, num, object_path};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use zdsync::config::{Mode, SyncConfig};
use zdsync::layout;
use zdsync::record::{self, ProblemCsv, ProblemRow};
use zdsync::run::{RunRecord, RunStatus};
use zdsync::store::{LocalStore, ObjectStore};

/// `zdsync show` lines fit this many columns (a long path or word stays whole).
pub const WIDTH: usize = 80;
/// Labels of `zdsync show`, and the indent of their continuation lines.
const LABEL: usize = 10;

/// The output of `zdsync failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A header line, then one line per row (RFC 4180 quoting).
    Csv,
    /// One JSON object per row.
    Jsonl,
}

/// The run a command is about.
enum Found {
    Recorded(Box<RunRecord>),
    /// Its folder exists but it has no record yet: under way, or its process stopped.
    Unrecorded(String),
}

impl Found {
    fn run_id(&self) -> &str {
        match self {
            Found::Recorded(r) => &r.run_id,
            Found::Unrecorded(id) => id,
        }
    }
}

/// Why no run was found (exit code, message).
type NotFound = (u8, String);

fn io_err(e: impl std::fmt::Display) -> NotFound {
    (exit::STATE, e.to_string())
}

/// The run `run` names (its id, or a prefix of exactly one run id in the history), else the
/// sync's newest run.
fn find_run(
    store: &LocalStore,
    root: &Path,
    sync: &str,
    run: Option<&str>,
) -> Result<Found, NotFound> {
    let Some(id) = run else {
        let newest = record::history(store, sync, 1).map_err(io_err)?;
        return match newest.into_iter().next() {
            Some(r) => Ok(Found::Recorded(Box::new(r))),
            None => Err((
                exit::CONFIG,
                format!("no runs of sync `{sync}` yet in {}", root.display()),
            )),
        };
    };
    if !layout::valid_run_id(id) {
        return Err((
            exit::CONFIG,
            format!(
                "`{id}` is not a run id (letters, digits and `-`, as `zdsync history` lists them)"
            ),
        ));
    }
    if let Some(r) = record::read_record(store, sync, id).map_err(io_err)? {
        return Ok(Found::Recorded(Box::new(r)));
    }
    if root.join(layout::run_prefix(sync, id)).is_dir() {
        return Ok(Found::Unrecorded(id.to_string()));
    }
    let prefix = layout::history_prefix(sync);
    let mut matches: Vec<String> = store
        .list(&prefix)
        .map_err(io_err)?
        .into_iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(&prefix)?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .filter(|name| name.starts_with(id))
        .collect();
    matches.sort();
    match matches.as_slice() {
        [one] => match record::read_record(store, sync, one).map_err(io_err)? {
            Some(r) => Ok(Found::Recorded(Box::new(r))),
            None => Err((exit::STATE, format!("the record of run {one} is gone"))),
        },
        [] => Err((
            exit::CONFIG,
            format!(
                "no run `{id}` of sync `{sync}` in {} (`zdsync history` lists them)",
                root.display()
            ),
        )),
        many => Err((
            exit::CONFIG,
            format!(
                "`{id}` names {} runs of sync `{sync}`: {}",
                many.len(),
                many.join(", ")
            ),
        )),
    }
}

/// The run that finished `r` after its process stopped: the first later record naming it as
/// its `resumed_run` (the next few runs are looked at).
fn resumed_by(store: &LocalStore, r: &RunRecord) -> Option<String> {
    let prefix = layout::history_prefix(&r.sync);
    let own = layout::history_key(&r.sync, &r.run_id);
    let mut later: Vec<String> = store
        .list(&prefix)
        .ok()?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".json") && *k > own)
        .collect();
    later.sort();
    later.iter().take(10).find_map(|key| {
        let run = key.strip_prefix(&prefix)?.strip_suffix(".json")?;
        let rec = record::read_record(store, &r.sync, run).ok()??;
        (rec.resumed_run.as_deref() == Some(r.run_id.as_str())).then_some(rec.run_id)
    })
}

/// `text` after a label, word-wrapped to [`WIDTH`] columns with continuation lines indented
/// under the text.
fn labelled(out: &mut String, label: &str, text: &str) {
    let mut line = format!("{label:<w$}", w = LABEL.max(label.chars().count() + 1));
    let mut empty = true;
    for word in text.split_whitespace() {
        let len = line.chars().count();
        if !empty && len + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(LABEL);
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

fn status_text(r: &RunRecord) -> &'static str {
    match r.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::CompletedWithFailures => "completed with failures",
        RunStatus::Failed => "FAILED",
        RunStatus::Interrupted => "INTERRUPTED (the next run finishes it)",
    }
}

/// A path under the store, or `(none)` with why when the run has no such file.
fn file_line(out: &mut String, root: &Path, label: &str, key: &str, missing: &str) {
    let text = if root.join(key).exists() {
        object_path(Some(root), key)
    } else {
        format!("(none: {missing})")
    };
    let line = format!("  {label:<14} {text}");
    if line.chars().count() <= WIDTH {
        out.push_str(&line);
        out.push('\n');
    } else if text.starts_with('(') {
        labelled(out, &format!("  {label}"), &text);
    } else {
        // A long path goes on a line of its own, whole (a longer one than fits stays whole).
        out.push_str(&format!("  {label}\n    {text}\n"));
    }
}

/// The files of run `run`: its record, refused rows and per-row outcomes.
fn render_files(out: &mut String, root: &Path, sync: &str, run: &str) {
    out.push_str("files\n");
    file_line(
        out,
        root,
        "run.json",
        &layout::run_record_key(sync, run),
        "the run has not finished",
    );
    file_line(
        out,
        root,
        "invalid.jsonl",
        &layout::invalid_key(sync, run),
        "no row was refused",
    );
    file_line(
        out,
        root,
        "results/",
        &layout::run_results_prefix(sync, run),
        "nothing was sent",
    );
}

/// `zdsync show`: the run as lines of at most [`WIDTH`] columns (paths excepted).
pub fn render(r: &RunRecord, config: &Path, root: &Path, resumed_by: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    labelled(&mut s, "run", &r.run_id);
    let mut sync = format!("{} ({}, {})", r.sync, r.object, r.mode.as_str());
    if let Some(tag) = &r.audience_tag {
        sync.push_str(&format!(" · audience tag `{tag}`"));
    }
    labelled(&mut s, "sync", &sync);
    labelled(&mut s, "status", status_text(r));
    labelled(&mut s, "trigger", &r.trigger);
    labelled(&mut s, "started", &r.started_at);
    labelled(
        &mut s,
        "finished",
        &format!("{} · {:.2} s", r.finished_at, r.seconds),
    );
    if let Some(old) = &r.resumed_run {
        labelled(
            &mut s,
            "resumed",
            &format!(
                "first finished run {old}, which an earlier process left unfinished (its \
                 figures are in its own record)"
            ),
        );
    }
    if r.resumed {
        let by = match resumed_by {
            Some(run) => format!("run {run}"),
            None => "a later run".to_string(),
        };
        labelled(
            &mut s,
            "resumed",
            &format!(
                "this run was interrupted or cut off and finished by {by}; the figures \
                 include both parts"
            ),
        );
    }
    if let Some(m) = &r.mapping_change {
        labelled(
            &mut s,
            "mapping",
            &format!(
                "changed since run {}: {} rows already in Zendesk were sent again",
                m.since_run.as_deref().unwrap_or("(unknown)"),
                num(m.resend)
            ),
        );
    }
    if let Some(e) = &r.error {
        labelled(&mut s, "error", &format!("{}: {}", e.name, e.message));
    }

    s.push_str("rows\n");
    let rows = &r.rows;
    let count = |s: &mut String, k: &str, v: u64, note: &str| {
        let line = format!("  {k:<12}{:>12}  {note}", num(v));
        let _ = writeln!(s, "{}", line.trim_end());
    };
    count(&mut s, "read", rows.read, "");
    count(&mut s, "created", rows.created, "");
    count(&mut s, "updated", rows.updated, "");
    if r.is_audience() {
        count(&mut s, "tagged", rows.tagged, "audience tag added");
        count(&mut s, "untagged", rows.untagged, "audience tag removed");
    }
    count(&mut s, "unchanged", rows.unchanged, "not sent");
    count(
        &mut s,
        "skipped",
        rows.skipped,
        "exist already; insert mode never updates",
    );
    count(&mut s, "invalid", rows.invalid, "refused before sending");
    count(&mut s, "failed", rows.failed, "sent again next run");
    let removed = match r.mode {
        Mode::Remove | Mode::Mirror => "members gone since the last run (untagged)",
        Mode::Add => "members gone since the last run (add keeps the tag)",
        _ => "gone from the export; left in Zendesk",
    };
    count(&mut s, "removed", rows.removed, removed);
    if rows.retried > 0 {
        count(
            &mut s,
            "retried",
            rows.retried,
            "failed last run, sent again",
        );
    }
    if rows.failed + rows.invalid > 0 {
        let n = rows.failed + rows.invalid;
        let command = format!("zdsync failed {} {}", config.display(), r.run_id);
        if LABEL + command.chars().count() <= WIDTH {
            labelled(
                &mut s,
                "to fix",
                &format!(
                    "{} row{}, listed with source line and reason by:",
                    num(n),
                    if n == 1 { "" } else { "s" }
                ),
            );
            let _ = writeln!(s, "{:LABEL$}{command}", "");
        } else {
            labelled(
                &mut s,
                "to fix",
                &format!(
                    "{} row{}: `zdsync failed` with this config and run id lists them \
                     with source line and reason",
                    num(n),
                    if n == 1 { "" } else { "s" }
                ),
            );
        }
    }

    let p = &r.phases;
    labelled(
        &mut s,
        "phases",
        &format!(
            "preflight {:.2} s · schema {:.2} s · plan {:.2} s · write {:.2} s · finalize \
             {:.2} s",
            p.preflight, p.schema, p.plan, p.write, p.finalize
        ),
    );
    let q = &r.requests;
    labelled(
        &mut s,
        "requests",
        &format!(
            "{} sent · {} × 429 · {} retr{} · {} job{} · paused {:.1} s",
            num(q.sent),
            num(q.rate_limited),
            num(q.retries),
            if q.retries == 1 { "y" } else { "ies" },
            num(r.jobs),
            if r.jobs == 1 { "" } else { "s" },
            q.paused_ms as f64 / 1000.0
        ),
    );
    render_files(&mut s, root, &r.sync, &r.run_id);
    s
}

pub fn show(
    config: &Path,
    root: &Path,
    cfg: &SyncConfig,
    run: Option<&str>,
    json: bool,
) -> ExitCode {
    let store = LocalStore::new(root);
    let found = match find_run(&store, root, &cfg.name, run) {
        Ok(f) => f,
        Err((code, message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(code);
        }
    };
    match found {
        Found::Recorded(r) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&r).expect("record serialises")
            );
        }
        Found::Recorded(r) => {
            let by = if r.resumed {
                resumed_by(&store, &r)
            } else {
                None
            };
            print!("{}", render(&r, config, root, by.as_deref()));
        }
        Found::Unrecorded(id) => {
            if json {
                eprintln!("error: run {id} has no record yet");
                return ExitCode::from(exit::STATE);
            }
            let mut s = String::new();
            labelled(&mut s, "run", &id);
            labelled(&mut s, "sync", &cfg.name);
            labelled(
                &mut s,
                "status",
                "no record yet: the run is under way, or its process stopped before it \
                 finished (the next run finishes it)",
            );
            render_files(&mut s, root, &cfg.name, &id);
            print!("{s}");
        }
    }
    ExitCode::SUCCESS
}

/// Where `zdsync failed` writes its rows.
enum Sink<W: Write> {
    Csv(Box<ProblemCsv<W>>),
    Jsonl(W),
}

impl<W: Write> Sink<W> {
    fn write(&mut self, row: &ProblemRow) -> std::io::Result<()> {
        match self {
            Sink::Csv(c) => c.write(row),
            Sink::Jsonl(w) => {
                serde_json::to_writer(&mut *w, row)?;
                w.write_all(b"\n")
            }
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Csv(c) => c.finish().map(drop),
            Sink::Jsonl(mut w) => w.flush(),
        }
    }
}

pub fn failed(
    root: &Path,
    cfg: &SyncConfig,
    run: Option<&str>,
    format: Format,
    output: Option<&Path>,
) -> ExitCode {
    let store = LocalStore::new(root);
    let found = match find_run(&store, root, &cfg.name, run) {
        Ok(f) => f,
        Err((code, message)) => {
            eprintln!("error: {message}");
            return ExitCode::from(code);
        }
    };
    let out: Box<dyn Write> = match output {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("error: cannot write {}: {e}", path.display());
                return ExitCode::from(exit::CONFIG);
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut sink = match format {
        Format::Csv => match ProblemCsv::new(out) {
            Ok(c) => Sink::Csv(Box::new(c)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::STATE);
            }
        },
        Format::Jsonl => Sink::Jsonl(out),
    };
    // A run that wrote and folded its outcomes counts rows that never got one as failed; an
    // interrupted run (or one under way) still has them to send, and a run stopped before
    // writing (its row cap) sent none.
    let unsent = matches!(&found, Found::Recorded(r)
        if r.status != RunStatus::Interrupted && r.rows.failed > 0);
    let id = found.run_id().to_string();
    let counted = record::problem_rows(&store, &cfg.name, &id, unsent, &mut |row| sink.write(&row))
        .and_then(|n| {
            sink.finish()
                .map(|()| n)
                .map_err(|source| zdsync::changeset::ChangeSetError::Io {
                    key: output.map_or("stdout".into(), |p| p.display().to_string()),
                    source,
                })
        });
    let (failed, invalid) = match counted {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::STATE);
        }
    };
    let to = output.map_or("stdout".to_string(), |p| p.display().to_string());
    eprintln!(
        "run {id}: {} failed and {} invalid row{} → {to}",
        num(failed),
        num(invalid),
        if invalid == 1 { "" } else { "s" }
    );
    if let Found::Recorded(r) = &found {
        if (r.rows.failed, r.rows.invalid) != (failed, invalid) {
            eprintln!(
                "note: the run's record counts {} failed and {} invalid rows; the others' \
                 files are gone from the store, or the run stopped before writing them",
                num(r.rows.failed),
                num(r.rows.invalid)
            );
        }
    }
    ExitCode::SUCCESS
}
