// Shared-store manifests: `<name>/<tag>.json` in a shared image store says which blob a tag names.
//
//   {"digest": "sha256:<64 hex>", "size": 1073741824, "format": "qcow2", "kind": "disk"}
//
// All four fields are required; unknown fields are refused (a typo must not silently change what
// a host boots). The manifest is a claim: the puller checks the bytes against every field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/imagestore/image_store.h"

namespace nm {

// Manifests larger than this are refused before parsing.
inline constexpr size_t kMaxManifestBytes = size_t{64} * 1024;

struct ImageManifest {
  Digest digest;
  uint64_t size = 0;  // bytes of the blob; 1 .. 2^50
  ImageFormat format = ImageFormat::kRaw;
  ImageKind kind = ImageKind::kDisk;
  bool operator==(const ImageManifest&) const = default;
};

// InvalidArgument naming the field ("manifest.size: ...") and the rule. `what` names the
// manifest in messages (e.g. "manifest 'debian:12' from 'http://store/'"), prefixed to errors.
Result<ImageManifest> parse_image_manifest(std::string_view text, std::string_view what);
std::string image_manifest_to_json(const ImageManifest& m);

}  // namespace nm
