#include "nm/network/network_spec.h"

#include <algorithm>
#include <array>
#include <functional>
#include <set>
#include <utility>

#include "nm/core/strict_json.h"

namespace nm::network {
namespace {

using strict_json::check_known_fields;
using strict_json::field_error;
using strict_json::get_string;
using strict_json::get_uint;
using strict_json::join;
using strict_json::json;
using strict_json::type_name;

constexpr std::string_view kRoot = "spec";
constexpr std::array<std::string_view, 6> kTopFields = {"version", "name",   "tenant",
                                                        "vni",     "subnet", "peers"};

struct ReservedRange {
  Ipv4Cidr range;
  std::string_view what;
};

Ipv4Cidr cidr(uint32_t network, int prefix) {
  return Ipv4Cidr::trusted(Ipv4Address::from_uint(network), prefix);
}

// Address space no tenant subnet may use.
const std::array<ReservedRange, 4> kReservedSubnetRanges = {{
    {cidr(0x00000000, 8), "'this network'"},
    {cidr(0x7f000000, 8), "loopback"},
    {cidr(0xa9fe0000, 16), "link-local"},
    {cidr(0xe0000000, 3), "multicast and reserved"},
}};

// Address space no VXLAN peer may have.
const std::array<ReservedRange, 4> kReservedPeerRanges = {{
    {cidr(0x00000000, 8), "'this network'"},
    {cidr(0x7f000000, 8), "loopback"},
    {cidr(0xe0000000, 4), "multicast"},
    {cidr(0xf0000000, 4), "reserved or broadcast"},
}};

Result<Ipv4Cidr> get_subnet(const json& v, std::string_view path) {
  NM_ASSIGN_OR_RETURN(std::string text, get_string(v, path));
  NM_ASSIGN_OR_RETURN(Ipv4Cidr subnet, Ipv4Cidr::parse(text, path));
  if (subnet.prefix() < kMinPrefix || subnet.prefix() > kMaxPrefix) {
    return field_error(path, "'" + subnet.str() + "': prefix length must be between /" +
                                 std::to_string(kMinPrefix) + " and /" +
                                 std::to_string(kMaxPrefix) + ", got /" +
                                 std::to_string(subnet.prefix()));
  }
  for (const auto& r : kReservedSubnetRanges) {
    if (subnet.overlaps(r.range)) {
      return field_error(path, "'" + subnet.str() + "' is inside the reserved range " +
                                   r.range.str() + " (" + std::string(r.what) + ")");
    }
  }
  return subnet;
}

Result<std::vector<Ipv4Address>> get_peers(const json& v, std::string_view path,
                                           const Ipv4Cidr& subnet) {
  if (!v.is_array()) {
    return field_error(path, "must be an array, got " + std::string(type_name(v)));
  }
  if (v.size() > kMaxPeers) {
    return field_error(path, "must list at most " + std::to_string(kMaxPeers) + " peers, got " +
                                 std::to_string(v.size()));
  }
  std::vector<Ipv4Address> out;
  std::set<Ipv4Address> seen;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string at = std::string(path) + "[" + std::to_string(i) + "]";
    NM_ASSIGN_OR_RETURN(std::string text, get_string(v[i], at));
    NM_ASSIGN_OR_RETURN(Ipv4Address peer, Ipv4Address::parse(text, at));
    for (const auto& r : kReservedPeerRanges) {
      if (r.range.contains(peer)) {
        return field_error(at, "'" + peer.str() + "' is not a unicast underlay address (inside " +
                                   r.range.str() + ", " + std::string(r.what) + ")");
      }
    }
    if (subnet.contains(peer)) {
      return field_error(at, "'" + peer.str() + "' is inside the network's own subnet '" +
                                 subnet.str() + "' (peers are underlay addresses of hosts)");
    }
    if (!seen.insert(peer).second) {
      return field_error(at, "'" + peer.str() + "' is listed twice");
    }
    out.push_back(peer);
  }
  return out;
}

Ipv4Address offset(const Ipv4Cidr& subnet, uint64_t n) {
  return Ipv4Address::from_uint(subnet.network().to_uint() + static_cast<uint32_t>(n));
}

}  // namespace

Ipv4Address gateway_address(const Ipv4Cidr& subnet) {
  return offset(subnet, 1);
}

Ipv4Address dhcp_server_address(const Ipv4Cidr& subnet) {
  return offset(subnet, 2);
}

bool is_reserved_address(const Ipv4Cidr& subnet, Ipv4Address a) {
  return a == subnet.network() || a == gateway_address(subnet) ||
         a == dhcp_server_address(subnet) || a == subnet.broadcast();
}

Result<NetworkSpec> parse_network_spec(std::string_view json_text) {
  NM_ASSIGN_OR_RETURN(json doc,
                      strict_json::parse_document(json_text, kRoot, kMaxNetworkSpecBytes));
  NM_RETURN_IF_ERROR(check_known_fields(doc, kRoot, kTopFields));

  const auto field = [&](std::string_view name) -> const json* {
    const auto it = doc.find(std::string(name));
    return it == doc.end() ? nullptr : &*it;
  };
  const auto required = [&](std::string_view name) -> Result<const json*> {
    const json* v = field(name);
    if (v == nullptr) return field_error(join(kRoot, name), "is required");
    return v;
  };

  if (const json* v = field("version")) {
    if (!v->is_number_unsigned() || v->get<uint64_t>() != 1) {
      return field_error("spec.version", "must be 1 (the only version this node understands)");
    }
  }

  NM_ASSIGN_OR_RETURN(const json* name_v, required("name"));
  NM_ASSIGN_OR_RETURN(std::string name_s, get_string(*name_v, "spec.name"));
  NM_ASSIGN_OR_RETURN(NetworkName name, NetworkName::parse(name_s, "spec.name"));

  NM_ASSIGN_OR_RETURN(const json* tenant_v, required("tenant"));
  NM_ASSIGN_OR_RETURN(std::string tenant_s, get_string(*tenant_v, "spec.tenant"));
  NM_ASSIGN_OR_RETURN(TenantId tenant, TenantId::parse(tenant_s, "spec.tenant"));

  NM_ASSIGN_OR_RETURN(const json* vni_v, required("vni"));
  NM_ASSIGN_OR_RETURN(uint64_t vni, get_uint(*vni_v, "spec.vni", Vni::kMin, Vni::kMax));

  NM_ASSIGN_OR_RETURN(const json* subnet_v, required("subnet"));
  NM_ASSIGN_OR_RETURN(Ipv4Cidr subnet, get_subnet(*subnet_v, "spec.subnet"));

  std::vector<Ipv4Address> peers;
  if (const json* v = field("peers")) {
    NM_ASSIGN_OR_RETURN(peers, get_peers(*v, "spec.peers", subnet));
  }

  return NetworkSpec{.name = std::move(name),
                     .tenant = std::move(tenant),
                     .vni = Vni::trusted(static_cast<uint32_t>(vni)),
                     .subnet = subnet,
                     .peers = std::move(peers)};
}

Status check_against_existing(const NetworkSpec& spec, const std::vector<NetworkSpec>& existing) {
  for (const auto& other : existing) {
    if (other.name == spec.name) {
      return already_exists("spec.name: network '" + spec.name.str() + "' already exists");
    }
  }
  for (const auto& other : existing) {
    if (other.vni == spec.vni) {
      return already_exists("spec.vni: " + std::to_string(spec.vni.value()) +
                            " is already used by network '" + other.name.str() + "'");
    }
  }
  for (const auto& other : existing) {
    if (other.tenant == spec.tenant && other.subnet.overlaps(spec.subnet)) {
      return invalid_argument("spec.subnet: '" + spec.subnet.str() + "' overlaps '" +
                              other.subnet.str() + "' of network '" + other.name.str() +
                              "' of the same tenant '" + spec.tenant.str() + "'");
    }
  }
  return Status::ok();
}

std::string network_spec_to_json(const NetworkSpec& spec) {
  json doc = json::object();
  doc["version"] = 1;
  doc["name"] = spec.name.str();
  doc["tenant"] = spec.tenant.str();
  doc["vni"] = spec.vni.value();
  doc["subnet"] = spec.subnet.str();
  if (!spec.peers.empty()) {
    json peers = json::array();
    for (const auto& p : spec.peers) peers.push_back(p.str());
    doc["peers"] = std::move(peers);
  }
  return doc.dump();
}

Result<Ipv4Address> allocate_address(const Ipv4Cidr& subnet, const std::vector<Ipv4Address>& used,
                                     std::optional<Ipv4Address> fixed, std::string_view field) {
  if (fixed) {
    const std::string quoted = "'" + fixed->str() + "'";
    if (!subnet.contains(*fixed)) {
      return field_error(field, quoted + " is outside the subnet '" + subnet.str() + "'");
    }
    if (is_reserved_address(subnet, *fixed)) {
      return field_error(field, quoted + " is reserved in '" + subnet.str() +
                                    "' (the network, gateway, DHCP server and broadcast "
                                    "addresses never go to a VM)");
    }
    if (std::find(used.begin(), used.end(), *fixed) != used.end()) {
      return already_exists(std::string(field) + ": " + quoted + " is already in use");
    }
    return *fixed;
  }

  // Offsets of the used addresses inside the subnet, sorted: one pass finds the lowest gap.
  std::vector<uint32_t> taken;
  taken.reserve(used.size());
  for (const auto& a : used) {
    if (subnet.contains(a)) taken.push_back(a.to_uint() - subnet.network().to_uint());
  }
  std::sort(taken.begin(), taken.end());
  taken.erase(std::unique(taken.begin(), taken.end()), taken.end());

  const uint64_t first = 3;  // after network, gateway and DHCP server
  const uint64_t last = subnet.size() >= 2 ? subnet.size() - 2 : 0;  // before broadcast
  uint64_t candidate = first;
  for (uint32_t t : taken) {
    if (t < candidate) continue;
    if (t > candidate) break;
    ++candidate;
  }
  if (candidate > last) {
    return Status(Code::kInsufficientCapacity,
                  std::string(field) + ": subnet '" + subnet.str() + "' has no free address (" +
                      std::to_string(last - first + 1) + " addresses for VMs, all in use)");
  }
  return offset(subnet, candidate);
}

}  // namespace nm::network
