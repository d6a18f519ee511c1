// ImageStore::pull() and the per-blob operations of the directory store, against real directory
// and loopback HTTP sources.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <csignal>
#include <filesystem>
#include <functional>
#include <mutex>
#include <thread>

#include "http_test_server.h"
#include "nm/core/fs.h"
#include "nm/imagestore/image_source.h"
#include "nm/imagestore/image_store.h"
#include "test_support.h"

namespace nm {
namespace {

namespace fs = std::filesystem;
using test::count_entries;
using test::digest_of;
using test::image_ref;
using test::pattern_bytes;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// Wraps a source, counts calls and can hold every fetch() until enough manifest() calls were seen
// (so that concurrent pulls have all started before the transfer proceeds).
class CountingSource final : public ImageSource {
 public:
  explicit CountingSource(std::unique_ptr<ImageSource> inner) : inner_(std::move(inner)) {}
  const std::string& describe() const override { return inner_->describe(); }
  Result<ImageManifest> manifest(const ImageRef& ref) override {
    {
      std::lock_guard lock(mu_);
      ++manifests_;
    }
    cv_.notify_all();
    return inner_->manifest(ref);
  }
  Status fetch(const Digest& digest, uint64_t size, const BlobSink& sink,
               const std::atomic<bool>* cancel) override {
    {
      std::unique_lock lock(mu_);
      ++fetches_;
      cv_.wait(lock, [&] { return manifests_ >= hold_until_manifests_; });
    }
    return inner_->fetch(digest, size, sink, cancel);
  }
  void hold_fetch_until_manifests(int n) {
    std::lock_guard lock(mu_);
    hold_until_manifests_ = n;
  }
  int fetches() const {
    std::lock_guard lock(mu_);
    return fetches_;
  }
  int manifests() const {
    std::lock_guard lock(mu_);
    return manifests_;
  }

 private:
  std::unique_ptr<ImageSource> inner_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int manifests_ = 0;
  int fetches_ = 0;
  int hold_until_manifests_ = 0;
};

using Deadline = std::chrono::steady_clock::time_point;

Deadline in_ten_seconds() {
  return std::chrono::steady_clock::now() + std::chrono::seconds(10);
}

// Polls `done` every 5 ms until it holds or `deadline` passes.
void wait_until(Deadline deadline, const std::function<bool()>& done) {
  while (!done() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

class PullTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("pull_test_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    shared_ = std::make_unique<test::SharedStoreDir>(dir_ / "shared");
    root_ = dir_ / "cache";
    clock_ = std::make_shared<test::FakeClock>();
    auto dir = open_dir_image_source(shared_->root().string());
    ASSERT_TRUE(dir.is_ok());
    source_ = std::make_unique<CountingSource>(std::move(dir).value());
    reopen();
  }
  void TearDown() override {
    store_.reset();
    fs::remove_all(dir_);
  }

  void reopen(uint64_t reserve_bytes = 0) {
    store_.reset();
    auto s = open_dir_image_store(
        root_.string(), ImageStoreOptions{.reserve_bytes = reserve_bytes, .clock = clock_});
    ASSERT_TRUE(s.is_ok()) << s.status().to_string();
    store_ = std::move(s).value();
  }

  Result<PullResult> pull(const std::string& ref, ImageSource* source = nullptr,
                          const ProgressFn& progress = nullptr,
                          const std::atomic<bool>* cancel = nullptr) {
    ImageSource* const sources[] = {source != nullptr ? source : source_.get()};
    return store_->pull(image_ref(ref), sources, progress, cancel);
  }

  // Nothing of a failed pull is visible: no temp file, no blob, no metadata, no tag.
  void expect_nothing_left(const std::string& ref) {
    EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
    EXPECT_EQ(count_entries(root_ / "sha256"), 0u);
    EXPECT_EQ(count_entries(root_ / "meta"), 0u);
    EXPECT_EQ(store_->resolve(ref).status().code(), Code::kNotFound);
  }

  fs::path dir_;
  fs::path root_;
  std::unique_ptr<test::SharedStoreDir> shared_;
  std::shared_ptr<test::FakeClock> clock_;
  std::unique_ptr<CountingSource> source_;
  std::unique_ptr<ImageStore> store_;
};

TEST_F(PullTest, PullsFromADirectoryStoreAndPublishesBlobMetadataAndTag) {
  const std::string data = pattern_bytes(3 * kMiB + 5, 'p');
  shared_->put_image("debian:12", data);
  std::vector<std::pair<uint64_t, uint64_t>> progress;
  auto r = pull("debian:12", nullptr,
                [&](uint64_t done, uint64_t total) { progress.emplace_back(done, total); });
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_TRUE(r->transferred);
  EXPECT_FALSE(r->joined);
  EXPECT_EQ(r->source, source_->describe());
  EXPECT_EQ(r->info.ref, image_ref("debian:12"));
  EXPECT_EQ(r->info.digest, digest_of(data));
  EXPECT_EQ(r->info.size, data.size());
  EXPECT_EQ(r->info.virtual_size, data.size());
  EXPECT_EQ(r->info.format, ImageFormat::kRaw);
  EXPECT_FALSE(r->info.tenant.has_value());
  EXPECT_FALSE(r->info.pinned);
  EXPECT_EQ(*read_file(r->info.path), data);
  struct stat st {};
  ASSERT_EQ(::stat(r->info.path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0444u);
  EXPECT_TRUE(fs::exists(root_ / "meta" / (test::sha256_hex(data) + ".json")));
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  ASSERT_FALSE(progress.empty());
  EXPECT_EQ(progress.back(), std::make_pair(uint64_t{data.size()}, uint64_t{data.size()}));

  reopen();
  auto by_tag = store_->resolve("debian:12");
  ASSERT_TRUE(by_tag.is_ok()) << by_tag.status().to_string();
  EXPECT_EQ(by_tag->digest, digest_of(data));
}

TEST_F(PullTest, ACachedTagIsNotTransferredAgainButTheManifestIsConsulted) {
  shared_->put_image("debian:12", pattern_bytes(1000, 'a'));
  ASSERT_TRUE(pull("debian:12").is_ok());
  auto again = pull("debian:12");
  ASSERT_TRUE(again.is_ok()) << again.status().to_string();
  EXPECT_FALSE(again->transferred);
  EXPECT_FALSE(again->joined);
  EXPECT_EQ(source_->fetches(), 1);

  // Another tag naming the same bytes: no transfer either, a second tag.
  shared_->put_image("debian:latest", pattern_bytes(1000, 'a'));
  auto latest = pull("debian:latest");
  ASSERT_TRUE(latest.is_ok()) << latest.status().to_string();
  EXPECT_FALSE(latest->transferred);
  EXPECT_EQ(source_->fetches(), 1);
  EXPECT_EQ(store_->list().size(), 2u);
}

TEST_F(PullTest, ATagMovesAndTheOldBlobStaysResolvableByDigest) {
  const std::string v1 = pattern_bytes(5000, '1');
  const std::string v2 = pattern_bytes(6000, '2');
  shared_->put_image("debian:12", v1);
  ASSERT_TRUE(pull("debian:12").is_ok());
  shared_->put_image("debian:12", v2);
  auto moved = pull("debian:12");
  ASSERT_TRUE(moved.is_ok()) << moved.status().to_string();
  EXPECT_TRUE(moved->transferred);
  EXPECT_EQ(store_->resolve("debian:12")->digest, digest_of(v2));

  auto old = store_->resolve(digest_of(v1).str());
  ASSERT_TRUE(old.is_ok()) << old.status().to_string();
  EXPECT_FALSE(old->ref.has_value());
  EXPECT_EQ(old->size, v1.size());
  EXPECT_EQ(*read_file(old->path), v1);

  const std::vector<BlobInfo> blobs = store_->list_blobs();
  ASSERT_EQ(blobs.size(), 2u);
  for (const BlobInfo& b : blobs) {
    if (b.info.digest == digest_of(v1)) {
      EXPECT_TRUE(b.tags.empty());
    } else {
      EXPECT_EQ(b.tags, std::vector<ImageRef>{image_ref("debian:12")});
    }
  }
  EXPECT_LT(blobs[0].info.digest, blobs[1].info.digest);
}

TEST_F(PullTest, ACorruptBlobIsRefusedLeavesNothingAndIsNotCached) {
  const std::string data = pattern_bytes(2 * kMiB, 'g');
  const auto m = shared_->put_image("debian:12", data);
  std::string corrupt = data;
  corrupt[kMiB] ^= 0x01;
  test::write_bytes(shared_->blob_path(m.digest), corrupt);

  const Status s = pull("debian:12").status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message().rfind("manifest.digest: image 'debian:12' from '", 0), 0u) << s.message();
  EXPECT_NE(s.message().find(test::sha256_hex(corrupt)), std::string::npos) << s.message();
  expect_nothing_left("debian:12");

  test::write_bytes(shared_->blob_path(m.digest), data);
  auto fixed = pull("debian:12");
  ASSERT_TRUE(fixed.is_ok()) << fixed.status().to_string();
  EXPECT_TRUE(fixed->transferred);
  EXPECT_EQ(source_->fetches(), 2);
}

TEST_F(PullTest, AWrongSizeIsRefusedEitherWay) {
  const std::string data = pattern_bytes(4096, 'z');
  shared_->put_blob(data);
  shared_->put_manifest("longer:1", {.digest = digest_of(data), .size = data.size() + 1});
  const Status truncated = pull("longer:1").status();
  EXPECT_EQ(truncated.code(), Code::kUnavailable) << truncated.to_string();
  EXPECT_NE(truncated.message().find("truncated"), std::string::npos);
  expect_nothing_left("longer:1");

  shared_->put_manifest("shorter:1", {.digest = digest_of(data), .size = data.size() - 1});
  const Status larger = pull("shorter:1").status();
  EXPECT_EQ(larger.code(), Code::kInvalidArgument) << larger.to_string();
  expect_nothing_left("shorter:1");
}

TEST_F(PullTest, TheFormatComesFromTheBytesNotTheManifest) {
  const std::string qcow = test::qcow2_bytes(uint64_t{8} << 30);
  shared_->put_image("sneaky:1", qcow, ImageFormat::kRaw);
  Status s = pull("sneaky:1").status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message().rfind("manifest.format: ", 0), 0u) << s.message();
  EXPECT_NE(s.message().find("is qcow2, the manifest says raw"), std::string::npos);
  expect_nothing_left("sneaky:1");

  shared_->put_image("sneaky:2", pattern_bytes(4096, 'r'), ImageFormat::kQcow2);
  s = pull("sneaky:2").status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_NE(s.message().find("is raw, the manifest says qcow2"), std::string::npos);
  expect_nothing_left("sneaky:2");

  shared_->put_image("honest:1", qcow, ImageFormat::kQcow2);
  auto ok = pull("honest:1");
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(ok->info.format, ImageFormat::kQcow2);
  EXPECT_EQ(ok->info.virtual_size, uint64_t{8} << 30);
}

TEST_F(PullTest, AQcow2BackedByEtcShadowIsRefused) {
  const fs::path img = dir_ / "shadow.qcow2";
  const std::string cmd =
      "qemu-img create -q -f qcow2 -b /etc/shadow -F raw " + img.string() + " 1M 2>&1";
  if (std::system(cmd.c_str()) != 0) GTEST_SKIP() << "qemu-img cannot create the image";
  const std::string data = *read_file(img.string());
  shared_->put_image("evil:1", data, ImageFormat::kQcow2);
  auto server = test::HttpTestServer::start(shared_->root().string());
  ASSERT_NE(server, nullptr);
  auto http = open_http_image_source(server->url());
  ASSERT_TRUE(http.is_ok());
  for (ImageSource* source : {static_cast<ImageSource*>(source_.get()), http->get()}) {
    const Status s = pull("evil:1", source).status();
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << source->describe();
    EXPECT_NE(s.message().find("backing file"), std::string::npos) << s.message();
    expect_nothing_left("evil:1");
  }
}

TEST_F(PullTest, KernelsAndInitrdsMustBeRaw) {
  const std::string qcow = test::qcow2_bytes(kMiB);
  shared_->put_image("vmlinuz:1", qcow, ImageFormat::kQcow2, ImageKind::kKernel);
  EXPECT_EQ(pull("vmlinuz:1").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(source_->fetches(), 0);  // refused from the manifest alone
  shared_->put_image("initrd:1", qcow, ImageFormat::kRaw, ImageKind::kInitrd);
  EXPECT_EQ(pull("initrd:1").status().code(), Code::kInvalidArgument);
  expect_nothing_left("initrd:1");

  shared_->put_image("vmlinuz:2", pattern_bytes(1000, 'k'), ImageFormat::kRaw, ImageKind::kKernel);
  auto ok = pull("vmlinuz:2");
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(ok->info.kind, ImageKind::kKernel);
  EXPECT_EQ(store_->resolve("vmlinuz:2")->kind, ImageKind::kKernel);
}

TEST_F(PullTest, SourcesAreTriedInOrder) {
  auto empty_dir = open_dir_image_source((dir_ / "empty").string());
  fs::create_directories(dir_ / "empty");
  auto gone_dir = open_dir_image_source((dir_ / "gone").string());
  ASSERT_TRUE(empty_dir.is_ok() && gone_dir.is_ok());
  shared_->put_image("debian:12", pattern_bytes(100, 'o'));

  ImageSource* const in_order[] = {empty_dir->get(), gone_dir->get(), source_.get()};
  auto r = store_->pull(image_ref("debian:12"), in_order, nullptr, nullptr);
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(r->source, source_->describe());

  ImageSource* const without[] = {empty_dir->get(), gone_dir->get()};
  const Status unreachable =
      store_->pull(image_ref("debian:12"), without, nullptr, nullptr).status();
  EXPECT_EQ(unreachable.code(), Code::kUnavailable) << unreachable.to_string();
  ImageSource* const only_empty[] = {empty_dir->get()};
  EXPECT_EQ(store_->pull(image_ref("debian:12"), only_empty, nullptr, nullptr).status().code(),
            Code::kNotFound);
  EXPECT_EQ(store_->pull(image_ref("debian:12"), {}, nullptr, nullptr).status().code(),
            Code::kNotFound);
}

TEST_F(PullTest, TheReserveIsKeptFree) {
  shared_->put_image("debian:12", pattern_bytes(100, 'f'));
  reopen(uint64_t{1} << 60);
  const Status s = pull("debian:12").status();
  EXPECT_EQ(s.code(), Code::kInsufficientCapacity) << s.to_string();
  EXPECT_NE(s.message().find("reserve of 1152921504606846976"), std::string::npos);
  EXPECT_EQ(source_->fetches(), 0);
  expect_nothing_left("debian:12");
}

TEST_F(PullTest, ConcurrentPullsOfOneImageMakeOneTransfer) {
  constexpr int kThreads = 16;
  const std::string data = pattern_bytes(8 * kMiB, 'c');
  shared_->put_image("debian:12", data);
  shared_->put_image("debian:latest", data);
  source_->hold_fetch_until_manifests(kThreads);
  std::vector<std::optional<Result<PullResult>>> results(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] {
      results[static_cast<size_t>(i)] = pull(i % 2 == 0 ? "debian:12" : "debian:latest");
    });
  }
  for (auto& t : threads) t.join();
  int transferred = 0;
  int joined = 0;
  for (const auto& r : results) {
    ASSERT_TRUE(r->is_ok()) << r->status().to_string();
    EXPECT_EQ((*r)->info.digest, digest_of(data));
    transferred += (*r)->transferred ? 1 : 0;
    joined += (*r)->joined ? 1 : 0;
  }
  EXPECT_EQ(source_->fetches(), 1);
  EXPECT_EQ(transferred, 1);
  EXPECT_GE(joined, 1);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
  EXPECT_EQ(store_->list().size(), 2u);
}

TEST_F(PullTest, ConcurrentPullsShareAFailureAndTheNextPullTriesAgain) {
  constexpr int kThreads = 12;
  const std::string data = pattern_bytes(4 * kMiB, 'e');
  const auto m = shared_->put_image("debian:12", data);
  test::write_bytes(shared_->blob_path(m.digest), pattern_bytes(4 * kMiB, 'E'));
  source_->hold_fetch_until_manifests(kThreads);
  std::vector<Status> results(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] { results[static_cast<size_t>(i)] = pull("debian:12").status(); });
  }
  for (auto& t : threads) t.join();
  for (const Status& s : results) {
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.to_string();
    EXPECT_NE(s.message().find("manifest.digest"), std::string::npos) << s.message();
  }
  EXPECT_EQ(source_->fetches(), 1);
  expect_nothing_left("debian:12");

  test::write_bytes(shared_->blob_path(m.digest), data);
  ASSERT_TRUE(pull("debian:12").is_ok());
  EXPECT_EQ(source_->fetches(), 2);
}

TEST_F(PullTest, ConcurrentHttpPullsMakeOneRequestForTheBlob) {
  constexpr int kThreads = 12;
  const std::string data = pattern_bytes(4 * kMiB, 'n');
  shared_->put_image("debian:12", data);
  auto server = test::HttpTestServer::start(shared_->root().string());
  ASSERT_NE(server, nullptr);
  const std::string blob_path = "/blobs/sha256/" + test::sha256_hex(data);
  server->set_fault(blob_path, {.bytes_per_second = 16 * kMiB});  // about 250 ms
  auto http = open_http_image_source(server->url());
  ASSERT_TRUE(http.is_ok());
  std::vector<Status> results(kThreads);
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back(
        [&, i] { results[static_cast<size_t>(i)] = pull("debian:12", http->get()).status(); });
  }
  for (auto& t : threads) t.join();
  for (const Status& s : results) EXPECT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(server->requests(blob_path), 1);
  EXPECT_EQ(server->requests("/debian/12.json"), kThreads);
  EXPECT_EQ(*read_file(store_->resolve("debian:12")->path), data);
}

TEST_F(PullTest, AJoinerSeesProgressAndItsCancelStopsOnlyItsWait) {
  const std::string data = pattern_bytes(6 * kMiB, 'j');
  shared_->put_image("debian:12", data);
  source_->hold_fetch_until_manifests(3);
  std::atomic<uint64_t> joiner_bytes{0};
  std::atomic<bool> cancel_joiner{false};
  std::optional<Result<PullResult>> leader;
  std::optional<Result<PullResult>> joiner;
  std::optional<Result<PullResult>> cancelled;
  // The leader is in fetch() (held until all three asked for the manifest) before the others
  // start, so the pull that cancels can only be a joiner (a cancelled leader would make the
  // others transfer again, by design).
  std::thread a([&] { leader = pull("debian:12"); });
  const Deadline deadline = in_ten_seconds();
  wait_until(deadline, [&] { return source_->fetches() >= 1; });
  ASSERT_EQ(source_->fetches(), 1);
  cancel_joiner = true;
  std::thread b([&] {
    joiner = pull("debian:12", nullptr, [&](uint64_t done, uint64_t) { joiner_bytes = done; });
  });
  std::thread c([&] { cancelled = pull("debian:12", nullptr, nullptr, &cancel_joiner); });
  a.join();
  b.join();
  c.join();
  ASSERT_TRUE(leader->is_ok()) << leader->status().to_string();
  ASSERT_TRUE(joiner->is_ok()) << joiner->status().to_string();
  EXPECT_EQ(source_->fetches(), 1);
  // Whoever joined saw the transfer's bytes; the one that cancelled got "pull cancelled" unless
  // it came too late to wait at all.
  if ((*joiner)->joined) {
    EXPECT_EQ(joiner_bytes.load(), data.size());
  }
  if (!cancelled->is_ok()) {
    EXPECT_EQ(cancelled->status().code(), Code::kConflict);
    EXPECT_EQ(cancelled->status().message(), "pull cancelled");
  }
  EXPECT_TRUE(store_->resolve("debian:12").is_ok());
}

TEST_F(PullTest, AJoinerThatCancelsReturnsWhileTheTransferGoesOn) {
  const std::string data = pattern_bytes(2 * kMiB, 'w');
  shared_->put_image("debian:12", data);
  // Two pulls ask for the manifest; the leader's fetch waits for a third request, which the test
  // makes itself once the joiner has given up.
  source_->hold_fetch_until_manifests(3);
  std::atomic<bool> cancel_joiner{false};
  std::atomic<bool> joiner_done{false};
  std::optional<Result<PullResult>> leader;
  std::optional<Result<PullResult>> joiner;
  std::thread a([&] { leader = pull("debian:12"); });
  const Deadline deadline = in_ten_seconds();
  wait_until(deadline, [&] { return source_->fetches() >= 1; });
  ASSERT_EQ(source_->fetches(), 1);
  std::thread b([&] {
    joiner = pull("debian:12", nullptr, nullptr, &cancel_joiner);
    joiner_done = true;
  });
  wait_until(deadline, [&] { return source_->manifests() >= 2; });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the joiner waits in the flight
  cancel_joiner = true;
  wait_until(deadline, [&] { return joiner_done.load(); });
  EXPECT_TRUE(joiner_done.load()) << "the cancelled joiner kept waiting for the transfer";
  EXPECT_FALSE(leader.has_value());                                  // still held in fetch()
  ASSERT_TRUE(source_->manifest(ImageRef{"debian", "12"}).is_ok());  // the third: leader goes
  a.join();
  b.join();
  ASSERT_TRUE(leader->is_ok()) << leader->status().to_string();
  ASSERT_FALSE(joiner->is_ok());
  EXPECT_EQ(joiner->status().message(), "pull cancelled");
  EXPECT_EQ(source_->fetches(), 1);
}

TEST_F(PullTest, PullsInProgressCountAgainstTheFreeSpace) {
  // Two different images that each fit, but not both: the reserve leaves room for one and a half.
  const std::string a = pattern_bytes(64 * kMiB, 'a');
  const std::string b = pattern_bytes(64 * kMiB, 'b');
  shared_->put_image("first:1", a);
  shared_->put_image("second:1", b);
  const auto space = filesystem_space(root_.string());
  ASSERT_TRUE(space.is_ok());
  ASSERT_GT(space->available_bytes, 256 * kMiB);
  reopen(space->available_bytes - 96 * kMiB);
  source_->hold_fetch_until_manifests(2);  // the first transfer waits for the second pull
  std::optional<Result<PullResult>> first;
  std::thread t([&] { first = pull("first:1"); });
  const Deadline deadline = in_ten_seconds();
  wait_until(deadline, [&] { return source_->fetches() >= 1; });
  ASSERT_EQ(source_->fetches(), 1);
  const auto second = pull("second:1");  // its manifest request releases the first
  t.join();
  ASSERT_TRUE(first->is_ok()) << first->status().to_string();
  ASSERT_FALSE(second.is_ok());
  EXPECT_EQ(second.status().code(), Code::kInsufficientCapacity) << second.status().to_string();
  EXPECT_NE(second.status().message().find("pulls in progress"), std::string::npos);
  EXPECT_EQ(store_->resolve("second:1").status().code(), Code::kNotFound);
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);  // the first image only
}

TEST_F(PullTest, ALeaderThatCancelsLeavesNothingAndItsJoinersTakeOver) {
  const std::string data = pattern_bytes(6 * kMiB, 'l');
  shared_->put_image("debian:12", data);
  source_->hold_fetch_until_manifests(2);
  std::atomic<bool> cancel{false};
  std::optional<Result<PullResult>> first;
  std::optional<Result<PullResult>> second;
  std::thread a([&] {
    first = pull(
        "debian:12", nullptr, [&](uint64_t, uint64_t) { cancel = true; }, &cancel);
  });
  std::thread b([&] { second = pull("debian:12"); });
  a.join();
  b.join();
  // One of the two led; the leader is whichever got the cancel flag or not. When the cancelling
  // call led, the other pulled again; when the other led, both succeeded or the canceller's wait
  // stopped.
  ASSERT_TRUE(second->is_ok()) << second->status().to_string();
  if (!first->is_ok()) {
    EXPECT_EQ(first->status().code(), Code::kConflict);
    EXPECT_EQ(first->status().message(), "pull cancelled");
  }
  EXPECT_EQ(count_entries(root_ / "tmp"), 0u);
  EXPECT_EQ(*read_file(store_->resolve("debian:12")->path), data);
}

TEST_F(PullTest, ACancelledPullLeavesNothing) {
  shared_->put_image("debian:12", pattern_bytes(4 * kMiB, 'x'));
  std::atomic<bool> cancel{false};
  const Status s = pull(
                       "debian:12", nullptr, [&](uint64_t, uint64_t) { cancel = true; }, &cancel)
                       .status();
  EXPECT_EQ(s.code(), Code::kConflict);
  EXPECT_EQ(s.message(), "pull cancelled");
  expect_nothing_left("debian:12");
}

TEST_F(PullTest, AServerGoneMidTransferLeavesNothingAndThePullCanBeRetried) {
  const std::string data = pattern_bytes(32 * kMiB, 's');
  shared_->put_image("debian:12", data);
  auto server = test::HttpTestServer::start(shared_->root().string());
  ASSERT_NE(server, nullptr);
  const std::string blob_path = "/blobs/sha256/" + test::sha256_hex(data);
  server->set_fault(blob_path, {.stall_after = 16 * kMiB});
  auto http = open_http_image_source(server->url());
  ASSERT_TRUE(http.is_ok());
  const Status s = pull("debian:12", http->get(), [&](uint64_t done, uint64_t) {
                     if (done >= kMiB) server->stop();
                   }).status();
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
  EXPECT_NE(s.message().find(server->url()), std::string::npos) << s.message();
  expect_nothing_left("debian:12");

  auto again = test::HttpTestServer::start(shared_->root().string());
  ASSERT_NE(again, nullptr);
  again->set_fault(blob_path, {.close_after = 5 * kMiB});
  auto http2 = open_http_image_source(again->url());
  ASSERT_TRUE(http2.is_ok());
  const Status truncated = pull("debian:12", http2->get()).status();
  EXPECT_EQ(truncated.code(), Code::kUnavailable) << truncated.to_string();
  EXPECT_NE(truncated.message().find("truncated"), std::string::npos) << truncated.message();
  expect_nothing_left("debian:12");

  again->clear_faults();
  auto ok = pull("debian:12", http2->get());
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_EQ(*read_file(ok->info.path), data);
}

TEST_F(PullTest, AKilledPullLeavesNothingAfterReopenAndCanBeRetried) {
  const std::string data = pattern_bytes(16 * kMiB, 'K');
  shared_->put_image("debian:12", data);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Pull and stop forever after the first chunk, like a daemon that hangs and gets killed.
    (void)pull("debian:12", nullptr, [](uint64_t, uint64_t) { ::pause(); });
    ::_exit(0);
  }
  bool started = false;
  for (int i = 0; i < 500 && !started; ++i) {  // up to 5 s for the child's first chunk
    for (const auto& e : fs::directory_iterator(root_ / "tmp")) started |= fs::file_size(e) > 0;
    if (!started) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(child, SIGKILL);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(child, &wstatus, 0), child);
  ASSERT_TRUE(started) << "the child never wrote its temp file";
  EXPECT_EQ(count_entries(root_ / "tmp"), 1u);  // what the crash left

  reopen();
  expect_nothing_left("debian:12");
  auto r = pull("debian:12");
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_EQ(*read_file(r->info.path), data);
}

TEST_F(PullTest, APullDoesNotReplaceATenantsPrivateTag) {
  const std::string mine = pattern_bytes(100, 'm');
  const fs::path src = dir_ / "mine";
  test::write_bytes(src, mine);
  UniqueFd fd(::open(src.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(store_
                  ->import(image_ref("debian:12"), fd.get(), digest_of(mine), ImageKind::kDisk,
                           TenantId::trusted("contoso"), nullptr, nullptr)
                  .is_ok());
  shared_->put_image("debian:12", pattern_bytes(200, 'p'));
  EXPECT_EQ(pull("debian:12").status().code(), Code::kAlreadyExists);
  EXPECT_EQ(store_->resolve("debian:12")->digest, digest_of(mine));
}

TEST_F(PullTest, ACachedBlobMustMatchTheManifestFormat) {
  const std::string data = pattern_bytes(100, 'q');
  shared_->put_image("a:1", data, ImageFormat::kRaw);
  ASSERT_TRUE(pull("a:1").is_ok());
  shared_->put_image("b:1", data, ImageFormat::kQcow2);
  const Status s = pull("b:1").status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(s.message().rfind("manifest.format", 0), 0u) << s.message();
  EXPECT_EQ(store_->resolve("b:1").status().code(), Code::kNotFound);
}

// ---- per-blob operations ----

TEST_F(PullTest, PinAndTouchAreDurable) {
  const std::string data = pattern_bytes(100, 'P');
  shared_->put_image("debian:12", data);
  auto r = pull("debian:12");
  ASSERT_TRUE(r.is_ok());
  const Digest d = digest_of(data);
  EXPECT_EQ(r->info.last_used_us, r->info.imported_us);

  ASSERT_TRUE(store_->set_pinned(d, true).is_ok());
  clock_->now_us = 1'800'000'000'000'000;
  ASSERT_TRUE(store_->touch(d).is_ok());
  reopen();
  auto blob = store_->resolve(d.str());
  ASSERT_TRUE(blob.is_ok());
  EXPECT_TRUE(blob->pinned);
  EXPECT_EQ(blob->last_used_us, 1'800'000'000'000'000u);
  EXPECT_TRUE(store_->resolve("debian:12")->pinned);
  EXPECT_TRUE(store_->list()[0].pinned);
  EXPECT_TRUE(store_->list_blobs()[0].info.pinned);
  ASSERT_TRUE(store_->set_pinned(d, false).is_ok());
  EXPECT_FALSE(store_->resolve(d.str())->pinned);

  EXPECT_EQ(store_->set_pinned(digest_of("x"), true).code(), Code::kNotFound);
  EXPECT_EQ(store_->touch(digest_of("x")).code(), Code::kNotFound);
}

TEST_F(PullTest, TouchRecordsAUsePerMinute) {
  const std::string data = pattern_bytes(100, 'T');
  shared_->put_image("debian:12", data);
  clock_->now_us = 1'800'000'000'000'000;
  auto pulled = pull("debian:12");
  ASSERT_TRUE(pulled.is_ok());
  const uint64_t imported = pulled->info.imported_us;
  const Digest d = digest_of(data);

  // Within a minute of the import: the import stands as the last use, nothing is rewritten.
  clock_->now_us = imported + 59'000'000;
  ASSERT_TRUE(store_->touch(d).is_ok());
  EXPECT_EQ(store_->resolve(d.str())->last_used_us, imported);

  clock_->now_us = imported + 61'000'000;
  ASSERT_TRUE(store_->touch(d).is_ok());
  const uint64_t first = store_->resolve(d.str())->last_used_us;
  EXPECT_GE(first, imported + 61'000'000);

  clock_->now_us = first + 30'000'000;
  ASSERT_TRUE(store_->touch(d).is_ok());
  reopen();
  EXPECT_EQ(store_->resolve(d.str())->last_used_us, first);

  // A clock that went back is no reason to keep a use from the future.
  clock_->now_us = first - 3'600'000'000;
  ASSERT_TRUE(store_->touch(d).is_ok());
  EXPECT_LT(store_->resolve(d.str())->last_used_us, first);
}

TEST_F(PullTest, VerifyReHashesAndReportsCorruption) {
  const std::string data = pattern_bytes(3 * kMiB, 'V');
  shared_->put_image("debian:12", data);
  auto r = pull("debian:12");
  ASSERT_TRUE(r.is_ok());
  const Digest d = digest_of(data);
  uint64_t last = 0;
  auto ok = store_->verify(
      d, [&](uint64_t done, uint64_t) { last = done; }, nullptr);
  ASSERT_TRUE(ok.is_ok()) << ok.status().to_string();
  EXPECT_TRUE(ok->ok);
  EXPECT_EQ(last, data.size());

  std::string flipped = data;
  flipped[12345] ^= 0x40;
  fs::permissions(r->info.path, fs::perms::owner_write, fs::perm_options::add);
  test::write_bytes(r->info.path, flipped);
  auto bad = store_->verify(d, nullptr, nullptr);
  ASSERT_TRUE(bad.is_ok()) << bad.status().to_string();
  EXPECT_FALSE(bad->ok);
  EXPECT_EQ(bad->problem, "digest is sha256:" + test::sha256_hex(flipped));

  test::write_bytes(r->info.path, data.substr(0, 1000));
  auto shorter = store_->verify(d, nullptr, nullptr);
  ASSERT_TRUE(shorter.is_ok());
  EXPECT_EQ(shorter->problem, "size is 1000, expected " + std::to_string(data.size()));

  fs::remove(r->info.path);
  auto missing = store_->verify(d, nullptr, nullptr);
  ASSERT_TRUE(missing.is_ok());
  EXPECT_FALSE(missing->ok);
  EXPECT_EQ(missing->problem, "missing");
  EXPECT_EQ(store_->verify(digest_of("x"), nullptr, nullptr).status().code(), Code::kNotFound);
}

TEST_F(PullTest, RemoveBlobRemovesEveryTagMetadataAndTheBlob) {
  const std::string data = pattern_bytes(100, 'R');
  shared_->put_image("debian:12", data);
  shared_->put_image("debian:latest", data);
  shared_->put_image("other:1", pattern_bytes(100, 'O'));
  ASSERT_TRUE(pull("debian:12").is_ok());
  ASSERT_TRUE(pull("debian:latest").is_ok());
  ASSERT_TRUE(pull("other:1").is_ok());
  ASSERT_TRUE(store_->remove_blob(digest_of(data)).is_ok());
  EXPECT_EQ(store_->resolve(digest_of(data).str()).status().code(), Code::kNotFound);
  EXPECT_EQ(store_->resolve("debian:12").status().code(), Code::kNotFound);
  EXPECT_EQ(store_->list().size(), 1u);
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
  EXPECT_EQ(count_entries(root_ / "meta"), 1u);
  EXPECT_EQ(store_->remove_blob(digest_of(data)).code(), Code::kNotFound);
}

// ---- recovery at open ----

TEST_F(PullTest, OpenWritesMetadataForOldCachesAndRemovesUnnamedBlobs) {
  const std::string tagged = pattern_bytes(100, 'T');
  const std::string orphan = pattern_bytes(100, 'U');
  shared_->put_image("debian:12", tagged);
  shared_->put_image("orphan:1", orphan);
  ASSERT_TRUE(pull("debian:12").is_ok());
  ASSERT_TRUE(pull("orphan:1").is_ok());
  const uint64_t imported = store_->resolve("debian:12")->imported_us;
  store_.reset();
  // The previous version had no meta/: tags only. And a crash between blob and metadata leaves a
  // blob with neither metadata nor tag; a metadata file without a blob is stale.
  fs::remove_all(root_ / "meta");
  fs::remove_all(root_ / "tags" / "orphan");
  test::write_bytes(root_ / "meta" / (std::string(64, 'a') + ".json"), "{}");
  reopen();

  auto meta = store_->resolve(digest_of(tagged).str());
  ASSERT_TRUE(meta.is_ok()) << meta.status().to_string();
  EXPECT_EQ(meta->imported_us, imported);
  EXPECT_EQ(meta->last_used_us, imported);
  EXPECT_FALSE(meta->pinned);
  EXPECT_EQ(store_->resolve(digest_of(orphan).str()).status().code(), Code::kNotFound);
  EXPECT_FALSE(fs::exists(root_ / "sha256" / test::sha256_hex(orphan)));
  EXPECT_EQ(count_entries(root_ / "meta"), 1u);
  EXPECT_EQ(count_entries(root_ / "sha256"), 1u);
}

}  // namespace
}  // namespace nm
