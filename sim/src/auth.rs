//! Credentials of one account: API tokens (HTTP Basic `email/token:TOKEN`), OAuth clients and
//! OAuth tokens with scopes, expiry and refresh-token rotation.
//!
//! The authorization-code flow: `GET /oauth/authorizations/new` stands in for the consent page
//! (approved or denied by an account setting, so tests need no browser) and redirects to the
//! client's redirect URI with a single-use code; `grant_type=authorization_code` exchanges it,
//! checking the PKCE verifier (S256) and the code's expiry (120 s, as Zendesk documents).

use crate::config::{AccountConfig, ClientKind};
use crate::util::as_id;
use base64::Engine;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Basic,
    Bearer,
}

impl AuthKind {
    pub fn name(self) -> &'static str {
        match self {
            AuthKind::Basic => "basic",
            AuthKind::Bearer => "bearer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: u64,
    pub role: String,
    pub kind: AuthKind,
    /// OAuth scopes; `None` for API-token auth (all access).
    pub scopes: Option<Vec<String>>,
    pub token_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AuthError {
    /// Missing, malformed or wrong Basic credentials.
    BadCredentials,
    /// Bearer token unknown, expired or revoked; the text is the `error_description`.
    InvalidToken(&'static str),
}

#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub id: u64,
    pub identifier: String,
    pub secret: Option<String>,
    pub kind: ClientKind,
    #[allow(dead_code)] // kept for a consent page; the auto-approving one shows no name
    pub name: String,
    pub redirect_uris: Vec<String>,
    pub access_ttl_secs: Option<u64>,
    pub refresh_ttl_secs: u64,
    pub owner_user_id: u64,
}

#[derive(Debug, Clone)]
pub struct OAuthToken {
    pub id: u64,
    pub client_id: u64,
    pub user_id: u64,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub scopes: Vec<String>,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub refresh_expires_ms: Option<i64>,
    pub used_ms: Option<i64>,
    pub revoked: bool,
}

/// A failed token-endpoint call: status and RFC 6749 error body.
#[derive(Debug, Clone)]
pub struct GrantError {
    pub status: u16,
    pub body: Value,
}

fn grant_err(status: u16, error: &str, description: &str) -> GrantError {
    GrantError {
        status,
        body: json!({"error": error, "error_description": description}),
    }
}

const INVALID_GRANT: &str = "The provided authorization grant is invalid, expired, revoked, does not match the redirection URI used in the authorization request, or was issued to another client.";
const INVALID_CLIENT: &str = "Client authentication failed due to unknown client, no client authentication included, or unsupported authentication method.";

const RESOURCES: &[&str] = &[
    "tickets",
    "users",
    "organizations",
    "hc",
    "apps",
    "triggers",
    "automations",
    "targets",
    "webhooks",
    "macros",
    "requests",
    "satisfaction_ratings",
    "dynamic_content",
];

/// Whether `scope` is one Zendesk knows; a token with any unknown scope is refused everywhere.
pub fn scope_is_valid(scope: &str) -> bool {
    match scope {
        "read" | "write" | "impersonate" | "auditlogs:read" | "any_channel:write"
        | "web_widget:write" => true,
        s => match s.split_once(':') {
            Some((res, access)) => RESOURCES.contains(&res) && matches!(access, "read" | "write"),
            None => false,
        },
    }
}

/// The scope a request needs, or `None` when the token is enough (`users/me`, token
/// introspection). Resource-less endpoints (job statuses, search) accept any valid scope of
/// the right access.
pub fn required_scope(resource: Option<&str>, write: bool) -> String {
    let access = if write { "write" } else { "read" };
    match resource {
        Some(r) => format!("{r}:{access}"),
        None => access.to_string(),
    }
}

/// Checks `scopes` for `resource`/`write`; returns the missing scope text on failure.
pub fn check_scope(scopes: &[String], resource: Option<&str>, write: bool) -> Result<(), String> {
    let needed = required_scope(resource, write);
    if scopes.iter().any(|s| !scope_is_valid(s)) {
        return Err(needed);
    }
    let access = if write { "write" } else { "read" };
    let ok = scopes.iter().any(|s| {
        s == access
            || match resource {
                Some(r) => s.split_once(':') == Some((r, access)),
                None => s.ends_with(&format!(":{access}")),
            }
    });
    if ok {
        Ok(())
    } else {
        Err(needed)
    }
}

/// An authorization code waiting to be exchanged.
#[derive(Debug, Clone)]
struct AuthCode {
    client_id: u64,
    redirect_uri: String,
    scopes: Vec<String>,
    /// PKCE `code_challenge` (S256), when the request carried one.
    challenge: Option<String>,
    user_id: u64,
    expires_ms: i64,
}

/// What the consent page does with an authorization request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consent {
    /// The admin clicks "Allow" at once (tests, demo).
    #[default]
    Approve,
    /// The admin clicks "Deny": the redirect carries `error=access_denied`.
    Deny,
}

/// The answer of `GET /oauth/authorizations/new`.
#[derive(Debug, Clone, PartialEq)]
pub enum Authorize {
    /// 302 to this URL (a code, or an error the client must see).
    Redirect(String),
    /// A request that must not be redirected (unknown client, unregistered redirect URI):
    /// RFC 6749 §4.1.2.1 says to show the error to the user instead.
    Refuse(String),
}

/// The `redirect_uri` with `params` appended to its query.
fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{}", ser.finish())
}

/// `http://127.0.0.1:8123/cb` -> (`http`, `127.0.0.1`, `/cb`): loopback redirect URIs match a
/// registered one whatever their port (RFC 8252 §7.3: native apps pick a free port).
fn loopback_parts(uri: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = uri.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    matches!(host, "127.0.0.1" | "localhost" | "[::1]").then_some((scheme, host, path))
}

fn redirect_registered(client: &OAuthClient, uri: &str) -> bool {
    client.redirect_uris.iter().any(|r| {
        r == uri
            || matches!(
                (loopback_parts(r), loopback_parts(uri)),
                (Some(a), Some(b)) if a == b
            )
    })
}

/// BASE64URL(SHA-256(verifier)) without padding (RFC 7636 §4.2).
pub fn s256(verifier: &str) -> String {
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier))
}

#[derive(Debug)]
pub struct AuthStore {
    /// Lower-case staff email -> (user id, role).
    pub staff: HashMap<String, (u64, String)>,
    pub api_tokens: HashSet<String>,
    pub clients: Vec<OAuthClient>,
    pub tokens: HashMap<String, OAuthToken>,
    refresh_index: HashMap<String, String>,
    codes: HashMap<String, AuthCode>,
    next_token_id: u64,
    rng: SmallRng,
}

impl AuthStore {
    /// Builds the store from config; `staff` maps emails to the users already created.
    pub fn new(
        cfg: &AccountConfig,
        staff: HashMap<String, (u64, String)>,
        admin_id: u64,
        now_ms: i64,
        seed: u64,
    ) -> Self {
        let mut s = Self {
            staff,
            api_tokens: cfg.api_tokens.iter().cloned().collect(),
            clients: Vec::new(),
            tokens: HashMap::new(),
            refresh_index: HashMap::new(),
            codes: HashMap::new(),
            next_token_id: 1_000_001,
            rng: SmallRng::seed_from_u64(seed),
        };
        for (i, c) in cfg.oauth_clients.iter().enumerate() {
            let owner = c
                .owner_email
                .as_deref()
                .and_then(|e| s.staff.get(&e.to_lowercase()).map(|x| x.0))
                .unwrap_or(admin_id);
            s.clients.push(OAuthClient {
                id: 900_001 + i as u64,
                identifier: c.identifier.clone(),
                secret: c.secret.clone(),
                kind: c.kind,
                name: c.name.clone(),
                redirect_uris: c.redirect_uris.clone(),
                access_ttl_secs: c.access_ttl_secs,
                refresh_ttl_secs: c.refresh_ttl_secs,
                owner_user_id: owner,
            });
        }
        for t in &cfg.oauth_tokens {
            let client_id = t
                .client
                .as_deref()
                .and_then(|ident| s.clients.iter().find(|c| c.identifier == ident))
                .or(s.clients.first())
                .map(|c| c.id)
                .unwrap_or(0);
            let user_id = t
                .user_email
                .as_deref()
                .and_then(|e| s.staff.get(&e.to_lowercase()).map(|x| x.0))
                .unwrap_or(admin_id);
            let tok = OAuthToken {
                id: s.next_id(),
                client_id,
                user_id,
                access_token: t.access_token.clone(),
                refresh_token: t.refresh_token.clone(),
                scopes: t.scopes.clone(),
                created_ms: now_ms,
                expires_ms: t.expires_in_secs.map(|x| now_ms + x * 1000),
                refresh_expires_ms: t
                    .refresh_token
                    .as_ref()
                    .and(t.refresh_expires_in_secs)
                    .map(|x| now_ms + x * 1000),
                used_ms: None,
                revoked: false,
            };
            s.insert(tok);
        }
        s
    }

    fn next_id(&mut self) -> u64 {
        self.next_token_id += 1;
        self.next_token_id
    }

    fn insert(&mut self, tok: OAuthToken) {
        if let Some(r) = &tok.refresh_token {
            self.refresh_index
                .insert(r.clone(), tok.access_token.clone());
        }
        self.tokens.insert(tok.access_token.clone(), tok);
    }

    fn random_token(&mut self) -> String {
        (0..4)
            .map(|_| format!("{:016x}", self.rng.random::<u64>()))
            .collect()
    }

    pub fn authenticate(
        &mut self,
        header: Option<&str>,
        now_ms: i64,
    ) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::BadCredentials)?.trim();
        let (scheme, rest) = header.split_once(' ').ok_or(AuthError::BadCredentials)?;
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .map_err(|_| AuthError::BadCredentials)?;
            let text = String::from_utf8(raw).map_err(|_| AuthError::BadCredentials)?;
            let (user, secret) = text.split_once(':').ok_or(AuthError::BadCredentials)?;
            // Email + password Basic auth is deprecated: only `email/token` is accepted.
            let email = user
                .strip_suffix("/token")
                .ok_or(AuthError::BadCredentials)?;
            let (id, role) = self
                .staff
                .get(&email.to_lowercase())
                .cloned()
                .ok_or(AuthError::BadCredentials)?;
            if !self.api_tokens.contains(secret) {
                return Err(AuthError::BadCredentials);
            }
            return Ok(Principal {
                user_id: id,
                role,
                kind: AuthKind::Basic,
                scopes: None,
                token_id: None,
            });
        }
        if scheme.eq_ignore_ascii_case("bearer") {
            let tok = self
                .tokens
                .get_mut(rest.trim())
                .ok_or(AuthError::InvalidToken("The access token is invalid"))?;
            if tok.revoked {
                return Err(AuthError::InvalidToken("The access token was revoked"));
            }
            if tok.expires_ms.is_some_and(|e| now_ms >= e) {
                return Err(AuthError::InvalidToken("The access token expired"));
            }
            tok.used_ms = Some(now_ms);
            let (user_id, scopes, token_id) = (tok.user_id, tok.scopes.clone(), tok.id);
            let role = self
                .staff
                .values()
                .find(|(id, _)| *id == user_id)
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| "admin".into());
            return Ok(Principal {
                user_id,
                role,
                kind: AuthKind::Bearer,
                scopes: Some(scopes),
                token_id: Some(token_id),
            });
        }
        Err(AuthError::BadCredentials)
    }

    pub fn token_by_id(&self, id: u64) -> Option<&OAuthToken> {
        self.tokens.values().find(|t| t.id == id)
    }

    pub fn client_by_id(&self, id: u64) -> Option<&OAuthClient> {
        self.clients.iter().find(|c| c.id == id)
    }

    /// Issues a token directly (admin endpoint / tests).
    pub fn mint(
        &mut self,
        user_id: u64,
        scopes: Vec<String>,
        expires_in_secs: Option<i64>,
        with_refresh: bool,
        now_ms: i64,
    ) -> OAuthToken {
        let client = self.clients.first().cloned();
        let tok = OAuthToken {
            id: self.next_id(),
            client_id: client.as_ref().map(|c| c.id).unwrap_or(0),
            user_id,
            access_token: self.random_token(),
            refresh_token: with_refresh.then(|| self.random_token()),
            scopes,
            created_ms: now_ms,
            expires_ms: expires_in_secs.map(|s| now_ms + s * 1000),
            refresh_expires_ms: with_refresh.then(|| {
                now_ms
                    + client
                        .as_ref()
                        .map(|c| c.refresh_ttl_secs)
                        .unwrap_or(2_592_000) as i64
                        * 1000
            }),
            used_ms: None,
            revoked: false,
        };
        self.insert(tok.clone());
        tok
    }

    /// Marks a token expired or revoked (tests).
    pub fn expire(&mut self, access_token: &str, now_ms: i64) -> bool {
        match self.tokens.get_mut(access_token) {
            Some(t) => {
                t.expires_ms = Some(now_ms - 1);
                true
            }
            None => false,
        }
    }

    pub fn revoke(&mut self, access_token: &str) -> bool {
        match self.tokens.get_mut(access_token) {
            Some(t) => {
                t.revoked = true;
                true
            }
            None => false,
        }
    }

    /// `POST /oauth/tokens`. Body fields as Zendesk documents them (JSON).
    pub fn grant(&mut self, body: &Map<String, Value>, now_ms: i64) -> Result<Value, GrantError> {
        let field = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        match field("grant_type").as_deref() {
            Some("refresh_token") => self.grant_refresh(body, now_ms),
            Some("client_credentials") => self.grant_client_credentials(body, now_ms),
            Some("authorization_code") => self.grant_code(body, now_ms),
            Some(_) => Err(grant_err(
                400,
                "unsupported_grant_type",
                "The authorization grant type is not supported by the authorization server.",
            )),
            None => Err(grant_err(
                400,
                "invalid_request",
                "The request is missing a required parameter, includes an unsupported parameter value, or is otherwise malformed.",
            )),
        }
    }

    /// `GET /oauth/authorizations/new`: validates the request, then approves or denies it as
    /// the admin `user_id` would on the consent page.
    pub fn authorize(
        &mut self,
        q: &crate::util::Query,
        consent: Consent,
        user_id: u64,
        code_ttl_secs: u64,
        now_ms: i64,
    ) -> Authorize {
        let ident = q.get("client_id").unwrap_or("");
        let Some(client) = self.clients.iter().find(|c| c.identifier == ident).cloned() else {
            return Authorize::Refuse(format!(
                "Invalid authorization request: no OAuth client with the unique identifier \"{ident}\""
            ));
        };
        let Some(redirect) = q.get("redirect_uri").filter(|r| !r.is_empty()) else {
            return Authorize::Refuse(
                "Invalid authorization request: redirect_uri is missing".into(),
            );
        };
        if !redirect_registered(&client, redirect) {
            return Authorize::Refuse(format!(
                "Invalid authorization request: the redirect URI is not one of the client's \
                 redirect URLs ({})",
                client.redirect_uris.join(", ")
            ));
        }
        let state = q.get("state").unwrap_or("");
        let fail = |error: &str, description: &str| {
            let mut p = vec![("error", error), ("error_description", description)];
            if !state.is_empty() {
                p.push(("state", state));
            }
            Authorize::Redirect(with_query(redirect, &p))
        };
        if q.get("response_type") != Some("code") {
            return fail(
                "unsupported_response_type",
                "The authorization server does not support this response type.",
            );
        }
        let scopes: Vec<String> = q
            .get("scope")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if scopes.is_empty() || scopes.iter().any(|s| !scope_is_valid(s)) {
            return fail(
                "invalid_scope",
                "The requested scope is invalid, unknown, or malformed.",
            );
        }
        let challenge = q.get("code_challenge").filter(|c| !c.is_empty());
        match (challenge, q.get("code_challenge_method")) {
            (Some(_), Some("S256")) => {}
            (Some(_), _) => {
                return fail(
                    "invalid_request",
                    "Only the S256 code_challenge_method is supported.",
                )
            }
            (None, _) if client.kind == ClientKind::Public => {
                return fail(
                    "invalid_request",
                    "Public clients must send a PKCE code_challenge.",
                )
            }
            (None, _) => {}
        }
        if consent == Consent::Deny {
            return fail(
                "access_denied",
                "The resource owner or authorization server denied the request.",
            );
        }
        let code = self.random_token();
        self.codes.insert(
            code.clone(),
            AuthCode {
                client_id: client.id,
                redirect_uri: redirect.to_string(),
                scopes,
                challenge: challenge.map(str::to_string),
                user_id,
                expires_ms: now_ms + code_ttl_secs as i64 * 1000,
            },
        );
        let mut p = vec![("code", code.as_str())];
        if !state.is_empty() {
            p.push(("state", state));
        }
        Authorize::Redirect(with_query(redirect, &p))
    }

    /// `grant_type=authorization_code`: a code is used once (a second attempt fails even when
    /// the first did), within its lifetime, by its client, with the same redirect URI and the
    /// PKCE verifier of its challenge.
    fn grant_code(&mut self, body: &Map<String, Value>, now_ms: i64) -> Result<Value, GrantError> {
        let client = self.client(body)?;
        let field = |k: &str| {
            body.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        let code = field("code").ok_or_else(|| {
            grant_err(
                400,
                "invalid_request",
                "The request is missing a required parameter: code.",
            )
        })?;
        let stored = self
            .codes
            .remove(code)
            .ok_or_else(|| grant_err(400, "invalid_grant", INVALID_GRANT))?;
        if stored.client_id != client.id
            || now_ms >= stored.expires_ms
            || field("redirect_uri").is_some_and(|r| r != stored.redirect_uri)
        {
            return Err(grant_err(400, "invalid_grant", INVALID_GRANT));
        }
        if let Some(challenge) = &stored.challenge {
            let ok = field("code_verifier").is_some_and(|v| s256(v) == *challenge);
            if !ok {
                return Err(grant_err(
                    400,
                    "invalid_grant",
                    "The code_verifier does not match the code_challenge of the authorization request.",
                ));
            }
        }
        let ttl = Self::ttls(body, &client)?;
        Ok(self.issue(&client, stored.user_id, stored.scopes, ttl, true, now_ms))
    }

    /// Looks the client up by identifier and checks the secret (required for confidential
    /// clients).
    fn client(&self, body: &Map<String, Value>) -> Result<OAuthClient, GrantError> {
        let ident = body.get("client_id").and_then(Value::as_str).unwrap_or("");
        let secret = body.get("client_secret").and_then(Value::as_str);
        let c = self
            .clients
            .iter()
            .find(|c| c.identifier == ident)
            .ok_or_else(|| grant_err(401, "invalid_client", INVALID_CLIENT))?;
        if c.kind == ClientKind::Confidential && c.secret.as_deref() != secret {
            return Err(grant_err(401, "invalid_client", INVALID_CLIENT));
        }
        Ok(c.clone())
    }

    /// TTLs asked for in the body, checked against Zendesk's bounds.
    fn ttls(
        body: &Map<String, Value>,
        client: &OAuthClient,
    ) -> Result<(Option<u64>, u64), GrantError> {
        let bad = |d: &str| grant_err(400, "invalid_request", d);
        let expires_in = match body.get("expires_in").filter(|v| !v.is_null()) {
            Some(v) => {
                let s = as_id(v).ok_or_else(|| bad("expires_in must be an integer"))?;
                if s <= 300 || s >= 172_800 {
                    return Err(bad(
                        "expires_in must be more than 300 and less than 172800 seconds",
                    ));
                }
                Some(s)
            }
            None => client.access_ttl_secs,
        };
        let refresh_in = match body
            .get("refresh_token_expires_in")
            .filter(|v| !v.is_null())
        {
            Some(v) => {
                let s =
                    as_id(v).ok_or_else(|| bad("refresh_token_expires_in must be an integer"))?;
                if s <= 604_800 || s >= 7_776_000 {
                    return Err(bad(
                        "refresh_token_expires_in must be more than 604800 and less than 7776000 seconds",
                    ));
                }
                s
            }
            None => client.refresh_ttl_secs,
        };
        if expires_in.is_some_and(|e| e >= refresh_in) {
            return Err(bad("expires_in must be less than refresh_token_expires_in"));
        }
        Ok((expires_in, refresh_in))
    }

    fn issue(
        &mut self,
        client: &OAuthClient,
        user_id: u64,
        scopes: Vec<String>,
        ttl: (Option<u64>, u64),
        with_refresh: bool,
        now_ms: i64,
    ) -> Value {
        let tok = OAuthToken {
            id: self.next_id(),
            client_id: client.id,
            user_id,
            access_token: self.random_token(),
            refresh_token: with_refresh.then(|| self.random_token()),
            scopes,
            created_ms: now_ms,
            expires_ms: ttl.0.map(|s| now_ms + s as i64 * 1000),
            refresh_expires_ms: with_refresh.then(|| now_ms + ttl.1 as i64 * 1000),
            used_ms: None,
            revoked: false,
        };
        let mut out = Map::new();
        out.insert("access_token".into(), json!(tok.access_token));
        out.insert("token_type".into(), json!("bearer"));
        out.insert("scope".into(), json!(tok.scopes.join(" ")));
        out.insert("expires_in".into(), json!(ttl.0));
        if let Some(r) = &tok.refresh_token {
            out.insert("refresh_token".into(), json!(r));
            out.insert("refresh_token_expires_in".into(), json!(ttl.1));
        }
        self.insert(tok);
        Value::Object(out)
    }

    /// Rotation: the old access and refresh tokens stop working; a new pair is issued.
    fn grant_refresh(
        &mut self,
        body: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Value, GrantError> {
        let client = self.client(body)?;
        let rt = body
            .get("refresh_token")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                grant_err(
                    400,
                    "invalid_request",
                    "The request is missing a required parameter: refresh_token.",
                )
            })?;
        let access = self
            .refresh_index
            .get(rt)
            .cloned()
            .ok_or_else(|| grant_err(400, "invalid_grant", INVALID_GRANT))?;
        let old = self
            .tokens
            .get(&access)
            .cloned()
            .ok_or_else(|| grant_err(400, "invalid_grant", INVALID_GRANT))?;
        if old.revoked
            || old.client_id != client.id
            || old.refresh_expires_ms.is_some_and(|e| now_ms >= e)
        {
            return Err(grant_err(400, "invalid_grant", INVALID_GRANT));
        }
        let ttl = Self::ttls(body, &client)?;
        // A narrower `scope` may be asked for (OAS examples also send `scopes`).
        let asked = body
            .get("scope")
            .or_else(|| body.get("scopes"))
            .map(scope_list)
            .filter(|s| !s.is_empty());
        let scopes = match asked {
            Some(s) if s.iter().all(|x| old.scopes.contains(x)) => s,
            Some(_) => {
                return Err(grant_err(
                    400,
                    "invalid_scope",
                    "The requested scope is invalid, unknown, or malformed.",
                ))
            }
            None => old.scopes.clone(),
        };
        self.refresh_index.remove(rt);
        if let Some(t) = self.tokens.get_mut(&access) {
            t.revoked = true;
        }
        Ok(self.issue(&client, old.user_id, scopes, ttl, true, now_ms))
    }

    /// Confidential clients only; the token acts as the client's owner and has no refresh token.
    fn grant_client_credentials(
        &mut self,
        body: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Value, GrantError> {
        let client = self.client(body)?;
        if client.kind != ClientKind::Confidential {
            return Err(grant_err(
                400,
                "unauthorized_client",
                "The client is not authorized to perform this request using this method.",
            ));
        }
        let scopes = body
            .get("scope")
            .map(scope_list)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| vec!["read".into()]);
        let (exp, refresh) = Self::ttls(body, &client)?;
        let exp = exp.or(Some(1800));
        Ok(self.issue(
            &client,
            client.owner_user_id,
            scopes,
            (exp, refresh),
            false,
            now_ms,
        ))
    }

    /// `GET /api/v2/oauth/tokens/current` body.
    pub fn render_token(&self, tok: &OAuthToken, base: &str) -> Value {
        let iso_opt = |ms: Option<i64>| ms.map(crate::util::iso);
        let client = self.client_by_id(tok.client_id);
        json!({"token": {
            "id": tok.id,
            "url": format!("{base}/api/v2/oauth/tokens/{}.json", tok.id),
            "client_id": tok.client_id,
            "client_identifier": client.map(|c| c.identifier.clone()),
            "user_id": tok.user_id,
            "token": tok.access_token.chars().take(10).collect::<String>(),
            "refresh_token": Value::Null,
            "scopes": tok.scopes,
            "created_at": crate::util::iso(tok.created_ms),
            "expires_at": iso_opt(tok.expires_ms),
            "refresh_token_expires_at": iso_opt(tok.refresh_expires_ms),
            "used_at": iso_opt(tok.used_ms),
        }})
    }
}

fn scope_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        _ => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(check_scope(&s(&["read", "write"]), Some("tickets"), true).is_ok());
        assert_eq!(
            check_scope(&s(&["read", "users:write"]), Some("tickets"), true),
            Err("tickets:write".into())
        );
        assert!(check_scope(&s(&["users:read"]), None, false).is_ok());
        assert!(check_scope(&s(&["read", "bogus"]), Some("users"), false).is_err());
        assert!(check_scope(&s(&["write"]), Some("users"), false).is_err());
    }
}
