// In-memory Hypervisor for unit tests of the service and reconciler.
//
// Thread-safe like the real adapter. Lifecycle events and connection changes are delivered
// synchronously on the thread that caused them (the service posts them to its loop, as it does
// for libvirt's event and reconnect threads), never with the fake's lock held. Tests can inject
// failures per operation, add foreign domains, change domains "behind our back" to simulate drift,
// crash domains with a cause, kill a domain's emulator ahead of libvirt noticing it
// (kill_emulator, then reap_emulator), set the host's size and drop or restore the connection.
//
// While disconnected (set_connected(false, ...)) every call returns Unavailable, as the real
// adapter does while libvirtd is down; injected failures are kept for later.
#pragma once

#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "nm/domain_xml.h"
#include "nm/hypervisor.h"

namespace nm::testing {

class FakeHypervisor final : public Hypervisor {
 public:
  struct Domain {
    DomainInfo info;
    std::string xml;
  };

  std::string default_domain_type() const override { return "test"; }

  Result<std::vector<DomainInfo>> list_domains() override {
    std::lock_guard lock(mu_);
    ++calls_["list_domains"];  // failed ones too: every audit's reading counts
    NM_RETURN_IF_ERROR(take_failure("list_domains"));
    std::vector<DomainInfo> out;
    for (const auto& [uuid, d] : domains_) out.push_back(d.info);
    return out;
  }

  Result<std::optional<DomainInfo>> get_domain(const VmId& id) override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("get_domain"));
    auto it = domains_.find(id.str());
    if (it == domains_.end()) return std::optional<DomainInfo>();
    return std::optional<DomainInfo>(it->second.info);
  }

  Status define_domain(const std::string& xml) override {
    DomainEvent ev;
    {
      std::lock_guard lock(mu_);
      NM_RETURN_IF_ERROR(take_failure("define_domain"));
      const auto uuid = extract(xml, "<uuid>", "</uuid>");
      const auto name = extract(xml, "<name>", "</name>");
      if (uuid.empty()) return invalid_argument("fake: domain XML without <uuid>");
      Domain& d = domains_[uuid];
      d.xml = xml;
      d.info.uuid = uuid;
      d.info.name = name;
      d.info.persistent = true;
      if (d.info.state == DomainState::kNoState) d.info.state = DomainState::kShutOff;
      const auto meta_start = xml.find("<nm:vm");
      if (meta_start != std::string::npos) {
        const auto meta_end = xml.find("/>", meta_start);
        auto owner = parse_owner_metadata(xml.substr(meta_start, meta_end + 2 - meta_start));
        if (owner.is_ok()) d.info.owner = *owner;
      }
      ++calls_["define_domain"];
      ev = {uuid, DomainEventKind::kDefined, 0, DomainCause::kOther};
    }
    emit(ev);
    return Status::ok();
  }

  Status start_domain(const VmId& id) override {
    return transition(id, "start_domain", DomainState::kRunning, DomainEventKind::kStarted,
                      DomainCause::kOther, true);
  }
  Status shutdown_domain(const VmId& id) override {
    {
      std::lock_guard lock(mu_);
      NM_RETURN_IF_ERROR(take_failure("shutdown_domain"));
      ++calls_["shutdown_domain"];
      auto it = domains_.find(id.str());
      if (it == domains_.end()) return not_found("fake: no domain '" + id.str() + "'");
      if (it->second.info.state != DomainState::kRunning) return Status::ok();
      if (ignore_acpi_) return Status::ok();  // a guest that ignores the ACPI request
    }
    return transition(id, "", DomainState::kShutOff, DomainEventKind::kStopped,
                      DomainCause::kGuestShutdown, false);
  }
  Status destroy_domain(const VmId& id) override {
    return transition(id, "destroy_domain", DomainState::kShutOff, DomainEventKind::kStopped,
                      DomainCause::kDestroyed, false);
  }
  Status reboot_domain(const VmId& id) override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("reboot_domain"));
    ++calls_["reboot_domain"];
    auto it = domains_.find(id.str());
    if (it == domains_.end()) return not_found("fake: no domain '" + id.str() + "'");
    if (it->second.info.state != DomainState::kRunning) return conflict("fake: not running");
    return Status::ok();
  }
  Status undefine_domain(const VmId& id) override {
    DomainEvent ev;
    {
      std::lock_guard lock(mu_);
      NM_RETURN_IF_ERROR(take_failure("undefine_domain"));
      ++calls_["undefine_domain"];
      emulator_dead_.erase(id.str());
      if (domains_.erase(id.str()) == 0) return Status::ok();
      ev = {id.str(), DomainEventKind::kUndefined, 0, DomainCause::kOther};
    }
    emit(ev);
    return Status::ok();
  }

  Result<std::string> create_overlay(const VmId& id, const std::string& base_path,
                                     const std::string& base_format,
                                     uint64_t capacity_bytes) override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("create_overlay"));
    ++calls_["create_overlay"];
    overlays_[id.str()] = Overlay{base_path, base_format, capacity_bytes};
    return "/fake/pool/" + id.str() + ".qcow2";
  }
  Result<std::optional<std::string>> find_overlay(const VmId& id) override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("find_overlay"));
    if (!overlays_.count(id.str())) return std::optional<std::string>();
    return std::optional<std::string>("/fake/pool/" + id.str() + ".qcow2");
  }
  Status delete_overlay(const VmId& id) override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("delete_overlay"));
    ++calls_["delete_overlay"];
    overlays_.erase(id.str());
    return Status::ok();
  }
  Result<std::vector<VmId>> list_overlays() override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("list_overlays"));
    std::vector<VmId> out;
    for (const auto& [k, v] : overlays_) out.push_back(VmId::trusted(k));
    return out;
  }

  // The values set by set_host_info (16 CPUs and 32 GiB unless changed).
  Result<HostInfo> host_info() override {
    std::lock_guard lock(mu_);
    NM_RETURN_IF_ERROR(take_failure("host_info"));
    return host_;
  }

  bool connected() const override {
    std::lock_guard lock(mu_);
    return connected_;
  }
  void set_connection_handler(ConnectionHandler handler) override {
    std::lock_guard lock(mu_);
    connection_handler_ = std::move(handler);
  }

  void set_event_handler(EventHandler handler) override {
    std::lock_guard lock(mu_);
    handler_ = std::move(handler);
  }

  // ---- test controls ----
  struct Overlay {
    std::string base_path;
    std::string base_format;
    uint64_t capacity = 0;
  };
  // The next call of `op` fails with `status`.
  void fail_next(const std::string& op, Status status) {
    std::lock_guard lock(mu_);
    failures_[op] = std::move(status);
  }
  // Every call of `op` fails with `status` until fail_always(op, ok).
  void fail_always(const std::string& op, Status status) {
    std::lock_guard lock(mu_);
    if (status.is_ok()) {
      sticky_failures_.erase(op);
    } else {
      sticky_failures_[op] = std::move(status);
    }
  }
  // Guests ignore ACPI shutdown requests (forces the stop timeout path).
  void set_ignore_acpi(bool v) {
    std::lock_guard lock(mu_);
    ignore_acpi_ = v;
  }
  // Changes a domain's state as if it happened outside nodemanager, and emits the event.
  void set_state_behind_our_back(const std::string& uuid, DomainState state, DomainEventKind kind,
                                 DomainCause cause = DomainCause::kOther) {
    {
      std::lock_guard lock(mu_);
      DomainInfo& info = domains_.at(uuid).info;
      info.state = state;
      info.cause = cause;
      if (state != DomainState::kRunning) emulator_dead_.erase(uuid);
    }
    emit({uuid, kind, 0, cause});
  }
  // The domain `uuid` (which must exist) fails as libvirt reports it: kIoError pauses it (event
  // kSuspended); every other cause shuts it off (event kStopped), as QEMU with on_crash=destroy
  // does. The domain's `cause` and the event's carry `cause`.
  void crash(const std::string& uuid, DomainCause cause) {
    if (cause == DomainCause::kIoError) {
      set_state_behind_our_back(uuid, DomainState::kPaused, DomainEventKind::kSuspended, cause);
    } else {
      set_state_behind_our_back(uuid, DomainState::kShutOff, DomainEventKind::kStopped, cause);
    }
  }
  // The QEMU of running domain `uuid` dies: kEmulatorExited (cause kEmulatorGone) is delivered
  // at once, as the adapter's pidfd watch does, while the domain stays "running", as libvirt
  // reports it until it has reaped the process. reap_emulator() ends that lag.
  void kill_emulator(const std::string& uuid) {
    {
      std::lock_guard lock(mu_);
      if (domains_.at(uuid).info.state != DomainState::kRunning) return;
      emulator_dead_.insert(uuid);
    }
    emit({uuid, DomainEventKind::kEmulatorExited, 0, DomainCause::kEmulatorGone});
  }
  // libvirt catches up with a kill_emulator(): the domain turns shut off (cause kEmulatorGone)
  // and the usual kStopped event (cause kEmulatorGone) follows. No-op without a kill before.
  void reap_emulator(const std::string& uuid) {
    {
      std::lock_guard lock(mu_);
      if (emulator_dead_.erase(uuid) == 0) return;
      DomainInfo& info = domains_.at(uuid).info;
      info.state = DomainState::kShutOff;
      info.cause = DomainCause::kEmulatorGone;
    }
    emit({uuid, DomainEventKind::kStopped, 0, DomainCause::kEmulatorGone});
  }
  // With `on`, a destroy_domain() or completed shutdown_domain() of a running domain delivers
  // kEmulatorExited before its kStopped, as the adapter does on qemu:///system (its QEMU exits).
  // Off by default.
  void set_emulator_exit_events(bool on) {
    std::lock_guard lock(mu_);
    emulator_exit_events_ = on;
  }
  // What host_info() returns from now on.
  void set_host_info(HostInfo info) {
    std::lock_guard lock(mu_);
    host_ = info;
  }
  // Drops (false) or restores (true) the connection. On a change, connected() shows the new
  // value and then the connection handler is called with (`up`, `reason`) on this thread, as the
  // adapter does on its reconnect thread; setting the current value again calls nothing.
  void set_connected(bool up, const std::string& reason = {}) {
    ConnectionHandler h;
    {
      std::lock_guard lock(mu_);
      if (connected_ == up) return;
      connected_ = up;
      h = connection_handler_;
    }
    if (h) h(up, up ? std::string() : reason);
  }
  void remove_behind_our_back(const std::string& uuid) {
    std::lock_guard lock(mu_);
    domains_.erase(uuid);
  }
  void add_foreign_domain(const std::string& uuid, const std::string& name,
                          std::optional<DomainOwner> owner = std::nullopt) {
    std::lock_guard lock(mu_);
    Domain d;
    d.info.uuid = uuid;
    d.info.name = name;
    d.info.state = DomainState::kRunning;
    d.info.owner = std::move(owner);
    domains_[uuid] = d;
  }
  std::optional<Domain> domain(const std::string& uuid) const {
    std::lock_guard lock(mu_);
    auto it = domains_.find(uuid);
    if (it == domains_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<Overlay> overlay(const std::string& uuid) const {
    std::lock_guard lock(mu_);
    auto it = overlays_.find(uuid);
    if (it == overlays_.end()) return std::nullopt;
    return it->second;
  }
  size_t domain_count() const {
    std::lock_guard lock(mu_);
    return domains_.size();
  }
  int calls(const std::string& op) const {
    std::lock_guard lock(mu_);
    auto it = calls_.find(op);
    return it == calls_.end() ? 0 : it->second;
  }

 private:
  static std::string extract(const std::string& xml, const std::string& open,
                             const std::string& close) {
    const auto a = xml.find(open);
    if (a == std::string::npos) return {};
    const auto b = xml.find(close, a);
    return xml.substr(a + open.size(), b - a - open.size());
  }
  Status take_failure(const std::string& op) {
    if (!connected_) return unavailable("fake: hypervisor disconnected during '" + op + "'");
    if (auto sticky = sticky_failures_.find(op); sticky != sticky_failures_.end()) {
      return sticky->second;
    }
    auto it = failures_.find(op);
    if (it == failures_.end()) return Status::ok();
    Status s = it->second;
    failures_.erase(it);
    return s;
  }
  Status transition(const VmId& id, const std::string& op, DomainState to, DomainEventKind kind,
                    DomainCause cause, bool must_exist) {
    DomainEvent ev;
    bool exited = false;
    {
      std::lock_guard lock(mu_);
      if (!op.empty()) {
        NM_RETURN_IF_ERROR(take_failure(op));
        ++calls_[op];
      }
      auto it = domains_.find(id.str());
      if (it == domains_.end()) {
        if (must_exist) return not_found("fake: no domain '" + id.str() + "'");
        return Status::ok();
      }
      if (it->second.info.state == to) return Status::ok();
      exited = emulator_exit_events_ && kind == DomainEventKind::kStopped &&
               it->second.info.state == DomainState::kRunning &&
               emulator_dead_.count(id.str()) == 0;
      emulator_dead_.erase(id.str());
      it->second.info.state = to;
      it->second.info.cause = cause;
      ev = {id.str(), kind, 0, cause};
    }
    if (exited) emit({id.str(), DomainEventKind::kEmulatorExited, 0, DomainCause::kEmulatorGone});
    emit(ev);
    return Status::ok();
  }
  void emit(const DomainEvent& ev) {
    EventHandler h;
    {
      std::lock_guard lock(mu_);
      h = handler_;
    }
    if (h) h(ev);
  }

  mutable std::mutex mu_;
  std::map<std::string, Domain> domains_;
  std::map<std::string, Overlay> overlays_;
  std::map<std::string, Status> failures_;
  std::map<std::string, Status> sticky_failures_;  // see fail_always()
  std::map<std::string, int> calls_;
  EventHandler handler_;
  ConnectionHandler connection_handler_;
  HostInfo host_{.cpus = 16, .memory_bytes = uint64_t{32} << 30};
  std::set<std::string> emulator_dead_;  // killed by kill_emulator, not yet reaped
  bool connected_ = true;
  bool ignore_acpi_ = false;
  bool emulator_exit_events_ = false;
};

}  // namespace nm::testing
