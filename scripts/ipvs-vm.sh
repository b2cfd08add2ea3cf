#!/bin/bash
# ipvs-vm.sh (from the shared ipvs-vm-host.sh; one change: `timeout --foreground`, so that a
# signal to this script's process group reaches qemu too): run ONE command of the host's own userland inside a qemu TCG guest that boots
# Debian 12's kernel (IPVS, ipset, iptables-legacy/nft modules), so Python tests can drive a real IPVS.
# The host's / is shared read-only over virtio-9p; a tmpfs overlay on top makes it all writable
# (writes are lost at power-off). Companion of ipvs-vm.sh (busybox-only guest), which is unchanged.
#
#   ipvs-vm-host.sh build WORKDIR                once: apt-installs qemu/busybox if missing, unpacks the
#                                                kernel package into WORKDIR, builds WORKDIR/initrd.gz
#   ipvs-vm-host.sh run WORKDIR -- CMD [ARG...]  boots, runs CMD as root in the caller's cwd with the
#                                                caller's PATH, prints its output, exits with its status
# Env: IPVS_VM_MEM     MiB, default 1024 (the overlay's tmpfs, i.e. all guest writes, gets half)
#      IPVS_VM_SMP     vCPUs, default 1 (2 made a netns pytest run 2.4x slower on a 2-core host)
#      IPVS_VM_TIMEOUT seconds, default 600
#      IPVS_VM_RW=DIR  host DIR shared read-write at the same path (junit/coverage files...)
#      IPVS_VM_DEBUG=1 show kernel messages;  IPVS_VM_APPEND  extra kernel command line
# run's status: CMD's; 124 on timeout; 125 if the guest failed before CMD ran (cause on stdout).
# CMD's stdin is /dev/null; the guest has no network device (loopback, netns, veth, dummy only).
# WORKDIR is read by the guest through the 9p share: keep it off /proc, /sys, /dev and /run.
set -euo pipefail
die() { echo "ipvs-vm-host: $*" >&2; exit 125; }
[ $# -ge 2 ] || die "usage: $0 build WORKDIR | $0 run WORKDIR -- CMD [ARG...]"
cmd=$1; W=$(realpath -m "$2"); shift 2

# Preloaded in the guest (missing ones are skipped); others still autoload through busybox modprobe.
MODS="crc32c_generic ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_sh ip_vs_mh ip_vs_dh ip_vs_sed ip_vs_nq
 nf_conntrack nf_conntrack_netlink nf_nat xt_nat ip_tables iptable_nat iptable_filter iptable_mangle iptable_raw
 ip6_tables ip6table_nat ip6table_filter ip6table_mangle ip6table_raw nf_tables nft_compat nft_chain_nat nft_ct
 nft_nat nft_masq nft_redir nft_reject_inet nft_fib_inet nft_numgen nft_hash nft_limit dummy veth bridge br_netfilter
 ip_set ip_set_hash_ip ip_set_hash_ipport ip_set_hash_ipportip ip_set_hash_ipportnet ip_set_hash_net
 ip_set_hash_netport ip_set_bitmap_port xt_set xt_comment xt_mark xt_conntrack xt_addrtype xt_MASQUERADE xt_tcpudp
 xt_multiport xt_statistic xt_recent xt_physdev xt_ipvs xt_CT xt_REDIRECT xt_limit ipt_REJECT ip6t_REJECT tun"
BOOT_MODS="virtio_pci 9pnet_virtio 9p overlay"   # needed before the host's / can be mounted: go in the initrd

if [ "$cmd" = build ]; then
  command -v qemu-system-x86_64 >/dev/null && command -v cpio >/dev/null &&   # busybox must be static (initrd)
    { ldd /bin/busybox 2>&1 | grep -q 'not a dynamic'; } ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 busybox-static cpio >/dev/null
  mkdir -p "$W"
  PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$PKG" ] || die "cannot resolve linux-image-amd64 (apt-get update?)"
  (cd "$W" && rm -rf linux-image-*.deb kroot && apt-get download "$PKG" 2>/dev/null && dpkg-deb -x linux-image-*.deb kroot) ||
    die "cannot download/unpack $PKG"
  KV=$(ls "$W/kroot/lib/modules"); M="$W/kroot/lib/modules/$KV"
  # qemu boots the uncompressed ELF vmlinux through its PVH entry: skips ~3-8 s of xz decompression under TCG
  python3 - "$W/kroot/boot/vmlinuz-$KV" "$W/vmlinux" <<'PY' || die "cannot extract vmlinux"
import lzma, sys
d = open(sys.argv[1], "rb").read()
elf = lzma.LZMADecompressor().decompress(d[d.index(b"\xfd7zXZ\x00"):])
assert elf[:4] == b"\x7fELF"; open(sys.argv[2], "wb").write(elf)
PY
  busybox depmod -b "$W/kroot" "$KV"                 # modules.dep for busybox modprobe in the guest
  R=$(mktemp -d); trap 'rm -rf "$R"' EXIT
  mkdir -p "$R"/{bin,proc,sys,dev,lower,rw,new,lib/modules/$KV}
  cp /bin/busybox "$R/bin/"
  for m in $BOOT_MODS; do                            # each boot module + its (transitive) deps
    line=$(grep -E "(^|/)$m\.ko:" "$M/modules.dep") || die "module $m not in $KV"
    for f in ${line/:/}; do mkdir -p "$R/lib/modules/$KV/$(dirname "$f")"; cp "$M/$f" "$R/lib/modules/$KV/$f"; done
  done
  busybox depmod -b "$R" "$KV"
  PRE=$(for m in $MODS; do grep -qE "(^|/)$m\.ko:" "$M/modules.dep" && echo "$m"; done | xargs)
  cat > "$R/init" <<INIT
#!/bin/busybox sh
# stage 1 (busybox, pid 1): mount host / read-only + tmpfs overlay at /new, load modules, chroot CMD.
/bin/busybox --install -s /bin; export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
off() { grep -qw quiet /proc/cmdline && echo 0 > /proc/sys/kernel/printk; poweroff -f; }  # no "Power down" line
fail() { echo "ipvs-vm-host: guest: \$*"; echo 125 > /dev/ttyS1; off; }
mkdir -p /sbin; ln -s /bin/busybox /sbin/modprobe     # kernel module autoload (request_module) uses it
modprobe -a $BOOT_MODS || fail "cannot load $BOOT_MODS"
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose hostroot /lower || fail "9p mount"
mount --bind /lower$M /lib/modules/$KV || fail "no $M on the host"
modprobe -a $PRE || echo "ipvs-vm-host: guest: some of these modules failed to load: $PRE"
mount -t tmpfs -o mode=755 rw /rw && mkdir /rw/up /rw/wk
mount -t overlay -o lowerdir=/lower,upperdir=/rw/up,workdir=/rw/wk overlay /new || fail "overlay mount"
mount -t proc proc /new/proc; mount -t sysfs sys /new/sys; mount -t devtmpfs dev /new/dev
mkdir -p /new/dev/pts /new/dev/shm; mount -t devpts devpts /new/dev/pts; mount -t tmpfs shm /new/dev/shm
ln -sf /proc/self/fd /new/dev/fd; mount -t tmpfs -o mode=755 run /new/run
mkdir -p /new/lib/modules/$KV && mount --bind /lib/modules/$KV /new/lib/modules/$KV
[ -e /new/usr/sbin/modprobe ] || ln -s /bin/busybox /new/usr/sbin/modprobe  # host has busybox-static
RW=\$(sed -n 's/.*ipvsvm_rw=\([^ ]*\).*/\1/p' /proc/cmdline)        # IPVS_VM_RW: read-write, uncached
[ -z "\$RW" ] || mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hostrw "/new\$RW" || fail "IPVS_VM_RW mount"
hostname ipvs-vm; ip link set lo up
RUN=\$(sed -n 's/.*ipvsvm_run=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -f "/new\$RUN/cmd.sh" ] || fail "no \$RUN/cmd.sh"
stty -onlcr < /dev/console
chroot /new /bin/bash "\$RUN/cmd.sh" < /dev/null > /dev/console 2>&1
echo \$? > /dev/ttyS1     # CMD's status -> host file (ttyS0 carries only the output)
off
INIT
  chmod +x "$R/init"
  (cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$W/initrd.gz"
  echo "built $W/vmlinux ($KV) and $W/initrd.gz"
elif [ "$cmd" = run ]; then
  [ "${1:-}" = -- ] && shift; [ $# -ge 1 ] || die "run: no command given"
  [ -f "$W/initrd.gz" ] && [ -f "$W/vmlinux" ] || die "run '$0 build $W' first"
  RW=(); RWARG=
  if [ -n "${IPVS_VM_RW:-}" ]; then                  # optional host dir shared read-write at the same path
    d=$(realpath "$IPVS_VM_RW") && [ -d "$d" ] || die "IPVS_VM_RW=$IPVS_VM_RW is not a directory"
    RW=(-virtfs "local,path=$d,mount_tag=hostrw,security_model=none,multidevs=remap"); RWARG="ipvsvm_rw=$d"
  fi
  for p in "$W" "${d:-}"; do                         # both end up in qemu options / the kernel command line
    case $p in *,*|*[[:space:]]*) die "path '$p' must not contain commas or whitespace";; esac
  done
  RUN=$(mktemp -d "$W/run.XXXXXX"); trap 'rm -rf "$RUN"' EXIT
  { printf 'cd %q 2>/dev/null || cd /\n' "$PWD"
    printf 'export PATH=%q HOME=/root LANG=C.UTF-8 TERM=dumb\n' "$PATH:/usr/local/sbin:/usr/sbin:/sbin"
    printf 'exec'; printf ' %q' "$@"; printf '\n'; } > "$RUN/cmd.sh"
  KOPT="quiet loglevel=3"; [ "${IPVS_VM_DEBUG:-0}" = 1 ] && KOPT=""
  rc=0
  # --foreground: timeout stays in our process group (it makes a group of its own otherwise),
  # so whoever stops this script by its group (minikproxy bench on ^C) stops qemu with it.
  timeout --foreground -k 5 "${IPVS_VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -cpu max -m "${IPVS_VM_MEM:-1024}" \
    -smp "${IPVS_VM_SMP:-1}" -nodefaults -no-user-config -display none -no-reboot \
    -chardev stdio,id=con -serial chardev:con -serial file:"$RUN/status" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap "${RW[@]}" \
    -kernel "$W/vmlinux" -initrd "$W/initrd.gz" \
    -append "console=ttyS0 $KOPT panic=-1 ${IPVS_VM_APPEND:-} ipvsvm_run=$RUN $RWARG" < /dev/null || rc=$?
  [ $rc = 124 ] && { echo "ipvs-vm-host: timed out after ${IPVS_VM_TIMEOUT:-600}s" >&2; exit 124; }
  st=$(tr -dc 0-9 < "$RUN/status" 2>/dev/null || true)
  [ -n "$st" ] || die "guest reported no exit status (qemu status $rc)"
  exit "$st"
else
  die "unknown verb '$cmd' (build|run)"
fi
