#!/usr/bin/env bash
# Stops the services tests/lib/start-services.sh started, and only those: it reads their pids
# from $NM_SERVICES_STATE (default /run/nodemanager-test/services.pids), newest first, sends
# SIGTERM, waits up to 15 s each and then SIGKILLs. A pid whose process no longer runs the
# recorded program (a reused pid) is skipped. Safe to run when nothing was started.

nm_stop_services() (
  set -uo pipefail
  local state="${NM_SERVICES_STATE:-/run/nodemanager-test/services.pids}"
  [ -f "$state" ] || exit 0
  local lines name pid comm i
  mapfile -t lines <"$state"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid <<<"${lines[$i]}"
    [ -n "${pid:-}" ] || continue
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    if [ "$comm" != "$name" ]; then
      continue  # gone already, or the pid was reused by something we did not start
    fi
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 75); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop-services: '$name' (pid $pid) ignored SIGTERM for 15s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stop-services: stopped $name (pid $pid)" >&2
  done
  rm -f "$state"
)

nm_stop_services "$@"
