// Network spec parsing (one test per rule, each naming the field), canonical form, the rules
// against existing networks, reserved addresses and address allocation.
#include "nm/network/network_spec.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace nm::network {
namespace {

using json = nlohmann::json;

json minimal() {
  return {{"name", "blue"}, {"tenant", "contoso"}, {"vni", 4097}, {"subnet", "10.10.0.0/24"}};
}

json full() {
  json j = minimal();
  j["version"] = 1;
  j["peers"] = json::array({"192.168.50.2", "192.168.50.3"});
  return j;
}

// The minimal spec with `key` set to `value`.
std::string with(const std::string& key, const json& value) {
  json j = minimal();
  j[key] = value;
  return j.dump();
}

// The minimal spec without `key`.
std::string without(const std::string& key) {
  json j = minimal();
  j.erase(key);
  return j.dump();
}

// Asserts that `text` is refused with InvalidArgument and a message that starts with `field`
// followed by ':' (and, when given, contains `words`).
void expect_refused(const std::string& text, const std::string& field,
                    const std::string& words = "") {
  auto r = parse_network_spec(text);
  ASSERT_FALSE(r.is_ok()) << "accepted: " << text;
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().to_string();
  const std::string msg = r.status().message();
  EXPECT_TRUE(msg.starts_with(field + ":"))
      << "message '" << msg << "' should start with '" << field << ":'";
  if (!words.empty()) {
    EXPECT_NE(msg.find(words), std::string::npos)
        << "message '" << msg << "' lacks '" << words << "'";
  }
}

Ipv4Address ip(const char* text) {
  return *Ipv4Address::parse(text, "test");
}

Ipv4Cidr subnet(const char* text) {
  return *Ipv4Cidr::parse(text, "test");
}

NetworkSpec spec(const std::string& name, const std::string& tenant, uint32_t vni,
                 const char* cidr) {
  return NetworkSpec{.name = NetworkName::trusted(name),
                     .tenant = TenantId::trusted(tenant),
                     .vni = Vni::trusted(vni),
                     .subnet = subnet(cidr),
                     .peers = {}};
}

TEST(ParseNetworkSpec, AcceptsTheMinimalSpec) {
  auto r = parse_network_spec(minimal().dump());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->name.str(), "blue");
  EXPECT_EQ(r->tenant.str(), "contoso");
  EXPECT_EQ(r->vni.value(), 4097U);
  EXPECT_EQ(r->subnet.str(), "10.10.0.0/24");
  EXPECT_TRUE(r->peers.empty());
}

TEST(ParseNetworkSpec, AcceptsTheFullSpecKeepingPeerOrder) {
  json j = full();
  j["peers"] = json::array({"192.168.50.3", "192.168.50.2"});
  auto r = parse_network_spec(j.dump());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_EQ(r->peers.size(), 2U);
  EXPECT_EQ(r->peers[0].str(), "192.168.50.3");
  EXPECT_EQ(r->peers[1].str(), "192.168.50.2");
}

TEST(ParseNetworkSpec, AcceptsTheBoundaries) {
  EXPECT_TRUE(parse_network_spec(with("vni", 1)).is_ok());
  EXPECT_TRUE(parse_network_spec(with("vni", 16777215)).is_ok());
  EXPECT_TRUE(parse_network_spec(with("subnet", "10.20.0.0/16")).is_ok());
  EXPECT_TRUE(parse_network_spec(with("subnet", "10.20.0.8/29")).is_ok());
  EXPECT_TRUE(parse_network_spec(with("subnet", "223.255.255.0/24")).is_ok());
  EXPECT_TRUE(parse_network_spec(with("subnet", "1.0.0.0/16")).is_ok());
  EXPECT_TRUE(parse_network_spec(with("peers", json::array())).is_ok());
  json peers = json::array();
  for (size_t i = 0; i < kMaxPeers; ++i) {
    peers.push_back("192.168." + std::to_string(i / 250) + "." + std::to_string(i % 250 + 1));
  }
  EXPECT_TRUE(parse_network_spec(with("peers", peers)).is_ok());
}

TEST(ParseNetworkSpec, RefusesUnknownFields) {
  expect_refused(with("vnid", 7), "spec.vnid", "unknown field");
  expect_refused(with("Subnet", "10.0.0.0/24"), "spec.Subnet", "unknown field");
}

TEST(ParseNetworkSpec, RefusesDuplicateFields) {
  expect_refused(R"({"name":"blue","tenant":"contoso","vni":1,"vni":2,"subnet":"10.0.0.0/24"})",
                 "spec.vni", "appears more than once");
  expect_refused(
      R"({"name":"blue","tenant":"contoso","vni":1,"subnet":"10.0.0.0/24","peers":[{"a":1,"a":2}]})",
      "spec.peers", "appears more than once");
}

TEST(ParseNetworkSpec, RequiresNameTenantVniAndSubnet) {
  for (const std::string field : {"name", "tenant", "vni", "subnet"}) {
    expect_refused(without(field), "spec." + field, "is required");
  }
}

TEST(ParseNetworkSpec, VersionMustBeOne) {
  expect_refused(with("version", 2), "spec.version", "must be 1");
  expect_refused(with("version", 0), "spec.version", "must be 1");
  expect_refused(with("version", "1"), "spec.version", "must be 1");
  expect_refused(with("version", 1.0), "spec.version", "must be 1");
  expect_refused(with("version", true), "spec.version", "must be 1");
  EXPECT_TRUE(parse_network_spec(with("version", 1)).is_ok());
}

TEST(ParseNetworkSpec, NameAndTenantFollowTheNameRule) {
  expect_refused(with("name", "Blue"), "spec.name", "'Blue' must match");
  expect_refused(with("name", "-blue"), "spec.name", "must match");
  expect_refused(with("name", ""), "spec.name", "must match");
  expect_refused(with("name", std::string(64, 'a')), "spec.name", "must match");
  expect_refused(with("name", 7), "spec.name", "must be a string, got an integer");
  expect_refused(with("name", std::string("bl\0ue", 5)), "spec.name", "control characters");
  expect_refused(with("tenant", "Contoso"), "spec.tenant", "'Contoso' must match");
  expect_refused(with("tenant", nullptr), "spec.tenant", "must be a string, got null");
  expect_refused(with("tenant", "con\ttoso"), "spec.tenant", "control characters");
}

TEST(ParseNetworkSpec, VniIsAnIntegerInRangeWithoutCoercion) {
  expect_refused(with("vni", 0), "spec.vni", "must be between 1 and 16777215, got 0");
  expect_refused(with("vni", 16777216), "spec.vni", "must be between 1 and 16777215, got 16777216");
  expect_refused(with("vni", -5), "spec.vni", "got -5");
  expect_refused(with("vni", "4097"), "spec.vni", "must be an integer, got a string");
  expect_refused(with("vni", 4097.0), "spec.vni",
                 "must be an integer, got a number with a fraction or exponent");
  expect_refused(with("vni", true), "spec.vni", "must be an integer, got a boolean");
  expect_refused(R"({"name":"blue","tenant":"contoso","vni":1e3,"subnet":"10.0.0.0/24"})",
                 "spec.vni", "must be an integer");
  expect_refused(
      R"({"name":"blue","tenant":"contoso","vni":99999999999999999999999,"subnet":"10.0.0.0/24"})",
      "spec.vni");
}

TEST(ParseNetworkSpec, SubnetIsACanonicalCidrString) {
  expect_refused(with("subnet", 42), "spec.subnet", "must be a string, got an integer");
  expect_refused(with("subnet", "10.10.0.0"), "spec.subnet", "is not an IPv4 subnet");
  expect_refused(with("subnet", "10.10.0.0/24 "), "spec.subnet", "is not an IPv4 subnet");
  expect_refused(with("subnet", "010.10.0.0/24"), "spec.subnet", "is not an IPv4 subnet");
  expect_refused(with("subnet", "10.10.0.1/24"), "spec.subnet", "host bits must be zero");
}

TEST(ParseNetworkSpec, SubnetPrefixIsBetween16And29) {
  expect_refused(with("subnet", "10.0.0.0/8"), "spec.subnet",
                 "prefix length must be between /16 and /29, got /8");
  expect_refused(with("subnet", "10.0.0.0/15"), "spec.subnet", "got /15");
  expect_refused(with("subnet", "10.0.0.0/30"), "spec.subnet", "got /30");
  expect_refused(with("subnet", "10.0.0.7/32"), "spec.subnet", "got /32");
}

TEST(ParseNetworkSpec, SubnetMustNotUseReservedAddressSpace) {
  expect_refused(with("subnet", "0.1.0.0/24"), "spec.subnet", "reserved range 0.0.0.0/8");
  expect_refused(with("subnet", "127.0.0.0/24"), "spec.subnet", "reserved range 127.0.0.0/8");
  expect_refused(with("subnet", "169.254.0.0/16"), "spec.subnet", "reserved range 169.254.0.0/16");
  expect_refused(with("subnet", "224.0.0.0/24"), "spec.subnet", "reserved range 224.0.0.0/3");
  expect_refused(with("subnet", "239.1.0.0/16"), "spec.subnet", "reserved range 224.0.0.0/3");
  expect_refused(with("subnet", "255.255.255.0/24"), "spec.subnet", "reserved range 224.0.0.0/3");
}

TEST(ParseNetworkSpec, PeersAreAnArrayOfAddressStrings) {
  expect_refused(with("peers", "192.168.50.2"), "spec.peers", "must be an array, got a string");
  expect_refused(with("peers", json::array({"192.168.50.2", 7})), "spec.peers[1]",
                 "must be a string, got an integer");
  expect_refused(with("peers", json::array({"192.168.050.2"})), "spec.peers[0]",
                 "'192.168.050.2' is not a dotted-quad IPv4 address");
  expect_refused(with("peers", json::array({"192.168.50.2/32"})), "spec.peers[0]",
                 "is not a dotted-quad");
}

TEST(ParseNetworkSpec, PeersMustBeUnicastUnderlayAddresses) {
  expect_refused(with("peers", json::array({"0.0.0.0"})), "spec.peers[0]", "0.0.0.0/8");
  expect_refused(with("peers", json::array({"127.0.0.1"})), "spec.peers[0]", "127.0.0.0/8");
  expect_refused(with("peers", json::array({"239.1.1.1"})), "spec.peers[0]",
                 "224.0.0.0/4, multicast");
  expect_refused(with("peers", json::array({"255.255.255.255"})), "spec.peers[0]",
                 "240.0.0.0/4, reserved or broadcast");
  expect_refused(with("peers", json::array({"192.168.50.2", "10.10.0.9"})), "spec.peers[1]",
                 "'10.10.0.9' is inside the network's own subnet '10.10.0.0/24'");
}

TEST(ParseNetworkSpec, PeersHaveNoDuplicates) {
  expect_refused(with("peers", json::array({"192.168.50.2", "192.168.50.3", "192.168.50.2"})),
                 "spec.peers[2]", "'192.168.50.2' is listed twice");
}

TEST(ParseNetworkSpec, PeersAreLimited) {
  json peers = json::array();
  for (size_t i = 0; i <= kMaxPeers; ++i) {
    peers.push_back("192.168." + std::to_string(i / 250) + "." + std::to_string(i % 250 + 1));
  }
  expect_refused(with("peers", peers), "spec.peers", "must list at most 256 peers, got 257");
}

TEST(ParseNetworkSpec, DocumentMustBeAnObjectOfBoundedSize) {
  expect_refused("[1, 2]", "spec", "must be a JSON object, got an array");
  expect_refused("\"blue\"", "spec", "must be a JSON object, got a string");
  expect_refused(R"({"name": "blue",)", "spec", "malformed JSON");
  expect_refused("", "spec", "malformed JSON");
  std::string big = minimal().dump();
  big.insert(1, std::string(70000, ' '));
  expect_refused(big, "spec",
                 "document is " + std::to_string(big.size()) + " bytes, the limit is 65536");
}

TEST(NetworkSpecJson, RoundTripsThroughTheCanonicalForm) {
  for (const json& doc : {minimal(), full()}) {
    auto first = parse_network_spec(doc.dump());
    ASSERT_TRUE(first.is_ok()) << first.status().to_string();
    const std::string canonical = network_spec_to_json(*first);
    auto second = parse_network_spec(canonical);
    ASSERT_TRUE(second.is_ok()) << second.status().to_string() << "\n" << canonical;
    EXPECT_EQ(*second, *first);
    EXPECT_EQ(network_spec_to_json(*second), canonical);
  }
}

TEST(NetworkSpecJson, IsCanonicalWithSortedKeysAndVersion) {
  auto r = parse_network_spec(full().dump(2));
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(network_spec_to_json(*r),
            R"({"name":"blue","peers":["192.168.50.2","192.168.50.3"],"subnet":"10.10.0.0/24",)"
            R"("tenant":"contoso","version":1,"vni":4097})");
  auto m = parse_network_spec(minimal().dump());
  ASSERT_TRUE(m.is_ok());
  EXPECT_EQ(network_spec_to_json(*m),
            R"({"name":"blue","subnet":"10.10.0.0/24","tenant":"contoso","version":1,"vni":4097})");
}

TEST(CheckAgainstExisting, AcceptsANewNetwork) {
  const std::vector<NetworkSpec> existing = {spec("red", "contoso", 10, "10.0.0.0/24"),
                                             spec("green", "fabrikam", 11, "10.10.0.0/24")};
  EXPECT_TRUE(check_against_existing(spec("blue", "contoso", 12, "10.1.0.0/24"), existing).is_ok());
  EXPECT_TRUE(check_against_existing(spec("blue", "contoso", 12, "10.1.0.0/24"), {}).is_ok());
}

TEST(CheckAgainstExisting, RefusesATakenName) {
  const std::vector<NetworkSpec> existing = {spec("blue", "fabrikam", 10, "10.0.0.0/24")};
  const Status s = check_against_existing(spec("blue", "contoso", 12, "10.1.0.0/24"), existing);
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.to_string();
  EXPECT_TRUE(s.message().starts_with("spec.name:")) << s.message();
  EXPECT_NE(s.message().find("'blue'"), std::string::npos) << s.message();
}

TEST(CheckAgainstExisting, RefusesATakenVniNamingItsHolder) {
  const std::vector<NetworkSpec> existing = {spec("red", "fabrikam", 4097, "10.0.0.0/24")};
  const Status s = check_against_existing(spec("blue", "contoso", 4097, "10.1.0.0/24"), existing);
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.to_string();
  EXPECT_EQ(s.message(), "spec.vni: 4097 is already used by network 'red'");
}

TEST(CheckAgainstExisting, RefusesOverlapWithinATenant) {
  const std::vector<NetworkSpec> existing = {spec("red", "contoso", 10, "10.0.0.0/16")};
  const Status s = check_against_existing(spec("blue", "contoso", 12, "10.0.5.0/24"), existing);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.to_string();
  EXPECT_TRUE(s.message().starts_with("spec.subnet:")) << s.message();
  EXPECT_NE(s.message().find("'10.0.5.0/24' overlaps '10.0.0.0/16' of network 'red'"),
            std::string::npos)
      << s.message();
}

TEST(CheckAgainstExisting, AllowsTheSameAddressSpaceForDifferentTenants) {
  const std::vector<NetworkSpec> existing = {spec("red", "fabrikam", 10, "10.0.0.0/24")};
  EXPECT_TRUE(check_against_existing(spec("blue", "contoso", 12, "10.0.0.0/24"), existing).is_ok());
}

TEST(ReservedAddresses, AreNetworkGatewayDhcpAndBroadcast) {
  const Ipv4Cidr s = subnet("10.10.0.0/24");
  EXPECT_EQ(gateway_address(s).str(), "10.10.0.1");
  EXPECT_EQ(dhcp_server_address(s).str(), "10.10.0.2");
  for (const char* a : {"10.10.0.0", "10.10.0.1", "10.10.0.2", "10.10.0.255"}) {
    EXPECT_TRUE(is_reserved_address(s, ip(a))) << a;
  }
  for (const char* a : {"10.10.0.3", "10.10.0.254", "10.10.1.1"}) {
    EXPECT_FALSE(is_reserved_address(s, ip(a))) << a;
  }
}

TEST(AllocateAddress, GivesTheLowestFreeNonReservedAddress) {
  const Ipv4Cidr s = subnet("10.10.0.0/24");
  auto a = allocate_address(s, {}, std::nullopt, "spec.networks[0].ip");
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  EXPECT_EQ(a->str(), "10.10.0.3");

  a = allocate_address(s, {ip("10.10.0.4"), ip("10.10.0.3"), ip("10.10.0.6")}, std::nullopt, "f");
  ASSERT_TRUE(a.is_ok());
  EXPECT_EQ(a->str(), "10.10.0.5");
}

TEST(AllocateAddress, IgnoresUsedAddressesOfOtherSubnetsAndDuplicates) {
  const Ipv4Cidr s = subnet("10.10.0.0/24");
  auto a =
      allocate_address(s, {ip("10.10.1.3"), ip("10.10.0.3"), ip("10.10.0.3")}, std::nullopt, "f");
  ASSERT_TRUE(a.is_ok());
  EXPECT_EQ(a->str(), "10.10.0.4");
}

TEST(AllocateAddress, HonoursAFreeFixedAddress) {
  auto a = allocate_address(subnet("10.10.0.0/24"), {ip("10.10.0.3")}, ip("10.10.0.200"), "f");
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  EXPECT_EQ(a->str(), "10.10.0.200");
}

TEST(AllocateAddress, RefusesAFixedAddressOutsideTheSubnet) {
  auto a = allocate_address(subnet("10.10.0.0/24"), {}, ip("10.10.1.5"), "spec.networks[0].ip");
  ASSERT_FALSE(a.is_ok());
  EXPECT_EQ(a.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(a.status().message(),
            "spec.networks[0].ip: '10.10.1.5' is outside the subnet '10.10.0.0/24'");
}

TEST(AllocateAddress, RefusesAReservedFixedAddress) {
  for (const char* reserved : {"10.10.0.0", "10.10.0.1", "10.10.0.2", "10.10.0.255"}) {
    auto a = allocate_address(subnet("10.10.0.0/24"), {}, ip(reserved), "spec.networks[1].ip");
    ASSERT_FALSE(a.is_ok()) << reserved;
    EXPECT_EQ(a.status().code(), Code::kInvalidArgument);
    EXPECT_TRUE(a.status().message().starts_with("spec.networks[1].ip: '" + std::string(reserved) +
                                                 "' is reserved"))
        << a.status().message();
  }
}

TEST(AllocateAddress, RefusesATakenFixedAddress) {
  auto a = allocate_address(subnet("10.10.0.0/24"), {ip("10.10.0.9")}, ip("10.10.0.9"),
                            "spec.networks[0].ip");
  ASSERT_FALSE(a.is_ok());
  EXPECT_EQ(a.status().code(), Code::kAlreadyExists);
  EXPECT_EQ(a.status().message(), "spec.networks[0].ip: '10.10.0.9' is already in use");
}

TEST(AllocateAddress, FillsASlash29WithFourVmsThenReportsCapacity) {
  const Ipv4Cidr s = subnet("10.10.0.8/29");
  std::vector<Ipv4Address> used;
  for (const char* expected : {"10.10.0.11", "10.10.0.12", "10.10.0.13", "10.10.0.14"}) {
    auto a = allocate_address(s, used, std::nullopt, "f");
    ASSERT_TRUE(a.is_ok()) << a.status().to_string();
    EXPECT_EQ(a->str(), expected);
    used.push_back(*a);
  }
  auto full = allocate_address(s, used, std::nullopt, "spec.networks[0]");
  ASSERT_FALSE(full.is_ok());
  EXPECT_EQ(full.status().code(), Code::kInsufficientCapacity);
  EXPECT_TRUE(full.status().message().starts_with("spec.networks[0]: subnet '10.10.0.8/29'"))
      << full.status().message();
}

TEST(AllocateAddress, IsFastForASlash16WithTensOfThousandsUsed) {
  const Ipv4Cidr s = subnet("10.20.0.0/16");
  std::vector<Ipv4Address> used;
  const uint32_t hole = 0x0a14fe01;  // 10.20.254.1
  for (uint32_t a = s.network().to_uint() + 3; a < s.broadcast().to_uint(); ++a) {
    if (a != hole) used.push_back(Ipv4Address::from_uint(a));
  }
  std::shuffle(used.begin(), used.end(), std::mt19937(42));
  const auto start = std::chrono::steady_clock::now();
  auto a = allocate_address(s, used, std::nullopt, "f");
  const auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(a.is_ok()) << a.status().to_string();
  EXPECT_EQ(a->str(), "10.20.254.1");
  // A quadratic scan of 65530 addresses takes seconds; sorting takes milliseconds.
  EXPECT_LT(elapsed, std::chrono::seconds(1));

  used.push_back(Ipv4Address::from_uint(hole));
  EXPECT_EQ(allocate_address(s, used, std::nullopt, "f").status().code(),
            Code::kInsufficientCapacity);
}

}  // namespace
}  // namespace nm::network
