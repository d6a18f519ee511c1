// SdEventLoop and DbusServer against a private dbus-daemon.
//
// Each server test starts its own dbus-daemon (generated session-like config in a temp dir),
// runs an SdEventLoop with a DbusServer over FakeNodeService on a thread, and talks to it through
// a client sd-bus connection from the test thread. Whatever touches the service or its observer
// runs on the loop thread (run_on_loop), as in the daemon.
//
// The contract test introspects the running server and compares every interface, member, argument
// and property with nodemanager/dbus/org.nodemanager.NodeManager1.xml.
#include "dbus_server.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "event_loop.h"
#include "nm/core/fs.h"
#include "nm/node_service.h"

extern char** environ;

namespace nm {
namespace {

using namespace std::chrono_literals;

constexpr auto kTimeout = 5s;
constexpr const char* kVmId = "3f1c2a4e-0b6d-4c1e-9a7f-5d2e8b9c0a11";
constexpr const char* kVmId2 = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d";

// ---------------------------------------------------------------------------------------------
// Small RAII helpers for the client side.

struct BusDeleter {
  void operator()(sd_bus* b) const { sd_bus_flush_close_unref(b); }
};
struct MessageDeleter {
  void operator()(sd_bus_message* m) const { sd_bus_message_unref(m); }
};
struct SlotDeleter {
  void operator()(sd_bus_slot* s) const { sd_bus_slot_unref(s); }
};
using BusPtr = std::unique_ptr<sd_bus, BusDeleter>;
using MessagePtr = std::unique_ptr<sd_bus_message, MessageDeleter>;
using SlotPtr = std::unique_ptr<sd_bus_slot, SlotDeleter>;

struct BusError {
  sd_bus_error e{};  // SD_BUS_ERROR_NULL without the C99 compound literal
  BusError() = default;
  BusError(const BusError&) = delete;
  BusError& operator=(const BusError&) = delete;
  ~BusError() { sd_bus_error_free(&e); }
  std::string name() const { return e.name != nullptr ? e.name : ""; }
  std::string message() const { return e.message != nullptr ? e.message : ""; }
};

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "nm-dbus-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A private dbus-daemon; killed by pid on destruction.
class PrivateBus {
 public:
  PrivateBus() {
    const std::string config = dir_.path() + "/bus.conf";
    std::ofstream(config) << "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus "
                             "Configuration 1.0//EN\"\n"
                             " \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n"
                             "<busconfig>\n  <type>session</type>\n"
                             "  <listen>unix:path="
                          << dir_.path()
                          << "/bus</listen>\n  <auth>EXTERNAL</auth>\n"
                             "  <policy context=\"default\">\n"
                             "    <allow send_destination=\"*\" eavesdrop=\"true\"/>\n"
                             "    <allow eavesdrop=\"true\"/>\n    <allow own=\"*\"/>\n"
                             "  </policy>\n</busconfig>\n";
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    UniqueFd read_end(fds[0]);
    UniqueFd write_end(fds[1]);

    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    // dup2 onto fd 3 clears FD_CLOEXEC there (also when write_end already is 3, glibc >= 2.29).
    posix_spawn_file_actions_adddup2(&actions, write_end.get(), 3);
    std::string config_arg = "--config-file=" + config;
    std::vector<char*> argv = {const_cast<char*>("dbus-daemon"), config_arg.data(),
                               const_cast<char*>("--nofork"),
                               const_cast<char*>("--print-address=3"), nullptr};
    const int err = posix_spawnp(&pid_, "dbus-daemon", &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    if (err != 0) throw std::runtime_error("spawning dbus-daemon failed");
    write_end = UniqueFd();

    // The daemon prints its address once it listens: wait for that line, not for a time.
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + kTimeout;
    while (line.find('\n') == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      pollfd p{read_end.get(), POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
        throw std::runtime_error("dbus-daemon did not print its address");
      }
      char buf[256];
      const ssize_t n = ::read(read_end.get(), buf, sizeof buf);
      if (n <= 0) throw std::runtime_error("dbus-daemon exited before printing its address");
      line.append(buf, static_cast<size_t>(n));
    }
    address_ = line.substr(0, line.find('\n'));
  }
  ~PrivateBus() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
  }
  PrivateBus(const PrivateBus&) = delete;
  PrivateBus& operator=(const PrivateBus&) = delete;
  const std::string& address() const { return address_; }

 private:
  TempDir dir_;
  pid_t pid_ = -1;
  std::string address_;
};

BusPtr connect_client(const std::string& address) {
  sd_bus* raw = nullptr;
  if (sd_bus_new(&raw) < 0) throw std::runtime_error("sd_bus_new failed");
  BusPtr bus(raw);
  if (sd_bus_set_address(raw, address.c_str()) < 0 || sd_bus_set_bus_client(raw, 1) < 0 ||
      sd_bus_negotiate_fds(raw, 1) < 0 || sd_bus_start(raw) < 0) {
    throw std::runtime_error("client connection to '" + address + "' failed");
  }
  return bus;
}

// ---------------------------------------------------------------------------------------------
// FakeNodeService: in memory, records calls, returns canned values or errors.

VmRecord make_vm(const std::string& id, const std::string& name, const std::string& tenant) {
  VmRecord vm;
  vm.id = VmId::trusted(id);
  vm.spec.id = vm.id;
  vm.spec.name = VmName::trusted(name);
  vm.spec.tenant = TenantId::trusted(tenant);
  vm.spec.vcpus = 2;
  vm.spec.memory_mib = 512;
  vm.spec.image = "busybox-guest:1";
  vm.power = PowerIntent::kRunning;
  vm.generation = 3;
  vm.observed_generation = 2;
  vm.state = "shutoff";
  vm.state_reason = "created";
  return vm;
}

// The properties a PropertiesChanged of `iface` names, with their values as text ("" for types
// other than s and t).
std::map<std::string, std::string> changed_properties(sd_bus_message* m, std::string_view iface) {
  std::map<std::string, std::string> changed;
  const char* got = nullptr;
  if (sd_bus_message_read(m, "s", &got) < 0 || iface != got) {
    ADD_FAILURE() << "PropertiesChanged of '" << (got != nullptr ? got : "?") << "', not " << iface;
    return changed;
  }
  if (sd_bus_message_enter_container(m, 'a', "{sv}") < 0) {
    ADD_FAILURE() << "PropertiesChanged without its a{sv}";
    return changed;
  }
  while (sd_bus_message_enter_container(m, 'e', "sv") > 0) {
    const char* name = nullptr;
    const char* contents = nullptr;
    if (sd_bus_message_read(m, "s", &name) < 0 ||
        sd_bus_message_peek_type(m, nullptr, &contents) < 0) {
      ADD_FAILURE() << "unreadable PropertiesChanged entry";
      return changed;
    }
    std::string value;
    int r = 0;
    if (std::string_view(contents) == "s") {
      const char* v = nullptr;
      r = sd_bus_message_read(m, "v", "s", &v);
      if (r >= 0) value = v;
    } else if (std::string_view(contents) == "t") {
      uint64_t v = 0;
      r = sd_bus_message_read(m, "v", "t", &v);
      value = std::to_string(v);
    } else {
      r = sd_bus_message_skip(m, "v");
    }
    if (r < 0 || sd_bus_message_exit_container(m) < 0) {
      ADD_FAILURE() << "unreadable value of " << name;
      return changed;
    }
    changed[name] = value;
  }
  return changed;
}

class FakeNodeService final : public NodeService {
 public:
  struct ImportCall {
    std::string image, content, sha256, kind, tenant, request_id;
    bool cloexec = false;
  };

  // ---- test controls (any thread) ----
  void add_vm(const VmRecord& vm) {
    std::lock_guard l(mu_);
    vms_[vm.id.str()] = vm;
  }
  void remove_vm(const std::string& id) {
    std::lock_guard l(mu_);
    vms_.erase(id);
  }
  void add_job(const JobView& job) {
    std::lock_guard l(mu_);
    jobs_[job.id] = job;
  }
  void remove_job(uint32_t id) {
    std::lock_guard l(mu_);
    jobs_.erase(id);
  }
  void add_event(const EventRecord& e) {
    std::lock_guard l(mu_);
    events_.push_back(e);
  }
  // The next service call fails with `s`.
  void fail_next(Status s) {
    std::lock_guard l(mu_);
    fail_next_ = std::move(s);
  }
  void throw_next() {
    std::lock_guard l(mu_);
    throw_next_ = true;
  }
  std::vector<std::string> calls() const {
    std::lock_guard l(mu_);
    return calls_;
  }
  std::optional<ImportCall> last_import() const {
    std::lock_guard l(mu_);
    return last_import_;
  }
  ServiceObserver* observer() const { return observer_; }  // loop thread

  // ---- NodeService (loop thread) ----
  void set_observer(ServiceObserver* o) override { observer_ = o; }
  Status start() override { return Status::ok(); }

  Result<CreateVmReply> create_vm(std::string_view spec_json,
                                  std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("create_vm(" + std::string(spec_json) + "," + std::string(request_id) + ")"));
    if (on_create) on_create();
    return CreateVmReply{VmId::trusted(kVmId), 7};
  }
  std::function<void()> on_create;  // loop thread: runs inside CreateVm, as a service would
  Result<uint32_t> start_vm(std::string_view vm, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(record("start_vm(" + std::string(vm) + "," + std::string(request_id) + ")"));
    return 11u;
  }
  Result<uint32_t> stop_vm(std::string_view vm, bool force, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(record("stop_vm(" + std::string(vm) + "," + (force ? "force" : "graceful") +
                              "," + std::string(request_id) + ")"));
    return 12u;
  }
  Result<uint32_t> reboot_vm(std::string_view vm, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("reboot_vm(" + std::string(vm) + "," + std::string(request_id) + ")"));
    return 13u;
  }
  Result<uint32_t> delete_vm(std::string_view vm, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("delete_vm(" + std::string(vm) + "," + std::string(request_id) + ")"));
    return 14u;
  }
  Result<VmRecord> get_vm(std::string_view vm) const override {
    std::lock_guard l(mu_);
    if (throw_next_) {
      throw_next_ = false;
      throw std::runtime_error("fake service asked to throw");
    }
    for (const auto& [id, record] : vms_) {
      if (id == vm || record.spec.name.str() == vm) return record;
    }
    return not_found("vm '" + std::string(vm) + "' does not exist");
  }
  std::vector<VmRecord> list_vms(std::string_view tenant) const override {
    std::lock_guard l(mu_);
    calls_.push_back("list_vms(" + std::string(tenant) + ")");
    std::vector<VmRecord> out;
    for (const auto& [id, record] : vms_) {
      if (tenant.empty() || record.spec.tenant.str() == tenant) out.push_back(record);
    }
    return out;
  }
  Result<uint32_t> import_image(std::string_view image, UniqueFd data, std::string_view sha256,
                                std::string_view kind, std::string_view tenant,
                                std::string_view request_id) override {
    NM_RETURN_IF_ERROR(record("import_image"));
    ImportCall call{std::string(image),  {},
                    std::string(sha256), std::string(kind),
                    std::string(tenant), std::string(request_id)};
    call.cloexec = (::fcntl(data.get(), F_GETFD) & FD_CLOEXEC) != 0;
    char buf[4096];
    ssize_t n = 0;
    while ((n = ::read(data.get(), buf, sizeof buf)) > 0) call.content.append(buf, size_t(n));
    std::lock_guard l(mu_);
    last_import_ = call;
    return 21u;
  }
  std::vector<ImageEntry> list_images() const override {
    ImageInfo a{.ref = ImageRef{"busybox-guest", "1"},
                .digest = Digest::trusted("sha256:" + std::string(64, 'a')),
                .kind = ImageKind::kDisk,
                .format = ImageFormat::kQcow2,
                .size = 1000,
                .virtual_size = 4096,
                .tenant = TenantId::trusted("contoso"),
                .imported_us = 1,
                .path = "/x",
                .pinned = true,
                .last_used_us = 7};
    ImageInfo b{.ref = std::nullopt,
                .digest = Digest::trusted("sha256:" + std::string(64, 'b')),
                .kind = ImageKind::kKernel,
                .format = ImageFormat::kRaw,
                .size = 5,
                .virtual_size = 5,
                .tenant = std::nullopt,
                .imported_us = 2,
                .path = "/y",
                .pinned = false,
                .last_used_us = 0};
    return {{a, {"web-1", "web-2"}}, {b, {}}};
  }
  Status remove_image(std::string_view image, std::string_view request_id) override {
    return record("remove_image(" + std::string(image) + "," + std::string(request_id) + ")");
  }
  Result<uint32_t> pull_image(std::string_view image, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("pull_image(" + std::string(image) + "," + std::string(request_id) + ")"));
    return 41u;
  }
  Status pin_image(std::string_view image, bool pinned, std::string_view request_id) override {
    return record("pin_image(" + std::string(image) + "," + (pinned ? "true" : "false") + "," +
                  std::string(request_id) + ")");
  }
  Result<GcPlan> collect_images(std::optional<std::chrono::seconds> min_age,
                                bool dry_run) override {
    NM_RETURN_IF_ERROR(record(
        "collect_images(" + (min_age ? std::to_string(min_age->count()) : std::string("default")) +
        "," + (dry_run ? "dry" : "real") + ")"));
    GcPlan plan;
    plan.remove.push_back({Digest::trusted("sha256:" + std::string(64, 'c')),
                           300,
                           {ImageRef{"old", "1"}, ImageRef{"old", "2"}}});
    plan.bytes = 300;
    return plan;
  }
  Result<uint32_t> verify_images(const std::vector<std::string>& images,
                                 std::string_view request_id) override {
    std::string list;
    for (const auto& i : images) list += i + ";";
    NM_RETURN_IF_ERROR(record("verify_images(" + list + "," + std::string(request_id) + ")"));
    return 42u;
  }
  Result<uint32_t> create_network(std::string_view spec_json,
                                  std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("create_network(" + std::string(spec_json) + "," + std::string(request_id) + ")"));
    return 31u;
  }
  Result<uint32_t> delete_network(std::string_view name, std::string_view request_id) override {
    NM_RETURN_IF_ERROR(
        record("delete_network(" + std::string(name) + "," + std::string(request_id) + ")"));
    return 32u;
  }
  Result<NetworkRecord> get_network(std::string_view name) const override {
    if (name != "blue") return Status(Code::kNotFound, "network '" + std::string(name) + "'");
    return blue_network();
  }
  std::vector<NetworkRecord> list_networks(std::string_view tenant) const override {
    if (!tenant.empty() && tenant != "contoso") return {};
    return {blue_network()};
  }
  std::vector<PortRecord> vm_ports(const VmId&) const override { return {}; }
  std::vector<PortRecord> network_ports(std::string_view) const override { return {}; }
  static NetworkRecord blue_network() {
    NetworkRecord n;
    n.spec = network::parse_network_spec(
                 R"({"name":"blue","tenant":"contoso","vni":4097,"subnet":"10.10.0.0/24"})")
                 .value();
    n.state = "ready";
    return n;
  }
  Result<std::vector<EventRecord>> events_since(uint64_t since, uint32_t max) override {
    NM_RETURN_IF_ERROR(
        record("events_since(" + std::to_string(since) + "," + std::to_string(max) + ")"));
    std::lock_guard l(mu_);
    std::vector<EventRecord> out;
    for (const auto& e : events_) {
      if (e.seq > since && out.size() < max) out.push_back(e);
    }
    return out;
  }
  uint64_t last_event_seq() const override {
    std::lock_guard l(mu_);
    return events_.empty() ? 0 : events_.back().seq;
  }
  std::vector<JobView> list_jobs() const override {
    std::lock_guard l(mu_);
    std::vector<JobView> out;
    for (const auto& [id, job] : jobs_) out.push_back(job);
    return out;
  }
  std::optional<JobView> get_job(uint32_t id) const override {
    std::lock_guard l(mu_);
    const auto it = jobs_.find(id);
    if (it == jobs_.end()) return std::nullopt;
    return it->second;
  }
  Status cancel_job(uint32_t id) override {
    return record("cancel_job(" + std::to_string(id) + ")");
  }
  void on_domain_event(const DomainEvent&) override {}
  void audit() override {}
  void libvirt_connection_changed(bool, std::string) override {}
  size_t active_jobs() const override { return 0; }

  // Group commit, played by the test: while `holding`, what waits for durability waits until
  // release_all() (loop thread).
  void after_durable(std::function<void()> fn) override {
    if (holding || !held.empty()) {
      held.push_back(std::move(fn));
      return;
    }
    fn();
  }
  void release_all() {
    holding = false;
    while (!held.empty()) {
      auto fn = std::move(held.front());
      held.pop_front();
      fn();
    }
  }
  bool holding = false;                    // loop thread
  std::deque<std::function<void()>> held;  // loop thread
  HealthSnapshot health() const override {
    std::lock_guard l(mu_);
    return health_;
  }
  std::vector<ResourceCapacity> capacity() const override {
    return {ResourceCapacity{.resource = "vcpus",
                             .total = 16,
                             .reserved = 2,
                             .ratio = 4.0,
                             .capacity = 56,
                             .allocated = 3}};
  }
  Status set_maintenance(bool enabled, std::string_view reason,
                         std::string_view request_id) override {
    return record("set_maintenance(" + std::to_string(enabled) + "," + std::string(reason) + "," +
                  std::string(request_id) + ")");
  }
  void set_host_check(const std::string&, HealthState, std::string) override {}
  void probe_health() override {}
  Heartbeat heartbeat() override { return {}; }
  bool watchdog_healthy() const override { return true; }
  void set_health(HealthSnapshot h) {
    std::lock_guard l(mu_);
    health_ = std::move(h);
  }

 private:
  Status record(std::string call) const {
    std::lock_guard l(mu_);
    calls_.push_back(std::move(call));
    if (throw_next_) {
      throw_next_ = false;
      throw std::runtime_error("fake service asked to throw");
    }
    if (fail_next_) {
      Status s = *fail_next_;
      fail_next_.reset();
      return s;
    }
    return Status::ok();
  }

  mutable std::mutex mu_;
  HealthSnapshot health_;
  mutable std::vector<std::string> calls_;
  mutable std::optional<Status> fail_next_;
  mutable bool throw_next_ = false;
  std::map<std::string, VmRecord> vms_;
  std::map<uint32_t, JobView> jobs_;
  std::vector<EventRecord> events_;
  std::optional<ImportCall> last_import_;
  ServiceObserver* observer_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// SdEventLoop

TEST(SdEventLoop, PostFromManyThreadsRunsEachFunctionExactlyOnceOnTheLoopThread) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok()) << loop.status().to_string();
  constexpr int kThreads = 4;
  constexpr int kPerThread = 2500;
  std::vector<int> runs(kThreads * kPerThread, 0);  // touched only on the loop thread
  int off_loop = 0;
  std::thread::id loop_thread;
  std::thread runner([&] {
    loop_thread = std::this_thread::get_id();
    EXPECT_TRUE((*loop)->run().is_ok());
  });
  const std::thread::id expected = runner.get_id();
  std::vector<std::thread> producers;
  for (int t = 0; t < kThreads; ++t) {
    producers.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const size_t slot = static_cast<size_t>(t * kPerThread + i);
        (*loop)->post([&, slot] {
          ++runs[slot];
          if (std::this_thread::get_id() != expected) ++off_loop;
        });
      }
    });
  }
  for (auto& p : producers) p.join();
  (*loop)->post([&] { (*loop)->exit(0); });
  runner.join();
  EXPECT_EQ(loop_thread, expected);
  EXPECT_EQ(off_loop, 0);
  for (size_t i = 0; i < runs.size(); ++i) ASSERT_EQ(runs[i], 1) << "function " << i;
}

TEST(SdEventLoop, PostFromTheLoopThreadNeverRunsInline) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  std::vector<std::string> order;
  (*loop)->post([&] {
    (*loop)->post([&] {
      order.push_back("inner");
      (*loop)->exit(0);
    });
    order.push_back("outer-end");
  });
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_EQ(order, (std::vector<std::string>{"outer-end", "inner"}));
}

TEST(SdEventLoop, AnExceptionInAPostedFunctionIsContained) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  bool second_ran = false;
  (*loop)->post([] { throw std::runtime_error("boom"); });
  (*loop)->post([&] {
    second_ran = true;
    (*loop)->exit(3);
  });
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_TRUE(second_ran);
  EXPECT_EQ((*loop)->exit_code(), 3);
}

TEST(SdEventLoop, PeriodicFunctionRunsAgainAfterEachInterval) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  int ticks = 0;
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE((*loop)
                  ->add_periodic(5ms,
                                 [&] {
                                   if (++ticks == 3) (*loop)->exit(0);
                                 })
                  .is_ok());
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_EQ(ticks, 3);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 15ms);
  EXPECT_FALSE((*loop)->add_periodic(0us, [] {}).is_ok());
}

TEST(SdEventLoop, BlockedSignalIsDeliveredToItsHandlerOnTheLoop) {
  // Runs the loop on this thread: the signal is blocked here, and no other thread of the test
  // process exists now, so the kernel queues it for the loop's signalfd.
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  int got = 0;
  ASSERT_TRUE((*loop)
                  ->on_signals({SIGUSR2},
                               [&](int sig) {
                                 got = sig;
                                 (*loop)->exit(sig);
                               })
                  .is_ok());
  (*loop)->post([] { ::kill(::getpid(), SIGUSR2); });
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_EQ(got, SIGUSR2);
  EXPECT_EQ((*loop)->exit_code(), SIGUSR2);
  loop->reset();
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR2);
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

TEST(SdEventLoop, WatchdogIsHarmlessWithoutAServiceManager) {
  ::unsetenv("WATCHDOG_USEC");
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  EXPECT_TRUE((*loop)->enable_watchdog(nullptr).is_ok());
}

// WATCHDOG=1 reaches the service manager (a socket this test serves) only while healthy() holds.
TEST(SdEventLoop, WatchdogFeedsOnlyWhileHealthy) {
  const std::string path = ::testing::TempDir() + "nm-notify-" + std::to_string(::getpid());
  ::unlink(path.c_str());
  const int sock = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  ASSERT_GE(sock, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  ASSERT_EQ(::bind(sock, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::setenv("NOTIFY_SOCKET", path.c_str(), 1);
  ::setenv("WATCHDOG_USEC", "100000", 1);  // 100 ms: a ping every 50 ms
  ::unsetenv("WATCHDOG_PID");
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  std::atomic<bool> healthy{true};
  ASSERT_TRUE((*loop)->enable_watchdog([&] { return healthy.load(); }).is_ok());
  auto pings = [&] {
    int n = 0;
    char buf[256];
    for (;;) {
      const ssize_t got = ::recv(sock, buf, sizeof buf - 1, 0);
      if (got <= 0) return n;
      buf[got] = 0;
      if (std::string(buf).find("WATCHDOG=1") != std::string::npos) ++n;
    }
  };
  int fed = 0;
  int starved = 0;
  (*loop)->post_after(std::chrono::milliseconds(400), [&] {
    fed = pings();
    healthy = false;
  });
  (*loop)->post_after(std::chrono::milliseconds(800), [&] {
    starved = pings();
    (*loop)->exit(0);
  });
  ASSERT_TRUE((*loop)->run().is_ok());
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ::close(sock);
  ::unlink(path.c_str());
  EXPECT_GE(fed, 4) << "a ping every 50 ms for 400 ms";
  EXPECT_EQ(starved, 0);
}

// post_after runs once, after its delay, in due order.
TEST(SdEventLoop, PostAfterRunsOnceAfterItsDelay) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  std::vector<int> order;
  const auto t0 = std::chrono::steady_clock::now();
  std::chrono::steady_clock::duration first{};
  (*loop)->post_after(std::chrono::milliseconds(120), [&] {
    order.push_back(2);
    (*loop)->exit(0);
  });
  (*loop)->post_after(std::chrono::milliseconds(60), [&] {
    order.push_back(1);
    first = std::chrono::steady_clock::now() - t0;
  });
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_EQ(order, (std::vector<int>{1, 2}));
  EXPECT_GE(first, std::chrono::milliseconds(60));
}

// post_idle waits until nothing else is ready: functions posted after it run first.
TEST(SdEventLoop, PostIdleRunsWhenNothingElseIsReady) {
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  std::vector<int> order;
  (*loop)->post([&] {
    (*loop)->post_idle([&] { order.push_back(3); });
    (*loop)->post_idle([&] {
      order.push_back(4);
      (*loop)->exit(0);
    });
    (*loop)->post([&] {
      order.push_back(1);
      (*loop)->post([&] { order.push_back(2); });
    });
  });
  ASSERT_TRUE((*loop)->run().is_ok());
  EXPECT_EQ(order, (std::vector<int>{1, 2, 3, 4}));
}

// ---------------------------------------------------------------------------------------------
// DbusServer

class DbusServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bus_ = std::make_unique<PrivateBus>();
    auto loop = SdEventLoop::create();
    ASSERT_TRUE(loop.is_ok()) << loop.status().to_string();
    loop_ = std::move(loop).value();
    auto server = DbusServer::create(*loop_, bus_->address(), fake_);
    ASSERT_TRUE(server.is_ok()) << server.status().to_string();
    server_ = std::move(server).value();
    ASSERT_EQ(fake_.observer(), server_.get());
    ASSERT_TRUE(server_->request_name().is_ok());
    runner_ = std::thread([this] {
      EXPECT_TRUE(loop_->run().is_ok());
      loop_ended_.set_value();
    });
    client_ = connect_client(bus_->address());
  }

  void TearDown() override {
    client_.reset();
    if (runner_.joinable()) {
      loop_->post([this] { loop_->exit(0); });
      runner_.join();
    }
    server_.reset();
    EXPECT_EQ(fake_.observer(), nullptr);
    loop_.reset();
    bus_.reset();
  }

  // Runs `fn` on the loop thread and waits for it.
  void run_on_loop(std::function<void()> fn) {
    std::promise<void> done;
    loop_->post([&] {
      fn();
      done.set_value();
    });
    ASSERT_EQ(done.get_future().wait_for(kTimeout), std::future_status::ready);
  }

  // Calls a method on our service; the reply, or nullptr with `error` set.
  template <typename... Args>
  MessagePtr call(const std::string& path, std::string_view iface, const char* member,
                  BusError& error, const char* types, Args... args) {
    sd_bus_message* reply = nullptr;
    const int r = sd_bus_call_method(client_.get(), kBusName.data(), path.c_str(), iface.data(),
                                     member, &error.e, &reply, types, args...);
    MessagePtr owned(reply);
    if (r < 0) return nullptr;
    return owned;
  }

  template <typename... Args>
  MessagePtr call_manager(const char* member, BusError& error, const char* types, Args... args) {
    return call(std::string(kManagerPath), kManagerInterface, member, error, types, args...);
  }

  // Subscribes to a signal; received messages are kept in `signals_`.
  void subscribe(const char* iface, const char* member, const char* path = nullptr) {
    sd_bus_slot* slot = nullptr;
    const int r = sd_bus_match_signal(
        client_.get(), &slot, nullptr, path, iface, member,
        [](sd_bus_message* m, void* ud, sd_bus_error*) -> int {
          static_cast<DbusServerTest*>(ud)->signals_.emplace_back(sd_bus_message_ref(m));
          return 0;
        },
        this);
    ASSERT_GE(r, 0) << strerror(-r);
    matches_.emplace_back(slot);
  }

  // Processes client messages until a signal `member` has arrived (or the deadline passes) and
  // returns the first one, removing it from the queue.
  MessagePtr wait_signal(const char* member,
                         std::chrono::steady_clock::duration timeout = kTimeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      for (auto it = signals_.begin(); it != signals_.end(); ++it) {
        if (sd_bus_message_is_signal(it->get(), nullptr, member) > 0) {
          MessagePtr m = std::move(*it);
          signals_.erase(it);
          return m;
        }
      }
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) return nullptr;
      const int r = sd_bus_process(client_.get(), nullptr);
      if (r < 0) return nullptr;
      if (r == 0) {
        const auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - now);
        sd_bus_wait(client_.get(), static_cast<uint64_t>(left.count()));
      }
    }
  }

  // A Manager method called without waiting; its reply (or error) is recorded in arrived_.
  template <typename... Args>
  SlotPtr call_async(const char* member, const char* types, Args... args) {
    sd_bus_slot* raw = nullptr;
    const int r = sd_bus_call_method_async(
        client_.get(), &raw, kBusName.data(), kManagerPath.data(), kManagerInterface.data(), member,
        [](sd_bus_message* m, void* ud, sd_bus_error*) -> int {
          static_cast<std::vector<std::string>*>(ud)->emplace_back(
              sd_bus_message_is_method_error(m, nullptr) ? "error" : "reply");
          return 0;
        },
        &arrived_, types, args...);
    EXPECT_GE(r, 0) << strerror(-r);
    return SlotPtr(raw);
  }

  // Waits (up to a second) until the fake service holds `n` functions; how many it holds.
  size_t wait_held(size_t n) {
    size_t held = 0;
    for (int i = 0; i < 500 && held < n; ++i) {
      sd_bus_flush(client_.get());
      run_on_loop([&] { held = fake_.held.size(); });
      if (held < n) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return held;
  }

  // Processes the client's messages for `d` or until `n` arrivals: replies (by call_async) and
  // subscribed signals, in the order they came, in arrived_.
  void pump_arrivals(size_t n, std::chrono::milliseconds d) {
    const auto until = std::chrono::steady_clock::now() + d;
    while (arrived_.size() < n && std::chrono::steady_clock::now() < until) {
      for (auto& m : signals_) {
        if (m) arrived_.emplace_back("signal");
        m.reset();
      }
      if (sd_bus_process(client_.get(), nullptr) > 0) continue;
      sd_bus_wait(client_.get(), 10'000);
    }
  }

  // GetManagedObjects: path -> interfaces.
  std::map<std::string, std::set<std::string>> managed_objects() {
    BusError error;
    MessagePtr reply = call(std::string(kManagerPath), "org.freedesktop.DBus.ObjectManager",
                            "GetManagedObjects", error, "");
    EXPECT_TRUE(reply) << error.name() << ": " << error.message();
    std::map<std::string, std::set<std::string>> out;
    if (!reply) return out;
    sd_bus_message* m = reply.get();
    EXPECT_GE(sd_bus_message_enter_container(m, 'a', "{oa{sa{sv}}}"), 0);
    while (sd_bus_message_enter_container(m, 'e', "oa{sa{sv}}") > 0) {
      const char* path = nullptr;
      EXPECT_GE(sd_bus_message_read(m, "o", &path), 0);
      auto& ifaces = out[path];
      EXPECT_GE(sd_bus_message_enter_container(m, 'a', "{sa{sv}}"), 0);
      while (sd_bus_message_enter_container(m, 'e', "sa{sv}") > 0) {
        const char* iface = nullptr;
        EXPECT_GE(sd_bus_message_read(m, "s", &iface), 0);
        ifaces.insert(iface);
        EXPECT_GE(sd_bus_message_skip(m, "a{sv}"), 0);
        EXPECT_GE(sd_bus_message_exit_container(m), 0);
      }
      EXPECT_GE(sd_bus_message_exit_container(m), 0);
      EXPECT_GE(sd_bus_message_exit_container(m), 0);
    }
    EXPECT_GE(sd_bus_message_exit_container(m), 0);
    return out;
  }

  std::string get_string_property(const std::string& path, std::string_view iface, const char* name,
                                  BusError& error) {
    char* value = nullptr;
    const int r = sd_bus_get_property_string(client_.get(), kBusName.data(), path.c_str(),
                                             iface.data(), name, &error.e, &value);
    std::unique_ptr<char, decltype(&std::free)> owned(value, &std::free);
    return r < 0 || value == nullptr ? std::string() : std::string(value);
  }

  std::unique_ptr<PrivateBus> bus_;
  FakeNodeService fake_;
  std::unique_ptr<SdEventLoop> loop_;
  std::unique_ptr<DbusServer> server_;
  std::thread runner_;
  std::promise<void> loop_ended_;
  BusPtr client_;
  std::vector<SlotPtr> matches_;
  std::vector<std::string> arrived_;  // see pump_arrivals()
  std::vector<MessagePtr> signals_;
};

TEST_F(DbusServerTest, CreateVmRepliesWithIdVmPathAndJobPath) {
  BusError error;
  MessagePtr reply = call_manager("CreateVm", error, "ss", "{\"name\":\"web-1\"}", "req-1");
  ASSERT_TRUE(reply) << error.name() << ": " << error.message();
  EXPECT_STREQ(sd_bus_message_get_signature(reply.get(), 1), "soo");
  const char* id = nullptr;
  const char* vm = nullptr;
  const char* job = nullptr;
  ASSERT_GE(sd_bus_message_read(reply.get(), "soo", &id, &vm, &job), 0);
  EXPECT_STREQ(id, kVmId);
  EXPECT_EQ(std::string(vm), vm_object_path(kVmId));
  EXPECT_EQ(std::string(vm),
            "/org/nodemanager/NodeManager1/vm/_33f1c2a4e_2d0b6d_2d4c1e_2d9a7f_2d5d2e8b9c0a11");
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/7");
  EXPECT_EQ(fake_.calls().back(), "create_vm({\"name\":\"web-1\"},req-1)");
}

TEST_F(DbusServerTest, JobMethodsPassTheirArgumentsAndReturnJobPaths) {
  BusError error;
  MessagePtr reply = call_manager("StopVm", error, "sbs", "web-1", 1, "r2");
  ASSERT_TRUE(reply) << error.message();
  const char* job = nullptr;
  ASSERT_GE(sd_bus_message_read(reply.get(), "o", &job), 0);
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/12");
  EXPECT_EQ(fake_.calls().back(), "stop_vm(web-1,force,r2)");

  reply = call_manager("StartVm", error, "ss", "web-1", "");
  ASSERT_TRUE(reply);
  ASSERT_GE(sd_bus_message_read(reply.get(), "o", &job), 0);
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/11");
  reply = call_manager("RebootVm", error, "ss", "web-1", "");
  ASSERT_TRUE(reply);
  ASSERT_GE(sd_bus_message_read(reply.get(), "o", &job), 0);
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/13");
  reply = call_manager("DeleteVm", error, "ss", "web-1", "r3");
  ASSERT_TRUE(reply);
  ASSERT_GE(sd_bus_message_read(reply.get(), "o", &job), 0);
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/14");
  EXPECT_EQ(fake_.calls().back(), "delete_vm(web-1,r3)");
}

TEST_F(DbusServerTest, ServiceErrorArrivesAsTheMatchingDbusErrorWithItsMessage) {
  fake_.fail_next(not_found("vm 'nope' does not exist"));
  BusError error;
  EXPECT_FALSE(call_manager("StartVm", error, "ss", "nope", ""));
  EXPECT_EQ(error.name(), "org.nodemanager.NodeManager1.Error.NotFound");
  EXPECT_EQ(error.message(), "vm 'nope' does not exist");

  BusError error2;
  fake_.fail_next(Status(Code::kInsufficientCapacity, "not enough memory"));
  EXPECT_FALSE(call_manager("CreateVm", error2, "ss", "{}", ""));
  EXPECT_EQ(error2.name(), "org.nodemanager.NodeManager1.Error.InsufficientCapacity");

  BusError error3;
  EXPECT_FALSE(call_manager("GetVm", error3, "s", "ghost"));
  EXPECT_EQ(error3.name(), "org.nodemanager.NodeManager1.Error.NotFound");
  EXPECT_EQ(error3.message(), "vm 'ghost' does not exist");
}

TEST_F(DbusServerTest, AnExceptionInTheServiceBecomesAnInternalErrorAndTheServerLives) {
  fake_.throw_next();
  BusError error;
  EXPECT_FALSE(call_manager("DeleteVm", error, "ss", "web-1", ""));
  EXPECT_EQ(error.name(), "org.nodemanager.NodeManager1.Error.Internal");
  BusError error2;
  EXPECT_TRUE(call_manager("DeleteVm", error2, "ss", "web-1", "")) << error2.message();
}

TEST_F(DbusServerTest, ListVmsReturnsTheServiceRecordsForTheTenant) {
  fake_.add_vm(make_vm(kVmId, "web-1", "contoso"));
  auto other = make_vm(kVmId2, "db-1", "fabrikam");
  other.state = "running";
  fake_.add_vm(other);
  BusError error;
  MessagePtr reply = call_manager("ListVms", error, "s", "fabrikam");
  ASSERT_TRUE(reply) << error.message();
  EXPECT_STREQ(sd_bus_message_get_signature(reply.get(), 1), "a(sssstt)");
  EXPECT_EQ(fake_.calls().back(), "list_vms(fabrikam)");
  ASSERT_GE(sd_bus_message_enter_container(reply.get(), 'a', "(sssstt)"), 0);
  const char *id, *name, *tenant, *state;
  uint64_t gen = 0, observed = 0;
  ASSERT_GT(
      sd_bus_message_read(reply.get(), "(sssstt)", &id, &name, &tenant, &state, &gen, &observed),
      0);
  EXPECT_STREQ(id, kVmId2);
  EXPECT_STREQ(name, "db-1");
  EXPECT_STREQ(tenant, "fabrikam");
  EXPECT_STREQ(state, "running");
  EXPECT_EQ(gen, 3u);
  EXPECT_EQ(observed, 2u);
  EXPECT_EQ(
      sd_bus_message_read(reply.get(), "(sssstt)", &id, &name, &tenant, &state, &gen, &observed),
      0);  // only one
}

TEST_F(DbusServerTest, GetVmReturnsTheRecordAsJson) {
  fake_.add_vm(make_vm(kVmId, "web-1", "contoso"));
  BusError error;
  MessagePtr reply = call_manager("GetVm", error, "s", "web-1");
  ASSERT_TRUE(reply) << error.message();
  const char* text = nullptr;
  ASSERT_GE(sd_bus_message_read(reply.get(), "s", &text), 0);
  const auto doc = nlohmann::json::parse(text, nullptr, false);
  ASSERT_TRUE(doc.is_object()) << text;
  EXPECT_EQ(doc.value("id", ""), kVmId);
  EXPECT_EQ(doc.value("state", ""), "shutoff");
  EXPECT_EQ(doc.value("generation", 0u), 3u);
}

TEST_F(DbusServerTest, ListImagesReturnsEveryImage) {
  BusError error;
  MessagePtr reply = call_manager("ListImages", error, "");
  ASSERT_TRUE(reply) << error.message();
  EXPECT_STREQ(sd_bus_message_get_signature(reply.get(), 1), "a(ssssttstbas)");
  ASSERT_GE(sd_bus_message_enter_container(reply.get(), 'a', "(ssssttstbas)"), 0);
  const char *ref, *digest, *kind, *format, *tenant;
  uint64_t size = 0, vsize = 0, last_used = 0;
  int pinned = 0;
  auto read_row = [&](std::vector<std::string>& users) {
    if (sd_bus_message_enter_container(reply.get(), 'r', "ssssttstbas") <= 0) return false;
    if (sd_bus_message_read(reply.get(), "ssssttstb", &ref, &digest, &kind, &format, &size, &vsize,
                            &tenant, &last_used, &pinned) <= 0) {
      return false;
    }
    char** strv = nullptr;
    if (sd_bus_message_read_strv(reply.get(), &strv) < 0) return false;
    for (char** p = strv; p && *p; ++p) {
      users.emplace_back(*p);
      free(*p);
    }
    free(strv);
    return sd_bus_message_exit_container(reply.get()) >= 0;
  };
  std::vector<std::string> users;
  ASSERT_TRUE(read_row(users));
  EXPECT_STREQ(ref, "busybox-guest:1");
  EXPECT_EQ(std::string(digest), "sha256:" + std::string(64, 'a'));
  EXPECT_STREQ(kind, "disk");
  EXPECT_STREQ(format, "qcow2");
  EXPECT_EQ(size, 1000u);
  EXPECT_EQ(vsize, 4096u);
  EXPECT_STREQ(tenant, "contoso");
  EXPECT_EQ(last_used, 7u);  // the later of imported_us and last_used_us
  EXPECT_TRUE(pinned);
  EXPECT_EQ(users, (std::vector<std::string>{"web-1", "web-2"}));
  users.clear();
  ASSERT_TRUE(read_row(users));
  EXPECT_STREQ(ref, "");
  EXPECT_STREQ(kind, "kernel");
  EXPECT_STREQ(tenant, "");
  EXPECT_EQ(last_used, 2u);
  EXPECT_FALSE(pinned);
  EXPECT_TRUE(users.empty());
}

TEST_F(DbusServerTest, PullPinCollectAndVerifyReachTheService) {
  BusError error;
  MessagePtr pulled = call_manager("PullImage", error, "ss", "debian:12", "r-1");
  ASSERT_TRUE(pulled) << error.message();
  const char* job = nullptr;
  ASSERT_GE(sd_bus_message_read(pulled.get(), "o", &job), 0);
  EXPECT_EQ(std::string(job), job_object_path(41));
  EXPECT_EQ(fake_.calls().back(), "pull_image(debian:12,r-1)");

  ASSERT_TRUE(call_manager("PinImage", error, "sbs", "debian:12", 1, "r-2")) << error.message();
  EXPECT_EQ(fake_.calls().back(), "pin_image(debian:12,true,r-2)");

  MessagePtr gc = call_manager("CollectImages", error, "xb", int64_t{-1}, 1);
  ASSERT_TRUE(gc) << error.message();
  EXPECT_EQ(fake_.calls().back(), "collect_images(default,dry)");
  EXPECT_STREQ(sd_bus_message_get_signature(gc.get(), 1), "a(sast)t");
  ASSERT_TRUE(call_manager("CollectImages", error, "xb", int64_t{0}, 0)) << error.message();
  EXPECT_EQ(fake_.calls().back(), "collect_images(0,real)");

  MessagePtr verified =
      call_manager("VerifyImages", error, "ass", 2, "debian:12", "sha256:x", "r-3");
  ASSERT_TRUE(verified) << error.message();
  EXPECT_EQ(fake_.calls().back(), "verify_images(debian:12;sha256:x;,r-3)");
}

TEST_F(DbusServerTest, GetEventsDefaultsAndCapsMaxAndReturnsTheLastSeq) {
  fake_.add_event({5, 100, "VmStateChanged", kVmId, R"({"state":"running"})"});
  fake_.add_event({6, 200, "JobRemoved", "7", R"({"result":"done"})"});
  BusError error;
  MessagePtr reply = call_manager("GetEvents", error, "tu", uint64_t{5}, uint32_t{0});
  ASSERT_TRUE(reply) << error.message();
  EXPECT_EQ(fake_.calls().back(), "events_since(5,1000)");
  EXPECT_STREQ(sd_bus_message_get_signature(reply.get(), 1), "a(ttsss)t");
  ASSERT_GE(sd_bus_message_enter_container(reply.get(), 'a', "(ttsss)"), 0);
  uint64_t seq = 0, ts = 0;
  const char *kind, *object, *payload;
  ASSERT_GT(sd_bus_message_read(reply.get(), "(ttsss)", &seq, &ts, &kind, &object, &payload), 0);
  EXPECT_EQ(seq, 6u);
  EXPECT_EQ(ts, 200u);
  EXPECT_STREQ(kind, "JobRemoved");
  EXPECT_STREQ(object, "7");
  EXPECT_STREQ(payload, R"({"result":"done"})");
  EXPECT_EQ(sd_bus_message_read(reply.get(), "(ttsss)", &seq, &ts, &kind, &object, &payload), 0);
  ASSERT_GE(sd_bus_message_exit_container(reply.get()), 0);
  uint64_t last = 0;
  ASSERT_GE(sd_bus_message_read(reply.get(), "t", &last), 0);
  EXPECT_EQ(last, 6u);

  reply = call_manager("GetEvents", error, "tu", uint64_t{0}, uint32_t{50000});
  ASSERT_TRUE(reply);
  EXPECT_EQ(fake_.calls().back(), "events_since(0,10000)");
  reply = call_manager("GetEvents", error, "tu", uint64_t{0}, uint32_t{2});
  ASSERT_TRUE(reply);
  EXPECT_EQ(fake_.calls().back(), "events_since(0,2)");
}

TEST_F(DbusServerTest, ImportImageHandsTheServiceAReadableCopyOfThePassedFd) {
  UniqueFd data(::memfd_create("image", MFD_CLOEXEC));
  ASSERT_TRUE(data.valid());
  const std::string content = "not really a disk image, but bytes all the same\n";
  ASSERT_EQ(::write(data.get(), content.data(), content.size()),
            static_cast<ssize_t>(content.size()));
  ASSERT_EQ(::lseek(data.get(), 0, SEEK_SET), 0);
  const std::string digest = "sha256:" + std::string(64, 'c');
  BusError error;
  MessagePtr reply = call_manager("ImportImage", error, "shssss", "busybox-guest:1", data.get(),
                                  digest.c_str(), "disk", "contoso", "imp-1");
  ASSERT_TRUE(reply) << error.name() << ": " << error.message();
  const char* job = nullptr;
  ASSERT_GE(sd_bus_message_read(reply.get(), "o", &job), 0);
  EXPECT_STREQ(job, "/org/nodemanager/NodeManager1/job/21");
  const auto imp = fake_.last_import();
  ASSERT_TRUE(imp.has_value());
  EXPECT_EQ(imp->content, content);
  EXPECT_TRUE(imp->cloexec);
  EXPECT_EQ(imp->image, "busybox-guest:1");
  EXPECT_EQ(imp->sha256, digest);
  EXPECT_EQ(imp->kind, "disk");
  EXPECT_EQ(imp->tenant, "contoso");
  EXPECT_EQ(imp->request_id, "imp-1");
}

TEST_F(DbusServerTest, VmObjectAppearsInTheObjectManagerAndDisappearsWhenRemoved) {
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesAdded");
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesRemoved");
  const std::string path = vm_object_path(kVmId);
  EXPECT_EQ(managed_objects().count(path), 0u);

  run_on_loop([&] {
    const auto vm = make_vm(kVmId, "web-1", "contoso");
    fake_.add_vm(vm);
    fake_.observer()->on_vm_added(vm);
  });
  MessagePtr added = wait_signal("InterfacesAdded");
  ASSERT_TRUE(added);
  const char* added_path = nullptr;
  ASSERT_GE(sd_bus_message_read(added.get(), "o", &added_path), 0);
  EXPECT_EQ(added_path, path);
  std::set<std::string> added_ifaces;
  ASSERT_GE(sd_bus_message_enter_container(added.get(), 'a', "{sa{sv}}"), 0);
  while (sd_bus_message_enter_container(added.get(), 'e', "sa{sv}") > 0) {
    const char* iface = nullptr;
    ASSERT_GE(sd_bus_message_read(added.get(), "s", &iface), 0);
    added_ifaces.insert(iface);
    ASSERT_GE(sd_bus_message_skip(added.get(), "a{sv}"), 0);
    ASSERT_GE(sd_bus_message_exit_container(added.get()), 0);
  }
  EXPECT_EQ(added_ifaces.count(std::string(kVmInterface)), 1u);
  const auto objects = managed_objects();
  ASSERT_EQ(objects.count(path), 1u);
  EXPECT_EQ(objects.at(path).count(std::string(kVmInterface)), 1u);
  BusError error;
  EXPECT_EQ(get_string_property(path, kVmInterface, "Name", error), "web-1");
  EXPECT_EQ(get_string_property(path, kVmInterface, "Tenant", error), "contoso");
  EXPECT_EQ(get_string_property(path, kVmInterface, "DesiredPower", error), "running");
  const auto spec =
      nlohmann::json::parse(get_string_property(path, kVmInterface, "Spec", error), nullptr, false);
  ASSERT_TRUE(spec.is_object());
  EXPECT_EQ(spec.value("name", ""), "web-1");

  // A VM is reachable at its id's path only, not at a path that encodes its name.
  BusError by_name;
  EXPECT_EQ(get_string_property(vm_object_path("web-1"), kVmInterface, "Name", by_name), "");
  EXPECT_FALSE(by_name.name().empty());

  run_on_loop([&] {
    fake_.remove_vm(kVmId);
    fake_.observer()->on_vm_removed(VmId::trusted(kVmId));
  });
  MessagePtr removed = wait_signal("InterfacesRemoved");
  ASSERT_TRUE(removed);
  const char* removed_path = nullptr;
  ASSERT_GE(sd_bus_message_read(removed.get(), "o", &removed_path), 0);
  EXPECT_EQ(removed_path, path);
  char** ifaces = nullptr;
  ASSERT_GE(sd_bus_message_read_strv(removed.get(), &ifaces), 0);
  std::set<std::string> removed_ifaces;
  for (char** p = ifaces; p != nullptr && *p != nullptr; ++p) {
    removed_ifaces.insert(*p);
    std::free(*p);
  }
  std::free(ifaces);
  EXPECT_EQ(removed_ifaces, added_ifaces);
  EXPECT_EQ(managed_objects().count(path), 0u);
}

TEST_F(DbusServerTest, PropertiesChangedFollowsOnVmChanged) {
  const std::string path = vm_object_path(kVmId);
  run_on_loop([&] { fake_.add_vm(make_vm(kVmId, "web-1", "contoso")); });
  subscribe("org.freedesktop.DBus.Properties", "PropertiesChanged", path.c_str());
  run_on_loop([&] {
    auto vm = make_vm(kVmId, "web-1", "contoso");
    vm.state = "running";
    vm.state_reason = "booted";
    vm.observed_generation = 3;
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
  });
  MessagePtr m = wait_signal("PropertiesChanged");
  ASSERT_TRUE(m);
  std::map<std::string, std::string> changed = changed_properties(m.get(), kVmInterface);
  EXPECT_EQ(changed.size(), 6u) << "nothing was told about this VM before: all of them";
  EXPECT_EQ(changed["State"], "running");
  EXPECT_EQ(changed["StateReason"], "booted");
  EXPECT_EQ(changed["ObservedGeneration"], "3");
  EXPECT_EQ(changed["Generation"], "3");
  EXPECT_EQ(changed.count("DesiredPower"), 1u);
  EXPECT_EQ(changed.count("Spec"), 1u);
  BusError error;
  EXPECT_EQ(get_string_property(path, kVmInterface, "State", error), "running");
}

// After a VM's InterfacesAdded, each PropertiesChanged names only the properties that changed
// since the VM's last signal; a change of nothing a client can see sends nothing.
TEST_F(DbusServerTest, PropertiesChangedNamesOnlyWhatChanged) {
  const std::string path = vm_object_path(kVmId);
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesAdded");
  subscribe("org.freedesktop.DBus.Properties", "PropertiesChanged", path.c_str());
  auto vm = make_vm(kVmId, "web-1", "contoso");
  run_on_loop([&] {
    fake_.add_vm(vm);
    fake_.observer()->on_vm_added(vm);
  });
  ASSERT_TRUE(wait_signal("InterfacesAdded"));

  run_on_loop([&] {
    vm.state = "running";
    vm.state_reason = "booted";
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
  });
  MessagePtr m = wait_signal("PropertiesChanged");
  ASSERT_TRUE(m);
  EXPECT_EQ(changed_properties(m.get(), kVmInterface),
            (std::map<std::string, std::string>{{"State", "running"}, {"StateReason", "booted"}}));

  run_on_loop([&] {
    vm.updated_us += 1;  // not a property: no signal
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
    vm.power = PowerIntent::kStopped;
    vm.generation += 1;
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
  });
  m = wait_signal("PropertiesChanged");
  ASSERT_TRUE(m);
  EXPECT_EQ(changed_properties(m.get(), kVmInterface),
            (std::map<std::string, std::string>{{"DesiredPower", "stopped"}, {"Generation", "4"}}));

  run_on_loop([&] {
    vm.spec.vcpus = 4;
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
  });
  m = wait_signal("PropertiesChanged");
  ASSERT_TRUE(m);
  const auto changed = changed_properties(m.get(), kVmInterface);
  ASSERT_EQ(changed.size(), 1u);
  EXPECT_NE(changed.at("Spec").find("\"vcpus\":4"), std::string::npos) << changed.at("Spec");
}

// A value changed and changed back before its signal went out (both signals wait for the same
// sync) is still signalled: a client may have read the changed value meanwhile (Get, GetAll and
// GetManagedObjects answer from live state at once) and must learn that it changed back.
TEST_F(DbusServerTest, AValueChangedBackBeforeItsSignalWentOutIsStillSignalled) {
  const std::string path = vm_object_path(kVmId);
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesAdded");
  subscribe("org.freedesktop.DBus.Properties", "PropertiesChanged", path.c_str());
  auto vm = make_vm(kVmId, "web-1", "contoso");
  const std::string original = vm.state;
  run_on_loop([&] {
    fake_.add_vm(vm);
    fake_.observer()->on_vm_added(vm);
  });
  ASSERT_TRUE(wait_signal("InterfacesAdded"));
  run_on_loop([&] {
    fake_.holding = true;
    vm.state = "stopping";
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
  });
  BusError error;
  EXPECT_EQ(get_string_property(path, kVmInterface, "State", error), "stopping");
  run_on_loop([&] {
    vm.state = original;
    fake_.add_vm(vm);
    fake_.observer()->on_vm_changed(vm);
    fake_.release_all();
  });
  MessagePtr m = wait_signal("PropertiesChanged");
  ASSERT_TRUE(m) << "no PropertiesChanged: a client that read 'stopping' keeps it";
  EXPECT_EQ(changed_properties(m.get(), kVmInterface),
            (std::map<std::string, std::string>{{"State", original}}));
  EXPECT_FALSE(wait_signal("PropertiesChanged", 100ms)) << "one signal for both changes";
}

TEST_F(DbusServerTest, JobObjectLivesFromJobNewToJobRemovedWithTheOutcome) {
  subscribe(kManagerInterface.data(), "JobNew");
  subscribe(kManagerInterface.data(), "JobRemoved");
  const JobView job{.id = 5,
                    .kind = "start",
                    .object_id = kVmId,
                    .state = JobState::kRunning,
                    .progress = 0.5,
                    .bytes_done = 512,
                    .bytes_total = 1024};
  const std::string path = job_object_path(5);
  run_on_loop([&] {
    fake_.add_job(job);
    fake_.observer()->on_job_added(job);
  });
  MessagePtr created = wait_signal("JobNew");
  ASSERT_TRUE(created);
  uint32_t id = 0;
  const char *job_path, *kind, *object;
  ASSERT_GE(sd_bus_message_read(created.get(), "uoss", &id, &job_path, &kind, &object), 0);
  EXPECT_EQ(id, 5u);
  EXPECT_EQ(job_path, path);
  EXPECT_STREQ(kind, "start");
  EXPECT_STREQ(object, kVmId);
  EXPECT_EQ(managed_objects().count(path), 1u);
  BusError error;
  EXPECT_EQ(get_string_property(path, kJobInterface, "State", error), "running");
  double progress = 0;
  ASSERT_GE(sd_bus_get_property_trivial(client_.get(), kBusName.data(), path.c_str(),
                                        kJobInterface.data(), "Progress", &error.e, 'd', &progress),
            0);
  EXPECT_DOUBLE_EQ(progress, 0.5);
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  ASSERT_GE(
      sd_bus_get_property_trivial(client_.get(), kBusName.data(), path.c_str(),
                                  kJobInterface.data(), "BytesDone", &error.e, 't', &bytes_done),
      0);
  ASSERT_GE(
      sd_bus_get_property_trivial(client_.get(), kBusName.data(), path.c_str(),
                                  kJobInterface.data(), "BytesTotal", &error.e, 't', &bytes_total),
      0);
  EXPECT_EQ(bytes_done, 512u);
  EXPECT_EQ(bytes_total, 1024u);

  BusError cancel_error;
  EXPECT_TRUE(call(path, kJobInterface, "Cancel", cancel_error, ""));
  EXPECT_EQ(fake_.calls().back(), "cancel_job(5)");

  run_on_loop([&] {
    fake_.remove_job(5);
    fake_.observer()->on_job_removed(job,
                                     JobOutcome{"failed", unavailable("libvirt is not reachable")},
                                     EventRecord{42, 1000, "JobRemoved", "5", "{}"});
  });
  MessagePtr removed = wait_signal("JobRemoved");
  ASSERT_TRUE(removed);
  uint64_t seq = 0;
  const char *result, *error_name, *error_message;
  ASSERT_GE(sd_bus_message_read(removed.get(), "tuosssss", &seq, &id, &job_path, &kind, &object,
                                &result, &error_name, &error_message),
            0);
  EXPECT_EQ(seq, 42u);
  EXPECT_EQ(id, 5u);
  EXPECT_EQ(job_path, path);
  EXPECT_STREQ(kind, "start");
  EXPECT_STREQ(object, kVmId);
  EXPECT_STREQ(result, "failed");
  EXPECT_STREQ(error_name, "org.nodemanager.NodeManager1.Error.Unavailable");
  EXPECT_STREQ(error_message, "libvirt is not reachable");
  EXPECT_EQ(managed_objects().count(path), 0u);

  // A successful job carries empty error fields.
  run_on_loop([&] {
    fake_.observer()->on_job_removed(job, JobOutcome{"done", Status::ok()},
                                     EventRecord{43, 1001, "JobRemoved", "5", "{}"});
  });
  removed = wait_signal("JobRemoved");
  ASSERT_TRUE(removed);
  ASSERT_GE(sd_bus_message_read(removed.get(), "tuosssss", &seq, &id, &job_path, &kind, &object,
                                &result, &error_name, &error_message),
            0);
  EXPECT_EQ(seq, 43u);
  EXPECT_STREQ(result, "done");
  EXPECT_STREQ(error_name, "");
  EXPECT_STREQ(error_message, "");
}

TEST_F(DbusServerTest, CancelOfAnUnknownJobIsUnknownObjectAndServiceErrorsMap) {
  const JobView job{
      .id = 9, .kind = "stop", .object_id = kVmId, .state = JobState::kQueued, .progress = 0};
  run_on_loop([&] { fake_.add_job(job); });
  BusError error;
  EXPECT_FALSE(call(job_object_path(10), kJobInterface, "Cancel", error, ""));
  EXPECT_EQ(error.name(), "org.freedesktop.DBus.Error.UnknownObject");
  fake_.fail_next(conflict("job 9 already finished its last step"));
  BusError error2;
  EXPECT_FALSE(call(job_object_path(9), kJobInterface, "Cancel", error2, ""));
  EXPECT_EQ(error2.name(), "org.nodemanager.NodeManager1.Error.Conflict");
  EXPECT_EQ(error2.message(), "job 9 already finished its last step");
}

TEST_F(DbusServerTest, EventsBecomeTheirSignalOrEventAppended) {
  subscribe(kManagerInterface.data(), nullptr);
  run_on_loop([&] {
    fake_.observer()->on_event({8, 1, "NetworkRepaired", "bridge 'nmbr7'", "{}"});
    fake_.observer()->on_event({9, 2, "VmStateChanged", kVmId,
                                R"({"name":"web-1","state":"running","reason":"started"})"});
    // JobRemoved events are signalled by on_job_removed() (with the job), never twice.
    fake_.observer()->on_event({10, 3, "JobRemoved", "4", "{}"});
  });
  MessagePtr m = wait_signal("VmStateChanged");
  ASSERT_TRUE(m);
  uint64_t seq = 0;
  const char *id, *name, *state, *reason;
  ASSERT_GE(sd_bus_message_read(m.get(), "tssss", &seq, &id, &name, &state, &reason), 0);
  EXPECT_EQ(seq, 9u);
  EXPECT_STREQ(id, kVmId);
  EXPECT_STREQ(name, "web-1");
  EXPECT_STREQ(state, "running");
  EXPECT_STREQ(reason, "started");

  MessagePtr other = wait_signal("EventAppended");
  ASSERT_TRUE(other);
  const char *kind, *object;
  ASSERT_GE(sd_bus_message_read(other.get(), "tss", &seq, &kind, &object), 0);
  EXPECT_EQ(seq, 8u);
  EXPECT_STREQ(kind, "NetworkRepaired");
  EXPECT_STREQ(object, "bridge 'nmbr7'");
  EXPECT_TRUE(signals_.empty()) << "the JobRemoved event must not produce a second signal";
}

// Replies and signals leave only when the service says what they report is durable, in the order
// they were made: the reply first, then the signal.
TEST_F(DbusServerTest, RepliesAndSignalsWaitForDurabilityAndKeepTheirOrder) {
  subscribe(kManagerInterface.data(), "VmStateChanged");
  run_on_loop([&] { fake_.holding = true; });
  SlotPtr list = call_async("ListVms", "s", "");
  ASSERT_EQ(wait_held(1), 1u);  // the call was handled, its reply held
  run_on_loop([&] {
    fake_.observer()->on_event({9, 2, "VmStateChanged", kVmId,
                                R"({"name":"web-1","state":"running","reason":"started"})"});
  });
  ASSERT_EQ(wait_held(2), 2u);
  pump_arrivals(2, std::chrono::milliseconds(200));
  EXPECT_TRUE(arrived_.empty()) << arrived_.front();

  run_on_loop([&] { fake_.release_all(); });
  pump_arrivals(2, kTimeout);
  EXPECT_EQ(arrived_, (std::vector<std::string>{"reply", "signal"}));
}

// Inside a call: the signal the call causes is held behind its reply, and an error reply is held
// like any other.
TEST_F(DbusServerTest, SignalsFromInsideACallAndErrorRepliesAreHeldInOrder) {
  subscribe(kManagerInterface.data(), "VmStateChanged");
  run_on_loop([&] {
    fake_.holding = true;
    fake_.on_create = [this] {
      fake_.observer()->on_event({9, 2, "VmStateChanged", kVmId,
                                  R"({"name":"web-1","state":"creating","reason":"requested"})"});
    };
  });
  SlotPtr create = call_async("CreateVm", "ss", "{}", "");
  ASSERT_EQ(wait_held(2), 2u);  // the reply, then the signal deferred behind it
  fake_.fail_next(Status(Code::kNotFound, "no vm 'nope'"));
  SlotPtr start = call_async("StartVm", "ss", "nope", "");
  ASSERT_EQ(wait_held(3), 3u);
  pump_arrivals(3, std::chrono::milliseconds(100));
  EXPECT_TRUE(arrived_.empty()) << arrived_.front();

  run_on_loop([&] {
    fake_.on_create = nullptr;
    fake_.release_all();
  });
  pump_arrivals(3, kTimeout);
  EXPECT_EQ(arrived_, (std::vector<std::string>{"reply", "signal", "error"}));
}

// A job that changes while its InterfacesAdded still waits for durability: that InterfacesAdded
// reads the properties when it goes out, so a PropertiesChanged behind it would repeat them and
// is not sent. Once the object is announced, changes are signalled again.
TEST_F(DbusServerTest, AChangeQueuedBehindItsObjectsAnnouncementIsCarriedByIt) {
  const std::string path = job_object_path(6);
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesAdded");
  subscribe(kManagerInterface.data(), "JobNew");
  subscribe("org.freedesktop.DBus.Properties", "PropertiesChanged", path.c_str());
  JobView job{.id = 6, .kind = "start", .object_id = kVmId, .state = JobState::kQueued};
  run_on_loop([&] {
    fake_.holding = true;
    fake_.add_job(job);
    fake_.observer()->on_job_added(job);
    job.state = JobState::kRunning;
    fake_.add_job(job);
    fake_.observer()->on_job_changed(job);
  });
  size_t held = 0;
  run_on_loop([&] { held = fake_.held.size(); });
  EXPECT_EQ(held, 1u) << "only the announcement waits";
  run_on_loop([&] { fake_.release_all(); });
  pump_arrivals(3, std::chrono::milliseconds(300));
  EXPECT_EQ(arrived_, (std::vector<std::string>{"signal", "signal"}));  // InterfacesAdded, JobNew
  BusError error;
  EXPECT_EQ(get_string_property(path, kJobInterface, "State", error), "running");

  run_on_loop([&] {
    job.progress = 0.5;
    fake_.add_job(job);
    fake_.observer()->on_job_changed(job);
  });
  EXPECT_TRUE(wait_signal("PropertiesChanged"));
}

// The same for a VM created and changed inside one call (whose signals wait behind its reply).
TEST_F(DbusServerTest, AVmChangedBeforeItsAnnouncementWentOutIsAnnouncedOnce) {
  const std::string path = vm_object_path(kVmId);
  subscribe("org.freedesktop.DBus.ObjectManager", "InterfacesAdded");
  subscribe("org.freedesktop.DBus.Properties", "PropertiesChanged", path.c_str());
  run_on_loop([&] {
    fake_.holding = true;
    fake_.on_create = [this] {
      auto vm = make_vm(kVmId, "web-1", "contoso");
      fake_.add_vm(vm);
      fake_.observer()->on_vm_added(vm);
      vm.state = "defining";
      fake_.add_vm(vm);
      fake_.observer()->on_vm_changed(vm);
    };
  });
  SlotPtr create = call_async("CreateVm", "ss", "{}", "");
  ASSERT_EQ(wait_held(2), 2u);  // the reply and the announcement; no PropertiesChanged
  run_on_loop([&] {
    fake_.on_create = nullptr;
    fake_.release_all();
  });
  pump_arrivals(3, std::chrono::milliseconds(300));
  EXPECT_EQ(arrived_, (std::vector<std::string>{"reply", "signal"}));
  BusError error;
  EXPECT_EQ(get_string_property(path, kVmInterface, "State", error), "defining");
}

TEST_F(DbusServerTest, ManagerPropertiesReadFromTheService) {
  fake_.add_event({77, 1, "VmStateChanged", kVmId, "{}"});
  BusError error;
  uint64_t last = 0;
  ASSERT_GE(
      sd_bus_get_property_trivial(client_.get(), kBusName.data(), kManagerPath.data(),
                                  kManagerInterface.data(), "LastEventSeq", &error.e, 't', &last),
      0)
      << error.message();
  EXPECT_EQ(last, 77u);
  EXPECT_FALSE(
      get_string_property(std::string(kManagerPath), kManagerInterface, "Version", error).empty());
}

TEST_F(DbusServerTest, ASecondServerCannotOwnTheName) {
  FakeNodeService other_service;
  auto other_loop = SdEventLoop::create();
  ASSERT_TRUE(other_loop.is_ok());
  auto other = DbusServer::create(**other_loop, bus_->address(), other_service);
  ASSERT_TRUE(other.is_ok()) << other.status().to_string();
  const Status s = (*other)->request_name();
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.to_string();
  EXPECT_TRUE((*other)->request_name("org.nodemanager.NodeManager1.Other").is_ok());
  EXPECT_TRUE((*other)->request_name("org.nodemanager.NodeManager1.Other").is_ok());
}

TEST_F(DbusServerTest, TheLoopEndsWithAFailureCodeWhenTheBusGoesAway) {
  auto ended = loop_ended_.get_future();
  EXPECT_EQ(ended.wait_for(50ms), std::future_status::timeout);
  bus_.reset();  // kills the dbus-daemon
  ASSERT_EQ(ended.wait_for(kTimeout), std::future_status::ready);
  EXPECT_EQ(loop_->exit_code(), EXIT_FAILURE);
}

TEST(DbusServerCreate, RefusesAnUnreachableAddress) {
  FakeNodeService service;
  auto loop = SdEventLoop::create();
  ASSERT_TRUE(loop.is_ok());
  auto server = DbusServer::create(**loop, "unix:path=/nonexistent/nm-test/bus", service);
  EXPECT_FALSE(server.is_ok());
  EXPECT_EQ(service.observer(), nullptr);
}

// ---------------------------------------------------------------------------------------------
// The contract: the running server's introspection equals the XML, member by member.

// interface -> member key ("method CreateVm", "signal JobNew", "property State") -> description
// (method/signal arguments in order as "direction type name", property "type access").
using Contract = std::map<std::string, std::map<std::string, std::string>>;

Contract parse_introspection(std::string xml) {
  xml = std::regex_replace(xml, std::regex("<!--[\\s\\S]*?-->"), "");
  static const std::regex tag_re(R"(<(/?)([A-Za-z]+)([^>]*?)(/?)>)");
  static const std::regex attr_re(R"re(([A-Za-z_]+)="([^"]*)")re");
  Contract out;
  std::string iface, member, kind;
  for (auto it = std::sregex_iterator(xml.begin(), xml.end(), tag_re); it != std::sregex_iterator();
       ++it) {
    const bool closing = (*it)[1].length() > 0;
    const std::string element = (*it)[2];
    const bool self_closing = (*it)[4].length() > 0;
    std::map<std::string, std::string> attrs;
    const std::string attr_text = (*it)[3];
    for (auto a = std::sregex_iterator(attr_text.begin(), attr_text.end(), attr_re);
         a != std::sregex_iterator(); ++a) {
      attrs[(*a)[1]] = (*a)[2];
    }
    if (element == "interface") {
      if (closing) {
        iface.clear();
      } else {
        iface = attrs["name"];
        out[iface];  // an interface without members still counts
      }
    } else if (iface.empty()) {
      continue;
    } else if (element == "method" || element == "signal") {
      if (closing) {
        member.clear();
      } else {
        kind = element;
        member = element + " " + attrs["name"];
        out[iface][member];
        if (self_closing) member.clear();
      }
    } else if (element == "arg" && !member.empty()) {
      std::string direction = attrs.count("direction") ? attrs["direction"] : "";
      if (direction.empty()) direction = kind == "method" ? "in" : "out";
      out[iface][member] += direction + " " + attrs["type"] + " " + attrs["name"] + "; ";
    } else if (element == "property" && !closing) {
      out[iface]["property " + attrs["name"]] = attrs["type"] + " " + attrs["access"];
    }
  }
  return out;
}

// Every difference between `expected` and `actual` for `iface`, one line each.
std::vector<std::string> contract_differences(const Contract& expected, const Contract& actual,
                                              const std::string& iface) {
  std::vector<std::string> diffs;
  if (!expected.count(iface)) return {"the XML has no interface " + iface};
  if (!actual.count(iface)) return {"the server has no interface " + iface};
  const auto& want = expected.at(iface);
  const auto& have = actual.at(iface);
  for (const auto& [key, desc] : want) {
    const auto it = have.find(key);
    if (it == have.end()) {
      diffs.push_back(iface + ": " + key + " is missing on the server");
    } else if (it->second != desc) {
      diffs.push_back(iface + ": " + key + " is '" + it->second + "' on the server, '" + desc +
                      "' in the XML");
    }
  }
  for (const auto& [key, desc] : have) {
    if (!want.count(key)) diffs.push_back(iface + ": " + key + " is not in the XML");
  }
  return diffs;
}

std::set<std::string> own_interfaces(const Contract& c) {
  std::set<std::string> out;
  for (const auto& [name, members] : c) {
    if (name.rfind("org.freedesktop.DBus.", 0) != 0) out.insert(name);
  }
  return out;
}

std::string read_contract_xml() {
  std::ifstream in(NM_DBUS_XML);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class DbusContractTest : public DbusServerTest {
 protected:
  Contract introspect(const std::string& path) {
    BusError error;
    MessagePtr reply = call(path, "org.freedesktop.DBus.Introspectable", "Introspect", error, "");
    EXPECT_TRUE(reply) << path << ": " << error.message();
    if (!reply) return {};
    const char* xml = nullptr;
    EXPECT_GE(sd_bus_message_read(reply.get(), "s", &xml), 0);
    return parse_introspection(xml != nullptr ? xml : "");
  }
};

TEST(DbusContractParser, ReadsTheRepositoryXml) {
  const Contract xml = parse_introspection(read_contract_xml());
  ASSERT_EQ(own_interfaces(xml),
            (std::set<std::string>{std::string(kManagerInterface), std::string(kVmInterface),
                                   std::string(kJobInterface)}));
  const auto& manager = xml.at(std::string(kManagerInterface));
  EXPECT_EQ(manager.at("method CreateVm"),
            "in s spec_json; in s request_id; out s vm_id; out o vm; out o job; ");
  EXPECT_EQ(manager.at("signal JobNew"), "out u job_id; out o job; out s kind; out s object_id; ");
  EXPECT_EQ(manager.at("property LastEventSeq"), "t read");
  EXPECT_EQ(xml.at(std::string(kJobInterface)).at("method Cancel"), "");
  EXPECT_EQ(xml.at(std::string(kVmInterface)).size(), 9u);
}

TEST(DbusContractParser, DifferencesAreFoundInBothDirections) {
  const Contract xml = parse_introspection(read_contract_xml());
  const std::string mgr(kManagerInterface);
  Contract changed = xml;
  changed[mgr]["method ListVms"] = "in s tenant; out a(ssstt) vms; ";
  changed[mgr].erase("signal JobRemoved");
  changed[mgr]["method Extra"] = "";
  const auto diffs = contract_differences(xml, changed, mgr);
  EXPECT_EQ(diffs.size(), 3u);
  EXPECT_TRUE(contract_differences(xml, xml, mgr).empty());
}

TEST_F(DbusContractTest, RunningServerMatchesTheXmlInterfaceByInterface) {
  const Contract xml = parse_introspection(read_contract_xml());
  ASSERT_FALSE(xml.empty()) << "could not read " << NM_DBUS_XML;
  run_on_loop([&] {
    fake_.add_vm(make_vm(kVmId, "web-1", "contoso"));
    fake_.add_job(
        {.id = 3, .kind = "create", .object_id = kVmId, .state = JobState::kQueued, .progress = 0});
  });
  const std::vector<std::pair<std::string, std::string>> objects = {
      {std::string(kManagerPath), std::string(kManagerInterface)},
      {vm_object_path(kVmId), std::string(kVmInterface)},
      {job_object_path(3), std::string(kJobInterface)},
  };
  for (const auto& [path, iface] : objects) {
    SCOPED_TRACE(path);
    const Contract live = introspect(path);
    EXPECT_EQ(own_interfaces(live), std::set<std::string>{iface});
    for (const auto& d : contract_differences(xml, live, iface)) ADD_FAILURE() << d;
  }
  // The manager object is also the ObjectManager.
  EXPECT_EQ(introspect(std::string(kManagerPath)).count("org.freedesktop.DBus.ObjectManager"), 1u);
  // Paths of VMs and jobs that do not exist are unknown objects.
  for (const std::string& path : {vm_object_path(kVmId2), job_object_path(4)}) {
    BusError error;
    EXPECT_FALSE(call(path, "org.freedesktop.DBus.Introspectable", "Introspect", error, ""));
    EXPECT_EQ(error.name(), "org.freedesktop.DBus.Error.UnknownObject") << path;
  }
}

}  // namespace
}  // namespace nm
