#!/usr/bin/env bash
# Installs what Trellis needs to build, run and test on Debian 12, skipping what is
# already there. Safe to run again. Needs root for apt-get.
# With --deploy, also what the deployment checks need (scripts/compose-check.sh,
# scripts/systemd-check.sh, deploy/container/build.sh).
set -euo pipefail

packages=(
    nats-server            # the event bus (trellis up starts a private one)
    runc crun conmon       # OCI runtimes and the per-container monitor
    containernetworking-plugins  # CNI plugins: bridge, host-local, portmap, loopback
    docker-registry        # a real registry for the tests, on 127.0.0.1
    prometheus             # the dashboards test runs every panel's query on it
    busybox-static         # the tests build their images from it
    protobuf-compiler      # protoc for the CRI and internal protos
    iproute2 iptables      # pod networking
    ca-certificates curl
)
if [ "${1:-}" = --deploy ]; then
    packages+=(
        podman podman-compose  # the compose check (podman brings runc and conmon too)
        mmdebstrap             # the image's Debian root filesystem
        binutils               # strip, for a small image
        systemd                # systemd-analyze verify
    )
fi

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a Rust toolchain (1.85 or newer) with rustup, then run this again" >&2
    exit 1
fi

# The test command checks formatting and lints: make sure the toolchain has both.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
        rustup component add rustfmt clippy
    else
        echo "cargo fmt or cargo clippy is missing and there is no rustup to add them" >&2
        exit 1
    fi
fi
