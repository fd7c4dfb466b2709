#!/usr/bin/env bash
# Runs `systemd-analyze verify` on the units of deploy/systemd, unchanged, in a
# temporary root laid out as the units expect it: the trellis binaries in
# /usr/local/bin, nats-server in /usr/sbin, systemd's own units (the targets ours
# order against) in /usr/lib/systemd/system and ours in /etc/systemd/system. Verify
# then checks every directive and value, that each ExecStart names an executable, and
# that every unit the dependencies name exists. The host's /etc and /usr are not touched.
#
# usage: scripts/systemd-check.sh [--bin-dir DIR]
#   --bin-dir DIR  trellis binaries (default: $TRELLIS_BIN_DIR, else target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin_dir=${TRELLIS_BIN_DIR:-$repo/target/release}
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=$2; shift 2 ;;
        *) echo "systemd-check: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
command -v systemd-analyze >/dev/null || { echo "systemd-check: systemd-analyze is missing (apt-get install systemd)" >&2; exit 1; }
nats=$(command -v nats-server || true)
[ -n "$nats" ] || { echo "systemd-check: nats-server is missing (apt-get install nats-server)" >&2; exit 1; }

root=$(mktemp -d /tmp/trellis-systemd-check.XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/usr/sbin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
place() {
    # A hard link costs no space; another file system gets a copy.
    ln -f "$1" "$2" 2>/dev/null || cp "$1" "$2"
}
for service in storage network image runtime gateway; do
    binary=$bin_dir/trellis-$service
    [ -x "$binary" ] || { echo "systemd-check: $binary is missing (cargo build --release --bins)" >&2; exit 1; }
    place "$binary" "$root/usr/local/bin/trellis-$service"
done
place "$(readlink -f "$nats")" "$root/usr/sbin/nats-server"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp deploy/systemd/*.service deploy/systemd/*.socket deploy/systemd/*.target "$root/etc/systemd/system/"

units=()
for unit in deploy/systemd/*.service deploy/systemd/*.socket deploy/systemd/*.target; do units+=("$(basename "$unit")"); done
# verify's warnings go to stderr and do not all change its exit status: any line fails.
if ! (cd "$root/etc/systemd/system" && systemd-analyze verify --root="$root" --man=no "${units[@]}") >"$root/verify.log" 2>&1 \
    || [ -s "$root/verify.log" ]; then
    cat "$root/verify.log" >&2
    echo "systemd-check: systemd-analyze verify failed on deploy/systemd" >&2
    exit 1
fi
echo "systemd-check: ${#units[@]} units pass systemd-analyze verify (${units[*]})"
