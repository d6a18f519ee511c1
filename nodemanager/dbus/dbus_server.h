// DbusServer: the node's D-Bus API (org.nodemanager.NodeManager1) over a NodeService.
//
// The contract is org.nodemanager.NodeManager1.xml next to this file; docs/dbus-api.md explains
// every member. Objects:
//   /org/nodemanager/NodeManager1              Manager interface +
//   org.freedesktop.DBus.ObjectManager /org/nodemanager/NodeManager1/vm/<escaped id>   Vm
//   interface, one per VM the service knows /org/nodemanager/NodeManager1/job/<n>           Job
//   interface, one per queued or running job
// VM and job objects are not registered one by one: a fallback vtable per kind answers for every
// path below its prefix that names an existing VM or job (asking the service), and a node
// enumerator lists them, so introspection, GetManagedObjects and property reads always reflect
// the service's current state and there is no second registry to keep in sync.
//
// Errors: a non-OK Status from the service becomes the D-Bus error
// "org.nodemanager.NodeManager1.Error.<code_name(code)>" with the Status message.
//
// Threading: everything runs on the SdEventLoop thread, including the ServiceObserver methods
// (the service calls them there). Method handlers never block: the service is non-blocking by
// contract. No exception crosses a C frame: each callback turns one into an Internal error reply
// and a log line.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "authz.h"
#include "event_loop.h"
#include "nm/core/status.h"
#include "nm/node_service.h"

namespace nm {

inline constexpr std::string_view kBusName = "org.nodemanager.NodeManager1";
inline constexpr std::string_view kManagerPath = "/org/nodemanager/NodeManager1";
inline constexpr std::string_view kVmPathPrefix = "/org/nodemanager/NodeManager1/vm";
inline constexpr std::string_view kJobPathPrefix = "/org/nodemanager/NodeManager1/job";
inline constexpr std::string_view kManagerInterface = "org.nodemanager.NodeManager1.Manager";
inline constexpr std::string_view kVmInterface = "org.nodemanager.NodeManager1.Vm";
inline constexpr std::string_view kJobInterface = "org.nodemanager.NodeManager1.Job";
inline constexpr std::string_view kErrorPrefix = "org.nodemanager.NodeManager1.Error.";

// "/org/nodemanager/NodeManager1/vm/<id escaped by sd_bus_path_encode>".
std::string vm_object_path(std::string_view vm_id);
// "/org/nodemanager/NodeManager1/job/<id>".
std::string job_object_path(uint32_t job_id);
// "org.nodemanager.NodeManager1.Error.<code_name(code)>".
std::string dbus_error_name(Code code);

class DbusServer final : public ServiceObserver {
 public:
  // Connects to `bus`: "system", "session", or a D-Bus address ("unix:path=/run/x/bus"). Attaches
  // the connection to `loop`, enables fd passing, registers the object tree and becomes
  // `service`'s observer. Does not own the name yet (request_name()). `loop` and `service` must
  // outlive the server. Call on the loop thread or before the loop runs.
  // When the connection to the bus drops (the bus daemon went away), the loop ends with
  // exit_code() EXIT_FAILURE: a daemon without its bus cannot serve, so it exits and its
  // service manager restarts it.
  // Unavailable when the bus cannot be reached.
  // Every method call and property read is authorized from the caller's credentials (authz.h:
  // `policy`; the default lets only root and the daemon's own user in) and the decision logged.
  static Result<std::unique_ptr<DbusServer>> create(SdEventLoop& loop, const std::string& bus,
                                                    NodeService& service,
                                                    AuthzPolicy policy = default_policy());
  // Root and the daemon's effective user.
  static AuthzPolicy default_policy();

  // Detaches from the service (set_observer(nullptr)), releases every slot, then flushes queued
  // messages and closes the connection. Loop thread (or after the loop ended).
  ~DbusServer() override;
  DbusServer(const DbusServer&) = delete;
  DbusServer& operator=(const DbusServer&) = delete;

  // Owns `name` (default org.nodemanager.NodeManager1) on the bus; a synchronous round trip to the
  // bus daemon. AlreadyExists when another connection owns it, AccessDenied when the bus policy
  // forbids it. OK when this connection owns it already.
  Status request_name(std::string_view name = kBusName);

  // The unique name of this connection (":1.42"), for logs and tests.
  std::string unique_name() const;

  // ServiceObserver (loop thread).
  void on_vm_added(const VmRecord& vm) override;     // ObjectManager InterfacesAdded
  void on_vm_changed(const VmRecord& vm) override;   // PropertiesChanged (state, spec, gens)
  void on_vm_removed(const VmId& id) override;       // ObjectManager InterfacesRemoved
  void on_job_added(const JobView& job) override;    // InterfacesAdded + JobNew
  void on_job_changed(const JobView& job) override;  // PropertiesChanged (State, Progress)
  void on_job_removed(const JobView& job, const JobOutcome& outcome,
                      const EventRecord& event) override;  // JobRemoved + InterfacesRemoved
  void on_event(const EventRecord& event) override;        // VmStateChanged or EventAppended
  void on_health_changed(const HealthChange& change, const EventRecord& event) override;
  void on_heartbeat(const Heartbeat& beat) override;

 private:
  struct Impl;
  explicit DbusServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace nm
