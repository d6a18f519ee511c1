#include "bus_client.h"

#include <systemd/sd-bus.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <set>

namespace nm::cli {
namespace {

constexpr const char* kService = "org.nodemanager.NodeManager1";
constexpr const char* kPath = "/org/nodemanager/NodeManager1";
constexpr const char* kManager = "org.nodemanager.NodeManager1.Manager";
constexpr const char* kJob = "org.nodemanager.NodeManager1.Job";

struct BusDeleter {
  void operator()(sd_bus* b) const noexcept { sd_bus_flush_close_unref(b); }
};
struct MessageDeleter {
  void operator()(sd_bus_message* m) const noexcept { sd_bus_message_unref(m); }
};
struct SlotDeleter {
  void operator()(sd_bus_slot* s) const noexcept { sd_bus_slot_unref(s); }
};
using BusPtr = std::unique_ptr<sd_bus, BusDeleter>;
using MessagePtr = std::unique_ptr<sd_bus_message, MessageDeleter>;
using SlotPtr = std::unique_ptr<sd_bus_slot, SlotDeleter>;
struct StrvDeleter {
  void operator()(char** v) const noexcept {
    if (v == nullptr) return;
    for (char** p = v; *p != nullptr; ++p) std::free(*p);
    std::free(v);
  }
};
using Strv = std::unique_ptr<char*, StrvDeleter>;

// Reads an "as" argument into `out` (appending); sd-bus's negative errno on failure.
int read_strings(sd_bus_message* m, std::vector<std::string>* out) {
  char** raw = nullptr;
  const int r = sd_bus_message_read_strv(m, &raw);
  const Strv owned(raw);
  if (r < 0) return r;
  for (char** p = owned.get(); p != nullptr && *p != nullptr; ++p) out->emplace_back(*p);
  return r;
}

class ErrorHolder {
 public:
  ErrorHolder() = default;
  ErrorHolder(const ErrorHolder&) = delete;
  ErrorHolder& operator=(const ErrorHolder&) = delete;
  ~ErrorHolder() { sd_bus_error_free(&error_); }
  sd_bus_error* get() { return &error_; }

 private:
  sd_bus_error error_{};  // all null: SD_BUS_ERROR_NULL without the C99 compound literal
};

Code code_from_errno(int err) {
  switch (err) {
    case EACCES:
    case EPERM:
      return Code::kAccessDenied;
    case EINVAL:
      return Code::kInvalidArgument;
    case ENOMEM:
      return Code::kInternal;
    default:
      return Code::kUnavailable;
  }
}

// The one translator from sd-bus's error space to Status.
Status bus_status(int r, const sd_bus_error* e, std::string_view what) {
  if (e != nullptr && sd_bus_error_is_set(e)) {
    const std::string name = e->name;
    const std::string message = e->message != nullptr ? e->message : "";
    const Code code = code_from_dbus_error(name);
    if (name.rfind("org.nodemanager.NodeManager1.Error.", 0) == 0) return {code, message};
    if (name == "org.freedesktop.DBus.Error.ServiceUnknown" ||
        name == "org.freedesktop.DBus.Error.NameHasNoOwner") {
      return {code, "nodemanagerd is not running on this bus (" + message + ")"};
    }
    if (name == "org.freedesktop.DBus.Error.Timeout" ||
        name == "org.freedesktop.DBus.Error.NoReply") {
      return {code, std::string(what) + ": no reply from nodemanagerd (" + message + ")"};
    }
    return {code, std::string(what) + ": " + name + ": " + message};
  }
  const int err = r < 0 ? -r : r;
  if (err == ETIMEDOUT) return {Code::kUnavailable, std::string(what) + ": timed out"};
  return {code_from_errno(err), std::string(what) + ": " + std::strerror(err)};
}

Status read_status(int r, std::string_view what) {
  return {Code::kInternal, "malformed reply to " + std::string(what) + ": " + std::strerror(-r)};
}

bool is_gone_error(const sd_bus_error* e) {
  if (!sd_bus_error_is_set(e)) return false;
  const std::string_view n = e->name;
  return n == "org.freedesktop.DBus.Error.UnknownObject" ||
         n == "org.freedesktop.DBus.Error.UnknownInterface" ||
         n == "org.freedesktop.DBus.Error.UnknownMethod" ||
         n == "org.freedesktop.DBus.Error.UnknownProperty" ||
         n == "org.nodemanager.NodeManager1.Error.NotFound";
}

uint64_t remaining_usec(const Deadline& deadline) {
  if (!deadline) return UINT64_MAX;
  const auto now = std::chrono::steady_clock::now();
  if (now >= *deadline) return 0;
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(*deadline - now).count());
}

// Reads BytesDone and BytesTotal from a property dictionary (a{sv}), skipping the rest.
int read_job_bytes(sd_bus_message* m, JobProgress* p) {
  int r = sd_bus_message_enter_container(m, 'a', "{sv}");
  if (r < 0) return r;
  for (;;) {
    r = sd_bus_message_enter_container(m, 'e', "sv");
    if (r < 0) return r;
    if (r == 0) break;
    const char* key = nullptr;
    if ((r = sd_bus_message_read(m, "s", &key)) < 0) return r;
    uint64_t* target = nullptr;
    if (std::strcmp(key, "BytesDone") == 0) target = &p->done;
    if (std::strcmp(key, "BytesTotal") == 0) target = &p->total;
    if (target != nullptr) {
      r = sd_bus_message_read(m, "v", "t", target);
    } else {
      r = sd_bus_message_skip(m, "v");
    }
    if (r < 0) return r;
    if ((r = sd_bus_message_exit_container(m)) < 0) return r;
  }
  return sd_bus_message_exit_container(m);
}

}  // namespace

struct BusClient::Impl {
  BusPtr bus;
  uint64_t timeout_usec = 0;
  // Declared after `bus`: destroyed before it.
  SlotPtr job_slot;
  SlotPtr owner_slot;
  SlotPtr state_slot;
  SlotPtr event_job_slot;
  SlotPtr event_other_slot;
  SlotPtr event_health_slot;
  SlotPtr progress_slot;
  SlotPtr heartbeat_slot;
  SlotPtr health_slot;
  SlotPtr node_state_slot;
  std::vector<NodeSignal> node_signals;  // received by the node-watch handlers, not yet returned
  bool node_signal_error = false;        // a node signal that did not parse (logged once)

  std::map<std::string, JobOutcome> ended;      // JobRemoved seen, by job path
  std::map<std::string, JobProgress> progress;  // by job path
  std::set<std::string> progress_changed;       // job paths whose progress changed unreported
  bool daemon_gone = false;
  bool out_of_memory = false;
  uint64_t newest_seq = 0;
  uint64_t reported_seq = 0;

  static int on_job_removed(sd_bus_message* m, void* userdata, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    uint64_t seq = 0;
    uint32_t id = 0;
    const char* path = nullptr;
    const char* kind = nullptr;
    const char* object_id = nullptr;
    const char* result = nullptr;
    const char* error_name = nullptr;
    const char* error_message = nullptr;
    if (sd_bus_message_rewind(m, 1) < 0) return 0;
    if (sd_bus_message_read(m, "tuosssss", &seq, &id, &path, &kind, &object_id, &result,
                            &error_name, &error_message) < 0) {
      return 0;
    }
    try {
      self->ended[path] = JobOutcome{.job = path,
                                     .job_id = id,
                                     .kind = kind,
                                     .object_id = object_id,
                                     .result = result,
                                     .error_name = error_name,
                                     .error_message = error_message};
    } catch (...) {
      self->out_of_memory = true;
    }
    return 0;
  }

  static int on_event_signal(sd_bus_message* m, void* userdata, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    uint64_t seq = 0;
    if (sd_bus_message_rewind(m, 1) < 0) return 0;
    if (sd_bus_message_read(m, "t", &seq) < 0) return 0;
    self->newest_seq = std::max(self->newest_seq, seq);
    return 0;
  }

  static int read_checks(sd_bus_message* m, std::vector<HealthCheckRow>* out) {
    int r = sd_bus_message_enter_container(m, 'a', "(ssssx)");
    if (r < 0) return r;
    for (;;) {
      const char *name = nullptr, *state = nullptr, *reason = nullptr, *vm = nullptr;
      int64_t changed = 0;
      r = sd_bus_message_read(m, "(ssssx)", &name, &state, &reason, &vm, &changed);
      if (r < 0) return r;
      if (r == 0) break;
      out->push_back(HealthCheckRow{
          .name = name, .state = state, .reason = reason, .vm_id = vm, .changed_us = changed});
    }
    return sd_bus_message_exit_container(m);
  }

  static int on_node_signal(sd_bus_message* m, void* userdata, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    try {
      const std::string_view member = sd_bus_message_get_member(m);
      int r = 0;
      if (member == "Heartbeat") {
        HeartbeatSignal h;
        const char* state = nullptr;
        int maintenance = 0;
        r = sd_bus_message_read(m, "txsb", &h.seq, &h.timestamp_us, &state, &maintenance);
        if (r >= 0) {
          h.state = state;
          h.maintenance = maintenance != 0;
          r = sd_bus_message_enter_container(m, 'a', "{st}");
        }
        while (r >= 0) {
          const char* key = nullptr;
          uint64_t value = 0;
          r = sd_bus_message_read(m, "{st}", &key, &value);
          if (r <= 0) break;
          h.summary[key] = value;
        }
        if (r >= 0) self->node_signals.emplace_back(std::move(h));
      } else if (member == "HealthChanged") {
        HealthChangedSignal h;
        const char *state = nullptr, *previous = nullptr;
        int maintenance = 0;
        r = sd_bus_message_read(m, "tssb", &h.seq, &state, &previous, &maintenance);
        if (r >= 0) {
          h.state = state;
          h.previous_state = previous;
          h.maintenance = maintenance != 0;
          r = read_checks(m, &h.changed);
        }
        if (r >= 0) r = read_strings(m, &h.vms_affected);
        if (r >= 0) self->node_signals.emplace_back(std::move(h));
      } else if (member == "VmStateChanged") {
        VmStateSignal v;
        const char *id = nullptr, *name = nullptr, *state = nullptr, *reason = nullptr;
        r = sd_bus_message_read(m, "tssss", &v.seq, &id, &name, &state, &reason);
        if (r >= 0) {
          v.vm_id = id;
          v.name = name;
          v.state = state;
          v.reason = reason;
          self->node_signals.emplace_back(std::move(v));
        }
      }
      if (r < 0) self->node_signal_error = true;
    } catch (...) {
      self->out_of_memory = true;
    }
    return 0;
  }

  static int on_properties_changed(sd_bus_message* m, void* userdata, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    const char* path = sd_bus_message_get_path(m);
    const char* iface = nullptr;
    if (path == nullptr || sd_bus_message_read(m, "s", &iface) < 0) return 0;
    if (std::strcmp(iface, kJob) != 0) return 0;
    try {
      JobProgress p = self->progress[path];
      if (read_job_bytes(m, &p) < 0) return 0;
      self->update_progress(path, p);
    } catch (...) {
      self->out_of_memory = true;
    }
    return 0;
  }

  static int on_owner_changed(sd_bus_message* m, void* userdata, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    const char* name = nullptr;
    const char* old_owner = nullptr;
    const char* new_owner = nullptr;
    if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) < 0) return 0;
    if (std::strcmp(name, kService) == 0) self->daemon_gone = new_owner[0] == '\0';
    return 0;
  }

  Result<MessagePtr> call(const char* path, const char* iface, const char* member,
                          const std::function<int(sd_bus_message*)>& append) {
    sd_bus_message* raw = nullptr;
    int r = sd_bus_message_new_method_call(bus.get(), &raw, kService, path, iface, member);
    MessagePtr msg(raw);
    if (r < 0) return bus_status(r, nullptr, member);
    if (append) {
      r = append(msg.get());
      if (r < 0) return bus_status(r, nullptr, member);
    }
    ErrorHolder error;
    sd_bus_message* reply_raw = nullptr;
    r = sd_bus_call(bus.get(), msg.get(), timeout_usec, error.get(), &reply_raw);
    MessagePtr reply(reply_raw);
    if (r < 0) return bus_status(r, error.get(), member);
    return reply;
  }

  Result<MessagePtr> call_manager(const char* member,
                                  const std::function<int(sd_bus_message*)>& append) {
    return call(kPath, kManager, member, append);
  }

  Result<std::string> read_object_path(Result<MessagePtr> reply, const char* member) {
    if (!reply) return reply.status();
    const char* path = nullptr;
    const int r = sd_bus_message_read(reply->get(), "o", &path);
    if (r < 0) return read_status(r, member);
    return std::string(path);
  }

  // Turns everything already received into callbacks, without blocking.
  Status drain() {
    for (;;) {
      const int r = sd_bus_process(bus.get(), nullptr);
      if (r < 0) return bus_status(r, nullptr, "reading from the bus");
      if (r == 0) return Status::ok();
    }
  }

  // Processes one message or waits for the next; Unavailable after the deadline.
  Status pump(const Deadline& deadline, std::string_view waiting_for) {
    const int r = sd_bus_process(bus.get(), nullptr);
    if (r < 0) return bus_status(r, nullptr, "reading from the bus");
    if (r > 0) return Status::ok();
    const uint64_t left = remaining_usec(deadline);
    if (left == 0) return unavailable("timed out waiting for " + std::string(waiting_for));
    const int w = sd_bus_wait(bus.get(), left);
    if (w < 0 && w != -EINTR) return bus_status(w, nullptr, "waiting on the bus");
    return Status::ok();
  }

  Status add_match(SlotPtr* slot, const char* sender, const char* member,
                   sd_bus_message_handler_t cb) {
    sd_bus_slot* raw = nullptr;
    const int r = sd_bus_match_signal(bus.get(), &raw, sender, kPath, kManager, member, cb, this);
    slot->reset(raw);
    if (r < 0) return bus_status(r, nullptr, "subscribing to signals");
    return Status::ok();
  }

  // Keeps the furthest progress seen: a signal queued before a GetAll reply may be older.
  void update_progress(const std::string& path, const JobProgress& p) {
    JobProgress& cur = progress[path];
    const JobProgress next{.done = p.total == cur.total ? std::max(p.done, cur.done) : p.done,
                           .total = p.total};
    if (next.done != cur.done || next.total != cur.total) progress_changed.insert(path);
    cur = next;
  }

  // The job's progress (GetAll on its Job interface); nullopt when the object no longer exists.
  Result<std::optional<JobProgress>> job_properties(const std::string& job) {
    ErrorHolder error;
    sd_bus_message* raw = nullptr;
    int r = sd_bus_message_new_method_call(bus.get(), &raw, kService, job.c_str(),
                                           "org.freedesktop.DBus.Properties", "GetAll");
    MessagePtr msg(raw);
    if (r < 0) return bus_status(r, nullptr, "GetAll");
    r = sd_bus_message_append(msg.get(), "s", kJob);
    if (r < 0) return bus_status(r, nullptr, "GetAll");
    sd_bus_message* reply_raw = nullptr;
    r = sd_bus_call(bus.get(), msg.get(), timeout_usec, error.get(), &reply_raw);
    MessagePtr reply(reply_raw);
    if (r < 0) {
      if (is_gone_error(error.get())) return std::optional<JobProgress>();
      return bus_status(r, error.get(), "reading job '" + job + "'");
    }
    JobProgress p;
    r = read_job_bytes(reply.get(), &p);
    if (r < 0) return read_status(r, "GetAll");
    return std::optional<JobProgress>(p);
  }

  // Where a retried request's job ended long ago: look its JobRemoved up in the event ring.
  Result<JobOutcome> outcome_from_ring(const std::string& job, uint32_t job_id);
  Result<EventPage> get_events(uint64_t since, uint32_t max);
};

BusClient::BusClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BusClient::~BusClient() = default;

Result<std::unique_ptr<BusClient>> BusClient::connect(std::string_view bus,
                                                      std::chrono::microseconds call_timeout) {
  auto impl = std::make_unique<Impl>();
  impl->timeout_usec = static_cast<uint64_t>(call_timeout.count());
  sd_bus* raw = nullptr;
  if (bus == "system" || bus == "session") {
    const int r = bus == "system" ? sd_bus_open_system(&raw) : sd_bus_open_user(&raw);
    impl->bus.reset(raw);
    if (r < 0) return bus_status(r, nullptr, "connecting to the " + std::string(bus) + " bus");
  } else {
    int r = sd_bus_new(&raw);
    impl->bus.reset(raw);
    if (r < 0) return bus_status(r, nullptr, "creating a bus connection");
    const std::string address(bus);
    r = sd_bus_set_address(raw, address.c_str());
    if (r < 0) return invalid_argument("--bus: '" + address + "' is not a D-Bus address");
    if ((r = sd_bus_set_bus_client(raw, 1)) < 0 || (r = sd_bus_start(raw)) < 0) {
      return bus_status(r, nullptr, "connecting to '" + address + "'");
    }
  }
  return std::unique_ptr<BusClient>(new BusClient(std::move(impl)));
}

Result<CreateVmReply> BusClient::create_vm(const std::string& spec_json,
                                           const std::string& request_id) {
  auto reply = impl_->call_manager("CreateVm", [&](sd_bus_message* m) {
    return sd_bus_message_append(m, "ss", spec_json.c_str(), request_id.c_str());
  });
  if (!reply) return reply.status();
  const char* id = nullptr;
  const char* vm = nullptr;
  const char* job = nullptr;
  const int r = sd_bus_message_read(reply->get(), "soo", &id, &vm, &job);
  if (r < 0) return read_status(r, "CreateVm");
  return CreateVmReply{.vm_id = id, .vm_path = vm, .job = job};
}

Result<std::string> BusClient::start_vm(const std::string& vm, const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("StartVm",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "ss", vm.c_str(), request_id.c_str());
                                                     }),
                                 "StartVm");
}

Result<std::string> BusClient::stop_vm(const std::string& vm, bool force,
                                       const std::string& request_id) {
  return impl_->read_object_path(
      impl_->call_manager("StopVm",
                          [&](sd_bus_message* m) {
                            return sd_bus_message_append(
                                m, "sbs", vm.c_str(), static_cast<int>(force), request_id.c_str());
                          }),
      "StopVm");
}

Result<std::string> BusClient::reboot_vm(const std::string& vm, const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("RebootVm",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "ss", vm.c_str(), request_id.c_str());
                                                     }),
                                 "RebootVm");
}

Result<std::string> BusClient::delete_vm(const std::string& vm, const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("DeleteVm",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "ss", vm.c_str(), request_id.c_str());
                                                     }),
                                 "DeleteVm");
}

Result<std::string> BusClient::get_vm(const std::string& vm) {
  auto reply = impl_->call_manager(
      "GetVm", [&](sd_bus_message* m) { return sd_bus_message_append(m, "s", vm.c_str()); });
  if (!reply) return reply.status();
  const char* json = nullptr;
  const int r = sd_bus_message_read(reply->get(), "s", &json);
  if (r < 0) return read_status(r, "GetVm");
  return std::string(json);
}

Result<std::vector<VmRow>> BusClient::list_vms(const std::string& tenant) {
  auto reply = impl_->call_manager(
      "ListVms", [&](sd_bus_message* m) { return sd_bus_message_append(m, "s", tenant.c_str()); });
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(sssstt)");
  if (r < 0) return read_status(r, "ListVms");
  std::vector<VmRow> rows;
  for (;;) {
    const char *id = nullptr, *name = nullptr, *ten = nullptr, *state = nullptr;
    uint64_t gen = 0, observed = 0;
    r = sd_bus_message_read(m, "(sssstt)", &id, &name, &ten, &state, &gen, &observed);
    if (r < 0) return read_status(r, "ListVms");
    if (r == 0) break;
    rows.push_back(VmRow{.id = id,
                         .name = name,
                         .tenant = ten,
                         .state = state,
                         .generation = gen,
                         .observed_generation = observed});
  }
  return rows;
}

Result<std::string> BusClient::import_image(const std::string& image, int fd,
                                            const std::string& sha256, const std::string& kind,
                                            const std::string& tenant,
                                            const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("ImportImage",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "shssss", image.c_str(), fd,
                                                           sha256.c_str(), kind.c_str(),
                                                           tenant.c_str(), request_id.c_str());
                                                     }),
                                 "ImportImage");
}

Result<std::string> BusClient::create_network(const std::string& spec_json,
                                              const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("CreateNetwork",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "ss", spec_json.c_str(),
                                                           request_id.c_str());
                                                     }),
                                 "CreateNetwork");
}

Result<std::string> BusClient::delete_network(const std::string& name,
                                              const std::string& request_id) {
  return impl_->read_object_path(
      impl_->call_manager("DeleteNetwork",
                          [&](sd_bus_message* m) {
                            return sd_bus_message_append(m, "ss", name.c_str(), request_id.c_str());
                          }),
      "DeleteNetwork");
}

Result<std::string> BusClient::get_network(const std::string& name) {
  auto reply = impl_->call_manager(
      "GetNetwork", [&](sd_bus_message* m) { return sd_bus_message_append(m, "s", name.c_str()); });
  if (!reply) return reply.status();
  const char* doc = nullptr;
  const int r = sd_bus_message_read(reply->get(), "s", &doc);
  if (r < 0) return read_status(r, "GetNetwork");
  return std::string(doc);
}

Result<std::vector<NetworkRow>> BusClient::list_networks(const std::string& tenant) {
  auto reply = impl_->call_manager("ListNetworks", [&](sd_bus_message* m) {
    return sd_bus_message_append(m, "s", tenant.c_str());
  });
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(sssuus)");
  if (r < 0) return read_status(r, "ListNetworks");
  std::vector<NetworkRow> rows;
  for (;;) {
    const char *name = nullptr, *ten = nullptr, *subnet = nullptr, *state = nullptr;
    uint32_t vni = 0, ports = 0;
    r = sd_bus_message_read(m, "(sssuus)", &name, &ten, &subnet, &vni, &ports, &state);
    if (r < 0) return read_status(r, "ListNetworks");
    if (r == 0) break;
    rows.push_back(NetworkRow{
        .name = name, .tenant = ten, .subnet = subnet, .vni = vni, .ports = ports, .state = state});
  }
  return rows;
}

Result<std::vector<ImageRow>> BusClient::list_images() {
  auto reply = impl_->call_manager("ListImages", nullptr);
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(ssssttstbas)");
  if (r < 0) return read_status(r, "ListImages");
  std::vector<ImageRow> rows;
  for (;;) {
    r = sd_bus_message_enter_container(m, 'r', "ssssttstbas");
    if (r < 0) return read_status(r, "ListImages");
    if (r == 0) break;
    const char *ref = nullptr, *digest = nullptr, *kind = nullptr, *format = nullptr,
               *tenant = nullptr;
    uint64_t size = 0, vsize = 0, last_used = 0;
    int pinned = 0;
    r = sd_bus_message_read(m, "ssssttstb", &ref, &digest, &kind, &format, &size, &vsize, &tenant,
                            &last_used, &pinned);
    if (r < 0) return read_status(r, "ListImages");
    ImageRow row{.ref = ref,
                 .digest = digest,
                 .kind = kind,
                 .format = format,
                 .size = size,
                 .virtual_size = vsize,
                 .tenant = tenant,
                 .last_used_us = last_used,
                 .pinned = pinned != 0};
    r = read_strings(m, &row.users);
    if (r < 0) return read_status(r, "ListImages");
    r = sd_bus_message_exit_container(m);
    if (r < 0) return read_status(r, "ListImages");
    rows.push_back(std::move(row));
  }
  return rows;
}

Status BusClient::remove_image(const std::string& image, const std::string& request_id) {
  return impl_
      ->call_manager("RemoveImage",
                     [&](sd_bus_message* m) {
                       return sd_bus_message_append(m, "ss", image.c_str(), request_id.c_str());
                     })
      .status();
}

Result<std::string> BusClient::pull_image(const std::string& image, const std::string& request_id) {
  return impl_->read_object_path(impl_->call_manager("PullImage",
                                                     [&](sd_bus_message* m) {
                                                       return sd_bus_message_append(
                                                           m, "ss", image.c_str(),
                                                           request_id.c_str());
                                                     }),
                                 "PullImage");
}

Status BusClient::pin_image(const std::string& image, bool pinned, const std::string& request_id) {
  return impl_
      ->call_manager("PinImage",
                     [&](sd_bus_message* m) {
                       return sd_bus_message_append(m, "sbs", image.c_str(),
                                                    static_cast<int>(pinned), request_id.c_str());
                     })
      .status();
}

Result<GcReply> BusClient::collect_images(int64_t min_age_s, bool dry_run) {
  auto reply = impl_->call_manager("CollectImages", [&](sd_bus_message* m) {
    return sd_bus_message_append(m, "xb", min_age_s, static_cast<int>(dry_run));
  });
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(sast)");
  if (r < 0) return read_status(r, "CollectImages");
  GcReply gc;
  for (;;) {
    r = sd_bus_message_enter_container(m, 'r', "sast");
    if (r < 0) return read_status(r, "CollectImages");
    if (r == 0) break;
    GcRow row;
    const char* digest = nullptr;
    if ((r = sd_bus_message_read(m, "s", &digest)) < 0) return read_status(r, "CollectImages");
    row.digest = digest;
    if ((r = sd_bus_message_enter_container(m, 'a', "s")) < 0) {
      return read_status(r, "CollectImages");
    }
    for (;;) {
      const char* tag = nullptr;
      r = sd_bus_message_read(m, "s", &tag);
      if (r < 0) return read_status(r, "CollectImages");
      if (r == 0) break;
      row.tags.emplace_back(tag);
    }
    if ((r = sd_bus_message_exit_container(m)) < 0 ||
        (r = sd_bus_message_read(m, "t", &row.size)) < 0 ||
        (r = sd_bus_message_exit_container(m)) < 0) {
      return read_status(r, "CollectImages");
    }
    gc.removed.push_back(std::move(row));
  }
  if ((r = sd_bus_message_exit_container(m)) < 0 ||
      (r = sd_bus_message_read(m, "t", &gc.bytes)) < 0) {
    return read_status(r, "CollectImages");
  }
  return gc;
}

Result<std::string> BusClient::verify_images(const std::vector<std::string>& images,
                                             const std::string& request_id) {
  return impl_->read_object_path(
      impl_->call_manager("VerifyImages",
                          [&](sd_bus_message* m) {
                            int r = sd_bus_message_open_container(m, 'a', "s");
                            for (const auto& i : images) {
                              if (r < 0) return r;
                              r = sd_bus_message_append(m, "s", i.c_str());
                            }
                            if (r < 0) return r;
                            r = sd_bus_message_close_container(m);
                            if (r < 0) return r;
                            return sd_bus_message_append(m, "s", request_id.c_str());
                          }),
      "VerifyImages");
}

Result<uint64_t> BusClient::last_event_seq() {
  auto reply = impl_->call(kPath, "org.freedesktop.DBus.Properties", "Get", [](sd_bus_message* m) {
    return sd_bus_message_append(m, "ss", kManager, "LastEventSeq");
  });
  if (!reply) return reply.status();
  uint64_t seq = 0;
  const int r = sd_bus_message_read(reply->get(), "v", "t", &seq);
  if (r < 0) return read_status(r, "LastEventSeq");
  return seq;
}

Result<EventPage> BusClient::Impl::get_events(uint64_t since, uint32_t max) {
  auto reply = call_manager(
      "GetEvents", [&](sd_bus_message* m) { return sd_bus_message_append(m, "tu", since, max); });
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(ttsss)");
  if (r < 0) return read_status(r, "GetEvents");
  EventPage page;
  for (;;) {
    uint64_t seq = 0, ts = 0;
    const char *kind = nullptr, *object_id = nullptr, *payload = nullptr;
    r = sd_bus_message_read(m, "(ttsss)", &seq, &ts, &kind, &object_id, &payload);
    if (r < 0) return read_status(r, "GetEvents");
    if (r == 0) break;
    page.events.push_back(EventRow{
        .seq = seq, .ts_us = ts, .kind = kind, .object_id = object_id, .payload_json = payload});
  }
  r = sd_bus_message_exit_container(m);
  if (r < 0) return read_status(r, "GetEvents");
  r = sd_bus_message_read(m, "t", &page.last_seq);
  if (r < 0) return read_status(r, "GetEvents");
  return page;
}

Result<EventPage> BusClient::get_events(uint64_t since, uint32_t max) {
  return impl_->get_events(since, max);
}

Status BusClient::watch_jobs() {
  NM_RETURN_IF_ERROR(
      impl_->add_match(&impl_->job_slot, kService, "JobRemoved", &Impl::on_job_removed));
  sd_bus_slot* raw = nullptr;
  const std::string rule = std::string(
                               "type='signal',sender='org.freedesktop.DBus',path='/org/"
                               "freedesktop/DBus',interface='org.freedesktop.DBus',member='"
                               "NameOwnerChanged',arg0='") +
                           kService + "'";
  const int r =
      sd_bus_add_match(impl_->bus.get(), &raw, rule.c_str(), &Impl::on_owner_changed, impl_.get());
  impl_->owner_slot.reset(raw);
  if (r < 0) return bus_status(r, nullptr, "subscribing to NameOwnerChanged");
  return Status::ok();
}

Result<JobOutcome> BusClient::Impl::outcome_from_ring(const std::string& job, uint32_t job_id) {
  JobOutcome found{.job = job, .job_id = job_id, .result = "unknown"};
  uint64_t since = 0;
  for (;;) {
    NM_ASSIGN_OR_RETURN(EventPage page, get_events(since, 1000));
    if (page.events.empty()) break;
    for (const auto& e : page.events) job_outcome_from_event(e, job_id, job, &found);
    since = page.events.back().seq;
    if (since >= page.last_seq) break;
  }
  return found;
}

Result<JobOutcome> BusClient::wait_job(const std::string& job, Deadline deadline) {
  NM_ASSIGN_OR_RETURN(std::vector<JobOutcome> outcomes, wait_jobs({job}, deadline, nullptr));
  return std::move(outcomes.front());
}

Status BusClient::watch_job_progress() {
  sd_bus_slot* raw = nullptr;
  const std::string rule = std::string("type='signal',sender='") + kService +
                           "',interface='org.freedesktop.DBus.Properties',member='"
                           "PropertiesChanged',path_namespace='" +
                           kPath + "/job',arg0='" + kJob + "'";
  const int r = sd_bus_add_match(impl_->bus.get(), &raw, rule.c_str(), &Impl::on_properties_changed,
                                 impl_.get());
  impl_->progress_slot.reset(raw);
  if (r < 0) return bus_status(r, nullptr, "subscribing to job progress");
  return Status::ok();
}

Result<std::vector<JobOutcome>> BusClient::wait_jobs(const std::vector<std::string>& jobs,
                                                     Deadline deadline,
                                                     const ProgressFn& on_progress) {
  std::vector<std::optional<JobOutcome>> out(jobs.size());
  size_t left = jobs.size();
  auto collect = [&] {
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (out[i]) continue;
      if (const auto it = impl_->ended.find(jobs[i]); it != impl_->ended.end()) {
        out[i] = it->second;
        --left;
      }
    }
  };
  NM_RETURN_IF_ERROR(impl_->drain());
  collect();

  // Does each job still exist? A retried request may be answered with a job that ended long ago.
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (out[i]) continue;
    NM_ASSIGN_OR_RETURN(std::optional<JobProgress> p, impl_->job_properties(jobs[i]));
    if (p) {
      impl_->update_progress(jobs[i], *p);
      if (on_progress) on_progress(i, impl_->progress[jobs[i]]);
      continue;
    }
    NM_RETURN_IF_ERROR(impl_->drain());
    collect();
    if (out[i]) continue;
    NM_ASSIGN_OR_RETURN(JobOutcome o,
                        impl_->outcome_from_ring(jobs[i], job_id_from_path(jobs[i]).value_or(0)));
    out[i] = std::move(o);
    --left;
  }

  for (;;) {
    collect();
    if (on_progress) {
      for (size_t i = 0; i < jobs.size(); ++i) {
        if (!out[i] && impl_->progress_changed.count(jobs[i]) > 0) {
          on_progress(i, impl_->progress[jobs[i]]);
        }
      }
    }
    impl_->progress_changed.clear();
    if (left == 0) break;
    if (impl_->out_of_memory) return internal_error("out of memory while waiting for jobs");
    if (impl_->daemon_gone) {
      for (size_t i = 0; i < jobs.size(); ++i) {
        if (out[i]) continue;
        return unavailable("nodemanagerd left the bus before job " +
                           std::to_string(job_id_from_path(jobs[i]).value_or(0)) + " ended");
      }
    }
    std::string waiting_for = "job";
    for (size_t i = 0; i < jobs.size(); ++i) {
      if (!out[i]) waiting_for += " " + std::to_string(job_id_from_path(jobs[i]).value_or(0));
    }
    NM_RETURN_IF_ERROR(impl_->pump(deadline, waiting_for));
  }
  std::vector<JobOutcome> outcomes;
  outcomes.reserve(out.size());
  for (auto& o : out) outcomes.push_back(std::move(*o));
  return outcomes;
}

Status BusClient::watch_events() {
  NM_RETURN_IF_ERROR(
      impl_->add_match(&impl_->state_slot, kService, "VmStateChanged", &Impl::on_event_signal));
  NM_RETURN_IF_ERROR(
      impl_->add_match(&impl_->event_job_slot, kService, "JobRemoved", &Impl::on_event_signal));
  NM_RETURN_IF_ERROR(impl_->add_match(&impl_->event_health_slot, kService, "HealthChanged",
                                      &Impl::on_event_signal));
  return impl_->add_match(&impl_->event_other_slot, kService, "EventAppended",
                          &Impl::on_event_signal);
}

Result<uint64_t> BusClient::wait_event_signal(Deadline deadline) {
  for (;;) {
    NM_RETURN_IF_ERROR(impl_->drain());
    if (impl_->newest_seq > impl_->reported_seq) {
      impl_->reported_seq = impl_->newest_seq;
      return impl_->newest_seq;
    }
    if (remaining_usec(deadline) == 0) return uint64_t{0};
    const int w = sd_bus_wait(impl_->bus.get(), remaining_usec(deadline));
    if (w < 0 && w != -EINTR) return bus_status(w, nullptr, "waiting on the bus");
  }
}

Result<HealthReply> BusClient::get_health() {
  auto reply = impl_->call_manager("GetHealth", nullptr);
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  HealthReply h;
  const char *state = nullptr, *reason = nullptr;
  int maintenance = 0;
  int r = sd_bus_message_read(m, "sbst", &state, &maintenance, &reason, &h.heartbeat_seq);
  if (r < 0) return read_status(r, "GetHealth");
  h.state = state;
  h.maintenance = maintenance != 0;
  h.maintenance_reason = reason;
  r = Impl::read_checks(m, &h.checks);
  if (r < 0) return read_status(r, "GetHealth");
  return h;
}

Result<std::vector<CapacityRow>> BusClient::get_capacity() {
  auto reply = impl_->call_manager("GetCapacity", nullptr);
  if (!reply) return reply.status();
  sd_bus_message* m = reply->get();
  int r = sd_bus_message_enter_container(m, 'a', "(sttdtt)");
  if (r < 0) return read_status(r, "GetCapacity");
  std::vector<CapacityRow> rows;
  for (;;) {
    CapacityRow c;
    const char* resource = nullptr;
    r = sd_bus_message_read(m, "(sttdtt)", &resource, &c.total, &c.reserved, &c.ratio, &c.capacity,
                            &c.allocated);
    if (r < 0) return read_status(r, "GetCapacity");
    if (r == 0) break;
    c.resource = resource;
    rows.push_back(std::move(c));
  }
  return rows;
}

Status BusClient::set_maintenance(bool enabled, const std::string& reason,
                                  const std::string& request_id) {
  return impl_
      ->call_manager("SetMaintenance",
                     [&](sd_bus_message* m) {
                       return sd_bus_message_append(m, "bss", static_cast<int>(enabled),
                                                    reason.c_str(), request_id.c_str());
                     })
      .status();
}

Status BusClient::watch_node() {
  NM_RETURN_IF_ERROR(
      impl_->add_match(&impl_->heartbeat_slot, kService, "Heartbeat", &Impl::on_node_signal));
  NM_RETURN_IF_ERROR(
      impl_->add_match(&impl_->health_slot, kService, "HealthChanged", &Impl::on_node_signal));
  return impl_->add_match(&impl_->node_state_slot, kService, "VmStateChanged",
                          &Impl::on_node_signal);
}

Result<std::vector<NodeSignal>> BusClient::wait_node_signals(Deadline deadline) {
  for (;;) {
    NM_RETURN_IF_ERROR(impl_->drain());
    if (impl_->out_of_memory) return internal_error("out of memory reading signals");
    if (impl_->node_signal_error) {
      impl_->node_signal_error = false;
      return internal_error("a signal from the daemon did not have the documented signature");
    }
    if (!impl_->node_signals.empty()) {
      std::vector<NodeSignal> out;
      out.swap(impl_->node_signals);
      return out;
    }
    if (remaining_usec(deadline) == 0) return std::vector<NodeSignal>();
    const int w = sd_bus_wait(impl_->bus.get(), remaining_usec(deadline));
    if (w < 0 && w != -EINTR) return bus_status(w, nullptr, "waiting on the bus");
  }
}

}  // namespace nm::cli
