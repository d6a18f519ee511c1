#include "nm/health_probes.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

#include "nm/core/fs.h"

namespace nm {

namespace {

std::string mib(uint64_t bytes) {
  return std::to_string(bytes >> 20) + " MiB";
}

Status errno_status(const std::string& what, const std::string& path, int err) {
  return unavailable(what + " '" + path + "': " + std::strerror(err));
}

// "avg10=1.23" inside a PSI line.
Result<double> psi_field(std::string_view line, std::string_view key) {
  const std::string needle = std::string(key) + "=";
  const size_t at = line.find(needle);
  if (at == std::string_view::npos) {
    return invalid_argument("PSI line '" + std::string(line) + "' has no " + std::string(key));
  }
  std::string_view num = line.substr(at + needle.size());
  num = num.substr(0, num.find(' '));
  try {
    size_t used = 0;
    const double v = std::stod(std::string(num), &used);
    if (used != num.size()) throw std::invalid_argument("trailing");
    return v;
  } catch (const std::exception&) {
    return invalid_argument("PSI line '" + std::string(line) + "': bad " + std::string(key));
  }
}

}  // namespace

Result<DiskProbe> probe_dir(const std::string& dir) {
  const std::string path = dir + "/.health-probe";
  const UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd.valid()) return errno_status("creating", path, errno);
  static constexpr std::string_view kData = "nodemanager health probe\n";
  const ssize_t n = ::write(fd.get(), kData.data(), kData.size());
  int err = n < 0 ? errno : 0;
  if (n >= 0 && static_cast<size_t>(n) != kData.size()) err = ENOSPC;  // a short write: full
  if (err == 0 && ::fsync(fd.get()) != 0) err = errno;
  ::unlink(path.c_str());
  if (err != 0) return errno_status("writing", path, err);
  struct statvfs st {};
  if (::statvfs(dir.c_str(), &st) != 0) return errno_status("statvfs", dir, errno);
  return DiskProbe{.free_bytes = uint64_t{st.f_bavail} * st.f_frsize,
                   .total_bytes = uint64_t{st.f_blocks} * st.f_frsize};
}

Verdict judge_disk(const Result<DiskProbe>& probe, const DiskThresholds& t) {
  if (!probe.is_ok()) return {HealthState::kFailed, probe.status().message()};
  const uint64_t free = probe->free_bytes;
  const std::string have = mib(free) + " free of " + mib(probe->total_bytes);
  if (free < t.failed_below_bytes) {
    return {HealthState::kFailed, have + ", below " + mib(t.failed_below_bytes)};
  }
  if (free < t.degraded_below_bytes) {
    return {HealthState::kDegraded, have + ", below " + mib(t.degraded_below_bytes)};
  }
  return {HealthState::kOk, have};
}

Result<Psi> parse_psi(std::string_view text) {
  Psi psi;
  bool some = false;
  bool full = false;
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    const std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    if (line.rfind("some ", 0) == 0) {
      NM_ASSIGN_OR_RETURN(psi.some_avg10, psi_field(line, "avg10"));
      some = true;
    } else if (line.rfind("full ", 0) == 0) {
      NM_ASSIGN_OR_RETURN(psi.full_avg10, psi_field(line, "avg10"));
      full = true;
    }
  }
  if (!some) return invalid_argument("PSI text has no 'some' line");
  // Kernels before 5.13 have no "full" line for the whole system in some configurations.
  if (!full) psi.full_avg10 = 0;
  return psi;
}

Result<Psi> read_psi(const std::string& path) {
  std::ifstream in(path);
  if (!in) return unavailable("reading '" + path + "': " + std::strerror(errno));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_psi(ss.str());
}

Verdict judge_psi(const Result<Psi>& psi, const PsiThresholds& t) {
  if (!psi.is_ok()) {
    return {HealthState::kOk, "not measured: " + psi.status().message()};
  }
  char buf[96];
  std::snprintf(buf, sizeof buf, "memory stall avg10 some %.2f%%, full %.2f%%", psi->some_avg10,
                psi->full_avg10);
  std::string have = buf;
  if (psi->full_avg10 >= t.failed_full_avg10) {
    std::snprintf(buf, sizeof buf, " (full >= %.1f%%)", t.failed_full_avg10);
    return {HealthState::kFailed, have + buf};
  }
  if (psi->some_avg10 >= t.degraded_some_avg10) {
    std::snprintf(buf, sizeof buf, " (some >= %.1f%%)", t.degraded_some_avg10);
    return {HealthState::kDegraded, have + buf};
  }
  return {HealthState::kOk, have};
}

Verdict judge_link(const std::string& name, bool exists, bool admin_up, bool carrier,
                   std::string_view oper_state) {
  const std::string q = "'" + name + "'";
  if (!exists) return {HealthState::kFailed, "interface " + q + " does not exist"};
  if (!admin_up) return {HealthState::kFailed, "interface " + q + " is administratively down"};
  if (!carrier) {
    return {HealthState::kFailed,
            "interface " + q + " has no carrier (operstate " + std::string(oper_state) + ")"};
  }
  return {HealthState::kOk, "interface " + q + " is up with carrier"};
}

}  // namespace nm
