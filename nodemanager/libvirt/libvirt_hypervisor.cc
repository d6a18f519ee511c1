#include "libvirt_hypervisor.h"

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <span>
#include <utility>

#include "nm/core/fs.h"
#include "nm/core/log.h"
#include "nm/domain_xml.h"

namespace nm {
namespace {

struct ConnectCloser {
  void operator()(virConnectPtr c) const noexcept { virConnectClose(c); }
};
struct DomainFreer {
  void operator()(virDomainPtr d) const noexcept { virDomainFree(d); }
};
struct PoolFreer {
  void operator()(virStoragePoolPtr p) const noexcept { virStoragePoolFree(p); }
};
struct VolFreer {
  void operator()(virStorageVolPtr v) const noexcept { virStorageVolFree(v); }
};
struct MallocFreer {
  void operator()(void* p) const noexcept { std::free(p); }
};

using ConnectPtr = std::unique_ptr<virConnect, ConnectCloser>;
using DomainPtr = std::unique_ptr<virDomain, DomainFreer>;
using PoolPtr = std::unique_ptr<virStoragePool, PoolFreer>;
using VolPtr = std::unique_ptr<virStorageVol, VolFreer>;
using CharPtr = std::unique_ptr<char, MallocFreer>;

std::shared_ptr<spdlog::logger> lv_log() {
  return logger("libvirt");
}

void quiet_error_handler(void* /*opaque*/, virErrorPtr /*error*/) noexcept {}

// libvirt's initialization, error reporting and event implementation are process-wide.
const Status& init_libvirt_once() {
  static std::once_flag once;
  static Status status;
  std::call_once(once, [] {
    virSetErrorFunc(nullptr, quiet_error_handler);
    if (virInitialize() < 0) {
      status = internal_error("libvirt: virInitialize failed");
      return;
    }
    if (virEventRegisterDefaultImpl() < 0) {
      const virErrorPtr e = virGetLastError();
      status = internal_error(std::string("libvirt: cannot register the event loop: ") +
                              (e != nullptr && e->message != nullptr ? e->message : "?"));
    }
  });
  return status;
}

int last_error_code() {
  const virErrorPtr e = virGetLastError();
  return e != nullptr ? e->code : VIR_ERR_OK;
}

// The one translation of libvirt's per-thread last error into a Status. `what` says what we were
// doing ("start domain '...'"). `conn`, when given, tells a dead connection from an internal error.
Status libvirt_status(std::string_view what, virConnectPtr conn = nullptr) {
  const virErrorPtr e = virGetLastError();
  const int code = e != nullptr ? e->code : VIR_ERR_INTERNAL_ERROR;
  std::string message(what);
  message += ": ";
  message += (e != nullptr && e->message != nullptr) ? e->message : "unknown libvirt error";
  virResetLastError();

  Code mapped = Code::kInternal;
  switch (code) {
    // Not VIR_ERR_NO_STORAGE_POOL: callers read NotFound as "the thing is already gone", and a
    // vanished pool says nothing about the volume in it.
    case VIR_ERR_NO_DOMAIN:
    case VIR_ERR_NO_STORAGE_VOL:
      mapped = Code::kNotFound;
      break;
    case VIR_ERR_OPERATION_INVALID:
      mapped = Code::kConflict;
      break;
    case VIR_ERR_SYSTEM_ERROR:
    case VIR_ERR_RPC:
    case VIR_ERR_NO_CONNECT:
    case VIR_ERR_INVALID_CONN:
    case VIR_ERR_OPERATION_TIMEOUT:
    case VIR_ERR_AUTH_FAILED:
    case VIR_ERR_AUTH_UNAVAILABLE:
      mapped = Code::kUnavailable;
      break;
    case VIR_ERR_INTERNAL_ERROR:
      if (conn != nullptr && virConnectIsAlive(conn) != 1) mapped = Code::kUnavailable;
      virResetLastError();
      break;
    default:
      break;
  }
  return {mapped, std::move(message)};
}

// What libvirt makes of a directory path: repeated '/' collapsed, no trailing '/'.
std::string sanitize_path(std::string_view in) {
  std::string out;
  for (const char ch : in) {
    if (ch == '/' && !out.empty() && out.back() == '/') continue;
    out += ch;
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

// The text of the first <tag>...</tag> after `after` in `xml`, still escaped.
std::string element_text(std::string_view xml, std::string_view after, std::string_view tag) {
  const size_t start = xml.find(after);
  if (start == std::string_view::npos) return {};
  const std::string open = "<" + std::string(tag) + ">";
  const std::string close = "</" + std::string(tag) + ">";
  const size_t b = xml.find(open, start);
  if (b == std::string_view::npos) return {};
  const size_t e = xml.find(close, b);
  if (e == std::string_view::npos) return {};
  return std::string(xml.substr(b + open.size(), e - b - open.size()));
}

DomainState to_domain_state(int state) {
  switch (state) {
    case VIR_DOMAIN_RUNNING:
      return DomainState::kRunning;
    case VIR_DOMAIN_BLOCKED:
      return DomainState::kBlocked;
    case VIR_DOMAIN_PAUSED:
      return DomainState::kPaused;
    case VIR_DOMAIN_SHUTDOWN:
      return DomainState::kShuttingDown;
    case VIR_DOMAIN_SHUTOFF:
      return DomainState::kShutOff;
    case VIR_DOMAIN_CRASHED:
      return DomainState::kCrashed;
    case VIR_DOMAIN_PMSUSPENDED:
      return DomainState::kSuspended;
    default:
      return DomainState::kNoState;
  }
}

DomainEventKind to_event_kind(int event) {
  switch (event) {
    case VIR_DOMAIN_EVENT_DEFINED:
      return DomainEventKind::kDefined;
    case VIR_DOMAIN_EVENT_UNDEFINED:
      return DomainEventKind::kUndefined;
    case VIR_DOMAIN_EVENT_STARTED:
      return DomainEventKind::kStarted;
    case VIR_DOMAIN_EVENT_SUSPENDED:
      return DomainEventKind::kSuspended;
    case VIR_DOMAIN_EVENT_RESUMED:
      return DomainEventKind::kResumed;
    case VIR_DOMAIN_EVENT_STOPPED:
      return DomainEventKind::kStopped;
    case VIR_DOMAIN_EVENT_SHUTDOWN:
      return DomainEventKind::kShutdown;
    case VIR_DOMAIN_EVENT_PMSUSPENDED:
      return DomainEventKind::kPMSuspended;
    case VIR_DOMAIN_EVENT_CRASHED:
      return DomainEventKind::kCrashed;
    default:
      return DomainEventKind::kOther;
  }
}

constexpr std::chrono::milliseconds kFirstReconnectDelay{100};
constexpr std::chrono::milliseconds kCallWaitForReconnect{500};

std::string domain_uuid(virDomainPtr dom) {
  char buf[VIR_UUID_STRING_BUFLEN] = {};
  if (virDomainGetUUIDString(dom, buf) < 0) {
    virResetLastError();
    return {};
  }
  return buf;
}

std::string overlay_name(const VmId& id) {
  return id.str() + ".qcow2";
}

Result<DomainPtr> lookup_domain(virConnectPtr conn, const VmId& id) {
  DomainPtr dom(virDomainLookupByUUIDString(conn, id.str().c_str()));
  if (!dom) {
    if (last_error_code() == VIR_ERR_NO_DOMAIN) {
      virResetLastError();
      return not_found("domain '" + id.str() + "' does not exist");
    }
    return libvirt_status("look up domain '" + id.str() + "'", conn);
  }
  return dom;
}

// 1 active, 0 inactive.
Result<bool> is_active(virDomainPtr dom, virConnectPtr conn, const VmId& id) {
  const int active = virDomainIsActive(dom);
  if (active < 0) return libvirt_status("query domain '" + id.str() + "'", conn);
  return active == 1;
}

// Our owner metadata, nullopt when the domain has none (or one we cannot read as ours).
Result<std::optional<DomainOwner>> read_owner(virDomainPtr dom, virConnectPtr conn,
                                              const std::string& uuid) {
  CharPtr raw(virDomainGetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, kMetadataNamespace,
                                   VIR_DOMAIN_AFFECT_CURRENT));
  if (!raw) {
    if (last_error_code() == VIR_ERR_NO_DOMAIN_METADATA) {
      virResetLastError();
      return std::optional<DomainOwner>();
    }
    return libvirt_status("read metadata of domain '" + uuid + "'", conn);
  }
  Result<DomainOwner> owner = parse_owner_metadata(raw.get());
  if (!owner.is_ok()) {
    lv_log()->warn(
        "domain '{}' carries unreadable nodemanager metadata ({}); treating it as not ours", uuid,
        owner.status().message());
    return std::optional<DomainOwner>();
  }
  return std::optional<DomainOwner>(std::move(owner).value());
}

Result<DomainInfo> describe(virDomainPtr dom, virConnectPtr conn) {
  DomainInfo info;
  info.uuid = domain_uuid(dom);
  const char* name = virDomainGetName(dom);
  if (name != nullptr) info.name = name;
  int state = 0;
  int reason = 0;
  if (virDomainGetState(dom, &state, &reason, 0) < 0) {
    return libvirt_status("get state of domain '" + info.uuid + "'", conn);
  }
  info.state = to_domain_state(state);
  info.reason = reason;
  info.cause = domain_cause_of_state(state, reason);
  const int persistent = virDomainIsPersistent(dom);
  if (persistent < 0) return libvirt_status("query domain '" + info.uuid + "'", conn);
  info.persistent = persistent == 1;
  NM_ASSIGN_OR_RETURN(info.owner, read_owner(dom, conn, info.uuid));
  return info;
}

// Whether `uri` names the local system QEMU driver, whose pid files we can read.
bool is_local_qemu_system(std::string_view uri) {
  uri = uri.substr(0, uri.find('?'));
  return uri == "qemu:///system" || uri == "qemu+unix:///system";
}

// Whether the process behind `pidfd` has exited (it is readable from the exit on, before reaping).
bool has_exited(int pidfd) {
  pollfd p{.fd = pidfd, .events = POLLIN, .revents = 0};
  return poll(&p, 1, 0) > 0 && (p.revents & POLLIN) != 0;
}

// The live QEMU process of domain `uuid` named `name`, pinned as a pidfd (invalid when there is
// none): the pid from QEMU's pid file, kept only if the process the pidfd refers to has
// "-uuid <uuid>" on its command line. The command line is read after the pidfd is open, so it is
// that process's (a process that already exited has an empty one and is not watched).
UniqueFd open_emulator(const std::string& run_dir, const std::string& name, const std::string& uuid,
                       pid_t& pid) {
  std::ifstream pid_file(run_dir + "/" + name + ".pid");
  long long raw_pid = -1;
  if (!(pid_file >> raw_pid) || raw_pid <= 1 || raw_pid > INT32_MAX) return {};
  pid = static_cast<pid_t>(raw_pid);
  // syscall(): glibc 2.36's <sys/pidfd.h> lacks extern "C", so its pidfd_open does not link.
  UniqueFd pidfd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0U)));
  if (!pidfd.valid()) return {};
  std::ifstream cmdline_file("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  const std::string cmdline((std::istreambuf_iterator<char>(cmdline_file)),
                            std::istreambuf_iterator<char>());
  const std::string wanted = std::string("-uuid") + '\0' + uuid + '\0';
  if (!cmdline.starts_with(wanted) && cmdline.find('\0' + wanted) == std::string::npos) {
    return {};
  }
  return pidfd;
}

// C callbacks: they run on the event thread, never throw and never block.
void lifecycle_callback(virConnectPtr conn, virDomainPtr dom, int event, int detail,
                        void* opaque) noexcept;
void free_sink_ref(void* opaque) noexcept;
void close_callback(virConnectPtr conn, int reason, void* opaque) noexcept;
void wake_timer(int /*timer*/, void* /*opaque*/) noexcept {}

}  // namespace

// Whether the adapter is connected, the connection-handler calls not yet delivered, the
// reconnect schedule and the domains waiting for an emulator-watch lookup. Shared by the close
// callback (on whatever thread libvirt runs it), the lifecycle callback, callers that find the
// connection dead and the reconnect thread. `mu` is never held across a libvirt call: the close
// callback takes it while libvirt holds the connection's callback lock.
struct LibvirtLiveness {
  struct Transition {
    bool connected = false;
    std::string reason;
  };

  std::atomic<bool> connected{false};

  std::mutex mu;
  std::condition_variable cv;
  uint64_t generation = 0;         // guarded by mu: the connection `connected` is about
  bool ever_up = false;            // guarded by mu
  bool stopping = false;           // guarded by mu
  std::deque<Transition> pending;  // guarded by mu
  std::chrono::milliseconds backoff = kFirstReconnectDelay;  // guarded by mu
  std::chrono::steady_clock::time_point next_attempt;        // guarded by mu
  std::vector<std::string> to_watch;  // guarded by mu: uuids of domains that just started
  bool rescan = false;                // guarded by mu: look up every domain (after a reconnect)

  std::mutex handler_mu;
  std::shared_ptr<const Hypervisor::ConnectionHandler> handler;  // guarded by handler_mu

  // Connection `gen` is open with its callbacks registered. Announced unless it is the first.
  void up(uint64_t gen) {
    std::lock_guard lock(mu);
    generation = gen;
    if (connected.load(std::memory_order_relaxed)) return;
    connected.store(true, std::memory_order_release);
    backoff = kFirstReconnectDelay;
    if (std::exchange(ever_up, true)) {
      pending.push_back({true, {}});
      rescan = true;  // domains started (or QEMUs replaced) while we were away
      cv.notify_all();
    }
  }

  // Connection `gen` is gone; false (and nothing changes) unless it was the current, live one.
  bool down(uint64_t gen, std::string reason) {
    std::lock_guard lock(mu);
    if (gen != generation || !connected.load(std::memory_order_relaxed)) return false;
    connected.store(false, std::memory_order_release);
    pending.push_back({false, std::move(reason)});
    backoff = kFirstReconnectDelay;
    next_attempt = std::chrono::steady_clock::now() + backoff;
    cv.notify_all();
    return true;
  }

  // Asks the reconnect thread to look up domain `uuid` and watch its QEMU if it is ours.
  void request_watch(std::string uuid) {
    std::lock_guard lock(mu);
    if (stopping) return;
    to_watch.push_back(std::move(uuid));
    cv.notify_all();
  }

  void deliver(const Transition& t) noexcept {
    std::shared_ptr<const Hypervisor::ConnectionHandler> h;
    {
      std::lock_guard lock(handler_mu);
      h = handler;
    }
    if (!h || !*h) return;
    try {
      (*h)(t.connected, t.reason);
    } catch (const std::exception& e) {
      lv_log()->error("connection handler threw: {}", e.what());
    } catch (...) {
      lv_log()->error("connection handler threw");
    }
  }
};

// The pidfds of the watched QEMU processes, registered in one epoll set with an eventfd that
// wakes the watch thread to stop. `mu` guards the map and is never held across a handler call.
struct EmulatorWatches {
  struct Watch {
    std::string uuid;
    pid_t pid = 0;
    UniqueFd pidfd;
  };
  static constexpr uint64_t kWakeKey = 0;

  std::string run_dir;  // empty: watching is off (set once, in create())
  UniqueFd epoll;
  UniqueFd wake;

  std::mutex mu;
  std::map<uint64_t, Watch> watches;  // guarded by mu, keyed by their epoll data
  uint64_t last_key = kWakeKey;       // guarded by mu
  bool stopping = false;              // guarded by mu

  bool enabled() const { return !run_dir.empty(); }

  Status open(const std::string& dir) {
    epoll = UniqueFd(epoll_create1(EPOLL_CLOEXEC));
    if (!epoll.valid()) return errno_status(errno, "create an epoll set for QEMU pidfds");
    wake = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!wake.valid()) return errno_status(errno, "create an eventfd for the watch thread");
    epoll_event ev{.events = EPOLLIN, .data = {.u64 = kWakeKey}};
    if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, wake.get(), &ev) < 0) {
      return errno_status(errno, "add the watch thread's eventfd to its epoll set");
    }
    run_dir = dir;
    return Status::ok();
  }

  // Watches the live QEMU of domain `uuid` named `name`, unless that process is watched already.
  void arm(const std::string& uuid, const std::string& name) {
    pid_t pid = 0;
    UniqueFd pidfd = open_emulator(run_dir, name, uuid, pid);
    if (!pidfd.valid()) return;
    std::lock_guard lock(mu);
    for (const auto& [key, w] : watches) {
      if (w.uuid == uuid && w.pid == pid) return;
    }
    const uint64_t key = ++last_key;
    epoll_event ev{.events = EPOLLIN, .data = {.u64 = key}};
    if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, pidfd.get(), &ev) < 0) {
      lv_log()->warn("cannot watch QEMU (pid {}) of domain '{}': {}; its exit is seen from libvirt",
                     pid, uuid, errno_status(errno, "epoll_ctl").message());
      return;
    }
    lv_log()->debug("watching QEMU (pid {}) of domain '{}'", pid, uuid);
    watches.emplace(key, Watch{uuid, pid, std::move(pidfd)});
  }

  // Removes watch `key`: its domain's uuid, or nullopt when it was removed already.
  std::optional<std::string> take(uint64_t key) {
    std::lock_guard lock(mu);
    auto it = watches.find(key);
    if (it == watches.end()) return std::nullopt;
    std::string uuid = std::move(it->second.uuid);
    unwatch(it->second);
    watches.erase(it);
    return uuid;
  }

  // Removes the watches of domain `uuid` whose process has exited; how many there were.
  int take_exited(const std::string& uuid) {
    std::lock_guard lock(mu);
    int n = 0;
    for (auto it = watches.begin(); it != watches.end();) {
      if (it->second.uuid == uuid && has_exited(it->second.pidfd.get())) {
        unwatch(it->second);
        it = watches.erase(it);
        ++n;
      } else {
        ++it;
      }
    }
    return n;
  }

  void unwatch(const Watch& w) const {
    (void)epoll_ctl(epoll.get(), EPOLL_CTL_DEL, w.pidfd.get(), nullptr);
  }

  void stop() {
    {
      std::lock_guard lock(mu);
      stopping = true;
    }
    const uint64_t one = 1;
    if (write(wake.get(), &one, sizeof one) < 0) {
      // Only EAGAIN (the counter is full) is possible: the thread is being woken anyway.
    }
  }
  bool stopped() {
    std::lock_guard lock(mu);
    return stopping;
  }
};

// What libvirt's lifecycle callback and the watch thread share with the adapter: the event
// handler, the emulator watches and the liveness (for watch requests). libvirt's lifecycle
// registrations hold references to it, so it may outlive the adapter.
struct LibvirtEventSink {
  explicit LibvirtEventSink(std::shared_ptr<LibvirtLiveness> l) : liveness(std::move(l)) {}

  const std::shared_ptr<LibvirtLiveness> liveness;
  EmulatorWatches watches;

  std::mutex mu;
  std::shared_ptr<const Hypervisor::EventHandler> handler;  // guarded by mu
  // Held across each handler call: the event thread and the watch thread take turns.
  std::mutex deliver_mu;

  void deliver(const DomainEvent& ev) noexcept {
    std::lock_guard lock(deliver_mu);
    call(ev);
  }

  // libvirt's STOPPED or UNDEFINED event `ev`, after the exit of each QEMU of its domain that the
  // watch thread has not reported yet.
  void deliver_after_exits(const DomainEvent& ev) noexcept {
    std::lock_guard lock(deliver_mu);
    for (int n = watches.take_exited(ev.uuid); n > 0; --n) call(exited_event(ev.uuid));
    call(ev);
  }

  // The watch thread saw the process of watch `key` exit.
  void deliver_exit(uint64_t key) noexcept {
    std::lock_guard lock(deliver_mu);
    std::optional<std::string> uuid = watches.take(key);
    if (uuid) call(exited_event(*uuid));
  }

  static DomainEvent exited_event(const std::string& uuid) {
    return {uuid, DomainEventKind::kEmulatorExited, 0, DomainCause::kEmulatorGone};
  }

  void call(const DomainEvent& ev) noexcept {
    std::shared_ptr<const Hypervisor::EventHandler> h;
    {
      std::lock_guard lock(mu);
      h = handler;
    }
    if (!h || !*h) return;
    try {
      (*h)(ev);
    } catch (const std::exception& e) {
      lv_log()->error("event handler threw for domain '{}': {}; event dropped", ev.uuid, e.what());
    } catch (...) {
      lv_log()->error("event handler threw for domain '{}'; event dropped", ev.uuid);
    }
  }
};

// A connection and its callback registrations, torn down in reverse order of setup. Shared by
// the calls that use it, so replacing it (after a reconnect) never pulls it from under a call.
// It is the close callback's opaque: unregistering the callback waits for a running call of it,
// so the object outlives every call.
struct LibvirtConnection {
  ConnectPtr conn;
  std::string uri;
  LibvirtLiveness* liveness = nullptr;
  uint64_t generation = 0;
  int lifecycle_id = -1;
  bool close_registered = false;

  LibvirtConnection() = default;
  LibvirtConnection(const LibvirtConnection&) = delete;
  LibvirtConnection& operator=(const LibvirtConnection&) = delete;
  ~LibvirtConnection() {
    if (!conn) return;
    if (lifecycle_id >= 0 && virConnectDomainEventDeregisterAny(conn.get(), lifecycle_id) < 0) {
      virResetLastError();
    }
    // The close callback holds a reference on the connection: it must go before the close. After
    // it fired libvirt has dropped it already and this fails harmlessly.
    if (close_registered && virConnectUnregisterCloseCallback(conn.get(), close_callback) < 0) {
      virResetLastError();
    }
  }
  virConnectPtr get() const { return conn.get(); }
};

namespace {

void lifecycle_callback(virConnectPtr /*conn*/, virDomainPtr dom, int event, int detail,
                        void* opaque) noexcept {
  try {
    auto* sink = static_cast<std::shared_ptr<LibvirtEventSink>*>(opaque);
    DomainEvent ev;
    ev.uuid = domain_uuid(dom);
    ev.kind = to_event_kind(event);
    ev.detail = detail;
    ev.cause = domain_cause_of_event(event, detail);
    LibvirtEventSink& k = **sink;
    if (k.watches.enabled() && ev.kind == DomainEventKind::kStarted) {
      k.liveness->request_watch(ev.uuid);
    }
    if (k.watches.enabled() &&
        (ev.kind == DomainEventKind::kStopped || ev.kind == DomainEventKind::kUndefined)) {
      k.deliver_after_exits(ev);
    } else {
      k.deliver(ev);
    }
  } catch (...) {
    // Allocation failure while building the event: nothing sensible to do on this thread.
  }
}

void free_sink_ref(void* opaque) noexcept {
  delete static_cast<std::shared_ptr<LibvirtEventSink>*>(opaque);
}

const char* close_reason(int reason) {
  switch (reason) {
    case VIR_CONNECT_CLOSE_REASON_ERROR:
      return "I/O error";
    case VIR_CONNECT_CLOSE_REASON_EOF:
      return "end of file";
    case VIR_CONNECT_CLOSE_REASON_KEEPALIVE:
      return "keepalive timeout";
    case VIR_CONNECT_CLOSE_REASON_CLIENT:
      return "closed by client";
    default:
      return "unknown reason";
  }
}

void close_callback(virConnectPtr /*conn*/, int reason, void* opaque) noexcept {
  try {
    const auto* c = static_cast<const LibvirtConnection*>(opaque);
    const std::string why = "connection to '" + c->uri + "' closed (" + close_reason(reason) + ")";
    if (c->liveness->down(c->generation, why)) {
      lv_log()->warn("{}; reconnecting in the background", why);
    }
  } catch (...) {
  }
}

// Makes sure the overlay pool exists, has our target and is active; refreshes it when it was
// already active so files created or removed behind libvirt's back are seen. `mu` serializes
// the define/build/start steps between threads.
Result<PoolPtr> ensure_pool(virConnectPtr conn, const LibvirtOptions& options, std::mutex& mu) {
  std::lock_guard lock(mu);
  const std::string& name = options.pool_name;
  PoolPtr pool(virStoragePoolLookupByName(conn, name.c_str()));
  if (!pool) {
    if (last_error_code() != VIR_ERR_NO_STORAGE_POOL) {
      return libvirt_status("look up storage pool '" + name + "'", conn);
    }
    virResetLastError();
    const std::string xml = "<pool type='dir'><name>" + xml_escape(name) + "</name><target><path>" +
                            xml_escape(options.pool_dir) + "</path></target></pool>";
    pool.reset(virStoragePoolDefineXML(conn, xml.c_str(), 0));
    if (!pool) return libvirt_status("define storage pool '" + name + "'", conn);
    if (virStoragePoolSetAutostart(pool.get(), 1) < 0) {
      lv_log()->warn("cannot mark storage pool '{}' autostart: {}; it is started on demand", name,
                     libvirt_status("autostart", conn).message());
    }
    lv_log()->info("defined storage pool '{}' at '{}'", name, options.pool_dir);
  } else {
    CharPtr desc(virStoragePoolGetXMLDesc(pool.get(), 0));
    if (!desc) return libvirt_status("describe storage pool '" + name + "'", conn);
    const std::string target = element_text(desc.get(), "<target>", "path");
    if (target != xml_escape(options.pool_dir)) {
      return conflict("storage pool '" + name + "' exists with target '" + target +
                      "', expected '" + options.pool_dir + "'");
    }
  }
  const int active = virStoragePoolIsActive(pool.get());
  if (active < 0) return libvirt_status("query storage pool '" + name + "'", conn);
  if (active == 0) {
    if (virStoragePoolBuild(pool.get(), 0) < 0) {
      return libvirt_status("build storage pool '" + name + "'", conn);
    }
    if (virStoragePoolCreate(pool.get(), 0) < 0) {
      return libvirt_status("start storage pool '" + name + "'", conn);
    }
  } else if (virStoragePoolRefresh(pool.get(), 0) < 0) {
    // Fails while another volume is being built; the listing is then at most that one behind.
    lv_log()->debug("refresh of storage pool '{}' skipped: {}", name,
                    libvirt_status("refresh", conn).message());
  }
  return pool;
}

}  // namespace

DomainCause domain_cause_of_state(int state, int reason) {
  switch (state) {
    case VIR_DOMAIN_PAUSED:
      if (reason == VIR_DOMAIN_PAUSED_IOERROR) return DomainCause::kIoError;
      if (reason == VIR_DOMAIN_PAUSED_CRASHED) return DomainCause::kGuestCrashed;
      return DomainCause::kOther;
    case VIR_DOMAIN_CRASHED:
      return DomainCause::kGuestCrashed;
    case VIR_DOMAIN_SHUTOFF:
      switch (reason) {
        case VIR_DOMAIN_SHUTOFF_CRASHED:
        case VIR_DOMAIN_SHUTOFF_FAILED:
        case VIR_DOMAIN_SHUTOFF_DAEMON:
          return DomainCause::kEmulatorGone;
        case VIR_DOMAIN_SHUTOFF_SHUTDOWN:
          return DomainCause::kGuestShutdown;
        case VIR_DOMAIN_SHUTOFF_DESTROYED:
          return DomainCause::kDestroyed;
        default:
          return DomainCause::kOther;
      }
    default:
      return DomainCause::kOther;
  }
}

DomainCause domain_cause_of_event(int event, int detail) {
  switch (event) {
    case VIR_DOMAIN_EVENT_SUSPENDED:
      return detail == VIR_DOMAIN_EVENT_SUSPENDED_IOERROR ? DomainCause::kIoError
                                                          : DomainCause::kOther;
    case VIR_DOMAIN_EVENT_CRASHED:
      return DomainCause::kGuestCrashed;
    case VIR_DOMAIN_EVENT_STOPPED:
      switch (detail) {
        case VIR_DOMAIN_EVENT_STOPPED_FAILED:
          return DomainCause::kEmulatorGone;
        case VIR_DOMAIN_EVENT_STOPPED_CRASHED:
          return DomainCause::kGuestCrashed;
        case VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
          return DomainCause::kGuestShutdown;
        case VIR_DOMAIN_EVENT_STOPPED_DESTROYED:
          return DomainCause::kDestroyed;
        default:
          return DomainCause::kOther;
      }
    default:
      return DomainCause::kOther;
  }
}

LibvirtHypervisor::LibvirtHypervisor(LibvirtOptions options)
    : options_(std::move(options)),
      liveness_(std::make_shared<LibvirtLiveness>()),
      sink_(std::make_shared<LibvirtEventSink>(liveness_)) {}

Result<std::unique_ptr<LibvirtHypervisor>> LibvirtHypervisor::create(
    const LibvirtOptions& options) {
  if (options.uri.empty()) return invalid_argument("libvirt-uri: must not be empty");
  if (options.pool_name.empty()) return invalid_argument("libvirt pool name: must not be empty");
  if (options.pool_dir.empty() || options.pool_dir.front() != '/') {
    return invalid_argument("libvirt pool directory: '" + options.pool_dir +
                            "' is not an absolute path");
  }
  if (options.reconnect_max_backoff.count() <= 0) {
    return invalid_argument("libvirt reconnect backoff: must be positive");
  }
  if (!options.qemu_run_dir.empty() && options.qemu_run_dir.front() != '/') {
    return invalid_argument("libvirt QEMU run directory: '" + options.qemu_run_dir +
                            "' is not an absolute path");
  }
  NM_RETURN_IF_ERROR(init_libvirt_once());

  LibvirtOptions normalized = options;
  normalized.pool_dir = sanitize_path(options.pool_dir);
  std::unique_ptr<LibvirtHypervisor> hv(new LibvirtHypervisor(std::move(normalized)));
  hv->event_thread_ = std::thread([raw = hv.get()] {
    while (!raw->stop_.load(std::memory_order_acquire)) {
      if (virEventRunDefaultImpl() < 0) {
        lv_log()->error("libvirt event loop iteration failed; continuing");
        virResetLastError();
      }
    }
  });

  if (is_local_qemu_system(hv->options_.uri) && !hv->options_.qemu_run_dir.empty()) {
    NM_RETURN_IF_ERROR(hv->sink_->watches.open(hv->options_.qemu_run_dir));
    hv->watch_thread_ = std::thread([raw = hv.get()] { raw->run_watch_thread(); });
  }

  auto conn = hv->connection();
  if (!conn.is_ok()) {
    if (conn.status().code() != Code::kUnavailable) return conn.status();
    // libvirtd may come later (boot order, a restart in progress): start disconnected and let
    // the reconnect thread connect. Its first connection is announced like a reconnect (set
    // before the thread starts). The overlay pool is ensured by the first overlay call on it, as
    // after any reconnect.
    hv->start_error_ = conn.status().message();
    const std::lock_guard lock(hv->liveness_->mu);
    hv->liveness_->ever_up = true;
  }
  hv->reconnect_thread_ = std::thread([raw = hv.get()] { raw->run_reconnect_thread(); });
  if (!conn.is_ok()) {
    lv_log()->error("{}; running without libvirt, reconnecting in the background",
                    hv->start_error_);
    return hv;
  }
  NM_ASSIGN_OR_RETURN(PoolPtr pool, ensure_pool((*conn)->get(), hv->options_, hv->pool_mu_));
  if (hv->sink_->watches.enabled()) {
    auto listed = hv->list_domains();  // arms the watch of every running domain of ours
    if (!listed.is_ok()) {
      lv_log()->warn(
          "cannot list domains to watch their QEMU processes: {}; watching from the "
          "next listing on",
          listed.status().message());
    }
  }
  lv_log()->info("connected to '{}' (its default domain type '{}'), overlays in pool '{}' at '{}'",
                 hv->options_.uri, hv->default_domain_type(), hv->options_.pool_name,
                 hv->options_.pool_dir);
  return hv;
}

LibvirtHypervisor::~LibvirtHypervisor() {
  stop_watch_thread();
  stop_reconnect_thread();
  {
    std::lock_guard lock(conn_mu_);
    conn_.reset();
  }
  stop_event_thread();
}

void LibvirtHypervisor::stop_reconnect_thread() {
  if (!reconnect_thread_.joinable()) return;
  {
    std::lock_guard lock(liveness_->mu);
    liveness_->stopping = true;
  }
  liveness_->cv.notify_all();
  reconnect_thread_.join();
}

void LibvirtHypervisor::stop_watch_thread() {
  if (!watch_thread_.joinable()) return;
  sink_->watches.stop();
  watch_thread_.join();
}

void LibvirtHypervisor::run_watch_thread() {
  EmulatorWatches& w = sink_->watches;
  std::array<epoll_event, 16> ready{};
  while (true) {
    const int n = epoll_wait(w.epoll.get(), ready.data(), static_cast<int>(ready.size()), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      lv_log()->error(
          "waiting for QEMU processes failed: {}; QEMU exits are seen from libvirt only",
          errno_status(errno, "epoll_wait").message());
      return;
    }
    for (const epoll_event& ev : std::span(ready.data(), static_cast<size_t>(n))) {
      if (ev.data.u64 != EmulatorWatches::kWakeKey) {
        sink_->deliver_exit(ev.data.u64);
        continue;
      }
      if (w.stopped()) return;
      uint64_t count = 0;
      if (read(w.wake.get(), &count, sizeof count) < 0) {
        // EAGAIN: drained by an earlier wake-up.
      }
    }
  }
}

void LibvirtHypervisor::watch_emulator(const DomainInfo& info) {
  if (!sink_->watches.enabled() || !info.owner) return;
  if (info.state == DomainState::kShutOff || info.state == DomainState::kNoState) return;
  sink_->watches.arm(info.uuid, info.name);
}

void LibvirtHypervisor::look_up_to_watch(bool all, const std::vector<std::string>& uuids) {
  if (all) {
    auto listed = list_domains();
    if (!listed.is_ok()) {
      lv_log()->debug("listing domains to watch their QEMU processes failed: {}",
                      listed.status().message());
    }
    return;
  }
  for (const std::string& uuid : uuids) {
    Result<VmId> id = VmId::parse(uuid, "domain uuid");
    if (id.is_ok()) (void)get_domain(*id);
  }
}

void LibvirtHypervisor::run_reconnect_thread() {
  using Clock = std::chrono::steady_clock;
  LibvirtLiveness& l = *liveness_;
  int failures = 0;
  std::unique_lock lock(l.mu);
  while (!l.stopping) {
    if (!l.pending.empty()) {
      std::deque<LibvirtLiveness::Transition> batch;
      batch.swap(l.pending);
      lock.unlock();
      for (const auto& t : batch) l.deliver(t);
      lock.lock();
      continue;
    }
    const auto woken = [&] { return l.stopping || !l.pending.empty(); };
    if (l.connected.load(std::memory_order_acquire)) {
      failures = 0;
      if (l.rescan || !l.to_watch.empty()) {
        const bool all = std::exchange(l.rescan, false);
        std::vector<std::string> uuids = std::exchange(l.to_watch, {});
        lock.unlock();
        look_up_to_watch(all, uuids);
        lock.lock();
        continue;
      }
      l.cv.wait(lock, [&] { return woken() || l.rescan || !l.to_watch.empty(); });
      continue;
    }
    if (Clock::now() < l.next_attempt) {
      l.cv.wait_until(lock, l.next_attempt, woken);
      continue;
    }
    lock.unlock();
    Status attempt;
    {
      std::unique_lock conn_lock(conn_mu_);
      attempt = connection_locked().status();
    }
    lock.lock();
    if (attempt.is_ok()) {
      lv_log()->info("reconnected to '{}' after {} failed attempt(s)", options_.uri, failures);
      continue;
    }
    if (l.connected.load(std::memory_order_acquire)) continue;  // a caller reconnected meanwhile
    ++failures;
    l.backoff = std::min(l.backoff * 2, options_.reconnect_max_backoff);
    l.next_attempt = Clock::now() + l.backoff;
    lv_log()->debug("reconnect to '{}' failed: {}; retrying in {} ms", options_.uri,
                    attempt.message(), l.backoff.count());
  }
}

void LibvirtHypervisor::stop_event_thread() {
  if (!event_thread_.joinable()) return;
  stop_.store(true, std::memory_order_release);
  // A zero timeout fires on every loop iteration, so whichever thread iterates the (shared)
  // loop wakes at once, and ours sees the flag at its next turn.
  const int timer = virEventAddTimeout(0, wake_timer, nullptr, nullptr);
  event_thread_.join();
  if (timer >= 0) virEventRemoveTimeout(timer);
}

Result<std::shared_ptr<LibvirtConnection>> LibvirtHypervisor::connection() {
  std::unique_lock lock(conn_mu_, std::defer_lock);
  if (!lock.try_lock_for(kCallWaitForReconnect)) {
    return unavailable("connection to '" + options_.uri + "' is being re-established");
  }
  return connection_locked();
}

Result<std::shared_ptr<LibvirtConnection>> LibvirtHypervisor::connection_locked() {
  if (conn_ && virConnectIsAlive(conn_->get()) == 1) return conn_;
  virResetLastError();
  if (conn_ && liveness_->down(conn_->generation, "connection to '" + options_.uri + "' is dead")) {
    lv_log()->warn("connection to '{}' is dead; reconnecting", options_.uri);
  }
  conn_.reset();
  NM_ASSIGN_OR_RETURN(conn_, open_connection_locked());
  liveness_->up(conn_->generation);
  return conn_;
}

Result<std::shared_ptr<LibvirtConnection>> LibvirtHypervisor::open_connection_locked() {
  auto c = std::make_shared<LibvirtConnection>();
  c->conn.reset(virConnectOpen(options_.uri.c_str()));
  if (!c->conn) {
    Status s = libvirt_status("connect to '" + options_.uri + "'");
    if (s.code() == Code::kInternal) s = Status(Code::kUnavailable, s.message());
    return s;
  }
  if (virConnectSetKeepAlive(c->get(), options_.keepalive_interval_s, options_.keepalive_count) <
      0) {
    virResetLastError();  // local drivers (test://) have no keepalive
  }
  // Drivers without close notification (test://) accept the registration and drop it without
  // calling a free function, so the opaque is owned by the connection, not handed over.
  c->uri = options_.uri;
  c->liveness = liveness_.get();
  c->generation = ++last_generation_;
  if (virConnectRegisterCloseCallback(c->get(), close_callback, c.get(), nullptr) == 0) {
    c->close_registered = true;
  } else {
    virResetLastError();
  }
  // libvirt owns this reference from a successful registration on and drops it with
  // free_sink_ref once the callback can no longer run.
  auto sink_ref = std::make_unique<std::shared_ptr<LibvirtEventSink>>(sink_);
  c->lifecycle_id = virConnectDomainEventRegisterAny(
      c->get(), nullptr, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
      VIR_DOMAIN_EVENT_CALLBACK(lifecycle_callback), sink_ref.get(), free_sink_ref);
  if (c->lifecycle_id < 0) {
    return libvirt_status("register for lifecycle events on '" + options_.uri + "'", c->get());
  }
  (void)sink_ref.release();
  const char* type = virConnectGetType(c->get());
  if (type == nullptr) return libvirt_status("get the hypervisor type of '" + options_.uri + "'");
  const std::string t(type);
  std::lock_guard type_lock(type_mu_);
  domain_type_ = (t == "TEST" || t == "Test") ? "test" : "kvm";
  return c;
}

std::string LibvirtHypervisor::default_domain_type() const {
  std::lock_guard lock(type_mu_);
  return domain_type_;
}

Result<std::vector<DomainInfo>> LibvirtHypervisor::list_domains() {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  virDomainPtr* raw = nullptr;
  const int n = virConnectListAllDomains(c->get(), &raw, 0);
  if (n < 0) return libvirt_status("list domains", c->get());
  std::unique_ptr<virDomainPtr, MallocFreer> array(raw);
  std::vector<DomainPtr> doms;
  doms.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) doms.emplace_back(raw[i]);

  std::vector<DomainInfo> out;
  out.reserve(doms.size());
  for (const DomainPtr& dom : doms) {
    Result<DomainInfo> info = describe(dom.get(), c->get());
    if (!info.is_ok()) {
      if (info.status().code() == Code::kNotFound) continue;  // undefined while we listed
      return info.status();
    }
    watch_emulator(*info);
    out.push_back(std::move(info).value());
  }
  return out;
}

Result<std::optional<DomainInfo>> LibvirtHypervisor::get_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  Result<DomainPtr> dom = lookup_domain(c->get(), id);
  if (!dom.is_ok()) {
    if (dom.status().code() == Code::kNotFound) return std::optional<DomainInfo>();
    return dom.status();
  }
  Result<DomainInfo> info = describe(dom->get(), c->get());
  if (!info.is_ok()) {
    if (info.status().code() == Code::kNotFound) return std::optional<DomainInfo>();
    return info.status();
  }
  watch_emulator(*info);
  return std::optional<DomainInfo>(std::move(info).value());
}

Status LibvirtHypervisor::define_domain(const std::string& xml) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  DomainPtr dom(virDomainDefineXML(c->get(), xml.c_str()));
  if (!dom) return libvirt_status("define domain", c->get());
  return Status::ok();
}

Status LibvirtHypervisor::start_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(DomainPtr dom, lookup_domain(c->get(), id));
  NM_ASSIGN_OR_RETURN(bool active, is_active(dom.get(), c->get(), id));
  if (!active && virDomainCreate(dom.get()) < 0) {
    Status s = libvirt_status("start domain '" + id.str() + "'", c->get());
    if (s.code() != Code::kConflict) return s;
    Result<bool> now = is_active(dom.get(), c->get(), id);
    if (!now.is_ok() || !*now) return s;  // else: started by someone else meanwhile
  }
  if (sink_->watches.enabled()) {
    Result<DomainInfo> info = describe(dom.get(), c->get());
    if (info.is_ok()) watch_emulator(*info);
  }
  return Status::ok();
}

Status LibvirtHypervisor::shutdown_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(DomainPtr dom, lookup_domain(c->get(), id));
  NM_ASSIGN_OR_RETURN(bool active, is_active(dom.get(), c->get(), id));
  if (!active) return Status::ok();
  if (virDomainShutdown(dom.get()) < 0) {
    Status s = libvirt_status("shut down domain '" + id.str() + "'", c->get());
    if (s.code() == Code::kConflict) {
      Result<bool> now = is_active(dom.get(), c->get(), id);
      if (now.is_ok() && !*now) return Status::ok();
    }
    return s;
  }
  return Status::ok();
}

Status LibvirtHypervisor::destroy_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(DomainPtr dom, lookup_domain(c->get(), id));
  NM_ASSIGN_OR_RETURN(bool active, is_active(dom.get(), c->get(), id));
  if (!active) return Status::ok();
  if (virDomainDestroy(dom.get()) < 0) {
    Status s = libvirt_status("destroy domain '" + id.str() + "'", c->get());
    if (s.code() == Code::kConflict || s.code() == Code::kNotFound) {
      // Stopped meanwhile, or a transient domain that vanished with its stop.
      // Only a domain seen inactive (or gone) counts as destroyed; a failed check does not.
      Result<bool> now = is_active(dom.get(), c->get(), id);
      if (now.is_ok() ? !*now : now.status().code() == Code::kNotFound) return Status::ok();
    }
    return s;
  }
  return Status::ok();
}

Status LibvirtHypervisor::reboot_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(DomainPtr dom, lookup_domain(c->get(), id));
  NM_ASSIGN_OR_RETURN(bool active, is_active(dom.get(), c->get(), id));
  if (!active) return conflict("domain '" + id.str() + "' is not running");
  if (virDomainReboot(dom.get(), 0) < 0) {
    return libvirt_status("reboot domain '" + id.str() + "'", c->get());
  }
  return Status::ok();
}

Status LibvirtHypervisor::undefine_domain(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  Result<DomainPtr> dom = lookup_domain(c->get(), id);
  if (!dom.is_ok()) return dom.status().code() == Code::kNotFound ? Status::ok() : dom.status();
  const unsigned flags = VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA |
                         VIR_DOMAIN_UNDEFINE_NVRAM;
  if (virDomainUndefineFlags(dom->get(), flags) == 0) return Status::ok();
  const int code = last_error_code();
  if (code == VIR_ERR_INVALID_ARG || code == VIR_ERR_NO_SUPPORT) {
    virResetLastError();  // drivers without these flags (the test driver)
    if (virDomainUndefine(dom->get()) == 0) return Status::ok();
  }
  Status s = libvirt_status("undefine domain '" + id.str() + "'", c->get());
  if (s.code() == Code::kNotFound) return Status::ok();
  // Undefining a transient domain is "operation invalid": it goes away when stopped.
  if (s.code() == Code::kConflict && virDomainIsPersistent(dom->get()) == 0) return Status::ok();
  virResetLastError();
  return s;
}

Result<std::string> LibvirtHypervisor::create_overlay(const VmId& id, const std::string& base_path,
                                                      const std::string& base_format,
                                                      uint64_t capacity_bytes) {
  if (base_format != "raw" && base_format != "qcow2") {
    return invalid_argument("overlay base format: '" + base_format + "' is not 'raw' or 'qcow2'");
  }
  if (capacity_bytes == 0) return invalid_argument("overlay capacity: must be positive");
  if (base_path.empty() || base_path.front() != '/') {
    return invalid_argument("overlay base: '" + base_path + "' is not an absolute path");
  }
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(PoolPtr pool, ensure_pool(c->get(), options_, pool_mu_));
  const std::string name = overlay_name(id);

  VolPtr old(virStorageVolLookupByName(pool.get(), name.c_str()));
  if (old) {
    lv_log()->info("replacing leftover overlay '{}'", name);
    if (virStorageVolDelete(old.get(), 0) < 0) {
      return libvirt_status("delete leftover overlay '" + name + "'", c->get());
    }
  } else if (last_error_code() != VIR_ERR_NO_STORAGE_VOL) {
    return libvirt_status("look up overlay '" + name + "'", c->get());
  }
  virResetLastError();

  const std::string xml =
      "<volume><name>" + xml_escape(name) + "</name><capacity unit='bytes'>" +
      std::to_string(capacity_bytes) +
      "</capacity><allocation unit='bytes'>0</allocation><target><format type='qcow2'/>"
      "<permissions><mode>0600</mode></permissions></target><backingStore><path>" +
      xml_escape(base_path) + "</path><format type='" + base_format + "'/></backingStore></volume>";
  VolPtr vol(virStorageVolCreateXML(pool.get(), xml.c_str(), 0));
  if (!vol) return libvirt_status("create overlay '" + name + "'", c->get());
  CharPtr path(virStorageVolGetPath(vol.get()));
  if (!path) return libvirt_status("get the path of overlay '" + name + "'", c->get());
  return std::string(path.get());
}

Result<std::optional<std::string>> LibvirtHypervisor::find_overlay(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(PoolPtr pool, ensure_pool(c->get(), options_, pool_mu_));
  const std::string name = overlay_name(id);
  VolPtr vol(virStorageVolLookupByName(pool.get(), name.c_str()));
  if (!vol) {
    if (last_error_code() == VIR_ERR_NO_STORAGE_VOL) {
      virResetLastError();
      return std::optional<std::string>();
    }
    return libvirt_status("look up overlay '" + name + "'", c->get());
  }
  CharPtr path(virStorageVolGetPath(vol.get()));
  if (!path) return libvirt_status("get the path of overlay '" + name + "'", c->get());
  return std::optional<std::string>(path.get());
}

Status LibvirtHypervisor::delete_overlay(const VmId& id) {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(PoolPtr pool, ensure_pool(c->get(), options_, pool_mu_));
  const std::string name = overlay_name(id);
  VolPtr vol(virStorageVolLookupByName(pool.get(), name.c_str()));
  if (!vol) {
    if (last_error_code() == VIR_ERR_NO_STORAGE_VOL) {
      virResetLastError();
      return Status::ok();
    }
    return libvirt_status("look up overlay '" + name + "'", c->get());
  }
  if (virStorageVolDelete(vol.get(), 0) < 0) {
    if (last_error_code() == VIR_ERR_NO_STORAGE_VOL) {  // deleted by someone else meanwhile
      virResetLastError();
      return Status::ok();
    }
    return libvirt_status("delete overlay '" + name + "'", c->get());
  }
  return Status::ok();
}

Result<std::vector<VmId>> LibvirtHypervisor::list_overlays() {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  NM_ASSIGN_OR_RETURN(PoolPtr pool, ensure_pool(c->get(), options_, pool_mu_));
  virStorageVolPtr* raw = nullptr;
  const int n = virStoragePoolListAllVolumes(pool.get(), &raw, 0);
  if (n < 0) return libvirt_status("list volumes of pool '" + options_.pool_name + "'", c->get());
  std::unique_ptr<virStorageVolPtr, MallocFreer> array(raw);
  std::vector<VolPtr> vols;
  vols.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) vols.emplace_back(raw[i]);

  constexpr std::string_view kSuffix = ".qcow2";
  std::vector<VmId> out;
  for (const VolPtr& vol : vols) {
    const char* name = virStorageVolGetName(vol.get());
    if (name == nullptr) continue;
    const std::string_view n_view(name);
    if (n_view.size() <= kSuffix.size() || !n_view.ends_with(kSuffix)) continue;
    Result<VmId> vm = VmId::parse(n_view.substr(0, n_view.size() - kSuffix.size()), "overlay");
    if (vm.is_ok()) out.push_back(std::move(vm).value());
  }
  return out;
}

Result<HostInfo> LibvirtHypervisor::host_info() {
  NM_ASSIGN_OR_RETURN(auto c, connection());
  virNodeInfo info{};
  if (virNodeGetInfo(c->get(), &info) < 0) {
    return libvirt_status("get the host information of '" + options_.uri + "'", c->get());
  }
  return HostInfo{.cpus = info.cpus, .memory_bytes = uint64_t{info.memory} * 1024};
}

bool LibvirtHypervisor::connected() const {
  return liveness_->connected.load(std::memory_order_acquire);
}

void LibvirtHypervisor::set_connection_handler(ConnectionHandler handler) {
  auto h = std::make_shared<const ConnectionHandler>(std::move(handler));
  std::lock_guard lock(liveness_->handler_mu);
  liveness_->handler = std::move(h);
}

void LibvirtHypervisor::set_event_handler(EventHandler handler) {
  auto h = std::make_shared<const EventHandler>(std::move(handler));
  std::lock_guard lock(sink_->mu);
  sink_->handler = std::move(h);
}

}  // namespace nm
