#include "format.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>
#include <utility>

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

std::string image_removed_json(std::string_view image) {
  return dump(json{{"removed", std::string(image)}});
}

std::string human_bytes(uint64_t bytes) {
  static constexpr std::array<const char*, 6> kUnits = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  auto value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024.0 && unit + 1 < kUnits.size()) {
    value /= 1024.0;
    ++unit;
  }
  std::array<char, 32> buf{};
  std::snprintf(buf.data(), buf.size(), "%.1f %s", value, kUnits[unit]);
  return buf.data();
}

std::string short_digest(std::string_view digest) {
  constexpr std::string_view kPrefix = "sha256:";
  if (!starts_with(digest, kPrefix) || digest.size() < kPrefix.size() + 12) {
    return std::string(digest);
  }
  return std::string(digest.substr(0, kPrefix.size() + 12));
}

namespace {
std::string utc_date(uint64_t us) {
  const auto secs = static_cast<std::time_t>(us / 1000000);
  std::tm tm{};
  gmtime_r(&secs, &tm);
  std::array<char, 16> buf{};
  const size_t n = std::strftime(buf.data(), buf.size(), "%Y-%m-%d", &tm);
  return {buf.data(), n};
}
}  // namespace

std::string relative_time(uint64_t then_us, uint64_t now_us) {
  if (then_us == 0) return "never";
  if (then_us > now_us + 60'000'000) return utc_date(then_us);
  const uint64_t secs = now_us > then_us ? (now_us - then_us) / 1000000 : 0;
  if (secs < 60) return "just now";
  if (secs < 3600) return std::to_string(secs / 60) + "m ago";
  if (secs < 86400) return std::to_string(secs / 3600) + "h ago";
  if (secs < uint64_t{30} * 86400) return std::to_string(secs / 86400) + "d ago";
  return utc_date(then_us);
}

std::string users_cell(const std::vector<std::string>& users) {
  if (users.empty()) return "-";
  std::string joined;
  for (const auto& u : users) joined += (joined.empty() ? "" : ",") + u;
  if (joined.size() <= 24) return joined;
  return std::to_string(users.size()) + " VMs";
}

std::string image_list_table(const std::vector<ImageRow>& images, uint64_t now_us) {
  std::vector<std::vector<std::string>> rows;
  rows.reserve(images.size());
  for (const auto& i : images) {
    rows.push_back({i.ref.empty() ? "-" : i.ref, short_digest(i.digest), i.kind, i.format,
                    human_bytes(i.size), users_cell(i.users), relative_time(i.last_used_us, now_us),
                    i.pinned ? "yes" : "no"});
  }
  return render_table({"IMAGE", "DIGEST", "KIND", "FORMAT", "SIZE", "USERS", "LAST-USED", "PINNED"},
                      rows);
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
                   {"tenant", i.tenant},
                   {"last_used_us", i.last_used_us},
                   {"pinned", i.pinned},
                   {"users", i.users}});
  }
  return dump(arr);
}

std::vector<std::string> parse_image_list(std::string_view text) {
  std::vector<std::string> out;
  while (!text.empty()) {
    const size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    line = line.substr(0, line.find('#'));
    size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i])) != 0) ++i;
      const size_t begin = i;
      while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i])) == 0) ++i;
      if (i > begin) out.emplace_back(line.substr(begin, i - begin));
    }
  }
  return out;
}

std::string per_image_request_id(std::string_view id, std::string_view image, bool several) {
  if (id.empty() || !several) return std::string(id);
  return std::string(id) + ":" + std::string(image);
}

namespace {
bool pull_succeeded(const PullOutcome& o) {
  return o.error.is_ok() && (o.result == "done" || o.result == "unknown" || o.result == "queued");
}
}  // namespace

std::string pull_result_line(const PullOutcome& o) {
  if (!pull_succeeded(o)) return "pull '" + o.image + "' failed: " + o.error.message();
  if (o.result == "queued") {
    return "pull " + o.image + ": job " + std::to_string(o.job_id.value_or(0)) + " queued";
  }
  if (o.digest.empty()) return "pulled " + o.image;
  return "pulled " + o.image + " " + short_digest(o.digest) + " (" + human_bytes(o.size) + ")";
}

std::string pull_results_json(const std::vector<PullOutcome>& outcomes) {
  json arr = json::array();
  for (const auto& o : outcomes) {
    json j = {{"image", o.image},
              {"job_id", o.job_id ? json(*o.job_id) : json(nullptr)},
              {"result", o.result}};
    if (!o.error.is_ok()) {
      j["error"] = std::string(code_name(o.error.code()));
      j["message"] = o.error.message();
    }
    if (!o.digest.empty()) {
      j["digest"] = o.digest;
      j["size"] = o.size;
    }
    arr.push_back(std::move(j));
  }
  return dump(arr);
}

int pull_exit_code(const std::vector<PullOutcome>& outcomes) {
  std::optional<Code> common;
  bool any_ok = false;
  bool mixed = false;
  for (const auto& o : outcomes) {
    if (pull_succeeded(o)) {
      any_ok = true;
      continue;
    }
    const Code c = o.error.is_ok() ? Code::kInternal : o.error.code();
    if (common && *common != c) mixed = true;
    common = c;
  }
  if (!common) return static_cast<int>(Exit::kOk);
  if (any_ok || mixed) return static_cast<int>(Exit::kFailure);
  return exit_code(*common);
}

std::string image_pinned_json(std::string_view image, bool pinned) {
  return dump(json{{"image", std::string(image)}, {"pinned", pinned}});
}

namespace {
std::string count_images(size_t n) {
  return std::to_string(n) + (n == 1 ? " image" : " images");
}
std::string join(const std::vector<std::string>& items, std::string_view sep) {
  std::string out;
  for (const auto& i : items) {
    if (!out.empty()) out += sep;
    out += i;
  }
  return out;
}
}  // namespace

std::string image_gc_text(const GcReply& gc, bool dry_run) {
  if (gc.removed.empty())
    return dry_run ? "nothing to collect (dry run)\n" : "nothing to collect\n";
  std::vector<std::vector<std::string>> rows;
  rows.reserve(gc.removed.size());
  for (const auto& r : gc.removed) {
    rows.push_back(
        {short_digest(r.digest), r.tags.empty() ? "-" : join(r.tags, ","), human_bytes(r.size)});
  }
  return render_table({"DIGEST", "TAGS", "SIZE"}, rows) + (dry_run ? "would remove " : "removed ") +
         count_images(gc.removed.size()) + ", " + human_bytes(gc.bytes) +
         (dry_run ? " (dry run)\n" : "\n");
}

std::string image_gc_json(const GcReply& gc, bool dry_run) {
  json removed = json::array();
  for (const auto& r : gc.removed) {
    removed.push_back({{"digest", r.digest}, {"tags", r.tags}, {"size", r.size}});
  }
  return dump(json{{"removed", removed}, {"bytes", gc.bytes}, {"dry_run", dry_run}});
}

std::optional<VerifyReport> verify_report_from_events(const std::vector<EventRow>& events,
                                                      uint32_t job_id) {
  std::vector<CorruptImage> pending;
  for (const auto& e : events) {
    if (e.kind != "ImageCorrupt" && e.kind != "ImageVerified") continue;
    const json p = json::parse(e.payload_json, nullptr, false);
    if (p.is_discarded() || !p.is_object()) continue;
    if (e.kind == "ImageCorrupt") {
      pending.push_back({.digest = p.value("digest", e.object_id),
                         .tags = {},
                         .problem = p.value("problem", std::string())});
      continue;
    }
    const auto id = p.find("job_id");
    if (id == p.end() || !id->is_number_unsigned() || id->get<uint64_t>() != job_id) {
      pending.clear();
      continue;
    }
    const auto checked = p.find("checked");
    return VerifyReport{.checked = checked != p.end() && checked->is_number_unsigned()
                                       ? checked->get<uint64_t>()
                                       : 0,
                        .corrupt = std::move(pending)};
  }
  return std::nullopt;
}

void add_tags(const std::vector<ImageRow>& images, VerifyReport* report) {
  for (auto& c : report->corrupt) {
    for (const auto& i : images) {
      if (i.digest == c.digest && !i.ref.empty()) c.tags.push_back(i.ref);
    }
  }
}

std::string verify_report_text(const VerifyReport& r) {
  std::string out;
  for (const auto& c : r.corrupt) {
    out += "corrupt: " + c.digest;
    if (!c.tags.empty()) out += " (" + join(c.tags, ", ") + ")";
    out += ": " + c.problem + "\n";
  }
  out += "checked " + count_images(r.checked) + ": ";
  out += r.corrupt.empty() ? "all intact\n" : std::to_string(r.corrupt.size()) + " corrupt\n";
  return out;
}

std::string verify_report_json(const VerifyReport& r) {
  json corrupt = json::array();
  for (const auto& c : r.corrupt) {
    corrupt.push_back({{"digest", c.digest}, {"tags", c.tags}, {"problem", c.problem}});
  }
  return dump(json{{"checked", r.checked}, {"corrupt", corrupt}});
}

namespace {
constexpr size_t kMaxLabel = 40;
constexpr size_t kBarCells = 20;

// The unit that shows `total` (or `done` without one) as 10 to 10239 of it.
std::pair<double, const char*> progress_unit(uint64_t done, uint64_t total) {
  static constexpr std::array<const char*, 5> kUnits = {"B", "KiB", "MiB", "GiB", "TiB"};
  const uint64_t ref = total > 0 ? total : done;
  double div = 1;
  size_t unit = 0;
  while (static_cast<double>(ref) / div >= 10240.0 && unit + 1 < kUnits.size()) {
    div *= 1024;
    ++unit;
  }
  return {div, kUnits[unit]};
}

std::string format_amount(double value, int decimals) {
  std::array<char, 32> buf{};
  std::snprintf(buf.data(), buf.size(), "%.*f", decimals, value);
  return buf.data();
}
}  // namespace

std::string progress_bar(std::string_view label, size_t label_width, uint64_t done,
                         uint64_t total) {
  std::string name(label.substr(0, kMaxLabel));
  name.resize(std::max(name.size(), std::min(label_width, kMaxLabel)), ' ');
  const size_t cells =
      total > 0 ? static_cast<size_t>(std::min(done, total) * kBarCells / total) : 0;
  std::string out =
      name + "  [" + std::string(cells, '#') + std::string(kBarCells - cells, '-') + "]  ";
  const auto [div, unit] = progress_unit(done, total);
  if (total == 0) {
    if (done == 0) return out + "waiting";
    return out + format_amount(static_cast<double>(done) / div, 1) + " " + unit;
  }
  const auto pct = static_cast<unsigned>(std::min(done, total) * 100 / total);
  std::array<char, 8> p{};
  std::snprintf(p.data(), p.size(), "%3u%%", pct);
  return out + format_amount(static_cast<double>(done) / div, 1) + "/" +
         format_amount(static_cast<double>(total) / div, 1) + " " + unit + "  " + p.data();
}

std::string progress_plain(std::string_view what, uint64_t done, uint64_t total) {
  const auto [div, unit] = progress_unit(done, total);
  std::string out = std::string(what) + ": " + format_amount(static_cast<double>(done) / div, 0);
  if (total > 0) out += "/" + format_amount(static_cast<double>(total) / div, 0);
  return out + " " + unit;
}

std::string redraw_lines(const std::vector<std::string>& lines, size_t drawn) {
  std::string out;
  if (drawn > 0) out += "\x1b[" + std::to_string(drawn) + "A";
  for (const auto& l : lines) out += "\r" + l + "\x1b[K\n";
  for (size_t i = lines.size(); i < drawn; ++i) out += "\r\x1b[K\n";
  return out;
}

std::string erase_lines(size_t drawn) {
  if (drawn == 0) return {};
  return "\x1b[" + std::to_string(drawn) + "A\r\x1b[J";
}

bool PlainProgressGate::due(uint64_t done, uint64_t total, TimePoint now) {
  if (done == 0 || done == last_done_) return false;
  bool print = !last_time_ || now - *last_time_ >= std::chrono::seconds(5);
  if (!print && total > 0) print = (done - std::min(done, last_done_)) * 10 >= total;
  if (print) {
    last_time_ = now;
    last_done_ = done;
  }
  return print;
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

// ---- node health, capacity, watch ----

int health_exit_code(std::string_view state) {
  if (state == "ok") return 0;
  if (state == "degraded") return kExitDegraded;
  return kExitFailed;
}

namespace {
json check_object(const HealthCheckRow& c) {
  return {{"name", c.name},
          {"state", c.state},
          {"reason", c.reason},
          {"vm_id", c.vm_id},
          {"changed_us", c.changed_us}};
}
}  // namespace

std::string health_text(const HealthReply& h, uint64_t now_us) {
  std::string out = "node: " + h.state;
  if (h.maintenance) {
    out += " (maintenance" + (h.maintenance_reason.empty() ? "" : ": " + h.maintenance_reason) +
           "; new VMs refused)";
  }
  out += "\n";
  std::vector<std::vector<std::string>> rows;
  rows.reserve(h.checks.size());
  for (const auto& c : h.checks) {
    rows.push_back(
        {c.name, c.state,
         relative_time(static_cast<uint64_t>(std::max<int64_t>(c.changed_us, 0)), now_us),
         c.reason});
  }
  return out + render_table({"CHECK", "STATE", "SINCE", "REASON"}, rows);
}

std::string health_json(const HealthReply& h) {
  json checks = json::array();
  for (const auto& c : h.checks) checks.push_back(check_object(c));
  return dump({{"state", h.state},
               {"maintenance", h.maintenance},
               {"maintenance_reason", h.maintenance_reason},
               {"heartbeat_seq", h.heartbeat_seq},
               {"checks", std::move(checks)}});
}

std::string capacity_table(const std::vector<CapacityRow>& rows) {
  std::vector<std::vector<std::string>> cells;
  cells.reserve(rows.size());
  for (const auto& r : rows) {
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, "%g", r.ratio);
    const uint64_t free = r.capacity > r.allocated ? r.capacity - r.allocated : 0;
    cells.push_back({r.resource, std::to_string(r.total), std::to_string(r.reserved), ratio,
                     std::to_string(r.capacity), std::to_string(r.allocated),
                     std::to_string(free)});
  }
  return render_table({"RESOURCE", "TOTAL", "RESERVED", "RATIO", "CAPACITY", "ALLOCATED", "FREE"},
                      cells);
}

std::string capacity_json(const std::vector<CapacityRow>& rows) {
  json arr = json::array();
  for (const auto& r : rows) {
    arr.push_back({{"resource", r.resource},
                   {"total", r.total},
                   {"reserved", r.reserved},
                   {"ratio", r.ratio},
                   {"capacity", r.capacity},
                   {"allocated", r.allocated},
                   {"free", r.capacity > r.allocated ? r.capacity - r.allocated : 0}});
  }
  return dump(arr);
}

std::string maintenance_json(bool enabled, std::string_view reason) {
  return dump({{"maintenance", enabled}, {"reason", enabled ? std::string(reason) : ""}});
}

namespace {
struct SignalJson {
  json operator()(const HeartbeatSignal& h) const {
    return {{"signal", "Heartbeat"},          {"seq", h.seq},
            {"timestamp_us", h.timestamp_us}, {"state", h.state},
            {"maintenance", h.maintenance},   {"summary", h.summary}};
  }
  json operator()(const HealthChangedSignal& h) const {
    json changed = json::array();
    for (const auto& c : h.changed) changed.push_back(check_object(c));
    return {{"signal", "HealthChanged"},
            {"seq", h.seq},
            {"state", h.state},
            {"previous_state", h.previous_state},
            {"maintenance", h.maintenance},
            {"changed", std::move(changed)},
            {"vms_affected", h.vms_affected}};
  }
  json operator()(const VmStateSignal& v) const {
    return {{"signal", "VmStateChanged"}, {"seq", v.seq},      {"vm_id", v.vm_id}, {"name", v.name},
            {"state", v.state},           {"reason", v.reason}};
  }
};
struct SignalText {
  std::string operator()(const HeartbeatSignal& h) const {
    auto get = [&](const char* k) {
      auto it = h.summary.find(k);
      return it == h.summary.end() ? std::string("?") : std::to_string(it->second);
    };
    return "heartbeat " + std::to_string(h.seq) + ": " + h.state +
           (h.maintenance ? " (maintenance)" : "") + ", " + get("vms_running") + "/" + get("vms") +
           " VMs running, vcpus " + get("vcpus_allocated") + "/" + get("vcpus_capacity") +
           ", memory " + get("memory_mib_allocated") + "/" + get("memory_mib_capacity") + " MiB";
  }
  std::string operator()(const HealthChangedSignal& h) const {
    std::string out = "health " + std::to_string(h.seq) + ": " + h.previous_state + " -> " +
                      h.state + (h.maintenance ? " (maintenance)" : "");
    for (const auto& c : h.changed) out += "\n  " + c.name + " " + c.state + ": " + c.reason;
    return out;
  }
  std::string operator()(const VmStateSignal& v) const {
    return "vm " + std::to_string(v.seq) + ": " + v.name + " (" + v.vm_id + ") " + v.state +
           (v.reason.empty() ? "" : ": " + v.reason);
  }
};
}  // namespace

std::string node_signal_json(const NodeSignal& s) {
  return dump(std::visit(SignalJson{}, s));
}

std::string node_signal_text(const NodeSignal& s) {
  return std::visit(SignalText{}, s);
}

}  // namespace nm::cli
