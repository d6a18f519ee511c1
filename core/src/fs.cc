#include "nm/core/fs.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace nm {

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.release();
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

Status errno_status(int err, std::string_view what) {
  const Code code = (err == ENOENT)                   ? Code::kNotFound
                    : (err == EACCES || err == EPERM) ? Code::kAccessDenied
                    : (err == ENOSPC || err == EDQUOT || err == EIO || err == EROFS)
                        ? Code::kUnavailable
                        : Code::kInternal;
  return {code, std::string(what) + ": " + std::strerror(err)};
}

Status make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return errno_status(ec.value(), "create directory '" + path + "'");
  return Status::ok();
}

Status fsync_parent_dir(const std::string& path) {
  const auto parent = std::filesystem::path(path).parent_path();
  UniqueFd dir(::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir.valid()) return errno_status(errno, "open directory '" + parent.string() + "'");
  if (::fsync(dir.get()) != 0) return errno_status(errno, "fsync '" + parent.string() + "'");
  return Status::ok();
}

Status write_file_atomic(const std::string& path, std::string_view data) {
  const std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640));
  if (!fd.valid()) return errno_status(errno, "create '" + tmp + "'");
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = ::write(fd.get(), data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::unlink(tmp.c_str());
      return errno_status(err, "write '" + tmp + "'");
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return errno_status(err, "fsync '" + tmp + "'");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return errno_status(err, "rename to '" + path + "'");
  }
  return fsync_parent_dir(path);
}

Result<std::string> read_file(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return errno_status(errno, "open '" + path + "'");
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status(errno, "read '" + path + "'");
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

Result<FsSpace> filesystem_space(const std::string& path) {
  struct statvfs st {};
  if (::statvfs(path.c_str(), &st) != 0) return errno_status(errno, "statvfs '" + path + "'");
  return FsSpace{.total_bytes = static_cast<uint64_t>(st.f_blocks) * st.f_frsize,
                 .available_bytes = static_cast<uint64_t>(st.f_bavail) * st.f_frsize};
}

}  // namespace nm
