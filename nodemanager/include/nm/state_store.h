// StateStore port: the node's durable desired state, idempotency records and event ring.
//
// Adapter: SqliteStateStore (nodemanager/state/, WAL mode, versioned schema migrations). Every
// acknowledged mutation is one transact() call that is durable before the caller replies: at
// once (synchronous=FULL), or with deferred_sync through a later sync() that the caller waits
// for (group commit: nodemanagerd holds its replies, signals and jobs until then).
//
// Threading: owned by the event loop thread; not thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/network/network_spec.h"
#include "nm/network/tenant_networks.h"
#include "nm/vm_spec.h"

namespace nm {

enum class PowerIntent { kStopped, kRunning };
// "stopped", "running". Inline so that users of the port need not link the SQLite adapter.
inline std::string_view power_intent_name(PowerIntent p) {
  return p == PowerIntent::kRunning ? "running" : "stopped";
}

struct VmRecord {
  VmId id = VmId::trusted("00000000-0000-0000-0000-000000000000");
  VmSpec spec;
  PowerIntent power = PowerIntent::kStopped;  // desired power state
  bool deleting = false;                      // desired: gone; the reconciler finishes the removal
  uint64_t generation = 1;                    // bumped on every change of desired state
  uint64_t observed_generation = 0;           // the generation the reconciler last converged
  std::string state = "pending";              // last observed state, shown to clients
  std::string state_reason;                   // why it is in that state ("created", "crashed", ...)
  // Images resolved at create time: the VM keeps its bytes even if a tag moves later.
  Digest image_digest = Digest::trusted("sha256:" + std::string(64, '0'));
  std::optional<Digest> kernel_digest;
  std::optional<Digest> initrd_digest;
  uint64_t created_us = 0;
  uint64_t updated_us = 0;
  bool operator==(const VmRecord&) const = default;
};

struct NetworkRecord {
  network::NetworkSpec spec;
  bool deleting = false;          // desired: gone; the delete job finishes the removal
  std::string state = "pending";  // "pending", "ready", "failed", "deleting"
  std::string state_reason;
  uint64_t created_us = 0;
  uint64_t updated_us = 0;
  bool operator==(const NetworkRecord&) const = default;
};

// A VM's port on a network: its MAC, address and tap, allocated when the VM is created and kept
// until it is deleted (unique on the node: MAC, tap name, and address within the network).
using PortRecord = network::PortSpec;

// The first answer to a mutating request, replayed to retries with the same request id.
struct RequestRecord {
  RequestId id = RequestId::trusted("x");
  std::string method;       // "CreateVm", "StartVm", ...
  std::string fingerprint;  // canonical arguments; a retry with other arguments is a Conflict
  std::string reply_json;   // what the first call returned
  uint64_t created_us = 0;
  bool operator==(const RequestRecord&) const = default;
};

struct EventRecord {
  uint64_t seq = 0;  // strictly increasing, never reused (also after restarts and trimming)
  uint64_t ts_us = 0;
  std::string
      kind;  // "VmStateChanged", "JobRemoved", "ImageImported", "ImageRemoved", "OrphanFound"
  std::string object_id;  // a VM id, job id or image digest
  std::string payload_json;
  bool operator==(const EventRecord&) const = default;
};

// A job a client was given that has not ended (JobRemoved not yet recorded).
struct JobRecord {
  uint64_t id = 0;
  std::string kind;
  std::string object_id;
  uint64_t created_us = 0;
  bool operator==(const JobRecord&) const = default;
};

// Writes inside one transaction.
class StateTxn {
 public:
  virtual ~StateTxn() = default;
  // Inserts, or updates by id. A VM's name, tenant and created_us never change: Internal if
  // `vm` has others than the stored record.
  virtual Status put_vm(const VmRecord& vm) = 0;
  virtual Status delete_vm(const VmId& id) = 0;  // OK if absent
  // AlreadyExists if a record with that id exists.
  virtual Status put_request(const RequestRecord& req) = 0;
  // Appends to the ring (assigning seq) and trims the oldest beyond the configured capacity
  // (every capacity/100 events, so the ring holds capacity to capacity + capacity/100 - 1).
  virtual Result<EventRecord> append_event(const std::string& kind, const std::string& object_id,
                                           const std::string& payload_json, uint64_t ts_us) = 0;
  // A job id never handed out before on this node.
  virtual Result<uint64_t> allocate_job_id() = 0;
  // Records a job a client was told about; removed with its JobRemoved (delete_job).
  virtual Status put_job(const JobRecord& job) = 0;
  virtual Status delete_job(uint64_t id) = 0;  // OK if absent
  // Networks: insert or replace by name. AlreadyExists when another network holds the VNI.
  virtual Status put_network(const NetworkRecord& network) = 0;
  // Conflict while a port references it; OK if absent.
  virtual Status delete_network(const NetworkName& name) = 0;
  // Inserts a port. AlreadyExists when its MAC, tap name or (network, ip) is taken. A VM's
  // ports go with delete_vm().
  virtual Status put_port(const PortRecord& port) = 0;
  // Node-wide settings ("maintenance" ...): insert or replace by key.
  virtual Status put_setting(const std::string& key, const std::string& value) = 0;
};

struct SqliteOptions {
  // Events kept for GetEvents() at least; older ones are trimmed (in batches of 1 %). Default
  // 10000.
  uint32_t event_capacity = 10000;
  // Idempotency records older than this are dropped at open. Default 7 days.
  uint64_t request_retention_us = 7ull * 24 * 3600 * 1000 * 1000;
  // Group commit: transact() returns once its transaction is written (a crash of the process
  // keeps it, a power loss may not) and sync() makes everything written so far durable with one
  // fsync, however many transactions that covers. Off: every transact() is durable on return.
  bool deferred_sync = false;
};

class StateStore {
 public:
  virtual ~StateStore() = default;

  // Runs `fn` in one write transaction (BEGIN IMMEDIATE): commits if it returns OK (durably,
  // unless deferred_sync: then see sync()), rolls back otherwise and returns its Status.
  // Unavailable if the commit fails (disk full...).
  virtual Status transact(const std::function<Status(StateTxn&)>& fn) = 0;

  // Counts committed transactions: written_seq() grows with each, durable_seq() is the count
  // known to be on disk. Equal at all times without deferred_sync.
  virtual uint64_t written_seq() const = 0;
  virtual uint64_t durable_seq() const = 0;
  // Makes every transaction written so far durable (one fsync of the log). Unavailable when the
  // disk refuses: what was written is then of unknown durability, the caller must not report it
  // as done, and every later sync() fails as well.
  virtual Status sync() = 0;

  virtual Result<std::vector<VmRecord>> list_vms() = 0;
  virtual Result<std::optional<VmRecord>> get_vm(const VmId& id) = 0;
  virtual Result<std::optional<RequestRecord>> get_request(const RequestId& id) = 0;
  // Events with seq > since, oldest first, at most `max`.
  virtual Result<std::vector<EventRecord>> events_since(uint64_t since, uint32_t max) = 0;
  virtual Result<uint64_t> last_event_seq() = 0;
  // Jobs recorded with put_job() and not deleted: the ones a crash interrupted. Oldest first.
  virtual Result<std::vector<JobRecord>> unfinished_jobs() = 0;
  // Every network, by name; every port, by VM id then network.
  virtual Result<std::vector<NetworkRecord>> list_networks() = 0;
  virtual Result<std::vector<PortRecord>> list_ports() = 0;
  // The setting's value, or nullopt when never set.
  virtual Result<std::optional<std::string>> get_setting(const std::string& key) = 0;
  // The schema version after migrations.
  virtual int schema_version() const = 0;
};

// Opens (creating if needed) the database at `path` and migrates it to the newest schema.
// Refuses a database written by a newer nodemanager (schema version too high).
//
// SqliteStateStore details: journal_mode=WAL, synchronous=FULL, foreign_keys=ON, busy timeout
// 5 s; `PRAGMA user_version` is the schema version, each migration step runs in its own
// transaction; open() syncs the WAL (what a process that died before syncing left there) and
// returns with everything durable. With deferred_sync: synchronous=NORMAL, under which commits do
// not sync but SQLite's automatic checkpoints do (the WAL before copying, the database file
// before the WAL is reused, the WAL header when it is); sync() is an fdatasync of the WAL through
// SQLite's own file handle. After a failed sync every later sync() fails too (a failed
// write-back may be reported once only) and closing leaves the WAL alone instead of
// checkpointing it; otherwise closing syncs first.
// Request records older than `now_us - options.request_retention_us` are dropped here. SQLite
// errors map to Status as: disk full, I/O error, busy/locked, read-only, cannot open
// -> Unavailable; a primary-key or unique violation (duplicate request id, VM name taken) ->
// AlreadyExists; anything else -> Internal; the message carries SQLite's own text. Calling
// transact() from inside transact() is a programming error (asserts; Internal in release builds).
Result<std::unique_ptr<StateStore>> open_sqlite_state_store(const std::string& path,
                                                            const SqliteOptions& options,
                                                            uint64_t now_us);

}  // namespace nm
