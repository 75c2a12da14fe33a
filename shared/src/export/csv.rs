//! Delimited text (CSV, TSV, Redshift pipe-delimited unloads).
//!
//! Most lines of a warehouse export contain no quote at all, so a line without a special byte
//! (the quote, and the backslash in the backslash dialect) is split directly with `memchr`.
//! A line that has one goes through `csv_core` (RFC 4180) or a small splitter for the
//! backslash dialect. Either way the raw bytes of each record stay in our own buffer, which
//! gives exact line numbers, quoting checks, and resynchronisation after an unterminated quote.

use super::{Escape, ExportError, Next, ReadOptions, Record, RecordReader, Value};
use csv_core::{ReadRecordResult, Terminator};
use memchr::{memchr, memchr2, memchr_iter};
use std::io::{self, Read};

const INPUT_BUFFER: usize = 256 * 1024;
/// A field range meaning "NULL by its raw text" (backslash dialect, where `\N` unescapes to `N`).
const RAW_NULL: (usize, usize) = (usize::MAX, usize::MAX);

/// Where the field ranges of the current record point.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Straight into the input buffer (no quoting or escaping on the line).
    Input,
    /// Into the csv_core output buffer.
    Parsed,
    /// Into the backslash splitter's output buffer.
    Unescaped,
}

enum Step {
    Fields { line: u64 },
    Malformed { line: u64, reason: String },
    End,
}

/// Outcome of the backslash splitter on the buffered bytes at `pos`.
enum Split {
    /// A whole record of `len` raw bytes.
    Done { len: usize },
    /// The record continues past the buffered bytes.
    NeedMore,
}

pub(crate) struct CsvReader {
    input: Box<dyn Read + Send>,
    file: String,
    /// Buffered input; `buf[pos..end]` is not consumed yet.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Physical line number of `buf[pos]`.
    line: u64,
    /// Cache of the next special byte: none in `special_from..special_at`, and `special_at`
    /// is either one or `special_to` (the end of the search).
    special_from: usize,
    special_at: usize,
    special_to: usize,
    parser: csv_core::Reader,
    parsed: Vec<u8>,
    ends: Vec<usize>,
    unescaped: Vec<u8>,
    fields: Vec<(usize, usize)>,
    source: Source,
    delimiter: u8,
    quote: u8,
    escape: Escape,
    empty_as_null: bool,
    null_values: Vec<Vec<u8>>,
    max_record_bytes: usize,
    /// Header index of each requested column.
    projection: Vec<usize>,
    /// The column names: the header line, or `ReadOptions::columns` for a headerless file.
    header: Vec<String>,
    /// Whether `header` came from the file's first line.
    has_header_line: bool,
    done: bool,
}

impl CsvReader {
    pub(crate) fn new(
        input: Box<dyn Read + Send>,
        file: &str,
        columns: &[String],
        options: &ReadOptions,
    ) -> Result<Self, ExportError> {
        let d = options.delimiter;
        if d == options.quote
            || d == b'\n'
            || d == b'\r'
            || (d == b'\\' && options.escape == Escape::Backslash)
        {
            return Err(ExportError::Unreadable {
                file: file.to_string(),
                reason: format!(
                    "delimiter {:?} cannot be used with quote {:?} and escape {:?}",
                    d as char, options.quote as char, options.escape
                ),
            });
        }
        let parser = csv_core::ReaderBuilder::new()
            .delimiter(d)
            .quote(options.quote)
            .double_quote(true)
            .escape(None)
            .terminator(Terminator::Any(b'\n'))
            .build();
        let mut reader = Self {
            input,
            file: file.to_string(),
            buf: vec![0; INPUT_BUFFER],
            pos: 0,
            end: 0,
            eof: false,
            line: 1,
            special_from: usize::MAX,
            special_at: 0,
            special_to: 0,
            parser,
            parsed: vec![0; 64 * 1024],
            ends: vec![0; 256],
            unescaped: Vec::new(),
            fields: Vec::new(),
            source: Source::Input,
            delimiter: d,
            quote: options.quote,
            escape: options.escape,
            empty_as_null: options.empty_as_null,
            null_values: options
                .null_values
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect(),
            max_record_bytes: options.max_record_bytes.max(1),
            projection: Vec::new(),
            header: Vec::new(),
            has_header_line: options.header,
            done: false,
        };
        if options.header {
            reader.read_header()?;
        } else if options.columns.is_empty() {
            return Err(reader.unreadable(
                "`header = false` but no column names are given: add `columns = [...]` under \
                 [source], or read the export through a `MANIFEST VERBOSE` manifest"
                    .into(),
            ));
        } else {
            reader.fill()?;
            reader.skip_bom();
            reader.header = options
                .columns
                .iter()
                .map(|c| c.trim().to_string())
                .collect();
        }
        reader.project_columns(columns)
    }

    fn skip_bom(&mut self) {
        if self.buf[self.pos..self.end].starts_with(b"\xef\xbb\xbf") {
            self.pos += 3;
        }
    }

    /// The first line names the columns.
    fn read_header(&mut self) -> Result<(), ExportError> {
        self.fill()?;
        self.skip_bom();
        let line = match self.next_fields()? {
            Step::Fields { line } => line,
            Step::Malformed { line, reason } => {
                return Err(self.unreadable(format!(
                    "the header row (line {line}) is malformed: {reason}"
                )))
            }
            // An empty part (e.g. an empty slice of an unload) has no header and no rows.
            Step::End => {
                self.done = true;
                return Ok(());
            }
        };
        let _ = line;
        let data = self.source_bytes();
        self.header = self
            .fields
            .iter()
            .map(|&(s, e)| {
                if (s, e) == RAW_NULL {
                    String::new()
                } else {
                    String::from_utf8_lossy(&data[s..e]).trim().to_string()
                }
            })
            .collect();
        Ok(())
    }

    /// Where each requested column sits among `header`.
    fn project_columns(mut self, columns: &[String]) -> Result<Self, ExportError> {
        if self.done && self.has_header_line {
            return Ok(self); // an empty file: no header to match against, and no rows
        }
        for column in columns {
            let want = column.trim();
            let found = self.header.iter().position(|h| h == want).or_else(|| {
                let lower = want.to_lowercase();
                self.header.iter().position(|h| h.to_lowercase() == lower)
            });
            match found {
                Some(i) => self.projection.push(i),
                None => {
                    return Err(ExportError::MissingColumn {
                        file: self.file.clone(),
                        column: column.clone(),
                        available: if self.has_header_line {
                            self.header.join(",")
                        } else {
                            format!(
                                "{} (named by `source.columns` or the manifest's schema: the \
                                 files have no header line)",
                                self.header.join(",")
                            )
                        },
                    })
                }
            }
        }
        Ok(self)
    }

    fn unreadable(&self, reason: String) -> ExportError {
        ExportError::Unreadable {
            file: self.file.clone(),
            reason,
        }
    }

    fn source_bytes(&self) -> &[u8] {
        match self.source {
            Source::Input => &self.buf,
            Source::Parsed => &self.parsed,
            Source::Unescaped => &self.unescaped,
        }
    }

    /// Make room and read more input; sets `eof` when the input is exhausted.
    fn fill(&mut self) -> Result<(), ExportError> {
        if self.eof {
            return Ok(());
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
            self.special_from = usize::MAX;
        }
        if self.end == self.buf.len() {
            let grown = self.buf.len() * 2;
            self.buf.resize(grown, 0);
        }
        loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.unreadable(format!(
                        "read failed after line {}: {e}",
                        self.line.saturating_sub(1)
                    )))
                }
            }
            return Ok(());
        }
    }

    /// Whether `buf[from..to]` holds a byte that needs the slow path.
    fn has_special(&mut self, from: usize, to: usize) -> bool {
        let cached = self.special_from <= from
            && from <= self.special_at
            && (self.special_at < self.special_to || to <= self.special_to);
        if !cached {
            let hay = &self.buf[from..self.end];
            let found = match self.escape {
                Escape::Quote => memchr(self.quote, hay),
                Escape::Backslash => memchr2(self.quote, b'\\', hay),
            };
            self.special_from = from;
            self.special_to = self.end;
            self.special_at = found.map_or(self.end, |k| from + k);
        }
        self.special_at < to
    }

    /// Split the next record into `fields`.
    fn next_fields(&mut self) -> Result<Step, ExportError> {
        loop {
            let nl = match memchr(b'\n', &self.buf[self.pos..self.end]) {
                Some(k) => Some(self.pos + k),
                None if self.eof => None,
                None => {
                    if self.end - self.pos > self.max_record_bytes {
                        return self.skip_long_line();
                    }
                    self.fill()?;
                    continue;
                }
            };
            let start = self.pos;
            let line_end = nl.unwrap_or(self.end);
            if start == line_end && nl.is_none() {
                return Ok(Step::End);
            }
            if line_end - start > self.max_record_bytes {
                return self.skip_long_line();
            }
            if self.has_special(start, line_end) {
                return match self.escape {
                    Escape::Quote => self.quoted_record(),
                    Escape::Backslash => self.backslash_record(),
                };
            }
            let line = self.line;
            self.pos = nl.map_or(self.end, |n| n + 1);
            self.line += 1;
            let mut stop = line_end;
            if stop > start && self.buf[stop - 1] == b'\r' {
                stop -= 1;
            }
            if stop == start {
                continue; // blank line
            }
            self.fields.clear();
            self.source = Source::Input;
            let mut field_start = start;
            for d in memchr_iter(self.delimiter, &self.buf[start..stop]) {
                self.fields.push((field_start, start + d));
                field_start = start + d + 1;
            }
            self.fields.push((field_start, stop));
            return Ok(Step::Fields { line });
        }
    }

    /// A line longer than `max_record_bytes`: refuse it and go on after its newline.
    fn skip_long_line(&mut self) -> Result<Step, ExportError> {
        let line = self.line;
        loop {
            if let Some(k) = memchr(b'\n', &self.buf[self.pos..self.end]) {
                self.pos += k + 1;
                break;
            }
            self.pos = self.end;
            if self.eof {
                break;
            }
            self.fill()?;
        }
        self.line = line + 1;
        Ok(Step::Malformed {
            line,
            reason: format!(
                "line is longer than {} bytes (max_record_bytes)",
                self.max_record_bytes
            ),
        })
    }

    /// Give up on the record at `pos` (an unterminated quote) and go on with the line after its
    /// first one; those bytes are still buffered, so nothing after the bad line is lost.
    fn resync(&mut self, line: u64) -> Result<Step, ExportError> {
        match memchr(b'\n', &self.buf[self.pos..self.end]) {
            Some(k) => {
                self.pos += k + 1;
                self.line = line + 1;
            }
            None => {
                self.skip_long_line()?;
            }
        }
        Ok(Step::Malformed {
            line,
            reason: format!("unterminated quoted field starting on line {line}"),
        })
    }

    /// One RFC 4180 record through csv_core.
    fn quoted_record(&mut self) -> Result<Step, ExportError> {
        let line = self.line;
        let (len, nends) = loop {
            // Parse from the record start each time more input is needed: records this long
            // are rare and the buffer grows geometrically.
            self.parser.reset();
            let (mut nin, mut nout, mut nends) = (0, 0, 0);
            let complete = loop {
                let (res, i, o, e) = self.parser.read_record(
                    &self.buf[self.pos + nin..self.end],
                    &mut self.parsed[nout..],
                    &mut self.ends[nends..],
                );
                nin += i;
                nout += o;
                nends += e;
                match res {
                    ReadRecordResult::Record => break true,
                    // Only answered for empty input at a record start, which a line with a
                    // quote on it never is; treat it as the end all the same.
                    ReadRecordResult::End => {
                        self.pos = self.end;
                        return Ok(Step::End);
                    }
                    ReadRecordResult::InputEmpty if self.eof => {}
                    ReadRecordResult::InputEmpty => break false,
                    ReadRecordResult::OutputFull => {
                        let grown = self.parsed.len() * 2;
                        self.parsed.resize(grown, 0);
                    }
                    ReadRecordResult::OutputEndsFull => {
                        let grown = self.ends.len() * 2;
                        self.ends.resize(grown, 0);
                    }
                }
            };
            if complete {
                break (nin, nends);
            }
            if self.end - self.pos >= self.max_record_bytes {
                return self.resync(line);
            }
            self.fill()?;
        };
        let raw = &self.buf[self.pos..self.pos + len];
        match check_quoting(raw, self.delimiter, self.quote) {
            Ok(()) => {}
            Err(QuoteError::Unterminated) => return self.resync(line),
            Err(QuoteError::AfterClose { field }) => {
                self.advance(len);
                return Ok(Step::Malformed {
                    line,
                    reason: format!("field {field}: unexpected character after closing quote"),
                });
            }
        }
        let crlf = raw.ends_with(b"\r\n");
        if len > self.max_record_bytes {
            self.advance(len);
            return Ok(Step::Malformed {
                line,
                reason: format!(
                    "record is longer than {} bytes (max_record_bytes)",
                    self.max_record_bytes
                ),
            });
        }
        self.advance(len);
        self.fields.clear();
        self.source = Source::Parsed;
        let mut start = 0;
        for &e in &self.ends[..nends] {
            self.fields.push((start, e));
            start = e;
        }
        if crlf {
            if let Some(last) = self.fields.last_mut() {
                if last.1 > last.0 && self.parsed[last.1 - 1] == b'\r' {
                    last.1 -= 1;
                }
            }
        }
        Ok(Step::Fields { line })
    }

    /// Consume `len` raw bytes of a record, counting its lines.
    fn advance(&mut self, len: usize) {
        let raw = &self.buf[self.pos..self.pos + len];
        self.line += memchr_iter(b'\n', raw).count() as u64;
        self.pos += len;
    }

    /// One record of the backslash dialect.
    fn backslash_record(&mut self) -> Result<Step, ExportError> {
        let line = self.line;
        let len = loop {
            match self.split_backslash() {
                Split::Done { len } => break len,
                Split::NeedMore => {
                    if self.end - self.pos >= self.max_record_bytes {
                        return self.skip_long_line();
                    }
                    self.fill()?;
                }
            }
        };
        self.advance(len);
        self.source = Source::Unescaped;
        Ok(Step::Fields { line })
    }

    /// Split the record at `pos`: `\x` is the byte `x`; a field wrapped in quotes (ADDQUOTES)
    /// may hold `\"` or `""`. A quote that does not close right before a delimiter or the line
    /// end was not ADDQUOTES quoting, so that field is read again as plain text.
    fn split_backslash(&mut self) -> Split {
        let buf = &self.buf[self.pos..self.end];
        let eof = self.eof;
        let (delim, quote) = (self.delimiter, self.quote);
        let out = &mut self.unescaped;
        out.clear();
        self.fields.clear();
        let mut i = 0;
        loop {
            let raw_start = i;
            let out_start = out.len();
            // Returns where the field text ends (before its terminator) and whether the
            // record ends with this field.
            let mut quoted = i < buf.len() && buf[i] == quote;
            let (raw_end, last) = 'field: loop {
                if quoted {
                    let mut j = i + 1;
                    loop {
                        let Some(&b) = buf.get(j) else {
                            if !eof {
                                return Split::NeedMore;
                            }
                            break;
                        };
                        match b {
                            b'\\' => {
                                let Some(&next) = buf.get(j + 1) else {
                                    if !eof {
                                        return Split::NeedMore;
                                    }
                                    break;
                                };
                                out.push(next);
                                j += 2;
                            }
                            b'\n' => break,
                            b if b == quote => {
                                if buf.get(j + 1) == Some(&quote) {
                                    out.push(quote);
                                    j += 2;
                                    continue;
                                }
                                let after = j + 1;
                                match buf.get(after) {
                                    None if !eof => return Split::NeedMore,
                                    None => {
                                        i = after;
                                        break 'field (after, true);
                                    }
                                    Some(&b'\n') => {
                                        i = after + 1;
                                        break 'field (after, true);
                                    }
                                    Some(&b'\r') => match buf.get(after + 1) {
                                        None if !eof => return Split::NeedMore,
                                        None | Some(&b'\n') => {
                                            i = (after + 2).min(buf.len());
                                            break 'field (after, true);
                                        }
                                        Some(_) => break,
                                    },
                                    Some(&b) if b == delim => {
                                        i = after + 1;
                                        break 'field (after, false);
                                    }
                                    Some(_) => break,
                                }
                            }
                            b => {
                                out.push(b);
                                j += 1;
                            }
                        }
                    }
                    // Not ADDQUOTES quoting after all: the quote is text.
                    out.truncate(out_start);
                    quoted = false;
                    continue 'field;
                }
                loop {
                    let Some(&b) = buf.get(i) else {
                        if !eof {
                            return Split::NeedMore;
                        }
                        break 'field (i, true);
                    };
                    match b {
                        b'\\' => {
                            let Some(&next) = buf.get(i + 1) else {
                                if !eof {
                                    return Split::NeedMore;
                                }
                                out.push(b);
                                i += 1;
                                continue;
                            };
                            out.push(next);
                            i += 2;
                        }
                        b'\n' => {
                            i += 1;
                            break 'field (i - 1, true);
                        }
                        b'\r' => match buf.get(i + 1) {
                            None if !eof => return Split::NeedMore,
                            None => {
                                i += 1;
                                break 'field (i - 1, true);
                            }
                            Some(&b'\n') => {
                                i += 2;
                                break 'field (i - 2, true);
                            }
                            Some(_) => {
                                out.push(b);
                                i += 1;
                            }
                        },
                        b if b == delim => {
                            i += 1;
                            break 'field (i - 1, false);
                        }
                        b => {
                            out.push(b);
                            i += 1;
                        }
                    }
                }
            };
            let raw = &buf[raw_start..raw_end];
            if !raw.is_empty() && self.null_values.iter().any(|n| n == raw) {
                self.fields.push(RAW_NULL);
            } else {
                self.fields.push((out_start, out.len()));
            }
            if last {
                return Split::Done { len: i };
            }
        }
    }

    /// Copy the projected fields into `record`; `Some(reason)` when the record is malformed.
    fn project(&self, record: &mut Record) -> Option<String> {
        if self.fields.len() != self.header.len() {
            return Some(format!(
                "expected {} fields ({}), found {}",
                self.header.len(),
                if self.has_header_line {
                    "from the header"
                } else {
                    "one per column name"
                },
                self.fields.len()
            ));
        }
        let data = self.source_bytes();
        // In the backslash dialect NULL markers were matched on the raw text while splitting.
        let match_nulls = self.source != Source::Unescaped;
        for (slot, &col) in record.values.iter_mut().zip(&self.projection) {
            let (s, e) = self.fields[col];
            if (s, e) == RAW_NULL {
                slot.set_null();
                continue;
            }
            let bytes = &data[s..e];
            if bytes.is_empty() && self.empty_as_null
                || match_nulls && self.null_values.iter().any(|n| n == bytes)
            {
                slot.set_null();
                continue;
            }
            match std::str::from_utf8(bytes) {
                Ok(text) => slot.set_text(text),
                Err(_) => {
                    return Some(format!(
                        "field {} ({}) is not valid UTF-8",
                        col + 1,
                        self.header[col]
                    ))
                }
            }
        }
        None
    }
}

impl RecordReader for CsvReader {
    fn next(&mut self, record: &mut Record) -> Result<Next, ExportError> {
        if self.done {
            return Ok(Next::End);
        }
        let n = self.projection.len();
        if record.values.len() != n {
            record.values.truncate(n);
            record.values.resize_with(n, Value::default);
        }
        match self.next_fields()? {
            Step::End => {
                self.done = true;
                Ok(Next::End)
            }
            Step::Malformed { line, reason } => Ok(Next::Malformed { line, reason }),
            Step::Fields { line } => {
                record.line = line;
                Ok(match self.project(record) {
                    None => Next::Record,
                    Some(reason) => Next::Malformed { line, reason },
                })
            }
        }
    }
}

enum QuoteError {
    AfterClose { field: usize },
    Unterminated,
}

/// Check the quoting of one raw record (csv_core accepts anything, we report it).
/// A quote only opens a quoted field at the start of a field; elsewhere it is text.
fn check_quoting(raw: &[u8], delim: u8, quote: u8) -> Result<(), QuoteError> {
    let n = raw.len();
    let mut i = 0;
    let mut field = 1;
    loop {
        if i < n && raw[i] == quote {
            i += 1;
            loop {
                match memchr(quote, &raw[i..]) {
                    None => return Err(QuoteError::Unterminated),
                    Some(k) => i += k + 1,
                }
                if i < n && raw[i] == quote {
                    i += 1; // doubled quote
                } else {
                    break;
                }
            }
            if i == n {
                return Ok(());
            }
            match raw[i] {
                b'\n' => return Ok(()),
                b'\r' if i + 1 == n || raw[i + 1] == b'\n' => return Ok(()),
                b if b == delim => {
                    i += 1;
                    field += 1;
                }
                _ => return Err(QuoteError::AfterClose { field }),
            }
        } else {
            match memchr2(delim, b'\n', &raw[i..]) {
                None => return Ok(()),
                Some(k) => {
                    i += k;
                    if raw[i] == b'\n' {
                        return Ok(());
                    }
                    i += 1;
                    field += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(data: &[u8], columns: &[&str], options: &ReadOptions) -> Vec<String> {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let mut reader = CsvReader::new(
            Box::new(io::Cursor::new(data.to_vec())),
            "t.csv",
            &columns,
            options,
        )
        .unwrap();
        let mut record = Record::default();
        let mut out = Vec::new();
        loop {
            match reader.next(&mut record).unwrap() {
                Next::Record => out.push(format!("{}:{:?}", record.line, record.values)),
                Next::Malformed { line, reason } => out.push(format!("{line}!{reason}")),
                Next::End => return out,
            }
        }
    }

    #[test]
    fn many_generated_rows_parse_without_error() {
        let mut data = String::from("id,name,email,note,score\n");
        for i in 0..100_000 {
            if i % 7 == 0 {
                data.push_str(&format!(
                    "{i},\"Name, {i}\",u{i}@example.com,\"say \"\"hi\"\"\nthere\",{}.5\r\n",
                    i % 100
                ));
            } else {
                data.push_str(&format!("{i},Name {i},u{i}@example.com,,{}.5\n", i % 100));
            }
        }
        let columns: Vec<String> = ["email", "ID", "note"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let mut reader = CsvReader::new(
            Box::new(io::Cursor::new(data.into_bytes())),
            "t.csv",
            &columns,
            &ReadOptions::default(),
        )
        .unwrap();
        let mut record = Record::default();
        let mut rows = 0u64;
        let mut line = 2u64;
        while let Next::Record = reader.next(&mut record).unwrap() {
            assert_eq!(record.line, line);
            assert_eq!(record.values[1], Value::Text(rows.to_string()));
            // Every 7th row has a quoted note spanning two lines.
            let (note, lines) = match rows % 7 {
                0 => (Value::Text("say \"hi\"\nthere".into()), 2),
                _ => (Value::Null, 1),
            };
            assert_eq!(record.values[2], note);
            line += lines;
            rows += 1;
        }
        assert_eq!(rows, 100_000);
    }

    #[test]
    fn records_spanning_buffer_refills_are_kept_whole() {
        // A tiny reader that hands out 7 bytes at a time exercises every refill path.
        struct Trickle(io::Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7);
                self.0.read(&mut buf[..n])
            }
        }
        let data = b"a|b\nx\\|y|\"q\\\"z\"\n1|\"two\nlines\"\n";
        let options = ReadOptions {
            delimiter: b'|',
            escape: Escape::Backslash,
            ..ReadOptions::default()
        };
        let columns = vec!["a".to_string(), "b".to_string()];
        let mut reader = CsvReader::new(
            Box::new(Trickle(io::Cursor::new(data.to_vec()))),
            "t.csv",
            &columns,
            &options,
        )
        .unwrap();
        let mut record = Record::default();
        assert_eq!(reader.next(&mut record).unwrap(), Next::Record);
        assert_eq!(
            record.values,
            [Value::Text("x|y".into()), Value::Text("q\"z".into())]
        );
        // An unescaped newline inside quotes is not ADDQUOTES quoting: the quote is text.
        assert!(matches!(reader.next(&mut record).unwrap(), Next::Record));
        assert_eq!(record.values[1], Value::Text("\"two".into()));
        assert!(matches!(
            reader.next(&mut record).unwrap(),
            Next::Malformed { line: 4, .. }
        ));
        assert_eq!(reader.next(&mut record).unwrap(), Next::End);

        let got = read_all(
            b"a,b\n1,\"x\ny\"\n2,\"\"\"\"\n",
            &["b"],
            &ReadOptions {
                empty_as_null: false,
                ..ReadOptions::default()
            },
        );
        assert_eq!(got, ["2:[Text(\"x\\ny\")]", "4:[Text(\"\\\"\")]"]);
    }

    fn headerless(columns: &[&str]) -> ReadOptions {
        ReadOptions {
            delimiter: b'|',
            header: false,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            ..ReadOptions::default()
        }
    }

    #[test]
    fn headerless_files_are_all_data_with_lines_from_one() {
        // What a Redshift UNLOAD writes by default: pipes, no header, NULL as an empty field.
        let data = b"\xef\xbb\xbfid|email|name\n1|A@x.test|Ann\n\n2|b@x.test|\n3|c@x.test\n4|d@x.test|Dee|more\n5|\"e|x\"|Eve\n";
        let got = read_all(
            data,
            &["EMAIL", "id", "name"],
            &headerless(&["ID", "email", "Name"]),
        );
        assert_eq!(
            got,
            [
                // A first line that looks like a header is data all the same.
                "1:[Text(\"email\"), Text(\"id\"), Text(\"name\")]",
                "2:[Text(\"A@x.test\"), Text(\"1\"), Text(\"Ann\")]",
                "4:[Text(\"b@x.test\"), Text(\"2\"), Null]",
                "5!expected 3 fields (one per column name), found 2",
                "6!expected 3 fields (one per column name), found 4",
                "7:[Text(\"e|x\"), Text(\"5\"), Text(\"Eve\")]",
            ]
        );
        // The backslash dialect (UNLOAD ... ESCAPE) too.
        let options = ReadOptions {
            escape: Escape::Backslash,
            ..headerless(&["id", "email"])
        };
        assert_eq!(
            read_all(b"1|a\\|b\n2|c\n", &["email"], &options),
            ["1:[Text(\"a|b\")]", "2:[Text(\"c\")]"]
        );
        // An empty part has no rows, and still checks the columns.
        assert!(read_all(b"", &["id"], &headerless(&["id"])).is_empty());
    }

    #[test]
    fn headerless_without_names_or_with_a_missing_column_is_refused() {
        let open = |columns: &[&str], options: &ReadOptions| {
            let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
            CsvReader::new(
                Box::new(io::Cursor::new(b"1|a\n".to_vec())),
                "unload/users_0000_part_00",
                &columns,
                options,
            )
            .err()
            .expect("refused")
            .to_string()
        };
        let e = open(&["id"], &headerless(&[]));
        assert!(
            e.contains("unload/users_0000_part_00") && e.contains("add `columns = [...]`"),
            "{e}"
        );
        let e = open(&["id", "plan"], &headerless(&["id", "email"]));
        assert!(
            e.contains("no column `plan`") && e.contains("id,email (named by `source.columns`"),
            "{e}"
        );
    }
}
