// Strong types for identifiers, validated once at the edge.
//
// Each type can only be built through parse(), which checks the rule and returns an
// InvalidArgument Status naming `field` otherwise. After that, a VmId cannot be passed where a
// TenantId is expected, and every holder knows the text is safe to put in XML, a path component
// or a log line.
#pragma once

#include <compare>
#include <functional>
#include <string>
#include <string_view>

#include "nm/core/status.h"

namespace nm {

template <typename Tag>
class StrongId {
 public:
  // Checks `text` against Tag::valid(); `field` names the input in the error ("spec.name").
  static Result<StrongId> parse(std::string_view text, std::string_view field) {
    if (!Tag::valid(text)) {
      return Status(Code::kInvalidArgument,
                    std::string(field) + ": '" + std::string(text) + "' " + Tag::rule());
    }
    return StrongId(std::string(text));
  }
  // For values that are known valid (read back from our own database). Asserts in debug builds.
  static StrongId trusted(std::string text) {
    assert(Tag::valid(text));
    return StrongId(std::move(text));
  }

  const std::string& str() const { return value_; }
  auto operator<=>(const StrongId&) const = default;

 private:
  explicit StrongId(std::string v) : value_(std::move(v)) {}
  std::string value_;
};

// [a-z0-9][a-z0-9-]{0,62}: DNS-label-like names for VMs, tenants and networks.
bool is_valid_name(std::string_view s);

struct VmIdTag {
  static bool valid(std::string_view s);  // canonical lowercase UUID 8-4-4-4-12
  static const char* rule() { return "is not a lowercase UUID (8-4-4-4-12 hex digits)"; }
};
struct NameTag {
  static bool valid(std::string_view s) { return is_valid_name(s); }
  static const char* rule() {
    return "must match [a-z0-9][a-z0-9-]{0,62} (lowercase letters, digits, '-', at most 63)";
  }
};
struct DigestTag {
  static bool valid(std::string_view s);  // "sha256:" + 64 lowercase hex
  static const char* rule() { return "is not 'sha256:' followed by 64 lowercase hex digits"; }
};
struct RequestIdTag {
  static bool valid(std::string_view s);  // 1..128 of [A-Za-z0-9._:-]
  static const char* rule() {
    return "must be 1 to 128 characters of letters, digits, '.', '_', ':' and '-'";
  }
};

using VmId = StrongId<VmIdTag>;
using VmName = StrongId<NameTag>;
using TenantId = StrongId<NameTag>;
using NetworkName = StrongId<NameTag>;
using Digest = StrongId<DigestTag>;
using RequestId = StrongId<RequestIdTag>;

// A random (version 4) VmId from the kernel's random source.
VmId generate_vm_id();

// "name:tag" image reference; both parts follow the name rule except that tags may also hold
// '.' and '_' (busybox-guest:1, debian:12.5).
struct ImageRef {
  std::string name;
  std::string tag;
  static Result<ImageRef> parse(std::string_view text, std::string_view field);
  std::string str() const { return name + ":" + tag; }
  auto operator<=>(const ImageRef&) const = default;
};

}  // namespace nm

template <typename Tag>
struct std::hash<nm::StrongId<Tag>> {
  size_t operator()(const nm::StrongId<Tag>& id) const noexcept {
    return std::hash<std::string>{}(id.str());
  }
};
