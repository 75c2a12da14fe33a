//! Mapping and validation: an export record becomes a Zendesk-shaped payload, or a refusal with
//! a reason.
//!
//! Each mapped value is coerced to its field's type and encoded once, as a JSON fragment, into a
//! reused buffer. The fingerprint hashes those fragments (seeded with the mapping, so a mapping
//! change forces a full resend); the payload JSON is assembled from the same fragments only for
//! rows that are actually sent.

use crate::config::{FieldMapping, Nulls, Split, SyncConfig, Target, TimeFormat};
use crate::export::{Record, Value};
use crate::fields::{FieldType, Object};
use crate::schema::{FieldDef, Schema};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Bumped when the encoding of fragments changes, so old fingerprints never match new ones.
const FINGERPRINT_VERSION: u32 = 1;
/// Separates fields in the fingerprinted buffer; never produced by JSON encoding.
const FIELD_SEP: u8 = 0x1e;

/// Why a row was refused before sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    #[serde(rename = "malformed_record")]
    Malformed,
    MissingPrimaryKey,
    DuplicatePrimaryKey,
    MissingRequired,
    InvalidEmail,
    InvalidValue,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed_record",
            Reason::MissingPrimaryKey => "missing_primary_key",
            Reason::DuplicatePrimaryKey => "duplicate_primary_key",
            Reason::MissingRequired => "missing_required",
            Reason::InvalidEmail => "invalid_email",
            Reason::InvalidValue => "invalid_value",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub field: Option<String>,
    pub message: String,
}

/// One mapped row; reused from row to row.
#[derive(Debug, Default)]
pub struct MappedRow {
    /// The primary key as exported (trimmed).
    pub pk: String,
    /// Hash of the normalised key (case-folded where Zendesk matches case-insensitively).
    pub pk_hash: u64,
    pub fingerprint: u64,
    buf: Vec<u8>,
    /// Per compiled field: the fragment's byte range in `buf`, or `None` when omitted.
    frags: Vec<Option<(u32, u32)>>,
    pk_frag: (u32, u32),
    items: Vec<String>,
    scratch: String,
    date: [u8; 10],
}

struct Compiled {
    field: String,
    column_name: String,
    column: usize,
    target: Target,
    ty: FieldType,
    split: Split,
    /// Date / date-time cells written as epoch numbers.
    format: Option<TimeFormat>,
    required: bool,
    create_only: bool,
    /// Checks from Zendesk's field definition, when a schema was given.
    check: Option<Check>,
}

/// What Zendesk's definition of a field adds to the type coercion.
enum Check {
    /// Dropdown / tagger / multiselect: values must be one of the options.
    Options(OptionTable),
    /// Regexp field: values must match `regexp_for_validation`.
    Pattern {
        re: regex::Regex,
        pattern: String,
        field: String,
    },
}

/// Option lookups computed once per field: an option value as written, an option name as
/// written, then either of them case-insensitively (values win over names).
struct OptionTable {
    values: Vec<String>,
    exact: HashMap<String, u32>,
    folded: HashMap<String, u32>,
    /// `Zendesk field `plan` ("Plan")`, for messages.
    field: String,
    /// `Free (plan_free), Pro (plan_pro), …`, for messages.
    listing: String,
}

impl OptionTable {
    fn new(def: &FieldDef) -> OptionTable {
        let mut exact = HashMap::new();
        let mut folded = HashMap::new();
        let values: Vec<String> = def.options.iter().map(|o| o.value.clone()).collect();
        // Names first, values after: a value overrides a name that reads the same.
        for (i, o) in def.options.iter().enumerate() {
            exact.entry(o.name.trim().to_string()).or_insert(i as u32);
            folded
                .entry(o.name.trim().to_lowercase())
                .or_insert(i as u32);
        }
        for (i, o) in def.options.iter().enumerate() {
            exact.insert(o.value.clone(), i as u32);
            folded.insert(o.value.trim().to_lowercase(), i as u32);
        }
        const SHOWN: usize = 10;
        let mut listing = def
            .options
            .iter()
            .take(SHOWN)
            .map(|o| format!("{} ({})", o.name.trim(), o.value))
            .collect::<Vec<_>>()
            .join(", ");
        if def.options.len() > SHOWN {
            let _ = write!(listing, ", … ({} options in all)", def.options.len());
        }
        if listing.is_empty() {
            listing = "none: the field has no options".into();
        }
        OptionTable {
            values,
            exact,
            folded,
            field: zendesk_name(def),
            listing,
        }
    }

    /// The option value `input` (already trimmed) stands for; `scratch` is reused for the
    /// case-folded form so the hit path does not allocate.
    fn resolve<'a>(&'a self, input: &str, scratch: &mut String) -> Option<&'a str> {
        if let Some(i) = self.exact.get(input) {
            return Some(&self.values[*i as usize]);
        }
        scratch.clear();
        scratch.extend(input.chars().flat_map(char::to_lowercase));
        self.folded
            .get(scratch.as_str())
            .map(|i| &self.values[*i as usize][..])
    }
}

fn zendesk_name(def: &FieldDef) -> String {
    match &def.key {
        Some(k) => format!("Zendesk field `{k}` (\"{}\")", def.title),
        None => format!("Zendesk field {} (\"{}\")", def.id, def.title),
    }
}

fn compile_check(ty: FieldType, def: &FieldDef) -> Option<Check> {
    match ty {
        FieldType::Dropdown | FieldType::Multiselect if def.has_options() => {
            Some(Check::Options(OptionTable::new(def)))
        }
        FieldType::Text | FieldType::Textarea | FieldType::Regexp if def.ty == "regexp" => {
            let pattern = def.regexp.as_deref()?;
            match regex::Regex::new(pattern) {
                Ok(re) => Some(Check::Pattern {
                    re,
                    pattern: pattern.to_string(),
                    field: zendesk_name(def),
                }),
                Err(e) => {
                    tracing::warn!(
                        field = %def.label(),
                        pattern,
                        error = %e,
                        "regexp_for_validation does not compile here; values are sent unchecked"
                    );
                    None
                }
            }
        }
        _ => None,
    }
}

/// Payload layout computed once: which fragments go under which JSON keys.
enum Group {
    /// `"key": <fragment>`
    Field { key: String, field: usize },
    /// `"outer": {"inner": <fragment>, ...}`
    Object {
        key: String,
        members: Vec<(String, usize)>,
    },
    /// `"custom_fields": [{"id": N, "value": <fragment>}, ...]`
    TicketFields { members: Vec<(u64, usize)> },
}

/// Compiled mapping of one sync.
pub struct Mapper {
    object: Object,
    nulls: Nulls,
    fields: Vec<Compiled>,
    groups: Vec<Group>,
    seed: u64,
    columns: Vec<String>,
}

impl Mapper {
    pub fn new(config: &SyncConfig) -> Mapper {
        Self::with_schema(config, None)
    }

    /// With Zendesk's field definitions, dropdown and multiselect values are matched against
    /// the options (a label becomes its value) and regexp values against their pattern. Fields
    /// the schema lacks are mapped as without one (`Schema::validate` reports them).
    pub fn with_schema(config: &SyncConfig, schema: Option<&Schema>) -> Mapper {
        let columns = config.columns();
        let col_of = |name: &str| {
            columns
                .iter()
                .position(|c| c.eq_ignore_ascii_case(name))
                .expect("columns() lists every mapped column")
        };
        let creating = config.mode != crate::config::Mode::Update;
        let fields: Vec<Compiled> = config
            .mapping
            .iter()
            .map(|m: &FieldMapping| Compiled {
                field: m.field.clone(),
                column_name: m.column.clone(),
                column: col_of(&m.column),
                target: m.target.clone(),
                ty: m.ty,
                split: m.split,
                format: m.format,
                required: creating && config.object.required_fields().contains(&m.field.as_str()),
                create_only: matches!(m.target, Target::Standard(s) if s.create_only),
                check: schema
                    .and_then(|s| s.field_for(&m.target))
                    .and_then(|def| compile_check(m.ty, def)),
            })
            .collect();

        let mut groups: Vec<Group> = Vec::new();
        for (i, f) in fields.iter().enumerate() {
            match &f.target {
                Target::Standard(s) if s.path.len() == 1 => groups.push(Group::Field {
                    key: s.path[0].to_string(),
                    field: i,
                }),
                Target::Standard(s) => push_member(&mut groups, s.path[0], s.path[1], i),
                Target::FieldKey(k) => {
                    push_member(&mut groups, config.object.custom_prefix(), k, i)
                }
                Target::TicketField(id) => {
                    match groups
                        .iter_mut()
                        .find(|g| matches!(g, Group::TicketFields { .. }))
                    {
                        Some(Group::TicketFields { members }) => members.push((*id, i)),
                        _ => groups.push(Group::TicketFields {
                            members: vec![(*id, i)],
                        }),
                    }
                }
            }
        }

        // The seed covers everything that shapes the payload: a mapping change forces a resend.
        let mut desc = format!(
            "v{FINGERPRINT_VERSION}|{}|{:?}|{}",
            config.object,
            config.nulls,
            config.primary_key.to_ascii_lowercase()
        );
        for f in &fields {
            let _ = write!(
                desc,
                "|{}={}:{}:{:?}",
                f.field,
                f.column_name.to_ascii_lowercase(),
                f.ty.name(),
                f.split
            );
            // Only when set, so the hash of a mapping without `format` is what it always was.
            if let Some(format) = f.format {
                let _ = write!(desc, ":{}", format.as_str());
            }
        }
        Mapper {
            object: config.object,
            nulls: config.nulls,
            fields,
            groups,
            seed: xxh3_64(desc.as_bytes()),
            columns,
        }
    }

    /// The columns to read from the export, in the order `map` expects them.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Identifies the mapping; stored with the state so a changed mapping is visible.
    pub fn mapping_hash(&self) -> u64 {
        self.seed
    }

    /// Hash of a primary key as the state stores it.
    pub fn key_hash(&self, pk: &str) -> u64 {
        key_hash(self.object, pk)
    }

    /// Map, coerce and validate one record into `out`.
    pub fn map(&self, record: &Record, out: &mut MappedRow) -> Result<(), Refusal> {
        out.buf.clear();
        out.frags.clear();
        match record.values.first() {
            Some(Value::Text(t)) if !t.trim().is_empty() => {
                out.pk.clear();
                out.pk.push_str(t.trim());
            }
            Some(Value::List(_)) => {
                return Err(Refusal {
                    reason: Reason::MissingPrimaryKey,
                    field: None,
                    message: "the primary key is a list, not a single value".into(),
                })
            }
            _ => {
                return Err(Refusal {
                    reason: Reason::MissingPrimaryKey,
                    field: None,
                    message: "the primary key is empty".into(),
                })
            }
        }
        out.pk_hash = key_hash(self.object, &out.pk);
        json_str(&mut out.buf, &out.pk);
        out.pk_frag = (0, out.buf.len() as u32);
        out.buf.push(FIELD_SEP);

        for f in &self.fields {
            let value = &record.values[f.column];
            let start = out.buf.len() as u32;
            let present = coerce(f, value, self.nulls, out)?;
            let end = out.buf.len() as u32;
            out.frags.push(present.then_some((start, end)));
            out.buf.push(FIELD_SEP);
        }
        out.fingerprint = xxh3_64_with_seed(&out.buf, self.seed);
        Ok(())
    }

    /// Append the Zendesk payload of `row` as one JSON object. `create` includes create-only
    /// fields (a ticket's first comment); updates leave them out.
    pub fn write_payload(&self, row: &MappedRow, create: bool, out: &mut Vec<u8>) {
        let frag = |i: usize| -> Option<&[u8]> {
            if !create && self.fields[i].create_only {
                return None;
            }
            row.frags[i].map(|(s, e)| &row.buf[s as usize..e as usize])
        };
        out.extend_from_slice(b"{\"external_id\":");
        out.extend_from_slice(&row.buf[row.pk_frag.0 as usize..row.pk_frag.1 as usize]);
        for g in &self.groups {
            match g {
                Group::Field { key, field } => {
                    if let Some(v) = frag(*field) {
                        out.push(b',');
                        json_str(out, key);
                        out.push(b':');
                        out.extend_from_slice(v);
                    }
                }
                Group::Object { key, members } => {
                    let mut first = true;
                    for (name, i) in members {
                        if let Some(v) = frag(*i) {
                            out.extend_from_slice(if first { b"," } else { b"" });
                            if first {
                                json_str(out, key);
                                out.extend_from_slice(b":{");
                            } else {
                                out.push(b',');
                            }
                            first = false;
                            json_str(out, name);
                            out.push(b':');
                            out.extend_from_slice(v);
                        }
                    }
                    if !first {
                        out.push(b'}');
                    }
                }
                Group::TicketFields { members } => {
                    let mut first = true;
                    for (id, i) in members {
                        if let Some(v) = frag(*i) {
                            out.extend_from_slice(if first {
                                b",\"custom_fields\":["
                            } else {
                                b","
                            });
                            first = false;
                            let _ = write!(VecWriter(out), "{{\"id\":{id},\"value\":");
                            out.extend_from_slice(v);
                            out.push(b'}');
                        }
                    }
                    if !first {
                        out.push(b']');
                    }
                }
            }
        }
        out.push(b'}');
    }
}

fn push_member(groups: &mut Vec<Group>, outer: &str, inner: &str, field: usize) {
    for g in groups.iter_mut() {
        if let Group::Object { key, members } = g {
            if key == outer {
                members.push((inner.to_string(), field));
                return;
            }
        }
    }
    groups.push(Group::Object {
        key: outer.to_string(),
        members: vec![(inner.to_string(), field)],
    });
}

/// Hash of a primary key: case-folded for objects whose external ids Zendesk matches
/// case-insensitively.
pub fn key_hash(object: Object, pk: &str) -> u64 {
    if object.case_insensitive_keys() && pk.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80) {
        xxh3_64(pk.to_lowercase().as_bytes())
    } else {
        xxh3_64(pk.as_bytes())
    }
}

struct VecWriter<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for VecWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Fast path: nothing to escape.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
    }
}

fn shown(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{cut:?}…")
    }
}

fn refuse(f: &Compiled, reason: Reason, what: String) -> Refusal {
    Refusal {
        reason,
        field: Some(f.field.clone()),
        message: format!("field `{}` (column `{}`): {what}", f.field, f.column_name),
    }
}

fn not_an_option(f: &Compiled, table: &OptionTable, value: &str) -> Refusal {
    refuse(
        f,
        Reason::InvalidValue,
        format!(
            "{} is not an option of {} (Zendesk would drop it silently); options are: {}",
            shown(value),
            table.field,
            table.listing
        ),
    )
}

/// Coerce one value into its JSON fragment. `Ok(false)` means the field is left out.
fn coerce(f: &Compiled, value: &Value, nulls: Nulls, out: &mut MappedRow) -> Result<bool, Refusal> {
    let text = match value {
        Value::Null => None,
        Value::Text(t)
            if t.trim().is_empty() && !matches!(f.ty, FieldType::Text | FieldType::Textarea) =>
        {
            None
        }
        Value::Text(t) if t.is_empty() => None,
        Value::Text(t) => Some(t.as_str()),
        Value::List(items) => {
            if f.ty.is_list() {
                for (k, item) in items.iter().enumerate() {
                    if out.items.len() == k {
                        out.items.push(String::new());
                    }
                    out.items[k].clear();
                    out.items[k].push_str(item);
                }
                return encode_list(f, items.len(), out).map(|_| true);
            }
            return Err(refuse(
                f,
                Reason::InvalidValue,
                format!(
                    "expected one {} value, got a list of {}",
                    f.ty.name(),
                    items.len()
                ),
            ));
        }
    };
    let Some(text) = text else {
        if f.required {
            return Err(refuse(
                f,
                Reason::MissingRequired,
                "is required but empty".into(),
            ));
        }
        return match nulls {
            Nulls::Skip => Ok(false),
            Nulls::Clear if f.ty.is_list() => {
                out.buf.extend_from_slice(b"[]");
                Ok(true)
            }
            Nulls::Clear => {
                out.buf.extend_from_slice(b"null");
                Ok(true)
            }
        };
    };
    let buf = &mut out.buf;
    if let (Some(format), FieldType::Date | FieldType::Datetime) = (f.format, f.ty) {
        let t = text.trim();
        let utc = epoch_utc(t, format).map_err(|e| {
            let (unit, example) = match format {
                TimeFormat::EpochSeconds => ("seconds", "1710142200, optionally with up to 9 decimals"),
                TimeFormat::EpochMillis => ("milliseconds", "1710142200000"),
            };
            let what = match e {
                EpochError::NotANumber => format!(
                    "{} is not epoch {unit} (the mapping's format = \"{}\"): expected whole {unit} since 1970-01-01T00:00:00Z such as {example}",
                    shown(t),
                    format.as_str()
                ),
                EpochError::OutOfRange => format!(
                    "{} epoch {unit} is out of range (the mapping's format = \"{}\"): the instant must fall in the years 0000 to 9999 UTC",
                    shown(t),
                    format.as_str()
                ),
            };
            refuse(f, Reason::InvalidValue, what)
        })?;
        // A date field takes the UTC date of the instant.
        let len = if f.ty == FieldType::Date {
            10
        } else {
            utc.len()
        };
        buf.push(b'"');
        buf.extend_from_slice(&utc[..len]);
        buf.push(b'"');
        return Ok(true);
    }
    match f.ty {
        FieldType::Text | FieldType::Textarea | FieldType::Regexp => {
            if f.required && text.trim().is_empty() {
                return Err(refuse(
                    f,
                    Reason::MissingRequired,
                    "is required but blank".into(),
                ));
            }
            if let Some(Check::Pattern { re, pattern, field }) = &f.check {
                if !re.is_match(text) {
                    return Err(refuse(
                        f,
                        Reason::InvalidValue,
                        format!(
                            "{} does not match the pattern {pattern} of {field}",
                            shown(text)
                        ),
                    ));
                }
            }
            json_str(buf, text);
        }
        FieldType::Dropdown => match &f.check {
            Some(Check::Options(table)) => match table.resolve(text.trim(), &mut out.scratch) {
                Some(v) => json_str(buf, v),
                None => return Err(not_an_option(f, table, text.trim())),
            },
            _ => json_str(buf, text.trim()),
        },
        FieldType::Email => {
            let t = text.trim();
            if !is_email(t) {
                return Err(refuse(
                    f,
                    Reason::InvalidEmail,
                    format!("{} is not an email address", shown(t)),
                ));
            }
            if t.bytes().any(|b| b.is_ascii_uppercase()) {
                out.scratch.clear();
                out.scratch.push_str(t);
                out.scratch.make_ascii_lowercase();
                json_str(buf, &out.scratch);
            } else {
                json_str(buf, t);
            }
        }
        FieldType::Integer | FieldType::Lookup => match parse_integer(text.trim()) {
            Some(n) => {
                let _ = write!(VecWriter(buf), "{n}");
            }
            None => {
                return Err(refuse(
                    f,
                    Reason::InvalidValue,
                    format!("{} is not a whole number", shown(text)),
                ))
            }
        },
        FieldType::Decimal => match normalize_decimal(text.trim(), &mut out.scratch) {
            true => buf.extend_from_slice(out.scratch.as_bytes()),
            false => {
                return Err(refuse(
                    f,
                    Reason::InvalidValue,
                    format!("{} is not a decimal number", shown(text)),
                ))
            }
        },
        FieldType::Checkbox => match parse_bool(text.trim()) {
            Some(true) => buf.extend_from_slice(b"true"),
            Some(false) => buf.extend_from_slice(b"false"),
            None => {
                return Err(refuse(
                    f,
                    Reason::InvalidValue,
                    format!(
                        "{} is not a boolean (use true/false, 1/0 or yes/no)",
                        shown(text)
                    ),
                ))
            }
        },
        FieldType::Date => match date_into(text.trim(), &mut out.date) {
            Some(()) => {
                let d = out.date;
                buf.push(b'"');
                buf.extend_from_slice(&d);
                buf.push(b'"');
            }
            None => {
                return Err(refuse(
                    f,
                    Reason::InvalidValue,
                    format!(
                        "{} is not a date (expected YYYY-MM-DD, YYYY/MM/DD, or a date-time, whose date is taken as written)",
                        shown(text)
                    ),
                ))
            }
        },
        FieldType::Datetime => match datetime_utc(text.trim()) {
            Some(d) => {
                buf.push(b'"');
                buf.extend_from_slice(&d);
                buf.push(b'"');
            }
            None => {
                return Err(refuse(
                    f,
                    Reason::InvalidValue,
                    format!("{} is not a date-time; {DATETIME_FORMS}", shown(text)),
                ))
            }
        },
        FieldType::Choice(allowed) => {
            let t = text.trim().to_ascii_lowercase();
            let hit = allowed
                .iter()
                .find(|a| **a == t || **a == t.replace(['_', ' '], "-"));
            match hit {
                Some(a) => json_str(buf, a),
                None => {
                    let hint = if t == "admin" && *allowed == *crate::config::NON_ADMIN_ROLES {
                        " (this sync may not make admins: set `allow_admin_role = true` in its config to let it)"
                    } else {
                        ""
                    };
                    return Err(refuse(
                        f,
                        Reason::InvalidValue,
                        format!("{} is not one of {}{hint}", shown(text), allowed.join(", ")),
                    ));
                }
            }
        }
        FieldType::Tags | FieldType::List | FieldType::Multiselect => {
            let mut n = 0;
            let mut push = |item: &str| {
                if out.items.len() == n {
                    out.items.push(String::new());
                }
                out.items[n].clear();
                out.items[n].push_str(item);
                n += 1;
            };
            match f.split {
                Split::Comma => text.split(',').for_each(&mut push),
                Split::Space => text.split(char::is_whitespace).for_each(&mut push),
                Split::CommaOrSpace => text
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .for_each(&mut push),
            }
            encode_list(f, n, out)?;
        }
    }
    Ok(true)
}

/// Normalise the first `n` collected list items of a tags / list / multiselect field and
/// encode them. Item buffers are reused from row to row.
fn encode_list(f: &Compiled, n: usize, out: &mut MappedRow) -> Result<(), Refusal> {
    let items = &mut out.items[..n];
    for item in items.iter_mut() {
        let t = item.trim();
        let clean = match f.ty {
            // Zendesk tags are lower case and cannot hold spaces.
            FieldType::Tags => !t
                .bytes()
                .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace() || b >= 0x80),
            FieldType::List => !t.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80),
            _ => true,
        };
        if let Some(Check::Options(table)) = &f.check {
            if t.is_empty() {
                item.clear();
                continue;
            }
            match table.resolve(t, &mut out.scratch) {
                Some(v) => {
                    if v != item.as_str() {
                        item.clear();
                        item.push_str(v);
                    }
                }
                None => return Err(not_an_option(f, table, t)),
            }
            continue;
        }
        if clean {
            if t.len() != item.len() {
                *item = t.to_string();
            }
            continue;
        }
        let mut norm = t.to_lowercase();
        if f.ty == FieldType::Tags {
            norm = norm.split_whitespace().collect::<Vec<_>>().join("_");
        }
        *item = norm;
    }
    items.sort_unstable();
    let mut kept = 0;
    for k in 0..items.len() {
        if !items[k].is_empty() && (kept == 0 || items[k] != items[kept - 1]) {
            items.swap(kept, k);
            kept += 1;
        }
    }
    let items = &items[..kept];
    if f.ty == FieldType::List {
        if let Some(bad) = items
            .iter()
            .find(|d| d.contains(char::is_whitespace) || !d.contains('.'))
        {
            return Err(refuse(
                f,
                Reason::InvalidValue,
                format!("{} is not a domain name", shown(bad)),
            ));
        }
    }
    out.buf.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.buf.push(b',');
        }
        json_str(&mut out.buf, item);
    }
    out.buf.push(b']');
    Ok(())
}

/// A practical email shape check: one `@`, a non-empty local part, a dotted domain of
/// letters, digits and hyphens, no spaces.
pub fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    if local.is_empty() || local.len() > 64 || domain.len() > 253 || domain.contains('@') {
        return false;
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return false;
    }
    let special = |b: u8| {
        matches!(
            b,
            b'(' | b')' | b'<' | b'>' | b'[' | b']' | b'\\' | b',' | b';' | b':' | b'"'
        )
    };
    if local.is_ascii() && !local.bytes().all(|b| b.is_ascii_graphic() && !special(b)) {
        return false;
    }
    let mut labels = domain.split('.');
    domain.contains('.')
        && labels.all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && (l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || l.chars().all(|c| c.is_alphanumeric() || c == '-'))
        })
        && domain
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.len() >= 2 && !tld.chars().all(|c| c.is_ascii_digit()))
}

fn parse_integer(s: &str) -> Option<i64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Ok(n) = s.parse::<i64>() {
        return Some(n);
    }
    // Warehouses sometimes write whole numbers as `42.0` or `42.000`.
    let (int, frac) = s.split_once('.')?;
    if !frac.is_empty() && frac.bytes().all(|b| b == b'0') {
        return int.parse::<i64>().ok();
    }
    None
}

/// Exact decimal normalisation without a float round trip: strips a `+`, leading zeros and
/// trailing fractional zeros (`+0012.5000` → `12.5`).
fn normalize_decimal(s: &str, out: &mut String) -> bool {
    out.clear();
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let zero = int.is_empty() && frac.is_empty();
    if neg && !zero {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if let Some(e) = exp {
        if !zero {
            out.push('e');
            out.push_str(e);
        }
    }
    true
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" | "on" => Some(true),
        "false" | "f" | "0" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

/// `YYYY-MM-DD` (or `YYYY/MM/DD`), optionally followed by a time, which is dropped: the date is
/// taken as written, without converting time zones.
#[cfg(test)]
fn parse_date(s: &str) -> Option<String> {
    let mut out = [0u8; 10];
    date_into(s, &mut out)?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Validate a date and write it as `YYYY-MM-DD` without going through a formatter (this runs
/// for every row of every date column).
fn date_into(s: &str, out: &mut [u8; 10]) -> Option<()> {
    let b = s.as_bytes();
    if b.len() < 10 || !(b.len() == 10 || b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let sep = b[4];
    if !(sep == b'-' || sep == b'/') || b[7] != sep {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u32)
        })
    };
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    chrono::NaiveDate::from_ymd_opt(y as i32, m, d)?;
    // A timestamp gives its date as written, but only a whole, valid one: no guessing at
    // whatever follows the date.
    if b.len() > 10 && (sep != b'-' || datetime_utc(s).is_none()) {
        return None;
    }
    out.copy_from_slice(&b[..10]);
    out[4] = b'-';
    out[7] = b'-';
    Some(())
}

/// [`datetime_utc`] as a string, for tests.
#[cfg(test)]
pub(crate) fn parse_datetime(s: &str) -> Option<String> {
    datetime_utc(s).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// What a date-time refusal says is accepted.
const DATETIME_FORMS: &str = "accepted: 2024-05-01T12:00:00Z, 2024-05-01 12:00:00[.fff] with an offset (-0800, +05:30, +00) or UTC/Z, without a zone (taken as UTC), or a date 2024-05-01 (midnight UTC)";

/// Convert the date-time text every warehouse writes by default to `YYYY-MM-DDTHH:MM:SSZ` in
/// UTC, exactly, or refuse it:
///
/// `YYYY-MM-DD`, then `T` or one space, `HH:MM:SS`, optionally `.` and 1 to 9 digits of
/// fraction (truncated: Zendesk takes seconds), then optionally, right after or after one
/// space, a zone: `Z`, `UTC`, or an offset `±HH`, `±HHMM`, `±HH:MM` or `±HH:MM:SS` (under 24
/// hours). Without a zone the time is taken as UTC; a bare `YYYY-MM-DD` is midnight UTC.
/// Named zones (`PST`, `America/Los_Angeles`), bare numbers and anything else are refused.
///
/// A small hand parser rather than chrono's format strings, whose lenient `%z` once read
/// `23:30:00.000 -0800` as a naive time; and it runs per cell without allocating.
pub fn datetime_utc(s: &str) -> Option<[u8; 20]> {
    let b = s.as_bytes();
    let two = |i: usize| -> Option<u32> {
        match b.get(i..i + 2)? {
            [x @ b'0'..=b'9', y @ b'0'..=b'9'] => Some(((x - b'0') * 10 + (y - b'0')) as u32),
            _ => None,
        }
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = two(0)? * 100 + two(2)?;
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, two(5)?, two(8)?)?;
    // Seconds from the date's midnight to the instant in UTC.
    let mut secs = 0i64;
    if b.len() > 10 {
        if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 || b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (h, m, sec) = (two(11)?, two(14)?, two(17)?);
        if h > 23 || m > 59 || sec > 59 {
            return None;
        }
        let mut rest = &b[19..];
        if let [b'.', frac @ ..] = rest {
            let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
            if !(1..=9).contains(&n) {
                return None;
            }
            rest = &frac[n..];
        }
        if let [b' ', zone @ ..] = rest {
            if zone.is_empty() {
                return None;
            }
            rest = zone;
        }
        secs = i64::from(h * 3600 + m * 60 + sec) - zone_offset(rest)?;
    }
    // Offsets are under a day, so the date moves by at most one day.
    let date = match secs.div_euclid(86_400) {
        0 => date,
        1 => date.succ_opt()?,
        _ => date.pred_opt()?,
    };
    utc_text(date, secs.rem_euclid(86_400) as u32)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a UTC date and the seconds into it, for years 0000 to 9999.
fn utc_text(date: chrono::NaiveDate, secs: u32) -> Option<[u8; 20]> {
    use chrono::Datelike as _;
    let year = u32::try_from(date.year()).ok().filter(|&y| y <= 9999)?;
    let mut out = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, v: u32| {
        out[at] = b'0' + (v / 10) as u8;
        out[at + 1] = b'0' + (v % 10) as u8;
    };
    put(0, year / 100);
    put(2, year % 100);
    put(5, date.month());
    put(8, date.day());
    put(11, secs / 3600);
    put(14, secs / 60 % 60);
    put(17, secs % 60);
    Some(out)
}

/// Why an epoch cell was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochError {
    /// Not written as the format's number.
    NotANumber,
    /// A number, but not an instant in the years 0000 to 9999.
    OutOfRange,
}

/// Convert an epoch number (the mapping's `format`) to `YYYY-MM-DDTHH:MM:SSZ`, exactly:
///
/// an optional sign, then digits; for seconds optionally `.` and 1 to 9 digits of fraction.
/// A fraction is dropped towards the past, as date-time text drops its fraction (`-0.5` is
/// 1969-12-31T23:59:59Z); milliseconds likewise. Exponents, separators and anything else are
/// refused. Runs per cell without allocating.
fn epoch_utc(s: &str, format: TimeFormat) -> Result<[u8; 20], EpochError> {
    let b = s.as_bytes();
    let (neg, b) = match b {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, b),
    };
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let (int, rest) = b.split_at(n);
    let fraction = match (rest, format) {
        _ if int.is_empty() => return Err(EpochError::NotANumber),
        ([], _) => false,
        ([b'.', frac @ ..], TimeFormat::EpochSeconds)
            if (1..=9).contains(&frac.len()) && frac.iter().all(u8::is_ascii_digit) =>
        {
            frac.iter().any(|&c| c != b'0')
        }
        _ => return Err(EpochError::NotANumber),
    };
    let magnitude = int.iter().try_fold(0i64, |acc, &c| {
        acc.checked_mul(10)?.checked_add(i64::from(c - b'0'))
    });
    let magnitude = magnitude.ok_or(EpochError::OutOfRange)?;
    let value = if neg { -magnitude } else { magnitude };
    let secs = match format {
        TimeFormat::EpochSeconds => value - i64::from(neg && fraction),
        TimeFormat::EpochMillis => value.div_euclid(1000),
    };
    // Days from 0001-01-01 (chrono's day 1) to 1970-01-01.
    const UNIX_EPOCH_FROM_CE: i64 = 719_163;
    i32::try_from(secs.div_euclid(86_400) + UNIX_EPOCH_FROM_CE)
        .ok()
        .and_then(chrono::NaiveDate::from_num_days_from_ce_opt)
        .and_then(|date| utc_text(date, secs.rem_euclid(86_400) as u32))
        .ok_or(EpochError::OutOfRange)
}

/// The UTC offset in seconds of a zone suffix: none, `Z`, `UTC`, `±HH`, `±HHMM`, `±HH:MM` or
/// `±HH:MM:SS`.
fn zone_offset(z: &[u8]) -> Option<i64> {
    let (sign, d) = match z {
        [] | [b'Z' | b'z'] => return Some(0),
        _ if z.eq_ignore_ascii_case(b"UTC") => return Some(0),
        [b'+', d @ ..] => (1, d),
        [b'-', d @ ..] => (-1, d),
        _ => return None,
    };
    let two = |i: usize| -> Option<i64> {
        match d.get(i..i + 2)? {
            [x @ b'0'..=b'9', y @ b'0'..=b'9'] => Some(((x - b'0') * 10 + (y - b'0')) as i64),
            _ => None,
        }
    };
    let (h, m, s) = match d {
        [_, _] => (two(0)?, 0, 0),
        [_, _, _, _] => (two(0)?, two(2)?, 0),
        [_, _, b':', _, _] => (two(0)?, two(3)?, 0),
        [_, _, b':', _, _, b':', _, _] => (two(0)?, two(3)?, two(6)?),
        _ => return None,
    };
    if h > 23 || m > 59 || s > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60 + s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(object: &str, mapping: &str) -> SyncConfig {
        let text = format!(
            "name = \"t\"\nobject = \"{object}\"\nmode = \"upsert\"\nprimary_key = \"id\"\n[source]\nlocation = \"x\"\n[zendesk]\nsubdomain = \"acme\"\n[mapping]\n{mapping}"
        );
        SyncConfig::parse(&text, "t.toml").unwrap()
    }

    fn record(values: &[Option<&str>]) -> Record {
        Record {
            values: values
                .iter()
                .map(|v| v.map_or(Value::Null, |s| Value::Text(s.to_string())))
                .collect(),
            line: 2,
        }
    }

    fn payload(m: &Mapper, row: &MappedRow, create: bool) -> serde_json::Value {
        let mut out = Vec::new();
        m.write_payload(row, create, &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    const USERS: &str = "name = \"name\"\nemail = \"email\"\nverified = \"ok\"\n\"user_fields.since\" = { column = \"since\", type = \"date\" }\n\"user_fields.ltv\" = { column = \"ltv\", type = \"decimal\" }\ntags = \"tags\"\n";

    #[test]
    fn users_map_to_zendesk_shape_with_coerced_values() {
        let m = Mapper::new(&config("users", USERS));
        assert_eq!(
            m.columns(),
            ["id", "name", "email", "ok", "since", "ltv", "tags"]
        );
        let mut row = MappedRow::default();
        m.map(
            &record(&[
                Some(" U1 "),
                Some("Ada"),
                Some("Ada@Example.COM"),
                Some("yes"),
                Some("2024-03-01T10:00:00Z"),
                Some("0012.50"),
                Some("VIP, gold  vip"),
            ]),
            &mut row,
        )
        .unwrap();
        assert_eq!(row.pk, "U1");
        assert_eq!(row.pk_hash, key_hash(Object::Users, "u1"));
        assert_eq!(
            payload(&m, &row, true),
            serde_json::json!({"external_id":"U1","name":"Ada","email":"ada@example.com","verified":true,
                "user_fields":{"since":"2024-03-01","ltv":12.5},"tags":["gold","vip"]})
        );
    }

    #[test]
    fn validation_reasons_name_the_field() {
        let m = Mapper::new(&config("users", USERS));
        let mut row = MappedRow::default();
        let cases = [
            (
                record(&[None, Some("A"), Some("a@b.co"), None, None, None, None]),
                Reason::MissingPrimaryKey,
                None,
            ),
            (
                record(&[Some("1"), None, Some("a@b.co"), None, None, None, None]),
                Reason::MissingRequired,
                Some("name"),
            ),
            (
                record(&[Some("1"), Some("A"), Some("a@b"), None, None, None, None]),
                Reason::InvalidEmail,
                Some("email"),
            ),
            (
                record(&[
                    Some("1"),
                    Some("A"),
                    Some("a b@c.com"),
                    None,
                    None,
                    None,
                    None,
                ]),
                Reason::InvalidEmail,
                Some("email"),
            ),
            (
                record(&[
                    Some("1"),
                    Some("A"),
                    Some("a@b.co"),
                    Some("maybe"),
                    None,
                    None,
                    None,
                ]),
                Reason::InvalidValue,
                Some("verified"),
            ),
            (
                record(&[
                    Some("1"),
                    Some("A"),
                    Some("a@b.co"),
                    None,
                    Some("03/01/2024"),
                    None,
                    None,
                ]),
                Reason::InvalidValue,
                Some("user_fields.since"),
            ),
            (
                record(&[
                    Some("1"),
                    Some("A"),
                    Some("a@b.co"),
                    None,
                    Some("2024-02-30"),
                    None,
                    None,
                ]),
                Reason::InvalidValue,
                Some("user_fields.since"),
            ),
            (
                record(&[
                    Some("1"),
                    Some("A"),
                    Some("a@b.co"),
                    None,
                    None,
                    Some("12,5"),
                    None,
                ]),
                Reason::InvalidValue,
                Some("user_fields.ltv"),
            ),
        ];
        for (rec, reason, field) in cases {
            let e = m.map(&rec, &mut row).unwrap_err();
            assert_eq!((e.reason, e.field.as_deref()), (reason, field), "{e:?}");
            if let Some(f) = field {
                assert!(e.message.contains(&format!("`{f}`")), "{}", e.message);
            }
        }
    }

    #[test]
    fn booleans_decimals_and_dates_coerce_exactly() {
        for (t, b) in [
            ("true", true),
            ("FALSE", false),
            ("1", true),
            ("0", false),
            ("Yes", true),
            ("no", false),
        ] {
            assert_eq!(parse_bool(t), Some(b));
        }
        let mut s = String::new();
        for (input, want) in [
            ("12.50", "12.5"),
            ("-0.0", "0"),
            ("+001", "1"),
            (
                "123456789012345678901234.000001",
                "123456789012345678901234.000001",
            ),
            (".5", "0.5"),
            ("1e3", "1e3"),
        ] {
            assert!(normalize_decimal(input, &mut s), "{input}");
            assert_eq!(s, want);
        }
        for bad in ["", "1.2.3", "abc", "1e", "--1"] {
            assert!(!normalize_decimal(bad, &mut s), "{bad}");
        }
        assert_eq!(parse_date("2024/03/01").as_deref(), Some("2024-03-01"));
        assert_eq!(
            parse_date("2024-03-01 23:59:59").as_deref(),
            Some("2024-03-01")
        );
        // A Snowflake TIMESTAMP_TZ gives its local date; text that is no timestamp is refused.
        assert_eq!(
            parse_date("2024-03-10 23:30:00.000 -0800").as_deref(),
            Some("2024-03-10")
        );
        for bad in [
            "2024-03-01 garbage",
            "2024-03-01 25:00:00",
            "2024/03/01 10:00:00",
            "2024-03-01x",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        assert_eq!(
            parse_datetime("2024-03-01T10:00:00+02:00").as_deref(),
            Some("2024-03-01T08:00:00Z")
        );
        assert_eq!(
            parse_datetime("2024-03-01").as_deref(),
            Some("2024-03-01T00:00:00Z")
        );
        assert_eq!(parse_integer("42.000"), Some(42));
        assert_eq!(parse_integer("42.5"), None);
    }

    /// Every warehouse's default timestamp text, converted exactly to UTC (None: refused).
    const CASES: &[(&str, Option<&str>)] = &[
        // Snowflake TIMESTAMP_TZ / LTZ default output, with and without fractions.
        (
            "2024-03-10 23:30:00.000 -0800",
            Some("2024-03-11T07:30:00Z"),
        ),
        ("2024-03-10 23:30:00 -0800", Some("2024-03-11T07:30:00Z")),
        ("2024-03-10 23:30:00 +0530", Some("2024-03-10T18:00:00Z")),
        (
            "2024-03-10 23:30:00.000 +0530",
            Some("2024-03-10T18:00:00Z"),
        ),
        ("2024-03-10 23:30:00 +05:30", Some("2024-03-10T18:00:00Z")),
        ("2024-03-10 23:30:00+0530", Some("2024-03-10T18:00:00Z")),
        ("2024-03-10 23:30:00-08:00", Some("2024-03-11T07:30:00Z")),
        ("2024-03-10 23:30:00Z", Some("2024-03-10T23:30:00Z")),
        (
            "2024-03-10 23:30:00.123456789 -0800",
            Some("2024-03-11T07:30:00Z"),
        ),
        (
            "2024-03-10T23:30:00.000 -0800",
            Some("2024-03-11T07:30:00Z"),
        ),
        ("2024-03-10T23:30:00-0800", Some("2024-03-11T07:30:00Z")),
        // Snowflake TIMESTAMP_NTZ: no zone, taken as UTC.
        ("2024-03-10 23:30:00.000", Some("2024-03-10T23:30:00Z")),
        ("2024-03-10 23:30:00", Some("2024-03-10T23:30:00Z")),
        // BigQuery.
        ("2024-03-10 23:30:00 UTC", Some("2024-03-10T23:30:00Z")),
        (
            "2024-03-10 23:30:00.123456 UTC",
            Some("2024-03-10T23:30:00Z"),
        ),
        ("2024-03-10 23:30:00+00", Some("2024-03-10T23:30:00Z")),
        ("2024-03-10T23:30:00Z", Some("2024-03-10T23:30:00Z")),
        // Redshift timestamptz.
        (
            "2024-03-10 23:30:00.123+05:30",
            Some("2024-03-10T18:00:00Z"),
        ),
        ("2024-03-10 23:30:00-08", Some("2024-03-11T07:30:00Z")),
        ("2024-03-10 23:30:00 +00", Some("2024-03-10T23:30:00Z")),
        ("1900-01-01 00:00:00+05:53:28", Some("1899-12-31T18:06:32Z")),
        // Databricks / Spark, and the Parquet reader's text.
        ("2024-03-10T23:30:00.000Z", Some("2024-03-10T23:30:00Z")),
        (
            "2024-03-10T23:30:00.000+05:30",
            Some("2024-03-10T18:00:00Z"),
        ),
        ("2024-03-10T23:30:00", Some("2024-03-10T23:30:00Z")),
        (
            "2024-03-10T23:30:00.123456789",
            Some("2024-03-10T23:30:00Z"),
        ),
        ("2024-03-10t23:30:00z", Some("2024-03-10T23:30:00Z")),
        ("2024-03-10 23:30:00 Z", Some("2024-03-10T23:30:00Z")),
        // A date is midnight UTC.
        ("2024-03-10", Some("2024-03-10T00:00:00Z")),
        // Offsets that move the day, month, year, across a leap day.
        ("2024-01-01 00:15:00 +0100", Some("2023-12-31T23:15:00Z")),
        ("2023-12-31 23:00:00 -0200", Some("2024-01-01T01:00:00Z")),
        ("2024-02-28 22:00:00 -0300", Some("2024-02-29T01:00:00Z")),
        ("2023-02-28 22:00:00 -0300", Some("2023-03-01T01:00:00Z")),
        ("2024-03-01 01:00:00+02:00", Some("2024-02-29T23:00:00Z")),
        // Offsets out of range or malformed.
        ("2024-03-10 23:30:00 +2500", None),
        ("2024-03-10 23:30:00+25:00", None),
        ("2024-03-10 23:30:00 +0560", None),
        ("2024-03-10 23:30:00+8", None),
        ("2024-03-10 23:30:00 +08:0", None),
        ("2024-03-10 23:30:00 +08:00:60", None),
        // Named zones other than UTC / Z.
        ("2024-03-10 23:30:00 PST", None),
        ("2024-03-10 23:30:00 America/Los_Angeles", None),
        ("2024-03-10 23:30:00 GMT", None),
        ("2024-03-10T23:30:00-08:00[America/Los_Angeles]", None),
        // Garbage after the time, odd spacing, bad fractions.
        ("2024-03-10 23:30:00 -0800 x", None),
        ("2024-03-10 23:30:00abc", None),
        ("2024-03-10 23:30:00  -0800", None),
        ("2024-03-10 23:30:00 ", None),
        ("2024-03-10 23:30:00.", None),
        ("2024-03-10 23:30:00.Z", None),
        ("2024-03-10 23:30:00.1234567890", None),
        // Impossible dates and times.
        ("2024-02-30 10:00:00", None),
        ("2023-02-29", None),
        ("2024-13-01", None),
        ("2024-03-10 24:00:00", None),
        ("2024-03-10 23:60:00", None),
        ("2024-03-10 23:30:61", None),
        ("9999-12-31 23:00:00 -0800", None),
        ("0000-01-01 00:30:00 +0100", None),
        // Not date-times: bare numbers are never guessed as epochs.
        ("1710113400", None),
        ("1710113400000", None),
        ("", None),
        ("2024-03-10T", None),
        ("2024-03-10 23:30", None),
        ("2024-3-10", None),
        ("03/10/2024", None),
        ("2024/03/10 23:30:00", None),
        ("2024-03-10 UTC", None),
    ];

    #[test]
    fn datetimes_convert_exactly_to_utc_or_are_refused() {
        for &(input, want) in CASES {
            assert_eq!(parse_datetime(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn due_at_is_sent_in_utc_and_refusals_name_the_accepted_forms() {
        let m = Mapper::new(&config(
            "tickets",
            "subject = \"s\"\ndescription = \"d\"\ndue_at = \"due\"\n",
        ));
        let mut row = MappedRow::default();
        let rec = |due: &str| record(&[Some("T-1"), Some("Help"), Some("It broke"), Some(due)]);
        m.map(&rec(" 2024-03-10 23:30:00.000 -0800 "), &mut row)
            .unwrap();
        assert_eq!(payload(&m, &row, false)["due_at"], "2024-03-11T07:30:00Z");
        for bad in [
            "2024-03-10 23:30:00 PST",
            "2024-03-10 23:30:00 +2500",
            "1710113400",
        ] {
            let e = m.map(&rec(bad), &mut row).unwrap_err();
            assert_eq!(
                (e.reason, e.field.as_deref()),
                (Reason::InvalidValue, Some("due_at"))
            );
            assert!(
                e.message.contains("column `due`")
                    && e.message.contains(&format!("{bad:?} is not a date-time"))
                    && e.message.contains("accepted: 2024-05-01T12:00:00Z")
                    && e.message.contains("(-0800, +05:30, +00) or UTC/Z")
                    && e.message.contains("without a zone (taken as UTC)"),
                "{}",
                e.message
            );
        }
    }

    /// Epoch numbers under a mapping's `format`, converted exactly to UTC or refused.
    #[test]
    fn epoch_numbers_convert_exactly_to_utc_or_are_refused() {
        use EpochError::{NotANumber, OutOfRange};
        use TimeFormat::{EpochMillis as Ms, EpochSeconds as S};
        let cases: &[(&str, TimeFormat, Result<&str, EpochError>)] = &[
            // Seconds.
            ("1710142200", S, Ok("2024-03-11T07:30:00Z")),
            ("+1710142200", S, Ok("2024-03-11T07:30:00Z")),
            ("0001710142200", S, Ok("2024-03-11T07:30:00Z")),
            ("0", S, Ok("1970-01-01T00:00:00Z")),
            ("951782400", S, Ok("2000-02-29T00:00:00Z")),
            // Negative seconds: before 1970.
            ("-1", S, Ok("1969-12-31T23:59:59Z")),
            ("-86400", S, Ok("1969-12-31T00:00:00Z")),
            ("-2208988800", S, Ok("1900-01-01T00:00:00Z")),
            // Fractions of a second are dropped towards the past.
            ("1710142200.5", S, Ok("2024-03-11T07:30:00Z")),
            ("1710142200.999999999", S, Ok("2024-03-11T07:30:00Z")),
            ("1710142200.000", S, Ok("2024-03-11T07:30:00Z")),
            ("-0.5", S, Ok("1969-12-31T23:59:59Z")),
            ("-1.000", S, Ok("1969-12-31T23:59:59Z")),
            ("-1.25", S, Ok("1969-12-31T23:59:58Z")),
            // Milliseconds: whole numbers only.
            ("1710142200000", Ms, Ok("2024-03-11T07:30:00Z")),
            ("1710142200999", Ms, Ok("2024-03-11T07:30:00Z")),
            ("-1", Ms, Ok("1969-12-31T23:59:59Z")),
            ("-1000", Ms, Ok("1969-12-31T23:59:59Z")),
            ("-1001", Ms, Ok("1969-12-31T23:59:58Z")),
            ("1710142200000.0", Ms, Err(NotANumber)),
            ("1710142200.5", Ms, Err(NotANumber)),
            // The range of date-time text: years 0000 to 9999.
            ("253402300799", S, Ok("9999-12-31T23:59:59Z")),
            ("-62167219200", S, Ok("0000-01-01T00:00:00Z")),
            ("253402300799999", Ms, Ok("9999-12-31T23:59:59Z")),
            ("253402300800", S, Err(OutOfRange)),
            ("-62167219201", S, Err(OutOfRange)),
            ("253402300800000", Ms, Err(OutOfRange)),
            ("99999999999999999999", S, Err(OutOfRange)),
            ("-99999999999999999999", Ms, Err(OutOfRange)),
            // Not epoch numbers.
            ("2024-03-10", S, Err(NotANumber)),
            ("2024-03-10T23:30:00Z", Ms, Err(NotANumber)),
            ("1710142200.1234567890", S, Err(NotANumber)),
            ("1710142200.", S, Err(NotANumber)),
            (".5", S, Err(NotANumber)),
            ("1.7e9", S, Err(NotANumber)),
            ("1,710,142,200", S, Err(NotANumber)),
            ("1710142200 UTC", S, Err(NotANumber)),
            ("0x10", S, Err(NotANumber)),
            ("--1", S, Err(NotANumber)),
            ("-", S, Err(NotANumber)),
            ("", S, Err(NotANumber)),
        ];
        for &(input, format, want) in cases {
            let got = epoch_utc(input, format).map(|b| String::from_utf8_lossy(&b).into_owned());
            assert_eq!(got, want.map(String::from), "{input:?} {format:?}");
        }
    }

    #[test]
    fn epoch_formats_map_date_and_date_time_fields_and_name_the_format() {
        let tickets = "subject = \"s\"\ndescription = \"d\"\ndue_at = { column = \"due\", format = \"epoch_seconds\" }\n\"custom_fields.360001\" = { column = \"day\", type = \"date\", format = \"epoch_seconds\" }\n";
        let m = Mapper::new(&config("tickets", tickets));
        let mut row = MappedRow::default();
        let rec = |due: Option<&str>, day: Option<&str>| {
            record(&[Some("T-1"), Some("Help"), Some("It broke"), due, day])
        };
        for (due, day, want_due, want_day) in [
            (
                "1710142200",
                "1710142200",
                "2024-03-11T07:30:00Z",
                "2024-03-11",
            ),
            (" -1 ", "-1.5", "1969-12-31T23:59:59Z", "1969-12-31"),
            (
                "1710142200.5",
                "1710115200",
                "2024-03-11T07:30:00Z",
                "2024-03-11",
            ),
        ] {
            m.map(&rec(Some(due), Some(day)), &mut row).unwrap();
            let p = payload(&m, &row, false);
            assert_eq!(p["due_at"], want_due, "{due:?}");
            assert_eq!(
                p["custom_fields"],
                serde_json::json!([{"id": 360001, "value": want_day}]),
                "{day:?}"
            );
        }
        // Empty cells are still nulls.
        m.map(&rec(None, Some(" ")), &mut row).unwrap();
        let p = payload(&m, &row, false);
        assert_eq!(p["due_at"], serde_json::Value::Null);
        assert_eq!(p["custom_fields"][0]["value"], serde_json::Value::Null);
        // Text is refused naming the format; so is a number out of range.
        for (due, day, field, says) in [
            (
                "2024-03-10",
                "0",
                "due_at",
                "\"2024-03-10\" is not epoch seconds (the mapping's format = \"epoch_seconds\")",
            ),
            (
                "0",
                "2024-03-10 23:30:00",
                "custom_fields.360001",
                "\"2024-03-10 23:30:00\" is not epoch seconds (the mapping's format = \"epoch_seconds\")",
            ),
            (
                "253402300800",
                "0",
                "due_at",
                "\"253402300800\" epoch seconds is out of range (the mapping's format = \"epoch_seconds\")",
            ),
        ] {
            let e = m.map(&rec(Some(due), Some(day)), &mut row).unwrap_err();
            assert_eq!(
                (e.reason, e.field.as_deref()),
                (Reason::InvalidValue, Some(field))
            );
            assert!(e.message.contains(says), "{}", e.message);
        }

        // Milliseconds into a user's date field: the UTC date of the instant.
        let users = "name = \"n\"\nemail = \"e\"\n\"user_fields.signup\" = { column = \"signup\", type = \"date\", format = \"epoch_millis\" }\n";
        let m = Mapper::new(&config("users", users));
        let rec = |signup: &str| record(&[Some("1"), Some("A"), Some("a@b.co"), Some(signup)]);
        m.map(&rec("1710115199999"), &mut row).unwrap();
        assert_eq!(
            payload(&m, &row, true)["user_fields"]["signup"],
            "2024-03-10"
        );
        m.map(&rec("1710115200000"), &mut row).unwrap();
        assert_eq!(
            payload(&m, &row, true)["user_fields"]["signup"],
            "2024-03-11"
        );
        let e = m.map(&rec("1710115200.5"), &mut row).unwrap_err();
        assert!(
            e.message.contains(
                "\"1710115200.5\" is not epoch milliseconds (the mapping's format = \"epoch_millis\")"
            ),
            "{}",
            e.message
        );
    }

    #[test]
    fn the_format_is_part_of_the_mapping_hash() {
        let hash = |due: &str| {
            Mapper::new(&config(
                "tickets",
                &format!("subject = \"s\"\ndescription = \"d\"\ndue_at = {due}\n"),
            ))
            .mapping_hash()
        };
        let text = hash("\"due\"");
        let seconds = hash("{ column = \"due\", format = \"epoch_seconds\" }");
        let millis = hash("{ column = \"due\", format = \"epoch_millis\" }");
        assert_eq!(hash("{ column = \"due\" }"), text);
        assert!(text != seconds && text != millis && seconds != millis);
    }

    #[test]
    fn tickets_put_description_in_the_first_comment_only_on_create() {
        let m = Mapper::new(&config(
            "tickets",
            "subject = \"s\"\ndescription = \"d\"\npriority = \"p\"\nrequester_email = \"e\"\n\"custom_fields.360001\" = { column = \"n\", type = \"integer\" }\n",
        ));
        let mut row = MappedRow::default();
        m.map(
            &record(&[
                Some("T-1"),
                Some("Help"),
                Some("It broke"),
                Some("HIGH"),
                Some("x@y.org"),
                Some("7"),
            ]),
            &mut row,
        )
        .unwrap();
        // Ticket external ids are case-sensitive.
        assert_eq!(row.pk_hash, key_hash(Object::Tickets, "T-1"));
        assert_ne!(row.pk_hash, key_hash(Object::Tickets, "t-1"));
        assert_eq!(
            payload(&m, &row, true),
            serde_json::json!({"external_id":"T-1","subject":"Help","comment":{"body":"It broke"},"priority":"high",
                "requester":{"email":"x@y.org"},"custom_fields":[{"id":360001,"value":7}]})
        );
        assert_eq!(
            payload(&m, &row, false),
            serde_json::json!({"external_id":"T-1","subject":"Help","priority":"high",
                "requester":{"email":"x@y.org"},"custom_fields":[{"id":360001,"value":7}]})
        );
    }

    #[test]
    fn a_role_column_makes_admins_only_when_the_config_allows_it() {
        let text = |allow: &str| {
            format!(
                "name = \"t\"\nobject = \"users\"\nmode = \"upsert\"\nprimary_key = \"id\"\n{allow}[source]\nlocation = \"x\"\n[zendesk]\nsubdomain = \"acme\"\n[mapping]\nname = \"n\"\nemail = \"e\"\nrole = \"r\"\n"
            )
        };
        let row =
            |role: &str| record(&[Some("u1"), Some("Ann"), Some("ann@example.com"), Some(role)]);
        let mut out = MappedRow::default();
        let strict = Mapper::new(&SyncConfig::parse(&text(""), "t.toml").unwrap());
        assert!(strict.map(&row("agent"), &mut out).is_ok());
        let e = strict.map(&row("Admin"), &mut out).unwrap_err();
        assert_eq!(e.reason, Reason::InvalidValue);
        assert!(
            e.message.contains("allow_admin_role = true"),
            "{}",
            e.message
        );
        let open =
            Mapper::new(&SyncConfig::parse(&text("allow_admin_role = true\n"), "t.toml").unwrap());
        assert!(open.map(&row("admin"), &mut out).is_ok());
    }

    #[test]
    fn fingerprint_follows_values_and_mapping() {
        let m = Mapper::new(&config(
            "organizations",
            "name = \"n\"\ndomain_names = \"d\"\n",
        ));
        let mut row = MappedRow::default();
        m.map(
            &record(&[Some("o1"), Some("Acme"), Some("b.com a.com")]),
            &mut row,
        )
        .unwrap();
        let fp = row.fingerprint;
        m.map(
            &record(&[Some("o1"), Some("Acme"), Some("a.com,b.com")]),
            &mut row,
        )
        .unwrap();
        assert_eq!(
            row.fingerprint, fp,
            "list order and separators do not matter"
        );
        m.map(
            &record(&[Some("o1"), Some("Acme Inc"), Some("a.com,b.com")]),
            &mut row,
        )
        .unwrap();
        assert_ne!(row.fingerprint, fp);
        let m2 = Mapper::new(&config(
            "organizations",
            "name = \"n\"\ndomain_names = \"d\"\nnotes = \"x\"\n",
        ));
        assert_ne!(m2.mapping_hash(), m.mapping_hash());
        let mut rec = record(&[Some("o1"), Some("Acme"), Some("a.com,b.com"), None]);
        rec.values.truncate(4);
        m2.map(&rec, &mut row).unwrap();
        assert_ne!(row.fingerprint, fp);
    }

    #[test]
    fn nulls_clear_or_skip() {
        let mut c = config("users", "name = \"n\"\nemail = \"e\"\nnotes = \"x\"\n");
        let m = Mapper::new(&c);
        let mut row = MappedRow::default();
        m.map(
            &record(&[Some("1"), Some("A"), Some("a@b.co"), None]),
            &mut row,
        )
        .unwrap();
        assert_eq!(payload(&m, &row, true)["notes"], serde_json::Value::Null);
        c.nulls = Nulls::Skip;
        let m = Mapper::new(&c);
        m.map(
            &record(&[Some("1"), Some("A"), Some("a@b.co"), None]),
            &mut row,
        )
        .unwrap();
        assert!(payload(&m, &row, true).get("notes").is_none());
    }

    fn schema() -> Schema {
        use serde_json::json;
        Schema::from_values(
            Object::Users,
            &[
                json!({"id": 1, "key": "plan", "type": "dropdown", "title": "Plan", "custom_field_options": [
                    {"name": "Free", "value": "plan_free"}, {"name": " Pro ", "value": "plan_pro"},
                    {"name": "Enterprise", "value": "plan_enterprise"}]}),
                json!({"id": 2, "key": "interests", "type": "multiselect", "title": "Interests", "custom_field_options": [
                    {"name": "Analytics", "value": "interest_analytics"}, {"name": "Billing", "value": "interest_billing"}]}),
                json!({"id": 3, "key": "code", "type": "regexp", "title": "Account code",
                    "regexp_for_validation": "^[A-Z]{3}-[0-9]{4}$"}),
            ],
        )
    }

    const WITH_OPTIONS: &str = "name = \"n\"\nemail = \"e\"\n\"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }\n\"user_fields.interests\" = { column = \"i\", type = \"multiselect\" }\n\"user_fields.code\" = \"code\"\n";

    fn row_of(plan: &str, interests: &str, code: &str) -> Record {
        record(&[
            Some("1"),
            Some("A"),
            Some("a@b.co"),
            Some(plan),
            Some(interests),
            Some(code),
        ])
    }

    #[test]
    fn schema_translates_option_names_to_values() {
        let c = config("users", WITH_OPTIONS);
        let s = schema();
        let m = Mapper::with_schema(&c, Some(&s));
        let mut row = MappedRow::default();
        for (plan, want) in [
            ("plan_pro", "plan_pro"),
            ("Pro", "plan_pro"),
            (" pro ", "plan_pro"),
            ("ENTERPRISE", "plan_enterprise"),
            ("PLAN_FREE", "plan_free"),
        ] {
            m.map(&row_of(plan, "", "ABC-1234"), &mut row).unwrap();
            assert_eq!(
                payload(&m, &row, true)["user_fields"]["plan"],
                want,
                "{plan}"
            );
        }
        m.map(
            &row_of("Free", "billing analytics interest_billing", "ABC-1234"),
            &mut row,
        )
        .unwrap();
        assert_eq!(
            payload(&m, &row, true)["user_fields"]["interests"],
            serde_json::json!(["interest_analytics", "interest_billing"])
        );
        // The fingerprint hashes the translated value: a label and its value are the same row.
        m.map(&row_of("Free", "", "ABC-1234"), &mut row).unwrap();
        let fp = row.fingerprint;
        m.map(&row_of("plan_free", "", "ABC-1234"), &mut row)
            .unwrap();
        assert_eq!(row.fingerprint, fp);
        // Without a schema the value is sent as written.
        let plain = Mapper::new(&c);
        plain
            .map(&row_of("Pro", "Billing", "whatever"), &mut row)
            .unwrap();
        assert_eq!(payload(&plain, &row, true)["user_fields"]["plan"], "Pro");
        assert_eq!(plain.mapping_hash(), m.mapping_hash());
    }

    #[test]
    fn schema_refuses_unknown_options_and_pattern_mismatches() {
        let c = config("users", WITH_OPTIONS);
        let s = schema();
        let m = Mapper::with_schema(&c, Some(&s));
        let mut row = MappedRow::default();
        let e = m
            .map(&row_of("Platinum", "", "ABC-1234"), &mut row)
            .unwrap_err();
        assert_eq!(e.reason, Reason::InvalidValue);
        assert_eq!(e.field.as_deref(), Some("user_fields.plan"));
        assert!(
            e.message.contains("column `plan`")
                && e.message.contains("\"Platinum\"")
                && e.message.contains("Zendesk field `plan` (\"Plan\")")
                && e.message
                    .contains("Free (plan_free), Pro (plan_pro), Enterprise (plan_enterprise)"),
            "{}",
            e.message
        );
        let e = m
            .map(&row_of("Pro", "billing, gardening", "ABC-1234"), &mut row)
            .unwrap_err();
        assert_eq!(
            (e.reason, e.field.as_deref()),
            (Reason::InvalidValue, Some("user_fields.interests"))
        );
        assert!(e.message.contains("\"gardening\""), "{}", e.message);
        let e = m.map(&row_of("Pro", "", "abc-12"), &mut row).unwrap_err();
        assert_eq!(
            (e.reason, e.field.as_deref()),
            (Reason::InvalidValue, Some("user_fields.code"))
        );
        assert!(
            e.message.contains("^[A-Z]{3}-[0-9]{4}$") && e.message.contains("\"abc-12\""),
            "{}",
            e.message
        );
        // Empty cells stay nulls, not refusals.
        m.map(
            &record(&[Some("1"), Some("A"), Some("a@b.co"), None, None, None]),
            &mut row,
        )
        .unwrap();
        let p = payload(&m, &row, true);
        assert_eq!(p["user_fields"]["plan"], serde_json::Value::Null);
        assert_eq!(p["user_fields"]["interests"], serde_json::json!([]));
    }

    #[test]
    fn option_tables_list_at_most_ten_options() {
        let opts: Vec<_> = (0..25)
            .map(|i| serde_json::json!({"name": format!("N{i}"), "value": format!("v{i}")}))
            .collect();
        let s = Schema::from_values(
            Object::Users,
            &[
                serde_json::json!({"id": 1, "key": "plan", "type": "dropdown", "title": "Plan", "custom_field_options": opts}),
            ],
        );
        let t = OptionTable::new(&s.fields[0]);
        assert!(t.listing.contains("N9 (v9)") && !t.listing.contains("N10"));
        assert!(t.listing.ends_with("(25 options in all)"), "{}", t.listing);
        let mut scratch = String::new();
        assert_eq!(t.resolve("n24", &mut scratch), Some("v24"));
        assert_eq!(t.resolve("V3", &mut scratch), Some("v3"));
        assert_eq!(t.resolve("x", &mut scratch), None);
    }

    #[test]
    fn email_shapes() {
        for ok in ["a@b.co", "first.last+tag@sub.example.org", "ü@exämple.de"] {
            assert!(is_email(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            "a@",
            "@b.co",
            "a@b",
            "a@@b.co",
            "a b@c.co",
            "a@b..co",
            "a@-b.co",
            ".a@b.co",
            "a@b.c0m.123",
        ] {
            assert!(!is_email(bad), "{bad}");
        }
    }
}
