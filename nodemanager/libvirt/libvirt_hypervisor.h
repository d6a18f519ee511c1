// LibvirtHypervisor: the Hypervisor port over libvirt's C API (domains, storage volumes, events).
//
// One adapter owns one libvirt connection, one storage pool for the VMs' qcow2 overlays and one
// thread that runs libvirt's default event loop (lifecycle events, keepalive, the remote
// driver's socket I/O).
//
// Threading: every method may be called from any worker thread at the same time; libvirt
// connections are thread-safe and the adapter's own state (the connection handle, the event
// handler) is guarded by mutexes. Methods block for as long as libvirt does (a remote call to
// libvirtd, a qcow2 creation), so call them from job workers, never from the sd-event loop. The
// event handler runs on the adapter's event thread; it must not block and must not throw (an
// exception is caught and logged, and the event is dropped).
//
// Connection loss: when libvirtd goes away (restart, crash) the next call finds the connection
// dead and opens a new one (re-registering the event callback); if that fails the call returns
// Unavailable and the next call tries again. Events that happened while disconnected are not
// replayed: the reconciler's audit after reconnecting is what converges state.
//
// Errors: libvirt's per-thread last error is translated once, on the calling thread:
// no such domain / volume -> NotFound, operation invalid in the current state -> Conflict,
// connection and RPC failures -> Unavailable, everything else -> Internal. Messages carry
// libvirt's own text. libvirt's default behaviour of printing every error to stderr is turned off
// for the whole process.
//
// libvirt's event implementation is process-global: the first adapter created registers it
// (once per process), and each adapter runs its own thread iterating it. Several adapters may
// coexist (tests do so); each stops only its own thread.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/hypervisor.h"

namespace nm {

struct LibvirtOptions {
  // libvirt connection URI: "qemu:///system" in production, "test:///default" for the in-process
  // test driver (every connection to it in one process shares the same in-memory host).
  std::string uri = "qemu:///system";
  // Name of the directory storage pool that holds the VMs' overlays. The adapter defines, builds,
  // starts and marks it autostart when absent; an existing pool with this name must have
  // `pool_dir` as its target path (otherwise create() fails with Conflict).
  std::string pool_name = "nodemanager";
  // Target directory of that pool (absolute; created by libvirt if missing): the daemon passes
  // `<state-dir>/instances`. Required.
  std::string pool_dir;
  // Keepalive probes on remote connections: interval in seconds and unanswered probes before the
  // connection is declared dead. A dead connection is detected within about interval*(count+1)
  // seconds even when no call is in flight. Ignored by the in-process test driver.
  int keepalive_interval_s = 5;
  unsigned keepalive_count = 3;
};

struct LibvirtConnection;  // the connection handle and its callback registrations (.cc only)
struct LibvirtEventSink;   // the handler shared with libvirt's callbacks (.cc only)

class LibvirtHypervisor final : public Hypervisor {
 public:
  // Registers libvirt's event implementation (once per process), starts the event thread,
  // connects to `options.uri`, registers the lifecycle-event and close callbacks and makes sure
  // the overlay pool exists and is active (and refreshes it). InvalidArgument for bad options,
  // Unavailable when libvirt cannot be reached, Conflict when the pool exists with another
  // target, Internal otherwise.
  static Result<std::unique_ptr<LibvirtHypervisor>> create(const LibvirtOptions& options);

  // Deregisters the callbacks, closes the connection, stops and joins the event thread. No
  // handler call is running or will start once the destructor returns.
  ~LibvirtHypervisor() override;
  LibvirtHypervisor(const LibvirtHypervisor&) = delete;
  LibvirtHypervisor& operator=(const LibvirtHypervisor&) = delete;

  // "test" on the test driver, "kvm" otherwise (the daemon's config may override it with
  // "qemu" where KVM is unusable).
  std::string default_domain_type() const override;

  // All domains, persistent and transient. A domain whose metadata element in our namespace does
  // not parse is reported with no owner (and logged): we never touch what we cannot prove ours.
  Result<std::vector<DomainInfo>> list_domains() override;
  Result<std::optional<DomainInfo>> get_domain(const VmId& id) override;

  Status define_domain(const std::string& xml) override;
  // NotFound when the domain does not exist. OK when it is already active (running or paused).
  Status start_domain(const VmId& id) override;
  // NotFound when the domain does not exist; OK when it is inactive.
  Status shutdown_domain(const VmId& id) override;
  Status destroy_domain(const VmId& id) override;
  // NotFound when absent, Conflict when not running.
  Status reboot_domain(const VmId& id) override;
  // Removes the persistent definition with its managed-save image, snapshot metadata and NVRAM.
  // A running domain becomes transient (callers destroy first). OK when absent.
  Status undefine_domain(const VmId& id) override;

  // Volume "<vm-id>.qcow2" in the pool, mode 0600, thin (allocation 0), backed by `base_path`.
  // InvalidArgument for a `base_format` other than "raw"/"qcow2" or a zero capacity.
  Result<std::string> create_overlay(const VmId& id, const std::string& base_path,
                                     const std::string& base_format,
                                     uint64_t capacity_bytes) override;
  Result<std::optional<std::string>> find_overlay(const VmId& id) override;
  Status delete_overlay(const VmId& id) override;
  // Volumes named "<uuid>.qcow2" whose uuid is a valid VmId; other files are ignored.
  Result<std::vector<VmId>> list_overlays() override;

  void set_event_handler(EventHandler handler) override;

 private:
  explicit LibvirtHypervisor(LibvirtOptions options);

  // The live connection (reconnecting when the current one is dead). Shared with the caller, so
  // it stays valid for the whole call even if another thread replaces it meanwhile.
  Result<std::shared_ptr<LibvirtConnection>> connection();
  Result<std::shared_ptr<LibvirtConnection>> open_connection_locked();
  void stop_event_thread();

  const LibvirtOptions options_;
  std::shared_ptr<LibvirtEventSink> sink_;

  // Held while (re)connecting, which can take as long as libvirtd takes to answer.
  std::mutex conn_mu_;
  std::shared_ptr<LibvirtConnection> conn_;  // guarded by conn_mu_; null until connected

  // Never held across a libvirt call, so default_domain_type() does not wait for a reconnect.
  mutable std::mutex type_mu_;
  std::string domain_type_ = "kvm";  // guarded by type_mu_

  std::mutex pool_mu_;  // serializes ensuring the pool exists (define/build/start)

  std::atomic<bool> stop_{false};
  std::thread event_thread_;
};

}  // namespace nm
