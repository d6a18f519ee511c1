#include "format.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <ctime>
#include <nlohmann/json.hpp>

namespace nm::cli {
namespace {

using nlohmann::json;

constexpr std::string_view kErrorPrefix = "org.nodemanager.NodeManager1.Error.";

bool starts_with(std::string_view s, std::string_view p) {
  return s.substr(0, p.size()) == p;
}

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string scalar_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "-";
  return dump(v);
}

}  // namespace

int exit_code(Code code) {
  switch (code) {
    case Code::kOk:
      return static_cast<int>(Exit::kOk);
    case Code::kInvalidArgument:
      return static_cast<int>(Exit::kUsage);
    case Code::kNotFound:
      return static_cast<int>(Exit::kNotFound);
    case Code::kAlreadyExists:
    case Code::kConflict:
      return static_cast<int>(Exit::kConflict);
    case Code::kUnavailable:
      return static_cast<int>(Exit::kUnavailable);
    case Code::kAccessDenied:
      return static_cast<int>(Exit::kAccessDenied);
    case Code::kQuotaExceeded:
    case Code::kInsufficientCapacity:
      return static_cast<int>(Exit::kCapacity);
    case Code::kInternal:
      break;
  }
  return static_cast<int>(Exit::kFailure);
}

Code code_from_dbus_error(std::string_view name) {
  if (starts_with(name, kErrorPrefix)) {
    const Code c = code_from_name(name.substr(kErrorPrefix.size()));
    return c == Code::kOk ? Code::kInternal : c;
  }
  static constexpr std::array<std::string_view, 12> kUnavailable = {
      "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner",
      "org.freedesktop.DBus.Error.NoReply",        "org.freedesktop.DBus.Error.Timeout",
      "org.freedesktop.DBus.Error.TimedOut",       "org.freedesktop.DBus.Error.Disconnected",
      "org.freedesktop.DBus.Error.NoServer",       "org.freedesktop.DBus.Error.NoNetwork",
      "org.freedesktop.DBus.Error.LimitsExceeded", "org.freedesktop.DBus.Error.FileNotFound",
      "org.freedesktop.DBus.Error.BadAddress",     "org.freedesktop.DBus.Error.NoMemory",
  };
  static constexpr std::array<std::string_view, 3> kDenied = {
      "org.freedesktop.DBus.Error.AccessDenied", "org.freedesktop.DBus.Error.AuthFailed",
      "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"};
  static constexpr std::array<std::string_view, 3> kInvalid = {
      "org.freedesktop.DBus.Error.InvalidArgs", "org.freedesktop.DBus.Error.InvalidSignature",
      "org.freedesktop.DBus.Error.MatchRuleInvalid"};
  auto in = [name](const auto& set) {
    return std::find(set.begin(), set.end(), name) != set.end();
  };
  if (in(kUnavailable)) return Code::kUnavailable;
  if (in(kDenied)) return Code::kAccessDenied;
  if (in(kInvalid)) return Code::kInvalidArgument;
  if (name == "org.freedesktop.DBus.Error.UnknownObject") return Code::kNotFound;
  // sd-bus turns errnos without a name into "System.Error.E...".
  static constexpr std::array<std::string_view, 9> kUnavailableErrno = {
      "System.Error.ENOENT",     "System.Error.ECONNREFUSED", "System.Error.ETIMEDOUT",
      "System.Error.ECONNRESET", "System.Error.ENOTCONN",     "System.Error.EHOSTDOWN",
      "System.Error.ENOTSOCK",   "System.Error.ENXIO",        "System.Error.ESHUTDOWN"};
  if (in(kUnavailableErrno)) return Code::kUnavailable;
  if (name == "System.Error.EACCES" || name == "System.Error.EPERM") return Code::kAccessDenied;
  return Code::kInternal;
}

std::string short_error_name(std::string_view name) {
  if (starts_with(name, kErrorPrefix)) return std::string(name.substr(kErrorPrefix.size()));
  return std::string(name);
}

std::string error_json(const Status& status) {
  return dump(
      json{{"error", std::string(code_name(status.code()))}, {"message", status.message()}});
}

Result<std::string> normalize_sha256(std::string_view text) {
  std::string_view hex = text;
  if (starts_with(hex, "sha256:")) hex.remove_prefix(7);
  const bool ok = hex.size() == 64 && std::all_of(hex.begin(), hex.end(), [](char c) {
                    return std::isxdigit(static_cast<unsigned char>(c)) != 0;
                  });
  if (!ok) {
    return invalid_argument("--sha256: '" + std::string(text) +
                            "' is not 64 hex digits (optionally prefixed by 'sha256:')");
  }
  std::string out = "sha256:";
  for (char c : hex) out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::optional<uint32_t> job_id_from_path(std::string_view path) {
  const auto slash = path.rfind('/');
  if (slash == std::string_view::npos || slash + 1 >= path.size()) return std::nullopt;
  const std::string_view tail = path.substr(slash + 1);
  uint32_t id = 0;
  const auto [end, ec] = std::from_chars(tail.data(), tail.data() + tail.size(), id);
  if (ec != std::errc() || end != tail.data() + tail.size()) return std::nullopt;
  return id;
}

std::string render_table(const std::vector<std::string>& header,
                         const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size(), 0);
  auto measure = [&width](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < width.size(); ++i) {
      width[i] = std::max(width[i], row[i].size());
    }
  };
  measure(header);
  for (const auto& r : rows) measure(r);
  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < width.size(); ++i) {
      const std::string cell = i < row.size() ? row[i] : std::string();
      line += cell;
      if (i + 1 < width.size()) line += std::string(width[i] - cell.size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line + "\n";
  };
  emit(header);
  for (const auto& r : rows) emit(r);
  return out;
}

std::string vm_list_table(const std::vector<VmRow>& vms) {
  std::vector<std::vector<std::string>> rows;
  rows.reserve(vms.size());
  for (const auto& v : vms) {
    rows.push_back({v.id, v.name, v.tenant, v.state, std::to_string(v.generation)});
  }
  return render_table({"ID", "NAME", "TENANT", "STATE", "GEN"}, rows);
}

std::string vm_list_json(const std::vector<VmRow>& vms) {
  json arr = json::array();
  for (const auto& v : vms) {
    arr.push_back({{"id", v.id},
                   {"name", v.name},
                   {"tenant", v.tenant},
                   {"state", v.state},
                   {"generation", v.generation},
                   {"observed_generation", v.observed_generation}});
  }
  return dump(arr);
}

namespace {
// "key:  value" lines, the values aligned one column after the longest key.
std::string key_value_lines(const std::vector<std::pair<std::string, std::string>>& lines) {
  size_t w = 0;
  for (const auto& l : lines) w = std::max(w, l.first.size());
  std::string out;
  for (const auto& [k, v] : lines) {
    out.append(k).append(":").append(w - k.size() + 1, ' ').append(v).append("\n");
  }
  return out;
}
}  // namespace

std::string vm_show_text(std::string_view vm_json) {
  const json doc = json::parse(vm_json, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return std::string(vm_json) + "\n";
  std::vector<std::pair<std::string, std::string>> lines;
  for (const auto& [key, value] : doc.items()) {
    if (key == "spec" && value.is_object()) {
      for (const auto& [sk, sv] : value.items()) lines.emplace_back("spec." + sk, scalar_text(sv));
    } else {
      lines.emplace_back(key, scalar_text(value));
    }
  }
  return key_value_lines(lines);
}

std::string vm_show_json(std::string_view vm_json) {
  const json doc = json::parse(vm_json, nullptr, false);
  if (doc.is_discarded()) return std::string(vm_json);
  return dump(doc);
}

std::string network_list_table(const std::vector<NetworkRow>& networks) {
  std::vector<std::vector<std::string>> rows;
  rows.reserve(networks.size());
  for (const auto& n : networks) {
    rows.push_back(
        {n.name, n.tenant, std::to_string(n.vni), n.subnet, std::to_string(n.ports), n.state});
  }
  return render_table({"NAME", "TENANT", "VNI", "SUBNET", "PORTS", "STATE"}, rows);
}

std::string network_list_json(const std::vector<NetworkRow>& networks) {
  json arr = json::array();
  for (const auto& n : networks) {
    arr.push_back({{"name", n.name},
                   {"tenant", n.tenant},
                   {"vni", n.vni},
                   {"subnet", n.subnet},
                   {"ports", n.ports},
                   {"state", n.state}});
  }
  return dump(arr);
}

std::string network_show_text(std::string_view network_json) {
  const json doc = json::parse(network_json, nullptr, false);
  if (doc.is_discarded() || !doc.is_object()) return std::string(network_json) + "\n";
  std::vector<std::pair<std::string, std::string>> lines;
  for (const auto& [key, value] : doc.items()) {
    if (key == "ports" && value.is_array()) continue;
    if (key == "peers" && value.is_array()) {
      std::string peers;
      for (const auto& p : value) peers += (peers.empty() ? "" : ", ") + scalar_text(p);
      lines.emplace_back(key, peers.empty() ? "-" : peers);
      continue;
    }
    lines.emplace_back(key, scalar_text(value));
  }
  if (const auto ports = doc.find("ports"); ports != doc.end() && ports->is_array()) {
    for (const auto& p : *ports) {
      lines.emplace_back("port " + scalar_text(p.value("hostname", json(""))),
                         scalar_text(p.value("ip", json(""))) + " " +
                             scalar_text(p.value("mac", json(""))) + " " +
                             scalar_text(p.value("ifname", json(""))) + " vm " +
                             scalar_text(p.value("vm_id", json(""))));
    }
  }
  return key_value_lines(lines);
}

std::string image_list_table(const std::vector<ImageRow>& images) {
  std::vector<std::vector<std::string>> rows;
  rows.reserve(images.size());
  for (const auto& i : images) {
    rows.push_back({i.ref, i.digest, i.kind, i.format, std::to_string(i.size),
                    std::to_string(i.virtual_size), i.tenant.empty() ? "-" : i.tenant});
  }
  return render_table({"IMAGE", "DIGEST", "KIND", "FORMAT", "SIZE", "VSIZE", "TENANT"}, rows);
}

std::string image_list_json(const std::vector<ImageRow>& images) {
  json arr = json::array();
  for (const auto& i : images) {
    arr.push_back({{"image", i.ref},
                   {"digest", i.digest},
                   {"kind", i.kind},
                   {"format", i.format},
                   {"size", i.size},
                   {"virtual_size", i.virtual_size},
                   {"tenant", i.tenant}});
  }
  return dump(arr);
}

std::string image_removed_json(std::string_view image) {
  return dump(json{{"removed", std::string(image)}});
}

std::string event_line(const EventRow& e) {
  const auto secs = static_cast<std::time_t>(e.ts_us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  std::array<char, 32> buf{};
  const size_t n = std::strftime(buf.data(), buf.size(), "%Y-%m-%dT%H:%M:%S", &tm);
  std::array<char, 8> ms{};
  std::snprintf(ms.data(), ms.size(), ".%03uZ", static_cast<unsigned>((e.ts_us / 1000) % 1000));
  return std::to_string(e.seq) + "  " + std::string(buf.data(), n) + ms.data() + "  " + e.kind +
         "  " + e.object_id + "  " + e.payload_json;
}

namespace {
json event_object(const EventRow& e) {
  json payload = json::parse(e.payload_json, nullptr, false);
  if (payload.is_discarded()) payload = e.payload_json;
  return json{{"seq", e.seq},
              {"ts_us", e.ts_us},
              {"kind", e.kind},
              {"object_id", e.object_id},
              {"payload", payload}};
}
}  // namespace

std::string event_json(const EventRow& e) {
  return dump(event_object(e));
}

std::string events_json(const std::vector<EventRow>& events) {
  json arr = json::array();
  for (const auto& e : events) arr.push_back(event_object(e));
  return dump(arr);
}

bool job_outcome_from_event(const EventRow& e, uint32_t job_id, const std::string& job_path,
                            JobOutcome* out) {
  if (e.kind != "JobRemoved") return false;
  const json p = json::parse(e.payload_json, nullptr, false);
  const bool is_obj = !p.is_discarded() && p.is_object();
  bool match = e.object_id == std::to_string(job_id) || e.object_id == job_path;
  if (is_obj) {
    if (p.contains("job_id") && p["job_id"].is_number_unsigned()) {
      match = match || p["job_id"].get<uint64_t>() == job_id;
    }
    if (p.contains("job") && p["job"].is_string()) {
      match = match || p["job"].get<std::string>() == job_path;
    }
    if (p.contains("job") && p["job"].is_number_unsigned()) {
      match = match || p["job"].get<uint64_t>() == job_id;
    }
  }
  if (!match) return false;
  auto str = [&](const char* key) {
    return is_obj && p.contains(key) && p[key].is_string() ? p[key].get<std::string>()
                                                           : std::string();
  };
  out->job = job_path;
  out->job_id = job_id;
  out->kind = str("kind");
  out->object_id = str("object_id");
  out->result = str("result");
  if (out->result.empty()) out->result = "unknown";
  out->error_name = str("error_name");
  if (out->error_name.empty()) out->error_name = str("error");
  out->error_message = str("error_message");
  if (out->error_message.empty()) out->error_message = str("message");
  return true;
}

Status job_status(const JobOutcome& o) {
  if (o.result == "done" || o.result == "unknown") return Status::ok();
  Code code = o.error_name.empty() ? Code::kInternal : code_from_dbus_error(o.error_name);
  if (!o.error_name.empty() && code == Code::kInternal) {
    code = code_from_name(short_error_name(o.error_name));
    if (code == Code::kOk) code = Code::kInternal;
  }
  std::string msg = "job " + std::to_string(o.job_id) + " (" + o.kind + ") " + o.result;
  if (!o.error_message.empty()) msg += ": " + o.error_message;
  return {code, msg};
}

std::string job_reply_text(const JobReply& r) {
  std::string out;
  if (!r.vm_id.empty()) out += "vm " + r.vm_id + "\n";
  const auto id = job_id_from_path(r.job);
  const std::string job = id ? "job " + std::to_string(*id) : "job " + r.job;
  if (!r.outcome) return out + job + " (" + r.job + ") queued\n";
  out += job + " " + r.verb + " " + r.outcome->result + "\n";
  return out;
}

std::string job_reply_json(const JobReply& r) {
  json j = json::object();
  if (!r.vm_id.empty()) j["vm_id"] = r.vm_id;
  if (!r.vm_path.empty()) j["vm"] = r.vm_path;
  j["job"] = r.job;
  if (const auto id = job_id_from_path(r.job)) j["job_id"] = *id;
  if (r.outcome) {
    j["result"] = r.outcome->result;
    if (!r.outcome->error_name.empty()) {
      j["error"] = short_error_name(r.outcome->error_name);
      j["message"] = r.outcome->error_message;
    }
  }
  return dump(j);
}

}  // namespace nm::cli
