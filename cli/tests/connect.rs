//! `zdsync connect` as a user runs it, against the simulator: the OAuth browser flow over the
//! loopback redirect (the test plays the browser), the API token read from standard input, the
//! stored file (owner-only), `--check`, exit codes, Secrets Manager (moto), and no secret in
//! anything printed, even with TRACE logs.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use zdsync_tests::zdsync_sim::{
    SimConfig, SimHandle, Simulator, DEFAULT_API_TOKEN, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
};
use zdsync_tests::{moto::Moto, ACCOUNT, ADMIN_EMAIL};

fn zdsync(sim: &SimHandle, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zdsync"));
    c.arg("connect")
        .args([
            "--subdomain",
            ACCOUNT,
            "--base-url",
            &sim.account_url(ACCOUNT),
        ])
        .args(args)
        .env("ZDSYNC_LOG", "trace")
        .env_remove("ZENDESK_EMAIL")
        .env_remove("ZENDESK_API_TOKEN")
        .env_remove("ZENDESK_CLIENT_ID")
        .env_remove("ZENDESK_CLIENT_SECRET")
        .env_remove("ZENDESK_CREDENTIALS_FILE")
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY");
    c
}

/// Drains a pipe on a thread (a full pipe would block the child).
fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for a child with a deadline (killed by PID past it), reading its output meanwhile.
fn finish(mut child: Child, limit: Duration) -> Output {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "zdsync connect did not finish within {limit:?}:\n{}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_no_secret(all: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!all.contains(s), "a secret was printed: {s}\n{all}");
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Plays the browser: opens the authorization URL without following the redirect, so the test
/// sees the code, then delivers the redirect to the loopback listener.
async fn browse(url: &str) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    let page = http.get(&location).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    location
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_connect_stores_an_owner_only_file_and_check_reports_it() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("conf/zdsync/acme.json");
    let store = format!("file:{}", file.display());
    let mut child = zdsync(
        &sim,
        &[
            "--client-id",
            DEFAULT_CLIENT_ID,
            "--port",
            "0",
            "--no-browser",
            "--wait",
            "30",
            "--store",
            &store,
        ],
    )
    .env("ZENDESK_CLIENT_SECRET", DEFAULT_CLIENT_SECRET)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Read stderr until the authorization URL shows up; keep the rest for the leak check.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.contains("/oauth/authorizations/new?") {
                let _ = tx.send(line.trim().to_string());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the authorization URL is printed");
    assert!(url.contains("code_challenge_method=S256") && url.contains("state="));
    assert!(url.contains("scope=read+users%3Awrite+organizations%3Awrite+tickets%3Awrite"));
    let redirect = browse(&url).await;
    let out = finish(child, Duration::from_secs(30));
    let stderr = reader.join().unwrap();
    assert!(out.stderr.is_empty(), "stderr was taken by the reader");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Connected to"), "{stdout}");
    assert!(
        stdout.contains(&format!("user        {ADMIN_EMAIL}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("scopes      read users:write organizations:write tickets:write"),
        "{stdout}"
    );
    assert!(stdout.contains("tickets:       yes"), "{stdout}");

    #[cfg(unix)]
    {
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let access = v["access_token"].as_str().unwrap().to_string();
    let refresh = v["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(v["client_id"], DEFAULT_CLIENT_ID);
    assert_eq!(v["client_secret"], DEFAULT_CLIENT_SECRET);
    assert!(v["expires_at"].as_i64().is_some());
    let code = redirect
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("code="))
        .unwrap()
        .to_string();

    // --check with the stored file.
    let check = zdsync(&sim, &["--check", "--store", &store])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (c_out, c_err) = text(&check);
    assert!(check.status.success(), "{c_out}\n{c_err}");
    for want in [
        "credential  OAuth token from credentials file",
        "role admin",
        "expiry      access token expires 20",
        "users:         yes",
        "organizations: yes",
    ] {
        assert!(c_out.contains(want), "missing {want:?} in:\n{c_out}");
    }
    let all = format!("{stdout}\n{stderr}\n{c_out}\n{c_err}");
    assert_no_secret(&all, &[&access, &refresh, &code, DEFAULT_CLIENT_SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_missing_scope_is_reported_by_check() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.json");
    let minted = sim
        .mint_token(
            ACCOUNT,
            &zdsync_tests::zdsync_sim::MintRequest {
                scopes: vec!["read".into(), "users:write".into()],
                ..Default::default()
            },
        )
        .unwrap();
    std::fs::write(
        &file,
        serde_json::json!({"access_token": minted.access_token}).to_string(),
    )
    .unwrap();
    // A sync config for tickets: --check fails with the run's message and exit code 6.
    let config = dir.path().join("tickets.toml");
    let toml = zdsync_tests::sync_toml(
        "t",
        "tickets",
        "insert",
        "TICKET_ID",
        &sim.account_url(ACCOUNT),
        "subject = \"SUBJECT\"\ndescription = \"DESCRIPTION\"",
    )
    .replace("file:creds.json", "file:acme.json");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zdsync"))
        .args(["connect", "--check", "--config"])
        .arg(&config)
        .env_remove("ZENDESK_CREDENTIALS_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{o}\n{e}");
    assert!(o.contains("users:         yes"), "{o}");
    assert!(
        o.contains("tickets:       no: the Zendesk credential lacks the `tickets:write` scope"),
        "{o}"
    );
    assert!(e.contains("cannot be written"), "{e}");
    assert_no_secret(&format!("{o}{e}"), &[&minted.access_token]);
}

fn api_token_connect(sim: &SimHandle, store: &str, email: &str, token: &str) -> Output {
    api_token_connect_in(sim, None, store, email, token)
}

/// [`api_token_connect`] from the working folder `cwd`.
fn api_token_connect_in(
    sim: &SimHandle,
    cwd: Option<&std::path::Path>,
    store: &str,
    email: &str,
    token: &str,
) -> Output {
    let mut cmd = zdsync(sim, &["--api-token", "--email", email, "--store", store]);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{token}").unwrap();
    finish(child, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_from_stdin_is_verified_then_stored_with_the_retirement_warning() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("acme.json");
    let store = format!("file:{}", file.display());

    // A password where the token goes: refused, exit 6, nothing stored.
    let out = api_token_connect(&sim, &store, ADMIN_EMAIL, "Correct-Horse-7");
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{o}\n{e}");
    assert!(
        e.contains("an API token is not the account password"),
        "{e}"
    );
    assert!(e.contains("nothing was stored"), "{e}");
    assert!(!file.exists());
    assert_no_secret(&format!("{o}{e}"), &["Correct-Horse-7"]);

    // The right token: stored as {"email", "api_token"}, owner-only, with the warning.
    let out = api_token_connect(&sim, &store, ADMIN_EMAIL, DEFAULT_API_TOKEN);
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.contains("credential  API token"), "{o}");
    assert!(o.contains("tickets:       yes"), "{o}");
    for want in [
        "2026-10-27",
        "2027-04-30",
        "zdsync connect --subdomain acme --client-id <client identifier> --store file:",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert_no_secret(&format!("{o}{e}"), &[DEFAULT_API_TOKEN]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"email": ADMIN_EMAIL, "api_token": DEFAULT_API_TOKEN})
    );
    #[cfg(unix)]
    assert_eq!(mode(&file), 0o600);

    // A relative `--store` path is taken from the current folder; the line to put in a config
    // names the file whole (a config reads relative `file:` paths from its own folder).
    let out = api_token_connect_in(
        &sim,
        Some(dir.path()),
        "file:rel/creds.json",
        ADMIN_EMAIL,
        DEFAULT_API_TOKEN,
    );
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    let stored = std::fs::canonicalize(dir.path().join("rel/creds.json")).unwrap();
    assert!(
        o.contains(&format!("credentials = \"file:{}\"", stored.display())),
        "{o}"
    );

    // A wrong subdomain: exit 6 with the subdomain message.
    let out = Command::new(env!("CARGO_BIN_EXE_zdsync"))
        .args(["connect", "--subdomain", "acmee", "--base-url"])
        .arg(sim.account_url("acmee"))
        .args(["--api-token", "--email", ADMIN_EMAIL, "--store", &store])
        .env("ZENDESK_API_TOKEN", DEFAULT_API_TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (o, e) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{o}\n{e}");
    assert!(
        e.contains("no Zendesk account at `acmee.zendesk.com`"),
        "{e}"
    );

    // Bad input names the fix: a URL for the subdomain, no client id, no subdomain.
    let out = Command::new(env!("CARGO_BIN_EXE_zdsync"))
        .args(["connect", "--subdomain", "https://acme.zendesk.com"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("enter \"acme\""), "{}", text(&out).1);
    let out = zdsync(&sim, &["--store", &store])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--client-id"), "{}", text(&out).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_secrets_manager_creates_the_secret_and_check_reads_it() {
    let moto = Moto::start();
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let store = "secretsmanager:zdsync/acme";
    let mut child = zdsync(
        &sim,
        &["--api-token", "--email", ADMIN_EMAIL, "--store", store],
    )
    .envs(moto.env())
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    writeln!(child.stdin.take().unwrap(), "{DEFAULT_API_TOKEN}").unwrap();
    let out = finish(child, Duration::from_secs(60));
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(o.contains("Secrets Manager secret `zdsync/acme`"), "{o}");
    assert_no_secret(&format!("{o}{e}"), &[DEFAULT_API_TOKEN]);

    let out = zdsync(&sim, &["--check", "--store", store])
        .envs(moto.env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (o, e) = text(&out);
    assert!(out.status.success(), "{o}\n{e}");
    assert!(
        o.contains("credential  API token from Secrets Manager secret `zdsync/acme`"),
        "{o}"
    );
    assert_no_secret(&format!("{o}{e}"), &[DEFAULT_API_TOKEN]);
}
