#include "nm/core/fs.h"

#include <gtest/gtest.h>

#include <filesystem>

namespace nm {
namespace {

TEST(WriteFileAtomic, ReplacesContentAndLeavesNoTempFile) {
  const auto dir = std::filesystem::path(::testing::TempDir()) / "fs_test_atomic";
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(make_dirs(dir.string()).is_ok());
  const std::string path = (dir / "f.json").string();
  ASSERT_TRUE(write_file_atomic(path, "one").is_ok());
  ASSERT_TRUE(write_file_atomic(path, "two").is_ok());
  EXPECT_EQ(*read_file(path), "two");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  EXPECT_EQ(read_file((dir / "missing").string()).status().code(), Code::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace nm
