//! plan Lambda: the execution input (an S3 "Object Created" event, a schedule's or a manual
//! start's `{"sync": ...}`) → change set in S3 → a small descriptor for the state machine.
//! Glue only: the step is `zdsync::steps::plan_step`.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = zdsync::aws::lambda::init()?;
    let env = &env;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let trigger = zdsync::steps::parse_plan_payload(&event.payload)
            .map_err(zdsync::aws::lambda::diagnostic)?;
        let d = zdsync::steps::plan_step(env, &trigger)
            .await
            .map_err(zdsync::aws::lambda::diagnostic)?;
        Ok::<Value, Diagnostic>(serde_json::to_value(d).expect("descriptor serialises"))
    }))
    .await
}
