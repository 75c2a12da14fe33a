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
