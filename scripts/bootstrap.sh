#!/usr/bin/env bash
# Installs what minikproxy needs on a Debian 12 machine: the kernel userland (iptables with
# both backends, nftables and libnftables1, ipset, conntrack, ipvsadm, iproute2; qemu, cpio and
# a static busybox for the IPVS test VM, scripts/ipvs-vm.sh) and a virtualenv in .venv with the
# project, its development tools and the benchmark's extra (minikproxy[bench]: matplotlib,
# rich, python-iptables). Safe to run again; it only
# does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for spec in iptables:iptables-restore nftables:nft ipset:ipset conntrack:conntrack \
            ipvsadm:ipvsadm iproute2:ip procps:sysctl \
            qemu-system-x86:qemu-system-x86_64 cpio:cpio; do
    pkg=${spec%%:*} bin=${spec##*:}
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || [ -x "/sbin/$bin" ] || need_pkgs+=("$pkg")
done
# The benchmark's python-iptables strategy loads libiptc (legacy backend) and libxtables.
for lib in libip4tc2 libxtables12; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "ok installed" || need_pkgs+=("$lib")
done
# The IPVS kernel tests boot a VM (scripts/ipvs-vm.sh) whose initrd needs a static busybox.
if ! { [ -x /bin/busybox ] && ldd /bin/busybox 2>&1 | grep -q 'not a dynamic'; }; then
    need_pkgs+=(busybox-static)
fi
# The nftables applier loads the library nft is built on, through ctypes.
if ! python3 -c 'import ctypes; ctypes.CDLL("libnftables.so.1")' >/dev/null 2>&1; then
    need_pkgs+=(libnftables1)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need_pkgs+=(python3-venv)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: missing Debian packages: ${need_pkgs[*]} (run as root to install them)" >&2
        exit 1
    fi
    echo "bootstrap: installing ${need_pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

stamp=.venv/.minikproxy-installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "bootstrap: installing minikproxy into .venv" >&2
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e '.[dev,bench]'
    touch "$stamp"
fi
