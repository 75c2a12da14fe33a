//! Users, organizations, tickets, tags and custom fields over HTTP.

mod common;

use common::*;
use serde_json::{json, Value};
use zdsync_sim::*;

#[tokio::test]
async fn users_single_endpoints() {
    let t = T::new().await;
    let r = t
        .post("/api/v2/users.json", json!({"user": {"name": "Ann", "email": "ann@x.io", "external_id": "U1", "bogus_key": 1, "user_fields": {"vip": true, "plan": "plan_pro", "nope": 1}}}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.json["user"]["id"].as_u64().unwrap();
    assert!(id > u32::MAX as u64);
    assert_eq!(
        r.header("location"),
        Some(&*format!("{}/api/v2/users/{id}.json", t.base))
    );
    let u = &r.json["user"];
    assert_eq!(u["role"], "end-user");
    assert!(u.get("bogus_key").is_none());
    assert_eq!(u["user_fields"]["vip"], true);
    assert_eq!(u["user_fields"]["plan"], "plan_pro");
    assert!(u["user_fields"].get("nope").is_none());
    assert_eq!(u["user_fields"]["seats"], Value::Null);
    // Tag-backed fields add their tags.
    assert_eq!(u["tags"], json!(["plan_pro", "vip_customer"]));
    assert!(u["created_at"].as_str().unwrap().ends_with('Z'));

    // Validation errors: exact envelopes.
    let r = t
        .post("/api/v2/users", json!({"user": {"email": "ann@x.io"}}))
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json,
        json!({"error": "RecordInvalid", "description": "Record validation errors", "details": {
            "name": [{"description": "Name: cannot be blank", "error": "BlankValue"}],
            "email": [{"description": "Email: ann@x.io is already being used by another user", "error": "DuplicateValue"}]
        }})
    );
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "B", "email": "not-an-email"}}),
        )
        .await;
    assert_eq!(
        r.json["details"]["email"][0]["description"],
        "Email: not-an-email is not properly formatted"
    );
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "B", "user_fields": {"signup_date": "2021-04-16T10:00:00Z"}}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["signup_date"][0],
        json!({"description": "Signup date is not valid", "error": "InvalidValue"})
    );
    let r = t.post("/api/v2/users", json!({})).await;
    assert_eq!(r.status, 400);

    // Update: a different email adds an identity; external_id is case-insensitively unique.
    let r = t
        .put(
            &format!("/api/v2/users/{id}.json"),
            json!({"user": {"email": "ann2@x.io", "user_fields": {"signup_date": "2021-04-16"}}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["user"]["email"], "ann@x.io");
    assert_eq!(
        r.json["user"]["user_fields"]["signup_date"],
        "2021-04-16T00:00:00Z"
    );
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "C", "external_id": "u1"}}),
        )
        .await;
    assert_eq!(
        r.json["details"]["external_id"][0]["error"],
        "DuplicateValue"
    );
    assert_eq!(
        t.put("/api/v2/users/1.json", json!({"user": {"name": "x"}}))
            .await
            .status,
        404
    );

    // create_or_update: 200 when it existed (matched by external_id, any case; or by the added
    // identity), 201 when created.
    let r = t
        .post(
            "/api/v2/users/create_or_update.json",
            json!({"user": {"name": "Ann B", "external_id": "u1"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["user"]["id"], id);
    assert_eq!(r.json["user"]["external_id"], "u1");
    assert!(r.header("location").is_some());
    let r = t
        .post(
            "/api/v2/users/create_or_update",
            json!({"user": {"name": "Ann C", "email": "ANN2@x.io"}}),
        )
        .await;
    assert_eq!((r.status, r.json["user"]["id"].as_u64()), (200, Some(id)));
    let r = t
        .post(
            "/api/v2/users/create_or_update",
            json!({"user": {"name": "Dan", "email": "dan@x.io"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let dan = r.json["user"]["id"].as_u64().unwrap();
    // external_id of one user + email of another: the documented conflict.
    let r = t
        .post(
            "/api/v2/users/create_or_update",
            json!({"user": {"name": "X", "email": "dan@x.io", "external_id": "U1"}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["email"][0]["description"],
        "Email: dan@x.io is already being used by another user"
    );

    // Lookups.
    let r = t.get("/api/v2/users.json?external_id=U1").await;
    assert_eq!(r.json["users"][0]["id"], id);
    assert_eq!(r.json["count"], 1);
    let r = t
        .get("/api/v2/users/search.json?query=email:dan@x.io")
        .await;
    assert_eq!(r.json["users"][0]["id"], dan);
    let r = t.get("/api/v2/users/search.json?external_id=u1").await;
    assert_eq!(r.json["users"][0]["id"], id);
    let r = t
        .get("/api/v2/search.json?query=type:user%20email:ann2@x.io")
        .await;
    assert_eq!(r.json["results"][0]["id"], id);
    assert_eq!(r.json["results"][0]["result_type"], "user");
    let r = t
        .get(&format!("/api/v2/users/show_many.json?ids={id},{dan},999"))
        .await;
    assert_eq!(r.json["users"].as_array().unwrap().len(), 2);
    let r = t.get("/api/v2/users/show_many.json?external_ids=U1").await;
    assert_eq!(r.json["users"][0]["id"], id);
    let ids: Vec<String> = (1..=101).map(|i| i.to_string()).collect();
    let r = t
        .get(&format!(
            "/api/v2/users/show_many.json?ids={}",
            ids.join(",")
        ))
        .await;
    assert_eq!(r.status, 400);

    // Delete returns 200 with the user.
    let r = t.delete(&format!("/api/v2/users/{dan}.json")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["user"]["active"], false);
    assert_eq!(t.get(&format!("/api/v2/users/{dan}")).await.status, 404);
}

#[tokio::test]
async fn users_bulk_jobs() {
    let t = T::new().await;
    t.post(
        "/api/v2/users",
        json!({"user": {"name": "Old", "email": "old@x.io"}}),
    )
    .await;
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_many.json",
            Some(json!({"users": [
                {"name": "A", "email": "a@x.io", "external_id": "a"},
                {"name": "B", "email": "old@x.io"},
                {"email": "c@x.io"},
                {"name": "D", "user_fields": {"plan": "gold"}},
            ]})),
        )
        .await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["total"], 4);
    assert_eq!(job["progress"], 4);
    assert_eq!(job["job_type"], "bulk_create_job");
    assert!(job["message"]
        .as_str()
        .unwrap()
        .starts_with("Completed at "));
    let res = job["results"].as_array().unwrap();
    let a_id = res[0]["id"].as_u64().unwrap();
    assert_eq!(res[0], json!({"id": a_id, "index": 0}));
    assert_eq!(
        res[1],
        json!({"index": 1, "error": "DuplicateValue", "details": "Email: old@x.io is already being used by another user"})
    );
    assert_eq!(res[2]["details"], "Name: cannot be blank");
    assert_eq!(res[3]["details"], "Plan is not valid");
    assert_eq!(res[3]["error"], "RecordInvalid");

    // create_or_update_many: input order kept, Created / Updated / Failed.
    let job = t
        .run_job(
            "POST",
            "/api/v2/users/create_or_update_many",
            Some(json!({"users": [
                {"name": "A2", "external_id": "A"},
                {"name": "E", "email": "e@x.io"},
                {"name": "F", "email": "bad email"},
                {"name": "G", "email": "old@x.io", "external_id": "a"},
            ]})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(res[0], json!({"id": a_id, "status": "Updated"}));
    assert_eq!(res[1]["status"], "Created");
    assert_eq!(res[1]["email"], "e@x.io");
    assert_eq!(
        res[2],
        json!({"id": 2, "status": "Failed", "error": "UserUpdateError", "details": "Email: bad email is not properly formatted"})
    );
    assert_eq!(
        res[3]["details"],
        "Email: old@x.io is already being used by another user"
    );

    // update_many: bulk by ids / external_ids, batch by id / external_id.
    let e_id = res[1]["id"].as_u64().unwrap();
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/users/update_many.json?ids={a_id},{e_id},5"),
            Some(json!({"user": {"notes": "bulk"}})),
        )
        .await;
    let res = job["results"].as_array().unwrap();
    assert_eq!(
        res[0],
        json!({"id": a_id, "action": "update", "success": true, "status": "Updated"})
    );
    assert_eq!(
        res[2],
        json!({"id": 5, "action": "update", "success": false, "error": "RecordNotFound", "details": "RecordNotFound"})
    );
    let job = t
        .run_job(
            "PUT",
            "/api/v2/users/update_many?external_ids=a,zz",
            Some(json!({"user": {"notes": "ext"}})),
        )
        .await;
    assert_eq!(job["results"][0]["status"], "Updated");
    assert_eq!(
        job["results"][1],
        json!({"external_id": "zz", "action": "update", "success": false, "error": "RecordNotFound", "details": "RecordNotFound"})
    );
    let job = t
        .run_job(
            "PUT",
            "/api/v2/users/update_many",
            Some(
                json!({"users": [{"id": e_id, "name": "E2"}, {"external_id": "a", "name": "A3"}]}),
            ),
        )
        .await;
    assert_eq!(job["results"][1]["status"], "Updated");
    let s = t.sim.state("acme").unwrap();
    assert_eq!(s.user(e_id).unwrap()["name"], "E2");
    assert_eq!(s.user(a_id).unwrap()["name"], "A3");
    assert_eq!(s.user(a_id).unwrap()["notes"], "ext");

    // destroy_many.
    let job = t
        .run_job(
            "DELETE",
            &format!("/api/v2/users/destroy_many.json?ids={e_id},77"),
            None,
        )
        .await;
    assert_eq!(
        job["results"][0],
        json!({"id": e_id, "action": "delete", "success": true, "status": "Deleted"})
    );
    assert_eq!(job["results"][1]["error"], "RecordNotFound");
    assert!(t.sim.state("acme").unwrap().user(e_id).is_none());

    // 100-item limit and missing root.
    let many: Vec<Value> = (0..101).map(|i| json!({"name": format!("n{i}")})).collect();
    let r = t
        .post("/api/v2/users/create_many", json!({"users": many}))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json["error"], "TooManyValues");
    let r = t
        .post("/api/v2/users/create_many", json!({"user": {}}))
        .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn organizations() {
    let t = T::new().await;
    let r = t
        .post("/api/v2/organizations.json", json!({"organization": {"name": "Acme", "external_id": "O1", "domain_names": ["a.io"], "organization_fields": {"segment": "segment_smb", "renewal_date": "2024-02-29", "arr": 12.5}}}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let o = r.json["organization"].clone();
    let id = o["id"].as_u64().unwrap();
    assert_eq!(
        o["organization_fields"]["renewal_date"],
        "2024-02-29T00:00:00+00:00"
    );
    assert_eq!(o["organization_fields"]["arr"], 12.5);
    assert_eq!(o["tags"], json!(["segment_smb"]));
    let r = t
        .post(
            "/api/v2/organizations",
            json!({"organization": {"name": "acme"}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["name"][0],
        json!({"description": "Name: acme has already been taken", "error": "DuplicateValue"})
    );
    // create_or_update never matches by name.
    let r = t
        .post(
            "/api/v2/organizations/create_or_update",
            json!({"organization": {"name": "Acme", "notes": "n"}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json["error"], "RecordInvalid");
    let r = t
        .post(
            "/api/v2/organizations/create_or_update",
            json!({"organization": {"external_id": "o1", "domain_names": ["b.io"]}}),
        )
        .await;
    assert_eq!(
        (r.status, r.json["organization"]["id"].as_u64()),
        (200, Some(id))
    );
    assert_eq!(r.json["organization"]["domain_names"], json!(["b.io"]));
    let r = t
        .post(
            "/api/v2/organizations/create_or_update",
            json!({"organization": {"name": "New", "external_id": "O2"}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let o2 = r.json["organization"]["id"].as_u64().unwrap();
    // There is no organizations create_or_update_many.
    let r = t
        .post(
            "/api/v2/organizations/create_or_update_many",
            json!({"organizations": []}),
        )
        .await;
    assert_eq!(r.status, 404);

    let r = t
        .get("/api/v2/organizations/search.json?external_id=O1")
        .await;
    assert_eq!(r.json["organizations"][0]["id"], id);
    let r = t.get("/api/v2/organizations/search.json?name=ACME").await;
    assert_eq!(r.json["organizations"][0]["id"], id);
    assert_eq!(
        t.get("/api/v2/organizations/search.json?name=a&external_id=b")
            .await
            .status,
        400
    );
    let r = t
        .get("/api/v2/organizations/show_many?external_ids=O1,O2")
        .await;
    assert_eq!(r.json["organizations"].as_array().unwrap().len(), 2);

    let job = t
        .run_job(
            "POST",
            "/api/v2/organizations/create_many",
            Some(json!({"organizations": [{"name": "Z1", "external_id": "z1"}, {"name": "New"}]})),
        )
        .await;
    assert_eq!(job["results"][0]["index"], 0);
    assert!(job["results"][0]["id"].as_u64().is_some());
    assert_eq!(
        job["results"][1]["details"],
        "Name: New has already been taken"
    );
    let job = t
        .run_job("PUT", "/api/v2/organizations/update_many", Some(json!({"organizations": [{"id": o2, "notes": "b"}, {"external_id": "z1", "notes": "c"}]})))
        .await;
    assert_eq!(job["results"][0]["status"], "Updated");
    assert_eq!(job["results"][1]["status"], "Updated");
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/organizations/update_many?ids={id},{o2}"),
            Some(json!({"organization": {"notes": "same"}})),
        )
        .await;
    assert_eq!(job["progress"], 2);
    let job = t
        .run_job(
            "DELETE",
            "/api/v2/organizations/destroy_many?external_ids=z1",
            None,
        )
        .await;
    assert_eq!(job["results"][0]["status"], "Deleted");
    assert_eq!(
        t.put(
            &format!("/api/v2/organizations/{o2}"),
            json!({"organization": {"name": "Acme"}})
        )
        .await
        .status,
        422
    );
    assert_eq!(
        t.delete(&format!("/api/v2/organizations/{o2}"))
            .await
            .status,
        204
    );
    let s = t.sim.state("acme").unwrap();
    assert_eq!(s.organizations.len(), 1);
    assert_eq!(
        s.organization_by_external_id("o1").unwrap()["notes"],
        "same"
    );
}

#[tokio::test]
async fn tickets() {
    let t = T::new().await;
    let r = t
        .post(
            "/api/v2/tickets.json",
            json!({"ticket": {"subject": "No comment"}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["base"][0],
        json!({"description": "Description: cannot be blank", "error": "BlankValue"})
    );
    let fields = t.get("/api/v2/ticket_fields.json").await.json["ticket_fields"].clone();
    let fid = |title: &str| {
        fields
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["title"] == title)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    let r = t
        .post("/api/v2/tickets.json", json!({"ticket": {
            "subject": "Help", "comment": {"body": "It broke"}, "priority": "high", "external_id": "T1",
            "requester": {"name": "Req", "email": "req@x.io"},
            "custom_fields": [{"id": fid("Category"), "value": "category_billing"}, {"id": fid("Seat count"), "value": 12}, {"id": fid("Escalated"), "value": true}],
            "tags": ["Foo"],
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let tk = r.json["ticket"].clone();
    let id = tk["id"].as_u64().unwrap();
    assert_eq!(id, 1);
    assert_eq!(tk["description"], "It broke");
    assert_eq!(tk["status"], "new");
    assert_eq!(tk["tags"], json!(["foo", "category_billing", "escalated"]));
    assert!(tk["custom_fields"]
        .as_array()
        .unwrap()
        .contains(&json!({"id": fid("Seat count"), "value": "12"})));
    let req_id = tk["requester_id"].as_u64().unwrap();
    assert_eq!(
        t.sim.state("acme").unwrap().user(req_id).unwrap()["email"],
        "req@x.io"
    );
    assert!(r.json["audit"]["events"].as_array().is_some());

    let r = t.post("/api/v2/tickets", json!({"ticket": {"comment": {"body": "x"}, "custom_fields": [{"id": fid("Incident date"), "value": "2021-13-01"}]}})).await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["base"][0],
        json!({"description": "Incident date is not valid", "error": "InvalidValue", "ticket_field_id": fid("Incident date"), "ticket_field_type": "FieldDate"})
    );

    // external_id is not unique.
    let r = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"comment": {"body": "dup"}, "external_id": "T1"}}),
        )
        .await;
    let id2 = r.json["ticket"]["id"].as_u64().unwrap();
    let r = t.get("/api/v2/tickets.json?external_id=T1").await;
    assert_eq!(r.json["tickets"].as_array().unwrap().len(), 2);

    // Update returns ticket + audit; tags replace; safe_update conflicts.
    let r = t.put(&format!("/api/v2/tickets/{id}.json"), json!({"ticket": {"status": "open", "comment": {"body": "more", "public": false}, "tags": ["a"]}})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json["ticket"]["status"], "open");
    assert_eq!(r.json["ticket"]["tags"], json!(["a"]));
    let events = r.json["audit"]["events"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["type"] == "Comment" && e["public"] == false));
    assert!(events
        .iter()
        .any(|e| e["field_name"] == "status" && e["previous_value"] == "new"));
    let r = t.put(&format!("/api/v2/tickets/{id}"), json!({"ticket": {"subject": "s", "safe_update": true, "updated_stamp": "2000-01-01T00:00:00Z"}})).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json["error"], "UpdateConflict");

    // Bulk update with additional_tags / remove_tags.
    let job = t
        .run_job(
            "PUT",
            &format!("/api/v2/tickets/update_many.json?ids={id},{id2}"),
            Some(json!({"ticket": {"additional_tags": ["x", "y"], "remove_tags": ["a"]}})),
        )
        .await;
    assert_eq!(job["results"][0]["status"], "Updated");
    let s = t.sim.state("acme").unwrap();
    assert_eq!(s.ticket(id).unwrap()["tags"], json!(["x", "y"]));
    assert_eq!(
        s.ticket(id).unwrap()["comments"].as_array().unwrap().len(),
        2
    );
    let job = t
        .run_job("PUT", "/api/v2/tickets/update_many", Some(json!({"tickets": [{"id": id2, "status": "closed"}, {"id": 999, "status": "open"}]})))
        .await;
    assert_eq!(job["results"][1]["error"], "RecordNotFound");
    // Closed tickets cannot be updated.
    let r = t
        .put(
            &format!("/api/v2/tickets/{id2}"),
            json!({"ticket": {"subject": "x"}}),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json["details"]["status"][0],
        json!({"description": "Status closed prevents ticket update"})
    );

    let job = t
        .run_job("POST", "/api/v2/tickets/create_many", Some(json!({"tickets": [{"subject": "a", "comment": {"body": "b"}}, {"subject": "no body"}]})))
        .await;
    assert!(job["results"][0]["id"].as_u64().is_some());
    assert_eq!(job["results"][1]["error"], "RecordInvalid");
    assert!(job["results"][1].get("id").is_none());
    let r = t
        .get(&format!("/api/v2/tickets/show_many?ids={id},{id2}"))
        .await;
    assert_eq!(r.json["tickets"].as_array().unwrap().len(), 2);
    // Tickets take no external_ids on show_many.
    assert_eq!(
        t.get("/api/v2/tickets/show_many?external_ids=T1")
            .await
            .status,
        400
    );

    // Async create: 202 with the ticket id and a job.
    let r = t
        .post(
            "/api/v2/tickets.json?async=true",
            json!({"ticket": {"comment": {"body": "later"}}}),
        )
        .await;
    assert_eq!(r.status, 202);
    let new_id = r.json["ticket"]["id"].as_u64().unwrap();
    let job = t.wait_job(&r.json["job_status"]).await;
    assert_eq!(job["results"][0]["id"], new_id);
    assert!(t.sim.state("acme").unwrap().ticket(new_id).is_some());

    let job = t
        .run_job(
            "DELETE",
            &format!("/api/v2/tickets/destroy_many?ids={id}"),
            None,
        )
        .await;
    assert_eq!(job["results"][0]["status"], "Deleted");
    assert_eq!(
        t.delete(&format!("/api/v2/tickets/{id2}")).await.status,
        204
    );
}

#[tokio::test]
async fn tags_endpoints() {
    let t = T::new().await;
    let u = t
        .post("/api/v2/users", json!({"user": {"name": "U"}}))
        .await
        .json["user"]["id"]
        .as_u64()
        .unwrap();
    let o = t
        .post(
            "/api/v2/organizations",
            json!({"organization": {"name": "O"}}),
        )
        .await
        .json["organization"]["id"]
        .as_u64()
        .unwrap();
    let tk = t
        .post(
            "/api/v2/tickets",
            json!({"ticket": {"comment": {"body": "b"}}}),
        )
        .await
        .json["ticket"]["id"]
        .as_u64()
        .unwrap();
    for path in [
        format!("/api/v2/users/{u}/tags.json"),
        format!("/api/v2/organizations/{o}/tags.json"),
        format!("/api/v2/tickets/{tk}/tags.json"),
    ] {
        let r = t.post(&path, json!({"tags": ["One", "two"]})).await;
        assert_eq!(
            (r.status, r.json.clone()),
            (201, json!({"tags": ["one", "two"]})),
            "{path}"
        );
        let r = t.put(&path, json!({"tags": ["three"]})).await;
        assert_eq!(
            (r.status, r.json.clone()),
            (200, json!({"tags": ["one", "two", "three"]}))
        );
        let r = t
            .send("DELETE", &path, Some(json!({"tags": ["one"]})))
            .await;
        assert_eq!((r.status, r.text.as_str()), (204, ""));
        let r = t.get(&path).await;
        assert_eq!(
            (r.status, r.json.clone()),
            (200, json!({"tags": ["two", "three"]}))
        );
        assert_eq!(t.put(&path, json!({})).await.status, 400);
    }
    assert_eq!(t.get("/api/v2/users/12345/tags").await.status, 404);
    // Ticket tags honour safe_update.
    let r = t
        .put(
            &format!("/api/v2/tickets/{tk}/tags"),
            json!({"tags": ["z"], "safe_update": "true", "updated_stamp": "1999-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status, 409);
    let stamp = t.get(&format!("/api/v2/tickets/{tk}")).await.json["ticket"]["updated_at"].clone();
    let r = t
        .put(
            &format!("/api/v2/tickets/{tk}/tags"),
            json!({"tags": ["z"], "safe_update": true, "updated_stamp": stamp}),
        )
        .await;
    assert_eq!(r.status, 200);

    // User / organization tagging off.
    t.sim.update_settings("acme", |s| {
        s.user_tagging = false;
        s.organization_tagging = false;
    });
    let r = t.get(&format!("/api/v2/users/{u}/tags")).await;
    assert_eq!(r.status, 403);
    assert_eq!(
        t.get(&format!("/api/v2/organizations/{o}/tags"))
            .await
            .status,
        403
    );
    let r = t.get(&format!("/api/v2/users/{u}")).await;
    assert!(r.json["user"].get("tags").is_none());
    let r = t
        .put(
            &format!("/api/v2/users/{u}"),
            json!({"user": {"tags": ["dropped"]}}),
        )
        .await;
    assert_eq!(r.status, 200);
    t.sim.update_settings("acme", |s| s.user_tagging = true);
    assert_eq!(
        t.get(&format!("/api/v2/users/{u}/tags")).await.json["tags"],
        json!(["two", "three"])
    );
}

#[tokio::test]
async fn field_definitions() {
    let t = T::new().await;
    let r = t.get("/api/v2/user_fields.json").await;
    assert_eq!(r.status, 200);
    let list = r.json["user_fields"].as_array().unwrap();
    let types: Vec<&str> = list.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "text",
            "textarea",
            "checkbox",
            "date",
            "integer",
            "decimal",
            "regexp",
            "dropdown",
            "multiselect",
            "lookup"
        ]
    );
    let plan = list.iter().find(|f| f["key"] == "plan").unwrap();
    assert_eq!(plan["custom_field_options"][0]["value"], "plan_free");
    let by_key = t.get("/api/v2/user_fields/plan.json").await;
    assert_eq!(by_key.json["user_field"]["id"], plan["id"]);
    let opts = t
        .get(&format!("/api/v2/user_fields/{}/options", plan["id"]))
        .await;
    assert_eq!(
        opts.json["custom_field_options"].as_array().unwrap().len(),
        3
    );
    let orgs = t.get("/api/v2/organization_fields").await;
    assert_eq!(orgs.json["count"], 10);
    let tf = t.get("/api/v2/ticket_fields").await;
    let tl = tf.json["ticket_fields"].as_array().unwrap();
    assert_eq!(tl[0]["type"], "subject");
    assert_eq!(tl[0]["removable"], false);
    assert!(tl.iter().any(|f| f["type"] == "tagger"));
    assert!(tl.iter().all(|f| f.get("key").is_none()));
    assert_eq!(t.get("/api/v2/ticket_fields/subject").await.status, 404);

    // Each type validated.
    let cases = [
        ("vip", json!("true"), false),
        ("seats", json!("12"), true),
        ("seats", json!("twelve"), false),
        ("lifetime_value", json!(1.5), true),
        ("account_code", json!("ABC-1234"), true),
        ("account_code", json!("abc"), false),
        ("interests", json!(["interest_billing"]), true),
        ("interests", json!(["Billing"]), false),
        ("account_manager", json!(1), false),
        ("nickname", json!(["x"]), false),
    ];
    for (key, value, ok) in cases {
        let r = t
            .post(
                "/api/v2/users",
                json!({"user": {"name": "F", "user_fields": {key: value.clone()}}}),
            )
            .await;
        assert_eq!(r.status == 201, ok, "{key}={value}: {}", r.text);
    }
    let me = t.get("/api/v2/users/me").await.json["user"]["id"].clone();
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "F", "user_fields": {"account_manager": me}}}),
        )
        .await;
    assert_eq!(r.status, 201);
    // The drop behaviour for unknown dropdown values.
    t.sim
        .update_behavior(|b| b.invalid_dropdown = InvalidDropdown::Drop);
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "F", "user_fields": {"plan": "nope"}}}),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json["user"]["user_fields"]["plan"], Value::Null);
}

#[tokio::test]
async fn fields_fixture_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fields.json");
    std::fs::write(
        &path,
        r#"{"user_fields": [{"key": "level", "type": "dropdown", "title": "Level", "custom_field_options": [{"name": "High", "value": "lvl_high"}]}]}"#,
    )
    .unwrap();
    let cfg = SimConfig {
        fields_path: Some(path),
        ..SimConfig::default()
    };
    let t = T::start(cfg).await;
    let r = t.get("/api/v2/user_fields").await;
    assert_eq!(r.json["count"], 1);
    let r = t
        .post(
            "/api/v2/users",
            json!({"user": {"name": "A", "user_fields": {"level": "lvl_high"}}}),
        )
        .await;
    assert_eq!(r.json["user"]["user_fields"], json!({"level": "lvl_high"}));
    // Ticket fields still include the system fields.
    assert_eq!(t.get("/api/v2/ticket_fields").await.json["count"], 7);

    // The same fixture as TOML, per account.
    let toml_path = dir.path().join("fields.toml");
    std::fs::write(
        &toml_path,
        "[[organization_fields]]\nkey = \"tier\"\ntype = \"integer\"\ntitle = \"Tier\"\n",
    )
    .unwrap();
    let mut cfg = SimConfig::default();
    cfg.accounts[0].fields_path = Some(toml_path);
    let t = T::start(cfg).await;
    let r = t
        .post(
            "/api/v2/organizations",
            json!({"organization": {"name": "O", "organization_fields": {"tier": "x"}}}),
        )
        .await;
    assert_eq!(
        r.json["details"]["tier"][0]["description"],
        "Tier is not valid"
    );
    assert_eq!(t.get("/api/v2/user_fields").await.json["count"], 0);
}

#[tokio::test]
async fn pagination() {
    let t = T::new().await;
    let users: Vec<Value> = (0..30).map(|i| json!({"name": format!("u{i}")})).collect();
    t.sim
        .seed(
            "acme",
            &SeedData {
                users,
                ..Default::default()
            },
        )
        .unwrap();
    let r = t.get("/api/v2/users.json?per_page=10&page=2").await;
    assert_eq!(r.json["count"], 31);
    assert_eq!(r.json["users"].as_array().unwrap().len(), 10);
    assert!(r.json["next_page"].as_str().unwrap().contains("page=3"));
    assert!(r.json["previous_page"].as_str().unwrap().contains("page=1"));
    let mut seen = 0;
    let mut url = "/api/v2/users.json?page[size]=8".to_string();
    for _ in 0..10 {
        let r = t.get(&url).await;
        seen += r.json["users"].as_array().unwrap().len();
        if r.json["meta"]["has_more"] == false {
            break;
        }
        url = r.json["links"]["next"].as_str().unwrap().to_string();
    }
    assert_eq!(seen, 31);
    assert_eq!(
        t.get("/api/v2/users.json?page=101&per_page=100")
            .await
            .status,
        400
    );
}
