//! Sync configuration: one TOML file per sync (see the README for the full reference).
//!
//! Every problem is reported with the key and the line it sits on, and a hint at the fix;
//! a bad config fails the run before anything is read or written.

use crate::export::{self, Compression, Escape, Format, ReadOptions};
use crate::fields::{self, FieldType, Object};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How rows are written to Zendesk. `upsert`, `insert` and `update` are object modes; `add`,
/// `remove`, `mirror` (and `upsert` with an `[audience]` table) are audience modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Create new records and update existing ones (an audience: also add the tag).
    Upsert,
    /// Create new records only; existing keys are left alone.
    Insert,
    /// Update existing records only; keys Zendesk does not know fail.
    Update,
    /// Audience: members new since the last run get the tag; nobody loses it.
    Add,
    /// Audience: members gone since the last run lose the tag; nobody gains it.
    Remove,
    /// Audience: new members get the tag, members gone since the last run lose it.
    Mirror,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Upsert => "upsert",
            Mode::Insert => "insert",
            Mode::Update => "update",
            Mode::Add => "add",
            Mode::Remove => "remove",
            Mode::Mirror => "mirror",
        }
    }

    /// Modes that only exist for audience syncs.
    pub fn audience_only(self) -> bool {
        matches!(self, Mode::Add | Mode::Remove | Mode::Mirror)
    }
}

/// How tag changes reach Zendesk (users and organizations have no bulk tag add/remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TagWrites {
    /// Read the records' tags (`show_many`, 100 a call), then one batch `update_many` job with
    /// each record's full tag list (its tags plus or minus the audience tag). About three
    /// requests per 100 records; a tag someone else adds between the read and the job is lost.
    #[default]
    Bulk,
    /// One `PUT`/`DELETE /api/v2/{users|organizations}/{id}/tags` request per record: never
    /// replaces a tag list, costs one request per record.
    PerRecord,
}

impl TagWrites {
    pub fn as_str(self) -> &'static str {
        match self {
            TagWrites::Bulk => "bulk",
            TagWrites::PerRecord => "per_record",
        }
    }
}

/// The `[audience]` table: segment membership kept as a zdsync-owned tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audience {
    /// The tag zdsync owns (lower case, no spaces).
    pub tag: String,
    /// Users only: an export column with the member's email, used to find users that have no
    /// matching external_id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_column: Option<String>,
    #[serde(default)]
    pub tag_writes: TagWrites,
    /// mirror / remove: accept an export without a single member (which untags everyone).
    #[serde(default)]
    pub allow_empty_export: bool,
}

/// What a NULL cell does to the mapped field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Nulls {
    /// Send `null`, clearing the value in Zendesk.
    #[default]
    Clear,
    /// Leave the field out, keeping whatever Zendesk has.
    Skip,
}

/// How a string column is split into tags or list items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Commas and whitespace both separate items.
    #[default]
    CommaOrSpace,
    Comma,
    Space,
}

/// How the cells of a date or date-time mapping are written, when not as date text
/// (`format = "epoch_seconds"` / `"epoch_millis"` in the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeFormat {
    /// Seconds since 1970-01-01T00:00:00Z, optionally with up to 9 decimals.
    EpochSeconds,
    /// Whole milliseconds since 1970-01-01T00:00:00Z.
    EpochMillis,
}

impl TimeFormat {
    /// The value as written in a sync config.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeFormat::EpochSeconds => "epoch_seconds",
            TimeFormat::EpochMillis => "epoch_millis",
        }
    }
}

/// Where the field of one mapping comes from and how it is typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMapping {
    /// The mapping key as written (`email`, `user_fields.plan`, `custom_fields.360001`).
    pub field: String,
    /// The export column (CSV/Parquet column name or JSON dotted path).
    pub column: String,
    pub target: Target,
    pub ty: FieldType,
    pub split: Split,
    /// Date and date-time fields only: the cells are epoch numbers, not date text.
    pub format: Option<TimeFormat>,
    /// 1-based line in the config file, for messages.
    pub line: usize,
}

/// Where a mapped value goes in the Zendesk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Standard(&'static fields::StandardField),
    /// `user_fields` / `organization_fields` keyed by field key.
    FieldKey(String),
    /// Ticket `custom_fields` by field id.
    TicketField(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub location: String,
    pub read: ReadOptions,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zendesk {
    pub subdomain: String,
    /// A reference to where the credential lives (`env`, `file:<path>`, a secret ARN); never the
    /// credential itself.
    pub credentials: String,
    pub base_url: Option<String>,
    pub rate_limit_rpm: Option<u32>,
    /// Bulk jobs a run keeps submitted and unfinished at once (Zendesk allows about 30 per
    /// account, shared with every other client).
    pub max_jobs_in_flight: Option<usize>,
}

/// A validated sync definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    pub name: String,
    pub object: Object,
    pub mode: Mode,
    pub primary_key: String,
    pub chunk_rows: usize,
    /// A run that would send more rows than this stops before writing anything (a mistaken
    /// mapping change must not spend a day's budget unnoticed).
    pub max_rows_per_run: Option<u64>,
    pub nulls: Nulls,
    pub source: Source,
    pub zendesk: Zendesk,
    pub mapping: Vec<FieldMapping>,
    /// Set for audience syncs (the `[audience]` table).
    pub audience: Option<Audience>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read sync config `{path}`: {reason}")]
    Read { path: String, reason: String },
    #[error("sync config `{file}`: {message}")]
    Invalid { file: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: toml::Spanned<String>,
    object: Object,
    mode: toml::Spanned<Mode>,
    primary_key: String,
    #[serde(default)]
    chunk_rows: Option<toml::Spanned<usize>>,
    #[serde(default)]
    max_rows_per_run: Option<toml::Spanned<u64>>,
    #[serde(default)]
    allow_admin_role: bool,
    #[serde(default)]
    nulls: Nulls,
    source: RawSource,
    zendesk: RawZendesk,
    #[serde(default)]
    mapping: Option<toml::Spanned<OrderedMapping>>,
    #[serde(default)]
    audience: Option<toml::Spanned<RawAudience>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    tag: toml::Spanned<String>,
    #[serde(default)]
    email_column: Option<String>,
    #[serde(default)]
    tag_writes: TagWrites,
    #[serde(default)]
    allow_empty_export: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    location: String,
    #[serde(default)]
    format: Format,
    #[serde(default)]
    compression: Compression,
    #[serde(default)]
    delimiter: Option<toml::Spanned<String>>,
    #[serde(default)]
    escape: Escape,
    #[serde(default)]
    empty_as_null: Option<bool>,
    #[serde(default)]
    null_values: Option<Vec<String>>,
    #[serde(default)]
    header: Option<toml::Spanned<bool>>,
    #[serde(default)]
    columns: Option<toml::Spanned<Vec<String>>>,
    #[serde(default)]
    max_rows_read: Option<toml::Spanned<i64>>,
    /// A number of bytes, or a size text such as "64GiB".
    #[serde(default)]
    max_bytes_read: Option<toml::Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZendesk {
    subdomain: toml::Spanned<String>,
    #[serde(default = "default_credentials")]
    credentials: String,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    rate_limit_rpm: Option<u32>,
    #[serde(default)]
    max_jobs_in_flight: Option<usize>,
}

/// The `[mapping]` table in file order (summaries and payloads follow the order users wrote).
struct OrderedMapping(Vec<(String, toml::Spanned<toml::Value>)>);

impl<'de> Deserialize<'de> for OrderedMapping {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedMapping;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of `field = \"column\"` entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<OrderedMapping, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, toml::Spanned<toml::Value>>()? {
                    out.push((k, v));
                }
                Ok(OrderedMapping(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn default_credentials() -> String {
    "env".to_string()
}

pub const DEFAULT_CHUNK_ROWS: usize = 1000;

/// A sync name: letters, digits, `_` and `-` (it names folders and keys in the bucket).
pub fn valid_sync_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The user roles a sync may set unless it says `allow_admin_role = true`.
pub const NON_ADMIN_ROLES: &[&str] = &["end-user", "agent"];

/// The NULL marker read by default (`null_values = []` turns it off).
pub const DEFAULT_NULL: &str = "\\N";

/// Where a sync may send its credential. A deployment talks to `https://<subdomain>.zendesk.com`
/// only (or the one override its template sets), with credentials from Secrets Manager, since
/// whoever can write `config/` in the bucket must not be able to send the token elsewhere. The
/// CLI takes any `https` URL; plain `http` only to this machine (the simulator).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub deployed: bool,
    /// The one other base URL a deployment may use (`ZDSYNC_ZENDESK_BASE_URL`).
    pub base_url_override: Option<String>,
}

impl EndpointPolicy {
    pub fn deployed(base_url_override: Option<String>) -> EndpointPolicy {
        EndpointPolicy {
            deployed: true,
            base_url_override: base_url_override
                .map(|u| u.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty()),
        }
    }
}

fn loopback(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1")
}

/// `https`, or `http` to this machine; no credentials, query or fragment in the URL.
fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL ({e})"))?;
    let host = u.host_str().unwrap_or_default();
    match u.scheme() {
        "https" => {}
        "http" if loopback(host) => {}
        "http" => {
            return Err(format!(
                "`{url}` is plain http to another machine: the credential would travel unencrypted; use https (http is for the simulator on 127.0.0.1 only)"
            ))
        }
        s => return Err(format!("`{url}` uses `{s}`: only https (or http to 127.0.0.1) is allowed")),
    }
    if !u.username().is_empty()
        || u.password().is_some()
        || u.query().is_some()
        || u.fragment().is_some()
    {
        return Err(format!(
            "`{url}` may hold no user, password, query or fragment"
        ));
    }
    Ok(())
}

impl Zendesk {
    /// The base URL requests (and the credential) go to.
    pub fn endpoint(&self) -> String {
        match self
            .base_url
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty())
        {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => format!("https://{}.zendesk.com", self.subdomain),
        }
    }

    /// Refuse a base URL or a credential reference the policy does not allow (see
    /// [`EndpointPolicy`]); checked before any credential is read.
    pub fn check_endpoint(&self, policy: &EndpointPolicy, file: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            message,
        };
        let url = self.endpoint();
        check_url(&url).map_err(|m| invalid(format!("[zendesk] base_url: {m}")))?;
        if policy.deployed {
            let own = format!("https://{}.zendesk.com", self.subdomain);
            if url != own && policy.base_url_override.as_deref() != Some(url.as_str()) {
                return Err(invalid(format!(
                    "[zendesk] base_url `{url}`: a deployment only talks to {own}; remove base_url (another endpoint needs the template's ZendeskBaseUrl parameter)"
                )));
            }
            if self.credentials.starts_with("file:") {
                return Err(invalid(
                    "[zendesk] credentials: a deployment reads its credential from Secrets Manager (`env`, or a secret ARN), never from a file".into(),
                ));
            }
        }
        Ok(())
    }
}

impl SyncConfig {
    /// Read and validate a sync config file.
    pub fn load(path: &Path) -> Result<SyncConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse and validate config text; `file` names it in messages.
    pub fn parse(text: &str, file: &str) -> Result<SyncConfig, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_string(),
            message,
        };
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let mut message = e.message().to_string();
            if let Some(span) = e.span() {
                message = format!("line {}: {message}", line_of(span.start));
            }
            invalid(message)
        })?;

        let name = raw.name.get_ref().trim().to_string();
        if !valid_sync_name(&name) {
            return Err(invalid(format!(
                "line {}: `name` = {:?} must be letters, digits, `_` or `-` (it names folders in the bucket)",
                line_of(raw.name.span().start),
                raw.name.get_ref()
            )));
        }
        if raw.primary_key.trim().is_empty() {
            return Err(invalid(
                "`primary_key` must name the export column holding each row's unique key".into(),
            ));
        }
        let chunk_rows = match &raw.chunk_rows {
            None => DEFAULT_CHUNK_ROWS,
            Some(s) if (100..=100_000).contains(s.get_ref()) => *s.get_ref(),
            Some(s) => {
                return Err(invalid(format!(
                    "line {}: `chunk_rows` = {} must be between 100 and 100000",
                    line_of(s.span().start),
                    s.get_ref()
                )))
            }
        };
        let max_rows_per_run = match &raw.max_rows_per_run {
            Some(s) if *s.get_ref() == 0 => {
                return Err(invalid(format!(
                    "line {}: `max_rows_per_run` must be at least 1 (leave it out for no cap)",
                    line_of(s.span().start)
                )))
            }
            s => s.as_ref().map(|s| *s.get_ref()),
        };

        let delimiter = match &raw.source.delimiter {
            None => b',',
            Some(d) => match d.get_ref().as_bytes() {
                [b] if *b != b'\n' && *b != b'\r' && *b != b'"' => *b,
                b"\\t" => b'\t',
                _ => {
                    return Err(invalid(format!(
                        "line {}: `source.delimiter` = {:?} must be one single-byte character such as \",\", \"|\" or \"\\t\"",
                        line_of(d.span().start),
                        d.get_ref()
                    )))
                }
            },
        };
        let location = raw.source.location.trim().to_string();
        if location.is_empty() {
            return Err(invalid(
                "`source.location` is empty: give the export's key, prefix or manifest, e.g. \"exports/users/\"".into(),
            ));
        }
        let (header, columns) = header_and_columns(&raw.source, &line_of).map_err(&invalid)?;
        let (max_rows_read, max_bytes_read) = read_caps(&raw.source, &line_of).map_err(&invalid)?;
        let read = ReadOptions {
            format: raw.source.format,
            compression: raw.source.compression,
            delimiter,
            escape: raw.source.escape,
            empty_as_null: raw.source.empty_as_null.unwrap_or(true),
            // Snowflake's and Hive's unloads write NULL as `\N` unless told otherwise.
            null_values: raw
                .source
                .null_values
                .unwrap_or_else(|| vec![DEFAULT_NULL.to_string()]),
            header,
            columns,
            max_rows_read,
            max_bytes_read,
            config_file: file.to_string(),
            ..ReadOptions::default()
        };

        let subdomain = validate_subdomain(raw.zendesk.subdomain.get_ref()).map_err(|hint| {
            invalid(format!(
                "line {}: `zendesk.subdomain` = {:?} {hint}",
                line_of(raw.zendesk.subdomain.span().start),
                raw.zendesk.subdomain.get_ref()
            ))
        })?;

        let object = raw.object;
        let mode = *raw.mode.get_ref();
        let mode_line = line_of(raw.mode.span().start);
        let primary_key = raw.primary_key.trim().to_string();
        let audience = match &raw.audience {
            None if mode.audience_only() => {
                return Err(invalid(format!(
                    "line {mode_line}: `mode` = \"{}\" is an audience mode: add an [audience] table naming the tag zdsync owns, e.g. `[audience]` then `tag = \"segment_vip\"` (object syncs use \"upsert\", \"insert\" or \"update\")",
                    mode.as_str()
                )))
            }
            None => None,
            Some(a) => {
                let line = line_of(a.span().start);
                if !matches!(mode, Mode::Add | Mode::Remove | Mode::Mirror | Mode::Upsert) {
                    return Err(invalid(format!(
                        "line {mode_line}: `mode` = \"{}\" is not an audience mode: with [audience] use \"add\", \"remove\", \"mirror\" or \"upsert\"",
                        mode.as_str()
                    )));
                }
                if object == Object::Tickets {
                    return Err(invalid(format!(
                        "line {line}: [audience] applies to users or organizations, not tickets: set `object = \"users\"` or `\"organizations\"`"
                    )));
                }
                let a = a.get_ref();
                let tag = validate_tag(a.tag.get_ref()).map_err(|hint| {
                    invalid(format!(
                        "line {}: `audience.tag` = {:?} {hint}",
                        line_of(a.tag.span().start),
                        a.tag.get_ref()
                    ))
                })?;
                let email_column = match &a.email_column {
                    Some(c) if object != Object::Users => {
                        return Err(invalid(format!(
                            "line {line}: `audience.email_column` = {c:?}: only users are matched by email; remove it for {object}"
                        )))
                    }
                    Some(c) if c.trim().is_empty() => {
                        return Err(invalid(format!(
                            "line {line}: `audience.email_column` is empty: name the export column holding each member's email, or remove it"
                        )))
                    }
                    Some(c) => Some(c.trim().to_string()),
                    None => None,
                };
                Some(Audience {
                    tag,
                    email_column,
                    tag_writes: a.tag_writes,
                    allow_empty_export: a.allow_empty_export,
                })
            }
        };
        let mut mapping = Vec::new();
        if let Some(raw_mapping) = &raw.mapping {
            for (key, value) in &raw_mapping.get_ref().0 {
                let line = line_of(value.span().start);
                if key == "external_id" {
                    return Err(invalid(format!(
                        "line {line}: `mapping.external_id` is set by zdsync from `primary_key` (\"{primary_key}\"); remove it"
                    )));
                }
                if audience.is_some() && key == "tags" {
                    return Err(invalid(format!(
                        "line {line}: `mapping.tags` would replace every tag of the record, while an audience sync only adds and removes its own tag (`audience.tag`); remove `tags` from [mapping]"
                    )));
                }
                let mut m = parse_mapping(object, key, value.get_ref(), line).map_err(&invalid)?;
                // A warehouse column granting Zendesk admin rights needs saying so.
                if object == Object::Users && m.field == "role" && !raw.allow_admin_role {
                    m.ty = FieldType::Choice(NON_ADMIN_ROLES);
                }
                mapping.push(m);
            }
        }
        let mapping_line = raw
            .mapping
            .as_ref()
            .map_or(text.lines().count(), |m| line_of(m.span().start));
        if audience.is_some() && mode != Mode::Upsert && !mapping.is_empty() {
            return Err(invalid(format!(
                "line {mapping_line}: [mapping] only applies to audience syncs in mode \"upsert\" (mode \"{}\" only adds or removes the tag): remove [mapping] or set `mode = \"upsert\"`",
                mode.as_str()
            )));
        }
        let creates = match (&audience, mode) {
            (Some(_), m) => m == Mode::Upsert,
            (None, m) => m != Mode::Update,
        };
        if creates {
            let missing: Vec<_> = object
                .required_fields()
                .iter()
                .filter(|r| !mapping.iter().any(|m| m.field == **r))
                .collect();
            if !missing.is_empty() {
                return Err(invalid(format!(
                    "line {}: {object} need {} mapped to create records; add {} under [mapping]",
                    mapping_line,
                    object
                        .required_fields()
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(" and "),
                    missing
                        .iter()
                        .map(|r| format!("`{r} = \"<column>\"`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }

        Ok(SyncConfig {
            name,
            object,
            mode,
            primary_key,
            chunk_rows,
            max_rows_per_run,
            nulls: raw.nulls,
            source: Source { location, read },
            zendesk: Zendesk {
                subdomain,
                credentials: raw.zendesk.credentials,
                base_url: raw.zendesk.base_url,
                rate_limit_rpm: raw.zendesk.rate_limit_rpm,
                max_jobs_in_flight: raw.zendesk.max_jobs_in_flight,
            },
            mapping,
            audience,
        })
    }

    /// A config stored as `config/<sync>.toml` must name that sync: every step of a run loads
    /// the config by the sync's name, so a file naming another sync would be another file's run.
    pub fn check_stored_as(&self, sync: &str, file: &str) -> Result<(), ConfigError> {
        if self.name == sync {
            return Ok(());
        }
        Err(ConfigError::Invalid {
            file: file.to_string(),
            message: format!(
                "`name` = {:?}, but the file is the config of sync `{sync}`: a sync's name must equal its file name (config/<name>.toml); rename the file to config/{}.toml or set name = {sync:?}",
                self.name, self.name
            ),
        })
    }

    /// The request budget a minute the sync's writes are paced to.
    pub fn rate_limit_rpm(&self) -> u32 {
        self.zendesk
            .rate_limit_rpm
            .unwrap_or(crate::zendesk::client::DEFAULT_RPM)
    }

    /// Whether this is an audience sync (an `[audience]` table).
    pub fn is_audience(&self) -> bool {
        self.audience.is_some()
    }

    /// The export columns to read: the primary key first, then each mapped column once.
    pub fn columns(&self) -> Vec<String> {
        let mut cols = vec![self.primary_key.clone()];
        for m in &self.mapping {
            if !cols.iter().any(|c| c.eq_ignore_ascii_case(&m.column)) {
                cols.push(m.column.clone());
            }
        }
        if let Some(c) = self.audience.as_ref().and_then(|a| a.email_column.as_ref()) {
            if !cols.iter().any(|x| x.eq_ignore_ascii_case(c)) {
                cols.push(c.clone());
            }
        }
        cols
    }
}

/// `source.header` and `source.columns`: the columns of a CSV export without a header line.
/// `columns` only goes with `header = false`; `header = false` alone is fine here, and the run
/// then needs a `MANIFEST VERBOSE` manifest (checked when the export is resolved).
fn header_and_columns(
    source: &RawSource,
    line_of: &dyn Fn(usize) -> usize,
) -> Result<(bool, Vec<String>), String> {
    let header = source.header.as_ref().is_none_or(|h| *h.get_ref());
    if !header && matches!(source.format, Format::Jsonl | Format::Parquet) {
        let h = source.header.as_ref().expect("set when false");
        return Err(format!(
            "line {}: `source.header = false` applies to CSV files only (JSON Lines and Parquet name their columns themselves); remove it",
            line_of(h.span().start)
        ));
    }
    let Some(raw) = &source.columns else {
        return Ok((header, Vec::new()));
    };
    let line = line_of(raw.span().start);
    if header {
        return Err(format!(
            "line {line}: `source.columns` names the columns of files without a header line: add `header = false` under [source] if the files have none, or remove `columns` to read the names from each file's first line"
        ));
    }
    if raw.get_ref().is_empty() {
        return Err(format!(
            "line {line}: `source.columns` is empty: list the files' columns in order, e.g. `columns = [\"id\", \"email\"]`, or remove it to use the schema of a `MANIFEST VERBOSE` manifest"
        ));
    }
    let mut columns: Vec<String> = Vec::with_capacity(raw.get_ref().len());
    for (i, c) in raw.get_ref().iter().enumerate() {
        let c = c.trim();
        if c.is_empty() {
            return Err(format!(
                "line {line}: `source.columns` entry {} is empty: every column needs a name (name a column you do not map anything, e.g. \"unused_{}\")",
                i + 1,
                i + 1
            ));
        }
        let lower = c.to_lowercase();
        if let Some(first) = columns.iter().position(|o| o.to_lowercase() == lower) {
            return Err(format!(
                "line {line}: `source.columns` names `{c}` twice (entries {} and {}; names match case-insensitively): give each column a unique name",
                first + 1,
                i + 1
            ));
        }
        columns.push(c.to_string());
    }
    Ok((false, columns))
}

/// `source.max_rows_read` and `source.max_bytes_read`: what one run reads from its export at
/// most (rows, decompressed bytes), past which it stops before any write. Rows stay below
/// `u32::MAX` (the planner numbers them in 32 bits); bytes are a number or a size text
/// (`"64GiB"`, `"500MB"`).
fn read_caps(source: &RawSource, line_of: &dyn Fn(usize) -> usize) -> Result<(u64, u64), String> {
    let rows = match &source.max_rows_read {
        None => export::DEFAULT_MAX_ROWS_READ,
        Some(s) => {
            let (n, line) = (*s.get_ref(), line_of(s.span().start));
            let Some(n) = u64::try_from(n).ok().filter(|n| *n > 0) else {
                return Err(format!(
                    "line {line}: `source.max_rows_read` = {n} must be at least 1 (leave it out for the default of {})",
                    export::DEFAULT_MAX_ROWS_READ
                ));
            };
            if n > export::MAX_ROWS_READ_LIMIT {
                return Err(format!(
                    "line {line}: `source.max_rows_read` = {n} must be at most {} (a run numbers the rows it reads in 32 bits); split a larger export across syncs",
                    export::MAX_ROWS_READ_LIMIT
                ));
            }
            n
        }
    };
    let bytes = match &source.max_bytes_read {
        None => export::DEFAULT_MAX_BYTES_READ,
        Some(s) => {
            let line = line_of(s.span().start);
            let parsed = match s.get_ref() {
                toml::Value::Integer(n) => u64::try_from(*n).ok(),
                toml::Value::String(t) => export::parse_size(t),
                _ => None,
            };
            match parsed {
                Some(0) => {
                    return Err(format!(
                        "line {line}: `source.max_bytes_read` = {} must be at least 1 byte (leave it out for the default of \"256GiB\")",
                        s.get_ref()
                    ))
                }
                Some(n) => n,
                None => {
                    return Err(format!(
                        "line {line}: `source.max_bytes_read` = {} must be a number of bytes (e.g. 68719476736) or a size such as \"64GiB\" or \"500MB\" (units B, KB, MB, GB, TB in 1000s; KiB, MiB, GiB, TiB in 1024s)",
                        s.get_ref()
                    ))
                }
            }
        }
    };
    Ok((rows, bytes))
}

/// Accepts `mycompany`; explains what to enter for `https://mycompany.zendesk.com`.
pub fn validate_subdomain(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    let bare = s
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if let Some(sub) = bare.strip_suffix(".zendesk.com") {
        return Err(format!(
            "must be the subdomain only: for https://{sub}.zendesk.com enter \"{sub}\""
        ));
    }
    if s.is_empty()
        || !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || s.starts_with('-')
    {
        return Err("must be your Zendesk subdomain (lower-case letters, digits and `-`): for https://mycompany.zendesk.com enter \"mycompany\"".into());
    }
    Ok(s.to_string())
}

/// Zendesk tags are lower case without spaces; a tag that breaks the rules would be rewritten
/// by Zendesk and never match again.
fn validate_tag(raw: &str) -> Result<String, String> {
    let t = raw.trim();
    if t.is_empty() {
        return Err("is empty: name the tag zdsync owns, e.g. \"segment_vip\"".into());
    }
    if t.chars().any(char::is_whitespace) || t.contains(',') {
        return Err(format!(
            "must be one tag without spaces or commas, e.g. \"{}\"",
            t.to_lowercase()
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("_")
        ));
    }
    if t.chars().any(char::is_uppercase) {
        return Err(format!(
            "must be lower case (Zendesk stores tags in lower case): use \"{}\"",
            t.to_lowercase()
        ));
    }
    Ok(t.to_string())
}

fn parse_mapping(
    object: Object,
    key: &str,
    value: &toml::Value,
    line: usize,
) -> Result<FieldMapping, String> {
    let (column, ty_name, split, format) = match value {
        toml::Value::String(c) => (c.clone(), None, None, None),
        toml::Value::Table(t) => {
            let mut column = None;
            let mut ty = None;
            let mut split = None;
            let mut format = None;
            for (k, v) in t {
                match (k.as_str(), v) {
                    ("column", toml::Value::String(s)) => column = Some(s.clone()),
                    ("type", toml::Value::String(s)) => ty = Some(s.clone()),
                    ("split", toml::Value::String(s)) => split = Some(s.clone()),
                    ("format", toml::Value::String(s)) => format = Some(s.clone()),
                    ("column" | "type" | "split" | "format", _) => {
                        return Err(format!("line {line}: `mapping.{key}.{k}` must be a string"))
                    }
                    _ => {
                        return Err(format!(
                            "line {line}: unknown key `{k}` in `mapping.{key}` (expected `column`, `type`, `split` or `format`)"
                        ))
                    }
                }
            }
            let column = column.ok_or_else(|| {
                format!("line {line}: `mapping.{key}` needs `column = \"<export column>\"`")
            })?;
            (column, ty, split, format)
        }
        _ => {
            return Err(format!(
                "line {line}: `mapping.{key}` must be a column name (\"col\") or a table {{ column = \"col\", type = \"...\" }}"
            ))
        }
    };
    if column.trim().is_empty() {
        return Err(format!(
            "line {line}: `mapping.{key}` names an empty column"
        ));
    }
    let split = match split.as_deref() {
        None => Split::default(),
        Some("comma") => Split::Comma,
        Some("space") => Split::Space,
        Some("comma_or_space") => Split::CommaOrSpace,
        Some(other) => {
            return Err(format!(
                "line {line}: `mapping.{key}.split` = {other:?} must be \"comma\", \"space\" or \"comma_or_space\""
            ))
        }
    };
    // `mapping.due_at.format`, `mapping."user_fields.signup".format`: as the key is written.
    let format_key = || {
        if key.contains('.') {
            format!("mapping.\"{key}\".format")
        } else {
            format!("mapping.{key}.format")
        }
    };
    let format = match format.as_deref() {
        None => None,
        Some("epoch_seconds") => Some(TimeFormat::EpochSeconds),
        Some("epoch_millis") => Some(TimeFormat::EpochMillis),
        Some(other) => {
            return Err(format!(
                "line {line}: `{}` = {other:?} must be \"epoch_seconds\" or \"epoch_millis\"",
                format_key()
            ))
        }
    };

    let prefix = object.custom_prefix();
    let (target, ty) = if let Some(rest) =
        key.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
    {
        let ty = match ty_name.as_deref() {
            None => FieldType::Text,
            Some(t) => FieldType::parse_custom(t).ok_or_else(|| {
                format!(
                    "line {line}: `mapping.\"{key}\".type` = {t:?} is not a Zendesk field type ({})",
                    FieldType::CUSTOM_NAMES
                )
            })?,
        };
        let target = match object {
            Object::Tickets => Target::TicketField(rest.parse::<u64>().map_err(|_| {
                format!(
                    "line {line}: `mapping.\"{key}\"`: ticket custom fields are keyed by their numeric id, e.g. \"custom_fields.360001234567\""
                )
            })?),
            _ => {
                if rest.is_empty()
                    || !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || rest.chars().all(|c| c.is_ascii_digit())
                {
                    return Err(format!(
                        "line {line}: `mapping.\"{key}\"`: {prefix} are keyed by the field key (letters, digits, `_`), e.g. \"{prefix}.plan_tier\""
                    ));
                }
                Target::FieldKey(rest.to_string())
            }
        };
        (target, ty)
    } else if let Some(std) = fields::standard_field(object, key) {
        if let Some(t) = ty_name {
            return Err(format!(
                "line {line}: `mapping.{key}.type` = {t:?}: `{key}` is a standard {object} field with a fixed type ({}); remove `type`",
                std.ty.name()
            ));
        }
        (Target::Standard(std), std.ty)
    } else {
        let known: Vec<_> = fields::standard_fields(object)
            .iter()
            .map(|f| f.key)
            .collect();
        let other_prefix = [Object::Users, Object::Organizations, Object::Tickets]
            .into_iter()
            .find(|o| *o != object && key.starts_with(o.custom_prefix()));
        let hint = match other_prefix {
            Some(o) => format!(
                "custom fields of {object} are written `{prefix}.<key>`, not `{}.…` (that is for {o})",
                o.custom_prefix()
            ),
            None => format!(
                "{object} fields are: {}, or `{prefix}.<key>` for a custom field",
                known.join(", ")
            ),
        };
        return Err(format!(
            "line {line}: `mapping.{key}`: {object} have no field `{key}`; {hint}"
        ));
    };
    if split != Split::default() && !ty.is_list() {
        return Err(format!(
            "line {line}: `mapping.{key}.split` only applies to tags, lists and multiselect fields"
        ));
    }
    if let Some(f) = format {
        if !matches!(ty, FieldType::Date | FieldType::Datetime) {
            let standard: Vec<_> = fields::standard_fields(object)
                .iter()
                .filter(|s| matches!(s.ty, FieldType::Date | FieldType::Datetime))
                .map(|s| format!("`{}`, ", s.key))
                .collect();
            return Err(format!(
                "line {line}: `{}` = \"{}\" only applies to date and date-time fields ({}custom fields with `type = \"date\"`); `{key}` is of type {}: remove `format`",
                format_key(),
                f.as_str(),
                standard.concat(),
                ty.name()
            ));
        }
    }
    Ok(FieldMapping {
        field: key.to_string(),
        column: column.trim().to_string(),
        target,
        ty,
        split,
        format,
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_sends_the_credential_to_its_own_zendesk_only() {
        let z = |base: Option<&str>, creds: &str| Zendesk {
            subdomain: "acme".into(),
            credentials: creds.into(),
            base_url: base.map(str::to_string),
            rate_limit_rpm: None,
            max_jobs_in_flight: None,
        };
        let deployed = EndpointPolicy::deployed(None);
        let cli = EndpointPolicy::default();
        let ok = |z: &Zendesk, p: &EndpointPolicy| z.check_endpoint(p, "c.toml").is_ok();
        assert!(ok(&z(None, "env"), &deployed));
        assert!(ok(&z(Some("https://acme.zendesk.com/"), "env"), &deployed));
        for bad in [
            "https://attacker.example",
            "https://acme.zendesk.com.attacker.example",
            "http://acme.zendesk.com",
            "http://127.0.0.1:8089",
        ] {
            let e = z(Some(bad), "env")
                .check_endpoint(&deployed, "c.toml")
                .unwrap_err();
            assert!(e.to_string().contains("base_url"), "{bad}: {e}");
        }
        assert!(
            !ok(&z(None, "file:creds.json"), &deployed),
            "no file credentials deployed"
        );
        let proxied = EndpointPolicy::deployed(Some("https://zd-proxy.internal/".into()));
        assert!(ok(&z(Some("https://zd-proxy.internal"), "env"), &proxied));
        // The CLI: any https, plain http only to this machine, nothing odd in the URL.
        assert!(ok(&z(Some("http://127.0.0.1:8089"), "file:c.json"), &cli));
        assert!(ok(&z(Some("https://zd-proxy.internal"), "env"), &cli));
        for bad in [
            "http://10.0.0.5:8089",
            "ftp://acme.zendesk.com",
            "https://user:pw@acme.zendesk.com",
            "https://acme.zendesk.com?x=1",
            "not a url",
        ] {
            assert!(!ok(&z(Some(bad), "env"), &cli), "{bad}");
        }
    }

    const GOOD: &str = r#"
name = "crm_users"
object = "users"
mode = "upsert"
primary_key = "user_id"

[source]
location = "exports/crm_users/"
delimiter = "|"
escape = "backslash"

[zendesk]
subdomain = "mycompany"

[mapping]
name = "full_name"
email = "EMAIL"
tags = { column = "segments", split = "comma" }
"user_fields.plan" = { column = "plan", type = "dropdown" }
"#;

    fn err(text: &str) -> String {
        SyncConfig::parse(text, "sync.toml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_full_config() {
        let c = SyncConfig::parse(GOOD, "sync.toml").unwrap();
        assert_eq!(c.name, "crm_users");
        assert_eq!(c.object, Object::Users);
        assert_eq!(c.source.read.delimiter, b'|');
        assert_eq!(c.source.read.escape, Escape::Backslash);
        assert_eq!(c.mapping.len(), 4);
        let plan = c
            .mapping
            .iter()
            .find(|m| m.field == "user_fields.plan")
            .unwrap();
        assert_eq!(plan.target, Target::FieldKey("plan".into()));
        assert_eq!(plan.ty, FieldType::Dropdown);
        assert_eq!(plan.line, 19);
        assert_eq!(
            c.columns(),
            ["user_id", "full_name", "EMAIL", "segments", "plan"]
        );
    }

    #[test]
    fn read_caps_default_parse_and_refuse_with_their_line() {
        let c = SyncConfig::parse(GOOD, "sync.toml").unwrap();
        assert_eq!(c.source.read.max_rows_read, 500_000_000);
        assert_eq!(c.source.read.max_bytes_read, 256 * 1024 * 1024 * 1024);
        assert_eq!(c.source.read.config_file, "sync.toml");
        let with = |lines: &str| {
            GOOD.replace(
                "escape = \"backslash\"",
                &format!("escape = \"backslash\"\n{lines}"),
            )
        };
        let read = |lines: &str| {
            SyncConfig::parse(&with(lines), "c.toml")
                .unwrap()
                .source
                .read
        };
        let r = read("max_rows_read = 1000\nmax_bytes_read = 1048576");
        assert_eq!((r.max_rows_read, r.max_bytes_read), (1000, 1 << 20));
        let r = read("max_rows_read = 4294967294\nmax_bytes_read = \"64GiB\"");
        assert_eq!(
            (r.max_rows_read, r.max_bytes_read),
            (u32::MAX as u64 - 1, 64 << 30)
        );
        assert_eq!(
            read("max_bytes_read = \"500MB\"").max_bytes_read,
            500_000_000
        );
        assert_eq!(read("max_bytes_read = \"2 TiB\"").max_bytes_read, 2 << 40);

        // The caps sit on line 11, after `escape`.
        for (lines, says) in [
            ("max_rows_read = 0", "`source.max_rows_read` = 0 must be at least 1"),
            (
                "max_rows_read = 4294967295",
                "`source.max_rows_read` = 4294967295 must be at most 4294967294",
            ),
            (
                "max_rows_read = 10000000000",
                "`source.max_rows_read` = 10000000000 must be at most 4294967294",
            ),
            ("max_bytes_read = 0", "`source.max_bytes_read` = 0 must be at least 1 byte"),
            (
                "max_bytes_read = \"0GiB\"",
                "`source.max_bytes_read` = \"0GiB\" must be at least 1 byte",
            ),
            (
                "max_bytes_read = -5",
                "`source.max_bytes_read` = -5 must be a number of bytes",
            ),
            (
                "max_bytes_read = \"64 gigs\"",
                "`source.max_bytes_read` = \"64 gigs\" must be a number of bytes (e.g. 68719476736) or a size such as \"64GiB\"",
            ),
            ("max_bytes_read = 1.5", "must be a number of bytes"),
        ] {
            let e = err(&with(lines));
            assert!(e.contains("line 11: ") && e.contains(says), "{lines}: {e}");
        }
        let e = err(&with("max_rows_read = -1"));
        assert!(
            e.contains("line 11: `source.max_rows_read` = -1 must be at least 1"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = err(&GOOD.replace(
            "primary_key = \"user_id\"",
            "primary_key = \"user_id\"\nbatch = 5",
        ));
        assert!(
            e.contains("line 6") && e.contains("unknown field `batch`"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "escape = \"backslash\"",
            "escape = \"backslash\"\nquoting = 1",
        ));
        assert!(e.contains("line 11") && e.contains("`quoting`"), "{e}");
    }

    #[test]
    fn unknown_object_and_mode_are_refused_with_their_line() {
        let e = err(&GOOD.replace("object = \"users\"", "object = \"contacts\""));
        assert!(e.contains("line 3") && e.contains("contacts"), "{e}");
        let e = err(&GOOD.replace("mode = \"upsert\"", "mode = \"mirror\""));
        assert!(e.contains("line 4") && e.contains("mirror"), "{e}");
    }

    #[test]
    fn a_field_the_object_lacks_is_refused() {
        let e = err(&GOOD.replace(
            "name = \"full_name\"",
            "subject = \"full_name\"\nname = \"n\"",
        ));
        assert!(
            e.contains("line 16") && e.contains("no field `subject`"),
            "{e}"
        );
        let e = err(&GOOD.replace("\"user_fields.plan\"", "\"organization_fields.plan\""));
        assert!(
            e.contains("line 19") && e.contains("user_fields.<key>"),
            "{e}"
        );
        let tickets = GOOD
            .replace("object = \"users\"", "object = \"tickets\"")
            .replace(
                "name = \"full_name\"\nemail = \"EMAIL\"",
                "subject = \"s\"\ndescription = \"d\"",
            )
            .replace("\"user_fields.plan\"", "\"custom_fields.plan\"");
        let e = err(&tickets);
        assert!(e.contains("numeric id"), "{e}");
    }

    #[test]
    fn required_fields_and_subdomain_are_checked() {
        let e = err(&GOOD.replace("email = \"EMAIL\"\n", ""));
        assert!(e.contains("`email = \"<column>\"`"), "{e}");
        let e = err(&GOOD.replace(
            "subdomain = \"mycompany\"",
            "subdomain = \"https://acme.zendesk.com\"",
        ));
        assert!(e.contains("enter \"acme\""), "{e}");
        // Update mode does not create, so required create fields may be absent.
        let update = GOOD
            .replace("mode = \"upsert\"", "mode = \"update\"")
            .replace("email = \"EMAIL\"\n", "");
        assert!(SyncConfig::parse(&update, "x").is_ok());
    }

    #[test]
    fn bad_custom_type_and_explicit_external_id_are_refused() {
        let e = err(&GOOD.replace("type = \"dropdown\"", "type = \"float\""));
        assert!(
            e.contains("line 19") && e.contains("not a Zendesk field type"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "name = \"full_name\"",
            "name = \"full_name\"\nexternal_id = \"id\"",
        ));
        assert!(e.contains("primary_key"), "{e}");
    }

    #[test]
    fn epoch_format_is_only_for_date_fields_and_known_values() {
        let plan = "\"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }";
        let c = SyncConfig::parse(
            &GOOD.replace(
                plan,
                "\"user_fields.plan\" = { column = \"plan\", type = \"date\", format = \"epoch_millis\" }",
            ),
            "sync.toml",
        )
        .unwrap();
        let formats: Vec<_> = c.mapping.iter().map(|m| m.format).collect();
        assert_eq!(
            formats,
            [None, None, None, Some(TimeFormat::EpochMillis)],
            "only where the mapping says so"
        );
        let tickets = |due: &str| {
            GOOD.replace("object = \"users\"", "object = \"tickets\"")
                .replace(
                    "name = \"full_name\"\nemail = \"EMAIL\"",
                    &format!("subject = \"s\"\ndescription = \"d\"\n{due}"),
                )
                .replace("tags = { column = \"segments\", split = \"comma\" }\n", "")
                .replace(plan, "")
        };
        let c = SyncConfig::parse(
            &tickets("due_at = { column = \"DUE\", format = \"epoch_seconds\" }"),
            "sync.toml",
        )
        .unwrap();
        let due = c.mapping.iter().find(|m| m.field == "due_at").unwrap();
        assert_eq!(
            (due.ty, due.format),
            (FieldType::Datetime, Some(TimeFormat::EpochSeconds))
        );

        // Anywhere else: the line, the key and the fields it applies to.
        let e = err(&GOOD.replace(
            "type = \"dropdown\" }",
            "type = \"dropdown\", format = \"epoch_seconds\" }",
        ));
        assert!(
            e.contains("line 19")
                && e.contains("`mapping.\"user_fields.plan\".format` = \"epoch_seconds\"")
                && e.contains("only applies to date and date-time fields (custom fields with `type = \"date\"`)")
                && e.contains("`user_fields.plan` is of type dropdown"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "name = \"full_name\"",
            "name = { column = \"full_name\", format = \"epoch_millis\" }",
        ));
        assert!(
            e.contains("line 16") && e.contains("`mapping.name.format` = \"epoch_millis\""),
            "{e}"
        );
        let e = err(&tickets("due_at = \"DUE\"").replace(
            "subject = \"s\"",
            "subject = { column = \"s\", format = \"epoch_seconds\" }",
        ));
        assert!(
            e.contains("`mapping.subject.format`")
                && e.contains("(`due_at`, custom fields with `type = \"date\"`)")
                && e.contains("`subject` is of type text"),
            "{e}"
        );

        // Unknown values and non-strings.
        let e = err(&GOOD.replace(
            "type = \"dropdown\" }",
            "type = \"date\", format = \"epoch_micros\" }",
        ));
        assert!(
            e.contains("line 19")
                && e.contains("`mapping.\"user_fields.plan\".format` = \"epoch_micros\"")
                && e.contains("must be \"epoch_seconds\" or \"epoch_millis\""),
            "{e}"
        );
        let e = err(&GOOD.replace("type = \"dropdown\" }", "type = \"date\", format = 1000 }"));
        assert!(e.contains("must be a string"), "{e}");
    }
}
