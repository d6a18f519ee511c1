#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "nm/core/fs.h"
#include "nm/core/log.h"
#include "nm/imagestore/image_format.h"
#include "nm/imagestore/image_store.h"

namespace nm {

std::string_view image_kind_name(ImageKind k) {
  switch (k) {
    case ImageKind::kDisk:
      return "disk";
    case ImageKind::kKernel:
      return "kernel";
    case ImageKind::kInitrd:
      return "initrd";
  }
  return "disk";
}

Result<ImageKind> parse_image_kind(std::string_view s, std::string_view field) {
  for (ImageKind k : {ImageKind::kDisk, ImageKind::kKernel, ImageKind::kInitrd}) {
    if (s == image_kind_name(k)) return k;
  }
  return invalid_argument(std::string(field) + ": '" + std::string(s) +
                          "' is not an image kind (disk, kernel or initrd)");
}

std::string_view image_format_name(ImageFormat f) {
  return f == ImageFormat::kQcow2 ? "qcow2" : "raw";
}

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr size_t kChunkBytes = size_t{1} << 20;
constexpr std::string_view kDigestPrefix = "sha256:";

struct EvpMdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, EvpMdCtxDeleter>;

// A file under tmp/ that is unlinked on destruction unless it was published.
class TempFile {
 public:
  TempFile(std::string path, UniqueFd fd) : path_(std::move(path)), fd_(std::move(fd)) {}
  TempFile(TempFile&& o) noexcept : path_(std::exchange(o.path_, {})), fd_(std::move(o.fd_)) {}
  TempFile& operator=(TempFile&&) = delete;
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  void published() { path_.clear(); }

 private:
  std::string path_;
  UniqueFd fd_;
};

struct Streamed {
  TempFile file;
  Digest digest;
  uint64_t size = 0;
  std::vector<uint8_t> head;
};

Status write_all(int fd, const uint8_t* data, size_t len, const std::string& path) {
  size_t off = 0;
  while (off < len) {
    const ssize_t n = ::write(fd, data + off, len - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno_status(errno, "write '" + path + "'");
    }
    off += static_cast<size_t>(n);
  }
  return Status::ok();
}

// Non-throwing existence check; an unreadable path counts as absent and fails later, loudly.
bool path_exists(const fs::path& p) {
  std::error_code ec;
  return fs::exists(p, ec);
}

// The entries of `dir` (none when it is missing or unreadable), without throwing.
std::vector<fs::path> dir_entries(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    out.push_back(it->path());
  }
  return out;
}

std::string to_hex(const unsigned char* p, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(kHex[p[i] >> 4]);
    out.push_back(kHex[p[i] & 0x0f]);
  }
  return out;
}

uint64_t remaining_bytes(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
  const off_t pos = ::lseek(fd, 0, SEEK_CUR);
  if (pos < 0 || pos > st.st_size) return 0;
  return static_cast<uint64_t>(st.st_size - pos);
}

std::string info_to_json(const ImageInfo& info) {
  json j = {{"digest", info.digest.str()},
            {"kind", image_kind_name(info.kind)},
            {"format", image_format_name(info.format)},
            {"size", info.size},
            {"virtual_size", info.virtual_size},
            {"imported_us", info.imported_us}};
  if (info.tenant) j["tenant"] = info.tenant->str();
  return j.dump(2) + "\n";
}

Result<ImageInfo> info_from_json(const std::string& text, const std::string& path) {
  const auto bad = [&](const std::string& why) {
    return internal_error("catalog entry '" + path + "': " + why);
  };
  try {
    const json j = json::parse(text);
    NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(j.at("digest").get<std::string>(), "digest"));
    ImageInfo info{
        .ref = std::nullopt, .digest = std::move(digest), .tenant = std::nullopt, .path = {}};
    NM_ASSIGN_OR_RETURN(info.kind, parse_image_kind(j.at("kind").get<std::string>(), "kind"));
    const auto format = j.at("format").get<std::string>();
    if (format == "qcow2") {
      info.format = ImageFormat::kQcow2;
    } else if (format != "raw") {
      return bad("unknown format '" + format + "'");
    }
    info.size = j.at("size").get<uint64_t>();
    info.virtual_size = j.at("virtual_size").get<uint64_t>();
    info.imported_us = j.at("imported_us").get<uint64_t>();
    if (j.contains("tenant")) {
      NM_ASSIGN_OR_RETURN(info.tenant,
                          TenantId::parse(j.at("tenant").get<std::string>(), "tenant"));
    }
    return info;
  } catch (const json::exception& e) {
    return bad(e.what());
  }
}

class DirImageStore final : public ImageStore {
 public:
  DirImageStore(fs::path root, std::shared_ptr<const Clock> clock)
      : root_(std::move(root)), clock_(std::move(clock)) {}

  Result<ImageInfo> import(const ImageRef& ref, int fd, const Digest& expected, ImageKind kind,
                           const std::optional<TenantId>& tenant, const ProgressFn& progress,
                           const std::atomic<bool>* cancel) override {
    {
      std::lock_guard lock(mu_);
      auto existing = read_tag_locked(ref);
      if (existing.is_ok())
        return same_or_exists(std::move(existing).value(), expected, kind, tenant);
      if (existing.status().code() != Code::kNotFound) return existing.status();
    }

    NM_ASSIGN_OR_RETURN(Streamed s, stream_to_temp(fd, progress, cancel));
    if (s.digest != expected) {
      return invalid_argument("sha256: image '" + ref.str() + "' has digest '" + s.digest.str() +
                              "', expected '" + expected.str() + "'");
    }
    NM_ASSIGN_OR_RETURN(DetectedFormat detected, detect_image_format(s.head, s.size));
    if (kind != ImageKind::kDisk && detected.format != ImageFormat::kRaw) {
      return invalid_argument("kind: a " + std::string(image_kind_name(kind)) +
                              " image must be raw, got " +
                              std::string(image_format_name(detected.format)));
    }

    std::lock_guard lock(mu_);
    auto existing = read_tag_locked(ref);
    if (existing.is_ok())
      return same_or_exists(std::move(existing).value(), expected, kind, tenant);
    if (existing.status().code() != Code::kNotFound) return existing.status();

    const std::string blob = blob_path(expected);
    bool created_blob = false;
    if (!path_exists(blob)) {
      if (::rename(s.file.path().c_str(), blob.c_str()) != 0) {
        return errno_status(errno, "publish '" + blob + "'");
      }
      s.file.published();
      created_blob = true;
      NM_RETURN_IF_ERROR(fsync_parent_dir(blob));
    }

    ImageInfo info{.ref = ref,
                   .digest = expected,
                   .kind = kind,
                   .format = detected.format,
                   .size = s.size,
                   .virtual_size = detected.virtual_size,
                   .tenant = tenant,
                   .imported_us = clock_->now_realtime_us(),
                   .path = blob};
    Status written = write_tag_locked(info);
    if (!written.is_ok() && created_blob) ::unlink(blob.c_str());
    NM_RETURN_IF_ERROR(written);
    return info;
  }

  Result<ImageInfo> resolve(std::string_view ref_or_digest) const override {
    std::lock_guard lock(mu_);
    if (ref_or_digest.starts_with(kDigestPrefix)) {
      NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(ref_or_digest, "image"));
      for (ImageInfo& info : list_locked()) {
        if (info.digest == digest) {
          info.ref.reset();
          return std::move(info);
        }
      }
      return not_found("image '" + digest.str() + "' is not in the store");
    }
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(ref_or_digest, "image"));
    return read_tag_locked(ref);
  }

  std::vector<ImageInfo> list() const override {
    std::lock_guard lock(mu_);
    return list_locked();
  }

  Status remove(std::string_view ref_or_digest) override {
    std::lock_guard lock(mu_);
    if (ref_or_digest.starts_with(kDigestPrefix)) {
      NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(ref_or_digest, "image"));
      bool found = path_exists(blob_path(digest));
      for (const ImageInfo& info : list_locked()) {
        if (info.digest != digest) continue;
        found = true;
        NM_RETURN_IF_ERROR(remove_tag_locked(*info.ref));
      }
      if (!found) return not_found("image '" + digest.str() + "' is not in the store");
      return remove_blob_if_unused_locked(digest);
    }
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(ref_or_digest, "image"));
    NM_ASSIGN_OR_RETURN(ImageInfo info, read_tag_locked(ref));
    NM_RETURN_IF_ERROR(remove_tag_locked(ref));
    return remove_blob_if_unused_locked(info.digest);
  }

 private:
  std::string blob_path(const Digest& d) const {
    return (root_ / "sha256" / d.str().substr(kDigestPrefix.size())).string();
  }
  fs::path tag_dir(const ImageRef& ref) const { return root_ / "tags" / ref.name; }
  std::string tag_path(const ImageRef& ref) const {
    return (tag_dir(ref) / (ref.tag + ".json")).string();
  }

  static Result<ImageInfo> same_or_exists(ImageInfo existing, const Digest& expected,
                                          ImageKind kind, const std::optional<TenantId>& tenant) {
    if (existing.digest == expected && existing.kind == kind && existing.tenant == tenant) {
      return existing;
    }
    return already_exists("image '" + existing.ref->str() + "' exists with digest '" +
                          existing.digest.str() + "' and kind '" +
                          std::string(image_kind_name(existing.kind)) + "'");
  }

  Result<Streamed> stream_to_temp(int fd, const ProgressFn& progress,
                                  const std::atomic<bool>* cancel) {
    const std::string path =
        (root_ / "tmp" /
         ("import-" + std::to_string(::getpid()) + "-" + std::to_string(next_tmp_.fetch_add(1))))
            .string();
    UniqueFd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!out.valid()) return errno_status(errno, "create '" + path + "'");
    TempFile file(path, std::move(out));

    EvpMdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
      return internal_error("sha256: cannot initialise OpenSSL digest");
    }
    const uint64_t total = remaining_bytes(fd);
    std::vector<uint8_t> buf(kChunkBytes);
    std::vector<uint8_t> head;
    head.reserve(kImageHeadBytes);
    uint64_t done = 0;
    for (;;) {
      if (cancel != nullptr && cancel->load()) return Status(Code::kConflict, "import cancelled");
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_status(errno, "read image source");
      }
      if (n == 0) break;
      const auto len = static_cast<size_t>(n);
      if (head.size() < kImageHeadBytes) {
        const size_t take = std::min(len, kImageHeadBytes - head.size());
        head.insert(head.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(take));
      }
      if (EVP_DigestUpdate(ctx.get(), buf.data(), len) != 1) {
        return internal_error("sha256: OpenSSL digest update failed");
      }
      NM_RETURN_IF_ERROR(write_all(file.fd(), buf.data(), len, path));
      done += len;
      if (progress) progress(done, total);
    }

    std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
    unsigned int md_len = 0;
    if (EVP_DigestFinal_ex(ctx.get(), md.data(), &md_len) != 1) {
      return internal_error("sha256: OpenSSL digest final failed");
    }
    if (::fchmod(file.fd(), 0444) != 0) return errno_status(errno, "chmod '" + path + "'");
    if (::fsync(file.fd()) != 0) return errno_status(errno, "fsync '" + path + "'");
    Digest digest = Digest::trusted(std::string(kDigestPrefix) + to_hex(md.data(), md_len));
    return Streamed{std::move(file), std::move(digest), done, std::move(head)};
  }

  Result<ImageInfo> read_tag_locked(const ImageRef& ref) const {
    const std::string path = tag_path(ref);
    auto text = read_file(path);
    if (!text.is_ok()) {
      if (text.status().code() == Code::kNotFound) {
        return not_found("image '" + ref.str() + "' is not in the store");
      }
      return text.status();
    }
    NM_ASSIGN_OR_RETURN(ImageInfo info, info_from_json(*text, path));
    info.ref = ref;
    info.path = blob_path(info.digest);
    return info;
  }

  Status write_tag_locked(const ImageInfo& info) const {
    const fs::path dir = tag_dir(*info.ref);
    if (!path_exists(dir)) {
      NM_RETURN_IF_ERROR(make_dirs(dir.string()));
      NM_RETURN_IF_ERROR(fsync_parent_dir(dir.string()));
    }
    return write_file_atomic(tag_path(*info.ref), info_to_json(info));
  }

  Status remove_tag_locked(const ImageRef& ref) const {
    const std::string path = tag_path(ref);
    if (::unlink(path.c_str()) != 0) return errno_status(errno, "remove '" + path + "'");
    NM_RETURN_IF_ERROR(fsync_parent_dir(path));
    std::error_code ec;
    fs::remove(tag_dir(ref), ec);  // only succeeds when no other tag of that name remains
    return Status::ok();
  }

  Status remove_blob_if_unused_locked(const Digest& digest) const {
    for (const ImageInfo& info : list_locked()) {
      if (info.digest == digest) return Status::ok();
    }
    const std::string blob = blob_path(digest);
    if (::unlink(blob.c_str()) != 0 && errno != ENOENT) {
      return errno_status(errno, "remove '" + blob + "'");
    }
    return fsync_parent_dir(blob);
  }

  std::vector<ImageInfo> list_locked() const {
    std::vector<ImageInfo> out;
    for (const fs::path& name_dir : dir_entries(root_ / "tags")) {
      for (const fs::path& entry : dir_entries(name_dir)) {
        if (entry.extension() != ".json") continue;
        auto ref =
            ImageRef::parse(name_dir.filename().string() + ":" + entry.stem().string(), "tag");
        if (!ref.is_ok()) continue;
        auto info = read_tag_locked(*ref);
        if (!info.is_ok()) {
          logger("imagestore")
              ->warn("skipping catalog entry '{}': {}", entry.string(), info.status().to_string());
          continue;
        }
        out.push_back(std::move(info).value());
      }
    }
    std::sort(out.begin(), out.end(),
              [](const ImageInfo& a, const ImageInfo& b) { return *a.ref < *b.ref; });
    return out;
  }

  const fs::path root_;
  const std::shared_ptr<const Clock> clock_;
  mutable std::mutex mu_;  // guards the catalog (tags/) and blob publication/removal
  std::atomic<uint64_t> next_tmp_{0};
};

Status clear_stray_temp_files(const fs::path& root) {
  for (const fs::path& entry : dir_entries(root / "tmp")) {
    std::error_code ec;
    fs::remove_all(entry, ec);
    if (ec) return errno_status(ec.value(), "remove stray '" + entry.string() + "'");
  }
  for (const fs::path& name_dir : dir_entries(root / "tags")) {
    for (const fs::path& entry : dir_entries(name_dir)) {
      if (entry.extension() != ".tmp") continue;
      std::error_code ec;
      fs::remove(entry, ec);
      if (ec) return errno_status(ec.value(), "remove stray '" + entry.string() + "'");
    }
  }
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root,
                                                         std::shared_ptr<const Clock> clock) {
  std::error_code ec;
  const fs::path abs = fs::absolute(root, ec).lexically_normal();
  if (ec) return errno_status(ec.value(), "resolve image root '" + root + "'");
  for (const char* sub : {"sha256", "tags", "tmp"}) {
    NM_RETURN_IF_ERROR(make_dirs((abs / sub).string()));
  }
  NM_RETURN_IF_ERROR(clear_stray_temp_files(abs));
  return std::unique_ptr<ImageStore>(std::make_unique<DirImageStore>(abs, std::move(clock)));
}

Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root) {
  return open_dir_image_store(root, std::make_shared<SystemClock>());
}

}  // namespace nm
