#include <algorithm>

#include "nm/imagestore/image_store.h"

namespace nm {

GcPlan plan_image_gc(const std::vector<BlobInfo>& blobs,
                     const std::unordered_set<std::string>& in_use, uint64_t now_us,
                     uint64_t min_age_us) {
  GcPlan plan;
  for (const BlobInfo& blob : blobs) {
    const ImageInfo& info = blob.info;
    if (info.pinned || in_use.contains(info.digest.str())) continue;
    const uint64_t last_use = std::max(info.imported_us, info.last_used_us);
    if (last_use > now_us || now_us - last_use < min_age_us) continue;
    plan.remove.push_back(GcCandidate{.digest = info.digest, .size = info.size, .tags = blob.tags});
    plan.bytes += info.size;
  }
  std::sort(plan.remove.begin(), plan.remove.end(),
            [](const GcCandidate& a, const GcCandidate& b) { return a.digest < b.digest; });
  return plan;
}

}  // namespace nm
