// The local image store: content-addressed blobs under <root>/sha256/<hex> and a tag catalog
// under <root>/tags/<name>/<tag>.json, both published by write-to-temp + fsync + rename.
//
// Minimal slice (issue 2): import a local file (passed as an fd, never a path from a caller),
// verified against a SHA-256 while streaming; resolve name:tag or digest; list; remove a tag.
// Shared-store pulls, GC and pinning come with the full image store.
//
// Threading: all methods are thread-safe; import() blocks and runs on a worker thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "nm/core/clock.h"
#include "nm/core/ids.h"
#include "nm/core/status.h"

namespace nm {

enum class ImageKind { kDisk, kKernel, kInitrd };
enum class ImageFormat { kRaw, kQcow2 };
std::string_view image_kind_name(ImageKind k);  // "disk", "kernel", "initrd"
Result<ImageKind> parse_image_kind(std::string_view s, std::string_view field);
std::string_view image_format_name(ImageFormat f);  // "raw", "qcow2"

struct ImageInfo {
  std::optional<ImageRef> ref;  // the tag, when resolved through one
  Digest digest;
  ImageKind kind = ImageKind::kDisk;
  ImageFormat format = ImageFormat::kRaw;  // detected from the bytes, never taken on trust
  uint64_t size = 0;                       // bytes of the blob
  uint64_t virtual_size = 0;               // guest-visible size (qcow2 header; = size for raw)
  std::optional<TenantId> tenant;          // set: private to that tenant; unset: public
  uint64_t imported_us = 0;
  std::string path;  // the blob's absolute path in the cache
};

// Called with bytes done so far and the total (0 when unknown).
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

class ImageStore {
 public:
  virtual ~ImageStore() = default;

  // Streams `fd` (read from its current offset to EOF) into the cache while hashing. Refuses with
  // InvalidArgument when the SHA-256 differs from `expected`, when a qcow2 has a backing file or
  // an external data file, or when the bytes are no known format; nothing is left behind then.
  // Re-importing the same bytes under the same tag is OK and returns the existing image; the same
  // tag for different bytes is AlreadyExists. `cancel` is polled between chunks (Cancelled jobs
  // report kConflict "cancelled").
  virtual Result<ImageInfo> import(const ImageRef& ref, int fd, const Digest& expected,
                                   ImageKind kind, const std::optional<TenantId>& tenant,
                                   const ProgressFn& progress, const std::atomic<bool>* cancel) = 0;

  // "name:tag" or "sha256:<hex>". NotFound when absent.
  virtual Result<ImageInfo> resolve(std::string_view ref_or_digest) const = 0;
  // One entry per tag, sorted by name then tag.
  virtual std::vector<ImageInfo> list() const = 0;
  // Removes a tag; removes the blob when no tag refers to it any more. The caller checks usage.
  virtual Status remove(std::string_view ref_or_digest) = 0;
};

// The directory-backed store. Creates <root> if needed and removes stray temp files of imports
// that a crash interrupted.
//
// Layout: <root>/sha256/<hex> blobs (mode 0444), <root>/tags/<name>/<tag>.json catalog entries
// ({digest, kind, format, size, virtual_size, tenant?, imported_us}), <root>/tmp/ in-flight
// imports. Details of the directory adapter:
// - import() of a tag that already exists answers from the catalog without reading `fd`: the
//   same digest, kind and tenant return the existing image, anything else is AlreadyExists.
// - A kernel or initrd must be raw. The progress total is the regular file's size from its
//   current offset (0 for pipes). Running out of space is Unavailable; the temp file is removed.
// - Cancellation returns Status(kConflict, "import cancelled").
// - resolve() of a digest returns the metadata of the first tag (by name, then tag) holding it,
//   with `ref` unset; NotFound when no tag holds it.
// - remove() of a digest removes every tag holding it, then the blob.
Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root);
// As above with an injected clock for `imported_us` (the one-argument form uses SystemClock).
Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root,
                                                         std::shared_ptr<const Clock> clock);

}  // namespace nm
