//! Per-item job results in exactly the documented shapes (zendesk-api.md §8), and the verbose
//! switch.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use zdsync_sim::*;

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

#[tokio::test]
async fn create_many_documented_shapes() {
    let t = T::new().await;
    t.sim
        .seed(
            "acme",
            &SeedData {
                users: vec![json!({"name": "Taken", "email": "taken@x.io"})],
                organizations: vec![json!({"name": "Taken"})],
                ..SeedData::default()
            },
        )
        .unwrap();
    for (path, body) in [
        (
            "/api/v2/users/create_many",
            json!({"users": [{"name": "A", "email": "a@x.io"}, {"name": "B", "email": "taken@x.io"}, {"name": "C"}]}),
        ),
        (
            "/api/v2/organizations/create_many",
            json!({"organizations": [{"name": "A"}, {"name": "Taken"}, {"name": "C"}]}),
        ),
        (
            "/api/v2/tickets/create_many",
            json!({"tickets": [{"comment": {"body": "a"}}, {"subject": "no comment"}, {"comment": {"body": "c"}}]}),
        ),
    ] {
        let job = t.run_job("POST", path, Some(body)).await;
        let res = job["results"].as_array().unwrap();
        assert_eq!(res.len(), 3, "{path}");
        for (i, r) in res.iter().enumerate() {
            assert_eq!(r["index"], i, "{path}: results keep input order");
        }
        assert_eq!(keys(&res[0]), set(&["id", "index"]), "{path}");
        assert_eq!(keys(&res[2]), set(&["id", "index"]), "{path}");
        assert_eq!(keys(&res[1]), set(&["index", "error", "details"]), "{path}");
        assert!(res[1]["error"] == "DuplicateValue" || res[1]["error"] == "RecordInvalid");
    }
}

#[tokio::test]
async fn update_and_destroy_many_documented_shapes() {
    let t = T::new().await;
    let ids = t
        .sim
        .seed(
            "acme",
            &SeedData {
                users: vec![
                    json!({"name": "A", "email": "a@x.io", "external_id": "ua"}),
                    json!({"name": "B", "email": "b@x.io", "external_id": "ub"}),
                ],
                organizations: vec![
                    json!({"name": "OA", "external_id": "oa"}),
                    json!({"name": "OB"}),
                ],
                ..SeedData::default()
            },
        )
        .unwrap();
    let (a, b) = (ids.users[0], ids.users[1]);
    let ok = set(&["id", "action", "success", "status"]);
    let failed = set(&["id", "action", "success", "error", "details"]);
    // Bulk by ids: success, unknown id.
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/users/update_many?ids={a},999"),
            Some(json!({"user": {"notes": "n"}})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(
        res[0],
        json!({"id": a, "action": "update", "success": true, "status": "Updated"})
    );
    assert_eq!(keys(&res[1]), failed);
    assert_eq!(res[1]["id"], 999);
    // Bulk by external ids: known, unknown (no id; external_id names the key).
    let job = t
        .run_job(
            "PUT",
            "/api/v2/users/update_many?external_ids=ub,nobody",
            Some(json!({"user": {"notes": "n"}})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(keys(&res[0]), ok);
    assert_eq!(res[0]["id"], b);
    assert_eq!(
        res[1],
        json!({"external_id": "nobody", "action": "update", "success": false, "error": "RecordNotFound", "details": "RecordNotFound"})
    );
    // Batch: a validation failure on a known record names it by id.
    let job = t
        .run_job(
            "PUT",
            "/api/v2/organizations/update_many",
            Some(json!({"organizations": [
                {"id": ids.organizations[0], "notes": "x"},
                {"id": ids.organizations[1], "name": "OA"},
                {"external_id": "oa", "notes": "y"},
            ]})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(keys(&res[0]), ok);
    assert_eq!(keys(&res[1]), failed);
    assert_eq!(res[1]["id"], ids.organizations[1]);
    assert_eq!(res[1]["error"], "DuplicateValue");
    assert_eq!(keys(&res[2]), ok);
    assert_eq!(res[2]["id"], ids.organizations[0]);
    // destroy_many.
    let job = t
        .run_job(
            "DELETE",
            &format!("/api/v2/users/destroy_many?ids={b},12345"),
            None,
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(
        res[0],
        json!({"id": b, "action": "delete", "success": true, "status": "Deleted"})
    );
    assert_eq!(
        res[1],
        json!({"id": 12345, "action": "delete", "success": false, "error": "RecordNotFound", "details": "RecordNotFound"})
    );
}

#[tokio::test]
async fn create_or_update_many_documented_shapes() {
    let t = T::new().await;
    let ids = t
        .sim
        .seed(
            "acme",
            &SeedData {
                users: vec![json!({"name": "A", "email": "a@x.io", "external_id": "ua"})],
                ..SeedData::default()
            },
        )
        .unwrap();
    let body = json!({"users": [
        {"name": "A2", "email": "a@x.io"},
        {"name": "No email", "external_id": "ne"},
        {"name": "Bad", "email": "not an email", "external_id": "bad"},
        {"name": "New", "email": "new@x.io", "external_id": "nw"},
    ]});
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_or_update_many",
            Some(body.clone()),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(
        res[0],
        json!({"id": ids.users[0], "status": "Updated", "email": "a@x.io"})
    );
    assert_eq!(keys(&res[1]), set(&["id", "status"]));
    assert_eq!(res[1]["status"], "Created");
    // A failed item's id is its input position.
    assert_eq!(
        res[2],
        json!({"id": 2, "status": "Failed", "error": "UserUpdateError", "details": "Email: not an email is not properly formatted"})
    );
    assert_eq!(keys(&res[3]), set(&["id", "status", "email"]));
    // The unconfirmed external_id echo is a switch.
    t.sim
        .update_behavior(|b| b.upsert_echoes_external_id = true);
    let job = t
        .run_job("POST", "/api/v2/users/create_or_update_many", Some(body))
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(keys(&res[0]), set(&["id", "status", "email"]));
    assert_eq!(keys(&res[1]), set(&["id", "status", "external_id"]));
    assert_eq!(res[1]["status"], "Updated");
    assert_eq!(
        keys(&res[2]),
        set(&["id", "status", "error", "details", "external_id"])
    );
    // Without the id-is-position reading a failed item names nothing.
    t.sim.update_behavior(|b| {
        b.upsert_echoes_external_id = false;
        b.failed_item_id_is_index = false;
    });
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_or_update_many",
            Some(json!({"users": [{"name": "Bad", "email": "bad"}]})),
        )
        .await;
    assert_eq!(
        keys(&job["results"][0]),
        set(&["status", "error", "details"])
    );
}

#[tokio::test]
async fn verbose_switch_restores_the_older_shapes() {
    let mut cfg = SimConfig::default();
    cfg.behavior.job_results = JobResults::Verbose;
    cfg.behavior.result_index_base = 1;
    let t = T::start(cfg).await;
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many",
            Some(json!({"users": [{"name": "A", "email": "a@x.io"}, {"email": "b@x.io"}]})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    let a = res[0]["id"].as_u64().unwrap();
    assert_eq!(
        res[0],
        json!({"id": a, "index": 1, "action": "create", "success": true, "status": "Created"})
    );
    assert_eq!(
        keys(&res[1]),
        set(&["index", "action", "success", "status", "error", "details"])
    );
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/users/update_many?ids={a},7"),
            Some(json!({"user": {"notes": "n"}})),
        )
        .await;
    assert_eq!(
        job["results"][0],
        json!({"id": a, "index": 1, "action": "update", "success": true, "status": "Updated"})
    );
    assert_eq!(
        job["results"][1],
        json!({"id": 7, "index": 2, "action": "update", "success": false, "status": "Failed", "error": "RecordNotFound", "details": "RecordNotFound"})
    );
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_or_update_many",
            Some(
                json!({"users": [{"name": "A", "email": "a@x.io"}, {"name": "X", "email": "bad"}]}),
            ),
        )
        .await;
    assert_eq!(
        job["results"][0],
        json!({"id": a, "index": 1, "status": "Updated", "success": true, "email": "a@x.io"})
    );
    assert_eq!(
        keys(&job["results"][1]),
        set(&["id", "index", "status", "success", "error", "details", "email"])
    );
    // The switch is in the admin JSON too.
    let v: Value = t.get("/__sim/behavior").await.json;
    assert_eq!(v["job_results"], "verbose");
    assert_eq!(v["upsert_echoes_external_id"], false);
    t.sim
        .update_behavior(|b| b.job_results = JobResults::Documented);
    let job = t
        .run_job(
            "POST",
            "/api/v2/organizations/create_many",
            Some(json!({"organizations": [{"name": "O"}]})),
        )
        .await;
    assert_eq!(keys(&job["results"][0]), set(&["id", "index"]));
    assert_eq!(job["results"][0]["index"], 1);
}

#[tokio::test]
async fn killed_jobs_report_the_prefix_done() {
    let t = T::new().await;
    t.sim.set_fault_rules(vec![
        FaultRule::new(FaultKind::KillJob).times(1),
        FaultRule::new(FaultKind::FailItems)
            .fraction(1.0)
            .path("/api/v2/users/update_many"),
    ]);
    let users: Vec<Value> = (0..6).map(|i| json!({"name": format!("u{i}")})).collect();
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many",
            Some(json!({ "users": users })),
        )
        .await;
    assert_eq!(job["status"], "killed");
    let res = job["results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    for (i, r) in res.iter().enumerate() {
        assert_eq!(keys(r), set(&["id", "index"]));
        assert_eq!(r["index"], i);
    }
    // Forced item failures on a bulk update are FailedResults naming the record.
    let id = res[0]["id"].as_u64().unwrap();
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/users/update_many?ids={id}"),
            Some(json!({"user": {"notes": "x"}})),
        )
        .await;
    assert_eq!(
        job["results"][0],
        json!({"id": id, "action": "update", "success": false, "error": "InternalError", "details": "Simulated failure of this item"})
    );
}
