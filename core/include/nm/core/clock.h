// Injected time. Components never read the system clock directly, so tests control it.
#pragma once

#include <chrono>
#include <cstdint>

namespace nm {

class Clock {
 public:
  virtual ~Clock() = default;
  // Wall-clock time, microseconds since the Unix epoch (for timestamps shown to people).
  virtual uint64_t now_realtime_us() const = 0;
  // Monotonic time, for durations and deadlines.
  virtual std::chrono::steady_clock::time_point now_monotonic() const = 0;
};

class SystemClock final : public Clock {
 public:
  uint64_t now_realtime_us() const override;
  std::chrono::steady_clock::time_point now_monotonic() const override;
};

}  // namespace nm
