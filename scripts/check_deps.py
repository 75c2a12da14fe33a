"""Check every dependency in Cargo.lock: a licence from the allow list (SPDX expressions, `/`
read as OR) and a source that is crates.io or this repository (no git or other registries).

Usage: python3 scripts/check_deps.py   (from the repository root; runs `cargo metadata --locked`)
"""

import json
import re
import subprocess
import sys

ALLOWED = {
    "MIT", "MIT-0", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Zlib",
    "Unicode-3.0", "Unicode-DFS-2016", "CC0-1.0", "BSL-1.0", "Unlicense",
    "CDLA-Permissive-2.0", "OpenSSL",
}
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def tokens(expr):
    return re.findall(r"\(|\)|[A-Za-z0-9.+-]+", expr.replace("/", " OR "))


def allowed(expr):
    """Whether some choice the expression offers uses allowed licences only."""
    toks = tokens(expr)
    pos = 0

    def parse_or():
        nonlocal pos
        ok = parse_and()
        while pos < len(toks) and toks[pos] == "OR":
            pos += 1
            ok = parse_and() or ok
        return ok

    def parse_and():
        nonlocal pos
        ok = parse_atom()
        while pos < len(toks) and toks[pos] == "AND":
            pos += 1
            ok = parse_atom() and ok
        return ok

    def parse_atom():
        nonlocal pos
        if pos >= len(toks):
            return False
        t = toks[pos]
        pos += 1
        if t == "(":
            ok = parse_or()
            pos += 1  # ")"
        else:
            ok = t in ALLOWED
        if pos < len(toks) and toks[pos] == "WITH":
            pos += 2  # an exception only grants more
        return ok

    ok = parse_or()
    return ok and pos == len(toks)


def main():
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    problems = []
    for p in meta["packages"]:
        name = f"{p['name']} {p['version']}"
        src = p.get("source")
        if src is not None and src != CRATES_IO:
            problems.append(f"{name}: from {src} (only crates.io and this repository)")
        lic = p.get("license")
        if src is None:
            continue  # the workspace's own crates
        if not lic:
            problems.append(f"{name}: no SPDX licence")
        elif not allowed(lic):
            problems.append(f"{name}: licence `{lic}` is not in the allow list")
    for line in problems:
        print(line)
    n = len([p for p in meta["packages"] if p.get("source")])
    print(f"dependencies: {n} crates checked, {len(problems)} problem(s)")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
