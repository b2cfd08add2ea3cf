#!/usr/bin/env bash
# The container image test: builds the Dockerfile with podman and runs the image as the
# DaemonSet in deploy/ declares it, in a network namespace standing in for the node
# (tests/image, marked `image`). scripts/test.sh runs it after the main suite.
#
# Installs podman and friends when missing and configures them in a directory of their own
# ($MINIKPROXY_IMAGE_CACHE, default /var/cache/minikproxy; it persists between runs so the base
# image and the build's layers are reused). The machine's own containers configuration is never
# read or changed, and podman is never allowed to create networks (netns = "none"): the test
# runs the pod with --network ns:/run/netns/NAME in namespaces it creates.
#
# The base image (debian:12-slim) is pulled when a registry answers; otherwise it is built
# with debootstrap from this machine's apt sources and cached as a tarball.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/bootstrap.sh

cache=${MINIKPROXY_IMAGE_CACHE:-/var/cache/minikproxy}
base_ref=docker.io/library/debian:12-slim

if [ "$(id -u)" -ne 0 ]; then
    echo "image-test: needs root (network namespaces, podman)" >&2
    exit 1
fi

need_pkgs=()
for spec in podman:podman buildah:buildah debootstrap:debootstrap runc:runc uidmap:newuidmap \
            openssl:openssl curl:curl; do
    pkg=${spec%%:*} bin=${spec##*:}
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "image-test: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# podman's configuration for this machine, in files of our own (see
# /work/shared/testing-on-this-machine.md, "Containers (podman)"): runc (crun refuses the
# hybrid cgroup layout), cgroupfs (no systemd), ulimits within the hard limits here, no
# networks. Runtime state lives on /run (a tmpfs, so a reboot clears it, as podman expects).
conf=$cache/podman
run_state=/run/minikproxy-image-test
mkdir -p "$conf/storage" "$run_state"
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nofile" -gt 20000 ] && nofile=20000
cat > "$conf/containers.conf" <<CONF
[containers]
netns = "none"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$run_state/tmp"
CONF
cat > "$conf/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$conf/storage"
runroot = "$run_state/runroot"
CONF
export CONTAINERS_CONF=$conf/containers.conf CONTAINERS_STORAGE_CONF=$conf/storage.conf
# The machine's registries.conf, if any, still applies (policy and search registries only).

# Make a debootstrap root file system like the official debian:12-slim (debuerreotype's
# slimify): dpkg excludes docs, man pages and translations (for packages installed later too),
# and apt keeps no package caches.
slimify() {
    local root=$1
    cat > "$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
CFG
    cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
    printf 'Acquire::Languages "none";\n' > "$root/etc/apt/apt.conf.d/docker-no-languages"
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/{groff,info,linda,lintian,locale,man}/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log "$root"/var/log/apt/*
}

if ! podman image exists "$base_ref"; then
    if timeout 60 podman pull -q "$base_ref" >/dev/null 2>&1; then
        echo "image-test: pulled $base_ref" >&2
    else
        tarball=$cache/debian-12-slim.v2.tar
        if [ ! -s "$tarball" ]; then
            echo "image-test: no registry answers; building $base_ref with debootstrap" >&2
            sources=/etc/apt/sources.list.d/debian.sources
            mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$sources" 2>/dev/null || true)
            mirror=${mirror:-http://deb.debian.org/debian}
            rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
            trap 'rm -rf "$rootfs"' EXIT
            debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
            if [ -f "$sources" ]; then
                rm -f "$rootfs/etc/apt/sources.list"
                cp "$sources" "$rootfs/etc/apt/sources.list.d/debian.sources"
            fi
            slimify "$rootfs"
            tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
            mv "$tarball.tmp" "$tarball"
            rm -rf "$rootfs"
            trap - EXIT
        fi
        podman import -q --change 'CMD ["bash"]' "$tarball" "$base_ref" >/dev/null
        echo "image-test: imported $base_ref from $tarball" >&2
    fi
fi

export MINIKPROXY_IMAGE_TEST=1
exec .venv/bin/python -m pytest -p no:cacheprovider -m image tests/image "$@"
