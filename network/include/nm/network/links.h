// Links port: the host-side kernel objects of tenant networks, through rtnetlink.
//
// Adapter: NetlinkLinks (libnl-route-3, network/src/netlink_links.cc). Fake: tests/fakes/.
// Every ensure_* is idempotent: it creates what is missing and corrects what differs (down, wrong
// master, wrong VNI), and changes nothing when all is as asked. A link of the asked name but of
// another kind (a "nmbr1" that is a dummy, say) is a Conflict: we never repurpose a device.
// Thread-safe; methods block for a few netlink round trips.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "nm/core/status.h"
#include "nm/network/addr.h"

namespace nm::network {

struct LinkInfo {
  std::string name;
  std::string kind;  // rtnetlink's kind: "bridge", "vxlan", "veth", "tun", "" when none
  bool up = false;
  std::optional<std::string> master;  // the bridge it is enslaved to
};

struct VxlanConfig {
  std::string name;
  Vni vni = Vni::trusted(1);
  std::string underlay;  // underlay interface (its first IPv4 address is the local VTEP address)
  uint16_t dstport = 4789;
  std::string bridge;  // enslaved here
};

struct DhcpNamespaceConfig {
  std::string netns;        // bound at /run/netns/<netns>
  std::string host_ifname;  // veth end on the host, enslaved to `bridge`, no address
  std::string bridge;
  std::string inner_ifname;  // veth end inside the namespace, holds `address`
  Ipv4Cidr subnet;           // `address`'s prefix length comes from here
  Ipv4Address address;
};

class Links {
 public:
  virtual ~Links() = default;

  // A bridge, up, STP off, IPv6 disabled on it (no link-local address: the host must have no
  // address on a tenant bridge), no IPv4 address (any found is removed).
  virtual Status ensure_bridge(const std::string& name) = 0;
  // A VXLAN device with that VNI on the underlay, learning on, up, enslaved to the bridge.
  // NotFound naming the underlay when it does not exist.
  virtual Status ensure_vxlan(const VxlanConfig& config) = 0;
  // Makes the all-zeros (flood) FDB entries of `vxlan` exactly `peers`: adds missing, removes
  // others.
  virtual Status set_flood_peers(const std::string& vxlan,
                                 const std::vector<Ipv4Address>& peers) = 0;
  // Current flood peers of `vxlan` (for audit).
  virtual Result<std::vector<Ipv4Address>> flood_peers(const std::string& vxlan) = 0;
  // A persistent tap device, up, enslaved to `bridge` (VM ports libvirt does not create itself,
  // benchmarks).
  virtual Status ensure_tap(const std::string& name, const std::string& bridge) = 0;
  // Puts an existing VM port (the tap libvirt made, or a veth in tests) on `bridge` and up. OK
  // and nothing done when the port does not exist (its VM is not running).
  virtual Status attach_port(const std::string& name, const std::string& bridge) = 0;
  // The DHCP namespace: the namespace, a veth pair with one end on the bridge (up, IPv6 off, no
  // address) and the other inside the namespace holding `address` (up), loopback up inside.
  virtual Status ensure_dhcp_namespace(const DhcpNamespaceConfig& config) = 0;
  // Deletes the namespace (and so the veth pair). OK when absent.
  virtual Status delete_netns(const std::string& netns) = 0;
  // Deletes a link of the host namespace; OK when absent.
  virtual Status delete_link(const std::string& name) = 0;
  // Every link of the host namespace.
  virtual Result<std::vector<LinkInfo>> list_links() = 0;
  // Names of the namespaces bound under /run/netns.
  virtual Result<std::vector<std::string>> list_netns() = 0;
  // IPv4 addresses held by `ifname` in the host namespace (audit: must be none on our bridges).
  virtual Result<std::vector<Ipv4Address>> addresses(const std::string& ifname) = 0;
};

}  // namespace nm::network
