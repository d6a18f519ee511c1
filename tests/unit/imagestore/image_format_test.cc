#include "nm/imagestore/image_format.h"

#include <gtest/gtest.h>

#include <vector>

namespace nm {
namespace {

void put_be32(std::vector<uint8_t>& b, size_t off, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) b[off + i] = static_cast<uint8_t>((v >> (24 - 8 * i)) & 0xff);
}
void put_be64(std::vector<uint8_t>& b, size_t off, uint64_t v) {
  put_be32(b, off, static_cast<uint32_t>(v >> 32));
  put_be32(b, off + 4, static_cast<uint32_t>(v));
}

std::vector<uint8_t> qcow2_head(uint32_t version, uint64_t virtual_size) {
  std::vector<uint8_t> b(kImageHeadBytes, 0);
  b[0] = 'Q';
  b[1] = 'F';
  b[2] = 'I';
  b[3] = 0xfb;
  put_be32(b, 4, version);
  put_be64(b, 24, virtual_size);
  return b;
}

TEST(DetectImageFormat, AnythingWithoutTheMagicIsRawOfItsOwnSize) {
  const std::vector<uint8_t> head = {'Q', 'F', 'I'};
  EXPECT_EQ(*detect_image_format(head, 3), (DetectedFormat{ImageFormat::kRaw, 3}));
  EXPECT_EQ(*detect_image_format({}, 0), (DetectedFormat{ImageFormat::kRaw, 0}));
  std::vector<uint8_t> elf(kImageHeadBytes, 0x7f);
  EXPECT_EQ(*detect_image_format(elf, 1 << 20), (DetectedFormat{ImageFormat::kRaw, 1 << 20}));
}

TEST(DetectImageFormat, Qcow2VirtualSizeComesFromTheHeader) {
  EXPECT_EQ(*detect_image_format(qcow2_head(3, 10'000'000'000), 200'000),
            (DetectedFormat{ImageFormat::kQcow2, 10'000'000'000}));
  auto v2 = qcow2_head(2, 1 << 30);
  v2.resize(72);
  EXPECT_EQ(*detect_image_format(v2, 72), (DetectedFormat{ImageFormat::kQcow2, 1 << 30}));
}

TEST(DetectImageFormat, RefusesDangerousOrUnsupportedQcow2) {
  auto backing = qcow2_head(2, 1 << 30);
  put_be64(backing, 8, 0x200);
  auto data_file = qcow2_head(3, 1 << 30);
  put_be64(data_file, 72, 1u << 2);
  auto corrupt = qcow2_head(3, 1 << 30);
  put_be64(corrupt, 72, 1u << 1);
  auto encrypted = qcow2_head(3, 1 << 30);
  put_be32(encrypted, 32, 2);
  auto v1 = qcow2_head(1, 1 << 30);
  auto truncated_v3 = qcow2_head(3, 1 << 30);
  truncated_v3.resize(80);
  auto truncated = qcow2_head(2, 1 << 30);
  truncated.resize(40);
  for (const auto* head :
       {&backing, &data_file, &corrupt, &encrypted, &v1, &truncated_v3, &truncated}) {
    auto r = detect_image_format(*head, head->size());
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
  }
  EXPECT_NE(detect_image_format(backing, 104).status().message().find("backing file"),
            std::string::npos);
  EXPECT_NE(detect_image_format(data_file, 104).status().message().find("external data file"),
            std::string::npos);
}

}  // namespace
}  // namespace nm
