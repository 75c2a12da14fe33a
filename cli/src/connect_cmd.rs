//! `zdsync connect`: sign in with OAuth (browser + loopback redirect, or `client_credentials`)
//! or check an API token, then store the credentials where syncs read them; `--check` reports
//! what a stored credential can do.
//!
//! Secrets come from environment variables, standard input or a prompt without echo, never from
//! command-line arguments (they land in shell history and `ps`).

use crate::run_cmd::exit;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use zdsync::config::{validate_subdomain, SyncConfig};
use zdsync::fields::Object;
use zdsync::zendesk::auth::{ENV_API_TOKEN, ENV_CLIENT_ID, ENV_CLIENT_SECRET, ENV_EMAIL};
use zdsync::zendesk::connect::{self, ConnectError, ConnectionCheck, OAuthApp};
use zdsync::zendesk::{
    credential_store, AuthMethod, Client, ClientOptions, CredentialStore, Credentials, Secret,
};

/// The loopback port of the redirect URL to register on the OAuth client.
pub const DEFAULT_PORT: u16 = 8976;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Grant {
    /// Sign in to Zendesk in a browser and allow access (PKCE; a refresh token is issued).
    AuthorizationCode,
    /// Headless: a confidential client's id and secret, no browser (no refresh token).
    ClientCredentials,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// A sync config: its `[zendesk]` subdomain, base_url and `credentials` reference are used
    /// (the credentials are stored where that sync reads them).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The Zendesk subdomain: `mycompany` for https://mycompany.zendesk.com.
    #[arg(long)]
    pub subdomain: Option<String>,
    /// Where to store the credentials: `file:<path>` (owner-only file), `secretsmanager:<name>`
    /// (created if missing) or `arn:aws:secretsmanager:...`. Default: the config's `credentials`,
    /// else `file:~/.config/zdsync/<subdomain>.json`.
    #[arg(long)]
    pub store: Option<String>,
    /// Use an admin's email and API token instead of OAuth (the token is read from
    /// ZENDESK_API_TOKEN, standard input, or a prompt that does not echo).
    #[arg(long)]
    pub api_token: bool,
    /// The admin's email for `--api-token`.
    #[arg(long, env = ENV_EMAIL)]
    pub email: Option<String>,
    /// The OAuth client's unique identifier (Admin Center > Apps and integrations > APIs >
    /// OAuth Clients).
    #[arg(long, env = ENV_CLIENT_ID)]
    pub client_id: Option<String>,
    /// The OAuth client is confidential: read its secret from ZENDESK_CLIENT_SECRET, standard
    /// input, or a prompt (implied by `--grant client-credentials`).
    #[arg(long)]
    pub client_secret: bool,
    /// How to obtain the OAuth token: sign in with a browser, or a confidential client's own
    /// grant without one.
    #[arg(long, value_enum, default_value = "authorization-code")]
    pub grant: Grant,
    /// Space-separated OAuth scopes (default: `read users:write organizations:write
    /// tickets:write`, or `read <object>:write` for the config's object).
    #[arg(long)]
    pub scopes: Option<String>,
    /// Loopback port of the redirect URL http://127.0.0.1:<port>/callback (0: any free port).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Print the authorization URL only; do not try to open a browser.
    #[arg(long)]
    pub no_browser: bool,
    /// Seconds to wait for the browser to come back.
    #[arg(long, default_value_t = 300)]
    pub wait: u64,
    /// Lifetime in seconds of a `client_credentials` token (300 to 172800).
    #[arg(long)]
    pub expires_in: Option<u64>,
    /// Check the stored credential instead: who it is, role, scopes, expiry, what it can write.
    #[arg(long)]
    pub check: bool,
    /// API base URL instead of https://<subdomain>.zendesk.com (a proxy or the simulator).
    #[arg(long)]
    pub base_url: Option<String>,
}

/// Where the account is and where its credentials live.
struct Target {
    opts: ClientOptions,
    store_ref: String,
    /// Folder relative `file:` paths are taken from.
    base_dir: PathBuf,
    object: Option<Object>,
    /// A sync config's `credentials` line to print when it differs from where we stored.
    config_reference: Option<String>,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

fn default_store(subdomain: &str) -> Result<String, String> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        })
        .ok_or("neither XDG_CONFIG_HOME nor HOME is set: pass `--store file:<path>`")?;
    Ok(format!(
        "file:{}",
        base.join("zdsync")
            .join(format!("{subdomain}.json"))
            .display()
    ))
}

fn target(args: &ConnectArgs) -> Result<Target, ExitCode> {
    let cfg = match &args.config {
        Some(p) => Some(SyncConfig::load(p).map_err(|e| fail(e, exit::CONFIG))?),
        None => None,
    };
    let subdomain = match (&args.subdomain, &cfg) {
        (Some(s), _) => validate_subdomain(s)
            .map_err(|hint| fail(format_args!("--subdomain {s:?} {hint}"), exit::CONFIG))?,
        (None, Some(c)) => c.zendesk.subdomain.clone(),
        (None, None) => {
            return Err(fail(
                "which Zendesk account? pass `--subdomain mycompany` (for \
                 https://mycompany.zendesk.com) or `--config <sync.toml>`",
                exit::CONFIG,
            ))
        }
    };
    let base_url = args
        .base_url
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.zendesk.base_url.clone()));
    let mut opts = ClientOptions::for_subdomain(&subdomain, base_url.as_deref());
    opts.max_attempts = 3;
    let config_dir = args.config.as_deref().map(|p| {
        p.parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    });
    let configured = cfg
        .as_ref()
        .map(|c| c.zendesk.credentials.trim().to_string());
    // `env` without ZENDESK_CREDENTIALS_FILE cannot keep anything: store in a file instead.
    let env_file = std::env::var_os(zdsync::zendesk::auth::ENV_CREDENTIALS_FILE)
        .filter(|v| !v.is_empty())
        .map(|p| format!("file:{}", PathBuf::from(p).display()));
    let store_ref = match (&args.store, &configured) {
        (Some(s), _) => s.trim().to_string(),
        (None, Some(c)) if c == "env" => match &env_file {
            Some(f) => f.clone(),
            None if args.check => "env".into(),
            None => default_store(&subdomain).map_err(|e| fail(e, exit::CONFIG))?,
        },
        (None, Some(c)) => c.clone(),
        (None, None) if args.check && env_file.is_none() && has_env_credentials() => "env".into(),
        (None, None) => match &env_file {
            Some(f) => f.clone(),
            None => default_store(&subdomain).map_err(|e| fail(e, exit::CONFIG))?,
        },
    };
    let config_reference = match &configured {
        Some(c) if *c != store_ref && !(c == "env" && env_file.is_some()) => {
            Some(store_ref.clone())
        }
        _ => None,
    };
    let base_dir = match (&args.store, config_dir) {
        (None, Some(d)) => d,
        _ => PathBuf::from("."),
    };
    Ok(Target {
        opts,
        store_ref,
        base_dir,
        object: cfg.as_ref().map(|c| c.object),
        config_reference,
    })
}

fn has_env_credentials() -> bool {
    [zdsync::zendesk::auth::ENV_ACCESS_TOKEN, ENV_API_TOKEN]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// A secret from `env`, else a line of standard input when it is not a terminal, else a prompt
/// without echo.
fn read_secret(what: &str, env: &str) -> Result<Secret, String> {
    if let Some(v) = std::env::var(env).ok().filter(|v| !v.trim().is_empty()) {
        return Ok(Secret::new(v.trim()));
    }
    let stdin = std::io::stdin();
    let text = if stdin.is_terminal() {
        rpassword::prompt_password(format!("{what} (not shown): "))
            .map_err(|e| format!("cannot read the {what} from the terminal ({e})"))?
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read the {what} from standard input ({e})"))?;
        line
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!(
            "no {what} given: type it at the prompt, pipe it on standard input, or set {env}"
        ));
    }
    Ok(Secret::new(text))
}

fn read_email(args: &ConnectArgs) -> Result<String, String> {
    if let Some(e) = args
        .email
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        return Ok(e.to_string());
    }
    if !std::io::stdin().is_terminal() {
        return Err(format!(
            "`--api-token` needs the admin's email: pass `--email admin@example.com` or set \
             {ENV_EMAIL}"
        ));
    }
    eprint!("Zendesk admin email: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the email ({e})"))?;
    let e = line.trim();
    if e.is_empty() {
        return Err("no email given".into());
    }
    Ok(e.to_string())
}

fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        Some("open")
    } else if cfg!(target_os = "windows") {
        None // `start` mangles `&` in URLs; the printed URL is enough
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some()
    {
        Some("xdg-open")
    } else {
        None
    };
    let Some(opener) = opener else { return };
    match std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        // The opener hands the URL to the browser and exits; reap it off the main thread.
        Ok(mut child) => {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
        Err(e) => tracing::debug!(error = %e, "cannot start {opener}"),
    }
}

pub async fn connect(args: ConnectArgs) -> ExitCode {
    let t = match target(&args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let store = match credential_store(&t.store_ref, &t.base_dir) {
        Ok(s) => s,
        Err(e) => return fail(e, exit::CONFIG),
    };
    if args.check {
        return check_stored(&t, store).await;
    }
    let creds = match obtain(&args, &t).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Verify before storing: a refused credential must not replace a working one.
    let what = match creds.method() {
        AuthMethod::ApiToken => "the API token being connected",
        AuthMethod::OAuth => "the OAuth token being connected",
    };
    let report = match connect::verify(t.opts.clone(), creds.clone(), what).await {
        Ok(r) => r,
        Err(e) => {
            return fail(
                format_args!("{e}\nnothing was stored"),
                e.error_name().exit_code(),
            )
        }
    };
    if let Some(path) = t.store_ref.strip_prefix("file:") {
        if let Err(e) = prepare_dir(&t.base_dir.join(path.trim())) {
            return fail(e, exit::CONFIG);
        }
    }
    if let Err(e) = store.save(&creds).await {
        return fail(&e, e.error_name().exit_code());
    }
    println!(
        "Connected to {} and stored the credentials in {}.",
        t.opts.base_url,
        store.describe()
    );
    print_report(&t, &report, &store.describe());
    // A `file:` path given here is relative to the current folder, while a config reads its
    // own relative `file:` paths from the config's folder: name the file absolutely.
    let reference = match t.store_ref.strip_prefix("file:") {
        Some(path) => {
            let full = t.base_dir.join(path.trim());
            let full = std::fs::canonicalize(&full).unwrap_or(full);
            format!("file:{}", full.display())
        }
        None => t.store_ref.clone(),
    };
    if t.config_reference.is_some() || t.object.is_none() {
        println!(
            "\nPoint the sync config at them: in [zendesk], set credentials = \"{reference}\" \
             (a relative `file:` path in a config is read from the config's folder)"
        );
    }
    if creds.method() == AuthMethod::ApiToken {
        eprintln!("{}", api_token_warning(&t));
    }
    ExitCode::SUCCESS
}

/// The parent folder of a credentials file, created owner-only when missing.
fn prepare_dir(path: &Path) -> Result<(), String> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|e| {
        format!(
            "cannot create the folder `{}` for the credentials file ({e})",
            dir.display()
        )
    })
}

fn api_token_warning(t: &Target) -> String {
    format!(
        "warning: Zendesk is retiring API tokens: no account can create new ones from \
         2026-10-27, and all remaining tokens stop working on 2027-04-30. Switch to OAuth before \
         then: create an OAuth client (Admin Center > Apps and integrations > APIs > OAuth \
         Clients, redirect URL http://127.0.0.1:{DEFAULT_PORT}/callback) and run\n  zdsync \
         connect --subdomain {} --client-id <client identifier> --store {}",
        t.opts.subdomain, t.store_ref
    )
}

async fn obtain(args: &ConnectArgs, t: &Target) -> Result<Credentials, ExitCode> {
    if args.api_token {
        let email = read_email(args).map_err(|e| fail(e, exit::CONFIG))?;
        let token =
            read_secret("Zendesk API token", ENV_API_TOKEN).map_err(|e| fail(e, exit::CONFIG))?;
        return Ok(Credentials::ApiToken { email, token });
    }
    let Some(client_id) = args
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
    else {
        return Err(fail(
            format!(
                "OAuth needs the OAuth client's unique identifier: pass `--client-id <id>` or set \
                 {ENV_CLIENT_ID} (create a client in Admin Center > Apps and integrations > APIs \
                 > OAuth Clients with the redirect URL http://127.0.0.1:{DEFAULT_PORT}/callback), \
                 or use `--api-token`"
            ),
            exit::CONFIG,
        ));
    };
    let wants_secret = args.client_secret
        || args.grant == Grant::ClientCredentials
        || std::env::var_os(ENV_CLIENT_SECRET).is_some_and(|v| !v.is_empty());
    let secret = if wants_secret {
        Some(
            read_secret("OAuth client secret", ENV_CLIENT_SECRET)
                .map_err(|e| fail(e, exit::CONFIG))?,
        )
    } else {
        None
    };
    let app = OAuthApp::new(&t.opts, client_id, secret);
    let scopes = args.scopes.clone().unwrap_or_else(|| match t.object {
        Some(o) => connect::scopes_for(&[o]),
        None => connect::SYNC_SCOPES.to_string(),
    });
    let result = match args.grant {
        Grant::ClientCredentials => {
            connect::client_credentials(&app, &scopes, args.expires_in).await
        }
        Grant::AuthorizationCode => {
            let no_browser = args.no_browser;
            connect::authorize(&app, &scopes, args.port, Duration::from_secs(args.wait), |url| {
                eprintln!(
                    "Open this URL in a browser, sign in to Zendesk as an admin and click Allow \
                     (waiting up to {} s; the code it returns is valid for about two minutes):\n\n  {url}\n",
                    args.wait
                );
                if !no_browser {
                    open_browser(url);
                }
            })
            .await
        }
    };
    result.map_err(|e: ConnectError| {
        let code = e.error_name().exit_code();
        fail(format_args!("{e}\nnothing was stored"), code)
    })
}

async fn check_stored(t: &Target, store: Arc<dyn CredentialStore>) -> ExitCode {
    let source = store.describe();
    let creds = match store.load().await {
        Ok(c) => c,
        Err(e) => return fail(e, exit::AUTH),
    };
    let client = match Client::new(t.opts.clone(), store).await {
        Ok(c) => c,
        Err(e) => return fail(&e, e.error_name().exit_code()),
    };
    let report = match connect::check(&client, &creds).await {
        Ok(r) => r,
        Err(e) => return fail(&e, e.error_name().exit_code()),
    };
    print_report(t, &report, &source);
    if let Some(o) = t.object {
        if let Some((_, Err(e))) = report.writable.iter().find(|(x, _)| *x == o) {
            return fail(
                format_args!(
                    "the sync config's object ({}) cannot be written: {e}",
                    o.as_str()
                ),
                e.error_name().exit_code(),
            );
        }
    }
    ExitCode::SUCCESS
}

fn unix_to_iso(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| secs.to_string())
}

fn print_report(t: &Target, r: &ConnectionCheck, source: &str) {
    print!("{}", render_report(t, r, source));
}

fn render_report(t: &Target, r: &ConnectionCheck, source: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let w = &r.who;
    let method = match r.method {
        AuthMethod::ApiToken => "API token",
        AuthMethod::OAuth => "OAuth token",
    };
    let _ = writeln!(s, "account     {} ({})", t.opts.base_url, t.opts.subdomain);
    let _ = writeln!(s, "credential  {method} from {source}");
    let _ = writeln!(
        s,
        "user        {} (id {}), role {}",
        w.email.as_deref().unwrap_or("?"),
        w.user_id,
        if w.role.is_empty() { "?" } else { &w.role }
    );
    let scopes = match &w.scopes {
        Some(v) if v.is_empty() => "(none)".to_string(),
        Some(v) => v.join(" "),
        None => "all the user's permissions (API tokens have no scopes)".to_string(),
    };
    let _ = writeln!(s, "scopes      {scopes}");
    let expiry = match (r.method, &w.token_expires_at, r.stored_expires_at) {
        (AuthMethod::ApiToken, _, _) => {
            "no expiry, but Zendesk deactivates all API tokens on 2027-04-30".to_string()
        }
        (_, Some(at), _) => format!("access token expires {at}"),
        (_, None, Some(at)) => format!("access token expires {}", unix_to_iso(at)),
        _ => "access token has no expiry".to_string(),
    };
    let _ = writeln!(s, "expiry      {expiry}");
    for (i, (o, res)) in r.writable.iter().enumerate() {
        let label = if i == 0 { "can write" } else { "" };
        let verdict = match res {
            Ok(()) => "yes".to_string(),
            Err(e) => format!("no: {e}"),
        };
        let _ = writeln!(s, "{label:<12}{:<15}{verdict}", format!("{}:", o.as_str()));
    }
    s
}
