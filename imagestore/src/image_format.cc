#include "nm/imagestore/image_format.h"

#include <string>

namespace nm {
namespace {

constexpr uint8_t kQcow2Magic[4] = {'Q', 'F', 'I', 0xfb};
constexpr size_t kQcow2V2HeaderBytes = 72;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatDataFile = 1ull << 2;

uint32_t be32(std::span<const uint8_t> b, size_t off) {
  return (uint32_t{b[off]} << 24) | (uint32_t{b[off + 1]} << 16) | (uint32_t{b[off + 2]} << 8) |
         uint32_t{b[off + 3]};
}

uint64_t be64(std::span<const uint8_t> b, size_t off) {
  return (uint64_t{be32(b, off)} << 32) | be32(b, off + 4);
}

Status refused(const std::string& why) {
  return invalid_argument("image: qcow2 " + why);
}

}  // namespace

Result<DetectedFormat> detect_image_format(std::span<const uint8_t> head, uint64_t size) {
  const bool qcow2 = head.size() >= sizeof kQcow2Magic && head[0] == kQcow2Magic[0] &&
                     head[1] == kQcow2Magic[1] && head[2] == kQcow2Magic[2] &&
                     head[3] == kQcow2Magic[3];
  if (!qcow2) return DetectedFormat{ImageFormat::kRaw, size};

  if (head.size() < kQcow2V2HeaderBytes) return refused("header is truncated");
  const uint32_t version = be32(head, 4);
  if (version != 2 && version != 3) {
    return refused("version " + std::to_string(version) + " is not supported (2 or 3)");
  }
  if (be64(head, 8) != 0) return refused("images with a backing file are refused");
  if (be32(head, 32) != 0) return refused("encrypted images are not supported");
  if (version == 3) {
    if (head.size() < kImageHeadBytes) return refused("version 3 header is truncated");
    const uint64_t incompatible = be64(head, 72);
    if ((incompatible & kIncompatDataFile) != 0) {
      return refused("images with an external data file are refused");
    }
    if ((incompatible & kIncompatCorrupt) != 0) return refused("image is marked corrupt");
  }
  return DetectedFormat{ImageFormat::kQcow2, be64(head, 24)};
}

}  // namespace nm
