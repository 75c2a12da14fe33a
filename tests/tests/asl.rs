//! Invariants of the Step Functions definition and its SAM wiring, checked without AWS: every
//! Lambda task retries Lambda's service errors, the error names it retries and catches are
//! exactly the ones the Rust code emits, every `Next` names a state, and the Distributed Map
//! reads its chunk list from S3 with a concurrency cap and a failure threshold.

use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use zdsync::errors::ErrorName;

const LAMBDA_SERVICE_ERRORS: [&str; 5] = [
    "Lambda.ClientExecutionTimeoutException",
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn asl_text() -> String {
    std::fs::read_to_string(root().join("statemachine/sync.asl.json")).unwrap()
}

fn placeholders(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        let tail = &rest[i + 2..];
        let end = tail.find('}').expect("closed placeholder");
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The definition with SAM's substitutions applied (fake ARNs).
fn asl() -> Value {
    let mut text = asl_text();
    for name in placeholders(&text) {
        text = text.replace(
            &format!("${{{name}}}"),
            &format!("arn:aws:lambda:us-east-1:123456789012:function:{name}"),
        );
    }
    serde_json::from_str(&text).expect("the ASL is JSON")
}

/// Every state of every scope, with the names of its scope.
fn scopes(machine: &Value, out: &mut Vec<(HashSet<String>, String, Value)>) {
    let states = machine["States"].as_object().expect("States");
    let names: HashSet<String> = states.keys().cloned().collect();
    let start = machine["StartAt"].as_str().expect("StartAt");
    assert!(names.contains(start), "StartAt `{start}` is not a state");
    for (name, state) in states {
        out.push((names.clone(), name.clone(), state.clone()));
        if let Some(inner) = state.get("ItemProcessor").or_else(|| state.get("Iterator")) {
            scopes(inner, out);
        }
        for branch in state["Branches"].as_array().into_iter().flatten() {
            scopes(branch, out);
        }
    }
}

fn all_states() -> Vec<(HashSet<String>, String, Value)> {
    let mut out = Vec::new();
    scopes(&asl(), &mut out);
    out
}

fn names_in(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["ErrorEquals"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_next_names_a_state_of_its_scope() {
    for (names, name, state) in all_states() {
        let mut targets: Vec<&str> = Vec::new();
        targets.extend(state["Next"].as_str());
        targets.extend(state["Default"].as_str());
        for c in state["Choices"].as_array().into_iter().flatten() {
            targets.extend(c["Next"].as_str());
        }
        for c in state["Catch"].as_array().into_iter().flatten() {
            targets.extend(c["Next"].as_str());
        }
        for t in targets {
            assert!(
                names.contains(t),
                "state `{name}` goes to `{t}`, which is not a state"
            );
        }
        let ends = state["End"].as_bool() == Some(true)
            || matches!(state["Type"].as_str(), Some("Succeed" | "Fail" | "Choice"));
        assert!(
            ends || state.get("Next").is_some(),
            "state `{name}` neither ends nor has a Next"
        );
    }
}

#[test]
fn every_lambda_task_retries_the_lambda_service_errors_first() {
    let mut tasks = 0;
    for (_, name, state) in all_states() {
        if state["Type"] != "Task" {
            continue;
        }
        let resource = state["Resource"].as_str().unwrap_or_default();
        if !resource.contains(":lambda:") {
            continue;
        }
        tasks += 1;
        let first = &state["Retry"][0]["ErrorEquals"];
        for e in LAMBDA_SERVICE_ERRORS {
            assert!(
                first.as_array().is_some_and(|a| a.iter().any(|v| v == e)),
                "task `{name}`: its first retrier lacks {e}"
            );
        }
        for r in state["Retry"].as_array().unwrap() {
            for key in r.as_object().unwrap().keys() {
                assert!(
                    [
                        "ErrorEquals",
                        "IntervalSeconds",
                        "MaxAttempts",
                        "BackoffRate",
                        "MaxDelaySeconds",
                        "JitterStrategy"
                    ]
                    .contains(&key.as_str()),
                    "task `{name}`: unknown retrier key {key}"
                );
            }
        }
    }
    assert_eq!(
        tasks, 6,
        "plan, audience-diff, write-batch, record-chunk-failure, finalize twice"
    );
}

#[test]
fn error_names_in_the_definition_are_exactly_the_rust_ones() {
    let mut retried = BTreeSet::new();
    let mut caught = BTreeSet::new();
    for (_, _, state) in all_states() {
        retried.extend(names_in(&state["Retry"]));
        caught.extend(names_in(&state["Catch"]));
    }
    let custom = |s: &BTreeSet<String>| -> BTreeSet<String> {
        s.iter()
            .filter(|n| !n.starts_with("States.") && !n.starts_with("Lambda."))
            .cloned()
            .collect()
    };
    let used: BTreeSet<String> = custom(&retried).union(&custom(&caught)).cloned().collect();
    let rust: BTreeSet<String> = ErrorName::ALL
        .iter()
        .map(|n| n.as_str().to_string())
        .collect();
    assert_eq!(used, rust, "ASL error names vs zdsync::errors::ErrorName");
    // Retryable names are retried, and nothing else is.
    let retryable: BTreeSet<String> = ErrorName::ALL
        .iter()
        .filter(|n| n.retryable())
        .map(|n| n.as_str().to_string())
        .collect();
    assert_eq!(custom(&retried), retryable);
    // Every Zendesk and run error maps into the closed set.
    let samples = [
        zdsync::zendesk::ZendeskError::BulkImportDisabled.error_name(),
        zdsync::zendesk::ZendeskError::SubdomainNotFound {
            subdomain: "x".into(),
        }
        .error_name(),
        zdsync::zendesk::ZendeskError::RateLimited {
            path: String::new(),
            attempts: 1,
            retry_after: None,
        }
        .error_name(),
        zdsync::zendesk::ZendeskError::Credentials {
            message: String::new(),
        }
        .error_name(),
        zdsync::zendesk::ZendeskError::Protocol {
            path: String::new(),
            message: String::new(),
        }
        .error_name(),
        zdsync::run::RunError::Internal(String::new()).error_name(),
    ];
    for s in samples {
        assert!(ErrorName::ALL.contains(&s), "{s} is not in ErrorName::ALL");
    }
}

#[test]
fn the_distributed_map_reads_chunks_from_s3_with_limits() {
    let m = asl()["States"]["WriteChunks"].clone();
    assert_eq!(m["Type"], "Map");
    assert_eq!(m["ItemProcessor"]["ProcessorConfig"]["Mode"], "DISTRIBUTED");
    assert_eq!(m["ItemReader"]["Resource"], "arn:aws:states:::s3:getObject");
    assert!(m.get("MaxConcurrencyPath").is_some() || m.get("MaxConcurrency").is_some());
    // A float: moto's ASL grammar rejects an integer here; AWS takes either.
    assert!(m["ToleratedFailurePercentage"].is_f64(), "{m}");
    assert_eq!(
        m["ResultWriter"]["Resource"],
        "arn:aws:states:::s3:putObject"
    );
    // Results go to S3, never into the execution's 256 KiB state.
    assert_eq!(m["ResultPath"], Value::Null);
    // Items carry keys, never rows: the selector only names small fields.
    let sel = m["ItemSelector"].as_object().unwrap();
    assert!(sel.len() <= 6, "{sel:?}");
    if let Some(b) = m.get("ItemBatcher") {
        let bytes = b["MaxInputBytesPerBatch"].as_u64().unwrap_or(0);
        assert!(bytes > 0 && bytes <= 256 * 1024);
    }
}

#[test]
fn every_failure_path_finalizes_before_failing() {
    let s = asl()["States"].clone();
    for name in ["Plan", "AudienceDiff", "WriteChunks"] {
        let targets: Vec<&str> = s[name]["Catch"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["Next"].as_str())
            .collect();
        // A failed plan reaches finalize through PlanFailed, which keeps only the error.
        let want = if name == "Plan" {
            "PlanFailed"
        } else {
            "FinalizeFailed"
        };
        assert!(
            !targets.is_empty() && targets.iter().all(|t| *t == want),
            "{name}: {targets:?}"
        );
    }
    let pass = &s["PlanFailed"];
    assert_eq!(pass["Type"], "Pass");
    assert_eq!(pass["Next"], "FinalizeFailed");
    assert_eq!(
        pass["Parameters"],
        serde_json::json!({"error.$": "$.error"}),
        "nothing of the execution input reaches finalize"
    );
    // Finalize itself failing still ends the execution through a Catch, and an execution ends
    // before a run's lock expires.
    assert_eq!(s["Finalize"]["Catch"][0]["Next"], "SyncFailed");
    let timeout = asl()["TimeoutSeconds"].as_u64().expect("a timeout");
    assert!(timeout < 6 * 3600, "{timeout} s is not under the 6 h lock");
    // Step Functions refuses States.ALL beside other names, and anywhere but the last catcher.
    for (_, name, state) in all_states() {
        for key in ["Retry", "Catch"] {
            let Some(list) = state[key].as_array() else {
                continue;
            };
            for (i, r) in list.iter().enumerate() {
                let names = r["ErrorEquals"].as_array().unwrap();
                if names.iter().any(|n| n == "States.ALL") {
                    assert_eq!(
                        names.len(),
                        1,
                        "{name}.{key}[{i}]: States.ALL must be alone"
                    );
                    assert_eq!(i, list.len() - 1, "{name}.{key}: States.ALL must come last");
                }
            }
        }
    }
    assert_eq!(s["FinalizeFailed"]["Next"], "SyncFailed");
    assert_eq!(s["SyncFailed"]["Type"], "Fail");
    // A chunk that fails after its retries is caught inside the item processor and recorded,
    // so finalize sees every failure (moto's engine, unlike AWS, would turn an uncaught item
    // failure into a silent null).
    let p = &s["WriteChunks"]["ItemProcessor"]["States"];
    let c = &p["WriteBatch"]["Catch"][0];
    assert_eq!(c["ErrorEquals"], serde_json::json!(["States.ALL"]));
    assert_eq!(c["Next"], "RecordChunkFailure");
    assert_eq!(c["ResultPath"], "$.error");
    assert_eq!(
        p["RecordChunkFailure"]["Parameters"]["FunctionName"],
        p["WriteBatch"]["Parameters"]["FunctionName"]
    );
    // A run whose record carries an error fails the execution after finalize.
    assert_eq!(s["Finalize"]["Next"], "RunSucceeded");
    let choice = &s["RunSucceeded"]["Choices"][0];
    assert_eq!(choice["Variable"], "$.record.error");
    assert_eq!(choice["Next"], "RunFailed");
    assert_eq!(s["RunFailed"]["Type"], "Fail");
    assert_eq!(s["RunFailed"]["ErrorPath"], "$.record.error.name");
}

#[test]
fn template_substitutes_every_placeholder_and_builds_every_function() {
    let template = std::fs::read_to_string(root().join("template.yaml")).unwrap();
    let wanted = placeholders(&asl_text());
    let block = template
        .split("DefinitionSubstitutions:")
        .nth(1)
        .expect("DefinitionSubstitutions");
    let mut given = BTreeSet::new();
    for line in block.lines().skip(1) {
        let t = line.trim();
        let indent = line.len() - line.trim_start().len();
        if t.is_empty() || indent <= 6 {
            break;
        }
        if let Some((k, _)) = t.split_once(':') {
            given.insert(k.to_string());
        }
    }
    assert_eq!(wanted, given, "ASL placeholders vs DefinitionSubstitutions");
    assert!(template.contains("DefinitionUri: statemachine/sync.asl.json"));
    for bin in ["plan", "write-batch", "audience-diff", "finalize"] {
        assert!(
            template.contains(&format!("Binary: {bin}\n")),
            "template lacks the {bin} function"
        );
        assert!(
            root().join(format!("functions/{bin}/Cargo.toml")).exists(),
            "no crate for {bin}"
        );
    }
    assert!(template.contains("BuildMethod: rust-cargolambda"));
    assert!(template.contains("provided.al2023"));
    for event in ["s3-object-created.json", "schedule.json", "manual.json"] {
        let text = std::fs::read_to_string(root().join("events").join(event)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(text.len() < 4096, "{event} is a small event");
        assert!(v.is_object());
    }
}

#[test]
fn audience_runs_diff_then_skip_the_map_when_nothing_is_left_to_write() {
    let s = asl()["States"].clone();
    let plan_choice = s["AnythingToWrite"]["Choices"].as_array().unwrap().clone();
    assert!(plan_choice
        .iter()
        .any(|c| c["Variable"] == "$.plan.run.kind"
            && c["StringEquals"] == "audience"
            && c["Next"] == "AudienceDiff"));
    // audience-diff answers the descriptor the Map reads, in place of plan's.
    assert_eq!(s["AudienceDiff"]["ResultPath"], "$.plan");
    assert_eq!(s["AudienceDiff"]["Next"], "AnyTagToWrite");
    let after = &s["AnyTagToWrite"];
    assert_eq!(after["Type"], "Choice");
    assert_eq!(after["Default"], "WriteChunks");
    assert_eq!(after["Choices"][0]["Variable"], "$.plan.run.nothing_to_do");
    assert_eq!(after["Choices"][0]["Next"], "Finalize");
    // Tagging turned off is one clear, final error: plan catches it, nobody retries it.
    let caught = names_in(&s["Plan"]["Catch"]);
    assert!(caught
        .iter()
        .any(|n| n == ErrorName::TaggingDisabled.as_str()));
    assert!(!ErrorName::TaggingDisabled.retryable());
}
