// BusClient: nodectl's only door to the bus. Every sd-bus call of the CLI lives in
// bus_client.cc; callers see project types and Status/Result.
//
// Errors: a D-Bus error reply keeps its message and gets the Code of its name
// (code_from_dbus_error in format.h): the daemon's own errors map one-to-one, a missing daemon
// or a timeout is Unavailable. Connection failures are Unavailable (AccessDenied for EACCES).
//
// Not thread-safe; one per process.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "format.h"
#include "nm/core/status.h"

namespace nm::cli {

struct CreateVmReply {
  std::string vm_id;
  std::string vm_path;
  std::string job;
};

struct EventPage {
  std::vector<EventRow> events;
  uint64_t last_seq = 0;
};

// A job's byte progress (its BytesDone and BytesTotal properties; total 0 when not known).
struct JobProgress {
  uint64_t done = 0;
  uint64_t total = 0;
};

// A deadline for waits; nullopt waits forever.
using Deadline = std::optional<std::chrono::steady_clock::time_point>;

class BusClient {
 public:
  // `bus`: "system", "session" (the user bus) or a D-Bus address ("unix:path=/run/x").
  // `call_timeout` bounds every method call.
  static Result<std::unique_ptr<BusClient>> connect(std::string_view bus,
                                                    std::chrono::microseconds call_timeout);
  ~BusClient();
  BusClient(const BusClient&) = delete;
  BusClient& operator=(const BusClient&) = delete;

  // ---- Manager methods (org.nodemanager.NodeManager1.Manager) ----
  Result<CreateVmReply> create_vm(const std::string& spec_json, const std::string& request_id);
  Result<std::string> start_vm(const std::string& vm, const std::string& request_id);
  Result<std::string> stop_vm(const std::string& vm, bool force, const std::string& request_id);
  Result<std::string> reboot_vm(const std::string& vm, const std::string& request_id);
  Result<std::string> delete_vm(const std::string& vm, const std::string& request_id);
  Result<std::string> get_vm(const std::string& vm);
  Result<std::vector<VmRow>> list_vms(const std::string& tenant);
  // `fd` is sent as the 'h' argument (the bus duplicates it); the caller keeps ownership.
  Result<std::string> import_image(const std::string& image, int fd, const std::string& sha256,
                                   const std::string& kind, const std::string& tenant,
                                   const std::string& request_id);
  Result<std::vector<ImageRow>> list_images();
  Status remove_image(const std::string& image, const std::string& request_id);
  // PullImage: the job's object path.
  Result<std::string> pull_image(const std::string& image, const std::string& request_id);
  Status pin_image(const std::string& image, bool pinned, const std::string& request_id);
  // CollectImages; `min_age_s` < 0 uses the daemon's configured minimum age.
  Result<GcReply> collect_images(int64_t min_age_s, bool dry_run);
  // VerifyImages (all cached blobs when `images` is empty): the job's object path.
  Result<std::string> verify_images(const std::vector<std::string>& images,
                                    const std::string& request_id);
  Result<EventPage> get_events(uint64_t since, uint32_t max);
  // The Manager's LastEventSeq property: the seq of the newest event recorded so far.
  Result<uint64_t> last_event_seq();
  // Tenant networks; the job-starting ones return the job's object path.
  Result<std::string> create_network(const std::string& spec_json, const std::string& request_id);
  Result<std::string> delete_network(const std::string& name, const std::string& request_id);
  Result<std::string> get_network(const std::string& name);
  Result<std::vector<NetworkRow>> list_networks(const std::string& tenant);

  // Node health, capacity, maintenance.
  Result<HealthReply> get_health();
  Result<std::vector<CapacityRow>> get_capacity();
  Status set_maintenance(bool enabled, const std::string& reason, const std::string& request_id);

  // ---- Jobs ----
  // Subscribes to JobRemoved and to the daemon's name owner changes. Call BEFORE the method
  // that starts the job, so that a job that ends before its reply arrives is still seen.
  Status watch_jobs();
  // Waits until the JobRemoved of `job` arrives. If the job object no longer exists (a retried
  // request id answered with a job that ended long ago) the outcome is looked up in the event
  // ring, and is "unknown" if the ring no longer has it. Unavailable if the daemon leaves the bus
  // or the deadline passes.
  Result<JobOutcome> wait_job(const std::string& job, Deadline deadline);
  // Subscribes to the PropertiesChanged signals of every job object (their byte progress). Call
  // BEFORE the method that starts the job, with watch_jobs().
  Status watch_job_progress();
  // Called by wait_jobs with the index (in `jobs`) of a job still running and its progress.
  using ProgressFn = std::function<void(size_t index, const JobProgress& progress)>;
  // Waits until every job of `jobs` ended (as wait_job does for one) and returns their outcomes
  // in the same order. `on_progress`, if set, is called once per running job with its current
  // progress, then after each PropertiesChanged of one (needs watch_job_progress()). Unavailable
  // if the daemon leaves the bus or the deadline passes.
  Result<std::vector<JobOutcome>> wait_jobs(const std::vector<std::string>& jobs, Deadline deadline,
                                            const ProgressFn& on_progress);

  // ---- Event stream ----
  // Subscribes to VmStateChanged, JobRemoved, HealthChanged and EventAppended. Call BEFORE
  // get_events() for a gap-free stream.
  Status watch_events();
  // Waits for at least one signal and returns the highest seq seen since the last call (0 on
  // deadline). Signals carry only the newest seq; the caller fetches the events with get_events.
  Result<uint64_t> wait_event_signal(Deadline deadline);

  // ---- Node watch ----
  // Subscribes to Heartbeat, HealthChanged and VmStateChanged.
  Status watch_node();
  // Waits for at least one of those signals and returns every one received, in bus order (empty
  // on deadline).
  Result<std::vector<NodeSignal>> wait_node_signals(Deadline deadline);

 private:
  struct Impl;
  explicit BusClient(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nm::cli
