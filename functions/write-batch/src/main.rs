//! write-batch Lambda: one item of the Distributed Map (a chunk of the change set) → Zendesk
//! bulk calls → per-row outcomes in S3. A retried invocation resumes from what is stored.
//! Glue only: the step is `zdsync::steps::write_step`.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use zdsync::steps::WriteInput;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let env = zdsync::aws::lambda::init()?;
    let env = &env;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<WriteInput>| async move {
            let out = zdsync::steps::write_step(env, &event.payload)
                .await
                .map_err(zdsync::aws::lambda::diagnostic)?;
            Ok::<Value, Diagnostic>(serde_json::to_value(out).expect("output serialises"))
        },
    ))
    .await
}
