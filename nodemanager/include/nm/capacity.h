// Capacity accounting and admission (GetCapacity, CreateVm's InsufficientCapacity and
// QuotaExceeded), and the per-VM crash-restart budget. Pure logic, no I/O.
//
// Capacity of a resource = (total - reserved for the host) * allocation ratio, as Nova's
// placement computes it. Allocated = the sum over every VM the node holds (running or not: a
// stopped VM may start at any time, so its resources stay promised). vCPUs and memory come from
// the hypervisor (or the config), disk is the instances filesystem, counted in GiB of the VMs'
// overlay sizes (thin overlays: the ratio expresses how far to overcommit them).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/status.h"

namespace nm {

struct CapacityOptions {
  uint32_t reserved_vcpus = 0;
  uint64_t reserved_memory_mib = 512;
  double cpu_ratio = 4.0;
  double memory_ratio = 1.0;
  double disk_ratio = 1.0;
};

// What the node has: host totals and the host's reservation for disk (the disk reserve).
struct HostTotals {
  uint64_t vcpus = 0;
  uint64_t memory_mib = 0;
  uint64_t disk_gib = 0;
  uint64_t disk_reserved_gib = 0;
};

// What VMs use (or ask for).
struct Usage {
  uint64_t vms = 0;
  uint64_t vcpus = 0;
  uint64_t memory_mib = 0;
  uint64_t disk_gib = 0;
  Usage& operator+=(const Usage& o) {
    vms += o.vms;
    vcpus += o.vcpus;
    memory_mib += o.memory_mib;
    disk_gib += o.disk_gib;
    return *this;
  }
};

struct ResourceCapacity {
  std::string resource;  // "vcpus", "memory_mib", "disk_gib"
  uint64_t total = 0;
  uint64_t reserved = 0;
  double ratio = 1.0;
  uint64_t capacity = 0;  // floor((total - reserved) * ratio); 0 when reserved >= total
  uint64_t allocated = 0;
};

std::vector<ResourceCapacity> compute_capacity(const HostTotals& host,
                                               const CapacityOptions& options,
                                               const Usage& allocated);

// Per-tenant limits on this node; an absent limit is unlimited.
struct TenantQuota {
  std::optional<uint64_t> vms;
  std::optional<uint64_t> vcpus;
  std::optional<uint64_t> memory_mib;
  bool operator==(const TenantQuota&) const = default;
};

// Parses "TENANT:vms=N,vcpus=N,memory_mib=N" (any non-empty subset of the keys). InvalidArgument
// naming `field` and the rule.
Status parse_tenant_quota(std::string_view text, std::string_view field,
                          std::map<std::string, TenantQuota>& into);

// Admission of `request` on a node with `capacity` (from compute_capacity) and, when the tenant
// has a quota, the tenant's current `tenant_usage`. InsufficientCapacity naming the resource
// ("memory_mib: 512 requested, 256 of 2560 free"), QuotaExceeded naming the tenant and limit.
Status admit(const Usage& request, const std::vector<ResourceCapacity>& capacity,
             const std::string& tenant, const TenantQuota* quota, const Usage& tenant_usage);

// ---- crash restarts ----

struct CrashPolicy {
  uint32_t max_restarts = 3;                // restarts allowed within `window`; 0: never restart
  std::chrono::seconds window{600};         // sliding window the restarts count in
  std::chrono::milliseconds backoff{1000};  // delay before the n-th restart: backoff * 2^(n-1)
  bool operator==(const CrashPolicy&) const = default;
};

// The crashes of one VM. record() a crash, then decide().
class CrashHistory {
 public:
  struct Decision {
    bool restart = false;
    uint32_t attempt = 0;  // 1-based restart number within the window (when restarting)
    uint32_t crashes = 0;  // crashes within the window, this one included
    std::chrono::milliseconds delay{0};
  };
  // Records a crash at `now` and decides: restart (after `delay`) while the crashes within the
  // window do not exceed max_restarts, else give up. The delay is capped at 5 minutes.
  Decision record(const CrashPolicy& policy, std::chrono::steady_clock::time_point now);
  // An explicit start by a client: the budget starts afresh.
  void reset() { crashes_.clear(); }

 private:
  std::vector<std::chrono::steady_clock::time_point> crashes_;
};

}  // namespace nm
