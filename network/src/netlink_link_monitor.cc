#include <linux/if.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <utility>

#include "nm/core/fs.h"
#include "nm/network/link_monitor.h"

namespace nm::network {
namespace {

constexpr int kReceiveBufferBytes = 1 << 20;
constexpr size_t kDatagramBytes = size_t{64} * 1024;
constexpr int kMaxDatagramsPerRead = 4096;
constexpr size_t kMaxIfname = IFNAMSIZ - 1;

// The one translation of errno values into Status.
Status sys_status(int err, std::string_view what) {
  std::string message = std::string(what) + ": " + std::strerror(err);
  switch (err) {
    case EPERM:
    case EACCES:
      return {Code::kAccessDenied, std::move(message)};
    case ENOMEM:
    case ENOBUFS:
    case EAGAIN:
    case EPROTONOSUPPORT:
    case EAFNOSUPPORT:
      return unavailable(std::move(message));
    default:
      return internal_error(std::move(message));
  }
}

std::string quote(std::string_view s) {
  return "'" + std::string(s) + "'";
}

Status check_ifname(const std::string& name) {
  if (name.empty() || name.size() > kMaxIfname) {
    return invalid_argument("interface name " + quote(name) + " must have 1 to 15 characters");
  }
  const bool bad_char = std::any_of(name.begin(), name.end(), [](char c) {
    return c == '/' || c == ':' || std::isspace(static_cast<unsigned char>(c)) != 0;
  });
  if (bad_char || name == "." || name == "..") {
    return invalid_argument("interface name " + quote(name) + " may not hold '/', ':' or spaces");
  }
  return Status::ok();
}

// --- Reading netlink messages out of a datagram, by copy (no alignment assumptions).

template <typename T>
std::optional<T> read_at(std::span<const char> bytes, size_t offset) {
  if (offset > bytes.size() || bytes.size() - offset < sizeof(T)) return std::nullopt;
  T out;
  std::memcpy(&out, bytes.data() + offset, sizeof(T));
  return out;
}

size_t align(size_t n) {
  return (n + NLMSG_ALIGNTO - 1) & ~static_cast<size_t>(NLMSG_ALIGNTO - 1);
}

// One netlink message: its header and its payload.
struct Message {
  nlmsghdr header;
  std::span<const char> payload;
};

// The messages of `datagram`; stops at the first malformed one.
std::vector<Message> split(std::span<const char> datagram) {
  std::vector<Message> out;
  size_t offset = 0;
  while (const std::optional<nlmsghdr> h = read_at<nlmsghdr>(datagram, offset)) {
    if (h->nlmsg_len < sizeof(nlmsghdr) || h->nlmsg_len > datagram.size() - offset) break;
    const size_t header = align(sizeof(nlmsghdr));
    out.push_back({*h, datagram.subspan(offset + header, h->nlmsg_len - header)});
    offset += align(h->nlmsg_len);
  }
  return out;
}

std::string oper_state_name(uint8_t state) {
  switch (state) {
    case IF_OPER_NOTPRESENT:
      return "notpresent";
    case IF_OPER_DOWN:
      return "down";
    case IF_OPER_LOWERLAYERDOWN:
      return "lowerlayerdown";
    case IF_OPER_TESTING:
      return "testing";
    case IF_OPER_DORMANT:
      return "dormant";
    case IF_OPER_UP:
      return "up";
    default:
      return "unknown";
  }
}

// The link an RTM_NEWLINK / RTM_DELLINK payload describes (exists = true, even in a deletion);
// nullopt for other families (the bridge's per-port messages) and for messages without a name.
std::optional<LinkStatus> parse_link(std::span<const char> payload) {
  const std::optional<ifinfomsg> info = read_at<ifinfomsg>(payload, 0);
  if (!info || info->ifi_family != AF_UNSPEC) return std::nullopt;
  std::optional<std::string> name;
  uint8_t oper = IF_OPER_UNKNOWN;
  size_t offset = align(sizeof(ifinfomsg));
  while (const std::optional<rtattr> attr = read_at<rtattr>(payload, offset)) {
    if (attr->rta_len < sizeof(rtattr) || attr->rta_len > payload.size() - offset) break;
    const std::span<const char> data =
        payload.subspan(offset + RTA_LENGTH(0), attr->rta_len - RTA_LENGTH(0));
    const auto type = static_cast<uint16_t>(attr->rta_type & NLA_TYPE_MASK);
    if (type == IFLA_IFNAME) {
      name = std::string(data.data(), strnlen(data.data(), data.size()));
    } else if (type == IFLA_OPERSTATE && !data.empty()) {
      oper = static_cast<uint8_t>(data[0]);
    }
    offset += RTA_ALIGN(attr->rta_len);
  }
  if (!name || name->empty()) return std::nullopt;
  LinkStatus out;
  out.name = *name;
  out.exists = true;
  out.ifindex = info->ifi_index;
  out.admin_up = (info->ifi_flags & IFF_UP) != 0;
  const bool lower_up = (info->ifi_flags & IFF_LOWER_UP) != 0;
  out.carrier = oper == IF_OPER_UP || (oper == IF_OPER_UNKNOWN && lower_up);
  out.oper_state = oper_state_name(oper);
  return out;
}

LinkStatus absent(const std::string& name) {
  LinkStatus out;
  out.name = name;
  return out;
}

Result<UniqueFd> open_route_socket(int extra_flags, std::string_view what) {
  UniqueFd fd(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | extra_flags, NETLINK_ROUTE));
  if (!fd.valid()) return sys_status(errno, what);
  sockaddr_nl local{};
  local.nl_family = AF_NETLINK;
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&local), sizeof(local)) != 0) {
    return sys_status(errno, what);
  }
  return fd;
}

struct Datagram {
  ssize_t size = 0;  // < 0: errno in `error`
  int error = 0;
  bool truncated = false;
  bool from_kernel = false;
};

Datagram receive(int fd, std::vector<char>& buffer, int flags) {
  sockaddr_nl from{};
  iovec iov{buffer.data(), buffer.size()};
  msghdr msg{};
  msg.msg_name = &from;
  msg.msg_namelen = sizeof(from);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  Datagram out;
  do {
    out.size = ::recvmsg(fd, &msg, flags);
  } while (out.size < 0 && errno == EINTR);
  if (out.size < 0) {
    out.error = errno;
    return out;
  }
  out.truncated = (msg.msg_flags & MSG_TRUNC) != 0;
  out.from_kernel = from.nl_pid == 0;
  return out;
}

}  // namespace

struct NetlinkLinkMonitor::Sockets {
  UniqueFd events;  // subscribed to RTNLGRP_LINK, non-blocking
  UniqueFd query;   // requests and their answers, blocking with a timeout
  uint32_t sequence = 0;
  std::vector<char> buffer = std::vector<char>(kDatagramBytes);

  // Asks the kernel for the link named `name` on the query socket.
  Result<LinkStatus> ask(const std::string& name);
};

NetlinkLinkMonitor::NetlinkLinkMonitor(std::vector<std::string> names,
                                       std::unique_ptr<Sockets> sockets)
    : names_(std::move(names)), sockets_(std::move(sockets)) {}

NetlinkLinkMonitor::~NetlinkLinkMonitor() = default;

Result<std::unique_ptr<NetlinkLinkMonitor>> NetlinkLinkMonitor::create(
    std::vector<std::string> names) {
  std::vector<std::string> unique;
  for (std::string& name : names) {
    NM_RETURN_IF_ERROR(check_ifname(name));
    if (std::find(unique.begin(), unique.end(), name) == unique.end()) {
      unique.push_back(std::move(name));
    }
  }
  auto sockets = std::make_unique<Sockets>();
  NM_ASSIGN_OR_RETURN(sockets->events,
                      open_route_socket(SOCK_NONBLOCK, "opening the link event socket"));
  const int events = sockets->events.get();
  if (::setsockopt(events, SOL_SOCKET, SO_RCVBUFFORCE, &kReceiveBufferBytes,
                   sizeof(kReceiveBufferBytes)) != 0 &&
      ::setsockopt(events, SOL_SOCKET, SO_RCVBUF, &kReceiveBufferBytes,
                   sizeof(kReceiveBufferBytes)) != 0) {
    return sys_status(errno, "sizing the link event socket's buffer");
  }
  const int group = RTNLGRP_LINK;
  if (::setsockopt(events, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) != 0) {
    return sys_status(errno, "subscribing to link events");
  }
  NM_ASSIGN_OR_RETURN(sockets->query, open_route_socket(0, "opening the link query socket"));
  const timeval timeout{.tv_sec = 1, .tv_usec = 0};
  if (::setsockopt(sockets->query.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout)) != 0) {
    return sys_status(errno, "setting the link query socket's timeout");
  }

  std::unique_ptr<NetlinkLinkMonitor> monitor(
      new NetlinkLinkMonitor(std::move(unique), std::move(sockets)));
  for (const std::string& name : monitor->names_) {
    NM_RETURN_IF_ERROR(monitor->query(name).status());
  }
  return monitor;
}

int NetlinkLinkMonitor::fd() const {
  return sockets_->events.get();
}

void NetlinkLinkMonitor::set_current(const LinkStatus& status) {
  LinkStatus& current = current_[status.name];
  if (current.exists) watched_index_.erase(current.ifindex);
  if (status.exists) {
    if (const auto held = watched_index_.find(status.ifindex);
        held != watched_index_.end() && held->second != status.name) {
      current_[held->second] = absent(held->second);
    }
    watched_index_[status.ifindex] = status.name;
  }
  current = status;
}

void NetlinkLinkMonitor::apply(const LinkStatus& status, bool deleted) {
  // The watched name this link held, when it no longer holds it (deleted or renamed).
  if (const auto held = watched_index_.find(status.ifindex);
      held != watched_index_.end() && (deleted || held->second != status.name)) {
    current_[held->second] = absent(held->second);
    watched_index_.erase(held);
  }
  if (deleted || !current_.contains(status.name)) return;
  set_current(status);
}

Result<std::vector<LinkStatus>> NetlinkLinkMonitor::read_changes() {
  bool overrun = resync_pending_;
  for (int i = 0; i < kMaxDatagramsPerRead; ++i) {
    const Datagram d = receive(sockets_->events.get(), sockets_->buffer, MSG_DONTWAIT);
    if (d.size < 0) {
      if (d.error == EAGAIN || d.error == EWOULDBLOCK) break;
      if (d.error == ENOBUFS) {
        overrun = true;
        continue;
      }
      return sys_status(d.error, "reading link events");
    }
    if (d.truncated) overrun = true;
    if (d.truncated || !d.from_kernel) continue;
    const std::span<const char> bytes(sockets_->buffer.data(), static_cast<size_t>(d.size));
    for (const Message& m : split(bytes)) {
      const uint16_t type = m.header.nlmsg_type;
      if (type != RTM_NEWLINK && type != RTM_DELLINK) continue;
      if (const std::optional<LinkStatus> link = parse_link(m.payload)) {
        apply(*link, type == RTM_DELLINK);
      }
    }
  }

  std::vector<LinkStatus> out;
  if (overrun) {
    resync_pending_ = true;
    for (const std::string& name : names_) {
      NM_ASSIGN_OR_RETURN(LinkStatus status, sockets_->ask(name));
      set_current(status);
    }
    resync_pending_ = false;
    for (const std::string& name : names_) {
      reported_[name] = current_[name];
      out.push_back(current_[name]);
    }
    return out;
  }
  for (const std::string& name : names_) {
    const LinkStatus& current = current_[name];
    LinkStatus& reported = reported_[name];
    if (current == reported) continue;
    reported = current;
    out.push_back(current);
  }
  return out;
}

Result<LinkStatus> NetlinkLinkMonitor::query(const std::string& name) {
  NM_RETURN_IF_ERROR(check_ifname(name));
  NM_ASSIGN_OR_RETURN(LinkStatus status, sockets_->ask(name));
  if (std::find(names_.begin(), names_.end(), name) != names_.end()) {
    set_current(status);
    reported_[name] = status;
  }
  return status;
}

Result<LinkStatus> NetlinkLinkMonitor::Sockets::ask(const std::string& name) {
  const std::string what = "querying link " + quote(name);
  const uint32_t seq = ++sequence;

  // RTM_GETLINK for one name: header, ifinfomsg, IFLA_IFNAME.
  const size_t name_attr = RTA_LENGTH(name.size() + 1);
  const size_t total = align(sizeof(nlmsghdr)) + align(sizeof(ifinfomsg)) + RTA_ALIGN(name_attr);
  std::vector<char> request(total, 0);
  nlmsghdr header{};
  header.nlmsg_len = static_cast<uint32_t>(total);
  header.nlmsg_type = RTM_GETLINK;
  header.nlmsg_flags = NLM_F_REQUEST;
  header.nlmsg_seq = seq;
  ifinfomsg info{};
  info.ifi_family = AF_UNSPEC;
  rtattr attr{};
  attr.rta_len = static_cast<uint16_t>(name_attr);
  attr.rta_type = IFLA_IFNAME;
  size_t offset = 0;
  std::memcpy(request.data(), &header, sizeof(header));
  offset += align(sizeof(nlmsghdr));
  std::memcpy(request.data() + offset, &info, sizeof(info));
  offset += align(sizeof(ifinfomsg));
  std::memcpy(request.data() + offset, &attr, sizeof(attr));
  std::memcpy(request.data() + offset + RTA_LENGTH(0), name.c_str(), name.size() + 1);

  sockaddr_nl kernel{};
  kernel.nl_family = AF_NETLINK;
  ssize_t sent = 0;
  do {
    sent = ::sendto(query.get(), request.data(), request.size(), 0,
                    reinterpret_cast<const sockaddr*>(&kernel), sizeof(kernel));
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) return sys_status(errno, what);

  for (;;) {
    const Datagram d = receive(query.get(), buffer, 0);
    if (d.size < 0) return sys_status(d.error, what);
    if (!d.from_kernel) continue;
    if (d.truncated) return internal_error(what + ": the answer does not fit in 64 KiB");
    const std::span<const char> bytes(buffer.data(), static_cast<size_t>(d.size));
    for (const Message& m : split(bytes)) {
      if (m.header.nlmsg_seq != seq) continue;  // a late answer to a timed-out query
      if (m.header.nlmsg_type == NLMSG_ERROR) {
        const std::optional<nlmsgerr> err = read_at<nlmsgerr>(m.payload, 0);
        if (!err) return internal_error(what + ": malformed error answer");
        if (err->error == -ENODEV) return absent(name);
        if (err->error == 0) continue;
        return sys_status(-err->error, what);
      }
      if (m.header.nlmsg_type != RTM_NEWLINK) continue;
      const std::optional<LinkStatus> link = parse_link(m.payload);
      if (!link || link->name != name) {
        return internal_error(what + ": the kernel answered about another link");
      }
      return *link;
    }
  }
}

}  // namespace nm::network
