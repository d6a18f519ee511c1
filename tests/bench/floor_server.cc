// bench_floor_server: the floor of the ListVms benchmark. A minimal sd-bus server with nothing
// behind its methods, so a round trip to it costs only the client, dbus-daemon and sd-bus.
//
//   bench_floor_server --bus ADDRESS [--sync-file PATH]
//
// Owns 'org.nodemanager.BenchFloor' and serves /org/nodemanager/BenchFloor, interface
// org.nodemanager.BenchFloor: Ping() -> (), Echo(s) -> s, List(s prefix, u n) -> a(sssstt) and,
// with --sync-file, SyncPing(u n) -> (): n 4 KiB writes to PATH, each made durable (fdatasync)
// before the next and the last before the reply; SyncPing(1) is the least a server that
// acknowledges durably must do per call.
// Runs until SIGTERM or SIGINT.
#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "bench_bus.h"
#include "nm/core/fs.h"

namespace {

constexpr const char* kName = "org.nodemanager.BenchFloor";
constexpr const char* kPath = "/org/nodemanager/BenchFloor";
constexpr const char* kInterface = "org.nodemanager.BenchFloor";

int on_ping(sd_bus_message* m, void* /*userdata*/, sd_bus_error* /*error*/) noexcept {
  return sd_bus_reply_method_return(m, "");
}

int on_echo(sd_bus_message* m, void* /*userdata*/, sd_bus_error* /*error*/) noexcept {
  const char* text = nullptr;
  const int r = sd_bus_message_read(m, "s", &text);
  if (r < 0) return r;
  return sd_bus_reply_method_return(m, "s", text);
}

// n rows shaped like nodemanagerd's ListVms rows (a 36-character id, the name '<prefix>-<i>',
// tenant, state, generation, observed generation), built from nothing: what such a reply costs on
// the bus when the server has no work to do.
int on_list(sd_bus_message* m, void* /*userdata*/, sd_bus_error* /*error*/) noexcept {
  const char* prefix = nullptr;
  uint32_t n = 0;
  int r = sd_bus_message_read(m, "su", &prefix, &n);
  if (r < 0) return r;
  sd_bus_message* raw = nullptr;
  r = sd_bus_message_new_method_return(m, &raw);
  if (r < 0) return r;
  nm::bench::MessagePtr reply(raw);
  r = sd_bus_message_open_container(reply.get(), 'a', "(sssstt)");
  for (uint32_t i = 0; r >= 0 && i < n; ++i) {
    std::array<char, 40> id{};
    std::snprintf(id.data(), id.size(), "00000000-0000-4000-8000-%012u", i);
    const std::string name = std::string(prefix) + "-" + std::to_string(i);
    r = sd_bus_message_append(reply.get(), "(sssstt)", id.data(), name.c_str(), "bench", "stopped",
                              uint64_t{1}, uint64_t{1});
  }
  if (r >= 0) r = sd_bus_message_close_container(reply.get());
  if (r >= 0) r = sd_bus_send(nullptr, reply.get(), nullptr);
  return r;
}

// The file SyncPing writes: kSyncFileBytes written and synced at start, so that every SyncPing
// overwrites one 4 KiB block (in turn, like a reused write-ahead log) without changing the file's
// size: the cheapest durable write this filesystem offers.
constexpr std::size_t kSyncBlock = 4096;
constexpr std::size_t kSyncFileBytes = std::size_t{4} << 20;

struct SyncFile {
  int fd = -1;
  std::size_t next = 0;
};

int on_sync_ping(sd_bus_message* m, void* userdata, sd_bus_error* error) noexcept {
  auto* file = static_cast<SyncFile*>(userdata);
  if (file->fd < 0) {
    return sd_bus_error_set(error, SD_BUS_ERROR_NOT_SUPPORTED,
                            "SyncPing needs bench_floor_server --sync-file PATH");
  }
  uint32_t n = 0;
  const int r = sd_bus_message_read(m, "u", &n);
  if (r < 0) return r;
  if (n < 1 || n > 16) {
    return sd_bus_error_set(error, SD_BUS_ERROR_INVALID_ARGS, "SyncPing: n must be 1..16");
  }
  std::array<char, kSyncBlock> block{};
  for (uint32_t i = 0; i < n; ++i) {
    std::snprintf(block.data(), block.size(), "sync %zu", file->next);
    const auto offset =
        static_cast<off_t>((file->next++ % (kSyncFileBytes / kSyncBlock)) * kSyncBlock);
    errno = 0;
    if (pwrite(file->fd, block.data(), block.size(), offset) !=
            static_cast<ssize_t>(block.size()) ||
        fdatasync(file->fd) != 0) {
      return sd_bus_error_set_errno(error, errno != 0 ? errno : EIO);
    }
  }
  return sd_bus_reply_method_return(m, "");
}

nm::Status open_sync_file(const std::string& path, SyncFile* file) {
  file->fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (file->fd < 0) return nm::errno_status(errno, "opening '" + path + "'");
  const std::array<char, kSyncBlock> zero{};
  for (std::size_t off = 0; off < kSyncFileBytes; off += kSyncBlock) {
    errno = 0;
    if (pwrite(file->fd, zero.data(), zero.size(), static_cast<off_t>(off)) !=
        static_cast<ssize_t>(zero.size())) {
      return nm::errno_status(errno != 0 ? errno : EIO, "filling '" + path + "'");
    }
  }
  if (fsync(file->fd) != 0) return nm::errno_status(errno, "syncing '" + path + "'");
  return nm::Status::ok();
}

const sd_bus_vtable kVtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_METHOD("Ping", "", "", on_ping, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("Echo", "s", "s", on_echo, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("List", "su", "a(sssstt)", on_list, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_METHOD("SyncPing", "u", "", on_sync_ping, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_VTABLE_END,
};

int fail(const nm::Status& s) {
  std::fprintf(stderr, "bench_floor_server: %s\n", s.to_string().c_str());
  return 1;
}

int run(const std::string& address, const std::string& sync_path) {
  SyncFile sync_file;
  if (!sync_path.empty()) {
    if (nm::Status s = open_sync_file(sync_path, &sync_file); !s.is_ok()) return fail(s);
  }

  sigset_t mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGINT);
  sigprocmask(SIG_BLOCK, &mask, nullptr);

  sd_event* raw_event = nullptr;
  int r = sd_event_new(&raw_event);
  if (r < 0) return fail(nm::bench::bus_status(r, nullptr, "sd_event_new"));
  nm::bench::EventPtr event(raw_event);
  for (const int sig : {SIGTERM, SIGINT}) {
    r = sd_event_add_signal(event.get(), nullptr, sig, nullptr, nullptr);
    if (r < 0) return fail(nm::bench::bus_status(r, nullptr, "sd_event_add_signal"));
  }

  auto bus = nm::bench::connect_bus(address);
  if (!bus.is_ok()) return fail(bus.status());
  r = sd_bus_add_object_vtable(bus->get(), nullptr, kPath, kInterface, kVtable, &sync_file);
  if (r < 0) return fail(nm::bench::bus_status(r, nullptr, "sd_bus_add_object_vtable"));
  r = sd_bus_request_name(bus->get(), kName, 0);
  if (r < 0)
    return fail(nm::bench::bus_status(r, nullptr, std::string("requesting '") + kName + "'"));
  r = sd_bus_attach_event(bus->get(), event.get(), SD_EVENT_PRIORITY_NORMAL);
  if (r < 0) return fail(nm::bench::bus_status(r, nullptr, "sd_bus_attach_event"));

  r = sd_event_loop(event.get());
  if (r < 0) return fail(nm::bench::bus_status(r, nullptr, "sd_event_loop"));
  sd_bus_detach_event(bus->get());
  if (sync_file.fd >= 0) ::close(sync_file.fd);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string address;
  std::string sync_path;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--bus" && i + 1 < argc) {
      address = argv[++i];
    } else if (arg == "--sync-file" && i + 1 < argc) {
      sync_path = argv[++i];
    } else if (arg == "--help" || arg == "-h") {
      std::printf("usage: bench_floor_server --bus ADDRESS [--sync-file PATH]\n");
      return 0;
    } else {
      std::fprintf(stderr, "bench_floor_server: unknown argument '%s'\n", argv[i]);
      return 2;
    }
  }
  if (address.empty()) {
    std::fprintf(stderr, "bench_floor_server: --bus ADDRESS is required\n");
    return 2;
  }
  return run(address, sync_path);
}
