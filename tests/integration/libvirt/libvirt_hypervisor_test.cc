// LibvirtHypervisor against libvirt's in-process test driver (test:///default), plus tests on
// a real libvirtd (LibvirtHypervisorReal.*) that run only when NM_E2E_LIBVIRT_URI is set, e.g.
//   NM_E2E_LIBVIRT_URI=qemu:///system ctest -R LibvirtHypervisor
#include "libvirt_hypervisor.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <libvirt/libvirt.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "nm/domain_xml.h"
#include "nm/vm_spec.h"

namespace nm {
namespace {

// As nodemanagerd does (main.cc): a write to a libvirtd that the test just killed is an EPIPE for
// the adapter to handle, not the end of the test process.
const bool kSigpipeIgnored = [] { return std::signal(SIGPIPE, SIG_IGN) != SIG_ERR; }();

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using SteadyClock = std::chrono::steady_clock;

constexpr const char* kTestUri = "test:///default";

// A fresh directory under $TMPDIR, removed with everything in it when the test ends (also when
// an assertion returns early).
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "nm-libvirt-test-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

VmSpec make_spec(const std::string& name, const std::string& tenant) {
  auto spec = parse_vm_spec(R"({"name": ")" + name + R"(", "tenant": ")" + tenant +
                            R"(", "vcpus": 1, "memory_mib": 64, "image": "busybox-guest:1"})");
  if (!spec.is_ok()) throw std::runtime_error(spec.status().to_string());
  return std::move(spec).value();
}

// Domain XML from the real renderer, for the test driver.
std::string domain_xml(const VmId& id, const std::string& name, const std::string& tenant,
                       uint64_t generation, const std::string& type = "test") {
  DomainXmlInput in{.id = id,
                    .spec = make_spec(name, tenant),
                    .generation = generation,
                    .domain_type = type,
                    .machine = "pc",
                    .disk_path = type == "test" ? "/nonexistent/" + id.str() + ".qcow2" : "",
                    .disk_format = "qcow2",
                    .kernel_path = std::nullopt,
                    .initrd_path = std::nullopt,
                    .serial_log_path = "",
                    .interfaces = {}};
  return render_domain_xml(in);
}

// Collects lifecycle events with their arrival times; waits on a condition variable, never
// sleep-polls.
class EventLog {
 public:
  struct Arrival {
    DomainEvent event;
    SteadyClock::time_point at;
  };
  Hypervisor::EventHandler handler() {
    return [this](const DomainEvent& ev) {
      const auto now = SteadyClock::now();
      std::lock_guard lock(mu_);
      events_.push_back({ev, now});
      cv_.notify_all();
    };
  }
  // The first event of `kind` for `uuid`, once it has arrived (within the timeout).
  std::optional<Arrival> find(const std::string& uuid, DomainEventKind kind,
                              SteadyClock::duration timeout = seconds(10)) {
    return find_nth(uuid, kind, 0, timeout);
  }
  // The event number `index` (0-based) of `kind` for `uuid`, once it has arrived.
  std::optional<Arrival> find_nth(const std::string& uuid, DomainEventKind kind, size_t index,
                                  SteadyClock::duration timeout = seconds(10)) {
    std::unique_lock lock(mu_);
    std::optional<Arrival> found;
    cv_.wait_for(lock, timeout, [&] {
      size_t seen = 0;
      for (const Arrival& a : events_) {
        if (a.event.uuid == uuid && a.event.kind == kind && seen++ == index) {
          found = a;
          return true;
        }
      }
      return false;
    });
    return found;
  }
  // How many events of `kind` for `uuid` have arrived so far.
  size_t count(const std::string& uuid, DomainEventKind kind) {
    std::lock_guard lock(mu_);
    return static_cast<size_t>(std::count_if(events_.begin(), events_.end(), [&](const Arrival& a) {
      return a.event.uuid == uuid && a.event.kind == kind;
    }));
  }
  // True once an event of `kind` for `uuid` has arrived (within the timeout).
  bool wait_for(const std::string& uuid, DomainEventKind kind,
                SteadyClock::duration timeout = seconds(10)) {
    return find(uuid, kind, timeout).has_value();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Arrival> events_;
};

// Collects connection-handler calls with their arrival times.
class ConnectionLog {
 public:
  struct Call {
    bool connected = false;
    std::string reason;
    bool connected_then = false;  // what connected() said during the call
    SteadyClock::time_point at;
  };
  Hypervisor::ConnectionHandler handler(const Hypervisor& hv) {
    return [this, &hv](bool connected, const std::string& reason) {
      const auto now = SteadyClock::now();
      const bool then = hv.connected();
      std::lock_guard lock(mu_);
      calls_.push_back({connected, reason, then, now});
      cv_.notify_all();
    };
  }
  // The call number `index` (0-based), once it has happened (within the timeout).
  std::optional<Call> wait_for_call(size_t index, SteadyClock::duration timeout) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return calls_.size() > index; })) return std::nullopt;
    return calls_[index];
  }
  size_t count() {
    std::lock_guard lock(mu_);
    return calls_.size();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Call> calls_;
};

// A raw libvirt connection for the test to act behind the adapter's back.
struct RawConnection {
  struct Closer {
    void operator()(virConnectPtr c) const { virConnectClose(c); }
  };
  struct DomainFreer {
    void operator()(virDomainPtr d) const { virDomainFree(d); }
  };
  using DomainPtr = std::unique_ptr<virDomain, DomainFreer>;

  explicit RawConnection(const std::string& uri) : conn(virConnectOpen(uri.c_str())) {}
  DomainPtr domain(const VmId& id) const {
    return DomainPtr(virDomainLookupByUUIDString(conn.get(), id.str().c_str()));
  }
  std::unique_ptr<virConnect, Closer> conn;
};

class LibvirtHypervisorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.uri = kTestUri;
    options_.pool_name = "nodemanager-test";
    options_.pool_dir = (dir_ / "instances").string();
    auto hv = LibvirtHypervisor::create(options_);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    hv_ = std::move(hv).value();
  }
  void TearDown() override { hv_.reset(); }

  VmId define(const std::string& name, const std::string& tenant = "contoso",
              uint64_t generation = 1) {
    VmId id = generate_vm_id();
    const Status s = hv_->define_domain(domain_xml(id, name, tenant, generation));
    EXPECT_TRUE(s.is_ok()) << s.to_string();
    return id;
  }
  DomainState state_of(const VmId& id) {
    auto info = hv_->get_domain(id);
    EXPECT_TRUE(info.is_ok()) << info.status().to_string();
    if (!info.is_ok() || !info->has_value()) return DomainState::kNoState;
    return (*info)->state;
  }

  TempDir tmp_;
  const fs::path& dir_ = tmp_.path();
  LibvirtOptions options_;
  std::unique_ptr<LibvirtHypervisor> hv_;
};

TEST_F(LibvirtHypervisorTest, ReportsTestDomainType) {
  EXPECT_EQ(hv_->default_domain_type(), "test");
}

TEST_F(LibvirtHypervisorTest, ListsDefinedDomainWithParsedOwner) {
  const VmId id = define("web-1", "contoso", 3);
  auto list = hv_->list_domains();
  ASSERT_TRUE(list.is_ok()) << list.status().to_string();
  auto it = std::find_if(list->begin(), list->end(),
                         [&](const DomainInfo& d) { return d.uuid == id.str(); });
  ASSERT_NE(it, list->end());
  EXPECT_EQ(it->name, "nm-web-1");
  EXPECT_EQ(it->state, DomainState::kShutOff);
  EXPECT_TRUE(it->persistent);
  ASSERT_TRUE(it->owner.has_value());
  EXPECT_EQ(it->owner->vm_id, id);
  EXPECT_EQ(it->owner->tenant.str(), "contoso");
  EXPECT_EQ(it->owner->generation, 3u);

  auto one = hv_->get_domain(id);
  ASSERT_TRUE(one.is_ok()) << one.status().to_string();
  ASSERT_TRUE(one->has_value());
  EXPECT_EQ((*one)->owner, it->owner);
}

TEST_F(LibvirtHypervisorTest, RedefineUpdatesOwnerGeneration) {
  const VmId id = define("web-1", "contoso", 1);
  ASSERT_TRUE(hv_->define_domain(domain_xml(id, "web-1", "contoso", 7)).is_ok());
  auto one = hv_->get_domain(id);
  ASSERT_TRUE(one.is_ok() && one->has_value());
  ASSERT_TRUE((*one)->owner.has_value());
  EXPECT_EQ((*one)->owner->generation, 7u);
}

TEST_F(LibvirtHypervisorTest, BuiltinDomainWithoutMetadataHasNoOwner) {
  auto list = hv_->list_domains();
  ASSERT_TRUE(list.is_ok()) << list.status().to_string();
  auto it = std::find_if(list->begin(), list->end(),
                         [](const DomainInfo& d) { return d.name == "test"; });
  ASSERT_NE(it, list->end()) << "the test driver's built-in domain 'test' is missing";
  EXPECT_FALSE(it->owner.has_value());
  EXPECT_EQ(it->state, DomainState::kRunning);
}

TEST_F(LibvirtHypervisorTest, UnreadableMetadataInOurNamespaceIsNotOurs) {
  const VmId id = generate_vm_id();
  const std::string xml = "<domain type='test'><name>stranger</name><uuid>" + id.str() +
                          "</uuid><metadata><nm:vm xmlns:nm='" + kMetadataNamespace +
                          "' id='not-a-uuid'/></metadata><memory unit='MiB'>64</memory>"
                          "<vcpu>1</vcpu><os><type>hvm</type></os></domain>";
  ASSERT_TRUE(hv_->define_domain(xml).is_ok());
  auto one = hv_->get_domain(id);
  ASSERT_TRUE(one.is_ok()) << one.status().to_string();
  ASSERT_TRUE(one->has_value());
  EXPECT_EQ((*one)->name, "stranger");
  EXPECT_FALSE((*one)->owner.has_value());
}

TEST_F(LibvirtHypervisorTest, InvalidDomainXmlIsAnError) {
  const Status s = hv_->define_domain("<domain type='test'><name>broken");
  EXPECT_FALSE(s.is_ok());
  EXPECT_NE(s.message().find("define domain"), std::string::npos) << s.message();
}

TEST_F(LibvirtHypervisorTest, StartShutdownAndDestroyAreIdempotent) {
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  EXPECT_EQ(state_of(id), DomainState::kRunning);
  EXPECT_TRUE(hv_->start_domain(id).is_ok());
  EXPECT_EQ(state_of(id), DomainState::kRunning);

  ASSERT_TRUE(hv_->shutdown_domain(id).is_ok());
  EXPECT_EQ(state_of(id), DomainState::kShutOff);  // the test driver stops at once
  EXPECT_TRUE(hv_->shutdown_domain(id).is_ok());

  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  EXPECT_EQ(state_of(id), DomainState::kShutOff);
  EXPECT_TRUE(hv_->destroy_domain(id).is_ok());
  EXPECT_EQ(state_of(id), DomainState::kShutOff);
}

TEST_F(LibvirtHypervisorTest, RebootNeedsARunningDomain) {
  const VmId id = define("web-1");
  const Status stopped = hv_->reboot_domain(id);
  EXPECT_EQ(stopped.code(), Code::kConflict) << stopped.to_string();
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  const Status running = hv_->reboot_domain(id);
  EXPECT_TRUE(running.is_ok()) << running.to_string();
  EXPECT_EQ(state_of(id), DomainState::kRunning);
}

TEST_F(LibvirtHypervisorTest, UndefineRemovesTheDomainAndIsIdempotent) {
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->undefine_domain(id).is_ok());
  auto gone = hv_->get_domain(id);
  ASSERT_TRUE(gone.is_ok()) << gone.status().to_string();
  EXPECT_FALSE(gone->has_value());
  EXPECT_TRUE(hv_->undefine_domain(id).is_ok());
}

TEST_F(LibvirtHypervisorTest, UndefineOfARunningDomainLeavesItTransient) {
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  ASSERT_TRUE(hv_->undefine_domain(id).is_ok());
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok() && info->has_value());
  EXPECT_FALSE((*info)->persistent);
  EXPECT_TRUE(hv_->undefine_domain(id).is_ok());  // transient: nothing more to undefine
  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  auto gone = hv_->get_domain(id);
  ASSERT_TRUE(gone.is_ok());
  EXPECT_FALSE(gone->has_value());
}

TEST_F(LibvirtHypervisorTest, OperationsOnUnknownDomainsAreNotFound) {
  const VmId id = generate_vm_id();
  EXPECT_EQ(hv_->start_domain(id).code(), Code::kNotFound);
  EXPECT_EQ(hv_->shutdown_domain(id).code(), Code::kNotFound);
  EXPECT_EQ(hv_->destroy_domain(id).code(), Code::kNotFound);
  EXPECT_EQ(hv_->reboot_domain(id).code(), Code::kNotFound);
  const Status s = hv_->start_domain(id);
  EXPECT_NE(s.message().find(id.str()), std::string::npos) << s.message();
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok());
  EXPECT_FALSE(info->has_value());
  EXPECT_TRUE(hv_->undefine_domain(id).is_ok());
}

TEST_F(LibvirtHypervisorTest, LifecycleEventsReachTheHandler) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kDefined));
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kStarted));
  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kStopped));
  ASSERT_TRUE(hv_->undefine_domain(id).is_ok());
  EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kUndefined));
}

TEST_F(LibvirtHypervisorTest, ReplacedHandlerGetsLaterEvents) {
  EventLog first;
  EventLog second;
  hv_->set_event_handler(first.handler());
  const VmId a = define("web-1");
  ASSERT_TRUE(first.wait_for(a.str(), DomainEventKind::kDefined));
  hv_->set_event_handler(second.handler());
  const VmId b = define("web-2");
  EXPECT_TRUE(second.wait_for(b.str(), DomainEventKind::kDefined));
  EXPECT_FALSE(first.wait_for(b.str(), DomainEventKind::kDefined, seconds(0)));
}

TEST_F(LibvirtHypervisorTest, ThrowingHandlerDoesNotStopEventDelivery) {
  EventLog events;
  auto inner = events.handler();
  hv_->set_event_handler([inner](const DomainEvent& ev) {
    inner(ev);
    throw std::runtime_error("handler failure");
  });
  const VmId a = define("web-1");
  EXPECT_TRUE(events.wait_for(a.str(), DomainEventKind::kDefined));
  const VmId b = define("web-2");
  EXPECT_TRUE(events.wait_for(b.str(), DomainEventKind::kDefined));
}

TEST_F(LibvirtHypervisorTest, OverlayIsCreatedListedFoundAndDeleted) {
  const VmId id = generate_vm_id();
  auto path = hv_->create_overlay(id, "/var/lib/nodemanager/images/sha256/base", "raw", 1 << 30);
  ASSERT_TRUE(path.is_ok()) << path.status().to_string();
  EXPECT_EQ(*path, options_.pool_dir + "/" + id.str() + ".qcow2");

  auto listed = hv_->list_overlays();
  ASSERT_TRUE(listed.is_ok()) << listed.status().to_string();
  EXPECT_EQ(std::count(listed->begin(), listed->end(), id), 1);
  auto found = hv_->find_overlay(id);
  ASSERT_TRUE(found.is_ok()) << found.status().to_string();
  ASSERT_TRUE(found->has_value());
  EXPECT_EQ(**found, *path);

  ASSERT_TRUE(hv_->delete_overlay(id).is_ok());
  EXPECT_TRUE(hv_->delete_overlay(id).is_ok());
  listed = hv_->list_overlays();
  ASSERT_TRUE(listed.is_ok());
  EXPECT_EQ(std::count(listed->begin(), listed->end(), id), 0);
  found = hv_->find_overlay(id);
  ASSERT_TRUE(found.is_ok());
  EXPECT_FALSE(found->has_value());
}

TEST_F(LibvirtHypervisorTest, CreatingAnOverlayAgainReplacesTheLeftover) {
  const VmId id = generate_vm_id();
  auto first = hv_->create_overlay(id, "/base/a", "raw", 1 << 20);
  ASSERT_TRUE(first.is_ok()) << first.status().to_string();
  auto second = hv_->create_overlay(id, "/base/b", "qcow2", 2 << 20);
  ASSERT_TRUE(second.is_ok()) << second.status().to_string();
  EXPECT_EQ(*first, *second);
  auto listed = hv_->list_overlays();
  ASSERT_TRUE(listed.is_ok());
  EXPECT_EQ(std::count(listed->begin(), listed->end(), id), 1);
}

TEST_F(LibvirtHypervisorTest, OverlayArgumentsAreValidated) {
  const VmId id = generate_vm_id();
  EXPECT_EQ(hv_->create_overlay(id, "/base", "vmdk", 1 << 20).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(hv_->create_overlay(id, "/base", "raw", 0).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(hv_->create_overlay(id, "relative/base", "raw", 1 << 20).status().code(),
            Code::kInvalidArgument);
  auto found = hv_->find_overlay(id);
  ASSERT_TRUE(found.is_ok());
  EXPECT_FALSE(found->has_value());
}

TEST_F(LibvirtHypervisorTest, BasePathWithXmlMetacharactersIsEscaped) {
  const VmId id = generate_vm_id();
  auto path = hv_->create_overlay(id, "/base/a'b<c>&\"d", "raw", 1 << 20);
  EXPECT_TRUE(path.is_ok()) << path.status().to_string();
}

TEST_F(LibvirtHypervisorTest, ConcurrentOverlayCreationsAllSucceed) {
  std::vector<VmId> ids;
  ids.reserve(8);
  for (int i = 0; i < 8; ++i) ids.push_back(generate_vm_id());
  std::vector<Status> results(ids.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ids.size(); ++i) {
    threads.emplace_back(
        [&, i] { results[i] = hv_->create_overlay(ids[i], "/base", "raw", 1 << 20).status(); });
  }
  for (auto& t : threads) t.join();
  for (const Status& s : results) EXPECT_TRUE(s.is_ok()) << s.to_string();
  auto listed = hv_->list_overlays();
  ASSERT_TRUE(listed.is_ok());
  for (const VmId& id : ids) EXPECT_EQ(std::count(listed->begin(), listed->end(), id), 1);
}

TEST_F(LibvirtHypervisorTest, ExistingPoolWithAnotherTargetIsAConflict) {
  LibvirtOptions other = options_;
  other.pool_dir = (dir_ / "elsewhere").string();
  auto hv = LibvirtHypervisor::create(other);
  ASSERT_FALSE(hv.is_ok());
  EXPECT_EQ(hv.status().code(), Code::kConflict) << hv.status().to_string();
}

TEST_F(LibvirtHypervisorTest, SecondAdapterSharesTheHostAndBothShutDownCleanly) {
  LibvirtOptions same = options_;
  same.pool_dir += "//";  // normalized like libvirt does
  auto second = LibvirtHypervisor::create(same);
  ASSERT_TRUE(second.is_ok()) << second.status().to_string();
  EventLog events;
  (*second)->set_event_handler(events.handler());
  const VmId id = define("web-1");
  EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kDefined));
  auto seen = (*second)->get_domain(id);
  ASSERT_TRUE(seen.is_ok() && seen->has_value());
  second->reset();  // joins its event thread while ours keeps running
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
}

TEST_F(LibvirtHypervisorTest, ReportsTheHostsCpusAndMemory) {
  auto host = hv_->host_info();
  ASSERT_TRUE(host.is_ok()) << host.status().to_string();
  // The test driver's built-in host: 16 CPUs and 3145728 KiB of memory.
  EXPECT_EQ(host->cpus, 16u);
  EXPECT_EQ(host->memory_bytes, 3145728ull * 1024);
}

TEST_F(LibvirtHypervisorTest, TestDriverStaysConnectedWithoutConnectionCalls) {
  ConnectionLog calls;
  hv_->set_connection_handler(calls.handler(*hv_));
  EXPECT_TRUE(hv_->connected());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  EXPECT_TRUE(hv_->connected());
  EXPECT_EQ(calls.count(), 0u);
}

TEST_F(LibvirtHypervisorTest, TestDriverHasNoEmulatorToWatch) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  auto listed = hv_->list_domains();
  ASSERT_TRUE(listed.is_ok()) << listed.status().to_string();
  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  ASSERT_TRUE(events.wait_for(id.str(), DomainEventKind::kStopped));
  EXPECT_EQ(events.count(id.str(), DomainEventKind::kEmulatorExited), 0u);
}

TEST_F(LibvirtHypervisorTest, RelativeQemuRunDirIsRejected) {
  LibvirtOptions o = options_;
  o.qemu_run_dir = "run/libvirt/qemu";
  auto hv = LibvirtHypervisor::create(o);
  ASSERT_FALSE(hv.is_ok());
  EXPECT_EQ(hv.status().code(), Code::kInvalidArgument) << hv.status().to_string();
}

TEST_F(LibvirtHypervisorTest, DestroyIsReportedAsDestroyed) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  auto started = events.find(id.str(), DomainEventKind::kStarted);
  ASSERT_TRUE(started.has_value());
  EXPECT_EQ(started->event.cause, DomainCause::kOther);

  ASSERT_TRUE(hv_->destroy_domain(id).is_ok());
  auto stopped = events.find(id.str(), DomainEventKind::kStopped);
  ASSERT_TRUE(stopped.has_value());
  EXPECT_EQ(stopped->event.detail, VIR_DOMAIN_EVENT_STOPPED_DESTROYED);
  EXPECT_EQ(stopped->event.cause, DomainCause::kDestroyed);
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok() && info->has_value());
  EXPECT_EQ((*info)->state, DomainState::kShutOff);
  EXPECT_EQ((*info)->reason, VIR_DOMAIN_SHUTOFF_DESTROYED);
  EXPECT_EQ((*info)->cause, DomainCause::kDestroyed);
}

TEST_F(LibvirtHypervisorTest, ShutdownIsReportedAsGuestShutdown) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  ASSERT_TRUE(hv_->shutdown_domain(id).is_ok());
  auto stopped = events.find(id.str(), DomainEventKind::kStopped);
  ASSERT_TRUE(stopped.has_value());
  EXPECT_EQ(stopped->event.cause, DomainCause::kGuestShutdown);
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok() && info->has_value());
  EXPECT_EQ((*info)->cause, DomainCause::kGuestShutdown);
}

TEST_F(LibvirtHypervisorTest, AdminPauseIsNotAFailure) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  const RawConnection raw(kTestUri);
  ASSERT_TRUE(raw.conn);
  auto dom = raw.domain(id);
  ASSERT_TRUE(dom);
  ASSERT_EQ(virDomainSuspend(dom.get()), 0);

  auto suspended = events.find(id.str(), DomainEventKind::kSuspended);
  ASSERT_TRUE(suspended.has_value());
  EXPECT_EQ(suspended->event.detail, VIR_DOMAIN_EVENT_SUSPENDED_PAUSED);
  EXPECT_EQ(suspended->event.cause, DomainCause::kOther);
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok() && info->has_value());
  EXPECT_EQ((*info)->state, DomainState::kPaused);
  EXPECT_EQ((*info)->reason, VIR_DOMAIN_PAUSED_USER);
  EXPECT_EQ((*info)->cause, DomainCause::kOther);
}

TEST_F(LibvirtHypervisorTest, CrashStopIsReportedAsACrash) {
  EventLog events;
  hv_->set_event_handler(events.handler());
  const VmId id = define("web-1");
  ASSERT_TRUE(hv_->start_domain(id).is_ok());
  const RawConnection raw(kTestUri);
  ASSERT_TRUE(raw.conn);
  auto dom = raw.domain(id);
  ASSERT_TRUE(dom);
  // The test driver's way to crash a domain: a core dump with VIR_DUMP_CRASH stops it as crashed.
  const std::string dump = (dir_ / "core").string();
  ASSERT_EQ(virDomainCoreDumpWithFormat(dom.get(), dump.c_str(), VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                                        VIR_DUMP_CRASH),
            0);

  auto stopped = events.find(id.str(), DomainEventKind::kStopped);
  ASSERT_TRUE(stopped.has_value());
  EXPECT_EQ(stopped->event.detail, VIR_DOMAIN_EVENT_STOPPED_CRASHED);
  EXPECT_EQ(stopped->event.cause, DomainCause::kGuestCrashed);
  // The state reason cannot tell a dead QEMU from a guest crash: both are SHUTOFF_CRASHED.
  auto info = hv_->get_domain(id);
  ASSERT_TRUE(info.is_ok() && info->has_value());
  EXPECT_EQ((*info)->state, DomainState::kShutOff);
  EXPECT_EQ((*info)->reason, VIR_DOMAIN_SHUTOFF_CRASHED);
  EXPECT_EQ((*info)->cause, DomainCause::kEmulatorGone);
}

// Reasons and details the test driver cannot produce (I/O errors, a dead QEMU, panics).
TEST(LibvirtDomainCause, MapsStateReasons) {
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_IOERROR),
            DomainCause::kIoError);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_CRASHED),
            DomainCause::kGuestCrashed);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_PAUSED, VIR_DOMAIN_PAUSED_USER), DomainCause::kOther);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_CRASHED, VIR_DOMAIN_CRASHED_PANICKED),
            DomainCause::kGuestCrashed);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_CRASHED),
            DomainCause::kEmulatorGone);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_FAILED),
            DomainCause::kEmulatorGone);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_DAEMON),
            DomainCause::kEmulatorGone);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_SHUTDOWN),
            DomainCause::kGuestShutdown);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_DESTROYED),
            DomainCause::kDestroyed);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_UNKNOWN),
            DomainCause::kOther);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_SAVED),
            DomainCause::kOther);
  // Same numbers, other states: the reason only means something with its state.
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_RUNNING, VIR_DOMAIN_RUNNING_CRASHED),
            DomainCause::kOther);
  EXPECT_EQ(domain_cause_of_state(VIR_DOMAIN_RUNNING, VIR_DOMAIN_PAUSED_IOERROR),
            DomainCause::kOther);
}

TEST(LibvirtDomainCause, MapsEventDetails) {
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_IOERROR),
            DomainCause::kIoError);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
            DomainCause::kOther);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_FAILED),
            DomainCause::kEmulatorGone);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_CRASHED),
            DomainCause::kGuestCrashed);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_CRASHED, VIR_DOMAIN_EVENT_CRASHED_PANICKED),
            DomainCause::kGuestCrashed);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN),
            DomainCause::kGuestShutdown);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
            DomainCause::kDestroyed);
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_STOPPED, VIR_DOMAIN_EVENT_STOPPED_MIGRATED),
            DomainCause::kOther);
  // Detail 2 is an I/O error only for a suspension.
  EXPECT_EQ(domain_cause_of_event(VIR_DOMAIN_EVENT_RESUMED, VIR_DOMAIN_EVENT_SUSPENDED_IOERROR),
            DomainCause::kOther);
}

TEST(LibvirtHypervisorCreate, RejectsBadOptions) {
  LibvirtOptions o;
  o.uri = kTestUri;
  o.pool_dir = "relative/dir";
  EXPECT_EQ(LibvirtHypervisor::create(o).status().code(), Code::kInvalidArgument);
  o.pool_dir = "/tmp/x";
  o.pool_name.clear();
  EXPECT_EQ(LibvirtHypervisor::create(o).status().code(), Code::kInvalidArgument);
  o.pool_name = "nodemanager-test";
  o.reconnect_max_backoff = milliseconds(0);
  EXPECT_EQ(LibvirtHypervisor::create(o).status().code(), Code::kInvalidArgument);
}

// libvirt not reachable at all: the adapter starts disconnected, says why, answers every call
// with Unavailable and keeps trying in the background (the destructor stops that).
TEST(LibvirtHypervisorCreate, UnreachableHypervisorStartsDisconnectedAndSaysWhy) {
  LibvirtOptions o;
  o.uri = "test:///nonexistent/driver-config.xml";
  o.pool_dir = "/tmp/x";
  o.reconnect_max_backoff = milliseconds(50);
  auto hv = LibvirtHypervisor::create(o);
  ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
  EXPECT_FALSE((*hv)->connected());
  EXPECT_NE((*hv)->start_error().find("test:///nonexistent"), std::string::npos)
      << (*hv)->start_error();
  ConnectionLog calls;
  (*hv)->set_connection_handler(calls.handler(**hv));
  auto listed = (*hv)->list_domains();
  ASSERT_FALSE(listed.is_ok());
  EXPECT_EQ(listed.status().code(), Code::kUnavailable) << listed.status().to_string();
  EXPECT_EQ((*hv)->host_info().status().code(), Code::kUnavailable);
  std::this_thread::sleep_for(milliseconds(200));  // a few background attempts, all failing
  EXPECT_EQ(calls.count(), 0u) << "no transition: it never was connected";
  EXPECT_FALSE((*hv)->connected());
}

// --- Real libvirtd (opt-in) ---

uint32_t be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
uint64_t be64(const unsigned char* p) {
  return (uint64_t{be32(p)} << 32) | be32(p + 4);
}

struct PoolRemover {
  std::string uri;
  std::string name;
  ~PoolRemover() {
    virConnectPtr c = virConnectOpen(uri.c_str());
    if (c == nullptr) return;
    virStoragePoolPtr p = virStoragePoolLookupByName(c, name.c_str());
    if (p != nullptr) {
      virStoragePoolDestroy(p);
      virStoragePoolUndefine(p);
      virStoragePoolFree(p);
    }
    virConnectClose(c);
  }
};

TEST(LibvirtHypervisorReal, CreatesAQcow2OverlayOnARawBase) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const fs::path& dir = tmp.path();
  fs::permissions(dir, fs::perms::owner_all | fs::perms::group_exec | fs::perms::others_exec);
  const fs::path base = dir / "base.raw";
  {
    std::ofstream out(base, std::ios::binary);
    const std::string mib(1 << 20, '\x5a');
    out << mib;
  }
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (dir / "instances").string();
  PoolRemover remover{uri, o.pool_name};
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    EXPECT_TRUE(fs::is_directory(o.pool_dir));
    const VmId id = generate_vm_id();
    const uint64_t capacity = 64ull << 20;
    auto path = (*hv)->create_overlay(id, base.string(), "raw", capacity);
    ASSERT_TRUE(path.is_ok()) << path.status().to_string();
    EXPECT_EQ(*path, o.pool_dir + "/" + id.str() + ".qcow2");

    std::ifstream in(*path, std::ios::binary);
    ASSERT_TRUE(in) << "cannot read " << *path;
    std::vector<unsigned char> head(4096);
    in.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(head.size()));
    ASSERT_GE(in.gcount(), 72);
    EXPECT_EQ(std::string(head.begin(), head.begin() + 4), std::string("QFI\xfb"));
    EXPECT_GE(be32(&head[4]), 2u);         // qcow2 version
    EXPECT_EQ(be64(&head[24]), capacity);  // virtual size
    const uint64_t off = be64(&head[8]);   // backing file name offset
    const uint32_t len = be32(&head[16]);  // and length
    ASSERT_GT(len, 0u);
    ASSERT_LE(off + len, head.size());
    EXPECT_EQ(std::string(head.begin() + static_cast<long>(off),
                          head.begin() + static_cast<long>(off + len)),
              base.string());
    struct stat st {};
    ASSERT_EQ(stat(path->c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
    EXPECT_LT(st.st_size, 1 << 20) << "the overlay must not copy the base";

    auto listed = (*hv)->list_overlays();
    ASSERT_TRUE(listed.is_ok()) << listed.status().to_string();
    EXPECT_EQ(std::count(listed->begin(), listed->end(), id), 1);

    // A file removed behind libvirt's back is seen after the refresh.
    ASSERT_TRUE(fs::remove(*path));
    auto found = (*hv)->find_overlay(id);
    ASSERT_TRUE(found.is_ok()) << found.status().to_string();
    EXPECT_FALSE(found->has_value());
    EXPECT_TRUE((*hv)->delete_overlay(id).is_ok());
  }
}

TEST(LibvirtHypervisorReal, DeliversDefineAndUndefineEventsOverTheRemoteConnection) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const fs::path& dir = tmp.path();
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (dir / "instances").string();
  PoolRemover remover{uri, o.pool_name};
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    EventLog events;
    (*hv)->set_event_handler(events.handler());
    const VmId id = generate_vm_id();
    const std::string name = "lvtest-" + std::to_string(getpid());
    const Status defined = (*hv)->define_domain(domain_xml(id, name, "contoso", 2, "qemu"));
    ASSERT_TRUE(defined.is_ok()) << defined.to_string();
    EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kDefined));

    auto info = (*hv)->get_domain(id);
    ASSERT_TRUE(info.is_ok()) << info.status().to_string();
    ASSERT_TRUE(info->has_value());
    EXPECT_EQ((*info)->name, "nm-" + name);
    EXPECT_EQ((*info)->state, DomainState::kShutOff);
    ASSERT_TRUE((*info)->owner.has_value());
    EXPECT_EQ((*info)->owner->vm_id, id);
    EXPECT_EQ((*info)->owner->generation, 2u);
    EXPECT_EQ((*hv)->reboot_domain(id).code(), Code::kConflict);
    EXPECT_TRUE((*hv)->shutdown_domain(id).is_ok());

    ASSERT_TRUE((*hv)->undefine_domain(id).is_ok());
    EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kUndefined));
    EXPECT_TRUE((*hv)->undefine_domain(id).is_ok());
    auto gone = (*hv)->get_domain(id);
    ASSERT_TRUE(gone.is_ok());
    EXPECT_FALSE(gone->has_value());
  }
}

// The standard output of a shell command (test code only; the product never spawns tools).
std::string run(const std::string& command) {
  std::string out;
  FILE* p = popen(command.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  size_t n = 0;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  pclose(p);
  return out;
}

// Makes libvirtd drop every connection this process holds, as a libvirtd restart would, without
// disturbing anyone else (virt-admin: libvirt-admin cannot share a process with libvirt).
// Returns how many it dropped.
int drop_this_process_connections() {
  int dropped = 0;
  std::istringstream list(run("virt-admin client-list libvirtd 2>/dev/null"));
  std::string line;
  while (std::getline(list, line)) {
    std::istringstream fields(line);
    std::string id;
    fields >> id;
    if (id.empty() || !std::all_of(id.begin(), id.end(), ::isdigit)) continue;
    std::istringstream info(run("virt-admin client-info libvirtd " + id + " 2>/dev/null"));
    while (std::getline(info, line)) {  // "unix_process_id: 1234" (keys padded to align)
      const size_t colon = line.find(':');
      if (colon == std::string::npos) continue;
      std::istringstream key(line.substr(0, colon));
      std::istringstream value(line.substr(colon + 1));
      std::string k;
      long long pid = -1;
      key >> k;
      value >> pid;
      if (k == "unix_process_id" && pid == getpid() &&
          run("virt-admin client-disconnect libvirtd " + id + " >/dev/null 2>&1 && echo ok")
              .starts_with("ok")) {
        ++dropped;
      }
    }
  }
  return dropped;
}

TEST(LibvirtHypervisorReal, ReconnectsAfterLibvirtdDropsTheConnection) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const fs::path& dir = tmp.path();
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (dir / "instances").string();
  PoolRemover remover{uri, o.pool_name};
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    EventLog events;
    (*hv)->set_event_handler(events.handler());
    ASSERT_GE(drop_this_process_connections(), 1);

    // The call that meets the dead connection may fail as Unavailable; the next one reconnects.
    auto listed = (*hv)->list_domains();
    if (!listed.is_ok()) {
      EXPECT_EQ(listed.status().code(), Code::kUnavailable) << listed.status().to_string();
      listed = (*hv)->list_domains();
    }
    ASSERT_TRUE(listed.is_ok()) << listed.status().to_string();

    // Events flow again: the lifecycle callback was registered on the new connection.
    const VmId id = generate_vm_id();
    const std::string name = "lvtest-" + std::to_string(getpid());
    ASSERT_TRUE((*hv)->define_domain(domain_xml(id, name, "contoso", 1, "qemu")).is_ok());
    EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kDefined));
    EXPECT_TRUE((*hv)->undefine_domain(id).is_ok());
    auto found = (*hv)->find_overlay(id);
    EXPECT_TRUE(found.is_ok()) << found.status().to_string();
  }
}

// libvirtd appears after the adapter was created (nodemanagerd started first at boot): the
// reconnect thread connects, the handler hears about it like a reconnect, and the calls work,
// the overlay pool included. The socket the URI names is a symlink the test makes to the real
// libvirtd's socket, so the shared libvirtd is never stopped.
TEST(LibvirtHypervisorReal, ConnectsWhenLibvirtdAppearsAfterStartUp) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";
  const fs::path real_socket = "/run/libvirt/libvirt-sock";
  if (!fs::exists(real_socket)) GTEST_SKIP() << real_socket << " does not exist";

  const TempDir tmp;
  const fs::path socket = tmp.path() / "libvirt-sock";
  LibvirtOptions o;
  o.uri = "qemu+unix:///system?socket=" + socket.string();
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (tmp.path() / "instances").string();
  o.reconnect_max_backoff = milliseconds(200);
  PoolRemover remover{uri, o.pool_name};
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    LibvirtHypervisor& adapter = **hv;
    ConnectionLog calls;
    adapter.set_connection_handler(calls.handler(adapter));
    EXPECT_FALSE(adapter.connected());
    EXPECT_NE(adapter.start_error().find(socket.string()), std::string::npos)
        << adapter.start_error();
    EXPECT_EQ(adapter.list_domains().status().code(), Code::kUnavailable);

    fs::create_symlink(real_socket, socket);  // "libvirtd has started"
    auto up = calls.wait_for_call(0, seconds(5));
    ASSERT_TRUE(up.has_value()) << "not connected within 5 s of the socket appearing";
    EXPECT_TRUE(up->connected);
    EXPECT_TRUE(up->connected_then);
    EXPECT_TRUE(adapter.connected());
    auto listed = adapter.list_domains();
    ASSERT_TRUE(listed.is_ok()) << listed.status().to_string();
    auto host = adapter.host_info();
    ASSERT_TRUE(host.is_ok()) << host.status().to_string();
    EXPECT_GT(host->cpus, 0u);
    auto overlays = adapter.list_overlays();  // ensures the pool on this first connection
    ASSERT_TRUE(overlays.is_ok()) << overlays.status().to_string();
    EXPECT_TRUE(overlays->empty());
    EXPECT_EQ(adapter.default_domain_type(), "kvm");
  }
}

// Destroys and undefines a domain when the test ends, however it ends.
struct DomainRemover {
  std::string uri;
  VmId id;
  ~DomainRemover() {
    const RawConnection raw(uri);
    if (!raw.conn) return;
    auto dom = raw.domain(id);
    if (!dom) return;
    virDomainDestroy(dom.get());
    virDomainUndefine(dom.get());
  }
};

// The pid in `path` (a pid file or QEMU's /run/libvirt/qemu/<name>.pid), -1 when unreadable.
pid_t read_pid(const fs::path& path) {
  std::ifstream in(path);
  long long pid = -1;
  if (!(in >> pid) || pid <= 1) return -1;
  return static_cast<pid_t>(pid);
}

// True once `pid` (not our child) has been reaped, within the timeout. A daemon's zombie keeps
// its pid "alive" for kill(pid, 0), and so for start-services.sh, until PID 1 reaps it: on these
// machines that takes up to about 2 s. Nothing announces the reap of a process that is not our
// child, hence the poll.
bool wait_reaped(pid_t pid, milliseconds timeout) {
  const auto deadline = SteadyClock::now() + timeout;
  while (kill(pid, 0) == 0 || errno != ESRCH) {
    if (SteadyClock::now() >= deadline) return false;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return true;
}

bool libvirtd_answers() {
  return run("timeout 5 virsh -q -c qemu:///system version >/dev/null 2>&1 && echo ok")
      .starts_with("ok");
}

// (Re)starts libvirtd the way the e2e tier does (tests/lib/start-services.sh: by hand, with its
// pid file, no systemd); true once it answers.
bool start_libvirtd() {
  return run(std::string("bash '") + NM_START_SERVICES + "' >/dev/null 2>&1 && echo ok")
      .starts_with("ok");
}

// Restarts libvirtd when the test ends if it does not answer then (after the killed one, `pid`,
// was reaped): a failed assertion must not leave the host's libvirtd, shared with other tests,
// stopped.
struct LibvirtdRestorer {
  pid_t killed = -1;
  ~LibvirtdRestorer() {
    if (libvirtd_answers()) return;
    if (killed > 1) (void)wait_reaped(killed, milliseconds(10000));
    if (!start_libvirtd()) {
      ADD_FAILURE() << "could not restart libvirtd with " << NM_START_SERVICES;
    }
  }
};

// The target is 100 ms from the kill to the event. libvirt 9.0 itself cannot always meet it: on
// QEMU's EOF it waits, in 200 ms steps, until the dead QEMU has been reaped before it emits the
// event (virProcessKillPainfullyDelay). Measured on the test machines: with a prompt reaper (as
// systemd is) under 100 ms or 220-240 ms, depending on which side wins the race; with their PID 1,
// which reaps orphans only every 1-2 s, 1.2-2 s. So the test allows 100 ms beyond the first 200 ms
// step after the reap, and records the latency as `kill_to_event_ms`.
TEST(LibvirtHypervisorReal, KilledQemuIsReportedAsEmulatorGone) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (tmp.path() / "instances").string();
  PoolRemover pool_remover{uri, o.pool_name};
  const VmId id = generate_vm_id();
  DomainRemover domain_remover{uri, id};
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    EventLog events;
    (*hv)->set_event_handler(events.handler());
    // No disk and no kernel: QEMU (TCG) still runs, which is all this needs.
    const std::string name = "lvcrash-" + std::to_string(getpid());
    const Status defined = (*hv)->define_domain(domain_xml(id, name, "contoso", 1, "qemu"));
    ASSERT_TRUE(defined.is_ok()) << defined.to_string();
    const Status started = (*hv)->start_domain(id);
    ASSERT_TRUE(started.is_ok()) << started.to_string();
    ASSERT_TRUE(events.wait_for(id.str(), DomainEventKind::kStarted));

    const fs::path pid_file = fs::path("/run/libvirt/qemu") / ("nm-" + name + ".pid");
    const pid_t qemu = read_pid(pid_file);
    ASSERT_GT(qemu, 1) << "no QEMU pid in " << pid_file;
    const auto killed_at = SteadyClock::now();
    ASSERT_EQ(kill(qemu, SIGKILL), 0);
    ASSERT_TRUE(wait_reaped(qemu, milliseconds(10000))) << "QEMU (pid " << qemu << ") not reaped";
    const auto reaped_after =
        std::chrono::duration_cast<milliseconds>(SteadyClock::now() - killed_at);

    auto stopped = events.find(id.str(), DomainEventKind::kStopped);
    ASSERT_TRUE(stopped.has_value()) << "no stopped event after QEMU was killed";
    EXPECT_EQ(stopped->event.detail, VIR_DOMAIN_EVENT_STOPPED_FAILED);
    EXPECT_EQ(stopped->event.cause, DomainCause::kEmulatorGone);
    const auto latency = std::chrono::duration_cast<milliseconds>(stopped->at - killed_at);
    RecordProperty("kill_to_event_ms", static_cast<int>(latency.count()));
    RecordProperty("kill_to_reap_ms", static_cast<int>(reaped_after.count()));
    EXPECT_LT(latency, reaped_after + milliseconds(200) + milliseconds(100))
        << "QEMU was reaped " << reaped_after.count() << " ms after the kill";

    auto info = (*hv)->get_domain(id);
    ASSERT_TRUE(info.is_ok()) << info.status().to_string();
    ASSERT_TRUE(info->has_value());
    EXPECT_EQ((*info)->state, DomainState::kShutOff);
    EXPECT_EQ((*info)->reason, VIR_DOMAIN_SHUTOFF_CRASHED);
    EXPECT_EQ((*info)->cause, DomainCause::kEmulatorGone);
  }
}

// Options for a real-libvirtd test: its own pool in `tmp`.
LibvirtOptions real_options(const char* uri, const TempDir& tmp) {
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (tmp.path() / "instances").string();
  return o;
}

// The pid QEMU wrote for domain "nm-<name>" (libvirt keeps the file while the domain runs).
pid_t qemu_pid(const std::string& name) {
  return read_pid(fs::path("/run/libvirt/qemu") / ("nm-" + name + ".pid"));
}

milliseconds ms_between(SteadyClock::time_point from, SteadyClock::time_point to) {
  return std::chrono::duration_cast<milliseconds>(to - from);
}

// The adapter's pidfd sees a SIGKILLed QEMU at once, long before libvirt's own kStopped (which
// waits for the reap: about 1.8 s with this machine's PID 1), and reports each process once.
TEST(LibvirtHypervisorReal, KilledQemuIsSeenAtOnceAndLibvirtsStopFollows) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const LibvirtOptions o = real_options(uri, tmp);
  PoolRemover pool_remover{uri, o.pool_name};
  const VmId id = generate_vm_id();
  DomainRemover domain_remover{uri, id};
  auto hv = LibvirtHypervisor::create(o);
  ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
  EventLog events;
  (*hv)->set_event_handler(events.handler());
  const std::string name = "lvpidfd-" + std::to_string(getpid());
  ASSERT_TRUE((*hv)->define_domain(domain_xml(id, name, "contoso", 1, "qemu")).is_ok());

  constexpr size_t kKills = 10;
  std::vector<milliseconds> latencies;
  for (size_t i = 0; i < kKills; ++i) {
    const Status started = (*hv)->start_domain(id);
    ASSERT_TRUE(started.is_ok()) << started.to_string();
    const pid_t qemu = qemu_pid(name);
    ASSERT_GT(qemu, 1) << "no QEMU pid file for 'nm-" << name << "'";
    const auto killed_at = SteadyClock::now();
    ASSERT_EQ(kill(qemu, SIGKILL), 0);

    auto exited = events.find_nth(id.str(), DomainEventKind::kEmulatorExited, i, seconds(5));
    ASSERT_TRUE(exited.has_value()) << "no kEmulatorExited after kill " << i;
    EXPECT_EQ(exited->event.cause, DomainCause::kEmulatorGone);
    EXPECT_EQ(exited->event.detail, 0);
    latencies.push_back(ms_between(killed_at, exited->at));
    EXPECT_LT(latencies.back(), milliseconds(100)) << "kill " << i;
    // libvirt still lists the domain running, with the dead QEMU's pid file: nothing is re-armed.
    ASSERT_TRUE((*hv)->list_domains().is_ok());

    auto stopped = events.find_nth(id.str(), DomainEventKind::kStopped, i, seconds(10));
    ASSERT_TRUE(stopped.has_value()) << "libvirt never reported kill " << i;
    EXPECT_EQ(stopped->event.cause, DomainCause::kEmulatorGone);
    EXPECT_GE(stopped->at, exited->at);
    if (i == 0) {
      std::cout << "kill " << i << ": kEmulatorExited after " << latencies.back().count()
                << " ms, libvirt's kStopped after " << ms_between(killed_at, stopped->at).count()
                << " ms\n";
    }
    EXPECT_EQ(events.count(id.str(), DomainEventKind::kEmulatorExited), i + 1);
  }
  std::vector<milliseconds> sorted = latencies;
  std::sort(sorted.begin(), sorted.end());
  const milliseconds p50 = sorted[sorted.size() / 2];
  const milliseconds max = sorted.back();
  std::cout << "SIGKILL -> kEmulatorExited over " << kKills << " kills: p50 " << p50.count()
            << " ms, max " << max.count() << " ms\n";
  RecordProperty("kill_to_exited_p50_ms", static_cast<int>(p50.count()));
  RecordProperty("kill_to_exited_max_ms", static_cast<int>(max.count()));

  // Our own destroy ends the QEMU too: reported as well, once, before libvirt's kStopped.
  ASSERT_TRUE((*hv)->start_domain(id).is_ok());
  ASSERT_TRUE((*hv)->start_domain(id).is_ok());  // idempotent, and arms nothing twice
  ASSERT_TRUE((*hv)->destroy_domain(id).is_ok());
  auto stopped = events.find_nth(id.str(), DomainEventKind::kStopped, kKills, seconds(10));
  ASSERT_TRUE(stopped.has_value());
  EXPECT_EQ(stopped->event.cause, DomainCause::kDestroyed);
  auto exited = events.find_nth(id.str(), DomainEventKind::kEmulatorExited, kKills, seconds(0));
  ASSERT_TRUE(exited.has_value()) << "destroy_domain's QEMU exit was not reported";
  EXPECT_LE(exited->at, stopped->at);
  EXPECT_EQ(events.count(id.str(), DomainEventKind::kEmulatorExited), kKills + 1);
}

// Starts `xml` behind the adapter's back.
void start_with_raw_connection(const char* uri, const std::string& xml) {
  const RawConnection raw(uri);
  ASSERT_TRUE(raw.conn);
  RawConnection::DomainPtr dom(virDomainDefineXML(raw.conn.get(), xml.c_str()));
  ASSERT_TRUE(dom);
  ASSERT_EQ(virDomainCreate(dom.get()), 0);
}

TEST(LibvirtHypervisorReal, WatchesTheQemuOfADomainStartedBeforeTheAdapter) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const LibvirtOptions o = real_options(uri, tmp);
  PoolRemover pool_remover{uri, o.pool_name};
  const VmId id = generate_vm_id();
  DomainRemover domain_remover{uri, id};
  const std::string name = "lvbefore-" + std::to_string(getpid());
  start_with_raw_connection(uri, domain_xml(id, name, "contoso", 1, "qemu"));
  const pid_t qemu = qemu_pid(name);
  ASSERT_GT(qemu, 1);

  auto hv = LibvirtHypervisor::create(o);  // finds the running domain and watches its QEMU
  ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
  EventLog events;
  (*hv)->set_event_handler(events.handler());
  const auto killed_at = SteadyClock::now();
  ASSERT_EQ(kill(qemu, SIGKILL), 0);
  auto exited = events.find(id.str(), DomainEventKind::kEmulatorExited, seconds(5));
  ASSERT_TRUE(exited.has_value()) << "the QEMU of a domain running before create() was not watched";
  EXPECT_LT(ms_between(killed_at, exited->at), milliseconds(100));
  auto stopped = events.find(id.str(), DomainEventKind::kStopped);
  ASSERT_TRUE(stopped.has_value());
  EXPECT_GE(stopped->at, exited->at);
  EXPECT_EQ(events.count(id.str(), DomainEventKind::kEmulatorExited), 1u);
}

TEST(LibvirtHypervisorReal, WatchesTheQemuOfADomainStartedBehindItsBack) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";

  const TempDir tmp;
  const LibvirtOptions o = real_options(uri, tmp);
  PoolRemover pool_remover{uri, o.pool_name};
  const VmId id = generate_vm_id();
  DomainRemover domain_remover{uri, id};
  auto hv = LibvirtHypervisor::create(o);
  ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
  EventLog events;
  (*hv)->set_event_handler(events.handler());
  const std::string name = "lvbehind-" + std::to_string(getpid());
  start_with_raw_connection(uri, domain_xml(id, name, "contoso", 1, "qemu"));
  ASSERT_TRUE(events.wait_for(id.str(), DomainEventKind::kStarted));
  // The STARTED event makes the reconnect thread look the domain up and arm the watch; nothing
  // announces that, so give it ample time (it takes a few milliseconds).
  std::this_thread::sleep_for(milliseconds(500));
  const pid_t qemu = qemu_pid(name);
  ASSERT_GT(qemu, 1);
  const auto killed_at = SteadyClock::now();
  ASSERT_EQ(kill(qemu, SIGKILL), 0);
  auto exited = events.find(id.str(), DomainEventKind::kEmulatorExited, seconds(5));
  ASSERT_TRUE(exited.has_value()) << "the QEMU of a domain started by someone else was not watched";
  EXPECT_LT(ms_between(killed_at, exited->at), milliseconds(100));
  ASSERT_TRUE(events.wait_for(id.str(), DomainEventKind::kStopped));
  EXPECT_EQ(events.count(id.str(), DomainEventKind::kEmulatorExited), 1u);
}

TEST(LibvirtHypervisorReal, ReportsLibvirtdDeathAndReturnToTheConnectionHandler) {
  const char* uri = std::getenv("NM_E2E_LIBVIRT_URI");
  if (uri == nullptr || *uri == '\0') GTEST_SKIP() << "set NM_E2E_LIBVIRT_URI (qemu:///system)";
  const fs::path pid_file = "/run/libvirtd.pid";
  if (read_pid(pid_file) < 0) {
    GTEST_SKIP() << "libvirtd was not started by hand with " << pid_file
                 << " (tests/lib/start-services.sh); not killing it";
  }

  const TempDir tmp;
  LibvirtOptions o;
  o.uri = uri;
  o.pool_name = "nm-test-" + std::to_string(getpid());
  o.pool_dir = (tmp.path() / "instances").string();
  PoolRemover pool_remover{uri, o.pool_name};  // runs after the restorer, on the new libvirtd
  {
    auto hv = LibvirtHypervisor::create(o);
    ASSERT_TRUE(hv.is_ok()) << hv.status().to_string();
    LibvirtHypervisor& adapter = **hv;
    ConnectionLog calls;
    adapter.set_connection_handler(calls.handler(adapter));
    EventLog events;
    adapter.set_event_handler(events.handler());
    ASSERT_TRUE(adapter.connected());

    LibvirtdRestorer restorer;
    const pid_t libvirtd = read_pid(pid_file);
    ASSERT_GT(libvirtd, 1);
    restorer.killed = libvirtd;
    const auto killed_at = SteadyClock::now();
    ASSERT_EQ(kill(libvirtd, SIGKILL), 0);

    auto down = calls.wait_for_call(0, seconds(10));
    ASSERT_TRUE(down.has_value()) << "no connection-handler call after libvirtd was killed";
    EXPECT_FALSE(down->connected);
    EXPECT_FALSE(down->connected_then);
    EXPECT_NE(down->reason.find(uri), std::string::npos) << down->reason;
    const auto lost_after = std::chrono::duration_cast<milliseconds>(down->at - killed_at);
    RecordProperty("kill_to_handler_ms", static_cast<int>(lost_after.count()));
    EXPECT_LT(lost_after, milliseconds(2000));
    EXPECT_FALSE(adapter.connected());

    // While libvirtd is down, calls fail as Unavailable without hanging.
    const auto call_at = SteadyClock::now();
    auto listed = adapter.list_domains();
    EXPECT_LT(SteadyClock::now() - call_at, milliseconds(1000));
    ASSERT_FALSE(listed.is_ok());
    EXPECT_EQ(listed.status().code(), Code::kUnavailable) << listed.status().to_string();
    auto host = adapter.host_info();
    ASSERT_FALSE(host.is_ok());
    EXPECT_EQ(host.status().code(), Code::kUnavailable) << host.status().to_string();

    // The old process must be gone before a new one takes over its pid file and sockets.
    ASSERT_TRUE(wait_reaped(libvirtd, milliseconds(10000)))
        << "libvirtd (pid " << libvirtd << ") was not reaped";
    ASSERT_TRUE(start_libvirtd()) << "restarting libvirtd failed";
    const auto answering_at = SteadyClock::now();  // the script returns once virsh gets answers

    auto up = calls.wait_for_call(1, answering_at + seconds(2) - SteadyClock::now());
    ASSERT_TRUE(up.has_value()) << "not reconnected within 2 s of libvirtd answering";
    EXPECT_TRUE(up->connected);
    EXPECT_TRUE(up->connected_then);
    EXPECT_TRUE(up->reason.empty()) << up->reason;
    RecordProperty(
        "answer_to_handler_ms",
        static_cast<int>(std::chrono::duration_cast<milliseconds>(up->at - answering_at).count()));
    EXPECT_TRUE(adapter.connected());

    // The new connection carries events again, and each transition was reported once.
    const VmId id = generate_vm_id();
    const std::string name = "lvrestart-" + std::to_string(getpid());
    ASSERT_TRUE(adapter.define_domain(domain_xml(id, name, "contoso", 1, "qemu")).is_ok());
    EXPECT_TRUE(events.wait_for(id.str(), DomainEventKind::kDefined));
    EXPECT_TRUE(adapter.undefine_domain(id).is_ok());
    EXPECT_EQ(calls.count(), 2u);
  }
}

}  // namespace
}  // namespace nm
