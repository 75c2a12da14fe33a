//! Resolve an export location to its part files: a Redshift UNLOAD manifest, one object, or a
//! prefix of parts. A manifest written with `MANIFEST VERBOSE` also names the columns
//! (`schema.elements[].name`), which is what a headerless unload needs.

use super::ExportError;
use crate::store::{ObjectMeta, ObjectStore};
use serde::Deserialize;
use std::io::{self, Read};

/// Manifests are small (one entry per slice); refuse to load anything absurd.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// How much of an unnamed JSON object is looked at before reading it as a manifest.
const PEEK_BYTES: u64 = 64 * 1024;
/// A manifest schema naming more columns than this is not used (a Redshift table has at most
/// 1,600).
const MAX_SCHEMA_COLUMNS: usize = 10_000;
/// Nor one with a column name longer than this (Redshift names are at most 127 bytes).
const MAX_COLUMN_NAME_BYTES: usize = 1024;

#[derive(Deserialize)]
struct Manifest {
    entries: Option<Vec<Entry>>,
    /// `MANIFEST VERBOSE` only; any shape is tolerated (see [`schema_columns`]).
    #[serde(default)]
    schema: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Entry {
    url: Option<String>,
    #[serde(default)]
    mandatory: bool,
}

/// An export location, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The part files, in reading order.
    pub parts: Vec<ObjectMeta>,
    /// The manifest the parts were listed in, when the location is one.
    pub manifest: Option<String>,
    /// The column names a `MANIFEST VERBOSE` manifest declares (`schema.elements[].name`), in
    /// file order; `None` without a manifest, without a schema, or with one that does not name
    /// every column.
    pub columns: Option<Vec<String>>,
}

impl Export {
    fn parts(parts: Vec<ObjectMeta>) -> Self {
        Self {
            parts,
            manifest: None,
            columns: None,
        }
    }
}

/// The part files of the export at `location`, in reading order.
pub fn resolve(store: &dyn ObjectStore, location: &str) -> Result<Vec<ObjectMeta>, ExportError> {
    resolve_export(store, location).map(|e| e.parts)
}

/// The export at `location`: its part files in reading order, and the manifest's column names.
pub fn resolve_export(store: &dyn ObjectStore, location: &str) -> Result<Export, ExportError> {
    let io_error = |e: io::Error| ExportError::Unreadable {
        file: location.to_string(),
        reason: e.to_string(),
    };
    if !location.is_empty() && !location.ends_with('/') {
        if let Some(meta) = store.head(location).map_err(io_error)? {
            if is_manifest_name(&meta.key) {
                let bytes = read_limited(store, &meta.key, MAX_MANIFEST_BYTES)?;
                return from_manifest(store, &meta.key, &bytes);
            }
            if let Some(bytes) = looks_like_manifest(store, &meta)? {
                // Only an object that parses as a manifest is one; anything else is data.
                if let Ok(export) = from_manifest(store, &meta.key, &bytes) {
                    return Ok(export);
                }
            }
            return Ok(Export::parts(vec![meta]));
        }
    }
    // A folder-like location (`exports/users`) means its contents, not siblings that share the
    // stem (`exports/users_old/`); a stem (`exports/users/part_`) still works as a prefix.
    let mut listed = Vec::new();
    if !location.is_empty() && !location.ends_with('/') {
        listed = parts(store.list(&format!("{location}/")).map_err(io_error)?);
    }
    if listed.is_empty() {
        listed = parts(store.list(location).map_err(io_error)?);
    }
    if listed.is_empty() {
        let hint = if location.contains("://") {
            "locations are keys relative to the store root, not URLs (drop the `s3://bucket/` part)"
        } else if store.list(location).map_err(io_error)?.is_empty() {
            "no object or prefix matches; keys are relative to the store root"
        } else {
            "only empty objects, markers (`_SUCCESS`, `.crc`) or manifests match the prefix"
        };
        return Err(ExportError::NotFound {
            location: location.to_string(),
            hint: format!("{hint}; looked in {}", store.describe()),
        });
    }
    Ok(Export::parts(listed))
}

/// Data parts of a listing: no empty objects, markers, checksums or manifests.
fn parts(mut listed: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
    listed.retain(|o| {
        let name = o.key.rsplit('/').next().unwrap_or(&o.key);
        o.size > 0
            && !name.starts_with('_')
            && !name.starts_with('.')
            && !name.ends_with(".crc")
            && !is_manifest_name(name)
    });
    listed.sort_by(|a, b| a.key.cmp(&b.key));
    listed
}

fn is_manifest_name(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key).to_ascii_lowercase();
    name.ends_with("manifest") || name.ends_with("manifest.json")
}

fn read_limited(store: &dyn ObjectStore, key: &str, limit: u64) -> Result<Vec<u8>, ExportError> {
    let mut bytes = Vec::new();
    store
        .open(key)
        .and_then(|r| r.take(limit).read_to_end(&mut bytes))
        .map_err(|e| ExportError::Unreadable {
            file: key.to_string(),
            reason: e.to_string(),
        })?;
    Ok(bytes)
}

/// The whole object when it starts like a manifest (`{` and an `"entries"` key early on).
fn looks_like_manifest(
    store: &dyn ObjectStore,
    meta: &ObjectMeta,
) -> Result<Option<Vec<u8>>, ExportError> {
    if meta.size > MAX_MANIFEST_BYTES {
        return Ok(None);
    }
    let head = read_limited(store, &meta.key, PEEK_BYTES)?;
    let first = head.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') || memchr::memmem::find(&head, b"\"entries\"").is_none() {
        return Ok(None);
    }
    if meta.size <= PEEK_BYTES {
        return Ok(Some(head));
    }
    read_limited(store, &meta.key, MAX_MANIFEST_BYTES).map(Some)
}

fn from_manifest(
    store: &dyn ObjectStore,
    manifest: &str,
    bytes: &[u8],
) -> Result<Export, ExportError> {
    let bad = |reason: String| ExportError::BadManifest {
        file: manifest.to_string(),
        reason,
    };
    let parsed: Manifest =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid manifest JSON: {e}")))?;
    let entries = parsed
        .entries
        .ok_or_else(|| bad("it has no `entries` array".into()))?;
    if entries.is_empty() {
        return Err(bad("its `entries` array is empty".into()));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let url = entry
            .url
            .as_deref()
            .ok_or_else(|| bad(format!("entry {} has no `url`", i + 1)))?;
        let key = url_to_key(url);
        let found = store.head(key).map_err(|e| ExportError::Unreadable {
            file: key.to_string(),
            reason: e.to_string(),
        })?;
        match found {
            Some(meta) => out.push(meta),
            None if entry.mandatory => {
                return Err(ExportError::NotFound {
                    location: url.to_string(),
                    hint: format!(
                        "manifest `{manifest}` lists it as mandatory, \
                         but key `{key}` does not exist"
                    ),
                })
            }
            None => {}
        }
    }
    Ok(Export {
        parts: out,
        manifest: Some(manifest.to_string()),
        columns: parsed.schema.as_ref().and_then(schema_columns),
    })
}

/// `{"elements": [{"name": "id", "type": {"base": "integer"}}, ...]}` → `["id", ...]`; `None`
/// when an element has no usable name (the schema then names no columns at all).
fn schema_columns(schema: &serde_json::Value) -> Option<Vec<String>> {
    let elements = schema.get("elements")?.as_array()?;
    if elements.is_empty() || elements.len() > MAX_SCHEMA_COLUMNS {
        return None;
    }
    elements
        .iter()
        .map(|e| {
            let name = e.get("name")?.as_str()?.trim();
            (!name.is_empty() && name.len() <= MAX_COLUMN_NAME_BYTES).then(|| name.to_string())
        })
        .collect()
}

/// `s3://bucket/unload/part_0000.gz` is the key `unload/part_0000.gz`; a bare key stays as is.
fn url_to_key(url: &str) -> &str {
    match url.split_once("://") {
        Some((_, rest)) => rest.split_once('/').map_or("", |(_, key)| key),
        None => url,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_names() {
        assert_eq!(
            url_to_key("s3://bucket/unload/part_0000.gz"),
            "unload/part_0000.gz"
        );
        assert_eq!(url_to_key("unload/part_0000.gz"), "unload/part_0000.gz");
        assert!(is_manifest_name("unload/manifest"));
        assert!(is_manifest_name("unload/users.manifest"));
        assert!(is_manifest_name("unload/users_manifest.json"));
        assert!(!is_manifest_name("unload/part_0000.gz"));
    }

    fn store() -> (tempfile::TempDir, crate::store::LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::LocalStore::new(dir.path());
        (dir, store)
    }

    /// The shape Redshift writes for `UNLOAD ... MANIFEST VERBOSE`.
    const VERBOSE: &str = r#"{
      "entries": [
        {"url": "s3://bucket/unload/users_0000_part_00.gz", "meta": {"content_length": 40, "record_count": 2}},
        {"url": "s3://bucket/unload/users_0001_part_00.gz", "meta": {"content_length": 20, "record_count": 1}}
      ],
      "schema": {
        "elements": [
          {"name": "id", "type": {"base": "integer"}},
          {"name": "email", "type": {"base": "character varying", "max_length": 256}},
          {"name": "lifetime_value", "type": {"base": "numeric", "precision": 12, "scale": 2}}
        ]
      },
      "meta": {"content_length": 60, "record_count": 3},
      "author": {"name": "Amazon Redshift", "version": "1.0.0"}
    }"#;

    #[test]
    fn a_verbose_manifest_names_its_columns() {
        let (_dir, store) = store();
        store.put("unload/users_0000_part_00.gz", b"x").unwrap();
        store.put("unload/users_0001_part_00.gz", b"x").unwrap();
        store
            .put("unload/users_manifest", VERBOSE.as_bytes())
            .unwrap();
        let export = resolve_export(&store, "unload/users_manifest").unwrap();
        assert_eq!(export.parts.len(), 2);
        assert_eq!(export.manifest.as_deref(), Some("unload/users_manifest"));
        assert_eq!(export.columns.unwrap(), ["id", "email", "lifetime_value"]);
        // Found by content under another name too.
        store.put("unload/users.json", VERBOSE.as_bytes()).unwrap();
        let export = resolve_export(&store, "unload/users.json").unwrap();
        assert_eq!(export.manifest.as_deref(), Some("unload/users.json"));
        assert_eq!(export.columns.map(|c| c.len()), Some(3));
        // A prefix has no manifest and no names.
        let export = resolve_export(&store, "unload/users_0").unwrap();
        assert_eq!(
            (export.parts.len(), export.manifest, export.columns),
            (2, None, None)
        );
    }

    #[test]
    fn a_manifest_without_a_usable_schema_still_lists_its_parts() {
        let (_dir, store) = store();
        store.put("unload/users_0000_part_00.gz", b"x").unwrap();
        store.put("unload/users_0001_part_00.gz", b"x").unwrap();
        let plain = r#"{"entries": [{"url": "s3://bucket/unload/users_0000_part_00.gz", "mandatory": true}]}"#;
        let nameless = VERBOSE.replace(r#"{"name": "email", "#, r#"{"#);
        let blank = VERBOSE.replace(r#""name": "email""#, r#""name": " ""#);
        let odd = VERBOSE.replace(r#""schema": {"#, r#""schema": "columns", "x": {"#);
        let empty =
            r#"{"entries": [{"url": "unload/users_0000_part_00.gz"}], "schema": {"elements": []}}"#;
        let huge = format!(
            r#"{{"entries": [{{"url": "unload/users_0000_part_00.gz"}}], "schema": {{"elements": [{}]}}}}"#,
            vec![r#"{"name": "c"}"#; MAX_SCHEMA_COLUMNS + 1].join(",")
        );
        for body in [plain, &nameless, &blank, &odd, empty, &huge] {
            store.put("unload/manifest", body.as_bytes()).unwrap();
            let export = resolve_export(&store, "unload/manifest").unwrap();
            assert!(!export.parts.is_empty());
            assert_eq!(export.manifest.as_deref(), Some("unload/manifest"));
            assert_eq!(export.columns, None, "{}", &body[..body.len().min(200)]);
        }
    }
}
