// Image sources: where the local cache pulls from. A shared store is either a directory (an NFS
// or CephFS mount in production, a folder in tests) or an http:// base URL, with the same layout:
//
//   <base>/<name>/<tag>.json          manifest (nm/imagestore/manifest.h)
//   <base>/blobs/sha256/<64 hex>      blob, addressed by its SHA-256
//
// Names and tags follow ImageRef's rules, so no reference can escape <base>.
//
// Threading: a source is used by many worker threads at once; every method is thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/imagestore/manifest.h"

namespace nm {

// Receives the blob's bytes in order. A non-OK Status stops the transfer and is returned by
// fetch() as is.
using BlobSink = std::function<Status(std::span<const uint8_t> chunk)>;

class ImageSource {
 public:
  virtual ~ImageSource() = default;

  // "dir:/srv/images" or "http://10.0.0.5:8080/images/": used in messages and events.
  virtual const std::string& describe() const = 0;

  // NotFound when the source has no such tag; Unavailable when the source cannot be reached or
  // answers with an error other than "not found"; InvalidArgument for a malformed manifest.
  virtual Result<ImageManifest> manifest(const ImageRef& ref) = 0;

  // Streams blob `digest` to `sink`. The source neither hashes nor keeps anything; it checks the
  // length: Unavailable ("... truncated: N of M bytes") when the blob ends early or the connection
  // drops, InvalidArgument ("... is larger than the manifest's size M") when it is longer (it stops
  // reading at M + 1 bytes). NotFound when the blob is missing. `cancel` is polled between chunks;
  // cancelled transfers return Status(kConflict, "cancelled").
  virtual Status fetch(const Digest& digest, uint64_t size, const BlobSink& sink,
                       const std::atomic<bool>* cancel) = 0;
};

// The directory need not exist yet (a mount may come later): while `root` is missing or not a
// directory, manifest() and fetch() answer Unavailable. Reads go in 1 MiB chunks.
Result<std::unique_ptr<ImageSource>> open_dir_image_source(const std::string& root);

struct HttpSourceOptions {
  std::chrono::milliseconds connect_timeout{5000};
  // A transfer slower than 1 KiB/s for this long is abandoned (a server that went away without
  // closing the connection): the rate is judged per window of this length, so a stall is noticed
  // after one to two windows.
  std::chrono::milliseconds stall_timeout{10000};
};
// One libcurl easy handle per request; only http:// (redirects are not followed: a 3xx is
// Unavailable); proxies from the environment are not used. Blobs reach the sink in chunks of
// 1 MiB (the last one shorter).
// `base_url` must start with "http://"; a missing trailing '/' is added.
Result<std::unique_ptr<ImageSource>> open_http_image_source(const std::string& base_url,
                                                            HttpSourceOptions options = {});

// From a configuration value: "http://..." is an HTTP source, "dir:/path" or an absolute path a
// directory source. InvalidArgument naming `field` otherwise.
Result<std::unique_ptr<ImageSource>> open_image_source(std::string_view spec,
                                                       std::string_view field);

}  // namespace nm
