#!/usr/bin/env bash
# Lint gate for the C++ sources (ctest label 'lint').
#   (a) clang-format --dry-run --Werror over every *.h / *.cc under core/ imagestore/ network/
#       nodemanager/ tests/ (tracked files plus untracked files git does not ignore);
#   (b) clang-tidy, configured by the repo's .clang-tidy, over every *.cc under core/ imagestore/
#       network/ nodemanager/ that is in the build's compile_commands.json, in parallel.
# Any formatting difference or clang-tidy diagnostic in our sources fails the run.
#
# Usage: tests/lint.sh [BUILD_DIR]    BUILD_DIR holds compile_commands.json (default: build)
# Env:   CLANG_FORMAT, CLANG_TIDY     override the tool binaries; LINT_JOBS overrides $(nproc).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-build}
if [[ ${build} != /* ]]; then
  if [[ -d ${build} ]]; then build=$(cd "${build}" && pwd); else build="${root}/${build}"; fi
fi

find_tool() {
  local override=$1
  shift
  if [[ -n ${override} ]]; then
    echo "${override}"
    return
  fi
  local t
  for t in "$@"; do
    if command -v "${t}" >/dev/null 2>&1; then
      echo "${t}"
      return
    fi
  done
  echo "lint: none of '$*' found (Debian packages clang-format, clang-tidy)" >&2
  exit 2
}
clang_format=$(find_tool "${CLANG_FORMAT:-}" clang-format clang-format-14)
clang_tidy=$(find_tool "${CLANG_TIDY:-}" clang-tidy clang-tidy-14)

cd "${root}"
dirs=(core imagestore network nodemanager tests)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  mapfile -t listed < <(git ls-files --cached --others --exclude-standard -- "${dirs[@]}")
else
  mapfile -t listed < <(find "${dirs[@]}" -type f | sort)
fi
cxx=()
for f in "${listed[@]}"; do
  # --cached also lists tracked files deleted from the work tree.
  if [[ ${f} == *.h || ${f} == *.cc ]] && [[ -f ${f} ]]; then cxx+=("${f}"); fi
done

work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
failed=0

# (a) clang-format
fmt_bad=0
if ((${#cxx[@]} > 0)); then
  if ! "${clang_format}" --dry-run --Werror "${cxx[@]}" >"${work}/format.log" 2>&1; then
    fmt_bad=$(grep -oE '^[^:[:space:]]+\.(h|cc):[0-9]+:[0-9]+: (error|warning):' "${work}/format.log" |
      cut -d: -f1 | sort -u | tee "${work}/format.files" | wc -l)
    # Unparseable output (tool crash, bad .clang-format) still fails the run.
    ((fmt_bad > 0)) || fmt_bad=1
    echo "lint: clang-format: files that need 'clang-format -i':"
    sed 's/^/  /' "${work}/format.files" 2>/dev/null || true
    head -n 40 "${work}/format.log"
    failed=1
  fi
fi
echo "lint: clang-format: ${#cxx[@]} files checked, ${fmt_bad} need formatting"

# (b) clang-tidy
db="${build}/compile_commands.json"
if [[ ! -f ${db} ]]; then
  echo "lint: ${db} not found; configure first: cmake -S ${root} -B ${build}" >&2
  exit 2
fi
tidy=()
skipped=()
for f in "${cxx[@]}"; do
  [[ ${f} == *.cc && ${f} != tests/* ]] || continue
  if grep -qF "\"file\": \"${root}/${f}\"" "${db}"; then tidy+=("${f}"); else skipped+=("${f}"); fi
done

# Largest sources first, so that the slowest ones do not start last.
if ((${#tidy[@]} > 0)); then
  mapfile -t tidy < <(stat -c '%s %n' -- "${tidy[@]}" | sort -rn | cut -d' ' -f2-)
fi
jobs=${LINT_JOBS:-$(nproc)}
mkdir -p "${work}/tidy"
export clang_tidy build work
# One clang-tidy per file; each writes its output and exit code, so xargs itself never fails.
# shellcheck disable=SC2016  # expanded by the inner bash
printf '%s\0' "${tidy[@]}" | xargs -0 -r -n 1 -P "${jobs}" bash -c '
  out="${work}/tidy/${1//\//_}"
  rc=0
  "${clang_tidy}" -p "${build}" --quiet --warnings-as-errors="*" "$1" >"${out}.log" 2>&1 || rc=$?
  echo "${rc}" >"${out}.rc"
' lint-tidy

tidy_failed_files=()
tidy_failed_logs=()
for f in "${tidy[@]}"; do
  out="${work}/tidy/${f//\//_}"
  rc=$(cat "${out}.rc" 2>/dev/null || echo missing)
  if [[ ${rc} != 0 ]]; then
    tidy_failed_files+=("${f} (exit ${rc})")
    tidy_failed_logs+=("${out}.log")
  fi
done
# Diagnostics located in our sources (not in the build dir's generated files), deduplicated:
# a header included by several sources is reported once.
cat "${work}"/tidy/*.log 2>/dev/null |
  grep -E "^${root}/[^:]+:[0-9]+:[0-9]+: (warning|error):" |
  grep -vF "${build}/" | sed "s|^${root}/||" | sort -u >"${work}/tidy.findings" || true
findings=$(wc -l <"${work}/tidy.findings")
if ((findings > 0)); then
  echo "lint: clang-tidy findings:"
  cat "${work}/tidy.findings"
  echo "lint: clang-tidy findings by check:"
  grep -oE '\[[^]]+\]$' "${work}/tidy.findings" | sed -E 's/,-warnings-as-errors//' |
    sort | uniq -c | sort -rn | sed 's/^/  /'
  failed=1
fi
if ((${#tidy_failed_files[@]} > 0)); then
  echo "lint: clang-tidy failed on:"
  printf '  %s\n' "${tidy_failed_files[@]}"
  if ((findings == 0)); then
    # Failure without a located finding (crash, bad flags): show the raw output.
    for log in "${tidy_failed_logs[@]}"; do
      head -n 20 "${log}" 2>/dev/null || true
    done
  fi
  failed=1
fi
if ((${#skipped[@]} > 0)); then
  echo "lint: clang-tidy: not in compile_commands.json, not checked: ${skipped[*]}"
fi
echo "lint: clang-tidy: ${#tidy[@]} files checked, ${findings} findings," \
  "${#tidy_failed_files[@]} files failed"

if ((failed)); then
  echo "lint: FAILED"
  exit 1
fi
echo "lint: OK"
