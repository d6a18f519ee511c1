// NodeService: the node's brain. Validates requests, records desired state durably, runs jobs,
// reconciles libvirt with the database and keeps the event ring.
//
// Threading: every public method runs on the event-loop thread. Jobs run their blocking steps on
// the WorkerPool and post back through the LoopExecutor. Observers are called on the loop thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/capacity.h"
#include "nm/core/clock.h"
#include "nm/core/fs.h"
#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/executor.h"
#include "nm/health.h"
#include "nm/health_probes.h"
#include "nm/hypervisor.h"
#include "nm/imagestore/image_source.h"
#include "nm/imagestore/image_store.h"
#include "nm/state_store.h"

namespace nm {

enum class OrphanPolicy { kReport, kRemove };

struct ServiceOptions {
  // Where overlays live is the hypervisor's business; this is where serial logs go.
  // Default: <state-dir>/instances.
  std::string instances_dir;
  // <domain type>; empty means the hypervisor's default ("kvm" on QEMU, "test" on test:///).
  std::string domain_type;
  // Graceful stop: how long to wait for the guest to power off before forcing it. Default 60 s.
  std::chrono::milliseconds stop_timeout{60000};
  // What the reconciler does with domains that carry our metadata but that the database does not
  // know. Default: report (an OrphanFound event and a warning), never silently keep.
  OrphanPolicy orphan_policy = OrphanPolicy::kReport;
  // The underlay interface VXLAN runs on (--underlay-interface). Empty: networks are host-local
  // and CreateNetwork refuses peers.
  std::string underlay_interface;
  // Shared image stores pull() tries in order (PullImage, and CreateVm of an image not cached);
  // owned by the caller, used from worker threads. Empty: only imported images exist.
  std::vector<ImageSource*> image_sources;
  // GC of images nothing uses (CollectImages and the daemon's periodic run): the default least
  // time since an image's last use. Default one day.
  std::chrono::seconds image_gc_min_age{86400};
  // CreateVm is refused (InsufficientCapacity) while the filesystem of instances_dir has less
  // than this free: VM disks are thin overlays that grow into it. Default 1 GiB.
  uint64_t disk_reserve_bytes = uint64_t{1} << 30;
  // ---- Health and capacity (issue 5; docs/operations.md "Read health") ----
  // Where the image cache lives: the image-disk check probes its filesystem. Empty: no check.
  std::string images_dir;
  DiskThresholds disk_thresholds;
  PsiThresholds psi_thresholds;
  // /proc/pressure/memory; empty: no memory-pressure check.
  std::string psi_path = "/proc/pressure/memory";
  // Host totals for capacity: 0 means what the hypervisor reports (read by the start-up
  // reconcile; 0 until it has run); disk is the instances filesystem, measured when asked.
  uint32_t host_vcpus = 0;
  uint64_t host_memory_mib = 0;
  CapacityOptions capacity;
  std::map<std::string, TenantQuota> tenant_quotas;  // by tenant; absent: unlimited
  // What happens when a VM that should run goes down without being asked to (its QEMU process
  // died, the guest crashed or powered off): restart after backoff up to max_restarts times in
  // the window, then state "failed" and a failed VM health check. A spec's crash_policy
  // overrides it per VM.
  CrashPolicy crash_policy;
  // Testing aid: each job sleeps this long between its steps (interruptible by Cancel), to widen
  // crash windows in tests. Default 0; never set in production.
  std::chrono::milliseconds debug_job_delay{0};
  // Group commit (a store with deferred_sync): what waits for durability waits at most this long
  // when the loop never runs out of work; otherwise it is released when the loop is idle.
  std::chrono::milliseconds sync_max_delay{2};
  // Called on the loop when the store cannot make written state durable (fsync failed): what
  // waited for it stays held. nodemanagerd exits (systemd restarts it from the database).
  std::function<void(const Status&)> on_sync_failure;
  // Called on the loop when a postponed start-up reconcile (see NodeService::start) has run.
  std::function<void()> on_startup_reconciled;
};

// Where a VM's serial console is written: <instances_dir>/<id>.serial.log.
std::string serial_log_path(const ServiceOptions& options, const VmId& id);

enum class JobState { kQueued, kRunning };
std::string_view job_state_name(JobState s);  // "queued", "running"

struct JobView {
  uint32_t id = 0;
  // "create", "start", "stop", "reboot", "delete", "define", "import", "pull", "verify",
  // "network-create", "network-delete"
  std::string kind;
  std::string object_id;  // VM id, image ref (import, pull), "images" (verify), network name
  JobState state = JobState::kQueued;
  double progress = 0.0;     // 0..1
  uint64_t bytes_done = 0;   // jobs that move or read image bytes (import, pull, verify, a create
  uint64_t bytes_total = 0;  // that pulls): bytes so far and in all (0 when not known)
};

// ListImages: one entry per tag, then one per cached blob no tag names, with the VMs (names) whose
// disk, kernel or initrd it is.
struct ImageEntry {
  ImageInfo info;
  std::vector<std::string> users;
};

// One Heartbeat: a sequence number counting from 1 at each daemon start, the wall clock, the
// node's state and a capacity summary (keys in docs/dbus-api.md).
struct Heartbeat {
  uint64_t seq = 0;
  uint64_t timestamp_us = 0;
  HealthState state = HealthState::kOk;
  bool maintenance = false;
  std::map<std::string, uint64_t> summary;
};

struct JobOutcome {
  std::string result;  // "done", "failed", "cancelled"
  Status error;        // OK unless failed
};

struct CreateVmReply {
  VmId vm_id;
  uint32_t job_id = 0;
};

// Called on the loop thread when things change; the D-Bus layer turns them into objects,
// PropertiesChanged and signals (during a method call it sends them after the reply, reading the
// objects' state then: so one service call never adds and removes the same object).
class ServiceObserver {
 public:
  virtual ~ServiceObserver() = default;
  virtual void on_vm_added(const VmRecord& vm) = 0;
  virtual void on_vm_changed(const VmRecord& vm) = 0;
  virtual void on_vm_removed(const VmId& id) = 0;
  virtual void on_job_added(const JobView& job) = 0;
  virtual void on_job_changed(const JobView& job) = 0;
  virtual void on_job_removed(const JobView& job, const JobOutcome& outcome,
                              const EventRecord& event) = 0;
  // Every event appended to the ring (JobRemoved included), after it was committed.
  virtual void on_event(const EventRecord& event) = 0;
  // A HealthChanged, after its event was committed (`event.seq` is 0 when the state database
  // could not record it: the state-db check then says why). on_event follows for a recorded one.
  virtual void on_health_changed(const HealthChange& change, const EventRecord& event) {
    (void)change;
    (void)event;
  }
  virtual void on_heartbeat(const Heartbeat& beat) { (void)beat; }
};

class NodeService {
 public:
  virtual ~NodeService() = default;

  virtual void set_observer(ServiceObserver* observer) = 0;

  // Loads desired state and runs the first reconcile synchronously enough that, when the
  // returned Status is OK, every VM known to the database is registered (observers notified)
  // and start-up convergence jobs are queued. When the hypervisor is Unavailable, the start-up
  // reconcile is postponed instead (startup_reconcile_pending()): VM changes are refused with
  // Unavailable, interrupted image and network jobs end at once, and audit() runs the reconcile
  // once it can read the hypervisor (retrying by itself while the hypervisor is connected but
  // the reading fails; on_startup_reconciled is called then).
  virtual Status start() = 0;
  // True from a start() that found the hypervisor Unavailable until the postponed start-up
  // reconcile has run.
  virtual bool startup_reconcile_pending() const { return false; }

  // ---- VMs. `vm` is an id or a name. Empty request_id: not idempotent. ----
  virtual Result<CreateVmReply> create_vm(std::string_view spec_json,
                                          std::string_view request_id) = 0;
  virtual Result<uint32_t> start_vm(std::string_view vm, std::string_view request_id) = 0;
  virtual Result<uint32_t> stop_vm(std::string_view vm, bool force,
                                   std::string_view request_id) = 0;
  virtual Result<uint32_t> reboot_vm(std::string_view vm, std::string_view request_id) = 0;
  virtual Result<uint32_t> delete_vm(std::string_view vm, std::string_view request_id) = 0;
  virtual Result<VmRecord> get_vm(std::string_view vm) const = 0;
  // Sorted by tenant, then name. Empty tenant: all.
  virtual std::vector<VmRecord> list_vms(std::string_view tenant) const = 0;
  // The same VMs in the same order, without copying them (the ListVms fast path). `fn` must not
  // call back into the service.
  virtual void visit_vms(std::string_view tenant,
                         const std::function<void(const VmRecord&)>& fn) const {
    for (const auto& vm : list_vms(tenant)) fn(vm);
  }

  // ---- Images ----
  virtual Result<uint32_t> import_image(std::string_view image, UniqueFd data,
                                        std::string_view sha256, std::string_view kind,
                                        std::string_view tenant, std::string_view request_id) = 0;
  virtual std::vector<ImageEntry> list_images() const = 0;
  // Conflict (naming the VMs) while a VM uses the image.
  virtual Status remove_image(std::string_view image, std::string_view request_id) = 0;
  // Queues a "pull" job for name:tag from the image sources (ImageStore::pull: single flight,
  // verified, byte progress); ImagePulled when done. InvalidArgument for a bad reference,
  // Unavailable when no source is configured.
  virtual Result<uint32_t> pull_image(std::string_view image, std::string_view request_id) = 0;
  // Pins (never collected) or unpins the image's blob; ImagePinned. NotFound when not cached.
  virtual Status pin_image(std::string_view image, bool pinned, std::string_view request_id) = 0;
  // Removes every cached blob that no VM uses, that is not pinned and was not used for at least
  // `min_age` (default: ServiceOptions::image_gc_min_age); one ImageCollected event per blob.
  // With `dry_run`, only reports what it would remove.
  virtual Result<GcPlan> collect_images(std::optional<std::chrono::seconds> min_age,
                                        bool dry_run) = 0;
  // Queues a "verify" job re-hashing the named images (all cached blobs when empty): one
  // ImageCorrupt event per bad blob, then ImageVerified {checked, corrupt}. The job fails when a
  // blob is corrupt.
  virtual Result<uint32_t> verify_images(const std::vector<std::string>& images,
                                         std::string_view request_id) = 0;

  // ---- Tenant networks (docs/network-spec.md) ----
  // Records the network and queues the job that builds it on the host ("network-create").
  // InvalidArgument naming the field for a bad spec, AlreadyExists for a taken name or VNI.
  virtual Result<uint32_t> create_network(std::string_view spec_json,
                                          std::string_view request_id) = 0;
  // Queues the job that removes it ("network-delete"). Conflict (naming them) while VMs use it.
  virtual Result<uint32_t> delete_network(std::string_view name, std::string_view request_id) = 0;
  virtual Result<NetworkRecord> get_network(std::string_view name) const = 0;
  // Sorted by name. Empty tenant: all.
  virtual std::vector<NetworkRecord> list_networks(std::string_view tenant) const = 0;
  // Ports of a VM (in spec order) or of a network (by VM id).
  virtual std::vector<PortRecord> vm_ports(const VmId& id) const = 0;
  virtual std::vector<PortRecord> network_ports(std::string_view network) const = 0;

  // ---- Events and jobs ----
  virtual Result<std::vector<EventRecord>> events_since(uint64_t since, uint32_t max) = 0;
  virtual uint64_t last_event_seq() const = 0;
  // The last event seq known to be on disk (<= last_event_seq(); equal once a group commit
  // synced): what may be shown outside a held reply, e.g. in a property.
  virtual uint64_t durable_event_seq() const { return last_event_seq(); }
  virtual std::vector<JobView> list_jobs() const = 0;
  virtual std::optional<JobView> get_job(uint32_t id) const = 0;
  // Queued jobs end at once as "cancelled"; a running job stops at its next step boundary.
  virtual Status cancel_job(uint32_t id) = 0;

  // ---- Reconciliation ----
  // Called (on the loop thread) for each hypervisor lifecycle event.
  virtual void on_domain_event(const DomainEvent& event) = 0;
  // Periodic audit: compares every VM with libvirt and queues convergence work (or runs the
  // postponed start-up reconcile). Called while one is in flight, it runs once more after it.
  virtual void audit() = 0;
  // The libvirt connection went down or came back (`detail` says how, for the libvirt check).
  // Back: the check turns ok, unless reading libvirt already failed while connected (the
  // postponed start-up reconcile): then it stays failed until an audit reads libvirt; either way
  // an audit follows. Loop thread.
  virtual void libvirt_connection_changed(bool connected, std::string detail) = 0;
  // Records a repair of the host side of networks that happened outside the audit (the DHCP
  // supervisor restarting a dead dnsmasq): a NetworkRepaired event and a warning.
  virtual void record_network_repair(const std::string& object, const std::string& what) {
    (void)object;
    (void)what;
  }
  // ---- Health, capacity, maintenance ----
  virtual HealthSnapshot health() const = 0;
  virtual std::vector<ResourceCapacity> capacity() const = 0;
  // Drain (true): CreateVm is refused with Unavailable, running VMs keep running; persisted
  // across restarts. Idempotent; raises HealthChanged when the flag flips.
  virtual Status set_maintenance(bool enabled, std::string_view reason,
                                 std::string_view request_id) = 0;
  // Sets a host check the daemon feeds from outside the service (the libvirt connection, the
  // uplink's netlink events). Loop thread.
  virtual void set_host_check(const std::string& name, HealthState state, std::string reason) = 0;
  // Runs the probing checks (state-db, image-disk, memory-pressure); the I/O runs on a worker.
  virtual void probe_health() = 0;
  // Emits one Heartbeat to the observer; returns it.
  virtual Heartbeat heartbeat() = 0;
  // Whether the systemd watchdog may be fed: the libvirt connection is not failed.
  virtual bool watchdog_healthy() const = 0;

  // Jobs queued or running (for STATUS= lines and clean shutdown).
  virtual size_t active_jobs() const = 0;
  // Before the daemon exits: asks running jobs to stop at their next step. Nothing is lost:
  // desired state is durable and the next start() finishes what they began. Guests keep running.
  virtual void shutdown() {}

  // Loop thread. Runs `fn` once every state change made so far is durable: at once when it is
  // (always, with a store that syncs each transaction), otherwise after the next group commit,
  // in call order. The D-Bus layer sends replies and signals through it, and the service starts
  // jobs through it, so nothing leaves the node or acts on desired state before it is on disk.
  virtual void after_durable(std::function<void()> fn) {
    const std::function<void()> run = std::move(fn);
    run();
  }
  // Loop thread, when the loop has stopped (shutdown): syncs now and releases the replies and
  // signals that waited; held jobs are not started (the next start finishes them). The sync's
  // Status: not OK means nothing was released.
  virtual Status release_held() { return Status::ok(); }
};

// GetVm's JSON document: {"id", "spec", "state", "state_reason", "desired_power", "generation",
// "observed_generation", "image_digest", "created_us", "updated_us"} (docs/dbus-api.md).
// With "ports": [{"network", "mac", "ip", "ifname"}] when the VM has any.
std::string vm_record_to_json(const VmRecord& vm, const std::vector<PortRecord>& ports = {});
// GetNetwork's JSON document: {"name", "tenant", "vni", "subnet", "gateway", "dhcp_server",
// "peers", "state", "state_reason", "created_us", "updated_us", "ports": [{"vm_id", "hostname",
// "mac", "ip", "ifname"}]} (docs/dbus-api.md).
std::string network_record_to_json(const NetworkRecord& network,
                                   const std::vector<PortRecord>& ports);

struct ServiceDeps {
  StateStore& store;
  Hypervisor& hypervisor;
  ImageStore& images;
  // Host side of tenant networks. Called from worker threads, one call at a time.
  network::TenantNetworks& networks;
  LoopExecutor& loop;
  WorkerPool& workers;
  const Clock& clock;
};

std::unique_ptr<NodeService> make_node_service(ServiceDeps deps, ServiceOptions options);

}  // namespace nm
