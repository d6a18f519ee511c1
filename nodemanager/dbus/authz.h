// Caller authorization for the D-Bus API: who may call what, decided from the caller's
// credentials as the bus reports them (uid and groups), never from anything the caller sends.
//
//   mutate   every method that changes state (CreateVm, DeleteVm, PullImage, Job.Cancel, ...):
//            root, the daemon's own user, and the fabric identity (fabric-user / fabric-group)
//   operate  drain/undrain (SetMaintenance): the above and the operators group
//   read     Get*/List*/GetEvents and every property: the above and the operators group
//   anyone else: AccessDenied, for everything.
//
// A member this table does not know is `mutate`: a new method is closed until classified.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/status.h"

namespace nm {

enum class Access { kRead, kOperate, kMutate };
std::string_view access_name(Access a);  // "read", "operate", "mutate"

// What `member` of `interface` needs (property reads: Access::kRead).
Access access_of(std::string_view interface, std::string_view member);

struct Caller {
  uint32_t uid = 0;
  std::vector<uint32_t> gids;  // primary and supplementary
};

struct AuthzPolicy {
  uint32_t self_uid = 0;                  // the daemon's effective uid: full access
  std::optional<uint32_t> fabric_uid;     // fabric-user
  std::optional<uint32_t> fabric_gid;     // fabric-group
  std::optional<uint32_t> operators_gid;  // operators-group
};

struct Decision {
  bool allowed = false;
  std::string role;  // "root", "self", "fabric", "operator" or "none"
};

Decision authorize(const AuthzPolicy& policy, const Caller& caller, Access needed);

// A user or group from the configuration: a name (looked up in the user/group database) or a
// number. Empty: nullopt. NotFound naming `field` when the name does not exist.
Result<std::optional<uint32_t>> resolve_user(std::string_view text, std::string_view field);
Result<std::optional<uint32_t>> resolve_group(std::string_view text, std::string_view field);

}  // namespace nm
