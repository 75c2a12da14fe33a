#!/usr/bin/env bash
# Runs every zdsync check and test. Needs a Rust toolchain (rustup, with rustfmt and clippy) and
# python3 (with venv) for the moto server the AWS adapter tests run against; everything else is
# fetched by cargo and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== Python tools: moto server (AWS adapter tests), aws-sam-translator + cfn-lint (template)"
ZDSYNC_VENV="${ZDSYNC_VENV:-$HOME/.cache/zdsync/venv}"
if [ ! -x "$ZDSYNC_VENV/bin/python" ]; then
    python3 -m venv "$ZDSYNC_VENV"
fi
if [ ! -x "$ZDSYNC_VENV/bin/moto_server" ] || [ ! -x "$ZDSYNC_VENV/bin/cfn-lint" ]; then
    "$ZDSYNC_VENV/bin/pip" install -q "moto[server]==5.1.22" "aws-sam-translator==1.110.0" "cfn-lint==1.51.0"
fi
export ZDSYNC_MOTO="$ZDSYNC_VENV/bin/moto_server"
echo "== SAM template: translate with aws-sam-translator, lint with cfn-lint, check state references"
"$ZDSYNC_VENV/bin/python" scripts/lint_template.py template.yaml
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo clippy -D warnings (AWS adapters)"
cargo clippy -p zdsync-shared --features aws --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== cargo test (AWS adapters, against moto)"
cargo test -p zdsync-shared --features aws --test aws
