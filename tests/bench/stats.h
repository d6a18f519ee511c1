// Latency samples and their summary for the benchmark's report. Pure; unit-tested in
// stats_test.cc.
#pragma once

#include <chrono>
#include <cstddef>
#include <vector>

namespace nm::bench {

// Summary of a set of latencies, in milliseconds. All zero for an empty set.
struct Summary {
  std::size_t count = 0;
  double p50_ms = 0;
  double p99_ms = 0;
  double mean_ms = 0;
  double min_ms = 0;
  double max_ms = 0;
};

// Nearest-rank percentile: the smallest sample such that at least `fraction` (0 < fraction <= 1)
// of all samples are <= it. `sorted_ms` must be sorted ascending and non-empty.
double percentile(const std::vector<double>& sorted_ms, double fraction);

// Latencies of one measurement, in the order they were taken.
class Samples {
 public:
  void add(std::chrono::steady_clock::duration d) {
    ms_.push_back(std::chrono::duration<double, std::milli>(d).count());
  }
  void add_ms(double ms) { ms_.push_back(ms); }
  std::size_t size() const { return ms_.size(); }
  Summary summarize() const;

 private:
  std::vector<double> ms_;
};

}  // namespace nm::bench
