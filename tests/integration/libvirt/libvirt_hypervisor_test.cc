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
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "nm/domain_xml.h"
#include "nm/vm_spec.h"

namespace nm {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;

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

// Collects lifecycle events; waits on a condition variable, never sleep-polls.
class EventLog {
 public:
  Hypervisor::EventHandler handler() {
    return [this](const DomainEvent& ev) {
      std::lock_guard lock(mu_);
      events_.push_back(ev);
      cv_.notify_all();
    };
  }
  // True once an event of `kind` for `uuid` has arrived (within the timeout).
  bool wait_for(const std::string& uuid, DomainEventKind kind, seconds timeout = seconds(10)) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] {
      return std::any_of(events_.begin(), events_.end(),
                         [&](const DomainEvent& e) { return e.uuid == uuid && e.kind == kind; });
    });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<DomainEvent> events_;
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

TEST(LibvirtHypervisorCreate, RejectsBadOptions) {
  LibvirtOptions o;
  o.uri = kTestUri;
  o.pool_dir = "relative/dir";
  EXPECT_EQ(LibvirtHypervisor::create(o).status().code(), Code::kInvalidArgument);
  o.pool_dir = "/tmp/x";
  o.pool_name.clear();
  EXPECT_EQ(LibvirtHypervisor::create(o).status().code(), Code::kInvalidArgument);
}

TEST(LibvirtHypervisorCreate, UnreachableHypervisorIsUnavailable) {
  LibvirtOptions o;
  o.uri = "test:///nonexistent/driver-config.xml";
  o.pool_dir = "/tmp/x";
  auto hv = LibvirtHypervisor::create(o);
  ASSERT_FALSE(hv.is_ok());
  EXPECT_EQ(hv.status().code(), Code::kUnavailable) << hv.status().to_string();
  EXPECT_NE(hv.status().message().find("test:///nonexistent"), std::string::npos);
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

}  // namespace
}  // namespace nm
