#!/usr/bin/env bash
# Build the kvmbox guest artifacts (kernel, initramfs) into the cache directory.
#
#   usage: build.sh            build whatever is missing or out of date
#          build.sh --check    exit 0 if everything is up to date, 1 if a build is needed
#
# Inputs, fetched with `apt-get download` (nothing is installed):
#   - a Debian kernel: linux-image-6.12-amd64 (bookworm-security/backports) if apt knows it,
#     else linux-image-amd64; the -unsigned flavour is preferred (same content, fewer deps).
#     KVMBOX_KERNEL_PKG=linux-image-... picks an exact package instead.
#   - busybox-static, the initramfs' only userland.
# Tools it needs (kvmbox.sh installs them when missing): apt-get, dpkg-deb, depmod/modprobe
# (kmod), cpio, gzip, xz (and zstd for kernels with .ko.zst modules), sha256sum.
#
# Cache layout, ${KVMBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/actorvmm-kvmbox}:
#   dl/                 the downloaded .deb files (kept: a rebuild needs no network)
#   kernel/vmlinuz      the kernel image
#   kernel/kver         its version (the modules' directory name)
#   kernel/modules/     kvm, kvm_amd, 9p, tun and their dependencies, decompressed
#   kernel/modules.list the order to insmod them in
#   busybox             the static busybox binary
#   initrd.cpio.gz      busybox + modules + ./init
#   initrd.stamp        what initrd.cpio.gz was built from (kernel version, modules, busybox, init's hash)
# FORCE=1 throws all of it away (the downloads too) and starts over.
# The caller (kvmbox.sh) holds an flock on $CACHE/.lock, so concurrent runs do not race.
set -euo pipefail

BOX=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
CACHE=${KVMBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/actorvmm-kvmbox}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
cd "$CACHE"

SUDO=""
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
# apt-get download as root warns that the _apt sandbox user cannot write here; we do not care.
APT_DL=(apt-get -q -o APT::Sandbox::User=root download)

log() { echo "kvmbox-build: $*" >&2; }
die() { log "$*"; exit 1; }

# What initrd.cpio.gz must have been built from; any difference means a rebuild.
initrd_stamp() {
  local bb
  bb=$(cd dl 2>/dev/null && ls busybox-static_*.deb 2>/dev/null | head -1) || true
  printf 'kernel %s\nmodules %s\nbusybox %s\ninit %s\n' "$(cat kernel/kver 2>/dev/null)" \
    "$(tr '\n' ' ' < kernel/modules.list 2>/dev/null)" "$bb" "$(sha256sum < "$BOX/init" | cut -d' ' -f1)"
}
# The modules of BOX_MODULES (and their dependencies) must all be there: a cache built with fewer is rebuilt.
BOX_MODULES="kvm_amd 9pnet_virtio 9p tun"
kernel_ok() { [[ -s kernel/vmlinuz && -s kernel/kver && -s kernel/modules.list ]] && grep -qx 'tun.ko' kernel/modules.list; }
initrd_ok() { [[ -s initrd.cpio.gz && -x busybox && "$(cat initrd.stamp 2>/dev/null)" == "$(initrd_stamp)" ]]; }

if [[ "${1:-}" == --check ]]; then
  kernel_ok && initrd_ok
  exit
fi

for t in apt-get apt-cache dpkg-deb depmod modprobe cpio gzip xz sha256sum; do
  command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (kvmbox.sh installs it when it can)"
done

if [[ "${FORCE:-0}" == 1 ]]; then rm -rf dl kernel busybox initrd.cpio.gz initrd.stamp; fi
mkdir -p dl

# The binary package a kernel meta package currently points to (empty if apt does not know it).
resolve_kernel() {
  if [[ -n "${KVMBOX_KERNEL_PKG:-}" ]]; then echo "$KVMBOX_KERNEL_PKG"; return; fi
  local meta dep
  for meta in linux-image-6.12-amd64 linux-image-amd64; do
    dep=$(apt-cache depends "$meta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [[ -n "$dep" ]]; then echo "$dep"; return; fi
  done
}
download_kernel() {
  local pkg
  pkg=$(resolve_kernel)
  [[ -n "$pkg" ]] || return 1
  log "downloading $pkg"
  (cd dl && rm -f linux-image-*.deb &&
     { "${APT_DL[@]}" "${pkg}-unsigned" >dl.log 2>&1 || "${APT_DL[@]}" "$pkg" >dl.log 2>&1; } && rm -f dl.log)
}
download_busybox() {
  log "downloading busybox-static"
  (cd dl && rm -f busybox-static_*.deb && "${APT_DL[@]}" busybox-static >dl.log 2>&1 && rm -f dl.log)
}
# download, and on failure refresh stale or empty package lists and try once more
fetch() {
  "$@" && return 0
  log "refreshing the apt package lists"
  $SUDO apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed"
  "$@"
}

# ---- kernel: vmlinuz + the modules the initramfs loads ----
if ! kernel_ok; then
  if ! ls dl/linux-image-*.deb >/dev/null 2>&1; then
    fetch download_kernel || { cat dl/dl.log >&2 2>/dev/null || true
                               die "cannot download a Debian kernel package (${KVMBOX_KERNEL_PKG:-linux-image-6.12-amd64 or linux-image-amd64})"; }
  fi
  tmp=$(mktemp -d "$CACHE/kernel.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  dpkg-deb -x "$(ls dl/linux-image-*.deb | head -1)" "$tmp/x"
  # newer Debian kernels install modules under usr/lib; modprobe -d expects lib/modules
  if [[ ! -d "$tmp/x/lib/modules" && -d "$tmp/x/usr/lib/modules" ]]; then
    ln -s usr/lib "$tmp/x/lib"
  fi
  kv=$(ls "$tmp/x/lib/modules" | head -1)
  [[ -n "$kv" && -s "$tmp/x/boot/vmlinuz-$kv" ]] || die "unexpected kernel package layout"
  depmod -b "$tmp/x" "$kv"
  mkdir -p "$tmp/k/modules"
  cp "$tmp/x/boot/vmlinuz-$kv" "$tmp/k/vmlinuz"
  echo "$kv" > "$tmp/k/kver"
  # kvm_amd provides /dev/kvm; 9pnet_virtio + 9p mount the host's root; tun provides /dev/net/tun
  # (TAP interfaces for the virtio-net tests). modprobe lists each module after its dependencies,
  # which is the order init loads them in.
  for m in $BOX_MODULES; do
    modprobe -d "$tmp/x" -S "$kv" --show-depends "$m" | awk '$1=="insmod"{print $2}'
  done | awk '!seen[$0]++' | while read -r ko; do
    base=$(basename "$ko"); base=${base%.xz}; base=${base%.zst}; base=${base%.gz}
    case "$ko" in
      *.xz)  xz -dc "$ko" ;;
      *.zst) zstd -qdc "$ko" ;;
      *.gz)  gzip -dc "$ko" ;;
      *)     cat "$ko" ;;
    esac > "$tmp/k/modules/$base"
    echo "$base" >> "$tmp/k/modules.list"
  done
  [[ -s "$tmp/k/modules.list" ]] || die "no modules found for kvm_amd/9p in kernel $kv"
  rm -rf kernel && mv "$tmp/k" kernel
  rm -rf "$tmp"; trap - EXIT
  log "kernel $kv ($(wc -l < kernel/modules.list) modules)"
fi

# ---- busybox ----
if [[ ! -x busybox ]]; then
  if ! ls dl/busybox-static_*.deb >/dev/null 2>&1; then
    fetch download_busybox || { cat dl/dl.log >&2 2>/dev/null || true; die "cannot download busybox-static"; }
  fi
  tmp=$(mktemp -d "$CACHE/busybox.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  dpkg-deb -x "$(ls dl/busybox-static_*.deb | head -1)" "$tmp"
  mv "$tmp/bin/busybox" busybox.new && chmod 755 busybox.new && mv busybox.new busybox
  rm -rf "$tmp"; trap - EXIT
fi

# ---- initramfs ----
if ! initrd_ok; then
  tmp=$(mktemp -d "$CACHE/initrd.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp"/{bin,dev,proc,sys,newroot,host,lib/modules,tmp}
  cp busybox "$tmp/bin/busybox"
  ln -s busybox "$tmp/bin/sh"
  cp kernel/modules/*.ko "$tmp/lib/modules/"
  cp kernel/modules.list "$tmp/modules.list"
  install -m 755 "$BOX/init" "$tmp/init"
  (cd "$tmp" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > initrd.cpio.gz.new
  mv initrd.cpio.gz.new initrd.cpio.gz
  initrd_stamp > initrd.stamp
  rm -rf "$tmp"; trap - EXIT
  log "initrd $(du -h initrd.cpio.gz | cut -f1) (kernel $(cat kernel/kver))"
fi
