// Anti-spoofing ruleset renderer tests.
//
// Golden files: tests/golden/nft/<case>.nft hold the exact bytes the renderer must produce. Each
// was checked against the kernel (`unshare -n nft -f`). After an intended change to the
// renderer, regenerate them, apply them to a scratch namespace again and review the diff:
//
//   NM_UPDATE_GOLDENS=1 ./network_test --gtest_filter='NftRulesetGolden.*'
//   git diff tests/golden/nft/
//
// (NM_UPDATE_GOLDEN=1, the spelling the domain XML goldens use, works too.)
#include "nm/network/nft_ruleset.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace nm::network {
namespace {

const std::string kGoldenDir = NM_GOLDEN_DIR;

PortRule port(const std::string& ifname, const std::string& mac, const std::string& ip) {
  return PortRule{
      .ifname = ifname, .mac = *MacAddress::parse(mac, "mac"), .ip = *Ipv4Address::parse(ip, "ip")};
}

const PortRule kA = port("nmt3f1c0a2b1234", "02:3f:1c:0a:2b:12", "10.10.0.3");
const PortRule kB = port("nmt7d00e5a9c0de", "06:7d:00:e5:a9:c0", "10.10.0.4");
const PortRule kC = port("nmtb2c4e6f80a1c", "0a:b2:c4:e6:f8:0a", "10.20.0.3");

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool update_requested() {
  for (const char* var : {"NM_UPDATE_GOLDENS", "NM_UPDATE_GOLDEN"}) {
    const char* v = std::getenv(var);
    if (v != nullptr && std::string(v) == "1") return true;
  }
  return false;
}

void check_golden(const std::string& name, const std::string& actual) {
  const std::string path = kGoldenDir + "/" + name + ".nft";
  if (update_requested()) {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << actual;
    GTEST_SKIP() << "rewrote " << path;
  }
  std::ifstream probe(path);
  ASSERT_TRUE(probe.good()) << "missing golden file " << path
                            << " (run with NM_UPDATE_GOLDENS=1 to create it)";
  EXPECT_EQ(actual, read_text(path))
      << "differs from " << path << " (if intended: NM_UPDATE_GOLDENS=1, then review the diff)";
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

TEST(NftRulesetGolden, Empty) {
  check_golden("empty", render_ruleset({}));
}
TEST(NftRulesetGolden, OnePort) {
  check_golden("one_port", render_ruleset({kA}));
}
TEST(NftRulesetGolden, ThreePortsGivenUnsorted) {
  check_golden("three_ports", render_ruleset({kC, kA, kB}));
}
TEST(NftRulesetGolden, AddPort) {
  check_golden("add_port", render_add_port(kB));
}
TEST(NftRulesetGolden, RemovePort) {
  check_golden("remove_port", render_remove_port(kB));
}

TEST(NftRuleset, IsPureAndIndependentOfInputOrderAndDuplicates) {
  const std::string sorted = render_ruleset({kA, kB, kC});
  EXPECT_EQ(render_ruleset({kC, kB, kA}), sorted);
  EXPECT_EQ(render_ruleset({kB, kA, kC, kA}), sorted);
  EXPECT_NE(render_ruleset({kA, kB}), sorted);
  PortRule moved = kA;
  moved.ip = *Ipv4Address::parse("10.10.0.9", "ip");
  EXPECT_NE(render_ruleset({moved, kB, kC}), sorted);
}

TEST(NftRuleset, ReplacesTheTableWhetherOrNotItExists) {
  const auto lines = lines_of(render_ruleset({kA}));
  ASSERT_GE(lines.size(), 3U);
  EXPECT_EQ(lines[0], "table bridge nodemanager {}");
  EXPECT_EQ(lines[1], "delete table bridge nodemanager");
  EXPECT_EQ(lines[2], "table bridge nodemanager {");
  EXPECT_EQ(lines.back(), "}");
}

TEST(NftRuleset, HooksBridgePreroutingAtFilterPriorityAcceptingNonPortTraffic) {
  const std::string rs = render_ruleset({kA});
  EXPECT_NE(rs.find("type filter hook prerouting priority filter; policy accept;"),
            std::string::npos);
  EXPECT_NE(rs.find("iifname @ports goto port_in"), std::string::npos);
}

TEST(NftRuleset, EveryRuleCarriesTheOwnerComment) {
  bool in_chain = false;
  int rules = 0;
  for (const std::string& line : lines_of(render_ruleset({kA, kB}))) {
    if (line.starts_with("\tchain ")) {
      in_chain = true;
      continue;
    }
    if (line == "\t}") in_chain = false;
    if (!in_chain || line.starts_with("\t\ttype ") || line == "\t\tcomment \"nodemanager\"") {
      continue;
    }
    ++rules;
    EXPECT_TRUE(line.ends_with(" comment \"nodemanager\"")) << line;
  }
  EXPECT_GE(rules, 10);
}

TEST(NftRuleset, PutsEachPortInTheThreeSetsKeyedByIfname) {
  const std::string rs = render_ruleset({kA, kB});
  EXPECT_NE(rs.find("\t\t\t\"nmt3f1c0a2b1234\",\n\t\t\t\"nmt7d00e5a9c0de\"\n"), std::string::npos)
      << rs;
  EXPECT_NE(rs.find("\"nmt3f1c0a2b1234\" . 02:3f:1c:0a:2b:12"), std::string::npos);
  EXPECT_NE(rs.find("\"nmt7d00e5a9c0de\" . 10.10.0.4"), std::string::npos);
  EXPECT_NE(rs.find("type ifname . ether_addr"), std::string::npos);
  EXPECT_NE(rs.find("type ifname . ipv4_addr"), std::string::npos);
}

TEST(NftRuleset, RulesDoNotGrowWithThePortCount) {
  std::vector<PortRule> many;
  for (uint32_t i = 0; i < 300; ++i) {
    many.push_back(PortRule{
        .ifname = "vm" + std::to_string(i),
        .mac = MacAddress({0x02, 0, 0, 0, static_cast<uint8_t>(i >> 8), static_cast<uint8_t>(i)}),
        .ip = Ipv4Address::from_uint(0x0a0a0100 + i)});
  }
  const auto count_rules = [](const std::string& rs) {
    int n = 0;
    for (const std::string& line : lines_of(rs)) n += line.ends_with(" comment \"nodemanager\"");
    return n;
  };
  EXPECT_EQ(count_rules(render_ruleset(many)), count_rules(render_ruleset({})));
}

TEST(NftRuleset, AddPortInsertsOneElementPerSet) {
  EXPECT_EQ(render_add_port(kA),
            "add element bridge nodemanager ports { \"nmt3f1c0a2b1234\" }\n"
            "add element bridge nodemanager port_macs { \"nmt3f1c0a2b1234\" . 02:3f:1c:0a:2b:12 }\n"
            "add element bridge nodemanager port_ips { \"nmt3f1c0a2b1234\" . 10.10.0.3 }\n");
}

TEST(NftRuleset, RemovePortAddsThenDeletesSoItWorksWhenAlreadyGone) {
  const std::string add = render_add_port(kA);
  const std::string rm = render_remove_port(kA);
  ASSERT_TRUE(rm.starts_with(add)) << rm;
  EXPECT_EQ(rm.substr(add.size()),
            "delete element bridge nodemanager ports { \"nmt3f1c0a2b1234\" }\n"
            "delete element bridge nodemanager port_macs { \"nmt3f1c0a2b1234\" . "
            "02:3f:1c:0a:2b:12 }\n"
            "delete element bridge nodemanager port_ips { \"nmt3f1c0a2b1234\" . 10.10.0.3 }\n");
}

TEST(PortIfname, AcceptsSafeInterfaceNamesOnly) {
  for (const char* ok : {"nmt3f1c0a2b1234", "veth-a", "vm_1.0", "A"}) {
    EXPECT_TRUE(is_valid_port_ifname(ok)) << ok;
  }
  for (const char* bad : {"", ".", "..", "nmt3f1c0a2b12345", "a b", "a\"b", "eth*", "a/b", "a:b",
                          "a\\b", "a;b", "a\nb", "a{b}"}) {
    EXPECT_FALSE(is_valid_port_ifname(bad)) << bad;
  }
}

}  // namespace
}  // namespace nm::network
