//! `zdsync-bench audience`: an audience sync of `--members` users under mirror (all adds), then
//! a run with `--churn` % of the members replaced (that many removes and as many adds), through
//! both tag-write routes against the simulator at its account rate limit.
//!
//! Zendesk has no bulk tag add/remove for users, so the per-record route's bound is one record
//! per request: `rpm` rows/min. The bulk route (show_many + batch update_many with the full tag
//! list) carries 100 records in about two requests plus shared job polls; its figures are printed
//! against the same per-record bound (how much faster than the tag endpoints) and against its
//! own bound, rpm ÷ requests per row. Runs shorter than a minute ride the limiter's first
//! minute of budget, so use an `--rpm` that makes the cold run last minutes for bound figures.

use std::fmt::Write as _;
use std::path::Path;
use zdsync::run::RunRecord;
use zdsync_sim::{Counters, SeedData, SimConfig, Simulator};

pub struct AudienceBench {
    pub members: usize,
    pub churn_percent: f64,
    pub rpm: u32,
    pub dir: std::path::PathBuf,
    /// `bulk`, `per_record` or `both`.
    pub route: String,
}

fn members_csv(range: impl Iterator<Item = usize>) -> String {
    let mut s = String::from("member_id\n");
    for i in range {
        let _ = writeln!(s, "m{i:07}");
    }
    s
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

async fn one_run(dir: &Path, sync: &str, sim: &zdsync_sim::SimHandle) -> (RunRecord, Counters) {
    let before = sim.counters();
    let outcome = crate::sync::run_once(dir, sync).await;
    let after = sim.counters();
    let mut by = String::new();
    for (k, v) in &after.by_endpoint {
        let d = v - before.by_endpoint.get(k).copied().unwrap_or(0);
        if d > 0 {
            let _ = write!(by, "{k} {d}, ");
        }
    }
    println!("    endpoints: {}", by.trim_end_matches(", "));
    let mut d = after.clone();
    d.requests -= before.requests;
    d.rate_limited -= before.rate_limited;
    (outcome.records.last().expect("a record").clone(), d)
}

pub fn bench_audience(b: AudienceBench) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench_async(b));
}

async fn bench_async(b: AudienceBench) {
    let dir = b.dir.join(format!("audience-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let churn = ((b.members as f64 * b.churn_percent / 100.0).round() as usize).min(b.members);
    let mut sc = SimConfig::default();
    sc.rate_limit.rpm = b.rpm;
    sc.rate_limit.window_ms = 60_000;
    sc.request_log_limit = 1000;
    let sim = Simulator::start(sc).await.expect("simulator");
    let base = sim.base_url();
    // Every user the runs touch, each with a tag zdsync does not own.
    let mut seed = SeedData::default();
    for i in 0..b.members + churn {
        seed.users.push(serde_json::json!({
            "name": format!("Member {i}"),
            "email": format!("member.{i}@example-mail.com"),
            "external_id": format!("m{i:07}"),
            "tags": ["crm_import"],
        }));
    }
    sim.seed("acme", &seed).expect("seed users");
    write(
        &dir.join("credentials.json"),
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
    let routes: Vec<&str> = match b.route.as_str() {
        "both" => vec!["bulk", "per_record"],
        r => vec![r],
    };
    println!(
        "zdsync-bench audience: {} members (users) under mirror, then {:.1} % churn ({churn} leave, {churn} join); simulator limit {} requests/min",
        b.members, b.churn_percent, b.rpm
    );
    let bound = b.rpm as f64; // one record per request on the tag endpoints
    for route in routes {
        let sync = format!("aud_{route}");
        write(
            &dir.join(format!("{sync}.toml")),
            &format!(
                "name = \"{sync}\"\nobject = \"users\"\nmode = \"mirror\"\nprimary_key = \"member_id\"\nchunk_rows = 5000\n\n[source]\nlocation = \"exports/{sync}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{base}\"\ncredentials = \"file:credentials.json\"\nrate_limit_rpm = {}\n\n[audience]\ntag = \"segment_{route}\"\ntag_writes = \"{route}\"\n",
                b.rpm
            ),
        );
        let export = dir.join(format!("exports/{sync}/part-0000.csv"));
        write(&export, &members_csv(0..b.members));
        for (label, expect) in [("cold", b.members as u64), ("churn", 2 * churn as u64)] {
            if label == "churn" {
                write(&export, &members_csv(churn..b.members + churn));
            }
            println!("  {route} · {label}:");
            let (r, sim_c) = one_run(&dir, &sync, &sim).await;
            let rows = r.rows.tagged + r.rows.untagged;
            assert_eq!(rows, expect, "{route} {label}: {:?}", r.rows);
            let per_min = rows as f64 / (r.phases.write.max(1e-9) / 60.0);
            println!(
                "    {rows} rows ({} tagged, {} untagged, {} failed) · write {:.1} s → {:.0} rows/min = {:.3} × bound (bound = {} rows/min, one record per request{}) · {} requests sent ({:.4}/row) · 429s {}",
                r.rows.tagged,
                r.rows.untagged,
                r.rows.failed,
                r.phases.write,
                per_min,
                per_min / bound,
                b.rpm,
                if route == "bulk" {
                    // The bulk route is bound by requests, not records: rpm ÷ requests per row.
                    let req_per_row = r.requests.sent as f64 / rows.max(1) as f64;
                    format!(
                        "; {:.3} of its own bound rpm ÷ requests per row = {:.0} rows/min",
                        per_min / (bound / req_per_row),
                        bound / req_per_row
                    )
                } else {
                    String::new()
                },
                r.requests.sent,
                r.requests.sent as f64 / rows.max(1) as f64,
                sim_c.rate_limited,
            );
        }
    }
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
