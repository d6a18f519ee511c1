// The node's health model (DESIGN.md "Health"): named checks, each ok/degraded/failed with a
// reason and the time its state last changed; the node's state is derived from them.
//
// Host checks ("libvirt", "state-db", "image-disk", "uplink", "memory-pressure") describe the
// host; the node's state is the worst of them. VM checks ("vm:<id>", with vm_id set) describe one
// guest: a guest's failure is that guest's, so a failed VM check makes the node "degraded" at
// most (the fabric moves that VM, not the whole host). VM checks exist only while not ok.
//
// A change is a change of a check's *state* (or a check appearing or going away, or the
// maintenance flag flipping): a reason that only refines itself ("412 MiB free" -> "407 MiB
// free") is kept for GetHealth but raises no HealthChanged, so a slowly filling disk does not
// flood the bus.
//
// Pure logic, no I/O. Threading: owned by the event-loop thread; not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace nm {

enum class HealthState { kOk = 0, kDegraded = 1, kFailed = 2 };
std::string_view health_state_name(HealthState s);  // "ok", "degraded", "failed"

struct HealthCheck {
  std::string name;  // "libvirt", ..., or "vm:<id>"
  HealthState state = HealthState::kOk;
  std::string reason;       // why, for people ("carrier lost on 'eth1'")
  std::string vm_id;        // VM checks only
  uint64_t changed_us = 0;  // wall clock of the last state change
  bool operator==(const HealthCheck&) const = default;
};

// One HealthChanged: the node's state before and after, and the checks whose state changed since
// the previous change (a VM check that went back to ok is included with state ok, once).
struct HealthChange {
  HealthState state = HealthState::kOk;
  HealthState previous = HealthState::kOk;
  bool maintenance = false;
  std::vector<HealthCheck> changed;
  std::vector<std::string> vms_affected;  // VM ids of the VM checks in `changed`, sorted
};

struct HealthSnapshot {
  HealthState state = HealthState::kOk;
  bool maintenance = false;
  std::string maintenance_reason;
  uint64_t heartbeat_seq = 0;       // the last Heartbeat sent (set by the service)
  std::vector<HealthCheck> checks;  // host checks by name, then VM checks by id
};

class HealthModel {
 public:
  // Sets a host check. A check seen for the first time counts as a change only when not ok.
  void set_host(const std::string& name, HealthState state, std::string reason, uint64_t now_us);
  // Sets the check of one VM; ok removes it (a change when it existed).
  void set_vm(const std::string& vm_id, HealthState state, std::string reason, uint64_t now_us);
  // The VM is gone: its check, if any, goes away as a change to ok.
  void remove_vm(const std::string& vm_id, uint64_t now_us) {
    set_vm(vm_id, HealthState::kOk, "VM deleted", now_us);
  }
  void set_maintenance(bool on, std::string reason);

  HealthState state() const;
  bool maintenance() const { return maintenance_; }
  const std::string& maintenance_reason() const { return maintenance_reason_; }
  HealthSnapshot snapshot() const;
  // The current state of one check (host name or "vm:<id>"), if present.
  std::optional<HealthCheck> check(const std::string& name) const;

  // The changes since the previous take_change() (or construction), or nullopt when none.
  std::optional<HealthChange> take_change();

 private:
  void set(HealthCheck next);

  std::map<std::string, HealthCheck> host_;
  std::map<std::string, HealthCheck> vms_;  // by VM id
  bool maintenance_ = false;
  std::string maintenance_reason_;

  // Pending since the last take_change().
  std::map<std::string, HealthCheck> pending_;  // by check name
  bool maintenance_changed_ = false;
  HealthState reported_ = HealthState::kOk;  // the state the last change reported
};

}  // namespace nm
