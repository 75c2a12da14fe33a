//! Connecting a Zendesk account (`zdsync connect`): the OAuth authorization-code flow with PKCE
//! over a loopback redirect, the `client_credentials` grant for headless set-ups, checking an API
//! token before it is stored, and the connection check (who, role, scopes, what it may write).
//!
//! Codes, verifiers, tokens and secrets are held in [`Secret`]s and never appear in errors,
//! logs or `Debug` output; only the authorization URL (which carries none) is shown.

use super::auth::{CredentialStore, Credentials, MemoryCredentials, Secret};
use super::client::{Client, ClientOptions, Preflight};
use super::error::{AuthMethod, ZendeskError};
use crate::fields::Object;
use base64::Engine as _;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The scopes a sync of every object needs: read everything, write the three objects.
pub const SYNC_SCOPES: &str = "read users:write organizations:write tickets:write";

/// Zendesk's authorization codes are valid this long.
pub const CODE_LIFETIME_SECS: u64 = 120;

/// The path of the loopback redirect URI (`http://127.0.0.1:<port>/callback`).
pub const REDIRECT_PATH: &str = "/callback";

/// How long [`authorize`] waits for the browser by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// The scopes for syncing only `objects`: `read` plus `<object>:write` for each.
pub fn scopes_for(objects: &[Object]) -> String {
    let mut s = String::from("read");
    for o in objects {
        s.push(' ');
        s.push_str(o.as_str());
        s.push_str(":write");
    }
    s
}

/// Why connecting failed. Every message says what to do; none carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Invalid credentials, unknown subdomain, missing scope: the run's own messages.
    #[error(transparent)]
    Zendesk(#[from] ZendeskError),
    #[error("cannot listen for the OAuth redirect on 127.0.0.1:{port} ({message}): pick another port with `--port`, or `--port 0` for any free one (the OAuth client's redirect URL must then allow it)")]
    Listen { port: u16, message: String },
    #[error("no answer from the browser within {secs} s: open the authorization URL, sign in to Zendesk as an admin and click Allow, then run `zdsync connect` again")]
    Timeout { secs: u64 },
    #[error("the OAuth redirect carried a `state` that does not belong to this `zdsync connect` (a stale browser tab, another connect running, or a forged link): nothing was stored; run `zdsync connect` again and use the URL it prints")]
    StateMismatch,
    #[error("{0}")]
    Denied(String),
    #[error("Zendesk refused the authorization code ({description}): a code is valid for only about two minutes and only once, and must be exchanged with the PKCE verifier of the same request; run `zdsync connect` again and click Allow within two minutes")]
    CodeRefused { description: String },
    #[error("Zendesk refused the OAuth client ({description}): check the client's unique identifier (`--client-id`) and, for a confidential client, its secret (Admin Center > Apps and integrations > APIs > OAuth Clients)")]
    ClientRefused { description: String },
    #[error("the `client_credentials` grant needs a confidential OAuth client and its secret ({description}): create a confidential client in Admin Center > Apps and integrations > APIs > OAuth Clients, or connect with the browser flow")]
    NotConfidential { description: String },
    #[error("Zendesk refused the requested scopes `{scopes}` ({description}): use scopes such as `read`, `write`, `users:write`, `organizations:write`, `tickets:write`")]
    BadScope { scopes: String, description: String },
    #[error("unexpected answer from the Zendesk token endpoint: {0}")]
    Protocol(String),
}

impl ConnectError {
    /// The error name (as the run uses them) the CLI turns into an exit code.
    pub fn error_name(&self) -> crate::errors::ErrorName {
        use crate::errors::ErrorName;
        match self {
            ConnectError::Zendesk(e) => e.error_name(),
            ConnectError::Listen { .. } => ErrorName::ConfigInvalid,
            ConnectError::Protocol(_) => ErrorName::ZendeskRejected,
            _ => ErrorName::AuthFailed,
        }
    }
}

/// The OAuth client zdsync authenticates as, on one account.
#[derive(Clone)]
pub struct OAuthApp {
    /// `https://<subdomain>.zendesk.com` (or a `base_url` override).
    pub base_url: String,
    pub subdomain: String,
    /// The client's unique identifier (not its numeric id).
    pub client_id: String,
    /// Confidential clients only.
    pub client_secret: Option<Secret>,
}

impl fmt::Debug for OAuthApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthApp")
            .field("base_url", &self.base_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .finish()
    }
}

impl OAuthApp {
    pub fn new(opts: &ClientOptions, client_id: &str, client_secret: Option<Secret>) -> Self {
        OAuthApp {
            base_url: opts.base_url.clone(),
            subdomain: opts.subdomain.clone(),
            client_id: client_id.trim().to_string(),
            client_secret,
        }
    }
}

/// A PKCE pair (RFC 7636): the verifier stays here, the S256 challenge goes in the URL.
pub struct Pkce {
    verifier: Secret,
    challenge: String,
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl Pkce {
    /// A fresh verifier: 64 characters from a CSPRNG (`rand`'s thread RNG, seeded by the OS).
    pub fn generate() -> Self {
        Self::from_verifier(Secret::new(
            Alphanumeric.sample_string(&mut rand::rng(), 64),
        ))
    }

    pub fn from_verifier(verifier: Secret) -> Self {
        use sha2::Digest;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(verifier.expose()));
        Pkce {
            verifier,
            challenge,
        }
    }

    pub fn challenge(&self) -> &str {
        &self.challenge
    }

    pub fn verifier(&self) -> &Secret {
        &self.verifier
    }
}

/// An unguessable `state` value binding the redirect to this request.
pub fn new_state() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 32)
}

/// `https://<sub>.zendesk.com/oauth/authorizations/new?response_type=code&...`: what the user
/// opens to sign in and allow access. Carries no secret.
pub fn authorization_url(
    app: &OAuthApp,
    redirect_uri: &str,
    scopes: &str,
    state: &str,
    pkce: &Pkce,
) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", &app.client_id)
        .append_pair("redirect_uri", redirect_uri)
        .append_pair("scope", scopes)
        .append_pair("state", state)
        .append_pair("code_challenge", pkce.challenge())
        .append_pair("code_challenge_method", "S256")
        .finish();
    format!("{}/oauth/authorizations/new?{query}", app.base_url)
}

/// A listener on 127.0.0.1 for the browser's redirect back from Zendesk.
pub struct Loopback {
    listener: tokio::net::TcpListener,
    redirect_uri: String,
}

impl fmt::Debug for Loopback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loopback")
            .field("redirect_uri", &self.redirect_uri)
            .finish()
    }
}

/// What one request to the loopback listener asked for.
enum Callback {
    Code(Secret),
    Error {
        error: String,
        description: String,
    },
    StateMismatch,
    /// Another path (`/favicon.ico`) or a request without code or error: keep waiting.
    Other,
}

const PAGE_OK: &str = "<!doctype html><title>zdsync connected</title><h1>zdsync is connected to Zendesk</h1><p>You can close this tab and return to the terminal.</p>";
const PAGE_FAILED: &str = "<!doctype html><title>zdsync not connected</title><h1>zdsync was not connected</h1><p>Return to the terminal: it says what happened and what to do.</p>";

impl Loopback {
    /// Binds `127.0.0.1:port` (`0`: any free port). Only the loopback interface: no other
    /// machine can deliver a code.
    pub async fn bind(port: u16) -> Result<Loopback, ConnectError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| ConnectError::Listen {
                port,
                message: e.to_string(),
            })?;
        let actual = listener
            .local_addr()
            .map_err(|e| ConnectError::Listen {
                port,
                message: e.to_string(),
            })?
            .port();
        Ok(Loopback {
            listener,
            redirect_uri: format!("http://127.0.0.1:{actual}{REDIRECT_PATH}"),
        })
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Waits (at most `wait`) for the redirect carrying `state`, answers the browser with a
    /// short page, and returns the authorization code.
    pub async fn receive(&self, state: &str, wait: Duration) -> Result<Secret, ConnectError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let accepted = tokio::time::timeout_at(deadline, self.listener.accept()).await;
            let mut stream = match accepted {
                Err(_) => {
                    return Err(ConnectError::Timeout {
                        secs: wait.as_secs(),
                    })
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "loopback accept failed");
                    continue;
                }
                Ok(Ok((stream, _))) => stream,
            };
            let head =
                match tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await {
                    Ok(Some(h)) => h,
                    _ => continue,
                };
            let outcome = parse_callback(&head, state);
            let (status, page) = match &outcome {
                Callback::Code(_) => ("200 OK", PAGE_OK),
                Callback::Other => ("404 Not Found", "not found"),
                _ => ("400 Bad Request", PAGE_FAILED),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
            match outcome {
                Callback::Code(code) => return Ok(code),
                Callback::StateMismatch => return Err(ConnectError::StateMismatch),
                Callback::Error { error, description } => {
                    return Err(ConnectError::Denied(denied_message(&error, &description)))
                }
                Callback::Other => continue,
            }
        }
    }
}

fn denied_message(error: &str, description: &str) -> String {
    let description = if description.is_empty() {
        String::new()
    } else {
        format!(": {description}")
    };
    if error == "access_denied" {
        format!(
            "Zendesk did not authorize zdsync (access_denied{description}): the consent page was \
             answered with Deny; nothing was stored. Run `zdsync connect` again and click Allow, \
             signed in as a Zendesk admin"
        )
    } else {
        format!(
            "Zendesk refused the authorization request ({error}{description}): check the OAuth \
             client's unique identifier, that its redirect URLs include \
             http://127.0.0.1{REDIRECT_PATH} (any port), and the requested scopes"
        )
    }
}

/// The request line and headers (up to 16 KiB), or `None` when the peer sent nothing usable.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

fn parse_callback(head: &str, state: &str) -> Callback {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (Some("GET"), Some(target)) = (parts.next(), parts.next()) else {
        return Callback::Other;
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != REDIRECT_PATH {
        return Callback::Other;
    }
    let mut code = None;
    let mut got_state = None;
    let mut error = None;
    let mut description = String::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => code = Some(Secret::new(v.into_owned())),
            "state" => got_state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = v.into_owned(),
            _ => {}
        }
    }
    if code.is_none() && error.is_none() {
        return Callback::Other;
    }
    if got_state.as_deref() != Some(state) {
        return Callback::StateMismatch;
    }
    match (code, error) {
        (_, Some(error)) => Callback::Error { error, description },
        (Some(code), None) => Callback::Code(code),
        (None, None) => Callback::Other,
    }
}

/// The whole browser flow: listen on the loopback port, hand the authorization URL to `show`
/// (print it, open a browser), wait for the redirect, check `state`, exchange the code with the
/// PKCE verifier. `port` 0 picks a free port.
pub async fn authorize(
    app: &OAuthApp,
    scopes: &str,
    port: u16,
    wait: Duration,
    show: impl FnOnce(&str),
) -> Result<Credentials, ConnectError> {
    let loopback = Loopback::bind(port).await?;
    let pkce = Pkce::generate();
    let state = new_state();
    show(&authorization_url(
        app,
        loopback.redirect_uri(),
        scopes,
        &state,
        &pkce,
    ));
    let code = loopback.receive(&state, wait).await?;
    exchange_code(app, &code, loopback.redirect_uri(), &pkce).await
}

/// `grant_type=authorization_code`: the code and PKCE verifier for an access and refresh token.
pub async fn exchange_code(
    app: &OAuthApp,
    code: &Secret,
    redirect_uri: &str,
    pkce: &Pkce,
) -> Result<Credentials, ConnectError> {
    let mut body = serde_json::json!({
        "grant_type": "authorization_code",
        "code": code.expose(),
        "client_id": app.client_id,
        "redirect_uri": redirect_uri,
        "code_verifier": pkce.verifier().expose(),
    });
    if let Some(s) = &app.client_secret {
        body["client_secret"] = Value::String(s.expose().to_string());
    }
    let scrub = [code.expose(), pkce.verifier().expose()];
    token_request(app, body, &scrub, None).await
}

/// `grant_type=client_credentials` (confidential clients): a token acting as the admin who
/// created the client, without a refresh token. `expires_in`: seconds (Zendesk allows 300 to
/// 172,800; default 1,800).
pub async fn client_credentials(
    app: &OAuthApp,
    scopes: &str,
    expires_in: Option<u64>,
) -> Result<Credentials, ConnectError> {
    let Some(secret) = &app.client_secret else {
        return Err(ConnectError::NotConfidential {
            description: "no client secret was given".into(),
        });
    };
    let mut body = serde_json::json!({
        "grant_type": "client_credentials",
        "client_id": app.client_id,
        "client_secret": secret.expose(),
        "scope": scopes,
    });
    if let Some(e) = expires_in {
        body["expires_in"] = Value::from(e);
    }
    let mut creds = token_request(app, body, &[], Some(scopes)).await?;
    if let Credentials::OAuth { grant_scope, .. } = &mut creds {
        *grant_scope = Some(scopes.to_string());
    }
    Ok(creds)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// POSTs a grant to `/oauth/tokens` and turns the answer into credentials or a typed error.
/// `scrub`: request secrets to remove from any text taken from the answer.
async fn token_request(
    app: &OAuthApp,
    body: Value,
    scrub: &[&str],
    scopes: Option<&str>,
) -> Result<Credentials, ConnectError> {
    const PATH: &str = "/oauth/tokens";
    let mut secrets: Vec<&str> = scrub.to_vec();
    if let Some(s) = &app.client_secret {
        secrets.push(s.expose());
    }
    let clean = |text: String| {
        secrets
            .iter()
            .filter(|s| s.len() >= 4)
            .fold(text, |t, s| t.replace(s, "[redacted]"))
    };
    let http = reqwest::Client::builder()
        .user_agent(concat!("zdsync/", env!("CARGO_PKG_VERSION")))
        // The body carries the client secret: a redirect is never followed.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ConnectError::Protocol(format!("cannot set up the HTTP client ({e})")))?;
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    drop(body);
    // Not retried: a code is single-use, so a resend after a lost answer could only fail.
    let resp = http
        .post(format!("{}{PATH}", app.base_url))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "application/json")
        .body(bytes)
        .send()
        .await
        .map_err(|e| ZendeskError::Transport {
            path: PATH.into(),
            attempts: 1,
            message: clean(e.without_url().to_string()),
        })?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        if status == 404 {
            let no_help_desk = v
                .pointer("/error/title")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("No help desk at"));
            if no_help_desk {
                return Err(ZendeskError::SubdomainNotFound {
                    subdomain: app.subdomain.clone(),
                }
                .into());
            }
        }
        let error = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let description = clean(
            v.get("error_description")
                .or_else(|| v.get("description"))
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| format!("HTTP {status}")),
        );
        return Err(match error.as_str() {
            "invalid_grant" => ConnectError::CodeRefused { description },
            "invalid_client" => ConnectError::ClientRefused { description },
            "unauthorized_client" => ConnectError::NotConfidential { description },
            "invalid_scope" => ConnectError::BadScope {
                scopes: scopes.unwrap_or("").to_string(),
                description,
            },
            "" => ConnectError::Protocol(format!("HTTP {status} ({description})")),
            other => ConnectError::Protocol(format!("HTTP {status}: {other}: {description}")),
        });
    }
    let access = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ConnectError::Protocol(format!("HTTP {status} without an access token")))?;
    let expires_at = v
        .get("expires_in")
        .and_then(Value::as_i64)
        .map(|secs| now_unix() + secs);
    Ok(Credentials::OAuth {
        access_token: Secret::new(access),
        refresh_token: v
            .get("refresh_token")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Secret::new),
        client_id: Some(app.client_id.clone()),
        client_secret: app.client_secret.clone(),
        expires_at,
        grant_scope: None,
    })
}

/// What `zdsync connect --check` reports: the preflight of a run, for every object.
#[derive(Debug, Clone)]
pub struct ConnectionCheck {
    pub method: AuthMethod,
    pub who: Preflight,
    /// Unix seconds when the stored access token expires (from the credential store).
    pub stored_expires_at: Option<i64>,
    /// Whether a sync of each object may write, with the run's troubleshooting message if not.
    pub writable: Vec<(Object, Result<(), ZendeskError>)>,
}

impl ConnectionCheck {
    pub fn can_write(&self, object: Object) -> bool {
        self.writable.iter().any(|(o, r)| *o == object && r.is_ok())
    }
}

/// Runs the preflight of a run against `client` (credentials, subdomain, role, scopes) and
/// says which objects a sync may write. Fails when the credential or subdomain is refused.
pub async fn check(client: &Client, creds: &Credentials) -> Result<ConnectionCheck, ZendeskError> {
    let who = client.whoami().await?;
    let writable = [Object::Users, Object::Organizations, Object::Tickets]
        .into_iter()
        .map(|o| (o, who.check(o, true)))
        .collect();
    let stored_expires_at = match creds {
        Credentials::OAuth { expires_at, .. } => *expires_at,
        Credentials::ApiToken { .. } => None,
    };
    Ok(ConnectionCheck {
        method: creds.method(),
        who,
        stored_expires_at,
        writable,
    })
}

/// Checks credentials that are not stored yet (one `users/me` call, plus the token
/// introspection for OAuth) and returns the connection check. An API token must be an
/// admin's: the run would refuse it anyway.
pub async fn verify(
    opts: ClientOptions,
    creds: Credentials,
    what: &str,
) -> Result<ConnectionCheck, ZendeskError> {
    let store = Arc::new(MemoryCredentials::new(creds.clone(), what));
    let client = Client::new(opts, store.clone() as Arc<dyn CredentialStore>).await?;
    let report = check(&client, &creds).await?;
    if creds.method() == AuthMethod::ApiToken {
        report.who.check(Object::Users, true)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let p = Pkce::from_verifier(Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert_eq!(p.challenge(), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let a = Pkce::generate();
        let b = Pkce::generate();
        assert_eq!(a.verifier().expose().len(), 64);
        assert_ne!(a.verifier().expose(), b.verifier().expose());
        assert!(!format!("{a:?}").contains(a.verifier().expose()));
    }

    #[test]
    fn callback_parsing() {
        let head = |t: &str| format!("GET {t} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
        assert!(matches!(
            parse_callback(&head("/callback?code=abc&state=s1"), "s1"),
            Callback::Code(c) if c.expose() == "abc"
        ));
        assert!(matches!(
            parse_callback(&head("/callback?code=abc&state=s2"), "s1"),
            Callback::StateMismatch
        ));
        assert!(matches!(
            parse_callback(&head("/callback?code=abc"), "s1"),
            Callback::StateMismatch
        ));
        assert!(matches!(
            parse_callback(&head("/callback?error=access_denied&state=s1"), "s1"),
            Callback::Error { error, .. } if error == "access_denied"
        ));
        assert!(matches!(
            parse_callback(&head("/favicon.ico"), "s1"),
            Callback::Other
        ));
        assert!(matches!(parse_callback("garbage", "s1"), Callback::Other));
    }

    #[test]
    fn url_and_scopes() {
        let app = OAuthApp {
            base_url: "https://acme.zendesk.com".into(),
            subdomain: "acme".into(),
            client_id: "zdsync".into(),
            client_secret: Some(Secret::new("shh-secret")),
        };
        let pkce = Pkce::generate();
        let url = authorization_url(
            &app,
            "http://127.0.0.1:5/callback",
            SYNC_SCOPES,
            "st",
            &pkce,
        );
        assert!(url.starts_with("https://acme.zendesk.com/oauth/authorizations/new?response_type=code&client_id=zdsync&redirect_uri=http%3A%2F%2F127.0.0.1%3A5%2Fcallback&scope=read+users%3Awrite+organizations%3Awrite+tickets%3Awrite&state=st&code_challenge="));
        assert!(url.ends_with("&code_challenge_method=S256"));
        assert!(!url.contains(pkce.verifier().expose()));
        assert!(!format!("{app:?}").contains("shh-secret"));
        assert_eq!(
            scopes_for(&[Object::Users, Object::Tickets]),
            "read users:write tickets:write"
        );
    }
}
