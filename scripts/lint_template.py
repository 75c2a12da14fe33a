"""Translate template.yaml with aws-sam-translator and lint the result with cfn-lint.

Plain cfn-lint does not transform SAM, so it misses errors inside the state machine definition;
translating first (with local code paths stubbed and the ASL re-inlined as an object) lets
cfn-lint validate the ASL, and a walk over every Next/Default/Catch checks state references.
Usage: python scripts/lint_template.py template.yaml
"""

import json
import os
import subprocess
import sys
import tempfile

from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse


class NoManagedPolicies:
    def load(self):
        return {}


def stub_code_paths(template, root):
    for res in template.get("Resources", {}).values():
        props = res.get("Properties", {})
        if res.get("Type") == "AWS::Serverless::Function":
            props["CodeUri"] = "s3://stub-bucket/code.zip"
        if res.get("Type") == "AWS::Serverless::StateMachine" and "DefinitionUri" in props:
            with open(os.path.join(root, props.pop("DefinitionUri"))) as f:
                props["Definition"] = json.load(f)


def check_refs(machine, where):
    states = machine.get("States", {})
    errors = []
    if machine.get("StartAt") not in states:
        errors.append(f"{where}: StartAt {machine.get('StartAt')!r} is not a state")
    for name, st in states.items():
        targets = [st.get("Next"), st.get("Default")]
        targets += [c.get("Next") for c in st.get("Choices", [])]
        targets += [c.get("Next") for c in st.get("Catch", [])]
        for t in targets:
            if t is not None and t not in states:
                errors.append(f"{where}/{name}: Next {t!r} is not a state")
        inner = st.get("ItemProcessor") or st.get("Iterator")
        if inner:
            errors += check_refs(inner, f"{where}/{name}")
        for i, b in enumerate(st.get("Branches", [])):
            errors += check_refs(b, f"{where}/{name}[{i}]")
    return errors


def as_list(v):
    return v if isinstance(v, list) else [v]


def resource_text(r):
    """A policy resource as text (`!Sub` strings and ARNs alike)."""
    if isinstance(r, dict):
        r = r.get("Fn::Sub", r)
        if isinstance(r, list):
            r = r[0]
    return r if isinstance(r, str) else json.dumps(r)


def function_roles(cfn):
    """The role of each Lambda function, by function resource name."""
    roles = {}
    for name, res in cfn["Resources"].items():
        if res["Type"] == "AWS::Lambda::Function":
            role = res["Properties"].get("Role", {})
            if isinstance(role, dict) and "Fn::GetAtt" in role:
                roles[name] = role["Fn::GetAtt"][0]
    return roles


def statements(cfn, role):
    for pol in cfn["Resources"][role]["Properties"].get("Policies", []):
        for st in as_list(pol["PolicyDocument"].get("Statement", [])):
            yield st


# What each function's code does in the bucket, as (action, prefix, condition key or None):
# a role that lacks one of these fails in AWS (moto does not enforce IAM, so only this catches it).
NEEDS = {
    "PlanFunction": [
        ("s3:GetObject", "locks/", None),
        ("s3:PutObject", "locks/", "s3:if-none-match"),
        ("s3:PutObject", "locks/", "s3:if-match"),
        ("s3:DeleteObject", "locks/", "s3:if-match"),
        ("s3:PutObject", "state/", None),
        ("s3:PutObject", "runs/", None),
        ("s3:PutObject", "triggers/", None),
    ],
    "WriteBatchFunction": [
        ("s3:GetObject", "locks/", None),
        ("s3:PutObject", "locks/", "s3:if-match"),
        ("s3:PutObject", "runs/", None),
    ],
    "AudienceDiffFunction": [("s3:PutObject", "runs/", None)],
    "FinalizeFunction": [
        ("s3:GetObject", "locks/", None),
        ("s3:PutObject", "locks/", "s3:if-match"),
        ("s3:DeleteObject", "locks/", "s3:if-match"),
        ("s3:PutObject", "state/", None),
        ("s3:DeleteObject", "triggers/", None),
    ],
}


def required_key(st):
    """The condition key a statement requires to be present (`Null: {key: false}`), if any."""
    keys = [k for k, v in st.get("Condition", {}).get("Null", {}).items() if v == "false"]
    return keys[0] if len(keys) == 1 else None


def check_security(cfn, template):
    """What the deployment promises: no function can delete the state, every function that may
    refresh an OAuth token can save the rotated pair, the bucket keeps versions, outlives the
    stack and takes TLS only, and the schedule exists only when one is given."""
    errors = []
    roles = function_roles(cfn)
    if not roles:
        errors.append("no Lambda function roles found")
    for fn, role in roles.items():
        actions_on = {}
        for st in statements(cfn, role):
            if st.get("Effect") != "Allow":
                continue
            for a in as_list(st.get("Action", [])):
                for r in as_list(st.get("Resource", [])):
                    actions_on.setdefault(a, []).append(resource_text(r))
        for a in ("s3:DeleteObject", "s3:*", "s3:DeleteObjectVersion"):
            for r in actions_on.get(a, []):
                if "state/" in r or r.endswith("}/*") or r.endswith("/*\"") or r == "*":
                    errors.append(f"{fn}: {a} on {r} (the state must not be deletable)")
        grants = []  # (action, resource, required condition key)
        for st in statements(cfn, role):
            if st.get("Effect") != "Allow":
                continue
            for a in as_list(st.get("Action", [])):
                for r in as_list(st.get("Resource", [])):
                    grants.append((a, resource_text(r), required_key(st)))
        for a, r, key in grants:
            if a in ("s3:PutObject", "s3:DeleteObject", "s3:*") and "locks/" in r and key not in (
                "s3:if-match",
                "s3:if-none-match",
            ):
                errors.append(f"{fn}: {a} on {r} without If-Match/If-None-Match (locks must fence)")
        for name, needs in NEEDS.items():
            if fn.startswith(name):
                for a, prefix, key in needs:
                    if not any(ga == a and f"/{prefix}*" in gr and gk == key for ga, gr, gk in grants):
                        errors.append(f"{fn}: its code needs {a} on {prefix}* (condition {key})")
        uses_zendesk = "Finalize" not in fn
        budget = {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query", "dynamodb:BatchGetItem", "dynamodb:BatchWriteItem"}
        if uses_zendesk and not budget <= set(actions_on):
            errors.append(f"{fn}: calls Zendesk but cannot use the shared budget table ({sorted(budget - set(actions_on))})")
        for a in actions_on:
            if a.startswith("dynamodb:") and a not in budget:
                errors.append(f"{fn}: {a} is more than the budget table needs")
        if uses_zendesk and "secretsmanager:PutSecretValue" not in actions_on:
            errors.append(f"{fn}: may refresh an OAuth token but cannot save it (PutSecretValue)")
    bucket = template["Resources"]["Bucket"]
    if bucket.get("DeletionPolicy") != "Retain":
        errors.append("Bucket: DeletionPolicy is not Retain")
    if bucket["Properties"].get("VersioningConfiguration", {}).get("Status") != "Enabled":
        errors.append("Bucket: versioning is not enabled")
    tls = [
        st
        for res in cfn["Resources"].values()
        if res["Type"] == "AWS::S3::BucketPolicy"
        for st in as_list(res["Properties"]["PolicyDocument"]["Statement"])
        if st.get("Effect") == "Deny"
        and st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
    ]
    if not tls:
        errors.append("Bucket: no TLS-only policy")
    for name, res in cfn["Resources"].items():
        if res["Type"] == "AWS::Events::Rule" and "ScheduleExpression" in res.get("Properties", {}):
            if res.get("Condition") != "HasSchedule":
                errors.append(f"{name}: a schedule rule must exist only with a schedule")
    return errors


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "template.yaml"
    root = os.path.dirname(os.path.abspath(path))
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with open(path) as f:
        template = yaml_parse(f.read())
    stub_code_paths(template, root)
    cfn = transform(template, {}, NoManagedPolicies())
    errors = []
    for name, res in cfn["Resources"].items():
        if res["Type"] != "AWS::StepFunctions::StateMachine":
            continue
        props = res["Properties"]
        text = props.get("DefinitionString")
        if isinstance(text, dict) and "Fn::Join" in text:
            sep, parts = text["Fn::Join"]
            if all(isinstance(p, str) for p in parts):
                text = sep.join(parts)
        if isinstance(text, str):
            # Re-inline the ASL as an object so cfn-lint validates it.
            props["Definition"] = json.loads(text)
            del props["DefinitionString"]
        if "Definition" in props:
            errors += check_refs(props["Definition"], name)
    errors += check_security(cfn, template)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        json.dump(cfn, out, indent=1)
    cfn_lint = os.path.join(os.path.dirname(sys.executable), "cfn-lint")
    lint = subprocess.run([cfn_lint, out.name])
    os.unlink(out.name)
    for e in errors:
        print(e)
    kinds = sorted({r["Type"] for r in cfn["Resources"].values()})
    print(f"translated: {len(cfn['Resources'])} resources ({', '.join(kinds)})")
    sys.exit(1 if errors or lint.returncode not in (0,) else 0)


if __name__ == "__main__":
    main()
