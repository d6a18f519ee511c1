#include "nm/imagestore/image_source.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>

#include "http_test_server.h"
#include "test_support.h"

namespace nm {
namespace {

namespace fs = std::filesystem;
using test::digest_of;
using test::image_ref;
using test::pattern_bytes;

constexpr uint64_t kMiB = uint64_t{1} << 20;

// Collects what fetch() delivers.
struct Collected {
  std::string bytes;
  std::vector<size_t> chunks;
  BlobSink sink() {
    return [this](std::span<const uint8_t> c) {
      bytes.append(reinterpret_cast<const char*>(c.data()), c.size());
      chunks.push_back(c.size());
      return Status::ok();
    };
  }
};

class ImageSourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = fs::path(::testing::TempDir()) /
           (std::string("image_source_test_") + info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    store_ = std::make_unique<test::SharedStoreDir>(dir_ / "shared");
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::unique_ptr<ImageSource> dir_source() {
    auto s = open_dir_image_source(store_->root().string());
    EXPECT_TRUE(s.is_ok()) << s.status().to_string();
    return std::move(s).value();
  }
  std::unique_ptr<ImageSource> http_source(const std::string& url) {
    auto s =
        open_http_image_source(url, HttpSourceOptions{.connect_timeout = std::chrono::seconds(2),
                                                      .stall_timeout = std::chrono::seconds(1)});
    EXPECT_TRUE(s.is_ok()) << s.status().to_string();
    return std::move(s).value();
  }
  std::unique_ptr<test::HttpTestServer> serve() {
    auto server = test::HttpTestServer::start(store_->root().string());
    EXPECT_NE(server, nullptr);
    return server;
  }
  static std::string blob_url_path(const std::string& data) {
    return "/blobs/sha256/" + test::sha256_hex(data);
  }

  fs::path dir_;
  std::unique_ptr<test::SharedStoreDir> store_;
};

// ---- directory source ----

TEST_F(ImageSourceTest, DirSourceReadsManifestsAndDescribesItself) {
  const auto m = store_->put_image("debian:12", pattern_bytes(100, 'd'), ImageFormat::kRaw,
                                   ImageKind::kKernel);
  auto source = dir_source();
  EXPECT_EQ(source->describe(), "dir:" + store_->root().string());
  auto got = source->manifest(image_ref("debian:12"));
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_EQ(*got, m);
}

TEST_F(ImageSourceTest, DirSourceTellsMissingTagsFromAnUnreachableStore) {
  auto source = dir_source();
  EXPECT_EQ(source->manifest(image_ref("debian:12")).status().code(), Code::kNotFound);
  fs::remove_all(store_->root());
  const Status gone = source->manifest(image_ref("debian:12")).status();
  EXPECT_EQ(gone.code(), Code::kUnavailable) << gone.to_string();
  EXPECT_NE(gone.message().find(store_->root().string()), std::string::npos) << gone.message();
}

TEST_F(ImageSourceTest, DirSourceRefusesMalformedManifests) {
  test::write_bytes(store_->root() / "debian" / "12.json",
                    R"({"digest": "sha256:00", "size": 1, "format": "raw", "kind": "disk"})");
  const Status s = dir_source()->manifest(image_ref("debian:12")).status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument);
  EXPECT_EQ(
      s.message().rfind(
          "manifest 'debian:12' from 'dir:" + store_->root().string() + "': manifest.digest", 0),
      0u)
      << s.message();
}

TEST_F(ImageSourceTest, DirSourceStreamsInOneMibChunks) {
  const std::string data = pattern_bytes(2 * kMiB + kMiB / 2, 'c');
  store_->put_blob(data);
  Collected got;
  ASSERT_TRUE(dir_source()->fetch(digest_of(data), data.size(), got.sink(), nullptr).is_ok());
  EXPECT_EQ(got.bytes, data);
  EXPECT_EQ(got.chunks, (std::vector<size_t>{kMiB, kMiB, kMiB / 2}));
}

TEST_F(ImageSourceTest, DirSourceChecksTheLengthAgainstTheManifest) {
  const std::string data = pattern_bytes(kMiB + 10, 't');
  store_->put_blob(data);
  auto source = dir_source();
  Collected shorter;
  const Status longer = source->fetch(digest_of(data), data.size() - 1, shorter.sink(), nullptr);
  EXPECT_EQ(longer.code(), Code::kInvalidArgument);
  EXPECT_NE(longer.message().find("is larger than the manifest's size " +
                                  std::to_string(data.size() - 1)),
            std::string::npos)
      << longer.message();
  EXPECT_LE(shorter.bytes.size(), data.size() - 1);

  Collected truncated;
  const Status s = source->fetch(digest_of(data), data.size() + 5, truncated.sink(), nullptr);
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("truncated: " + std::to_string(data.size()) + " of " +
                             std::to_string(data.size() + 5) + " bytes"),
            std::string::npos)
      << s.message();

  Collected none;
  EXPECT_EQ(source->fetch(digest_of("absent"), 6, none.sink(), nullptr).code(), Code::kNotFound);
}

TEST_F(ImageSourceTest, DirSourceStopsOnCancelAndOnSinkErrors) {
  const std::string data = pattern_bytes(4 * kMiB, 'x');
  store_->put_blob(data);
  auto source = dir_source();
  std::atomic<bool> cancel{false};
  int chunks = 0;
  const Status cancelled = source->fetch(
      digest_of(data), data.size(),
      [&](std::span<const uint8_t>) {
        ++chunks;
        cancel = true;
        return Status::ok();
      },
      &cancel);
  EXPECT_EQ(cancelled.code(), Code::kConflict);
  EXPECT_EQ(cancelled.message(), "cancelled");
  EXPECT_EQ(chunks, 1);

  const Status sink_error = source->fetch(
      digest_of(data), data.size(),
      [](std::span<const uint8_t>) { return Status(Code::kInsufficientCapacity, "disk full"); },
      nullptr);
  EXPECT_EQ(sink_error.code(), Code::kInsufficientCapacity);
  EXPECT_EQ(sink_error.message(), "disk full");
}

// ---- HTTP source ----

TEST_F(ImageSourceTest, HttpSourceReadsManifestsAndBlobs) {
  const std::string data = pattern_bytes(3 * kMiB + 7, 'h');
  const auto m = store_->put_image("debian:12", data, ImageFormat::kRaw);
  auto server = serve();
  auto source = http_source(server->url().substr(0, server->url().size() - 1));  // no '/'
  EXPECT_EQ(source->describe(), server->url());
  auto got = source->manifest(image_ref("debian:12"));
  ASSERT_TRUE(got.is_ok()) << got.status().to_string();
  EXPECT_EQ(*got, m);
  EXPECT_EQ(server->requests("/debian/12.json"), 1);

  Collected blob;
  const Status s = source->fetch(m.digest, m.size, blob.sink(), nullptr);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(blob.bytes, data);
  for (size_t c : blob.chunks) EXPECT_LE(c, kMiB);
  EXPECT_EQ(blob.chunks.front(), kMiB);  // buffered into whole chunks, not curl's 16 KiB pieces
  EXPECT_EQ(server->requests(blob_url_path(data)), 1);
}

TEST_F(ImageSourceTest, HttpSourceMapsStatusesAndNamesTheUrl) {
  store_->put_image("debian:12", "abc");
  auto server = serve();
  auto source = http_source(server->url());
  EXPECT_EQ(source->manifest(image_ref("debian:13")).status().code(), Code::kNotFound);

  server->set_fault("/debian/12.json", {.status = 500});
  const Status s = source->manifest(image_ref("debian:12")).status();
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find("GET '" + server->url() + "debian/12.json': HTTP 500"),
            std::string::npos)
      << s.message();

  server->set_fault(blob_url_path("abc"), {.status = 404});
  Collected none;
  EXPECT_EQ(source->fetch(digest_of("abc"), 3, none.sink(), nullptr).code(), Code::kNotFound);
  EXPECT_TRUE(none.bytes.empty());  // the error page never reaches the sink

  server->set_fault(blob_url_path("abc"), {.status = 503});
  EXPECT_EQ(source->fetch(digest_of("abc"), 3, none.sink(), nullptr).code(), Code::kUnavailable);
  EXPECT_TRUE(none.bytes.empty());
}

TEST_F(ImageSourceTest, HttpSourceDoesNotFollowRedirects) {
  store_->put_image("debian:12", "abc");
  auto server = serve();
  server->set_fault("/debian/12.json", {.status = 302, .location = "file:///etc/passwd"});
  server->set_fault(blob_url_path("abc"), {.status = 301, .location = server->url() + "x"});
  auto source = http_source(server->url());
  const Status s = source->manifest(image_ref("debian:12")).status();
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
  EXPECT_NE(s.message().find("HTTP 302"), std::string::npos) << s.message();
  Collected none;
  EXPECT_EQ(source->fetch(digest_of("abc"), 3, none.sink(), nullptr).code(), Code::kUnavailable);
  EXPECT_EQ(server->requests("/x"), 0);
  EXPECT_TRUE(none.bytes.empty());
}

TEST_F(ImageSourceTest, HttpSourceUnreachableServerIsUnavailable) {
  auto server = serve();
  const std::string url = server->url();
  server->stop();
  const Status s = http_source(url)->manifest(image_ref("debian:12")).status();
  EXPECT_EQ(s.code(), Code::kUnavailable);
  EXPECT_NE(s.message().find(url + "debian/12.json"), std::string::npos) << s.message();
}

TEST_F(ImageSourceTest, HttpSourceCapsManifestSize) {
  test::write_bytes(store_->root() / "big" / "1.json", std::string(kMaxManifestBytes + 1, ' '));
  auto server = serve();
  const Status s = http_source(server->url())->manifest(image_ref("big:1")).status();
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.to_string();
}

TEST_F(ImageSourceTest, HttpSourceDetectsTruncationAndWrongLengths) {
  const std::string data = pattern_bytes(2 * kMiB, 'w');
  store_->put_blob(data);
  auto server = serve();
  auto source = http_source(server->url());
  const std::string path = blob_url_path(data);

  server->set_fault(path, {.close_after = kMiB + 3});
  Collected cut;
  Status s = source->fetch(digest_of(data), data.size(), cut.sink(), nullptr);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(server->url() + path.substr(1)), std::string::npos) << s.message();

  server->set_fault(path, {.content_length = kMiB});  // announces less than the manifest size
  Collected shorter;
  s = source->fetch(digest_of(data), data.size(), shorter.sink(), nullptr);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
  EXPECT_NE(s.message().find("truncated: 1048576 of 2097152 bytes"), std::string::npos)
      << s.message();

  server->set_fault(path, {.content_length = 3 * kMiB});  // announces more, then closes
  Collected longer;
  s = source->fetch(digest_of(data), data.size(), longer.sink(), nullptr);
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();

  server->clear_faults();
  Collected too_big;
  s = source->fetch(digest_of(data), data.size() - 1, too_big.sink(), nullptr);
  EXPECT_EQ(s.code(), Code::kInvalidArgument) << s.to_string();
  EXPECT_NE(s.message().find("larger than the manifest's size"), std::string::npos);
}

TEST_F(ImageSourceTest, HttpSourceAbandonsAStalledTransfer) {
  const std::string data = pattern_bytes(2 * kMiB, 's');
  store_->put_blob(data);
  auto server = serve();
  server->set_fault(blob_url_path(data), {.stall_after = 100 * 1024});
  Collected got;
  const auto start = std::chrono::steady_clock::now();
  const Status s =
      http_source(server->url())->fetch(digest_of(data), data.size(), got.sink(), nullptr);
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(s.code(), Code::kUnavailable) << s.to_string();
  EXPECT_LT(took, std::chrono::seconds(5));
  EXPECT_GE(took, std::chrono::milliseconds(900));
}

TEST_F(ImageSourceTest, HttpSourceToleratesASlowButSteadyServer) {
  const std::string data = pattern_bytes(kMiB / 4, 'r');
  store_->put_blob(data);
  auto server = serve();
  server->set_fault(blob_url_path(data), {.bytes_per_second = kMiB / 8});
  Collected got;
  const Status s =
      http_source(server->url())->fetch(digest_of(data), data.size(), got.sink(), nullptr);
  ASSERT_TRUE(s.is_ok()) << s.to_string();
  EXPECT_EQ(got.bytes, data);
}

TEST_F(ImageSourceTest, HttpSourceCancelsAndPassesSinkErrorsThrough) {
  const std::string data = pattern_bytes(8 * kMiB, 'k');
  store_->put_blob(data);
  auto server = serve();
  auto source = http_source(server->url());
  std::atomic<bool> cancel{false};
  const Status cancelled = source->fetch(
      digest_of(data), data.size(),
      [&](std::span<const uint8_t>) {
        cancel = true;
        return Status::ok();
      },
      &cancel);
  EXPECT_EQ(cancelled.code(), Code::kConflict) << cancelled.to_string();
  EXPECT_EQ(cancelled.message(), "cancelled");

  const Status sink_error = source->fetch(
      digest_of(data), data.size(),
      [](std::span<const uint8_t>) { return Status(Code::kInsufficientCapacity, "disk full"); },
      nullptr);
  EXPECT_EQ(sink_error.code(), Code::kInsufficientCapacity);
  EXPECT_EQ(sink_error.message(), "disk full");
}

TEST(OpenImageSource, ChoosesTheAdapterFromTheSpec) {
  auto http = open_image_source("http://10.0.0.5:8080/images", "image_sources[0]");
  ASSERT_TRUE(http.is_ok()) << http.status().to_string();
  EXPECT_EQ((*http)->describe(), "http://10.0.0.5:8080/images/");
  auto dir = open_image_source("dir:/srv/images/", "image_sources[1]");
  ASSERT_TRUE(dir.is_ok()) << dir.status().to_string();
  EXPECT_EQ((*dir)->describe(), "dir:/srv/images");
  auto plain = open_image_source("/srv/images", "image_sources[1]");
  ASSERT_TRUE(plain.is_ok()) << plain.status().to_string();
  EXPECT_EQ((*plain)->describe(), "dir:/srv/images");

  for (const char* bad : {"https://store/", "ftp://store/", "file:///srv", "srv/images", "dir:x",
                          "http://", "http://a b/", "http://store/?x=1"}) {
    const Status s = open_image_source(bad, "image_sources[2]").status();
    EXPECT_EQ(s.code(), Code::kInvalidArgument) << bad;
  }
  EXPECT_EQ(open_image_source("srv", "image_sources[2]")
                .status()
                .message()
                .rfind("image_sources[2]: 'srv' is not an image source", 0),
            0u);
}

}  // namespace
}  // namespace nm
