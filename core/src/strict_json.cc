#include "nm/core/strict_json.h"

#include <algorithm>
#include <functional>
#include <optional>
#include <set>
#include <vector>

namespace nm::strict_json {
namespace {

// Parser callback that refuses duplicate keys (nlohmann keeps the last one silently).
class DuplicateKeyCheck {
 public:
  explicit DuplicateKeyCheck(std::string_view root) : root_(root) {}
  bool operator()(int /*depth*/, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        frames_.emplace_back();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        if (!frames_.empty()) frames_.pop_back();
        break;
      case json::parse_event_t::key:
        if (!frames_.empty() && parsed.is_string()) note_key(parsed.get_ref<const std::string&>());
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  }
  // The error for the first duplicate key, if any.
  const std::optional<Status>& error() const { return error_; }

 private:
  void note_key(const std::string& key) {
    if (frames_.size() == 1) top_key_ = key;
    if (frames_.back().insert(key).second || error_) return;
    error_ = frames_.size() == 1
                 ? field_error(join(root_, printable(key)), "appears more than once")
                 : field_error(join(root_, printable(top_key_)),
                               "field '" + printable(key) + "' appears more than once in an entry");
  }

  std::string root_;
  std::vector<std::set<std::string>> frames_;
  std::string top_key_;
  std::optional<Status> error_;
};

}  // namespace

std::string join(std::string_view a, std::string_view b) {
  return std::string(a) + "." + std::string(b);
}

std::string printable(std::string_view s, size_t max_shown) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_shown; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  if (s.size() > max_shown) out += "...";
  return out;
}

Status field_error(std::string_view path, std::string_view rule) {
  return invalid_argument(std::string(path) + ": " + std::string(rule));
}

std::string_view type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::object:
      return "an object";
    case json::value_t::array:
      return "an array";
    case json::value_t::string:
      return "a string";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number with a fraction or exponent";
    default:
      return "an unsupported value";
  }
}

Status check_known_fields(const json& obj, std::string_view path,
                          std::span<const std::string_view> known) {
  for (const auto& [key, value] : obj.items()) {
    if (std::find(known.begin(), known.end(), key) == known.end()) {
      return field_error(join(path, printable(key)), "unknown field");
    }
  }
  return Status::ok();
}

// Unsigned integer in [lo, hi]; booleans, floats, strings and negatives are refused.
Result<uint64_t> get_uint(const json& v, std::string_view path, uint64_t lo, uint64_t hi) {
  const auto range = [&](const std::string& got) {
    return field_error(path, "must be between " + std::to_string(lo) + " and " +
                                 std::to_string(hi) + ", got " + got);
  };
  if (v.is_number_integer() && !v.is_number_unsigned()) {
    const auto i = v.get<int64_t>();
    if (i < 0) return range(std::to_string(i));
  }
  if (!v.is_number_integer()) {
    return field_error(path, "must be an integer, got " + std::string(type_name(v)));
  }
  const auto u = v.get<uint64_t>();
  if (u < lo || u > hi) return range(std::to_string(u));
  return u;
}

// A string without NUL or other control characters.
Result<std::string> get_string(const json& v, std::string_view path) {
  if (!v.is_string()) {
    return field_error(path, "must be a string, got " + std::string(type_name(v)));
  }
  const auto& s = v.get_ref<const std::string&>();
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) {
      return field_error(path, "must not contain NUL or control characters");
    }
  }
  return s;
}

// "name:tag" or "sha256:<64 hex>". Anything starting with "sha256:" is judged as a digest, so
// "sha256" is never an image name.
Result<json> parse_document(std::string_view text, std::string_view root, size_t max_bytes) {
  if (text.size() > max_bytes) {
    return field_error(root, "document is " + std::to_string(text.size()) +
                                 " bytes, the limit is " + std::to_string(max_bytes));
  }
  DuplicateKeyCheck dup(root);
  json doc;
  try {
    doc = json::parse(text.begin(), text.end(), std::ref(dup));
  } catch (const json::exception& e) {
    std::string what = e.what();
    if (const auto p = what.find("] "); p != std::string::npos) what.erase(0, p + 2);
    if (const auto p = what.find("; last read"); p != std::string::npos) what.erase(p);
    return field_error(root, "malformed JSON: " + printable(what, 200));
  }
  if (dup.error()) return *dup.error();
  if (!doc.is_object()) {
    return field_error(root, "must be a JSON object, got " + std::string(type_name(doc)));
  }
  return doc;
}

}  // namespace nm::strict_json
