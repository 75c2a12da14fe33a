//! `zdsync init`: a config from an export and the simulator's fields, which parses and plans.

mod common;

use common::{text, zdsync};
use serde_json::json;
use std::path::Path;
use zdsync::config::SyncConfig;
use zdsync_sim::{FieldsFixture, SimConfig, SimHandle, Simulator};

fn start_sim(rt: &tokio::runtime::Runtime) -> SimHandle {
    let fields = json!({
        "user_fields": [
            {"key": "plan_tier", "type": "dropdown", "title": "Plan tier", "custom_field_options": [
                {"name": "Pro", "value": "plan_pro"},
                {"name": "Starter", "value": "plan_starter"}]},
            {"key": "lifetime_value", "type": "decimal", "title": "Lifetime value"}
        ],
        "organization_fields": [],
        "ticket_fields": []
    });
    let cfg = SimConfig {
        fields: Some(serde_json::from_value::<FieldsFixture>(fields).unwrap()),
        ..SimConfig::default()
    };
    rt.block_on(Simulator::start(cfg)).unwrap()
}

fn write(root: &Path, rel: &str, body: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

fn credentials(root: &Path) {
    write(
        root,
        "config/credentials.json",
        &format!(
            "{{\"email\":\"admin@acme.test\",\"api_token\":\"{}\"}}",
            zdsync_sim::DEFAULT_API_TOKEN
        ),
    );
}

#[test]
fn init_maps_standard_and_custom_columns_and_the_config_plans() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = start_sim(&rt);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    credentials(root);
    write(
        root,
        "exports/people/part-0000.csv",
        "USER_ID,Full_Name,EMAIL,PHONE,PLAN_TIER,Lifetime Value,FAVOURITE_COLOUR\n\
         u-1,Ada Lovelace,ada@example.com,+44 1,Pro,10.5,blue\n\
         u-2,Grace Hopper,grace@example.com,,platinum,20,red\n\
         u-3,Alan Turing,alan@example.com,+44 3,plan_starter,,green\n",
    );
    let out = root.join("config/people.toml");
    let o = zdsync()
        .current_dir(root)
        .args([
            "init",
            "exports/people",
            "--object",
            "users",
            "--subdomain",
            "acme",
        ])
        .args(["--base-url", &sim.base_url()])
        .args(["--credentials", "file:credentials.json"])
        .args(["--output", "config/people.toml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("zdsync plan config/people.toml"),
        "{stdout}"
    );

    let body = std::fs::read_to_string(&out).unwrap();
    let cfg = SyncConfig::parse(&body, "people.toml").unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(cfg.primary_key, "USER_ID", "{body}");
    assert_eq!(cfg.mode.as_str(), "upsert", "{body}");
    assert_eq!(cfg.source.location, "exports/people/", "{body}");
    assert!(
        body.contains("REVIEW: primary key guessed from column `USER_ID`"),
        "{body}"
    );
    assert!(body.contains("name = \"Full_Name\""), "{body}");
    assert!(body.contains("email = \"EMAIL\""), "{body}");
    assert!(body.contains("phone = \"PHONE\""), "{body}");
    assert!(
        body.contains(
            "\"user_fields.plan_tier\" = { column = \"PLAN_TIER\", type = \"dropdown\" }"
        ),
        "{body}"
    );
    assert!(
        body.contains("plan_pro (Pro), plan_starter (Starter)"),
        "{body}"
    );
    assert!(
        body.contains("not options: \"platinum\"") && !body.contains("\"plan_starter\","),
        "{body}"
    );
    assert!(
        body.contains(
            "\"user_fields.lifetime_value\" = { column = \"Lifetime Value\", type = \"decimal\" }"
        ),
        "{body}"
    );
    assert!(
        body.contains("# ? = \"FAVOURITE_COLOUR\"   # no Zendesk field matches"),
        "{body}"
    );
    assert_eq!(cfg.mapping.len(), 5, "{body}");

    // No overwrite without --force.
    let again = zdsync()
        .current_dir(root)
        .args([
            "init",
            "exports/people",
            "--object",
            "users",
            "--subdomain",
            "acme",
        ])
        .args(["--offline", "--output", "config/people.toml"])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("--force"), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), body);

    let plan = zdsync()
        .current_dir(root)
        .args(["plan", "config/people.toml"])
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}\n{body}", text(&plan));
}

#[test]
fn init_offline_on_the_shipped_example_plans() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/exports/crm_users");
    for e in std::fs::read_dir(&examples).unwrap() {
        let e = e.unwrap();
        write(
            root,
            &format!("exports/crm_users/{}", e.file_name().to_string_lossy()),
            &std::fs::read_to_string(e.path()).unwrap(),
        );
    }
    let o = zdsync()
        .current_dir(root)
        .args(["init", "exports/crm_users", "--object", "users"])
        .args(["--subdomain", "acme", "--offline"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let body = std::fs::read_to_string(root.join("crm_users.toml")).unwrap();
    let cfg = SyncConfig::parse(&body, "crm_users.toml").unwrap();
    assert!(body.contains("--offline: Zendesk was not read"), "{body}");
    assert_eq!(cfg.primary_key, "USER_ID");
    assert!(body.contains("name = \"FULL_NAME\"") && body.contains("tags = \"SEGMENTS\""));
    assert!(
        body.contains("# ? = \"PLAN\"   # no Zendesk field matches"),
        "{body}"
    );
    let plan = zdsync()
        .current_dir(root)
        .args(["plan", "crm_users.toml", "--offline"])
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}\n{body}", text(&plan));

    // --force overwrites.
    let o = zdsync()
        .current_dir(root)
        .args(["init", "exports/crm_users", "--object", "users"])
        .args([
            "--subdomain",
            "acme",
            "--offline",
            "--force",
            "--name",
            "crm",
        ])
        .args(["--output", "crm_users.toml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let body = std::fs::read_to_string(root.join("crm_users.toml")).unwrap();
    assert!(body.contains("name = \"crm\""), "{body}");
}

#[test]
fn init_reads_a_pipe_delimited_file_and_names_its_delimiter() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "unload/orgs.csv",
        "ORG_KEY|Organization Name|DOMAINS|NOTES\nk1|Acme|acme.test|a\nk2|Initech|initech.test|\n",
    );
    let o = zdsync()
        .current_dir(root)
        .args(["init", "unload/orgs.csv", "--object", "organizations"])
        .args(["--subdomain", "acme", "--offline", "-o", "orgs.toml"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let body = std::fs::read_to_string(root.join("orgs.toml")).unwrap();
    let cfg = SyncConfig::parse(&body, "orgs.toml").unwrap();
    assert_eq!(cfg.primary_key, "ORG_KEY", "{body}");
    assert_eq!(cfg.source.location, "unload/orgs.csv", "{body}");
    assert!(body.contains("delimiter = \"|\""), "{body}");
    assert!(
        body.contains("name = \"Organization Name\"")
            && body.contains("domain_names = \"DOMAINS\"")
            && body.contains("notes = \"NOTES\""),
        "{body}"
    );
    let plan = zdsync()
        .current_dir(root)
        .args(["plan", "orgs.toml", "--offline"])
        .output()
        .unwrap();
    assert!(plan.status.success(), "{}\n{body}", text(&plan));
}
