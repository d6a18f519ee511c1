// Names of the kernel objects nodemanager creates for tenant networks and ports. Everything we
// own carries the "nm" prefix, so the reconciler can tell our leftovers from other software's
// devices and never touches the latter. Linux interface names hold at most 15 characters.
#pragma once

#include <string>
#include <string_view>

#include "nm/core/ids.h"
#include "nm/network/addr.h"

namespace nm::network {

inline constexpr size_t kMaxIfnameLength = 15;  // IFNAMSIZ - 1

// "nmbr<vni>": the network's bridge, e.g. "nmbr4097".
std::string bridge_name(Vni vni);
// "nmvx<vni>": the network's VXLAN device, enslaved to the bridge.
std::string vxlan_name(Vni vni);
// "nmdh<vni>": host end of the veth joining the DHCP namespace to the bridge.
std::string dhcp_veth_name(Vni vni);
// Name of the DHCP end inside the namespace (the same in every namespace).
inline constexpr std::string_view kDhcpInnerIfname = "dhcp0";
// "nm-dhcp-<vni>": the DHCP network namespace, bound at /run/netns/<name> (iproute2's place, so
// `ip netns exec` works for operators).
std::string dhcp_netns_name(Vni vni);
// The tap of a VM's port number `index` (0..9, the position of the network in the VM spec):
// "nmt" + the first 11 hex digits of the VM id (dashes dropped) + the index digit, 15 characters.
// Two VMs whose ids share those 44 bits would share taps; with random (version 4) ids that takes
// millions of VMs on one node to become likely.
std::string tap_name(const VmId& vm, unsigned index);

// True for names this module generates or generated: "nmbr", "nmvx" or "nmdh" followed by a VNI
// in canonical decimal (1..16777215, no leading zero), or "nmt" followed by 12 lowercase hex
// digits (tap_name() ends in its index digit; any hex digit there is accepted as ours). Used to
// find leftovers. Never true for "vnet0", "virbr0", "eth0", "nmbr0", "nmt-foo"...
bool is_owned_ifname(std::string_view ifname);

}  // namespace nm::network
