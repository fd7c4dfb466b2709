#!/usr/bin/env bash
# Quick start, command 2: the whole test suite (unit and integration), installing
# what is missing first. The integration tests boot real nodes from the built
# binaries, each in its own temporary root, so the binaries are built first.
# Then the deployments: the systemd units (systemd-analyze verify) and compose.yaml
# (the image built and a node run with podman-compose); about a minute and a half.
# TRELLIS_SKIP_DEPLOY_CHECKS=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy_checks=true
[ "${TRELLIS_SKIP_DEPLOY_CHECKS:-}" = 1 ] && deploy_checks=false
if $deploy_checks; then ./scripts/install-deps.sh --deploy; else ./scripts/install-deps.sh; fi
# Formatting and lints: any rustfmt diff or clippy warning fails the suite.
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --bins
cargo test --workspace "$@"
if $deploy_checks; then
    # With the debug binaries just built: the checks are about how the services are
    # deployed, and a release build (fat LTO) would add 6-9 minutes and 4 GB of disk.
    # TRELLIS_DEPLOY_BIN_DIR=target/release checks release binaries (build them first).
    bin_dir=${TRELLIS_DEPLOY_BIN_DIR:-target/debug}
    ./scripts/systemd-check.sh --bin-dir "$bin_dir"
    ./scripts/compose-check.sh --bin-dir "$bin_dir"
fi
