// TenantNetworks: the host side of tenant networks and VM ports, built from the Links, Firewall
// and Dhcp ports. It holds no durable state: the caller (NodeService) owns the desired state in
// its database and hands it over; every method converges the host towards it and is idempotent,
// so a crash between any two kernel calls is repaired by calling it again (or by reconcile()).
//
// Threading: not thread-safe; the caller serializes calls (NodeService holds one mutex around
// every call, made from its worker threads). Methods block for netlink/nft round trips and must
// not run on the event loop.
#pragma once

#include <map>
#include <set>
#include <string>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/network/addr.h"
#include "nm/network/dhcp.h"
#include "nm/network/firewall.h"
#include "nm/network/links.h"
#include "nm/network/network_spec.h"

namespace nm::network {

struct NetworkOptions {
  // Underlay interface carrying VXLAN (its first IPv4 address is the local VTEP). Empty: networks
  // are host-local (no VXLAN device; peers must then be empty).
  std::string underlay;
  uint16_t vxlan_port = 4789;  // IANA VXLAN port
  uint32_t mtu = 1450;         // handed to guests by DHCP
};

// One VM port on one network, as the database holds it.
struct PortSpec {
  VmId vm = VmId::trusted("00000000-0000-0000-0000-000000000000");
  NetworkName network = NetworkName::trusted("unnamed");
  std::string ifname;  // tap_name(vm, index of the network in the VM spec)
  MacAddress mac;
  Ipv4Address ip;
  std::string hostname;  // VM name, handed out by DHCP
  auto operator<=>(const PortSpec&) const = default;
};

// What reconcile() found different from the desired state and put right, or could not.
struct Repair {
  std::string object;   // "bridge 'nmbr4097'", "nft table 'bridge nodemanager'", ...
  std::string what;     // "was missing; recreated", "could not be repaired: ...; retrying ..."
  std::string network;  // the network it concerns, empty for host-wide objects
  bool failed = false;  // the repair was attempted and failed
};

class TenantNetworks {
 public:
  TenantNetworks(Links& links, Firewall& firewall, Dhcp& dhcp, NetworkOptions options);

  // Host objects of one network: bridge, VXLAN device with its flood peers, DHCP namespace and
  // server with a lease for each of `ports`, and the ports' firewall elements.
  Status realize_network(const NetworkSpec& network, const std::vector<PortSpec>& ports);
  // Removes everything realize_network() made for it (ports' rules included). OK when absent.
  Status remove_network(const NetworkSpec& network);

  // A port's firewall elements and DHCP lease (the tap itself comes with the domain). Called
  // before the domain starts, so its first frame already meets the rules. The DHCP host list is
  // rewritten from every port this object knows on the network (from realize_network(),
  // add_port() and reconcile()), so concurrent callers cannot drop each other's leases.
  Status add_port(const NetworkSpec& network, const PortSpec& port);
  // Removes the port's firewall elements and lease.
  Status remove_port(const NetworkSpec& network, const PortSpec& port);

  // Audit: compares the host with the whole desired state and repairs it. Each step stands on
  // its own: the firewall comes first, then each network, then ports and leftovers, and a step
  // that fails is returned as a Repair with failed = true while the others still run. An error
  // is returned only when the host could not even be inspected. Missing bridges, VXLAN
  // devices, flood peers, DHCP namespaces or servers come back; addresses on our bridges go; a
  // changed or missing nft table is replaced atomically; running VM ports are put back on their
  // bridge; our bridges, VXLAN devices, DHCP veths and namespaces that no desired network
  // explains are removed. Never touches objects without our name prefix, nor taps.
  Result<std::vector<Repair>> reconcile(const std::vector<NetworkSpec>& networks,
                                        const std::vector<PortSpec>& ports);

 private:
  Status ensure_links(const NetworkSpec& network);
  // The DHCP server of `network` with a lease for each port of ports_ on it.
  DhcpServerConfig dhcp_config(const NetworkSpec& network) const;
  // Replaces the whole table with the ruleset of ports_ and takes its listing.
  Status apply_firewall();

  Links& links_;
  Firewall& firewall_;
  Dhcp& dhcp_;
  NetworkOptions options_;
  // The ports whose elements the firewall should hold and whose leases DHCP hands out, by ifname.
  std::map<std::string, PortSpec> ports_;
  // Whether the table was applied in full since this object exists (so it is ours and present).
  bool fw_applied_ = false;
  // Networks whose bridge and DHCP namespace this object has made or checked (add_port() makes
  // the others first).
  std::set<std::string> realized_;
  // Listing of the nft table right after our last full apply; empty when an incremental change
  // happened since (the next reconcile() then re-applies in full and takes a new listing).
  std::string last_listing_;
};

}  // namespace nm::network
