#!/usr/bin/env bash
# kvmbox: run a shell command where /dev/kvm exists, on a machine that has none.
#
# Boots a small Linux VM under QEMU TCG (pure software emulation) whose emulated AMD CPU has
# SVM + NPT, so kvm_amd loads inside it and provides a real /dev/kvm. The VM's root filesystem
# is this machine's "/" over virtio-9p (read-write), so the command sees the same files, the
# same dotnet and the same build outputs, and whatever it writes lands here.
#
#   usage: kvmbox.sh 'command ...'
#          kvmbox.sh --prepare     only install/download/build what a run needs (fail fast)
#
#   - The command runs as root under `bash -c`, in the caller's current directory, with the
#     caller's PATH and HOME. stdin is /dev/null; stdout and stderr are separate channels
#     (virtio-serial ports), streamed live to this script's stdout and stderr.
#   - Exit status: the command's; 124 = timeout; 125 = the box itself failed (qemu missing,
#     kernel download failed, VM did not boot; the qemu log and console tail go to stderr).
#   - Environment passed in: LANG, LC_ALL, LC_CTYPE, CI, DOTNET_ROOT and every DOTNET_*, NUGET_*,
#     MSBUILD*, VSTEST_* and ACTORVMM_* variable, plus the names in KVMBOX_PASSENV.
#     VSTEST_CONNECTION_TIMEOUT defaults to 900 inside (vstest's 90 s is too short under TCG).
#   - Missing tools are installed with apt-get (qemu-system-x86; kmod, cpio, xz-utils, ... for
#     build.sh). The kernel and busybox are downloaded once into the cache directory.
#
# Environment:
#   KVMBOX_CACHE_DIR   artifacts and run directories
#                      (default ${XDG_CACHE_HOME:-$HOME/.cache}/actorvmm-kvmbox; see build.sh)
#   KVMBOX_TIMEOUT     seconds before qemu is killed and kvmbox exits 124 (default 3600)
#   KVMBOX_TCG_THREAD  single (default) | multi. Multi-threaded TCG has crashed the guest
#                      kernel (in __schedule) under the test suite; single has been stable.
#   KVMBOX_MEM         guest RAM (default 8G)         KVMBOX_SMP  guest vCPUs (default 2)
#   KVMBOX_CPU         qemu -cpu (default max,vendor=AuthenticAMD,+svm,+npt,-la57)
#   KVMBOX_CACHE       9p cache mode: mmap (default; host-side changes made while the box runs
#                      are seen) | loose (metadata cached too: 15-40% faster for dotnet, fine
#                      when nothing else writes the tree meanwhile) | none
#   KVMBOX_LOGIN       1: `bash -lc` (sources /etc/profile and ~/.bashrc, which alone can cost
#                      10-20 s under TCG); default 0: `bash -c`
#   KVMBOX_QEMU        the qemu-system-x86_64 binary to use (no install attempt if set)
#   KVMBOX_PASSENV     extra space-separated variable names to pass into the guest
#   KVMBOX_VERBOSE     1: copy the guest kernel console to stderr
#   KVMBOX_KEEP        1: keep the run directory (console.log, qemu.log, run.sh, exitcode)
#   KVMBOX_KCMDLINE    replaces "quiet loglevel=3" on the guest kernel command line
#
# Limits: everything in the box runs 30-50x slower than on the host (timing-sensitive tests
# behave differently); no network but loopback; /tmp, /run, /dev/shm are the guest's own tmpfs
# (except the caller's directory and the run directory, which are bound through); files created
# inside are owned by root; processes the command leaves behind are killed when it exits.
set -uo pipefail

BOX=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
CACHE_DIR=${KVMBOX_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/actorvmm-kvmbox}
TIMEOUT=${KVMBOX_TIMEOUT:-3600}
MEM=${KVMBOX_MEM:-8G}
SMP=${KVMBOX_SMP:-2}
CPU=${KVMBOX_CPU:-max,vendor=AuthenticAMD,+svm,+npt,-la57}
CACHE=${KVMBOX_CACHE:-mmap}
TCG_THREAD=${KVMBOX_TCG_THREAD:-single}

fail() { echo "kvmbox: $*" >&2; exit 125; }

if [[ $# -lt 1 ]]; then
  echo "usage: $0 'command ...'   (options in the environment; see the comment at the top)" >&2
  exit 2
fi
CMD="$*"

mkdir -p "$CACHE_DIR" || fail "cannot create the cache directory $CACHE_DIR"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
export KVMBOX_CACHE_DIR=$CACHE_DIR

# ---- prerequisites: install what is missing, quietly ----
SUDO=""
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
apt_install() {
  local log=$CACHE_DIR/apt.log
  command -v apt-get >/dev/null 2>&1 || { echo "kvmbox: no apt-get to install $*" >&2; return 1; }
  echo "kvmbox: installing $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  local apt=($SUDO apt-get -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends install "$@")
  if ! "${apt[@]}" >"$log" 2>&1; then
    # the package lists may be missing or stale: refresh them and try once more
    $SUDO apt-get update -qq >>"$log" 2>&1
    "${apt[@]}" >>"$log" 2>&1 || { tail -20 "$log" >&2; return 1; }
  fi
}

if [[ -n "${KVMBOX_QEMU:-}" ]]; then
  QEMU=$KVMBOX_QEMU
  [[ -x "$QEMU" ]] || fail "KVMBOX_QEMU=$QEMU is not an executable"
else
  if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    apt_install qemu-system-x86 || fail "qemu-system-x86_64 is missing and could not be installed"
  fi
  QEMU=$(command -v qemu-system-x86_64) || fail "qemu-system-x86_64 not found after installing qemu-system-x86"
fi
"$QEMU" -version >/dev/null 2>&1 || fail "$QEMU does not run"

# ---- guest kernel + initramfs (built once into the cache; rebuilt when init changes) ----
exec 9>"$CACHE_DIR/.lock"
flock 9 2>/dev/null || true            # one build at a time; runs share the artifacts
if ! bash "$BOX/build.sh" --check; then
  declare -A tool_pkg=([dpkg-deb]=dpkg [depmod]=kmod [modprobe]=kmod [cpio]=cpio [gzip]=gzip
                       [xz]=xz-utils [zstd]=zstd)
  missing=()
  for t in "${!tool_pkg[@]}"; do
    command -v "$t" >/dev/null 2>&1 || missing+=("${tool_pkg[$t]}")
  done
  if (( ${#missing[@]} )); then
    apt_install $(printf '%s\n' "${missing[@]}" | sort -u) || fail "cannot install the tools build.sh needs"
  fi
  bash "$BOX/build.sh" || fail "building the guest kernel/initramfs failed (see above)"
fi
flock -u 9 2>/dev/null; exec 9>&-
if [[ "$CMD" == --prepare ]]; then exit 0; fi
VMLINUZ=$CACHE_DIR/kernel/vmlinuz
INITRD=$CACHE_DIR/initrd.cpio.gz

# ---- run directory: run.sh, the stdout/stderr FIFOs, logs, the exit code ----
mkdir -p "$CACHE_DIR/run" || fail "cannot create $CACHE_DIR/run"
# leftovers of runs that were SIGKILLed together with their watchdog, or kept a day ago
find "$CACHE_DIR/run" -mindepth 1 -maxdepth 1 -name 'r.*' -mmin +1440 -exec rm -rf {} + 2>/dev/null
RUN=$(mktemp -d "$CACHE_DIR/run/r.XXXXXX") || fail "cannot create a run directory"
chmod 755 "$RUN"
QPID=""; WPID=""; OPID=""; EPID=""; TPID=""

cleanup() {
  [[ -n "$WPID" ]] && kill "$WPID" 2>/dev/null
  if [[ -n "$QPID" ]] && kill -0 "$QPID" 2>/dev/null; then
    kill -TERM "$QPID" 2>/dev/null; sleep 0.5; kill -KILL "$QPID" 2>/dev/null
  fi
  [[ -n "$TPID" ]] && kill "$TPID" 2>/dev/null
  [[ -n "$OPID" ]] && kill "$OPID" 2>/dev/null
  [[ -n "$EPID" ]] && kill "$EPID" 2>/dev/null
  if [[ "${KVMBOX_KEEP:-0}" != 1 ]]; then rm -rf "$RUN"; fi
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP
trap 'cleanup' EXIT

# The script the guest runs, chrooted into this machine's root.
DOTNET_DIR=""
if command -v dotnet >/dev/null 2>&1; then DOTNET_DIR=$(dirname "$(readlink -f "$(command -v dotnet)")"); fi
{
  echo '# generated by kvmbox.sh'
  echo 'set +e'
  printf 'export HOME=%q\n' "${HOME:-/root}"
  echo 'export TERM=dumb'
  echo 'export KVMBOX=1'
  printf 'export KVMBOX_HOSTPATH=%q\n' "$PATH"
  printf 'export KVMBOX_DOTNET_DIR=%q\n' "$DOTNET_DIR"
  for v in LANG LC_ALL LC_CTYPE CI DOTNET_ROOT ${KVMBOX_PASSENV:-} \
           $(compgen -e | grep -E '^(DOTNET_|NUGET_|ACTORVMM_|MSBUILD|VSTEST_)' || true); do
    [[ -v $v ]] && printf 'export %s=%q\n' "$v" "${!v}"
  done
  echo 'export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1'
  # everything is ~30-50x slower under TCG: vstest's default 90 s testhost connect timeout is too short
  echo 'export VSTEST_CONNECTION_TIMEOUT=${VSTEST_CONNECTION_TIMEOUT:-900}'
  printf 'export KVMBOX_CMD=%q\n' "$CMD"
  printf 'cd %q || { echo "kvmbox: cannot enter %q in the guest" >&2; exit 125; }\n' "$PWD" "$PWD"
  # bash -l re-reads /etc/profile (which resets PATH), so the host PATH is restored afterwards.
  if [[ "${KVMBOX_LOGIN:-0}" == 1 ]]; then BASHOPT=-lc; else BASHOPT=-c; fi
  echo "exec /bin/bash $BASHOPT "\''export PATH="$KVMBOX_HOSTPATH${KVMBOX_DOTNET_DIR:+:$KVMBOX_DOTNET_DIR}:$PATH"; unset KVMBOX_HOSTPATH KVMBOX_DOTNET_DIR; eval "$KVMBOX_CMD"'\'''
} > "$RUN/run.sh"
# Host paths under /tmp or /run the guest must still see through its own tmpfs there.
printf '%s\n' "$PWD" "$RUN" > "$RUN/binds"

# stdout / stderr: virtio-serial ports -> qemu pipe chardevs (FIFOs) -> our fds
mkfifo "$RUN/out.in" "$RUN/out.out" "$RUN/err.in" "$RUN/err.out" || fail "mkfifo failed"
cat "$RUN/out.out" &
OPID=$!
cat "$RUN/err.out" >&2 &
EPID=$!
: > "$RUN/console.log"
if [[ "${KVMBOX_VERBOSE:-0}" == 1 ]]; then
  tail -n +1 -f "$RUN/console.log" >&2 &
  TPID=$!
fi

# 9p passthrough keeps file ownership exact but needs root; otherwise ownership is best-effort.
if [[ $EUID -eq 0 ]]; then SECMODEL=passthrough; else SECMODEL=none; fi

"$QEMU" \
  -accel "tcg,thread=$TCG_THREAD,tb-size=1024" \
  -machine q35 -cpu "$CPU" -smp "$SMP" -m "$MEM" \
  -nodefaults -no-user-config -display none -vga none -monitor none -no-reboot \
  -kernel "$VMLINUZ" -initrd "$INITRD" \
  -append "console=ttyS0 ${KVMBOX_KCMDLINE:-quiet loglevel=3} panic=-1 mitigations=off tsc=reliable kvmbox_run=$RUN kvmbox_cache=$CACHE" \
  -serial "file:$RUN/console.log" \
  -virtfs "local,path=/,mount_tag=hostroot,security_model=$SECMODEL,multidevs=remap" \
  -device virtio-serial-pci,id=vser \
  -chardev pipe,id=kout,path="$RUN/out" \
  -chardev pipe,id=kerr,path="$RUN/err" \
  -device virtserialport,bus=vser.0,chardev=kout,name=kvmbox.out \
  -device virtserialport,bus=vser.0,chardev=kerr,name=kvmbox.err \
  </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!

# Watchdog: kills qemu on timeout, and also if this script dies without running its trap (SIGKILL).
MYPID=$$
(
  trap - EXIT INT TERM HUP
  end=$((SECONDS + TIMEOUT))
  while kill -0 "$QPID" 2>/dev/null; do
    if ! kill -0 "$MYPID" 2>/dev/null; then kill -KILL "$QPID" 2>/dev/null; rm -rf "$RUN"; exit 0; fi
    if (( SECONDS >= end )); then
      echo "kvmbox: timeout after ${TIMEOUT}s, killing qemu" >&2
      touch "$RUN/timedout"; kill -KILL "$QPID" 2>/dev/null; exit 0
    fi
    sleep 1
  done
) &
WPID=$!

wait "$QPID" 2>/dev/null; qrc=$?
QPID=""
kill "$WPID" 2>/dev/null; wait "$WPID" 2>/dev/null; WPID=""
# The cat readers see EOF once qemu (the only writer) has exited; opening the FIFOs O_RDWR
# (never blocks) and closing them again also releases a reader still blocked in open().
exec 3<>"$RUN/out.out" 4<>"$RUN/err.out"; exec 3>&- 4>&-
wait "$OPID" 2>/dev/null; OPID=""
wait "$EPID" 2>/dev/null; EPID=""
[[ -n "$TPID" ]] && { sleep 0.2; kill "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null; TPID=""; }

# The exit code: from the file init writes, else from the console marker.
rc=""
if [[ -s "$RUN/exitcode" ]]; then
  rc=$(tr -dc '0-9' < "$RUN/exitcode")
fi
if [[ -z "$rc" ]]; then
  rc=$(tr -d '\r' < "$RUN/console.log" | sed -n 's/.*KVMBOX-EXIT=\([0-9]*\).*/\1/p' | tail -1)
  if [[ "$rc" == 125 ]]; then
    # init gave up before the command ran (its reason went to stderr): show the boot too
    echo "---- guest console (tail) ----" >&2; tail -20 "$RUN/console.log" >&2
  fi
fi
if [[ -z "$rc" ]]; then
  if [[ -e "$RUN/timedout" ]]; then
    rc=124
  else
    echo "kvmbox: no exit code from the guest (qemu exit status $qrc)" >&2
    echo "---- qemu log ----" >&2; tail -20 "$RUN/qemu.log" >&2
    echo "---- guest console (tail) ----" >&2; tail -40 "$RUN/console.log" >&2
    rc=125
  fi
fi
exit "$rc"
