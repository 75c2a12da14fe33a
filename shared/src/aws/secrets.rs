//! The credential-store port on an AWS Secrets Manager secret.
//!
//! The secret string holds the same JSON as a credentials file (`{"email", "api_token"}` or
//! `{"access_token", "refresh_token", "client_id", "client_secret", "expires_at"}`). It is read
//! once per process (a Lambda container) and cached; rotated OAuth tokens are written back with
//! `PutSecretValue` and replace the cache. Saving to a secret that does not exist creates it
//! (`zdsync connect` to a new secret name). Error messages name the secret, never its value.

use super::AwsConfig;
use crate::zendesk::auth::{merge_credentials_json, parse_credentials_json};
use crate::zendesk::{CredentialStore, Credentials, ZendeskError};
use aws_sdk_secretsmanager::error::DisplayErrorContext;
use aws_sdk_secretsmanager::Client;
use futures::future::BoxFuture;
use std::fmt;
use std::sync::Mutex;

/// Zendesk credentials in a Secrets Manager secret.
pub struct SecretsManagerCredentials {
    secret_id: String,
    config: AwsConfig,
    client: tokio::sync::OnceCell<Client>,
    cache: Mutex<Option<Credentials>>,
    write_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for SecretsManagerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsManagerCredentials")
            .field("secret_id", &self.secret_id)
            .finish_non_exhaustive()
    }
}

impl SecretsManagerCredentials {
    /// The secret `secret_id` (a name or an ARN), reached with `config`.
    pub fn new(secret_id: impl Into<String>, config: AwsConfig) -> Self {
        SecretsManagerCredentials {
            secret_id: secret_id.into(),
            config,
            client: tokio::sync::OnceCell::new(),
            cache: Mutex::new(None),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// From a sync config's `credentials` reference: `arn:aws:secretsmanager:<region>:...`
    /// (the region is taken from the ARN) or `secretsmanager:<name>` (region and endpoint from
    /// the environment).
    pub fn from_reference(reference: &str) -> Result<Self, ZendeskError> {
        let reference = reference.trim();
        if reference.starts_with("arn:aws:secretsmanager:") {
            let region = reference
                .split(':')
                .nth(3)
                .filter(|r| !r.is_empty())
                .map(str::to_string);
            if region.is_none() || reference.split(':').count() < 7 {
                return Err(ZendeskError::Credentials {
                    message: "malformed Secrets Manager ARN: expected \
                              `arn:aws:secretsmanager:<region>:<account>:secret:<name>`"
                        .into(),
                });
            }
            let config = AwsConfig {
                region,
                ..AwsConfig::default()
            };
            return Ok(Self::new(reference, config));
        }
        match reference.strip_prefix("secretsmanager:").map(str::trim) {
            Some(name) if !name.is_empty() => Ok(Self::new(name, AwsConfig::default())),
            _ => Err(ZendeskError::Credentials {
                message: "`secretsmanager:` needs a secret name, e.g. \
                          `secretsmanager:zdsync/zendesk`"
                    .into(),
            }),
        }
    }

    pub fn secret_id(&self) -> &str {
        &self.secret_id
    }

    fn err(&self, what: impl fmt::Display) -> ZendeskError {
        ZendeskError::Credentials {
            message: format!("Secrets Manager secret `{}`: {what}", self.secret_id),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async { Client::new(&self.config.load().await) })
            .await
    }

    /// The secret's current string.
    async fn fetch(&self) -> Result<String, ZendeskError> {
        let resp = self
            .client()
            .await
            .get_secret_value()
            .secret_id(&self.secret_id)
            .send()
            .await
            .map_err(|e| self.err(format_args!("cannot read it ({})", DisplayErrorContext(&e))))?;
        match (resp.secret_string(), resp.secret_binary()) {
            (Some(s), _) => Ok(s.to_string()),
            (None, Some(b)) => String::from_utf8(b.as_ref().to_vec())
                .map_err(|_| self.err("the binary secret is not UTF-8 JSON")),
            (None, None) => Err(self.err("the secret has no value")),
        }
    }

    fn context(&self) -> String {
        format!("Secrets Manager secret `{}`", self.secret_id)
    }
}

/// Remove every secret of `creds` from `message` (belt and braces: SDK errors should not
/// contain secret values, but a message must never carry one).
fn scrub(message: String, creds: &Credentials) -> String {
    creds
        .secrets()
        .iter()
        .filter(|s| !s.is_empty())
        .fold(message, |m, s| m.replace(s.as_str(), "[redacted]"))
}

impl CredentialStore for SecretsManagerCredentials {
    fn load(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move {
            if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                return Ok(c);
            }
            let text = self.fetch().await?;
            let creds = parse_credentials_json(text.as_bytes(), &self.context())?;
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
            Ok(creds)
        })
    }

    fn reload(&self) -> BoxFuture<'_, Result<Credentials, ZendeskError>> {
        Box::pin(async move {
            let text = self.fetch().await?;
            let creds = parse_credentials_json(text.as_bytes(), &self.context())?;
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
            Ok(creds)
        })
    }

    fn save<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<(), ZendeskError>> {
        Box::pin(async move {
            let _guard = self.write_lock.lock().await;
            // Keep whatever else the secret holds (subdomain, notes).
            let mut obj = match self.fetch().await {
                Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                },
                Err(_) => serde_json::Map::new(),
            };
            merge_credentials_json(&mut obj, creds);
            let text = serde_json::Value::Object(obj).to_string();
            let put = self
                .client()
                .await
                .put_secret_value()
                .secret_id(&self.secret_id)
                .secret_string(text.clone())
                .send()
                .await;
            let missing = matches!(&put, Err(e) if e
                .as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()));
            let scrubbed = |e: &dyn fmt::Display| {
                self.err(scrub(format!("cannot save the credentials ({e})"), creds))
            };
            if missing && !self.secret_id.starts_with("arn:") {
                // `zdsync connect` to a secret that does not exist yet: create it.
                self.client()
                    .await
                    .create_secret()
                    .name(&self.secret_id)
                    .description("Zendesk credentials for zdsync (written by `zdsync connect`)")
                    .secret_string(text)
                    .send()
                    .await
                    .map_err(|e| scrubbed(&DisplayErrorContext(&e)))?;
                tracing::info!(secret = %self.secret_id, "Secrets Manager secret created");
            } else if let Err(e) = put {
                let mut err = scrubbed(&DisplayErrorContext(&e));
                if missing {
                    if let ZendeskError::Credentials { message } = &mut err {
                        message.push_str(
                            "; the secret does not exist: create it, or name it \
                             `secretsmanager:<name>` so zdsync creates it",
                        );
                    }
                }
                return Err(err);
            }
            *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(creds.clone());
            Ok(())
        })
    }

    fn describe(&self) -> String {
        format!("Secrets Manager secret `{}`", self.secret_id)
    }
}
