//! AWS adapters for the ports: [`s3::S3Store`] (the [`ObjectStore`](crate::store::ObjectStore)
//! on a bucket) and [`secrets::SecretsManagerCredentials`] (the
//! [`CredentialStore`](crate::zendesk::CredentialStore) on a Secrets Manager secret).
//!
//! Only built with the `aws` feature. Credentials and region come from the usual AWS chain
//! (environment, profile, container or instance role) unless given in [`AwsConfig`]. When an
//! endpoint override is set (here or with `AWS_ENDPOINT_URL`), S3 uses path-style addressing, so
//! moto and other local emulators work (docs/local-aws-testing.md §3).

pub mod dynamo;
pub mod lambda;
pub mod s3;
pub mod secrets;

use crate::zendesk::Secret;
use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Where and how the SDK clients connect. `Default` is the plain AWS chain.
#[derive(Debug, Clone, Default)]
pub struct AwsConfig {
    /// The region; `None` uses the chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// An endpoint override such as `http://127.0.0.1:5000` (moto); `None` uses AWS (or
    /// `AWS_ENDPOINT_URL`).
    pub endpoint_url: Option<String>,
    /// Static access key id and secret key instead of the credential chain (tests, emulators).
    pub static_credentials: Option<(String, Secret)>,
}

impl AwsConfig {
    pub fn new(endpoint_url: Option<&str>, region: Option<&str>) -> Self {
        AwsConfig {
            region: region.map(str::to_string),
            endpoint_url: endpoint_url.map(str::to_string),
            static_credentials: None,
        }
    }

    /// Use this access key pair instead of the credential chain.
    pub fn with_static_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.static_credentials = Some((access_key_id.into(), Secret::new(secret_access_key)));
        self
    }

    /// Load the shared SDK configuration (async: the credential chain may do I/O).
    pub async fn load(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &self.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        if let Some((id, secret)) = &self.static_credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id.clone(),
                secret.expose().to_string(),
                None,
                None,
                "zdsync-static",
            ));
        }
        loader.load().await
    }
}

/// A runtime an adapter owns, shut down in the background when the last clone goes: dropping a
/// runtime inside an async context would panic.
pub(crate) struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A runtime of `workers` threads for a blocking adapter, and the SDK configuration loaded on
/// it (awaited through a channel, so this also works when called from inside an async context).
pub(crate) fn own_runtime(
    config: &AwsConfig,
    name: &str,
    workers: usize,
) -> std::io::Result<(
    std::sync::Arc<OwnedRuntime>,
    tokio::runtime::Handle,
    SdkConfig,
)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let config = config.clone();
    handle.spawn(async move {
        let _ = tx.send(config.load().await);
    });
    let shared = rx
        .recv()
        .map_err(|_| std::io::Error::other("loading the AWS configuration failed"))?;
    Ok((std::sync::Arc::new(OwnedRuntime(Some(rt))), handle, shared))
}
