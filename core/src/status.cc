#include "nm/core/status.h"

#include <array>

namespace nm {
namespace {
constexpr std::array<std::string_view, 10> kNames = {
    "Ok",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "Conflict",
    "QuotaExceeded",
    "InsufficientCapacity",
    "Unavailable",
    "AccessDenied",
    "Internal",
};
}  // namespace

std::string_view code_name(Code code) {
  return kNames.at(static_cast<size_t>(code));
}

Code code_from_name(std::string_view name) {
  for (size_t i = 0; i < kNames.size(); ++i) {
    if (kNames[i] == name) return static_cast<Code>(i);
  }
  return Code::kInternal;
}

std::string Status::to_string() const {
  if (is_ok()) return "OK";
  return std::string(code_name(code_)) + ": " + message_;
}

Status Status::with_context(std::string_view context) const {
  if (is_ok()) return *this;
  return {code_, std::string(context) + ": " + message_};
}

}  // namespace nm
