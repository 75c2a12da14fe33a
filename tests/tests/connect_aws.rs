//! Connecting to a Secrets Manager secret (moto): `zdsync connect` creates the secret when it is
//! missing and updates it otherwise, keeping other keys; rotated OAuth tokens are written back.
//!
//! Needs moto (`ZDSYNC_MOTO`, installed by scripts/test.sh).

use std::sync::Arc;
use std::time::Duration;
use zdsync::aws::secrets::SecretsManagerCredentials;
use zdsync::fields::Object;
use zdsync::zendesk::connect::{self, OAuthApp};
use zdsync::zendesk::{Client, ClientOptions, CredentialStore, Credentials, Secret};
use zdsync_sim::{
    SimConfig, Simulator, DEFAULT_API_TOKEN, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
};
use zdsync_tests::moto::Moto;
use zdsync_tests::{ACCOUNT, ADMIN_EMAIL};

fn access_and_refresh(c: &Credentials) -> (String, String) {
    match c {
        Credentials::OAuth {
            access_token,
            refresh_token: Some(r),
            ..
        } => (access_token.expose().into(), r.expose().into()),
        other => panic!("expected OAuth with a refresh token: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_secret_is_created_updated_and_rotated() {
    let moto = Moto::start();
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let opts = ClientOptions::for_subdomain(ACCOUNT, Some(&sim.account_url(ACCOUNT)));
    let name = "zdsync/acme";

    // A missing secret is created by the first save.
    let api = Credentials::ApiToken {
        email: ADMIN_EMAIL.into(),
        token: Secret::new(DEFAULT_API_TOKEN),
    };
    connect::verify(opts.clone(), api.clone(), "t")
        .await
        .unwrap();
    let store = SecretsManagerCredentials::new(name, moto.config());
    store.save(&api).await.expect("the secret is created");
    let fresh = SecretsManagerCredentials::new(name, moto.config());
    assert_eq!(fresh.load().await.unwrap(), api);

    // Connecting again with OAuth replaces the API token in the same secret.
    let app = OAuthApp::new(
        &opts,
        DEFAULT_CLIENT_ID,
        Some(Secret::new(DEFAULT_CLIENT_SECRET)),
    );
    let creds = connect::authorize(
        &app,
        connect::SYNC_SCOPES,
        0,
        Duration::from_secs(20),
        |url| {
            let url = url.to_string();
            tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
        },
    )
    .await
    .unwrap();
    SecretsManagerCredentials::new(name, moto.config())
        .save(&creds)
        .await
        .expect("the secret is updated");
    let store = Arc::new(SecretsManagerCredentials::new(name, moto.config()));
    assert_eq!(store.load().await.unwrap(), creds);

    // The run refreshes an expired token and writes the rotated pair back to the secret.
    let (access, refresh) = access_and_refresh(&creds);
    assert!(sim.expire_token(ACCOUNT, &access));
    let client = Client::new(opts.clone(), store.clone()).await.unwrap();
    client.preflight(Object::Tickets, true).await.unwrap();
    assert_eq!(client.stats().token_refreshes, 1);
    let stored = SecretsManagerCredentials::new(name, moto.config())
        .load()
        .await
        .unwrap();
    let (access2, refresh2) = access_and_refresh(&stored);
    assert_ne!(access2, access);
    assert_ne!(refresh2, refresh);
    let report = connect::check(&client, &stored).await.unwrap();
    assert!(report.can_write(Object::Tickets));

    // An ARN that does not exist is not created: the error says what to do.
    let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:zdsync-missing-AbCdEf";
    let err = SecretsManagerCredentials::new(arn, moto.config())
        .save(&api)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    assert!(!err.contains(DEFAULT_API_TOKEN), "{err}");
}
