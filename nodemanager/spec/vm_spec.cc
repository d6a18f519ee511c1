#include "nm/vm_spec.h"

#include <algorithm>
#include <array>
#include <set>
#include <utility>

#include "nm/core/strict_json.h"

namespace nm {
namespace {

using strict_json::check_known_fields;
using strict_json::field_error;
using strict_json::get_string;
using strict_json::get_uint;
using strict_json::join;
using strict_json::json;
using strict_json::printable;
using strict_json::type_name;

constexpr std::string_view kRoot = "spec";
constexpr std::array<std::string_view, 14> kTopFields = {
    "version",    "id",       "name",      "tenant",       "vcpus",
    "memory_mib", "image",    "disk_gib",  "kernel_image", "initrd_image",
    "cmdline",    "networks", "autostart", "crash_policy"};
constexpr std::array<std::string_view, 3> kCrashFields = {"max_restarts", "window_s", "backoff_ms"};
constexpr std::array<std::string_view, 2> kNetworkFields = {"network", "ip"};

// "name:tag" or "sha256:<64 hex>". Anything starting with "sha256:" is judged as a digest, so
// "sha256" is never an image name.
Result<std::string> get_image_ref(const json& v, std::string_view path) {
  NM_ASSIGN_OR_RETURN(std::string s, get_string(v, path));
  if (is_digest_ref(s)) {
    NM_ASSIGN_OR_RETURN(Digest d, Digest::parse(s, path));
    return d.str();
  }
  NM_ASSIGN_OR_RETURN(ImageRef r, ImageRef::parse(s, path));
  return r.str();
}

bool is_dotted_quad(std::string_view s) {
  int octets = 0;
  size_t i = 0;
  while (true) {
    const size_t start = i;
    unsigned value = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9' && i - start < 3) {
      value = value * 10 + static_cast<unsigned>(s[i] - '0');
      ++i;
    }
    const size_t len = i - start;
    if (len == 0 || value > 255 || (len > 1 && s[start] == '0')) return false;
    ++octets;
    if (octets == 4) return i == s.size();
    if (i >= s.size() || s[i] != '.') return false;
    ++i;
  }
}

Status check_cmdline(std::string_view s, std::string_view path) {
  if (s.size() > kMaxCmdline) {
    return field_error(path, "must be at most " + std::to_string(kMaxCmdline) +
                                 " characters, got " + std::to_string(s.size()));
  }
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u > 0x7e) {
      return field_error(path, "must be printable ASCII");
    }
    if (c == '<' || c == '>' || c == '&' || c == '"' || c == '\'') {
      return field_error(
          path, std::string("must not contain XML metacharacters (<>&\"'), found '") + c + "'");
    }
  }
  return Status::ok();
}

Result<std::vector<VmNetworkAttachment>> get_networks(const json& v, std::string_view path) {
  if (!v.is_array()) {
    return field_error(path, "must be an array, got " + std::string(type_name(v)));
  }
  if (v.size() > kMaxNetworks) {
    return field_error(path, "must list at most " + std::to_string(kMaxNetworks) +
                                 " networks, got " + std::to_string(v.size()));
  }
  std::vector<VmNetworkAttachment> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& entry = v[i];
    const std::string at = std::string(path) + "[" + std::to_string(i) + "]";
    if (!entry.is_object()) {
      return field_error(at, "must be an object, got " + std::string(type_name(entry)));
    }
    NM_RETURN_IF_ERROR(check_known_fields(entry, at, kNetworkFields));
    const auto net = entry.find("network");
    if (net == entry.end()) return field_error(join(at, "network"), "is required");
    NM_ASSIGN_OR_RETURN(std::string net_text, get_string(*net, join(at, "network")));
    NM_ASSIGN_OR_RETURN(NetworkName name, NetworkName::parse(net_text, join(at, "network")));
    for (const auto& earlier : out) {
      if (earlier.network == name) {
        return field_error(join(at, "network"), "'" + name.str() + "' is listed twice");
      }
    }
    VmNetworkAttachment a{std::move(name), std::nullopt};
    if (const auto ip = entry.find("ip"); ip != entry.end()) {
      NM_ASSIGN_OR_RETURN(std::string ip_text, get_string(*ip, join(at, "ip")));
      if (!is_dotted_quad(ip_text)) {
        return field_error(join(at, "ip"), "'" + printable(ip_text) +
                                               "' is not a dotted-quad IPv4 address (four "
                                               "decimal octets 0-255, no leading zeros)");
      }
      a.ip = std::move(ip_text);
    }
    out.push_back(std::move(a));
  }
  return out;
}

Result<VmCrashPolicy> get_crash_policy(const json& v, std::string_view path) {
  if (!v.is_object()) {
    return field_error(path, "must be an object, got " + std::string(type_name(v)));
  }
  NM_RETURN_IF_ERROR(check_known_fields(v, path, kCrashFields));
  VmCrashPolicy p;
  auto get = [&](const char* name, uint64_t lo, uint64_t hi,
                 std::optional<uint32_t>& out) -> Status {
    const auto it = v.find(name);
    if (it == v.end()) return Status::ok();
    NM_ASSIGN_OR_RETURN(uint64_t n, get_uint(*it, join(path, name), lo, hi));
    out = static_cast<uint32_t>(n);
    return Status::ok();
  };
  NM_RETURN_IF_ERROR(get("max_restarts", 0, kMaxCrashRestarts, p.max_restarts));
  NM_RETURN_IF_ERROR(get("window_s", 1, kMaxCrashWindowS, p.window_s));
  NM_RETURN_IF_ERROR(get("backoff_ms", 0, kMaxCrashBackoffMs, p.backoff_ms));
  return p;
}

}  // namespace

bool is_digest_ref(std::string_view ref) {
  return ref.starts_with("sha256:");
}

Result<VmSpec> parse_vm_spec(std::string_view json_text) {
  NM_ASSIGN_OR_RETURN(json doc, strict_json::parse_document(json_text, kRoot, kMaxSpecBytes));
  NM_RETURN_IF_ERROR(check_known_fields(doc, kRoot, kTopFields));

  const auto field = [&](std::string_view name) -> const json* {
    const auto it = doc.find(std::string(name));
    return it == doc.end() ? nullptr : &*it;
  };
  const auto required = [&](std::string_view name) -> Result<const json*> {
    const json* v = field(name);
    if (v == nullptr) return field_error(join(kRoot, name), "is required");
    return v;
  };

  if (const json* v = field("version")) {
    if (!v->is_number_unsigned() || v->get<uint64_t>() != 1) {
      return field_error("spec.version", "must be 1 (the only version this node understands)");
    }
  }

  std::optional<VmId> id;
  if (const json* v = field("id")) {
    NM_ASSIGN_OR_RETURN(std::string s, get_string(*v, "spec.id"));
    NM_ASSIGN_OR_RETURN(VmId parsed, VmId::parse(s, "spec.id"));
    id = std::move(parsed);
  }

  NM_ASSIGN_OR_RETURN(const json* name_v, required("name"));
  NM_ASSIGN_OR_RETURN(std::string name_s, get_string(*name_v, "spec.name"));
  NM_ASSIGN_OR_RETURN(VmName name, VmName::parse(name_s, "spec.name"));

  NM_ASSIGN_OR_RETURN(const json* tenant_v, required("tenant"));
  NM_ASSIGN_OR_RETURN(std::string tenant_s, get_string(*tenant_v, "spec.tenant"));
  NM_ASSIGN_OR_RETURN(TenantId tenant, TenantId::parse(tenant_s, "spec.tenant"));

  VmSpec spec{.id = std::move(id),
              .name = std::move(name),
              .tenant = std::move(tenant),
              .vcpus = kMinVcpus,
              .memory_mib = 0,
              .image = {},
              .disk_gib = 0,
              .kernel_image = std::nullopt,
              .initrd_image = std::nullopt,
              .cmdline = {},
              .networks = {},
              .autostart = true,
              .crash_policy = std::nullopt};

  NM_ASSIGN_OR_RETURN(const json* vcpus_v, required("vcpus"));
  NM_ASSIGN_OR_RETURN(uint64_t vcpus, get_uint(*vcpus_v, "spec.vcpus", kMinVcpus, kMaxVcpus));
  spec.vcpus = static_cast<uint32_t>(vcpus);

  NM_ASSIGN_OR_RETURN(const json* mem_v, required("memory_mib"));
  NM_ASSIGN_OR_RETURN(spec.memory_mib,
                      get_uint(*mem_v, "spec.memory_mib", kMinMemoryMiB, kMaxMemoryMiB));

  NM_ASSIGN_OR_RETURN(const json* image_v, required("image"));
  NM_ASSIGN_OR_RETURN(spec.image, get_image_ref(*image_v, "spec.image"));

  if (const json* v = field("disk_gib")) {
    auto disk = get_uint(*v, "spec.disk_gib", 1, kMaxDiskGiB);
    if (!disk.is_ok()) {
      return invalid_argument(disk.status().message() +
                              " (omit the field to use the image's own size)");
    }
    spec.disk_gib = static_cast<uint32_t>(*disk);
  }

  if (const json* v = field("kernel_image")) {
    NM_ASSIGN_OR_RETURN(spec.kernel_image, get_image_ref(*v, "spec.kernel_image"));
  }
  if (const json* v = field("initrd_image")) {
    if (!spec.kernel_image) return field_error("spec.initrd_image", "requires kernel_image");
    NM_ASSIGN_OR_RETURN(spec.initrd_image, get_image_ref(*v, "spec.initrd_image"));
  }
  if (const json* v = field("cmdline")) {
    if (!spec.kernel_image) return field_error("spec.cmdline", "requires kernel_image");
    NM_ASSIGN_OR_RETURN(spec.cmdline, get_string(*v, "spec.cmdline"));
    NM_RETURN_IF_ERROR(check_cmdline(spec.cmdline, "spec.cmdline"));
  }

  if (const json* v = field("networks")) {
    NM_ASSIGN_OR_RETURN(spec.networks, get_networks(*v, "spec.networks"));
  }

  if (const json* v = field("autostart")) {
    if (!v->is_boolean()) {
      return field_error("spec.autostart", "must be a boolean, got " + std::string(type_name(*v)));
    }
    spec.autostart = v->get<bool>();
  }
  if (const json* v = field("crash_policy")) {
    NM_ASSIGN_OR_RETURN(spec.crash_policy, get_crash_policy(*v, "spec.crash_policy"));
  }
  return spec;
}

std::string vm_spec_to_json(const VmSpec& spec) {
  json doc = json::object();
  doc["version"] = 1;
  if (spec.id) doc["id"] = spec.id->str();
  doc["name"] = spec.name.str();
  doc["tenant"] = spec.tenant.str();
  doc["vcpus"] = spec.vcpus;
  doc["memory_mib"] = spec.memory_mib;
  doc["image"] = spec.image;
  if (spec.disk_gib != 0) doc["disk_gib"] = spec.disk_gib;
  if (spec.kernel_image) doc["kernel_image"] = *spec.kernel_image;
  if (spec.initrd_image) doc["initrd_image"] = *spec.initrd_image;
  if (!spec.cmdline.empty()) doc["cmdline"] = spec.cmdline;
  if (!spec.networks.empty()) {
    json nets = json::array();
    for (const auto& n : spec.networks) {
      json entry = {{"network", n.network.str()}};
      if (n.ip) entry["ip"] = *n.ip;
      nets.push_back(std::move(entry));
    }
    doc["networks"] = std::move(nets);
  }
  doc["autostart"] = spec.autostart;
  if (spec.crash_policy) {
    json p = json::object();
    if (spec.crash_policy->max_restarts) p["max_restarts"] = *spec.crash_policy->max_restarts;
    if (spec.crash_policy->window_s) p["window_s"] = *spec.crash_policy->window_s;
    if (spec.crash_policy->backoff_ms) p["backoff_ms"] = *spec.crash_policy->backoff_ms;
    doc["crash_policy"] = std::move(p);
  }
  return doc.dump();
}

}  // namespace nm
