//! audience-diff Lambda: plan's descriptor of an audience run → the membership export against
//! the membership state → tag-operation chunks in S3 → the descriptor write-batch's Map reads.
//! Glue only: the step is `zdsync::steps::audience_diff_step`.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use zdsync::steps::PlanDescriptor;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = zdsync::aws::lambda::init()?;
    let env = &env;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let input: PlanDescriptor = serde_json::from_value(event.payload).map_err(|e| {
            zdsync::aws::lambda::named(
                zdsync::errors::ErrorName::ConfigInvalid,
                format!("audience-diff expects plan's run descriptor: {e}"),
            )
        })?;
        let d = zdsync::steps::audience_diff_step(env, &input)
            .await
            .map_err(zdsync::aws::lambda::diagnostic)?;
        Ok::<Value, Diagnostic>(serde_json::to_value(d).expect("descriptor serialises"))
    }))
    .await
}
