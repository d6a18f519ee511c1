#include <gtest/gtest.h>

#include "nm/imagestore/image_store.h"

namespace nm {
namespace {

constexpr uint64_t kHour = uint64_t{3600} * 1'000'000;
constexpr uint64_t kNow = uint64_t{1'700'000'000} * 1'000'000;

Digest digest(char c) {
  return Digest::trusted("sha256:" + std::string(64, c));
}

BlobInfo blob(char c, uint64_t imported_us, uint64_t last_used_us = 0, bool pinned = false,
              std::vector<ImageRef> tags = {}) {
  return BlobInfo{.info = ImageInfo{.ref = std::nullopt,
                                    .digest = digest(c),
                                    .size = uint64_t(c - 'a' + 1) * 1000,
                                    .tenant = std::nullopt,
                                    .imported_us = imported_us,
                                    .path = {},
                                    .pinned = pinned,
                                    .last_used_us = last_used_us},
                  .tags = std::move(tags)};
}

std::vector<std::string> removed(const GcPlan& plan) {
  std::vector<std::string> out;
  for (const GcCandidate& c : plan.remove) out.push_back(c.digest.str().substr(7, 1));
  return out;
}

TEST(PlanImageGc, RemovesOldUnusedUnpinnedBlobsSortedByDigestWithTheirTags) {
  const ImageRef tag{"debian", "12"};
  const std::vector<BlobInfo> blobs = {blob('c', kNow - 48 * kHour, 0, false, {tag}),
                                       blob('a', kNow - 48 * kHour)};
  const GcPlan plan = plan_image_gc(blobs, {}, kNow, 24 * kHour);
  EXPECT_EQ(removed(plan), (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(plan.bytes, 1000u + 3000u);
  EXPECT_EQ(plan.remove[1].tags, std::vector<ImageRef>{tag});
  EXPECT_EQ(plan.remove[1].size, 3000u);
  EXPECT_TRUE(plan.remove[0].tags.empty());
}

TEST(PlanImageGc, NeverRemovesBlobsInUseOrPinned) {
  const std::vector<BlobInfo> blobs = {blob('a', 0), blob('b', 0, 0, true), blob('c', 0)};
  const GcPlan plan = plan_image_gc(blobs, {digest('a').str()}, kNow, 0);
  EXPECT_EQ(removed(plan), (std::vector<std::string>{"c"}));
  EXPECT_EQ(plan.bytes, 3000u);
}

TEST(PlanImageGc, AgeCountsFromTheLastUseAndTheBoundaryIsInclusive) {
  const uint64_t age = 24 * kHour;
  const std::vector<BlobInfo> blobs = {
      blob('a', kNow - age),                       // exactly old enough
      blob('b', kNow - age + 1),                   // one microsecond too young
      blob('c', kNow - 10 * age, kNow - age + 1),  // imported long ago, used recently
      blob('d', kNow - 10 * age, kNow - 2 * age),  // used, but long ago
      blob('e', kNow + kHour),                     // from the future (clock step): kept
  };
  EXPECT_EQ(removed(plan_image_gc(blobs, {}, kNow, age)), (std::vector<std::string>{"a", "d"}));
}

TEST(PlanImageGc, EmptyInputsGiveAnEmptyPlan) {
  const GcPlan plan = plan_image_gc({}, {digest('a').str()}, kNow, 0);
  EXPECT_TRUE(plan.remove.empty());
  EXPECT_EQ(plan.bytes, 0u);
}

}  // namespace
}  // namespace nm
