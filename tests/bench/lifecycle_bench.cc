// lifecycle_bench: nodemanagerd's VM lifecycle and ListVms next to libvirt-dbus on one private bus.
//
//   lifecycle_bench --bus ADDRESS [--cycles 500] [--list-vms 20] [--list-iterations 2000]
//                   [--floor-iterations 2000] [--warmup 10] [--burst 20] [--json] [--strict]
//
// Expects on the bus: org.nodemanager.NodeManager1 (nodemanagerd on test:///default),
// org.libvirt (libvirt-dbus, object /org/libvirt/Test) and org.nodemanager.BenchFloor
// (bench_floor_server, started with --sync-file). tests/bench/run-bench.sh starts all three;
// docs/benchmarks.md records results.
//
// Next to the cycles it measures what a durable cycle must cost here at least (the "durable
// floors"): the same four libvirt calls libvirt-dbus makes, done in this process on its own
// test:///default connection (no bus, nothing durable), plus four round trips to the floor server
// whose replies wait for one durable 4 KiB write each (SyncPing(1)), or for two in a row
// (SyncPing(2): nodemanagerd's rule, a step's request durable before it is acted on and its
// outcome durable before it is reported).
//
// Exit status: 0 when every measurement ran (targets are reported, not enforced), 1 when a call
// failed, 2 on bad usage, 3 with --strict when a target was missed.
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "args.h"
#include "bench_bus.h"
#include "nm/core/fs.h"
#include "stats.h"

namespace nm::bench {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr const char* kNmService = "org.nodemanager.NodeManager1";
constexpr const char* kNmPath = "/org/nodemanager/NodeManager1";
constexpr const char* kNmManager = "org.nodemanager.NodeManager1.Manager";
constexpr const char* kLvService = "org.libvirt";
constexpr const char* kLvConnectPath = "/org/libvirt/Test";
constexpr const char* kLvConnect = "org.libvirt.Connect";
constexpr const char* kLvDomain = "org.libvirt.Domain";
constexpr const char* kFloorService = "org.nodemanager.BenchFloor";
constexpr const char* kFloorPath = "/org/nodemanager/BenchFloor";
constexpr const char* kFloorInterface = "org.nodemanager.BenchFloor";

constexpr double kListVmsFloorFactor = 1.25;
constexpr auto kJobTimeout = 60s;
constexpr std::size_t kImageBytes = 1 << 20;
constexpr const char* kImageName = "bench:1";

struct Options {
  std::string bus;
  int cycles = 500;
  int list_vms = 20;
  int list_iterations = 2000;
  int floor_iterations = 2000;
  int warmup = 10;
  int burst = 20;
  bool json = false;
  bool strict = false;
};

// One method call on `bus`; the reply, or the D-Bus error as a Status named after `member`.
template <typename... Args>
Result<MessagePtr> call(sd_bus* bus, const char* service, const char* path, const char* interface,
                        const char* member, const char* types, Args... args) {
  BusError error;
  sd_bus_message* reply = nullptr;
  const int r = sd_bus_call_method(bus, service, path, interface, member, error.get(), &reply,
                                   types, args...);
  if (r < 0) return bus_status(r, error.get(), member);
  return MessagePtr(reply);
}

Result<std::string> read_object_path(sd_bus_message* reply, std::string_view what) {
  const char* path = nullptr;
  const int r = sd_bus_message_read(reply, "o", &path);
  if (r < 0) return bus_status(r, nullptr, std::string(what) + " reply");
  return std::string(path);
}

// Reads every (id, name, tenant, state, generation, observed_generation) row of a ListVms-shaped
// reply; returns how many there were.
Result<std::size_t> read_vm_rows(sd_bus_message* reply, std::string_view what) {
  int r = sd_bus_message_enter_container(reply, 'a', "(sssstt)");
  if (r < 0) return bus_status(r, nullptr, std::string(what) + " reply");
  std::size_t n = 0;
  for (;;) {
    const char *id, *name, *tenant, *state;
    uint64_t generation, observed;
    r = sd_bus_message_read(reply, "(sssstt)", &id, &name, &tenant, &state, &generation, &observed);
    if (r < 0) return bus_status(r, nullptr, std::string(what) + " row");
    if (r == 0) break;
    ++n;
  }
  return n;
}

// --- nodemanagerd -------------------------------------------------------------------------------

// How a job ended, from its JobRemoved signal.
struct JobOutcome {
  std::string result;
  std::string error_name;
  std::string error_message;
};

// nodemanagerd's Manager interface, plus the JobRemoved bookkeeping that job-starting calls need.
// subscribe() must run before the first job-starting call so no JobRemoved can be missed.
class NodeManagerClient {
 public:
  explicit NodeManagerClient(sd_bus* bus) : bus_(bus) {}

  Status subscribe() {
    sd_bus_slot* slot = nullptr;
    const int r = sd_bus_add_match(bus_, &slot,
                                   "type='signal',path='/org/nodemanager/NodeManager1',"
                                   "interface='org.nodemanager.NodeManager1.Manager',"
                                   "member='JobRemoved'",
                                   &NodeManagerClient::on_job_removed, this);
    if (r < 0) return bus_status(r, nullptr, "adding the JobRemoved match");
    match_.reset(slot);
    return Status::ok();
  }

  // CreateVm -> (vm id, job path).
  Result<std::pair<std::string, std::string>> create_vm(const std::string& spec_json) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus_, kNmService, kNmPath, kNmManager, "CreateVm",
                                               "ss", spec_json.c_str(), ""));
    const char* id = nullptr;
    const char* vm = nullptr;
    const char* job = nullptr;
    const int r = sd_bus_message_read(reply.get(), "soo", &id, &vm, &job);
    if (r < 0) return bus_status(r, nullptr, "CreateVm reply");
    return std::make_pair(std::string(id), std::string(job));
  }

  Result<std::string> start_vm(const std::string& vm) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus_, kNmService, kNmPath, kNmManager, "StartVm",
                                               "ss", vm.c_str(), ""));
    return read_object_path(reply.get(), "StartVm");
  }

  Result<std::string> stop_vm(const std::string& vm, bool force) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus_, kNmService, kNmPath, kNmManager, "StopVm",
                                               "sbs", vm.c_str(), force ? 1 : 0, ""));
    return read_object_path(reply.get(), "StopVm");
  }

  Result<std::string> delete_vm(const std::string& vm) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus_, kNmService, kNmPath, kNmManager, "DeleteVm",
                                               "ss", vm.c_str(), ""));
    return read_object_path(reply.get(), "DeleteVm");
  }

  Result<std::string> import_image(const std::string& image, int fd, const std::string& sha256) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply,
                        call(bus_, kNmService, kNmPath, kNmManager, "ImportImage", "shssss",
                             image.c_str(), fd, sha256.c_str(), "disk", "", ""));
    return read_object_path(reply.get(), "ImportImage");
  }

  // ListVms("") -> the number of VMs, every row read.
  Result<std::size_t> list_vms() {
    NM_ASSIGN_OR_RETURN(MessagePtr reply,
                        call(bus_, kNmService, kNmPath, kNmManager, "ListVms", "s", ""));
    return read_vm_rows(reply.get(), "ListVms");
  }

  // Whether the JobRemoved of `job` has been seen (without waiting); an error when it ended other
  // than "done".
  Result<bool> job_ended(const std::string& job) {
    auto it = removed_.find(job);
    if (it == removed_.end()) return false;
    JobOutcome outcome = std::move(it->second);
    removed_.erase(it);
    if (outcome.result == "done") return true;
    return internal_error("job '" + job + "' ended '" + outcome.result +
                          "': " + outcome.error_name + ": " + outcome.error_message);
  }

  // Waits until the JobRemoved of `job` has been seen; OK when its result is "done".
  Status wait_job(const std::string& job) {
    const auto deadline = Clock::now() + kJobTimeout;
    for (;;) {
      if (auto it = removed_.find(job); it != removed_.end()) {
        JobOutcome outcome = std::move(it->second);
        removed_.erase(it);
        if (outcome.result == "done") return Status::ok();
        return internal_error("job '" + job + "' ended '" + outcome.result +
                              "': " + outcome.error_name + ": " + outcome.error_message);
      }
      int r = sd_bus_process(bus_, nullptr);
      if (r < 0) return bus_status(r, nullptr, "processing the bus");
      if (r > 0) continue;
      const auto now = Clock::now();
      if (now >= deadline) return unavailable("no JobRemoved for '" + job + "' within 60s");
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - now);
      r = sd_bus_wait(bus_, static_cast<uint64_t>(left.count()));
      if (r < 0) return bus_status(r, nullptr, "waiting on the bus");
    }
  }

 private:
  static int on_job_removed(sd_bus_message* m, void* userdata, sd_bus_error* /*error*/) noexcept {
    auto* self = static_cast<NodeManagerClient*>(userdata);
    uint64_t seq = 0;
    uint32_t job_id = 0;
    const char *job, *kind, *object_id, *result, *error_name, *error_message;
    const int r = sd_bus_message_read(m, "tuosssss", &seq, &job_id, &job, &kind, &object_id,
                                      &result, &error_name, &error_message);
    if (r < 0) return 0;
    try {
      self->removed_[job] = JobOutcome{result, error_name, error_message};
    } catch (...) {
      return -ENOMEM;
    }
    return 0;
  }

  sd_bus* bus_;
  SlotPtr match_;
  std::unordered_map<std::string, JobOutcome> removed_;
};

// --- libvirt-dbus -------------------------------------------------------------------------------

class LibvirtDbusClient {
 public:
  explicit LibvirtDbusClient(sd_bus* bus) : bus_(bus) {}

  // DomainDefineXML -> the domain's object path.
  Result<std::string> define(const std::string& xml) {
    NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus_, kLvService, kLvConnectPath, kLvConnect,
                                               "DomainDefineXML", "s", xml.c_str()));
    return read_object_path(reply.get(), "DomainDefineXML");
  }

  // Create, Destroy or Undefine (flags 0) on the domain at `path`.
  Status domain(const std::string& path, const char* member) {
    auto reply = call(bus_, kLvService, path.c_str(), kLvDomain, member, "u", 0u);
    return reply.status();
  }

  // ListDomains(0) -> the number of domains, every path read.
  Result<std::size_t> list_domains() {
    NM_ASSIGN_OR_RETURN(MessagePtr reply,
                        call(bus_, kLvService, kLvConnectPath, kLvConnect, "ListDomains", "u", 0u));
    int r = sd_bus_message_enter_container(reply.get(), 'a', "o");
    if (r < 0) return bus_status(r, nullptr, "ListDomains reply");
    std::size_t n = 0;
    for (;;) {
      const char* path = nullptr;
      r = sd_bus_message_read(reply.get(), "o", &path);
      if (r < 0) return bus_status(r, nullptr, "ListDomains row");
      if (r == 0) break;
      ++n;
    }
    return n;
  }

 private:
  sd_bus* bus_;
};

std::string test_domain_xml(const std::string& name) {
  return "<domain type='test'><name>" + name +
         "</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>"
         "<os><type arch='x86_64'>hvm</type></os></domain>";
}

Status ping_floor(sd_bus* bus) {
  return call(bus, kFloorService, kFloorPath, kFloorInterface, "Ping", "").status();
}

// A round trip whose reply waits for `syncs` durable 4 KiB writes in a row (bench_floor_server
// --sync-file).
Status sync_ping_floor(sd_bus* bus, uint32_t syncs) {
  return call(bus, kFloorService, kFloorPath, kFloorInterface, "SyncPing", "u", syncs).status();
}

// libvirt's test driver in this process: the libvirt work of a cycle without any bus or daemon.
class LibvirtDirect {
 public:
  LibvirtDirect() = default;
  LibvirtDirect(const LibvirtDirect&) = delete;
  LibvirtDirect& operator=(const LibvirtDirect&) = delete;
  ~LibvirtDirect() {
    if (conn_ != nullptr) virConnectClose(conn_);
  }

  Status open() {
    conn_ = virConnectOpen("test:///default");
    return conn_ != nullptr ? Status::ok() : failure("virConnectOpen(test:///default)");
  }

  // DefineXML, Create, Destroy, Undefine of one domain.
  Status cycle(const std::string& xml) {
    virDomainPtr dom = virDomainDefineXML(conn_, xml.c_str());
    if (dom == nullptr) return failure("virDomainDefineXML");
    Status s = Status::ok();
    if (virDomainCreate(dom) < 0) {
      s = failure("virDomainCreate");
    } else if (virDomainDestroy(dom) < 0) {
      s = failure("virDomainDestroy");
    }
    if (virDomainUndefine(dom) < 0 && s.is_ok()) s = failure("virDomainUndefine");
    virDomainFree(dom);
    return s;
  }

 private:
  static Status failure(const char* what) {
    const char* message = virGetLastErrorMessage();
    return internal_error(std::string(what) + ": " + (message != nullptr ? message : "failed"));
  }

  virConnectPtr conn_ = nullptr;
};

// The floor server's List: `n` rows shaped like ListVms's, read like them.
Result<std::size_t> list_floor(sd_bus* bus, const std::string& prefix, int n) {
  NM_ASSIGN_OR_RETURN(MessagePtr reply, call(bus, kFloorService, kFloorPath, kFloorInterface,
                                             "List", "su", prefix.c_str(), uint32_t(n)));
  return read_vm_rows(reply.get(), "floor List");
}

// --- the image nodemanagerd's VMs are made from -------------------------------------------------

struct EvpMdCtxFree {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};

Result<std::string> sha256_hex(std::string_view data) {
  std::unique_ptr<EVP_MD_CTX, EvpMdCtxFree> ctx(EVP_MD_CTX_new());
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1 ||
      EVP_DigestUpdate(ctx.get(), data.data(), data.size()) != 1 ||
      EVP_DigestFinal_ex(ctx.get(), md.data(), &len) != 1) {
    return internal_error("sha256 failed");
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[md[i] >> 4];
    hex += kHex[md[i] & 0xf];
  }
  return hex;
}

// Imports a 1 MiB raw disk image as 'bench:1' through a memfd; an image already there is fine.
Status import_bench_image(NodeManagerClient& nm) {
  std::string content(kImageBytes, '\0');
  for (std::size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>((i * 131) % 251);
  NM_ASSIGN_OR_RETURN(std::string digest, sha256_hex(content));
  UniqueFd fd(memfd_create("bench-image", MFD_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "memfd_create");
  std::size_t off = 0;
  while (off < content.size()) {
    const ssize_t w = ::write(fd.get(), content.data() + off, content.size() - off);
    if (w < 0) return errno_status(errno, "writing the bench image");
    off += static_cast<std::size_t>(w);
  }
  if (::lseek(fd.get(), 0, SEEK_SET) < 0) return errno_status(errno, "lseek");
  auto job = nm.import_image(kImageName, fd.get(), digest);
  if (!job.is_ok()) {
    if (job.status().code() == Code::kAlreadyExists) return Status::ok();
    return job.status();
  }
  return nm.wait_job(*job);
}

// --- the measurements ---------------------------------------------------------------------------

// Call latency (method call to reply) and job latency (reply to JobRemoved) of one step.
struct StepSamples {
  Samples call;
  Samples job;
};

struct Report {
  std::vector<std::pair<std::string, Summary>> rows;
  struct Target {
    std::string name;
    double value_ms;
    double limit_ms;
    bool pass;
    std::string detail;
  };
  std::vector<Target> targets;
  std::vector<std::string> notes;  // context for the targets, not judged
  std::size_t nm_listed = 0;
  std::size_t lv_listed = 0;
  std::size_t floor_listed = 0;

  void add(std::string name, const Samples& s) {
    rows.emplace_back(std::move(name), s.summarize());
  }
  const Summary& get(std::string_view name) const {
    for (const auto& [n, s] : rows) {
      if (n == name) return s;
    }
    static const Summary kEmpty;
    return kEmpty;
  }
};

class Bench {
 public:
  Bench(const Options& opts, sd_bus* bus) : opts_(opts), bus_(bus), nm_(bus), lv_(bus) {}

  Result<Report> run() {
    NM_RETURN_IF_ERROR(nm_.subscribe());
    NM_RETURN_IF_ERROR(import_bench_image(nm_).with_context("importing the bench image"));
    NM_RETURN_IF_ERROR(direct_.open());
    tag_ = std::to_string(::getpid());

    Report report;
    NM_RETURN_IF_ERROR(measure_floor(report));
    NM_RETURN_IF_ERROR(measure_cycles(report));
    NM_RETURN_IF_ERROR(measure_lists(report));
    if (opts_.burst > 0) NM_RETURN_IF_ERROR(measure_burst(report));
    judge(report);
    return report;
  }

 private:
  // `call` back to back: `warmup` times untimed, then `n` times, each call one sample.
  static Result<Samples> back_to_back(int warmup, int n, const std::function<Status()>& call) {
    Samples out;
    for (int i = 0; i < warmup + n; ++i) {
      const auto t0 = Clock::now();
      NM_RETURN_IF_ERROR(call());
      if (i >= warmup) out.add(Clock::now() - t0);
    }
    return out;
  }

  Status measure_floor(Report& report) {
    NM_ASSIGN_OR_RETURN(
        Samples floor, back_to_back(100, opts_.floor_iterations, [&] { return ping_floor(bus_); }));
    report.add("floor Ping (alone)", floor);
    return Status::ok();
  }

  // Times `start` (a job-starting call) and the wait for its JobRemoved.
  Status timed_job(const std::function<Result<std::string>()>& start, StepSamples* into) {
    const auto t0 = Clock::now();
    NM_ASSIGN_OR_RETURN(std::string job, start());
    const auto t1 = Clock::now();
    NM_RETURN_IF_ERROR(nm_.wait_job(job));
    if (into != nullptr) {
      into->call.add(t1 - t0);
      into->job.add(Clock::now() - t1);
    }
    return Status::ok();
  }

  Status nm_cycle(int i, bool record) {
    const std::string spec = R"({"name":"bench-)" + tag_ + "-" + std::to_string(i) +
                             R"(","tenant":"bench","vcpus":1,"memory_mib":128,"image":"bench:1"})";
    std::string id;
    const auto t0 = Clock::now();
    NM_RETURN_IF_ERROR(timed_job(
        [&]() -> Result<std::string> {
          NM_ASSIGN_OR_RETURN(auto created, nm_.create_vm(spec));
          id = created.first;
          return created.second;
        },
        record ? &nm_steps_[0] : nullptr));
    NM_RETURN_IF_ERROR(
        timed_job([&] { return nm_.start_vm(id); }, record ? &nm_steps_[1] : nullptr));
    NM_RETURN_IF_ERROR(
        timed_job([&] { return nm_.stop_vm(id, true); }, record ? &nm_steps_[2] : nullptr));
    NM_RETURN_IF_ERROR(
        timed_job([&] { return nm_.delete_vm(id); }, record ? &nm_steps_[3] : nullptr));
    if (record) nm_cycle_.add(Clock::now() - t0);
    return Status::ok();
  }

  Status lv_cycle(int i, bool record) {
    const std::string xml = test_domain_xml("lvd-bench-" + tag_ + "-" + std::to_string(i));
    const auto t0 = Clock::now();
    NM_ASSIGN_OR_RETURN(std::string path, lv_.define(xml));
    const auto t1 = Clock::now();
    NM_RETURN_IF_ERROR(lv_.domain(path, "Create"));
    const auto t2 = Clock::now();
    NM_RETURN_IF_ERROR(lv_.domain(path, "Destroy"));
    const auto t3 = Clock::now();
    NM_RETURN_IF_ERROR(lv_.domain(path, "Undefine"));
    const auto t4 = Clock::now();
    if (record) {
      lv_steps_[0].add(t1 - t0);
      lv_steps_[1].add(t2 - t1);
      lv_steps_[2].add(t3 - t2);
      lv_steps_[3].add(t4 - t3);
      lv_cycle_.add(t4 - t0);
    }
    return Status::ok();
  }

  // The durable floors' parts, one sample each per iteration; a floor adds the libvirt calls of
  // an iteration to its four SyncPings of the same iteration.
  Status floor_cycle(int i, bool record) {
    const std::string xml = test_domain_xml("direct-bench-" + tag_ + "-" + std::to_string(i));
    const auto t0 = Clock::now();
    NM_RETURN_IF_ERROR(direct_.cycle(xml));
    const auto t1 = Clock::now();
    for (int k = 0; k < 4; ++k) NM_RETURN_IF_ERROR(sync_ping_floor(bus_, 1));
    const auto t2 = Clock::now();
    for (int k = 0; k < 4; ++k) NM_RETURN_IF_ERROR(sync_ping_floor(bus_, 2));
    const auto t3 = Clock::now();
    if (record) {
      direct_cycle_.add(t1 - t0);
      sync_pings_[0].add(t2 - t1);
      sync_pings_[1].add(t3 - t2);
      durable_floors_[0].add((t1 - t0) + (t2 - t1));
      durable_floors_[1].add((t1 - t0) + (t3 - t2));
    }
    return Status::ok();
  }

  // nodemanagerd and libvirt-dbus cycles and the durable floor interleaved, so all see the same
  // machine noise.
  Status measure_cycles(Report& report) {
    for (int i = 0; i < opts_.warmup + opts_.cycles; ++i) {
      const bool record = i >= opts_.warmup;
      NM_RETURN_IF_ERROR(
          nm_cycle(i, record).with_context("nodemanagerd cycle " + std::to_string(i)));
      NM_RETURN_IF_ERROR(
          lv_cycle(i, record).with_context("libvirt-dbus cycle " + std::to_string(i)));
      NM_RETURN_IF_ERROR(floor_cycle(i, record).with_context("durable floor " + std::to_string(i)));
    }
    static constexpr std::array<const char*, 4> kNmSteps{"CreateVm", "StartVm", "StopVm(force)",
                                                         "DeleteVm"};
    static constexpr std::array<const char*, 4> kLvSteps{"DomainDefineXML", "Create", "Destroy",
                                                         "Undefine"};
    report.add("nodemanagerd cycle", nm_cycle_);
    for (std::size_t s = 0; s < kNmSteps.size(); ++s) {
      report.add(std::string("  ") + kNmSteps[s] + " call->reply", nm_steps_[s].call);
      report.add(std::string("  ") + kNmSteps[s] + " reply->JobRemoved", nm_steps_[s].job);
    }
    report.add("libvirt-dbus cycle", lv_cycle_);
    for (std::size_t s = 0; s < kLvSteps.size(); ++s) {
      report.add(std::string("  ") + kLvSteps[s], lv_steps_[s]);
    }
    report.add("durable floor, 1 sync per step", durable_floors_[0]);
    report.add("durable floor, 2 syncs per step", durable_floors_[1]);
    report.add("  libvirt calls in-process", direct_cycle_);
    report.add("  4 x SyncPing(1)", sync_pings_[0]);
    report.add("  4 x SyncPing(2)", sync_pings_[1]);
    return Status::ok();
  }

  // With list_vms VMs defined on each side: ListVms, ListDomains and the floor Ping interleaved,
  // then ListVms and ListDomains each back to back (like "floor Ping (alone)").
  Status measure_lists(Report& report) {
    std::vector<std::string> nm_ids;
    std::vector<std::string> lv_paths;
    for (int i = 0; i < opts_.list_vms; ++i) {
      const std::string spec =
          R"({"name":"list-)" + tag_ + "-" + std::to_string(i) +
          R"(","tenant":"bench","vcpus":1,"memory_mib":128,"image":"bench:1"})";
      NM_ASSIGN_OR_RETURN(auto created, nm_.create_vm(spec));
      NM_RETURN_IF_ERROR(nm_.wait_job(created.second));
      nm_ids.push_back(created.first);
      NM_ASSIGN_OR_RETURN(std::string path, lv_.define(test_domain_xml("lvd-list-" + tag_ + "-" +
                                                                       std::to_string(i))));
      lv_paths.push_back(path);
    }
    NM_ASSIGN_OR_RETURN(report.nm_listed, nm_.list_vms());
    NM_ASSIGN_OR_RETURN(report.lv_listed, lv_.list_domains());
    const auto want = static_cast<std::size_t>(opts_.list_vms);
    if (report.nm_listed < want) {
      return internal_error("ListVms returned " + std::to_string(report.nm_listed) +
                            " VMs, expected at least " + std::to_string(want));
    }
    if (report.lv_listed < want) {
      return internal_error("ListDomains returned " + std::to_string(report.lv_listed) +
                            " domains, expected at least " + std::to_string(want));
    }

    // The floor server's List returns as many rows of the same shape and size as ListVms.
    const std::string floor_prefix = "list-" + tag_;
    NM_ASSIGN_OR_RETURN(report.floor_listed, list_floor(bus_, floor_prefix, opts_.list_vms));
    if (report.floor_listed != want) {
      return internal_error("the floor's List returned " + std::to_string(report.floor_listed) +
                            " rows, expected " + std::to_string(want));
    }
    Samples floor, floor_list, list_vms, list_domains;
    for (int i = 0; i < opts_.warmup * 10 + opts_.list_iterations; ++i) {
      const bool record = i >= opts_.warmup * 10;
      auto t0 = Clock::now();
      NM_RETURN_IF_ERROR(ping_floor(bus_));
      auto t1 = Clock::now();
      NM_RETURN_IF_ERROR(nm_.list_vms().status());
      auto t2 = Clock::now();
      NM_RETURN_IF_ERROR(lv_.list_domains().status());
      auto t3 = Clock::now();
      NM_RETURN_IF_ERROR(list_floor(bus_, floor_prefix, opts_.list_vms).status());
      auto t4 = Clock::now();
      if (record) {
        floor.add(t1 - t0);
        list_vms.add(t2 - t1);
        list_domains.add(t3 - t2);
        floor_list.add(t4 - t3);
      }
    }
    report.add("floor Ping (with lists)", floor);
    report.add("floor List, same rows (with lists)", floor_list);
    report.add("nodemanagerd ListVms", list_vms);
    report.add("libvirt-dbus ListDomains", list_domains);

    const int warm = opts_.warmup * 10;
    NM_ASSIGN_OR_RETURN(Samples list_vms_alone, back_to_back(warm, opts_.list_iterations, [&] {
                          return nm_.list_vms().status();
                        }));
    NM_ASSIGN_OR_RETURN(Samples list_domains_alone, back_to_back(warm, opts_.list_iterations, [&] {
                          return lv_.list_domains().status();
                        }));
    NM_ASSIGN_OR_RETURN(Samples floor_list_alone, back_to_back(warm, opts_.list_iterations, [&] {
                          return list_floor(bus_, floor_prefix, opts_.list_vms).status();
                        }));
    report.add("floor List, same rows (alone)", floor_list_alone);
    report.add("nodemanagerd ListVms (alone)", list_vms_alone);
    report.add("libvirt-dbus ListDomains (alone)", list_domains_alone);

    for (const auto& id : nm_ids) {
      NM_ASSIGN_OR_RETURN(std::string job, nm_.delete_vm(id));
      NM_RETURN_IF_ERROR(nm_.wait_job(job));
    }
    for (const auto& path : lv_paths) NM_RETURN_IF_ERROR(lv_.domain(path, "Undefine"));
    return Status::ok();
  }

  // GetHealth, on a connection of its own, while `burst` VMs are created, then started, stopped
  // and deleted all at once (each step's calls sent together, then their jobs awaited; five
  // rounds): does the bus answer while work is under way? Next to it, GetHealth on an idle daemon.
  Status measure_burst(Report& report) {
    NM_ASSIGN_OR_RETURN(BusPtr probe, connect_bus(opts_.bus));
    const auto get_health = [&]() -> Status {
      return call(probe.get(), kNmService, kNmPath, kNmManager, "GetHealth", "").status();
    };
    NM_ASSIGN_OR_RETURN(Samples idle, back_to_back(100, opts_.floor_iterations, get_health));
    report.add("GetHealth (idle)", idle);

    static constexpr std::array<const char*, 4> kSteps{"CreateVm", "StartVm", "StopVm(force)",
                                                       "DeleteVm"};
    static constexpr int kRounds = 5;
    Samples during;
    std::array<Samples, kSteps.size()> walls;
    for (int round = 0; round < kRounds; ++round) {
      std::vector<std::string> ids(static_cast<std::size_t>(opts_.burst));
      for (std::size_t step = 0; step < kSteps.size(); ++step) {
        std::vector<AsyncCall> calls(ids.size());
        const auto t0 = Clock::now();
        for (std::size_t i = 0; i < ids.size(); ++i) {
          NM_RETURN_IF_ERROR(send_burst_call(step, round, i, ids, &calls[i]));
        }
        std::size_t ended = 0;
        while (ended < calls.size()) {
          if (Clock::now() - t0 > kJobTimeout) {
            return unavailable(std::string("burst ") + kSteps[step] + ": not done within 60s");
          }
          const auto h0 = Clock::now();
          NM_RETURN_IF_ERROR(get_health());
          during.add(Clock::now() - h0);
          for (;;) {
            const int r = sd_bus_process(bus_, nullptr);
            if (r < 0) return bus_status(r, nullptr, "processing the bus");
            if (r == 0) break;
          }
          ended = 0;
          for (std::size_t i = 0; i < calls.size(); ++i) {
            AsyncCall& c = calls[i];
            if (!c.error.empty()) {
              return internal_error(std::string(kSteps[step]) + ": " + c.error);
            }
            if (!c.ended && !c.job.empty()) {
              NM_ASSIGN_OR_RETURN(c.ended, nm_.job_ended(c.job));
            }
            if (c.ended) {
              if (step == 0) ids[i] = c.vm_id;
              ++ended;
            }
          }
        }
        walls[step].add(Clock::now() - t0);
      }
    }
    for (std::size_t step = 0; step < kSteps.size(); ++step) {
      report.add(std::to_string(opts_.burst) + " x " + kSteps[step] + " at once, all ended",
                 walls[step]);
    }
    report.add("GetHealth while they run", during);
    return Status::ok();
  }

  // One job-starting call of a burst in flight: its reply fills job (or error).
  struct AsyncCall {
    SlotPtr slot;
    std::string vm_id;
    std::string job;
    std::string error;
    bool ended = false;
  };

  static int on_burst_reply(sd_bus_message* m, void* userdata, sd_bus_error* /*error*/) noexcept {
    auto* c = static_cast<AsyncCall*>(userdata);
    try {
      if (const sd_bus_error* e = sd_bus_message_get_error(m); e != nullptr) {
        c->error = std::string(e->name) + ": " + (e->message != nullptr ? e->message : "");
        return 0;
      }
      const char* id = nullptr;
      const char* vm = nullptr;
      const char* job = nullptr;
      const bool create = sd_bus_message_has_signature(m, "soo") > 0;
      const int r = create ? sd_bus_message_read(m, "soo", &id, &vm, &job)
                           : sd_bus_message_read(m, "o", &job);
      if (r < 0) {
        c->error = "unreadable reply";
        return 0;
      }
      if (id != nullptr) c->vm_id = id;
      c->job = job;
    } catch (...) {
      c->error = "out of memory";
    }
    return 0;
  }

  Status send_burst_call(std::size_t step, int round, std::size_t i,
                         const std::vector<std::string>& ids, AsyncCall* c) {
    sd_bus_slot* slot = nullptr;
    int r = 0;
    if (step == 0) {
      const std::string spec =
          R"({"name":"burst-)" + tag_ + "-" + std::to_string(round) + "-" + std::to_string(i) +
          R"(","tenant":"bench","vcpus":1,"memory_mib":128,"image":"bench:1"})";
      r = sd_bus_call_method_async(bus_, &slot, kNmService, kNmPath, kNmManager, "CreateVm",
                                   on_burst_reply, c, "ss", spec.c_str(), "");
    } else if (step == 1) {
      r = sd_bus_call_method_async(bus_, &slot, kNmService, kNmPath, kNmManager, "StartVm",
                                   on_burst_reply, c, "ss", ids[i].c_str(), "");
    } else if (step == 2) {
      r = sd_bus_call_method_async(bus_, &slot, kNmService, kNmPath, kNmManager, "StopVm",
                                   on_burst_reply, c, "sbs", ids[i].c_str(), 1, "");
    } else {
      r = sd_bus_call_method_async(bus_, &slot, kNmService, kNmPath, kNmManager, "DeleteVm",
                                   on_burst_reply, c, "ss", ids[i].c_str(), "");
    }
    if (r < 0) return bus_status(r, nullptr, "sending a burst call");
    c->slot.reset(slot);
    return Status::ok();
  }

  static void judge(Report& report) {
    const Summary& nm_cycle = report.get("nodemanagerd cycle");
    const Summary& lv_cycle = report.get("libvirt-dbus cycle");
    report.targets.push_back({"cycle p50 <= libvirt-dbus cycle p50", nm_cycle.p50_ms,
                              lv_cycle.p50_ms, nm_cycle.p50_ms <= lv_cycle.p50_ms,
                              ratio_text(nm_cycle.p50_ms, lv_cycle.p50_ms, "libvirt-dbus")});
    for (const char* floor :
         {"durable floor, 1 sync per step", "durable floor, 2 syncs per step"}) {
      const Summary& s = report.get(floor);
      report.notes.push_back(
          std::string(floor) + ": p50 " + ms_text(s.p50_ms) + " ms (" +
          ratio_text(s.p50_ms, lv_cycle.p50_ms, "libvirt-dbus") +
          "): the cycle's libvirt calls and 4 durable round trips, nothing else");
    }
    // Interleaved: each server is woken once per iteration. Alone: back-to-back calls, all hot.
    const std::array<std::array<const char*, 3>, 2> kPairs{{
        {"ListVms p50 <= 1.25 x floor p50 (interleaved)", "nodemanagerd ListVms",
         "floor Ping (with lists)"},
        {"ListVms p50 <= 1.25 x floor p50 (alone)", "nodemanagerd ListVms (alone)",
         "floor Ping (alone)"},
    }};
    for (const auto& [name, list_row, floor_row] : kPairs) {
      const Summary& list = report.get(list_row);
      const Summary& floor = report.get(floor_row);
      const double limit = kListVmsFloorFactor * floor.p50_ms;
      report.targets.push_back({name, list.p50_ms, limit, list.p50_ms <= limit,
                                ratio_text(list.p50_ms, floor.p50_ms, "floor")});
    }
  }

  static std::string ms_text(double ms) {
    std::array<char, 32> buf{};
    std::snprintf(buf.data(), buf.size(), "%.3f", ms);
    return buf.data();
  }

  static std::string ratio_text(double value, double base, const char* base_name) {
    if (base <= 0) return "no baseline";
    std::array<char, 64> buf{};
    std::snprintf(buf.data(), buf.size(), "%.2fx %s", value / base, base_name);
    return buf.data();
  }

  const Options& opts_;
  sd_bus* bus_;
  NodeManagerClient nm_;
  LibvirtDbusClient lv_;
  std::string tag_;
  Samples nm_cycle_;
  std::array<StepSamples, 4> nm_steps_;
  Samples lv_cycle_;
  std::array<Samples, 4> lv_steps_;
  LibvirtDirect direct_;
  Samples direct_cycle_;
  std::array<Samples, 2> sync_pings_;
  std::array<Samples, 2> durable_floors_;
};

// --- output -------------------------------------------------------------------------------------

void print_table(const Options& opts, const Report& report) {
  std::printf("lifecycle_bench: %d cycles (+%d warm-up), %d list iterations with %d VMs defined\n",
              opts.cycles, opts.warmup, opts.list_iterations, opts.list_vms);
  std::printf("ListVms saw %zu VMs, ListDomains saw %zu domains\n\n", report.nm_listed,
              report.lv_listed);
  std::printf("%-40s %6s %9s %9s %9s\n", "measurement", "n", "p50 ms", "p99 ms", "mean ms");
  for (const auto& [name, s] : report.rows) {
    std::printf("%-40s %6zu %9.3f %9.3f %9.3f\n", name.c_str(), s.count, s.p50_ms, s.p99_ms,
                s.mean_ms);
  }
  std::printf("\n");
  for (const auto& t : report.targets) {
    std::printf("%s: %s: %.3f ms vs limit %.3f ms (%s)\n", t.pass ? "PASS" : "FAIL", t.name.c_str(),
                t.value_ms, t.limit_ms, t.detail.c_str());
  }
  for (const auto& note : report.notes) std::printf("NOTE: %s\n", note.c_str());
}

void print_json(const Options& opts, const Report& report) {
  nlohmann::ordered_json j;
  j["options"] = {{"cycles", opts.cycles},
                  {"warmup", opts.warmup},
                  {"list_vms", opts.list_vms},
                  {"list_iterations", opts.list_iterations},
                  {"floor_iterations", opts.floor_iterations},
                  {"burst", opts.burst}};
  j["listed"] = {{"nodemanagerd", report.nm_listed},
                 {"libvirt_dbus", report.lv_listed},
                 {"floor", report.floor_listed}};
  auto& rows = j["measurements"] = nlohmann::ordered_json::array();
  for (const auto& [name, s] : report.rows) {
    std::string trimmed = name;
    trimmed.erase(0, trimmed.find_first_not_of(' '));
    rows.push_back({{"name", trimmed},
                    {"n", s.count},
                    {"p50_ms", s.p50_ms},
                    {"p99_ms", s.p99_ms},
                    {"mean_ms", s.mean_ms},
                    {"min_ms", s.min_ms},
                    {"max_ms", s.max_ms}});
  }
  auto& targets = j["targets"] = nlohmann::ordered_json::array();
  for (const auto& t : report.targets) {
    targets.push_back({{"name", t.name},
                       {"value_ms", t.value_ms},
                       {"limit_ms", t.limit_ms},
                       {"pass", t.pass},
                       {"detail", t.detail}});
  }
  j["notes"] = report.notes;
  std::printf("%s\n", j.dump(2).c_str());
}

// --- arguments ----------------------------------------------------------------------------------

constexpr const char* kUsage =
    "usage: lifecycle_bench --bus ADDRESS [--cycles N] [--list-vms N] [--list-iterations N]\n"
    "                       [--floor-iterations N] [--warmup N] [--burst N] [--json] [--strict]\n";

// Parses argv into `opts`; false (after printing why) on bad usage.
bool parse_args(int argc, char** argv, Options* opts) {
  const std::map<std::string_view, std::pair<int*, int>> counts{
      {"--cycles", {&opts->cycles, 1}},
      {"--list-vms", {&opts->list_vms, 1}},
      {"--list-iterations", {&opts->list_iterations, 1}},
      {"--floor-iterations", {&opts->floor_iterations, 1}},
      {"--warmup", {&opts->warmup, 0}},
      {"--burst", {&opts->burst, 0}},
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--json") {
      opts->json = true;
    } else if (arg == "--strict") {
      opts->strict = true;
    } else if (arg == "--bus" && i + 1 < argc) {
      opts->bus = argv[++i];
    } else if (auto it = counts.find(arg); it != counts.end() && i + 1 < argc) {
      if (!bench::parse_number(argv[++i], it->second.second, it->second.first)) {
        std::fprintf(stderr, "lifecycle_bench: %s needs a number >= %d, got '%s'\n", argv[i - 1],
                     it->second.second, argv[i]);
        return false;
      }
    } else {
      std::fprintf(stderr, "lifecycle_bench: unknown or incomplete argument '%s'\n%s", argv[i],
                   kUsage);
      return false;
    }
  }
  if (opts->bus.empty()) {
    std::fprintf(stderr, "lifecycle_bench: --bus ADDRESS is required\n%s", kUsage);
    return false;
  }
  return true;
}

}  // namespace
}  // namespace nm::bench

int main(int argc, char** argv) {
  using namespace nm::bench;
  if (argc == 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h")) {
    std::printf("%s", kUsage);
    return 0;
  }
  Options opts;
  if (!parse_args(argc, argv, &opts)) return 2;
  auto bus = connect_bus(opts.bus);
  if (!bus.is_ok()) {
    std::fprintf(stderr, "lifecycle_bench: %s\n", bus.status().to_string().c_str());
    return 1;
  }
  Bench bench(opts, bus->get());
  auto report = bench.run();
  if (!report.is_ok()) {
    std::fprintf(stderr, "lifecycle_bench: %s\n", report.status().to_string().c_str());
    return 1;
  }
  if (opts.json) {
    print_json(opts, *report);
  } else {
    print_table(opts, *report);
  }
  bool all_pass = true;
  for (const auto& t : report->targets) all_pass = all_pass && t.pass;
  return opts.strict && !all_pass ? 3 : 0;
}
