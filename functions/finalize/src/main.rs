//! finalize Lambda: the execution state (`plan.run`, and `error` on the failure path) → state
//! folded, run record written, lock released. Also EventBridge's notice of an execution that
//! ended without finalizing (its lock goes to the next run). Glue only: the steps are
//! `zdsync::steps::finalize_step` and `zdsync::steps::execution_ended_step`.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = zdsync::aws::lambda::init()?;
    let env = &env;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        if event.payload["detail-type"] == "Step Functions Execution Status Change" {
            let ended: zdsync::steps::ExecutionEnded = serde_json::from_value(event.payload)
                .map_err(|e| {
                    zdsync::aws::lambda::named(
                        zdsync::errors::ErrorName::ConfigInvalid,
                        format!("an execution status change without its detail: {e}"),
                    )
                })?;
            let released = zdsync::steps::execution_ended_step(env, &ended)
                .await
                .map_err(zdsync::aws::lambda::diagnostic)?;
            return Ok::<Value, Diagnostic>(serde_json::json!({ "released": released }));
        }
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
