// The authorization table and rules (nodemanager/dbus/authz.h).
#include "authz.h"

#include <gtest/gtest.h>

namespace nm {
namespace {

constexpr std::string_view kManager = "org.nodemanager.NodeManager1.Manager";

AuthzPolicy policy() {
  AuthzPolicy p;
  p.self_uid = 500;
  p.fabric_uid = 600;
  p.fabric_gid = 700;
  p.operators_gid = 800;
  return p;
}

TEST(AuthzTest, MethodsAreClassifiedAndUnknownOnesNeedMutate) {
  for (const char* m : {"GetVm", "ListVms", "ListImages", "GetNetwork", "ListNetworks", "GetEvents",
                        "GetHealth", "GetCapacity"}) {
    EXPECT_EQ(access_of(kManager, m), Access::kRead) << m;
  }
  EXPECT_EQ(access_of(kManager, "SetMaintenance"), Access::kOperate);
  for (const char* m : {"CreateVm", "DeleteVm", "StartVm", "StopVm", "RebootVm", "ImportImage",
                        "RemoveImage", "PullImage", "PinImage", "CollectImages", "VerifyImages",
                        "CreateNetwork", "DeleteNetwork", "SomethingNew"}) {
    EXPECT_EQ(access_of(kManager, m), Access::kMutate) << m;
  }
  EXPECT_EQ(access_of("org.nodemanager.NodeManager1.Job", "Cancel"), Access::kMutate);
  EXPECT_EQ(access_of("org.freedesktop.DBus.Properties", "Get"), Access::kRead);
  EXPECT_EQ(access_of("org.freedesktop.DBus.Properties", "GetAll"), Access::kRead);
  EXPECT_EQ(access_of("org.freedesktop.DBus.Properties", "Set"), Access::kMutate);
  EXPECT_EQ(access_of("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"), Access::kRead);
  // A read method name on another interface is not a read.
  EXPECT_EQ(access_of("org.example.Other", "ListVms"), Access::kMutate);
}

TEST(AuthzTest, RootSelfAndTheFabricMayDoEverything) {
  for (Access a : {Access::kRead, Access::kOperate, Access::kMutate}) {
    EXPECT_EQ(authorize(policy(), {0, {}}, a).role, "root");
    EXPECT_TRUE(authorize(policy(), {0, {}}, a).allowed);
    EXPECT_TRUE(authorize(policy(), {500, {}}, a).allowed);
    EXPECT_EQ(authorize(policy(), {600, {1}}, a).role, "fabric");
    EXPECT_TRUE(authorize(policy(), {600, {1}}, a).allowed);
    EXPECT_TRUE(authorize(policy(), {1234, {5, 700}}, a).allowed);
  }
}

TEST(AuthzTest, OperatorsMayReadAndDrainButNotMutate) {
  const Caller op{1234, {1234, 800}};
  EXPECT_TRUE(authorize(policy(), op, Access::kRead).allowed);
  EXPECT_TRUE(authorize(policy(), op, Access::kOperate).allowed);
  const Decision d = authorize(policy(), op, Access::kMutate);
  EXPECT_FALSE(d.allowed);
  EXPECT_EQ(d.role, "operator");
}

TEST(AuthzTest, EveryoneElseIsRefusedEverything) {
  for (Access a : {Access::kRead, Access::kOperate, Access::kMutate}) {
    EXPECT_FALSE(authorize(policy(), {1234, {1234, 100}}, a).allowed);
    EXPECT_EQ(authorize(policy(), {1234, {}}, a).role, "none");
  }
  // Unset identities grant nothing (a gid of 0 in the caller's list is not "the operators").
  AuthzPolicy bare;
  bare.self_uid = 500;
  EXPECT_FALSE(authorize(bare, {1234, {0}}, Access::kRead).allowed);
}

TEST(AuthzTest, IdentitiesResolveFromNamesOrNumbers) {
  EXPECT_EQ(*resolve_user("", "fabric-user"), std::nullopt);
  EXPECT_EQ(*resolve_user("4242", "fabric-user"), 4242u);
  EXPECT_EQ(*resolve_user("root", "fabric-user"), 0u);
  EXPECT_EQ(*resolve_group("0", "fabric-group"), 0u);
  EXPECT_EQ(*resolve_group("root", "fabric-group"), 0u);
  const auto missing = resolve_group("no-such-group-xyz", "operators-group");
  EXPECT_EQ(missing.status().code(), Code::kNotFound);
  EXPECT_NE(missing.status().message().find("operators-group"), std::string::npos);
  EXPECT_EQ(resolve_user("no-such-user-xyz", "fabric-user").status().code(), Code::kNotFound);
}

}  // namespace
}  // namespace nm
