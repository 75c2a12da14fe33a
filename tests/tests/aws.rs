//! The AWS adapters against a local moto server (docs/local-aws-testing.md §2–3): S3 object
//! store round trip, plan reading its export from S3, Secrets Manager credentials.
//!
//! Needs `moto_server`: `ZDSYNC_MOTO` names it (scripts/test.sh installs it in a venv), else it
//! is looked up on `PATH`. Without it the tests fail: they never skip silently.

use zdsync::aws::s3::S3Store;
use zdsync::aws::secrets::SecretsManagerCredentials;
use zdsync::config::SyncConfig;
use zdsync::plan::{plan, PlanOptions};
use zdsync::store::ObjectStore;
use zdsync::zendesk::{credential_store, CredentialStore, Credentials, Secret};

use zdsync_tests::moto::Moto;

fn store(moto: &Moto, bucket: &str) -> S3Store {
    let store = S3Store::with_config(bucket, moto.config()).unwrap();
    store.ensure_bucket().unwrap();
    store
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn s3_store_round_trip() {
    let moto = Moto::start();
    let store = store(&moto, "zdsync-test");

    // put + streamed open, read in small pieces across several body chunks.
    let big = pattern(3 * 1024 * 1024 + 17, 1);
    store.put("data/big.bin", &big).unwrap();
    let mut r = store.open("data/big.bin").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 7000];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == big, "streamed bytes differ");
    let err = store.open("data/missing.bin").err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

    // local_path: a temporary copy that goes away with the guard.
    let local = store.local_path("data/big.bin").unwrap();
    assert_eq!(std::fs::read(local.path()).unwrap(), big);
    let p = local.path().to_path_buf();
    drop(local);
    assert!(!p.exists());

    // head
    assert_eq!(
        store.head("data/big.bin").unwrap().map(|m| m.size),
        Some(big.len() as u64)
    );
    assert_eq!(store.head("data/nope").unwrap(), None);

    // list across pages (S3 returns at most 1000 keys per page).
    let n = 1010;
    std::thread::scope(|s| {
        for t in 0..5 {
            let store = &store;
            s.spawn(move || {
                for i in (t..n).step_by(5) {
                    store
                        .put(&format!("many/k{i:05}"), format!("{i}").as_bytes())
                        .unwrap();
                }
            });
        }
    });
    let listed = store.list("many/").unwrap();
    assert_eq!(listed.len(), n);
    assert_eq!(listed[0].key, "many/k00000");
    assert_eq!(listed[n - 1].key, format!("many/k{:05}", n - 1));
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(store.list("many/k0100").unwrap().len(), 10);

    // put_if_absent twice: the second loses.
    assert!(store.put_if_absent("locks/sync", b"first").unwrap());
    assert!(!store.put_if_absent("locks/sync", b"second").unwrap());
    let mut lock = String::new();
    store
        .open("locks/sync")
        .unwrap()
        .read_to_string(&mut lock)
        .unwrap();
    assert_eq!(lock, "first");

    // Compare-and-swap on the ETag: a tag read before another writer's swap is spent.
    let (bytes, tag) = store.get_tagged("locks/sync").unwrap().unwrap();
    assert_eq!(bytes, b"first");
    assert!(store.put_if_match("locks/sync", b"renewed", &tag).unwrap());
    assert!(!store.put_if_match("locks/sync", b"late", &tag).unwrap());
    assert!(!store.delete_if_match("locks/sync", &tag).unwrap());
    let (bytes, tag2) = store.get_tagged("locks/sync").unwrap().unwrap();
    assert_eq!(bytes, b"renewed");
    assert!(store.delete_if_match("locks/sync", &tag2).unwrap());
    assert!(store.get_tagged("locks/sync").unwrap().is_none());
    assert!(!store.put_if_match("locks/sync", b"gone", &tag2).unwrap());
    assert!(store.put_if_absent("locks/sync", b"again").unwrap());

    // delete_prefix in batches of 1000.
    store.delete_prefix("many/").unwrap();
    assert!(store.list("many/").unwrap().is_empty());
    assert!(store.head("data/big.bin").unwrap().is_some());

    // create + commit: 20 MiB goes up in parts; nothing is visible before commit.
    let large = pattern(20 * 1024 * 1024 + 3, 2);
    let mut w = store.create("out/large.bin").unwrap();
    for piece in large.chunks(1_000_003) {
        w.write_all(piece).unwrap();
    }
    assert_eq!(store.head("out/large.bin").unwrap(), None);
    w.commit().unwrap();
    assert_eq!(
        store.head("out/large.bin").unwrap().map(|m| m.size),
        Some(large.len() as u64)
    );
    let mut back = Vec::with_capacity(large.len());
    store
        .open("out/large.bin")
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == large, "multipart object differs");
    // A small writer goes up in one PutObject; a dropped writer uploads nothing.
    let mut w = store.create("out/small.txt").unwrap();
    w.write_all(b"hello").unwrap();
    w.commit().unwrap();
    assert_eq!(
        store.head("out/small.txt").unwrap().map(|m| m.size),
        Some(5)
    );
    let mut w = store.create("out/dropped.txt").unwrap();
    w.write_all(b"x").unwrap();
    drop(w);
    assert_eq!(store.head("out/dropped.txt").unwrap(), None);

    // delete: idempotent.
    store.delete("out/small.txt").unwrap();
    store.delete("out/small.txt").unwrap();
    assert_eq!(store.head("out/small.txt").unwrap(), None);
}

/// As the Lambdas use it: the store is built inside an async runtime, used from that runtime's
/// `spawn_blocking` and dropped back in async context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_reads_its_export_from_s3() {
    let moto = Moto::start();
    let store = S3Store::with_config("zdsync-plan", moto.config()).unwrap();
    let store = tokio::task::spawn_blocking(move || {
        plan_on_s3(&store);
        store
    })
    .await
    .unwrap();
    drop(store);
}

fn plan_on_s3(store: &S3Store) {
    store.ensure_bucket().unwrap();
    let mut csv = String::from("id,name,email,score\n");
    for i in 0..250 {
        csv.push_str(&format!("p{i},Person {i},person{i}@example.com,{i}\n"));
    }
    store
        .put("exports/people/part-0.csv", csv.as_bytes())
        .unwrap();
    let cfg = SyncConfig::parse(
        r#"
name = "people"
object = "users"
mode = "upsert"
primary_key = "id"
chunk_rows = 100

[source]
location = "exports/people/"

[zendesk]
subdomain = "acme"

[mapping]
name = "name"
email = "email"
"user_fields.score" = { column = "score", type = "integer" }
"#,
        "people.toml",
    )
    .unwrap();
    let report = plan(store, &cfg, &PlanOptions::new("r1")).unwrap();
    let c = &report.manifest.counts;
    assert_eq!((c.rows_read, c.invalid, c.create), (250, 0, 250));
    assert_eq!(report.manifest.chunks.len(), 3);
    let manifest_key = report.manifest_key.unwrap();
    assert!(store.head(&manifest_key).unwrap().is_some());
    for chunk in &report.manifest.chunks {
        assert!(store.head(&chunk.key).unwrap().is_some(), "{}", chunk.key);
    }
}

fn oauth(access: &str, refresh: &str, expires_at: i64) -> Credentials {
    Credentials::OAuth {
        access_token: Secret::new(access),
        refresh_token: Some(Secret::new(refresh)),
        client_id: Some("zdsync".into()),
        client_secret: Some(Secret::new("client-secret-1")),
        expires_at: Some(expires_at),
        grant_scope: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_load_save_and_cache() {
    let moto = Moto::start();
    let config = moto.config();
    let sm = aws_sdk_secretsmanager::Client::new(&config.load().await);
    sm.create_secret()
        .name("zdsync/zendesk")
        .secret_string(
            serde_json::json!({
                "subdomain": "acme",
                "access_token": "access-1",
                "refresh_token": "refresh-1",
                "client_id": "zdsync",
                "client_secret": "client-secret-1",
                "expires_at": 1_700_000_000
            })
            .to_string(),
        )
        .send()
        .await
        .unwrap();

    let store = SecretsManagerCredentials::new("zdsync/zendesk", config.clone());
    assert!(store.describe().contains("zdsync/zendesk"));
    assert_eq!(
        store.load().await.unwrap(),
        oauth("access-1", "refresh-1", 1_700_000_000)
    );

    // Save a rotated pair: written back, other keys kept.
    let rotated = oauth("access-2", "refresh-2", 1_800_000_000);
    store.save(&rotated).await.unwrap();
    let raw = sm
        .get_secret_value()
        .secret_id("zdsync/zendesk")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(raw.secret_string().unwrap()).unwrap();
    assert_eq!(v["access_token"], "access-2");
    assert_eq!(v["refresh_token"], "refresh-2");
    assert_eq!(v["expires_at"], 1_800_000_000);
    assert_eq!(v["subdomain"], "acme");

    // Cached: a change behind the store's back is not seen; a fresh store sees the secret.
    sm.put_secret_value()
        .secret_id("zdsync/zendesk")
        .secret_string(r#"{"email":"admin@example.com","api_token":"api-token-9"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(store.load().await.unwrap(), rotated);
    let fresh = SecretsManagerCredentials::new("zdsync/zendesk", config.clone());
    assert_eq!(
        fresh.load().await.unwrap(),
        Credentials::ApiToken {
            email: "admin@example.com".into(),
            token: Secret::new("api-token-9"),
        }
    );

    // Errors name the secret, never its value.
    sm.create_secret()
        .name("zdsync/bad")
        .secret_string(r#"{"access_token": 5, "refresh_token": "sekrit-refresh"}"#)
        .send()
        .await
        .unwrap();
    let err = SecretsManagerCredentials::new("zdsync/bad", config.clone())
        .load()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("zdsync/bad") && err.contains("access_token"),
        "{err}"
    );
    assert!(!err.contains("sekrit"), "{err}");
    let err = SecretsManagerCredentials::new("zdsync/missing", config)
        .load()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("zdsync/missing"), "{err}");

    // References.
    let dir = std::path::Path::new(".");
    let s = credential_store("secretsmanager:zdsync/zendesk", dir).unwrap();
    assert!(s.describe().contains("zdsync/zendesk"));
    let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:zdsync-AbCdEf";
    assert!(credential_store(arn, dir).unwrap().describe().contains(arn));
    assert!(credential_store("secretsmanager:", dir).is_err());
}

/// The shared Zendesk budget in DynamoDB: a window grants its cap and no more, the next window
/// starts fresh, and job slots are taken, given back, and free again once their lease ran out.
#[test]
fn dynamodb_budget_windows_and_job_slots() {
    use zdsync::aws::dynamo::DynamoBudget;
    use zdsync::zendesk::budget::BudgetStore;
    let moto = Moto::start();
    let b = DynamoBudget::new("zdsync-budget", moto.config()).unwrap();
    b.create_table().unwrap();
    assert_eq!(b.take("acct", 100, 30, 70, 0).unwrap(), 30);
    assert_eq!(b.take("acct", 100, 30, 70, 0).unwrap(), 30);
    assert_eq!(b.take("acct", 100, 30, 70, 0).unwrap(), 10, "what is left");
    assert_eq!(b.take("acct", 100, 30, 70, 0).unwrap(), 0);
    assert_eq!(b.take("other", 100, 30, 70, 0).unwrap(), 30);
    assert_eq!(
        b.take("acct", 101, 30, 70, 0).unwrap(),
        30,
        "a fresh window"
    );
    // Unspent requests below the floor are forfeit: 60 released, at most 10 of them unspent.
    assert_eq!(b.take("acct", 101, 30, 60, 50).unwrap(), 10);
    assert_eq!(b.take("acct", 101, 30, 60, 50).unwrap(), 0);
    assert_eq!(
        b.take("acct", 102, 30, 70, 20).unwrap(),
        30,
        "a fresh window past its floor"
    );
    assert_eq!(
        b.take("acct", 102, 30, 70, 60).unwrap(),
        10,
        "20 + 30 taken, floor 60"
    );
    assert_eq!(
        b.take("acct", 100, 30, 70, 0).unwrap(),
        0,
        "a window already over"
    );

    // Takers racing for one window are not tested here: moto evaluates a condition and writes
    // without a lock between them (DynamoDB's conditional writes are atomic), so a race can
    // pass the cap there. The local store's test races 8 takers (zendesk::budget tests).
    // Job slots: at most `max` held, given back, or free again once a lease ran out.
    assert_eq!(
        b.take_job("acct", "j1", 2, 20_000, 10_000).unwrap(),
        Some(1)
    );
    assert_eq!(
        b.take_job("acct", "j2", 2, 20_000, 10_000).unwrap(),
        Some(2)
    );
    assert!(b
        .take_job("acct", "j3", 2, 20_000, 10_000)
        .unwrap()
        .is_none());
    assert!(b
        .take_job("other", "j3", 2, 20_000, 10_000)
        .unwrap()
        .is_some());
    // A lease names its job once submitted; any writer sees it and may free it.
    assert!(b.open_jobs("acct", 10_000).unwrap().is_empty());
    b.job_started("acct", "j1", "job-1").unwrap();
    b.job_started("acct", "not-held", "job-x").unwrap();
    let open = b.open_jobs("acct", 10_000).unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(
        (open[0].holder.as_str(), open[0].job.as_str()),
        ("j1", "job-1")
    );
    b.end_jobs("acct", &["j1".into(), "never-held".into()])
        .unwrap();
    assert!(b.open_jobs("acct", 10_000).unwrap().is_empty());
    assert!(b
        .take_job("acct", "j3", 2, 40_000, 11_000)
        .unwrap()
        .is_some());
    assert!(
        b.take_job("acct", "j4", 2, 40_000, 25_000)
            .unwrap()
            .is_some(),
        "j2 ran out"
    );
    assert!(b
        .take_job("acct", "j5", 2, 40_000, 25_000)
        .unwrap()
        .is_none());
    b.job_started("acct", "j4", "job-4").unwrap();
    assert_eq!(b.open_jobs("acct", 25_000).unwrap().len(), 1);
    assert!(b.open_jobs("acct", 40_000).unwrap().is_empty(), "ran out");
    assert!(b.claim_poll("acct", 50_000, 300).unwrap());
    assert!(
        !b.claim_poll("acct", 50_200, 300).unwrap(),
        "claimed 200 ms ago"
    );
    assert!(b.claim_poll("acct", 50_300, 300).unwrap());
    assert!(b.claim_poll("fresh", 50_300, 300).unwrap(), "no item yet");
    // Finished jobs' statuses kept for their writers (30 of them: more than one batch write).
    let done: Vec<(String, String)> = (0..30)
        .map(|i| {
            (
                format!("job{i}"),
                format!(r#"{{"id":"job{i}","status":"completed"}}"#),
            )
        })
        .chain([("../bad".to_string(), "{}".to_string())])
        .collect();
    b.put_done("acct", &done).unwrap();
    let want: Vec<String> = ["job0", "job29", "job99", "../bad"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut got = b.take_done("acct", &want).unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "job0".to_string(),
                r#"{"id":"job0","status":"completed"}"#.to_string()
            ),
            (
                "job29".to_string(),
                r#"{"id":"job29","status":"completed"}"#.to_string()
            ),
        ]
    );
    assert!(
        b.take_done("other", &want).unwrap().is_empty(),
        "another account"
    );
    // The account's budget items are untouched by the kept statuses.
    assert!(b.claim_poll("acct", 60_000, 300).unwrap());
}
