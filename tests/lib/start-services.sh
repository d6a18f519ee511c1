#!/usr/bin/env bash
# Brings up what the e2e tier needs on a host without systemd as PID 1: a system dbus-daemon,
# virtlogd and libvirtd (QEMU driver), as docs/testing.md and DESIGN.md ("Facts about the
# machines") describe.
#
#   tests/lib/start-services.sh          run it, or
#   . tests/lib/start-services.sh        source it (it does not change the caller's shell options)
#
# Idempotent: a service that already answers is left alone. The pids of the services this script
# started are appended to $NM_SERVICES_STATE (default /run/nodemanager-test/services.pids), so
# tests/lib/stop-services.sh stops exactly those and nothing it did not start.
#
# Needs root. Host changes it makes (and leaves in place, they are harmless and needed again next
# time): the user 'libvirt-qemu' (group 'kvm') if missing, `user = "root"` and `group = "root"` in
# /etc/libvirt/qemu.conf (plus `namespaces = []` when '/' is not a mount point, as in a chroot),
# /var/log/libvirt, /run/dbus.
#
# Exit status: 0 when libvirtd answers on qemu:///system, non-zero otherwise (with a reason).

nm_start_services() (
  set -euo pipefail
  local state="${NM_SERVICES_STATE:-/run/nodemanager-test/services.pids}"
  local logdir="${NM_SERVICES_LOGDIR:-/var/log/libvirt}"
  local wait_s="${NM_SERVICES_TIMEOUT:-30}"

  say() { echo "start-services: $*" >&2; }
  die() { say "$*"; exit 1; }
  record() { mkdir -p "$(dirname "$state")"; echo "$1 $2" >>"$state"; }
  # Runs "$@" every 0.2 s until it succeeds, at most $wait_s seconds.
  wait_for() {
    local what="$1"; shift
    local deadline=$((SECONDS + wait_s))
    until "$@" >/dev/null 2>&1; do
      [ "$SECONDS" -lt "$deadline" ] || die "'$what' did not come up within ${wait_s}s"
      sleep 0.2
    done
  }
  pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
  read_pid() { if [ -r "$1" ]; then tr -dc '0-9' <"$1"; fi; }

  [ "$(id -u)" -eq 0 ] || die "must run as root (libvirtd and the system bus need it)"
  for bin in dbus-daemon dbus-send virtlogd libvirtd virsh; do
    command -v "$bin" >/dev/null || die "'$bin' not found; run packaging/install-deps.sh"
  done

  # --- host preparation (idempotent) ---
  getent group kvm >/dev/null || groupadd --system kvm
  getent passwd libvirt-qemu >/dev/null ||
    useradd --system --gid kvm --home-dir /var/lib/libvirt --no-create-home \
      --shell /usr/sbin/nologin libvirt-qemu
  local conf=/etc/libvirt/qemu.conf
  [ -f "$conf" ] || die "'$conf' missing; is libvirt-daemon-system installed?"
  # No systemd, no cgroup delegation, no DAC relabelling to another user: QEMU runs as root.
  grep -qE '^user = "root"' "$conf" || echo 'user = "root"' >>"$conf"
  grep -qE '^group = "root"' "$conf" || echo 'group = "root"' >>"$conf"
  # In a plain chroot '/' is no mount point, and QEMU's private mount namespace fails with
  # "Failed disable mount propagation out of the root filesystem": run QEMU without it there.
  if ! mountpoint -q / && ! grep -qE '^namespaces *=' "$conf"; then
    say "'/' is not a mount point (a chroot?): setting namespaces = [] in '$conf'"
    echo 'namespaces = []' >>"$conf"
  fi
  mkdir -p /var/log/libvirt "$logdir" /run/dbus

  # --- system D-Bus ---
  system_bus_answers() {
    dbus-send --system --print-reply --dest=org.freedesktop.DBus / org.freedesktop.DBus.GetId
  }
  if system_bus_answers >/dev/null 2>&1; then
    say "system dbus-daemon already running"
  else
    local stale
    stale="$(read_pid /run/dbus/pid)"
    pid_alive "$stale" || rm -f /run/dbus/pid
    rm -f /run/dbus/system_bus_socket
    local pid
    pid="$(dbus-daemon --system --fork --print-pid </dev/null 2>>"$logdir/dbus-daemon.log")"
    record dbus-daemon "$pid"
    wait_for "system dbus-daemon" system_bus_answers
    say "started system dbus-daemon (pid $pid)"
  fi

  # --- virtlogd (QEMU's stdout/stderr and, with <log>, serial consoles go through it) ---
  local vpid
  vpid="$(read_pid /run/virtlogd.pid)"
  if pid_alive "$vpid" && [ -S /run/libvirt/virtlogd-sock ]; then
    say "virtlogd already running (pid $vpid)"
  else
    rm -f /run/virtlogd.pid
    virtlogd -d </dev/null >>"$logdir/virtlogd.stdout" 2>&1
    wait_for "virtlogd" test -S /run/libvirt/virtlogd-sock
    vpid="$(read_pid /run/virtlogd.pid)"
    record virtlogd "$vpid"
    say "started virtlogd (pid $vpid)"
  fi

  # --- libvirtd ---
  libvirt_answers() { timeout 5 virsh -q -c qemu:///system version; }
  local lpid
  lpid="$(read_pid /run/libvirtd.pid)"
  if pid_alive "$lpid" && libvirt_answers >/dev/null 2>&1; then
    say "libvirtd already running (pid $lpid)"
  else
    if pid_alive "$lpid"; then
      die "libvirtd (pid $lpid) runs but does not answer on qemu:///system; see $logdir/libvirtd.log"
    fi
    rm -f /run/libvirtd.pid
    LIBVIRT_LOG_OUTPUTS="3:file:$logdir/libvirtd.log" libvirtd -d \
      </dev/null >>"$logdir/libvirtd.stdout" 2>&1
    wait_for "libvirtd" test -s /run/libvirtd.pid
    lpid="$(read_pid /run/libvirtd.pid)"
    record libvirtd "$lpid"
    wait_for "libvirtd on qemu:///system" libvirt_answers
    say "started libvirtd (pid $lpid)"
  fi
  say "libvirtd answers on qemu:///system"
)

nm_start_services "$@"
