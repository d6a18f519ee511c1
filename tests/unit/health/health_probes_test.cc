#include "nm/health_probes.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace nm {
namespace {

TEST(Psi, ParsesTheKernelFormat) {
  auto p = parse_psi(
      "some avg10=12.50 avg60=3.00 avg300=1.00 total=123456\n"
      "full avg10=4.25 avg60=1.00 avg300=0.00 total=999\n");
  ASSERT_TRUE(p.is_ok()) << p.status().to_string();
  EXPECT_DOUBLE_EQ(p->some_avg10, 12.5);
  EXPECT_DOUBLE_EQ(p->full_avg10, 4.25);
}

TEST(Psi, MalformedIsAnError) {
  EXPECT_FALSE(parse_psi("").is_ok());
  EXPECT_FALSE(parse_psi("some avg60=1.0\n").is_ok());
  EXPECT_FALSE(parse_psi("some avg10=abc avg60=1\n").is_ok());
}

TEST(Psi, ReadsThisMachine) {
  if (!std::filesystem::exists("/proc/pressure/memory")) GTEST_SKIP() << "kernel without PSI";
  auto p = read_psi();
  ASSERT_TRUE(p.is_ok()) << p.status().to_string();
  EXPECT_GE(p->some_avg10, 0.0);
}

TEST(Psi, Verdicts) {
  const PsiThresholds t{.degraded_some_avg10 = 20, .failed_full_avg10 = 50};
  EXPECT_EQ(judge_psi(Psi{.some_avg10 = 5, .full_avg10 = 1}, t).state, HealthState::kOk);
  EXPECT_EQ(judge_psi(Psi{.some_avg10 = 25, .full_avg10 = 1}, t).state, HealthState::kDegraded);
  const auto v = judge_psi(Psi{.some_avg10 = 90, .full_avg10 = 60}, t);
  EXPECT_EQ(v.state, HealthState::kFailed);
  EXPECT_NE(v.reason.find("full 60.00%"), std::string::npos) << v.reason;
  const auto none = judge_psi(Result<Psi>(unavailable("no PSI")), t);
  EXPECT_EQ(none.state, HealthState::kOk);
  EXPECT_NE(none.reason.find("not measured"), std::string::npos);
}

TEST(Disk, ProbeWritesAndMeasures) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("nm-health-probe-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto p = probe_dir(dir.string());
  ASSERT_TRUE(p.is_ok()) << p.status().to_string();
  EXPECT_GT(p->total_bytes, 0u);
  EXPECT_LE(p->free_bytes, p->total_bytes);
  EXPECT_TRUE(std::filesystem::is_empty(dir)) << "the probe file is removed";
  std::filesystem::remove_all(dir);
}

TEST(Disk, ProbeOfAMissingDirFails) {
  auto p = probe_dir("/nonexistent/nm-health");
  EXPECT_EQ(p.status().code(), Code::kUnavailable);
  const auto v = judge_disk(p, DiskThresholds{});
  EXPECT_EQ(v.state, HealthState::kFailed);
  EXPECT_NE(v.reason.find("/nonexistent/nm-health/.health-probe"), std::string::npos) << v.reason;
}

TEST(Disk, Verdicts) {
  const DiskThresholds t{.degraded_below_bytes = 100 << 20, .failed_below_bytes = 10 << 20};
  auto at = [&](uint64_t mib) {
    return judge_disk(DiskProbe{.free_bytes = mib << 20, .total_bytes = 1000ull << 20}, t);
  };
  EXPECT_EQ(at(500).state, HealthState::kOk);
  EXPECT_EQ(at(99).state, HealthState::kDegraded);
  EXPECT_EQ(at(9).state, HealthState::kFailed);
  EXPECT_EQ(at(9).reason, "9 MiB free of 1000 MiB, below 10 MiB");
}

TEST(Link, Verdicts) {
  EXPECT_EQ(judge_link("eth1", true, true, true, "up").state, HealthState::kOk);
  EXPECT_EQ(judge_link("eth1", false, false, false, "").reason, "interface 'eth1' does not exist");
  EXPECT_EQ(judge_link("eth1", true, false, false, "down").state, HealthState::kFailed);
  const auto v = judge_link("eth1", true, true, false, "lowerlayerdown");
  EXPECT_EQ(v.state, HealthState::kFailed);
  EXPECT_NE(v.reason.find("no carrier"), std::string::npos);
}

}  // namespace
}  // namespace nm
