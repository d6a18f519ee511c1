#include "nm/network/network_spec.h"

#include <algorithm>
#include <array>
#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

namespace nm::network {
namespace {

using json = nlohmann::json;

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

std::string join(std::string_view a, std::string_view b) {
  return std::string(a) + "." + std::string(b);
}

// A user string made safe for a one-line message: control and non-ASCII bytes as \xNN, long
// strings cut.
std::string printable(std::string_view s, size_t max_shown = 64) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  if (s.size() > max_shown) out += "...";
  return out;
}

Status field_error(std::string_view path, std::string_view rule) {
  return invalid_argument(std::string(path) + ": " + std::string(rule));
}

std::string_view type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::string:
      return "a string";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number with a fraction or exponent";
    default:
      return "an unsupported value";
  }
}

Status check_known_fields(const json& obj, std::string_view path, const auto& known) {
  for (const auto& [key, value] : obj.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      return field_error(join(path, printable(key)), "unknown field");
    }
  }
  return Status::ok();
}

// Unsigned integer in [lo, hi]; booleans, floats, strings and negatives are refused.
Result<uint64_t> get_uint(const json& v, std::string_view path, uint64_t lo, uint64_t hi) {
  const auto range = [&](const std::string& got) {
    return field_error(path, "must be between " + std::to_string(lo) + " and " +
                                 std::to_string(hi) + ", got " + got);
  };
  if (v.is_number_integer() && !v.is_number_unsigned()) {
    const auto i = v.get<int64_t>();
    if (i < 0) return range(std::to_string(i));
  }
  if (!v.is_number_integer()) {
    return field_error(path, "must be an integer, got " + std::string(type_name(v)));
  }
  const auto u = v.get<uint64_t>();
  if (u < lo || u > hi) return range(std::to_string(u));
  return u;
}

// A string without NUL or other control characters.
Result<std::string> get_string(const json& v, std::string_view path) {
  if (!v.is_string()) {
    return field_error(path, "must be a string, got " + std::string(type_name(v)));
  }
  const auto& s = v.get_ref<const std::string&>();
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return field_error(path, "must not contain NUL or control characters");
    }
  }
  return s;
}

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

// Parser callback that refuses duplicate keys (nlohmann keeps the last one silently).
class DuplicateKeyCheck {
 public:
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        frames_.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        break;
      case json::parse_event_t::key:
        if (!frames_.empty() && parsed.is_string()) note_key(parsed.get_ref<const std::string&>());
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  }
  // The error for the first duplicate key, if any.
  const std::optional<Status>& error() const { return error_; }

 private:
  void note_key(const std::string& key) {
    if (frames_.size() == 1) top_key_ = key;
    if (frames_.back().insert(key).second || error_) return;
    error_ = frames_.size() == 1
                 ? field_error(join(kRoot, printable(key)), "appears more than once")
                 : field_error(join(kRoot, printable(top_key_)),
                               "field '" + printable(key) + "' appears more than once in an entry");
  }

  std::vector<std::set<std::string>> frames_;
  std::string top_key_;
  std::optional<Status> error_;
};

Result<json> parse_document(std::string_view text) {
  if (text.size() > kMaxNetworkSpecBytes) {
    return field_error(kRoot, "document is " + std::to_string(text.size()) +
                                  " bytes, the limit is " + std::to_string(kMaxNetworkSpecBytes));
  }
  DuplicateKeyCheck dup;
  json doc;
  try {
    doc = json::parse(text.begin(), text.end(), std::ref(dup));
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (const auto p = what.find("] "); p != std::string::npos) what.erase(0, p + 2);
    if (const auto p = what.find("; last read"); p != std::string::npos) what.erase(p);
    return field_error(kRoot, "malformed JSON: " + printable(what, 200));
  }
  if (dup.error()) return *dup.error();
  if (!doc.is_object()) {
    return field_error(kRoot, "must be a JSON object, got " + std::string(type_name(doc)));
  }
  return doc;
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
  NM_ASSIGN_OR_RETURN(json doc, parse_document(json_text));
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
