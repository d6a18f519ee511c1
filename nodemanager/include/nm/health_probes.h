// The host checks that read the machine: image-cache disk space and writability, memory pressure
// (PSI), and the verdicts for the uplink link state. Parsing and verdicts are pure; the probe_*
// functions do small, bounded I/O and are called from a worker thread, never the event loop.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "nm/core/status.h"
#include "nm/health.h"

namespace nm {

struct Verdict {
  HealthState state = HealthState::kOk;
  std::string reason;
};

// ---- image-disk ----
struct DiskThresholds {
  uint64_t degraded_below_bytes = uint64_t{4096} << 20;
  uint64_t failed_below_bytes = uint64_t{1024} << 20;
};
// Free space of the filesystem of `dir`, after proving it writable: a small file is created,
// written, fsynced and removed there. Unavailable naming the step that failed (ENOSPC included).
struct DiskProbe {
  uint64_t free_bytes = 0;
  uint64_t total_bytes = 0;
};
Result<DiskProbe> probe_dir(const std::string& dir);
// failed when the probe failed or free < failed_below; degraded when free < degraded_below.
Verdict judge_disk(const Result<DiskProbe>& probe, const DiskThresholds& t);

// ---- memory-pressure (Documentation/accounting/psi.rst) ----
struct Psi {
  double some_avg10 = 0;  // % of the last 10 s some task stalled on memory
  double full_avg10 = 0;  // % of the last 10 s all non-idle tasks stalled on memory
};
// Parses /proc/pressure/memory's two lines. InvalidArgument when a line is malformed.
Result<Psi> parse_psi(std::string_view text);
Result<Psi> read_psi(const std::string& path = "/proc/pressure/memory");
struct PsiThresholds {
  double degraded_some_avg10 = 20.0;
  double failed_full_avg10 = 50.0;
};
// ok when the kernel has no PSI (reason says so: nothing to measure is not a failure).
Verdict judge_psi(const Result<Psi>& psi, const PsiThresholds& t);

// ---- uplink ----
// failed when the interface is missing, administratively down or without carrier.
Verdict judge_link(const std::string& name, bool exists, bool admin_up, bool carrier,
                   std::string_view oper_state);

}  // namespace nm
