#include "nm/network/netlink_links.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/neighbour.h>
#include <linux/nsfs.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netlink/errno.h>
#include <netlink/netlink.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/route/link/bridge.h>
#include <netlink/route/link/veth.h>
#include <netlink/route/link/vxlan.h>
#include <netlink/route/neighbour.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <system_error>
#include <thread>
#include <utility>

#include "nm/core/fs.h"
#include "nm/network/names.h"

namespace nm::network {
namespace {

struct NlSockDeleter {
  void operator()(nl_sock* s) const noexcept { nl_socket_free(s); }
};
using NlSockPtr = std::unique_ptr<nl_sock, NlSockDeleter>;
struct LinkDeleter {
  void operator()(rtnl_link* l) const noexcept { rtnl_link_put(l); }
};
using LinkPtr = std::unique_ptr<rtnl_link, LinkDeleter>;
struct CacheDeleter {
  void operator()(nl_cache* c) const noexcept { nl_cache_free(c); }
};
using CachePtr = std::unique_ptr<nl_cache, CacheDeleter>;
struct NlAddrDeleter {
  void operator()(nl_addr* a) const noexcept { nl_addr_put(a); }
};
using NlAddrPtr = std::unique_ptr<nl_addr, NlAddrDeleter>;
struct RtnlAddrDeleter {
  void operator()(rtnl_addr* a) const noexcept { rtnl_addr_put(a); }
};
using RtnlAddrPtr = std::unique_ptr<rtnl_addr, RtnlAddrDeleter>;
struct NeighDeleter {
  void operator()(rtnl_neigh* n) const noexcept { rtnl_neigh_put(n); }
};
using NeighPtr = std::unique_ptr<rtnl_neigh, NeighDeleter>;

// --- The one translation of libnl error codes and errno values into Status.

Code code_for_nle(int nle) {
  switch (nle) {
    case NLE_OBJ_NOTFOUND:
    case NLE_NODEV:
      return Code::kNotFound;
    case NLE_EXIST:
      return Code::kAlreadyExists;
    case NLE_BUSY:
      return Code::kConflict;
    case NLE_PERM:
    case NLE_NOACCESS:
      return Code::kAccessDenied;
    case NLE_OPNOTSUPP:
    case NLE_AF_NOSUPPORT:
      return Code::kUnavailable;
    default:
      return Code::kInternal;
  }
}

// `err` is a libnl code (negative, as libnl returns it, or positive).
Status nl_status(int err, std::string_view what) {
  const int nle = err < 0 ? -err : err;
  return {code_for_nle(nle), std::string(what) + ": " + nl_geterror(nle)};
}

Status sys_status(int err, std::string_view what) {
  return {code_for_nle(nl_syserr2nlerr(err)), std::string(what) + ": " + std::strerror(err)};
}

Status out_of_memory(std::string_view what) {
  return nl_status(NLE_NOMEM, what);
}

// ---

std::string quote(std::string_view s) {
  return "'" + std::string(s) + "'";
}

Status check_ifname(const std::string& name, std::string_view field) {
  if (name.empty() || name.size() > kMaxIfnameLength) {
    return invalid_argument(std::string(field) + ": interface name " + quote(name) +
                            " must have 1 to 15 characters");
  }
  const bool bad_char = std::any_of(name.begin(), name.end(), [](char c) {
    return c == '/' || c == ':' || std::isspace(static_cast<unsigned char>(c)) != 0;
  });
  if (bad_char || name == "." || name == "..") {
    return invalid_argument(std::string(field) + ": interface name " + quote(name) +
                            " may not hold '/', ':' or spaces");
  }
  return Status::ok();
}

Status check_netns_name(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
    return invalid_argument("netns: " + quote(name) + " is not a plain file name");
  }
  return Status::ok();
}

Result<NlSockPtr> connect_route() {
  NlSockPtr sock(nl_socket_alloc());
  if (!sock) return out_of_memory("allocating a netlink socket");
  if (const int err = nl_connect(sock.get(), NETLINK_ROUTE); err < 0) {
    return nl_status(err, "connecting to rtnetlink");
  }
  return sock;
}

// Runs `fn` on a thread of its own and waits for it. Used for the steps that change the calling
// thread's namespace (unshare, setns): that thread ends with the step, the caller's never moves.
Status run_on_own_thread(const std::function<Status()>& fn, std::string_view what) {
  Status result;
  try {
    std::thread worker([&]() noexcept { result = fn(); });
    worker.join();
  } catch (const std::system_error& e) {
    return unavailable(std::string(what) + ": starting a thread: " + e.what());
  }
  return result;
}

// Runs `fn` with a rtnetlink socket of the namespace `ns_fd`, on a thread that entered it.
Status run_in_netns(int ns_fd, const std::function<Status(nl_sock*)>& fn, std::string_view what) {
  return run_on_own_thread(
      [&]() -> Status {
        if (::setns(ns_fd, CLONE_NEWNET) != 0) {
          return sys_status(errno, std::string(what) + ": entering the namespace");
        }
        NM_ASSIGN_OR_RETURN(NlSockPtr sock, connect_route());
        return fn(sock.get());
      },
      what);
}

// The link named `name`; null when there is none.
Result<LinkPtr> find_link(nl_sock* sock, const std::string& name) {
  rtnl_link* raw = nullptr;
  const int err = rtnl_link_get_kernel(sock, 0, name.c_str(), &raw);
  LinkPtr link(raw);
  if (err == -NLE_OBJ_NOTFOUND || err == -NLE_NODEV) return LinkPtr();
  if (err < 0) return nl_status(err, "looking up link " + quote(name));
  return link;
}

std::string kind_of(rtnl_link* link) {
  const char* type = rtnl_link_get_type(link);
  return type != nullptr ? type : "";
}

Status expect_kind(rtnl_link* link, const std::string& kind, const std::string& name) {
  const std::string actual = kind_of(link);
  if (actual == kind) return Status::ok();
  return conflict("link " + quote(name) + " exists and is " +
                  (actual.empty() ? std::string("a device without kind") : "a " + actual) +
                  ", not a " + kind);
}

// The bridge `name`: NotFound when absent, Conflict when it is something else.
Result<LinkPtr> get_bridge(nl_sock* sock, const std::string& name) {
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return not_found("bridge " + quote(name) + " does not exist");
  NM_RETURN_IF_ERROR(expect_kind(link.get(), "bridge", name));
  return link;
}

// Brings `link` up and, when `master` > 0, enslaves it there; sends nothing when both hold.
Status ensure_up_on(nl_sock* sock, rtnl_link* link, int master, std::string_view what) {
  const bool up = (rtnl_link_get_flags(link) & IFF_UP) != 0;
  const bool enslaved = master <= 0 || rtnl_link_get_master(link) == master;
  if (up && enslaved) return Status::ok();
  LinkPtr change(rtnl_link_alloc());
  if (!change) return out_of_memory(what);
  if (!enslaved) rtnl_link_set_master(change.get(), master);
  if (!up) rtnl_link_set_flags(change.get(), IFF_UP);
  if (const int err = rtnl_link_change(sock, link, change.get(), 0); err < 0) {
    return nl_status(err, what);
  }
  return Status::ok();
}

Status delete_link_object(nl_sock* sock, rtnl_link* link, const std::string& name) {
  const int err = rtnl_link_delete(sock, link);
  if (err < 0 && err != -NLE_OBJ_NOTFOUND && err != -NLE_NODEV) {
    return nl_status(err, "deleting link " + quote(name));
  }
  return Status::ok();
}

// Writes 1 to the interface's disable_ipv6 (of the calling thread's namespace); removes its IPv6
// addresses and keeps it from getting any. OK when the kernel has no IPv6.
Status disable_ipv6(const std::string& ifname) {
  const std::string path = "/proc/sys/net/ipv6/conf/" + ifname + "/disable_ipv6";
  const std::string what = "disabling IPv6 on " + quote(ifname);
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
  if (!fd.valid()) {
    if (errno == ENOENT && ::access("/proc/sys/net/ipv6", F_OK) != 0) return Status::ok();
    return sys_status(errno, what);
  }
  if (::write(fd.get(), "1\n", 2) != 2) return sys_status(errno, what);
  return Status::ok();
}

std::optional<Ipv4Address> to_ipv4(nl_addr* a) {
  if (a == nullptr || nl_addr_get_family(a) != AF_INET || nl_addr_get_len(a) != 4) {
    return std::nullopt;
  }
  uint32_t network_order = 0;
  std::memcpy(&network_order, nl_addr_get_binary_addr(a), sizeof(network_order));
  return Ipv4Address::from_uint(ntohl(network_order));
}

Result<NlAddrPtr> to_nl_addr(Ipv4Address a, int prefix) {
  const uint32_t network_order = htonl(a.to_uint());
  NlAddrPtr out(nl_addr_build(AF_INET, &network_order, sizeof(network_order)));
  if (!out) return out_of_memory("building address " + a.str());
  nl_addr_set_prefixlen(out.get(), prefix);
  return out;
}

struct Ipv4Entry {
  Ipv4Address address;
  int prefix = 0;
  RtnlAddrPtr object;  // for deletion
};

// The IPv4 addresses held by the interface `ifindex`, in the kernel's order.
Result<std::vector<Ipv4Entry>> ipv4_entries(nl_sock* sock, int ifindex, const std::string& name) {
  nl_cache* raw = nullptr;
  const int err = rtnl_addr_alloc_cache(sock, &raw);
  CachePtr cache(raw);
  if (err < 0) return nl_status(err, "listing the addresses of " + quote(name));
  std::vector<Ipv4Entry> out;
  for (nl_object* o = nl_cache_get_first(cache.get()); o != nullptr; o = nl_cache_get_next(o)) {
    auto* a = reinterpret_cast<rtnl_addr*>(o);
    if (rtnl_addr_get_ifindex(a) != ifindex || rtnl_addr_get_family(a) != AF_INET) continue;
    const std::optional<Ipv4Address> local = to_ipv4(rtnl_addr_get_local(a));
    if (!local) continue;
    nl_object_get(o);
    out.push_back({*local, rtnl_addr_get_prefixlen(a), RtnlAddrPtr(a)});
  }
  return out;
}

// Removes every IPv4 address of the interface except `keep` (address and prefix).
Status remove_ipv4_except(nl_sock* sock, int ifindex, const std::string& name,
                          std::optional<std::pair<Ipv4Address, int>> keep) {
  NM_ASSIGN_OR_RETURN(std::vector<Ipv4Entry> entries, ipv4_entries(sock, ifindex, name));
  for (const Ipv4Entry& e : entries) {
    if (keep && keep->first == e.address && keep->second == e.prefix) continue;
    const int err = rtnl_addr_delete(sock, e.object.get(), 0);
    if (err < 0 && err != -NLE_NOADDR && err != -NLE_OBJ_NOTFOUND) {
      return nl_status(err, "removing address " + e.address.str() + " from " + quote(name));
    }
  }
  return Status::ok();
}

std::optional<Ipv4Address> first_ipv4(const std::vector<Ipv4Entry>& entries) {
  if (entries.empty()) return std::nullopt;
  return entries.front().address;
}

// True when the existing VXLAN device has every parameter the kernel cannot change in place.
bool vxlan_matches(rtnl_link* link, const VxlanConfig& config, int underlay, Ipv4Address local) {
  uint32_t id = 0;
  uint32_t dev = 0;
  uint32_t port = 0;
  if (rtnl_link_vxlan_get_id(link, &id) < 0 || id != config.vni.value()) return false;
  if (rtnl_link_vxlan_get_link(link, &dev) < 0 || dev != static_cast<uint32_t>(underlay)) {
    return false;
  }
  if (rtnl_link_vxlan_get_port(link, &port) < 0 || port != config.dstport) return false;
  if (rtnl_link_vxlan_get_learning(link) != 1) return false;
  nl_addr* raw = nullptr;
  if (rtnl_link_vxlan_get_local(link, &raw) < 0) return false;
  const NlAddrPtr addr(raw);
  return to_ipv4(addr.get()) == local;
}

Status create_vxlan(nl_sock* sock, const VxlanConfig& config, int underlay, Ipv4Address local) {
  const std::string what = "creating vxlan " + quote(config.name);
  LinkPtr link(rtnl_link_vxlan_alloc());
  if (!link) return out_of_memory(what);
  NM_ASSIGN_OR_RETURN(NlAddrPtr local_addr, to_nl_addr(local, 32));
  rtnl_link_set_name(link.get(), config.name.c_str());
  for (const int err : {rtnl_link_vxlan_set_id(link.get(), config.vni.value()),
                        rtnl_link_vxlan_set_link(link.get(), static_cast<uint32_t>(underlay)),
                        rtnl_link_vxlan_set_local(link.get(), local_addr.get()),
                        rtnl_link_vxlan_set_port(link.get(), config.dstport),
                        rtnl_link_vxlan_set_learning(link.get(), 1)}) {
    if (err < 0) return nl_status(err, what);
  }
  if (const int err = rtnl_link_add(sock, link.get(), NLM_F_CREATE | NLM_F_EXCL); err < 0) {
    return nl_status(err, what);
  }
  return Status::ok();
}

// The all-zeros FDB entry of `ifindex` towards `peer`, as the kernel wants it for add and delete.
Result<NeighPtr> flood_entry(int ifindex, Ipv4Address peer) {
  static constexpr std::array<uint8_t, 6> kZeroMac{};
  NeighPtr neigh(rtnl_neigh_alloc());
  if (!neigh) return out_of_memory("building flood entry");
  NlAddrPtr lladdr(nl_addr_build(AF_LLC, kZeroMac.data(), kZeroMac.size()));
  if (!lladdr) return out_of_memory("building flood entry");
  NM_ASSIGN_OR_RETURN(NlAddrPtr dst, to_nl_addr(peer, 32));
  // The destination first: it sets the family to AF_INET, which AF_BRIDGE then overrides.
  if (const int err = rtnl_neigh_set_dst(neigh.get(), dst.get()); err < 0) {
    return nl_status(err, "building flood entry to " + peer.str());
  }
  rtnl_neigh_set_family(neigh.get(), AF_BRIDGE);
  rtnl_neigh_set_ifindex(neigh.get(), ifindex);
  rtnl_neigh_set_lladdr(neigh.get(), lladdr.get());
  rtnl_neigh_set_state(neigh.get(), NUD_NOARP | NUD_PERMANENT);
  rtnl_neigh_set_flags(neigh.get(), NTF_SELF);
  return neigh;
}

Result<std::set<Ipv4Address>> read_flood_peers(nl_sock* sock, int ifindex,
                                               const std::string& name) {
  nl_cache* raw = nullptr;
  // NL_CACHE_AF_ITER: the AF_UNSPEC dump holds the neighbour tables, the FDB is AF_BRIDGE's.
  const int err = rtnl_neigh_alloc_cache_flags(sock, &raw, NL_CACHE_AF_ITER);
  CachePtr cache(raw);
  if (err < 0) return nl_status(err, "listing the FDB of " + quote(name));
  std::set<Ipv4Address> out;
  for (nl_object* o = nl_cache_get_first(cache.get()); o != nullptr; o = nl_cache_get_next(o)) {
    auto* n = reinterpret_cast<rtnl_neigh*>(o);
    if (rtnl_neigh_get_family(n) != AF_BRIDGE || rtnl_neigh_get_ifindex(n) != ifindex) continue;
    nl_addr* lladdr = rtnl_neigh_get_lladdr(n);
    if (lladdr == nullptr || nl_addr_iszero(lladdr) == 0) continue;
    if (const std::optional<Ipv4Address> dst = to_ipv4(rtnl_neigh_get_dst(n))) out.insert(*dst);
  }
  return out;
}

Result<LinkPtr> get_vxlan(nl_sock* sock, const std::string& name) {
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return not_found("vxlan " + quote(name) + " does not exist");
  NM_RETURN_IF_ERROR(expect_kind(link.get(), "vxlan", name));
  return link;
}

Status create_tap(const std::string& name) {
  const std::string what = "creating tap " + quote(name);
  UniqueFd fd(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return sys_status(errno, what + ": opening /dev/net/tun");
  ifreq req{};
  std::memcpy(req.ifr_name, name.data(), std::min(name.size(), sizeof(req.ifr_name) - 1));
  req.ifr_flags = IFF_TAP | IFF_NO_PI;
  if (::ioctl(fd.get(), TUNSETIFF, &req) != 0) return sys_status(errno, what);
  if (::ioctl(fd.get(), TUNSETPERSIST, 1) != 0) return sys_status(errno, what + ": persist");
  return Status::ok();
}

// --- Named network namespaces (iproute2's layout).

bool is_net_namespace(int fd) {
  return ::ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET;
}

// Like `ip netns add`: the directory becomes a shared mount point, so that a namespace unmounted
// there is unmounted in every mount namespace and can be freed.
Status make_shared_mount_point(const std::string& dir) {
  const std::string what = "making " + quote(dir) + " a shared mount point";
  if (::mount("", dir.c_str(), "none", MS_SHARED | MS_REC, nullptr) == 0) return Status::ok();
  if (errno != EINVAL) return sys_status(errno, what);
  if (::mount(dir.c_str(), dir.c_str(), "none", MS_BIND | MS_REC, nullptr) != 0) {
    return sys_status(errno, what);
  }
  if (::mount("", dir.c_str(), "none", MS_SHARED | MS_REC, nullptr) != 0) {
    return sys_status(errno, what);
  }
  return Status::ok();
}

// Opens the namespace bound at `path`, creating and binding a new one when the file is missing
// or is not a network namespace (left over by a crash between creating and binding).
Result<UniqueFd> ensure_netns_bound(const std::string& dir, const std::string& name) {
  const std::string path = dir + "/" + name;
  const std::string what = "creating network namespace " + quote(name);
  {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (fd.valid() && is_net_namespace(fd.get())) return fd;
    if (!fd.valid() && errno != ENOENT) return sys_status(errno, "opening " + quote(path));
  }
  NM_RETURN_IF_ERROR(make_dirs(dir));
  NM_RETURN_IF_ERROR(make_shared_mount_point(dir));
  {
    UniqueFd file(::open(path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0));
    if (!file.valid()) return sys_status(errno, what + ": creating " + quote(path));
  }
  const Status bound = run_on_own_thread(
      [&]() -> Status {
        if (::unshare(CLONE_NEWNET) != 0) return sys_status(errno, what);
        if (::mount("/proc/thread-self/ns/net", path.c_str(), "none", MS_BIND, nullptr) != 0) {
          return sys_status(errno, what + ": binding it at " + quote(path));
        }
        return Status::ok();
      },
      what);
  if (!bound.is_ok()) {
    ::unlink(path.c_str());
    return bound;
  }
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return sys_status(errno, "opening " + quote(path));
  return fd;
}

struct InnerEnd {
  bool exists = false;
  std::string kind;
  int ifindex = 0;
  int peer_ifindex = 0;  // IFLA_LINK: the peer's index in its own namespace
};

Status probe_inner(nl_sock* sock, const std::string& name, InnerEnd& out) {
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return Status::ok();
  out = {.exists = true,
         .kind = kind_of(link.get()),
         .ifindex = rtnl_link_get_ifindex(link.get()),
         .peer_ifindex = rtnl_link_get_link(link.get())};
  return Status::ok();
}

Status delete_by_name(nl_sock* sock, const std::string& name) {
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return Status::ok();
  return delete_link_object(sock, link.get(), name);
}

Status create_dhcp_veth(nl_sock* sock, const DhcpNamespaceConfig& config, int ns_fd) {
  const std::string what =
      "creating veth " + quote(config.host_ifname) + " into namespace " + quote(config.netns);
  LinkPtr veth(rtnl_link_veth_alloc());
  if (!veth) return out_of_memory(what);
  const LinkPtr peer(rtnl_link_veth_get_peer(veth.get()));
  if (!peer) return out_of_memory(what);
  rtnl_link_set_name(veth.get(), config.host_ifname.c_str());
  rtnl_link_set_name(peer.get(), config.inner_ifname.c_str());
  rtnl_link_set_ns_fd(peer.get(), ns_fd);
  if (const int err = rtnl_link_add(sock, veth.get(), NLM_F_CREATE | NLM_F_EXCL); err < 0) {
    return nl_status(err, what);
  }
  return Status::ok();
}

// Inside the DHCP namespace: the address on the inner end (and no other IPv4), the inner end
// and the loopback up.
Status configure_inner(nl_sock* sock, const DhcpNamespaceConfig& config) {
  const std::string& name = config.inner_ifname;
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return not_found("veth end " + quote(name) + " is missing in " + quote(config.netns));
  const int ifindex = rtnl_link_get_ifindex(link.get());
  const int prefix = config.subnet.prefix();
  NM_RETURN_IF_ERROR(
      remove_ipv4_except(sock, ifindex, name, std::make_pair(config.address, prefix)));
  NM_ASSIGN_OR_RETURN(std::vector<Ipv4Entry> entries, ipv4_entries(sock, ifindex, name));
  if (entries.empty()) {
    const std::string what = "adding address " + config.address.str() + " to " + quote(name);
    RtnlAddrPtr addr(rtnl_addr_alloc());
    if (!addr) return out_of_memory(what);
    NM_ASSIGN_OR_RETURN(NlAddrPtr local, to_nl_addr(config.address, prefix));
    NM_ASSIGN_OR_RETURN(NlAddrPtr broadcast, to_nl_addr(config.subnet.broadcast(), prefix));
    rtnl_addr_set_ifindex(addr.get(), ifindex);
    for (const int err : {rtnl_addr_set_local(addr.get(), local.get()),
                          rtnl_addr_set_broadcast(addr.get(), broadcast.get())}) {
      if (err < 0) return nl_status(err, what);
    }
    if (const int err = rtnl_addr_add(sock, addr.get(), 0); err < 0) return nl_status(err, what);
  }
  NM_RETURN_IF_ERROR(ensure_up_on(sock, link.get(), 0, "bringing up " + quote(name)));
  NM_ASSIGN_OR_RETURN(LinkPtr lo, find_link(sock, "lo"));
  if (!lo) return not_found("loopback missing in " + quote(config.netns));
  return ensure_up_on(sock, lo.get(), 0, "bringing up the loopback of " + quote(config.netns));
}

// Inside a namespace being deleted: every veth goes, and with it its peer in the host namespace.
Status delete_veths(nl_sock* sock, const std::string& netns) {
  nl_cache* raw = nullptr;
  const int err = rtnl_link_alloc_cache(sock, AF_UNSPEC, &raw);
  CachePtr cache(raw);
  if (err < 0) return nl_status(err, "listing the links of " + quote(netns));
  for (nl_object* o = nl_cache_get_first(cache.get()); o != nullptr; o = nl_cache_get_next(o)) {
    auto* link = reinterpret_cast<rtnl_link*>(o);
    if (kind_of(link) != "veth") continue;
    NM_RETURN_IF_ERROR(delete_link_object(sock, link, rtnl_link_get_name(link)));
  }
  return Status::ok();
}

}  // namespace

struct NetlinkLinks::Socket {
  NlSockPtr sock;
};

NetlinkLinks::NetlinkLinks(Options options, std::unique_ptr<Socket> socket)
    : options_(std::move(options)), socket_(std::move(socket)) {}

NetlinkLinks::~NetlinkLinks() = default;

Result<std::unique_ptr<NetlinkLinks>> NetlinkLinks::create(Options options) {
  if (options.netns_dir.empty() || options.netns_dir.front() != '/') {
    return invalid_argument("netns_dir: " + quote(options.netns_dir) + " is not absolute");
  }
  NM_ASSIGN_OR_RETURN(NlSockPtr sock, connect_route());
  auto socket = std::make_unique<Socket>(Socket{std::move(sock)});
  return std::unique_ptr<NetlinkLinks>(new NetlinkLinks(std::move(options), std::move(socket)));
}

Status NetlinkLinks::ensure_bridge(const std::string& name) {
  NM_RETURN_IF_ERROR(check_ifname(name, "bridge"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) {
    const std::string what = "creating bridge " + quote(name);
    LinkPtr bridge(rtnl_link_bridge_alloc());
    if (!bridge) return out_of_memory(what);
    rtnl_link_set_name(bridge.get(), name.c_str());
    if (const int err = rtnl_link_add(sock, bridge.get(), NLM_F_CREATE | NLM_F_EXCL); err < 0) {
      return nl_status(err, what);
    }
    NM_ASSIGN_OR_RETURN(link, find_link(sock, name));
    if (!link) return internal_error(what + ": gone right after creation");
  } else {
    NM_RETURN_IF_ERROR(expect_kind(link.get(), "bridge", name));
  }
  NM_RETURN_IF_ERROR(disable_ipv6(name));
  NM_RETURN_IF_ERROR(
      remove_ipv4_except(sock, rtnl_link_get_ifindex(link.get()), name, std::nullopt));
  return ensure_up_on(sock, link.get(), 0, "bringing up bridge " + quote(name));
}

Status NetlinkLinks::ensure_vxlan(const VxlanConfig& config) {
  NM_RETURN_IF_ERROR(check_ifname(config.name, "vxlan"));
  NM_RETURN_IF_ERROR(check_ifname(config.underlay, "underlay"));
  NM_RETURN_IF_ERROR(check_ifname(config.bridge, "bridge"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr underlay, find_link(sock, config.underlay));
  if (!underlay) return not_found("underlay " + quote(config.underlay) + " does not exist");
  const int underlay_index = rtnl_link_get_ifindex(underlay.get());
  NM_ASSIGN_OR_RETURN(std::vector<Ipv4Entry> underlay_addrs,
                      ipv4_entries(sock, underlay_index, config.underlay));
  const std::optional<Ipv4Address> local = first_ipv4(underlay_addrs);
  if (!local) {
    return unavailable("underlay " + quote(config.underlay) + " has no IPv4 address");
  }
  NM_ASSIGN_OR_RETURN(LinkPtr bridge, get_bridge(sock, config.bridge));

  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, config.name));
  if (link) {
    NM_RETURN_IF_ERROR(expect_kind(link.get(), "vxlan", config.name));
    if (!vxlan_matches(link.get(), config, underlay_index, *local)) {
      NM_RETURN_IF_ERROR(delete_link_object(sock, link.get(), config.name));
      link.reset();
    }
  }
  if (!link) {
    NM_RETURN_IF_ERROR(create_vxlan(sock, config, underlay_index, *local));
    NM_ASSIGN_OR_RETURN(link, find_link(sock, config.name));
    if (!link) return internal_error("vxlan " + quote(config.name) + " gone after creation");
  }
  NM_RETURN_IF_ERROR(disable_ipv6(config.name));
  return ensure_up_on(sock, link.get(), rtnl_link_get_ifindex(bridge.get()),
                      "attaching vxlan " + quote(config.name) + " to " + quote(config.bridge));
}

Status NetlinkLinks::set_flood_peers(const std::string& vxlan,
                                     const std::vector<Ipv4Address>& peers) {
  NM_RETURN_IF_ERROR(check_ifname(vxlan, "vxlan"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr link, get_vxlan(sock, vxlan));
  const int ifindex = rtnl_link_get_ifindex(link.get());
  NM_ASSIGN_OR_RETURN(std::set<Ipv4Address> current, read_flood_peers(sock, ifindex, vxlan));
  const std::set<Ipv4Address> wanted(peers.begin(), peers.end());
  for (const Ipv4Address& peer : wanted) {
    if (current.contains(peer)) continue;
    NM_ASSIGN_OR_RETURN(NeighPtr entry, flood_entry(ifindex, peer));
    const int err = rtnl_neigh_add(sock, entry.get(), NLM_F_CREATE | NLM_F_APPEND);
    if (err < 0) {
      return nl_status(err, "adding flood peer " + peer.str() + " to " + quote(vxlan));
    }
  }
  for (const Ipv4Address& peer : current) {
    if (wanted.contains(peer)) continue;
    NM_ASSIGN_OR_RETURN(NeighPtr entry, flood_entry(ifindex, peer));
    const int err = rtnl_neigh_delete(sock, entry.get(), 0);
    if (err < 0 && err != -NLE_OBJ_NOTFOUND) {
      return nl_status(err, "removing flood peer " + peer.str() + " from " + quote(vxlan));
    }
  }
  return Status::ok();
}

Result<std::vector<Ipv4Address>> NetlinkLinks::flood_peers(const std::string& vxlan) {
  NM_RETURN_IF_ERROR(check_ifname(vxlan, "vxlan"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr link, get_vxlan(sock, vxlan));
  NM_ASSIGN_OR_RETURN(std::set<Ipv4Address> peers,
                      read_flood_peers(sock, rtnl_link_get_ifindex(link.get()), vxlan));
  return std::vector<Ipv4Address>(peers.begin(), peers.end());
}

Status NetlinkLinks::ensure_tap(const std::string& name, const std::string& bridge) {
  NM_RETURN_IF_ERROR(check_ifname(name, "tap"));
  NM_RETURN_IF_ERROR(check_ifname(bridge, "bridge"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr br, get_bridge(sock, bridge));
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (link) {
    NM_RETURN_IF_ERROR(expect_kind(link.get(), "tun", name));
    if (rtnl_link_get_arptype(link.get()) != ARPHRD_ETHER) {
      return conflict("link " + quote(name) + " exists and is a tun, not a tap");
    }
  } else {
    NM_RETURN_IF_ERROR(create_tap(name));
    NM_ASSIGN_OR_RETURN(link, find_link(sock, name));
    if (!link) return internal_error("tap " + quote(name) + " gone after creation");
  }
  NM_RETURN_IF_ERROR(disable_ipv6(name));
  return ensure_up_on(sock, link.get(), rtnl_link_get_ifindex(br.get()),
                      "attaching tap " + quote(name) + " to " + quote(bridge));
}

Status NetlinkLinks::attach_port(const std::string& name, const std::string& bridge) {
  NM_RETURN_IF_ERROR(check_ifname(name, "port"));
  NM_RETURN_IF_ERROR(check_ifname(bridge, "bridge"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr br, get_bridge(sock, bridge));
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, name));
  if (!link) return Status::ok();
  return ensure_up_on(sock, link.get(), rtnl_link_get_ifindex(br.get()),
                      "attaching port " + quote(name) + " to " + quote(bridge));
}

Status NetlinkLinks::ensure_dhcp_namespace(const DhcpNamespaceConfig& config) {
  NM_RETURN_IF_ERROR(check_netns_name(config.netns));
  NM_RETURN_IF_ERROR(check_ifname(config.host_ifname, "host_ifname"));
  NM_RETURN_IF_ERROR(check_ifname(config.inner_ifname, "inner_ifname"));
  NM_RETURN_IF_ERROR(check_ifname(config.bridge, "bridge"));
  if (!config.subnet.contains(config.address)) {
    return invalid_argument("address: " + config.address.str() + " is not in subnet " +
                            config.subnet.str());
  }
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr bridge, get_bridge(sock, config.bridge));
  NM_ASSIGN_OR_RETURN(LinkPtr host, find_link(sock, config.host_ifname));
  if (host) NM_RETURN_IF_ERROR(expect_kind(host.get(), "veth", config.host_ifname));
  NM_ASSIGN_OR_RETURN(UniqueFd ns, ensure_netns_bound(options_.netns_dir, config.netns));
  const std::string in_ns = "in namespace " + quote(config.netns);

  InnerEnd inner;
  NM_RETURN_IF_ERROR(run_in_netns(
      ns.get(), [&](nl_sock* s) { return probe_inner(s, config.inner_ifname, inner); }, in_ns));
  const bool paired = host && inner.exists && inner.kind == "veth" &&
                      rtnl_link_get_link(host.get()) == inner.ifindex &&
                      inner.peer_ifindex == rtnl_link_get_ifindex(host.get());
  if (!paired) {
    if (host) NM_RETURN_IF_ERROR(delete_link_object(sock, host.get(), config.host_ifname));
    if (inner.exists) {
      NM_RETURN_IF_ERROR(run_in_netns(
          ns.get(), [&](nl_sock* s) { return delete_by_name(s, config.inner_ifname); }, in_ns));
    }
    NM_RETURN_IF_ERROR(create_dhcp_veth(sock, config, ns.get()));
    NM_ASSIGN_OR_RETURN(host, find_link(sock, config.host_ifname));
    if (!host) return internal_error("veth " + quote(config.host_ifname) + " gone after creation");
  }
  NM_RETURN_IF_ERROR(run_in_netns(
      ns.get(), [&](nl_sock* s) { return configure_inner(s, config); }, in_ns));
  NM_RETURN_IF_ERROR(disable_ipv6(config.host_ifname));
  NM_RETURN_IF_ERROR(remove_ipv4_except(sock, rtnl_link_get_ifindex(host.get()), config.host_ifname,
                                        std::nullopt));
  return ensure_up_on(
      sock, host.get(), rtnl_link_get_ifindex(bridge.get()),
      "attaching veth " + quote(config.host_ifname) + " to " + quote(config.bridge));
}

Status NetlinkLinks::delete_netns(const std::string& netns) {
  NM_RETURN_IF_ERROR(check_netns_name(netns));
  std::lock_guard lock(mu_);
  const std::string path = options_.netns_dir + "/" + netns;
  {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) return Status::ok();
      return sys_status(errno, "opening " + quote(path));
    }
    if (is_net_namespace(fd.get())) {
      NM_RETURN_IF_ERROR(run_in_netns(
          fd.get(), [&](nl_sock* s) { return delete_veths(s, netns); },
          "in namespace " + quote(netns)));
    }
  }
  if (::umount2(path.c_str(), MNT_DETACH) != 0 && errno != EINVAL && errno != ENOENT) {
    return sys_status(errno, "unmounting namespace " + quote(path));
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return sys_status(errno, "removing " + quote(path));
  }
  return Status::ok();
}

Status NetlinkLinks::delete_link(const std::string& name) {
  NM_RETURN_IF_ERROR(check_ifname(name, "link"));
  std::lock_guard lock(mu_);
  return delete_by_name(socket_->sock.get(), name);
}

Result<std::vector<LinkInfo>> NetlinkLinks::list_links() {
  std::lock_guard lock(mu_);
  nl_cache* raw = nullptr;
  const int err = rtnl_link_alloc_cache(socket_->sock.get(), AF_UNSPEC, &raw);
  CachePtr cache(raw);
  if (err < 0) return nl_status(err, "listing links");
  std::vector<LinkInfo> out;
  for (nl_object* o = nl_cache_get_first(cache.get()); o != nullptr; o = nl_cache_get_next(o)) {
    auto* link = reinterpret_cast<rtnl_link*>(o);
    LinkInfo info;
    info.name = rtnl_link_get_name(link);
    info.kind = kind_of(link);
    info.up = (rtnl_link_get_flags(link) & IFF_UP) != 0;
    if (const int master = rtnl_link_get_master(link); master > 0) {
      std::array<char, IFNAMSIZ> name{};
      if (rtnl_link_i2name(cache.get(), master, name.data(), name.size()) != nullptr) {
        info.master = std::string(name.data());
      }
    }
    out.push_back(std::move(info));
  }
  return out;
}

Result<std::vector<std::string>> NetlinkLinks::list_netns() {
  std::vector<std::string> out;
  std::error_code ec;
  for (std::filesystem::directory_iterator it(options_.netns_dir, ec), end; !ec && it != end;
       it.increment(ec)) {
    out.push_back(it->path().filename().string());
  }
  if (ec && ec != std::errc::no_such_file_or_directory) {
    return sys_status(ec.value(), "listing " + quote(options_.netns_dir));
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<std::vector<Ipv4Address>> NetlinkLinks::addresses(const std::string& ifname) {
  NM_RETURN_IF_ERROR(check_ifname(ifname, "ifname"));
  std::lock_guard lock(mu_);
  nl_sock* sock = socket_->sock.get();
  NM_ASSIGN_OR_RETURN(LinkPtr link, find_link(sock, ifname));
  if (!link) return not_found("link " + quote(ifname) + " does not exist");
  NM_ASSIGN_OR_RETURN(std::vector<Ipv4Entry> entries,
                      ipv4_entries(sock, rtnl_link_get_ifindex(link.get()), ifname));
  std::vector<Ipv4Address> out;
  out.reserve(entries.size());
  for (const Ipv4Entry& e : entries) out.push_back(e.address);
  return out;
}

}  // namespace nm::network
