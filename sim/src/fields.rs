//! Custom field definitions (`user_fields`, `organization_fields`, `ticket_fields`) and the
//! validation of written values by field type.

use crate::config::{Behavior, DateReadback, InvalidDropdown};
use crate::util::as_id;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The fixture shape: the three lists as Zendesk returns them (unknown keys are ignored, so a
/// dump of a real account's field endpoints loads as is).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FieldsFixture {
    pub user_fields: Vec<FieldDef>,
    pub organization_fields: Vec<FieldDef>,
    pub ticket_fields: Vec<FieldDef>,
}

impl FieldsFixture {
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
        } else {
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct FieldDef {
    pub id: Option<u64>,
    /// User and organization fields are written by key; ticket fields have none.
    pub key: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub description: String,
    pub active: bool,
    pub position: Option<u32>,
    pub regexp_for_validation: Option<String>,
    pub tag: Option<String>,
    pub custom_field_options: Vec<FieldOption>,
    pub relationship_target_type: Option<String>,
    /// Ticket fields: required to solve.
    pub required: bool,
}

impl Default for FieldDef {
    fn default() -> Self {
        Self {
            id: None,
            key: None,
            kind: "text".into(),
            title: String::new(),
            description: String::new(),
            active: true,
            position: None,
            regexp_for_validation: None,
            tag: None,
            custom_field_options: Vec::new(),
            relationship_target_type: None,
            required: false,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FieldOption {
    pub id: Option<u64>,
    pub name: String,
    pub value: String,
    pub position: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    User,
    Organization,
    Ticket,
}

impl Target {
    pub fn root(self) -> &'static str {
        match self {
            Target::User => "user_fields",
            Target::Organization => "organization_fields",
            Target::Ticket => "ticket_fields",
        }
    }
}

const SYSTEM_TICKET_TYPES: &[&str] = &[
    "subject",
    "description",
    "status",
    "tickettype",
    "priority",
    "group",
    "assignee",
];

#[derive(Debug)]
pub struct Field {
    pub def: FieldDef,
    pub system: bool,
    regex: Option<Regex>,
}

impl Field {
    pub fn id(&self) -> u64 {
        self.def.id.unwrap_or(0)
    }
}

/// A value that does not fit its field.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub key: String,
    pub title: String,
    pub field_id: u64,
    pub field_type: &'static str,
}

impl FieldError {
    pub fn description(&self) -> String {
        format!("{} is not valid", self.title)
    }
}

/// Record lookups a `lookup` field needs: (target type, id) -> exists.
pub type Exists<'a> = &'a dyn Fn(&str, u64) -> bool;

#[derive(Debug, Default)]
pub struct FieldSet {
    pub user: Vec<Field>,
    pub organization: Vec<Field>,
    pub ticket: Vec<Field>,
    user_keys: HashMap<String, usize>,
    org_keys: HashMap<String, usize>,
    ticket_ids: HashMap<u64, usize>,
    pub created_at: String,
}

impl FieldSet {
    pub fn build(fixture: FieldsFixture, created_at: String) -> Result<Self, String> {
        let mut next_id: u64 = 360_000_000_001;
        let mut next_opt: u64 = 370_000_000_001;
        let mut assign = |defs: Vec<FieldDef>, target: Target| -> Result<Vec<Field>, String> {
            let mut out = Vec::new();
            for (pos, mut d) in defs.into_iter().enumerate() {
                if d.id.is_none() {
                    d.id = Some(next_id);
                    next_id += 1;
                }
                if d.position.is_none() {
                    d.position = Some(pos as u32);
                }
                if target != Target::Ticket && d.key.as_deref().is_none_or(str::is_empty) {
                    return Err(format!("{} field {:?} has no key", target.root(), d.title));
                }
                for (i, o) in d.custom_field_options.iter_mut().enumerate() {
                    if o.id.is_none() {
                        o.id = Some(next_opt);
                        next_opt += 1;
                    }
                    if o.position.is_none() {
                        o.position = Some(i as u32);
                    }
                }
                let regex = match (&d.kind[..], &d.regexp_for_validation) {
                    ("regexp", Some(p)) => Some(
                        Regex::new(p)
                            .map_err(|e| format!("field {:?}: bad regexp: {e}", d.title))?,
                    ),
                    _ => None,
                };
                let system = target == Target::Ticket && SYSTEM_TICKET_TYPES.contains(&&d.kind[..]);
                out.push(Field {
                    def: d,
                    system,
                    regex,
                });
            }
            Ok(out)
        };
        let user = assign(fixture.user_fields, Target::User)?;
        let organization = assign(fixture.organization_fields, Target::Organization)?;
        let mut ticket_defs = fixture.ticket_fields;
        if !ticket_defs.iter().any(|d| d.kind == "subject") {
            let mut sys = system_ticket_fields();
            sys.extend(ticket_defs);
            ticket_defs = sys;
        }
        let ticket = assign(ticket_defs, Target::Ticket)?;
        let index_keys = |fs: &[Field]| {
            fs.iter()
                .enumerate()
                .filter_map(|(i, f)| f.def.key.clone().map(|k| (k, i)))
                .collect::<HashMap<_, _>>()
        };
        Ok(Self {
            user_keys: index_keys(&user),
            org_keys: index_keys(&organization),
            ticket_ids: ticket
                .iter()
                .enumerate()
                .map(|(i, f)| (f.id(), i))
                .collect(),
            user,
            organization,
            ticket,
            created_at,
        })
    }

    pub fn list(&self, target: Target) -> &[Field] {
        match target {
            Target::User => &self.user,
            Target::Organization => &self.organization,
            Target::Ticket => &self.ticket,
        }
    }

    pub fn by_key(&self, target: Target, key: &str) -> Option<&Field> {
        let idx = match target {
            Target::User => self.user_keys.get(key),
            Target::Organization => self.org_keys.get(key),
            Target::Ticket => None,
        }?;
        self.list(target).get(*idx)
    }

    pub fn ticket_field(&self, id: u64) -> Option<&Field> {
        self.ticket_ids.get(&id).map(|i| &self.ticket[*i])
    }

    /// The field for a `/{kind}/{id or key}` path segment.
    pub fn find(&self, target: Target, id_or_key: &str) -> Option<&Field> {
        if let Ok(id) = id_or_key.parse::<u64>() {
            if let Some(f) = self.list(target).iter().find(|f| f.id() == id) {
                return Some(f);
            }
        }
        if target == Target::Ticket {
            return None;
        }
        self.by_key(target, id_or_key)
    }

    /// Empty values for every active user / organization field, as Zendesk shows them.
    pub fn blank_values(&self, target: Target) -> Map<String, Value> {
        self.list(target)
            .iter()
            .filter(|f| f.def.active)
            .filter_map(|f| f.def.key.clone().map(|k| (k, Value::Null)))
            .collect()
    }

    pub fn render(&self, f: &Field, target: Target, base: &str) -> Value {
        let d = &f.def;
        let url = format!("{base}/api/v2/{}/{}.json", target.root(), f.id());
        let opts: Vec<Value> = d
            .custom_field_options
            .iter()
            .map(|o| {
                let oid = o.id.unwrap_or(0);
                json!({
                    "id": oid,
                    "name": o.name,
                    "raw_name": o.name,
                    "value": o.value,
                    "position": o.position,
                    "url": format!("{base}/api/v2/{}/{}/options/{oid}.json", target.root(), f.id()),
                })
            })
            .collect();
        let mut m = Map::new();
        m.insert("id".into(), json!(f.id()));
        m.insert("url".into(), json!(url));
        if target != Target::Ticket {
            m.insert("key".into(), json!(d.key));
        }
        m.insert("type".into(), json!(d.kind));
        m.insert("title".into(), json!(d.title));
        m.insert("raw_title".into(), json!(d.title));
        m.insert("description".into(), json!(d.description));
        m.insert("raw_description".into(), json!(d.description));
        m.insert("position".into(), json!(d.position));
        m.insert("active".into(), json!(d.active));
        m.insert(
            "regexp_for_validation".into(),
            json!(d.regexp_for_validation),
        );
        m.insert("created_at".into(), json!(self.created_at));
        m.insert("updated_at".into(), json!(self.created_at));
        if target == Target::Ticket {
            m.insert("required".into(), json!(d.required));
            m.insert("removable".into(), json!(!f.system));
            m.insert("agent_can_edit".into(), json!(true));
            m.insert(
                "visible_in_portal".into(),
                json!(!f.system || d.kind == "subject"),
            );
            if d.kind == "checkbox" {
                m.insert("tag".into(), json!(d.tag));
            }
            if matches!(&d.kind[..], "tagger" | "multiselect") {
                m.insert("custom_field_options".into(), Value::Array(opts));
            }
            if let Some(s) = system_options(&d.kind) {
                m.insert("system_field_options".into(), s);
            }
        } else {
            m.insert("system".into(), json!(false));
            if d.kind == "checkbox" {
                m.insert("tag".into(), json!(d.tag));
            }
            if matches!(&d.kind[..], "dropdown" | "multiselect") {
                m.insert("custom_field_options".into(), Value::Array(opts));
            }
        }
        if d.kind == "lookup" {
            m.insert(
                "relationship_target_type".into(),
                json!(d.relationship_target_type),
            );
            m.insert("relationship_filter".into(), json!({}));
        }
        Value::Object(m)
    }

    pub fn render_option(&self, f: &Field, target: Target, o: &FieldOption, base: &str) -> Value {
        let oid = o.id.unwrap_or(0);
        json!({
            "id": oid,
            "name": o.name,
            "raw_name": o.name,
            "value": o.value,
            "position": o.position,
            "url": format!("{base}/api/v2/{}/{}/options/{oid}.json", target.root(), f.id()),
        })
    }

    /// Checks `value` against `field`. `Ok(None)` means "drop silently" (an unknown dropdown
    /// value when `invalid_dropdown = drop`); `Ok(Some(v))` is the value to store.
    pub fn validate(
        &self,
        field: &Field,
        target: Target,
        value: &Value,
        behavior: &Behavior,
        exists: Exists<'_>,
    ) -> Result<Option<Value>, FieldError> {
        if value.is_null() {
            return Ok(Some(Value::Null));
        }
        let d = &field.def;
        let err = || FieldError {
            key: d.key.clone().unwrap_or_else(|| field.id().to_string()),
            title: d.title.clone(),
            field_id: field.id(),
            field_type: type_label(&d.kind),
        };
        let is_ticket = target == Target::Ticket;
        let option_values = || d.custom_field_options.iter().map(|o| o.value.as_str());
        let stored = match &d.kind[..] {
            "text" | "textarea" => match value {
                Value::String(s) => json!(s),
                Value::Number(n) => json!(n.to_string()),
                _ => return Err(err()),
            },
            "checkbox" => match value {
                Value::Bool(b) => json!(b),
                _ => return Err(err()),
            },
            "date" => {
                let s = value.as_str().ok_or_else(err)?;
                if s.len() != 10 || chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_err() {
                    return Err(err());
                }
                match (behavior.date_readback, target) {
                    (DateReadback::AsSent, _) | (_, Target::Ticket) => json!(s),
                    (DateReadback::Zendesk, Target::User) => json!(format!("{s}T00:00:00Z")),
                    (DateReadback::Zendesk, Target::Organization) => {
                        json!(format!("{s}T00:00:00+00:00"))
                    }
                }
            }
            "integer" => {
                let n: i64 = match value {
                    Value::Number(n) => n.as_i64().ok_or_else(err)?,
                    Value::String(s) => s.trim().parse().map_err(|_| err())?,
                    _ => return Err(err()),
                };
                if is_ticket {
                    json!(n.to_string())
                } else {
                    json!(n)
                }
            }
            "decimal" => {
                let n: f64 = match value {
                    Value::Number(n) => n.as_f64().ok_or_else(err)?,
                    Value::String(s) => s.trim().parse().map_err(|_| err())?,
                    _ => return Err(err()),
                };
                if !n.is_finite() {
                    return Err(err());
                }
                if is_ticket {
                    match value {
                        Value::String(s) => json!(s.trim()),
                        _ => json!(n.to_string()),
                    }
                } else {
                    json!(n)
                }
            }
            "regexp" => {
                let s = value.as_str().ok_or_else(err)?;
                if field.regex.as_ref().is_some_and(|r| !r.is_match(s)) {
                    return Err(err());
                }
                json!(s)
            }
            "dropdown" | "tagger" => {
                let s = value.as_str().ok_or_else(err)?;
                if s.is_empty() {
                    Value::Null
                } else if !option_values().any(|v| v == s) {
                    return match behavior.invalid_dropdown {
                        InvalidDropdown::Reject => Err(err()),
                        InvalidDropdown::Drop => Ok(None),
                    };
                } else {
                    json!(s)
                }
            }
            "multiselect" => {
                let items = value.as_array().ok_or_else(err)?;
                let mut out = Vec::new();
                for it in items {
                    let s = it.as_str().ok_or_else(err)?;
                    if !option_values().any(|v| v == s) {
                        return Err(err());
                    }
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
                json!(out)
            }
            "lookup" => {
                let id = as_id(value).filter(|id| *id > 0).ok_or_else(err)?;
                let target_type = d.relationship_target_type.as_deref().unwrap_or("");
                if !exists(target_type, id) {
                    return Err(err());
                }
                json!(id)
            }
            "partialcreditcard" => {
                let s = value.as_str().ok_or_else(err)?;
                let digits: String = s.chars().filter(char::is_ascii_digit).collect();
                if digits.len() < 4
                    || s.chars()
                        .any(|c| !(c.is_ascii_digit() || c == ' ' || c == '-'))
                {
                    return Err(err());
                }
                json!(format!("XXXXXXXXXXXX{}", &digits[digits.len() - 4..]))
            }
            _ => value.clone(),
        };
        Ok(Some(stored))
    }

    /// Tags implied by a field value: (tags to add, tags to remove).
    pub fn tag_effect(field: &Field, value: &Value) -> (Vec<String>, Vec<String>) {
        let d = &field.def;
        match &d.kind[..] {
            "checkbox" => match &d.tag {
                Some(tag) if !tag.is_empty() => {
                    if value.as_bool() == Some(true) {
                        (vec![tag.to_lowercase()], vec![])
                    } else {
                        (vec![], vec![tag.to_lowercase()])
                    }
                }
                _ => (vec![], vec![]),
            },
            "dropdown" | "tagger" | "multiselect" => {
                let chosen: Vec<String> = match value {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect(),
                    _ => vec![],
                };
                let removed = d
                    .custom_field_options
                    .iter()
                    .map(|o| o.value.clone())
                    .filter(|v| !chosen.contains(v))
                    .collect();
                (chosen, removed)
            }
            _ => (vec![], vec![]),
        }
    }
}

fn type_label(kind: &str) -> &'static str {
    match kind {
        "text" => "FieldText",
        "textarea" => "FieldTextarea",
        "checkbox" => "FieldCheckbox",
        "date" => "FieldDate",
        "integer" => "FieldInteger",
        "decimal" => "FieldDecimal",
        "regexp" => "FieldRegexp",
        "dropdown" | "tagger" => "FieldTagger",
        "multiselect" => "FieldMultiselect",
        "lookup" => "FieldLookup",
        "partialcreditcard" => "FieldPartialCreditCard",
        _ => "Field",
    }
}

fn system_options(kind: &str) -> Option<Value> {
    let opts: &[(&str, &str)] = match kind {
        "status" => &[
            ("New", "new"),
            ("Open", "open"),
            ("Pending", "pending"),
            ("On-hold", "hold"),
            ("Solved", "solved"),
            ("Closed", "closed"),
        ],
        "priority" => &[
            ("Low", "low"),
            ("Normal", "normal"),
            ("High", "high"),
            ("Urgent", "urgent"),
        ],
        "tickettype" => &[
            ("Question", "question"),
            ("Incident", "incident"),
            ("Problem", "problem"),
            ("Task", "task"),
        ],
        _ => return None,
    };
    Some(Value::Array(
        opts.iter()
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect(),
    ))
}

fn def(kind: &str, key: Option<&str>, title: &str) -> FieldDef {
    FieldDef {
        key: key.map(str::to_string),
        kind: kind.into(),
        title: title.into(),
        ..FieldDef::default()
    }
}

fn options(pairs: &[(&str, &str)]) -> Vec<FieldOption> {
    pairs
        .iter()
        .map(|(n, v)| FieldOption {
            name: (*n).into(),
            value: (*v).into(),
            ..FieldOption::default()
        })
        .collect()
}

fn system_ticket_fields() -> Vec<FieldDef> {
    [
        ("subject", "Subject"),
        ("description", "Description"),
        ("status", "Status"),
        ("tickettype", "Type"),
        ("priority", "Priority"),
        ("group", "Group"),
        ("assignee", "Assignee"),
    ]
    .iter()
    .map(|(k, t)| def(k, None, t))
    .collect()
}

/// One field of every type per object, the set used when no fixture is given.
pub fn default_fixture() -> FieldsFixture {
    let with = |mut d: FieldDef, f: &dyn Fn(&mut FieldDef)| {
        f(&mut d);
        d
    };
    let user_fields = vec![
        def("text", Some("nickname"), "Nickname"),
        def("textarea", Some("bio"), "Bio"),
        with(def("checkbox", Some("vip"), "VIP"), &|d| {
            d.tag = Some("vip_customer".into())
        }),
        def("date", Some("signup_date"), "Signup date"),
        def("integer", Some("seats"), "Seats"),
        def("decimal", Some("lifetime_value"), "Lifetime value"),
        with(def("regexp", Some("account_code"), "Account code"), &|d| {
            d.regexp_for_validation = Some("^[A-Z]{3}-[0-9]{4}$".into())
        }),
        with(def("dropdown", Some("plan"), "Plan"), &|d| {
            d.custom_field_options = options(&[
                ("Free", "plan_free"),
                ("Pro", "plan_pro"),
                ("Enterprise", "plan_enterprise"),
            ])
        }),
        with(def("multiselect", Some("interests"), "Interests"), &|d| {
            d.custom_field_options = options(&[
                ("Analytics", "interest_analytics"),
                ("Billing", "interest_billing"),
                ("Security", "interest_security"),
            ])
        }),
        with(
            def("lookup", Some("account_manager"), "Account manager"),
            &|d| d.relationship_target_type = Some("zen:user".into()),
        ),
    ];
    let organization_fields = vec![
        def("text", Some("region"), "Region"),
        def("textarea", Some("account_notes"), "Account notes"),
        with(def("checkbox", Some("strategic"), "Strategic"), &|d| {
            d.tag = Some("strategic_account".into())
        }),
        def("date", Some("renewal_date"), "Renewal date"),
        def("integer", Some("employees"), "Employees"),
        def("decimal", Some("arr"), "ARR"),
        with(def("regexp", Some("crm_id"), "CRM id"), &|d| {
            d.regexp_for_validation = Some("^CRM[0-9]{6}$".into())
        }),
        with(def("dropdown", Some("segment"), "Segment"), &|d| {
            d.custom_field_options = options(&[
                ("SMB", "segment_smb"),
                ("Mid-market", "segment_mid_market"),
                ("Enterprise", "segment_enterprise"),
            ])
        }),
        with(def("multiselect", Some("products"), "Products"), &|d| {
            d.custom_field_options = options(&[
                ("Support", "product_support"),
                ("Chat", "product_chat"),
                ("Guide", "product_guide"),
            ])
        }),
        with(
            def("lookup", Some("parent_account"), "Parent account"),
            &|d| d.relationship_target_type = Some("zen:organization".into()),
        ),
    ];
    let mut ticket_fields = system_ticket_fields();
    ticket_fields.extend([
        def("text", None, "Order number"),
        def("textarea", None, "Steps to reproduce"),
        with(def("checkbox", None, "Escalated"), &|d| {
            d.tag = Some("escalated".into())
        }),
        def("date", None, "Incident date"),
        def("integer", None, "Seat count"),
        def("decimal", None, "Refund amount"),
        with(def("regexp", None, "Invoice number"), &|d| {
            d.regexp_for_validation = Some("^INV-[0-9]{5}$".into())
        }),
        with(def("tagger", None, "Category"), &|d| {
            d.custom_field_options = options(&[
                ("Billing", "category_billing"),
                ("Technical", "category_technical"),
                ("Account", "category_account"),
            ])
        }),
        with(def("multiselect", None, "Affected products"), &|d| {
            d.custom_field_options = options(&[
                ("Support", "affected_support"),
                ("Chat", "affected_chat"),
                ("Guide", "affected_guide"),
            ])
        }),
        with(def("lookup", None, "Related user"), &|d| {
            d.relationship_target_type = Some("zen:user".into())
        }),
        def("partialcreditcard", None, "Card"),
    ]);
    FieldsFixture {
        user_fields,
        organization_fields,
        ticket_fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> FieldSet {
        FieldSet::build(default_fixture(), "2020-01-01T00:00:00Z".into()).unwrap()
    }

    #[test]
    fn types_validate() {
        let s = set();
        let b = Behavior::default();
        let yes = |_: &str, _: u64| true;
        let f = |k: &str| s.by_key(Target::User, k).unwrap();
        let v = |k: &str, val: Value| s.validate(f(k), Target::User, &val, &b, &yes);
        assert_eq!(v("vip", json!(true)).unwrap(), Some(json!(true)));
        assert!(v("vip", json!("yes")).is_err());
        assert_eq!(
            v("signup_date", json!("2021-04-16")).unwrap(),
            Some(json!("2021-04-16T00:00:00Z"))
        );
        assert!(v("signup_date", json!("2021-04-16T10:00:00Z")).is_err());
        assert!(v("signup_date", json!("2021-02-30")).is_err());
        assert_eq!(v("seats", json!("12")).unwrap(), Some(json!(12)));
        assert!(v("seats", json!(1.5)).is_err());
        assert!(v("lifetime_value", json!("abc")).is_err());
        assert!(v("account_code", json!("ABC-1234")).is_ok());
        assert!(v("account_code", json!("abc")).is_err());
        assert!(v("plan", json!("plan_pro")).is_ok());
        let e = v("plan", json!("Pro")).unwrap_err();
        assert_eq!(e.description(), "Plan is not valid");
        assert!(v("interests", json!(["interest_billing"])).is_ok());
        assert!(v("interests", json!(["nope"])).is_err());
        assert_eq!(v("account_manager", json!("7")).unwrap(), Some(json!(7)));
        assert_eq!(v("nickname", Value::Null).unwrap(), Some(Value::Null));
    }

    #[test]
    fn ticket_fields_have_system_entries() {
        let s = set();
        assert_eq!(s.ticket[0].def.kind, "subject");
        assert!(s.ticket[0].system);
        let card = s
            .ticket
            .iter()
            .find(|f| f.def.kind == "partialcreditcard")
            .unwrap();
        let got = s
            .validate(
                card,
                Target::Ticket,
                &json!("4111 1111 1111 1234"),
                &Behavior::default(),
                &|_, _| true,
            )
            .unwrap();
        assert_eq!(got, Some(json!("XXXXXXXXXXXX1234")));
    }
}
