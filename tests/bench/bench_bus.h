// sd-bus plumbing shared by the benchmark's client (lifecycle_bench) and its floor server
// (bench_floor_server): RAII handles for every sd-bus object they acquire, connecting to a bus by
// address, and the one place where sd-bus errors become nm::Status.
//
// Not a product library: it exists so the two benchmark executables measure plain sd-bus without
// any of nodemanager's own D-Bus layer in the way.
#pragma once

#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

#include <memory>
#include <string>
#include <string_view>

#include "nm/core/status.h"

namespace nm::bench {

struct BusUnref {
  void operator()(sd_bus* bus) const noexcept { sd_bus_flush_close_unref(bus); }
};
struct MessageUnref {
  void operator()(sd_bus_message* m) const noexcept { sd_bus_message_unref(m); }
};
struct SlotUnref {
  void operator()(sd_bus_slot* slot) const noexcept { sd_bus_slot_unref(slot); }
};
struct EventUnref {
  void operator()(sd_event* event) const noexcept { sd_event_unref(event); }
};
using BusPtr = std::unique_ptr<sd_bus, BusUnref>;
using MessagePtr = std::unique_ptr<sd_bus_message, MessageUnref>;
using SlotPtr = std::unique_ptr<sd_bus_slot, SlotUnref>;
using EventPtr = std::unique_ptr<sd_event, EventUnref>;

// Owns an sd_bus_error (which may hold heap strings) and frees it on destruction.
class BusError {
 public:
  BusError() = default;
  BusError(const BusError&) = delete;
  BusError& operator=(const BusError&) = delete;
  ~BusError() { sd_bus_error_free(&error_); }

  sd_bus_error* get() { return &error_; }
  const sd_bus_error* get() const { return &error_; }

 private:
  sd_bus_error error_{};  // == SD_BUS_ERROR_NULL, without its C99 compound literal
};

// The Status for a negative sd-bus return value `r` while doing `what`. When `error` carries a
// D-Bus error, its name and message are kept: "Unavailable: CreateVm: org.x.Error.Y: text".
// A nodemanager error name (org.nodemanager.NodeManager1.Error.<Name>) maps onto its Code.
Status bus_status(int r, const sd_bus_error* error, std::string_view what);

// Connects to the bus at `address` (a D-Bus address such as "unix:path=/tmp/x/bus") as a bus
// client: Hello is sent, so the connection has a unique name and may own names and add matches.
// Unavailable when the bus does not answer.
Result<BusPtr> connect_bus(const std::string& address);

}  // namespace nm::bench
