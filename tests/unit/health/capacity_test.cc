#include "nm/capacity.h"

#include <gtest/gtest.h>

namespace nm {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

const ResourceCapacity& find(const std::vector<ResourceCapacity>& v, const std::string& name) {
  for (const auto& r : v) {
    if (r.resource == name) return r;
  }
  throw std::runtime_error("no " + name);
}

TEST(Capacity, TotalMinusReservedTimesRatio) {
  const auto c = compute_capacity(
      HostTotals{.vcpus = 16, .memory_mib = 3072, .disk_gib = 100, .disk_reserved_gib = 1},
      CapacityOptions{.reserved_vcpus = 2,
                      .reserved_memory_mib = 512,
                      .cpu_ratio = 4.0,
                      .memory_ratio = 1.5,
                      .disk_ratio = 1.0},
      Usage{.vms = 2, .vcpus = 3, .memory_mib = 256, .disk_gib = 8});
  EXPECT_EQ(find(c, "vcpus").capacity, 56u);
  EXPECT_EQ(find(c, "vcpus").allocated, 3u);
  EXPECT_EQ(find(c, "memory_mib").capacity, 3840u);
  EXPECT_EQ(find(c, "disk_gib").capacity, 99u);
  EXPECT_EQ(find(c, "disk_gib").reserved, 1u);
}

TEST(Capacity, ReserveLargerThanTotalLeavesZero) {
  const auto c =
      compute_capacity(HostTotals{.vcpus = 1, .memory_mib = 256}, CapacityOptions{}, Usage{});
  EXPECT_EQ(find(c, "memory_mib").capacity, 0u);
}

TEST(Capacity, AdmitRefusesNamingTheResource) {
  const auto c = compute_capacity(HostTotals{.vcpus = 4, .memory_mib = 1536, .disk_gib = 10},
                                  CapacityOptions{}, Usage{.vms = 1, .memory_mib = 768});
  auto s = admit(Usage{.vms = 1, .vcpus = 1, .memory_mib = 256}, c, "t", nullptr, Usage{});
  EXPECT_TRUE(s.is_ok()) << s.to_string();
  s = admit(Usage{.vms = 1, .vcpus = 1, .memory_mib = 257}, c, "t", nullptr, Usage{});
  EXPECT_EQ(s.code(), Code::kInsufficientCapacity);
  EXPECT_NE(s.message().find("memory_mib: 257 requested, 256 of 1024 free"), std::string::npos)
      << s.message();
  s = admit(Usage{.vms = 1, .vcpus = 17}, c, "t", nullptr, Usage{});
  EXPECT_EQ(s.code(), Code::kInsufficientCapacity);
  EXPECT_NE(s.message().find("vcpus"), std::string::npos);
  s = admit(Usage{.vms = 1, .disk_gib = 11}, c, "t", nullptr, Usage{});
  EXPECT_NE(s.message().find("disk_gib"), std::string::npos);
}

TEST(Capacity, QuotaExceededNamesTenantAndLimit) {
  const auto c = compute_capacity(HostTotals{.vcpus = 64, .memory_mib = 65536, .disk_gib = 999},
                                  CapacityOptions{}, Usage{});
  const TenantQuota q{.vms = 2, .vcpus = std::nullopt, .memory_mib = 1024};
  EXPECT_TRUE(
      admit(Usage{.vms = 1, .memory_mib = 512}, c, "acme", &q, Usage{.vms = 1, .memory_mib = 512})
          .is_ok());
  auto s = admit(Usage{.vms = 1, .memory_mib = 64}, c, "acme", &q, Usage{.vms = 2});
  EXPECT_EQ(s.code(), Code::kQuotaExceeded);
  EXPECT_NE(s.message().find("vms: tenant 'acme' uses 2 of its quota of 2"), std::string::npos)
      << s.message();
  s = admit(Usage{.vms = 1, .memory_mib = 513}, c, "acme", &q, Usage{.vms = 1, .memory_mib = 512});
  EXPECT_EQ(s.code(), Code::kQuotaExceeded);
  EXPECT_NE(s.message().find("memory_mib"), std::string::npos);
}

TEST(TenantQuota, Parses) {
  std::map<std::string, TenantQuota> q;
  ASSERT_TRUE(parse_tenant_quota("acme:vms=3,memory_mib=2048", "tenant-quota", q).is_ok());
  ASSERT_EQ(q.count("acme"), 1u);
  EXPECT_EQ(q["acme"].vms, 3u);
  EXPECT_FALSE(q["acme"].vcpus.has_value());
  EXPECT_EQ(q["acme"].memory_mib, 2048u);
}

TEST(TenantQuota, BadInputNamesFieldAndRule) {
  for (const char* bad : {"acme", "acme:", "acme:vms", "acme:vms=x", "acme:vms=-1", "acme:cpus=1",
                          "acme:vms=1,vms=2", "Bad Tenant:vms=1", "acme:vms=1,"}) {
    std::map<std::string, TenantQuota> q;
    auto s = parse_tenant_quota(bad, "tenant-quota", q);
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << bad;
    EXPECT_EQ(s.message().rfind("tenant-quota", 0), 0u) << s.message();
    EXPECT_TRUE(q.empty()) << bad;
  }
  std::map<std::string, TenantQuota> q;
  ASSERT_TRUE(parse_tenant_quota("acme:vms=1", "tenant-quota", q).is_ok());
  EXPECT_FALSE(parse_tenant_quota("acme:vcpus=1", "tenant-quota", q).is_ok()) << "twice";
}

TEST(CrashHistory, RestartsWithDoublingBackoffThenGivesUp) {
  const CrashPolicy p{.max_restarts = 3, .window = seconds(600), .backoff = milliseconds(200)};
  CrashHistory h;
  const auto t0 = std::chrono::steady_clock::time_point{} + seconds(1000);
  auto d = h.record(p, t0);
  EXPECT_TRUE(d.restart);
  EXPECT_EQ(d.attempt, 1u);
  EXPECT_EQ(d.delay, milliseconds(200));
  d = h.record(p, t0 + seconds(1));
  EXPECT_EQ(d.delay, milliseconds(400));
  d = h.record(p, t0 + seconds(2));
  EXPECT_TRUE(d.restart);
  EXPECT_EQ(d.attempt, 3u);
  EXPECT_EQ(d.delay, milliseconds(800));
  d = h.record(p, t0 + seconds(3));
  EXPECT_FALSE(d.restart);
  EXPECT_EQ(d.crashes, 4u);
}

TEST(CrashHistory, OldCrashesLeaveTheWindow) {
  const CrashPolicy p{.max_restarts = 1, .window = seconds(10), .backoff = milliseconds(0)};
  CrashHistory h;
  const auto t0 = std::chrono::steady_clock::time_point{} + seconds(1000);
  EXPECT_TRUE(h.record(p, t0).restart);
  EXPECT_FALSE(h.record(p, t0 + seconds(5)).restart);
  EXPECT_TRUE(h.record(p, t0 + seconds(30)).restart) << "both earlier crashes are outside";
}

TEST(CrashHistory, ZeroRestartsNeverRestartsAndResetForgets) {
  CrashHistory h;
  const auto t0 = std::chrono::steady_clock::time_point{} + seconds(1);
  EXPECT_FALSE(h.record(CrashPolicy{.max_restarts = 0}, t0).restart);
  const CrashPolicy one{.max_restarts = 1};
  h.reset();
  EXPECT_TRUE(h.record(one, t0).restart);
}

TEST(CrashHistory, DelayIsCapped) {
  const CrashPolicy p{.max_restarts = 40, .window = seconds(100000), .backoff = seconds(10)};
  CrashHistory h;
  auto t = std::chrono::steady_clock::time_point{} + seconds(1);
  CrashHistory::Decision d;
  for (int i = 0; i < 40; ++i) d = h.record(p, t += seconds(1));
  EXPECT_EQ(d.delay, milliseconds(300000));
}

}  // namespace
}  // namespace nm
