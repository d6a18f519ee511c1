// Pure renderer of libvirt domain XML from desired state. Checked by golden files
// (tests/golden/domain/*.xml); every text and attribute value is XML-escaped.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/vm_spec.h"

namespace nm {

// XML namespace of the metadata element that marks a domain as ours.
inline constexpr const char* kMetadataNamespace = "https://nodemanager.org/xmlns/vm/1";
inline constexpr const char* kMetadataPrefix = "nm";

struct DomainXmlInput {
  VmId id;
  VmSpec spec;
  uint64_t generation = 1;
  std::string domain_type = "kvm";  // "kvm", "qemu" (TCG) or "test" (libvirt's test driver)
  std::string machine = "pc";
  std::string disk_path;             // the VM's overlay
  std::string disk_format = "qcow2";
  std::optional<std::string> kernel_path;
  std::optional<std::string> initrd_path;
  std::string serial_log_path;       // the guest's serial console is written here
};

// The libvirt domain name for a VM: "nm-<name>".
std::string domain_name(const VmSpec& spec);

// <domain type=...> with uuid = id, name = domain_name(), vcpus, memory, the overlay as vda
// (virtio), optional direct kernel boot, a file serial console, and
// <metadata><nm:vm xmlns:nm="..." id="..." tenant="..." generation="N"/></metadata>.
std::string render_domain_xml(const DomainXmlInput& in);

// The element libvirt's virDomainGetMetadata() returns for our namespace, and its inverse.
struct DomainOwner {
  VmId vm_id;
  TenantId tenant;
  uint64_t generation = 0;
  bool operator==(const DomainOwner&) const = default;
};
std::string render_owner_metadata(const DomainOwner& owner);
// Parses the metadata element (attribute order and quoting style as libvirt reformats them).
Result<DomainOwner> parse_owner_metadata(std::string_view xml);

}  // namespace nm
