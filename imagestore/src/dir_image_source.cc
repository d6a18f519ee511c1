#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <vector>

#include "nm/core/fs.h"
#include "nm/imagestore/image_source.h"

namespace nm {
namespace {

namespace fs = std::filesystem;

constexpr size_t kChunkBytes = size_t{1} << 20;

class DirImageSource final : public ImageSource {
 public:
  explicit DirImageSource(fs::path root)
      : root_(std::move(root)), describe_("dir:" + root_.string()) {}

  const std::string& describe() const override { return describe_; }

  Result<ImageManifest> manifest(const ImageRef& ref) override {
    const std::string path = (root_ / ref.name / (ref.tag + ".json")).string();
    const std::string what = "manifest '" + ref.str() + "' from '" + describe_ + "'";
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      const int err = errno;
      if (err == ENOENT || err == ENOTDIR) {
        if (!root_reachable())
          return unavailable(what + ": '" + root_.string() + "' is not accessible");
        return not_found(what + ": no such tag");
      }
      return unavailable(errno_status(err, "open '" + path + "'").message());
    }
    std::string text;
    std::vector<char> buf(kMaxManifestBytes + 1);
    for (;;) {
      const ssize_t n = ::read(fd.get(), buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return unavailable(errno_status(errno, "read '" + path + "'").message());
      }
      if (n == 0) break;
      text.append(buf.data(), static_cast<size_t>(n));
      if (text.size() > kMaxManifestBytes) break;
    }
    return parse_image_manifest(text, what);
  }

  Status fetch(const Digest& digest, uint64_t size, const BlobSink& sink,
               const std::atomic<bool>* cancel) override {
    const std::string path =
        (root_ / "blobs" / "sha256" / digest.str().substr(sizeof "sha256:" - 1)).string();
    const std::string what = "blob '" + digest.str() + "' from '" + describe_ + "'";
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      const int err = errno;
      if ((err == ENOENT || err == ENOTDIR) && root_reachable()) {
        return not_found(what + ": no such blob");
      }
      return unavailable(errno_status(err, "open '" + path + "'").message());
    }
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    std::vector<uint8_t> buf(kChunkBytes);
    uint64_t done = 0;
    for (;;) {
      if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
        return conflict("cancelled");
      }
      // Read at most one byte past the manifest's size: enough to know the blob is too long.
      const uint64_t want = std::min<uint64_t>(buf.size(), size + 1 - done);
      size_t got = 0;
      while (got < want) {
        const ssize_t n = ::read(fd.get(), buf.data() + got, want - got);
        if (n < 0) {
          if (errno == EINTR) continue;
          return unavailable(errno_status(errno, "read '" + path + "'").message());
        }
        if (n == 0) break;
        got += static_cast<size_t>(n);
      }
      if (done + got > size) {
        return invalid_argument(what + " is larger than the manifest's size " +
                                std::to_string(size));
      }
      if (got > 0) {
        NM_RETURN_IF_ERROR(sink(std::span<const uint8_t>(buf.data(), got)));
        done += got;
      }
      if (got < want) break;  // end of file
    }
    if (done < size) {
      return unavailable(what + " truncated: " + std::to_string(done) + " of " +
                         std::to_string(size) + " bytes");
    }
    return Status::ok();
  }

 private:
  bool root_reachable() const {
    struct stat st {};
    return ::stat(root_.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
  }

  const fs::path root_;
  const std::string describe_;
};

}  // namespace

Result<std::unique_ptr<ImageSource>> open_dir_image_source(const std::string& root) {
  if (root.empty()) return invalid_argument("image source: the directory is empty");
  std::error_code ec;
  fs::path abs = fs::absolute(root, ec).lexically_normal();
  if (ec) return errno_status(ec.value(), "resolve image source '" + root + "'");
  if (abs.has_filename() == false && abs != abs.root_path()) abs = abs.parent_path();
  return std::unique_ptr<ImageSource>(std::make_unique<DirImageSource>(std::move(abs)));
}

}  // namespace nm
