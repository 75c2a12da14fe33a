//! Export readers: streaming, memory-bounded record sources over warehouse unloads.
//!
//! An export location resolves to one or more part files (one object, a prefix of parts, or a
//! Redshift UNLOAD manifest). Each part is opened as a [`RecordReader`] that yields the projected
//! columns of one record at a time into a reused [`Record`], so reading allocates nothing per row
//! in the steady state. A malformed record is reported as [`Next::Malformed`] and the read goes on;
//! a file that cannot be read at all is an [`ExportError`] naming it.

mod compression;
mod csv;
mod jsonl;
mod locate;
mod parquet;

pub use compression::Compression;
pub use locate::resolve;

use crate::store::ObjectStore;
use serde::{Deserialize, Serialize};

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
    /// A record longer than this is refused as malformed (an unterminated quote would otherwise
    /// swallow the rest of the file); reading resumes on the line after its start.
    pub max_record_bytes: usize,
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
            null_values: Vec::new(),
            max_record_bytes: 4 * 1024 * 1024,
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
}

/// Open one part file for reading the given columns (CSV and Parquet: column names, matched
/// case-insensitively; JSONL: dotted paths such as `address.city`).
pub fn open_reader(
    store: &dyn ObjectStore,
    key: &str,
    columns: &[String],
    options: &ReadOptions,
) -> Result<Box<dyn RecordReader>, ExportError> {
    let format = match options.format {
        Format::Auto => compression::sniff_format(store, key, options.compression)?,
        f => f,
    };
    match format {
        Format::Parquet => Ok(Box::new(parquet::ParquetReader::open(store, key, columns)?)),
        Format::Csv => {
            let input = compression::open_decoded(store, key, options.compression)?;
            Ok(Box::new(csv::CsvReader::new(input, key, columns, options)?))
        }
        Format::Jsonl => {
            let input = compression::open_decoded(store, key, options.compression)?;
            Ok(Box::new(jsonl::JsonlReader::new(input, key, columns)))
        }
        Format::Auto => unreachable!("sniff_format never answers Auto"),
    }
}
