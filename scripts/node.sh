#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build in release mode, and run a
# whole Trellis node in the foreground (`trellis up`). Ctrl-C stops it cleanly.
# Extra arguments go to `trellis`, e.g. `scripts/node.sh --set gateway.metrics_listen=127.0.0.1:9460`.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --bins

# A default pod network when the host has none (bridge + host-local + portmap). The
# bridge podman's package installs there (87-podman-bridge.conflist) is not one: it
# would come first, on podman's bridge and subnet.
if [ -z "$(ls -A /etc/cni/net.d 2>/dev/null | grep -v -x -e 87-podman-bridge.conflist -e cni.lock)" ]; then
    mkdir -p /etc/cni/net.d
    cp deploy/cni/10-trellis.conflist /etc/cni/net.d/
    echo "installed the default CNI configuration in /etc/cni/net.d"
fi

exec ./target/release/trellis "$@" up
