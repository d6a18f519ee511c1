// Tenant network spec, JSON version 1 (docs/network-spec.md): parsed once at the edge into a
// validated NetworkSpec. Same rules as the VM spec: unknown or duplicate fields, wrong types and
// coercions are refused with an InvalidArgument whose message starts with the field path
// ("spec.vni: must be between 1 and 16777215, got 0").
//
//   { "version": 1, "name": "blue", "tenant": "contoso", "vni": 4097,
//     "subnet": "10.10.0.0/24", "peers": ["192.168.50.2", "192.168.50.3"] }
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/network/addr.h"

namespace nm::network {

// Subnet prefix bounds (inclusive): a /16 is the largest network one bridge should carry; a /29
// still leaves four addresses for VMs after the reserved ones.
inline constexpr int kMinPrefix = 16;
inline constexpr int kMaxPrefix = 29;
inline constexpr size_t kMaxPeers = 256;
inline constexpr size_t kMaxNetworkSpecBytes = size_t{64} * 1024;

struct NetworkSpec {
  NetworkName name = NetworkName::trusted("unnamed");  // unique on the node
  TenantId tenant = TenantId::trusted("unnamed");
  Vni vni = Vni::trusted(1);  // unique on the node
  Ipv4Cidr subnet;
  // Underlay addresses of the other hosts carrying this network (VXLAN flood peers), in the order
  // given. Unicast, not in `subnet`, no duplicates, not in 0.0.0.0/8, 127.0.0.0/8, 224.0.0.0/4
  // (multicast) or 240.0.0.0/4 (reserved, holds the broadcast address).
  std::vector<Ipv4Address> peers;

  bool operator==(const NetworkSpec&) const = default;
};

// Addresses of the subnet that are never given to a VM: the network address, the gateway
// (network + 1, kept free for a future router), the DHCP server (network + 2) and the broadcast.
Ipv4Address gateway_address(const Ipv4Cidr& subnet);
Ipv4Address dhcp_server_address(const Ipv4Cidr& subnet);
bool is_reserved_address(const Ipv4Cidr& subnet, Ipv4Address a);

// Parses and validates a version-1 document on its own (syntax, ranges, reserved ranges: the
// subnet's prefix is kMinPrefix..kMaxPrefix and it must not overlap 0.0.0.0/8, 127.0.0.0/8,
// 169.254.0.0/16 or 224.0.0.0/3). Reports the first problem: unknown fields first, then the
// fields in the order version, name, tenant, vni, subnet, peers.
Result<NetworkSpec> parse_network_spec(std::string_view json_text);

// Rules against the networks already on the node: the name must be new (AlreadyExists), the VNI
// must be unused (AlreadyExists naming spec.vni and the network holding it), the subnet must not
// overlap another network of the same tenant (InvalidArgument naming spec.subnet and the other
// network). Networks of different tenants may reuse address space: they never share a segment.
Status check_against_existing(const NetworkSpec& spec, const std::vector<NetworkSpec>& existing);

// Canonical JSON (sorted keys, "version": 1 always, "peers" omitted when empty);
// parse_network_spec() of it yields `spec` again.
std::string network_spec_to_json(const NetworkSpec& spec);

// Picks the address for a new port: `fixed` when given (it must be inside the subnet, not
// reserved and not in `used`: InvalidArgument / AlreadyExists naming `field`), otherwise the
// lowest free non-reserved address. InsufficientCapacity when the subnet is full. Addresses in
// `used` outside the subnet and duplicates are ignored. O(n log n) in used.size().
Result<Ipv4Address> allocate_address(const Ipv4Cidr& subnet, const std::vector<Ipv4Address>& used,
                                     std::optional<Ipv4Address> fixed, std::string_view field);

}  // namespace nm::network
