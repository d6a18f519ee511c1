// TenantNetworks against the in-memory fakes: what it creates, that converged state is left
// alone, what reconcile() repairs and what it never touches.
#include "nm/network/tenant_networks.h"

#include <gtest/gtest.h>

#include "fakes/fake_network.h"
#include "nm/network/names.h"

namespace nm::network {
namespace {

using nm::testing::FakeDhcp;
using nm::testing::FakeFirewall;
using nm::testing::FakeLinks;

NetworkSpec net(const std::string& name, uint32_t vni, const std::string& subnet,
                std::vector<std::string> peers = {}) {
  NetworkSpec s;
  s.name = NetworkName::trusted(name);
  s.tenant = TenantId::trusted("contoso");
  s.vni = Vni::trusted(vni);
  s.subnet = Ipv4Cidr::parse(subnet, "subnet").value();
  for (const auto& p : peers) s.peers.push_back(Ipv4Address::parse(p, "peer").value());
  return s;
}

PortSpec port(const std::string& vm, const std::string& network, const std::string& ip) {
  PortSpec p;
  p.vm = VmId::trusted(vm);
  p.network = NetworkName::trusted(network);
  p.ifname = tap_name(p.vm, 0);
  p.mac = derive_vm_mac(p.vm, 0);
  p.ip = Ipv4Address::parse(ip, "ip").value();
  p.hostname = "vm";
  return p;
}

const std::string kVm1 = "11111111-1111-4111-8111-111111111111";
const std::string kVm2 = "22222222-2222-4222-8222-222222222222";

class TenantNetworksTest : public ::testing::Test {
 protected:
  TenantNetworks make(std::string underlay = "ul0") {
    return TenantNetworks(links_, fw_, dhcp_, NetworkOptions{.underlay = std::move(underlay)});
  }
  FakeLinks links_;
  FakeFirewall fw_;
  FakeDhcp dhcp_;
};

TEST_F(TenantNetworksTest, RealizeCreatesBridgeVxlanPeersDhcpAndRules) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24", {"192.0.2.2", "192.0.2.3"});
  const auto p1 = port(kVm1, "blue", "10.10.0.3");
  ASSERT_TRUE(tn.realize_network(blue, {p1}).is_ok());

  EXPECT_TRUE(links_.has("nmbr4097"));
  ASSERT_TRUE(links_.has("nmvx4097"));
  EXPECT_EQ(links_.links["nmvx4097"].vni, 4097U);
  EXPECT_EQ(links_.links["nmvx4097"].info.master, "nmbr4097");
  EXPECT_EQ(links_.links["nmvx4097"].peers.size(), 2U);
  EXPECT_TRUE(links_.netns.count("nm-dhcp-4097"));
  ASSERT_TRUE(dhcp_.servers.count("blue"));
  const auto& server = dhcp_.servers["blue"];
  EXPECT_EQ(server.server.str(), "10.10.0.2");
  ASSERT_EQ(server.hosts.size(), 1U);
  EXPECT_EQ(server.hosts[0].ip.str(), "10.10.0.3");
  EXPECT_EQ(server.hosts[0].mac, p1.mac);
  ASSERT_TRUE(fw_.table.has_value());
  EXPECT_NE(fw_.table->find(p1.ifname), std::string::npos);
}

TEST_F(TenantNetworksTest, RealizingTwiceChangesNothing) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24", {"192.0.2.2"});
  ASSERT_TRUE(tn.realize_network(blue, {port(kVm1, "blue", "10.10.0.3")}).is_ok());
  const int links_before = links_.mutations;
  const int dhcp_before = dhcp_.mutations;
  const int fw_before = fw_.applies;
  ASSERT_TRUE(tn.realize_network(blue, {port(kVm1, "blue", "10.10.0.3")}).is_ok());
  EXPECT_EQ(links_.mutations, links_before);
  EXPECT_EQ(dhcp_.mutations, dhcp_before);
  EXPECT_EQ(fw_.applies, fw_before);
}

TEST_F(TenantNetworksTest, PeersWithoutUnderlayAreRefused) {
  auto tn = make("");
  const Status s = tn.realize_network(net("blue", 7, "10.10.0.0/24", {"192.0.2.2"}), {});
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("spec.peers"), std::string::npos);
}

TEST_F(TenantNetworksTest, HostLocalNetworkHasNoVxlan) {
  auto tn = make("");
  ASSERT_TRUE(tn.realize_network(net("blue", 7, "10.10.0.0/24"), {}).is_ok());
  EXPECT_TRUE(links_.has("nmbr7"));
  EXPECT_FALSE(links_.has("nmvx7"));
}

TEST_F(TenantNetworksTest, RemoveDeletesExactlyWhatItMade) {
  auto tn = make();
  links_.links["br0"].info = {"br0", "bridge", true, std::nullopt};
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const auto green = net("green", 4098, "10.11.0.0/24");
  ASSERT_TRUE(tn.realize_network(blue, {}).is_ok());
  ASSERT_TRUE(tn.realize_network(green, {}).is_ok());
  ASSERT_TRUE(tn.remove_network(blue).is_ok());
  EXPECT_FALSE(links_.has("nmbr4097"));
  EXPECT_FALSE(links_.has("nmvx4097"));
  EXPECT_FALSE(links_.has("nmdh4097"));
  EXPECT_FALSE(links_.netns.count("nm-dhcp-4097"));
  EXPECT_FALSE(dhcp_.servers.count("blue"));
  EXPECT_TRUE(links_.has("nmbr4098"));
  EXPECT_TRUE(dhcp_.servers.count("green"));
  EXPECT_TRUE(links_.has("br0"));
  // Removing again is fine.
  EXPECT_TRUE(tn.remove_network(blue).is_ok());
}

TEST_F(TenantNetworksTest, AddPortInsertsElementsWithoutRewritingTheTable) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  ASSERT_TRUE(tn.realize_network(blue, {}).is_ok());
  const int full = fw_.full_applies;
  const auto p1 = port(kVm1, "blue", "10.10.0.3");
  ASSERT_TRUE(tn.add_port(blue, p1).is_ok());
  EXPECT_EQ(fw_.full_applies, full);
  EXPECT_NE(fw_.table->find(p1.ifname), std::string::npos);
  ASSERT_EQ(dhcp_.servers["blue"].hosts.size(), 1U);
  EXPECT_EQ(dhcp_.add_host_calls, 1);  // one lease added, not the network's whole list

  const auto p2 = port(kVm2, "blue", "10.10.0.4");
  ASSERT_TRUE(tn.add_port(blue, p2).is_ok());
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 2U);
  ASSERT_TRUE(tn.remove_port(blue, p1).is_ok());
  EXPECT_EQ(fw_.full_applies, full);
  ASSERT_EQ(dhcp_.servers["blue"].hosts.size(), 1U);
  EXPECT_EQ(dhcp_.servers["blue"].hosts[0].ip.str(), "10.10.0.4");
}

TEST_F(TenantNetworksTest, AddPortOnAFlushedTableRestoresTheWholeRuleset) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const auto p1 = port(kVm1, "blue", "10.10.0.3");
  ASSERT_TRUE(tn.realize_network(blue, {p1}).is_ok());
  fw_.table.reset();  // someone ran `nft delete table bridge nodemanager`
  const auto p2 = port(kVm2, "blue", "10.10.0.4");
  ASSERT_TRUE(tn.add_port(blue, p2).is_ok());
  ASSERT_TRUE(fw_.table.has_value());
  EXPECT_NE(fw_.table->find(p1.ifname), std::string::npos);
  EXPECT_NE(fw_.table->find(p2.ifname), std::string::npos);
}

TEST_F(TenantNetworksTest, ReconcileOnAConvergedHostRepairsNothing) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24", {"192.0.2.2"});
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3")};
  ASSERT_TRUE(tn.reconcile({blue}, ports).is_ok());
  const int links_before = links_.mutations;
  const int fw_before = fw_.applies;
  auto repairs = tn.reconcile({blue}, ports);
  ASSERT_TRUE(repairs.is_ok()) << repairs.status().message();
  EXPECT_TRUE(repairs->empty());
  EXPECT_EQ(links_.mutations, links_before);
  EXPECT_EQ(fw_.applies, fw_before);
}

TEST_F(TenantNetworksTest, ReconcileRecreatesWhatWasDeletedBehindOurBack) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24", {"192.0.2.2"});
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3")};
  ASSERT_TRUE(tn.reconcile({blue}, ports).is_ok());
  links_.links.erase("nmbr4097");
  links_.links["nmvx4097"].peers.clear();
  dhcp_.servers.clear();
  fw_.table.reset();

  auto repairs = tn.reconcile({blue}, ports);
  ASSERT_TRUE(repairs.is_ok());
  std::string all;
  for (const auto& r : *repairs) all += r.object + ": " + r.what + "\n";
  EXPECT_NE(all.find("bridge 'nmbr4097': was missing"), std::string::npos) << all;
  EXPECT_NE(all.find("flood peers differed"), std::string::npos) << all;
  EXPECT_NE(all.find("DHCP server of network 'blue'"), std::string::npos) << all;
  EXPECT_NE(all.find("nft table 'bridge nodemanager': was missing"), std::string::npos) << all;
  EXPECT_TRUE(links_.has("nmbr4097"));
  EXPECT_EQ(links_.links["nmvx4097"].peers.size(), 1U);
  EXPECT_TRUE(dhcp_.servers.count("blue"));
  EXPECT_NE(fw_.table->find(ports[0].ifname), std::string::npos);
}

TEST_F(TenantNetworksTest, ReconcilePutsRunningPortsBackOnARecreatedBridge) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3"),
                                       port(kVm2, "blue", "10.10.0.4")};
  ASSERT_TRUE(tn.reconcile({blue}, ports).is_ok());
  // VM 1 runs (libvirt made its tap); VM 2 does not. Then the bridge is deleted, which leaves the
  // tap without a master.
  links_.links[ports[0].ifname].info = {ports[0].ifname, "tun", true, std::nullopt};
  links_.links.erase("nmbr4097");
  auto repairs = tn.reconcile({blue}, ports);
  ASSERT_TRUE(repairs.is_ok());
  EXPECT_TRUE(links_.has("nmbr4097"));
  EXPECT_EQ(links_.links[ports[0].ifname].info.master, "nmbr4097");
  EXPECT_FALSE(links_.has(ports[1].ifname));  // nothing invented for a VM that is not running
  std::string all;
  for (const auto& r : *repairs) all += r.object + ": " + r.what + "\n";
  EXPECT_NE(all.find("port '" + ports[0].ifname + "': was not on bridge 'nmbr4097'"),
            std::string::npos)
      << all;
}

TEST_F(TenantNetworksTest, ReconcileRestoresATamperedTable) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3")};
  ASSERT_TRUE(tn.reconcile({blue}, ports).is_ok());
  const std::string good = *fw_.table;
  *fw_.table += "flush chain bridge nodemanager prerouting\n";
  auto repairs = tn.reconcile({blue}, ports);
  ASSERT_TRUE(repairs.is_ok());
  ASSERT_EQ(repairs->size(), 1U);
  EXPECT_EQ(repairs->front().what, "was changed outside nodemanager; restored");
  EXPECT_EQ(*fw_.table, good);
}

TEST_F(TenantNetworksTest, ReconcileRemovesOurLeftoversAndNeverTouchesOthers) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3")};
  links_.links["nmbr9"].info = {"nmbr9", "bridge", true, std::nullopt};
  links_.links["nmvx9"].info = {"nmvx9", "vxlan", true, std::string("nmbr9")};
  links_.links["nmt0123456789ab"].info = {"nmt0123456789ab", "tun", true, std::nullopt};
  links_.links["virbr0"].info = {"virbr0", "bridge", true, std::nullopt};
  links_.links["eth0"].info = {"eth0", "", true, std::nullopt};
  links_.links["vnet3"].info = {"vnet3", "tun", true, std::nullopt};
  links_.netns.insert("nm-dhcp-9");
  links_.netns.insert("someone-else");
  network::DhcpServerConfig gone;
  gone.key = "gone";
  ASSERT_TRUE(dhcp_.ensure(gone).is_ok());

  auto repairs = tn.reconcile({blue}, ports);
  ASSERT_TRUE(repairs.is_ok());
  EXPECT_FALSE(links_.has("nmbr9"));
  EXPECT_FALSE(links_.has("nmvx9"));
  // A tap belongs to a domain (the VM reconciler's orphan policy decides); the firewall drops an
  // unknown nmt* tap meanwhile.
  EXPECT_TRUE(links_.has("nmt0123456789ab"));
  EXPECT_FALSE(links_.netns.count("nm-dhcp-9"));
  EXPECT_FALSE(dhcp_.servers.count("gone"));
  EXPECT_TRUE(links_.has("virbr0"));
  EXPECT_TRUE(links_.has("eth0"));
  EXPECT_TRUE(links_.has("vnet3"));
  EXPECT_TRUE(links_.netns.count("someone-else"));
  EXPECT_TRUE(links_.has("nmbr4097"));
}

TEST_F(TenantNetworksTest, ANodeWithoutNetworksGetsNoTable) {
  auto tn = make();
  auto repairs = tn.reconcile({}, {});
  ASSERT_TRUE(repairs.is_ok());
  EXPECT_FALSE(fw_.table.has_value());
  EXPECT_EQ(fw_.applies, 0);
}

TEST_F(TenantNetworksTest, ConcurrentPortsOfOneNetworkKeepEachOthersLeases) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  ASSERT_TRUE(tn.realize_network(blue, {}).is_ok());
  ASSERT_TRUE(tn.add_port(blue, port(kVm1, "blue", "10.10.0.3")).is_ok());
  ASSERT_TRUE(tn.add_port(blue, port(kVm2, "blue", "10.10.0.4")).is_ok());
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 2U);
}

TEST_F(TenantNetworksTest, ABrokenNetworkDoesNotKeepTheFirewallOrOtherNetworksFromBeingRepaired) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const auto red = net("red", 4098, "10.11.0.0/24");
  const std::vector<PortSpec> ports = {port(kVm1, "blue", "10.10.0.3")};
  ASSERT_TRUE(tn.reconcile({blue, red}, ports).is_ok());
  fw_.table.reset();
  links_.links.erase("nmbr4097");
  links_.links.erase("nmvx4098");
  links_.fail_names.insert("nmvx4098");

  auto repairs = tn.reconcile({blue, red}, ports);
  ASSERT_TRUE(repairs.is_ok());
  ASSERT_TRUE(fw_.table.has_value());
  EXPECT_NE(fw_.table->find(ports[0].ifname), std::string::npos);
  EXPECT_TRUE(links_.has("nmbr4097"));
  bool red_failed = false;
  for (const auto& r : *repairs) {
    if (r.failed) {
      EXPECT_EQ(r.network, "red") << r.object << " " << r.what;
      red_failed = true;
    }
  }
  EXPECT_TRUE(red_failed);
}

TEST_F(TenantNetworksTest, APortAddedAfterAFailedReconcileStillGetsItsRules) {
  // Start-up after a reboot: one network cannot be built, and the first VM of another one is
  // started. Its port must not be taken as already applied.
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  const auto red = net("red", 4098, "10.11.0.0/24");
  const auto p1 = port(kVm1, "blue", "10.10.0.3");
  links_.fail_names.insert("nmvx4098");
  fw_.fail_apply = true;  // the first full apply fails too
  auto repairs = tn.reconcile({blue, red}, {p1});
  ASSERT_TRUE(repairs.is_ok());
  EXPECT_FALSE(fw_.table.has_value());
  fw_.fail_apply = false;
  ASSERT_TRUE(tn.add_port(blue, p1).is_ok());
  ASSERT_TRUE(fw_.table.has_value());
  EXPECT_NE(fw_.table->find(p1.ifname), std::string::npos);
}

TEST_F(TenantNetworksTest, AddPortBuildsANetworkWhoseOwnJobHasNotRunYet) {
  auto tn = make();
  const auto blue = net("blue", 4097, "10.10.0.0/24");
  ASSERT_TRUE(tn.add_port(blue, port(kVm1, "blue", "10.10.0.3")).is_ok());
  EXPECT_TRUE(links_.has("nmbr4097"));
  EXPECT_TRUE(links_.netns.count("nm-dhcp-4097"));
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 1U);
}

TEST_F(TenantNetworksTest, ReconcileReportsAnUnreadableHost) {
  auto tn = make();
  links_.fail_list = true;
  auto repairs = tn.reconcile({net("blue", 4097, "10.10.0.0/24")}, {});
  EXPECT_EQ(repairs.status().code(), Code::kUnavailable);
}

}  // namespace
}  // namespace nm::network
