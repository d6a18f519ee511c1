#include "nm/network/tenant_networks.h"

#include <algorithm>
#include <map>
#include <set>
#include <utility>

#include "nm/network/names.h"
#include "nm/network/nft_ruleset.h"

namespace nm::network {
namespace {

PortRule rule_of(const PortSpec& p) {
  return PortRule{p.ifname, p.mac, p.ip};
}

// A repair that was made.
Repair done(std::string object, std::string what, std::string network = {}) {
  return Repair{.object = std::move(object),
                .what = std::move(what),
                .network = std::move(network),
                .failed = false};
}

std::string quoted(std::string_view kind, std::string_view name) {
  return std::string(kind) + " '" + std::string(name) + "'";
}

}  // namespace

TenantNetworks::TenantNetworks(Links& links, Firewall& firewall, Dhcp& dhcp, NetworkOptions options)
    : links_(links), firewall_(firewall), dhcp_(dhcp), options_(std::move(options)) {}

DhcpServerConfig TenantNetworks::dhcp_config(const NetworkSpec& network) const {
  DhcpServerConfig c;
  c.key = network.name.str();
  c.netns = dhcp_netns_name(network.vni);
  c.ifname = std::string(kDhcpInnerIfname);
  c.subnet = network.subnet;
  c.server = dhcp_server_address(network.subnet);
  c.mtu = options_.mtu;
  for (const auto& [_, p] : ports_) {
    if (p.network == network.name) c.hosts.push_back(DhcpHost{p.mac, p.ip, p.hostname});
  }
  std::sort(c.hosts.begin(), c.hosts.end());
  return c;
}

Status TenantNetworks::ensure_links(const NetworkSpec& network) {
  if (options_.underlay.empty() && !network.peers.empty()) {
    return invalid_argument("spec.peers: network '" + network.name.str() +
                            "' has peers but this node has no underlay interface configured");
  }
  const std::string bridge = bridge_name(network.vni);
  NM_RETURN_IF_ERROR(links_.ensure_bridge(bridge));
  if (!options_.underlay.empty()) {
    const std::string vxlan = vxlan_name(network.vni);
    NM_RETURN_IF_ERROR(links_.ensure_vxlan(VxlanConfig{.name = vxlan,
                                                       .vni = network.vni,
                                                       .underlay = options_.underlay,
                                                       .dstport = options_.vxlan_port,
                                                       .bridge = bridge}));
    NM_RETURN_IF_ERROR(links_.set_flood_peers(vxlan, network.peers));
  }
  return links_.ensure_dhcp_namespace(DhcpNamespaceConfig{
      .netns = dhcp_netns_name(network.vni),
      .host_ifname = dhcp_veth_name(network.vni),
      .bridge = bridge,
      .inner_ifname = std::string(kDhcpInnerIfname),
      .subnet = network.subnet,
      .address = dhcp_server_address(network.subnet),
  });
}

Status TenantNetworks::realize_network(const NetworkSpec& network,
                                       const std::vector<PortSpec>& ports) {
  NM_RETURN_IF_ERROR(ensure_links(network));
  bool changed = false;
  for (const auto& p : ports) {
    if (p.network != network.name) continue;
    const auto old = ports_.find(p.ifname);
    if (old != ports_.end() && old->second == p) continue;
    ports_.insert_or_assign(p.ifname, p);
    changed = true;
  }
  NM_RETURN_IF_ERROR(dhcp_.ensure(dhcp_config(network)));
  if (changed || !fw_applied_) NM_RETURN_IF_ERROR(apply_firewall());
  realized_.insert(network.name.str());
  return Status::ok();
}

Status TenantNetworks::remove_network(const NetworkSpec& network) {
  realized_.erase(network.name.str());
  NM_RETURN_IF_ERROR(dhcp_.stop(network.name.str()));
  NM_RETURN_IF_ERROR(links_.delete_netns(dhcp_netns_name(network.vni)));
  NM_RETURN_IF_ERROR(links_.delete_link(dhcp_veth_name(network.vni)));
  NM_RETURN_IF_ERROR(links_.delete_link(vxlan_name(network.vni)));
  NM_RETURN_IF_ERROR(links_.delete_link(bridge_name(network.vni)));
  const size_t before = ports_.size();
  std::erase_if(ports_, [&](const auto& kv) { return kv.second.network == network.name; });
  if (ports_.size() != before) return apply_firewall();
  return Status::ok();
}

Status TenantNetworks::add_port(const NetworkSpec& network, const PortSpec& port) {
  // The network's bridge and DHCP namespace first: a VM may be created while the network's own
  // job has not run yet, or after it failed.
  if (!realized_.count(network.name.str())) {
    NM_RETURN_IF_ERROR(ensure_links(network));
    realized_.insert(network.name.str());
  }
  const auto old = ports_.find(port.ifname);
  const bool same = old != ports_.end() && old->second == port;
  const bool replaced = old != ports_.end() && !same;
  const bool added = old == ports_.end();
  ports_.insert_or_assign(port.ifname, port);
  if (!fw_applied_ || replaced) {
    // Nothing applied yet (or a port changed its MAC/IP: its old elements must go): all of it.
    NM_RETURN_IF_ERROR(apply_firewall());
  } else if (!same) {
    if (Status s = firewall_.apply(render_add_port(rule_of(port))); !s.is_ok()) {
      // The table may have been flushed behind our back: the full ruleset repairs that too.
      NM_RETURN_IF_ERROR(apply_firewall());
    } else {
      last_listing_.clear();
    }
  }
  if (added) {
    // The common case costs the same with 1 or 1000 ports on the network: one host for the
    // running server. Anything unusual (no server yet, a clash) goes through the full ensure().
    if (dhcp_.add_host(network.name.str(), DhcpHost{port.mac, port.ip, port.hostname}).is_ok()) {
      return Status::ok();
    }
  }
  return dhcp_.ensure(dhcp_config(network));
}

Status TenantNetworks::remove_port(const NetworkSpec& network, const PortSpec& port) {
  if (const auto it = ports_.find(port.ifname); it != ports_.end()) {
    ports_.erase(it);
    if (!fw_applied_) {
      NM_RETURN_IF_ERROR(apply_firewall());
    } else if (Status s = firewall_.apply(render_remove_port(rule_of(port))); !s.is_ok()) {
      NM_RETURN_IF_ERROR(apply_firewall());
    } else {
      last_listing_.clear();
    }
  }
  return dhcp_.ensure(dhcp_config(network));
}

Status TenantNetworks::apply_firewall() {
  std::vector<PortRule> rules;
  rules.reserve(ports_.size());
  for (const auto& [_, p] : ports_) rules.push_back(rule_of(p));
  fw_applied_ = false;
  last_listing_.clear();
  NM_RETURN_IF_ERROR(firewall_.apply(render_ruleset(std::move(rules))));
  fw_applied_ = true;
  NM_ASSIGN_OR_RETURN(auto listing, firewall_.list_table());
  last_listing_ = listing.value_or("");
  return Status::ok();
}

Result<std::vector<Repair>> TenantNetworks::reconcile(const std::vector<NetworkSpec>& networks,
                                                      const std::vector<PortSpec>& ports) {
  std::vector<Repair> repairs;
  NM_ASSIGN_OR_RETURN(auto links, links_.list_links());
  std::map<std::string, LinkInfo> by_name;
  for (auto& l : links) by_name.emplace(l.name, std::move(l));
  NM_ASSIGN_OR_RETURN(auto namespaces, links_.list_netns());
  const std::set<std::string> netns_set(namespaces.begin(), namespaces.end());
  const auto running = dhcp_.running();
  const std::set<std::string> running_set(running.begin(), running.end());
  // A step that fails is reported and the others still run: one broken network must not keep
  // the firewall or the other networks from being put right.
  const auto failed = [&repairs](std::string object, const Status& s, std::string network = {}) {
    repairs.push_back(
        Repair{.object = std::move(object),
               .what = "could not be repaired: " + s.message() + "; retrying at the next audit",
               .network = std::move(network),
               .failed = true});
  };

  // 1. The firewall, first: it depends on the ports only. When the port set changed, nothing
  //    counts as applied until the whole table is (add_port() then never skips a port whose
  //    elements a failed step did not install).
  std::map<std::string, PortSpec> want;
  for (const auto& p : ports) want.emplace(p.ifname, p);
  if (want != ports_) {
    ports_ = std::move(want);
    fw_applied_ = false;
    last_listing_.clear();
  }
  const std::string table = quoted("nft table", "bridge nodemanager");
  if (auto listing = firewall_.list_table(); !listing.is_ok()) {
    failed(table, listing.status());
  } else if (!fw_applied_ || last_listing_.empty()) {
    // Ports without a table: after a host reboot, or someone deleted it. A node that never had
    // a port or network gets no table at all.
    if (!*listing && (fw_applied_ || !ports_.empty())) {
      repairs.push_back(done(table, "was missing; recreated"));
    }
    if (*listing || !ports_.empty() || !networks.empty()) {
      if (Status s = apply_firewall(); !s.is_ok()) failed(table, s);
    }
  } else if (!*listing || **listing != last_listing_) {
    repairs.push_back(done(
        table, *listing ? "was changed outside nodemanager; restored" : "was missing; recreated"));
    if (Status s = apply_firewall(); !s.is_ok()) failed(table, s);
  }

  // 2. Each network on its own.
  std::set<std::string> wanted_links;
  std::set<std::string> wanted_netns;
  std::set<std::string> wanted_dhcp;
  for (const auto& net : networks) {
    const std::string name = net.name.str();
    const std::string bridge = bridge_name(net.vni);
    const std::string vxlan = vxlan_name(net.vni);
    const std::string veth = dhcp_veth_name(net.vni);
    const std::string netns = dhcp_netns_name(net.vni);
    wanted_links.insert({bridge, veth});
    if (!options_.underlay.empty()) wanted_links.insert(vxlan);
    wanted_netns.insert(netns);
    wanted_dhcp.insert(name);

    std::vector<Repair> found;
    const auto br = by_name.find(bridge);
    if (br == by_name.end()) {
      found.push_back(done(quoted("bridge", bridge), "was missing; recreated", name));
    } else if (!br->second.up) {
      found.push_back(done(quoted("bridge", bridge), "was down; set up", name));
    } else if (auto addrs = links_.addresses(bridge); addrs.is_ok() && !addrs->empty()) {
      found.push_back(done(quoted("bridge", bridge),
                           "had an address (" + addrs->front().str() + "); removed", name));
    }
    if (!options_.underlay.empty()) {
      if (!by_name.count(vxlan)) {
        found.push_back(done(quoted("VXLAN device", vxlan), "was missing; recreated", name));
      } else if (auto peers = links_.flood_peers(vxlan); peers.is_ok()) {
        std::sort(peers->begin(), peers->end());
        auto expected = net.peers;
        std::sort(expected.begin(), expected.end());
        if (*peers != expected) {
          found.push_back(done(quoted("VXLAN device", vxlan), "flood peers differed; reset", name));
        }
      }
    }
    if (!netns_set.count(netns) || !by_name.count(veth)) {
      found.push_back(done(quoted("DHCP namespace", netns), "was missing; recreated", name));
    }
    if (!running_set.count(name)) {
      found.push_back(
          done(quoted("DHCP server of network", name), "was not running; started", name));
    }
    Status s = ensure_links(net);
    if (s.is_ok()) s = dhcp_.ensure(dhcp_config(net));
    if (!s.is_ok()) {
      realized_.erase(name);
      failed(quoted("network", name), s, name);
      continue;
    }
    realized_.insert(name);
    repairs.insert(repairs.end(), found.begin(), found.end());
  }

  // 3. VM ports that exist (their VM runs) but are off their bridge: a bridge recreated above
  //    comes back empty, and the guests must not stay cut off until they restart.
  std::map<std::string, Vni> vni_of;
  for (const auto& net : networks) vni_of.emplace(net.name.str(), net.vni);
  for (const auto& p : ports) {
    const auto link = by_name.find(p.ifname);
    const auto vni = vni_of.find(p.network.str());
    if (link == by_name.end() || vni == vni_of.end()) continue;  // VM not running
    const std::string bridge = bridge_name(vni->second);
    if (link->second.master == bridge && link->second.up) continue;
    if (Status s = links_.attach_port(p.ifname, bridge); !s.is_ok()) {
      failed(quoted("port", p.ifname), s, p.network.str());
      continue;
    }
    repairs.push_back(done(quoted("port", p.ifname),
                           "was not on bridge '" + bridge + "'; re-attached", p.network.str()));
  }

  // 4. Leftovers: our bridges, VXLAN devices, DHCP veths and namespaces that no desired network
  //    explains. Never objects without our prefixes, and never taps: a tap belongs to a domain,
  //    and domains are the VM reconciler's (orphan policy); an unknown nmt* tap is dropped by
  //    the firewall (fail closed) meanwhile.
  for (const auto& [name, info] : by_name) {
    if (!is_owned_ifname(name) || name.starts_with("nmt") || wanted_links.count(name)) continue;
    if (Status s = links_.delete_link(name); !s.is_ok()) {
      failed(quoted("link", name), s);
      continue;
    }
    repairs.push_back(done(quoted("link", name), "belongs to no network; removed"));
  }
  for (const auto& ns : namespaces) {
    if (ns.rfind("nm-dhcp-", 0) != 0 || wanted_netns.count(ns)) continue;
    if (Status s = links_.delete_netns(ns); !s.is_ok()) {
      failed(quoted("namespace", ns), s);
      continue;
    }
    repairs.push_back(done(quoted("namespace", ns), "belongs to no network; removed"));
  }
  for (const auto& key : running) {
    if (wanted_dhcp.count(key)) continue;
    if (Status s = dhcp_.stop(key); !s.is_ok()) {
      failed(quoted("DHCP server", key), s);
      continue;
    }
    repairs.push_back(done(quoted("DHCP server", key), "belongs to no network; stopped"));
  }
  return repairs;
}

}  // namespace nm::network
