//! One account's records (users, organizations, tickets) with the indexes Zendesk's matching
//! rules need, and the validation of writes. Every write validates first and mutates only when
//! the whole record is valid, so a failed request or job item leaves no trace.

use crate::config::{Behavior, MatchConflict};
use crate::fields::{FieldError, FieldSet, Target};
use crate::util::{
    add_tags, as_id, as_text, email_is_valid, lower, normalize_tags, remove_tags, FastMap,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Ids start above 2^32 (as real Zendesk ids do) so 32-bit client bugs show; ticket ids are
/// small per-account sequence numbers, as in Zendesk.
pub const FIRST_USER_ID: u64 = 10_000_000_001;
pub const FIRST_ORG_ID: u64 = 20_000_000_001;
pub const FIRST_TICKET_ID: u64 = 1;
const MAX_COMMENTS: usize = 5000;

/// One entry of a 422 `details` map.
#[derive(Debug, Clone, PartialEq)]
pub struct Detail {
    pub field: String,
    pub description: String,
    pub error: Option<String>,
    pub extra: Vec<(String, Value)>,
}

/// Validation failure: rendered as a 422 `RecordInvalid` or as a failed job item.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Invalid(pub Vec<Detail>);

impl Invalid {
    pub fn one(field: &str, description: String, error: Option<&str>) -> Self {
        Invalid(vec![Detail {
            field: field.into(),
            description,
            error: error.map(str::to_string),
            extra: vec![],
        }])
    }

    fn push(&mut self, field: &str, description: String, error: &str) {
        self.0.push(Detail {
            field: field.into(),
            description,
            error: Some(error.into()),
            extra: vec![],
        });
    }

    fn push_field(&mut self, target: Target, e: FieldError) {
        let mut d = Detail {
            field: if target == Target::Ticket {
                "base".into()
            } else {
                e.key.clone()
            },
            description: e.description(),
            error: Some("InvalidValue".into()),
            extra: vec![],
        };
        if target == Target::Ticket {
            d.extra = vec![
                ("ticket_field_id".into(), json!(e.field_id)),
                ("ticket_field_type".into(), json!(e.field_type)),
            ];
        }
        self.0.push(d);
    }

    fn check(self) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// `{"error":"RecordInvalid","description":"Record validation errors","details":{...}}`.
    pub fn body(&self) -> Value {
        let mut details: Map<String, Value> = Map::new();
        for d in &self.0 {
            let mut entry = Map::new();
            entry.insert("description".into(), json!(d.description));
            if let Some(e) = &d.error {
                entry.insert("error".into(), json!(e));
            }
            for (k, v) in &d.extra {
                entry.insert(k.clone(), v.clone());
            }
            details
                .entry(d.field.clone())
                .or_insert_with(|| Value::Array(vec![]))
                .as_array_mut()
                .expect("details entries are arrays")
                .push(Value::Object(entry));
        }
        json!({"error": "RecordInvalid", "description": "Record validation errors", "details": details})
    }

    /// The `details` text of a failed job item.
    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|d| d.description.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn is_duplicate(&self) -> bool {
        self.0
            .iter()
            .any(|d| d.error.as_deref() == Some("DuplicateValue"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpError {
    NotFound,
    Invalid(Invalid),
    /// `safe_update` with a stale `updated_stamp`.
    Conflict,
}

impl From<Invalid> for OpError {
    fn from(i: Invalid) -> Self {
        OpError::Invalid(i)
    }
}

/// What a write needs besides the record: definitions, switches, time and the acting user.
pub struct Ctx<'a> {
    pub fields: &'a FieldSet,
    pub behavior: &'a Behavior,
    pub user_tagging: bool,
    pub org_tagging: bool,
    pub now: String,
    pub actor_id: u64,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: u64,
    pub name: String,
    pub email: Option<String>,
    /// Secondary email identities (added when an update sends a different email).
    pub identities: Vec<String>,
    pub external_id: Option<String>,
    pub role: String,
    pub organization_id: Option<u64>,
    pub tags: Vec<String>,
    pub user_fields: Map<String, Value>,
    pub attrs: Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct Organization {
    pub id: u64,
    pub name: String,
    pub external_id: Option<String>,
    pub domain_names: Vec<String>,
    pub tags: Vec<String>,
    pub organization_fields: Map<String, Value>,
    pub attrs: Map<String, Value>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone)]
pub struct Comment {
    pub id: u64,
    pub body: String,
    pub public: bool,
    pub author_id: u64,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct Ticket {
    pub id: u64,
    pub external_id: Option<String>,
    pub subject: Option<String>,
    pub description: String,
    pub status: String,
    pub priority: Option<String>,
    pub kind: Option<String>,
    pub requester_id: u64,
    pub submitter_id: u64,
    pub assignee_id: Option<u64>,
    pub organization_id: Option<u64>,
    pub group_id: Option<u64>,
    pub tags: Vec<String>,
    pub custom_fields: BTreeMap<u64, Value>,
    pub attrs: Map<String, Value>,
    pub comments: Vec<Comment>,
    pub created_at: String,
    pub updated_at: String,
}

const USER_ATTRS: &[&str] = &[
    "phone",
    "shared_phone_number",
    "notes",
    "details",
    "alias",
    "signature",
    "time_zone",
    "locale",
    "locale_id",
    "verified",
    "suspended",
    "moderator",
    "only_private_comments",
    "restricted_agent",
    "ticket_restriction",
    "default_group_id",
    "custom_role_id",
    "remote_photo_url",
];
const ORG_ATTRS: &[&str] = &[
    "details",
    "notes",
    "group_id",
    "shared_tickets",
    "shared_comments",
];
const TICKET_ATTRS: &[&str] = &[
    "due_at",
    "problem_id",
    "collaborator_ids",
    "email_cc_ids",
    "follower_ids",
    "brand_id",
    "ticket_form_id",
    "via_followup_source_id",
    "recipient",
    "raw_subject",
];
const ROLES: &[&str] = &["end-user", "agent", "admin"];
const STATUSES: &[&str] = &["new", "open", "pending", "hold", "solved", "closed"];
const PRIORITIES: &[&str] = &["urgent", "high", "normal", "low"];
const TYPES: &[&str] = &["problem", "incident", "question", "task"];

/// Validated user change, applied only once everything checked out.
#[derive(Default)]
struct UserPatch {
    name: Option<String>,
    email: Option<String>,
    external_id: Option<Option<String>>,
    role: Option<String>,
    organization_id: Option<Option<u64>>,
    new_org_name: Option<String>,
    tags: Option<Vec<String>>,
    add_tags: Vec<String>,
    remove_tags: Vec<String>,
    fields: Vec<(String, Value)>,
    attrs: Vec<(String, Value)>,
}

#[derive(Default)]
struct OrgPatch {
    name: Option<String>,
    external_id: Option<Option<String>>,
    domain_names: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    add_tags: Vec<String>,
    remove_tags: Vec<String>,
    fields: Vec<(String, Value)>,
    attrs: Vec<(String, Value)>,
}

#[derive(Default)]
struct TicketPatch {
    subject: Option<Option<String>>,
    comment: Option<(String, bool, Option<u64>)>,
    status: Option<String>,
    priority: Option<Option<String>>,
    kind: Option<Option<String>>,
    requester_id: Option<u64>,
    requester_new: Option<(String, String)>,
    submitter_id: Option<u64>,
    assignee_id: Option<Option<u64>>,
    organization_id: Option<Option<u64>>,
    group_id: Option<Option<u64>>,
    external_id: Option<Option<String>>,
    tags: Option<Vec<String>>,
    add_tags: Vec<String>,
    remove_tags: Vec<String>,
    fields: Vec<(u64, Value)>,
    attrs: Vec<(String, Value)>,
}

/// Result of a users create_or_update.
pub struct Upsert {
    pub id: u64,
    pub created: bool,
}

#[derive(Debug)]
pub struct Store {
    next_user: u64,
    next_org: u64,
    next_ticket: u64,
    next_comment: u64,
    pub users: BTreeMap<u64, User>,
    user_email: FastMap<String, u64>,
    user_ext: FastMap<String, u64>,
    pub orgs: BTreeMap<u64, Organization>,
    org_name: FastMap<String, u64>,
    org_ext: FastMap<String, u64>,
    pub tickets: BTreeMap<u64, Ticket>,
    /// Deleted tickets (`status: "deleted"`, `updated_at` = deletion time), kept for the
    /// incremental export as Zendesk keeps them in its soft-delete bin.
    pub deleted_tickets: BTreeMap<u64, Ticket>,
    ticket_ext: FastMap<String, Vec<u64>>,
    /// Every active field key with a null value: records store only the values set, and
    /// rendering fills in the rest (saves a map per record on bulk creates).
    user_blank: Map<String, Value>,
    org_blank: Map<String, Value>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            next_user: FIRST_USER_ID,
            next_org: FIRST_ORG_ID,
            next_ticket: FIRST_TICKET_ID,
            next_comment: 30_000_000_001,
            users: BTreeMap::new(),
            user_email: FastMap::default(),
            user_ext: FastMap::default(),
            orgs: BTreeMap::new(),
            org_name: FastMap::default(),
            org_ext: FastMap::default(),
            tickets: BTreeMap::new(),
            deleted_tickets: BTreeMap::new(),
            ticket_ext: FastMap::default(),
            user_blank: Map::new(),
            org_blank: Map::new(),
        }
    }
}

fn text_or_null(v: &Value) -> Option<Option<String>> {
    match v {
        Value::Null => Some(None),
        other => as_text(other).map(|s| if s.is_empty() { None } else { Some(s) }),
    }
}

fn id_or_null(v: &Value) -> Result<Option<u64>, ()> {
    match v {
        Value::Null => Ok(None),
        other => as_id(other).map(Some).ok_or(()),
    }
}

fn tag_list(v: Option<&Value>) -> Vec<String> {
    v.map(normalize_tags).unwrap_or_default()
}

impl Store {
    pub fn new(fields: &FieldSet) -> Self {
        Self {
            user_blank: fields.blank_values(Target::User),
            org_blank: fields.blank_values(Target::Organization),
            ..Self::default()
        }
    }

    // ---- lookups -------------------------------------------------------------------------

    pub fn user_id_by_email(&self, email: &str) -> Option<u64> {
        self.user_email.get(lower(email).as_ref()).copied()
    }

    pub fn user_id_by_external(&self, ext: &str) -> Option<u64> {
        self.user_ext.get(lower(ext).as_ref()).copied()
    }

    pub fn org_id_by_external(&self, ext: &str) -> Option<u64> {
        self.org_ext.get(lower(ext).as_ref()).copied()
    }

    pub fn org_id_by_name(&self, name: &str) -> Option<u64> {
        self.org_name.get(lower(name).as_ref()).copied()
    }

    pub fn ticket_ids_by_external(&self, ext: &str) -> Vec<u64> {
        self.ticket_ext.get(ext).cloned().unwrap_or_default()
    }

    /// Whether a `lookup` field target exists.
    pub fn exists(&self, target_type: &str, id: u64) -> bool {
        match target_type {
            "zen:user" => self.users.contains_key(&id),
            "zen:organization" => self.orgs.contains_key(&id),
            "zen:ticket" => self.tickets.contains_key(&id),
            _ => true,
        }
    }

    fn validate_fields(
        &self,
        ctx: &Ctx,
        target: Target,
        input: Option<&Value>,
        bad: &mut Invalid,
    ) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let Some(Value::Object(map)) = input else {
            return out;
        };
        let exists = |t: &str, id: u64| self.exists(t, id);
        for (key, value) in map {
            // Unknown or inactive keys are dropped, as Zendesk drops unknown attributes.
            let Some(field) = ctx.fields.by_key(target, key).filter(|f| f.def.active) else {
                continue;
            };
            match ctx
                .fields
                .validate(field, target, value, ctx.behavior, &exists)
            {
                Ok(Some(v)) => out.push((key.clone(), v)),
                Ok(None) => {}
                Err(e) => bad.push_field(target, e),
            }
        }
        out
    }

    fn validate_ticket_fields(
        &self,
        ctx: &Ctx,
        input: Option<&Value>,
        bad: &mut Invalid,
    ) -> Vec<(u64, Value)> {
        let mut out = Vec::new();
        let Some(Value::Array(items)) = input else {
            return out;
        };
        let exists = |t: &str, id: u64| self.exists(t, id);
        for item in items {
            let Some(id) = item.get("id").and_then(as_id) else {
                continue;
            };
            let Some(field) = ctx
                .fields
                .ticket_field(id)
                .filter(|f| f.def.active && !f.system)
            else {
                continue;
            };
            let value = item.get("value").unwrap_or(&Value::Null);
            match ctx
                .fields
                .validate(field, Target::Ticket, value, ctx.behavior, &exists)
            {
                Ok(Some(v)) => out.push((id, v)),
                Ok(None) => {}
                Err(e) => bad.push_field(Target::Ticket, e),
            }
        }
        out
    }

    fn field_tags(
        ctx: &Ctx,
        target: Target,
        fields: &[(String, Value)],
    ) -> (Vec<String>, Vec<String>) {
        let mut add = Vec::new();
        let mut remove = Vec::new();
        if !ctx.behavior.tag_backed_fields {
            return (add, remove);
        }
        for (key, value) in fields {
            if let Some(f) = ctx.fields.by_key(target, key) {
                let (a, r) = FieldSet::tag_effect(f, value);
                add.extend(a);
                remove.extend(r);
            }
        }
        (add, remove)
    }

    // ---- users ----------------------------------------------------------------------------

    fn user_patch(
        &self,
        ctx: &Ctx,
        existing: Option<u64>,
        input: &Map<String, Value>,
        tag_ops: bool,
    ) -> Result<UserPatch, Invalid> {
        let mut p = UserPatch::default();
        let mut bad = Invalid::default();
        let creating = existing.is_none();
        match input.get("name") {
            Some(v) => match as_text(v).map(|s| s.trim().to_string()) {
                Some(s) if !s.is_empty() => p.name = Some(s),
                _ => bad.push("name", "Name: cannot be blank".into(), "BlankValue"),
            },
            None if creating => bad.push("name", "Name: cannot be blank".into(), "BlankValue"),
            None => {}
        }
        if let Some(v) = input.get("email").filter(|v| !v.is_null()) {
            let email = v.as_str().unwrap_or("").trim().to_string();
            if !email_is_valid(&email) {
                bad.push(
                    "email",
                    format!("Email: {email} is not properly formatted"),
                    "InvalidFormat",
                );
            } else {
                match self.user_id_by_email(&email) {
                    Some(owner) if Some(owner) != existing => bad.push(
                        "email",
                        format!("Email: {email} is already being used by another user"),
                        "DuplicateValue",
                    ),
                    _ => p.email = Some(email),
                }
            }
        }
        if let Some(v) = input.get("external_id") {
            match text_or_null(v) {
                Some(Some(ext)) => match self.user_id_by_external(&ext) {
                    Some(owner) if Some(owner) != existing => bad.push(
                        "external_id",
                        format!("External ID: {ext} has already been taken"),
                        "DuplicateValue",
                    ),
                    _ => p.external_id = Some(Some(ext)),
                },
                Some(None) => p.external_id = Some(None),
                None => bad.push(
                    "external_id",
                    "External ID: is invalid".into(),
                    "InvalidValue",
                ),
            }
        }
        if let Some(v) = input.get("role").filter(|v| !v.is_null()) {
            match v.as_str().filter(|r| ROLES.contains(r)) {
                Some(r) => p.role = Some(r.to_string()),
                None => bad.push("role", "Role: is invalid".into(), "InvalidValue"),
            }
        }
        if let Some(v) = input.get("organization_id") {
            match id_or_null(v) {
                Ok(Some(id)) if !self.orgs.contains_key(&id) => bad.push(
                    "organization_id",
                    "Organization: is invalid".into(),
                    "InvalidValue",
                ),
                Ok(id) => p.organization_id = Some(id),
                Err(()) => bad.push(
                    "organization_id",
                    "Organization: is invalid".into(),
                    "InvalidValue",
                ),
            }
        } else if let Some(name) = input
            .get("organization")
            .and_then(|o| o.get("name"))
            .and_then(as_text)
            .filter(|n| !n.trim().is_empty())
        {
            match self.org_id_by_name(&name) {
                Some(id) => p.organization_id = Some(Some(id)),
                None => p.new_org_name = Some(name),
            }
        }
        if ctx.user_tagging {
            if let Some(v) = input.get("tags") {
                p.tags = Some(normalize_tags(v));
            }
            if tag_ops && ctx.behavior.user_org_tag_ops {
                p.add_tags = tag_list(input.get("additional_tags"));
                p.remove_tags = tag_list(input.get("remove_tags"));
            }
        }
        p.fields = self.validate_fields(ctx, Target::User, input.get("user_fields"), &mut bad);
        for key in USER_ATTRS {
            if let Some(v) = input.get(*key) {
                p.attrs.push((key.to_string(), v.clone()));
            }
        }
        bad.check().map(|_| p)
    }

    fn apply_user(&mut self, ctx: &Ctx, id: Option<u64>, p: UserPatch) -> u64 {
        if let Some(name) = p.new_org_name.clone() {
            let org_id = self.insert_org_named(ctx, name);
            return self.apply_user(
                ctx,
                id,
                UserPatch {
                    new_org_name: None,
                    organization_id: Some(Some(org_id)),
                    ..p
                },
            );
        }
        let id = match id {
            Some(id) => id,
            None => {
                let id = self.next_user;
                self.next_user += 1;
                self.users.insert(
                    id,
                    User {
                        id,
                        name: String::new(),
                        email: None,
                        identities: vec![],
                        external_id: None,
                        role: "end-user".into(),
                        organization_id: None,
                        tags: vec![],
                        user_fields: Map::new(),
                        attrs: Map::new(),
                        created_at: ctx.now.clone(),
                        updated_at: ctx.now.clone(),
                    },
                );
                id
            }
        };
        let (field_add, field_remove) = Self::field_tags(ctx, Target::User, &p.fields);
        let user = self.users.get_mut(&id).expect("user exists");
        if let Some(n) = p.name {
            user.name = n;
        }
        if let Some(email) = p.email {
            let lower = email.to_lowercase();
            let known = user.email.as_deref().map(str::to_lowercase) == Some(lower.clone())
                || user.identities.iter().any(|e| e.to_lowercase() == lower);
            if !known {
                // A different email on an existing user adds an identity, never replaces.
                if user.email.is_none() {
                    user.email = Some(email);
                } else {
                    user.identities.push(email);
                }
                self.user_email.insert(lower, id);
            }
        }
        if let Some(ext) = p.external_id {
            if let Some(old) = user.external_id.take() {
                self.user_ext.remove(&old.to_lowercase());
            }
            if let Some(e) = &ext {
                self.user_ext.insert(e.to_lowercase(), id);
            }
            user.external_id = ext;
        }
        if let Some(r) = p.role {
            user.role = r;
        }
        if let Some(o) = p.organization_id {
            user.organization_id = o;
        }
        if let Some(t) = p.tags {
            user.tags = t;
        }
        add_tags(&mut user.tags, &p.add_tags);
        remove_tags(&mut user.tags, &p.remove_tags);
        if ctx.user_tagging {
            remove_tags(&mut user.tags, &field_remove);
            add_tags(&mut user.tags, &field_add);
        }
        for (k, v) in p.fields {
            user.user_fields.insert(k, v);
        }
        for (k, v) in p.attrs {
            user.attrs.insert(k, v);
        }
        user.updated_at = ctx.now.clone();
        id
    }

    pub fn create_user(&mut self, ctx: &Ctx, input: &Map<String, Value>) -> Result<u64, Invalid> {
        let p = self.user_patch(ctx, None, input, false)?;
        Ok(self.apply_user(ctx, None, p))
    }

    pub fn update_user(
        &mut self,
        ctx: &Ctx,
        id: u64,
        input: &Map<String, Value>,
        tag_ops: bool,
    ) -> Result<(), OpError> {
        if !self.users.contains_key(&id) {
            return Err(OpError::NotFound);
        }
        let p = self.user_patch(ctx, Some(id), input, tag_ops)?;
        self.apply_user(ctx, Some(id), p);
        Ok(())
    }

    /// The user a create_or_update body refers to, by external_id (case-insensitive) or email.
    pub fn match_user(
        &self,
        input: &Map<String, Value>,
        conflict: MatchConflict,
    ) -> Result<Option<u64>, Invalid> {
        let ext = input
            .get("external_id")
            .and_then(as_text)
            .filter(|s| !s.is_empty());
        let email = input
            .get("email")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let by_ext = ext.as_deref().and_then(|e| self.user_id_by_external(e));
        let by_email = email.and_then(|e| self.user_id_by_email(e));
        match (by_ext, by_email) {
            (Some(a), Some(b)) if a != b => match conflict {
                MatchConflict::Error => Err(Invalid::one(
                    "email",
                    format!(
                        "Email: {} is already being used by another user",
                        email.unwrap_or_default()
                    ),
                    Some("DuplicateValue"),
                )),
                MatchConflict::ExternalId => Ok(Some(a)),
                MatchConflict::Email => Ok(Some(b)),
            },
            (Some(a), _) | (None, Some(a)) => Ok(Some(a)),
            (None, None) => Ok(None),
        }
    }

    pub fn upsert_user(
        &mut self,
        ctx: &Ctx,
        input: &Map<String, Value>,
    ) -> Result<Upsert, Invalid> {
        match self.match_user(input, ctx.behavior.match_conflict)? {
            Some(id) => {
                let mut input = input.clone();
                // Under a prefer-one-key policy the other key stays as it is on the record.
                if let Some(ext) = input.get("external_id").and_then(as_text) {
                    if self.user_id_by_external(&ext).is_some_and(|o| o != id) {
                        input.remove("external_id");
                    }
                }
                if let Some(email) = input.get("email").and_then(Value::as_str) {
                    if self.user_id_by_email(email).is_some_and(|o| o != id) {
                        input.remove("email");
                    }
                }
                let p = self.user_patch(ctx, Some(id), &input, false)?;
                self.apply_user(ctx, Some(id), p);
                Ok(Upsert { id, created: false })
            }
            None => Ok(Upsert {
                id: self.create_user(ctx, input)?,
                created: true,
            }),
        }
    }

    pub fn delete_user(&mut self, id: u64) -> Option<User> {
        let user = self.users.remove(&id)?;
        for e in user.email.iter().chain(user.identities.iter()) {
            self.user_email.remove(&e.to_lowercase());
        }
        if let Some(e) = &user.external_id {
            self.user_ext.remove(&e.to_lowercase());
        }
        Some(user)
    }

    pub fn user_tags_mut(&mut self, id: u64) -> Option<(&mut Vec<String>, &mut String)> {
        self.users
            .get_mut(&id)
            .map(|u| (&mut u.tags, &mut u.updated_at))
    }

    // ---- organizations --------------------------------------------------------------------

    fn org_patch(
        &self,
        ctx: &Ctx,
        existing: Option<u64>,
        input: &Map<String, Value>,
        tag_ops: bool,
    ) -> Result<OrgPatch, Invalid> {
        let mut p = OrgPatch::default();
        let mut bad = Invalid::default();
        match input.get("name") {
            Some(v) => match as_text(v).map(|s| s.trim().to_string()) {
                Some(s) if !s.is_empty() => match self.org_id_by_name(&s) {
                    Some(owner) if Some(owner) != existing => bad.push(
                        "name",
                        format!("Name: {s} has already been taken"),
                        "DuplicateValue",
                    ),
                    _ => p.name = Some(s),
                },
                _ => bad.push("name", "Name: cannot be blank".into(), "BlankValue"),
            },
            None if existing.is_none() => {
                bad.push("name", "Name: cannot be blank".into(), "BlankValue")
            }
            None => {}
        }
        if let Some(v) = input.get("external_id") {
            match text_or_null(v) {
                Some(Some(ext)) => match self.org_id_by_external(&ext) {
                    Some(owner) if Some(owner) != existing => bad.push(
                        "external_id",
                        format!("External ID: {ext} has already been taken"),
                        "DuplicateValue",
                    ),
                    _ => p.external_id = Some(Some(ext)),
                },
                Some(None) => p.external_id = Some(None),
                None => bad.push(
                    "external_id",
                    "External ID: is invalid".into(),
                    "InvalidValue",
                ),
            }
        }
        if let Some(v) = input.get("domain_names") {
            let names = match v {
                Value::Array(a) => a.iter().filter_map(as_text).collect(),
                Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
                _ => vec![],
            };
            p.domain_names = Some(names);
        }
        if ctx.org_tagging {
            if let Some(v) = input.get("tags") {
                p.tags = Some(normalize_tags(v));
            }
            if tag_ops && ctx.behavior.user_org_tag_ops {
                p.add_tags = tag_list(input.get("additional_tags"));
                p.remove_tags = tag_list(input.get("remove_tags"));
            }
        }
        p.fields = self.validate_fields(
            ctx,
            Target::Organization,
            input.get("organization_fields"),
            &mut bad,
        );
        for key in ORG_ATTRS {
            if let Some(v) = input.get(*key) {
                p.attrs.push((key.to_string(), v.clone()));
            }
        }
        bad.check().map(|_| p)
    }

    fn insert_org_named(&mut self, ctx: &Ctx, name: String) -> u64 {
        let p = OrgPatch {
            name: Some(name),
            ..OrgPatch::default()
        };
        self.apply_org(ctx, None, p)
    }

    fn apply_org(&mut self, ctx: &Ctx, id: Option<u64>, p: OrgPatch) -> u64 {
        let id = match id {
            Some(id) => id,
            None => {
                let id = self.next_org;
                self.next_org += 1;
                self.orgs.insert(
                    id,
                    Organization {
                        id,
                        name: String::new(),
                        external_id: None,
                        domain_names: vec![],
                        tags: vec![],
                        organization_fields: Map::new(),
                        attrs: Map::new(),
                        created_at: ctx.now.clone(),
                        updated_at: ctx.now.clone(),
                    },
                );
                id
            }
        };
        let (field_add, field_remove) = Self::field_tags(ctx, Target::Organization, &p.fields);
        let org = self.orgs.get_mut(&id).expect("org exists");
        if let Some(n) = p.name {
            self.org_name.remove(&org.name.to_lowercase());
            self.org_name.insert(n.to_lowercase(), id);
            org.name = n;
        }
        if let Some(ext) = p.external_id {
            if let Some(old) = org.external_id.take() {
                self.org_ext.remove(&old.to_lowercase());
            }
            if let Some(e) = &ext {
                self.org_ext.insert(e.to_lowercase(), id);
            }
            org.external_id = ext;
        }
        if let Some(d) = p.domain_names {
            org.domain_names = d;
        }
        if let Some(t) = p.tags {
            org.tags = t;
        }
        add_tags(&mut org.tags, &p.add_tags);
        remove_tags(&mut org.tags, &p.remove_tags);
        if ctx.org_tagging {
            remove_tags(&mut org.tags, &field_remove);
            add_tags(&mut org.tags, &field_add);
        }
        for (k, v) in p.fields {
            org.organization_fields.insert(k, v);
        }
        for (k, v) in p.attrs {
            org.attrs.insert(k, v);
        }
        org.updated_at = ctx.now.clone();
        id
    }

    pub fn create_org(&mut self, ctx: &Ctx, input: &Map<String, Value>) -> Result<u64, Invalid> {
        let p = self.org_patch(ctx, None, input, false)?;
        Ok(self.apply_org(ctx, None, p))
    }

    pub fn update_org(
        &mut self,
        ctx: &Ctx,
        id: u64,
        input: &Map<String, Value>,
        tag_ops: bool,
    ) -> Result<(), OpError> {
        if !self.orgs.contains_key(&id) {
            return Err(OpError::NotFound);
        }
        let p = self.org_patch(ctx, Some(id), input, tag_ops)?;
        self.apply_org(ctx, Some(id), p);
        Ok(())
    }

    /// Organizations create_or_update: matched by `id` or `external_id`, never by name.
    pub fn upsert_org(&mut self, ctx: &Ctx, input: &Map<String, Value>) -> Result<Upsert, Invalid> {
        let by_id = input
            .get("id")
            .and_then(as_id)
            .filter(|id| self.orgs.contains_key(id));
        let by_ext = || {
            input
                .get("external_id")
                .and_then(as_text)
                .and_then(|e| self.org_id_by_external(&e))
        };
        match by_id.or_else(by_ext) {
            Some(id) => {
                let p = self.org_patch(ctx, Some(id), input, false)?;
                self.apply_org(ctx, Some(id), p);
                Ok(Upsert { id, created: false })
            }
            None => Ok(Upsert {
                id: self.create_org(ctx, input)?,
                created: true,
            }),
        }
    }

    pub fn delete_org(&mut self, id: u64) -> Option<Organization> {
        let org = self.orgs.remove(&id)?;
        self.org_name.remove(&org.name.to_lowercase());
        if let Some(e) = &org.external_id {
            self.org_ext.remove(&e.to_lowercase());
        }
        for u in self.users.values_mut() {
            if u.organization_id == Some(id) {
                u.organization_id = None;
            }
        }
        Some(org)
    }

    pub fn org_tags_mut(&mut self, id: u64) -> Option<(&mut Vec<String>, &mut String)> {
        self.orgs
            .get_mut(&id)
            .map(|o| (&mut o.tags, &mut o.updated_at))
    }

    // ---- tickets --------------------------------------------------------------------------

    fn ticket_patch(
        &self,
        ctx: &Ctx,
        existing: Option<&Ticket>,
        input: &Map<String, Value>,
    ) -> Result<TicketPatch, Invalid> {
        let mut p = TicketPatch::default();
        let mut bad = Invalid::default();
        if let Some(t) = existing {
            if t.status == "closed" {
                return Err(Invalid::one(
                    "status",
                    "Status closed prevents ticket update".into(),
                    None,
                ));
            }
        }
        if let Some(v) = input.get("subject") {
            p.subject = Some(text_or_null(v).flatten());
        }
        match input.get("comment") {
            Some(Value::Object(c)) => {
                let body = c
                    .get("body")
                    .or_else(|| c.get("html_body"))
                    .and_then(as_text)
                    .unwrap_or_default();
                if body.trim().is_empty() {
                    if existing.is_none() {
                        bad.push("base", "Description: cannot be blank".into(), "BlankValue");
                    }
                } else if existing.is_some_and(|t| t.comments.len() >= MAX_COMMENTS) {
                    bad.push(
                        "base",
                        format!("Comments: a ticket cannot have more than {MAX_COMMENTS} comments"),
                        "TooManyComments",
                    );
                } else {
                    let public = c.get("public").and_then(Value::as_bool).unwrap_or(true);
                    let author = c.get("author_id").and_then(as_id);
                    p.comment = Some((body, public, author));
                }
            }
            Some(Value::String(s)) if !s.trim().is_empty() => {
                p.comment = Some((s.clone(), true, None));
            }
            _ if existing.is_none() => {
                bad.push("base", "Description: cannot be blank".into(), "BlankValue")
            }
            _ => {}
        }
        let enum_field = |key: &str,
                          allowed: &[&str],
                          label: &str,
                          bad: &mut Invalid|
         -> Option<Option<String>> {
            let v = input.get(key)?;
            if v.is_null() {
                return Some(None);
            }
            match v.as_str().filter(|s| allowed.contains(s)) {
                Some(s) => Some(Some(s.to_string())),
                None => {
                    bad.push(key, format!("{label}: is invalid"), "InvalidValue");
                    None
                }
            }
        };
        if let Some(s) = enum_field("status", STATUSES, "Status", &mut bad) {
            match s {
                Some(s) => p.status = Some(s),
                None => bad.push("status", "Status: is invalid".into(), "InvalidValue"),
            }
        }
        p.priority = enum_field("priority", PRIORITIES, "Priority", &mut bad);
        p.kind = enum_field("type", TYPES, "Type", &mut bad);
        let user_ref = |key: &str, label: &str, bad: &mut Invalid| -> Option<Option<u64>> {
            let v = input.get(key)?;
            match id_or_null(v) {
                Ok(Some(id)) if self.users.contains_key(&id) => Some(Some(id)),
                Ok(None) => Some(None),
                _ => {
                    bad.push(key, format!("{label}: is invalid"), "InvalidValue");
                    None
                }
            }
        };
        if let Some(r) = user_ref("requester_id", "Requester", &mut bad) {
            p.requester_id = r;
        } else if let Some(Value::Object(r)) = input.get("requester") {
            let email = r.get("email").and_then(Value::as_str).unwrap_or("").trim();
            match self.user_id_by_email(email) {
                Some(id) => p.requester_id = Some(id),
                None if email_is_valid(email) => {
                    let name = r
                        .get("name")
                        .and_then(as_text)
                        .filter(|n| !n.trim().is_empty())
                        .unwrap_or_else(|| email.to_string());
                    p.requester_new = Some((name, email.to_string()));
                }
                None => bad.push(
                    "requester",
                    format!("Requester: Email: {email} is not properly formatted"),
                    "InvalidValue",
                ),
            }
        }
        if let Some(s) = user_ref("submitter_id", "Submitter", &mut bad) {
            p.submitter_id = s;
        }
        p.assignee_id = user_ref("assignee_id", "Assignee", &mut bad);
        if let Some(v) = input.get("organization_id") {
            match id_or_null(v) {
                Ok(Some(id)) if !self.orgs.contains_key(&id) => bad.push(
                    "organization_id",
                    "Organization: is invalid".into(),
                    "InvalidValue",
                ),
                Ok(o) => p.organization_id = Some(o),
                Err(()) => bad.push(
                    "organization_id",
                    "Organization: is invalid".into(),
                    "InvalidValue",
                ),
            }
        }
        if let Some(v) = input.get("group_id") {
            p.group_id = id_or_null(v).ok();
        }
        if let Some(v) = input.get("external_id") {
            p.external_id = text_or_null(v);
        }
        if let Some(v) = input.get("tags") {
            p.tags = Some(normalize_tags(v));
        }
        p.add_tags = tag_list(input.get("additional_tags"));
        p.remove_tags = tag_list(input.get("remove_tags"));
        p.fields = self.validate_ticket_fields(ctx, input.get("custom_fields"), &mut bad);
        for key in TICKET_ATTRS {
            if let Some(v) = input.get(*key) {
                p.attrs.push((key.to_string(), v.clone()));
            }
        }
        bad.check().map(|_| p)
    }

    fn apply_ticket(&mut self, ctx: &Ctx, id: Option<u64>, mut p: TicketPatch) -> u64 {
        if let Some((name, email)) = p.requester_new.take() {
            let mut m = Map::new();
            m.insert("name".into(), json!(name));
            m.insert("email".into(), json!(email));
            let uid = self
                .create_user(ctx, &m)
                .expect("requester fields were validated");
            p.requester_id = Some(uid);
        }
        let id = match id {
            Some(id) => id,
            None => {
                let id = self.next_ticket;
                self.next_ticket += 1;
                let requester = p.requester_id.unwrap_or(ctx.actor_id);
                let org = self.users.get(&requester).and_then(|u| u.organization_id);
                self.tickets.insert(
                    id,
                    Ticket {
                        id,
                        external_id: None,
                        subject: None,
                        description: String::new(),
                        status: "new".into(),
                        priority: None,
                        kind: None,
                        requester_id: requester,
                        submitter_id: p.submitter_id.unwrap_or(ctx.actor_id),
                        assignee_id: None,
                        organization_id: org,
                        group_id: None,
                        tags: vec![],
                        custom_fields: BTreeMap::new(),
                        attrs: Map::new(),
                        comments: vec![],
                        created_at: ctx.now.clone(),
                        updated_at: ctx.now.clone(),
                    },
                );
                if p.assignee_id.flatten().is_some() && p.status.is_none() {
                    p.status = Some("open".into());
                }
                id
            }
        };
        let mut field_add = Vec::new();
        let mut field_remove = Vec::new();
        if ctx.behavior.tag_backed_fields {
            for (fid, v) in &p.fields {
                if let Some(f) = ctx.fields.ticket_field(*fid) {
                    let (a, r) = FieldSet::tag_effect(f, v);
                    field_add.extend(a);
                    field_remove.extend(r);
                }
            }
        }
        let comment_id = p.comment.as_ref().map(|_| {
            self.next_comment += 1;
            self.next_comment
        });
        let t = self.tickets.get_mut(&id).expect("ticket exists");
        if let Some(s) = p.subject {
            t.subject = s;
        }
        if let (Some((body, public, author)), Some(cid)) = (p.comment, comment_id) {
            if t.comments.is_empty() {
                t.description = body.clone();
            }
            t.comments.push(Comment {
                id: cid,
                body,
                public,
                author_id: author.unwrap_or(ctx.actor_id),
                created_at: ctx.now.clone(),
            });
        }
        if let Some(s) = p.status {
            t.status = s;
        }
        if let Some(v) = p.priority {
            t.priority = v;
        }
        if let Some(v) = p.kind {
            t.kind = v;
        }
        if let Some(r) = p.requester_id {
            t.requester_id = r;
        }
        if let Some(s) = p.submitter_id {
            t.submitter_id = s;
        }
        if let Some(a) = p.assignee_id {
            t.assignee_id = a;
        }
        if let Some(o) = p.organization_id {
            t.organization_id = o;
        }
        if let Some(g) = p.group_id {
            t.group_id = g;
        }
        if let Some(ext) = p.external_id {
            if let Some(old) = t.external_id.take() {
                if let Some(ids) = self.ticket_ext.get_mut(&old) {
                    ids.retain(|x| *x != id);
                }
            }
            if let Some(e) = &ext {
                self.ticket_ext.entry(e.clone()).or_default().push(id);
            }
            t.external_id = ext;
        }
        if let Some(tags) = p.tags {
            t.tags = tags;
        }
        add_tags(&mut t.tags, &p.add_tags);
        remove_tags(&mut t.tags, &p.remove_tags);
        remove_tags(&mut t.tags, &field_remove);
        add_tags(&mut t.tags, &field_add);
        for (fid, v) in p.fields {
            t.custom_fields.insert(fid, v);
        }
        for (k, v) in p.attrs {
            t.attrs.insert(k, v);
        }
        t.updated_at = ctx.now.clone();
        id
    }

    pub fn create_ticket(&mut self, ctx: &Ctx, input: &Map<String, Value>) -> Result<u64, Invalid> {
        let p = self.ticket_patch(ctx, None, input)?;
        Ok(self.apply_ticket(ctx, None, p))
    }

    /// Reserves a ticket id for an async create (`?async=true`): the job creates it later.
    pub fn reserve_ticket_id(&mut self) -> u64 {
        let id = self.next_ticket;
        self.next_ticket += 1;
        id
    }

    /// Creates a ticket under an id reserved earlier.
    pub fn create_ticket_with_id(
        &mut self,
        ctx: &Ctx,
        id: u64,
        input: &Map<String, Value>,
    ) -> Result<u64, Invalid> {
        let p = self.ticket_patch(ctx, None, input)?;
        let saved = self.next_ticket;
        self.next_ticket = id;
        let got = self.apply_ticket(ctx, None, p);
        self.next_ticket = saved.max(got + 1);
        Ok(got)
    }

    pub fn update_ticket(
        &mut self,
        ctx: &Ctx,
        id: u64,
        input: &Map<String, Value>,
    ) -> Result<(), OpError> {
        let t = self.tickets.get(&id).ok_or(OpError::NotFound)?;
        if let Some(stamp) = safe_update_stamp(input) {
            if stamp != t.updated_at {
                return Err(OpError::Conflict);
            }
        }
        let p = self.ticket_patch(ctx, Some(t), input)?;
        self.apply_ticket(ctx, Some(id), p);
        Ok(())
    }

    /// Deletes a ticket at `now` (ISO time); the incremental export lists it as `deleted`.
    pub fn delete_ticket(&mut self, id: u64, now: &str) -> Option<Ticket> {
        let t = self.tickets.remove(&id)?;
        if let Some(e) = &t.external_id {
            if let Some(ids) = self.ticket_ext.get_mut(e) {
                ids.retain(|x| *x != id);
            }
        }
        let mut gone = t.clone();
        gone.status = "deleted".into();
        gone.updated_at = now.to_string();
        self.deleted_tickets.insert(id, gone);
        Some(t)
    }

    pub fn ticket_tags_mut(&mut self, id: u64) -> Option<(&mut Vec<String>, &mut String)> {
        self.tickets
            .get_mut(&id)
            .map(|t| (&mut t.tags, &mut t.updated_at))
    }

    // ---- rendering ------------------------------------------------------------------------

    pub fn render_user(&self, u: &User, base: &str, tagging: bool) -> Value {
        let attr = |k: &str, default: Value| u.attrs.get(k).cloned().unwrap_or(default);
        let mut m = Map::new();
        m.insert("id".into(), json!(u.id));
        m.insert(
            "url".into(),
            json!(format!("{base}/api/v2/users/{}.json", u.id)),
        );
        m.insert("name".into(), json!(u.name));
        m.insert("email".into(), json!(u.email));
        m.insert("created_at".into(), json!(u.created_at));
        m.insert("updated_at".into(), json!(u.updated_at));
        m.insert("time_zone".into(), attr("time_zone", json!("UTC")));
        m.insert("iana_time_zone".into(), json!("Etc/UTC"));
        m.insert("phone".into(), attr("phone", Value::Null));
        m.insert(
            "shared_phone_number".into(),
            attr("shared_phone_number", Value::Null),
        );
        m.insert("photo".into(), Value::Null);
        m.insert("locale_id".into(), attr("locale_id", json!(1)));
        m.insert("locale".into(), attr("locale", json!("en-US")));
        m.insert("organization_id".into(), json!(u.organization_id));
        m.insert("role".into(), json!(u.role));
        m.insert("verified".into(), attr("verified", json!(false)));
        m.insert("external_id".into(), json!(u.external_id));
        if tagging {
            m.insert("tags".into(), json!(u.tags));
        }
        m.insert("alias".into(), attr("alias", Value::Null));
        m.insert("active".into(), json!(true));
        m.insert("shared".into(), json!(false));
        m.insert("shared_agent".into(), json!(false));
        m.insert("last_login_at".into(), Value::Null);
        m.insert("two_factor_auth_enabled".into(), json!(false));
        m.insert("signature".into(), attr("signature", Value::Null));
        m.insert("details".into(), attr("details", Value::Null));
        m.insert("notes".into(), attr("notes", Value::Null));
        m.insert(
            "role_type".into(),
            if u.role == "end-user" {
                Value::Null
            } else {
                json!(0)
            },
        );
        m.insert("custom_role_id".into(), attr("custom_role_id", Value::Null));
        m.insert("moderator".into(), attr("moderator", json!(false)));
        m.insert(
            "ticket_restriction".into(),
            attr(
                "ticket_restriction",
                if u.role == "end-user" {
                    json!("requested")
                } else {
                    Value::Null
                },
            ),
        );
        m.insert(
            "only_private_comments".into(),
            attr("only_private_comments", json!(false)),
        );
        m.insert(
            "restricted_agent".into(),
            attr("restricted_agent", json!(u.role == "end-user")),
        );
        m.insert("suspended".into(), attr("suspended", json!(false)));
        m.insert(
            "default_group_id".into(),
            attr("default_group_id", Value::Null),
        );
        m.insert("report_csv".into(), json!(false));
        let mut fields = self.user_blank.clone();
        fields.extend(u.user_fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        m.insert("user_fields".into(), Value::Object(fields));
        Value::Object(m)
    }

    pub fn render_org(&self, o: &Organization, base: &str) -> Value {
        let attr = |k: &str, default: Value| o.attrs.get(k).cloned().unwrap_or(default);
        let mut m = Map::new();
        m.insert(
            "url".into(),
            json!(format!("{base}/api/v2/organizations/{}.json", o.id)),
        );
        m.insert("id".into(), json!(o.id));
        m.insert("name".into(), json!(o.name));
        m.insert(
            "shared_tickets".into(),
            attr("shared_tickets", json!(false)),
        );
        m.insert(
            "shared_comments".into(),
            attr("shared_comments", json!(false)),
        );
        m.insert("external_id".into(), json!(o.external_id));
        m.insert("created_at".into(), json!(o.created_at));
        m.insert("updated_at".into(), json!(o.updated_at));
        m.insert("domain_names".into(), json!(o.domain_names));
        m.insert("details".into(), attr("details", Value::Null));
        m.insert("notes".into(), attr("notes", Value::Null));
        m.insert("group_id".into(), attr("group_id", Value::Null));
        // Organizations always show `tags`; writes are ignored while tagging is off.
        m.insert("tags".into(), json!(o.tags));
        let mut fields = self.org_blank.clone();
        fields.extend(
            o.organization_fields
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        m.insert("organization_fields".into(), Value::Object(fields));
        Value::Object(m)
    }

    pub fn render_ticket(&self, t: &Ticket, base: &str) -> Value {
        let attr = |k: &str, default: Value| t.attrs.get(k).cloned().unwrap_or(default);
        let custom: Vec<Value> = t
            .custom_fields
            .iter()
            .map(|(id, v)| json!({"id": id, "value": v}))
            .collect();
        let mut m = Map::new();
        m.insert(
            "url".into(),
            json!(format!("{base}/api/v2/tickets/{}.json", t.id)),
        );
        m.insert("id".into(), json!(t.id));
        m.insert("external_id".into(), json!(t.external_id));
        m.insert(
            "via".into(),
            json!({"channel": "api", "source": {"from": {}, "to": {}, "rel": null}}),
        );
        m.insert("created_at".into(), json!(t.created_at));
        m.insert("updated_at".into(), json!(t.updated_at));
        m.insert("type".into(), json!(t.kind));
        m.insert("subject".into(), json!(t.subject));
        m.insert("raw_subject".into(), attr("raw_subject", json!(t.subject)));
        m.insert("description".into(), json!(t.description));
        m.insert("priority".into(), json!(t.priority));
        m.insert("status".into(), json!(t.status));
        m.insert("recipient".into(), attr("recipient", Value::Null));
        m.insert("requester_id".into(), json!(t.requester_id));
        m.insert("submitter_id".into(), json!(t.submitter_id));
        m.insert("assignee_id".into(), json!(t.assignee_id));
        m.insert("organization_id".into(), json!(t.organization_id));
        m.insert("group_id".into(), json!(t.group_id));
        m.insert(
            "collaborator_ids".into(),
            attr("collaborator_ids", json!([])),
        );
        m.insert("follower_ids".into(), attr("follower_ids", json!([])));
        m.insert("email_cc_ids".into(), attr("email_cc_ids", json!([])));
        m.insert("problem_id".into(), attr("problem_id", Value::Null));
        m.insert("has_incidents".into(), json!(false));
        m.insert(
            "is_public".into(),
            json!(t.comments.first().is_none_or(|c| c.public)),
        );
        m.insert("due_at".into(), attr("due_at", Value::Null));
        m.insert("tags".into(), json!(t.tags));
        m.insert("custom_fields".into(), Value::Array(custom.clone()));
        m.insert("fields".into(), Value::Array(custom));
        m.insert("brand_id".into(), attr("brand_id", Value::Null));
        m.insert("ticket_form_id".into(), attr("ticket_form_id", Value::Null));
        m.insert("allow_channelback".into(), json!(false));
        m.insert("allow_attachments".into(), json!(true));
        m.insert("from_messaging_channel".into(), json!(false));
        Value::Object(m)
    }

    pub fn render_comment(c: &Comment) -> Value {
        json!({
            "id": c.id,
            "type": "Comment",
            "author_id": c.author_id,
            "body": c.body,
            "html_body": format!("<p>{}</p>", c.body),
            "plain_body": c.body,
            "public": c.public,
            "attachments": [],
            "created_at": c.created_at,
        })
    }
}

/// The `updated_stamp` to check when `safe_update` is present (its value does not matter: the
/// OAS says `false` behaves like `true`).
pub fn safe_update_stamp(input: &Map<String, Value>) -> Option<String> {
    if input.get("safe_update").is_none_or(Value::is_null) {
        return None;
    }
    Some(
        input
            .get("updated_stamp")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::{default_fixture, FieldSet};

    fn with_ctx<R>(f: impl FnOnce(&Ctx) -> R) -> R {
        let fields = FieldSet::build(default_fixture(), "t".into()).unwrap();
        let behavior = Behavior::default();
        let ctx = Ctx {
            fields: &fields,
            behavior: &behavior,
            user_tagging: true,
            org_tagging: true,
            now: "2024-01-01T00:00:00Z".into(),
            actor_id: 1,
        };
        f(&ctx)
    }

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn user_matching_rules() {
        with_ctx(|ctx| {
            let mut s = Store::default();
            let a = s
                .create_user(
                    ctx,
                    &m(json!({"name": "A", "email": "a@x.io", "external_id": "EXT1"})),
                )
                .unwrap();
            let b = s
                .create_user(ctx, &m(json!({"name": "B", "email": "b@x.io"})))
                .unwrap();
            // external_id matches case-insensitively and the case sent is stored.
            let up = s
                .upsert_user(ctx, &m(json!({"name": "A2", "external_id": "ext1"})))
                .unwrap();
            assert_eq!((up.id, up.created), (a, false));
            assert_eq!(s.users[&a].external_id.as_deref(), Some("ext1"));
            // email match
            let up = s
                .upsert_user(
                    ctx,
                    &m(json!({"name": "B2", "email": "B@x.io", "external_id": "e2"})),
                )
                .unwrap();
            assert_eq!(up.id, b);
            // conflict
            let err = s
                .upsert_user(
                    ctx,
                    &m(json!({"name": "C", "email": "b@x.io", "external_id": "EXT1"})),
                )
                .err()
                .unwrap();
            assert_eq!(
                err.text(),
                "Email: b@x.io is already being used by another user"
            );
            // duplicate email on create
            let err = s
                .create_user(ctx, &m(json!({"name": "D", "email": "a@x.io"})))
                .unwrap_err();
            assert!(err.is_duplicate());
            assert!(s.create_user(ctx, &m(json!({"email": "z@x.io"}))).is_err());
        });
    }

    #[test]
    fn org_rules() {
        with_ctx(|ctx| {
            let mut s = Store::default();
            let o = s
                .create_org(ctx, &m(json!({"name": "Acme", "external_id": "o1"})))
                .unwrap();
            let err = s.create_org(ctx, &m(json!({"name": "acme"}))).unwrap_err();
            assert_eq!(err.text(), "Name: acme has already been taken");
            // never matched by name
            assert!(s.upsert_org(ctx, &m(json!({"name": "Acme"}))).is_err());
            let up = s
                .upsert_org(ctx, &m(json!({"external_id": "O1", "notes": "n"})))
                .unwrap();
            assert_eq!((up.id, up.created), (o, false));
        });
    }

    #[test]
    fn ticket_rules() {
        with_ctx(|ctx| {
            let mut s = Store::default();
            assert!(s.create_ticket(ctx, &m(json!({"subject": "x"}))).is_err());
            let t = s
                .create_ticket(
                    ctx,
                    &m(json!({"subject": "x", "comment": {"body": "hi"}, "external_id": "e"})),
                )
                .unwrap();
            let t2 = s
                .create_ticket(
                    ctx,
                    &m(json!({"comment": {"body": "again"}, "external_id": "e"})),
                )
                .unwrap();
            assert_eq!(s.ticket_ids_by_external("e"), vec![t, t2]);
            s.update_ticket(ctx, t, &m(json!({"status": "closed"})))
                .unwrap();
            let err = s
                .update_ticket(ctx, t, &m(json!({"subject": "y"})))
                .unwrap_err();
            assert!(matches!(err, OpError::Invalid(_)));
        });
    }
}
