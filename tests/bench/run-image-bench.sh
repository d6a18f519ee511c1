#!/usr/bin/env bash
# Runs the image store benchmark (docs/benchmarks.md, issue 3): (1) ImageStore::pull of a 1 GiB
# image from a directory store vs cp + sha256sum of the same file, cold and warm; (2) qcow2 overlay
# creation through libvirt's storage API (qemu:///system) on fully allocated 1 GiB and 8 GiB raw
# and qcow2 bases; (3) 20 VMs created at once from one uncached image through nodemanagerd
# (test:///default; --daemon-uri qemu:///system for real overlays) vs one PullImage plus one
# CreateVm. Prints a summary table.
#
#   sudo tests/bench/run-image-bench.sh [image_bench options: --parts pull,overlay,concurrent
#        --size-mib 1024 --large-mib 8192 --runs 5 --creations 30 --vms 20 --daemon-runs 3
#        --libvirt-uri qemu:///system --daemon-uri test:///default --no-drop-caches --strict]
#   tests/bench/run-image-bench.sh --smoke    16 MiB images, 3 VMs, one run, test:///default only
#
# NM_BUILD_DIR: a configured build tree to use (default: <repo>/build, configured and built here
# when image_bench or nodemanagerd is missing). NM_BENCH_WORK_PARENT: where the scratch directory
# is made (default /var/tmp; it must be a disk, not tmpfs; the full run needs about 20 GiB free).
# With qemu:///system, libvirtd is started through tests/lib/start-services.sh when it does not
# answer, and stopped again at the end; the benchmark's storage pool is removed.
# Exit status: image_bench's (0 ran, 1 a step failed, 2 bad usage, 3 --strict and a target
# missed), 77 when a prerequisite is missing or not root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${NM_BUILD_DIR:-$repo/build}"

say() { echo "run-image-bench: $*" >&2; }

args=("$@")
uri="qemu:///system"
daemon_uri="test:///default"
case "${1:-}" in
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  --smoke)
    args=(--size-mib 16 --large-mib 64 --runs 1 --creations 3 --vms 3 --daemon-runs 1
          --libvirt-uri test:///default --no-drop-caches "${@:2}")
    ;;
esac
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[i]}" != "--libvirt-uri" ] || uri="${args[i + 1]:-}"
  [ "${args[i]}" != "--daemon-uri" ] || daemon_uri="${args[i + 1]:-}"
done
real_uri=""
for u in "$uri" "$daemon_uri"; do [ "$u" = "test:///default" ] || real_uri="$u"; done

if [ "$(id -u)" -ne 0 ]; then
  say "needs root (drop_caches, nodemanagerd's netlink and nftables, libvirtd)"; exit 77
fi
for bin in dbus-daemon qemu-img fallocate cp sha256sum openssl; do
  if ! command -v "$bin" >/dev/null; then
    say "'$bin' not found; run packaging/install-deps.sh"; exit 77
  fi
done

daemon="$build/nodemanager/daemon/nodemanagerd"
bench="$build/tests/bench/image_bench"
if [ ! -x "$bench" ] || [ ! -x "$daemon" ]; then
  say "building image_bench and nodemanagerd in '$build'"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  fi
  cmake --build "$build" -j2 --target image_bench nodemanagerd
fi

parent="${NM_BENCH_WORK_PARENT:-/var/tmp}"
fstype="$(stat -f -c %T "$parent")"
if [ "$fstype" = tmpfs ] && [ "${1:-}" != --smoke ]; then
  say "'$parent' is tmpfs: set NM_BENCH_WORK_PARENT to a directory on disk"; exit 77
fi
work="$(mktemp -d "$parent/nm-image-bench.XXXXXX")"
pool="nm-imgbench-$$"
services_state="$work/services.pids"

# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local rc=$?
  # The benchmark's pools: "$pool" (overlay part) and "$pool-daemon-*" (one per fresh daemon).
  if [ -n "$real_uri" ] && command -v virsh >/dev/null; then
    local p
    for p in $(virsh -q -c "$real_uri" pool-list --all --name 2>/dev/null | grep "^$pool" || true); do
      virsh -q -c "$real_uri" pool-destroy "$p" >/dev/null 2>&1 || true
      virsh -q -c "$real_uri" pool-undefine "$p" >/dev/null 2>&1 || true
    done
  fi
  if [ -f "$services_state" ]; then
    NM_SERVICES_STATE="$services_state" bash "$repo/tests/lib/stop-services.sh" || true
  fi
  if [ "${NM_BENCH_KEEP:-0}" = 1 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; }; then
    find "$work" -type f -size +1M -delete 2>/dev/null || true
    say "logs kept in '$work'"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$real_uri" = "qemu:///system" ]; then
  if ! timeout 5 virsh -q -c "$real_uri" version >/dev/null 2>&1; then
    say "libvirtd does not answer on $real_uri: starting it (tests/lib/start-services.sh)"
    NM_SERVICES_STATE="$services_state" bash "$repo/tests/lib/start-services.sh" || {
      say "libvirtd could not be started"; exit 77
    }
  fi
fi

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r)"
say "work directory: $work ($(stat -f -c %T "$work"), $(df -h --output=avail "$work" | tail -1 | tr -d ' ') free)"
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
say "reproduce: NM_BUILD_DIR=$build $0 $*"
set +e
"$bench" --work "$work" --pool "$pool" --daemon "$daemon" "${args[@]}"
rc=$?
set -e
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$rc"
