#include "nm/imagestore/image_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "nm/core/fs.h"
#include "test_support.h"

namespace nm {
namespace {

namespace fs = std::filesystem;

using test::digest_of;
using test::FakeClock;
using test::image_ref;
using test::sha256_hex;

void put_be32(std::string& b, size_t off, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) b[off + i] = static_cast<char>((v >> (24 - 8 * i)) & 0xff);
}
void put_be64(std::string& b, size_t off, uint64_t v) {
  put_be32(b, off, static_cast<uint32_t>(v >> 32));
  put_be32(b, off + 4, static_cast<uint32_t>(v));
}

// A qcow2 v3 header followed by zero padding: enough for format detection.
std::string qcow2_bytes(uint64_t virtual_size, uint64_t backing_offset, uint64_t incompatible) {
  std::string b(4096, '\0');
  b[0] = 'Q';
  b[1] = 'F';
  b[2] = 'I';
  b[3] = static_cast<char>(0xfb);
  put_be32(b, 4, 3);
  put_be64(b, 8, backing_offset);
  put_be32(b, 20, 16);
  put_be64(b, 24, virtual_size);
  put_be64(b, 72, incompatible);
  put_be32(b, 96, 4);
  put_be32(b, 100, 104);
  return b;
}

std::string pattern_bytes(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + static_cast<char>(i % 251));
  return s;
}

size_t count_entries(const fs::path& dir) {
  if (!fs::exists(dir)) return 0;
  return static_cast<size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}));
}

class DirImageStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("imagestore_test_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    root_ = dir_ / "images";
    clock_ = std::make_shared<FakeClock>();
    reopen();
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }

  void reopen() {
    store_.reset();
    auto s = open_dir_image_store(root_.string(), ImageStoreOptions{.clock = clock_});
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    store_ = std::move(s).value();
  }

  // Writes `data` to a source file and returns an fd open on it.
  UniqueFd source(const std::string& data) {
    const fs::path p = dir_ / ("src-" + std::to_string(next_src_++));
    std::ofstream(p, std::ios::binary)
        .write(data.data(), static_cast<std::streamsize>(data.size()));
    UniqueFd fd(::open(p.c_str(), O_RDONLY | O_CLOEXEC));
    EXPECT_TRUE(fd.valid());
    return fd;
  }

  Result<ImageInfo> import(const std::string& r, const std::string& data,
                           ImageKind kind = ImageKind::kDisk,
                           const std::optional<Digest>& expected = std::nullopt) {
    UniqueFd fd = source(data);
    return store_->import(image_ref(r), fd.get(), expected.value_or(digest_of(data)), kind,
                          std::nullopt, nullptr, nullptr);
  }

  fs::path blob(const std::string& data) const { return root_ / "sha256" / sha256_hex(data); }

  fs::path dir_;
  fs::path root_;
  std::shared_ptr<FakeClock> clock_;
  std::unique_ptr<ImageStore> store_;
  int next_src_ = 0;
};

TEST_F(DirImageStoreTest, ImportsRawImageAsReadOnlyContentAddressedBlob) {
  const std::string data = pattern_bytes(size_t{3} * 1024 * 1024 + 17, 'a');
  UniqueFd fd = source(data);
  std::vector<std::pair<uint64_t, uint64_t>> calls;
  auto info = store_->import(
      image_ref("busybox:1"), fd.get(), digest_of(data), ImageKind::kDisk,
      TenantId::trusted("contoso"),
      [&](uint64_t done, uint64_t total) { calls.emplace_back(done, total); }, nullptr);
  ASSERT_TRUE(info.is_ok()) << info.status().to_string();

  EXPECT_EQ(info->digest, digest_of(data));
  EXPECT_EQ(info->size, data.size());
  EXPECT_EQ(info->virtual_size, data.size());
  EXPECT_EQ(info->format, ImageFormat::kRaw);
  EXPECT_EQ(info->kind, ImageKind::kDisk);
  EXPECT_EQ(info->tenant, TenantId::trusted("contoso"));
  EXPECT_EQ(info->ref, image_ref("busybox:1"));
  EXPECT_EQ(info->path, blob(data).string());
  EXPECT_EQ(*read_file(info->path), data);

  struct stat st {};
  ASSERT_EQ(::stat(info->path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0444u);

  ASSERT_GE(calls.size(), 4u);  // 1 MiB chunks
  EXPECT_EQ(calls.back(), std::make_pair(uint64_t{data.size()}, uint64_t{data.size()}));
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
}

TEST_F(DirImageStoreTest, DigestIsTheStandardSha256) {
  auto info = import("abc:1", "abc");
  ASSERT_TRUE(info.is_ok()) << info.status().to_string();
  EXPECT_EQ(info->digest.str(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_F(DirImageStoreTest, CatalogSurvivesReopenAndResolvesByTagAndDigest) {
  const std::string data = pattern_bytes(5000, 'x');
  auto first = import("debian:12.5", data);
  ASSERT_TRUE(first.is_ok()) << first.status().to_string();
  reopen();

  auto by_tag = store_->resolve("debian:12.5");
  ASSERT_TRUE(by_tag.is_ok()) << by_tag.status().to_string();
  EXPECT_EQ(by_tag->digest, first->digest);
  EXPECT_EQ(by_tag->imported_us, first->imported_us);
  EXPECT_EQ(by_tag->path, first->path);

  auto by_digest = store_->resolve(first->digest.str());
  ASSERT_TRUE(by_digest.is_ok()) << by_digest.status().to_string();
  EXPECT_EQ(by_digest->digest, first->digest);
  EXPECT_FALSE(by_digest->ref.has_value());
  EXPECT_EQ(by_digest->size, data.size());

  EXPECT_EQ(store_->resolve("debian:11").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->resolve(digest_of("other").str()).status().code(), Code::kNotFound);
  EXPECT_EQ(store_->resolve("../etc:passwd").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(store_->resolve("sha256:xyz").status().code(), Code::kInvalidArgument);
}

TEST_F(DirImageStoreTest, WrongSha256IsRefusedAndLeavesNothing) {
  const std::string data = pattern_bytes(size_t{2} * 1024 * 1024, 'q');
  auto info = import("bad:1", data, ImageKind::kDisk, digest_of("something else"));
  ASSERT_EQ(info.status().code(), Code::kInvalidArgument);
  EXPECT_NE(info.status().message().find(sha256_hex(data)), std::string::npos)
      << info.status().message();
  EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(count_entries(root_ / "tags"), 0u);
  EXPECT_TRUE(store_->list().empty());
}

TEST_F(DirImageStoreTest, Qcow2WithBackingFileIsRefused) {
  const std::string data = qcow2_bytes(1 << 30, 512, 0);
  auto info = import("evil:1", data);
  ASSERT_EQ(info.status().code(), Code::kInvalidArgument);
  EXPECT_NE(info.status().message().find("backing file"), std::string::npos);
  EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
}

TEST_F(DirImageStoreTest, Qcow2WithExternalDataFileIsRefused) {
  const std::string data = qcow2_bytes(1 << 30, 0, 1u << 2);
  auto info = import("evil:2", data);
  ASSERT_EQ(info.status().code(), Code::kInvalidArgument);
  EXPECT_NE(info.status().message().find("external data file"), std::string::npos);
  EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
}

TEST_F(DirImageStoreTest, PlainQcow2IsAcceptedWithVirtualSizeFromHeader) {
  const uint64_t vsize = uint64_t{4} << 30;
  const std::string data = qcow2_bytes(vsize, 0, 0);
  auto info = import("base:1", data);
  ASSERT_TRUE(info.is_ok()) << info.status().to_string();
  EXPECT_EQ(info->format, ImageFormat::kQcow2);
  EXPECT_EQ(info->virtual_size, vsize);
  EXPECT_EQ(info->size, data.size());
  reopen();
  EXPECT_EQ(store_->resolve("base:1")->format, ImageFormat::kQcow2);
}

TEST_F(DirImageStoreTest, KernelMustBeRaw) {
  auto qcow = import("vmlinuz:1", qcow2_bytes(1 << 20, 0, 0), ImageKind::kKernel);
  EXPECT_EQ(qcow.status().code(), Code::kInvalidArgument);
  auto initrd = import("initrd:1", qcow2_bytes(1 << 20, 0, 0), ImageKind::kInitrd);
  EXPECT_EQ(initrd.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);

  auto raw = import("vmlinuz:1", pattern_bytes(100, 'k'), ImageKind::kKernel);
  ASSERT_TRUE(raw.is_ok()) << raw.status().to_string();
  EXPECT_EQ(store_->resolve("vmlinuz:1")->kind, ImageKind::kKernel);
}

TEST_F(DirImageStoreTest, SameTagSameBytesIsIdempotent) {
  const std::string data = pattern_bytes(1000, 'i');
  auto first = import("img:1", data);
  ASSERT_TRUE(first.is_ok()) << first.status().to_string();
  auto second = import("img:1", data);
  ASSERT_TRUE(second.is_ok()) << second.status().to_string();
  EXPECT_EQ(second->digest, first->digest);
  EXPECT_EQ(second->imported_us, first->imported_us);
  EXPECT_EQ(store_->list().size(), 1u);
}

TEST_F(DirImageStoreTest, SameTagOtherBytesOrKindIsAlreadyExists) {
  ASSERT_TRUE(import("img:1", "one").is_ok());
  EXPECT_EQ(import("img:1", "two").status().code(), Code::kAlreadyExists);
  EXPECT_EQ(import("img:1", "one", ImageKind::kInitrd).status().code(), Code::kAlreadyExists);
  EXPECT_EQ(store_->resolve("img:1")->digest, digest_of("one"));
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
}

TEST_F(DirImageStoreTest, SharedBlobIsRemovedWithItsLastTag) {
  const std::string data = pattern_bytes(4096, 's');
  ASSERT_TRUE(import("a:1", data).is_ok());
  ASSERT_TRUE(import("b:1", data).is_ok());
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
  ASSERT_EQ(store_->list().size(), 2u);
  EXPECT_EQ(store_->list()[0].ref, image_ref("a:1"));
  EXPECT_EQ(store_->list()[1].ref, image_ref("b:1"));

  ASSERT_TRUE(store_->remove("a:1").is_ok());
  EXPECT_TRUE(fs::exists(blob(data)));
  EXPECT_EQ(store_->resolve("a:1").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->resolve(digest_of(data).str())->digest, digest_of(data));

  ASSERT_TRUE(store_->remove("b:1").is_ok());
  EXPECT_FALSE(fs::exists(blob(data)));
  EXPECT_TRUE(store_->list().empty());
  EXPECT_EQ(store_->remove("b:1").code(), Code::kNotFound);
}

TEST_F(DirImageStoreTest, RemoveByDigestRemovesEveryTagAndTheBlob) {
  const std::string data = pattern_bytes(4096, 'd');
  ASSERT_TRUE(import("a:1", data).is_ok());
  ASSERT_TRUE(import("a:2", data).is_ok());
  ASSERT_TRUE(import("keep:1", "other").is_ok());
  ASSERT_TRUE(store_->remove(digest_of(data).str()).is_ok());
  EXPECT_FALSE(fs::exists(blob(data)));
  ASSERT_EQ(store_->list().size(), 1u);
  EXPECT_EQ(store_->list()[0].ref, image_ref("keep:1"));
  EXPECT_EQ(store_->remove(digest_of(data).str()).code(), Code::kNotFound);
}

TEST_F(DirImageStoreTest, StrayTempFilesAreRemovedAtOpen) {
  const std::string data = pattern_bytes(100, 't');
  ASSERT_TRUE(import("a:1", data).is_ok());
  store_.reset();
  std::ofstream(root_ / "tmp" / "import-1-0") << "half an image";
  std::ofstream(root_ / "tags" / "a" / "2.json.tmp") << "{";
  reopen();
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_FALSE(fs::exists(root_ / "tags" / "a" / "2.json.tmp"));
  EXPECT_TRUE(store_->resolve("a:1").is_ok());
}

TEST_F(DirImageStoreTest, CancelStopsBetweenChunksAndCleansUp) {
  const std::string data = pattern_bytes(size_t{4} * 1024 * 1024, 'c');
  UniqueFd fd = source(data);
  std::atomic<bool> cancel{false};
  int chunks = 0;
  auto info = store_->import(
      image_ref("big:1"), fd.get(), digest_of(data), ImageKind::kDisk, std::nullopt,
      [&](uint64_t, uint64_t) {
        ++chunks;
        cancel = true;
      },
      &cancel);
  ASSERT_EQ(info.status().code(), Code::kConflict);
  EXPECT_EQ(info.status().message(), "import cancelled");
  EXPECT_EQ(chunks, 1);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
  EXPECT_EQ(store_->resolve("big:1").status().code(), Code::kNotFound);
}

TEST_F(DirImageStoreTest, StreamsFromAPipeWithShortReads) {
  const std::string data = pattern_bytes(size_t{300} * 1000, 'p');
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  UniqueFd rd(fds[0]);
  std::thread writer([w = UniqueFd(fds[1]), &data] {
    for (size_t off = 0; off < data.size(); off += 4000) {
      const size_t n = std::min<size_t>(4000, data.size() - off);
      ASSERT_EQ(::write(w.get(), data.data() + off, n), static_cast<ssize_t>(n));
    }
  });
  uint64_t last_total = 1;
  auto info = store_->import(
      image_ref("piped:1"), rd.get(), digest_of(data), ImageKind::kDisk, std::nullopt,
      [&](uint64_t, uint64_t total) { last_total = total; }, nullptr);
  writer.join();
  ASSERT_TRUE(info.is_ok()) << info.status().to_string();
  EXPECT_EQ(info->size, data.size());
  EXPECT_EQ(last_total, 0u);
  EXPECT_EQ(*read_file(info->path), data);
}

TEST_F(DirImageStoreTest, ConcurrentImportsOfTheSameBytesShareOneBlob) {
  const std::string data = pattern_bytes(size_t{3} * 1024 * 1024, 'm');
  std::vector<std::thread> threads;
  std::vector<Status> results(4);
  std::vector<UniqueFd> fds;
  fds.reserve(4);
  for (int i = 0; i < 4; ++i) fds.push_back(source(data));
  for (size_t i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      results[i] = store_
                       ->import(image_ref("img:" + std::to_string(i)), fds[i].get(),
                                digest_of(data), ImageKind::kDisk, std::nullopt, nullptr, nullptr)
                       .status();
    });
  }
  for (auto& t : threads) t.join();
  for (const Status& s : results) EXPECT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(store_->list().size(), 4u);
  EXPECT_EQ(*read_file(blob(data).string()), data);
}

TEST_F(DirImageStoreTest, FullDiskIsUnavailableAndLeavesNoTempFile) {
  const fs::path small = dir_ / "small";
  fs::create_directories(small);
  if (::mount("tmpfs", small.c_str(), "tmpfs", 0, "size=1m") != 0) {
    GTEST_SKIP() << "cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)";
  }
  {
    auto s = open_dir_image_store((small / "images").string(), ImageStoreOptions{.clock = clock_});
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    const std::string data = pattern_bytes(size_t{3} * 1024 * 1024, 'f');
    UniqueFd fd = source(data);
    auto info = (*s)->import(image_ref("huge:1"), fd.get(), digest_of(data), ImageKind::kDisk,
                             std::nullopt, nullptr, nullptr);
    EXPECT_EQ(info.status().code(), Code::kUnavailable) << info.status().to_string();
    EXPECT_EQ(count_entries(small / "images" / "tmp"), 0u);
    EXPECT_EQ(count_entries(small / "images" / "sha256"), 0u);
  }
  EXPECT_EQ(::umount2(small.c_str(), MNT_DETACH), 0);
}

TEST(ImageKindNames, RoundTrip) {
  for (ImageKind k : {ImageKind::kDisk, ImageKind::kKernel, ImageKind::kInitrd}) {
    EXPECT_EQ(*parse_image_kind(image_kind_name(k), "kind"), k);
  }
  auto bad = parse_image_kind("floppy", "kind");
  EXPECT_EQ(bad.status().code(), Code::kInvalidArgument);
  EXPECT_EQ(bad.status().message().rfind("kind: 'floppy'", 0), 0u) << bad.status().message();
  EXPECT_EQ(image_format_name(ImageFormat::kQcow2), "qcow2");
  EXPECT_EQ(image_format_name(ImageFormat::kRaw), "raw");
}

}  // namespace
}  // namespace nm
