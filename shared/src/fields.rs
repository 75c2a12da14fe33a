//! The Zendesk fields a sync can map to, per object, with the type each value is coerced to.
//! Names and shapes follow Zendesk's Users, Organizations and Tickets APIs.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The object a sync writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Object {
    Users,
    Organizations,
    Tickets,
}

impl Object {
    pub fn as_str(self) -> &'static str {
        match self {
            Object::Users => "users",
            Object::Organizations => "organizations",
            Object::Tickets => "tickets",
        }
    }

    /// Zendesk matches user and organization `external_id`s case-insensitively; ticket
    /// external ids are free text (and not unique).
    pub fn case_insensitive_keys(self) -> bool {
        !matches!(self, Object::Tickets)
    }

    /// The prefix of custom fields in mapping keys (`user_fields.plan`, `custom_fields.360001`).
    pub fn custom_prefix(self) -> &'static str {
        match self {
            Object::Users => "user_fields",
            Object::Organizations => "organization_fields",
            Object::Tickets => "custom_fields",
        }
    }

    /// Mapping keys that must be present for creates.
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Object::Users => &["name", "email"],
            Object::Organizations => &["name"],
            Object::Tickets => &["subject", "description"],
        }
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a value is coerced and encoded. Custom field types use Zendesk's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    Text,
    Textarea,
    Email,
    Integer,
    Decimal,
    Checkbox,
    /// `YYYY-MM-DD`.
    Date,
    /// RFC 3339 in UTC (`due_at`).
    Datetime,
    Regexp,
    /// A dropdown / tagger: the option value (its tag).
    Dropdown,
    /// An array of option values.
    Multiselect,
    /// The id of a related record.
    Lookup,
    /// Record tags: lower case, no spaces, deduplicated and sorted.
    Tags,
    /// A list of strings (`domain_names`), deduplicated and sorted.
    List,
    /// One of a fixed set of lower-case values (`role`, `priority`, ...).
    Choice(&'static [&'static str]),
}

impl FieldType {
    /// Parse a custom field type as written in a sync config (Zendesk's type names).
    pub fn parse_custom(name: &str) -> Option<FieldType> {
        Some(match name {
            "text" => FieldType::Text,
            "textarea" => FieldType::Textarea,
            "integer" => FieldType::Integer,
            "decimal" => FieldType::Decimal,
            "checkbox" => FieldType::Checkbox,
            "date" => FieldType::Date,
            "regexp" => FieldType::Regexp,
            "dropdown" | "tagger" => FieldType::Dropdown,
            "multiselect" => FieldType::Multiselect,
            "lookup" => FieldType::Lookup,
            _ => return None,
        })
    }

    pub const CUSTOM_NAMES: &'static str =
        "text, textarea, integer, decimal, checkbox, date, regexp, dropdown, tagger, multiselect, lookup";

    pub fn name(self) -> &'static str {
        match self {
            FieldType::Text => "text",
            FieldType::Textarea => "textarea",
            FieldType::Email => "email",
            FieldType::Integer => "integer",
            FieldType::Decimal => "decimal",
            FieldType::Checkbox => "checkbox",
            FieldType::Date => "date",
            FieldType::Datetime => "datetime",
            FieldType::Regexp => "regexp",
            FieldType::Dropdown => "dropdown",
            FieldType::Multiselect => "multiselect",
            FieldType::Lookup => "lookup",
            FieldType::Tags => "tags",
            FieldType::List => "list",
            FieldType::Choice(_) => "choice",
        }
    }

    /// Whether a list column (or a separated string) is expected.
    pub fn is_list(self) -> bool {
        matches!(
            self,
            FieldType::Tags | FieldType::List | FieldType::Multiselect
        )
    }
}

/// A standard (non-custom) field: its mapping key, where it goes in the payload, its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandardField {
    pub key: &'static str,
    /// JSON path inside the object's payload (`["requester", "email"]`).
    pub path: &'static [&'static str],
    pub ty: FieldType,
    /// Sent on create only (a ticket's first comment).
    pub create_only: bool,
}

const fn f(key: &'static str, path: &'static [&'static str], ty: FieldType) -> StandardField {
    StandardField {
        key,
        path,
        ty,
        create_only: false,
    }
}

use FieldType as T;

const USER_FIELDS: &[StandardField] = &[
    f("name", &["name"], T::Text),
    f("email", &["email"], T::Email),
    f("phone", &["phone"], T::Text),
    f("shared_phone_number", &["shared_phone_number"], T::Checkbox),
    f(
        "role",
        &["role"],
        T::Choice(&["end-user", "agent", "admin"]),
    ),
    f("custom_role_id", &["custom_role_id"], T::Integer),
    f("organization_id", &["organization_id"], T::Integer),
    f("default_group_id", &["default_group_id"], T::Integer),
    f("time_zone", &["time_zone"], T::Text),
    f("locale", &["locale"], T::Text),
    f("locale_id", &["locale_id"], T::Integer),
    f("notes", &["notes"], T::Textarea),
    f("details", &["details"], T::Textarea),
    f("alias", &["alias"], T::Text),
    f("signature", &["signature"], T::Textarea),
    f("verified", &["verified"], T::Checkbox),
    f("suspended", &["suspended"], T::Checkbox),
    f("moderator", &["moderator"], T::Checkbox),
    f(
        "only_private_comments",
        &["only_private_comments"],
        T::Checkbox,
    ),
    f("restricted_agent", &["restricted_agent"], T::Checkbox),
    f(
        "ticket_restriction",
        &["ticket_restriction"],
        T::Choice(&["organization", "groups", "assigned", "requested"]),
    ),
    f("remote_photo_url", &["remote_photo_url"], T::Text),
    f("tags", &["tags"], T::Tags),
];

const ORGANIZATION_FIELDS: &[StandardField] = &[
    f("name", &["name"], T::Text),
    f("domain_names", &["domain_names"], T::List),
    f("details", &["details"], T::Textarea),
    f("notes", &["notes"], T::Textarea),
    f("group_id", &["group_id"], T::Integer),
    f("shared_tickets", &["shared_tickets"], T::Checkbox),
    f("shared_comments", &["shared_comments"], T::Checkbox),
    f("tags", &["tags"], T::Tags),
];

const TICKET_FIELDS: &[StandardField] = &[
    f("subject", &["subject"], T::Text),
    StandardField {
        key: "description",
        path: &["comment", "body"],
        ty: T::Textarea,
        create_only: true,
    },
    StandardField {
        key: "comment_public",
        path: &["comment", "public"],
        ty: T::Checkbox,
        create_only: true,
    },
    f(
        "priority",
        &["priority"],
        T::Choice(&["urgent", "high", "normal", "low"]),
    ),
    f(
        "status",
        &["status"],
        T::Choice(&["new", "open", "pending", "hold", "solved", "closed"]),
    ),
    f(
        "type",
        &["type"],
        T::Choice(&["problem", "incident", "question", "task"]),
    ),
    f("due_at", &["due_at"], T::Datetime),
    f("requester_id", &["requester_id"], T::Integer),
    f("requester_email", &["requester", "email"], T::Email),
    f("requester_name", &["requester", "name"], T::Text),
    f("submitter_id", &["submitter_id"], T::Integer),
    f("assignee_id", &["assignee_id"], T::Integer),
    f("assignee_email", &["assignee_email"], T::Email),
    f("group_id", &["group_id"], T::Integer),
    f("organization_id", &["organization_id"], T::Integer),
    f("brand_id", &["brand_id"], T::Integer),
    f("ticket_form_id", &["ticket_form_id"], T::Integer),
    f("problem_id", &["problem_id"], T::Integer),
    f("tags", &["tags"], T::Tags),
];

/// The standard fields a sync of `object` can map to (the primary key always becomes
/// `external_id` and is not mapped explicitly).
pub fn standard_fields(object: Object) -> &'static [StandardField] {
    match object {
        Object::Users => USER_FIELDS,
        Object::Organizations => ORGANIZATION_FIELDS,
        Object::Tickets => TICKET_FIELDS,
    }
}

pub fn standard_field(object: Object, key: &str) -> Option<&'static StandardField> {
    standard_fields(object).iter().find(|f| f.key == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_fields_are_standard_fields_of_their_object() {
        for object in [Object::Users, Object::Organizations, Object::Tickets] {
            for key in object.required_fields() {
                assert!(standard_field(object, key).is_some(), "{object} {key}");
            }
        }
    }

    #[test]
    fn custom_types_parse_by_zendesk_name() {
        assert_eq!(FieldType::parse_custom("tagger"), Some(FieldType::Dropdown));
        assert_eq!(FieldType::parse_custom("date"), Some(FieldType::Date));
        assert_eq!(FieldType::parse_custom("float"), None);
    }
}
