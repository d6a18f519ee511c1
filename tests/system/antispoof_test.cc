// The anti-spoofing ruleset (render_ruleset and friends) proved with real frames: a bridge in the
// test binary's private network namespace (netns_main.cc), two "VMs" as network namespaces "vm1"
// and "vm2" whose veth host ends are bridge ports named like taps, and a third namespace "srv"
// attached by a veth that is not a VM port (like the DHCP namespace). The rules are applied
// through NftFirewall.
//
// Every "dropped" case first shows that the same spoofed traffic gets through once our table is
// deleted, so a test fails if the ruleset lets it pass and cannot pass because the setup was
// broken. Delivery is observed with named nft counters on the receiving namespace's ingress hook
// (netdev family), and with ping/arping exit codes and neighbour caches.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "nm/network/addr.h"
#include "nm/network/nft_firewall.h"
#include "nm/network/nft_ruleset.h"
#include "shell.h"

namespace nm::network {
namespace {

using system_test::CommandResult;
using system_test::sh;

// Runs `command` inside network namespace `ns`.
CommandResult in_ns(const std::string& ns, const std::string& command) {
  return sh("ip netns exec " + ns + " " + command);
}

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// Runs `fn` on a thread that joined network namespace `ns` (setns only affects that thread).
void on_thread_in_ns(const std::string& ns, const std::function<void()>& fn) {
  std::thread t([&] {
    const UniqueFd ns_fd(open(("/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC));
    if (ns_fd.get() < 0 || setns(ns_fd.get(), CLONE_NEWNET) != 0) {
      ADD_FAILURE() << "joining netns '" << ns << "': " << std::strerror(errno);
      return;
    }
    fn();
  });
  t.join();
}

// Sends one UDP datagram from `ns`'s eth0, source port `sport`, to `dst`:`dport` (the limited
// broadcast 255.255.255.255 allowed).
void send_udp(const std::string& ns, uint16_t sport, const std::string& dst, uint16_t dport) {
  on_thread_in_ns(ns, [&] {
    const UniqueFd s(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ASSERT_GE(s.get(), 0) << std::strerror(errno);
    const int one = 1;
    constexpr std::string_view kDev = "eth0";
    ASSERT_EQ(setsockopt(s.get(), SOL_SOCKET, SO_BROADCAST, &one, sizeof one), 0);
    ASSERT_EQ(setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), 0);
    ASSERT_EQ(setsockopt(s.get(), SOL_SOCKET, SO_BINDTODEVICE, kDev.data(),
                         static_cast<socklen_t>(kDev.size())),
              0)
        << std::strerror(errno);
    sockaddr_in src{};
    src.sin_family = AF_INET;
    src.sin_port = htons(sport);
    ASSERT_EQ(bind(s.get(), reinterpret_cast<const sockaddr*>(&src), sizeof src), 0)
        << std::strerror(errno);
    auto ip = Ipv4Address::parse(dst, "dst");
    ASSERT_TRUE(ip.is_ok());
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(dport);
    to.sin_addr.s_addr = htonl(ip->to_uint());
    constexpr std::string_view kPayload = "nodemanager antispoof test";
    ASSERT_EQ(sendto(s.get(), kPayload.data(), kPayload.size(), 0,
                     reinterpret_cast<const sockaddr*>(&to), sizeof to),
              static_cast<ssize_t>(kPayload.size()))
        << std::strerror(errno);
  });
}

// Sends `frame` (from the destination MAC on, no FCS) as is out of `ns`'s eth0.
void send_frame(const std::string& ns, const std::vector<uint8_t>& frame) {
  on_thread_in_ns(ns, [&] {
    const UniqueFd s(socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0));
    ASSERT_GE(s.get(), 0) << std::strerror(errno);
    sockaddr_ll to{};
    to.sll_family = AF_PACKET;
    to.sll_ifindex = static_cast<int>(if_nametoindex("eth0"));
    ASSERT_NE(to.sll_ifindex, 0) << std::strerror(errno);
    ASSERT_EQ(sendto(s.get(), frame.data(), frame.size(), 0, reinterpret_cast<const sockaddr*>(&to),
                     sizeof to),
              static_cast<ssize_t>(frame.size()))
        << std::strerror(errno);
  });
}

void append_mac(std::vector<uint8_t>& out, const std::string& mac) {
  const auto& b = MacAddress::parse(mac, "mac").value().bytes();
  out.insert(out.end(), b.begin(), b.end());
}
void append_ip(std::vector<uint8_t>& out, const std::string& ip) {
  const uint32_t v = Ipv4Address::parse(ip, "ip").value().to_uint();
  for (const int shift : {24, 16, 8, 0}) out.push_back(static_cast<uint8_t>(v >> shift));
}

// A broadcast ARP request from Ethernet source `eth_src` whose sender fields are `sha`/`spa`.
std::vector<uint8_t> arp_request(const std::string& eth_src, const std::string& sha,
                                 const std::string& spa, const std::string& tpa) {
  std::vector<uint8_t> f;
  append_mac(f, "ff:ff:ff:ff:ff:ff");
  append_mac(f, eth_src);
  f.insert(f.end(), {0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01});
  append_mac(f, sha);
  append_ip(f, spa);
  append_mac(f, "00:00:00:00:00:00");
  append_ip(f, tpa);
  f.resize(60, 0);
  return f;
}

// A UDP datagram `src`:`sport` -> `dst`:`dport`, 802.1Q-tagged with `vlan` unless it is 0.
std::vector<uint8_t> udp_frame(const std::string& eth_src, const std::string& eth_dst,
                               uint16_t vlan, const std::string& src, const std::string& dst,
                               uint16_t sport, uint16_t dport) {
  std::vector<uint8_t> f;
  append_mac(f, eth_dst);
  append_mac(f, eth_src);
  if (vlan != 0) {
    f.insert(f.end(), {0x81, 0x00, static_cast<uint8_t>(vlan >> 8), static_cast<uint8_t>(vlan)});
  }
  f.insert(f.end(), {0x08, 0x00});
  const size_t ip_start = f.size();
  constexpr uint16_t kPayload = 8;
  constexpr uint16_t kTotal = 20 + 8 + kPayload;
  f.insert(f.end(), {0x45, 0x00, 0x00, kTotal, 0x00, 0x00, 0x40, 0x00, 64, 17, 0x00, 0x00});
  append_ip(f, src);
  append_ip(f, dst);
  uint32_t sum = 0;
  for (size_t i = ip_start; i < ip_start + 20; i += 2) {
    sum += static_cast<uint32_t>(f[i] << 8 | f[i + 1]);
  }
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >> 16);
  const auto checksum = static_cast<uint16_t>(~sum);
  f[ip_start + 10] = static_cast<uint8_t>(checksum >> 8);
  f[ip_start + 11] = static_cast<uint8_t>(checksum);
  f.insert(f.end(), {static_cast<uint8_t>(sport >> 8), static_cast<uint8_t>(sport),
                     static_cast<uint8_t>(dport >> 8), static_cast<uint8_t>(dport), 0x00,
                     8 + kPayload, 0x00, 0x00});  // UDP checksum 0: none
  f.insert(f.end(), kPayload, 0x2a);
  if (f.size() < 60) f.resize(60, 0);
  return f;
}

struct Endpoint {
  std::string ns;
  std::string host_if;  // bridge port (host end of the veth)
  std::string mac;
  std::string ip;
  std::string ip6;
};

constexpr std::string_view kBridge = "nmbrspoof";
const Endpoint kVm1{"vm1", "nmt000000000001", "02:00:00:00:00:01", "10.9.0.1", "fd00::1"};
const Endpoint kVm2{"vm2", "nmt000000000002", "02:00:00:00:00:02", "10.9.0.2", "fd00::2"};
const Endpoint kSrv{"srv", "nmdhcpspoof", "02:00:00:00:00:03", "10.9.0.3", "fd00::3"};

PortRule port_rule(const Endpoint& e) {
  PortRule rule;
  rule.ifname = e.host_if;
  rule.mac = MacAddress::parse(e.mac, "mac").value();
  rule.ip = Ipv4Address::parse(e.ip, "ip").value();
  return rule;
}

class AntiSpoofTest : public testing::Test {
 protected:
  void SetUp() override {
    tear_down_topology();
    auto fw = NftFirewall::create();
    ASSERT_TRUE(fw.is_ok()) << fw.status().to_string();
    fw_ = std::move(fw).value();

    run_ok("ip link add " + std::string(kBridge) + " type bridge forward_delay 0");
    run_ok("ip link set " + std::string(kBridge) + " up");
    for (const Endpoint* e : {&kVm1, &kVm2, &kSrv}) {
      run_ok("ip netns add " + e->ns);
      run_ok("ip link add " + e->host_if + " type veth peer name eth0 netns " + e->ns);
      run_ok("ip link set " + e->host_if + " master " + std::string(kBridge) + " up");
      run_ok("ip -n " + e->ns + " link set eth0 address " + e->mac);
      run_ok("ip -n " + e->ns + " addr add " + e->ip + "/24 dev eth0");
      run_ok("ip -n " + e->ns + " addr add " + e->ip6 + "/64 dev eth0 nodad");
      run_ok("ip -n " + e->ns + " link set eth0 up");
      run_ok("ip -n " + e->ns + " link set lo up");
      // Observation point: named counters on eth0's ingress, added by watch().
      run_ok("ip netns exec " + e->ns +
             " nft 'add table netdev obs; add chain netdev obs in "
             "{ type filter hook ingress device eth0 priority 0; }'");
    }
  }

  void TearDown() override { tear_down_topology(); }

  static void tear_down_topology() {
    // Deleting the host ends first removes the veth pairs synchronously; a deleted namespace is
    // cleaned up asynchronously and would keep the names busy for the next test.
    for (const Endpoint* e : {&kVm1, &kVm2, &kSrv}) {
      sh("ip link del " + e->host_if);
      sh("ip netns del " + e->ns);
    }
    sh("ip link del " + std::string(kBridge));
    sh("nft delete table bridge nodemanager");
  }

  static void run_ok(const std::string& command) {
    const CommandResult r = sh(command);
    ASSERT_EQ(r.exit_code, 0) << command << ": " << r.output;
  }

  void apply_ruleset(std::vector<PortRule> ports) {
    const std::string script = render_ruleset(std::move(ports));
    const Status s = fw_->apply(script);
    ASSERT_TRUE(s.is_ok()) << s.to_string() << "\nscript:\n" << script;
  }
  void apply_ports_vm1_vm2() { apply_ruleset({port_rule(kVm1), port_rule(kVm2)}); }

  // The spoofed traffic of a test must pass without our table: proves the test can see a leak.
  static void remove_ruleset() { run_ok("nft delete table bridge nodemanager"); }

  // Counts frames arriving on `e`'s eth0 that match `match` (nft syntax) in counter `name`.
  static void watch(const Endpoint& e, const std::string& name, const std::string& match) {
    run_ok("ip netns exec " + e.ns + " nft 'add counter netdev obs " + name +
           "; add rule netdev obs in " + match + " counter name " + name + "'");
  }
  static uint64_t count(const Endpoint& e, const std::string& name) {
    const CommandResult r = in_ns(e.ns, "nft list counter netdev obs " + name);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::smatch m;
    const std::regex packets("packets ([0-9]+)");
    if (!std::regex_search(r.output, m, packets)) {
      ADD_FAILURE() << "no packet count in: " << r.output;
      return 0;
    }
    return std::stoull(m[1].str());
  }
  // Waits (at most 2 s) until counter `name` on `e` reaches `at_least`; returns its value.
  static uint64_t await_count(const Endpoint& e, const std::string& name, uint64_t at_least) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    uint64_t n = count(e, name);
    while (n < at_least && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      n = count(e, name);
    }
    return n;
  }

  // busybox ping: exit code 0 when a reply came back within a second.
  static bool pings(const Endpoint& from, const std::string& to, const std::string& extra = "") {
    return in_ns(from.ns, "busybox ping -c1 -W1 " + extra + " " + to).exit_code == 0;
  }
  static void pin_neighbour(const Endpoint& in, const std::string& ip, const std::string& mac) {
    run_ok("ip -n " + in.ns + " neigh replace " + ip + " lladdr " + mac +
           " dev eth0 nud permanent");
  }
  // The MAC `in`'s neighbour cache holds for `ip`, "" when none.
  static std::string neighbour_mac(const Endpoint& in, const std::string& ip) {
    const CommandResult r = sh("ip -n " + in.ns + " neigh show " + ip + " dev eth0");
    std::smatch m;
    const std::regex lladdr("lladdr ([0-9a-f:]+)");
    return std::regex_search(r.output, m, lladdr) ? m[1].str() : "";
  }

  std::unique_ptr<NftFirewall> fw_;
};

TEST_F(AntiSpoofTest, TrafficFromTheRightMacAndAddressFlows) {
  apply_ports_vm1_vm2();
  auto before = fw_->list_table();
  ASSERT_TRUE(before.is_ok() && before->has_value()) << before.status().to_string();

  EXPECT_TRUE(pings(kVm1, kVm2.ip));
  EXPECT_TRUE(pings(kVm2, kVm1.ip));
  EXPECT_TRUE(pings(kSrv, kVm1.ip));
  EXPECT_TRUE(pings(kVm2, kSrv.ip));

  // Traffic moved counters, if any; the stateless listing does not show them.
  EXPECT_EQ(fw_->list_table().value(), before.value());
}

TEST_F(AntiSpoofTest, FramesFromAChangedMacAreDropped) {
  apply_ports_vm1_vm2();
  ASSERT_TRUE(pings(kVm1, kVm2.ip));

  constexpr std::string_view kOtherMac = "02:00:00:00:00:99";
  run_ok("ip -n vm1 link set eth0 address " + std::string(kOtherMac));
  // Neighbours pinned both ways, so only the MAC rule stands between the two.
  pin_neighbour(kVm1, kVm2.ip, kVm2.mac);
  pin_neighbour(kVm2, kVm1.ip, std::string(kOtherMac));
  watch(kVm2, "from_other_mac", "ether saddr " + std::string(kOtherMac));

  EXPECT_FALSE(pings(kVm1, kVm2.ip));
  EXPECT_EQ(count(kVm2, "from_other_mac"), 0U);

  remove_ruleset();
  EXPECT_TRUE(pings(kVm1, kVm2.ip)) << "the spoofed frames do not pass even without our table";
  EXPECT_GT(count(kVm2, "from_other_mac"), 0U);
}

TEST_F(AntiSpoofTest, Ipv4FromAnAddressNotThePortsIsDropped) {
  apply_ports_vm1_vm2();
  const std::string second_ip = "10.9.0.11";
  const std::string replaced_ip = "10.9.0.12";
  run_ok("ip -n vm1 addr add " + second_ip + "/24 dev eth0");
  pin_neighbour(kVm1, kVm2.ip, kVm2.mac);
  pin_neighbour(kVm2, second_ip, kVm1.mac);
  pin_neighbour(kVm2, replaced_ip, kVm1.mac);
  watch(kVm2, "from_spoofed_ip", "ip saddr { " + second_ip + ", " + replaced_ip + " }");

  EXPECT_TRUE(pings(kVm1, kVm2.ip)) << "the port's own address must still work";
  EXPECT_FALSE(pings(kVm1, kVm2.ip, "-I " + second_ip));
  // The guest gives up its address for another one.
  run_ok("ip -n vm1 addr flush dev eth0 scope global");
  run_ok("ip -n vm1 addr add " + replaced_ip + "/24 dev eth0");
  pin_neighbour(kVm1, kVm2.ip, kVm2.mac);  // removing the last address flushed the cache
  EXPECT_FALSE(pings(kVm1, kVm2.ip));
  EXPECT_EQ(count(kVm2, "from_spoofed_ip"), 0U);

  remove_ruleset();
  EXPECT_TRUE(pings(kVm1, kVm2.ip)) << "the spoofed packets do not pass even without our table";
  EXPECT_GT(count(kVm2, "from_spoofed_ip"), 0U);
}

TEST_F(AntiSpoofTest, ArpForAnotherPortsAddressDoesNotPoisonNeighbours) {
  apply_ports_vm1_vm2();
  // srv and vm2 learn each other's real MACs.
  ASSERT_TRUE(pings(kSrv, kVm2.ip));
  ASSERT_EQ(neighbour_mac(kSrv, kVm2.ip), kVm2.mac);
  ASSERT_EQ(neighbour_mac(kVm2, kSrv.ip), kSrv.mac);
  // No lock time: any accepted ARP may replace the entry at once.
  run_ok("ip netns exec srv sh -c 'echo 0 > /proc/sys/net/ipv4/neigh/eth0/locktime'");
  run_ok("ip netns exec vm2 sh -c 'echo 0 > /proc/sys/net/ipv4/neigh/eth0/locktime'");
  watch(kSrv, "arp_from_vm1", "arp saddr ether " + kVm1.mac);

  // vm1 claims vm2's address (gratuitous request and unsolicited reply), and srv's towards vm2.
  // busybox arping binds to its sender address, so vm1 may bind addresses it does not have.
  run_ok("ip netns exec vm1 sh -c 'echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind'");
  const std::string claim_vm2 = "busybox arping -c1 -w1 -I eth0 -s " + kVm2.ip + " ";
  const std::string claim_srv = "busybox arping -U -c1 -w1 -I eth0 -s " + kSrv.ip + " " + kSrv.ip;
  EXPECT_EQ(in_ns("vm1", claim_vm2 + "-U " + kVm2.ip).exit_code, 0);
  EXPECT_EQ(in_ns("vm1", claim_vm2 + "-A " + kVm2.ip).exit_code, 0);
  EXPECT_EQ(in_ns("vm1", claim_srv).exit_code, 0);
  EXPECT_EQ(neighbour_mac(kSrv, kVm2.ip), kVm2.mac);
  EXPECT_EQ(neighbour_mac(kVm2, kSrv.ip), kSrv.mac);
  EXPECT_EQ(count(kSrv, "arp_from_vm1"), 0U);

  // An RFC 5227 probe (sender address 0.0.0.0) from a port passes, and vm2 answers it: busybox
  // arping -D exits 1 when the address is in use.
  EXPECT_EQ(in_ns("vm1", "busybox arping -D -c1 -w1 -I eth0 " + kVm2.ip).exit_code, 1);

  remove_ruleset();
  EXPECT_EQ(in_ns("vm1", claim_vm2 + "-U " + kVm2.ip).exit_code, 0);
  EXPECT_EQ(in_ns("vm1", claim_srv).exit_code, 0);
  EXPECT_EQ(neighbour_mac(kSrv, kVm2.ip), kVm1.mac) << "the claim does not poison even unfiltered";
  EXPECT_EQ(neighbour_mac(kVm2, kSrv.ip), kVm1.mac) << "the claim does not poison even unfiltered";
}

TEST_F(AntiSpoofTest, ArpWhoseSenderMacIsNotThePortsIsDropped) {
  apply_ports_vm1_vm2();
  constexpr std::string_view kOtherMac = "02:00:00:00:00:77";
  watch(kSrv, "arp_other_sha", "arp saddr ether " + std::string(kOtherMac));
  watch(kSrv, "arp_own_sha", "arp saddr ether " + kVm1.mac);

  // Right Ethernet source, right sender IP, another sender MAC: what neighbours would learn.
  send_frame("vm1", arp_request(kVm1.mac, std::string(kOtherMac), kVm1.ip, kSrv.ip));
  send_frame("vm1", arp_request(kVm1.mac, kVm1.mac, kVm1.ip, kSrv.ip));  // control
  EXPECT_EQ(await_count(kSrv, "arp_own_sha", 1), 1U);
  EXPECT_EQ(count(kSrv, "arp_other_sha"), 0U);
  EXPECT_EQ(neighbour_mac(kSrv, kVm1.ip), kVm1.mac);

  remove_ruleset();
  send_frame("vm1", arp_request(kVm1.mac, std::string(kOtherMac), kVm1.ip, kSrv.ip));
  EXPECT_EQ(await_count(kSrv, "arp_other_sha", 1), 1U) << "does not pass even unfiltered";
}

TEST_F(AntiSpoofTest, VlanTaggedFramesFromAPortAreDropped) {
  apply_ports_vm1_vm2();
  watch(kVm2, "tagged", "vlan id 5");
  watch(kVm2, "untagged", "udp dport 4242");

  // A tagged IPv4 datagram that would pass every IPv4 check if the tag were ignored.
  send_frame("vm1", udp_frame(kVm1.mac, kVm2.mac, 5, kVm1.ip, kVm2.ip, 4000, 4000));
  send_frame("vm1", udp_frame(kVm1.mac, kVm2.mac, 0, kVm1.ip, kVm2.ip, 4000, 4242));  // control
  EXPECT_EQ(await_count(kVm2, "untagged", 1), 1U);
  EXPECT_EQ(count(kVm2, "tagged"), 0U);

  remove_ruleset();
  send_frame("vm1", udp_frame(kVm1.mac, kVm2.mac, 5, kVm1.ip, kVm2.ip, 4000, 4000));
  EXPECT_EQ(await_count(kVm2, "tagged", 1), 1U) << "does not pass even unfiltered";
}

TEST_F(AntiSpoofTest, DhcpDiscoveryPassesButDhcpServerRepliesFromAPortAreDropped) {
  apply_ports_vm1_vm2();
  watch(kSrv, "discover", "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67");
  watch(kSrv, "from_port_67", "udp sport 67");
  watch(kSrv, "from_port_6767", "udp sport 6767");
  watch(kVm2, "bcast_from_port_67", "udp sport 67");

  // busybox udhcpc: one discover, from 0.0.0.0 and vm1's MAC; no server answers, so it gives up.
  in_ns("vm1", "busybox udhcpc -i eth0 -n -q -t 1 -T 1 -A 0 -s /bin/true");
  EXPECT_GE(await_count(kSrv, "discover", 1), 1U);

  // A rogue DHCP server in vm1: offers by broadcast and unicast, then a control datagram from
  // another port; once the control has arrived, the others would have too.
  send_udp("vm1", 67, "255.255.255.255", 68);
  send_udp("vm1", 67, kSrv.ip, 68);
  send_udp("vm1", 6767, kSrv.ip, 68);
  EXPECT_EQ(await_count(kSrv, "from_port_6767", 1), 1U);
  EXPECT_EQ(count(kSrv, "from_port_67"), 0U);
  EXPECT_EQ(count(kVm2, "bcast_from_port_67"), 0U);

  remove_ruleset();
  send_udp("vm1", 67, kSrv.ip, 68);
  EXPECT_EQ(await_count(kSrv, "from_port_67", 1), 1U) << "sport 67 does not pass even unfiltered";
}

TEST_F(AntiSpoofTest, Ipv6FromAPortIsDropped) {
  apply_ports_vm1_vm2();
  pin_neighbour(kVm1, kVm2.ip6, kVm2.mac);
  pin_neighbour(kVm2, kVm1.ip6, kVm1.mac);
  watch(kVm2, "v6_from_vm1", "ip6 saddr " + kVm1.ip6);

  EXPECT_FALSE(pings(kVm1, kVm2.ip6));
  EXPECT_EQ(count(kVm2, "v6_from_vm1"), 0U);

  remove_ruleset();
  EXPECT_TRUE(pings(kVm1, kVm2.ip6)) << "IPv6 does not pass even without our table";
  EXPECT_GT(count(kVm2, "v6_from_vm1"), 0U);
}

TEST_F(AntiSpoofTest, FramesFromANonPortPassUntouched) {
  apply_ports_vm1_vm2();
  // srv is not a VM port: another source address, IPv6 and DHCP server traffic all pass.
  run_ok("ip -n srv addr add 10.9.0.50/24 dev eth0");
  EXPECT_TRUE(pings(kSrv, kVm1.ip, "-I 10.9.0.50"));

  pin_neighbour(kSrv, kVm2.ip6, kVm2.mac);
  watch(kVm2, "v6_from_srv", "ip6 saddr " + kSrv.ip6);
  in_ns("srv", "busybox ping -c1 -W1 " + kVm2.ip6);  // vm2's answer is IPv6 from a port: dropped
  EXPECT_GE(count(kVm2, "v6_from_srv"), 1U);

  watch(kVm1, "offer_from_srv", "udp sport 67 udp dport 68");
  send_udp("srv", 67, "255.255.255.255", 68);
  send_udp("srv", 67, kVm1.ip, 68);
  EXPECT_EQ(await_count(kVm1, "offer_from_srv", 2), 2U);
}

TEST_F(AntiSpoofTest, PortsAddedAndRemovedIncrementallyTakeEffect) {
  apply_ruleset({port_rule(kVm1)});
  watch(kVm1, "from_vm2", "ether saddr " + kVm2.mac);
  // Pinned neighbours: a failed ARP resolution would make the next ping wait for a retry.
  pin_neighbour(kVm2, kVm1.ip, kVm1.mac);
  pin_neighbour(kVm1, kVm2.ip, kVm2.mac);
  // vm2's port is named like a tap but is no port yet: it fails closed.
  EXPECT_FALSE(pings(kVm2, kVm1.ip));
  EXPECT_EQ(count(kVm1, "from_vm2"), 0U);

  const std::string add = render_add_port(port_rule(kVm2));
  ASSERT_TRUE(fw_->apply(add).is_ok()) << add;
  ASSERT_TRUE(fw_->apply(add).is_ok()) << "adding twice: " << add;
  EXPECT_TRUE(pings(kVm2, kVm1.ip));
  EXPECT_TRUE(pings(kVm1, kVm2.ip));
  // ...and now it is held to its own address.
  run_ok("ip -n vm2 addr add 10.9.0.22/24 dev eth0");
  pin_neighbour(kVm1, "10.9.0.22", kVm2.mac);
  EXPECT_FALSE(pings(kVm2, kVm1.ip, "-I 10.9.0.22"));

  const std::string remove = render_remove_port(port_rule(kVm2));
  ASSERT_TRUE(fw_->apply(remove).is_ok()) << remove;
  ASSERT_TRUE(fw_->apply(remove).is_ok()) << "removing twice: " << remove;
  const uint64_t before = count(kVm1, "from_vm2");
  EXPECT_FALSE(pings(kVm2, kVm1.ip));
  EXPECT_EQ(count(kVm1, "from_vm2"), before);
  EXPECT_TRUE(pings(kSrv, kVm1.ip)) << "other traffic is not affected";
}

}  // namespace
}  // namespace nm::network
