// nodemanagerd: the composition root. The only place that wires adapters together.
#include <systemd/sd-daemon.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include "config.h"
#include "dbus/dbus_server.h"
#include "dbus/event_loop.h"
#include "libvirt/libvirt_hypervisor.h"
#include "nm/core/clock.h"
#include "nm/core/fs.h"
#include "nm/core/log.h"
#include "nm/executor.h"
#include "nm/imagestore/image_source.h"
#include "nm/imagestore/image_store.h"
#include "nm/network/dnsmasq_dhcp.h"
#include "nm/network/link_monitor.h"
#include "nm/network/netlink_links.h"
#include "nm/network/nft_firewall.h"
#include "nm/network/tenant_networks.h"
#include "nm/node_service.h"
#include "nm/state_store.h"

namespace {

constexpr int kExitConfig = 2;
constexpr int kExitStartup = 1;

void notify_status(const std::string& status) {
  sd_notifyf(0, "STATUS=%s", status.c_str());
}

int fail(const std::shared_ptr<spdlog::logger>& log, const std::string& what, const nm::Status& s) {
  log->critical("{}: {}", what, s.to_string());
  notify_status(what + ": " + s.message());
  return kExitStartup;
}

// Who may call: root and this process's user, the fabric identity, the operators group.
nm::Result<nm::AuthzPolicy> authz_policy(const nm::DaemonConfig& cfg,
                                         const std::shared_ptr<spdlog::logger>& log) {
  nm::AuthzPolicy p = nm::DbusServer::default_policy();
  NM_ASSIGN_OR_RETURN(p.fabric_uid, nm::resolve_user(cfg.fabric_user, "fabric-user"));
  const nm::DaemonConfig defaults;
  auto group = [&](const std::string& value, const std::string& fallback,
                   const char* field) -> nm::Result<std::optional<uint32_t>> {
    auto gid = nm::resolve_group(value, field);
    if (!gid.is_ok() && gid.status().code() == nm::Code::kNotFound && value == fallback) {
      log->warn("{}; nobody gets that role", gid.status().message());
      return std::optional<uint32_t>();
    }
    return gid;
  };
  NM_ASSIGN_OR_RETURN(p.fabric_gid, group(cfg.fabric_group, defaults.fabric_group, "fabric-group"));
  NM_ASSIGN_OR_RETURN(p.operators_gid,
                      group(cfg.operators_group, defaults.operators_group, "operators-group"));
  return p;
}

int run(const nm::DaemonConfig& cfg) {
  auto log = nm::logger("daemon");
  log->info("nodemanagerd {} starting: bus '{}', libvirt '{}', state '{}'", NM_VERSION, cfg.bus,
            cfg.libvirt_uri, cfg.state_dir);
  notify_status("starting");

  const std::string images_dir = cfg.state_dir + "/images";
  const std::string instances_dir = cfg.state_dir + "/instances";
  for (const auto& dir : {cfg.state_dir, images_dir, instances_dir}) {
    if (auto s = nm::make_dirs(dir); !s.is_ok())
      return fail(log, "creating the state directory", s);
  }

  nm::SystemClock clock;
  nm::SqliteOptions db_opts;
  // Group commit: the service holds replies, signals and jobs until a sync covers what they
  // report, so one fsync serves every request that arrived meanwhile.
  db_opts.deferred_sync = true;
  db_opts.event_capacity = cfg.event_capacity;
  auto store =
      nm::open_sqlite_state_store(cfg.state_dir + "/state.db", db_opts, clock.now_realtime_us());
  if (!store.is_ok()) return fail(log, "opening the state database", store.status());
  nm::ImageStoreOptions image_opts;
  image_opts.reserve_bytes = cfg.image_reserve_mib << 20;
  auto images = nm::open_dir_image_store(images_dir, image_opts);
  if (!images.is_ok()) return fail(log, "opening the image store", images.status());
  std::vector<std::unique_ptr<nm::ImageSource>> sources;
  for (const auto& spec : cfg.image_sources) {
    auto src = nm::open_image_source(spec, "image-source");
    if (!src.is_ok()) return fail(log, "opening the image sources", src.status());
    log->info("image source: {}", (*src)->describe());
    sources.push_back(std::move(src).value());
  }

  // Declared before the loop, which watches its fd: it must outlive the loop's sources.
  std::unique_ptr<nm::network::NetlinkLinkMonitor> uplink;
  // Signals must be blocked before any other thread starts (threads inherit the mask).
  auto loop = nm::SdEventLoop::create();
  if (!loop.is_ok()) return fail(log, "creating the event loop", loop.status());
  nm::SdEventLoop& ev = **loop;
  if (auto s = ev.on_signals({SIGTERM, SIGINT},
                             [&](int sig) {
                               log->info("received {}, exiting; guests keep running",
                                         sig == SIGTERM ? "SIGTERM" : "SIGINT");
                               sd_notify(0, "STOPPING=1");
                               ev.exit(0);
                             });
      !s.is_ok()) {
    return fail(log, "installing signal handlers", s);
  }
  ::signal(SIGPIPE, SIG_IGN);

  nm::LibvirtOptions lv;
  lv.uri = cfg.libvirt_uri;
  lv.pool_name = cfg.storage_pool;
  lv.pool_dir = instances_dir;
  notify_status("connecting to libvirt");
  auto hypervisor = nm::LibvirtHypervisor::create(lv);
  if (!hypervisor.is_ok()) return fail(log, "connecting to libvirt", hypervisor.status());

  // Tenant networks: rtnetlink, nftables and dnsmasq adapters behind TenantNetworks.
  auto links = nm::network::NetlinkLinks::create({});
  if (!links.is_ok()) return fail(log, "opening rtnetlink", links.status());
  auto firewall = nm::network::NftFirewall::create();
  if (!firewall.is_ok()) return fail(log, "opening nftables", firewall.status());
  nm::network::DnsmasqDhcp::Options dhcp_opts;
  if (auto s = nm::make_dirs(cfg.runtime_dir); !s.is_ok()) {
    return fail(log, "creating the runtime directory", s);
  }
  // dnsmasq runs as its own user and must reach its files below the runtime directory.
  std::error_code perm_error;
  std::filesystem::permissions(cfg.runtime_dir,
                               std::filesystem::perms::owner_all |
                                   std::filesystem::perms::group_exec |
                                   std::filesystem::perms::others_exec,
                               perm_error);
  if (perm_error) {
    return fail(
        log, "setting the mode of the runtime directory",
        nm::Status(nm::Code::kUnavailable, "'" + cfg.runtime_dir + "': " + perm_error.message()));
  }
  dhcp_opts.run_dir = cfg.runtime_dir + "/dhcp";
  dhcp_opts.dnsmasq = cfg.dnsmasq;
  auto dhcp = nm::network::DnsmasqDhcp::create(dhcp_opts);
  if (!dhcp.is_ok()) return fail(log, "preparing DHCP", dhcp.status());
  nm::network::TenantNetworks networks(
      **links, **firewall, **dhcp,
      nm::network::NetworkOptions{.underlay = cfg.underlay_interface,
                                  .vxlan_port = static_cast<uint16_t>(cfg.vxlan_port),
                                  .mtu = cfg.network_mtu});

  auto workers = std::make_unique<nm::WorkerPool>(cfg.workers);
  nm::ServiceOptions so;
  so.instances_dir = instances_dir;
  so.domain_type = cfg.domain_type;
  so.stop_timeout = std::chrono::milliseconds(cfg.stop_timeout_ms);
  so.orphan_policy = cfg.orphan_policy;
  so.debug_job_delay = std::chrono::milliseconds(cfg.debug_job_delay_ms);
  so.underlay_interface = cfg.underlay_interface;
  for (const auto& src : sources) so.image_sources.push_back(src.get());
  so.image_gc_min_age = std::chrono::seconds(cfg.image_gc_min_age_s);
  so.disk_reserve_bytes = cfg.disk_reserve_mib << 20;
  so.images_dir = images_dir;
  so.disk_thresholds = {.degraded_below_bytes = cfg.health_disk_degraded_mib << 20,
                        .failed_below_bytes = cfg.health_disk_failed_mib << 20};
  so.psi_thresholds = {.degraded_some_avg10 = cfg.health_psi_degraded,
                       .failed_full_avg10 = cfg.health_psi_failed};
  so.host_vcpus = cfg.host_vcpus;
  so.host_memory_mib = cfg.host_memory_mib;
  so.capacity = {.reserved_vcpus = cfg.reserved_vcpus,
                 .reserved_memory_mib = cfg.reserved_memory_mib,
                 .cpu_ratio = cfg.cpu_allocation_ratio,
                 .memory_ratio = cfg.memory_allocation_ratio,
                 .disk_ratio = cfg.disk_allocation_ratio};
  so.tenant_quotas = cfg.tenant_quotas;
  // What was written may not be on disk and nothing of it may be reported done: start over from
  // the database (systemd restarts the daemon).
  const auto sync_failed = [log](const nm::Status& s) {
    log->critical("the state database cannot be made durable ({}); exiting", s.message());
  };
  so.on_sync_failure = [&ev, sync_failed](const nm::Status& s) {
    sync_failed(s);
    ev.exit(EXIT_FAILURE);
  };
  // STATUS once ready; READY's said when the reconcile waits for libvirt: say when it has run.
  nm::NodeService* status_service = nullptr;
  const auto serving = [&status_service] {
    const size_t n = status_service != nullptr ? status_service->list_vms("").size() : 0;
    return "serving " + std::to_string(n) + " VMs";
  };
  so.on_startup_reconciled = [serving, log] {
    const std::string status = serving();
    notify_status(status);
    log->info("start-up reconcile done after libvirt answered: {}", status);
  };
  so.crash_policy = {.max_restarts = cfg.crash_restart_max,
                     .window = std::chrono::seconds(cfg.crash_restart_window_s),
                     .backoff = std::chrono::milliseconds(cfg.crash_restart_backoff_ms)};
  auto service = nm::make_node_service(
      nm::ServiceDeps{**store, **hypervisor, **images, networks, ev, *workers, clock}, so);
  status_service = service.get();

  // The DHCP supervisor's thread reports restarts; the service records them on the loop.
  (*dhcp)->set_observer([&ev, svc = service.get()](const std::string& key, const nm::Status& what) {
    ev.post([svc, key, what] {
      svc->record_network_repair("DHCP server of network '" + key + "'", what.message());
    });
  });

  // The libvirt connection's health: lost and restored on the adapter's event thread, which
  // reconnects by itself; after a reconnect the audit catches up on what the events missed.
  const std::string uri = cfg.libvirt_uri;
  (*hypervisor)
      ->set_connection_handler(
          [&ev, svc = service.get(), uri](bool connected, const std::string& reason) {
            ev.post([svc, connected, reason, uri] {
              svc->libvirt_connection_changed(
                  connected, connected ? "connected to '" + uri + "'"
                                       : "connection to '" + uri + "' lost: " + reason);
            });
          });
  // After the handler is in place, so that a loss in between is not missed either way.
  if ((*hypervisor)->connected()) {
    service->set_host_check("libvirt", nm::HealthState::kOk, "connected to '" + uri + "'");
  } else if (!(*hypervisor)->start_error().empty()) {
    // libvirtd is not there (yet): serve, report it, reconcile once it answers.
    service->set_host_check("libvirt", nm::HealthState::kFailed,
                            (*hypervisor)->start_error() + "; reconnecting");
  } else {
    service->set_host_check("libvirt", nm::HealthState::kFailed,
                            "connection to '" + uri + "' lost during start-up; reconnecting");
  }

  // The uplink's health from netlink link events (no polling): the underlay interface.
  if (!cfg.underlay_interface.empty()) {
    auto monitor = nm::network::NetlinkLinkMonitor::create({cfg.underlay_interface});
    if (!monitor.is_ok()) return fail(log, "watching the underlay interface", monitor.status());
    uplink = std::move(monitor).value();
    auto report = [svc = service.get()](const nm::network::LinkStatus& l) {
      const nm::Verdict v = nm::judge_link(l.name, l.exists, l.admin_up, l.carrier, l.oper_state);
      svc->set_host_check("uplink", v.state, v.reason);
    };
    auto first = uplink->query(cfg.underlay_interface);
    if (!first.is_ok()) return fail(log, "reading the underlay interface", first.status());
    report(*first);
    if (auto s = ev.watch_readable(uplink->fd(),
                                   [&uplink, report, log] {
                                     auto changes = uplink->read_changes();
                                     if (!changes.is_ok()) {
                                       log->warn("uplink monitor: {}",
                                                 changes.status().to_string());
                                       return;
                                     }
                                     for (const auto& l : *changes) report(l);
                                   });
        !s.is_ok()) {
      return fail(log, "watching the underlay interface", s);
    }
  }

  // On every way out of this function: running jobs are asked to stop and the workers joined
  // before the service they use is destroyed.
  struct StopJobs {
    nm::NodeService& service;
    std::unique_ptr<nm::WorkerPool>& workers;
    nm::network::Dhcp& dhcp;
    nm::Hypervisor& hypervisor;
    ~StopJobs() {
      hypervisor.set_connection_handler(nullptr);
      dhcp.set_observer(nullptr);
      service.shutdown();
      workers.reset();
    }
  } stop_jobs{*service, workers, **dhcp, **hypervisor};

  auto policy = authz_policy(cfg, log);
  if (!policy.is_ok()) return fail(log, "resolving the callers' identities", policy.status());
  auto server = nm::DbusServer::create(ev, cfg.bus, *service, *policy);
  if (!server.is_ok()) return fail(log, "connecting to the bus", server.status());

  notify_status("reconciling");
  if (auto s = service->start(); !s.is_ok()) return fail(log, "start-up reconcile", s);
  if (auto s = (*server)->request_name(); !s.is_ok()) {
    return fail(log, "owning org.nodemanager.NodeManager1", s);
  }
  if (auto s = ev.add_periodic(std::chrono::milliseconds(cfg.audit_interval_ms),
                               [&] { service->audit(); });
      !s.is_ok()) {
    return fail(log, "arming the audit timer", s);
  }
  if (cfg.image_gc_interval_s > 0) {
    if (auto s = ev.add_periodic(std::chrono::seconds(cfg.image_gc_interval_s),
                                 [&] {
                                   auto gc = service->collect_images(std::nullopt, false);
                                   if (!gc.is_ok()) {
                                     log->warn("image gc: {}", gc.status().to_string());
                                   }
                                 });
        !s.is_ok()) {
      return fail(log, "arming the image gc timer", s);
    }
  }
  service->probe_health();
  if (auto s = ev.add_periodic(std::chrono::milliseconds(cfg.health_interval_ms),
                               [&] { service->probe_health(); });
      !s.is_ok()) {
    return fail(log, "arming the health probe timer", s);
  }
  if (auto s = ev.add_periodic(std::chrono::milliseconds(cfg.heartbeat_interval_ms),
                               [&] { service->heartbeat(); });
      !s.is_ok()) {
    return fail(log, "arming the heartbeat timer", s);
  }
  // WATCHDOG=1 only while the loop turns and the libvirt connection is up.
  if (auto s = ev.enable_watchdog([&] { return service->watchdog_healthy(); }); !s.is_ok()) {
    return fail(log, "enabling the watchdog", s);
  }

  std::string ready = serving();
  if (service->startup_reconcile_pending()) {
    ready += "; start-up reconcile waits for libvirt (see nodectl node health)";
  }
  sd_notifyf(0, "READY=1\nSTATUS=%s", ready.c_str());
  log->info("ready: {}", ready);

  const nm::Status ran = ev.run();
  notify_status("stopping");
  int exit_code = ev.exit_code();
  // Replies and signals still waiting for a sync go out while the bus is still there.
  if (ran.is_ok() && exit_code == 0) {
    if (const nm::Status s = service->release_held(); !s.is_ok()) {
      sync_failed(s);
      exit_code = EXIT_FAILURE;
    }
  }
  // Order: the bus goes first (no new calls), then stop_jobs lets the workers finish their
  // current step (they use the service), then the service, the hypervisor connection, the loop.
  server->reset();
  if (!ran.is_ok()) {
    log->error("event loop failed: {}", ran.to_string());
    return kExitStartup;
  }
  log->info("stopped");
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  nm::DaemonConfig cfg;
  std::string out;
  auto parsed = nm::parse_daemon_config(argc, argv, cfg, out);
  if (!parsed.is_ok()) {
    std::fprintf(stderr, "nodemanagerd: %s\n", parsed.status().message().c_str());
    return kExitConfig;
  }
  if (*parsed == nm::ParseOutcome::kExitOk) {
    std::cout << out;
    return 0;
  }
  // Under systemd, stderr is connected to the journal (JOURNAL_STREAM): log there natively.
  const bool journal = std::getenv("JOURNAL_STREAM") != nullptr;
  if (auto s = nm::setup_logging(cfg.log_level, journal); !s.is_ok()) {
    std::fprintf(stderr, "nodemanagerd: %s\n", s.message().c_str());
    return kExitConfig;
  }
  return run(cfg);
}
