//! `zdsync schema`: Zendesk's field definitions of one object as a table (or JSON), with the
//! fields a sync config maps marked by the export column they come from.

use zdsync::config::{SyncConfig, Target};
use zdsync::schema::{standard_key_of_system_type, FieldDef, Schema};

/// Options shown per field before `…`.
const OPTIONS_SHOWN: usize = 3;

/// A readable table of `schema`; with `cfg`, each field the config maps shows its column, and
/// custom mappings Zendesk does not know are listed under the table.
pub fn render(schema: &Schema, cfg: Option<&SyncConfig>) -> String {
    let object = schema.object;
    let mut rows: Vec<[String; 7]> = vec![[
        "ID".into(),
        "KEY".into(),
        "TYPE".into(),
        "TITLE".into(),
        "ACTIVE".into(),
        "OPTIONS".into(),
        "MAPPED FROM".into(),
    ]];
    for f in &schema.fields {
        let ty = if f.system && object == zdsync::fields::Object::Tickets {
            format!("{} (system)", f.ty)
        } else {
            f.ty.clone()
        };
        rows.push([
            f.id.to_string(),
            f.key.clone().unwrap_or_else(|| "—".into()),
            ty,
            f.title.clone(),
            if f.active { "yes" } else { "no" }.into(),
            details(f),
            cfg.map(|c| mapped_from(c, schema, f)).unwrap_or_default(),
        ]);
    }
    let show_mapped = cfg.is_some();
    let cols = if show_mapped { 7 } else { 6 };
    let mut width = [0usize; 7];
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }

    let inactive = schema.fields.iter().filter(|f| !f.active).count();
    let mut out = format!(
        "{} {} field{}",
        schema.fields.len(),
        singular(object),
        if schema.fields.len() == 1 { "" } else { "s" }
    );
    if inactive > 0 {
        out.push_str(&format!(" ({inactive} inactive)"));
    }
    if let Some(c) = cfg {
        let mapped = c
            .mapping
            .iter()
            .filter(|m| !matches!(m.target, Target::Standard(_)))
            .count();
        out.push_str(&format!(
            "; sync `{}` maps {mapped} custom field{}",
            c.name,
            if mapped == 1 { "" } else { "s" }
        ));
    }
    out.push('\n');
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().take(cols).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < cols {
                let pad = width[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }

    if let Some(c) = cfg {
        let missing: Vec<String> = c
            .mapping
            .iter()
            .filter(|m| !matches!(m.target, Target::Standard(_)))
            .filter(|m| schema.field_for(&m.target).is_none())
            .map(|m| format!("  {} ← {} (line {})", m.field, m.column, m.line))
            .collect();
        if !missing.is_empty() {
            out.push_str("\nmapped in the config but not in Zendesk:\n");
            for m in missing {
                out.push_str(&m);
                out.push('\n');
            }
        }
    }
    out
}

/// The schema as pretty JSON (`object` and `fields`).
pub fn render_json(schema: &Schema) -> String {
    serde_json::to_string_pretty(schema).expect("a schema always serializes")
}

fn singular(object: zdsync::fields::Object) -> &'static str {
    match object {
        zdsync::fields::Object::Users => "user",
        zdsync::fields::Object::Organizations => "organization",
        zdsync::fields::Object::Tickets => "ticket",
    }
}

/// Options (`3: Free → plan_free, …`), a regexp pattern or a checkbox tag.
fn details(f: &FieldDef) -> String {
    if !f.options.is_empty() {
        let mut s = format!("{}: ", f.options.len());
        let shown: Vec<String> = f
            .options
            .iter()
            .take(OPTIONS_SHOWN)
            .map(|o| format!("{} → {}", o.name.trim(), o.value))
            .collect();
        s.push_str(&shown.join(", "));
        if f.options.len() > OPTIONS_SHOWN {
            s.push_str(", …");
        }
        return s;
    }
    if let Some(p) = &f.regexp {
        return format!("/{p}/");
    }
    if let Some(t) = &f.tag {
        return format!("tag {t}");
    }
    String::new()
}

/// The export columns of `cfg` that write `f` (custom mappings, and the standard keys that
/// write system ticket fields).
fn mapped_from(cfg: &SyncConfig, schema: &Schema, f: &FieldDef) -> String {
    let std_key = (f.system && schema.object == zdsync::fields::Object::Tickets)
        .then(|| standard_key_of_system_type(&f.ty))
        .flatten();
    let cols: Vec<String> = cfg
        .mapping
        .iter()
        .filter(|m| match &m.target {
            Target::Standard(s) => std_key
                .is_some_and(|k| s.key == k || (k == "assignee_id" && s.key == "assignee_email")),
            t => schema.field_for(t).is_some_and(|d| {
                d.id == f.id && !(d.system && schema.object == zdsync::fields::Object::Tickets)
            }),
        })
        .map(|m| format!("← {}", m.column))
        .collect();
    cols.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use zdsync::fields::Object;

    fn users() -> Schema {
        Schema::from_values(
            Object::Users,
            &[
                json!({"id": 1, "key": "nickname", "type": "text", "title": "Nickname", "active": true}),
                json!({"id": 2, "key": "plan", "type": "dropdown", "title": "Plan", "active": true,
                    "custom_field_options": [{"name": "Free", "value": "plan_free"}, {"name": "Pro", "value": "plan_pro"},
                        {"name": "Enterprise", "value": "plan_enterprise"}, {"name": "Legacy", "value": "plan_legacy"}]}),
                json!({"id": 3, "key": "code", "type": "regexp", "title": "Code", "active": false,
                    "regexp_for_validation": "^[A-Z]+$"}),
                json!({"id": 4, "key": "vip", "type": "checkbox", "title": "VIP", "tag": "vip_customer"}),
            ],
        )
    }

    fn cfg(object: &str, mapping: &str) -> SyncConfig {
        let text = format!(
            "name = \"crm\"\nobject = \"{object}\"\nmode = \"update\"\nprimary_key = \"id\"\n[source]\nlocation = \"x\"\n[zendesk]\nsubdomain = \"acme\"\n[mapping]\n{mapping}"
        );
        SyncConfig::parse(&text, "crm.toml").unwrap()
    }

    #[test]
    fn table_lists_fields_options_and_mapped_columns() {
        let s = users();
        let plain = render(&s, None);
        assert!(plain.starts_with("4 user fields (1 inactive)\n"), "{plain}");
        assert!(!plain.contains("MAPPED FROM"), "{plain}");
        assert!(
            plain.contains("4: Free → plan_free, Pro → plan_pro, Enterprise → plan_enterprise, …"),
            "{plain}"
        );
        assert!(plain.contains("/^[A-Z]+$/") && plain.contains("tag vip_customer"));
        let line = |t: &str, key: &str| {
            t.lines()
                .find(|l| l.split_whitespace().nth(1) == Some(key))
                .unwrap_or_else(|| panic!("no row {key}:\n{t}"))
                .to_string()
        };
        assert!(line(&plain, "code").contains(" no "), "{plain}");

        let c = cfg(
            "users",
            "\"user_fields.plan\" = { column = \"PLAN\", type = \"dropdown\" }\n\"user_fields.plna\" = \"X\"\nname = \"NAME\"\n",
        );
        let t = render(&s, Some(&c));
        assert!(t.contains("sync `crm` maps 2 custom fields"), "{t}");
        assert!(line(&t, "plan").ends_with("← PLAN"), "{t}");
        assert!(!line(&t, "nickname").contains('←'), "{t}");
        assert!(
            t.contains(
                "mapped in the config but not in Zendesk:\n  user_fields.plna ← X (line 11)"
            ),
            "{t}"
        );
        // Columns line up: every row's TITLE starts at the same offset as the header's.
        let at = t.lines().nth(1).unwrap().find("TITLE").unwrap();
        let nick = line(&t, "nickname");
        assert_eq!(
            nick.char_indices().nth(at).map(|(_, c)| c),
            Some('N'),
            "{t}"
        );
    }

    #[test]
    fn ticket_tables_mark_system_fields_and_standard_mappings() {
        let s = Schema::from_values(
            Object::Tickets,
            &[
                json!({"id": 10, "type": "subject", "title": "Subject", "removable": false}),
                json!({"id": 11, "type": "priority", "title": "Priority", "removable": false,
                    "system_field_options": [{"name": "Low", "value": "low"}]}),
                json!({"id": 360001, "type": "tagger", "title": "Category", "removable": true,
                    "custom_field_options": [{"name": "Billing", "value": "category_billing"}]}),
            ],
        );
        let c = cfg(
            "tickets",
            "subject = \"SUBJ\"\n\"custom_fields.360001\" = { column = \"CAT\", type = \"tagger\" }\n",
        );
        let t = render(&s, Some(&c));
        let row = |id: &str| t.lines().find(|l| l.starts_with(id)).unwrap().to_string();
        assert!(
            row("10 ").contains("subject (system)") && row("10 ").ends_with("← SUBJ"),
            "{t}"
        );
        assert!(row("11 ").contains("1: Low → low"), "{t}");
        assert!(
            row("360001").contains("—") && row("360001").ends_with("← CAT"),
            "{t}"
        );
        assert!(!t.contains("not in Zendesk"), "{t}");
    }

    #[test]
    fn json_has_object_and_fields() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&users())).unwrap();
        assert_eq!(v["object"], "users");
        assert_eq!(v["fields"][1]["key"], "plan");
        assert_eq!(v["fields"][1]["type"], "dropdown");
        assert_eq!(v["fields"][1]["options"][0]["value"], "plan_free");
        assert_eq!(v["fields"][2]["active"], false);
    }
}
