//! The deployment end to end, offline: the real state machine (statemachine/sync.asl.json) run by
//! moto's Step Functions interpreter, invoking the real Lambda binaries under `cargo lambda
//! watch` through the loopback router (scripts/lambda_router.py), with the export, config,
//! change sets and run records in moto's S3, the Zendesk secret in moto's Secrets Manager, and
//! the simulator as Zendesk.
//!
//! ```text
//!  moto ASL engine ──(MOTO_PORT)──► router ──► cargo lambda watch (Invoke API)
//!                                          └─► moto_server          (everything else)
//! ```
//!
//! Needs moto_server (`ZDSYNC_MOTO`) with python3 and cargo-lambda beside it, and the function
//! binaries built: scripts/test.sh installs and builds all of it and runs this test with
//! `--ignored`.

use serde_json::{json, Value};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use zdsync::errors::ErrorName;
use zdsync_sim::faults::{FaultKind, FaultRule};
use zdsync_sim::{SimConfig, Simulator};

const BUCKET: &str = "zdsync-e2e";
const REGION: &str = "us-east-1";
const ACCOUNT_ID: &str = "123456789012";
const SECRET: &str = "zdsync/zendesk";
const BUDGET_TABLE: &str = "zdsync-budget";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A process group started for the test, stopped by its PID (SIGTERM to the group, then
/// SIGKILL) when dropped: `cargo lambda watch` has children of its own.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn start(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name, child }
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.signal("-KILL");
        let _ = self.child.wait();
        eprintln!("{} was killed", self.name);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, proc: &mut Proc, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(s)) = proc.child.try_wait() {
            panic!("{what} exited ({s}) before listening on {port}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Tools from the moto venv: moto_server, its python3, and cargo-lambda beside it.
struct Tools {
    moto: PathBuf,
    python: PathBuf,
    cargo_lambda: PathBuf,
}

fn tools() -> Tools {
    let moto = zdsync_tests::moto::binary();
    let bin = moto.parent().unwrap().to_path_buf();
    let t = Tools {
        moto,
        python: bin.join("python3"),
        cargo_lambda: bin.join("cargo-lambda"),
    };
    for p in [&t.moto, &t.python, &t.cargo_lambda] {
        assert!(
            p.exists(),
            "{} is missing: run scripts/test.sh",
            p.display()
        );
    }
    t
}

/// moto's APIs over plain HTTP (it does not check signatures; the Authorization header only
/// names the service and region).
struct Aws {
    http: reqwest::Client,
    url: String,
}

impl Aws {
    fn auth(service: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=testing/20261125/{REGION}/{service}/aws4_request, \
             SignedHeaders=host, Signature=0"
        )
    }

    async fn json(&self, service: &str, target: &str, body: Value) -> Value {
        let content_type = if service == "states" || service == "dynamodb" {
            "application/x-amz-json-1.0"
        } else {
            "application/x-amz-json-1.1"
        };
        let r = self
            .http
            .post(&self.url)
            .header("Authorization", Self::auth(service))
            .header("X-Amz-Target", target)
            .header("Content-Type", content_type)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{target}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    async fn sfn(&self, op: &str, body: Value) -> Value {
        self.json("states", &format!("AWSStepFunctions.{op}"), body)
            .await
    }

    /// PUT an object; returns its ETag.
    async fn put(&self, key: &str, body: &[u8]) -> String {
        let r = self
            .http
            .put(format!("{}/{BUCKET}/{key}", self.url))
            .header("Authorization", Self::auth("s3"))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "PUT {key}: {}", r.status());
        r.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string()
    }

    async fn get(&self, key: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}/{BUCKET}/{key}", self.url))
            .header("Authorization", Self::auth("s3"))
            .send()
            .await
            .unwrap();
        if r.status() == 404 {
            return None;
        }
        assert!(r.status().is_success(), "GET {key}: {}", r.status());
        Some(r.text().await.unwrap())
    }

    /// Keys under a prefix (one page is plenty here).
    async fn list(&self, prefix: &str) -> Vec<String> {
        let r = self
            .http
            .get(format!(
                "{}/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}",
                self.url
            ))
            .header("Authorization", Self::auth("s3"))
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap();
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

/// The definition as SAM substitutes it, with every retry interval cut to a second so the
/// failure path runs in seconds (the structure, error names and attempt counts stay).
fn definition() -> String {
    let text = std::fs::read_to_string(root().join("statemachine/sync.asl.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    fn shorten(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Array(retry)) = m.get_mut("Retry") {
                    for r in retry {
                        r["IntervalSeconds"] = json!(1);
                        r["BackoffRate"] = json!(1.0);
                        if r.get("MaxDelaySeconds").is_some() {
                            r["MaxDelaySeconds"] = json!(2);
                        }
                    }
                }
                m.values_mut().for_each(shorten);
            }
            Value::Array(a) => a.iter_mut().for_each(shorten),
            _ => {}
        }
    }
    shorten(&mut v);
    let mut text = v.to_string();
    for (placeholder, function) in [
        ("PlanFunctionArn", "plan"),
        ("WriteBatchFunctionArn", "write-batch"),
        ("AudienceDiffFunctionArn", "audience-diff"),
        ("FinalizeFunctionArn", "finalize"),
    ] {
        // The function part of the ARN is the binary name: that is what watch serves.
        text = text.replace(
            &format!("${{{placeholder}}}"),
            &format!("arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{function}"),
        );
    }
    text = text.replace("${BucketName}", BUCKET);
    assert!(!text.contains("${"), "unsubstituted placeholder in {text}");
    text
}

struct Stack {
    aws: Aws,
    machine: String,
    executions: std::sync::atomic::AtomicU32,
    _procs: Vec<Proc>,
    _logs: tempfile::TempDir,
}

impl Stack {
    /// Start an execution and wait (bounded) for its end; returns the DescribeExecution answer.
    async fn execute(&self, input: &Value) -> Value {
        let started = self
            .aws
            .sfn(
                "StartExecution",
                json!({
                    "stateMachineArn": self.machine,
                    "name": format!("e2e-{}", self.executions.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                    "input": input.to_string()
                }),
            )
            .await;
        let arn = started["executionArn"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let d = self
                .aws
                .sfn("DescribeExecution", json!({"executionArn": arn}))
                .await;
            if d["status"] != "RUNNING" {
                if d["status"] != "SUCCEEDED" {
                    let h = self
                        .aws
                        .sfn(
                            "GetExecutionHistory",
                            json!({"executionArn": arn, "maxResults": 1000}),
                        )
                        .await;
                    for e in h["events"].as_array().into_iter().flatten() {
                        let detail = e
                            .as_object()
                            .and_then(|o| o.iter().find(|(k, _)| k.ends_with("EventDetails")))
                            .map(|(_, v)| v.to_string())
                            .unwrap_or_default();
                        let cut: String = detail.chars().take(400).collect();
                        eprintln!("history: {} {cut}", e["type"]);
                    }
                }
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "execution still running after 240 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["moto.log", "router.log", "watch.log"] {
            let text = std::fs::read_to_string(self._logs.path().join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            all.push_str(&format!("--- {name} (last lines, newest first)\n"));
            all.push_str(&tail.join("\n"));
            all.push('\n');
        }
        all
    }
}

/// Invoke a function directly through watch and time it.
async fn invoke(port: u16, function: &str, payload: &Value) -> (Duration, u16, String) {
    let t = Instant::now();
    let r = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{port}/2015-03-31/functions/{function}/invocations"
        ))
        .body(payload.to_string())
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (t.elapsed(), status, text)
}

fn export(rows: std::ops::Range<u32>, plan: &str) -> String {
    let mut csv = String::from("ID,NAME,EMAIL,PLAN\n");
    for i in rows {
        csv.push_str(&format!("p{i:04},Person {i},p{i}@example.com,{plan}\n"));
    }
    csv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto + cargo-lambda and the built function binaries: scripts/test.sh runs it"]
async fn the_state_machine_syncs_an_s3_export_through_the_real_lambdas() {
    let wall = Instant::now();
    let t = tools();
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let sim_url = sim.base_url();
    let logs = tempfile::tempdir().unwrap();
    let (moto_port, router_port, watch_port) = (free_port(), free_port(), free_port());
    let moto_url = format!("http://127.0.0.1:{moto_port}");

    // moto, whose ASL engine calls AWS at localhost:$MOTO_PORT, the router's port.
    let mut moto = Proc::start(
        "moto_server",
        Command::new(&t.moto)
            .args(["-H", "127.0.0.1", "-p", &moto_port.to_string()])
            .env("MOTO_PORT", router_port.to_string()),
        &logs.path().join("moto.log"),
    );
    wait_for_port(moto_port, "moto_server", &mut moto, Duration::from_secs(60));
    let mut router = Proc::start(
        "router",
        Command::new(&t.python).args([
            root().join("scripts/lambda_router.py").to_str().unwrap(),
            "--port",
            &router_port.to_string(),
            "--moto-port",
            &moto_port.to_string(),
            "--lambda-port",
            &watch_port.to_string(),
        ]),
        &logs.path().join("router.log"),
    );
    wait_for_port(router_port, "router", &mut router, Duration::from_secs(30));
    // The functions' environment, as the template sets it, pointed at moto.
    let mut watch_cmd = Command::new(&t.cargo_lambda);
    watch_cmd
        .args([
            "lambda",
            "watch",
            "-A",
            "127.0.0.1",
            "-P",
            &watch_port.to_string(),
            "--ignore-changes",
            "--concurrency",
            "4",
            "--quiet",
        ])
        .current_dir(root())
        .env("ZDSYNC_BUCKET", BUCKET)
        .env("ZDSYNC_CREDENTIALS", format!("secretsmanager:{SECRET}"))
        .env("ZDSYNC_MAX_CONCURRENCY", "4")
        .env("ZDSYNC_MAX_ATTEMPTS", "2")
        // The deployment's one allowed endpoint other than the account's own Zendesk.
        .env("ZDSYNC_ZENDESK_BASE_URL", &sim_url)
        .env("ZDSYNC_LOG", "info")
        // A prefix export settles for a second (the deployment's default is a minute).
        .env("ZDSYNC_EXPORT_SETTLE_SECONDS", "1")
        // An aborted execution's write-batches notice within a second; its lock goes 3 s later.
        .env("ZDSYNC_LOCK_CHECK_SECONDS", "1")
        .env("ZDSYNC_ABORT_GRACE_SECONDS", "3")
        // The shared Zendesk budget, as the template's BudgetTable.
        .env("ZDSYNC_BUDGET_TABLE", BUDGET_TABLE)
        .env("AWS_ENDPOINT_URL", &moto_url)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("PATH", {
            let venv = t.cargo_lambda.parent().unwrap().to_path_buf();
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::join_paths(std::iter::once(venv).chain(std::env::split_paths(&path))).unwrap()
        });
    let mut watch = Proc::start(
        "cargo lambda watch",
        &mut watch_cmd,
        &logs.path().join("watch.log"),
    );
    wait_for_port(
        watch_port,
        "cargo lambda watch",
        &mut watch,
        Duration::from_secs(60),
    );

    let aws = Aws {
        http: reqwest::Client::new(),
        url: moto_url.clone(),
    };
    let r = aws
        .http
        .post(format!("{moto_url}/moto-api/config"))
        .json(&json!({"stepfunctions": {"execute_state_machine": true}, "lambda": {"use_docker": false}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = aws
        .http
        .put(format!("{moto_url}/{BUCKET}"))
        .header("Authorization", Aws::auth("s3"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    aws.json(
        "dynamodb",
        "DynamoDB_20120810.CreateTable",
        json!({
            "TableName": BUDGET_TABLE,
            "BillingMode": "PAY_PER_REQUEST",
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            "AttributeDefinitions": [{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}]
        }),
    )
    .await;
    aws.json(
        "secretsmanager",
        "secretsmanager.CreateSecret",
        json!({"Name": SECRET, "SecretString": json!({
            "email": "admin@acme.test", "api_token": zdsync_sim::DEFAULT_API_TOKEN
        }).to_string()}),
    )
    .await;
    let config = format!(
        "name = \"people\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"ID\"\nchunk_rows = 100\n\n[source]\nlocation = \"exports/people/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"env\"\n\n[mapping]\nname = \"NAME\"\nemail = \"EMAIL\"\n\"user_fields.plan\" = {{ column = \"PLAN\", type = \"dropdown\" }}\n",
        sim.base_url()
    );
    aws.put("config/people.toml", config.as_bytes()).await;

    // Cold start through watch: the first invoke of a function spawns its process (init: the
    // S3 client, the credential cache, JSON logs), the second reuses it.
    let mut cold = Vec::new();
    for f in ["finalize", "plan", "write-batch"] {
        let payload = match f {
            "finalize" => json!({"state": {}}),
            "plan" => json!({"nothing": "to parse"}),
            _ => json!({"unexpected": true}),
        };
        let (first, status, body) = invoke(watch_port, f, &payload).await;
        let (second, _, _) = invoke(watch_port, f, &payload).await;
        assert!(
            status == 200 || body.contains("errorType"),
            "{f}: {status} {body}"
        );
        cold.push(format!(
            "{f}: first invoke {:.0} ms, warm {:.0} ms",
            first.as_secs_f64() * 1000.0,
            second.as_secs_f64() * 1000.0
        ));
    }
    eprintln!("cold start under cargo lambda watch: {}", cold.join("; "));
    // Each function logs how long its own init took (logs, S3 client, credential cache).
    let watch_log = std::fs::read_to_string(logs.path().join("watch.log")).unwrap();
    let mut inits: Vec<f64> = watch_log
        .lines()
        .filter(|l| l.contains("function initialised"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["fields"]["init_ms"].as_f64())
        .collect();
    assert!(
        inits.len() >= 3,
        "an init per instance started:\n{watch_log}"
    );
    inits.sort_by(f64::total_cmp);
    eprintln!(
        "init inside the functions ({} instances): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        inits.len(),
        inits[0],
        inits[inits.len() / 2],
        inits[inits.len() - 1]
    );

    let created = aws
        .sfn(
            "CreateStateMachine",
            json!({
                "name": "zdsync-sync",
                "definition": definition(),
                "roleArn": format!("arn:aws:iam::{ACCOUNT_ID}:role/zdsync-sync"),
            }),
        )
        .await;
    let machine = created["stateMachineArn"].as_str().unwrap().to_string();
    let stack = Stack {
        aws,
        machine,
        executions: Default::default(),
        _procs: vec![watch, router, moto],
        _logs: logs,
    };

    // 1. An export lands: the S3 event as EventBridge delivers it starts the sync.
    let key = "exports/people/part-0000.csv";
    let etag = stack.aws.put(key, export(0..250, "Pro").as_bytes()).await;
    let mut event: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("events/s3-object-created.json")).unwrap(),
    )
    .unwrap();
    event["resources"] = json!([format!("arn:aws:s3:::{BUCKET}")]);
    event["detail"]["bucket"]["name"] = json!(BUCKET);
    event["detail"]["object"]["key"] = json!(key);
    event["detail"]["object"]["etag"] = json!(etag);
    let t1 = Instant::now();
    let d = stack.execute(&event).await;
    let first_run = t1.elapsed();
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    let out: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
    let record = &out["record"];
    assert_eq!(record["status"], "succeeded", "{out:#}");
    assert_eq!(record["rows"]["created"], 250);
    assert_eq!(record["trigger"], "s3");
    let run_id = record["run_id"].as_str().unwrap();
    let chunks: Value = serde_json::from_str(
        &stack
            .aws
            .get(&format!("runs/people/{run_id}/chunks.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        chunks.as_array().unwrap().len(),
        3,
        "250 rows in chunks of 100"
    );
    assert_eq!(record["jobs"], 3);
    let stored: Value = serde_json::from_str(
        &stack
            .aws
            .get(&format!("runs/people/{run_id}/run.json"))
            .await
            .expect("the run record is in S3"),
    )
    .unwrap();
    assert_eq!(stored["rows"]["created"], 250);
    assert!(stored["requests"]["sent"].as_u64().unwrap() >= 3);
    assert!(
        stack.aws.get("locks/people.json").await.is_none(),
        "lock released"
    );
    let zd = sim.state("acme").unwrap();
    for i in 0..250 {
        let u = zd
            .user_by_external_id(&format!("p{i:04}"))
            .unwrap_or_else(|| panic!("p{i:04} is not in Zendesk"));
        assert_eq!(u["email"], format!("p{i}@example.com"));
        assert_eq!(u["user_fields"]["plan"], "plan_pro");
    }
    assert_eq!(zd.users.len(), 251, "250 synced users and the admin");

    // 2. The same event again (EventBridge may deliver twice): a no-op execution.
    let before = sim.counters().requests;
    let d = stack.execute(&event).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    let out: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
    assert_eq!(
        out["record"],
        Value::Null,
        "a duplicate records no run: {out:#}"
    );
    assert_eq!(sim.counters().requests, before, "no Zendesk request at all");
    assert_eq!(stack.aws.list("history/people/").await.len(), 1);

    // 3. A changed export while Zendesk fails every write: write-batch fails, the state
    // machine retries it, the item processor catches it, finalize records the failure and
    // releases the lock, and the execution fails with the error's name.
    sim.set_fault_rules(vec![FaultRule {
        path: Some("/api/v2/users/create_or_update_many".into()),
        ..FaultRule::new(FaultKind::InternalError)
    }]);
    let before = sim.counters();
    let etag = stack
        .aws
        .put(key, export(0..250, "Enterprise").as_bytes())
        .await;
    event["detail"]["object"]["etag"] = json!(etag);
    let d = stack.execute(&event).await;
    assert_eq!(d["status"], "FAILED", "{d:#}\n{}", stack.logs());
    assert_eq!(d["error"], ErrorName::ZendeskUnavailable.as_str(), "{d:#}");
    let after = sim.counters();
    let attempts = after
        .by_endpoint
        .get("users.create_or_update_many")
        .copied()
        .unwrap_or(0)
        - before
            .by_endpoint
            .get("users.create_or_update_many")
            .copied()
            .unwrap_or(0);
    // 3 chunks × (1 invocation + 4 state-machine retries) × 2 attempts per invocation.
    assert_eq!(
        attempts,
        3 * 5 * 2,
        "write-batch was retried by the state machine"
    );
    let history = stack.aws.list("history/people/").await;
    assert_eq!(history.len(), 2, "{history:?}");
    let mut failed = None;
    for k in &history {
        let r: Value = serde_json::from_str(&stack.aws.get(k).await.unwrap()).unwrap();
        if r["status"] == "failed" {
            failed = Some(r);
        }
    }
    let failed = failed.expect("a failed run record");
    assert_eq!(
        failed["error"]["name"],
        ErrorName::ZendeskUnavailable.as_str()
    );
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 of 3 chunks failed"),
        "{failed:#}"
    );
    assert!(
        stack.aws.get("locks/people.json").await.is_none(),
        "lock released"
    );
    let zd = sim.state("acme").unwrap();
    assert_eq!(
        zd.user_by_external_id("p0000").unwrap()["user_fields"]["plan"],
        "plan_pro",
        "nothing was written"
    );

    // 4. Zendesk is back. The failed run dropped its object's marker, so the same event
    // (redelivered, or the file put again) syncs the change.
    sim.clear_faults();
    let d = stack.execute(&event).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    let out: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["record"]["rows"]["updated"], 250, "{out:#}");
    let zd = sim.state("acme").unwrap();
    for i in 0..250 {
        let u = zd.user_by_external_id(&format!("p{i:04}")).unwrap();
        assert_eq!(u["user_fields"]["plan"], "plan_enterprise");
    }
    assert_eq!(zd.users.len(), 251, "no duplicates");
    // 5. An audience sync (mirror the `segment_vip` tag) started by hand: plan → AudienceDiff
    // → the Map of tag writes → finalize.
    let vip = format!(
        "name = \"vip\"\nobject = \"users\"\nmode = \"mirror\"\nprimary_key = \"ID\"\nchunk_rows = 100\n\n[source]\nlocation = \"exports/vip/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"env\"\n\n[audience]\ntag = \"segment_vip\"\n",
        sim.base_url()
    );
    stack.aws.put("config/vip.toml", vip.as_bytes()).await;
    let members = |r: std::ops::Range<u32>| {
        let mut csv = String::from("ID\n");
        r.for_each(|i| csv.push_str(&format!("p{i:04}\n")));
        csv
    };
    stack
        .aws
        .put("exports/vip/members.csv", members(0..150).as_bytes())
        .await;
    let d = stack.execute(&json!({"sync": "vip"})).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    // Members change: 50 leave, 50 join.
    stack
        .aws
        .put("exports/vip/members.csv", members(50..200).as_bytes())
        .await;
    let d = stack.execute(&json!({"sync": "vip"})).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    let zd = sim.state("acme").unwrap();
    for i in 0..250 {
        let u = zd.user_by_external_id(&format!("p{i:04}")).unwrap();
        let tags: Vec<&str> = u["tags"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(
            tags.contains(&"segment_vip"),
            (50..200).contains(&i),
            "p{i:04}: {tags:?}"
        );
    }

    // 6. A tickets run aborted mid-write (a plan or execution killed): EventBridge's notice
    // hands its lock on, and the next execution finishes the abandoned run before its own.
    // Tickets have no upsert: a create sent twice is a duplicate ticket.
    // One chunk of four batches, one job at a time, each answer 700 ms late: the abort comes
    // after the first batch landed.
    let tix = format!(
        "name = \"tix\"\nobject = \"tickets\"\nmode = \"insert\"\nprimary_key = \"ID\"\nchunk_rows = 400\n\n[source]\nlocation = \"exports/tix/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"env\"\nmax_jobs_in_flight = 1\n\n[mapping]\nsubject = \"SUBJECT\"\ndescription = \"BODY\"\n",
        sim.base_url()
    );
    stack.aws.put("config/tix.toml", tix.as_bytes()).await;
    let mut csv = String::from("ID,SUBJECT,BODY\n");
    for i in 0..400 {
        csv.push_str(&format!("t{i:04},Order {i},Where is order {i}?\n"));
    }
    stack
        .aws
        .put("exports/tix/tickets.csv", csv.as_bytes())
        .await;
    let tickets_before = sim.state("acme").unwrap().tickets.len();
    sim.set_fault_rules(vec![FaultRule {
        path: Some("/api/v2/tickets/create_many".into()),
        delay_ms: 700,
        ..FaultRule::new(FaultKind::Slow)
    }]);
    let started = stack
        .aws
        .sfn(
            "StartExecution",
            json!({"stateMachineArn": stack.machine, "name": "e2e-aborted", "input": json!({"sync": "tix"}).to_string()}),
        )
        .await;
    let aborted = started["executionArn"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sim.state("acme").unwrap().tickets.len() == tickets_before {
        assert!(
            Instant::now() < deadline,
            "no ticket written\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack
        .aws
        .sfn("StopExecution", json!({"executionArn": aborted}))
        .await;
    let notice = json!({
        "detail-type": "Step Functions Execution Status Change",
        "source": "aws.states",
        "detail": {"executionArn": aborted, "status": "ABORTED", "input": json!({"sync": "tix"}).to_string()}
    });
    let (_, status, body) = invoke(watch_port, "finalize", &notice).await;
    assert_eq!((status, body.as_str()), (200, "{\"released\":true}"));
    let written_when_aborted = sim.state("acme").unwrap().tickets.len() - tickets_before;
    assert!(
        written_when_aborted < 400,
        "aborted after {written_when_aborted} tickets"
    );
    sim.clear_faults();
    let d = stack.execute(&json!({"sync": "tix"})).await;
    assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
    let out: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["record"]["rows"]["unchanged"], 400, "{out:#}");
    // The abandoned run was finished first, under its own id: both parts in one record.
    let mut finished = None;
    for k in stack.aws.list("history/tix/").await {
        let r: Value = serde_json::from_str(&stack.aws.get(&k).await.unwrap()).unwrap();
        if r["run_id"] != out["record"]["run_id"] {
            finished = Some(r);
        }
    }
    let finished = finished.expect("the aborted run's record");
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(finished["resumed"], true, "{finished:#}");
    assert_eq!(finished["rows"]["created"], 400, "{finished:#}");
    let zd = sim.state("acme").unwrap();
    let mut seen = std::collections::HashMap::new();
    for t in &zd.tickets {
        if let Some(x) = t["external_id"].as_str().filter(|x| x.starts_with('t')) {
            *seen.entry(x.to_string()).or_insert(0) += 1;
        }
    }
    assert_eq!(seen.len(), 400, "every ticket is in Zendesk");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "duplicate tickets: {twice:?}");
    eprintln!("aborted after {written_when_aborted} of 400 tickets; the next execution finished the run with 0 duplicates");

    // 7. Two syncs of one account at once, each Map at concurrency 4 (chunks of two batches,
    // 7 job slots): eight write-batch invocations that would open 16 jobs share the account's
    // job slots (the simulator answers a ninth open job with 429) and its request budget through the budget table; every row lands once.
    // The syncs ask for 7 of the simulator's 8 slots: moto's DynamoDB evaluates a condition and
    // writes without a lock between them (DynamoDB's conditional writes are atomic), so two
    // takers racing for the last slot can both win there; the spare slot absorbs that.
    sim.update_jobs(|j| {
        j.max_concurrent = 8;
        j.working_ms = 2_000;
    });
    for (name, object, mapping) in [
        (
            "crowd_users",
            "users",
            "name = \"NAME\"\nemail = \"EMAIL\"\n",
        ),
        ("crowd_orgs", "organizations", "name = \"NAME\"\n"),
    ] {
        let cfg = format!(
            "name = \"{name}\"\nobject = \"{object}\"\nmode = \"upsert\"\nprimary_key = \"ID\"\nchunk_rows = 200\n\n[source]\nlocation = \"exports/{name}/\"\n\n[zendesk]\nsubdomain = \"acme\"\nbase_url = \"{}\"\ncredentials = \"env\"\nmax_jobs_in_flight = 7\n\n[mapping]\n{mapping}",
            sim.base_url()
        );
        stack
            .aws
            .put(&format!("config/{name}.toml"), cfg.as_bytes())
            .await;
        let mut csv = String::from("ID,NAME,EMAIL\n");
        for i in 0..3_200 {
            csv.push_str(&format!("{name}-{i},{name} {i},{name}{i}@example.com\n"));
        }
        stack
            .aws
            .put(&format!("exports/{name}/rows.csv"), csv.as_bytes())
            .await;
    }
    let before = sim.counters();
    let t7 = Instant::now();
    let (a, b) = (
        json!({"sync": "crowd_users"}),
        json!({"sync": "crowd_orgs"}),
    );
    let (users, orgs) = tokio::join!(stack.execute(&a), stack.execute(&b));
    let together = t7.elapsed();
    for d in [&users, &orgs] {
        assert_eq!(d["status"], "SUCCEEDED", "{d:#}\n{}", stack.logs());
        let out: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
        assert_eq!(out["record"]["rows"]["created"], 3_200, "{out:#}");
    }
    let after = sim.counters();
    assert_eq!(
        after.rate_limited - before.rate_limited,
        0,
        "429s: account {} jobs {}",
        after.rate_limited_account - before.rate_limited_account,
        after.rate_limited_jobs - before.rate_limited_jobs
    );
    let zd = sim.state("acme").unwrap();
    let count = |items: &[Value], prefix: &str| {
        let keys: std::collections::HashSet<&str> = items
            .iter()
            .filter_map(|v| v["external_id"].as_str())
            .filter(|x| x.starts_with(prefix))
            .collect();
        let all = items
            .iter()
            .filter(|v| {
                v["external_id"]
                    .as_str()
                    .is_some_and(|x| x.starts_with(prefix))
            })
            .count();
        (keys.len(), all)
    };
    assert_eq!(count(&zd.users, "crowd_users-"), (3_200, 3_200));
    assert_eq!(count(&zd.organizations, "crowd_orgs-"), (3_200, 3_200));
    eprintln!(
        "two syncs of one account at once: 6,400 rows in {:.1} s, 0 × 429, at most {} jobs open",
        together.as_secs_f64(),
        after.max_concurrent_jobs
    );

    eprintln!(
        "end to end: first sync of 250 rows {:.1} s; whole test {:.1} s",
        first_run.as_secs_f64(),
        wall.elapsed().as_secs_f64()
    );
    drop(stack);
    sim.shutdown().await;
}
