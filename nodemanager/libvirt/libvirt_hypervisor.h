// LibvirtHypervisor: the Hypervisor port over libvirt's C API (domains, storage volumes, events).
//
// One adapter owns one libvirt connection, one storage pool for the VMs' qcow2 overlays, one
// thread that runs libvirt's default event loop (lifecycle events, keepalive, the remote
// driver's socket I/O), one reconnect thread and, on a local qemu:///system connection, one watch
// thread that waits (epoll) on the pidfds of our domains' QEMU processes.
//
// Threading: every method may be called from any worker thread at the same time; libvirt
// connections are thread-safe and the adapter's own state (the connection handle, the event
// handler) is guarded by mutexes. Methods block for as long as libvirt does (a remote call to
// libvirtd, a qcow2 creation), so call them from job workers, never from the sd-event loop. The
// event handler runs on the adapter's event thread or its watch thread, one call at a time; it
// must not block and must not throw (an exception is caught and logged, and the event is
// dropped).
//
// Connection loss: libvirt's close callback (libvirtd exited or restarted, a keepalive timed
// out) marks the adapter disconnected at once: connected() turns false and the connection
// handler is called with false and the reason. The adapter then reconnects by itself on its
// reconnect thread, first after 100 ms, then with the delay doubling up to
// LibvirtOptions::reconnect_max_backoff; once a new connection is open and the lifecycle-event
// and close callbacks are registered on it, connected() turns true and the handler is called with
// true. A call that finds the connection dead before the close callback did (a race) reports the
// loss the same way. While disconnected, every call still tries to reconnect itself: it returns
// Unavailable at once when libvirtd refuses, and waits at most 500 ms for a reconnect another
// thread has in progress before returning Unavailable. Events that happened while disconnected
// are not replayed: the reconciler's audit after the reconnect is what converges state. The
// in-process test driver never closes: connected() is always true there.
//
// Late libvirtd: when libvirt cannot be reached at all in create() (Unavailable: libvirtd not
// started yet at boot, or restarting), the adapter is created disconnected (start_error() says
// why) and its reconnect thread (or any call, as above) connects, trying at once and then after
// 200 ms, doubling up to LibvirtOptions::reconnect_max_backoff; that first connection is
// announced to the connection handler like a reconnect (true), so the caller learns when to run
// what it could not do without libvirt.
//
// Connection handler: runs on the adapter's reconnect thread (one per adapter), never on a caller
// thread and never twice at once, in the order the transitions happened: false once per lost
// connection, then true once per reconnect. connected() changes before the matching handler call
// is queued, so a handler reading it sees that value or a later one. It must not block (the
// reconnect thread waits for it) and must not throw (an exception is caught and logged).
//
// Emulator watch (local qemu:///system only): the adapter watches the QEMU process of every
// active domain of ours (with our metadata) through a pidfd, because libvirt reports a dead QEMU
// only once the process has been reaped (200 ms polls, and seconds where PID 1 reaps slowly). The
// pid comes from QEMU's pid file "<LibvirtOptions::qemu_run_dir>/<domain name>.pid" and counts
// only once the process it names, pinned by the pidfd, has "-uuid <domain uuid>" on its command
// line, so a recycled pid or a QEMU that already died is never watched. A domain is armed by
// start_domain, by every list_domains/get_domain that sees it active, by a STARTED event (on the
// reconnect thread, which looks the domain up) and by a listing right after connecting (in
// create(), before it returns) and after each reconnect. Watches survive a lost connection: a
// QEMU dying while libvirtd is down is still seen. The moment a watched QEMU exits (for whatever
// reason, our own destroy_domain included) the event handler gets DomainEvent{uuid,
// kEmulatorExited, 0, kEmulatorGone} on the watch thread, exactly once per process, and the
// watch is dropped. A STOPPED or UNDEFINED event for the domain first delivers the kEmulatorExited
// of an exited QEMU not yet reported, so kEmulatorExited always precedes libvirt's kStopped for
// that process; it leaves a watch on a live QEMU in place (a newer run of the domain, whose start
// was seen before the old run's stop event arrived).
//
// Event handler: called on the event thread (libvirt's lifecycle events) and on the watch thread
// (kEmulatorExited), one call at a time, never both at once.
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
#include <chrono>
#include <cstdint>
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
  // Longest wait between two background reconnect attempts after the connection was lost (the
  // first comes after 100 ms, each next one after twice the previous wait up to this). Smaller
  // notices a returning libvirtd sooner at the cost of more connection attempts while it is
  // down. Must be positive.
  std::chrono::milliseconds reconnect_max_backoff{1000};
  // Where libvirtd's QEMU driver keeps each running domain's pid file "<name>.pid" (libvirtd's
  // run directory for qemu:///system). Used only when `uri` is the local "qemu:///system" (or
  // "qemu+unix:///system"): the adapter then watches our domains' QEMU processes (see the class
  // comment). Empty turns that watch off; otherwise must be absolute.
  std::string qemu_run_dir = "/run/libvirt/qemu";
};

// libvirt's state reason (virDomainGetState: `state` a virDomainState, `reason` the matching
// *Reason enum) in the project's terms. Paused on an I/O error -> kIoError; paused or "crashed"
// because the guest crashed -> kGuestCrashed; shut off because QEMU died (SHUTOFF_CRASHED: the
// QEMU process exited without a guest shutdown, which is also how a guest panic with
// on_crash=destroy ends), failed to start (SHUTOFF_FAILED: QEMU exited while starting) or was
// killed by libvirtd because it could not re-attach to it after a restart (SHUTOFF_DAEMON) ->
// kEmulatorGone; shut off by the guest -> kGuestShutdown; forced off -> kDestroyed; anything
// else -> kOther.
DomainCause domain_cause_of_state(int state, int reason);
// libvirt's lifecycle event detail (`event` a virDomainEventType, `detail` the matching
// *DetailType enum) in the project's terms. SUSPENDED_IOERROR -> kIoError; STOPPED_FAILED
// ("host emulator failed": what the QEMU driver emits when the QEMU process dies, killed or
// crashed) -> kEmulatorGone; STOPPED_CRASHED (QEMU driver: the guest panicked and on_crash is
// destroy) and every CRASHED_* event -> kGuestCrashed; STOPPED_SHUTDOWN -> kGuestShutdown;
// STOPPED_DESTROYED -> kDestroyed; anything else -> kOther.
DomainCause domain_cause_of_event(int event, int detail);

struct LibvirtConnection;  // the connection handle and its callback registrations (.cc only)
struct LibvirtEventSink;   // the handler shared with libvirt's callbacks (.cc only)
struct LibvirtLiveness;    // connected or not, pending handler calls, backoff (.cc only)

class LibvirtHypervisor final : public Hypervisor {
 public:
  // Registers libvirt's event implementation (once per process), starts the event thread,
  // connects to `options.uri`, registers the lifecycle-event and close callbacks, makes sure the
  // overlay pool exists and is active (and refreshes it) and starts the reconnect thread. The
  // adapter starts connected (no handler call for that), or, when libvirt cannot be reached
  // (Unavailable), disconnected with start_error() set (see "Late libvirtd" above); the pool is
  // then first checked by the first overlay call, which returns the Conflict below instead.
  // InvalidArgument for bad options, Conflict when the pool exists with another target, Internal
  // otherwise.
  static Result<std::unique_ptr<LibvirtHypervisor>> create(const LibvirtOptions& options);

  // Why create() could not connect; empty when it did.
  const std::string& start_error() const { return start_error_; }

  // Stops and joins the watch thread and the reconnect thread (waiting for a reconnect attempt,
  // domain lookup or handler call in progress), deregisters the callbacks, closes the connection,
  // stops and joins the event thread, and closes the pidfds. No handler call (event or
  // connection) is running or will start once the destructor returns.
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

  // virNodeGetInfo: logical CPUs and physical memory of the host libvirt runs on.
  Result<HostInfo> host_info() override;

  // No I/O: false from the moment the loss is noticed until a reconnect succeeded.
  bool connected() const override;
  void set_connection_handler(ConnectionHandler handler) override;
  void set_event_handler(EventHandler handler) override;

 private:
  explicit LibvirtHypervisor(LibvirtOptions options);

  // The live connection (reconnecting when the current one is dead). Shared with the caller, so
  // it stays valid for the whole call even if another thread replaces it meanwhile. Waits at
  // most 500 ms for another thread's reconnect (then Unavailable).
  Result<std::shared_ptr<LibvirtConnection>> connection();
  // The same with conn_mu_ held by the caller.
  Result<std::shared_ptr<LibvirtConnection>> connection_locked();
  Result<std::shared_ptr<LibvirtConnection>> open_connection_locked();
  // The reconnect thread: delivers connection-handler calls, reconnects with backoff and looks up
  // the domains whose STARTED event asks for an emulator watch (and all domains after a
  // reconnect).
  void run_reconnect_thread();
  void stop_reconnect_thread();
  // The watch thread: waits on the pidfds of watched QEMU processes and reports their exits.
  void run_watch_thread();
  void stop_watch_thread();
  // Arms the emulator watch for `info` when it is an active domain of ours (and watching is on).
  void watch_emulator(const DomainInfo& info);
  // On the reconnect thread: looks up every domain (`all`) or the domains `uuids`, which arms
  // their emulator watches.
  void look_up_to_watch(bool all, const std::vector<std::string>& uuids);
  void stop_event_thread();

  const LibvirtOptions options_;
  std::string start_error_;  // set in create() only

  // Connection state shared with the close callback and (for watch requests) the lifecycle
  // callback; never held across a libvirt call.
  const std::shared_ptr<LibvirtLiveness> liveness_;
  std::shared_ptr<LibvirtEventSink> sink_;  // holds liveness_ too

  // Held while (re)connecting, which can take as long as libvirtd takes to answer.
  std::timed_mutex conn_mu_;
  std::shared_ptr<LibvirtConnection> conn_;  // guarded by conn_mu_; null until connected
  uint64_t last_generation_ = 0;             // guarded by conn_mu_; numbers the connections

  // Never held across a libvirt call, so default_domain_type() does not wait for a reconnect.
  mutable std::mutex type_mu_;
  std::string domain_type_ = "kvm";  // guarded by type_mu_

  std::mutex pool_mu_;  // serializes ensuring the pool exists (define/build/start)

  std::atomic<bool> stop_{false};
  std::thread event_thread_;
  std::thread reconnect_thread_;
  std::thread watch_thread_;  // only with the emulator watch on
};

}  // namespace nm
