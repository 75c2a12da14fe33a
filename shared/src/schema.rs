//! Zendesk's custom field definitions for one object, and the checks a sync config needs
//! against them: every custom mapping names a field that exists, is active and has the type the
//! config declares. The mapper uses the same schema to translate dropdown labels into option
//! values and to refuse values Zendesk would reject or silently drop.

use crate::config::{ConfigError, FieldMapping, SyncConfig, Target};
use crate::fields::{FieldType, Object};
use crate::zendesk::{Client, ZendeskError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One option of a dropdown / tagger / multiselect field (or a system ticket field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldOption {
    /// What agents see (`Enterprise`).
    pub name: String,
    /// What is written and becomes the record's tag (`plan_enterprise`).
    pub value: String,
}

/// One field definition as Zendesk describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldDef {
    pub id: u64,
    /// User and organization fields are written by key; ticket fields have none.
    pub key: Option<String>,
    pub title: String,
    /// Zendesk's type name (`text`, `dropdown`, `tagger`, `subject`, ...).
    #[serde(rename = "type")]
    pub ty: String,
    pub active: bool,
    /// User/org: Zendesk's `system` flag; tickets: not `removable` (subject, status, ...).
    pub system: bool,
    /// `regexp_for_validation` of a regexp field.
    pub regexp: Option<String>,
    pub options: Vec<FieldOption>,
    /// The tag a checkbox adds.
    pub tag: Option<String>,
}

impl FieldDef {
    /// Parse one field object; `None` when it has no usable id.
    pub fn from_value(v: &Value) -> Option<FieldDef> {
        let id = match v.get("id")? {
            Value::Number(n) => n.as_u64()?,
            Value::String(s) => s.trim().parse().ok()?,
            _ => return None,
        };
        let string = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .filter(|s| !s.is_empty())
        };
        let ty = string("type").unwrap_or_else(|| "text".to_string());
        let title = string("title")
            .or_else(|| string("raw_title"))
            .unwrap_or_default();
        let active = v.get("active").and_then(Value::as_bool).unwrap_or(true);
        let system = match v.get("removable").and_then(Value::as_bool) {
            Some(removable) => !removable,
            None => v.get("system").and_then(Value::as_bool).unwrap_or(false),
        };
        let options = ["custom_field_options", "system_field_options"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_array))
            .flatten()
            .filter_map(|o| {
                let text = |k: &str| match o.get(k)? {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                };
                let value = text("value")?;
                let name = text("name")
                    .or_else(|| text("raw_name"))
                    .unwrap_or_else(|| value.clone());
                Some(FieldOption { name, value })
            })
            .collect();
        Some(FieldDef {
            id,
            key: string("key"),
            title,
            ty,
            active,
            system,
            regexp: string("regexp_for_validation"),
            options,
            tag: string("tag"),
        })
    }

    /// `plan` for user/org fields, the id for ticket fields.
    pub fn label(&self) -> String {
        match &self.key {
            Some(k) => k.clone(),
            None => self.id.to_string(),
        }
    }

    /// Whether values are chosen from `options`.
    pub fn has_options(&self) -> bool {
        matches!(&self.ty[..], "dropdown" | "tagger" | "multiselect")
    }
}

/// The field definitions of one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub object: Object,
    pub fields: Vec<FieldDef>,
}

/// The list endpoint and root key of `object`'s field definitions.
pub fn endpoint(object: Object) -> (&'static str, &'static str) {
    match object {
        Object::Users => ("/api/v2/user_fields.json", "user_fields"),
        Object::Organizations => ("/api/v2/organization_fields.json", "organization_fields"),
        Object::Tickets => ("/api/v2/ticket_fields.json", "ticket_fields"),
    }
}

/// Read `object`'s field definitions from Zendesk (every page).
pub async fn fetch(client: &Client, object: Object) -> Result<Schema, ZendeskError> {
    let (path, root) = endpoint(object);
    let values = client.list_all(path, root).await?;
    Ok(Schema::from_values(object, &values))
}

/// A singular noun for messages: "user field", "ticket field".
fn noun(object: Object) -> &'static str {
    match object {
        Object::Users => "user field",
        Object::Organizations => "organization field",
        Object::Tickets => "ticket field",
    }
}

/// The standard mapping key that writes a system ticket field, by its Zendesk type.
pub fn standard_key_of_system_type(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "subject" => "subject",
        "description" => "description",
        "status" | "custom_status" => "status",
        "tickettype" => "type",
        "priority" => "priority",
        "group" => "group_id",
        "assignee" => "assignee_id",
        _ => return None,
    })
}

impl Schema {
    /// Build a schema from field objects as Zendesk returns them. Tolerant: unknown attributes
    /// are ignored, entries without an id are skipped.
    pub fn from_values(object: Object, values: &[Value]) -> Schema {
        Schema {
            object,
            fields: values.iter().filter_map(FieldDef::from_value).collect(),
        }
    }

    /// The user/org field with `key`.
    pub fn by_key(&self, key: &str) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.key.as_deref() == Some(key))
    }

    pub fn by_id(&self, id: u64) -> Option<&FieldDef> {
        self.fields.iter().find(|f| f.id == id)
    }

    /// The field a custom mapping writes; `None` for standard mappings and unknown fields.
    pub fn field_for(&self, target: &Target) -> Option<&FieldDef> {
        match target {
            Target::Standard(_) => None,
            Target::FieldKey(k) => self.by_key(k),
            Target::TicketField(id) => self.by_id(*id),
        }
    }

    /// The custom (mappable) fields, in Zendesk's order.
    pub fn custom_fields(&self) -> impl Iterator<Item = &FieldDef> {
        self.fields
            .iter()
            .filter(move |f| !(self.object == Object::Tickets && f.system))
    }

    /// Check every custom mapping of `cfg` against this schema. All problems are reported
    /// together, each with its mapping key and config line.
    pub fn validate(&self, cfg: &SyncConfig) -> Result<(), ConfigError> {
        let problems: Vec<String> = cfg
            .mapping
            .iter()
            .filter_map(|m| self.check(m).err())
            .collect();
        match problems.len() {
            0 => Ok(()),
            1 => Err(ConfigError::Invalid {
                file: cfg.name.clone(),
                message: problems.into_iter().next().unwrap_or_default(),
            }),
            n => Err(ConfigError::Invalid {
                file: cfg.name.clone(),
                message: format!(
                    "{n} mappings do not match Zendesk's {}s:\n  - {}",
                    noun(self.object),
                    problems.join("\n  - ")
                ),
            }),
        }
    }

    /// Check one mapping; standard mappings always pass.
    pub fn check(&self, m: &FieldMapping) -> Result<(), String> {
        let at = format!("mapping `{}` (line {})", m.field, m.line);
        let noun = noun(self.object);
        let field = match &m.target {
            Target::Standard(_) => return Ok(()),
            Target::FieldKey(key) => match self.by_key(key) {
                Some(f) => f,
                None => {
                    let keys: Vec<&str> = self
                        .custom_fields()
                        .filter(|f| f.active)
                        .filter_map(|f| f.key.as_deref())
                        .collect();
                    let hint = match closest(key, &keys) {
                        Some(k) => format!("did you mean `{k}`? "),
                        None => String::new(),
                    };
                    return Err(format!(
                        "{at}: Zendesk has no {noun} with key `{key}`; {hint}{}",
                        if keys.is_empty() {
                            format!("this account has no active {noun}s")
                        } else {
                            format!("{noun}s are: {}", list_some(&keys, 40))
                        }
                    ));
                }
            },
            Target::TicketField(id) => match self.by_id(*id) {
                Some(f) if f.system => {
                    let std = standard_key_of_system_type(&f.ty)
                        .map(|k| format!("map it with the standard key `{k}`"))
                        .unwrap_or_else(|| "it cannot be written as a custom field".into());
                    return Err(format!(
                        "{at}: ticket field {id} is Zendesk's system field `{}` ({}), not a custom field; {std}",
                        f.title, f.ty
                    ));
                }
                Some(f) => f,
                None => {
                    let fields: Vec<String> = self
                        .custom_fields()
                        .filter(|f| f.active)
                        .map(|f| format!("{} {} ({})", f.id, f.title, f.ty))
                        .collect();
                    return Err(format!(
                        "{at}: Zendesk has no ticket field with id {id}; {}",
                        if fields.is_empty() {
                            "this account has no active custom ticket fields".to_string()
                        } else {
                            format!("custom ticket fields are: {}", list_some(&fields, 40))
                        }
                    ));
                }
            },
        };
        let name = match &field.key {
            Some(k) => format!("`{k}` (\"{}\")", field.title),
            None => format!("{} (\"{}\")", field.id, field.title),
        };
        if !field.active {
            return Err(format!(
                "{at}: {noun} {name} is inactive in Zendesk, which ignores values written to it; reactivate it in Admin Center or remove the mapping"
            ));
        }
        if !type_agrees(m.ty, &field.ty) {
            let suggest = suggested_type(&field.ty)
                .map(|t| format!("; declare `type = \"{t}\"`"))
                .unwrap_or_else(|| {
                    format!(
                        "; zdsync cannot write `{}` fields, remove the mapping",
                        field.ty
                    )
                });
            return Err(format!(
                "{at}: declared as `{}` but Zendesk's {noun} {name} is `{}`{suggest}",
                m.ty.name(),
                field.ty
            ));
        }
        Ok(())
    }
}

/// Whether a config type can write a Zendesk field type.
pub fn type_agrees(declared: FieldType, zendesk: &str) -> bool {
    match declared {
        // Free text fits every text-like field; regexp fields are still checked by pattern.
        FieldType::Text | FieldType::Textarea => {
            matches!(
                zendesk,
                "text" | "textarea" | "regexp" | "partialcreditcard"
            )
        }
        FieldType::Regexp => zendesk == "regexp",
        FieldType::Integer => matches!(zendesk, "integer" | "decimal"),
        FieldType::Decimal => zendesk == "decimal",
        FieldType::Checkbox => zendesk == "checkbox",
        FieldType::Date => zendesk == "date",
        FieldType::Dropdown => matches!(zendesk, "dropdown" | "tagger"),
        FieldType::Multiselect => zendesk == "multiselect",
        FieldType::Lookup => zendesk == "lookup",
        _ => false,
    }
}

/// The config `type` that writes a Zendesk field type.
fn suggested_type(zendesk: &str) -> Option<&'static str> {
    Some(match zendesk {
        "text" | "partialcreditcard" => "text",
        "textarea" => "textarea",
        "regexp" => "regexp",
        "integer" => "integer",
        "decimal" => "decimal",
        "checkbox" => "checkbox",
        "date" => "date",
        "dropdown" => "dropdown",
        "tagger" => "tagger",
        "multiselect" => "multiselect",
        "lookup" => "lookup",
        _ => return None,
    })
}

/// `a, b, c` with at most `max` items and a count of the rest.
fn list_some<S: AsRef<str>>(items: &[S], max: usize) -> String {
    let mut s = items
        .iter()
        .take(max)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > max {
        s.push_str(&format!(" … and {} more", items.len() - max));
    }
    s
}

/// The candidate within a small edit distance of `key`, if exactly one is closest.
fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let limit = (key.chars().count() / 3).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&key.to_lowercase(), &c.to_lowercase());
        if d <= limit && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Damerau-Levenshtein (optimal string alignment) distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn users() -> Schema {
        Schema::from_values(
            Object::Users,
            &[
                json!({"id": 1, "key": "nickname", "type": "text", "title": "Nickname", "active": true, "system": false}),
                json!({"id": 2, "key": "plan", "type": "dropdown", "title": "Plan", "active": true,
                    "custom_field_options": [{"id": 10, "name": "Free", "value": "plan_free"}, {"name": "Pro", "value": "plan_pro"}]}),
                json!({"id": 3, "key": "old", "type": "text", "title": "Old", "active": false}),
                json!({"id": 4, "key": "since", "type": "date", "title": "Since"}),
                json!({"id": "5", "key": "code", "type": "regexp", "title": "Code", "regexp_for_validation": "^[A-Z]+$"}),
                json!({"key": "no_id", "type": "text"}),
            ],
        )
    }

    fn cfg(mapping: &str) -> SyncConfig {
        let text = format!(
            "name = \"t\"\nobject = \"users\"\nmode = \"update\"\nprimary_key = \"id\"\n[source]\nlocation = \"x\"\n[zendesk]\nsubdomain = \"acme\"\n[mapping]\n{mapping}"
        );
        SyncConfig::parse(&text, "t.toml").unwrap()
    }

    #[test]
    fn parses_fields_tolerantly() {
        let s = users();
        assert_eq!(s.fields.len(), 5, "the entry without id is skipped");
        let plan = s.by_key("plan").unwrap();
        assert_eq!(plan.options.len(), 2);
        assert_eq!(plan.options[0].name, "Free");
        assert!(s.by_id(5).is_some());
        assert!(!s.by_key("old").unwrap().active);
        let t = Schema::from_values(
            Object::Tickets,
            &[
                json!({"id": 7, "type": "priority", "title": "Priority", "removable": false,
                    "system_field_options": [{"name": "Low", "value": "low"}]}),
                json!({"id": 8, "type": "tagger", "title": "Category", "removable": true}),
            ],
        );
        assert!(t.fields[0].system && !t.fields[1].system);
        assert_eq!(t.fields[0].options[0].value, "low");
        assert_eq!(t.custom_fields().count(), 1);
    }

    #[test]
    fn validate_reports_unknown_inactive_and_mistyped_fields() {
        let s = users();
        s.validate(&cfg(
            "\"user_fields.plan\" = { column = \"p\", type = \"tagger\" }\n\"user_fields.code\" = \"c\"\nname = \"n\"\n",
        ))
        .unwrap();
        let e = s
            .validate(&cfg("\"user_fields.plna\" = \"p\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mapping `user_fields.plna` (line 10)")
                && e.contains("no user field with key `plna`")
                && e.contains("did you mean `plan`?")
                && e.contains("nickname, plan, since, code"),
            "{e}"
        );
        let e = s
            .validate(&cfg("\"user_fields.old\" = \"o\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("inactive in Zendesk"), "{e}");
        let e = s
            .validate(&cfg(
                "\"user_fields.since\" = { column = \"s\", type = \"checkbox\" }\n",
            ))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`checkbox`") && e.contains("is `date`") && e.contains("type = \"date\""),
            "{e}"
        );
        let e = s
            .validate(&cfg(
                "\"user_fields.plan\" = \"p\"\n\"user_fields.x\" = \"x\"\n",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 mappings") && e.contains("line 11"), "{e}");
    }

    #[test]
    fn type_compatibility() {
        assert!(type_agrees(FieldType::Text, "regexp"));
        assert!(type_agrees(FieldType::Text, "textarea"));
        assert!(type_agrees(FieldType::Dropdown, "tagger"));
        assert!(type_agrees(FieldType::Integer, "decimal"));
        assert!(!type_agrees(FieldType::Decimal, "integer"));
        assert!(!type_agrees(FieldType::Regexp, "text"));
        assert!(!type_agrees(FieldType::Checkbox, "date"));
    }

    #[test]
    fn edit_distance_and_closest() {
        assert_eq!(edit_distance("plna", "plan"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(closest("sinec", &["since", "plan"]), Some("since"));
        assert_eq!(closest("zzz", &["since", "plan"]), None);
    }
}
