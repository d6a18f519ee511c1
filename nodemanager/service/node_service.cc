#include "nm/node_service.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_set>

#include "nm/core/fs.h"
#include "nm/core/log.h"
#include "nm/domain_xml.h"
#include "nm/network/names.h"
#include "nm/vm_spec.h"

namespace nm {

using json = nlohmann::json;

std::string_view job_state_name(JobState s) {
  return s == JobState::kQueued ? "queued" : "running";
}

std::string serial_log_path(const ServiceOptions& options, const VmId& id) {
  return options.instances_dir + "/" + id.str() + ".serial.log";
}

namespace {

// A VM's image digest before its create job pulled the image (the spec's tag was not cached):
// the record's default, all zeros.
bool is_pending(const Digest& d) {
  static const Digest kPending = VmRecord{}.image_digest;
  return d == kPending;
}

// How a record's digest reads in JSON: "" while pending.
std::string digest_text(const Digest& d) {
  return is_pending(d) ? std::string() : d.str();
}

}  // namespace

std::string vm_record_to_json(const VmRecord& vm, const std::vector<PortRecord>& ports) {
  json j = {
      {"id", vm.id.str()},
      {"name", vm.spec.name.str()},
      {"tenant", vm.spec.tenant.str()},
      {"spec", json::parse(vm_spec_to_json(vm.spec))},
      {"state", vm.state},
      {"state_reason", vm.state_reason},
      {"desired_power", std::string(power_intent_name(vm.power))},
      {"deleting", vm.deleting},
      {"generation", vm.generation},
      {"observed_generation", vm.observed_generation},
      // "" while the create job is still pulling the image (all-zero digest in the record)
      {"image_digest", digest_text(vm.image_digest)},
      {"created_us", vm.created_us},
      {"updated_us", vm.updated_us},
  };
  if (vm.kernel_digest) j["kernel_digest"] = digest_text(*vm.kernel_digest);
  if (vm.initrd_digest) j["initrd_digest"] = digest_text(*vm.initrd_digest);
  if (!ports.empty()) {
    json arr = json::array();
    for (const auto& p : ports) {
      arr.push_back({{"network", p.network.str()},
                     {"mac", p.mac.str()},
                     {"ip", p.ip.str()},
                     {"ifname", p.ifname}});
    }
    j["ports"] = std::move(arr);
  }
  return j.dump();
}

std::string network_record_to_json(const NetworkRecord& n, const std::vector<PortRecord>& ports) {
  json peers = json::array();
  for (const auto& p : n.spec.peers) peers.push_back(p.str());
  json arr = json::array();
  for (const auto& p : ports) {
    arr.push_back({{"vm_id", p.vm.str()},
                   {"hostname", p.hostname},
                   {"mac", p.mac.str()},
                   {"ip", p.ip.str()},
                   {"ifname", p.ifname}});
  }
  return json{{"name", n.spec.name.str()},
              {"tenant", n.spec.tenant.str()},
              {"vni", n.spec.vni.value()},
              {"subnet", n.spec.subnet.str()},
              {"gateway", network::gateway_address(n.spec.subnet).str()},
              {"dhcp_server", network::dhcp_server_address(n.spec.subnet).str()},
              {"bridge", network::bridge_name(n.spec.vni)},
              {"peers", std::move(peers)},
              {"state", n.state},
              {"state_reason", n.state_reason},
              {"deleting", n.deleting},
              {"created_us", n.created_us},
              {"updated_us", n.updated_us},
              {"ports", std::move(arr)}}
      .dump();
}

namespace {

constexpr uint64_t kGiB = 1ull << 30;

// Bytes in whole GiB, rounded up (a 1.5 GiB image needs 2 GiB of disk).
constexpr uint64_t ceil_gib(uint64_t bytes) {
  return (bytes + kGiB - 1) / kGiB;
}

std::string observed_state(DomainState s) {
  switch (s) {
    case DomainState::kRunning:
    case DomainState::kBlocked:
      return "running";
    case DomainState::kPaused:
      return "paused";
    case DomainState::kShuttingDown:
      return "stopping";
    case DomainState::kShutOff:
      return "stopped";
    case DomainState::kCrashed:
      return "crashed";
    case DomainState::kSuspended:
      return "suspended";
    case DomainState::kNoState:
      break;
  }
  return "unknown";
}

Status cancelled_status() {
  return conflict("cancelled");
}

// Shared by the loop thread and the worker that runs a job.
struct JobContext {
  std::atomic<bool> cancelled{false};
  std::mutex mu;
  std::condition_variable cv;
  uint64_t wakeups = 0;

  uint64_t seen() {
    std::lock_guard lock(mu);
    return wakeups;
  }
  // Wakes a worker waiting in wait_until() (a domain event arrived, or Cancel()).
  void notify() {
    {
      std::lock_guard lock(mu);
      ++wakeups;
    }
    cv.notify_all();
  }
  // Waits until notify() after `seen`, cancellation, or `deadline`.
  void wait_until(uint64_t seen_wakeups, std::chrono::steady_clock::time_point deadline) {
    std::unique_lock lock(mu);
    cv.wait_until(lock, deadline, [&] { return wakeups != seen_wakeups || cancelled.load(); });
  }
  // Sleeps for `d` unless cancelled first. Returns false when cancelled.
  bool pause(std::chrono::milliseconds d) {
    if (d.count() <= 0) return !cancelled.load();
    std::unique_lock lock(mu);
    cv.wait_for(lock, d, [&] { return cancelled.load(); });
    return !cancelled.load();
  }
};

struct Job {
  JobView view;
  std::string key;  // jobs with the same key run one at a time, in order
  std::shared_ptr<JobContext> ctx = std::make_shared<JobContext>();
  // Blocking part, on a worker thread. Must only touch what it captured and thread-safe ports.
  std::function<Status(JobContext&)> work;
  // Loop part, with the work's Status and whether Cancel() was asked.
  std::function<void(const Status&, bool cancelled)> finish;
  // Loop part when the job is cancelled before it ran.
  std::function<void()> revert;
  bool cancellable_while_running = true;
  double last_progress_posted = 0.0;
  // The structured log fields of the request that queued it, plus the job id and its object:
  // set on the worker while the job runs and on the loop while it finishes.
  LogFields log_fields;
  std::optional<PowerIntent> intent;               // start/stop requests: the power they ask for
  PowerIntent prev_power = PowerIntent::kStopped;  // the desired power before that request
};

// What the start-up reconcile reads from the hypervisor; `host` only when the configuration
// leaves the host's CPUs or memory to libvirt.
struct HypervisorState {
  std::vector<DomainInfo> domains;
  std::vector<VmId> overlays;
  std::optional<HostInfo> host;
};

class NodeServiceImpl final : public NodeService {
 public:
  NodeServiceImpl(ServiceDeps deps, ServiceOptions options)
      : d_(deps), opt_(std::move(options)), log_(logger("service")) {}

  ~NodeServiceImpl() override {
    *alive_ = false;
    d_.hypervisor.set_event_handler(nullptr);
  }

  void shutdown() override {
    d_.hypervisor.set_event_handler(nullptr);
    for (auto& [id, job] : jobs_) {
      job->ctx->cancelled = true;
      job->ctx->notify();
    }
  }

  void set_observer(ServiceObserver* observer) override { observer_ = observer; }

  Status start() override {
    NM_ASSIGN_OR_RETURN(auto records, d_.store.list_vms());
    NM_ASSIGN_OR_RETURN(last_seq_, d_.store.last_event_seq());
    durable_last_seq_ = last_seq_;  // the store is durable when opened
    for (auto& r : records) {
      name_index_[r.spec.name.str()] = r.id.str();
      auto [it, _] = vms_.emplace(r.id.str(), std::move(r));
      if (observer_) observer_->on_vm_added(it->second);
    }
    // Runs on the hypervisor's event thread: touches only the loop, which outlives the service.
    d_.hypervisor.set_event_handler([this, loop = &d_.loop, alive = alive_](const DomainEvent& ev) {
      loop->post([this, alive, ev] {
        if (*alive) on_domain_event(ev);
      });
    });
    NM_ASSIGN_OR_RETURN(auto networks, d_.store.list_networks());
    for (auto& n : networks) networks_.emplace(n.spec.name.str(), std::move(n));
    NM_ASSIGN_OR_RETURN(auto ports, d_.store.list_ports());
    for (auto& p : ports) ports_[p.vm.str()].push_back(std::move(p));
    for (auto& [id, list] : ports_) {
      // Spec order: the tap's index digit is the network's position in the spec.
      std::sort(list.begin(), list.end(),
                [](const PortRecord& a, const PortRecord& b) { return a.ifname < b.ifname; });
    }
    NM_ASSIGN_OR_RETURN(auto unfinished, d_.store.unfinished_jobs());
    for (auto& j : unfinished) {
      std::string key = j.object_id;
      if (j.kind == "import" || j.kind == "pull") key = "image:" + j.object_id;
      if (j.kind == "verify") key = "images-verify";
      if (j.kind.rfind("network-", 0) == 0) key = network_key(j.object_id);
      interrupted_[key].push_back(std::move(j));
    }
    NM_RETURN_IF_ERROR(load_health());
    // VM checks live in memory; a VM the crash policy gave up on stays reported after a restart.
    for (const auto& [_, vm] : vms_) {
      if (vm.state == "failed") set_vm_health(vm, HealthState::kFailed, vm.state_reason);
    }
    start_networks();
    const Result<HypervisorState> hv = read_hypervisor(host_from_hypervisor());
    if (!hv.is_ok()) {
      if (hv.status().code() != Code::kUnavailable) return hv.status();
      // libvirtd is not there yet (boot order, a restart): serve what the database knows, refuse
      // VM changes, and reconcile once an audit reaches libvirt (the connection triggers one).
      startup_reconcile_pending_ = true;
      startup_error_ = hv.status().message();
      log_->warn("start-up reconcile postponed until libvirt answers: {}", startup_error_);
      end_interrupted_jobs(/*vms=*/false);  // images and networks need no libvirt
      return Status::ok();
    }
    finish_start(*hv, epoch_counter_);
    return Status::ok();
  }

  // On a worker (or in start(), before the loop runs): the hypervisor's side of the start-up
  // reconcile. Unavailable while libvirt cannot be reached.
  Result<HypervisorState> read_hypervisor(bool with_host) {
    HypervisorState st;
    NM_ASSIGN_OR_RETURN(st.domains, d_.hypervisor.list_domains());
    NM_ASSIGN_OR_RETURN(st.overlays, d_.hypervisor.list_overlays());
    if (with_host) {
      NM_ASSIGN_OR_RETURN(st.host, d_.hypervisor.host_info());
    }
    return st;
  }

  bool host_from_hypervisor() const { return opt_.host_vcpus == 0 || opt_.host_memory_mib == 0; }

  // The start-up reconcile: VMs found down are restored (not counted as crashes), interrupted
  // client jobs end. In start(), or at the first audit that reaches libvirt.
  void finish_start(const HypervisorState& hv, uint64_t taken_at) {
    domain_type_ =
        opt_.domain_type.empty() ? d_.hypervisor.default_domain_type() : opt_.domain_type;
    if (hv.host) {
      if (opt_.host_vcpus == 0) opt_.host_vcpus = hv.host->cpus;
      if (opt_.host_memory_mib == 0) opt_.host_memory_mib = hv.host->memory_bytes >> 20;
    }
    log_->info("capacity: {} CPUs, {} MiB memory (reserved {} CPUs, {} MiB; ratios {} / {} / {})",
               opt_.host_vcpus, opt_.host_memory_mib, opt_.capacity.reserved_vcpus,
               opt_.capacity.reserved_memory_mib, opt_.capacity.cpu_ratio,
               opt_.capacity.memory_ratio, opt_.capacity.disk_ratio);
    log_->info(
        "start-up reconcile: {} VMs in the database, {} domains on the hypervisor (domain "
        "type '{}')",
        vms_.size(), hv.domains.size(), domain_type_);
    const bool postponed = std::exchange(startup_reconcile_pending_, false);
    starting_ = true;
    reconcile_all(hv.domains, hv.overlays, taken_at);
    starting_ = false;
    end_interrupted_jobs(/*vms=*/true);
    if (!postponed) return;
    // Unless the connection was lost meanwhile (its handler reports that).
    if (std::exchange(startup_check_failed_, false) && d_.hypervisor.connected()) {
      set_host_check("libvirt", HealthState::kOk, "start-up reconcile done");
    }
    // Lifecycle events ignored meanwhile may have come after the listing it used.
    if (std::exchange(events_while_pending_, false)) audit();
    if (opt_.on_startup_reconciled) opt_.on_startup_reconciled();
  }

  bool startup_reconcile_pending() const override { return startup_reconcile_pending_; }

  void libvirt_connection_changed(bool connected, std::string detail) override {
    if (!connected) {
      set_host_check("libvirt", HealthState::kFailed, std::move(detail));
      return;
    }
    // Reading libvirt failed while it was connected: a new connection does not make that ok (the
    // check would flap ok -> failed at every reconnect); the audit below tells.
    if (!startup_check_failed_) set_host_check("libvirt", HealthState::kOk, std::move(detail));
    audit();
  }

  // A postponed start-up reconcile could not read libvirt. Unreachable: the connection coming up
  // triggers the next audit. Connected but failing (libvirtd still starting, a pool with another
  // target): that is the libvirt check's state now, and the audit is retried with backoff.
  void startup_read_failed(const Status& s) {
    startup_error_ = s.message();
    if (!d_.hypervisor.connected()) {
      startup_retry_ = kStartupRetryFirst;  // after the next connection, retry soon again
      return;
    }
    startup_check_failed_ = true;
    set_host_check("libvirt", HealthState::kFailed, "start-up reconcile: " + s.message());
    if (startup_retry_armed_) return;  // one retry at a time, whatever asked for audits
    startup_retry_armed_ = true;
    d_.loop.post_after(startup_retry_, [this, alive = alive_] {
      if (!*alive) return;
      startup_retry_armed_ = false;
      if (startup_reconcile_pending_) audit();
    });
    startup_retry_ = std::min(startup_retry_ * 2, kStartupRetryMax);
  }

  // VM changes wait for the start-up reconcile, which needs libvirt: a job queued before it
  // would run against state nobody has looked at yet.
  Status require_startup_reconciled() const {
    if (!startup_reconcile_pending_) return Status::ok();
    return unavailable("the start-up reconcile is waiting for libvirt (" + startup_error_ +
                       "): VMs cannot be created or changed until it has run (GetHealth shows the "
                       "libvirt check)");
  }

  // ---------------------------------------------------------------- VMs

  Result<CreateVmReply> create_vm(std::string_view spec_json,
                                  std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_ASSIGN_OR_RETURN(VmSpec spec, parse_vm_spec(spec_json));
    const ScopedLogFields fields(
        {{log_field::kTenant, spec.tenant.str()}, {log_field::kRequestId, request_id}});
    const std::string fingerprint = vm_spec_to_json(spec);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "CreateVm", fingerprint));
    if (replayed) {
      return CreateVmReply{VmId::trusted(replayed->at("vm_id").get<std::string>()),
                           replayed->at("job_id").get<uint32_t>()};
    }
    NM_RETURN_IF_ERROR(require_startup_reconciled());
    if (name_index_.count(spec.name.str())) {
      return already_exists("spec.name: a VM named '" + spec.name.str() +
                            "' already exists on this node");
    }
    if (spec.id && vms_.count(spec.id->str())) {
      return already_exists("spec.id: a VM with id '" + spec.id->str() + "' already exists");
    }
    // Images not cached yet are pulled by the create job (pending digests until then).
    VmRecord vm;
    NM_ASSIGN_OR_RETURN(
        auto disk, resolve_or_pending(spec.image, spec.tenant, ImageKind::kDisk, "spec.image"));
    if (disk) vm.image_digest = disk->digest;
    if (spec.kernel_image) {
      NM_ASSIGN_OR_RETURN(auto k, resolve_or_pending(*spec.kernel_image, spec.tenant,
                                                     ImageKind::kKernel, "spec.kernel_image"));
      vm.kernel_digest = k ? k->digest : VmRecord{}.image_digest;
    }
    if (spec.initrd_image) {
      NM_ASSIGN_OR_RETURN(auto i, resolve_or_pending(*spec.initrd_image, spec.tenant,
                                                     ImageKind::kInitrd, "spec.initrd_image"));
      vm.initrd_digest = i ? i->digest : VmRecord{}.image_digest;
    }
    if (disk) NM_RETURN_IF_ERROR(check_disk_size(spec, *disk));
    NM_RETURN_IF_ERROR(admit_disk());

    vm.id = spec.id ? *spec.id : generate_vm_id();
    const ScopedLogFields vm_field({{log_field::kVmId, vm.id.str()}});
    NM_ASSIGN_OR_RETURN(std::vector<PortRecord> ports, allocate_ports(vm.id, spec));
    NM_RETURN_IF_ERROR(admit_vm(spec, disk));
    vm.spec = std::move(spec);
    vm.spec.id = vm.id;
    vm.power = PowerIntent::kStopped;
    vm.generation = 1;
    vm.observed_generation = 0;
    vm.state = "creating";
    vm.state_reason = "create requested";
    vm.created_us = vm.updated_us = d_.clock.now_realtime_us();

    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "create", vm.id.str()));
          NM_RETURN_IF_ERROR(txn.put_vm(vm));
          for (const auto& p : ports) NM_RETURN_IF_ERROR(txn.put_port(p));
          NM_RETURN_IF_ERROR(put_reply(txn, rid, "CreateVm", fingerprint,
                                       {{"vm_id", vm.id.str()}, {"job_id", job_id}}));
          return append_state_event(txn, vm, events);
        },
        events));
    name_index_[vm.spec.name.str()] = vm.id.str();
    if (!ports.empty()) {
      ports_[vm.id.str()] = std::move(ports);
      ++net_epoch_;
    }
    auto& stored = vms_.insert_or_assign(vm.id.str(), vm).first->second;
    if (observer_) observer_->on_vm_added(stored);
    publish(events);
    log_->info("vm '{}' ({}) of tenant '{}' created, job {}", stored.spec.name.str(),
               stored.id.str(), stored.spec.tenant.str(), job_id);
    enqueue(make_define_job(job_id, stored, /*fresh_disk=*/true));
    return CreateVmReply{stored.id, job_id};
  }

  Result<uint32_t> start_vm(std::string_view ref, std::string_view request_id) override {
    return power_request(ref, request_id, "StartVm", "start", "", [&](VmRecord& vm, uint32_t id) {
      vm.power = PowerIntent::kRunning;
      return make_start_job(id, vm, "started");
    });
  }

  Result<uint32_t> stop_vm(std::string_view ref, bool force, std::string_view request_id) override {
    return power_request(ref, request_id, "StopVm", "stop", force ? "force" : "graceful",
                         [&](VmRecord& vm, uint32_t id) {
                           vm.power = PowerIntent::kStopped;
                           return make_stop_job(id, vm, force);
                         });
  }

  Result<uint32_t> reboot_vm(std::string_view ref, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    const std::string fingerprint(ref);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "RebootVm", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    NM_RETURN_IF_ERROR(require_startup_reconciled());
    NM_ASSIGN_OR_RETURN(VmRecord * vm, find_vm(ref));
    const ScopedLogFields fields({{log_field::kVmId, vm->id.str()},
                                  {log_field::kTenant, vm->spec.tenant.str()},
                                  {log_field::kRequestId, request_id}});
    if (vm->deleting) return conflict("vm '" + vm->spec.name.str() + "' is being deleted");
    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "reboot", vm->id.str()));
          return put_reply(txn, rid, "RebootVm", fingerprint, {{"job_id", job_id}});
        },
        events));
    enqueue(make_reboot_job(job_id, *vm));
    return job_id;
  }

  Result<uint32_t> delete_vm(std::string_view ref, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    const std::string fingerprint(ref);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "DeleteVm", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    NM_RETURN_IF_ERROR(require_startup_reconciled());
    NM_ASSIGN_OR_RETURN(VmRecord * vm, find_vm(ref));
    const ScopedLogFields fields({{log_field::kVmId, vm->id.str()},
                                  {log_field::kTenant, vm->spec.tenant.str()},
                                  {log_field::kRequestId, request_id}});
    std::vector<EventRecord> events;
    if (vm->deleting) {
      if (auto job = find_job(vm->id.str(), "delete")) {
        NM_RETURN_IF_ERROR(commit(
            [&](StateTxn& txn) {
              return put_reply(txn, rid, "DeleteVm", fingerprint, {{"job_id", *job}});
            },
            events));
        return *job;
      }
    }
    VmRecord next = *vm;
    next.deleting = true;
    next.generation += 1;
    next.state = "deleting";
    next.state_reason = "delete requested";
    next.updated_us = d_.clock.now_realtime_us();
    uint32_t job_id = 0;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "delete", next.id.str()));
          NM_RETURN_IF_ERROR(txn.put_vm(next));
          NM_RETURN_IF_ERROR(put_reply(txn, rid, "DeleteVm", fingerprint, {{"job_id", job_id}}));
          return append_state_event(txn, next, events);
        },
        events));
    *vm = next;
    if (observer_) observer_->on_vm_changed(*vm);
    publish(events);
    enqueue(make_delete_job(job_id, *vm));
    return job_id;
  }

  Result<VmRecord> get_vm(std::string_view ref) const override {
    NM_ASSIGN_OR_RETURN(const VmRecord* vm, find_vm_const(ref));
    return *vm;
  }

  std::vector<VmRecord> list_vms(std::string_view tenant) const override {
    std::vector<VmRecord> out;
    visit_vms(tenant, [&](const VmRecord& vm) { out.push_back(vm); });
    return out;
  }

  void visit_vms(std::string_view tenant,
                 const std::function<void(const VmRecord&)>& fn) const override {
    std::vector<const VmRecord*> sorted;
    sorted.reserve(vms_.size());
    for (const auto& [id, vm] : vms_) {
      if (tenant.empty() || vm.spec.tenant.str() == tenant) sorted.push_back(&vm);
    }
    std::sort(sorted.begin(), sorted.end(), [](const VmRecord* a, const VmRecord* b) {
      return std::tie(a->spec.tenant, a->spec.name) < std::tie(b->spec.tenant, b->spec.name);
    });
    for (const VmRecord* vm : sorted) fn(*vm);
  }

  // ---------------------------------------------------------------- images

  Result<uint32_t> import_image(std::string_view image, UniqueFd data, std::string_view sha256,
                                std::string_view kind_text, std::string_view tenant_text,
                                std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(image, "image"));
    const ScopedLogFields fields(
        {{log_field::kImage, ref.str()}, {log_field::kRequestId, request_id}});
    std::string digest_text(sha256);
    if (digest_text.rfind("sha256:", 0) != 0) digest_text = "sha256:" + digest_text;
    NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(digest_text, "sha256"));
    NM_ASSIGN_OR_RETURN(ImageKind kind,
                        parse_image_kind(kind_text.empty() ? "disk" : kind_text, "kind"));
    std::optional<TenantId> tenant;
    if (!tenant_text.empty()) {
      NM_ASSIGN_OR_RETURN(TenantId t, TenantId::parse(tenant_text, "tenant"));
      tenant = t;
    }
    if (!data.valid()) return invalid_argument("data: not a readable file descriptor");
    const std::string fingerprint = ref.str() + "\n" + digest.str() + "\n" +
                                    std::string(image_kind_name(kind)) + "\n" +
                                    (tenant ? tenant->str() : "");
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "ImportImage", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();

    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "import", ref.str()));
          return put_reply(txn, rid, "ImportImage", fingerprint, {{"job_id", job_id}});
        },
        events));

    auto job = std::make_unique<Job>();
    job->view = {job_id, "import", ref.str(), JobState::kQueued, 0.0};
    job->key = "image:" + ref.str();
    auto fd = std::make_shared<UniqueFd>(std::move(data));
    job->work = [this, ref, digest, kind, tenant, fd, job_id](JobContext& ctx) -> Status {
      auto r = d_.images.import(ref, fd->get(), digest, kind, tenant, byte_progress(job_id),
                                &ctx.cancelled);
      return r.status();
    };
    job->finish = [this, ref, digest](const Status& s, bool) {
      if (!s.is_ok()) return;
      std::vector<EventRecord> evs;
      const Status c = commit(
          [&](StateTxn& txn) {
            return append(txn, "ImageImported", digest.str(),
                          json{{"image", ref.str()}, {"digest", digest.str()}}, evs);
          },
          evs);
      if (!c.is_ok()) log_->error("recording import of '{}': {}", ref.str(), c.to_string());
      publish(evs);
    };
    job->revert = [] {};
    enqueue(std::move(job));
    return job_id;
  }

  std::vector<ImageEntry> list_images() const override {
    const auto users = image_users();
    std::vector<ImageEntry> tagged;
    std::vector<ImageEntry> untagged;
    for (const BlobInfo& blob : d_.images.list_blobs()) {
      auto u = users.find(blob.info.digest.str());
      const std::vector<std::string> names =
          u == users.end() ? std::vector<std::string>{} : u->second;
      if (blob.tags.empty()) untagged.push_back({blob.info, names});
      for (const ImageRef& tag : blob.tags) {
        ImageEntry e{blob.info, names};
        e.info.ref = tag;
        tagged.push_back(std::move(e));
      }
    }
    std::sort(tagged.begin(), tagged.end(),
              [](const ImageEntry& a, const ImageEntry& b) { return *a.info.ref < *b.info.ref; });
    tagged.insert(tagged.end(), untagged.begin(), untagged.end());
    return tagged;
  }

  Status remove_image(std::string_view image, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "RemoveImage", std::string(image)));
    if (replayed) return Status::ok();
    NM_ASSIGN_OR_RETURN(ImageInfo info, d_.images.resolve(image));
    const auto users = image_users();
    if (auto u = users.find(info.digest.str()); u != users.end()) {
      return conflict("image '" + std::string(image) + "' is in use by VMs " +
                      quoted_list(u->second));
    }
    for (const auto& d : leased_digests()) {
      if (d == info.digest.str()) {
        return conflict("image '" + std::string(image) + "' is being used by a VM being created");
      }
    }
    NM_RETURN_IF_ERROR(d_.images.remove(image));
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_RETURN_IF_ERROR(
              put_reply(txn, rid, "RemoveImage", std::string(image), json::object()));
          return append(txn, "ImageRemoved", info.digest.str(),
                        json{{"image", std::string(image)}, {"digest", info.digest.str()}}, events);
        },
        events));
    publish(events);
    return Status::ok();
  }

  Result<uint32_t> pull_image(std::string_view image, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(image, "image"));
    const ScopedLogFields fields(
        {{log_field::kImage, ref.str()}, {log_field::kRequestId, request_id}});
    if (opt_.image_sources.empty()) {
      return unavailable("image-source: no shared image store is configured on this node");
    }
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "PullImage", ref.str()));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "pull", ref.str()));
          return put_reply(txn, rid, "PullImage", ref.str(), {{"job_id", job_id}});
        },
        events));
    auto job = std::make_unique<Job>();
    job->view = {job_id, "pull", ref.str(), JobState::kQueued, 0.0};
    job->key = "image:" + ref.str();
    auto outcome = std::make_shared<std::optional<PullResult>>();
    job->work = [this, ref, job_id, outcome](JobContext& ctx) -> Status {
      NM_ASSIGN_OR_RETURN(
          *outcome, d_.images.pull(ref, opt_.image_sources, byte_progress(job_id), &ctx.cancelled));
      return Status::ok();
    };
    job->finish = [this, ref, holder = outcome](const Status& s, bool) {
      if (!s.is_ok() || !*holder) return;
      record_pulled(ref.str(), **holder);
    };
    job->revert = [] {};
    enqueue(std::move(job));
    return job_id;
  }

  Status pin_image(std::string_view image, bool pinned, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    const std::string fingerprint = std::string(image) + (pinned ? "\npin" : "\nunpin");
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "PinImage", fingerprint));
    if (replayed) return Status::ok();
    NM_ASSIGN_OR_RETURN(ImageInfo info, d_.images.resolve(image));
    NM_RETURN_IF_ERROR(d_.images.set_pinned(info.digest, pinned));
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_RETURN_IF_ERROR(put_reply(txn, rid, "PinImage", fingerprint, json::object()));
          return append(
              txn, "ImagePinned", info.digest.str(),
              json{
                  {"image", std::string(image)}, {"digest", info.digest.str()}, {"pinned", pinned}},
              events);
        },
        events));
    publish(events);
    return Status::ok();
  }

  Result<GcPlan> collect_images(std::optional<std::chrono::seconds> min_age,
                                bool dry_run) override {
    const auto age = min_age.value_or(opt_.image_gc_min_age);
    if (age.count() < 0) return invalid_argument("min_age: must not be negative");
    // Ages beyond a century mean "never": keeps the microsecond product far from overflow.
    constexpr int64_t kCenturySeconds = int64_t{100} * 366 * 24 * 3600;
    if (age.count() > kCenturySeconds) return GcPlan{};
    std::unordered_set<std::string> in_use;
    for (const auto& [digest, users] : image_users()) in_use.insert(digest);
    for (const auto& d : leased_digests()) in_use.insert(d);
    const GcPlan plan = plan_image_gc(d_.images.list_blobs(), in_use, d_.clock.now_realtime_us(),
                                      static_cast<uint64_t>(age.count()) * 1000000);
    if (dry_run) return plan;
    GcPlan done;
    for (const GcCandidate& c : plan.remove) {
      if (Status s = d_.images.remove_blob(c.digest); !s.is_ok()) {
        log_->warn("image gc: removing '{}': {}", c.digest.str(), s.to_string());
        continue;
      }
      json tags = json::array();
      for (const auto& t : c.tags) tags.push_back(t.str());
      record_image_event("ImageCollected", c.digest.str(),
                         json{{"digest", c.digest.str()}, {"tags", tags}, {"size", c.size}});
      log_->info("image gc: removed '{}' ({} bytes, tags {})", c.digest.str(), c.size, tags.dump());
      done.bytes += c.size;
      done.remove.push_back(c);
    }
    return done;
  }

  Result<uint32_t> verify_images(const std::vector<std::string>& images,
                                 std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    std::string fingerprint;
    for (const auto& image : images) fingerprint += image + "\n";
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "VerifyImages", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    std::vector<Digest> digests;
    for (const auto& image : images) {
      NM_ASSIGN_OR_RETURN(ImageInfo info, d_.images.resolve(image));
      digests.push_back(info.digest);
    }
    if (images.empty()) {
      for (const BlobInfo& b : d_.images.list_blobs()) digests.push_back(b.info.digest);
    }
    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "verify", "images"));
          return put_reply(txn, rid, "VerifyImages", fingerprint, {{"job_id", job_id}});
        },
        events));
    auto job = std::make_unique<Job>();
    job->view = {job_id, "verify", "images", JobState::kQueued, 0.0};
    job->key = "images-verify";
    auto results = std::make_shared<std::vector<VerifyResult>>();
    job->work = [this, digests, job_id, results](JobContext& ctx) -> Status {
      std::vector<uint64_t> sizes;
      uint64_t total = 0;
      for (const auto& d : digests) {
        auto info = d_.images.resolve(d.str());
        sizes.push_back(info.is_ok() ? info->size : 0);
        total += sizes.back();
      }
      uint64_t before = 0;
      const ProgressFn progress = byte_progress(job_id);
      for (size_t i = 0; i < digests.size(); ++i) {
        auto r = d_.images.verify(
            digests[i], [&](uint64_t done, uint64_t) { progress(before + done, total); },
            &ctx.cancelled);
        if (ctx.cancelled) return cancelled_status();
        if (!r.is_ok()) {
          if (r.status().code() == Code::kNotFound) continue;  // removed meanwhile
          return r.status();
        }
        before += sizes[i];
        results->push_back(std::move(r).value());
      }
      std::string bad;
      for (const auto& r : *results) {
        if (!r.ok) bad += (bad.empty() ? "" : "; ") + r.digest.str() + ": " + r.problem;
      }
      if (!bad.empty()) return internal_error("corrupt images: " + bad);
      return Status::ok();
    };
    job->finish = [this, results, job_id](const Status&, bool) {
      size_t corrupt = 0;
      for (const auto& r : *results) {
        if (r.ok) continue;
        ++corrupt;
        log_->error("image '{}' is corrupt: {}", r.digest.str(), r.problem);
        record_image_event("ImageCorrupt", r.digest.str(),
                           json{{"digest", r.digest.str()}, {"problem", r.problem}});
      }
      record_image_event(
          "ImageVerified", "images",
          json{{"job_id", job_id}, {"checked", results->size()}, {"corrupt", corrupt}});
    };
    job->revert = [] {};
    enqueue(std::move(job));
    return job_id;
  }

  // ---------------------------------------------------------------- networks

  Result<uint32_t> create_network(std::string_view spec_json,
                                  std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_ASSIGN_OR_RETURN(network::NetworkSpec spec, network::parse_network_spec(spec_json));
    const ScopedLogFields fields({{log_field::kNetwork, spec.name.str()},
                                  {log_field::kTenant, spec.tenant.str()},
                                  {log_field::kRequestId, request_id}});
    const std::string fingerprint = network::network_spec_to_json(spec);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "CreateNetwork", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    if (opt_.underlay_interface.empty() && !spec.peers.empty()) {
      return invalid_argument(
          "spec.peers: this node has no underlay interface (--underlay-interface), so its "
          "networks are host-local and cannot have peers");
    }
    std::vector<network::NetworkSpec> existing;
    existing.reserve(networks_.size());
    for (const auto& [_, n] : networks_) existing.push_back(n.spec);
    NM_RETURN_IF_ERROR(network::check_against_existing(spec, existing));

    NetworkRecord rec;
    rec.spec = std::move(spec);
    rec.state = "creating";
    rec.state_reason = "create requested";
    rec.created_us = rec.updated_us = d_.clock.now_realtime_us();
    const std::string name = rec.spec.name.str();
    uint32_t job_id = 0;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "network-create", name));
          NM_RETURN_IF_ERROR(txn.put_network(rec));
          NM_RETURN_IF_ERROR(put_reply(txn, rid, "CreateNetwork", fingerprint,
                                       {{"network", name}, {"job_id", job_id}}));
          return append_network_event(txn, rec, events);
        },
        events));
    networks_.emplace(name, rec);
    ++net_epoch_;
    publish(events);
    log_->info("network '{}' of tenant '{}' (vni {}, {}) created, job {}", name,
               rec.spec.tenant.str(), rec.spec.vni.value(), rec.spec.subnet.str(), job_id);
    enqueue(make_network_create_job(job_id, rec));
    return job_id;
  }

  Result<uint32_t> delete_network(std::string_view name, std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    NM_RETURN_IF_ERROR(NetworkName::parse(name, "name").status());
    const ScopedLogFields fields(
        {{log_field::kNetwork, name}, {log_field::kRequestId, request_id}});
    const std::string fingerprint(name);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "DeleteNetwork", fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    auto it = networks_.find(std::string(name));
    if (it == networks_.end()) {
      return not_found("network '" + std::string(name) + "' does not exist");
    }
    const auto users = network_ports(name);
    if (!users.empty()) {
      std::string list;
      for (const auto& p : users) {
        if (!list.empty()) list += ", ";
        list += "'" + p.hostname + "'";
      }
      return conflict("network '" + std::string(name) + "' is used by VMs " + list +
                      "; delete them first");
    }
    std::vector<EventRecord> events;
    if (it->second.deleting) {
      if (auto job = find_job(network_key(it->first), "network-delete")) {
        NM_RETURN_IF_ERROR(commit(
            [&](StateTxn& txn) {
              return put_reply(txn, rid, "DeleteNetwork", fingerprint, {{"job_id", *job}});
            },
            events));
        return *job;
      }
    }
    NetworkRecord next = it->second;
    next.deleting = true;
    next.state = "deleting";
    next.state_reason = "delete requested";
    next.updated_us = d_.clock.now_realtime_us();
    uint32_t job_id = 0;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, "network-delete", it->first));
          NM_RETURN_IF_ERROR(txn.put_network(next));
          NM_RETURN_IF_ERROR(
              put_reply(txn, rid, "DeleteNetwork", fingerprint, {{"job_id", job_id}}));
          return append_network_event(txn, next, events);
        },
        events));
    it->second = next;
    ++net_epoch_;
    publish(events);
    enqueue(make_network_delete_job(job_id, next));
    return job_id;
  }

  Result<NetworkRecord> get_network(std::string_view name) const override {
    NM_RETURN_IF_ERROR(NetworkName::parse(name, "name").status());
    auto it = networks_.find(std::string(name));
    if (it == networks_.end()) {
      return not_found("network '" + std::string(name) + "' does not exist");
    }
    return it->second;
  }

  std::vector<NetworkRecord> list_networks(std::string_view tenant) const override {
    std::vector<NetworkRecord> out;
    for (const auto& [_, n] : networks_) {
      if (tenant.empty() || n.spec.tenant.str() == tenant) out.push_back(n);
    }
    return out;
  }

  std::vector<PortRecord> vm_ports(const VmId& id) const override {
    auto it = ports_.find(id.str());
    return it == ports_.end() ? std::vector<PortRecord>{} : it->second;
  }

  std::vector<PortRecord> network_ports(std::string_view network) const override {
    std::vector<PortRecord> out;
    for (const auto& [_, list] : ports_) {
      for (const auto& p : list) {
        if (p.network.str() == network) out.push_back(p);
      }
    }
    return out;
  }

  // ---------------------------------------------------------------- events and jobs

  Result<std::vector<EventRecord>> events_since(uint64_t since, uint32_t max) override {
    return d_.store.events_since(since, max);
  }
  uint64_t last_event_seq() const override { return last_seq_; }
  uint64_t durable_event_seq() const override {
    return d_.store.durable_seq() >= d_.store.written_seq() ? last_seq_ : durable_last_seq_;
  }

  std::vector<JobView> list_jobs() const override {
    std::vector<JobView> out;
    for (const auto& [id, job] : jobs_) out.push_back(job->view);
    return out;
  }
  std::optional<JobView> get_job(uint32_t id) const override {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return std::nullopt;
    return it->second->view;
  }

  Status cancel_job(uint32_t id) override {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return not_found("job " + std::to_string(id) + " does not exist");
    Job& job = *it->second;
    if (job.view.state == JobState::kQueued) {
      auto& q = queues_[job.key];
      q.erase(std::remove(q.begin(), q.end(), id), q.end());
      if (q.empty()) queues_.erase(job.key);
      job.ctx->cancelled = true;
      if (job.revert) job.revert();
      (void)remove_job(id, {"cancelled", Status::ok()});
      return Status::ok();
    }
    if (!job.cancellable_while_running) {
      return conflict("job " + std::to_string(id) + " (" + job.view.kind +
                      ") cannot be cancelled once it runs");
    }
    job.ctx->cancelled = true;
    job.ctx->notify();
    return Status::ok();
  }

  size_t active_jobs() const override { return jobs_.size(); }

  void record_network_repair(const std::string& object, const std::string& what) override {
    record_event_of_repairs(
        {network::Repair{.object = object, .what = what, .network = {}, .failed = false}});
  }

  // ---------------------------------------------------------------- health and capacity

  HealthSnapshot health() const override {
    HealthSnapshot h = health_.snapshot();
    h.heartbeat_seq = heartbeat_seq_;
    return h;
  }

  std::vector<ResourceCapacity> capacity() const override {
    Usage all;
    for (const auto& [_, vm] : vms_) all += usage_of(vm);
    const HostTotals host = host_totals();
    auto out = compute_capacity(host, opt_.capacity, all);
    if (host.disk_gib == 0) {  // no instances filesystem to measure: disk is not accounted
      std::erase_if(out, [](const ResourceCapacity& r) { return r.resource == "disk_gib"; });
    }
    return out;
  }

  Status set_maintenance(bool enabled, std::string_view reason,
                         std::string_view request_id) override {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    if (reason.size() > kMaxReason) {
      return invalid_argument("reason: at most " + std::to_string(kMaxReason) + " bytes");
    }
    for (const char c : reason) {
      if (static_cast<unsigned char>(c) < 0x20) {
        return invalid_argument("reason: control characters are not allowed");
      }
    }
    const std::string fingerprint =
        std::string(enabled ? "on" : "off") + "\n" + std::string(reason);
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, "SetMaintenance", fingerprint));
    if (replayed) return Status::ok();
    const json value = {{"enabled", enabled},
                        {"reason", enabled ? std::string(reason) : std::string()},
                        {"since_us", d_.clock.now_realtime_us()}};
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_RETURN_IF_ERROR(txn.put_setting(kMaintenanceKey, value.dump()));
          return put_reply(txn, rid, "SetMaintenance", fingerprint, json::object());
        },
        events));
    if (enabled != health_.maintenance()) {
      log_->warn("maintenance {}{}", enabled ? "on: new VMs are refused" : "off",
                 enabled && !reason.empty() ? " (" + std::string(reason) + ")" : "");
    }
    health_.set_maintenance(enabled, std::string(reason));
    health_dirty();
    return Status::ok();
  }

  void set_host_check(const std::string& name, HealthState state, std::string reason) override {
    const auto before = health_.check(name);
    if (!before || before->state != state) {
      if (state == HealthState::kOk) {
        log_->info("health: {} ok: {}", name, reason);
      } else {
        log_->warn("health: {} {}: {}", name, health_state_name(state), reason);
      }
    }
    health_.set_host(name, state, std::move(reason), d_.clock.now_realtime_us());
    health_dirty();
  }

  void probe_health() override {
    // state-db: one write transaction, the path every request takes.
    const Status db = d_.store.transact([&](StateTxn& txn) {
      return txn.put_setting("health_probe", std::to_string(d_.clock.now_realtime_us()));
    });
    if (db.is_ok()) schedule_sync();
    set_host_check("state-db", db.is_ok() ? HealthState::kOk : HealthState::kFailed,
                   db.is_ok() ? "writable" : db.message());
    if (probe_in_flight_) return;
    probe_in_flight_ = true;
    d_.workers.submit([this, alive = alive_, dir = opt_.images_dir, psi = opt_.psi_path,
                       disk_t = opt_.disk_thresholds, psi_t = opt_.psi_thresholds] {
      std::optional<Verdict> disk;
      std::optional<Verdict> memory;
      if (!dir.empty()) disk = judge_disk(probe_dir(dir), disk_t);
      if (!psi.empty()) memory = judge_psi(read_psi(psi), psi_t);
      d_.loop.post([this, alive, disk, memory] {
        if (!*alive) return;
        probe_in_flight_ = false;
        if (disk) set_host_check("image-disk", disk->state, disk->reason);
        if (memory) set_host_check("memory-pressure", memory->state, memory->reason);
      });
    });
  }

  Heartbeat heartbeat() override {
    Heartbeat hb{.seq = ++heartbeat_seq_,
                 .timestamp_us = d_.clock.now_realtime_us(),
                 .state = health_.state(),
                 .maintenance = health_.maintenance(),
                 .summary = {}};
    uint64_t running = 0;
    for (const auto& [_, vm] : vms_) running += static_cast<uint64_t>(vm.state == "running");
    hb.summary["vms"] = vms_.size();
    hb.summary["vms_running"] = running;
    for (const auto& r : capacity()) {
      hb.summary[r.resource + "_capacity"] = r.capacity;
      hb.summary[r.resource + "_allocated"] = r.allocated;
    }
    if (observer_) observer_->on_heartbeat(hb);
    return hb;
  }

  bool watchdog_healthy() const override {
    const auto lv = health_.check("libvirt");
    return !lv || lv->state != HealthState::kFailed;
  }

  // ---------------------------------------------------------------- reconciliation

  void on_domain_event(const DomainEvent& ev) override {
    log_->debug("domain event {} kind {} detail {}", ev.uuid, static_cast<int>(ev.kind), ev.detail);
    if (startup_reconcile_pending_) {  // the start-up reconcile reads every domain
      events_while_pending_ = true;
      return;
    }
    auto it = vms_.find(ev.uuid);
    if (it == vms_.end()) return;
    for (auto& [id, job] : jobs_) {
      if (job->key == ev.uuid) job->ctx->notify();
    }
    // A guest powering itself off: libvirt says so (SHUTDOWN) before it ends QEMU, whose exit the
    // adapter then reports; remember it to tell a power-off from a crash.
    if (ev.kind == DomainEventKind::kShutdown) guest_shutdown_.insert(ev.uuid);
    if (ev.kind == DomainEventKind::kStarted) guest_shutdown_.erase(ev.uuid);
    if (queues_.count(ev.uuid)) return;  // a job owns this VM; observe() runs after it
    if (ev.kind == DomainEventKind::kEmulatorExited) {
      // Seen before libvirt knows (it still says running): act on it now, without asking.
      VmRecord& vm = it->second;
      if (vm.power != PowerIntent::kRunning || vm.deleting || vm.state == "error" ||
          vm.state == "failed" || restart_pending_.count(ev.uuid)) {
        return;
      }
      DomainInfo gone;
      gone.uuid = ev.uuid;
      gone.state = DomainState::kShutOff;
      gone.cause = guest_shutdown_.erase(ev.uuid) != 0 ? DomainCause::kGuestShutdown
                                                       : DomainCause::kEmulatorGone;
      if (!vm.spec.autostart) return observe(vm.id);  // libvirt's own event settles it
      return on_unexpected_down(vm, gone);
    }
    observe(it->second.id);
  }

  void audit() override {
    audit_networks();
    if (audit_in_flight_) {
      // It may have listed before what asked for this one (a reconnect): run once more after it.
      audit_again_ = true;
      return;
    }
    audit_in_flight_ = true;
    const uint64_t taken_at = epoch_counter_;
    const bool with_host = startup_reconcile_pending_ && host_from_hypervisor();
    d_.workers.submit([this, taken_at, with_host, alive = alive_] {
      auto hv = read_hypervisor(with_host);
      d_.loop.post([this, taken_at, alive, hv = std::move(hv)] {
        if (!*alive) return;
        audit_in_flight_ = false;
        if (std::exchange(audit_again_, false))
          d_.loop.post([this, alive] {
            if (*alive) audit();
          });
        if (!hv.is_ok()) {
          log_->warn("audit: listing libvirt state failed: {}; retrying at the next audit",
                     hv.status().to_string());
          if (startup_reconcile_pending_) startup_read_failed(hv.status());
          return;
        }
        if (startup_reconcile_pending_) return finish_start(*hv, taken_at);
        reconcile_all(hv->domains, hv->overlays, taken_at);
      });
    });
  }

 private:
  // Reads one VM's domain on a worker and converges it, unless a job touched the VM meanwhile.
  void observe(const VmId& id) {
    const uint64_t taken_at = epoch_counter_;
    d_.workers.submit([this, id, taken_at, alive = alive_] {
      auto dom = d_.hypervisor.get_domain(id);
      d_.loop.post([this, id, taken_at, alive, dom = std::move(dom)] {
        if (!*alive) return;
        if (!dom.is_ok()) {
          log_->warn("reading domain {}: {}; the next audit retries", id.str(),
                     dom.status().to_string());
          return;
        }
        auto vm = vms_.find(id.str());
        if (vm == vms_.end() || queues_.count(id.str()) || changed_since(id.str(), taken_at)) {
          return;
        }
        converge(vm->second, dom->has_value() ? &**dom : nullptr);
      });
    });
  }

  // Marks `key` as changed by a job now: snapshots of libvirt taken before are stale for it.
  void touch(const std::string& key) { epoch_[key] = ++epoch_counter_; }
  bool changed_since(const std::string& key, uint64_t taken_at) const {
    auto it = epoch_.find(key);
    return it != epoch_.end() && it->second > taken_at;
  }

  // ---------------------------------------------------------------- helpers: health

  static constexpr size_t kMaxReason = 256;
  static constexpr const char* kMaintenanceKey = "maintenance";

  // Coalesces every health change made in this loop iteration into one HealthChanged.
  void health_dirty() {
    if (health_flush_posted_) return;
    health_flush_posted_ = true;
    d_.loop.post([this, alive = alive_] {
      if (!*alive) return;
      health_flush_posted_ = false;
      flush_health();
    });
  }

  static json health_check_json(const HealthCheck& c) {
    return {{"name", c.name},
            {"state", health_state_name(c.state)},
            {"reason", c.reason},
            {"vm_id", c.vm_id},
            {"changed_us", c.changed_us}};
  }

  void flush_health() {
    auto taken = health_.take_change();
    if (!taken) return;
    auto change = std::make_shared<HealthChange>(std::move(*taken));
    json changed = json::array();
    for (const auto& c : change->changed) changed.push_back(health_check_json(c));
    auto payload =
        std::make_shared<json>(json{{"state", health_state_name(change->state)},
                                    {"previous_state", health_state_name(change->previous)},
                                    {"maintenance", change->maintenance},
                                    {"changed", std::move(changed)},
                                    {"vms_affected", change->vms_affected}});
    if (change->state != change->previous) {
      log_->warn("node health {} -> {}", health_state_name(change->previous),
                 health_state_name(change->state));
    }
    write(
        [this, payload](StateTxn& txn, std::vector<EventRecord>& events) {
          return append(txn, "HealthChanged", "node", *payload, events);
        },
        [this, change, payload](const Status& s, const std::vector<EventRecord>& events) {
          EventRecord ev;
          if (s.is_ok() && !events.empty()) {
            ev = events.front();
          } else {
            log_->error("recording HealthChanged: {}; sending it unrecorded (seq 0)",
                        s.to_string());
            ev = EventRecord{.seq = 0,
                             .ts_us = d_.clock.now_realtime_us(),
                             .kind = "HealthChanged",
                             .object_id = "node",
                             .payload_json = payload->dump()};
          }
          if (observer_) observer_->on_health_changed(*change, ev);
          publish(events);
        });
  }

  void set_vm_health(const VmRecord& vm, HealthState state, std::string reason) {
    health_.set_vm(vm.id.str(), state, std::move(reason), d_.clock.now_realtime_us());
    health_dirty();
  }

  // Loads what start() needs for health: the persisted maintenance flag.
  Status load_health() {
    NM_ASSIGN_OR_RETURN(auto m, d_.store.get_setting(kMaintenanceKey));
    if (!m) return Status::ok();
    const json v = json::parse(*m, nullptr, false);
    if (v.is_discarded() || !v.is_object()) {
      return internal_error("state database: setting 'maintenance' is not a JSON object");
    }
    const bool on = v.value("enabled", false);
    health_.set_maintenance(on, v.value("reason", std::string()));
    if (on) log_->warn("node is in maintenance: new VMs are refused");
    health_dirty();
    return Status::ok();
  }

  HostTotals host_totals() const {
    HostTotals h{.vcpus = opt_.host_vcpus,
                 .memory_mib = opt_.host_memory_mib,
                 .disk_gib = 0,
                 .disk_reserved_gib = ceil_gib(opt_.disk_reserve_bytes)};
    if (!opt_.instances_dir.empty()) {
      if (auto space = filesystem_space(opt_.instances_dir); space.is_ok()) {
        h.disk_gib = space->total_bytes / kGiB;
      }
    }
    return h;
  }

  // The disk a VM is counted for: its disk_gib, or its image's virtual size (GiB, rounded up).
  uint64_t disk_gib_of(const Digest& image, uint32_t disk_gib) const {
    if (disk_gib != 0) return disk_gib;
    auto it = image_gib_.find(image.str());
    if (it != image_gib_.end()) return it->second;
    auto info = d_.images.resolve(image.str());
    if (!info.is_ok()) return 0;  // not pulled yet: counted once it is
    const uint64_t gib = ceil_gib(info->virtual_size);
    image_gib_.emplace(image.str(), gib);
    return gib;
  }

  Usage usage_of(const VmRecord& vm) const {
    return Usage{.vms = 1,
                 .vcpus = vm.spec.vcpus,
                 .memory_mib = vm.spec.memory_mib,
                 .disk_gib = disk_gib_of(vm.image_digest, vm.spec.disk_gib)};
  }

  // CreateVm admission: maintenance, then node capacity, then the tenant's quota.
  Status admit_vm(const VmSpec& spec, const std::optional<ImageInfo>& disk) const {
    if (health_.maintenance()) {
      const std::string why = health_.maintenance_reason();
      return unavailable("the node is in maintenance" + (why.empty() ? "" : " (" + why + ")") +
                         ": new VMs are refused; place the VM on another node");
    }
    const Usage want{.vms = 1,
                     .vcpus = spec.vcpus,
                     .memory_mib = spec.memory_mib,
                     .disk_gib = spec.disk_gib != 0 ? spec.disk_gib
                                 : disk             ? ceil_gib(disk->virtual_size)
                                                    : 0};
    Usage tenant;
    for (const auto& [_, vm] : vms_) {
      if (vm.spec.tenant == spec.tenant) tenant += usage_of(vm);
    }
    auto quota = opt_.tenant_quotas.find(spec.tenant.str());
    return admit(want, capacity(), spec.tenant.str(),
                 quota == opt_.tenant_quotas.end() ? nullptr : &quota->second, tenant);
  }

  CrashPolicy crash_policy_for(const VmSpec& spec) const {
    CrashPolicy p = opt_.crash_policy;
    if (spec.crash_policy) {
      const auto& o = *spec.crash_policy;
      if (o.max_restarts) p.max_restarts = *o.max_restarts;
      if (o.window_s) p.window = std::chrono::seconds(*o.window_s);
      if (o.backoff_ms) p.backoff = std::chrono::milliseconds(*o.backoff_ms);
    }
    return p;
  }

  static std::string describe_down(const DomainInfo& d) {
    switch (d.cause) {
      case DomainCause::kEmulatorGone:
        return "QEMU process gone";
      case DomainCause::kGuestCrashed:
        return "guest crashed";
      case DomainCause::kGuestShutdown:
        return "guest powered itself off";
      case DomainCause::kDestroyed:
        return "forced off outside nodemanager";
      case DomainCause::kIoError:
      case DomainCause::kOther:
        break;
    }
    return d.state == DomainState::kCrashed ? "guest crashed" : "stopped outside nodemanager";
  }

  // A VM that should run went down without a request: restart it by the crash policy (after a
  // backoff), or, once the budget is spent, leave it "failed" and report it.
  void on_unexpected_down(const VmRecord& vm, const DomainInfo& d) {
    const std::string id = vm.id.str();
    touch(id);  // libvirt snapshots taken before this are stale for the VM
    const CrashPolicy policy = crash_policy_for(vm.spec);
    const auto decision = crashes_[id].record(policy, d_.clock.now_monotonic());
    const std::string what = describe_down(d);
    const bool crashed = d.cause == DomainCause::kEmulatorGone ||
                         d.cause == DomainCause::kGuestCrashed || d.state == DomainState::kCrashed;
    if (!decision.restart) {
      const std::string reason =
          what + "; " + std::to_string(decision.crashes) + " unexpected stops within " +
          std::to_string(policy.window.count()) + " s, the crash policy allows " +
          std::to_string(policy.max_restarts) + " restarts: not restarting";
      log_->error("vm '{}': {}", vm.spec.name.str(), reason);
      record_state(vm, "failed", reason);
      set_vm_health(vm, HealthState::kFailed, reason);
      return;
    }
    const std::string reason = what + "; restart " + std::to_string(decision.attempt) + " of " +
                               std::to_string(policy.max_restarts) + " in " +
                               std::to_string(decision.delay.count()) + " ms";
    log_->warn("vm '{}': {}", vm.spec.name.str(), reason);
    record_state(vm, crashed ? "crashed" : "stopped", reason);
    set_vm_health(vm, HealthState::kDegraded, reason);
    restart_pending_.insert(id);
    schedule_crash_restart(id, vm.generation, decision.attempt, decision.delay);
  }

  // The crash policy's restart of VM `id`, due after `delay`: dropped when the VM is gone, no
  // longer desired running or was changed by a client meanwhile (generation); postponed while
  // another job holds the VM (a reboot asked during the backoff), so it is never lost.
  void schedule_crash_restart(const std::string& id, uint64_t gen, uint32_t attempt,
                              std::chrono::milliseconds delay) {
    d_.loop.post_after(delay, [this, alive = alive_, id, gen, attempt] {
      if (!*alive) return;
      auto it = vms_.find(id);
      if (it == vms_.end() || it->second.deleting || it->second.power != PowerIntent::kRunning ||
          it->second.generation != gen) {
        restart_pending_.erase(id);
        return;
      }
      if (queues_.count(id)) {
        schedule_crash_restart(id, gen, attempt, std::chrono::milliseconds(200));
        return;
      }
      restart_pending_.erase(id);
      enqueue(make_start_job(
          job_id_for(id), it->second,
          "restarted after an unexpected stop (restart " + std::to_string(attempt) + ")",
          /*after_crash=*/true));
    });
  }

  // A client asked for a power change: the crash budget starts afresh and a VM check is cleared.
  void acknowledge_vm_health(const VmRecord& vm) {
    crashes_.erase(vm.id.str());
    set_vm_health(vm, HealthState::kOk, "power change requested");
  }

  // ---------------------------------------------------------------- helpers: lookups

  Result<VmRecord*> find_vm(std::string_view ref) {
    NM_ASSIGN_OR_RETURN(const VmRecord* vm, find_vm_const(ref));
    return const_cast<VmRecord*>(vm);
  }

  Result<const VmRecord*> find_vm_const(std::string_view ref) const {
    auto it = vms_.find(std::string(ref));
    if (it != vms_.end()) return &it->second;
    auto n = name_index_.find(std::string(ref));
    if (n != name_index_.end()) return &vms_.at(n->second);
    if (ref.empty()) return invalid_argument("vm: must be a VM id or name");
    return not_found("vm '" + std::string(ref) + "' does not exist");
  }

  std::optional<uint32_t> find_job(const std::string& key, const std::string& kind) const {
    for (const auto& [id, job] : jobs_) {
      if (job->key == key && job->view.kind == kind) return id;
    }
    return std::nullopt;
  }

  // Digest -> names of the VMs whose disk, kernel or initrd it is, from the database's records.
  // A VM whose image is still being pulled counts for the blob its tag names locally.
  std::map<std::string, std::vector<std::string>> image_users() const {
    std::map<std::string, std::vector<std::string>> users;
    auto add = [&](const Digest& d, const std::string& ref, const VmRecord& vm) {
      std::string digest = d.str();
      if (is_pending(d)) {
        auto local = d_.images.resolve(ref);
        if (!local.is_ok()) return;
        digest = local->digest.str();
      }
      auto& names = users[digest];
      if (names.empty() || names.back() != vm.spec.name.str()) names.push_back(vm.spec.name.str());
    };
    for (const auto& [id, vm] : vms_) {
      add(vm.image_digest, vm.spec.image, vm);
      if (vm.kernel_digest) add(*vm.kernel_digest, vm.spec.kernel_image.value_or(""), vm);
      if (vm.initrd_digest) add(*vm.initrd_digest, vm.spec.initrd_image.value_or(""), vm);
    }
    return users;
  }

  // Digests that jobs on workers hold right now (a create between its pull and its record).
  std::vector<std::string> leased_digests() const {
    std::lock_guard lock(lease_mu_);
    std::vector<std::string> out;
    for (const auto& [d, n] : leases_) out.push_back(d);
    return out;
  }
  struct Lease {
    NodeServiceImpl* self = nullptr;
    std::string digest;
    Lease(NodeServiceImpl* s, std::string d) : self(s), digest(std::move(d)) {
      std::lock_guard lock(self->lease_mu_);
      ++self->leases_[digest];
    }
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() {
      std::lock_guard lock(self->lease_mu_);
      if (--self->leases_[digest] == 0) self->leases_.erase(digest);
    }
  };

  static std::string quoted_list(const std::vector<std::string>& names) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "'" : ", '") + n + "'";
    return list;
  }

  // A ProgressFn for worker threads that posts byte progress of job `id` to the loop, at most
  // about once per percent.
  ProgressFn byte_progress(uint32_t id) {
    auto last = std::make_shared<uint64_t>(0);
    return [this, id, last, alive = alive_](uint64_t done, uint64_t total) {
      // Unknown totals (an import from a pipe): every 16 MiB.
      const uint64_t step = total != 0 ? total / 100 + 1 : uint64_t{16} << 20;
      if (done < total && done - std::min(done, *last) < step) return;
      *last = done;
      d_.loop.post([this, id, done, total, alive] {
        if (*alive) set_bytes(id, done, total);
      });
    };
  }

  void record_pulled(const std::string& ref, const PullResult& r) {
    record_image_event("ImagePulled", r.info.digest.str(),
                       json{{"image", ref},
                            {"digest", r.info.digest.str()},
                            {"source", r.source},
                            {"transferred", r.transferred},
                            {"bytes", r.info.size}});
  }

  void record_image_event(const std::string& kind, const std::string& object, const json& payload) {
    std::vector<EventRecord> evs;
    const Status c =
        commit([&](StateTxn& txn) { return append(txn, kind, object, payload, evs); }, evs);
    if (!c.is_ok()) log_->error("recording {} of '{}': {}", kind, object, c.to_string());
    publish(evs);
  }

  // resolve_image(), or nullopt when `ref` is a name:tag that is not cached but may be pulled
  // from the configured sources.
  Result<std::optional<ImageInfo>> resolve_or_pending(const std::string& ref,
                                                      const TenantId& tenant, ImageKind kind,
                                                      const std::string& field) const {
    auto info = resolve_image(ref, tenant, kind, field);
    if (info.is_ok()) return std::optional<ImageInfo>(std::move(info).value());
    if (info.status().code() != Code::kNotFound || opt_.image_sources.empty() ||
        ref.starts_with("sha256:") || d_.images.resolve(ref).status().code() != Code::kNotFound) {
      return info.status();
    }
    return {std::nullopt};
  }

  static Status check_disk_size(const VmSpec& spec, const ImageInfo& disk) {
    if (spec.disk_gib != 0 && spec.disk_gib * kGiB < disk.virtual_size) {
      return invalid_argument("spec.disk_gib: must be at least the image's virtual size (" +
                              std::to_string(ceil_gib(disk.virtual_size)) + " GiB)");
    }
    return Status::ok();
  }

  // VM disks are thin overlays that grow into the instances filesystem: a new one is admitted
  // while that filesystem has more than the configured reserve free.
  Status admit_disk() const {
    if (opt_.disk_reserve_bytes == 0 || opt_.instances_dir.empty()) return Status::ok();
    NM_ASSIGN_OR_RETURN(FsSpace space, filesystem_space(opt_.instances_dir));
    if (space.available_bytes < opt_.disk_reserve_bytes) {
      return {Code::kInsufficientCapacity,
              "disk: the instances filesystem has " + std::to_string(space.available_bytes >> 20) +
                  " MiB free, less than the reserve of " +
                  std::to_string(opt_.disk_reserve_bytes >> 20) + " MiB (disk-reserve-mib)"};
    }
    return Status::ok();
  }

  Result<ImageInfo> resolve_image(const std::string& ref, const TenantId& tenant, ImageKind kind,
                                  const std::string& field) const {
    auto info = d_.images.resolve(ref);
    // Another tenant's private image answers exactly like a missing one: no existence leak.
    if (!info.is_ok() || (info->tenant && *info->tenant != tenant)) {
      if (info.is_ok() || info.status().code() == Code::kNotFound) {
        return not_found(field + ": image '" + ref + "' does not exist for tenant '" +
                         tenant.str() + "'");
      }
      return info.status().with_context(field);
    }
    if (info->kind != kind) {
      return invalid_argument(field + ": image '" + ref + "' is a " +
                              std::string(image_kind_name(info->kind)) + " image, not a " +
                              std::string(image_kind_name(kind)) + " image");
    }
    return info;
  }

  // ---------------------------------------------------------------- helpers: durability

  static Result<std::optional<RequestId>> parse_request_id(std::string_view text) {
    if (text.empty()) return std::optional<RequestId>();
    NM_ASSIGN_OR_RETURN(RequestId id, RequestId::parse(text, "request_id"));
    return std::optional<RequestId>(std::move(id));
  }

  // The first reply to `rid`, when it was seen before; Conflict when it was used differently.
  Result<std::optional<json>> replay(const std::optional<RequestId>& rid, const std::string& method,
                                     const std::string& fingerprint) {
    if (!rid) return std::optional<json>();
    NM_ASSIGN_OR_RETURN(auto rec, d_.store.get_request(*rid));
    if (!rec) return std::optional<json>();
    if (rec->method != method || rec->fingerprint != fingerprint) {
      return conflict("request_id: '" + rid->str() + "' was already used for a different " +
                      (rec->method == method ? "set of arguments" : "call (" + rec->method + ")"));
    }
    return std::optional<json>(json::parse(rec->reply_json));
  }

  Status put_reply(StateTxn& txn, const std::optional<RequestId>& rid, const std::string& method,
                   const std::string& fingerprint, const json& reply) {
    if (!rid) return Status::ok();
    RequestRecord r;
    r.id = *rid;
    r.method = method;
    r.fingerprint = fingerprint;
    r.reply_json = reply.dump();
    r.created_us = d_.clock.now_realtime_us();
    return txn.put_request(r);
  }

  Result<uint32_t> allocate_job(StateTxn& txn) {
    NM_ASSIGN_OR_RETURN(uint64_t id, txn.allocate_job_id());
    return static_cast<uint32_t>(id);
  }

  // A job handed to a client: recorded until its JobRemoved, so that after a crash the
  // reconciler can finish the work under the same id (see start()).
  Result<uint32_t> client_job(StateTxn& txn, const std::string& kind, const std::string& object) {
    NM_ASSIGN_OR_RETURN(uint32_t id, allocate_job(txn));
    NM_RETURN_IF_ERROR(txn.put_job({id, kind, object, d_.clock.now_realtime_us()}));
    return id;
  }

  // The id for a job the reconciler queues for `key`: a client's job that a crash interrupted
  // (the newest one) when there is one, so that client still gets its JobRemoved; else a new id.
  uint32_t job_id_for(const std::string& key) {
    auto it = interrupted_.find(key);
    if (it == interrupted_.end() || it->second.empty()) return next_internal_job_id();
    const auto id = static_cast<uint32_t>(it->second.back().id);
    it->second.pop_back();
    if (it->second.empty()) interrupted_.erase(it);
    return id;
  }

  // Ends the interrupted client jobs that the start-up reconcile did not need: the VM already
  // is where the request wanted it ("done"); an import has to be sent again ("failed"). Without
  // `vms`, those keyed by a VM stay for the reconcile.
  void end_interrupted_jobs(bool vms) {
    for (auto it = interrupted_.begin(); it != interrupted_.end();) {
      const auto& [key, jobs] = *it;
      if (!vms && VmId::parse(key, "job key").is_ok()) {
        ++it;
        continue;
      }
      for (const auto& j : jobs) {
        auto job = std::make_shared<Job>();
        job->view = {static_cast<uint32_t>(j.id), j.kind, j.object_id, JobState::kRunning, 0.0};
        const bool import = j.kind == "import" || j.kind == "pull" || j.kind == "verify";
        const JobOutcome outcome =
            import ? JobOutcome{"failed", unavailable("interrupted by a restart of nodemanagerd; "
                                                      "send the request again")}
                   : JobOutcome{"done", Status::ok()};
        log_->info("job {} ({} {}) was interrupted by a restart: {}", j.id, j.kind, j.object_id,
                   import ? "failed" : "nothing left to do");
        record_job_end(job, outcome);
      }
      it = interrupted_.erase(it);
    }
  }

  Status append(StateTxn& txn, const std::string& kind, const std::string& object,
                const json& payload, std::vector<EventRecord>& out) {
    NM_ASSIGN_OR_RETURN(EventRecord ev,
                        txn.append_event(kind, object, payload.dump(), d_.clock.now_realtime_us()));
    out.push_back(std::move(ev));
    return Status::ok();
  }

  Status append_state_event(StateTxn& txn, const VmRecord& vm, std::vector<EventRecord>& out) {
    return append(txn, "VmStateChanged", vm.id.str(),
                  json{{"name", vm.spec.name.str()},
                       {"tenant", vm.spec.tenant.str()},
                       {"state", vm.state},
                       {"reason", vm.state_reason},
                       {"generation", vm.generation}},
                  out);
  }

  // One durable transaction; `events` is cleared when it rolls back.
  Status commit(const std::function<Status(StateTxn&)>& fn, std::vector<EventRecord>& events) {
    Status s = d_.store.transact(fn);
    if (!s.is_ok()) {
      events.clear();
      return s;
    }
    for (const auto& e : events) last_seq_ = std::max(last_seq_, e.seq);
    schedule_sync();
    return s;
  }

  void publish(const std::vector<EventRecord>& events) {
    if (!observer_) return;
    for (const auto& e : events) observer_->on_event(e);
  }

  using Write = std::function<Status(StateTxn&, std::vector<EventRecord>&)>;
  // Runs after the transaction that held the write: with its Status and the events it appended.
  using After = std::function<void(const Status&, const std::vector<EventRecord>&)>;
  struct PendingWrite {
    Write write;
    After after;
    std::vector<EventRecord> events;
  };

  // Commits `w` at once or, while a job completes, in that completion's single transaction: the
  // job's state change and its JobRemoved event are atomic and cost one fsync.
  void write(Write w, After after) {
    if (batch_) {
      batch_->push_back({std::move(w), std::move(after), {}});
      return;
    }
    std::vector<PendingWrite> one;
    one.push_back({std::move(w), std::move(after), {}});
    flush(one);
  }

  void flush(std::vector<PendingWrite>& writes) {
    if (writes.empty()) return;
    const Status s = d_.store.transact([&](StateTxn& txn) -> Status {
      for (auto& p : writes) {
        p.events.clear();
        NM_RETURN_IF_ERROR(p.write(txn, p.events));
      }
      return Status::ok();
    });
    if (s.is_ok()) schedule_sync();
    static const std::vector<EventRecord> kNone;
    for (auto& p : writes) {
      if (s.is_ok()) {
        for (const auto& e : p.events) last_seq_ = std::max(last_seq_, e.seq);
      }
      p.after(s, s.is_ok() ? p.events : kNone);
    }
  }

  // Records a new observed state (and optionally other changes) with its event. The in-memory
  // record and the observers change once the write committed.
  void record_state(const VmRecord& vm, std::string state, std::string reason,
                    const std::function<void(VmRecord&)>& also = {}) {
    auto next = std::make_shared<VmRecord>(vm);
    next->state = std::move(state);
    next->state_reason = std::move(reason);
    if (also) also(*next);
    next->updated_us = d_.clock.now_realtime_us();
    write(
        [this, next](StateTxn& txn, std::vector<EventRecord>& events) -> Status {
          NM_RETURN_IF_ERROR(txn.put_vm(*next));
          return append_state_event(txn, *next, events);
        },
        [this, next](const Status& s, const std::vector<EventRecord>& events) {
          if (!s.is_ok()) {
            log_->error("recording state '{}' of vm '{}': {}", next->state, next->spec.name.str(),
                        s.to_string());
            return;
          }
          auto it = vms_.find(next->id.str());
          if (it == vms_.end()) return;
          it->second = *next;
          if (observer_) observer_->on_vm_changed(it->second);
          publish(events);
          if (next->state == "running") {
            set_vm_health(*next, HealthState::kOk, "running");
          } else if (next->state == "error" && health_.check("vm:" + next->id.str())) {
            set_vm_health(*next, HealthState::kFailed, next->state_reason);
          }
        });
  }

  // ---------------------------------------------------------------- jobs

  template <typename MakeJob>
  Result<uint32_t> power_request(std::string_view ref, std::string_view request_id,
                                 const std::string& method, const std::string& kind,
                                 const std::string& variant, MakeJob make_job) {
    NM_ASSIGN_OR_RETURN(auto rid, parse_request_id(request_id));
    const std::string fingerprint = std::string(ref) + "\n" + variant;
    NM_ASSIGN_OR_RETURN(auto replayed, replay(rid, method, fingerprint));
    if (replayed) return replayed->at("job_id").get<uint32_t>();
    NM_RETURN_IF_ERROR(require_startup_reconciled());
    NM_ASSIGN_OR_RETURN(VmRecord * vm, find_vm(ref));
    const ScopedLogFields fields({{log_field::kVmId, vm->id.str()},
                                  {log_field::kTenant, vm->spec.tenant.str()},
                                  {log_field::kRequestId, request_id}});
    if (vm->deleting) return conflict("vm '" + vm->spec.name.str() + "' is being deleted");
    const PowerIntent prev_power = vm->power;
    VmRecord next = *vm;
    next.generation += 1;
    next.updated_us = d_.clock.now_realtime_us();
    uint32_t job_id = 0;
    std::unique_ptr<Job> job;
    std::vector<EventRecord> events;
    NM_RETURN_IF_ERROR(commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(job_id, client_job(txn, kind, next.id.str()));
          job = make_job(next, job_id);
          NM_RETURN_IF_ERROR(txn.put_vm(next));
          return put_reply(txn, rid, method, fingerprint, {{"job_id", job_id}});
        },
        events));
    *vm = next;
    if (observer_) observer_->on_vm_changed(*vm);
    acknowledge_vm_health(*vm);  // a client decided: the crash budget starts afresh
    job->intent = next.power;
    job->prev_power = prev_power;
    enqueue(std::move(job));
    return job_id;
  }

  // After start/stop job `job_id` was cancelled: the desired power becomes what the newest
  // remaining start/stop of the VM asked for, or what it was before the cancelled request.
  void revert_power(const VmId& id, uint32_t job_id) {
    auto vm = vms_.find(id.str());
    auto cancelled = jobs_.find(job_id);
    if (vm == vms_.end() || cancelled == jobs_.end()) return;
    PowerIntent target = cancelled->second->prev_power;
    if (auto q = queues_.find(id.str()); q != queues_.end()) {
      for (uint32_t other : q->second) {
        const Job& j = *jobs_.at(other);
        if (other != job_id && j.intent) target = *j.intent;
      }
    }
    if (vm->second.power == target) return;
    record_state(vm->second, vm->second.state, "cancelled", [&](VmRecord& v) {
      v.power = target;
      v.generation += 1;
    });
  }

  // Digests a worker resolved for a VM's pending images (pulled, or found cached), for the job's
  // finish to record; `failed` when an image could not be pulled or does not fit the spec.
  struct ResolvedImages {
    std::optional<Digest> image;
    std::optional<Digest> kernel;
    std::optional<Digest> initrd;
    bool failed = false;
    std::vector<std::pair<std::string, PullResult>> pulls;  // (ref, result) this job pulled
  };
  static void apply_resolved(VmRecord& vm, const ResolvedImages& r) {
    if (r.image && is_pending(vm.image_digest)) vm.image_digest = *r.image;
    if (r.kernel && vm.kernel_digest && is_pending(*vm.kernel_digest)) vm.kernel_digest = r.kernel;
    if (r.initrd && vm.initrd_digest && is_pending(*vm.initrd_digest)) vm.initrd_digest = r.initrd;
  }

  // Inputs a worker needs to (re-)define a VM's domain, captured on the loop thread.
  struct DefineInput {
    VmId id;
    VmSpec spec;
    uint64_t generation;
    Digest image;
    std::optional<Digest> kernel;
    std::optional<Digest> initrd;
    std::vector<std::pair<network::NetworkSpec, PortRecord>> ports;
    uint32_t job_id = 0;  // for the byte progress of a pull
    std::shared_ptr<ResolvedImages> resolved = std::make_shared<ResolvedImages>();
  };
  DefineInput define_input(const VmRecord& vm, uint32_t job_id) const {
    return {vm.id,
            vm.spec,
            vm.generation,
            vm.image_digest,
            vm.kernel_digest,
            vm.initrd_digest,
            port_networks(vm.id),
            job_id};
  }

  // Worker side: the cached image a VM's digest (or, while pending, its spec's `ref`) names,
  // pulled from the sources first when it is not cached. Holds a lease on it in `leases`.
  Result<ImageInfo> image_for(const Digest& digest, const std::string& ref, const DefineInput& in,
                              ImageKind kind, const std::string& field, JobContext& ctx,
                              std::optional<Digest>& out,
                              std::vector<std::unique_ptr<Lease>>& leases) {
    if (!is_pending(digest)) return d_.images.resolve(digest.str());
    auto local = resolve_image(ref, in.spec.tenant, kind, field);
    if (!local.is_ok() && local.status().code() == Code::kNotFound && !opt_.image_sources.empty() &&
        !ref.starts_with("sha256:")) {
      NM_ASSIGN_OR_RETURN(ImageRef r, ImageRef::parse(ref, field));
      auto pulled = d_.images.pull(r, opt_.image_sources, byte_progress(in.job_id), &ctx.cancelled);
      if (!pulled.is_ok()) {
        in.resolved->failed = !ctx.cancelled;
        return pulled.status().with_context(field + ": pulling image '" + ref + "'");
      }
      leases.push_back(std::make_unique<Lease>(this, pulled->info.digest.str()));
      in.resolved->pulls.emplace_back(ref, *pulled);
      local = resolve_image(ref, in.spec.tenant, kind, field);
    }
    if (!local.is_ok()) {
      in.resolved->failed = true;
      return local.status();
    }
    leases.push_back(std::make_unique<Lease>(this, local->digest.str()));
    out = local->digest;
    return local;
  }

  // Worker side: commits the digests a job resolved for a VM's pending images into its record,
  // and waits for that commit. Gives up (the commit may still happen) when the job is cancelled,
  // which is also how shutdown ends the wait once the loop no longer runs.
  Status record_resolved(const VmId& id, const std::shared_ptr<ResolvedImages>& resolved,
                         JobContext& ctx) {
    auto done = std::make_shared<std::promise<Status>>();
    std::future<Status> result = done->get_future();
    d_.loop.post([this, id, resolved, done, alive = alive_] {
      if (!*alive) return done->set_value(unavailable("nodemanagerd is stopping"));
      auto it = vms_.find(id.str());
      if (it == vms_.end()) return done->set_value(not_found("vm '" + id.str() + "' is gone"));
      VmRecord next = it->second;
      apply_resolved(next, *resolved);
      if (next == it->second) return done->set_value(Status::ok());
      next.updated_us = d_.clock.now_realtime_us();
      std::vector<EventRecord> none;
      const Status s = commit([&](StateTxn& txn) { return txn.put_vm(next); }, none);
      if (s.is_ok()) {
        it->second = next;
        if (observer_) observer_->on_vm_changed(it->second);
      }
      done->set_value(s);
    });
    while (result.wait_for(std::chrono::milliseconds(100)) != std::future_status::ready) {
      if (ctx.cancelled) return cancelled_status();
    }
    return result.get();
  }

  // Worker side: makes sure the VM's overlay and domain exist. With `fresh_disk`, a leftover
  // overlay is replaced (a create that never finished); otherwise an existing one is kept.
  Status ensure_defined(const DefineInput& in, bool fresh_disk, JobContext& ctx) {
    auto& hv = d_.hypervisor;
    NM_ASSIGN_OR_RETURN(auto existing, hv.get_domain(in.id));
    if (existing && !is_ours(*existing, in.id)) {
      return already_exists("spec.id: libvirt already has a domain '" + existing->name +
                            "' with id '" + in.id.str() + "' that nodemanager does not manage");
    }
    // An existing domain only needs the images a crash left pending; a new one needs them all.
    const bool keep = existing && !fresh_disk;
    std::vector<std::unique_ptr<Lease>> leases;
    ResolvedImages& resolved = *in.resolved;
    std::optional<ImageInfo> base;
    std::optional<ImageInfo> kernel;
    std::optional<ImageInfo> initrd;
    if (!keep || is_pending(in.image)) {
      NM_ASSIGN_OR_RETURN(base, image_for(in.image, in.spec.image, in, ImageKind::kDisk,
                                          "spec.image", ctx, resolved.image, leases));
      if (resolved.image) {
        if (Status s = check_disk_size(in.spec, *base); !s.is_ok()) {
          resolved.failed = true;
          return s;
        }
      }
    }
    if (in.kernel && (!keep || is_pending(*in.kernel))) {
      NM_ASSIGN_OR_RETURN(
          kernel, image_for(*in.kernel, in.spec.kernel_image.value_or(""), in, ImageKind::kKernel,
                            "spec.kernel_image", ctx, resolved.kernel, leases));
    }
    if (in.initrd && (!keep || is_pending(*in.initrd))) {
      NM_ASSIGN_OR_RETURN(
          initrd, image_for(*in.initrd, in.spec.initrd_image.value_or(""), in, ImageKind::kInitrd,
                            "spec.initrd_image", ctx, resolved.initrd, leases));
    }
    // The database names the blobs before anything is built on them: from here on GC and
    // RemoveImage see the VM as their user, also across a crash.
    if (resolved.image || resolved.kernel || resolved.initrd) {
      NM_RETURN_IF_ERROR(record_resolved(in.id, in.resolved, ctx));
    }
    // The port's rules and lease exist before the domain can send its first frame.
    NM_RETURN_IF_ERROR(attach_ports(in.ports));
    if (keep) return Status::ok();
    DomainXmlInput x;
    x.id = in.id;
    x.spec = in.spec;
    x.generation = in.generation;
    x.domain_type = domain_type_;
    x.serial_log_path = serial_log_path(opt_, in.id);
    for (const auto& [net, port] : in.ports) {
      x.interfaces.push_back({port.mac.str(), network::bridge_name(net.vni), port.ifname});
    }
    if (kernel) x.kernel_path = kernel->path;
    if (initrd) x.initrd_path = initrd->path;
    std::optional<std::string> overlay;
    if (!fresh_disk) {
      NM_ASSIGN_OR_RETURN(overlay, hv.find_overlay(in.id));
    }
    if (!overlay) {
      const uint64_t capacity = in.spec.disk_gib ? in.spec.disk_gib * kGiB : base->virtual_size;
      NM_ASSIGN_OR_RETURN(
          std::string path,
          hv.create_overlay(in.id, base->path, std::string(image_format_name(base->format)),
                            capacity));
      overlay = path;
      if (Status t = d_.images.touch(base->digest); !t.is_ok()) {
        log_->warn("recording the use of image '{}': {}", base->digest.str(), t.to_string());
      }
    }
    if (!ctx.pause(opt_.debug_job_delay)) return cancelled_status();
    x.disk_path = *overlay;
    return hv.define_domain(render_domain_xml(x));
  }

  std::unique_ptr<Job> new_vm_job(uint32_t id, const VmRecord& vm, std::string kind) {
    auto job = std::make_unique<Job>();
    job->view = {id, std::move(kind), vm.id.str(), JobState::kQueued, 0.0};
    job->key = vm.id.str();
    return job;
  }

  // Loop side: applies `fn` to the VM if it still exists.
  void with_vm(const VmId& id, const std::function<void(VmRecord&)>& fn) {
    auto it = vms_.find(id.str());
    if (it != vms_.end()) fn(it->second);
  }

  // create (fresh overlay) or define (reconciler: the domain vanished; keep the disk).
  std::unique_ptr<Job> make_define_job(uint32_t id, const VmRecord& vm, bool fresh_disk) {
    auto job = new_vm_job(id, vm, fresh_disk ? "create" : "define");
    const DefineInput in = define_input(vm, id);
    job->work = [this, in, fresh_disk](JobContext& ctx) {
      return ensure_defined(in, fresh_disk, ctx);
    };
    const VmId vm_id = vm.id;
    const uint64_t gen = vm.generation;
    // A VM whose images were never resolved has nothing built yet (digests are recorded before
    // the overlay): if its images cannot be had, its create is undone like a fresh one.
    const bool never_built = is_pending(vm.image_digest) ||
                             (vm.kernel_digest && is_pending(*vm.kernel_digest)) ||
                             (vm.initrd_digest && is_pending(*vm.initrd_digest));
    job->finish = [this, vm_id, gen, fresh_disk, never_built, resolved = in.resolved](
                      const Status& s, bool cancelled) {
      for (const auto& [ref, pulled] : resolved->pulls) record_pulled(ref, pulled);
      with_vm(vm_id, [&](VmRecord& v) {
        if (s.is_ok()) {
          record_state(v, v.power == PowerIntent::kRunning ? v.state : "stopped",
                       fresh_disk ? "created" : "domain re-defined", [&](VmRecord& n) {
                         n.observed_generation = std::max(n.observed_generation, gen);
                         apply_resolved(n, *resolved);
                       });
        } else if ((fresh_disk && cancelled) || ((fresh_disk || never_built) && resolved->failed)) {
          // A create whose image could not be pulled changes nothing: the VM goes again.
          undo_create(v, cancelled ? "create cancelled" : s.message());
        } else {
          record_state(v, "error", s.message());
        }
      });
    };
    job->revert = [this, vm_id, fresh_disk] {
      if (fresh_disk) with_vm(vm_id, [&](VmRecord& v) { undo_create(v); });
    };
    return job;
  }

  // A cancelled or failed create leaves nothing half-made: the VM is deleted again.
  void undo_create(VmRecord& vm, std::string reason = "create cancelled") {
    record_state(vm, "deleting", std::move(reason), [](VmRecord& n) {
      n.deleting = true;
      n.generation += 1;
    });
    enqueue(make_delete_job(job_id_for(vm.id.str()), vm));
  }

  // `after_crash`: first wait (up to kCrashSettle) until libvirt shows the domain down: the
  // adapter may report a dead QEMU before libvirt has noticed, and starting a domain libvirt still
  // thinks active would be a no-op.
  std::unique_ptr<Job> make_start_job(uint32_t id, const VmRecord& vm, std::string reason,
                                      bool after_crash = false) {
    auto job = new_vm_job(id, vm, "start");
    const DefineInput in = define_input(vm, id);
    job->work = [this, in, after_crash](JobContext& ctx) -> Status {
      if (after_crash) NM_RETURN_IF_ERROR(wait_domain_down(in.id, ctx));
      NM_RETURN_IF_ERROR(ensure_defined(in, false, ctx));
      if (ctx.cancelled) return cancelled_status();
      return d_.hypervisor.start_domain(in.id);
    };
    const VmId vm_id = vm.id;
    const uint64_t gen = vm.generation;
    job->finish = [this, vm_id, id, gen, reason, resolved = in.resolved](const Status& s,
                                                                         bool cancelled) {
      for (const auto& [ref, pulled] : resolved->pulls) record_pulled(ref, pulled);
      if (cancelled && !s.is_ok()) return revert_power(vm_id, id);
      with_vm(vm_id, [&](VmRecord& v) {
        if (s.is_ok()) {
          record_state(v, "running", reason, [&](VmRecord& n) {
            n.observed_generation = std::max(n.observed_generation, gen);
            apply_resolved(n, *resolved);
          });
        } else {
          record_state(v, "error", "start failed: " + s.message());
        }
      });
    };
    job->revert = [this, vm_id, id] { revert_power(vm_id, id); };
    return job;
  }

  static constexpr std::chrono::seconds kCrashSettle{30};

  // Worker: waits until the domain is not active (or gone). Unavailable after kCrashSettle.
  Status wait_domain_down(const VmId& id, JobContext& ctx) {
    const auto deadline = d_.clock.now_monotonic() + kCrashSettle;
    for (;;) {
      const uint64_t seen = ctx.seen();
      NM_ASSIGN_OR_RETURN(auto dom, d_.hypervisor.get_domain(id));
      if (!dom || dom->state == DomainState::kShutOff || dom->state == DomainState::kCrashed) {
        return Status::ok();
      }
      if (ctx.cancelled) return cancelled_status();
      if (d_.clock.now_monotonic() >= deadline) {
        return unavailable("libvirt still shows the domain active " +
                           std::to_string(kCrashSettle.count()) + " s after its QEMU exited");
      }
      ctx.wait_until(seen,
                     std::min(deadline, d_.clock.now_monotonic() + std::chrono::milliseconds(200)));
    }
  }

  std::unique_ptr<Job> make_stop_job(uint32_t id, const VmRecord& vm, bool force) {
    auto job = new_vm_job(id, vm, "stop");
    const VmId vm_id = vm.id;
    const auto timeout = opt_.stop_timeout;
    auto forced = std::make_shared<std::atomic<bool>>(force);
    job->work = [this, vm_id, force, timeout, forced](JobContext& ctx) -> Status {
      auto& hv = d_.hypervisor;
      if (force) return hv.destroy_domain(vm_id);
      const auto deadline = d_.clock.now_monotonic() + timeout;
      NM_RETURN_IF_ERROR(hv.shutdown_domain(vm_id));
      for (;;) {
        const uint64_t seen = ctx.seen();
        NM_ASSIGN_OR_RETURN(auto dom, hv.get_domain(vm_id));
        if (!dom || dom->state == DomainState::kShutOff || dom->state == DomainState::kCrashed) {
          return Status::ok();
        }
        if (ctx.cancelled) return cancelled_status();
        const auto now = d_.clock.now_monotonic();
        if (now >= deadline) {
          *forced = true;
          return hv.destroy_domain(vm_id);
        }
        // Woken by the domain's lifecycle event; the 1 s bound covers a lost event.
        ctx.wait_until(seen, std::min(deadline, now + std::chrono::seconds(1)));
      }
    };
    job->finish = [this, vm_id, id, forced, gen = vm.generation](const Status& s, bool cancelled) {
      if (cancelled && !s.is_ok()) return revert_power(vm_id, id);
      with_vm(vm_id, [&](VmRecord& v) {
        if (s.is_ok()) {
          record_state(v, "stopped", *forced ? "powered off" : "shut down", [&](VmRecord& n) {
            n.observed_generation = std::max(n.observed_generation, gen);
          });
        } else {
          record_state(v, "error", "stop failed: " + s.message());
        }
      });
    };
    job->revert = [this, vm_id, id] { revert_power(vm_id, id); };
    return job;
  }

  std::unique_ptr<Job> make_reboot_job(uint32_t id, const VmRecord& vm) {
    auto job = new_vm_job(id, vm, "reboot");
    const VmId vm_id = vm.id;
    job->work = [this, vm_id](JobContext&) { return d_.hypervisor.reboot_domain(vm_id); };
    job->finish = [this, vm_id](const Status& s, bool) {
      if (s.is_ok()) with_vm(vm_id, [&](VmRecord& v) { record_state(v, "running", "rebooted"); });
    };
    job->revert = [] {};
    job->cancellable_while_running = false;
    return job;
  }

  static bool is_ours(const DomainInfo& d, const VmId& id) {
    return d.owner && d.owner->vm_id == id;
  }

  // Worker side of delete and orphan removal: powers off and undefines the domain if it is ours,
  // then deletes the overlay (named after the id in our own pool). Idempotent: what is already
  // gone counts as done, so a delete interrupted by a crash can always finish.
  Status remove_from_hypervisor(const VmId& id, JobContext& ctx) {
    auto& hv = d_.hypervisor;
    auto absent_ok = [](const Status& s) { return s.code() == Code::kNotFound ? Status::ok() : s; };
    NM_ASSIGN_OR_RETURN(auto dom, hv.get_domain(id));
    if (dom && is_ours(*dom, id)) {
      NM_RETURN_IF_ERROR(absent_ok(hv.destroy_domain(id)));
      ctx.pause(opt_.debug_job_delay);
      NM_RETURN_IF_ERROR(absent_ok(hv.undefine_domain(id)));
    } else if (dom) {
      log_->warn("domain '{}' has id {} but is not ours; leaving it alone", dom->name, id.str());
    }
    return absent_ok(hv.delete_overlay(id));
  }

  std::unique_ptr<Job> make_delete_job(uint32_t id, const VmRecord& vm) {
    auto job = new_vm_job(id, vm, "delete");
    const VmId vm_id = vm.id;
    job->work = [this, vm_id, ports = port_networks(vm.id)](JobContext& ctx) -> Status {
      NM_RETURN_IF_ERROR(remove_from_hypervisor(vm_id, ctx));
      return detach_ports(ports);
    };
    job->finish = [this, vm_id](const Status& s, bool) {
      auto it = vms_.find(vm_id.str());
      if (it == vms_.end()) return;
      if (!s.is_ok()) {
        record_state(it->second, "error",
                     "delete failed: " + s.message() + "; the next audit retries");
        return;
      }
      auto gone = std::make_shared<VmRecord>(it->second);
      gone->state = "deleted";
      gone->state_reason = "deleted";
      write(
          [this, gone](StateTxn& txn, std::vector<EventRecord>& events) -> Status {
            NM_RETURN_IF_ERROR(txn.delete_vm(gone->id));
            return append_state_event(txn, *gone, events);
          },
          [this, gone](const Status& c, const std::vector<EventRecord>& events) {
            if (!c.is_ok()) {
              log_->error("removing vm '{}' from the database: {}", gone->spec.name.str(),
                          c.to_string());
              return;
            }
            name_index_.erase(gone->spec.name.str());
            vms_.erase(gone->id.str());
            crashes_.erase(gone->id.str());
            restart_pending_.erase(gone->id.str());
            guest_shutdown_.erase(gone->id.str());
            health_.remove_vm(gone->id.str(), d_.clock.now_realtime_us());
            health_dirty();
            if (ports_.erase(gone->id.str())) ++net_epoch_;
            if (observer_) observer_->on_vm_removed(gone->id);
            publish(events);
            log_->info("vm '{}' ({}) deleted", gone->spec.name.str(), gone->id.str());
          });
    };
    job->revert = [this, vm_id] {
      with_vm(vm_id, [&](VmRecord& v) {
        record_state(v, "unknown", "delete cancelled", [](VmRecord& n) {
          n.deleting = false;
          n.generation += 1;
        });
      });
      audit();
    };
    job->cancellable_while_running = false;
    return job;
  }

  std::unique_ptr<Job> make_orphan_job(uint32_t id, const std::string& uuid) {
    auto job = std::make_unique<Job>();
    job->view = {id, "remove-orphan", uuid, JobState::kQueued, 0.0};
    job->key = uuid;
    const VmId vm_id = VmId::trusted(uuid);
    job->work = [this, vm_id](JobContext& ctx) { return remove_from_hypervisor(vm_id, ctx); };
    job->finish = [this, uuid](const Status& s, bool) {
      if (s.is_ok())
        log_->warn("removed orphaned domain/overlay {} (orphan policy 'remove')", uuid);
    };
    job->revert = [] {};
    job->cancellable_while_running = false;
    return job;
  }

  // Reconciler-initiated jobs are not persisted requests; their ids come from the database too,
  // so they never collide with client-visible ones.
  uint32_t next_internal_job_id() {
    uint32_t id = 0;
    std::vector<EventRecord> none;
    const Status s = commit(
        [&](StateTxn& txn) -> Status {
          NM_ASSIGN_OR_RETURN(id, allocate_job(txn));
          return Status::ok();
        },
        none);
    if (!s.is_ok()) {
      log_->error("allocating a job id: {}", s.to_string());
      return 0;
    }
    return id;
  }

  void enqueue(std::unique_ptr<Job> job) {
    if (!job || job->view.id == 0) return;
    const uint32_t id = job->view.id;
    auto& q = queues_[job->key];
    q.push_back(id);
    const bool head = q.size() == 1;
    touch(job->key);
    {
      const std::string job_id = std::to_string(id);
      const std::string& kind = job->view.kind;
      const std::string& object = job->view.object_id;
      const bool image = kind == "import" || kind == "pull";
      const bool network = kind.rfind("network-", 0) == 0;
      const bool vm = !image && !network && kind != "verify";
      const ScopedLogFields scope({{log_field::kJobId, job_id},
                                   {log_field::kImage, image ? object : ""},
                                   {log_field::kNetwork, network ? object : ""},
                                   {log_field::kVmId, vm ? object : ""}});
      job->log_fields = LogFields::current();
    }
    auto& stored = jobs_.emplace(id, std::move(job)).first->second;
    if (observer_) observer_->on_job_added(stored->view);
    if (head) run(id);
  }

  // ---------------------------------------------------------------- group commit

  void after_durable(std::function<void()> fn) override {
    if (held_.empty() && d_.store.durable_seq() >= d_.store.written_seq()) {
      fn();
      return;
    }
    held_.push_back({d_.store.written_seq(), std::move(fn)});
    schedule_sync();
  }

  // One sync for everything written until the loop runs out of work (or sync_max_delay passed).
  // Every write schedules one, whether or not anything waits for it.
  void schedule_sync() {
    if (sync_scheduled_) return;
    if (held_.empty() && d_.store.durable_seq() >= d_.store.written_seq()) return;
    sync_scheduled_ = true;
    d_.loop.post_idle([this, alive = alive_] {
      if (*alive) (void)sync_held();
    });
    d_.loop.post_after(opt_.sync_max_delay, [this, alive = alive_] {
      if (*alive) (void)sync_held();
    });
  }

  Status release_held() override {
    stopping_ = true;
    sync_scheduled_ = true;
    return sync_held();
  }

  Status sync_held() {
    if (!sync_scheduled_) return Status::ok();
    sync_scheduled_ = false;
    const uint64_t seq = last_seq_;
    if (Status s = d_.store.sync(); !s.is_ok()) {
      log_->critical("{}: {} replies, signals or jobs stay held", s.to_string(), held_.size());
      set_host_check("state-db", HealthState::kFailed, s.message());
      if (opt_.on_sync_failure && !stopping_) opt_.on_sync_failure(s);
      return s;
    }
    durable_last_seq_ = seq;
    // What a released function writes is held again, behind what waits already.
    while (!held_.empty() && held_.front().seq <= d_.store.durable_seq()) {
      std::function<void()> fn = std::move(held_.front().fn);
      held_.pop_front();
      fn();
    }
    if (!held_.empty()) schedule_sync();
    return Status::ok();
  }

  void run(uint32_t id) {
    Job& job = *jobs_.at(id);
    job.view.state = JobState::kRunning;
    if (observer_) observer_->on_job_changed(job.view);
    // The job acts on desired state: only once that is durable.
    after_durable(
        [this, id, ctx = job.ctx, work = job.work, fields = job.log_fields, alive = alive_] {
          if (*alive && !stopping_) submit_job(id, ctx, work, fields);
        });
  }

  void submit_job(uint32_t id, const std::shared_ptr<JobContext>& ctx,
                  const std::function<Status(JobContext&)>& work, const LogFields& fields) {
    d_.workers.submit([this, id, ctx, work, fields, alive = alive_] {
      const ScopedLogFields scope(fields);
      Status s;
      try {
        s = work(*ctx);
      } catch (const std::exception& e) {
        s = internal_error(std::string("job threw: ") + e.what());
      }
      d_.loop.post([this, id, s, alive] {
        if (*alive) complete(id, s);
      });
    });
  }

  void complete(uint32_t id, const Status& s) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    Job& job = *it->second;
    const ScopedLogFields scope(job.log_fields);
    const bool cancelled = job.ctx->cancelled.load();
    const bool saw_events = job.ctx->seen() > 0;
    const std::string key = job.key;
    touch(key);
    batch_.emplace();
    job.finish(s, cancelled);
    JobOutcome outcome;
    if (s.is_ok()) {
      outcome = {"done", Status::ok()};
    } else if (cancelled) {
      outcome = {"cancelled", Status::ok()};
    } else {
      outcome = {"failed", s};
      log_->warn("job {} ({} {}) failed: {}", id, job.view.kind, job.view.object_id, s.to_string());
    }
    const std::optional<uint32_t> next = remove_job(id, outcome);
    std::vector<PendingWrite> writes = std::move(*batch_);
    batch_.reset();
    flush(writes);
    // The next job of this VM starts only once this one's outcome is durable.
    if (next) {
      run(*next);
    } else if (saw_events && vms_.count(key)) {
      // Lifecycle events that arrived while the job owned the VM (a guest crashing right after
      // its start, say) are looked at now rather than at the next audit.
      observe(vms_.at(key).id);
    }
  }

  // Ends a job: its JobRemoved event and observers. Returns the job of the same key that may
  // run next (the caller starts it).
  std::optional<uint32_t> remove_job(uint32_t id, const JobOutcome& outcome) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return std::nullopt;
    std::shared_ptr<Job> job = std::move(it->second);
    jobs_.erase(it);
    record_job_end(job, outcome);
    auto q = queues_.find(job->key);
    if (q == queues_.end()) return std::nullopt;
    auto& dq = q->second;
    const bool was_head = !dq.empty() && dq.front() == id;
    dq.erase(std::remove(dq.begin(), dq.end(), id), dq.end());
    if (dq.empty()) {
      queues_.erase(q);
      return std::nullopt;
    }
    if (was_head) return dq.front();
    return std::nullopt;
  }

  // The JobRemoved event of `job` (and the removal of its unfinished-job record), then observers.
  void record_job_end(const std::shared_ptr<Job>& job, const JobOutcome& outcome) {
    const uint32_t id = job->view.id;
    write(
        [this, job, id, outcome](StateTxn& txn, std::vector<EventRecord>& events) -> Status {
          NM_RETURN_IF_ERROR(txn.delete_job(id));
          return append(
              txn, "JobRemoved", std::to_string(id),
              json{{"job", id},
                   {"kind", job->view.kind},
                   {"object_id", job->view.object_id},
                   {"result", outcome.result},
                   {"error",
                    outcome.error.is_ok() ? "" : std::string(code_name(outcome.error.code()))},
                   {"message", outcome.error.message()}},
              events);
        },
        [this, job, id, outcome](const Status& c, const std::vector<EventRecord>& events) {
          if (!c.is_ok()) log_->error("recording the end of job {}: {}", id, c.to_string());
          if (!observer_) return;
          observer_->on_job_removed(job->view, outcome, events.empty() ? EventRecord{} : events[0]);
          publish(events);
        });
  }

  void set_bytes(uint32_t id, uint64_t done, uint64_t total) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    it->second->view.bytes_done = done;
    it->second->view.bytes_total = total;
    set_progress(id, total ? static_cast<double>(done) / static_cast<double>(total) : 0.0, true);
  }

  void set_progress(uint32_t id, double p, bool force_post = false) {
    auto it = jobs_.find(id);
    if (it == jobs_.end()) return;
    Job& job = *it->second;
    job.view.progress = p;
    if (force_post || p - job.last_progress_posted >= 0.01 || p >= 1.0) {
      job.last_progress_posted = p;
      if (observer_) observer_->on_job_changed(job.view);
    }
  }

  // ---------------------------------------------------------------- reconciler

  // Converges every VM from a snapshot of libvirt taken when epoch_counter_ was `taken_at`.
  void reconcile_all(const std::vector<DomainInfo>& domains, const std::vector<VmId>& overlays,
                     uint64_t taken_at) {
    std::map<std::string, const DomainInfo*> by_uuid;
    for (const auto& d : domains) by_uuid[d.uuid] = &d;
    std::vector<std::string> ids;
    for (const auto& [id, vm] : vms_) ids.push_back(id);
    for (const auto& id : ids) {
      auto it = vms_.find(id);
      if (it == vms_.end() || queues_.count(id) || changed_since(id, taken_at)) continue;
      auto d = by_uuid.find(id);
      converge(it->second, d == by_uuid.end() ? nullptr : d->second);
    }
    std::set<std::string> orphans;
    for (const auto& d : domains) {
      if (d.owner && !vms_.count(d.uuid)) orphans.insert(d.uuid);
    }
    for (const auto& o : overlays) {
      if (!vms_.count(o.str())) orphans.insert(o.str());
    }
    for (const auto& uuid : orphans) {
      if (!changed_since(uuid, taken_at)) handle_orphan(uuid);
    }
    // Epochs of VMs gone before this snapshot are no longer needed to judge later snapshots.
    for (auto it = epoch_.begin(); it != epoch_.end();) {
      if (!vms_.count(it->first) && !queues_.count(it->first) && it->second <= taken_at) {
        it = epoch_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void handle_orphan(const std::string& uuid) {
    if (queues_.count(uuid)) return;
    if (opt_.orphan_policy == OrphanPolicy::kRemove) {
      enqueue(make_orphan_job(job_id_for(uuid), uuid));
      return;
    }
    if (!reported_orphans_.insert(uuid).second) return;
    log_->warn(
        "orphan {}: a domain or overlay marked as ours that the database does not know; "
        "kept (orphan policy 'report')",
        uuid);
    std::vector<EventRecord> events;
    const Status c = commit(
        [&](StateTxn& txn) {
          return append(txn, "OrphanFound", uuid, json{{"policy", "report"}}, events);
        },
        events);
    if (c.is_ok()) publish(events);
  }

  // Drives one VM toward its desired state, given what libvirt shows (`d` null: no domain).
  void converge(VmRecord& vm, const DomainInfo* d) {
    if (vm.deleting) {
      enqueue(make_delete_job(job_id_for(vm.id.str()), vm));
      return;
    }
    if (d && !d->owner) {
      log_->error("domain {} '{}' has the id of vm '{}' but not our metadata; not touching it",
                  d->uuid, d->name, vm.spec.name.str());
      return;
    }
    if (!d) {
      if (vm.power == PowerIntent::kRunning && vm.spec.autostart) {
        log_->info("vm '{}': domain missing; re-defining and starting it", vm.spec.name.str());
        enqueue(make_start_job(job_id_for(vm.id.str()), vm, "restored after restart"));
      } else {
        log_->info("vm '{}': domain missing; re-defining it", vm.spec.name.str());
        if (vm.power == PowerIntent::kRunning) {
          record_state(vm, "stopped", "domain vanished; autostart is off", [](VmRecord& n) {
            n.power = PowerIntent::kStopped;
            n.generation += 1;
          });
        }
        enqueue(make_define_job(job_id_for(vm.id.str()), vm, false));
      }
      return;
    }
    const std::string actual = observed_state(d->state);
    const bool down = actual == "stopped" || actual == "crashed";
    if (vm.power == PowerIntent::kRunning && down) {
      if (restart_pending_.count(vm.id.str())) return;  // the crash policy's restart is due
      if (!vm.spec.autostart) {
        const std::string what = describe_down(*d);
        record_state(vm, actual, what + "; autostart is off", [](VmRecord& n) {
          n.power = PowerIntent::kStopped;
          n.generation += 1;
        });
        if (d->cause != DomainCause::kGuestShutdown && !starting_) {
          set_vm_health(vm, HealthState::kFailed, what + "; autostart is off: not restarting");
        }
        return;
      }
      // A failed start, or a spent crash budget, waits for an explicit start.
      if (vm.state == "error" || vm.state == "failed") return;
      if (!starting_) return on_unexpected_down(vm, *d);
      if (actual != vm.state) record_state(vm, actual, "found " + actual + " at start-up");
      enqueue(make_start_job(job_id_for(vm.id.str()), vm, "restored desired power state"));
      return;
    }
    if (actual == "paused" && d->cause == DomainCause::kIoError) {
      touch(vm.id.str());
      set_vm_health(vm, HealthState::kFailed, "paused on a disk I/O error");
    }
    if (vm.power == PowerIntent::kStopped && actual == "running") {
      record_state(vm, actual, "started outside nodemanager; stopping it");
      enqueue(make_stop_job(job_id_for(vm.id.str()), vm, false));
      return;
    }
    if (actual != vm.state && !(vm.state == "error" && down)) {
      record_state(vm, actual, "observed",
                   [](VmRecord& n) { n.observed_generation = n.generation; });
    } else if (vm.observed_generation != vm.generation && vm.state != "error") {
      record_state(vm, vm.state, vm.state_reason,
                   [](VmRecord& n) { n.observed_generation = n.generation; });
    }
  }

  // ---------------------------------------------------------------- network helpers

  static std::string network_key(const std::string& name) { return "network:" + name; }

  Status append_network_event(StateTxn& txn, const NetworkRecord& n,
                              std::vector<EventRecord>& out) {
    return append(txn, "NetworkStateChanged", n.spec.name.str(),
                  json{{"name", n.spec.name.str()},
                       {"tenant", n.spec.tenant.str()},
                       {"state", n.state},
                       {"reason", n.state_reason}},
                  out);
  }

  // Ports for a new VM: for each network of the spec (which must exist, belong to the VM's
  // tenant and not be going away; another tenant's network answers like a missing one) an
  // address (the fixed one asked for, or the lowest free), a MAC unique on the node and a tap.
  Result<std::vector<PortRecord>> allocate_ports(const VmId& id, const VmSpec& spec) const {
    std::vector<PortRecord> out;
    std::set<network::MacAddress> macs;
    std::set<std::string> taps;
    for (const auto& [_, list] : ports_) {
      for (const auto& p : list) {
        macs.insert(p.mac);
        taps.insert(p.ifname);
      }
    }
    uint32_t attempt = 0;
    for (size_t i = 0; i < spec.networks.size(); ++i) {
      const auto& att = spec.networks[i];
      const std::string at = "spec.networks[" + std::to_string(i) + "]";
      auto it = networks_.find(att.network.str());
      if (it == networks_.end() || it->second.spec.tenant != spec.tenant) {
        return not_found(at + ".network: network '" + att.network.str() +
                         "' does not exist for tenant '" + spec.tenant.str() + "'");
      }
      if (it->second.deleting) {
        return conflict(at + ".network: network '" + att.network.str() + "' is being deleted");
      }
      std::optional<network::Ipv4Address> fixed;
      if (att.ip) {
        NM_ASSIGN_OR_RETURN(fixed, network::Ipv4Address::parse(*att.ip, at + ".ip"));
      }
      std::vector<network::Ipv4Address> used;
      for (const auto& p : network_ports(att.network.str())) used.push_back(p.ip);
      NM_ASSIGN_OR_RETURN(
          network::Ipv4Address ip,
          network::allocate_address(it->second.spec.subnet, used, fixed, at + ".ip"));
      network::MacAddress mac = network::derive_vm_mac(id, attempt++);
      while (macs.count(mac)) mac = network::derive_vm_mac(id, attempt++);
      macs.insert(mac);
      const std::string tap = network::tap_name(id, static_cast<unsigned>(i));
      if (taps.count(tap)) {
        // Only a caller-chosen id can get here: generated ids are random.
        return conflict("spec.id: the tap name '" + tap +
                        "' derived from this id is taken by another VM on this node; choose "
                        "another id");
      }
      out.push_back(PortRecord{.vm = id,
                               .network = att.network,
                               .ifname = network::tap_name(id, static_cast<unsigned>(i)),
                               .mac = mac,
                               .ip = ip,
                               .hostname = spec.name.str()});
    }
    return out;
  }

  // A VM's ports with the spec of their network, captured on the loop for a worker.
  std::vector<std::pair<network::NetworkSpec, PortRecord>> port_networks(const VmId& id) const {
    std::vector<std::pair<network::NetworkSpec, PortRecord>> out;
    for (const auto& p : vm_ports(id)) {
      auto it = networks_.find(p.network.str());
      if (it != networks_.end()) out.emplace_back(it->second.spec, p);
    }
    return out;
  }

  // Worker side.
  // Both bump net_epoch_ under the lock: an audit whose snapshot predates this change must not
  // run after it (it would put back a port just removed, or remove one just added).
  Status attach_ports(const std::vector<std::pair<network::NetworkSpec, PortRecord>>& ports) {
    if (ports.empty()) return Status::ok();
    std::lock_guard lock(net_mu_);
    ++net_epoch_;
    for (const auto& [net, port] : ports) {
      NM_RETURN_IF_ERROR(d_.networks.add_port(net, port).with_context(
          "attaching port '" + port.ifname + "' to network '" + net.name.str() + "'"));
    }
    return Status::ok();
  }
  Status detach_ports(const std::vector<std::pair<network::NetworkSpec, PortRecord>>& ports) {
    if (ports.empty()) return Status::ok();
    std::lock_guard lock(net_mu_);
    ++net_epoch_;
    for (const auto& [net, port] : ports) {
      NM_RETURN_IF_ERROR(d_.networks.remove_port(net, port).with_context(
          "detaching port '" + port.ifname + "' from network '" + net.name.str() + "'"));
    }
    return Status::ok();
  }

  // The host state the database asks for: networks not being deleted and their ports.
  std::pair<std::vector<network::NetworkSpec>, std::vector<PortRecord>> desired_networks() const {
    std::vector<network::NetworkSpec> nets;
    std::set<std::string> live;
    for (const auto& [name, n] : networks_) {
      if (n.deleting) continue;
      nets.push_back(n.spec);
      live.insert(name);
    }
    std::vector<PortRecord> ports;
    for (const auto& [_, list] : ports_) {
      for (const auto& p : list) {
        if (live.count(p.network.str())) ports.push_back(p);
      }
    }
    return {std::move(nets), std::move(ports)};
  }

  // Start-up: the host converges on the database before READY; interrupted deletions resume.
  void start_networks() {
    auto [nets, ports] = desired_networks();
    Result<std::vector<network::Repair>> repairs = std::vector<network::Repair>{};
    {
      std::lock_guard lock(net_mu_);
      repairs = d_.networks.reconcile(nets, ports);
    }
    if (!repairs.is_ok()) {
      log_->error("start-up network reconcile failed: {}; the next audit retries",
                  repairs.status().to_string());
      for (auto& [name, n] : networks_) {
        if (!n.deleting) record_network_state(name, "failed", repairs.status().message());
      }
    } else {
      record_repairs(*repairs);
    }
    for (auto& [name, n] : networks_) {
      if (n.deleting) enqueue(make_network_delete_job(job_id_for(network_key(name)), n));
    }
  }

  void record_network_state(const std::string& name, std::string state, std::string reason) {
    auto it = networks_.find(name);
    if (it == networks_.end()) return;
    if (it->second.state == state && it->second.state_reason == reason) return;
    // A network being deleted stays "deleting" (or "failed" when its deletion fails): a create
    // job or an audit finishing late must not make it look ready.
    if (it->second.deleting && state == "ready") return;
    auto next = std::make_shared<NetworkRecord>(it->second);
    next->state = std::move(state);
    next->state_reason = std::move(reason);
    next->updated_us = d_.clock.now_realtime_us();
    write(
        [this, next](StateTxn& txn, std::vector<EventRecord>& events) -> Status {
          NM_RETURN_IF_ERROR(txn.put_network(*next));
          return append_network_event(txn, *next, events);
        },
        [this, next](const Status& s, const std::vector<EventRecord>& events) {
          if (!s.is_ok()) {
            log_->error("recording state '{}' of network '{}': {}", next->state,
                        next->spec.name.str(), s.to_string());
            return;
          }
          auto n = networks_.find(next->spec.name.str());
          if (n != networks_.end()) n->second = *next;
          publish(events);
        });
  }

  std::unique_ptr<Job> new_network_job(uint32_t id, const std::string& name, std::string kind) {
    auto job = std::make_unique<Job>();
    job->view = {id, std::move(kind), name, JobState::kQueued, 0.0};
    job->key = network_key(name);
    job->cancellable_while_running = false;
    return job;
  }

  std::unique_ptr<Job> make_network_create_job(uint32_t id, const NetworkRecord& n) {
    auto job = new_network_job(id, n.spec.name.str(), "network-create");
    const std::string name = n.spec.name.str();
    job->work = [this, spec = n.spec](JobContext&) {
      std::lock_guard lock(net_mu_);
      return d_.networks.realize_network(spec, {});
    };
    job->finish = [this, name](const Status& s, bool) {
      if (s.is_ok()) {
        record_network_state(name, "ready", "built on the host");
      } else {
        record_network_state(name, "failed", s.message() + "; the next audit retries");
      }
    };
    // Cancelled before it ran: the network was recorded; the audit builds it.
    job->revert = [] {};
    return job;
  }

  std::unique_ptr<Job> make_network_delete_job(uint32_t id, const NetworkRecord& n) {
    auto job = new_network_job(id, n.spec.name.str(), "network-delete");
    const std::string name = n.spec.name.str();
    job->work = [this, spec = n.spec](JobContext&) {
      std::lock_guard lock(net_mu_);
      return d_.networks.remove_network(spec);
    };
    job->finish = [this, name](const Status& s, bool) {
      auto it = networks_.find(name);
      if (it == networks_.end()) return;
      if (!s.is_ok()) {
        record_network_state(name, "failed",
                             "delete failed: " + s.message() + "; delete it again to retry");
        return;
      }
      auto gone = std::make_shared<NetworkRecord>(it->second);
      gone->state = "deleted";
      gone->state_reason = "deleted";
      write(
          [this, gone](StateTxn& txn, std::vector<EventRecord>& events) -> Status {
            NM_RETURN_IF_ERROR(txn.delete_network(gone->spec.name));
            return append_network_event(txn, *gone, events);
          },
          [this, gone](const Status& c, const std::vector<EventRecord>& events) {
            if (!c.is_ok()) {
              log_->error("removing network '{}' from the database: {}", gone->spec.name.str(),
                          c.to_string());
              return;
            }
            networks_.erase(gone->spec.name.str());
            ++net_epoch_;
            publish(events);
            log_->info("network '{}' deleted", gone->spec.name.str());
          });
    };
    job->revert = [] {};
    return job;
  }

  // Audit of the host side of networks, on a worker. Skipped when the desired state changed
  // between the snapshot and the moment the worker holds the network lock (a stale snapshot
  // must not undo a network or port that was just made); the next audit runs with fresh state.
  void audit_networks() {
    if (net_audit_in_flight_) return;
    net_audit_in_flight_ = true;
    auto desired = std::make_shared<decltype(desired_networks())>(desired_networks());
    const uint64_t epoch = net_epoch_.load();
    d_.workers.submit([this, desired, epoch, alive = alive_] {
      std::optional<Result<std::vector<network::Repair>>> result;
      {
        std::lock_guard lock(net_mu_);
        if (net_epoch_.load() == epoch) {
          result = d_.networks.reconcile(desired->first, desired->second);
        }
      }
      d_.loop.post([this, alive, result = std::move(result)] {
        if (!*alive) return;
        net_audit_in_flight_ = false;
        if (!result) return;
        if (!result->is_ok()) {
          log_->warn("network audit failed: {}; retrying at the next audit",
                     result->status().to_string());
          return;
        }
        record_repairs(**result);
      });
    });
  }

  // The outcome of a reconcile: one NetworkRepaired event (and a warning) per repair made, and
  // per failure that is new (a failure that persists is reported once, not at every audit);
  // each network's state follows: "failed" with the reason while a step of it fails, "ready"
  // otherwise.
  void record_repairs(const std::vector<network::Repair>& repairs) {
    std::set<std::string> failing;
    std::vector<network::Repair> report;
    for (const auto& r : repairs) {
      if (r.failed) {
        const std::string key = r.object + "\n" + r.what;
        failing.insert(key);
        if (failing_.count(key)) continue;
      }
      report.push_back(r);
    }
    failing_ = std::move(failing);
    for (const auto& entry : networks_) {
      const std::string& name = entry.first;
      if (entry.second.deleting) continue;
      const auto bad = std::find_if(repairs.begin(), repairs.end(), [&](const network::Repair& r) {
        return r.failed && r.network == name;
      });
      if (bad != repairs.end()) {
        record_network_state(name, "failed", bad->object + " " + bad->what);
      } else {
        record_network_state(name, "ready", "built on the host");
      }
    }
    record_event_of_repairs(report);
  }

  // One NetworkRepaired event and a warning per entry, in one transaction.
  void record_event_of_repairs(const std::vector<network::Repair>& report) {
    if (report.empty()) return;
    std::vector<EventRecord> events;
    const Status c = commit(
        [&](StateTxn& txn) -> Status {
          for (const network::Repair& r : report) {
            json payload = {{"object", r.object}, {"what", r.what}};
            if (!r.network.empty()) payload["network"] = r.network;
            if (r.failed) payload["failed"] = true;
            NM_RETURN_IF_ERROR(append(txn, "NetworkRepaired", r.object, payload, events));
          }
          return Status::ok();
        },
        events);
    for (const network::Repair& r : report) log_->warn("network repair: {} {}", r.object, r.what);
    if (!c.is_ok()) {
      log_->error("recording {} network repairs: {}", report.size(), c.to_string());
      return;
    }
    publish(events);
  }

  ServiceDeps d_;
  ServiceOptions opt_;
  std::shared_ptr<spdlog::logger> log_;
  ServiceObserver* observer_ = nullptr;
  std::string domain_type_;
  // Set to false on destruction; callbacks posted from other threads check it.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);

  std::map<std::string, VmRecord> vms_;  // by id
  // Health: the model, each VM's crash history, VMs with a crash restart scheduled, the
  // heartbeat counter, and each image's size in GiB (capacity accounting).
  HealthModel health_;
  std::map<std::string, CrashHistory> crashes_;
  std::set<std::string> restart_pending_;
  std::set<std::string> guest_shutdown_;  // VMs whose guest announced a power-off (SHUTDOWN event)
  uint64_t heartbeat_seq_ = 0;
  bool health_flush_posted_ = false;
  bool probe_in_flight_ = false;
  bool starting_ = false;  // start()'s reconcile: VMs found down are restored, not "crashed"
  bool startup_reconcile_pending_ = false;  // libvirt was unreachable in start()
  std::string startup_error_;               // why the start-up reconcile waits
  bool startup_check_failed_ = false;       // it set the libvirt check failed
  bool events_while_pending_ = false;       // lifecycle events it ignored
  static constexpr std::chrono::milliseconds kStartupRetryFirst{250};
  static constexpr std::chrono::milliseconds kStartupRetryMax{8000};
  std::chrono::milliseconds startup_retry_ = kStartupRetryFirst;
  bool startup_retry_armed_ = false;
  mutable std::map<std::string, uint64_t> image_gib_;
  std::map<std::string, std::string> name_index_;  // name -> id
  std::map<uint32_t, std::unique_ptr<Job>> jobs_;
  std::map<std::string, std::deque<uint32_t>> queues_;  // key -> job ids, head runs
  std::set<std::string> reported_orphans_;
  uint64_t last_seq_ = 0;
  bool audit_in_flight_ = false;
  bool audit_again_ = false;                        // audit() was called while one was in flight
  std::optional<std::vector<PendingWrite>> batch_;  // open while a job completes
  // Group commit: functions waiting for the store to be durable up to `seq` (its written_seq()
  // when they were held), oldest first; one sync is scheduled while any wait.
  struct Held {
    uint64_t seq;
    std::function<void()> fn;
  };
  std::deque<Held> held_;
  bool sync_scheduled_ = false;
  bool stopping_ = false;          // release_held() ran: held jobs are not started any more
  uint64_t durable_last_seq_ = 0;  // last_seq_ as of the last successful sync
  // Per VM (or orphan uuid): epoch_counter_ at the last job enqueue/completion. A libvirt snapshot
  // taken before that is stale for the VM and must not drive the reconciler.
  std::map<std::string, uint64_t> epoch_;
  uint64_t epoch_counter_ = 0;
  // Client jobs a crash interrupted, by key, until the start-up reconcile adopted or ended them.
  std::map<std::string, std::vector<JobRecord>> interrupted_;

  std::map<std::string, NetworkRecord> networks_;         // by name
  std::map<std::string, std::vector<PortRecord>> ports_;  // by VM id, in spec order
  // Serializes every call into TenantNetworks (it runs on worker threads, one at a time).
  std::mutex net_mu_;
  // Bumped (on the loop) whenever the desired networks or ports change; read by audit workers.
  std::atomic<uint64_t> net_epoch_{0};
  bool net_audit_in_flight_ = false;
  // Failed repairs of the last reconcile ("object\nwhat"), so a persisting failure is reported
  // once.
  std::set<std::string> failing_;

  // Image digests held by jobs on workers (Lease), so GC leaves them alone.
  mutable std::mutex lease_mu_;
  std::map<std::string, int> leases_;
};

}  // namespace

std::unique_ptr<NodeService> make_node_service(ServiceDeps deps, ServiceOptions options) {
  return std::make_unique<NodeServiceImpl>(deps, std::move(options));
}

}  // namespace nm
