//! `zdsync init`: a starting sync config from an export's columns and a sample of its rows,
//! matched to the object's standard fields and the account's custom fields.

use crate::run_cmd::exit;
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use zdsync::config::SyncConfig;
use zdsync::export::{open_reader, resolve, ExportError, Next, ReadBudget, ReadOptions, Record};
use zdsync::fields::{standard_fields, FieldType, Object};
use zdsync::schema::{FieldDef, Schema};
use zdsync::store::LocalStore;

/// Rows read to guess the key and check dropdown values.
const SAMPLE_ROWS: usize = 200;

#[derive(clap::Args)]
pub struct InitArgs {
    /// The export: one file or a folder of part files.
    pub export: PathBuf,
    /// The object the sync writes: users, organizations or tickets.
    #[arg(long)]
    pub object: String,
    /// The Zendesk subdomain (`mycompany` for https://mycompany.zendesk.com).
    #[arg(long)]
    pub subdomain: String,
    /// Zendesk base URL override (the simulator or a proxy).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Where the credential lives (`env`, `file:credentials.json`, ...).
    #[arg(long, default_value = "env")]
    pub credentials: String,
    /// The sync's name (default: from the export's name).
    #[arg(long)]
    pub name: Option<String>,
    /// The config file to write (default: `<name>.toml`).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Do not read Zendesk: map standard fields only.
    #[arg(long)]
    pub offline: bool,
    /// Overwrite an existing config file.
    #[arg(long)]
    pub force: bool,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(code)
}

/// Lower-case letters and digits only: `PLAN_TIER`, `plan_tier` and "Plan tier" agree.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// A TOML basic string.
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `path` relative to `base` (both absolute), with `..` where needed.
fn relative(path: &Path, base: &Path) -> PathBuf {
    let p: Vec<Component> = path.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c.as_os_str());
    }
    out
}

fn sanitize_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty() {
        "my_sync".into()
    } else {
        n
    }
}

/// The export's column names: CSV and Parquet name them when asked for a column they lack;
/// JSON Lines: the keys of the first record.
fn columns_of(
    store: &LocalStore,
    root: &Path,
    key: &str,
    opts: &ReadOptions,
) -> Result<Vec<String>, String> {
    let probe = vec!["\u{1}zdsync-init-probe".to_string()];
    let budget = ReadBudget::new(opts);
    match open_reader(store, key, &probe, opts, &budget) {
        Err(ExportError::MissingColumn { available, .. }) => Ok(available
            .split(',')
            .map(str::to_string)
            .filter(|c| !c.is_empty())
            .collect()),
        Err(e) => Err(e.to_string()),
        Ok(_) => {
            let text = std::fs::read_to_string(root.join(key))
                .map_err(|e| format!("`{key}`: {e} (compressed JSON Lines: not supported yet)"))?;
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            match serde_json::from_str::<serde_json::Value>(first) {
                Ok(serde_json::Value::Object(m)) => Ok(m.keys().cloned().collect()),
                _ => Err(format!("`{key}`: no columns found in its first record")),
            }
        }
    }
}

/// Up to [`SAMPLE_ROWS`] rows of `columns` (None = NULL).
fn sample(
    store: &LocalStore,
    key: &str,
    columns: &[String],
    opts: &ReadOptions,
) -> Result<Vec<Vec<Option<String>>>, String> {
    let budget = ReadBudget::new(opts);
    let mut reader = open_reader(store, key, columns, opts, &budget).map_err(|e| e.to_string())?;
    let mut rec = Record::default();
    let mut rows = Vec::new();
    while rows.len() < SAMPLE_ROWS {
        match reader.next(&mut rec).map_err(|e| e.to_string())? {
            Next::Record => rows.push(
                rec.values
                    .iter()
                    .map(|v| match v {
                        zdsync::export::Value::Null => None,
                        zdsync::export::Value::Text(s) => Some(s.clone()),
                        zdsync::export::Value::List(l) => Some(l.join(",")),
                    })
                    .collect(),
            ),
            Next::Malformed { .. } => continue,
            Next::End => break,
        }
    }
    Ok(rows)
}

fn singular(object: Object) -> &'static str {
    match object {
        Object::Users => "user",
        Object::Organizations => "organization",
        Object::Tickets => "ticket",
    }
}

/// The column most likely to be each row's key: unique and non-empty in the sample.
fn guess_key(object: Object, columns: &[String], rows: &[Vec<Option<String>>]) -> Option<usize> {
    let rank = |c: &str| -> Option<u8> {
        let n = c.to_lowercase();
        let own = format!("{}_id", singular(object));
        Some(match n.as_str() {
            "external_id" => 0,
            "id" => 1,
            _ if n == own => 2,
            "key" => 3,
            _ if n.ends_with("_key") => 4,
            _ if n.ends_with("_id") => 5,
            _ => return None,
        })
    };
    let mut candidates: Vec<(u8, usize)> = columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| rank(c).map(|r| (r, i)))
        .collect();
    candidates.sort();
    candidates.into_iter().map(|(_, i)| i).find(|&i| {
        let mut seen = HashSet::new();
        !rows.is_empty()
            && rows.iter().all(|r| match &r[i] {
                Some(v) if !v.trim().is_empty() => seen.insert(v.to_lowercase()),
                _ => false,
            })
    })
}

/// Common export names of standard fields (normalized), besides the field's own key.
const ALIASES: &[(&str, &[&str])] = &[
    (
        "name",
        &[
            "fullname",
            "displayname",
            "username",
            "organizationname",
            "orgname",
            "companyname",
        ],
    ),
    ("email", &["emailaddress", "mail"]),
    ("phone", &["phonenumber", "mobile"]),
    ("verified", &["emailverified"]),
    ("tags", &["labels", "segments"]),
    ("domain_names", &["domains", "domain"]),
    ("description", &["body", "comment"]),
    ("time_zone", &["timezone", "tz"]),
];

fn standard_match(object: Object, n: &str, used: &HashSet<String>) -> Option<&'static str> {
    let fields = standard_fields(object);
    let free = |k: &str| !used.contains(k);
    fields
        .iter()
        .find(|f| norm(f.key) == n && free(f.key))
        .or_else(|| {
            fields.iter().find(|f| {
                free(f.key)
                    && ALIASES
                        .iter()
                        .any(|(k, names)| *k == f.key && names.contains(&n))
            })
        })
        .map(|f| f.key)
}

enum Match<'a> {
    Standard(&'static str),
    Custom(&'a FieldDef, FieldType),
}

pub async fn init(args: InitArgs) -> ExitCode {
    let object = match args.object.as_str() {
        "users" => Object::Users,
        "organizations" => Object::Organizations,
        "tickets" => Object::Tickets,
        o => {
            return fail(
                format!("--object {o:?}: use users, organizations or tickets"),
                exit::CONFIG,
            )
        }
    };
    let export = match std::fs::canonicalize(&args.export) {
        Ok(p) => p,
        Err(e) => {
            return fail(
                format!("export `{}`: {e}", args.export.display()),
                exit::EXPORT,
            )
        }
    };
    let name = sanitize_name(&args.name.clone().unwrap_or_else(|| {
        export
            .file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default()
    }));
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.toml")));
    if output.exists() && !args.force {
        return fail(
            format!(
                "`{}` exists; pass --force to overwrite it",
                output.display()
            ),
            exit::CONFIG,
        );
    }
    let out_dir = match output.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(p) => p.to_path_buf(),
        None => PathBuf::from("."),
    };
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        return fail(format!("`{}`: {e}", out_dir.display()), exit::CONFIG);
    }
    let out_dir = std::fs::canonicalize(&out_dir).unwrap_or(out_dir);
    // `plan` reads the export relative to the config's folder (its parent for `config/`).
    let root = if out_dir.file_name().is_some_and(|n| n == "config") {
        out_dir.parent().unwrap_or(&out_dir).to_path_buf()
    } else {
        out_dir.clone()
    };
    let mut location = relative(&export, &root)
        .to_string_lossy()
        .replace('\\', "/");
    if export.is_dir() && !location.ends_with('/') {
        location.push('/');
    }
    let store = LocalStore::new(&root);
    let parts = match resolve(&store, &location) {
        Ok(p) if !p.is_empty() => p,
        Ok(_) => return fail(format!("no export files at `{location}`"), exit::EXPORT),
        Err(e) => return fail(e, exit::EXPORT),
    };
    let first = parts[0].key.clone();
    let mut opts = ReadOptions::default();
    let mut columns = columns_of(&store, &root, &first, &opts);
    // One column holding `|`, a tab or `;`: a delimited file that is not comma-separated.
    let other = match &columns {
        Ok(c) if c.len() == 1 => [b'|', b'\t', b';']
            .into_iter()
            .find(|d| c[0].contains(char::from(*d))),
        _ => None,
    };
    let mut source = format!("location = {}\n", q(&location));
    if let Some(d) = other {
        opts.delimiter = d;
        columns = columns_of(&store, &root, &first, &opts);
        source.push_str(&format!("delimiter = {}\n", q(&char::from(d).to_string())));
    }
    let columns = match columns {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return fail(format!("`{first}` names no columns"), exit::EXPORT),
        Err(e) => return fail(e, exit::EXPORT),
    };
    let rows = match sample(&store, &first, &columns, &opts) {
        Ok(r) => r,
        Err(e) => return fail(e, exit::EXPORT),
    };

    let mut header = format!(
        "# Written by `zdsync init` from `{}` ({} columns, {} sample rows).\n\
         # Review the lines marked REVIEW, then: zdsync plan {}\n",
        args.export.display(),
        columns.len(),
        rows.len(),
        output.display()
    );
    let schema: Option<Schema> = if args.offline {
        header.push_str(
            "# --offline: Zendesk was not read; only standard fields are mapped (run \
             `zdsync schema` for custom fields).\n",
        );
        None
    } else {
        let text = base_config(&name, object, "update", "id", &source, &args, "");
        let cfg = match SyncConfig::parse(&text, &output.display().to_string()) {
            Ok(c) => c,
            Err(e) => return fail(e, exit::CONFIG),
        };
        let client = match crate::run_cmd::client_for(&cfg, &output).await {
            Ok(c) => c,
            Err(e) => return fail(&e, e.error_name().exit_code()),
        };
        match zdsync::schema::fetch(&client, object).await {
            Ok(s) => Some(s),
            Err(e) => return fail(&e, e.error_name().exit_code()),
        }
    };

    let key = guess_key(object, &columns, &rows);
    let (pk, pk_note) = match key {
        Some(i) => (
            columns[i].clone(),
            format!(
                "# REVIEW: primary key guessed from column `{}` (unique and non-empty in the sample)",
                columns[i]
            ),
        ),
        None => (
            columns[0].clone(),
            "# REVIEW: no column looked like a unique key; set primary_key to the column that \
             identifies each row"
                .to_string(),
        ),
    };

    let mut used: HashSet<String> = HashSet::new();
    let mut mapping = String::new();
    let mut unmatched = String::new();
    let mut mapped_std: HashSet<&str> = HashSet::new();
    for (i, col) in columns.iter().enumerate() {
        if *col == pk {
            continue;
        }
        let n = norm(col);
        let m = standard_match(object, &n, &used)
            .map(Match::Standard)
            .or_else(|| {
                let s = schema.as_ref()?;
                s.custom_fields()
                    .filter(|f| f.active)
                    .find(|f| f.key.as_deref().is_some_and(|k| norm(k) == n) || norm(&f.title) == n)
                    .and_then(|f| FieldType::parse_custom(&f.ty).map(|t| Match::Custom(f, t)))
            });
        match m {
            Some(Match::Standard(k)) => {
                used.insert(k.to_string());
                mapped_std.insert(k);
                mapping.push_str(&format!("{k} = {}\n", q(col)));
            }
            Some(Match::Custom(f, t)) => {
                let field = match (&f.key, object) {
                    (Some(k), o) if o != Object::Tickets => {
                        format!("{}.{k}", object.custom_prefix())
                    }
                    _ => format!("{}.{}", object.custom_prefix(), f.id),
                };
                if !used.insert(field.clone()) {
                    unmatched.push_str(&format!(
                        "# ? = {}   # no Zendesk field matches (`{field}` is mapped above)\n",
                        q(col)
                    ));
                    continue;
                }
                if f.has_options() {
                    let opts: Vec<String> = f
                        .options
                        .iter()
                        .map(|o| format!("{} ({})", o.value, o.name))
                        .collect();
                    mapping.push_str(&format!("# `{}` options: {}\n", f.title, opts.join(", ")));
                    let mut bad: Vec<String> = Vec::new();
                    for r in &rows {
                        if let Some(v) = &r[i] {
                            for part in if t == FieldType::Multiselect {
                                v.split(',').map(str::trim).collect::<Vec<_>>()
                            } else {
                                vec![v.trim()]
                            } {
                                let known = part.is_empty()
                                    || f.options.iter().any(|o| {
                                        o.value.eq_ignore_ascii_case(part)
                                            || o.name.eq_ignore_ascii_case(part)
                                    });
                                if !known && !bad.iter().any(|b| b == part) {
                                    bad.push(part.to_string());
                                }
                            }
                        }
                    }
                    if !bad.is_empty() {
                        mapping.push_str(&format!(
                            "# REVIEW: sample values that are not options: {}\n",
                            bad.iter().map(|b| q(b)).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                mapping.push_str(&format!(
                    "{} = {{ column = {}, type = {} }}\n",
                    q(&field),
                    q(col),
                    q(t.name())
                ));
            }
            None => unmatched.push_str(&format!("# ? = {}   # no Zendesk field matches\n", q(col))),
        }
    }
    let missing: Vec<&str> = object
        .required_fields()
        .iter()
        .copied()
        .filter(|k| !mapped_std.contains(k))
        .collect();
    let mode = if missing.is_empty() {
        "upsert"
    } else {
        "update"
    };
    let mut pk_note = pk_note;
    if !missing.is_empty() {
        pk_note.push_str(&format!(
            "\n# REVIEW: mode is `update` (existing records only): creating needs {} mapped",
            missing.join(", ")
        ));
    }
    if !unmatched.is_empty() {
        mapping.push_str("\n# Columns no field matched (map them by hand, or leave them out):\n");
        mapping.push_str(&unmatched);
    }
    let body = base_config(&name, object, mode, &pk, &source, &args, &mapping);
    let text = format!("{header}{pk_note}\n{body}");
    let file = output.display().to_string();
    let cfg = match SyncConfig::parse(&text, &file) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                format!("the config init wrote does not parse (a bug): {e}\n{text}"),
                exit::CONFIG,
            )
        }
    };
    if let Some(s) = &schema {
        if let Err(e) = s.validate(&cfg) {
            return fail(
                format!("the config init wrote does not fit the account (a bug): {e}"),
                exit::CONFIG,
            );
        }
    }
    if let Err(e) = std::fs::write(&output, &text) {
        return fail(format!("`{file}`: {e}"), exit::CONFIG);
    }
    println!(
        "wrote {file}: {} of {} columns mapped, primary key `{pk}` (review it)",
        cfg.mapping.len(),
        columns.len()
    );
    println!("next: zdsync plan {file}");
    ExitCode::SUCCESS
}

fn base_config(
    name: &str,
    object: Object,
    mode: &str,
    pk: &str,
    source: &str,
    args: &InitArgs,
    mapping: &str,
) -> String {
    let base_url = args
        .base_url
        .as_deref()
        .map(|u| format!("base_url = {}\n", q(u)))
        .unwrap_or_default();
    format!(
        "name = {}\nobject = {}\nmode = {}\nprimary_key = {}\n\n[source]\n{source}\n\
         [zendesk]\nsubdomain = {}\ncredentials = {}\n{base_url}\n[mapping]\n{mapping}",
        q(name),
        q(object.as_str()),
        q(mode),
        q(pk),
        q(&args.subdomain),
        q(&args.credentials),
    )
}
