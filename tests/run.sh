#!/usr/bin/env bash
# Builds nodemanager and runs every test tier; what CI runs (.ci/run). See docs/testing.md.
#
#   tests/run.sh           deps, ci build (warnings are errors), services, guest,
#                          ctest -L 'unit|integration|system|e2e', ASan+UBSan build running the
#                          unit and integration tiers, libFuzzer build running the fuzz tier,
#                          then tests/lint.sh (clang-format + clang-tidy)
#   tests/run.sh --quick   ci build, unit + integration only (no services, guest, asan, fuzz)
#
# Environment (all optional):
#   NM_JOBS           parallel build jobs (default: nproc)
#   NM_CTEST_JOBS     parallel tests per ctest run (default: 1; tests that boot guests or share
#                     libvirtd are RUN_SERIAL anyway)
#   NM_BUILD_DIR      build directory of the ci build (default: the preset's, ./build); asan and
#                     fuzz builds go to ${NM_BUILD_DIR}-asan and ${NM_BUILD_DIR}-fuzz when set
#   NM_GUEST_CACHE    cache directory for the test guest (default: build-guest.sh's)
#   NM_ASAN_DETECT_LEAKS  1 or 0 (default 1): LeakSanitizer in the asan run
#
# Exported to the tests: NM_SERVICES_STATE (so nothing else stops our services), and, when
# running as root with libvirtd up, NM_E2E_LIBVIRT_URI=qemu:///system (enables the libvirt
# adapter's tests against the real daemon).
#
# Exit status: 0 when every stage passed; 1 otherwise (every test stage still runs after a test
# failure, a configure or build failure ends the run). Services this script started are stopped
# on exit, whatever happens; services that were already running are left alone.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

quick=0
case "${1:-}" in
  "") ;;
  --quick) quick=1 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

jobs="${NM_JOBS:-$(nproc)}"
ctest_jobs="${NM_CTEST_JOBS:-1}"
build_ci=(); build_asan=(); build_fuzz=()
if [ -n "${NM_BUILD_DIR:-}" ]; then
  build_ci=(-B "$NM_BUILD_DIR"); build_asan=(-B "$NM_BUILD_DIR-asan")
  build_fuzz=(-B "$NM_BUILD_DIR-fuzz")
fi
dir_ci="${NM_BUILD_DIR:-$root/build}"
# With NM_BUILD_DIR, ctest must not be given a test preset: the preset's binaryDir would win
# over --test-dir whenever it exists. The presets only add --output-on-failure.
ctest_ci=(--preset ci); ctest_asan=(--preset asan)
if [ -n "${NM_BUILD_DIR:-}" ]; then
  ctest_ci=(--output-on-failure); ctest_asan=(--output-on-failure)
fi
dir_asan="${NM_BUILD_DIR:+$NM_BUILD_DIR-asan}"; dir_asan="${dir_asan:-$root/build-asan}"
dir_fuzz="${NM_BUILD_DIR:+$NM_BUILD_DIR-fuzz}"; dir_fuzz="${dir_fuzz:-$root/build-fuzz}"

run_tmp="$(mktemp -d /tmp/nm-run.XXXXXX)"
export NM_SERVICES_STATE="$run_tmp/services.pids"
[ -z "${NM_GUEST_CACHE:-}" ] || export NM_GUEST_CACHE

timings=()
failed=()
run_start=$SECONDS

summary() {
  local rc=$?
  if [ -f "$NM_SERVICES_STATE" ]; then
    bash "$root/tests/lib/stop-services.sh" || true
  fi
  rm -rf "$run_tmp"
  echo
  echo "== tests/run.sh: stage timings =="
  local t
  for t in "${timings[@]}"; do echo "  $t"; done
  echo "  total $((SECONDS - run_start))s"
  if [ "$rc" -eq 0 ] && [ ${#failed[@]} -eq 0 ]; then
    echo "== tests/run.sh: ALL PASSED =="
  else
    echo "== tests/run.sh: FAILED: ${failed[*]:-aborted (exit $rc)} =="
    [ "$rc" -ne 0 ] || rc=1
  fi
  exit "$rc"
}
trap summary EXIT
trap 'exit 130' INT TERM

# stage NAME CMD...: runs a stage that must pass (the run ends if it fails).
stage() {
  local name="$1"; shift
  echo
  echo "== [$name] $* =="
  local t0=$SECONDS rc=0
  "$@" || rc=$?
  timings+=("$(printf '%-16s %4ss%s' "$name" $((SECONDS - t0)) "$([ $rc -eq 0 ] || echo "  FAILED (exit $rc)")")")
  if [ $rc -ne 0 ]; then
    failed+=("$name")
    return "$rc"
  fi
}

# test_stage NAME CMD...: a test stage; a failure is recorded and the run goes on.
test_stage() {
  stage "$@" || true
}

stage deps bash packaging/install-deps.sh
stage configure cmake --preset ci "${build_ci[@]}"
stage build cmake --build "$dir_ci" -j "$jobs"

if [ "$quick" = 1 ]; then
  test_stage tests ctest "${ctest_ci[@]}" --test-dir "$dir_ci" -L 'unit|integration' \
    --no-tests=error -j "$ctest_jobs" --timeout 600
  [ ${#failed[@]} -eq 0 ]
  exit
fi

if [ "$(id -u)" -eq 0 ]; then
  stage services bash tests/lib/start-services.sh
  stage guest bash tests/guest/build-guest.sh ${NM_GUEST_CACHE:+"$NM_GUEST_CACHE"}
  # Integration tests of the libvirt adapter that need a real libvirtd run when this is set.
  export NM_E2E_LIBVIRT_URI=qemu:///system
else
  echo "tests/run.sh: not root: no libvirtd, the e2e tier will skip" >&2
fi

test_stage tests ctest "${ctest_ci[@]}" --test-dir "$dir_ci" -L 'unit|integration|system|e2e' \
  --no-tests=error -j "$ctest_jobs" --timeout 600

export ASAN_OPTIONS="detect_leaks=${NM_ASAN_DETECT_LEAKS:-1}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
if stage asan-configure cmake --preset asan "${build_asan[@]}" &&
  stage asan-build cmake --build "$dir_asan" -j "$jobs"; then
  test_stage asan-tests ctest "${ctest_asan[@]}" --test-dir "$dir_asan" -L 'unit|integration' \
    --no-tests=error -j "$ctest_jobs" --timeout 900
fi
unset ASAN_OPTIONS UBSAN_OPTIONS

if stage fuzz-configure cmake --preset fuzz "${build_fuzz[@]}" &&
  stage fuzz-build cmake --build "$dir_fuzz" -j "$jobs" --target spec_fuzz; then
  test_stage fuzz-tests ctest --test-dir "$dir_fuzz" -L fuzz --output-on-failure \
    --no-tests=error --timeout 600
fi

# Style gate: clang-format and clang-tidy over the sources (tests/lint.sh, ctest label lint).
test_stage lint ctest "${ctest_ci[@]}" --test-dir "$dir_ci" -L lint --no-tests=error --timeout 900

[ ${#failed[@]} -eq 0 ]
