//! JSON Lines (BigQuery and Snowflake JSON unloads): one object per line.
//!
//! Each line is parsed into a flat list of borrowed `(key, raw value)` pairs, so values keep the
//! exact text the warehouse wrote: BigQuery's INT64-as-string, big integers and decimals are
//! never routed through an f64.

use super::{ExportError, Next, Record, RecordReader, Value};
use memchr::memchr;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::io::{self, Read};

const INPUT_BUFFER: usize = 256 * 1024;
const MAX_LINE: usize = 64 * 1024 * 1024;

pub(crate) struct JsonlReader {
    input: Box<dyn Read + Send>,
    file: String,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Line number of `buf[pos]`.
    line: u64,
    columns: Vec<String>,
    started: bool,
}

impl JsonlReader {
    pub(crate) fn new(input: Box<dyn Read + Send>, file: &str, columns: &[String]) -> Self {
        Self {
            input,
            file: file.to_string(),
            buf: vec![0; INPUT_BUFFER],
            pos: 0,
            end: 0,
            eof: false,
            line: 1,
            columns: columns.to_vec(),
            started: false,
        }
    }

    fn fill(&mut self) -> Result<(), ExportError> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
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
                    return Err(ExportError::Unreadable {
                        file: self.file.clone(),
                        reason: format!(
                            "read failed after line {}: {e}",
                            self.line.saturating_sub(1)
                        ),
                    })
                }
            }
            return Ok(());
        }
    }

    /// Skip the rest of a line too long to buffer.
    fn skip_line(&mut self) -> Result<(), ExportError> {
        loop {
            if let Some(k) = memchr(b'\n', &self.buf[self.pos..self.end]) {
                self.pos += k + 1;
                return Ok(());
            }
            self.pos = self.end;
            if self.eof {
                return Ok(());
            }
            self.fill()?;
        }
    }
}

impl RecordReader for JsonlReader {
    fn next(&mut self, record: &mut Record) -> Result<Next, ExportError> {
        let n = self.columns.len();
        if record.values.len() != n {
            record.values.truncate(n);
            record.values.resize_with(n, Value::default);
        }
        loop {
            if !self.started && (self.end - self.pos >= 3 || self.eof) {
                self.started = true;
                if self.buf[self.pos..self.end].starts_with(b"\xef\xbb\xbf") {
                    self.pos += 3;
                }
            }
            let nl = match memchr(b'\n', &self.buf[self.pos..self.end]) {
                Some(k) => self.pos + k,
                None if self.eof && self.pos == self.end => return Ok(Next::End),
                None if self.eof => self.end,
                None => {
                    if self.end - self.pos > MAX_LINE {
                        let line = self.line;
                        self.skip_line()?;
                        self.line += 1;
                        return Ok(Next::Malformed {
                            line,
                            reason: format!("line is longer than {} MiB", MAX_LINE >> 20),
                        });
                    }
                    self.fill()?;
                    continue;
                }
            };
            let line = self.line;
            let bytes = &self.buf[self.pos..nl];
            self.pos = (nl + 1).min(self.end);
            self.line += 1;
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            record.line = line;
            return Ok(match parse_line(bytes, &self.columns, &mut record.values) {
                Ok(()) => Next::Record,
                Err(reason) => Next::Malformed { line, reason },
            });
        }
    }
}

/// Parse one line and copy the requested paths into `values`.
fn parse_line(bytes: &[u8], columns: &[String], values: &mut [Value]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("line is not valid UTF-8 (at byte {})", e.valid_up_to() + 1))?;
    let trimmed = text.trim_start();
    match trimmed.as_bytes().first() {
        Some(b'{') => {}
        Some(b'[') => return Err("expected a JSON object, found an array".into()),
        Some(b'"') => return Err("expected a JSON object, found a string".into()),
        _ => {
            // Let the parser say what is wrong (a number, a literal or garbage).
            if let Err(e) = serde_json::from_str::<&RawValue>(text) {
                return Err(json_error(&e));
            }
            return Err("expected a JSON object".into());
        }
    }
    let object: Object = serde_json::from_str(text).map_err(|e| json_error(&e))?;
    for (slot, path) in values.iter_mut().zip(columns) {
        match lookup(&object.0, path).map_err(|e| json_error(&e))? {
            Some(raw) => set_value(slot, raw).map_err(|e| json_error(&e))?,
            None => slot.set_null(),
        }
    }
    Ok(())
}

fn json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => &message,
    };
    format!("invalid JSON: {message} at column {}", e.column())
}

/// The members of a JSON object, borrowed from the line where possible.
struct Object<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

/// An object key or string value, borrowed unless it has escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Object<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Object<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Object<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some(key) = map.next_key::<Text<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    members.push((key.0, value));
                }
                Ok(Object(members))
            }
        }
        d.deserialize_map(V)
    }
}

fn find_key<'a>(members: &[(Cow<'a, str>, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
    members
        .iter()
        .find(|(k, _)| k == key)
        .or_else(|| members.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)))
        .or_else(|| {
            // Non-ASCII keys: full Unicode case folding, only when ASCII folding found nothing.
            if key.is_ascii() {
                return None;
            }
            let lower = key.to_lowercase();
            members.iter().find(|(k, _)| k.to_lowercase() == lower)
        })
        .map(|(_, v)| *v)
}

/// Find a dotted path: the whole remaining path as one key first (keys may contain dots), then
/// each split into a key and a path inside that key's object.
fn lookup<'a>(
    members: &[(Cow<'a, str>, &'a RawValue)],
    path: &str,
) -> Result<Option<&'a RawValue>, serde_json::Error> {
    if let Some(v) = find_key(members, path) {
        return Ok(Some(v));
    }
    for (i, _) in path.match_indices('.') {
        let (head, tail) = (&path[..i], &path[i + 1..]);
        let Some(child) = find_key(members, head) else {
            continue;
        };
        let json: &'a str = child.get();
        if !json.starts_with('{') {
            continue;
        }
        let nested: Object<'a> = serde_json::from_str(json)?;
        if let Some(v) = lookup(&nested.0, tail)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Convert one JSON value: scalars keep their literal text; an array of scalars is a list;
/// objects and arrays of objects stay compact JSON text.
fn set_value(slot: &mut Value, raw: &RawValue) -> Result<(), serde_json::Error> {
    let json = raw.get().trim();
    match json.as_bytes().first() {
        None | Some(b'n') => slot.set_null(),
        Some(b'"') => set_string(slot, json)?,
        Some(b'{') => compact_into(slot, json),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(json)?;
            let nested = items
                .iter()
                .any(|i| matches!(i.get().trim_start().as_bytes().first(), Some(b'{' | b'[')));
            if nested {
                compact_into(slot, json);
                return Ok(());
            }
            if !matches!(slot, Value::List(_)) {
                *slot = Value::List(Vec::with_capacity(items.len()));
            }
            if let Value::List(list) = slot {
                list.clear();
                for item in items {
                    let item = item.get().trim();
                    match item.as_bytes().first() {
                        None | Some(b'n') => {}
                        Some(b'"') => list.push(unquote(item)?.into_owned()),
                        _ => list.push(item.to_string()),
                    }
                }
            }
        }
        // Numbers and booleans: their JSON text, digits untouched.
        Some(_) => slot.set_text(json),
    }
    Ok(())
}

fn unquote(json: &str) -> Result<Cow<'_, str>, serde_json::Error> {
    if !json.contains('\\') && json.len() >= 2 {
        return Ok(Cow::Borrowed(&json[1..json.len() - 1]));
    }
    Ok(serde_json::from_str::<Text>(json)?.0)
}

fn set_string(slot: &mut Value, json: &str) -> Result<(), serde_json::Error> {
    slot.set_text(&unquote(json)?);
    Ok(())
}

/// Write `json` without insignificant whitespace into `slot`'s text buffer.
fn compact_into(slot: &mut Value, json: &str) {
    slot.set_text("");
    let Value::Text(out) = slot else {
        return;
    };
    out.reserve(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str, columns: &[&str]) -> Result<Vec<Value>, String> {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let mut values = vec![Value::Null; columns.len()];
        parse_line(line.as_bytes(), &columns, &mut values).map(|()| values)
    }

    #[test]
    fn paths_values_and_errors() {
        let v = one(
            r#"{"a.b": 1, "A": {"b": 2, "C": {"d": "x\ty"}}, "n": null, "o": { "k" : [1, "s p"] }}"#,
            &["a.b", "a.c.d", "N", "o", "missing", "a.missing"],
        )
        .unwrap();
        assert_eq!(
            v,
            [
                Value::Text("1".into()),
                Value::Text("x\ty".into()),
                Value::Null,
                Value::Text(r#"{"k":[1,"s p"]}"#.into()),
                Value::Null,
                Value::Null,
            ]
        );
        assert_eq!(
            one(r#"{"a": 1 "b": 2}"#, &["a"]).unwrap_err(),
            "invalid JSON: expected `,` or `}` at column 9"
        );
        assert_eq!(
            one("[1]", &["a"]).unwrap_err(),
            "expected a JSON object, found an array"
        );
        assert!(one("42", &["a"])
            .unwrap_err()
            .starts_with("expected a JSON object"));
        assert!(one("nope", &["a"]).unwrap_err().starts_with("invalid JSON"));
    }
}
