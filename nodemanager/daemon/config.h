// nodemanagerd's configuration: a plain struct with documented defaults, parsed once in main()
// from flags and the INI config file (a flag beats the file, the file beats the default).
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nm/core/status.h"
#include "nm/node_service.h"

namespace nm {

struct DaemonConfig {
  std::string config_file = "/etc/nodemanager/nodemanagerd.conf";  // missing default file is OK
  std::string bus = "system";  // "system", "session" or a D-Bus address
  std::string libvirt_uri = "qemu:///system";
  std::string state_dir = "/var/lib/nodemanager";
  std::string log_level = "info";
  std::string domain_type;                   // empty: libvirt's default ("kvm", "test")
  std::string storage_pool = "nodemanager";  // libvirt pool that holds the VM overlays
  uint32_t stop_timeout_ms = 60000;          // graceful stop before forcing
  uint32_t audit_interval_ms = 30000;        // periodic reconcile
  OrphanPolicy orphan_policy = OrphanPolicy::kReport;
  uint32_t workers = 64;            // most threads for blocking work (started on demand)
  uint32_t event_capacity = 10000;  // events kept for GetEvents replay
  uint32_t debug_job_delay_ms = 0;  // tests only: widen crash windows
  // Tenant networks: the interface VXLAN runs on (empty: host-local networks, no peers), the
  // VXLAN UDP port, and the MTU handed to guests by DHCP (underlay MTU minus 50 bytes).
  std::string underlay_interface;
  uint32_t vxlan_port = 4789;
  uint32_t network_mtu = 1450;
  std::string dnsmasq = "/usr/sbin/dnsmasq";  // the DHCP server binary
  // Runtime files (DHCP hosts files, leases, pid files), made mode 0711 so that dnsmasq, which
  // drops root, can reach its own files below it. systemd: RuntimeDirectory=nodemanager.
  std::string runtime_dir = "/run/nodemanager";
  // Image store: shared stores to pull from, in order ("dir:/path", "/path" or "http://..."),
  // space a pull leaves free, and garbage collection of unused images.
  std::vector<std::string> image_sources;
  uint64_t image_reserve_mib = 1024;
  uint64_t image_gc_min_age_s = 86400;
  uint64_t image_gc_interval_s = 3600;  // 0: no periodic collection
  // CreateVm is refused while the instances filesystem has less than this free.
  uint64_t disk_reserve_mib = 1024;
  // Who may call (authz.h): root and the daemon's own user always; the fabric identity (a user
  // and/or a group; names or numbers) may change state; the operators group may read and drain.
  // A default group missing on the host grants nothing (a warning); a configured one is an error.
  // Health (docs/operations.md "Read health"): heartbeat and probe periods, thresholds.
  uint32_t heartbeat_interval_ms = 1000;
  uint32_t health_interval_ms = 1000;  // state-db, image-disk, memory-pressure probes
  uint64_t health_disk_degraded_mib = 4096;
  uint64_t health_disk_failed_mib = 1024;
  double health_psi_degraded = 20.0;  // memory "some" avg10 %
  double health_psi_failed = 50.0;    // memory "full" avg10 %
  // Capacity: host totals (0: what libvirt reports), the host's reservation, overcommit ratios,
  // per-tenant quotas ("TENANT:vms=N,vcpus=N,memory_mib=N").
  uint32_t host_vcpus = 0;
  uint64_t host_memory_mib = 0;
  uint32_t reserved_vcpus = 0;
  uint64_t reserved_memory_mib = 512;
  double cpu_allocation_ratio = 4.0;
  double memory_allocation_ratio = 1.0;
  double disk_allocation_ratio = 1.0;
  std::vector<std::string> tenant_quota_specs;
  std::map<std::string, TenantQuota> tenant_quotas;  // parsed from tenant_quota_specs
  // Crash policy: restarts allowed within the window, first backoff (doubling).
  uint32_t crash_restart_max = 3;
  uint32_t crash_restart_window_s = 600;
  uint32_t crash_restart_backoff_ms = 1000;
  std::string fabric_user;
  std::string fabric_group = "nodemanager";
  std::string operators_group = "nodemanager-operators";
};

enum class ParseOutcome { kRun, kExitOk };

// Parses argv (and the config file it names). kExitOk after --help or --version (already
// printed to `out`). InvalidArgument naming the option and the rule on bad input.
Result<ParseOutcome> parse_daemon_config(int argc, const char* const* argv, DaemonConfig& config,
                                         std::string& out);

}  // namespace nm
