//! Schema introspection: config validation against Zendesk's field definitions, dropdown label
//! translation and option refusals through `plan`, and the simulator's schema fetched over HTTP.

use serde_json::{json, Value};
use std::sync::Arc;
use zdsync::changeset::{self, ChunkRow, Op};
use zdsync::config::SyncConfig;
use zdsync::fields::Object;
use zdsync::plan::{plan, PlanOptions};
use zdsync::schema::{self, Schema};
use zdsync::store::{LocalStore, ObjectStore};

/// User fields as `GET /api/v2/user_fields` returns them (trimmed to what matters).
fn user_fields() -> Vec<Value> {
    vec![
        json!({"id": 360000000001u64, "url": "x", "key": "nickname", "type": "text", "title": "Nickname",
            "raw_title": "Nickname", "position": 0, "active": true, "system": false,
            "regexp_for_validation": null, "created_at": "2020-01-01T00:00:00Z"}),
        json!({"id": 360000000002u64, "key": "signup_date", "type": "date", "title": "Signup date", "active": true}),
        json!({"id": 360000000003u64, "key": "account_code", "type": "regexp", "title": "Account code",
            "active": true, "regexp_for_validation": "^[A-Z]{3}-[0-9]{4}$"}),
        json!({"id": 360000000004u64, "key": "plan", "type": "dropdown", "title": "Plan", "active": true,
            "custom_field_options": [
                {"id": 1, "name": "Free", "raw_name": "Free", "value": "plan_free", "position": 0},
                {"id": 2, "name": "Pro", "raw_name": "Pro", "value": "plan_pro", "position": 1},
                {"id": 3, "name": "Enterprise", "raw_name": "Enterprise", "value": "plan_enterprise", "position": 2}]}),
        json!({"id": 360000000005u64, "key": "legacy_tier", "type": "text", "title": "Legacy tier", "active": false}),
    ]
}

fn ticket_fields() -> Vec<Value> {
    vec![
        json!({"id": 1, "type": "subject", "title": "Subject", "removable": false, "active": true}),
        json!({"id": 2, "type": "priority", "title": "Priority", "removable": false, "active": true,
            "system_field_options": [{"name": "Low", "value": "low"}, {"name": "High", "value": "high"}]}),
        json!({"id": 360000000020u64, "type": "tagger", "title": "Category", "removable": true, "active": true,
            "custom_field_options": [{"name": "Billing", "value": "category_billing"}]}),
        json!({"id": 360000000021u64, "type": "text", "title": "Order number", "removable": true, "active": true}),
    ]
}

fn users_config(mapping: &str) -> String {
    format!(
        r#"name = "people"
object = "users"
mode = "upsert"
primary_key = "id"

[source]
location = "exports/people/"

[zendesk]
subdomain = "acme"

[mapping]
name = "name"
email = "email"
{mapping}"#
    )
}

fn validate(schema: &Schema, config: &str) -> Result<(), String> {
    let cfg = SyncConfig::parse(config, "people.toml").unwrap();
    schema.validate(&cfg).map_err(|e| e.to_string())
}

#[test]
fn unknown_key_names_the_mapping_line_and_the_available_keys() {
    let s = Schema::from_values(Object::Users, &user_fields());
    let e = validate(
        &s,
        &users_config("\"user_fields.plna\" = { column = \"PLAN\", type = \"dropdown\" }\n"),
    )
    .unwrap_err();
    assert!(
        e.contains("mapping `user_fields.plna` (line 15)")
            && e.contains("Zendesk has no user field with key `plna`")
            && e.contains("did you mean `plan`?")
            && e.contains("user fields are: nickname, signup_date, account_code, plan"),
        "{e}"
    );
    assert!(
        !e.contains("legacy_tier"),
        "inactive fields are not offered: {e}"
    );
}

#[test]
fn inactive_and_mistyped_fields_are_refused() {
    let s = Schema::from_values(Object::Users, &user_fields());
    let e = validate(
        &s,
        &users_config("\"user_fields.legacy_tier\" = \"TIER\"\n"),
    )
    .unwrap_err();
    assert!(
        e.contains("line 15") && e.contains("`legacy_tier`") && e.contains("inactive in Zendesk"),
        "{e}"
    );
    let e = validate(
        &s,
        &users_config(
            "\"user_fields.signup_date\" = { column = \"SINCE\", type = \"checkbox\" }\n",
        ),
    )
    .unwrap_err();
    assert!(
        e.contains("declared as `checkbox`")
            && e.contains("`signup_date` (\"Signup date\") is `date`")
            && e.contains("type = \"date\""),
        "{e}"
    );
    // A dropdown mapped without a type is declared `text`.
    let e = validate(&s, &users_config("\"user_fields.plan\" = \"PLAN\"\n")).unwrap_err();
    assert!(
        e.contains("declared as `text`") && e.contains("is `dropdown`"),
        "{e}"
    );
    // Text into a regexp field, tagger for a dropdown: fine.
    validate(
        &s,
        &users_config(
            "\"user_fields.account_code\" = \"CODE\"\n\"user_fields.plan\" = { column = \"PLAN\", type = \"tagger\" }\n",
        ),
    )
    .unwrap();
}

#[test]
fn ticket_fields_are_checked_by_id_and_system_fields_are_pointed_at_their_standard_key() {
    let s = Schema::from_values(Object::Tickets, &ticket_fields());
    let cfg = |mapping: &str| {
        format!(
            "name = \"t\"\nobject = \"tickets\"\nmode = \"upsert\"\nprimary_key = \"id\"\n[source]\nlocation = \"x\"\n[zendesk]\nsubdomain = \"acme\"\n[mapping]\nsubject = \"s\"\ndescription = \"d\"\npriority = \"p\"\n{mapping}"
        )
    };
    validate(
        &s,
        &cfg("\"custom_fields.360000000020\" = { column = \"c\", type = \"tagger\" }\n"),
    )
    .unwrap();
    let e = validate(&s, &cfg("\"custom_fields.99\" = \"x\"\n")).unwrap_err();
    assert!(
        e.contains("mapping `custom_fields.99` (line 13)")
            && e.contains("no ticket field with id 99")
            && e.contains("360000000020 Category (tagger), 360000000021 Order number (text)")
            && !e.contains("Subject"),
        "{e}"
    );
    let e = validate(&s, &cfg("\"custom_fields.2\" = \"x\"\n")).unwrap_err();
    assert!(
        e.contains("system field `Priority`") && e.contains("standard key `priority`"),
        "{e}"
    );
}

/// A tiny users export planned with the schema: labels become option values, unknown options
/// and pattern mismatches become invalid rows.
#[test]
fn plan_translates_labels_and_refuses_unknown_options() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path());
    store
        .put(
            "exports/people/part-0.csv",
            b"id,name,email,plan,code\n\
              1,Ada,ada@example.com,Pro,ABC-1234\n\
              2,Bob,bob@example.com,plan_enterprise,XYZ-0001\n\
              3,Cy,cy@example.com,Platinum,ABC-1234\n\
              4,Di,di@example.com,free,abc\n",
        )
        .unwrap();
    let cfg = SyncConfig::parse(
        &users_config(
            "\"user_fields.plan\" = { column = \"plan\", type = \"dropdown\" }\n\"user_fields.account_code\" = \"code\"\n",
        ),
        "people.toml",
    )
    .unwrap();
    let schema = Schema::from_values(Object::Users, &user_fields());
    schema.validate(&cfg).unwrap();
    let mut opts = PlanOptions::new("run-001");
    opts.schema = Some(Arc::new(schema));
    let report = plan(&store, &cfg, &opts).unwrap();

    let invalid = &report.invalid_by_reason["invalid_value"];
    assert_eq!(invalid.count, 2, "{:#?}", report.invalid_by_reason);
    let by_pk = |pk: &str| {
        invalid
            .samples
            .iter()
            .find(|r| r.pk.as_deref() == Some(pk))
            .unwrap_or_else(|| panic!("no invalid row {pk}: {:#?}", invalid.samples))
    };
    let platinum = by_pk("3");
    assert_eq!(platinum.field.as_deref(), Some("user_fields.plan"));
    assert!(
        platinum.message.contains("\"Platinum\" is not an option")
            && platinum
                .message
                .contains("Free (plan_free), Pro (plan_pro), Enterprise (plan_enterprise)"),
        "{}",
        platinum.message
    );
    let code = by_pk("4");
    assert_eq!(code.field.as_deref(), Some("user_fields.account_code"));
    assert!(
        code.message.contains("^[A-Z]{3}-[0-9]{4}$"),
        "{}",
        code.message
    );

    let manifest = changeset::read_manifest(&store, report.manifest_key.as_ref().unwrap()).unwrap();
    let rows: Vec<ChunkRow> = manifest
        .chunks
        .iter()
        .filter(|c| c.op == Op::Create)
        .flat_map(|c| changeset::read_jsonl::<ChunkRow>(&store, &c.key).unwrap())
        .collect();
    let plan_of = |pk: &str| {
        rows.iter().find(|r| r.key == pk).unwrap().payload["user_fields"]["plan"].clone()
    };
    assert_eq!(rows.len(), 2);
    assert_eq!(plan_of("1"), "plan_pro");
    assert_eq!(plan_of("2"), "plan_enterprise");
}

/// The simulator's default fields, fetched through the client, validate a real mapping and
/// refuse a typo.
#[tokio::test]
async fn fetches_the_simulators_schema() {
    use zdsync::zendesk::{credential_store, Client, ClientOptions};
    use zdsync_sim::{SimConfig, Simulator, DEFAULT_API_TOKEN};

    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("zendesk.json"),
        json!({"email": "admin@acme.test", "api_token": DEFAULT_API_TOKEN}).to_string(),
    )
    .unwrap();
    let store = credential_store("file:zendesk.json", dir.path()).unwrap();
    let client = Client::new(
        ClientOptions::for_subdomain("acme", Some(&sim.base_url())),
        store,
    )
    .await
    .unwrap();

    let users = schema::fetch(&client, Object::Users).await.unwrap();
    let keys: Vec<_> = users
        .fields
        .iter()
        .filter_map(|f| f.key.as_deref())
        .collect();
    assert_eq!(
        keys,
        [
            "nickname",
            "bio",
            "vip",
            "signup_date",
            "seats",
            "lifetime_value",
            "account_code",
            "plan",
            "interests",
            "account_manager"
        ]
    );
    let plan_field = users.by_key("plan").unwrap();
    assert_eq!(plan_field.ty, "dropdown");
    assert_eq!(
        plan_field
            .options
            .iter()
            .map(|o| (o.name.as_str(), o.value.as_str()))
            .collect::<Vec<_>>(),
        [
            ("Free", "plan_free"),
            ("Pro", "plan_pro"),
            ("Enterprise", "plan_enterprise")
        ]
    );
    assert_eq!(
        users.by_key("vip").unwrap().tag.as_deref(),
        Some("vip_customer")
    );
    assert_eq!(
        users.by_key("account_code").unwrap().regexp.as_deref(),
        Some("^[A-Z]{3}-[0-9]{4}$")
    );

    validate(
        &users,
        &users_config(
            "\"user_fields.plan\" = { column = \"PLAN\", type = \"dropdown\" }\n\"user_fields.interests\" = { column = \"I\", type = \"multiselect\" }\n\"user_fields.signup_date\" = { column = \"S\", type = \"date\" }\n\"user_fields.account_code\" = \"C\"\n",
        ),
    )
    .unwrap();
    let e = validate(
        &users,
        &users_config("\"user_fields.sigup_date\" = { column = \"S\", type = \"date\" }\n"),
    )
    .unwrap_err();
    assert!(e.contains("did you mean `signup_date`?"), "{e}");

    let tickets = schema::fetch(&client, Object::Tickets).await.unwrap();
    let subject = tickets.fields.iter().find(|f| f.ty == "subject").unwrap();
    assert!(subject.system);
    let priority = tickets.fields.iter().find(|f| f.ty == "priority").unwrap();
    assert!(priority.options.iter().any(|o| o.value == "urgent"));
    let category = tickets
        .fields
        .iter()
        .find(|f| f.title == "Category")
        .unwrap();
    assert!(!category.system && category.ty == "tagger" && category.options.len() == 3);

    let orgs = schema::fetch(&client, Object::Organizations).await.unwrap();
    assert_eq!(orgs.by_key("segment").unwrap().options.len(), 3);
}
