#!/usr/bin/env bash
# Runs every zdsync check and test. Needs a Rust toolchain (rustup, with rustfmt and clippy) and
# python3 (with venv) for the moto server the AWS adapter tests run against and for the SAM
# template lint; everything else is fetched by cargo and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
rustup component add rustfmt clippy >/dev/null 2>&1 || true
echo "== Python tools: moto server + cargo-lambda (AWS tests); aws-sam-translator + cfn-lint (template)"
# Two venvs: moto[server] and the SAM translator pin conflicting versions of each other's
# dependencies. Pinned and installed every time (a no-op when satisfied), so a reused venv never
# runs another version.
ZDSYNC_VENV="${ZDSYNC_VENV:-$HOME/.cache/zdsync/venv}"
LINT_VENV="${ZDSYNC_VENV}-lint"
for v in "$ZDSYNC_VENV" "$LINT_VENV"; do
    [ -x "$v/bin/python" ] || python3 -m venv "$v"
done
"$ZDSYNC_VENV/bin/pip" install -q --disable-pip-version-check \
    "moto[server]==5.2.5" "cargo-lambda==1.9.2"
"$LINT_VENV/bin/pip" install -q --disable-pip-version-check \
    "aws-sam-translator==1.110.0" "cfn-lint==1.51.0"
export ZDSYNC_MOTO="$ZDSYNC_VENV/bin/moto_server"
echo "== SAM template: translate with aws-sam-translator, lint with cfn-lint, check state references"
"$LINT_VENV/bin/python" scripts/lint_template.py template.yaml
echo "== dependencies: licences from the allow list, crates.io only, Cargo.lock as committed"
python3 scripts/check_deps.py
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo clippy -D warnings (AWS adapters)"
cargo clippy --locked -p zdsync-shared --features aws --all-targets -- -D warnings
echo "== cargo test (the AWS adapter and connect tests run against moto)"
cargo test --locked --workspace
echo "== the state machine end to end: moto's Step Functions engine, the Lambdas under cargo lambda watch"
# watch runs `cargo run --bin <function>`: built here so no invocation waits for a compile.
cargo build --locked -p plan -p write-batch -p audience-diff -p finalize
PATH="$ZDSYNC_VENV/bin:$PATH" cargo test --locked -p zdsync-tests --test statemachine -- --ignored --nocapture
echo "== cargo lambda build --release (the deployable bootstrap binaries)"
# The template deploys arm64; without the aarch64 standard library (offline toolchain) the
# same build is checked for x86_64.
if rustup target add aarch64-unknown-linux-gnu >/dev/null 2>&1; then
    ARCH=(--arm64)
else
    echo "aarch64-unknown-linux-gnu unavailable: building x86_64 instead"
    ARCH=(--x86-64)
fi
PATH="$ZDSYNC_VENV/bin:$PATH" cargo lambda build --locked --release "${ARCH[@]}" \
    -p plan -p write-batch -p audience-diff -p finalize
for f in plan write-batch audience-diff finalize; do
    b="${CARGO_TARGET_DIR:-target}/lambda/$f/bootstrap"
    [ -x "$b" ] || { echo "missing $b"; exit 1; }
    printf '%-14s %s bytes (%s)\n' "$f" "$(stat -c %s "$b")" "${ARCH[0]#--}"
done
