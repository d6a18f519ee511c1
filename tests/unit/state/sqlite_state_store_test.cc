#include <gtest/gtest.h>
#include <sqlite3.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "nm/state_store.h"

namespace nm {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kNow = 1'700'000'000'000'000;

VmSpec spec_named(const std::string& name) {
  auto spec = parse_vm_spec(R"({"name": ")" + name +
                            R"(", "tenant": "contoso", "vcpus": 2, "memory_mib": 512,
        "image": "busybox-guest:1", "disk_gib": 4, "kernel_image": "vmlinuz:6.1",
        "initrd_image": "initrd:1", "cmdline": "console=ttyS0",
        "networks": [{"network": "contoso-a", "ip": "10.0.0.5"}], "autostart": false})");
  EXPECT_TRUE(spec.is_ok()) << spec.status().to_string();
  return std::move(spec).value();
}

Digest digest(char c) {
  return Digest::trusted("sha256:" + std::string(64, c));
}

VmRecord vm_named(const std::string& name, const std::string& id) {
  VmRecord vm;
  vm.id = VmId::trusted(id);
  vm.spec = spec_named(name);
  vm.power = PowerIntent::kRunning;
  vm.generation = 3;
  vm.observed_generation = 2;
  vm.state = "running";
  vm.state_reason = "started";
  vm.image_digest = digest('a');
  vm.kernel_digest = digest('b');
  vm.initrd_digest = std::nullopt;
  vm.created_us = kNow;
  vm.updated_us = kNow + 5;
  return vm;
}

constexpr const char* kId1 = "11111111-1111-4111-8111-111111111111";
constexpr const char* kId2 = "22222222-2222-4222-8222-222222222222";

// A pass-through VFS over SQLite's "unix" one that records what happens to WAL files ('H' the
// header written, 'W' a frame written, 'S' a sync) and can fail the next WAL sync: the store's
// durability protocol, observed where it meets the disk.
namespace vfs_probe {
std::string wal_ops;
int fail_next_wal_sync = 0;
sqlite3_vfs* real = nullptr;
sqlite3_vfs probe;

struct File {
  sqlite3_file base;
  sqlite3_file* real;
  bool wal;
};
sqlite3_file* real_of(sqlite3_file* f) {
  return reinterpret_cast<File*>(f)->real;
}
bool is_wal(sqlite3_file* f) {
  return reinterpret_cast<File*>(f)->wal;
}

int x_close(sqlite3_file* f) {
  const int rc = real_of(f)->pMethods->xClose(real_of(f));
  std::free(real_of(f));
  return rc;
}
int x_read(sqlite3_file* f, void* b, int n, sqlite3_int64 o) {
  return real_of(f)->pMethods->xRead(real_of(f), b, n, o);
}
int x_write(sqlite3_file* f, const void* b, int n, sqlite3_int64 o) {
  if (is_wal(f)) wal_ops += o == 0 ? 'H' : 'W';
  return real_of(f)->pMethods->xWrite(real_of(f), b, n, o);
}
int x_truncate(sqlite3_file* f, sqlite3_int64 size) {
  return real_of(f)->pMethods->xTruncate(real_of(f), size);
}
int x_sync(sqlite3_file* f, int flags) {
  if (is_wal(f)) {
    if (fail_next_wal_sync > 0) {
      --fail_next_wal_sync;
      return SQLITE_IOERR_FSYNC;
    }
    wal_ops += 'S';
  }
  return real_of(f)->pMethods->xSync(real_of(f), flags);
}
int x_file_size(sqlite3_file* f, sqlite3_int64* size) {
  return real_of(f)->pMethods->xFileSize(real_of(f), size);
}
int x_lock(sqlite3_file* f, int l) {
  return real_of(f)->pMethods->xLock(real_of(f), l);
}
int x_unlock(sqlite3_file* f, int l) {
  return real_of(f)->pMethods->xUnlock(real_of(f), l);
}
int x_check_reserved_lock(sqlite3_file* f, int* out) {
  return real_of(f)->pMethods->xCheckReservedLock(real_of(f), out);
}
int x_file_control(sqlite3_file* f, int op, void* arg) {
  return real_of(f)->pMethods->xFileControl(real_of(f), op, arg);
}
int x_sector_size(sqlite3_file* f) {
  return real_of(f)->pMethods->xSectorSize(real_of(f));
}
int x_device_characteristics(sqlite3_file* f) {
  return real_of(f)->pMethods->xDeviceCharacteristics(real_of(f));
}
int x_shm_map(sqlite3_file* f, int region, int size, int extend, void volatile** out) {
  return real_of(f)->pMethods->xShmMap(real_of(f), region, size, extend, out);
}
int x_shm_lock(sqlite3_file* f, int offset, int n, int flags) {
  return real_of(f)->pMethods->xShmLock(real_of(f), offset, n, flags);
}
void x_shm_barrier(sqlite3_file* f) {
  real_of(f)->pMethods->xShmBarrier(real_of(f));
}
int x_shm_unmap(sqlite3_file* f, int del) {
  return real_of(f)->pMethods->xShmUnmap(real_of(f), del);
}
int x_fetch(sqlite3_file* f, sqlite3_int64 o, int n, void** out) {
  return real_of(f)->pMethods->xFetch(real_of(f), o, n, out);
}
int x_unfetch(sqlite3_file* f, sqlite3_int64 o, void* p) {
  return real_of(f)->pMethods->xUnfetch(real_of(f), o, p);
}

const sqlite3_io_methods kMethods = {3,
                                     x_close,
                                     x_read,
                                     x_write,
                                     x_truncate,
                                     x_sync,
                                     x_file_size,
                                     x_lock,
                                     x_unlock,
                                     x_check_reserved_lock,
                                     x_file_control,
                                     x_sector_size,
                                     x_device_characteristics,
                                     x_shm_map,
                                     x_shm_lock,
                                     x_shm_barrier,
                                     x_shm_unmap,
                                     x_fetch,
                                     x_unfetch};

int x_open(sqlite3_vfs* /*vfs*/, const char* name, sqlite3_file* f, int flags, int* out) {
  auto* file = reinterpret_cast<File*>(f);
  file->base.pMethods = nullptr;
  file->real = static_cast<sqlite3_file*>(std::calloc(1, static_cast<size_t>(real->szOsFile)));
  file->wal = (flags & SQLITE_OPEN_WAL) != 0;
  const int rc = real->xOpen(real, name, file->real, flags, out);
  if (rc != SQLITE_OK || file->real->pMethods == nullptr) {
    std::free(file->real);
    return rc;
  }
  file->base.pMethods = &kMethods;
  return rc;
}

// The default VFS until uninstall(): every connection opened meanwhile goes through it.
void install() {
  real = sqlite3_vfs_find("unix");
  probe = *real;
  probe.zName = "nm-test-probe";
  probe.szOsFile = static_cast<int>(sizeof(File));
  probe.xOpen = x_open;
  sqlite3_vfs_register(&probe, 1);
  wal_ops.clear();
  fail_next_wal_sync = 0;
}
void uninstall() {
  sqlite3_vfs_unregister(&probe);
}
}  // namespace vfs_probe

class SqliteStateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("state_test_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    path_ = (dir_ / "state.db").string();
  }
  void TearDown() override {
    store_.reset();
    if (probing_) vfs_probe::uninstall();
    fs::remove_all(dir_);
  }

  // Connections opened from here on go through vfs_probe.
  void probe() {
    vfs_probe::install();
    probing_ = true;
  }
  bool probing_ = false;

  void open(const SqliteOptions& options = {}, uint64_t now_us = kNow) {
    store_.reset();
    auto s = open_sqlite_state_store(path_, options, now_us);
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    store_ = std::move(s).value();
  }

  void fill_the_disk(bool deferred_sync);

  // The value write_settings() gives its i-th write: about 3 KB, distinct each time (SQLite
  // writes nothing for a row updated to what it holds).
  static std::string setting_value(int i) { return std::to_string(i) + std::string(3000, 'v'); }

  // `n` commits, each one row of settings key-0..key-49 in turn; a sync() after every
  // `sync_every` of them (0: none).
  void write_settings(int n, int sync_every) {
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(store_
                      ->transact([&](StateTxn& txn) {
                        return txn.put_setting("key-" + std::to_string(i % 50), setting_value(i));
                      })
                      .is_ok());
      if (sync_every > 0 && i % sync_every == sync_every - 1) {
        ASSERT_TRUE(store_->sync().is_ok());
      }
    }
  }

  static SqliteOptions deferred() {
    SqliteOptions options;
    options.deferred_sync = true;
    return options;
  }

  // A child process opens the store with group commit, writes VM web-1 and dies: no sync, no
  // close.
  void write_web1_and_die() {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      auto store = open_sqlite_state_store(path_, deferred(), kNow);
      if (!store.is_ok()) ::_exit(2);
      const Status s =
          (*store)->transact([](StateTxn& txn) { return txn.put_vm(vm_named("web-1", kId1)); });
      ::_exit(s.is_ok() ? 0 : 3);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0);
  }

  Status put(const VmRecord& vm) {
    return store_->transact([&](StateTxn& txn) { return txn.put_vm(vm); });
  }

  fs::path dir_;
  std::string path_;
  std::unique_ptr<StateStore> store_;
};

TEST_F(SqliteStateStoreTest, VmRecordsRoundTripIncludingTheSpec) {
  open();
  const VmRecord a = vm_named("web-1", kId1);
  VmRecord b = vm_named("db-1", kId2);
  b.power = PowerIntent::kStopped;
  b.deleting = true;
  b.kernel_digest.reset();
  b.initrd_digest = digest('c');
  b.generation = uint64_t{1} << 62;
  ASSERT_TRUE(put(a).is_ok());
  ASSERT_TRUE(put(b).is_ok());

  open();  // from disk, not from a cache
  auto got = store_->get_vm(a.id);
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ(**got, a);
  EXPECT_EQ((*got)->spec.networks.at(0).ip, "10.0.0.5");

  auto all = store_->list_vms();
  ASSERT_TRUE(all.is_ok()) << all.status().to_string();
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0], b);  // ordered by name
  EXPECT_EQ((*all)[1], a);

  EXPECT_FALSE(store_->get_vm(VmId::trusted("33333333-3333-4333-8333-333333333333"))->has_value());
}

TEST_F(SqliteStateStoreTest, PutUpdatesByIdKeepsItsIdentityAndDeleteRemoves) {
  open();
  VmRecord vm = vm_named("web-1", kId1);
  ASSERT_TRUE(put(vm).is_ok());
  vm.generation = 4;
  vm.spec.vcpus = 8;
  vm.state = "stopped";
  vm.updated_us = kNow + 9;
  ASSERT_TRUE(put(vm).is_ok());
  EXPECT_EQ(**store_->get_vm(vm.id), vm);
  EXPECT_EQ(store_->list_vms()->size(), 1u);

  // Name, tenant and creation time belong to the VM for good.
  VmRecord renamed = vm;
  renamed.spec = spec_named("web-renamed");
  Status st = put(renamed);
  EXPECT_EQ(st.code(), Code::kInternal) << st.to_string();
  EXPECT_NE(st.message().find("cannot change"), std::string::npos) << st.message();
  VmRecord reborn = vm;
  reborn.created_us = kNow + 100;
  EXPECT_EQ(put(reborn).code(), Code::kInternal);
  EXPECT_EQ(**store_->get_vm(vm.id), vm);

  ASSERT_TRUE(store_->transact([&](StateTxn& txn) { return txn.delete_vm(vm.id); }).is_ok());
  EXPECT_FALSE(store_->get_vm(vm.id)->has_value());
  EXPECT_TRUE(store_->transact([&](StateTxn& txn) { return txn.delete_vm(vm.id); }).is_ok());
}

TEST_F(SqliteStateStoreTest, DuplicateNameIsAlreadyExistsAndKeepsTheFirstVm) {
  open();
  ASSERT_TRUE(put(vm_named("web-1", kId1)).is_ok());
  const Status st = put(vm_named("web-1", kId2));
  EXPECT_EQ(st.code(), Code::kAlreadyExists) << st.to_string();
  EXPECT_NE(st.message().find("web-1"), std::string::npos) << st.message();
  auto all = store_->list_vms();
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ((*all)[0].id.str(), kId1);
}

TEST_F(SqliteStateStoreTest, FailedTransactionLeavesNothing) {
  open();
  const Status st = store_->transact([&](StateTxn& txn) -> Status {
    NM_RETURN_IF_ERROR(txn.put_vm(vm_named("web-1", kId1)));
    NM_RETURN_IF_ERROR(txn.put_request({.id = RequestId::trusted("req-1"),
                                        .method = "CreateVm",
                                        .fingerprint = "f",
                                        .reply_json = "{}",
                                        .created_us = kNow}));
    NM_RETURN_IF_ERROR(txn.append_event("VmStateChanged", kId1, "{}", kNow).status());
    NM_RETURN_IF_ERROR(txn.allocate_job_id().status());
    return conflict("changed my mind");
  });
  EXPECT_EQ(st.code(), Code::kConflict);
  EXPECT_EQ(st.message(), "changed my mind");
  EXPECT_TRUE(store_->list_vms()->empty());
  EXPECT_FALSE(store_->get_request(RequestId::trusted("req-1"))->has_value());
  EXPECT_TRUE(store_->events_since(0, 100)->empty());
  EXPECT_EQ(*store_->last_event_seq(), 0u);

  // The rolled-back job id is handed out again: it was never seen by anyone.
  uint64_t job = 0;
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) -> Status {
                    NM_ASSIGN_OR_RETURN(job, txn.allocate_job_id());
                    return Status::ok();
                  })
                  .is_ok());
  EXPECT_EQ(job, 1u);
}

TEST_F(SqliteStateStoreTest, RequestRecordsAreWrittenOnceAndExpireAtOpen) {
  open();
  const RequestRecord req{.id = RequestId::trusted("req-1"),
                          .method = "CreateVm",
                          .fingerprint = "name=web-1",
                          .reply_json = R"({"job":"/org/nodemanager/NodeManager1/job/1"})",
                          .created_us = kNow};
  ASSERT_TRUE(store_->transact([&](StateTxn& txn) { return txn.put_request(req); }).is_ok());
  RequestRecord again = req;
  again.reply_json = "{}";
  const Status dup = store_->transact([&](StateTxn& txn) { return txn.put_request(again); });
  EXPECT_EQ(dup.code(), Code::kAlreadyExists) << dup.to_string();
  EXPECT_EQ(**store_->get_request(req.id), req);

  SqliteOptions options;
  options.request_retention_us = 1000;
  open(options, kNow + 1000);  // exactly at the horizon: kept
  EXPECT_TRUE(store_->get_request(req.id)->has_value());
  open(options, kNow + 1001);
  EXPECT_FALSE(store_->get_request(req.id)->has_value());
}

TEST_F(SqliteStateStoreTest, EventSeqIsNeverReusedAcrossTrimmingAndReopen) {
  SqliteOptions options;
  options.event_capacity = 5;
  open(options);
  for (uint64_t i = 1; i <= 12; ++i) {
    ASSERT_TRUE(store_
                    ->transact([&](StateTxn& txn) -> Status {
                      NM_ASSIGN_OR_RETURN(
                          EventRecord e,
                          txn.append_event("VmStateChanged", kId1,
                                           "{\"n\":" + std::to_string(i) + "}", kNow + i));
                      EXPECT_EQ(e.seq, i);
                      return Status::ok();
                    })
                    .is_ok());
  }
  open(options);
  EXPECT_EQ(*store_->last_event_seq(), 12u);
  auto kept = store_->events_since(0, 100);
  ASSERT_TRUE(kept.is_ok()) << kept.status().to_string();
  ASSERT_EQ(kept->size(), 5u);
  EXPECT_EQ(kept->front().seq, 8u);
  EXPECT_EQ(kept->back().seq, 12u);
  EXPECT_EQ(kept->back().payload_json, "{\"n\":12}");
  EXPECT_EQ(kept->back().ts_us, kNow + 12);
  EXPECT_EQ(kept->back().kind, "VmStateChanged");
  EXPECT_EQ(kept->back().object_id, kId1);

  EventRecord next;
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) -> Status {
                    NM_ASSIGN_OR_RETURN(next, txn.append_event("JobRemoved", "7", "{}", kNow));
                    return Status::ok();
                  })
                  .is_ok());
  EXPECT_EQ(next.seq, 13u);

  auto since = store_->events_since(10, 2);
  ASSERT_EQ(since->size(), 2u);
  EXPECT_EQ((*since)[0].seq, 11u);
  EXPECT_EQ((*since)[1].seq, 12u);
}

// The ring is trimmed every capacity/100 events (the oldest rows live on another page, which each
// trim writes): it never holds fewer than its capacity, and at most capacity/100 - 1 more.
TEST_F(SqliteStateStoreTest, TheEventRingIsTrimmedInBatchesAndKeepsItsCapacity) {
  SqliteOptions options;
  options.event_capacity = 300;  // trimmed at every 3rd event beyond 300
  open(options);
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) -> Status {
                    for (uint64_t i = 1; i <= 310; ++i) {
                      NM_RETURN_IF_ERROR(
                          txn.append_event("VmStateChanged", kId1, "{}", kNow + i).status());
                    }
                    return Status::ok();
                  })
                  .is_ok());
  auto kept = store_->events_since(0, 1000);
  ASSERT_TRUE(kept.is_ok()) << kept.status().to_string();
  // Trims at 303, 306 and 309 kept 10..309, then 310 came.
  ASSERT_EQ(kept->size(), 301u);
  EXPECT_EQ(kept->front().seq, 10u);
  EXPECT_EQ(kept->back().seq, 310u);
}

TEST_F(SqliteStateStoreTest, JobIdsAreNeverReusedAcrossReopen) {
  open();
  auto allocate = [&] {
    uint64_t id = 0;
    EXPECT_TRUE(store_
                    ->transact([&](StateTxn& txn) -> Status {
                      NM_ASSIGN_OR_RETURN(id, txn.allocate_job_id());
                      return Status::ok();
                    })
                    .is_ok());
    return id;
  };
  EXPECT_EQ(allocate(), 1u);
  EXPECT_EQ(allocate(), 2u);
  open();
  EXPECT_EQ(allocate(), 3u);
}

TEST_F(SqliteStateStoreTest, MigratesAnEmptyFileAndUsesWal) {
  std::ofstream(path_).close();
  ASSERT_EQ(fs::file_size(path_), 0u);
  open();
  EXPECT_EQ(store_->schema_version(), 4);
  ASSERT_TRUE(put(vm_named("web-1", kId1)).is_ok());
  EXPECT_TRUE(fs::exists(path_ + "-wal"));
  open();  // already migrated: a no-op
  EXPECT_EQ(store_->schema_version(), 4);
  EXPECT_EQ(store_->list_vms()->size(), 1u);
}

TEST_F(SqliteStateStoreTest, SettingsSurviveReopenAndReplace) {
  open();
  EXPECT_FALSE(store_->get_setting("maintenance")->has_value());
  ASSERT_TRUE(
      store_->transact([](StateTxn& t) { return t.put_setting("maintenance", "a"); }).is_ok());
  ASSERT_TRUE(
      store_->transact([](StateTxn& t) { return t.put_setting("maintenance", "b"); }).is_ok());
  open();
  auto v = store_->get_setting("maintenance");
  ASSERT_TRUE(v.is_ok() && v->has_value());
  EXPECT_EQ(**v, "b");
}

NetworkRecord network_named(const std::string& name, uint32_t vni) {
  NetworkRecord n;
  n.spec = network::parse_network_spec(R"({"name":")" + name + R"(","tenant":"contoso","vni":)" +
                                       std::to_string(vni) + R"(,"subnet":"10.1.0.0/24"})")
               .value();
  n.state = "ready";
  n.created_us = n.updated_us = 7;
  return n;
}

PortRecord port_of(const std::string& vm, const std::string& network, const std::string& ip,
                   const std::string& ifname) {
  PortRecord p;
  p.vm = VmId::trusted(vm);
  p.network = NetworkName::trusted(network);
  p.ifname = ifname;
  p.mac = network::derive_vm_mac(p.vm, 0);
  p.ip = network::Ipv4Address::parse(ip, "ip").value();
  p.hostname = "web-1";
  return p;
}

TEST_F(SqliteStateStoreTest, NetworksAndPortsRoundTripAndPortsGoWithTheirVm) {
  open();
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) -> Status {
                    NM_RETURN_IF_ERROR(txn.put_network(network_named("blue", 4097)));
                    NM_RETURN_IF_ERROR(txn.put_vm(vm_named("web-1", kId1)));
                    return txn.put_port(port_of(kId1, "blue", "10.1.0.3", "nmt111111111110"));
                  })
                  .is_ok());
  open();  // durable
  auto nets = store_->list_networks();
  ASSERT_TRUE(nets.is_ok());
  ASSERT_EQ(nets->size(), 1u);
  EXPECT_EQ(nets->front(), network_named("blue", 4097));
  auto ports = store_->list_ports();
  ASSERT_TRUE(ports.is_ok());
  ASSERT_EQ(ports->size(), 1u);
  EXPECT_EQ(ports->front(), port_of(kId1, "blue", "10.1.0.3", "nmt111111111110"));

  // A network with ports cannot go; once the VM is deleted its ports are gone too.
  const Status busy = store_->transact(
      [&](StateTxn& txn) { return txn.delete_network(NetworkName::trusted("blue")); });
  EXPECT_EQ(busy.code(), Code::kConflict);
  ASSERT_TRUE(
      store_->transact([&](StateTxn& txn) { return txn.delete_vm(VmId::trusted(kId1)); }).is_ok());
  EXPECT_TRUE(store_->list_ports()->empty());
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) {
                    return txn.delete_network(NetworkName::trusted("blue"));
                  })
                  .is_ok());
  EXPECT_TRUE(store_->list_networks()->empty());
}

TEST_F(SqliteStateStoreTest, PortUniquenessIsEnforcedByTheDatabase) {
  open();
  ASSERT_TRUE(store_
                  ->transact([&](StateTxn& txn) -> Status {
                    NM_RETURN_IF_ERROR(txn.put_network(network_named("blue", 4097)));
                    NM_RETURN_IF_ERROR(txn.put_vm(vm_named("web-1", kId1)));
                    NM_RETURN_IF_ERROR(txn.put_vm(vm_named("web-2", kId2)));
                    return txn.put_port(port_of(kId1, "blue", "10.1.0.3", "nmt111111111110"));
                  })
                  .is_ok());
  // Same address on the same network.
  Status s = store_->transact([&](StateTxn& txn) {
    return txn.put_port(port_of(kId2, "blue", "10.1.0.3", "nmt222222222220"));
  });
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.to_string();
  // Same VNI on another network.
  s = store_->transact(
      [&](StateTxn& txn) { return txn.put_network(network_named("green", 4097)); });
  EXPECT_EQ(s.code(), Code::kAlreadyExists) << s.to_string();
  // A port on a network that does not exist.
  s = store_->transact([&](StateTxn& txn) {
    return txn.put_port(port_of(kId2, "nosuch", "10.1.0.4", "nmt222222222220"));
  });
  EXPECT_FALSE(s.is_ok());
  EXPECT_EQ(store_->list_ports()->size(), 1u);
}

TEST_F(SqliteStateStoreTest, UnfinishedJobsSurviveAReopenUntilDeleted) {
  open();
  ASSERT_TRUE(store_
                  ->transact([](StateTxn& txn) -> Status {
                    NM_RETURN_IF_ERROR(txn.put_job({7, "create", kId1, kNow}));
                    return txn.put_job({9, "delete", kId2, kNow + 1});
                  })
                  .is_ok());
  // A rolled-back put leaves nothing.
  EXPECT_FALSE(store_
                   ->transact([](StateTxn& txn) -> Status {
                     NM_RETURN_IF_ERROR(txn.put_job({11, "start", kId1, kNow}));
                     return conflict("no");
                   })
                   .is_ok());
  open();
  auto jobs = store_->unfinished_jobs();
  ASSERT_TRUE(jobs.is_ok());
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0], (JobRecord{7, "create", kId1, kNow}));
  EXPECT_EQ((*jobs)[1].id, 9u);
  ASSERT_TRUE(store_->transact([](StateTxn& txn) { return txn.delete_job(7); }).is_ok());
  ASSERT_TRUE(store_->transact([](StateTxn& txn) { return txn.delete_job(7); }).is_ok());
  open();
  ASSERT_EQ(store_->unfinished_jobs()->size(), 1u);
  EXPECT_EQ(store_->unfinished_jobs()->front().kind, "delete");
}

TEST_F(SqliteStateStoreTest, RefusesADatabaseFromANewerNodemanager) {
  open();
  store_.reset();
  sqlite3* raw = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &raw), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(raw, "PRAGMA user_version = 99", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(raw);

  auto s = open_sqlite_state_store(path_, {}, kNow);
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.status().code(), Code::kUnavailable);
  EXPECT_NE(s.status().message().find("schema version 99"), std::string::npos)
      << s.status().message();
}

TEST_F(SqliteStateStoreTest, UnopenablePathIsUnavailable) {
  auto s = open_sqlite_state_store((dir_ / "missing" / "state.db").string(), {}, kNow);
  ASSERT_FALSE(s.is_ok());
  EXPECT_EQ(s.status().code(), Code::kUnavailable) << s.status().to_string();
}

void SqliteStateStoreTest::fill_the_disk(bool deferred_sync) {
  const fs::path small = dir_ / "small";
  fs::create_directories(small);
  if (::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=256k") != 0) {
    GTEST_SKIP() << "cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)";
  }
  path_ = (small / "state.db").string();
  SqliteOptions options;
  options.deferred_sync = deferred_sync;
  open(options);
  const std::string payload(size_t{16} * 1024, 'x');
  Status failed;
  uint64_t committed = 0;
  for (int i = 0; i < 64 && failed.is_ok(); ++i) {
    failed = store_->transact([&](StateTxn& txn) {
      return txn.append_event("VmStateChanged", kId1, payload, kNow).status();
    });
    if (failed.is_ok()) ++committed;
  }
  RecordProperty("failure", failed.to_string());
  EXPECT_EQ(failed.code(), Code::kUnavailable) << failed.to_string();
  EXPECT_GT(committed, 0u);
  auto last = store_->last_event_seq();
  ASSERT_TRUE(last.is_ok()) << last.status().to_string();
  EXPECT_EQ(*last, committed);
  EXPECT_TRUE(store_->sync().is_ok());
  store_.reset();
  EXPECT_EQ(::umount2(small.c_str(), MNT_DETACH), 0);
}

TEST_F(SqliteStateStoreTest, FullDiskFailsTheCommitAsUnavailableAndKeepsWorking) {
  fill_the_disk(false);
}

// With group commit the WAL is written at commit as well: a full disk fails that commit.
TEST_F(SqliteStateStoreTest, FullDiskFailsADeferredCommitAsUnavailableAndKeepsWorking) {
  fill_the_disk(true);
}

TEST_F(SqliteStateStoreTest, DeferredSyncCountsWritesUntilASyncCoversThem) {
  open();
  EXPECT_EQ(store_->durable_seq(), store_->written_seq());
  ASSERT_TRUE(put(vm_named("web-1", kId1)).is_ok());
  EXPECT_EQ(store_->durable_seq(), store_->written_seq());  // synchronous=FULL: at once

  open(deferred());
  const uint64_t start = store_->written_seq();
  EXPECT_EQ(store_->durable_seq(), start);  // open() leaves nothing unsynced
  ASSERT_TRUE(put(vm_named("db-1", kId2)).is_ok());
  ASSERT_TRUE(store_->transact([](StateTxn& txn) { return txn.put_setting("k", "v"); }).is_ok());
  EXPECT_EQ(store_->written_seq(), start + 2);
  EXPECT_EQ(store_->durable_seq(), start);
  // A rolled-back transaction writes nothing.
  EXPECT_FALSE(store_->transact([](StateTxn&) { return internal_error("no"); }).is_ok());
  EXPECT_EQ(store_->written_seq(), start + 2);
  ASSERT_TRUE(store_->sync().is_ok());
  EXPECT_EQ(store_->durable_seq(), start + 2);
  ASSERT_TRUE(store_->sync().is_ok());  // nothing to do
  open();
  EXPECT_EQ(store_->list_vms()->size(), 2u);
  EXPECT_EQ(store_->get_setting("k")->value_or(""), "v");
}

// Written but not synced is in the WAL file already: a process that dies keeps it.
TEST_F(SqliteStateStoreTest, DeferredWritesSurviveAProcessThatDiesBeforeSyncing) {
  ASSERT_NO_FATAL_FAILURE(write_web1_and_die());
  open();
  auto got = store_->get_vm(VmId::trusted(kId1));
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_TRUE(got->has_value());
}

// Group commit keeps SQLite's automatic checkpoints (which sync what they copy): the WAL does not
// grow without bound.
TEST_F(SqliteStateStoreTest, DeferredSyncCheckpointsSoTheWalStaysBounded) {
  open(deferred());
  ASSERT_NO_FATAL_FAILURE(write_settings(3000, 10));
  const auto wal = fs::file_size(path_ + "-wal");
  RecordProperty("wal_bytes", std::to_string(wal));
  EXPECT_LT(wal, uintmax_t{6} << 20);  // 3000 commits of a 3 KB row: over 12 MiB unchecked
  open();
  EXPECT_EQ(store_->get_setting("key-49")->value_or(""), setting_value(2999));
}

// A VM's state change rewrites its row's page and nothing else: the name and tenant indexes
// are not touched (each index page would be one more 4 KiB frame in the WAL, and in its fsync).
TEST_F(SqliteStateStoreTest, AStateChangeWritesOnePageToTheWal) {
  probe();
  open(deferred());
  VmRecord vm = vm_named("web-1", kId1);
  ASSERT_TRUE(put(vm).is_ok());
  vfs_probe::wal_ops.clear();
  vm.state = "stopped";
  vm.observed_generation = vm.generation;
  vm.updated_us += 1;
  ASSERT_TRUE(put(vm).is_ok());
  // One frame: its header and its page, two writes.
  EXPECT_EQ(std::count(vfs_probe::wal_ops.begin(), vfs_probe::wal_ops.end(), 'W'), 2)
      << vfs_probe::wal_ops;
}

TEST_F(SqliteStateStoreTest, DeferredCommitsDoNotSyncAndOneSyncCoversThemAll) {
  probe();
  open();  // synchronous=FULL: every commit syncs the WAL
  vfs_probe::wal_ops.clear();
  ASSERT_TRUE(put(vm_named("web-1", kId1)).is_ok());
  EXPECT_NE(vfs_probe::wal_ops.find('S'), std::string::npos) << vfs_probe::wal_ops;

  open(deferred());
  // The first commit starts a new WAL (the last close checkpointed and removed it) and syncs its
  // header: that is the reused-header rule below, not a commit's sync.
  ASSERT_TRUE(put(vm_named("db-1", kId2)).is_ok());
  vfs_probe::wal_ops.clear();
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(store_
                    ->transact([&](StateTxn& txn) {
                      return txn.put_setting("k", "value " + std::to_string(i));
                    })
                    .is_ok());
  }
  EXPECT_EQ(vfs_probe::wal_ops.find('S'), std::string::npos) << vfs_probe::wal_ops;
  EXPECT_NE(vfs_probe::wal_ops.find('W'), std::string::npos) << vfs_probe::wal_ops;
  ASSERT_TRUE(store_->sync().is_ok());
  EXPECT_EQ(std::count(vfs_probe::wal_ops.begin(), vfs_probe::wal_ops.end(), 'S'), 1)
      << vfs_probe::wal_ops;
  ASSERT_TRUE(store_->sync().is_ok());  // nothing written since: no sync
  EXPECT_EQ(std::count(vfs_probe::wal_ops.begin(), vfs_probe::wal_ops.end(), 'S'), 1);
}

// When a checkpoint lets the WAL be reused, SQLite writes a new header over the old one: it must
// be on disk before new frames overwrite old ones, or a power loss could leave the old header
// with a mix of frames that recovery would replay over checkpointed data.
TEST_F(SqliteStateStoreTest, AReusedWalHasItsHeaderSyncedBeforeNewFrames) {
  probe();
  open(deferred());
  vfs_probe::wal_ops.clear();
  ASSERT_NO_FATAL_FAILURE(write_settings(2500, 0));
  const std::string& ops = vfs_probe::wal_ops;
  size_t restarts = 0;
  for (size_t at = ops.find('H'); at != std::string::npos; at = ops.find('H', at + 1)) {
    ++restarts;
    const size_t next_write = ops.find('W', at);
    const size_t next_sync = ops.find('S', at);
    EXPECT_LT(next_sync, next_write) << "header at op " << at << " not synced before frames";
  }
  EXPECT_GE(restarts, 1u) << "no checkpoint let the WAL be reused; write more";
}

// open() makes durable what a process that died before syncing left in the WAL.
TEST_F(SqliteStateStoreTest, OpenSyncsWhatADeadProcessLeftInTheWal) {
  ASSERT_NO_FATAL_FAILURE(write_web1_and_die());
  probe();
  open(deferred());
  EXPECT_NE(vfs_probe::wal_ops.find('S'), std::string::npos) << vfs_probe::wal_ops;
  EXPECT_EQ(store_->durable_seq(), store_->written_seq());
  EXPECT_TRUE(store_->get_vm(VmId::trusted(kId1))->has_value());
}

// A failed fsync may be reported once only: the store never reports durability after one, and
// does not checkpoint and drop the WAL when closed.
TEST_F(SqliteStateStoreTest, AFailedSyncIsRememberedAndTheWalIsKept) {
  probe();
  open(deferred());
  ASSERT_TRUE(put(vm_named("web-1", kId1)).is_ok());
  vfs_probe::fail_next_wal_sync = 1;
  const Status first = store_->sync();
  EXPECT_EQ(first.code(), Code::kUnavailable) << first.to_string();
  const Status again = store_->sync();  // the disk would say yes now
  EXPECT_EQ(again.code(), Code::kUnavailable) << again.to_string();
  EXPECT_LT(store_->durable_seq(), store_->written_seq());
  store_.reset();
  EXPECT_TRUE(fs::exists(path_ + "-wal"));
  open();
  EXPECT_TRUE(store_->get_vm(VmId::trusted(kId1))->has_value());
}

TEST_F(SqliteStateStoreTest, NestedTransactIsAProgrammingError) {
  open();
  auto nested = [&] {
    return store_->transact([&](StateTxn& txn) -> Status {
      NM_RETURN_IF_ERROR(txn.put_vm(vm_named("web-1", kId1)));
      return store_->transact([](StateTxn&) { return Status::ok(); });
    });
  };
#ifdef NDEBUG
  EXPECT_EQ(nested().code(), Code::kInternal);
  EXPECT_TRUE(store_->list_vms()->empty());
  EXPECT_TRUE(put(vm_named("web-1", kId1)).is_ok());
#else
  EXPECT_DEATH((void)nested(), "nested");
#endif
}

TEST(PowerIntentName, NamesBothStates) {
  EXPECT_EQ(power_intent_name(PowerIntent::kRunning), "running");
  EXPECT_EQ(power_intent_name(PowerIntent::kStopped), "stopped");
}

}  // namespace
}  // namespace nm
