// VM spec, JSON version 1 (see docs/vm-spec.md): parsed once at the edge into a validated VmSpec.
//
// Every rule failure is an InvalidArgument Status whose message starts with the field path
// ("spec.vcpus: must be between 1 and 128, got 0"). Unknown fields are errors: a typo must not
// silently drop a setting.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"

namespace nm {

// Bounds for the numeric fields (inclusive).
inline constexpr uint32_t kMinVcpus = 1;
inline constexpr uint32_t kMaxVcpus = 128;
inline constexpr uint64_t kMinMemoryMiB = 32;
inline constexpr uint64_t kMaxMemoryMiB = uint64_t{1024} * 1024;  // 1 TiB
inline constexpr uint32_t kMaxDiskGiB = 16 * 1024;                // 16 TiB
inline constexpr size_t kMaxCmdline = 1024;
inline constexpr size_t kMaxNetworks = 8;
// Largest spec document accepted, in bytes.
inline constexpr size_t kMaxSpecBytes = size_t{64} * 1024;

struct VmNetworkAttachment {
  NetworkName network;
  std::optional<std::string> ip;  // dotted-quad IPv4, validated syntactically
  bool operator==(const VmNetworkAttachment&) const = default;
};

// Per-VM override of the node's crash-restart policy (every field optional: the node's default).
inline constexpr uint32_t kMaxCrashRestarts = 100;
inline constexpr uint32_t kMaxCrashWindowS = 7 * 24 * 3600;
inline constexpr uint32_t kMaxCrashBackoffMs = 3600 * 1000;
struct VmCrashPolicy {
  std::optional<uint32_t> max_restarts;  // 0..100; 0: never restart, report at once
  std::optional<uint32_t> window_s;      // 1..604800
  std::optional<uint32_t> backoff_ms;    // 0..3600000, doubled per restart in the window
  bool operator==(const VmCrashPolicy&) const = default;
};

struct VmSpec {
  std::optional<VmId> id;  // absent: the node generates one
  VmName name = VmName::trusted("unnamed");
  TenantId tenant = TenantId::trusted("unnamed");
  uint32_t vcpus = 1;
  uint64_t memory_mib = 0;
  // Disk image: "name:tag" (ImageRef syntax) or "sha256:<64 hex>" (Digest syntax).
  std::string image;
  // Overlay virtual size in GiB; 0 (absent) means the base image's own size.
  uint32_t disk_gib = 0;
  std::optional<std::string> kernel_image;  // same syntax as image; direct kernel boot
  std::optional<std::string> initrd_image;  // requires kernel_image
  std::string cmdline;                      // requires kernel_image; printable, no <>&"'
  std::vector<VmNetworkAttachment> networks;
  bool autostart = true;  // the reconciler restores the desired power state after any restart
  std::optional<VmCrashPolicy> crash_policy;

  bool operator==(const VmSpec&) const = default;
};

// Parses and validates a version-1 spec document. Names the offending field on error.
Result<VmSpec> parse_vm_spec(std::string_view json_text);

// Canonical JSON of `spec` (stable key order, absent optionals omitted); parse_vm_spec() of the
// result yields `spec` again.
std::string vm_spec_to_json(const VmSpec& spec);

// True when `ref` is a digest reference ("sha256:...") rather than a name:tag. Any reference
// starting with "sha256:" is judged as a digest, so "sha256" is never an image name.
bool is_digest_ref(std::string_view ref);

}  // namespace nm
