#!/usr/bin/env bash
# Quick start, command 2: the whole test suite (unit and integration), installing
# what is missing first. The integration tests boot real nodes from the built
# binaries, each in its own temporary root, so the binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# Formatting and lints: any rustfmt diff or clippy warning fails the suite.
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --bins
cargo test --workspace "$@"
