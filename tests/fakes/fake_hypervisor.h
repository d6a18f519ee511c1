// In-memory Hypervisor for unit tests of the service and reconciler.
//
// Thread-safe like the real adapter. Lifecycle events are delivered synchronously on the thread
// that caused them (the service posts them to its loop, as it does for libvirt's event thread).
// Tests can inject failures per operation, add foreign domains, and change domains "behind our
// back" to simulate drift.
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
      ev = {uuid, DomainEventKind::kDefined, 0};
    }
    emit(ev);
    return Status::ok();
  }

  Status start_domain(const VmId& id) override {
    return transition(id, "start_domain", DomainState::kRunning, DomainEventKind::kStarted, true);
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
    return transition(id, "", DomainState::kShutOff, DomainEventKind::kStopped, false);
  }
  Status destroy_domain(const VmId& id) override {
    return transition(id, "destroy_domain", DomainState::kShutOff, DomainEventKind::kStopped,
                      false);
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
      if (domains_.erase(id.str()) == 0) return Status::ok();
      ev = {id.str(), DomainEventKind::kUndefined, 0};
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
  // Guests ignore ACPI shutdown requests (forces the stop timeout path).
  void set_ignore_acpi(bool v) {
    std::lock_guard lock(mu_);
    ignore_acpi_ = v;
  }
  // Changes a domain's state as if it happened outside nodemanager, and emits the event.
  void set_state_behind_our_back(const std::string& uuid, DomainState state, DomainEventKind kind) {
    {
      std::lock_guard lock(mu_);
      domains_.at(uuid).info.state = state;
    }
    emit({uuid, kind, 0});
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
    auto it = failures_.find(op);
    if (it == failures_.end()) return Status::ok();
    Status s = it->second;
    failures_.erase(it);
    return s;
  }
  Status transition(const VmId& id, const std::string& op, DomainState to, DomainEventKind kind,
                    bool must_exist) {
    DomainEvent ev;
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
      it->second.info.state = to;
      ev = {id.str(), kind, 0};
    }
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
  std::map<std::string, int> calls_;
  EventHandler handler_;
  bool ignore_acpi_ = false;
};

}  // namespace nm::testing
