// Image format detection from the first bytes of an image: a pure function, so it can be unit
// tested and fuzzed without files.
//
// qcow2 images are recognised by their magic 'QFI\xfb' and their header is checked for the two
// features that make QEMU open another host file on the image's behalf (a known host-file
// disclosure vector): a backing file and an external data file. Both are refused. Anything else is
// raw, whose virtual size is its byte size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "nm/core/status.h"
#include "nm/imagestore/image_store.h"

namespace nm {

// Bytes of the image's beginning that detect_image_format() needs to see (the qcow2 v3 header
// up to and including its header_length field). Shorter heads are fine for short images.
inline constexpr size_t kImageHeadBytes = 104;

struct DetectedFormat {
  ImageFormat format = ImageFormat::kRaw;
  uint64_t virtual_size = 0;  // guest-visible size in bytes
  bool operator==(const DetectedFormat&) const = default;
};

// `head`: the first min(size, kImageHeadBytes) bytes of the image; `size`: its total byte size.
// InvalidArgument (naming the rule) for a qcow2 with a backing file, an external data file, the
// corrupt bit, an unsupported version or a truncated header.
Result<DetectedFormat> detect_image_format(std::span<const uint8_t> head, uint64_t size);

}  // namespace nm
