// Timestamps for the timed loops. Where the kernel's clocksource is not the TSC (a
// TCG guest runs on the HPET), clock_gettime is a system call of microseconds, which
// would land inside every latency sample; the TSC costs nanoseconds. perftest reads
// the TSC too. Ticks become nanoseconds by the rate seen against steady_clock since
// the clock was made, so make it before the set-up and convert after the loop.
#pragma once

#include <chrono>
#include <cstdint>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

namespace rxio::perf {

class TickClock {
 public:
  TickClock() : start_ticks_(now()), start_(std::chrono::steady_clock::now()) {}

  static int64_t now() noexcept {
#if defined(__x86_64__)
    return static_cast<int64_t>(__rdtsc());
#else
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
#endif
  }

  double ns_per_tick() const noexcept {
    const int64_t ticks = now() - start_ticks_;
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start_).count();
    return ticks > 0 ? ns / static_cast<double>(ticks) : 1.0;
  }

 private:
  int64_t start_ticks_;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace rxio::perf
