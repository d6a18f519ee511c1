#include "nm/network/dnsmasq_dhcp.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "nm/core/fs.h"
#include "nm/network/names.h"
#include "nm/network/process_runner.h"

namespace nm::network {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;
using SteadyTime = std::chrono::steady_clock::time_point;

constexpr milliseconds kFirstRestartDelay = seconds(1);
constexpr milliseconds kMaxRestartDelay = seconds(30);
constexpr milliseconds kStopGrace = seconds(2);
constexpr const char* kLeaseTime = "1h";

bool is_plain_name(const std::string& s) {
  if (s.empty() || s.size() > 64 || s == "." || s == "..") return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

bool is_usable_host_address(const Ipv4Cidr& subnet, Ipv4Address a) {
  return subnet.contains(a) && a != subnet.network() && a != subnet.broadcast();
}

uint64_t mac_key(const MacAddress& mac) {
  uint64_t key = 0;
  for (const uint8_t b : mac.bytes()) key = (key << 8) | b;
  return key;
}

Status validate(const DhcpServerConfig& c) {
  if (!is_plain_name(c.key)) {
    return invalid_argument("dhcp server key '" + c.key + "': not a plain name");
  }
  const std::string what = "dhcp server '" + c.key + "'";
  if (!is_plain_name(c.netns)) {
    return invalid_argument(what + ": netns '" + c.netns + "' is not a plain name");
  }
  if (c.ifname.empty() || c.ifname.size() > kMaxIfnameLength || !is_plain_name(c.ifname)) {
    return invalid_argument(what + ": ifname '" + c.ifname + "' is not an interface name");
  }
  if (c.subnet.prefix() > 30) {
    return invalid_argument(what + ": subnet " + c.subnet.str() + " has no room for hosts");
  }
  if (!is_usable_host_address(c.subnet, c.server)) {
    return invalid_argument(what + ": server address " + c.server.str() +
                            " is not a host address of " + c.subnet.str());
  }
  if (c.mtu < 576 || c.mtu > 65535) {
    return invalid_argument(what + ": mtu " + std::to_string(c.mtu) + " is outside 576..65535");
  }
  // O(hosts) with small constants (ensure() gets every host of the network on each call): no
  // message is built unless a host is refused.
  std::vector<uint64_t> macs;
  std::vector<Ipv4Address> ips;
  macs.reserve(c.hosts.size());
  ips.reserve(c.hosts.size() + 1);
  ips.push_back(c.server);
  for (const auto& h : c.hosts) {
    if (!h.hostname.empty() && !is_plain_name(h.hostname)) {
      return invalid_argument(what + ": hostname '" + h.hostname + "' is not a DNS name");
    }
    if (!is_usable_host_address(c.subnet, h.ip)) {
      return invalid_argument(what + ": host " + h.mac.str() + ": " + h.ip.str() +
                              " is not a host address of " + c.subnet.str());
    }
    macs.push_back(mac_key(h.mac));
    ips.push_back(h.ip);
  }
  std::sort(macs.begin(), macs.end());
  if (const auto dup = std::adjacent_find(macs.begin(), macs.end()); dup != macs.end()) {
    for (const auto& h : c.hosts) {
      if (mac_key(h.mac) == *dup) {
        return invalid_argument(what + ": host " + h.mac.str() + ": MAC listed twice");
      }
    }
  }
  std::sort(ips.begin(), ips.end());
  if (const auto dup = std::adjacent_find(ips.begin(), ips.end()); dup != ips.end()) {
    const DhcpHost* second = nullptr;  // the later host with that address
    for (const auto& h : c.hosts) {
      if (h.ip == *dup) second = &h;
    }
    return invalid_argument(what + ": host " + second->mac.str() + ": address " + dup->str() +
                            " already taken");
  }
  return Status::ok();
}

bool same_except_hosts(const DhcpServerConfig& a, const DhcpServerConfig& b) {
  return a.key == b.key && a.netns == b.netns && a.ifname == b.ifname && a.subnet == b.subnet &&
         a.server == b.server && a.mtu == b.mtu;
}

// The file of `mac` in the hosts directory: "02-ab-cd-ef-01-23" (no leading '.', no '~' at the
// end: dnsmasq skips such names).
std::string host_file_name(const MacAddress& mac) {
  std::string name = mac.str();
  std::replace(name.begin(), name.end(), ':', '-');
  return name;
}

std::string render_host(const DhcpHost& h) {
  std::string out = h.mac.str() + "," + h.ip.str();
  if (!h.hostname.empty()) out += "," + h.hostname;
  out += "\n";
  return out;
}

// What changes between two host lists sorted by MAC (DhcpHost orders by MAC first).
struct HostDiff {
  std::vector<const DhcpHost*> write;  // new, or changed (same MAC, other address or name)
  std::vector<MacAddress> remove;
  bool forget = false;  // a host is removed or changed: dnsmasq must drop what it read before
};

HostDiff diff_hosts(const std::vector<DhcpHost>& have, const std::vector<DhcpHost>& want) {
  HostDiff d;
  auto a = have.begin();
  auto b = want.begin();
  while (a != have.end() || b != want.end()) {
    if (b == want.end() || (a != have.end() && a->mac < b->mac)) {
      d.remove.push_back(a->mac);
      d.forget = true;
      ++a;
    } else if (a == have.end() || b->mac < a->mac) {
      d.write.push_back(&*b);
      ++b;
    } else {
      if (*a != *b) {
        d.write.push_back(&*b);
        d.forget = true;
      }
      ++a;
      ++b;
    }
  }
  return d;
}

// dnsmasq's documented exit codes.
std::string describe_exit(const ExitStatus& status) {
  std::string text = status.str();
  if (status.signaled) return text;
  switch (status.value) {
    case 1:
      return text + " (configuration problem)";
    case 2:
      return text + " (network problem: interface or address missing, or port in use)";
    case 3:
      return text + " (file system problem)";
    case 4:
      return text + " (out of memory)";
    case 5:
      return text + " (other problem)";
    default:
      return text;
  }
}

std::string seconds_text(milliseconds d) {
  return std::to_string(std::chrono::duration_cast<seconds>(d).count()) + "s";
}

std::optional<pid_t> parse_pid(const std::string& text) {
  pid_t pid = 0;
  size_t i = 0;
  for (; i < text.size() && text[i] >= '0' && text[i] <= '9'; ++i) {
    if (pid > 10'000'000) return std::nullopt;
    pid = pid * 10 + (text[i] - '0');
  }
  if (i == 0 || pid <= 0) return std::nullopt;
  return pid;
}

Status errno_unavailable(int err, const std::string& what) {
  return unavailable(what + ": " + std::strerror(err));
}

}  // namespace

struct DnsmasqDhcp::Impl {
  struct Server {
    DhcpServerConfig config;
    std::optional<Child> child;
    SteadyTime started;
    milliseconds delay{0};
    std::optional<SteadyTime> restart_at;
    std::string death;  // how the last process ended, for the observer
    // false after an update that failed half-way: the next ensure() rewrites the whole hosts
    // directory and has dnsmasq reread it.
    bool in_sync = true;
  };

  Options options;
  std::string group;
  gid_t gid = 0;
  UniqueFd wake;

  mutable std::mutex mu;  // guards queue, quit, supervised and observer
  std::deque<std::function<void()>> queue;
  bool quit = false;
  std::set<std::string> supervised;
  std::function<void(const std::string&, const Status&)> observer;
  std::thread thread;

  // Supervisor thread only.
  std::map<std::string, Server> servers;

  std::string dir(const std::string& key) const { return options.run_dir + "/" + key; }
  std::string hosts_dir(const std::string& key) const { return dir(key) + "/hosts.d"; }
  std::string leases_path(const std::string& key) const { return dir(key) + "/leases"; }
  std::string pid_path(const std::string& key) const { return dir(key) + "/pid"; }

  template <typename F>
  auto call(F fn) -> decltype(fn()) {
    std::packaged_task<decltype(fn())()> task(std::move(fn));
    auto result = task.get_future();
    {
      std::lock_guard lock(mu);
      queue.emplace_back([&task] { task(); });
    }
    notify_thread();
    return result.get();
  }

  void notify_thread() const {
    const uint64_t one = 1;
    (void)!::write(wake.get(), &one, sizeof one);
  }

  void set_supervised(const std::string& key, bool on) {
    std::lock_guard lock(mu);
    if (on) {
      supervised.insert(key);
    } else {
      supervised.erase(key);
    }
  }

  std::vector<std::string> argv(const DhcpServerConfig& c) const {
    const std::string mask = Ipv4Address::from_uint(c.subnet.mask()).str();
    return {options.dnsmasq,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--interface=" + c.ifname,
            "--except-interface=lo",
            "--dhcp-range=" + c.subnet.network().str() + ",static," + mask + "," + kLeaseTime,
            "--dhcp-authoritative",
            "--dhcp-hostsdir=" + hosts_dir(c.key),
            "--dhcp-leasefile=" + leases_path(c.key),
            "--pid-file=" + pid_path(c.key),
            "--dhcp-option=option:router",
            "--dhcp-option-force=option:mtu," + std::to_string(c.mtu),
            "--log-facility=-",
            "--user=" + options.user,
            "--group=" + group};
  }

  // Root-owned, readable by dnsmasq's group only.
  Status restrict_to_group(const std::string& path, mode_t mode) const {
    if (::chown(path.c_str(), 0, gid) != 0) {
      return errno_status(errno, "chown '" + path + "'");
    }
    if (::chmod(path.c_str(), mode) != 0) return errno_status(errno, "chmod '" + path + "'");
    return Status::ok();
  }

  // Publishes the file of `h` atomically: written under a dot name dnsmasq ignores, then
  // renamed (dnsmasq reads it on the rename). No fsync: the directory is rebuilt on every start.
  Status write_host(const std::string& key, const DhcpHost& h) const {
    const std::string name = host_file_name(h.mac);
    const std::string path = hosts_dir(key) + "/" + name;
    const std::string tmp = hosts_dir(key) + "/." + name + ".tmp";
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0640));
    if (!fd.valid()) return errno_status(errno, "creating '" + tmp + "'");
    Status written = Status::ok();
    if (::fchown(fd.get(), 0, gid) != 0 || ::fchmod(fd.get(), 0640) != 0) {
      written = errno_status(errno, "chown/chmod '" + tmp + "'");
    }
    const std::string text = render_host(h);
    if (written.is_ok() &&
        ::write(fd.get(), text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
      written = errno_status(errno, "writing '" + tmp + "'");
    }
    fd = UniqueFd();  // closed before the rename: a close after it would be a second change
    if (written.is_ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
      written = errno_status(errno, "renaming '" + tmp + "' to '" + path + "'");
    }
    if (!written.is_ok()) ::unlink(tmp.c_str());
    return written;
  }

  Status remove_host(const std::string& key, const MacAddress& mac) const {
    const std::string path = hosts_dir(key) + "/" + host_file_name(mac);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return errno_status(errno, "removing '" + path + "'");
    }
    return Status::ok();
  }

  // Makes the hosts directory of `key` hold exactly one file per host (O(hosts): start and
  // resynchronisation only).
  Status write_all_hosts(const std::string& key, const std::vector<DhcpHost>& hosts) const {
    const std::string d = hosts_dir(key);
    NM_RETURN_IF_ERROR(make_dirs(d));
    NM_RETURN_IF_ERROR(restrict_to_group(d, 0750));
    std::set<std::string> wanted;
    for (const auto& h : hosts) wanted.insert(host_file_name(h.mac));
    std::error_code ec;
    std::vector<std::filesystem::path> stale;
    for (const auto& entry : std::filesystem::directory_iterator(d, ec)) {
      if (!wanted.contains(entry.path().filename().string())) stale.push_back(entry.path());
    }
    if (ec) return errno_status(ec.value(), "listing '" + d + "'");
    for (const auto& path : stale) {
      if (!std::filesystem::remove(path, ec) && ec) {
        return errno_status(ec.value(), "removing '" + path.string() + "'");
      }
    }
    for (const auto& h : hosts) NM_RETURN_IF_ERROR(write_host(key, h));
    return Status::ok();
  }

  // An inotify watch on the hosts directory for files (and the directory itself) closed after
  // reading: dnsmasq opens, parses and closes a host file before it serves the next packet, and
  // on SIGHUP lists the directory, reading every file, after dropping what it had read before.
  Result<UniqueFd> watch_reads(const std::string& key) const {
    UniqueFd fd(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
    if (!fd.valid()) return errno_status(errno, "inotify_init1");
    if (::inotify_add_watch(fd.get(), hosts_dir(key).c_str(), IN_CLOSE_NOWRITE) < 0) {
      return errno_status(errno, "watching '" + hosts_dir(key) + "'");
    }
    return fd;
  }

  // Waits until dnsmasq has read every file named in `pending` ("" for the directory: a full
  // reread after SIGHUP), or has exited (the supervisor restarts it, and a new dnsmasq reads
  // everything before it serves).
  Status wait_read(Server& s, int inotify_fd, std::set<std::string> pending) const {
    const auto deadline = std::chrono::steady_clock::now() + options.reread_timeout;
    alignas(inotify_event) std::array<char, 4096> buf{};
    while (!pending.empty()) {
      const auto left =
          std::chrono::ceil<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        return unavailable("dnsmasq for '" + s.config.key + "' (pid " +
                           std::to_string(s.child->pid()) + ") did not read its hosts within " +
                           std::to_string(options.reread_timeout.count()) + "ms");
      }
      std::array<pollfd, 2> fds{{{s.child->pidfd(), POLLIN, 0}, {inotify_fd, POLLIN, 0}}};
      const int n = ::poll(fds.data(), fds.size(), static_cast<int>(left.count()));
      if (n < 0 && errno != EINTR) return errno_status(errno, "poll");
      if (fds[0].revents != 0) return Status::ok();
      if (fds[1].revents == 0) continue;
      for (;;) {
        const ssize_t len = ::read(inotify_fd, buf.data(), buf.size());
        if (len <= 0) break;
        for (ssize_t off = 0; off + static_cast<ssize_t>(sizeof(inotify_event)) <= len;) {
          inotify_event event{};
          std::memcpy(&event, buf.data() + off, sizeof event);
          const char* name = buf.data() + off + sizeof event;
          pending.erase(event.len == 0 ? std::string() : std::string(name));
          off += static_cast<ssize_t>(sizeof event + event.len);
        }
      }
    }
    return Status::ok();
  }

  // Brings a running server's hosts directory from s.config.hosts to `hosts` (sorted). New hosts
  // cost O(1): one file, which dnsmasq reads on its own. Removed or changed hosts need a SIGHUP,
  // upon which dnsmasq forgets what it read and rereads the whole directory (O(hosts)).
  Status update_hosts(Server& s, std::vector<DhcpHost> hosts) {
    const std::string& key = s.config.key;
    const bool resync = !s.in_sync;
    s.in_sync = false;
    std::set<std::string> pending;
    if (resync) {
      NM_RETURN_IF_ERROR(write_all_hosts(key, hosts));
      pending.insert("");
    }
    NM_ASSIGN_OR_RETURN(UniqueFd watch, watch_reads(key));
    if (!resync) {
      const HostDiff diff = diff_hosts(s.config.hosts, hosts);
      for (const DhcpHost* h : diff.write) {
        NM_RETURN_IF_ERROR(write_host(key, *h));
        pending.insert(host_file_name(h->mac));
      }
      for (const MacAddress& mac : diff.remove) NM_RETURN_IF_ERROR(remove_host(key, mac));
      if (diff.forget) pending = {""};
    }
    s.config.hosts = std::move(hosts);
    if (!s.child) {
      s.in_sync = true;  // the restart reads the directory
      return Status::ok();
    }
    if (pending.contains("")) NM_RETURN_IF_ERROR(s.child->signal(SIGHUP));
    NM_RETURN_IF_ERROR(wait_read(s, watch.get(), std::move(pending)));
    s.in_sync = true;
    return Status::ok();
  }

  Status remove_files(const std::string& key) const {
    std::error_code ec;
    std::filesystem::remove_all(dir(key), ec);
    if (ec) return errno_status(ec.value(), "removing '" + dir(key) + "'");
    return Status::ok();
  }

  // Terminates a dnsmasq an earlier daemon left for `key` (see the header) and removes its files.
  Status replace_leftover(const std::string& key) const {
    auto text = read_file(pid_path(key));
    if (text.is_ok()) {
      if (const auto pid = parse_pid(*text)) {
        if (auto pidfd = open_pidfd(*pid); pidfd.is_ok()) {
          auto cmdline = read_file("/proc/" + std::to_string(*pid) + "/cmdline");
          const auto holds = [&](const std::string& arg) {
            return (*cmdline + '\0').find(arg + '\0') != std::string::npos;
          };
          if (cmdline.is_ok() && (holds("--dhcp-hostsdir=" + hosts_dir(key)) ||
                                  holds("--dhcp-hostsfile=" + dir(key) + "/hosts"))) {
            NM_RETURN_IF_ERROR(terminate_pidfd(pidfd->get(), kStopGrace)
                                   .with_context("stopping the dnsmasq left for '" + key + "'"));
          }
        }
      }
    }
    return remove_files(key);
  }

  // Waits until `child` wrote its pid to the pid file (it serves then), or ended, or timed out.
  Status wait_ready(const std::string& key, Child& child, int inotify_fd) const {
    const std::string what = "dnsmasq for '" + key + "'";
    const auto deadline = std::chrono::steady_clock::now() + options.start_timeout;
    for (;;) {
      if (auto text = read_file(pid_path(key)); text.is_ok() && parse_pid(*text) == child.pid()) {
        return Status::ok();
      }
      const auto left =
          std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        (void)child.terminate(kStopGrace);
        return unavailable(what + " did not write its pid file within " +
                           std::to_string(options.start_timeout.count()) + "ms");
      }
      std::array<pollfd, 2> fds{{{child.pidfd(), POLLIN, 0}, {inotify_fd, POLLIN, 0}}};
      const int n = ::poll(fds.data(), fds.size(), static_cast<int>(left.count()));
      if (n < 0 && errno != EINTR) return errno_status(errno, "poll");
      if (fds[0].revents != 0) {
        NM_ASSIGN_OR_RETURN(const ExitStatus status, child.wait());
        return unavailable(what + " " + describe_exit(status) + " during start-up");
      }
      if (fds[1].revents != 0) {
        std::array<char, 4096> buf{};
        while (::read(inotify_fd, buf.data(), buf.size()) > 0) {
        }
      }
    }
  }

  // Writes the server's files and starts dnsmasq; returns once it serves.
  Result<Child> start(const DhcpServerConfig& c) const {
    const std::string d = dir(c.key);
    NM_RETURN_IF_ERROR(make_dirs(d));
    NM_RETURN_IF_ERROR(restrict_to_group(d, 0750));
    NM_RETURN_IF_ERROR(write_all_hosts(c.key, c.hosts));
    if (::unlink(pid_path(c.key).c_str()) != 0 && errno != ENOENT) {
      return errno_status(errno, "removing '" + pid_path(c.key) + "'");
    }
    UniqueFd inotify(::inotify_init1(IN_CLOEXEC | IN_NONBLOCK));
    if (!inotify.valid()) return errno_status(errno, "inotify_init1");
    if (::inotify_add_watch(inotify.get(), d.c_str(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0) {
      return errno_status(errno, "watching '" + d + "'");
    }
    SpawnOptions spawn;
    spawn.argv = argv(c);
    spawn.env = {};
    spawn.netns_path = options.netns_dir + "/" + c.netns;
    spawn.output_fd = options.log_to_stderr ? STDERR_FILENO : -1;
    auto child = spawn_process(spawn);
    if (!child.is_ok()) return child.status().with_context("starting dnsmasq for '" + c.key + "'");
    NM_RETURN_IF_ERROR(wait_ready(c.key, *child, inotify.get()));
    return child;
  }

  Status ensure_now(DhcpServerConfig config) {
    if (!std::is_sorted(config.hosts.begin(), config.hosts.end())) {
      std::sort(config.hosts.begin(), config.hosts.end());
    }
    const std::string key = config.key;
    auto it = servers.find(key);
    if (it != servers.end()) {
      Server& s = it->second;
      if (same_except_hosts(s.config, config)) {
        if (s.in_sync && s.config.hosts == config.hosts) return Status::ok();
        return update_hosts(s, std::move(config.hosts));
      }
      if (s.child) (void)s.child->terminate(kStopGrace);
      servers.erase(it);
      set_supervised(key, false);
    }
    NM_RETURN_IF_ERROR(replace_leftover(key));
    auto child = start(config);
    if (!child.is_ok()) {
      (void)remove_files(key);
      return child.status();
    }
    Server s;
    s.config = std::move(config);
    s.child = std::move(child).value();
    s.started = std::chrono::steady_clock::now();
    servers.emplace(key, std::move(s));
    set_supervised(key, true);
    return Status::ok();
  }

  Status add_host_now(const std::string& key, const DhcpHost& host) {
    auto it = servers.find(key);
    if (it == servers.end()) return not_found("no dhcp server for '" + key + "'");
    Server& s = it->second;
    const std::string what = "dhcp server '" + key + "': host " + host.mac.str();
    if (!host.hostname.empty() && !is_plain_name(host.hostname)) {
      return invalid_argument(what + ": hostname '" + host.hostname + "' is not a DNS name");
    }
    if (!is_usable_host_address(s.config.subnet, host.ip) || host.ip == s.config.server) {
      return invalid_argument(what + ": " + host.ip.str() + " is not a free host address of " +
                              s.config.subnet.str());
    }
    auto& hosts = s.config.hosts;  // sorted
    const auto pos = std::lower_bound(hosts.begin(), hosts.end(), host);
    const bool present = pos != hosts.end() && *pos == host;
    if (present && s.in_sync) return Status::ok();
    // O(hosts) comparisons without allocation; the expensive part (files, dnsmasq) stays O(1).
    if (!present) {
      for (const auto& h : hosts) {
        if (h.mac == host.mac) return invalid_argument(what + ": MAC already has a lease");
        if (h.ip == host.ip) {
          return invalid_argument(what + ": " + host.ip.str() + " is leased to " + h.mac.str());
        }
      }
    }
    if (!s.in_sync) {
      // An earlier update failed half-way: rewrite the whole directory and have it reread.
      auto all = hosts;
      if (!present) all.insert(std::lower_bound(all.begin(), all.end(), host), host);
      return update_hosts(s, std::move(all));
    }
    s.in_sync = false;
    NM_ASSIGN_OR_RETURN(UniqueFd watch, watch_reads(key));
    NM_RETURN_IF_ERROR(write_host(key, host));
    hosts.insert(std::lower_bound(hosts.begin(), hosts.end(), host), host);
    if (s.child) {
      NM_RETURN_IF_ERROR(wait_read(s, watch.get(), {host_file_name(host.mac)}));
    }
    s.in_sync = true;
    return Status::ok();
  }

  Status stop_now(const std::string& key) {
    if (auto it = servers.find(key); it != servers.end()) {
      std::optional<Status> failure;
      if (it->second.child) {
        auto ended = it->second.child->terminate(kStopGrace);
        if (!ended.is_ok()) failure = ended.status();
      }
      servers.erase(it);
      set_supervised(key, false);
      if (failure) return *failure;
      return remove_files(key);
    }
    return replace_leftover(key);
  }

  void report(const std::string& key, const Status& what) const {
    std::function<void(const std::string&, const Status&)> fn;
    {
      std::lock_guard lock(mu);
      fn = observer;
    }
    if (fn) fn(key, what);
  }

  void on_death(Server& s, const ExitStatus& status, SteadyTime now) {
    s.death = "dnsmasq for '" + s.config.key + "' (pid " + std::to_string(s.child->pid()) + ") " +
              describe_exit(status);
    s.child.reset();
    const bool was_stable = now - s.started >= kMaxRestartDelay;
    s.delay = (was_stable || s.delay.count() == 0) ? kFirstRestartDelay
                                                   : std::min(s.delay * 2, kMaxRestartDelay);
    s.restart_at = now + s.delay;
  }

  void restart(Server& s) {
    s.restart_at.reset();
    auto child = start(s.config);
    if (child.is_ok()) {
      s.child = std::move(child).value();
      s.in_sync = true;
      s.started = std::chrono::steady_clock::now();
      report(s.config.key,
             unavailable(s.death + ", restarted (pid " + std::to_string(s.child->pid()) + ")"));
      return;
    }
    s.delay = std::min(s.delay * 2, kMaxRestartDelay);
    s.restart_at = std::chrono::steady_clock::now() + s.delay;
    report(s.config.key, unavailable(s.death + "; restart failed: " + child.status().message() +
                                     ", retrying in " + seconds_text(s.delay)));
  }

  void stop_all() {
    for (auto& [key, s] : servers) {
      if (s.child) (void)s.child->terminate(kStopGrace);
      (void)remove_files(key);
    }
    servers.clear();
    std::lock_guard lock(mu);
    supervised.clear();
  }

  void loop() {
    for (;;) {
      std::vector<pollfd> fds{{wake.get(), POLLIN, 0}};
      std::optional<SteadyTime> next;
      for (const auto& [key, s] : servers) {
        if (s.child) fds.push_back({s.child->pidfd(), POLLIN, 0});
        if (s.restart_at && (!next || *s.restart_at < *next)) next = s.restart_at;
      }
      int timeout = -1;
      if (next) {
        const auto left = std::chrono::ceil<milliseconds>(*next - std::chrono::steady_clock::now());
        timeout = static_cast<int>(std::max<int64_t>(left.count(), 0));
      }
      (void)::poll(fds.data(), fds.size(), timeout);  // EINTR: just look again
      if (fds[0].revents != 0) {
        uint64_t count = 0;
        (void)!::read(wake.get(), &count, sizeof count);
      }

      std::deque<std::function<void()>> work;
      bool stopping = false;
      {
        std::lock_guard lock(mu);
        work.swap(queue);
        stopping = quit;
      }
      for (auto& fn : work) fn();
      if (stopping) {
        stop_all();
        return;
      }

      const SteadyTime now = std::chrono::steady_clock::now();
      for (auto& [key, s] : servers) {
        if (!s.child) continue;
        auto ended = s.child->try_wait();
        if (ended.is_ok() && ended->has_value()) on_death(s, **ended, now);
      }
      for (auto& [key, s] : servers) {
        if (s.restart_at && *s.restart_at <= std::chrono::steady_clock::now()) restart(s);
      }
    }
  }
};

Result<std::unique_ptr<DnsmasqDhcp>> DnsmasqDhcp::create(Options options) {
  if (options.run_dir.empty() || options.run_dir[0] != '/') {
    return invalid_argument("dnsmasq run_dir '" + options.run_dir + "' must be an absolute path");
  }
  if (options.dnsmasq.empty() || options.dnsmasq[0] != '/') {
    return invalid_argument("dnsmasq binary '" + options.dnsmasq + "' must be an absolute path");
  }
  if (options.netns_dir.empty() || options.netns_dir[0] != '/') {
    return invalid_argument("netns_dir '" + options.netns_dir + "' must be an absolute path");
  }
  auto impl = std::make_unique<Impl>();

  std::array<char, 4096> buf{};
  passwd pw{};
  passwd* pw_found = nullptr;
  const int pw_err = ::getpwnam_r(options.user.c_str(), &pw, buf.data(), buf.size(), &pw_found);
  if (pw_found == nullptr) {
    if (pw_err != 0) return errno_unavailable(pw_err, "looking up user '" + options.user + "'");
    return not_found("dnsmasq user '" + options.user + "' does not exist");
  }
  impl->gid = pw.pw_gid;
  group gr{};
  group* gr_found = nullptr;
  const int gr_err = ::getgrgid_r(impl->gid, &gr, buf.data(), buf.size(), &gr_found);
  if (gr_found == nullptr) {
    if (gr_err != 0)
      return errno_unavailable(gr_err, "looking up the group of '" + options.user + "'");
    return not_found("the primary group of dnsmasq user '" + options.user + "' does not exist");
  }
  impl->group = gr.gr_name;

  NM_RETURN_IF_ERROR(make_dirs(options.run_dir));
  if (::chmod(options.run_dir.c_str(), 0711) != 0) {
    return errno_status(errno, "chmod '" + options.run_dir + "'");
  }
  impl->options = std::move(options);

  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(impl->options.run_dir, ec)) {
    const std::string key = entry.path().filename().string();
    if (entry.is_directory(ec) && is_plain_name(key))
      NM_RETURN_IF_ERROR(impl->replace_leftover(key));
  }
  if (ec) return errno_status(ec.value(), "listing '" + impl->options.run_dir + "'");

  impl->wake = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->wake.valid()) return errno_status(errno, "eventfd");
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->loop(); });
  return std::unique_ptr<DnsmasqDhcp>(new DnsmasqDhcp(std::move(impl)));
}

DnsmasqDhcp::DnsmasqDhcp(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DnsmasqDhcp::~DnsmasqDhcp() {
  {
    std::lock_guard lock(impl_->mu);
    impl_->quit = true;
  }
  impl_->notify_thread();
  impl_->thread.join();
}

Status DnsmasqDhcp::ensure(const DhcpServerConfig& config) {
  NM_RETURN_IF_ERROR(validate(config));
  return impl_->call([this, &config] { return impl_->ensure_now(config); });
}

Status DnsmasqDhcp::add_host(const std::string& key, const DhcpHost& host) {
  if (!is_plain_name(key)) {
    return invalid_argument("dhcp server key '" + key + "': not a plain name");
  }
  return impl_->call([this, &key, &host] { return impl_->add_host_now(key, host); });
}

Status DnsmasqDhcp::stop(const std::string& key) {
  if (!is_plain_name(key))
    return invalid_argument("dhcp server key '" + key + "': not a plain name");
  return impl_->call([this, &key] { return impl_->stop_now(key); });
}

std::vector<std::string> DnsmasqDhcp::running() const {
  std::lock_guard lock(impl_->mu);
  return {impl_->supervised.begin(), impl_->supervised.end()};
}

void DnsmasqDhcp::set_observer(std::function<void(const std::string&, const Status&)> fn) {
  std::lock_guard lock(impl_->mu);
  impl_->observer = std::move(fn);
}

}  // namespace nm::network
