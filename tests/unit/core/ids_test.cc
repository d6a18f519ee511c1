#include "nm/core/ids.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace nm {
namespace {

TEST(Names, AcceptDnsLabelsAndRefuseEverythingElse) {
  EXPECT_TRUE(VmName::parse("web-1", "spec.name").is_ok());
  EXPECT_TRUE(VmName::parse(std::string(63, 'a'), "spec.name").is_ok());
  for (const char* bad : {"", "-web", "Web", "web_1", "web 1", "a<b", "a&b", "a\"b", "ü"}) {
    auto r = VmName::parse(bad, "spec.name");
    ASSERT_FALSE(r.is_ok()) << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
    EXPECT_NE(r.status().message().find("spec.name"), std::string::npos);
  }
  EXPECT_FALSE(VmName::parse(std::string(64, 'a'), "spec.name").is_ok());
}

TEST(VmIds, GeneratedIdsAreValidAndDistinct) {
  const VmId a = generate_vm_id();
  const VmId b = generate_vm_id();
  EXPECT_NE(a, b);
  EXPECT_TRUE(VmId::parse(a.str(), "id").is_ok());
  EXPECT_EQ(a.str()[14], '4');
  EXPECT_FALSE(VmId::parse("3F1C0000-0000-4000-8000-000000000000", "id").is_ok());
  // Random version-4 UUIDs: the version and variant bits set, the other 122 bits never repeat.
  std::set<std::string> seen;
  for (int i = 0; i < 1000; ++i) {
    const std::string id = generate_vm_id().str();
    EXPECT_EQ(id[14], '4') << id;
    EXPECT_NE(std::string("89ab").find(id[19]), std::string::npos) << id;
    seen.insert(id);
  }
  EXPECT_EQ(seen.size(), 1000u);
}

TEST(Digests, RequireSha256PrefixAndLowercaseHex) {
  EXPECT_TRUE(Digest::parse("sha256:" + std::string(64, 'a'), "d").is_ok());
  EXPECT_FALSE(Digest::parse(std::string(64, 'a'), "d").is_ok());
  EXPECT_FALSE(Digest::parse("sha256:" + std::string(64, 'A'), "d").is_ok());
  EXPECT_FALSE(Digest::parse("sha256:" + std::string(63, 'a'), "d").is_ok());
}

TEST(ImageRefs, SplitNameAndTag) {
  auto r = ImageRef::parse("busybox-guest:1.2_rc", "image");
  ASSERT_TRUE(r.is_ok());
  EXPECT_EQ(r->name, "busybox-guest");
  EXPECT_EQ(r->tag, "1.2_rc");
  for (const char* bad : {"busybox", "busybox:", ":1", "Busy:1", "a:../x", "a:b/c"}) {
    EXPECT_FALSE(ImageRef::parse(bad, "image").is_ok()) << bad;
  }
}

TEST(RequestIds, BoundedCharset) {
  EXPECT_TRUE(RequestId::parse("req-1:retry.2_x", "request_id").is_ok());
  EXPECT_FALSE(RequestId::parse("", "request_id").is_ok());
  EXPECT_FALSE(RequestId::parse("a b", "request_id").is_ok());
  EXPECT_FALSE(RequestId::parse(std::string(129, 'a'), "request_id").is_ok());
}

}  // namespace
}  // namespace nm
