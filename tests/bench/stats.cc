#include "stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace nm::bench {

double percentile(const std::vector<double>& sorted_ms, double fraction) {
  const auto n = static_cast<double>(sorted_ms.size());
  auto rank = static_cast<std::size_t>(std::ceil(fraction * n));
  rank = std::clamp<std::size_t>(rank, 1, sorted_ms.size());
  return sorted_ms[rank - 1];
}

Summary Samples::summarize() const {
  Summary s;
  if (ms_.empty()) return s;
  std::vector<double> sorted = ms_;
  std::sort(sorted.begin(), sorted.end());
  s.count = sorted.size();
  s.p50_ms = percentile(sorted, 0.50);
  s.p99_ms = percentile(sorted, 0.99);
  s.mean_ms = std::accumulate(sorted.begin(), sorted.end(), 0.0) / static_cast<double>(s.count);
  s.min_ms = sorted.front();
  s.max_ms = sorted.back();
  return s;
}

}  // namespace nm::bench
