#include "nm/network/addr.h"

#include <openssl/evp.h>

#include <cassert>
#include <cstdlib>
#include <optional>

#include "nm/core/strict_json.h"

namespace nm::network {
namespace {

using strict_json::printable;

bool is_digit(char c) {
  return c >= '0' && c <= '9';
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// A decimal number of 1 to `max_digits` digits without leading zeros, at most `max_value`.
std::optional<uint32_t> parse_decimal(std::string_view s, size_t max_digits, uint32_t max_value) {
  if (s.empty() || s.size() > max_digits || (s.size() > 1 && s.front() == '0')) {
    return std::nullopt;
  }
  uint32_t v = 0;
  for (char c : s) {
    if (!is_digit(c)) return std::nullopt;
    v = v * 10 + static_cast<uint32_t>(c - '0');
  }
  if (v > max_value) return std::nullopt;
  return v;
}

std::optional<uint32_t> parse_dotted_quad(std::string_view s) {
  uint32_t value = 0;
  for (int octet = 0; octet < 4; ++octet) {
    const size_t dot = s.find('.');
    const bool last = octet == 3;
    if (last != (dot == std::string_view::npos)) return std::nullopt;
    const auto part = parse_decimal(s.substr(0, dot), 3, 255);
    if (!part) return std::nullopt;
    value = (value << 8) | *part;
    s.remove_prefix(last ? s.size() : dot + 1);
  }
  return value;
}

uint32_t prefix_mask(int prefix) {
  assert(prefix >= 0 && prefix <= 32);
  return prefix == 0 ? 0 : ~uint32_t{0} << (32 - prefix);
}

}  // namespace

Result<Ipv4Address> Ipv4Address::parse(std::string_view text, std::string_view field) {
  const auto v = parse_dotted_quad(text);
  if (!v) {
    return invalid_argument(std::string(field) + ": '" + printable(text) +
                            "' is not a dotted-quad IPv4 address (four decimal octets 0-255, no "
                            "leading zeros)");
  }
  return Ipv4Address(*v);
}

std::string Ipv4Address::str() const {
  return std::to_string(value_ >> 24) + "." + std::to_string((value_ >> 16) & 0xff) + "." +
         std::to_string((value_ >> 8) & 0xff) + "." + std::to_string(value_ & 0xff);
}

Result<Ipv4Cidr> Ipv4Cidr::parse(std::string_view text, std::string_view field) {
  const auto bad_form = [&] {
    return invalid_argument(std::string(field) + ": '" + printable(text) +
                            "' is not an IPv4 subnet A.B.C.D/N (four decimal octets 0-255 and a "
                            "prefix length 0-32, no leading zeros)");
  };
  const size_t slash = text.find('/');
  if (slash == std::string_view::npos) return bad_form();
  const auto addr = parse_dotted_quad(text.substr(0, slash));
  const auto prefix = parse_decimal(text.substr(slash + 1), 2, 32);
  if (!addr || !prefix) return bad_form();
  const int p = static_cast<int>(*prefix);
  const uint32_t network = *addr & prefix_mask(p);
  if (network != *addr) {
    const Ipv4Cidr canonical = trusted(Ipv4Address::from_uint(network), p);
    return invalid_argument(std::string(field) + ": '" + printable(text) +
                            "': host bits must be zero (did you mean '" + canonical.str() + "'?)");
  }
  return trusted(Ipv4Address::from_uint(network), p);
}

Ipv4Cidr Ipv4Cidr::trusted(Ipv4Address network, int prefix) {
  assert(prefix >= 0 && prefix <= 32);
  assert((network.to_uint() & ~prefix_mask(prefix)) == 0);
  Ipv4Cidr c;
  c.network_ = network;
  c.prefix_ = prefix;
  return c;
}

uint32_t Ipv4Cidr::mask() const {
  return prefix_mask(prefix_);
}

Ipv4Address Ipv4Cidr::broadcast() const {
  return Ipv4Address::from_uint(network_.to_uint() | ~mask());
}

uint64_t Ipv4Cidr::size() const {
  return uint64_t{1} << (32 - prefix_);
}

bool Ipv4Cidr::contains(Ipv4Address a) const {
  return (a.to_uint() & mask()) == network_.to_uint();
}

bool Ipv4Cidr::overlaps(const Ipv4Cidr& other) const {
  return contains(other.network_) || other.contains(network_);
}

std::string Ipv4Cidr::str() const {
  return network_.str() + "/" + std::to_string(prefix_);
}

Result<MacAddress> MacAddress::parse(std::string_view text, std::string_view field) {
  std::array<uint8_t, 6> bytes{};
  bool ok = text.size() == 17;
  for (size_t i = 0; ok && i < bytes.size(); ++i) {
    const int hi = hex_value(text[i * 3]);
    const int lo = hex_value(text[i * 3 + 1]);
    ok = hi >= 0 && lo >= 0 && (i == 5 || text[i * 3 + 2] == ':');
    bytes[i] = static_cast<uint8_t>((hi << 4) | lo);
  }
  if (!ok) {
    return invalid_argument(std::string(field) + ": '" + printable(text) +
                            "' is not a MAC address (six two-digit hex octets separated by ':')");
  }
  return MacAddress(bytes);
}

std::string MacAddress::str() const {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(17);
  for (size_t i = 0; i < bytes_.size(); ++i) {
    if (i != 0) out += ':';
    out += kHex[bytes_[i] >> 4];
    out += kHex[bytes_[i] & 0xf];
  }
  return out;
}

MacAddress derive_vm_mac(const VmId& id, uint32_t attempt) {
  const std::string input = "nodemanager-mac:" + id.str() + ":" + std::to_string(attempt);
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned int md_len = 0;
  if (EVP_Digest(input.data(), input.size(), md.data(), &md_len, EVP_sha256(), nullptr) != 1 ||
      md_len < 6) {
    // SHA-256 is built into libcrypto; failing to compute it means a broken installation.
    std::abort();
  }
  std::array<uint8_t, 6> bytes{};
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = md[i];
  bytes[0] = static_cast<uint8_t>((bytes[0] & 0xfc) | 0x02);
  return MacAddress(bytes);
}

Result<Vni> Vni::parse(int64_t value, std::string_view field) {
  if (value < kMin || value > kMax) {
    return invalid_argument(std::string(field) + ": must be between " + std::to_string(kMin) +
                            " and " + std::to_string(kMax) + ", got " + std::to_string(value));
  }
  return Vni(static_cast<uint32_t>(value));
}

Vni Vni::trusted(uint32_t value) {
  assert(value >= kMin && value <= kMax);
  return Vni(value);
}

}  // namespace nm::network
