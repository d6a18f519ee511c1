// Hypervisor port: everything nodemanager asks of libvirt, in the project's own types.
//
// Adapter: LibvirtHypervisor (nodemanager/libvirt/). Fake: tests/fakes/fake_hypervisor.h.
//
// Threading: every method is thread-safe and may block (it is called from job worker threads,
// never from the event loop). The event handler is called on the adapter's own threads, one call
// at a time; it must not block and must not throw.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/domain_xml.h"

namespace nm {

enum class DomainState {
  kNoState,
  kRunning,
  kBlocked,
  kPaused,
  kShuttingDown,
  kShutOff,
  kCrashed,
  kSuspended,  // PM-suspended
};
// libvirt's own short names: "nostate", "running", "blocked", "paused", "shutdown", "shutoff",
// "crashed", "pmsuspended".
inline std::string_view domain_state_name(DomainState s) {
  switch (s) {
    case DomainState::kNoState:
      return "nostate";
    case DomainState::kRunning:
      return "running";
    case DomainState::kBlocked:
      return "blocked";
    case DomainState::kPaused:
      return "paused";
    case DomainState::kShuttingDown:
      return "shutdown";
    case DomainState::kShutOff:
      return "shutoff";
    case DomainState::kCrashed:
      return "crashed";
    case DomainState::kSuspended:
      return "pmsuspended";
  }
  return "nostate";
}

// Why a domain is in its state, or why an event happened, where health cares (the adapter maps
// libvirt's state reasons and event details onto these).
enum class DomainCause {
  kOther,
  kIoError,        // paused (or suspended event) because a disk I/O failed
  kEmulatorGone,   // stopped because the QEMU process died (killed, crashed, OOM-killed)
  kGuestCrashed,   // the guest OS crashed (panic device), or "crashed" state
  kGuestShutdown,  // the guest powered itself off
  kDestroyed,      // forced off by a management call (ours or someone else's)
};

struct DomainInfo {
  std::string uuid;  // libvirt's UUID (equals the VmId for our domains)
  std::string name;
  DomainState state = DomainState::kNoState;
  int reason = 0;                           // libvirt's state reason, for logs
  DomainCause cause = DomainCause::kOther;  // `reason` in the project's terms
  bool persistent = true;
  std::optional<DomainOwner> owner;  // set when the domain carries our metadata element
};

enum class DomainEventKind {
  kDefined,
  kUndefined,
  kStarted,
  kSuspended,
  kResumed,
  kStopped,
  kShutdown,
  kCrashed,
  kPMSuspended,
  // The emulator (QEMU) process of a running domain exited, seen by the adapter itself (a pidfd)
  // the moment it happened. libvirt's own kStopped follows once libvirt has reaped the process,
  // which can take from 200 ms to seconds; until then libvirt still reports the domain running.
  // cause is kEmulatorGone.
  kEmulatorExited,
  kOther
};

struct DomainEvent {
  std::string uuid;
  DomainEventKind kind = DomainEventKind::kOther;
  int detail = 0;                           // libvirt's detail code
  DomainCause cause = DomainCause::kOther;  // `detail` in the project's terms
};

// The host as the hypervisor sees it (capacity accounting).
struct HostInfo {
  uint32_t cpus = 0;          // logical CPUs
  uint64_t memory_bytes = 0;  // physical memory
};

class Hypervisor {
 public:
  virtual ~Hypervisor() = default;

  // "kvm", "qemu" or "test": the <domain type> this connection can run.
  virtual std::string default_domain_type() const = 0;

  // Every domain on the connection, ours or not.
  virtual Result<std::vector<DomainInfo>> list_domains() = 0;
  // The domain with uuid == id, or nullopt.
  virtual Result<std::optional<DomainInfo>> get_domain(const VmId& id) = 0;

  // Defines (or redefines) a persistent domain from XML.
  virtual Status define_domain(const std::string& xml) = 0;
  // Each of these is idempotent: starting a running domain, stopping a stopped one or undefining
  // an absent one returns OK. NotFound only where the operation needs the domain to exist.
  virtual Status start_domain(const VmId& id) = 0;
  virtual Status shutdown_domain(const VmId& id) = 0;  // graceful (ACPI) request, returns at once
  virtual Status destroy_domain(const VmId& id) = 0;   // forced power-off
  virtual Status reboot_domain(const VmId& id) = 0;
  virtual Status undefine_domain(const VmId& id) = 0;

  // Creates the VM's qcow2 overlay volume backed by `base_path` (format `base_format`, "raw" or
  // "qcow2") with virtual size `capacity_bytes`, replacing a leftover volume of the same VM.
  // Returns the overlay's path.
  virtual Result<std::string> create_overlay(const VmId& id, const std::string& base_path,
                                             const std::string& base_format,
                                             uint64_t capacity_bytes) = 0;
  // The path of the VM's existing overlay volume, or nullopt when it has none. Used to re-define
  // a domain that vanished without touching the guest's disk.
  virtual Result<std::optional<std::string>> find_overlay(const VmId& id) = 0;
  // Deletes the VM's overlay volume; OK if absent.
  virtual Status delete_overlay(const VmId& id) = 0;
  // The VM ids that have an overlay volume (for orphan detection).
  virtual Result<std::vector<VmId>> list_overlays() = 0;

  // The host's CPUs and memory. Unavailable while disconnected.
  virtual Result<HostInfo> host_info() = 0;

  // Whether the connection to the hypervisor is up right now (no I/O; the adapter's view).
  virtual bool connected() const = 0;
  // Installs the connection handler (replacing any previous one): called on an adapter thread with
  // false and a reason when the connection is lost (libvirtd died or restarted, a keepalive timed
  // out), and with true once the adapter has reconnected by itself (with backoff) and re-registered
  // its event callbacks. Events that happened while disconnected are not replayed: the caller
  // audits after a reconnect. Must not block and must not throw.
  using ConnectionHandler = std::function<void(bool connected, const std::string& reason)>;
  virtual void set_connection_handler(ConnectionHandler handler) = 0;

  using EventHandler = std::function<void(const DomainEvent&)>;
  // Installs the lifecycle-event handler (replacing any previous one). A replaced handler may
  // still be completing a call on the event thread; only destroying the adapter waits for it.
  virtual void set_event_handler(EventHandler handler) = 0;
};

}  // namespace nm
