//! Export readers: streaming, memory-bounded record sources over warehouse unloads.
//!
//! An export location resolves to one or more part files (one object, a prefix of parts, or a
//! Redshift UNLOAD manifest). Each part is opened as a [`RecordReader`] that yields the projected
//! columns of one record at a time into a reused [`Record`], so reading allocates nothing per row
//! in the steady state. A malformed record is reported as [`Next::Malformed`] and the read goes on;
//! a file that cannot be read at all is an [`ExportError`] naming it. What one read pass takes
//! from all the parts together is capped (rows and decompressed bytes, see [`ReadBudget`]).

mod budget;
mod compression;
mod csv;
mod jsonl;
mod locate;
mod parquet;

pub use budget::{
    parse_size, CapExceeded, ReadBudget, ReadCap, DEFAULT_MAX_BYTES_READ, DEFAULT_MAX_ROWS_READ,
    MAX_ROWS_READ_LIMIT,
};
pub use compression::Compression;
pub use locate::{resolve, resolve_export, Export};

use crate::config::SyncConfig;
use crate::store::{ObjectMeta, ObjectStore};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// One cell of a record. Scalars keep their text as exported (numbers, booleans and timestamps
/// included); typing happens later, by the target field's type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Value {
    #[default]
    Null,
    Text(String),
    List(Vec<String>),
}

impl Value {
    /// Replace the value with `text`, reusing the existing allocation when there is one.
    pub fn set_text(&mut self, text: &str) {
        match self {
            Value::Text(s) => {
                s.clear();
                s.push_str(text);
            }
            _ => *self = Value::Text(text.to_string()),
        }
    }

    pub fn set_null(&mut self) {
        if !matches!(self, Value::Null) {
            *self = Value::Null;
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// A reused record buffer: `values[i]` is the i-th projected column.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub values: Vec<Value>,
    /// 1-based line (CSV, JSONL) or row (Parquet) where the record starts in its file.
    pub line: u64,
}

/// What one call of [`RecordReader::next`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// `record` holds the next record.
    Record,
    /// A record that could not be parsed; the reader has skipped it and can go on.
    Malformed { line: u64, reason: String },
    /// No more records in this file.
    End,
}

/// A streaming reader over one part file.
pub trait RecordReader: Send {
    fn next(&mut self, record: &mut Record) -> Result<Next, ExportError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// From magic bytes, then the file extension, then the first byte.
    #[default]
    Auto,
    Csv,
    Jsonl,
    Parquet,
}

/// How a delimited file escapes special characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Escape {
    /// RFC 4180: fields are quoted, quotes inside are doubled.
    #[default]
    Quote,
    /// Redshift UNLOAD ... ESCAPE: a backslash escapes the delimiter, a newline, a quote or
    /// itself (`\|`, `\\`); quoted fields (ADDQUOTES) are also understood.
    Backslash,
}

/// How to read the part files of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    pub format: Format,
    pub compression: Compression,
    pub delimiter: u8,
    pub quote: u8,
    pub escape: Escape,
    /// An empty CSV field is NULL (the default) or an empty string.
    pub empty_as_null: bool,
    /// Field texts that mean NULL (e.g. `\N`), compared exactly.
    pub null_values: Vec<String>,
    /// CSV: the first line of each file names the columns (the default). Without a header line
    /// every line is data and `columns` names the fields.
    pub header: bool,
    /// CSV without a header line: the column names in file order (`source.columns`, or the
    /// schema of a `MANIFEST VERBOSE` manifest, see [`resolve_source`]).
    pub columns: Vec<String>,
    /// A record longer than this is refused as malformed (an unterminated quote would otherwise
    /// swallow the rest of the file); reading resumes on the line after its start.
    pub max_record_bytes: usize,
    /// Rows one read pass (a run's plan) takes from all the part files together; past it the
    /// read fails with [`ExportError::TooLarge`] (`source.max_rows_read`, below `u32::MAX`).
    pub max_rows_read: u64,
    /// Decompressed bytes one read pass takes from all the part files together (Parquet: the
    /// files' sizes); past it the read fails with [`ExportError::TooLarge`]
    /// (`source.max_bytes_read`).
    pub max_bytes_read: u64,
    /// The sync config these options come from, named in the fix of a cap error.
    pub config_file: String,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: Format::Auto,
            compression: Compression::Auto,
            delimiter: b',',
            quote: b'"',
            escape: Escape::Quote,
            empty_as_null: true,
            null_values: vec![crate::config::DEFAULT_NULL.to_string()],
            header: true,
            columns: Vec::new(),
            max_record_bytes: 4 * 1024 * 1024,
            max_rows_read: DEFAULT_MAX_ROWS_READ,
            max_bytes_read: DEFAULT_MAX_BYTES_READ,
            config_file: "the sync's config".to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no export found at `{location}`: {hint}")]
    NotFound { location: String, hint: String },
    #[error("export file `{file}` cannot be read: {reason}")]
    Unreadable { file: String, reason: String },
    #[error("export file `{file}` has no column `{column}` (columns are matched case-insensitively; the file has: {available}); fix the mapping or the export")]
    MissingColumn {
        file: String,
        column: String,
        available: String,
    },
    #[error("manifest `{file}` is invalid: {reason}")]
    BadManifest { file: String, reason: String },
    /// A headerless export whose column names are missing or disagree.
    #[error("export `{location}` has no header line (`header = false`): {reason}")]
    Columns { location: String, reason: String },
    /// One read pass went over `source.max_rows_read` or `source.max_bytes_read`.
    #[error("stopped reading export file `{file}`: {exceeded}")]
    TooLarge { file: String, exceeded: CapExceeded },
}

/// What to tell someone whose headerless export has no column names.
const NAME_THE_COLUMNS: &str = "add `columns = [\"id\", \"email\", ...]` under [source] (the \
    files' columns in order), or unload with a header line (Redshift `HEADER`, Snowflake \
    `HEADER = TRUE`) and remove `header = false`, or unload with Redshift `MANIFEST VERBOSE` and \
    set `location` to the manifest, whose schema names the columns";

/// The export of a sync's `[source]`: its part files, and the config to read them with. For a
/// headerless CSV export (`header = false`) the column names come from `source.columns`, else
/// from the schema of the `MANIFEST VERBOSE` manifest `location` names (then the returned
/// config carries them); with neither, or when the two disagree in number, this fails before
/// anything is read.
pub fn resolve_source<'c>(
    store: &dyn ObjectStore,
    cfg: &'c SyncConfig,
) -> Result<(Vec<ObjectMeta>, Cow<'c, SyncConfig>), ExportError> {
    let location = &cfg.source.location;
    let export = resolve_export(store, location)?;
    let read = &cfg.source.read;
    if read.header {
        return Ok((export.parts, Cow::Borrowed(cfg)));
    }
    let error = |reason: String| ExportError::Columns {
        location: location.clone(),
        reason,
    };
    let manifest = export.manifest.as_deref().unwrap_or_default();
    match export.columns {
        Some(schema) if !read.columns.is_empty() && schema.len() != read.columns.len() => {
            Err(error(format!(
                "`source.columns` lists {} columns ({}) but the schema of manifest \
                 `{manifest}` lists {} ({}); make `columns` match the unload's columns, or \
                 remove `columns` to use the manifest's names",
                read.columns.len(),
                read.columns.join(", "),
                schema.len(),
                schema.join(", ")
            )))
        }
        _ if !read.columns.is_empty() => Ok((export.parts, Cow::Borrowed(cfg))),
        Some(schema) => {
            if let Some(dup) = schema.iter().enumerate().find_map(|(i, c)| {
                schema[..i]
                    .iter()
                    .any(|o| o.to_lowercase() == c.to_lowercase())
                    .then_some(c)
            }) {
                return Err(error(format!(
                    "the schema of manifest `{manifest}` names column `{dup}` twice (names \
                     match case-insensitively); add `columns = [...]` under [source] with \
                     unique names in the files' order"
                )));
            }
            let mut owned = cfg.clone();
            owned.source.read.columns = schema;
            Ok((export.parts, Cow::Owned(owned)))
        }
        None => Err(error(match export.manifest {
            Some(m) => format!(
                "manifest `{m}` has no schema naming the columns (Redshift writes one with \
                 `MANIFEST VERBOSE`); {NAME_THE_COLUMNS}"
            ),
            None => format!("nothing names its columns; {NAME_THE_COLUMNS}"),
        })),
    }
}

/// Open one part file for reading the given columns (CSV and Parquet: column names, matched
/// case-insensitively; JSONL: dotted paths such as `address.city`). Its rows and decompressed
/// bytes count against `budget`, which every part of one read pass shares (make one with
/// [`ReadBudget::new`] per pass, and read its parts one after another).
pub fn open_reader(
    store: &dyn ObjectStore,
    key: &str,
    columns: &[String],
    options: &ReadOptions,
    budget: &ReadBudget,
) -> Result<Box<dyn RecordReader>, ExportError> {
    let format = match options.format {
        // Only CSV files go without a header: a headerless row starting with `{` is still CSV.
        Format::Auto if !options.header => Format::Csv,
        Format::Auto => compression::sniff_format(store, key, options.compression)?,
        f => f,
    };
    match format {
        Format::Parquet => {
            let reader = parquet::ParquetReader::open(store, key, columns, budget)?;
            Ok(Box::new(budget.count_rows(reader, key)))
        }
        Format::Csv => {
            let input = compression::open_decoded(store, key, options.compression, Some(budget))?;
            let reader = csv::CsvReader::new(input, key, columns, options)
                .map_err(|e| budget.explain(key, e))?;
            Ok(Box::new(budget.count_rows(reader, key)))
        }
        Format::Jsonl => {
            let input = compression::open_decoded(store, key, options.compression, Some(budget))?;
            let reader = jsonl::JsonlReader::new(input, key, columns);
            Ok(Box::new(budget.count_rows(reader, key)))
        }
        Format::Auto => unreachable!("sniff_format never answers Auto"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    fn config(source: &str) -> SyncConfig {
        let text = format!(
            "name = \"u\"\nobject = \"users\"\nmode = \"update\"\nprimary_key = \"id\"\n\n\
             [source]\n{source}\n\n[zendesk]\nsubdomain = \"acme\"\n"
        );
        SyncConfig::parse(&text, "sync.toml").unwrap()
    }

    fn manifest(schema: &str) -> String {
        format!(
            r#"{{"entries": [{{"url": "s3://b/unload/users_0000_part_00", "mandatory": true}}]{schema},
                "author": {{"name": "Amazon Redshift", "version": "1.0.0"}}}}"#
        )
    }

    /// The column names `resolve_source` settles on, or its error.
    fn names(store: &LocalStore, source: &str) -> Result<(bool, Vec<String>), String> {
        let cfg = config(source);
        let (parts, resolved) = resolve_source(store, &cfg).map_err(|e| e.to_string())?;
        assert_eq!(parts.len(), 1);
        Ok((
            matches!(resolved, Cow::Borrowed(_)),
            resolved.source.read.columns.clone(),
        ))
    }

    #[test]
    fn headerless_columns_come_from_the_config_or_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store.put("unload/users_0000_part_00", b"1|a\n").unwrap();
        let schema = r#", "schema": {"elements": [{"name": "id", "type": {"base": "integer"}},
            {"name": "email", "type": {"base": "character varying", "max_length": 256}}]}"#;
        store
            .put("unload/users_manifest", manifest(schema).as_bytes())
            .unwrap();
        store
            .put("unload/plain_manifest", manifest("").as_bytes())
            .unwrap();
        let dup = schema.replace("\"email\"", "\"ID\"");
        store
            .put("unload/dup_manifest", manifest(&dup).as_bytes())
            .unwrap();
        let to = |m: &str| format!("location = \"unload/{m}\"\ndelimiter = \"|\"\n");

        // With a header line the manifest's names are not needed.
        assert_eq!(names(&store, &to("users_manifest")), Ok((true, Vec::new())));
        // Headerless: the manifest's schema names the columns...
        let headerless = |m: &str, extra: &str| format!("{}header = false\n{extra}", to(m));
        assert_eq!(
            names(&store, &headerless("users_manifest", "")),
            Ok((false, vec!["id".into(), "email".into()]))
        );
        // ...unless the config does (it wins when the counts agree).
        assert_eq!(
            names(
                &store,
                &headerless("users_manifest", "columns = [\"ID\", \"EMAIL\"]")
            ),
            Ok((true, vec!["ID".into(), "EMAIL".into()]))
        );
        assert_eq!(
            names(&store, &headerless("plain_manifest", "columns = [\"id\"]")),
            Ok((true, vec!["id".into()]))
        );
        assert_eq!(
            names(
                &store,
                &headerless("users_0000_part_00", "columns = [\"id\"]")
            ),
            Ok((true, vec!["id".into()]))
        );

        let e = names(
            &store,
            &headerless("users_manifest", "columns = [\"id\", \"email\", \"name\"]"),
        )
        .unwrap_err();
        assert!(
            e.contains("lists 3 columns (id, email, name)")
                && e.contains("manifest `unload/users_manifest` lists 2 (id, email)"),
            "{e}"
        );
        let e = names(&store, &headerless("dup_manifest", "")).unwrap_err();
        assert!(e.contains("names column `ID` twice"), "{e}");
        let e = names(&store, &headerless("plain_manifest", "")).unwrap_err();
        assert!(
            e.contains("manifest `unload/plain_manifest` has no schema")
                && e.contains("add `columns = [")
                && e.contains("MANIFEST VERBOSE"),
            "{e}"
        );
        let e = names(&store, &headerless("users_0000_part_00", "")).unwrap_err();
        assert!(
            e.starts_with("export `unload/users_0000_part_00` has no header line")
                && e.contains("nothing names its columns")
                && e.contains("`HEADER`"),
            "{e}"
        );
    }
}
