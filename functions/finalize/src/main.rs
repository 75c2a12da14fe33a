//! finalize function. Until the Lambda runtime glue lands, this binary runs the same fold on a
//! local folder: `ZDSYNC_STORE=<bucket dir> finalize runs/<sync>/<run>/manifest.json` folds the
//! run's per-row outcomes into the sync's state and prints the summary.

use std::process::ExitCode;
use zdsync::changeset::{fold, read_manifest};
use zdsync::store::LocalStore;

fn main() -> ExitCode {
    let (Some(manifest_key), Ok(root)) = (std::env::args().nth(1), std::env::var("ZDSYNC_STORE"))
    else {
        eprintln!("usage: ZDSYNC_STORE=<bucket dir> finalize <manifest key>");
        return ExitCode::from(2);
    };
    let store = LocalStore::new(root);
    let result = read_manifest(&store, &manifest_key).and_then(|m| fold(&store, &m));
    match result {
        Ok(summary) => {
            println!(
                "{}",
                serde_json::to_string(&summary).expect("summary serialises")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
