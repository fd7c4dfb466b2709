#!/usr/bin/env bash
# Quick start, command 1: install what is missing, build in release mode, and run a
# whole Trellis node in the foreground (`trellis up`). Ctrl-C stops it cleanly.
# Extra arguments go to `trellis`, e.g. `scripts/node.sh --set gateway.metrics_listen=127.0.0.1:9460`.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo build --release --bins

# A default pod network when the host has none (bridge + host-local + portmap). The
# bridge podman's package installs there (87-podman-bridge.conflist) does not count:
# alone, it would be taken, on podman's bridge.
have_network=false
for config in /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json; do
    if [ -e "$config" ] && [ "${config##*/}" != 87-podman-bridge.conflist ]; then have_network=true; fi
done
if ! $have_network; then
    mkdir -p /etc/cni/net.d
    cp deploy/cni/10-trellis.conflist /etc/cni/net.d/
    echo "installed the default CNI configuration in /etc/cni/net.d"
fi

exec ./target/release/trellis "$@" up
