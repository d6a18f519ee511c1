// A loopback HTTP/1.1 server for image-source tests: serves the files of a directory on
// 127.0.0.1 (a port the kernel picks), one request per connection, counts requests per path and
// misbehaves on demand per path (error statuses, truncation, stalls, wrong Content-Length, slow
// rates, redirects). Each connection is served by a thread of its own; stop() (and the destructor)
// closes the listener and every open connection, which is what "the server went away mid-transfer"
// looks like to a client.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "nm/core/fs.h"

namespace nm::test {

struct HttpFault {
  int status = 200;                          // anything else: that status with a short body
  std::string location{};                    // with a 3xx status: the Location header
  std::optional<uint64_t> close_after{};     // send this many body bytes, then close
  std::optional<uint64_t> stall_after{};     // send this many body bytes, then send nothing more
  std::optional<uint64_t> content_length{};  // announce this length instead of the file's
  uint64_t bytes_per_second = 0;             // throttle the body; 0: as fast as possible
};

class HttpTestServer {
 public:
  // Serves `root` (request path "/a/b" is the file <root>/a/b). Fails the calling test's
  // assertions (and returns null) when the socket cannot be set up.
  static std::unique_ptr<HttpTestServer> start(std::string root);
  ~HttpTestServer();
  HttpTestServer(const HttpTestServer&) = delete;
  HttpTestServer& operator=(const HttpTestServer&) = delete;

  // "http://127.0.0.1:<port>/"
  std::string url() const;
  void set_fault(const std::string& path, HttpFault fault);
  void clear_faults();
  // Requests seen for `path` ("/blobs/sha256/<hex>").
  int requests(const std::string& path) const;
  // Closes the listener and every open connection; later connections are refused.
  void stop();

 private:
  HttpTestServer(std::string root, UniqueFd listener, UniqueFd wake_read, UniqueFd wake_write,
                 uint16_t port);
  void accept_loop();
  void serve(int fd);
  // Waits up to `ms` (-1: forever) for stop() or for the peer to close; true when one happened.
  bool wait_stop_or_hangup(int fd, int ms) const;
  bool send_all(int fd, const char* data, size_t len) const;

  const std::string root_;
  UniqueFd listener_;
  UniqueFd wake_read_;  // readable once stop() ran
  UniqueFd wake_write_;
  const uint16_t port_;
  std::atomic<bool> stopped_{false};
  mutable std::mutex mu_;
  std::map<std::string, HttpFault> faults_;
  std::map<std::string, int> requests_;
  std::vector<std::thread> connections_;
  std::vector<int> open_fds_;
  std::thread acceptor_;
};

}  // namespace nm::test
