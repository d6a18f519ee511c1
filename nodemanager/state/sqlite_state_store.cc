#include <sqlite3.h>

#include <cassert>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "migrations.h"
#include "nm/network/nft_ruleset.h"
#include "nm/state_store.h"

namespace nm {

namespace {

struct DbCloser {
  void operator()(sqlite3* db) const noexcept { sqlite3_close_v2(db); }
};
using DbPtr = std::unique_ptr<sqlite3, DbCloser>;

struct StmtFinalizer {
  void operator()(sqlite3_stmt* s) const noexcept { sqlite3_finalize(s); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, StmtFinalizer>;

// The one translation of SQLite result codes into Status.
Status sqlite_status(sqlite3* db, int rc, std::string_view what) {
  const char* detail = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  std::string message = std::string(what) + ": " + detail;
  switch (rc & 0xff) {
    case SQLITE_FULL:
    case SQLITE_IOERR:
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
      return unavailable(std::move(message));
    case SQLITE_CONSTRAINT:
      if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE) {
        return already_exists(std::move(message));
      }
      return internal_error(std::move(message));
    default:
      return internal_error(std::move(message));
  }
}

int64_t to_db(uint64_t v) {
  return static_cast<int64_t>(v);
}
uint64_t from_db(int64_t v) {
  return static_cast<uint64_t>(v);
}

// A borrowed cached statement: bind, step, read columns; reset and unbound on destruction so no
// read statement keeps a snapshot open. The first bind error is reported by step().
class Stmt {
 public:
  Stmt(sqlite3* db, sqlite3_stmt* stmt) : db_(db), stmt_(stmt) {}
  Stmt(Stmt&& o) noexcept
      : db_(o.db_), stmt_(std::exchange(o.stmt_, nullptr)), bind_rc_(o.bind_rc_) {}
  Stmt& operator=(Stmt&&) = delete;
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt() {
    if (stmt_ == nullptr) return;
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  Stmt& bind(int i, std::string_view text) {
    return check(
        sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT));
  }
  Stmt& bind(int i, int64_t v) { return check(sqlite3_bind_int64(stmt_, i, v)); }
  Stmt& bind(int i, const std::optional<Digest>& d) {
    return d ? bind(i, d->str()) : check(sqlite3_bind_null(stmt_, i));
  }

  // True when a row is ready, false when the statement is done.
  Result<bool> step() {
    if (bind_rc_ != SQLITE_OK) return sqlite_status(db_, bind_rc_, "bind");
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    return sqlite_status(db_, rc,
                         "execute '" + std::string(sqlite3_sql(stmt_)).substr(0, 48) + "'");
  }
  // Runs a statement that returns no rows.
  Status run() {
    auto r = step();
    return r.is_ok() ? Status::ok() : r.status();
  }

  int64_t i64(int col) const { return sqlite3_column_int64(stmt_, col); }
  bool is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  std::string text(int col) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    return p == nullptr ? std::string()
                        : std::string(p, static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }

 private:
  Stmt& check(int rc) {
    if (bind_rc_ == SQLITE_OK) bind_rc_ = rc;
    return *this;
  }
  sqlite3* db_;
  sqlite3_stmt* stmt_;
  int bind_rc_ = SQLITE_OK;
};

constexpr const char* kVmColumns =
    "id, spec_json, power, deleting, generation, observed_generation, state, state_reason, "
    "image_digest, kernel_digest, initrd_digest, created_us, updated_us";

Result<Digest> stored_digest(const std::string& text, std::string_view field) {
  auto d = Digest::parse(text, field);
  if (!d.is_ok()) return internal_error("state database: " + d.status().message());
  return d;
}

Result<VmRecord> vm_from_row(const Stmt& s) {
  const std::string id_text = s.text(0);
  auto id = VmId::parse(id_text, "vms.id");
  if (!id.is_ok()) return internal_error("state database: " + id.status().message());
  auto spec = parse_vm_spec(s.text(1));
  if (!spec.is_ok()) {
    return internal_error("state database: vm '" + id_text +
                          "' has an unreadable spec: " + spec.status().message());
  }
  VmRecord vm;
  vm.id = std::move(id).value();
  vm.spec = std::move(spec).value();
  const std::string power = s.text(2);
  if (power != "running" && power != "stopped") {
    return internal_error("state database: vm '" + id_text + "' has power '" + power + "'");
  }
  vm.power = power == "running" ? PowerIntent::kRunning : PowerIntent::kStopped;
  vm.deleting = s.i64(3) != 0;
  vm.generation = from_db(s.i64(4));
  vm.observed_generation = from_db(s.i64(5));
  vm.state = s.text(6);
  vm.state_reason = s.text(7);
  NM_ASSIGN_OR_RETURN(vm.image_digest, stored_digest(s.text(8), "vms.image_digest"));
  if (!s.is_null(9)) {
    NM_ASSIGN_OR_RETURN(vm.kernel_digest, stored_digest(s.text(9), "vms.kernel_digest"));
  }
  if (!s.is_null(10)) {
    NM_ASSIGN_OR_RETURN(vm.initrd_digest, stored_digest(s.text(10), "vms.initrd_digest"));
  }
  vm.created_us = from_db(s.i64(11));
  vm.updated_us = from_db(s.i64(12));
  return vm;
}

class SqliteStateStore;

class SqliteTxn final : public StateTxn {
 public:
  explicit SqliteTxn(SqliteStateStore& store) : store_(store) {}
  Status put_vm(const VmRecord& vm) override;
  Status delete_vm(const VmId& id) override;
  Status put_request(const RequestRecord& req) override;
  Result<EventRecord> append_event(const std::string& kind, const std::string& object_id,
                                   const std::string& payload_json, uint64_t ts_us) override;
  Result<uint64_t> allocate_job_id() override;
  Status put_job(const JobRecord& job) override;
  Status delete_job(uint64_t id) override;
  Status put_setting(const std::string& key, const std::string& value) override;
  Status put_network(const NetworkRecord& network) override;
  Status delete_network(const NetworkName& name) override;
  Status put_port(const PortRecord& port) override;

 private:
  SqliteStateStore& store_;
};

class SqliteStateStore final : public StateStore {
 public:
  SqliteStateStore(DbPtr db, std::string path, const SqliteOptions& options)
      : db_(std::move(db)), path_(std::move(path)), options_(options) {}

  // Closing checkpoints the WAL into the database and deletes it. After a failed sync that
  // would copy pages whose write-back failed and drop the WAL: keep the WAL instead.
  ~SqliteStateStore() override {
    if (!db_) return;
    if (sync_failed_.is_ok()) {
      (void)sync();
    } else {
      sqlite3_db_config(db_.get(), SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, nullptr);
    }
  }
  SqliteStateStore(const SqliteStateStore&) = delete;
  SqliteStateStore& operator=(const SqliteStateStore&) = delete;

  Status open(uint64_t now_us) {
    NM_RETURN_IF_ERROR(exec("PRAGMA journal_mode=WAL", "enable WAL"));
    {
      NM_ASSIGN_OR_RETURN(Stmt mode, stmt("PRAGMA journal_mode"));
      NM_ASSIGN_OR_RETURN(bool row, mode.step());
      if (!row || mode.text(0) != "wal") {
        return unavailable("state database '" + path_ + "': cannot use WAL journal mode");
      }
    }
    NM_RETURN_IF_ERROR(exec("PRAGMA synchronous=FULL", "set synchronous"));
    NM_RETURN_IF_ERROR(exec("PRAGMA foreign_keys=ON", "enable foreign keys"));
    NM_RETURN_IF_ERROR(migrate());
    const uint64_t horizon =
        now_us > options_.request_retention_us ? now_us - options_.request_retention_us : 0;
    NM_RETURN_IF_ERROR(transact_internal([&]() -> Status {
      NM_ASSIGN_OR_RETURN(Stmt s, stmt("DELETE FROM requests WHERE created_us < ?1"));
      return s.bind(1, to_db(horizon)).run();
    }));
    // What a process that died before its sync left in the WAL is acknowledged by nobody yet,
    // but from here on it counts as written: make it durable before anything builds on it.
    NM_RETURN_IF_ERROR(sync_log());
    durable_ = written_;
    if (options_.deferred_sync) {
      // NORMAL in WAL mode: commits do not sync; checkpoints do (the WAL before copying, the
      // database file after), and so does the WAL header when the WAL is reused after one.
      NM_RETURN_IF_ERROR(exec("PRAGMA synchronous=NORMAL", "set synchronous"));
    }
    return Status::ok();
  }

  Status transact(const std::function<Status(StateTxn&)>& fn) override {
    SqliteTxn txn(*this);
    return transact_internal([&] { return fn(txn); });
  }

  uint64_t written_seq() const override { return written_; }
  uint64_t durable_seq() const override { return durable_; }

  Status sync() override {
    assert(!in_txn_ && "StateStore::sync() inside transact()");
    if (!sync_failed_.is_ok()) return sync_failed_;
    if (durable_ == written_) return Status::ok();
    const uint64_t target = written_;
    if (Status s = sync_log(); !s.is_ok()) {
      // Linux may report a failed write-back once only: a later fsync that succeeds proves
      // nothing about it. Every sync from now on fails.
      sync_failed_ = s;
      return s;
    }
    durable_ = target;
    return Status::ok();
  }

  Result<std::vector<VmRecord>> list_vms() override {
    NM_ASSIGN_OR_RETURN(Stmt s,
                        stmt(std::string("SELECT ") + kVmColumns + " FROM vms ORDER BY name"));
    std::vector<VmRecord> out;
    for (;;) {
      NM_ASSIGN_OR_RETURN(bool row, s.step());
      if (!row) break;
      NM_ASSIGN_OR_RETURN(VmRecord vm, vm_from_row(s));
      out.push_back(std::move(vm));
    }
    return out;
  }

  Result<std::optional<VmRecord>> get_vm(const VmId& id) override {
    NM_ASSIGN_OR_RETURN(Stmt s,
                        stmt(std::string("SELECT ") + kVmColumns + " FROM vms WHERE id = ?1"));
    s.bind(1, id.str());
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row) return std::optional<VmRecord>();
    NM_ASSIGN_OR_RETURN(VmRecord vm, vm_from_row(s));
    return std::optional<VmRecord>(std::move(vm));
  }

  Result<std::optional<RequestRecord>> get_request(const RequestId& id) override {
    NM_ASSIGN_OR_RETURN(
        Stmt s,
        stmt("SELECT method, fingerprint, reply_json, created_us FROM requests WHERE id = ?1"));
    s.bind(1, id.str());
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row) return std::optional<RequestRecord>();
    return std::optional<RequestRecord>(RequestRecord{.id = id,
                                                      .method = s.text(0),
                                                      .fingerprint = s.text(1),
                                                      .reply_json = s.text(2),
                                                      .created_us = from_db(s.i64(3))});
  }

  Result<std::vector<EventRecord>> events_since(uint64_t since, uint32_t max) override {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("SELECT seq, ts_us, kind, object_id, payload_json FROM events "
                                     "WHERE seq > ?1 ORDER BY seq LIMIT ?2"));
    s.bind(1, to_db(since)).bind(2, int64_t{max});
    std::vector<EventRecord> out;
    for (;;) {
      NM_ASSIGN_OR_RETURN(bool row, s.step());
      if (!row) break;
      out.push_back(EventRecord{.seq = from_db(s.i64(0)),
                                .ts_us = from_db(s.i64(1)),
                                .kind = s.text(2),
                                .object_id = s.text(3),
                                .payload_json = s.text(4)});
    }
    return out;
  }

  Result<uint64_t> last_event_seq() override { return meta_value("last_event_seq"); }

  Result<std::optional<std::string>> get_setting(const std::string& key) override {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("SELECT value FROM settings WHERE key = ?1"));
    s.bind(1, key);
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row) return std::optional<std::string>();
    return std::optional<std::string>(s.text(0));
  }

  Result<std::vector<JobRecord>> unfinished_jobs() override {
    NM_ASSIGN_OR_RETURN(Stmt s,
                        stmt("SELECT id, kind, object_id, created_us FROM jobs ORDER BY id"));
    std::vector<JobRecord> out;
    for (;;) {
      NM_ASSIGN_OR_RETURN(bool row, s.step());
      if (!row) break;
      out.push_back(JobRecord{.id = from_db(s.i64(0)),
                              .kind = s.text(1),
                              .object_id = s.text(2),
                              .created_us = from_db(s.i64(3))});
    }
    return out;
  }

  Result<std::vector<NetworkRecord>> list_networks() override {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("SELECT name, spec_json, deleting, state, state_reason, "
                                     "created_us, updated_us FROM networks ORDER BY name"));
    std::vector<NetworkRecord> out;
    for (;;) {
      NM_ASSIGN_OR_RETURN(bool row, s.step());
      if (!row) break;
      auto spec = network::parse_network_spec(s.text(1));
      if (!spec.is_ok()) {
        return internal_error("state database: network '" + s.text(0) +
                              "' has an unreadable spec: " + spec.status().message());
      }
      out.push_back(NetworkRecord{.spec = std::move(spec).value(),
                                  .deleting = s.i64(2) != 0,
                                  .state = s.text(3),
                                  .state_reason = s.text(4),
                                  .created_us = from_db(s.i64(5)),
                                  .updated_us = from_db(s.i64(6))});
    }
    return out;
  }

  Result<std::vector<PortRecord>> list_ports() override {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("SELECT vm_id, network, ifname, mac, ip, hostname FROM ports "
                                     "ORDER BY vm_id, network"));
    std::vector<PortRecord> out;
    for (;;) {
      NM_ASSIGN_OR_RETURN(bool row, s.step());
      if (!row) break;
      auto vm = VmId::parse(s.text(0), "ports.vm_id");
      auto net = NetworkName::parse(s.text(1), "ports.network");
      auto mac = network::MacAddress::parse(s.text(3), "ports.mac");
      auto ip = network::Ipv4Address::parse(s.text(4), "ports.ip");
      auto host = VmName::parse(s.text(5), "ports.hostname");
      for (const Status& st :
           {vm.status(), net.status(), mac.status(), ip.status(), host.status()}) {
        if (!st.is_ok()) return internal_error("state database: " + st.message());
      }
      // The tap name goes into nft scripts: never trust it without the rule.
      if (!network::is_valid_port_ifname(s.text(2))) {
        return internal_error("state database: ports.ifname '" + s.text(2) + "' is not valid");
      }
      out.push_back(PortRecord{.vm = std::move(vm).value(),
                               .network = std::move(net).value(),
                               .ifname = s.text(2),
                               .mac = mac.value(),
                               .ip = ip.value(),
                               .hostname = s.text(5)});
    }
    return out;
  }

  int schema_version() const override { return schema_version_; }

  // Prepares `sql` once and hands out the cached statement.
  Result<Stmt> stmt(const std::string& sql) {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      sqlite3_stmt* raw = nullptr;
      const int rc = sqlite3_prepare_v3(db_.get(), sql.c_str(), static_cast<int>(sql.size() + 1),
                                        SQLITE_PREPARE_PERSISTENT, &raw, nullptr);
      StmtPtr prepared(raw);
      if (rc != SQLITE_OK) return sqlite_status(db_.get(), rc, "prepare '" + sql + "'");
      it = cache_.emplace(sql, std::move(prepared)).first;
    }
    return Stmt(db_.get(), it->second.get());
  }

  Result<uint64_t> bump_meta(const char* key) {
    NM_ASSIGN_OR_RETURN(Stmt s,
                        stmt("UPDATE meta SET value = value + 1 WHERE key = ?1 RETURNING value"));
    s.bind(1, std::string_view(key));
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row)
      return internal_error(std::string("state database: meta row '") + key + "' is missing");
    const uint64_t v = from_db(s.i64(0));
    NM_RETURN_IF_ERROR(s.run());  // finish the statement so the update is complete
    return v;
  }

  const SqliteOptions& options() const { return options_; }
  sqlite3* db() const { return db_.get(); }

 private:
  Status exec(const char* sql, std::string_view what) {
    const int rc = sqlite3_exec(db_.get(), sql, nullptr, nullptr, nullptr);
    if (rc != SQLITE_OK) return sqlite_status(db_.get(), rc, what);
    return Status::ok();
  }

  Status run_cached(const char* sql) {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt(sql));
    return s.run();
  }

  Result<uint64_t> meta_value(const char* key) {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("SELECT value FROM meta WHERE key = ?1"));
    s.bind(1, std::string_view(key));
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row)
      return internal_error(std::string("state database: meta row '") + key + "' is missing");
    return from_db(s.i64(0));
  }

  Result<int> user_version() {
    NM_ASSIGN_OR_RETURN(Stmt s, stmt("PRAGMA user_version"));
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (!row) return internal_error("state database: PRAGMA user_version returned no row");
    return static_cast<int>(s.i64(0));
  }

  Status migrate() {
    const int latest = state::latest_schema_version();
    for (;;) {
      int version = 0;
      bool done = false;
      NM_RETURN_IF_ERROR(transact_internal([&]() -> Status {
        NM_ASSIGN_OR_RETURN(version, user_version());
        if (version > latest) {
          return unavailable("state database '" + path_ + "' has schema version " +
                             std::to_string(version) + ", newer than this nodemanager knows (" +
                             std::to_string(latest) + "); refusing to open it");
        }
        if (version == latest) {
          done = true;
          return Status::ok();
        }
        const state::Migration& step = state::migrations()[static_cast<size_t>(version)];
        NM_RETURN_IF_ERROR(
            exec(step.sql, "migrate to schema version " + std::to_string(step.version)));
        const std::string set = "PRAGMA user_version = " + std::to_string(step.version);
        return exec(set.c_str(), "record schema version");
      }));
      if (done) break;
    }
    schema_version_ = latest;
    return Status::ok();
  }

  template <typename Fn>
  Status transact_internal(Fn&& fn) {
    assert(!in_txn_ && "nested StateStore::transact()");
    if (in_txn_) return internal_error("state database: nested transaction");
    NM_RETURN_IF_ERROR(run_cached("BEGIN IMMEDIATE"));
    in_txn_ = true;
    struct Guard {
      SqliteStateStore& self;
      bool open = true;
      ~Guard() {
        if (open) sqlite3_exec(self.db_.get(), "ROLLBACK", nullptr, nullptr, nullptr);
        self.in_txn_ = false;
      }
    } guard{*this};
    Status result = fn();
    if (!result.is_ok()) return result;
    Status committed = run_cached("COMMIT");
    if (!committed.is_ok()) {
      if (sqlite3_get_autocommit(db_.get()) != 0) guard.open = false;
      return unavailable(committed.with_context("commit to '" + path_ + "'").message());
    }
    guard.open = false;
    ++written_;
    if (!options_.deferred_sync) durable_ = written_;
    return Status::ok();
  }

  // fdatasync of the WAL through SQLite's own handle (and of its directory the first time).
  Status sync_log() {
    sqlite3_file* wal = nullptr;
    const int rc = sqlite3_file_control(db_.get(), "main", SQLITE_FCNTL_JOURNAL_POINTER, &wal);
    if (rc != SQLITE_OK) return sqlite_status(db_.get(), rc, "find the WAL of '" + path_ + "'");
    if (wal == nullptr || wal->pMethods == nullptr) return Status::ok();  // no WAL open: nothing
    const int sr = wal->pMethods->xSync(wal, SQLITE_SYNC_NORMAL);
    if (sr != SQLITE_OK) {
      return unavailable("state database '" + path_ + "': syncing the WAL failed (" +
                         sqlite3_errstr(sr) + ")");
    }
    return Status::ok();
  }

  DbPtr db_;
  std::string path_;
  SqliteOptions options_;
  int schema_version_ = 0;
  bool in_txn_ = false;
  uint64_t written_ = 0;  // transactions committed
  uint64_t durable_ = 0;  // of those, known to be on disk
  Status sync_failed_;    // the first failed sync(); every later one returns it
  std::map<std::string, StmtPtr, std::less<>> cache_;  // declared after db_: finalized first
};

Status SqliteTxn::put_vm(const VmRecord& vm) {
  NM_ASSIGN_OR_RETURN(
      Stmt s,
      store_.stmt(std::string("INSERT INTO vms (") + kVmColumns +
                  ", name, tenant) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, "
                  "?13, ?14, ?15) ON CONFLICT (id) DO UPDATE SET spec_json = excluded.spec_json, "
                  "power = excluded.power, deleting = excluded.deleting, generation = "
                  "excluded.generation, observed_generation = excluded.observed_generation, state "
                  "= excluded.state, state_reason = excluded.state_reason, image_digest = "
                  "excluded.image_digest, kernel_digest = excluded.kernel_digest, initrd_digest = "
                  "excluded.initrd_digest, updated_us = excluded.updated_us WHERE name = "
                  "excluded.name AND tenant = excluded.tenant AND created_us = "
                  "excluded.created_us"));
  s.bind(1, vm.id.str())
      .bind(2, vm_spec_to_json(vm.spec))
      .bind(3, power_intent_name(vm.power))
      .bind(4, int64_t{vm.deleting ? 1 : 0})
      .bind(5, to_db(vm.generation))
      .bind(6, to_db(vm.observed_generation))
      .bind(7, vm.state)
      .bind(8, vm.state_reason)
      .bind(9, vm.image_digest.str())
      .bind(10, vm.kernel_digest)
      .bind(11, vm.initrd_digest)
      .bind(12, to_db(vm.created_us))
      .bind(13, to_db(vm.updated_us))
      .bind(14, vm.spec.name.str())
      .bind(15, vm.spec.tenant.str());
  Status st = s.run();
  if (!st.is_ok()) {
    return st.with_context("put vm '" + vm.id.str() + "' named '" + vm.spec.name.str() + "'");
  }
  // The indexed columns stay out of the update (rewriting their index entries would write two
  // more pages to the WAL on every state change); the WHERE makes a change to them an error.
  if (sqlite3_changes(store_.db()) == 0) {
    return internal_error("put vm '" + vm.id.str() +
                          "': its name, tenant and creation time "
                          "cannot change (the database has others)");
  }
  return Status::ok();
}

Status SqliteTxn::delete_vm(const VmId& id) {
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("DELETE FROM vms WHERE id = ?1"));
  return s.bind(1, id.str()).run();
}

Status SqliteTxn::put_request(const RequestRecord& req) {
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("INSERT INTO requests (id, method, fingerprint, "
                                          "reply_json, created_us) VALUES (?1, ?2, ?3, ?4, ?5)"));
  s.bind(1, req.id.str())
      .bind(2, req.method)
      .bind(3, req.fingerprint)
      .bind(4, req.reply_json)
      .bind(5, to_db(req.created_us));
  Status st = s.run();
  if (!st.is_ok()) return st.with_context("put request '" + req.id.str() + "'");
  return Status::ok();
}

Result<EventRecord> SqliteTxn::append_event(const std::string& kind, const std::string& object_id,
                                            const std::string& payload_json, uint64_t ts_us) {
  NM_ASSIGN_OR_RETURN(uint64_t seq, store_.bump_meta("last_event_seq"));
  {
    NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("INSERT INTO events (seq, ts_us, kind, object_id, "
                                            "payload_json) VALUES (?1, ?2, ?3, ?4, ?5)"));
    s.bind(1, to_db(seq))
        .bind(2, to_db(ts_us))
        .bind(3, kind)
        .bind(4, object_id)
        .bind(5, payload_json);
    NM_RETURN_IF_ERROR(s.run());
  }
  // Trimmed every 1 % of the capacity, not on every event: the oldest events sit on another
  // page than the newest, and every trim writes that page to the WAL too.
  const uint64_t capacity = store_.options().event_capacity;
  const uint64_t batch = std::max<uint64_t>(1, capacity / 100);
  if (seq > capacity && seq % batch == 0) {
    NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("DELETE FROM events WHERE seq <= ?1"));
    NM_RETURN_IF_ERROR(s.bind(1, to_db(seq - capacity)).run());
  }
  return EventRecord{.seq = seq,
                     .ts_us = ts_us,
                     .kind = kind,
                     .object_id = object_id,
                     .payload_json = payload_json};
}

Result<uint64_t> SqliteTxn::allocate_job_id() {
  return store_.bump_meta("last_job_id");
}

Status SqliteTxn::put_job(const JobRecord& job) {
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("INSERT INTO jobs (id, kind, object_id, created_us) "
                                          "VALUES (?1, ?2, ?3, ?4)"));
  s.bind(1, to_db(job.id)).bind(2, job.kind).bind(3, job.object_id).bind(4, to_db(job.created_us));
  Status st = s.run();
  if (!st.is_ok()) return st.with_context("put job " + std::to_string(job.id));
  return Status::ok();
}

Status SqliteTxn::put_setting(const std::string& key, const std::string& value) {
  NM_ASSIGN_OR_RETURN(Stmt s,
                      store_.stmt("INSERT INTO settings (key, value) VALUES (?1, ?2) "
                                  "ON CONFLICT (key) DO UPDATE SET value = excluded.value"));
  Status st = s.bind(1, key).bind(2, value).run();
  if (!st.is_ok()) return st.with_context("put setting '" + key + "'");
  return Status::ok();
}

Status SqliteTxn::delete_job(uint64_t id) {
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("DELETE FROM jobs WHERE id = ?1"));
  return s.bind(1, to_db(id)).run();
}

Status SqliteTxn::put_network(const NetworkRecord& n) {
  NM_ASSIGN_OR_RETURN(
      Stmt s, store_.stmt("INSERT INTO networks (name, tenant, vni, spec_json, deleting, state, "
                          "state_reason, created_us, updated_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, "
                          "?7, ?8, ?9) ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant, "
                          "vni = excluded.vni, spec_json = excluded.spec_json, deleting = "
                          "excluded.deleting, state = excluded.state, state_reason = "
                          "excluded.state_reason, created_us = excluded.created_us, updated_us = "
                          "excluded.updated_us"));
  s.bind(1, n.spec.name.str())
      .bind(2, n.spec.tenant.str())
      .bind(3, int64_t{n.spec.vni.value()})
      .bind(4, network::network_spec_to_json(n.spec))
      .bind(5, int64_t{n.deleting ? 1 : 0})
      .bind(6, n.state)
      .bind(7, n.state_reason)
      .bind(8, to_db(n.created_us))
      .bind(9, to_db(n.updated_us));
  Status st = s.run();
  if (!st.is_ok()) return st.with_context("put network '" + n.spec.name.str() + "'");
  return Status::ok();
}

Status SqliteTxn::delete_network(const NetworkName& name) {
  {
    NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("SELECT count(*) FROM ports WHERE network = ?1"));
    s.bind(1, name.str());
    NM_ASSIGN_OR_RETURN(bool row, s.step());
    if (row && s.i64(0) > 0) {
      return conflict("network '" + name.str() + "' still has " + std::to_string(s.i64(0)) +
                      " port(s)");
    }
  }
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("DELETE FROM networks WHERE name = ?1"));
  return s.bind(1, name.str()).run();
}

Status SqliteTxn::put_port(const PortRecord& p) {
  NM_ASSIGN_OR_RETURN(Stmt s, store_.stmt("INSERT INTO ports (vm_id, network, ifname, mac, ip, "
                                          "hostname) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"));
  s.bind(1, p.vm.str())
      .bind(2, p.network.str())
      .bind(3, p.ifname)
      .bind(4, p.mac.str())
      .bind(5, p.ip.str())
      .bind(6, p.hostname);
  Status st = s.run();
  if (!st.is_ok()) {
    return st.with_context("put port of vm '" + p.vm.str() + "' on network '" + p.network.str() +
                           "'");
  }
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<StateStore>> open_sqlite_state_store(const std::string& path,
                                                            const SqliteOptions& options,
                                                            uint64_t now_us) {
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(
      path.c_str(), &raw,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
      nullptr);
  DbPtr db(raw);
  if (rc != SQLITE_OK) return sqlite_status(db.get(), rc, "open state database '" + path + "'");
  sqlite3_extended_result_codes(db.get(), 1);
  sqlite3_busy_timeout(db.get(), 5000);
  auto store = std::make_unique<SqliteStateStore>(std::move(db), path, options);
  NM_RETURN_IF_ERROR(store->open(now_us));
  return std::unique_ptr<StateStore>(std::move(store));
}

}  // namespace nm
