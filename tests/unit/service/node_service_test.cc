// NodeService and its reconciler against the fake hypervisor, a real SQLite state store and a
// real directory image store in a temp dir.
#include "nm/node_service.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "fakes/fake_hypervisor.h"
#include "fakes/fake_network.h"
#include "nm/core/fs.h"
#include "nm/imagestore/image_source.h"
#include "nm/network/names.h"

namespace nm {
namespace {

using namespace std::chrono_literals;
using nm::testing::FakeHypervisor;
using json = nlohmann::json;

// The event loop of a test: posted functions run when the test pumps it.
class ManualLoop final : public LoopExecutor {
 public:
  void post(std::function<void()> fn) override {
    {
      std::lock_guard lock(mu_);
      queue_.push_back(std::move(fn));
    }
    cv_.notify_all();
  }
  void post_idle(std::function<void()> fn) override { post(std::move(fn)); }
  void post_after(std::chrono::milliseconds delay, std::function<void()> fn) override {
    {
      std::lock_guard lock(mu_);
      delayed_.emplace(std::chrono::steady_clock::now() + delay, std::move(fn));
    }
    cv_.notify_all();
  }
  // Runs posted functions (and delayed ones once due) until `done()` holds; false after
  // `timeout`.
  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds timeout = 5s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (done()) return true;
      std::function<void()> fn;
      {
        std::unique_lock lock(mu_);
        for (;;) {
          const auto now = std::chrono::steady_clock::now();
          while (!delayed_.empty() && delayed_.begin()->first <= now) {
            queue_.push_back(std::move(delayed_.begin()->second));
            delayed_.erase(delayed_.begin());
          }
          if (!queue_.empty()) break;
          if (now >= deadline) return done();
          auto until = deadline;
          if (!delayed_.empty()) until = std::min(until, delayed_.begin()->first);
          cv_.wait_until(lock, until);
        }
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
      fn();
    }
  }

  // Runs what is posted (and due) for `d`: for outcomes that must not happen, or to let a
  // posted result reach the loop.
  void run_for(std::chrono::milliseconds d) {
    run_until([] { return false; }, d);
  }

  // Functions posted with a delay that have not run yet.
  size_t delayed_count() {
    std::lock_guard lock(mu_);
    return delayed_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::multimap<std::chrono::steady_clock::time_point, std::function<void()>> delayed_;
};

class RecordingObserver final : public ServiceObserver {
 public:
  void on_vm_added(const VmRecord& vm) override { added.push_back(vm.id.str()); }
  void on_vm_changed(const VmRecord&) override { ++changed; }
  void on_vm_removed(const VmId& id) override { removed.push_back(id.str()); }
  void on_job_added(const JobView& job) override { job_kinds.push_back(job.kind); }
  void on_job_changed(const JobView&) override {}
  void on_job_removed(const JobView& job, const JobOutcome& outcome, const EventRecord&) override {
    finished[job.id] = outcome;
  }
  void on_event(const EventRecord& e) override { events.push_back(e); }
  void on_health_changed(const HealthChange& c, const EventRecord& e) override {
    health_changes.push_back(c);
    health_seqs.push_back(e.seq);
  }
  void on_heartbeat(const Heartbeat& b) override { heartbeats.push_back(b); }
  std::vector<HealthChange> health_changes;
  std::vector<uint64_t> health_seqs;
  std::vector<Heartbeat> heartbeats;

  std::vector<std::string> states_of(const std::string& vm_id) const {
    std::vector<std::string> out;
    for (const auto& e : events) {
      if (e.kind == "VmStateChanged" && e.object_id == vm_id) {
        out.push_back(json::parse(e.payload_json).at("state").get<std::string>());
      }
    }
    return out;
  }

  std::vector<std::string> added, removed, job_kinds;
  int changed = 0;
  std::map<uint32_t, JobOutcome> finished;
  std::vector<EventRecord> events;
};

std::string sha256_hex(const std::string& data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr);
  std::string out;
  char buf[3];
  for (unsigned int i = 0; i < len; ++i) {
    std::snprintf(buf, sizeof buf, "%02x", md[i]);
    out += buf;
  }
  return out;
}

std::string spec(const std::string& name, const std::string& tenant = "contoso",
                 const std::string& extra = "") {
  return R"({"name":")" + name + R"(","tenant":")" + tenant +
         R"(","vcpus":1,"memory_mib":128,"image":"base:1")" + extra + "}";
}

std::string spec_on(const std::string& name, const std::string& image) {
  return R"({"name":")" + name + R"(","tenant":"contoso","vcpus":1,"memory_mib":128,"image":")" +
         image + R"("})";
}

class NodeServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.instances_dir = "/tmp/instances";
    options_.underlay_interface = "ul0";
    options_.disk_reserve_bytes = 0;
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("svc-" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::remove_all(dir_);
    ASSERT_TRUE(make_dirs(dir_.string()).is_ok());
    auto images = open_dir_image_store((dir_ / "images").string());
    ASSERT_TRUE(images.is_ok()) << images.status().to_string();
    images_ = std::move(*images);
    open_service();
    import("base:1", "disk", std::string(4096, 'x'));
  }

  void TearDown() override {
    if (service_) service_->shutdown();
    workers_.reset();
    service_.reset();
    std::filesystem::remove_all(dir_);
  }

  // (Re)opens the store and the service, as a daemon restart does. The fake hypervisor persists.
  void open_service() {
    if (service_) service_->shutdown();
    workers_.reset();
    service_.reset();
    store_.reset();
    // As nodemanagerd opens it: group commit, so jobs wait for a sync (the loop's idle work).
    SqliteOptions db_options;
    db_options.deferred_sync = true;
    auto store =
        open_sqlite_state_store((dir_ / "state.db").string(), db_options, clock_.now_realtime_us());
    ASSERT_TRUE(store.is_ok()) << store.status().to_string();
    store_ = std::move(*store);
    workers_ = std::make_unique<WorkerPool>(4);
    networks_ = std::make_unique<network::TenantNetworks>(
        links_, fw_, dhcp_, network::NetworkOptions{.underlay = "ul0"});
    obs_ = RecordingObserver{};
    service_ = make_node_service(
        ServiceDeps{*store_, hv_, *images_, *networks_, loop_, *workers_, clock_}, options_);
    service_->set_observer(&obs_);
    const Status s = service_->start();
    ASSERT_TRUE(s.is_ok()) << s.to_string();
  }

  // Waits for job `id` to end and returns its outcome.
  JobOutcome wait(uint32_t id) {
    EXPECT_TRUE(loop_.run_until([&] { return obs_.finished.count(id) > 0; })) << "job " << id;
    return obs_.finished[id];
  }
  void wait_done(uint32_t id) {
    const JobOutcome o = wait(id);
    EXPECT_EQ(o.result, "done") << o.error.to_string();
  }
  bool settle() {
    return loop_.run_until([&] { return service_->active_jobs() == 0; });
  }
  // The host check `name` as GetHealth shows it; nullopt when there is none.
  std::optional<HealthCheck> host_check(const std::string& name) {
    for (const auto& c : service_->health().checks) {
      if (c.name == name) return c;
    }
    return std::nullopt;
  }

  void import(const std::string& ref, const std::string& kind, const std::string& data,
              const std::string& tenant = "") {
    const auto path = dir_ / ("src-" + sha256_hex(data));
    std::ofstream(path) << data;
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    auto job = service_->import_image(ref, std::move(fd), sha256_hex(data), kind, tenant, "");
    ASSERT_TRUE(job.is_ok()) << job.status().to_string();
    wait_done(*job);
  }

  VmId create(const std::string& name, const std::string& extra = "") {
    auto r = service_->create_vm(spec(name, "contoso", extra), "");
    EXPECT_TRUE(r.is_ok()) << r.status().to_string();
    wait_done(r->job_id);
    return r->vm_id;
  }

  std::string state(const VmId& id) { return service_->get_vm(id.str())->state; }

  std::filesystem::path dir_;
  SystemClock clock_;
  FakeHypervisor hv_;
  ManualLoop loop_;
  ServiceOptions options_;
  std::unique_ptr<StateStore> store_;
  std::unique_ptr<ImageStore> images_;
  // The host's network state persists across service restarts, like the hypervisor's.
  testing::FakeLinks links_;
  testing::FakeFirewall fw_;
  testing::FakeDhcp dhcp_;
  std::unique_ptr<network::TenantNetworks> networks_;
  std::unique_ptr<WorkerPool> workers_;
  std::unique_ptr<NodeService> service_;
  RecordingObserver obs_;
};

// Group commit: a job acts on desired state only once a sync made it durable, and what waits for
// durability runs after that sync, in order, even when nothing new was written in between.
TEST_F(NodeServiceTest, JobsAndHeldFunctionsWaitForTheSync) {
  // Every write is synced soon, whether or not anything waits for it (the image import here).
  ASSERT_TRUE(loop_.run_until([&] { return store_->durable_seq() == store_->written_seq(); }));
  std::vector<std::string> order;
  service_->after_durable([&] { order.push_back("now"); });
  EXPECT_EQ(order, std::vector<std::string>{"now"});  // nothing written: runs at once

  auto created = service_->create_vm(spec("web-1"), "");
  ASSERT_TRUE(created.is_ok()) << created.status().to_string();
  EXPECT_LT(store_->durable_seq(), store_->written_seq());
  // Its VmStateChanged has a seq already; the seq shown outside held replies does not yet.
  EXPECT_LT(service_->durable_event_seq(), service_->last_event_seq());
  service_->after_durable([&] { order.push_back("after create"); });
  service_->after_durable([&] { order.push_back("behind it"); });
  // The workers are idle and real: had the job been handed to them, it would define the domain.
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(hv_.domain(created->vm_id.str()).has_value());
  EXPECT_EQ(order, std::vector<std::string>{"now"});

  wait_done(created->job_id);
  EXPECT_TRUE(hv_.domain(created->vm_id.str()).has_value());
  EXPECT_EQ(order, (std::vector<std::string>{"now", "after create", "behind it"}));
  ASSERT_TRUE(settle());
  EXPECT_TRUE(loop_.run_until([&] { return store_->durable_seq() == store_->written_seq(); }));
  EXPECT_EQ(service_->durable_event_seq(), service_->last_event_seq());
}

// At shutdown what waits is synced and released, but a held job is not started any more: the
// next start finishes it from the database.
TEST_F(NodeServiceTest, ReleaseAtShutdownSyncsAndSendsButStartsNoJob) {
  auto created = service_->create_vm(spec("web-1"), "");
  ASSERT_TRUE(created.is_ok()) << created.status().to_string();
  bool released = false;
  service_->after_durable([&] { released = true; });
  ASSERT_TRUE(service_->release_held().is_ok());
  EXPECT_TRUE(released);
  EXPECT_EQ(store_->durable_seq(), store_->written_seq());
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(hv_.domain(created->vm_id.str()).has_value());

  open_service();  // the next start: the create is finished under the same job
  EXPECT_TRUE(loop_.run_until([&] { return hv_.domain(created->vm_id.str()).has_value(); }));
  ASSERT_TRUE(settle());
  EXPECT_EQ(state(created->vm_id), "stopped");
}

TEST_F(NodeServiceTest, FullLifecycleDrivesTheHypervisorAndRecordsEveryState) {
  auto created = service_->create_vm(spec("web-1"), "req-1");
  ASSERT_TRUE(created.is_ok()) << created.status().to_string();
  const VmId id = created->vm_id;
  wait_done(created->job_id);

  auto dom = hv_.domain(id.str());
  ASSERT_TRUE(dom.has_value());
  ASSERT_TRUE(dom->info.owner.has_value());
  EXPECT_EQ(dom->info.owner->tenant.str(), "contoso");
  EXPECT_NE(dom->xml.find("<name>nm-web-1</name>"), std::string::npos);
  auto overlay = hv_.overlay(id.str());
  ASSERT_TRUE(overlay.has_value());
  EXPECT_EQ(overlay->base_path, images_->resolve("base:1")->path);
  EXPECT_EQ(overlay->base_format, "raw");
  EXPECT_EQ(state(id), "stopped");

  wait_done(*service_->start_vm("web-1", ""));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kRunning);
  EXPECT_EQ(state(id), "running");
  EXPECT_EQ(service_->get_vm("web-1")->power, PowerIntent::kRunning);

  wait_done(*service_->reboot_vm(id.str(), ""));
  wait_done(*service_->stop_vm(id.str(), false, ""));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff);
  EXPECT_EQ(state(id), "stopped");
  EXPECT_EQ(service_->get_vm(id.str())->state_reason, "shut down");

  wait_done(*service_->delete_vm("web-1", ""));
  EXPECT_FALSE(hv_.domain(id.str()).has_value());
  EXPECT_FALSE(hv_.overlay(id.str()).has_value());
  EXPECT_EQ(service_->get_vm(id.str()).status().code(), Code::kNotFound);
  EXPECT_EQ(obs_.removed, std::vector<std::string>{id.str()});

  EXPECT_EQ(obs_.states_of(id.str()),
            (std::vector<std::string>{"creating", "stopped", "running", "running", "stopped",
                                      "deleting", "deleted"}));
  // The ring holds the same, in order, with strictly increasing sequence numbers.
  auto replay = service_->events_since(0, 1000);
  ASSERT_TRUE(replay.is_ok());
  uint64_t prev = 0;
  for (const auto& e : *replay) {
    EXPECT_GT(e.seq, prev);
    prev = e.seq;
  }
  EXPECT_EQ(prev, service_->last_event_seq());
}

TEST_F(NodeServiceTest, BadRequestsAreRefusedAndChangeNothing) {
  import("private:1", "disk", "fabrikam-only", "fabrikam");
  import("kern:1", "kernel", "kernel-bytes");
  const uint64_t seq_before = service_->last_event_seq();
  struct Case {
    std::string spec;
    Code code;
    std::string field;
  };
  const std::vector<Case> cases = {
      {spec("a", "contoso", R"(,"colour":"red")"), Code::kInvalidArgument, "spec.colour"},
      {spec("Bad<name>"), Code::kInvalidArgument, "spec.name"},
      {R"({"name":"a","tenant":"contoso","vcpus":0,"memory_mib":128,"image":"base:1"})",
       Code::kInvalidArgument, "spec.vcpus"},
      {R"({"name":"a","tenant":"contoso","vcpus":1,"memory_mib":128,"image":"nope:1"})",
       Code::kNotFound, "spec.image"},
      {R"({"name":"a","tenant":"contoso","vcpus":1,"memory_mib":128,"image":"private:1"})",
       Code::kNotFound, "spec.image"},
      {R"({"name":"a","tenant":"contoso","vcpus":1,"memory_mib":128,"image":"kern:1"})",
       Code::kInvalidArgument, "spec.image"},
      {spec("a", "contoso", R"(,"networks":[{"network":"net-a"}])"), Code::kNotFound,
       "spec.networks[0].network"},
  };
  for (const auto& c : cases) {
    auto r = service_->create_vm(c.spec, "req-bad");
    ASSERT_FALSE(r.is_ok()) << c.spec;
    EXPECT_EQ(r.status().code(), c.code) << r.status().to_string();
    EXPECT_NE(r.status().message().find(c.field), std::string::npos) << r.status().to_string();
  }
  EXPECT_TRUE(service_->list_vms("").empty());
  EXPECT_EQ(hv_.domain_count(), 0u);
  EXPECT_EQ(service_->last_event_seq(), seq_before);

  create("web-1");
  auto dup = service_->create_vm(spec("web-1"), "");
  EXPECT_EQ(dup.status().code(), Code::kAlreadyExists);
  EXPECT_EQ(service_->list_vms("").size(), 1u);
  EXPECT_EQ(service_->start_vm("nope", "").status().code(), Code::kNotFound);
  EXPECT_EQ(service_->start_vm("web-1", "bad id!").status().code(), Code::kInvalidArgument);
}

TEST_F(NodeServiceTest, RetriedRequestIdReturnsTheFirstAnswerAlsoAfterRestart) {
  auto first = service_->create_vm(spec("web-1"), "create-web-1");
  ASSERT_TRUE(first.is_ok());
  wait_done(first->job_id);
  auto again = service_->create_vm(spec("web-1"), "create-web-1");
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(again->vm_id, first->vm_id);
  EXPECT_EQ(again->job_id, first->job_id);
  EXPECT_EQ(service_->list_vms("").size(), 1u);

  auto other = service_->create_vm(spec("web-2"), "create-web-1");
  EXPECT_EQ(other.status().code(), Code::kConflict);

  auto start = service_->start_vm("web-1", "start-1");
  ASSERT_TRUE(start.is_ok());
  wait_done(*start);

  open_service();
  settle();
  auto after = service_->create_vm(spec("web-1"), "create-web-1");
  ASSERT_TRUE(after.is_ok()) << after.status().to_string();
  EXPECT_EQ(after->vm_id, first->vm_id);
  EXPECT_EQ(*service_->start_vm("web-1", "start-1"), *start);
  EXPECT_EQ(service_->list_vms("").size(), 1u);
}

TEST_F(NodeServiceTest, JobsOfOneVmRunInOrderAndDifferentVmsInParallel) {
  options_.debug_job_delay = 200ms;
  open_service();
  auto a = service_->create_vm(spec("a"), "");
  auto b = service_->create_vm(spec("b"), "");
  ASSERT_TRUE(a.is_ok() && b.is_ok());
  auto a_start = service_->start_vm("a", "");
  ASSERT_TRUE(a_start.is_ok());
  // a's create and b's create run at once; a's start waits for a's create.
  EXPECT_EQ(service_->get_job(a->job_id)->state, JobState::kRunning);
  EXPECT_EQ(service_->get_job(b->job_id)->state, JobState::kRunning);
  EXPECT_EQ(service_->get_job(*a_start)->state, JobState::kQueued);
  wait_done(*a_start);
  EXPECT_TRUE(obs_.finished.count(a->job_id));
  EXPECT_EQ(state(a->vm_id), "running");
  wait_done(b->job_id);
}

TEST_F(NodeServiceTest, CancellingAQueuedStartRevertsTheDesiredPower) {
  options_.debug_job_delay = 300ms;
  open_service();
  auto a = service_->create_vm(spec("a"), "");
  auto start = service_->start_vm("a", "");
  ASSERT_TRUE(start.is_ok());
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kRunning);
  ASSERT_TRUE(service_->cancel_job(*start).is_ok());
  EXPECT_EQ(wait(*start).result, "cancelled");
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kStopped);
  wait_done(a->job_id);
  EXPECT_EQ(hv_.domain(a->vm_id.str())->info.state, DomainState::kShutOff);
  EXPECT_EQ(service_->cancel_job(9999).code(), Code::kNotFound);
}

TEST_F(NodeServiceTest, CancellingARunningCreateLeavesNothingBehind) {
  options_.debug_job_delay = 500ms;
  open_service();
  auto a = service_->create_vm(spec("a"), "");
  ASSERT_TRUE(a.is_ok());
  ASSERT_TRUE(service_->cancel_job(a->job_id).is_ok());
  EXPECT_EQ(wait(a->job_id).result, "cancelled");
  ASSERT_TRUE(settle());
  EXPECT_FALSE(hv_.domain(a->vm_id.str()).has_value());
  EXPECT_FALSE(hv_.overlay(a->vm_id.str()).has_value());
  EXPECT_TRUE(service_->list_vms("").empty());
}

TEST_F(NodeServiceTest, GracefulStopForcesPowerOffAfterTheTimeout) {
  options_.stop_timeout = 200ms;
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_ignore_acpi(true);
  wait_done(*service_->stop_vm("a", false, ""));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff);
  EXPECT_EQ(service_->get_vm("a")->state_reason, "powered off");
  EXPECT_EQ(hv_.calls("destroy_domain"), 1);
}

TEST_F(NodeServiceTest, FailedStepReportsTheErrorOnTheJobAndTheVm) {
  const VmId id = create("a");
  hv_.fail_next("start_domain", unavailable("qemu exploded"));
  auto job = service_->start_vm("a", "");
  const JobOutcome o = wait(*job);
  EXPECT_EQ(o.result, "failed");
  EXPECT_EQ(o.error.code(), Code::kUnavailable);
  EXPECT_EQ(state(id), "error");
  EXPECT_NE(service_->get_vm("a")->state_reason.find("qemu exploded"), std::string::npos);
}

// ---------------------------------------------------------------- reconciler drift cases

TEST_F(NodeServiceTest, AuditRedefinesAVanishedDomainAndKeepsItsDisk) {
  const VmId id = create("a");
  const int overlays_before = hv_.calls("create_overlay");
  hv_.remove_behind_our_back(id.str());
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] { return hv_.domain(id.str()).has_value(); }));
  settle();
  EXPECT_EQ(hv_.calls("create_overlay"), overlays_before);
  EXPECT_EQ(state(id), "stopped");
}

TEST_F(NodeServiceTest, AutostartVmThatStopsBehindOurBackIsStartedAgain) {
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_state_behind_our_back(id.str(), DomainState::kShutOff, DomainEventKind::kStopped);
  ASSERT_TRUE(
      loop_.run_until([&] { return hv_.domain(id.str())->info.state == DomainState::kRunning; }));
  settle();
  EXPECT_EQ(state(id), "running");
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kRunning);
}

TEST_F(NodeServiceTest, NonAutostartVmThatStopsIsRecordedAsStopped) {
  const VmId id = create("a", R"(,"autostart":false)");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_state_behind_our_back(id.str(), DomainState::kShutOff, DomainEventKind::kStopped);
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "stopped"; }));
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kStopped);
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff);
}

TEST_F(NodeServiceTest, VmStartedBehindOurBackIsStoppedAgain) {
  const VmId id = create("a");
  hv_.set_state_behind_our_back(id.str(), DomainState::kRunning, DomainEventKind::kStarted);
  ASSERT_TRUE(
      loop_.run_until([&] { return hv_.domain(id.str())->info.state == DomainState::kShutOff; }));
  settle();
  EXPECT_EQ(state(id), "stopped");
}

TEST_F(NodeServiceTest, OrphansAreReportedNotTouchedAndForeignDomainsIgnored) {
  const std::string orphan = "11111111-2222-4333-8444-555555555555";
  hv_.add_foreign_domain(orphan, "nm-ghost",
                         DomainOwner{VmId::trusted(orphan), TenantId::trusted("contoso"), 1});
  hv_.add_foreign_domain("99999999-2222-4333-8444-555555555555", "someone-elses");
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] {
    return std::any_of(obs_.events.begin(), obs_.events.end(),
                       [&](const EventRecord& e) { return e.kind == "OrphanFound"; });
  }));
  EXPECT_EQ(hv_.domain(orphan)->info.state, DomainState::kRunning);
  EXPECT_EQ(hv_.domain("99999999-2222-4333-8444-555555555555")->info.state, DomainState::kRunning);
  EXPECT_EQ(hv_.calls("destroy_domain"), 0);
}

TEST_F(NodeServiceTest, OrphanPolicyRemoveDeletesOnlyOurOrphans) {
  options_.orphan_policy = OrphanPolicy::kRemove;
  open_service();
  const std::string orphan = "11111111-2222-4333-8444-555555555555";
  hv_.add_foreign_domain(orphan, "nm-ghost",
                         DomainOwner{VmId::trusted(orphan), TenantId::trusted("contoso"), 1});
  hv_.add_foreign_domain("99999999-2222-4333-8444-555555555555", "someone-elses");
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] { return !hv_.domain(orphan).has_value(); }));
  EXPECT_TRUE(hv_.domain("99999999-2222-4333-8444-555555555555").has_value());
}

TEST_F(NodeServiceTest, RestartAdoptsRunningVmsWithoutTouchingThem) {
  const VmId a = create("a");
  const VmId b = create("b");
  wait_done(*service_->start_vm("a", ""));
  const int defines = hv_.calls("define_domain");
  const int starts = hv_.calls("start_domain");
  open_service();
  settle();
  EXPECT_EQ(obs_.added.size(), 2u);
  EXPECT_EQ(state(a), "running");
  EXPECT_EQ(state(b), "stopped");
  EXPECT_EQ(hv_.calls("define_domain"), defines);
  EXPECT_EQ(hv_.calls("start_domain"), starts);
}

TEST_F(NodeServiceTest, RestartOnAnEmptyHypervisorRestoresDesiredState) {
  const VmId a = create("a");
  const VmId b = create("b");
  wait_done(*service_->start_vm("a", ""));
  hv_.remove_behind_our_back(a.str());
  hv_.remove_behind_our_back(b.str());
  open_service();
  ASSERT_TRUE(settle());
  ASSERT_TRUE(hv_.domain(a.str()).has_value());
  ASSERT_TRUE(hv_.domain(b.str()).has_value());
  EXPECT_EQ(hv_.domain(a.str())->info.state, DomainState::kRunning);
  EXPECT_EQ(hv_.domain(b.str())->info.state, DomainState::kShutOff);
  EXPECT_EQ(state(a), "running");
}

TEST_F(NodeServiceTest, CrashMidCreateIsFinishedAtStartUp) {
  // The create was committed but the daemon died before its job ran.
  options_.debug_job_delay = 10s;
  open_service();
  auto r = service_->create_vm(spec("a"), "req-a");
  ASSERT_TRUE(r.is_ok());
  options_.debug_job_delay = 0ms;
  open_service();  // the old service is torn down mid-job, as by kill -9
  ASSERT_TRUE(settle());
  EXPECT_TRUE(hv_.domain(r->vm_id.str()).has_value());
  EXPECT_TRUE(hv_.overlay(r->vm_id.str()).has_value());
  EXPECT_EQ(state(r->vm_id), "stopped");
  EXPECT_EQ(service_->create_vm(spec("a"), "req-a")->vm_id, r->vm_id);
  // The client's job id was adopted by the reconciler: whoever waits for it gets its end.
  ASSERT_TRUE(obs_.finished.count(r->job_id));
  EXPECT_EQ(obs_.finished[r->job_id].result, "done");
}

TEST_F(NodeServiceTest, CrashMidDeleteIsFinishedAtStartUp) {
  const VmId id = create("a");
  options_.debug_job_delay = 10s;
  open_service();
  auto job = service_->delete_vm("a", "del-a");
  ASSERT_TRUE(job.is_ok());
  options_.debug_job_delay = 0ms;
  open_service();
  ASSERT_TRUE(settle());
  EXPECT_FALSE(hv_.domain(id.str()).has_value());
  EXPECT_FALSE(hv_.overlay(id.str()).has_value());
  EXPECT_TRUE(service_->list_vms("").empty());
  ASSERT_TRUE(obs_.finished.count(*job));
  EXPECT_EQ(obs_.finished[*job].result, "done");
  EXPECT_TRUE(store_->unfinished_jobs()->empty());
}

TEST_F(NodeServiceTest, InterruptedJobsWithNothingLeftToDoEndAtStartUp) {
  options_.debug_job_delay = 10s;
  open_service();
  auto r = service_->create_vm(spec("a"), "");
  ASSERT_TRUE(r.is_ok());
  const auto path = dir_ / "slow-src";
  std::ofstream(path) << "bytes";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  // The import job is queued behind nothing, but the daemon "dies" before it is looked at.
  auto import =
      service_->import_image("late:1", std::move(fd), sha256_hex("other"), "disk", "", "");
  ASSERT_TRUE(import.is_ok());
  EXPECT_EQ(store_->unfinished_jobs()->size(), 2u);
  options_.debug_job_delay = 0ms;
  open_service();
  ASSERT_TRUE(settle());
  EXPECT_EQ(obs_.finished[r->job_id].result, "done");
  ASSERT_TRUE(obs_.finished.count(*import));
  EXPECT_TRUE(store_->unfinished_jobs()->empty());
  // Every client job of the ring has exactly one JobRemoved.
  auto ring = service_->events_since(0, 1000);
  int removed_create = 0;
  for (const auto& e : *ring) {
    if (e.kind == "JobRemoved" && e.object_id == std::to_string(r->job_id)) ++removed_create;
  }
  EXPECT_EQ(removed_create, 1);
}

// libvirtd is not there when the daemon starts (boot order, a restart): the service starts on
// what the database knows, refuses VM changes (a retried request still gets its first answer),
// ends an interrupted import at once (no libvirt needed), and the first audit that reaches
// libvirt runs the start-up reconcile it postponed.
TEST_F(NodeServiceTest, WithoutLibvirtAtStartUpServesTheDatabaseAndReconcilesOnceItAnswers) {
  const VmId a = create("a");
  wait_done(*service_->start_vm("a", ""));
  create("b");
  options_.debug_job_delay = 10s;
  open_service();
  auto c = service_->create_vm(spec("c"), "req-c");  // interrupted: the daemon dies mid-job
  ASSERT_TRUE(c.is_ok()) << c.status().to_string();
  const auto path = dir_ / "late-src";
  std::ofstream(path) << "bytes";
  auto import = service_->import_image("late:1", UniqueFd(::open(path.c_str(), O_RDONLY)),
                                       sha256_hex("other"), "disk", "", "");
  ASSERT_TRUE(import.is_ok()) << import.status().to_string();
  options_.debug_job_delay = 0ms;
  service_->shutdown();
  hv_.set_state_behind_our_back(a.str(), DomainState::kShutOff, DomainEventKind::kStopped,
                                DomainCause::kOther);  // the host rebooted meanwhile
  hv_.set_connected(false, "libvirtd is not running");
  const int defines = hv_.calls("define_domain");

  open_service();
  EXPECT_TRUE(service_->startup_reconcile_pending());
  EXPECT_EQ(service_->list_vms("").size(), 3u);
  EXPECT_EQ(state(a), "running");  // what the database knew; nothing was looked at yet
  ASSERT_TRUE(loop_.run_until([&] { return obs_.finished.count(*import) > 0; }));
  EXPECT_EQ(obs_.finished[*import].result, "failed");  // "send it again", as after any restart
  auto refused = service_->create_vm(spec("d"), "");
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), Code::kUnavailable);
  EXPECT_NE(refused.status().message().find("waiting for libvirt"), std::string::npos)
      << refused.status().message();
  EXPECT_NE(refused.status().message().find("disconnected"), std::string::npos)  // the cause
      << refused.status().message();
  EXPECT_EQ(service_->start_vm("b", "").status().code(), Code::kUnavailable);
  EXPECT_EQ(service_->stop_vm("a", true, "").status().code(), Code::kUnavailable);
  EXPECT_EQ(service_->reboot_vm("a", "").status().code(), Code::kUnavailable);
  EXPECT_EQ(service_->delete_vm("b", "").status().code(), Code::kUnavailable);
  auto retried = service_->create_vm(spec("c"), "req-c");
  ASSERT_TRUE(retried.is_ok()) << retried.status().to_string();
  EXPECT_EQ(retried->vm_id, c->vm_id);
  EXPECT_EQ(retried->job_id, c->job_id);
  const int lists = hv_.calls("list_domains");
  service_->audit();  // still unreachable: nothing happens, the connection triggers the next one
  ASSERT_TRUE(loop_.run_until([&] { return hv_.calls("list_domains") > lists; }));
  loop_.run_for(100ms);  // its result reaches the loop
  EXPECT_TRUE(service_->startup_reconcile_pending());
  EXPECT_EQ(hv_.calls("define_domain"), defines);
  EXPECT_FALSE(obs_.finished.count(c->job_id));

  hv_.set_connected(true);
  service_->audit();  // what nodemanagerd does when the connection comes up
  ASSERT_TRUE(loop_.run_until([&] { return obs_.finished.count(c->job_id) > 0; }));
  ASSERT_TRUE(settle());
  EXPECT_FALSE(service_->startup_reconcile_pending());
  EXPECT_EQ(obs_.finished[c->job_id].result, "done");
  EXPECT_TRUE(hv_.domain(c->vm_id.str()).has_value());
  EXPECT_EQ(state(c->vm_id), "stopped");
  EXPECT_EQ(hv_.domain(a.str())->info.state, DomainState::kRunning);
  EXPECT_EQ(state(a), "running");
  EXPECT_TRUE(service_->health().checks.empty()) << "restored at start-up, not a crash";
  EXPECT_TRUE(store_->unfinished_jobs()->empty());
  auto d = service_->create_vm(spec("d"), "");
  ASSERT_TRUE(d.is_ok()) << d.status().to_string();
  wait_done(d->job_id);
}

// Connected, but reading libvirt fails otherwise (here: the overlay pool exists with another
// target): the libvirt check says so, refusals carry the reason, and the service retries by
// itself until the reading works, then reports libvirt ok again.
TEST_F(NodeServiceTest, AStartUpReconcileThatCannotReadLibvirtIsReportedAndRetried) {
  create("a");
  hv_.set_connected(false, "libvirtd is not running");
  bool reconciled = false;
  options_.on_startup_reconciled = [&] { reconciled = true; };
  open_service();
  hv_.set_connected(true);
  hv_.fail_next("list_overlays", Status(Code::kConflict, "pool 'nodemanager' has another target"));
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] {
    const auto lv = host_check("libvirt");
    return lv && lv->state == HealthState::kFailed;
  }));
  EXPECT_NE(service_->create_vm(spec("b"), "").status().message().find("another target"),
            std::string::npos);
  // No audit() from the test: the service's own retry runs the reconcile.
  ASSERT_TRUE(loop_.run_until([&] { return !service_->startup_reconcile_pending(); }));
  EXPECT_TRUE(reconciled);
  ASSERT_TRUE(loop_.run_until([&] { return service_->health().state == HealthState::kOk; }));
  EXPECT_TRUE(service_->create_vm(spec("b"), "").is_ok());
}

// While reading libvirt keeps failing, however many audits fail (the periodic one, each
// reconnect's, the re-runs), one retry at a time is armed: no pile of timers, no audit storm.
TEST_F(NodeServiceTest, AStartUpReconcileThatKeepsFailingRetriesOneAtATime) {
  hv_.set_connected(false, "libvirtd is not running");
  open_service();
  hv_.set_connected(true);
  hv_.fail_always("list_overlays", Status(Code::kConflict, "pool 'nodemanager' is elsewhere"));
  for (int i = 0; i < 4; ++i) {  // four audits, each after the previous one failed
    const int before = hv_.calls("list_domains");
    service_->audit();
    ASSERT_TRUE(loop_.run_until([&] { return hv_.calls("list_domains") > before; }));
    loop_.run_for(20ms);  // its result reaches the loop
  }
  EXPECT_EQ(loop_.delayed_count(), 1u) << "one armed retry, not one per failed audit";
  EXPECT_TRUE(service_->startup_reconcile_pending());
  hv_.fail_always("list_overlays", Status::ok());
  ASSERT_TRUE(loop_.run_until([&] { return !service_->startup_reconcile_pending(); }, 10s));
}

// A reconnect while reading libvirt keeps failing (the start-up reconcile waits, libvirt is
// connected): the libvirt check stays failed instead of turning ok until the audit fails again
// (it flapped ok -> failed at every reconnect). Once reading works, the reconcile turns it ok.
TEST_F(NodeServiceTest, AReconnectWhileReadingLibvirtFailsDoesNotFlapTheLibvirtCheck) {
  auto libvirt_check = [&] {
    const auto lv = host_check("libvirt");
    return lv ? std::make_pair(lv->state, lv->reason)
              : std::make_pair(HealthState::kOk, std::string("no libvirt check"));
  };
  hv_.set_connected(false, "libvirtd is not running");
  open_service();
  hv_.set_connected(true);
  hv_.fail_always("list_overlays", Status(Code::kConflict, "pool 'nodemanager' is elsewhere"));
  service_->libvirt_connection_changed(true, "connected to 'test:///default'");
  EXPECT_EQ(libvirt_check().first, HealthState::kOk) << "nothing failed yet: ok on connecting";
  ASSERT_TRUE(loop_.run_until([&] { return libvirt_check().first == HealthState::kFailed; }));
  EXPECT_NE(libvirt_check().second.find("elsewhere"), std::string::npos) << libvirt_check().second;

  service_->libvirt_connection_changed(false, "connection to 'test:///default' lost: gone");
  EXPECT_EQ(libvirt_check().second, "connection to 'test:///default' lost: gone");
  service_->libvirt_connection_changed(true, "connected to 'test:///default'");
  EXPECT_EQ(libvirt_check().first, HealthState::kFailed) << "still cannot read libvirt";
  loop_.run_for(50ms);  // the reconnect's audit fails again
  EXPECT_EQ(libvirt_check().first, HealthState::kFailed);
  EXPECT_TRUE(service_->startup_reconcile_pending());

  hv_.fail_always("list_overlays", Status::ok());
  ASSERT_TRUE(loop_.run_until([&] { return !service_->startup_reconcile_pending(); }, 10s));
  EXPECT_EQ(libvirt_check().first, HealthState::kOk) << libvirt_check().second;
}

// A lifecycle event while the start-up reconcile waits is not judged (nothing has been looked
// at yet) but not lost either: the reconcile is followed by another audit.
TEST_F(NodeServiceTest, EventsWhileTheStartUpReconcileWaitsAreFollowedByAnAudit) {
  const VmId a = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_connected(false, "libvirtd is not running");
  open_service();
  hv_.crash(a.str(), DomainCause::kGuestCrashed);  // an event the service sees while it waits
  loop_.run_for(50ms);                             // the posted event runs
  EXPECT_TRUE(service_->health().checks.empty()) << "not judged while waiting";
  const int lists = hv_.calls("list_domains");
  hv_.set_connected(true);
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] { return hv_.calls("list_domains") >= lists + 2; }))
      << "no audit after the start-up reconcile";
  ASSERT_TRUE(settle());
  EXPECT_EQ(hv_.domain(a.str())->info.state, DomainState::kRunning);
}

// audit() while one is in flight is not dropped: it runs once more after it.
TEST_F(NodeServiceTest, AnAuditAskedForDuringAnotherRunsAfterIt) {
  create("a");
  ASSERT_TRUE(settle());
  const int lists = hv_.calls("list_domains");
  service_->audit();
  service_->audit();  // the first is still on its worker or on its way back
  ASSERT_TRUE(loop_.run_until([&] { return hv_.calls("list_domains") >= lists + 2; }));
}

TEST_F(NodeServiceTest, ImagesInUseCannotBeRemoved) {
  create("web-1");
  const Status s = service_->remove_image("base:1", "");
  EXPECT_EQ(s.code(), Code::kConflict);
  EXPECT_NE(s.message().find("'web-1'"), std::string::npos);
  EXPECT_TRUE(images_->resolve("base:1").is_ok());
  wait_done(*service_->delete_vm("web-1", ""));
  EXPECT_TRUE(service_->remove_image("base:1", "").is_ok());
  EXPECT_EQ(images_->resolve("base:1").status().code(), Code::kNotFound);
}

TEST_F(NodeServiceTest, ImportRejectsAWrongDigestAndKeepsNothing) {
  const auto path = dir_ / "bad-src";
  std::ofstream(path) << "some bytes";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  auto job = service_->import_image("bad:1", std::move(fd), std::string(64, 'a'), "disk", "", "");
  ASSERT_TRUE(job.is_ok());
  const JobOutcome o = wait(*job);
  EXPECT_EQ(o.result, "failed");
  EXPECT_EQ(o.error.code(), Code::kInvalidArgument);
  EXPECT_EQ(images_->resolve("bad:1").status().code(), Code::kNotFound);
}

// A shared image store in memory: counts transfers; `gate` holds every fetch until opened.
class FakeSource final : public ImageSource {
 public:
  void add(const std::string& ref, const std::string& bytes, const std::string& kind = "disk") {
    std::lock_guard lock(mu_);
    blobs_["sha256:" + sha256_hex(bytes)] = bytes;
    manifests_.insert_or_assign(
        ref, ImageManifest{Digest::trusted("sha256:" + sha256_hex(bytes)), bytes.size(),
                           ImageFormat::kRaw, *parse_image_kind(kind, "kind")});
  }
  void corrupt(const std::string& ref) {
    std::lock_guard lock(mu_);
    auto& b = blobs_[manifests_.at(ref).digest.str()];
    b[0] = static_cast<char>(b[0] ^ 1);
  }
  void close_gate() {
    std::lock_guard lock(mu_);
    gate_open_ = false;
  }
  void open_gate() {
    {
      std::lock_guard lock(mu_);
      gate_open_ = true;
    }
    cv_.notify_all();
  }
  int fetches() const {
    std::lock_guard lock(mu_);
    return fetches_;
  }
  const std::string& describe() const override { return name_; }
  Result<ImageManifest> manifest(const ImageRef& ref) override {
    std::lock_guard lock(mu_);
    auto it = manifests_.find(ref.str());
    if (it == manifests_.end()) return not_found("manifest '" + ref.str() + "' not in fake");
    return it->second;
  }
  Status fetch(const Digest& digest, uint64_t, const BlobSink& sink,
               const std::atomic<bool>*) override {
    std::string bytes;
    {
      std::unique_lock lock(mu_);
      ++fetches_;
      cv_.wait(lock, [&] { return gate_open_; });
      bytes = blobs_.at(digest.str());
    }
    return sink(std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }

 private:
  const std::string name_ = "fake:";
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool gate_open_ = true;
  int fetches_ = 0;
  std::map<std::string, ImageManifest> manifests_;
  std::map<std::string, std::string> blobs_;
};

class NodeServiceImageTest : public NodeServiceTest {
 protected:
  void SetUp() override {
    options_.image_sources = {&source_};
    source_.add("remote:1", std::string(8192, 'r'));
    NodeServiceTest::SetUp();
  }
  std::vector<std::string> event_kinds() const {
    std::vector<std::string> out;
    for (const auto& e : obs_.events) out.push_back(e.kind);
    return out;
  }
  FakeSource source_;
};

TEST_F(NodeServiceImageTest, CreateOfAnUncachedImagePullsItOnceForConcurrentCreates) {
  source_.close_gate();
  std::vector<CreateVmReply> replies;
  for (int i = 0; i < 6; ++i) {
    auto r = service_->create_vm(spec_on("web-" + std::to_string(i), "remote:1"), "");
    ASSERT_TRUE(r.is_ok()) << r.status().to_string();
    replies.push_back(*r);
  }
  // Pending: the record does not name a digest yet.
  EXPECT_EQ(json::parse(vm_record_to_json(*service_->get_vm("web-0"))).at("image_digest"), "");
  source_.open_gate();
  for (const auto& r : replies) wait_done(r.job_id);
  EXPECT_EQ(source_.fetches(), 1);
  const auto cached = images_->resolve("remote:1");
  ASSERT_TRUE(cached.is_ok()) << cached.status().to_string();
  for (const auto& r : replies) {
    EXPECT_EQ(service_->get_vm(r.vm_id.str())->image_digest, cached->digest);
  }
  // The database knows the digest: a restart still counts the VMs as users.
  open_service();
  const auto entries = service_->list_images();
  const auto remote = std::find_if(entries.begin(), entries.end(), [](const ImageEntry& e) {
    return e.info.ref && e.info.ref->str() == "remote:1";
  });
  ASSERT_NE(remote, entries.end());
  EXPECT_EQ(remote->users.size(), 6u);
}

TEST_F(NodeServiceImageTest, AFailedPullFailsTheCreateAndLeavesNoVm) {
  source_.corrupt("remote:1");
  auto r = service_->create_vm(spec_on("web-1", "remote:1"), "");
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const JobOutcome o = wait(r->job_id);
  EXPECT_EQ(o.result, "failed");
  EXPECT_NE(o.error.message().find("spec.image"), std::string::npos) << o.error.to_string();
  ASSERT_TRUE(settle());
  EXPECT_EQ(service_->get_vm("web-1").status().code(), Code::kNotFound);
  EXPECT_EQ(images_->resolve("remote:1").status().code(), Code::kNotFound);
  EXPECT_TRUE(hv_.list_domains()->empty());
}

TEST_F(NodeServiceImageTest, APulledDigestIsRecordedBeforeTheDiskIsBuiltOnIt) {
  // The domain cannot be defined, after the overlay was made on the pulled blob: the record must
  // still name that blob, so that neither RemoveImage nor GC can take it from under the disk.
  hv_.fail_next("define_domain", unavailable("libvirt said no"));
  auto r = service_->create_vm(spec_on("web-1", "remote:1"), "");
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(wait(r->job_id).result, "failed");
  ASSERT_TRUE(settle());
  const auto pulled = images_->resolve("remote:1");
  ASSERT_TRUE(pulled.is_ok());
  ASSERT_TRUE(service_->get_vm("web-1").is_ok());
  EXPECT_EQ(service_->get_vm("web-1")->image_digest, pulled->digest);
  // The tag moves on; the old blob still belongs to the VM.
  source_.add("remote:1", std::string(4096, 'n'));
  wait_done(*service_->pull_image("remote:1", ""));
  EXPECT_EQ(service_->remove_image(pulled->digest.str(), "").code(), Code::kConflict);
  auto gc = service_->collect_images(0s, false);
  ASSERT_TRUE(gc.is_ok());
  for (const auto& c : gc->remove) EXPECT_NE(c.digest, pulled->digest);
  EXPECT_TRUE(images_->resolve(pulled->digest.str()).is_ok());
}

TEST_F(NodeServiceImageTest, APendingCreateInterruptedByARestartIsUndoneWhenItsPullFails) {
  source_.corrupt("remote:1");
  auto r = service_->create_vm(spec_on("web-1", "remote:1"), "");
  ASSERT_TRUE(r.is_ok());
  // The daemon goes away before the job's outcome is recorded.
  open_service();
  ASSERT_TRUE(settle());
  EXPECT_EQ(service_->get_vm("web-1").status().code(), Code::kNotFound);
  EXPECT_TRUE(hv_.list_domains()->empty());
  EXPECT_EQ(images_->resolve("remote:1").status().code(), Code::kNotFound);
}

TEST_F(NodeServiceImageTest, AnImageMissingEverywhereIsRefusedAtOnceOrByTheJob) {
  // Not in any source: the create job fails, nothing stays.
  auto r = service_->create_vm(spec_on("web-1", "nope:1"), "");
  ASSERT_TRUE(r.is_ok());
  const JobOutcome o = wait(r->job_id);
  EXPECT_EQ(o.error.code(), Code::kNotFound) << o.error.to_string();
  ASSERT_TRUE(settle());
  EXPECT_EQ(service_->get_vm("web-1").status().code(), Code::kNotFound);
  // A digest is never pulled: refused synchronously.
  auto d = service_->create_vm(spec_on("web-2", "sha256:" + std::string(64, 'e')), "");
  EXPECT_EQ(d.status().code(), Code::kNotFound);
}

TEST_F(NodeServiceImageTest, PullJobReportsBytesAndAnEvent) {
  auto job = service_->pull_image("remote:1", "pull-1");
  ASSERT_TRUE(job.is_ok()) << job.status().to_string();
  wait_done(*job);
  const auto kinds = event_kinds();
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "ImagePulled"), kinds.end());
  EXPECT_TRUE(images_->resolve("remote:1").is_ok());
  // A retry with the same request id answers with the same job.
  EXPECT_EQ(*service_->pull_image("remote:1", "pull-1"), *job);
  EXPECT_EQ(service_->pull_image("bad ref", "").status().code(), Code::kInvalidArgument);
}

TEST_F(NodeServiceImageTest, GcKeepsImagesInUseAndPinnedAndRemovesTheRest) {
  source_.add("spare:1", std::string(100, 's'));
  source_.add("kept:1", std::string(100, 'k'));
  for (const char* ref : {"remote:1", "spare:1", "kept:1"}) {
    wait_done(*service_->pull_image(ref, ""));
  }
  create("web-1");  // uses base:1
  auto r = service_->create_vm(spec_on("web-2", "remote:1"), "");
  ASSERT_TRUE(r.is_ok());
  wait_done(r->job_id);
  ASSERT_TRUE(service_->pin_image("kept:1", true, "").is_ok());

  auto dry = service_->collect_images(0s, true);
  ASSERT_TRUE(dry.is_ok());
  ASSERT_EQ(dry->remove.size(), 1u);
  EXPECT_EQ(dry->remove[0].tags.at(0).str(), "spare:1");
  EXPECT_TRUE(images_->resolve("spare:1").is_ok());  // a dry run removes nothing

  // Not old enough under the default age.
  EXPECT_TRUE(service_->collect_images(std::nullopt, false)->remove.empty());
  auto gc = service_->collect_images(0s, false);
  ASSERT_TRUE(gc.is_ok());
  ASSERT_EQ(gc->remove.size(), 1u);
  EXPECT_EQ(gc->bytes, 100u);
  EXPECT_EQ(images_->resolve("spare:1").status().code(), Code::kNotFound);
  EXPECT_TRUE(images_->resolve("remote:1").is_ok());
  EXPECT_TRUE(images_->resolve("base:1").is_ok());
  EXPECT_TRUE(images_->resolve("kept:1").is_ok());

  ASSERT_TRUE(service_->pin_image("kept:1", false, "").is_ok());
  EXPECT_EQ(service_->collect_images(0s, false)->remove.size(), 1u);
  EXPECT_EQ(images_->resolve("kept:1").status().code(), Code::kNotFound);
  EXPECT_EQ(service_->pin_image("kept:1", true, "").code(), Code::kNotFound);
}

TEST_F(NodeServiceImageTest, VerifyFindsACorruptBlobAndFailsTheJob) {
  wait_done(*service_->pull_image("remote:1", ""));
  auto ok = service_->verify_images({}, "");
  ASSERT_TRUE(ok.is_ok());
  wait_done(*ok);
  const auto info = images_->resolve("remote:1");
  ASSERT_TRUE(info.is_ok());
  std::filesystem::permissions(info->path, std::filesystem::perms::owner_write,
                               std::filesystem::perm_options::add);
  {
    std::fstream f(info->path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(10);
    f.put('Z');
  }
  auto bad = service_->verify_images({"remote:1"}, "");
  ASSERT_TRUE(bad.is_ok());
  const JobOutcome o = wait(*bad);
  EXPECT_EQ(o.result, "failed");
  EXPECT_NE(o.error.message().find(info->digest.str()), std::string::npos);
  const auto kinds = event_kinds();
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "ImageCorrupt"), kinds.end());
  EXPECT_EQ(service_->verify_images({"nope:1"}, "").status().code(), Code::kNotFound);
}

TEST_F(NodeServiceTest, CreateIsRefusedWhenTheInstancesFilesystemIsBelowItsReserve) {
  options_.instances_dir = dir_.string();
  options_.disk_reserve_bytes = uint64_t{1} << 62;
  open_service();
  auto r = service_->create_vm(spec("web-1"), "");
  EXPECT_EQ(r.status().code(), Code::kInsufficientCapacity);
  EXPECT_NE(r.status().message().find("disk-reserve-mib"), std::string::npos);
  EXPECT_TRUE(service_->list_vms("").empty());
}

// Delegates to a FakeHypervisor; while closed, list_overlays() blocks, so an audit holds a
// snapshot of list_domains() taken before whatever the test does next.
class GatedHypervisor final : public Hypervisor {
 public:
  explicit GatedHypervisor(FakeHypervisor& hv) : hv_(hv) {}
  std::string default_domain_type() const override { return hv_.default_domain_type(); }
  Result<std::vector<DomainInfo>> list_domains() override { return hv_.list_domains(); }
  Result<std::optional<DomainInfo>> get_domain(const VmId& id) override {
    return hv_.get_domain(id);
  }
  Status define_domain(const std::string& xml) override { return hv_.define_domain(xml); }
  Status start_domain(const VmId& id) override { return hv_.start_domain(id); }
  Status shutdown_domain(const VmId& id) override { return hv_.shutdown_domain(id); }
  Status destroy_domain(const VmId& id) override { return hv_.destroy_domain(id); }
  Status reboot_domain(const VmId& id) override { return hv_.reboot_domain(id); }
  Status undefine_domain(const VmId& id) override { return hv_.undefine_domain(id); }
  Result<std::string> create_overlay(const VmId& id, const std::string& b, const std::string& f,
                                     uint64_t c) override {
    return hv_.create_overlay(id, b, f, c);
  }
  Result<std::optional<std::string>> find_overlay(const VmId& id) override {
    return hv_.find_overlay(id);
  }
  Status delete_overlay(const VmId& id) override { return hv_.delete_overlay(id); }
  Result<std::vector<VmId>> list_overlays() override {
    std::unique_lock lock(mu_);
    if (closed_) {
      blocked_ = true;
      cv_.notify_all();
      cv_.wait(lock, [&] { return !closed_; });
    }
    ++passed_;
    cv_.notify_all();
    lock.unlock();
    return hv_.list_overlays();
  }
  void set_event_handler(EventHandler h) override { hv_.set_event_handler(std::move(h)); }
  Result<HostInfo> host_info() override { return hv_.host_info(); }
  bool connected() const override { return hv_.connected(); }
  void set_connection_handler(ConnectionHandler h) override {
    hv_.set_connection_handler(std::move(h));
  }

  void close() {
    std::lock_guard lock(mu_);
    closed_ = true;
    blocked_ = false;
  }
  void wait_blocked() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return blocked_; });
  }
  void open() {
    {
      std::lock_guard lock(mu_);
      closed_ = false;
    }
    cv_.notify_all();
  }

 private:
  FakeHypervisor& hv_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false, blocked_ = false;
  int passed_ = 0;
};

// R1: idempotency of DeleteVm once the delete has finished (also across a restart).
TEST_F(NodeServiceTest, RetriedDeleteAfterItFinishedReturnsTheFirstAnswer) {
  create("a");
  auto first = service_->delete_vm("a", "del-a");
  ASSERT_TRUE(first.is_ok());
  wait_done(*first);
  auto again = service_->delete_vm("a", "del-a");
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_EQ(*again, *first);
  open_service();
  ASSERT_TRUE(settle());
  auto after = service_->delete_vm("a", "del-a");
  ASSERT_TRUE(after.is_ok()) << after.status().to_string();
  EXPECT_EQ(*after, *first);
}

// R2: an audit snapshot taken before a user's start must not flip the desired power back.
TEST_F(NodeServiceTest, StaleAuditSnapshotDoesNotUndoAStartThatFinishedMeanwhile) {
  const VmId id = create("a", R"(,"autostart":false)");
  GatedHypervisor gated(hv_);
  service_->shutdown();
  workers_.reset();
  service_.reset();
  workers_ = std::make_unique<WorkerPool>(4);
  service_ = make_node_service(
      ServiceDeps{*store_, gated, *images_, *networks_, loop_, *workers_, clock_}, options_);
  service_->set_observer(&obs_);
  ASSERT_TRUE(service_->start().is_ok());
  ASSERT_TRUE(settle());

  gated.close();
  service_->audit();  // lists domains ('a' shut off), then blocks in list_overlays
  gated.wait_blocked();
  wait_done(*service_->start_vm("a", ""));
  gated.open();
  loop_.run_for(300ms);  // the stale audit result is applied
  service_->audit();
  loop_.run_for(300ms);
  settle();
  const PowerIntent power = service_->get_vm("a")->power;
  const DomainState actual = hv_.domain(id.str())->info.state;
  service_->shutdown();
  workers_.reset();
  service_.reset();
  EXPECT_EQ(power, PowerIntent::kRunning);
  EXPECT_EQ(actual, DomainState::kRunning);
}

// R3: a client-chosen id that equals a foreign domain's UUID must not let us touch that domain.
TEST_F(NodeServiceTest, CreateWithTheIdOfAForeignDomainLeavesThatDomainAlone) {
  const std::string foreign = "99999999-2222-4333-8444-555555555555";
  hv_.add_foreign_domain(foreign, "someone-elses");
  auto r = service_->create_vm(spec("a", "contoso", R"(,"id":")" + foreign + R"(")"), "");
  if (r.is_ok()) {
    wait(r->job_id);
    ASSERT_TRUE(settle());
    auto del = service_->delete_vm("a", "");
    if (del.is_ok()) wait(*del);
    ASSERT_TRUE(settle());
  }
  auto dom = hv_.domain(foreign);
  ASSERT_TRUE(dom.has_value()) << "foreign domain was undefined";
  EXPECT_EQ(dom->info.name, "someone-elses");
  EXPECT_FALSE(dom->info.owner.has_value()) << "foreign domain was redefined with our XML";
  EXPECT_EQ(dom->info.state, DomainState::kRunning);
}

// R4: cancelling an older queued power job must not override a newer one.
TEST_F(NodeServiceTest, CancellingAnOlderQueuedStartKeepsTheNewestDesiredPower) {
  options_.debug_job_delay = 300ms;
  open_service();
  auto a = service_->create_vm(spec("a"), "");  // runs and holds the VM's queue
  ASSERT_TRUE(a.is_ok());
  auto s1 = service_->start_vm("a", "");
  auto s2 = service_->stop_vm("a", false, "");
  auto s3 = service_->start_vm("a", "");
  ASSERT_TRUE(s1.is_ok() && s2.is_ok() && s3.is_ok());
  ASSERT_TRUE(service_->cancel_job(*s1).is_ok());
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kRunning);
  ASSERT_TRUE(settle());
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kRunning);
  EXPECT_EQ(hv_.domain(a->vm_id.str())->info.state, DomainState::kRunning);
}

// R5: a live subscriber sees every committed event, in order, with no gaps.
TEST_F(NodeServiceTest, ObserversSeeEverySequenceNumberOfTheRing) {
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_state_behind_our_back(id.str(), DomainState::kShutOff, DomainEventKind::kStopped);
  ASSERT_TRUE(
      loop_.run_until([&] { return hv_.domain(id.str())->info.state == DomainState::kRunning; }));
  settle();
  wait_done(*service_->delete_vm("a", ""));
  auto ring = service_->events_since(0, 10000);
  ASSERT_TRUE(ring.is_ok());
  std::vector<uint64_t> seen, stored;
  for (const auto& e : obs_.events) seen.push_back(e.seq);
  for (const auto& e : *ring) stored.push_back(e.seq);
  EXPECT_EQ(seen, stored);
}

TEST_F(NodeServiceTest, DeleteFinishesWhenTheDomainIsAlreadyGone) {
  const VmId id = create("a");
  hv_.remove_behind_our_back(id.str());
  hv_.fail_next("destroy_domain", not_found("no domain"));
  wait_done(*service_->delete_vm("a", ""));
  EXPECT_TRUE(service_->list_vms("").empty());
  EXPECT_FALSE(hv_.overlay(id.str()).has_value());
}

TEST_F(NodeServiceTest, CrashedAutostartVmIsStartedAgain) {
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.set_state_behind_our_back(id.str(), DomainState::kCrashed, DomainEventKind::kCrashed);
  ASSERT_TRUE(
      loop_.run_until([&] { return hv_.domain(id.str())->info.state == DomainState::kRunning; }));
  settle();
  EXPECT_EQ(obs_.states_of(id.str()).back(), "running");
  const auto states = obs_.states_of(id.str());
  EXPECT_NE(std::find(states.begin(), states.end(), "crashed"), states.end());
}

TEST_F(NodeServiceTest, VanishedDomainWithoutAutostartIsRedefinedStopped) {
  const VmId id = create("a", R"(,"autostart":false)");
  wait_done(*service_->start_vm("a", ""));
  hv_.remove_behind_our_back(id.str());
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] { return hv_.domain(id.str()).has_value(); }));
  settle();
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff);
  EXPECT_EQ(service_->get_vm("a")->power, PowerIntent::kStopped);
  EXPECT_EQ(state(id), "stopped");
}

TEST_F(NodeServiceTest, DomainWithOurIdButNoMetadataIsNeverTouched) {
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.remove_behind_our_back(id.str());
  hv_.add_foreign_domain(id.str(), "impostor");
  hv_.set_state_behind_our_back(id.str(), DomainState::kShutOff, DomainEventKind::kStopped);
  service_->audit();
  loop_.run_for(300ms);
  settle();
  EXPECT_EQ(hv_.domain(id.str())->info.name, "impostor");
  EXPECT_FALSE(hv_.domain(id.str())->info.owner.has_value());
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff);
}

TEST_F(NodeServiceTest, OrphanOverlayIsReportedThenRemovedByPolicy) {
  const VmId ghost = VmId::trusted("22222222-2222-4333-8444-555555555555");
  ASSERT_TRUE(hv_.create_overlay(ghost, "/base", "raw", 1).is_ok());
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] {
    return std::any_of(obs_.events.begin(), obs_.events.end(), [&](const EventRecord& e) {
      return e.kind == "OrphanFound" && e.object_id == ghost.str();
    });
  }));
  EXPECT_TRUE(hv_.overlay(ghost.str()).has_value());
  options_.orphan_policy = OrphanPolicy::kRemove;
  open_service();
  ASSERT_TRUE(loop_.run_until([&] { return !hv_.overlay(ghost.str()).has_value(); }));
}

TEST_F(NodeServiceTest, FailedDeleteIsRetriedByTheAudit) {
  const VmId id = create("a");
  hv_.fail_next("delete_overlay", unavailable("disk on fire"));
  EXPECT_EQ(wait(*service_->delete_vm("a", "")).result, "failed");
  EXPECT_EQ(state(id), "error");
  EXPECT_TRUE(service_->get_vm("a")->deleting);
  service_->audit();
  ASSERT_TRUE(loop_.run_until([&] { return service_->list_vms("").empty(); }));
  EXPECT_FALSE(hv_.overlay(id.str()).has_value());
}

TEST_F(NodeServiceTest, ReusingARequestIdForAnotherMethodIsAConflict) {
  create("a");
  ASSERT_TRUE(service_->start_vm("a", "req-x").is_ok());
  EXPECT_EQ(service_->stop_vm("a", false, "req-x").status().code(), Code::kConflict);
  EXPECT_EQ(service_->delete_vm("a", "req-x").status().code(), Code::kConflict);
  settle();
}

TEST(WorkerPool, GrowsWhileEveryThreadIsBusyButNotPastItsLimit) {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  auto blocker = [&] {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return release; });
  };
  {
    WorkerPool pool(3);
    pool.submit(blocker);
    pool.submit(blocker);
    std::promise<void> third;
    pool.submit([&] { third.set_value(); });  // two threads wait: a third one starts
    EXPECT_EQ(third.get_future().wait_for(5s), std::future_status::ready);
    {
      std::lock_guard lock(mu);
      release = true;
    }
    cv.notify_all();
  }
  release = false;
  {
    WorkerPool pool(1);
    pool.submit(blocker);
    std::promise<void> second;
    auto second_done = second.get_future();
    pool.submit([&] { second.set_value(); });  // at the limit: waits for the only thread
    EXPECT_EQ(second_done.wait_for(200ms), std::future_status::timeout);
    {
      std::lock_guard lock(mu);
      release = true;
    }
    cv.notify_all();
    EXPECT_EQ(second_done.wait_for(5s), std::future_status::ready);
  }
}

// ---------------------------------------------------------------- tenant networks

std::string net_spec(const std::string& name, const std::string& tenant, uint32_t vni,
                     const std::string& subnet, const std::string& extra = "") {
  return R"({"name":")" + name + R"(","tenant":")" + tenant + R"(","vni":)" + std::to_string(vni) +
         R"(,"subnet":")" + subnet + R"(")" + extra + "}";
}

class NodeServiceNetworks : public NodeServiceTest {
 protected:
  void create_network(const std::string& spec_json) {
    auto job = service_->create_network(spec_json, "");
    ASSERT_TRUE(job.is_ok()) << job.status().to_string();
    wait_done(*job);
  }
};

TEST_F(NodeServiceNetworks, CreateBuildsTheNetworkOnTheHostAndRecordsItReady) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24", R"(,"peers":["192.0.2.2"])"));
  auto n = service_->get_network("blue");
  ASSERT_TRUE(n.is_ok());
  EXPECT_EQ(n->state, "ready");
  EXPECT_TRUE(links_.has("nmbr4097"));
  EXPECT_TRUE(links_.has("nmvx4097"));
  EXPECT_EQ(links_.links["nmvx4097"].peers.size(), 1U);
  EXPECT_TRUE(dhcp_.servers.count("blue"));
  // Durable: a restarted service still knows it.
  open_service();
  ASSERT_TRUE(service_->get_network("blue").is_ok());
}

TEST_F(NodeServiceNetworks, BadSpecsAreRefusedNamingTheFieldAndChangeNothing) {
  struct Case {
    std::string doc;
    std::string field;
  };
  for (const Case& c : std::vector<Case>{
           {net_spec("blue", "contoso", 0, "10.10.0.0/24"), "spec.vni"},
           {net_spec("blue", "contoso", 5, "10.10.0.7/24"), "spec.subnet"},
           {net_spec("Blue", "contoso", 5, "10.10.0.0/24"), "spec.name"},
           {net_spec("blue", "contoso", 5, "10.10.0.0/24", R"(,"color":"red")"), "spec.color"},
       }) {
    auto r = service_->create_network(c.doc, "");
    ASSERT_FALSE(r.is_ok()) << c.doc;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << c.doc;
    EXPECT_NE(r.status().message().find(c.field), std::string::npos) << r.status().message();
  }
  EXPECT_TRUE(service_->list_networks("").empty());
  EXPECT_TRUE(links_.links.empty());
}

TEST_F(NodeServiceNetworks, PeersNeedAnUnderlay) {
  options_.underlay_interface = "";
  open_service();
  auto r = service_->create_network(
      net_spec("blue", "contoso", 5, "10.10.0.0/24", R"(,"peers":["192.0.2.2"])"), "");
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("spec.peers"), std::string::npos);
  EXPECT_TRUE(service_->list_networks("").empty());
}

TEST_F(NodeServiceNetworks, ATakenVniOrNameIsRefused) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  auto vni = service_->create_network(net_spec("red", "fabrikam", 4097, "10.20.0.0/24"), "");
  EXPECT_EQ(vni.status().code(), Code::kAlreadyExists);
  EXPECT_NE(vni.status().message().find("spec.vni"), std::string::npos);
  auto name = service_->create_network(net_spec("blue", "fabrikam", 4098, "10.20.0.0/24"), "");
  EXPECT_EQ(name.status().code(), Code::kAlreadyExists);
  EXPECT_EQ(service_->list_networks("").size(), 1U);
}

TEST_F(NodeServiceNetworks, CreateNetworkIsIdempotentByRequestId) {
  const std::string doc = net_spec("blue", "contoso", 4097, "10.10.0.0/24");
  auto a = service_->create_network(doc, "net-req-1");
  ASSERT_TRUE(a.is_ok());
  wait_done(*a);
  open_service();
  auto b = service_->create_network(doc, "net-req-1");
  ASSERT_TRUE(b.is_ok()) << b.status().to_string();
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(service_->list_networks("").size(), 1U);
}

TEST_F(NodeServiceNetworks, AVmGetsAPortWithAddressMacTapRulesAndLease) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  const VmId a = create("a", R"(,"networks":[{"network":"blue"}])");
  const VmId b = create("b", R"(,"networks":[{"network":"blue","ip":"10.10.0.50"}])");
  const auto pa = service_->vm_ports(a);
  const auto pb = service_->vm_ports(b);
  ASSERT_EQ(pa.size(), 1U);
  ASSERT_EQ(pb.size(), 1U);
  EXPECT_EQ(pa[0].ip.str(), "10.10.0.3");  // .0 network, .1 gateway, .2 DHCP
  EXPECT_EQ(pb[0].ip.str(), "10.10.0.50");
  EXPECT_NE(pa[0].mac, pb[0].mac);
  EXPECT_TRUE(pa[0].mac.is_locally_administered_unicast());
  EXPECT_EQ(pa[0].ifname, network::tap_name(a, 0));

  const std::string xml = hv_.domain(a.str())->xml;
  EXPECT_NE(xml.find("<source bridge='nmbr4097'/>"), std::string::npos) << xml;
  EXPECT_NE(xml.find(pa[0].mac.str()), std::string::npos) << xml;
  EXPECT_NE(xml.find(pa[0].ifname), std::string::npos) << xml;
  ASSERT_TRUE(fw_.table.has_value());
  EXPECT_NE(fw_.table->find(pa[0].ifname), std::string::npos);
  EXPECT_NE(fw_.table->find(pb[0].ifname), std::string::npos);
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 2U);

  // GetVm shows the port.
  const std::string doc = vm_record_to_json(*service_->get_vm("a"), pa);
  EXPECT_NE(doc.find("\"ip\":\"10.10.0.3\""), std::string::npos) << doc;
}

TEST_F(NodeServiceNetworks, AnotherTenantsNetworkAnswersLikeAMissingOne) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  auto r = service_->create_vm(spec("x", "fabrikam", R"(,"networks":[{"network":"blue"}])"), "");
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().code(), Code::kNotFound);
  EXPECT_NE(r.status().message().find("spec.networks[0].network"), std::string::npos);
  EXPECT_TRUE(service_->list_vms("").empty());
  EXPECT_EQ(hv_.domain_count(), 0U);
}

TEST_F(NodeServiceNetworks, AddressRulesAreCheckedBeforeAnythingIsRecorded) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  create("a", R"(,"networks":[{"network":"blue","ip":"10.10.0.9"}])");
  struct Case {
    std::string ip;
    Code code;
  };
  for (const Case& c : std::vector<Case>{{"10.10.0.9", Code::kAlreadyExists},
                                         {"10.10.0.2", Code::kInvalidArgument},
                                         {"10.10.0.255", Code::kInvalidArgument},
                                         {"10.99.0.9", Code::kInvalidArgument}}) {
    auto r = service_->create_vm(
        spec("b", "contoso", R"(,"networks":[{"network":"blue","ip":")" + c.ip + R"("}])"), "");
    ASSERT_FALSE(r.is_ok()) << c.ip;
    EXPECT_EQ(r.status().code(), c.code) << c.ip << ": " << r.status().to_string();
    EXPECT_NE(r.status().message().find("spec.networks[0].ip"), std::string::npos)
        << r.status().message();
  }
  EXPECT_EQ(service_->list_vms("").size(), 1U);
  EXPECT_EQ(service_->network_ports("blue").size(), 1U);
}

TEST_F(NodeServiceNetworks, ANetworkInUseCannotBeDeletedUntilItsVmsAreGone) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  const VmId a = create("a", R"(,"networks":[{"network":"blue"}])");
  auto refused = service_->delete_network("blue", "");
  ASSERT_FALSE(refused.is_ok());
  EXPECT_EQ(refused.status().code(), Code::kConflict);
  EXPECT_NE(refused.status().message().find("'a'"), std::string::npos);
  EXPECT_TRUE(links_.has("nmbr4097"));

  auto del_vm = service_->delete_vm("a", "");
  ASSERT_TRUE(del_vm.is_ok());
  wait_done(*del_vm);
  EXPECT_TRUE(service_->network_ports("blue").empty());
  EXPECT_NE(fw_.last_script.find("delete"), std::string::npos) << fw_.last_script;
  EXPECT_NE(fw_.last_script.find(network::tap_name(a, 0)), std::string::npos) << fw_.last_script;
  EXPECT_TRUE(dhcp_.servers["blue"].hosts.empty());

  auto del = service_->delete_network("blue", "");
  ASSERT_TRUE(del.is_ok()) << del.status().to_string();
  wait_done(*del);
  EXPECT_FALSE(service_->get_network("blue").is_ok());
  EXPECT_FALSE(links_.has("nmbr4097"));
  EXPECT_FALSE(links_.has("nmvx4097"));
  EXPECT_FALSE(dhcp_.servers.count("blue"));
  open_service();
  EXPECT_TRUE(service_->list_networks("").empty());
}

TEST_F(NodeServiceNetworks, PortsSurviveARestartAndTheHostIsNotDisturbed) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  const VmId a = create("a", R"(,"networks":[{"network":"blue"}])");
  const auto before = service_->vm_ports(a);
  const int links_before = links_.mutations;
  open_service();
  EXPECT_EQ(service_->vm_ports(a), before);
  EXPECT_EQ(links_.mutations, links_before);
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 1U);
}

TEST_F(NodeServiceNetworks, TheAuditRepairsTheHostAndRecordsWhatItDid) {
  create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"));
  create("a", R"(,"networks":[{"network":"blue"}])");
  ASSERT_TRUE(settle());
  links_.links.erase("nmbr4097");
  dhcp_.servers.clear();
  obs_.events.clear();
  // audit() is a no-op while the previous audit is in flight: keep asking until one reports.
  ASSERT_TRUE(loop_.run_until([&] {
    service_->audit();
    return std::any_of(obs_.events.begin(), obs_.events.end(),
                       [](const EventRecord& e) { return e.kind == "NetworkRepaired"; });
  }));
  std::string repaired;
  for (const auto& e : obs_.events) {
    if (e.kind == "NetworkRepaired") repaired += e.payload_json + "\n";
  }
  EXPECT_NE(repaired.find("nmbr4097"), std::string::npos) << repaired;
  EXPECT_TRUE(links_.has("nmbr4097"));
  EXPECT_EQ(dhcp_.servers["blue"].hosts.size(), 1U);
}

TEST_F(NodeServiceNetworks, AFailedNetworkTurnsReadyOnceTheAuditBuildsItAndIsReportedOnce) {
  links_.fail_names.insert("nmvx4097");
  auto job = service_->create_network(net_spec("blue", "contoso", 4097, "10.10.0.0/24"), "");
  ASSERT_TRUE(job.is_ok());
  EXPECT_EQ(wait(*job).result, "failed");
  EXPECT_EQ(service_->get_network("blue")->state, "failed");

  const auto failures = [&] {
    return std::count_if(obs_.events.begin(), obs_.events.end(), [](const EventRecord& e) {
      return e.kind == "NetworkRepaired" &&
             e.payload_json.find("\"failed\":true") != std::string::npos;
    });
  };
  // Many audits while it keeps failing: one failure event, not one per audit. Counted by the
  // attempts that reached the (failing) link, not by loop turns, which say nothing about audits.
  const int attempts = links_.injected_failures.load();
  ASSERT_TRUE(loop_.run_until([&] {
    service_->audit();  // a no-op while the previous one is in flight
    return links_.injected_failures.load() >= attempts + 10;
  }));
  ASSERT_TRUE(loop_.run_until([&] { return service_->active_jobs() == 0 && failures() >= 1; }));
  EXPECT_EQ(failures(), 1);
  EXPECT_EQ(service_->get_network("blue")->state, "failed");

  links_.fail_names.clear();
  ASSERT_TRUE(loop_.run_until([&] {
    service_->audit();
    return service_->get_network("blue")->state == "ready";
  }));
  EXPECT_TRUE(links_.has("nmvx4097"));
}

// ---------------------------------------------------------------------------------------------
// Health, capacity, maintenance, crash policy (issue 5)

TEST_F(NodeServiceTest, DrainRefusesNewVmsKeepsRunningOnesAndSurvivesARestart) {
  const VmId a = create("a");
  wait_done(*service_->start_vm("a", ""));
  ASSERT_TRUE(service_->set_maintenance(true, "kernel upgrade", "drain-1").is_ok());
  ASSERT_TRUE(loop_.run_until([&] { return !obs_.health_changes.empty(); }));
  EXPECT_TRUE(obs_.health_changes.back().maintenance);
  EXPECT_GT(obs_.health_seqs.back(), 0u) << "recorded in the event ring";
  auto r = service_->create_vm(spec("b"), "");
  EXPECT_EQ(r.status().code(), Code::kUnavailable);
  EXPECT_NE(r.status().message().find("kernel upgrade"), std::string::npos);
  EXPECT_FALSE(service_->get_vm("b").is_ok()) << "a refused create changes nothing";
  EXPECT_EQ(state(a), "running");
  EXPECT_EQ(hv_.domain(a.str())->info.state, DomainState::kRunning);
  EXPECT_TRUE(service_->heartbeat().maintenance);

  open_service();
  ASSERT_TRUE(settle());
  EXPECT_TRUE(service_->health().maintenance) << "persisted";
  EXPECT_EQ(service_->health().maintenance_reason, "kernel upgrade");
  EXPECT_EQ(service_->create_vm(spec("b"), "").status().code(), Code::kUnavailable);
  EXPECT_TRUE(service_->set_maintenance(true, "kernel upgrade", "drain-1").is_ok())
      << "a retried request id is answered";
  EXPECT_EQ(service_->set_maintenance(false, "", "drain-1").code(), Code::kConflict);
  ASSERT_TRUE(service_->set_maintenance(false, "", "").is_ok());
  EXPECT_TRUE(service_->create_vm(spec("b"), "").is_ok());
}

TEST_F(NodeServiceTest, MaintenanceReasonIsValidated) {
  EXPECT_EQ(service_->set_maintenance(true, std::string(300, 'x'), "").code(),
            Code::kInvalidArgument);
  EXPECT_EQ(service_->set_maintenance(true, "a\nb", "").code(), Code::kInvalidArgument);
  EXPECT_FALSE(service_->health().maintenance);
}

TEST_F(NodeServiceTest, CapacityCountsEveryVmAndRefusesBeyondIt) {
  options_.host_vcpus = 4;
  options_.host_memory_mib = 1024;
  options_.capacity = CapacityOptions{.reserved_vcpus = 0,
                                      .reserved_memory_mib = 512,
                                      .cpu_ratio = 1.0,
                                      .memory_ratio = 1.0,
                                      .disk_ratio = 1.0};
  open_service();
  create("a", "");  // 1 vCPU, 128 MiB, stopped: still counted
  auto cap = service_->capacity();
  ASSERT_EQ(cap.size(), 2u) << "no instances filesystem: disk is not accounted";
  EXPECT_EQ(cap[0].resource, "vcpus");
  EXPECT_EQ(cap[0].capacity, 4u);
  EXPECT_EQ(cap[0].allocated, 1u);
  EXPECT_EQ(cap[1].capacity, 512u);
  EXPECT_EQ(cap[1].allocated, 128u);
  auto big = service_->create_vm(
      R"({"name":"big","tenant":"contoso","vcpus":1,"memory_mib":385,"image":"base:1"})", "");
  EXPECT_EQ(big.status().code(), Code::kInsufficientCapacity);
  EXPECT_NE(big.status().message().find("memory_mib: 385 requested, 384 of 512 free"),
            std::string::npos)
      << big.status().message();
  auto cpus = service_->create_vm(
      R"({"name":"cpus","tenant":"contoso","vcpus":4,"memory_mib":64,"image":"base:1"})", "");
  EXPECT_EQ(cpus.status().code(), Code::kInsufficientCapacity);
  EXPECT_EQ(service_->list_vms("").size(), 1u);
  const Heartbeat hb = service_->heartbeat();
  EXPECT_EQ(hb.summary.at("vcpus_allocated"), 1u);
  EXPECT_EQ(hb.summary.at("memory_mib_capacity"), 512u);
  EXPECT_EQ(hb.summary.at("vms"), 1u);
  EXPECT_EQ(service_->heartbeat().seq, hb.seq + 1);
}

TEST_F(NodeServiceTest, TenantQuotaIsPerTenant) {
  options_.tenant_quotas["contoso"] = TenantQuota{.vms = 1, .vcpus = {}, .memory_mib = {}};
  open_service();
  create("a");
  auto second = service_->create_vm(spec("b"), "");
  EXPECT_EQ(second.status().code(), Code::kQuotaExceeded);
  EXPECT_NE(second.status().message().find("tenant 'contoso'"), std::string::npos);
  EXPECT_TRUE(service_->create_vm(spec("c", "fabrikam"), "").is_ok()) << "other tenants free";
}

TEST_F(NodeServiceTest, CrashedVmIsRestartedByPolicyThenLeftFailedAndReported) {
  options_.crash_policy = CrashPolicy{.max_restarts = 2,
                                      .window = std::chrono::seconds(600),
                                      .backoff = std::chrono::milliseconds(20)};
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  for (int round = 1; round <= 2; ++round) {
    const size_t seen = obs_.states_of(id.str()).size();
    hv_.crash(id.str(), DomainCause::kEmulatorGone);
    ASSERT_TRUE(loop_.run_until([&] {
      auto st = obs_.states_of(id.str());
      return st.size() >= seen + 2 && st.back() == "running";
    })) << "round "
        << round;
    const auto st = obs_.states_of(id.str());
    EXPECT_EQ(st[seen], "crashed") << "round " << round;
    EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kRunning);
  }
  ASSERT_TRUE(settle());
  // Crashes 1 and 2 made the node degraded then ok again; VM checks are gone while it runs.
  EXPECT_EQ(service_->health().state, HealthState::kOk);
  EXPECT_FALSE(obs_.health_changes.empty());
  EXPECT_EQ(obs_.health_changes.front().vms_affected, std::vector<std::string>{id.str()});

  hv_.crash(id.str(), DomainCause::kEmulatorGone);  // the third: beyond the budget
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "failed"; }));
  loop_.run_for(std::chrono::milliseconds(200));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff) << "not restarted";
  EXPECT_NE(service_->get_vm("a")->state_reason.find("QEMU process gone"), std::string::npos);
  const HealthSnapshot h = service_->health();
  EXPECT_EQ(h.state, HealthState::kDegraded) << "a failed VM degrades the node, no more";
  ASSERT_EQ(h.checks.size(), 1u);
  EXPECT_EQ(h.checks[0].name, "vm:" + id.str());
  EXPECT_EQ(h.checks[0].state, HealthState::kFailed);
  service_->audit();
  loop_.run_for(std::chrono::milliseconds(200));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff) << "the audit leaves it";

  // An explicit start clears the failure and the budget.
  wait_done(*service_->start_vm("a", ""));
  ASSERT_TRUE(loop_.run_until([&] { return service_->health().checks.empty(); }));
  EXPECT_EQ(service_->health().state, HealthState::kOk);
}

// The adapter sees QEMU die before libvirt does: "crashed" is recorded at once, and the restart
// waits until libvirt shows the domain down (starting it earlier would be a no-op).
TEST_F(NodeServiceTest, EmulatorExitIsRecordedAtOnceAndTheRestartWaitsForLibvirt) {
  options_.crash_policy.backoff = std::chrono::milliseconds(0);
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  const size_t seen = obs_.states_of(id.str()).size();
  hv_.kill_emulator(id.str());
  ASSERT_TRUE(loop_.run_until([&] { return obs_.states_of(id.str()).size() > seen; }));
  EXPECT_EQ(obs_.states_of(id.str()).back(), "crashed");
  EXPECT_NE(service_->get_vm("a")->state_reason.find("QEMU process gone"), std::string::npos);
  loop_.run_for(std::chrono::milliseconds(300));
  EXPECT_EQ(state(id), "crashed") << "no restart while libvirt still says running";
  hv_.reap_emulator(id.str());  // libvirt's own kStopped, later
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "running"; }));
  ASSERT_TRUE(settle());
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kRunning);
  size_t crashed = 0;
  for (const auto& st : obs_.states_of(id.str())) crashed += static_cast<size_t>(st == "crashed");
  EXPECT_EQ(crashed, 1u) << "libvirt's later kStopped is the same crash, not a second one";
}

TEST_F(NodeServiceTest, AVmLeftFailedIsStillReportedAfterARestart) {
  const VmId id = create("a", R"(,"crash_policy":{"max_restarts":0})");
  wait_done(*service_->start_vm("a", ""));
  hv_.crash(id.str(), DomainCause::kEmulatorGone);
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "failed"; }));
  open_service();
  ASSERT_TRUE(settle());
  ASSERT_TRUE(loop_.run_until([&] { return !service_->health().checks.empty(); }));
  const HealthSnapshot h = service_->health();
  EXPECT_EQ(h.state, HealthState::kDegraded);
  EXPECT_EQ(h.checks[0].vm_id, id.str());
  EXPECT_EQ(h.checks[0].state, HealthState::kFailed);
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kShutOff) << "still not restarted";
}

TEST_F(NodeServiceTest, ARestartDueWhileAnotherJobHoldsTheVmIsPostponedNotLost) {
  options_.crash_policy.backoff = std::chrono::milliseconds(100);
  options_.debug_job_delay = std::chrono::milliseconds(300);  // the reboot holds the VM a while
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.crash(id.str(), DomainCause::kEmulatorGone);
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "crashed"; }));
  auto reboot = service_->reboot_vm("a", "");  // queued during the backoff
  ASSERT_TRUE(reboot.is_ok());
  wait(*reboot);
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "running"; }, std::chrono::seconds(10)));
  EXPECT_EQ(hv_.domain(id.str())->info.state, DomainState::kRunning);
}

TEST_F(NodeServiceTest, AGuestPowerOffIsNotCalledACrash) {
  options_.crash_policy.backoff = std::chrono::milliseconds(0);
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  // libvirt announces the guest's power-off, then QEMU exits.
  hv_.set_state_behind_our_back(id.str(), DomainState::kRunning, DomainEventKind::kShutdown,
                                DomainCause::kGuestShutdown);
  hv_.kill_emulator(id.str());
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "stopped"; }));
  EXPECT_NE(service_->get_vm("a")->state_reason.find("guest powered itself off"), std::string::npos)
      << service_->get_vm("a")->state_reason;
  hv_.reap_emulator(id.str());
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "running"; }));
}

TEST_F(NodeServiceTest, ZeroRestartsReportsAtOnce) {
  const VmId id = create("a", R"(,"crash_policy":{"max_restarts":0})");
  wait_done(*service_->start_vm("a", ""));
  hv_.crash(id.str(), DomainCause::kGuestCrashed);
  ASSERT_TRUE(loop_.run_until([&] { return state(id) == "failed"; }));
  EXPECT_NE(service_->get_vm("a")->state_reason.find("guest crashed"), std::string::npos);
}

TEST_F(NodeServiceTest, PausedOnIoErrorIsAFailedVmCheck) {
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  hv_.crash(id.str(), DomainCause::kIoError);
  ASSERT_TRUE(loop_.run_until([&] {
    auto c = service_->health().checks;
    return !c.empty() && c[0].state == HealthState::kFailed;
  }));
  EXPECT_EQ(service_->health().checks[0].reason, "paused on a disk I/O error");
  EXPECT_EQ(state(id), "paused");
}

TEST_F(NodeServiceTest, VmsFoundDownAtStartUpAreRestoredWithoutCountingACrash) {
  options_.crash_policy.max_restarts = 0;
  open_service();
  const VmId id = create("a");
  wait_done(*service_->start_vm("a", ""));
  service_->shutdown();
  hv_.set_state_behind_our_back(id.str(), DomainState::kShutOff, DomainEventKind::kStopped,
                                DomainCause::kOther);  // the host rebooted meanwhile
  open_service();
  ASSERT_TRUE(settle());
  EXPECT_EQ(state(id), "running");
  EXPECT_TRUE(service_->health().checks.empty());
}

TEST_F(NodeServiceTest, HostChecksMakeTheNodeStateAndProbesRun) {
  service_->set_host_check("uplink", HealthState::kFailed, "interface 'ul0' has no carrier");
  ASSERT_TRUE(loop_.run_until([&] { return !obs_.health_changes.empty(); }));
  EXPECT_EQ(obs_.health_changes.back().state, HealthState::kFailed);
  EXPECT_EQ(service_->health().state, HealthState::kFailed);
  EXPECT_TRUE(service_->watchdog_healthy()) << "only libvirt's failure starves the watchdog";
  service_->set_host_check("libvirt", HealthState::kFailed, "connection lost");
  EXPECT_FALSE(service_->watchdog_healthy());
  service_->set_host_check("libvirt", HealthState::kOk, "reconnected");
  service_->set_host_check("uplink", HealthState::kOk, "up");
  ASSERT_TRUE(
      loop_.run_until([&] { return obs_.health_changes.back().state == HealthState::kOk; }));

  options_.images_dir = (dir_ / "images").string();
  options_.psi_path = (dir_ / "psi").string();
  std::ofstream(dir_ / "psi") << "some avg10=95.00 avg60=1 avg300=1 total=1\n"
                                 "full avg10=70.00 avg60=1 avg300=1 total=1\n";
  options_.disk_thresholds =
      DiskThresholds{.degraded_below_bytes = ~uint64_t{0} >> 1, .failed_below_bytes = 0};
  open_service();
  service_->probe_health();
  ASSERT_TRUE(loop_.run_until([&] {
    auto h = service_->health();
    return h.checks.size() == 3;  // state-db, image-disk, memory-pressure
  }));
  const HealthSnapshot h = service_->health();
  EXPECT_EQ(h.state, HealthState::kFailed);
  std::map<std::string, HealthState> by_name;
  for (const auto& c : h.checks) by_name[c.name] = c.state;
  EXPECT_EQ(by_name["state-db"], HealthState::kOk);
  EXPECT_EQ(by_name["image-disk"], HealthState::kDegraded);
  EXPECT_EQ(by_name["memory-pressure"], HealthState::kFailed);
  auto recorded = [&] {
    size_t n = 0;
    const auto events = service_->events_since(0, 10000);
    if (!events.is_ok()) return n;
    for (const auto& e : events.value()) n += static_cast<size_t>(e.kind == "HealthChanged");
    return n;
  };
  EXPECT_TRUE(loop_.run_until([&] { return recorded() >= 3; }))
      << "HealthChanged is in the event ring (GetEvents replays it): " << recorded();
}

}  // namespace
}  // namespace nm
