// Strict JSON documents: the shared rules of the spec parsers (VM spec, network spec).
//
// A document is one JSON object of bounded size; a duplicate key anywhere, a malformed document,
// unknown fields and wrong types are errors; nothing is coerced ("2" is not 2, 2.0 is not 2, true
// is not 1). Every error is an InvalidArgument whose message starts with the field path
// ("spec.vcpus: must be between 1 and 128, got 0"); user strings in it go through printable().
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>

#include "nm/core/status.h"

namespace nm::strict_json {

using json = nlohmann::json;

// A user string made safe for a one-line message: control and non-ASCII bytes as \xNN, strings
// longer than `max_shown` cut with "...".
std::string printable(std::string_view s, size_t max_shown = 64);

// "a.b": the path of field `b` inside `a`.
std::string join(std::string_view a, std::string_view b);

// InvalidArgument "<path>: <rule>".
Status field_error(std::string_view path, std::string_view rule);

// "an integer", "a string", ... for messages.
std::string_view type_name(const json& v);

// Parses `text` (at most `max_bytes`) into an object. Errors name `root`: too large, malformed
// JSON, a key appearing twice (at the top level or inside an entry), not an object.
Result<json> parse_document(std::string_view text, std::string_view root, size_t max_bytes);

// Every key of `obj` must be in `known`; else "<path>.<key>: unknown field".
Status check_known_fields(const json& obj, std::string_view path,
                          std::span<const std::string_view> known);

// An unsigned integer in [lo, hi]; booleans, floats, strings and negatives are refused.
Result<uint64_t> get_uint(const json& v, std::string_view path, uint64_t lo, uint64_t hi);

// A string without NUL or other control characters.
Result<std::string> get_string(const json& v, std::string_view path);

}  // namespace nm::strict_json
