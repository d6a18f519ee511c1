// DHCP port: one DHCP server per tenant network, inside the network's DHCP namespace, handing each
// VM port its fixed lease and nothing else.
//
// Adapter: DnsmasqDhcp (network/src/dnsmasq_dhcp.cc), the one process the product spawns, through
// ProcessRunner. Fake: tests/fakes/.
// Supervision: the adapter watches each server it started; when one exits unexpectedly it restarts
// it (after 1 s, doubling to at most 30 s while it keeps dying) and tells the observer.
// Thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "nm/core/status.h"
#include "nm/network/addr.h"

namespace nm::network {

struct DhcpHost {
  MacAddress mac;
  Ipv4Address ip;
  std::string hostname;  // the VM name (DNS-label rule already checked)
  auto operator<=>(const DhcpHost&) const = default;
};

struct DhcpServerConfig {
  std::string key;     // the network name; one server per key
  std::string netns;   // namespace the server runs in
  std::string ifname;  // interface inside the namespace it serves
  Ipv4Cidr subnet;
  Ipv4Address server;           // its own address (handed out as the DHCP server identifier)
  uint32_t mtu = 1450;          // option 26: VXLAN takes 50 bytes of a 1500-byte underlay
  std::vector<DhcpHost> hosts;  // the only leases it gives; unknown MACs get nothing
};

class Dhcp {
 public:
  virtual ~Dhcp() = default;
  // Starts the server for config.key when it does not run; when it runs, rewrites its host list
  // and makes it reread it without a restart when only hosts changed, restarts it when anything
  // else changed. Idempotent. Also adopts (or replaces) a server left by an earlier daemon.
  virtual Status ensure(const DhcpServerConfig& config) = 0;
  // Adds one host to the running server of `key` at a cost that does not depend on how many
  // hosts it has (the attach path of a port). Returns once the server hands out the lease.
  // NotFound when no server runs for `key` (call ensure() then); InvalidArgument when the host
  // does not fit the server's subnet or its MAC or address is taken by another host. A host equal
  // to one it has is a no-op.
  virtual Status add_host(const std::string& key, const DhcpHost& host) = 0;
  // Stops the server and removes its files. OK when not running.
  virtual Status stop(const std::string& key) = 0;
  // Keys of the servers running now.
  virtual std::vector<std::string> running() const = 0;
  // Called (on the adapter's thread, must not block) when a server died and was restarted, or
  // could not be restarted: key and a reason for the log/health.
  virtual void set_observer(std::function<void(const std::string& key, const Status& what)> fn) = 0;
};

}  // namespace nm::network
