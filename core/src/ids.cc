#include "nm/core/ids.h"

#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <random>

namespace nm {
namespace {
bool is_lower_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}
bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-';
}
}  // namespace

bool is_valid_name(std::string_view s) {
  if (s.empty() || s.size() > 63) return false;
  if (s.front() == '-') return false;
  for (char c : s) {
    if (!is_name_char(c)) return false;
  }
  return true;
}

bool VmIdTag::valid(std::string_view s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? s[i] != '-' : !is_lower_hex(s[i])) return false;
  }
  return true;
}

bool DigestTag::valid(std::string_view s) {
  constexpr std::string_view kPrefix = "sha256:";
  if (s.size() != kPrefix.size() + 64 || s.substr(0, kPrefix.size()) != kPrefix) return false;
  for (char c : s.substr(kPrefix.size())) {
    if (!is_lower_hex(c)) return false;
  }
  return true;
}

bool RequestIdTag::valid(std::string_view s) {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == ':' || c == '-';
    if (!ok) return false;
  }
  return true;
}

VmId generate_vm_id() {
  std::array<unsigned char, 16> b{};
  // One getrandom(2) for all 16 bytes (std::random_device costs a setup and a call per byte).
  // It blocks only until the kernel's pool is first initialized, long before a VM is created.
  ssize_t got = -1;
  do {
    got = getrandom(b.data(), b.size(), 0);
  } while (got < 0 && errno == EINTR);
  if (got != static_cast<ssize_t>(b.size())) {
    std::random_device rd;
    for (auto& x : b) x = static_cast<unsigned char>(rd());
  }
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);
  char out[37];
  std::snprintf(out, sizeof out,
                "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
                b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                b[15]);
  return VmId::trusted(out);
}

Result<ImageRef> ImageRef::parse(std::string_view text, std::string_view field) {
  const auto colon = text.find(':');
  auto bad = [&] {
    return Status(Code::kInvalidArgument,
                  std::string(field) + ": '" + std::string(text) +
                      "' is not NAME:TAG (NAME like [a-z0-9][a-z0-9-]{0,62}, TAG 1-63 of "
                      "[a-z0-9._-])");
  };
  if (colon == std::string_view::npos) return bad();
  const auto name = text.substr(0, colon);
  const auto tag = text.substr(colon + 1);
  if (!is_valid_name(name) || tag.empty() || tag.size() > 63) return bad();
  for (char c : tag) {
    if (!(is_name_char(c) || c == '.' || c == '_')) return bad();
  }
  if (tag.front() == '.' || tag.front() == '-') return bad();
  return ImageRef{std::string(name), std::string(tag)};
}

}  // namespace nm
