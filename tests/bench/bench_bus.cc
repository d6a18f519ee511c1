#include "bench_bus.h"

#include <cstring>
#include <string>

namespace nm::bench {

namespace {
constexpr std::string_view kNodeManagerErrorPrefix = "org.nodemanager.NodeManager1.Error.";
}  // namespace

Status bus_status(int r, const sd_bus_error* error, std::string_view what) {
  std::string message(what);
  Code code = Code::kUnavailable;
  if (error != nullptr && sd_bus_error_is_set(error)) {
    const std::string_view name = error->name;
    if (name.starts_with(kNodeManagerErrorPrefix)) {
      code = code_from_name(name.substr(kNodeManagerErrorPrefix.size()));
    }
    message += ": ";
    message += name;
    if (error->message != nullptr) {
      message += ": ";
      message += error->message;
    }
  } else {
    message += ": ";
    message += std::strerror(-r);
  }
  return {code, std::move(message)};
}

Result<BusPtr> connect_bus(const std::string& address) {
  sd_bus* raw = nullptr;
  int r = sd_bus_new(&raw);
  if (r < 0) return bus_status(r, nullptr, "sd_bus_new");
  BusPtr bus(raw);
  r = sd_bus_set_address(bus.get(), address.c_str());
  if (r < 0) return bus_status(r, nullptr, "bus address '" + address + "'");
  r = sd_bus_set_bus_client(bus.get(), 1);
  if (r < 0) return bus_status(r, nullptr, "sd_bus_set_bus_client");
  r = sd_bus_start(bus.get());
  if (r < 0) return bus_status(r, nullptr, "connecting to '" + address + "'");
  return bus;
}

}  // namespace nm::bench
