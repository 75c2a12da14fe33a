//! `zdsync demo`: a real sync through the real pipeline against the built-in Zendesk simulator.
//! It writes an example export and sync configs into a folder, syncs users and organizations
//! and an audience (the `key_account` tag on some organizations), changes a few rows and the
//! audience's members, syncs again, and prints the run reports.

use crate::run_cmd::{self, RunArgs};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zdsync::config::SyncConfig;
use zdsync::run::RunStatus;
use zdsync_sim::{SimConfig, Simulator};

const USERS: usize = 2_000;
const ORGS: usize = 200;
const PLANS: [&str; 3] = ["Free", "Pro", "Enterprise"];
/// The syncs the demo writes, in the order it runs them.
const SYNCS: [&str; 3] = ["demo_orgs", "demo_users", "demo_key_accounts"];

pub struct DemoArgs {
    pub dir: Option<PathBuf>,
    pub rows: Option<usize>,
    /// A running simulator's URL; default: start one for the demo.
    pub sim: Option<String>,
}

/// The demo's simulator: its own, or one already running (read through its admin API).
enum Sim {
    Own(zdsync_sim::SimHandle),
    Running(String),
}

impl Sim {
    fn base_url(&self) -> String {
        match self {
            Sim::Own(s) => s.base_url(),
            Sim::Running(url) => url.trim_end_matches('/').to_string(),
        }
    }

    async fn admin<T: serde::de::DeserializeOwned>(url: &str, path: &str) -> Result<T, String> {
        let full = format!("{}{path}", url.trim_end_matches('/'));
        let answer = reqwest::get(&full)
            .await
            .map_err(|e| format!("{full}: {e}"))?;
        if !answer.status().is_success() {
            return Err(format!("{full}: HTTP {}", answer.status()));
        }
        answer.json().await.map_err(|e| format!("{full}: {e}"))
    }

    async fn state(&self) -> Result<zdsync_sim::AccountSnapshot, String> {
        match self {
            Sim::Own(s) => s.state("acme").ok_or_else(|| "no account acme".to_string()),
            Sim::Running(url) => Self::admin(url, "/__sim/state").await,
        }
    }

    async fn counters(&self) -> Result<zdsync_sim::Counters, String> {
        match self {
            Sim::Own(s) => Ok(s.counters()),
            Sim::Running(url) => Self::admin(url, "/__sim/counters").await,
        }
    }
}

fn users_csv(n: usize, changed: &[usize], added: usize) -> String {
    let mut s = String::from("USER_ID,FULL_NAME,EMAIL,PLAN,SIGNUP_DATE,LTV,VIP,ORG_TAGS\n");
    for i in 0..n + added {
        let name = if changed.contains(&i) {
            format!("User {i} (renamed)")
        } else {
            format!("User {i}")
        };
        let plan = PLANS[i % 3];
        let _ = writeln!(
            s,
            "u-{i:05},{name},user{i}@demo.example,{plan},2024-{:02}-{:02},{}.{:02},{},\"demo, wave{}\"",
            1 + i % 12,
            1 + i % 28,
            (i * 37) % 5000,
            i % 100,
            if i % 7 == 0 { "yes" } else { "no" },
            i % 3
        );
    }
    // Rows the plan refuses, each with a reason the report names.
    s.push_str("u-bad-1,No Email,,Pro,2024-01-01,1,no,\n");
    s.push_str("u-bad-2,Bad Email,not-an-email,Pro,2024-01-01,1,no,\n");
    s.push_str("u-bad-3,Unknown Plan,bad3@demo.example,Platinum,2024-01-01,1,no,\n");
    s.push_str("u-bad-4,Bad Date,bad4@demo.example,Free,31/02/2024,1,no,\n");
    s.push_str(",No Key,nokey@demo.example,Free,2024-01-01,1,no,\n");
    s
}

fn orgs_csv(n: usize, changed: &[usize]) -> String {
    let mut s = String::from("ORG_ID,NAME,DOMAIN,SEGMENT,EMPLOYEES,NOTES\n");
    for i in 0..n {
        let notes = if changed.contains(&i) {
            "Renewal moved to Q3"
        } else {
            "Imported by zdsync"
        };
        let _ = writeln!(
            s,
            "o-{i:04},Demo Org {i},org{i}.demo.example,{},{},{notes}",
            ["SMB", "Mid-market", "segment_enterprise"][i % 3],
            10 + i * 3
        );
    }
    s
}

fn sync_toml(
    name: &str,
    object: &str,
    pk: &str,
    location: &str,
    base_url: &str,
    mapping: &str,
) -> String {
    format!(
        r#"# Written by `zdsync demo`: a sync against the built-in Zendesk simulator.
name = "{name}"
object = "{object}"
mode = "upsert"
primary_key = "{pk}"
chunk_rows = 500

[source]
location = "{location}"

[zendesk]
subdomain = "acme"
base_url = "{base_url}"
credentials = "file:credentials.json"
rate_limit_rpm = 6000

[mapping]
{mapping}"#
    )
}

const USER_MAPPING: &str = r#"name = "FULL_NAME"
email = "EMAIL"
tags = { column = "ORG_TAGS", split = "comma" }
"user_fields.plan" = { column = "PLAN", type = "dropdown" }
"user_fields.signup_date" = { column = "SIGNUP_DATE", type = "date" }
"user_fields.lifetime_value" = { column = "LTV", type = "decimal" }
"user_fields.vip" = { column = "VIP", type = "checkbox" }
"#;

const ORG_MAPPING: &str = r#"name = "NAME"
domain_names = { column = "DOMAIN", split = "comma" }
notes = "NOTES"
"organization_fields.segment" = { column = "SEGMENT", type = "dropdown" }
"organization_fields.employees" = { column = "EMPLOYEES", type = "integer" }
"#;

/// Key accounts: an audience sync keeping the `key_account` tag on these organizations.
fn key_accounts(orgs: usize, round: usize) -> Vec<usize> {
    (0..orgs)
        .filter(|i| match round {
            1 => i % 4 == 0,
            // Round 2: the first tenth of them leave, and every tenth org from 1 joins.
            _ => (i % 4 == 0 && *i >= orgs / 10) || i % 10 == 1,
        })
        .collect()
}

fn key_accounts_csv(orgs: usize, round: usize) -> String {
    let mut s = String::from("ORG_ID\n");
    for i in key_accounts(orgs, round) {
        let _ = writeln!(s, "o-{i:04}");
    }
    s
}

fn audience_toml(base_url: &str) -> String {
    format!(
        r#"# Written by `zdsync demo`: an audience sync. The export lists member keys; zdsync keeps
# the `key_account` tag on exactly those organizations (mirror), never touching other tags.
name = "demo_key_accounts"
object = "organizations"
mode = "mirror"
primary_key = "ORG_ID"
chunk_rows = 500

[source]
location = "exports/demo_key_accounts/"

[zendesk]
subdomain = "acme"
base_url = "{base_url}"
credentials = "file:credentials.json"
rate_limit_rpm = 6000

[audience]
tag = "key_account"
"#
    )
}

/// `zdsync plan` for one of the demo's syncs, reading the simulator as the run does.
async fn preview_of(
    cfg: &SyncConfig,
    path: &Path,
    dir: &Path,
) -> Result<zdsync::preview::Preview, zdsync::run::RunError> {
    let client = run_cmd::client_for(cfg, path).await?;
    let store: std::sync::Arc<dyn zdsync::store::ObjectStore> =
        std::sync::Arc::new(zdsync::store::LocalStore::new(dir));
    let opts = zdsync::preview::PreviewOptions::new(zdsync::run::new_run_id());
    zdsync::preview::preview(store, cfg, Some(&client), &opts, None).await
}

fn write(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text)
}

/// Remove what an earlier demo left in `dir`: its syncs' state, runs, history and lock, and
/// nothing else (the configs and exports are written again). The demo's simulator starts empty,
/// so a run planned from an earlier demo's state would skip every row it thinks Zendesk has.
/// Returns whether there was anything to remove.
pub fn clear_previous(dir: &Path) -> std::io::Result<bool> {
    use zdsync::layout;
    let mut cleared = false;
    for sync in SYNCS {
        let state = layout::state_key(sync);
        let folders = [
            Path::new(&state).parent().map(Path::to_path_buf),
            Some(PathBuf::from(layout::runs_prefix(sync))),
            Some(PathBuf::from(layout::history_prefix(sync))),
        ];
        for folder in folders.into_iter().flatten() {
            match std::fs::remove_dir_all(dir.join(folder)) {
                Ok(()) => cleared = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match std::fs::remove_file(dir.join(layout::lock_key(sync))) {
            Ok(()) => cleared = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(cleared)
}

/// The demo's credentials file, owner-only as `zdsync connect` writes them.
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

pub fn demo(args: DemoArgs) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(demo_async(args))
}

async fn demo_async(args: DemoArgs) -> ExitCode {
    let users = args.rows.unwrap_or(USERS);
    let orgs = (users / 10).clamp(1, ORGS.max(users / 10));
    let dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "zdsync-demo-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ))
    });
    let sim = match &args.sim {
        Some(url) => {
            let sim = Sim::Running(url.clone());
            if let Err(e) = Sim::admin::<serde_json::Value>(url, "/__sim/health").await {
                eprintln!("error: no Zendesk simulator answers at {url} ({e}); start one with `zdsync sim`");
                return ExitCode::from(run_cmd::exit::WRITE);
            }
            sim
        }
        None => {
            let mut sim_cfg = SimConfig::default();
            // Jobs take a moment, as Zendesk's do.
            sim_cfg.jobs.queued_ms = 20;
            sim_cfg.jobs.working_ms = 20;
            match Simulator::start(sim_cfg).await {
                Ok(s) => Sim::Own(s),
                Err(e) => {
                    eprintln!("error: cannot start the Zendesk simulator: {e}");
                    return ExitCode::from(run_cmd::exit::WRITE);
                }
            }
        }
    };
    let cleared = match clear_previous(&dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "error: cannot remove an earlier demo's state and runs from {} ({e}); use a new folder (--dir)",
                dir.display()
            );
            return ExitCode::from(run_cmd::exit::STATE);
        }
    };
    println!("zdsync demo");
    println!("  Zendesk simulator  {} (account acme)", sim.base_url());
    println!("  bucket folder      {}", dir.display());
    if cleared {
        println!("                     (an earlier demo's state, runs and history removed)");
    }
    println!();

    let setup = || -> std::io::Result<()> {
        write_secret(
            &dir.join("config/credentials.json"),
            &format!(
                "{{\"email\": \"admin@acme.test\", \"api_token\": \"{}\"}}\n",
                zdsync_sim::DEFAULT_API_TOKEN
            ),
        )?;
        write(
            &dir.join("config/demo_users.toml"),
            &sync_toml(
                "demo_users",
                "users",
                "USER_ID",
                "exports/demo_users/",
                &sim.base_url(),
                USER_MAPPING,
            ),
        )?;
        write(
            &dir.join("config/demo_orgs.toml"),
            &sync_toml(
                "demo_orgs",
                "organizations",
                "ORG_ID",
                "exports/demo_orgs/",
                &sim.base_url(),
                ORG_MAPPING,
            ),
        )?;
        write(
            &dir.join("exports/demo_users/part-0000.csv"),
            &users_csv(users, &[], 0),
        )?;
        write(
            &dir.join("exports/demo_orgs/part-0000.csv"),
            &orgs_csv(orgs, &[]),
        )?;
        write(
            &dir.join("config/demo_key_accounts.toml"),
            &audience_toml(&sim.base_url()),
        )?;
        write(
            &dir.join("exports/demo_key_accounts/part-0000.csv"),
            &key_accounts_csv(orgs, 1),
        )
    };
    if let Err(e) = setup() {
        eprintln!(
            "error: cannot write the demo files under {}: {e}",
            dir.display()
        );
        return ExitCode::from(run_cmd::exit::STATE);
    }

    let args = RunArgs {
        json: false,
        quiet: false,
        wait: Duration::ZERO,
        trigger: "demo".into(),
        full_resync: false,
        max_rows: None,
    };
    let mut worst = run_cmd::exit::OK;
    for round in 1..=2 {
        if round == 2 {
            let changed: Vec<usize> = (0..users).step_by((users / 10).max(1)).collect();
            let org_changed: Vec<usize> = (0..orgs).step_by((orgs / 5).max(1)).collect();
            let edit = || -> std::io::Result<()> {
                write(
                    &dir.join("exports/demo_users/part-0000.csv"),
                    &users_csv(users, &changed, 5),
                )?;
                write(
                    &dir.join("exports/demo_orgs/part-0000.csv"),
                    &orgs_csv(orgs, &org_changed),
                )?;
                write(
                    &dir.join("exports/demo_key_accounts/part-0000.csv"),
                    &key_accounts_csv(orgs, 2),
                )
            };
            if let Err(e) = edit() {
                eprintln!("error: cannot rewrite the demo exports: {e}");
                return ExitCode::from(run_cmd::exit::STATE);
            }
            let (before, after) = (key_accounts(orgs, 1), key_accounts(orgs, 2));
            println!(
                "── round 2: {} users renamed, 5 users added, {} organizations changed, key accounts: {} leave and {} join; syncing again\n",
                changed.len(),
                org_changed.len(),
                before.iter().filter(|i| !after.contains(i)).count(),
                after.iter().filter(|i| !before.contains(i)).count()
            );
        } else {
            println!(
                "── round 1: first sync of {users} users and {orgs} organizations (5 user rows are invalid on purpose), and {} key accounts tagged `key_account`\n",
                key_accounts(orgs, 1).len()
            );
        }
        for sync in SYNCS {
            let path = dir.join(format!("config/{sync}.toml"));
            let cfg = match SyncConfig::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(run_cmd::exit::CONFIG);
                }
            };
            // Round 2 previews each run first (`zdsync plan`), and checks the run did just that.
            let preview = if round == 2 {
                match preview_of(&cfg, &path, &dir).await {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!("error: the preview of {sync} failed: {e}");
                        return ExitCode::from(e.error_name().exit_code());
                    }
                }
            } else {
                None
            };
            let outcome = run_cmd::run_sync(cfg, &path, &dir, &args).await;
            run_cmd::report_at(&outcome, false, Some(&dir));
            if let (Some(p), Some(rec)) = (&preview, outcome.records.last()) {
                let key = zdsync::layout::manifest_key(sync, &rec.run_id);
                let store = zdsync::store::LocalStore::new(&dir);
                match zdsync::changeset::read_manifest(&store, &key) {
                    Ok(m) if m.counts == p.report.manifest.counts => println!(
                        "  the preview (`zdsync plan`) said the same: {} to write, {} unchanged, {} invalid\n",
                        run_cmd::num(p.cost.rows),
                        run_cmd::num(m.counts.unchanged),
                        run_cmd::num(m.counts.invalid)
                    ),
                    Ok(m) => {
                        eprintln!(
                            "error: the preview of {sync} said {:?}, the run planned {:?}",
                            p.report.manifest.counts, m.counts
                        );
                        worst = run_cmd::exit::WRITE;
                    }
                    Err(e) => {
                        eprintln!("error: cannot read the run's manifest {key}: {e}");
                        worst = run_cmd::exit::WRITE;
                    }
                }
            }
            if outcome.error.is_some()
                || outcome
                    .records
                    .iter()
                    .any(|r| r.status == RunStatus::Failed)
            {
                worst = run_cmd::outcome_code(&outcome);
            }
        }
    }

    // Check the result in the simulator, row by row.
    let state = match sim.state().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read the simulator's state: {e}");
            return ExitCode::from(run_cmd::exit::WRITE);
        }
    };
    let missing = (0..users + 5)
        .filter(|i| state.user_by_external_id(&format!("u-{i:05}")).is_none())
        .count();
    let renamed = (0..users)
        .step_by((users / 10).max(1))
        .filter(|i| {
            state
                .user_by_external_id(&format!("u-{i:05}"))
                .is_some_and(|u| u["name"].as_str().is_some_and(|n| n.ends_with("(renamed)")))
        })
        .count();
    // The audience: exactly the round-2 key accounts carry the tag, and their other tags stayed.
    let want = key_accounts(orgs, 2);
    let mut wrong_tag = 0;
    let mut tagged = 0;
    for i in 0..orgs {
        let Some(o) = state.organization_by_external_id(&format!("o-{i:04}")) else {
            continue;
        };
        let tags: Vec<&str> = o["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str())
            .collect();
        let has = tags.contains(&"key_account");
        tagged += usize::from(has);
        if has != want.contains(&i) {
            wrong_tag += 1;
        }
    }
    let counters = match sim.counters().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot read the simulator's counters: {e}");
            return ExitCode::from(run_cmd::exit::WRITE);
        }
    };
    println!(
        "── the simulator now holds {} users (the admin included) and {} organizations",
        state.users.len(),
        state.organizations.len()
    );
    println!(
        "   valid user rows missing in Zendesk: {missing} · renamed users seen: {renamed} · requests served: {} · 429s: {}",
        counters.requests, counters.rate_limited
    );
    println!(
        "   organizations tagged `key_account`: {tagged} (the export lists {}) · tagged wrongly: {wrong_tag}",
        want.len()
    );
    println!(
        "   try: zdsync history {}   ·   files: {}",
        dir.join("config/demo_users.toml").display(),
        dir.display()
    );
    match sim {
        Sim::Own(s) => {
            println!(
                "   the simulator stops with the demo; to keep using plan/run on these configs, start `zdsync sim` and run `zdsync demo --sim http://127.0.0.1:8089`"
            );
            s.shutdown().await
        }
        Sim::Running(url) => println!(
            "   the simulator at {url} keeps running: `zdsync plan {}` previews the next run",
            dir.join("config/demo_users.toml").display()
        ),
    }
    if missing > 0 {
        eprintln!("error: {missing} valid rows are missing from the simulator");
        return ExitCode::from(run_cmd::exit::WRITE);
    }
    if wrong_tag > 0 {
        eprintln!(
            "error: {wrong_tag} organizations do not carry `key_account` as the audience says"
        );
        return ExitCode::from(run_cmd::exit::WRITE);
    }
    ExitCode::from(worst)
}
