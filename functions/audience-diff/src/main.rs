//! audience-diff Lambda: membership now vs last run → tag operations in chunks. Audience syncs
//! arrive with their own issue; until then this function refuses with `ConfigInvalid`, so a
//! config that asks for one fails clearly instead of doing something else.

use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    zdsync::aws::lambda::init_tracing();
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        tracing::warn!(sync = %event.payload["sync"], "audience syncs are not available in this build");
        Err::<Value, Diagnostic>(Diagnostic {
            error_type: "ConfigInvalid".into(),
            error_message: "audience syncs (add, remove, mirror, upsert) are not available in this build yet".into(),
        })
    }))
    .await
}
