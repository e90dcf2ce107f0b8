#!/usr/bin/env bash
# Runs every check Fleetwarden has, in the order CI runs them (.ci/run is this script):
# formatting, lints, unit tests, generated-file staleness, then the end-to-end tests against a
# real kube-apiserver built from Debian's sources (cached in ~/.cache/fleetwarden after the first
# build). Needs only the Rust toolchain, kubectl, Python and apt; installs the rest itself.
set -euo pipefail
cd "$(dirname "$0")/.."

step_start=$SECONDS
step() {
  printf '\n==> %s (%ds elapsed)\n' "$*" "$((SECONDS - step_start))"
}

step "toolchain components"
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$component"
  fi
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit tests"
cargo test --workspace --exclude e2e --locked

step "generated CRD YAML is current"
cargo run --quiet --locked -p fleetwarden-crds --bin crdgen -- --check

step "control plane: Debian packages, the cached kube-apiserver build, helm"
e2e/control-plane.sh deps
e2e/control-plane.sh build
e2e/control-plane.sh helm

step "build the binaries under test"
cargo build --workspace --bins --locked

step "end-to-end tests: the chart with helm, then the suite against the control plane"
cargo test --locked -p e2e -- --test-threads "${E2E_THREADS:-4}"

printf '\nall checks passed in %ds\n' "$((SECONDS - step_start))"
