#include <algorithm>

#include "nm/health.h"

namespace nm {

std::string_view health_state_name(HealthState s) {
  switch (s) {
    case HealthState::kOk:
      return "ok";
    case HealthState::kDegraded:
      return "degraded";
    case HealthState::kFailed:
      return "failed";
  }
  return "failed";
}

void HealthModel::set_host(const std::string& name, HealthState state, std::string reason,
                           uint64_t now_us) {
  set(HealthCheck{.name = name,
                  .state = state,
                  .reason = std::move(reason),
                  .vm_id = {},
                  .changed_us = now_us});
}

void HealthModel::set_vm(const std::string& vm_id, HealthState state, std::string reason,
                         uint64_t now_us) {
  set(HealthCheck{.name = "vm:" + vm_id,
                  .state = state,
                  .reason = std::move(reason),
                  .vm_id = vm_id,
                  .changed_us = now_us});
}

void HealthModel::set(HealthCheck next) {
  const bool is_vm = !next.vm_id.empty();
  auto& table = is_vm ? vms_ : host_;
  const std::string key = is_vm ? next.vm_id : next.name;
  auto it = table.find(key);
  if (it == table.end()) {
    if (next.state == HealthState::kOk && is_vm) return;  // VM checks exist only while not ok
    if (next.state != HealthState::kOk) pending_[next.name] = next;
    table.emplace(key, std::move(next));
    return;
  }
  if (it->second.state == next.state) {
    it->second.reason = std::move(next.reason);  // refinement only: no change
    return;
  }
  pending_[next.name] = next;
  if (is_vm && next.state == HealthState::kOk) {
    table.erase(it);
  } else {
    it->second = std::move(next);
  }
}

void HealthModel::set_maintenance(bool on, std::string reason) {
  if (on != maintenance_) maintenance_changed_ = true;
  maintenance_ = on;
  maintenance_reason_ = on ? std::move(reason) : std::string();
}

HealthState HealthModel::state() const {
  HealthState worst = HealthState::kOk;
  for (const auto& [_, c] : host_) worst = std::max(worst, c.state);
  for (const auto& [_, c] : vms_)
    worst = std::max(worst, std::min(c.state, HealthState::kDegraded));
  return worst;
}

HealthSnapshot HealthModel::snapshot() const {
  HealthSnapshot s{.state = state(),
                   .maintenance = maintenance_,
                   .maintenance_reason = maintenance_reason_,
                   .heartbeat_seq = 0,
                   .checks = {}};
  s.checks.reserve(host_.size() + vms_.size());
  for (const auto& [_, c] : host_) s.checks.push_back(c);
  for (const auto& [_, c] : vms_) s.checks.push_back(c);
  return s;
}

std::optional<HealthCheck> HealthModel::check(const std::string& name) const {
  if (name.rfind("vm:", 0) == 0) {
    auto it = vms_.find(name.substr(3));
    if (it != vms_.end()) return it->second;
    return std::nullopt;
  }
  auto it = host_.find(name);
  if (it != host_.end()) return it->second;
  return std::nullopt;
}

std::optional<HealthChange> HealthModel::take_change() {
  const HealthState now = state();
  if (pending_.empty() && !maintenance_changed_ && now == reported_) return std::nullopt;
  HealthChange change{.state = now,
                      .previous = reported_,
                      .maintenance = maintenance_,
                      .changed = {},
                      .vms_affected = {}};
  for (auto& [_, c] : pending_) {
    if (!c.vm_id.empty()) change.vms_affected.push_back(c.vm_id);
    change.changed.push_back(std::move(c));
  }
  std::sort(change.vms_affected.begin(), change.vms_affected.end());
  pending_.clear();
  maintenance_changed_ = false;
  reported_ = now;
  return change;
}

}  // namespace nm
