#!/usr/bin/env bash
# Runs every zdsync check and test. Needs a Rust toolchain (rustup, with rustfmt and clippy) and
# python3 (with venv) for the moto server the AWS adapter tests run against and for the SAM
# template lint; everything else is fetched by cargo and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== Python tools: moto server (AWS adapter tests); aws-sam-translator + cfn-lint (template)"
# Two venvs: moto[server] and the SAM translator pin conflicting versions of each other's
# dependencies. Pinned and installed every time (a no-op when satisfied), so a reused venv never
# runs another version.
ZDSYNC_VENV="${ZDSYNC_VENV:-$HOME/.cache/zdsync/venv}"
LINT_VENV="${ZDSYNC_VENV}-lint"
for v in "$ZDSYNC_VENV" "$LINT_VENV"; do
    [ -x "$v/bin/python" ] || python3 -m venv "$v"
done
"$ZDSYNC_VENV/bin/pip" install -q --disable-pip-version-check "moto[server]==5.1.22"
"$LINT_VENV/bin/pip" install -q --disable-pip-version-check \
    "aws-sam-translator==1.110.0" "cfn-lint==1.51.0"
export ZDSYNC_MOTO="$ZDSYNC_VENV/bin/moto_server"
echo "== SAM template: translate with aws-sam-translator, lint with cfn-lint, check state references"
"$LINT_VENV/bin/python" scripts/lint_template.py template.yaml
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo clippy -D warnings (AWS adapters)"
cargo clippy -p zdsync-shared --features aws --all-targets -- -D warnings
echo "== cargo test (the connect tests of zdsync-tests and the cli use moto too)"
cargo test --workspace
echo "== cargo test (AWS adapters, against moto)"
cargo test -p zdsync-shared --features aws --test aws
