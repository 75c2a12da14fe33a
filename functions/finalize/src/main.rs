//! finalize Lambda: the execution state (`plan.run`, and `error` on the failure path) → state
//! folded, run record written, lock released. Glue only: the step is
//! `zdsync::steps::finalize_step`.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = zdsync::aws::lambda::init()?;
    let env = &env;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let raw = event.payload.get("state").cloned().unwrap_or(Value::Null);
        let state =
            zdsync::steps::FinalizeState::parse(&raw).map_err(zdsync::aws::lambda::diagnostic)?;
        let rec = zdsync::steps::finalize_step(env, &state)
            .await
            .map_err(zdsync::aws::lambda::diagnostic)?;
        Ok::<Value, Diagnostic>(serde_json::to_value(rec).expect("record serialises"))
    }))
    .await
}
