#include "nm/capacity.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "nm/core/ids.h"

namespace nm {

namespace {

ResourceCapacity resource(std::string name, uint64_t total, uint64_t reserved, double ratio,
                          uint64_t allocated) {
  const uint64_t usable = total > reserved ? total - reserved : 0;
  return ResourceCapacity{
      .resource = std::move(name),
      .total = total,
      .reserved = reserved,
      .ratio = ratio,
      .capacity = static_cast<uint64_t>(std::floor(static_cast<double>(usable) * ratio)),
      .allocated = allocated};
}

Status quota_error(std::string_view field, std::string_view text, const std::string& rule) {
  return invalid_argument(std::string(field) + ": '" + std::string(text) + "': " + rule);
}

}  // namespace

std::vector<ResourceCapacity> compute_capacity(const HostTotals& host,
                                               const CapacityOptions& options,
                                               const Usage& allocated) {
  return {resource("vcpus", host.vcpus, options.reserved_vcpus, options.cpu_ratio, allocated.vcpus),
          resource("memory_mib", host.memory_mib, options.reserved_memory_mib, options.memory_ratio,
                   allocated.memory_mib),
          resource("disk_gib", host.disk_gib, host.disk_reserved_gib, options.disk_ratio,
                   allocated.disk_gib)};
}

Status parse_tenant_quota(std::string_view text, std::string_view field,
                          std::map<std::string, TenantQuota>& into) {
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) {
    return quota_error(field, text, "expected TENANT:key=N[,key=N...]");
  }
  const std::string tenant(text.substr(0, colon));
  if (auto t = TenantId::parse(tenant, std::string(field) + " tenant"); !t.is_ok()) {
    return t.status();
  }
  if (into.count(tenant)) return quota_error(field, text, "tenant '" + tenant + "' given twice");
  TenantQuota q;
  std::string_view rest = text.substr(colon + 1);
  for (bool more = true; more;) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    more = comma != std::string_view::npos;
    rest = more ? rest.substr(comma + 1) : std::string_view();
    if (item.empty()) return quota_error(field, text, "empty limit (expected key=N)");
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos) {
      return quota_error(field, text, "'" + std::string(item) + "' is not key=N");
    }
    const std::string_view key = item.substr(0, eq);
    const std::string_view num = item.substr(eq + 1);
    uint64_t value = 0;
    const auto [end, ec] = std::from_chars(num.data(), num.data() + num.size(), value);
    if (ec != std::errc() || end != num.data() + num.size() || num.empty()) {
      return quota_error(field, text,
                         "limit '" + std::string(key) + "' must be a non-negative integer");
    }
    std::optional<uint64_t>* slot = key == "vms"          ? &q.vms
                                    : key == "vcpus"      ? &q.vcpus
                                    : key == "memory_mib" ? &q.memory_mib
                                                          : nullptr;
    if (!slot) {
      return quota_error(field, text,
                         "unknown limit '" + std::string(key) + "' (vms, vcpus, memory_mib)");
    }
    if (slot->has_value()) {
      return quota_error(field, text, "limit '" + std::string(key) + "' given twice");
    }
    *slot = value;
  }
  into.emplace(tenant, q);
  return Status::ok();
}

Status admit(const Usage& request, const std::vector<ResourceCapacity>& capacity,
             const std::string& tenant, const TenantQuota* quota, const Usage& tenant_usage) {
  for (const auto& r : capacity) {
    const uint64_t want = r.resource == "vcpus"        ? request.vcpus
                          : r.resource == "memory_mib" ? request.memory_mib
                                                       : request.disk_gib;
    const uint64_t free = r.capacity > r.allocated ? r.capacity - r.allocated : 0;
    if (want > free) {
      return {Code::kInsufficientCapacity, r.resource + ": " + std::to_string(want) +
                                               " requested, " + std::to_string(free) + " of " +
                                               std::to_string(r.capacity) + " free on this node"};
    }
  }
  if (!quota) return Status::ok();
  auto over = [&](const char* what, const std::optional<uint64_t>& limit, uint64_t used,
                  uint64_t want) -> Status {
    if (!limit || used + want <= *limit) return Status::ok();
    return {Code::kQuotaExceeded, std::string(what) + ": tenant '" + tenant + "' uses " +
                                      std::to_string(used) + " of its quota of " +
                                      std::to_string(*limit) + " on this node, " +
                                      std::to_string(want) + " more requested"};
  };
  NM_RETURN_IF_ERROR(over("vms", quota->vms, tenant_usage.vms, request.vms));
  NM_RETURN_IF_ERROR(over("vcpus", quota->vcpus, tenant_usage.vcpus, request.vcpus));
  return over("memory_mib", quota->memory_mib, tenant_usage.memory_mib, request.memory_mib);
}

CrashHistory::Decision CrashHistory::record(const CrashPolicy& policy,
                                            std::chrono::steady_clock::time_point now) {
  crashes_.erase(std::remove_if(crashes_.begin(), crashes_.end(),
                                [&](auto t) { return now - t > policy.window; }),
                 crashes_.end());
  crashes_.push_back(now);
  Decision d;
  d.crashes = static_cast<uint32_t>(crashes_.size());
  if (d.crashes > policy.max_restarts) return d;
  d.restart = true;
  d.attempt = d.crashes;
  constexpr std::chrono::milliseconds kMaxDelay{300000};
  auto delay = policy.backoff;
  for (uint32_t i = 1; i < d.attempt && delay < kMaxDelay; ++i) delay *= 2;
  d.delay = std::min(delay, kMaxDelay);
  return d;
}

}  // namespace nm
