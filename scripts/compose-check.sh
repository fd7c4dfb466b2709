#!/usr/bin/env bash
# Proves that compose.yaml runs a node with Debian's podman and podman-compose: builds
# the trellis image (deploy/container/build.sh), brings the node up in containers, runs
# pods and containers through the CRI socket from the host (`trellis bench`, with an
# image it builds from busybox and pushes to a registry on 127.0.0.1), checks that each
# container got its limits from compose.yaml, then takes everything down.
#
# Nothing is shared with a real node or a parallel run: a temporary root holds the
# node's configuration, state, sockets and logs and podman's own store (so the images
# built here go with it); the bus and the registry take free ports, the pod network its
# own bridge and subnet, the compose project its own name. The trap removes containers,
# images, mounts, pod namespaces, the bridge and its NAT rules even when a step fails
# (or on Ctrl-C).
#
# usage: scripts/compose-check.sh [--bin-dir DIR] [--measure SECONDS]
#   --bin-dir DIR      trellis binaries (default: $TRELLIS_BIN_DIR, else target/release)
#   --measure SECONDS  afterwards, cycle pods for this long (4 clients) and print each
#                      service's peak memory, CPU time and tasks (deploy/README.md's figures)
# Needs root. Installs nothing: scripts/install-deps.sh --deploy does.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin_dir=${TRELLIS_BIN_DIR:-$repo/target/release}
measure=0
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --measure) measure=$2; shift 2 ;;
        *) echo "compose-check: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [ ! -x "$bin_dir/trellis" ]; then
    echo "compose-check: $bin_dir/trellis is missing (cargo build --release --bins)" >&2
    exit 1
fi
bin_dir=$(cd "$bin_dir" && pwd)
for tool in podman podman-compose mmdebstrap docker-registry busybox python3; do
    command -v "$tool" >/dev/null || { echo "compose-check: $tool is missing (scripts/install-deps.sh --deploy)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "compose-check: run as root" >&2; exit 1; }
started=$(date +%s)
say() { echo "compose-check [$(($(date +%s) - started))s]: $*"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
root=$(mktemp -d /tmp/trellis-compose.XXXXXX)
node=$root/node
project=trellischeck$$
# A bridge and subnet of our own: a free instance number 1..250.
instance=$((RANDOM % 250 + 1))
while ip link show "tcc$instance" >/dev/null 2>&1; do instance=$((instance % 250 + 1)); done
bridge=tcc$instance
registry_pid=
sampler_pid=

export CONTAINERS_CONF=$root/podman/containers.conf
export CONTAINERS_STORAGE_CONF=$root/podman/storage.conf
export TRELLIS_COMPOSE_PROJECT=$project
export TRELLIS_CONTAINER_IMAGE=localhost/trellis:check
export TRELLIS_ETC_DIR=$node/etc
export TRELLIS_STATE_DIR=$node/state
export TRELLIS_RUN_DIR=$node/run
export TRELLIS_LOG_DIR=$node/log
export TRELLIS_CNI_CONFIG_DIR=$node/cni
export TRELLIS_CNI_STATE_DIR=$node/cni-state
TRELLIS_NATS_PORT=$(free_port)
export TRELLIS_NATS_PORT
registry_port=$(free_port)
# podman-compat: podman-compose 1.0.3 cannot start host-networked services without it,
# and drops pids_limit.
compose=(podman-compose --podman-path "$repo/deploy/container/podman-compat" --project-name "$project" --file "$repo/compose.yaml")

cleanup() {
    local status=$?
    trap - EXIT
    set +e
    if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null; wait "$sampler_pid" 2>/dev/null; fi
    if [ -f "$CONTAINERS_CONF" ]; then
        "${compose[@]}" down >"$root/compose-down.log" 2>&1
        podman rm --all --force --time 0 >/dev/null 2>&1
        podman rmi --all --force >/dev/null 2>&1
    fi
    # Containers the node left running: their runc state is under our run directory.
    for state in "$node"/run/runtime/runc/*/; do
        [ -d "$state" ] && runc --root "$node/run/runtime/runc" delete --force "$(basename "$state")" >/dev/null 2>&1
    done
    if [ -n "$registry_pid" ]; then
        kill "$registry_pid" 2>/dev/null
        wait "$registry_pid" 2>/dev/null
    fi
    # Root filesystems, pod namespaces, podman's overlay mounts, our shared bind mount.
    { grep " $root" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r | while read -r mount; do
        umount -l "$mount" 2>/dev/null
    done
    ip link del "$bridge" 2>/dev/null
    # Masquerade rules of pods whose CNI DEL never ran (the bridge plugin names our
    # network, the project, in each rule's comment).
    iptables -t nat -S POSTROUTING 2>/dev/null | grep -F "name: \\\"$project\\\"" | while read -r rule; do
        eval "iptables -t nat ${rule/#-A/-D}" 2>/dev/null
        chain=${rule##*-j }
        iptables -t nat -F "$chain" 2>/dev/null && iptables -t nat -X "$chain" 2>/dev/null
    done
    # podman's parent cgroups, when no container of anyone else's is left in them.
    for controller in /sys/fs/cgroup/*/; do
        rmdir "$controller/libpod_parent/conmon" "$controller/libpod_parent" 2>/dev/null
    done
    if [ "$status" != 0 ]; then
        for log in "$root"/*.log; do
            [ -s "$log" ] && { echo "--- $log (last lines)"; tail -n 30 "$log"; }
        done
    fi
    rm -rf "$root"
    if [ "$status" = 0 ]; then say "passed"; else say "FAILED (exit $status)"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# podman, configured for this host and confined to our root. cgroupfs: no systemd as
# PID 1. Events to a file: no journald. runc: crun refuses this hybrid cgroup host.
mkdir -p "$root/podman/tmp" "$root/podman/net"
ulimits=
if [ "$(ulimit -Hn)" -lt 1048576 ]; then
    # podman raises nofile and nproc to 1048576 and more by default, which a root
    # without CAP_SYS_RESOURCE (a sandbox) may not: keep the host's limits instead.
    ulimits='default_ulimits = []'
fi
cat >"$CONTAINERS_CONF" <<EOF
[containers]
$ulimits
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$root/podman/events.log"
runtime = "runc"
tmp_dir = "$root/podman/tmp"
image_copy_tmp_dir = "$root/podman/tmp"
[network]
network_config_dir = "$root/podman/net"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$root/podman/storage"
runroot = "$root/podman/run"
EOF
run_args=()
[ -n "$ulimits" ] && run_args=(--podman-run-args=--ulimit=host)

say "building the image from $bin_dir"
TRELLIS_BIN_DIR=$bin_dir "$repo/deploy/container/build.sh" --tag "$TRELLIS_CONTAINER_IMAGE" >"$root/build.log" 2>&1 \
    || { cat "$root/build.log" >&2; exit 1; }
tail -n 1 "$root/build.log"

# The node's directories. Mounts made under them inside a container (root
# filesystems, pod namespaces) must reach the host and the other containers: compose
# mounts them rshared, which needs a shared mount on the host side (a systemd host's /
# is; this one's may not be).
mkdir -p "$node"
mount --bind "$node" "$node"
mount --make-rshared "$node"
mkdir -p "$TRELLIS_ETC_DIR" "$TRELLIS_STATE_DIR/nats" "$TRELLIS_RUN_DIR" "$TRELLIS_LOG_DIR" \
    "$TRELLIS_CNI_CONFIG_DIR" "$TRELLIS_CNI_STATE_DIR"
cat >"$TRELLIS_ETC_DIR/trellis.toml" <<EOF
[node]
name = "$project"
state_dir = "$TRELLIS_STATE_DIR"
run_dir = "$TRELLIS_RUN_DIR"
[network]
cni_config_dir = "$TRELLIS_CNI_CONFIG_DIR"
EOF
cat >"$TRELLIS_CNI_CONFIG_DIR/10-check.conflist" <<EOF
{ "cniVersion": "1.0.0", "name": "$project", "plugins": [
  { "type": "bridge", "bridge": "$bridge", "isGateway": true, "ipMasq": true,
    "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.251.$instance.0/24" }]],
              "routes": [{ "dst": "0.0.0.0/0" }] } },
  { "type": "portmap", "capabilities": { "portMappings": true } } ] }
EOF
trellis=("$bin_dir/trellis" --config "$TRELLIS_ETC_DIR/trellis.toml")
"${trellis[@]}" bus-credentials --dir "$TRELLIS_ETC_DIR/bus" --listen "127.0.0.1:$TRELLIS_NATS_PORT" >/dev/null

say "registry on 127.0.0.1:$registry_port, busybox image pushed to it"
mkdir -p "$root/registry/data" "$root/busybox/bin"
cat >"$root/registry/config.yml" <<EOF
version: 0.1
log: { level: warn }
storage: { filesystem: { rootdirectory: $root/registry/data } }
http: { addr: 127.0.0.1:$registry_port }
EOF
docker-registry serve "$root/registry/config.yml" >"$root/registry.log" 2>&1 &
registry_pid=$!
cp "$(command -v busybox)" "$root/busybox/bin/busybox"
for applet in sh sleep cat; do ln -s busybox "$root/busybox/bin/$applet"; done
printf 'FROM scratch\nCOPY bin/ /bin/\n' >"$root/busybox/Containerfile"
image=127.0.0.1:$registry_port/busybox:latest
podman build --quiet --tag "$image" "$root/busybox" >/dev/null
pushed=false
for _ in $(seq 1 50); do
    # The registry may still be starting.
    if podman push --quiet --tls-verify=false "$image" 2>"$root/push.log"; then pushed=true; break; fi
    sleep 0.2
done
$pushed || { cat "$root/push.log" >&2; echo "compose-check: cannot push $image" >&2; exit 1; }
podman rmi "$image" >/dev/null

say "podman-compose up (project $project, bus on 127.0.0.1:$TRELLIS_NATS_PORT)"
"${compose[@]}" "${run_args[@]}" up -d >"$root/compose-up.log" 2>&1 || { cat "$root/compose-up.log" >&2; exit 1; }
socket=$TRELLIS_RUN_DIR/trellis.sock
for _ in $(seq 1 300); do
    [ -S "$socket" ] && "${trellis[@]}" status >/dev/null 2>&1 && break
    sleep 0.2
done
if ! "${trellis[@]}" status >"$root/status.log" 2>&1; then
    for service in nats storage network image runtime gateway; do
        echo "--- $service" >&2
        podman logs --tail 20 "${project}_${service}_1" >&2 2>&1
    done
    echo "compose-check: the node did not become healthy" >&2
    cat "$root/status.log" >&2
    exit 1
fi
say "node healthy: $(tr '\n' ' ' <"$root/status.log" | tr -s ' ' | cut -c1-200)"

# Each container's limits as compose.yaml states them.
expected=$(python3 - "$repo/compose.yaml" <<'EOF'
import re, sys, yaml
units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
for name, service in yaml.safe_load(open(sys.argv[1]))["services"].items():
    number, unit = re.fullmatch(r"([0-9.]+)([bkmg]?)", str(service["mem_limit"]).lower()).groups()
    print(name, int(float(number) * units[unit]), int(float(service["cpus"]) * 1e9), service["pids_limit"])
EOF
)
# What the kernel enforces: the container's cgroup (cgroupfs driver: libpod_parent/).
limits_of() {
    local id quota period
    id=libpod_parent/libpod-$(podman inspect --format '{{.Id}}' "$1")
    if [ -d /sys/fs/cgroup/memory ]; then
        quota=$(cat "/sys/fs/cgroup/cpu/$id/cpu.cfs_quota_us")
        period=$(cat "/sys/fs/cgroup/cpu/$id/cpu.cfs_period_us")
        echo "$(cat "/sys/fs/cgroup/memory/$id/memory.limit_in_bytes")" \
            "$((quota * 1000000000 / period))" "$(cat "/sys/fs/cgroup/pids/$id/pids.max")"
    else
        read -r quota period <"/sys/fs/cgroup/$id/cpu.max"
        echo "$(cat "/sys/fs/cgroup/$id/memory.max")" \
            "$((quota * 1000000000 / period))" "$(cat "/sys/fs/cgroup/$id/pids.max")"
    fi
}
while read -r service memory cpus pids; do
    read -r got_memory got_cpus got_pids < <(limits_of "${project}_${service}_1")
    if [ "$got_memory" != "$memory" ] || [ "$got_cpus" != "$cpus" ] || [ "$got_pids" != "$pids" ]; then
        echo "compose-check: $service's cgroup has memory $got_memory, cpus $got_cpus (nano) and" \
            "pids $got_pids; compose.yaml says $memory, $cpus and $pids" >&2
        exit 1
    fi
done <<<"$expected"
say "limits from compose.yaml applied (memory, cpus, pids)"

say "pods and containers through $socket"
"${trellis[@]}" bench --endpoint "unix://$socket" --image "$image" --iterations 3 --concurrency 3 --rounds 2 \
    --stats-containers 4 --stats-calls 3 --list-pods 4 --list-calls 3 >"$root/bench.log" 2>&1 \
    || { cat "$root/bench.log" >&2; exit 1; }
grep -E "^(trellis|sequential|[0-9]+ at once)" "$root/bench.log" | sed 's/^/    /'

if [ "$measure" -gt 0 ]; then
    # Peaks per service: the cgroup's memory (RSS and page cache; for runtime also every
    # conmon) and tasks, the main process's threads, peak RSS (VmHWM) and CPU time.
    entries=()
    for service in nats storage network image runtime gateway; do
        entries+=("$service:$(podman inspect --format '{{.Id}}:{{.State.Pid}}' "${project}_${service}_1")")
    done
    sample() {
        local entry service id pid
        while true; do
            for entry in "${entries[@]}"; do
                IFS=: read -r service id pid <<<"$entry"
                echo "$service $(cat "/sys/fs/cgroup/pids/libpod_parent/libpod-$id/pids.current")" \
                    "$(awk '/^Threads/ {print $2}' "/proc/$pid/status")"
            done
            sleep 0.2
        done
    }
    sample >"$root/tasks.samples" 2>/dev/null &
    sampler_pid=$!
    say "measuring: 4 clients cycling pods for ${measure}s"
    deadline=$(($(date +%s) + measure))
    cycles=0
    while [ "$(date +%s)" -lt "$deadline" ]; do
        "${trellis[@]}" bench --endpoint "unix://$socket" --image "$image" --iterations 0 --concurrency 4 --rounds 5 \
            --stats-containers 0 --list-pods 0 >>"$root/bench.log" 2>&1 || { tail -n 20 "$root/bench.log" >&2; exit 1; }
        cycles=$((cycles + 20))
    done
    say "$cycles pod+container cycles; then 40 pods of one running container"
    # --hold keeps the 40 pods up while we look at what runs in runtime's cgroup.
    mkfifo "$root/hold"
    "${trellis[@]}" bench --endpoint "unix://$socket" --image "$image" --iterations 0 --concurrency 0 \
        --stats-containers 40 --stats-calls 20 --list-pods 40 --list-calls 50 --hold <"$root/hold" >"$root/bench-hold.log" 2>&1 &
    bench_pid=$!
    exec 3>"$root/hold"
    for _ in $(seq 1 600); do
        grep -q "holding the list pods" "$root/bench-hold.log" && break
        kill -0 "$bench_pid" 2>/dev/null || break
        sleep 0.2
    done
    runtime_id=$(printf '%s\n' "${entries[@]}" | awk -F: '$1 == "runtime" {print $2}')
    echo "    in runtime's cgroup with 40 containers up (process: count, threads):"
    while read -r task; do
        echo "$(cat "/proc/$task/comm" 2>/dev/null) $(awk '/^Threads/ {print $2}' "/proc/$task/status" 2>/dev/null)"
    done <"/sys/fs/cgroup/pids/libpod_parent/libpod-$runtime_id/cgroup.procs" | awk 'NF == 2 {n[$1]++; t[$1] += $2} END {for (c in n) printf "      %s: %d, %d\n", c, n[c], t[c]}'
    echo >&3
    exec 3>&-
    wait "$bench_pid" || { tail -n 20 "$root/bench-hold.log" >&2; exit 1; }
    kill "$sampler_pid"
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=
    printf '    %-8s %12s %10s %10s %8s %8s %8s\n' service cgroup-peak VmHWM VmRSS-now cpu-s tasks threads
    for entry in "${entries[@]}"; do
        IFS=: read -r service id pid <<<"$entry"
        peak=$(($(cat "/sys/fs/cgroup/memory/libpod_parent/libpod-$id/memory.max_usage_in_bytes") >> 20))
        hwm=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$pid/status")
        rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status")
        cpu=$(awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$pid/stat")
        tasks=$(awk -v s="$service" '$1 == s && $2 > max {max = $2} END {print max + 0}' "$root/tasks.samples")
        threads=$(awk -v s="$service" '$1 == s && $3 > max {max = $3} END {print max + 0}' "$root/tasks.samples")
        printf '    %-8s %10s M %8s M %8s M %8s %8s %8s\n' "$service" "$peak" "$hwm" "$rss" "$cpu" "$tasks" "$threads"
    done
fi

say "podman-compose down"
"${compose[@]}" down >"$root/compose-down.log" 2>&1 || { cat "$root/compose-down.log" >&2; exit 1; }
left=$(podman ps --all --quiet | wc -l)
[ "$left" = 0 ] || { echo "compose-check: $left containers left after down" >&2; exit 1; }
