// Address value types (IPv4, subnets, MACs, VNIs), VM MAC derivation and kernel object names.
#include "nm/network/addr.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "nm/network/names.h"

namespace nm::network {
namespace {

const VmId kVm = VmId::trusted("3f1c0a2b-1234-4abc-8def-0123456789ab");

// Asserts InvalidArgument with a message starting "<field>:" and containing `words`.
void expect_invalid(const Status& s, const std::string& field, const std::string& words = "") {
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.to_string();
  EXPECT_TRUE(s.message().starts_with(field + ":")) << s.message();
  if (!words.empty()) {
    EXPECT_NE(s.message().find(words), std::string::npos) << s.message();
  }
}

TEST(Ipv4Address, ParsesDottedQuadAndFormatsItBack) {
  for (const std::string text : {"0.0.0.0", "10.0.0.1", "192.168.50.2", "255.255.255.255"}) {
    auto a = Ipv4Address::parse(text, "ip");
    ASSERT_TRUE(a.is_ok()) << text << ": " << a.status().to_string();
    EXPECT_EQ(a->str(), text);
  }
  EXPECT_EQ(Ipv4Address::parse("10.0.0.1", "ip")->to_uint(), 0x0a000001U);
  EXPECT_EQ(Ipv4Address::from_uint(0xc0a83202).str(), "192.168.50.2");
}

TEST(Ipv4Address, RefusesEverythingButStrictDottedQuad) {
  for (const std::string text :
       {"", "10.0.0", "10.0.0.1.2", "10.0.0.256", "010.0.0.1", "10.0.0.01", "10.0.0.1 ",
        " 10.0.0.1", "10..0.1", "10.0.0.", ".10.0.0.1", "+1.0.0.1", "-1.0.0.1", "0x0a.0.0.1",
        "10.0.0.1/24", "1000.0.0.1", "ten.0.0.1", "4294967295"}) {
    auto a = Ipv4Address::parse(text, "spec.peers[0]");
    ASSERT_FALSE(a.is_ok()) << "accepted '" << text << "'";
    expect_invalid(a.status(), "spec.peers[0]", "'" + text + "' is not a dotted-quad");
  }
}

TEST(Ipv4Address, ControlCharactersInInputAreEscapedInTheMessage) {
  auto a = Ipv4Address::parse(std::string("10.0\n.0.1", 9), "ip");
  ASSERT_FALSE(a.is_ok());
  EXPECT_NE(a.status().message().find("'10.0\\x0a.0.1'"), std::string::npos)
      << a.status().message();
}

TEST(Ipv4Address, OrdersNumerically) {
  EXPECT_LT(*Ipv4Address::parse("10.0.0.9", "a"), *Ipv4Address::parse("10.0.0.10", "a"));
  EXPECT_LT(*Ipv4Address::parse("9.255.255.255", "a"), *Ipv4Address::parse("10.0.0.0", "a"));
}

TEST(Ipv4Cidr, ParsesCanonicalSubnets) {
  auto c = Ipv4Cidr::parse("10.1.0.0/24", "spec.subnet");
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  EXPECT_EQ(c->network().str(), "10.1.0.0");
  EXPECT_EQ(c->prefix(), 24);
  EXPECT_EQ(c->mask(), 0xffffff00U);
  EXPECT_EQ(c->broadcast().str(), "10.1.0.255");
  EXPECT_EQ(c->size(), 256U);
  EXPECT_EQ(c->str(), "10.1.0.0/24");
}

TEST(Ipv4Cidr, HandlesPrefixZeroAndThirtyTwo) {
  auto all = Ipv4Cidr::parse("0.0.0.0/0", "s");
  ASSERT_TRUE(all.is_ok());
  EXPECT_EQ(all->mask(), 0U);
  EXPECT_EQ(all->size(), uint64_t{1} << 32);
  EXPECT_EQ(all->broadcast().str(), "255.255.255.255");
  EXPECT_TRUE(all->contains(*Ipv4Address::parse("203.0.113.9", "a")));

  auto host = Ipv4Cidr::parse("10.0.0.7/32", "s");
  ASSERT_TRUE(host.is_ok());
  EXPECT_EQ(host->mask(), 0xffffffffU);
  EXPECT_EQ(host->size(), 1U);
  EXPECT_EQ(host->broadcast().str(), "10.0.0.7");
  EXPECT_TRUE(host->contains(*Ipv4Address::parse("10.0.0.7", "a")));
  EXPECT_FALSE(host->contains(*Ipv4Address::parse("10.0.0.8", "a")));
}

TEST(Ipv4Cidr, RefusesHostBitsAndSuggestsTheNetwork) {
  auto c = Ipv4Cidr::parse("10.1.0.5/24", "spec.subnet");
  ASSERT_FALSE(c.is_ok());
  expect_invalid(c.status(), "spec.subnet", "host bits must be zero");
  EXPECT_NE(c.status().message().find("'10.1.0.0/24'"), std::string::npos);
}

TEST(Ipv4Cidr, RefusesMalformedText) {
  for (const std::string text :
       {"10.1.0.0", "10.1.0.0/", "10.1.0.0/33", "10.1.0.0/024", "10.1.0.0/-1", "10.1.0.0/24/8",
        "10.1.0/24", "010.1.0.0/24", "10.1.0.0 /24", "/24", "10.1.0.0/2a"}) {
    auto c = Ipv4Cidr::parse(text, "spec.subnet");
    ASSERT_FALSE(c.is_ok()) << "accepted '" << text << "'";
    expect_invalid(c.status(), "spec.subnet", "'" + text + "' is not an IPv4 subnet");
  }
}

TEST(Ipv4Cidr, ContainsOnlyItsOwnAddresses) {
  const Ipv4Cidr c = *Ipv4Cidr::parse("10.10.0.0/16", "s");
  EXPECT_TRUE(c.contains(*Ipv4Address::parse("10.10.0.0", "a")));
  EXPECT_TRUE(c.contains(*Ipv4Address::parse("10.10.255.255", "a")));
  EXPECT_FALSE(c.contains(*Ipv4Address::parse("10.11.0.0", "a")));
  EXPECT_FALSE(c.contains(*Ipv4Address::parse("10.9.255.255", "a")));
}

TEST(Ipv4Cidr, OverlapIsSymmetricAndCoversNesting) {
  const auto c = [](const char* t) { return *Ipv4Cidr::parse(t, "s"); };
  EXPECT_TRUE(c("10.0.0.0/16").overlaps(c("10.0.5.0/24")));
  EXPECT_TRUE(c("10.0.5.0/24").overlaps(c("10.0.0.0/16")));
  EXPECT_TRUE(c("10.0.5.0/24").overlaps(c("10.0.5.0/24")));
  EXPECT_FALSE(c("10.0.5.0/24").overlaps(c("10.0.6.0/24")));
  EXPECT_FALSE(c("10.0.0.0/25").overlaps(c("10.0.0.128/25")));
  EXPECT_TRUE(c("0.0.0.0/0").overlaps(c("192.168.0.0/16")));
}

TEST(MacAddress, ParsesEitherCaseAndFormatsLowercase) {
  auto m = MacAddress::parse("02:AB:cd:EF:01:23", "mac");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->str(), "02:ab:cd:ef:01:23");
  EXPECT_EQ(m->bytes(), (std::array<uint8_t, 6>{0x02, 0xab, 0xcd, 0xef, 0x01, 0x23}));
  EXPECT_EQ(*MacAddress::parse(m->str(), "mac"), *m);
}

TEST(MacAddress, RefusesOtherForms) {
  for (const std::string text :
       {"", "02:ab:cd:ef:01", "02:ab:cd:ef:01:23:45", "02-ab-cd-ef-01-23", "2:ab:cd:ef:01:23",
        "02:ab:cd:ef:01:2g", "02ab.cdef.0123", "02:ab:cd:ef:01:23 ", "02:ab:cd:ef:01::3"}) {
    auto m = MacAddress::parse(text, "spec.mac");
    ASSERT_FALSE(m.is_ok()) << "accepted '" << text << "'";
    expect_invalid(m.status(), "spec.mac", "is not a MAC address");
  }
}

TEST(MacAddress, KnowsLocallyAdministeredUnicast) {
  EXPECT_TRUE(MacAddress({0x02, 0, 0, 0, 0, 1}).is_locally_administered_unicast());
  EXPECT_TRUE(MacAddress({0xfe, 0, 0, 0, 0, 1}).is_locally_administered_unicast());
  EXPECT_FALSE(MacAddress({0x00, 0x16, 0x3e, 0, 0, 1}).is_locally_administered_unicast());
  EXPECT_FALSE(MacAddress({0x03, 0, 0, 0, 0, 1}).is_locally_administered_unicast());
  EXPECT_FALSE(MacAddress({0xff, 0xff, 0xff, 0xff, 0xff, 0xff}).is_locally_administered_unicast());
}

TEST(DeriveVmMac, IsDeterministicAndPinned) {
  EXPECT_EQ(derive_vm_mac(kVm, 0), derive_vm_mac(kVm, 0));
  // Pinned: a changed derivation would give running VMs new MACs after an upgrade.
  EXPECT_EQ(derive_vm_mac(kVm, 0).str(), "96:03:64:a0:cb:e8");
}

TEST(DeriveVmMac, AttemptsAndIdsGiveDifferentLocallyAdministeredUnicastMacs) {
  std::set<MacAddress> seen;
  for (uint32_t attempt = 0; attempt < 64; ++attempt) {
    const MacAddress m = derive_vm_mac(kVm, attempt);
    EXPECT_TRUE(m.is_locally_administered_unicast()) << m.str();
    seen.insert(m);
  }
  EXPECT_EQ(seen.size(), 64U);

  seen.clear();
  for (int i = 0; i < 1000; ++i) {
    char buf[37];
    std::snprintf(buf, sizeof buf, "00000000-0000-4000-8000-%012x", i);
    const MacAddress m = derive_vm_mac(VmId::trusted(buf), 0);
    EXPECT_TRUE(m.is_locally_administered_unicast()) << m.str();
    seen.insert(m);
  }
  EXPECT_EQ(seen.size(), 1000U);
}

TEST(Vni, AcceptsTheTwentyFourBitRangeExceptZero) {
  EXPECT_EQ(Vni::parse(1, "spec.vni")->value(), 1U);
  EXPECT_EQ(Vni::parse(16777215, "spec.vni")->value(), 16777215U);
  EXPECT_EQ(Vni::kMax, 16777215U);
  for (int64_t bad : {int64_t{0}, int64_t{-1}, int64_t{16777216}, int64_t{1} << 40}) {
    auto v = Vni::parse(bad, "spec.vni");
    ASSERT_FALSE(v.is_ok()) << bad;
    expect_invalid(v.status(), "spec.vni",
                   "must be between 1 and 16777215, got " + std::to_string(bad));
  }
}

TEST(Names, FollowTheDocumentedPatterns) {
  const Vni vni = Vni::trusted(4097);
  EXPECT_EQ(bridge_name(vni), "nmbr4097");
  EXPECT_EQ(vxlan_name(vni), "nmvx4097");
  EXPECT_EQ(dhcp_veth_name(vni), "nmdh4097");
  EXPECT_EQ(dhcp_netns_name(vni), "nm-dhcp-4097");
  EXPECT_EQ(tap_name(kVm, 0), "nmt3f1c0a2b1230");
  EXPECT_EQ(tap_name(kVm, 7), "nmt3f1c0a2b1237");
}

TEST(Names, InterfaceNamesFitIfnamsizForTheLargestVni) {
  const Vni vni = Vni::trusted(Vni::kMax);
  for (const std::string& name : {bridge_name(vni), vxlan_name(vni), dhcp_veth_name(vni)}) {
    EXPECT_LE(name.size(), kMaxIfnameLength) << name;
    EXPECT_TRUE(is_owned_ifname(name)) << name;
  }
  EXPECT_EQ(bridge_name(vni), "nmbr16777215");
  EXPECT_LE(kDhcpInnerIfname.size(), kMaxIfnameLength);
  const std::string tap = tap_name(VmId::trusted("ffffffff-ffff-4fff-bfff-ffffffffffff"), 9);
  EXPECT_EQ(tap.size(), kMaxIfnameLength);
  EXPECT_TRUE(is_owned_ifname(tap));
}

TEST(Names, OwnedIfnamesAreExactlyTheGeneratedOnes) {
  for (const char* ours : {"nmbr1", "nmvx4097", "nmdh16777215", "nmt3f1c0a2b1234"}) {
    EXPECT_TRUE(is_owned_ifname(ours)) << ours;
  }
  for (const char* theirs : {"",
                             "eth0",
                             "vnet0",
                             "virbr0",
                             "lo",
                             "nm",
                             "nmbr",
                             "nmbr0",
                             "nmbr04097",
                             "nmbr16777216",
                             "nmbrx",
                             "nmvx12a",
                             "nmt",
                             "nmt3f1c0a2b123",
                             "nmt3f1c0a2b12345",
                             "nmt3F1C0A2B1234",
                             "nmt3f1c0a2b123g",

                             "nmdh-1",
                             "docker0",
                             "nm-dhcp-4097"}) {
    EXPECT_FALSE(is_owned_ifname(theirs)) << theirs;
  }
}

}  // namespace
}  // namespace nm::network
