#include "nm/network/names.h"

#include <cassert>

namespace nm::network {
namespace {

constexpr std::string_view kBridgePrefix = "nmbr";
constexpr std::string_view kVxlanPrefix = "nmvx";
constexpr std::string_view kDhcpVethPrefix = "nmdh";
constexpr std::string_view kTapPrefix = "nmt";
constexpr size_t kTapHexDigits = 12;  // 11 of the VM id, then the port index (0..9)

std::string with_vni(std::string_view prefix, Vni vni) {
  std::string name = std::string(prefix) + std::to_string(vni.value());
  assert(name.size() <= kMaxIfnameLength);
  return name;
}

// The canonical decimal form of a valid VNI: no leading zero, 1..Vni::kMax.
bool is_vni_text(std::string_view s) {
  if (s.empty() || s.size() > 8 || s.front() == '0') return false;
  uint32_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint32_t>(c - '0');
  }
  return v >= Vni::kMin && v <= Vni::kMax;
}

bool is_lower_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

}  // namespace

std::string bridge_name(Vni vni) {
  return with_vni(kBridgePrefix, vni);
}

std::string vxlan_name(Vni vni) {
  return with_vni(kVxlanPrefix, vni);
}

std::string dhcp_veth_name(Vni vni) {
  return with_vni(kDhcpVethPrefix, vni);
}

std::string dhcp_netns_name(Vni vni) {
  return "nm-dhcp-" + std::to_string(vni.value());
}

std::string tap_name(const VmId& vm, unsigned index) {
  assert(index <= 9);
  std::string name(kTapPrefix);
  for (char c : vm.str()) {
    if (c == '-') continue;
    name += c;
    if (name.size() == kTapPrefix.size() + kTapHexDigits - 1) break;
  }
  name += static_cast<char>('0' + index % 10);
  assert(name.size() <= kMaxIfnameLength);
  return name;
}

bool is_owned_ifname(std::string_view ifname) {
  for (std::string_view prefix : {kBridgePrefix, kVxlanPrefix, kDhcpVethPrefix}) {
    if (ifname.starts_with(prefix)) return is_vni_text(ifname.substr(prefix.size()));
  }
  if (!ifname.starts_with(kTapPrefix)) return false;
  const std::string_view hex = ifname.substr(kTapPrefix.size());
  if (hex.size() != kTapHexDigits) return false;
  for (char c : hex) {
    if (!is_lower_hex(c)) return false;
  }
  return true;
}

}  // namespace nm::network
