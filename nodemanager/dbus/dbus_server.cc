#include "dbus_server.h"

#include <fcntl.h>
#include <systemd/sd-bus.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "authz.h"
#include "event_loop_internal.h"
#include "nm/core/fs.h"
#include "nm/core/log.h"

#ifndef NM_VERSION
#define NM_VERSION "0.0.0"
#endif

namespace nm {
namespace {

struct BusDeleter {
  void operator()(sd_bus* b) const { sd_bus_flush_close_unref(b); }
};
struct SlotDeleter {
  void operator()(sd_bus_slot* s) const { sd_bus_slot_unref(s); }
};
struct MessageDeleter {
  void operator()(sd_bus_message* m) const { sd_bus_message_unref(m); }
};
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
struct StrvDeleter {
  void operator()(char** v) const {
    if (v == nullptr) return;
    for (char** p = v; *p != nullptr; ++p) std::free(*p);
    std::free(v);
  }
};
struct CredsDeleter {
  void operator()(sd_bus_creds* c) const { sd_bus_creds_unref(c); }
};
using BusPtr = std::unique_ptr<sd_bus, BusDeleter>;
using CredsPtr = std::unique_ptr<sd_bus_creds, CredsDeleter>;
// Senders whose credentials are kept; the cache starts over when full.
constexpr size_t kMaxCachedCallers = 4096;
using SlotPtr = std::unique_ptr<sd_bus_slot, SlotDeleter>;
using MessagePtr = std::unique_ptr<sd_bus_message, MessageDeleter>;
using CString = std::unique_ptr<char, FreeDeleter>;
using Strv = std::unique_ptr<char*, StrvDeleter>;

// The one translation of sd-bus's negative errno returns.
Status bus_status(int r, std::string_view what) {
  if (r == -EEXIST)
    return already_exists(std::string(what) + ": the name is owned by another peer");
  return errno_status(-r, "sd-bus: " + std::string(what));
}

// A NULL-terminated malloc'd string array, as node enumerators return.
int to_strv(const std::vector<std::string>& items, char*** out) {
  Strv v(static_cast<char**>(std::calloc(items.size() + 1, sizeof(char*))));
  if (!v) return -ENOMEM;
  for (size_t i = 0; i < items.size(); ++i) {
    v.get()[i] = strdup(items[i].c_str());
    if (v.get()[i] == nullptr) return -ENOMEM;
  }
  *out = v.release();
  return 0;
}

// The external id of `path` below `prefix`, or nullopt when `path` is not directly below it.
std::optional<std::string> decode_path(const char* path, std::string_view prefix) {
  char* raw = nullptr;
  const int r = sd_bus_path_decode(path, prefix.data(), &raw);
  CString id(raw);
  if (r <= 0 || !id || *id == '\0') return std::nullopt;
  return std::string(id.get());
}

std::optional<uint32_t> decode_job_path(const char* path) {
  const std::string_view p(path);
  const std::string prefix = std::string(kJobPathPrefix) + "/";
  if (p.substr(0, prefix.size()) != prefix) return std::nullopt;
  const std::string_view digits = p.substr(prefix.size());
  uint32_t id = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), id);
  if (ec != std::errc() || end != digits.data() + digits.size()) return std::nullopt;
  if (std::to_string(id) != digits) return std::nullopt;  // one path per job: no leading zeros
  return id;
}

const char* member_of(sd_bus_message* m) {
  const char* member = sd_bus_message_get_member(m);
  return member != nullptr ? member : "?";
}

}  // namespace

std::string vm_object_path(std::string_view vm_id) {
  char* raw = nullptr;
  const int r = sd_bus_path_encode(kVmPathPrefix.data(), std::string(vm_id).c_str(), &raw);
  CString path(raw);
  if (r < 0 || !path) throw std::bad_alloc();
  return path.get();
}

std::string job_object_path(uint32_t job_id) {
  return std::string(kJobPathPrefix) + "/" + std::to_string(job_id);
}

std::string dbus_error_name(Code code) {
  return std::string(kErrorPrefix) + std::string(code_name(code));
}

struct DbusServer::Impl {
  Impl(NodeService& s, const AuthzPolicy& p) : service(s), policy(p) {}
  // Replies and signals the service still holds must not reach a destroyed server.
  ~Impl() { *alive = false; }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;

  std::shared_ptr<bool> alive = std::make_shared<bool>(true);

  NodeService& service;
  const AuthzPolicy policy;
  // Credentials per sender (unique names are never reused on a bus); dropped when the sender
  // leaves the bus (NameOwnerChanged).
  std::unordered_map<std::string, Caller> callers;
  std::shared_ptr<spdlog::logger> log = nm::logger("dbus");
  BusPtr bus;                  // declared before the slots: released after them
  std::vector<SlotPtr> slots;  // vtables, object manager, enumerators
  int in_method = 0;           // > 0 while a method handler runs
  std::vector<std::pair<const char*, std::function<void()>>> deferred;  // its signals
  // Objects whose InterfacesAdded is waiting to be sent. It reads their properties when it goes
  // out, so a PropertiesChanged queued meanwhile would repeat the same values: not sent.
  std::set<std::string> announcing;

  // A VM's changeable properties, in the order of kVmChangeable.
  struct VmValues {
    std::string state;
    std::string state_reason;
    PowerIntent power = PowerIntent::kStopped;
    VmSpec spec;
    uint64_t generation = 0;
    uint64_t observed_generation = 0;

    explicit VmValues(const VmRecord& vm)
        : state(vm.state),
          state_reason(vm.state_reason),
          power(vm.power),
          spec(vm.spec),
          generation(vm.generation),
          observed_generation(vm.observed_generation) {}

    // Bit i set: kVmChangeable[i] differs between the two.
    unsigned differences(const VmValues& o) const {
      return (state != o.state ? 1U : 0U) | (state_reason != o.state_reason ? 2U : 0U) |
             (power != o.power ? 4U : 0U) | (spec != o.spec ? 8U : 0U) |
             (generation != o.generation ? 16U : 0U) |
             (observed_generation != o.observed_generation ? 32U : 0U);
    }
  };
  static constexpr std::array<const char*, 6> kVmChangeable{
      "State", "StateReason", "DesiredPower", "Spec", "Generation", "ObservedGeneration"};
  static constexpr unsigned kAllVmChangeable = (1U << kVmChangeable.size()) - 1;

  // Per VM object path: the values of the record the service reported last, and the properties
  // that changed since the last signal that carried them. Each reported change marks what it
  // changed, even when a later one undoes it before the signal goes out: a client may have read
  // the value in between (Get, GetAll and GetManagedObjects answer from live state at once).
  // A VM's PropertiesChanged names only the marked properties, and is not sent when none is.
  struct VmSeen {
    VmValues values;
    unsigned unsent = 0;
  };
  std::unordered_map<std::string, VmSeen> vm_seen;

  // The names (nullptr-terminated, as sd_bus_emit_properties_changed_strv takes them) of the
  // properties in `mask`.
  static std::vector<const char*> vm_property_names(unsigned mask) {
    std::vector<const char*> names;
    for (size_t i = 0; i < kVmChangeable.size(); ++i) {
      if ((mask & (1U << i)) != 0) names.push_back(kVmChangeable[i]);
    }
    names.push_back(nullptr);
    return names;
  }

  // ---- helpers ----

  // Every reply leaves through here: once the state it reports is durable (group commit: the
  // service holds it until its next sync). 1 once handed over.
  int send_reply(sd_bus_message* call, MessagePtr msg) {
    std::shared_ptr<sd_bus_message> held(msg.release(), MessageDeleter());
    std::shared_ptr<sd_bus_message> to(sd_bus_message_ref(call), MessageDeleter());
    service.after_durable([this, held, to, alive = alive] {
      if (!*alive) return;
      const int r = sd_bus_send(bus.get(), held.get(), nullptr);
      if (r >= 0) return;
      log->warn("sending the reply to {} failed: {}", member_of(to.get()), std::strerror(-r));
      // The caller would otherwise wait for its timeout: tell it, if the bus still can.
      (void)sd_bus_reply_method_errno(to.get(), r, nullptr);
    });
    return 1;
  }

  template <typename... Args>
  int reply(sd_bus_message* m, const char* types, Args... args) {
    sd_bus_message* raw = nullptr;
    int r = sd_bus_message_new_method_return(m, &raw);
    MessagePtr msg(raw);
    if (r < 0) return r;
    if (types[0] != '\0') r = sd_bus_message_append(msg.get(), types, args...);
    if (r < 0) return r;
    return send_reply(m, std::move(msg));
  }

  int reply_error(sd_bus_message* m, const Status& s) {
    log->debug("{} failed: {}", member_of(m), s.to_string());
    sd_bus_message* raw = nullptr;
    const int r = sd_bus_message_new_method_errorf(m, &raw, dbus_error_name(s.code()).c_str(), "%s",
                                                   s.message().c_str());
    MessagePtr msg(raw);
    if (r < 0) return r;
    return send_reply(m, std::move(msg));
  }

  // The reply for a handler that failed with `error` (a negative errno) before replying.
  int reply_errno(sd_bus_message* m, int error) {
    sd_bus_message* raw = nullptr;
    const int r = sd_bus_message_new_method_errno(m, &raw, error, nullptr);
    MessagePtr msg(raw);
    if (r < 0) return r;
    return send_reply(m, std::move(msg));
  }

  int reply_job(sd_bus_message* m, const Result<uint32_t>& job) {
    if (!job) return reply_error(m, job.status());
    return reply(m, "o", job_object_path(*job).c_str());
  }

  // The credentials of the message's sender as the bus daemon reports them (cached per sender).
  Result<Caller> caller_of(sd_bus_message* m) {
    const char* sender = sd_bus_message_get_sender(m);
    if (sender == nullptr) return Status(Code::kAccessDenied, "the caller has no bus name");
    if (auto it = callers.find(sender); it != callers.end()) return it->second;
    sd_bus_creds* raw = nullptr;
    const int r = sd_bus_query_sender_creds(m, SD_BUS_CREDS_EUID, &raw);
    CredsPtr creds(raw);
    if (r < 0) return bus_status(r, "query the credentials of '" + std::string(sender) + "'");
    Caller caller;
    uid_t uid = 0;
    if (sd_bus_creds_get_euid(creds.get(), &uid) < 0) {
      return Status(Code::kAccessDenied, "the bus does not report the uid of the caller");
    }
    caller.uid = uid;
    // For a dbus-daemon peer sd-bus reports no groups (it could only read them from /proc, which
    // races with pid reuse); dbus-daemon knows them all, primary included (SO_PEERGROUPS): ask it.
    NM_ASSIGN_OR_RETURN(caller.gids, bus_group_ids(sender));
    if (callers.size() >= kMaxCachedCallers) callers.clear();
    callers.emplace(sender, caller);
    return caller;
  }

  // UnixGroupIDs of GetConnectionCredentials: all groups of the peer as the bus daemon saw them
  // when it connected. Empty when the bus does not report them.
  Result<std::vector<uint32_t>> bus_group_ids(const char* sender) {
    sd_bus_error error{};  // SD_BUS_ERROR_NULL
    sd_bus_message* raw = nullptr;
    int r = sd_bus_call_method(bus.get(), "org.freedesktop.DBus", "/org/freedesktop/DBus",
                               "org.freedesktop.DBus", "GetConnectionCredentials", &error, &raw,
                               "s", sender);
    MessagePtr reply(raw);
    sd_bus_error_free(&error);
    if (r < 0) return bus_status(r, "GetConnectionCredentials of '" + std::string(sender) + "'");
    std::vector<uint32_t> out;
    r = sd_bus_message_enter_container(reply.get(), 'a', "{sv}");
    while (r > 0) {
      r = sd_bus_message_enter_container(reply.get(), 'e', "sv");
      if (r <= 0) break;
      const char* key = nullptr;
      r = sd_bus_message_read(reply.get(), "s", &key);
      if (r >= 0 && key != nullptr && std::string_view(key) == "UnixGroupIDs") {
        r = sd_bus_message_enter_container(reply.get(), 'v', "au");
        const void* data = nullptr;
        size_t size = 0;
        if (r >= 0) r = sd_bus_message_read_array(reply.get(), 'u', &data, &size);
        if (r >= 0) {
          const auto* ids = static_cast<const uint32_t*>(data);
          out.assign(ids, ids + size / sizeof(uint32_t));
          r = sd_bus_message_exit_container(reply.get());
        }
      } else if (r >= 0) {
        r = sd_bus_message_skip(reply.get(), "v");
      }
      if (r >= 0) r = sd_bus_message_exit_container(reply.get());
      if (r >= 0) r = 1;
    }
    if (r < 0) return bus_status(r, "parse GetConnectionCredentials");
    return out;
  }

  // Whether the sender of `m` may call it; logs the decision (denials as warnings).
  Status authorize_call(sd_bus_message* m) {
    const char* iface = sd_bus_message_get_interface(m);
    const std::string_view member = member_of(m);
    const Access needed = access_of(iface != nullptr ? iface : "", member);
    auto caller = caller_of(m);
    if (!caller.is_ok()) {
      log->warn("denied {} ({}): {}", member, access_name(needed), caller.status().message());
      return {Code::kAccessDenied, caller.status().message()};
    }
    const Decision d = authorize(policy, *caller, needed);
    const char* sender = sd_bus_message_get_sender(m);
    if (!d.allowed) {
      log->warn("denied {} ({}) to uid {} ({})", member, access_name(needed), caller->uid,
                sender != nullptr ? sender : "?");
      return {Code::kAccessDenied, "uid " + std::to_string(caller->uid) + " may not call " +
                                       std::string(member) + " (needs " +
                                       std::string(access_name(needed)) + " access)"};
    }
    if (needed == Access::kRead) {
      log->debug("allowed {} to uid {} as {}", member, caller->uid, d.role);
    } else {
      log->info("allowed {} to uid {} as {}", member, caller->uid, d.role);
    }
    return Status::ok();
  }

  // Runs a method body; an exception becomes an Internal error reply and one log line.
  template <typename F>
  static int guard_method(void* userdata, sd_bus_message* m, F&& body) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    // Signals caused by the call go out after its reply: the caller is not kept waiting while
    // the bus routes them, and it never sees a signal about an object before the reply naming it.
    ++self->in_method;
    int r = 0;
    try {
      const Status allowed = self->authorize_call(m);
      r = allowed.is_ok() ? body(*self) : self->reply_error(m, allowed);
    } catch (const std::exception& e) {
      self->log->error("{} threw: {}", member_of(m), e.what());
      r = self->internal_error_reply(m);
    } catch (...) {
      self->log->error("{} threw a non-standard exception", member_of(m));
      r = self->internal_error_reply(m);
    }
    // A body that failed before replying: answer now, so that even the error precedes the
    // signals (sd-bus would otherwise send it after they were flushed).
    if (r < 0) r = self->reply_errno(m, r);
    --self->in_method;
    self->flush_deferred();
    return r;
  }

  int internal_error_reply(sd_bus_message* m) {
    return reply_error(m, Status(Code::kInternal, "internal error, see the node's log"));
  }

  static bool is_property_read(sd_bus_message* m) {
    return sd_bus_message_is_method_call(m, "org.freedesktop.DBus.Properties", "Get") > 0 ||
           sd_bus_message_is_method_call(m, "org.freedesktop.DBus.Properties", "GetAll") > 0 ||
           sd_bus_message_is_method_call(m, "org.freedesktop.DBus.ObjectManager",
                                         "GetManagedObjects") > 0;
  }

  // Runs a property getter body; an exception becomes an Internal error.
  template <typename F>
  static int guard_property(void* userdata, const char* property, sd_bus_error* error,
                            F&& body) noexcept {
    auto* self = static_cast<Impl*>(userdata);
    try {
      // A caller reads properties with Properties.Get/GetAll or GetManagedObjects: authorize
      // those. Getters also run while a method's signals are built (PropertiesChanged after
      // CreateVm, say): that method was authorized already, and signals are not replies.
      if (sd_bus_message* m = sd_bus_get_current_message(self->bus.get());
          m != nullptr && is_property_read(m)) {
        const Status allowed = self->authorize_call(m);
        if (!allowed.is_ok()) return set_error(error, allowed);
      }
      return body(*self);
    } catch (const std::exception& e) {
      self->log->error("reading property {} threw: {}", property, e.what());
    } catch (...) {
      self->log->error("reading property {} threw a non-standard exception", property);
    }
    return sd_bus_error_set(error, dbus_error_name(Code::kInternal).c_str(),
                            "internal error, see the node's log");
  }

  static int set_error(sd_bus_error* error, const Status& s) {
    return sd_bus_error_set(error, dbus_error_name(s.code()).c_str(), s.message().c_str());
  }

  void warn_if_failed(int r, std::string_view what, std::string_view path) {
    if (r < 0) log->warn("emitting {} for '{}' failed: {}", what, path, std::strerror(-r));
  }

  // Observer calls come from the service: a failure to signal is logged, never thrown back.
  // While a method call is being handled, emissions wait until its reply was handed over; every
  // emission waits until the state it reports is durable (NodeService::after_durable).
  void guard_observer(const char* what, const std::function<void()>& body) noexcept {
    try {
      if (in_method > 0) {
        deferred.emplace_back(what, body);
      } else {
        emit_when_durable(what, body);
      }
      return;
    } catch (...) {
      log->error("{}: cannot defer the signal; sending it now", what);
    }
    run_observer(what, body);
  }

  // Copies `body`: if holding it fails (memory), the caller still has it to send at once.
  void emit_when_durable(const char* what, const std::function<void()>& body) {
    service.after_durable([this, what, body, alive = alive] {
      if (*alive) run_observer(what, body);
    });
  }

  void run_observer(const char* what, const std::function<void()>& body) noexcept {
    try {
      body();
    } catch (const std::exception& e) {
      log->error("{} threw: {}", what, e.what());
    } catch (...) {
      log->error("{} threw a non-standard exception", what);
    }
  }

  void flush_deferred() noexcept {
    if (in_method > 0) return;
    std::vector<std::pair<const char*, std::function<void()>>> pending;
    pending.swap(deferred);
    for (auto& [what, body] : pending) {
      try {
        emit_when_durable(what, body);
      } catch (...) {
        log->error("{}: cannot defer the signal; sending it now", what);
        run_observer(what, body);
      }
    }
  }

  // InterfacesRemoved for an object the service no longer knows. The interfaces are listed
  // explicitly (the fallback vtables cannot answer for a gone object), the same set that
  // sd_bus_emit_object_added() announced.
  int emit_removed(const std::string& path, std::string_view iface) {
    return sd_bus_emit_interfaces_removed(
        bus.get(), path.c_str(), "org.freedesktop.DBus.Peer", "org.freedesktop.DBus.Introspectable",
        "org.freedesktop.DBus.Properties", iface.data(), static_cast<char*>(nullptr));
  }

  // ---- Manager methods ----

  static int create_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* spec = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &spec, &request_id);
      if (r < 0) return r;
      auto reply = self.service.create_vm(spec, request_id);
      if (!reply) return self.reply_error(m, reply.status());
      const std::string& id = reply->vm_id.str();
      return self.reply(m, "soo", id.c_str(), vm_object_path(id).c_str(),
                        job_object_path(reply->job_id).c_str());
    });
  }

  static int start_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* vm = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &vm, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.start_vm(vm, request_id));
    });
  }

  static int stop_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* vm = nullptr;
      int force = 0;  // sd-bus reads 'b' into an int
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "sbs", &vm, &force, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.stop_vm(vm, force != 0, request_id));
    });
  }

  static int reboot_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* vm = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &vm, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.reboot_vm(vm, request_id));
    });
  }

  static int delete_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* vm = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &vm, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.delete_vm(vm, request_id));
    });
  }

  static int get_vm(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* vm = nullptr;
      const int r = sd_bus_message_read(m, "s", &vm);
      if (r < 0) return r;
      auto record = self.service.get_vm(vm);
      if (!record) return self.reply_error(m, record.status());
      return self.reply(m, "s",
                        vm_record_to_json(*record, self.service.vm_ports(record->id)).c_str());
    });
  }

  static int list_vms(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* tenant = nullptr;
      int r = sd_bus_message_read(m, "s", &tenant);
      if (r < 0) return r;
      sd_bus_message* raw = nullptr;
      r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(sssstt)");
      self.service.visit_vms(tenant, [&](const VmRecord& vm) {
        if (r < 0) return;
        r = sd_bus_message_append(reply.get(), "(sssstt)", vm.id.str().c_str(),
                                  vm.spec.name.str().c_str(), vm.spec.tenant.str().c_str(),
                                  vm.state.c_str(), vm.generation, vm.observed_generation);
      });
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int create_network(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* spec = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &spec, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.create_network(spec, request_id));
    });
  }

  static int delete_network(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* name = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &name, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.delete_network(name, request_id));
    });
  }

  static int get_network(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* name = nullptr;
      const int r = sd_bus_message_read(m, "s", &name);
      if (r < 0) return r;
      auto record = self.service.get_network(name);
      if (!record) return self.reply_error(m, record.status());
      return self.reply(m, "s",
                        network_record_to_json(*record, self.service.network_ports(name)).c_str());
    });
  }

  static int list_networks(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* tenant = nullptr;
      int r = sd_bus_message_read(m, "s", &tenant);
      if (r < 0) return r;
      sd_bus_message* raw = nullptr;
      r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(sssuus)");
      for (const auto& n : self.service.list_networks(tenant)) {
        if (r < 0) break;
        const auto ports =
            static_cast<uint32_t>(self.service.network_ports(n.spec.name.str()).size());
        r = sd_bus_message_append(reply.get(), "(sssuus)", n.spec.name.str().c_str(),
                                  n.spec.tenant.str().c_str(), n.spec.subnet.str().c_str(),
                                  n.spec.vni.value(), ports, n.state.c_str());
      }
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int import_image(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* image = nullptr;
      int borrowed_fd = -1;
      const char* sha256 = nullptr;
      const char* kind = nullptr;
      const char* tenant = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "shssss", &image, &borrowed_fd, &sha256, &kind, &tenant,
                                        &request_id);
      if (r < 0) return r;
      // The message owns `borrowed_fd` and closes it when it is freed; the service keeps a copy.
      UniqueFd data(::fcntl(borrowed_fd, F_DUPFD_CLOEXEC, 3));
      if (!data.valid()) return self.reply_error(m, errno_status(errno, "duplicate the data fd"));
      return self.reply_job(
          m, self.service.import_image(image, std::move(data), sha256, kind, tenant, request_id));
    });
  }

  static int list_images(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const auto images = self.service.list_images();
      sd_bus_message* raw = nullptr;
      int r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(ssssttstbas)");
      for (size_t i = 0; r >= 0 && i < images.size(); ++i) {
        const ImageInfo& img = images[i].info;
        const std::string ref = img.ref ? img.ref->str() : std::string();
        const std::string tenant = img.tenant ? img.tenant->str() : std::string();
        const uint64_t last_used = std::max(img.imported_us, img.last_used_us);
        r = sd_bus_message_open_container(reply.get(), 'r', "ssssttstbas");
        if (r >= 0) {
          r = sd_bus_message_append(reply.get(), "ssssttstb", ref.c_str(), img.digest.str().c_str(),
                                    std::string(image_kind_name(img.kind)).c_str(),
                                    std::string(image_format_name(img.format)).c_str(), img.size,
                                    img.virtual_size, tenant.c_str(), last_used,
                                    static_cast<int>(img.pinned));
        }
        if (r >= 0) r = append_strv(reply.get(), images[i].users);
        if (r >= 0) r = sd_bus_message_close_container(reply.get());
      }
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int append_strv(sd_bus_message* msg, const std::vector<std::string>& items) {
    int r = sd_bus_message_open_container(msg, 'a', "s");
    for (size_t i = 0; r >= 0 && i < items.size(); ++i) {
      r = sd_bus_message_append(msg, "s", items[i].c_str());
    }
    if (r >= 0) r = sd_bus_message_close_container(msg);
    return r;
  }

  static int pull_image(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* image = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &image, &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.pull_image(image, request_id));
    });
  }

  static int pin_image(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* image = nullptr;
      int pinned = 0;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "sbs", &image, &pinned, &request_id);
      if (r < 0) return r;
      const Status s = self.service.pin_image(image, pinned != 0, request_id);
      if (!s) return self.reply_error(m, s);
      return self.reply(m, "");
    });
  }

  static int collect_images(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      int64_t min_age = -1;
      int dry_run = 0;
      int r = sd_bus_message_read(m, "xb", &min_age, &dry_run);
      if (r < 0) return r;
      std::optional<std::chrono::seconds> age;
      if (min_age >= 0) age = std::chrono::seconds(min_age);
      const auto plan = self.service.collect_images(age, dry_run != 0);
      if (!plan) return self.reply_error(m, plan.status());
      sd_bus_message* raw = nullptr;
      r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(sast)");
      for (size_t i = 0; r >= 0 && i < plan->remove.size(); ++i) {
        const GcCandidate& c = plan->remove[i];
        std::vector<std::string> tags;
        for (const auto& t : c.tags) tags.push_back(t.str());
        r = sd_bus_message_open_container(reply.get(), 'r', "sast");
        if (r >= 0) r = sd_bus_message_append(reply.get(), "s", c.digest.str().c_str());
        if (r >= 0) r = append_strv(reply.get(), tags);
        if (r >= 0) r = sd_bus_message_append(reply.get(), "t", c.size);
        if (r >= 0) r = sd_bus_message_close_container(reply.get());
      }
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = sd_bus_message_append(reply.get(), "t", plan->bytes);
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int verify_images(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      char** raw_images = nullptr;
      int r = sd_bus_message_read_strv(m, &raw_images);
      const Strv owned(raw_images);
      if (r < 0) return r;
      std::vector<std::string> images;
      for (char** p = owned.get(); p != nullptr && *p != nullptr; ++p) images.emplace_back(*p);
      const char* request_id = nullptr;
      r = sd_bus_message_read(m, "s", &request_id);
      if (r < 0) return r;
      return self.reply_job(m, self.service.verify_images(images, request_id));
    });
  }

  static int remove_image(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const char* image = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "ss", &image, &request_id);
      if (r < 0) return r;
      const Status s = self.service.remove_image(image, request_id);
      if (!s) return self.reply_error(m, s);
      return self.reply(m, "");
    });
  }

  static int get_events(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      uint64_t since = 0;
      uint32_t max = 0;
      int r = sd_bus_message_read(m, "tu", &since, &max);
      if (r < 0) return r;
      if (max == 0) max = kDefaultEvents;
      if (max > kMaxEvents) max = kMaxEvents;
      auto events = self.service.events_since(since, max);
      if (!events) return self.reply_error(m, events.status());
      sd_bus_message* raw = nullptr;
      r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(ttsss)");
      for (size_t i = 0; r >= 0 && i < events->size(); ++i) {
        const EventRecord& e = (*events)[i];
        r = sd_bus_message_append(reply.get(), "(ttsss)", e.seq, e.ts_us, e.kind.c_str(),
                                  e.object_id.c_str(), e.payload_json.c_str());
      }
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = sd_bus_message_append(reply.get(), "t", self.service.last_event_seq());
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  // ---- health, capacity, maintenance ----

  static int append_checks(sd_bus_message* msg, const std::vector<HealthCheck>& checks) {
    int r = sd_bus_message_open_container(msg, 'a', "(ssssx)");
    for (size_t i = 0; r >= 0 && i < checks.size(); ++i) {
      const HealthCheck& c = checks[i];
      r = sd_bus_message_append(msg, "(ssssx)", c.name.c_str(),
                                std::string(health_state_name(c.state)).c_str(), c.reason.c_str(),
                                c.vm_id.c_str(), static_cast<int64_t>(c.changed_us));
    }
    if (r >= 0) r = sd_bus_message_close_container(msg);
    return r;
  }

  static int get_health(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const HealthSnapshot h = self.service.health();
      sd_bus_message* raw = nullptr;
      int r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_append(
          reply.get(), "sbst", std::string(health_state_name(h.state)).c_str(),
          static_cast<int>(h.maintenance), h.maintenance_reason.c_str(), h.heartbeat_seq);
      if (r >= 0) r = append_checks(reply.get(), h.checks);
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int get_capacity(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const auto resources = self.service.capacity();
      sd_bus_message* raw = nullptr;
      int r = sd_bus_message_new_method_return(m, &raw);
      MessagePtr reply(raw);
      if (r < 0) return r;
      r = sd_bus_message_open_container(reply.get(), 'a', "(sttdtt)");
      for (size_t i = 0; r >= 0 && i < resources.size(); ++i) {
        const ResourceCapacity& c = resources[i];
        r = sd_bus_message_append(reply.get(), "(sttdtt)", c.resource.c_str(), c.total, c.reserved,
                                  c.ratio, c.capacity, c.allocated);
      }
      if (r >= 0) r = sd_bus_message_close_container(reply.get());
      if (r >= 0) r = self.send_reply(m, std::move(reply));
      return r;
    });
  }

  static int set_maintenance(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      int enabled = 0;
      const char* reason = nullptr;
      const char* request_id = nullptr;
      const int r = sd_bus_message_read(m, "bss", &enabled, &reason, &request_id);
      if (r < 0) return r;
      const Status s = self.service.set_maintenance(enabled != 0, reason, request_id);
      if (!s) return self.reply_error(m, s);
      return self.reply(m, "");
    });
  }

  static constexpr uint32_t kDefaultEvents = 1000;
  static constexpr uint32_t kMaxEvents = 10000;

  // ---- Manager properties ----

  static int manager_property(sd_bus*, const char*, const char*, const char* property,
                              sd_bus_message* reply, void* ud, sd_bus_error* error) noexcept {
    return guard_property(ud, property, error, [&](Impl& self) {
      const std::string_view p(property);
      if (p == "Version") return sd_bus_message_append(reply, "s", NM_VERSION);
      if (p == "LastEventSeq") {
        return sd_bus_message_append(reply, "t", self.service.durable_event_seq());
      }
      return -ENOENT;
    });
  }

  // ---- Vm objects ----

  // The VM whose id is encoded in `path`; a name encoded in a path does not resolve (one path
  // per VM).
  Result<VmRecord> vm_at(const char* path) const {
    const auto id = decode_path(path, kVmPathPrefix);
    if (!id) return not_found("no VM at '" + std::string(path) + "'");
    auto vm = service.get_vm(*id);
    if (vm && vm->id.str() != *id) return not_found("no VM with id '" + *id + "'");
    return vm;
  }

  static int find_vm(sd_bus*, const char* path, const char*, void* ud, void** found,
                     sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(ud);
    try {
      if (!self->vm_at(path)) return 0;
      *found = ud;
      return 1;
    } catch (const std::exception& e) {
      self->log->error("looking up the VM at '{}' threw: {}", path, e.what());
    } catch (...) {
      self->log->error("looking up the VM at '{}' threw a non-standard exception", path);
    }
    return 0;
  }

  static int enumerate_vms(sd_bus*, const char*, void* ud, char*** nodes, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(ud);
    try {
      std::vector<std::string> paths;
      self->service.visit_vms(
          "", [&](const VmRecord& vm) { paths.push_back(vm_object_path(vm.id.str())); });
      return to_strv(paths, nodes);
    } catch (const std::exception& e) {
      self->log->error("listing VM objects threw: {}", e.what());
    } catch (...) {
      self->log->error("listing VM objects threw a non-standard exception");
    }
    return -ENOMEM;
  }

  static int vm_property(sd_bus*, const char* path, const char*, const char* property,
                         sd_bus_message* reply, void* ud, sd_bus_error* error) noexcept {
    return guard_property(ud, property, error, [&](Impl& self) {
      const auto vm = self.vm_at(path);
      if (!vm) return set_error(error, vm.status());
      const std::string_view p(property);
      if (p == "Id") return sd_bus_message_append(reply, "s", vm->id.str().c_str());
      if (p == "Name") return sd_bus_message_append(reply, "s", vm->spec.name.str().c_str());
      if (p == "Tenant") return sd_bus_message_append(reply, "s", vm->spec.tenant.str().c_str());
      if (p == "State") return sd_bus_message_append(reply, "s", vm->state.c_str());
      if (p == "StateReason") return sd_bus_message_append(reply, "s", vm->state_reason.c_str());
      if (p == "DesiredPower") {
        return sd_bus_message_append(reply, "s", std::string(power_intent_name(vm->power)).c_str());
      }
      if (p == "Spec") return sd_bus_message_append(reply, "s", vm_spec_to_json(vm->spec).c_str());
      if (p == "Generation") return sd_bus_message_append(reply, "t", vm->generation);
      if (p == "ObservedGeneration") {
        return sd_bus_message_append(reply, "t", vm->observed_generation);
      }
      return -ENOENT;
    });
  }

  // ---- Job objects ----

  std::optional<JobView> job_at(const char* path) const {
    const auto id = decode_job_path(path);
    if (!id) return std::nullopt;
    return service.get_job(*id);
  }

  static int find_job(sd_bus*, const char* path, const char*, void* ud, void** found,
                      sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(ud);
    try {
      if (!self->job_at(path)) return 0;
      *found = ud;
      return 1;
    } catch (const std::exception& e) {
      self->log->error("looking up the job at '{}' threw: {}", path, e.what());
    } catch (...) {
      self->log->error("looking up the job at '{}' threw a non-standard exception", path);
    }
    return 0;
  }

  static int enumerate_jobs(sd_bus*, const char*, void* ud, char*** nodes, sd_bus_error*) noexcept {
    auto* self = static_cast<Impl*>(ud);
    try {
      std::vector<std::string> paths;
      for (const JobView& job : self->service.list_jobs()) paths.push_back(job_object_path(job.id));
      return to_strv(paths, nodes);
    } catch (const std::exception& e) {
      self->log->error("listing job objects threw: {}", e.what());
    } catch (...) {
      self->log->error("listing job objects threw a non-standard exception");
    }
    return -ENOMEM;
  }

  static int job_property(sd_bus*, const char* path, const char*, const char* property,
                          sd_bus_message* reply, void* ud, sd_bus_error* error) noexcept {
    return guard_property(ud, property, error, [&](Impl& self) {
      const auto job = self.job_at(path);
      if (!job) return set_error(error, not_found("no job at '" + std::string(path) + "'"));
      const std::string_view p(property);
      if (p == "Id") return sd_bus_message_append(reply, "u", job->id);
      if (p == "Kind") return sd_bus_message_append(reply, "s", job->kind.c_str());
      if (p == "ObjectId") return sd_bus_message_append(reply, "s", job->object_id.c_str());
      if (p == "State") {
        return sd_bus_message_append(reply, "s", std::string(job_state_name(job->state)).c_str());
      }
      if (p == "Progress") return sd_bus_message_append(reply, "d", job->progress);
      if (p == "BytesDone") return sd_bus_message_append(reply, "t", job->bytes_done);
      if (p == "BytesTotal") return sd_bus_message_append(reply, "t", job->bytes_total);
      return -ENOENT;
    });
  }

  static int cancel_job(sd_bus_message* m, void* ud, sd_bus_error*) noexcept {
    return guard_method(ud, m, [m](Impl& self) {
      const auto id = decode_job_path(sd_bus_message_get_path(m));
      if (!id) return self.reply_error(m, not_found("no such job"));
      const Status s = self.service.cancel_job(*id);
      if (!s) return self.reply_error(m, s);
      return self.reply(m, "");
    });
  }

  // ---- registration ----

  // Takes ownership of `slot`, which the sd_bus_add_*() call that returned `r` has just set.
  Status add_slot(int r, sd_bus_slot* slot, std::string_view what) {
    if (r < 0) return bus_status(r, what);
    slots.emplace_back(slot);
    return Status::ok();
  }

  Status register_objects();
  // Forgets the credentials of senders that left the bus (NameOwnerChanged of unique names).
  Status watch_senders();
};

namespace {

constexpr uint64_t kConst = SD_BUS_VTABLE_PROPERTY_CONST;
constexpr uint64_t kEmits = SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE;
}  // namespace

Status DbusServer::Impl::watch_senders() {
  sd_bus_slot* slot = nullptr;
  const int r = sd_bus_match_signal(
      bus.get(), &slot, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
      "NameOwnerChanged",
      [](sd_bus_message* m, void* ud, sd_bus_error*) noexcept -> int {
        const char* name = nullptr;
        const char* old_owner = nullptr;
        const char* new_owner = nullptr;
        if (sd_bus_message_read(m, "sss", &name, &old_owner, &new_owner) < 0) return 0;
        if (name != nullptr && name[0] == ':' && new_owner != nullptr && new_owner[0] == '\0') {
          static_cast<Impl*>(ud)->callers.erase(name);
        }
        return 0;
      },
      this);
  if (r < 0) return bus_status(r, "subscribe to NameOwnerChanged");
  slots.emplace_back(slot);
  return Status::ok();
}

Status DbusServer::Impl::register_objects() {
  static const sd_bus_vtable kManagerVtable[] = {
      SD_BUS_VTABLE_START(0),
      SD_BUS_METHOD_WITH_NAMES("CreateVm", "ss", SD_BUS_PARAM(spec_json) SD_BUS_PARAM(request_id),
                               "soo", SD_BUS_PARAM(vm_id) SD_BUS_PARAM(vm) SD_BUS_PARAM(job),
                               &Impl::create_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("StartVm", "ss", SD_BUS_PARAM(vm) SD_BUS_PARAM(request_id), "o",
                               SD_BUS_PARAM(job), &Impl::start_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("StopVm", "sbs",
                               SD_BUS_PARAM(vm) SD_BUS_PARAM(force) SD_BUS_PARAM(request_id), "o",
                               SD_BUS_PARAM(job), &Impl::stop_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("RebootVm", "ss", SD_BUS_PARAM(vm) SD_BUS_PARAM(request_id), "o",
                               SD_BUS_PARAM(job), &Impl::reboot_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("DeleteVm", "ss", SD_BUS_PARAM(vm) SD_BUS_PARAM(request_id), "o",
                               SD_BUS_PARAM(job), &Impl::delete_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("GetVm", "s", SD_BUS_PARAM(vm), "s", SD_BUS_PARAM(vm_json),
                               &Impl::get_vm, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("ListVms", "s", SD_BUS_PARAM(tenant), "a(sssstt)", SD_BUS_PARAM(vms),
                               &Impl::list_vms, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("ImportImage", "shssss",
                               SD_BUS_PARAM(image) SD_BUS_PARAM(data) SD_BUS_PARAM(sha256)
                                   SD_BUS_PARAM(kind) SD_BUS_PARAM(tenant) SD_BUS_PARAM(request_id),
                               "o", SD_BUS_PARAM(job), &Impl::import_image,
                               SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("ListImages", "", "", "a(ssssttstbas)", SD_BUS_PARAM(images),
                               &Impl::list_images, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("RemoveImage", "ss", SD_BUS_PARAM(image) SD_BUS_PARAM(request_id),
                               "", "", &Impl::remove_image, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("PullImage", "ss", SD_BUS_PARAM(image) SD_BUS_PARAM(request_id), "o",
                               SD_BUS_PARAM(job), &Impl::pull_image, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("PinImage", "sbs",
                               SD_BUS_PARAM(image) SD_BUS_PARAM(pinned) SD_BUS_PARAM(request_id),
                               "", "", &Impl::pin_image, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("CollectImages", "xb", SD_BUS_PARAM(min_age) SD_BUS_PARAM(dry_run),
                               "a(sast)t", SD_BUS_PARAM(removed) SD_BUS_PARAM(bytes),
                               &Impl::collect_images, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("VerifyImages", "ass", SD_BUS_PARAM(images) SD_BUS_PARAM(request_id),
                               "o", SD_BUS_PARAM(job), &Impl::verify_images,
                               SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES(
          "CreateNetwork", "ss", SD_BUS_PARAM(spec_json) SD_BUS_PARAM(request_id), "o",
          SD_BUS_PARAM(job), &Impl::create_network, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("DeleteNetwork", "ss", SD_BUS_PARAM(name) SD_BUS_PARAM(request_id),
                               "o", SD_BUS_PARAM(job), &Impl::delete_network,
                               SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("GetNetwork", "s", SD_BUS_PARAM(name), "s",
                               SD_BUS_PARAM(network_json), &Impl::get_network,
                               SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("ListNetworks", "s", SD_BUS_PARAM(tenant), "a(sssuus)",
                               SD_BUS_PARAM(networks), &Impl::list_networks,
                               SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("GetEvents", "tu", SD_BUS_PARAM(since) SD_BUS_PARAM(max),
                               "a(ttsss)t", SD_BUS_PARAM(events) SD_BUS_PARAM(last_seq),
                               &Impl::get_events, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("GetHealth", "", "", "sbsta(ssssx)",
                               SD_BUS_PARAM(state) SD_BUS_PARAM(maintenance)
                                   SD_BUS_PARAM(maintenance_reason) SD_BUS_PARAM(heartbeat_seq)
                                       SD_BUS_PARAM(checks),
                               &Impl::get_health, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("GetCapacity", "", "", "a(sttdtt)", SD_BUS_PARAM(resources),
                               &Impl::get_capacity, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_METHOD_WITH_NAMES("SetMaintenance", "bss",
                               SD_BUS_PARAM(enabled) SD_BUS_PARAM(reason) SD_BUS_PARAM(request_id),
                               "", "", &Impl::set_maintenance, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_SIGNAL_WITH_NAMES("HealthChanged", "tssba(ssssx)as",
                               SD_BUS_PARAM(seq) SD_BUS_PARAM(state) SD_BUS_PARAM(previous_state)
                                   SD_BUS_PARAM(maintenance) SD_BUS_PARAM(changed)
                                       SD_BUS_PARAM(vms_affected),
                               0),
      SD_BUS_SIGNAL_WITH_NAMES("Heartbeat", "txsba{st}",
                               SD_BUS_PARAM(seq) SD_BUS_PARAM(timestamp_us) SD_BUS_PARAM(state)
                                   SD_BUS_PARAM(maintenance) SD_BUS_PARAM(summary),
                               0),
      SD_BUS_SIGNAL_WITH_NAMES("EventAppended", "tss",
                               SD_BUS_PARAM(seq) SD_BUS_PARAM(kind) SD_BUS_PARAM(object_id), 0),
      SD_BUS_SIGNAL_WITH_NAMES("VmStateChanged", "tssss",
                               SD_BUS_PARAM(seq) SD_BUS_PARAM(vm_id) SD_BUS_PARAM(name)
                                   SD_BUS_PARAM(state) SD_BUS_PARAM(reason),
                               0),
      SD_BUS_SIGNAL_WITH_NAMES(
          "JobNew", "uoss",
          SD_BUS_PARAM(job_id) SD_BUS_PARAM(job) SD_BUS_PARAM(kind) SD_BUS_PARAM(object_id), 0),
      SD_BUS_SIGNAL_WITH_NAMES("JobRemoved", "tuosssss",
                               SD_BUS_PARAM(seq) SD_BUS_PARAM(job_id) SD_BUS_PARAM(job)
                                   SD_BUS_PARAM(kind) SD_BUS_PARAM(object_id) SD_BUS_PARAM(result)
                                       SD_BUS_PARAM(error_name) SD_BUS_PARAM(error_message),
                               0),
      SD_BUS_PROPERTY("Version", "s", &Impl::manager_property, 0, kConst),
      // Changes with every event; clients follow the seq carried by the signals instead.
      SD_BUS_PROPERTY("LastEventSeq", "t", &Impl::manager_property, 0, 0),
      SD_BUS_VTABLE_END,
  };
  static const sd_bus_vtable kVmVtable[] = {
      SD_BUS_VTABLE_START(0),
      SD_BUS_PROPERTY("Id", "s", &Impl::vm_property, 0, kConst),
      SD_BUS_PROPERTY("Name", "s", &Impl::vm_property, 0, kConst),
      SD_BUS_PROPERTY("Tenant", "s", &Impl::vm_property, 0, kConst),
      SD_BUS_PROPERTY("State", "s", &Impl::vm_property, 0, kEmits),
      SD_BUS_PROPERTY("StateReason", "s", &Impl::vm_property, 0, kEmits),
      SD_BUS_PROPERTY("DesiredPower", "s", &Impl::vm_property, 0, kEmits),
      SD_BUS_PROPERTY("Spec", "s", &Impl::vm_property, 0, kEmits),
      SD_BUS_PROPERTY("Generation", "t", &Impl::vm_property, 0, kEmits),
      SD_BUS_PROPERTY("ObservedGeneration", "t", &Impl::vm_property, 0, kEmits),
      SD_BUS_VTABLE_END,
  };
  static const sd_bus_vtable kJobVtable[] = {
      SD_BUS_VTABLE_START(0),
      SD_BUS_METHOD("Cancel", "", "", &Impl::cancel_job, SD_BUS_VTABLE_UNPRIVILEGED),
      SD_BUS_PROPERTY("Id", "u", &Impl::job_property, 0, kConst),
      SD_BUS_PROPERTY("Kind", "s", &Impl::job_property, 0, kConst),
      SD_BUS_PROPERTY("ObjectId", "s", &Impl::job_property, 0, kConst),
      SD_BUS_PROPERTY("State", "s", &Impl::job_property, 0, kEmits),
      SD_BUS_PROPERTY("Progress", "d", &Impl::job_property, 0, kEmits),
      SD_BUS_PROPERTY("BytesDone", "t", &Impl::job_property, 0, kEmits),
      SD_BUS_PROPERTY("BytesTotal", "t", &Impl::job_property, 0, kEmits),
      SD_BUS_VTABLE_END,
  };

  sd_bus* b = bus.get();
  sd_bus_slot* slot = nullptr;
  int r = sd_bus_add_object_vtable(b, &slot, kManagerPath.data(), kManagerInterface.data(),
                                   kManagerVtable, this);
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the Manager object"));
  r = sd_bus_add_object_manager(b, &slot, kManagerPath.data());
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the object manager"));
  r = sd_bus_add_fallback_vtable(b, &slot, kVmPathPrefix.data(), kVmInterface.data(), kVmVtable,
                                 &Impl::find_vm, this);
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the Vm objects"));
  r = sd_bus_add_node_enumerator(b, &slot, kVmPathPrefix.data(), &Impl::enumerate_vms, this);
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the Vm enumerator"));
  r = sd_bus_add_fallback_vtable(b, &slot, kJobPathPrefix.data(), kJobInterface.data(), kJobVtable,
                                 &Impl::find_job, this);
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the Job objects"));
  r = sd_bus_add_node_enumerator(b, &slot, kJobPathPrefix.data(), &Impl::enumerate_jobs, this);
  NM_RETURN_IF_ERROR(add_slot(r, slot, "register the Job enumerator"));
  return Status::ok();
}

DbusServer::DbusServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

DbusServer::~DbusServer() {
  impl_->service.set_observer(nullptr);
  impl_->slots.clear();
  impl_->bus.reset();
}

Result<std::unique_ptr<DbusServer>> DbusServer::create(SdEventLoop& loop, const std::string& bus,
                                                       NodeService& service, AuthzPolicy policy) {
  auto impl = std::make_unique<Impl>(service, policy);
  sd_bus* raw = nullptr;
  if (bus == "system" || bus == "session") {
    const int r = bus == "system" ? sd_bus_open_system(&raw) : sd_bus_open_user(&raw);
    impl->bus.reset(raw);
    if (r < 0) return bus_status(r, "connect to the " + bus + " bus");
  } else {
    int r = sd_bus_new(&raw);
    impl->bus.reset(raw);
    if (r < 0) return bus_status(r, "create a bus connection");
    r = sd_bus_set_address(raw, bus.c_str());
    if (r < 0) return invalid_argument("bus address '" + bus + "' is not a D-Bus address");
    r = sd_bus_set_bus_client(raw, 1);
    if (r >= 0) r = sd_bus_negotiate_fds(raw, 1);
    if (r >= 0) r = sd_bus_start(raw);
    if (r < 0) return bus_status(r, "connect to '" + bus + "'");
  }
  int r = sd_bus_attach_event(impl->bus.get(), SdEventLoopAccess::event(loop),
                              SD_EVENT_PRIORITY_NORMAL);
  if (r < 0) return bus_status(r, "attach the bus to the event loop");
  r = sd_bus_set_exit_on_disconnect(impl->bus.get(), 1);
  if (r < 0) return bus_status(r, "set exit-on-disconnect");
  NM_RETURN_IF_ERROR(impl->register_objects());
  NM_RETURN_IF_ERROR(impl->watch_senders());
  std::unique_ptr<DbusServer> server(new DbusServer(std::move(impl)));
  service.set_observer(server.get());
  return server;
}

AuthzPolicy DbusServer::default_policy() {
  AuthzPolicy p;
  p.self_uid = ::geteuid();
  return p;
}

Status DbusServer::request_name(std::string_view name) {
  const int r = sd_bus_request_name(impl_->bus.get(), std::string(name).c_str(), 0);
  if (r == -EALREADY) return Status::ok();
  if (r < 0) return bus_status(r, "own the name '" + std::string(name) + "'");
  impl_->log->info("owning '{}' on the bus", name);
  return Status::ok();
}

std::string DbusServer::unique_name() const {
  const char* name = nullptr;
  if (sd_bus_get_unique_name(impl_->bus.get(), &name) < 0 || name == nullptr) return {};
  return name;
}

void DbusServer::on_vm_added(const VmRecord& vm) {
  const std::string path = vm_object_path(vm.id.str());
  impl_->announcing.insert(path);
  impl_->vm_seen.insert_or_assign(path, Impl::VmSeen{Impl::VmValues(vm), 0});
  impl_->guard_observer("on_vm_added", [this, path, id = vm.id.str()] {
    impl_->announcing.erase(path);
    // Held until durable, this runs later: a VM removed meanwhile is announced by its removal.
    if (!impl_->service.get_vm(id).is_ok()) return;
    const int r = sd_bus_emit_object_added(impl_->bus.get(), path.c_str());
    impl_->warn_if_failed(r, "InterfacesAdded", path);
    // Sent, it carried every value of this moment; not sent, the next signal must carry them.
    if (auto it = impl_->vm_seen.find(path); it != impl_->vm_seen.end()) {
      it->second.unsent = r >= 0 ? 0 : Impl::kAllVmChangeable;
    }
  });
}

void DbusServer::on_vm_changed(const VmRecord& vm) {
  const std::string path = vm_object_path(vm.id.str());
  Impl::VmValues values(vm);
  unsigned changed = Impl::kAllVmChangeable;  // a VM not reported before: all of them
  auto seen = impl_->vm_seen.find(path);
  if (seen != impl_->vm_seen.end()) {
    changed = seen->second.values.differences(values);
    seen->second.values = std::move(values);
  } else {
    seen = impl_->vm_seen.emplace(path, Impl::VmSeen{std::move(values), 0}).first;
  }
  if (impl_->announcing.count(path)) return;  // its InterfacesAdded will carry the change
  unsigned& unsent = seen->second.unsent;
  if ((changed | unsent) == 0) return;  // nothing a client can see, nothing left from a failure
  unsent |= changed;
  impl_->guard_observer("on_vm_changed", [this, path, id = vm.id.str()] {
    if (!impl_->service.get_vm(id).is_ok()) return;  // removed meanwhile
    auto it = impl_->vm_seen.find(path);
    if (it == impl_->vm_seen.end() || it->second.unsent == 0) return;  // sent by an earlier one
    std::vector<const char*> names = Impl::vm_property_names(it->second.unsent);
    // The values are read now: the latest ones.
    const int r = sd_bus_emit_properties_changed_strv(
        impl_->bus.get(), path.c_str(), kVmInterface.data(), const_cast<char**>(names.data()));
    impl_->warn_if_failed(r, "PropertiesChanged", path);
    if (r >= 0) it->second.unsent = 0;
  });
}

void DbusServer::on_vm_removed(const VmId& id) {
  impl_->vm_seen.erase(vm_object_path(id.str()));
  impl_->guard_observer("on_vm_removed", [=, this] {
    const std::string path = vm_object_path(id.str());
    impl_->warn_if_failed(impl_->emit_removed(path, kVmInterface), "InterfacesRemoved", path);
  });
}

void DbusServer::on_job_added(const JobView& job) {
  const std::string path = job_object_path(job.id);
  impl_->announcing.insert(path);
  impl_->guard_observer("on_job_added", [=, this] {
    impl_->announcing.erase(path);
    if (impl_->service.get_job(job.id)) {  // else it ended meanwhile: JobRemoved follows
      impl_->warn_if_failed(sd_bus_emit_object_added(impl_->bus.get(), path.c_str()),
                            "InterfacesAdded", path);
    }
    impl_->warn_if_failed(sd_bus_emit_signal(impl_->bus.get(), kManagerPath.data(),
                                             kManagerInterface.data(), "JobNew", "uoss", job.id,
                                             path.c_str(), job.kind.c_str(), job.object_id.c_str()),
                          "JobNew", path);
  });
}

void DbusServer::on_job_changed(const JobView& job) {
  const std::string path = job_object_path(job.id);
  if (impl_->announcing.count(path)) return;  // its InterfacesAdded will carry the change
  impl_->guard_observer("on_job_changed", [=, this] {
    if (!impl_->service.get_job(job.id)) return;  // ended meanwhile
    impl_->warn_if_failed(sd_bus_emit_properties_changed(
                              impl_->bus.get(), path.c_str(), kJobInterface.data(), "State",
                              "Progress", "BytesDone", "BytesTotal", static_cast<char*>(nullptr)),
                          "PropertiesChanged", path);
  });
}

void DbusServer::on_job_removed(const JobView& job, const JobOutcome& outcome,
                                const EventRecord& event) {
  impl_->guard_observer("on_job_removed", [=, this] {
    const std::string path = job_object_path(job.id);
    const std::string error_name =
        outcome.error.is_ok() ? std::string() : dbus_error_name(outcome.error.code());
    impl_->warn_if_failed(
        sd_bus_emit_signal(impl_->bus.get(), kManagerPath.data(), kManagerInterface.data(),
                           "JobRemoved", "tuosssss", event.seq, job.id, path.c_str(),
                           job.kind.c_str(), job.object_id.c_str(), outcome.result.c_str(),
                           error_name.c_str(), outcome.error.message().c_str()),
        "JobRemoved", path);
    impl_->warn_if_failed(impl_->emit_removed(path, kJobInterface), "InterfacesRemoved", path);
  });
}

void DbusServer::on_event(const EventRecord& event) {
  // These have their own signals, sent by on_job_removed() and on_health_changed().
  if (event.kind == "JobRemoved" || event.kind == "HealthChanged") return;
  if (event.kind != "VmStateChanged") {
    // Events without a signal of their own (networks, images, orphans): one generic signal so
    // that followers learn about them at once.
    impl_->guard_observer("on_event", [=, this] {
      impl_->warn_if_failed(
          sd_bus_emit_signal(impl_->bus.get(), kManagerPath.data(), kManagerInterface.data(),
                             "EventAppended", "tss", event.seq, event.kind.c_str(),
                             event.object_id.c_str()),
          "EventAppended", event.object_id);
    });
    return;
  }
  impl_->guard_observer("on_event", [=, this] {
    const auto payload = nlohmann::json::parse(event.payload_json, nullptr, false);
    if (!payload.is_object()) {
      impl_->log->warn("event {} has a payload that is not a JSON object; signal sent without it",
                       event.seq);
    }
    const auto field = [&payload](const char* key) -> std::string {
      if (!payload.is_object()) return {};
      const auto it = payload.find(key);
      return it != payload.end() && it->is_string() ? it->get<std::string>() : std::string();
    };
    impl_->warn_if_failed(
        sd_bus_emit_signal(impl_->bus.get(), kManagerPath.data(), kManagerInterface.data(),
                           "VmStateChanged", "tssss", event.seq, event.object_id.c_str(),
                           field("name").c_str(), field("state").c_str(), field("reason").c_str()),
        "VmStateChanged", event.object_id);
  });
}

void DbusServer::on_health_changed(const HealthChange& change, const EventRecord& event) {
  impl_->guard_observer("on_health_changed", [=, this] {
    sd_bus_message* raw = nullptr;
    int r = sd_bus_message_new_signal(impl_->bus.get(), &raw, kManagerPath.data(),
                                      kManagerInterface.data(), "HealthChanged");
    const MessagePtr msg(raw);
    if (r >= 0) {
      r = sd_bus_message_append(msg.get(), "tssb", event.seq,
                                std::string(health_state_name(change.state)).c_str(),
                                std::string(health_state_name(change.previous)).c_str(),
                                static_cast<int>(change.maintenance));
    }
    if (r >= 0) r = Impl::append_checks(msg.get(), change.changed);
    if (r >= 0) r = Impl::append_strv(msg.get(), change.vms_affected);
    if (r >= 0) r = sd_bus_send(impl_->bus.get(), msg.get(), nullptr);
    impl_->warn_if_failed(r, "HealthChanged", "node");
  });
}

void DbusServer::on_heartbeat(const Heartbeat& beat) {
  impl_->guard_observer("on_heartbeat", [=, this] {
    sd_bus_message* raw = nullptr;
    int r = sd_bus_message_new_signal(impl_->bus.get(), &raw, kManagerPath.data(),
                                      kManagerInterface.data(), "Heartbeat");
    const MessagePtr msg(raw);
    if (r >= 0) {
      r = sd_bus_message_append(
          msg.get(), "txsb", beat.seq, static_cast<int64_t>(beat.timestamp_us),
          std::string(health_state_name(beat.state)).c_str(), static_cast<int>(beat.maintenance));
    }
    if (r >= 0) r = sd_bus_message_open_container(msg.get(), 'a', "{st}");
    for (auto it = beat.summary.begin(); r >= 0 && it != beat.summary.end(); ++it) {
      r = sd_bus_message_append(msg.get(), "{st}", it->first.c_str(), it->second);
    }
    if (r >= 0) r = sd_bus_message_close_container(msg.get());
    if (r >= 0) r = sd_bus_send(impl_->bus.get(), msg.get(), nullptr);
    impl_->warn_if_failed(r, "Heartbeat", "node");
  });
}

}  // namespace nm
