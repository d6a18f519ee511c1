// Pure renderer of the anti-spoofing ruleset in the nftables table `bridge nodemanager`, which
// nodemanager owns entirely (DESIGN.md). Golden files in tests/golden/nft/ pin its output.
//
// Shape: one base chain on the bridge prerouting hook (priority filter, policy accept) lets every
// frame that does not come from a VM port pass untouched (the VXLAN device, the DHCP veth, other
// software's ports); frames from a VM port go through a per-port pipeline driven by three sets
// keyed by the port's interface name, so the cost of a lookup does not grow with the number of
// ports and attaching a port is an element insertion, not a chain rewrite:
//   set `ports`      (ifname)               which interfaces are VM ports,
//   set `port_macs`  (ifname . ether_addr)  each port's MAC,
//   set `port_ips`   (ifname . ipv4_addr)   each port's IPv4 address.
// For a frame from a port:
//   - the source MAC must be the port's MAC (else drop),
//   - IPv4 only from the port's address, except DHCP discovery (0.0.0.0:68 -> 255.255.255.255:67),
//   - ARP only Ethernet/IPv4 ARP with the port's MAC and IP as sender (an RFC 5227 probe, a
//     request with sender IP 0.0.0.0, is allowed); gratuitous ARP for another address drops,
//   - no DHCP server replies (UDP source port 67), no IPv6 at all (so no router advertisements),
//   - every other EtherType (IPv6, VLAN-tagged frames...) is dropped: tenant networks are IPv4.
// A frame from an interface named like a VM tap ("nmt*", see tap_name()) that is not in `ports`
// is dropped: a tap whose port was never added (or was already removed) fails closed.
// A second base chain, on the bridge forward hook, keeps DHCP on its host: frames between the
// DHCP veth (nmdh*) and the VXLAN device (nmvx*) are dropped both ways, because every host of a
// network runs its own server (same address, only its own ports' leases); a remote server would
// refuse (DHCPNAK) a lease it does not know.
// Every rule, set and chain (and the table) carries the comment "nodemanager" so an operator
// listing the ruleset knows its owner.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "nm/network/addr.h"
#include "nm/network/names.h"

namespace nm::network {

inline constexpr std::string_view kNftFamily = "bridge";
inline constexpr std::string_view kNftTable = "nodemanager";
inline constexpr std::string_view kNftPortSet = "ports";
inline constexpr std::string_view kNftMacSet = "port_macs";
inline constexpr std::string_view kNftIpSet = "port_ips";

struct PortRule {
  std::string ifname;  // tap (or, in tests, veth) name; is_valid_port_ifname() must hold
  MacAddress mac;
  Ipv4Address ip;
  auto operator<=>(const PortRule&) const = default;
};

// 1 to 15 characters of [A-Za-z0-9_.-], not "." or "..": the interface names the renderers
// accept (every tap_name() is one). Others are a precondition violation (asserted in debug
// builds), since they could not be quoted safely in an nft script.
bool is_valid_port_ifname(std::string_view ifname);

// The whole table as one nft script that, applied in one transaction, replaces whatever the table
// held (it adds the table, deletes it, and defines it again, so it works whether or not the table
// exists). Ports are emitted sorted (by ifname, then MAC, then IP) and exact duplicates dropped:
// equal inputs give byte-equal output. At most one PortRule per ifname.
std::string render_ruleset(std::vector<PortRule> ports);

// Incremental changes, each one transaction; they assume the table exists (a full
// render_ruleset() first). render_add_port() adds the port's elements and succeeds when they are
// already there. render_remove_port() removes them and also succeeds when they are absent (it adds
// then deletes them in the same transaction). To change a port's MAC or IP, remove the old
// PortRule and add the new one: adding a second PortRule for the same ifname would leave both
// addresses allowed.
std::string render_add_port(const PortRule& port);
std::string render_remove_port(const PortRule& port);

}  // namespace nm::network
