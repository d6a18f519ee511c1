// The local image store: content-addressed blobs under <root>/sha256/<hex> and a tag catalog
// under <root>/tags/<name>/<tag>.json, both published by write-to-temp + fsync + rename.
//
// Images enter the cache by import (a local file passed as an fd, never a path from a caller) or by
// pull from shared stores (nm/imagestore/image_source.h). Either way the bytes stream into a temp
// file while hashed, the format is detected from the bytes, and only a verified blob is published
// (fsync + rename). Per blob the store keeps metadata (kind, format, sizes, tenant, pin, last use);
// tags name blobs. Which VMs use a blob is the caller's knowledge (the state database), passed to
// plan_image_gc().
//
// Threading: all methods are thread-safe; import(), pull() and verify() block and run on worker
// threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_set>
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
  std::string path;           // the blob's absolute path in the cache
  bool pinned = false;        // pinned blobs are never garbage-collected
  uint64_t last_used_us = 0;  // last touch() (a VM disk made from it); imported_us before that
};

// One cached blob and the tags that name it (possibly none: a tag moved on, or it was untagged).
struct BlobInfo {
  ImageInfo info;              // info.ref unset
  std::vector<ImageRef> tags;  // sorted
};

struct PullResult {
  ImageInfo info;            // the tag as now cached
  bool transferred = false;  // this call moved the bytes (false: cached already, or joined another)
  bool joined = false;       // waited for a transfer of the same digest that another call led
  std::string source;        // describe() of the source whose manifest was used
};

struct VerifyResult {
  Digest digest;
  bool ok = false;
  std::string problem;  // when !ok: "digest is sha256:..." / "size is N, expected M" / "missing"
};

class ImageSource;

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

  // Makes `ref` available from the first source (in order) whose manifest() does not answer
  // NotFound; an Unavailable source is skipped too, but if none has the tag and one was
  // Unavailable, the result is Unavailable (not NotFound). Pulled images are public (no tenant).
  // - The manifest is always consulted: if the tag is cached with the manifest's digest, nothing is
  //   transferred; if the manifest names another digest, the new blob is pulled and the tag moves
  //   (the old blob stays, resolvable by digest, until removed or collected).
  // - Single flight: concurrent pulls of one digest (through any tags) make one transfer; the
  //   others wait for it and share its outcome, success or failure (`joined`). A joiner's
  //   `progress` sees the transfer's bytes; a joiner's `cancel` only stops its own wait. A leader
  //   that is cancelled does not fail its joiners: they start over and one of them leads.
  //   A failed transfer is not remembered: the next pull tries again.
  // - The bytes are checked against the manifest: size, SHA-256 and the format detected from the
  //   bytes (detect_image_format: a qcow2 with a backing or data file is refused). Any mismatch is
  //   InvalidArgument naming the manifest field; nothing is published and the temp file is gone.
  // - Before transferring, the cache filesystem must keep `reserve_bytes` free after the blob:
  //   otherwise InsufficientCapacity. ENOSPC while writing is InsufficientCapacity as well.
  // - A blob cached already is checked against the manifest's size and format (no transfer).
  // - A tag that a tenant imported (private) is not replaced: AlreadyExists.
  // - Cancelled (the leader's `cancel`): Status(kConflict, "pull cancelled").
  virtual Result<PullResult> pull(const ImageRef& ref, std::span<ImageSource* const> sources,
                                  const ProgressFn& progress, const std::atomic<bool>* cancel) = 0;

  // Every cached blob with its tags, sorted by digest.
  virtual std::vector<BlobInfo> list_blobs() const = 0;
  // Pin or unpin the blob (durable before return). NotFound when absent.
  virtual Status set_pinned(const Digest& digest, bool pinned) = 0;
  // Records a use now (durable before return); a use less than a minute after the recorded one
  // is not written again (last_used_us is minute-grained). NotFound when absent.
  virtual Status touch(const Digest& digest) = 0;
  // Re-hashes one blob (streaming, `progress` in bytes) and compares with its digest and size.
  // Corruption is a VerifyResult with ok=false, not an error; errors are I/O problems.
  virtual Result<VerifyResult> verify(const Digest& digest, const ProgressFn& progress,
                                      const std::atomic<bool>* cancel) const = 0;
  // Removes a blob and every tag naming it. NotFound when absent. The caller checks usage.
  virtual Status remove_blob(const Digest& digest) = 0;
};

struct ImageStoreOptions {
  // Bytes pull() keeps free on the cache filesystem (see pull()). Default 1 GiB.
  uint64_t reserve_bytes = uint64_t{1} << 30;
  std::shared_ptr<const Clock> clock;  // null: SystemClock
};

// ---- Garbage collection (pure) ----

struct GcCandidate {
  Digest digest;
  uint64_t size = 0;
  std::vector<ImageRef> tags;
};
struct GcPlan {
  std::vector<GcCandidate> remove;  // sorted by digest
  uint64_t bytes = 0;               // sum of their sizes
};
// A blob is removed when it is not in `in_use` (digests the state database's VMs reference as disk
// base, kernel or initrd, plus any a running job holds), not pinned, and its last use
// (max(imported_us, last_used_us)) is at least `min_age_us` before `now_us`.
GcPlan plan_image_gc(const std::vector<BlobInfo>& blobs,
                     const std::unordered_set<std::string>& in_use, uint64_t now_us,
                     uint64_t min_age_us);

// The directory-backed store. Creates <root> if needed and removes stray temp files of imports
// and pulls that a crash interrupted.
//
// Layout: <root>/sha256/<hex> blobs (mode 0444), <root>/meta/<hex>.json per-blob metadata
// ({kind, format, size, virtual_size, tenant?, imported_us, pinned, last_used_us}),
// <root>/tags/<name>/<tag>.json catalog entries ({digest, kind, format, size, virtual_size,
// tenant?, imported_us}), <root>/tmp/ in-flight imports and pulls. Blob and metadata are
// published before a tag names them; a blob without metadata (a crash in between) is removed at
// open; metadata is created at open for blobs whose tags predate it. Details:
// - import() of a tag that already exists answers from the catalog without reading `fd`: the
//   same digest, kind and tenant return the existing image, anything else is AlreadyExists.
// - A kernel or initrd must be raw. The progress total is the regular file's size from its
//   current offset (0 for pipes). Running out of space is Unavailable; the temp file is removed.
// - Cancellation returns Status(kConflict, "import cancelled").
// - resolve() of a digest reads its metadata (O(1)), with `ref` unset; NotFound when absent.
// - remove() of a digest removes every tag holding it, then the blob.
Result<std::unique_ptr<ImageStore>> open_dir_image_store(const std::string& root,
                                                         ImageStoreOptions options = {});

}  // namespace nm
