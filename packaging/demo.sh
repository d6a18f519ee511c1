#!/usr/bin/env bash
# A guided tour of nodemanager on this machine, narrated step by step:
#
#   packaging/demo.sh          on libvirt's built-in test driver (test:///default): no VMs really
#                              run, nothing on the host changes. As root, the daemon runs in a
#                              network namespace of its own and the tour includes tenant networks
#                              (bridges, DHCP, anti-spoofing rules); without root it skips them
#   packaging/demo.sh --real   on real libvirtd + QEMU (TCG), booting the tiny test guest; needs
#                              root (starts libvirtd & co. if they are not running)
#
# It builds what is missing (packaging/install-deps.sh + the default CMake preset; both do nothing
# when everything is in place), starts a private dbus-daemon and nodemanagerd with a temporary
# state directory, then drives everything with nodectl: pulls images from a shared directory
# store (and imports one local file), creates a tenant network for each of two tenants (same
# subnet, isolated), creates two VMs on them, starts them, lists them, shows one, stops and
# deletes one, prints the event stream and shuts down cleanly. Everything it started is stopped and its temp files removed on exit, also
# on failure or Ctrl-C.
#
# NM_BUILD_DIR selects the build directory (default: ./build, the default preset's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
real=0
case "${1:-}" in
  "") ;;
  --real) real=1 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--real]" >&2; exit 2 ;;
esac

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
note() { echo "    $*"; }
show() { echo "\$ nodectl $*"; "$nodectl" --bus "$bus" "$@"; }

build="${NM_BUILD_DIR:-$root/build}"
tmp="$(mktemp -d /tmp/nm-demo.XXXXXX)"
state="$tmp/state"
bus="unix:path=$tmp/bus"
bus_pid=""
daemon_pid=""
netns=""
networks=0
pool="nm-demo-$(basename "$tmp" | cut -d. -f2 | tr '[:upper:]' '[:lower:]')"
export NM_SERVICES_STATE="$tmp/services.pids"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
    kill -TERM "$daemon_pid"
    wait "$daemon_pid"
  fi
  # dnsmasq drops root and so outlives a killed daemon: stop ours by their files' location.
  for pid in $(pgrep -x dnsmasq 2>/dev/null); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$tmp/run/"; then
      kill -TERM "$pid" 2>/dev/null
    fi
  done
  [ -n "$netns" ] && ip netns del "$netns" 2>/dev/null
  if [ "$real" = 1 ]; then
    # The overlay pool nodemanagerd defined points into our temp dir: remove it with the dir.
    if virsh -q -c qemu:///system pool-info "$pool" >/dev/null 2>&1; then
      virsh -q -c qemu:///system pool-destroy "$pool" >/dev/null 2>&1
      virsh -q -c qemu:///system pool-undefine "$pool" >/dev/null 2>&1
    fi
    [ -f "$NM_SERVICES_STATE" ] && bash "$root/tests/lib/stop-services.sh"
    # The daemon ran in this host's network namespace: its (now empty) anti-spoofing table
    # stays after its networks were deleted; it is the demo's to remove.
    nft delete table bridge nodemanager 2>/dev/null
  fi
  if [ -n "$bus_pid" ] && kill -0 "$bus_pid" 2>/dev/null; then
    kill -TERM "$bus_pid"
    wait "$bus_pid" 2>/dev/null
  fi
  rm -rf "$tmp"
  [ "$rc" -eq 0 ] || echo "demo: FAILED (exit $rc); see the output above" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Build (skipped when up to date)"
bash "$root/packaging/install-deps.sh"
if [ ! -f "$build/build.ninja" ]; then
  cmake --preset default ${NM_BUILD_DIR:+-B "$NM_BUILD_DIR"} >/dev/null
fi
cmake --build "$build" -j "$(nproc)" --target nodemanagerd nodectl | tail -n 1
nodemanagerd="$build/nodemanager/daemon/nodemanagerd"
nodectl="$build/nodemanager/cli/nodectl"
note "nodemanagerd: $nodemanagerd"
note "nodectl:      $nodectl"

[ "$(id -u)" -eq 0 ] && networks=1
if [ "$real" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "demo: --real needs root" >&2; exit 1; }
  step "Start libvirtd, virtlogd and the system bus (if not running yet)"
  bash "$root/tests/lib/start-services.sh"
  step "Build the tiny test guest (Debian cloud kernel + busybox initramfs; cached)"
  guest_out="$(bash "$root/tests/guest/build-guest.sh")"
  while read -r line; do note "$line"; done <<<"$guest_out"
  uri="qemu:///system"
  extra=(--domain-type qemu --storage-pool "$pool")
else
  uri="test:///default"
  extra=()
fi

step "Start a private D-Bus bus at $bus"
dbus-daemon --session --nofork --nopidfile --address "$bus" </dev/null >/dev/null 2>&1 &
bus_pid=$!
for _ in $(seq 50); do [ -S "$tmp/bus" ] && break; sleep 0.1; done
[ -S "$tmp/bus" ] || { echo "demo: dbus-daemon did not start" >&2; exit 1; }

# dnsmasq (DHCP of tenant networks) runs as its own user: it must reach its files in $tmp/run.
chmod 0711 "$tmp"
launch=()
if [ "$networks" = 1 ] && [ "$real" = 0 ]; then
  # The daemon owns the network state of its host: give it a host of its own, a network namespace
  # with a private /run/netns, so the demo changes nothing on this machine.
  netns="nm-demo-$(basename "$tmp" | cut -d. -f2 | tr '[:upper:]' '[:lower:]')"
  ip netns add "$netns"
  launch=(ip netns exec "$netns" unshare --mount --propagation private
    sh -c 'mount -t tmpfs nm-netns /run/netns && exec "$0" "$@"')
  host() { ip netns exec "$netns" "$@"; }
else
  host() { "$@"; }
fi

# The shared image store: what an image service publishes, one manifest per name:tag.
store="$tmp/store"
mkdir -p "$store/blobs/sha256"
publish() {  # NAME FILE SHA256 KIND
  mkdir -p "$store/$1"
  cp "$2" "$store/blobs/sha256/$3"
  printf '{"digest": "sha256:%s", "size": %s, "format": "raw", "kind": "%s"}\n' \
    "$3" "$(stat -c %s "$2")" "$4" >"$store/$1/1.json"
}

step "Start nodemanagerd on $uri with state in $state"
note "nodemanagerd --bus $bus --libvirt-uri $uri ${extra[*]:+${extra[*]} }--state-dir $state --runtime-dir $tmp/run --image-source dir:$store"
if [ -n "$netns" ]; then
  note "(inside network namespace '$netns': its own bridges, nft table and DHCP servers)"
fi
"${launch[@]}" "$nodemanagerd" --config /dev/null --bus "$bus" --libvirt-uri "$uri" "${extra[@]}" \
  --state-dir "$state" --runtime-dir "$tmp/run" --image-source "dir:$store" \
  </dev/null >"$tmp/nodemanagerd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
  "$nodectl" --bus "$bus" vm list >/dev/null 2>&1 && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$tmp/nodemanagerd.log"; exit 1; }
  sleep 0.2
done
note "nodemanagerd (pid $daemon_pid) owns org.nodemanager.NodeManager1"

step "Pull images from the shared image store (a directory here; NFS or http:// in production)"
note "store: $store/<name>/<tag>.json manifests, $store/blobs/sha256/<digest> blobs"
if [ "$real" = 1 ]; then
  pulls=()
  while read -r kind path sha; do
    publish "demo-$kind" "$path" "$sha" "$kind"
    pulls+=("demo-$kind:1")
  done <<<"$guest_out"
  show image pull "${pulls[@]}"
else
  disk="$tmp/demo-disk.raw"
  truncate -s 16M "$disk"
  printf 'NMDISK demo disk\n' | dd of="$disk" conv=notrunc status=none
  publish demo-disk "$disk" "$(sha256sum "$disk" | cut -d' ' -f1)" disk
  show image pull demo-disk:1
  step "Import a local file too (verified against its SHA-256 while copying)"
  printf 'NMDISK scratch\n' >"$tmp/scratch.raw"
  truncate -s 1M "$tmp/scratch.raw"
  show image import scratch:1 "$tmp/scratch.raw" \
    --sha256 "$(sha256sum "$tmp/scratch.raw" | cut -d' ' -f1)" --kind disk --wait
fi
show image list

if [ "$networks" = 1 ]; then
  step "Create a tenant network for each tenant: the same subnet, separate segments"
  vni=4101
  for tenant in contoso fabrikam; do
    cat >"$tmp/$tenant-net.json" <<EOF
{ "name": "$tenant-net", "tenant": "$tenant", "vni": $vni, "subnet": "10.20.0.0/24" }
EOF
    note "spec $tenant-net.json: $(tr -s ' \n' ' ' <"$tmp/$tenant-net.json")"
    show network create -f "$tmp/$tenant-net.json" --wait
    vni=$((vni + 1))
  done
  show network list
  note "on the host: one bridge per network (no address on it), a veth into each DHCP namespace:"
  host ip -br link | grep -E '^nm' | sed 's/^/    /'
else
  step "Tenant networks: skipped (they need root: bridges, nftables, network namespaces)"
fi

step "Create two VMs for two tenants"
for vm in web-1:contoso db-1:fabrikam; do
  name="${vm%%:*}"
  tenant="${vm#*:}"
  if [ "$real" = 1 ]; then
    cmdline="console=ttyS0"
    [ "$networks" = 1 ] && cmdline="console=ttyS0 nm.net=1"
    boot='"kernel_image": "demo-kernel:1", "initrd_image": "demo-initrd:1", "cmdline": "'"$cmdline"'",'
    memory=256
  else
    boot=''
    memory=512
  fi
  nets=''
  [ "$networks" = 1 ] && nets='"networks": [{ "network": "'"$tenant"'-net" }],'
  cat >"$tmp/$name.json" <<EOF
{ "name": "$name", "tenant": "$tenant", "vcpus": 1, "memory_mib": $memory,
  "image": "demo-disk:1", $boot $nets "autostart": true }
EOF
  note "spec $name.json: $(tr -s ' \n' ' ' <"$tmp/$name.json")"
  show vm create -f "$tmp/$name.json" --wait
done

step "Start them (each start is a job; --wait follows it to the end)"
show vm start web-1 --wait
show vm start db-1 --wait

step "List them"
show vm list
show vm list --tenant contoso

step "Show one"
show vm show web-1

if [ "$networks" = 1 ]; then
  step "Its port: address and MAC from the network, a fixed DHCP lease, anti-spoofing elements"
  show network show contoso-net
  note "nft table 'bridge nodemanager' holds each port's only allowed IPv4 (sets keyed by tap):"
  host nft list set bridge nodemanager port_ips | sed 's/^/    /'
fi

if [ "$real" = 1 ]; then
  step "Read web-1's serial console until the guest says it booted"
  id="$("$nodectl" --bus "$bus" --json vm show web-1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
  log="$state/instances/$id.serial.log"
  note "console log: $log"
  for _ in $(seq 180); do
    grep -aq NODEMANAGER-GUEST-READY "$log" 2>/dev/null && break
    sleep 0.5
  done
  grep -a NODEMANAGER-GUEST- "$log" | sed 's/^/    guest: /' || note "no boot marker yet"
fi

step "The node's health and capacity: what the fabric controller sees (Heartbeat every second)"
show node health
show node capacity

step "Drain the node: new VMs are refused, running ones keep running"
show node drain --reason "demo maintenance"
sed 's/"name": "web-1"/"name": "web-2"/' "$tmp/web-1.json" >"$tmp/web-2.json"
rc=0
show vm create -f "$tmp/web-2.json" || rc=$?
note "vm create while drained: refused with exit $rc (5 = Unavailable); web-1 is still running:"
show vm list --tenant contoso
show node undrain

step "Stop one of them gracefully (ACPI power button; forced after a timeout), then delete it"
show vm stop db-1 --wait
show vm delete db-1 --wait
show vm list

step "The event stream the daemon recorded (also replayable after a restart)"
show events

step "Clean up: stop and delete web-1 too, then stop the daemon with SIGTERM"
show vm stop web-1 --force --wait
show vm delete web-1 --wait
if [ "$networks" = 1 ]; then
  show network delete contoso-net --wait
  show network delete fabrikam-net --wait
  show network list
fi
kill -TERM "$daemon_pid"
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=""
note "nodemanagerd exited with status $rc"
[ "$rc" -eq 0 ]

step "Done: the bus, the temp state and everything started here go away now"
