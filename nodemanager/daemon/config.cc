#include "config.h"

#include <boost/program_options.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace nm {
namespace po = boost::program_options;

Result<ParseOutcome> parse_daemon_config(int argc, const char* const* argv, DaemonConfig& c,
                                         std::string& out) {
  std::string orphan_policy = "report";
  po::options_description opts(
      "nodemanagerd options (each also settable as KEY=VALUE in the config file)");
  // clang-format off
  opts.add_options()
    ("help,h", "show this help and exit")
    ("version", "show the version and exit")
    ("config", po::value(&c.config_file)->default_value(c.config_file), "INI config file")
    ("bus", po::value(&c.bus)->default_value(c.bus), "D-Bus to serve on: system, session or an address (unix:path=...)")
    ("libvirt-uri", po::value(&c.libvirt_uri)->default_value(c.libvirt_uri), "libvirt connection URI")
    ("state-dir", po::value(&c.state_dir)->default_value(c.state_dir), "state directory (state.db, images/, instances/)")
    ("log-level", po::value(&c.log_level)->default_value(c.log_level), "trace, debug, info, warn, error, critical or off")
    ("domain-type", po::value(&c.domain_type), "libvirt <domain type>: kvm, qemu (TCG) or test; default: the connection's")
    ("storage-pool", po::value(&c.storage_pool)->default_value(c.storage_pool), "libvirt storage pool for VM overlays (in <state-dir>/instances)")
    ("stop-timeout-ms", po::value(&c.stop_timeout_ms)->default_value(c.stop_timeout_ms), "graceful stop: wait this long before forcing power-off")
    ("audit-interval-ms", po::value(&c.audit_interval_ms)->default_value(c.audit_interval_ms), "periodic reconcile of libvirt against the database")
    ("orphan-policy", po::value(&orphan_policy)->default_value(orphan_policy), "report or remove domains/overlays marked as ours that the database does not know")
    ("workers", po::value(&c.workers)->default_value(c.workers), "most threads for blocking libvirt and image work (started on demand; a graceful stop holds one while it waits)")
    ("event-capacity", po::value(&c.event_capacity)->default_value(c.event_capacity), "events kept for GetEvents replay")
    ("underlay-interface", po::value(&c.underlay_interface), "interface carrying tenant VXLAN traffic; empty: host-local tenant networks (no peers)")
    ("vxlan-port", po::value(&c.vxlan_port)->default_value(c.vxlan_port), "UDP port of VXLAN on the underlay")
    ("network-mtu", po::value(&c.network_mtu)->default_value(c.network_mtu), "MTU handed to guests by DHCP (underlay MTU minus 50 for VXLAN)")
    ("runtime-dir", po::value(&c.runtime_dir)->default_value(c.runtime_dir), "runtime files (DHCP hosts, leases, pid files); its parents must be searchable by the dnsmasq user")
    ("dnsmasq", po::value(&c.dnsmasq)->default_value(c.dnsmasq), "path of the dnsmasq binary that serves DHCP on tenant networks")
    ("image-source", po::value(&c.image_sources)->composing(), "shared image store to pull from, repeatable, tried in order: dir:/path, /path or http://host[:port]/base/")
    ("image-reserve-mib", po::value(&c.image_reserve_mib)->default_value(c.image_reserve_mib), "a pull must leave this much free on the image cache filesystem")
    ("image-gc-min-age", po::value(&c.image_gc_min_age_s)->default_value(c.image_gc_min_age_s), "seconds since its last use before an unused, unpinned image may be collected")
    ("image-gc-interval", po::value(&c.image_gc_interval_s)->default_value(c.image_gc_interval_s), "seconds between periodic image garbage collections; 0: never (nodectl image gc still works)")
    ("disk-reserve-mib", po::value(&c.disk_reserve_mib)->default_value(c.disk_reserve_mib), "CreateVm is refused while the instances filesystem has less than this free")
    ("heartbeat-interval-ms", po::value(&c.heartbeat_interval_ms)->default_value(c.heartbeat_interval_ms), "Heartbeat signal period")
    ("health-interval-ms", po::value(&c.health_interval_ms)->default_value(c.health_interval_ms), "period of the state-db, image-disk and memory-pressure probes")
    ("health-disk-degraded-mib", po::value(&c.health_disk_degraded_mib)->default_value(c.health_disk_degraded_mib), "image-disk check: degraded below this much free")
    ("health-disk-failed-mib", po::value(&c.health_disk_failed_mib)->default_value(c.health_disk_failed_mib), "image-disk check: failed below this much free (or when not writable)")
    ("health-psi-degraded", po::value(&c.health_psi_degraded)->default_value(c.health_psi_degraded, "20"), "memory-pressure check: degraded when PSI memory 'some' avg10 reaches this %")
    ("health-psi-failed", po::value(&c.health_psi_failed)->default_value(c.health_psi_failed, "50"), "memory-pressure check: failed when PSI memory 'full' avg10 reaches this %")
    ("host-vcpus", po::value(&c.host_vcpus)->default_value(c.host_vcpus), "host CPUs for capacity; 0: what libvirt reports")
    ("host-memory-mib", po::value(&c.host_memory_mib)->default_value(c.host_memory_mib), "host memory for capacity; 0: what libvirt reports")
    ("reserved-vcpus", po::value(&c.reserved_vcpus)->default_value(c.reserved_vcpus), "CPUs kept for the host, not given to VMs")
    ("reserved-memory-mib", po::value(&c.reserved_memory_mib)->default_value(c.reserved_memory_mib), "memory kept for the host, not given to VMs")
    ("cpu-allocation-ratio", po::value(&c.cpu_allocation_ratio)->default_value(c.cpu_allocation_ratio, "4.0"), "vCPU overcommit: capacity = (host CPUs - reserved) * ratio")
    ("memory-allocation-ratio", po::value(&c.memory_allocation_ratio)->default_value(c.memory_allocation_ratio, "1.0"), "memory overcommit ratio")
    ("disk-allocation-ratio", po::value(&c.disk_allocation_ratio)->default_value(c.disk_allocation_ratio, "1.0"), "disk overcommit ratio over the instances filesystem (thin overlays)")
    ("tenant-quota", po::value(&c.tenant_quota_specs)->composing(), "per-tenant limits on this node, repeatable: TENANT:vms=N,vcpus=N,memory_mib=N (any subset)")
    ("crash-restart-max", po::value(&c.crash_restart_max)->default_value(c.crash_restart_max), "restarts of a VM that stops unexpectedly, within the window, before it is left failed")
    ("crash-restart-window-s", po::value(&c.crash_restart_window_s)->default_value(c.crash_restart_window_s), "the window crash restarts count in, seconds")
    ("crash-restart-backoff-ms", po::value(&c.crash_restart_backoff_ms)->default_value(c.crash_restart_backoff_ms), "delay before the first crash restart; doubles for each further one in the window")
    ("fabric-user", po::value(&c.fabric_user), "user (name or uid) of the fabric controller: may call every method")
    ("fabric-group", po::value(&c.fabric_group)->default_value(c.fabric_group), "group (name or gid) whose members may call every method")
    ("operators-group", po::value(&c.operators_group)->default_value(c.operators_group), "group (name or gid) whose members may read and drain")
    ("debug-job-delay-ms", po::value(&c.debug_job_delay_ms)->default_value(0), "testing only: pause between job steps");
  // clang-format on
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    if (vm.count("help")) {
      std::ostringstream s;
      s << "Usage: nodemanagerd [OPTIONS]\n\nThe nodemanager host agent: provisions VMs through "
           "libvirt and serves org.nodemanager.NodeManager1 on D-Bus.\n\n"
        << opts;
      out = s.str();
      return ParseOutcome::kExitOk;
    }
    if (vm.count("version")) {
      out = "nodemanagerd " NM_VERSION "\n";
      return ParseOutcome::kExitOk;
    }
    const std::string file = vm.count("config") ? vm["config"].as<std::string>() : c.config_file;
    const bool explicit_file = !vm["config"].defaulted();
    if (std::filesystem::exists(file)) {
      std::ifstream in(file);
      if (!in) return invalid_argument("config: cannot read '" + file + "'");
      po::store(po::parse_config_file(in, opts, /*allow_unregistered=*/false), vm);
    } else if (explicit_file) {
      return invalid_argument("config: file '" + file + "' does not exist");
    }
    po::notify(vm);
  } catch (const po::error& e) {
    return invalid_argument(std::string(e.what()));
  }
  if (orphan_policy == "report") {
    c.orphan_policy = OrphanPolicy::kReport;
  } else if (orphan_policy == "remove") {
    c.orphan_policy = OrphanPolicy::kRemove;
  } else {
    return invalid_argument("orphan-policy: '" + orphan_policy + "' is not 'report' or 'remove'");
  }
  if (!c.domain_type.empty() && c.domain_type != "kvm" && c.domain_type != "qemu" &&
      c.domain_type != "test") {
    return invalid_argument("domain-type: '" + c.domain_type + "' is not kvm, qemu or test");
  }
  if (c.state_dir.empty() || c.state_dir.front() != '/') {
    return invalid_argument("state-dir: '" + c.state_dir + "' must be an absolute path");
  }
  if (c.workers < 1 || c.workers > 256) return invalid_argument("workers: must be 1 to 256");
  if (c.audit_interval_ms < 100) return invalid_argument("audit-interval-ms: must be >= 100");
  if (c.event_capacity < 100) return invalid_argument("event-capacity: must be >= 100");
  if (c.bus.empty()) return invalid_argument("bus: must be system, session or an address");
  if (c.underlay_interface.size() > 15) {
    return invalid_argument("underlay-interface: '" + c.underlay_interface +
                            "' is longer than 15 characters, so no interface has that name");
  }
  if (c.vxlan_port < 1 || c.vxlan_port > 65535) {
    return invalid_argument("vxlan-port: must be 1 to 65535");
  }
  if (c.network_mtu < 576 || c.network_mtu > 9000) {
    return invalid_argument("network-mtu: must be 576 to 9000");
  }
  if (c.runtime_dir.empty() || c.runtime_dir.front() != '/') {
    return invalid_argument("runtime-dir: '" + c.runtime_dir + "' must be an absolute path");
  }
  if (c.dnsmasq.empty() || c.dnsmasq.front() != '/') {
    return invalid_argument("dnsmasq: '" + c.dnsmasq + "' must be an absolute path");
  }
  for (const auto& src : c.image_sources) {
    if (src.empty()) return invalid_argument("image-source: must not be empty");
  }
  if (c.image_gc_min_age_s > uint64_t{100} * 366 * 24 * 3600) {
    return invalid_argument("image-gc-min-age: must be at most a century (3162240000 seconds)");
  }
  if (c.image_gc_interval_s > uint64_t{366} * 24 * 3600) {
    return invalid_argument("image-gc-interval: must be at most a year (31622400 seconds)");
  }
  if (c.image_gc_interval_s > 0 && c.image_gc_interval_s < 10) {
    return invalid_argument("image-gc-interval: must be 0 (off) or at least 10 seconds");
  }
  if (c.heartbeat_interval_ms < 50 || c.heartbeat_interval_ms > 3600000) {
    return invalid_argument("heartbeat-interval-ms: must be 50 to 3600000");
  }
  if (c.health_interval_ms < 50 || c.health_interval_ms > 3600000) {
    return invalid_argument("health-interval-ms: must be 50 to 3600000");
  }
  if (c.health_disk_failed_mib > c.health_disk_degraded_mib) {
    return invalid_argument("health-disk-failed-mib: must not exceed health-disk-degraded-mib (" +
                            std::to_string(c.health_disk_degraded_mib) + ")");
  }
  auto percent = [](double v, const char* name) -> Status {
    if (!(v > 0 && v <= 100)) {
      return invalid_argument(std::string(name) + ": must be a percentage above 0, at most 100");
    }
    return Status::ok();
  };
  NM_RETURN_IF_ERROR(percent(c.health_psi_degraded, "health-psi-degraded"));
  NM_RETURN_IF_ERROR(percent(c.health_psi_failed, "health-psi-failed"));
  auto ratio = [](double v, const char* name) -> Status {
    if (!(v > 0 && v <= 1000))
      return invalid_argument(std::string(name) + ": must be above 0, at most 1000");
    return Status::ok();
  };
  NM_RETURN_IF_ERROR(ratio(c.cpu_allocation_ratio, "cpu-allocation-ratio"));
  NM_RETURN_IF_ERROR(ratio(c.memory_allocation_ratio, "memory-allocation-ratio"));
  NM_RETURN_IF_ERROR(ratio(c.disk_allocation_ratio, "disk-allocation-ratio"));
  c.tenant_quotas.clear();
  for (const auto& q : c.tenant_quota_specs) {
    NM_RETURN_IF_ERROR(parse_tenant_quota(q, "tenant-quota", c.tenant_quotas));
  }
  if (c.crash_restart_max > kMaxCrashRestarts) {
    return invalid_argument("crash-restart-max: must be at most " +
                            std::to_string(kMaxCrashRestarts));
  }
  if (c.crash_restart_window_s < 1 || c.crash_restart_window_s > kMaxCrashWindowS) {
    return invalid_argument("crash-restart-window-s: must be 1 to " +
                            std::to_string(kMaxCrashWindowS));
  }
  if (c.crash_restart_backoff_ms > kMaxCrashBackoffMs) {
    return invalid_argument("crash-restart-backoff-ms: must be at most " +
                            std::to_string(kMaxCrashBackoffMs));
  }
  return ParseOutcome::kRun;
}

}  // namespace nm
