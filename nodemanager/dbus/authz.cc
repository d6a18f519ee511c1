#include "authz.h"

#include <grp.h>
#include <pwd.h>

#include <algorithm>
#include <array>
#include <charconv>

namespace nm {

std::string_view access_name(Access a) {
  switch (a) {
    case Access::kRead:
      return "read";
    case Access::kOperate:
      return "operate";
    case Access::kMutate:
      return "mutate";
  }
  return "mutate";
}

Access access_of(std::string_view interface, std::string_view member) {
  static constexpr std::array<std::string_view, 8> kReadMethods = {
      "GetVm",        "ListVms",   "ListImages", "GetNetwork",
      "ListNetworks", "GetEvents", "GetHealth",  "GetCapacity"};
  static constexpr std::array<std::string_view, 1> kOperateMethods = {"SetMaintenance"};
  if (interface == "org.nodemanager.NodeManager1.Manager") {
    if (std::find(kReadMethods.begin(), kReadMethods.end(), member) != kReadMethods.end()) {
      return Access::kRead;
    }
    if (std::find(kOperateMethods.begin(), kOperateMethods.end(), member) !=
        kOperateMethods.end()) {
      return Access::kOperate;
    }
  }
  if (interface == "org.freedesktop.DBus.Properties" && (member == "Get" || member == "GetAll")) {
    return Access::kRead;
  }
  if (interface == "org.freedesktop.DBus.ObjectManager" && member == "GetManagedObjects") {
    return Access::kRead;
  }
  return Access::kMutate;
}

Decision authorize(const AuthzPolicy& policy, const Caller& caller, Access needed) {
  auto in_group = [&](const std::optional<uint32_t>& gid) {
    return gid && std::find(caller.gids.begin(), caller.gids.end(), *gid) != caller.gids.end();
  };
  if (caller.uid == 0) return {true, "root"};
  if (caller.uid == policy.self_uid) return {true, "self"};
  if ((policy.fabric_uid && caller.uid == *policy.fabric_uid) || in_group(policy.fabric_gid)) {
    return {true, "fabric"};
  }
  if (in_group(policy.operators_gid)) return {needed != Access::kMutate, "operator"};
  return {false, "none"};
}

namespace {

std::optional<uint32_t> as_number(std::string_view text) {
  uint32_t v = 0;
  const auto* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || p != end) return std::nullopt;
  return v;
}

}  // namespace

Result<std::optional<uint32_t>> resolve_user(std::string_view text, std::string_view field) {
  if (text.empty()) return std::optional<uint32_t>();
  if (auto n = as_number(text)) return n;
  const std::string name(text);
  const passwd* pw = ::getpwnam(name.c_str());  // NOLINT(concurrency-mt-unsafe): start-up only
  if (pw == nullptr) {
    return not_found(std::string(field) + ": no user '" + name + "' on this host");
  }
  return std::optional<uint32_t>(pw->pw_uid);
}

Result<std::optional<uint32_t>> resolve_group(std::string_view text, std::string_view field) {
  if (text.empty()) return std::optional<uint32_t>();
  if (auto n = as_number(text)) return n;
  const std::string name(text);
  const group* gr = ::getgrnam(name.c_str());  // NOLINT(concurrency-mt-unsafe): start-up only
  if (gr == nullptr) {
    return not_found(std::string(field) + ": no group '" + name + "' on this host");
  }
  return std::optional<uint32_t>(gr->gr_gid);
}

}  // namespace nm
