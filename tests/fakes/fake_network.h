// In-memory fakes of the network ports (Links, Firewall, Dhcp) for unit tests of TenantNetworks
// and NodeService. They keep the state a kernel would, count mutating calls (so tests can assert
// idempotence: a converged host sees no mutation) and can be told to fail.
#pragma once

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "nm/network/dhcp.h"
#include "nm/network/firewall.h"
#include "nm/network/links.h"

namespace nm::testing {

class FakeLinks final : public network::Links {
 public:
  struct Link {
    network::LinkInfo info;
    std::vector<network::Ipv4Address> addresses;
    std::vector<network::Ipv4Address> peers;  // vxlan flood entries
    uint32_t vni = 0;
  };

  Status ensure_bridge(const std::string& name) override {
    std::lock_guard lock(mu);
    NM_RETURN_IF_ERROR(check(name, "bridge"));
    auto& l = links[name];
    if (l.info.name.empty() || !l.info.up || !l.addresses.empty()) ++mutations;
    l.info = {name, "bridge", true, std::nullopt};
    l.addresses.clear();
    return Status::ok();
  }
  Status ensure_vxlan(const network::VxlanConfig& c) override {
    std::lock_guard lock(mu);
    if (fail_names.count(c.name)) {
      ++injected_failures;
      return Status(Code::kUnavailable, "netlink: injected failure");
    }
    NM_RETURN_IF_ERROR(check(c.name, "vxlan"));
    auto& l = links[c.name];
    if (l.info.name.empty() || l.vni != c.vni.value() || l.info.master != c.bridge) ++mutations;
    l.info = {c.name, "vxlan", true, c.bridge};
    l.vni = c.vni.value();
    return Status::ok();
  }
  Status set_flood_peers(const std::string& vxlan,
                         const std::vector<network::Ipv4Address>& peers) override {
    std::lock_guard lock(mu);
    auto it = links.find(vxlan);
    if (it == links.end()) return Status(Code::kNotFound, "no link '" + vxlan + "'");
    auto sorted = peers;
    std::sort(sorted.begin(), sorted.end());
    if (it->second.peers != sorted) ++mutations;
    it->second.peers = sorted;
    return Status::ok();
  }
  Result<std::vector<network::Ipv4Address>> flood_peers(const std::string& vxlan) override {
    std::lock_guard lock(mu);
    auto it = links.find(vxlan);
    if (it == links.end()) return Status(Code::kNotFound, "no link '" + vxlan + "'");
    return it->second.peers;
  }
  Status ensure_tap(const std::string& name, const std::string& bridge) override {
    std::lock_guard lock(mu);
    NM_RETURN_IF_ERROR(check(name, "tun"));
    if (!links.count(name)) ++mutations;
    links[name].info = {name, "tun", true, bridge};
    return Status::ok();
  }
  Status attach_port(const std::string& name, const std::string& bridge) override {
    std::lock_guard lock(mu);
    auto it = links.find(name);
    if (it == links.end()) return Status::ok();
    if (it->second.info.master != bridge || !it->second.info.up) ++mutations;
    it->second.info.master = bridge;
    it->second.info.up = true;
    return Status::ok();
  }
  Status ensure_dhcp_namespace(const network::DhcpNamespaceConfig& c) override {
    std::lock_guard lock(mu);
    NM_RETURN_IF_ERROR(check(c.host_ifname, "veth"));
    if (!netns.count(c.netns) || !links.count(c.host_ifname)) ++mutations;
    netns.insert(c.netns);
    links[c.host_ifname].info = {c.host_ifname, "veth", true, c.bridge};
    return Status::ok();
  }
  Status delete_netns(const std::string& name) override {
    std::lock_guard lock(mu);
    if (netns.erase(name)) ++mutations;
    return Status::ok();
  }
  Status delete_link(const std::string& name) override {
    std::lock_guard lock(mu);
    if (links.erase(name)) ++mutations;
    return Status::ok();
  }
  Result<std::vector<network::LinkInfo>> list_links() override {
    std::lock_guard lock(mu);
    if (fail_list) return Status(Code::kUnavailable, "netlink: injected failure");
    std::vector<network::LinkInfo> out;
    for (const auto& [_, l] : links) out.push_back(l.info);
    return out;
  }
  Result<std::vector<std::string>> list_netns() override {
    std::lock_guard lock(mu);
    return std::vector<std::string>(netns.begin(), netns.end());
  }
  Result<std::vector<network::Ipv4Address>> addresses(const std::string& ifname) override {
    std::lock_guard lock(mu);
    auto it = links.find(ifname);
    if (it == links.end()) return std::vector<network::Ipv4Address>{};
    return it->second.addresses;
  }

  // Test helpers (lock-free: call them while nothing else runs).
  bool has(const std::string& name) const { return links.count(name) != 0; }

  std::mutex mu;
  std::map<std::string, Link> links;
  std::set<std::string> netns;
  int mutations = 0;
  bool fail_list = false;
  std::set<std::string> fail_names;       // ensure_vxlan() of these names fails
  std::atomic<int> injected_failures{0};  // how many times it did

 private:
  Status check(const std::string& name, const std::string& kind) const {
    auto it = links.find(name);
    if (it != links.end() && it->second.info.kind != kind) {
      return Status(Code::kConflict, "link '" + name + "' exists and is a " + it->second.info.kind);
    }
    return Status::ok();
  }
};

// Holds the last full script (a full ruleset starts with "table bridge nodemanager") plus the
// incremental scripts applied after it; list_table() returns that text, so tests can tamper with
// `table` to simulate someone else changing the kernel's table.
class FakeFirewall final : public network::Firewall {
 public:
  Status apply(const std::string& script) override {
    std::lock_guard lock(mu);
    if (fail_apply) return Status(Code::kUnavailable, "nft: injected failure");
    ++applies;
    last_script = script;
    if (script.find("delete table") != std::string::npos) {
      ++full_applies;
      table = script;
    } else {
      if (!table) return Status(Code::kUnavailable, "nft: No such file or directory");
      *table += script;
    }
    return Status::ok();
  }
  Result<std::optional<std::string>> list_table() override {
    std::lock_guard lock(mu);
    return table;
  }

  std::mutex mu;
  std::optional<std::string> table;
  std::string last_script;
  int applies = 0;
  int full_applies = 0;
  bool fail_apply = false;
};

class FakeDhcp final : public network::Dhcp {
 public:
  Status ensure(const network::DhcpServerConfig& config) override {
    std::lock_guard lock(mu);
    if (fail_ensure) return Status(Code::kUnavailable, "dnsmasq: injected failure");
    auto it = servers.find(config.key);
    if (it == servers.end() || !(it->second.hosts == config.hosts) ||
        it->second.subnet != config.subnet || it->second.netns != config.netns) {
      ++mutations;
    }
    servers[config.key] = config;
    return Status::ok();
  }
  Status add_host(const std::string& key, const network::DhcpHost& host) override {
    std::lock_guard lock(mu);
    if (fail_ensure) return Status(Code::kUnavailable, "dnsmasq: injected failure");
    auto it = servers.find(key);
    if (it == servers.end()) return Status(Code::kNotFound, "no dhcp server for '" + key + "'");
    auto& hosts = it->second.hosts;
    if (std::find(hosts.begin(), hosts.end(), host) != hosts.end()) return Status::ok();
    hosts.insert(std::lower_bound(hosts.begin(), hosts.end(), host), host);
    ++mutations;
    ++add_host_calls;
    return Status::ok();
  }
  Status stop(const std::string& key) override {
    std::lock_guard lock(mu);
    if (servers.erase(key)) ++mutations;
    return Status::ok();
  }
  std::vector<std::string> running() const override {
    std::lock_guard lock(mu);
    std::vector<std::string> out;
    for (const auto& [k, _] : servers) out.push_back(k);
    return out;
  }
  void set_observer(std::function<void(const std::string&, const Status&)> fn) override {
    observer = std::move(fn);
  }

  mutable std::mutex mu;
  std::map<std::string, network::DhcpServerConfig> servers;
  std::function<void(const std::string&, const Status&)> observer;
  int mutations = 0;
  int add_host_calls = 0;
  bool fail_ensure = false;
};

}  // namespace nm::testing
