#include "nm/imagestore/image_source.h"

#include "nm/core/strict_json.h"

namespace nm {

Result<std::unique_ptr<ImageSource>> open_image_source(std::string_view spec,
                                                       std::string_view field) {
  if (spec.starts_with("http://")) return open_http_image_source(std::string(spec));
  std::string_view path = spec;
  if (path.starts_with("dir:")) path.remove_prefix(4);
  if (path.starts_with('/')) return open_dir_image_source(std::string(path));
  return invalid_argument(std::string(field) + ": '" + strict_json::printable(spec, 200) +
                          "' is not an image source (http://HOST[:PORT]/PATH, dir:/PATH or an "
                          "absolute path)");
}

}  // namespace nm
