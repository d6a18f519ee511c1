#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <vector>

#include "nm/core/fs.h"
#include "nm/core/log.h"
#include "nm/imagestore/image_format.h"
#include "nm/imagestore/image_source.h"
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
constexpr auto kCancelPoll = std::chrono::milliseconds(50);
constexpr uint64_t kTouchGranularityUs = 60'000'000;  // touch(): uses closer together are one

std::string hex_of(const Digest& d) {
  return d.str().substr(kDigestPrefix.size());
}

struct EvpMdCtxDeleter {
  void operator()(EVP_MD_CTX* ctx) const noexcept { EVP_MD_CTX_free(ctx); }
};
using EvpMdCtxPtr = std::unique_ptr<EVP_MD_CTX, EvpMdCtxDeleter>;

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

struct Written {
  TempFile file;
  Digest digest;
  uint64_t size = 0;
  std::vector<uint8_t> head;  // the first kImageHeadBytes
};

// The one streaming path of imports and pulls: bytes are hashed and written to a temp file in
// tmp/, then finish() makes the file read-only and durable. The temp file goes away with the
// writer unless it was published.
class BlobWriter {
 public:
  static Result<std::unique_ptr<BlobWriter>> create(std::string path) {
    UniqueFd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!out.valid()) return errno_status(errno, "create '" + path + "'");
    TempFile file(std::move(path), std::move(out));
    EvpMdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
      return internal_error("sha256: cannot initialise OpenSSL digest");
    }
    return std::make_unique<BlobWriter>(std::move(file), std::move(ctx));
  }
  BlobWriter(TempFile file, EvpMdCtxPtr ctx) : file_(std::move(file)), ctx_(std::move(ctx)) {
    head_.reserve(kImageHeadBytes);
  }

  Status append(std::span<const uint8_t> chunk) {
    if (head_.size() < kImageHeadBytes) {
      const size_t take = std::min(chunk.size(), kImageHeadBytes - head_.size());
      head_.insert(head_.end(), chunk.begin(), chunk.begin() + static_cast<std::ptrdiff_t>(take));
    }
    if (EVP_DigestUpdate(ctx_.get(), chunk.data(), chunk.size()) != 1) {
      return internal_error("sha256: OpenSSL digest update failed");
    }
    NM_RETURN_IF_ERROR(write_all(chunk));
    size_ += chunk.size();
    return Status::ok();
  }

  // Hash, size and head of everything appended; the file is 0444 and fsync()ed.
  Result<Written> finish() && {
    std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
    unsigned int md_len = 0;
    if (EVP_DigestFinal_ex(ctx_.get(), md.data(), &md_len) != 1) {
      return internal_error("sha256: OpenSSL digest final failed");
    }
    if (::fchmod(file_.fd(), 0444) != 0) return failed("chmod");
    if (::fsync(file_.fd()) != 0) return failed("fsync");
    Digest digest = Digest::trusted(std::string(kDigestPrefix) + to_hex(md.data(), md_len));
    return Written{std::move(file_), std::move(digest), size_, std::move(head_)};
  }

  // A write or fsync failed for lack of space (ENOSPC or EDQUOT).
  bool out_of_space() const { return out_of_space_; }

 private:
  Status failed(std::string_view what) {
    const int err = errno;
    if (err == ENOSPC || err == EDQUOT) out_of_space_ = true;
    return errno_status(err, std::string(what) + " '" + file_.path() + "'");
  }

  Status write_all(std::span<const uint8_t> data) {
    size_t off = 0;
    while (off < data.size()) {
      const ssize_t n = ::write(file_.fd(), data.data() + off, data.size() - off);
      if (n < 0) {
        if (errno == EINTR) continue;
        return failed("write");
      }
      off += static_cast<size_t>(n);
    }
    return Status::ok();
  }

  TempFile file_;
  EvpMdCtxPtr ctx_;
  std::vector<uint8_t> head_;
  uint64_t size_ = 0;
  bool out_of_space_ = false;
};

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

uint64_t remaining_bytes(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return 0;
  const off_t pos = ::lseek(fd, 0, SEEK_CUR);
  if (pos < 0 || pos > st.st_size) return 0;
  return static_cast<uint64_t>(st.st_size - pos);
}

Result<ImageFormat> parse_format(const std::string& s) {
  if (s == "qcow2") return ImageFormat::kQcow2;
  if (s == "raw") return ImageFormat::kRaw;
  return internal_error("unknown format '" + s + "'");
}

// Tag entries: {digest, kind, format, size, virtual_size, tenant?, imported_us}.
std::string tag_to_json(const ImageInfo& info) {
  json j = {{"digest", info.digest.str()},
            {"kind", image_kind_name(info.kind)},
            {"format", image_format_name(info.format)},
            {"size", info.size},
            {"virtual_size", info.virtual_size},
            {"imported_us", info.imported_us}};
  if (info.tenant) j["tenant"] = info.tenant->str();
  return j.dump(2) + "\n";
}

// Blob metadata: the tag fields without the digest (it is the file name), plus pin and last use.
std::string meta_to_json(const ImageInfo& info) {
  json j = {{"kind", image_kind_name(info.kind)},
            {"format", image_format_name(info.format)},
            {"size", info.size},
            {"virtual_size", info.virtual_size},
            {"imported_us", info.imported_us},
            {"pinned", info.pinned},
            {"last_used_us", info.last_used_us}};
  if (info.tenant) j["tenant"] = info.tenant->str();
  return j.dump(2) + "\n";
}

// Parses a tag entry (`digest` null: read "digest" from the document) or a metadata file.
Result<ImageInfo> info_from_json(const std::string& text, const std::string& path,
                                 const Digest* digest) {
  const auto bad = [&](const std::string& why) {
    return internal_error("image store entry '" + path + "': " + why);
  };
  try {
    const json j = json::parse(text);
    std::optional<Digest> parsed;
    if (digest == nullptr) {
      NM_ASSIGN_OR_RETURN(parsed, Digest::parse(j.at("digest").get<std::string>(), "digest"));
    }
    ImageInfo info{.ref = std::nullopt,
                   .digest = digest != nullptr ? *digest : *parsed,
                   .tenant = std::nullopt,
                   .path = {}};
    NM_ASSIGN_OR_RETURN(info.kind, parse_image_kind(j.at("kind").get<std::string>(), "kind"));
    auto format = parse_format(j.at("format").get<std::string>());
    if (!format.is_ok()) return bad(format.status().message());
    info.format = *format;
    info.size = j.at("size").get<uint64_t>();
    info.virtual_size = j.at("virtual_size").get<uint64_t>();
    info.imported_us = j.at("imported_us").get<uint64_t>();
    if (j.contains("tenant")) {
      NM_ASSIGN_OR_RETURN(info.tenant,
                          TenantId::parse(j.at("tenant").get<std::string>(), "tenant"));
    }
    info.pinned = j.value("pinned", false);
    info.last_used_us = j.value("last_used_us", info.imported_us);
    return info;
  } catch (const json::exception& e) {
    return bad(e.what());
  }
}

// One transfer of a digest that concurrent pulls share (single flight).
struct Flight {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status status;  // OK: blob and metadata are published
  uint64_t bytes = 0;
  uint64_t total = 0;
  std::map<uint64_t, const ProgressFn*> listeners;  // joiners' progress callbacks
  uint64_t next_listener = 0;

  void report(uint64_t now_bytes) {
    std::lock_guard lock(mu);
    bytes = now_bytes;
    for (const auto& [id, fn] : listeners) (*fn)(bytes, total);
  }
  void finish(Status s) {
    {
      std::lock_guard lock(mu);
      done = true;
      status = std::move(s);
    }
    cv.notify_all();
  }
};

// A pulled blob in tmp/ that matched its manifest.
struct Fetched {
  Written written;
  uint64_t virtual_size = 0;
};

struct FoundManifest {
  ImageManifest manifest;
  ImageSource* source = nullptr;
};

Result<FoundManifest> find_manifest(const ImageRef& ref, std::span<ImageSource* const> sources) {
  std::optional<Status> unavailable_error;
  for (ImageSource* source : sources) {
    auto m = source->manifest(ref);
    if (m.is_ok()) return FoundManifest{std::move(m).value(), source};
    const Code code = m.status().code();
    if (code == Code::kNotFound) continue;
    if (code == Code::kUnavailable) {
      if (!unavailable_error) unavailable_error = m.status();
      continue;
    }
    return m.status();
  }
  if (unavailable_error) {
    return unavailable("image '" + ref.str() + "' is in no reachable source; " +
                       unavailable_error->message());
  }
  if (sources.empty()) return not_found("image '" + ref.str() + "': no image sources configured");
  return not_found("image '" + ref.str() + "' is in none of the " + std::to_string(sources.size()) +
                   " image source(s)");
}

class DirImageStore final : public ImageStore {
 public:
  DirImageStore(fs::path root, ImageStoreOptions options)
      : root_(std::move(root)), options_(std::move(options)) {}

  Result<ImageInfo> import(const ImageRef& ref, int fd, const Digest& expected, ImageKind kind,
                           const std::optional<TenantId>& tenant, const ProgressFn& progress,
                           const std::atomic<bool>* cancel) override {
    {
      std::lock_guard lock(mu_);
      auto existing = read_tag_locked(ref);
      if (existing.is_ok()) {
        return same_or_exists(std::move(existing).value(), expected, kind, tenant);
      }
      if (existing.status().code() != Code::kNotFound) return existing.status();
    }

    NM_ASSIGN_OR_RETURN(Written w, stream_fd(fd, progress, cancel));
    if (w.digest != expected) {
      return invalid_argument("sha256: image '" + ref.str() + "' has digest '" + w.digest.str() +
                              "', expected '" + expected.str() + "'");
    }
    NM_ASSIGN_OR_RETURN(DetectedFormat detected, detect_image_format(w.head, w.size));
    if (kind != ImageKind::kDisk && detected.format != ImageFormat::kRaw) {
      return invalid_argument("kind: a " + std::string(image_kind_name(kind)) +
                              " image must be raw, got " +
                              std::string(image_format_name(detected.format)));
    }

    std::lock_guard lock(mu_);
    auto existing = read_tag_locked(ref);
    if (existing.is_ok()) {
      return same_or_exists(std::move(existing).value(), expected, kind, tenant);
    }
    if (existing.status().code() != Code::kNotFound) return existing.status();

    const uint64_t now = options_.clock->now_realtime_us();
    ImageInfo info{.ref = ref,
                   .digest = expected,
                   .kind = kind,
                   .format = detected.format,
                   .size = w.size,
                   .virtual_size = detected.virtual_size,
                   .tenant = tenant,
                   .imported_us = now,
                   .path = blob_path(expected),
                   .pinned = false,
                   .last_used_us = now};
    NM_ASSIGN_OR_RETURN(const bool created_blob, publish_locked(w, info));
    Status written = write_tag_locked(info);
    if (!written.is_ok() && created_blob) (void)remove_blob_files_locked(expected);
    NM_RETURN_IF_ERROR(written);
    return with_meta_locked(std::move(info));
  }

  Result<ImageInfo> resolve(std::string_view ref_or_digest) const override {
    std::lock_guard lock(mu_);
    if (ref_or_digest.starts_with(kDigestPrefix)) {
      NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(ref_or_digest, "image"));
      return read_meta_locked(digest);
    }
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(ref_or_digest, "image"));
    NM_ASSIGN_OR_RETURN(ImageInfo info, read_tag_locked(ref));
    return with_meta_locked(std::move(info));
  }

  std::vector<ImageInfo> list() const override {
    std::lock_guard lock(mu_);
    std::vector<ImageInfo> out = list_tags_locked();
    for (ImageInfo& info : out) info = with_meta_locked(std::move(info));
    return out;
  }

  Status remove(std::string_view ref_or_digest) override {
    std::lock_guard lock(mu_);
    if (ref_or_digest.starts_with(kDigestPrefix)) {
      NM_ASSIGN_OR_RETURN(Digest digest, Digest::parse(ref_or_digest, "image"));
      return remove_blob_locked(digest);
    }
    NM_ASSIGN_OR_RETURN(ImageRef ref, ImageRef::parse(ref_or_digest, "image"));
    NM_ASSIGN_OR_RETURN(ImageInfo info, read_tag_locked(ref));
    NM_RETURN_IF_ERROR(remove_tag_locked(ref));
    for (const ImageInfo& other : list_tags_locked()) {
      if (other.digest == info.digest) return Status::ok();
    }
    return remove_blob_files_locked(info.digest);
  }

  Result<PullResult> pull(const ImageRef& ref, std::span<ImageSource* const> sources,
                          const ProgressFn& progress, const std::atomic<bool>* cancel) override {
    NM_ASSIGN_OR_RETURN(FoundManifest found, find_manifest(ref, sources));
    const ImageManifest& m = found.manifest;
    const std::string source = found.source->describe();
    if (m.kind != ImageKind::kDisk && m.format != ImageFormat::kRaw) {
      return invalid_argument("manifest.format: image '" + ref.str() + "' from '" + source +
                              "' is a " + std::string(image_kind_name(m.kind)) +
                              ", which must be raw, not " +
                              std::string(image_format_name(m.format)));
    }
    for (;;) {
      std::shared_ptr<Flight> flight;
      bool leader = false;
      {
        std::lock_guard lock(mu_);
        auto cached = read_meta_locked(m.digest);
        if (cached.is_ok()) {
          NM_RETURN_IF_ERROR(check_cached_locked(ref, m, source, *cached));
          NM_ASSIGN_OR_RETURN(ImageInfo info, tag_pulled_locked(ref, m));
          return PullResult{std::move(info), false, false, source};
        }
        if (cached.status().code() != Code::kNotFound) return cached.status();
        auto it = flights_.find(m.digest.str());
        if (it != flights_.end()) {
          flight = it->second;
        } else {
          flight = std::make_shared<Flight>();
          flight->total = m.size;
          flights_.emplace(m.digest.str(), flight);
          leader = true;
        }
      }
      if (leader) {
        Status s = transfer(ref, m, *found.source, *flight, progress, cancel);
        flight->finish(s);
        NM_RETURN_IF_ERROR(s);
      } else {
        Status s = join(*flight, progress, cancel);
        // The leader's own cancellation is not an outcome of the transfer: try again. This
        // caller's cancellation is (join() answers the same status for both).
        if (s.code() == Code::kConflict && s.message() == kLeaderCancelled &&
            (cancel == nullptr || !cancel->load())) {
          continue;
        }
        NM_RETURN_IF_ERROR(s);
      }
      std::lock_guard lock(mu_);
      if (!leader) {
        // The leader checked the bytes against its manifest; this caller's manifest may differ
        // in kind or format for the same digest.
        NM_ASSIGN_OR_RETURN(ImageInfo cached, read_meta_locked(m.digest));
        NM_RETURN_IF_ERROR(check_cached_locked(ref, m, source, cached));
      }
      NM_ASSIGN_OR_RETURN(ImageInfo info, tag_pulled_locked(ref, m));
      return PullResult{std::move(info), leader, !leader, source};
    }
  }

  std::vector<BlobInfo> list_blobs() const override {
    std::lock_guard lock(mu_);
    std::map<std::string, std::vector<ImageRef>> tags;
    for (const ImageInfo& info : list_tags_locked()) tags[info.digest.str()].push_back(*info.ref);
    std::vector<BlobInfo> out;
    for (const fs::path& entry : dir_entries(root_ / "sha256")) {
      auto digest = Digest::parse(std::string(kDigestPrefix) + entry.filename().string(), "blob");
      if (!digest.is_ok()) continue;
      auto info = read_meta_locked(*digest);
      if (!info.is_ok()) continue;
      BlobInfo blob{.info = std::move(info).value(), .tags = {}};
      if (auto it = tags.find(digest->str()); it != tags.end()) blob.tags = it->second;
      out.push_back(std::move(blob));
    }
    std::sort(out.begin(), out.end(),
              [](const BlobInfo& a, const BlobInfo& b) { return a.info.digest < b.info.digest; });
    return out;
  }

  Status set_pinned(const Digest& digest, bool pinned) override {
    std::lock_guard lock(mu_);
    NM_ASSIGN_OR_RETURN(ImageInfo info, read_meta_locked(digest));
    if (info.pinned == pinned) return Status::ok();
    info.pinned = pinned;
    return write_file_atomic(meta_path(digest), meta_to_json(info));
  }

  Status touch(const Digest& digest) override {
    std::lock_guard lock(mu_);
    NM_ASSIGN_OR_RETURN(ImageInfo info, read_meta_locked(digest));
    const uint64_t now = options_.clock->now_realtime_us();
    // A use recorded less than a minute ago stands: last_used_us only orders garbage collection
    // (whose minimum age is hours), and rewriting the metadata costs two fsyncs that every VM
    // create from the image would otherwise pay.
    const uint64_t recorded = std::max(info.last_used_us, info.imported_us);
    if (recorded <= now && now - recorded < kTouchGranularityUs) return Status::ok();
    info.last_used_us = now;
    return write_file_atomic(meta_path(digest), meta_to_json(info));
  }

  Result<VerifyResult> verify(const Digest& digest, const ProgressFn& progress,
                              const std::atomic<bool>* cancel) const override {
    auto meta = [&] {
      std::lock_guard lock(mu_);
      return read_meta_locked(digest);
    }();
    if (!meta.is_ok()) return meta.status();
    const ImageInfo& info = *meta;
    UniqueFd fd(::open(info.path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid()) {
      if (errno == ENOENT) return VerifyResult{digest, false, "missing"};
      return errno_status(errno, "open '" + info.path + "'");
    }
    ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_SEQUENTIAL);
    EvpMdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
      return internal_error("sha256: cannot initialise OpenSSL digest");
    }
    std::vector<uint8_t> buf(kChunkBytes);
    uint64_t done = 0;
    for (;;) {
      if (cancel != nullptr && cancel->load()) return conflict("verify cancelled");
      const ssize_t n = ::read(fd.get(), buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_status(errno, "read '" + info.path + "'");
      }
      if (n == 0) break;
      if (EVP_DigestUpdate(ctx.get(), buf.data(), static_cast<size_t>(n)) != 1) {
        return internal_error("sha256: OpenSSL digest update failed");
      }
      done += static_cast<uint64_t>(n);
      if (progress) progress(done, info.size);
    }
    std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
    unsigned int md_len = 0;
    if (EVP_DigestFinal_ex(ctx.get(), md.data(), &md_len) != 1) {
      return internal_error("sha256: OpenSSL digest final failed");
    }
    const std::string actual = std::string(kDigestPrefix) + to_hex(md.data(), md_len);
    if (done != info.size) {
      return VerifyResult{
          digest, false,
          "size is " + std::to_string(done) + ", expected " + std::to_string(info.size)};
    }
    if (actual != digest.str()) return VerifyResult{digest, false, "digest is " + actual};
    return VerifyResult{digest, true, {}};
  }

  Status remove_blob(const Digest& digest) override {
    std::lock_guard lock(mu_);
    return remove_blob_locked(digest);
  }

  // Brings caches of older versions and crash leftovers to the current layout (see
  // open_dir_image_store()).
  Status recover() {
    std::lock_guard lock(mu_);
    std::map<std::string, ImageInfo> tagged;
    for (const ImageInfo& info : list_tags_locked()) tagged.emplace(info.digest.str(), info);
    for (const fs::path& entry : dir_entries(root_ / "sha256")) {
      auto digest = Digest::parse(std::string(kDigestPrefix) + entry.filename().string(), "blob");
      if (!digest.is_ok()) continue;
      if (path_exists(meta_path(*digest))) continue;
      auto it = tagged.find(digest->str());
      if (it == tagged.end()) {
        NM_RETURN_IF_ERROR(remove_blob_files_locked(*digest));
        continue;
      }
      ImageInfo info = it->second;
      info.pinned = false;
      info.last_used_us = info.imported_us;
      NM_RETURN_IF_ERROR(write_file_atomic(meta_path(*digest), meta_to_json(info)));
    }
    for (const fs::path& entry : dir_entries(root_ / "meta")) {
      if (entry.extension() != ".json") continue;
      if (!path_exists(root_ / "sha256" / entry.stem())) {
        std::error_code ec;
        fs::remove(entry, ec);
        if (ec) return errno_status(ec.value(), "remove '" + entry.string() + "'");
      }
    }
    return Status::ok();
  }

 private:
  static constexpr std::string_view kLeaderCancelled = "pull cancelled";

  std::string blob_path(const Digest& d) const { return (root_ / "sha256" / hex_of(d)).string(); }
  std::string meta_path(const Digest& d) const {
    return (root_ / "meta" / (hex_of(d) + ".json")).string();
  }
  fs::path tag_dir(const ImageRef& ref) const { return root_ / "tags" / ref.name; }
  std::string tag_path(const ImageRef& ref) const {
    return (tag_dir(ref) / (ref.tag + ".json")).string();
  }
  std::string temp_path(std::string_view what) {
    return (root_ / "tmp" /
            (std::string(what) + "-" + std::to_string(::getpid()) + "-" +
             std::to_string(next_tmp_.fetch_add(1))))
        .string();
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

  Result<Written> stream_fd(int fd, const ProgressFn& progress, const std::atomic<bool>* cancel) {
    NM_ASSIGN_OR_RETURN(std::unique_ptr<BlobWriter> w, BlobWriter::create(temp_path("import")));
    const uint64_t total = remaining_bytes(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    std::vector<uint8_t> buf(kChunkBytes);
    uint64_t done = 0;
    for (;;) {
      if (cancel != nullptr && cancel->load()) return conflict("import cancelled");
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        return errno_status(errno, "read image source");
      }
      if (n == 0) break;
      NM_RETURN_IF_ERROR(w->append(std::span<const uint8_t>(buf.data(), static_cast<size_t>(n))));
      done += static_cast<uint64_t>(n);
      if (progress) progress(done, total);
    }
    return std::move(*w).finish();
  }

  // The leader's part of pull(): capacity check, stream, check against the manifest, publish
  // blob and metadata, end the flight (under mu_, so no caller sees neither).
  Status transfer(const ImageRef& ref, const ImageManifest& m, ImageSource& source, Flight& flight,
                  const ProgressFn& progress, const std::atomic<bool>* cancel) {
    auto fetched = fetch_and_check(ref, m, source, flight, progress, cancel);
    std::lock_guard lock(mu_);
    flights_.erase(m.digest.str());
    if (!fetched.is_ok()) return fetched.status();
    const uint64_t now = options_.clock->now_realtime_us();
    const ImageInfo info{.ref = std::nullopt,
                         .digest = m.digest,
                         .kind = m.kind,
                         .format = m.format,
                         .size = m.size,
                         .virtual_size = fetched->virtual_size,
                         .tenant = std::nullopt,
                         .imported_us = now,
                         .path = blob_path(m.digest),
                         .pinned = false,
                         .last_used_us = now};
    return publish_locked(fetched->written, info).status();
  }

  // Streams the blob into tmp/ and checks it against the manifest.
  Result<Fetched> fetch_and_check(const ImageRef& ref, const ImageManifest& m, ImageSource& source,
                                  Flight& flight, const ProgressFn& progress,
                                  const std::atomic<bool>* cancel) {
    const std::string what = "image '" + ref.str() + "' from '" + source.describe() + "'";
    NM_ASSIGN_OR_RETURN(const FsSpace space, filesystem_space((root_ / "tmp").string()));
    // Pulls that are still writing count as used: parallel pulls cannot together overrun it.
    // (Between the capacity check and the write, the space may still be taken by others.)
    uint64_t free_bytes = 0;
    {
      std::lock_guard lock(mu_);
      free_bytes = space.available_bytes - std::min(space.available_bytes, in_flight_bytes_);
      if (free_bytes < m.size || free_bytes - m.size < options_.reserve_bytes) {
        return Status(Code::kInsufficientCapacity,
                      "image cache '" + root_.string() + "' has " + std::to_string(free_bytes) +
                          " bytes free (after pulls in progress); " + what + " needs " +
                          std::to_string(m.size) + " plus a reserve of " +
                          std::to_string(options_.reserve_bytes));
      }
      in_flight_bytes_ += m.size;
    }
    struct Release {
      DirImageStore* self;
      uint64_t bytes;
      ~Release() {
        std::lock_guard lock(self->mu_);
        self->in_flight_bytes_ -= bytes;
      }
    } release{this, m.size};
    const auto no_space = [&] {
      return Status(Code::kInsufficientCapacity,
                    "image cache '" + root_.string() + "' ran out of space while pulling " + what);
    };
    NM_ASSIGN_OR_RETURN(std::unique_ptr<BlobWriter> w, BlobWriter::create(temp_path("pull")));
    uint64_t done = 0;
    const BlobSink sink = [&](std::span<const uint8_t> chunk) -> Status {
      NM_RETURN_IF_ERROR(w->append(chunk));
      done += chunk.size();
      if (progress) progress(done, m.size);
      flight.report(done);
      return Status::ok();
    };
    Status fetched = source.fetch(m.digest, m.size, sink, cancel);
    if (w->out_of_space()) return no_space();
    if (fetched.code() == Code::kConflict && fetched.message() == "cancelled") {
      return conflict(std::string(kLeaderCancelled));
    }
    NM_RETURN_IF_ERROR(fetched);
    auto finished = std::move(*w).finish();
    if (w->out_of_space()) return no_space();
    NM_ASSIGN_OR_RETURN(Written written, std::move(finished));
    if (written.size != m.size) {
      return invalid_argument("manifest.size: " + what + " is " + std::to_string(written.size) +
                              " bytes, the manifest says " + std::to_string(m.size));
    }
    if (written.digest != m.digest) {
      return invalid_argument("manifest.digest: " + what + " hashes to '" + written.digest.str() +
                              "', the manifest says '" + m.digest.str() + "'");
    }
    auto detected = detect_image_format(written.head, written.size);
    if (!detected.is_ok()) return detected.status().with_context(what);
    if (detected->format != m.format) {
      return invalid_argument("manifest.format: " + what + " is " +
                              std::string(image_format_name(detected->format)) +
                              ", the manifest says " + std::string(image_format_name(m.format)));
    }
    return Fetched{std::move(written), detected->virtual_size};
  }

  Status join(Flight& flight, const ProgressFn& progress, const std::atomic<bool>* cancel) {
    std::unique_lock lock(flight.mu);
    uint64_t id = 0;
    if (progress) {
      id = ++flight.next_listener;
      flight.listeners.emplace(id, &progress);
    }
    bool cancelled = false;
    while (!flight.done) {
      if (cancel == nullptr) {
        flight.cv.wait(lock);
      } else if (cancel->load()) {
        cancelled = true;
        break;
      } else {
        flight.cv.wait_for(lock, kCancelPoll);
      }
    }
    if (id != 0) flight.listeners.erase(id);
    if (cancelled) return conflict("pull cancelled");
    return flight.status;
  }

  // The checks of pull() for a blob that is cached already.
  static Status check_cached_locked(const ImageRef& ref, const ImageManifest& m,
                                    const std::string& source, const ImageInfo& cached) {
    const std::string what = "image '" + ref.str() + "' from '" + source + "'";
    if (cached.format != m.format) {
      return invalid_argument("manifest.format: " + what + " says " +
                              std::string(image_format_name(m.format)) + ", the cached blob '" +
                              m.digest.str() + "' is " +
                              std::string(image_format_name(cached.format)));
    }
    if (cached.size != m.size) {
      return invalid_argument("manifest.size: " + what + " says " + std::to_string(m.size) +
                              ", the cached blob '" + m.digest.str() + "' has " +
                              std::to_string(cached.size) + " bytes");
    }
    return Status::ok();
  }

  // Points `ref` at the manifest's (published) blob unless it already does.
  Result<ImageInfo> tag_pulled_locked(const ImageRef& ref, const ImageManifest& m) {
    NM_ASSIGN_OR_RETURN(ImageInfo blob, read_meta_locked(m.digest));
    auto existing = read_tag_locked(ref);
    if (existing.is_ok()) {
      if (existing->tenant) {
        return already_exists("image '" + ref.str() + "' is a private image of tenant '" +
                              existing->tenant->str() + "'; a pull does not replace it");
      }
      if (existing->digest == m.digest && existing->kind == m.kind) {
        return with_meta_locked(std::move(existing).value());
      }
    } else if (existing.status().code() != Code::kNotFound) {
      return existing.status();
    }
    ImageInfo info = blob;
    info.ref = ref;
    info.kind = m.kind;
    info.tenant.reset();
    NM_RETURN_IF_ERROR(write_tag_locked(info));
    return with_meta_locked(std::move(info));
  }

  // Publishes the blob (unless present) and then its metadata (unless present). Returns whether
  // the blob was created by this call.
  Result<bool> publish_locked(Written& w, const ImageInfo& info) {
    const std::string blob = blob_path(info.digest);
    bool created = false;
    if (!path_exists(blob)) {
      if (::rename(w.file.path().c_str(), blob.c_str()) != 0) {
        return errno_status(errno, "publish '" + blob + "'");
      }
      w.file.published();
      created = true;
      NM_RETURN_IF_ERROR(fsync_parent_dir(blob));
    }
    if (!path_exists(meta_path(info.digest))) {
      Status s = write_file_atomic(meta_path(info.digest), meta_to_json(info));
      if (!s.is_ok()) {
        if (created) ::unlink(blob.c_str());
        return s;
      }
    }
    return created;
  }

  Result<ImageInfo> read_meta_locked(const Digest& digest) const {
    const std::string path = meta_path(digest);
    auto text = read_file(path);
    if (!text.is_ok()) {
      if (text.status().code() == Code::kNotFound) {
        return not_found("image '" + digest.str() + "' is not in the store");
      }
      return text.status();
    }
    NM_ASSIGN_OR_RETURN(ImageInfo info, info_from_json(*text, path, &digest));
    info.path = blob_path(digest);
    return info;
  }

  // `info` (from a tag) with the blob's pin and last use.
  ImageInfo with_meta_locked(ImageInfo info) const {
    auto meta = read_meta_locked(info.digest);
    if (meta.is_ok()) {
      info.pinned = meta->pinned;
      info.last_used_us = meta->last_used_us;
    }
    return info;
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
    NM_ASSIGN_OR_RETURN(ImageInfo info, info_from_json(*text, path, nullptr));
    info.ref = ref;
    info.path = blob_path(info.digest);
    info.pinned = false;
    info.last_used_us = info.imported_us;
    return info;
  }

  Status write_tag_locked(const ImageInfo& info) const {
    const fs::path dir = tag_dir(*info.ref);
    if (!path_exists(dir)) {
      NM_RETURN_IF_ERROR(make_dirs(dir.string()));
      NM_RETURN_IF_ERROR(fsync_parent_dir(dir.string()));
    }
    return write_file_atomic(tag_path(*info.ref), tag_to_json(info));
  }

  Status remove_tag_locked(const ImageRef& ref) const {
    const std::string path = tag_path(ref);
    if (::unlink(path.c_str()) != 0) return errno_status(errno, "remove '" + path + "'");
    NM_RETURN_IF_ERROR(fsync_parent_dir(path));
    std::error_code ec;
    fs::remove(tag_dir(ref), ec);  // only succeeds when no other tag of that name remains
    return Status::ok();
  }

  // Every tag naming `digest`, then its metadata, then the blob: the reverse of publication.
  Status remove_blob_locked(const Digest& digest) const {
    bool found = path_exists(blob_path(digest)) || path_exists(meta_path(digest));
    for (const ImageInfo& info : list_tags_locked()) {
      if (info.digest != digest) continue;
      found = true;
      NM_RETURN_IF_ERROR(remove_tag_locked(*info.ref));
    }
    if (!found) return not_found("image '" + digest.str() + "' is not in the store");
    return remove_blob_files_locked(digest);
  }

  Status remove_blob_files_locked(const Digest& digest) const {
    for (const std::string& path : {meta_path(digest), blob_path(digest)}) {
      if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
        return errno_status(errno, "remove '" + path + "'");
      }
      NM_RETURN_IF_ERROR(fsync_parent_dir(path));
    }
    return Status::ok();
  }

  std::vector<ImageInfo> list_tags_locked() const {
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
  const ImageStoreOptions options_;
  // Guards tags/, meta/, blob publication and removal, and flights_.
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<Flight>> flights_;  // by digest
  // Sizes of the blobs being transferred now. Counted whole against the free space while they
  // are written (conservative: the part already written is counted twice).
  uint64_t in_flight_bytes_ = 0;
  std::atomic<uint64_t> next_tmp_{0};
};

Status clear_stray_temp_files(const fs::path& root) {
  const auto remove = [](const fs::path& p) -> Status {
    std::error_code ec;
    fs::remove_all(p, ec);
    if (ec) return errno_status(ec.value(), "remove stray '" + p.string() + "'");
    return Status::ok();
  };
  for (const fs::path& entry : dir_entries(root / "tmp")) NM_RETURN_IF_ERROR(remove(entry));
  for (const fs::path& entry : dir_entries(root / "meta")) {
    if (entry.extension() == ".tmp") NM_RETURN_IF_ERROR(remove(entry));
  }
  for (const fs::path& name_dir : dir_entries(root / "tags")) {
    for (const fs::path& entry : dir_entries(name_dir)) {
      if (entry.extension() == ".tmp") NM_RETURN_IF_ERROR(remove(entry));
    }
  }
  return Status::ok();
}

}  // namespace

Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root,
                                                         ImageStoreOptions options) {
  std::error_code ec;
  const fs::path abs = fs::absolute(root, ec).lexically_normal();
  if (ec) return errno_status(ec.value(), "resolve image root '" + root + "'");
  for (const char* sub : {"sha256", "meta", "tags", "tmp"}) {
    NM_RETURN_IF_ERROR(make_dirs((abs / sub).string()));
  }
  NM_RETURN_IF_ERROR(clear_stray_temp_files(abs));
  if (!options.clock) options.clock = std::make_shared<SystemClock>();
  auto store = std::make_unique<DirImageStore>(abs, std::move(options));
  NM_RETURN_IF_ERROR(store->recover());
  return std::unique_ptr<ImageStore>(std::move(store));
}

}  // namespace nm
