// network_bench: issue 4's network benchmark (docs/benchmarks.md).
//
//   network_bench [--levels 1,100,1000] [--samples 50] [--scenarios single,spread]
//                 [--per-network 100] [--runs 5] [--seconds 3] [--strict]
//
// 1. Port attach time: TenantNetworks over the real adapters (NetlinkLinks, NftFirewall,
//    DnsmasqDhcp) with host-local networks; the host is filled with N ports (a tap through
//    Links::ensure_tap plus TenantNetworks::add_port each), then one more port is attached
//    (ensure_tap + add_port, timed) and detached (remove_port + delete_link, not timed) `samples`
//    times. Reported per N as p50/p90/p99/max. Two scenarios, each run on an otherwise empty host
//    (the networks of the one before are removed first), in this order:
//    - single: all N ports on one network (one bridge, 10.60.0.0/16), the worst case: the kernel
//      walks every port of a bridge when one is added or brought up;
//    - spread: the N ports over networks of at most `per-network` ports each (as a real host's
//      ports spread over many tenants' /24s): network k is "spread<k>", VNI 100 + k, bridge
//      nmbr<100 + k>, subnet 10.64.k.0/24; the port is attached to network 0, which holds
//      min(N, per-network) ports.
// 2. Throughput: two veth "VMs" (namespaces nmb-tp1, nmb-tp2) on the bridge of another network,
//    iperf3 TCP between them for `seconds`, `runs` times with our table (both registered as ports,
//    next to the N ports left by the last attach scenario) and as many times with the table
//    deleted, alternating so both see the same machine noise. Reported as medians and their
//    ratio. Skipped without iperf3.
//
// Runs as root; before anything else it moves into private network and mount namespaces (with a
// private tmpfs on /run/netns), so it leaves nothing on the host. dnsmasq runs as user dnsmasq.
// tests/bench/run-network-bench.sh builds and runs it.
//
// Exit status: 0 when every measurement ran (targets are reported, not enforced), 1 when a step
// failed, 2 on bad usage, 3 with --strict when a target was missed.
#include <fcntl.h>
#include <sched.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "args.h"
#include "nm/network/dnsmasq_dhcp.h"
#include "nm/network/names.h"
#include "nm/network/netlink_links.h"
#include "nm/network/network_spec.h"
#include "nm/network/nft_firewall.h"
#include "nm/network/nft_ruleset.h"
#include "nm/network/tenant_networks.h"
#include "stats.h"

namespace nm::bench {
namespace {

using Clock = std::chrono::steady_clock;
using network::Ipv4Address;
using network::Ipv4Cidr;
using network::NetworkSpec;
using network::PortSpec;

constexpr double kAttachTargetMs = 10.0;
constexpr double kThroughputTargetRatio = 0.9;
constexpr uint32_t kAttachNetworkBase = 0x0a3c0000;      // 10.60.0.0/16
constexpr uint32_t kThroughputNetworkBase = 0x0a3d0000;  // 10.61.0.0/24
constexpr uint32_t kSpreadNetworkBase = 0x0a400000;      // 10.64.k.0/24 for network k
constexpr uint32_t kSpreadVniBase = 100;
constexpr int kMaxSpreadNetworks = 256;  // the /24s of 10.64.0.0/16
// Port numbers of the attached ("probe") port, above those of the ports filling its network;
// port_spec() gives it the address base + 10 + number, inside the network's subnet.
constexpr uint32_t kSingleProbe = 60000;
constexpr uint32_t kSpreadProbe = 240;
constexpr int kMaxPerNetwork = 230;  // port numbers 0..229 and the probe's 240 fit in a /24

enum class Scenario { kSingle, kSpread };

struct Options {
  std::vector<int> levels = {1, 100, 1000};
  int samples = 50;
  std::vector<Scenario> scenarios = {Scenario::kSingle, Scenario::kSpread};
  int per_network = 100;
  int runs = 5;
  int seconds = 3;
  bool strict = false;
};

bool fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "network_bench: %s: %s\n", what.c_str(), s.to_string().c_str());
  return false;
}

int sh(const std::string& command) {
  const int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string capture(const std::string& command) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return out;
  std::array<char, 4096> buf{};
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
  ::pclose(pipe);
  return out;
}

// Private network and mount namespaces with a private /run/netns, as the system tests' main.
bool enter_private_namespaces() {
  if (::unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) {
    std::fprintf(stderr, "network_bench: unshare: %s\n", std::strerror(errno));
    return false;
  }
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    std::fprintf(stderr, "network_bench: making / private: %s\n", std::strerror(errno));
    return false;
  }
  ::mkdir("/run/netns", 0755);
  if (::mount("tmpfs", "/run/netns", "tmpfs", 0, "mode=0755") != 0) {
    std::fprintf(stderr, "network_bench: tmpfs on /run/netns: %s\n", std::strerror(errno));
    return false;
  }
  return sh("ip link set lo up") == 0;
}

NetworkSpec network_spec(const std::string& name, uint32_t vni, uint32_t base, int prefix) {
  NetworkSpec n;
  n.name = NetworkName::trusted(name);
  n.tenant = TenantId::trusted("bench");
  n.vni = network::Vni::trusted(vni);
  n.subnet = Ipv4Cidr::trusted(Ipv4Address::from_uint(base), prefix);
  return n;
}

// Port number `i` of `network`: a VM id whose first 11 hex digits are the VNI and `i` (so taps
// differ across networks too), the MAC derived from it, the address base + 10 + i.
PortSpec port_spec(const NetworkSpec& network, uint32_t i) {
  std::array<char, 40> id{};
  std::snprintf(id.data(), id.size(), "%03x%05x-0000-4000-8000-000000000000", network.vni.value(),
                i);
  PortSpec p;
  p.vm = VmId::trusted(id.data());
  p.network = network.name;
  p.ifname = network::tap_name(p.vm, 0);
  p.mac = network::derive_vm_mac(p.vm, 0);
  p.ip = Ipv4Address::from_uint(network.subnet.network().to_uint() + 10 + i);
  p.hostname = "vm" + std::to_string(i);
  return p;
}

class Bench {
 public:
  Bench(std::unique_ptr<network::NetlinkLinks> links,
        std::unique_ptr<network::NftFirewall> firewall, std::unique_ptr<network::DnsmasqDhcp> dhcp)
      : links_(std::move(links)),
        firewall_(std::move(firewall)),
        dhcp_(std::move(dhcp)),
        networks_(*links_, *firewall_, *dhcp_, network::NetworkOptions{}) {}

  Status realize(const NetworkSpec& n) {
    specs_.push_back(n);
    return networks_.realize_network(n, {});
  }

  Status attach(const NetworkSpec& n, const PortSpec& p) {
    NM_RETURN_IF_ERROR(links_->ensure_tap(p.ifname, network::bridge_name(n.vni)));
    return networks_.add_port(n, p);
  }
  // attach(), timing its two steps.
  Status attach_timed(const NetworkSpec& n, const PortSpec& p, Clock::duration* tap,
                      Clock::duration* add_port) {
    const auto start = Clock::now();
    NM_RETURN_IF_ERROR(links_->ensure_tap(p.ifname, network::bridge_name(n.vni)));
    const auto tapped = Clock::now();
    NM_RETURN_IF_ERROR(networks_.add_port(n, p));
    *tap = tapped - start;
    *add_port = Clock::now() - tapped;
    return Status::ok();
  }
  // The nft transaction alone that add_port() makes for `p` (then undone, not timed).
  Status rules_only_timed(const PortSpec& p, Clock::duration* took) {
    const network::PortRule rule{p.ifname, p.mac, p.ip};
    const auto start = Clock::now();
    NM_RETURN_IF_ERROR(firewall_->apply(network::render_add_port(rule)));
    *took = Clock::now() - start;
    return firewall_->apply(network::render_remove_port(rule));
  }
  Status detach(const NetworkSpec& n, const PortSpec& p) {
    NM_RETURN_IF_ERROR(networks_.remove_port(n, p));
    return links_->delete_link(p.ifname);
  }
  // Registers a port whose interface the caller made (a veth "VM").
  Status add_port(const NetworkSpec& n, const PortSpec& p) {
    ports_.push_back(p);
    return networks_.add_port(n, p);
  }
  Status attach_and_keep(const NetworkSpec& n, const PortSpec& p) {
    ports_.push_back(p);
    return attach(n, p);
  }
  // Puts the table back (and everything else) the way the daemon's audit would.
  Status reconcile() { return networks_.reconcile(specs_, ports_).status(); }
  // Removes network `n` and the taps of its ports kept by attach_and_keep() (after the bridge is
  // gone, so that no tap deletion walks the bridge's other ports).
  Status remove_network(const NetworkSpec& n) {
    NM_RETURN_IF_ERROR(networks_.remove_network(n));
    std::erase(specs_, n);
    for (const PortSpec& p : ports_) {
      if (p.network == n.name) NM_RETURN_IF_ERROR(links_->delete_link(p.ifname));
    }
    std::erase_if(ports_, [&](const PortSpec& p) { return p.network == n.name; });
    return Status::ok();
  }

 private:
  std::unique_ptr<network::NetlinkLinks> links_;
  std::unique_ptr<network::NftFirewall> firewall_;
  std::unique_ptr<network::DnsmasqDhcp> dhcp_;
  network::TenantNetworks networks_;
  std::vector<NetworkSpec> specs_;
  std::vector<PortSpec> ports_;
};

struct AttachRow {
  int ports = 0;
  int networks = 1;                 // the ports are spread over this many networks
  std::vector<double> sorted_ms;    // the whole attach
  std::vector<double> tap_ms;       // of which ensure_tap
  std::vector<double> add_port_ms;  // of which add_port (nft elements + one DHCP host file)
  std::vector<double> rules_ms;     // the nft transaction alone, measured apart
};

struct AttachTable {
  Scenario scenario = Scenario::kSingle;
  std::vector<AttachRow> rows;
};

const char* scenario_name(Scenario s) {
  return s == Scenario::kSingle ? "single" : "spread";
}

// Network number `k` of an attach scenario (single has only number 0).
NetworkSpec attach_network(Scenario scenario, uint32_t k) {
  if (scenario == Scenario::kSingle) return network_spec("attach", 10, kAttachNetworkBase, 16);
  return network_spec("spread" + std::to_string(k), kSpreadVniBase + k,
                      kSpreadNetworkBase + (k << 8U), 24);
}

double ms(Clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

double p50(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return percentile(v, 0.5);
}

// One attach scenario, level after level. Port j of the host is port number j % per of network
// j / per (networks realized as they are needed). Unless `keep`, removes its networks and taps at
// the end, so the next scenario starts from an empty host.
bool measure_attach(Bench& bench, Scenario scenario, const Options& opts, bool keep,
                    AttachTable* table) {
  const bool spread = scenario == Scenario::kSpread;
  const uint32_t per = spread ? static_cast<uint32_t>(opts.per_network) : UINT32_MAX;
  table->scenario = scenario;
  std::vector<NetworkSpec> networks;
  uint32_t next = 0;
  for (const int level : opts.levels) {
    const auto ports = static_cast<uint32_t>(level);
    const uint32_t needed = ports == 0 ? 1 : (ports - 1) / per + 1;
    while (networks.size() < needed) {
      networks.push_back(attach_network(scenario, static_cast<uint32_t>(networks.size())));
      if (Status s = bench.realize(networks.back()); !s.is_ok()) {
        return fail("realizing network '" + networks.back().name.str() + "'", s);
      }
    }
    for (; next < ports; ++next) {
      const PortSpec p = port_spec(networks[next / per], next % per);
      if (Status s = bench.attach_and_keep(networks[next / per], p); !s.is_ok()) {
        return fail("attaching port '" + p.ifname + "'", s);
      }
    }
    const NetworkSpec& net = networks.front();
    const PortSpec probe = port_spec(net, spread ? kSpreadProbe : kSingleProbe);
    AttachRow row;
    row.ports = level;
    row.networks = static_cast<int>(needed);
    for (int i = 0; i < opts.samples; ++i) {
      Clock::duration tap{};
      Clock::duration add_port{};
      if (Status s = bench.attach_timed(net, probe, &tap, &add_port); !s.is_ok()) {
        return fail("attaching the probe port", s);
      }
      row.sorted_ms.push_back(ms(tap + add_port));
      row.tap_ms.push_back(ms(tap));
      row.add_port_ms.push_back(ms(add_port));
      if (Status d = bench.detach(net, probe); !d.is_ok()) {
        return fail("detaching the probe port", d);
      }
      Clock::duration rules{};
      if (Status r = bench.rules_only_timed(probe, &rules); !r.is_ok()) {
        return fail("the probe port's nft elements", r);
      }
      row.rules_ms.push_back(ms(rules));
    }
    std::sort(row.sorted_ms.begin(), row.sorted_ms.end());
    std::fprintf(stderr, "network_bench: %s, %d ports on %u network(s): attach p50 %.3f ms\n",
                 scenario_name(scenario), level, needed, percentile(row.sorted_ms, 0.5));
    table->rows.push_back(std::move(row));
  }
  if (keep) return true;
  for (const NetworkSpec& n : networks) {
    if (Status s = bench.remove_network(n); !s.is_ok()) {
      return fail("removing network '" + n.name.str() + "'", s);
    }
  }
  return true;
}

// A process started with posix_spawnp (output to /dev/null), killed and reaped (by pid) when this
// goes away.
class Child {
 public:
  explicit Child(pid_t pid) : pid_(pid) {}
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGTERM);
    ::waitpid(pid_, nullptr, 0);
  }

 private:
  pid_t pid_;
};

std::optional<pid_t> spawn(std::vector<std::string> argv) {
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  ::posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, "/dev/null", O_WRONLY, 0);
  ::posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  pid_t pid = 0;
  const int err = ::posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  if (err != 0) return std::nullopt;
  return pid;
}

// Received throughput of one iperf3 run in Gbit/s; nullopt when the client failed.
std::optional<double> iperf_run(const std::string& server_ip, int seconds) {
  for (int attempt = 0; attempt < 20; ++attempt) {
    const std::string out = capture("ip netns exec nmb-tp2 iperf3 -J -c " + server_ip + " -t " +
                                    std::to_string(seconds) + " 2>/dev/null");
    try {
      const auto j = nlohmann::json::parse(out);
      if (!j.contains("error")) {
        return j.at("end").at("sum_received").at("bits_per_second").get<double>() / 1e9;
      }
    } catch (const nlohmann::json::exception&) {
      // Not JSON: iperf3 did not run; retried like a refused connection.
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the server is starting
  }
  return std::nullopt;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

struct Throughput {
  std::vector<double> with_gbps;
  std::vector<double> without_gbps;
};

bool measure_throughput(Bench& bench, const Options& opts, Throughput* result) {
  const NetworkSpec net = network_spec("tput", 20, kThroughputNetworkBase, 24);
  if (Status s = bench.realize(net); !s.is_ok()) return fail("realizing network 'tput'", s);
  const std::string bridge = network::bridge_name(net.vni);
  std::string server_ip;
  for (const uint32_t i : {1U, 2U}) {
    const PortSpec p = port_spec(net, i);
    if (Status s = bench.add_port(net, p); !s.is_ok()) return fail("adding a VM port", s);
    const std::string ns = "nmb-tp" + std::to_string(i);
    const std::string in_ns = "ip -n " + ns + " ";
    bool ok = sh("ip netns add " + ns) == 0;
    for (const std::string& step :
         {"ip link add " + p.ifname + " type veth peer name eth0 netns " + ns,
          "ip link set " + p.ifname + " master " + bridge + " up",
          in_ns + "link set eth0 address " + p.mac.str(),
          in_ns + "addr add " + p.ip.str() + "/24 dev eth0", in_ns + "link set eth0 up",
          in_ns + "link set lo up"}) {
      ok = ok && sh(step) == 0;
    }
    if (!ok) return fail("setting up VM namespace '" + ns + "'", Status(Code::kInternal, ""));
    if (i == 1) server_ip = p.ip.str();
  }
  auto server = spawn({"ip", "netns", "exec", "nmb-tp1", "iperf3", "-s", "-B", server_ip});
  if (!server) return fail("starting iperf3 -s", Status(Code::kInternal, std::strerror(errno)));
  const Child server_guard(*server);
  if (!iperf_run(server_ip, 1)) {  // warm-up; also waits for the server
    return fail("iperf3 warm-up run", Status(Code::kUnavailable, "no result"));
  }
  for (int r = 0; r < opts.runs; ++r) {
    if (Status s = bench.reconcile(); !s.is_ok()) return fail("restoring the table", s);
    if (sh("nft list table bridge nodemanager >/dev/null") != 0) {
      return fail("checking the table", Status(Code::kInternal, "table missing"));
    }
    const auto with = iperf_run(server_ip, opts.seconds);
    if (sh("nft delete table bridge nodemanager") != 0) {
      return fail("deleting the table", Status(Code::kInternal, "nft failed"));
    }
    const auto without = iperf_run(server_ip, opts.seconds);
    if (!with || !without) return fail("iperf3 run", Status(Code::kUnavailable, "no result"));
    std::fprintf(stderr, "network_bench: run %d: with %.2f Gbit/s, without %.2f Gbit/s\n", r + 1,
                 *with, *without);
    result->with_gbps.push_back(*with);
    result->without_gbps.push_back(*without);
  }
  if (Status s = bench.reconcile(); !s.is_ok()) return fail("restoring the table", s);
  sh("ip netns del nmb-tp1; ip netns del nmb-tp2");
  return true;
}

std::string join(const std::vector<double>& v) {
  std::string out;
  for (const double x : v) {
    std::array<char, 32> buf{};
    std::snprintf(buf.data(), buf.size(), "%s%.2f", out.empty() ? "" : " ", x);
    out += buf.data();
  }
  return out;
}

// One scenario's table and its target line; false when the target was missed.
bool report_attach(const Options& opts, const AttachTable& table) {
  if (table.scenario == Scenario::kSingle) {
    std::printf("single: all ports on one network (one bridge, 10.60.0.0/16), the worst case\n\n");
  } else {
    std::printf(
        "spread: ports over networks of at most %d ports (a bridge and a /24 each), the port\n"
        "attached to one holding min(N, %d)\n\n",
        opts.per_network, opts.per_network);
  }
  std::printf("%-22s %5s %8s %8s %8s %8s | p50: %8s %9s %8s\n", "ports already on host", "n",
              "p50 ms", "p90 ms", "p99 ms", "max ms", "tap", "add_port", "nft");
  for (const auto& row : table.rows) {
    std::string label = std::to_string(row.ports);
    if (table.scenario == Scenario::kSpread) {
      label += " on " + std::to_string(row.networks) + (row.networks == 1 ? " net" : " nets");
    }
    std::printf("%-22s %5zu %8.3f %8.3f %8.3f %8.3f |      %8.3f %9.3f %8.3f\n", label.c_str(),
                row.sorted_ms.size(), percentile(row.sorted_ms, 0.5),
                percentile(row.sorted_ms, 0.9), percentile(row.sorted_ms, 0.99),
                row.sorted_ms.back(), p50(row.tap_ms), p50(row.add_port_ms), p50(row.rules_ms));
  }
  if (table.rows.empty()) return true;
  const double last = percentile(table.rows.back().sorted_ms, 0.5);
  const double first = percentile(table.rows.front().sorted_ms, 0.5);
  const bool ok = last < kAttachTargetMs;
  std::printf("%s: %s: attach p50 < %.0f ms with %d ports: %.3f ms (%.2fx the p50 with %d)\n\n",
              ok ? "PASS" : "FAIL", scenario_name(table.scenario), kAttachTargetMs,
              table.rows.back().ports, last, last / first, table.rows.front().ports);
  return ok;
}

bool report(const Options& opts, const std::vector<AttachTable>& tables,
            const std::optional<Throughput>& tput) {
  bool met = true;
  std::printf(
      "network_bench: port attach (Links::ensure_tap + TenantNetworks::add_port), "
      "%d samples per level\n\n",
      opts.samples);
  for (const AttachTable& table : tables) met = report_attach(opts, table) && met;
  std::printf(
      "(tap: Links::ensure_tap; add_port: TenantNetworks::add_port, i.e. the nft elements\n"
      " and one DHCP host file read by dnsmasq; nft: the same nft transaction alone)\n");
  if (tables.size() == 2 && tables[0].scenario == Scenario::kSingle && !tables[0].rows.empty() &&
      !tables[1].rows.empty()) {
    const AttachRow& single = tables[0].rows.back();
    const AttachRow& spread = tables[1].rows.back();
    std::printf(
        "with %d ports, spread / single: attach p50 %.3f / %.3f ms, tap p50 %.3f / %.3f ms\n",
        single.ports, percentile(spread.sorted_ms, 0.5), percentile(single.sorted_ms, 0.5),
        p50(spread.tap_ms), p50(single.tap_ms));
  }
  if (!tput) {
    std::printf("throughput: skipped (iperf3 not installed)\n");
    return met;
  }
  const double with = median(tput->with_gbps);
  const double without = median(tput->without_gbps);
  const double ratio = with / without;
  std::printf("\nthroughput: iperf3 TCP, one stream, %d s per run, %d runs each, alternating\n",
              opts.seconds, opts.runs);
  std::printf("%-32s %12s   %s\n", "", "median Gb/s", "runs");
  std::printf("%-32s %12.2f   %s\n", "with our table (ports registered)", with,
              join(tput->with_gbps).c_str());
  std::printf("%-32s %12.2f   %s\n", "without the table", without,
              join(tput->without_gbps).c_str());
  const bool ok = ratio >= kThroughputTargetRatio;
  met = met && ok;
  std::printf("%s: throughput with / without >= %.1f: %.3f\n", ok ? "PASS" : "FAIL",
              kThroughputTargetRatio, ratio);
  return met;
}

constexpr const char* kUsage =
    "usage: network_bench [--levels 1,100,1000] [--samples N] [--scenarios single,spread]\n"
    "                     [--per-network N] [--runs N] [--seconds N] [--strict]\n";

bool parse_args(int argc, char** argv, Options* opts) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    bool ok = true;
    if (arg == "--strict") {
      opts->strict = true;
    } else if (arg == "--samples" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->samples);
    } else if (arg == "--per-network" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->per_network) &&
           opts->per_network <= kMaxPerNetwork;
    } else if (arg == "--scenarios" && has_value) {
      const std::string_view list = argv[++i];
      const bool single = list == "single" || list == "single,spread";
      const bool spread = list == "spread" || list == "single,spread";
      ok = single || spread;
      opts->scenarios.clear();
      if (single) opts->scenarios.push_back(Scenario::kSingle);
      if (spread) opts->scenarios.push_back(Scenario::kSpread);
    } else if (arg == "--runs" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->runs);
    } else if (arg == "--seconds" && has_value) {
      ok = bench::parse_number(argv[++i], 1, &opts->seconds);
    } else if (arg == "--levels" && has_value) {
      opts->levels.clear();
      std::string_view list = argv[++i];
      while (ok && !list.empty()) {
        const size_t comma = list.find(',');
        int level = 0;
        ok = bench::parse_number(list.substr(0, comma), 0, &level) &&
             (opts->levels.empty() || level > opts->levels.back()) && level < 60000;
        opts->levels.push_back(level);
        list = comma == std::string_view::npos ? "" : list.substr(comma + 1);
      }
      ok = ok && !opts->levels.empty();
    } else {
      ok = false;
    }
    if (!ok) {
      std::fprintf(stderr, "network_bench: bad or incomplete argument '%s'\n%s", argv[i], kUsage);
      return false;
    }
  }
  const bool spread = std::find(opts->scenarios.begin(), opts->scenarios.end(),
                                Scenario::kSpread) != opts->scenarios.end();
  if (spread &&
      (opts->levels.back() + opts->per_network - 1) / opts->per_network > kMaxSpreadNetworks) {
    std::fprintf(stderr, "network_bench: spread: %d ports need more than %d networks of %d\n",
                 opts->levels.back(), kMaxSpreadNetworks, opts->per_network);
    return false;
  }
  return true;
}

int run(const Options& opts) {
  if (::geteuid() != 0) {
    std::fprintf(stderr, "network_bench: needs root (network namespaces, nftables)\n");
    return 1;
  }
  if (!enter_private_namespaces()) return 1;
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("nm-network-bench." + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  // dnsmasq's files on tmpfs, like the daemon's /run/nodemanager/dhcp (private to our mount
  // namespace): a disk's fsync latency is not part of attaching a port in production.
  if (::mount("tmpfs", dir.c_str(), "tmpfs", 0, "mode=0711") != 0) {
    std::fprintf(stderr, "network_bench: tmpfs on '%s': %s\n", dir.c_str(), std::strerror(errno));
    return 1;
  }

  int rc = 0;
  {
    auto links = network::NetlinkLinks::create({});
    if (!links.is_ok()) {
      fail("creating NetlinkLinks", links.status());
      return 1;
    }
    auto firewall = network::NftFirewall::create();
    if (!firewall.is_ok()) {
      fail("creating NftFirewall", firewall.status());
      return 1;
    }
    network::DnsmasqDhcp::Options dhcp_options;
    dhcp_options.run_dir = (dir / "dhcp").string();
    dhcp_options.log_to_stderr = false;
    auto dhcp = network::DnsmasqDhcp::create(dhcp_options);
    if (!dhcp.is_ok()) {
      fail("creating DnsmasqDhcp", dhcp.status());
      return 1;
    }
    Bench bench(std::move(links).value(), std::move(firewall).value(), std::move(dhcp).value());

    std::vector<AttachTable> tables;
    std::optional<Throughput> tput;
    for (const Scenario scenario : opts.scenarios) {
      const bool last = scenario == opts.scenarios.back();
      if (!measure_attach(bench, scenario, opts, last, &tables.emplace_back())) {
        rc = 1;
        break;
      }
    }
    if (rc == 0 && sh("command -v iperf3 >/dev/null") == 0) {
      tput.emplace();
      if (!measure_throughput(bench, opts, &*tput)) rc = 1;
    }
    if (rc == 0 && !report(opts, tables, tput) && opts.strict) rc = 3;
  }
  ::umount2(dir.c_str(), MNT_DETACH);
  std::filesystem::remove_all(dir);
  return rc;
}

}  // namespace
}  // namespace nm::bench

int main(int argc, char** argv) {
  nm::bench::Options opts;
  if (!nm::bench::parse_args(argc, argv, &opts)) return 2;
  return nm::bench::run(opts);
}
