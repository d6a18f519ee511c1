#include "nm/imagestore/manifest.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

namespace nm {
namespace {

constexpr std::string_view kDigest =
    "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

std::string manifest_text(const std::string& fields) {
  return R"({"digest": ")" + std::string(kDigest) + R"(", )" + fields + "}";
}

Status parse_error(const std::string& text) {
  return parse_image_manifest(text, "manifest 'debian:12' from 'dir:/srv'").status();
}

TEST(ImageManifest, ParsesAllFourFields) {
  auto m = parse_image_manifest(
      manifest_text(R"("size": 1073741824, "format": "qcow2", "kind": "disk")"), "m");
  ASSERT_TRUE(m.is_ok()) << m.status().to_string();
  EXPECT_EQ(m->digest.str(), kDigest);
  EXPECT_EQ(m->size, uint64_t{1} << 30);
  EXPECT_EQ(m->format, ImageFormat::kQcow2);
  EXPECT_EQ(m->kind, ImageKind::kDisk);

  auto kernel =
      parse_image_manifest(manifest_text(R"("size": 1, "format": "raw", "kind": "kernel")"), "m");
  ASSERT_TRUE(kernel.is_ok()) << kernel.status().to_string();
  EXPECT_EQ(kernel->format, ImageFormat::kRaw);
  EXPECT_EQ(kernel->kind, ImageKind::kKernel);
}

TEST(ImageManifest, RoundTripsThroughJson) {
  const ImageManifest m{.digest = Digest::trusted(std::string(kDigest)),
                        .size = 123456789,
                        .format = ImageFormat::kRaw,
                        .kind = ImageKind::kInitrd};
  auto back = parse_image_manifest(image_manifest_to_json(m), "m");
  ASSERT_TRUE(back.is_ok()) << back.status().to_string();
  EXPECT_EQ(*back, m);
}

TEST(ImageManifest, ErrorsArePrefixedWithWhatAndNameTheField) {
  const Status s = parse_error(manifest_text(R"("size": 0, "format": "raw", "kind": "disk")"));
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "manifest 'debian:12' from 'dir:/srv': manifest.size: must be between 1 and "
            "1125899906842624, got 0");
}

TEST(ImageManifest, EachFieldIsRequired) {
  for (const std::string field : {"digest", "size", "format", "kind"}) {
    nlohmann::json j =
        nlohmann::json::parse(manifest_text(R"("size": 10, "format": "raw", "kind": "disk")"));
    j.erase(field);
    const Status s = parse_error(j.dump());
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << field;
    EXPECT_NE(s.message().find("manifest." + field + ": is required"), std::string::npos)
        << s.message();
  }
}

TEST(ImageManifest, RefusesUnknownFieldsAndDuplicates) {
  Status s = parse_error(
      manifest_text(R"("size": 10, "format": "raw", "kind": "disk", "fromat": "qcow2")"));
  EXPECT_NE(s.message().find("manifest.fromat: unknown field"), std::string::npos) << s.message();
  s = parse_error(manifest_text(R"("size": 10, "size": 11, "format": "raw", "kind": "disk")"));
  EXPECT_NE(s.message().find("manifest.size: appears more than once"), std::string::npos)
      << s.message();
}

TEST(ImageManifest, RefusesBadValues) {
  struct Case {
    std::string fields;
    std::string expected;
  };
  const Case cases[] = {
      {R"("size": 1125899906842625, "format": "raw", "kind": "disk")", "manifest.size: must be"},
      {R"("size": -1, "format": "raw", "kind": "disk")", "manifest.size: must be"},
      {R"("size": "10", "format": "raw", "kind": "disk")", "manifest.size: must be an integer"},
      {R"("size": 10.0, "format": "raw", "kind": "disk")", "manifest.size: must be an integer"},
      {R"("size": 10, "format": "vmdk", "kind": "disk")",
       "manifest.format: 'vmdk' is not an image format"},
      {R"("size": 10, "format": "raw", "kind": "floppy")", "manifest.kind: 'floppy'"},
      {R"("size": 10, "format": 1, "kind": "disk")", "manifest.format: must be a string"},
  };
  for (const Case& c : cases) {
    const Status s = parse_error(manifest_text(c.fields));
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << c.fields;
    EXPECT_NE(s.message().find(c.expected), std::string::npos) << s.message();
  }
  const Status digest = parse_error(R"({"digest": "sha256:ABC", "size": 1, "format": "raw",
                                        "kind": "disk"})");
  EXPECT_NE(digest.message().find("manifest.digest: 'sha256:ABC' is not"), std::string::npos)
      << digest.message();
  const Status md5 = parse_error(R"({"digest": "md5:00", "size": 1, "format": "raw",
                                     "kind": "disk"})");
  EXPECT_EQ(md5.code(), Code::kInvalidArgument);
}

TEST(ImageManifest, RefusesMalformedNonObjectAndOversizedDocuments) {
  EXPECT_NE(parse_error("{").message().find("manifest: malformed JSON"), std::string::npos);
  EXPECT_NE(parse_error("[]").message().find("manifest: must be a JSON object"), std::string::npos);
  const std::string big = manifest_text(R"("size": 10, "format": "raw", "kind": "disk")") +
                          std::string(kMaxManifestBytes, ' ');
  EXPECT_NE(parse_error(big).message().find("bytes, the limit is 65536"), std::string::npos);
}

}  // namespace
}  // namespace nm
