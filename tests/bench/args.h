// Command-line helpers shared by the benchmark programs.
#pragma once

#include <charconv>
#include <string_view>
#include <system_error>

namespace nm::bench {

// Parses all of `text` as a number of type T that is at least `min` into *out; false (and *out
// untouched) otherwise.
template <typename T>
bool parse_number(std::string_view text, T min, T* out) {
  T v{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size() || v < min) return false;
  *out = v;
  return true;
}

}  // namespace nm::bench
