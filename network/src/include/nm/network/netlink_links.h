// NetlinkLinks: the Links port over rtnetlink (libnl-route-3).
//
// Kernel objects are read back from the kernel on every call (no cached view), so changes made
// behind the adapter's back (an address added to a bridge, a port unplugged, a device deleted) are
// seen and corrected by the next ensure_*.
//
// Namespaces: the adapter works in the network namespace of the thread that called create() (the
// "host" namespace); every method must be called from a thread of that namespace (the daemon never
// moves its threads). The DHCP namespaces are named namespaces in iproute2's layout: a file
// <netns_dir>/<name> on which the namespace is bind-mounted, so `ip netns exec <name>` works on
// them. Work inside such a namespace runs on a short-lived thread of the adapter that enters it
// with setns() and uses a netlink socket of its own; the caller's thread never changes namespace.
// Creating a namespace needs CAP_SYS_ADMIN (unshare, mount) as well as CAP_NET_ADMIN.
//
// Threading: every method may be called from any thread; calls are serialised by one mutex around
// the netlink socket and each blocks for a few netlink round trips (plus a thread start for the
// methods that enter a namespace).
//
// Errors: libnl's error codes and errno values are translated in one place: no such device ->
// NotFound, exists -> AlreadyExists, busy -> Conflict, EPERM/EACCES -> AccessDenied, a kernel
// lacking the feature (EOPNOTSUPP, address family unsupported) -> Unavailable, anything else ->
// Internal. Messages name the object and the step ("creating bridge 'nmbr7': Operation not
// permitted").
//
// Besides the contract of Links, the adapter also disables IPv6 on the VXLAN device and on taps
// (before bringing a new one up): the host then sends nothing of its own (router or neighbour
// solicitations, DAD probes) into a tenant network.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "nm/core/status.h"
#include "nm/network/links.h"

namespace nm::network {

class NetlinkLinks final : public Links {
 public:
  struct Options {
    // Directory of the named network namespaces. iproute2's (and so `ip netns`') is /run/netns;
    // tests may point elsewhere. Created (with the parents) when missing, and made a shared mount
    // point like iproute2 does, so that unmounting a namespace there propagates to other mount
    // namespaces.
    std::string netns_dir = "/run/netns";
  };

  // Opens and connects the rtnetlink socket in the caller's network namespace. InvalidArgument
  // when `netns_dir` is not absolute; the translated libnl error when the socket cannot be had.
  static Result<std::unique_ptr<NetlinkLinks>> create(Options options);

  ~NetlinkLinks() override;
  NetlinkLinks(const NetlinkLinks&) = delete;
  NetlinkLinks& operator=(const NetlinkLinks&) = delete;

  // Interface names are checked first: empty, longer than 15 characters or holding '/', ':' or
  // whitespace is InvalidArgument (nothing is changed).
  Status ensure_bridge(const std::string& name) override;
  // The device is created anew (deleted first) when its VNI, underlay, local address, dstport or
  // learning flag differ: the kernel cannot change those in place. The local (VTEP) address is
  // the underlay's first IPv4 address; Unavailable when it has none. NotFound when the bridge
  // does not exist, Conflict when it is not a bridge.
  Status ensure_vxlan(const VxlanConfig& config) override;
  // NotFound when `vxlan` does not exist, Conflict when it is not a VXLAN device.
  Status set_flood_peers(const std::string& vxlan, const std::vector<Ipv4Address>& peers) override;
  // Sorted, without duplicates. NotFound / Conflict as set_flood_peers().
  Result<std::vector<Ipv4Address>> flood_peers(const std::string& vxlan) override;
  // An existing device of that name must be a tap (Conflict for a tun or anything else); it is
  // reused as it is, even when a process (QEMU) has it open.
  Status ensure_tap(const std::string& name, const std::string& bridge) override;
  Status attach_port(const std::string& name, const std::string& bridge) override;
  // The namespace file is (re)bound when missing or stale (a file that is not a namespace). The
  // veth pair is created with its inner end directly inside the namespace, so two networks can
  // use the same inner name at once. An existing pair is kept when the host end's peer is the
  // inner end; otherwise (half a pair, a peer elsewhere) it is replaced. Other IPv4 addresses on
  // the inner end are removed. InvalidArgument when `address` is not in `subnet` or the
  // namespace name is not a plain file name; NotFound / Conflict for the bridge as above;
  // Conflict when `host_ifname` exists and is not a veth.
  Status ensure_dhcp_namespace(const DhcpNamespaceConfig& config) override;
  // Deletes the veth devices inside the namespace (and so their host ends, synchronously), then
  // detaches the bind mount (MNT_DETACH) and removes the file. The namespace itself lives on
  // while a process (a dnsmasq not yet stopped) is still inside it.
  Status delete_netns(const std::string& netns) override;
  Status delete_link(const std::string& name) override;
  Result<std::vector<LinkInfo>> list_links() override;
  // Names of the files in `netns_dir` (sorted); empty when the directory does not exist.
  Result<std::vector<std::string>> list_netns() override;
  // NotFound when `ifname` does not exist.
  Result<std::vector<Ipv4Address>> addresses(const std::string& ifname) override;

 private:
  struct Socket;  // the libnl route socket (.cc only)

  NetlinkLinks(Options options, std::unique_ptr<Socket> socket);

  const Options options_;
  std::mutex mu_;
  std::unique_ptr<Socket> socket_;  // guarded by mu_
};

}  // namespace nm::network
