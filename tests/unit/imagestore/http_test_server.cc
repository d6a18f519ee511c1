#include "http_test_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>

namespace nm::test {

std::unique_ptr<HttpTestServer> HttpTestServer::start(std::string root) {
  UniqueFd listener(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(listener.valid());
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listener.get(), 64) != 0) {
    ADD_FAILURE() << "bind/listen on 127.0.0.1: " << std::strerror(errno);
    return nullptr;
  }
  socklen_t len = sizeof addr;
  EXPECT_EQ(::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&addr), &len), 0);
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe2: " << std::strerror(errno);
    return nullptr;
  }
  std::unique_ptr<HttpTestServer> server(
      new HttpTestServer(std::move(root), std::move(listener), UniqueFd(pipe_fds[0]),
                         UniqueFd(pipe_fds[1]), ntohs(addr.sin_port)));
  server->acceptor_ = std::thread([s = server.get()] { s->accept_loop(); });
  return server;
}

HttpTestServer::HttpTestServer(std::string root, UniqueFd listener, UniqueFd wake_read,
                               UniqueFd wake_write, uint16_t port)
    : root_(std::move(root)),
      listener_(std::move(listener)),
      wake_read_(std::move(wake_read)),
      wake_write_(std::move(wake_write)),
      port_(port) {}

HttpTestServer::~HttpTestServer() {
  stop();
}

std::string HttpTestServer::url() const {
  return "http://127.0.0.1:" + std::to_string(port_) + "/";
}

void HttpTestServer::set_fault(const std::string& path, HttpFault fault) {
  std::lock_guard lock(mu_);
  faults_[path] = std::move(fault);
}

void HttpTestServer::clear_faults() {
  std::lock_guard lock(mu_);
  faults_.clear();
}

int HttpTestServer::requests(const std::string& path) const {
  std::lock_guard lock(mu_);
  const auto it = requests_.find(path);
  return it == requests_.end() ? 0 : it->second;
}

void HttpTestServer::stop() {
  if (stopped_.exchange(true)) return;
  const char byte = 'x';
  (void)!::write(wake_write_.get(), &byte, 1);
  if (acceptor_.joinable()) acceptor_.join();
  std::vector<std::thread> threads;
  {
    std::lock_guard lock(mu_);
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
    threads.swap(connections_);
  }
  for (std::thread& t : threads) t.join();
  listener_ = UniqueFd();
}

void HttpTestServer::accept_loop() {
  for (;;) {
    pollfd fds[2] = {{listener_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[1].revents != 0) return;
    const int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    std::lock_guard lock(mu_);
    open_fds_.push_back(fd);
    connections_.emplace_back([this, fd] { serve(fd); });
  }
}

bool HttpTestServer::wait_stop_or_hangup(int fd, int ms) const {
  pollfd fds[2] = {{fd, POLLIN | POLLRDHUP, 0}, {wake_read_.get(), POLLIN, 0}};
  const int n = ::poll(fds, 2, ms);
  return n != 0;
}

bool HttpTestServer::send_all(int fd, const char* data, size_t len) const {
  size_t off = 0;
  while (off < len) {
    const ssize_t n = ::send(fd, data + off, len - off, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    off += static_cast<size_t>(n);
  }
  return true;
}

void HttpTestServer::serve(int fd) {
  const auto finish = [&] {
    std::lock_guard lock(mu_);
    ::close(fd);
    open_fds_.erase(std::find(open_fds_.begin(), open_fds_.end(), fd));
  };
  std::string request;
  char buf[4096];
  while (request.find("\r\n\r\n") == std::string::npos && request.size() < 65536) {
    pollfd fds[2] = {{fd, POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    if (::poll(fds, 2, 10000) <= 0 || fds[1].revents != 0) return finish();
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return finish();
    request.append(buf, static_cast<size_t>(n));
  }
  std::istringstream line(request.substr(0, request.find("\r\n")));
  std::string method;
  std::string path;
  line >> method >> path;

  HttpFault fault;
  {
    std::lock_guard lock(mu_);
    ++requests_[path];
    if (auto it = faults_.find(path); it != faults_.end()) fault = it->second;
  }
  std::string body;
  bool found = false;
  if (method == "GET" && path.starts_with('/') && path.find("..") == std::string::npos) {
    std::ifstream in(root_ + path, std::ios::binary);
    if (in) {
      std::ostringstream content;
      content << in.rdbuf();
      body = content.str();
      found = true;
    }
  }
  if (fault.status == 200 && !found) fault.status = 404;
  if (fault.status != 200) {
    std::string head = "HTTP/1.1 " + std::to_string(fault.status) + " Test\r\n";
    if (!fault.location.empty()) head += "Location: " + fault.location + "\r\n";
    head += "Content-Length: 6\r\nConnection: close\r\n\r\nerror\n";
    send_all(fd, head.data(), head.size());
    return finish();
  }
  const uint64_t announced = fault.content_length.value_or(body.size());
  const std::string head =
      "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
      "Content-Length: " +
      std::to_string(announced) + "\r\nConnection: close\r\n\r\n";
  if (!send_all(fd, head.data(), head.size())) return finish();

  uint64_t limit = body.size();
  if (fault.close_after) limit = std::min<uint64_t>(limit, *fault.close_after);
  if (fault.stall_after) limit = std::min<uint64_t>(limit, *fault.stall_after);
  constexpr size_t kPiece = size_t{16} * 1024;
  const auto started = std::chrono::steady_clock::now();
  uint64_t sent = 0;
  while (sent < limit) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kPiece, limit - sent));
    if (!send_all(fd, body.data() + sent, n)) return finish();
    sent += n;
    if (fault.bytes_per_second != 0) {
      const auto due =
          started + std::chrono::microseconds(sent * 1'000'000 / fault.bytes_per_second);
      const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(
          due - std::chrono::steady_clock::now());
      if (wait.count() > 0 && wait_stop_or_hangup(fd, static_cast<int>(wait.count()))) {
        return finish();
      }
    }
  }
  if (fault.stall_after && sent < body.size()) wait_stop_or_hangup(fd, -1);
  finish();
}

}  // namespace nm::test
