// Helpers shared by the imagestore tests: digests, image bytes and a shared store on disk.
#pragma once

#include <openssl/evp.h>

#include <array>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>

#include "nm/core/clock.h"
#include "nm/core/ids.h"
#include "nm/imagestore/manifest.h"

namespace nm::test {

inline std::string sha256_hex(const std::string& data) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), md.data(), &len, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[md[i] >> 4]);
    out.push_back(kHex[md[i] & 0x0f]);
  }
  return out;
}

inline Digest digest_of(const std::string& data) {
  return Digest::trusted("sha256:" + sha256_hex(data));
}

inline ImageRef image_ref(const std::string& text) {
  return *ImageRef::parse(text, "ref");
}

inline std::string pattern_bytes(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + static_cast<char>(i % 251));
  return s;
}

// A qcow2 v3 header (no backing file, no data file) followed by zero padding.
inline std::string qcow2_bytes(uint64_t virtual_size) {
  std::string b(4096, '\0');
  const auto be32 = [&](size_t off, uint32_t v) {
    for (size_t i = 0; i < 4; ++i) b[off + i] = static_cast<char>((v >> (24 - 8 * i)) & 0xff);
  };
  b[0] = 'Q';
  b[1] = 'F';
  b[2] = 'I';
  b[3] = static_cast<char>(0xfb);
  be32(4, 3);
  be32(20, 16);
  be32(24, static_cast<uint32_t>(virtual_size >> 32));
  be32(28, static_cast<uint32_t>(virtual_size));
  be32(96, 4);
  be32(100, 104);
  return b;
}

inline void write_bytes(const std::filesystem::path& p, const std::string& data) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary).write(data.data(), static_cast<std::streamsize>(data.size()));
}

inline size_t count_entries(const std::filesystem::path& dir) {
  if (!std::filesystem::exists(dir)) return 0;
  return static_cast<size_t>(std::distance(std::filesystem::directory_iterator(dir),
                                           std::filesystem::directory_iterator{}));
}

// A shared store laid out as image_source.h describes, written by tests.
class SharedStoreDir {
 public:
  explicit SharedStoreDir(std::filesystem::path root) : root_(std::move(root)) {
    std::filesystem::create_directories(root_ / "blobs" / "sha256");
  }
  const std::filesystem::path& root() const { return root_; }

  void put_blob(const std::string& data) const { write_bytes(blob_path(digest_of(data)), data); }
  std::filesystem::path blob_path(const Digest& d) const {
    return root_ / "blobs" / "sha256" / d.str().substr(7);
  }
  void put_manifest(const std::string& ref, const ImageManifest& m) const {
    const ImageRef r = image_ref(ref);
    write_bytes(root_ / r.name / (r.tag + ".json"), image_manifest_to_json(m));
  }
  // Blob and a manifest that tells the truth about it; returns the manifest.
  ImageManifest put_image(const std::string& ref, const std::string& data,
                          ImageFormat format = ImageFormat::kRaw,
                          ImageKind kind = ImageKind::kDisk) const {
    put_blob(data);
    const ImageManifest m{
        .digest = digest_of(data), .size = data.size(), .format = format, .kind = kind};
    put_manifest(ref, m);
    return m;
  }

 private:
  std::filesystem::path root_;
};

class FakeClock final : public Clock {
 public:
  uint64_t now_realtime_us() const override { return now_us.fetch_add(1000); }
  std::chrono::steady_clock::time_point now_monotonic() const override {
    return std::chrono::steady_clock::time_point{};
  }
  mutable std::atomic<uint64_t> now_us{1'700'000'000'000'000};
};

}  // namespace nm::test
