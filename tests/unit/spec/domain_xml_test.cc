// Domain XML renderer and owner metadata tests.
//
// Golden files: tests/golden/domain/<case>.xml hold the exact bytes render_domain_xml() must
// produce. After an intended change to the renderer, regenerate them and review the diff:
//
//   NM_UPDATE_GOLDEN=1 ./spec_test --gtest_filter='DomainXmlGolden.*'
//   git diff tests/golden/domain/
#include "nm/domain_xml.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace nm {
namespace {

const std::string kGoldenDir = std::string(NM_GOLDEN_DIR) + "/domain";
const VmId kId = VmId::trusted("3f1c0a2b-1234-4abc-8def-0123456789ab");

VmSpec spec_named(const std::string& name, const std::string& tenant) {
  auto r = parse_vm_spec(R"({"name":")" + name + R"(","tenant":")" + tenant +
                         R"(","vcpus":2,"memory_mib":256,"image":"busybox-guest:1"})");
  EXPECT_TRUE(r.is_ok()) << r.status().to_string();
  return *r;
}

DomainXmlInput base_input() {
  return DomainXmlInput{
      .id = kId,
      .spec = spec_named("web-1", "contoso"),
      .generation = 3,
      .domain_type = "kvm",
      .machine = "pc",
      .disk_path = "/var/lib/nodemanager/instances/" + kId.str() + "/disk.qcow2",
      .disk_format = "qcow2",
      .kernel_path = std::nullopt,
      .initrd_path = std::nullopt,
      .serial_log_path = "/var/lib/nodemanager/instances/" + kId.str() + "/serial.log",
      .interfaces = {}};
}

DomainXmlInput direct_kernel_qemu() {
  DomainXmlInput in = base_input();
  in.domain_type = "qemu";
  in.spec.kernel_image = "guest-kernel:1";
  in.spec.initrd_image = "guest-initrd:1";
  in.spec.cmdline = "console=ttyS0 quiet";
  in.kernel_path = "/var/lib/nodemanager/images/sha256/" + std::string(64, 'b');
  in.initrd_path = "/var/lib/nodemanager/images/sha256/" + std::string(64, 'c');
  return in;
}

DomainXmlInput disk_only_kvm() {
  return base_input();
}

DomainXmlInput test_driver() {
  DomainXmlInput in = base_input();
  in.domain_type = "test";
  in.generation = 1;
  in.spec = spec_named("db-7", "fabrikam");
  return in;
}

DomainXmlInput escaped_paths() {
  DomainXmlInput in = base_input();
  in.disk_path = "/srv/a<b>/disk \"1\".qcow2";
  in.serial_log_path = "/srv/tom & jerry's/serial.log";
  return in;
}

DomainXmlInput with_networks() {
  DomainXmlInput in = direct_kernel_qemu();
  in.interfaces = {{"02:1a:2b:3c:4d:5e", "nmbr4097", "nmt3f1c0a2b1230"},
                   {"06:1a:2b:3c:4d:5f", "nmbr4098", "nmt3f1c0a2b1231"}};
  return in;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void check_golden(const std::string& name, const DomainXmlInput& in) {
  const std::string path = kGoldenDir + "/" + name + ".xml";
  const std::string actual = render_domain_xml(in);
  const char* update = std::getenv("NM_UPDATE_GOLDEN");
  if (update != nullptr && std::string(update) == "1") {
    std::ofstream(path, std::ios::binary | std::ios::trunc) << actual;
    GTEST_SKIP() << "rewrote " << path;
  }
  std::ifstream probe(path);
  ASSERT_TRUE(probe.good()) << "missing golden file " << path
                            << " (run with NM_UPDATE_GOLDEN=1 to create it)";
  EXPECT_EQ(actual, read_text(path))
      << "differs from " << path << " (if intended: NM_UPDATE_GOLDEN=1, then review the diff)";
}

TEST(DomainXmlGolden, DirectKernelBootUnderQemu) {
  check_golden("direct_kernel_qemu", direct_kernel_qemu());
}
TEST(DomainXmlGolden, DiskOnlyUnderKvm) {
  check_golden("disk_only_kvm", disk_only_kvm());
}
TEST(DomainXmlGolden, TestDriver) {
  check_golden("test_driver", test_driver());
}
TEST(DomainXmlGolden, EscapedPaths) {
  check_golden("escaped_paths", escaped_paths());
}

TEST(DomainXmlGolden, TwoTenantNetworkInterfaces) {
  check_golden("with_networks", with_networks());
}

TEST(DomainXml, IsPureSameInputSameBytes) {
  const DomainXmlInput in = direct_kernel_qemu();
  EXPECT_EQ(render_domain_xml(in), render_domain_xml(direct_kernel_qemu()));
  DomainXmlInput changed = in;
  changed.generation = 4;
  EXPECT_NE(render_domain_xml(in), render_domain_xml(changed));
}

TEST(DomainXml, EscapesEveryValueAndNeverPastesRawMetacharacters) {
  const std::string xml = render_domain_xml(escaped_paths());
  EXPECT_NE(xml.find("<source path='/srv/tom &amp; jerry&apos;s/serial.log'/>"), std::string::npos)
      << xml;
  EXPECT_NE(xml.find("<source file='/srv/a&lt;b&gt;/disk &quot;1&quot;.qcow2'/>"),
            std::string::npos)
      << xml;
  EXPECT_EQ(xml.find("tom & jerry"), std::string::npos);
  EXPECT_EQ(xml.find("a<b>"), std::string::npos);
}

TEST(DomainXml, ControlCharactersInPathsCannotBreakTheDocument) {
  DomainXmlInput in = base_input();
  in.disk_path = std::string("/x\x01y\nz", 6);
  const std::string xml = render_domain_xml(in);
  EXPECT_NE(xml.find("<source file='/x?y&#10;z'/>"), std::string::npos) << xml;
}

TEST(DomainXml, DirectKernelBootReplacesBootDevice) {
  const std::string direct = render_domain_xml(direct_kernel_qemu());
  EXPECT_NE(direct.find("<kernel>"), std::string::npos);
  EXPECT_NE(direct.find("<initrd>"), std::string::npos);
  EXPECT_NE(direct.find("<cmdline>console=ttyS0 quiet</cmdline>"), std::string::npos);
  EXPECT_EQ(direct.find("<boot "), std::string::npos);
  const std::string disk = render_domain_xml(disk_only_kvm());
  EXPECT_NE(disk.find("<boot dev='hd'/>"), std::string::npos);
  EXPECT_EQ(disk.find("<kernel>"), std::string::npos);
}

TEST(DomainXml, NameIsPrefixedAndMetadataInsideTheDomainParsesBack) {
  const DomainXmlInput in = test_driver();
  EXPECT_EQ(domain_name(in.spec), "nm-db-7");
  const std::string xml = render_domain_xml(in);
  EXPECT_NE(xml.find("<name>nm-db-7</name>"), std::string::npos);
  EXPECT_NE(xml.find("<uuid>" + kId.str() + "</uuid>"), std::string::npos);
  const auto start = xml.find("<nm:vm");
  ASSERT_NE(start, std::string::npos);
  const auto end = xml.find("/>", start);
  auto owner = parse_owner_metadata(xml.substr(start, end + 2 - start));
  ASSERT_TRUE(owner.is_ok()) << owner.status().to_string();
  EXPECT_EQ(owner->vm_id, kId);
  EXPECT_EQ(owner->tenant.str(), "fabrikam");
  EXPECT_EQ(owner->generation, 1u);
}

DomainOwner owner() {
  return DomainOwner{kId, TenantId::trusted("contoso"), 3};
}

TEST(OwnerMetadata, RoundTrips) {
  const std::string xml = render_owner_metadata(owner());
  // The form virDomainGetMetadata() returns and virDomainSetMetadata() (key "nm") accepts.
  EXPECT_EQ(xml,
            "<vm id=\"3f1c0a2b-1234-4abc-8def-0123456789ab\" tenant=\"contoso\" "
            "generation=\"3\"/>");
  auto parsed = parse_owner_metadata(xml);
  ASSERT_TRUE(parsed.is_ok()) << parsed.status().to_string();
  EXPECT_EQ(*parsed, owner());
  DomainOwner big = owner();
  big.generation = std::numeric_limits<uint64_t>::max();
  EXPECT_EQ(*parse_owner_metadata(render_owner_metadata(big)), big);
}

TEST(OwnerMetadata, AcceptsLibvirtReformattedVariants) {
  const std::string& id = kId.str();
  for (const std::string& variant : std::vector<std::string>{
           // as virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT) returns it (libvirt 9.0)
           R"(<vm id=")" + id + R"(" tenant="contoso" generation="3"/>)",
           // as it appears in virDomainGetXMLDesc() output
           R"(<nm:vm xmlns:nm="https://nodemanager.org/xmlns/vm/1" id=")" + id +
               R"(" tenant="contoso" generation="3"/>)",
           // single quotes, other attribute order, newlines and indentation
           "\n  <nm:vm generation='3'\n\ttenant='contoso' id='" + id +
               "'\n    xmlns:nm='https://nodemanager.org/xmlns/vm/1' />\n",
           // no namespace declaration (already stripped by the caller)
           "<nm:vm id='" + id + "' tenant='contoso' generation='3'/>",
           // unprefixed with a default namespace, as an explicit empty element
           R"(<vm xmlns="https://nodemanager.org/xmlns/vm/1" id=")" + id +
               R"(" tenant="contoso" generation="3"></vm>)",
           // another prefix bound to our namespace, an XML declaration, spaces around '='
           "<?xml version=\"1.0\"?>\n<x:vm xmlns:x=\"https://nodemanager.org/xmlns/vm/1\" id = \"" +
               id + R"(" tenant="contoso" generation="3"/>)",
           // an attribute from a later version is ignored
           "<nm:vm id='" + id + "' tenant='contoso' generation='3' zone='z1'/>",
       }) {
    auto r = parse_owner_metadata(variant);
    ASSERT_TRUE(r.is_ok()) << r.status().to_string() << " for: " << variant;
    EXPECT_EQ(*r, owner()) << variant;
  }
}

TEST(OwnerMetadata, RefusesMissingOrInvalidParts) {
  const std::string& id = kId.str();
  const std::vector<std::string> bad_inputs = {
      std::string(),
      std::string("   "),
      std::string("garbage"),
      "<nm:vm tenant='contoso' generation='3'/>",
      "<nm:vm id='" + id + "' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='contoso'/>",
      "<nm:vm id='NOT-A-UUID' tenant='contoso' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='Contoso' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='con&lt;toso' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='-1'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='+1'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='1x'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation=''/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='18446744073709551616'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation=3/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='3\"/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='3'",
      "<nm:vm id='" + id + "' id='" + id + "' tenant='contoso' generation='3'/>",
      "<nm:vm id='" + id + "'tenant='contoso' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='3'/><extra/>",
      "<nm:vm id='" + id + "' tenant='contoso' generation='3'><child/></nm:vm>",
      "<nm:vmx id='" + id + "' tenant='contoso' generation='3'/>",
      "<other:vm id='" + id + "' tenant='contoso' generation='3'/>",
      "<nm:vm xmlns:nm='https://example.org/other' id='" + id +
          "' tenant='contoso' generation='3'/>",
      "<nm:vm id='" + id + "' tenant='con&bogus;toso' generation='3'/>",
  };
  for (const std::string& bad : bad_inputs) {
    auto r = parse_owner_metadata(bad);
    ASSERT_FALSE(r.is_ok()) << "accepted: " << bad;
    EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << bad;
    EXPECT_TRUE(r.status().message().starts_with("metadata")) << r.status().message();
  }
}

}  // namespace
}  // namespace nm
