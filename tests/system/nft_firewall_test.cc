// NftFirewall against the kernel's nftables, inside the test binary's private network namespace
// (netns_main.cc). The `nft` command line is the independent witness: it reads what we applied and
// changes the table behind the adapter's back.
#include "nm/network/nft_firewall.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "shell.h"

namespace nm::network {
namespace {

using system_test::CommandResult;
using system_test::sh;

// A table with a set, a map-free chain and a counter rule: enough shape for listings to differ.
constexpr const char* kScript = R"(add table bridge nodemanager
delete table bridge nodemanager
table bridge nodemanager {
  set ports {
    type ifname
    elements = { "nmt000000000001" }
  }
  chain prerouting {
    type filter hook prerouting priority -300; policy accept;
    iifname @ports counter drop comment "nodemanager"
  }
}
)";

class NftFirewallTest : public testing::Test {
 protected:
  void SetUp() override {
    // Each test starts with no table of ours (the namespace is shared by the binary's tests).
    sh("nft delete table bridge nodemanager");
    auto fw = NftFirewall::create();
    ASSERT_TRUE(fw.is_ok()) << fw.status().to_string();
    fw_ = std::move(fw).value();
  }
  void TearDown() override { sh("nft delete table bridge nodemanager"); }

  std::string listing() {
    auto l = fw_->list_table();
    EXPECT_TRUE(l.is_ok()) << l.status().to_string();
    if (!l.is_ok() || !l->has_value()) return "<absent>";
    return **l;
  }

  std::unique_ptr<NftFirewall> fw_;
};

TEST_F(NftFirewallTest, AppliedScriptIsListedBackAsNftShowsIt) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string ours = listing();
  EXPECT_NE(ours.find("set ports"), std::string::npos) << ours;
  EXPECT_NE(ours.find("\"nmt000000000001\""), std::string::npos) << ours;
  EXPECT_NE(ours.find("comment \"nodemanager\""), std::string::npos) << ours;
  // Stateless and without handles: exactly what `nft -s list` prints.
  EXPECT_EQ(ours.find("packets"), std::string::npos) << ours;
  EXPECT_EQ(ours.find("# handle"), std::string::npos) << ours;
  const CommandResult cli = sh("nft -s list table bridge nodemanager");
  ASSERT_EQ(cli.exit_code, 0) << cli.output;
  EXPECT_EQ(ours, cli.output);
}

TEST_F(NftFirewallTest, ApplyingTheSameScriptTwiceChangesNothing) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string first = listing();
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  EXPECT_EQ(listing(), first);
}

TEST_F(NftFirewallTest, ScriptWithASyntaxErrorInTheMiddleChangesNothing) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string before = listing();

  const Status s = fw_->apply(
      "flush table bridge nodemanager\n"
      "add element bridge nodemanager ports { \"nmt000000000002\" }\n"
      "add rule bridge nodemanager prerouting ip saddr 10.0.0.1 {{ drop\n"
      "delete table bridge nodemanager\n");
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("applying nft script: Error: syntax error"), std::string::npos)
      << s.message();
  EXPECT_EQ(s.message().back(), '^') << "trimmed: " << s.message();
  EXPECT_EQ(listing(), before);
}

TEST_F(NftFirewallTest, ScriptTheKernelRefusesHalfwayChangesNothing) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string before = listing();

  // Parses and evaluates fine; only the kernel sees that the element already exists, after the
  // flush and the first insertion of the same batch.
  const Status s = fw_->apply(
      "flush chain bridge nodemanager prerouting\n"
      "add element bridge nodemanager ports { \"nmt000000000002\" }\n"
      "create element bridge nodemanager ports { \"nmt000000000001\" }\n");
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("File exists"), std::string::npos) << s.message();
  EXPECT_EQ(listing(), before);
  EXPECT_EQ(before.find("nmt000000000002"), std::string::npos);
}

TEST_F(NftFirewallTest, RefusedCommandReportsNftsText) {
  const Status s = fw_->apply("add rule bridge nosuchtable c counter\n");
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("No such file or directory"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("add rule bridge nosuchtable c counter"), std::string::npos)
      << s.message();
}

TEST_F(NftFirewallTest, ListingIsNulloptWhenTheTableIsAbsent) {
  auto absent = fw_->list_table();
  ASSERT_TRUE(absent.is_ok()) << absent.status().to_string();
  EXPECT_FALSE(absent->has_value());

  // A table of the same name in another family is not ours.
  ASSERT_EQ(sh("nft add table inet nodemanager").exit_code, 0);
  auto other_family = fw_->list_table();
  sh("nft delete table inet nodemanager");
  ASSERT_TRUE(other_family.is_ok()) << other_family.status().to_string();
  EXPECT_FALSE(other_family->has_value());

  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  ASSERT_TRUE(fw_->list_table()->has_value());
  ASSERT_EQ(sh("nft delete table bridge nodemanager").exit_code, 0);
  auto deleted = fw_->list_table();
  ASSERT_TRUE(deleted.is_ok()) << deleted.status().to_string();
  EXPECT_FALSE(deleted->has_value());
}

TEST_F(NftFirewallTest, ListingsDifferExactlyWhenTheTableChangedBehindOurBack) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string first = listing();
  EXPECT_EQ(listing(), first);

  ASSERT_EQ(sh("nft add element bridge nodemanager ports '{ \"nmt000000000009\" }'").exit_code, 0);
  const std::string with_element = listing();
  EXPECT_NE(with_element, first);
  EXPECT_NE(with_element.find("nmt000000000009"), std::string::npos) << with_element;
  EXPECT_EQ(listing(), with_element);

  ASSERT_EQ(sh("nft flush chain bridge nodemanager prerouting").exit_code, 0);
  const std::string flushed = listing();
  EXPECT_NE(flushed, with_element);
  EXPECT_EQ(flushed.find("drop"), std::string::npos) << flushed;
}

TEST_F(NftFirewallTest, CallsFromSeveralThreadsAreSerialized) {
  ASSERT_TRUE(fw_->apply(kScript).is_ok());
  const std::string expected = listing();
  std::array<int, 4> mismatches{};
  std::vector<std::thread> threads;
  threads.reserve(mismatches.size());
  for (int& failures : mismatches) {
    threads.emplace_back([this, &expected, &failures] {
      for (int i = 0; i < 25; ++i) {
        if (!fw_->apply(kScript).is_ok()) ++failures;
        auto l = fw_->list_table();
        if (!l.is_ok() || !l->has_value() || **l != expected) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const int m : mismatches) EXPECT_EQ(m, 0);
}

}  // namespace
}  // namespace nm::network
