// The image cache on a full disk: a small tmpfs mounted in the test's private mount namespace.
// A pull that cannot fit is refused before any byte moves; a pull that runs out of space while
// writing stops with InsufficientCapacity. Either way no temp file, blob, metadata or tag is left.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <sys/mount.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include "nm/core/fs.h"
#include "nm/imagestore/image_source.h"
#include "nm/imagestore/image_store.h"
#include "unit/imagestore/test_support.h"

namespace nm {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kMiB = uint64_t{1} << 20;

using test::count_entries;
using test::pattern_bytes;
using test::sha256_hex;
using test::write_bytes;

// A directory source that runs `after_first_chunk` once, after delivering the first chunk.
class HookedSource final : public ImageSource {
 public:
  HookedSource(std::unique_ptr<ImageSource> inner, std::function<void()> after_first_chunk)
      : inner_(std::move(inner)), hook_(std::move(after_first_chunk)) {}
  const std::string& describe() const override { return inner_->describe(); }
  Result<ImageManifest> manifest(const ImageRef& ref) override { return inner_->manifest(ref); }
  Status fetch(const Digest& digest, uint64_t size, const BlobSink& sink,
               const std::atomic<bool>* cancel) override {
    bool first = true;
    return inner_->fetch(
        digest, size,
        [&](std::span<const uint8_t> chunk) {
          NM_RETURN_IF_ERROR(sink(chunk));
          if (first && hook_) hook_();
          first = false;
          return Status::ok();
        },
        cancel);
  }

 private:
  std::unique_ptr<ImageSource> inner_;
  std::function<void()> hook_;
};

class ImageStoreDiskFull : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / ("image_store_disk_full_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    small_ = dir_ / "small";
    fs::create_directories(small_);
    ASSERT_EQ(::mount("tmpfs", small_.c_str(), "tmpfs", 0, "size=32m"), 0)
        << "mount a 32 MiB tmpfs: " << std::strerror(errno);
    mounted_ = true;
    auto s = open_dir_image_store((small_ / "images").string(),
                                  ImageStoreOptions{.reserve_bytes = 0, .clock = nullptr});
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    store_ = std::move(s).value();
  }
  void TearDown() override {
    store_.reset();
    if (mounted_) {
      EXPECT_EQ(::umount2(small_.c_str(), MNT_DETACH), 0);
    }
    fs::remove_all(dir_);
  }

  // Puts an image of `size` bytes into a shared directory store on the big disk.
  std::unique_ptr<ImageSource> shared_image(const std::string& name, size_t size) {
    const std::string data = pattern_bytes(size, 'd');
    const std::string hex = sha256_hex(data);
    write_bytes(dir_ / "shared" / "blobs" / "sha256" / hex, data);
    const ImageManifest m{.digest = Digest::trusted("sha256:" + hex), .size = size};
    write_bytes(dir_ / "shared" / name / "1.json", image_manifest_to_json(m));
    auto source = open_dir_image_source((dir_ / "shared").string());
    EXPECT_TRUE(source.is_ok());
    return std::move(source).value();
  }

  void expect_nothing_left(const std::string& ref) {
    EXPECT_EQ(count_entries(small_ / "images" / "tmp"), 0u);
    EXPECT_EQ(count_entries(small_ / "images" / "sha256"), 0u);
    EXPECT_EQ(count_entries(small_ / "images" / "meta"), 0u);
    EXPECT_EQ(store_->resolve(ref).status().code(), Code::kNotFound);
  }

  fs::path dir_;
  fs::path small_;
  bool mounted_ = false;
  std::unique_ptr<ImageStore> store_;
};

TEST_F(ImageStoreDiskFull, AnImageLargerThanTheFreeSpaceIsRefusedBeforeTransfer) {
  auto source = shared_image("big", 64 * kMiB);
  ImageSource* const sources[] = {source.get()};
  uint64_t moved = 0;
  const Status s = store_
                       ->pull(
                           *ImageRef::parse("big:1", "ref"), sources,
                           [&](uint64_t done, uint64_t) { moved = done; }, nullptr)
                       .status();
  EXPECT_EQ(s.code(), Code::kInsufficientCapacity) << s.to_string();
  EXPECT_NE(s.message().find("needs 67108864"), std::string::npos) << s.message();
  EXPECT_EQ(moved, 0u);
  expect_nothing_left("big:1");
}

TEST_F(ImageStoreDiskFull, RunningOutOfSpaceMidPullLeavesNothingAndAfterwardsThePullWorks) {
  const fs::path filler = small_ / "filler";
  auto source = std::make_unique<HookedSource>(shared_image("mid", 24 * kMiB), [&] {
    // Someone else fills the disk while the pull is writing.
    write_bytes(filler, std::string(20 * kMiB, 'f'));
  });
  ImageSource* const sources[] = {source.get()};
  const ImageRef ref = *ImageRef::parse("mid:1", "ref");
  const Status s = store_->pull(ref, sources, nullptr, nullptr).status();
  EXPECT_EQ(s.code(), Code::kInsufficientCapacity) << s.to_string();
  EXPECT_NE(s.message().find("ran out of space"), std::string::npos) << s.message();
  expect_nothing_left("mid:1");

  fs::remove(filler);
  auto plain = open_dir_image_source((dir_ / "shared").string());
  ASSERT_TRUE(plain.is_ok());
  ImageSource* const again[] = {plain->get()};
  auto ok = store_->pull(ref, again, nullptr, nullptr);
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(ok->info.size, 24 * kMiB);
  EXPECT_EQ(count_entries(small_ / "images" / "tmp"), 0u);
}

}  // namespace
}  // namespace nm
