// libFuzzer target for the spec edge: parse_vm_spec(), vm_spec_to_json(), render_domain_xml()
// and parse_owner_metadata() on arbitrary bytes. Aborts when an invariant breaks:
//  - a refused spec is an InvalidArgument whose message starts with "spec";
//  - an accepted spec survives parse(to_json(spec)) unchanged and renders;
//  - accepted metadata survives parse(render(owner)) unchanged.
// Run by hand: spec_fuzz -dict=tests/fuzz/spec.dict CORPUS_DIR (see tests/fuzz/CMakeLists.txt).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include "nm/domain_xml.h"
#include "nm/vm_spec.h"

namespace {

[[noreturn]] void fail(const char* what, std::string_view detail) {
  std::fprintf(stderr, "spec_fuzz invariant broken: %s: %.*s\n", what,
               static_cast<int>(detail.size()), detail.data());
  std::abort();
}

void check_spec(std::string_view text) {
  auto spec = nm::parse_vm_spec(text);
  if (!spec.is_ok()) {
    const nm::Status st = spec.status();
    if (st.code() != nm::Code::kInvalidArgument || !st.message().starts_with("spec")) {
      fail("refusal is not an InvalidArgument naming a spec field", st.to_string());
    }
    return;
  }
  const std::string canonical = nm::vm_spec_to_json(*spec);
  auto again = nm::parse_vm_spec(canonical);
  if (!again.is_ok()) fail("canonical JSON does not parse", again.status().to_string());
  if (!(*again == *spec)) fail("round trip changed the spec", canonical);
  if (nm::vm_spec_to_json(*again) != canonical) fail("canonical JSON is not stable", canonical);

  const nm::VmId id =
      spec->id ? *spec->id : nm::VmId::trusted("00000000-0000-4000-8000-000000000000");
  nm::DomainXmlInput in{.id = id,
                        .spec = *spec,
                        .generation = text.size(),
                        .domain_type = "qemu",
                        .machine = "pc",
                        .disk_path = "/var/lib/nodemanager/instances/x/disk.qcow2",
                        .disk_format = "qcow2",
                        .kernel_path = std::nullopt,
                        .initrd_path = std::nullopt,
                        .serial_log_path = "/var/lib/nodemanager/instances/x/serial.log"};
  if (spec->kernel_image) in.kernel_path = "/k";
  if (spec->initrd_image) in.initrd_path = "/i";
  const std::string xml = nm::render_domain_xml(in);
  if (xml != nm::render_domain_xml(in)) fail("renderer is not pure", xml);
  if (xml.find("<name>" + nm::domain_name(*spec) + "</name>") == std::string::npos) {
    fail("rendered XML lacks the domain name", xml);
  }
}

void check_metadata(std::string_view text) {
  auto owner = nm::parse_owner_metadata(text);
  if (!owner.is_ok()) {
    if (owner.status().code() != nm::Code::kInvalidArgument) {
      fail("metadata refusal is not an InvalidArgument", owner.status().to_string());
    }
    return;
  }
  const std::string rendered = nm::render_owner_metadata(*owner);
  auto again = nm::parse_owner_metadata(rendered);
  if (!again.is_ok() || !(*again == *owner)) fail("metadata round trip failed", rendered);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  check_spec(text);
  check_metadata(text);
  return 0;
}
