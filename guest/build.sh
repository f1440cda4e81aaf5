#!/usr/bin/env bash
# Builds a bootable Linux guest for ActorVmm from Debian packages only:
#   vmlinuz      the Debian cloud kernel (bzImage; `actorvmm run --kernel`)
#   vmlinux      the same kernel uncompressed (ELF with a PVH entry note; also `--kernel`)
#   initrd.img   a busybox initramfs: /init mounts /proc, /sys and /dev, loads the virtio modules,
#                prints the marker line, checks the virtio disk (if any), and powers off; with
#                `actorvmm.init=shell` on the kernel command line it starts a shell on the console.
#
# usage: guest/build.sh [--out DIR] [--kernel-package NAME]
#   --out DIR             where to write the three files (default: guest/out beside this script)
#   --kernel-package NAME a Debian kernel image package (default: linux-image-cloud-amd64, the
#                         meta-package, resolved to the kernel it depends on)
#
# Needs apt-get and dpkg-deb (Debian or a derivative); no root, nothing is installed on the host:
# the packages are downloaded and unpacked into a scratch folder. Tools it needs beyond coreutils
# (lz4, cpio, modinfo) are used from the host when present, else taken from their Debian packages.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out="$here/out"
kernel_package=linux-image-cloud-amd64
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --kernel-package) kernel_package=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "guest/build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

for tool in apt-get apt-cache dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "guest/build.sh: needs $tool (a Debian system)" >&2; exit 1; }
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# apt-get download as root warns that the _apt user cannot write here; the download is unaffected.
download() { apt-get download -q "$@" 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2 || true; }

# A meta-package (linux-image-cloud-amd64) depends on exactly one versioned kernel image package.
if [[ "$kernel_package" != linux-image-[0-9]* ]]; then
  resolved=$(apt-cache depends "$kernel_package" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$resolved" ] || { echo "guest/build.sh: cannot resolve $kernel_package to a kernel image package (apt-get update?)" >&2; exit 1; }
  kernel_package=$resolved
fi
echo "guest: kernel package $kernel_package, busybox-static"
download "$kernel_package" busybox-static
ls ./*.deb >/dev/null 2>&1 || { echo "guest/build.sh: the downloads failed" >&2; exit 1; }
mkdir -p pkg
for deb in ./*.deb; do dpkg-deb -x "$deb" pkg; done

# tool NAME PACKAGE: the host's NAME, or NAME from PACKAGE unpacked into tools/.
tool() {
  if command -v "$1" >/dev/null; then command -v "$1"; return; fi
  for d in /sbin /usr/sbin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  mkdir -p tools
  (cd tools && download "$2" && for deb in ./*.deb; do dpkg-deb -x "$deb" .; done) >&2
  for d in tools/usr/bin tools/bin tools/usr/sbin tools/sbin; do
    [ -x "$d/$1" ] && { echo "$work/$d/$1"; return; }
  done
  echo "guest/build.sh: cannot find $1 (Debian package $2)" >&2; exit 1
}
LZ4=$(tool lz4 lz4)
CPIO=$(tool cpio cpio)
MODINFO=$(tool modinfo kmod)

vmlinuz=$(ls pkg/boot/vmlinuz-* | head -1)
release=${vmlinuz##*/vmlinuz-}
moddir=pkg/lib/modules/$release
cp "$vmlinuz" "$out/vmlinuz"

# vmlinux: the bzImage's payload is one compressed stream after the setup code and decompressor;
# Debian compresses it with LZ4 (the legacy frame, magic 02 21 4C 18). Try each place the magic
# occurs until one decompresses to an ELF (the way the kernel's scripts/extract-vmlinux searches).
found=0
for offset in $(LC_ALL=C grep -aboP '\x02\x21\x4c\x18' "$vmlinuz" | cut -d: -f1); do
  if tail -c +$((offset + 1)) "$vmlinuz" | "$LZ4" -dc 2>/dev/null > vmlinux.try; [ -s vmlinux.try ] &&
     [ "$(head -c 4 vmlinux.try | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
    mv vmlinux.try "$out/vmlinux"; found=1; break
  fi
done
[ "$found" = 1 ] || { echo "guest/build.sh: no LZ4 payload in $vmlinuz decompresses to an ELF vmlinux" >&2; exit 1; }

# The initramfs.
root=initramfs
mkdir -p $root/bin $root/sbin $root/proc $root/sys $root/dev $root/tmp $root/lib/modules $root/etc
cp pkg/bin/busybox $root/bin/busybox
ln -s busybox $root/bin/sh
# The random-read benchmark (randread.c beside this script), where the host has a C compiler and a
# static libc (Debian: gcc, libc6-dev); without them the kit has no random-read figure.
if command -v cc >/dev/null && cc -static -O2 -o $root/bin/actorvmm-randread "$here/randread.c" 2>/dev/null; then
  randread=", actorvmm-randread"
else
  echo "guest: no C compiler with a static libc (gcc, libc6-dev): the kit has no actorvmm-randread" >&2
  randread=""
fi

# Virtio modules in dependency order (modinfo's depends field; the package has no modules.dep).
wanted="virtio_pci virtio_blk virtio_net virtio_console virtio-rng"
order=()
add_module() {
  local name=$1 file dep
  for m in "${order[@]:-}"; do [ "$m" = "$name" ] && return; done
  file=$(find "$moddir/kernel" -name "$name.ko" | head -1)
  [ -n "$file" ] || { echo "guest/build.sh: module $name is not in $kernel_package" >&2; exit 1; }
  for dep in $("$MODINFO" -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
  order+=("$name")
  cp "$file" "$root/lib/modules/$name.ko"
}
for m in $wanted; do add_module "$m"; done
printf '%s\n' "${order[@]}" > $root/etc/modules

cat > $root/init <<'INIT'
#!/bin/sh
# ActorVmm guest init: see guest/build.sh.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "actorvmm-init: insmod $m failed"; done
cpus=$(grep -c '^processor' /proc/cpuinfo)
echo "ACTORVMM-INIT-OK uptime=$(cut -d' ' -f1 /proc/uptime) cpus=$cpus kernel=$(uname -r)"
# The disk check: sector 0 holds a line the host wrote; print it, and write a line of ours to
# sector 1 (synchronously: O_DSYNC, so the VMM has it on the file before dd returns).
if [ -b /dev/vda ]; then
  echo "ACTORVMM-DISK-READ $(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr -d '\000' | head -n 1)"
  if echo "ACTORVMM-DISK-WRITTEN cpus=$cpus" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null; then
    echo "ACTORVMM-DISK-WRITE ok"
  else
    echo "ACTORVMM-DISK-WRITE failed"
  fi
fi
for i in /sys/class/net/eth*; do [ -e "$i" ] && echo "ACTORVMM-NET $(basename $i) $(cat $i/address)"; done
# The network check, when the command line has actorvmm.net=ADDRESS/PREFIX,PEER,PORT: eth0 gets the
# address, the peer is pinged, then a TCP connection to PEER:PORT sends one line and prints the line
# that comes back.
net=$(sed -n 's/.*actorvmm\.net=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$net" ] && [ -e /sys/class/net/eth0 ]; then
  set -- $(echo "$net" | tr , ' ')
  ip link set lo up
  ip addr add "$1" dev eth0
  ip link set eth0 up
  if ping -c 1 -W 20 "$2" >/dev/null 2>&1; then echo "ACTORVMM-PING $2 ok"; else echo "ACTORVMM-PING $2 failed"; fi
  echo "ACTORVMM-NET-REPLY $(echo "ACTORVMM-NET-HELLO $(cat /sys/class/net/eth0/address)" | nc -w 30 "$2" "$3")"
fi
[ -e /dev/hwrng ] && echo "ACTORVMM-RNG $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
# The disk benchmark, with actorvmm.init=blkbench: O_DIRECT transfers of the whole first 64 MiB of
# /dev/vda, each printed as ACTORVMM-BLK NAME BYTES SECONDS (the seconds from /proc/uptime), then
# 4096 reads of 4 KiB at random offsets in it (actorvmm-randread, timed by CLOCK_MONOTONIC). Each
# starts with a line ACTORVMM-BLK-START NAME, so that a host can time it by its own clock too.
blk() {
  name=$1 bytes=$2; shift 2
  echo "ACTORVMM-BLK-START $name"
  t0=$(cut -d' ' -f1 /proc/uptime)
  dd "$@" 2>/dev/null || { echo "ACTORVMM-BLK $name failed"; return; }
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "ACTORVMM-BLK $name $bytes $(echo "$t0 $t1" | awk '{ printf "%.2f", $2 - $1 }')"
}
case " $(cat /proc/cmdline) " in
  *" actorvmm.init=blkbench "*)
    if [ -b /dev/vda ]; then
      blk write-1m 67108864 if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct conv=fsync
      blk read-1m 67108864 if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct
      blk read-4k 16777216 if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct
      if [ -x /bin/actorvmm-randread ]; then
        echo "ACTORVMM-BLK-START read-4k-random"
        actorvmm-randread /dev/vda 67108864 4096 || echo "ACTORVMM-BLK read-4k-random failed"
      fi
    fi ;;
esac
case " $(cat /proc/cmdline) " in
  *" actorvmm.init=shell "*)
    echo "actorvmm-init: a shell on the console; 'poweroff -f' ends the VM"
    exec setsid cttyhack sh ;;
esac
echo "ACTORVMM-INIT-DONE"
poweroff -f
INIT
chmod 755 $root/init

(cd $root && find . | LC_ALL=C sort | "$CPIO" -o -H newc --quiet -R 0:0) | gzip -9 > "$out/initrd.img"
echo "guest: $out/vmlinuz ($release), $out/vmlinux, $out/initrd.img (modules: ${order[*]}$randread)"
