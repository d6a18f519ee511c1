#include <curl/curl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "nm/core/strict_json.h"
#include "nm/imagestore/image_source.h"

namespace nm {
namespace {

constexpr size_t kChunkBytes = size_t{1} << 20;
constexpr uint64_t kStallBytesPerSecond = 1024;

struct CurlEasyDeleter {
  void operator()(CURL* c) const noexcept { curl_easy_cleanup(c); }
};
using CurlEasyPtr = std::unique_ptr<CURL, CurlEasyDeleter>;

bool curl_ready() {
  static const bool kReady = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
  return kReady;
}

// What one transfer collects; the C callbacks below write into it and never throw.
struct Transfer {
  // Manifest mode: the body, capped.
  std::string* body = nullptr;
  size_t body_limit = 0;
  // Blob mode: chunks of up to kChunkBytes go to `sink`; at most `size` bytes are accepted.
  const BlobSink* sink = nullptr;
  uint64_t size = 0;
  std::vector<uint8_t> chunk;

  CURL* curl = nullptr;
  const std::atomic<bool>* cancel = nullptr;
  // Stall detection: fewer than kStallBytesPerSecond * stall_timeout bytes in a window of
  // stall_timeout abandons the transfer.
  std::chrono::steady_clock::duration stall_timeout{};
  std::chrono::steady_clock::time_point window_start;
  uint64_t window_bytes = 0;
  bool stalled = false;
  uint64_t received = 0;
  bool too_large = false;
  bool bad_status = false;
  long status = 0;
  std::optional<Status> sink_error;

  Status flush() {
    if (chunk.empty()) return Status::ok();
    Status s = (*sink)(std::span<const uint8_t>(chunk.data(), chunk.size()));
    chunk.clear();
    return s;
  }
};

size_t on_data(char* data, size_t one, size_t n, void* user) noexcept {
  auto* t = static_cast<Transfer*>(user);
  const size_t len = one * n;
  try {
    if (t->status == 0) {
      curl_easy_getinfo(t->curl, CURLINFO_RESPONSE_CODE, &t->status);
      if (t->status != 200) {
        t->bad_status = true;
        return 0;
      }
    }
    if (t->body != nullptr) {
      if (t->body->size() + len > t->body_limit) {
        t->too_large = true;
        return 0;
      }
      t->body->append(data, len);
      return len;
    }
    if (t->received + len > t->size) {
      t->too_large = true;
      return 0;
    }
    t->received += len;
    const auto* p = reinterpret_cast<const uint8_t*>(data);
    size_t off = 0;
    while (off < len) {
      const size_t take = std::min(len - off, kChunkBytes - t->chunk.size());
      t->chunk.insert(t->chunk.end(), p + off, p + off + take);
      off += take;
      if (t->chunk.size() == kChunkBytes) {
        Status s = t->flush();
        if (!s.is_ok()) {
          t->sink_error = std::move(s);
          return 0;
        }
      }
    }
    return len;
  } catch (...) {
    t->sink_error = internal_error("image transfer: unexpected exception in a data callback");
    return 0;
  }
}

int on_progress(void* user, curl_off_t /*dltotal*/, curl_off_t dlnow, curl_off_t /*ultotal*/,
                curl_off_t /*ulnow*/) noexcept {
  auto* t = static_cast<Transfer*>(user);
  if (t->cancel != nullptr && t->cancel->load(std::memory_order_relaxed)) return 1;
  const auto now = std::chrono::steady_clock::now();
  const auto bytes = static_cast<uint64_t>(std::max<curl_off_t>(dlnow, 0));
  if (now - t->window_start < t->stall_timeout) return 0;
  const auto seconds = std::chrono::duration<double>(now - t->window_start).count();
  if (static_cast<double>(bytes - t->window_bytes) <
      static_cast<double>(kStallBytesPerSecond) * seconds) {
    t->stalled = true;
    return 1;
  }
  t->window_start = now;
  t->window_bytes = bytes;
  return 0;
}

class HttpImageSource final : public ImageSource {
 public:
  HttpImageSource(std::string base, HttpSourceOptions options)
      : base_(std::move(base)), options_(options) {}

  const std::string& describe() const override { return base_; }

  Result<ImageManifest> manifest(const ImageRef& ref) override {
    const std::string url = base_ + ref.name + "/" + ref.tag + ".json";
    std::string body;
    Transfer t;
    t.body = &body;
    t.body_limit = kMaxManifestBytes;
    NM_RETURN_IF_ERROR(run(url, t));
    return parse_image_manifest(body, "manifest '" + ref.str() + "' from '" + url + "'");
  }

  Status fetch(const Digest& digest, uint64_t size, const BlobSink& sink,
               const std::atomic<bool>* cancel) override {
    const std::string url = base_ + "blobs/sha256/" + digest.str().substr(sizeof "sha256:" - 1);
    Transfer t;
    t.sink = &sink;
    t.size = size;
    t.cancel = cancel;
    t.chunk.reserve(std::min<uint64_t>(kChunkBytes, size));
    NM_RETURN_IF_ERROR(run(url, t));
    NM_RETURN_IF_ERROR(t.flush());
    if (t.received < size) {
      return unavailable("GET '" + url + "': truncated: " + std::to_string(t.received) + " of " +
                         std::to_string(size) + " bytes");
    }
    return Status::ok();
  }

 private:
  // Runs one GET; every outcome other than a complete 200 response is a Status naming `url`.
  Status run(const std::string& url, Transfer& t) const {
    CurlEasyPtr curl(curl_ready() ? curl_easy_init() : nullptr);
    if (!curl) return internal_error("GET '" + url + "': cannot initialise libcurl");
    t.curl = curl.get();
    std::array<char, CURL_ERROR_SIZE> error{};
    t.stall_timeout = options_.stall_timeout;
    t.window_start = std::chrono::steady_clock::now();
    CURL* c = curl.get();
    bool set = curl_easy_setopt(c, CURLOPT_URL, url.c_str()) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http") == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http") == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_PROXY, "") == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_ERRORBUFFER, error.data()) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS,
                                static_cast<long>(options_.connect_timeout.count())) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_BUFFERSIZE, 512L * 1024) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_USERAGENT, "nodemanager") == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, &on_data) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_WRITEDATA, &t) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, &on_progress) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_XFERINFODATA, &t) == CURLE_OK &&
               curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L) == CURLE_OK;
    if (!set) return internal_error("GET '" + url + "': cannot configure libcurl");

    const CURLcode rc = curl_easy_perform(c);
    if (t.sink_error) return *t.sink_error;
    const std::string where = "GET '" + url + "'";
    long status = t.status;
    if (status == 0) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (rc == CURLE_OK && status == 200) return Status::ok();
    if (rc == CURLE_HTTP_RETURNED_ERROR || t.bad_status || rc == CURLE_OK) {
      if (status == 404) return not_found(where + ": HTTP 404 (not found)");
      return unavailable(where + ": HTTP " + std::to_string(status));
    }
    if (t.too_large) {
      if (t.body != nullptr) {
        return invalid_argument(where + ": manifest is larger than " +
                                std::to_string(t.body_limit) + " bytes");
      }
      return invalid_argument(where + ": blob is larger than the manifest's size " +
                              std::to_string(t.size));
    }
    if (rc == CURLE_ABORTED_BY_CALLBACK && t.stalled) {
      return unavailable(where + ": stalled: less than " + std::to_string(kStallBytesPerSecond) +
                         " bytes/s for " + std::to_string(options_.stall_timeout.count()) +
                         " ms after " + std::to_string(t.received) + " bytes");
    }
    if (rc == CURLE_ABORTED_BY_CALLBACK) return conflict("cancelled");
    if (rc == CURLE_PARTIAL_FILE && t.body == nullptr) {
      return unavailable(where + ": truncated: " + std::to_string(t.received) + " of " +
                         std::to_string(t.size) + " bytes (connection closed)");
    }
    const std::string detail = error[0] != '\0' ? error.data() : curl_easy_strerror(rc);
    return unavailable(where + ": " + detail);
  }

  const std::string base_;
  const HttpSourceOptions options_;
};

}  // namespace

Result<std::unique_ptr<ImageSource>> open_http_image_source(const std::string& base_url,
                                                            HttpSourceOptions options) {
  if (!base_url.starts_with("http://") || base_url.size() <= sizeof "http://" - 1) {
    return invalid_argument("image source: '" + strict_json::printable(base_url, 200) +
                            "' is not an http:// URL");
  }
  for (char ch : base_url) {
    const auto u = static_cast<unsigned char>(ch);
    if (u <= 0x20 || u >= 0x7f) {
      return invalid_argument("image source: '" + strict_json::printable(base_url, 200) +
                              "' contains spaces, control or non-ASCII characters");
    }
  }
  if (base_url.find_first_of("?#") != std::string::npos) {
    return invalid_argument("image source: '" + strict_json::printable(base_url, 200) +
                            "' must not contain a query or fragment");
  }
  std::string base = base_url;
  if (base.back() != '/') base.push_back('/');
  if (!curl_ready()) return internal_error("image source: libcurl failed to initialise");
  return std::unique_ptr<ImageSource>(std::make_unique<HttpImageSource>(std::move(base), options));
}

}  // namespace nm
