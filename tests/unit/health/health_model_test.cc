#include <gtest/gtest.h>

#include "nm/health.h"

namespace nm {
namespace {

using S = HealthState;

TEST(HealthModel, StartsOkWithNoChange) {
  HealthModel m;
  EXPECT_EQ(m.state(), S::kOk);
  EXPECT_FALSE(m.take_change().has_value());
}

TEST(HealthModel, FirstOkHostCheckIsNoChangeButIsListed) {
  HealthModel m;
  m.set_host("libvirt", S::kOk, "connected", 1);
  EXPECT_FALSE(m.take_change().has_value());
  ASSERT_EQ(m.snapshot().checks.size(), 1u);
  EXPECT_EQ(m.snapshot().checks[0].name, "libvirt");
}

TEST(HealthModel, NodeStateIsTheWorstHostCheck) {
  HealthModel m;
  m.set_host("libvirt", S::kOk, "", 1);
  m.set_host("image-disk", S::kDegraded, "low", 2);
  EXPECT_EQ(m.state(), S::kDegraded);
  m.set_host("uplink", S::kFailed, "no carrier", 3);
  EXPECT_EQ(m.state(), S::kFailed);
  auto c = m.take_change();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->previous, S::kOk);
  EXPECT_EQ(c->state, S::kFailed);
  ASSERT_EQ(c->changed.size(), 2u);  // image-disk and uplink; libvirt never changed
  EXPECT_EQ(c->changed[0].name, "image-disk");
  EXPECT_EQ(c->changed[1].name, "uplink");
  EXPECT_EQ(c->changed[1].changed_us, 3u);
  EXPECT_TRUE(c->vms_affected.empty());
}

TEST(HealthModel, ReasonRefinementIsNotAChange) {
  HealthModel m;
  m.set_host("image-disk", S::kDegraded, "900 MiB free", 1);
  ASSERT_TRUE(m.take_change());
  m.set_host("image-disk", S::kDegraded, "800 MiB free", 2);
  EXPECT_FALSE(m.take_change().has_value());
  auto c = m.check("image-disk");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->reason, "800 MiB free");
  EXPECT_EQ(c->changed_us, 1u) << "changed_us is the time of the last state change";
}

TEST(HealthModel, FailedVmMakesTheNodeDegradedOnlyAndNamesTheVm) {
  HealthModel m;
  m.set_vm("vm-b", S::kFailed, "crash budget spent", 5);
  EXPECT_EQ(m.state(), S::kDegraded);
  auto c = m.take_change();
  ASSERT_TRUE(c);
  EXPECT_EQ(c->state, S::kDegraded);
  ASSERT_EQ(c->vms_affected, std::vector<std::string>{"vm-b"});
  EXPECT_EQ(c->changed[0].name, "vm:vm-b");
}

TEST(HealthModel, VmCheckBackToOkIsReportedOnceThenGone) {
  HealthModel m;
  m.set_vm("a", S::kDegraded, "restarting", 1);
  ASSERT_TRUE(m.take_change());
  m.set_vm("a", S::kOk, "running", 2);
  auto c = m.take_change();
  ASSERT_TRUE(c);
  ASSERT_EQ(c->changed.size(), 1u);
  EXPECT_EQ(c->changed[0].state, S::kOk);
  EXPECT_EQ(c->state, S::kOk);
  EXPECT_EQ(c->previous, S::kDegraded);
  EXPECT_TRUE(m.snapshot().checks.empty());
  m.set_vm("a", S::kOk, "running", 3);
  EXPECT_FALSE(m.take_change().has_value());
}

TEST(HealthModel, OkVmThatNeverFailedLeavesNoTrace) {
  HealthModel m;
  m.set_vm("a", S::kOk, "running", 1);
  m.remove_vm("a", 2);
  EXPECT_FALSE(m.take_change().has_value());
  EXPECT_TRUE(m.snapshot().checks.empty());
}

TEST(HealthModel, MaintenanceFlipIsAChangeWithTheSameState) {
  HealthModel m;
  m.set_maintenance(true, "kernel upgrade");
  auto c = m.take_change();
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->maintenance);
  EXPECT_EQ(c->state, S::kOk);
  EXPECT_EQ(m.snapshot().maintenance_reason, "kernel upgrade");
  m.set_maintenance(true, "still");
  EXPECT_FALSE(m.take_change().has_value());
  m.set_maintenance(false, "ignored");
  c = m.take_change();
  ASSERT_TRUE(c);
  EXPECT_FALSE(c->maintenance);
  EXPECT_EQ(m.maintenance_reason(), "");
}

TEST(HealthModel, FlapWithinOneBatchStillReportsTheCheck) {
  HealthModel m;
  m.set_host("uplink", S::kOk, "up", 1);
  m.set_host("uplink", S::kFailed, "down", 2);
  m.set_host("uplink", S::kOk, "up", 3);
  auto c = m.take_change();
  ASSERT_TRUE(c) << "a failure that healed before anyone looked is still reported";
  EXPECT_EQ(c->state, S::kOk);
  ASSERT_EQ(c->changed.size(), 1u);
  EXPECT_EQ(c->changed[0].state, S::kOk);
}

}  // namespace
}  // namespace nm
