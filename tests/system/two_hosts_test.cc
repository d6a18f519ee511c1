// Issue 4's system-tier proof: two simulated hosts, each a network namespace running the network
// library (TenantNetworks over NetlinkLinks, NftFirewall and DnsmasqDhcp), joined by a veth
// underlay "ul0" (192.0.2.1/24 <-> 192.0.2.2/24) that carries VXLAN between them.
//
// Networks: A (tenant a, VNI 100) and B (tenant b, VNI 200) share the subnet 10.50.0.0/24, so
// isolation cannot come from addressing. "VMs" are namespaces whose eth0 is a veth; its host end,
// named like the VM's tap, is enslaved to the network's bridge after add_port():
//
//   host h1: A1 10.50.0.11   B1 10.50.0.12 (= A2's address)
//   host h2: A2 10.50.0.12   A3 10.50.0.13   B2 10.50.0.11 (= A1's address)
//
// Each host's adapters are created, and every call for that host is made, on a thread that joined
// the host's namespace (setns): the adapters bind to the namespace of the thread that creates them,
// and NetlinkLinks must be called from a thread of that namespace. Each host has its own netns_dir
// and run_dir (both hosts name their DHCP namespace of A "nm-dhcp-100").
//
// Delivery is observed with named nft counters on the VMs' eth0 ingress (netdev family), ping and
// arping exit codes, neighbour caches and udhcpc's leases. Every "dropped" case also shows the
// same traffic passing once host h1's table is gone, so a broken setup cannot pass as isolation.
// The whole binary runs in the private network and mount namespaces of netns_main.cc.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "nm/core/fs.h"
#include "nm/network/addr.h"
#include "nm/network/dnsmasq_dhcp.h"
#include "nm/network/names.h"
#include "nm/network/netlink_links.h"
#include "nm/network/network_spec.h"
#include "nm/network/nft_firewall.h"
#include "nm/network/tenant_networks.h"
#include "shell.h"

namespace nm::network {
namespace {

using std::chrono::seconds;

using system_test::CommandResult;
using system_test::sh;

void run_ok(const std::string& command) {
  const CommandResult r = sh(command);
  ASSERT_EQ(r.exit_code, 0) << command << ": " << r.output;
}

// A simulated host: its namespace and the network library running inside it.
class Host {
 public:
  Host(std::string ns, std::string underlay_ip, std::filesystem::path dir)
      : ns_(std::move(ns)), underlay_ip_(std::move(underlay_ip)), dir_(std::move(dir)) {}

  const std::string& ns() const { return ns_; }
  const std::string& underlay_ip() const { return underlay_ip_; }
  std::string netns_dir() const { return (dir_ / "netns").string(); }
  std::string run_dir() const { return (dir_ / "run").string(); }
  bool started() const { return networks_ != nullptr; }
  DnsmasqDhcp& dhcp() { return *dhcp_; }
  TenantNetworks& networks() { return *networks_; }

  // Runs `fn` on a thread that joined the host's namespace and returns its result.
  template <typename Fn>
  auto run(Fn&& fn) -> decltype(fn()) {
    std::optional<decltype(fn())> result;
    std::thread t([&] {
      const UniqueFd ns_fd(open(("/run/netns/" + ns_).c_str(), O_RDONLY | O_CLOEXEC));
      if (!ns_fd.valid() || setns(ns_fd.get(), CLONE_NEWNET) != 0) {
        ADD_FAILURE() << "joining netns '" << ns_ << "': " << std::strerror(errno);
        std::abort();  // every later step would silently act on the wrong namespace
      }
      result.emplace(fn());
    });
    t.join();
    return std::move(*result);
  }

  // The adapters and TenantNetworks, created inside the host's namespace.
  Status start() {
    std::filesystem::create_directories(dir_);
    chmod(dir_.c_str(), 0711);
    return run([this]() -> Status {
      NM_ASSIGN_OR_RETURN(links_, NetlinkLinks::create({.netns_dir = netns_dir()}));
      NM_ASSIGN_OR_RETURN(firewall_, NftFirewall::create());
      DnsmasqDhcp::Options options;
      options.run_dir = run_dir();
      options.netns_dir = netns_dir();
      options.log_to_stderr = false;
      NM_ASSIGN_OR_RETURN(dhcp_, DnsmasqDhcp::create(options));
      networks_ = std::make_unique<TenantNetworks>(*links_, *firewall_, *dhcp_,
                                                   NetworkOptions{.underlay = "ul0"});
      return Status::ok();
    });
  }

  // Stops dnsmasq and drops the library; the namespaces go with the test's teardown.
  void stop() {
    run([this] {
      networks_.reset();
      dhcp_.reset();
      firewall_.reset();
      links_.reset();
      return 0;
    });
    // NetlinkLinks made netns_dir a mount point; DHCP namespaces may still be bound below it.
    umount2(netns_dir().c_str(), MNT_DETACH);
  }

  // The pid in the pid file of the DHCP server of `network`; -1 when there is none.
  pid_t dhcp_pid(const std::string& network) const {
    auto text = read_file(run_dir() + "/" + network + "/pid");
    return text.is_ok() ? std::atoi(text->c_str()) : -1;
  }

 private:
  std::string ns_;
  std::string underlay_ip_;
  std::filesystem::path dir_;
  std::unique_ptr<NetlinkLinks> links_;
  std::unique_ptr<NftFirewall> firewall_;
  std::unique_ptr<DnsmasqDhcp> dhcp_;
  std::unique_ptr<TenantNetworks> networks_;
};

// A "VM": a namespace with eth0, a veth whose host end is the port's tap in the host namespace.
struct Vm {
  std::string ns;
  Host* host = nullptr;
  const NetworkSpec* network = nullptr;
  PortSpec port;

  std::string mac() const { return port.mac.str(); }
  std::string ip() const { return port.ip.str(); }
};

NetworkSpec network(const std::string& name, const std::string& tenant, uint32_t vni,
                    const std::string& peer) {
  NetworkSpec n;
  n.name = NetworkName::trusted(name);
  n.tenant = TenantId::trusted(tenant);
  n.vni = Vni::trusted(vni);
  n.subnet = Ipv4Cidr::parse("10.50.0.0/24", "subnet").value();
  n.peers = {Ipv4Address::parse(peer, "peer").value()};
  return n;
}

class TwoHostsTest : public testing::Test {
 protected:
  void SetUp() override {
    base_ = std::filesystem::path(testing::TempDir()) / ("two_hosts_" + std::to_string(getpid()));
    std::filesystem::remove_all(base_);
    std::filesystem::create_directories(base_);
    chmod(base_.c_str(), 0711);
    script_ = (base_ / "udhcpc.sh").string();
    std::ofstream(script_) << "#!/bin/sh\n"
                              "[ \"$1\" = bound ] && echo \"ip=$ip mtu=$mtu\"\n"
                              "exit 0\n";
    chmod(script_.c_str(), 0755);

    h1_ = std::make_unique<Host>("h1", "192.0.2.1", base_ / "h1");
    h2_ = std::make_unique<Host>("h2", "192.0.2.2", base_ / "h2");
    run_ok("ip netns add h1 && ip netns add h2");
    run_ok("ip -n h1 link add ul0 type veth peer name ul0 netns h2");
    for (const Host* h : {h1_.get(), h2_.get()}) {
      run_ok("ip -n " + h->ns() + " addr add " + h->underlay_ip() + "/24 dev ul0");
      run_ok("ip -n " + h->ns() + " link set ul0 up && ip -n " + h->ns() + " link set lo up");
    }
    for (const auto& h : {h1_.get(), h2_.get()}) {
      const Status s = h->start();
      ASSERT_TRUE(s.is_ok()) << h->ns() << ": " << s.to_string();
    }

    net_a1_ = network("net-a", "a", 100, h2_->underlay_ip());
    net_b1_ = network("net-b", "b", 200, h2_->underlay_ip());
    net_a2_ = network("net-a", "a", 100, h1_->underlay_ip());
    net_b2_ = network("net-b", "b", 200, h1_->underlay_ip());
    for (const auto& host_net : {std::pair{h1_.get(), &net_a1_}, std::pair{h1_.get(), &net_b1_},
                                 std::pair{h2_.get(), &net_a2_}, std::pair{h2_.get(), &net_b2_}}) {
      Host* h = host_net.first;
      const NetworkSpec* n = host_net.second;
      const Status s = h->run([&] { return h->networks().realize_network(*n, {}); });
      ASSERT_TRUE(s.is_ok()) << h->ns() << " " << n->name.str() << ": " << s.to_string();
    }

    a1_ = add_vm("a1", *h1_, net_a1_, "a1000001-0000-4000-8000-000000000001", "10.50.0.11");
    b1_ = add_vm("b1", *h1_, net_b1_, "b1000001-0000-4000-8000-000000000001", "10.50.0.12");
    a2_ = add_vm("a2", *h2_, net_a2_, "a2000002-0000-4000-8000-000000000002", "10.50.0.12");
    a3_ = add_vm("a3", *h2_, net_a2_, "a3000003-0000-4000-8000-000000000003", "10.50.0.13");
    b2_ = add_vm("b2", *h2_, net_b2_, "b2000002-0000-4000-8000-000000000002", "10.50.0.11");
  }

  void TearDown() override {
    for (Host* h : {h1_.get(), h2_.get()}) {
      if (h == nullptr) continue;
      if (h->started()) {
        for (const NetworkSpec* n :
             h == h1_.get() ? std::vector{&net_a1_, &net_b1_} : std::vector{&net_a2_, &net_b2_}) {
          const Status s = h->run([&] { return h->networks().remove_network(*n); });
          EXPECT_TRUE(s.is_ok()) << h->ns() << " " << n->name.str() << ": " << s.to_string();
        }
      }
      h->stop();
    }
    for (const auto& vm : vms_) sh("ip netns del " + vm.ns);
    sh("ip netns del h1; ip netns del h2");
    std::filesystem::remove_all(base_);
  }

  // add_port() on the VM's host, then the VM namespace with its veth plugged into the bridge.
  Vm add_vm(const std::string& ns, Host& host, const NetworkSpec& net, const std::string& id,
            const std::string& ip) {
    Vm vm{ns, &host, &net, PortSpec{}};
    vm.port.vm = VmId::trusted(id);
    vm.port.network = net.name;
    vm.port.ifname = tap_name(vm.port.vm, 0);
    vm.port.mac = derive_vm_mac(vm.port.vm, 0);
    vm.port.ip = Ipv4Address::parse(ip, "ip").value();
    vm.port.hostname = ns;
    const Status s = host.run([&] { return host.networks().add_port(net, vm.port); });
    EXPECT_TRUE(s.is_ok()) << "add_port " << ns << ": " << s.to_string();

    const std::string on_host = "ip -n " + host.ns() + " ";
    run_ok("ip netns add " + ns);
    run_ok(on_host + "link add " + vm.port.ifname + " type veth peer name eth0 netns " + ns);
    plug(vm);
    run_ok("ip -n " + ns + " link set eth0 address " + vm.mac());
    run_ok("ip -n " + ns + " addr add " + ip + "/24 dev eth0");
    run_ok("ip -n " + ns + " link set eth0 up && ip -n " + ns + " link set lo up");
    // No lock time: any ARP a VM accepts may replace its neighbour entries at once.
    run_ok("ip netns exec " + ns + " sh -c 'echo 0 > /proc/sys/net/ipv4/neigh/eth0/locktime'");
    run_ok("ip netns exec " + ns +
           " nft 'add table netdev obs; add chain netdev obs in "
           "{ type filter hook ingress device eth0 priority 0; }'");
    vms_.push_back(vm);
    return vm;
  }

  // Enslaves the VM's veth (its "tap") to its network's bridge, as the hypervisor does.
  static void plug(const Vm& vm) {
    run_ok("ip -n " + vm.host->ns() + " link set " + vm.port.ifname + " master " +
           bridge_name(vm.network->vni) + " up");
  }

  // The ports that live on `host` (what its database would hold).
  std::vector<PortSpec> ports_of(const Host& host) const {
    std::vector<PortSpec> ports;
    for (const auto& vm : vms_) {
      if (vm.host == &host) ports.push_back(vm.port);
    }
    return ports;
  }

  Result<std::vector<Repair>> reconcile_h1() {
    return h1_->run([&] { return h1_->networks().reconcile({net_a1_, net_b1_}, ports_of(*h1_)); });
  }

  // Deletes host h1's table: the control that shows a "dropped" case could be seen passing.
  static void remove_h1_ruleset() {
    run_ok("ip netns exec h1 nft delete table bridge nodemanager");
  }

  static CommandResult in_vm(const Vm& vm, const std::string& command) {
    return sh("ip netns exec " + vm.ns + " " + command);
  }
  // One busybox ping with a one-second wait: true when a reply came back.
  static bool pings(const Vm& from, const std::string& to) {
    return in_vm(from, "busybox ping -c1 -W1 " + to).exit_code == 0;
  }
  // Expected to work: up to three tries (the first may spend its second on ARP and VXLAN
  // learning).
  static bool reaches(const Vm& from, const std::string& to) {
    for (int i = 0; i < 3; ++i) {
      if (pings(from, to)) return true;
    }
    return false;
  }
  static void pin_neighbour(const Vm& in, const std::string& ip, const std::string& mac) {
    run_ok("ip -n " + in.ns + " neigh replace " + ip + " lladdr " + mac +
           " dev eth0 nud permanent");
  }
  static std::string neighbour_mac(const Vm& in, const std::string& ip) {
    const CommandResult r = sh("ip -n " + in.ns + " neigh show " + ip + " dev eth0");
    std::smatch m;
    const std::regex lladdr("lladdr ([0-9a-f:]+)");
    return std::regex_search(r.output, m, lladdr) ? m[1].str() : "";
  }
  // Counts the frames arriving on `vm`'s eth0 that match `match` (nft syntax) in counter `name`.
  static void watch(const Vm& vm, const std::string& name, const std::string& match) {
    run_ok("ip netns exec " + vm.ns + " nft 'add counter netdev obs " + name +
           "; add rule netdev obs in " + match + " counter name " + name + "'");
  }
  static uint64_t count(const Vm& vm, const std::string& name) {
    const CommandResult r = in_vm(vm, "nft list counter netdev obs " + name);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::smatch m;
    const std::regex packets("packets ([0-9]+)");
    if (!std::regex_search(r.output, m, packets)) {
      ADD_FAILURE() << "no packet count in: " << r.output;
      return 0;
    }
    return std::stoull(m[1].str());
  }

  // What udhcpc in `vm` (with the MAC its eth0 has) was offered and acked, e.g.
  // "ip=10.50.0.11 mtu=1450"; "no lease: " and udhcpc's output when it got none (three discovers a
  // second apart, at most 6 s in all).
  std::string dhcp_lease(const Vm& vm) const {
    const CommandResult r =
        in_vm(vm, "timeout 6 busybox udhcpc -f -n -q -t 3 -T 1 -i eth0 -s " + script_);
    std::smatch m;
    const std::regex bound("ip=[^\n]*");
    if (r.exit_code == 0 && std::regex_search(r.output, m, bound)) return m[0].str();
    return "no lease: " + r.output;
  }

  std::filesystem::path base_;
  std::string script_;
  std::unique_ptr<Host> h1_;
  std::unique_ptr<Host> h2_;
  NetworkSpec net_a1_, net_b1_, net_a2_, net_b2_;  // as host h1 / h2 see them (peer differs)
  std::vector<Vm> vms_;
  Vm a1_, b1_, a2_, a3_, b2_;
};

TEST_F(TwoHostsTest, TenantAEndpointsReachEachOtherAcrossHostsOverVxlan) {
  watch(a2_, "from_a1", "ether saddr " + a1_.mac());
  EXPECT_TRUE(reaches(a1_, a2_.ip()));
  EXPECT_TRUE(reaches(a2_, a1_.ip()));
  EXPECT_TRUE(reaches(a3_, a1_.ip()));
  EXPECT_EQ(neighbour_mac(a1_, a2_.ip()), a2_.mac());
  EXPECT_EQ(neighbour_mac(a3_, a1_.ip()), a1_.mac());
  EXPECT_GT(count(a2_, "from_a1"), 0U);
  // Over VXLAN: host h2 learned A1's MAC behind its VXLAN device of A, from host h1's VTEP.
  const CommandResult fdb = sh("ip -n h2 -d link show nmvx100; bridge -n h2 fdb show dev nmvx100");
  EXPECT_NE(fdb.output.find("vxlan id 100"), std::string::npos) << fdb.output;
  EXPECT_NE(fdb.output.find(a1_.mac() + " dst 192.0.2.1"), std::string::npos) << fdb.output;
}

TEST_F(TwoHostsTest, TenantBReachesNeitherTenantAEndpointEvenWithTheirAddresses) {
  const std::string from_b = "ether saddr { " + b1_.mac() + ", " + b2_.mac() + " }";
  for (const Vm* a : {&a1_, &a2_, &a3_}) watch(*a, "from_b", from_b);

  // B works on the same hosts and the same subnet: B1's 10.50.0.11 is B2 (on h2), not A1 (next
  // to it on h1); B2's 10.50.0.12 is B1, not A2 (next to it on h2).
  EXPECT_TRUE(reaches(b1_, b2_.ip()));
  EXPECT_TRUE(reaches(b2_, b1_.ip()));
  EXPECT_EQ(neighbour_mac(b1_, a1_.ip()), b2_.mac());
  EXPECT_EQ(neighbour_mac(b2_, a2_.ip()), b1_.mac());
  ASSERT_TRUE(reaches(a1_, a2_.ip()));

  // B endpoints aim frames at A's MACs, on the same host and across: nothing arrives.
  pin_neighbour(b1_, a1_.ip(), a1_.mac());
  EXPECT_FALSE(pings(b1_, a1_.ip()));
  pin_neighbour(b1_, a1_.ip(), a2_.mac());
  EXPECT_FALSE(pings(b1_, a1_.ip()));
  pin_neighbour(b2_, a2_.ip(), a2_.mac());
  EXPECT_FALSE(pings(b2_, a2_.ip()));
  pin_neighbour(b2_, a2_.ip(), a1_.mac());
  EXPECT_FALSE(pings(b2_, a2_.ip()));
  // Broadcasts (B's ARP requests above) do not cross either.
  for (const Vm* a : {&a1_, &a2_, &a3_}) {
    EXPECT_EQ(count(*a, "from_b"), 0U) << a->ns;
    EXPECT_NE(neighbour_mac(*a, b1_.ip()), b1_.mac()) << a->ns;
    EXPECT_NE(neighbour_mac(*a, b2_.ip()), b2_.mac()) << a->ns;
  }
}

TEST_F(TwoHostsTest, FramesFromAnAEndpointWithAChangedMacAreDropped) {
  ASSERT_TRUE(reaches(a1_, a2_.ip()));
  constexpr std::string_view kOtherMac = "02:00:00:00:00:99";
  run_ok("ip -n a1 link set eth0 address " + std::string(kOtherMac));
  pin_neighbour(a1_, a2_.ip(), a2_.mac());
  pin_neighbour(a2_, a1_.ip(), std::string(kOtherMac));
  watch(a2_, "from_other_mac", "ether saddr " + std::string(kOtherMac));

  EXPECT_FALSE(pings(a1_, a2_.ip()));
  EXPECT_EQ(count(a2_, "from_other_mac"), 0U);

  remove_h1_ruleset();
  EXPECT_TRUE(reaches(a1_, a2_.ip())) << "the spoofed frames do not pass even without the table";
  EXPECT_GT(count(a2_, "from_other_mac"), 0U);
}

TEST_F(TwoHostsTest, PacketsFromAnAEndpointWithAnotherAddressAreDropped) {
  ASSERT_TRUE(reaches(a1_, a2_.ip()));
  const std::string other_ip = "10.50.0.21";
  run_ok("ip -n a1 addr flush dev eth0 scope global");
  run_ok("ip -n a1 addr add " + other_ip + "/24 dev eth0");
  pin_neighbour(a1_, a2_.ip(), a2_.mac());
  pin_neighbour(a2_, other_ip, a1_.mac());
  watch(a2_, "from_other_ip", "ip saddr " + other_ip);

  EXPECT_FALSE(pings(a1_, a2_.ip()));
  EXPECT_EQ(count(a2_, "from_other_ip"), 0U);

  remove_h1_ruleset();
  EXPECT_TRUE(reaches(a1_, a2_.ip())) << "the spoofed packets do not pass even without the table";
  EXPECT_GT(count(a2_, "from_other_ip"), 0U);
}

TEST_F(TwoHostsTest, GratuitousArpForAnotherAddressDoesNotPoisonTheOtherHost) {
  // A3 (on h2, next to A2) knows A2's real MAC; A1 (on h1) then claims A2's address.
  ASSERT_TRUE(reaches(a3_, a2_.ip()));
  ASSERT_EQ(neighbour_mac(a3_, a2_.ip()), a2_.mac());
  watch(a3_, "arp_from_a1", "arp saddr ether " + a1_.mac());
  // busybox arping binds its sender address, which A1 does not have.
  run_ok("ip netns exec a1 sh -c 'echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind'");
  const std::string claim = "busybox arping -c1 -w1 -I eth0 -s " + a2_.ip() + " ";

  EXPECT_EQ(in_vm(a1_, claim + "-U " + a2_.ip()).exit_code, 0);
  EXPECT_EQ(in_vm(a1_, claim + "-A " + a2_.ip()).exit_code, 0);
  EXPECT_EQ(neighbour_mac(a3_, a2_.ip()), a2_.mac());
  EXPECT_EQ(count(a3_, "arp_from_a1"), 0U);
  EXPECT_TRUE(reaches(a3_, a2_.ip()));

  remove_h1_ruleset();
  EXPECT_EQ(in_vm(a1_, claim + "-U " + a2_.ip()).exit_code, 0);
  EXPECT_GT(count(a3_, "arp_from_a1"), 0U) << "the claim does not cross even without the table";
  EXPECT_EQ(neighbour_mac(a3_, a2_.ip()), a1_.mac()) << "the claim does not poison even unfiltered";
}

// Both hosts run a DHCP server for A and for B (same server address 10.50.0.2 on each host) and
// a client's broadcasts reach both over VXLAN: each server must serve its own host's ports only,
// and the other host's server must not refuse (DHCPNAK) a lease it does not know.
TEST_F(TwoHostsTest, DhcpHandsOutEachEndpointItsFixedLease) {
  EXPECT_EQ(dhcp_lease(a1_), "ip=10.50.0.11 mtu=1450");
  EXPECT_EQ(dhcp_lease(a2_), "ip=10.50.0.12 mtu=1450");
  // Same subnet, other tenant: B1 gets its own network's lease, not A2's although it is the
  // same address.
  EXPECT_EQ(dhcp_lease(b1_), "ip=10.50.0.12 mtu=1450");
  // A MAC no port has gets nothing.
  run_ok("ip -n a3 link set eth0 address 02:00:00:00:00:98");
  EXPECT_EQ(dhcp_lease(a3_).rfind("no lease: ", 0), 0U);
}

TEST_F(TwoHostsTest, KilledDnsmasqIsRestartedAndServesAgain) {
  // Shared with the observer, which the adapter may still call after this test body returns.
  struct Events {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<std::string> seen;
  };
  const auto events = std::make_shared<Events>();
  h1_->dhcp().set_observer([events](const std::string& key, const Status& what) {
    const std::lock_guard lock(events->mu);
    events->seen.push_back(key + ": " + what.to_string());
    events->cv.notify_all();
  });
  const pid_t before = h1_->dhcp_pid("net-a");
  ASSERT_GT(before, 0);
  ASSERT_EQ(kill(before, SIGKILL), 0) << std::strerror(errno);
  {
    std::unique_lock lock(events->mu);
    ASSERT_TRUE(events->cv.wait_for(lock, seconds(10), [&] { return !events->seen.empty(); }))
        << "no restart reported";
    EXPECT_EQ(events->seen.front().rfind("net-a: ", 0), 0U) << events->seen.front();
    EXPECT_NE(events->seen.front().find("restarted"), std::string::npos) << events->seen.front();
  }
  const pid_t after = h1_->dhcp_pid("net-a");
  EXPECT_GT(after, 0);
  EXPECT_NE(after, before);
  EXPECT_EQ(kill(after, 0), 0) << "restarted dnsmasq is not alive";
  EXPECT_EQ(dhcp_lease(a1_), "ip=10.50.0.11 mtu=1450");
}

TEST_F(TwoHostsTest, BridgeDeletedBehindOurBackIsRecreatedByReconcile) {
  ASSERT_TRUE(reaches(a1_, a2_.ip()));
  auto converged = reconcile_h1();
  ASSERT_TRUE(converged.is_ok()) << converged.status().to_string();
  EXPECT_TRUE(converged->empty()) << converged->front().object << " " << converged->front().what;

  run_ok("ip -n h1 link del nmbr100");
  EXPECT_FALSE(pings(a1_, a2_.ip()));

  auto repairs = reconcile_h1();
  ASSERT_TRUE(repairs.is_ok()) << repairs.status().to_string();
  bool bridge_repaired = false;
  for (const auto& r : *repairs) {
    if (r.object == "bridge 'nmbr100'" && r.what == "was missing; recreated") {
      bridge_repaired = true;
    }
  }
  EXPECT_TRUE(bridge_repaired);
  const CommandResult links = sh("ip -n h1 -o link show master nmbr100");
  EXPECT_NE(links.output.find("nmvx100"), std::string::npos) << links.output;
  EXPECT_NE(links.output.find("nmdh100"), std::string::npos) << links.output;
  EXPECT_EQ(sh("ip -n h1 -o addr show dev nmbr100").output, "") << "the host has an address on it";

  // The VM's port left with the old bridge; reconcile put it back on the new one.
  bool port_repaired = false;
  for (const auto& r : *repairs) {
    if (r.object == "port '" + a1_.port.ifname + "'") port_repaired = true;
  }
  EXPECT_TRUE(port_repaired);
  EXPECT_NE(links.output.find(a1_.port.ifname), std::string::npos) << links.output;
  EXPECT_TRUE(reaches(a1_, a2_.ip()));
  EXPECT_EQ(dhcp_lease(a1_), "ip=10.50.0.11 mtu=1450");
}

// `nft flush table` (the rules go) and `nft delete table`: reconcile() restores the table, and a
// spoofing A1 is dropped again.
class TwoHostsTamperedTableTest
    : public TwoHostsTest,
      public testing::WithParamInterface<std::pair<const char*, const char*>> {};

TEST_P(TwoHostsTamperedTableTest, IsRestoredByReconcileAndSpoofingIsDroppedAgain) {
  const auto [tamper, repair] = GetParam();
  ASSERT_TRUE(reaches(a1_, a2_.ip()));
  auto converged = reconcile_h1();
  ASSERT_TRUE(converged.is_ok()) << converged.status().to_string();
  EXPECT_TRUE(converged->empty()) << converged->front().object << " " << converged->front().what;

  constexpr std::string_view kOtherMac = "02:00:00:00:00:97";
  run_ok("ip -n a1 link set eth0 address " + std::string(kOtherMac));
  pin_neighbour(a1_, a2_.ip(), a2_.mac());
  pin_neighbour(a2_, a1_.ip(), std::string(kOtherMac));
  watch(a2_, "from_other_mac", "ether saddr " + std::string(kOtherMac));
  EXPECT_FALSE(pings(a1_, a2_.ip()));

  run_ok(std::string("ip netns exec h1 nft ") + tamper + " table bridge nodemanager");
  EXPECT_TRUE(reaches(a1_, a2_.ip())) << "'" << tamper << "' did not open the port";

  auto repairs = reconcile_h1();
  ASSERT_TRUE(repairs.is_ok()) << repairs.status().to_string();
  ASSERT_EQ(repairs->size(), 1U);
  EXPECT_EQ(repairs->front().object, "nft table 'bridge nodemanager'");
  EXPECT_EQ(repairs->front().what, repair);

  const uint64_t before = count(a2_, "from_other_mac");
  EXPECT_GT(before, 0U);
  EXPECT_FALSE(pings(a1_, a2_.ip()));
  EXPECT_EQ(count(a2_, "from_other_mac"), before);
}

INSTANTIATE_TEST_SUITE_P(
    FlushOrDelete, TwoHostsTamperedTableTest,
    testing::Values(std::pair{"flush", "was changed outside nodemanager; restored"},
                    std::pair{"delete", "was missing; recreated"}),
    [](const auto& param_info) { return std::string(param_info.param.first); });

}  // namespace
}  // namespace nm::network
