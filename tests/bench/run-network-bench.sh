#!/usr/bin/env bash
# Runs the tenant network benchmark (docs/benchmarks.md, issue 4): port attach time with 1, 100
# and 1000 ports on the host, first all on one network ("single", the worst case: one bridge),
# then spread over networks of at most 100 ports each ("spread"), and iperf3 throughput between
# two veth "VMs" on one bridge with and without the anti-spoofing table. network_bench moves
# itself into private network and mount namespaces, so nothing is left on the host.
#
#   sudo tests/bench/run-network-bench.sh [--levels 1,100,1000] [--samples 50]
#        [--scenarios single,spread] [--per-network 100] [--runs 5] [--seconds 3] [--strict]
#
# NM_BUILD_DIR: a configured build tree to use (default: <repo>/build, configured and built here
# when network_bench is missing). Needs root, ip, nft, dnsmasq (user 'dnsmasq'); without iperf3
# (Debian package iperf3) the throughput part is skipped.
# Exit status: network_bench's (0 ran, 1 a step failed, 2 bad usage, 3 --strict and a target
# missed), 77 when a needed program is missing or not root.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build="${NM_BUILD_DIR:-$repo/build}"

say() { echo "run-network-bench: $*" >&2; }

case "${1:-}" in
  -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  say "needs root (network namespaces, nftables)"; exit 77
fi
for bin in ip nft /usr/sbin/dnsmasq; do
  if ! command -v "$bin" >/dev/null; then
    say "'$bin' not found; run packaging/install-deps.sh"; exit 77
  fi
done
command -v iperf3 >/dev/null || say "iperf3 not found: the throughput part is skipped"

bench="$build/tests/bench/network_bench"
if [ ! -x "$bench" ]; then
  say "building network_bench in '$build'"
  if [ ! -f "$build/CMakeCache.txt" ]; then
    cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  fi
  cmake --build "$build" -j2 --target network_bench
fi

say "machine: $(nproc) cores, $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "reproduce: NM_BUILD_DIR=$build $0 $*"
exec "$bench" "$@"
