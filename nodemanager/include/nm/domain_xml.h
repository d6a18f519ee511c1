// Pure renderer of libvirt domain XML from desired state. Checked by golden files
// (tests/golden/domain/*.xml); every text and attribute value is XML-escaped.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "nm/core/ids.h"
#include "nm/core/status.h"
#include "nm/vm_spec.h"

namespace nm {

// XML namespace of the metadata element that marks a domain as ours.
inline constexpr const char* kMetadataNamespace = "https://nodemanager.org/xmlns/vm/1";
inline constexpr const char* kMetadataPrefix = "nm";

// A virtio NIC on a tenant bridge through a tap of our name (libvirt creates and removes the tap).
struct DomainInterface {
  std::string mac;     // "02:..:..", lowercase
  std::string bridge;  // "nmbr<vni>"
  std::string tap;     // "nmt<11 hex><index>"
  bool operator==(const DomainInterface&) const = default;
};

struct DomainXmlInput {
  VmId id = VmId::trusted("00000000-0000-0000-0000-000000000000");
  VmSpec spec;
  uint64_t generation = 1;
  std::string domain_type = "kvm";  // "kvm", "qemu" (TCG) or "test" (libvirt's test driver)
  std::string machine = "pc";
  std::string disk_path;  // the VM's overlay
  std::string disk_format = "qcow2";
  std::optional<std::string> kernel_path;
  std::optional<std::string> initrd_path;
  std::string serial_log_path;              // the guest's serial console is written here
  std::vector<DomainInterface> interfaces;  // in spec order
};

// Escapes text for an XML text node or attribute value (either quote style): & < > " ' and
// tab/newline/CR as character references; other control characters, which XML 1.0 cannot carry,
// become '?'. Every value nodemanager puts into libvirt XML goes through it.
std::string xml_escape(std::string_view text);

// The libvirt domain name for a VM: "nm-<name>".
std::string domain_name(const VmSpec& spec);

// <domain type=...> with uuid = id, name = domain_name(), vcpus, memory, the overlay as vda
// (virtio), optional direct kernel boot, a file serial console, and
// <metadata><nm:vm xmlns:nm="..." id="..." tenant="..." generation="N"/></metadata>.
// Also <features><acpi/><apic/></features> (QEMU gets -no-acpi without it, and graceful
// shutdown needs ACPI), on_poweroff=destroy, on_reboot=restart, on_crash=destroy,
// <memballoon model='none'/>, and one <interface type='bridge'> per entry of `interfaces`
// (<mac>, <source bridge>, <target dev>, virtio model). The disk is omitted when disk_path
// is empty, the serial console and <console> when serial_log_path is empty; <cmdline> appears
// only with a kernel and a non-empty spec.cmdline. Pure: the same input gives the same bytes.
// Values are escaped (&<>"'); characters XML 1.0 cannot carry (C0 controls except tab/LF/CR)
// become '?', which validated input never contains.
std::string render_domain_xml(const DomainXmlInput& in);

// The element libvirt's virDomainGetMetadata() returns for our namespace, and its inverse.
//
// Measured with libvirt 9.0: virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT,
// kMetadataNamespace) returns the element without prefix or namespace declaration,
// `<vm id="..." tenant="..." generation="3"/>`, while the domain XML (virDomainGetXMLDesc) shows
// `<nm:vm xmlns:nm="https://nodemanager.org/xmlns/vm/1" id="..." .../>`.
struct DomainOwner {
  VmId vm_id;
  TenantId tenant;
  uint64_t generation = 0;
  bool operator==(const DomainOwner&) const = default;
};

// render_owner_metadata() gives the unprefixed form, which is also what
// virDomainSetMetadata(dom, VIR_DOMAIN_METADATA_ELEMENT, xml, kMetadataPrefix, kMetadataNamespace,
// flags) expects (libvirt adds the prefix; an element that already declares it is refused).
std::string render_owner_metadata(const DomainOwner& owner);
// Parses the metadata element in any of the forms above: either quote style, any attribute
// order, whitespace and newlines between attributes, with or without a prefix and namespace
// declaration (a declared namespace must be kMetadataNamespace), self-closing or empty, an
// optional leading XML declaration. Unknown attributes are ignored (forward compatibility).
// Anything missing or invalid (id not a lowercase UUID, tenant not a name, generation not a
// decimal uint64, malformed XML, trailing content) is an InvalidArgument starting "metadata".
Result<DomainOwner> parse_owner_metadata(std::string_view xml);

}  // namespace nm
