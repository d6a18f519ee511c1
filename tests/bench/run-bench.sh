#!/usr/bin/env bash
# Runs the lifecycle and ListVms benchmark (docs/benchmarks.md) on a private bus:
# a private dbus-daemon, bench_floor_server, libvirt-dbus (test:///default at /org/libvirt/Test)
# and nodemanagerd (test:///default, temporary state directory), then lifecycle_bench.
#
#   tests/bench/run-bench.sh [--cycles N] [any other lifecycle_bench flag, e.g. --json --strict]
#
# NM_BUILD_DIR: a configured build tree to use (default: <repo>/build, configured and built here
# when the binaries are missing). NM_NODEMANAGERD: another nodemanagerd binary to measure.
# NM_BENCH_STATE_PARENT: where nodemanagerd's state directory and the floor server's SyncPing
# file are made (default: the temporary directory; /dev/shm takes fsync cost out, for diagnosis
# only).
# NM_BENCH_KEEP=1 keeps the temporary directory (logs); it is also kept when the run fails.
# Exit status: lifecycle_bench's (0 ran, 1 a call failed, 3 --strict and a target missed), 1 when
# a service did not come up, 77 when a needed program is not installed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${NM_BUILD_DIR:-$repo/build}"
wait_s="${NM_BENCH_TIMEOUT:-30}"

cycles=500
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --cycles) cycles="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done

say() { echo "run-bench: $*" >&2; }
die() { say "$*"; exit 1; }

for bin in dbus-daemon busctl libvirt-dbus; do
  if ! command -v "$bin" >/dev/null; then
    say "'$bin' not found; run packaging/install-deps.sh"; exit 77
  fi
done

daemon="${NM_NODEMANAGERD:-$build/nodemanager/daemon/nodemanagerd}"
bench="$build/tests/bench/lifecycle_bench"
floor="$build/tests/bench/bench_floor_server"
if [ ! -x "$daemon" ] || [ ! -x "$bench" ] || [ ! -x "$floor" ]; then
  say "building nodemanagerd and the benchmark in '$build'"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  fi
  cmake --build "$build" -j2 --target nodemanagerd lifecycle_bench bench_floor_server
fi

tmp="$(mktemp -d /tmp/nm-bench.XXXXXX)"
pids=()
disk=""
cleanup() {
  local rc=$?
  # Stop in reverse start order, by pid: the clients before the bus.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "${NM_BENCH_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
    say "logs kept in '$tmp'"
  else
    rm -rf "$tmp"
  fi
  if [ -n "$disk" ] && [ "$disk" != "$tmp" ]; then rm -rf "$disk"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

address="unix:path=$tmp/bus"
# nodemanagerd's state directory and the floor server's SyncPing file, on the same filesystem.
disk="$tmp"
if [ -n "${NM_BENCH_STATE_PARENT:-}" ]; then
  disk="$(mktemp -d "$NM_BENCH_STATE_PARENT/nm-bench-state.XXXXXX")"
fi
state="$disk/state"
cat >"$tmp/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>$address</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <allow user="*"/>
  </policy>
</busconfig>
CONF

# Waits until NAME is owned on the bus, failing early when PID (the process meant to own it) died.
wait_for_name() {
  local name="$1" pid="$2" log="$3" deadline=$((SECONDS + wait_s))
  until busctl --address="$address" status "$name" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "'$name' exited before owning its name; its log:"; cat "$log" >&2 || true; exit 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "'$name' did not appear on the bus within ${wait_s}s"
    sleep 0.1
  done
}

dbus-daemon --config-file="$tmp/bus.conf" --nofork >"$tmp/dbus.log" 2>&1 &
pids+=($!)
wait_for_name org.freedesktop.DBus "${pids[-1]}" "$tmp/dbus.log"

"$floor" --bus "$address" --sync-file "$disk/floor-sync" >"$tmp/floor.log" 2>&1 &
pids+=($!)
wait_for_name org.nodemanager.BenchFloor "${pids[-1]}" "$tmp/floor.log"

DBUS_SESSION_BUS_ADDRESS="$address" libvirt-dbus --session >"$tmp/libvirt-dbus.log" 2>&1 &
pids+=($!)
wait_for_name org.libvirt "${pids[-1]}" "$tmp/libvirt-dbus.log"

"$daemon" --bus "$address" --libvirt-uri test:///default --state-dir "$state" \
  --runtime-dir "$tmp/run" --log-level warn >"$tmp/nodemanagerd.log" 2>&1 &
pids+=($!)
wait_for_name org.nodemanager.NodeManager1 "${pids[-1]}" "$tmp/nodemanagerd.log"

say "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
say "lifecycle_bench --bus $address --cycles $cycles ${args[*]:-}"
"$bench" --bus "$address" --cycles "$cycles" "${args[@]}"
