#include "nm/vm_spec.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace nm {
namespace {

using json = nlohmann::json;

const std::string kDigest = "sha256:" + std::string(64, 'a');

json minimal() {
  return {{"name", "web-1"},
          {"tenant", "contoso"},
          {"vcpus", 2},
          {"memory_mib", 512},
          {"image", "busybox-guest:1"}};
}

json full() {
  json j = minimal();
  j["version"] = 1;
  j["id"] = "3f1c0a2b-1234-4abc-8def-0123456789ab";
  j["disk_gib"] = 4;
  j["kernel_image"] = "guest-kernel:6.1";
  j["initrd_image"] = kDigest;
  j["cmdline"] = "console=ttyS0 quiet root=/dev/vda";
  j["networks"] =
      json::array({{{"network", "contoso-a"}, {"ip", "10.0.0.5"}}, {{"network", "contoso-b"}}});
  j["autostart"] = false;
  return j;
}

// Asserts that `text` is refused with InvalidArgument and a message that starts with `field`
// followed by ':' (and, when given, contains `words`).
void expect_refused(const std::string& text, const std::string& field,
                    const std::string& words = "") {
  auto r = parse_vm_spec(text);
  ASSERT_FALSE(r.is_ok()) << "accepted: " << text;
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument) << r.status().to_string();
  const std::string msg = r.status().message();
  EXPECT_TRUE(msg.starts_with(field + ":"))
      << "message '" << msg << "' should start with '" << field << ":'";
  if (!words.empty()) {
    EXPECT_NE(msg.find(words), std::string::npos)
        << "message '" << msg << "' lacks '" << words << "'";
  }
}

// The minimal spec with `key` set to `value`.
std::string with(const std::string& key, const json& value) {
  json j = minimal();
  j[key] = value;
  return j.dump();
}

std::string without(const std::string& key) {
  json j = minimal();
  j.erase(key);
  return j.dump();
}

std::string with_kernel(const std::string& key, const json& value) {
  json j = minimal();
  j["kernel_image"] = "guest-kernel:1";
  j[key] = value;
  return j.dump();
}

std::string with_networks(const json& networks) {
  return with("networks", networks);
}

TEST(VmSpecParse, FullSpecRoundTripsThroughCanonicalJson) {
  auto r = parse_vm_spec(full().dump());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  const VmSpec& s = *r;
  ASSERT_TRUE(s.id.has_value());
  EXPECT_EQ(s.id->str(), "3f1c0a2b-1234-4abc-8def-0123456789ab");
  EXPECT_EQ(s.name.str(), "web-1");
  EXPECT_EQ(s.tenant.str(), "contoso");
  EXPECT_EQ(s.vcpus, 2u);
  EXPECT_EQ(s.memory_mib, 512u);
  EXPECT_EQ(s.image, "busybox-guest:1");
  EXPECT_EQ(s.disk_gib, 4u);
  EXPECT_EQ(s.kernel_image, "guest-kernel:6.1");
  EXPECT_EQ(s.initrd_image, kDigest);
  EXPECT_EQ(s.cmdline, "console=ttyS0 quiet root=/dev/vda");
  ASSERT_EQ(s.networks.size(), 2u);
  EXPECT_EQ(s.networks[0].network.str(), "contoso-a");
  EXPECT_EQ(s.networks[0].ip, "10.0.0.5");
  EXPECT_EQ(s.networks[1].network.str(), "contoso-b");
  EXPECT_FALSE(s.networks[1].ip.has_value());
  EXPECT_FALSE(s.autostart);

  const std::string canonical = vm_spec_to_json(s);
  auto again = parse_vm_spec(canonical);
  ASSERT_TRUE(again.is_ok()) << again.status().to_string() << " for " << canonical;
  EXPECT_EQ(*again, s);
  EXPECT_EQ(vm_spec_to_json(*again), canonical);
  EXPECT_EQ(json::parse(canonical), full());
}

TEST(VmSpecParse, MinimalSpecGetsDefaultsAndCanonicalJsonOmitsAbsentOptionals) {
  auto r = parse_vm_spec(minimal().dump());
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  EXPECT_FALSE(r->id.has_value());
  EXPECT_EQ(r->disk_gib, 0u);
  EXPECT_FALSE(r->kernel_image.has_value());
  EXPECT_FALSE(r->initrd_image.has_value());
  EXPECT_TRUE(r->cmdline.empty());
  EXPECT_TRUE(r->networks.empty());
  EXPECT_TRUE(r->autostart);
  const json canonical = json::parse(vm_spec_to_json(*r));
  for (const char* absent :
       {"id", "disk_gib", "kernel_image", "initrd_image", "cmdline", "networks"}) {
    EXPECT_FALSE(canonical.contains(absent)) << absent;
  }
  EXPECT_EQ(canonical["version"], 1);
  EXPECT_EQ(canonical["autostart"], true);
  EXPECT_EQ(*parse_vm_spec(canonical.dump()), *r);
}

TEST(VmSpecParse, AcceptsBoundaryValues) {
  for (const auto& [key, value] :
       std::vector<std::pair<std::string, json>>{{"vcpus", kMinVcpus},
                                                 {"vcpus", kMaxVcpus},
                                                 {"memory_mib", kMinMemoryMiB},
                                                 {"memory_mib", kMaxMemoryMiB},
                                                 {"disk_gib", 1},
                                                 {"disk_gib", kMaxDiskGiB},
                                                 {"image", kDigest},
                                                 {"name", std::string(63, 'a')},
                                                 {"name", "0"},
                                                 {"version", 1}}) {
    EXPECT_TRUE(parse_vm_spec(with(key, value)).is_ok()) << key << "=" << value;
  }
  EXPECT_TRUE(parse_vm_spec(with_kernel("cmdline", std::string(kMaxCmdline, 'x'))).is_ok());
  EXPECT_TRUE(parse_vm_spec(with_kernel("cmdline", "")).is_ok());
  json eight = json::array();
  for (int i = 0; i < static_cast<int>(kMaxNetworks); ++i) {
    eight.push_back({{"network", "n" + std::to_string(i)}});
  }
  EXPECT_TRUE(parse_vm_spec(with_networks(eight)).is_ok());
  for (const char* ip : {"0.0.0.0", "10.0.0.1", "255.255.255.255", "192.168.100.200"}) {
    EXPECT_TRUE(parse_vm_spec(with_networks({{{"network", "a"}, {"ip", ip}}})).is_ok()) << ip;
  }
}

TEST(VmSpecRules, UnknownTopLevelFieldIsRefused) {
  expect_refused(with("vpcus", 2), "spec.vpcus", "unknown field");
  expect_refused(with("Name", "x"), "spec.Name", "unknown field");
}

TEST(VmSpecRules, UnknownFieldInsideANetworkEntryIsRefused) {
  expect_refused(with_networks({{{"network", "a"}, {"mac", "52:54:00:00:00:01"}}}),
                 "spec.networks[0].mac", "unknown field");
}

TEST(VmSpecRules, UnknownFieldWithControlCharactersIsShownEscaped) {
  auto r = parse_vm_spec(R"({"a\u0001b": 1})");
  ASSERT_FALSE(r.is_ok());
  EXPECT_EQ(r.status().message(), "spec.a\\x01b: unknown field");
}

TEST(VmSpecRules, DuplicateFieldIsRefused) {
  expect_refused(R"({"name":"a","name":"b","tenant":"t","vcpus":1,"memory_mib":64,"image":"i:1"})",
                 "spec.name", "more than once");
}

TEST(VmSpecRules, RequiredFieldsMustBePresent) {
  for (const char* key : {"name", "tenant", "vcpus", "memory_mib", "image"}) {
    expect_refused(without(key), std::string("spec.") + key, "is required");
  }
}

TEST(VmSpecRules, NameMustBeALowercaseDnsLabel) {
  for (const std::string& bad :
       std::vector<std::string>{"Web-1", "web<1", "web&1", "web\"1", "web'1", "-web", "", "web_1",
                                "web 1", std::string(64, 'a')}) {
    expect_refused(with("name", bad), "spec.name");
  }
  expect_refused(with("name", 42), "spec.name", "must be a string");
  expect_refused(with("name", nullptr), "spec.name", "must be a string");
}

TEST(VmSpecRules, TenantFollowsTheNameRule) {
  for (const std::string& bad :
       std::vector<std::string>{"Contoso", "con toso", "", "a/b", std::string(64, 't')}) {
    expect_refused(with("tenant", bad), "spec.tenant");
  }
  expect_refused(with("tenant", json::array()), "spec.tenant", "must be a string");
}

TEST(VmSpecRules, VcpusMustBeAnIntegerInRange) {
  expect_refused(with("vcpus", 0), "spec.vcpus", "between 1 and 128, got 0");
  expect_refused(with("vcpus", 129), "spec.vcpus", "between 1 and 128, got 129");
  expect_refused(with("vcpus", -1), "spec.vcpus", "got -1");
  expect_refused(with("vcpus", "2"), "spec.vcpus", "must be an integer");
  expect_refused(with("vcpus", 2.5), "spec.vcpus", "must be an integer");
  expect_refused(with("vcpus", 2.0), "spec.vcpus", "must be an integer");
  expect_refused(with("vcpus", true), "spec.vcpus", "must be an integer");
  expect_refused(with("vcpus", nullptr), "spec.vcpus", "must be an integer");
  expect_refused(R"({"name":"a","tenant":"t","vcpus":1e1,"memory_mib":64,"image":"i:1"})",
                 "spec.vcpus", "must be an integer");
  expect_refused(
      R"({"name":"a","tenant":"t","vcpus":99999999999999999999999,"memory_mib":64,"image":"i:1"})",
      "spec.vcpus");
}

TEST(VmSpecRules, MemoryMustBeInRange) {
  expect_refused(with("memory_mib", 0), "spec.memory_mib", "got 0");
  expect_refused(with("memory_mib", 31), "spec.memory_mib", "between 32 and 1048576, got 31");
  expect_refused(with("memory_mib", 1'000'000'000'000ULL), "spec.memory_mib", "got 1000000000000");
  expect_refused(with("memory_mib", -512), "spec.memory_mib");
  expect_refused(with("memory_mib", "512"), "spec.memory_mib", "must be an integer");
}

TEST(VmSpecRules, DiskSizeWhenGivenMustBeInRange) {
  expect_refused(with("disk_gib", 0), "spec.disk_gib", "omit the field");
  expect_refused(with("disk_gib", kMaxDiskGiB + 1), "spec.disk_gib");
  expect_refused(with("disk_gib", 1.5), "spec.disk_gib", "must be an integer");
}

TEST(VmSpecRules, ImageMustBeNameTagOrDigestNeverAPath) {
  for (const std::string& bad : std::vector<std::string>{
           "../etc/passwd", "/abs/path", "busybox", "busybox:", ":1", "Busybox:1", "a:b/c",
           "a:../b", "http://host/x:1", "sha256:", "sha256:abc", "sha256:" + std::string(63, 'a'),
           "sha256:" + std::string(64, 'A'), "sha256:" + std::string(65, 'a'), ""}) {
    expect_refused(with("image", bad), "spec.image");
  }
  expect_refused(with("image", 7), "spec.image", "must be a string");
}

TEST(VmSpecRules, KernelAndInitrdImagesAreImageRefsToo) {
  expect_refused(with("kernel_image", "/boot/vmlinuz"), "spec.kernel_image");
  expect_refused(with_kernel("initrd_image", "../initrd.img"), "spec.initrd_image");
}

TEST(VmSpecRules, InitrdAndCmdlineRequireAKernel) {
  expect_refused(with("initrd_image", "initrd:1"), "spec.initrd_image", "requires kernel_image");
  expect_refused(with("cmdline", "console=ttyS0"), "spec.cmdline", "requires kernel_image");
}

TEST(VmSpecRules, CmdlineRefusesXmlMetacharactersAndNonPrintables) {
  for (const char* bad : {"console=ttyS0 <x>", "a>b", "a&b", "a\"b", "a'b"}) {
    expect_refused(with_kernel("cmdline", bad), "spec.cmdline", "metacharacters");
  }
  expect_refused(with_kernel("cmdline", "a\tb"), "spec.cmdline", "control characters");
  expect_refused(with_kernel("cmdline", "caf\xc3\xa9"), "spec.cmdline", "printable ASCII");
  expect_refused(with_kernel("cmdline", std::string(kMaxCmdline + 1, 'x')), "spec.cmdline",
                 "at most 1024");
}

TEST(VmSpecRules, StringsWithNulOrControlCharactersAreRefused) {
  expect_refused(with("name", std::string("web\0", 4)), "spec.name", "control characters");
  expect_refused(with("tenant", "t\n"), "spec.tenant", "control characters");
  expect_refused(with("image", "a:1\x7f"), "spec.image", "control characters");
}

TEST(VmSpecRules, IdMustBeALowercaseUuid) {
  expect_refused(with("id", "3F1C0A2B-1234-4ABC-8DEF-0123456789AB"), "spec.id");
  expect_refused(with("id", "not-a-uuid"), "spec.id");
  expect_refused(with("id", 12), "spec.id", "must be a string");
}

TEST(VmSpecRules, OnlyVersionOneIsUnderstood) {
  for (const json& bad : {json(2), json(0), json("1"), json(1.0), json(true)}) {
    expect_refused(with("version", bad), "spec.version", "must be 1");
  }
}

TEST(VmSpecRules, AutostartMustBeABoolean) {
  expect_refused(with("autostart", "yes"), "spec.autostart", "must be a boolean");
  expect_refused(with("autostart", 1), "spec.autostart", "must be a boolean");
}

TEST(VmSpecParse, CrashPolicyOverridesRoundTrip) {
  auto r = parse_vm_spec(with("crash_policy", {{"max_restarts", 0}, {"backoff_ms", 250}}));
  ASSERT_TRUE(r.is_ok()) << r.status().to_string();
  ASSERT_TRUE(r->crash_policy.has_value());
  EXPECT_EQ(r->crash_policy->max_restarts, 0u);
  EXPECT_FALSE(r->crash_policy->window_s.has_value());
  EXPECT_EQ(r->crash_policy->backoff_ms, 250u);
  auto again = parse_vm_spec(vm_spec_to_json(*r));
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(*again, *r);
  EXPECT_FALSE(parse_vm_spec(minimal().dump())->crash_policy.has_value());
}

TEST(VmSpecRules, CrashPolicyFieldsAreBoundedAndKnown) {
  expect_refused(with("crash_policy", 3), "spec.crash_policy", "must be an object");
  expect_refused(with("crash_policy", {{"retries", 1}}), "spec.crash_policy.retries",
                 "unknown field");
  expect_refused(with("crash_policy", {{"max_restarts", 101}}), "spec.crash_policy.max_restarts");
  expect_refused(with("crash_policy", {{"window_s", 0}}), "spec.crash_policy.window_s");
  expect_refused(with("crash_policy", {{"backoff_ms", -1}}), "spec.crash_policy.backoff_ms");
}

TEST(VmSpecRules, NetworksMustBeAShortArrayOfObjects) {
  expect_refused(with("networks", "contoso-a"), "spec.networks", "must be an array");
  json nine = json::array();
  for (int i = 0; i < static_cast<int>(kMaxNetworks) + 1; ++i) {
    nine.push_back({{"network", "n" + std::to_string(i)}});
  }
  expect_refused(with_networks(nine), "spec.networks", "at most 8");
  expect_refused(with_networks(json::array({"contoso-a"})), "spec.networks[0]",
                 "must be an object");
  expect_refused(with_networks(json::array({json::object()})), "spec.networks[0].network",
                 "is required");
  expect_refused(with_networks(json::array({{{"network", "Contoso"}}})),
                 "spec.networks[0].network");
  expect_refused(with_networks(json::array({{{"network", 5}}})), "spec.networks[0].network",
                 "must be a string");
}

TEST(VmSpecRules, DuplicateNetworkIsRefused) {
  expect_refused(with_networks({{{"network", "a"}}, {{"network", "b"}}, {{"network", "a"}}}),
                 "spec.networks[2].network", "listed twice");
}

TEST(VmSpecRules, DuplicateFieldInsideANetworkEntryIsRefused) {
  expect_refused(R"({"name":"a","tenant":"t","vcpus":1,"memory_mib":64,"image":"i:1",)"
                 R"("networks":[{"network":"a","network":"b"}]})",
                 "spec.networks", "more than once");
}

TEST(VmSpecRules, NetworkIpMustBeADottedQuad) {
  for (const char* bad : {"1.2.3", "1.2.3.4.5", "256.1.1.1", "1.2.3.300", "01.2.3.4", "1.2.3.04",
                          "1.2.3.4 ", " 1.2.3.4", "a.b.c.d", "1..2.3", "", "1.2.3.-4", "1.2.3.4/24",
                          "::1", "1.2.3.", "0x1.2.3.4", "1234.1.1.1"}) {
    expect_refused(with_networks({{{"network", "a"}, {"ip", bad}}}), "spec.networks[0].ip",
                   "dotted-quad");
  }
  expect_refused(with_networks({{{"network", "a"}, {"ip", 167772161}}}), "spec.networks[0].ip",
                 "must be a string");
}

TEST(VmSpecDocument, MustBeAJsonObject) {
  for (const char* bad : {"[]", "\"spec\"", "42", "null", "true"}) {
    expect_refused(bad, "spec", "must be a JSON object");
  }
}

TEST(VmSpecDocument, MalformedJsonSaysWhere) {
  for (const char* bad : {"{", R"({"name":})", "", R"({"name": "a",})", "{'name': 'a'}"}) {
    expect_refused(bad, "spec", "malformed JSON");
  }
  auto r = parse_vm_spec("{\n\"name\": ]");
  ASSERT_FALSE(r.is_ok());
  EXPECT_NE(r.status().message().find("line 2"), std::string::npos) << r.status().message();
}

TEST(VmSpecDocument, SizeIsLimitedTo64KiB) {
  const std::string doc = minimal().dump();
  std::string at_limit = doc;
  at_limit.insert(1, kMaxSpecBytes - doc.size(), ' ');
  ASSERT_EQ(at_limit.size(), kMaxSpecBytes);
  EXPECT_TRUE(parse_vm_spec(at_limit).is_ok());
  expect_refused(at_limit + " ", "spec", "limit is 65536");
}

TEST(VmSpecDocument, DeepNestingIsRefusedWithoutCrashing) {
  std::string doc = minimal().dump();
  doc.pop_back();
  doc += R"(,"networks":[)" + std::string(30000, '[') + std::string(30000, ']') + "]}";
  expect_refused(doc, "spec.networks[0]", "must be an object");
}

TEST(DigestRefs, AreRecognizedByPrefix) {
  EXPECT_TRUE(is_digest_ref(kDigest));
  EXPECT_FALSE(is_digest_ref("busybox-guest:1"));
  EXPECT_FALSE(is_digest_ref("sha256"));
}

}  // namespace
}  // namespace nm
