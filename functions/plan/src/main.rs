//! plan function. Until the Lambda runtime glue lands, this binary runs the same handler on a
//! local folder: `ZDSYNC_STORE=<bucket dir> plan <sync.toml>` prints the small descriptor the
//! state machine passes on (run id, manifest key, counts), never rows.

use std::process::ExitCode;
use zdsync::config::SyncConfig;
use zdsync::plan::{plan, PlanOptions};
use zdsync::store::LocalStore;

fn main() -> ExitCode {
    let (Some(config), Ok(root)) = (std::env::args().nth(1), std::env::var("ZDSYNC_STORE")) else {
        eprintln!("usage: ZDSYNC_STORE=<bucket dir> plan <sync.toml>");
        return ExitCode::from(2);
    };
    let cfg = match SyncConfig::load(config.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    match plan(&LocalStore::new(root), &cfg, &PlanOptions::new(run_id)) {
        Ok(r) => {
            let out = serde_json::json!({
                "run_id": r.manifest.run_id,
                "sync": r.manifest.sync,
                "manifest_key": r.manifest_key,
                "chunks": r.manifest.chunks.len(),
                "counts": r.manifest.counts,
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
