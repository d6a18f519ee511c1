#include "nm/core/clock.h"

namespace nm {

uint64_t SystemClock::now_realtime_us() const {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::microseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

std::chrono::steady_clock::time_point SystemClock::now_monotonic() const {
  return std::chrono::steady_clock::now();
}

}  // namespace nm
