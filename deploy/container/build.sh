#!/usr/bin/env bash
# Builds the trellis container image without any public container registry:
#   1. a Debian 12 root filesystem made by mmdebstrap from Debian packages (the
#      Essential set plus packages.txt), using this host's apt sources, cached as a
#      tarball keyed by everything that goes into it;
#   2. that tarball imported as the base image (`podman import`), once per key;
#   3. `podman build` of Containerfile on it, adding the stripped release binaries.
#
# usage: deploy/container/build.sh [--bin-dir DIR] [--tag NAME]
#   --bin-dir DIR  the trellis binaries (default: $TRELLIS_BIN_DIR, else the
#                  repository's target/release, which `cargo build --release --bins` makes)
#   --tag NAME     the image's name (default: $TRELLIS_IMAGE, else trellis:latest)
# Environment:
#   TRELLIS_CONTAINER_CACHE  where rootfs tarballs are kept (default <repo>/target/container)
#   TRELLIS_APT_SOURCES      apt sources for mmdebstrap, one-line or deb822 file (default:
#                            this host's /etc/apt/sources.list.d/debian.sources or sources.list)
#   TRELLIS_ROOTFS_MAX_AGE_DAYS  a cached rootfs older than this is made again, so that
#                            security updates reach the image (default 7)
# podman's own configuration applies (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF), so a
# caller can build into a throwaway store. Needs root, mmdebstrap and podman.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

bin_dir=${TRELLIS_BIN_DIR:-$repo/target/release}
tag=${TRELLIS_IMAGE:-trellis:latest}
while [ $# -gt 0 ]; do
    case $1 in
        --bin-dir) bin_dir=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "build.sh: unknown argument '$1' (see the usage at the top of $0)" >&2; exit 2 ;;
    esac
done
cache=${TRELLIS_CONTAINER_CACHE:-$repo/target/container}
max_age_days=${TRELLIS_ROOTFS_MAX_AGE_DAYS:-7}
sources=${TRELLIS_APT_SOURCES:-}
if [ -z "$sources" ]; then
    for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$candidate" ]; then sources=$candidate; break; fi
    done
fi
if [ -z "$sources" ] || [ ! -r "$sources" ]; then
    echo "build.sh: no apt sources to build the rootfs from (set TRELLIS_APT_SOURCES)" >&2
    exit 1
fi
[ "$(id -u)" = 0 ] || { echo "build.sh: run as root (rootful podman, mmdebstrap in root mode)" >&2; exit 1; }
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

binaries=(trellis trellis-storage trellis-network trellis-image trellis-runtime trellis-gateway)
for binary in "${binaries[@]}"; do
    [ -x "$bin_dir/$binary" ] || { echo "build.sh: $bin_dir/$binary is missing (cargo build --release --bins)" >&2; exit 1; }
done

# The rootfs: packages.txt without comments, and the options that shape what lands in
# it. Docs, man pages, locales and apt's lists stay out; copyright files stay in.
packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | tr -d ' \t' | paste -sd, -)
suite=bookworm
# mmdebstrap runs the hook with the rootfs as $1.
# shellcheck disable=SC2016
cleanup_hook='rm -rf "$1"/var/log/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old'
options=(
    --variant=essential
    --include="$packages"
    # usr-is-merged instead of the usrmerge package, which would pull in perl.
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --customize-hook="$cleanup_hook"
)
key=$( { echo "$suite $(dpkg --print-architecture)"; printf '%s\n' "${options[@]}"; cat "$sources"; } | sha256sum | cut -c1-16)
rootfs=$cache/rootfs-$key.tar
mkdir -p "$cache"
if [ -f "$rootfs" ] && [ -n "$(find "$rootfs" -mtime +"$max_age_days")" ]; then
    echo "build.sh: $rootfs is older than $max_age_days days; making it again"
    rm -f "$rootfs"
fi
if [ ! -f "$rootfs" ]; then
    echo "build.sh: making the Debian $suite rootfs ($packages) with mmdebstrap"
    partial=$(mktemp "$cache/rootfs-$key.XXXXXX.tar")
    trap 'rm -f "$partial"' EXIT
    log=$cache/rootfs-$key.log
    if ! mmdebstrap --mode=root --format=tar "${options[@]}" "$suite" "$partial" "$sources" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "build.sh: mmdebstrap failed (whole log: $log)" >&2
        exit 1
    fi
    mv "$partial" "$rootfs"
    trap - EXIT
    # Tarballs of earlier keys are of no more use.
    find "$cache" -maxdepth 1 -name 'rootfs-*.tar' ! -name "rootfs-$key.tar" -delete
fi

base=localhost/trellis-base:$key
if ! podman image exists "$base"; then
    podman import --quiet "$rootfs" "$base" >/dev/null
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir "$context/bin"
cp "$here/Containerfile" "$context/"
for binary in "${binaries[@]}"; do
    # Debug information is most of a release binary's size.
    if command -v strip >/dev/null; then
        strip -o "$context/bin/$binary" "$bin_dir/$binary"
    else
        cp "$bin_dir/$binary" "$context/bin/$binary"
    fi
done
podman build --quiet --pull=never --build-arg BASE="$base" --tag "$tag" "$context" >/dev/null
echo "build.sh: built $tag ($(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%d MB", $1/1000000}')) on $base"
