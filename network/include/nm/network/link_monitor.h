// LinkMonitor port: the state of a few named network links (the uplink / VXLAN underlay), pushed by
// the kernel as events, for the node's health.
//
// Adapter: NetlinkLinkMonitor (an rtnetlink socket subscribed to RTNLGRP_LINK, below and in
// network/src/netlink_link_monitor.cc). No polling: the kernel sends a message on every change of
// a link, the caller's event loop waits for the fd to become readable and then drains it with
// read_changes().
//
// Links are watched by name, as the configuration names them. A watched name that no link holds
// is reported with exists = false; it becomes true again when a link of that name appears (created
// anew, renamed to it, moved into the namespace). Renaming a link away from a watched name, or
// deleting it, or moving it to another namespace, makes that name not exist.
//
// Threading: no thread of its own and no locking. Every method must be called from one thread at
// a time: the daemon's event loop, which owns the fd. The monitor works in the network namespace of
// the thread that called create().
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nm/core/status.h"

namespace nm::network {

// The state of one watched link name, as the kernel last reported it.
struct LinkStatus {
  std::string name;     // the watched name
  bool exists = false;  // a link of this name exists in the namespace; when false every field
                        // below is at its default
  int ifindex = 0;      // the kernel's interface index (a link deleted and recreated gets another)
  bool admin_up = false;  // IFF_UP: the administrator's (or our) "ip link set up"
  // The link can pass traffic: the kernel's operational state is "up", or it is "unknown" and the
  // driver reports a lower layer (IFF_LOWER_UP). "unknown" is what drivers that do not track
  // operational state report: the loopback and some virtual or older devices, which then count as
  // having carrier whenever they are up. An administratively down link never has carrier (the
  // kernel clears IFF_LOWER_UP then). "dormant" and "testing" count as no carrier.
  bool carrier = false;
  // RFC 2863 operational state, as iproute2 prints it in lower case: "up", "down",
  // "lowerlayerdown" (the peer or lower device is down), "dormant", "testing", "notpresent",
  // "unknown". Empty when the link does not exist.
  std::string oper_state;

  bool operator==(const LinkStatus&) const = default;
};

class LinkMonitor {
 public:
  virtual ~LinkMonitor() = default;

  // The fd to wait on for readability (the daemon registers it in its sd-event loop with EPOLLIN).
  // Owned by the monitor; valid until it is destroyed. Readable when read_changes() has work.
  virtual int fd() const = 0;

  // Reads every pending kernel message without waiting for more, and returns the current status
  // of each watched name whose status differs from the one last returned for it (by read_changes()
  // or query()), in the order the names were given; empty when nothing watched changed (messages
  // about other links, or about changes that leave the status as it was, such as an MTU change).
  // Several changes of one link between two calls yield one entry: its latest status. A change
  // that is undone before the call (a flap faster than the loop) may therefore yield nothing.
  //
  // When the kernel had to drop messages because the socket's buffer was full (ENOBUFS: a storm of
  // link events), every watched name is queried anew and all of them are returned, changed or not.
  // That recovery makes one netlink round trip per watched name (answered by the kernel at once);
  // otherwise the call never waits. It handles a bounded number of messages per call: when more
  // are pending, the fd stays readable and the next call goes on.
  //
  // Errors: a failing socket read or recovery query (Unavailable / Internal with errno's text).
  // After an error the next call resumes; a recovery that failed is retried then.
  virtual Result<std::vector<LinkStatus>> read_changes() = 0;

  // The current status of the link named `name` (watched or not), asked of the kernel (start-up,
  // or to double-check). exists = false when there is no such link. For a watched name it also
  // becomes the status read_changes() compares against. InvalidArgument when `name` cannot be an
  // interface name (empty, over 15 characters, holding '/', ':' or whitespace).
  virtual Result<LinkStatus> query(const std::string& name) = 0;
};

// LinkMonitor over rtnetlink (a raw NETLINK_ROUTE socket: the same parser serves events and query
// answers, and an overrun is told apart from an out-of-memory error, which libnl merges).
//
// The event socket is non-blocking and close-on-exec, asks for a receive buffer of 1 MiB (room for
// hundreds of link messages between two reads; SO_RCVBUFFORCE, falling back to the system's
// maximum without CAP_NET_ADMIN) and takes only messages sent by the kernel. Queries use a second,
// blocking socket with a 1 s receive timeout, so answers never mix with events. Only messages of
// the link family count: the bridge's per-port messages (family AF_BRIDGE, also sent when a port
// merely leaves its bridge) are ignored.
//
// Latency: a message is queued on the socket in the same kernel context as the change, except
// carrier changes, which the kernel's link watch publishes from a work queue: at once for virtual
// devices (veth, VXLAN, VLAN) and for a carrier coming up, but for a physical NIC losing carrier
// up to 1 s later when another link event happened within the last second.
class NetlinkLinkMonitor final : public LinkMonitor {
 public:
  // Subscribes to link events first, then queries every name (so no change falls between the two):
  // those statuses are the baseline of the first read_changes(). Duplicate names count once.
  // InvalidArgument naming a bad interface name; Unavailable / AccessDenied / Internal when a
  // socket cannot be opened, bound or subscribed, or a query fails.
  static Result<std::unique_ptr<NetlinkLinkMonitor>> create(std::vector<std::string> names);

  ~NetlinkLinkMonitor() override;
  NetlinkLinkMonitor(const NetlinkLinkMonitor&) = delete;
  NetlinkLinkMonitor& operator=(const NetlinkLinkMonitor&) = delete;

  int fd() const override;
  Result<std::vector<LinkStatus>> read_changes() override;
  Result<LinkStatus> query(const std::string& name) override;

 private:
  struct Sockets;  // the two netlink sockets and the receive buffer (.cc only)

  NetlinkLinkMonitor(std::vector<std::string> names, std::unique_ptr<Sockets> sockets);

  // Records `status` as the current one of its (watched) name and binds its ifindex to it.
  void set_current(const LinkStatus& status);
  // Applies one link message (a new or changed link, or a deleted one) to the current statuses.
  void apply(const LinkStatus& status, bool deleted);

  const std::vector<std::string> names_;  // watched, in the caller's order, without duplicates
  std::unique_ptr<Sockets> sockets_;
  std::map<std::string, LinkStatus> current_;   // per watched name: the kernel's latest word
  std::map<std::string, LinkStatus> reported_;  // per watched name: what the caller last got
  std::map<int, std::string> watched_index_;    // ifindex -> the watched name it holds
  bool resync_pending_ = false;                 // an overrun's recovery still has to run
};

}  // namespace nm::network
