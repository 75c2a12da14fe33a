#!/usr/bin/env bash
# Runs every zdsync check and test. Needs a Rust toolchain (rustup, with rustfmt and clippy) and
# python3 (with venv) for the moto server the AWS adapter tests run against; everything else is
# fetched by cargo and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== moto server for the AWS adapter tests"
ZDSYNC_VENV="${ZDSYNC_VENV:-$HOME/.cache/zdsync/venv}"
if [ ! -x "$ZDSYNC_VENV/bin/moto_server" ]; then
    python3 -m venv "$ZDSYNC_VENV"
    "$ZDSYNC_VENV/bin/pip" install -q "moto[server]==5.1.22"
fi
export ZDSYNC_MOTO="$ZDSYNC_VENV/bin/moto_server"
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
