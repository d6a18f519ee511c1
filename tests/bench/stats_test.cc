#include "stats.h"

#include <gtest/gtest.h>

namespace nm::bench {
namespace {

TEST(Percentile, NearestRankOfHundredSamples) {
  std::vector<double> v;
  for (int i = 1; i <= 100; ++i) v.push_back(i);
  EXPECT_DOUBLE_EQ(percentile(v, 0.50), 50);
  EXPECT_DOUBLE_EQ(percentile(v, 0.99), 99);
  EXPECT_DOUBLE_EQ(percentile(v, 1.0), 100);
}

TEST(Percentile, SingleSampleIsEveryPercentile) {
  const std::vector<double> v{7.5};
  EXPECT_DOUBLE_EQ(percentile(v, 0.01), 7.5);
  EXPECT_DOUBLE_EQ(percentile(v, 0.99), 7.5);
}

TEST(Percentile, P99OfFiveSamplesIsTheMaximum) {
  const std::vector<double> v{1, 2, 3, 4, 50};
  EXPECT_DOUBLE_EQ(percentile(v, 0.99), 50);
  EXPECT_DOUBLE_EQ(percentile(v, 0.50), 3);
}

TEST(Samples, SummaryIsOrderIndependentAndInMilliseconds) {
  Samples s;
  s.add(std::chrono::microseconds(3000));
  s.add(std::chrono::microseconds(1000));
  s.add_ms(2.0);
  const Summary sum = s.summarize();
  EXPECT_EQ(sum.count, 3u);
  EXPECT_DOUBLE_EQ(sum.p50_ms, 2.0);
  EXPECT_DOUBLE_EQ(sum.p99_ms, 3.0);
  EXPECT_DOUBLE_EQ(sum.mean_ms, 2.0);
  EXPECT_DOUBLE_EQ(sum.min_ms, 1.0);
  EXPECT_DOUBLE_EQ(sum.max_ms, 3.0);
}

TEST(Samples, EmptySummaryIsZero) {
  const Summary sum = Samples{}.summarize();
  EXPECT_EQ(sum.count, 0u);
  EXPECT_DOUBLE_EQ(sum.p50_ms, 0.0);
}

}  // namespace
}  // namespace nm::bench
