// IPv4 addresses, IPv4 subnets and Ethernet MAC addresses as value types, validated once at the
// edge (parse) and impossible to confuse afterwards.
#pragma once

#include <array>
#include <compare>
#include <cstdint>
#include <string>
#include <string_view>

#include "nm/core/ids.h"
#include "nm/core/status.h"

namespace nm::network {

class Ipv4Address {
 public:
  constexpr Ipv4Address() = default;
  // `host_order` is the address as a number, 10.0.0.1 == 0x0a000001.
  static constexpr Ipv4Address from_uint(uint32_t host_order) { return Ipv4Address(host_order); }
  // Strict dotted quad: four decimal octets 0..255, no leading zeros ("010.0.0.1" is refused:
  // inet_aton would read it as octal), no spaces. InvalidArgument naming `field` otherwise.
  static Result<Ipv4Address> parse(std::string_view text, std::string_view field);

  constexpr uint32_t to_uint() const { return value_; }
  std::string str() const;  // "10.0.0.1"

  constexpr auto operator<=>(const Ipv4Address&) const = default;

 private:
  constexpr explicit Ipv4Address(uint32_t v) : value_(v) {}
  uint32_t value_ = 0;
};

// An IPv4 subnet in canonical form: the host bits of `network()` are zero.
class Ipv4Cidr {
 public:
  constexpr Ipv4Cidr() = default;
  // "10.1.0.0/24": a strict dotted quad (as Ipv4Address::parse), '/', a decimal prefix 0..32
  // without leading zeros. Refuses host bits set ("field: '10.1.0.5/24': host bits must be zero
  // (did you mean '10.1.0.0/24'?)") and every other form. InvalidArgument naming `field`.
  static Result<Ipv4Cidr> parse(std::string_view text, std::string_view field);
  // Precondition: host bits of `network` are zero and prefix <= 32.
  static Ipv4Cidr trusted(Ipv4Address network, int prefix);

  Ipv4Address network() const { return network_; }
  int prefix() const { return prefix_; }
  uint32_t mask() const;  // host order, 0xffffff00 for /24
  Ipv4Address broadcast() const;
  // Number of addresses in the subnet including network and broadcast (2^(32-prefix)).
  uint64_t size() const;
  bool contains(Ipv4Address a) const;
  bool overlaps(const Ipv4Cidr& other) const;
  std::string str() const;  // "10.1.0.0/24"

  auto operator<=>(const Ipv4Cidr&) const = default;

 private:
  Ipv4Address network_;
  int prefix_ = 0;
};

class MacAddress {
 public:
  constexpr MacAddress() = default;
  explicit constexpr MacAddress(std::array<uint8_t, 6> bytes) : bytes_(bytes) {}
  // "02:ab:cd:ef:01:23", six two-digit hex octets separated by ':' (either case). InvalidArgument
  // naming `field` otherwise.
  static Result<MacAddress> parse(std::string_view text, std::string_view field);

  const std::array<uint8_t, 6>& bytes() const { return bytes_; }
  std::string str() const;  // lowercase "02:ab:cd:ef:01:23"
  bool is_locally_administered_unicast() const { return (bytes_[0] & 0x03) == 0x02; }

  auto operator<=>(const MacAddress&) const = default;

 private:
  std::array<uint8_t, 6> bytes_{};
};

// The MAC of a VM's port: locally administered unicast (first octet 0x02 or with the 0x02 bit set
// and 0x01 clear), derived deterministically from the VM id and `attempt` (0 first; the caller
// bumps it when the database already holds that MAC on this node, so the result is unique here).
// It is the first six bytes of SHA-256("nodemanager-mac:" + id + ":" + decimal attempt) with the
// two low bits of the first octet set to 10; the derivation is pinned by a unit test, since
// changing it would give existing VMs new MACs.
MacAddress derive_vm_mac(const VmId& id, uint32_t attempt);

// VXLAN network identifier: 1..16777215 (24 bits; 0 is refused as reserved).
class Vni {
 public:
  static constexpr uint32_t kMin = 1;
  static constexpr uint32_t kMax = (1U << 24) - 1;
  // InvalidArgument "field: must be between 1 and 16777215, got N" outside the range.
  static Result<Vni> parse(int64_t value, std::string_view field);
  // Precondition: kMin <= value <= kMax (asserted in debug builds).
  static Vni trusted(uint32_t value);
  uint32_t value() const { return value_; }
  auto operator<=>(const Vni&) const = default;

 private:
  explicit Vni(uint32_t v) : value_(v) {}
  uint32_t value_ = 0;
};

}  // namespace nm::network
