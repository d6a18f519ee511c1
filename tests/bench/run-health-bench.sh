#!/usr/bin/env bash
# Runs the health benchmark (docs/benchmarks.md, issue 5 "Targets") through the fabric simulator
# (tests/e2e/fabric_sim.py --bench): the same three-node fabric as the e2e scenarios, each
# latency repeated and reported as p50/p99/max with the command that reproduces it:
#   uplink   the switch port of node a set down -> HealthChanged failed (check "uplink")  N=50
#   vmkill   a VM's QEMU SIGKILLed on the real-QEMU node -> VmStateChanged "crashed"  N=30
#   libvirtd libvirtd SIGKILLed -> HealthChanged failed; libvirtd answering -> ok     N=5
#   daemon   nodemanagerd SIGKILLed -> noticed by the fabric (3 missed heartbeats)     N=10
#
#   sudo tests/bench/run-health-bench.sh [--uplink N] [--vmkill N] [--libvirtd N] [--daemon N]
#        [--no-qemu]
#
# NM_BUILD_DIR: a configured build tree to use (default: <repo>/build, configured and built here
# when nodemanagerd or nodectl is missing). Needs root; the real-QEMU measurements (vmkill,
# libvirtd) start libvirtd & co. through tests/lib/start-services.sh when they do not answer and
# restore libvirtd after killing it; --no-qemu skips them.
# Exit status: the simulator's (0 ran, 1 a step failed), 2 bad usage, 77 not root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${NM_BUILD_DIR:-$repo/build}"

say() { echo "run-health-bench: $*" >&2; }

uplink=50 vmkill=30 libvirtd=5 daemon=10 noqemu=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --uplink) uplink="$2"; shift 2 ;;
    --vmkill) vmkill="$2"; shift 2 ;;
    --libvirtd) libvirtd="$2"; shift 2 ;;
    --daemon) daemon="$2"; shift 2 ;;
    --no-qemu) noqemu=(--no-qemu); shift ;;
    *) say "unknown argument '$1' (see --help)"; exit 2 ;;
  esac
done
for n in "$uplink" "$vmkill" "$libvirtd" "$daemon"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { say "'$n' is not a count"; exit 2; }
done
if [ "$(id -u)" -ne 0 ]; then
  say "needs root (network namespaces, tmpfs, libvirtd)"; exit 77
fi

nodemanagerd="$build/nodemanager/daemon/nodemanagerd"
nodectl="$build/nodemanager/cli/nodectl"
if [ ! -x "$nodemanagerd" ] || [ ! -x "$nodectl" ]; then
  say "building nodemanagerd and nodectl in '$build'"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  fi
  cmake --build "$build" -j2 --target nodemanagerd nodectl
fi

say "machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "reproduce: NM_BUILD_DIR=$build $0 --uplink $uplink --vmkill $vmkill" \
  "--libvirtd $libvirtd --daemon $daemon ${noqemu[*]}"
export NM_BUILD_DIR="$build" PYTHONDONTWRITEBYTECODE=1
exec python3 "$repo/tests/e2e/fabric_sim.py" --nodemanagerd "$nodemanagerd" --nodectl "$nodectl" \
  "${noqemu[@]}" --bench "uplink=$uplink,vmkill=$vmkill,libvirtd=$libvirtd,daemon=$daemon"
