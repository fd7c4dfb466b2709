#!/usr/bin/env bash
# Runs critest (the CRI conformance suite, from ../shared/critest-kit) against a
# throwaway Trellis node with its own root, sockets, CNI bridge and subnet, then stops
# the node and removes what it created.
#
# usage: scripts/critest.sh [-n N] [--benchmark] [critest/ginkgo flags, e.g. --ginkgo.focus='Streaming']
#   -n N         instance number 1..200: picks bridge trellisct<N> and subnet 10.<100+N>.0.0/16,
#                so several runs can go at once (default 1).
#   --benchmark  the kit's benchmark run (run-benchmark.sh) instead of validation.
# Needs: the kit set up (LAB_DIR=/opt/lab, registry on 127.0.0.1:5000, critest in
# /opt/lab/bin) and release binaries (cargo build --release --bins).
# Report: $OUT (default /tmp/critest-<N>), node log in $OUT/node.log.
set -euo pipefail
cd "$(dirname "$0")/.."
instance=1
if [ "${1:-}" = "-n" ]; then instance=$2; shift 2; fi
suite=run-validation.sh
if [ "${1:-}" = "--benchmark" ]; then suite=run-benchmark.sh; shift; fi
LAB_DIR=${LAB_DIR:-/opt/lab}
OUT=${OUT:-/tmp/critest-$instance}
root=$(mktemp -d "/tmp/trellis-critest-$instance.XXXXXX")
bridge="trellisct$instance"
mkdir -p "$root/cni" "$OUT"
cat > "$root/cni/10-critest.conflist" <<EOF
{ "cniVersion": "1.0.0", "name": "critest-$instance", "plugins": [
  { "type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
    "ipam": { "type": "host-local", "dataDir": "$root/cni-ipam",
              "ranges": [[{ "subnet": "10.$((100 + instance)).0.0/16" }]], "routes": [{ "dst": "0.0.0.0/0" }] } },
  { "type": "portmap", "capabilities": { "portMappings": true } } ] }
EOF
mirror=http://127.0.0.1:5000
cat > "$root/trellis.toml" <<EOF
[node]
name = "critest$instance"
state_dir = "$root/state"
run_dir = "$root/run"
bin_dir = "$PWD/target/release"
[runtime]
pause_image = "127.0.0.1:5000/pause:3.9"
[image]
mirrors = ["registry.k8s.io=$mirror", "gcr.io=$mirror", "docker.io=$mirror", "quay.io=$mirror"]
[network]
cni_config_dir = "$root/cni"
EOF

node_pid=
cleanup() {
    if [ -n "$node_pid" ]; then
        kill -TERM "$node_pid" 2>/dev/null || true
        wait "$node_pid" 2>/dev/null || true
    fi
    # Containers the suite left behind: their runc state is under our root.
    for state in "$root"/run/runtime/runc/*/; do
        [ -d "$state" ] && runc --root "$root/run/runtime/runc" delete --force "$(basename "$state")" 2>/dev/null || true
    done
    { grep " $root" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$root"
}
trap cleanup EXIT

./target/release/trellis --config "$root/trellis.toml" up > "$OUT/node.log" 2>&1 &
node_pid=$!
for _ in $(seq 1 200); do
    [ -S "$root/run/trellis.sock" ] && ./target/release/trellis --config "$root/trellis.toml" status > /dev/null 2>&1 && break
    sleep 0.1
done
set +e
EP="unix://$root/run/trellis.sock" OUT="$OUT" "$LAB_DIR/$suite" "$@"
rc=$?
set -e
exit $rc
