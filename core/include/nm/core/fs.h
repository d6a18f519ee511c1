// File-system helpers with crash-safe publication.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "nm/core/status.h"

namespace nm {

// Owns a file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd();

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }

 private:
  int fd_ = -1;
};

// An Unavailable/Internal Status for errno `err` while doing `what` ("open '/x'").
Status errno_status(int err, std::string_view what);

// mkdir -p with mode 0750 for new directories.
Status make_dirs(const std::string& path);

// Writes `data` to `path` by write-to-temp + fsync + rename + fsync(dir): readers see the old
// content or the new, never a torn file.
Status write_file_atomic(const std::string& path, std::string_view data);

// fsync()s the directory holding `path` so a rename or unlink in it is durable.
Status fsync_parent_dir(const std::string& path);

Result<std::string> read_file(const std::string& path);

struct FsSpace {
  uint64_t total_bytes = 0;
  uint64_t available_bytes = 0;  // to unprivileged writers (statvfs f_bavail)
};
// The filesystem holding `path` (statvfs).
Result<FsSpace> filesystem_space(const std::string& path);

}  // namespace nm
