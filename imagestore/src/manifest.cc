#include "nm/imagestore/manifest.h"

#include <array>
#include <nlohmann/json.hpp>

#include "nm/core/strict_json.h"

namespace nm {
namespace {

namespace sj = strict_json;

constexpr uint64_t kMaxBlobBytes = uint64_t{1} << 50;
constexpr std::array<std::string_view, 4> kFields = {"digest", "size", "format", "kind"};

Result<ImageManifest> parse(std::string_view text) {
  NM_ASSIGN_OR_RETURN(const sj::json doc, sj::parse_document(text, "manifest", kMaxManifestBytes));
  NM_RETURN_IF_ERROR(sj::check_known_fields(doc, "manifest", kFields));
  for (std::string_view field : kFields) {
    if (!doc.contains(field)) return sj::field_error(sj::join("manifest", field), "is required");
  }
  NM_ASSIGN_OR_RETURN(const std::string digest,
                      sj::get_string(doc.at("digest"), "manifest.digest"));
  NM_ASSIGN_OR_RETURN(Digest parsed, Digest::parse(sj::printable(digest, 128), "manifest.digest"));
  ImageManifest m{.digest = std::move(parsed)};
  NM_ASSIGN_OR_RETURN(m.size, sj::get_uint(doc.at("size"), "manifest.size", 1, kMaxBlobBytes));
  NM_ASSIGN_OR_RETURN(const std::string format,
                      sj::get_string(doc.at("format"), "manifest.format"));
  if (format == "qcow2") {
    m.format = ImageFormat::kQcow2;
  } else if (format == "raw") {
    m.format = ImageFormat::kRaw;
  } else {
    return sj::field_error("manifest.format",
                           "'" + sj::printable(format) + "' is not an image format (raw or qcow2)");
  }
  NM_ASSIGN_OR_RETURN(const std::string kind, sj::get_string(doc.at("kind"), "manifest.kind"));
  NM_ASSIGN_OR_RETURN(m.kind, parse_image_kind(sj::printable(kind), "manifest.kind"));
  return m;
}

}  // namespace

Result<ImageManifest> parse_image_manifest(std::string_view text, std::string_view what) {
  auto m = parse(text);
  if (!m.is_ok()) return m.status().with_context(what);
  return m;
}

std::string image_manifest_to_json(const ImageManifest& m) {
  const sj::json j = {{"digest", m.digest.str()},
                      {"size", m.size},
                      {"format", image_format_name(m.format)},
                      {"kind", image_kind_name(m.kind)}};
  return j.dump(2) + "\n";
}

}  // namespace nm
