// NetlinkLinks against the kernel, inside the test binary's private network and mount namespaces
// (netns_main.cc). iproute2 (`ip`, `bridge`) is the independent witness: it reads what the adapter
// made and changes things behind its back. Every test starts from a namespace holding only the
// loopback and the underlay "ul0" (192.0.2.1/24, one end of a veth pair: the test kernel has no
// dummy driver); TearDown removes everything else.
#include "nm/network/netlink_links.h"

#include <gtest/gtest.h>
#include <net/if.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "shell.h"

namespace nm::network {
namespace {

using system_test::CommandResult;
using system_test::contains;
using system_test::must;
using system_test::sh;

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(line);
  }
  return out;
}

Ipv4Address ip(const std::string& text) {
  return Ipv4Address::parse(text, "test").value();
}

Ipv4Cidr cidr(const std::string& text) {
  return Ipv4Cidr::parse(text, "test").value();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Flood destinations of `dev` as `bridge fdb` shows them (lines "00:00:00:00:00:00 dst X ...").
std::set<std::string> zero_mac_destinations(const std::string& dev) {
  std::set<std::string> out;
  for (const std::string& line : lines_of(must("bridge fdb show dev " + dev))) {
    if (!line.starts_with("00:00:00:00:00:00 dst ")) continue;
    EXPECT_TRUE(contains(line, "self permanent")) << line;
    std::istringstream words(line);
    std::string mac;
    std::string dst_word;
    std::string dst;
    words >> mac >> dst_word >> dst;
    out.insert(dst);
  }
  return out;
}

std::set<std::string> as_strings(const std::vector<Ipv4Address>& addrs) {
  std::set<std::string> out;
  for (const Ipv4Address& a : addrs) out.insert(a.str());
  return out;
}

// Waits (bounded) for `command`'s output to contain `needle`: for the kernel's asynchronous link
// watch (carrier, IPv6 autoconfiguration), which has no event a shell command can wait on.
bool eventually_contains(const std::string& command, const std::string& needle) {
  for (int i = 0; i < 50; ++i) {
    if (contains(sh(command).output, needle)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// Pings `address` from namespace `netns` (busybox: the test machine has no iputils), allowing a
// few seconds for bridge ports to settle.
bool pings(const std::string& netns, const std::string& address) {
  const std::string command = "ip netns exec " + netns + " busybox ping -c1 -W1 " + address;
  for (int i = 0; i < 5; ++i) {
    if (sh(command).exit_code == 0) return true;
  }
  return false;
}

class NetlinkLinksTest : public testing::Test {
 protected:
  void SetUp() override {
    must("ip link set lo up");
    must("ip link add ul0 type veth peer name ul0p && ip addr add 192.0.2.1/24 dev ul0");
    must("ip link set ul0p up && ip link set ul0 up");
    auto links = NetlinkLinks::create({});
    ASSERT_TRUE(links.is_ok()) << links.status().to_string();
    links_ = std::move(links).value();
  }

  void TearDown() override {
    if (links_ == nullptr) return;
    auto namespaces = links_->list_netns();
    ASSERT_TRUE(namespaces.is_ok()) << namespaces.status().to_string();
    for (const std::string& ns : *namespaces) {
      EXPECT_TRUE(links_->delete_netns(ns).is_ok()) << ns;
    }
    auto all = links_->list_links();
    ASSERT_TRUE(all.is_ok()) << all.status().to_string();
    for (const LinkInfo& link : *all) {
      if (link.name == "lo") continue;
      EXPECT_TRUE(links_->delete_link(link.name).is_ok()) << link.name;
    }
  }

  std::optional<LinkInfo> link(const std::string& name) {
    auto all = links_->list_links();
    EXPECT_TRUE(all.is_ok()) << all.status().to_string();
    if (!all.is_ok()) return std::nullopt;
    for (const LinkInfo& l : *all) {
      if (l.name == name) return l;
    }
    return std::nullopt;
  }

  static void expect_ok(const Status& s) { EXPECT_TRUE(s.is_ok()) << s.to_string(); }

  static DhcpNamespaceConfig dhcp_config(uint32_t n) {
    const std::string id = std::to_string(n);
    return {.netns = "nm-dhcp-" + id,
            .host_ifname = "nmdh" + id,
            .bridge = "nmbr" + id,
            .inner_ifname = "dhcp0",
            .subnet = cidr("10." + id + ".0.0/24"),
            .address = ip("10." + id + ".0.2")};
  }

  // A namespace `name` with a veth end "eth0" holding `cidr_text`, its peer `name`h on `bridge`:
  // a stand-in for a VM.
  static void add_vm(const std::string& name, const std::string& bridge,
                     const std::string& cidr_text) {
    must("ip netns add " + name);
    must("ip link add " + name + "h type veth peer name eth0 netns " + name);
    must("ip link set " + name + "h master " + bridge + " up");
    must("ip -n " + name + " addr add " + cidr_text + " dev eth0");
    must("ip -n " + name + " link set eth0 up && ip -n " + name + " link set lo up");
  }

  std::unique_ptr<NetlinkLinks> links_;
};

TEST_F(NetlinkLinksTest, EnsureBridgeTwiceLeavesOneBridgeUpWithoutAnyAddress) {
  expect_ok(links_->ensure_bridge("nmbr10"));
  expect_ok(links_->ensure_bridge("nmbr10"));

  const auto bridges = lines_of(must("ip -o link show type bridge"));
  ASSERT_EQ(bridges.size(), 1U) << must("ip -o link show type bridge");
  EXPECT_TRUE(contains(bridges[0], "nmbr10"));
  const auto info = link("nmbr10");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->kind, "bridge");
  EXPECT_TRUE(info->up);
  EXPECT_FALSE(info->master.has_value());
  EXPECT_TRUE(contains(must("ip -d link show nmbr10"), "stp_state 0"));
  EXPECT_EQ(read_text("/proc/sys/net/ipv6/conf/nmbr10/disable_ipv6"), "1\n");

  // A port gives both bridges a carrier; the kernel then gives an IPv6 link-local address to the
  // control bridge made by `ip`, and must give none to ours.
  must("ip link add p10 type veth peer name p10b && ip link set p10 master nmbr10");
  must("ip link set p10b up && ip link set p10 up");
  must("ip link add ctl10 type bridge && ip link add pc10 type veth peer name pc10b");
  must("ip link set pc10 master ctl10 && ip link set pc10b up && ip link set pc10 up");
  must("ip link set ctl10 up");
  ASSERT_TRUE(eventually_contains("ip -6 addr show dev ctl10", "inet6 fe80"));
  EXPECT_TRUE(contains(must("ip link show nmbr10"), "LOWER_UP"));
  EXPECT_EQ(must("ip -6 addr show dev nmbr10"), "");
  EXPECT_FALSE(contains(read_text("/proc/net/if_inet6"), "nmbr10"));
  EXPECT_EQ(must("ip -4 addr show dev nmbr10"), "");
  auto addrs = links_->addresses("nmbr10");
  ASSERT_TRUE(addrs.is_ok()) << addrs.status().to_string();
  EXPECT_TRUE(addrs->empty());
}

TEST_F(NetlinkLinksTest, EnsureBridgeRemovesAnAddressAndBringsItBackUp) {
  expect_ok(links_->ensure_bridge("nmbr11"));
  must("ip addr add 10.11.0.1/24 dev nmbr11 && ip addr add 10.11.1.1/16 dev nmbr11");
  must("ip link set nmbr11 down");
  auto before = links_->addresses("nmbr11");
  ASSERT_TRUE(before.is_ok()) << before.status().to_string();
  EXPECT_EQ(as_strings(*before), (std::set<std::string>{"10.11.0.1", "10.11.1.1"}));
  ASSERT_FALSE(link("nmbr11")->up);

  expect_ok(links_->ensure_bridge("nmbr11"));

  EXPECT_EQ(must("ip -4 addr show dev nmbr11"), "");
  auto after = links_->addresses("nmbr11");
  ASSERT_TRUE(after.is_ok()) << after.status().to_string();
  EXPECT_TRUE(after->empty());
  EXPECT_TRUE(link("nmbr11")->up);
}

TEST_F(NetlinkLinksTest, RefusesToRepurposeALinkOfAnotherKind) {
  must("ip link add nmbr12 type veth peer name x12");
  must("ip tuntap add dev nmt12 mode tun");
  expect_ok(links_->ensure_bridge("nmbr13"));

  const Status bridge = links_->ensure_bridge("nmbr12");
  EXPECT_EQ(bridge.code(), Code::kConflict) << bridge.to_string();
  EXPECT_TRUE(contains(bridge.message(), "'nmbr12'")) << bridge.message();
  const Status vxlan = links_->ensure_vxlan(
      {.name = "nmbr12", .vni = Vni::trusted(12), .underlay = "ul0", .bridge = "nmbr13"});
  EXPECT_EQ(vxlan.code(), Code::kConflict) << vxlan.to_string();
  const Status tap = links_->ensure_tap("nmbr12", "nmbr13");
  EXPECT_EQ(tap.code(), Code::kConflict) << tap.to_string();
  const Status tun = links_->ensure_tap("nmt12", "nmbr13");
  EXPECT_EQ(tun.code(), Code::kConflict) << tun.to_string();
  const Status not_a_bridge = links_->ensure_tap("nmt13", "nmbr12");
  EXPECT_EQ(not_a_bridge.code(), Code::kConflict) << not_a_bridge.to_string();

  const std::string veth = must("ip -d link show nmbr12");
  EXPECT_TRUE(contains(veth, "veth")) << veth;
  EXPECT_FALSE(contains(veth, "master")) << veth;
  EXPECT_FALSE(link("nmt13").has_value());
}

TEST_F(NetlinkLinksTest, RefusesBadNamesAndChangesNothing) {
  const Status long_name = links_->ensure_bridge("nmbr-much-too-long");
  EXPECT_EQ(long_name.code(), Code::kInvalidArgument) << long_name.to_string();
  EXPECT_EQ(links_->ensure_bridge("a/b").code(), Code::kInvalidArgument);
  EXPECT_EQ(links_->ensure_bridge("").code(), Code::kInvalidArgument);
  DhcpNamespaceConfig outside = dhcp_config(14);
  outside.address = ip("10.99.0.2");
  expect_ok(links_->ensure_bridge("nmbr14"));
  EXPECT_EQ(links_->ensure_dhcp_namespace(outside).code(), Code::kInvalidArgument);
  DhcpNamespaceConfig slash = dhcp_config(14);
  slash.netns = "../etc";
  EXPECT_EQ(links_->ensure_dhcp_namespace(slash).code(), Code::kInvalidArgument);
  EXPECT_TRUE(links_->list_netns()->empty());
  EXPECT_FALSE(link("nmdh14").has_value());
}

TEST_F(NetlinkLinksTest, VxlanHasItsVniLocalAddressPortAndBridge) {
  expect_ok(links_->ensure_bridge("nmbr20"));
  VxlanConfig config{.name = "nmvx20",
                     .vni = Vni::trusted(20),
                     .underlay = "ul0",
                     .dstport = 4789,
                     .bridge = "nmbr20"};
  expect_ok(links_->ensure_vxlan(config));

  const std::string shown = must("ip -d link show nmvx20");
  EXPECT_TRUE(contains(shown, "vxlan id 20 ")) << shown;
  EXPECT_TRUE(contains(shown, "local 192.0.2.1 ")) << shown;
  EXPECT_TRUE(contains(shown, "dev ul0 ")) << shown;
  EXPECT_TRUE(contains(shown, "dstport 4789 ")) << shown;
  EXPECT_TRUE(contains(shown, "master nmbr20 ")) << shown;
  EXPECT_TRUE(contains(shown, ",UP")) << shown;
  EXPECT_FALSE(contains(shown, "nolearning")) << shown;
  const auto info = link("nmvx20");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->kind, "vxlan");
  EXPECT_EQ(info->master, "nmbr20");
  EXPECT_TRUE(info->up);

  // As asked: nothing changes, the device is not recreated.
  const unsigned index = if_nametoindex("nmvx20");
  ASSERT_NE(index, 0U);
  expect_ok(links_->ensure_vxlan(config));
  EXPECT_EQ(if_nametoindex("nmvx20"), index);

  // Unplugged and downed behind our back: put back.
  must("ip link set nmvx20 nomaster && ip link set nmvx20 down");
  expect_ok(links_->ensure_vxlan(config));
  EXPECT_EQ(if_nametoindex("nmvx20"), index);
  EXPECT_EQ(link("nmvx20")->master, "nmbr20");
  EXPECT_TRUE(link("nmvx20")->up);

  // Another VNI and port: recreated with them, still on the bridge and up.
  config.vni = Vni::trusted(21);
  config.dstport = 8472;
  expect_ok(links_->ensure_vxlan(config));
  const std::string changed = must("ip -d link show nmvx20");
  EXPECT_TRUE(contains(changed, "vxlan id 21 ")) << changed;
  EXPECT_TRUE(contains(changed, "dstport 8472 ")) << changed;
  EXPECT_TRUE(contains(changed, "master nmbr20 ")) << changed;
  EXPECT_TRUE(contains(changed, ",UP")) << changed;
  EXPECT_EQ(lines_of(must("ip -o link show type vxlan")).size(), 1U);
}

TEST_F(NetlinkLinksTest, VxlanNeedsAnExistingUnderlayAndBridge) {
  expect_ok(links_->ensure_bridge("nmbr22"));
  const Status no_underlay = links_->ensure_vxlan(
      {.name = "nmvx22", .vni = Vni::trusted(22), .underlay = "nope0", .bridge = "nmbr22"});
  EXPECT_EQ(no_underlay.code(), Code::kNotFound) << no_underlay.to_string();
  EXPECT_TRUE(contains(no_underlay.message(), "'nope0'")) << no_underlay.message();
  const Status no_bridge = links_->ensure_vxlan(
      {.name = "nmvx22", .vni = Vni::trusted(22), .underlay = "ul0", .bridge = "nmbr99"});
  EXPECT_EQ(no_bridge.code(), Code::kNotFound) << no_bridge.to_string();
  EXPECT_TRUE(contains(no_bridge.message(), "'nmbr99'")) << no_bridge.message();
  must("ip link add ul1 type veth peer name ul1p");
  const Status no_address = links_->ensure_vxlan(
      {.name = "nmvx22", .vni = Vni::trusted(22), .underlay = "ul1", .bridge = "nmbr22"});
  EXPECT_EQ(no_address.code(), Code::kUnavailable) << no_address.to_string();
  EXPECT_FALSE(link("nmvx22").has_value());
}

TEST_F(NetlinkLinksTest, FloodPeersAreExactlyTheGivenSet) {
  expect_ok(links_->ensure_bridge("nmbr30"));
  expect_ok(links_->ensure_vxlan(
      {.name = "nmvx30", .vni = Vni::trusted(30), .underlay = "ul0", .bridge = "nmbr30"}));

  const auto expect_peers = [&](const std::set<std::string>& want) {
    EXPECT_EQ(zero_mac_destinations("nmvx30"), want);
    auto read = links_->flood_peers("nmvx30");
    ASSERT_TRUE(read.is_ok()) << read.status().to_string();
    EXPECT_EQ(as_strings(*read), want);
  };

  expect_ok(links_->set_flood_peers("nmvx30", {ip("198.51.100.1"), ip("198.51.100.2")}));
  expect_peers({"198.51.100.1", "198.51.100.2"});
  expect_ok(links_->set_flood_peers("nmvx30", {ip("198.51.100.1"), ip("198.51.100.2")}));
  expect_peers({"198.51.100.1", "198.51.100.2"});

  expect_ok(links_->set_flood_peers("nmvx30", {ip("198.51.100.3"), ip("198.51.100.2")}));
  expect_peers({"198.51.100.2", "198.51.100.3"});

  // One added behind our back goes; duplicates in the request count once.
  must("bridge fdb append 00:00:00:00:00:00 dev nmvx30 dst 198.51.100.9 self permanent");
  expect_ok(links_->set_flood_peers("nmvx30", {ip("198.51.100.3"), ip("198.51.100.3")}));
  expect_peers({"198.51.100.3"});

  expect_ok(links_->set_flood_peers("nmvx30", {}));
  expect_peers({});

  EXPECT_EQ(links_->flood_peers("nmvx31").status().code(), Code::kNotFound);
  EXPECT_EQ(links_->set_flood_peers("nmbr30", {}).code(), Code::kConflict);
}

TEST_F(NetlinkLinksTest, EnsureTapMakesAPersistentTapOnTheBridge) {
  expect_ok(links_->ensure_bridge("nmbr40"));
  expect_ok(links_->ensure_tap("nmt40", "nmbr40"));
  const unsigned index = if_nametoindex("nmt40");
  expect_ok(links_->ensure_tap("nmt40", "nmbr40"));
  EXPECT_EQ(if_nametoindex("nmt40"), index);

  const std::string shown = must("ip -d link show nmt40");
  EXPECT_TRUE(contains(shown, "tun type tap")) << shown;
  EXPECT_TRUE(contains(shown, "persist on")) << shown;
  EXPECT_TRUE(contains(shown, "master nmbr40 ")) << shown;
  EXPECT_TRUE(contains(shown, ",UP")) << shown;
  const auto info = link("nmt40");
  ASSERT_TRUE(info.has_value());
  EXPECT_EQ(info->kind, "tun");
  EXPECT_EQ(info->master, "nmbr40");
  EXPECT_TRUE(info->up);

  must("ip link set nmt40 nomaster");
  expect_ok(links_->ensure_tap("nmt40", "nmbr40"));
  EXPECT_EQ(link("nmt40")->master, "nmbr40");
  EXPECT_EQ(links_->ensure_tap("nmt41", "nmbr41").code(), Code::kNotFound);
}

TEST_F(NetlinkLinksTest, DhcpNamespaceHoldsTheAddressAndIsReachableOverTheBridge) {
  const DhcpNamespaceConfig config = dhcp_config(50);
  expect_ok(links_->ensure_bridge("nmbr50"));
  expect_ok(links_->ensure_dhcp_namespace(config));

  auto namespaces = links_->list_netns();
  ASSERT_TRUE(namespaces.is_ok()) << namespaces.status().to_string();
  EXPECT_EQ(*namespaces, std::vector<std::string>{"nm-dhcp-50"});
  const CommandResult inner = sh("ip netns exec nm-dhcp-50 ip -4 -o addr show dev dhcp0");
  ASSERT_EQ(inner.exit_code, 0) << inner.output;
  ASSERT_EQ(lines_of(inner.output).size(), 1U) << inner.output;
  EXPECT_TRUE(contains(inner.output, "inet 10.50.0.2/24 brd 10.50.0.255")) << inner.output;
  EXPECT_TRUE(contains(must("ip netns exec nm-dhcp-50 ip link show dhcp0"), ",UP"));
  EXPECT_TRUE(contains(must("ip netns exec nm-dhcp-50 ip link show lo"), ",UP"));

  const auto host = link("nmdh50");
  ASSERT_TRUE(host.has_value());
  EXPECT_EQ(host->kind, "veth");
  EXPECT_EQ(host->master, "nmbr50");
  EXPECT_TRUE(host->up);
  EXPECT_EQ(read_text("/proc/sys/net/ipv6/conf/nmdh50/disable_ipv6"), "1\n");
  EXPECT_EQ(must("ip -4 addr show dev nmdh50"), "");
  EXPECT_EQ(must("ip -6 addr show dev nmdh50"), "");
  EXPECT_FALSE(link("dhcp0").has_value());  // the inner end is not in the host namespace

  add_vm("vm50", "nmbr50", "10.50.0.10/24");
  EXPECT_TRUE(pings("vm50", "10.50.0.2"));
}

TEST_F(NetlinkLinksTest, DhcpNamespaceEnsureIsIdempotentAndRepairsWhatDiffers) {
  const DhcpNamespaceConfig config = dhcp_config(51);
  expect_ok(links_->ensure_bridge("nmbr51"));
  expect_ok(links_->ensure_dhcp_namespace(config));
  const unsigned host_index = if_nametoindex("nmdh51");
  const std::string inner_before = must("ip -n nm-dhcp-51 -o link show dhcp0");

  expect_ok(links_->ensure_dhcp_namespace(config));
  EXPECT_EQ(if_nametoindex("nmdh51"), host_index);
  EXPECT_EQ(must("ip -n nm-dhcp-51 -o link show dhcp0").substr(0, 3), inner_before.substr(0, 3));
  EXPECT_EQ(lines_of(must("ip -n nm-dhcp-51 -4 -o addr show dev dhcp0")).size(), 1U);

  must("ip -n nm-dhcp-51 addr flush dev dhcp0");
  must("ip -n nm-dhcp-51 addr add 10.51.0.99/24 dev dhcp0");
  must("ip -n nm-dhcp-51 link set lo down");
  must("ip link set nmdh51 nomaster && ip addr add 10.51.0.77/24 dev nmdh51");
  expect_ok(links_->ensure_dhcp_namespace(config));

  EXPECT_EQ(if_nametoindex("nmdh51"), host_index);
  const auto inner = lines_of(must("ip -n nm-dhcp-51 -4 -o addr show dev dhcp0"));
  ASSERT_EQ(inner.size(), 1U);
  EXPECT_TRUE(contains(inner[0], "inet 10.51.0.2/24")) << inner[0];
  EXPECT_TRUE(contains(must("ip -n nm-dhcp-51 link show lo"), ",UP"));
  EXPECT_EQ(link("nmdh51")->master, "nmbr51");
  EXPECT_EQ(must("ip -4 addr show dev nmdh51"), "");
}

TEST_F(NetlinkLinksTest, DhcpNamespaceReplacesHalfPairsAndStaleFiles) {
  const DhcpNamespaceConfig config = dhcp_config(52);
  expect_ok(links_->ensure_bridge("nmbr52"));
  // A host end whose peer is in the host namespace, and a namespace file that is not bound.
  must("ip link add nmdh52 type veth peer name stray52");
  must("touch /run/netns/nm-dhcp-52");
  expect_ok(links_->ensure_dhcp_namespace(config));

  EXPECT_FALSE(link("stray52").has_value());
  EXPECT_EQ(link("nmdh52")->master, "nmbr52");
  EXPECT_TRUE(
      contains(must("ip netns exec nm-dhcp-52 ip -4 -o addr show dev dhcp0"), "inet 10.52.0.2/24"));

  // The inner end deleted behind our back takes the host end with it; both come back.
  must("ip -n nm-dhcp-52 link del dhcp0");
  EXPECT_FALSE(link("nmdh52").has_value());
  expect_ok(links_->ensure_dhcp_namespace(config));
  EXPECT_EQ(link("nmdh52")->master, "nmbr52");
  EXPECT_TRUE(contains(must("ip -n nm-dhcp-52 -4 -o addr show dev dhcp0"), "inet 10.52.0.2/24"));
}

TEST_F(NetlinkLinksTest, TwoDhcpNamespacesUseTheSameInnerName) {
  expect_ok(links_->ensure_bridge("nmbr53"));
  expect_ok(links_->ensure_bridge("nmbr54"));
  expect_ok(links_->ensure_dhcp_namespace(dhcp_config(53)));
  expect_ok(links_->ensure_dhcp_namespace(dhcp_config(54)));

  EXPECT_TRUE(contains(must("ip -n nm-dhcp-53 -4 -o addr show dev dhcp0"), "inet 10.53.0.2/24"));
  EXPECT_TRUE(contains(must("ip -n nm-dhcp-54 -4 -o addr show dev dhcp0"), "inet 10.54.0.2/24"));
  EXPECT_EQ(link("nmdh53")->master, "nmbr53");
  EXPECT_EQ(link("nmdh54")->master, "nmbr54");
  EXPECT_EQ(*links_->list_netns(), (std::vector<std::string>{"nm-dhcp-53", "nm-dhcp-54"}));
}

TEST_F(NetlinkLinksTest, DeleteNetnsRemovesTheNamespaceAndTheHostEnd) {
  const DhcpNamespaceConfig config = dhcp_config(55);
  expect_ok(links_->ensure_bridge("nmbr55"));
  expect_ok(links_->ensure_dhcp_namespace(config));
  add_vm("vm55", "nmbr55", "10.55.0.10/24");
  ASSERT_TRUE(pings("vm55", "10.55.0.2"));

  expect_ok(links_->delete_netns("nm-dhcp-55"));

  EXPECT_FALSE(link("nmdh55").has_value());
  EXPECT_EQ(*links_->list_netns(), std::vector<std::string>{"vm55"});
  EXPECT_NE(sh("ip netns exec nm-dhcp-55 true").exit_code, 0);
  EXPECT_NE(sh("test -e /run/netns/nm-dhcp-55").exit_code, 0);
  EXPECT_FALSE(contains(must("ip netns list"), "nm-dhcp-55"));
  EXPECT_NE(sh("ip netns exec vm55 busybox ping -c1 -W1 10.55.0.2").exit_code, 0);
  expect_ok(links_->delete_netns("nm-dhcp-55"));  // already gone
}

TEST_F(NetlinkLinksTest, DeleteLinkRemovesItAndIsOkWhenAbsent) {
  expect_ok(links_->ensure_bridge("nmbr60"));
  expect_ok(links_->delete_link("nmbr60"));
  EXPECT_FALSE(link("nmbr60").has_value());
  expect_ok(links_->delete_link("nmbr60"));
  EXPECT_EQ(links_->addresses("nmbr60").status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace nm::network
